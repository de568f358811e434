//! `static`: Megatron-LM context parallelism (see [`crate::strategies`]).

use std::cmp::Reverse;

use crate::error::{CP_DEGREE, PlanningError};
use crate::layout::{Layout, LayoutGroup, LayoutMicroBatch, PlanContext, Routing};
use crate::schedule::*;

/// Megatron-LM context parallelism (see the module documentation).
pub fn plan_static(
    ctx: &PlanContext,
    lengths: &[u64],
    context_length: Option<u64>,
) -> Result<Layout, PlanningError> {
    let capacity = rank_capacity(ctx)?;
    check_fits(ctx, lengths, capacity)?;
    let world = ctx.topology.world();
    let longest = lengths
        .iter()
        .copied()
        .max()
        .unwrap_or(1)
        .max(context_length.unwrap_or(0));
    let need = min_degree(longest, capacity);
    let items: Vec<(usize, u64)> = lengths.iter().copied().enumerate().collect();
    let pack_for = |d: u32| (u64::from(d) * capacity).min(longest.max(1));
    let degree = match ctx.limits.cp_degree {
        // The job's own degree ([`check_limits`] saw it fits): data-parallel
        // groups of it, and ranks past the last whole group idle.
        Some(degree) if (1..=world).contains(&degree) => degree,
        Some(degree) => {
            return Err(PlanningError::DegreeTooLarge {
                limit: CP_DEGREE,
                degree,
                world,
            });
        }
        None => {
            // The CP degree divides the world (data-parallel groups are
            // equal). As a hand-tuned run would, take the smallest such
            // degree that fits the context and still gives every
            // data-parallel group a pack to work on; under a cap with no
            // divisor, the cap (ranks past the last whole group idle).
            let most = ctx.limits.max_cp_degree.unwrap_or(world).min(world);
            let divisors: Vec<u32> = (need..=most).filter(|d| world.is_multiple_of(*d)).collect();
            divisors
                .iter()
                .copied()
                .find(|d| {
                    let packs = best_fit_decreasing(&items, pack_for(*d)).len() as u32;
                    world / d <= packs.max(1)
                })
                .or_else(|| divisors.last().copied())
                .unwrap_or(most)
        }
    };
    let mut packs = best_fit_decreasing(&items, pack_for(degree));
    // Heaviest packs first, each to the data-parallel group with fewest tokens.
    packs.sort_by_key(|p| (Reverse(p.iter().map(|i| lengths[*i]).sum::<u64>()), p[0]));
    let groups = (world / degree) as usize;
    let mut tokens = vec![0u64; groups];
    let mut queue: Vec<Vec<Vec<usize>>> = vec![Vec::new(); groups];
    for p in packs {
        let g = (0..groups).min_by_key(|g| (tokens[*g], *g)).unwrap_or(0);
        tokens[g] += p.iter().map(|i| lengths[*i]).sum::<u64>();
        queue[g].push(p);
    }
    let rounds = queue.iter().map(Vec::len).max().unwrap_or(0);
    let micro_batches = (0..rounds)
        .map(|k| LayoutMicroBatch {
            groups: (0..groups)
                .filter_map(|g| {
                    queue[g].get(k).map(|p| {
                        LayoutGroup::flat(
                            (g as u32 * degree..(g as u32 + 1) * degree).collect(),
                            p.clone(),
                        )
                    })
                })
                .collect(),
            remap: false,
        })
        .collect();
    Ok(Layout {
        strategy: "static".to_string(),
        micro_batches,
        routing: Routing::ClosestNic,
    })
}
