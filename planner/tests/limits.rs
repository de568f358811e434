//! The job's limits on its plans (a TrainingJob's `parallelism` section):
//! each changes the plan as it says, or the batch is refused by its name.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use weft_planner::cluster::parse_cluster;
use weft_planner::cost::{CostCoefficients, CostModel};
use weft_planner::model::ModelSpec;
use weft_planner::plan::StepPlan;
use weft_planner::topology::Topology;
use weft_planner::{PlanContext, PlanLimits, PlanningError, Strategy, plan_step};

fn context(cluster: &str, limits: PlanLimits) -> PlanContext {
    PlanContext {
        topology: Topology::new(&parse_cluster(cluster).unwrap()).unwrap(),
        cost: CostModel::new(
            ModelSpec::preset("llama-7b").unwrap(),
            CostCoefficients::default(),
        ),
        limits,
    }
}

fn widest(plan: &StepPlan) -> u32 {
    plan.micro_batches
        .iter()
        .flat_map(|m| &m.groups)
        .map(|g| g.ranks.len() as u32)
        .max()
        .unwrap()
}

/// One long document among short ones: weft gives it a wide ring.
fn batch() -> Vec<u64> {
    let mut lengths = vec![66_000];
    lengths.extend((0..40).map(|i| 2_048 + 997 * (i % 7)));
    lengths
}

#[test]
fn max_cp_degree_caps_every_ring_of_weft_and_static() {
    let lengths = batch();
    let free = plan_step(
        Strategy::Weft,
        &context("4x8", PlanLimits::default()),
        &lengths,
        None,
    )
    .unwrap();
    let free_widest = widest(&free);
    assert!(free_widest > 8, "weft's own widest ring: {free_widest}");
    for strategy in [Strategy::Weft, Strategy::Static] {
        let capped = context(
            "4x8",
            PlanLimits {
                max_cp_degree: Some(8),
                ..Default::default()
            },
        );
        let plan = plan_step(strategy, &capped, &lengths, Some(66_000)).unwrap();
        assert!(widest(&plan) <= 8, "{strategy:?}: {}", widest(&plan));
        plan.check().unwrap();
    }
}

#[test]
fn a_cap_below_what_memory_needs_is_refused_by_name() {
    let limits = PlanLimits {
        max_cp_degree: Some(2),
        ..Default::default()
    };
    let err = plan_step(Strategy::Weft, &context("4x8", limits), &batch(), None).unwrap_err();
    assert!(matches!(err, PlanningError::DegreeTooSmall { .. }), "{err}");
    assert!(err.to_string().contains("parallelism.maxCpDegree"), "{err}");
    assert_eq!(err.category(), "limits");
}

#[test]
fn cp_degree_gives_static_exactly_that_degree() {
    let lengths = batch();
    for degree in [8u32, 12, 32] {
        let limits = PlanLimits {
            cp_degree: Some(degree),
            ..Default::default()
        };
        let plan = plan_step(
            Strategy::Static,
            &context("4x8", limits),
            &lengths,
            Some(66_000),
        )
        .unwrap();
        plan.check().unwrap();
        for group in plan.micro_batches.iter().flat_map(|m| &m.groups) {
            assert_eq!(group.ranks.len() as u32, degree);
        }
        assert!(plan.sequences.iter().all(|s| s.degree == degree));
    }
    // Static on its own picks another degree for this batch.
    let own = plan_step(
        Strategy::Static,
        &context("4x8", PlanLimits::default()),
        &lengths,
        Some(66_000),
    )
    .unwrap();
    assert_ne!(widest(&own), 12);
}

