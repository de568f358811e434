//! Whether a run fits in the memory it may use, checked before any rank
//! starts: a model too large for the machine would otherwise train until the
//! kernel kills a worker (and, on a shared machine, other processes too).
//!
//! The estimate is a floor, so a run is never refused for memory it would
//! not use: every rank holds the whole model's fp32 weights and gradients
//! and both AdamW moments (16 bytes a parameter; the trainer does not shard
//! them), and, on the CPU, the activations of its share of the batch (the
//! planner's per-token figures, in fp32) and its logits. On GPUs only the
//! host memory the ranks draw their initial weights in is checked here.

use weft_planner::cost::{CostCoefficients, CostModel};
use weft_planner::model::ModelSpec;

use crate::checkpoint::human_bytes;
use crate::device::ComputeDevice;
use crate::model::Precision;

/// A run that does not fit.
#[derive(Debug, thiserror::Error)]
#[error(
    "model {model} does not fit: {ranks} rank(s) need at least {} ({} each: {} for the {} of {:.2}B parameters, {} for the activations of {tokens} tokens), but {} is available ({source_of_limit}); use a smaller model, fewer ranks per machine, or fewer tokens per rank",
    human_bytes(need.total()),
    human_bytes(need.per_rank()),
    human_bytes(need.states),
    need.states_are,
    need.params / 1e9,
    human_bytes(need.activations),
    human_bytes(*available)
)]
pub struct MemoryError {
    pub model: String,
    pub ranks: u32,
    pub tokens: u64,
    pub need: MemoryNeed,
    pub available: u64,
    pub source_of_limit: String,
}

impl MemoryError {
    /// A stable, machine-readable name for the kind of failure.
    pub fn category(&self) -> &'static str {
        "out_of_memory"
    }
}

/// What the ranks of one machine need at least, in bytes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MemoryNeed {
    pub params: f64,
    /// What `states` holds, for people.
    pub states_are: &'static str,
    /// Per rank: weights, gradients, AdamW moments.
    pub states: u64,
    /// Per rank: activations and logits of its tokens.
    pub activations: u64,
    pub ranks: u32,
}

impl MemoryNeed {
    pub fn per_rank(&self) -> u64 {
        self.states + self.activations
    }

    pub fn total(&self) -> u64 {
        self.per_rank().saturating_mul(u64::from(self.ranks))
    }
}

/// What one rank of this engine adds to its memory for a step of `tokens`
/// tokens (the same in both layouts), as `cost` prices it: activations and
/// logits, and the bf16 weight copies its graphs keep, since the engine does
/// not shard its weights.
pub fn engine_step_bytes(cost: &CostModel, tokens: f64) -> f64 {
    cost.step_bytes(tokens, tokens) + cost.unsharded_weight_copy_bytes()
}

/// The least host memory `ranks` ranks of `model` on this machine need, each
/// holding `tokens` tokens of the batch.
pub fn host_need(
    model: &ModelSpec,
    ranks: u32,
    tokens: u64,
    device: ComputeDevice,
    precision: Precision,
) -> MemoryNeed {
    let params = model.params();
    let cost = CostModel::new(
        model.clone(),
        CostCoefficients {
            precision: precision.activations(),
            ..Default::default()
        },
    );
    let (states_are, states, activations) = match device {
        ComputeDevice::Cpu => {
            // Plain backprop's activations and logits, in the run's precision
            // (StreamBP keeps less), and the bf16 weight copies its graphs keep.
            (
                "fp32 weights, gradients and AdamW moments (16 bytes each)",
                16.0 * params,
                engine_step_bytes(&cost, tokens as f64),
            )
        }
        // Initial weights are drawn in host memory, then moved to the GPU.
        ComputeDevice::Cuda => (
            "initial fp32 weights drawn in host memory (4 bytes each)",
            4.0 * params,
            0.0,
        ),
    };
    MemoryNeed {
        params,
        states_are,
        states: states as u64,
        activations: activations as u64,
        ranks,
    }
}

/// Memory this process may still use, bytes, and where that limit comes
/// from: the smaller of the machine's available memory and what the
/// memory cgroup (a pod's limit) leaves. `None` when neither can be read.
pub fn available() -> Option<(u64, String)> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok();
    let machine = meminfo.as_deref().and_then(mem_available);
    let cgroup = cgroup_room();
    match (machine, cgroup) {
        (Some(m), Some(c)) if c < m => Some((c, "the memory limit of this container".to_string())),
        (Some(m), _) => Some((m, "MemAvailable of this machine".to_string())),
        (None, Some(c)) => Some((c, "the memory limit of this container".to_string())),
        (None, None) => None,
    }
}

