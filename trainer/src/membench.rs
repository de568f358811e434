//! `weft-trainer bench memory`: what each way of keeping activations for the
//! backward costs, measured on the engine itself.
//!
//! Three methods run the same training step of one sequence on one rank:
//! plain backprop (every layer's graph kept from forward to backward),
//! per-layer gradient checkpointing (each layer's input kept, the layer
//! recomputed whole in the backward) and StreamBP (the same, recomputed and
//! backpropagated in chunks along the sequence, the head and loss too). For
//! each: the peak memory of one step at a given length, the longest sequence
//! whose step stays within a memory budget, and seconds per token.
//!
//! Memory is measured, not computed: every step runs in a process of its own
//! ([`probe`], started by the driver in the binary, with glibc told to map
//! large allocations on their own and to give freed memory back at once, so
//! the resident set follows what is alive), which records its resident set
//! before the step (model, gradients, libtorch loaded, a two-token step run)
//! and its peak resident set during it (the kernel's high-water mark, reset
//! just before the step where the kernel allows it); the step's peak is the
//! difference. The longest sequence is found the same way, by running steps
//! of growing and then bisected lengths.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use weft_planner::cost::{CostCoefficients, CostModel, StreamBp};
use weft_planner::layout::{Layout, LayoutGroup, LayoutMicroBatch, Routing};
use weft_planner::model::ModelSpec;

use crate::comm::{ProcessGroup, Store};
use crate::data::{Batch, Sample};
use crate::launch::free_port;
use crate::model::{Llama, Precision};
use crate::step::{Backprop, StepError, forward_backward, named_parameters, zero_gradients};

/// What went wrong while measuring.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Step(#[from] StepError),
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    #[error("this system does not report a process's memory (/proc/self/status): {0}")]
    NoMemoryFigures(String),
    #[error("{0}")]
    Plan(String),
}

impl BenchError {
    /// A stable, machine-readable name for the kind of failure.
    pub fn category(&self) -> &'static str {
        match self {
            BenchError::Step(e) => e.category(),
            BenchError::Torch(_) => "torch",
            BenchError::NoMemoryFigures(_) => "platform",
            BenchError::Plan(_) => "plan",
        }
    }
}

/// A way of keeping what the backward needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    Plain,
    Checkpointing,
    Streambp,
}

impl Method {
    pub const ALL: [Method; 3] = [Method::Plain, Method::Checkpointing, Method::Streambp];

    pub fn name(self) -> &'static str {
        match self {
            Method::Plain => "plain",
            Method::Checkpointing => "checkpointing",
            Method::Streambp => "streambp",
        }
    }

    /// How the step backpropagates with this method; StreamBP in chunks of
    /// `chunk` tokens. Per-layer checkpointing is StreamBP with the whole
    /// sequence as one chunk: the layer's input kept, the layer recomputed
    /// whole.
    pub fn backprop(self, chunk: u64) -> Backprop {
        match self {
            Method::Plain => Backprop::Plain,
            Method::Checkpointing => Backprop::Streamed {
                chunk_tokens: u64::MAX,
            },
            Method::Streambp => Backprop::Streamed {
                chunk_tokens: chunk,
            },
        }
    }
}

/// One measured step.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Probe {
    pub seq_len: u64,
    /// Peak resident memory of the step beyond what the process held before
    /// it, bytes.
    pub peak_bytes: u64,
    /// Whether the high-water mark could be reset before the step (else it
    /// includes the model's initialisation, which only ever overstates).
    pub exact_peak: bool,
    /// Seconds of the step's forward and backward.
    pub seconds: f64,
}

/// The step a probe runs (the JSON a probe process is started with).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProbeConfig {
    pub model: ModelSpec,
    pub precision: Precision,
    pub method: Method,
    /// StreamBP's chunk.
    pub chunk: u64,
    pub seq_len: u64,
    pub threads: i32,
}

/// A field of `/proc/self/status` (`VmRSS`, `VmHWM`), bytes.
pub fn status_bytes(field: &str) -> Result<u64, BenchError> {
    let status = std::fs::read_to_string("/proc/self/status")
        .map_err(|e| BenchError::NoMemoryFigures(e.to_string()))?;
    status
        .lines()
        .find_map(|line| {
            let rest = line.strip_prefix(field)?.strip_prefix(':')?;
            let kib: u64 = rest.trim().strip_suffix("kB")?.trim().parse().ok()?;
            Some(kib * 1024)
        })
        .ok_or_else(|| BenchError::NoMemoryFigures(format!("no {field} line")))
}

