//! The step plan document of a layout: what every rank runs, built from the
//! layout and the simulator's outcome (its routes, remaps and StreamBP
//! chunks).

use crate::bound::lower_bound;
use crate::cost::gib;
use crate::layout::{Layout, PlanContext};
use crate::plan::{
    MicroBatch, Prediction, RankPrediction, STEP_PLAN_VERSION, SequencePlan, Shard, StepPlan,
    group_zigzag,
};
use crate::sim::simulate_with_routes;

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
