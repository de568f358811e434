//! The controller: reconciles each `TrainingJob` through the pipeline
//! observe → plan → build → apply → status. Level-triggered: every reconcile
//! starts from what the API server holds now (nodes, pods, the job), so a
//! restarted operator converges to the same objects, and nothing is created
//! twice (pods by name, everything else by server-side apply).
//!
//! - **Gang start**: pods are created only once a mesh places at least
//!   `workers.min` workers on healthy nodes; until then the job is Pending
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
use k8s_openapi::api::core::v1::{ConfigMap, Node, PersistentVolumeClaim, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{Controller, WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use tracing::Instrument;
use weft_crds::topology::RESOURCE_GPU;
use weft_crds::{AVOID_NODE_SECONDS, Phase, TrainingJob};
use weft_planner::mesh::{ExistingWorker, MeshNode, MeshPlan, MeshRequest, plan_mesh};

use crate::build::{BuildError, LABEL_JOB, build, resolve_model};
use crate::inventory::ClusterNode;
use crate::lifecycle::{
    avoided_nodes, finished_worker, growth_limit, new_failures, next_refusal_timeout,
    record_failures, restart_budget_exhausted,
};
use crate::metrics::Metrics;
use crate::status::{
    CONDITION_SCHEDULABLE, Observed, Outcome, REASON_CLAIM_NOT_FOUND, compute_status,
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
        let node = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone().or_else(|| pinned_node(s)));
        if let Some(node) = node {
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
            let node = p
                .spec
                .as_ref()
                .and_then(|s| s.node_name.clone().or_else(|| pinned_node(s)))?;
            Some(ExistingWorker {
                name: p.name_any(),
                node,
            })
        })
        .collect();
    (nodes, existing)
}

/// The node a worker pod is pinned to by its node selector (before it is bound).
fn pinned_node(spec: &k8s_openapi::api::core::v1::PodSpec) -> Option<String> {
    spec.node_selector
        .as_ref()?
        .get("kubernetes.io/hostname")
        .cloned()
}

