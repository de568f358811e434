//! The step plan: where every token of one step's batch lives, how tokens move
//! between the attention layout and the linear-module layout, which NIC carries
//! each inter-node transfer, and what the cost model predicts for each rank.
//!
//! Version 1 of the document (`version: 1`). Its JSON form is what `weft plan
//! --format json` prints and what every worker derives, identically, from the
//! same inputs.
//!
//! Execution model the plan describes:
//! - A step is a list of micro-batches run in order; gradients accumulate over
//!   them. Memory limits hold per micro-batch.
//! - A micro-batch is a list of ring groups. A group is an ordered ring of ranks
//!   and the sequences it processes together: every sequence of a group is split
//!   over all of its ranks in zigzag order (see [`group_zigzag`]), and the
//!   group's documents share the ring's steps (packed, with per-document causal
//!   masks). A group of one rank holds whole sequences.
//! - A rank may belong to several groups of a micro-batch; it runs them in order,
//!   and a group starts when all its ranks are free.
//! - With `remap`, a micro-batch has a linear layout of its own: linear modules
//!   see a token-balanced layout and an all-to-all moves tokens to the attention
//!   layout and back (both ways, forward and backward).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Version of the step plan document.
pub const STEP_PLAN_VERSION: u32 = 1;

#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
pub struct StepPlan {
    pub version: u32,
    pub strategy: String,
    pub world_size: u32,
    pub micro_batches: Vec<MicroBatch>,
    /// Every sequence of the batch, in input order.
    pub sequences: Vec<SequencePlan>,
    /// Prediction per rank, indexed by rank.
    pub ranks: Vec<RankPrediction>,
    /// The remap of each micro-batch that has one.
    pub remap: Vec<RemapPlan>,
    /// Inter-node transfers and the NICs that carry them.
    pub routes: Vec<NicRoute>,
    pub predicted: Prediction,
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
pub struct MicroBatch {
    pub index: u32,
    pub groups: Vec<Group>,
    /// Linear modules run on a token-balanced layout of their own.
    pub remap: bool,
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
pub struct Group {
    /// Ranks in ring order; neighbours exchange K/V chunks.
    pub ranks: Vec<u32>,
    /// Ids of the sequences this group processes.
    pub sequences: Vec<u64>,
    /// Hierarchical ring: the ranks are consecutive node-local inner rings of
    /// this many ranks (one per node). Key/value chunks go round each inner
    /// ring, and once per inner round every rank passes the chunks it started
    /// the round with to the rank at its place in the next inner ring (over
    /// its own NIC), so each inter-node transfer is hidden behind a whole
    /// inner round of compute. Absent or 0: one flat ring over `ranks`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub inner_ring: u32,
    /// Selective offloading (ByteScale): the share of the middle layers'
    /// activations of this group's tokens its ranks copy to host memory in
    /// the forward and back in the backward, hidden under compute. It lets a
    /// long sequence fit on fewer ranks; it changes no result. Absent or 0:
    /// none. (The CPU trainer keeps everything in host memory anyway.)
    #[serde(default, skip_serializing_if = "is_no_offload")]
    pub offload: f64,
    /// StreamBP: the group's ranks backpropagate its layers in chunks of this
    /// many tokens along the sequence, recomputing the forward as they go
    /// (exact; less activation memory for one more forward). Absent or 0:
    /// plain backprop. A rank runs all its groups of a micro-batch in one
    /// pass, so its groups there stream alike; a remapped micro-batch's
    /// all-to-alls span all of its ranks, so its groups all stream alike.
    #[serde(default, skip_serializing_if = "is_no_chunk")]
    pub stream_bp_chunk: u64,
}

fn is_no_chunk(n: &u64) -> bool {
    *n == 0
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

fn is_no_time(seconds: &f64) -> bool {
    *seconds == 0.0
}

fn is_no_offload(ratio: &f64) -> bool {
    *ratio == 0.0
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
pub struct SequencePlan {
    pub id: u64,
    pub length: u64,
    pub micro_batch: u32,
    /// Context-parallel degree (ranks that share the sequence).
    pub degree: u32,
    pub shards: Vec<Shard>,
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
pub struct Shard {
    pub rank: u32,
    /// Token ranges `[start, end)` of the sequence held by this rank.
    pub ranges: Vec<[u64; 2]>,
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
pub struct RemapPlan {
    pub micro_batch: u32,
    /// Tokens each rank holds in the linear layout, indexed by rank.
    pub linear_tokens: Vec<u64>,
    /// Tokens each rank sends to another to reach the attention layout (the
    /// same flows reversed bring them back).
    pub sends: Vec<Transfer>,
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
pub struct Transfer {
    pub from: u32,
    pub to: u32,
    pub tokens: u64,
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
pub struct NicRoute {
    pub micro_batch: u32,
    pub from_rank: u32,
    pub to_rank: u32,
    pub from_node: String,
    pub to_node: String,
    /// What carries the transfer: one NIC of the sending node, or several when the
    /// transfer is spread (each part relayed over NVLink through a GPU close to its NIC).
    pub legs: Vec<RouteLeg>,
    /// Bytes over the whole step.
    pub bytes: f64,
    /// Bandwidth the transfer gets under contention, GB/s.
    pub gbytes_per_s: f64,
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
pub struct RouteLeg {
    pub nic: String,
    /// The rank that forwards this part to the NIC, when it is not the sender.
    pub relay_rank: Option<u32>,
    /// Fraction of the transfer's bytes on this leg.
    pub share: f64,
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
pub struct RankPrediction {
    pub rank: u32,
    pub node: String,
    /// The node's rack (absent in plans written before weft recorded it).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub rack: String,
    /// Time until this rank finishes the step, s.
    pub time_s: f64,
    /// Of which busy computing, s.
    pub compute_s: f64,
    /// Of which in communication that compute did not hide, s.
    pub exposed_comm_s: f64,
    /// Peak memory over the micro-batches, GiB.
    pub memory_gib: f64,
    pub attention_tokens: u64,
    pub linear_tokens: u64,
    /// What the rank does when over the step, in order (as predicted).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub timeline: Vec<TimeSpan>,
}

/// A stretch of a rank's step: a group's attention (and its linear modules,
/// unless the micro-batch is remapped), or a remapped micro-batch's linear
/// modules and the remap's transfers.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
pub struct TimeSpan {
    pub micro_batch: u32,
    pub start_s: f64,
    pub end_s: f64,
    /// Of which, at the end, communication that compute did not hide, s.
    pub exposed_s: f64,
    /// Transfer time (ring hops, offloading) compute hid, s (absent: none,
    /// or a plan written before weft recorded it).
    #[serde(default, skip_serializing_if = "is_no_time")]
    pub hidden_s: f64,
    /// Index of the group in its micro-batch; absent for the linear phase of
    /// a remapped micro-batch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<u32>,
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
pub struct Prediction {
    pub step_time_s: f64,
    pub lower_bound_s: f64,
    /// max over ranks of busy time / mean of busy time.
    pub max_over_mean: f64,
    /// Share of the step that ranks spend in communication compute did not hide.
    pub comm_fraction: f64,
    pub peak_memory_gib: f64,
    /// True when every rank's memory stays within its budget.
    pub fits_in_memory: bool,
}

/// A broken plan invariant.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlanError {
    #[error(
        "sequence {id}: token {token} is held by {holders} ranks; every token must be held by exactly one"
    )]
    TokenCoverage { id: u64, token: u64, holders: usize },
    #[error(
        "sequence {id}: shard range [{start}, {end}) is outside the sequence of {length} tokens"
    )]
    RangeOutside {
        id: u64,
        start: u64,
        end: u64,
        length: u64,
    },
    #[error("sequence {id} is in {count} groups; it must be in exactly one")]
    GroupCount { id: u64, count: usize },
    #[error("rank {rank} is not below the world size {world}")]
    RankOutOfRange { rank: u32, world: u32 },
    #[error("group of micro-batch {micro_batch} names rank {rank} twice")]
    DuplicateRank { micro_batch: u32, rank: u32 },
    #[error(
        "group of micro-batch {micro_batch} offloads a share {offload} of its activations; it must be in [0, 1]"
    )]
    OffloadRatio { micro_batch: u32, offload: f64 },
    #[error(
        "group of micro-batch {micro_batch} has {ranks} ranks, which inner rings of {inner_ring} do not divide"
    )]
    InnerRing {
        micro_batch: u32,
        ranks: usize,
        inner_ring: u32,
    },
    #[error(
        "micro-batch {micro_batch}: rank {rank} is in groups that backpropagate differently (StreamBP chunks {first} and {second}; 0 is plain); a rank's groups, and a remapped micro-batch's, must stream alike"
    )]
    MixedBackprop {
        micro_batch: u32,
        rank: u32,
        first: u64,
        second: u64,
    },
    #[error(
        "micro-batch {micro_batch}: the linear layout holds {linear} tokens, the attention layout {attention}"
    )]
    RemapMismatch {
        micro_batch: u32,
        linear: u64,
        attention: u64,
    },
}

