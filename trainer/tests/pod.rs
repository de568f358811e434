//! `weft-trainer worker`, the command of a TrainingJob's pods, run as two
//! "pods" (processes) on this machine with the environment and the files the
//! operator gives them: the mesh of epoch 1 (two workers of one rank), the
//! operator's training parameters (its golden training.json, made small).
//! Mid-run the mesh moves to epoch 2 with one worker:
//! - with both pods alive, every rank stops after the same step, with a
//!   checkpoint of it; the remaining worker goes on as a world of one from
//!   there, the dropped one waits, and each step is trained exactly once;
//! - with the second pod killed (its node lost), the survivor's collective
//!   fails, it waits for the new epoch and goes on from the last checkpoint.
//!
//! - a pod asked to stop (SIGTERM: deleted, or the job suspended) stops at
//!   once: every rank of the epoch stops after the same step, with a
//!   checkpoint of it; a run started again goes on from there, and a peer
//!   of a pod deleted alone waits for the next epoch.
//!
//! Either way the run ends at the last step with every loss equal to a
//! straight run's on the same global batches (the data order does not depend
//! on the world). Pods plan each step on the nodes of their mesh: two workers
//! of two ranks on two nodes run rings across the nodes hierarchically, with
//! the losses of one node of four.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

// The shared helpers; the pods join their groups themselves.
#[allow(dead_code)]
mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use weft_planner::cluster::parse_cluster;
use weft_planner::mesh::{MeshNode, MeshPlan, MeshRequest, plan_mesh};
use weft_trainer::train::StepMetrics;

use common::free_port;

/// Steps of the shrink test: after the mesh shrinks at step 3, enough left
/// that the run cannot end before its mirror's next look at the mesh.
const STEPS: u64 = 10;
const METRICS_PREFIX: &str = "weft-metrics ";

fn trainer() -> Command {
    Command::new(env!("CARGO_BIN_EXE_weft-trainer"))
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("weft-pod-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Writes the mesh as Kubernetes updates a ConfigMap file: all at once.
fn publish(path: &Path, mesh: &MeshPlan) {
    let staging = path.with_extension("writing");
    std::fs::write(&staging, serde_json::to_string_pretty(mesh).unwrap()).unwrap();
    std::fs::rename(&staging, path).unwrap();
}

/// Publishes in `dir` the epoch-1 mesh of two workers of `gpus` ranks on the
/// nodes of `cluster`, meeting at a free port of 127.0.0.1.
fn publish_first_mesh(dir: &Path, cluster: &str, gpus: u32) -> MeshPlan {
    let nodes = MeshNode::all_free(&parse_cluster(cluster).unwrap());
    let request = MeshRequest {
        job: "llm".into(),
        min_workers: 2,
        max_workers: 2,
        gpus_per_worker: gpus,
        epoch: 1,
    };
    let mut mesh = plan_mesh(&request, &nodes, &[]).unwrap();
    mesh.rendezvous = Some(format!("127.0.0.1:{}", free_port()));
    publish(&dir.join("mesh.json"), &mesh);
    mesh
}

fn pod(dir: &Path, worker: &str, steps: u64) -> Child {
    pod_with(dir, worker, steps, &[])
}

fn pod_with(dir: &Path, worker: &str, steps: u64, extra: &[&str]) -> Child {
    pod_reading(dir, &dir.join("training.json"), worker, steps, extra)
}

/// A pod whose training parameters are the file `training`.
fn pod_reading(dir: &Path, training: &Path, worker: &str, steps: u64, extra: &[&str]) -> Child {
    pod_command(dir, training, worker, steps, extra)
        .spawn()
        .unwrap()
}

/// The command of a pod: its worker's flags (the test's timeouts unless
/// `extra` sets them) and environment.
fn pod_command(dir: &Path, training: &Path, worker: &str, steps: u64, extra: &[&str]) -> Command {
    use std::os::unix::process::CommandExt;
    let mut command = trainer();
    // A group of its own, so a test can kill the pod (the worker and its
    // ranks), as a lost node takes the whole container.
    command
        .process_group(0)
        .args(["worker", "--steps", &steps.to_string()]);
    for (flag, value) in [("--epoch-wait-s", "30"), ("--collective-timeout-s", "20")] {
        if !extra.contains(&flag) {
            command.args([flag, value]);
        }
    }
    command
        .args(extra)
        .env("WEFT_WORKER", worker)
        .env("WEFT_MESH", dir.join("mesh.json"))
        .env("WEFT_TRAINING", training)
        .env("WEFT_POD_IP", "127.0.0.1")
        // Steps of the tiny model take well under the default second.
        .env("WEFT_MESH_POLL_MS", "100")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

/// Sends each metrics line of `child`'s standard output down a channel.
fn metrics_of(child: &mut Child) -> mpsc::Receiver<StepMetrics> {
    let (tx, rx) = mpsc::channel();
    let out = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if let Some(body) = line.strip_prefix(METRICS_PREFIX)
                && let Ok(m) = serde_json::from_str::<StepMetrics>(body)
                && tx.send(m).is_err()
            {
                return;
            }
        }
    });
    rx
}

