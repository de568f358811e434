//! The scheduling toolkit the strategies share: how many tokens a rank
//! holds, pieces of work and their estimated cost, best-fit packing, list
//! scheduling onto the least-loaded ranks (with widening into ranks other
//! gangs free early), hierarchical placement, and micro-batches that end in
//! a remap.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};

use crate::error::PlanningError;

/// The planner's threads; 0 until set: every core.
static THREADS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// The planner's one pool of threads, made when it first plans (`None`
/// where no thread could be started: it then plans on the caller's).
static POOL: std::sync::OnceLock<Option<rayon::ThreadPool>> = std::sync::OnceLock::new();

/// Sets how many threads the planner's pool has, before it first plans: a
/// trainer's rank gives it its share of the machine's cores, which
/// libtorch's threads use too, rather than every core for every rank.
/// Whether it was in time (the pool is made once).
pub fn set_threads(threads: usize) -> bool {
    THREADS.store(threads.max(1), std::sync::atomic::Ordering::Relaxed);
    POOL.get().is_none()
}

fn pool() -> Option<&'static rayon::ThreadPool> {
    POOL.get_or_init(|| {
        let threads = match THREADS.load(std::sync::atomic::Ordering::Relaxed) {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("weft-plan-{i}"))
            .build()
            .ok()
    })
    .as_ref()
}

/// `f` over `items` on the planner's pool, results in the items' order.
/// The planner is pure, so running its independent pieces at once changes
/// nothing but the wall time.
pub fn parallel_map<T, R, F>(items: Vec<T>, f: F) -> Vec<R>
where
    T: Send,
    R: Send,
    F: Fn(T) -> R + Sync + Send,
{
    use rayon::prelude::*;
    match pool() {
        Some(pool) if items.len() > 1 && pool.current_num_threads() > 1 => {
            pool.install(|| items.into_par_iter().map(f).collect())
        }
        _ => items.into_iter().map(f).collect(),
    }
}
use crate::layout::{LayoutGroup, LayoutMicroBatch, PlanContext};

/// Tokens the smallest rank can hold, and a check that the model fits at all.
pub fn rank_capacity(ctx: &PlanContext) -> Result<u64, PlanningError> {
    let topo = &ctx.topology;
    let capacity = crate::sim::rank_capacities(&ctx.cost, topo)
        .into_iter()
        .min()
        .unwrap_or(0);
    let margin = zigzag_margin(topo.max_gpus_per_node());
    if capacity <= margin {
        return Err(PlanningError::ModelDoesNotFit {
            model: ctx.cost.model.name.clone(),
            world: topo.world(),
        });
    }
    Ok(capacity - margin)
}

/// Tokens of a rank's capacity kept free for the rounding of zigzag shards
/// on nodes of `per_node` GPUs: a rank holds its share of a ring only with
/// this much room beside it.
pub fn zigzag_margin(per_node: u32) -> u64 {
    4 * u64::from(per_node)
}

/// Fails when a sequence could not fit even split over every rank.
pub fn check_fits(ctx: &PlanContext, lengths: &[u64], capacity: u64) -> Result<(), PlanningError> {
    let world = ctx.topology.world();
    let total = capacity.saturating_mul(u64::from(world));
    if let Some((id, &length)) = lengths.iter().enumerate().find(|(_, s)| **s > total) {
        return Err(PlanningError::SequenceTooLong {
            id,
            length,
            world,
            capacity: total,
            model: ctx.cost.model.name.clone(),
        });
    }
    Ok(())
}

/// Fewest ranks a sequence's tokens fit on.
pub fn min_degree(length: u64, capacity: u64) -> u32 {
    length.div_ceil(capacity.max(1)).max(1) as u32
}

/// `degree`, rounded up to whole nodes of `per_node` GPUs when it is more
/// than one node's.
pub(crate) fn whole_nodes_past_one(degree: u32, per_node: u32) -> u32 {
    if degree > per_node {
        degree.div_ceil(per_node) * per_node
    } else {
        degree
    }
}

/// Best-fit decreasing: packs items (index, size) into bins of `capacity`,
/// largest first, each into the fullest bin it still fits in. Deterministic.
pub fn best_fit_decreasing(items: &[(usize, u64)], capacity: u64) -> Vec<Vec<usize>> {
    let mut sorted: Vec<(usize, u64)> = items.to_vec();
    sorted.sort_by_key(|(i, s)| (Reverse(*s), *i));
    let mut bins: Vec<Vec<usize>> = Vec::new();
    // Remaining room → bins with that room.
    let mut room: BTreeMap<(u64, usize), ()> = BTreeMap::new();
    for (index, size) in sorted {
        let fit = room.range((size, 0)..).next().map(|(k, _)| *k);
        match fit {
            Some((left, bin)) => {
                room.remove(&(left, bin));
                bins[bin].push(index);
                room.insert((left - size, bin), ());
            }
            None => {
                let bin = bins.len();
                bins.push(vec![index]);
                room.insert((capacity.saturating_sub(size), bin), ());
            }
        }
    }
    bins
}

