//! The controller: watches `TrainingJob`s, the cluster's nodes and pods,
//! and runs [`crate::reconcile`] for each job (observe → decide → apply →
//! one status write → events), retrying a failed reconcile by the kind of
//! its error ([`Retry`]). Level-triggered: every reconcile
//! starts from what the API server holds now (nodes, pods, the job), so a
//! restarted operator converges to the same objects, and nothing is created
//! twice (pods by name, everything else by server-side apply).
//!
//! - **Gang start**: pods are created only once a mesh places at least
//!   `workers.min` workers on healthy nodes (more where a Static
//!   `cpDegree` needs more ranks: `TrainingJobSpec::least_workers`); until
//!   then the job is Pending
//!   and its `Schedulable` condition says how many GPUs it needs and could get.
//! - **Elasticity**: a worker whose node is lost (NotReady, cordoned or
//!   deleted) or whose pod failed leaves the mesh; the survivors keep their
//!   pods, the job shrinks (never below `min`) and the mesh epoch moves on.
//!   Free capacity grows the job up to `max`.
//! - **Suspend**: a suspended job's pods are deleted; clearing `suspend`
//!   starts it again.
//! - **Below min**: a job that can no longer place `workers.min` workers
//!   stops the ones it has (holding GPUs while waiting is how gangs
//!   deadlock) and waits, Pending, saying what it needs.
//! - **Restart budget, completion, cooldown**: see [`crate::lifecycle`].
//!   An ended job (Succeeded or Failed) keeps no worker running.
//!
//! Every transition a user would want to see is a Kubernetes event on the
//! job (`kubectl describe tj`): worker failures, mesh epochs (who joined and
//! left), phase changes, suspension, the end and why.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod, Service};
use kube::api::{ApiResource, DynamicObject};
use kube::runtime::controller::Action;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{Controller, WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use weft_crds::TrainingJob;
use weft_crds::topology::RESOURCE_GPU;
use weft_planner::mesh::{ExistingWorker, MeshNode, MeshPlan};

use crate::build::{BuildError, LABEL_JOB};
use crate::events::Events;
use crate::inventory::ClusterNode;
use crate::metrics::Metrics;
use crate::reconcile::decide::RefusalMemory;

/// The field manager of everything the operator applies.
pub const FIELD_MANAGER: &str = "weft-operator";

/// What went wrong in a reconcile.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error("Kubernetes API: {0}")]
    Api(#[from] kube::Error),
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error("the TrainingJob has no namespace")]
    NoNamespace,
    #[error("status cannot be serialised: {0}")]
    Serialise(String),
    #[error("the node or pod cache stopped (its watch ended)")]
    CacheGone,
    #[error("the node and pod caches did not fill within {0} s (are nodes and pods readable?)")]
    CachesNotSynced(u64),
    #[error("no turn to plan within {0} s: another job's planning is stuck")]
    PlanningStalled(u64),
    #[error(
        "the job changed while it was reconciled (its workers report progress into the status); reconciling again"
    )]
    Conflict,
    #[error("this TrainingJob cannot be read: {path}: {error}")]
    Unreadable { path: String, error: String },
}

impl ControllerError {
    /// A stable, machine-readable name for the kind of failure.
    pub fn category(&self) -> &'static str {
        match self {
            ControllerError::Api(_) => "kubernetes_api",
            ControllerError::Build(e) => e.category(),
            ControllerError::NoNamespace => "job_metadata",
            ControllerError::Serialise(_) => "status",
            ControllerError::CacheGone | ControllerError::CachesNotSynced(_) => "cache",
            ControllerError::PlanningStalled(_) => "planning_stalled",
            ControllerError::Conflict => "conflict",
            ControllerError::Unreadable { .. } => "unreadable_object",
        }
    }
}

/// A pod that still runs (or waits to) and is not being deleted.
pub(crate) fn live(pod: &Pod) -> bool {
    !terminal(pod) && pod.metadata.deletion_timestamp.is_none()
}

pub(crate) fn terminal(pod: &Pod) -> bool {
    matches!(crate::status::phase_of(pod), "Succeeded" | "Failed")
}

/// GPUs a pod asks for.
pub fn gpus_requested(pod: &Pod) -> u32 {
    pod.spec
        .as_ref()
        .map(|s| {
            s.containers
                .iter()
                .filter_map(|c| c.resources.as_ref()?.limits.as_ref()?.get(RESOURCE_GPU))
                .filter_map(|q| q.0.parse::<u32>().ok())
                .sum()
        })
        .unwrap_or(0)
}

/// Observe, pure part: the nodes as the mesh planner sees them (GPUs not
/// held by any live pod, the job's own included: the planner counts its
/// survivors' GPUs as theirs), and the job's surviving workers (live pods
/// with a node).
pub fn mesh_inputs<P: std::borrow::Borrow<Pod>>(
    cluster_nodes: &[ClusterNode],
    all_pods: &[P],
    job_pods: &[Pod],
) -> (Vec<MeshNode>, Vec<ExistingWorker>) {
    let mut used: BTreeMap<String, u32> = BTreeMap::new();
    for pod in all_pods.iter().map(P::borrow).filter(|p| !terminal(p)) {
        if let Some(node) = placed_node(pod) {
            *used.entry(node).or_default() += gpus_requested(pod);
        }
    }
    let nodes = cluster_nodes
        .iter()
        .map(|n| MeshNode {
            free_gpus: n
                .node
                .gpus
                .saturating_sub(used.get(&n.node.name).copied().unwrap_or(0)),
            healthy: n.ready && n.schedulable,
            node: n.node.clone(),
        })
        .collect::<Vec<_>>();
    let existing = job_pods
        .iter()
        .filter(|p| live(p))
        .filter_map(|p| {
            Some(ExistingWorker {
                name: p.name_any(),
                node: placed_node(p)?,
            })
        })
        .collect();
    (nodes, existing)
}

/// The job's workers that the scheduler refuses on a node whose GPUs other
/// pods hold (`all_pods`: the cluster's, the job's own included), beyond
/// what the node has (`capacity`, by node): refused because another job
/// claimed the GPUs first, not because the node is unwell. Such a worker is
/// placed again elsewhere at once, and its node is not avoided.
pub fn contended_workers<P: std::borrow::Borrow<Pod>>(
    job_pods: &[Pod],
    all_pods: &[P],
    capacity: &BTreeMap<String, u32>,
) -> BTreeSet<String> {
    let own: BTreeSet<&str> = job_pods
        .iter()
        .filter_map(|p| p.metadata.uid.as_deref())
        .collect();
    crate::lifecycle::refused_workers(job_pods)
        .filter(|(pod, node, _)| {
            let others: u32 = all_pods
                .iter()
                .map(P::borrow)
                .filter(|p| live(p))
                .filter(|p| !p.metadata.uid.as_deref().is_some_and(|u| own.contains(u)))
                .filter(|p| placed_node(p).as_deref() == Some(*node))
                .map(gpus_requested)
                .sum();
            let has = capacity.get(*node).copied().unwrap_or(0);
            others + gpus_requested(pod) > has
        })
        .map(|(pod, _, _)| pod.name_any())
        .collect()
}

