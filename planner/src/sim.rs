//! The simulator: what a layout costs on a cluster, under one cost model, so that
//! every strategy is judged the same way; and the step plan document built from
//! a layout.
//!
//! Time model, per micro-batch, in order:
//! - A micro-batch with a remap starts when every rank is free (the all-to-all
//!   is a barrier), runs the linear modules on the token-balanced layout and the
//!   remap, then its ring groups, and ends with another barrier (the way back).
//! - Ring groups are list-scheduled: a group starts when all its ranks are free
//!   and holds them for its duration (its packed ring pass, plus, without a
//!   remap, the linear modules of each rank's share).
//! - Transfers that cross nodes compete for NICs: each NIC (or, when transfers
//!   are spread over every NIC of a node, the node's NICs together) is busy for
//!   the bytes it carries divided by its rate, and a transfer gets its bytes over
//!   the busier of its sending and receiving side. NVLink inside a node is not a
//!   bottleneck at these volumes.

use std::collections::BTreeMap;

use crate::cost::{CostModel, gib};
use crate::plan::{
    MicroBatch, NicRoute, Prediction, RankPrediction, RemapPlan, RouteLeg, STEP_PLAN_VERSION,
    SequencePlan, Shard, StepPlan, Transfer, group_zigzag, zigzag_chunk_start,
};
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

/// Per-rank outcome of a simulation.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RankOutcome {
    /// What the rank does when, in order (only from
    /// [`simulate_with_routes`]: the plain simulation prices candidates).
    pub timeline: Vec<crate::plan::TimeSpan>,
    pub finish_s: f64,
    pub compute_s: f64,
    pub exposed_comm_s: f64,
    pub peak_memory_bytes: f64,
    pub attention_tokens: u64,
    pub linear_tokens: u64,
}

/// Outcome of a simulation.
#[derive(Clone, Debug, PartialEq)]
pub struct Outcome {
    pub step_time_s: f64,
    pub ranks: Vec<RankOutcome>,
    pub fits_in_memory: bool,
    pub routes: Vec<NicRoute>,
    pub remaps: Vec<RemapPlan>,
    /// Each micro-batch's StreamBP chunk on each rank, 0 where it runs plain
    /// backprop (see [`stream_chunks`]).
    pub stream_chunks: Vec<Vec<u64>>,
}

impl Outcome {
    pub fn max_over_mean(&self) -> f64 {
        let busy: Vec<f64> = self
            .ranks
            .iter()
            .map(|r| r.compute_s + r.exposed_comm_s)
            .collect();
        let mean = busy.iter().sum::<f64>() / busy.len().max(1) as f64;
        let max = busy.iter().copied().fold(0.0, f64::max);
        if mean > 0.0 { max / mean } else { 1.0 }
    }

    pub fn comm_fraction(&self) -> f64 {
        let total = self.step_time_s * self.ranks.len() as f64;
        if total > 0.0 {
            self.ranks.iter().map(|r| r.exposed_comm_s).sum::<f64>() / total
        } else {
            0.0
        }
    }

    pub fn peak_memory_gib(&self) -> f64 {
        gib(self
            .ranks
            .iter()
            .map(|r| r.peak_memory_bytes)
            .fold(0.0, f64::max))
    }
}

/// Lower bound on the step time of a batch for ring-attention plans; no plan
/// that fits in memory can beat it. The largest of three bounds:
/// - work: all compute of the step spread perfectly over every GPU at its
///   achieved rate, with no communication, no imbalance and no memory limit
///   but one: with StreamBP chosen per ring, a sequence plain backprop
///   cannot hold on any ring ([`must_stream`]) pays StreamBP's
///   recomputation;
/// - longest sequence: the step cannot end before its longest sequence is done,
///   even at its best degree, on the fastest GPUs, over the fastest link with
///   no contention (ring steps still pay their latency and any transfer that
///   compute cannot hide), with the linear work its ring's ranks cannot shed
///   (see [`sequence_bound`]);
/// - work with the longest sequences' exposed transfers (see
///   [`exposed_work_bound`]).
pub fn lower_bound(ctx: &PlanContext, lengths: &[u64]) -> f64 {
    let by_work = work_bound(ctx, lengths);
    let Some(&longest) = lengths.iter().max() else {
        return by_work;
    };
    // The longest sequence's rings, priced once for both bounds that use them.
    let rings = ring_bounds(ctx, lengths, longest);
    let by_sequence = fastest_ring(&rings).0;
    let floor = by_work.max(by_sequence);
    floor.max(stretched_work_bound(ctx, lengths, by_work, rings, floor))
}

/// The work bound with what the longest sequences' rings cannot hide. The
/// step must end by T, so each longest sequence runs on enough ranks to be
/// done by T (by its [`sequence_bound`] at that degree); the wider its ring,
/// the shorter the chunks each step computes against the same bytes moved,
/// so its transfers stretch its ring's steps by a factor κ ≥ 1 (the ring's
/// time without step latency over its compute, at the best shape and links).
/// Packing other documents into that ring cannot hide them: every other
/// document is no longer, so it brings at least as many bytes per unit of
/// compute, and the ring's steps stretch at least as much. So the ranks
/// spend at least the step's work plus (κ − 1) times the longest sequences'
/// attention work, and T is at least that over the cluster; the bound is the
/// least T that satisfies it (found by bisection: a later T lets the
/// sequences take fewer ranks, so the work it implies does not grow).
/// Ring steps also pay a latency each, which packing cannot hide: every
/// sequence too long to end by T on one rank adds the least latency a ring
/// that ends it by T pays (see `stretched_work_bound`); the ranks spend the
/// more of the two past the work.
/// Only on clusters of one kind of GPU; `floor`: a T known to be a bound.
pub fn exposed_work_bound(ctx: &PlanContext, lengths: &[u64], floor: f64) -> f64 {
    let Some(&longest) = lengths.iter().max() else {
        return floor;
    };
    let by_work = work_bound(ctx, lengths);
    stretched_work_bound(
        ctx,
        lengths,
        by_work,
        ring_bounds(ctx, lengths, longest),
        floor,
    )
}