impl PlanError {
    /// A stable, machine-readable name for the kind of failure.
    pub fn category(&self) -> &'static str {
        "plan_invariant"
    }
}

impl StepPlan {
    /// Checks the invariants every plan must keep: every token of every sequence
    /// held by exactly one rank, every sequence in exactly one group, ranks in
    /// range and not repeated within a group, remap layouts of equal size.
    pub fn check(&self) -> Result<(), PlanError> {
        let world = self.world_size;
        let mut group_count = std::collections::BTreeMap::<u64, usize>::new();
        for mb in &self.micro_batches {
            // The backprop of each rank's groups (of all groups, remapped).
            let mut backprop = std::collections::BTreeMap::<u32, u64>::new();
            let everyone = mb.groups.first().map(|g| g.stream_bp_chunk);
            for group in &mb.groups {
                for &rank in &group.ranks {
                    let first = match everyone.filter(|_| mb.remap) {
                        Some(chunk) => chunk,
                        None => *backprop.entry(rank).or_insert(group.stream_bp_chunk),
                    };
                    if first != group.stream_bp_chunk {
                        return Err(PlanError::MixedBackprop {
                            micro_batch: mb.index,
                            rank,
                            first,
                            second: group.stream_bp_chunk,
                        });
                    }
                }
            }
            for group in &mb.groups {
                let mut seen = std::collections::BTreeSet::new();
                for &rank in &group.ranks {
                    if rank >= world {
                        return Err(PlanError::RankOutOfRange { rank, world });
                    }
                    if !seen.insert(rank) {
                        return Err(PlanError::DuplicateRank {
                            micro_batch: mb.index,
                            rank,
                        });
                    }
                }
                if !(0.0..=1.0).contains(&group.offload) {
                    return Err(PlanError::OffloadRatio {
                        micro_batch: mb.index,
                        offload: group.offload,
                    });
                }
                let inner = group.inner_ring as usize;
                if inner != 0 && !group.ranks.len().is_multiple_of(inner) {
                    return Err(PlanError::InnerRing {
                        micro_batch: mb.index,
                        ranks: group.ranks.len(),
                        inner_ring: group.inner_ring,
                    });
                }
                for id in &group.sequences {
                    *group_count.entry(*id).or_default() += 1;
                }
            }
        }
        for seq in &self.sequences {
            let count = group_count.get(&seq.id).copied().unwrap_or(0);
            if count != 1 {
                return Err(PlanError::GroupCount { id: seq.id, count });
            }
            let mut ranges: Vec<[u64; 2]> = Vec::new();
            for shard in &seq.shards {
                if shard.rank >= world {
                    return Err(PlanError::RankOutOfRange {
                        rank: shard.rank,
                        world,
                    });
                }
                for r in &shard.ranges {
                    if r[0] > r[1] || r[1] > seq.length {
                        return Err(PlanError::RangeOutside {
                            id: seq.id,
                            start: r[0],
                            end: r[1],
                            length: seq.length,
                        });
                    }
                    if r[0] < r[1] {
                        ranges.push(*r);
                    }
                }
            }
            ranges.sort_unstable();
            let mut next = 0;
            for r in &ranges {
                if r[0] != next {
                    let holders = if r[0] > next { 0 } else { 2 };
                    let token = if r[0] > next { next } else { r[0] };
                    return Err(PlanError::TokenCoverage {
                        id: seq.id,
                        token,
                        holders,
                    });
                }
                next = r[1];
            }
            if next != seq.length {
                return Err(PlanError::TokenCoverage {
                    id: seq.id,
                    token: next,
                    holders: 0,
                });
            }
        }
        for remap in &self.remap {
            let linear: u64 = remap.linear_tokens.iter().sum();
            let attention: u64 = self
                .sequences
                .iter()
                .filter(|s| s.micro_batch == remap.micro_batch)
                .map(|s| s.length)
                .sum();
            if linear != attention {
                return Err(PlanError::RemapMismatch {
                    micro_batch: remap.micro_batch,
                    linear,
                    attention,
                });
            }
        }
        Ok(())
    }
}