/// Chooses the ranks of a piece of work: given each rank's load and whether a
/// rank has room, `degree` ranks, or `None` when no set of ranks has room.
/// One rank is always the least-loaded with room, ties by index (one rank
/// lives on one node anyway): [`list_schedule`] relies on it to keep them in
/// a heap.
pub trait Pick: Fn(&[f64], &dyn Fn(u32) -> bool, u32) -> Option<Vec<u32>> {}

impl<F: Fn(&[f64], &dyn Fn(u32) -> bool, u32) -> Option<Vec<u32>>> Pick for F {}

/// A unit of work for list scheduling: sequences processed together by `degree` ranks.
#[derive(Clone, Debug)]
pub struct Work {
    pub sequences: Vec<usize>,
    pub degree: u32,
    pub cost_s: f64,
    /// Only on GPUs of this pace (one kind of a mixed cluster; see
    /// [`slowdowns`]), or on any.
    pub only_pace: Option<f64>,
}

/// Rough time of a piece of work before placement, for ordering and balancing:
/// ring attention at NVLink speed inside a node, one NIC's rate across nodes.
pub(crate) fn estimate_cost(
    ctx: &PlanContext,
    lengths: &[u64],
    sequences: &[usize],
    degree: u32,
    linear: bool,
) -> f64 {
    // One sequence (the common case: tens of thousands per batch) without
    // an allocation.
    if let [one] = sequences {
        return estimate_docs_cost(ctx, &[lengths[*one] as f64], degree, linear);
    }
    let docs: Vec<f64> = sequences.iter().map(|s| lengths[*s] as f64).collect();
    estimate_docs_cost(ctx, &docs, degree, linear)
}

/// [`estimate_cost`] of a ring that, past a node, takes whole nodes and runs
/// hierarchically with its inter-node hops spread over each node's NICs, as
/// weft's own layouts do: the time the simulator gives such a ring alone on
/// nodes like the topology's weakest (least NIC bandwidth per GPU): a ring
/// placed later may land on any node, and on a mixed cluster the rings priced
/// on the best links went where the links were worst; and not simply node 0,
/// so the order a cluster lists its nodes in changes nothing.
pub(crate) fn estimate_hierarchical_cost(
    ctx: &PlanContext,
    lengths: &[u64],
    sequence: usize,
    degree: u32,
) -> f64 {
    let topo = &ctx.topology;
    let per_node = topo.max_gpus_per_node();
    let docs = [lengths[sequence] as f64];
    if degree <= per_node || !degree.is_multiple_of(per_node) {
        return estimate_docs_cost(ctx, &docs, degree, true);
    }
    estimate_cost_on_nodes_like(ctx, lengths, sequence, degree, ctx.topology.weakest_node())
}

/// [`estimate_hierarchical_cost`] on nodes like `node`: its GPUs, GPUs per
/// node, NVLink and NICs. In the reference GPU's units, as every estimate: its time
/// there over the pace of its GPUs, which a placement multiplies back.
pub(crate) fn estimate_cost_on_nodes_like(
    ctx: &PlanContext,
    lengths: &[u64],
    sequence: usize,
    degree: u32,
    node: usize,
) -> f64 {
    let topo = &ctx.topology;
    let per_node = topo.nodes[node].gpus.max(1);
    let first = topo.ranks_of_node(node).next().unwrap_or(0);
    let gpu = topo.gpu_of(first);
    let pace = topo.reference_gpu().peak_bf16_tflops / gpu.peak_bf16_tflops;
    let docs = [lengths[sequence] as f64];
    let nvlink = topo.nvlink_bytes_per_s(node);
    let ring = if degree <= per_node {
        ctx.cost.packed_ring_time(&docs, degree, nvlink, gpu)
    } else {
        ctx.cost.hierarchical_ring_time(
            &docs,
            degree.div_ceil(per_node),
            per_node,
            nvlink,
            topo.node_nic_bytes_per_s(node) / f64::from(per_node),
            gpu,
        )
    };
    (ring.total_s
        + ctx
            .cost
            .linear_time(docs[0] / f64::from(degree.max(1)), gpu))
        / pace
}

/// [`estimate_cost`] for documents given by their lengths.
pub(crate) fn estimate_docs_cost(
    ctx: &PlanContext,
    docs: &[f64],
    degree: u32,
    linear: bool,
) -> f64 {
    let topo = &ctx.topology;
    let gpu = topo.reference_gpu();
    // As estimate_hierarchical_cost: the weakest node's links.
    let node = topo.weakest_node();
    let bandwidth = if degree <= topo.max_gpus_per_node() {
        topo.nvlink_bytes_per_s(node)
    } else {
        topo.nic_bytes_per_s(node, 0)
    };
    let ring = ctx
        .cost
        .packed_ring_time(docs, degree, bandwidth, gpu)
        .total_s;
    let linear_s = if linear {
        let tokens: f64 = docs.iter().sum();
        ctx.cost.linear_time(tokens / f64::from(degree.max(1)), gpu)
    } else {
        0.0
    };
    ring + linear_s
}

