//! The strategies: each turns a batch into a [`Layout`], which the simulator
//! prices and [`crate::step_plan::build_plan`] turns into a step plan.
//!
//! - `static`: Megatron-LM context parallelism. One CP degree for every
//!   sequence, sized for the longest (or the configured context), data parallel
//!   over the rest; sequences packed into packs of the context length and split
//!   zigzag over the CP group; packs spread over DP groups by tokens.
//! - `hdp`: ByteScale's hybrid data parallelism. Each sequence gets the fewest
//!   ranks its activations fit on (`D(s) = ⌈s / C⌉`); short ones are best-fit
//!   packed onto single ranks; the balance scheduler hands the next, costliest
//!   piece of work to the ranks that are least busy, so cheap ranks take more
//!   micro-batches. One global communicator, no topology awareness.
//! - `hdp-offload`: `hdp` with ByteScale's selective offloading: a sequence
//!   longer than a rank holds copies a share of its middle layers'
//!   activations to host memory, as much as the forward compute hides, and so
//!   fits on fewer ranks (Eq. 3); the group carries that share.
//! - `flexsp`: see [`flexsp`].
//! - `zeppelin`: hierarchical partitioning (a sequence that needs up to a node's
//!   GPUs stays inside one node; longer ones take whole nodes), inter-node
//!   transfers spread over all NICs, and a remapping layer that gives linear
//!   modules a token-balanced layout. Only Zeppelin's abstract is public; this is
//!   our reading of it.
//! - `weft`: see [`weft`].
//!
//! What they share (capacities, pieces of work, list scheduling, placement)
//! is in [`crate::schedule`].
//!
//! `C`, the tokens a rank can hold, comes from the cost model's memory budget.

pub mod flexsp;
pub mod hdp;
pub mod static_cp;
pub mod weft;
pub mod zeppelin;

pub use flexsp::plan_flexsp;
pub use hdp::{plan_hdp, plan_hdp_offload};
pub use static_cp::plan_static;
pub use weft::plan_weft;
pub use zeppelin::plan_zeppelin;

use crate::cost::StreamBp;
pub use crate::error::{CP_DEGREE, MAX_CP_DEGREE, PlanningError};
use crate::layout::{Layout, PlanContext, Routing};
use crate::schedule::{min_degree, rank_capacity};

/// Refuses, by name, limits the strategy cannot keep to and batches they
/// make impossible.
pub(crate) fn check_limits(
    strategy: Strategy,
    ctx: &PlanContext,
    lengths: &[u64],
    context_length: Option<u64>,
) -> Result<(), PlanningError> {
    let limits = &ctx.limits;
    let world = ctx.topology.world();
    if strategy == Strategy::HdpOffload && !limits.offload_activations {
        return Err(PlanningError::OffloadUnsupported);
    }
    if limits.cp_degree.is_some() && strategy != Strategy::Static {
        return Err(PlanningError::UnsupportedLimit {
            strategy: strategy.name(),
            limit: CP_DEGREE,
            supported: "static",
        });
    }
    if limits.max_cp_degree.is_some() && !matches!(strategy, Strategy::Static | Strategy::Weft) {
        return Err(PlanningError::UnsupportedLimit {
            strategy: strategy.name(),
            limit: MAX_CP_DEGREE,
            supported: "weft and static",
        });
    }
    if let (Some(degree), Some(most)) = (limits.cp_degree, limits.max_cp_degree)
        && degree > most
    {
        return Err(PlanningError::DegreeOverCap { degree, most });
    }
    // The degree every ring may have at most, and the limit that sets it.
    let (limit, most) = match (limits.cp_degree, limits.max_cp_degree) {
        (Some(d), _) => (CP_DEGREE, d),
        (None, Some(d)) => (MAX_CP_DEGREE, d),
        (None, None) => return Ok(()),
    };
    if most > world {
        if limit == CP_DEGREE {
            return Err(PlanningError::DegreeTooLarge {
                limit,
                degree: most,
                world,
            });
        }
        // A cap above the world caps nothing.
        return Ok(());
    }
    let capacity = rank_capacity(ctx)?;
    let context = if strategy == Strategy::Static {
        context_length
    } else {
        None
    };
    let longest = lengths
        .iter()
        .copied()
        .enumerate()
        .map(|(i, s)| (s, format!("sequence {i}")))
        .chain(context.map(|c| {
            (
                c,
                "the context length (data.maxSequenceLength, --max-seq-len)".to_string(),
            )
        }))
        .fold(None, |best: Option<(u64, String)>, (s, what)| match best {
            Some((b, _)) if b >= s => best,
            _ => Some((s, what)),
        });
    if let Some((length, what)) = longest {
        let needs = min_degree(length, capacity);
        if needs > most {
            return Err(PlanningError::DegreeTooSmall {
                what,
                length,
                needs,
                capacity,
                limit,
                degree: most,
            });
        }
    }
    Ok(())
}

