//! The `weft-operator` binary as it runs in production, two replicas with
//! leader election against the real control plane, each with nothing but the
//! credentials of the chart's ServiceAccount (installed with helm, so the
//! chart's RBAC is what is tested): only the lease holder
//! acts (every event on the job comes from it); when it is killed (SIGKILL,
//! no goodbye) the standby takes over once the lease runs out and carries
//! on; an operator killed in the middle of a resume and replaced converges
//! to the same objects, with no duplicate or orphaned pod.
//!
//! Needs `cargo build -p weft-operator` first (scripts/test does it).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Event, Pod, Service};
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use tokio::process::Command;
use weft_crds::{Phase, TrainingJob, TrainingJobSpec, WorkerResources};
use weft_e2e::jobs::job_pods;
use weft_e2e::replicas::{chart_credentials, replica, wait_holder};
use weft_e2e::{TestEnv, TestNamespace, wait_job_status};
use weft_operator::build::{LABEL_JOB, mesh_config_map_name};
use weft_planner::mesh::MeshPlan;

async fn wait_phase(jobs: &Api<TrainingJob>, job: &str, phase: Phase) -> anyhow::Result<()> {
    wait_job_status(jobs, job, &format!("{job} to be {phase:?}"), |s| {
        s.phase == phase
    })
    .await?;
    Ok(())
}

/// (reason, reporting instance) of every event about `job`.
async fn events(ns: &TestNamespace, job: &str) -> anyhow::Result<Vec<(String, String)>> {
    let events: Api<Event> = ns.api();
    let list = events
        .list(&ListParams::default().fields(&format!("involvedObject.name={job}")))
        .await?;
    Ok(list
        .items
        .into_iter()
        .map(|e| {
            (
                e.reason.unwrap_or_default(),
                e.reporting_instance.unwrap_or_default(),
            )
        })
        .collect())
}