#[test]
fn cp_degree_is_refused_where_it_cannot_hold() {
    let lengths = batch();
    let with = |degree| PlanLimits {
        cp_degree: Some(degree),
        ..Default::default()
    };
    let too_many = plan_step(Strategy::Static, &context("4x8", with(64)), &lengths, None);
    assert!(
        matches!(too_many, Err(PlanningError::DegreeTooLarge { .. })),
        "{too_many:?}"
    );
    let too_few = plan_step(Strategy::Static, &context("4x8", with(1)), &lengths, None);
    assert!(
        matches!(too_few, Err(PlanningError::DegreeTooSmall { .. })),
        "{too_few:?}"
    );
    for strategy in [Strategy::Weft, Strategy::Hdp, Strategy::Zeppelin] {
        let err = plan_step(strategy, &context("4x8", with(8)), &lengths, None).unwrap_err();
        assert!(
            matches!(err, PlanningError::UnsupportedLimit { .. }),
            "{err}"
        );
        assert!(err.to_string().contains("parallelism.cpDegree"), "{err}");
    }
    let over = PlanLimits {
        cp_degree: Some(16),
        max_cp_degree: Some(8),
        ..Default::default()
    };
    let err = plan_step(Strategy::Static, &context("4x8", over), &lengths, None).unwrap_err();
    assert!(matches!(err, PlanningError::DegreeOverCap { .. }), "{err}");
    assert!(
        err.to_string().contains(
            "parallelism.cpDegree (--cp-degree) 16 must not be greater than parallelism.maxCpDegree (--max-cp-degree) 8"
        ),
        "{err}"
    );
    // The static context length is named as such, not as a sequence.
    let err = plan_step(
        Strategy::Static,
        &context("4x8", with(2)),
        &lengths[1..],
        Some(66_000),
    )
    .unwrap_err();
    assert!(
        err.to_string().starts_with(
            "the context length (data.maxSequenceLength, --max-seq-len) of 66000 tokens"
        ),
        "{err}"
    );
    let capped = PlanLimits {
        max_cp_degree: Some(8),
        ..Default::default()
    };
    let err = plan_step(Strategy::Hdp, &context("4x8", capped), &lengths, None).unwrap_err();
    assert!(err.to_string().contains("parallelism.maxCpDegree"), "{err}");
}

#[test]
fn without_nic_aware_routing_each_transfer_takes_its_own_nic() {
    // A sequence longer than a node holds, so every strategy's ring of it
    // crosses nodes.
    let mut lengths = batch();
    lengths[0] = 110_000;
    let spread = plan_step(
        Strategy::Weft,
        &context("4x8:nics=8", PlanLimits::default()),
        &lengths,
        None,
    )
    .unwrap();
    assert!(
        spread.routes.iter().any(|r| r.legs.len() > 1),
        "weft spreads some transfer over several NICs"
    );
    let own = context(
        "4x8:nics=8",
        PlanLimits {
            nic_aware_routing: false,
            ..Default::default()
        },
    );
    for strategy in [Strategy::Weft, Strategy::Zeppelin, Strategy::Static] {
        let plan = plan_step(strategy, &own, &lengths, Some(110_000)).unwrap();
        assert!(!plan.routes.is_empty(), "{strategy:?} crosses nodes");
        assert!(
            plan.routes.iter().all(|r| r.legs.len() == 1),
            "{strategy:?}: a transfer spread over several NICs"
        );
    }
}

proptest::proptest! {
    #![proptest_config(proptest::test_runner::Config::with_cases(24))]
    /// Over random batches and caps, weft's rings keep to the cap whenever
    /// memory allows it, and the batch is refused by the cap's name when
    /// not.
    #[test]
    fn weft_keeps_to_any_cap(
        lengths in proptest::collection::vec(
            proptest::prop_oneof![4 => 1u64..8_192, 1 => 8_192u64..120_000],
            1..40,
        ),
        cap in 1u32..=16,
    ) {
        let ctx = context("2x8", PlanLimits { max_cp_degree: Some(cap), ..Default::default() });
        match plan_step(Strategy::Weft, &ctx, &lengths, None) {
            Ok(plan) => {
                proptest::prop_assert!(widest(&plan) <= cap, "widest {} past {cap}", widest(&plan));
                plan.check().unwrap();
            }
            Err(e) => proptest::prop_assert!(
                matches!(e, PlanningError::DegreeTooSmall { .. }),
                "{e}"
            ),
        }
    }
}

#[test]
fn an_executor_that_cannot_offload_gets_no_offloading_plan() {
    let lengths = batch();
    let limits = PlanLimits {
        offload_activations: false,
        ..Default::default()
    };
    let ctx = context("4x8", limits);
    let err = plan_step(Strategy::HdpOffload, &ctx, &lengths, None).unwrap_err();
    assert!(matches!(err, PlanningError::OffloadUnsupported), "{err}");
    let plan = plan_step(Strategy::Weft, &ctx, &lengths, None).unwrap();
    assert!(
        plan.micro_batches
            .iter()
            .flat_map(|m| &m.groups)
            .all(|g| g.offload == 0.0)
    );
}
