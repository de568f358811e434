//! The operator's controller against the real API server, scheduler and
//! garbage collector, on kwok GPU nodes: a job too big for the cluster stays
//! Pending with no pod and says why (gang start); a job that fits gets one
//! worker per 8-GPU node, placed where the mesh says, and runs; a lost node
//! shrinks it (the survivors' pods untouched, a new mesh epoch); the node's
//! return grows it again; suspend removes its workers and resume brings them
//! back.
//!
//! Its own test binary (one test), so it has the GPUs to itself.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, ensure};
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod};
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use weft_crds::{Phase, TrainingJob, TrainingJobSpec, WorkerRange, WorkerResources};
use weft_e2e::{HarnessError, TestEnv, wait_for};
use weft_operator::build::{LABEL_JOB, mesh_config_map_name};
use weft_planner::mesh::MeshPlan;

const NOT_READY: &str = "node-not-ready.stage.kwok.x-k8s.io";

fn job(name: &str, min: i32, max: i32, gpus: i32) -> TrainingJob {
    TrainingJob::new(
        name,
        TrainingJobSpec {
            image: "busybox:1.36".into(),
            command: Some(vec!["sleep".into(), "3600".into()]),
            args: None,
            workers: WorkerRange { min, max },
            resources: WorkerResources {
                gpus,
                cpu: Some("1".into()),
                memory: Some("1Gi".into()),
            },
            suspend: false,
        },
    )
}

/// The job's running pods: name → (uid, node).
async fn running_workers(
    pods: &Api<Pod>,
    job: &str,
) -> anyhow::Result<BTreeMap<String, (String, String)>> {
    let list = pods
        .list(&ListParams::default().labels(&format!("{LABEL_JOB}={job}")))
        .await?;
    Ok(list
        .items
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

async fn mesh_of(config_maps: &Api<ConfigMap>, job: &str) -> anyhow::Result<Option<MeshPlan>> {
    let Some(cm) = config_maps.get_opt(&mesh_config_map_name(job)).await? else {
        return Ok(None);
    };
    let text = cm
        .data
        .and_then(|d| d.get("mesh.json").cloned())
        .context("mesh ConfigMap without mesh.json")?;
    Ok(Some(serde_json::from_str(&text)?))
}

/// Waits until the job runs `workers` workers, each on the node its mesh
/// says, with the job Running and the mesh at `epoch` or later; returns the
/// workers and the mesh.
async fn wait_running(
    ns: &weft_e2e::TestNamespace,
    job: &str,
    workers: usize,
    epoch: u64,
) -> anyhow::Result<(BTreeMap<String, (String, String)>, MeshPlan)> {
    let pods: Api<Pod> = ns.api();
    let config_maps: Api<ConfigMap> = ns.api();
    let jobs: Api<TrainingJob> = ns.api();
    wait_for(
        &format!("{job} to run {workers} workers at mesh epoch ≥ {epoch}"),
        Duration::from_secs(120),
        || {
            let (pods, config_maps, jobs) = (pods.clone(), config_maps.clone(), jobs.clone());
            async move {
                let run = async {
                    let running = running_workers(&pods, job).await?;
                    let Some(mesh) = mesh_of(&config_maps, job).await? else {
                        return Ok::<_, anyhow::Error>(None);
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
                };
                run.await.map_err(|e| HarnessError::Other(e.to_string()))
            }
        },
    )
    .await
    .map_err(Into::into)
}

async fn set_not_ready(nodes: &Api<Node>, node: &str, not_ready: bool) -> anyhow::Result<()> {
    let value = if not_ready {
        serde_json::json!("true")
    } else {
        serde_json::Value::Null
    };
    let patch = serde_json::json!({ "metadata": { "labels": { NOT_READY: value } } });
    nodes
        .patch(node, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    Ok(())
}

#[tokio::test]
async fn the_controller_gangs_places_shrinks_grows_and_suspends_jobs() -> anyhow::Result<()> {
    let env = TestEnv::connect().await?;
    weft_e2e::ensure_training_job_crd(&env).await?;
    env.run("controller", |ns| async move {
        let controller = tokio::spawn(weft_operator::controller::run(
            ns.client.clone(),
            Some(ns.name.clone()),
        ));
        let jobs: Api<TrainingJob> = ns.api();
        let pods: Api<Pod> = ns.api();
        let nodes: Api<Node> = Api::all(ns.client.clone());

        // Gang start: 5 workers of 8 GPUs do not fit; nothing starts.
        jobs.create(&PostParams::default(), &job("too-big", 5, 5, 8))
            .await?;
        let message = wait_for(
            "too-big to say why it waits",
            Duration::from_secs(60),
            || {
                let jobs = jobs.clone();
                async move {
                    let status = jobs.get("too-big").await?.status.unwrap_or_default();
                    let schedulable = status
                        .conditions
                        .iter()
                        .find(|c| c.type_ == "Schedulable" && c.status == "False");
                    Ok((status.phase == Phase::Pending)
                        .then(|| schedulable.map(|c| c.message.clone()))
                        .flatten())
                }
            },
        )
        .await?;
        ensure!(
            message.contains("needs 5 workers of 8 GPUs (40 GPUs)"),
            "{message}"
        );
        let waiting = pods
            .list(&ListParams::default().labels(&format!("{LABEL_JOB}=too-big")))
            .await?;
        ensure!(
            waiting.items.is_empty(),
            "a job that cannot start has no pods"
        );
        jobs.delete("too-big", &Default::default()).await?;

        // One worker per 8-GPU node, on the node the mesh chose.
        jobs.create(&PostParams::default(), &job("elastic", 2, 3, 8))
            .await?;
        let (three, mesh) = wait_running(&ns, "elastic", 3, 1).await?;
        let epoch = mesh.epoch;

        // A node is lost: the job shrinks to the two survivors, whose pods stay.
        let lost = mesh.workers[0].node.clone();
        set_not_ready(&nodes, &lost, true).await?;
        let shrunk = wait_running(&ns, "elastic", 2, epoch + 1).await;
        set_not_ready(&nodes, &lost, false).await?;
        let (two, mesh) = shrunk?;
        ensure!(
            mesh.workers.iter().all(|w| w.node != lost),
            "no worker on the lost node"
        );
        for (name, (uid, _)) in &two {
            ensure!(
                three.get(name).is_some_and(|(u, _)| u == uid),
                "survivor {name} was recreated"
            );
        }

        // The node comes back: the job grows to three again.
        let (_, mesh) = wait_running(&ns, "elastic", 3, mesh.epoch + 1).await?;

        // Suspend: no workers; resume: three again.
        let suspend = serde_json::json!({ "spec": { "suspend": true } });
        jobs.patch("elastic", &PatchParams::default(), &Patch::Merge(&suspend))
            .await?;
        wait_for("elastic to suspend", Duration::from_secs(60), || {
            let (jobs, pods) = (jobs.clone(), pods.clone());
            async move {
                let status = jobs.get("elastic").await?.status.unwrap_or_default();
                let left = running_workers(&pods, "elastic")
                    .await
                    .map_err(|e| HarnessError::Other(e.to_string()))?;
                Ok((status.phase == Phase::Suspended && left.is_empty()).then_some(()))
            }
        })
        .await?;
        let resume = serde_json::json!({ "spec": { "suspend": false } });
        jobs.patch("elastic", &PatchParams::default(), &Patch::Merge(&resume))
            .await?;
        wait_running(&ns, "elastic", 3, mesh.epoch + 1).await?;
        controller.abort();
        Ok(())
    })
    .await
}
