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
//! - [`layout`]: what a strategy returns (micro-batches of ring groups) and
//!   the context every strategy plans in.
//! - [`strategies`]: the baselines and weft's own strategy
//!   ([`strategies::weft`]), each returning a layout, over the scheduling
//!   toolkit they share ([`schedule`]).
//! - [`sim`] prices a layout; [`bound`] is the lower bound every plan is
//!   compared with; [`step_plan`] builds a layout's step plan.
//! - [`error`]: why a batch cannot be planned.
//! - [`input`] reads lengths, cluster and model files; [`report`] runs
//!   `weft simulate`; [`rng`] is the deterministic generator both use;
//!   [`synthetic`] samples length distributions calibrated to published figures.

pub mod bound;
pub mod cluster;
pub mod cost;
pub mod error;
pub mod input;
pub mod layout;
pub mod mesh;
pub mod model;
pub mod picture;
pub mod plan;
pub mod profile;
pub mod report;
pub mod rng;
pub mod schedule;
pub mod sim;
pub mod step_plan;
pub mod strategies;
pub mod synthetic;
pub mod topology;

pub use bound::lower_bound;
pub use error::PlanningError;
pub use layout::{PlanContext, PlanLimits};
pub use sim::simulate;
pub use step_plan::build_plan;
pub use strategies::{Strategy, plan_layout};

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
