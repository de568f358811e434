//! Builders of the objects the operator's unit tests reason about: a job,
//! its worker pods in each state, the cluster's nodes. One place, so a test
//! says what is special about its case and nothing else.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{
    Container, ContainerState, ContainerStateTerminated, ContainerStatus, Node, NodeCondition,
    NodeSpec, NodeStatus, Pod, PodCondition, PodSpec, PodStatus, ResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::Resource;
use kube::api::ObjectMeta;
use weft_crds::topology::{LABEL_GPU_PRODUCT, RESOURCE_GPU};
use weft_crds::{TrainingJob, TrainingJobSpec, WorkerResources};

use crate::build::{LABEL_EPOCH, LABEL_JOB};

/// The time `seconds` after the epoch.
pub fn at(seconds: i64) -> Time {
    Time(Timestamp::from_second(seconds).unwrap())
}

/// A stored job `llm` in namespace `team` of `min` to `max` workers of 8
/// GPUs each.
pub fn job(min: i32, max: i32) -> TrainingJob {
    let mut job = TrainingJob::new(
        "llm",
        TrainingJobSpec {
            resources: WorkerResources {
                gpus: 8,
                cpu: None,
                memory: None,
            },
            ..TrainingJobSpec::new("weft-trainer:dev", min, max)
        },
    );
    job.metadata.namespace = Some("team".into());
    job.metadata.uid = Some("uid-llm".into());
    job.metadata.generation = Some(1);
    job.metadata.resource_version = Some("100".into());
    job
}

/// A pod of 8 GPUs named `name` on `node`, in `phase`, with no owner.
pub fn pod(name: &str, node: &str, gpus: u32, phase: &str) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some("team".into()),
            uid: Some(format!("uid-{name}")),
            ..Default::default()
        },
        spec: Some(PodSpec {
            node_name: Some(node.into()),
            containers: vec![Container {
                name: "trainer".into(),
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

/// `job`'s worker `name` made for mesh `epoch`, bound to `node`, in `phase`.
pub fn worker(job: &TrainingJob, name: &str, node: &str, epoch: u64, phase: &str) -> Pod {
    let mut pod = pod(name, node, 8, phase);
    pod.metadata.labels = Some(BTreeMap::from([
        (LABEL_JOB.to_string(), "llm".to_string()),
        (LABEL_EPOCH.to_string(), epoch.to_string()),
    ]));
    pod.metadata.owner_references = Some(vec![job.controller_owner_ref(&()).unwrap()]);
    pod
}

/// `pod` ended with `exit_code` and `message` (its container's termination).
pub fn exited(mut pod: Pod, exit_code: i32, message: &str) -> Pod {
    let status = pod.status.get_or_insert_with(Default::default);
    status.phase = Some(
        if exit_code == 0 {
            "Succeeded"
        } else {
            "Failed"
        }
        .into(),
    );
    status.container_statuses = Some(vec![ContainerStatus {
        name: "trainer".into(),
        state: Some(ContainerState {
            terminated: Some(ContainerStateTerminated {
                exit_code,
                reason: Some(if exit_code == 0 { "Completed" } else { "Error" }.into()),
                message: Some(message.into()),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }]);
    pod
}

/// `pod`, pinned to its node and not bound, refused by the scheduler there
/// since `since`.
pub fn unschedulable(mut pod: Pod, since: Time) -> Pod {
    let spec = pod.spec.get_or_insert_with(Default::default);
    let node = spec.node_name.take().unwrap_or_default();
    spec.node_selector = Some(BTreeMap::from([("kubernetes.io/hostname".into(), node)]));
    let status = pod.status.get_or_insert_with(Default::default);
    status.phase = Some("Pending".into());
    status.conditions = Some(vec![PodCondition {
        type_: "PodScheduled".into(),
        status: "False".into(),
        reason: Some("Unschedulable".into()),
        message: Some("0/1 nodes are available: Insufficient memory".into()),
        last_transition_time: Some(since),
        ..Default::default()
    }]);
    pod
}

/// A ready, schedulable node `name` of 8 H100 GPUs.
pub fn gpu_node(name: &str) -> Arc<Node> {
    let product = weft_planner::cluster::GpuModel::preset("h100")
        .unwrap()
        .product_label;
    Arc::new(Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(BTreeMap::from([
                (LABEL_GPU_PRODUCT.to_string(), product.to_string()),
                ("kubernetes.io/hostname".to_string(), name.to_string()),
            ])),
            ..Default::default()
        },
        spec: Some(NodeSpec::default()),
        status: Some(NodeStatus {
            allocatable: Some(BTreeMap::from([(
                RESOURCE_GPU.to_string(),
                Quantity("8".into()),
            )])),
            conditions: Some(vec![NodeCondition {
                type_: "Ready".into(),
                status: "True".into(),
                ..Default::default()
            }]),
            ..Default::default()
        }),
    })
}
