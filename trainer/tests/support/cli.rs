//! What the tests of `weft-trainer`'s command line share: the binary, a
//! scratch directory, and a `local` run with its metrics. Included by path
//! (`#[path = "support/cli.rs"] mod cli;`) by the tests that run `local`.

// Not every suite that includes this uses every helper.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use weft_trainer::train::StepMetrics;

pub fn trainer() -> Command {
    Command::new(env!("CARGO_BIN_EXE_weft-trainer"))
}

/// A fresh directory for one test: `weft-<suite>-<pid>-<name>` in the temp dir.
pub fn scratch(suite: &str, name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("weft-{suite}-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create a scratch directory");
    dir
}

/// Runs `local` with `args` and `env`, returns its output and the metrics it
/// wrote (to `dir/<name>.jsonl`).
pub fn local_env(
    dir: &Path,
    name: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> (Output, Vec<StepMetrics>) {
    let metrics = dir.join(format!("{name}.jsonl"));
    let output = trainer()
        .arg("local")
        .args(args)
        .arg("--metrics")
        .arg(&metrics)
        .envs(env.iter().copied())
        .output()
        .expect("run weft-trainer local");
    let steps = std::fs::read_to_string(&metrics)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("a metrics line"))
        .collect();
    (output, steps)
}

/// [`local_env`] with the environment as it is.
pub fn local(dir: &Path, name: &str, args: &[&str]) -> (Output, Vec<StepMetrics>) {
    local_env(dir, name, args, &[])
}

pub fn ok(output: &Output) {
    assert!(
        output.status.success(),
        "failed: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
