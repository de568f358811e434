//! The operator's published documents drive a real training run: a job is
//! reconciled against the real API server, and the mesh and training
//! parameters it publishes in the job's ConfigMap are handed, as they are,
//! to `weft-trainer worker` processes named after its pods (kwok runs no
//! containers, so the pods' command runs here). The only change is the
//! rendezvous host, which names rank 0's pod through the job's Service and
//! is the loopback address here. Both workers train to the last step, and
//! rank 0's worker writes the job's progress (step, tokens/s, the last
//! checkpoint) into its status as the job's worker ServiceAccount, which the
//! operator made and which may do nothing else; the operator, reconciling
//! all the while, keeps those fields.
//!
//! Then a new epoch reaches running workers through the API server alone:
//! with the operator stopped, the test publishes epoch 2 (a new rendezvous)
//! in the ConfigMap and never touches the workers' mounted copy (a kubelet
//! refreshes it only on its next sync of the pod, a minute or more later);
//! the workers, following the ConfigMap with their ServiceAccount, stop
//! after the same step and go on in epoch 2 within the seconds left of
//! their run.
//!
//! Needs `cargo build -p weft-trainer` first (scripts/test does it).

use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, ensure};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use kube::api::PostParams;
use tokio::io::AsyncBufReadExt;
use tokio::process::Command;
use weft_crds::{Phase, TrainingJob, TrainingJobSpec, WorkerResources};
use weft_e2e::{TestEnv, trainer_binary, wait_job_status};
use weft_operator::build::{mesh_config_map_name, worker_account_name};
use weft_planner::mesh::MeshPlan;

