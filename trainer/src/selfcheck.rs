//! `weft-trainer selfcheck`: what a user runs on a new cluster, as people run
//! nccl-tests. Every rank runs random cases over the real collectives and
//! compares its part with the same computation done whole in one process:
//! - the distributed attention (random packed documents, random head layouts
//!   including grouped-query attention), forward and backward;
//! - the remap of a random step plan, both ways, against the token layout the
//!   plan says;
//! - one whole training step of the `tiny` model over a random step plan
//!   (loss and every parameter's gradient after the all-reduce);
//! - that the real planner, run by every rank alone on the same random
//!   lengths, gives every rank the same plan (as training checks each step).
//!
//! The launcher reports the worst error per component.
//!
//! With [`Precision::Bf16`] every component runs as a bf16 training run does:
//! the attention's queries, keys, values and output gradients are bf16 (the
//! reference computes in fp32 on the same bf16 values, so the error measured
//! is the distributed computation's own), the remap moves bf16 rows (small
//! integers, exact in bf16), and the training step is the mixed-precision
//! one, against one process computing in bf16.
//!
//! Data is drawn from the seed alone, so every rank draws the same documents
//! without talking; each rank then checks its own chunks.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};
use weft_planner::rng::SplitMix64;

use crate::attention::{
    DocShard, RingShard, reference_attention, ring_attention_backward, ring_attention_forward,
};
use crate::comm::{ProcessGroup, Store};
use crate::data::{Batch, Sample};
use crate::device::{Collectives, open_group};
use crate::model::{Llama, Precision};
use crate::remap::{Remap, token_id_rows};
use crate::step::{
    StepError, all_reduce_gradients, forward_backward, named_parameters, random_plan,
    random_stream_bp, reference_forward_backward, zero_gradients,
};

/// The worst errors one rank saw, against the single-process reference.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct SelfcheckReport {
    pub rank: u32,
    /// The number format checked.
    #[serde(default)]
    pub precision: Precision,
    pub cases: u32,
    pub documents: u32,
    pub attention_out: f64,
    pub attention_dq: f64,
    pub attention_dk: f64,
    pub attention_dv: f64,
    /// Largest difference between remapped token ids and the plan's layout
    /// (exact: any difference is a wrong token).
    pub remap: f64,
    /// Training step: loss difference, and the largest gradient difference
    /// relative to the largest reference gradient.
    pub step_loss: f64,
    pub step_gradients: f64,
    /// The same step with StreamBP (a random chunk of 1 to 64 tokens).
    #[serde(default)]
    pub streambp_loss: f64,
    #[serde(default)]
    pub streambp_gradients: f64,
    /// Plans made by the real planner whose digest differed on some rank
    /// (any is a failure: training would stop at that step).
    #[serde(default)]
    pub plans_differing: u32,
    /// Plans compared.
    #[serde(default)]
    pub plans: u32,
}

impl SelfcheckReport {
    /// The larger errors of two reports.
    pub fn worst(mut self, other: &SelfcheckReport) -> SelfcheckReport {
        self.precision = other.precision;
        self.cases = self.cases.max(other.cases);
        self.documents += other.documents;
        self.attention_out = self.attention_out.max(other.attention_out);
        self.attention_dq = self.attention_dq.max(other.attention_dq);
        self.attention_dk = self.attention_dk.max(other.attention_dk);
        self.attention_dv = self.attention_dv.max(other.attention_dv);
        self.remap = self.remap.max(other.remap);
        self.step_loss = self.step_loss.max(other.step_loss);
        self.step_gradients = self.step_gradients.max(other.step_gradients);
        self.streambp_loss = self.streambp_loss.max(other.streambp_loss);
        self.streambp_gradients = self.streambp_gradients.max(other.streambp_gradients);
        self.plans_differing = self.plans_differing.max(other.plans_differing);
        self.plans = self.plans.max(other.plans);
        self
    }

    pub fn max_error(&self) -> f64 {
        [
            self.attention_out,
            self.attention_dq,
            self.attention_dk,
            self.attention_dv,
            self.remap,
            self.step_loss,
            self.step_gradients,
            self.streambp_loss,
            self.streambp_gradients,
        ]
        .into_iter()
        .fold(0.0, f64::max)
    }
}

/// Width of the attention heads of the self-check's documents.
pub const HEAD_DIM: i64 = 16;

