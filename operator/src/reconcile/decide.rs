//! The reconcile's decisions, pure: from what was observed of a job (and of
//! the cluster) and the time, what to delete, create and apply, the status
//! to write and the events to tell once it is written. Nothing here calls
//! the API server, so every case is a row of a table test.
//!
//! A reconcile decides in up to three steps:
//! - [`settle`]: the job's life (ended, invalid, failures counted, complete,
//!   suspended, a volume claim missing, nodes avoided, a refusal backoff).
//!   Facts that must be on record before anything acts on them (a failure
//!   counted, a node avoided) are written by a reconcile of their own, which
//!   places nothing (it deletes only the failed pods it counted and workers
//!   to place again) and runs again at once.
//! - [`place`]: the mesh planned on the free GPUs and the workers it needs
//!   (taken under the planning turn, see `Planning`).
//! - [`conclude`]: once the workers were created (some perhaps refused by
//!   the API server), the mesh to publish, its epoch, and the status.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use weft_crds::{AVOID_NODE_SECONDS, Phase, TrainingJob, TrainingJobStatus};
use weft_planner::mesh::{ExistingWorker, MeshError, MeshNode, MeshPlan, MeshRequest, plan_mesh};

use crate::build::{BuildError, DesiredObjects, build, resolve_model};
use crate::controller::{
    MAX_EPOCH, NextEpoch, Published, REFUSAL_BACKOFF, contended_workers, live, made_for_epoch,
    members, mesh_inputs, next_epoch, recorded_epoch, terminal,
};
use crate::events::EventType;
use crate::inventory::{ClusterNode, InventoryError};
use crate::lifecycle::{
    avoided_nodes, finished_worker, growth_limit, new_failures, next_refusal_timeout,
    record_failures, refused_settings, restart_budget_exhausted,
};
use crate::status::{
    CONDITION_SCHEDULABLE, JobClaim, Observed, Outcome, compute_status, describe_refusals,
    find_condition, finished_status, least_workers_named, missing_claim_status, until_stalled,
};

/// How soon a reconcile that put a fact on record runs again to act on it.
pub const AT_ONCE: Duration = Duration::from_millis(100);

/// How often a suspended job is looked at without a change.
pub const SUSPENDED_LOOK: Duration = Duration::from_secs(60);

/// How often a job waiting for a volume claim looks for it.
pub const CLAIM_LOOK: Duration = Duration::from_secs(15);

/// How often a job is looked at when nothing else says sooner.
pub const IDLE_LOOK: Duration = Duration::from_secs(30);

/// What a reconcile saw of its job and of the cluster.
#[derive(Debug, Clone)]
pub struct Seen {
    /// The job as the API server holds it now.
    pub job: TrainingJob,
    /// The job's own pods (its controller is the job), listed afresh.
    pub pods: Vec<Pod>,
    /// The first of the job's volume claims that does not exist; looked up
    /// only while no worker lives (running workers keep theirs).
    pub missing_claim: Option<JobClaim>,
    /// Every node (the watch cache).
    pub nodes: Vec<Arc<Node>>,
    /// Every pod of the cluster (the watch cache), for the GPUs held.
    pub cluster_pods: Vec<Arc<Pod>>,
    /// The job's published mesh, as far as it is trusted.
    pub published: Published,
    /// How the trusted published mesh changed the membership
    /// ([`crate::build::ANNOTATION_MESH_CHANGE`]).
    pub published_change: Option<String>,
    /// When the fault behind that change began
    /// ([`crate::build::ANNOTATION_MESH_FAULT`]).
    pub published_fault: Option<Time>,
    /// How long ago this job's workers were refused below `workers.min`
    /// (the operator's memory; none after a restart).
    pub refused_ago: Option<Duration>,
    /// The W3C `traceparent` of this reconcile's span, when traces are
    /// exported: the mesh an epoch publishes carries it to the workers.
    pub trace_parent: Option<String>,
}

/// The job's values the reconcile works with, checked and converted once.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidJob {
    pub name: String,
    pub gpus_per_worker: u32,
    /// How long a worker the scheduler refuses waits before its node is
    /// avoided (at least 1 s).
    pub unschedulable_timeout_s: i64,
    /// The mesh epoch the status records.
    pub recorded_epoch: u64,
}

