//! weft's planner: pure, deterministic algorithms with no I/O, shared by the
//! operator (which plans the mesh of each epoch) and by every worker (which plans
//! each step identically, without talking to the others).
//!
//! - [`cluster`]: nodes, GPUs, NICs and their affinity, and the shorthand that
//!   describes them; [`topology`]: the ranks of a cluster.
//! - [`mesh`]: the topology-aware mesh of each epoch (which workers, where,
//!   with which ranks and NICs), for the operator.
//! - [`model`]: transformer shapes and presets.
//! - [`cost`]: time and memory of a sequence's share of a step.
//! - [`plan`]: the step plan document and its invariants.
//! - [`strategies`], [`flexsp`] and [`weft`]: the baselines and weft's own strategy, each
//!   returning a layout; [`sim`] prices a layout and builds its step plan, and
//!   gives the lower bound every plan is compared with.
//! - [`input`] reads lengths, cluster and model files; [`report`] runs
//!   `weft simulate`; [`rng`] is the deterministic generator both use;
//!   [`synthetic`] samples length distributions calibrated to published figures.

pub mod cluster;
pub mod cost;
pub mod flexsp;
pub mod input;
pub mod mesh;
pub mod model;
pub mod picture;
pub mod plan;
pub mod profile;
pub mod report;
pub mod rng;
pub mod sim;
pub mod strategies;
pub mod synthetic;
pub mod topology;
pub mod weft;

pub use sim::{PlanContext, PlanLimits, build_plan, lower_bound, simulate};
pub use strategies::{PlanningError, Strategy, plan_layout};

/// Plans one batch with one strategy and returns the step plan document.
pub fn plan_step(
    strategy: Strategy,
    ctx: &PlanContext,
    lengths: &[u64],
    context_length: Option<u64>,
) -> Result<plan::StepPlan, PlanningError> {
    let layout = plan_layout(strategy, ctx, lengths, context_length)?;
    Ok(build_plan(ctx, lengths, &layout))
}
