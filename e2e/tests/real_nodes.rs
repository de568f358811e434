//! A job's whole life in real containers, on real kubelet nodes of the local
//! control plane (`e2e/cluster/up --real-nodes 3`), installed and used as
//! people do: the operator is the chart's Deployment (two replicas, leader
//! election, the chart's RBAC only) running weft's operator image; the job is
//! a CPU TrainingJob of 3 workers (at least 2) running weft's trainer image,
//! with its checkpoints on a PersistentVolume. On it:
//!
//! - the workers meet through the job's headless Service and train; the
//!   status shows the step, tokens/s, the last checkpoint and the time to the
//!   first step, and they move;
//! - one worker's container is killed: a new mesh epoch goes on from the last
//!   checkpoint, and the other workers' containers are the same ones;
//! - one node's kubelet stops: the node turns NotReady, the job goes on with
//!   2 workers, its status says when the node failed and how long the
//!   recovery took from there and from the new epoch; when the kubelet
//!   is back, the job grows to 3 again;
//! - the leading operator pod is deleted: the other replica takes the lease,
//!   and the job does not notice (same epoch, steps go on);
//! - suspend and resume: no worker runs, then training goes on from the last
//!   checkpoint;
//! - the job finishes: every step was computed from the same data after each
//!   interruption (a step computed twice, before a failure and after the
//!   resume from the checkpoint, has the same loss), and every checkpoint
//!   kept matches its manifest;
//! - deleting the job removes its pods, Service and ConfigMap;
//! - the operator and the workers export traces to a collector on the pods'
//!   network: the mesh of the epoch after the lost node names the reconcile
//!   that published it, and the new epoch's steps are that span's children.
//!
//! On failure the harness prints the container logs of the pods beside the
//! objects. Ignored unless asked for: `scripts/test real-nodes` starts the
//! nodes, builds and imports the images, and runs it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{
    ConfigMap, Node, PersistentVolume, PersistentVolumeClaim, Pod, Service, Toleration,
};
use kube::api::{DeleteParams, ListParams, LogParams, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use sha2::{Digest, Sha256};
use weft_crds::{Phase, TrainingJob, TrainingJobSpec, TrainingJobStatus, WorkerResources};
use weft_e2e::jobs::{job_pods, mesh_of};
use weft_e2e::nodes::{REAL_NODE_LABEL, REAL_NODES_BRIDGE_IP, REAL_NODES_NETNS};
use weft_e2e::replicas::holder;
use weft_e2e::{HarnessError, TestEnv, TestNamespace, repo_root, wait_for};
use weft_operator::build::{LABEL_JOB, mesh_config_map_name, service_name};
use weft_telemetry::collector::{CollectedSpan, spans_of_export};

const JOB: &str = "real";
const STEPS: u64 = 150;
/// Where images/build's images are named (`WEFT_IMAGE_REGISTRY`, as there).
fn registry() -> String {
    std::env::var("WEFT_IMAGE_REGISTRY").unwrap_or_else(|_| "ghcr.io/weft-dev".into())
}
/// Time for anything the job does after a fault (a node turns NotReady 20 s
/// after its kubelet stops; the rest takes seconds).
const WAIT: Duration = Duration::from_secs(150);

#[tokio::test]
#[ignore = "needs 3 real nodes and weft's images imported: scripts/test real-nodes"]
async fn a_job_lives_its_whole_life_in_real_containers() -> anyhow::Result<()> {
    let env = TestEnv::connect().await?;
    let nodes: Api<Node> = Api::all(env.client.clone());
    let real = nodes
        .list(&ListParams::default().labels(&format!("{REAL_NODE_LABEL}=true")))
        .await?
        .items;
    ensure!(
        real.len() >= 3,
        "{} real nodes in the cluster; this test needs 3 (e2e/cluster/up --real-nodes 3)",
        real.len()
    );
    env.run("real-nodes", |ns| async move {
        let scratch = std::env::temp_dir().join(format!("weft-e2e-{}", ns.name));
        let checkpoints = scratch.join("checkpoints");
        std::fs::create_dir_all(&checkpoints)?;
        // The workers run as UID 65532; the volume is a directory of this machine.
        std::fs::set_permissions(
            &checkpoints,
            std::os::unix::fs::PermissionsExt::from_mode(0o777),
        )?;
        // A collector on the pods' network, for the operator's and the
        // workers' traces.
        let traces = scratch.join("traces.jsonl");
        let _collector = tokio::process::Command::new("ip")
            .args(["netns", "exec", REAL_NODES_NETNS])
            .arg(env!("CARGO_BIN_EXE_weft-e2e"))
            .arg("otlp-collector")
            .arg(format!("{REAL_NODES_BRIDGE_IP}:{COLLECTOR_PORT}"))
            .arg(&traces)
            .kill_on_drop(true)
            .spawn()
            .context("starting the OTLP collector in the nodes' network")?;
        let mut stopped_kubelet = None;
        let result = life(&ns, &checkpoints, &traces, &mut stopped_kubelet).await;
        // A failure while a kubelet was stopped leaves the node as it was.
        if let Some(node) = stopped_kubelet {
            let _ = fault(&["start-kubelet", &node]).await;
        }
        let _ = weft_e2e::helm(&["uninstall", &ns.name, "--namespace", &ns.name]).await;
        let volumes: Api<PersistentVolume> = Api::all(ns.client.clone());
        let _ = volumes
            .delete(&volume_name(&ns), &DeleteParams::default())
            .await;
        if result.is_ok() {
            let _ = std::fs::remove_dir_all(&scratch);
        }
        result
    })
    .await
}

fn volume_name(ns: &TestNamespace) -> String {
    format!("{}-checkpoints", ns.name)
}

/// Where the collector listens, on the nodes' bridge address.
const COLLECTOR_PORT: u16 = 4318;

fn collector_endpoint() -> String {
    format!("http://{REAL_NODES_BRIDGE_IP}:{COLLECTOR_PORT}")
}

/// Every span the collector has kept in `file`.
fn collected(file: &Path) -> Vec<CollectedSpan> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .flat_map(spans_of_export)
        .collect()
}

