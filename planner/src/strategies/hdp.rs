//! `hdp` and `hdp-offload`: ByteScale's hybrid data parallelism, without and
//! with selective offloading (see [`crate::strategies`]).

use crate::error::PlanningError;
use crate::layout::{Layout, PlanContext, Routing};
use crate::schedule::*;

/// ByteScale's hybrid data parallelism (see the module documentation).
pub fn plan_hdp(ctx: &PlanContext, lengths: &[u64]) -> Result<Layout, PlanningError> {
    let capacity = rank_capacity(ctx)?;
    check_fits(ctx, lengths, capacity)?;
    let all: Vec<usize> = (0..lengths.len()).collect();
    let work = pieces(ctx, lengths, &all, capacity, true, |s| {
        min_degree(s, capacity)
    });
    let micro_batches =
        list_schedule(ctx, lengths, work, None, least_loaded, Placement::IN_ORDER).micro_batches;
    Ok(Layout {
        strategy: "hdp".to_string(),
        micro_batches,
        routing: Routing::ClosestNic,
    })
}

/// ByteScale's HDP with selective offloading (see the module documentation).
pub fn plan_hdp_offload(ctx: &PlanContext, lengths: &[u64]) -> Result<Layout, PlanningError> {
    let capacity = rank_capacity(ctx)?;
    check_fits(ctx, lengths, capacity)?;
    let gpu = ctx.topology.gpu_of(0).clone();
    let all: Vec<usize> = (0..lengths.len()).collect();
    let work = pieces(ctx, lengths, &all, capacity, true, |s| {
        ctx.cost.offload_plan(s, capacity, &gpu).1
    });
    let mut micro_batches =
        list_schedule(ctx, lengths, work, None, least_loaded, Placement::IN_ORDER).micro_batches;
    for group in micro_batches.iter_mut().flat_map(|m| m.groups.iter_mut()) {
        if let [sequence] = group.sequences[..] {
            let (ratio, ranks) = ctx.cost.offload_plan(lengths[sequence], capacity, &gpu);
            if ranks as usize == group.ranks.len() {
                group.offload = ratio;
            }
        }
    }
    Ok(Layout {
        strategy: "hdp-offload".to_string(),
        micro_batches,
        routing: Routing::ClosestNic,
    })
}