/// The node a pod is bound to, or pinned to by its node selector (a worker
/// before it is bound).
fn placed_node(pod: &Pod) -> Option<String> {
    let spec = pod.spec.as_ref()?;
    spec.node_name.clone().or_else(|| pinned_node(spec))
}

/// The job's live workers made for mesh epoch `recorded` or an earlier one
/// (by their epoch label): (name, node).
pub fn made_for_epoch(job_pods: &[Pod], recorded: u64) -> BTreeSet<(String, String)> {
    job_pods
        .iter()
        .filter(|p| live(p))
        .filter(|p| {
            p.labels()
                .get(crate::build::LABEL_EPOCH)
                .and_then(|e| e.parse::<u64>().ok())
                .is_some_and(|e| e <= recorded)
        })
        .filter_map(|p| Some((p.name_any(), placed_node(p)?)))
        .collect()
}

/// The node a worker pod is pinned to by its node selector (before it is bound).
fn pinned_node(spec: &k8s_openapi::api::core::v1::PodSpec) -> Option<String> {
    spec.node_selector
        .as_ref()?
        .get("kubernetes.io/hostname")
        .cloned()
}

/// The largest mesh epoch weft publishes (the status schema's bound).
pub const MAX_EPOCH: u64 = weft_crds::MAX_MESH_EPOCH as u64;

/// The mesh epoch `job`'s status records (0 before the first), within what
/// weft publishes.
pub fn recorded_epoch(job: &TrainingJob) -> u64 {
    job.status
        .as_ref()
        .map_or(0, |s| s.mesh_epoch.clamp(0, MAX_EPOCH as i64) as u64)
}

/// The job's published mesh, as far as a reconcile trusts it.
#[derive(Debug, Clone, PartialEq)]
pub enum Published {
    /// No mesh ConfigMap (never published, or deleted).
    Absent,
    /// The mesh weft wrote: its data match the digest weft wrote beside it,
    /// it is this job's, and its epoch is at least the one the status
    /// records (a reconcile may publish and stop before its status write).
    Trusted(MeshPlan),
    /// Not what weft wrote (edited by hand, or unreadable); `epoch` is the
    /// one it claims, when it claims one weft could publish.
    Untrusted { epoch: Option<u64>, why: String },
}

/// Reads the published mesh `config_map` of job `name`, whose status records
/// epoch `recorded`. Never panics, whatever the ConfigMap holds. A mesh
/// written by a weft from before the digest is trusted at the recorded
/// epoch or the next.
pub fn read_published(config_map: Option<&ConfigMap>, name: &str, recorded: u64) -> Published {
    let Some(config_map) = config_map else {
        return Published::Absent;
    };
    let untrusted = |epoch: Option<u64>, why: String| Published::Untrusted {
        epoch: epoch.filter(|e| *e <= MAX_EPOCH),
        why,
    };
    let empty = BTreeMap::new();
    let data = config_map.data.as_ref().unwrap_or(&empty);
    let Some(text) = data.get("mesh.json") else {
        return untrusted(None, "it has no mesh.json".to_string());
    };
    let mesh: MeshPlan = match serde_json::from_str(text) {
        Ok(mesh) => mesh,
        Err(e) => return untrusted(None, format!("mesh.json cannot be read: {e}")),
    };
    let digest = config_map
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(crate::build::ANNOTATION_MESH_DIGEST));
    let names: BTreeSet<&str> = mesh.workers.iter().map(|w| w.name.as_str()).collect();
    let why = if mesh.job != name {
        Some(format!("it is the mesh of job {:?}", mesh.job))
    } else if digest.is_some_and(|d| *d != crate::build::mesh_digest(data)) {
        Some("its data differ from what weft wrote".to_string())
    } else if mesh.epoch > MAX_EPOCH {
        Some(format!(
            "its epoch {} is past the largest weft publishes",
            mesh.epoch
        ))
    } else if mesh.epoch < recorded {
        Some(format!(
            "its epoch {} is below the job's recorded epoch {recorded}",
            mesh.epoch
        ))
    } else if digest.is_none() && mesh.epoch > recorded.saturating_add(1) {
        Some(format!(
            "its epoch {} is not the job's recorded epoch {recorded} or the next",
            mesh.epoch
        ))
    } else if names.len() != mesh.workers.len() {
        Some("it names a worker twice".to_string())
    } else {
        None
    };
    match why {
        Some(why) => untrusted(Some(mesh.epoch), why),
        None => Published::Trusted(mesh),
    }
}

/// The epoch of a mesh about to be published, and what it is measured
/// against.
#[derive(Debug, Clone, PartialEq)]
pub struct NextEpoch {
    pub epoch: u64,
    /// Whether it differs from the epoch the status records, or replaces a
    /// mesh weft did not write: the membership changed for the workers.
    pub moved: bool,
    /// The previous mesh's workers (name, node) that are still alive.
    pub kept: BTreeSet<(String, String)>,
    /// The previous mesh's workers (name, node).
    pub previous: BTreeSet<(String, String)>,
}

/// The epoch of the mesh whose workers are `after`, given the epoch the
/// status records, the published mesh, and the job's live workers `alive`
/// (name, node). The epoch moves on exactly when the membership differs from
/// the previous mesh's, or a member is a pod made since. Without a published
/// mesh (its ConfigMap deleted), the previous mesh's workers are the live
/// pods made for the recorded epoch or an earlier one (`made_for_recorded`),
/// so restoring it is no membership change. An untrusted mesh always gets a
/// new epoch, above any it claims (workers follow only newer epochs).
/// `None` when the epoch would have to pass [`MAX_EPOCH`].
pub fn next_epoch(
    recorded: u64,
    published: &Published,
    alive: &BTreeSet<(String, String)>,
    made_for_recorded: &BTreeSet<(String, String)>,
    after: &BTreeSet<(String, String)>,
) -> Option<NextEpoch> {
    let recorded = recorded.min(MAX_EPOCH);
    let (base, previous, trusted): (u64, BTreeSet<(String, String)>, bool) = match published {
        Published::Trusted(mesh) => (mesh.epoch.max(recorded), members(mesh), true),
        Published::Absent => (recorded, made_for_recorded.clone(), recorded > 0),
        Published::Untrusted { epoch, .. } => {
            (epoch.unwrap_or(0).max(recorded), BTreeSet::new(), false)
        }
    };
    let kept: BTreeSet<(String, String)> = previous.intersection(alive).cloned().collect();
    // The same workers as the previous mesh, every one of them alive before
    // this reconcile: survivors of a lost worker meet again without it, and
    // a pod made anew (a resumed job reuses names) is a new member.
    let same = trusted && base > 0 && previous == *after && after.is_subset(alive);
    let epoch = if same {
        base
    } else if base < MAX_EPOCH {
        base + 1
    } else {
        return None;
    };
    Some(NextEpoch {
        epoch,
        moved: epoch != recorded || !trusted,
        kept,
        previous,
    })
}

