//! The decisions of a reconcile that are about a job's life rather than its
//! placement, each a pure function of the job and what was observed:
//!
//! - **Restart budget.** A worker pod that fails is a restart: counted once
//!   per pod (by UID, remembered in `status.recentFailures`), in
//!   `status.restarts`, which never resets, not on success, not on resize.
//!   One more than `elasticity.restartLimit` fails the job. A lost *node*
//!   is not the job's fault and is not counted; its worker just leaves the
//!   mesh.
//! - **Completion.** A worker exits 0 only when the training loop has run
//!   its last step (every rank ends at the same step), so the first worker
//!   that succeeds ends the job: it is Succeeded and its other workers are
//!   stopped, releasing their GPUs.
//! - **Nodes that will not take a worker.** A worker the scheduler has
//!   refused on its node for `elasticity.unschedulableTimeoutSeconds` (the
//!   node lacks memory or CPU the mesh does not see, a taint came) makes the
//!   job avoid that node for `AVOID_NODE_SECONDS`, recorded in
//!   `status.avoidedNodes`: the next mesh places the worker elsewhere, or
//!   shrinks, and the job never waits on that node for ever.
//! - **Rescale cooldown.** After a membership change the job does not grow
//!   for `elasticity.rescaleCooldownSeconds`, so capacity that flaps does not
//!   restart the workers over and over; it still shrinks at once, and it may
//!   always grow back to `workers.min` (or the more workers a Static
//!   `cpDegree` needs).

use std::time::Duration;

use k8s_openapi::api::core::v1::{ContainerStateTerminated, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use weft_crds::{AVOID_NODE_SECONDS, AvoidedNode, TrainingJob, TrainingJobStatus, WorkerFailure};

use crate::status::{phase_of, scheduler_refusal};

/// How many failures `status.recentFailures` remembers.
pub const RECENT_FAILURES: usize = 16;

/// A container's termination message in a line: its last non-empty line
/// (a worker writes its error there in one; the kubelet may fill it with
/// the log's last lines instead, of which libtorch's own warnings and notes
/// say nothing of why it ended, and are passed over), cut to 512 bytes.
fn message_line(message: &str) -> Option<String> {
    let line = message
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty() && !libtorch_note(l))?;
    let mut end = line.len().min(512);
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    Some(line[..end].to_string())
}

/// A line libtorch logs as a warning or a note (`[W1208 01:05:25.264 socket.cpp:207] ...`,
/// glog's form: the level, the month and day, the time, the source).
fn libtorch_note(line: &str) -> bool {
    let Some(rest) = line.strip_prefix("[W").or_else(|| line.strip_prefix("[I")) else {
        return false;
    };
    let date = rest.get(..4).unwrap_or_default();
    date.len() == 4 && date.bytes().all(|b| b.is_ascii_digit()) && rest[4..].starts_with(' ')
}

/// The containers of `pod` that ended with an error: (name, how it ended).
pub(crate) fn failed_containers(
    pod: &Pod,
) -> impl Iterator<Item = (&str, &ContainerStateTerminated)> {
    pod.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|c| Some((c.name.as_str(), c.state.as_ref()?.terminated.as_ref()?)))
        .filter(|(_, t)| t.exit_code != 0)
}

/// Why a pod failed, in a line: the first terminated container's reason and
/// exit code, else the pod's own reason and message.
pub fn failure_reason(pod: &Pod) -> String {
    let status = pod.status.as_ref();
    if let Some((container, t)) = failed_containers(pod).next() {
        let mut line = format!(
            "container {container} exited with code {} ({})",
            t.exit_code,
            t.reason.as_deref().unwrap_or("Error")
        );
        if let Some(message) = t.message.as_deref().and_then(message_line) {
            line += &format!(": {message}");
        }
        return line;
    }
    match (
        status.and_then(|s| s.reason.as_deref()),
        status.and_then(|s| s.message.as_deref()),
    ) {
        (Some(reason), Some(message)) => format!("{reason}: {message}"),
        (Some(reason), None) => reason.to_string(),
        (None, Some(message)) => message.to_string(),
        (None, None) => "the pod failed".to_string(),
    }
}

