//! The mesh of an epoch: which workers a job runs, on which nodes, with which
//! ranks and NICs. The operator computes it whenever membership changes (this
//! function is pure, so the same inputs always give the same mesh) and
//! publishes it for the workers as a [`MeshPlan`] document.
//!
//! Placement:
//! - Workers that still run on a healthy node keep their place (a resize never
//!   moves a surviving worker).
//! - New workers fill the job's existing racks and blocks first, then the
//!   blocks, racks and nodes with the most free slots, so the job spans as few
//!   blocks, racks and nodes as it can.
//! - Ranks follow (block, rack, node): ring neighbours share a node or a rack.
//! - A worker that takes a whole node gets each local GPU rank's closest NIC;
//!   one that takes part of a node gets the node's NIC table, since the device
//!   plugin decides which GPUs it receives.

use std::collections::{BTreeMap, BTreeSet};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::cluster::{Cluster, GpuModel, Nic, Node};

/// Version of the mesh plan document.
pub const MESH_PLAN_VERSION: u32 = 1;

/// A node as the mesh planner sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct MeshNode {
    pub node: Node,
    /// Ready and schedulable.
    pub healthy: bool,
    /// GPUs not taken by other jobs' pods.
    pub free_gpus: u32,
}

impl MeshNode {
    /// Every node of `cluster`, healthy, with all its GPUs free: a cluster as
    /// described rather than observed (tests, the CLI, capacity questions).
    pub fn all_free(cluster: &crate::cluster::Cluster) -> Vec<MeshNode> {
        cluster
            .nodes
            .iter()
            .map(|node| MeshNode {
                free_gpus: node.gpus,
                node: node.clone(),
                healthy: true,
            })
            .collect()
    }
}

/// A worker that exists now.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ExistingWorker {
    pub name: String,
    pub node: String,
}

/// What the job asks for.
#[derive(Clone, Debug, PartialEq)]
pub struct MeshRequest {
    pub job: String,
    pub min_workers: u32,
    pub max_workers: u32,
    pub gpus_per_worker: u32,
    pub epoch: u64,
}

/// The NIC a GPU rank should use.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
pub struct RankNic {
    pub local_rank: u32,
    pub nic: String,
}

/// A NIC of a node and the GPUs close to it.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
pub struct NodeNic {
    pub name: String,
    pub gbps: f64,
    pub gpus: Vec<u32>,
}

/// One worker of the mesh.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
pub struct MeshWorker {
    /// Pod name of the worker.
    pub name: String,
    pub node: String,
    pub block: String,
    pub rack: String,
    /// Its ranks are `first_rank .. first_rank + gpus`, one per GPU; a
    /// CPU-only worker (`gpus` 0) is the one rank `first_rank`.
    pub first_rank: u32,
    pub gpus: u32,
    /// Index of the worker among those on its node.
    pub slot_on_node: u32,
    /// The closest NIC of each local rank, when the worker has the whole node.
    pub rank_nics: Vec<RankNic>,
    /// The node's NICs, for workers that learn their GPUs at start.
    pub node_nics: Vec<NodeNic>,
    /// The node's GPU model, for the per-step planner (absent for CPU workers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu: Option<GpuModel>,
}

/// The mesh plan document for one epoch (`version: 1`).
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
pub struct MeshPlan {
    pub version: u32,
    pub job: String,
    pub epoch: u64,
    pub world_size: u32,
    pub workers: Vec<MeshWorker>,
    /// Ranks grouped by node, in rank order: each list holds the ranks that share a node.
    pub node_groups: Vec<Vec<u32>>,
    /// Where this epoch's workers meet: `host:port` of the store that rank 0
    /// serves. Filled in by the operator (the planner does not know the
    /// job's Service); its port moves with the epoch, so a worker still on an
    /// older epoch can never join this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rendezvous: Option<String>,
    /// The W3C `traceparent` of the operator's reconcile that published this
    /// epoch, when the operator exports traces: the workers' step spans are
    /// its children, so one trace goes from the change to the new epoch's
    /// steps. Filled in by the operator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_parent: Option<String>,
}

