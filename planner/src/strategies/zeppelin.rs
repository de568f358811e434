//! `zeppelin`: hierarchical partitioning, routing over every NIC and a
//! remapping layer (see [`crate::strategies`]).

use crate::error::PlanningError;
use crate::layout::{Layout, PlanContext, Routing, use_hierarchical_rings};
use crate::schedule::*;

/// Zeppelin's hierarchical partitioning, routing and remapping (see the module documentation).
pub fn plan_zeppelin(ctx: &PlanContext, lengths: &[u64]) -> Result<Layout, PlanningError> {
    let capacity = rank_capacity(ctx)?;
    check_fits(ctx, lengths, capacity)?;
    let per_node = ctx.topology.max_gpus_per_node();
    let degree = |s: u64| whole_nodes_past_one(min_degree(s, capacity), per_node);
    let pick = hierarchical_pick(ctx);
    let mut micro_batches = Vec::new();
    // Linear tokens are spread evenly; keep a tenth of room for rounding.
    for part in split_micro_batches(lengths, ctx.topology.world(), capacity * 9 / 10) {
        micro_batches.extend(schedule_remapped(
            ctx,
            lengths,
            capacity,
            &part,
            |p| pieces(ctx, lengths, p, capacity, false, degree),
            &pick,
        ));
    }
    let mut layout = Layout {
        strategy: "zeppelin".to_string(),
        micro_batches,
        routing: Routing::AllNics,
    };
    // Intra-node before inter-node: multi-node rings go round inside each node first.
    use_hierarchical_rings(&ctx.topology, &mut layout);
    Ok(layout)
}