/// Places work on ranks, costliest first, each piece on the ranks that are free
/// soonest (ties by rank); pieces of several ranks wait for their slowest rank.
///
/// Without `capacity`, micro-batch numbers keep each rank's pieces in order, one
/// piece per rank and micro-batch (no barrier between micro-batches: memory holds
/// one piece at a time). With `capacity`, everything goes into one micro-batch
/// (a remap's barrier bounds it) and a rank takes pieces while their tokens fit;
/// what fits nowhere is returned for another micro-batch.
/// Pieces costliest first (by time, or with `by_area` by rank-time), ties
/// by their sequences: the order [`list_schedule`] places them in.
pub(crate) fn sort_costliest_first(work: &mut [Work], by_area: bool) {
    let key = |w: &Work| {
        if by_area {
            w.cost_s * f64::from(w.degree)
        } else {
            w.cost_s
        }
    };
    work.sort_by(|a, b| {
        key(b)
            .total_cmp(&key(a))
            .then(a.sequences.cmp(&b.sequences))
    });
}

pub(crate) fn list_schedule<P>(
    ctx: &PlanContext,
    lengths: &[u64],
    mut work: Vec<Work>,
    capacity: Option<u64>,
    pick: P,
    placement: Placement<'_>,
) -> Schedule
where
    P: Pick,
{
    if !placement.keep_order {
        sort_costliest_first(&mut work, placement.by_area);
    }
    let world = ctx.topology.world();
    let slowdown = slowdowns(ctx);
    let mut load = vec![0.0f64; world as usize];
    let mut count = vec![0usize; world as usize];
    let mut held = vec![0u64; world as usize];
    let mut micro_batches: Vec<LayoutMicroBatch> = Vec::new();
    let mut overflow = Vec::new();
    let mut gaps: Vec<Vec<Gap>> = vec![Vec::new(); world as usize];
    let mut pending: std::collections::VecDeque<Work> = work.into();
    // One-rank pieces without a capacity go to the idlest rank, kept in a
    // heap: a scan of every rank per piece was most of the time with tens of
    // thousands of short sequences.
    let mut idlest = capacity.is_none().then(|| IdlestRanks::new(&load));
    while let Some(head) = pending.front() {
        // Without a capacity, a piece among the next few that can start
        // sooner than the costliest goes first, into ranks that would
        // otherwise wait for the costliest's gang.
        let mut chosen = 0;
        let lookahead = placement.lookahead;
        // Picks at this load without a room test, by degree: pieces of one
        // degree start at the same ranks, and the chosen piece takes them.
        let mut known: Vec<(u32, Option<Vec<u32>>)> = Vec::new();
        let none = |_: u32| true;
        let mut pick_free = |degree: u32| match (&mut idlest, degree) {
            (Some(idlest), 1) => idlest.peek(&load).map(|r| vec![r]),
            _ => pick(&load, &none, degree),
        };
        if capacity.is_none() && lookahead > 1 && head.degree > 1 {
            let mut start_of = |degree: u32| {
                let index = match known.iter().position(|(d, _)| *d == degree) {
                    Some(index) => index,
                    None => {
                        known.push((degree, pick_free(degree)));
                        known.len() - 1
                    }
                };
                known[index]
                    .1
                    .as_ref()
                    .map(|ranks| ranks.iter().map(|r| load[*r as usize]).fold(0.0, f64::max))
            };
            if let Some(head_start) = start_of(head.degree) {
                let mut best = head_start;
                for (k, w) in pending.iter().enumerate().take(lookahead).skip(1) {
                    if let Some(start) = start_of(w.degree)
                        && start + 1e-9 < best
                    {
                        best = start;
                        chosen = k;
                    }
                }
            }
        }
        let Some(mut w) = pending.remove(chosen) else {
            break;
        };
        // Without a capacity every rank has room: the pick at this load.
        let own = match known.into_iter().find(|(d, _)| *d == w.degree) {
            Some((_, ranks)) => ranks,
            None if capacity.is_none() => pick_free(w.degree),
            None => None,
        };
        let placed = match (capacity, &placement.widen, w.only_pace) {
            (None, _, Some(pace)) => {
                let of_class = |r: u32| slowdown[r as usize] == pace;
                pick(&load, &of_class, w.degree)
            }
            (None, Some(widen), None) if w.degree > 1 => {
                widen.choose(&load, &slowdown, &pick, own, &mut w)
            }
            (None, _, None) => own,
            _ => None,
        };
        let tokens: u64 = w.sequences.iter().map(|s| lengths[*s]).sum();
        let share = tokens.div_ceil(u64::from(w.degree.max(1)));
        let has_room = |r: u32| capacity.is_none_or(|c| held[r as usize] + share <= c);
        let Some(mut ranks) = placed.or_else(|| pick(&load, &has_room, w.degree)) else {
            overflow.push(w);
            continue;
        };
        ranks.sort_unstable();
        let start = ranks.iter().map(|r| load[*r as usize]).fold(0.0, f64::max);
        // A group runs at the pace of its slowest GPU.
        let pace = ranks
            .iter()
            .map(|r| slowdown[*r as usize])
            .fold(0.0, f64::max);
        let mb = if capacity.is_some() {
            0
        } else {
            ranks.iter().map(|r| count[*r as usize]).max().unwrap_or(0)
        };
        for r in &ranks {
            // A rank that waits for the others of the group, with a
            // micro-batch it skips: time and a slot to fill.
            let r_ = *r as usize;
            if capacity.is_none() && start > load[r_] && count[r_] < mb {
                gaps[r_].push(Gap {
                    idle_s: start - load[r_],
                    micro_batch: count[r_],
                });
            }
            load[*r as usize] = start + w.cost_s * pace;
            if let Some(idlest) = &mut idlest {
                idlest.update(*r, load[*r as usize]);
            }
            count[*r as usize] = mb + 1;
            held[*r as usize] += share;
        }
        if micro_batches.len() <= mb {
            micro_batches.resize_with(mb + 1, LayoutMicroBatch::default);
        }
        micro_batches[mb]
            .groups
            .push(LayoutGroup::flat(ranks, w.sequences));
    }
    Schedule {
        micro_batches,
        overflow,
        ready: load.into_iter().zip(count).collect(),
        gaps,
    }
}

