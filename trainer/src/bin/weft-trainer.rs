//! `weft-trainer`: the worker binary.
//!
//! `weft-trainer selfcheck --ranks N` starts N local workers of this binary,
//! runs random cases through the distributed attention over the real
//! collectives, compares every rank's part with plain attention computed whole,
//! prints the worst error per component, and exits non-zero past the
//! tolerance or when a worker fails.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use weft_trainer::launch::run_local;
use weft_trainer::selfcheck::{SelfcheckReport, run_worker};

#[derive(Parser)]
#[command(name = "weft-trainer", version, about = "weft's trainer")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check the distributed attention on N local ranks against a single-process reference.
    Selfcheck {
        /// Local worker processes (at least 2).
        #[arg(long)]
        ranks: u32,
        /// Random cases per run.
        #[arg(long, default_value_t = 8)]
        cases: u32,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Largest error accepted (fp32 on CPU).
        #[arg(long, default_value_t = 1e-4)]
        tolerance: f64,
        /// Seconds before the workers are stopped.
        #[arg(long, default_value_t = 300)]
        timeout_s: u64,
        /// Make this rank exit at once (to see that a lost peer is reported, not waited for).
        #[arg(long, hide = true)]
        kill_rank: Option<u32>,
    },
    /// One selfcheck worker (started by `selfcheck`).
    #[command(hide = true)]
    SelfcheckWorker {
        #[arg(long)]
        rank: u32,
        #[arg(long)]
        world: u32,
        #[arg(long)]
        port: u16,
        #[arg(long)]
        seed: u64,
        #[arg(long)]
        cases: u32,
        #[arg(long)]
        die: bool,
    },
}

fn selfcheck(
    ranks: u32,
    cases: u32,
    seed: u64,
    tolerance: f64,
    timeout: Duration,
    kill: Option<u32>,
) -> anyhow::Result<bool> {
    if ranks < 2 {
        bail!(
            "--ranks must be at least 2: distributed attention needs a ring of two or more ranks"
        );
    }
    if kill.is_some_and(|k| k >= ranks) {
        bail!("--kill-rank must be below --ranks");
    }
    let outputs = run_local(ranks, timeout, |rank, port| {
        let mut args = vec![
            "selfcheck-worker".to_string(),
            format!("--rank={rank}"),
            format!("--world={ranks}"),
            format!("--port={port}"),
            format!("--seed={seed}"),
            format!("--cases={cases}"),
        ];
        if kill == Some(rank) {
            args.push("--die".to_string());
        }
        args
    })?;
    let mut worst = SelfcheckReport::default();
    for (rank, lines) in outputs.iter().enumerate() {
        let line = lines
            .last()
            .with_context(|| format!("worker {rank} printed no report"))?;
        let report: SelfcheckReport = serde_json::from_str(line)
            .with_context(|| format!("worker {rank} printed {line:?}"))?;
        worst = worst.worst(&report);
    }
    println!(
        "selfcheck on {ranks} ranks (Gloo on CPU): {} cases, {} document checks",
        worst.cases, worst.documents
    );
    println!(
        "{:<16} {:>12} {:>12}  result",
        "component", "max error", "tolerance"
    );
    for (name, error) in [
        ("attention out", worst.attention_out),
        ("attention dQ", worst.attention_dq),
        ("attention dK", worst.attention_dk),
        ("attention dV", worst.attention_dv),
    ] {
        let verdict = if error <= tolerance { "ok" } else { "FAIL" };
        println!("{name:<16} {error:>12.2e} {tolerance:>12.1e}  {verdict}");
    }
    Ok(worst.max_error() <= tolerance)
}

fn run(cli: Cli) -> anyhow::Result<bool> {
    match cli.command {
        Command::Selfcheck {
            ranks,
            cases,
            seed,
            tolerance,
            timeout_s,
            kill_rank,
        } => selfcheck(
            ranks,
            cases,
            seed,
            tolerance,
            Duration::from_secs(timeout_s),
            kill_rank,
        ),
        Command::SelfcheckWorker {
            rank,
            world,
            port,
            seed,
            cases,
            die,
        } => {
            if die {
                bail!("rank {rank} was told to exit (--kill-rank)");
            }
            let report = run_worker(rank, world, port, seed, cases)?;
            println!("{}", serde_json::to_string(&report)?);
            Ok(true)
        }
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("weft-trainer: selfcheck: an error is above the tolerance");
            ExitCode::FAILURE
        }
        Err(err) => {
            eprintln!("weft-trainer: error: {err:#}");
            ExitCode::from(2)
        }
    }
}
