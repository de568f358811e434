//! The reconcile's decisions as tables (every case a row, no cluster), and
//! the order in which a decision is carried out against an API server that
//! answers as the test says.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::ResourceExt;
use weft_crds::{Phase, TrainingJob, TrainingJobStatus, WorkerFailure};

use super::decide::*;
use crate::controller::{MAX_EPOCH, Published, terminal};
use crate::status::JobClaim;
use crate::testing::{at, exited, gpu_node, job, unschedulable, worker};

const NOW: i64 = 1_000_000;

/// What `job` with `pods` sees on nodes `n0`..`n{nodes-1}`, every pod of
/// the cluster its own.
fn seen(job: TrainingJob, pods: Vec<Pod>, nodes: usize) -> Seen {
    Seen {
        cluster_pods: pods.iter().cloned().map(Arc::new).collect(),
        job,
        pods,
        missing_claim: None,
        nodes: (0..nodes).map(|i| gpu_node(&format!("n{i}"))).collect(),
        published: Published::Absent,
        published_change: None,
        published_fault: None,
        refused_ago: None,
        trace_parent: None,
    }
}

fn status(phase: Phase, epoch: i64) -> TrainingJobStatus {
    TrainingJobStatus {
        phase,
        mesh_epoch: epoch,
        ..Default::default()
    }
}

fn with_status(mut job: TrainingJob, status: TrainingJobStatus) -> TrainingJob {
    job.status = Some(status);
    job
}

/// `job` with one failure of `worker` counted, at `time`.
fn with_failure(job: &TrainingJob, worker: &str, reason: &str, time: i64) -> TrainingJob {
    let mut status = job.status.clone().unwrap_or_default();
    status.restarts = 1;
    status.recent_failures = vec![WorkerFailure {
        worker: worker.into(),
        uid: format!("uid-{worker}"),
        reason: reason.into(),
        time: at(time),
    }];
    with_status(job.clone(), status)
}

fn reasons(decision: &Decision) -> Vec<&str> {
    decision.events.iter().map(|e| e.reason.as_str()).collect()
}

fn deleted(decision: &Decision) -> Vec<&str> {
    decision.delete.iter().map(|d| d.pod.as_str()).collect()
}

fn done(settled: Settle) -> Decision {
    match settled {
        Settle::Decided(decision) => *decision,
        Settle::Place(placing) => panic!(
            "expected a decision, the job goes on to placement with {:?}",
            placing
                .pods
                .iter()
                .map(|p| p.name_any())
                .collect::<Vec<_>>()
        ),
    }
}

/// A case of the job's life: what was seen, then the phase written, the
/// events, the pods deleted and when to look again.
type LifeRow = (
    &'static str,
    Seen,
    Option<Phase>,
    Vec<&'static str>,
    Vec<&'static str>,
    Option<Duration>,
);

/// A case of epochs: what was seen, then the workers created, the epoch
/// published and the events.
type EpochRow = (&'static str, Seen, usize, Option<u64>, Vec<&'static str>);

