//! Status step of the reconcile pipeline: the TrainingJob's status as a pure
//! function of the job, the mesh of the current epoch (or why none could be
//! made), and the worker pods observed. The controller writes it once per
//! reconcile.
//!
//! Phases: `Suspended` when `spec.suspend`; `Pending` while no mesh can be made
//! (the `Schedulable` condition says how many GPUs the job needs and how many
//! it could get); `Starting` until every worker of the first mesh runs;
//! `Rescaling` while the workers of a later epoch come up; `Running` once they
//! all do. The end of a job (`Succeeded`, `Failed`) and the restart budget
//! are decided by [`lifecycle`](crate::lifecycle) and written with
//! [`finished_status`]. Conditions keep their transition time while their
//! status holds.

use k8s_openapi::api::core::v1::{Pod, PodCondition};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use weft_crds::{Phase, TrainingJob, TrainingJobStatus};
use weft_planner::mesh::{MeshError, MeshPlan};

/// Condition types weft sets.
pub const CONDITION_SCHEDULABLE: &str = "Schedulable";
pub const CONDITION_READY: &str = "WorkersReady";
pub const CONDITION_COMPLETE: &str = "Complete";
pub const CONDITION_FAILED: &str = "Failed";
/// No training step reported for `elasticity.stallTimeoutSeconds`.
pub const CONDITION_STALLED: &str = "Stalled";

/// What the status is computed from.
#[derive(Debug)]
pub struct Observed<'a> {
    /// The mesh of the current epoch, or why none could be made.
    pub mesh: Result<&'a MeshPlan, &'a MeshError>,
    /// The job's worker pods.
    pub pods: &'a [Pod],
    /// Planned workers whose pods the API server refused: (worker, why).
    pub refused: &'a [(String, String)],
    /// Nodes that cannot be read, and why (they take no worker).
    pub unreadable_nodes: &'a [String],
    pub now: Time,
}

/// A pod's phase; a pod with no status yet is Pending.
pub(crate) fn phase_of(pod: &Pod) -> &str {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("Pending")
}

fn condition(
    previous: Option<&TrainingJobStatus>,
    type_: &str,
    ok: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: &Time,
) -> Condition {
    let status = if ok { "True" } else { "False" }.to_string();
    // The transition time moves only when the condition's status changes.
    let since = previous
        .and_then(|p| find_condition(p, type_))
        .filter(|c| c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| now.clone());
    Condition {
        type_: type_.to_string(),
        status,
        reason: reason.to_string(),
        message,
        observed_generation: generation,
        last_transition_time: since,
    }
}

/// The scheduler's refusal of a pending pod: its `PodScheduled` condition
/// when that is False for the reason `Unschedulable`.
pub fn scheduler_refusal(pod: &Pod) -> Option<&PodCondition> {
    if phase_of(pod) != "Pending" {
        return None;
    }
    pod.status.as_ref()?.conditions.as_ref()?.iter().find(|c| {
        c.type_ == "PodScheduled"
            && c.status == "False"
            && c.reason.as_deref() == Some("Unschedulable")
    })
}

/// The job's pods the scheduler has said it cannot place: (pod, its message).
pub fn unschedulable_pods(pods: &[Pod]) -> Vec<(String, String)> {
    pods.iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter_map(|p| {
            let condition = scheduler_refusal(p)?;
            Some((
                p.metadata.name.clone().unwrap_or_default(),
                condition.message.clone().unwrap_or_default(),
            ))
        })
        .collect()
}

/// The condition of type `type_` in `status`, if it has one.
pub fn find_condition<'a>(status: &'a TrainingJobStatus, type_: &str) -> Option<&'a Condition> {
    status.conditions.iter().find(|c| c.type_ == type_)
}

/// A PersistentVolumeClaim a job names: the checkpoint volume
/// (`checkpoint.claimName`) or one of `volumes` (by its index).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobClaim {
    Checkpoint(String),
    Volume(usize, String),
}

impl JobClaim {
    /// Every claim `job` names, the checkpoint's first.
    pub fn of(job: &TrainingJob) -> Vec<JobClaim> {
        let checkpoint = job.spec.checkpoint.claim_name.clone();
        checkpoint
            .map(JobClaim::Checkpoint)
            .into_iter()
            .chain(
                job.spec
                    .volumes
                    .iter()
                    .enumerate()
                    .map(|(i, v)| JobClaim::Volume(i, v.claim_name.clone())),
            )
            .collect()
    }

    pub fn name(&self) -> &str {
        match self {
            JobClaim::Checkpoint(name) | JobClaim::Volume(_, name) => name,
        }
    }

    /// The `Schedulable` condition's reason while this claim is missing.
    pub fn missing_reason(&self) -> &'static str {
        match self {
            JobClaim::Checkpoint(_) => REASON_CLAIM_NOT_FOUND,
            JobClaim::Volume(..) => REASON_VOLUME_CLAIM_NOT_FOUND,
        }
    }
}

/// The `Schedulable` condition's reason while a claim of `volumes` is missing.
pub const REASON_VOLUME_CLAIM_NOT_FOUND: &str = "VolumeClaimNotFound";

