//! weft's operator: reconciles `TrainingJob`s into gangs of GPU worker pods and
//! plans their mesh from the cluster's topology.
//!
//! So far it holds three steps of the reconcile pipeline, all pure: observe for
//! nodes ([`inventory`]: what weft sees of a cluster's GPUs, NICs and racks),
//! build ([`build`]: the pods, Service and mesh ConfigMap a job owns for an
//! epoch, from the mesh that `weft_planner::mesh` plans) and status
//! ([`status`]: phase, workers and conditions from what was observed);
//! [`controller`] runs them against the API server (`weft-operator run`).

pub mod build;
pub mod controller;
pub mod inventory;
pub mod status;
