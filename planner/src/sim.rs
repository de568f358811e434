//! The simulator: what a layout costs on a cluster, under one cost model, so that
//! every strategy is judged the same way. The layout it prices is in
//! [`crate::layout`], the bound every plan is compared with in
//! [`crate::bound`], the step plan document built from its outcome in
//! [`crate::step_plan`].
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
use crate::layout::{
    Layout, LayoutGroup, LayoutMicroBatch, PlanContext, Routing, joined_groups, ranks_streaming,
};
use crate::plan::{NicRoute, RemapPlan, RouteLeg, Transfer, zigzag_chunk_start};
use crate::topology::Topology;

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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::bound::lower_bound;
    use crate::cluster::parse_cluster;
    use crate::cost::{CostCoefficients, CostModel};
    use crate::model::ModelSpec;
    use crate::plan::PlanError;
    use crate::plan::group_zigzag;
    use crate::step_plan::build_plan;

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
