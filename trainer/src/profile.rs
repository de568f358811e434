//! `weft-trainer profile`: measures the speeds the planner's cost model needs
//! on this device, with the trainer's own code, and writes them as a
//! [`Profile`] for `weft plan|simulate --profile` and the trainer's
//! `--profile`.
//!
//! - Compute: real training steps of the model on one rank (a batch of equal
//!   documents, planned and run as training runs them), timed per component.
//!   The linear modules' seconds are the step's less its attention; each is
//!   turned into FLOP/s by counting the work as the cost model counts it, so
//!   the calibrated model gives back the measured seconds.
//! - Link: point-to-point transfers between two ranks over the real
//!   collectives, ping-pong, at sizes from 4 KiB to 16 MiB; latency and
//!   bandwidth are the least-squares line through the median one-way times.
//!   On a GPU with another beside it, between the two over NCCL; else
//!   between two CPU ranks over Gloo on loopback (the description says
//!   which).

use std::time::{Duration, Instant};

use tch::Tensor;
use weft_planner::cluster::GpuModel;
use weft_planner::cost::{CostCoefficients, CostModel, StreamBp};
use weft_planner::model::ModelSpec;
use weft_planner::profile::{PROFILE_VERSION, Profile};

use crate::comm::{ProcessGroup, Store, nccl_built};
use crate::data::{Batch, Sample};
use crate::device::{Collectives, open_group};
use crate::launch::free_port;
use crate::model::{Llama, Precision};
use crate::step::{Backprop, StepError, forward_backward, named_parameters, zero_gradients};

/// What went wrong while profiling.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error(transparent)]
    Step(#[from] StepError),
    #[error(transparent)]
    Launch(#[from] crate::launch::LaunchError),
    #[error("planning the profile's batch: {0}")]
    Plan(String),
    #[error("a profiling rank failed: {0}")]
    Rank(String),
    #[error("the measurement came out unusable: {0}")]
    Unusable(String),
}

impl ProfileError {
    /// A stable, machine-readable name for the kind of failure.
    pub fn category(&self) -> &'static str {
        match self {
            ProfileError::Step(e) => e.category(),
            ProfileError::Launch(_) => "launch",
            ProfileError::Plan(_) => "plan",
            ProfileError::Rank(_) | ProfileError::Unusable(_) => "profile",
        }
    }
}

/// What to measure.
#[derive(Clone, Debug)]
pub struct ProfileConfig {
    pub model: ModelSpec,
    pub precision: Precision,
    /// Tokens of the profiling batch and the length of its documents.
    pub tokens: usize,
    pub document_length: usize,
    /// Timed steps (after one untimed warm-up).
    pub steps: u32,
    pub threads: i32,
    /// Where the steps run: the CPU, or a GPU.
    pub device: tch::Device,
    /// Plain backprop, or StreamBP (its recomputation is counted as work, so
    /// the speeds are the same kind of figure either way).
    pub backprop: Backprop,
}

/// The compute speeds measured, and the raw seconds behind them.
#[derive(Clone, Debug)]
pub struct ComputeSpeeds {
    pub linear_tflops: f64,
    pub attention_tflops: f64,
    pub linear_s: f64,
    pub attention_s: f64,
    /// Seconds one StreamBP chunk adds per layer, where the steps stream.
    pub chunk_overhead_s: Option<f64>,
}

/// How many chunks the many-chunk steps of the chunk cost run in.
const MANY_CHUNKS: u64 = 32;

