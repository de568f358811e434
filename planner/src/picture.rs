//! A step plan as a picture (SVG): one row per rank, grouped by node, time
//! across as the cost model predicts it. Each group's attention is a bar in
//! the colour of its first sequence (a sequence id has the same colour in
//! every picture); the part of a bar that is communication compute did not
//! hide is hatched; a remapped micro-batch's linear phase is grey; the lower
//! bound is a dashed line. Hovering a bar (its `<title>`) names the
//! micro-batch, the sequences with their lengths, the degree and the ranks.
//!
//! Past [`MAX_RANK_ROWS`] ranks, a row stands for a node (or a run of
//! consecutive nodes, past as many nodes) and shows its slowest rank, and
//! the picture says so.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use svg::Document;
use svg::node::element::{Definitions, Group, Line, Path, Pattern, Rectangle, Text, Title};

use crate::plan::{RankPrediction, StepPlan};
use crate::report::SimulationReport;
use crate::strategies::Strategy;

/// The most ranks drawn one row each.
pub const MAX_RANK_ROWS: usize = 256;

const ROW_H: f64 = 14.0;
const ROW_GAP: f64 = 2.0;
const NODE_GAP: f64 = 8.0;
const LEFT: f64 = 150.0;
const PLOT_W: f64 = 900.0;
const TOP: f64 = 56.0;
const BOTTOM: f64 = 40.0;

/// Why a plan cannot be drawn.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PictureError {
    #[error("the plan has no ranks to draw")]
    NoRanks,
    #[error(
        "the plan has no predicted timeline (written by an older weft?); plan the batch again to draw it"
    )]
    NoTimeline,
    #[error("the simulation has no steps to draw")]
    NoSteps,
    #[error("{0} is not a finite time; the plan cannot be drawn")]
    NotFinite(String),
}

impl PictureError {
    /// A stable, machine-readable name for the kind of failure.
    pub fn category(&self) -> &'static str {
        match self {
            PictureError::NoRanks
            | PictureError::NoTimeline
            | PictureError::NoSteps
            | PictureError::NotFinite(_) => "plan_picture",
        }
    }
}

/// The colour of sequence `id`: hues a golden angle apart, so neighbouring
/// ids differ.
pub fn sequence_colour(id: u64) -> String {
    let hue = (id as f64 * 137.508) % 360.0;
    format!("hsl({hue:.1},65%,55%)")
}

/// One row of the picture: its label and the rank it shows.
struct Row<'a> {
    label: String,
    rank: &'a RankPrediction,
    /// A gap above it (the first row of a node).
    node_start: bool,
}

fn rows(plan: &StepPlan) -> (Vec<Row<'_>>, bool) {
    let mut by_node: Vec<(&str, Vec<&RankPrediction>)> = Vec::new();
    for rank in &plan.ranks {
        match by_node.last_mut() {
            Some((node, ranks)) if *node == rank.node => ranks.push(rank),
            _ => by_node.push((&rank.node, vec![rank])),
        }
    }
    if plan.ranks.len() <= MAX_RANK_ROWS {
        let rows = by_node
            .iter()
            .flat_map(|(node, ranks)| {
                ranks.iter().enumerate().map(move |(i, r)| Row {
                    label: if i == 0 {
                        format!("{node} · rank {}", r.rank)
                    } else {
                        format!("rank {}", r.rank)
                    },
                    rank: r,
                    node_start: i == 0,
                })
            })
            .collect();
        return (rows, false);
    }
    // A row per node, or per run of consecutive nodes when even the nodes
    // are too many.
    let per_row = by_node.len().div_ceil(MAX_RANK_ROWS).max(1);
    let rows = by_node
        .chunks(per_row)
        .filter_map(|run| {
            let slowest = run
                .iter()
                .flat_map(|(_, ranks)| ranks.iter())
                .max_by(|a, b| a.time_s.total_cmp(&b.time_s))?;
            let label = match run {
                [(node, _)] => format!("{node} (rank {})", slowest.rank),
                [(first, _), .., (last, _)] => {
                    format!("{first}…{last} (rank {})", slowest.rank)
                }
                [] => return None,
            };
            Some(Row {
                label,
                rank: slowest,
                node_start: false,
            })
        })
        .collect();
    (rows, true)
}