/// The first failed worker that refused the job's settings (its container
/// exited with [`weft_crds::SETTINGS_REFUSED_EXIT`]), and why, in its own
/// words (the worker writes them as its termination message): such a job
/// cannot run until its spec changes, so it fails at once rather than spend
/// its restarts on the same refusal.
pub fn refused_settings(pods: &[Pod]) -> Option<String> {
    let mut pods: Vec<&Pod> = pods.iter().filter(|p| phase_of(p) == "Failed").collect();
    pods.sort_by_key(|p| p.name_any());
    pods.into_iter().find_map(|pod| {
        let refused = pod
            .status
            .as_ref()?
            .container_statuses
            .as_ref()?
            .iter()
            .filter_map(|c| c.state.as_ref()?.terminated.as_ref())
            .find(|t| t.exit_code == weft_crds::SETTINGS_REFUSED_EXIT)?;
        let message = refused
            .message
            .as_deref()
            .and_then(message_line)
            .unwrap_or_else(|| "(it left no message; see its log)".to_string());
        Some(format!(
            "worker {} refused the job's settings: {message}",
            pod.name_any()
        ))
    })
}

/// The nodes the job avoids from `now` on: those of `status.avoidedNodes`
/// avoided for less than [`AVOID_NODE_SECONDS`], and the node of every worker
/// pod the scheduler has refused (`PodScheduled` False, `Unschedulable`) for
/// `timeout_s` or more, by node name.
pub fn avoided_nodes(
    status: &TrainingJobStatus,
    pods: &[Pod],
    timeout_s: i64,
    now: &Time,
) -> Vec<AvoidedNode> {
    let age = |since: &Time| crate::status::seconds(since, now);
    let mut avoided: Vec<AvoidedNode> = status
        .avoided_nodes
        .iter()
        .filter(|a| age(&a.since) < AVOID_NODE_SECONDS)
        .cloned()
        .collect();
    for (pod, node, refused) in refused_workers(pods) {
        let since = refused.last_transition_time.as_ref();
        if since.is_none_or(|t| age(t) < timeout_s) || avoided.iter().any(|a| a.node == node) {
            continue;
        }
        avoided.push(AvoidedNode {
            node: node.to_string(),
            reason: format!(
                "worker {} could not be scheduled there: {}",
                pod.name_any(),
                refused.message.as_deref().unwrap_or("no reason given")
            ),
            since: now.clone(),
        });
    }
    avoided.sort_by(|a, b| a.node.cmp(&b.node));
    avoided
}

/// How long until a worker the scheduler refuses reaches `timeout_s` (when
/// the reconcile must look again), if one is still under it.
pub fn next_refusal_timeout(pods: &[Pod], timeout_s: i64, now: &Time) -> Option<Duration> {
    refused_workers(pods)
        .filter_map(|(_, _, c)| c.last_transition_time.as_ref())
        .map(|t| timeout_s - crate::status::seconds(t, now))
        .filter(|left| *left > 0)
        .min()
        .map(|left| Duration::from_secs(left as u64))
}

/// Pending workers pinned to a node that the scheduler refuses there: the
/// pod, its node and the `PodScheduled` condition.
pub(crate) fn refused_workers(
    pods: &[Pod],
) -> impl Iterator<Item = (&Pod, &str, &k8s_openapi::api::core::v1::PodCondition)> {
    pods.iter().filter_map(|pod| {
        let refused = scheduler_refusal(pod)?;
        let node = pod
            .spec
            .as_ref()?
            .node_selector
            .as_ref()?
            .get("kubernetes.io/hostname")?;
        Some((pod, node.as_str(), refused))
    })
}

/// Failed worker pods not counted yet, in name order. A pod that was being
/// deleted when it ended (suspended, shrunk, deleted by hand: its worker
/// stops on SIGTERM, or is killed at the end of its grace period) did not
/// fail.
pub fn new_failures(status: &TrainingJobStatus, pods: &[Pod], now: &Time) -> Vec<WorkerFailure> {
    let mut failures: Vec<WorkerFailure> = pods
        .iter()
        .filter(|p| phase_of(p) == "Failed" && p.metadata.deletion_timestamp.is_none())
        .filter_map(|p| {
            let uid = p.uid()?;
            (!status.recent_failures.iter().any(|f| f.uid == uid)).then(|| WorkerFailure {
                worker: p.name_any(),
                uid,
                reason: failure_reason(p),
                time: now.clone(),
            })
        })
        .collect();
    failures.sort_by(|a, b| a.worker.cmp(&b.worker));
    failures
}

/// Counts `failures` into `status`.
pub fn record_failures(status: &mut TrainingJobStatus, failures: &[WorkerFailure]) {
    status.restarts += failures.len() as i32;
    status.recent_failures.extend(failures.iter().cloned());
    let excess = status.recent_failures.len().saturating_sub(RECENT_FAILURES);
    status.recent_failures.drain(..excess);
}

