//! The lower bound on a batch's step time that every plan is compared
//! with: no plan that fits in memory beats it (property-tested in
//! `planner/tests/`).

use crate::cost::CostModel;
use crate::layout::PlanContext;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{Layout, LayoutGroup, LayoutMicroBatch, Routing};
    use crate::sim::simulate;
    use crate::sim::tests::context;

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
}
