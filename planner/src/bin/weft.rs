//! `weft`: plan a step, or simulate many, from the command line.
//!
//! ```text
//! weft plan --lengths FILE --cluster CLUSTER --model MODEL [--strategy NAME] [--max-seq-len N] [--format json|table]
//! weft simulate --lengths FILE --cluster CLUSTER --model MODEL --tokens-per-step N --steps K --seed S
//!               [--max-seq-len N] [--format json|table]
//! weft lengths --synthetic NAME --count N [--seed S] [--cap TOKENS]
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use weft_planner::cost::{CostCoefficients, CostModel, StreamBp};
use weft_planner::input::{load_cluster, load_model, read_lengths};
use weft_planner::plan::StepPlan;
use weft_planner::report::{sample_batches, simulate_batches};
use weft_planner::topology::Topology;
use weft_planner::{PlanContext, Strategy, plan_step};

#[derive(Parser)]
#[command(
    name = "weft",
    version,
    about = "Plan how variable-length sequences are spread over a GPU cluster"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Json,
    Table,
}

#[derive(clap::Args)]
struct Common {
    /// Sequence lengths, one positive integer per line (`#` comments allowed).
    #[arg(long)]
    lengths: PathBuf,
    /// Cluster: a shorthand such as 64x8 or 64x8:nics=4, or a YAML/JSON file.
    #[arg(long)]
    cluster: String,
    /// Model: a preset (llama-7b, llama-13b, llama-70b, tiny) or a YAML/JSON file.
    #[arg(long)]
    model: String,
    /// Context length: longer sequences are cut to it.
    #[arg(long)]
    max_seq_len: Option<u64>,
    /// Where steps backpropagate with StreamBP (less activation memory, one
    /// more forward): per-ring (weft streams the rings where that is faster
    /// or where only streaming fits; the other strategies stream every
    /// ring), always, or off. Default: per-ring with --stream-bp-chunk, else off.
    #[arg(long, value_enum, value_name = "WHERE")]
    stream_bp: Option<StreamBpArg>,
    /// StreamBP's smallest chunk, tokens (default 4096): each streamed rank
    /// takes this times the largest power of two that costs it no more memory.
    #[arg(long, value_name = "TOKENS", value_parser = clap::value_parser!(u64).range(1..))]
    stream_bp_chunk: Option<u64>,
    /// Price compute and transfers at the speeds a profile measured
    /// (`weft-trainer profile`'s JSON) instead of the datasheets'.
    #[arg(long)]
    profile: Option<String>,
    #[arg(long, value_enum, default_value = "table")]
    format: Format,
}

/// `--stream-bp`'s values.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum StreamBpArg {
    PerRing,
    Always,
    Off,
}

