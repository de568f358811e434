//! The operator's controller against the real API server, scheduler and
//! garbage collector, on kwok GPU nodes: a job too big for the cluster stays
//! Pending with no pod and says why (gang start); a job that fits gets one
//! worker per 8-GPU node, placed where the mesh says, and runs; a lost node
//! shrinks it (the survivors' pods untouched, a new mesh epoch); the node's
//! return grows it again, but not before the rescale cooldown; a failed
//! worker is counted and replaced; suspend removes its workers and resume
//! brings them back; a job whose workers report no step for its stall
//! timeout says so, until it is suspended; a worker that finishes ends the
//! job and frees its GPUs;
//! a job whose workers fail past its restart limit fails and says why; and
//! each of these is a Kubernetes event on the job.
//!
//! Its own test binary (one test), so it has the GPUs to itself.

use std::time::Duration;

use anyhow::{Context, ensure};
use k8s_openapi::api::core::v1::{Event, Node, Pod};
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use weft_crds::{Phase, TrainingJob};
use weft_e2e::jobs::{job_pods, running_workers, set_not_ready, sleeper_job, wait_running};
use weft_e2e::{HarnessError, TestEnv, wait_for, wait_job_status};

const FAIL: &str = "pod-container-running-failed.stage.kwok.x-k8s.io";
const COOLDOWN_S: i32 = 5;

fn job(name: &str, min: i32, max: i32, gpus: i32) -> TrainingJob {
    sleeper_job(name, min, max, gpus, COOLDOWN_S)
}