/// Measures compute on one rank: see the module documentation.
pub fn measure_compute(config: &ProfileConfig) -> Result<ComputeSpeeds, ProfileError> {
    tch::set_num_threads(config.threads.max(1));
    let port = free_port()?;
    let timeout = Duration::from_secs(60);
    let store = Store::open("127.0.0.1", port, 1, true, timeout).map_err(StepError::from)?;
    let mut group =
        ProcessGroup::gloo(&store, 0, 1, "127.0.0.1", timeout).map_err(StepError::from)?;
    tch::manual_seed(0);
    let mut vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let model = Llama::new(&vs.root(), &config.model)
        .map_err(StepError::from)?
        .with_precision(config.precision);
    vs.set_device(config.device);
    let params = named_parameters(&vs);
    let length = config.document_length.max(2);
    let documents = (config.tokens / length).max(1);
    let vocab = u64::from(config.model.vocab.max(2));
    let mut rng = weft_planner::rng::SplitMix64::new(1);
    let batch = Batch {
        samples: (0..documents)
            .map(|i| Sample {
                index: i as u64,
                document: i,
                tokens: (0..length).map(|_| rng.below(vocab) as u32).collect(),
            })
            .collect(),
    };
    let lengths: Vec<u64> = vec![length as u64; documents];
    let ctx = crate::train::local_plan_context(1, &crate::train::PlanSettings::of(&config.model))
        .map_err(|e| ProfileError::Plan(e.to_string()))?;
    // Every document streams or none does, as the profile is asked.
    let plan = weft_planner::plan_step(weft_planner::Strategy::Static, &ctx, &lengths, None)
        .map_err(|e| ProfileError::Plan(e.to_string()))?
        .with_backprop_everywhere(config.backprop.chunk_tokens());
    // The linear modules' and attention's median seconds over the timed
    // steps of `plan` (after one untimed).
    let mut time = |plan: &weft_planner::plan::StepPlan| -> Result<(f64, f64), ProfileError> {
        let (mut linear_s, mut attention_s) = (Vec::new(), Vec::new());
        for step in 0..=config.steps {
            zero_gradients(&params)?;
            let outcome = forward_backward(&model, &mut group, plan, &batch)?;
            if step > 0 {
                let t = outcome.times;
                attention_s.push(t.attention_s);
                linear_s.push((t.total_s - t.attention_s - t.remap_s).max(0.0));
            }
        }
        Ok((median(&mut linear_s), median(&mut attention_s)))
    };
    let (linear_s, attention_s) = time(&plan)?;
    // StreamBP's cost per chunk: the same steps with the rank's tokens in
    // one chunk and in many, the difference spread over the extra chunks
    // and the layers.
    let chunk_overhead_s = match config.backprop.chunk_tokens() {
        Some(_) => {
            // The rank's rows of each micro-batch: one chunk each, then many.
            let mut rows = vec![0u64; plan.micro_batches.len()];
            for s in &plan.sequences {
                if let Some(r) = rows.get_mut(s.micro_batch as usize) {
                    *r += s.length;
                }
            }
            let most = rows.iter().copied().max().unwrap_or(1).max(1);
            let many = most.div_ceil(MANY_CHUNKS).max(1);
            let (whole_s, _) = time(&plan.clone().with_backprop_everywhere(Some(most)))?;
            let (chunked_s, _) = time(&plan.clone().with_backprop_everywhere(Some(many)))?;
            let extra_chunks: u64 = rows
                .iter()
                .map(|r| r.div_ceil(many).saturating_sub(1))
                .sum();
            let extra = extra_chunks as f64 * f64::from(config.model.layers.max(1));
            // (Noise can make the many chunks look faster: no cost then.)
            Some(((chunked_s - whole_s) / extra.max(1.0)).max(0.0))
        }
        None => None,
    };
    if !(linear_s > 0.0 && attention_s > 0.0) {
        return Err(ProfileError::Unusable(format!(
            "linear modules took {linear_s} s and attention {attention_s} s"
        )));
    }
    // The cost model's seconds on a device of 1 TFLOP/s at full efficiency:
    // the work in TFLOP, as the model counts it.
    let mut unit = GpuModel::preset("h100").map_err(|e| ProfileError::Plan(e.to_string()))?;
    unit.peak_bf16_tflops = 1.0;
    let ideal = CostModel::new(
        config.model.clone(),
        CostCoefficients {
            linear_efficiency: 1.0,
            attention_efficiency: 1.0,
            streambp: if config.backprop.chunk_tokens().is_some() {
                StreamBp::Always
            } else {
                StreamBp::Off
            },
            ..Default::default()
        },
    );
    let linear_work = ideal.linear_time((documents * length) as f64, &unit);
    let attention_work = documents as f64 * ideal.attention_compute_time(length as f64, &unit);
    Ok(ComputeSpeeds {
        linear_tflops: linear_work / linear_s,
        attention_tflops: attention_work / attention_s,
        linear_s,
        attention_s,
        chunk_overhead_s,
    })
}

/// Latency and bandwidth of point-to-point transfers between two ranks.
#[derive(Clone, Debug)]
pub struct LinkSpeeds {
    /// What carried the transfers.
    pub over: String,
    pub latency_s: f64,
    pub gbytes_per_s: f64,
    /// (bytes, median one-way seconds) per size.
    pub samples: Vec<(f64, f64)>,
}