/// The least-loaded rank, ties by index (as [`least_loaded`] finds it), in
/// a heap of (load, rank) entries: a rank whose load grew has a newer entry,
/// and its older ones are dropped when they surface (loads only grow).
struct IdlestRanks(BinaryHeap<Reverse<(OrdF64, u32)>>);

impl IdlestRanks {
    fn new(load: &[f64]) -> Self {
        IdlestRanks(
            load.iter()
                .enumerate()
                .map(|(r, l)| Reverse((OrdF64(*l), r as u32)))
                .collect(),
        )
    }

    fn peek(&mut self, load: &[f64]) -> Option<u32> {
        while let Some(Reverse((OrdF64(l), r))) = self.0.peek().copied() {
            if load[r as usize].to_bits() == l.to_bits() {
                return Some(r);
            }
            self.0.pop();
        }
        None
    }

    fn update(&mut self, rank: u32, load: f64) {
        self.0.push(Reverse((OrdF64(load), rank)));
    }
}

/// How [`list_schedule`] places each piece, beyond costliest first onto the
/// ranks free soonest.
pub(crate) struct Placement<'a> {
    /// A piece among this many next ones that can start sooner than the
    /// costliest goes first (for gangs that must run in waves); 1: in order.
    pub lookahead: usize,
    /// Pieces may take more ranks than their degree (see [`Widen`]).
    pub widen: Option<Widen<'a>>,
    /// Pieces go costliest first by rank-time (degree times time) instead
    /// of by time: a wide gang of short steps is placed while whole nodes
    /// are still free, not after the narrower pieces have spread over them.
    pub by_area: bool,
    /// The pieces are placed in the order given (see
    /// [`sort_costliest_first`] for the usual one).
    pub keep_order: bool,
}

impl Placement<'_> {
    /// Each piece at its own degree, costliest first.
    pub const IN_ORDER: Placement<'static> = Placement {
        lookahead: 1,
        widen: None,
        by_area: false,
        keep_order: false,
    };
}

/// Widening of gang pieces: a sequence's ring can run on more ranks than its
/// degree, for less time. A piece that would end past `target_s` at its degree
/// (its ranks busy until late) takes the narrowest of its wider `options` that
/// ends by then, else the one that ends soonest; so a gang fills ranks that
/// other gangs left free early instead of waiting for one set to free up.
/// Memory gives the reason: a sequence's degree is at least what its tokens
/// need, so when memory forces gangs wider than their work, they end at
/// different times and the ranks they free do not fit the next gang's degree.
/// On a mixed cluster a width may also be one kind of GPU's alone. Only widths
/// whose rank-time stays within [`WIDEN_SLACK`] of the own degree's are taken.
pub(crate) struct Widen<'a> {
    /// When the step should end: the work bound.
    pub target_s: f64,
    /// A piece that ends in time at its degree still takes more ranks
    /// when they are free as soon as its own.
    pub into_idle: bool,
    /// A piece's other widths, narrowest first.
    pub options: &'a dyn Fn(&Work) -> Vec<WidenOption>,
}

/// A width a gang piece may take instead of its own degree.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct WidenOption {
    pub degree: u32,
    /// Its time on reference GPUs.
    pub cost_s: f64,
    /// Only on GPUs of this pace (one class of a mixed cluster: a ring runs
    /// at its slowest GPU's pace, so one class's ring wastes no faster GPU),
    /// or on any.
    pub pace: Option<f64>,
}

