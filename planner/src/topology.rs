//! Ranks of a cluster: one per GPU, numbered node by node (node 0's GPUs first),
//! each with its node, its index on the node and its closest NIC.
//!
//! A node whose annotation lists no NIC gets one virtual NIC, `host`, of
//! [`HOST_NIC_GBPS`] shared by all its GPUs, so that a plan can still price
//! inter-node transfers; `weft-operator inventory` shows such nodes.

use std::ops::Range;

use crate::cluster::{Cluster, GpuModel, Nic, Node};

/// Line rate assumed for a node that declares no NIC, Gbit/s.
pub const HOST_NIC_GBPS: f64 = 25.0;

/// One rank.
#[derive(Clone, Debug, PartialEq)]
pub struct RankInfo {
    pub node: usize,
    /// GPU index on its node.
    pub local: u32,
    /// Index (into the node's NICs) of the NIC closest to this GPU.
    pub nic: usize,
}

/// The ranks of a cluster and the facts about them a plan needs.
#[derive(Clone, Debug, PartialEq)]
pub struct Topology {
    pub nodes: Vec<Node>,
    pub ranks: Vec<RankInfo>,
    first_rank: Vec<u32>,
    weakest_node: usize,
    /// GPUs of the largest node (asked for every piece a plan prices).
    max_gpus_per_node: u32,
    /// A node with the fastest GPU model (see [`Topology::reference_gpu`]).
    reference_node: usize,
}

/// Which end of the GPU models [`node_of_model`] looks for.
#[derive(Clone, Copy, PartialEq)]
enum Speed {
    Fastest,
    Slowest,
}

/// The first node of the fastest or the slowest GPU model: by peak, then by
/// name, then by memory (the larger with the faster), so that the order the
/// nodes are listed in does not decide.
fn node_of_model(nodes: &[Node], speed: Speed) -> usize {
    let toward = |order: std::cmp::Ordering| match speed {
        Speed::Fastest => order.reverse(),
        Speed::Slowest => order,
    };
    (0..nodes.len())
        .min_by(|a, b| {
            let (ga, gb) = (&nodes[*a].gpu, &nodes[*b].gpu);
            toward(ga.peak_bf16_tflops.total_cmp(&gb.peak_bf16_tflops))
                .then(ga.name.cmp(&gb.name))
                .then(toward(ga.memory_gib.total_cmp(&gb.memory_gib)))
                .then(a.cmp(b))
        })
        .unwrap_or(0)
}

/// Why a cluster cannot be planned on.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TopologyError {
    #[error("the cluster has no GPU")]
    NoGpus,
}

impl Topology {
    pub fn new(cluster: &Cluster) -> Result<Topology, TopologyError> {
        let mut nodes = Vec::new();
        let mut ranks = Vec::new();
        let mut first_rank = Vec::new();
        for node in cluster.nodes.iter().filter(|n| n.gpus > 0) {
            let mut node = node.clone();
            if node.nics.is_empty() {
                node.nics = vec![Nic {
                    name: "host".to_string(),
                    gbps: HOST_NIC_GBPS,
                    gpus: (0..node.gpus).collect(),
                }];
            }
            let index = nodes.len();
            first_rank.push(ranks.len() as u32);
            for local in 0..node.gpus {
                let nic = node
                    .nics
                    .iter()
                    .position(|n| n.gpus.contains(&local))
                    .unwrap_or(local as usize % node.nics.len());
                ranks.push(RankInfo {
                    node: index,
                    local,
                    nic,
                });
            }
            nodes.push(node);
        }
        if ranks.is_empty() {
            return Err(TopologyError::NoGpus);
        }
        let mut topology = Topology {
            nodes,
            ranks,
            first_rank,
            weakest_node: 0,
            max_gpus_per_node: 1,
            reference_node: 0,
        };
        topology.reference_node = node_of_model(&topology.nodes, Speed::Fastest);
        topology.max_gpus_per_node = topology.nodes.iter().map(|n| n.gpus).max().unwrap_or(1);
        topology.weakest_node = (0..topology.nodes.len())
            .min_by(|a, b| {
                let per_gpu = |n: usize| {
                    topology.node_nic_bytes_per_s(n) / f64::from(topology.nodes[n].gpus.max(1))
                };
                let peak = |n: usize| topology.nodes[n].gpu.peak_bf16_tflops;
                per_gpu(*a)
                    .total_cmp(&per_gpu(*b))
                    .then(peak(*a).total_cmp(&peak(*b)))
                    .then(a.cmp(b))
            })
            .unwrap_or(0);
        Ok(topology)
    }