impl ValidJob {
    /// `job`'s values, or why the job cannot run (what the schema cannot
    /// check: the model's shape).
    pub fn read(job: &TrainingJob) -> Result<ValidJob, String> {
        resolve_model(&job.spec.model).map_err(|e| e.to_string())?;
        Ok(ValidJob {
            name: job.name_any(),
            gpus_per_worker: job.spec.gpus_per_worker(),
            unschedulable_timeout_s: job.spec.unschedulable_timeout_s(),
            recorded_epoch: recorded_epoch(job),
        })
    }
}

/// An event to publish about the job once the status is written.
#[derive(Debug, Clone, PartialEq)]
pub struct Tell {
    pub type_: EventType,
    pub reason: String,
    pub note: String,
}

impl Tell {
    pub(crate) fn warning(reason: &str, note: String) -> Tell {
        Tell {
            type_: EventType::Warning,
            reason: reason.to_string(),
            note,
        }
    }

    fn normal(reason: &str, note: String) -> Tell {
        Tell {
            type_: EventType::Normal,
            reason: reason.to_string(),
            note,
        }
    }
}

/// A worker pod to delete.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Deletion {
    pub pod: String,
    /// At once (no grace period): its node is gone, no kubelet will stop it.
    pub force: bool,
}

/// What the operator remembers of workers refused below `workers.min`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalMemory {
    Keep,
    /// Refused now: no worker is made again for [`REFUSAL_BACKOFF`].
    Remember,
    Forget,
}

/// What a reconcile does, in this order: apply the mesh, write the status
/// (one conditional write), tell the events, delete pods.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub delete: Vec<Deletion>,
    /// The mesh ConfigMap to publish (its workers exist).
    pub mesh: Option<ConfigMap>,
    /// `None`: the status is left as it is.
    pub status: Option<TrainingJobStatus>,
    pub events: Vec<Tell>,
    /// When to look again without a change; `None`: only on a change.
    pub requeue: Option<Duration>,
    pub refusals: RefusalMemory,
}

impl Decision {
    fn new(requeue: Option<Duration>) -> Decision {
        Decision {
            delete: Vec::new(),
            mesh: None,
            status: None,
            events: Vec::new(),
            requeue,
            refusals: RefusalMemory::Keep,
        }
    }
}

/// Every worker still running stopped (finished pods hold no GPUs and keep
/// their logs).
fn stop_all(pods: &[Pod]) -> Vec<Deletion> {
    pods.iter()
        .filter(|p| live(p))
        .map(|p| Deletion {
            pod: p.name_any(),
            force: false,
        })
        .collect()
}

/// The job ends: its final status, every worker stopped, and the events
/// `told_first` (which the status records) before the end's own.
fn finish(
    job: &TrainingJob,
    pods: &[Pod],
    outcome: Outcome,
    now: &Time,
    told_first: Vec<Tell>,
) -> Decision {
    let mut decision = Decision::new(None);
    decision.status = Some(finished_status(job, &outcome, now));
    decision.delete = stop_all(pods);
    decision.events = told_first;
    decision.events.push(match outcome {
        Outcome::Succeeded { message } => Tell::normal("Succeeded", message),
        Outcome::Failed { reason, message } => Tell::warning(&reason, message),
    });
    decision
}

/// What placement starts from once the job's life allows it.
#[derive(Debug, Clone)]
pub struct ToPlace {
    /// The job's values, checked.
    pub valid: ValidJob,
    /// The job's pods, without those placed again (contended).
    pub pods: Vec<Pod>,
    /// The contended workers' deletions.
    pub delete: Vec<Deletion>,
    /// The nodes as weft reads them, avoided ones unschedulable.
    pub nodes: Vec<ClusterNode>,
    /// Nodes that cannot be read, and why.
    pub unreadable: Vec<InventoryError>,
}

/// The first step: the job's life.
#[derive(Debug, Clone)]
pub enum Settle {
    /// Decided: nothing is placed in this reconcile.
    Decided(Box<Decision>),
    /// The job runs: place it.
    Place(ToPlace),
}