impl Widen<'_> {
    /// Picks the piece's width (see [`Widen`]) and returns the ranks it takes
    /// (None only when not even its own degree can be picked); when it takes
    /// another than the piece's own, sets the piece's degree and cost to it.
    /// `own`: the ranks `pick` gives the piece's own degree at this load,
    /// when the caller has them already.
    pub(crate) fn choose<P: Pick>(
        &self,
        load: &[f64],
        slowdown: &[f64],
        pick: &P,
        own: Option<Vec<u32>>,
        w: &mut Work,
    ) -> Option<Vec<u32>> {
        // Start, end, rank-seconds and ranks of a placement.
        let measure = |degree: u32, cost_s: f64, ranks: Vec<u32>| {
            let start = ranks.iter().map(|r| load[*r as usize]).fold(0.0, f64::max);
            let slowest = ranks
                .iter()
                .map(|r| slowdown[*r as usize])
                .fold(0.0, f64::max);
            let duration = cost_s * slowest;
            (start, start + duration, f64::from(degree) * duration, ranks)
        };
        let place = |degree: u32, cost_s: f64, pace: Option<f64>| {
            let of_class = |r: u32| pace.is_none_or(|p| slowdown[r as usize] == p);
            pick(load, &of_class, degree).map(|ranks| measure(degree, cost_s, ranks))
        };
        let (own_start, own, own_rank_s, own_ranks) = match own {
            Some(ranks) => measure(w.degree, w.cost_s, ranks),
            None => place(w.degree, w.cost_s, None)?,
        };
        if own <= self.target_s {
            // In time: wider only into ranks free as soon as its own; none
            // beyond its own, nothing to weigh.
            let free = load.iter().filter(|l| **l <= own_start + 1e-9).count();
            if !self.into_idle || free <= w.degree as usize {
                return Some(own_ranks);
            }
        }
        // No ranks are faster than the fastest: a bound on an option's
        // rank-time that spares its pick when that cannot pass.
        let fastest = slowdown.iter().copied().fold(f64::INFINITY, f64::min);
        let mut best: Option<(f64, WidenOption, Vec<u32>)> = None;
        let best_end =
            |best: &Option<(f64, WidenOption, Vec<u32>)>| best.as_ref().map_or(own, |b| b.0);
        for option in (self.options)(w) {
            let least_rank_s =
                f64::from(option.degree) * option.cost_s * option.pace.unwrap_or(fastest);
            if least_rank_s > own_rank_s * (1.0 + WIDEN_SLACK) {
                continue;
            }
            let Some((start, end, rank_s, ranks)) =
                place(option.degree, option.cost_s, option.pace)
            else {
                continue;
            };
            // Only while the ring's rank-time stays about its own (its
            // transfers still hidden): a wider ring that wastes ranks on
            // waiting for transfers only moves the wait elsewhere.
            if rank_s > own_rank_s * (1.0 + WIDEN_SLACK) {
                continue;
            }
            if own <= self.target_s {
                // Ends in time anyway: only wider on ranks idle as soon.
                if start <= own_start + 1e-9 && end < best_end(&best) {
                    best = Some((end, option, ranks));
                }
                continue;
            }
            if end <= self.target_s {
                best = Some((end, option, ranks));
                break;
            }
            if end < best_end(&best) {
                best = Some((end, option, ranks));
            }
        }
        let Some((_, option, ranks)) = best else {
            return Some(own_ranks);
        };
        w.degree = option.degree;
        w.cost_s = option.cost_s;
        Some(ranks)
    }
}

/// How much more rank-time (degree times duration) than at its own degree a
/// widened piece may take.
const WIDEN_SLACK: f64 = 0.02;

/// Time a rank spends waiting for the other ranks of its next group, and the
/// micro-batch it skips meanwhile, where other work can run.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Gap {
    pub idle_s: f64,
    pub micro_batch: usize,
}

/// What [`list_schedule`] decided.
#[derive(Debug)]
pub(crate) struct Schedule {
    pub micro_batches: Vec<LayoutMicroBatch>,
    /// Work that fit on no rank (with a capacity), for another micro-batch.
    pub overflow: Vec<Work>,
    /// Per rank: when it is free, and how many micro-batches it has.
    pub ready: Vec<(f64, usize)>,
    /// Per rank: its waits before groups (without a capacity only).
    pub gaps: Vec<Vec<Gap>>,
}

/// How much slower each rank's GPU is than the reference GPU, which work
/// costs are estimated on (the fastest model; see
/// [`crate::topology::Topology::reference_gpu`]): 1 for the same GPU, 3.2 for
/// an A100 next to H100s.
pub(crate) fn slowdowns(ctx: &PlanContext) -> Vec<f64> {
    let topo = &ctx.topology;
    let reference = topo.reference_gpu().peak_bf16_tflops;
    (0..topo.world())
        .map(|r| reference / topo.gpu_of(r).peak_bf16_tflops)
        .collect()
}

