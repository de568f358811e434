//! The remapping layer moves exactly the tokens the step plan says, to the
//! ranks it says, and back.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use weft_planner::cluster::parse_cluster;
use weft_planner::cost::{CostCoefficients, CostModel};
use weft_planner::model::ModelSpec;
use weft_planner::plan::{RemapRoutes, StepPlan};
use weft_planner::topology::Topology;
use weft_planner::{PlanContext, Strategy, plan_step};
use weft_trainer::remap::{Remap, token_id_rows};

fn plan() -> StepPlan {
    let ctx = PlanContext {
        limits: Default::default(),
        topology: Topology::new(&parse_cluster("1x4").unwrap()).unwrap(),
        cost: CostModel::new(
            ModelSpec::preset("llama-7b").unwrap(),
            CostCoefficients::default(),
        ),
    };
    // One long sequence that needs several ranks and some short ones: the
    // attention layout is uneven, so the remap moves tokens.
    plan_step(
        Strategy::Zeppelin,
        &ctx,
        &[12_000, 900, 400, 35, 2_000],
        None,
    )
    .unwrap()
}

fn ids(routes: &RemapRoutes) -> Vec<u64> {
    routes
        .attention
        .iter()
        .flat_map(|r| (r.start..r.end).map(move |p| r.sequence * 1_000_000 + p))
        .collect()
}

#[test]
fn remap_moves_the_planned_tokens_and_back() {
    let plan = plan();
    let remap = plan.remap.first().expect("the plan has a remap").clone();
    let mb = remap.micro_batch;
    let world = plan.world_size;
    let routes: Vec<RemapRoutes> = (0..world)
        .map(|r| plan.remap_routes(mb, r).unwrap())
        .collect();
    // What each rank's linear layout must hold, token by token.
    let expected: Vec<Vec<u64>> = (0..world as usize)
        .map(|me| {
            let mut rows: Vec<u64> = ids(&routes[me])[..routes[me].keep as usize].to_vec();
            for (from, n) in &routes[me].recvs {
                let src = &routes[*from as usize];
                let before: u64 = src
                    .sends
                    .iter()
                    .filter(|(to, _)| (*to as usize) < me)
                    .map(|s| s.1)
                    .sum();
                let start = (src.keep + before) as usize;
                rows.extend_from_slice(&ids(src)[start..start + *n as usize]);
            }
            rows
        })
        .collect();
    let port = common::free_port();
    let threads: Vec<_> = (0..world)
        .map(|rank| {
            let route = routes[rank as usize].clone();
            std::thread::spawn(move || {
                let (_store, mut group) = common::join(rank, world, port, Duration::from_secs(20));
                let remap = Remap::new(&route, rank, world);
                let x = token_id_rows(&route).unwrap();
                let linear = remap.to_linear(&mut group, &x).unwrap();
                let back = remap.to_attention(&mut group, &linear).unwrap();
                let linear: Vec<f32> = Vec::try_from(linear.flatten(0, -1)).unwrap();
                let exact_round_trip = back.equal(&x);
                (linear, exact_round_trip)
            })
        })
        .collect();
    let results: Vec<(Vec<f32>, bool)> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let mut everything: Vec<u64> = Vec::new();
    for (rank, (linear, round_trip)) in results.iter().enumerate() {
        assert!(
            round_trip,
            "rank {rank}: attention -> linear -> attention is not the identity"
        );
        let got: Vec<u64> = linear.iter().map(|v| *v as u64).collect();
        assert_eq!(
            got.len() as u64,
            remap.linear_tokens[rank],
            "rank {rank} row count"
        );
        assert_eq!(got, expected[rank], "rank {rank} linear layout");
        everything.extend(got);
    }
    // Every token of the micro-batch is in exactly one linear layout.
    let mut all: Vec<u64> = routes.iter().flat_map(ids).collect();
    all.sort_unstable();
    everything.sort_unstable();
    assert_eq!(everything, all);
    assert!(
        routes.iter().any(|r| !r.sends.is_empty()),
        "the remap moved no token: the test would prove nothing"
    );
}