fn stderr_of(child: &mut Child) -> String {
    let mut text = String::new();
    if let Some(mut err) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut err, &mut text);
    }
    text
}

/// Writes the operator's training parameters, made small, into `dir`.
fn write_training(dir: &Path) {
    write_training_with(dir, serde_json::json!({}));
}

/// [`write_training`] with these fields of the job's `parallelism` section.
fn write_training_with(dir: &Path, parallelism: serde_json::Value) {
    let golden =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../operator/tests/golden/training.json");
    let mut training: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&golden).unwrap()).unwrap();
    training["data"]["maxSequenceLength"] = 1024.into();
    training["data"]["tokensPerStep"] = 4096.into();
    training["checkpoint"]["path"] = dir
        .join("checkpoints")
        .to_string_lossy()
        .into_owned()
        .into();
    training["checkpoint"]["intervalSteps"] = 1.into();
    for (field, value) in parallelism.as_object().unwrap() {
        training["parallelism"][field] = value.clone();
    }
    std::fs::write(dir.join("training.json"), training.to_string()).unwrap();
}

/// The straight run's metrics: `local` on `ranks` ranks with the pods' data settings.
fn straight_run(dir: &Path, ranks: u32, steps: u64, extra: &[&str]) -> Vec<StepMetrics> {
    let reference_file = dir.join("reference.jsonl");
    let out = trainer()
        .args([
            "local",
            "--ranks",
            &ranks.to_string(),
            "--steps",
            &steps.to_string(),
        ])
        .args(["--data", "builtin:python-reference", "--model", "tiny"])
        .args(["--tokens-per-step", "4096", "--max-seq-len", "1024"])
        .args(extra)
        .arg("--metrics")
        .arg(&reference_file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reference: Vec<StepMetrics> = std::fs::read_to_string(&reference_file)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(reference.len() as u64, steps);
    reference
}

/// The scratch directory with the operator's training parameters (made
/// small) and the mesh of epoch 1 (two workers of one rank) published; and
/// the straight run's metrics on the same settings.
fn setup(name: &str, steps: u64) -> (PathBuf, MeshPlan, Vec<StepMetrics>) {
    let dir = scratch(name);
    write_training(&dir);

    let first = publish_first_mesh(&dir, "2x1", 1);
    let reference = straight_run(&dir, 2, steps, &[]);
    (dir, first, reference)
}

/// Epoch 2 of `first`: its first worker alone.
fn without_the_second_worker(first: &MeshPlan) -> MeshPlan {
    let mut second = first.clone();
    second.epoch = 2;
    second.workers.truncate(1);
    second.world_size = 1;
    second.node_groups = vec![vec![0]];
    second.rendezvous = Some(format!("127.0.0.1:{}", free_port()));
    second
}

/// Reads rank 0's metrics until step `step` has been reported.
fn until_step(
    metrics: &mpsc::Receiver<StepMetrics>,
    step: u64,
    pod: &mut Child,
) -> Vec<StepMetrics> {
    let mut seen: Vec<StepMetrics> = Vec::new();
    while seen.last().is_none_or(|m| m.step < step) {
        match metrics.recv_timeout(Duration::from_secs(120)) {
            Ok(m) => seen.push(m),
            Err(_) => panic!("no step {step} from the pods: {}", stderr_of(pod)),
        }
    }
    seen
}

/// Waits for `child` to exit (at most 180 s).
fn wait(child: &mut Child) -> std::process::ExitStatus {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(180),
            "the worker did not finish"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn assert_same_losses(seen: &[StepMetrics], reference: &[StepMetrics]) {
    for m in seen {
        let straight = &reference[(m.step - 1) as usize];
        assert_eq!(m.tokens, straight.tokens, "step {}: same batch", m.step);
        assert!(
            (m.loss - straight.loss).abs() < 1e-4,
            "step {} on {} ranks: loss {} vs {} in the straight run",
            m.step,
            m.world,
            m.loss,
            straight.loss
        );
    }
}

#[test]
fn pods_train_and_keep_the_data_order_when_the_mesh_shrinks() {
    let (dir, first, reference) = setup("shrink", STEPS);
    let mut a = pod(&dir, &first.workers[0].name, STEPS);
    let mut b = pod(&dir, &first.workers[1].name, STEPS);
    let metrics = metrics_of(&mut a);
    let _ = metrics_of(&mut b);
    let mut seen = until_step(&metrics, 3, &mut a);
    publish(&dir.join("mesh.json"), &without_the_second_worker(&first));

    let status = wait(&mut a);
    seen.extend(metrics.try_iter());
    let log = stderr_of(&mut a);
    assert!(status.success(), "the worker failed: {log}");
    assert!(log.contains("epoch 2: ranks [0] of 1"), "{log}");

    // The dropped worker waits for the operator to delete its pod.
    std::thread::sleep(Duration::from_millis(500));
    assert!(b.try_wait().unwrap().is_none(), "the dropped worker exited");
    b.kill().unwrap();
    let _ = b.wait();
    assert!(stderr_of(&mut b).contains("not in the mesh of epoch 2; waiting"));

    // Every step once (the ranks stopped together after a step, with its
    // checkpoint: nothing lost or redone), on two ranks and then on one.
    let steps: Vec<u64> = seen.iter().map(|m| m.step).collect();
    assert_eq!(steps, (1..=STEPS).collect::<Vec<_>>(), "{log}");
    assert!(seen.iter().any(|m| m.world == 2) && seen.iter().any(|m| m.world == 1));
    assert_same_losses(&seen, &reference);

    // checkpoint.keep (3 in the operator's parameters): the newest three.
    let mut kept: Vec<String> = std::fs::read_dir(dir.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("step-"))
        .collect();
    kept.sort();
    let newest: Vec<String> = (STEPS - 2..=STEPS)
        .map(|s| format!("step-{s:08}"))
        .collect();
    assert_eq!(kept, newest);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_lost_pod_is_survived_from_the_last_checkpoint() {
    // Long enough that the kill comes well before the end.
    let steps = 40;
    let (dir, first, reference) = setup("lost", steps);
    let (mut a, mut b, metrics) = two_pods(&dir, &first, steps, None);
    let mut seen = until_step(&metrics, 2, &mut a);
    let killed = Command::new("kill")
        .args(["-s", "KILL", "--", &format!("-{}", b.id())])
        .status()
        .unwrap();
    assert!(killed.success());
    let _ = b.wait();
    // The operator sees the pod fail and publishes the next epoch.
    std::thread::sleep(Duration::from_millis(500));
    publish(&dir.join("mesh.json"), &without_the_second_worker(&first));

    let status = wait(&mut a);
    seen.extend(metrics.try_iter());
    let log = stderr_of(&mut a);
    assert!(status.success(), "the survivor failed: {log}");
    assert!(log.contains("epoch 2: ranks [0] of 1"), "{log}");
    assert_eq!(seen.last().map(|m| m.step), Some(steps), "{log}");
    assert!(seen.iter().any(|m| m.world == 1));
    assert_same_losses(&seen, &reference);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The two pods of `first` (the second one started by `second`, when it
/// runs otherwise), and rank 0's metrics, which the first pod prints.
fn two_pods(
    dir: &Path,
    first: &MeshPlan,
    steps: u64,
    second: Option<&dyn Fn(u64) -> Child>,
) -> (Child, Child, mpsc::Receiver<StepMetrics>) {
    let mut a = pod(dir, &first.workers[0].name, steps);
    let mut b = match second {
        Some(start) => start(steps),
        None => pod(dir, &first.workers[1].name, steps),
    };
    let metrics = metrics_of(&mut a);
    let _ = metrics_of(&mut b);
    (a, b, metrics)
}

/// Sends SIGTERM to the worker process of `pod` alone (as a kubelet does to
/// a container's first process when its pod is deleted).
fn terminate(pod: &Child) {
    let sent = Command::new("kill")
        .args(["-s", "TERM", &pod.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
}

/// Waits for `child` to exit within `limit`.
fn wait_within(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            started.elapsed() < limit,
            "the worker did not stop within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The newest checkpoint's step in `dir`.
fn newest_checkpoint(dir: &Path) -> u64 {
    std::fs::read_dir(dir.join("checkpoints"))
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            name.strip_prefix("step-")?.parse().ok()
        })
        .max()
        .unwrap()
}

#[test]
fn pods_asked_to_stop_stop_at_once_after_a_checkpoint_and_resume_from_it() {
    // A suspended job: every pod is deleted, and each worker gets SIGTERM.
    let steps = 40;
    let (dir, first, reference) = setup("terminated", steps);
    let (mut a, mut b, metrics) = two_pods(&dir, &first, steps, None);
    let mut seen = until_step(&metrics, 3, &mut a);
    terminate(&a);
    terminate(&b);
    // Well within a pod's default grace period (30 s), with no kill.
    for pod in [&mut a, &mut b] {
        let status = wait_within(pod, Duration::from_secs(20));
        let log = stderr_of(pod);
        assert_eq!(status.code(), Some(143), "{log}");
        assert!(log.contains("stopped, as asked (SIGTERM)"), "{log}");
    }
    seen.extend(metrics.try_iter());
    let stopped_at = seen.last().unwrap().step;
    assert!(stopped_at < steps, "the run ended before the stop");
    assert_eq!(
        newest_checkpoint(&dir),
        stopped_at,
        "no checkpoint of the last step"
    );

    // Resumed: from that checkpoint, every step once, the same losses.
    let (mut a, mut b, metrics) = two_pods(&dir, &first, steps, None);
    for pod in [&mut a, &mut b] {
        let status = wait(pod);
        assert!(status.success(), "{}", stderr_of(pod));
    }
    seen.extend(metrics.try_iter());
    let order: Vec<u64> = seen.iter().map(|m| m.step).collect();
    assert_eq!(order, (1..=steps).collect::<Vec<_>>());
    assert_same_losses(&seen, &reference);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn pods_asked_to_stop_while_their_ranks_start_stop_at_once() {
    // Deleted before the first step (the ranks meeting, loading): nothing
    // to save, and nothing to wait for.
    let steps = 40;
    let (dir, first, _) = setup("starting", steps);
    let (mut a, mut b, _metrics) = two_pods(&dir, &first, steps, None);
    // (Long enough for the workers to watch for it: a process killed by a
    // signal it does not handle has no exit code to check.)
    std::thread::sleep(Duration::from_millis(1500));
    terminate(&a);
    terminate(&b);
    for pod in [&mut a, &mut b] {
        let status = wait_within(pod, Duration::from_secs(20));
        assert_eq!(status.code(), Some(143), "{}", stderr_of(pod));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_pod_deleted_by_hand_stops_its_peers_with_a_checkpoint_until_the_next_epoch() {
    // One pod deleted (kubectl delete pod): its worker gets SIGTERM; every
    // rank stops after the same step with a checkpoint, the other pod waits
    // for the mesh without it, and goes on from there.
    let steps = 40;
    let (dir, first, reference) = setup("deleted", steps);
    let (mut a, mut b, metrics) = two_pods(&dir, &first, steps, None);
    let mut seen = until_step(&metrics, 3, &mut a);
    terminate(&b);
    let status = wait_within(&mut b, Duration::from_secs(20));
    assert_eq!(status.code(), Some(143), "{}", stderr_of(&mut b));
    std::thread::sleep(Duration::from_millis(500));
    assert!(a.try_wait().unwrap().is_none(), "the other worker exited");
    publish(&dir.join("mesh.json"), &without_the_second_worker(&first));

    let status = wait(&mut a);
    seen.extend(metrics.try_iter());
    let log = stderr_of(&mut a);
    assert!(status.success(), "the worker failed: {log}");
    assert!(
        log.contains("epoch 1 ended: a peer was asked to stop"),
        "{log}"
    );
    assert!(log.contains("epoch 2: ranks [0] of 1"), "{log}");
    let order: Vec<u64> = seen.iter().map(|m| m.step).collect();
    assert_eq!(order, (1..=steps).collect::<Vec<_>>(), "{log}");
    assert_same_losses(&seen, &reference);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_pod_that_cannot_reach_the_rendezvous_fails_saying_why() {
    // The pod of rank 0, which serves the rendezvous, never comes (its node
    // unreachable, its address wrong): the other pod's rank gives up after
    // the collective timeout, and its own error, not only its exit status,
    // is the worker's error and its termination message (which the job's
    // status shows): no hang.
    let dir = scratch("unreachable");
    write_training(&dir);
    let first = publish_first_mesh(&dir, "2x1", 1);
    let address = first.rendezvous.clone().unwrap();
    let termination = dir.join("termination-log");
    std::fs::write(&termination, "").unwrap();
    let mut pod = pod_command(
        &dir,
        &dir.join("training.json"),
        &first.workers[1].name,
        10,
        &["--epoch-wait-s", "1", "--collective-timeout-s", "3"],
    )
    .env("WEFT_TERMINATION_LOG", &termination)
    .spawn()
    .unwrap();
    let status = wait_within(&mut pod, Duration::from_secs(60));
    let log = stderr_of(&mut pod);
    assert_eq!(status.code(), Some(2), "{log}");
    let message = std::fs::read_to_string(&termination).unwrap();
    assert!(!message.contains('\n'), "one line: {message}");
    assert!(
        message.contains("rank 1 failed in epoch 1: rendezvous store at")
            && message.contains(&address)
            && message.contains("no new epoch came within 1 s"),
        "{message}"
    );
    assert!(log.contains(&message), "the log says it too: {log}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A rank that panics (here: its standard output closed under it) fails
/// with the panic's message as its worker's error and termination message,
/// as an error would.
#[test]
fn a_rank_that_panics_fails_its_pod_with_the_panics_message() {
    let dir = scratch("panicked");
    write_training(&dir);
    let first = publish_first_mesh(&dir, "2x1", 1);
    publish(&dir.join("mesh.json"), &without_the_second_worker(&first));
    let termination = dir.join("termination-log");
    std::fs::write(&termination, "").unwrap();
    let mut pod = pod_command(
        &dir,
        &dir.join("training.json"),
        &first.workers[0].name,
        10,
        &["--epoch-wait-s", "1"],
    )
    .env("WEFT_TERMINATION_LOG", &termination)
    .spawn()
    .unwrap();
    drop(pod.stdout.take());
    let status = wait_within(&mut pod, Duration::from_secs(60));
    let log = stderr_of(&mut pod);
    assert_eq!(status.code(), Some(2), "{log}");
    let message = std::fs::read_to_string(&termination).unwrap();
    assert!(
        message.starts_with("rank 0 failed in epoch 2: panicked at ")
            && message.contains("failed printing to stdout"),
        "{message}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// With the job's collector named (`OTEL_EXPORTER_OTLP_ENDPOINT` in its
/// env), every rank exports its steps as spans, children of the reconcile
/// that published its mesh (the mesh's `trace_parent`): how it met the
/// others and resumed, then each step with its phases, and the ring
/// attention and remaps inside its forward and backward, each within its
/// parent's time.
#[test]
fn each_ranks_steps_are_traced_under_the_reconcile_that_published_its_epoch() {
    use weft_telemetry::collector::{CollectedSpan, Collector};
    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const RECONCILE: &str = "00f067aa0ba902b7";
    let dir = scratch("traced");
    let steps = 3;
    write_training(&dir);
    let mut mesh = publish_first_mesh(&dir, "2x1", 1);
    mesh.trace_parent = Some(format!("00-{TRACE}-{RECONCILE}-01"));
    publish(&dir.join("mesh.json"), &mesh);
    let collector = Collector::start().unwrap();
    // 600 tokens a rank at most: the longer documents are split over both
    // ranks, in rings.
    let flags = ["--rank-tokens", "600"];
    let start = |worker: &str| {
        pod_command(&dir, &dir.join("training.json"), worker, steps, &flags)
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", collector.endpoint())
            .env("OTEL_BSP_SCHEDULE_DELAY", "200")
            .spawn()
            .unwrap()
    };
    let mut a = start(&mesh.workers[0].name);
    let mut b = start(&mesh.workers[1].name);
    let _metrics = metrics_of(&mut a);
    let _ = metrics_of(&mut b);
    for pod in [&mut a, &mut b] {
        let status = wait(pod);
        assert!(status.success(), "{}", stderr_of(pod));
    }
    // Each rank flushes its spans before it ends.
    let spans = collector.spans();
    let children = |parent: &CollectedSpan| -> Vec<&CollectedSpan> {
        spans
            .iter()
            .filter(|s| s.parent_span_id == parent.span_id && s.trace_id == parent.trace_id)
            .collect()
    };
    let within = |child: &CollectedSpan, parent: &CollectedSpan| {
        child.start_unix_nano >= parent.start_unix_nano
            && child.end_unix_nano <= parent.end_unix_nano
    };
    for (rank, worker) in mesh.workers.iter().enumerate() {
        let mine: Vec<&CollectedSpan> = spans
            .iter()
            .filter(|s| s.resource.get("weft.rank").and_then(|v| v.as_i64()) == Some(rank as i64))
            .collect();
        assert!(!mine.is_empty(), "rank {rank} exported nothing: {spans:?}");
        for span in &mine {
            assert_eq!(span.trace_id, TRACE, "{span:?}");
            assert_eq!(
                span.resource.get("weft.worker").and_then(|v| v.as_str()),
                Some(worker.name.as_str())
            );
            assert_eq!(
                span.resource.get("service.name").and_then(|v| v.as_str()),
                Some("weft-trainer")
            );
        }
        let top: Vec<&str> = mine
            .iter()
            .filter(|s| s.parent_span_id == RECONCILE)
            .map(|s| s.name.as_str())
            .collect();
        assert_eq!(
            top.iter().filter(|n| **n == "rendezvous").count(),
            1,
            "{top:?}"
        );
        assert_eq!(top.iter().filter(|n| **n == "resume").count(), 1, "{top:?}");
        let mut step_spans: Vec<&CollectedSpan> = mine
            .iter()
            .copied()
            .filter(|s| s.name == "step" && s.parent_span_id == RECONCILE)
            .collect();
        step_spans.sort_by_key(|s| s.int("weft.step"));
        let numbers: Vec<Option<i64>> = step_spans.iter().map(|s| s.int("weft.step")).collect();
        assert_eq!(numbers, [Some(1), Some(2), Some(3)], "rank {rank}");
        let mut attention = 0;
        for step in &step_spans {
            let phases = children(step);
            let names: Vec<&str> = phases.iter().map(|p| p.name.as_str()).collect();
            for phase in [
                "plan",
                "forward_backward",
                "all_reduce",
                "optimizer",
                "checkpoint",
            ] {
                assert!(names.contains(&phase), "rank {rank}: {names:?}");
            }
            for phase in &phases {
                assert!(
                    within(phase, step),
                    "rank {rank}: {phase:?} outside {step:?}"
                );
            }
            let forward = phases
                .iter()
                .find(|p| p.name == "forward_backward")
                .unwrap();
            for work in children(forward) {
                assert!(
                    ["ring_attention", "ring_attention_backward", "remap"]
                        .contains(&work.name.as_str()),
                    "{work:?}"
                );
                assert!(within(work, forward), "{work:?} outside {forward:?}");
                attention += usize::from(work.name == "ring_attention");
            }
        }
        assert!(attention > 0, "rank {rank} traced no ring attention");
    }
    // A collector no rank could send to is refused before any rank starts,
    // naming the variable, as the job's other settings are.
    let out = pod_command(
        &dir,
        &dir.join("training.json"),
        &mesh.workers[0].name,
        steps,
        &flags,
    )
    .env("OTEL_EXPORTER_OTLP_ENDPOINT", "otel-collector:4318")
    .output()
    .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(weft_crds::SETTINGS_REFUSED_EXIT),
        "{err}"
    );
    assert!(
        err.contains("OTEL_EXPORTER_OTLP_ENDPOINT") && err.contains("otel-collector:4318"),
        "{err}"
    );
    assert!(!err.contains("ranks ["), "a rank started: {err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_rank_that_cannot_read_rank_zeros_checkpoint_is_sent_it_by_rank_zero() {
    // checkpoint.path without a claim: an emptyDir of each pod, so only rank
    // 0's pod holds the checkpoints. After a stop, the other pod's rank
    // resumes from rank 0's checkpoint, sent over the network.
    let steps = 40;
    let (dir, first, reference) = setup("own-directories", steps);
    let mut training: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("training.json")).unwrap()).unwrap();
    let own = dir.join("second-pod-checkpoints");
    training["checkpoint"]["path"] = own.to_string_lossy().into_owned().into();
    let second_training = dir.join("second-training.json");
    std::fs::write(&second_training, training.to_string()).unwrap();
    let second =
        |steps: u64| pod_reading(&dir, &second_training, &first.workers[1].name, steps, &[]);

    let (mut a, mut b, metrics) = two_pods(&dir, &first, steps, Some(&second));
    let mut seen = until_step(&metrics, 3, &mut a);
    terminate(&a);
    terminate(&b);
    for pod in [&mut a, &mut b] {
        let status = wait_within(pod, Duration::from_secs(20));
        assert_eq!(status.code(), Some(143), "{}", stderr_of(pod));
    }
    seen.extend(metrics.try_iter());
    assert_eq!(newest_checkpoint(&dir), seen.last().unwrap().step);
    let theirs = std::fs::read_dir(&own).map_or(0, |d| {
        d.filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.file_name().to_string_lossy().starts_with("step-"))
        })
        .count()
    });
    assert_eq!(theirs, 0, "the second pod wrote checkpoints of its own");

    let (mut a, mut b, metrics) = two_pods(&dir, &first, steps, Some(&second));
    let status = wait(&mut a);
    assert!(status.success(), "{}", stderr_of(&mut a));
    let status = wait(&mut b);
    let log = stderr_of(&mut b);
    assert!(status.success(), "{log}");
    assert!(log.contains("rank 0 sends it"), "{log}");
    seen.extend(metrics.try_iter());
    let order: Vec<u64> = seen.iter().map(|m| m.step).collect();
    assert_eq!(order, (1..=steps).collect::<Vec<_>>());
    assert_same_losses(&seen, &reference);
    let _ = std::fs::remove_dir_all(&dir);
}

fn strs(flags: &[String]) -> Vec<&str> {
    flags.iter().map(String::as_str).collect()
}

/// The pods also draw the plans their steps ran (`--plan-svg`, every
/// second step): the first worker, which runs rank 0, draws them, with the
/// mesh's nodes and the hierarchical rings; the other draws none.
#[test]
fn pods_plan_on_their_meshs_nodes_and_run_rings_across_them_hierarchically() {
    // Two workers of two ranks, each on a node of its own; 300 tokens a rank
    // at most, so the longer documents are split over both nodes.
    let dir = scratch("hierarchical");
    write_training(&dir);
    let mesh = publish_first_mesh(&dir, "2x2", 2);
    let steps = 3;
    let limit = ["--rank-tokens", "300"];
    let pictures = |pod: &str| dir.join(format!("plans-{pod}"));
    let drawing = |pod: &str| {
        let mut flags: Vec<String> = limit.iter().map(|f| f.to_string()).collect();
        flags.extend([
            "--plan-svg".to_string(),
            pictures(pod).display().to_string(),
            "--plan-svg-every".to_string(),
            "2".to_string(),
        ]);
        flags
    };
    let (flags_a, flags_b) = (drawing("a"), drawing("b"));
    let mut a = pod_with(&dir, &mesh.workers[0].name, steps, &strs(&flags_a));
    let mut b = pod_with(&dir, &mesh.workers[1].name, steps, &strs(&flags_b));
    let metrics = metrics_of(&mut a);
    let _ = metrics_of(&mut b);
    let (status_a, status_b) = (wait(&mut a), wait(&mut b));
    let seen: Vec<StepMetrics> = metrics.try_iter().collect();
    assert!(status_a.success(), "{}", stderr_of(&mut a));
    assert!(status_b.success(), "{}", stderr_of(&mut b));
    assert_eq!(seen.len() as u64, steps);
    assert!(seen.iter().all(|m| m.world == 4));
    assert!(
        seen.iter().any(|m| m.hierarchical_rings > 0),
        "no ring ran hierarchically: {seen:?}"
    );
    let drawn = |pod: &str| -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(pictures(pod))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    assert_eq!(drawn("a"), ["step-00000002.svg"]);
    assert!(drawn("b").is_empty(), "{:?}", drawn("b"));
    let picture = std::fs::read_to_string(pictures("a").join("step-00000002.svg")).unwrap();
    for node in mesh.workers.iter().map(|w| &w.node) {
        assert!(picture.contains(node.as_str()), "{node} is not drawn");
    }
    // What step 2 ran is what its picture shows.
    let second = seen.iter().find(|m| m.step == 2).unwrap();
    assert_eq!(
        picture.contains("hierarchical ring, 2 a node"),
        second.hierarchical_rings > 0,
        "{picture}"
    );
    assert_eq!(picture.contains("a ring of"), second.rings > 0);
    // The same losses as one node of four ranks planned flat.
    assert_same_losses(&seen, &straight_run(&dir, 4, steps, &limit));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs the two pods of `mesh` in `dir` for `steps` steps (`extra` flags);
/// rank 0's metrics.
fn run_pods(dir: &Path, mesh: &MeshPlan, steps: u64, extra: &[&str]) -> Vec<StepMetrics> {
    let mut a = pod_with(dir, &mesh.workers[0].name, steps, extra);
    let mut b = pod_with(dir, &mesh.workers[1].name, steps, extra);
    let metrics = metrics_of(&mut a);
    let _ = metrics_of(&mut b);
    let (status_a, status_b) = (wait(&mut a), wait(&mut b));
    assert!(status_a.success(), "{}", stderr_of(&mut a));
    assert!(status_b.success(), "{}", stderr_of(&mut b));
    let seen: Vec<StepMetrics> = metrics.try_iter().collect();
    assert_eq!(seen.len() as u64, steps);
    seen
}

/// The job's `parallelism.nicAwareRouting` and `streamBpChunkTokens` reach
/// the pods' ranks: their plans keep each transfer on its own NIC, and with
/// a `maxCpDegree` that plain backprop's memory cannot keep for the longest
/// documents, their rings stream their backward (the rings that need it),
/// and they train the same losses; without StreamBP that `maxCpDegree` is
/// refused by its name before any rank starts.
#[test]
fn the_jobs_parallelism_fields_reach_the_pods_ranks() {
    let dir = scratch("parallelism");
    let steps = 3;
    // Two nodes of two GPUs and two NICs; 300 tokens a rank at most, so
    // the longer documents are split across the nodes.
    let limit = ["--rank-tokens", "300"];
    write_training(&dir);
    let mesh = publish_first_mesh(&dir, "2x2:nics=2", 2);
    let free = run_pods(&dir, &mesh, steps, &limit);
    assert!(
        free.iter().any(|m| m.spread_routes > 0),
        "no transfer was spread over the NICs: {free:?}"
    );
    assert!(free.iter().any(|m| m.max_cp_degree > 2), "{free:?}");
    assert!(free.iter().all(|m| m.stream_bp_chunk.is_none()));

    let _ = std::fs::remove_dir_all(dir.join("checkpoints"));
    write_training_with(
        &dir,
        serde_json::json!({"nicAwareRouting": false, "streamBpChunkTokens": 64, "maxCpDegree": 2}),
    );
    let mesh = publish_first_mesh(&dir, "2x2:nics=2", 2);
    let limited = run_pods(&dir, &mesh, steps, &limit);
    assert!(limited.iter().all(|m| m.spread_routes == 0), "{limited:?}");
    assert!(limited.iter().all(|m| m.max_cp_degree <= 2), "{limited:?}");
    assert!(
        limited.iter().all(|m| m
            .stream_bp_chunk
            .is_some_and(|c| c >= 64 && (c / 64).is_power_of_two())
            && m.streamed_rings > 0),
        "{limited:?}"
    );
    assert_same_losses(&limited, &free);

    // A cap below what the longest sequence needs: refused before any rank
    // starts, by the field's name.
    write_training_with(&dir, serde_json::json!({"maxCpDegree": 2}));
    let started = Instant::now();
    let out = pod_with(&dir, &mesh.workers[0].name, steps, &limit)
        .wait_with_output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("parallelism.maxCpDegree"), "{err}");
    assert!(!err.contains("ranks ["), "a rank started: {err}");
    assert!(started.elapsed() < Duration::from_secs(60));

    // A worker flag that contradicts the job is refused by both names.
    write_training_with(&dir, serde_json::json!({"streamBpChunkTokens": 64}));
    let out = trainer()
        .args(["worker", "--stream-bp-chunk", "32"])
        .env("WEFT_WORKER", &mesh.workers[0].name)
        .env("WEFT_MESH", dir.join("mesh.json"))
        .env("WEFT_TRAINING", dir.join("training.json"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("--stream-bp-chunk 32") && err.contains("parallelism.streamBpChunkTokens 64"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
