//! A full training step (embedding, every layer's projections, ring attention
//! over the plan's groups, the remap both ways, MLP, head and loss, forward
//! and backward, then the gradient all-reduce) over real Gloo collectives
//! equals one process computing the whole batch: the loss and every
//! parameter's gradient, on every rank, for many random plans (CP degrees 1
//! to 8, several groups and micro-batches, packed documents, uneven shards,
//! with and without remap).

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use tch::nn::VarStore;
use tch::{Device, Tensor};
use weft_planner::model::ModelSpec;
use weft_planner::plan::StepPlan;
use weft_planner::rng::SplitMix64;
use weft_trainer::data::{Batch, Sample};
use weft_trainer::model::{Llama, Precision};
use weft_trainer::step::{
    all_reduce_gradients, forward_backward, named_parameters, random_plan, random_stream_bp,
    reference_forward_backward, zero_gradients,
};

type Params = Vec<(String, Tensor)>;

/// A model whose parameters are copies of `params`, computing in `precision`.
fn model_from(spec: &ModelSpec, params: &Params, precision: Precision) -> (VarStore, Llama) {
    let vs = VarStore::new(Device::Cpu);
    let model = Llama::new(&vs.root(), spec)
        .unwrap()
        .with_precision(precision);
    let source: BTreeMap<&str, &Tensor> = params.iter().map(|(n, t)| (n.as_str(), t)).collect();
    tch::no_grad(|| {
        for (name, mut var) in vs.variables() {
            var.copy_(source[name.as_str()]);
        }
    });
    (vs, model)
}

fn random_batch(rng: &mut SplitMix64, sequences: usize, longest: u64) -> Batch {
    Batch {
        samples: (0..sequences)
            .map(|i| {
                let length = 1 + rng.below(longest) as usize;
                Sample {
                    index: i as u64,
                    document: i,
                    tokens: (0..length).map(|_| rng.below(257) as u32).collect(),
                }
            })
            .collect(),
    }
}

fn grads(params: &Params) -> BTreeMap<String, Tensor> {
    params
        .iter()
        .map(|(n, p)| (n.clone(), p.grad().copy()))
        .collect()
}

/// One process's loss and gradients over the whole batch.
fn reference(
    spec: &ModelSpec,
    params: &Params,
    batch: &Batch,
    precision: Precision,
) -> (f64, BTreeMap<String, Tensor>) {
    let (vs, model) = model_from(spec, params, precision);
    let reference_params = named_parameters(&vs);
    zero_gradients(&reference_params).unwrap();
    let loss = reference_forward_backward(&model, batch).unwrap();
    (loss, grads(&reference_params))
}

/// The largest gradient error relative to the largest reference gradient.
fn gradient_error(got: &BTreeMap<String, Tensor>, reference: &BTreeMap<String, Tensor>) -> f64 {
    let scale = reference
        .values()
        .map(|g| g.abs().max().double_value(&[]))
        .fold(0.0, f64::max);
    got.iter()
        .map(|(name, g)| (g - &reference[name]).abs().max().double_value(&[]) / scale)
        .fold(0.0, f64::max)
}

/// Largest gradient error of any rank relative to the largest reference
/// gradient, and the largest loss error, both computing in fp32.
fn step_error(spec: &ModelSpec, params: &Params, plan: &StepPlan, batch: &Batch) -> (f64, f64) {
    step_error_in(Precision::Fp32, spec, params, plan, batch)
}

/// [`step_error`] with the distributed step and the reference computing in
/// `precision`.
fn step_error_in(
    precision: Precision,
    spec: &ModelSpec,
    params: &Params,
    plan: &StepPlan,
    batch: &Batch,
) -> (f64, f64) {
    let (reference_loss, reference) = reference(spec, params, batch, precision);
    let (losses, ranks) = distributed(precision, spec, params, plan, batch);
    let loss_error = losses
        .iter()
        .map(|l| (l - reference_loss).abs())
        .fold(0.0, f64::max);
    let worst = ranks
        .iter()
        .map(|g| gradient_error(g, &reference))
        .fold(0.0, f64::max);
    (worst, loss_error)
}