/// `N workers of G GPUs`, or `N CPU-only workers` when they ask for none.
pub fn describe_workers(workers: usize, gpus_per_worker: u32) -> String {
    if gpus_per_worker == 0 {
        format!("{workers} CPU-only workers")
    } else {
        format!("{workers} workers of {gpus_per_worker} GPUs")
    }
}

/// Why no mesh can be made.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MeshError {
    #[error(
        "job needs {min_workers} workers of {gpus_per_worker} GPUs ({needed} GPUs); the healthy nodes can take {placeable} such workers ({available} GPUs)"
    )]
    NotEnoughCapacity {
        min_workers: u32,
        gpus_per_worker: u32,
        needed: u64,
        placeable: u32,
        available: u64,
    },
    #[error("workers.min ({min}) must be between 1 and workers.max ({max})")]
    BadRange { min: u32, max: u32 },
    #[error(
        "job needs {min_workers} CPU workers, one per node; the healthy nodes can take {placeable}"
    )]
    NotEnoughNodes { min_workers: u32, placeable: u32 },
}

impl MeshError {
    /// A stable, machine-readable name for the kind of failure.
    pub fn category(&self) -> &'static str {
        match self {
            MeshError::NotEnoughCapacity { .. } => "insufficient_capacity",
            MeshError::NotEnoughNodes { .. } => "insufficient_capacity",
            MeshError::BadRange { .. } => "invalid_request",
        }
    }
}