/// The status of a job that cannot start because a volume it names (the
/// checkpoint's or one of `volumes`) does not exist: Pending, no worker, and
/// a condition naming the field and the claim, rather than workers the
/// scheduler would refuse on every node (which is not the nodes' fault).
pub fn missing_claim_status(job: &TrainingJob, claim: &JobClaim, now: &Time) -> TrainingJobStatus {
    let previous = job.status.as_ref();
    let mut status = previous.cloned().unwrap_or_default();
    let namespace = job.metadata.namespace.as_deref().unwrap_or("default");
    let name = claim.name();
    let message = match claim {
        JobClaim::Checkpoint(_) => format!(
            "checkpoint.claimName: PersistentVolumeClaim {name:?} not found in namespace {namespace:?}; \
             create it (ReadWriteMany, shared by every worker) or remove checkpoint.claimName"
        ),
        JobClaim::Volume(index, _) => format!(
            "volumes[{index}].claimName: PersistentVolumeClaim {name:?} not found in namespace {namespace:?}; \
             create it or remove it from spec.volumes"
        ),
    };
    let schedulable = condition(
        previous,
        CONDITION_SCHEDULABLE,
        false,
        claim.missing_reason(),
        message,
        job.metadata.generation,
        now,
    );
    let ready = condition(
        previous,
        CONDITION_READY,
        false,
        "WaitingForWorkers",
        "0 of 0 workers running: none is started until the checkpoint claim exists".to_string(),
        job.metadata.generation,
        now,
    );
    status.conditions = vec![schedulable, ready];
    status.observed_generation = job.metadata.generation;
    status.phase = Phase::Pending;
    status.workers_desired = 0;
    status.workers_ready = 0;
    status.workers_ready_summary = Some("0/0".to_string());
    status
}

/// What the API server refused of the planned workers: how many, and the
/// first one with its reason.
pub fn describe_refusals(refused: &[(String, String)]) -> String {
    match refused.first() {
        Some((worker, why)) => format!(
            "{} planned workers could not be created ({worker}: {why})",
            refused.len()
        ),
        None => "every planned worker was created".to_string(),
    }
}

/// The `Schedulable` condition's reason while planned workers were refused
/// by the API server (a quota, an invalid pod).
pub const REASON_WORKERS_REFUSED: &str = "WorkersRefused";

/// The `Schedulable` condition's reason while the checkpoint claim is missing.
pub const REASON_CLAIM_NOT_FOUND: &str = "CheckpointClaimNotFound";

/// The status `job` should have given what was observed.
pub fn compute_status(job: &TrainingJob, observed: &Observed<'_>) -> TrainingJobStatus {
    let previous = job.status.as_ref();
    let generation = job.metadata.generation;
    let now = &observed.now;
    let mut status = previous.cloned().unwrap_or_default();
    status.observed_generation = generation;

    let (schedulable, desired) = match observed.mesh {
        Ok(mesh) => {
            status.mesh_epoch = mesh.epoch as i64;
            let workers = mesh.workers.len() as i32;
            let unschedulable = unschedulable_pods(observed.pods);
            if !observed.refused.is_empty() {
                // Runs with the workers that could be made; says why not more.
                (
                    condition(
                        previous,
                        CONDITION_SCHEDULABLE,
                        false,
                        REASON_WORKERS_REFUSED,
                        format!(
                            "{}; running with {workers}",
                            describe_refusals(observed.refused)
                        ),
                        generation,
                        now,
                    ),
                    workers,
                )
            } else if let Some((_, reason)) = unschedulable.first() {
                // The mesh placed them, but the scheduler will not: say why
                // rather than wait in Starting without a word.
                (
                    condition(
                        previous,
                        CONDITION_SCHEDULABLE,
                        false,
                        "WorkersUnschedulable",
                        format!(
                            "{} of {workers} workers cannot be scheduled: {reason}",
                            unschedulable.len()
                        ),
                        generation,
                        now,
                    ),
                    workers,
                )
            } else {
                (
                    condition(
                        previous,
                        CONDITION_SCHEDULABLE,
                        true,
                        "MeshPlanned",
                        format!(
                            "{} placed on {} nodes",
                            weft_planner::mesh::describe_workers(
                                mesh.workers.len(),
                                mesh.workers.first().map(|w| w.gpus).unwrap_or(0)
                            ),
                            mesh.node_groups.len()
                        ),
                        generation,
                        now,
                    ),
                    workers,
                )
            }
        }
        Err(_) if !observed.refused.is_empty() => (
            condition(
                previous,
                CONDITION_SCHEDULABLE,
                false,
                REASON_WORKERS_REFUSED,
                format!(
                    "{}; fewer than {} remain, so none runs; tried again within a minute",
                    describe_refusals(observed.refused),
                    least_workers_named(&job.spec)
                ),
                generation,
                now,
            ),
            0,
        ),
        Err(err) => (
            condition(
                previous,
                CONDITION_SCHEDULABLE,
                false,
                match err {
                    MeshError::NotEnoughCapacity { .. } | MeshError::NotEnoughNodes { .. } => {
                        "InsufficientCapacity"
                    }
                    _ => "InvalidRequest",
                },
                {
                    // A range no mesh can have says which field sets it.
                    let mut message = match (err, job.spec.gang_problem()) {
                        (MeshError::BadRange { .. }, Some(problem)) => problem,
                        _ => err.to_string(),
                    };
                    if !status.avoided_nodes.is_empty() {
                        message += &format!(
                            "; avoiding for now: {}",
                            status
                                .avoided_nodes
                                .iter()
                                .map(|a| format!("{} ({})", a.node, a.reason))
                                .collect::<Vec<_>>()
                                .join(", ")
                        );
                    }
                    if !observed.unreadable_nodes.is_empty() {
                        // The first few by name: a condition is read by people.
                        const NAMED: usize = 5;
                        let named = &observed.unreadable_nodes
                            [..observed.unreadable_nodes.len().min(NAMED)];
                        let more = observed.unreadable_nodes.len() - named.len();
                        message += &format!(
                            "; {} nodes cannot be read and take no worker: {}{}",
                            observed.unreadable_nodes.len(),
                            named.join("; "),
                            if more > 0 {
                                format!("; and {more} more")
                            } else {
                                String::new()
                            }
                        );
                    }
                    message
                },
                generation,
                now,
            ),
            0,
        ),
    };

    // A pod being deleted is no worker of the job any more, though it may say
    // Running for long (on a node that is lost, nothing confirms its end
    // until the node comes back, and the job trains without it meanwhile),
    // and one that ended as it was deleted neither failed nor finished.
    let count = |p: &str| {
        observed
            .pods
            .iter()
            .filter(|pod| phase_of(pod) == p && pod.metadata.deletion_timestamp.is_none())
            .count() as i32
    };
    let (running, succeeded, failed) = (count("Running"), count("Succeeded"), count("Failed"));
    status.workers_desired = desired;
    status.workers_ready = running;
    status.workers_ready_summary = Some(format!("{running}/{desired}"));

    let was_running = matches!(
        previous.map(|p| p.phase),
        Some(Phase::Running | Phase::Rescaling)
    );
    status.phase = if job.spec.suspend {
        Phase::Suspended
    } else if observed.mesh.is_err() {
        Phase::Pending
    } else if running == desired {
        Phase::Running
    } else if was_running {
        Phase::Rescaling
    } else {
        Phase::Starting
    };
    let ready = condition(
        previous,
        CONDITION_READY,
        desired > 0 && running == desired,
        if failed > 0 {
            "WorkerFailed"
        } else if running == desired && desired > 0 {
            "AllWorkersRunning"
        } else {
            "WaitingForWorkers"
        },
        format!("{running} of {desired} workers running, {failed} failed, {succeeded} succeeded"),
        generation,
        now,
    );
    status.conditions = vec![schedulable, ready];
    progress_figures(&mut status, now);
    if let Some(stalled) = stalled_condition(job, &status, previous, now) {
        status.conditions.push(stalled);
    }
    status
}