/// [`exposed_work_bound`] given the batch's [`work_bound`] and its longest
/// sequence's [`ring_bounds`].
fn stretched_work_bound(
    ctx: &PlanContext,
    lengths: &[u64],
    by_work: f64,
    mut degrees: Vec<RingBound>,
    floor: f64,
) -> f64 {
    let topo = &ctx.topology;
    let world = topo.world();
    let gpu = topo.gpu_of(0);
    let Some(&longest) = lengths.iter().max() else {
        return floor;
    };
    if !topo.one_gpu_kind() || longest == 0 {
        return floor;
    }
    let count = lengths.iter().filter(|s| **s == longest).count() as f64;
    let attention_work =
        count * least_cost_of(ctx, longest).attention_compute_time(longest as f64, gpu);
    let work = by_work * f64::from(world);
    // Degrees by the time the sequence takes at them, each with the least
    // stretch of any degree at most as slow.
    degrees.sort_by(|a, b| a.time_s.total_cmp(&b.time_s).then(a.degree.cmp(&b.degree)));
    let mut least = Vec::with_capacity(degrees.len());
    let mut so_far = f64::INFINITY;
    for d in &degrees {
        so_far = so_far.min(d.stretch);
        least.push(so_far);
    }
    // Least stretch of the degrees that are done by `t`.
    let stretch_by = |t: f64| {
        let done = degrees.partition_point(|d| d.time_s <= t);
        if done == 0 {
            f64::INFINITY
        } else {
            least[done - 1]
        }
    };
    // Step latency: a ring of d ranks pays it on at least d/2 hops a pass (see
    // [`CostModel::ring_latency_s`]); a sequence whose attention alone
    // outlasts `t` on one rank needs a ring, of the least d whose share of
    // its attention and latency, A/d + c·d/2, ends by `t`, and its ranks pay
    // c·d²/2 together. That least d grows faster than A, so a ring holding
    // several such sequences pays at least the sum of theirs.
    let c = ctx.cost.ring_latency_s();
    let ringed: Vec<f64> = lengths
        .iter()
        .map(|s| ctx.cost.attention_compute_time(*s as f64, gpu))
        .filter(|a| *a > floor)
        .collect();
    let latency_by = |t: f64| -> f64 {
        if c <= 0.0 {
            return 0.0;
        }
        let mut total = 0.0;
        for &a in ringed.iter().filter(|a| **a > t) {
            let disc = t * t - 2.0 * c * a;
            if disc < 0.0 {
                // No ring ends by `t`.
                return f64::INFINITY;
            }
            let d = (t - disc.sqrt()) / c;
            total += 0.5 * c * d * d;
        }
        total
    };
    // Rank time past the work: the longest sequences' stretch, or the
    // rings' latency, whichever is more (each is a bound on it).
    let implied = |t: f64| {
        let stretch = attention_work * (stretch_by(t) - 1.0).max(0.0);
        (work + stretch.max(latency_by(t))) / f64::from(world)
    };
    if implied(floor) <= floor {
        return floor;
    }
    // A T late enough to satisfy it, then bisection.
    let mut hi = floor;
    while implied(hi) > hi {
        let next = implied(hi);
        hi = if next.is_finite() {
            next.max(hi * 1.01)
        } else {
            hi * 2.0
        };
    }
    let mut lo = floor;
    for _ in 0..60 {
        let mid = 0.5 * (lo + hi);
        if implied(mid) <= mid {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    hi
}

/// One degree of a sequence's ring, at its best shape and links with no
/// contention (see [`sequence_bound`]).
struct RingBound {
    degree: u32,
    /// The sequence's time at this degree: its attention plus the least
    /// linear-module time its ranks can have (see [`sequence_bound`]).
    time_s: f64,
    /// Least (over shapes) ring time without step latency over compute.
    stretch: f64,
}

/// Whether a sequence of `length` tokens must stream its backward: StreamBP
/// is chosen per ring ([`crate::cost::StreamBp::PerRing`], priced plain) and
/// plain backprop's memory cannot hold it on any ring the job allows (the
/// cap, or the cluster), even on its roomiest ranks, its linear layout
/// spread over the whole cluster and all it may offload to the host
/// offloaded (see [`plain_reach`]).
pub fn must_stream(ctx: &PlanContext, length: u64) -> bool {
    plain_reach(ctx).is_some_and(|reach| length > reach)
}

/// With StreamBP per ring, the most tokens plain backprop can hold on one
/// ring (see [`must_stream`]); `None` otherwise. A ring's ranks hold the
/// sequence's tokens in the attention layout, a share of the ring's width
/// each; in the linear layout a remap may spread them over every rank of
/// the cluster; and offloading to host memory (where the job allows it)
/// frees at most all but the first and last layers' activations. The reach
/// is the longest sequence whose least share of each still fits the
/// roomiest rank's memory.
fn plain_reach(ctx: &PlanContext) -> Option<u64> {
    if ctx.cost.coefficients.streambp != crate::cost::StreamBp::PerRing {
        return None;
    }
    let topo = &ctx.topology;
    let world = f64::from(topo.world());
    let plain = ctx.cost.with_streaming(false);
    // Every GPU of a node is of its model.
    let room = topo
        .nodes
        .iter()
        .map(|node| {
            plain.rank_budget_bytes(&node.gpu, topo.world()) - plain.model_state_bytes(topo.world())
        })
        .fold(f64::NEG_INFINITY, f64::max);
    let widest = f64::from(ctx.limits.max_cp_degree.unwrap_or(topo.world())).min(world);
    let kept = if ctx.limits.offload_activations {
        ctx.cost.offload_kept(1.0)
    } else {
        1.0
    };
    Some(crate::cost::last_fitting(|length| {
        let length = length as f64;
        plain.step_bytes(kept * length / world, kept * length / widest) <= room
    }))
}

/// The cost model a sequence of `length` tokens is at best priced with: the
/// streamed one when it [`must_stream`], else `ctx`'s.
fn least_cost_of(ctx: &PlanContext, length: u64) -> std::borrow::Cow<'_, CostModel> {
    if must_stream(ctx, length) {
        std::borrow::Cow::Owned(ctx.cost.with_streaming(true))
    } else {
        std::borrow::Cow::Borrowed(&ctx.cost)
    }
}

/// The work bound alone: every GPU busy with an even share of the step's
/// compute, at its achieved rate (with StreamBP per ring, the sequences
/// only StreamBP holds pay its recomputation).
pub fn work_bound(ctx: &PlanContext, lengths: &[u64]) -> f64 {
    let topo = &ctx.topology;
    let world = topo.world();
    // Work in "seconds on a reference GPU", then divide by the cluster's
    // capacity in reference GPUs, so heterogeneous clusters are handled.
    let reference = topo.reference_gpu().clone();
    // (Priced streamed only where StreamBP is chosen per ring.)
    let streamed = plain_reach(ctx).map(|reach| (reach, ctx.cost.with_streaming(true)));
    let work: f64 = lengths
        .iter()
        .map(|s| {
            let cost = match &streamed {
                Some((reach, streamed)) if s > reach => streamed,
                _ => &ctx.cost,
            };
            let s = *s as f64;
            cost.linear_time(s, &reference) + cost.attention_compute_time(s, &reference)
        })
        .sum();
    let capacity: f64 = (0..world)
        .map(|r| topo.gpu_of(r).peak_bf16_tflops / reference.peak_bf16_tflops)
        .sum();
    work / capacity
}

/// A bound on the time the step spends on one sequence of `length` tokens of
/// the batch `lengths`: its attention at the best degree and ring shape, on
/// the fastest GPUs, over the fastest links with no contention (ring steps
/// still pay their latency and any transfer compute cannot hide), plus the
/// least linear-module time its ranks can have before its attention ends.
/// Also returns the degree of that best time.
///
/// The linear modules: without a remap, the ranks of a ring of degree d run
/// its tokens' linear modules themselves, at least `length / d` tokens on the
/// busiest. With a remap, every rank holds an even share of its
/// micro-batch's tokens for them, and runs them before the micro-batch's
/// attention, which no other work overlaps; so the step takes at least that
/// share's time plus the ring's, plus the work done outside the micro-batch
/// over the cluster. All of the batch's linear work is done in or outside it
/// and attention work adds no time to the ring's ranks that the ring does not
/// already count, which leaves the ring plus the batch's linear work spread
/// over the cluster. On a cluster of more than one kind of GPU the remap's
/// shares follow speed within memory caps, so this only counts the
/// sequence's own linear work spread over the cluster.
pub fn sequence_bound(ctx: &PlanContext, lengths: &[u64], length: u64) -> (f64, u32) {
    fastest_ring(&ring_bounds(ctx, lengths, length))
}

/// The least time of `rings` and its degree (the first at that time).
fn fastest_ring(rings: &[RingBound]) -> (f64, u32) {
    rings.iter().fold((f64::INFINITY, 1), |best, d| {
        if d.time_s < best.0 {
            (d.time_s, d.degree)
        } else {
            best
        }
    })
}

/// [`RingBound`] of every degree from 1 to the cluster's size, for a
/// sequence of `length` tokens of the batch `lengths`.
fn ring_bounds(ctx: &PlanContext, lengths: &[u64], length: u64) -> Vec<RingBound> {
    let topo = &ctx.topology;
    let world = topo.world();
    // The fastest GPU (its peak is all the ring and linear times ask of it).
    let fastest = topo.reference_gpu();
    let best_link = (0..topo.nodes.len())
        .map(|n| topo.nvlink_bytes_per_s(n).max(topo.node_nic_bytes_per_s(n)))
        .fold(0.0, f64::max);
    let s = length as f64;
    // Every ring shape of each degree: flat over the fastest link (past a
    // node's GPUs, no faster than the best node's NICs together), or
    // hierarchical with node-local inner rings of any size that divides it
    // (inner hops on the fastest NVLink; the inner ring's ranks all send to
    // the next node at once, so each gets at most its share of the fastest
    // node's NICs).
    let nvlink = (0..topo.nodes.len())
        .map(|n| topo.nvlink_bytes_per_s(n))
        .fold(0.0, f64::max);
    let nics = (0..topo.nodes.len())
        .map(|n| topo.node_nic_bytes_per_s(n))
        .fold(0.0, f64::max);
    let per_node = topo.max_gpus_per_node();
    // The sequence's own backprop where it must stream.
    let cost = least_cost_of(ctx, length);
    let mut without_latency = cost.clone().into_owned();
    without_latency.coefficients.p2p_latency_s = 0.0;
    // Linear-module time on the ring's ranks with a remap (see
    // [`sequence_bound`]); a rank's share may be one token short of even.
    let remapped = if topo.one_gpu_kind() {
        let tokens: f64 = lengths.iter().map(|t| *t as f64).sum();
        (ctx.cost.linear_time(tokens, fastest) / f64::from(world.max(1))
            - ctx.cost.linear_time(1.0, fastest))
        .max(0.0)
    } else {
        ctx.cost.linear_time(s, fastest) / f64::from(world.max(1))
    };
    (1..=world)
        .map(|d| {
            // Time and time without latency of one shape.
            let shape = |outer: u32, inner: u32, intra: f64, inter: f64| {
                let ring = cost.hierarchical_ring_time(&[s], outer, inner, intra, inter, fastest);
                let bare = without_latency.hierarchical_ring_time(
                    &[s],
                    outer,
                    inner,
                    intra,
                    inter,
                    fastest,
                );
                (
                    ring.total_s,
                    bare.total_s / ring.compute_s.max(f64::MIN_POSITIVE),
                )
            };
            // A flat ring past a node's GPUs has a hop between nodes, and
            // each ring step waits for its slowest hop: at best all of the
            // best node's NICs carry it.
            let link = if d > per_node {
                best_link.min(nics)
            } else {
                best_link
            };
            let (mut time_s, mut stretch) = shape(1, d, link, link);
            for inner in (2..=per_node.min(d / 2)).filter(|inner| d.is_multiple_of(*inner)) {
                let (t, k) = shape(d / inner, inner, nvlink, nics / f64::from(inner));
                time_s = time_s.min(t);
                stretch = stretch.min(k);
            }
            let own = cost.linear_time(s / f64::from(d), fastest);
            RingBound {
                degree: d,
                time_s: time_s + own.min(remapped),
                stretch,
            }
        })
        .collect()
}

/// Integer split of `total` proportional to `weights` (largest remainder), so
/// the parts add up exactly.
pub fn proportional_split(total: u64, weights: &[f64]) -> Vec<u64> {
    let sum: f64 = weights.iter().sum();
    if weights.is_empty() || sum <= 0.0 {
        return vec![0; weights.len()];
    }
    let exact: Vec<f64> = weights.iter().map(|w| total as f64 * w / sum).collect();
    let mut parts: Vec<u64> = exact.iter().map(|x| x.floor() as u64).collect();
    let mut left = total - parts.iter().sum::<u64>();
    let mut order: Vec<usize> = (0..weights.len()).collect();
    order.sort_by(|a, b| {
        let fa = exact[*a] - exact[*a].floor();
        let fb = exact[*b] - exact[*b].floor();
        fb.total_cmp(&fa).then(a.cmp(b))
    });
    for i in order {
        if left == 0 {
            break;
        }
        parts[i] += 1;
        left -= 1;
    }
    parts
}

/// NIC load of one micro-batch: bytes per (node, NIC) or per node, each way.
#[derive(Default)]
struct NicLoad {
    egress: BTreeMap<(usize, usize), f64>,
    ingress: BTreeMap<(usize, usize), f64>,
}

/// The resource a transfer uses on one side: a NIC, or (spread) the whole node.
fn nic_key(routing: Routing, node: usize, nic: usize) -> (usize, usize) {
    match routing {
        Routing::ClosestNic => (node, nic),
        Routing::AllNics => (node, usize::MAX),
    }
}

impl NicLoad {
    fn add(&mut self, topo: &Topology, routing: Routing, from: u32, to: u32, bytes: f64) {
        let (a, b) = (&topo.ranks[from as usize], &topo.ranks[to as usize]);
        *self
            .egress
            .entry(nic_key(routing, a.node, a.nic))
            .or_default() += bytes;
        *self
            .ingress
            .entry(nic_key(routing, b.node, b.nic))
            .or_default() += bytes;
    }

    fn capacity(topo: &Topology, key: (usize, usize)) -> f64 {
        if key.1 == usize::MAX {
            topo.node_nic_bytes_per_s(key.0)
        } else {
            topo.nic_bytes_per_s(key.0, key.1)
        }
    }

    /// Seconds the busier side of a transfer from `from` to `to` is occupied.
    fn busy_s(&self, topo: &Topology, routing: Routing, from: u32, to: u32) -> f64 {
        let (a, b) = (&topo.ranks[from as usize], &topo.ranks[to as usize]);
        let ek = nic_key(routing, a.node, a.nic);
        let ik = nic_key(routing, b.node, b.nic);
        let e = self.egress.get(&ek).copied().unwrap_or(0.0) / Self::capacity(topo, ek);
        let i = self.ingress.get(&ik).copied().unwrap_or(0.0) / Self::capacity(topo, ik);
        e.max(i)
    }
}

fn route_legs(topo: &Topology, routing: Routing, from: u32) -> Vec<RouteLeg> {
    let info = &topo.ranks[from as usize];
    let node = &topo.nodes[info.node];
    match routing {
        Routing::ClosestNic => vec![RouteLeg {
            nic: node.nics[info.nic].name.clone(),
            relay_rank: None,
            share: 1.0,
        }],
        Routing::AllNics => {
            let total: f64 = node.nics.iter().map(|n| n.gbps).sum();
            node.nics
                .iter()
                .enumerate()
                .map(|(k, nic)| {
                    let relay = topo.relay_for(info.node, k);
                    RouteLeg {
                        nic: nic.name.clone(),
                        relay_rank: (relay != from).then_some(relay),
                        share: nic.gbps / total,
                    }
                })
                .collect()
        }
    }
}

/// A group's ring as (outer, inner): `outer` inner rings of `inner` ranks;
/// a flat ring is one inner ring of all its ranks.
fn ring_shape(group: &LayoutGroup) -> (u32, u32) {
    let d = group.ranks.len() as u32;
    let inner = group.inner_ring;
    if inner >= 1 && inner < d && d.is_multiple_of(inner) {
        (d / inner, inner)
    } else {
        (1, d.max(1))
    }
}

/// The hops along a group's (inner) rings: each rank to the next of its ring.
fn ring_hops(group: &LayoutGroup) -> impl Iterator<Item = (u32, u32)> + '_ {
    let (_, inner) = ring_shape(group);
    let inner = inner as usize;
    let ranks = &group.ranks;
    (0..ranks.len()).filter(move |_| inner > 1).map(move |p| {
        let base = p - p % inner;
        (ranks[p], ranks[base + (p - base + 1) % inner])
    })
}