    /// The node with the least NIC bandwidth per GPU, the slowest GPUs among
    /// those, the first among equals (whatever order the cluster lists them in).
    pub fn weakest_node(&self) -> usize {
        self.weakest_node
    }

    pub fn world(&self) -> u32 {
        self.ranks.len() as u32
    }

    pub fn node_of(&self, rank: u32) -> usize {
        self.ranks[rank as usize].node
    }

    /// The GPU model estimates are priced on and paces are relative to: the
    /// fastest (then by name), so that the order a cluster lists its nodes
    /// in changes no plan.
    pub fn reference_gpu(&self) -> &GpuModel {
        &self.nodes[self.reference_node].gpu
    }

    /// The same cluster with estimates priced on its slowest GPU model (then
    /// by name) instead: on a mixed cluster, what a sequence costs depends on
    /// the model it is priced on (transfers weigh more against a faster
    /// GPU's compute), and either can give the better layout. Lower bounds
    /// must keep the fastest.
    pub fn priced_on_slowest(&self) -> Topology {
        let mut topology = self.clone();
        topology.reference_node = node_of_model(&self.nodes, Speed::Slowest);
        topology
    }

    pub fn gpu_of(&self, rank: u32) -> &GpuModel {
        &self.nodes[self.node_of(rank)].gpu
    }

    pub fn same_node(&self, a: u32, b: u32) -> bool {
        self.node_of(a) == self.node_of(b)
    }

    /// The ranks of node `node`.
    pub fn ranks_of_node(&self, node: usize) -> Range<u32> {
        let start = self.first_rank[node];
        start..start + self.nodes[node].gpus
    }

    /// NVLink bandwidth of a GPU on `node`, bytes/s, one direction.
    pub fn nvlink_bytes_per_s(&self, node: usize) -> f64 {
        self.nodes[node].gpu.nvlink_gbytes_per_s * 1e9
    }

    /// Line rate of NIC `nic` of `node`, bytes/s.
    pub fn nic_bytes_per_s(&self, node: usize, nic: usize) -> f64 {
        self.nodes[node].nics[nic].gbps * 1e9 / 8.0
    }

    /// All NICs of `node` together, bytes/s.
    pub fn node_nic_bytes_per_s(&self, node: usize) -> f64 {
        self.nodes[node].nics.iter().map(|n| n.gbps).sum::<f64>() * 1e9 / 8.0
    }

    /// A rank of `node` close to NIC `nic` (the first GPU it lists), used as relay.
    pub fn relay_for(&self, node: usize, nic: usize) -> u32 {
        let local = self.nodes[node].nics[nic]
            .gpus
            .first()
            .copied()
            .unwrap_or(0);
        self.first_rank[node] + local
    }

    /// GPUs per node of the largest node.
    pub fn max_gpus_per_node(&self) -> u32 {
        self.max_gpus_per_node
    }

    /// Whether every GPU of the cluster is of one speed.
    pub fn one_gpu_kind(&self) -> bool {
        let peak = self.reference_gpu().peak_bf16_tflops;
        (0..self.world()).all(|r| self.gpu_of(r).peak_bf16_tflops == peak)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::parse_cluster;

    #[test]
    fn ranks_are_numbered_node_by_node_with_their_closest_nic() {
        let topo =
            Topology::new(&parse_cluster("2x8:nics=4+1x4:gpu=a100-80g,nics=0").unwrap()).unwrap();
        assert_eq!(topo.world(), 20);
        assert_eq!(topo.node_of(9), 1);
        assert_eq!(topo.ranks[9].local, 1);
        assert_eq!(topo.ranks[9].nic, 0);
        assert_eq!(topo.ranks[15].nic, 3);
        assert_eq!(topo.ranks_of_node(2), 16..20);
        // The NIC-less node gets the virtual host NIC.
        assert_eq!(topo.nodes[2].nics[0].name, "host");
        assert_eq!(topo.ranks[18].nic, 0);
        assert!(topo.same_node(16, 19) && !topo.same_node(15, 16));
        assert_eq!(topo.relay_for(0, 2), 4);
        // 25 Gbit/s over 4 GPUs is less than 4 NICs' 200 over 8.
        assert_eq!(topo.weakest_node(), 2);
    }
}
