//! `weft simulate`: sample batches from a lengths distribution, plan each with
//! every strategy, and report what the simulator predicts, side by side.

use std::time::Instant;

use serde::Serialize;

use crate::bound::lower_bound;
use crate::cost::StreamBp;
use crate::layout::PlanContext;
use crate::rng::SplitMix64;
use crate::sim::simulate;
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
    /// With StreamBP chosen per ring: weft's choice against streaming
    /// every ring and none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stream_bp: Option<StreamBpReport>,
}

/// weft with StreamBP chosen per ring, streaming every ring, and streaming
/// none, on the same batches.
#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct StreamBpReport {
    /// Mean step time with StreamBP chosen per ring, s.
    pub per_ring_s: f64,
    /// Share of its rings that stream.
    pub streamed_ring_share: f64,
    /// Mean step time with every ring streaming, s.
    pub always_s: f64,
    /// Mean step time with none streaming, s; `None` when some batch does
    /// not fit without StreamBP (or the model does not).
    pub off_s: Option<f64>,
    /// Every batch fits in memory, per ring, always, off.
    pub fits: [bool; 3],
}

impl StreamBpReport {
    /// How much faster the choice per ring is than streaming every ring.
    pub fn gain_over_always(&self) -> f64 {
        self.always_s / self.per_ring_s
    }

    /// How much faster it is than streaming none (when that fits).
    pub fn gain_over_off(&self) -> Option<f64> {
        self.off_s.map(|off| off / self.per_ring_s)
    }
}

/// weft's mean step time over `batches`, whether every batch fitted, and the
/// share of its rings that stream.
fn weft_mean(
    ctx: &PlanContext,
    batches: &[Vec<u64>],
    context_length: Option<u64>,
) -> Result<(f64, bool, f64), PlanningError> {
    let (mut time, mut fits, mut streamed, mut rings) = (0.0, true, 0usize, 0usize);
    for batch in batches {
        let layout = plan_layout(Strategy::Weft, ctx, batch, context_length)?;
        let outcome = simulate(ctx, batch, &layout);
        time += outcome.step_time_s;
        fits &= outcome.fits_in_memory;
        for group in layout.micro_batches.iter().flat_map(|m| &m.groups) {
            rings += 1;
            streamed += usize::from(group.streams(&ctx.cost));
        }
    }
    Ok((
        time / batches.len().max(1) as f64,
        fits,
        streamed as f64 / rings.max(1) as f64,
    ))
}

/// [`StreamBpReport`] of `batches` when `ctx` leaves StreamBP's choice to
/// the plan.
fn stream_bp_report(
    ctx: &PlanContext,
    batches: &[Vec<u64>],
    context_length: Option<u64>,
) -> Result<Option<StreamBpReport>, PlanningError> {
    if ctx.cost.coefficients.streambp != StreamBp::PerRing {
        return Ok(None);
    }
    let with = |streamed: bool| PlanContext {
        cost: ctx.cost.with_streaming(streamed),
        ..ctx.clone()
    };
    let (per_ring_s, per_ring_fits, streamed_ring_share) = weft_mean(ctx, batches, context_length)?;
    let (always_s, always_fits, _) = weft_mean(&with(true), batches, context_length)?;
    let off = match weft_mean(&with(false), batches, context_length) {
        Ok((time, fits, _)) => Some((time, fits)),
        Err(
            PlanningError::SequenceTooLong { .. }
            | PlanningError::DegreeTooSmall { .. }
            | PlanningError::ModelDoesNotFit { .. },
        ) => None,
        Err(e) => return Err(e),
    };
    Ok(Some(StreamBpReport {
        per_ring_s,
        streamed_ring_share,
        always_s,
        off_s: off.map(|(time, _)| time),
        fits: [
            per_ring_fits,
            always_fits,
            off.is_some_and(|(_, fits)| fits),
        ],
    }))
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
        stream_bp: if strategies.contains(&Strategy::Weft) {
            stream_bp_report(ctx, batches, context_length)?
        } else {
            None
        },
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
        if let Some(stream) = &self.stream_bp {
            let fits = |f: bool| if f { "" } else { " (does NOT fit)" };
            out += &format!(
                "StreamBP per ring (weft): {:.4} s/step{}, {:.0}% of rings streamed; every ring streamed: {:.4} s/step{} ({:.3}x slower); ",
                stream.per_ring_s,
                fits(stream.fits[0]),
                stream.streamed_ring_share * 100.0,
                stream.always_s,
                fits(stream.fits[1]),
                stream.gain_over_always(),
            );
            out += &match (stream.off_s, stream.gain_over_off()) {
                (Some(off), Some(gain)) => format!(
                    "none streamed: {off:.4} s/step{} ({gain:.3}x slower)\n",
                    fits(stream.fits[2])
                ),
                _ => "none streamed: a sequence does not fit without StreamBP\n".to_string(),
            };
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