/// The hops between the inner rings of a hierarchical group: each rank to the
/// rank at its place in the next inner ring. None for a flat ring.
fn outer_hops(group: &LayoutGroup) -> impl Iterator<Item = (u32, u32)> + '_ {
    let (outer, inner) = ring_shape(group);
    let d = group.ranks.len();
    let ranks = &group.ranks;
    (0..d)
        .filter(move |_| outer > 1)
        .map(move |p| (ranks[p], ranks[(p + inner as usize) % d]))
}

/// Tokens of the `position`-th sequence of a group held by each of its ranks.
///
/// Counted in closed form (no ranges are built): ring position i holds chunks
/// j and 2d−1−j, j = (i + position) mod d, of the chunks
/// [`zigzag_chunk_start`] cuts, as [`group_zigzag`] lays them out.
fn shard_tokens(length: u64, degree: u32, position: usize) -> impl Iterator<Item = u64> {
    let d = u64::from(degree.max(1));
    let chunk = move |c: u64| {
        zigzag_chunk_start(length, degree, c + 1) - zigzag_chunk_start(length, degree, c)
    };
    (0..d).map(move |i| {
        let j = (i + position as u64) % d;
        chunk(j) + chunk(2 * d - 1 - j)
    })
}

/// Integer split of `total` proportional to `weights` with no part above its
/// cap (water-filling: parts that would pass their cap are held at it and the
/// rest is shared by the others). If the caps cannot hold `total`, the excess is
/// shared by weight on top of them.
pub fn capped_proportional_split(total: u64, weights: &[f64], caps: &[u64]) -> Vec<u64> {
    let n = weights.len();
    let mut parts = vec![0u64; n];
    let mut open: Vec<usize> = (0..n).filter(|i| weights[*i] > 0.0).collect();
    let mut left = total;
    loop {
        let share = proportional_split(left, &open.iter().map(|i| weights[*i]).collect::<Vec<_>>());
        let over: Vec<usize> = open
            .iter()
            .zip(&share)
            .filter(|(i, s)| **s > caps[**i] - parts[**i])
            .map(|(i, _)| *i)
            .collect();
        if over.is_empty() {
            for (i, s) in open.iter().zip(share) {
                parts[*i] += s;
            }
            return parts;
        }
        for i in &over {
            let room = caps[*i] - parts[*i];
            parts[*i] += room;
            left -= room;
        }
        open.retain(|i| !over.contains(i));
        if open.is_empty() {
            // Everyone is at their cap: share what is left by weight.
            let extra = proportional_split(left, weights);
            for (p, e) in parts.iter_mut().zip(extra) {
                *p += e;
            }
            return parts;
        }
    }
}