#[tokio::test]
async fn the_published_mesh_and_parameters_train_a_model() -> anyhow::Result<()> {
    let env = TestEnv::connect().await?;
    weft_e2e::ensure_training_job_crd(&env).await?;
    env.run("workers", |ns| async move {
        let controller = tokio::spawn(weft_operator::controller::run(
            ns.client.clone(),
            Some(ns.name.clone()),
        ));
        let scratch = std::env::temp_dir().join(format!("weft-e2e-{}", ns.name));
        std::fs::create_dir_all(&scratch)?;
        let mut spec = TrainingJobSpec {
            resources: WorkerResources {
                gpus: 1,
                cpu: Some("1".into()),
                memory: Some("1Gi".into()),
            },
            ..TrainingJobSpec::new("ghcr.io/weft-dev/weft-trainer:0.1.0", 2, 2)
        };
        spec.data.max_sequence_length = 1024;
        spec.data.tokens_per_step = 4096;
        spec.checkpoint.path = scratch.join("checkpoints").to_string_lossy().into_owned();
        spec.checkpoint.interval_steps = 1;
        let jobs: Api<TrainingJob> = ns.api();
        jobs.create(&PostParams::default(), &TrainingJob::new("trained", spec))
            .await?;
        wait_job_status(&jobs, "trained", "trained to be Running", |s| {
            s.phase == Phase::Running
        })
        .await?;
        let kubeconfig =
            weft_e2e::service_account_kubeconfig(&ns, &worker_account_name("trained")).await?;

        // The ConfigMap as the pods would mount it.
        let config_maps: Api<ConfigMap> = ns.api();
        let data = config_maps
            .get(&mesh_config_map_name("trained"))
            .await?
            .data
            .context("the mesh ConfigMap has no data")?;
        let mut mesh: MeshPlan = serde_json::from_str(&data["mesh.json"])?;
        let published = mesh.rendezvous.clone().context("no rendezvous in the mesh")?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        mesh.rendezvous = Some(format!("127.0.0.1:{port}"));
        std::fs::write(scratch.join("mesh.json"), serde_json::to_string(&mesh)?)?;
        std::fs::write(scratch.join("training.json"), &data["training.json"])?;
        ensure!(mesh.workers.len() == 2 && mesh.world_size == 2, "{mesh:?}");

        // `weft-trainer worker` as the pod of `worker` runs it, with the job's
        // worker ServiceAccount; following the mesh ConfigMap through the API
        // server too when `follow_api`.
        let worker_command = |worker: &str, steps: &str, follow_api: bool| -> anyhow::Result<Command> {
            let mut command = Command::new(trainer_binary()?);
            command
                .args(["worker", "--steps", steps, "--epoch-wait-s", "30"])
                .env("WEFT_WORKER", worker)
                .env("WEFT_MESH", scratch.join("mesh.json"))
                .env("WEFT_TRAINING", scratch.join("training.json"))
                .env("WEFT_POD_IP", "127.0.0.1")
                .env("WEFT_JOB", "trained")
                .env("WEFT_NAMESPACE", &ns.name)
                .env("KUBECONFIG", &kubeconfig)
                .stderr(Stdio::piped())
                .kill_on_drop(true);
            if follow_api {
                command.env("WEFT_MESH_CONFIGMAP", mesh_config_map_name("trained"));
            }
            Ok(command)
        };
        let mut workers = Vec::new();
        for worker in &mesh.workers {
            let child = worker_command(&worker.name, "2", false)?
                .stdout(Stdio::piped())
                .spawn()?;
            workers.push(child);
        }
        let mut steps = Vec::new();
        let mut logs = String::new();
        for (index, child) in workers.into_iter().enumerate() {
            let output = tokio::time::timeout(Duration::from_secs(120), child.wait_with_output())
                .await
                .context("the workers did not finish within 120 s")??;
            ensure!(
                output.status.success(),
                "worker {index} failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
            logs += &String::from_utf8_lossy(&output.stderr);
            let mut lines = tokio::io::BufReader::new(output.stdout.as_slice()).lines();
            while let Some(line) = lines.next_line().await? {
                if let Some(body) = line.strip_prefix("weft-metrics ") {
                    let m: serde_json::Value = serde_json::from_str(body)?;
                    steps.push((m["step"].as_u64(), m["world"].as_u64(), m["loss"].as_f64()));
                }
            }
        }
        ensure!(
            steps.len() == 2
                && steps.iter().all(|(_, world, loss)| *world == Some(2)
                    && loss.is_some_and(f64::is_finite)),
            "rank 0 reports each of the 2 steps on a world of 2: {steps:?} (published rendezvous {published})"
        );
        ensure!(
            scratch.join("checkpoints/step-00000002/state.json").exists(),
            "no checkpoint at the job's checkpoint.path"
        );

        // The progress is in the status, and stays there while the operator
        // reconciles (the status changes wake it).
        let checkpoints = scratch
            .join("checkpoints/step-00000002")
            .to_string_lossy()
            .into_owned();
        // With it, what the operator derives from it: the time to the first
        // step (from the start the operator recorded) and goodput.
        let status = wait_job_status(&jobs, "trained", "the progress in the status", |s| {
            s.step == 2
                && s.tokens_per_second.is_some_and(|t| t > 0.0)
                && s.last_checkpoint
                    .as_ref()
                    .is_some_and(|c| c.step == 2 && c.path == checkpoints)
                && s.step_seconds.is_some_and(|t| t > 0.0)
                && s.last_step_time.is_some()
                && s.epoch_first_step
                    .as_ref()
                    .is_some_and(|f| f.mesh_epoch == mesh.epoch as i64)
                && s.time_to_first_step_seconds.is_some_and(|t| t >= 0)
                && s.goodput.is_some_and(|g| g > 0.0 && g <= 1.0)
        })
        .await
        .with_context(|| format!("the workers said:\n{logs}"))?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let later = jobs.get("trained").await?.status.unwrap_or_default();
        ensure!(
            later.step == 2 && later.last_checkpoint == status.last_checkpoint,
            "the operator dropped the progress: {later:?}"
        );
        controller.abort();

        // A new epoch through the API server alone.
        let epoch = mesh.epoch;
        let workers: Vec<_> = mesh
            .workers
            .iter()
            .map(|worker| {
                Ok(worker_command(&worker.name, "60", true)?
                    .stdout(Stdio::null())
                    .spawn()?)
            })
            .collect::<anyhow::Result<_>>()?;
        let checkpoints = scratch.join("checkpoints");
        let newest_step = || {
            std::fs::read_dir(&checkpoints)
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|e| {
                    e.file_name()
                        .to_str()?
                        .strip_prefix("step-")?
                        .parse::<u64>()
                        .ok()
                })
                .max()
                .unwrap_or(0)
        };
        let started = std::time::Instant::now();
        while newest_step() < 5 {
            ensure!(
                started.elapsed() < Duration::from_secs(60),
                "the workers did not reach step 5"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        mesh.epoch = epoch + 1;
        mesh.rendezvous = Some(format!("127.0.0.1:{port}"));
        let patch = serde_json::json!({"data": {"mesh.json": serde_json::to_string(&mesh)?}});
        config_maps
            .patch(
                &mesh_config_map_name("trained"),
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(&patch),
            )
            .await?;
        let published_at = newest_step();
        // How soon the API server's mesh reaches the workers' own copies
        // (which their ranks and supervisors follow), against the minute or
        // more a kubelet takes to refresh the mounted volume.
        let patched = std::time::Instant::now();
        let copies: Vec<std::path::PathBuf> = mesh
            .workers
            .iter()
            .zip(&workers)
            .filter_map(|(worker, child)| {
                Some(
                    std::env::temp_dir()
                        .join(format!("weft-mesh-{}-{}", worker.name, child.id()?))
                        .join("mesh.json"),
                )
            })
            .collect();
        let copied = |path: &std::path::PathBuf| {
            std::fs::read_to_string(path)
                .ok()
                .and_then(|text| serde_json::from_str::<MeshPlan>(&text).ok())
                .is_some_and(|copy| copy.epoch == epoch + 1)
        };
        while !copies.iter().all(copied) && patched.elapsed() < Duration::from_secs(30) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mirrored = patched.elapsed();
        ensure!(
            copies.len() == 2 && copies.iter().all(copied),
            "the workers' copies of the mesh never reached epoch {}: {copies:?}",
            epoch + 1
        );
        let mut logs = String::new();
        for (index, child) in workers.into_iter().enumerate() {
            let output = tokio::time::timeout(Duration::from_secs(120), child.wait_with_output())
                .await
                .context("the workers did not finish within 120 s")??;
            let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
            ensure!(output.status.success(), "worker {index} failed: {stderr}");
            logs += &stderr;
        }
        ensure!(
            logs.matches(&format!("epoch {epoch} ended: a new mesh is published"))
                .count()
                == 2
                && logs.matches(&format!("epoch {}: ranks", epoch + 1)).count() == 2,
            "both workers should have left epoch {epoch} for epoch {} (published at step {published_at} of 60) through the API server: {logs}",
            epoch + 1
        );
        for line in logs.lines().filter(|l| l.contains("epoch")) {
            eprintln!("workers: {line}");
        }
        eprintln!(
            "workers: epoch {} published through the API server only, after step {published_at} of 60; in both workers' copies {} ms later",
            epoch + 1,
            mirrored.as_millis()
        );
        ensure!(
            checkpoints.join("step-00000060/state.json").exists(),
            "no checkpoint of the last step"
        );
        let _ = std::fs::remove_dir_all(&scratch);
        Ok(())
    })
    .await
}
