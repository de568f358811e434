//! weft's trainer: the worker that runs inside each pod (and on its own on one
//! machine), executing the planner's step plans on libtorch.
//!
//! - [`data`]: the corpus, the byte tokenizer, and a global sample order that
//!   does not depend on the world size.
//! - [`comm`]: libtorch's collectives (c10d: TCPStore, Gloo and NCCL) from
//!   Rust; [`device`]: the CPU or one GPU per rank.
//! - [`attention`]: zigzag ring attention, forward and backward, packed
//!   documents and grouped-query attention, over the block kernels of
//!   [`kernel`]; [`remap`]: the attention ↔ linear
//!   layout all-to-all of the step plan.
//! - [`model`]: the Llama-style decoder; [`hf`]: Hugging Face model
//!   directories (config and safetensors) read into it and written back;
//!   [`step`]: its distributed forward
//!   and backward over a step plan, exact against one process; [`optim`]:
//!   AdamW, clipping and the learning-rate schedule; [`train`]: the loop every
//!   worker runs; [`checkpoint`]: checkpoints verified against their
//!   manifest, written whole or not at all, in a directory one run owns.
//! - [`launch`] and [`selfcheck`]: local multi-process workers, and the check
//!   a user runs on a new cluster.
//! - [`pod`]: the pod's worker: its environment, the mesh it follows, and
//!   one rank process per GPU for each epoch. What it asks of the API server
//!   (the mesh through the API, progress into the job's status) is the pod
//!   agent's, `weft-agent`, which only the binary links: this library
//!   builds and tests without a Kubernetes client.

pub mod attention;
pub mod checkpoint;
pub mod comm;
pub mod data;
pub mod decompose;
pub mod device;
pub mod fault;
pub mod hf;
pub mod kernel;
pub mod launch;
pub mod membench;
pub mod memory;
pub mod model;
pub mod optim;
pub mod pod;
pub mod profile;
pub mod remap;
pub mod selfcheck;
pub mod step;
pub mod steptrace;
pub mod throughput;
pub mod train;

/// The longest start of `text` within `bytes` bytes that ends at a
/// character: an error that may quote a document, or a message a reader
/// keeps only so much of.
pub fn prefix_within(text: &str, bytes: usize) -> &str {
    if text.len() <= bytes {
        return text;
    }
    let mut end = bytes;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// The name `value` has on the command line (its `clap::ValueEnum` name).
pub fn flag_name(value: &impl clap::ValueEnum) -> String {
    value
        .to_possible_value()
        .map(|v| v.get_name().to_string())
        .unwrap_or_default()
}

/// Runs `f` right after seeding libtorch's global generator, holding a lock:
/// unit tests run in parallel threads and would otherwise draw from each
/// other's seeds.
#[cfg(test)]
pub(crate) fn seeded<T>(seed: i64, f: impl FnOnce() -> T) -> T {
    static GENERATOR: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _held = GENERATOR.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(seed);
    f()
}
