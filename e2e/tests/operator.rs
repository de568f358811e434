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
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Event, Pod, Service};
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use tokio::process::{Child, Command};
use weft_crds::{Phase, TrainingJob, TrainingJobSpec, WorkerResources};
use weft_e2e::jobs::job_pods;
use weft_e2e::{HarnessError, TestEnv, TestNamespace, operator_binary, wait_for, wait_job_status};
use weft_operator::build::{LABEL_JOB, mesh_config_map_name};
use weft_planner::mesh::MeshPlan;

const LEASE: &str = "weft-operator";
const LEASE_SECONDS: &str = "3";

/// Installs the chart (no in-cluster replicas) and writes a kubeconfig that
/// authenticates as its ServiceAccount.
async fn chart_credentials(ns: &TestNamespace) -> anyhow::Result<std::path::PathBuf> {
    let release = ns.name.clone();
    weft_e2e::helm(&[
        "upgrade",
        "--install",
        &release,
        "{chart}",
        "--namespace",
        &ns.name,
        "--set",
        "replicas=0",
    ])
    .await?;
    weft_e2e::service_account_kubeconfig(ns, &format!("{release}-operator")).await
}

/// `weft-operator run` with leader election under `identity`, its health
/// served on a port of its own choosing.
fn replica(
    ns: &TestNamespace,
    kubeconfig: &std::path::Path,
    identity: &str,
) -> anyhow::Result<Child> {
    replica_on(ns, kubeconfig, identity, 0)
}

async fn holder(leases: &Api<Lease>) -> anyhow::Result<Option<String>> {
    Ok(leases
        .get_opt(LEASE)
        .await?
        .and_then(|l| l.spec?.holder_identity)
        .filter(|h| !h.is_empty()))
}

async fn wait_holder(leases: &Api<Lease>, not: Option<&str>) -> anyhow::Result<String> {
    let holder = wait_for(
        "a replica to hold the lease",
        Duration::from_secs(60),
        || {
            let leases = leases.clone();
            let not = not.map(str::to_string);
            async move {
                let h = holder(&leases)
                    .await
                    .map_err(|e| HarnessError::Other(e.to_string()))?;
                Ok(h.filter(|h| Some(h) != not.as_ref()))
            }
        },
    )
    .await?;
    Ok(holder)
}

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

/// `weft-operator run` with leader election under `identity`, serving its
/// health on `port`.
fn replica_on(
    ns: &TestNamespace,
    kubeconfig: &std::path::Path,
    identity: &str,
    port: u16,
) -> anyhow::Result<Child> {
    let log = std::env::temp_dir().join(format!("weft-e2e-{}-{identity}.log", ns.name));
    let log = std::fs::File::create(&log).with_context(|| format!("{}", log.display()))?;
    let child = Command::new(operator_binary()?)
        .args(["run", "--namespace", &ns.name])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--leader-elect", "--lease-namespace", &ns.name])
        .args(["--lease-name", LEASE, "--identity", identity])
        .args(["--lease-seconds", LEASE_SECONDS])
        .env("POD_NAME", identity)
        .env("KUBECONFIG", kubeconfig)
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()?;
    Ok(child)
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The HTTP status of `GET path` on the operator at `port` (0 when it does
/// not answer).
async fn http_status(port: u16, path: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut stream) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        return 0;
    };
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).await.is_err() {
        return 0;
    }
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response).await;
    response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0)
}

/// Waits until `identity` holds the lease.
async fn wait_leads(leases: &Api<Lease>, identity: &str) -> anyhow::Result<()> {
    wait_for(
        &format!("{identity} to hold the lease"),
        Duration::from_secs(60),
        || {
            let leases = leases.clone();
            async move {
                let h = holder(&leases)
                    .await
                    .map_err(|e| HarnessError::Other(e.to_string()))?;
                Ok((h.as_deref() == Some(identity)).then_some(()))
            }
        },
    )
    .await?;
    Ok(())
}

/// Kills `child` as kill -9 would (no goodbye, no lease released).
async fn kill_hard(mut child: Child) -> anyhow::Result<()> {
    child.start_kill()?;
    child.wait().await?;
    Ok(())
}

/// Deletes one worker of each job in `sizes`; returns the deleted pods'
/// UIDs (a replacement may take the same name).
async fn delete_a_worker_of_each(
    pods: &Api<Pod>,
    sizes: &[(String, usize)],
) -> anyhow::Result<BTreeSet<String>> {
    let mut deleted = BTreeSet::new();
    for (job, _) in sizes {
        let live: Vec<Pod> = job_pods(pods, job)
            .await?
            .into_iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .collect();
        if let Some(pod) = live.first() {
            pods.delete(&pod.name_any(), &Default::default()).await?;
            deleted.insert(pod.uid().unwrap_or_default());
        }
    }
    Ok(deleted)
}