/// The job's life, from `seen` at `now`.
pub fn settle(seen: &Seen, now: &Time) -> Settle {
    let job = &seen.job;
    let previous_phase = job.status.as_ref().map(|s| s.phase);

    // An ended job keeps its workers stopped.
    if matches!(previous_phase, Some(Phase::Succeeded | Phase::Failed)) {
        let mut decision = Decision::new(None);
        decision.delete = stop_all(&seen.pods);
        return Settle::Decided(Box::new(decision));
    }

    let valid = match ValidJob::read(job) {
        Ok(valid) => valid,
        Err(message) => {
            let outcome = Outcome::Failed {
                reason: "InvalidSpec".to_string(),
                message,
            };
            return Settle::Decided(Box::new(finish(job, &seen.pods, outcome, now, Vec::new())));
        }
    };

    // Restart budget: each failed worker counted once, on record before
    // anything is deleted, so a restart of the operator neither loses nor
    // doubles it.
    let failures = new_failures(&job.status.clone().unwrap_or_default(), &seen.pods, now);
    if !failures.is_empty() {
        let mut status = job.status.clone().unwrap_or_default();
        record_failures(&mut status, &failures);
        let told: Vec<Tell> = failures
            .iter()
            .map(|failure| {
                Tell::warning(
                    "WorkerFailed",
                    format!(
                        "{}: {} (restart {} of {} allowed)",
                        failure.worker,
                        failure.reason,
                        status.restarts,
                        job.spec.elasticity.restart_limit
                    ),
                )
            })
            .collect();
        // A worker that finished ends the job, whatever another refused.
        let refused = refused_settings(&seen.pods)
            .filter(|_| finished_worker(&seen.pods).is_none())
            .map(|message| ("InvalidSpec", message));
        let exhausted =
            restart_budget_exhausted(job, &status).map(|message| ("RestartLimitExceeded", message));
        if let Some((reason, message)) = refused.or(exhausted) {
            let mut counted = job.clone();
            counted.status = Some(status);
            let outcome = Outcome::Failed {
                reason: reason.to_string(),
                message,
            };
            return Settle::Decided(Box::new(finish(&counted, &seen.pods, outcome, now, told)));
        }
        // Deleted once the count is written (a failed pod holds nothing,
        // but one still listed after it left `recentFailures` would be
        // counted again).
        let mut decision = Decision::new(Some(AT_ONCE));
        decision.status = Some(status);
        decision.events = told;
        decision.delete = failures
            .iter()
            .map(|failure| Deletion {
                pod: failure.worker.clone(),
                force: false,
            })
            .collect();
        return Settle::Decided(Box::new(decision));
    }

    if let Some(worker) = finished_worker(&seen.pods) {
        let outcome = Outcome::Succeeded {
            message: format!("worker {} finished training", worker.name_any()),
        };
        return Settle::Decided(Box::new(finish(job, &seen.pods, outcome, now, Vec::new())));
    }

    if job.spec.suspend {
        let mut decision = Decision::new(Some(SUSPENDED_LOOK));
        decision.delete = stop_all(&seen.pods);
        let mut status = job.status.clone().unwrap_or_default();
        status.phase = Phase::Suspended;
        // No worker runs: none stalls.
        status
            .conditions
            .retain(|c| c.type_ != crate::status::CONDITION_STALLED);
        status.workers_ready = 0;
        status.workers_ready_summary = Some(format!("0/{}", status.workers_desired));
        status.observed_generation = job.metadata.generation;
        decision.status = Some(status);
        if previous_phase != Some(Phase::Suspended) {
            decision.events.push(Tell::normal(
                "Suspended",
                format!("spec.suspend is true: {} workers stopped", seen.pods.len()),
            ));
        }
        return Settle::Decided(Box::new(decision));
    }

    // The volumes must exist before any worker is placed: a pod naming a
    // missing claim is refused on every node, which is not the nodes' fault.
    let any_live = seen.pods.iter().any(|p| !terminal(p));
    if let Some(claim) = seen.missing_claim.as_ref().filter(|_| !any_live) {
        let status = missing_claim_status(job, claim, now);
        let condition = find_condition(&status, CONDITION_SCHEDULABLE);
        let was_missing = job
            .status
            .as_ref()
            .and_then(|s| find_condition(s, CONDITION_SCHEDULABLE))
            .is_some_and(|c| Some(&c.message) == condition.map(|c| &c.message));
        let message = condition.map(|c| c.message.clone()).unwrap_or_default();
        let mut decision = Decision::new(Some(CLAIM_LOOK));
        decision.status = Some(status);
        if !was_missing {
            decision
                .events
                .push(Tell::warning(claim.missing_reason(), message));
        }
        return Settle::Decided(Box::new(decision));
    }

    let (mut nodes, unreadable) = crate::inventory::read_nodes(&seen.nodes);
    crate::inventory::fit_to_job(&mut nodes, &seen.nodes, &job.spec.scheduling);

    // Workers refused where another job's pods took the GPUs first: placed
    // again elsewhere, as if gone; their nodes are not to blame.
    let capacity: BTreeMap<String, u32> = nodes
        .iter()
        .map(|n| (n.node.name.clone(), n.node.gpus))
        .collect();
    let contended = contended_workers(&seen.pods, &seen.cluster_pods, &capacity);
    let (gone, pods): (Vec<Pod>, Vec<Pod>) = seen
        .pods
        .iter()
        .cloned()
        .partition(|p| contended.contains(&p.name_any()));
    let delete: Vec<Deletion> = gone
        .iter()
        .map(|p| Deletion {
            pod: p.name_any(),
            force: false,
        })
        .collect();

    // Nodes that will not take a worker: avoided for a while, on record
    // before the mesh leaves them, so a restart of the operator keeps them.
    let status = job.status.clone().unwrap_or_default();
    let avoided = avoided_nodes(&status, &pods, valid.unschedulable_timeout_s, now);
    if avoided != status.avoided_nodes {
        let mut decision = Decision::new(Some(AT_ONCE));
        decision.events = avoided
            .iter()
            .filter(|a| !status.avoided_nodes.iter().any(|b| b.node == a.node))
            .map(|node| {
                Tell::warning(
                    "NodeAvoided",
                    format!(
                        "node {}: {}; avoided for {AVOID_NODE_SECONDS} s",
                        node.node, node.reason
                    ),
                )
            })
            .collect();
        let mut status = status;
        status.avoided_nodes = avoided;
        decision.status = Some(status);
        decision.delete = delete;
        return Settle::Decided(Box::new(decision));
    }
    for node in nodes.iter_mut() {
        if status
            .avoided_nodes
            .iter()
            .any(|a| a.node == node.node.name)
        {
            node.schedulable = false;
        }
    }

    // Workers refused below `min` a moment ago: not made again yet.
    if let Some(ago) = seen.refused_ago {
        let left = REFUSAL_BACKOFF.saturating_sub(ago);
        if !left.is_zero() && pods.iter().all(|p| !live(p)) {
            let mut decision = Decision::new(Some(left + AT_ONCE));
            decision.delete = delete;
            return Settle::Decided(Box::new(decision));
        }
    }

    Settle::Place(ToPlace {
        valid,
        pods,
        delete,
        nodes,
        unreadable,
    })
}