/// Tokens each rank can hold ([`CostModel::token_capacity`]), found once
/// for every run of ranks with the same GPU (a search with StreamBP).
pub fn rank_capacities(cost: &CostModel, topo: &Topology) -> Vec<u64> {
    let mut last: Option<(&crate::cluster::GpuModel, u64)> = None;
    (0..topo.world())
        .map(|r| {
            let gpu = topo.gpu_of(r);
            match last {
                Some((seen, capacity)) if std::ptr::eq(seen, gpu) || seen == gpu => capacity,
                _ => {
                    let capacity = cost.token_capacity(gpu, topo.world());
                    last = Some((gpu, capacity));
                    capacity
                }
            }
        })
        .collect()
}

/// The remap of one micro-batch: linear layout (proportional to each rank's
/// GPU speed, within what its memory holds) and the transfers from the
/// attention layout, matched inside nodes first and then between neighbouring
/// nodes.
fn plan_remap(ctx: &PlanContext, cost: &CostModel, index: u32, attention: &[u64]) -> RemapPlan {
    let topo = &ctx.topology;
    let total: u64 = attention.iter().sum();
    let speeds: Vec<f64> = (0..topo.world())
        .map(|r| topo.gpu_of(r).peak_bf16_tflops)
        .collect();
    let caps = rank_capacities(cost, topo);
    let linear = capped_proportional_split(total, &speeds, &caps);
    let mut surplus: Vec<(u32, u64)> = Vec::new();
    let mut deficit: Vec<(u32, u64)> = Vec::new();
    for r in 0..topo.world() {
        let (a, l) = (attention[r as usize], linear[r as usize]);
        if a > l {
            surplus.push((r, a - l));
        } else if l > a {
            deficit.push((r, l - a));
        }
    }
    let mut sends = Vec::new();
    // Inside each node first, then across nodes in rank order.
    for same_node_only in [true, false] {
        for s in surplus.iter_mut() {
            for d in deficit.iter_mut() {
                if s.1 == 0 {
                    break;
                }
                if d.1 == 0 || (same_node_only && !topo.same_node(s.0, d.0)) {
                    continue;
                }
                let tokens = s.1.min(d.1);
                s.1 -= tokens;
                d.1 -= tokens;
                sends.push(Transfer {
                    from: s.0,
                    to: d.0,
                    tokens,
                });
            }
        }
    }
    RemapPlan {
        micro_batch: index,
        linear_tokens: linear,
        sends,
    }
}

/// Where a micro-batch's tokens sit in the attention layout.
struct AttentionTokens {
    /// Tokens each rank holds.
    attention: Vec<u64>,
    /// Tokens whose activations are offloaded to host memory, per rank (a
    /// fraction of them counts: the memory they no longer take).
    offloaded: Vec<f64>,
    /// Each group's tokens on each of its ranks, in ring order.
    shares: Vec<Vec<u64>>,
}

impl AttentionTokens {
    /// Rank `r`'s tokens in the linear layout (the remap's when there is
    /// one), and the tokens whose activations it keeps in the linear and the
    /// attention layout (offloaded ones not counted), what
    /// [`CostModel::rank_memory_bytes`] takes.
    fn held(&self, remap: Option<&RemapPlan>, r: usize) -> (u64, f64, f64) {
        let linear = remap.map_or(self.attention[r], |p| p.linear_tokens[r]);
        let kept = |tokens: u64| (tokens as f64 - self.offloaded[r]).max(0.0);
        (linear, kept(linear), kept(self.attention[r]))
    }
}

fn attention_tokens(ctx: &PlanContext, lengths: &[u64], mb: &LayoutMicroBatch) -> AttentionTokens {
    let world = ctx.topology.world() as usize;
    let mut attention = vec![0u64; world];
    let mut offloaded = vec![0.0f64; world];
    let mut shares: Vec<Vec<u64>> = Vec::with_capacity(mb.groups.len());
    for group in &mb.groups {
        let d = group.ranks.len() as u32;
        let mut per_rank = vec![0u64; group.ranks.len()];
        for (position, &seq) in group.sequences.iter().enumerate() {
            for (i, t) in shard_tokens(lengths[seq], d, position).enumerate() {
                per_rank[i] += t;
            }
        }
        let freed = 1.0 - ctx.cost.offload_kept(group.offload);
        for (i, &r) in group.ranks.iter().enumerate() {
            attention[r as usize] += per_rank[i];
            offloaded[r as usize] += per_rank[i] as f64 * freed;
        }
        shares.push(per_rank);
    }
    AttentionTokens {
        attention,
        offloaded,
        shares,
    }
}

/// The tokens whose activations each rank keeps in micro-batch `mb` when
/// it backpropagates as `cost` prices (linear layout, attention layout),
/// what [`CostModel::rank_memory_bytes`] takes: offloaded ones not counted;
/// with a remap, its linear layout.
pub fn micro_batch_tokens(
    ctx: &PlanContext,
    cost: &CostModel,
    lengths: &[u64],
    mb: &LayoutMicroBatch,
) -> Vec<(f64, f64)> {
    let held = attention_tokens(ctx, lengths, mb);
    let remap = mb.remap.then(|| plan_remap(ctx, cost, 0, &held.attention));
    (0..held.attention.len())
        .map(|r| {
            let (_, linear, attention) = held.held(remap.as_ref(), r);
            (linear, attention)
        })
        .collect()
}

/// Simulates a layout. Deterministic: the same inputs give the same outcome.
/// Prices only: the outcome lists no routes (see [`simulate_with_routes`]).
pub fn simulate(ctx: &PlanContext, lengths: &[u64], layout: &Layout) -> Outcome {
    simulate_inner(ctx, lengths, layout, false)
}

/// [`simulate`], also listing every inter-node transfer and its NICs, as the
/// step plan document does.
pub fn simulate_with_routes(ctx: &PlanContext, lengths: &[u64], layout: &Layout) -> Outcome {
    simulate_inner(ctx, lengths, layout, true)
}

