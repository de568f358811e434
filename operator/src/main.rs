//! `weft-operator`: the operator binary.
//!
//! `weft-operator run [--namespace NS] [--listen ADDR] [--leader-elect ...]`
//! runs the controller (all namespaces by default) against the cluster in
//! `KUBECONFIG` or, in a pod, its service account, serving `/metrics`,
//! `/healthz` and `/readyz`; with `--leader-elect` it reconciles only while
//! it holds a Lease. `weft-operator inventory` prints the GPU nodes of the cluster as
//! weft reads them (GPUs, product, rack, block, NICs and their GPU affinity),
//! and every node it could not read, with the reason.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use k8s_openapi::api::core::v1::Node;
use kube::api::ListParams;
use kube::{Api, Client};
use weft_operator::inventory::{ClusterNode, read_nodes};
use weft_operator::leader::{Election, run_elected};
use weft_operator::metrics::{Metrics, serve};
use weft_operator::telemetry::LogFormat;

#[derive(Parser, Debug)]
#[command(name = "weft-operator", version, about = "weft's Kubernetes operator")]
struct Cli {
    /// Log lines as text or as JSON objects (levels from RUST_LOG, default
    /// info). Traces go over OTLP when OTEL_EXPORTER_OTLP_ENDPOINT is set.
    #[arg(long, value_enum, default_value = "text", global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Reconcile TrainingJobs.
    Run {
        /// Only this namespace's jobs (all namespaces when absent).
        #[arg(long)]
        namespace: Option<String>,
        /// Address of /metrics, /healthz and /readyz.
        #[arg(long, default_value = "0.0.0.0:8080")]
        listen: SocketAddr,
        /// Reconcile only while holding the Lease, so several replicas can run.
        #[arg(long)]
        leader_elect: bool,
        /// Namespace of the Lease (default: $POD_NAMESPACE, else "default").
        #[arg(long)]
        lease_namespace: Option<String>,
        /// Name of the Lease.
        #[arg(long, default_value = "weft-operator")]
        lease_name: String,
        /// This replica's identity (default: $POD_NAME, else host and process id).
        #[arg(long)]
        identity: Option<String>,
        /// Seconds a lease lasts without renewal (how soon a standby takes over).
        #[arg(long, default_value_t = 15, value_parser = clap::value_parser!(u64).range(2..=600))]
        lease_seconds: u64,
    },
    /// Print the GPU nodes of the cluster as weft reads them.
    Inventory,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Before the runtime: the trace exporter's HTTP client blocks, and runs
    // on a thread of its own. Dropped last, so the last spans are flushed.
    let telemetry = weft_operator::telemetry::init(cli.log_format, "weft-operator")
        .map_err(|e| anyhow::anyhow!("[{}] {e}", e.category()))?;
    if let Some(endpoint) = &telemetry.traces_endpoint {
        tracing::info!(endpoint, "exporting traces over OTLP/HTTP");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("could not start the async runtime")?;
    let result = runtime.block_on(dispatch(cli.command));
    drop(runtime);
    drop(telemetry);
    result
}

async fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Inventory => inventory().await,
        Command::Run {
            namespace,
            listen,
            leader_elect,
            lease_namespace,
            lease_name,
            identity,
            lease_seconds,
        } => {
            let election = leader_elect.then(|| Election {
                namespace: lease_namespace
                    .or_else(|| std::env::var("POD_NAMESPACE").ok())
                    .unwrap_or_else(|| "default".to_string()),
                lease: lease_name,
                identity: identity
                    .or_else(|| std::env::var("POD_NAME").ok())
                    .unwrap_or_else(|| {
                        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                            .map(|h| h.trim().to_string())
                            .unwrap_or_else(|_| "weft-operator".to_string());
                        format!("{host}-{}", std::process::id())
                    }),
                duration_s: lease_seconds,
            });
            run(namespace, listen, election).await
        }
    }
}

async fn run(
    namespace: Option<String>,
    listen: SocketAddr,
    election: Option<Election>,
) -> anyhow::Result<()> {
    let client = Client::try_default()
        .await
        .context("no usable cluster configuration (set KUBECONFIG, or run in a pod)")?;
    let metrics = Arc::new(Metrics::new());
    let (bound, serving) = serve(listen, metrics.clone()).await?;
    tokio::spawn(serving);
    tracing::info!(
        namespace = namespace.as_deref().unwrap_or("all namespaces"),
        listen = %bound,
        "reconciling TrainingJobs; metrics and health served"
    );
    match election {
        Some(election) => {
            tracing::info!(
                identity = election.identity,
                lease = format!("{}/{}", election.namespace, election.lease),
                "waiting for the lease"
            );
            run_elected(client, election, namespace, metrics).await?;
        }
        None => {
            metrics
                .ready
                .store(true, std::sync::atomic::Ordering::Relaxed);
            metrics.leader.set(1);
            weft_operator::controller::run_with(client, namespace, metrics).await;
        }
    }
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
    let (cluster_nodes, errors) = read_nodes(&list.items);
    print!("{}", render_table(&cluster_nodes));
    for err in &errors {
        eprintln!("warning [{}]: {err}", err.category());
    }
    Ok(())
}

fn render_table(nodes: &[ClusterNode]) -> String {
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
            if n.node.gpus == 0 {
                "-"
            } else {
                n.node.gpu.name.as_str()
            },
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
    let gpu_nodes = nodes.iter().filter(|n| n.node.gpus > 0).count();
    out += &format!(
        "{gpu_nodes} GPU nodes, {} CPU-only nodes, {total} schedulable GPUs\n",
        nodes.len() - gpu_nodes
    );
    out
}
