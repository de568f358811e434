//! What a strategy returns: a [`Layout`] of micro-batches of ring groups
//! (which ranks run which sequences, in which order, how their transfers
//! leave their nodes), and the [`PlanContext`] every strategy plans in.

use std::collections::BTreeMap;

use crate::cost::CostModel;
use crate::topology::Topology;

/// How transfers between nodes are carried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Routing {
    /// Each transfer leaves through the sender's closest NIC and arrives through
    /// the receiver's: what a collective library does by default.
    ClosestNic,
    /// Transfers are spread over every NIC of the node, each part relayed over
    /// NVLink through a GPU close to its NIC.
    AllNics,
}

/// A group of ranks and the sequences it processes together (see [`crate::plan`]).
#[derive(Clone, Debug, PartialEq)]
pub struct LayoutGroup {
    pub ranks: Vec<u32>,
    /// Indices into the batch.
    pub sequences: Vec<usize>,
    /// Ranks of each node-local inner ring when the group runs as a
    /// hierarchical ring (see [`crate::plan::Group::inner_ring`]); 0: one flat ring.
    pub inner_ring: u32,
    /// Share of the middle layers' activations offloaded to host memory
    /// (see [`crate::plan::Group::offload`]); 0: none.
    pub offload: f64,
    /// The group's ranks stream their backward (StreamBP): the plan's
    /// choice where the context leaves it to the plan
    /// ([`crate::cost::StreamBp::PerRing`]); with
    /// [`crate::cost::StreamBp::Always`] every group streams whatever this
    /// says (see [`LayoutGroup::streams`]). Only weft sets it, and only
    /// where StreamBP is on. See [`crate::plan::Group::stream_bp_chunk`].
    pub stream_bp: bool,
}

impl LayoutGroup {
    /// A group that runs one flat ring.
    pub fn flat(ranks: Vec<u32>, sequences: Vec<usize>) -> LayoutGroup {
        LayoutGroup {
            ranks,
            sequences,
            inner_ring: 0,
            offload: 0.0,
            stream_bp: false,
        }
    }

    /// Whether the group streams its backward under `cost`'s setting.
    pub fn streams(&self, cost: &CostModel) -> bool {
        self.stream_bp || cost.streams()
    }
}

/// Whether each rank streams its backward in the micro-batch `mb` (see
/// [`crate::plan::Group::stream_bp_chunk`]: a rank's groups stream alike,
/// and so do all of a remapped micro-batch's). A rank in no group streams
/// when the micro-batch is remapped and streams.
pub fn ranks_streaming(cost: &CostModel, mb: &LayoutMicroBatch, world: u32) -> Vec<bool> {
    let any = mb.groups.iter().any(|g| g.streams(cost));
    let mut streams = vec![mb.remap && any; world as usize];
    for group in mb.groups.iter().filter(|g| g.streams(cost)) {
        for &r in &group.ranks {
            streams[r as usize] = true;
        }
    }
    streams
}

/// The set each group of micro-batch `mb` belongs to (the index of one of
/// its members): groups that share a rank are joined, and all of a
/// remapped micro-batch's (its all-to-alls span every rank), since a rank
/// runs all its groups of a micro-batch in one pass, one way (plain or
/// streamed, in one chunk).
pub fn joined_groups(mb: &LayoutMicroBatch) -> Vec<usize> {
    fn root(parent: &mut [usize], mut i: usize) -> usize {
        while parent[i] != i {
            parent[i] = parent[parent[i]];
            i = parent[i];
        }
        i
    }
    let mut parent: Vec<usize> = (0..mb.groups.len()).collect();
    let mut owner: BTreeMap<u32, usize> = BTreeMap::new();
    for (g, group) in mb.groups.iter().enumerate() {
        for &r in &group.ranks {
            let other = if mb.remap {
                Some(0)
            } else {
                owner.get(&r).copied()
            };
            if let Some(other) = other {
                let (a, b) = (root(&mut parent, g), root(&mut parent, other));
                parent[a] = b;
            }
            owner.insert(r, g);
        }
    }
    (0..mb.groups.len()).map(|g| root(&mut parent, g)).collect()
}