async fn life(
    ns: &TestNamespace,
    checkpoints: &Path,
    traces: &Path,
    stopped_kubelet: &mut Option<String>,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let say = |what: &str| eprintln!("[{:>5.1} s] {what}", started.elapsed().as_secs_f64());

    // The operator, as the chart installs it, on the real nodes.
    weft_e2e::helm(&[
        "upgrade",
        "--install",
        &ns.name,
        "{chart}",
        "--namespace",
        &ns.name,
        "--set",
        &format!("watchNamespace={}", ns.name),
        "--set-string",
        &format!("nodeSelector.{}=true", REAL_NODE_LABEL.replace('.', "\\.")),
        "--set-json",
        &format!(r#"tolerations=[{{"key":"{REAL_NODE_LABEL}","operator":"Exists","effect":"NoSchedule"}}]"#),
        "--set",
        &format!("image.repository={}/weft-operator", registry()),
        "--set",
        "leaderElection.leaseSeconds=5",
        "--set",
        &format!("tracing.otlpEndpoint={}", collector_endpoint()),
        "--wait",
        "--timeout",
        "180s",
    ])
    .await?;
    let pods: Api<Pod> = ns.api();
    let operators = operator_pods(&pods).await?;
    ensure!(
        operators.len() == 2,
        "the chart should run 2 operator replicas, found {operators:?}"
    );
    let leases: Api<Lease> = ns.api();
    let leader = wait_for(
        "an operator replica to lead",
        Duration::from_secs(60),
        || {
            let leases = leases.clone();
            async move { holder(&leases).await.map_err(other) }
        },
    )
    .await?;
    say(&format!("operator installed; {leader} leads"));

    // The checkpoint volume: a directory of this machine, which every real
    // node shares.
    let volume: PersistentVolume = serde_json::from_value(serde_json::json!({
        "metadata": { "name": volume_name(ns) },
        "spec": {
            "capacity": { "storage": "1Gi" },
            "accessModes": ["ReadWriteMany"],
            "storageClassName": "weft-e2e-local",
            "hostPath": { "path": checkpoints, "type": "Directory" },
            "claimRef": { "namespace": ns.name, "name": "checkpoints" },
        }
    }))?;
    Api::<PersistentVolume>::all(ns.client.clone())
        .create(&PostParams::default(), &volume)
        .await?;
    let claim: PersistentVolumeClaim = serde_json::from_value(serde_json::json!({
        "metadata": { "name": "checkpoints" },
        "spec": {
            "accessModes": ["ReadWriteMany"],
            "storageClassName": "weft-e2e-local",
            "resources": { "requests": { "storage": "1Gi" } },
            "volumeName": volume_name(ns),
        }
    }))?;
    ns.api::<PersistentVolumeClaim>()
        .create(&PostParams::default(), &claim)
        .await?;

    let mut spec = TrainingJobSpec {
        args: Some(vec!["worker".into(), "--steps".into(), STEPS.to_string()]),
        resources: WorkerResources {
            gpus: 0,
            cpu: Some("500m".into()),
            memory: Some("1Gi".into()),
        },
        ..TrainingJobSpec::new(
            format!("{}/weft-trainer:{}", registry(), env!("CARGO_PKG_VERSION")),
            2,
            3,
        )
    };
    // The workers' step traces go to the same collector.
    for (name, value) in [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", collector_endpoint()),
        ("OTEL_BSP_SCHEDULE_DELAY", "500".to_string()),
    ] {
        spec.env.push(k8s_openapi::api::core::v1::EnvVar {
            name: name.into(),
            value: Some(value),
            ..Default::default()
        });
    }
    spec.data.max_sequence_length = 512;
    spec.data.tokens_per_step = 3072;
    spec.checkpoint.claim_name = Some("checkpoints".into());
    spec.checkpoint.interval_steps = 5;
    spec.elasticity.rescale_cooldown_seconds = 5;
    spec.elasticity.stall_timeout_seconds = Some(120);
    spec.scheduling
        .node_selector
        .insert(REAL_NODE_LABEL.into(), "true".into());
    spec.scheduling.tolerations.push(Toleration {
        key: Some(REAL_NODE_LABEL.into()),
        operator: Some("Exists".into()),
        effect: Some("NoSchedule".into()),
        ..Default::default()
    });
    let jobs: Api<TrainingJob> = ns.api();
    jobs.create(&PostParams::default(), &TrainingJob::new(JOB, spec))
        .await?;

    // Training, in 3 containers on 3 nodes, seen in the status.
    let status = wait_status(&jobs, "3 workers training with a checkpoint", |s| {
        s.phase == Phase::Running
            && s.workers_ready == 3
            && s.step >= 8
            && s.last_checkpoint.is_some()
    })
    .await?;
    let first = status
        .time_to_first_step_seconds
        .context("no timeToFirstStepSeconds")?;
    ensure!(
        (0..=started.elapsed().as_secs() as i64).contains(&first),
        "time to first step {first} s is not within the test's own time"
    );
    ensure!(
        status.tokens_per_second.unwrap_or(0.0) > 0.0,
        "no tokens/s in {status:?}"
    );
    let config_maps: Api<ConfigMap> = ns.api();
    let mut log = Losses::default();
    log.read(&pods).await?;
    let workers = containers(&pods).await?;
    // The workers that do not run rank 0 (whose log the test reads).
    let rank_zero = rank_zero_worker(&config_maps).await?;
    let others: Vec<String> = workers
        .keys()
        .filter(|w| **w != rank_zero)
        .cloned()
        .collect();
    ensure!(
        others.len() == 2,
        "workers {workers:?}, rank 0 on {rank_zero}"
    );
    let killed = &others[1];
    let nodes: BTreeSet<&String> = workers.values().map(|(node, _)| node).collect();
    ensure!(nodes.len() == 3, "3 workers on nodes {nodes:?}");
    say(&format!(
        "training: step {}, {:?} tokens/s, first step after {first} s",
        status.step, status.tokens_per_second
    ));

    // A worker's container dies: a new epoch, the others' containers stay.
    let epoch = status.mesh_epoch;
    let restarts = status.restarts;
    fault(&["kill-container", &ns.name, killed]).await?;
    let status = wait_status(&jobs, "a new epoch of 3 after the kill", |s| {
        s.mesh_epoch > epoch && s.phase == Phase::Running && s.workers_ready == 3
    })
    .await?;
    ensure!(
        status.restarts == restarts + 1,
        "the killed container counts {} worker failures (was {restarts})",
        status.restarts
    );
    let after = containers(&pods).await?;
    for survivor in [&rank_zero, &others[0]] {
        ensure!(
            after.get(survivor) == workers.get(survivor),
            "{survivor}'s container changed: {:?} then {:?}",
            workers.get(survivor),
            after.get(survivor)
        );
    }
    ensure!(
        after
            .get(killed)
            .is_some_and(|new| Some(new) != workers.get(killed)),
        "{killed} does not run a new container: {:?} then {:?}",
        workers.get(killed),
        after.get(killed)
    );
    // The fault is when its container ended or its failure was counted, as
    // the operator saw it; an epoch moved before the failure showed has
    // none to tell (seen once, while the leading operator lost its lease).
    if let Some(fault) = &status.last_fault_time {
        let start = status.start_time.clone().context("no startTime")?;
        ensure!(
            fault.0 >= start.0 && fault.0 <= k8s_openapi::jiff::Timestamp::now(),
            "lastFaultTime {fault:?} is not within the job's life"
        );
    }
    say(&format!(
        "container killed: epoch {} of 3, survivors unchanged",
        status.mesh_epoch
    ));

    // A node's kubelet stops: NotReady, the job goes on with 2, then grows.
    // (A worker that does not run rank 0 in this epoch's mesh.)
    log.read(&pods).await?;
    let rank_zero = rank_zero_worker(&config_maps).await?;
    let lost = after
        .keys()
        .find(|w| **w != rank_zero)
        .context("no worker but rank 0's")?;
    let (lost_node, _) = after[lost].clone();
    let epoch = status.mesh_epoch;
    let stopped = Instant::now();
    *stopped_kubelet = Some(lost_node.clone());
    fault(&["stop-kubelet", &lost_node]).await?;
    let status = wait_status(&jobs, "the job to go on with 2 workers", |s| {
        s.mesh_epoch > epoch
            && s.workers_desired == 2
            && s.phase == Phase::Running
            && s.last_recovery
                .as_ref()
                .is_some_and(|r| r.mesh_epoch == s.mesh_epoch)
    })
    .await?;
    let observed = stopped.elapsed().as_secs_f64();
    let recovery = status
        .last_recovery
        .clone()
        .context("no lastRecovery after the shrink")?;
    ensure!(
        recovery.mesh_epoch == status.mesh_epoch
            && (0.0..=observed).contains(&(recovery.seconds as f64)),
        "lastRecovery {recovery:?} is not of epoch {} within the {observed:.1} s since the kubelet stopped",
        status.mesh_epoch
    );
    // The fault is the node's turn to NotReady, and the recovery is
    // measured from it.
    let node = Api::<Node>::all(ns.client.clone()).get(&lost_node).await?;
    let not_ready = weft_operator::inventory::not_ready_since(&node).cloned();
    ensure!(
        not_ready.is_some() && status.last_fault_time == not_ready,
        "lastFaultTime {:?} is not when {lost_node} turned NotReady ({not_ready:?})",
        status.last_fault_time
    );
    let from_fault = recovery
        .from_fault_seconds
        .context("lastRecovery has no fromFaultSeconds after a node turned NotReady")?;
    ensure!(
        from_fault >= recovery.seconds && (from_fault as f64) <= observed,
        "lastRecovery's fromFaultSeconds {from_fault} is not between its seconds from the new epoch ({}) and the {observed:.1} s since the kubelet stopped",
        recovery.seconds
    );
    // The mesh of the epoch without the node names the reconcile that
    // published it (checked against the traces at the end).
    let recovered_epoch = status.mesh_epoch;
    let recovery_parent = mesh_of(&config_maps, JOB)
        .await?
        .filter(|m| m.epoch as i64 == recovered_epoch)
        .and_then(|m| m.trace_parent)
        .context("the mesh of the epoch without the lost node carries no trace context")?;
    log.read(&pods).await?;
    say(&format!(
        "{lost_node} NotReady: epoch {} of 2, recovered {from_fault} s after NotReady, {} s after the new epoch (the test saw it {observed:.1} s after the kubelet stopped)",
        status.mesh_epoch, recovery.seconds
    ));
    let epoch = status.mesh_epoch;
    fault(&["start-kubelet", &lost_node]).await?;
    *stopped_kubelet = None;
    let status = wait_status(&jobs, "the job to grow back to 3", |s| {
        s.mesh_epoch > epoch && s.workers_desired == 3 && s.phase == Phase::Running
    })
    .await?;
    ensure!(
        status.last_fault_time.is_none(),
        "growth is no fault, but lastFaultTime is {:?}",
        status.last_fault_time
    );
    say(&format!(
        "{lost_node} back: epoch {} of 3",
        status.mesh_epoch
    ));

    // The leading operator pod goes: the other takes over, the job carries on.
    let leader = holder(&leases).await?.context("no lease holder")?;
    let epoch = status.mesh_epoch;
    let step = status.step;
    pods.delete(&leader, &DeleteParams::default().grace_period(0))
        .await?;
    let successor = wait_for("another replica to lead", WAIT, || {
        let leases = leases.clone();
        let leader = leader.clone();
        async move {
            Ok(holder(&leases)
                .await
                .map_err(other)?
                .filter(|h| *h != leader))
        }
    })
    .await?;
    let status = wait_status(&jobs, "steps after the takeover", |s| s.step > step + 3).await?;
    ensure!(
        status.mesh_epoch == epoch && status.phase == Phase::Running,
        "the job noticed the operator's takeover: epoch {} (was {epoch}), {:?}",
        status.mesh_epoch,
        status.phase
    );
    say(&format!(
        "{leader} deleted: {successor} leads, epoch {epoch} unchanged"
    ));

    // Suspend: the workers, told by SIGTERM, stop with a checkpoint of their
    // last step, well within the pods' grace period (30 s). Rank 0's log is
    // read until its pod is gone.
    let suspended = Instant::now();
    jobs.patch(
        JOB,
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({ "spec": { "suspend": true } })),
    )
    .await?;
    // What each pod still there 15 s on says: for the error below.
    let mut slow = String::new();
    loop {
        let _ = log.read(&pods).await;
        let phase = jobs.get(JOB).await?.status.unwrap_or_default().phase;
        let left = job_pods(&pods, JOB).await?;
        if phase == Phase::Suspended && left.is_empty() {
            break;
        }
        if slow.is_empty() && suspended.elapsed() > Duration::from_secs(15) {
            for pod in &left {
                let tail = LogParams {
                    tail_lines: Some(15),
                    ..Default::default()
                };
                let text = pods.logs(&pod.name_any(), &tail).await.unwrap_or_default();
                slow += &format!("\n--- {} after 15 s ---\n{text}", pod.name_any());
            }
        }
        ensure!(
            suspended.elapsed() < WAIT,
            "the job was not suspended, with no worker pod, within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let suspend_s = suspended.elapsed().as_secs_f64();
    ensure!(
        suspend_s < 25.0,
        "the workers took {suspend_s:.1} s to stop: they did not stop when asked{slow}"
    );
    let kept = jobs.get(JOB).await?.status.unwrap_or_default();
    let kept_checkpoint = kept
        .last_checkpoint
        .clone()
        .context("no checkpoint when suspended")?;
    let on_disk = verify_checkpoints(checkpoints)?
        .last()
        .copied()
        .unwrap_or(0);
    ensure!(
        kept_checkpoint.step == kept.step && on_disk == kept.step as u64,
        "suspended at step {} with the last checkpoint at {} ({} on the volume)",
        kept.step,
        kept_checkpoint.step,
        on_disk
    );
    say(&format!(
        "suspended in {suspend_s:.1} s at step {}, with its checkpoint",
        kept_checkpoint.step
    ));
    jobs.patch(
        JOB,
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({ "spec": { "suspend": false } })),
    )
    .await?;

    // To the end.
    // Rank 0's log is read while it runs: its pod may be deleted when the
    // job ends (the operator stops what still runs then).
    let resumed = Instant::now();
    let status = loop {
        let _ = log.read(&pods).await;
        let status = jobs.get(JOB).await?.status.unwrap_or_default();
        ensure!(
            status.phase != Phase::Failed,
            "the job failed: {:?}",
            status.conditions
        );
        if status.phase == Phase::Succeeded {
            break status;
        }
        ensure!(
            resumed.elapsed() < Duration::from_secs(600),
            "the job did not succeed within 600 s of its resume"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let _ = log.read(&pods).await;
    ensure!(
        status.step == STEPS as i64,
        "the job ended at step {}",
        status.step
    );
    let last = status
        .last_checkpoint
        .clone()
        .context("no last checkpoint")?;
    ensure!(
        last.step == STEPS as i64,
        "the last checkpoint is of step {}",
        last.step
    );
    say(&format!(
        "succeeded at step {STEPS}; goodput {:?}; {} steps computed twice",
        status.goodput,
        log.replayed()
    ));

    // The data order survived every interruption, and no checkpoint is damaged.
    log.check(STEPS)?;
    let kept = verify_checkpoints(checkpoints)?;
    ensure!(
        kept.contains(&STEPS),
        "the final checkpoint is not among those kept: {kept:?}"
    );

    // One trace from the reconcile that published the epoch without the
    // lost node to the steps of that epoch, on every worker.
    let parts: Vec<&str> = recovery_parent.split('-').collect();
    ensure!(parts.len() == 4, "{recovery_parent:?} is not a traceparent");
    let (trace_id, span_id) = (parts[1].to_string(), parts[2].to_string());
    let seen = wait_for(
        "the recovery's reconcile and its epoch's steps at the collector",
        Duration::from_secs(60),
        || {
            let (trace_id, span_id) = (trace_id.clone(), span_id.clone());
            async move {
                let spans = collected(traces);
                let reconcile = spans.iter().any(|s| {
                    s.name == "reconcile"
                        && s.trace_id == trace_id
                        && s.span_id == span_id
                        && s.text("job") == Some(JOB)
                });
                let workers: BTreeSet<String> = spans
                    .iter()
                    .filter(|s| {
                        s.name == "step" && s.trace_id == trace_id && s.parent_span_id == span_id
                    })
                    .filter(|s| {
                        s.resource.get("weft.mesh_epoch").and_then(|v| v.as_i64())
                            == Some(recovered_epoch)
                    })
                    .filter_map(|s| s.resource.get("weft.worker")?.as_str().map(String::from))
                    .collect();
                Ok::<_, HarnessError>((reconcile && workers.len() == 2).then_some(workers))
            }
        },
    )
    .await?;
    say(&format!(
        "traced: the reconcile of epoch {recovered_epoch} and the steps of {seen:?} in one trace"
    ));

    // Deleting the job removes what it made.
    jobs.delete(JOB, &DeleteParams::default()).await?;
    let services: Api<Service> = ns.api();
    wait_for("the job's pods, Service and ConfigMap to go", WAIT, || {
        let (pods, services, config_maps) = (pods.clone(), services.clone(), config_maps.clone());
        async move {
            let left = pods
                .list(&ListParams::default().labels(&format!("{LABEL_JOB}={JOB}")))
                .await?
                .items
                .len()
                + usize::from(services.get_opt(&service_name(JOB)).await?.is_some())
                + usize::from(
                    config_maps
                        .get_opt(&mesh_config_map_name(JOB))
                        .await?
                        .is_some(),
                );
            Ok((left == 0).then_some(()))
        }
    })
    .await?;
    say("deleted: no pod, Service or ConfigMap left");
    Ok(())
}

fn other(e: anyhow::Error) -> HarnessError {
    HarnessError::Other(e.to_string())
}

async fn wait_status(
    jobs: &Api<TrainingJob>,
    what: &str,
    done: impl Fn(&TrainingJobStatus) -> bool,
) -> Result<TrainingJobStatus, HarnessError> {
    let done = &done;
    wait_for(what, WAIT, || {
        let jobs = jobs.clone();
        async move {
            let status = jobs.get(JOB).await?.status.unwrap_or_default();
            if status.phase == Phase::Failed {
                return Err(HarnessError::Other(format!(
                    "the job failed while waiting for {what}: {:?}",
                    status.conditions
                )));
            }
            Ok(done(&status).then_some(status))
        }
    })
    .await
}

async fn operator_pods(pods: &Api<Pod>) -> anyhow::Result<Vec<String>> {
    Ok(pods
        .list(&ListParams::default().labels("app.kubernetes.io/name=weft-operator"))
        .await?
        .items
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .map(|p| p.name_any())
        .collect())
}

/// Each running worker pod's (node, container ID).
async fn containers(pods: &Api<Pod>) -> anyhow::Result<BTreeMap<String, (String, String)>> {
    let mut out = BTreeMap::new();
    for pod in job_pods(pods, JOB).await? {
        if pod.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let node = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .unwrap_or_default();
        let id = pod
            .status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .and_then(|c| c.first())
            .and_then(|c| c.container_id.clone())
            .unwrap_or_default();
        out.insert(pod.name_any(), (node, id));
    }
    Ok(out)
}

/// The worker that runs rank 0 in the job's current mesh.
async fn rank_zero_worker(config_maps: &Api<ConfigMap>) -> anyhow::Result<String> {
    let mesh = mesh_of(config_maps, JOB)
        .await?
        .context("no mesh published")?;
    mesh.workers
        .iter()
        .find(|w| w.first_rank == 0)
        .map(|w| w.name.clone())
        .context("no worker of the mesh runs rank 0")
}

/// Runs `e2e/cluster/fault ARGS...`.
async fn fault(args: &[&str]) -> anyhow::Result<()> {
    let script = repo_root().join("e2e/cluster/fault");
    let output = tokio::process::Command::new(&script)
        .args(args)
        .output()
        .await
        .with_context(|| format!("could not run {}", script.display()))?;
    ensure!(
        output.status.success(),
        "e2e/cluster/fault {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

/// The loss of every step rank 0 reported, each time it computed it (a step
/// is computed again after a resume from an earlier checkpoint).
#[derive(Default)]
struct Losses {
    /// step → the losses of its computations, by the log line they came from
    /// (a log read twice is not counted twice).
    steps: BTreeMap<u64, BTreeMap<String, f64>>,
}

impl Losses {
    /// Reads the log of every worker pod there is (as `kubectl logs` does):
    /// rank 0's holds the metrics, and which pod runs rank 0 can change with
    /// the epoch. A pod gone meanwhile is passed over.
    async fn read(&mut self, pods: &Api<Pod>) -> anyhow::Result<()> {
        for pod in job_pods(pods, JOB).await? {
            let (name, uid) = (pod.name_any(), pod.metadata.uid.unwrap_or_default());
            if let Ok(text) = pods.logs(&name, &LogParams::default()).await {
                self.take(&uid, &text)?;
            }
        }
        Ok(())
    }

    /// The metrics lines of one pod's log.
    fn take(&mut self, uid: &str, text: &str) -> anyhow::Result<()> {
        for (n, line) in text.lines().enumerate() {
            let Some(json) = line.strip_prefix("weft-metrics ") else {
                continue;
            };
            let metrics: serde_json::Value = serde_json::from_str(json)?;
            let (Some(step), Some(loss)) = (metrics["step"].as_u64(), metrics["loss"].as_f64())
            else {
                bail!("a metrics line without step and loss: {line}");
            };
            self.steps
                .entry(step)
                .or_default()
                .insert(format!("{uid}:{n}"), loss);
        }
        Ok(())
    }

    /// Steps computed more than once.
    fn replayed(&self) -> usize {
        self.steps.values().filter(|l| l.len() > 1).count()
    }

    /// Every step up to `last` was seen (the logs are read before each fault
    /// and while the pods stop, and the faults spare rank 0's pod), and a
    /// step computed twice gave the same loss.
    fn check(&self, last: u64) -> anyhow::Result<()> {
        let missing: Vec<u64> = (1..=last).filter(|s| !self.steps.contains_key(s)).collect();
        ensure!(missing.is_empty(), "no loss reported for steps {missing:?}");
        for (step, losses) in &self.steps {
            let values: Vec<f64> = losses.values().copied().collect();
            let (lo, hi) = values
                .iter()
                .fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(*v), hi.max(*v)));
            ensure!(
                hi - lo <= 1e-6 * hi.abs().max(1.0),
                "step {step} was computed {} times with losses {values:?}",
                values.len()
            );
        }
        Ok(())
    }
}

/// Checks every checkpoint in `dir` against its manifest (each file's size
/// and SHA-256); returns their steps.
fn verify_checkpoints(dir: &Path) -> anyhow::Result<Vec<u64>> {
    let mut steps = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path: PathBuf = entry?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let Some(step) = name
            .strip_prefix("step-")
            .and_then(|s| s.parse::<u64>().ok())
        else {
            continue;
        };
        let manifest: serde_json::Value = serde_json::from_slice(
            &std::fs::read(path.join("manifest.json"))
                .with_context(|| format!("checkpoint {} has no manifest", path.display()))?,
        )?;
        ensure!(
            manifest["step"] == step,
            "{} holds step {}",
            path.display(),
            manifest["step"]
        );
        let files = manifest["files"]
            .as_object()
            .context("a manifest without files")?;
        ensure!(!files.is_empty(), "{} lists no files", path.display());
        for (file, want) in files {
            let bytes = std::fs::read(path.join(file))
                .with_context(|| format!("{}/{file} is missing", path.display()))?;
            let digest = format!("{:x}", Sha256::digest(&bytes));
            ensure!(
                want["bytes"] == bytes.len() && want["sha256"] == digest.as_str(),
                "{}/{file} does not match its manifest",
                path.display()
            );
        }
        steps.push(step);
    }
    steps.sort();
    ensure!(!steps.is_empty(), "no checkpoint in {}", dir.display());
    Ok(steps)
}