/// The job's life: each row is a case, what was seen, and what must be
/// decided (the status's phase, the events in order, the pods deleted, when
/// to look again).
#[test]
fn the_jobs_life_is_decided_from_what_was_seen() {
    let running = with_status(job(2, 2), status(Phase::Running, 1));
    let w = |name: &str, node: &str, phase: &str| worker(&running, name, node, 1, phase);
    let mut counted = status(Phase::Running, 1);
    counted.restarts = 1;
    counted.recent_failures = vec![WorkerFailure {
        worker: "llm-w1".into(),
        uid: "uid-llm-w1".into(),
        reason: "exit 1".into(),
        time: at(NOW - 60),
    }];
    let mut invalid = job(2, 2);
    invalid.spec.model.preset = None;
    invalid.spec.model.hidden = Some(100);
    invalid.spec.model.heads = Some(7);
    let mut no_budget = running.clone();
    no_budget.spec.elasticity.restart_limit = 0;
    let mut suspended = running.clone();
    suspended.spec.suspend = true;
    let mut claim = running.clone();
    claim.spec.checkpoint.claim_name = Some("ckpt".into());
    let timeout = i64::from(running.spec.elasticity.unschedulable_timeout_seconds);

    let rows: Vec<LifeRow> = vec![
        (
            "an ended job stops the workers it still has, and says nothing",
            seen(
                with_status(job(2, 2), status(Phase::Succeeded, 1)),
                vec![w("llm-w0", "n0", "Running"), w("llm-w1", "n1", "Succeeded")],
                2,
            ),
            None,
            vec![],
            vec!["llm-w0"],
            None,
        ),
        (
            "a model the schema let through but no layer can have fails the job",
            seen(invalid, vec![w("llm-w0", "n0", "Running")], 2),
            Some(Phase::Failed),
            vec!["InvalidSpec"],
            vec!["llm-w0"],
            None,
        ),
        (
            "a failed worker is counted, and deleted once that is on record",
            seen(
                running.clone(),
                vec![
                    w("llm-w0", "n0", "Running"),
                    exited(w("llm-w1", "n1", "Running"), 1, "NCCL timeout"),
                ],
                2,
            ),
            Some(Phase::Running),
            vec!["WorkerFailed"],
            vec!["llm-w1"],
            Some(AT_ONCE),
        ),
        (
            "a failure past the restart budget fails the job, counted first",
            seen(
                no_budget,
                vec![
                    w("llm-w0", "n0", "Running"),
                    exited(w("llm-w1", "n1", "Running"), 1, "NCCL timeout"),
                ],
                2,
            ),
            Some(Phase::Failed),
            vec!["WorkerFailed", "RestartLimitExceeded"],
            vec!["llm-w0"],
            None,
        ),
        (
            "a worker that refuses the job's settings fails it at once",
            seen(
                running.clone(),
                vec![
                    w("llm-w0", "n0", "Running"),
                    exited(
                        w("llm-w1", "n1", "Running"),
                        weft_crds::SETTINGS_REFUSED_EXIT,
                        "data.textField: no column \"content\"",
                    ),
                ],
                2,
            ),
            Some(Phase::Failed),
            vec!["WorkerFailed", "InvalidSpec"],
            vec!["llm-w0"],
            None,
        ),
        (
            "a worker that finished completes the job and stops the others",
            seen(
                running.clone(),
                vec![
                    w("llm-w0", "n0", "Running"),
                    exited(w("llm-w1", "n1", "Running"), 0, ""),
                ],
                2,
            ),
            Some(Phase::Succeeded),
            vec!["Succeeded"],
            vec!["llm-w0"],
            None,
        ),
        (
            "suspending stops every worker and says so once",
            seen(suspended.clone(), vec![w("llm-w0", "n0", "Running")], 2),
            Some(Phase::Suspended),
            vec!["Suspended"],
            vec!["llm-w0"],
            Some(SUSPENDED_LOOK),
        ),
        (
            "a job already suspended is not told again",
            seen(
                with_status(suspended, status(Phase::Suspended, 1)),
                vec![],
                2,
            ),
            Some(Phase::Suspended),
            vec![],
            vec![],
            Some(SUSPENDED_LOOK),
        ),
        (
            "a missing checkpoint claim keeps the job Pending, named",
            Seen {
                missing_claim: Some(JobClaim::Checkpoint("ckpt".into())),
                ..seen(claim, vec![], 2)
            },
            Some(Phase::Pending),
            vec!["CheckpointClaimNotFound"],
            vec![],
            Some(CLAIM_LOOK),
        ),
        (
            "a node that refused a worker past the timeout is avoided, on record first",
            seen(
                running.clone(),
                vec![
                    w("llm-w0", "n0", "Running"),
                    unschedulable(w("llm-w1", "n1", "Pending"), at(NOW - timeout - 1)),
                ],
                2,
            ),
            Some(Phase::Running),
            vec!["NodeAvoided"],
            vec![],
            Some(AT_ONCE),
        ),
        (
            "workers refused below min a moment ago are not made again yet",
            Seen {
                refused_ago: Some(Duration::from_secs(5)),
                ..seen(job(2, 2), vec![], 2)
            },
            None,
            vec![],
            vec![],
            Some(crate::controller::REFUSAL_BACKOFF - Duration::from_secs(5) + AT_ONCE),
        ),
    ];
    for (case, seen, phase, events, deletions, requeue) in rows {
        let decision = done(settle(&seen, &at(NOW)));
        assert_eq!(
            decision.status.as_ref().map(|s| s.phase),
            phase,
            "{case}: phase"
        );
        assert_eq!(reasons(&decision), events, "{case}: events");
        assert_eq!(deleted(&decision), deletions, "{case}: deletions");
        assert_eq!(decision.requeue, requeue, "{case}: requeue");
        assert!(decision.mesh.is_none(), "{case}: no mesh is published");
    }
}

#[test]
fn what_settle_puts_on_record_is_exact() {
    let running = with_status(job(2, 2), status(Phase::Running, 1));
    let w = |name: &str, node: &str, phase: &str| worker(&running, name, node, 1, phase);
    let failed = exited(w("llm-w1", "n1", "Running"), 1, "NCCL timeout");
    let pods = vec![w("llm-w0", "n0", "Running"), failed.clone()];

    // Counted once: the next reconcile finds it on record and goes on.
    let decision = done(settle(&seen(running.clone(), pods.clone(), 2), &at(NOW)));
    let recorded = decision.status.unwrap();
    assert_eq!(recorded.restarts, 1);
    assert_eq!(recorded.recent_failures[0].uid, "uid-llm-w1");
    assert!(
        decision.events[0].note.starts_with("llm-w1: ")
            && decision.events[0].note.contains("(restart 1 of "),
        "{}",
        decision.events[0].note
    );
    let again = settle(
        &seen(with_status(running.clone(), recorded), pods, 2),
        &at(NOW),
    );
    assert!(matches!(again, Settle::Place(_)), "counted once only");

    // Avoided: the node is on record, then unschedulable for the mesh.
    let timeout = i64::from(running.spec.elasticity.unschedulable_timeout_seconds);
    let refused = unschedulable(w("llm-w1", "n1", "Pending"), at(NOW - timeout - 1));
    let pods = vec![w("llm-w0", "n0", "Running"), refused];
    let decision = done(settle(&seen(running.clone(), pods.clone(), 2), &at(NOW)));
    let recorded = decision.status.unwrap();
    assert_eq!(recorded.avoided_nodes.len(), 1);
    assert_eq!(recorded.avoided_nodes[0].node, "n1");
    let Settle::Place(placing) = settle(&seen(with_status(running, recorded), pods, 2), &at(NOW))
    else {
        panic!("an avoided node on record: the job is placed");
    };
    let n1 = placing.nodes.iter().find(|n| n.node.name == "n1").unwrap();
    assert!(!n1.schedulable, "the mesh does not use an avoided node");

    // A missing claim is said once: the same message again tells nothing.
    let mut claim = job(2, 2);
    claim.spec.checkpoint.claim_name = Some("ckpt".into());
    let missing = Seen {
        missing_claim: Some(JobClaim::Checkpoint("ckpt".into())),
        ..seen(claim.clone(), vec![], 2)
    };
    let first = done(settle(&missing, &at(NOW)));
    let message = &first.status.as_ref().unwrap().conditions[0].message;
    assert!(message.starts_with("checkpoint.claimName: "), "{message}");
    let second = done(settle(
        &Seen {
            job: with_status(claim, first.status.clone().unwrap()),
            ..missing
        },
        &at(NOW + 15),
    ));
    assert!(second.events.is_empty(), "{:?}", second.events);
}

