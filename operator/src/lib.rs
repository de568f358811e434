//! weft's operator: reconciles `TrainingJob`s into gangs of GPU worker pods and
//! plans their mesh from the cluster's topology.
//!
//! So far it holds two steps of the reconcile pipeline: observe for nodes
//! ([`inventory`]: what weft sees of a cluster's GPUs, NICs and racks) and build
//! ([`build`]: the pods, Service and mesh ConfigMap a job owns for an epoch,
//! from the mesh that `weft_planner::mesh` plans). Apply and status follow.

pub mod build;
pub mod inventory;