/// How the trusted `published` mesh changed the membership, as written
/// beside it ([`crate::build::ANNOTATION_MESH_CHANGE`]): only a note about
/// that mesh's own epoch, never one about another mesh, or beside one weft
/// does not trust.
pub fn published_change(config_map: Option<&ConfigMap>, published: &Published) -> Option<String> {
    let Published::Trusted(mesh) = published else {
        return None;
    };
    let note = config_map?
        .metadata
        .annotations
        .as_ref()?
        .get(crate::build::ANNOTATION_MESH_CHANGE)?;
    note.starts_with(&format!("mesh epoch {}:", mesh.epoch))
        .then(|| note.clone())
}

/// When the fault behind the trusted `published` mesh's change began, as
/// written beside it ([`crate::build::ANNOTATION_MESH_FAULT`]): only beside
/// a note about that mesh's own epoch ([`published_change`]).
pub fn published_fault(
    config_map: Option<&ConfigMap>,
    published: &Published,
) -> Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time> {
    published_change(config_map, published)?;
    let written = config_map?
        .metadata
        .annotations
        .as_ref()?
        .get(crate::build::ANNOTATION_MESH_FAULT)?;
    written
        .parse()
        .ok()
        .map(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time)
}

/// The workers of `mesh`: (name, node).
pub(crate) fn members(mesh: &MeshPlan) -> BTreeSet<(String, String)> {
    mesh.workers
        .iter()
        .map(|w| (w.name.clone(), w.node.clone()))
        .collect()
}

/// Whether `pod`'s controller is the job with UID `job_uid`.
pub fn owned_by(pod: &Pod, job_uid: &str) -> bool {
    !job_uid.is_empty()
        && pod
            .metadata
            .owner_references
            .iter()
            .flatten()
            .any(|o| o.controller == Some(true) && o.uid == job_uid)
}

/// Shared by every reconcile.
pub struct Context {
    pub client: Client,
    /// Publishes Kubernetes events about jobs.
    pub events: Events,
    pub metrics: Arc<Metrics>,
    /// Every node, kept current by a watch (slimmed: see [`slim_node`]).
    pub nodes: Store<Node>,
    /// Every pod of the cluster, for the GPUs each node has left (slimmed:
    /// see [`slim_pod`]). A job's own pods are listed afresh each reconcile.
    pub pods: Store<Pod>,
    /// One job plans at a time (see [`Planning`]).
    pub planning: Planning,
    /// Jobs (by UID) whose workers were refused below `workers.min`, and
    /// when: no worker is made for them again for [`REFUSAL_BACKOFF`], so a
    /// quota too small for the gang does not make and delete pods in a loop.
    refused_below_min: std::sync::Mutex<BTreeMap<String, std::time::Instant>>,
    /// Reconciles of each job (namespace/name) that failed in a row, for
    /// the backoff of [`error_policy`]; cleared by a reconcile that succeeds.
    failed_in_a_row: std::sync::Mutex<BTreeMap<String, u32>>,
    /// Turns true once both caches hold a full list.
    synced: tokio::sync::watch::Receiver<bool>,
}

/// Jobs plan one at a time, each until the pod cache holds the workers it
/// created: without it, jobs planned within the cache's delay all count the
/// same GPUs free, and the later ones' workers wait unschedulable until
/// their nodes are shunned.
#[derive(Debug, Default)]
pub struct Planning {
    turn: tokio::sync::Mutex<()>,
}

/// How long a job whose workers were refused below `workers.min` waits
/// before it tries to make them again.
pub const REFUSAL_BACKOFF: Duration = Duration::from_secs(30);

/// How long a job waits for its turn to plan before it gives up and is
/// retried (another job's turn stuck on an API call that never answers).
pub(crate) const TURN_WAIT: Duration = Duration::from_secs(60);

/// How long a job's turn waits for the cache to show the pods it created.
const CACHE_CATCH_UP: Duration = Duration::from_secs(5);

impl Planning {
    /// This job's turn to plan.
    pub(crate) async fn lock(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.turn.lock().await
    }

    /// Waits (for at most [`CACHE_CATCH_UP`]) until `cache` holds every pod
    /// of `uids`.
    pub(crate) async fn cache_holds(cache: &Store<Pod>, uids: &[String]) {
        let deadline = tokio::time::Instant::now() + CACHE_CATCH_UP;
        while tokio::time::Instant::now() < deadline {
            let held: BTreeSet<String> = cache
                .state()
                .iter()
                .filter_map(|p| p.metadata.uid.clone())
                .collect();
            if uids.iter().all(|u| held.contains(u)) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tracing::debug!(
            pods = uids.len(),
            "the pod cache did not show new workers in time"
        );
    }
}

impl Context {
    /// A context whose node and pod caches are fed by watches that run on
    /// tasks of their own, as long as the returned tasks do; the returned
    /// stream yields once the caches hold each change that matters to a mesh
    /// (a node's, or GPUs freed by a pod), so a reconcile it triggers sees
    /// the change; several changes are coalesced into one while the
    /// controller is busy.
    ///
    /// Reconciles wait for the caches through a watch channel that one task
    /// of its own sets, never on the stores themselves: a store's
    /// `wait_until_ready` wakes only the last task that polled it (it holds
    /// one oneshot receiver), so reconciles of several jobs waiting at once
    /// after a start or a failover hung for ever but one.
    pub fn new(
        client: Client,
        metrics: Arc<Metrics>,
    ) -> (
        Self,
        impl futures::Stream<Item = ()> + Send + 'static,
        Vec<tokio::task::JoinHandle<()>>,
    ) {
        let (nodes, node_writer) = reflector::store::<Node>();
        let (pods, pod_writer) = reflector::store::<Pod>();
        // Room for one signal: a change while one waits is already covered.
        let (mut changed, node_changed) = futures::channel::mpsc::channel::<()>(1);
        let mut freed = changed.clone();
        let node_watch = node_changes(
            watcher(Api::<Node>::all(client.clone()), watcher::Config::default())
                .default_backoff()
                .modify(slim_node)
                .reflect(node_writer),
        )
        .for_each(move |()| {
            // Full: a signal is waiting already; closed: the controller stopped.
            let _ = changed.try_send(());
            std::future::ready(())
        });
        // GPUs freed anywhere (a pod that held some deleted, or ended) wake
        // every job too: a job waiting for capacity need not wait for its
        // next look. Whether an event frees GPUs is judged against the
        // cache before the event is written to it; the signal goes after.
        let before = pods.clone();
        let frees = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let judged = frees.clone();
        let pod_watch = watcher(Api::<Pod>::all(client.clone()), watcher::Config::default())
            .default_backoff()
            .modify(slim_pod)
            .inspect(move |event| {
                let held = |pod: &Pod| gpus_requested(pod) > 0 && !terminal(pod);
                let was_held = |pod: &Pod| {
                    before
                        .get(&reflector::ObjectRef::from_obj(pod))
                        .is_some_and(|old| held(&old))
                };
                let freed = match event {
                    Ok(watcher::Event::Delete(pod)) => held(pod) || was_held(pod),
                    Ok(watcher::Event::Apply(pod)) => !held(pod) && was_held(pod),
                    // A relist: deletions missed in a gap show only here.
                    Ok(watcher::Event::InitDone) => true,
                    _ => false,
                };
                if freed {
                    judged.store(true, std::sync::atomic::Ordering::Relaxed);
                }
            })
            .reflect(pod_writer)
            .for_each(move |_| {
                if frees.swap(false, std::sync::atomic::Ordering::Relaxed) {
                    let _ = freed.try_send(());
                }
                std::future::ready(())
            });
        let (synced_tx, synced) = tokio::sync::watch::channel(false);
        let waiter = {
            let (nodes, pods, metrics) = (nodes.clone(), pods.clone(), metrics.clone());
            tokio::spawn(async move {
                // The only task that waits on the stores.
                if nodes.wait_until_ready().await.is_ok() && pods.wait_until_ready().await.is_ok() {
                    metrics.set_caches_synced(true);
                    let _ = synced_tx.send(true);
                }
            })
        };
        metrics.set_caches_synced(false);
        let ctx = Context {
            events: Events::new(
                client.clone(),
                FIELD_MANAGER,
                std::env::var("POD_NAME").ok(),
            ),
            client,
            metrics,
            nodes,
            pods,
            planning: Planning::default(),
            refused_below_min: Default::default(),
            failed_in_a_row: Default::default(),
            synced,
        };
        (
            ctx,
            node_changed,
            vec![tokio::spawn(node_watch), tokio::spawn(pod_watch), waiter],
        )
    }