/// The `n` least-loaded ranks with room (ties by rank index).
pub(crate) fn least_loaded(
    load: &[f64],
    has_room: &dyn Fn(u32) -> bool,
    n: u32,
) -> Option<Vec<u32>> {
    if n == 1 {
        // The common case (whole sequences), without building a heap.
        let mut best: Option<(f64, u32)> = None;
        for (r, l) in load.iter().enumerate() {
            let r = r as u32;
            if best.is_none_or(|(b, _)| *l < b) && has_room(r) {
                best = Some((*l, r));
            }
        }
        return best.map(|(_, r)| vec![r]);
    }
    let mut heap: BinaryHeap<Reverse<(OrdF64, u32)>> = load
        .iter()
        .enumerate()
        .filter(|(r, _)| has_room(*r as u32))
        .map(|(r, l)| Reverse((OrdF64(*l), r as u32)))
        .collect();
    let ranks: Vec<u32> = (0..n)
        .filter_map(|_| heap.pop().map(|Reverse((_, r))| r))
        .collect();
    (ranks.len() == n as usize).then_some(ranks)
}

/// f64 with a total order, for heaps.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct OrdF64(pub f64);

impl Eq for OrdF64 {}

impl PartialOrd for OrdF64 {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for OrdF64 {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

/// Hierarchical placement shared by `zeppelin` and `weft`: a piece of degree up
/// to a node's GPUs goes to the node whose `degree` least-loaded ranks with room
/// are free soonest; a larger one takes whole nodes (the least busy, listed in
/// node order so that ring neighbours share racks) plus ranks of one more node
/// for a remainder.
pub(crate) fn hierarchical_pick(ctx: &PlanContext) -> impl Pick + '_ {
    // Between nodes free as soon, the faster GPUs: so the order the
    // cluster lists its nodes in does not decide which kind a ring gets.
    let slowdown = slowdowns(ctx);
    let pace_of = move |n: usize| {
        ctx.topology
            .ranks_of_node(n)
            .next()
            .map_or(1.0, |r| slowdown[r as usize])
    };
    move |load: &[f64], has_room: &dyn Fn(u32) -> bool, degree: u32| {
        let topo = &ctx.topology;
        let by_load = |a: &u32, b: &u32| {
            load[*a as usize]
                .total_cmp(&load[*b as usize])
                .then(a.cmp(b))
        };
        let free_ranks = |n: usize| -> Vec<u32> {
            let mut ranks: Vec<u32> = topo.ranks_of_node(n).filter(|r| has_room(*r)).collect();
            ranks.sort_by(by_load);
            ranks
        };
        let nodes = topo.nodes.len();
        if degree == 1 {
            // One rank lives on one node anyway: the least-loaded rank with room.
            return least_loaded(load, has_room, 1);
        }
        if degree <= topo.max_gpus_per_node() {
            let mut best: Option<((f64, f64), Vec<u32>)> = None;
            for n in 0..nodes {
                let ranks = free_ranks(n);
                if ranks.len() < degree as usize {
                    continue;
                }
                let ranks: Vec<u32> = ranks.into_iter().take(degree as usize).collect();
                let ready = ranks.iter().map(|r| load[*r as usize]).fold(0.0, f64::max);
                let key = (ready, pace_of(n));
                if best.as_ref().is_none_or(|(b, _)| key < *b) {
                    best = Some((key, ranks));
                }
            }
            if best.is_some() {
                return best.map(|(_, r)| r);
            }
        }
        // Whole nodes whose every rank has room, least busy first, then a remainder.
        let mut whole: Vec<(f64, usize)> = (0..nodes)
            .filter(|n| topo.ranks_of_node(*n).all(has_room))
            .map(|n| {
                let busiest = topo
                    .ranks_of_node(n)
                    .map(|r| load[r as usize])
                    .fold(0.0, f64::max);
                (busiest, n)
            })
            .collect();
        whole.sort_by(|a, b| {
            a.0.total_cmp(&b.0)
                .then(pace_of(a.1).total_cmp(&pace_of(b.1)))
                .then(a.1.cmp(&b.1))
        });
        let mut chosen: Vec<usize> = Vec::new();
        let mut have = 0u32;
        for (_, n) in &whole {
            if have + topo.nodes[*n].gpus > degree {
                continue;
            }
            chosen.push(*n);
            have += topo.nodes[*n].gpus;
            if have == degree {
                break;
            }
        }
        chosen.sort_unstable();
        let mut ranks: Vec<u32> = chosen.iter().flat_map(|n| topo.ranks_of_node(*n)).collect();
        if have < degree {
            // The remainder: from one more node if one has room, else anywhere.
            let need = (degree - have) as usize;
            let extra = (0..nodes)
                .filter(|n| !chosen.contains(n))
                .map(free_ranks)
                .filter(|r| r.len() >= need)
                .min_by(|a, b| {
                    let ra = a
                        .iter()
                        .take(need)
                        .map(|r| load[*r as usize])
                        .fold(0.0, f64::max);
                    let rb = b
                        .iter()
                        .take(need)
                        .map(|r| load[*r as usize])
                        .fold(0.0, f64::max);
                    ra.total_cmp(&rb)
                });
            match extra {
                Some(r) => ranks.extend(r.into_iter().take(need)),
                None => {
                    let mut free: Vec<u32> = (0..topo.world())
                        .filter(|r| has_room(*r) && !ranks.contains(r))
                        .collect();
                    free.sort_by(by_load);
                    if free.len() < need {
                        return None;
                    }
                    ranks.extend(free.into_iter().take(need));
                }
            }
        }
        Some(ranks)
    }
}

/// Splits the batch over micro-batches so that no rank needs to hold more than
/// `capacity` tokens in any of them (with a remap, linear tokens are spread
/// evenly): sequences longest first, each into the micro-batch with fewest tokens.
pub(crate) fn split_micro_batches(lengths: &[u64], world: u32, capacity: u64) -> Vec<Vec<usize>> {
    let total: u64 = lengths.iter().sum();
    let per_micro_batch = capacity.saturating_mul(u64::from(world)).max(1);
    let count = total.div_ceil(per_micro_batch).max(1) as usize;
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by_key(|i| (Reverse(lengths[*i]), *i));
    let mut tokens = vec![0u64; count];
    let mut parts = vec![Vec::new(); count];
    for i in order {
        let m = (0..count).min_by_key(|m| (tokens[*m], *m)).unwrap_or(0);
        tokens[m] += lengths[i];
        parts[m].push(i);
    }
    parts
}

/// Schedules the sequences `part` into micro-batches that end in a remap
/// barrier: list-scheduled with a per-rank token capacity; what does not fit
/// spills into a further micro-batch.
pub(crate) fn schedule_remapped<F, P>(
    ctx: &PlanContext,
    lengths: &[u64],
    capacity: u64,
    part: &[usize],
    make_work: F,
    pick: P,
) -> Vec<LayoutMicroBatch>
where
    F: Fn(&[usize]) -> Vec<Work>,
    P: Pick + Copy,
{
    let mut micro_batches = Vec::new();
    let mut work = make_work(part);
    while !work.is_empty() {
        let Schedule {
            micro_batches: scheduled,
            overflow,
            ..
        } = list_schedule(
            ctx,
            lengths,
            work,
            Some(capacity),
            pick,
            Placement::IN_ORDER,
        );
        let groups: Vec<LayoutGroup> = scheduled.into_iter().flat_map(|m| m.groups).collect();
        if groups.is_empty() {
            // Nothing fits even on an empty micro-batch: cannot happen for pieces
            // no larger than the capacity, but never loop forever.
            break;
        }
        micro_batches.push(LayoutMicroBatch {
            groups,
            remap: true,
        });
        work = overflow;
    }
    micro_batches
}

/// Pieces of work for sequences `part`: sequences that need several ranks alone,
/// short ones best-fit packed to `capacity`. `degree` picks each long sequence's degree.
pub(crate) fn pieces(
    ctx: &PlanContext,
    lengths: &[u64],
    part: &[usize],
    capacity: u64,
    linear_in_cost: bool,
    degree: impl Fn(u64) -> u32,
) -> Vec<Work> {
    let mut work = Vec::new();
    let mut short = Vec::new();
    for &i in part {
        let d = degree(lengths[i]).min(ctx.topology.world());
        if d <= 1 {
            short.push((i, lengths[i]));
        } else {
            work.push(Work {
                sequences: vec![i],
                degree: d,
                cost_s: estimate_cost(ctx, lengths, &[i], d, linear_in_cost),
                only_pace: None,
            });
        }
    }
    for bin in best_fit_decreasing(&short, capacity) {
        let cost_s = estimate_cost(ctx, lengths, &bin, 1, linear_in_cost);
        work.push(Work {
            sequences: bin,
            degree: 1,
            cost_s,
            only_pace: None,
        });
    }
    work
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parallel_map_keeps_the_items_order() {
        let items: Vec<u64> = (0..257).collect();
        let doubled = parallel_map(items.clone(), |x| {
            // Uneven work, so pieces finish out of order.
            std::thread::sleep(std::time::Duration::from_micros((x % 7) * 50));
            x * 2
        });
        assert_eq!(doubled, items.iter().map(|x| x * 2).collect::<Vec<_>>());
        assert!(parallel_map(Vec::<u64>::new(), |x| x).is_empty());
        // The pool is made once, at the first plan: later settings come too late.
        assert!(!set_threads(1));
    }

    #[test]
    fn best_fit_decreasing_respects_capacity_and_keeps_every_item() {
        let items: Vec<(usize, u64)> = [5, 3, 8, 2, 7, 1, 4].iter().copied().enumerate().collect();
        let bins = best_fit_decreasing(&items, 10);
        let mut all: Vec<usize> = bins.iter().flatten().copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..7).collect::<Vec<_>>());
        for bin in &bins {
            assert!(bin.iter().map(|i| items[*i].1).sum::<u64>() <= 10);
        }
        assert_eq!(bins.len(), 3);
    }

    #[test]
    fn looking_ahead_lets_a_narrow_gang_start_before_a_wide_one_that_must_wait() {
        let ctx = crate::sim::tests::context("1x8", "llama-7b");
        // Gangs of 4, 6 and 4 ranks of 10 s each on 8 ranks: in cost order the
        // 6 waits for the first 4 and the last 4 waits for the 6 (30 s); the
        // second 4 can run beside the first (20 s).
        let work = || {
            [4, 6, 4]
                .iter()
                .enumerate()
                .map(|(i, d)| Work {
                    sequences: vec![i],
                    degree: *d,
                    cost_s: 10.0 - i as f64 * 1e-3,
                    only_pace: None,
                })
                .collect::<Vec<_>>()
        };
        let lengths = [100, 100, 100];
        let makespan = |window| {
            let schedule = list_schedule(
                &ctx,
                &lengths,
                work(),
                None,
                least_loaded,
                Placement {
                    lookahead: window,
                    widen: None,
                    by_area: false,
                    keep_order: false,
                },
            );
            schedule.ready.iter().map(|(t, _)| *t).fold(0.0, f64::max)
        };
        assert!((makespan(1) - 30.0).abs() < 0.01, "{}", makespan(1));
        assert!((makespan(8) - 20.0).abs() < 0.01, "{}", makespan(8));
    }

    #[test]
    fn by_area_places_gangs_by_rank_time() {
        let ctx = crate::sim::tests::context("1x8", "llama-7b");
        // Four gangs of 2 ranks for 10 s, one of 8 ranks for 6 s: by time the
        // narrow ones go first; by rank-time (20 against 48) the wide one.
        let work = || {
            let mut work: Vec<Work> = (0..4)
                .map(|i| Work {
                    sequences: vec![i],
                    degree: 2,
                    cost_s: 10.0,
                    only_pace: None,
                })
                .collect();
            work.push(Work {
                sequences: vec![4],
                degree: 8,
                cost_s: 6.0,
                only_pace: None,
            });
            work
        };
        let first_group = |by_area| {
            let placement = Placement {
                lookahead: 1,
                widen: None,
                by_area,
                keep_order: false,
            };
            let schedule = list_schedule(&ctx, &[100; 5], work(), None, least_loaded, placement);
            let makespan = schedule.ready.iter().map(|(t, _)| *t).fold(0.0, f64::max);
            assert!((makespan - 16.0).abs() < 1e-9, "{makespan}");
            schedule.micro_batches[0].groups[0].sequences.clone()
        };
        assert_eq!(first_group(false), vec![0]);
        assert_eq!(first_group(true), vec![4]);
    }

    #[test]
    fn a_piece_for_one_kind_of_gpu_runs_on_that_kind_alone_in_the_order_given() {
        // 8 H100s and 8 A100s. Pieces pinned to the A100s run there one
        // after the other while the H100s stay idle, and with the order kept
        // the cheap piece goes first.
        let ctx = crate::sim::tests::context("1x8+2x4:gpu=a100-80g", "llama-7b");
        let slowdown = slowdowns(&ctx);
        let a100 = slowdown[8];
        assert!(a100 > 1.0);
        let work = vec![
            Work {
                sequences: vec![0],
                degree: 8,
                cost_s: 1.0,
                only_pace: Some(a100),
            },
            Work {
                sequences: vec![1],
                degree: 8,
                cost_s: 2.0,
                only_pace: Some(a100),
            },
        ];
        let placement = Placement {
            keep_order: true,
            ..Placement::IN_ORDER
        };
        let schedule = list_schedule(&ctx, &[100; 2], work, None, least_loaded, placement);
        let groups: Vec<&crate::layout::LayoutGroup> = schedule
            .micro_batches
            .iter()
            .flat_map(|m| &m.groups)
            .collect();
        assert_eq!(groups[0].sequences, vec![0]);
        for group in groups {
            assert!(group.ranks.iter().all(|r| *r >= 8), "{:?}", group.ranks);
        }
        // Both on the A100s, one after the other, at their pace.
        let makespan = schedule.ready.iter().map(|(t, _)| *t).fold(0.0, f64::max);
        assert!((makespan - 3.0 * a100).abs() < 1e-9, "{makespan}");
    }

    #[test]
    fn least_loaded_picks_the_idlest_ranks() {
        let all = |_: u32| true;
        assert_eq!(
            least_loaded(&[3.0, 1.0, 2.0, 1.0], &all, 2),
            Some(vec![1, 3])
        );
        let not_one = |r: u32| r != 1;
        assert_eq!(
            least_loaded(&[3.0, 1.0, 2.0, 1.0], &not_one, 2),
            Some(vec![3, 2])
        );
        assert_eq!(least_loaded(&[3.0, 1.0], &all, 3), None);
    }

    #[test]
    fn idlest_ranks_follow_least_loaded_as_loads_grow() {
        let mut rng = crate::rng::SplitMix64::new(7);
        let all = |_: u32| true;
        let mut load = vec![0.0f64; 16];
        let mut idlest = IdlestRanks::new(&load);
        for step in 0..500 {
            let want = least_loaded(&load, &all, 1).map(|r| r[0]);
            assert_eq!(idlest.peek(&load), want, "step {step}");
            // Grow a few ranks, sometimes by nothing (ties stay by index).
            for _ in 0..=(rng.next_u64() % 3) {
                let r = (rng.next_u64() % 16) as u32;
                load[r as usize] += (rng.next_u64() % 4) as f64 * 0.5;
                idlest.update(r, load[r as usize]);
            }
        }
    }
}