/// Shared by every reconcile.
pub struct Context {
    pub client: Client,
    /// Publishes Kubernetes events about jobs.
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    /// Every node, kept current by a watch (slimmed: see [`slim_node`]).
    pub nodes: Store<Node>,
    /// Every pod of the cluster, for the GPUs each node has left (slimmed:
    /// see [`slim_pod`]). A job's own pods are listed afresh each reconcile.
    pub pods: Store<Pod>,
    /// One job plans at a time (see [`Planning`]).
    pub planning: Planning,
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
        let reporter = Reporter {
            controller: FIELD_MANAGER.to_string(),
            instance: std::env::var("POD_NAME").ok(),
        };
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
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            nodes,
            pods,
            planning: Planning::default(),
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
    let event = Event {
        type_,
        reason: reason.to_string(),
        note: Some(note),
        action: "Reconcile".to_string(),
        secondary: None,
    };
    match type_ {
        EventType::Warning => tracing::warn!(reason, note = event.note, "event"),
        EventType::Normal => tracing::info!(reason, note = event.note, "event"),
    }
    if let Err(e) = ctx.recorder.publish(&event, &job.object_ref(&())).await {
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
    job: Arc<TrainingJob>,
    ctx: Arc<Context>,
) -> Result<Action, ControllerError> {
    let started = std::time::Instant::now();
    let result = match reconcile_job(job, ctx.clone()).await {
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

async fn reconcile_job(
    cached: Arc<TrainingJob>,
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
    let Some(mut job) = jobs
        .get_opt(&name)
        .instrument(tracing::info_span!("get_job"))
        .await?
    else {
        return Ok(Action::await_change());
    };
    let previous_phase = job.status.as_ref().map(|s| s.phase);

    // Observe: nodes and the cluster's pods from the watch caches, the job's
    // own pods afresh.
    ctx.caches_synced()
        .instrument(tracing::info_span!("wait_for_caches"))
        .await?;
    // Shared handles to the cached objects: nothing of the cluster is copied.
    let node_list = ctx.nodes.state();
    let (mut cluster_nodes, _unreadable) = crate::inventory::read_nodes(&node_list);
    crate::inventory::fit_to_job(&mut cluster_nodes, &node_list, &job.spec.scheduling);
    let job_pods = pods
        .list(&ListParams::default().labels(&format!("{LABEL_JOB}={name}")))
        .instrument(tracing::info_span!("list_job_pods"))
        .await?
        .items;

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
        return finish(&ctx, &jobs, &pods, &mut job, &job_pods, &outcome, &now).await;
    }

    // Restart budget: count each failed worker once, and write the count
    // down before anything is deleted, so a restart of the operator can
    // neither lose nor double it.
    let mut status = job.status.clone().unwrap_or_default();
    let failures = new_failures(&status, &job_pods, &now);
    if !failures.is_empty() {
        record_failures(&mut status, &failures);
        for failure in &failures {
            event(
                &ctx,
                &job,
                EventType::Warning,
                "WorkerFailed",
                format!(
                    "{}: {} (restart {} of {} allowed)",
                    failure.worker,
                    failure.reason,
                    status.restarts,
                    job.spec.elasticity.restart_limit
                ),
            )
            .await;
        }
        if let Some(message) = restart_budget_exhausted(&job, &status) {
            job.status = Some(status);
            let outcome = Outcome::Failed {
                reason: "RestartLimitExceeded".to_string(),
                message,
            };
            return finish(&ctx, &jobs, &pods, &mut job, &job_pods, &outcome, &now).await;
        }
        write_status(&jobs, &mut job, &status).await?;
    }

    // Completion.
    if let Some(worker) = finished_worker(&job_pods) {
        let outcome = Outcome::Succeeded {
            message: format!("worker {} finished training", worker.name_any()),
        };
        return finish(&ctx, &jobs, &pods, &mut job, &job_pods, &outcome, &now).await;
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

    // The checkpoint volume must exist before any worker is placed: a pod
    // naming a missing claim is refused on every node, which is not the
    // nodes' fault. Workers already running keep it (Kubernetes does not
    // delete a claim while pods use it).
    if let Some(claim) = &job.spec.checkpoint.claim_name {
        let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &namespace);
        if live == 0
            && claims
                .get_opt(claim)
                .instrument(tracing::info_span!("get_checkpoint_claim"))
                .await?
                .is_none()
        {
            let status = missing_claim_status(&job, claim, &now);
            let was_missing = job
                .status
                .as_ref()
                .and_then(|s| find_condition(s, CONDITION_SCHEDULABLE))
                .is_some_and(|c| c.reason == REASON_CLAIM_NOT_FOUND);
            write_status(&jobs, &mut job, &status).await?;
            if !was_missing {
                let message = find_condition(&status, CONDITION_SCHEDULABLE)
                    .map(|c| c.message.clone())
                    .unwrap_or_default();
                event(
                    &ctx,
                    &job,
                    EventType::Warning,
                    REASON_CLAIM_NOT_FOUND,
                    message,
                )
                .await;
            }
            return Ok(Action::requeue(Duration::from_secs(15)));
        }
    }

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
        for node in avoided
            .iter()
            .filter(|a| !status.avoided_nodes.iter().any(|b| b.node == a.node))
        {
            event(
                &ctx,
                &job,
                EventType::Warning,
                "NodeAvoided",
                format!(
                    "node {}: {}; avoided for {AVOID_NODE_SECONDS} s",
                    node.node, node.reason
                ),
            )
            .await;
        }
        status.avoided_nodes = avoided;
        write_status(&jobs, &mut job, &status).await?;
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

    // Plan. The current epoch is the published mesh's (the ConfigMap is the
    // record; a status written from a stale cache can lag behind it).
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &namespace);
    let published: Option<MeshPlan> = config_maps
        .get_opt(&crate::build::mesh_config_map_name(&name))
        .await?
        .and_then(|cm| cm.data?.get("mesh.json").cloned())
        .and_then(|text| serde_json::from_str(&text).ok());
    // This job's turn to plan: the cache holds the workers of jobs planned
    // before it (the turn ends once it holds this job's new ones).
    let turn = tokio::time::timeout(TURN_WAIT, ctx.planning.turn.lock())
        .await
        .map_err(|_| ControllerError::PlanningStalled(TURN_WAIT.as_secs()))?;
    let accounted = ctx.pods.state();
    let (mesh_nodes, existing) = mesh_inputs(&cluster_nodes, &accounted, &job_pods);
    let previous_epoch = job
        .status
        .as_ref()
        .map(|s| s.mesh_epoch.max(0) as u64)
        .unwrap_or(0)
        .max(published.as_ref().map_or(0, |m| m.epoch));
    let (max_workers, cooldown_left) =
        growth_limit(&job, job.status.as_ref(), existing.len() as u32, &now);
    let request = MeshRequest {
        job: name.clone(),
        min_workers: job.spec.workers.min.max(0) as u32,
        max_workers,
        gpus_per_worker: job.spec.resources.gpus.max(0) as u32,
        epoch: previous_epoch.max(1),
    };
    let alive: BTreeSet<(String, String)> = existing
        .iter()
        .map(|w| (w.name.clone(), w.node.clone()))
        .collect();
    let before: BTreeSet<(String, String)> = published
        .iter()
        .flat_map(|m| m.workers.iter())
        .map(|w| (w.name.clone(), w.node.clone()))
        .filter(|w| alive.contains(w))
        .collect();
    let plan_span = tracing::info_span!("plan_mesh", nodes = mesh_nodes.len());
    let planned = plan_span
        .in_scope(|| plan_mesh(&request, &mesh_nodes, &existing))
        .map(|mut mesh| {
            // The epoch moves on whenever the membership differs from the
            // published mesh's workers that are still alive.
            let after: BTreeSet<(String, String)> = mesh
                .workers
                .iter()
                .map(|w| (w.name.clone(), w.node.clone()))
                .collect();
            mesh.epoch = if before == after && previous_epoch > 0 {
                previous_epoch
            } else {
                previous_epoch + 1
            };
            mesh
        });

    // Build and apply.
    let mut status = job.status.clone().unwrap_or_default();
    match &planned {
        Ok(mesh) => {
            tracing::debug!(
                epoch = mesh.epoch,
                workers = mesh.workers.len(),
                "mesh planned"
            );
            let objects = build(&job, mesh)?;
            apply(&client, &namespace, &objects.mesh).await?;
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
            let present: BTreeSet<String> = job_pods
                .iter()
                .filter(|p| !terminal(p))
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
            let created: Vec<Result<Option<String>, kube::Error>> = futures::stream::iter(missing)
                .map(|pod: Pod| {
                    let pods = pods.clone();
                    async move {
                        match pods.create(&PostParams::default(), &pod).await {
                            Ok(made) => Ok(made.metadata.uid),
                            // Created by an earlier reconcile that did not see it yet.
                            Err(kube::Error::Api(s)) if s.code == 409 => Ok(None),
                            Err(e) => Err(e),
                        }
                    }
                })
                .buffer_unordered(POD_CREATES_IN_FLIGHT)
                .collect()
                .instrument(tracing::info_span!("create_pods"))
                .await;
            // The pods that were made count before the turn ends, even when
            // another's creation failed.
            let made: Vec<String> = created
                .iter()
                .filter_map(|r| r.as_ref().ok().cloned().flatten())
                .collect();
            Planning::cache_holds(&ctx.pods, &made).await;
            drop(turn);
            created.into_iter().collect::<Result<Vec<_>, _>>()?;
            if status.start_time.is_none() {
                status.start_time = Some(now.clone());
            }
            if mesh.epoch != previous_epoch {
                status.last_rescale_time = Some(now.clone());
                // `before` is the published mesh's live workers; those the new
                // mesh keeps stayed, every other published worker left.
                let kept = mesh
                    .workers
                    .iter()
                    .filter(|w| before.contains(&(w.name.clone(), w.node.clone())))
                    .count();
                let joined = mesh.workers.len() - kept;
                let left = published
                    .as_ref()
                    .map_or(0, |m| m.workers.len())
                    .saturating_sub(kept);
                event(
                    &ctx,
                    &job,
                    EventType::Normal,
                    "MeshEpoch",
                    format!(
                        "mesh epoch {}: {} workers ({} {}) on {} nodes; {joined} joined, {left} left",
                        mesh.epoch,
                        mesh.workers.len(),
                        mesh.world_size,
                        if mesh.workers.iter().any(|w| w.gpus > 0) {
                            "GPUs"
                        } else {
                            "CPU ranks"
                        },
                        mesh.node_groups.len()
                    ),
                )
                .await;
            }
        }
        Err(err) => {
            drop(turn);
            // Below min (or never started): hold no GPUs while waiting, so
            // two half-placed gangs can never deadlock each other.
            if live > 0 {
                stop_workers(&pods, &job_pods).await?;
                event(
                    &ctx,
                    &job,
                    EventType::Warning,
                    "BelowMinimum",
                    format!("{live} workers stopped: {err}"),
                )
                .await;
            }
        }
    }
    job.status = Some(status);

    // Status, from a fresh look at the job's pods.
    let job_pods = pods
        .list(&ListParams::default().labels(&format!("{LABEL_JOB}={name}")))
        .await?
        .items;
    let status = compute_status(
        &job,
        &Observed {
            mesh: planned.as_ref(),
            pods: &job_pods,
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
async fn finish(
    ctx: &Context,
    jobs: &Api<TrainingJob>,
    pods: &Api<Pod>,
    job: &mut TrainingJob,
    job_pods: &[Pod],
    outcome: &Outcome,
    now: &Time,
) -> Result<Action, ControllerError> {
    let status = finished_status(job, outcome, now);
    write_status(jobs, job, &status).await?;
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

/// Writes `status` if the job is still at the version `job` was read at (a
/// write from an older view fails with a conflict and the reconcile runs
/// again), and brings `job` up to the written version.
#[tracing::instrument(skip_all, fields(phase = ?status.phase))]
async fn write_status(
    jobs: &Api<TrainingJob>,
    job: &mut TrainingJob,
    status: &weft_crds::TrainingJobStatus,
) -> Result<(), ControllerError> {
    let body = serde_json::json!({
        "metadata": { "resourceVersion": job.metadata.resource_version },
        "status": status,
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
pub fn error_policy(job: Arc<TrainingJob>, error: &ControllerError, ctx: Arc<Context>) -> Action {
    ctx.metrics.error(error.category());
    tracing::warn!(
        namespace = job.metadata.namespace.as_deref().unwrap_or_default(),
        job = job.metadata.name.as_deref().unwrap_or_default(),
        category = error.category(),
        error = %error,
        "reconcile failed; retrying in 5 s"
    );
    Action::requeue(Duration::from_secs(5))
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
    let jobs: Api<TrainingJob> = match &namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let pods: Api<Pod> = match &namespace {
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
    let controller = Controller::new(jobs, watcher::Config::default());
    let store = controller.store();
    metrics.watch_jobs(store.clone());
    let outcomes = metrics.clone();
    controller
        .owns(pods, watcher::Config::default().labels(LABEL_JOB))
        .reconcile_all_on(node_changes)
        .run(reconcile, error_policy, ctx)
        .for_each(move |result| {
            match &result {
                Err(kube::runtime::controller::Error::QueueError(e)) => {
                    tracing::warn!(error = %e, "the TrainingJob or pod watch failed; retrying");
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
