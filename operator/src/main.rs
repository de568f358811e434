//! `weft-operator`: the operator binary.
//!
//! `weft-operator run [--namespace NS]` runs the controller (all namespaces by
//! default) against the cluster in `KUBECONFIG` or, in a pod, its service
//! account. `weft-operator inventory` prints the GPU nodes of the cluster as
//! weft reads them (GPUs, product, rack, block, NICs and their GPU affinity),
//! and every node it could not read, with the reason.

use anyhow::{Context, bail};
use k8s_openapi::api::core::v1::Node;
use kube::api::ListParams;
use kube::{Api, Client};
use weft_operator::inventory::{GpuNode, read_nodes};

const USAGE: &str = "usage: weft-operator run [--namespace NS] | weft-operator inventory";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["inventory"] => inventory().await,
        ["run"] => run(None).await,
        ["run", "--namespace", ns] => run(Some(ns.to_string())).await,
        _ => bail!("{USAGE}"),
    }
}

async fn run(namespace: Option<String>) -> anyhow::Result<()> {
    let client = Client::try_default()
        .await
        .context("no usable cluster configuration (set KUBECONFIG, or run in a pod)")?;
    eprintln!(
        "weft-operator: reconciling TrainingJobs in {}",
        namespace.as_deref().unwrap_or("all namespaces")
    );
    weft_operator::controller::run(client, namespace).await;
    Ok(())
}

async fn inventory() -> anyhow::Result<()> {
    let client = Client::try_default()
        .await
        .context("no usable cluster configuration (set KUBECONFIG)")?;
    let nodes: Api<Node> = Api::all(client);
    let list = nodes
        .list(&ListParams::default())
        .await
        .context("could not list nodes")?;
    let (gpu_nodes, errors) = read_nodes(&list.items);
    print!("{}", render_table(&gpu_nodes));
    for err in &errors {
        eprintln!("warning [{}]: {err}", err.category());
    }
    Ok(())
}

fn render_table(nodes: &[GpuNode]) -> String {
    let mut out = format!(
        "{:<16} {:<6} {:>4} {:<10} {:<16} {:<16} NICS (name:Gbps:gpus)\n",
        "NODE", "READY", "GPUS", "GPU", "RACK", "BLOCK"
    );
    for n in nodes {
        let nics: Vec<String> = n
            .node
            .nics
            .iter()
            .map(|nic| {
                let gpus: Vec<String> = nic.gpus.iter().map(u32::to_string).collect();
                format!("{}:{}:{}", nic.name, nic.gbps, gpus.join(","))
            })
            .collect();
        let ready = match (n.ready, n.schedulable) {
            (true, true) => "yes",
            (true, false) => "cordon",
            (false, _) => "no",
        };
        out += &format!(
            "{:<16} {:<6} {:>4} {:<10} {:<16} {:<16} {}\n",
            n.node.name,
            ready,
            n.node.gpus,
            n.node.gpu.name,
            n.node.rack,
            n.node.block,
            nics.join(" ")
        );
    }
    let total: u32 = nodes
        .iter()
        .filter(|n| n.ready && n.schedulable)
        .map(|n| n.node.gpus)
        .sum();
    out += &format!("{} GPU nodes, {total} schedulable GPUs\n", nodes.len());
    out
}
