//! `weft-trainer selfcheck` as a user runs it: real worker processes of the
//! binary, a verdict per component, and a clear, prompt error when a worker dies.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::{Duration, Instant};

fn selfcheck(args: &[&str]) -> (bool, String, String, Duration) {
    let start = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_weft-trainer"))
        .arg("selfcheck")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        start.elapsed(),
    )
}

#[test]
fn selfcheck_passes_on_local_ranks_and_reports_every_component() {
    let (ok, stdout, stderr, _) = selfcheck(&["--ranks", "3", "--cases", "4", "--seed", "9"]);
    assert!(ok, "{stdout}\n{stderr}");
    assert!(stdout.contains("selfcheck on 3 ranks"), "{stdout}");
    for component in [
        "attention out",
        "attention dQ",
        "attention dK",
        "attention dV",
        "plans agree",
    ] {
        let line = stdout.lines().find(|l| l.starts_with(component)).unwrap();
        assert!(line.ends_with("ok"), "{line}");
    }
}

#[test]
fn a_tolerance_that_cannot_be_met_fails_the_check() {
    let (ok, stdout, stderr, _) =
        selfcheck(&["--ranks", "2", "--cases", "2", "--tolerance", "1e-30"]);
    assert!(!ok, "{stdout}");
    assert!(stdout.contains("FAIL"), "{stdout}");
    assert!(stderr.contains("above the tolerance"), "{stderr}");
}

#[test]
fn a_dead_worker_is_reported_at_once_not_waited_for() {
    let (ok, _, stderr, elapsed) = selfcheck(&["--ranks", "3", "--kill-rank", "2"]);
    assert!(!ok);
    assert!(stderr.contains("worker 2 failed"), "{stderr}");
    assert!(elapsed < Duration::from_secs(30), "took {elapsed:?}");
}

#[test]
fn one_rank_is_refused_with_the_reason() {
    let (ok, _, stderr, _) = selfcheck(&["--ranks", "1"]);
    assert!(!ok);
    assert!(stderr.contains("--ranks must be at least 2"), "{stderr}");
}

/// The error a component's line reports.
fn error_of(stdout: &str, component: &str) -> f64 {
    let line = stdout.lines().find(|l| l.starts_with(component)).unwrap();
    line[component.len()..]
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn bf16_is_checked_at_its_own_tolerance() {
    let (ok, stdout, stderr, _) = selfcheck(&[
        "--ranks",
        "3",
        "--cases",
        "3",
        "--seed",
        "4",
        "--precision",
        "bf16",
    ]);
    assert!(ok, "{stdout}\n{stderr}");
    assert!(stdout.contains("Gloo on CPU, bf16"), "{stdout}");
    // bf16 was really computed: its errors are far above fp32's, and the
    // remap moves bf16 rows exactly.
    assert!(error_of(&stdout, "attention out") > 1e-4, "{stdout}");
    assert!(error_of(&stdout, "step gradients") > 1e-4, "{stdout}");
    assert_eq!(error_of(&stdout, "remap"), 0.0, "{stdout}");
    let (ok, stdout, _, _) = selfcheck(&["--ranks", "2", "--precision", "fp16"]);
    assert!(!ok, "{stdout}");
}

/// The blockwise attention kernel (what GPUs run) through the whole check on
/// the CPU: ring attention, remap and a training step stay exact with it.
#[test]
fn the_blockwise_kernel_passes_the_same_check() {
    let out = Command::new(env!("CARGO_BIN_EXE_weft-trainer"))
        .env("WEFT_ATTENTION", "blockwise")
        .args(["selfcheck", "--ranks", "3", "--cases", "3", "--seed", "5"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("Blockwise attention kernel"), "{stdout}");
    assert!(error_of(&stdout, "attention dK") < 1e-4, "{stdout}");
}

/// `--device cuda` runs where the build has NCCL and libtorch sees a GPU;
/// anywhere else it is refused before any worker starts, saying why.
#[test]
fn cuda_is_refused_with_the_reason_where_it_cannot_run() {
    let (ok, stdout, stderr, elapsed) =
        selfcheck(&["--ranks", "2", "--cases", "1", "--device", "cuda"]);
    if ok {
        assert!(stdout.contains("NCCL on CUDA"), "{stdout}");
    } else {
        assert!(
            stderr.contains("built for CPU only") || stderr.contains("sees no CUDA device"),
            "{stderr}"
        );
        assert!(elapsed < Duration::from_secs(10), "took {elapsed:?}");
    }
    let (ok, _, stderr, _) = selfcheck(&["--ranks", "2", "--device", "tpu"]);
    assert!(!ok);
    assert!(stderr.contains("tpu"), "{stderr}");
}