/// One case's documents: lengths and head layout, drawn from the seed.
fn case_shape(rng: &mut SplitMix64) -> (Vec<i64>, i64, i64) {
    let documents = 1 + rng.below(4) as usize;
    let lengths = (0..documents).map(|_| 1 + rng.below(300) as i64).collect();
    let (heads, kv_heads) = [(2, 2), (4, 2), (4, 1), (3, 3)][rng.below(4) as usize];
    (lengths, heads, kv_heads)
}

/// What a selfcheck worker checks, and where.
#[derive(Clone, Copy, Debug)]
pub struct CheckSpec {
    pub seed: u64,
    pub cases: u32,
    pub precision: Precision,
    /// Where this rank computes: the CPU, or a GPU.
    pub device: tch::Device,
    pub collectives: Collectives,
}

/// Runs the random cases of `spec` as rank `rank` of `world`, meeting at
/// `127.0.0.1:port`. The attention reference is always libtorch's CPU
/// kernel, so a GPU is checked against an independent computation.
pub fn run_worker(
    rank: u32,
    world: u32,
    port: u16,
    spec: &CheckSpec,
) -> Result<SelfcheckReport, StepError> {
    let CheckSpec {
        seed,
        cases,
        precision,
        device,
        collectives,
    } = *spec;
    let timeout = Duration::from_secs(60);
    let store = Store::open("127.0.0.1", port, world, rank == 0, timeout)?;
    let mut group = open_group(
        device,
        collectives,
        &store,
        rank,
        world,
        "127.0.0.1",
        timeout,
    )?;
    let ring: Vec<u32> = (0..world).collect();
    let mut rng = SplitMix64::new(seed);
    let mut report = SelfcheckReport {
        rank,
        precision,
        ..Default::default()
    };
    let kind = precision.compute_kind();
    for case in 0..cases {
        let (lengths, heads, kv_heads) = case_shape(&mut rng);
        let inner_ring = crate::step::random_inner_ring(&mut rng, world);
        tch::manual_seed(seed.wrapping_add(u64::from(case)) as i64);
        let opts = (Kind::Float, tch::Device::Cpu);
        // Drawn in fp32 and rounded to the precision checked: the distributed
        // side computes on them in that kind, the reference in fp32.
        let draw = |shape: [i64; 4]| Tensor::randn(shape, opts).f_to_kind(kind);
        let docs: Vec<[Tensor; 4]> = lengths
            .iter()
            .map(|l| {
                Ok([
                    draw([1, heads, *l, HEAD_DIM])?,
                    draw([1, kv_heads, *l, HEAD_DIM])?,
                    draw([1, kv_heads, *l, HEAD_DIM])?,
                    draw([1, heads, *l, HEAD_DIM])?,
                ])
            })
            .collect::<Result<_, tch::TchError>>()?;
        let on = |t: &Tensor| t.f_to_device(device);
        let shard = RingShard {
            docs: docs
                .iter()
                .enumerate()
                .map(|(p, [q, k, v, _])| {
                    DocShard::split(&on(q)?, &on(k)?, &on(v)?, p, world, rank as usize)
                })
                .collect::<Result<_, _>>()?,
        };
        let grads_out: Vec<[Tensor; 2]> = docs
            .iter()
            .enumerate()
            .map(|(p, [q, _, _, g])| {
                // The output gradient is split like the queries.
                DocShard::split(&on(g)?, q, q, p, world, rank as usize).map(|s| s.q)
            })
            .collect::<Result<_, _>>()?;
        let forward = ring_attention_forward(&mut group, &ring, inner_ring, &shard)?;
        let grads =
            ring_attention_backward(&mut group, &ring, inner_ring, &shard, &forward, &grads_out)?;
        for (p, [q, k, v, g]) in docs.iter().enumerate() {
            let fp32 = |t: &Tensor| t.f_to_kind(Kind::Float);
            let [out, dq, dk, dv] =
                reference_attention(&fp32(q)?, &fp32(k)?, &fp32(v)?, &fp32(g)?)?;
            let reference =
                |full: &Tensor| DocShard::split(full, full, full, p, world, rank as usize);
            let error = |mine: &[Tensor; 2], full: &Tensor| -> Result<f64, StepError> {
                let expected = reference(full)?.q;
                let mut worst = 0.0f64;
                for c in 0..2 {
                    if expected[c].numel() > 0 {
                        let diff = mine[c]
                            .f_to_device(tch::Device::Cpu)?
                            .f_to_kind(Kind::Float)?
                            .f_sub(&expected[c])?
                            .f_abs()?
                            .f_max()?;
                        worst = worst.max(diff.f_double_value(&[])?);
                    }
                }
                Ok(worst)
            };
            report.attention_out = report.attention_out.max(error(&forward[p].out, &out)?);
            report.attention_dq = report.attention_dq.max(error(&grads[p].dq, &dq)?);
            report.attention_dk = report.attention_dk.max(error(&grads[p].dk, &dk)?);
            report.attention_dv = report.attention_dv.max(error(&grads[p].dv, &dv)?);
            report.documents += 1;
        }
        report.remap = report
            .remap
            .max(check_remap(&mut group, &mut rng, precision, device)?);
        let [(loss, gradients), (streamed_loss, streamed_gradients)] = check_step(
            &mut group,
            &mut rng,
            seed ^ u64::from(case),
            precision,
            device,
        )?;
        report.step_loss = report.step_loss.max(loss);
        report.step_gradients = report.step_gradients.max(gradients);
        report.streambp_loss = report.streambp_loss.max(streamed_loss);
        report.streambp_gradients = report.streambp_gradients.max(streamed_gradients);
        if !check_plans_agree(&mut group, &mut rng, device)? {
            report.plans_differing += 1;
        }
        report.plans += 1;
        report.cases += 1;
    }
    group.barrier()?;
    Ok(report)
}