    /// How long ago the workers of the job with UID `uid` were refused
    /// below `workers.min`, if they were.
    pub(crate) fn refused_below_min(&self, uid: &str) -> Option<Duration> {
        let refused = self.refused_below_min.lock().ok()?;
        refused.get(uid).map(|at| at.elapsed())
    }

    /// Keeps what a reconcile decided about refusals below `workers.min`.
    pub(crate) fn remember_refusal(&self, uid: &str, memory: RefusalMemory) {
        let Ok(mut refused) = self.refused_below_min.lock() else {
            return;
        };
        match memory {
            RefusalMemory::Keep => {}
            RefusalMemory::Remember => {
                refused.insert(uid.to_string(), std::time::Instant::now());
            }
            RefusalMemory::Forget => {
                refused.remove(uid);
            }
        }
    }

    /// A reconcile of `job` succeeded: its next failure backs off from the
    /// start.
    pub(crate) fn reconciled(&self, job: &DynamicObject) {
        if let Ok(mut failed) = self.failed_in_a_row.lock() {
            failed.remove(&job_key(job));
        }
    }

    /// Forgets what this operator kept of `job` (deleted).
    pub(crate) fn forget(&self, job: &DynamicObject) {
        if let Ok(mut failed) = self.failed_in_a_row.lock() {
            failed.remove(&job_key(job));
        }
        if let (Ok(mut refused), Some(uid)) =
            (self.refused_below_min.lock(), job.metadata.uid.as_deref())
        {
            refused.remove(uid);
        }
    }

    /// Counts a failed reconcile of `job`; how many failed in a row.
    fn failed(&self, job: &DynamicObject) -> u32 {
        let Ok(mut failed) = self.failed_in_a_row.lock() else {
            return 1;
        };
        let count = failed.entry(job_key(job)).or_default();
        *count = count.saturating_add(1);
        *count
    }

    /// Waits until both caches hold a full list, for at most [`CACHE_WAIT`].
    pub(crate) async fn caches_synced(&self) -> Result<(), ControllerError> {
        let mut synced = self.synced.clone();
        match tokio::time::timeout(CACHE_WAIT, synced.wait_for(|s| *s)).await {
            Ok(Ok(_)) => Ok(()),
            // The waiting task ended without the caches: their watches stopped.
            Ok(Err(_)) => Err(ControllerError::CacheGone),
            Err(_) => Err(ControllerError::CachesNotSynced(CACHE_WAIT.as_secs())),
        }
    }
}

/// How long a reconcile waits for the node and pod caches before it gives
/// up and is retried (a reconcile that waited for ever would hold its job).
const CACHE_WAIT: Duration = Duration::from_secs(30);

/// One item per change of a node that can change a mesh: a node added or
/// deleted, or a change of its labels, NIC annotation, taints, cordon,
/// capacity or readiness. Heartbeats (a new `lastHeartbeatTime`, every few
/// seconds on every node) are not changes: on a big cluster they would
/// wake every job many times a second.
fn node_changes(
    events: impl futures::Stream<Item = Result<watcher::Event<Node>, watcher::Error>> + Send + 'static,
) -> impl futures::Stream<Item = ()> + Send + 'static {
    let mut seen: BTreeMap<String, u64> = BTreeMap::new();
    events.filter_map(move |event| {
        let change = match event {
            Ok(watcher::Event::Apply(node) | watcher::Event::InitApply(node)) => {
                let fingerprint = mesh_fingerprint(&node);
                (seen.insert(node.name_any(), fingerprint) != Some(fingerprint)).then_some(())
            }
            Ok(watcher::Event::Delete(node)) => {
                seen.remove(&node.name_any());
                Some(())
            }
            Ok(watcher::Event::InitDone) => Some(()),
            Ok(watcher::Event::Init) => None,
            Err(e) => {
                tracing::warn!(error = %e, "node watch failed; retrying");
                None
            }
        };
        std::future::ready(change)
    })
}

/// A hash of what of a node a mesh depends on.
fn mesh_fingerprint(node: &Node) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    node.metadata.labels.hash(&mut hasher);
    node.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(weft_crds::topology::ANNOTATION_NICS))
        .hash(&mut hasher);
    if let Some(spec) = &node.spec {
        spec.unschedulable.hash(&mut hasher);
        for taint in spec.taints.iter().flatten() {
            (&taint.key, &taint.value, &taint.effect).hash(&mut hasher);
        }
    }
    if let Some(status) = &node.status {
        for (name, quantity) in status.allocatable.iter().flatten() {
            (name, &quantity.0).hash(&mut hasher);
        }
        for condition in status.conditions.iter().flatten() {
            (&condition.type_, &condition.status).hash(&mut hasher);
        }
    }
    hasher.finish()
}