/// A run of tokens of one sequence: `[start, end)` of sequence `sequence`.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenRun {
    pub sequence: u64,
    pub start: u64,
    pub end: u64,
}

impl TokenRun {
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }
}

/// How one rank's tokens move through the remap of one micro-batch, derived
/// from the plan alone, identically on every rank:
/// - the attention layout is the rank's shards in plan order (groups in order,
///   sequences in group order, each shard's ranges in order);
/// - the rank keeps the first `keep` of those tokens in its linear layout and
///   sends the rest, in order, to `sends` (ascending destination rank);
/// - its linear layout is the kept tokens followed by what `recvs` brings
///   (ascending source rank), each source's tokens in the source's order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemapRoutes {
    pub attention: Vec<TokenRun>,
    pub keep: u64,
    /// (destination rank, tokens), ascending destination.
    pub sends: Vec<(u32, u64)>,
    /// (source rank, tokens), ascending source.
    pub recvs: Vec<(u32, u64)>,
}

impl StepPlan {
    /// StreamBP's chunk for `rank` in micro-batch `micro_batch`, or `None`
    /// for plain backprop: the chunk of the rank's groups there (of any of
    /// the micro-batch's groups when it is remapped; [`StepPlan::check`]
    /// keeps them alike).
    pub fn stream_bp_chunk(&self, micro_batch: u32, rank: u32) -> Option<u64> {
        let mb = self.micro_batches.iter().find(|m| m.index == micro_batch)?;
        mb.groups
            .iter()
            .find(|g| mb.remap || g.ranks.contains(&rank))
            .map(|g| g.stream_bp_chunk)
            .filter(|chunk| *chunk > 0)
    }

