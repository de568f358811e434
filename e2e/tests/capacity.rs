//! The controller as the cluster's capacity changes under it, against the
//! real API server, scheduler and garbage collector on kwok GPU nodes:
//!
//! - CPU-only nodes (no GPU resource at all) run a CPU job selected onto them;
//! - the tiny CPU example (manifests/examples) runs, a CPU rank per node;
//! - a worker the scheduler cannot place makes the job say why;
//! - a job whose checkpoint claim does not exist waits with no worker and
//!   names the claim, and starts once the claim exists;
//! - a node that will not take its worker (too little memory) is avoided
//!   after `elasticity.unschedulableTimeoutSeconds`, and the worker goes to
//!   a node that will;
//! - on a heterogeneous cluster (8-GPU nodes with a NIC per GPU, 4-GPU A100
//!   nodes with a NIC per two GPUs) each rank's NIC in the mesh plan is the
//!   one the node's annotation puts next to its GPU;
//! - deleting a job deletes everything it owns;
//! - a job too big for the cluster waits with no pod, and starts, whole, when
//!   nodes are added;
//! - below `min` (a node NotReady) it stops every worker and says why, and
//!   starts again when the node returns;
//! - a deleted node shrinks the job, the survivors untouched.
//!
//! Its own test binary (one test): it uses every GPU of the cluster, and adds
//! and removes nodes of its own (always removed at the end).

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, ensure};
use k8s_openapi::api::core::v1::{
    ConfigMap, Event, Node, PersistentVolume, PersistentVolumeClaim, Pod, Service,
};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use weft_crds::topology::{ANNOTATION_NICS, LABEL_ZONE, Nic};
use weft_crds::{Phase, TrainingJob};
use weft_e2e::jobs::{job_pods, running_workers, set_not_ready, sleeper_job, wait_running};
use weft_e2e::nodes::node_objects;
use weft_e2e::{TestEnv, TestNamespace, wait_for, wait_job_status};
use weft_operator::build::{LABEL_JOB, mesh_config_map_name};
use weft_planner::cluster::parse_cluster;

/// The nodes this test adds: two more 8-GPU nodes.
const EXTRA: &str = "2x8:nics=8,name=extra";

/// An 8-GPU node with 1 GiB of memory, and one with plenty, in a zone of
/// their own.
const SPILL: [&str; 2] = [
    "1x8:nics=8,name=spill-small,zone=spill,mem=1",
    "1x8:nics=8,name=spill-roomy,zone=spill",
];

/// The label of the volume this test binds a checkpoint claim to
/// (cluster-scoped, so removed at the end whatever happens; named after the
/// test's namespace, as one left over from an earlier run may still be
/// terminating).
const CLAIM_VOLUME_LABEL: &str = "weft.dev/e2e-volume=capacity";

/// Two CPU-only nodes (no GPU resource, product label or NIC table) of their
/// own zone.
fn cpu_only_nodes() -> anyhow::Result<Vec<Node>> {
    let mut cluster = parse_cluster("2x1:name=cpu-only,zone=cpu-only")?;
    for node in &mut cluster.nodes {
        node.gpus = 0;
        node.nics.clear();
    }
    Ok(node_objects(&cluster))
}

fn job(name: &str, min: i32, max: i32, gpus: i32) -> TrainingJob {
    sleeper_job(name, min, max, gpus, 1)
}

/// Every NIC of every node, read from the annotation as the test sees it.
async fn annotated_nics(nodes: &Api<Node>) -> anyhow::Result<BTreeMap<String, Vec<Nic>>> {
    let mut out = BTreeMap::new();
    for node in nodes.list(&ListParams::default()).await?.items {
        if let Some(text) = node.annotations().get(ANNOTATION_NICS) {
            out.insert(node.name_any(), serde_json::from_str(text)?);
        }
    }
    Ok(out)
}