impl From<StreamBpArg> for StreamBp {
    fn from(arg: StreamBpArg) -> StreamBp {
        match arg {
            StreamBpArg::PerRing => StreamBp::PerRing,
            StreamBpArg::Always => StreamBp::Always,
            StreamBpArg::Off => StreamBp::Off,
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Print the step plan of one batch (every line of the lengths file).
    Plan {
        #[command(flatten)]
        common: Common,
        /// Planning strategy.
        #[arg(long, value_enum, default_value_t = Strategy::Weft)]
        strategy: Strategy,
        /// With weft: also print every candidate it weighed and its predicted time.
        #[arg(long)]
        explain: bool,
        /// Also draw the plan as a picture (SVG) into this file.
        #[arg(long, value_name = "FILE")]
        svg: Option<std::path::PathBuf>,
        /// Static: every ring's one degree (a TrainingJob's parallelism.cpDegree).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        cp_degree: Option<u32>,
        /// weft and static: the largest ring any sequence may get
        /// (parallelism.maxCpDegree).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        max_cp_degree: Option<u32>,
        /// Each rank's transfers between nodes take its own NIC
        /// (parallelism.nicAwareRouting: false).
        #[arg(long)]
        no_nic_routing: bool,
    },
    /// Draw a step plan (JSON, as `weft plan --format json` prints it) as a
    /// picture: one row per rank by node, time across.
    Draw {
        /// The step plan.
        plan: std::path::PathBuf,
        /// Where the SVG goes.
        #[arg(long, value_name = "FILE")]
        svg: std::path::PathBuf,
    },
    /// Print sequence lengths sampled from a synthetic distribution, one per
    /// line, with a summary comment: byted and github (calibrated to published
    /// figures), or the family that spans the space between (at-cap-0,
    /// at-cap-25, at-cap-50, at-cap-75, at-cap-95, powerlaw-1.5,
    /// powerlaw-2.0, powerlaw-2.5, bimodal, uniform).
    Lengths {
        /// The distribution's name.
        #[arg(long)]
        synthetic: String,
        #[arg(long)]
        count: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// The family's context cap, tokens (default 262144); refused for
        /// byted and github.
        #[arg(long)]
        cap: Option<u64>,
    },
    /// Sample batches and compare every strategy on them.
    Simulate {
        #[command(flatten)]
        common: Common,
        /// Tokens per global batch.
        #[arg(long)]
        tokens_per_step: u64,
        /// Batches to sample.
        #[arg(long)]
        steps: usize,
        /// Seed of the sampling.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Also draw every strategy's step times against the bound (SVG)
        /// into this file.
        #[arg(long, value_name = "FILE")]
        svg: Option<std::path::PathBuf>,
    },
}

fn context(common: &Common) -> anyhow::Result<(PlanContext, Vec<u64>)> {
    let cluster = load_cluster(&common.cluster)?;
    let model = load_model(&common.model)?;
    let mut lengths = read_lengths(&common.lengths)?;
    if let Some(cap) = common.max_seq_len {
        if cap == 0 {
            bail!("--max-seq-len must be at least 1");
        }
        lengths.iter_mut().for_each(|s| *s = (*s).min(cap));
    }
    let topology = Topology::new(&cluster)?;
    let streambp = match (common.stream_bp, common.stream_bp_chunk) {
        (Some(StreamBpArg::Off), Some(_)) => {
            bail!("--stream-bp-chunk asks for StreamBP, which --stream-bp off turns off")
        }
        (Some(arg), _) => arg.into(),
        (None, Some(_)) => StreamBp::PerRing,
        (None, None) => StreamBp::Off,
    };
    let mut coefficients = CostCoefficients {
        streambp,
        ..Default::default()
    };
    if let Some(chunk) = common.stream_bp_chunk {
        coefficients.streambp_chunk = chunk;
    }
    if let Some(path) = &common.profile {
        weft_planner::input::load_profile(path)?.calibrate_for(&topology, &mut coefficients);
    }
    let cost = CostModel::new(model, coefficients);
    Ok((
        PlanContext {
            topology,
            cost,
            limits: Default::default(),
        },
        lengths,
    ))
}

/// `0,1,2,3,8` as `0-3,8`.
fn rank_ranges(ranks: &[u32]) -> String {
    let mut sorted = ranks.to_vec();
    sorted.sort_unstable();
    let mut parts = Vec::new();
    let mut i = 0;
    while i < sorted.len() {
        let start = sorted[i];
        let mut end = start;
        while i + 1 < sorted.len() && sorted[i + 1] == end + 1 {
            i += 1;
            end = sorted[i];
        }
        parts.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
        i += 1;
    }
    parts.join(",")
}

fn plan_table(plan: &StepPlan) -> String {
    let p = &plan.predicted;
    let mut out = format!(
        "strategy {} on {} GPUs: {} sequences in {} micro-batches\npredicted step {:.4} s, lower bound {:.4} s ({:.3}x), max/mean {:.3}, communication {:.1}%, peak memory {:.1} GiB{}\n\n",
        plan.strategy,
        plan.world_size,
        plan.sequences.len(),
        plan.micro_batches.len(),
        p.step_time_s,
        p.lower_bound_s,
        if p.lower_bound_s > 0.0 {
            p.step_time_s / p.lower_bound_s
        } else {
            1.0
        },
        p.max_over_mean,
        p.comm_fraction * 100.0,
        p.peak_memory_gib,
        if p.fits_in_memory {
            ""
        } else {
            " (EXCEEDS MEMORY)"
        }
    );
    out += &format!(
        "{:>8} {:>10} {:>6} {:>5}  ranks\n",
        "sequence", "length", "degree", "mb"
    );
    for s in &plan.sequences {
        let ranks: Vec<u32> = s.shards.iter().map(|sh| sh.rank).collect();
        out += &format!(
            "{:>8} {:>10} {:>6} {:>5}  {}\n",
            s.id,
            s.length,
            s.degree,
            s.micro_batch,
            rank_ranges(&ranks)
        );
    }
    out += &format!(
        "\n{:>6} {:<16} {:>10} {:>10} {:>10} {:>8} {:>10} {:>10}\n",
        "rank", "node", "time_s", "compute_s", "comm_s", "mem_GiB", "attn_tok", "linear_tok"
    );
    for r in &plan.ranks {
        out += &format!(
            "{:>6} {:<16} {:>10.4} {:>10.4} {:>10.4} {:>8.1} {:>10} {:>10}\n",
            r.rank,
            r.node,
            r.time_s,
            r.compute_s,
            r.exposed_comm_s,
            r.memory_gib,
            r.attention_tokens,
            r.linear_tokens
        );
    }
    if !plan.routes.is_empty() {
        out += &format!(
            "\n{} inter-node transfers; first ones:\n",
            plan.routes.len()
        );
        for route in plan.routes.iter().take(8) {
            let legs: Vec<String> = route
                .legs
                .iter()
                .map(|l| match l.relay_rank {
                    Some(relay) => format!("{}(via rank {relay})", l.nic),
                    None => l.nic.clone(),
                })
                .collect();
            out += &format!(
                "  mb {} rank {} ({}) -> rank {} ({}): {:.1} MB at {:.1} GB/s over {}\n",
                route.micro_batch,
                route.from_rank,
                route.from_node,
                route.to_rank,
                route.to_node,
                route.bytes / 1e6,
                route.gbytes_per_s,
                legs.join(" ")
            );
        }
    }
    out
}

/// Writes `text` to `path` whole or not at all: into a file beside it first,
/// then renamed over it.
fn write_whole(path: &std::path::Path, text: &str) -> anyhow::Result<()> {
    let name = path
        .file_name()
        .with_context(|| format!("{} names no file", path.display()))?;
    let partial = path.with_file_name(format!(
        ".{}.partial-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let written = std::fs::write(&partial, text).and_then(|()| std::fs::rename(&partial, path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&partial);
        anyhow::bail!("cannot write {}: {e}", path.display());
    }
    Ok(())
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Plan {
            common,
            strategy,
            explain,
            svg,
            cp_degree,
            max_cp_degree,
            no_nic_routing,
        } => {
            let (mut ctx, lengths) = context(&common)?;
            ctx.limits = weft_planner::PlanLimits {
                cp_degree,
                max_cp_degree,
                nic_aware_routing: !no_nic_routing,
                ..Default::default()
            };
            if explain {
                let candidates =
                    weft_planner::strategies::weft::candidates(&ctx, &lengths, common.max_seq_len)?;
                // The name column as wide as the longest name.
                let width = candidates
                    .iter()
                    .map(|c| c.name.to_string().len())
                    .chain(std::iter::once(22))
                    .max()
                    .unwrap_or(22);
                eprintln!(
                    "{:<width$} {:>12} {:>9} {:>9} {:>8} {:>5} {:>9} {:>8}",
                    "candidate",
                    "step_time_s",
                    "vs_lb",
                    "max/mean",
                    "comm",
                    "fits",
                    "build_ms",
                    "sim_ms"
                );
                let lb = weft_planner::lower_bound(&ctx, &lengths);
                for candidate in candidates {
                    let (name, layout) = (&candidate.name, &candidate.layout);
                    let start = std::time::Instant::now();
                    let o = weft_planner::simulate(&ctx, &lengths, layout);
                    let sim_ms = start.elapsed().as_secs_f64() * 1e3;
                    eprintln!(
                        "{:<width$} {:>12.4} {:>9.3} {:>9.3} {:>7.1}% {:>5} {:>9.1} {:>8.1}",
                        name,
                        o.step_time_s,
                        if lb > 0.0 { o.step_time_s / lb } else { 1.0 },
                        o.max_over_mean(),
                        o.comm_fraction() * 100.0,
                        if o.fits_in_memory { "yes" } else { "NO" },
                        candidate.build_ms,
                        sim_ms
                    );
                }
                // What the bound is made of: the step's work spread evenly,
                // or its longest sequence at its best degree.
                let work = weft_planner::bound::work_bound(&ctx, &lengths);
                match lengths.iter().max() {
                    Some(&longest) => {
                        let (seq_s, degree) =
                            weft_planner::bound::sequence_bound(&ctx, &lengths, longest);
                        let exposed = weft_planner::bound::exposed_work_bound(
                            &ctx,
                            &lengths,
                            work.max(seq_s),
                        );
                        eprintln!(
                            "lower bound {lb:.4} s: work spread evenly {work:.4} s; longest sequence ({longest} tokens) {seq_s:.4} s at degree {degree}; work with the transfers and step latency no ring can hide {exposed:.4} s"
                        );
                    }
                    None => eprintln!("lower bound {lb:.4} s: work spread evenly {work:.4} s"),
                }
                eprintln!();
            }
            let plan = plan_step(strategy, &ctx, &lengths, common.max_seq_len)?;
            plan.check()
                .context("the plan broke an invariant (a bug in weft)")?;
            if let Some(path) = &svg {
                write_whole(path, &weft_planner::picture::plan_svg(&plan)?)?;
                eprintln!("drew the plan into {}", path.display());
            }
            match common.format {
                Format::Json => println!("{}", serde_json::to_string_pretty(&plan)?),
                Format::Table => print!("{}", plan_table(&plan)),
            }
        }
        Command::Draw { plan, svg } => {
            let text = std::fs::read_to_string(&plan)
                .with_context(|| format!("cannot read the plan {}", plan.display()))?;
            let step: StepPlan = serde_json::from_str(&text).with_context(|| {
                format!(
                    "{} is not a step plan (the JSON `weft plan --format json` prints)",
                    plan.display()
                )
            })?;
            step.check()
                .with_context(|| format!("{} is not a consistent step plan", plan.display()))?;
            write_whole(&svg, &weft_planner::picture::plan_svg(&step)?)?;
            eprintln!("drew {} into {}", plan.display(), svg.display());
        }
        Command::Lengths {
            synthetic,
            count,
            seed,
            cap,
        } => {
            let lengths = weft_planner::synthetic::sample_with_cap(&synthetic, count, seed, cap)?;
            let cap = cap.map_or(String::new(), |c| format!(", cap {c}"));
            let mut out = format!(
                "# {synthetic} (seed {seed}{cap}): {}\n",
                weft_planner::synthetic::describe(&lengths)
            );
            for s in lengths {
                out += &format!("{s}\n");
            }
            print!("{out}");
        }
        Command::Simulate {
            common,
            tokens_per_step,
            steps,
            seed,
            svg,
        } => {
            if tokens_per_step == 0 {
                bail!("--tokens-per-step must be at least 1");
            }
            if steps == 0 {
                bail!("--steps must be at least 1");
            }
            let (ctx, lengths) = context(&common)?;
            let batches =
                sample_batches(&lengths, tokens_per_step, steps, seed, common.max_seq_len);
            let report = simulate_batches(&ctx, &batches, &Strategy::ALL, common.max_seq_len)?;
            if let Some(path) = &svg {
                write_whole(path, &weft_planner::picture::simulation_svg(&report)?)?;
                eprintln!("drew the simulation into {}", path.display());
            }
            match common.format {
                Format::Json => println!("{}", serde_json::to_string_pretty(&report)?),
                Format::Table => print!("{}", report.table()),
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("weft: error: {err:#}");
            ExitCode::from(2)
        }
    }
}