/// The mesh planned and the workers it needs.
#[derive(Debug, Clone)]
pub struct Placement {
    pub request: MeshRequest,
    pub mesh_nodes: Vec<MeshNode>,
    pub planned: Result<MeshPlan, MeshError>,
    /// The planned mesh's epoch (`None` past the last).
    pub next: Option<NextEpoch>,
    /// How long the cooldown after the last membership change has left.
    pub cooldown_left: Option<Duration>,
    /// The live workers before this reconcile: (name, node).
    pub alive: BTreeSet<(String, String)>,
    /// The live workers made for the recorded epoch or before.
    pub made_for: BTreeSet<(String, String)>,
    /// The Service, account, role and binding to apply, and the mesh's pods.
    pub objects: Option<DesiredObjects>,
    /// Pods the mesh dropped, and ended ones.
    pub delete: Vec<Deletion>,
    /// Workers of the mesh that do not exist yet.
    pub create: Vec<Pod>,
}

/// The mesh of `placing`'s job on the nodes' free GPUs (every pod of the
/// cluster in `accounted` holds its GPUs) and what it needs created and
/// deleted.
pub fn place(
    seen: &Seen,
    placing: &ToPlace,
    accounted: &[Arc<Pod>],
    now: &Time,
) -> Result<Placement, BuildError> {
    let job = &seen.job;
    let valid = &placing.valid;
    let (mesh_nodes, existing) = mesh_inputs(&placing.nodes, accounted, &placing.pods);
    let (max_workers, cooldown_left) =
        growth_limit(job, job.status.as_ref(), existing.len() as u32, now);
    let request = MeshRequest {
        job: valid.name.clone(),
        min_workers: job.spec.least_workers(),
        max_workers,
        gpus_per_worker: valid.gpus_per_worker,
        epoch: valid.recorded_epoch.max(1),
    };
    let alive: BTreeSet<(String, String)> = existing
        .iter()
        .map(|w| (w.name.clone(), w.node.clone()))
        .collect();
    let made_for = made_for_epoch(&placing.pods, valid.recorded_epoch);
    let mut planned = plan_mesh(&request, &mesh_nodes, &existing);
    let next = epoch_of(seen, valid, &alive, &made_for, &planned);
    if let Ok(mesh) = planned.as_mut() {
        // The new workers are made for this epoch (their environment says it).
        mesh.epoch = next.as_ref().map_or(MAX_EPOCH, |e| e.epoch);
    }
    let mut placement = Placement {
        request,
        mesh_nodes,
        planned,
        next,
        cooldown_left,
        alive,
        made_for,
        objects: None,
        delete: Vec::new(),
        create: Vec::new(),
    };
    let Ok(mesh) = &placement.planned else {
        return Ok(placement);
    };
    let objects = build(job, mesh)?;
    // Surviving pods are left as they are (a pod's spec cannot change);
    // missing ones are created; ones the mesh dropped are deleted. A pod
    // bound to a node that no longer exists has no kubelet to stop it and
    // confirm: it is removed at once (as the pod garbage collector would, a
    // minute later), so the job does not wait on it.
    let wanted: BTreeSet<String> = objects.pods.iter().map(|p| p.name_any()).collect();
    let known_nodes: BTreeSet<&str> = seen
        .nodes
        .iter()
        .filter_map(|n| n.metadata.name.as_deref())
        .collect();
    placement.delete = placing
        .pods
        .iter()
        .filter(|p| !wanted.contains(&p.name_any()) || terminal(p))
        .map(|p| Deletion {
            pod: p.name_any(),
            force: p
                .spec
                .as_ref()
                .and_then(|s| s.node_name.as_deref())
                .is_some_and(|node| !known_nodes.contains(node)),
        })
        .collect();
    // A pod on its way out is not present: its name may be planned for a
    // new worker, which is made once it is gone.
    let present: BTreeSet<String> = placing
        .pods
        .iter()
        .filter(|p| live(p))
        .map(|p| p.name_any())
        .collect();
    placement.create = objects
        .pods
        .iter()
        .filter(|p| !present.contains(&p.name_any()))
        .cloned()
        .collect();
    placement.objects = Some(objects);
    Ok(placement)
}