/// Seconds from `from` to `to`.
pub(crate) fn seconds(from: &Time, to: &Time) -> i64 {
    to.0.as_second() - from.0.as_second()
}

/// A time a worker wrote, as the operator may write it back: no later than
/// `now` (a worker's clock may run ahead; a far-future time is refused by
/// the schema once in a field the operator writes).
fn no_later_than(time: &Time, now: &Time) -> Time {
    if time.0 > now.0 {
        now.clone()
    } else {
        time.clone()
    }
}

/// What the operator derives from its workers' reports: the time of the
/// first step and the time to it, the last recovery, and goodput. Each
/// depends on the reports alone (and on `now` only for a worker time ahead
/// of it), so the status stays as it is between them: a status that changed
/// with every reconcile would be written, and reconciled again, for ever.
pub fn progress_figures(status: &mut TrainingJobStatus, now: &Time) {
    let Some(first) = status.epoch_first_step.clone() else {
        return;
    };
    // Within the job's life as the operator knows it: no earlier than its
    // start, no later than now (a time outside the schema's years would
    // fail every status write once in a field the operator writes).
    let first_time = no_later_than(&first.time, now);
    let first_time = match &status.start_time {
        Some(start) if first_time.0 < start.0 => start.clone(),
        _ => first_time,
    };
    // The job's first step (step 1; a job that trained before its workers
    // reported it, under an older weft, has none to tell).
    if status.first_step_time.is_none() && first.step <= 1 {
        status.time_to_first_step_seconds = status
            .start_time
            .as_ref()
            .map(|start| seconds(start, &first_time).max(0));
        status.first_step_time = Some(first_time.clone());
    }
    // The first step of the epoch the operator published last, after a
    // change past the job's first step: how long that change (or resume)
    // kept the job from training. Told once per epoch.
    let recorded = status
        .last_recovery
        .as_ref()
        .is_some_and(|r| r.mesh_epoch == first.mesh_epoch);
    let past_the_start = |changed: &Time| match &status.first_step_time {
        Some(first_step) => changed.0 > first_step.0,
        None => first.step > 1,
    };
    if let Some(changed) = status.last_rescale_time.clone()
        && first.mesh_epoch == status.mesh_epoch
        && !recorded
        && past_the_start(&changed)
        && seconds(&changed, &first_time) >= 0
    {
        // The fault was recorded with the change it caused (never after).
        let from_fault_seconds = status
            .last_fault_time
            .as_ref()
            .filter(|fault| fault.0 <= changed.0)
            .map(|fault| seconds(fault, &first_time));
        status.last_recovery = Some(weft_crds::Recovery {
            mesh_epoch: first.mesh_epoch,
            seconds: seconds(&changed, &first_time),
            from_fault_seconds,
        });
    }
    // As of the last reported step, by its worker's clock (a skewed one
    // only skews the figure, which stays within 0 and 1).
    status.goodput = match (
        &status.start_time,
        &status.last_step_time,
        status.step_seconds,
    ) {
        (Some(start), Some(last), Some(step_s)) if status.step > 0 => {
            // Times are whole seconds: a first step within the start's
            // second counts one.
            let wall = seconds(start, last).max(1);
            Some((status.step as f64 * step_s / wall as f64).clamp(0.0, 1.0))
        }
        _ => status.goodput,
    };
}

