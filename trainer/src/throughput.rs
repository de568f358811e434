//! `weft-trainer bench throughput`: training speed as people compare it,
//! tokens per second per device and model FLOPs utilisation (MFU), at given
//! sequence lengths, for two ways of running the same model:
//!
//! - the **engine**: `weft-trainer local`, the distributed step the trainer
//!   runs in a job (planned rings of ring attention, StreamBP where the plan
//!   chooses it, the remap, the gradient all-reduce), its figures read from
//!   the run's metrics;
//! - **plain**: one process, one device, the model's own forward and
//!   backward over the whole sequence with libtorch's attention (its fused
//!   kernel on a GPU) and every activation kept, then the same AdamW update:
//!   what one would write without weft, for comparison.
//!
//! Every step trains on one document of the given length per device (the
//! built-in corpus joined and cut, so each document is exactly that long),
//! and each configuration runs in a process of its own, so what one leaves
//! behind (or a device out of memory) does not touch the next.
//!
//! Model FLOPs are counted as the papers count them: 6 per parameter per
//! token for the matrix products (the embedding lookup excluded, the LM
//! head included) and, per layer, 6·L²·h for the causal attention of a
//! document of L tokens (forward 2·L²·h: half the score and value products
//! of a full square); recomputation (StreamBP) is not counted, so MFU is
//! the share of the device's datasheet peak that went into the model's own
//! arithmetic.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use weft_planner::model::ModelSpec;

use crate::data::{BatchCursor, BatchStream, Corpus, Tokenizer};
use crate::device::ComputeDevice;
use crate::model::{Llama, Precision};
use crate::optim::{AdamW, AdamWConfig, OptimError};
use crate::step::{StepError, named_parameters, reference_forward_backward, zero_gradients};
use crate::train::StepMetrics;

/// What went wrong while measuring.
#[derive(Debug, thiserror::Error)]
pub enum ThroughputError {
    #[error(transparent)]
    Step(#[from] StepError),
    #[error(transparent)]
    Optim(#[from] OptimError),
    #[error(transparent)]
    Device(#[from] crate::device::DeviceError),
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    #[error("the benchmark's documents in {path}: {source}")]
    Documents {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the run's metrics: {0}")]
    Metrics(String),
}

impl ThroughputError {
    /// A stable, machine-readable name for the kind of failure.
    pub fn category(&self) -> &'static str {
        match self {
            ThroughputError::Step(e) => e.category(),
            ThroughputError::Optim(e) => e.category(),
            ThroughputError::Device(e) => e.category(),
            ThroughputError::Data(e) => e.category(),
            ThroughputError::Documents { .. } => "io",
            ThroughputError::Metrics(_) => "metrics",
        }
    }
}

/// How the model is run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum RunPath {
    /// weft's distributed step, as `weft-trainer local` runs it.
    Engine,
    /// One process: the model's forward and backward with libtorch's
    /// attention, every activation kept.
    Plain,
}

impl RunPath {
    pub fn name(self) -> &'static str {
        match self {
            RunPath::Engine => "engine",
            RunPath::Plain => "plain",
        }
    }
}

/// Model FLOPs of one training step (forward and backward) over documents
/// of `lengths` tokens: the matrix products of every layer and the LM head,
/// 6 per parameter per token, and each document's causal attention,
/// 6·L²·h per layer. Recomputation is not counted.
pub fn training_flops(model: &ModelSpec, lengths: &[u64]) -> f64 {
    let layers = f64::from(model.layers);
    lengths
        .iter()
        .map(|&n| {
            let n = n as f64;
            3.0 * (n * model.linear_flops_per_token() + layers * model.attention_flops_forward(n))
        })
        .sum()
}

/// The peak a device's MFU is measured against, TFLOP/s, and where it is
/// from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Peak {
    pub tflops: f64,
    /// A GPU preset's datasheet (dense bf16), or the figure given.
    pub source: String,
}

/// What one configuration measured, over its timed steps.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Measured {
    /// Steps timed (after the warm-up).
    pub steps: u64,
    /// Mean seconds per step.
    pub step_s: f64,
    /// Tokens each step trains on, all devices together.
    pub tokens_per_step: u64,
    pub tokens_per_s_per_device: f64,
    /// Model FLOPs per second per device, in TFLOP/s.
    pub tflops_per_device: f64,
    /// Share of the peak, when a peak is known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mfu: Option<f64>,
    /// The engine's: the planner's predicted forward and backward seconds
    /// (at the profile's speeds when the run was given one), and the
    /// slowest rank's measured forward and backward.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub predicted_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub forward_backward_s: Option<f64>,
    /// The engine's: share of the step in ring attention (with its
    /// transfers), the widest ring, and the rings that streamed their
    /// backward (StreamBP) of all rings.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attention_share: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_cp_degree: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub streamed_rings: Option<(u32, u32)>,
}