/// Whether every rank, planning the same random batch alone with the real
/// planner (weft's strategy, some sequences longer than a rank holds), made
/// the same plan: the check training makes before every step.
fn check_plans_agree(
    group: &mut ProcessGroup,
    rng: &mut SplitMix64,
    device: tch::Device,
) -> Result<bool, StepError> {
    let planning = |e: String| StepError::PlanBatch(format!("planning a random batch: {e}"));
    let world = group.world();
    let spec =
        weft_planner::model::ModelSpec::preset("tiny").map_err(|e| planning(e.to_string()))?;
    // Ranks of 96 tokens (the planner keeps a few per rank for the ring's
    // chunks), sequences of up to 80 tokens a rank: the longest are split
    // over every rank, and every one fits.
    let ctx = crate::train::local_plan_context(
        world,
        &crate::train::PlanSettings {
            rank_tokens: Some(96 + 4 * u64::from(world)),
            ..crate::train::PlanSettings::of(&spec)
        },
    )
    .map_err(|e| planning(e.to_string()))?;
    let longest = 80 * u64::from(world);
    let lengths = random_lengths(rng, 24, longest);
    let plan = weft_planner::plan_step(weft_planner::Strategy::Weft, &ctx, &lengths, Some(longest))
        .map_err(|e| planning(e.to_string()))?;
    Ok(crate::train::ranks_that_planned_otherwise(group, &plan, device)?.is_empty())
}

/// Random lengths for a plan: up to `count` sequences of up to `longest` tokens.
fn random_lengths(rng: &mut SplitMix64, count: u64, longest: u64) -> Vec<u64> {
    let n = 1 + rng.below(count);
    (0..n).map(|_| 1 + rng.below(longest)).collect()
}

/// Remaps the token ids of a random plan's attention layout to the linear
/// layout and back; the largest difference from what the plan says. In bf16
/// the ids are taken modulo 251, integers bf16 holds exactly.
fn check_remap(
    group: &mut ProcessGroup,
    rng: &mut SplitMix64,
    precision: Precision,
    device: tch::Device,
) -> Result<f64, StepError> {
    let kind = precision.compute_kind();
    let id = |t: Tensor| -> Result<Tensor, tch::TchError> {
        match precision {
            Precision::Fp32 => Ok(t),
            Precision::Bf16 => t.f_fmod(251)?.f_to_kind(kind),
        }
    };
    let (rank, world) = (group.rank(), group.world());
    let lengths = random_lengths(rng, 10, 400);
    let spec = weft_planner::model::ModelSpec::preset("tiny")
        .map_err(|e| StepError::PlanBatch(e.to_string()))?;
    let plan = random_plan(rng, &lengths, world, &spec)?;
    let mut worst = 0.0f64;
    for mb in plan.micro_batches.iter().filter(|m| m.remap) {
        let Some(routes) = plan.remap_routes(mb.index, rank) else {
            continue;
        };
        let remap = Remap::new(&routes, rank, world).on_device(device)?;
        let ids = id(token_id_rows(&routes)?.f_to_device(device)?)?;
        let linear = remap.to_linear(group, &ids)?;
        let expected: Vec<f32> = plan
            .linear_layout(mb.index, rank)
            .iter()
            .flat_map(|r| (r.start..r.end).map(move |p| (r.sequence * 1_000_000 + p) as f32))
            .collect();
        let expected = id(Tensor::from_slice(&expected)
            .f_reshape([-1, 1])?
            .f_to_device(device)?)?;
        let back = remap.to_attention(group, &linear)?;
        for (got, want) in [(&linear, &expected), (&back, &ids)] {
            if got.size() != want.size() || got.kind() != kind {
                worst = f64::INFINITY;
            } else if got.numel() > 0 {
                let diff = got
                    .f_to_kind(Kind::Float)?
                    .f_sub(&want.f_to_kind(Kind::Float)?)?
                    .f_abs()?
                    .f_max()?
                    .f_double_value(&[])?;
                worst = worst.max(diff);
            }
        }
    }
    Ok(worst)
}

