//! The controller: reconciles each `TrainingJob` through the pipeline
//! observe → plan → build → apply → status. Level-triggered: every reconcile
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
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::core::v1::{ConfigMap, Node, PersistentVolumeClaim, Pod, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{
    ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams,
};
use kube::runtime::controller::Action;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{Controller, WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use tracing::Instrument;
use weft_crds::topology::RESOURCE_GPU;
use weft_crds::{AVOID_NODE_SECONDS, Phase, TrainingJob};
use weft_planner::mesh::{ExistingWorker, MeshNode, MeshPlan, MeshRequest, plan_mesh};

use crate::build::{BuildError, LABEL_JOB, build, resolve_model};
use crate::events::{EventType, Events};
use crate::inventory::ClusterNode;
use crate::lifecycle::{
    avoided_nodes, finished_worker, growth_limit, new_failures, next_refusal_timeout,
    record_failures, restart_budget_exhausted,
};
use crate::metrics::Metrics;
use crate::status::{
    CONDITION_SCHEDULABLE, JobClaim, Observed, Outcome, compute_status, describe_refusals,
    find_condition, finished_status, missing_claim_status,
};

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

/// Pod creations a reconcile keeps in flight at once.
const POD_CREATES_IN_FLIGHT: usize = 16;

fn terminal(pod: &Pod) -> bool {
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
        .filter(|p| !terminal(p) && p.metadata.deletion_timestamp.is_none())
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
                .filter(|p| !terminal(p) && p.metadata.deletion_timestamp.is_none())
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
        .filter(|p| !terminal(p) && p.metadata.deletion_timestamp.is_none())
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

/// The workers of `mesh`: (name, node).
fn members(mesh: &MeshPlan) -> BTreeSet<(String, String)> {
    mesh.workers
        .iter()
        .map(|w| (w.name.clone(), w.node.clone()))
        .collect()
}

/// How the creation of one worker pod went.
#[derive(Debug)]
enum Creation {
    /// Created; its UID.
    Made(String),
    /// This job's pod of that name exists already (an earlier reconcile
    /// made it and the list did not show it yet).
    Exists,
    /// Refused for a reason a retry does not change soon: a quota, an
    /// invalid pod, a pod of that name that is not this job's.
    Refused(String),
    /// A pod of this job by that name is still being deleted: retried.
    Leaving,
    /// Failed otherwise (the API server unreachable, overloaded): retried.
    Failed(kube::Error),
}

async fn create_worker(pods: &Api<Pod>, pod: &Pod, job_uid: &str) -> Creation {
    match pods.create(&PostParams::default(), pod).await {
        Ok(made) => Creation::Made(made.metadata.uid.unwrap_or_default()),
        Err(kube::Error::Api(s)) if s.code == 409 => match pods.get_opt(&pod.name_any()).await {
            Ok(Some(other)) if !owned_by(&other, job_uid) => Creation::Refused(format!(
                "a pod named {} exists and is not this job's",
                pod.name_any()
            )),
            // This job's, on its way out (placed again elsewhere): made
            // once it is gone.
            Ok(Some(leaving)) if leaving.metadata.deletion_timestamp.is_some() => Creation::Leaving,
            Ok(Some(_)) => Creation::Exists,
            // Gone between the two calls.
            Ok(None) => Creation::Leaving,
            Err(e) => Creation::Failed(e),
        },
        Err(kube::Error::Api(s)) if matches!(s.code, 400 | 403 | 422) => {
            Creation::Refused(s.message)
        }
        Err(e) => Creation::Failed(e),
    }
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

/// The job's own pods: those labelled with its name whose controller is
/// this job. A pod that only carries the label (a user's, a batch Job's) is
/// never taken for a worker: not counted, not deleted, not its end.
async fn list_job_pods(pods: &Api<Pod>, job: &TrainingJob) -> Result<Vec<Pod>, ControllerError> {
    let uid = job.metadata.uid.as_deref().unwrap_or_default();
    let listed = pods
        .list(&ListParams::default().labels(&format!("{LABEL_JOB}={}", job.name_any())))
        .instrument(tracing::info_span!("list_job_pods"))
        .await?
        .items;
    Ok(listed.into_iter().filter(|p| owned_by(p, uid)).collect())
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
const TURN_WAIT: Duration = Duration::from_secs(60);

/// How long a job's turn waits for the cache to show the pods it created.
const CACHE_CATCH_UP: Duration = Duration::from_secs(5);

impl Planning {
    /// Waits (for at most [`CACHE_CATCH_UP`]) until `cache` holds every pod
    /// of `uids`.
    async fn cache_holds(cache: &Store<Pod>, uids: &[String]) {
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
            synced,
        };
        (
            ctx,
            node_changed,
            vec![tokio::spawn(node_watch), tokio::spawn(pod_watch), waiter],
        )
    }

    /// Waits until both caches hold a full list, for at most [`CACHE_WAIT`].
    async fn caches_synced(&self) -> Result<(), ControllerError> {
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

/// Publishes an event about `job`. Events are for people: a failure to
/// publish one is logged, never fails the reconcile.
async fn event(ctx: &Context, job: &TrainingJob, type_: EventType, reason: &str, note: String) {
    event_on(ctx, &job.object_ref(&()), type_, reason, note).await
}

/// Publishes an event about the object `regarding`.
async fn event_on(
    ctx: &Context,
    regarding: &ObjectReference,
    type_: EventType,
    reason: &str,
    note: String,
) {
    match type_ {
        EventType::Warning => tracing::warn!(reason, note, "event"),
        EventType::Normal => tracing::info!(reason, note, "event"),
    }
    if let Err(e) = ctx.events.publish(regarding, type_, reason, &note).await {
        tracing::warn!(reason, error = %e, "could not publish the event");
    }
}

/// One reconcile of one job, counted, timed and traced (a `reconcile` span
/// named after the job, with a child span for each call to the API server).
#[tracing::instrument(
    name = "reconcile",
    skip_all,
    fields(
        namespace = job.metadata.namespace.as_deref().unwrap_or_default(),
        job = job.metadata.name.as_deref().unwrap_or_default(),
        outcome = tracing::field::Empty,
    )
)]
pub async fn reconcile(
    job: Arc<DynamicObject>,
    ctx: Arc<Context>,
) -> Result<Action, ControllerError> {
    let started = std::time::Instant::now();
    let result = match reconcile_job(&job, ctx.clone()).await {
        // Someone else (the workers, reporting progress) wrote the job in
        // the meantime: not a failure, only a reason to look again at once.
        Err(ControllerError::Conflict) => {
            tracing::debug!("the job changed during the reconcile; again");
            Ok(Action::requeue(Duration::from_millis(100)))
        }
        other => other,
    };
    ctx.metrics.reconciles.inc();
    ctx.metrics
        .reconcile_seconds
        .observe(started.elapsed().as_secs_f64());
    let outcome = match &result {
        Ok(_) => "ok",
        Err(e) => e.category(),
    };
    tracing::Span::current().record("outcome", outcome);
    tracing::debug!(
        seconds = started.elapsed().as_secs_f64(),
        outcome,
        "reconciled"
    );
    result
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

async fn reconcile_job(
    cached: &DynamicObject,
    ctx: Arc<Context>,
) -> Result<Action, ControllerError> {
    let namespace = cached.namespace().ok_or(ControllerError::NoNamespace)?;
    let name = cached.name_any();
    let client = ctx.client.clone();
    let jobs: Api<TrainingJob> = Api::namespaced(client.clone(), &namespace);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    // The job as the API server holds it now, not as the watch cache last
    // saw it: the status accumulates (restarts, rescale times), and a status
    // computed from a stale copy would write old values over new ones. Every
    // status write is conditional on this version and keeps `job` current.
    // It is read as raw JSON first: a job with a value weft cannot read is
    // reported on that job, and every other job goes on.
    let resource = ApiResource::erase::<TrainingJob>(&());
    let Some(object) = Api::<DynamicObject>::namespaced_with(client.clone(), &namespace, &resource)
        .get_opt(&name)
        .instrument(tracing::info_span!("get_job"))
        .await?
    else {
        return Ok(Action::await_change());
    };
    let mut job = match read_job(&object) {
        Ok(job) => job,
        Err(err) => {
            event_on(
                &ctx,
                &object.object_ref(&resource),
                EventType::Warning,
                "Unreadable",
                format!("{err}; weft leaves this job as it is until the value is fixed"),
            )
            .await;
            return Err(err);
        }
    };
    let previous_phase = job.status.as_ref().map(|s| s.phase);

    // Observe: nodes and the cluster's pods from the watch caches, the job's
    // own pods afresh.
    ctx.caches_synced()
        .instrument(tracing::info_span!("wait_for_caches"))
        .await?;
    // Shared handles to the cached objects: nothing of the cluster is copied.
    let node_list = ctx.nodes.state();
    let (mut cluster_nodes, unreadable) = crate::inventory::read_nodes(&node_list);
    let unreadable_nodes: Vec<String> = unreadable.iter().map(ToString::to_string).collect();
    crate::inventory::fit_to_job(&mut cluster_nodes, &node_list, &job.spec.scheduling);
    let job_pods = list_job_pods(&pods, &job).await?;

    // An ended job keeps its workers stopped.
    if matches!(previous_phase, Some(Phase::Succeeded | Phase::Failed)) {
        stop_workers(&pods, &job_pods).await?;
        return Ok(Action::await_change());
    }

    // Validate what the schema cannot.
    if let Err(err) = resolve_model(&job.spec.model) {
        let outcome = Outcome::Failed {
            reason: "InvalidSpec".to_string(),
            message: err.to_string(),
        };
        return finish(&ctx, &jobs, &pods, &mut job, &job_pods, &outcome, &now, &[]).await;
    }

    // Restart budget: count each failed worker once, and write the count
    // down before anything is deleted, so a restart of the operator can
    // neither lose nor double it.
    let mut status = job.status.clone().unwrap_or_default();
    let failures = new_failures(&status, &job_pods, &now);
    if !failures.is_empty() {
        record_failures(&mut status, &failures);
        // Told once the count is written: a write that conflicts is done
        // again by the next reconcile, which would tell them again.
        let told: Vec<(&str, String)> = failures
            .iter()
            .map(|failure| {
                (
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
        // A worker that finished ends the job (below), whatever another
        // refused meanwhile.
        let refused = crate::lifecycle::refused_settings(&job_pods)
            .filter(|_| finished_worker(&job_pods).is_none())
            .map(|message| ("InvalidSpec", message));
        let exhausted = restart_budget_exhausted(&job, &status)
            .map(|message| ("RestartLimitExceeded", message));
        if let Some((reason, message)) = refused.or(exhausted) {
            job.status = Some(status);
            let outcome = Outcome::Failed {
                reason: reason.to_string(),
                message,
            };
            return finish(
                &ctx, &jobs, &pods, &mut job, &job_pods, &outcome, &now, &told,
            )
            .await;
        }
        write_status(&jobs, &mut job, &status).await?;
        for (reason, note) in told {
            event(&ctx, &job, EventType::Warning, reason, note).await;
        }
    }

    // Completion.
    if let Some(worker) = finished_worker(&job_pods) {
        let outcome = Outcome::Succeeded {
            message: format!("worker {} finished training", worker.name_any()),
        };
        return finish(&ctx, &jobs, &pods, &mut job, &job_pods, &outcome, &now, &[]).await;
    }

    // Suspended: no workers.
    if job.spec.suspend {
        stop_workers(&pods, &job_pods).await?;
        let mut status = job.status.clone().unwrap_or_default();
        status.phase = Phase::Suspended;
        status.workers_ready = 0;
        status.workers_ready_summary = Some(format!("0/{}", status.workers_desired));
        status.observed_generation = job.metadata.generation;
        write_status(&jobs, &mut job, &status).await?;
        if previous_phase != Some(Phase::Suspended) {
            event(
                &ctx,
                &job,
                EventType::Normal,
                "Suspended",
                format!("spec.suspend is true: {} workers stopped", job_pods.len()),
            )
            .await;
        }
        return Ok(Action::requeue(Duration::from_secs(60)));
    }

    // Workers not yet ended.
    let live = job_pods.iter().filter(|p| !terminal(p)).count();

    // The volumes (the checkpoint's, the job's own) must exist before any
    // worker is placed: a pod naming a missing claim is refused on every
    // node, which is not the nodes' fault. Workers already running keep
    // theirs (Kubernetes does not delete a claim while pods use it).
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &namespace);
    for claim in JobClaim::of(&job).into_iter().filter(|_| live == 0) {
        if claims
            .get_opt(claim.name())
            .instrument(tracing::info_span!("get_volume_claim"))
            .await?
            .is_some()
        {
            continue;
        }
        let status = missing_claim_status(&job, &claim, &now);
        let condition = find_condition(&status, CONDITION_SCHEDULABLE);
        let was_missing = job
            .status
            .as_ref()
            .and_then(|s| find_condition(s, CONDITION_SCHEDULABLE))
            .is_some_and(|c| Some(&c.message) == condition.map(|c| &c.message));
        let message = condition.map(|c| c.message.clone()).unwrap_or_default();
        write_status(&jobs, &mut job, &status).await?;
        if !was_missing {
            event(
                &ctx,
                &job,
                EventType::Warning,
                claim.missing_reason(),
                message,
            )
            .await;
        }
        return Ok(Action::requeue(Duration::from_secs(15)));
    }

    // Workers refused where another job's pods took the GPUs first: placed
    // again elsewhere, as if gone; their nodes are not to blame.
    let capacity: BTreeMap<String, u32> = cluster_nodes
        .iter()
        .map(|n| (n.node.name.clone(), n.node.gpus))
        .collect();
    let contended = contended_workers(&job_pods, &ctx.pods.state(), &capacity);
    let job_pods: Vec<Pod> = if contended.is_empty() {
        job_pods
    } else {
        tracing::info!(workers = ?contended, "workers refused on GPUs another job holds; placing them again");
        let (gone, kept): (Vec<Pod>, Vec<Pod>) = job_pods
            .into_iter()
            .partition(|p| contended.contains(&p.name_any()));
        for pod in &gone {
            delete_pod(&pods, &pod.name_any(), false).await?;
        }
        kept
    };

    // Nodes that will not take a worker: avoided for a while, recorded
    // before the mesh leaves them, so a restart of the operator keeps them.
    let mut status = job.status.clone().unwrap_or_default();
    let avoided = avoided_nodes(
        &status,
        &job_pods,
        i64::from(job.spec.elasticity.unschedulable_timeout_seconds.max(1)),
        &now,
    );
    if avoided != status.avoided_nodes {
        // Told once the status that records them is written.
        let told: Vec<String> = avoided
            .iter()
            .filter(|a| !status.avoided_nodes.iter().any(|b| b.node == a.node))
            .map(|node| {
                format!(
                    "node {}: {}; avoided for {AVOID_NODE_SECONDS} s",
                    node.node, node.reason
                )
            })
            .collect();
        status.avoided_nodes = avoided;
        write_status(&jobs, &mut job, &status).await?;
        for note in told {
            event(&ctx, &job, EventType::Warning, "NodeAvoided", note).await;
        }
    }
    for node in cluster_nodes.iter_mut() {
        if status
            .avoided_nodes
            .iter()
            .any(|a| a.node == node.node.name)
        {
            node.schedulable = false;
        }
    }

    // Workers refused below `min` a moment ago: not made again yet.
    let uid = job.metadata.uid.clone().unwrap_or_default();
    let refused_at = ctx
        .refused_below_min
        .lock()
        .ok()
        .and_then(|r| r.get(&uid).copied());
    if let Some(at) = refused_at {
        let left = REFUSAL_BACKOFF.saturating_sub(at.elapsed());
        let none_left = job_pods
            .iter()
            .all(|p| terminal(p) || p.metadata.deletion_timestamp.is_some());
        if !left.is_zero() && none_left {
            return Ok(Action::requeue(left + Duration::from_millis(100)));
        }
    }

    // Plan. The epoch the job records in its status is the reference; the
    // published mesh is input like any other and is trusted only as far as
    // it agrees with that record (see [`read_published`]).
    let recorded_epoch = job
        .status
        .as_ref()
        .map_or(0, |s| s.mesh_epoch.clamp(0, MAX_EPOCH as i64) as u64);
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &namespace);
    let published = read_published(
        config_maps
            .get_opt(&crate::build::mesh_config_map_name(&name))
            .await?
            .as_ref(),
        &name,
        recorded_epoch,
    );
    // This job's turn to plan: the cache holds the workers of jobs planned
    // before it (the turn ends once it holds this job's new ones).
    let turn = tokio::time::timeout(TURN_WAIT, ctx.planning.turn.lock())
        .await
        .map_err(|_| ControllerError::PlanningStalled(TURN_WAIT.as_secs()))?;
    let accounted = ctx.pods.state();
    let (mesh_nodes, existing) = mesh_inputs(&cluster_nodes, &accounted, &job_pods);
    let (max_workers, cooldown_left) =
        growth_limit(&job, job.status.as_ref(), existing.len() as u32, &now);
    let request = MeshRequest {
        job: name.clone(),
        min_workers: job.spec.least_workers(),
        max_workers,
        gpus_per_worker: job.spec.resources.gpus.max(0) as u32,
        epoch: recorded_epoch.max(1),
    };
    let alive: BTreeSet<(String, String)> = existing
        .iter()
        .map(|w| (w.name.clone(), w.node.clone()))
        .collect();
    let made_for = made_for_epoch(&job_pods, recorded_epoch);
    let plan_span = tracing::info_span!("plan_mesh", nodes = mesh_nodes.len());
    let mut planned = plan_span.in_scope(|| plan_mesh(&request, &mesh_nodes, &existing));
    // The epoch of a planned mesh (`None` past the last); the new workers
    // are made for the first plan's (their environment says it), should
    // every one of them be made.
    let epoch_of = |mesh: &MeshPlan| {
        next_epoch(
            recorded_epoch,
            &published,
            &alive,
            &made_for,
            &members(mesh),
        )
    };
    let mut next = planned.as_ref().ok().and_then(epoch_of);
    if let Ok(mesh) = planned.as_mut() {
        mesh.epoch = next.as_ref().map_or(MAX_EPOCH, |e| e.epoch);
    }

    // Apply: the workers first, then the mesh that names them, so a mesh
    // epoch is published only for workers that exist.
    let mut status = job.status.clone().unwrap_or_default();
    let mut refused: Vec<(String, String)> = Vec::new();
    if let Ok(mesh) = &planned {
        let objects = build(&job, mesh)?;
        apply(&client, &namespace, &objects.service).await?;
        // The workers' identity, before any pod that runs as it.
        apply(&client, &namespace, &objects.account).await?;
        apply(&client, &namespace, &objects.role).await?;
        apply(&client, &namespace, &objects.role_binding).await?;
        // Surviving pods are left as they are (a pod's spec cannot change);
        // missing ones are created; ones the mesh dropped are deleted.
        let wanted: BTreeSet<String> = objects.pods.iter().map(|p| p.name_any()).collect();
        // A pod bound to a node that no longer exists has no kubelet to
        // stop it and confirm: it is removed at once (as the pod garbage
        // collector would, a minute later), so the job does not wait on it.
        let known_nodes: BTreeSet<&str> = node_list
            .iter()
            .filter_map(|n| n.metadata.name.as_deref())
            .collect();
        for pod in &job_pods {
            if !wanted.contains(&pod.name_any()) || terminal(pod) {
                let orphaned = pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.node_name.as_deref())
                    .is_some_and(|node| !known_nodes.contains(node));
                delete_pod(&pods, &pod.name_any(), orphaned).await?;
            }
        }
        // A pod on its way out is not present: its name may be planned for a
        // new worker, which is made once it is gone.
        let present: BTreeSet<String> = job_pods
            .iter()
            .filter(|p| !terminal(p) && p.metadata.deletion_timestamp.is_none())
            .map(|p| p.name_any())
            .collect();
        // Created side by side: one at a time, a 256-worker job spends
        // seconds on round trips before its last worker exists.
        let missing: Vec<Pod> = objects
            .pods
            .iter()
            .filter(|p| !present.contains(&p.name_any()))
            .cloned()
            .collect();
        let uid = job.metadata.uid.clone().unwrap_or_default();
        let created: Vec<(String, Creation)> = futures::stream::iter(missing)
            .map(|pod: Pod| {
                let pods = pods.clone();
                let uid = uid.clone();
                async move { (pod.name_any(), create_worker(&pods, &pod, &uid).await) }
            })
            .buffer_unordered(POD_CREATES_IN_FLIGHT)
            .collect()
            .instrument(tracing::info_span!("create_pods"))
            .await;
        // The pods that were made count before the turn ends, even when
        // another's creation failed.
        let made: Vec<String> = created
            .iter()
            .filter_map(|(_, c)| match c {
                Creation::Made(uid) => Some(uid.clone()),
                _ => None,
            })
            .collect();
        Planning::cache_holds(&ctx.pods, &made).await;
        let mut failed = None;
        let mut leaving = None;
        for (worker, creation) in created {
            match creation {
                Creation::Made(_) | Creation::Exists => {}
                Creation::Refused(why) => refused.push((worker, why)),
                Creation::Leaving => leaving = Some(worker),
                Creation::Failed(e) => failed = Some(e),
            }
        }
        // Retried as a whole: the next reconcile sees the pods made so far.
        if let Some(e) = failed {
            return Err(e.into());
        }
        if let Some(worker) = leaving {
            // Not a failure: the name is free again in a moment.
            tracing::debug!(
                worker,
                "a worker's name is still held by a pod being deleted"
            );
            return Ok(Action::requeue(Duration::from_secs(1)));
        }
        if !refused.is_empty() {
            // Refused for good (a quota, a name, a conflict): the job runs
            // with the workers that exist, if they are enough.
            refused.sort();
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
                ..request.clone()
            };
            planned = plan_mesh(&request, &mesh_nodes, &standing);
            next = planned.as_ref().ok().and_then(epoch_of);
        }
    }
    drop(turn);
    if !refused.is_empty() {
        event(
            &ctx,
            &job,
            EventType::Warning,
            "WorkersRefused",
            format!(
                "{}; {}",
                describe_refusals(&refused),
                match &planned {
                    Ok(mesh) => format!("running with {}", mesh.workers.len()),
                    Err(_) => "too few remain to run".to_string(),
                }
            ),
        )
        .await;
    }
    match planned.as_mut() {
        Ok(mesh) => {
            if refused_at.is_some()
                && let Ok(mut r) = ctx.refused_below_min.lock()
            {
                r.remove(&uid);
            }
            let Some(epoch) = next.take() else {
                let outcome = Outcome::Failed {
                    reason: "MeshEpochsExhausted".to_string(),
                    message: format!(
                        "the mesh epoch reached {MAX_EPOCH}, the largest weft publishes; \
                         the membership cannot change again"
                    ),
                };
                let job_pods = list_job_pods(&pods, &job).await?;
                return finish(&ctx, &jobs, &pods, &mut job, &job_pods, &outcome, &now, &[]).await;
            };
            mesh.epoch = epoch.epoch;
            tracing::debug!(
                epoch = mesh.epoch,
                workers = mesh.workers.len(),
                "mesh planned"
            );
            if let Published::Untrusted { why, .. } = &published {
                event(
                    &ctx,
                    &job,
                    EventType::Warning,
                    "MeshRepublished",
                    format!(
                        "the published mesh was not the one weft wrote ({why}); published again as epoch {}",
                        mesh.epoch
                    ),
                )
                .await;
            }
            let objects = build(&job, mesh)?;
            apply(&client, &namespace, &objects.mesh).await?;
            if status.start_time.is_none() {
                status.start_time = Some(now.clone());
            }
            if epoch.moved {
                status.last_rescale_time = Some(now.clone());
                // The previous mesh's live workers the new one keeps stayed;
                // every other worker of the previous mesh left.
                let kept = mesh
                    .workers
                    .iter()
                    .filter(|w| epoch.kept.contains(&(w.name.clone(), w.node.clone())))
                    .count();
                let joined = mesh.workers.len() - kept;
                let left = epoch.previous.len().saturating_sub(kept);
                // A worker on a node that can no longer be read is moved:
                // weft cannot place ranks on a topology it cannot read.
                let moved_off: Vec<String> = epoch
                    .previous
                    .iter()
                    .filter(|(w, _)| !mesh.workers.iter().any(|m| &m.name == w))
                    .filter_map(|(w, node)| {
                        let why = unreadable.iter().find(|e| e.node() == Some(node))?;
                        Some(format!("{w} from {why}"))
                    })
                    .collect();
                event(
                    &ctx,
                    &job,
                    EventType::Normal,
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
                .await;
            }
        }
        Err(err) => {
            if !refused.is_empty()
                && let Ok(mut r) = ctx.refused_below_min.lock()
            {
                r.insert(uid.clone(), std::time::Instant::now());
            }
            // Below min (or never started): hold no GPUs while waiting, so
            // two half-placed gangs can never deadlock each other.
            // Workers made just now before others were refused are counted.
            let relisted;
            let current: &[Pod] = if refused.is_empty() {
                &job_pods
            } else {
                relisted = list_job_pods(&pods, &job).await?;
                &relisted
            };
            let live = current.iter().filter(|p| !terminal(p)).count();
            if live > 0 {
                stop_workers(&pods, current).await?;
                let why = if refused.is_empty() {
                    err.to_string()
                } else {
                    format!(
                        "{}, and fewer than {} remain",
                        describe_refusals(&refused),
                        crate::status::least_workers_named(&job.spec)
                    )
                };
                event(
                    &ctx,
                    &job,
                    EventType::Warning,
                    "BelowMinimum",
                    format!("{live} workers stopped: {why}"),
                )
                .await;
            }
        }
    }
    job.status = Some(status);

    // Status, from a fresh look at the job's pods.
    let job_pods = list_job_pods(&pods, &job).await?;
    let status = compute_status(
        &job,
        &Observed {
            mesh: planned.as_ref(),
            pods: &job_pods,
            refused: &refused,
            unreadable_nodes: &unreadable_nodes,
            now: now.clone(),
        },
    );
    write_status(&jobs, &mut job, &status).await?;
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
        event(&ctx, &job, type_, &format!("{:?}", status.phase), note).await;
    }
    let look_again = match cooldown_left {
        // When growth is allowed.
        Some(left) if planned.is_ok() => left + Duration::from_secs(1),
        _ => Duration::from_secs(30),
    };
    // And when a worker the scheduler refuses reaches its timeout.
    let refusal = next_refusal_timeout(
        &job_pods,
        i64::from(job.spec.elasticity.unschedulable_timeout_seconds.max(1)),
        &now,
    );
    Ok(Action::requeue(match refusal {
        Some(left) => look_again.min(left + Duration::from_secs(1)),
        None => look_again,
    }))
}

/// Ends the job: writes the final status first (so a restarted operator
/// sees the job has ended), then stops every worker still running.
#[allow(clippy::too_many_arguments)]
async fn finish(
    ctx: &Context,
    jobs: &Api<TrainingJob>,
    pods: &Api<Pod>,
    job: &mut TrainingJob,
    job_pods: &[Pod],
    outcome: &Outcome,
    now: &Time,
    told_first: &[(&str, String)],
) -> Result<Action, ControllerError> {
    let status = finished_status(job, outcome, now);
    write_status(jobs, job, &status).await?;
    // Events the written status records, before the end's own.
    for (reason, note) in told_first {
        event(ctx, job, EventType::Warning, reason, note.clone()).await;
    }
    stop_workers(pods, job_pods).await?;
    let (type_, reason, note) = match outcome {
        Outcome::Succeeded { message } => (EventType::Normal, "Succeeded", message.clone()),
        Outcome::Failed { reason, message } => {
            (EventType::Warning, reason.as_str(), message.clone())
        }
    };
    event(ctx, job, type_, reason, note).await;
    Ok(Action::await_change())
}

/// Applies `object` in `namespace` (server-side apply, as the operator's
/// field manager, taking over fields another manager set).
async fn apply<K>(client: &Client, namespace: &str, object: &K) -> Result<(), ControllerError>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::Serialize
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let params = PatchParams::apply(FIELD_MANAGER).force();
    Api::<K>::namespaced(client.clone(), namespace)
        .patch(&object.name_any(), &params, &Patch::Apply(object))
        .await?;
    Ok(())
}

/// Deletes every worker pod that still runs (finished pods hold no GPUs and
/// keep their logs).
#[tracing::instrument(skip_all)]
async fn stop_workers(pods: &Api<Pod>, job_pods: &[Pod]) -> Result<(), ControllerError> {
    for pod in job_pods
        .iter()
        .filter(|p| !terminal(p) && p.metadata.deletion_timestamp.is_none())
    {
        delete_pod(pods, &pod.name_any(), false).await?;
    }
    Ok(())
}

#[tracing::instrument(skip(pods))]
async fn delete_pod(pods: &Api<Pod>, name: &str, force: bool) -> Result<(), ControllerError> {
    let params = if force {
        DeleteParams {
            grace_period_seconds: Some(0),
            ..Default::default()
        }
    } else {
        DeleteParams::default()
    };
    match pods.delete(name, &params).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// The status fields the job's workers write (its progress); the operator
/// reads them and never writes them.
pub const WORKER_STATUS_FIELDS: [&str; 3] = ["step", "tokensPerSecond", "lastCheckpoint"];

/// Writes `status` if the job is still at the version `job` was read at (a
/// write from an older view fails with a conflict and the reconcile runs
/// again), and brings `job` up to the written version.
#[tracing::instrument(skip_all, fields(phase = ?status.phase))]
async fn write_status(
    jobs: &Api<TrainingJob>,
    job: &mut TrainingJob,
    status: &weft_crds::TrainingJobStatus,
) -> Result<(), ControllerError> {
    let mut operators_part =
        serde_json::to_value(status).map_err(|e| ControllerError::Serialise(e.to_string()))?;
    // The workers' own fields are left as they are: never written back from
    // the operator's copy (a time is re-written in another form on the way).
    if let Some(fields) = operators_part.as_object_mut() {
        for field in WORKER_STATUS_FIELDS {
            fields.remove(field);
        }
    }
    let body = serde_json::json!({
        "metadata": { "resourceVersion": job.metadata.resource_version },
        "status": operators_part,
    });
    let written = jobs
        .patch_status(
            &job.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&body),
        )
        .await
        .map_err(|e| match e {
            kube::Error::Api(s) if s.code == 409 => ControllerError::Conflict,
            e => e.into(),
        })?;
    job.metadata.resource_version = written.metadata.resource_version;
    job.status = written.status;
    Ok(())
}

/// Retries a failed reconcile soon, without hammering the API server.
pub fn error_policy(job: Arc<DynamicObject>, error: &ControllerError, ctx: Arc<Context>) -> Action {
    ctx.metrics.error(error.category());
    tracing::warn!(
        namespace = job.metadata.namespace.as_deref().unwrap_or_default(),
        job = job.metadata.name.as_deref().unwrap_or_default(),
        category = error.category(),
        error = %error,
        "reconcile failed; retrying"
    );
    match error {
        // Only a change of the object helps (and wakes it at once).
        ControllerError::Unreadable { .. } => Action::requeue(Duration::from_secs(60)),
        _ => Action::requeue(Duration::from_secs(5)),
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
        .run(reconcile, error_policy, ctx)
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
    use k8s_openapi::api::core::v1::{Container, PodSpec, PodStatus, ResourceRequirements};
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
    use kube::api::ObjectMeta;
    use weft_planner::cluster::parse_cluster;

    fn pod(name: &str, node: &str, gpus: u32, phase: &str) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("ns".into()),
                ..Default::default()
            },
            spec: Some(PodSpec {
                node_name: Some(node.into()),
                containers: vec![Container {
                    name: "c".into(),
                    resources: Some(ResourceRequirements {
                        limits: Some(BTreeMap::from([(
                            RESOURCE_GPU.to_string(),
                            Quantity(gpus.to_string()),
                        )])),
                        ..Default::default()
                    }),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            status: Some(PodStatus {
                phase: Some(phase.into()),
                ..Default::default()
            }),
        }
    }

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
}