/// Makes kwok fail a worker pod's container (exit code 1).
async fn fail_pod(pods: &Api<Pod>, pod: &str) -> anyhow::Result<()> {
    let patch = serde_json::json!({ "metadata": { "labels": { FAIL: "true" } } });
    pods.patch(pod, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    Ok(())
}

/// The reasons of the events recorded about a job.
async fn event_reasons(events: &Api<Event>, job: &str) -> anyhow::Result<Vec<String>> {
    let list = events
        .list(&ListParams::default().fields(&format!("involvedObject.name={job}")))
        .await?;
    Ok(list.items.into_iter().filter_map(|e| e.reason).collect())
}

#[tokio::test]
async fn the_controller_gangs_places_shrinks_grows_replaces_suspends_and_ends_jobs()
-> anyhow::Result<()> {
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
        ensure!(
            job_pods(&pods, "too-big").await?.is_empty(),
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

        let shrink_time = jobs
            .get("elastic")
            .await?
            .status
            .and_then(|s| s.last_rescale_time)
            .context("a shrink records its time")?;

        // The node comes back: the job grows to three again, once the
        // cooldown after the shrink has passed.
        let (_, mesh) = wait_running(&ns, "elastic", 3, mesh.epoch + 1).await?;
        let grow_time = jobs
            .get("elastic")
            .await?
            .status
            .and_then(|s| s.last_rescale_time)
            .context("a growth records its time")?;
        let waited = grow_time.0.duration_since(shrink_time.0).as_secs_f64();
        ensure!(
            waited >= f64::from(COOLDOWN_S) - 0.001,
            "grew {waited:.1} s after the shrink, inside the {COOLDOWN_S} s cooldown"
        );

        // A worker fails: counted once, replaced, the others untouched.
        let (before, _) = wait_running(&ns, "elastic", 3, mesh.epoch).await?;
        let victim = mesh.workers[1].name.clone();
        fail_pod(&pods, &victim).await?;
        let status = wait_job_status(&jobs, "elastic", "the failure to be counted", |s| {
            s.restarts == 1
        })
        .await?;
        ensure!(
            status.recent_failures[0].worker == victim
                && status.recent_failures[0]
                    .reason
                    .contains("exited with code 1"),
            "{:?}",
            status.recent_failures
        );
        let (after, mesh) = wait_running(&ns, "elastic", 3, mesh.epoch + 1).await?;
        ensure!(
            after[&victim].0 != before[&victim].0,
            "the failed worker is a new pod"
        );
        for (name, (uid, _)) in after.iter().filter(|(n, _)| **n != victim) {
            ensure!(before[name].0 == *uid, "survivor {name} was recreated");
        }
        ensure!(
            jobs.get("elastic")
                .await?
                .status
                .unwrap_or_default()
                .restarts
                == 1,
            "one failure is one restart"
        );

        // Its workers (kwok's: no process behind them) never report a
        // step: with a stall timeout the job says so, within the timeout
        // of its last change, without any other event to wake the operator.
        let watch = serde_json::json!({ "spec": { "elasticity": { "stallTimeoutSeconds": 10 } } });
        jobs.patch("elastic", &PatchParams::default(), &Patch::Merge(&watch))
            .await?;
        let asked = std::time::Instant::now();
        let status = wait_job_status(&jobs, "elastic", "elastic to be stalled", |s| {
            s.conditions
                .iter()
                .any(|c| c.type_ == "Stalled" && c.status == "True")
        })
        .await?;
        let stalled = status
            .conditions
            .iter()
            .find(|c| c.type_ == "Stalled")
            .context("the Stalled condition")?;
        ensure!(
            stalled.reason == "NoStepReported"
                && stalled
                    .message
                    .starts_with("no training step reported since ")
                && stalled
                    .message
                    .contains("elasticity.stallTimeoutSeconds (10 s)"),
            "{stalled:?}"
        );
        ensure!(
            asked.elapsed() < Duration::from_secs(40),
            "stalled {:.0} s after the timeout was set",
            asked.elapsed().as_secs_f64()
        );

        // Suspend: no workers, and nothing stalls; resume: three again.
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
                let stalled = status.conditions.iter().any(|c| c.type_ == "Stalled");
                Ok((status.phase == Phase::Suspended && left.is_empty() && !stalled).then_some(()))
            }
        })
        .await?;
        let resume = serde_json::json!({ "spec": { "suspend": false } });
        jobs.patch("elastic", &PatchParams::default(), &Patch::Merge(&resume))
            .await?;
        let (_, mesh) = wait_running(&ns, "elastic", 3, mesh.epoch + 1).await?;

        // A worker finishes: the job has succeeded and its GPUs are free.
        let finisher = mesh.workers[0].name.clone();
        let done = serde_json::json!({ "status": { "phase": "Succeeded" } });
        pods.patch_status(&finisher, &PatchParams::default(), &Patch::Merge(&done))
            .await?;
        let status = wait_job_status(&jobs, "elastic", "elastic to succeed", |s| {
            s.phase == Phase::Succeeded
        })
        .await?;
        ensure!(status.completion_time.is_some(), "a finished job says when");
        wait_for(
            "elastic's workers to be gone",
            Duration::from_secs(60),
            || {
                let pods = pods.clone();
                async move {
                    let live = job_pods(&pods, "elastic")
                        .await?
                        .into_iter()
                        .filter(|p| {
                            p.status.as_ref().and_then(|s| s.phase.as_deref()) != Some("Succeeded")
                        })
                        .count();
                    Ok((live == 0).then_some(()))
                }
            },
        )
        .await?;

        // Past the restart limit the job fails, says why, and stops.
        let mut flaky = job("flaky", 2, 2, 8);
        flaky.spec.elasticity.restart_limit = 1;
        jobs.create(&PostParams::default(), &flaky).await?;
        let (workers, _) = wait_running(&ns, "flaky", 2, 1).await?;
        for name in workers.keys() {
            fail_pod(&pods, name).await?;
        }
        let status = wait_job_status(&jobs, "flaky", "flaky to fail", |s| {
            s.phase == Phase::Failed
        })
        .await?;
        let failed = status
            .conditions
            .iter()
            .find(|c| c.type_ == "Failed")
            .context("a Failed condition")?;
        ensure!(
            failed.reason == "RestartLimitExceeded"
                && failed
                    .message
                    .contains("2 worker failures, more than elasticity.restartLimit 1"),
            "{failed:?}"
        );
        ensure!(
            running_workers(&pods, "flaky").await?.is_empty(),
            "a failed job runs nothing"
        );

        // A worker that refuses the job's settings (exit 78, its reason as
        // its termination message) fails the job at once, with that reason,
        // rather than spend the job's restarts on it.
        jobs.create(&PostParams::default(), &job("refusing", 2, 2, 8))
            .await?;
        let (workers, _) = wait_running(&ns, "refusing", 2, 1).await?;
        let refuser = workers.keys().next().context("a worker")?.clone();
        let said = "spec.model.checkpoint /models/llama: no config.json there";
        let refused = serde_json::json!({ "status": {
            "phase": "Failed",
            "containerStatuses": [{
                "name": "trainer", "image": "weft-trainer:dev", "imageID": "",
                "ready": false, "restartCount": 0,
                "state": { "terminated": {
                    "exitCode": weft_crds::SETTINGS_REFUSED_EXIT,
                    "reason": "Error",
                    "message": format!("weft-trainer: error: {said}\n"),
                }},
            }],
        }});
        pods.patch_status(&refuser, &PatchParams::default(), &Patch::Merge(&refused))
            .await?;
        let status = wait_job_status(&jobs, "refusing", "refusing to fail", |s| {
            s.phase == Phase::Failed
        })
        .await?;
        let failed = status
            .conditions
            .iter()
            .find(|c| c.type_ == "Failed")
            .context("a Failed condition")?;
        ensure!(
            failed.reason == "InvalidSpec"
                && failed.message.contains(&format!(
                    "worker {refuser} refused the job's settings: weft-trainer: error: {said}"
                ))
                && status.restarts == 1,
            "{status:?}"
        );
        ensure!(
            running_workers(&pods, "refusing").await?.is_empty(),
            "a failed job runs nothing"
        );

        // What happened is told as events on the jobs.
        let events: Api<Event> = ns.api();
        let reasons = wait_for("the events to be recorded", Duration::from_secs(30), || {
            let events = events.clone();
            async move {
                let elastic = event_reasons(&events, "elastic")
                    .await
                    .map_err(|e| HarnessError::Other(e.to_string()))?;
                let flaky = event_reasons(&events, "flaky")
                    .await
                    .map_err(|e| HarnessError::Other(e.to_string()))?;
                let all = ["MeshEpoch", "WorkerFailed", "Suspended", "Succeeded"]
                    .iter()
                    .all(|r| elastic.iter().any(|e| e == r))
                    && flaky.iter().any(|e| e == "RestartLimitExceeded");
                Ok(all.then_some((elastic, flaky)))
            }
        })
        .await;
        ensure!(reasons.is_ok(), "missing events: {reasons:?}");
        controller.abort();
        Ok(())
    })
    .await
}
