//! Helpers for tests of TrainingJobs on the kwok cluster: a job of sleeping
//! workers, its mesh and running workers as the cluster holds them, waiting
//! for it to run, and failing a node the way kwok lets a test fail one.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod};
use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, ResourceExt};
use weft_crds::{Phase, TrainingJob, TrainingJobSpec, WorkerResources};
use weft_operator::build::{LABEL_JOB, mesh_config_map_name};
use weft_planner::mesh::MeshPlan;

use crate::{HarnessError, TestNamespace, wait_for};

/// The label that makes kwok mark a node NotReady.
pub const NODE_NOT_READY: &str = "node-not-ready.stage.kwok.x-k8s.io";

/// A job of `min..=max` workers of `gpus` GPUs that sleep, with the given
/// rescale cooldown.
pub fn sleeper_job(name: &str, min: i32, max: i32, gpus: i32, cooldown_s: i32) -> TrainingJob {
    let mut spec = TrainingJobSpec {
        command: Some(vec!["sleep".into(), "3600".into()]),
        resources: WorkerResources {
            gpus,
            cpu: Some("1".into()),
            memory: Some("1Gi".into()),
        },
        ..TrainingJobSpec::new("busybox:1.36", min, max)
    };
    spec.elasticity.rescale_cooldown_seconds = cooldown_s;
    TrainingJob::new(name, spec)
}

/// The mesh the operator published for `job`, if any.
pub async fn mesh_of(config_maps: &Api<ConfigMap>, job: &str) -> anyhow::Result<Option<MeshPlan>> {
    let Some(cm) = config_maps.get_opt(&mesh_config_map_name(job)).await? else {
        return Ok(None);
    };
    let text = cm
        .data
        .and_then(|d| d.get("mesh.json").cloned())
        .ok_or_else(|| anyhow::anyhow!("mesh ConfigMap of {job} without mesh.json"))?;
    Ok(Some(serde_json::from_str(&text)?))
}

/// Every pod of the job, by its job label.
pub async fn job_pods(pods: &Api<Pod>, job: &str) -> Result<Vec<Pod>, kube::Error> {
    Ok(pods
        .list(&ListParams::default().labels(&format!("{LABEL_JOB}={job}")))
        .await?
        .items)
}

/// The job's running pods (not being deleted): name → (uid, node).
pub async fn running_workers(
    pods: &Api<Pod>,
    job: &str,
) -> anyhow::Result<BTreeMap<String, (String, String)>> {
    Ok(job_pods(pods, job)
        .await?
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
        .map(|p| {
            let node = p
                .spec
                .as_ref()
                .and_then(|s| s.node_name.clone())
                .unwrap_or_default();
            (p.name_any(), (p.uid().unwrap_or_default(), node))
        })
        .collect())
}

/// Waits (up to 120 s) until `job` is Running with `workers` running
/// workers, each on the node its mesh (at `epoch` or later) says; returns
/// the workers and the mesh.
pub async fn wait_running(
    ns: &TestNamespace,
    job: &str,
    workers: usize,
    epoch: u64,
) -> anyhow::Result<(BTreeMap<String, (String, String)>, MeshPlan)> {
    let pods: Api<Pod> = ns.api();
    let config_maps: Api<ConfigMap> = ns.api();
    let jobs: Api<TrainingJob> = ns.api();
    let other = |e: anyhow::Error| HarnessError::Other(e.to_string());
    let found = wait_for(
        &format!("{job} to run {workers} workers at mesh epoch ≥ {epoch}"),
        Duration::from_secs(120),
        || {
            let (pods, config_maps, jobs) = (pods.clone(), config_maps.clone(), jobs.clone());
            async move {
                let running = running_workers(&pods, job).await.map_err(other)?;
                let Some(mesh) = mesh_of(&config_maps, job).await.map_err(other)? else {
                    return Ok(None);
                };
                let status = jobs.get(job).await?.status.unwrap_or_default();
                let placed = mesh.workers.iter().all(|w| {
                    running
                        .get(&w.name)
                        .is_some_and(|(_, node)| *node == w.node)
                });
                let done = running.len() == workers
                    && mesh.workers.len() == workers
                    && mesh.epoch >= epoch
                    && placed
                    && status.phase == Phase::Running
                    && status.mesh_epoch == mesh.epoch as i64;
                Ok(done.then_some((running, mesh)))
            }
        },
    )
    .await?;
    Ok(found)
}

/// Makes kwok mark `node` NotReady (or Ready again).
pub async fn set_not_ready(nodes: &Api<Node>, node: &str, not_ready: bool) -> anyhow::Result<()> {
    let value = if not_ready {
        serde_json::json!("true")
    } else {
        serde_json::Value::Null
    };
    let patch = serde_json::json!({ "metadata": { "labels": { NODE_NOT_READY: value } } });
    nodes
        .patch(node, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    Ok(())
}