fn simulate_inner(
    ctx: &PlanContext,
    lengths: &[u64],
    layout: &Layout,
    with_routes: bool,
) -> Outcome {
    let topo = &ctx.topology;
    // Plain and streamed prices: each group pays its own backprop's.
    let priced = [
        ctx.cost.with_streaming(false),
        ctx.cost.with_streaming(true),
    ];
    let cost_of = |streamed: bool| &priced[usize::from(streamed)];
    let world = topo.world() as usize;
    let mut ranks = vec![RankOutcome::default(); world];
    let mut avail = vec![0.0f64; world];
    let mut routes = Vec::new();
    let mut remaps = Vec::new();
    let mut fits = true;
    let mut stream_chunks_of = Vec::with_capacity(layout.micro_batches.len());

    for (index, mb) in layout.micro_batches.iter().enumerate() {
        let index = index as u32;
        let rank_streams = ranks_streaming(&ctx.cost, mb, topo.world());
        let micro_batch_cost = cost_of(rank_streams.iter().any(|s| *s));
        let held = attention_tokens(ctx, lengths, mb);
        let (attention, shares) = (&held.attention, &held.shares);

        // Ring flows that cross nodes, and the NIC load they make.
        let mut load = NicLoad::default();
        // Bytes per rank of each group's hops: along its (inner) rings, and
        // between inner rings when it is hierarchical.
        let mut hop_bytes: Vec<(f64, f64)> = Vec::with_capacity(mb.groups.len());
        for group in &mb.groups {
            let cost = cost_of(group.streams(&ctx.cost));
            let d = group.ranks.len() as u32;
            let tokens: f64 = group.sequences.iter().map(|s| lengths[*s] as f64).sum();
            let (outer, inner) = ring_shape(group);
            let bytes = (
                cost.ring_bytes_per_rank(tokens, d, outer * (inner - 1)),
                cost.ring_bytes_per_rank(tokens, d, outer - 1),
            );
            hop_bytes.push(bytes);
            for (a, b) in ring_hops(group) {
                if !topo.same_node(a, b) {
                    load.add(topo, layout.routing, a, b, bytes.0);
                }
            }
            for (a, b) in outer_hops(group) {
                if !topo.same_node(a, b) {
                    load.add(topo, layout.routing, a, b, bytes.1);
                }
            }
        }
        // Bandwidth a transfer of `bytes` from `a` to `b` gets on the NICs it
        // shares with this micro-batch's other ring flows; listed as a route.
        let network_hop = |routes: &mut Vec<NicRoute>, a: u32, b: u32, bytes: f64| {
            let busy = load.busy_s(topo, layout.routing, a, b);
            if with_routes {
                routes.push(NicRoute {
                    micro_batch: index,
                    from_rank: a,
                    to_rank: b,
                    from_node: topo.nodes[topo.node_of(a)].name.clone(),
                    to_node: topo.nodes[topo.node_of(b)].name.clone(),
                    legs: route_legs(topo, layout.routing, a),
                    bytes,
                    gbytes_per_s: bytes / busy.max(1e-12) / 1e9,
                });
            }
            if busy > 0.0 {
                bytes / busy
            } else {
                f64::INFINITY
            }
        };
        let hop_bandwidth = |routes: &mut Vec<NicRoute>, a: u32, b: u32, bytes: f64| {
            if topo.same_node(a, b) {
                topo.nvlink_bytes_per_s(topo.node_of(a))
            } else {
                network_hop(routes, a, b, bytes)
            }
        };

        // Memory and the remap.
        let remap = mb
            .remap
            .then(|| plan_remap(ctx, micro_batch_cost, index, attention));
        let mut kept = vec![(0.0, 0.0); world];
        let mut linear_of = vec![0u64; world];
        for r in 0..world {
            let cost = cost_of(rank_streams[r]);
            let (linear, kept_linear, kept_attention) = held.held(remap.as_ref(), r);
            kept[r] = (kept_linear, kept_attention);
            linear_of[r] = linear;
            let bytes = cost.rank_memory_bytes(kept_linear, kept_attention, topo.world());
            let rank = &mut ranks[r];
            rank.peak_memory_bytes = rank.peak_memory_bytes.max(bytes);
            rank.attention_tokens += attention[r];
            rank.linear_tokens += linear;
            if bytes > cost.rank_budget_bytes(topo.gpu_of(r as u32), topo.world()) {
                fits = false;
            }
        }

        if let Some(remap) = &remap {
            let cost = micro_batch_cost;
            let start = avail.iter().copied().fold(0.0, f64::max);
            let per_token = cost.remap_bytes_per_token();
            let mut remap_load = NicLoad::default();
            let mut intra = vec![0.0f64; world];
            for t in &remap.sends {
                let bytes = t.tokens as f64 * per_token;
                if topo.same_node(t.from, t.to) {
                    intra[t.from as usize] += bytes;
                    intra[t.to as usize] += bytes;
                } else {
                    remap_load.add(topo, layout.routing, t.from, t.to, bytes);
                }
            }
            let mut inter = vec![0.0f64; world];
            for t in remap.sends.iter().filter(|t| !topo.same_node(t.from, t.to)) {
                let busy = remap_load.busy_s(topo, layout.routing, t.from, t.to)
                    / cost.coefficients.link_efficiency;
                inter[t.from as usize] = inter[t.from as usize].max(busy);
                inter[t.to as usize] = inter[t.to as usize].max(busy);
                if !with_routes {
                    continue;
                }
                routes.push(NicRoute {
                    micro_batch: index,
                    from_rank: t.from,
                    to_rank: t.to,
                    from_node: topo.nodes[topo.node_of(t.from)].name.clone(),
                    to_node: topo.nodes[topo.node_of(t.to)].name.clone(),
                    legs: route_legs(topo, layout.routing, t.from),
                    bytes: t.tokens as f64 * per_token,
                    gbytes_per_s: t.tokens as f64 * per_token / busy.max(1e-12) / 1e9,
                });
            }
            for r in 0..world {
                let gpu = topo.gpu_of(r as u32);
                let linear = cost.linear_time(remap.linear_tokens[r] as f64, gpu);
                let nvlink = topo.nvlink_bytes_per_s(topo.node_of(r as u32))
                    * cost.coefficients.link_efficiency;
                let comm = intra[r] / nvlink + inter[r];
                if with_routes {
                    ranks[r].timeline.push(crate::plan::TimeSpan {
                        micro_batch: index,
                        start_s: start,
                        end_s: start + linear + comm,
                        exposed_s: comm,
                        hidden_s: 0.0,
                        group: None,
                    });
                }
                avail[r] = start + linear + comm;
                ranks[r].compute_s += linear;
                ranks[r].exposed_comm_s += comm;
            }
        }

        for (g, group) in mb.groups.iter().enumerate() {
            let cost = cost_of(group.streams(&ctx.cost));
            let d = group.ranks.len() as u32;
            let start = group
                .ranks
                .iter()
                .map(|r| avail[*r as usize])
                .fold(0.0, f64::max);
            // The slowest hop sets the pace: of the (inner) rings, and of the
            // hops between inner rings when the ring is hierarchical.
            let (outer, inner) = ring_shape(group);
            let (intra, inter) = if d > 1 {
                let (inner_bytes, outer_bytes) = hop_bytes[g];
                let intra = ring_hops(group)
                    .map(|(a, b)| hop_bandwidth(&mut routes, a, b, inner_bytes))
                    .fold(f64::INFINITY, f64::min);
                let inter = outer_hops(group)
                    .map(|(a, b)| hop_bandwidth(&mut routes, a, b, outer_bytes))
                    .fold(f64::INFINITY, f64::min);
                (intra, inter)
            } else {
                (f64::INFINITY, f64::INFINITY)
            };
            let slowest = group
                .ranks
                .iter()
                .min_by(|a, b| {
                    topo.gpu_of(**a)
                        .peak_bf16_tflops
                        .total_cmp(&topo.gpu_of(**b).peak_bf16_tflops)
                })
                .map(|r| topo.gpu_of(*r).clone());
            let Some(gpu) = slowest else { continue };
            let docs: Vec<f64> = group.sequences.iter().map(|s| lengths[*s] as f64).collect();
            let ring = cost.hierarchical_ring_time(&docs, outer, inner, intra, inter, &gpu);
            let linear = if mb.remap {
                0.0
            } else {
                shares[g]
                    .iter()
                    .zip(&group.ranks)
                    .map(|(t, r)| cost.linear_time(*t as f64, topo.gpu_of(*r)))
                    .fold(0.0, f64::max)
            };
            // Offloaded activations go to the host during the forward and come
            // back during the backward; what compute does not hide waits.
            let (offload_s, offload_hidden_s) = if group.offload > 0.0 {
                let most = shares[g].iter().copied().max().unwrap_or(0) as f64;
                let transfer = cost.offload_transfer_time(most, group.offload, &gpu);
                let compute = ring.compute_s + linear;
                let forward = compute * cost.forward_share();
                (
                    (transfer - forward).max(0.0) + (transfer - (compute - forward)).max(0.0),
                    transfer.min(forward) + transfer.min(compute - forward),
                )
            } else {
                (0.0, 0.0)
            };
            let duration = ring.total_s + linear + offload_s;
            for &r in &group.ranks {
                let r = r as usize;
                if with_routes {
                    ranks[r].timeline.push(crate::plan::TimeSpan {
                        micro_batch: index,
                        start_s: start,
                        end_s: start + duration,
                        exposed_s: ring.total_s - ring.compute_s + offload_s,
                        hidden_s: ring.hidden_s + offload_hidden_s,
                        group: Some(g as u32),
                    });
                }
                avail[r] = start + duration;
                ranks[r].compute_s += ring.compute_s + linear;
                ranks[r].exposed_comm_s += ring.total_s - ring.compute_s + offload_s;
            }
        }

        // The streamed ranks' chunks, and the time their fixed costs add.
        let chunks = stream_chunks(cost_of(true), mb, &rank_streams, &kept);
        for (r, &chunk) in chunks.iter().enumerate().filter(|(_, c)| **c > 0) {
            let extra = cost_of(true).stream_chunk_overhead_s(linear_of[r] as f64, chunk);
            avail[r] += extra;
            ranks[r].compute_s += extra;
            if let Some(span) = ranks[r]
                .timeline
                .last_mut()
                .filter(|s| s.micro_batch == index)
            {
                span.end_s += extra;
            }
        }
        stream_chunks_of.push(chunks);

        if remap.is_some() {
            let end = avail.iter().copied().fold(0.0, f64::max);
            avail.iter_mut().for_each(|a| *a = end);
        }
        if let Some(remap) = remap {
            remaps.push(remap);
        }
    }
    for (r, rank) in ranks.iter_mut().enumerate() {
        rank.finish_s = avail[r];
    }
    Outcome {
        step_time_s: avail.iter().copied().fold(0.0, f64::max),
        ranks,
        fits_in_memory: fits,
        routes,
        remaps,
        stream_chunks: stream_chunks_of,
    }
}