#[tokio::test]
async fn two_replicas_one_leader_takeover_and_convergence_after_a_kill() -> anyhow::Result<()> {
    let env = TestEnv::connect().await?;
    weft_e2e::ensure_training_job_crd(&env).await?;
    env.run("operator", |ns| async move {
        let leases: Api<Lease> = ns.api();
        let jobs: Api<TrainingJob> = ns.api();
        let pods: Api<Pod> = ns.api();
        let kubeconfig = chart_credentials(&ns).await?;
        let mut replicas = vec![
            ("replica-a", replica(&ns, &kubeconfig, "replica-a")?),
            ("replica-b", replica(&ns, &kubeconfig, "replica-b")?),
        ];
        let leader = wait_holder(&leases, None).await?;

        // Only the leader acts.
        let mut spec = TrainingJobSpec {
            command: Some(vec!["sleep".into(), "3600".into()]),
            resources: WorkerResources {
                gpus: 4,
                cpu: Some("1".into()),
                memory: Some("1Gi".into()),
            },
            ..TrainingJobSpec::new("busybox:1.36", 2, 2)
        };
        spec.elasticity.rescale_cooldown_seconds = 1;
        jobs.create(&PostParams::default(), &TrainingJob::new("steady", spec))
            .await?;
        wait_phase(&jobs, "steady", Phase::Running).await?;
        let reported: BTreeSet<String> = events(&ns, "steady")
            .await?
            .into_iter()
            .map(|(_, instance)| instance)
            .collect();
        ensure!(
            reported == BTreeSet::from([leader.clone()]),
            "events came from {reported:?}, not only the leader {leader}"
        );

        // The leader dies without releasing its lease; the standby takes over.
        let index = replicas
            .iter()
            .position(|(id, _)| *id == leader)
            .context("the leader is one of ours")?;
        let (_, mut dead) = replicas.remove(index);
        dead.start_kill()?;
        dead.wait().await?;
        let killed = Instant::now();
        let successor = wait_holder(&leases, Some(&leader)).await?;
        let takeover = killed.elapsed();
        eprintln!(
            "takeover by {successor} {:.1} s after the leader was killed",
            takeover.as_secs_f64()
        );

        // The new leader acts: suspend is carried out, and said by it.
        let suspend = serde_json::json!({ "spec": { "suspend": true } });
        jobs.patch("steady", &PatchParams::default(), &Patch::Merge(&suspend))
            .await?;
        wait_phase(&jobs, "steady", Phase::Suspended).await?;
        ensure!(
            events(&ns, "steady")
                .await?
                .iter()
                .any(|(reason, instance)| reason == "Suspended" && *instance == successor),
            "the successor {successor} did not report the suspension"
        );

        // Killed mid-resume and replaced: it converges with nothing twice.
        let resume = serde_json::json!({ "spec": { "suspend": false } });
        jobs.patch("steady", &PatchParams::default(), &Patch::Merge(&resume))
            .await?;
        tokio::time::sleep(Duration::from_millis(150)).await;
        let (_, mut second) = replicas.remove(0);
        second.start_kill()?;
        second.wait().await?;
        let _third = replica(&ns, &kubeconfig, "replica-c")?;
        wait_holder(&leases, Some(&successor)).await?;
        wait_phase(&jobs, "steady", Phase::Running).await?;
        let config_maps: Api<ConfigMap> = ns.api();
        let mesh: MeshPlan = serde_json::from_str(
            config_maps
                .get(&mesh_config_map_name("steady"))
                .await?
                .data
                .and_then(|d| d.get("mesh.json").cloned())
                .as_deref()
                .context("mesh.json")?,
        )?;
        let live: Vec<String> = job_pods(&pods, "steady")
            .await?
            .into_iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .map(|p| p.name_any())
            .collect();
        let planned: Vec<String> = mesh.workers.iter().map(|w| w.name.clone()).collect();
        ensure!(
            live.len() == 2 && live.iter().collect::<BTreeSet<_>>() == planned.iter().collect(),
            "pods {live:?} are not exactly the mesh's workers {planned:?}"
        );
        let services: Api<Service> = ns.api();
        let owned_services = services
            .list(&ListParams::default().labels(&format!("{LABEL_JOB}=steady")))
            .await?
            .items
            .len();
        ensure!(owned_services == 1, "{owned_services} Services for one job");
        drop(replicas);
        drop(_third);
        weft_e2e::helm(&["uninstall", &ns.name, "--namespace", &ns.name]).await?;
        Ok(())
    })
    .await
}

/// The plain-YAML install (manifests/install.yaml) applies as a user would
/// apply it, with kubectl, and makes the operator's Deployment, account and
/// cluster role; deleting it removes them.
#[tokio::test]
async fn the_plain_yaml_install_applies() -> anyhow::Result<()> {
    use k8s_openapi::api::apps::v1::Deployment;
    use k8s_openapi::api::rbac::v1::ClusterRole;
    let env = TestEnv::connect().await?;
    weft_e2e::ensure_training_job_crd(&env).await?;
    let install = weft_e2e::repo_root().join("manifests/install.yaml");
    let kubectl = weft_e2e::repo_root().join("e2e/cluster/kubectl");
    let output = Command::new(&kubectl)
        .args(["apply", "--server-side", "-f"])
        .arg(&install)
        .output()
        .await?;
    ensure!(
        output.status.success(),
        "kubectl apply -f {} failed: {}",
        install.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    let deployments: Api<Deployment> = Api::namespaced(env.client.clone(), "weft-system");
    let roles: Api<ClusterRole> = Api::all(env.client.clone());
    let made = deployments.get_opt("weft-operator").await?.is_some()
        && roles.get_opt("weft-operator").await?.is_some();
    // Everything but the CRD, which the other tests share.
    let output = Command::new(&kubectl)
        .args(["delete", "--wait=false", "-f"])
        .arg(&install)
        .args(["-l", "app.kubernetes.io/name=weft-operator"])
        .output()
        .await?;
    let _ = Command::new(&kubectl)
        .args(["delete", "namespace", "weft-system", "--wait=false"])
        .output()
        .await;
    ensure!(
        output.status.success(),
        "kubectl delete failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    ensure!(
        made,
        "the install made no weft-operator Deployment or ClusterRole"
    );
    Ok(())
}
