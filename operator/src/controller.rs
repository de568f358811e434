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
//!
//! Not yet: the rescale cooldown and restart budget, completion handling
//! beyond the status phase, events, leader election, metrics.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::{Controller, watcher};
use kube::{Api, Client, ResourceExt};
use weft_crds::TrainingJob;
use weft_crds::topology::RESOURCE_GPU;
use weft_planner::mesh::{ExistingWorker, MeshNode, MeshPlan, MeshRequest, plan_mesh};

use crate::build::{BuildError, LABEL_JOB, build};
use crate::inventory::GpuNode;
use crate::status::{Observed, compute_status};

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
}

impl ControllerError {
    /// A stable, machine-readable name for the kind of failure.
    pub fn category(&self) -> &'static str {
        match self {
            ControllerError::Api(_) => "kubernetes_api",
            ControllerError::Build(e) => e.category(),
            ControllerError::NoNamespace => "job_metadata",
            ControllerError::Serialise(_) => "status",
        }
    }
}

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
pub fn mesh_inputs(
    gpu_nodes: &[GpuNode],
    all_pods: &[Pod],
    job_pods: &[Pod],
) -> (Vec<MeshNode>, Vec<ExistingWorker>) {
    let mut used: BTreeMap<String, u32> = BTreeMap::new();
    for pod in all_pods.iter().filter(|p| !terminal(p)) {
        let node = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone().or_else(|| pinned_node(s)));
        if let Some(node) = node {
            *used.entry(node).or_default() += gpus_requested(pod);
        }
    }
    let nodes = gpu_nodes
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
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Context")
    }
}

