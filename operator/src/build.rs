//! Build step of the reconcile pipeline: the objects a TrainingJob should own
//! for one mesh epoch, as a pure function of the job and its mesh plan.
//!
//! - One worker pod per mesh worker, pinned to the node the mesh chose (through
//!   the hostname node selector, so the real scheduler still admits it against
//!   the node's capacity), asking for the job's GPUs, CPU and memory, and told
//!   its ranks and epoch through its environment. `restartPolicy: Never`: a
//!   failed worker is the operator's to handle (shrink, replace, count).
//! - A headless Service over the job's workers, for rendezvous.
//! - A ConfigMap holding the mesh plan as JSON, mounted into every worker.
//!
//! Every object carries the job's labels and a controller owner reference, so
//! deleting the job deletes them.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    ConfigMap, ConfigMapVolumeSource, Container, EnvVar, Pod, PodSpec, ResourceRequirements,
    Service, ServicePort, ServiceSpec, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::Resource;
use weft_crds::TrainingJob;
use weft_crds::topology::RESOURCE_GPU;
use weft_planner::mesh::MeshPlan;

/// Label naming the job an object belongs to.
pub const LABEL_JOB: &str = "weft.dev/job";
/// Label naming a worker pod's mesh worker.
pub const LABEL_WORKER: &str = "weft.dev/worker";
/// Label with the mesh epoch a pod was created for.
pub const LABEL_EPOCH: &str = "weft.dev/mesh-epoch";
/// Port the rendezvous store listens on.
pub const RENDEZVOUS_PORT: i32 = 29500;
/// Where workers find the mesh plan.
pub const MESH_MOUNT: &str = "/etc/weft/mesh";

/// Why the objects of a job cannot be built.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BuildError {
    #[error("the TrainingJob has no {0} yet (it must be read from the API server)")]
    Unsaved(&'static str),
    #[error("the mesh plan cannot be serialised: {0}")]
    Mesh(String),
}

impl BuildError {
    /// A stable, machine-readable name for the kind of failure.
    pub fn category(&self) -> &'static str {
        match self {
            BuildError::Unsaved(_) => "job_metadata",
            BuildError::Mesh(_) => "mesh_plan",
        }
    }
}

/// What a job should own for one epoch.
#[derive(Clone, Debug, PartialEq)]
pub struct DesiredObjects {
    pub pods: Vec<Pod>,
    pub service: Service,
    pub mesh: ConfigMap,
}

/// Names of a job's owned objects other than pods.
pub fn service_name(job: &str) -> String {
    job.to_string()
}

pub fn mesh_config_map_name(job: &str) -> String {
    format!("{job}-mesh")
}