/// Places `seen`'s job and concludes with every missing worker made
/// (Pending, as the API server returns a new pod), except those `refused`.
fn place_and_conclude(seen: &Seen, refused: &[&str]) -> (Placement, Decision) {
    let Settle::Place(placing) = settle(seen, &at(NOW)) else {
        panic!("the job is placed");
    };
    let placement = place(seen, &placing, &seen.cluster_pods, &at(NOW)).unwrap();
    let mut created = Created::default();
    for pod in &placement.create {
        if refused.contains(&pod.name_any().as_str()) {
            created
                .refused
                .push((pod.name_any(), "exceeded quota: gpus".into()));
        } else {
            let mut made = pod.clone();
            made.status = Some(Default::default());
            created.made.push(made);
        }
    }
    let decision = conclude(seen, &placing, placement.clone(), &created, &at(NOW)).unwrap();
    (placement, decision)
}

/// The first mesh of a job of 2 workers on 3 free nodes, placed and
/// concluded, and its workers (name, node).
fn first_mesh() -> ((Placement, Decision), Vec<(String, String)>) {
    let first = place_and_conclude(&seen(job(2, 2), vec![], 3), &[]);
    let members = first
        .0
        .planned
        .as_ref()
        .unwrap()
        .workers
        .iter()
        .map(|w| (w.name.clone(), w.node.clone()))
        .collect();
    (first, members)
}

fn published_epoch(decision: &Decision) -> Option<u64> {
    let mesh = decision.mesh.as_ref()?;
    let text = mesh.data.as_ref()?.get("mesh.json")?;
    let mesh: weft_planner::mesh::MeshPlan = serde_json::from_str(text).ok()?;
    Some(mesh.epoch)
}

/// Epochs: each row a case, what was seen, the workers created, the epoch
/// published (and recorded), and the events.
#[test]
fn the_epoch_moves_exactly_when_the_membership_does() {
    // A job running at epoch 1 with workers w0 on n0 and w1 on n1, its
    // mesh published as weft wrote it.
    let (first, members) = first_mesh();
    let mesh_1 = first.1.mesh.clone().unwrap();
    let running = with_status(
        job(2, 2),
        TrainingJobStatus {
            phase: Phase::Running,
            ..first.1.status.clone().unwrap()
        },
    );
    let pods: Vec<Pod> = members
        .iter()
        .map(|(name, node)| worker(&running, name, node, 1, "Running"))
        .collect();
    let trusted = crate::controller::read_published(Some(&mesh_1), "llm", 1);
    assert!(matches!(trusted, Published::Trusted(_)), "{trusted:?}");
    let counted = with_failure(&running, &members[1].0, "exit 1", NOW - 1);
    let mut lost = pods.clone();
    lost[1] = exited(lost[1].clone(), 1, "NCCL timeout");

    let rows: Vec<EpochRow> = vec![
        (
            "the first mesh is epoch 1, made of new workers",
            seen(job(2, 2), vec![], 3),
            2,
            Some(1),
            vec!["MeshEpoch", "Starting"],
        ),
        (
            "the same members keep their epoch and nothing is told",
            Seen {
                published: trusted.clone(),
                ..seen(running.clone(), pods.clone(), 3)
            },
            0,
            Some(1),
            vec![],
        ),
        (
            "a lost worker (counted) is replaced and the epoch moves on",
            Seen {
                published: trusted.clone(),
                ..seen(counted, lost, 3)
            },
            1,
            Some(2),
            vec!["MeshEpoch", "Rescaling"],
        ),
        (
            "a mesh weft did not write is published again above the epoch it claims",
            Seen {
                published: Published::Untrusted {
                    epoch: Some(5),
                    why: "its data differ from what weft wrote".into(),
                },
                ..seen(running.clone(), pods.clone(), 3)
            },
            0,
            Some(6),
            vec!["MeshRepublished", "MeshEpoch"],
        ),
        (
            "below min, the workers are stopped and the job waits",
            seen(running.clone(), pods[..1].to_vec(), 1),
            0,
            None,
            vec!["BelowMinimum", "Pending"],
        ),
    ];
    let (_, below) = place_and_conclude(&seen(running.clone(), pods[..1].to_vec(), 1), &[]);
    assert_eq!(deleted(&below), vec![members[0].0.as_str()]);
    assert_eq!(
        below.events[0].note.split(':').next(),
        Some("1 workers stopped")
    );
    for (case, seen, creates, epoch, events) in rows {
        let (placement, decision) = place_and_conclude(&seen, &[]);
        assert_eq!(placement.create.len(), creates, "{case}: workers created");
        assert_eq!(published_epoch(&decision), epoch, "{case}: epoch published");
        if let Some(epoch) = epoch {
            assert_eq!(
                decision.status.as_ref().unwrap().mesh_epoch,
                epoch as i64,
                "{case}: epoch recorded"
            );
        }
        assert_eq!(reasons(&decision), events, "{case}: events");
    }
}

fn published_mesh(decision: &Decision) -> weft_planner::mesh::MeshPlan {
    let text = &decision.mesh.as_ref().unwrap().data.as_ref().unwrap()["mesh.json"];
    serde_json::from_str(text).unwrap()
}