/// Waits until every job in `sizes` runs exactly its workers again (none of
/// `deleted`, each where its mesh says, its status in step), within `bound`.
async fn converge(
    ns: &TestNamespace,
    sizes: &[(String, usize)],
    deleted: &BTreeSet<String>,
    what: &str,
    bound: Duration,
) -> anyhow::Result<()> {
    let started = Instant::now();
    for (job, workers) in sizes {
        let left = bound.saturating_sub(started.elapsed());
        let found = tokio::time::timeout(left, weft_e2e::jobs::wait_running(ns, job, *workers, 1))
            .await
            .map_err(|_| anyhow::anyhow!("{what}: {job} did not converge within {bound:?}"))??;
        let stale: Vec<&String> = found
            .0
            .iter()
            .filter(|(_, (uid, _))| deleted.contains(uid))
            .map(|(name, _)| name)
            .collect();
        ensure!(
            stale.is_empty(),
            "{what}: {job} still counts deleted workers {stale:?}"
        );
    }
    eprintln!(
        "{what}: every job converged in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The operator killed (kill -9) and started again at random moments, and
/// the leader of two replicas killed: after each, every job is reconciled
/// again. Its workers deleted by hand come back, a job deleted and created
/// again under its name gets its pods, and the operator is ready only while
/// it reconciles.
#[tokio::test]
async fn every_job_is_reconciled_again_after_restarts_and_a_failover() -> anyhow::Result<()> {
    let env = TestEnv::connect().await?;
    weft_e2e::ensure_training_job_crd(&env).await?;
    env.run("restarts", |ns| async move {
        let jobs: Api<TrainingJob> = ns.api();
        let pods: Api<Pod> = ns.api();
        let leases: Api<Lease> = ns.api();
        let kubeconfig = chart_credentials(&ns).await?;
        // Six jobs of different sizes: 1 to 3 workers of 1 or 2 GPUs.
        let sizes: Vec<(String, usize)> = (0..6).map(|i| (format!("job-{i}"), 1 + i % 3)).collect();
        for (i, (name, workers)) in sizes.iter().enumerate() {
            let w = *workers as i32;
            let job = weft_e2e::jobs::sleeper_job(name, w, w, 1 + (i % 2) as i32, 1);
            jobs.create(&PostParams::default(), &job).await?;
        }
        let port = free_port()?;
        let mut operator = replica_on(&ns, &kubeconfig, "restart-0", port)?;
        wait_holder(&leases, None).await?;
        // A restarted replica waits out the dead one's lease (3 s) first;
        // the rest is slack for a slow, shared machine (measured: 0.3-5 s).
        let bound = Duration::from_secs(45);
        converge(&ns, &sizes, &BTreeSet::new(), "first start", bound).await?;
        ensure!(
            http_status(port, "/readyz").await == 200,
            "not ready while it reconciles"
        );

        let seed: u64 = std::env::var("WEFT_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos() as u64)
            });
        eprintln!("WEFT_TEST_SEED={seed}");
        let mut rng = weft_planner::rng::SplitMix64::new(seed);
        for round in 1..=4 {
            // Workers deleted, and the operator killed at a random moment
            // of replacing them (before, during or after); in one round a
            // job is deleted and created again while it is down.
            let deleted = delete_a_worker_of_each(&pods, &sizes).await?;
            tokio::time::sleep(Duration::from_millis(rng.below(1500))).await;
            kill_hard(operator).await?;
            if round == 2 {
                let (name, workers) = &sizes[0];
                jobs.delete(name, &Default::default()).await?;
                wait_for("job-0 to be gone", Duration::from_secs(60), || {
                    let jobs = jobs.clone();
                    async move { Ok(jobs.get_opt("job-0").await?.is_none().then_some(())) }
                })
                .await?;
                let w = *workers as i32;
                jobs.create(
                    &PostParams::default(),
                    &weft_e2e::jobs::sleeper_job(name, w, w, 1, 1),
                )
                .await?;
            }
            let identity = format!("restart-{round}");
            operator = replica_on(&ns, &kubeconfig, &identity, port)?;
            // Once it leads, a worker of each job is deleted again: the new
            // replica itself must replace them.
            wait_leads(&leases, &identity).await?;
            let mut deleted = deleted;
            deleted.extend(delete_a_worker_of_each(&pods, &sizes).await?);
            converge(&ns, &sizes, &deleted, &format!("restart {round}"), bound).await?;
            ensure!(
                http_status(port, "/readyz").await == 200,
                "restart {round}: not ready while it reconciles"
            );
        }

        // Two replicas; the leader is killed; the other carries on.
        let standby_port = free_port()?;
        let standby = replica_on(&ns, &kubeconfig, "standby", standby_port)?;
        let leader = "restart-4".to_string();
        wait_leads(&leases, &leader).await?;
        kill_hard(operator).await?;
        let deleted = delete_a_worker_of_each(&pods, &sizes).await?;
        wait_leads(&leases, "standby").await?;
        let mut deleted = deleted;
        deleted.extend(delete_a_worker_of_each(&pods, &sizes).await?);
        converge(&ns, &sizes, &deleted, "failover", bound).await?;
        ensure!(
            http_status(standby_port, "/readyz").await == 200,
            "the new leader is not ready while it reconciles"
        );
        drop(standby);
        weft_e2e::helm(&["uninstall", &ns.name, "--namespace", &ns.name]).await?;
        Ok(())
    })
    .await
}