/// The inner ring size with which `ranks` can run as a hierarchical ring: the
/// ranks are consecutive blocks of the same size, each the ranks of one node,
/// at least two nodes of at least two ranks each. 0 when they are not.
pub fn node_blocks(topo: &Topology, ranks: &[u32]) -> u32 {
    let Some(&first) = ranks.first() else {
        return 0;
    };
    let node = topo.node_of(first);
    let inner = ranks
        .iter()
        .take_while(|r| topo.node_of(**r) == node)
        .count();
    if inner < 2 || inner == ranks.len() || !ranks.len().is_multiple_of(inner) {
        return 0;
    }
    let mut seen = std::collections::BTreeSet::new();
    for block in ranks.chunks(inner) {
        let node = topo.node_of(block[0]);
        if !seen.insert(node) || block.iter().any(|r| topo.node_of(*r) != node) {
            return 0;
        }
    }
    inner as u32
}

/// Makes every group of `layout` that spans whole node blocks (see
/// [`node_blocks`]) a hierarchical ring: key/value blocks go round inside each
/// node first and cross nodes once per inner round, each rank over its own NIC.
pub fn use_hierarchical_rings(topo: &Topology, layout: &mut Layout) {
    for mb in &mut layout.micro_batches {
        for group in &mut mb.groups {
            group.inner_ring = node_blocks(topo, &group.ranks);
        }
    }
}

#[derive(Clone, Debug, PartialEq, Default)]
pub struct LayoutMicroBatch {
    pub groups: Vec<LayoutGroup>,
    pub remap: bool,
}

/// What a strategy decides; everything else follows from it.
#[derive(Clone, Debug, PartialEq)]
pub struct Layout {
    pub strategy: String,
    pub micro_batches: Vec<LayoutMicroBatch>,
    pub routing: Routing,
}

impl Layout {
    /// Every group streams its backward (StreamBP).
    pub fn stream_everywhere(&mut self) {
        for group in self.micro_batches.iter_mut().flat_map(|m| &mut m.groups) {
            group.stream_bp = true;
        }
    }
}

/// Everything the planner needs besides the batch.
#[derive(Clone, Debug)]
pub struct PlanContext {
    pub topology: Topology,
    pub cost: CostModel,
    /// What the job allows the plans beyond memory.
    pub limits: PlanLimits,
}

/// What a job allows its plans, beyond what memory allows (a TrainingJob's
/// `parallelism` section).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlanLimits {
    /// The one context-parallel degree of every ring (`static` only; the
    /// strategy sizes it itself when absent).
    pub cp_degree: Option<u32>,
    /// The largest ring any sequence may get.
    pub max_cp_degree: Option<u32>,
    /// Transfers between nodes spread over every NIC of a node; false: each
    /// rank's transfers take its own (closest) NIC.
    pub nic_aware_routing: bool,
    /// The executor can offload activations to host memory (ByteScale's
    /// selective offloading, `hdp-offload`); false: no plan offloads.
    pub offload_activations: bool,
}

impl Default for PlanLimits {
    fn default() -> Self {
        PlanLimits {
            cp_degree: None,
            max_cp_degree: None,
            nic_aware_routing: true,
            offload_activations: true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::tests::context;

    #[test]
    fn node_blocks_finds_whole_node_inner_rings_only() {
        let topo = context("4x4", "llama-7b").topology;
        assert_eq!(node_blocks(&topo, &[0, 1, 2, 3, 4, 5, 6, 7]), 4);
        assert_eq!(node_blocks(&topo, &[0, 1, 4, 5, 8, 9]), 2);
        // One node, ranks across nodes one by one, uneven or repeated blocks: flat.
        assert_eq!(node_blocks(&topo, &[0, 1, 2, 3]), 0);
        assert_eq!(node_blocks(&topo, &[0, 4, 8]), 0);
        assert_eq!(node_blocks(&topo, &[0, 1, 2, 4, 5]), 0);
        assert_eq!(node_blocks(&topo, &[0, 1, 4, 5, 2, 3]), 0);
        assert_eq!(node_blocks(&topo, &[]), 0);
    }
}
