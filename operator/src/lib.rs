//! weft's operator: reconciles `TrainingJob`s into gangs of GPU worker pods and
//! plans their mesh from the cluster's topology.
//!
//! One reconcile is the pipeline of [`reconcile`]: observe (the job, its
//! pods, claims and published mesh, the caches of nodes and pods), decide
//! (pure, table-tested: [`reconcile::decide`]), apply, and one conditional
//! status write before the events it records. Its pure parts: what weft sees
//! of a cluster's GPUs, NICs and racks ([`inventory`]), the objects a job
//! owns for an epoch ([`build`], from the mesh that `weft_planner::mesh`
//! plans), the job's life ([`lifecycle`]: restart budget, completion, nodes
//! avoided, rescale cooldown) and its status ([`status`]). [`controller`]
//! runs the reconciles (`weft-operator run`), with [`events`] for what
//! people should see.

pub mod build;
pub mod controller;
pub mod events;
pub mod inventory;
pub mod leader;
pub mod lifecycle;
pub mod metrics;
pub mod reconcile;
pub mod status;
pub mod telemetry;
#[cfg(test)]
pub(crate) mod testing;
