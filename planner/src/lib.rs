//! weft's planner: pure, deterministic algorithms with no I/O, shared by the
//! operator (which plans the mesh of each epoch) and by every worker (which plans
//! each step identically, without talking to the others).
//!
//! - [`cluster`]: nodes, GPUs, NICs and their affinity, and the shorthand that
//!   describes them.
//! - [`model`]: transformer shapes and presets.
//! - [`cost`]: time and memory of a sequence's share of a step.
//! - [`plan`]: the step plan document and its invariants.

pub mod cluster;
pub mod cost;
pub mod model;
pub mod plan;