/// `MemAvailable` of a `/proc/meminfo` text, bytes.
fn mem_available(meminfo: &str) -> Option<u64> {
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|rest| rest.trim().strip_suffix("kB"))
        .and_then(|kb| kb.trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
}

/// What the memory cgroup (v2) of this process leaves: its limit less its
/// use; `None` without a limit.
fn cgroup_room() -> Option<u64> {
    let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = own.lines().find_map(|l| l.strip_prefix("0::"))?;
    let dir = std::path::Path::new("/sys/fs/cgroup").join(path.trim_start_matches('/'));
    let max = std::fs::read_to_string(dir.join("memory.max")).ok()?;
    let max: u64 = max.trim().parse().ok()?; // "max": no limit
    let current: u64 = std::fs::read_to_string(dir.join("memory.current"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(max.saturating_sub(current))
}

/// Refuses a run of `ranks` ranks of `model` on this machine, each holding
/// `tokens` tokens, that needs more memory than this machine (or container)
/// has available.
pub fn check_run(
    model: &ModelSpec,
    ranks: u32,
    tokens: u64,
    device: ComputeDevice,
    precision: Precision,
) -> Result<(), MemoryError> {
    let need = host_need(model, ranks, tokens, device, precision);
    check_fits(model, tokens, need, available())
}

/// Refuses a run whose `need` exceeds `available` memory.
pub fn check_fits(
    model: &ModelSpec,
    tokens: u64,
    need: MemoryNeed,
    available: Option<(u64, String)>,
) -> Result<(), MemoryError> {
    match available {
        Some((bytes, source)) if need.total() > bytes => Err(MemoryError {
            model: model.name.clone(),
            ranks: need.ranks,
            tokens,
            need,
            available: bytes,
            source_of_limit: source,
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_70b_model_is_refused_with_the_figures_and_the_tiny_one_fits() {
        let big = ModelSpec::preset("llama-70b").unwrap();
        let need = host_need(&big, 2, 2048, ComputeDevice::Cpu, Precision::Fp32);
        // 16 bytes for each of about 69B parameters, per rank.
        assert!(need.states > 1_000_000_000_000, "{need:?}");
        let err = check_fits(&big, 2048, need, Some((23 << 30, "test".to_string()))).unwrap_err();
        let text = err.to_string();
        assert_eq!(err.category(), "out_of_memory");
        assert!(
            text.contains("llama-70b") && text.contains("2 rank(s)") && text.contains("23.0 GiB"),
            "{text}"
        );
        let tiny = ModelSpec::preset("tiny").unwrap();
        let need = host_need(&tiny, 8, 4096, ComputeDevice::Cpu, Precision::Fp32);
        assert!(need.total() < 4 << 30, "{need:?}");
        check_fits(&tiny, 4096, need, Some((4 << 30, "test".to_string()))).unwrap();
        // Unknown room: nothing to refuse on.
        check_fits(&big, 2048, need, None).unwrap();
    }

    #[test]
    fn more_ranks_and_tokens_need_more() {
        let model = ModelSpec::preset("llama-7b").unwrap();
        let one = host_need(&model, 1, 1024, ComputeDevice::Cpu, Precision::Fp32);
        let two = host_need(&model, 2, 1024, ComputeDevice::Cpu, Precision::Fp32);
        let longer = host_need(&model, 1, 4096, ComputeDevice::Cpu, Precision::Fp32);
        let bf16 = host_need(&model, 1, 1024, ComputeDevice::Cpu, Precision::Bf16);
        let bf16_longer = host_need(&model, 1, 4096, ComputeDevice::Cpu, Precision::Bf16);
        assert_eq!(two.total(), 2 * one.total());
        assert!(longer.activations > one.activations);
        // bf16 keeps less a token, but a bf16 copy of every layer's weights.
        assert!(bf16_longer.activations - bf16.activations < longer.activations - one.activations);
        assert!(bf16.activations as f64 > 2.0 * model.layers as f64 * model.layer_params());
        let gpu = host_need(&model, 1, 1024, ComputeDevice::Cuda, Precision::Bf16);
        assert!(gpu.total() < one.total());
    }

    #[test]
    fn meminfo_is_read_in_bytes() {
        let text = "MemTotal:       24000000 kB\nMemFree:  100 kB\nMemAvailable:   20000000 kB\n";
        assert_eq!(mem_available(text), Some(20_000_000 * 1024));
        assert_eq!(mem_available("MemTotal: 1 kB\n"), None);
        let (bytes, _) = available().unwrap();
        assert!(bytes > 0);
    }
}
