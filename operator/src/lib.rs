//! weft's operator: reconciles `TrainingJob`s into gangs of GPU worker pods and
//! plans their mesh from the cluster's topology.
//!
//! The reconcile pipeline's steps are pure and tested without a cluster:
//! observe for nodes ([`inventory`]: what weft sees of a cluster's GPUs, NICs
//! and racks), validate and build ([`build`]: the model resolved, and the pods,
//! Service and mesh ConfigMap a job owns for an epoch, from the mesh that
//! `weft_planner::mesh` plans), the job's life ([`lifecycle`]: restart budget,
//! completion, rescale cooldown) and status ([`status`]: phase, workers and
//! conditions from what was observed); [`controller`] runs them, with
//! [`events`] for what people should see, against the
//! API server (`weft-operator run`).

pub mod build;
pub mod controller;
pub mod events;
pub mod inventory;
pub mod leader;
pub mod lifecycle;
pub mod metrics;
pub mod status;
pub mod telemetry;