/// Measures the link between two ranks of this machine, for a profile of
/// `device`: see the module documentation.
pub fn measure_link(repeats: u32, device: tch::Device) -> Result<LinkSpeeds, ProfileError> {
    let port = free_port()?;
    let sizes: Vec<i64> = vec![1 << 10, 1 << 14, 1 << 18, 1 << 20, 1 << 22]; // floats
    let two_gpus = device.is_cuda() && nccl_built() && tch::Cuda::device_count() >= 2;
    let (over, collectives) = if two_gpus {
        ("NCCL between GPUs 0 and 1", Collectives::Nccl)
    } else {
        ("Gloo between two CPU ranks on loopback", Collectives::Gloo)
    };
    let run = move |rank: u32, sizes: Vec<i64>| -> Result<Vec<(f64, f64)>, StepError> {
        let timeout = Duration::from_secs(60);
        let store = Store::open("127.0.0.1", port, 2, rank == 0, timeout)?;
        let on = if two_gpus {
            tch::Device::Cuda(rank as usize)
        } else {
            tch::Device::Cpu
        };
        let mut group = open_group(on, collectives, &store, rank, 2, "127.0.0.1", timeout)?;
        let peer = 1 - rank;
        let mut out = Vec::new();
        for (k, &n) in sizes.iter().enumerate() {
            let mut buffer = Tensor::f_zeros([n], (tch::Kind::Float, on))?;
            let mut times = Vec::new();
            for r in 0..=repeats {
                let tag = (k as i32) * 1000 + r as i32;
                let t = Instant::now();
                if rank == 0 {
                    group.send(&buffer, peer, tag)?;
                    group.recv(&mut buffer, peer, tag)?;
                } else {
                    group.recv(&mut buffer, peer, tag)?;
                    group.send(&buffer, peer, tag)?;
                }
                if r > 0 {
                    times.push(t.elapsed().as_secs_f64() / 2.0);
                }
            }
            out.push(((n * 4) as f64, median(&mut times)));
        }
        group.barrier()?;
        Ok(out)
    };
    let other = {
        let sizes = sizes.clone();
        std::thread::spawn(move || run(1, sizes))
    };
    let mine = run(0, sizes);
    let theirs = other
        .join()
        .map_err(|_| ProfileError::Rank("rank 1 panicked".to_string()))?;
    theirs?;
    let samples = mine?;
    // Least squares: seconds = latency + bytes / bandwidth.
    let n = samples.len() as f64;
    let (sx, sy) = samples
        .iter()
        .fold((0.0, 0.0), |(a, b), (x, y)| (a + x, b + y));
    let (mx, my) = (sx / n, sy / n);
    let (sxx, sxy) = samples.iter().fold((0.0, 0.0), |(a, b), (x, y)| {
        (a + (x - mx) * (x - mx), b + (x - mx) * (y - my))
    });
    let slope = sxy / sxx;
    if !(slope.is_finite() && slope > 0.0) {
        return Err(ProfileError::Unusable(format!(
            "transfer times do not grow with size: {samples:?}"
        )));
    }
    // A latency below a microsecond is below what the timer resolves here.
    let latency_s = (my - slope * mx).max(1e-6);
    Ok(LinkSpeeds {
        over: over.to_string(),
        latency_s,
        gbytes_per_s: 1.0 / slope / 1e9,
        samples,
    })
}

/// The profile of this device: compute and link measured, described.
pub fn measure(config: &ProfileConfig) -> Result<Profile, ProfileError> {
    let compute = measure_compute(config)?;
    let link = measure_link(5, config.device)?;
    let on = match config.device {
        tch::Device::Cuda(index) => format!("CUDA GPU {index}"),
        _ => format!("CPU, {} libtorch threads", config.threads.max(1)),
    };
    Ok(Profile {
        version: PROFILE_VERSION,
        device: format!(
            "{on}, model {}, {}, documents of {} tokens; link: {}",
            config.model.name,
            config.precision.name(),
            config.document_length,
            link.over
        ),
        linear_tflops: compute.linear_tflops,
        attention_tflops: compute.attention_tflops,
        link_gbytes_per_s: link.gbytes_per_s,
        p2p_latency_s: link.latency_s,
        stream_bp_chunk_overhead_s: compute.chunk_overhead_s,
    })
}

/// The median of `values` (0 when empty).
fn median(values: &mut [f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}
