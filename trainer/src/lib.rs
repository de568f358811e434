//! weft's trainer: the worker that runs inside each pod (and on its own on one
//! machine), executing the planner's step plans on libtorch.
//!
//! So far it holds the data pipeline ([`data`]): the corpus, the byte tokenizer
//! and a global sample order that does not depend on the world size. The model,
//! collectives and distributed attention follow.

pub mod attention;
pub mod comm;
pub mod data;
pub mod remap;