/// Whether the job has used up its restart budget, and the message that says so.
pub fn restart_budget_exhausted(job: &TrainingJob, status: &TrainingJobStatus) -> Option<String> {
    let limit = job.spec.elasticity.restart_limit;
    (status.restarts > limit).then(|| {
        let last = status
            .recent_failures
            .last()
            .map(|f| format!("; last: {} ({})", f.worker, f.reason))
            .unwrap_or_default();
        format!(
            "{} worker failures, more than elasticity.restartLimit {limit}{last}",
            status.restarts
        )
    })
}

/// The worker whose success ends the job, if one succeeded.
pub fn finished_worker(pods: &[Pod]) -> Option<&Pod> {
    pods.iter()
        .filter(|p| phase_of(p) == "Succeeded" && p.metadata.deletion_timestamp.is_none())
        .min_by_key(|p| p.name_any())
}

/// How many workers the mesh may have now: `workers.max`, or while the
/// cooldown after the last membership change runs, no more than the job has
/// (but always `workers.min`, or the more a Static `cpDegree` needs). Also
/// returns how long the cooldown has left.
pub fn growth_limit(
    job: &TrainingJob,
    status: Option<&TrainingJobStatus>,
    alive_workers: u32,
    now: &Time,
) -> (u32, Option<Duration>) {
    let max = job.spec.workers_asked().1;
    // (A spec whose least is above max gets no mesh: it waits, Pending,
    // saying why: `TrainingJobSpec::gang_problem`.)
    let min = job.spec.least_workers().min(max);
    let cooldown = job.spec.rescale_cooldown();
    let Some(last) = status.and_then(|s| s.last_rescale_time.as_ref()) else {
        return (max, None);
    };
    if alive_workers == 0 {
        return (max, None);
    }
    let elapsed = now.0.duration_since(last.0);
    let elapsed = Duration::try_from(elapsed).unwrap_or(Duration::ZERO);
    match cooldown.checked_sub(elapsed) {
        Some(left) if !left.is_zero() => (alive_workers.clamp(min, max), Some(left)),
        _ => (max, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{at, exited, unschedulable};
    use weft_crds::TrainingJobSpec;

    /// Worker `name` (UID `uid`) in `phase`, its container ended with
    /// `exit_code` ("NCCL timeout").
    fn pod(name: &str, uid: &str, phase: &str, exit_code: i32) -> Pod {
        let mut pod = exited(
            crate::testing::pod(name, "n0", 8, phase),
            exit_code,
            "NCCL timeout",
        );
        pod.metadata.uid = Some(uid.into());
        if let Some(status) = pod.status.as_mut() {
            status.phase = Some(phase.into());
        }
        pod
    }

    /// A worker pending on `node`, refused by the scheduler since `since`.
    fn refused(name: &str, node: &str, since: i64) -> Pod {
        unschedulable(crate::testing::pod(name, node, 8, "Pending"), at(since))
    }

    #[test]
    fn a_node_that_will_not_take_a_worker_is_avoided_for_a_while() {
        let mut status = TrainingJobStatus::default();
        let pods = vec![
            refused("w-0", "gpu-a-0", 1000),
            refused("w-1", "gpu-a-1", 1050),
        ];
        // Refused for 70 s and 20 s: with a 60 s timeout only the first node goes.
        let avoided = avoided_nodes(&status, &pods, 60, &at(1070));
        assert_eq!(avoided.len(), 1);
        assert_eq!(avoided[0].node, "gpu-a-0");
        assert!(
            avoided[0].reason.contains("w-0") && avoided[0].reason.contains("Insufficient memory")
        );
        assert_eq!(avoided[0].since, at(1070));
        status.avoided_nodes = avoided;
        // Level-triggered: the same observation gives the same list, kept
        // from the status even when the pod is gone.
        assert_eq!(
            avoided_nodes(&status, &pods, 60, &at(1080)),
            status.avoided_nodes
        );
        assert_eq!(
            avoided_nodes(&status, &[], 60, &at(1080)),
            status.avoided_nodes
        );
        // The reconcile looks again when the second reaches the timeout.
        assert_eq!(
            next_refusal_timeout(&pods, 60, &at(1070)),
            Some(Duration::from_secs(40))
        );
        assert_eq!(next_refusal_timeout(&pods, 60, &at(1200)), None);
        // Tried again AVOID_NODE_SECONDS later.
        let later = at(1070 + AVOID_NODE_SECONDS);
        assert!(avoided_nodes(&status, &[], 60, &later).is_empty());
        // A pod the scheduler has not refused, or not pinned, avoids nothing.
        let mut waiting = refused("w-2", "gpu-a-2", 0);
        waiting.status.as_mut().unwrap().conditions = None;
        let mut unpinned = refused("w-3", "gpu-a-3", 0);
        unpinned.spec = None;
        assert!(
            avoided_nodes(
                &TrainingJobStatus::default(),
                &[waiting, unpinned],
                60,
                &at(1000)
            )
            .is_empty()
        );
    }

    fn job(limit: i32, cooldown: i32) -> TrainingJob {
        let mut spec = TrainingJobSpec::new("weft:dev", 2, 6);
        spec.elasticity.restart_limit = limit;
        spec.elasticity.rescale_cooldown_seconds = cooldown;
        TrainingJob::new("llm", spec)
    }

    /// A container killed before it could say why leaves its log's last
    /// lines: libtorch's warnings there are not the reason.
    #[test]
    fn libtorchs_warnings_are_not_a_failures_reason() {
        let killed = exited(
            pod("llm-w1", "u1", "Running", 0),
            137,
            "weft-trainer worker llm-w1: epoch 2: ranks [1] of 2\n[W1208 01:05:25.264663868 socket.cpp:207] [c10d] The hostname of the client socket cannot be retrieved. err=-3\n",
        );
        assert_eq!(
            failure_reason(&killed),
            "container trainer exited with code 137 (Error): weft-trainer worker llm-w1: epoch 2: ranks [1] of 2"
        );
        let only_warnings = exited(
            pod("llm-w1", "u1", "Running", 0),
            137,
            "[W1208 01:05:25.264663868 socket.cpp:207] [c10d] err=-3\n[I1208 01:05:26.1 x.cpp:1] note",
        );
        assert_eq!(
            failure_reason(&only_warnings),
            "container trainer exited with code 137 (Error)"
        );
        // A line that only looks a little like one is kept.
        assert!(!libtorch_note("[Worker 3] lost"));
        assert!(libtorch_note("[W1208 01:05:25.264663868 socket.cpp:207] x"));
    }

    #[test]
    fn a_failed_pod_is_counted_once_and_the_count_never_resets() {
        let mut status = TrainingJobStatus::default();
        let pods = [
            pod("llm-w1", "u1", "Failed", 137),
            pod("llm-w0", "u0", "Running", 0),
        ];
        let first = new_failures(&status, &pods, &at(10));
        assert_eq!(first.len(), 1);
        assert_eq!(
            first[0].reason,
            "container trainer exited with code 137 (Error): NCCL timeout"
        );
        record_failures(&mut status, &first);
        assert_eq!(status.restarts, 1);
        // The same pod seen again (its deletion not yet observed) is not counted.
        assert!(new_failures(&status, &pods, &at(20)).is_empty());
        // A replacement pod of the same name is a new pod.
        let again = [pod("llm-w1", "u2", "Failed", 1)];
        let second = new_failures(&status, &again, &at(30));
        record_failures(&mut status, &second);
        assert_eq!(status.restarts, 2);
    }

    #[test]
    fn the_failure_list_is_bounded_but_the_count_is_not() {
        let mut status = TrainingJobStatus::default();
        for i in 0..40 {
            let pods = [pod(&format!("w{i}"), &format!("u{i}"), "Failed", 1)];
            let f = new_failures(&status, &pods, &at(i));
            record_failures(&mut status, &f);
        }
        assert_eq!(status.restarts, 40);
        assert_eq!(status.recent_failures.len(), RECENT_FAILURES);
        assert_eq!(status.recent_failures.last().unwrap().worker, "w39");
    }

    #[test]
    fn one_failure_past_the_limit_fails_the_job_and_says_why() {
        let j = job(2, 60);
        let mut status = TrainingJobStatus::default();
        for i in 0..3 {
            let pods = [pod("llm-w1", &format!("u{i}"), "Failed", 1)];
            let f = new_failures(&status, &pods, &at(i));
            record_failures(&mut status, &f);
            let exhausted = restart_budget_exhausted(&j, &status);
            assert_eq!(exhausted.is_some(), i == 2, "after {} failures", i + 1);
        }
        let message = restart_budget_exhausted(&j, &status).unwrap();
        assert!(
            message.starts_with("3 worker failures, more than elasticity.restartLimit 2"),
            "{message}"
        );
        assert!(message.contains("llm-w1"), "{message}");
        // A zero limit tolerates no failure at all.
        let strict = job(0, 60);
        assert!(restart_budget_exhausted(&strict, &status).is_some());
    }

    /// A worker that exits with the refusal code fails the job at once with
    /// its message; any other failure, or a success, is no refusal.
    #[test]
    fn a_worker_that_refuses_the_settings_is_found_with_its_message() {
        let cases: Vec<(Vec<Pod>, Option<&str>)> = vec![
            (vec![pod("w-0", "a", "Failed", 1)], None),
            (vec![pod("w-0", "a", "Running", 0)], None),
            (vec![pod("w-0", "a", "Succeeded", 0)], None),
            (
                vec![
                    pod("w-1", "b", "Failed", weft_crds::SETTINGS_REFUSED_EXIT),
                    pod("w-0", "a", "Failed", 1),
                ],
                Some("worker w-1 refused the job's settings: NCCL timeout"),
            ),
        ];
        for (pods, wanted) in cases {
            assert_eq!(refused_settings(&pods).as_deref(), wanted);
        }
        let mut silent = pod("w-2", "c", "Failed", weft_crds::SETTINGS_REFUSED_EXIT);
        if let Some(status) = silent.status.as_mut()
            && let Some(containers) = status.container_statuses.as_mut()
            && let Some(state) = containers[0].state.as_mut()
            && let Some(terminated) = state.terminated.as_mut()
        {
            terminated.message = None;
        }
        assert!(
            refused_settings(std::slice::from_ref(&silent))
                .unwrap()
                .ends_with("(it left no message; see its log)")
        );
        // A log's tail in the message: its last line, cut.
        if let Some(status) = silent.status.as_mut()
            && let Some(containers) = status.container_statuses.as_mut()
            && let Some(state) = containers[0].state.as_mut()
            && let Some(terminated) = state.terminated.as_mut()
        {
            terminated.message = Some(format!(
                "step 1\nstep 2\nweft-trainer: error: {}\n\n",
                "x".repeat(900)
            ));
        }
        let said = failure_reason(&silent);
        assert!(
            said.starts_with(
                "container trainer exited with code 78 (Error): weft-trainer: error: xxx"
            ),
            "{said}"
        );
        assert!(!said.contains("step 2") && said.len() < 600, "{said}");
    }

    #[test]
    fn a_pod_that_ended_while_being_deleted_neither_failed_nor_finished() {
        // Suspended, shrunk or deleted by hand: its worker stopped on SIGTERM
        // (exit 143), or one exited 0 as it was deleted.
        let mut stopped = pod("llm-w1", "u1", "Failed", 143);
        stopped.metadata.deletion_timestamp = Some(at(5));
        let mut done = pod("llm-w0", "u0", "Succeeded", 0);
        done.metadata.deletion_timestamp = Some(at(5));
        let pods = [stopped, done];
        assert!(new_failures(&TrainingJobStatus::default(), &pods, &at(10)).is_empty());
        assert!(finished_worker(&pods).is_none());
    }

    #[test]
    fn the_first_succeeded_worker_ends_the_job() {
        let pods = [
            pod("llm-w2", "u2", "Succeeded", 0),
            pod("llm-w0", "u0", "Running", 0),
            pod("llm-w1", "u1", "Succeeded", 0),
        ];
        assert_eq!(finished_worker(&pods).unwrap().name_any(), "llm-w1");
        assert!(finished_worker(&pods[1..2]).is_none());
    }

    #[test]
    fn growth_waits_for_the_cooldown_but_never_below_min() {
        let j = job(5, 60);
        let status = TrainingJobStatus {
            last_rescale_time: Some(at(1000)),
            ..Default::default()
        };
        // First start: no cooldown.
        assert_eq!(growth_limit(&j, None, 0, &at(1010)), (6, None));
        // 10 s after a change, 3 workers alive: hold at 3 for 50 s more.
        assert_eq!(
            growth_limit(&j, Some(&status), 3, &at(1010)),
            (3, Some(Duration::from_secs(50)))
        );
        // One worker alive: may grow back to min at once.
        assert_eq!(growth_limit(&j, Some(&status), 1, &at(1010)).0, 2);
        // After the cooldown: up to max.
        assert_eq!(growth_limit(&j, Some(&status), 3, &at(1060)), (6, None));
        // A zero cooldown never holds.
        assert_eq!(
            growth_limit(&job(5, 0), Some(&status), 3, &at(1000)),
            (6, None)
        );
        // Static rings of 24 ranks need 3 workers of 8 GPUs: the least the
        // job grows back to, whatever workers.min says.
        let mut ringed = job(5, 60);
        ringed.spec.parallelism.cp_degree = Some(24);
        assert_eq!(growth_limit(&ringed, Some(&status), 1, &at(1010)).0, 3);
        // Past workers.max (a spec from before the admission rule, which
        // waits Pending): no panic, max holds.
        ringed.spec.parallelism.cp_degree = Some(64);
        assert_eq!(growth_limit(&ringed, Some(&status), 1, &at(1010)).0, 6);
    }
}