    /// Every group streams its backward in chunks of `chunk` tokens
    /// (`None`: none does), whatever the plan chose: for measuring the
    /// engine one way or the other on the same plan.
    pub fn with_backprop_everywhere(mut self, chunk: Option<u64>) -> StepPlan {
        for group in self.micro_batches.iter_mut().flat_map(|m| &mut m.groups) {
            group.stream_bp_chunk = chunk.unwrap_or(0);
        }
        self
    }

    /// The runs of tokens `rank` holds in micro-batch `micro_batch`'s attention
    /// layout, in plan order.
    pub fn attention_layout(&self, micro_batch: u32, rank: u32) -> Vec<TokenRun> {
        let mut runs = Vec::new();
        let Some(mb) = self.micro_batches.iter().find(|m| m.index == micro_batch) else {
            return runs;
        };
        for group in &mb.groups {
            if !group.ranks.contains(&rank) {
                continue;
            }
            for id in &group.sequences {
                let Some(seq) = self.sequences.iter().find(|s| s.id == *id) else {
                    continue;
                };
                for shard in seq.shards.iter().filter(|sh| sh.rank == rank) {
                    runs.extend(
                        shard
                            .ranges
                            .iter()
                            .filter(|r| r[0] < r[1])
                            .map(|r| TokenRun {
                                sequence: *id,
                                start: r[0],
                                end: r[1],
                            }),
                    );
                }
            }
        }
        runs
    }

    /// The remap routes of `rank` in micro-batch `micro_batch` (see
    /// [`RemapRoutes`]), or `None` when that micro-batch has no remap.
    pub fn remap_routes(&self, micro_batch: u32, rank: u32) -> Option<RemapRoutes> {
        let remap = self.remap.iter().find(|r| r.micro_batch == micro_batch)?;
        let attention = self.attention_layout(micro_batch, rank);
        let held: u64 = attention.iter().map(TokenRun::len).sum();
        let mut sends: Vec<(u32, u64)> = remap
            .sends
            .iter()
            .filter(|t| t.from == rank && t.tokens > 0)
            .map(|t| (t.to, t.tokens))
            .collect();
        sends.sort_unstable();
        let mut recvs: Vec<(u32, u64)> = remap
            .sends
            .iter()
            .filter(|t| t.to == rank && t.tokens > 0)
            .map(|t| (t.from, t.tokens))
            .collect();
        recvs.sort_unstable();
        let sent: u64 = sends.iter().map(|s| s.1).sum();
        Some(RemapRoutes {
            attention,
            keep: held.saturating_sub(sent),
            sends,
            recvs,
        })
    }
}

