//! `weft-trainer bench memory` as a user runs it: every step measured in a
//! process of its own, the figures in the JSON the README describes, and
//! StreamBP holding longer sequences than checkpointing, which holds longer
//! ones than plain backprop, within the same budget.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/cli.rs"]
mod cli;
use cli::{ok, trainer};

fn bench(args: &[&str]) -> std::process::Output {
    trainer()
        .args(["bench", "memory", "--model", "tiny", "--threads", "1"])
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn the_memory_bench_measures_each_method() {
    let out = bench(&[
        "--seq-len",
        "256",
        "--budget-gib",
        "0.04",
        "--stream-bp-chunk",
        "64",
        "--max-len",
        "65536",
        "--resolution",
        "0.1",
        "--format",
        "json",
    ]);
    ok(&out);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["budget_gib"], 0.04);
    assert_eq!(report["seq_len"], 256);
    let methods = report["methods"].as_array().unwrap();
    let names: Vec<&str> = methods
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["plain", "checkpointing", "streambp"]);
    let field = |i: usize, name: &str| methods[i][name].as_f64().unwrap();
    for (i, name) in names.iter().enumerate() {
        assert!(field(i, "peak_gib") > 0.0 && field(i, "s_per_token") > 0.0);
        assert!(field(i, "max_len") >= 2.0, "{name}");
    }
    // The planner's prediction beside the methods it models.
    assert!(methods[0]["predicted_gib"].is_number());
    assert!(methods[1].get("predicted_gib").is_none());
    assert!(methods[2]["predicted_gib"].is_number());
    // ... and where memory binds: at the longest length, and the longest
    // length the model itself says fits.
    for i in [0, 2] {
        assert!(field(i, "max_len_peak_gib") > 0.0, "{}", names[i]);
        assert!(field(i, "max_len_predicted_gib") > 0.0, "{}", names[i]);
        assert!(field(i, "predicted_max_len") >= 2.0, "{}", names[i]);
    }
    assert!(methods[1].get("predicted_max_len").is_none());
    let (plain, checkpointing, streambp) = (
        field(0, "max_len"),
        field(1, "max_len"),
        field(2, "max_len"),
    );
    assert!(
        checkpointing > plain && streambp > 1.5 * checkpointing,
        "longest within the budget: plain {plain}, checkpointing {checkpointing}, StreamBP {streambp}"
    );
    assert!(field(2, "peak_gib") < field(0, "peak_gib"));
}

#[test]
fn the_memory_bench_refuses_bad_input_by_name() {
    for (args, expected) in [
        (
            &["--budget-gib", "0"][..],
            "--budget-gib must be a positive number",
        ),
        (
            &["--methods", "plain,fast"][..],
            "invalid value 'fast' for '--methods <METHODS>'",
        ),
        (
            &["--seq-len", "256", "--stream-bp-chunk", "512"][..],
            "--stream-bp-chunk 512 is longer than --seq-len 256",
        ),
        (
            &["--resolution", "1.5"][..],
            "--resolution must be between 0 and 1",
        ),
    ] {
        let out = bench(args);
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(expected), "{args:?}: {err}");
    }
}