/// An empty picture of `width` by `height` pixels in weft's font.
fn canvas(width: f64, height: f64) -> Document {
    Document::new()
        .set("viewBox", (0, 0, width, height))
        .set("width", width)
        .set("height", height)
        .set("font-family", "sans-serif")
        .set("font-size", 11)
}

fn finite(what: &str, t: f64) -> Result<(), PictureError> {
    if t.is_finite() && t >= 0.0 {
        Ok(())
    } else {
        Err(PictureError::NotFinite(format!("{what} ({t})")))
    }
}

/// The ticks of an axis from 0 to `end`: at most 50.
fn ticks(end: f64) -> impl Iterator<Item = f64> {
    let step = tick_step(end);
    let count = ((end * 1.0001 / step) as usize).min(50);
    (0..=count).map(move |k| k as f64 * step)
}

/// A coordinate to a hundredth of a pixel: enough for any screen, and the
/// same text on every machine.
fn px(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

fn seconds(s: f64) -> String {
    if s >= 1.0 {
        format!("{s:.2} s")
    } else {
        format!("{:.1} ms", s * 1e3)
    }
}

/// A tick step of about a tenth of `span`: 1, 2 or 5 times a power of ten.
fn tick_step(span: f64) -> f64 {
    let raw = (span / 10.0).max(1e-9);
    let power = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * power)
        .find(|step| *step >= raw)
        .unwrap_or(10.0 * power)
}

/// The plan as an SVG document.
pub fn plan_svg(plan: &StepPlan) -> Result<String, PictureError> {
    plan_svg_noted(plan, None)
}