impl StepPlan {
    /// The runs of tokens `rank` holds in micro-batch `micro_batch`'s linear
    /// layout, in order (see [`RemapRoutes`]): its kept tokens, then each
    /// source's tokens by ascending source. Without a remap the linear layout
    /// is the attention layout. Every rank derives every other rank's routes
    /// from the plan, so this needs no communication.
    pub fn linear_layout(&self, micro_batch: u32, rank: u32) -> Vec<TokenRun> {
        let Some(routes) = self.remap_routes(micro_batch, rank) else {
            return self.attention_layout(micro_batch, rank);
        };
        let mut runs = take_tokens(&routes.attention, 0, routes.keep);
        for (from, tokens) in &routes.recvs {
            let Some(theirs) = self.remap_routes(micro_batch, *from) else {
                continue;
            };
            // The source sends its tokens after the kept ones, by ascending destination.
            let before: u64 = theirs
                .sends
                .iter()
                .filter(|(to, _)| *to < rank)
                .map(|(_, n)| n)
                .sum();
            runs.extend(take_tokens(
                &theirs.attention,
                theirs.keep + before,
                *tokens,
            ));
        }
        runs
    }
}

/// `count` tokens of `runs` after the first `skip`, as runs.
fn take_tokens(runs: &[TokenRun], mut skip: u64, mut count: u64) -> Vec<TokenRun> {
    let mut out = Vec::new();
    for run in runs {
        if count == 0 {
            break;
        }
        let len = run.len();
        if skip >= len {
            skip -= len;
            continue;
        }
        let take = (len - skip).min(count);
        out.push(TokenRun {
            sequence: run.sequence,
            start: run.start + skip,
            end: run.start + skip + take,
        });
        count -= take;
        skip = 0;
    }
    out
}

/// First token of chunk `chunk` when `length` tokens are cut into the
/// 2·`degree` chunks of a zigzag split: sizes differ by at most one token, the
/// first `length mod 2·degree` chunks holding the extra ones. The one place the
/// planner, the simulator and the trainer take chunk boundaries from.
pub fn zigzag_chunk_start(length: u64, degree: u32, chunk: u64) -> u64 {
    let chunks = 2 * u64::from(degree.max(1));
    let (base, extra) = (length / chunks, length % chunks);
    chunk * base + chunk.min(extra)
}

/// Zigzag (head-tail) split of `length` tokens over `degree` ranks: the sequence
/// is cut into 2·degree chunks whose sizes differ by at most one token, and rank
/// i takes chunks i and 2·degree−1−i, so every rank gets the same causal work.
pub fn zigzag_ranges(length: u64, degree: u32) -> Vec<Vec<[u64; 2]>> {
    let d = u64::from(degree.max(1));
    if d == 1 {
        return vec![vec![[0, length]]];
    }
    let chunks = 2 * d;
    let start = |c: u64| zigzag_chunk_start(length, degree, c);
    (0..d)
        .map(|i| {
            let head = [start(i), start(i + 1)];
            let tail_chunk = chunks - 1 - i;
            let tail = [start(tail_chunk), start(tail_chunk + 1)];
            vec![head, tail]
        })
        .collect()
}

