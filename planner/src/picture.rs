//! A step plan as a picture (SVG): one row per rank, grouped by node under
//! its rack's heading, time across as the cost model predicts it. Each
//! group's attention is a bar in the colour of its sequence (a sequence id
//! has the same colour in every picture); a group that packs several
//! sequences is striped, a stripe per sequence as high as its share of the
//! tokens; every ring is outlined around its bars. The part of a bar that is
//! communication compute did not hide is hatched, and a blue underline is
//! as long as the transfers compute hid; a remapped micro-batch's linear
//! phase is grey; the lower bound is a dashed line. The NIC routes run in a
//! lane on the right, from the sending row to the receiving one, in their
//! NIC's colour. Hovering a bar (its `<title>`) names the micro-batch, the
//! sequences with their lengths, the degree, the ranks and the times;
//! hovering a route names its transfers.
//!
//! Past [`MAX_RANK_ROWS`] ranks, a row stands for a node (or a run of
//! consecutive nodes, past as many nodes) and shows its slowest rank, and
//! the picture says so.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use svg::Document;
use svg::node::element::{Circle, Definitions, Group, Line, Path, Pattern, Rectangle, Text, Title};

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
const TOP: f64 = 70.0;
const BOTTOM: f64 = 40.0;
/// The height of a rack's heading.
const RACK_H: f64 = 14.0;
/// The width of the NIC routes' lane.
const LANE_W: f64 = 150.0;
/// The most sequences of a packed group striped one each.
const MAX_STRIPES: usize = 6;
/// The most NIC routes (between distinct rows, per NIC) drawn.
const MAX_ROUTES: usize = 4000;
/// The colour of transfers compute hid.
const HIDDEN_TRANSFER: &str = "#1f4fbf";
/// The NICs' colours, in the order of their names.
const NIC_COLOURS: [&str; 8] = [
    "#0072b2", "#e69f00", "#009e73", "#cc79a7", "#56b4e9", "#d55e00", "#f0e442", "#000000",
];

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
    /// A heading above it: the first row of a rack.
    rack: Option<&'a str>,
}