/// The epoch of `planned` (see [`next_epoch`]); `None` without a mesh or
/// past the last epoch.
fn epoch_of(
    seen: &Seen,
    valid: &ValidJob,
    alive: &BTreeSet<(String, String)>,
    made_for: &BTreeSet<(String, String)>,
    planned: &Result<MeshPlan, MeshError>,
) -> Option<NextEpoch> {
    let mesh = planned.as_ref().ok()?;
    next_epoch(
        valid.recorded_epoch,
        &seen.published,
        alive,
        made_for,
        &members(mesh),
    )
}

/// What creating the missing workers came to.
#[derive(Debug, Clone, Default)]
pub struct Created {
    /// The pods made, as the API server returned them.
    pub made: Vec<Pod>,
    /// This job's pods found already there (made by an earlier reconcile
    /// the list did not show yet).
    pub found: Vec<Pod>,
    /// Workers the API server refused for good: (worker, why).
    pub refused: Vec<(String, String)>,
}

/// The last step: the mesh to publish with its epoch, the workers stopped
/// below `workers.min`, the status and the events, once the workers of
/// `placement` were created as `created` says.
pub fn conclude(
    seen: &Seen,
    placing: &ToPlace,
    mut placement: Placement,
    created: &Created,
    now: &Time,
) -> Result<Decision, BuildError> {
    let job = &seen.job;
    let valid = &placing.valid;
    let previous_phase = job.status.as_ref().map(|s| s.phase);
    let mut refused = created.refused.clone();
    refused.sort();
    // Refused for good (a quota, a name, a conflict): the job runs with the
    // workers that exist, if they are enough.
    if !refused.is_empty()
        && let Ok(mesh) = &placement.planned
    {
        let gone: BTreeSet<&str> = refused.iter().map(|(w, _)| w.as_str()).collect();
        let standing: Vec<ExistingWorker> = mesh
            .workers
            .iter()
            .filter(|w| !gone.contains(w.name.as_str()))
            .map(|w| ExistingWorker {
                name: w.name.clone(),
                node: w.node.clone(),
            })
            .collect();
        let request = MeshRequest {
            max_workers: standing.len() as u32,
            ..placement.request.clone()
        };
        placement.planned = plan_mesh(&request, &placement.mesh_nodes, &standing);
        placement.next = epoch_of(
            seen,
            valid,
            &placement.alive,
            &placement.made_for,
            &placement.planned,
        );
    }
    // The job's pods now: those seen, as the mesh's deletions left them
    // (the contended ones are not among them), and those just made or found.
    let pods: Vec<Pod> = after_deletions(&placing.pods, &placement.delete, now)
        .into_iter()
        .chain(created.made.iter().cloned())
        .chain(created.found.iter().cloned())
        .collect();
    let mut decision = Decision::new(None);
    if !refused.is_empty() {
        decision.events.push(Tell::warning(
            "WorkersRefused",
            format!(
                "{}; {}",
                describe_refusals(&refused),
                match &placement.planned {
                    Ok(mesh) => format!("running with {}", mesh.workers.len()),
                    Err(_) => "too few remain to run".to_string(),
                }
            ),
        ));
    }
    let mut status = job.status.clone().unwrap_or_default();
    match placement.planned.as_mut() {
        Ok(mesh) => {
            if seen.refused_ago.is_some() {
                decision.refusals = RefusalMemory::Forget;
            }
            let Some(epoch) = placement.next.take() else {
                let outcome = Outcome::Failed {
                    reason: "MeshEpochsExhausted".to_string(),
                    message: format!(
                        "the mesh epoch reached {MAX_EPOCH}, the largest weft publishes; \
                         the membership cannot change again"
                    ),
                };
                let mut ended = finish(job, &pods, outcome, now, decision.events);
                ended.refusals = decision.refusals;
                return Ok(ended);
            };
            mesh.epoch = epoch.epoch;
            // The reconcile that published the epoch is the workers' parent
            // span: the published one's, as long as the epoch is the same
            // (the mesh is not rewritten for a trace).
            mesh.trace_parent = match &seen.published {
                Published::Trusted(published) if published.epoch == mesh.epoch => {
                    published.trace_parent.clone()
                }
                _ => seen.trace_parent.clone(),
            };
            if let Published::Untrusted { why, .. } = &seen.published {
                decision.events.push(Tell::warning(
                    "MeshRepublished",
                    format!(
                        "the published mesh was not the one weft wrote ({why}); published again as epoch {}",
                        mesh.epoch
                    ),
                ));
            }
            decision.mesh = Some(build(job, mesh)?.mesh);
            if status.start_time.is_none() {
                status.start_time = Some(now.clone());
            }
            // This epoch published by an earlier reconcile whose status
            // write was lost (so it told nothing): its change as it saw it.
            let published_here = match &seen.published {
                Published::Trusted(published) => published.epoch == mesh.epoch,
                _ => false,
            };
            let told_beside = seen.published_change.clone().filter(|_| published_here);
            // The fault behind the epoch's change: as written beside the
            // mesh when it was published (by this reconcile or an earlier
            // one whose status write was lost), else as seen now.
            let fault = if published_here {
                seen.published_fault.clone()
            } else if previous_phase == Some(Phase::Suspended) {
                // A resume: the workers it starts left because they were
                // asked to, and any fault before is not what it recovers from.
                None
            } else if epoch.moved {
                let seen_now = fault_began(&epoch, mesh, &placing.pods, &seen.nodes, job)
                    .filter(|fault| fault.0 <= now.0);
                // An epoch that never trained was not a recovery: the fault
                // before it is still being recovered from.
                let untrained = status
                    .epoch_first_step
                    .as_ref()
                    .is_none_or(|first| first.mesh_epoch < status.mesh_epoch);
                let before = status.last_fault_time.clone().filter(|_| untrained);
                before.into_iter().chain(seen_now).min_by_key(|time| time.0)
            } else {
                None
            };
            if let (Some(config_map), Some(fault)) = (decision.mesh.as_mut(), &fault) {
                config_map
                    .metadata
                    .annotations
                    .get_or_insert_with(Default::default)
                    .insert(
                        crate::build::ANNOTATION_MESH_FAULT.to_string(),
                        fault.0.to_string(),
                    );
            }
            let change = if epoch.moved {
                status.last_fault_time = fault;
                status.last_rescale_time = Some(now.clone());
                let change = match told_beside {
                    Some(note) => Tell::normal("MeshEpoch", note),
                    None => mesh_epoch_event(mesh, &epoch, &placing.unreadable),
                };
                decision.events.push(change.clone());
                Some(change.note)
            } else {
                told_beside
            };
            if let (Some(config_map), Some(change)) = (decision.mesh.as_mut(), change) {
                config_map
                    .metadata
                    .annotations
                    .get_or_insert_with(Default::default)
                    .insert(crate::build::ANNOTATION_MESH_CHANGE.to_string(), change);
            }
        }
        Err(err) => {
            if !refused.is_empty() {
                decision.refusals = RefusalMemory::Remember;
            }
            // Below min (or never started): hold no GPUs while waiting, so
            // two half-placed gangs can never deadlock each other. Workers
            // made just now before others were refused are counted.
            let stopping = pods.iter().filter(|p| !terminal(p)).count();
            if stopping > 0 {
                let why = if refused.is_empty() {
                    err.to_string()
                } else {
                    format!(
                        "{}, and fewer than {} remain",
                        describe_refusals(&refused),
                        least_workers_named(&job.spec)
                    )
                };
                decision.events.push(Tell::warning(
                    "BelowMinimum",
                    format!("{stopping} workers stopped: {why}"),
                ));
                decision.delete = stop_all(&pods);
            }
        }
    }
    let pods = after_deletions(&pods, &decision.delete, now);

    let mut counted = job.clone();
    counted.status = Some(status);
    let unreadable_nodes: Vec<String> =
        placing.unreadable.iter().map(ToString::to_string).collect();
    let status = compute_status(
        &counted,
        &Observed {
            mesh: placement.planned.as_ref(),
            pods: &pods,
            refused: &refused,
            unreadable_nodes: &unreadable_nodes,
            now: now.clone(),
        },
    );
    if previous_phase != Some(status.phase) {
        let note = status
            .conditions
            .iter()
            .map(|c| c.message.as_str())
            .collect::<Vec<_>>()
            .join("; ");
        let type_ = if status.phase == Phase::Pending {
            EventType::Warning
        } else {
            EventType::Normal
        };
        decision.events.push(Tell {
            type_,
            reason: format!("{:?}", status.phase),
            note,
        });
    }
    let stall_due = until_stalled(job, &status, now);
    decision.status = Some(status);
    let look_again = match placement.cooldown_left {
        // When growth is allowed.
        Some(left) if placement.planned.is_ok() => left + Duration::from_secs(1),
        _ => IDLE_LOOK,
    };
    // And when a training job with no step by then turns stalled.
    let look_again = match stall_due {
        Some(left) => look_again.min(left + Duration::from_secs(1)),
        None => look_again,
    };
    // And when a worker the scheduler refuses reaches its timeout.
    let refusal = next_refusal_timeout(&pods, valid.unschedulable_timeout_s, now);
    decision.requeue = Some(match refusal {
        Some(left) => look_again.min(left + Duration::from_secs(1)),
        None => look_again,
    });
    Ok(decision)
}