/// The plan as an SVG document, with `note` under the heading (what the
/// picture does not show as it ran, for instance).
pub fn plan_svg_noted(plan: &StepPlan, note: Option<&str>) -> Result<String, PictureError> {
    if plan.ranks.is_empty() {
        return Err(PictureError::NoRanks);
    }
    if plan.ranks.iter().all(|r| r.timeline.is_empty()) {
        return Err(PictureError::NoTimeline);
    }
    finite("the step time", plan.predicted.step_time_s)?;
    finite("the lower bound", plan.predicted.lower_bound_s)?;
    for rank in &plan.ranks {
        for span in &rank.timeline {
            for (what, t) in [
                ("a start", span.start_s),
                ("an end", span.end_s),
                ("an exposed time", span.exposed_s),
            ] {
                finite(&format!("{what} of rank {}", rank.rank), t)?;
            }
        }
    }
    let (rows, aggregated) = rows(plan);
    let end = plan
        .ranks
        .iter()
        .flat_map(|r| r.timeline.iter().map(|s| s.end_s))
        .fold(plan.predicted.lower_bound_s, f64::max)
        .max(1e-9);
    let x = |t: f64| px(LEFT + t / end * PLOT_W);
    let node_starts = rows.iter().filter(|r| r.node_start).count() as f64;
    let height = TOP + rows.len() as f64 * (ROW_H + ROW_GAP) + node_starts * NODE_GAP + BOTTOM;
    let width = LEFT + PLOT_W + 40.0;

    let lengths: BTreeMap<u64, u64> = plan.sequences.iter().map(|s| (s.id, s.length)).collect();
    let degree: BTreeMap<u64, u32> = plan.sequences.iter().map(|s| (s.id, s.degree)).collect();

    let hatch = Pattern::new()
        .set("id", "exposed")
        .set("width", 4)
        .set("height", 4)
        .set("patternUnits", "userSpaceOnUse")
        .set("patternTransform", "rotate(45)")
        .add(
            Rectangle::new()
                .set("width", 4)
                .set("height", 4)
                .set("fill", "#000")
                .set("fill-opacity", 0.15),
        )
        .add(
            Line::new()
                .set("x1", 0)
                .set("y1", 0)
                .set("x2", 0)
                .set("y2", 4)
                .set("stroke", "#000")
                .set("stroke-width", 1.5),
        );
    let mut document = canvas(width, height)
        .add(Definitions::new().add(hatch))
        .add(
            Rectangle::new()
                .set("width", width)
                .set("height", height)
                .set("fill", "#fff"),
        );

    let mut heading = format!(
        "{}: {} ranks, {} micro-batches, {} sequences; step {} (lower bound {})",
        plan.strategy,
        plan.world_size,
        plan.micro_batches.len(),
        plan.sequences.len(),
        seconds(plan.predicted.step_time_s),
        seconds(plan.predicted.lower_bound_s),
    );
    if !plan.predicted.fits_in_memory {
        heading.push_str("; does not fit in memory");
    }
    document = document.add(
        Text::new(heading)
            .set("x", 10)
            .set("y", 18)
            .set("font-size", 14)
            .set("font-weight", "bold"),
    );
    let mut legend = if aggregated {
        format!(
            "{} ranks are too many to draw one each: a row per node (or run of nodes), its slowest rank. Hatched: communication not hidden; grey: remapped linear modules; dashed: lower bound.",
            plan.ranks.len()
        )
    } else {
        "One row per rank, by node. Hatched: communication not hidden; grey: remapped linear modules; dashed: lower bound.".to_string()
    };
    if let Some(note) = note {
        legend = format!("{legend} {note}");
    }
    document = document.add(
        Text::new(legend)
            .set("x", 10)
            .set("y", 36)
            .set("fill", "#444"),
    );

    let mut y = TOP;
    let mut bars = Group::new().set("id", "ranks");
    for row in &rows {
        if row.node_start {
            y += NODE_GAP;
        }
        bars = bars.add(
            Text::new(row.label.clone())
                .set("x", LEFT - 6.0)
                .set("y", y + ROW_H - 3.0)
                .set("text-anchor", "end"),
        );
        for span in &row.rank.timeline {
            let (x0, x1) = (x(span.start_s), x(span.end_s));
            let w = px((x1 - x0).max(0.5));
            let (fill, title) = match span.group {
                Some(g) => {
                    let group = plan
                        .micro_batches
                        .get(span.micro_batch as usize)
                        .and_then(|mb| mb.groups.get(g as usize));
                    let sequences = group.map(|g| g.sequences.as_slice()).unwrap_or(&[]);
                    let mut title = format!("micro-batch {}: ", span.micro_batch);
                    for (i, id) in sequences.iter().enumerate() {
                        let _ = write!(
                            title,
                            "{}sequence {id} ({} tokens)",
                            if i > 0 { ", " } else { "" },
                            lengths.get(id).copied().unwrap_or(0)
                        );
                    }
                    if let Some(group) = group {
                        let ranks: Vec<String> = group.ranks.iter().map(u32::to_string).collect();
                        let _ = write!(
                            title,
                            "; degree {} on ranks {}",
                            sequences
                                .first()
                                .and_then(|id| degree.get(id))
                                .copied()
                                .unwrap_or(group.ranks.len() as u32),
                            ranks.join(", ")
                        );
                        if group.inner_ring > 0 {
                            let _ =
                                write!(title, " (hierarchical ring, {} a node)", group.inner_ring);
                        }
                    }
                    let _ = write!(
                        title,
                        "; {} to {}, of which {} communication not hidden",
                        seconds(span.start_s),
                        seconds(span.end_s),
                        seconds(span.exposed_s)
                    );
                    (
                        sequences
                            .first()
                            .map_or("#999".to_string(), |id| sequence_colour(*id)),
                        title,
                    )
                }
                None => (
                    "#bbb".to_string(),
                    format!(
                        "micro-batch {}: linear modules on the remapped layout and the remap; {} to {}, of which {} transfers not hidden",
                        span.micro_batch,
                        seconds(span.start_s),
                        seconds(span.end_s),
                        seconds(span.exposed_s)
                    ),
                ),
            };
            let mut bar = Group::new().add(Title::new(title)).add(
                Rectangle::new()
                    .set("x", x0)
                    .set("y", y)
                    .set("width", w)
                    .set("height", ROW_H)
                    .set("fill", fill)
                    .set("stroke", "#333")
                    .set("stroke-width", 0.4),
            );
            if span.exposed_s > 0.0 {
                let ex = x(span.end_s - span.exposed_s.min(span.end_s - span.start_s));
                bar = bar.add(
                    Rectangle::new()
                        .set("x", ex)
                        .set("y", y)
                        .set("width", px((x1 - ex).max(0.0)))
                        .set("height", ROW_H)
                        .set("fill", "url(#exposed)"),
                );
            }
            bars = bars.add(bar);
        }
        y += ROW_H + ROW_GAP;
    }
    document = document.add(bars);

    // Time axis and the lower bound.
    let axis_y = y + 6.0;
    let mut axis = Group::new().set("id", "axis").add(
        Line::new()
            .set("x1", LEFT)
            .set("y1", axis_y)
            .set("x2", LEFT + PLOT_W)
            .set("y2", axis_y)
            .set("stroke", "#333"),
    );
    for t in ticks(end) {
        axis = axis
            .add(
                Line::new()
                    .set("x1", x(t))
                    .set("y1", axis_y)
                    .set("x2", x(t))
                    .set("y2", axis_y + 4.0)
                    .set("stroke", "#333"),
            )
            .add(
                Text::new(seconds(t))
                    .set("x", x(t))
                    .set("y", axis_y + 16.0)
                    .set("text-anchor", "middle"),
            );
    }
    let bound = x(plan.predicted.lower_bound_s);
    axis = axis
        .add(
            Path::new()
                .set("d", format!("M {bound:.2} {TOP} L {bound:.2} {axis_y:.2}"))
                .set("stroke", "#c00")
                .set("stroke-dasharray", "5 3")
                .set("stroke-width", 1.2)
                .add(Title::new(format!(
                    "lower bound: {}",
                    seconds(plan.predicted.lower_bound_s)
                ))),
        )
        .add(
            Text::new("lower bound")
                .set("x", bound.min(LEFT + PLOT_W - 70.0) + 3.0)
                .set("y", TOP - 4.0)
                .set("fill", "#c00"),
        );
    document = document.add(axis);
    Ok(document.to_string())
}

