//! The operator at scale, on the local control plane with kwok (a benchmark
//! that prints figures, not a timed test; `operator/bench/report` runs it).
//!
//! Adds N fake nodes of G GPUs (default 256 × 8, in a zone of their own),
//! starts the `weft-operator` binary on one namespace, applies a job of one
//! worker per node, and measures:
//!
//! - apply → every worker pod Running (and → the job's phase Running);
//! - a node's Ready condition turning False → the new mesh epoch published
//!   (and the same from the moment the fault was injected);
//! - the operator's resident memory (now and peak);
//! - reconcile time p50/p99/max, from the operator's own debug log.
//!
//! The nodes, the namespace and the operator are removed at the end.
//!
//! `weft-bench-operator [--nodes N] [--gpus G] [--operator PATH] [--json FILE] [--log FILE]`
//! (`--log` keeps the operator's JSON log there).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Node, Pod};
use kube::api::{DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use serde::Serialize;
use weft_crds::topology::LABEL_ZONE;
use weft_crds::{Phase, TrainingJob, TrainingJobSpec, WorkerResources};
use weft_e2e::TestEnv;
use weft_e2e::jobs::job_pods;
use weft_e2e::nodes::node_objects;
use weft_operator::build::mesh_config_map_name;
use weft_planner::cluster::parse_cluster;
use weft_planner::mesh::MeshPlan;

const ZONE: &str = "bench";
const JOB: &str = "big";
const NOT_READY: &str = "node-not-ready.stage.kwok.x-k8s.io";
const POLL: Duration = Duration::from_millis(25);

struct Args {
    nodes: u32,
    gpus: u32,
    operator: Option<PathBuf>,
    json: Option<PathBuf>,
    log: Option<PathBuf>,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        nodes: 256,
        gpus: 8,
        operator: None,
        json: None,
        log: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--nodes" => args.nodes = value()?.parse().context("--nodes is a count")?,
            "--gpus" => args.gpus = value()?.parse().context("--gpus is a count")?,
            "--operator" => args.operator = Some(value()?.into()),
            "--json" => args.json = Some(value()?.into()),
            "--log" => args.log = Some(value()?.into()),
            _ => bail!(
                "unknown argument {flag:?}; usage: weft-bench-operator [--nodes N] [--gpus G] [--operator PATH] [--json FILE] [--log FILE]"
            ),
        }
    }
    ensure!(args.nodes >= 2, "--nodes must be at least 2");
    ensure!(args.gpus >= 1, "--gpus must be at least 1");
    Ok(args)
}