/// What the operator keeps of a node: all but the managed fields and the
/// list of images (which can be most of a node object).
pub fn slim_node(node: &mut Node) {
    node.metadata.managed_fields = None;
    if let Some(status) = node.status.as_mut() {
        status.images = None;
    }
}

/// What a reconcile keeps of its job's own pods (listed, or as created):
/// all but the managed fields and the containers' environment and mounts
/// and the pod's volumes, which its decisions never read and which are most
/// of a worker pod; a 256-worker job holds several copies of its pods while
/// it places them.
pub fn slim_worker(mut pod: Pod) -> Pod {
    pod.metadata.managed_fields = None;
    if let Some(spec) = pod.spec.as_mut() {
        spec.volumes = None;
        for container in &mut spec.containers {
            container.env = None;
            container.volume_mounts = None;
        }
    }
    pod
}

/// What the operator keeps of a pod of the cluster: its name, labels,
/// deletion mark, node (bound, or pinned by node selector or affinity), GPU
/// limits and phase,
/// which is all that GPU accounting needs; the rest (env, volumes, statuses,
/// annotations) could be most of the operator's memory on a busy cluster.
pub fn slim_pod(pod: &mut Pod) {
    pod.metadata.managed_fields = None;
    pod.metadata.annotations = None;
    if let Some(spec) = pod.spec.as_mut() {
        let affinity = spec.affinity.take();
        let node_name = spec.node_name.take();
        // A worker is pinned by its node selector until it is bound: GPU
        // accounting must see the node it will take.
        let node_selector = spec.node_selector.take();
        let containers = std::mem::take(&mut spec.containers)
            .into_iter()
            .map(|c| k8s_openapi::api::core::v1::Container {
                name: c.name,
                resources: c.resources,
                ..Default::default()
            })
            .collect();
        *spec = k8s_openapi::api::core::v1::PodSpec {
            affinity,
            node_name,
            node_selector,
            containers,
            ..Default::default()
        };
    }
    if let Some(status) = pod.status.as_mut() {
        *status = k8s_openapi::api::core::v1::PodStatus {
            phase: status.phase.take(),
            ..Default::default()
        };
    }
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Context")
    }
}

/// The TrainingJob `object` read into weft's types; the error names the
/// first field that cannot be read.
pub fn read_job(object: &DynamicObject) -> Result<TrainingJob, ControllerError> {
    let value = serde_json::to_value(object).map_err(|e| ControllerError::Unreadable {
        path: ".".to_string(),
        error: e.to_string(),
    })?;
    serde_path_to_error::deserialize(value).map_err(|e| ControllerError::Unreadable {
        path: e.path().to_string(),
        error: e.inner().to_string(),
    })
}

/// How a failed reconcile is retried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Retry {
    /// The object itself is wrong: only a change of it helps (and wakes
    /// it at once), or a change of the nodes, which wakes every job.
    WaitForChange,
    /// The job changed while it was reconciled: again at once.
    AtOnce,
    /// The API server or a cache failed: again, each time later.
    Backoff,
}

impl ControllerError {
    /// How a reconcile that failed with this error is retried.
    pub fn retry(&self) -> Retry {
        match self {
            ControllerError::Unreadable { .. } | ControllerError::NoNamespace => {
                Retry::WaitForChange
            }
            ControllerError::Conflict => Retry::AtOnce,
            ControllerError::Api(_)
            | ControllerError::Build(_)
            | ControllerError::Serialise(_)
            | ControllerError::CacheGone
            | ControllerError::CachesNotSynced(_)
            | ControllerError::PlanningStalled(_) => Retry::Backoff,
        }
    }
}

/// The first retry after a failure that backs off, and the longest wait.
pub const BACKOFF_FIRST: Duration = Duration::from_secs(1);
pub const BACKOFF_MOST: Duration = Duration::from_secs(60);

/// The wait before the retry of a reconcile that failed `in_a_row` times
/// in a row, with an error retried as `retry`: `None` waits for a change.
pub fn retry_after(retry: Retry, in_a_row: u32) -> Option<Duration> {
    match retry {
        Retry::WaitForChange => None,
        Retry::AtOnce => Some(Duration::from_millis(100)),
        Retry::Backoff => {
            let doublings = in_a_row.saturating_sub(1).min(16);
            Some((BACKOFF_FIRST * 2u32.pow(doublings)).min(BACKOFF_MOST))
        }
    }
}

/// The key of a job in the operator's memory.
fn job_key(job: &DynamicObject) -> String {
    format!(
        "{}/{}",
        job.metadata.namespace.as_deref().unwrap_or_default(),
        job.metadata.name.as_deref().unwrap_or_default()
    )
}

/// Retries a failed reconcile by the kind of its error (see [`Retry`]).
pub fn error_policy(job: Arc<DynamicObject>, error: &ControllerError, ctx: Arc<Context>) -> Action {
    let retry = error.retry();
    if retry == Retry::AtOnce {
        // Someone else (the workers, reporting progress) wrote the job in
        // the meantime: not a failure, only a reason to look again.
        tracing::debug!("the job changed during the reconcile; again");
    } else {
        ctx.metrics.error(error.category());
        tracing::warn!(
            namespace = job.metadata.namespace.as_deref().unwrap_or_default(),
            job = job.metadata.name.as_deref().unwrap_or_default(),
            category = error.category(),
            error = %error,
            "reconcile failed; retrying"
        );
    }
    let in_a_row = if retry == Retry::Backoff {
        ctx.failed(&job)
    } else {
        1
    };
    match retry_after(retry, in_a_row) {
        Some(after) => Action::requeue(after),
        None => Action::await_change(),
    }
}

/// Runs the controller for the jobs of `namespace` (all namespaces when
/// `None`) until the stream ends, with metrics of its own.
pub async fn run(client: Client, namespace: Option<String>) {
    run_with(client, namespace, Arc::new(Metrics::new())).await
}