/// The colour of a strategy, the same in every picture.
pub fn strategy_colour(name: &str) -> &'static str {
    const COLOURS: [&str; 6] = [
        "#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#d62728",
    ];
    Strategy::ALL
        .iter()
        .position(|s| s.name() == name)
        .map_or("#777", |i| COLOURS[i % COLOURS.len()])
}

/// A simulation as a picture: for each step, each strategy's predicted
/// step time as a bar (the strategies side by side, in their colours), and
/// the step's lower bound as a dashed mark across them.
pub fn simulation_svg(report: &SimulationReport) -> Result<String, PictureError> {
    if report.lower_bounds_s.is_empty() || report.strategies.is_empty() {
        return Err(PictureError::NoSteps);
    }
    for (i, bound) in report.lower_bounds_s.iter().enumerate() {
        finite(&format!("the lower bound of step {i}"), *bound)?;
    }
    for s in &report.strategies {
        for (i, t) in s.step_times_s.iter().enumerate() {
            finite(&format!("{}'s time of step {i}", s.name), *t)?;
        }
    }
    let steps = report.lower_bounds_s.len();
    let n = report.strategies.len() as f64;
    let top = report
        .strategies
        .iter()
        .flat_map(|s| s.step_times_s.iter().copied())
        .chain(report.lower_bounds_s.iter().copied())
        .fold(0.0, f64::max)
        .max(1e-9);
    let (plot_w, plot_h, left, top_margin) = (900.0, 300.0, 70.0, 70.0);
    let (width, height) = (left + plot_w + 40.0, top_margin + plot_h + 60.0);
    let slot = plot_w / steps as f64;
    let bar = (slot * 0.8 / n).max(0.5);
    let y = |t: f64| px(top_margin + plot_h - t / top * plot_h);
    let mut document = canvas(width, height)
        .add(Rectangle::new().set("width", width).set("height", height).set("fill", "#fff"))
        .add(
            Text::new(format!(
                "{} steps on {} ranks: predicted step time of each strategy against the step's lower bound (dashed)",
                steps, report.world_size
            ))
            .set("x", 10)
            .set("y", 18)
            .set("font-size", 14)
            .set("font-weight", "bold"),
        );
    // Legend: each strategy in its colour, with its mean against the bound.
    let mut legend = Group::new().set("id", "legend");
    for (i, s) in report.strategies.iter().enumerate() {
        let lx = 10.0 + i as f64 * 170.0;
        legend = legend
            .add(
                Rectangle::new()
                    .set("x", lx)
                    .set("y", 30)
                    .set("width", 12)
                    .set("height", 12)
                    .set("fill", strategy_colour(&s.name)),
            )
            .add(
                Text::new(format!("{} ({:.2}× bound)", s.name, s.vs_lower_bound))
                    .set("x", lx + 16.0)
                    .set("y", 40),
            );
    }
    document = document.add(legend);
    let mut bars = Group::new().set("id", "steps");
    for step in 0..steps {
        let x0 = left + step as f64 * slot + slot * 0.1;
        for (i, s) in report.strategies.iter().enumerate() {
            let Some(&t) = s.step_times_s.get(step) else {
                continue;
            };
            let bound = report.lower_bounds_s[step];
            bars = bars.add(
                Group::new()
                    .add(Title::new(format!(
                        "step {step}, {}: {} ({:.2}× the bound, {})",
                        s.name,
                        seconds(t),
                        if bound > 0.0 { t / bound } else { 1.0 },
                        seconds(bound)
                    )))
                    .add(
                        Rectangle::new()
                            .set("x", px(x0 + i as f64 * bar))
                            .set("y", y(t))
                            .set("width", px(bar))
                            .set("height", px(top_margin + plot_h - y(t)))
                            .set("fill", strategy_colour(&s.name)),
                    ),
            );
        }
        let bound = report.lower_bounds_s[step];
        bars = bars.add(
            Line::new()
                .set("x1", px(x0 - slot * 0.05))
                .set("x2", px(x0 + n * bar + slot * 0.05))
                .set("y1", y(bound))
                .set("y2", y(bound))
                .set("stroke", "#c00")
                .set("stroke-dasharray", "4 2")
                .set("stroke-width", 1.5)
                .add(Title::new(format!(
                    "step {step}: lower bound {}",
                    seconds(bound)
                ))),
        );
        if steps <= 40 || step % steps.div_ceil(40) == 0 {
            bars = bars.add(
                Text::new(step.to_string())
                    .set("x", px(x0 + n * bar / 2.0))
                    .set("y", top_margin + plot_h + 14.0)
                    .set("text-anchor", "middle"),
            );
        }
    }
    document = document.add(bars);
    // The time axis.
    let mut axis = Group::new().set("id", "axis").add(
        Line::new()
            .set("x1", left)
            .set("x2", left)
            .set("y1", top_margin)
            .set("y2", top_margin + plot_h)
            .set("stroke", "#333"),
    );
    for t in ticks(top) {
        axis = axis.add(
            Text::new(seconds(t))
                .set("x", left - 6.0)
                .set("y", y(t) + 4.0)
                .set("text-anchor", "end"),
        );
    }
    axis = axis.add(
        Text::new("step")
            .set("x", left + plot_w / 2.0)
            .set("y", top_margin + plot_h + 32.0)
            .set("text-anchor", "middle"),
    );
    Ok(document.add(axis).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_endless_axis_and_no_picture_of_times_that_are_not_finite() {
        assert_eq!(ticks(1.0).count(), 11);
        assert!(ticks(f64::MAX).count() <= 51);
        assert!(matches!(
            finite("x", f64::INFINITY),
            Err(PictureError::NotFinite(_))
        ));
        assert!(matches!(finite("x", -1.0), Err(PictureError::NotFinite(_))));
    }

    #[test]
    fn ticks_are_round_numbers() {
        assert_eq!(tick_step(1.0), 0.1);
        assert_eq!(tick_step(0.37), 0.05);
        assert_eq!(tick_step(13.0), 2.0);
    }

    #[test]
    fn the_same_sequence_has_the_same_colour_and_neighbours_differ() {
        assert_eq!(sequence_colour(7), sequence_colour(7));
        assert_ne!(sequence_colour(7), sequence_colour(8));
    }
}