/// The rows to draw, whether they aggregate ranks, and the row that shows
/// each rank.
fn rows(plan: &StepPlan) -> (Vec<Row<'_>>, bool, BTreeMap<u32, usize>) {
    let mut by_node: Vec<(&str, &str, Vec<&RankPrediction>)> = Vec::new();
    for rank in &plan.ranks {
        match by_node.last_mut() {
            Some((node, _, ranks)) if *node == rank.node => ranks.push(rank),
            _ => by_node.push((&rank.node, &rank.rack, vec![rank])),
        }
    }
    // A rack's heading goes above its first node, when the plan names racks.
    let rack_starts: Vec<Option<&str>> = by_node
        .iter()
        .enumerate()
        .map(|(i, (_, rack, _))| {
            let first = i == 0 || by_node[i - 1].1 != *rack;
            (first && !rack.is_empty()).then_some(*rack)
        })
        .collect();
    let mut row_of_rank = BTreeMap::new();
    if plan.ranks.len() <= MAX_RANK_ROWS {
        let mut rows = Vec::new();
        for ((node, _, ranks), rack) in by_node.iter().zip(&rack_starts) {
            for (i, r) in ranks.iter().enumerate() {
                row_of_rank.insert(r.rank, rows.len());
                rows.push(Row {
                    label: if i == 0 {
                        format!("{node} · rank {}", r.rank)
                    } else {
                        format!("rank {}", r.rank)
                    },
                    rank: r,
                    node_start: i == 0,
                    rack: if i == 0 { *rack } else { None },
                });
            }
        }
        return (rows, false, row_of_rank);
    }
    // A row per node, or per run of consecutive nodes when even the nodes
    // are too many (then racks are not headed: a run may cross them).
    let per_row = by_node.len().div_ceil(MAX_RANK_ROWS).max(1);
    let mut rows = Vec::new();
    for (k, run) in by_node.chunks(per_row).enumerate() {
        let Some(slowest) = run
            .iter()
            .flat_map(|(_, _, ranks)| ranks.iter())
            .max_by(|a, b| a.time_s.total_cmp(&b.time_s))
        else {
            continue;
        };
        let label = match run {
            [(node, _, _)] => format!("{node} (rank {})", slowest.rank),
            [(first, _, _), .., (last, _, _)] => {
                format!("{first}…{last} (rank {})", slowest.rank)
            }
            [] => continue,
        };
        for (_, _, ranks) in run {
            for r in ranks {
                row_of_rank.insert(r.rank, rows.len());
            }
        }
        rows.push(Row {
            label,
            rank: slowest,
            node_start: false,
            rack: if per_row == 1 { rack_starts[k] } else { None },
        });
    }
    (rows, true, row_of_rank)
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
                ("a hidden transfer time", span.hidden_s),
            ] {
                finite(&format!("{what} of rank {}", rank.rank), t)?;
            }
        }
    }
    let (rows, aggregated, row_of_rank) = rows(plan);
    let end = plan
        .ranks
        .iter()
        .flat_map(|r| r.timeline.iter().map(|s| s.end_s))
        .fold(plan.predicted.lower_bound_s, f64::max)
        .max(1e-9);
    let x = |t: f64| px(LEFT + t / end * PLOT_W);
    // Each row's top, with the gaps above nodes and the racks' headings.
    let mut row_top = Vec::with_capacity(rows.len());
    let mut y = TOP;
    for row in &rows {
        if row.node_start {
            y += NODE_GAP;
        }
        if row.rack.is_some() {
            y += RACK_H;
        }
        row_top.push(y);
        y += ROW_H + ROW_GAP;
    }
    let axis_y = y + 6.0;
    let routes = nic_routes(plan, &row_of_rank);
    let nics: Vec<&str> = {
        let mut nics: Vec<&str> = routes.keys().map(|(_, _, nic)| *nic).collect();
        nics.sort_unstable();
        nics.dedup();
        nics
    };
    let lane = if routes.is_empty() { 0.0 } else { LANE_W };
    let height = axis_y + BOTTOM + if routes.is_empty() { 0.0 } else { 18.0 };
    let width = LEFT + PLOT_W + 40.0 + lane;

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
    let runs_of_nodes = aggregated && rows.iter().any(|r| r.label.contains('…'));
    let mut legend = if runs_of_nodes {
        format!(
            "{} ranks are too many to draw one each: a row per run of nodes (racks not headed), its slowest rank; rings not outlined.",
            plan.ranks.len()
        )
    } else if aggregated {
        format!(
            "{} ranks are too many to draw one each: a row per node, by rack, its slowest rank; rings not outlined.",
            plan.ranks.len()
        )
    } else {
        "One row per rank, by node and rack.".to_string()
    };
    legend.push_str(
        " A bar is a group's attention; a packed group's bar is striped by sequence (a stripe's height: its share of the tokens).",
    );
    if let Some(note) = note {
        legend = format!("{legend} {note}");
    }
    document = document
        .add(
            Text::new(legend)
                .set("x", 10)
                .set("y", 36)
                .set("fill", "#444"),
        )
        .add(
            Text::new(
                "Outlined: a ring. Hatched: communication not hidden; blue underline: as long as the transfers compute hid; grey: remapped linear modules; dashed: lower bound.",
            )
            .set("x", 10)
            .set("y", 50)
            .set("fill", "#444"),
        );

    let mut bars = Group::new().set("id", "ranks");
    let mut drawn = DrawnBars::new();
    for (i, row) in rows.iter().enumerate() {
        let y = row_top[i];
        if let Some(rack) = row.rack {
            bars = bars.add(
                Text::new(format!("rack {rack}"))
                    .set("x", 10)
                    .set("y", y - 4.0)
                    .set("font-weight", "bold")
                    .set("fill", "#555"),
            );
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
            let group = span.group.and_then(|g| {
                plan.micro_batches
                    .get(span.micro_batch as usize)
                    .and_then(|mb| mb.groups.get(g as usize))
            });
            let hidden = span.hidden_s;
            let timing = {
                let mut timing = format!(
                    "{} to {}, of which {} communication not hidden",
                    seconds(span.start_s),
                    seconds(span.end_s),
                    seconds(span.exposed_s)
                );
                if hidden > 0.0 {
                    let _ = write!(
                        timing,
                        "; {} of transfers hidden behind compute",
                        seconds(hidden)
                    );
                }
                timing
            };
            let sequences = group.map(|g| g.sequences.as_slice()).unwrap_or(&[]);
            let (fill, title) = match (span.group, group) {
                (Some(g), Some(group)) => {
                    drawn
                        .entry((span.micro_batch, g))
                        .or_default()
                        .push((i, x0, x1));
                    let mut title = format!("micro-batch {}: ", span.micro_batch);
                    for (i, id) in sequences.iter().enumerate() {
                        let _ = write!(
                            title,
                            "{}sequence {id} ({} tokens)",
                            if i > 0 { ", " } else { "" },
                            lengths.get(id).copied().unwrap_or(0)
                        );
                    }
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
                        let _ = write!(title, " (hierarchical ring, {} a node)", group.inner_ring);
                    }
                    let _ = write!(title, "; {timing}");
                    (
                        sequences
                            .first()
                            .map_or("#999".to_string(), |id| sequence_colour(*id)),
                        title,
                    )
                }
                (Some(g), None) => (
                    "#999".to_string(),
                    format!(
                        "micro-batch {}: group {g}, which the plan does not list; {timing}",
                        span.micro_batch
                    ),
                ),
                (None, _) => (
                    "#bbb".to_string(),
                    format!(
                        "micro-batch {}: linear modules on the remapped layout and the remap; {timing}",
                        span.micro_batch
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
            if sequences.len() > 1 {
                for (top, h, colour) in stripes(sequences, &lengths) {
                    bar = bar.add(
                        Rectangle::new()
                            .set("x", x0)
                            .set("y", px(y + top))
                            .set("width", w)
                            .set("height", px(h))
                            .set("fill", colour),
                    );
                }
            }
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
            if hidden > 0.0 {
                // Its length, not its place: the transfers run between the
                // ring's steps all along the bar.
                bar = bar.add(
                    Rectangle::new()
                        .set("x", x0)
                        .set("y", px(y + ROW_H - 3.0))
                        .set("width", px((x(span.start_s + hidden) - x0).clamp(0.5, w)))
                        .set("height", 3)
                        .set("fill", HIDDEN_TRANSFER),
                );
            }
            bars = bars.add(bar);
        }
    }
    document = document
        .add(bars)
        .add(ring_outlines(plan, &drawn, &row_top));

    if !routes.is_empty() {
        document = document.add(route_lane(&routes, &nics, &row_top, axis_y));
    }

    // Time axis and the lower bound.
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

/// A packed group's stripes, in its order: (top, height, colour), each
/// sequence's height its share of the group's tokens; past
/// [`MAX_STRIPES`] sequences the longest keep their own stripes and the
/// rest share a light grey one.
fn stripes(sequences: &[u64], lengths: &BTreeMap<u64, u64>) -> Vec<(f64, f64, String)> {
    let length = |id: &u64| lengths.get(id).copied().unwrap_or(0).max(1) as f64;
    let total: f64 = sequences.iter().map(length).sum();
    let own: Vec<bool> = if sequences.len() <= MAX_STRIPES {
        vec![true; sequences.len()]
    } else {
        let mut by_length: Vec<usize> = (0..sequences.len()).collect();
        by_length.sort_by(|a, b| length(&sequences[*b]).total_cmp(&length(&sequences[*a])));
        let mut own = vec![false; sequences.len()];
        for &k in by_length.iter().take(MAX_STRIPES - 1) {
            own[k] = true;
        }
        own
    };
    let mut stripes = Vec::new();
    let mut top = 0.0;
    for (id, _) in sequences.iter().zip(&own).filter(|(_, own)| **own) {
        let h = ROW_H * length(id) / total;
        stripes.push((top, h, sequence_colour(*id)));
        top += h;
    }
    let rest: f64 = sequences
        .iter()
        .zip(&own)
        .filter(|(_, own)| !**own)
        .map(|(id, _)| length(id))
        .sum();
    if rest > 0.0 {
        stripes.push((top, ROW_H * rest / total, "#ddd".to_string()));
    }
    stripes
}

/// Where each group's bars were drawn, by (micro-batch, group): each bar's
/// row, left and right.
type DrawnBars = BTreeMap<(u32, u32), Vec<(usize, f64, f64)>>;

/// The outline of every ring (a group of two or more ranks) around its
/// bars, one box per run of adjacent rows, the boxes of a ring whose rows
/// are apart joined by a dotted line.
fn ring_outlines(plan: &StepPlan, drawn: &DrawnBars, row_top: &[f64]) -> Group {
    let mut outlines = Group::new().set("id", "rings");
    for (&(mb, g), bars) in drawn {
        let Some(group) = plan
            .micro_batches
            .get(mb as usize)
            .and_then(|m| m.groups.get(g as usize))
        else {
            continue;
        };
        if group.ranks.len() < 2 {
            continue;
        }
        let mut bars = bars.clone();
        bars.sort_by_key(|(row, _, _)| *row);
        let left = bars.iter().map(|b| b.1).fold(f64::INFINITY, f64::min);
        let right = bars.iter().map(|b| b.2).fold(0.0, f64::max);
        let mut runs: Vec<(usize, usize)> = Vec::new();
        for &(row, _, _) in &bars {
            match runs.last_mut() {
                Some((_, last)) if *last + 1 == row => *last = row,
                _ => runs.push((row, row)),
            }
        }
        let mut ring = Group::new().add(Title::new(format!(
            "micro-batch {mb}: a ring of {} ranks{}",
            group.ranks.len(),
            if group.inner_ring > 0 {
                format!(", hierarchical ({} a node)", group.inner_ring)
            } else {
                String::new()
            }
        )));
        let mut above: Option<f64> = None;
        for (first, last) in runs {
            let (top, bottom) = (row_top[first] - 1.0, row_top[last] + ROW_H + 1.0);
            if let Some(above) = above {
                ring = ring.add(
                    Line::new()
                        .set("x1", px(left + 2.0))
                        .set("x2", px(left + 2.0))
                        .set("y1", px(above))
                        .set("y2", px(top))
                        .set("stroke", "#111")
                        .set("stroke-dasharray", "1 2"),
                );
            }
            ring = ring.add(
                Rectangle::new()
                    .set("x", px(left - 1.0))
                    .set("y", px(top))
                    .set("width", px(right - left + 2.0))
                    .set("height", px(bottom - top))
                    .set("fill", "none")
                    .set("stroke", "#111")
                    .set("stroke-width", 1.2),
            );
            above = Some(bottom);
        }
        outlines = outlines.add(ring);
    }
    outlines
}

/// A network route drawn between two rows: its bytes and what it carries.
#[derive(Default)]
struct DrawnRoute {
    bytes: f64,
    /// Transfers in all, and the first few named.
    count: usize,
    transfers: Vec<String>,
}

/// The transfers a route's `<title>` names.
const ROUTE_TRANSFERS_NAMED: usize = 6;

/// The plan's NIC routes between rows, by (sending row, receiving row,
/// NIC): a leg relayed by another rank leaves from that rank's row.
fn nic_routes<'a>(
    plan: &'a StepPlan,
    row_of_rank: &BTreeMap<u32, usize>,
) -> BTreeMap<(usize, usize, &'a str), DrawnRoute> {
    let mut routes: BTreeMap<(usize, usize, &str), DrawnRoute> = BTreeMap::new();
    for route in &plan.routes {
        for leg in &route.legs {
            let from = leg.relay_rank.unwrap_or(route.from_rank);
            let (Some(&a), Some(&b)) = (row_of_rank.get(&from), row_of_rank.get(&route.to_rank))
            else {
                continue;
            };
            if a == b {
                continue;
            }
            let drawn = routes.entry((a, b, leg.nic.as_str())).or_default();
            let bytes = route.bytes * leg.share;
            drawn.bytes += bytes;
            drawn.count += 1;
            if drawn.transfers.len() >= ROUTE_TRANSFERS_NAMED {
                continue;
            }
            drawn.transfers.push(format!(
                "micro-batch {}: rank {} ({}) → rank {} ({}){}, {:.1} MB",
                route.micro_batch,
                route.from_rank,
                route.from_node,
                route.to_rank,
                route.to_node,
                leg.relay_rank
                    .map(|r| format!(" relayed by rank {r}"))
                    .unwrap_or_default(),
                bytes / 1e6
            ));
        }
    }
    routes
}

/// The NIC routes as curves in a lane right of the time axis, from the
/// sending row to the receiving one, in their NIC's colour, with the
/// NICs' legend under the axis.
fn route_lane(
    routes: &BTreeMap<(usize, usize, &str), DrawnRoute>,
    nics: &[&str],
    row_top: &[f64],
    axis_y: f64,
) -> Group {
    let lane_x = LEFT + PLOT_W + 24.0;
    let colour = |nic: &str| {
        let k = nics.iter().position(|n| *n == nic).unwrap_or(0);
        NIC_COLOURS[k % NIC_COLOURS.len()]
    };
    let heading = if routes.len() > MAX_ROUTES {
        format!("NIC routes ({MAX_ROUTES} of {})", routes.len())
    } else {
        "NIC routes".to_string()
    };
    let mut lane = Group::new().set("id", "nic-routes").add(
        Text::new(heading)
            .set("x", LEFT + PLOT_W + 40.0 + LANE_W - 6.0)
            .set("y", TOP - 4.0)
            .set("text-anchor", "end")
            .set("font-weight", "bold"),
    );
    for ((a, b, nic), route) in routes.iter().take(MAX_ROUTES) {
        let k = nics.iter().position(|n| n == nic).unwrap_or(0) as f64;
        let x0 = lane_x + (k % 8.0) * 3.0;
        let (y0, y1) = (row_top[*a] + ROW_H / 2.0, row_top[*b] + ROW_H / 2.0);
        let bulge = x0 + (12.0 + 0.25 * (y1 - y0).abs()).min(LANE_W - 40.0);
        let mut title = format!(
            "over {nic}: {:.1} MB in {} transfer(s)\n{}",
            route.bytes / 1e6,
            route.count,
            route.transfers.join("\n")
        );
        if route.count > route.transfers.len() {
            let _ = write!(title, "\nand {} more", route.count - route.transfers.len());
        }
        lane = lane.add(
            Group::new()
                .add(Title::new(title))
                .add(
                    Path::new()
                        .set(
                            "d",
                            format!(
                                "M {:.2} {:.2} C {:.2} {:.2} {:.2} {:.2} {:.2} {:.2}",
                                x0, y0, bulge, y0, bulge, y1, x0, y1
                            ),
                        )
                        .set("fill", "none")
                        .set("stroke", colour(nic))
                        .set("stroke-opacity", 0.7),
                )
                .add(
                    Circle::new()
                        .set("cx", px(x0))
                        .set("cy", px(y1))
                        .set("r", 2)
                        .set("fill", colour(nic)),
                ),
        );
    }
    lane = lane.add(
        Text::new("NIC routes (right), sender to receiver's dot:")
            .set("x", 10)
            .set("y", axis_y + 34.0)
            .set("fill", "#444"),
    );
    let room = ((LANE_W + PLOT_W + LEFT + 40.0 - 300.0) / 90.0) as usize - 1;
    if nics.len() > room {
        lane = lane.add(
            Text::new(format!("and {} more NICs", nics.len() - room))
                .set("x", 300.0 + room as f64 * 90.0)
                .set("y", axis_y + 34.0),
        );
    }
    for (k, nic) in nics.iter().enumerate().take(room) {
        let lx = 300.0 + k as f64 * 90.0;
        lane = lane
            .add(
                Rectangle::new()
                    .set("x", lx)
                    .set("y", axis_y + 25.0)
                    .set("width", 10)
                    .set("height", 10)
                    .set("fill", colour(nic)),
            )
            .add(
                Text::new(nic.to_string())
                    .set("x", lx + 14.0)
                    .set("y", axis_y + 34.0),
            );
    }
    lane
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

    fn plan_on(cluster: &str, lengths: &[u64]) -> StepPlan {
        use crate::cost::{CostCoefficients, CostModel};
        let ctx = crate::layout::PlanContext {
            limits: Default::default(),
            topology: crate::topology::Topology::new(
                &crate::cluster::parse_cluster(cluster).unwrap(),
            )
            .unwrap(),
            cost: CostModel::new(
                crate::model::ModelSpec::preset("llama-7b").unwrap(),
                CostCoefficients::default(),
            ),
        };
        crate::plan_step(Strategy::Weft, &ctx, lengths, None).unwrap()
    }

    /// Rings are outlined, one box per run of adjacent rows; racks are
    /// headed; a packed group is striped by sequence; the transfers compute
    /// hid are underlined; every NIC route between rows is a curve in its
    /// NIC's colour, named in the legend.
    #[test]
    fn rings_racks_packed_sequences_hidden_transfers_and_routes_are_drawn() {
        // Two racks of one node; one document long enough to need a ring
        // across the nodes, and short ones packed.
        let plan = plan_on(
            "2x4:nics=2,rack=1",
            &[49_152, 1200, 800, 3000, 150, 150, 9000],
        );
        let svg = plan_svg(&plan).unwrap();
        let rings: usize = plan
            .micro_batches
            .iter()
            .flat_map(|mb| &mb.groups)
            .filter(|g| g.ranks.len() > 1)
            .count();
        assert!(rings > 0);
        assert_eq!(
            svg.matches("a ring of").count(),
            rings,
            "one outline a ring"
        );
        for rack in ["rack gpu-a-rack-0", "rack gpu-a-rack-1"] {
            assert!(svg.contains(rack), "{rack} is not headed");
        }
        // Packed groups: a stripe per sequence, as high as its tokens' share.
        let packed = plan
            .micro_batches
            .iter()
            .flat_map(|mb| &mb.groups)
            .find(|g| g.sequences.len() > 1)
            .expect("short documents are packed");
        for id in &packed.sequences {
            let stripe = format!("fill=\"{}\"", sequence_colour(*id));
            assert!(svg.contains(&stripe), "sequence {id} has no stripe");
        }
        // A ring across the nodes moves bytes: its transfers are on the
        // plan, part of them hidden, and drawn.
        let spans: Vec<_> = plan.ranks.iter().flat_map(|r| &r.timeline).collect();
        assert!(spans.iter().any(|s| s.hidden_s > 0.0));
        assert!(svg.contains(&format!("fill=\"{HIDDEN_TRANSFER}\"")));
        assert!(svg.contains("hidden behind compute"));
        assert!(!plan.routes.is_empty());
        assert!(svg.contains("id=\"nic-routes\""));
        for nic in ["mlx5_0", "mlx5_1"] {
            assert!(
                svg.contains(&format!(">\n{nic}\n<")),
                "{nic} is not in the legend"
            );
        }

        // A plan written before weft recorded racks and transfers still
        // draws, without them.
        let mut old = plan.clone();
        for rank in &mut old.ranks {
            rank.rack.clear();
            for span in &mut rank.timeline {
                span.hidden_s = 0.0;
            }
        }
        old.routes.clear();
        let svg = plan_svg(&old).unwrap();
        assert!(!svg.contains("rack gpu-a"));
        assert!(!svg.contains(HIDDEN_TRANSFER));
        assert!(!svg.contains("nic-routes"));
        assert_eq!(svg.matches("a ring of").count(), rings);
    }

    #[test]
    fn a_packed_group_of_many_sequences_keeps_the_longest_stripes() {
        let lengths: BTreeMap<u64, u64> = (0..10).map(|id| (id, 100 + id * 10)).collect();
        let ids: Vec<u64> = (0..10).collect();
        let stripes = stripes(&ids, &lengths);
        assert_eq!(stripes.len(), MAX_STRIPES);
        let total: f64 = stripes.iter().map(|s| s.1).sum();
        assert!((total - ROW_H).abs() < 1e-9, "{total}");
        // The five longest (ids 5..10) keep their colours, in order; the
        // rest share the grey stripe.
        let colours: Vec<&str> = stripes.iter().map(|s| s.2.as_str()).collect();
        let mut expected: Vec<String> = (5..10).map(sequence_colour).collect();
        expected.push("#ddd".to_string());
        assert_eq!(colours, expected);
    }

    #[test]
    fn the_same_sequence_has_the_same_colour_and_neighbours_differ() {
        assert_eq!(sequence_colour(7), sequence_colour(7));
        assert_ne!(sequence_colour(7), sequence_colour(8));
    }
}
