//! The operator against hostile input, on the real API server with kwok
//! nodes: a job whose stored status no reader can parse (written before the
//! schema held times to what readers parse) is reported on that job while
//! every other job goes on; workers writing their progress at the edges of
//! what the schema takes harm nothing; pods that carry a job's label but are
//! not its own are neither counted nor deleted nor taken for its end; pod
//! creations a ResourceQuota refuses leave the job running with the workers
//! it has, at one mesh epoch, saying why; a deleted mesh ConfigMap comes back
//! at once at the same epoch; a hand-edited one never crashes the operator
//! nor is taken for its own; two jobs created at once do not plan onto the
//! same GPUs, and the one that waits shuns no healthy node; and a worker on
//! a node that can no longer be read is moved, with an event that says so.
//!
//! Its own test binary (one test): it swaps the TrainingJob schema for a
//! while, and it wants the GPUs to itself.

use std::time::Duration;

use anyhow::{Context, ensure};
use k8s_openapi::api::core::v1::{ConfigMap, Event, Node, Pod, ResourceQuota};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{ApiResource, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, CustomResourceExt, ResourceExt};
use serde_json::json;
use weft_crds::topology::ANNOTATION_NICS;
use weft_crds::{Phase, TrainingJob};
use weft_e2e::jobs::{mesh_of, running_workers, sleeper_job, wait_running};
use weft_e2e::{HarnessError, TestEnv, TestNamespace, wait_for, wait_job_status};
use weft_operator::build::{LABEL_JOB, mesh_config_map_name};

/// Makes kwok fail a pod's container (exit code 1).
const FAIL: &str = "pod-container-running-failed.stage.kwok.x-k8s.io";

/// (reason, message) of every event about `object`.
async fn events(ns: &TestNamespace, object: &str) -> anyhow::Result<Vec<(String, String)>> {
    let events: Api<Event> = ns.api();
    let list = events
        .list(&ListParams::default().fields(&format!("involvedObject.name={object}")))
        .await?;
    Ok(list
        .items
        .into_iter()
        .map(|e| (e.reason.unwrap_or_default(), e.message.unwrap_or_default()))
        .collect())
}

/// Waits for an event `reason` about `object` whose message contains `text`.
async fn wait_event(
    ns: &TestNamespace,
    object: &str,
    reason: &str,
    text: &str,
) -> anyhow::Result<String> {
    Ok(wait_for(
        &format!("a {reason} event on {object} saying {text:?}"),
        Duration::from_secs(60),
        || async move {
            let found = events(ns, object)
                .await
                .map_err(|e| HarnessError::Other(e.to_string()))?;
            Ok(found
                .into_iter()
                .find(|(r, m)| r == reason && m.contains(text))
                .map(|(_, m)| m))
        },
    )
    .await?)
}