/// Plans a batch with one strategy. `context_length` is the configured maximum
/// sequence length, which `static` sizes its context-parallel degree for.
pub fn plan_layout(
    strategy: Strategy,
    ctx: &PlanContext,
    lengths: &[u64],
    context_length: Option<u64>,
) -> Result<Layout, PlanningError> {
    // Given the choice of where to stream, the limits are checked against
    // what streaming fits; strategies other than weft do not choose, they
    // stream every ring.
    let per_ring = (ctx.cost.coefficients.streambp == StreamBp::PerRing).then(|| PlanContext {
        cost: ctx.cost.with_streaming(true),
        ..ctx.clone()
    });
    check_limits(
        strategy,
        per_ring.as_ref().unwrap_or(ctx),
        lengths,
        context_length,
    )?;
    let ctx = match &per_ring {
        Some(streamed) if strategy != Strategy::Weft => streamed,
        _ => ctx,
    };
    let mut layout = match strategy {
        Strategy::Static => plan_static(ctx, lengths, context_length),
        Strategy::Hdp => plan_hdp(ctx, lengths),
        Strategy::HdpOffload => plan_hdp_offload(ctx, lengths),
        Strategy::FlexSp => plan_flexsp(ctx, lengths),
        Strategy::Zeppelin => plan_zeppelin(ctx, lengths),
        Strategy::Weft => plan_weft(ctx, lengths, context_length),
    }?;
    if !ctx.limits.nic_aware_routing {
        layout.routing = Routing::ClosestNic;
    }
    if ctx.cost.streams() {
        layout.stream_everywhere();
    }
    if let Some(widest) = widest_ring_past(&layout, ctx.limits.max_cp_degree) {
        return Err(PlanningError::Solver {
            strategy: strategy.name().to_string(),
            reason: format!(
                "it made a ring of {widest} ranks, past {MAX_CP_DEGREE} {}",
                ctx.limits.max_cp_degree.unwrap_or(0)
            ),
        });
    }
    Ok(layout)
}

/// The widest ring of `layout` when it has more ranks than `cap`.
pub fn widest_ring_past(layout: &Layout, cap: Option<u32>) -> Option<u32> {
    let cap = cap?;
    layout
        .micro_batches
        .iter()
        .flat_map(|mb| &mb.groups)
        .map(|g| g.ranks.len() as u32)
        .max()
        .filter(|widest| *widest > cap)
}

/// The strategies, in the order reports list them; as flags, by
/// [`Strategy::name`].
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    Static,
    Hdp,
    HdpOffload,
    #[value(name = "flexsp")]
    #[serde(rename = "flexsp")]
    FlexSp,
    Zeppelin,
    Weft,
}

impl Strategy {
    pub const ALL: [Strategy; 6] = [
        Strategy::Static,
        Strategy::Hdp,
        Strategy::HdpOffload,
        Strategy::FlexSp,
        Strategy::Zeppelin,
        Strategy::Weft,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Strategy::Static => "static",
            Strategy::Hdp => "hdp",
            Strategy::HdpOffload => "hdp-offload",
            Strategy::FlexSp => "flexsp",
            Strategy::Zeppelin => "zeppelin",
            Strategy::Weft => "weft",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Strategy;
    use clap::ValueEnum;

    /// A strategy's flag is the name reports print, both ways.
    #[test]
    fn every_strategy_is_named_on_the_command_line_as_in_reports() {
        assert_eq!(Strategy::value_variants(), &Strategy::ALL);
        for strategy in Strategy::ALL {
            let flag = strategy
                .to_possible_value()
                .map(|v| v.get_name().to_string());
            assert_eq!(flag.as_deref(), Some(strategy.name()));
            assert_eq!(Strategy::from_str(strategy.name(), false), Ok(strategy));
            let json = serde_json::to_value(strategy).ok();
            assert_eq!(
                json.as_ref().and_then(|j| j.as_str()),
                Some(strategy.name())
            );
        }
    }
}