/// The objects `job` should own for `mesh`.
pub fn build(job: &TrainingJob, mesh: &MeshPlan) -> Result<DesiredObjects, BuildError> {
    let name = job
        .metadata
        .name
        .clone()
        .ok_or(BuildError::Unsaved("name"))?;
    let namespace = job.metadata.namespace.clone();
    let owner: OwnerReference = job
        .controller_owner_ref(&())
        .ok_or(BuildError::Unsaved("uid"))?;
    let meta = |object: String, extra: &[(&str, String)]| {
        let mut labels = BTreeMap::from([(LABEL_JOB.to_string(), name.clone())]);
        for (k, v) in extra {
            labels.insert((*k).to_string(), v.clone());
        }
        ObjectMeta {
            name: Some(object),
            namespace: namespace.clone(),
            labels: Some(labels),
            owner_references: Some(vec![owner.clone()]),
            ..Default::default()
        }
    };

    let mesh_json =
        serde_json::to_string_pretty(mesh).map_err(|e| BuildError::Mesh(e.to_string()))?;
    let config_map = ConfigMap {
        metadata: meta(
            mesh_config_map_name(&name),
            &[(LABEL_EPOCH, mesh.epoch.to_string())],
        ),
        data: Some(BTreeMap::from([("mesh.json".to_string(), mesh_json)])),
        ..Default::default()
    };

    let service = Service {
        metadata: meta(service_name(&name), &[]),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".to_string()),
            selector: Some(BTreeMap::from([(LABEL_JOB.to_string(), name.clone())])),
            ports: Some(vec![ServicePort {
                name: Some("rendezvous".to_string()),
                port: RENDEZVOUS_PORT,
                ..Default::default()
            }]),
            publish_not_ready_addresses: Some(true),
            ..Default::default()
        }),
        ..Default::default()
    };

    let spec = &job.spec;
    let mut limits = BTreeMap::new();
    let mut requests = BTreeMap::new();
    if spec.resources.gpus > 0 {
        limits.insert(
            RESOURCE_GPU.to_string(),
            Quantity(spec.resources.gpus.to_string()),
        );
    }
    for (key, value) in [
        ("cpu", &spec.resources.cpu),
        ("memory", &spec.resources.memory),
    ] {
        if let Some(v) = value {
            requests.insert(key.to_string(), Quantity(v.clone()));
        }
    }
    // Rank 0's worker serves the store; pods are reachable as
    // <hostname>.<subdomain> through the headless Service.
    let rendezvous = format!(
        "{}.{}:{RENDEZVOUS_PORT}",
        mesh.workers.first().map(|w| w.name.as_str()).unwrap_or(""),
        service_name(&name)
    );
    let pods = mesh
        .workers
        .iter()
        .map(|worker| {
            let env = [
                ("WEFT_JOB", name.clone()),
                ("WEFT_WORKER", worker.name.clone()),
                ("WEFT_MESH_EPOCH", mesh.epoch.to_string()),
                ("WEFT_WORLD_SIZE", mesh.world_size.to_string()),
                ("WEFT_FIRST_RANK", worker.first_rank.to_string()),
                ("WEFT_LOCAL_RANKS", worker.gpus.to_string()),
                ("WEFT_RENDEZVOUS", rendezvous.clone()),
                ("WEFT_MESH", format!("{MESH_MOUNT}/mesh.json")),
            ]
            .into_iter()
            .map(|(k, v)| EnvVar {
                name: k.to_string(),
                value: Some(v),
                ..Default::default()
            })
            .collect();
            Pod {
                metadata: meta(
                    worker.name.clone(),
                    &[
                        (LABEL_WORKER, worker.name.clone()),
                        (LABEL_EPOCH, mesh.epoch.to_string()),
                    ],
                ),
                spec: Some(PodSpec {
                    hostname: Some(worker.name.clone()),
                    subdomain: Some(service_name(&name)),
                    restart_policy: Some("Never".to_string()),
                    node_selector: Some(BTreeMap::from([(
                        "kubernetes.io/hostname".to_string(),
                        worker.node.clone(),
                    )])),
                    containers: vec![Container {
                        name: "trainer".to_string(),
                        image: Some(spec.image.clone()),
                        command: spec.command.clone(),
                        args: spec.args.clone(),
                        env: Some(env),
                        resources: Some(ResourceRequirements {
                            limits: (!limits.is_empty()).then(|| limits.clone()),
                            requests: (!requests.is_empty()).then(|| requests.clone()),
                            ..Default::default()
                        }),
                        volume_mounts: Some(vec![VolumeMount {
                            name: "mesh".to_string(),
                            mount_path: MESH_MOUNT.to_string(),
                            read_only: Some(true),
                            ..Default::default()
                        }]),
                        ..Default::default()
                    }],
                    volumes: Some(vec![Volume {
                        name: "mesh".to_string(),
                        config_map: Some(ConfigMapVolumeSource {
                            name: mesh_config_map_name(&name),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }]),
                    ..Default::default()
                }),
                ..Default::default()
            }
        })
        .collect();
    Ok(DesiredObjects {
        pods,
        service,
        mesh: config_map,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_crds::{TrainingJobSpec, WorkerRange, WorkerResources};
    use weft_planner::cluster::parse_cluster;
    use weft_planner::mesh::{MeshNode, MeshRequest, plan_mesh};

    fn job() -> TrainingJob {
        let mut job = TrainingJob::new(
            "llm",
            TrainingJobSpec {
                image: "weft-trainer:dev".into(),
                command: None,
                args: Some(vec!["--steps".into(), "10".into()]),
                workers: WorkerRange { min: 2, max: 3 },
                resources: WorkerResources {
                    gpus: 8,
                    cpu: Some("96".into()),
                    memory: Some("1Ti".into()),
                },
                suspend: false,
            },
        );
        job.metadata.namespace = Some("team-a".into());
        job.metadata.uid = Some("uid-1".into());
        job
    }

    fn mesh() -> MeshPlan {
        let nodes = MeshNode::all_free(&parse_cluster("4x8:nics=4").unwrap());
        let request = MeshRequest {
            job: "llm".into(),
            min_workers: 2,
            max_workers: 3,
            gpus_per_worker: 8,
            epoch: 4,
        };
        plan_mesh(&request, &nodes, &[]).unwrap()
    }

    #[test]
    fn a_pod_per_worker_pinned_to_its_node_with_its_ranks() {
        let mesh = mesh();
        let objects = build(&job(), &mesh).unwrap();
        assert_eq!(objects.pods.len(), 3);
        for (pod, worker) in objects.pods.iter().zip(&mesh.workers) {
            let meta = &pod.metadata;
            assert_eq!(meta.name.as_deref(), Some(worker.name.as_str()));
            assert_eq!(meta.namespace.as_deref(), Some("team-a"));
            let owner = &meta.owner_references.as_ref().unwrap()[0];
            assert_eq!(
                (owner.kind.as_str(), owner.uid.as_str()),
                ("TrainingJob", "uid-1")
            );
            assert_eq!(owner.controller, Some(true));
            let labels = meta.labels.as_ref().unwrap();
            assert_eq!(labels[LABEL_JOB], "llm");
            assert_eq!(labels[LABEL_EPOCH], "4");
            let spec = pod.spec.as_ref().unwrap();
            assert_eq!(
                spec.node_selector.as_ref().unwrap()["kubernetes.io/hostname"],
                worker.node
            );
            assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
            let c = &spec.containers[0];
            let env: BTreeMap<_, _> = c
                .env
                .as_ref()
                .unwrap()
                .iter()
                .map(|e| (e.name.as_str(), e.value.clone().unwrap_or_default()))
                .collect();
            assert_eq!(env["WEFT_FIRST_RANK"], worker.first_rank.to_string());
            assert_eq!(env["WEFT_WORLD_SIZE"], "24");
            assert_eq!(env["WEFT_MESH_EPOCH"], "4");
            assert_eq!(env["WEFT_MESH"], "/etc/weft/mesh/mesh.json");
            assert_eq!(
                env["WEFT_RENDEZVOUS"],
                format!("{}.llm:29500", mesh.workers[0].name)
            );
            let resources = c.resources.as_ref().unwrap();
            assert_eq!(resources.limits.as_ref().unwrap()[RESOURCE_GPU].0, "8");
            assert_eq!(resources.requests.as_ref().unwrap()["memory"].0, "1Ti");
            assert_eq!(c.args.as_ref().unwrap(), &["--steps", "10"]);
        }
    }

    #[test]
    fn the_service_is_headless_and_the_mesh_config_map_round_trips() {
        let mesh = mesh();
        let objects = build(&job(), &mesh).unwrap();
        let spec = objects.service.spec.as_ref().unwrap();
        assert_eq!(spec.cluster_ip.as_deref(), Some("None"));
        assert_eq!(spec.selector.as_ref().unwrap()[LABEL_JOB], "llm");
        assert_eq!(objects.mesh.metadata.name.as_deref(), Some("llm-mesh"));
        let json = &objects.mesh.data.as_ref().unwrap()["mesh.json"];
        let back: MeshPlan = serde_json::from_str(json).unwrap();
        assert_eq!(back, mesh);
        // Deterministic: the same job and mesh give the same objects.
        assert_eq!(build(&job(), &mesh).unwrap(), objects);
    }

    #[test]
    fn a_job_not_read_from_the_api_server_is_refused() {
        let mut unsaved = job();
        unsaved.metadata.uid = None;
        let err = build(&unsaved, &mesh()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the TrainingJob has no uid yet (it must be read from the API server)"
        );
        assert_eq!(err.category(), "job_metadata");
    }
}