/// A configuration that did not finish: why, as the run said it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Failed {
    /// `out_of_memory` when the device ran out of memory, else `failed`.
    pub category: String,
    pub message: String,
}

/// One row of the report.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Row {
    pub model: String,
    pub path: RunPath,
    pub tokens_per_device: u64,
    /// Ranks (processes) and the devices they ran on.
    pub ranks: u32,
    pub devices: u32,
    pub precision: Precision,
    #[serde(flatten)]
    pub outcome: Outcome,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Measured(Measured),
    Failed(Failed),
}

/// The figures of timed steps of `step_s` seconds each, every step
/// training on `lengths` (all devices together) over `devices` devices.
pub fn measure(
    model: &ModelSpec,
    lengths: &[u64],
    step_s: &[f64],
    devices: u32,
    peak: Option<&Peak>,
) -> Result<Measured, ThroughputError> {
    if step_s.is_empty() {
        return Err(ThroughputError::Metrics("no step was timed".to_string()));
    }
    let mean = step_s.iter().sum::<f64>() / step_s.len() as f64;
    if !(mean.is_finite() && mean > 0.0) {
        return Err(ThroughputError::Metrics(format!(
            "the steps took {mean} s on average"
        )));
    }
    let devices = f64::from(devices.max(1));
    let tokens: u64 = lengths.iter().sum();
    let tflops = training_flops(model, lengths) / mean / devices / 1e12;
    Ok(Measured {
        steps: step_s.len() as u64,
        step_s: mean,
        tokens_per_step: tokens,
        tokens_per_s_per_device: tokens as f64 / mean / devices,
        tflops_per_device: tflops,
        mfu: peak.map(|p| tflops / p.tflops),
        predicted_s: None,
        forward_backward_s: None,
        attention_share: None,
        max_cp_degree: None,
        streamed_rings: None,
    })
}

/// The engine's figures from a run's metrics (one line per step; the
/// first `warmup` left out), each step `per_device` tokens on each of
/// `devices` devices in documents of exactly that length.
pub fn engine_figures(
    model: &ModelSpec,
    metrics: &[StepMetrics],
    warmup: u64,
    per_device: u64,
    devices: u32,
    peak: Option<&Peak>,
) -> Result<Measured, ThroughputError> {
    let timed: Vec<&StepMetrics> = metrics.iter().skip(warmup as usize).collect();
    let lengths = vec![per_device; devices as usize];
    let expected: u64 = lengths.iter().sum();
    if let Some(m) = timed
        .iter()
        .find(|m| m.tokens != expected || m.sequences != u64::from(devices))
    {
        return Err(ThroughputError::Metrics(format!(
            "step {} trained on {} tokens in {} sequences, not {devices} documents of {per_device}",
            m.step, m.tokens, m.sequences
        )));
    }
    let steps: Vec<f64> = timed.iter().map(|m| m.step_time_s).collect();
    let mut figures = measure(model, &lengths, &steps, devices, peak)?;
    let mean = |f: &dyn Fn(&StepMetrics) -> f64| {
        timed.iter().map(|m| f(m)).sum::<f64>() / timed.len() as f64
    };
    figures.predicted_s = Some(mean(&|m| m.predicted_step_s));
    figures.forward_backward_s = Some(mean(&|m| m.forward_backward_s));
    figures.attention_share = Some(mean(&|m| m.attention_s) / figures.step_s);
    figures.max_cp_degree = timed.iter().map(|m| m.max_cp_degree).max();
    figures.streamed_rings = Some((
        timed.iter().map(|m| m.streamed_rings).sum(),
        timed.iter().map(|m| m.rings).sum(),
    ));
    Ok(figures)
}

/// What ran out of memory, as libtorch or the engine says it.
pub fn failure(stderr: &str) -> Failed {
    let message = stderr
        .lines()
        .rev()
        .find(|l| l.contains("error"))
        .or_else(|| stderr.lines().rev().find(|l| !l.trim().is_empty()))
        .unwrap_or("the run failed and said nothing")
        .trim();
    let message: String = message.chars().take(400).collect();
    let out_of_memory =
        stderr.contains("ran out of memory") || crate::train::is_out_of_memory(stderr);
    Failed {
        category: if out_of_memory {
            "out_of_memory"
        } else {
            "failed"
        }
        .to_string(),
        message,
    }
}