/// The reconcile that publishes an epoch is its workers' parent span; the
/// mesh keeps that one while its epoch stays (it is not rewritten for a
/// trace), and a new epoch carries the reconcile that made it.
#[test]
fn a_mesh_carries_the_trace_context_of_the_reconcile_that_published_its_epoch() {
    const FIRST: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    const LATER: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let first_seen = Seen {
        trace_parent: Some(FIRST.into()),
        ..seen(job(2, 2), vec![], 3)
    };
    let (placement, first) = place_and_conclude(&first_seen, &[]);
    assert_eq!(published_mesh(&first).trace_parent.as_deref(), Some(FIRST));
    let running = with_status(
        job(2, 2),
        TrainingJobStatus {
            phase: Phase::Running,
            ..first.status.clone().unwrap()
        },
    );
    let pods: Vec<Pod> = placement
        .planned
        .as_ref()
        .unwrap()
        .workers
        .iter()
        .map(|w| worker(&running, &w.name, &w.node, 1, "Running"))
        .collect();
    let published = crate::controller::read_published(Some(first.mesh.as_ref().unwrap()), "llm", 1);
    let same = Seen {
        published: published.clone(),
        trace_parent: Some(LATER.into()),
        ..seen(running.clone(), pods.clone(), 3)
    };
    let (_, again) = place_and_conclude(&same, &[]);
    assert_eq!(published_epoch(&again), Some(1));
    assert_eq!(
        again.mesh.as_ref().unwrap().data,
        first.mesh.as_ref().unwrap().data,
        "the same epoch's mesh is not rewritten"
    );
    let mut lost = pods.clone();
    lost[1] = exited(lost[1].clone(), 1, "gone");
    let counted = with_failure(&running, &lost[1].name_any(), "exit 1", NOW - 1);
    let changed = Seen {
        published,
        trace_parent: Some(LATER.into()),
        ..seen(counted, lost, 3)
    };
    let (_, next) = place_and_conclude(&changed, &[]);
    assert_eq!(published_epoch(&next), Some(2));
    assert_eq!(published_mesh(&next).trace_parent.as_deref(), Some(LATER));
}

/// The status write names what the operator's status no longer has, so the
/// merge patch clears it (a fault of an earlier change, nested in a
/// recovery too), and leaves the workers' fields alone.
#[test]
fn the_status_write_clears_what_the_status_no_longer_has() {
    use super::apply::operators_part;
    let mut status = TrainingJobStatus {
        last_recovery: Some(weft_crds::Recovery {
            mesh_epoch: 3,
            seconds: 4,
            from_fault_seconds: None,
        }),
        step: 40,
        ..Default::default()
    };
    let part = operators_part(Some(&status)).unwrap();
    assert_eq!(part.get("lastFaultTime"), Some(&serde_json::Value::Null));
    assert_eq!(
        part["lastRecovery"].get("fromFaultSeconds"),
        Some(&serde_json::Value::Null)
    );
    assert_eq!(part.get("step"), None, "a worker's field");
    status.last_fault_time = Some(at(NOW));
    status.last_recovery.as_mut().unwrap().from_fault_seconds = Some(9);
    let part = operators_part(Some(&status)).unwrap();
    assert_eq!(part["lastRecovery"]["fromFaultSeconds"], 9);
    assert!(part["lastFaultTime"].is_string(), "{part}");
    // No recovery yet: nothing to merge into, nothing written.
    status.last_recovery = None;
    let part = operators_part(Some(&status)).unwrap();
    assert_eq!(part.get("lastRecovery"), None);
}

/// `node`, NotReady since `since`.
fn not_ready(
    node: &Arc<k8s_openapi::api::core::v1::Node>,
    since: i64,
) -> Arc<k8s_openapi::api::core::v1::Node> {
    let mut node = (**node).clone();
    let ready = &mut node.status.as_mut().unwrap().conditions.as_mut().unwrap()[0];
    ready.status = "Unknown".into();
    ready.last_transition_time = Some(at(since));
    Arc::new(node)
}