/// Puts `crd`'s schema in place and waits until a status write shows the API server uses
/// it: `probe` is accepted (`accepted`) or refused.
async fn swap_schema(
    ns: &TestNamespace,
    crd: &CustomResourceDefinition,
    job: &str,
    probe: serde_json::Value,
    accepted: bool,
) -> anyhow::Result<()> {
    // Replaced whole: an apply would leave the fields other managers (a
    // helm install of the chart) also set.
    let crds: Api<CustomResourceDefinition> = Api::all(ns.client.clone());
    let mut current = crds.get("trainingjobs.weft.dev").await?;
    current.spec = crd.spec.clone();
    crds.replace("trainingjobs.weft.dev", &PostParams::default(), &current)
        .await?;
    let resource = ApiResource::erase::<TrainingJob>(&());
    let jobs: Api<DynamicObject> = Api::namespaced_with(ns.client.clone(), &ns.name, &resource);
    let dry_run = PatchParams {
        dry_run: true,
        ..Default::default()
    };
    wait_for(
        "the API server to serve the new schema",
        Duration::from_secs(60),
        || {
            let (jobs, probe, dry_run) = (jobs.clone(), probe.clone(), dry_run.clone());
            async move {
                let result = jobs
                    .patch_status(job, &dry_run, &Patch::Merge(&json!({ "status": probe })))
                    .await;
                Ok((result.is_ok() == accepted).then_some(()))
            }
        },
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn hostile_statuses_stray_pods_quotas_and_edited_meshes_stop_no_job() -> anyhow::Result<()> {
    let env = TestEnv::connect().await?;
    weft_e2e::ensure_training_job_crd(&env).await?;
    env.run("hostile", |ns| async move {
        let jobs: Api<TrainingJob> = ns.api();
        let pods: Api<Pod> = ns.api();
        let resource = ApiResource::erase::<TrainingJob>(&());
        let raw_jobs: Api<DynamicObject> =
            Api::namespaced_with(ns.client.clone(), &ns.name, &resource);
        let twelve_digits = json!({ "lastRescaleTime": "2026-12-06T12:00:00.123456789123Z" });

        // A job whose status holds a time no reader parses, stored under a
        // schema that did not refuse it (as before an upgrade of weft).
        jobs.create(
            &PostParams::default(),
            &sleeper_job("unreadable", 1, 1, 4, 5),
        )
        .await?;
        let derived = TrainingJob::crd();
        swap_schema(&ns, &derived, "unreadable", twelve_digits.clone(), true).await?;
        raw_jobs
            .patch_status(
                "unreadable",
                &PatchParams::default(),
                &Patch::Merge(&json!({ "status": twelve_digits })),
            )
            .await?;
        // Probed with another value: an unchanged one is let through
        // (validation ratcheting), as the stored one is.
        let eleven_digits = json!({ "lastRescaleTime": "2026-12-06T12:00:00.12345678912Z" });
        swap_schema(&ns, &weft_crds::crd()?, "unreadable", eleven_digits, false).await?;

        // The operator starts with that job in its list: it reports it,
        // and reconciles every other job.
        let controller = tokio::spawn(weft_operator::controller::run(
            ns.client.clone(),
            Some(ns.name.clone()),
        ));
        jobs.create(&PostParams::default(), &sleeper_job("healthy", 2, 2, 8, 5))
            .await?;
        let (workers, mesh) = wait_running(&ns, "healthy", 2, 1).await?;
        let said = wait_event(&ns, "unreadable", "Unreadable", "status.lastRescaleTime").await?;
        ensure!(said.contains("cannot be read"), "{said}");
        ensure!(
            running_workers(&pods, "unreadable").await?.is_empty(),
            "nothing is done for a job that cannot be read"
        );

        // The workers write their progress at the edges of what the schema
        // takes; the job goes on (a lost worker is replaced).
        jobs.patch_status(
            "healthy",
            &PatchParams::default(),
            &Patch::Merge(&json!({ "status": {
                "step": i64::MAX,
                "tokensPerSecond": 1.0e300,
                "lastStepTime": "9998-12-31T23:59:59.999999999-23:59",
                "stepSeconds": 1.0e300,
                "epochFirstStep": {
                    "meshEpoch": weft_crds::MAX_MESH_EPOCH,
                    "time": "9998-12-31T23:59:59.999999999-23:59",
                },
                "lastCheckpoint": {
                    "step": i64::MAX, "path": "/ckpt/step-max",
                    "time": "9998-12-31T23:59:59.999999999-23:59",
                },
            }})),
        )
        .await?;
        let lost = mesh.workers[0].name.clone();
        pods.delete(&lost, &Default::default()).await?;
        let (after, mesh) = wait_running(&ns, "healthy", 2, mesh.epoch + 1).await?;
        ensure!(
            after[&lost].0 != workers[&lost].0,
            "the deleted worker is a new pod"
        );
        // One event per epoch, each with its own message (not a count on
        // the first one's).
        let epochs: Vec<String> = events(&ns, "healthy")
            .await?
            .into_iter()
            .filter(|(reason, _)| reason == "MeshEpoch")
            .map(|(_, message)| message)
            .collect();
        ensure!(
            epochs.iter().any(|m| m.starts_with("mesh epoch 1:"))
                && epochs
                    .iter()
                    .any(|m| m.starts_with(&format!("mesh epoch {}:", mesh.epoch))),
            "{epochs:?}"
        );

        // Fixed, the unreadable job is reconciled like any other.
        raw_jobs
            .patch_status(
                "unreadable",
                &PatchParams::default(),
                &Patch::Merge(&json!({ "status": { "lastRescaleTime": "2026-12-06T12:00:00Z" } })),
            )
            .await?;
        wait_running(&ns, "unreadable", 1, 1).await?;

        // Pods that only carry the job's label are not its workers: one that
        // succeeds does not end the job, one that fails is not counted, and
        // none is deleted.
        for name in ["stray-done", "stray-failed"] {
            let stray: Pod = serde_json::from_value(json!({
                "metadata": { "name": name, "labels": { LABEL_JOB: "healthy" } },
                "spec": {
                    "containers": [{ "name": "c", "image": "busybox:1.36" }],
                    "tolerations": [{ "operator": "Exists" }],
                },
            }))?;
            pods.create(&PostParams::default(), &stray).await?;
        }
        let phase_of = |name: &'static str, phase: &'static str| {
            let pods = pods.clone();
            async move {
                let pod = pods.get(name).await?;
                let now = pod.status.and_then(|s| s.phase).unwrap_or_default();
                Ok((now == phase).then_some(()))
            }
        };
        for name in ["stray-done", "stray-failed"] {
            wait_for(&format!("{name} to run"), Duration::from_secs(60), || {
                phase_of(name, "Running")
            })
            .await?;
        }
        pods.patch_status(
            "stray-done",
            &PatchParams::default(),
            &Patch::Merge(&json!({ "status": { "phase": "Succeeded" } })),
        )
        .await?;
        pods.patch(
            "stray-failed",
            &PatchParams::default(),
            &Patch::Merge(&json!({ "metadata": { "labels": { FAIL: "true" } } })),
        )
        .await?;
        for (name, phase) in [("stray-done", "Succeeded"), ("stray-failed", "Failed")] {
            wait_for(
                &format!("{name} to be {phase}"),
                Duration::from_secs(60),
                || phase_of(name, phase),
            )
            .await?;
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
        let status = jobs.get("healthy").await?.status.unwrap_or_default();
        ensure!(
            status.phase == Phase::Running && status.restarts == 0,
            "stray pods changed the job: {status:?}"
        );
        for name in ["stray-done", "stray-failed"] {
            let stray = pods.get(name).await?;
            ensure!(
                stray.metadata.deletion_timestamp.is_none(),
                "the operator deleted {name}"
            );
        }
        wait_running(&ns, "healthy", 2, mesh.epoch).await?;
        ensure!(!controller.is_finished(), "the controller stopped");
        controller.abort();
        Ok(())
    })
    .await?;

    env.run("quota", |ns| async move {
        let jobs: Api<TrainingJob> = ns.api();
        let pods: Api<Pod> = ns.api();
        let config_maps: Api<ConfigMap> = ns.api();
        let quota: ResourceQuota = serde_json::from_value(json!({
            "metadata": { "name": "pods" },
            "spec": { "hard": { "pods": "2" } },
        }))?;
        let quotas: Api<ResourceQuota> = ns.api();
        quotas.create(&PostParams::default(), &quota).await?;
        // The quota controller must have counted before the test relies on it.
        wait_for("the quota to be counted", Duration::from_secs(60), || {
            let quotas = quotas.clone();
            async move {
                let used = quotas.get("pods").await?.status.and_then(|s| s.used);
                Ok(used.is_some_and(|u| u.contains_key("pods")).then_some(()))
            }
        })
        .await?;
        let controller = tokio::spawn(weft_operator::controller::run(
            ns.client.clone(),
            Some(ns.name.clone()),
        ));
        jobs.create(&PostParams::default(), &sleeper_job("capped", 1, 3, 4, 1))
            .await?;

        // Three workers fit the nodes, two the quota: the job runs with two,
        // says why, and the mesh stays at one epoch.
        let (_, mesh) = wait_running(&ns, "capped", 2, 1).await?;
        let status = wait_job_status(&jobs, "capped", "the refusal to be named", |s| {
            s.conditions
                .iter()
                .any(|c| c.type_ == "Schedulable" && c.reason == "WorkersRefused")
        })
        .await?;
        let condition = status
            .conditions
            .iter()
            .find(|c| c.type_ == "Schedulable")
            .context("a Schedulable condition")?;
        ensure!(
            condition.message.contains("exceeded quota")
                && condition.message.contains("running with 2"),
            "{}",
            condition.message
        );
        wait_event(&ns, "capped", "WorkersRefused", "exceeded quota").await?;
        tokio::time::sleep(Duration::from_secs(8)).await;
        let still = mesh_of(&config_maps, "capped").await?.context("a mesh")?;
        ensure!(
            still.epoch == mesh.epoch && still.workers.len() == 2,
            "refused creations moved the mesh from epoch {} to {} ({} workers)",
            mesh.epoch,
            still.epoch,
            still.workers.len()
        );
        let names: Vec<String> = running_workers(&pods, "capped")
            .await?
            .into_keys()
            .collect();
        ensure!(
            still.workers.iter().all(|w| names.contains(&w.name)),
            "the mesh names workers that do not exist: {:?} vs {names:?}",
            still.workers
        );

        // The mesh ConfigMap deleted: back at once, at the same epoch.
        config_maps
            .delete(&mesh_config_map_name("capped"), &Default::default())
            .await?;
        let restored = wait_for("the mesh to come back", Duration::from_secs(15), || {
            let config_maps = config_maps.clone();
            async move {
                mesh_of(&config_maps, "capped")
                    .await
                    .map_err(|e| HarnessError::Other(e.to_string()))
            }
        })
        .await?;
        ensure!(
            restored.epoch == mesh.epoch,
            "restored at epoch {} instead of {}",
            restored.epoch,
            mesh.epoch
        );

        // Hand-edited: the largest epoch, then one far ahead. Neither
        // crashes the operator, nor stands: each is replaced by a mesh of the
        // job's own workers, either by a reconcile already under way (at the
        // epoch it had) or, once the edit is seen, at an epoch above any a
        // worker may have followed (or the next, past what weft publishes).
        let mut current = restored;
        let mut republishings = 0;
        for edited in [u64::MAX, 1000] {
            let mut text: serde_json::Value = serde_json::to_value(&current)?;
            text["epoch"] = json!(edited);
            config_maps
                .patch(
                    &mesh_config_map_name("capped"),
                    &PatchParams::default(),
                    &Patch::Merge(&json!({ "data": { "mesh.json": text.to_string() } })),
                )
                .await?;
            let republished = wait_for(
                "the edited mesh to be replaced",
                Duration::from_secs(30),
                || {
                    let config_maps = config_maps.clone();
                    async move {
                        let mesh = mesh_of(&config_maps, "capped")
                            .await
                            .map_err(|e| HarnessError::Other(e.to_string()))?;
                        Ok(mesh.filter(|m| m.epoch != edited))
                    }
                },
            )
            .await?;
            let above = if edited > weft_operator::controller::MAX_EPOCH {
                current.epoch + 1
            } else {
                edited + 1
            };
            ensure!(
                (republished.epoch == current.epoch || republished.epoch == above)
                    && republished.workers.len() == 2,
                "after an edit to epoch {edited} of epoch {}: epoch {}, {} workers",
                current.epoch,
                republished.epoch,
                republished.workers.len()
            );
            if republished.epoch == above {
                republishings += 1;
            }
            current = wait_running(&ns, "capped", 2, republished.epoch).await?.1;
        }
        if republishings > 0 {
            wait_event(&ns, "capped", "MeshRepublished", "not the one weft wrote").await?;
        }
        // A gang the quota cannot hold: it waits, says why, and does not
        // make and delete its workers in a loop meanwhile.
        jobs.delete("capped", &Default::default()).await?;
        wait_for(
            "capped's workers to be gone",
            Duration::from_secs(60),
            || {
                let pods = pods.clone();
                async move {
                    let left = weft_e2e::jobs::job_pods(&pods, "capped").await?;
                    Ok(left.is_empty().then_some(()))
                }
            },
        )
        .await?;
        jobs.create(&PostParams::default(), &sleeper_job("starved", 3, 3, 4, 1))
            .await?;
        let status = wait_job_status(&jobs, "starved", "starved to say why it waits", |s| {
            s.phase == Phase::Pending
                && s.conditions.iter().any(|c| {
                    c.reason == "WorkersRefused" && c.message.contains("fewer than workers.min")
                })
        })
        .await?;
        ensure!(status.restarts == 0, "{status:?}");
        let mut made = std::collections::BTreeSet::new();
        for _ in 0..20 {
            for pod in weft_e2e::jobs::job_pods(&pods, "starved").await? {
                made.insert(pod.metadata.uid.unwrap_or_default());
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        ensure!(
            made.len() <= 2,
            "starved made {} workers in 10 s: it should wait before trying again",
            made.len()
        );
        ensure!(!controller.is_finished(), "the controller stopped");
        controller.abort();
        let _ = jobs.delete("starved", &Default::default()).await;
        Ok(())
    })
    .await?;

    env.run("together", |ns| async move {
        let jobs: Api<TrainingJob> = ns.api();
        let nodes: Api<Node> = Api::all(ns.client.clone());
        // The GPUs of the namespaces above are given back first.
        let all_pods: Api<Pod> = Api::all(ns.client.clone());
        wait_for(
            "the other namespaces' workers to be gone",
            Duration::from_secs(120),
            || {
                let (all_pods, here) = (all_pods.clone(), ns.name.clone());
                async move {
                    let left = all_pods
                        .list(&ListParams::default().labels(LABEL_JOB))
                        .await?
                        .items
                        .into_iter()
                        .filter(|p| p.metadata.namespace.as_deref() != Some(here.as_str()))
                        .count();
                    Ok((left == 0).then_some(()))
                }
            },
        )
        .await?;
        let controller = tokio::spawn(weft_operator::controller::run(
            ns.client.clone(),
            Some(ns.name.clone()),
        ));

        // Two jobs created at once, each 2 to 3 workers of 8 GPUs, on three
        // nodes of 8: one runs, the other waits for capacity without
        // holding pods or shunning the nodes the first one holds.
        // A refused worker would mark its node avoided after 2 s.
        let impatient = |name: &str| {
            let mut job = sleeper_job(name, 2, 3, 8, 1);
            job.spec.elasticity.unschedulable_timeout_seconds = 2;
            job
        };
        let (first, second) = (impatient("first"), impatient("second"));
        let params = PostParams::default();
        let (a, b) = tokio::join!(jobs.create(&params, &first), jobs.create(&params, &second));
        a?;
        b?;
        let (winner, loser) = wait_for("one of the two to run", Duration::from_secs(60), || {
            let jobs = jobs.clone();
            async move {
                let phase = |name: &'static str| {
                    let jobs = jobs.clone();
                    async move {
                        Ok::<_, kube::Error>(jobs.get(name).await?.status.unwrap_or_default().phase)
                    }
                };
                Ok(match (phase("first").await?, phase("second").await?) {
                    (Phase::Running, _) => Some(("first", "second")),
                    (_, Phase::Running) => Some(("second", "first")),
                    _ => None,
                })
            }
        })
        .await?;
        tokio::time::sleep(Duration::from_secs(5)).await;
        let waiting = jobs.get(loser).await?.status.unwrap_or_default();
        let pods: Api<Pod> = ns.api();
        let held = weft_e2e::jobs::job_pods(&pods, loser)
            .await?
            .into_iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .count();
        ensure!(
            waiting.phase == Phase::Pending && waiting.avoided_nodes.is_empty() && held == 0,
            "{loser} should wait without pods ({held} held) or avoided nodes: {waiting:?}"
        );
        jobs.delete(winner, &Default::default()).await?;
        let (_, mesh) = wait_running(&ns, loser, 3, 1).await?;
        let status = jobs.get(loser).await?.status.unwrap_or_default();
        ensure!(
            status.avoided_nodes.is_empty(),
            "{loser} shuns healthy nodes: {:?}",
            status.avoided_nodes
        );

        // A node whose NIC annotation cannot be read: its worker is moved,
        // and the mesh epoch's event says why.
        let node = mesh.workers[0].node.clone();
        let annotate = |value: serde_json::Value| {
            let (nodes, node) = (nodes.clone(), node.clone());
            async move {
                nodes
                    .patch(
                        &node,
                        &PatchParams::default(),
                        &Patch::Merge(
                            &json!({ "metadata": { "annotations": { ANNOTATION_NICS: value } } }),
                        ),
                    )
                    .await
            }
        };
        let original = nodes
            .get(&node)
            .await?
            .annotations()
            .get(ANNOTATION_NICS)
            .cloned()
            .map_or(serde_json::Value::Null, serde_json::Value::from);
        annotate(json!("not a list of NICs")).await?;
        let moved = wait_event(
            &ns,
            loser,
            "MeshEpoch",
            "moved off nodes that cannot be read",
        )
        .await;
        let status = jobs.get(loser).await?.status.unwrap_or_default();
        annotate(original).await?;
        let moved = moved?;
        ensure!(moved.contains(&node), "{moved}");
        ensure!(status.phase != Phase::Failed, "{status:?}");
        ensure!(!controller.is_finished(), "the controller stopped");
        controller.abort();
        Ok(())
    })
    .await
}