/// Runs the controller for the jobs of `namespace` (all namespaces when
/// `None`) until the stream ends. Node changes wake every job, so node loss
/// and new capacity are seen at once.
pub async fn run_with(client: Client, namespace: Option<String>, metrics: Arc<Metrics>) {
    // Jobs are watched as raw objects: one that weft's types cannot read
    // (a value the schema let through) must not fail the list of all.
    let resource = ApiResource::erase::<TrainingJob>(&());
    let jobs: Api<DynamicObject> = match &namespace {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &resource),
        None => Api::all_with(client.clone(), &resource),
    };
    let pods: Api<Pod> = match &namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let config_maps: Api<ConfigMap> = match &namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let services: Api<Service> = match &namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let (ctx, node_changes, caches) = Context::new(client.clone(), metrics.clone());
    let ctx = Arc::new(ctx);
    let _stop_caches = AbortOnDrop(caches);
    // Ready (for /readyz) once the caches are full (set by the context) and
    // unless the job watch failed lately: a leader that cannot reconcile
    // says so.
    metrics.clear_watch_failures();
    let controller = Controller::new_with(jobs, watcher::Config::default(), resource);
    let store = controller.store();
    metrics.watch_jobs(store.clone());
    let outcomes = metrics.clone();
    controller
        .owns(pods, watcher::Config::default().labels(LABEL_JOB))
        // A deleted or edited mesh ConfigMap or Service is put back at once.
        .owns(config_maps, watcher::Config::default().labels(LABEL_JOB))
        .owns(services, watcher::Config::default().labels(LABEL_JOB))
        .reconcile_all_on(node_changes)
        .run(crate::reconcile::reconcile, error_policy, ctx)
        .for_each(move |result| {
            match &result {
                Err(kube::runtime::controller::Error::QueueError(e)) => {
                    tracing::warn!(error = %e, "a watch of the controller (TrainingJobs, or their pods, ConfigMaps or Services) failed; retrying");
                    outcomes.watch_failed();
                }
                Err(e) => tracing::debug!(error = %e, "controller"),
                Ok(_) => {}
            }
            std::future::ready(())
        })
        .await;
}