/// When the fault behind a membership change began is recorded with the
/// change (the recovery is measured from it), and only a change a fault
/// caused records one.
#[test]
fn a_change_records_when_the_fault_behind_it_began() {
    let (first, members) = first_mesh();
    let mesh_1 = first.1.mesh.clone().unwrap();
    let running = with_status(
        job(2, 2),
        TrainingJobStatus {
            phase: Phase::Running,
            last_rescale_time: Some(at(NOW - 600)),
            // The fault of an earlier change, recovered from (epoch 1
            // trained), is not this one's.
            last_fault_time: Some(at(NOW - 700)),
            epoch_first_step: Some(weft_crds::EpochFirstStep {
                mesh_epoch: 1,
                step: 1,
                time: at(NOW - 590),
            }),
            ..first.1.status.clone().unwrap()
        },
    );
    // Suspended (before epoch 1 trained) and resumed.
    let resumed = {
        let mut status = running.status.clone().unwrap();
        status.phase = Phase::Suspended;
        status.epoch_first_step = None;
        with_status(running.clone(), status)
    };
    // Epoch 1 never trained: its fault is still being recovered from.
    let untrained = {
        let mut status = running.status.clone().unwrap();
        status.epoch_first_step = None;
        with_status(running.clone(), status)
    };
    let pods: Vec<Pod> = members
        .iter()
        .map(|(name, node)| worker(&running, name, node, 1, "Running"))
        .collect();
    let trusted = crate::controller::read_published(Some(&mesh_1), "llm", 1);
    let counted = with_failure(&running, &members[1].0, "exit 137", NOW - 3);
    let seen_as =
        |job: &TrainingJob, pods: Vec<Pod>, nodes: Vec<Arc<k8s_openapi::api::core::v1::Node>>| {
            let mut seen = Seen {
                published: trusted.clone(),
                ..seen(job.clone(), pods, 3)
            };
            seen.nodes = nodes;
            seen
        };
    let on_nodes = |pods, nodes| seen_as(&running, pods, nodes);
    let nodes = seen(running.clone(), vec![], 3).nodes;
    let node_index = |name: &str| nodes.iter().position(|n| n.name_any() == name).unwrap();
    let lost_node = {
        let mut nodes = nodes.clone();
        let i = node_index(&members[1].1);
        nodes[i] = not_ready(&nodes[i], NOW - 42);
        nodes
    };
    let failed = {
        let mut pods = pods.clone();
        pods[1] = exited(pods[1].clone(), 137, "");
        let status = pods[1]
            .status
            .as_mut()
            .unwrap()
            .container_statuses
            .as_mut()
            .unwrap();
        status[0]
            .state
            .as_mut()
            .unwrap()
            .terminated
            .as_mut()
            .unwrap()
            .finished_at = Some(at(NOW - 9));
        pods
    };
    // Deleted 5 s ago with 30 s of grace: the time set is when it ends.
    let deleting = {
        let mut pods = pods.clone();
        pods[1].metadata.deletion_timestamp = Some(at(NOW + 25));
        pods[1].metadata.deletion_grace_period_seconds = Some(30);
        pods
    };
    let rows: Vec<(&str, Seen, Option<i64>)> = vec![
        (
            "its node NotReady: the node's turn",
            on_nodes(pods.clone(), lost_node.clone()),
            Some(NOW - 42),
        ),
        (
            "its container failed (counted): when it ended",
            seen_as(&counted, failed, nodes.clone()),
            Some(NOW - 9),
        ),
        (
            "its failed pod gone: when its failure was counted",
            seen_as(&counted, pods[..1].to_vec(), nodes.clone()),
            Some(NOW - 3),
        ),
        (
            "its pod deleted: the deletion",
            on_nodes(deleting.clone(), nodes.clone()),
            Some(NOW - 5),
        ),
        (
            "its pod gone without a trace: no time to tell",
            on_nodes(pods[..1].to_vec(), nodes.clone()),
            None,
        ),
        (
            "after an epoch that never trained: the fault before it",
            seen_as(&untrained, pods.clone(), lost_node.clone()),
            Some(NOW - 700),
        ),
        (
            "a resume: its workers were asked to leave",
            seen_as(&resumed, deleting.clone(), nodes.clone()),
            None,
        ),
    ];
    for (case, seen, fault) in rows {
        let (_, decision) = place_and_conclude(&seen, &[]);
        assert_eq!(
            published_epoch(&decision),
            Some(2),
            "{case}: the epoch moved"
        );
        let status = decision.status.unwrap();
        assert_eq!(status.last_rescale_time, Some(at(NOW)), "{case}");
        assert_eq!(status.last_fault_time, fault.map(at), "{case}");
    }
}

#[test]
fn workers_the_api_server_refuses_leave_a_smaller_mesh_or_none() {
    // Room for 3; one of the three refused: the job runs with 2, at the
    // epoch of the mesh it runs.
    let (placement, decision) = place_and_conclude(&seen(job(2, 3), vec![], 3), &["llm-worker-2"]);
    assert_eq!(placement.create.len(), 3);
    assert_eq!(published_epoch(&decision), Some(1));
    let status = decision.status.as_ref().unwrap();
    assert_eq!(status.workers_desired, 2);
    assert_eq!(reasons(&decision)[0], "WorkersRefused");
    assert!(decision.events[0].note.ends_with("running with 2"));
    assert_eq!(decision.refusals, RefusalMemory::Keep);

    // Two refused of a gang of at least 2: the one made is stopped, the
    // refusal remembered (no worker made again for a while).
    let (_, decision) = place_and_conclude(
        &seen(job(2, 3), vec![], 3),
        &["llm-worker-1", "llm-worker-2"],
    );
    assert_eq!(published_epoch(&decision), None);
    assert_eq!(deleted(&decision), vec!["llm-worker-0"]);
    assert_eq!(
        reasons(&decision),
        vec!["WorkersRefused", "BelowMinimum", "Pending"]
    );
    assert_eq!(decision.refusals, RefusalMemory::Remember);
    assert_eq!(decision.status.as_ref().unwrap().phase, Phase::Pending);
}

#[test]
fn the_last_epoch_ends_the_job_rather_than_publish_past_it() {
    let running = with_status(job(2, 2), status(Phase::Running, MAX_EPOCH as i64));
    let pods = vec![worker(&running, "llm-w0", "n0", MAX_EPOCH, "Running")];
    let (_, decision) = place_and_conclude(&seen(running, pods, 3), &[]);
    assert_eq!(decision.status.as_ref().unwrap().phase, Phase::Failed);
    assert_eq!(reasons(&decision), vec!["MeshEpochsExhausted"]);
    let mut stopped = deleted(&decision);
    stopped.sort();
    assert!(stopped.contains(&"llm-w0"), "{stopped:?}");
    assert!(decision.mesh.is_none());
}

/// Requests an API server answered: (method, path).
type Calls = Arc<Mutex<Vec<(String, String)>>>;

/// What the test's API server answers: given the method, the path and how
/// many status writes came before, a code and a body.
type Answer = fn(&str, &str, usize) -> (u16, serde_json::Value);

/// The job as the API server holds it after a worker wrote its progress.
fn progressed() -> serde_json::Value {
    let mut job = serde_json::to_value(job(2, 2)).unwrap();
    job["metadata"]["resourceVersion"] = "102".into();
    job["status"] = serde_json::json!({ "step": 41, "tokensPerSecond": 1200.0 });
    job
}

fn conflict() -> (u16, serde_json::Value) {
    (
        409,
        serde_json::json!({
            "kind": "Status", "apiVersion": "v1", "status": "Failure",
            "message": "the object has been modified", "reason": "Conflict", "code": 409,
        }),
    )
}

