//! weft's operator: reconciles `TrainingJob`s into gangs of GPU worker pods and
//! plans their mesh from the cluster's topology.
//!
//! So far it holds the observe step for nodes ([`inventory`]): what weft sees of a
//! cluster's GPUs, NICs and racks. The reconcile pipeline follows.

pub mod inventory;