/// `pods` as deleting `deleted` leaves them: an ended or unbound pod is gone
/// at once (no kubelet has to stop it), a bound one is on its way out.
fn after_deletions(pods: &[Pod], deleted: &[Deletion], now: &Time) -> Vec<Pod> {
    pods.iter()
        .filter_map(|pod| {
            if !deleted.iter().any(|d| d.pod == pod.name_any()) {
                return Some(pod.clone());
            }
            let bound = pod.spec.as_ref().is_some_and(|s| s.node_name.is_some());
            if terminal(pod) || !bound {
                return None;
            }
            let mut leaving = pod.clone();
            leaving
                .metadata
                .deletion_timestamp
                .get_or_insert_with(|| now.clone());
            Some(leaving)
        })
        .collect()
}

/// When the fault that made the previous mesh's workers leave began, as the
/// cluster recorded it: for each worker of the previous mesh that did not
/// stay (alive, and in the new `mesh` where it was), its node's turn to
/// NotReady, its container's failure, its pod's deletion, or the failure
/// the job counted for it since the previous change; the earliest of them.
/// `None` when no worker left for a fault (growth, a resume, a worker
/// dropped for a better placement).
fn fault_began(
    epoch: &NextEpoch,
    mesh: &MeshPlan,
    pods: &[Pod],
    nodes: &[Arc<Node>],
    job: &TrainingJob,
) -> Option<Time> {
    let status = job.status.as_ref();
    let mut times: Vec<Time> = Vec::new();
    // Those that stay: alive before, and members of the new mesh where they were.
    let stayed: BTreeSet<(String, String)> = crate::controller::members(mesh)
        .intersection(&epoch.kept)
        .cloned()
        .collect();
    for (name, node) in epoch.previous.difference(&stayed) {
        times.extend(
            nodes
                .iter()
                .find(|n| n.metadata.name.as_deref() == Some(node))
                .and_then(|n| crate::inventory::not_ready_since(n))
                .cloned(),
        );
        for pod in pods
            .iter()
            .filter(|p| p.metadata.name.as_deref() == Some(name))
        {
            // Set to when the grace period ends: asked that long before.
            if let Some(time) = &pod.metadata.deletion_timestamp {
                let grace = pod.metadata.deletion_grace_period_seconds.unwrap_or(0);
                times.extend(
                    time.0
                        .checked_sub(k8s_openapi::jiff::SignedDuration::from_secs(grace))
                        .ok()
                        .map(Time),
                );
            }
            times.extend(
                crate::lifecycle::failed_containers(pod).filter_map(|(_, t)| t.finished_at.clone()),
            );
        }
        times.extend(
            status
                .into_iter()
                .flat_map(|s| &s.recent_failures)
                .filter(|f| &f.worker == name)
                .map(|f| f.time.clone()),
        );
    }
    // Since the previous change (an older fault was that change's).
    let since = status.and_then(|s| s.last_rescale_time.as_ref());
    times
        .into_iter()
        .filter(|time| since.is_none_or(|since| time.0 >= since.0))
        .min_by_key(|time| time.0)
}