/// What the benchmark measured.
#[derive(Serialize, Debug)]
struct Report {
    nodes: u32,
    gpus_per_node: u32,
    workers: usize,
    apply_to_all_pods_running_s: f64,
    apply_to_job_running_s: f64,
    apply_to_first_mesh_s: f64,
    fault_to_node_not_ready_s: f64,
    node_not_ready_to_new_epoch_s: f64,
    fault_to_new_epoch_s: f64,
    operator_rss_mib: f64,
    operator_peak_rss_mib: f64,
    reconciles: usize,
    reconcile_p50_ms: f64,
    reconcile_p99_ms: f64,
    reconcile_max_ms: f64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let env = TestEnv::connect().await?;
    weft_e2e::ensure_training_job_crd(&env).await?;
    let operator = match &args.operator {
        Some(path) => path.clone(),
        None => weft_e2e::operator_binary()?,
    };
    let spec = format!(
        "{}x{}:nics={},name={ZONE},zone={ZONE},rack=16",
        args.nodes, args.gpus, args.gpus
    );
    let nodes = node_objects(&parse_cluster(&spec)?);
    let namespace = format!(
        "weft-bench-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs()
            % 100_000
    );
    let result = bench(&env, &args, &operator, &nodes, &namespace).await;
    // Leave the cluster as it was.
    let node_api: Api<Node> = Api::all(env.client.clone());
    for node in &nodes {
        let _ = node_api
            .delete(&node.name_any(), &DeleteParams::default())
            .await;
    }
    let namespaces: Api<Namespace> = Api::all(env.client.clone());
    let _ = namespaces
        .delete(&namespace, &DeleteParams::default())
        .await;
    let report = result?;
    print_report(&report);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

async fn bench(
    env: &TestEnv,
    args: &Args,
    operator: &std::path::Path,
    nodes: &[Node],
    namespace: &str,
) -> anyhow::Result<Report> {
    let client = env.client.clone();
    let node_api: Api<Node> = Api::all(client.clone());
    eprintln!("adding {} nodes of {} GPUs", nodes.len(), args.gpus);
    for node in nodes {
        match node_api.create(&PostParams::default(), node).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => return Err(e.into()),
        }
    }
    let ready_deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let list = node_api
            .list(&ListParams::default().labels(&format!("{LABEL_ZONE}={ZONE}")))
            .await?;
        // Ready, and the node lifecycle controller has lifted its
        // not-ready taint (until then neither the scheduler nor weft uses it).
        let ready = list
            .items
            .iter()
            .filter(|n| node_ready(n) && untainted(n))
            .count();
        if ready == nodes.len() {
            break;
        }
        ensure!(
            Instant::now() < ready_deadline,
            "only {ready} of {} nodes became Ready and untainted within 300 s",
            nodes.len()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &Namespace {
                metadata: ObjectMeta {
                    name: Some(namespace.to_string()),
                    ..Default::default()
                },
                ..Default::default()
            },
        )
        .await?;
    let accounts: Api<k8s_openapi::api::core::v1::ServiceAccount> =
        Api::namespaced(client.clone(), namespace);
    while accounts.get_opt("default").await?.is_none() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let log_path = args
        .log
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("{namespace}-operator.log")));
    let log = std::fs::File::create(&log_path)?;
    let mut child = tokio::process::Command::new(operator)
        .args(["--log-format", "json", "run", "--namespace", namespace])
        .args(["--listen", "127.0.0.1:0"])
        .env("RUST_LOG", "warn,weft_operator::reconcile=debug")
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", operator.display()))?;
    let pid = child.id().context("the operator has no pid")?;
    tokio::time::sleep(Duration::from_secs(2)).await;

    let workers = nodes.len();
    let mut spec = TrainingJobSpec {
        command: Some(vec!["sleep".into(), "3600".into()]),
        resources: WorkerResources {
            gpus: args.gpus as i32,
            cpu: Some("1".into()),
            memory: Some("1Gi".into()),
        },
        ..TrainingJobSpec::new("busybox:1.36", (workers / 2) as i32, workers as i32)
    };
    spec.scheduling.node_selector = BTreeMap::from([(LABEL_ZONE.to_string(), ZONE.to_string())]);
    spec.elasticity.rescale_cooldown_seconds = 1;
    let jobs: Api<TrainingJob> = Api::namespaced(client.clone(), namespace);
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);

    eprintln!("applying a job of {workers} workers");
    let applied = Instant::now();
    jobs.create(&PostParams::default(), &TrainingJob::new(JOB, spec))
        .await?;
    let (mut first_mesh, mut job_running, mut all_running) = (None, None, None);
    let deadline = applied + Duration::from_secs(300);
    while all_running.is_none() || job_running.is_none() {
        ensure!(
            Instant::now() < deadline,
            "the job's workers were not all Running within 300 s"
        );
        if first_mesh.is_none()
            && config_maps
                .get_opt(&mesh_config_map_name(JOB))
                .await?
                .is_some()
        {
            first_mesh = Some(applied.elapsed());
        }
        if job_running.is_none()
            && jobs
                .get(JOB)
                .await?
                .status
                .is_some_and(|s| s.phase == Phase::Running)
        {
            job_running = Some(applied.elapsed());
        }
        if all_running.is_none() {
            let running = job_pods(&pods, JOB)
                .await?
                .iter()
                .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
                .count();
            if running == workers {
                all_running = Some(applied.elapsed());
            }
        }
        tokio::time::sleep(POLL).await;
    }
    let all_running = all_running.context("never all Running")?;
    let job_running = job_running.context("never Running")?;
    let first_mesh = first_mesh.unwrap_or(job_running);
    eprintln!(
        "all {workers} workers Running after {:.2} s",
        all_running.as_secs_f64()
    );

    // A node fails: from its Ready condition turning False to the new epoch.
    let before = mesh(&config_maps).await?;
    let victim = before
        .workers
        .get(before.workers.len() / 2)
        .map(|w| w.node.clone())
        .context("a mesh with workers")?;
    let patch = serde_json::json!({ "metadata": { "labels": { NOT_READY: "true" } } });
    let injected = Instant::now();
    node_api
        .patch(&victim, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    let (mut not_ready, mut new_epoch) = (None, None);
    let deadline = injected + Duration::from_secs(120);
    while new_epoch.is_none() || not_ready.is_none() {
        ensure!(
            Instant::now() < deadline,
            "no new mesh epoch within 120 s of node {victim} failing"
        );
        if not_ready.is_none() && !node_ready(&node_api.get(&victim).await?) {
            not_ready = Some(injected.elapsed());
        }
        if new_epoch.is_none() && mesh(&config_maps).await?.epoch > before.epoch {
            new_epoch = Some(injected.elapsed());
        }
        tokio::time::sleep(POLL).await;
    }
    let not_ready = not_ready.context("the node never turned NotReady")?;
    let new_epoch = new_epoch.context("no new epoch")?;
    // Let the reconciles of the shrink finish before reading memory and logs.
    tokio::time::sleep(Duration::from_secs(3)).await;

    let (rss, peak) = memory_mib(pid)?;
    child.start_kill()?;
    let _ = child.wait().await;
    let mut durations = reconcile_seconds(&log_path)?;
    ensure!(
        !durations.is_empty(),
        "the operator logged no reconcile (see {})",
        log_path.display()
    );
    durations.sort_by(f64::total_cmp);
    let quantile = |q: f64| {
        let index = ((durations.len() as f64 - 1.0) * q).round() as usize;
        durations[index.min(durations.len() - 1)] * 1000.0
    };
    let report = Report {
        nodes: args.nodes,
        gpus_per_node: args.gpus,
        workers,
        apply_to_all_pods_running_s: all_running.as_secs_f64(),
        apply_to_job_running_s: job_running.as_secs_f64(),
        apply_to_first_mesh_s: first_mesh.as_secs_f64(),
        fault_to_node_not_ready_s: not_ready.as_secs_f64(),
        node_not_ready_to_new_epoch_s: new_epoch.saturating_sub(not_ready).as_secs_f64(),
        fault_to_new_epoch_s: new_epoch.as_secs_f64(),
        operator_rss_mib: rss,
        operator_peak_rss_mib: peak,
        reconciles: durations.len(),
        reconcile_p50_ms: quantile(0.5),
        reconcile_p99_ms: quantile(0.99),
        reconcile_max_ms: quantile(1.0),
    };
    if args.log.is_none() {
        let _ = std::fs::remove_file(&log_path);
    }
    Ok(report)
}