/// A client whose API server records every request and answers as `answer`
/// says; requests it does not answer get an empty object of their kind.
fn api_server(answer: Answer) -> (kube::Client, Calls) {
    let calls: Calls = Arc::default();
    let seen_calls = calls.clone();
    let service = tower::service_fn(move |request: http::Request<kube::client::Body>| {
        let calls = seen_calls.clone();
        async move {
            let method = request.method().to_string();
            let path = request.uri().path().to_string();
            let writes = {
                let mut calls = calls.lock().unwrap();
                let writes = calls
                    .iter()
                    .filter(|(m, p)| m == "PATCH" && p.ends_with("/status"))
                    .count();
                calls.push((method.clone(), path.clone()));
                writes
            };
            let (code, body) = if path.contains("/events") {
                (
                    201,
                    serde_json::json!({
                        "apiVersion": "events.k8s.io/v1", "kind": "Event",
                        "metadata": { "name": "e", "namespace": "team" },
                        "eventTime": "2026-12-07T00:00:00.000000Z",
                    }),
                )
            } else {
                let (code, body) = answer(&method, &path, writes);
                if code != 0 {
                    (code, body)
                } else {
                    (
                        200,
                        serde_json::json!({
                            "apiVersion": "v1", "kind": "Pod",
                            "metadata": { "name": "llm-w0", "namespace": "team" },
                        }),
                    )
                }
            };
            Ok::<_, std::convert::Infallible>(
                http::Response::builder()
                    .status(code)
                    .header("content-type", "application/json")
                    .body(kube::client::Body::from(body.to_string().into_bytes()))
                    .unwrap(),
            )
        }
    });
    (kube::Client::new(service, "team"), calls)
}

/// The status write succeeds (the job at version 101).
fn written(method: &str, path: &str, _: usize) -> (u16, serde_json::Value) {
    if method == "PATCH" && path.ends_with("/status") {
        let mut job = serde_json::to_value(job(2, 2)).unwrap();
        job["metadata"]["resourceVersion"] = "101".into();
        (200, job)
    } else {
        (0, serde_json::Value::Null)
    }
}

/// A decision that ends the job: its status, a worker stopped, an event.
fn a_decision() -> Decision {
    let running = with_status(job(2, 2), status(Phase::Running, 1));
    let pods = vec![
        worker(&running, "llm-w0", "n0", 1, "Running"),
        exited(worker(&running, "llm-w1", "n1", 1, "Running"), 0, ""),
    ];
    done(settle(&seen(running, pods, 2), &at(NOW)))
}

/// The calls by kind, in order.
fn kinds(calls: &Calls) -> Vec<&'static str> {
    calls
        .lock()
        .unwrap()
        .iter()
        .map(|(method, path)| match (method.as_str(), path) {
            ("DELETE", p) if p.contains("/pods/") => "delete pod",
            ("PATCH", p) if p.ends_with("/status") => "write status",
            ("GET", p) if p.ends_with("/trainingjobs/llm") => "read job",
            (_, p) if p.contains("/events") => "tell",
            _ => "other",
        })
        .collect()
}

async fn carry_out_with(answer: Answer) -> (Result<(), ControllerError>, Calls, TrainingJob) {
    let (client, calls) = api_server(answer);
    let events = crate::events::Events::new(client.clone(), "weft-operator", None);
    let mut job = job(2, 2);
    let result = super::apply::carry_out(&client, &events, &mut job, &a_decision()).await;
    (result, calls, job)
}

use crate::controller::ControllerError;

#[tokio::test]
async fn the_status_is_written_first_then_what_it_records_is_told_then_deleted() {
    assert_eq!(reasons(&a_decision()), vec!["Succeeded"]);
    let (result, calls, job) = carry_out_with(written).await;
    result.unwrap();
    assert_eq!(
        kinds(&calls),
        vec!["write status", "tell", "delete pod"],
        "{calls:?}"
    );
    assert_eq!(job.metadata.resource_version.as_deref(), Some("101"));
}

#[tokio::test]
async fn a_status_write_that_conflicts_deletes_nothing_and_tells_nothing() {
    // Someone changed the operator's part of the status (or the spec):
    // the reconcile decides again.
    let (result, calls, _) =
        carry_out_with(
            |method, path, _| match (method, path.ends_with("/status")) {
                ("PATCH", true) => conflict(),
                ("GET", _) => {
                    let mut job = progressed();
                    job["status"]["restarts"] = 3.into();
                    (200, job)
                }
                _ => (0, serde_json::Value::Null),
            },
        )
        .await;
    assert!(
        matches!(result, Err(ControllerError::Conflict)),
        "{result:?}"
    );
    assert_eq!(kinds(&calls), vec!["write status", "read job"], "{calls:?}");
    assert_eq!(
        crate::controller::retry_after(result.unwrap_err().retry(), 1),
        Some(Duration::from_millis(100)),
        "a conflict is decided again at once"
    );
}

#[tokio::test]
async fn a_conflict_with_the_workers_progress_alone_is_written_again() {
    // A worker wrote its step in the meantime: the decision still holds,
    // written once on the new version, then the rest.
    let (result, calls, job) =
        carry_out_with(
            |method, path, writes| match (method, path.ends_with("/status")) {
                ("PATCH", true) if writes == 0 => conflict(),
                ("PATCH", true) => {
                    let mut job = progressed();
                    job["metadata"]["resourceVersion"] = "103".into();
                    (200, job)
                }
                ("GET", _) => (200, progressed()),
                _ => (0, serde_json::Value::Null),
            },
        )
        .await;
    result.unwrap();
    assert_eq!(
        kinds(&calls),
        vec![
            "write status",
            "read job",
            "write status",
            "tell",
            "delete pod"
        ],
        "{calls:?}"
    );
    assert_eq!(job.metadata.resource_version.as_deref(), Some("103"));
}