/// The StreamBP chunk of each rank of micro-batch `mb` (0 where it runs
/// plain backprop), from the tokens whose activations it keeps (linear,
/// attention): [`CostModel::stream_chunk`], shared by ranks that share a
/// group (a rank runs all its groups of a micro-batch in one pass) and by
/// every rank of a remapped micro-batch (its all-to-alls span them all):
/// the least of their chunks that are shorter than their rank's tokens (a
/// rank whose chunk holds all its tokens takes any longer one alike), else
/// the longest.
pub fn stream_chunks(
    streamed: &CostModel,
    mb: &LayoutMicroBatch,
    rank_streams: &[bool],
    kept: &[(f64, f64)],
) -> Vec<u64> {
    let world = rank_streams.len();
    if !rank_streams.iter().any(|s| *s) {
        return vec![0; world];
    }
    let own: Vec<u64> = (0..world)
        .map(|r| match rank_streams[r] {
            true => streamed.stream_chunk(kept[r].0, kept[r].1),
            false => 0,
        })
        .collect();
    // (least that binds, longest) over a set of ranks.
    let binds = |r: usize| (own[r] as f64) < kept[r].0;
    let join = |(least, longest): (u64, u64), r: usize| {
        (
            if binds(r) { least.min(own[r]) } else { least },
            longest.max(own[r]),
        )
    };
    let choose = |(least, longest): (u64, u64)| if least < u64::MAX { least } else { longest };
    if mb.remap {
        let shared = choose((0..world).filter(|r| own[*r] > 0).fold((u64::MAX, 0), join));
        return own
            .iter()
            .map(|c| if *c > 0 { shared } else { 0 })
            .collect();
    }
    // Ranks take their groups' set.
    let sets = joined_groups(mb);
    let mut set_of: Vec<Option<usize>> = vec![None; world];
    for (group, &set) in mb.groups.iter().zip(&sets) {
        for &r in &group.ranks {
            set_of[r as usize] = Some(set);
        }
    }
    let mut shared = vec![(u64::MAX, 0); mb.groups.len()];
    for r in (0..world).filter(|r| own[*r] > 0) {
        if let Some(set) = set_of[r] {
            shared[set] = join(shared[set], r);
        }
    }
    (0..world)
        .map(|r| match (own[r], set_of[r]) {
            (0, _) | (_, None) => 0,
            (_, Some(set)) => choose(shared[set]),
        })
        .collect()
}