/// Every rank's global loss and all-reduced gradients after one distributed
/// step of `plan` (which says where it streams its backward), over real Gloo.
fn distributed(
    precision: Precision,
    spec: &ModelSpec,
    params: &Params,
    plan: &StepPlan,
    batch: &Batch,
) -> (Vec<f64>, Vec<BTreeMap<String, Tensor>>) {
    let world = plan.world_size;
    let port = common::free_port();
    let handles: Vec<_> = (0..world)
        .map(|rank| {
            let (spec, plan, batch) = (spec.clone(), plan.clone(), batch.clone());
            let params: Params = params.iter().map(|(n, t)| (n.clone(), t.copy())).collect();
            std::thread::spawn(move || {
                let (_store, mut group) = common::join(rank, world, port, Duration::from_secs(60));
                let (vs, model) = model_from(&spec, &params, precision);
                let params = named_parameters(&vs);
                zero_gradients(&params).unwrap();
                let outcome = forward_backward(&model, &mut group, &plan, &batch).unwrap();
                all_reduce_gradients(&params, &mut group).unwrap();
                let mut loss = Tensor::from_slice(&[outcome.loss_sum]);
                group.all_reduce_sum(&mut loss).unwrap();
                let loss = loss.double_value(&[0]) / outcome.predicted as f64;
                (loss, grads(&params))
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).unzip()
}

fn spec() -> ModelSpec {
    ModelSpec::preset("tiny").unwrap()
}

fn initial_params(spec: &ModelSpec, seed: i64) -> Params {
    tch::manual_seed(seed);
    let vs = VarStore::new(Device::Cpu);
    let _model = Llama::new(&vs.root(), spec).unwrap();
    named_parameters(&vs)
        .into_iter()
        .map(|(n, t)| (n, t.detach().copy()))
        .collect()
}

#[test]
fn a_distributed_step_equals_one_process_over_random_plans() {
    let spec = spec();
    let params = initial_params(&spec, 5);
    let mut rng = SplitMix64::new(11);
    let mut degrees = std::collections::BTreeSet::new();
    let mut remapped = 0;
    let mut hierarchical = 0;
    for (world, cases) in [(2u32, 3), (3, 2), (4, 3), (8, 1)] {
        for case in 0..cases {
            let sequences = 2 + rng.below(6) as usize;
            let batch = random_batch(&mut rng, sequences, 120);
            let lengths: Vec<u64> = batch.lengths().iter().map(|l| *l as u64).collect();
            let plan = random_plan(&mut rng, &lengths, world, &spec).unwrap();
            degrees.extend(plan.sequences.iter().map(|s| s.degree));
            remapped += plan.micro_batches.iter().filter(|m| m.remap).count();
            hierarchical += hierarchical_rings(&plan);
            let (error, loss_error) = step_error(&spec, &params, &plan, &batch);
            eprintln!(
                "world {world}, case {case}: gradient error {error:.2e}, loss error {loss_error:.2e}"
            );
            assert!(
                error < 2e-5 && loss_error < 1e-5,
                "world {world}, case {case}: gradient error {error:.2e}, loss error {loss_error:.2e}; lengths {lengths:?}"
            );
        }
    }
    // The random plans did exercise what they are meant to.
    assert!(degrees.len() >= 4, "CP degrees seen: {degrees:?}");
    assert!(remapped > 0);
    assert!(hierarchical > 0, "no hierarchical ring was drawn");
}

#[test]
fn the_planners_own_plans_with_context_parallelism_match_too() {
    use weft_planner::cost::{CostCoefficients, CostModel};
    let spec = spec();
    let params = initial_params(&spec, 9);
    let mut rng = SplitMix64::new(3);
    let batch = random_batch(&mut rng, 6, 300);
    let lengths: Vec<u64> = batch.lengths().iter().map(|l| *l as u64).collect();
    let cluster = weft_planner::cluster::parse_cluster("2x2").unwrap();
    let ctx = weft_planner::PlanContext {
        limits: Default::default(),
        topology: weft_planner::topology::Topology::new(&cluster).unwrap(),
        cost: CostModel::new(
            spec.clone(),
            CostCoefficients {
                // A small budget per rank forces long sequences over several ranks.
                max_tokens_per_rank: Some(120),
                ..Default::default()
            },
        ),
    };
    use weft_planner::Strategy;
    for strategy in [
        Strategy::Weft,
        Strategy::Zeppelin,
        Strategy::Static,
        Strategy::Hdp,
    ] {
        let plan = weft_planner::plan_step(strategy, &ctx, &lengths, Some(300)).unwrap();
        assert!(plan.sequences.iter().any(|s| s.degree > 1), "{strategy:?}");
        let rings: Vec<u32> = plan
            .micro_batches
            .iter()
            .flat_map(|m| &m.groups)
            .map(|g| g.inner_ring)
            .collect();
        // Zeppelin runs the rings that span both nodes hierarchically.
        if strategy == weft_planner::Strategy::Zeppelin {
            assert!(rings.iter().any(|i| *i > 0), "{strategy:?}: {rings:?}");
        }
        let (error, loss_error) = step_error(&spec, &params, &plan, &batch);
        assert!(
            error < 2e-5 && loss_error < 1e-5,
            "{strategy:?}: gradient error {error:.2e}, loss error {loss_error:.2e}"
        );
    }
}

/// The norm of the gradient difference relative to the reference's norm, over
/// all parameters together.
fn relative_l2(got: &BTreeMap<String, Tensor>, reference: &BTreeMap<String, Tensor>) -> f64 {
    let (mut diff, mut norm) = (0.0, 0.0);
    for (name, g) in got {
        let r = &reference[name];
        diff += (g - r).square().sum(tch::Kind::Double).double_value(&[]);
        norm += r.square().sum(tch::Kind::Double).double_value(&[]);
    }
    (diff / norm).sqrt()
}

/// Mixed precision (bf16 products and activations, fp32 weights and
/// gradients), over random plans with context parallelism: a distributed step
/// is no farther from the fp32 gradient than one bf16 process is (splitting a
/// sequence over a ring adds no error of its own beyond rounding), and both
/// differ from fp32 (bf16 really is computed).
#[test]
fn a_bf16_step_is_as_close_to_fp32_as_one_bf16_process() {
    let spec = spec();
    let params = initial_params(&spec, 7);
    let mut rng = SplitMix64::new(21);
    let mut split = 0;
    for (world, cases) in [(2u32, 2), (3, 1), (4, 2)] {
        for case in 0..cases {
            let sequences = 2 + rng.below(5) as usize;
            let batch = random_batch(&mut rng, sequences, 160);
            let lengths: Vec<u64> = batch.lengths().iter().map(|l| *l as u64).collect();
            let plan = random_plan(&mut rng, &lengths, world, &spec).unwrap();
            split += plan.sequences.iter().filter(|s| s.degree > 1).count();
            let (fp32_loss, fp32) = reference(&spec, &params, &batch, Precision::Fp32);
            let (bf16_loss, bf16) = reference(&spec, &params, &batch, Precision::Bf16);
            let (losses, ranks) = distributed(Precision::Bf16, &spec, &params, &plan, &batch);
            let single = relative_l2(&bf16, &fp32);
            let single_loss = (bf16_loss - fp32_loss).abs();
            for (loss, got) in losses.iter().zip(&ranks) {
                let dist = relative_l2(got, &fp32);
                let dist_loss = (loss - fp32_loss).abs();
                eprintln!(
                    "world {world}, case {case}: vs fp32, one bf16 process: gradient {single:.2e}, loss {single_loss:.2e}; distributed bf16: gradient {dist:.2e}, loss {dist_loss:.2e}"
                );
                assert!(
                    dist < 2.0 * single + 1e-3 && dist_loss < 2.0 * single_loss + 2e-3,
                    "world {world}, case {case}: distributed bf16 strays from fp32 (gradient {dist:.2e}, loss {dist_loss:.2e}) more than one bf16 process ({single:.2e}, {single_loss:.2e}); lengths {lengths:?}"
                );
                assert!(
                    dist > 1e-4,
                    "distributed bf16 equals fp32: not computed in bf16"
                );
            }
            assert!(
                single > 1e-4 && single < 3e-2,
                "one bf16 process vs fp32: {single:.2e}"
            );
        }
    }
    assert!(split > 0, "no sequence was split over ranks");
}

/// Ring groups of `plan` that run as hierarchical rings.
fn hierarchical_rings(plan: &weft_planner::plan::StepPlan) -> usize {
    plan.micro_batches
        .iter()
        .flat_map(|m| &m.groups)
        .filter(|g| g.inner_ring > 0 && g.ranks.len() > 1)
        .count()
}

/// The largest difference of any parameter's gradient from `reference`'s,
/// relative to that parameter's largest reference gradient, and its name.
fn worst_parameter(
    got: &BTreeMap<String, Tensor>,
    reference: &BTreeMap<String, Tensor>,
) -> (f64, String) {
    got.iter()
        .map(|(name, g)| {
            let r = &reference[name];
            let scale = r.abs().max().double_value(&[]).max(1e-30);
            ((g - r).abs().max().double_value(&[]) / scale, name.clone())
        })
        .fold((0.0, String::new()), |a, b| if b.0 > a.0 { b } else { a })
}

/// StreamBP over random plans on 1 to 4 ranks (packed documents, uneven
/// shards, flat and hierarchical rings, with and without the remap), with
/// chunks from one token to longer than any rank's share: every parameter's
/// gradient and the loss equal plain backprop's on the same plan, in fp32.
#[test]
fn streambp_equals_plain_backprop_over_random_plans_and_chunks() {
    let spec = spec();
    let params = initial_params(&spec, 13);
    let mut rng = SplitMix64::new(17);
    let (mut remapped, mut hierarchical, mut split, mut idle, mut mixed) = (0, 0, 0, 0, 0);
    let mut chunks = Vec::new();
    for (world, cases) in [(1u32, 2), (2, 2), (3, 2), (4, 3)] {
        for case in 0..cases {
            let sequences = 2 + rng.below(5) as usize;
            let batch = random_batch(&mut rng, sequences, 140);
            let lengths: Vec<u64> = batch.lengths().iter().map(|l| *l as u64).collect();
            let plan = random_plan(&mut rng, &lengths, world, &spec).unwrap();
            remapped += plan.micro_batches.iter().filter(|m| m.remap).count();
            hierarchical += hierarchical_rings(&plan);
            split += plan.sequences.iter().filter(|s| s.degree > 1).count();
            // Ranks with no rows in a micro-batch run it too.
            idle += plan
                .micro_batches
                .iter()
                .map(|m| {
                    let busy: std::collections::BTreeSet<u32> = m
                        .groups
                        .iter()
                        .flat_map(|g| g.ranks.iter().copied())
                        .collect();
                    world as usize - busy.len()
                })
                .sum::<usize>();
            // One token, a few, and more than the whole batch.
            let chunk = [1, 1 + rng.below(40), 10_000][(case % 3) as usize];
            chunks.push(chunk);
            let (plain_losses, plain) = distributed(Precision::Fp32, &spec, &params, &plan, &batch);
            // Every ring streaming, or each ring choosing, as a plan that
            // chooses StreamBP per ring does.
            let streamed_plan = if rng.below(2) == 0 {
                plan.clone().with_backprop_everywhere(Some(chunk))
            } else {
                random_stream_bp(&mut rng, plan.clone(), chunk).unwrap()
            };
            let streaming: Vec<bool> = streamed_plan
                .micro_batches
                .iter()
                .flat_map(|m| &m.groups)
                .map(|g| g.stream_bp_chunk > 0)
                .collect();
            mixed += usize::from(streaming.contains(&true) && streaming.contains(&false));
            let (losses, streamed) =
                distributed(Precision::Fp32, &spec, &params, &streamed_plan, &batch);
            for rank in 0..world as usize {
                let (error, name) = worst_parameter(&streamed[rank], &plain[rank]);
                let loss_error = (losses[rank] - plain_losses[rank]).abs() / plain_losses[rank];
                eprintln!(
                    "world {world}, case {case}, chunk {chunk}, rank {rank}: worst parameter {name} {error:.2e}, loss {loss_error:.2e}"
                );
                assert!(
                    error <= 1e-5 && loss_error <= 1e-6,
                    "world {world}, case {case}, chunk {chunk}, rank {rank}: StreamBP differs from plain backprop on {name} by {error:.2e} (loss {loss_error:.2e}); lengths {lengths:?}"
                );
            }
        }
    }
    assert!(
        remapped > 0 && hierarchical > 0 && split > 0 && idle > 0 && mixed > 0,
        "remapped {remapped}, hierarchical {hierarchical}, split {split}, idle {idle}, plans streaming some rings only {mixed}"
    );
    assert!(
        chunks.contains(&1) && chunks.contains(&10_000),
        "{chunks:?}"
    );
}

/// StreamBP in mixed precision is as close to the fp32 gradient as plain
/// bf16 backprop on the same plan.
#[test]
fn a_bf16_streambp_step_is_as_close_to_fp32_as_plain_bf16() {
    let spec = spec();
    let params = initial_params(&spec, 19);
    let mut rng = SplitMix64::new(23);
    for world in [2u32, 4] {
        let batch = random_batch(&mut rng, 4, 160);
        let lengths: Vec<u64> = batch.lengths().iter().map(|l| *l as u64).collect();
        let plan = random_plan(&mut rng, &lengths, world, &spec).unwrap();
        let (fp32_loss, fp32) = reference(&spec, &params, &batch, Precision::Fp32);
        let (plain_losses, plain) = distributed(Precision::Bf16, &spec, &params, &plan, &batch);
        let streamed_plan = plan.clone().with_backprop_everywhere(Some(16));
        let (losses, streamed) =
            distributed(Precision::Bf16, &spec, &params, &streamed_plan, &batch);
        for rank in 0..world as usize {
            let plain_error = relative_l2(&plain[rank], &fp32);
            let error = relative_l2(&streamed[rank], &fp32);
            let plain_loss = (plain_losses[rank] - fp32_loss).abs();
            let loss = (losses[rank] - fp32_loss).abs();
            eprintln!(
                "world {world}, rank {rank}: vs fp32, plain bf16 gradient {plain_error:.2e} loss {plain_loss:.2e}; StreamBP bf16 gradient {error:.2e} loss {loss:.2e}"
            );
            assert!(
                error < 2.0 * plain_error + 1e-3 && loss < 2.0 * plain_loss + 2e-3,
                "world {world}, rank {rank}: StreamBP in bf16 strays from fp32 (gradient {error:.2e}, loss {loss:.2e}) more than plain bf16 ({plain_error:.2e}, {plain_loss:.2e})"
            );
            assert!(
                error > 1e-4,
                "StreamBP in bf16 equals fp32: not computed in bf16"
            );
        }
    }
}