#[test]
fn a_lost_worker_is_told_by_name_and_its_deleted_pod_is_not_counted() {
    // Epoch 1 with two workers; the second failed (counted already).
    let first = place_and_conclude(&seen(job(2, 2), vec![], 3), &[]);
    let mesh_1 = first.1.mesh.clone().unwrap();
    let mut recorded = first.1.status.clone().unwrap();
    recorded.phase = Phase::Running;
    // Published 10 s before the failure was counted.
    recorded.last_rescale_time = Some(at(NOW - 10));
    recorded.restarts = 1;
    recorded.recent_failures = vec![WorkerFailure {
        worker: "llm-worker-1".into(),
        uid: "uid-llm-worker-1".into(),
        reason: "exit 1".into(),
        time: at(NOW - 1),
    }];
    let running = with_status(job(2, 2), recorded);
    let workers = &first.0.planned.as_ref().unwrap().workers;
    let pods = vec![
        worker(&running, &workers[0].name, &workers[0].node, 1, "Running"),
        exited(
            worker(&running, &workers[1].name, &workers[1].node, 1, "Running"),
            1,
            "lost",
        ),
    ];
    let (placement, decision) = place_and_conclude(
        &Seen {
            published: crate::controller::read_published(Some(&mesh_1), "llm", 1),
            ..seen(running.clone(), pods.clone(), 3)
        },
        &[],
    );
    assert_eq!(placement.delete.len(), 1, "the failed pod is deleted");
    let told = &decision.events[0];
    assert_eq!(told.reason, "MeshEpoch");
    assert!(
        told.note
            .starts_with("mesh epoch 2: 2 workers (16 GPUs) on 2 nodes; 1 joined, 1 left"),
        "{}",
        told.note
    );
    let status = decision.status.clone().unwrap();
    let ready = crate::status::find_condition(&status, crate::status::CONDITION_READY).unwrap();
    assert_eq!(
        ready.message,
        "1 of 2 workers running, 0 failed, 0 succeeded"
    );

    // The status write of that reconcile is lost (a conflict): it told
    // nothing and deleted nothing, but epoch 2 is published, with its new
    // worker made. The reconcile that records epoch 2 tells the change as
    // the lost one saw it, not a change from the published mesh to itself.
    let mesh_2 = decision.mesh.clone().unwrap();
    let change =
        mesh_2.metadata.annotations.as_ref().unwrap()[crate::build::ANNOTATION_MESH_CHANGE].clone();
    assert_eq!(change, told.note);
    let mut pods = pods.clone();
    for made in &placement.create {
        let name = made.name_any();
        pods.retain(|p| p.name_any() != name);
        let node =
            made.spec.as_ref().unwrap().node_selector.as_ref().unwrap()["kubernetes.io/hostname"]
                .clone();
        pods.push(worker(&running, &name, &node, 2, "Pending"));
    }
    // What the next reconcile observes: the published mesh and its note.
    let observed = |mesh: &ConfigMap, recorded: u64, job: &TrainingJob, pods: Vec<Pod>| {
        let published = crate::controller::read_published(Some(mesh), "llm", recorded);
        Seen {
            published_change: crate::controller::published_change(Some(mesh), &published),
            published_fault: crate::controller::published_fault(Some(mesh), &published),
            published,
            ..seen(job.clone(), pods, 3)
        }
    };
    let retry = observed(&mesh_2, 1, &running, pods.clone());
    assert_eq!(retry.published_change.as_deref(), Some(change.as_str()));
    // And the fault behind it (the failure counted), written beside it.
    assert_eq!(status.last_fault_time, Some(at(NOW - 1)));
    assert_eq!(retry.published_fault, Some(at(NOW - 1)));
    let (again, redecided) = place_and_conclude(&retry, &[]);
    assert_eq!(published_epoch(&redecided), Some(2), "the same epoch");
    assert_eq!(
        redecided.status.as_ref().unwrap().last_fault_time,
        Some(at(NOW - 1)),
        "the fault as the lost write saw it"
    );
    assert!(again.create.is_empty(), "{:?}", again.create);
    let told_again: Vec<_> = redecided
        .events
        .iter()
        .filter(|t| t.reason == "MeshEpoch")
        .collect();
    assert_eq!(told_again.len(), 1);
    assert_eq!(told_again[0].note, told.note);
    // The change stays beside the mesh while the epoch holds.
    let mesh_2 = redecided.mesh.unwrap();
    let kept = mesh_2.metadata.annotations.as_ref().unwrap();
    assert_eq!(kept[crate::build::ANNOTATION_MESH_CHANGE], change);

    // A note that is not about the published mesh's epoch (edited by
    // hand) is not told.
    let mut edited = mesh_2.clone();
    edited.metadata.annotations.as_mut().unwrap().insert(
        crate::build::ANNOTATION_MESH_CHANGE.to_string(),
        "mesh epoch 9: 99 joined".to_string(),
    );
    assert_eq!(
        observed(&edited, 1, &running, vec![]).published_change,
        None
    );

    // Epoch 2 recorded, and its first worker fails: epoch 3's change is
    // told from epoch 2's mesh, not the note beside epoch 2.
    let mut pods: Vec<Pod> = pods
        .into_iter()
        .filter(|p| !terminal(p))
        .map(|mut p| {
            p.status.as_mut().unwrap().phase = Some("Running".into());
            p
        })
        .collect();
    let first = pods[0].name_any();
    let lost = pods.remove(0);
    pods.push(exited(lost, 1, "lost"));
    // Epoch 2 recorded, with that failure counted.
    let mut recorded_2 = running.status.clone().unwrap();
    recorded_2.mesh_epoch = 2;
    recorded_2.restarts = 2;
    recorded_2.recent_failures.push(WorkerFailure {
        worker: first.clone(),
        uid: format!("uid-{first}"),
        reason: "exit 1".into(),
        time: at(NOW),
    });
    let at_2 = with_status(job(2, 2), recorded_2);
    let (_, third) = place_and_conclude(&observed(&mesh_2, 2, &at_2, pods), &[]);
    assert_eq!(published_epoch(&third), Some(3));
    let told_3: Vec<_> = third
        .events
        .iter()
        .filter(|t| t.reason == "MeshEpoch")
        .collect();
    assert_eq!(told_3.len(), 1, "{:?}", third.events);
    assert!(
        told_3[0].note.starts_with("mesh epoch 3: ") && told_3[0].note.contains("1 joined, 1 left"),
        "{first}: {}",
        told_3[0].note
    );
    let note_3 = third.mesh.unwrap().metadata.annotations.unwrap();
    assert_eq!(note_3[crate::build::ANNOTATION_MESH_CHANGE], told_3[0].note);
}