/// Plans the mesh of an epoch (see the module documentation).
pub fn plan_mesh(
    request: &MeshRequest,
    nodes: &[MeshNode],
    existing: &[ExistingWorker],
) -> Result<MeshPlan, MeshError> {
    let g = request.gpus_per_worker;
    // A CPU-only worker (no GPU) is one rank, and takes a node of its own.
    let ranks_per_worker = g.max(1);
    if request.min_workers == 0 || request.min_workers > request.max_workers {
        return Err(MeshError::BadRange {
            min: request.min_workers,
            max: request.max_workers,
        });
    }
    let by_name: BTreeMap<&str, &MeshNode> =
        nodes.iter().map(|n| (n.node.name.as_str(), n)).collect();
    // Surviving workers keep their node; their GPUs count as theirs, not free.
    let mut kept: Vec<&ExistingWorker> = existing
        .iter()
        .filter(|w| by_name.get(w.node.as_str()).is_some_and(|n| n.healthy))
        .collect();
    kept.sort();
    kept.truncate(request.max_workers as usize);
    // Free slots for new workers on each healthy node.
    let mut slots: BTreeMap<&str, u32> = nodes
        .iter()
        .filter(|n| n.healthy)
        .map(|n| {
            let free = n
                .free_gpus
                .checked_div(g)
                .unwrap_or_else(|| u32::from(!kept.iter().any(|w| w.node == n.node.name)));
            (n.node.name.as_str(), free)
        })
        .collect();
    let placeable = kept.len() as u32 + slots.values().sum::<u32>();
    if placeable < request.min_workers && g == 0 {
        return Err(MeshError::NotEnoughNodes {
            min_workers: request.min_workers,
            placeable,
        });
    }
    if placeable < request.min_workers {
        return Err(MeshError::NotEnoughCapacity {
            min_workers: request.min_workers,
            gpus_per_worker: g,
            needed: u64::from(request.min_workers) * u64::from(g),
            placeable,
            available: nodes
                .iter()
                .filter(|n| n.healthy)
                .map(|n| u64::from(n.free_gpus))
                .sum::<u64>()
                + kept.len() as u64 * u64::from(g),
        });
    }
    let want = placeable.min(request.max_workers);
    let mut chosen: Vec<(&str, Option<String>)> = kept
        .iter()
        .map(|w| (w.node.as_str(), Some(w.name.clone())))
        .collect();

    // Fill: the job's own blocks and racks first, then the fullest ones.
    let place_of = |name: &str| {
        by_name
            .get(name)
            .map(|n| (n.node.block.clone(), n.node.rack.clone()))
            .unwrap_or_default()
    };
    while (chosen.len() as u32) < want {
        let used_blocks: BTreeSet<String> = chosen.iter().map(|(n, _)| place_of(n).0).collect();
        let used_racks: BTreeSet<(String, String)> =
            chosen.iter().map(|(n, _)| place_of(n)).collect();
        let mut block_slots: BTreeMap<String, u32> = BTreeMap::new();
        let mut rack_slots: BTreeMap<(String, String), u32> = BTreeMap::new();
        for (name, free) in &slots {
            let place = place_of(name);
            *block_slots.entry(place.0.clone()).or_default() += free;
            *rack_slots.entry(place).or_default() += free;
        }
        let best = slots
            .iter()
            .filter(|(_, free)| **free > 0)
            .max_by_key(|(name, free)| {
                let place = place_of(name);
                (
                    used_blocks.contains(&place.0),
                    used_racks.contains(&place),
                    block_slots.get(&place.0).copied().unwrap_or(0),
                    rack_slots.get(&place).copied().unwrap_or(0),
                    **free,
                    std::cmp::Reverse(name.to_string()),
                )
            })
            .map(|(name, _)| *name);
        let Some(name) = best else { break };
        if let Some(free) = slots.get_mut(name) {
            *free -= 1;
        }
        chosen.push((name, None));
    }

    // Rank order: block, rack, node; surviving workers first on their node.
    chosen.sort_by(|a, b| {
        let (pa, pb) = (place_of(a.0), place_of(b.0));
        (pa, a.0, a.1.is_none(), a.1.clone()).cmp(&(pb, b.0, b.1.is_none(), b.1.clone()))
    });
    // New workers never reuse a name of an existing worker, lost ones included:
    // their pods may still exist until they are cleaned up.
    let taken: BTreeSet<String> = existing.iter().map(|w| w.name.clone()).collect();
    let mut fresh = (0u32..)
        .map(|i| format!("{}-worker-{i}", request.job))
        .filter(|n| !taken.contains(n));
    let mut workers = Vec::with_capacity(chosen.len());
    let mut per_node: BTreeMap<&str, u32> = BTreeMap::new();
    let mut node_groups: Vec<Vec<u32>> = Vec::new();
    for (i, (node_name, name)) in chosen.iter().enumerate() {
        let Some(node) = by_name.get(node_name) else {
            continue;
        };
        let slot = per_node.entry(node_name).or_default();
        let first_rank = i as u32 * ranks_per_worker;
        let whole_node = g > 0 && g == node.node.gpus;
        let rank_nics = if whole_node {
            (0..g)
                .filter_map(|local| {
                    node.node
                        .nics
                        .iter()
                        .find(|n| n.gpus.contains(&local))
                        .map(|n| RankNic {
                            local_rank: local,
                            nic: n.name.clone(),
                        })
                })
                .collect()
        } else {
            Vec::new()
        };
        if *slot == 0 {
            node_groups.push(Vec::new());
        }
        if let Some(group) = node_groups.last_mut() {
            group.extend(first_rank..first_rank + ranks_per_worker);
        }
        workers.push(MeshWorker {
            name: name
                .clone()
                .unwrap_or_else(|| fresh.next().unwrap_or_default()),
            node: node_name.to_string(),
            block: node.node.block.clone(),
            rack: node.node.rack.clone(),
            first_rank,
            gpus: g,
            slot_on_node: *slot,
            rank_nics,
            node_nics: node
                .node
                .nics
                .iter()
                .map(|n| NodeNic {
                    name: n.name.clone(),
                    gbps: n.gbps,
                    gpus: n.gpus.clone(),
                })
                .collect(),
            gpu: (g > 0).then(|| node.node.gpu.clone()),
        });
        *slot += 1;
    }
    Ok(MeshPlan {
        version: MESH_PLAN_VERSION,
        job: request.job.clone(),
        epoch: request.epoch,
        world_size: workers.len() as u32 * ranks_per_worker,
        workers,
        node_groups,
        rendezvous: None,
        trace_parent: None,
    })
}