#[tokio::test]
async fn the_controller_follows_capacity_as_nodes_come_and_go() -> anyhow::Result<()> {
    let env = TestEnv::connect().await?;
    weft_e2e::ensure_training_job_crd(&env).await?;
    let nodes: Api<Node> = Api::all(env.client.clone());
    let extra = node_objects(&parse_cluster(EXTRA)?);
    let result = env
        .run("capacity", |ns| async move {
            let controller = tokio::spawn(weft_operator::controller::run(
                ns.client.clone(),
                Some(ns.name.clone()),
            ));
            let result = scenario(&ns, &extra).await;
            controller.abort();
            result
        })
        .await;
    // Whatever happened, the cluster is left as it was found.
    let volumes: Api<PersistentVolume> = Api::all(env.client.clone());
    let _ = volumes
        .delete_collection(
            &DeleteParams::default(),
            &ListParams::default().labels(CLAIM_VOLUME_LABEL),
        )
        .await;
    for node in node_objects(&parse_cluster(EXTRA)?)
        .into_iter()
        .chain(cpu_only_nodes()?)
        .chain(node_objects(&parse_cluster(SPILL[0])?))
        .chain(node_objects(&parse_cluster(SPILL[1])?))
    {
        let _ = nodes
            .delete(&node.name_any(), &DeleteParams::default())
            .await;
    }
    result
}

/// What the job's `Schedulable` condition says.
fn schedulable_message(status: &weft_crds::TrainingJobStatus) -> String {
    status
        .conditions
        .iter()
        .find(|c| c.type_ == "Schedulable")
        .map(|c| c.message.clone())
        .unwrap_or_default()
}

