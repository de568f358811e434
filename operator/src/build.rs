//! Build step of the reconcile pipeline: the objects a TrainingJob should own
//! for one mesh epoch, as a pure function of the job and its mesh plan.
//!
//! - One worker pod per mesh worker, pinned to the node the mesh chose (through
//!   the hostname node selector, so the real scheduler still admits it against
//!   the node's capacity), asking for the job's GPUs, CPU and memory, and told
//!   its ranks and epoch through its environment. `restartPolicy: Never`: a
//!   failed worker is the operator's to handle (shrink, replace, count).
//! - A headless Service over the job's workers, for rendezvous.
//! - A ConfigMap holding the mesh plan (`mesh.json`) and the training
//!   parameters the per-step planner and the trainer need (`training.json`:
//!   the resolved model, data, parallelism and checkpoint sections), mounted
//!   into every worker.
//! - The job's scheduling section (scheduler, priority class, node selector,
//!   tolerations) and checkpoint volume (a PVC, or an emptyDir) on every pod.
//!
//! Every object carries the job's labels and a controller owner reference, so
//! deleting the job deletes them.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::core::v1::{
    ConfigMap, ConfigMapVolumeSource, Container, EmptyDirVolumeSource, EnvVar,
    PersistentVolumeClaimVolumeSource, Pod, PodSpec, ResourceRequirements, Service, ServicePort,
    ServiceSpec, Volume, VolumeMount,
};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::Resource;
use weft_crds::TrainingJob;
use weft_crds::topology::RESOURCE_GPU;
use weft_crds::worker::env;
pub use weft_crds::worker::{Pretrained, TrainingParameters};
use weft_planner::mesh::MeshPlan;

/// Label naming the job an object belongs to.
pub const LABEL_JOB: &str = "weft.dev/job";
/// Label naming a worker pod's mesh worker.
pub const LABEL_WORKER: &str = "weft.dev/worker";
/// Label with the mesh epoch a pod was created for.
pub const LABEL_EPOCH: &str = "weft.dev/mesh-epoch";
/// Annotation of the mesh ConfigMap: the SHA-256 of its data as weft wrote
/// it ([`mesh_digest`]), so an edit by anyone else is seen.
pub const ANNOTATION_MESH_DIGEST: &str = "weft.dev/mesh-digest";

/// On the mesh ConfigMap: how its epoch changed the membership, as the
/// `MeshEpoch` event tells it. A reconcile whose status write is lost after
/// it published the mesh sends no event; the one that records the epoch
/// then tells this, not a change from the mesh to itself.
pub const ANNOTATION_MESH_CHANGE: &str = "weft.dev/mesh-change";

/// On the mesh ConfigMap, beside [`ANNOTATION_MESH_CHANGE`]: when the fault
/// behind that change began (RFC 3339), for the same reason.
pub const ANNOTATION_MESH_FAULT: &str = "weft.dev/mesh-fault-time";