/// The step plan document of a layout.
pub fn build_plan(ctx: &PlanContext, lengths: &[u64], layout: &Layout) -> StepPlan {
    let topo = &ctx.topology;
    let mut outcome = simulate_with_routes(ctx, lengths, layout);
    let mut sequences: Vec<Option<SequencePlan>> = vec![None; lengths.len()];
    let mut micro_batches = Vec::with_capacity(layout.micro_batches.len());
    for (index, mb) in layout.micro_batches.iter().enumerate() {
        let mut groups = Vec::with_capacity(mb.groups.len());
        for group in &mb.groups {
            let d = group.ranks.len() as u32;
            for (position, &seq) in group.sequences.iter().enumerate() {
                let shards = group_zigzag(lengths[seq], d, position)
                    .into_iter()
                    .zip(&group.ranks)
                    .map(|(ranges, rank)| Shard {
                        rank: *rank,
                        ranges: ranges.into_iter().filter(|r| r[0] < r[1]).collect(),
                    })
                    .collect();
                sequences[seq] = Some(SequencePlan {
                    id: seq as u64,
                    length: lengths[seq],
                    micro_batch: index as u32,
                    degree: d,
                    shards,
                });
            }
            groups.push(crate::plan::Group {
                ranks: group.ranks.clone(),
                sequences: group.sequences.iter().map(|s| *s as u64).collect(),
                inner_ring: group.inner_ring,
                offload: group.offload,
                stream_bp_chunk: if group.streams(&ctx.cost) {
                    group
                        .ranks
                        .first()
                        .map_or(0, |r| outcome.stream_chunks[index][*r as usize])
                } else {
                    0
                },
            });
        }
        micro_batches.push(MicroBatch {
            index: index as u32,
            groups,
            remap: mb.remap,
        });
    }
    let predicted = Prediction {
        step_time_s: outcome.step_time_s,
        lower_bound_s: lower_bound(ctx, lengths),
        max_over_mean: outcome.max_over_mean(),
        comm_fraction: outcome.comm_fraction(),
        peak_memory_gib: outcome.peak_memory_gib(),
        fits_in_memory: outcome.fits_in_memory,
    };
    let ranks = outcome
        .ranks
        .iter_mut()
        .enumerate()
        .map(|(r, o)| RankPrediction {
            rank: r as u32,
            node: topo.nodes[topo.node_of(r as u32)].name.clone(),
            rack: topo.nodes[topo.node_of(r as u32)].rack.clone(),
            time_s: o.finish_s,
            compute_s: o.compute_s,
            exposed_comm_s: o.exposed_comm_s,
            memory_gib: gib(o.peak_memory_bytes),
            attention_tokens: o.attention_tokens,
            linear_tokens: o.linear_tokens,
            timeline: std::mem::take(&mut o.timeline),
        })
        .collect();
    StepPlan {
        version: STEP_PLAN_VERSION,
        strategy: layout.strategy.clone(),
        world_size: topo.world(),
        micro_batches,
        // A sequence missing from every group keeps an empty shard list, which
        // `StepPlan::check` reports.
        sequences: sequences
            .into_iter()
            .enumerate()
            .map(|(i, s)| {
                s.unwrap_or(SequencePlan {
                    id: i as u64,
                    length: lengths[i],
                    micro_batch: 0,
                    degree: 0,
                    shards: Vec::new(),
                })
            })
            .collect(),
        ranks,
        remap: outcome.remaps,
        routes: outcome.routes,
        predicted,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::cluster::parse_cluster;
    use crate::cost::{CostCoefficients, CostModel};
    use crate::model::ModelSpec;
    use crate::plan::PlanError;

    pub(crate) fn context(cluster: &str, model: &str) -> PlanContext {
        PlanContext {
            limits: Default::default(),
            topology: Topology::new(&parse_cluster(cluster).unwrap()).unwrap(),
            cost: CostModel::new(
                ModelSpec::preset(model).unwrap(),
                CostCoefficients::default(),
            ),
        }
    }

    #[test]
    fn shard_tokens_counts_what_group_zigzag_lays_out() {
        for length in [0u64, 1, 7, 40, 61, 1000, 12_345] {
            for degree in 1..=9u32 {
                for position in 0..5 {
                    let counted: Vec<u64> = shard_tokens(length, degree, position).collect();
                    let laid: Vec<u64> = group_zigzag(length, degree, position)
                        .iter()
                        .map(|ranges| ranges.iter().map(|r| r[1] - r[0]).sum())
                        .collect();
                    assert_eq!(
                        counted, laid,
                        "{length} tokens, degree {degree}, position {position}"
                    );
                }
            }
        }
    }

    #[test]
    fn proportional_split_adds_up() {
        assert_eq!(proportional_split(10, &[1.0, 1.0, 1.0]), vec![4, 3, 3]);
        assert_eq!(proportional_split(7, &[3.0, 1.0]).iter().sum::<u64>(), 7);
        assert_eq!(proportional_split(5, &[]), Vec::<u64>::new());
        // Caps hold: the fast rank is capped and the rest flows to the others.
        let parts = capped_proportional_split(100, &[3.0, 1.0, 1.0], &[40, 100, 100]);
        assert_eq!(parts, vec![40, 30, 30]);
        // Caps too small: the excess is shared by weight on top of them.
        let parts = capped_proportional_split(100, &[1.0, 1.0], &[10, 10]);
        assert_eq!(parts.iter().sum::<u64>(), 100);
    }

    #[test]
    fn one_sequence_per_rank_is_pure_compute_and_above_the_lower_bound() {
        let ctx = context("1x8", "llama-7b");
        let lengths = vec![4096u64; 8];
        let layout = Layout {
            strategy: "test".into(),
            micro_batches: vec![LayoutMicroBatch {
                groups: (0..8)
                    .map(|r| LayoutGroup::flat(vec![r], vec![r as usize]))
                    .collect(),
                remap: false,
            }],
            routing: Routing::ClosestNic,
        };
        let out = simulate(&ctx, &lengths, &layout);
        let lb = lower_bound(&ctx, &lengths);
        assert!(
            (out.step_time_s - lb).abs() / lb < 1e-9,
            "{} vs {lb}",
            out.step_time_s
        );
        assert_eq!(out.comm_fraction(), 0.0);
        assert!((out.max_over_mean() - 1.0).abs() < 1e-12);
        let plan = build_plan(&ctx, &lengths, &layout);
        plan.check().unwrap();
    }

    /// A streamed rank backpropagates in the largest chunk that costs it no
    /// memory, the plan records it, and ranks that share a group, or a
    /// remapped micro-batch, share it.
    #[test]
    fn streamed_ranks_take_the_largest_chunk_that_costs_no_memory() {
        let mut ctx = context("1x8", "llama-7b");
        ctx.cost.coefficients.streambp = crate::cost::StreamBp::Always;
        ctx.cost.coefficients.streambp_chunk = 256;
        // A ring of two ranks over 16K tokens, one of four over 160K (40K a
        // rank), and a rank of 2K.
        let lengths = vec![16_384u64, 163_840, 2_048];
        let layout = Layout {
            strategy: "test".into(),
            micro_batches: vec![LayoutMicroBatch {
                groups: vec![
                    LayoutGroup::flat(vec![0, 1], vec![0]),
                    LayoutGroup::flat(vec![2, 3, 4, 5], vec![1]),
                    LayoutGroup::flat(vec![6], vec![2]),
                ],
                remap: false,
            }],
            routing: Routing::ClosestNic,
        };
        let out = simulate(&ctx, &lengths, &layout);
        assert!(out.fits_in_memory);
        let chunks = &out.stream_chunks[0];
        let streamed = ctx.cost.with_streaming(true);
        let own = |tokens: f64| streamed.stream_chunk(tokens, tokens);
        // Each rank what costs it no memory, the ranks of a ring alike.
        assert_eq!(&chunks[0..2], [own(8192.0), own(8192.0)]);
        assert!(chunks[2..6].iter().all(|c| *c == own(40_960.0)));
        assert!(chunks[2] > 256, "the long ring's chunk grows: {chunks:?}");
        assert_eq!(chunks[6], own(2048.0));
        assert_eq!(chunks[7], 0, "a rank with nothing runs no chunks");
        let plan = build_plan(&ctx, &lengths, &layout);
        plan.check().unwrap();
        for group in &plan.micro_batches[0].groups {
            assert_eq!(group.stream_bp_chunk, chunks[group.ranks[0] as usize]);
        }
        // The chunks' fixed costs are part of the step's time.
        let mut costlier = ctx.clone();
        costlier.cost.coefficients.streambp_chunk_overhead_s *= 1000.0;
        let slow = simulate(&costlier, &lengths, &layout);
        assert!(slow.step_time_s > out.step_time_s);
        // No chunk taken needs more memory than the job's, which the
        // simulator checked.
        for (r, tokens) in [(0, 8192.0), (2, 40_960.0), (6, 2048.0)] {
            assert!(
                streamed.streamed_step_bytes_in(tokens, tokens, chunks[r])
                    <= streamed.streamed_step_bytes_in(tokens, tokens, 256),
                "rank {r}: {chunks:?}"
            );
        }

        // Ranks that share a chunk: a rank whose chunk holds all its tokens
        // does not hold back one whose chunk binds, so a short ring joined to
        // the long one by a third group takes the long ring's chunk.
        let mut wide = ctx.clone();
        wide.cost.coefficients.streambp_chunk = 1024;
        let short = vec![163_840u64, 512, 512];
        let joined = Layout {
            micro_batches: vec![LayoutMicroBatch {
                groups: vec![
                    LayoutGroup::flat(vec![2, 3, 4, 5], vec![0]),
                    LayoutGroup::flat(vec![0, 1], vec![1]),
                    LayoutGroup::flat(vec![1, 2], vec![2]),
                ],
                remap: false,
            }],
            ..layout.clone()
        };
        let out = simulate(&wide, &short, &joined);
        let chunks = &out.stream_chunks[0];
        let long_rank = 40_960.0 + 256.0;
        let own = wide
            .cost
            .with_streaming(true)
            .stream_chunk(long_rank, long_rank);
        assert!(own > 1024, "{own}");
        assert!(chunks[0..6].iter().all(|c| *c == own), "{chunks:?}");
        build_plan(&wide, &short, &joined).check().unwrap();
        // No rank's chunk binds (each holds all its rank's tokens): the
        // longest of theirs.
        let tiny = Layout {
            micro_batches: vec![LayoutMicroBatch {
                groups: vec![
                    LayoutGroup::flat(vec![0, 1], vec![1]),
                    LayoutGroup::flat(vec![1, 2], vec![2]),
                ],
                remap: false,
            }],
            ..layout.clone()
        };
        let out = simulate(&wide, &[0, 512, 512], &tiny);
        assert_eq!(out.stream_chunks[0][0..3], [1024, 1024, 1024]);
        // A remapped micro-batch: one chunk on every rank.
        let remapped = Layout {
            micro_batches: vec![LayoutMicroBatch {
                remap: true,
                ..layout.micro_batches[0].clone()
            }],
            ..layout.clone()
        };
        let out = simulate(&ctx, &lengths, &remapped);
        let chunks = &out.stream_chunks[0];
        assert!(
            chunks.iter().all(|c| *c == chunks[0] && *c >= 256),
            "{chunks:?}"
        );
        build_plan(&ctx, &lengths, &remapped).check().unwrap();
    }

    #[test]
    fn the_longest_sequences_exposed_transfers_raise_the_work_bound() {
        // One 64K sequence among a hundred short ones on 64 GPUs: to end by
        // the work or its own bound it needs so many ranks that its ring
        // cannot hide its transfers, and the ranks' time adds up past both.
        let ctx = context("8x8:nics=8", "llama-7b");
        let mut lengths = vec![65_536u64];
        lengths.extend(std::iter::repeat_n(2_048u64, 100));
        let by_work = work_bound(&ctx, &lengths);
        let by_sequence = sequence_bound(&ctx, &lengths, 65_536).0;
        let bound = lower_bound(&ctx, &lengths);
        assert!(
            bound > by_work.max(by_sequence) * 1.005,
            "{bound} {by_work} {by_sequence}"
        );
        // And no strategy beats it.
        for strategy in crate::Strategy::ALL {
            let plan = crate::plan_step(strategy, &ctx, &lengths, None).unwrap();
            assert!(plan.predicted.step_time_s >= bound, "{strategy:?}");
        }
        // Where no sequence needs a ring to end in time, the work decides.
        let short = vec![2_048u64; 64];
        assert_eq!(lower_bound(&ctx, &short), work_bound(&ctx, &short));
    }

    #[test]
    fn the_longest_rings_ranks_keep_their_linear_work_or_an_even_share_of_the_batchs() {
        // One NIC per node makes a 32K ring stay inside a node. Without a
        // remap its 8 ranks run its linear modules; with one they run an even
        // share of the whole batch's. Either way more than its own linear
        // work spread over all 16 GPUs, which is what the bound counted before.
        let ctx = context("2x8:nics=1", "llama-7b");
        let mut lengths = vec![32_768u64];
        lengths.extend(std::iter::repeat_n(2_048u64, 20));
        let alone = sequence_bound(&ctx, &[32_768], 32_768).0;
        let (in_batch, degree) = sequence_bound(&ctx, &lengths, 32_768);
        assert_eq!(degree, 8);
        assert!(in_batch > alone * 1.2, "{in_batch} vs {alone}");
        let bound = lower_bound(&ctx, &lengths);
        assert!(bound >= in_batch && bound > work_bound(&ctx, &lengths));
        // No strategy beats it, and weft comes close.
        for strategy in crate::Strategy::ALL {
            let plan = crate::plan_step(strategy, &ctx, &lengths, None).unwrap();
            assert!(plan.predicted.step_time_s >= bound, "{strategy:?}");
            if strategy == crate::Strategy::Weft {
                assert!(plan.predicted.step_time_s < bound * 1.15);
            }
        }
    }

    #[test]
    fn step_latency_that_no_packing_hides_raises_the_work_bound() {
        // Eight 128K sequences and short ones on 64 GPUs whose messages take
        // 1 ms to start (as over TCP): every 128K sequence needs a ring to
        // end in time, and each ring's ranks pay its step latency on top of
        // the work.
        let mut ctx = context("8x8:nics=8", "llama-7b");
        ctx.cost.coefficients.p2p_latency_s = 1e-3;
        let mut lengths = vec![131_072u64; 8];
        lengths.extend(std::iter::repeat_n(2_048u64, 100));
        let mut without = ctx.clone();
        without.cost.coefficients.p2p_latency_s = 0.0;
        let by_work = work_bound(&ctx, &lengths);
        let by_sequence = sequence_bound(&ctx, &lengths, 131_072).0;
        let bound = lower_bound(&ctx, &lengths);
        let bound_without = lower_bound(&without, &lengths);
        assert!(
            bound > by_work.max(by_sequence).max(bound_without) * 1.01,
            "{bound}: work {by_work}, sequence {by_sequence}, without latency {bound_without}"
        );
        for strategy in crate::Strategy::ALL {
            let plan = crate::plan_step(strategy, &ctx, &lengths, None).unwrap();
            assert!(plan.predicted.step_time_s >= bound, "{strategy:?}");
        }
    }

    /// A ring the job's cap keeps narrow can still run plain backprop when
    /// a remap spreads its linear layout over the cluster: the bound does
    /// not price StreamBP for it then.
    #[test]
    fn a_remapped_plain_ring_under_a_cap_does_not_beat_the_bound() {
        let mut ctx = context("1x8", "llama-7b");
        ctx.cost.coefficients.streambp = crate::cost::StreamBp::PerRing;
        ctx.limits.offload_activations = false;
        ctx.limits.max_cp_degree = Some(6);
        let lengths = [48_000u64];
        let layout = Layout {
            strategy: "test".into(),
            micro_batches: vec![LayoutMicroBatch {
                groups: vec![LayoutGroup::flat((0..6).collect(), vec![0])],
                remap: true,
            }],
            routing: Routing::AllNics,
        };
        let outcome = simulate(&ctx, &lengths, &layout);
        assert!(outcome.fits_in_memory, "plain fits with the remap");
        assert!(!must_stream(&ctx, 48_000));
        assert!(outcome.step_time_s >= lower_bound(&ctx, &lengths));
        // One far longer than plain backprop holds on six ranks, even with
        // its linear layout over all eight, must stream.
        assert!(must_stream(&ctx, 400_000));
    }

    #[test]
    fn spreading_inter_node_transfers_over_all_nics_is_never_slower() {
        let ctx = context("2x8:nics=8", "llama-7b");
        let lengths = vec![262_144u64];
        let ring: Vec<u32> = (0..16).collect();
        let layout = |routing| Layout {
            strategy: "test".into(),
            micro_batches: vec![LayoutMicroBatch {
                groups: vec![LayoutGroup::flat(ring.clone(), vec![0])],
                remap: false,
            }],
            routing,
        };
        let closest = simulate(&ctx, &lengths, &layout(Routing::ClosestNic));
        let spread = simulate(&ctx, &lengths, &layout(Routing::AllNics));
        assert!(spread.step_time_s <= closest.step_time_s);
        let plan = build_plan(&ctx, &lengths, &layout(Routing::AllNics));
        plan.check().unwrap();
        // Two inter-node hops (7→8 and 15→0), each over all 8 NICs.
        assert_eq!(plan.routes.len(), 2);
        assert_eq!(plan.routes[0].legs.len(), 8);
    }

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

    #[test]
    fn hierarchical_rings_use_every_nic_and_are_priced_as_a_flat_ring_when_flat() {
        // Two nodes of 8 GPUs, one NIC per GPU, collectives on the closest NIC:
        // a flat ring crosses nodes on two hops, through two NICs; a
        // hierarchical one crosses on all 16, each over its own NIC.
        let ctx = context("2x8:nics=8", "llama-7b");
        let lengths = vec![262_144u64];
        let ring: Vec<u32> = (0..16).collect();
        let layout = |inner_ring| Layout {
            strategy: "test".into(),
            micro_batches: vec![LayoutMicroBatch {
                groups: vec![LayoutGroup {
                    ranks: ring.clone(),
                    sequences: vec![0],
                    inner_ring,
                    offload: 0.0,
                    stream_bp: false,
                }],
                remap: false,
            }],
            routing: Routing::ClosestNic,
        };
        let flat = simulate(&ctx, &lengths, &layout(0));
        let hierarchical = simulate(&ctx, &lengths, &layout(8));
        assert!(
            hierarchical.step_time_s < flat.step_time_s,
            "{} vs {}",
            hierarchical.step_time_s,
            flat.step_time_s
        );
        assert!(hierarchical.step_time_s >= lower_bound(&ctx, &lengths));
        // An inner ring of all 16 ranks is the flat ring.
        let whole = simulate(&ctx, &lengths, &layout(16));
        assert_eq!(whole.step_time_s, flat.step_time_s);
        let plan = build_plan(&ctx, &lengths, &layout(8));
        plan.check().unwrap();
        assert_eq!(plan.micro_batches[0].groups[0].inner_ring, 8);
        assert_eq!(plan.routes.len(), 16);
        let nics: std::collections::BTreeSet<&str> =
            plan.routes.iter().map(|r| r.legs[0].nic.as_str()).collect();
        assert_eq!(nics.len(), 8, "every NIC of a node carries its rail");
        // An inner ring that does not divide the group is refused by the check.
        let mut broken = plan.clone();
        broken.micro_batches[0].groups[0].inner_ring = 5;
        assert!(matches!(broken.check(), Err(PlanError::InnerRing { .. })));
    }

    #[test]
    fn remap_balances_linear_tokens_and_keeps_them_all() {
        let ctx = context("2x4", "llama-7b");
        let lengths = vec![10_000u64, 100, 100, 100];
        let layout = Layout {
            strategy: "test".into(),
            micro_batches: vec![LayoutMicroBatch {
                groups: vec![
                    LayoutGroup::flat(vec![0, 1], vec![0]),
                    LayoutGroup::flat(vec![2], vec![1, 2, 3]),
                ],
                remap: true,
            }],
            routing: Routing::AllNics,
        };
        let plan = build_plan(&ctx, &lengths, &layout);
        plan.check().unwrap();
        let remap = &plan.remap[0];
        assert_eq!(remap.linear_tokens.iter().sum::<u64>(), 10_300);
        let max = *remap.linear_tokens.iter().max().unwrap();
        let min = *remap.linear_tokens.iter().min().unwrap();
        assert!(max - min <= 1);
        // Tokens leave rank 0 and 1 and go to the idle ranks.
        let sent: u64 = remap
            .sends
            .iter()
            .filter(|t| t.from <= 1)
            .map(|t| t.tokens)
            .sum();
        assert_eq!(sent, 2 * (5_000 - 1_288));
    }
}