/// One reconcile of one job.
pub async fn reconcile(
    job: Arc<TrainingJob>,
    ctx: Arc<Context>,
) -> Result<Action, ControllerError> {
    let namespace = job.namespace().ok_or(ControllerError::NoNamespace)?;
    let name = job.name_any();
    let client = ctx.client.clone();
    let jobs: Api<TrainingJob> = Api::namespaced(client.clone(), &namespace);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);

    // Observe.
    let node_list = Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await?;
    let (gpu_nodes, _unreadable) = crate::inventory::read_nodes(&node_list.items);
    let all_pods = Api::<Pod>::all(client.clone())
        .list(&ListParams::default())
        .await?
        .items;
    let job_pods = pods
        .list(&ListParams::default().labels(&format!("{LABEL_JOB}={name}")))
        .await?
        .items;

    // Suspended: no workers.
    if job.spec.suspend {
        for pod in &job_pods {
            delete_pod(&pods, &pod.name_any()).await?;
        }
        let mut status = job.status.clone().unwrap_or_default();
        status.phase = weft_crds::Phase::Suspended;
        status.workers_ready = 0;
        status.observed_generation = job.metadata.generation;
        write_status(&jobs, &name, &status).await?;
        return Ok(Action::requeue(Duration::from_secs(60)));
    }

    // Plan. The current epoch is the published mesh's (the ConfigMap is the
    // record; a status written from a stale cache can lag behind it).
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &namespace);
    let published: Option<MeshPlan> = config_maps
        .get_opt(&crate::build::mesh_config_map_name(&name))
        .await?
        .and_then(|cm| cm.data?.get("mesh.json").cloned())
        .and_then(|text| serde_json::from_str(&text).ok());
    let (mesh_nodes, existing) = mesh_inputs(&gpu_nodes, &all_pods, &job_pods);
    let previous_epoch = job
        .status
        .as_ref()
        .map(|s| s.mesh_epoch.max(0) as u64)
        .unwrap_or(0)
        .max(published.as_ref().map_or(0, |m| m.epoch));
    let request = MeshRequest {
        job: name.clone(),
        min_workers: job.spec.workers.min.max(0) as u32,
        max_workers: job.spec.workers.max.max(0) as u32,
        gpus_per_worker: job.spec.resources.gpus.max(0) as u32,
        epoch: previous_epoch.max(1),
    };
    let planned = plan_mesh(&request, &mesh_nodes, &existing).map(|mut mesh| {
        // The epoch moves on whenever the membership differs from the
        // published mesh's workers that are still alive.
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
    if let Ok(mesh) = &planned {
        let objects = build(&job, mesh)?;
        let apply = PatchParams::apply(FIELD_MANAGER).force();
        config_maps
            .patch(
                &objects.mesh.name_any(),
                &apply,
                &Patch::Apply(&objects.mesh),
            )
            .await?;
        let services: Api<Service> = Api::namespaced(client.clone(), &namespace);
        services
            .patch(
                &objects.service.name_any(),
                &apply,
                &Patch::Apply(&objects.service),
            )
            .await?;
        // Surviving pods are left as they are (a pod's spec cannot change);
        // missing ones are created; ones the mesh dropped are deleted.
        let wanted: BTreeSet<String> = objects.pods.iter().map(|p| p.name_any()).collect();
        for pod in &job_pods {
            if !wanted.contains(&pod.name_any()) || terminal(pod) {
                delete_pod(&pods, &pod.name_any()).await?;
            }
        }
        let present: BTreeSet<String> = job_pods
            .iter()
            .filter(|p| !terminal(p))
            .map(|p| p.name_any())
            .collect();
        for pod in objects
            .pods
            .iter()
            .filter(|p| !present.contains(&p.name_any()))
        {
            match pods.create(&PostParams::default(), pod).await {
                Ok(_) => {}
                // Created by an earlier reconcile that did not see it yet.
                Err(kube::Error::Api(s)) if s.code == 409 => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

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
            now: Time(k8s_openapi::jiff::Timestamp::now()),
        },
    );
    write_status(&jobs, &name, &status).await?;
    Ok(Action::requeue(Duration::from_secs(30)))
}

async fn delete_pod(pods: &Api<Pod>, name: &str) -> Result<(), ControllerError> {
    match pods.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

async fn write_status(
    jobs: &Api<TrainingJob>,
    name: &str,
    status: &weft_crds::TrainingJobStatus,
) -> Result<(), ControllerError> {
    let body = serde_json::json!({ "status": status });
    jobs.patch_status(name, &PatchParams::default(), &Patch::Merge(&body))
        .await?;
    Ok(())
}

/// Retries a failed reconcile soon, without hammering the API server.
pub fn error_policy(_job: Arc<TrainingJob>, error: &ControllerError, _ctx: Arc<Context>) -> Action {
    eprintln!(
        "weft-operator: reconcile failed [{}]: {error}",
        error.category()
    );
    Action::requeue(Duration::from_secs(5))
}

/// Runs the controller for the jobs of `namespace` (all namespaces when
/// `None`) until the stream ends. Node changes wake every job, so node loss
/// and new capacity are seen at once.
pub async fn run(client: Client, namespace: Option<String>) {
    let jobs: Api<TrainingJob> = match &namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let pods: Api<Pod> = match &namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let controller = Controller::new(jobs, watcher::Config::default());
    let store = controller.store();
    controller
        .owns(pods, watcher::Config::default().labels(LABEL_JOB))
        .watches(
            Api::<Node>::all(client.clone()),
            watcher::Config::default(),
            move |_node| {
                store
                    .state()
                    .iter()
                    .map(|job| kube::runtime::reflector::ObjectRef::from_obj(job.as_ref()))
                    .collect::<Vec<_>>()
            },
        )
        .run(reconcile, error_policy, Arc::new(Context { client }))
        .for_each(|result| async move {
            if let Err(e) = result {
                eprintln!("weft-operator: {e}");
            }
        })
        .await;
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
        let gpu_nodes: Vec<GpuNode> = cluster
            .nodes
            .iter()
            .map(|n| GpuNode {
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
        let (nodes, existing) = mesh_inputs(&gpu_nodes, &all, &mine);
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
}