/// Resets the kernel's high-water mark of this process's resident set to its
/// current size; false where the kernel does not allow it.
pub fn reset_peak() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Runs one training step of one sequence of `config.seq_len` tokens on one
/// rank, in this process, and measures it (see the module documentation).
/// Meant to run in a process of its own: the peak is this process's.
pub fn probe(config: &ProbeConfig) -> Result<Probe, BenchError> {
    tch::set_num_threads(config.threads.max(1));
    let timeout = Duration::from_secs(60);
    let port = free_port().map_err(|e| BenchError::Plan(e.to_string()))?;
    let store = Store::open("127.0.0.1", port, 1, true, timeout).map_err(StepError::from)?;
    let mut group =
        ProcessGroup::gloo(&store, 0, 1, "127.0.0.1", timeout).map_err(StepError::from)?;
    tch::manual_seed(0);
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let model = Llama::new(&vs.root(), &config.model)
        .map_err(StepError::from)?
        .with_precision(config.precision);
    let params = named_parameters(&vs);
    zero_gradients(&params)?;
    let vocab = u64::from(config.model.vocab.max(2));
    let mut rng = weft_planner::rng::SplitMix64::new(1);
    let batch = Batch {
        samples: vec![Sample {
            index: 0,
            document: 0,
            tokens: (0..config.seq_len)
                .map(|_| rng.below(vocab) as u32)
                .collect(),
        }],
    };
    let plan = one_rank_plan(&config.model, config.seq_len)?;
    // A two-token step first, so that what any step sets up once (thread
    // pools, kernel workspaces, the gradients' pages) is not counted as
    // this step's.
    let warm_up = Batch {
        samples: vec![Sample {
            index: 0,
            document: 0,
            tokens: vec![1, 2],
        }],
    };
    let chunk = config.method.backprop(config.chunk).chunk_tokens();
    forward_backward(
        &model,
        &mut group,
        &one_rank_plan(&config.model, 2)?.with_backprop_everywhere(chunk),
        &warm_up,
    )?;
    zero_gradients(&params)?;
    let exact_peak = reset_peak();
    let before = status_bytes("VmRSS")?;
    let started = Instant::now();
    forward_backward(
        &model,
        &mut group,
        &plan.with_backprop_everywhere(chunk),
        &batch,
    )?;
    let seconds = started.elapsed().as_secs_f64();
    let peak = status_bytes("VmHWM")?;
    Ok(Probe {
        seq_len: config.seq_len,
        peak_bytes: peak.saturating_sub(before),
        exact_peak,
        seconds,
    })
}

/// The plan of one sequence whole on one rank (whatever the memory model
/// would say of its length: measuring that is the point).
fn one_rank_plan(
    model: &ModelSpec,
    seq_len: u64,
) -> Result<weft_planner::plan::StepPlan, BenchError> {
    let plan_error = |e: String| BenchError::Plan(format!("the benchmark's plan: {e}"));
    let ctx = crate::train::local_plan_context(1, &crate::train::PlanSettings::of(model))
        .map_err(|e| plan_error(e.to_string()))?;
    let layout = Layout {
        strategy: "one-rank".to_string(),
        micro_batches: vec![LayoutMicroBatch {
            groups: vec![LayoutGroup::flat(vec![0], vec![0])],
            remap: false,
        }],
        routing: Routing::ClosestNic,
    };
    let plan = weft_planner::build_plan(&ctx, &[seq_len], &layout);
    plan.check().map_err(|e| plan_error(e.to_string()))?;
    Ok(plan)
}

/// What the planner's memory model predicts a step of one sequence of
/// `seq_len` tokens keeps beyond the model's states, bytes, in `precision`,
/// with the bf16 weight copies this unsharded engine keeps; `None` for a
/// method it does not model.
pub fn predicted_bytes(
    model: &ModelSpec,
    precision: Precision,
    method: Method,
    chunk: u64,
    seq_len: u64,
) -> Option<f64> {
    let streambp = match method {
        Method::Plain => StreamBp::Off,
        Method::Streambp => StreamBp::Always,
        Method::Checkpointing => return None,
    };
    let cost = CostModel::new(
        model.clone(),
        CostCoefficients {
            streambp,
            streambp_chunk: chunk,
            precision: precision.activations(),
            ..Default::default()
        },
    );
    Some(crate::memory::engine_step_bytes(&cost, seq_len as f64))
}