/// The cluster the mesh's ranks form, node by node in rank order, as the
/// per-step planner of its workers sees it: each node with as many GPUs as
/// the job has ranks on it, its GPU model (the default preset for CPU
/// workers) and its NICs. A job that holds part of a node does not know which
/// of the node's GPUs it got, so its ranks are taken as the node's first
/// GPUs for NIC affinity. Every worker derives the same cluster from the same
/// mesh, so their plans agree.
pub fn mesh_cluster(mesh: &MeshPlan) -> Cluster {
    let mut nodes = Vec::with_capacity(mesh.node_groups.len());
    for group in &mesh.node_groups {
        let Some(&first) = group.first() else {
            continue;
        };
        let worker = mesh
            .workers
            .iter()
            .find(|w| first >= w.first_rank && first < w.first_rank + w.gpus.max(1));
        let gpus = group.len() as u32;
        let (name, gpu, nics, block, rack) = match worker {
            Some(w) => (
                w.node.clone(),
                w.gpu.clone(),
                w.node_nics
                    .iter()
                    .map(|n| Nic {
                        name: n.name.clone(),
                        gbps: n.gbps,
                        gpus: n.gpus.iter().copied().filter(|g| *g < gpus).collect(),
                    })
                    .filter(|n| !n.gpus.is_empty())
                    .collect(),
                w.block.clone(),
                w.rack.clone(),
            ),
            None => (
                format!("rank-{first}"),
                None,
                Vec::new(),
                String::new(),
                String::new(),
            ),
        };
        let Some(gpu) = gpu.or_else(|| GpuModel::preset(crate::cluster::DEFAULT_GPU).ok()) else {
            continue;
        };
        nodes.push(Node {
            name,
            gpu,
            gpus,
            nics,
            zone: String::new(),
            block,
            rack,
            cpu_cores: 0,
            memory_gib: 0,
        });
    }
    Cluster { nodes }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::parse_cluster;
    use proptest::prelude::*;

    fn mesh_nodes(spec: &str) -> Vec<MeshNode> {
        MeshNode::all_free(&parse_cluster(spec).unwrap())
    }

    fn request(min: u32, max: u32, gpus: u32) -> MeshRequest {
        MeshRequest {
            job: "job".into(),
            min_workers: min,
            max_workers: max,
            gpus_per_worker: gpus,
            epoch: 1,
        }
    }

    #[test]
    fn whole_node_workers_get_each_ranks_closest_nic_and_share_racks() {
        let nodes = mesh_nodes("8x8:nics=4,rack=4");
        let mesh = plan_mesh(&request(2, 4, 8), &nodes, &[]).unwrap();
        assert_eq!(mesh.world_size, 32);
        assert_eq!(mesh.workers.len(), 4);
        let racks: BTreeSet<&str> = mesh.workers.iter().map(|w| w.rack.as_str()).collect();
        assert_eq!(racks.len(), 1, "four workers fit one rack of four nodes");
        let w = &mesh.workers[0];
        assert_eq!(w.rank_nics.len(), 8);
        assert_eq!(w.rank_nics[3].nic, "mlx5_1");
        assert_eq!(mesh.node_groups.len(), 4);
        assert_eq!(mesh.node_groups[1], (8..16).collect::<Vec<_>>());
    }

    #[test]
    fn the_meshs_cluster_is_the_cluster_its_ranks_hold() {
        // Whole nodes of a heterogeneous cluster: the same topology as the
        // cluster itself, node for node, rank for rank, NIC for NIC.
        let cluster = parse_cluster("2x8:nics=8+2x4:gpu=a100-80g,nics=2").unwrap();
        let nodes = MeshNode::all_free(&cluster);
        let mesh = plan_mesh(&request(2, 2, 8), &nodes, &[]).unwrap();
        let seen = mesh_cluster(&mesh);
        assert_eq!(seen.nodes.len(), 2);
        for node in &seen.nodes {
            let original = cluster.nodes.iter().find(|n| n.name == node.name).unwrap();
            assert_eq!(node.gpu, original.gpu);
            assert_eq!(node.gpus, 8);
            assert_eq!(node.nics, original.nics);
        }
        let topology = crate::topology::Topology::new(&seen).unwrap();
        assert_eq!(topology.world(), mesh.world_size);
        // Workers of 4 GPUs: two A100 nodes of 4 and one H100 node holding two
        // workers, each node with as many ranks as the job has on it.
        let mesh = plan_mesh(&request(4, 4, 4), &nodes, &[]).unwrap();
        let seen = mesh_cluster(&mesh);
        assert_eq!(
            seen.nodes.iter().map(|n| n.gpus).sum::<u32>(),
            mesh.world_size
        );
        for (node, group) in seen.nodes.iter().zip(&mesh.node_groups) {
            assert_eq!(node.gpus as usize, group.len());
            assert!(
                node.nics
                    .iter()
                    .all(|n| n.gpus.iter().all(|g| *g < node.gpus))
            );
        }
        // CPU workers: one rank a node, planned as the default GPU.
        let mesh = plan_mesh(&request(2, 2, 0), &nodes, &[]).unwrap();
        let seen = mesh_cluster(&mesh);
        assert_eq!(seen.nodes.len(), 2);
        assert!(
            seen.nodes
                .iter()
                .all(|n| n.gpus == 1 && n.gpu.name == "h100")
        );
    }

    #[test]
    fn partial_node_workers_get_the_node_nic_table() {
        let nodes = mesh_nodes("2x8:nics=2");
        let mesh = plan_mesh(&request(3, 3, 4), &nodes, &[]).unwrap();
        assert_eq!(mesh.workers.len(), 3);
        assert!(
            mesh.workers
                .iter()
                .all(|w| w.rank_nics.is_empty() && w.node_nics.len() == 2)
        );
        // Two workers share a node: one node group of 8 ranks, then 4.
        assert_eq!(
            mesh.node_groups.iter().map(Vec::len).collect::<Vec<_>>(),
            vec![8, 4]
        );
    }

    #[test]
    fn survivors_keep_their_node_and_name_and_lost_ones_are_replaced() {
        let mut nodes = mesh_nodes("4x8");
        let existing = vec![
            ExistingWorker {
                name: "job-worker-0".into(),
                node: "gpu-a-0".into(),
            },
            ExistingWorker {
                name: "job-worker-1".into(),
                node: "gpu-a-1".into(),
            },
        ];
        nodes[1].healthy = false;
        nodes[0].free_gpus = 0; // its GPUs are the surviving worker's
        let mesh = plan_mesh(&request(2, 3, 8), &nodes, &existing).unwrap();
        let on: BTreeMap<&str, &str> = mesh
            .workers
            .iter()
            .map(|w| (w.name.as_str(), w.node.as_str()))
            .collect();
        assert_eq!(on["job-worker-0"], "gpu-a-0");
        assert!(!on.contains_key("job-worker-1"), "its node is not healthy");
        assert_eq!(mesh.workers.len(), 3);
        assert!(mesh.workers.iter().all(|w| w.node != "gpu-a-1"));
    }

    #[test]
    fn too_little_capacity_says_how_much_is_needed_and_available() {
        let nodes = mesh_nodes("2x8");
        let err = plan_mesh(&request(3, 4, 8), &nodes, &[]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "job needs 3 workers of 8 GPUs (24 GPUs); the healthy nodes can take 2 such workers (16 GPUs)"
        );
        assert!(plan_mesh(&request(0, 4, 8), &nodes, &[]).is_err());
        // CPU-only workers take a node each: three do not fit on two nodes.
        let err = plan_mesh(&request(3, 4, 0), &nodes, &[]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "job needs 3 CPU workers, one per node; the healthy nodes can take 2"
        );
        assert_eq!(describe_workers(2, 0), "2 CPU-only workers");
        assert_eq!(describe_workers(2, 8), "2 workers of 8 GPUs");
    }

    proptest! {
        #[test]
        fn meshes_respect_capacity_range_and_health(
            pools in prop_oneof![Just("8x8:rack=2"), Just("4x8+6x4:gpu=a100-80g"), Just("16x8:rack=4,block=2")],
            gpus in prop_oneof![Just(1u32), Just(2), Just(4), Just(8)],
            min in 1u32..20,
            extra in 0u32..20,
            unhealthy in proptest::collection::vec(any::<bool>(), 16),
        ) {
            let mut nodes = mesh_nodes(pools);
            for (n, bad) in nodes.iter_mut().zip(&unhealthy) {
                n.healthy = !bad;
            }
            let request = request(min, min + extra, gpus);
            match plan_mesh(&request, &nodes, &[]) {
                Err(MeshError::NotEnoughCapacity { placeable, .. }) => prop_assert!(placeable < min),
                Err(other) => return Err(TestCaseError::fail(other.to_string())),
                Ok(mesh) => {
                    let count = mesh.workers.len() as u32;
                    prop_assert!(count >= min && count <= min + extra);
                    prop_assert_eq!(mesh.world_size, count * gpus);
                    let mut used: BTreeMap<&str, u32> = BTreeMap::new();
                    for (i, w) in mesh.workers.iter().enumerate() {
                        prop_assert_eq!(w.first_rank, i as u32 * gpus);
                        *used.entry(w.node.as_str()).or_default() += gpus;
                    }
                    for n in &nodes {
                        let u = used.get(n.node.name.as_str()).copied().unwrap_or(0);
                        prop_assert!(u <= n.free_gpus, "node {} overcommitted", n.node.name);
                        prop_assert!(u == 0 || n.healthy, "worker on unhealthy node {}", n.node.name);
                    }
                    // The same inputs give the same mesh.
                    prop_assert_eq!(plan_mesh(&request, &nodes, &[]).unwrap(), mesh);
                }
            }
        }
    }

    #[test]
    fn cpu_only_workers_are_one_rank_and_one_per_node() {
        let nodes = MeshNode::all_free(&parse_cluster("3x8").unwrap());
        let request = MeshRequest {
            job: "tiny".into(),
            min_workers: 2,
            max_workers: 4,
            gpus_per_worker: 0,
            epoch: 1,
        };
        let mesh = plan_mesh(&request, &nodes, &[]).unwrap();
        assert_eq!(mesh.workers.len(), 3);
        assert_eq!(mesh.world_size, 3);
        let ranks: Vec<u32> = mesh.workers.iter().map(|w| w.first_rank).collect();
        assert_eq!(ranks, vec![0, 1, 2]);
        let nodes_used: BTreeSet<&str> = mesh.workers.iter().map(|w| w.node.as_str()).collect();
        assert_eq!(nodes_used.len(), 3);
        assert!(
            mesh.workers
                .iter()
                .all(|w| w.gpus == 0 && w.rank_nics.is_empty())
        );
        let too_many = MeshRequest {
            min_workers: 4,
            ..request
        };
        let err = plan_mesh(&too_many, &nodes, &[]).unwrap_err();
        assert_eq!(err.category(), "insufficient_capacity");
        assert!(err.to_string().contains("4 CPU workers"), "{err}");
    }
}