/// Zigzag split of the `position`-th sequence of a group over the group's
/// `degree` ranks: the ranges that the group's i-th rank holds, for every i.
/// The pairs of [`zigzag_ranges`] are rotated by the sequence's position, so
/// that when many short documents share a ring the tokens left over by rounding
/// fall on every rank in turn rather than always on the first.
pub fn group_zigzag(length: u64, degree: u32, position: usize) -> Vec<Vec<[u64; 2]>> {
    let mut parts = zigzag_ranges(length, degree);
    let d = parts.len();
    if d > 1 {
        parts.rotate_left(position % d);
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn llama_7b_on_2x4() -> crate::layout::PlanContext {
        use crate::cost::{CostCoefficients, CostModel};
        crate::layout::PlanContext {
            limits: Default::default(),
            topology: crate::topology::Topology::new(
                &crate::cluster::parse_cluster("2x4").unwrap(),
            )
            .unwrap(),
            cost: CostModel::new(
                crate::model::ModelSpec::preset("llama-7b").unwrap(),
                CostCoefficients::default(),
            ),
        }
    }

    #[test]
    fn remap_routes_conserve_tokens_and_match_the_linear_layout() {
        use crate::strategies::Strategy;
        let ctx = llama_7b_on_2x4();
        let lengths = [30_000, 900, 400, 400, 12_000, 50];
        let plan = crate::plan_step(Strategy::Zeppelin, &ctx, &lengths, None).unwrap();
        assert!(!plan.remap.is_empty());
        for remap in &plan.remap {
            let mb = remap.micro_batch;
            let routes: Vec<RemapRoutes> = (0..plan.world_size)
                .map(|r| plan.remap_routes(mb, r).unwrap())
                .collect();
            for (r, route) in routes.iter().enumerate() {
                let received: u64 = route.recvs.iter().map(|x| x.1).sum();
                // The linear layout holds exactly what the plan says.
                assert_eq!(route.keep + received, remap.linear_tokens[r], "rank {r}");
                // Every send is somebody's receive.
                for (to, n) in &route.sends {
                    assert!(routes[*to as usize].recvs.contains(&(r as u32, *n)));
                }
            }
        }
    }

    #[test]
    fn linear_layouts_hold_every_token_once_in_the_planned_amounts() {
        use crate::strategies::Strategy;
        let ctx = llama_7b_on_2x4();
        let lengths = [30_000, 900, 400, 400, 12_000, 50];
        for strategy in [Strategy::Zeppelin, Strategy::Static, Strategy::Weft] {
            let plan = crate::plan_step(strategy, &ctx, &lengths, None).unwrap();
            for mb in &plan.micro_batches {
                let mut seen: Vec<Vec<bool>> =
                    lengths.iter().map(|l| vec![false; *l as usize]).collect();
                let planned = plan.remap.iter().find(|r| r.micro_batch == mb.index);
                for rank in 0..plan.world_size {
                    let runs = plan.linear_layout(mb.index, rank);
                    let held: u64 = runs.iter().map(TokenRun::len).sum();
                    if let Some(remap) = planned {
                        assert_eq!(held, remap.linear_tokens[rank as usize], "rank {rank}");
                    }
                    for run in runs {
                        for t in run.start..run.end {
                            let slot = &mut seen[run.sequence as usize][t as usize];
                            assert!(!*slot, "token {t} of {} twice", run.sequence);
                            *slot = true;
                        }
                    }
                }
                for seq in plan.sequences.iter().filter(|s| s.micro_batch == mb.index) {
                    assert!(
                        seen[seq.id as usize].iter().all(|x| *x),
                        "sequence {}",
                        seq.id
                    );
                }
            }
        }
    }

    #[test]
    fn rotation_spreads_rounding_over_the_ranks() {
        // 500 documents of 100 tokens on 16 ranks: 100 = 3·32 + 4, so without
        // rotation the first ranks would take every spare token.
        let mut held = [0u64; 16];
        for position in 0..500 {
            for (i, ranges) in group_zigzag(100, 16, position).iter().enumerate() {
                held[i] += ranges.iter().map(|r| r[1] - r[0]).sum::<u64>();
            }
        }
        let (max, min) = (*held.iter().max().unwrap(), *held.iter().min().unwrap());
        assert_eq!(held.iter().sum::<u64>(), 50_000);
        assert!(max - min <= 64, "{held:?}");
    }

    proptest! {
        #[test]
        fn zigzag_covers_every_token_once_with_balanced_causal_work(length in 0u64..100_000, degree in 1u32..64) {
            let parts = zigzag_ranges(length, degree);
            prop_assert_eq!(parts.len() as u32, degree);
            let mut all: Vec<[u64; 2]> = parts.iter().flatten().copied().filter(|r| r[0] < r[1]).collect();
            all.sort_unstable();
            let mut next = 0;
            for r in &all { prop_assert_eq!(r[0], next); next = r[1]; }
            prop_assert_eq!(next, length);
            // Causal work of a token at position p is p+1 (keys it sees). Every
            // rank's share is within one chunk-row of the mean.
            if degree > 1 && length >= 4 * u64::from(degree) {
                let work: Vec<u128> = parts.iter().map(|rs| rs.iter().map(|r| {
                    let (a, b) = (u128::from(r[0]), u128::from(r[1]));
                    (b * (b + 1) - a * (a + 1)) / 2
                }).sum()).collect();
                let max = *work.iter().max().unwrap() as f64;
                let min = *work.iter().min().unwrap() as f64;
                let chunk = length as f64 / (2.0 * f64::from(degree));
                prop_assert!(max - min <= 2.0 * chunk * length as f64 / chunk.max(1.0) + 4.0 * length as f64,
                    "work spread {} too large", max - min);
                prop_assert!(max / min < 1.0 + 4.0 / (chunk.max(1.0)) + 0.05);
            }
        }
    }
}