/// The longest sequence whose predicted step ([`predicted_bytes`]) is
/// within `budget` bytes; `None` for a method the planner does not model.
pub fn predicted_longest(
    model: &ModelSpec,
    precision: Precision,
    method: Method,
    chunk: u64,
    budget: u64,
) -> Option<u64> {
    predicted_bytes(model, precision, method, chunk, 2)?;
    Some(weft_planner::cost::last_fitting(|len| {
        predicted_bytes(model, precision, method, chunk.min(len), len)
            .is_some_and(|bytes| bytes <= budget as f64)
    }))
}

/// One method's figures.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MethodReport {
    pub name: String,
    /// Peak memory of a step at the report's `seq_len`, GiB.
    pub peak_gib: f64,
    /// The longest sequence found whose step's peak stays within the budget.
    pub max_len: u64,
    /// Seconds per token of the step at the report's `seq_len`.
    pub s_per_token: f64,
    /// The planner's prediction for the step at `seq_len`, in the same
    /// precision, GiB; absent for checkpointing, which it does not model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub predicted_gib: Option<f64>,
    /// The peak measured at `max_len`, GiB, and the planner's prediction
    /// for it: the model against the engine where memory binds.
    #[serde(default)]
    pub max_len_peak_gib: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_len_predicted_gib: Option<f64>,
    /// The longest sequence the planner's model says fits the budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub predicted_max_len: Option<u64>,
    /// Every step measured, in the order run.
    pub probes: Vec<Probe>,
}

/// The whole benchmark.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MemoryReport {
    pub budget_gib: f64,
    pub seq_len: u64,
    pub model: String,
    pub params: f64,
    pub precision: Precision,
    pub stream_bp_chunk: u64,
    pub methods: Vec<MethodReport>,
}

pub const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

/// The longest length within `budget` bytes, found by measuring: doubling
/// from `start` until a step goes over (or `ceiling` is reached), then
/// bisecting to within `resolution` of the answer (0 when not even two
/// tokens fit). `measure` runs one step.
pub fn longest_within<E>(
    budget: u64,
    start: u64,
    ceiling: u64,
    resolution: f64,
    mut measure: impl FnMut(u64) -> Result<Probe, E>,
) -> Result<(u64, Vec<Probe>), E> {
    let mut probes = Vec::new();
    let mut fits = 0u64;
    let mut over: Option<u64> = None;
    let mut len = start.max(2);
    // Grow.
    while len <= ceiling {
        let probe = measure(len)?;
        probes.push(probe);
        if probe.peak_bytes <= budget {
            fits = len;
            len = len.saturating_mul(2);
        } else {
            over = Some(len);
            break;
        }
    }
    let Some(mut high) = over else {
        return Ok((fits, probes));
    };
    // Bisect between the longest that fits and the shortest that does not.
    // (A sequence of one token predicts nothing: 1 stands for "none fits".)
    let mut low = fits.max(1);
    while (high - low) as f64 > resolution * high as f64 && high - low > 1 {
        let mid = low + (high - low) / 2;
        let probe = measure(mid)?;
        probes.push(probe);
        if probe.peak_bytes <= budget {
            low = mid;
        } else {
            high = mid;
        }
    }
    Ok((if low < 2 { 0 } else { low }, probes))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `--methods` names each method as the report does.
    #[test]
    fn methods_are_named_on_the_command_line_as_in_the_report() {
        use clap::ValueEnum;
        assert_eq!(Method::value_variants(), &Method::ALL);
        for method in Method::ALL {
            assert_eq!(crate::flag_name(&method), method.name());
        }
    }

    /// A step whose peak grows linearly with the length: the search finds
    /// the longest length within the budget to its resolution.
    #[test]
    fn the_search_finds_the_longest_length_within_the_budget() {
        let measure = |len: u64| {
            Ok::<_, BenchError>(Probe {
                seq_len: len,
                peak_bytes: 1000 * len,
                exact_peak: true,
                seconds: 0.0,
            })
        };
        let (found, probes) = longest_within(1_000_000, 64, 1 << 20, 0.01, measure).unwrap();
        assert!((990..=1000).contains(&found), "{found}");
        assert!(probes.len() < 20);
        // Nothing fits: 0; everything up to the ceiling fits: the last length tried.
        assert_eq!(longest_within(10, 64, 1 << 20, 0.01, measure).unwrap().0, 0);
        assert_eq!(
            longest_within(u64::MAX, 64, 256, 0.01, measure).unwrap().0,
            256
        );
    }
}
