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
use weft_trainer::model::Llama;
use weft_trainer::step::{
    all_reduce_gradients, forward_backward, named_parameters, random_plan,
    reference_forward_backward, zero_gradients,
};

type Params = Vec<(String, Tensor)>;

/// A model whose parameters are copies of `params`.
fn model_from(spec: &ModelSpec, params: &Params) -> (VarStore, Llama) {
    let vs = VarStore::new(Device::Cpu);
    let model = Llama::new(&vs.root(), spec).unwrap();
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

/// Largest gradient error of any rank relative to the largest reference
/// gradient, and the largest loss error.
fn step_error(spec: &ModelSpec, params: &Params, plan: &StepPlan, batch: &Batch) -> (f64, f64) {
    let (vs, model) = model_from(spec, params);
    let reference_params = named_parameters(&vs);
    zero_gradients(&reference_params).unwrap();
    let reference_loss = reference_forward_backward(&model, batch).unwrap();
    let reference = grads(&reference_params);
    let scale = reference
        .values()
        .map(|g| g.abs().max().double_value(&[]))
        .fold(0.0, f64::max);

    let world = plan.world_size;
    let port = common::free_port();
    let handles: Vec<_> = (0..world)
        .map(|rank| {
            let (spec, plan, batch) = (spec.clone(), plan.clone(), batch.clone());
            let params: Params = params.iter().map(|(n, t)| (n.clone(), t.copy())).collect();
            std::thread::spawn(move || {
                let (_store, mut group) = common::join(rank, world, port, Duration::from_secs(60));
                let (vs, model) = model_from(&spec, &params);
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
    let mut worst = 0.0f64;
    let mut loss_error = 0.0f64;
    for handle in handles {
        let (loss, got) = handle.join().unwrap();
        loss_error = loss_error.max((loss - reference_loss).abs());
        for (name, g) in &got {
            let diff = (g - &reference[name]).abs().max().double_value(&[]);
            worst = worst.max(diff / scale);
        }
    }
    (worst, loss_error)
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
            hierarchical += plan
                .micro_batches
                .iter()
                .flat_map(|m| &m.groups)
                .filter(|g| g.inner_ring > 0 && g.ranks.len() > 1)
                .count();
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
    for strategy in ["weft", "zeppelin", "static", "hdp"] {
        let strategy = weft_planner::Strategy::parse(strategy).unwrap();
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