/// Stops the cache watches when the controller that uses them stops (a
/// replica that loses its lease starts afresh when it leads again).
struct AbortOnDrop(Vec<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::pod;
    use kube::api::ObjectMeta;
    use weft_planner::cluster::parse_cluster;

    #[test]
    fn free_gpus_exclude_every_live_pod_and_survivors_are_the_jobs_live_pods() {
        let cluster = parse_cluster("2x8").unwrap();
        let cluster_nodes: Vec<ClusterNode> = cluster
            .nodes
            .iter()
            .map(|n| ClusterNode {
                node: n.clone(),
                ready: true,
                schedulable: true,
            })
            .collect();
        let a = cluster.nodes[0].name.clone();
        let b = cluster.nodes[1].name.clone();
        let mine = vec![
            pod("job-w0", &a, 4, "Running"),
            pod("job-w1", &b, 4, "Failed"),
        ];
        let mut all = mine.clone();
        all.push(pod("other", &b, 2, "Running"));
        all.push(pod("done", &b, 8, "Succeeded"));
        let (nodes, existing) = mesh_inputs(&cluster_nodes, &all, &mine);
        assert_eq!(
            nodes[0].free_gpus, 4,
            "the job's own live worker holds its GPUs"
        );
        assert_eq!(
            nodes[1].free_gpus, 6,
            "failed and finished pods hold nothing"
        );
        assert_eq!(
            existing,
            vec![ExistingWorker {
                name: "job-w0".into(),
                node: a
            }]
        );
    }

    fn kwok_node(name: &str, ready: &str, heartbeat: &str) -> Node {
        use k8s_openapi::api::core::v1::{NodeCondition, NodeStatus};
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
        let at: k8s_openapi::jiff::Timestamp = heartbeat.parse().unwrap();
        Node {
            metadata: ObjectMeta {
                name: Some(name.to_string()),
                ..Default::default()
            },
            status: Some(NodeStatus {
                conditions: Some(vec![NodeCondition {
                    type_: "Ready".into(),
                    status: ready.into(),
                    last_heartbeat_time: Some(Time(at)),
                    ..Default::default()
                }]),
                images: Some(vec![Default::default(); 3]),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn only_node_changes_that_matter_to_a_mesh_wake_the_jobs() {
        let events = vec![
            Ok(watcher::Event::Init),
            Ok(watcher::Event::InitApply(kwok_node(
                "a",
                "True",
                "2026-01-01T00:00:00Z",
            ))),
            Ok(watcher::Event::InitDone),
            // A heartbeat: nothing a mesh depends on changed.
            Ok(watcher::Event::Apply(kwok_node(
                "a",
                "True",
                "2026-01-01T00:00:10Z",
            ))),
            // Lost.
            Ok(watcher::Event::Apply(kwok_node(
                "a",
                "False",
                "2026-01-01T00:00:20Z",
            ))),
            Ok(watcher::Event::Apply(kwok_node(
                "a",
                "False",
                "2026-01-01T00:00:30Z",
            ))),
            Ok(watcher::Event::Delete(kwok_node(
                "a",
                "False",
                "2026-01-01T00:00:40Z",
            ))),
        ];
        let woken: Vec<()> =
            futures::executor::block_on(node_changes(futures::stream::iter(events)).collect());
        // The first sight of the node, the end of the initial list, Ready
        // turning False, and the deletion.
        assert_eq!(woken.len(), 4);
    }

    fn mesh_config_map(text: &str) -> ConfigMap {
        ConfigMap {
            data: Some([("mesh.json".to_string(), text.to_string())].into()),
            ..Default::default()
        }
    }

    fn published_mesh(job: &str, epoch: u64, workers: &[(&str, &str)]) -> String {
        serde_json::json!({
            "version": 1, "job": job, "epoch": epoch, "world_size": workers.len(),
            "workers": workers.iter().enumerate().map(|(i, (name, node))| serde_json::json!({
                "name": name, "node": node, "block": "b", "rack": "r", "first_rank": i,
                "gpus": 0, "slot_on_node": 0, "rank_nics": [], "node_nics": []
            })).collect::<Vec<_>>(),
            "node_groups": [],
        })
        .to_string()
    }

    fn members(workers: &[(&str, &str)]) -> BTreeSet<(String, String)> {
        workers
            .iter()
            .map(|(w, n)| (w.to_string(), n.to_string()))
            .collect()
    }

    #[test]
    fn a_published_mesh_is_trusted_only_as_far_as_the_status_agrees() {
        let two = [("a-worker-0", "n1"), ("a-worker-1", "n2")];
        let signed = |text: &str| {
            let mut cm = mesh_config_map(text);
            let digest = crate::build::mesh_digest(cm.data.as_ref().unwrap());
            cm.metadata.annotations =
                Some([(crate::build::ANNOTATION_MESH_DIGEST.to_string(), digest)].into());
            cm
        };
        let ours = published_mesh("a", 7, &two);
        assert!(serde_json::from_str::<MeshPlan>(&ours).is_ok(), "{ours}");
        for recorded in [7, 6, 3] {
            assert!(
                matches!(
                    read_published(Some(&signed(&ours)), "a", recorded),
                    Published::Trusted(_)
                ),
                "weft's own mesh of epoch 7 with the status at {recorded}"
            );
        }
        // Without a digest (a weft from before it): the recorded epoch or the next.
        assert!(matches!(
            read_published(Some(&mesh_config_map(&ours)), "a", 6),
            Published::Trusted(_)
        ));
        assert_eq!(read_published(None, "a", 7), Published::Absent);
        let mut edited = signed(&ours);
        edited
            .data
            .as_mut()
            .unwrap()
            .insert("mesh.json".into(), published_mesh("a", 7, &two[..1]));
        for (config_map, recorded, claimed, why) in [
            (edited, 7, Some(7), "differ from what weft wrote"),
            (signed(&published_mesh("a", 7, &two)), 8, Some(7), "below"),
            (
                mesh_config_map(&published_mesh("a", 1000, &two)),
                7,
                Some(1000),
                "epoch 1000",
            ),
            (
                signed(&published_mesh("a", u64::MAX, &two)),
                7,
                None,
                "past the largest",
            ),
            (
                signed(&published_mesh("b", 7, &two)),
                7,
                Some(7),
                "job \"b\"",
            ),
            (
                signed(&published_mesh(
                    "a",
                    7,
                    &[("a-worker-0", "n1"), ("a-worker-0", "n2")],
                )),
                7,
                Some(7),
                "twice",
            ),
            (mesh_config_map("{not json"), 7, None, "cannot be read"),
            (
                mesh_config_map(r#"{"epoch": -1}"#),
                7,
                None,
                "cannot be read",
            ),
        ] {
            match read_published(Some(&config_map), "a", recorded) {
                Published::Untrusted { epoch, why: said } => {
                    assert_eq!(epoch, claimed, "{said}");
                    assert!(said.contains(why), "{said}");
                }
                other => panic!("{config_map:?} was {other:?}"),
            }
        }
        assert!(matches!(
            read_published(Some(&ConfigMap::default()), "a", 7),
            Published::Untrusted { .. }
        ));
    }

    #[test]
    fn the_epoch_moves_exactly_when_the_membership_changes_and_never_back() {
        let two = [("a-worker-0", "n1"), ("a-worker-1", "n2")];
        let trusted = |epoch| {
            Published::Trusted(serde_json::from_str(&published_mesh("a", epoch, &two)).unwrap())
        };
        let none = BTreeSet::new();
        type Set = BTreeSet<(String, String)>;
        fn next(
            recorded: u64,
            published: &Published,
            alive: &Set,
            made: &Set,
            after: &Set,
        ) -> (u64, bool) {
            let e = next_epoch(recorded, published, alive, made, after).unwrap();
            (e.epoch, e.moved)
        }
        // The same live workers: the same epoch.
        assert_eq!(
            next(7, &trusted(7), &members(&two), &none, &members(&two)),
            (7, false)
        );
        // Published, but the status write that records it was lost: the
        // same epoch, which the status has yet to record.
        assert_eq!(
            next(7, &trusted(8), &members(&two), &none, &members(&two)),
            (8, true)
        );
        // One lost: a new epoch; one kept, one left.
        let one = members(&two[..1]);
        let shrunk = next_epoch(7, &trusted(7), &one, &none, &one).unwrap();
        assert_eq!((shrunk.epoch, shrunk.moved), (8, true));
        assert_eq!((shrunk.kept.len(), shrunk.previous.len()), (1, 2));
        // Resumed: the same names and nodes, but new pods.
        assert_eq!(
            next(7, &trusted(7), &none, &none, &members(&two)),
            (8, true)
        );
        // The ConfigMap deleted: put back at the same epoch when the live
        // workers are those made for it...
        assert_eq!(
            next(
                7,
                &Published::Absent,
                &members(&two),
                &members(&two),
                &members(&two)
            ),
            (7, false)
        );
        // ... and a new one when a worker was made for an epoch never published.
        assert_eq!(
            next(7, &Published::Absent, &members(&two), &one, &members(&two)),
            (8, true)
        );
        // The first mesh.
        assert_eq!(
            next(0, &Published::Absent, &none, &none, &members(&two)),
            (1, true)
        );
        // Edited by hand: published again above what it claims, never back
        // (workers follow only newer epochs).
        let edited = |epoch| Published::Untrusted {
            epoch,
            why: "edited".to_string(),
        };
        let all = members(&two);
        assert_eq!(next(7, &edited(Some(1000)), &all, &all, &all), (1001, true));
        assert_eq!(next(7, &edited(Some(7)), &all, &all, &all), (8, true));
        assert_eq!(next(7, &edited(None), &all, &all, &all), (8, true));
        // Never past MAX_EPOCH: a change there cannot be published.
        assert!(next_epoch(7, &edited(Some(MAX_EPOCH)), &all, &all, &all).is_none());
        assert!(next_epoch(u64::MAX, &trusted(MAX_EPOCH), &one, &one, &one).is_none());
        assert_eq!(
            next(MAX_EPOCH, &trusted(MAX_EPOCH), &all, &none, &all),
            (MAX_EPOCH, false),
            "no change at the last epoch is fine"
        );
    }

    #[test]
    fn a_pod_is_the_jobs_only_when_the_job_is_its_controller() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
        let mut worker = pod("a-worker-0", "n1", 8, "Running");
        let reference = |uid: &str, controller| OwnerReference {
            api_version: "weft.dev/v1alpha1".into(),
            kind: "TrainingJob".into(),
            name: "a".into(),
            uid: uid.into(),
            controller: Some(controller),
            ..Default::default()
        };
        assert!(!owned_by(&worker, "uid-a"), "a label alone is not enough");
        worker.metadata.owner_references = Some(vec![reference("uid-a", true)]);
        assert!(owned_by(&worker, "uid-a"));
        assert!(
            !owned_by(&worker, "uid-b"),
            "a job of the same name, re-created"
        );
        assert!(!owned_by(&worker, ""));
        worker.metadata.owner_references = Some(vec![reference("uid-a", false)]);
        assert!(
            !owned_by(&worker, "uid-a"),
            "an owner that is not the controller"
        );
    }

    #[test]
    fn a_worker_refused_where_another_job_holds_the_gpus_is_contended_not_sick() {
        use k8s_openapi::api::core::v1::PodCondition;
        let refused = |name: &str, node: &str, uid: &str| {
            let mut p = pod(name, node, 4, "Pending");
            p.metadata.uid = Some(uid.into());
            let spec = p.spec.as_mut().unwrap();
            spec.node_name = None;
            spec.node_selector =
                Some([("kubernetes.io/hostname".to_string(), node.to_string())].into());
            p.status.as_mut().unwrap().conditions = Some(vec![PodCondition {
                type_: "PodScheduled".into(),
                status: "False".into(),
                reason: Some("Unschedulable".into()),
                message: Some("0/4 nodes are available: 1 Insufficient nvidia.com/gpu.".into()),
                ..Default::default()
            }]);
            p
        };
        let mine = vec![
            refused("a-worker-0", "n1", "u0"),
            refused("a-worker-1", "n2", "u1"),
        ];
        let mut theirs = pod("b-worker-0", "n1", 8, "Running");
        theirs.metadata.uid = Some("ub".into());
        let mut all = mine.clone();
        all.push(theirs);
        let capacity: BTreeMap<String, u32> = [("n1".to_string(), 8), ("n2".to_string(), 8)].into();
        assert_eq!(
            contended_workers(&mine, &all, &capacity),
            BTreeSet::from(["a-worker-0".to_string()]),
            "n1's GPUs are another job's; n2 refuses for a reason of its own"
        );
        // Room beside the other job's pods: a refusal there is the node's.
        let roomy: BTreeMap<String, u32> = [("n1".to_string(), 16), ("n2".to_string(), 8)].into();
        assert!(contended_workers(&mine, &all, &roomy).is_empty());
    }

    #[test]
    fn a_job_that_cannot_be_read_names_the_field() {
        let job = TrainingJob::new("a", weft_crds::TrainingJobSpec::new("weft:dev", 1, 2));
        let mut object: DynamicObject =
            serde_json::from_value(serde_json::to_value(&job).unwrap()).unwrap();
        assert_eq!(read_job(&object).unwrap().spec, job.spec);
        object.data["status"] = serde_json::json!({
            "phase": "Running",
            "lastRescaleTime": "2026-12-06T12:00:00.123456789123Z",
        });
        match read_job(&object) {
            Err(ControllerError::Unreadable { path, error }) => {
                assert_eq!(path, "status.lastRescaleTime");
                assert!(error.contains("unparsed input"), "{error}");
            }
            other => panic!("expected Unreadable, got {other:?}"),
        }
    }

    #[test]
    fn a_jobs_own_pods_keep_what_its_decisions_read() {
        let job = crate::testing::job(2, 2);
        let mut full = crate::testing::exited(
            crate::testing::worker(&job, "llm-worker-1", "n1", 3, "Running"),
            1,
            "rendezvous store at llm-worker-0.llm:29503 failed",
        );
        full.metadata.managed_fields = Some(vec![Default::default(); 3]);
        full.metadata.deletion_timestamp = Some(crate::testing::at(5));
        if let Some(spec) = full.spec.as_mut() {
            spec.containers[0].env = Some(vec![Default::default(); 4]);
            spec.containers[0].volume_mounts = Some(vec![Default::default(); 2]);
            spec.volumes = Some(vec![Default::default(); 2]);
        }
        let slim = slim_worker(full.clone());
        assert_eq!(slim.metadata.managed_fields, None);
        let spec = slim.spec.as_ref().unwrap();
        assert!(spec.volumes.is_none());
        assert!(spec.containers[0].env.is_none() && spec.containers[0].volume_mounts.is_none());
        // What the decisions read is as it was.
        assert_eq!(slim.metadata.labels, full.metadata.labels);
        assert_eq!(
            slim.metadata.owner_references,
            full.metadata.owner_references
        );
        assert_eq!(
            slim.metadata.deletion_timestamp,
            full.metadata.deletion_timestamp
        );
        assert_eq!(slim.status, full.status);
        assert_eq!(spec.node_name, full.spec.as_ref().unwrap().node_name);
        assert_eq!(
            spec.node_selector,
            full.spec.as_ref().unwrap().node_selector
        );
        assert_eq!(
            spec.containers[0].resources,
            full.spec.as_ref().unwrap().containers[0].resources
        );
        assert_eq!(
            crate::lifecycle::failure_reason(&slim),
            crate::lifecycle::failure_reason(&full)
        );
    }

    #[test]
    fn cached_pods_keep_what_gpu_accounting_reads() {
        let mut full = pod("w-0", "n1", 8, "Running");
        if let Some(spec) = full.spec.as_mut() {
            spec.containers[0].env = Some(vec![Default::default(); 4]);
            spec.volumes = Some(vec![Default::default(); 2]);
        }
        full.metadata.annotations = Some([("a".to_string(), "b".repeat(1000))].into());
        let mut slim = full.clone();
        slim_pod(&mut slim);
        assert_eq!(gpus_requested(&slim), 8);
        // Pinned, not yet bound: the node it will take stays known.
        let mut pinned = pod("w-1", "n2", 4, "Pending");
        if let Some(spec) = pinned.spec.as_mut() {
            spec.node_name = None;
            spec.node_selector =
                Some([("kubernetes.io/hostname".to_string(), "n2".to_string())].into());
        }
        slim_pod(&mut pinned);
        assert_eq!(
            pinned_node(pinned.spec.as_ref().unwrap()),
            Some("n2".to_string())
        );
        assert_eq!(crate::status::phase_of(&slim), "Running");
        assert_eq!(
            slim.spec.as_ref().and_then(|s| s.node_name.as_deref()),
            Some("n1")
        );
        assert!(slim.metadata.annotations.is_none());
        let spec = slim.spec.as_ref().unwrap();
        assert!(spec.volumes.is_none() && spec.containers[0].env.is_none());
        let mut node = kwok_node("a", "True", "2026-01-01T00:00:00Z");
        slim_node(&mut node);
        assert!(node.status.as_ref().unwrap().images.is_none());
    }

    #[test]
    fn a_failed_reconcile_is_retried_by_the_kind_of_its_error() {
        let api = |code: u16| {
            ControllerError::Api(kube::Error::Api(
                kube::core::Status::failure("the API server failed", "InternalError")
                    .with_code(code)
                    .boxed(),
            ))
        };
        let unreadable = ControllerError::Unreadable {
            path: "status.lastRescaleTime".into(),
            error: "bad time".into(),
        };
        let second = Duration::from_secs(1);
        let rows = [
            (
                "an object weft cannot read waits for a change",
                unreadable,
                1,
                None,
            ),
            (
                "a job without a namespace waits for a change",
                ControllerError::NoNamespace,
                3,
                None,
            ),
            (
                "a conflict is retried at once",
                ControllerError::Conflict,
                1,
                Some(Duration::from_millis(100)),
            ),
            (
                "a conflict again, still at once",
                ControllerError::Conflict,
                9,
                Some(Duration::from_millis(100)),
            ),
            ("an API outage backs off: first", api(503), 1, Some(second)),
            (
                "an API outage backs off: third",
                api(503),
                3,
                Some(4 * second),
            ),
            (
                "an API outage backs off: never past the most",
                api(500),
                40,
                Some(BACKOFF_MOST),
            ),
            (
                "caches that did not fill back off",
                ControllerError::CachesNotSynced(30),
                2,
                Some(2 * second),
            ),
            (
                "a stuck planning turn backs off",
                ControllerError::PlanningStalled(60),
                1,
                Some(second),
            ),
        ];
        for (case, error, in_a_row, wait) in rows {
            assert_eq!(retry_after(error.retry(), in_a_row), wait, "{case}");
        }
    }
}
