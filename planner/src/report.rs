//! `weft simulate`: sample batches from a lengths distribution, plan each with
//! every strategy, and report what the simulator predicts, side by side.

use std::time::Instant;

use serde::Serialize;

use crate::rng::SplitMix64;
use crate::sim::{PlanContext, lower_bound, simulate};
use crate::strategies::{PlanningError, Strategy, plan_layout};

/// Samples `steps` batches of about `tokens_per_step` tokens: sequences drawn
/// uniformly (with replacement) from `lengths`, longer ones cut at
/// `max_seq_len`, whole sequences added while they fit; the first of a batch
/// is always taken (cut to the budget if needed).
pub fn sample_batches(
    lengths: &[u64],
    tokens_per_step: u64,
    steps: usize,
    seed: u64,
    max_seq_len: Option<u64>,
) -> Vec<Vec<u64>> {
    let mut rng = SplitMix64::new(seed);
    let cap = max_seq_len.unwrap_or(u64::MAX);
    (0..steps)
        .map(|_| {
            let mut batch = Vec::new();
            let mut used = 0u64;
            loop {
                if lengths.is_empty() {
                    break;
                }
                let s = lengths[rng.below(lengths.len() as u64) as usize].min(cap);
                if batch.is_empty() {
                    let s = s.min(tokens_per_step.max(1));
                    used += s;
                    batch.push(s);
                } else if used + s > tokens_per_step {
                    break;
                } else {
                    used += s;
                    batch.push(s);
                }
                if used >= tokens_per_step {
                    break;
                }
            }
            batch
        })
        .collect()
}

/// What `weft simulate` reports for one strategy.
#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct StrategyReport {
    pub name: String,
    /// Mean predicted step time, s.
    pub step_time_s: f64,
    /// Mean step time over mean lower bound.
    pub vs_lower_bound: f64,
    /// Mean over steps of max rank busy time / mean rank busy time.
    pub max_over_mean: f64,
    /// Mean share of rank time in communication that compute did not hide.
    pub comm_fraction: f64,
    /// Largest memory of any rank in any step, GiB.
    pub peak_mem_gib: f64,
    /// Every step fitted in every rank's memory.
    pub fits_in_memory: bool,
    /// Mean wall time of planning one step, ms.
    pub planner_ms: f64,
    /// Mean tokens per second the step time implies.
    pub tokens_per_s: f64,
    /// The predicted time of each step, s.
    pub step_times_s: Vec<f64>,
}

/// What `weft simulate` reports.
#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct SimulationReport {
    pub lower_bound_s: f64,
    pub world_size: u32,
    pub steps: usize,
    pub mean_tokens_per_step: f64,
    pub mean_sequences_per_step: f64,
    pub strategies: Vec<StrategyReport>,
    /// The lower bound of each step, s.
    pub lower_bounds_s: Vec<f64>,
}

/// Plans every batch with each strategy and aggregates the predictions.
pub fn simulate_batches(
    ctx: &PlanContext,
    batches: &[Vec<u64>],
    strategies: &[Strategy],
    context_length: Option<u64>,
) -> Result<SimulationReport, PlanningError> {
    let steps = batches.len().max(1) as f64;
    let lower_bounds_s: Vec<f64> = batches.iter().map(|b| lower_bound(ctx, b)).collect();
    let lb_mean: f64 = lower_bounds_s.iter().sum::<f64>() / steps;
    let tokens: f64 = batches
        .iter()
        .map(|b| b.iter().sum::<u64>() as f64)
        .sum::<f64>()
        / steps;
    let sequences: f64 = batches.iter().map(|b| b.len() as f64).sum::<f64>() / steps;
    let mut reports = Vec::new();
    for &strategy in strategies {
        let (mut time, mut balance, mut comm, mut peak, mut wall) = (0.0, 0.0, 0.0, 0.0f64, 0.0);
        let mut fits = true;
        let mut step_times_s = Vec::with_capacity(batches.len());
        for batch in batches {
            let start = Instant::now();
            let layout = plan_layout(strategy, ctx, batch, context_length)?;
            wall += start.elapsed().as_secs_f64();
            let outcome = simulate(ctx, batch, &layout);
            time += outcome.step_time_s;
            step_times_s.push(outcome.step_time_s);
            balance += outcome.max_over_mean();
            comm += outcome.comm_fraction();
            peak = peak.max(outcome.peak_memory_gib());
            fits &= outcome.fits_in_memory;
        }
        let step_time_s = time / steps;
        reports.push(StrategyReport {
            name: strategy.name().to_string(),
            step_time_s,
            vs_lower_bound: if lb_mean > 0.0 {
                step_time_s / lb_mean
            } else {
                1.0
            },
            max_over_mean: balance / steps,
            comm_fraction: comm / steps,
            peak_mem_gib: peak,
            fits_in_memory: fits,
            planner_ms: wall * 1e3 / steps,
            tokens_per_s: if step_time_s > 0.0 {
                tokens / step_time_s
            } else {
                0.0
            },
            step_times_s,
        });
    }
    Ok(SimulationReport {
        lower_bound_s: lb_mean,
        world_size: ctx.topology.world(),
        steps: batches.len(),
        mean_tokens_per_step: tokens,
        mean_sequences_per_step: sequences,
        strategies: reports,
        lower_bounds_s,
    })
}

impl SimulationReport {
    /// The report as an aligned text table.
    pub fn table(&self) -> String {
        let mut out = format!(
            "{} steps, {:.0} tokens and {:.1} sequences per step on {} GPUs; lower bound {:.4} s/step\n",
            self.steps,
            self.mean_tokens_per_step,
            self.mean_sequences_per_step,
            self.world_size,
            self.lower_bound_s
        );
        out += &format!(
            "{:<10} {:>12} {:>9} {:>9} {:>8} {:>10} {:>6} {:>12} {:>11}\n",
            "strategy",
            "step_time_s",
            "vs_lb",
            "max/mean",
            "comm",
            "peak_GiB",
            "fits",
            "tokens/s",
            "planner_ms"
        );
        for s in &self.strategies {
            out += &format!(
                "{:<10} {:>12.4} {:>9.3} {:>9.3} {:>7.1}% {:>10.1} {:>6} {:>12.0} {:>11.2}\n",
                s.name,
                s.step_time_s,
                s.vs_lower_bound,
                s.max_over_mean,
                s.comm_fraction * 100.0,
                s.peak_mem_gib,
                if s.fits_in_memory { "yes" } else { "NO" },
                s.tokens_per_s,
                s.planner_ms
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_are_seeded_budgeted_and_cut() {
        let lengths = [100, 5000, 300, 70_000];
        let a = sample_batches(&lengths, 10_000, 5, 7, Some(8192));
        assert_eq!(a, sample_batches(&lengths, 10_000, 5, 7, Some(8192)));
        assert_ne!(a, sample_batches(&lengths, 10_000, 5, 8, Some(8192)));
        for batch in &a {
            assert!(!batch.is_empty());
            assert!(batch.iter().sum::<u64>() <= 10_000);
            assert!(batch.iter().all(|s| *s <= 8192));
        }
    }
}