/// The `Stalled` condition of a job that sets `elasticity.stallTimeoutSeconds`
/// and should be training (Running: all its workers run; while it waits for
/// workers, Rescaling or Starting, `WorkersReady` says why): true once no
/// step was reported for that long since [`stall_clock`].
fn stalled_condition(
    job: &TrainingJob,
    status: &TrainingJobStatus,
    previous: Option<&TrainingJobStatus>,
    now: &Time,
) -> Option<Condition> {
    let timeout = job.spec.stall_timeout_s()?;
    if status.phase != Phase::Running {
        return None;
    }
    let since = stall_clock(status, now)?;
    let stalled = seconds(&since, now) >= timeout;
    // Nothing in it moves with `now` (see `progress_figures`).
    let since_text = serde_json::to_value(&since)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
    let message = match (&status.last_step_time, stalled) {
        (Some(_), true) => format!(
            "no training step reported since {since_text}, for elasticity.stallTimeoutSeconds ({timeout} s) or more; the last was step {}",
            status.step
        ),
        (None, true) => format!(
            "no training step reported since {since_text}, when the workers were last started, changed or all ready, for elasticity.stallTimeoutSeconds ({timeout} s) or more"
        ),
        (_, false) => format!(
            "steps are awaited within elasticity.stallTimeoutSeconds ({timeout} s) of the last step, membership change, start or the workers all being ready"
        ),
    };
    Some(condition(
        previous,
        CONDITION_STALLED,
        stalled,
        if stalled {
            "NoStepReported"
        } else {
            "Training"
        },
        message,
        job.metadata.generation,
        now,
    ))
}

/// How long until a training job that is not stalled yet would be, given
/// no step: when its next reconcile is due to say so.
pub fn until_stalled(
    job: &TrainingJob,
    status: &TrainingJobStatus,
    now: &Time,
) -> Option<std::time::Duration> {
    let timeout = job.spec.stall_timeout_s()?;
    if status.phase != Phase::Running {
        return None;
    }
    let left = timeout - seconds(&stall_clock(status, now)?, now);
    (left > 0).then(|| std::time::Duration::from_secs(left as u64))
}

/// Since when a running job's steps are awaited: the latest of its last
/// reported step (no later than `now`), its last membership change, its
/// start, and when all its workers last became ready (an image pull or a
/// slow scheduler is not a stall).
pub fn stall_clock(status: &TrainingJobStatus, now: &Time) -> Option<Time> {
    let ready = find_condition(status, CONDITION_READY)
        .filter(|c| c.status == "True")
        .map(|c| &c.last_transition_time);
    [
        status
            .last_step_time
            .as_ref()
            .map(|t| no_later_than(t, now)),
        status.last_rescale_time.clone(),
        status.start_time.clone(),
        ready.cloned(),
    ]
    .into_iter()
    .flatten()
    .max_by_key(|t| t.0.as_second())
}

/// How a job ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Succeeded { message: String },
    Failed { reason: String, message: String },
}

/// The status of a job that has ended: its phase, completion time and the
/// `Complete` or `Failed` condition. Idempotent: the completion time and the
/// condition's transition time stay those of the first call.
pub fn finished_status(job: &TrainingJob, outcome: &Outcome, now: &Time) -> TrainingJobStatus {
    let previous = job.status.as_ref();
    let generation = job.metadata.generation;
    let mut status = previous.cloned().unwrap_or_default();
    status.observed_generation = generation;
    status.workers_ready = 0;
    status.workers_desired = 0;
    status.workers_ready_summary = Some("0/0".to_string());
    if status.completion_time.is_none() {
        status.completion_time = Some(now.clone());
    }
    let (phase, type_, reason, message) = match outcome {
        Outcome::Succeeded { message } => (
            Phase::Succeeded,
            CONDITION_COMPLETE,
            "TrainingFinished",
            message,
        ),
        Outcome::Failed { reason, message } => {
            (Phase::Failed, CONDITION_FAILED, reason.as_str(), message)
        }
    };
    status.phase = phase;
    let done = condition(
        previous,
        type_,
        true,
        reason,
        message.clone(),
        generation,
        now,
    );
    // No worker runs once a job has ended, whatever the last look said.
    let stopped = condition(
        previous,
        CONDITION_READY,
        false,
        "JobEnded",
        "the job has ended: no worker runs".to_string(),
        generation,
        now,
    );
    // Nor is an ended job stalled.
    status
        .conditions
        .retain(|c| c.type_ != type_ && c.type_ != CONDITION_READY && c.type_ != CONDITION_STALLED);
    status.conditions.push(stopped);
    status.conditions.push(done);
    status
}