/// The `MeshEpoch` event: the new mesh, who joined and who left.
fn mesh_epoch_event(mesh: &MeshPlan, epoch: &NextEpoch, unreadable: &[InventoryError]) -> Tell {
    // The previous mesh's live workers the new one keeps stayed; every other
    // worker of the previous mesh left.
    let kept = mesh
        .workers
        .iter()
        .filter(|w| epoch.kept.contains(&(w.name.clone(), w.node.clone())))
        .count();
    let joined = mesh.workers.len() - kept;
    let left = epoch.previous.len().saturating_sub(kept);
    // A worker on a node that can no longer be read is moved: weft cannot
    // place ranks on a topology it cannot read.
    let moved_off: Vec<String> = epoch
        .previous
        .iter()
        .filter(|(w, _)| !mesh.workers.iter().any(|m| &m.name == w))
        .filter_map(|(w, node)| {
            let why = unreadable.iter().find(|e| e.node() == Some(node))?;
            Some(format!("{w} from {why}"))
        })
        .collect();
    Tell::normal(
        "MeshEpoch",
        format!(
            "mesh epoch {}: {} workers ({} {}) on {} nodes; {joined} joined, {left} left{}",
            mesh.epoch,
            mesh.workers.len(),
            mesh.world_size,
            if mesh.workers.iter().any(|w| w.gpus > 0) {
                "GPUs"
            } else {
                "CPU ranks"
            },
            mesh.node_groups.len(),
            if moved_off.is_empty() {
                String::new()
            } else {
                format!(
                    " (moved off nodes that cannot be read: {})",
                    moved_off.join("; ")
                )
            }
        ),
    )
}