/// One training step of the `tiny` model over a random plan on every rank,
/// with plain backprop and with StreamBP (a random chunk), against the same
/// step computed whole by this rank alone: for each, (loss error, largest
/// gradient error relative to the largest reference gradient).
fn check_step(
    group: &mut ProcessGroup,
    rng: &mut SplitMix64,
    seed: u64,
    precision: Precision,
    device: tch::Device,
) -> Result<[(f64, f64); 2], StepError> {
    let world = group.world();
    let spec = weft_planner::model::ModelSpec::preset("tiny")
        .map_err(|e| StepError::PlanBatch(e.to_string()))?;
    let lengths = random_lengths(rng, 8, 200);
    let batch = Batch {
        samples: lengths
            .iter()
            .enumerate()
            .map(|(i, n)| Sample {
                index: i as u64,
                document: i,
                tokens: (0..*n).map(|_| rng.below(257) as u32).collect(),
            })
            .collect(),
    };
    let plan = random_plan(rng, &lengths, world, &spec)?;
    // StreamBP with a random chunk on every ring, or on the rings a coin
    // picks (as a plan that chooses per ring).
    let chunk = 1 + rng.below(64);
    let streamed = if rng.below(2) == 0 {
        plan.clone().with_backprop_everywhere(Some(chunk))
    } else {
        random_stream_bp(rng, plan.clone(), chunk)?
    };
    tch::manual_seed(seed as i64);
    let mut vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let model = Llama::new(&vs.root(), &spec)?.with_precision(precision);
    vs.set_device(device);
    let params = named_parameters(&vs);
    // Every rank starts from rank 0's parameters.
    tch::no_grad(|| -> Result<(), StepError> {
        for (_, p) in &params {
            let mut p = p.shallow_clone();
            group.broadcast(&mut p, 0)?;
        }
        Ok(())
    })?;
    let mut distributed = Vec::with_capacity(2);
    for plan in [&plan, &streamed] {
        zero_gradients(&params)?;
        let outcome = forward_backward(&model, group, plan, &batch)?;
        all_reduce_gradients(&params, group)?;
        let mut loss = Tensor::from_slice(&[outcome.loss_sum]).f_to_device(device)?;
        group.all_reduce_sum(&mut loss)?;
        let loss = loss.f_double_value(&[0])? / outcome.predicted as f64;
        let grads: Vec<Tensor> = params.iter().map(|(_, p)| p.grad().copy()).collect();
        distributed.push((loss, grads));
    }
    zero_gradients(&params)?;
    let reference_loss = reference_forward_backward(&model, &batch)?;
    let mut errors = [(0.0, 0.0); 2];
    for ((loss, grads), error) in distributed.iter().zip(&mut errors) {
        let mut scale = 0.0f64;
        let mut worst = 0.0f64;
        for ((_, p), got) in params.iter().zip(grads) {
            let want = p.grad();
            scale = scale.max(want.f_abs()?.f_max()?.f_double_value(&[])?);
            worst = worst.max(got.f_sub(&want)?.f_abs()?.f_max()?.f_double_value(&[])?);
        }
        *error = (
            (loss - reference_loss).abs(),
            worst / scale.max(f64::MIN_POSITIVE),
        );
    }
    Ok(errors)
}
