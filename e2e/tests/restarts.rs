//! The operator under restarts and a failover, alone on the cluster (no
//! other test's operator plans onto the same GPUs meanwhile): killed
//! (kill -9) at random moments and started again, and the leader of two
//! killed; after each, every job is reconciled again at once.
//!
//! Needs `cargo build -p weft-operator` first (scripts/test does it).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::ensure;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::api::PostParams;
use kube::{Api, ResourceExt};
use weft_crds::TrainingJob;
use weft_e2e::jobs::job_pods;
use weft_e2e::replicas::{
    chart_credentials, free_port, http_status, kill_hard, reconciles, replica_on, wait_holder,
    wait_leads,
};
use weft_e2e::{TestEnv, TestNamespace, wait_for};

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
/// `deleted`, each where its mesh says, its status in step), within `bound`,
/// with no pod of its label that it does not own (a duplicate, or an orphan
/// of an earlier job of its name); returns each job's mesh epoch.
async fn converge(
    ns: &TestNamespace,
    sizes: &[(String, usize)],
    deleted: &BTreeSet<String>,
    what: &str,
    bound: Duration,
) -> anyhow::Result<BTreeMap<String, u64>> {
    let started = Instant::now();
    let jobs: Api<TrainingJob> = ns.api();
    let pods: Api<Pod> = ns.api();
    let mut epochs = BTreeMap::new();
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
        let uid = jobs.get(job).await?.uid().unwrap_or_default();
        let strays: Vec<String> = job_pods(&pods, job)
            .await?
            .into_iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .filter(|p| {
                !p.owner_references().iter().any(|o| o.uid == uid)
                    || !found.0.contains_key(&p.name_any())
            })
            .map(|p| p.name_any())
            .collect();
        ensure!(
            strays.is_empty(),
            "{what}: {job} has pods beyond its workers: {strays:?}"
        );
        epochs.insert(job.clone(), found.1.epoch);
    }
    eprintln!(
        "{what}: every job converged in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(epochs)
}

/// Ten jobs; the operator killed (kill -9) and started again at random
/// moments five times, and the leader of two replicas killed: after each,
/// every job is reconciled again. Its workers deleted by hand come back, a
/// job deleted and created again under its name gets its pods, no job keeps
/// a pod beyond its workers, the operator is ready only while it reconciles,
/// and a restart that changes nothing publishes no new mesh epoch.
#[tokio::test]
async fn every_job_is_reconciled_again_after_restarts_and_a_failover() -> anyhow::Result<()> {
    let env = TestEnv::connect().await?;
    weft_e2e::ensure_training_job_crd(&env).await?;
    env.run("restarts", |ns| async move {
        let jobs: Api<TrainingJob> = ns.api();
        let pods: Api<Pod> = ns.api();
        let leases: Api<Lease> = ns.api();
        let kubeconfig = chart_credentials(&ns).await?;
        // Ten jobs of different sizes: 1 to 3 workers of 1 or 2 GPUs (28
        // of the cluster's 32 GPUs).
        let sizes: Vec<(String, usize)> =
            (0..10).map(|i| (format!("job-{i}"), 1 + i % 3)).collect();
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

        let seed = weft_planner::rng::test_seed();
        eprintln!("WEFT_TEST_SEED={seed}");
        let mut rng = weft_planner::rng::SplitMix64::new(seed);
        for round in 1..=5 {
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
        let leader = "restart-5".to_string();
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

        // Killed and started again with nothing changed: no job's mesh moves
        // to a new epoch (its membership did not change).
        let before = converge(&ns, &sizes, &deleted, "before a quiet restart", bound).await?;
        kill_hard(standby).await?;
        let quiet = replica_on(&ns, &kubeconfig, "quiet", port)?;
        wait_leads(&leases, "quiet").await?;
        // Every job reconciled once more (each reconcile is counted).
        let jobs_count = sizes.len() as u64;
        wait_for(
            "every job to be reconciled again",
            Duration::from_secs(60),
            || async move { Ok((reconciles(port).await >= jobs_count).then_some(())) },
        )
        .await?;
        let after = converge(&ns, &sizes, &deleted, "a quiet restart", bound).await?;
        ensure!(
            before == after,
            "a restart with no membership change moved mesh epochs: {before:?} -> {after:?}"
        );
        drop(quiet);
        weft_e2e::helm(&["uninstall", &ns.name, "--namespace", &ns.name]).await?;
        Ok(())
    })
    .await
}