#[test]
fn many_workers_failing_at_once_are_counted_once_and_deleted_after() {
    // More failures at once than `recentFailures` remembers: every one is
    // counted, and every one deleted once the count is written, so none is
    // counted again when it has left the list.
    let running = with_status(job(2, 32), status(Phase::Running, 1));
    let mut pods = Vec::new();
    for i in 0..20 {
        let name = format!("llm-worker-{i}");
        pods.push(exited(
            worker(&running, &name, &format!("n{i}"), 1, "Running"),
            1,
            "peer lost",
        ));
    }
    let mut budget = running.clone();
    budget.spec.elasticity.restart_limit = 100;
    let decision = done(settle(&seen(budget, pods, 20), &at(NOW)));
    let status = decision.status.as_ref().unwrap();
    assert_eq!(status.restarts, 20);
    assert_eq!(
        status.recent_failures.len(),
        crate::lifecycle::RECENT_FAILURES
    );
    assert_eq!(decision.delete.len(), 20);
    assert_eq!(decision.events.len(), 20);
}

#[tokio::test]
async fn a_deletion_that_fails_after_the_write_has_told_the_events_already() {
    // The next reconcile finds the end on record and deletes again, with
    // nothing new to tell: the events must be out before the deletions.
    let (result, calls, _) = carry_out_with(|method, path, writes| {
        if method == "DELETE" {
            (
                500,
                serde_json::json!({
                    "kind": "Status", "apiVersion": "v1", "status": "Failure",
                    "message": "etcd is slow", "reason": "InternalError", "code": 500,
                }),
            )
        } else {
            written(method, path, writes)
        }
    })
    .await;
    assert!(result.is_err());
    assert_eq!(
        kinds(&calls),
        vec!["write status", "tell", "delete pod"],
        "{calls:?}"
    );
}

/// A training job that sets `elasticity.stallTimeoutSeconds` is looked at
/// again when it would turn stalled with no step by then, not only at the
/// idle look.
#[test]
fn a_job_that_watches_for_stalls_is_looked_at_when_one_would_begin() {
    let (first, members) = first_mesh();
    let mesh_1 = first.1.mesh.clone().unwrap();
    let mut watched = job(2, 2);
    watched.spec.elasticity.stall_timeout_seconds = Some(20);
    let running = with_status(
        watched,
        TrainingJobStatus {
            phase: Phase::Running,
            // The last step 8 s ago, the workers all ready long before:
            // 12 s left.
            last_step_time: Some(at(NOW - 8)),
            conditions: vec![k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
                type_: crate::status::CONDITION_READY.to_string(),
                status: "True".to_string(),
                reason: "AllWorkersRunning".to_string(),
                message: "2 of 2 workers running".to_string(),
                observed_generation: None,
                last_transition_time: at(NOW - 50),
            }],
            start_time: Some(at(NOW - 100)),
            last_rescale_time: Some(at(NOW - 100)),
            ..first.1.status.clone().unwrap()
        },
    );
    let pods: Vec<Pod> = members
        .iter()
        .map(|(name, node)| worker(&running, name, node, 1, "Running"))
        .collect();
    let mut seen = seen(running, pods, 3);
    seen.published = crate::controller::read_published(Some(&mesh_1), "llm", 1);
    let (_, decision) = place_and_conclude(&seen, &[]);
    assert_eq!(
        decision.status.as_ref().map(|s| s.phase),
        Some(Phase::Running)
    );
    assert!(12 + 1 < IDLE_LOOK.as_secs());
    assert_eq!(decision.requeue, Some(Duration::from_secs(12 + 1)));
}

/// A suspended job runs no worker: the Stalled condition it had is gone,
/// as the reconcile records the suspension.
#[test]
fn a_suspended_job_is_not_stalled() {
    let mut suspended = job(2, 2);
    suspended.spec.suspend = true;
    suspended.spec.elasticity.stall_timeout_seconds = Some(60);
    let mut stalled = status(Phase::Running, 1);
    stalled.conditions = vec![k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
        type_: crate::status::CONDITION_STALLED.to_string(),
        status: "True".to_string(),
        reason: "NoStepReported".to_string(),
        message: "no training step reported".to_string(),
        observed_generation: None,
        last_transition_time: at(NOW - 5),
    }];
    let decision = done(settle(
        &seen(with_status(suspended, stalled), vec![], 2),
        &at(NOW),
    ));
    let status = decision.status.unwrap();
    assert_eq!(status.phase, Phase::Suspended);
    assert!(
        status
            .conditions
            .iter()
            .all(|c| c.type_ != crate::status::CONDITION_STALLED),
        "{:?}",
        status.conditions
    );
}