fn node_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
        .is_some_and(|c| c.status == "True")
}

fn untainted(node: &Node) -> bool {
    node.spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_none_or(|t| t.is_empty())
}

async fn mesh(config_maps: &Api<ConfigMap>) -> anyhow::Result<MeshPlan> {
    let cm = config_maps.get(&mesh_config_map_name(JOB)).await?;
    let text = cm
        .data
        .and_then(|d| d.get("mesh.json").cloned())
        .context("mesh ConfigMap without mesh.json")?;
    Ok(serde_json::from_str(&text)?)
}

/// Resident and peak resident memory of process `pid`, in MiB.
fn memory_mib(pid: u32) -> anyhow::Result<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> anyhow::Result<f64> {
        let line = status
            .lines()
            .find(|l| l.starts_with(name))
            .with_context(|| format!("no {name} in /proc/{pid}/status"))?;
        let kib: f64 = line
            .split_whitespace()
            .nth(1)
            .context("a memory figure")?
            .parse()?;
        Ok(kib / 1024.0)
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// The duration of every reconcile the operator logged (its debug
/// "reconciled" lines).
fn reconcile_seconds(log: &std::path::Path) -> anyhow::Result<Vec<f64>> {
    let text = std::fs::read_to_string(log)?;
    Ok(text
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|v| v["fields"]["message"] == "reconciled")
        .filter_map(|v| v["fields"]["seconds"].as_f64())
        .collect())
}

fn print_report(r: &Report) {
    let row = |what: &str, value: String, goal: &str| {
        println!("{what:<46} {value:>12}   {goal}");
    };
    println!(
        "weft-operator on {} kwok nodes × {} GPUs, one job of {} workers",
        r.nodes, r.gpus_per_node, r.workers
    );
    row(
        "apply → all worker pods Running",
        format!("{:.2} s", r.apply_to_all_pods_running_s),
        "goal ≤ 10 s",
    );
    row(
        "apply → first mesh published",
        format!("{:.2} s", r.apply_to_first_mesh_s),
        "",
    );
    row(
        "apply → job phase Running",
        format!("{:.2} s", r.apply_to_job_running_s),
        "",
    );
    row(
        "node Ready=False → new mesh epoch",
        format!("{:.2} s", r.node_not_ready_to_new_epoch_s),
        "goal ≤ 2 s",
    );
    row(
        "fault injected → node Ready=False (kwok)",
        format!("{:.2} s", r.fault_to_node_not_ready_s),
        "",
    );
    row(
        "operator resident memory (now / peak)",
        format!(
            "{:.0}/{:.0} MiB",
            r.operator_rss_mib, r.operator_peak_rss_mib
        ),
        "goal < 100 MiB",
    );
    row(
        "reconcile p50 / p99 / max",
        format!(
            "{:.0}/{:.0}/{:.0} ms",
            r.reconcile_p50_ms, r.reconcile_p99_ms, r.reconcile_max_ms
        ),
        &format!("{} reconciles", r.reconciles),
    );
}