async fn scenario(ns: &TestNamespace, extra: &[Node]) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let stage = |what: &str| {
        eprintln!(
            "capacity: {what} at {:.1} s",
            started.elapsed().as_secs_f64()
        )
    };
    let jobs: Api<TrainingJob> = ns.api();
    let pods: Api<Pod> = ns.api();
    let nodes: Api<Node> = Api::all(ns.client.clone());

    // CPU-only nodes: the operator sees them, and a CPU job whose node
    // selector picks them runs there, a worker per node.
    let cpu_nodes = cpu_only_nodes()?;
    for node in &cpu_nodes {
        nodes.create(&PostParams::default(), node).await?;
    }
    let mut on_cpus = job("on-cpus", 2, 2, 0);
    on_cpus.spec.scheduling.node_selector =
        BTreeMap::from([(LABEL_ZONE.to_string(), "cpu-only".to_string())]);
    jobs.create(&PostParams::default(), &on_cpus).await?;
    let (_, mesh) = wait_running(ns, "on-cpus", 2, 1).await?;
    let placed: Vec<&str> = mesh.workers.iter().map(|w| w.node.as_str()).collect();
    ensure!(
        placed.len() == 2 && placed.iter().all(|n| n.starts_with("cpu-only")),
        "the CPU job's workers are on {placed:?}"
    );
    jobs.delete("on-cpus", &DeleteParams::background()).await?;
    for node in &cpu_nodes {
        nodes
            .delete(&node.name_any(), &DeleteParams::default())
            .await?;
    }
    stage("a CPU job ran on CPU-only nodes");

    // The tiny CPU example: CPU-only workers, one rank each, one per node.
    let example = weft_e2e::repo_root().join("manifests/examples/tiny-cpu.yaml");
    let tiny: TrainingJob = serde_saphyr::from_str(&std::fs::read_to_string(&example)?)?;
    let tiny_name = tiny
        .metadata
        .name
        .clone()
        .context("the example has a name")?;
    jobs.create(&PostParams::default(), &tiny).await?;
    let (_, mesh) = wait_running(ns, &tiny_name, 4, 1).await?;
    ensure!(
        mesh.world_size == 4 && mesh.workers.iter().all(|w| w.gpus == 0),
        "{mesh:?}"
    );
    jobs.delete(&tiny_name, &DeleteParams::background()).await?;
    stage("the CPU example ran");

    // A worker the scheduler cannot place (more memory than any node has):
    // the job says so, with the scheduler's words, instead of waiting mute.
    let mut hungry = job("hungry", 1, 1, 8);
    hungry.spec.resources.memory = Some("100Ti".into());
    jobs.create(&PostParams::default(), &hungry).await?;
    let status = wait_job_status(
        &jobs,
        "hungry",
        "hungry to say it cannot be scheduled",
        |s| {
            s.conditions.iter().any(|c| {
                c.type_ == "Schedulable"
                    && c.status == "False"
                    && c.reason == "WorkersUnschedulable"
            })
        },
    )
    .await?;
    let said = schedulable_message(&status);
    ensure!(
        said.contains("1 of 1 workers cannot be scheduled") && said.contains("Insufficient memory"),
        "{said}"
    );
    jobs.delete("hungry", &DeleteParams::background()).await?;
    stage("an unschedulable worker was reported");

    // A checkpoint claim that does not exist: the job waits, Pending, with no
    // worker (not workers the scheduler refuses on every node, which would
    // get healthy nodes avoided), and names the claim; once the claim exists,
    // bound to a volume, the job starts.
    let mut claimed = job("claimed", 1, 1, 8);
    claimed.spec.checkpoint.claim_name = Some("claimed-checkpoints".into());
    claimed.spec.volumes = vec![weft_crds::VolumeMountSpec {
        claim_name: "claimed-models".into(),
        mount_path: "/models".into(),
        read_only: true,
    }];
    jobs.create(&PostParams::default(), &claimed).await?;
    let status = wait_job_status(&jobs, "claimed", "claimed to name its missing claim", |s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == "Schedulable" && c.reason == "CheckpointClaimNotFound")
    })
    .await?;
    let said = schedulable_message(&status);
    ensure!(
        status.phase == Phase::Pending
            && status.avoided_nodes.is_empty()
            && said.contains("PersistentVolumeClaim \"claimed-checkpoints\" not found"),
        "{status:?}"
    );
    ensure!(
        job_pods(&pods, "claimed").await?.is_empty(),
        "workers started without their claim"
    );
    let volumes: Api<PersistentVolume> = Api::all(ns.client.clone());
    let claims: Api<PersistentVolumeClaim> = ns.api();
    let (label_key, label_value) = CLAIM_VOLUME_LABEL
        .split_once('=')
        .context("the label is key=value")?;
    // A claim bound to a volume of its own.
    let make_claim = |claim: &'static str| {
        let (volumes, claims) = (volumes.clone(), claims.clone());
        let volume_name = format!("{}-{claim}", ns.name);
        async move {
            let volume: PersistentVolume = serde_json::from_value(serde_json::json!({
                "metadata": {"name": volume_name, "labels": {label_key: label_value}},
                "spec": {
                    "capacity": {"storage": "1Gi"},
                    "accessModes": ["ReadWriteMany"],
                    "hostPath": {"path": format!("/tmp/weft-e2e-{claim}")},
                    "storageClassName": "",
                    "persistentVolumeReclaimPolicy": "Retain"
                }
            }))?;
            volumes.create(&PostParams::default(), &volume).await?;
            let made: PersistentVolumeClaim = serde_json::from_value(serde_json::json!({
                "metadata": {"name": claim},
                "spec": {
                    "accessModes": ["ReadWriteMany"],
                    "resources": {"requests": {"storage": "1Gi"}},
                    "storageClassName": "",
                    "volumeName": volume_name
                }
            }))?;
            claims.create(&PostParams::default(), &made).await?;
            anyhow::Ok(())
        }
    };
    make_claim("claimed-checkpoints").await?;
    // Then the claim of spec.volumes is the one missing, named by its field.
    let status = wait_job_status(
        &jobs,
        "claimed",
        "claimed to name its missing volume",
        |s| {
            s.conditions
                .iter()
                .any(|c| c.type_ == "Schedulable" && c.reason == "VolumeClaimNotFound")
        },
    )
    .await?;
    let said = schedulable_message(&status);
    ensure!(
        status.phase == Phase::Pending
            && said.starts_with(
                "volumes[0].claimName: PersistentVolumeClaim \"claimed-models\" not found"
            ),
        "{status:?}"
    );
    ensure!(
        job_pods(&pods, "claimed").await?.is_empty(),
        "workers started without their volume"
    );
    make_claim("claimed-models").await?;
    let (workers, _) = wait_running(ns, "claimed", 1, 1).await?;
    // The worker mounts the job's volume where the job said, read-only.
    let worker_name = workers.keys().next().context("a worker runs")?;
    let worker = pods.get(worker_name).await?;
    let spec = worker.spec.context("a worker pod has a spec")?;
    let mount = spec.containers[0]
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == "/models")
        .context("the worker does not mount /models")?;
    let claim_of = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)
        .and_then(|v| v.persistent_volume_claim.as_ref())
        .map(|c| c.claim_name.clone());
    ensure!(
        mount.read_only == Some(true) && claim_of.as_deref() == Some("claimed-models"),
        "{mount:?} {claim_of:?}"
    );
    jobs.delete("claimed", &DeleteParams::background()).await?;
    stage("missing checkpoint and volume claims were named, and the job started once they existed");

    // A node that will not take the worker the mesh put there (it has 1 GiB,
    // the worker asks 2): after the timeout the job avoids it, says so, and
    // moves the worker to a node that takes it as soon as there is one.
    let small = node_objects(&parse_cluster(SPILL[0])?);
    for node in &small {
        nodes.create(&PostParams::default(), node).await?;
    }
    let mut spill = job("spill", 1, 1, 8);
    spill.spec.resources.memory = Some("2Gi".into());
    spill.spec.elasticity.unschedulable_timeout_seconds = 2;
    spill.spec.scheduling.node_selector =
        BTreeMap::from([(LABEL_ZONE.to_string(), "spill".to_string())]);
    jobs.create(&PostParams::default(), &spill).await?;
    let small_name = small[0].name_any();
    let status = wait_job_status(&jobs, "spill", "spill to avoid the small node", |s| {
        s.avoided_nodes.iter().any(|a| a.node == small_name)
            && s.conditions
                .iter()
                .any(|c| c.reason == "InsufficientCapacity" && c.message.contains(&small_name))
    })
    .await?;
    let avoided = &status.avoided_nodes[0];
    ensure!(
        avoided.reason.contains("Insufficient memory"),
        "{avoided:?}"
    );
    let roomy = node_objects(&parse_cluster(SPILL[1])?);
    for node in &roomy {
        nodes.create(&PostParams::default(), node).await?;
    }
    let (workers, mesh) = wait_running(ns, "spill", 1, 2).await?;
    ensure!(
        mesh.workers[0].node == roomy[0].name_any(),
        "the worker went to {:?} ({workers:?})",
        mesh.workers[0].node
    );
    jobs.delete("spill", &DeleteParams::background()).await?;
    for node in small.iter().chain(&roomy) {
        nodes
            .delete(&node.name_any(), &DeleteParams::default())
            .await?;
    }
    stage("a node that would not take the worker was avoided");

    // Heterogeneous NICs: 4-GPU workers fill the 8-GPU nodes two by two and
    // the 4-GPU A100 nodes one by one (3×8 + 2×4 = 32 GPUs = 8 workers).
    jobs.create(&PostParams::default(), &job("mixed", 8, 8, 4))
        .await?;
    let (_, mesh) = wait_running(ns, "mixed", 8, 1).await?;
    let annotated = annotated_nics(&nodes).await?;
    let mut whole_node_workers = 0;
    for worker in &mesh.workers {
        let nics = annotated
            .get(&worker.node)
            .with_context(|| format!("node {} has no NIC annotation", worker.node))?;
        let node_gpus: usize = nics.iter().map(|n| n.gpus.len()).sum();
        let listed: Vec<(&str, &[u32])> = worker
            .node_nics
            .iter()
            .map(|n| (n.name.as_str(), n.gpus.as_slice()))
            .collect();
        let wanted: Vec<(&str, &[u32])> = nics
            .iter()
            .map(|n| (n.name.as_str(), n.gpus.as_slice()))
            .collect();
        ensure!(
            listed == wanted,
            "worker {} lists NICs {listed:?}, node {} has {wanted:?}",
            worker.name,
            worker.node
        );
        if worker.gpus as usize == node_gpus {
            whole_node_workers += 1;
            ensure!(
                worker.rank_nics.len() == worker.gpus as usize,
                "worker {} has the whole node but {} rank NICs",
                worker.name,
                worker.rank_nics.len()
            );
            for rank in &worker.rank_nics {
                let closest = nics
                    .iter()
                    .find(|n| n.gpus.contains(&rank.local_rank))
                    .with_context(|| format!("no NIC lists GPU {}", rank.local_rank))?;
                ensure!(
                    rank.nic == closest.name,
                    "worker {} rank {} uses {} but GPU {} sits by {} on {}",
                    worker.name,
                    rank.local_rank,
                    rank.nic,
                    rank.local_rank,
                    closest.name,
                    worker.node
                );
            }
        }
    }
    ensure!(
        whole_node_workers == 2,
        "expected the two A100 nodes to hold one whole-node worker each, got {whole_node_workers}"
    );

    stage("Deleting the job deletes what it owns");
    // Deleting the job deletes what it owns (the garbage collector follows
    // the owner references).
    jobs.delete("mixed", &DeleteParams::background()).await?;
    wait_for(
        "mixed's pods, Service and ConfigMap to be deleted",
        Duration::from_secs(60),
        || {
            let pods = pods.clone();
            let services: Api<Service> = ns.api();
            let config_maps: Api<ConfigMap> = ns.api();
            async move {
                let selector = ListParams::default().labels(&format!("{LABEL_JOB}=mixed"));
                let left = pods.list(&selector).await?.items.len()
                    + services.list(&selector).await?.items.len()
                    + config_maps.list(&selector).await?.items.len()
                    + usize::from(
                        config_maps
                            .get_opt(&mesh_config_map_name("mixed"))
                            .await?
                            .is_some(),
                    );
                Ok((left == 0).then_some(()))
            }
        },
    )
    .await?;

    stage("Gang start");
    // Gang start: five 8-GPU workers do not fit on three 8-GPU nodes; the job
    // waits with no pod at all, and starts, whole, when two nodes are added.
    jobs.create(&PostParams::default(), &job("grown", 5, 5, 8))
        .await?;
    wait_job_status(&jobs, "grown", "grown to wait for capacity", |s| {
        s.phase == Phase::Pending
            && s.conditions
                .iter()
                .any(|c| c.type_ == "Schedulable" && c.status == "False")
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    ensure!(
        running_workers(&pods, "grown").await?.is_empty()
            && job_pods(&pods, "grown").await?.is_empty(),
        "a job that cannot start holds no pod"
    );
    for node in extra {
        nodes.create(&PostParams::default(), node).await?;
    }
    let (five, mesh) = wait_running(ns, "grown", 5, 1).await?;
    ensure!(
        extra
            .iter()
            .all(|n| mesh.workers.iter().any(|w| w.node == n.name_any())),
        "the added nodes hold workers"
    );

    stage("Below min");
    // Below min: a node NotReady leaves four places for a job of at least
    // five; every worker stops and the job says what it needs.
    let lost = mesh.workers[0].node.clone();
    set_not_ready(&nodes, &lost, true).await?;
    let waiting = wait_for(
        "grown to stop every worker below min",
        Duration::from_secs(60),
        || {
            let (jobs, pods) = (jobs.clone(), pods.clone());
            async move {
                let status = jobs.get("grown").await?.status.unwrap_or_default();
                let live = job_pods(&pods, "grown")
                    .await?
                    .into_iter()
                    .filter(|p| p.metadata.deletion_timestamp.is_none())
                    .count();
                let message = status
                    .conditions
                    .iter()
                    .find(|c| c.type_ == "Schedulable" && c.status == "False")
                    .map(|c| c.message.clone());
                Ok((status.phase == Phase::Pending && live == 0)
                    .then_some(message)
                    .flatten())
            }
        },
    )
    .await;
    set_not_ready(&nodes, &lost, false).await?;
    let message = waiting?;
    ensure!(
        message.contains("needs 5 workers of 8 GPUs (40 GPUs)"),
        "{message}"
    );
    let events: Api<Event> = ns.api();
    let reasons: Vec<String> = events
        .list(&ListParams::default().fields("involvedObject.name=grown"))
        .await?
        .items
        .into_iter()
        .filter_map(|e| e.reason)
        .collect();
    ensure!(
        reasons.iter().any(|r| r == "BelowMinimum"),
        "no BelowMinimum event: {reasons:?}"
    );

    stage("The node returns");
    // The node returns: the job starts again, whole.
    let (_, mesh) = wait_running(ns, "grown", 5, mesh.epoch + 1).await?;

    stage("A deleted node");
    // A deleted node: with min lowered to four the job shrinks to the four
    // nodes left, and the surviving workers' pods are the same pods.
    let lower = serde_json::json!({ "spec": { "workers": { "min": 4 } } });
    jobs.patch("grown", &PatchParams::default(), &Patch::Merge(&lower))
        .await?;
    let (before, _) = wait_running(ns, "grown", 5, mesh.epoch).await?;
    let gone = extra
        .first()
        .map(|n| n.name_any())
        .context("an added node")?;
    nodes.delete(&gone, &DeleteParams::default()).await?;
    let (after, mesh) = wait_running(ns, "grown", 4, mesh.epoch + 1).await?;
    ensure!(
        mesh.workers.iter().all(|w| w.node != gone),
        "a worker is still on the deleted node {gone}"
    );
    for (name, (uid, _)) in &after {
        ensure!(
            before.get(name).is_some_and(|(u, _)| u == uid),
            "survivor {name} was recreated"
        );
    }
    stage("done");
    ensure!(
        five.len() == 5 && after.len() == 4,
        "five workers, then four"
    );
    Ok(())
}