/// The digest of a mesh ConfigMap's data: SHA-256 over each key and value,
/// in key order, as hex.
pub fn mesh_digest(data: &BTreeMap<String, String>) -> String {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    for (key, value) in data {
        for part in [key, value] {
            hasher.update((part.len() as u64).to_le_bytes());
            hasher.update(part.as_bytes());
        }
    }
    hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
/// `host:port` of the store of `mesh`'s epoch: rank 0's pod through the
/// job's headless Service, on a port that moves with the epoch (so the
/// store of an older epoch, still up in a pod that has not yet seen the new
/// mesh, is never mistaken for this one's).
pub fn rendezvous_address(job: &str, mesh: &MeshPlan) -> String {
    let rank0 = mesh
        .workers
        .iter()
        .min_by_key(|w| w.first_rank)
        .map(|w| w.name.as_str())
        .unwrap_or("");
    let port = RENDEZVOUS_PORT as u64 + mesh.epoch % RENDEZVOUS_PORTS;
    format!("{rank0}.{}:{port}", service_name(job))
}

/// How many ports the store cycles through, one per epoch.
pub const RENDEZVOUS_PORTS: u64 = 500;

/// First port of the rendezvous store.
pub const RENDEZVOUS_PORT: i32 = 29500;
/// Where workers find the mesh plan.
pub const MESH_MOUNT: &str = "/etc/weft/mesh";

/// The model a spec names, every dimension resolved and checked; `None` for
/// a checkpoint (see [`weft_crds::worker::resolve_model`]).
pub fn resolve_model(
    spec: &weft_crds::ModelSpec,
) -> Result<Option<weft_planner::model::ModelSpec>, BuildError> {
    Ok(weft_crds::worker::resolve_model(spec)?)
}

/// Why the objects of a job cannot be built.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BuildError {
    #[error("the TrainingJob has no {0} yet (it must be read from the API server)")]
    Unsaved(&'static str),
    #[error("the mesh plan cannot be serialised: {0}")]
    Mesh(String),
    #[error("the training parameters cannot be serialised: {0}")]
    Parameters(String),
    #[error("spec.model: {0}")]
    Model(#[from] weft_planner::model::ModelError),
}

impl BuildError {
    /// A stable, machine-readable name for the kind of failure.
    pub fn category(&self) -> &'static str {
        match self {
            BuildError::Unsaved(_) => "job_metadata",
            BuildError::Mesh(_) | BuildError::Parameters(_) => "mesh_plan",
            BuildError::Model(e) => e.category(),
        }
    }
}

/// What a job should own for one epoch.
#[derive(Clone, Debug, PartialEq)]
pub struct DesiredObjects {
    pub pods: Vec<Pod>,
    pub service: Service,
    pub mesh: ConfigMap,
    /// The workers' identity, allowed to write the job's status (their
    /// progress: step, tokens/s, last checkpoint) and nothing else.
    pub account: ServiceAccount,
    pub role: Role,
    pub role_binding: RoleBinding,
}

/// The ServiceAccount (and Role, RoleBinding) of a job's workers.
pub fn worker_account_name(job: &str) -> String {
    format!("{job}-worker")
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

    // Rank 0's worker serves the store; pods are reachable as
    // <hostname>.<subdomain> through the headless Service.
    let rendezvous = rendezvous_address(&name, mesh);
    let published = MeshPlan {
        rendezvous: Some(rendezvous.clone()),
        ..mesh.clone()
    };
    let mesh_json =
        serde_json::to_string_pretty(&published).map_err(|e| BuildError::Mesh(e.to_string()))?;
    let parameters = TrainingParameters::of(&job.spec)?;
    let parameters_json = serde_json::to_string_pretty(&parameters)
        .map_err(|e| BuildError::Parameters(e.to_string()))?;
    let data = BTreeMap::from([
        ("mesh.json".to_string(), mesh_json),
        ("training.json".to_string(), parameters_json),
    ]);
    let mut metadata = meta(
        mesh_config_map_name(&name),
        &[(LABEL_EPOCH, mesh.epoch.to_string())],
    );
    metadata.annotations = Some(BTreeMap::from([(
        ANNOTATION_MESH_DIGEST.to_string(),
        mesh_digest(&data),
    )]));
    let config_map = ConfigMap {
        metadata,
        data: Some(data),
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
    let pods = mesh
        .workers
        .iter()
        .map(|worker| {
            let env = [
                (env::JOB, name.clone()),
                (env::NAMESPACE, namespace.clone().unwrap_or_default()),
                (env::WORKER, worker.name.clone()),
                (env::MESH_EPOCH, mesh.epoch.to_string()),
                (env::WORLD_SIZE, mesh.world_size.to_string()),
                (env::FIRST_RANK, worker.first_rank.to_string()),
                (env::LOCAL_RANKS, worker.gpus.max(1).to_string()),
                (env::RENDEZVOUS, rendezvous.clone()),
                (env::MESH, format!("{MESH_MOUNT}/mesh.json")),
                (env::MESH_CONFIGMAP, mesh_config_map_name(&name)),
                (env::TRAINING, format!("{MESH_MOUNT}/training.json")),
            ]
            .into_iter()
            .map(|(k, v)| EnvVar {
                name: k.to_string(),
                value: Some(v),
                ..Default::default()
            })
            // The address this worker's collectives bind to.
            .chain(std::iter::once(EnvVar {
                name: env::POD_IP.to_string(),
                value_from: Some(k8s_openapi::api::core::v1::EnvVarSource {
                    field_ref: Some(k8s_openapi::api::core::v1::ObjectFieldSelector {
                        field_path: "status.podIP".to_string(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }))
            .chain(spec.env.iter().cloned())
            .collect();
            let mut node_selector = spec.scheduling.node_selector.clone();
            node_selector.insert("kubernetes.io/hostname".to_string(), worker.node.clone());
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
                    service_account_name: Some(worker_account_name(&name)),
                    subdomain: Some(service_name(&name)),
                    restart_policy: Some("Never".to_string()),
                    node_selector: Some(node_selector),
                    scheduler_name: spec.scheduling.scheduler_name.clone(),
                    priority_class_name: spec.scheduling.priority_class_name.clone(),
                    tolerations: (!spec.scheduling.tolerations.is_empty())
                        .then(|| spec.scheduling.tolerations.clone()),
                    containers: vec![Container {
                        name: "trainer".to_string(),
                        image: Some(spec.image.clone()),
                        command: spec.command.clone(),
                        args: spec.args.clone(),
                        // A worker writes why it stopped into its termination
                        // message (what it refused of the job's settings); a
                        // worker that could not, leaves its log's last lines.
                        termination_message_policy: Some("FallbackToLogsOnError".to_string()),
                        env: Some(env),
                        resources: Some(ResourceRequirements {
                            limits: (!limits.is_empty()).then(|| limits.clone()),
                            requests: (!requests.is_empty()).then(|| requests.clone()),
                            ..Default::default()
                        }),
                        volume_mounts: Some(
                            vec![
                                VolumeMount {
                                    name: "mesh".to_string(),
                                    mount_path: MESH_MOUNT.to_string(),
                                    read_only: Some(true),
                                    ..Default::default()
                                },
                                VolumeMount {
                                    name: "checkpoints".to_string(),
                                    mount_path: spec.checkpoint.path.clone(),
                                    ..Default::default()
                                },
                            ]
                            .into_iter()
                            .chain(spec.volumes.iter().enumerate().map(|(i, v)| VolumeMount {
                                name: claim_volume_name(i),
                                mount_path: v.mount_path.clone(),
                                read_only: v.read_only.then_some(true),
                                ..Default::default()
                            }))
                            .collect(),
                        ),
                        ..Default::default()
                    }],
                    volumes: Some(
                        vec![
                            Volume {
                                name: "mesh".to_string(),
                                config_map: Some(ConfigMapVolumeSource {
                                    name: mesh_config_map_name(&name),
                                    ..Default::default()
                                }),
                                ..Default::default()
                            },
                            checkpoint_volume(&spec.checkpoint),
                        ]
                        .into_iter()
                        .chain(spec.volumes.iter().enumerate().map(|(i, v)| Volume {
                            name: claim_volume_name(i),
                            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                                claim_name: v.claim_name.clone(),
                                read_only: v.read_only.then_some(true),
                            }),
                            ..Default::default()
                        }))
                        .collect(),
                    ),
                    ..Default::default()
                }),
                ..Default::default()
            }
        })
        .collect();
    let account_name = worker_account_name(&name);
    let account = ServiceAccount {
        metadata: meta(account_name.clone(), &[]),
        ..Default::default()
    };
    let role = Role {
        metadata: meta(account_name.clone(), &[]),
        rules: Some(vec![
            PolicyRule {
                api_groups: Some(vec!["weft.dev".to_string()]),
                resources: Some(vec!["trainingjobs/status".to_string()]),
                resource_names: Some(vec![name.clone()]),
                verbs: vec!["get".to_string(), "patch".to_string()],
                ..Default::default()
            },
            // The mesh, followed through the API server: a mounted ConfigMap
            // is refreshed only on the kubelet's next sync of the pod.
            PolicyRule {
                api_groups: Some(vec![String::new()]),
                resources: Some(vec!["configmaps".to_string()]),
                resource_names: Some(vec![mesh_config_map_name(&name)]),
                verbs: vec!["get".to_string(), "list".to_string(), "watch".to_string()],
                ..Default::default()
            },
        ]),
    };
    let role_binding = RoleBinding {
        metadata: meta(account_name.clone(), &[]),
        role_ref: RoleRef {
            api_group: Some("rbac.authorization.k8s.io".to_string()),
            kind: "Role".to_string(),
            name: account_name.clone(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".to_string(),
            name: account_name,
            namespace: namespace.clone(),
            ..Default::default()
        }]),
    };
    Ok(DesiredObjects {
        pods,
        service,
        mesh: config_map,
        account,
        role,
        role_binding,
    })
}

/// The pod's name of the job's `index`th volume (`spec.volumes`).
fn claim_volume_name(index: usize) -> String {
    format!("volume-{index}")
}

fn checkpoint_volume(checkpoint: &weft_crds::CheckpointSpec) -> Volume {
    match &checkpoint.claim_name {
        Some(claim) => Volume {
            name: "checkpoints".to_string(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: claim.clone(),
                read_only: Some(false),
            }),
            ..Default::default()
        },
        None => Volume {
            name: "checkpoints".to_string(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Default::default()
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Toleration;
    use weft_crds::{ModelPreset, ModelSpec as JobModel, TrainingJobSpec, WorkerResources};
    use weft_planner::cluster::parse_cluster;
    use weft_planner::mesh::{MeshNode, MeshRequest, plan_mesh};

    fn job() -> TrainingJob {
        let mut job = TrainingJob::new(
            "llm",
            TrainingJobSpec {
                args: Some(vec!["--steps".into(), "10".into()]),
                resources: WorkerResources {
                    gpus: 8,
                    cpu: Some("96".into()),
                    memory: Some("1Ti".into()),
                },
                ..TrainingJobSpec::new("weft-trainer:dev", 2, 3)
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

    /// The training parameters are the contract with the trainer, which
    /// reads this same file in its tests (trainer/src/pod.rs). Regenerate
    /// with `WEFT_UPDATE_GOLDEN=1 cargo test -p weft-operator`.
    #[test]
    fn the_training_parameters_match_the_golden_file() {
        let objects = build(&job(), &mesh()).unwrap();
        let data = objects.mesh.data.unwrap();
        let text = data["training.json"].clone() + "\n";
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/training.json");
        if std::env::var_os("WEFT_UPDATE_GOLDEN").is_some() {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &text).unwrap();
        }
        let golden = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            text, golden,
            "training.json changed; if intended, regenerate with WEFT_UPDATE_GOLDEN=1 and check the trainer still reads it"
        );
    }

    /// What a worker is handed, as the API server stores it: its pod
    /// (image, command, environment, resources, volumes, node pinning,
    /// identity) and the ConfigMap it reads its mesh and training
    /// parameters from. Snapshots in `tests/golden`: review a change with
    /// `cargo insta review`, or accept it with `INSTA_UPDATE=always cargo
    /// test -p weft-operator --lib build`.
    #[test]
    fn the_rendered_worker_pod_and_its_config_match_the_snapshots() {
        let objects = build(&job(), &mesh()).unwrap();
        let mut settings = insta::Settings::clone_current();
        settings.set_snapshot_path("../tests/golden");
        settings.set_prepend_module_to_snapshot(false);
        settings.set_omit_expression(true);
        // The mesh shown as the JSON it holds, not as one escaped string;
        // training.json is the golden file of its own (the trainer's tests
        // read it), which the test above holds it to.
        let mut config = serde_json::to_value(&objects.mesh).unwrap();
        let data = &mut config["data"];
        data["mesh.json"] = serde_json::from_str(data["mesh.json"].as_str().unwrap()).unwrap();
        data["training.json"] = "(tests/golden/training.json)".into();
        // The data's digest changes with training.json, which the test
        // above holds: left out, so such a change is accepted in one place.
        config["metadata"]["annotations"][ANNOTATION_MESH_DIGEST] = "(the data's digest)".into();
        settings.bind(|| {
            insta::assert_yaml_snapshot!("worker-pod", objects.pods[0]);
            insta::assert_yaml_snapshot!("worker-config", config);
        });
    }

    #[test]
    fn the_published_mesh_names_its_epochs_rendezvous() {
        let mesh = mesh();
        let objects = build(&job(), &mesh).unwrap();
        let data = objects.mesh.data.unwrap();
        let published: MeshPlan = serde_json::from_str(&data["mesh.json"]).unwrap();
        assert_eq!(
            published.rendezvous.as_deref(),
            Some(format!("{}.llm:29504", mesh.workers[0].name).as_str())
        );
        let next = MeshPlan {
            epoch: 5,
            ..mesh.clone()
        };
        assert!(rendezvous_address("llm", &next).ends_with(":29505"));
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
                format!("{}.llm:29504", mesh.workers[0].name)
            );
            let pod_ip = c
                .env
                .as_ref()
                .unwrap()
                .iter()
                .find(|e| e.name == "WEFT_POD_IP");
            assert_eq!(
                pod_ip
                    .and_then(|e| e.value_from.as_ref()?.field_ref.as_ref())
                    .map(|f| f.field_path.as_str()),
                Some("status.podIP")
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
        // The published mesh is the planned one with its rendezvous filled in.
        assert!(back.rendezvous.is_some());
        assert_eq!(
            MeshPlan {
                rendezvous: None,
                ..back
            },
            mesh
        );
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

    #[test]
    fn scheduling_env_and_checkpoint_volume_reach_every_pod() {
        let mut job = job();
        job.spec.scheduling.scheduler_name = Some("volcano".into());
        job.spec.scheduling.priority_class_name = Some("training-high".into());
        job.spec.scheduling.node_selector =
            BTreeMap::from([("pool".to_string(), "h100".to_string())]);
        job.spec.scheduling.tolerations = vec![Toleration {
            key: Some("nvidia.com/gpu".into()),
            operator: Some("Exists".into()),
            effect: Some("NoSchedule".into()),
            ..Default::default()
        }];
        job.spec.env = vec![EnvVar {
            name: "HF_HOME".into(),
            value: Some("/cache".into()),
            ..Default::default()
        }];
        job.spec.checkpoint.claim_name = Some("ckpt".into());
        let mesh = mesh();
        for (pod, worker) in build(&job, &mesh).unwrap().pods.iter().zip(&mesh.workers) {
            let spec = pod.spec.as_ref().unwrap();
            assert_eq!(spec.scheduler_name.as_deref(), Some("volcano"));
            assert_eq!(spec.priority_class_name.as_deref(), Some("training-high"));
            let selector = spec.node_selector.as_ref().unwrap();
            assert_eq!(selector["pool"], "h100");
            assert_eq!(selector["kubernetes.io/hostname"], worker.node);
            assert_eq!(spec.tolerations.as_ref().unwrap().len(), 1);
            let c = &spec.containers[0];
            let env = c.env.as_ref().unwrap();
            assert!(env.iter().any(|e| e.name == "HF_HOME"));
            assert!(env.iter().any(|e| e.name == "WEFT_TRAINING"));
            let mount = c
                .volume_mounts
                .as_ref()
                .unwrap()
                .iter()
                .find(|m| m.name == "checkpoints")
                .unwrap();
            assert_eq!(mount.mount_path, "/var/lib/weft/checkpoints");
            let volume = spec
                .volumes
                .as_ref()
                .unwrap()
                .iter()
                .find(|v| v.name == "checkpoints")
                .unwrap();
            assert_eq!(
                volume.persistent_volume_claim.as_ref().unwrap().claim_name,
                "ckpt"
            );
        }
        // Without a claim, checkpoints live in an emptyDir.
        let pods = build(&self::job(), &mesh).unwrap().pods;
        let volumes = pods[0].spec.as_ref().unwrap().volumes.as_ref().unwrap();
        assert!(volumes.iter().any(|v| v.empty_dir.is_some()));
    }

    #[test]
    fn training_parameters_carry_the_resolved_model() {
        let mut job = job();
        job.spec.model = JobModel {
            preset: Some(ModelPreset::Llama70b),
            ..JobModel::default()
        };
        let objects = build(&job, &mesh()).unwrap();
        let json = &objects.mesh.data.as_ref().unwrap()["training.json"];
        let parameters: TrainingParameters = serde_json::from_str(json).unwrap();
        assert_eq!(parameters.version, 1);
        let model = parameters.model.unwrap();
        assert_eq!((model.layers, model.kv_heads), (80, 8));
        assert_eq!(parameters.data, job.spec.data);
        assert!(parameters.pretrained.is_none());
    }

    /// A checkpoint reaches the workers with its rotary settings in
    /// `config.json`'s terms, where the trained model goes, and the data's
    /// format, text field and tokenizer; such a file is version 2, so a
    /// trainer that reads only version 1 refuses it rather than ignore them.
    #[test]
    fn a_checkpoint_its_rope_and_the_datas_reading_reach_the_workers_as_version_2() {
        let mut job = job();
        job.spec.model = JobModel {
            preset: None,
            checkpoint: Some("/models/llama".into()),
            rope: Some(weft_crds::RopeSpec {
                rope_type: weft_crds::RopeType::Yarn,
                factor: Some(16.0),
                theta: Some(500000.0),
                original_max_position_embeddings: Some(8192),
                ..Default::default()
            }),
            output: Some("/out/llama-128k".into()),
            ..JobModel::default()
        };
        let objects = build(&job, &mesh()).unwrap();
        let json: serde_json::Value =
            serde_json::from_str(&objects.mesh.data.as_ref().unwrap()["training.json"]).unwrap();
        assert_eq!(json["version"], 2);
        assert!(json.get("model").is_none(), "{json}");
        assert_eq!(
            json["pretrained"],
            serde_json::json!({
                "checkpoint": "/models/llama",
                "rope": {"rope_type": "yarn", "rope_theta": 500000.0, "factor": 16.0,
                         "original_max_position_embeddings": 8192},
                "output": "/out/llama-128k",
            })
        );
        // Each of the data's new settings alone needs version 2 too.
        for change in [
            |d: &mut weft_crds::DataSpec| d.format = weft_crds::DataFormat::Parquet,
            |d: &mut weft_crds::DataSpec| d.text_field = "content".into(),
            |d: &mut weft_crds::DataSpec| d.tokenizer = Some("/tok/tokenizer.json".into()),
        ] {
            let mut job = self::job();
            change(&mut job.spec.data);
            let parameters = TrainingParameters::of(&job.spec).unwrap();
            assert_eq!(parameters.version, 2, "{:?}", parameters.data);
        }
    }

    #[test]
    fn the_jobs_volumes_are_mounted_into_every_worker() {
        let mut job = job();
        job.spec.volumes = vec![
            weft_crds::VolumeMountSpec {
                claim_name: "models".into(),
                mount_path: "/models".into(),
                read_only: true,
            },
            weft_crds::VolumeMountSpec {
                claim_name: "corpus".into(),
                mount_path: "/data".into(),
                read_only: false,
            },
        ];
        let pods = build(&job, &mesh()).unwrap().pods;
        for pod in &pods {
            let spec = pod.spec.as_ref().unwrap();
            let mounts = spec.containers[0].volume_mounts.as_ref().unwrap();
            let volumes = spec.volumes.as_ref().unwrap();
            for (wanted, read_only) in [("/models", Some(true)), ("/data", None)] {
                let mount = mounts.iter().find(|m| m.mount_path == wanted).unwrap();
                assert_eq!(mount.read_only, read_only);
                let volume = volumes.iter().find(|v| v.name == mount.name).unwrap();
                let claim = volume.persistent_volume_claim.as_ref().unwrap();
                assert_eq!(
                    claim.claim_name,
                    if wanted == "/models" {
                        "models"
                    } else {
                        "corpus"
                    }
                );
                assert_eq!(claim.read_only, read_only);
            }
        }
    }

    #[test]
    fn every_preset_resolves_and_bad_explicit_dimensions_are_named() {
        for preset in [
            ModelPreset::Tiny,
            ModelPreset::Llama7b,
            ModelPreset::Llama13b,
            ModelPreset::Llama70b,
        ] {
            let model = resolve_model(&JobModel {
                preset: Some(preset),
                ..JobModel::default()
            })
            .unwrap()
            .unwrap();
            assert_eq!(model.name, preset.name());
        }
        let bad = JobModel {
            preset: None,
            layers: Some(2),
            hidden: Some(96),
            heads: Some(6),
            kv_heads: Some(4),
            ffn: Some(256),
            vocab: Some(257),
            ..JobModel::default()
        };
        let err = resolve_model(&bad).unwrap_err();
        assert!(err.to_string().starts_with("spec.model:"), "{err}");
        assert!(err.to_string().contains("6 heads"), "{err}");
        assert_eq!(err.category(), "model_description");
    }
}