/// The benchmark's documents: `count` files of `length` tokens each with
/// the byte tokenizer (the built-in corpus joined, from a different place
/// for each, cut so that with its end-of-document token it is exactly
/// `length` long), written into `dir`.
pub fn write_documents(dir: &Path, count: u32, length: u64) -> Result<(), ThroughputError> {
    let io = |source| ThroughputError::Documents {
        path: dir.to_path_buf(),
        source,
    };
    let corpus = Corpus::load(Path::new(crate::data::BUILTIN_CORPUS))?;
    let joined: Vec<u8> = corpus
        .documents
        .iter()
        .flat_map(|d| d.text.bytes().chain(*b"\n\n"))
        // Bytes only, one token each: the documents need not be UTF-8 cut
        // at a character boundary to be read as text.
        .filter(u8::is_ascii)
        .collect();
    let want = length.saturating_sub(1) as usize;
    std::fs::create_dir_all(dir).map_err(io)?;
    for i in 0..count as usize {
        let start = (i * joined.len() / count.max(1) as usize) % joined.len().max(1);
        let text: Vec<u8> = joined
            .iter()
            .cycle()
            .skip(start)
            .take(want)
            .copied()
            .collect();
        std::fs::write(dir.join(format!("document-{i:04}.txt")), text).map_err(io)?;
    }
    Ok(())
}

/// The plain path's run (the JSON its process is started with).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlainConfig {
    pub model: ModelSpec,
    pub precision: Precision,
    pub device: ComputeDevice,
    /// The documents [`write_documents`] wrote; each step takes the next.
    pub documents: PathBuf,
    pub length: u64,
    /// Steps in all (the driver leaves its warm-up out of the figures).
    pub steps: u64,
    pub seed: u64,
    pub threads: i32,
}

/// Runs the plain path: seconds of each step (forward, backward, AdamW
/// update, the device waited for), the warm-up's included.
pub fn run_plain(config: &PlainConfig) -> Result<Vec<f64>, ThroughputError> {
    tch::set_num_threads(config.threads.max(1));
    let device = config.device.of_rank(0)?;
    tch::manual_seed(config.seed as i64);
    let mut vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let model = Llama::new(&vs.root(), &config.model)
        .map_err(StepError::from)?
        .with_precision(config.precision);
    vs.set_device(device);
    let params = named_parameters(&vs);
    let mut optimizer = AdamW::over(
        &params,
        AdamWConfig {
            total_steps: config.steps.max(1),
            ..Default::default()
        },
    )?;
    let corpus = Corpus::load(&config.documents)?;
    let length = config.length as usize;
    let mut batches = BatchStream::new(
        &corpus,
        &Tokenizer::Bytes,
        config.seed,
        length,
        length,
        BatchCursor::default(),
    )?;
    let mut seconds = Vec::new();
    for _ in 0..config.steps {
        let batch = batches.next_batch()?;
        let started = Instant::now();
        zero_gradients(&params)?;
        reference_forward_backward(&model, &batch)?;
        optimizer.step()?;
        crate::step::settle(device);
        seconds.push(started.elapsed().as_secs_f64());
    }
    Ok(seconds)
}

/// The report as a Markdown table.
pub fn table(rows: &[Row], peak: Option<&Peak>) -> String {
    let mut out = String::new();
    out.push_str("| model | path | tokens/device | ranks/devices | precision | s/step | tokens/s/device | TFLOP/s/device | MFU | widest ring | streamed rings | attention | predicted/measured |\n");
    out.push_str("|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for row in rows {
        let head = format!(
            "| {} | {} | {} | {}/{} | {} ",
            row.model,
            row.path.name(),
            thousands(row.tokens_per_device as f64),
            row.ranks,
            row.devices,
            row.precision.name()
        );
        out.push_str(&head);
        match &row.outcome {
            Outcome::Measured(m) => {
                let or_dash = |v: Option<String>| v.unwrap_or_else(|| "—".to_string());
                out.push_str(&format!(
                    "| {:.3} | {} | {:.3} | {} | {} | {} | {} | {} |\n",
                    m.step_s,
                    thousands(m.tokens_per_s_per_device),
                    m.tflops_per_device,
                    or_dash(m.mfu.map(|v| format!("{:.1}%", 100.0 * v))),
                    or_dash(m.max_cp_degree.map(|v| v.to_string())),
                    or_dash(m.streamed_rings.map(|(s, r)| format!("{s}/{r}"))),
                    or_dash(m.attention_share.map(|v| format!("{:.0}%", 100.0 * v))),
                    or_dash(
                        m.predicted_s
                            .zip(m.forward_backward_s)
                            .map(|(p, f)| format!("{p:.4}/{f:.4} s ({:.2}×)", p / f))
                    ),
                ));
            }
            Outcome::Failed(f) => {
                let what = if f.category == "out_of_memory" {
                    "out of memory"
                } else {
                    "failed"
                };
                out.push_str(&format!(
                    "| {what}: {} | | | | | | | |\n",
                    f.message.replace('|', "\\|")
                ));
            }
        }
    }
    if let Some(peak) = peak {
        out.push_str(&format!(
            "\nMFU is of {} TFLOP/s per device ({}).\n",
            peak.tflops, peak.source
        ));
    }
    out
}