/// The fewest workers a job runs with, and what sets that number.
pub(crate) fn least_workers_named(spec: &weft_crds::TrainingJobSpec) -> String {
    let least = spec.least_workers();
    if least > spec.workers_asked().0 {
        format!("the {least} workers parallelism.cpDegree needs")
    } else {
        format!("workers.min ({least})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::at;
    use weft_crds::TrainingJobSpec;
    use weft_planner::cluster::parse_cluster;
    use weft_planner::mesh::{MeshNode, MeshRequest, plan_mesh};

    fn job(suspend: bool) -> TrainingJob {
        let mut job = TrainingJob::new(
            "llm",
            TrainingJobSpec {
                suspend,
                ..TrainingJobSpec::new("weft-trainer:dev", 2, 2)
            },
        );
        job.metadata.generation = Some(3);
        job
    }

    fn mesh(nodes: &str, min: u32) -> Result<MeshPlan, MeshError> {
        let nodes = MeshNode::all_free(&parse_cluster(nodes).unwrap());
        plan_mesh(
            &MeshRequest {
                job: "llm".into(),
                min_workers: min,
                max_workers: 2,
                gpus_per_worker: 8,
                epoch: 7,
            },
            &nodes,
            &[],
        )
    }

    /// What a reconcile saw: `mesh` planned, `pods`, at `now`, nothing
    /// refused or unreadable.
    fn observed<'a>(mesh: &'a MeshPlan, pods: &'a [Pod], now: Time) -> Observed<'a> {
        Observed {
            mesh: Ok(mesh),
            pods,
            now,
            refused: &[],
            unreadable_nodes: &[],
        }
    }

    /// A worker in `phase`.
    fn pod(phase: &str) -> Pod {
        crate::testing::pod("llm-worker-0", "n0", 8, phase)
    }

    #[test]
    fn phases_follow_the_workers() {
        let m = mesh("2x8", 2).unwrap();
        let cases = [
            (vec![], Phase::Starting),
            (vec![pod("Running"), pod("Pending")], Phase::Starting),
            (vec![pod("Running"), pod("Running")], Phase::Running),
            (vec![pod("Running"), pod("Failed")], Phase::Starting),
        ];
        for (pods, phase) in cases {
            let observed = Observed {
                mesh: Ok(&m),
                pods: &pods,
                now: at(100),
                refused: &[],
                unreadable_nodes: &[],
            };
            let status = compute_status(&job(false), &observed);
            assert_eq!(
                status.phase,
                phase,
                "{:?}",
                pods.iter().map(phase_of).collect::<Vec<_>>()
            );
            assert_eq!(status.mesh_epoch, 7);
            assert_eq!(status.observed_generation, Some(3));
        }
        let both = [pod("Running"), pod("Running")];
        let observed = observed(&m, &both, at(100));
        assert_eq!(
            compute_status(&job(true), &observed).phase,
            Phase::Suspended
        );
        let status = compute_status(&job(false), &observed);
        assert_eq!(status.workers_ready_summary.as_deref(), Some("2/2"));
    }

    #[test]
    fn a_job_that_cannot_fit_is_pending_and_says_what_it_needs() {
        let err = mesh("1x8", 2).unwrap_err();
        let observed = Observed {
            mesh: Err(&err),
            pods: &[],
            now: at(100),
            refused: &[],
            unreadable_nodes: &[],
        };
        let status = compute_status(&job(false), &observed);
        assert_eq!(status.phase, Phase::Pending);
        let schedulable = find_condition(&status, CONDITION_SCHEDULABLE).unwrap();
        assert_eq!(schedulable.status, "False");
        assert_eq!(schedulable.reason, "InsufficientCapacity");
        assert!(
            schedulable
                .message
                .contains("needs 2 workers of 8 GPUs (16 GPUs)"),
            "{}",
            schedulable.message
        );
        assert!(
            schedulable
                .message
                .contains("can take 1 such workers (8 GPUs)"),
            "{}",
            schedulable.message
        );
    }

    #[test]
    fn a_missing_checkpoint_claim_keeps_the_job_pending_and_names_the_claim() {
        let mut j = job(false);
        j.metadata.namespace = Some("team".into());
        let status = missing_claim_status(&j, &JobClaim::Checkpoint("ckpt".into()), &at(0));
        assert_eq!(status.phase, Phase::Pending);
        assert_eq!(status.observed_generation, Some(3));
        assert_eq!((status.workers_desired, status.workers_ready), (0, 0));
        let c = find_condition(&status, CONDITION_SCHEDULABLE).unwrap();
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", REASON_CLAIM_NOT_FOUND)
        );
        assert!(
            c.message
                .contains("PersistentVolumeClaim \"ckpt\" not found in namespace \"team\""),
            "{}",
            c.message
        );
        assert!(find_condition(&status, CONDITION_READY).is_some());
        // A claim of spec.volumes, by its index.
        j.spec.volumes = vec![weft_crds::VolumeMountSpec {
            claim_name: "models".into(),
            mount_path: "/models".into(),
            read_only: true,
        }];
        j.spec.checkpoint.claim_name = Some("ckpt".into());
        let claims = JobClaim::of(&j);
        assert_eq!(
            claims,
            [
                JobClaim::Checkpoint("ckpt".into()),
                JobClaim::Volume(0, "models".into())
            ]
        );
        let status = missing_claim_status(&j, &claims[1], &at(0));
        let c = find_condition(&status, CONDITION_SCHEDULABLE).unwrap();
        assert_eq!(c.reason, REASON_VOLUME_CLAIM_NOT_FOUND);
        assert!(
            c.message
                .starts_with("volumes[0].claimName: PersistentVolumeClaim \"models\" not found"),
            "{}",
            c.message
        );
    }

    #[test]
    fn transition_times_hold_while_a_condition_holds() {
        let m = mesh("2x8", 2).unwrap();
        let running = [pod("Running"), pod("Running")];
        let mut j = job(false);
        j.status = Some(compute_status(
            &j,
            &Observed {
                mesh: Ok(&m),
                pods: &running,
                now: at(100),
                refused: &[],
                unreadable_nodes: &[],
            },
        ));
        let later = compute_status(
            &j,
            &Observed {
                mesh: Ok(&m),
                pods: &running,
                now: at(500),
                refused: &[],
                unreadable_nodes: &[],
            },
        );
        let ready = |s: &TrainingJobStatus| find_condition(s, CONDITION_READY).unwrap().clone();
        assert_eq!(ready(&later).last_transition_time, at(100));
        let one_failed = [pod("Running"), pod("Failed")];
        let failed = compute_status(
            &j,
            &Observed {
                mesh: Ok(&m),
                pods: &one_failed,
                now: at(900),
                refused: &[],
                unreadable_nodes: &[],
            },
        );
        assert_eq!(ready(&failed).status, "False");
        assert_eq!(ready(&failed).last_transition_time, at(900));
        assert_eq!(ready(&failed).reason, "WorkerFailed");
    }

    /// A job stored before the admission rule whose static rings need more
    /// workers than workers.max waits, Pending, naming the field (it runs
    /// once cpDegree or workers.max is changed).
    #[test]
    fn a_static_degree_past_workers_max_is_pending_and_named() {
        let mut j = job(false);
        j.spec.parallelism.cp_degree = Some(24);
        let err = mesh("4x8", j.spec.least_workers()).unwrap_err();
        let observed = Observed {
            mesh: Err(&err),
            pods: &[],
            now: at(100),
            refused: &[],
            unreadable_nodes: &[],
        };
        let status = compute_status(&j, &observed);
        assert_eq!(status.phase, Phase::Pending);
        let schedulable = find_condition(&status, CONDITION_SCHEDULABLE).unwrap();
        assert_eq!(schedulable.reason, "InvalidRequest");
        assert_eq!(
            schedulable.message,
            "parallelism.cpDegree 24 needs 3 workers of 8 GPUs, more than workers.max (2)"
        );
    }

    #[test]
    fn a_job_that_ran_is_rescaling_while_its_new_workers_come_up() {
        let m = mesh("2x8", 2).unwrap();
        let mut j = job(false);
        j.status = Some(TrainingJobStatus {
            phase: Phase::Running,
            ..Default::default()
        });
        let pods = [pod("Running"), pod("Pending")];
        let observed = observed(&m, &pods, at(100));
        assert_eq!(compute_status(&j, &observed).phase, Phase::Rescaling);
    }

    #[test]
    fn a_pod_being_deleted_is_not_a_running_worker() {
        // A worker on a lost node: deleted, but still Running by its last
        // report, for as long as its node stays away. The new mesh's two
        // workers run: the job runs.
        let m = mesh("2x8", 2).unwrap();
        let mut j = job(false);
        j.status = Some(TrainingJobStatus {
            phase: Phase::Rescaling,
            ..Default::default()
        });
        let mut lost = pod("Running");
        lost.metadata.deletion_timestamp = Some(at(90));
        let pods = [pod("Running"), pod("Running"), lost];
        let observed = observed(&m, &pods, at(100));
        let status = compute_status(&j, &observed);
        assert_eq!(status.phase, Phase::Running);
        assert_eq!(status.workers_ready, 2);
        assert_eq!(status.workers_ready_summary.as_deref(), Some("2/2"));
    }

    #[test]
    fn a_finished_job_keeps_its_first_completion_time() {
        let mut j = job(false);
        let outcome = Outcome::Failed {
            reason: "RestartLimitExceeded".into(),
            message: "6 worker failures, limit 5".into(),
        };
        j.status = Some(finished_status(&j, &outcome, &at(100)));
        let again = finished_status(&j, &outcome, &at(200));
        assert_eq!(again.phase, Phase::Failed);
        assert_eq!(again.completion_time, Some(at(100)));
        let failed = find_condition(&again, CONDITION_FAILED).unwrap();
        assert_eq!(
            (failed.status.as_str(), failed.reason.as_str()),
            ("True", "RestartLimitExceeded")
        );
        assert_eq!(failed.last_transition_time, at(100));
        assert_eq!(again.workers_ready_summary.as_deref(), Some("0/0"));
        // No condition still says workers run.
        let ready = find_condition(&again, CONDITION_READY).unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "JobEnded")
        );
    }

    #[test]
    fn refused_workers_and_unreadable_nodes_are_named() {
        let m = mesh("2x8", 2).unwrap();
        let pods = [pod("Running"), pod("Running")];
        let refused = [(
            "llm-worker-2".to_string(),
            "exceeded quota: pods=3".to_string(),
        )];
        let status = compute_status(
            &job(false),
            &Observed {
                mesh: Ok(&m),
                pods: &pods,
                now: at(100),
                refused: &refused,
                unreadable_nodes: &[],
            },
        );
        assert_eq!(status.phase, Phase::Running, "it runs with what it has");
        let schedulable = find_condition(&status, CONDITION_SCHEDULABLE).unwrap();
        assert_eq!(schedulable.reason, REASON_WORKERS_REFUSED);
        assert!(
            schedulable
                .message
                .contains("1 planned workers could not be created (llm-worker-2: exceeded quota: pods=3); running with 2"),
            "{}",
            schedulable.message
        );
        let err = mesh("1x8", 2).unwrap_err();
        let unreadable = ["node gpu-7: GPU product \"X1\" is unknown".to_string()];
        let status = compute_status(
            &job(false),
            &Observed {
                mesh: Err(&err),
                pods: &[],
                now: at(100),
                refused: &refused,
                unreadable_nodes: &unreadable,
            },
        );
        let below = find_condition(&status, CONDITION_SCHEDULABLE).unwrap();
        assert_eq!(below.reason, REASON_WORKERS_REFUSED);
        assert!(
            below.message.contains(
                "could not be created (llm-worker-2: exceeded quota: pods=3); fewer than workers.min"
            ),
            "{}",
            below.message
        );
        let status = compute_status(
            &job(false),
            &Observed {
                mesh: Err(&err),
                pods: &[],
                now: at(100),
                refused: &[],
                unreadable_nodes: &unreadable,
            },
        );
        let message = &find_condition(&status, CONDITION_SCHEDULABLE)
            .unwrap()
            .message;
        assert!(
            message.contains("1 nodes cannot be read and take no worker: node gpu-7"),
            "{message}"
        );
    }

    #[test]
    fn workers_the_scheduler_cannot_place_make_the_job_say_why() {
        use k8s_openapi::api::core::v1::PodCondition;
        let m = mesh("2x8", 2).unwrap();
        let mut stuck = pod("Pending");
        stuck.metadata.name = Some("w-1".into());
        if let Some(status) = stuck.status.as_mut() {
            status.conditions = Some(vec![PodCondition {
                type_: "PodScheduled".into(),
                status: "False".into(),
                reason: Some("Unschedulable".into()),
                message: Some("0/2 nodes are available: 2 Insufficient memory.".into()),
                ..Default::default()
            }]);
        }
        let pods = [pod("Running"), stuck];
        let observed = observed(&m, &pods, at(100));
        let status = compute_status(&job(false), &observed);
        assert_eq!(status.phase, Phase::Starting);
        let schedulable = find_condition(&status, CONDITION_SCHEDULABLE).unwrap();
        assert_eq!(schedulable.status, "False");
        assert_eq!(schedulable.reason, "WorkersUnschedulable");
        assert_eq!(
            schedulable.message,
            "1 of 2 workers cannot be scheduled: 0/2 nodes are available: 2 Insufficient memory."
        );
        // A pod merely waiting (no word from the scheduler yet) is not stuck.
        let waiting = [pod("Running"), pod("Pending")];
        assert!(unschedulable_pods(&waiting).is_empty());
    }

    fn first_step(mesh_epoch: i64, step: i64, time: i64) -> Option<weft_crds::EpochFirstStep> {
        Some(weft_crds::EpochFirstStep {
            mesh_epoch,
            step,
            time: at(time),
        })
    }

    /// The figures a job has once it trains: the time to its first step,
    /// the recovery of a membership change (never of the start), goodput;
    /// none moves with time alone.
    #[test]
    fn the_workers_reports_give_the_time_to_first_step_recovery_and_goodput() {
        let now = at(10_000);
        let mut status = TrainingJobStatus {
            start_time: Some(at(100)),
            mesh_epoch: 1,
            // The first epoch is published as a change too.
            last_rescale_time: Some(at(100)),
            ..Default::default()
        };
        // No step yet: nothing.
        progress_figures(&mut status, &now);
        assert_eq!(status.first_step_time, None);
        assert_eq!(status.goodput, None);
        // The first step of epoch 1, 30 s after the start: the start, no
        // recovery, however often it is looked at.
        status.epoch_first_step = first_step(1, 1, 130);
        status.step = 10;
        status.step_seconds = Some(2.0);
        status.last_step_time = Some(at(150));
        for _ in 0..2 {
            progress_figures(&mut status, &now);
            assert_eq!(status.first_step_time, Some(at(130)));
            assert_eq!(status.time_to_first_step_seconds, Some(30));
            assert_eq!(status.last_recovery, None);
            // 10 steps of 2 s in the 50 s to the last step.
            assert_eq!(status.goodput, Some(0.4));
        }
        // A node NotReady at 178 (its kubelet silent since 138), epoch 2
        // published at 200; until its first step, no recovery is told (the
        // reports are still epoch 1's).
        status.mesh_epoch = 2;
        status.last_rescale_time = Some(at(200));
        status.last_fault_time = Some(at(178));
        progress_figures(&mut status, &now);
        assert_eq!(status.last_recovery, None);
        // Resumed from the checkpoint of step 8: the steps past it are lost.
        status.epoch_first_step = first_step(2, 9, 212);
        status.step = 9;
        status.last_step_time = Some(at(220));
        progress_figures(&mut status, &now);
        let recovery = status.last_recovery.clone().unwrap();
        assert_eq!((recovery.mesh_epoch, recovery.seconds), (2, 12));
        assert_eq!(recovery.from_fault_seconds, Some(34));
        assert_eq!(status.goodput, Some(9.0 * 2.0 / 120.0));
        // Told once: a later report of the same epoch changes nothing, and
        // the first step and time to it stay those of the start.
        status.epoch_first_step = first_step(2, 9, 230);
        progress_figures(&mut status, &now);
        assert_eq!(status.last_recovery.as_ref().unwrap().seconds, 12);
        assert_eq!(status.time_to_first_step_seconds, Some(30));
        // Goodput never passes 1 (step times reported long after the start
        // of a job that ran before).
        status.step_seconds = Some(1000.0);
        progress_figures(&mut status, &now);
        assert_eq!(status.goodput, Some(1.0));
        // Growth at 300 (no fault): measured from its publication alone.
        status.mesh_epoch = 3;
        status.last_rescale_time = Some(at(300));
        status.last_fault_time = None;
        status.epoch_first_step = first_step(3, 20, 304);
        progress_figures(&mut status, &now);
        let recovery = status.last_recovery.clone().unwrap();
        assert_eq!((recovery.mesh_epoch, recovery.seconds), (3, 4));
        assert_eq!(recovery.from_fault_seconds, None);
    }

    /// What a worker's clock says is no later than the operator's now once
    /// the operator writes it (a far-future time would be refused by the
    /// schema and block every status write); a job that trained before its
    /// workers told their first step has no time to it.
    #[test]
    fn worker_times_ahead_and_jobs_that_trained_before_are_told_as_they_can_be() {
        let now = at(1_000);
        let mut status = TrainingJobStatus {
            start_time: Some(at(100)),
            mesh_epoch: 1,
            step: 1,
            step_seconds: Some(1.0),
            last_step_time: Some(at(9_999_999)),
            epoch_first_step: first_step(1, 1, 9_999_999),
            ..Default::default()
        };
        progress_figures(&mut status, &now);
        assert_eq!(status.first_step_time, Some(now.clone()));
        assert_eq!(status.time_to_first_step_seconds, Some(900));
        // By the worker's clock: skewed, within 0 and 1, and the same on
        // every look.
        let goodput = status.goodput.unwrap();
        assert!((0.0..1e-6).contains(&goodput), "{goodput}");
        progress_figures(&mut status, &at(2_000));
        assert_eq!(status.goodput, Some(goodput));
        // A time before the job's start (the schema's lowest year) is its
        // start.
        let mut behind = TrainingJobStatus {
            start_time: Some(at(100)),
            mesh_epoch: 1,
            epoch_first_step: Some(weft_crds::EpochFirstStep {
                mesh_epoch: 1,
                step: 0,
                time: serde_json::from_value(serde_json::json!("0000-01-01T00:00:00+23:59"))
                    .unwrap(),
            }),
            ..Default::default()
        };
        progress_figures(&mut behind, &now);
        assert_eq!(behind.first_step_time, Some(at(100)));
        assert_eq!(behind.time_to_first_step_seconds, Some(0));

        let mut older = TrainingJobStatus {
            start_time: Some(at(100)),
            mesh_epoch: 4,
            last_rescale_time: Some(at(500)),
            step: 300,
            epoch_first_step: first_step(4, 290, 530),
            ..Default::default()
        };
        progress_figures(&mut older, &now);
        assert_eq!(older.first_step_time, None);
        assert_eq!(older.time_to_first_step_seconds, None);
        assert_eq!(older.last_recovery.map(|r| r.seconds), Some(30));
    }

    /// `Stalled`: only where the job sets a timeout and should be training;
    /// true once no step came for that long since the last step, the last
    /// membership change, the start or the workers all being ready; the
    /// reconcile comes back when it would turn true; gone once the job is
    /// suspended or ended.
    #[test]
    fn a_job_with_no_step_for_its_timeout_is_stalled() {
        let m = mesh("2x8", 2).unwrap();
        let running = [pod("Running"), pod("Running")];
        let status_at = |job: &TrainingJob, now: i64| {
            compute_status(
                job,
                &Observed {
                    mesh: Ok(&m),
                    pods: &running,
                    now: at(now),
                    refused: &[],
                    unreadable_nodes: &[],
                },
            )
        };
        let mut job = job(false);
        job.status = Some(TrainingJobStatus {
            phase: Phase::Running,
            start_time: Some(at(100)),
            ..Default::default()
        });
        // No timeout: no condition.
        let status = status_at(&job, 10_000);
        assert!(find_condition(&status, CONDITION_STALLED).is_none());
        assert_eq!(until_stalled(&job, &status, &at(10_000)), None);

        job.spec.elasticity.stall_timeout_seconds = Some(600);
        // The workers are all ready at 250 (an image pull took a while).
        let ready = status_at(&job, 250);
        job.status = Some(ready);
        let status = status_at(&job, 400);
        let stalled = find_condition(&status, CONDITION_STALLED).unwrap();
        assert_eq!(
            (stalled.status.as_str(), stalled.reason.as_str()),
            ("False", "Training")
        );
        assert_eq!(
            until_stalled(&job, &status, &at(400)),
            Some(std::time::Duration::from_secs(450))
        );
        let status = status_at(&job, 850);
        let stalled = find_condition(&status, CONDITION_STALLED).unwrap();
        assert_eq!(
            (stalled.status.as_str(), stalled.reason.as_str()),
            ("True", "NoStepReported")
        );
        assert_eq!(
            stalled.message,
            "no training step reported since 1970-01-01T00:04:10Z, when the workers were last started, changed or all ready, for elasticity.stallTimeoutSeconds (600 s) or more"
        );
        assert_eq!(stalled.last_transition_time, at(850));
        assert_eq!(until_stalled(&job, &status, &at(850)), None);
        // Nothing in the status moves with time alone: the next reconcile
        // writes nothing new.
        job.status = Some(status.clone());
        assert_eq!(status_at(&job, 900), status);
        // A step at 880 clears it; the clock runs from that step.
        let mut reported = status.clone();
        reported.step = 40;
        reported.last_step_time = Some(at(880));
        job.status = Some(reported);
        let status = status_at(&job, 900);
        assert_eq!(
            find_condition(&status, CONDITION_STALLED).unwrap().status,
            "False"
        );
        job.status = Some(status);
        let status = status_at(&job, 1500);
        let stalled = find_condition(&status, CONDITION_STALLED).unwrap();
        assert_eq!(stalled.status, "True");
        assert_eq!(
            stalled.message,
            "no training step reported since 1970-01-01T00:14:40Z, for elasticity.stallTimeoutSeconds (600 s) or more; the last was step 40"
        );
        // An ended job is not stalled.
        let mut ended = job.clone();
        ended.status = Some(status.clone());
        let done = finished_status(
            &ended,
            &Outcome::Succeeded {
                message: "done".into(),
            },
            &at(1600),
        );
        assert!(find_condition(&done, CONDITION_STALLED).is_none());
        // A membership change restarts the clock.
        let mut changed = status.clone();
        changed.last_rescale_time = Some(at(1490));
        job.status = Some(changed);
        assert_eq!(
            find_condition(&status_at(&job, 1500), CONDITION_STALLED)
                .unwrap()
                .status,
            "False"
        );
        // A worker clock far ahead counts as now: no stall while it says so.
        let mut ahead = status.clone();
        ahead.last_step_time = Some(at(9_999_999));
        job.status = Some(ahead);
        assert_eq!(
            find_condition(&status_at(&job, 5000), CONDITION_STALLED)
                .unwrap()
                .status,
            "False"
        );
        // A suspended job is not stalled.
        job.spec.suspend = true;
        assert!(find_condition(&status_at(&job, 5000), CONDITION_STALLED).is_none());
    }
}