/// `12,345`: a figure with thousands separated, no decimals.
fn thousands(value: f64) -> String {
    let digits = format!("{:.0}", value.max(0.0));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(name: &str) -> ModelSpec {
        ModelSpec::preset(name).unwrap()
    }

    /// The FLOPs are the planner's own count: its cost model's seconds of
    /// linear modules and attention at its speeds give the same figure.
    #[test]
    fn training_flops_are_the_cost_models_count() {
        use weft_planner::cost::{CostCoefficients, CostModel};
        let gpu = weft_planner::cluster::GpuModel::preset("h100").unwrap();
        for name in ["tiny", "llama-7b", "llama-70b"] {
            let spec = model(name);
            let cost = CostModel::new(spec.clone(), CostCoefficients::default());
            let per_s = |efficiency: f64| gpu.peak_bf16_tflops * 1e12 * efficiency;
            for length in [2u64, 4096, 131_072] {
                let n = length as f64;
                let planner = cost.linear_time(n, &gpu)
                    * per_s(cost.coefficients.linear_efficiency)
                    + cost.attention_compute_time(n, &gpu)
                        * per_s(cost.coefficients.attention_efficiency);
                let ours = training_flops(&spec, &[length]);
                assert!(
                    (ours - planner).abs() <= 1e-9 * planner,
                    "{name} at {length}: {ours} against the planner's {planner}"
                );
            }
        }
        // About 6 per parameter per token at short lengths (llama-7b: 6.7B
        // parameters, of which the embedding's 131M take no products).
        let spec = model("llama-7b");
        let per_token = training_flops(&spec, &[1]);
        let products = spec.params() - f64::from(spec.hidden) * f64::from(spec.vocab);
        assert!(
            (per_token / (6.0 * products) - 1.0).abs() < 1e-3,
            "{per_token}"
        );
        // Attention is per document: one of 2L costs more than two of L by
        // 6·h·layers·(4L² − 2L²).
        let (l, h, layers) = (1000.0, 4096.0, 32.0);
        let gap = training_flops(&spec, &[2000]) - training_flops(&spec, &[1000, 1000]);
        assert!((gap - 6.0 * h * layers * 2.0 * l * l).abs() < 1e-6 * gap);
    }

    #[test]
    fn figures_are_per_device_and_of_the_peak() {
        let spec = model("tiny");
        let peak = Peak {
            tflops: 2.0,
            source: "test".to_string(),
        };
        let m = measure(&spec, &[1000, 1000], &[0.5, 1.5], 2, Some(&peak)).unwrap();
        assert_eq!(m.steps, 2);
        assert_eq!(m.step_s, 1.0);
        assert_eq!(m.tokens_per_step, 2000);
        assert_eq!(m.tokens_per_s_per_device, 1000.0);
        let tflops = training_flops(&spec, &[1000, 1000]) / 2.0 / 1e12;
        assert!((m.tflops_per_device - tflops).abs() < 1e-15);
        assert_eq!(m.mfu, Some(m.tflops_per_device / 2.0));
        assert_eq!(measure(&spec, &[10], &[1.0], 1, None).unwrap().mfu, None);
        assert!(matches!(
            measure(&spec, &[10], &[], 1, None),
            Err(ThroughputError::Metrics(_))
        ));
        assert!(measure(&spec, &[10], &[0.0], 1, None).is_err());
    }

    fn metrics(step: u64, tokens: u64, sequences: u64, seconds: f64) -> StepMetrics {
        StepMetrics {
            step,
            loss: 5.0,
            tokens,
            sequences,
            step_time_s: seconds,
            tokens_per_s: tokens as f64 / seconds,
            lr: 1e-3,
            grad_norm: 1.0,
            world: 2,
            strategy: "weft".to_string(),
            micro_batches: 1,
            max_cp_degree: step as u32,
            hierarchical_rings: 0,
            spread_routes: 0,
            stream_bp_chunk: None,
            streamed_rings: 1,
            rings: 2,
            balance: 1.0,
            predicted_step_s: 0.2,
            token_balance: 1.0,
            forward_backward_s: 0.4 * seconds,
            attention_s: 0.25 * seconds,
            remap_s: 0.0,
            all_reduce_s: 0.1,
            plan_s: 0.0,
            data_wait_s: 0.0,
            data_tokens_per_s: 1e6,
            checkpoint: None,
        }
    }

    /// The warm-up is left out, the planner's prediction and the measured
    /// forward and backward come with the figures, and a run whose steps
    /// were not the benchmark's documents is refused.
    #[test]
    fn the_engines_figures_come_from_its_timed_steps() {
        let spec = model("tiny");
        let run = [
            metrics(1, 200, 2, 9.0),
            metrics(2, 200, 2, 1.0),
            metrics(3, 200, 2, 3.0),
        ];
        let m = engine_figures(&spec, &run, 1, 100, 2, None).unwrap();
        assert_eq!((m.steps, m.step_s), (2, 2.0));
        assert_eq!(m.tokens_per_s_per_device, 50.0);
        assert_eq!(m.predicted_s, Some(0.2));
        assert_eq!(m.forward_backward_s, Some(0.8));
        assert_eq!(m.attention_share, Some(0.25));
        assert_eq!(m.max_cp_degree, Some(3));
        assert_eq!(m.streamed_rings, Some((2, 4)));
        let err = engine_figures(&spec, &run, 1, 128, 2, None).unwrap_err();
        assert!(
            err.to_string()
                .contains("step 2 trained on 200 tokens in 2 sequences, not 2 documents of 128"),
            "{err}"
        );
    }

    #[test]
    fn a_run_out_of_memory_is_told_from_other_failures() {
        let engine = "rank 0: starting\nweft-trainer: error: worker 0 failed: rank 0 ran out of memory in step 3 (CUDA out of memory. Tried to allocate 2.00 GiB): give each rank fewer tokens\n";
        let f = failure(engine);
        assert_eq!(f.category, "out_of_memory");
        assert!(
            f.message
                .starts_with("weft-trainer: error: worker 0 failed")
        );
        let plain = "weft-trainer: error: libtorch: CUDA error: out of memory\n";
        assert_eq!(failure(plain).category, "out_of_memory");
        let other = "weft-trainer: error: --model nope: unknown model preset\n";
        assert_eq!(failure(other).category, "failed");
        assert_eq!(failure("").message, "the run failed and said nothing");
    }

    /// Each document is exactly the length asked for as the byte tokenizer
    /// reads it, and the devices' documents differ.
    #[test]
    fn the_documents_are_as_long_as_asked() {
        let dir = std::env::temp_dir().join(format!("weft-throughput-docs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        write_documents(&dir, 3, 5000).unwrap();
        let corpus = Corpus::load(&dir).unwrap();
        assert_eq!(corpus.documents.len(), 3);
        for d in &corpus.documents {
            assert_eq!(
                Tokenizer::Bytes.encode(&d.source, &d.text).unwrap().len(),
                5000
            );
        }
        assert_ne!(corpus.documents[0].text, corpus.documents[1].text);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_table_has_a_row_per_run_and_says_why_one_failed() {
        let spec = model("tiny");
        let measured = measure(&spec, &[8192], &[0.5], 1, None).unwrap();
        let row = |path, outcome| Row {
            model: "tiny".to_string(),
            path,
            tokens_per_device: 8192,
            ranks: 1,
            devices: 1,
            precision: Precision::Bf16,
            outcome,
        };
        let rows = [
            row(RunPath::Engine, Outcome::Measured(measured)),
            row(
                RunPath::Plain,
                Outcome::Failed(Failed {
                    category: "out_of_memory".to_string(),
                    message: "a | b".to_string(),
                }),
            ),
        ];
        let text = table(&rows, None);
        assert_eq!(text.lines().count(), 4, "{text}");
        assert!(
            text.contains("| tiny | engine | 8,192 | 1/1 | bf16 | 0.500 | 16,384 |"),
            "{text}"
        );
        assert!(text.contains("| out of memory: a \\| b |"), "{text}");
        assert_eq!(thousands(1_234_567.4), "1,234,567");
        assert_eq!(thousands(999.0), "999");
    }
}
