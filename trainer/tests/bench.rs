//! `weft-trainer bench memory` and `bench throughput` as a user runs them:
//! every measurement in a process of its own, the figures in the JSON the
//! README describes; StreamBP holding longer sequences than checkpointing,
//! which holds longer ones than plain backprop, within the same budget; the
//! engine's throughput beside the plain path's.

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

fn throughput(args: &[&str]) -> std::process::Output {
    trainer()
        .args(["bench", "throughput", "--model", "tiny", "--device", "cpu"])
        .args(args)
        .output()
        .unwrap()
}

/// `bench throughput`: both paths at two lengths, the engine's two ranks
/// sharing the CPU in a ring, the figures consistent with each other and
/// the engine's prediction beside its measured forward and backward.
#[test]
fn the_throughput_bench_measures_both_paths() {
    let json = std::env::temp_dir().join(format!("weft-throughput-{}.json", std::process::id()));
    let out = throughput(&[
        "--json",
        json.to_str().unwrap(),
        "--tokens-per-device",
        "256,1024",
        "--ranks",
        "2",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--peak-tflops",
        "0.5",
        "--format",
        "json",
    ]);
    ok(&out);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // --json writes the same report beside what standard output shows.
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(written, report);
    std::fs::remove_file(&json).unwrap();
    assert_eq!(report["peak"]["tflops"], 0.5);
    let rows = report["rows"].as_array().unwrap();
    let runs: Vec<(u64, &str)> = rows
        .iter()
        .map(|r| {
            (
                r["tokens_per_device"].as_u64().unwrap(),
                r["path"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        runs,
        [
            (256, "engine"),
            (256, "plain"),
            (1024, "engine"),
            (1024, "plain")
        ]
    );
    for row in rows {
        let m = &row["measured"];
        assert!(m.is_object(), "{row}");
        let f = |name: &str| m[name].as_f64().unwrap_or_else(|| panic!("{name}: {row}"));
        let tokens = row["tokens_per_device"].as_f64().unwrap();
        assert_eq!(f("steps"), 2.0);
        assert_eq!(f("tokens_per_step"), tokens);
        assert!((f("tokens_per_s_per_device") * f("step_s") / tokens - 1.0).abs() < 1e-9);
        assert!((f("mfu") - f("tflops_per_device") / 0.5).abs() < 1e-12);
        assert_eq!(row["devices"], 1);
        if row["path"] == "engine" {
            assert_eq!(row["ranks"], 2);
            // Each rank holds half of the device's document: a ring of 2.
            assert_eq!(m["max_cp_degree"], 2, "{row}");
            assert!(f("predicted_s") > 0.0);
            assert!(f("forward_backward_s") > 0.0 && f("forward_backward_s") < f("step_s"));
            assert!(f("attention_share") > 0.0 && f("attention_share") < 1.0);
        } else {
            assert_eq!(row["ranks"], 1);
            assert!(m.get("predicted_s").is_none());
        }
    }
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bench throughput: tiny"), "{err}");
}

#[test]
fn the_throughput_bench_refuses_bad_input_by_name() {
    for (args, expected) in [
        (
            &["--gpu", "h100", "--precision", "fp32"][..],
            "--gpu measures MFU against the GPU's dense bf16 peak, and the runs are in fp32",
        ),
        (
            &["--gpu", "v100", "--precision", "bf16"][..],
            "unknown GPU preset \"v100\"",
        ),
        (
            &["--peak-tflops", "0"][..],
            "--peak-tflops must be a positive number, got 0",
        ),
        (
            &[
                "--tokens-per-device",
                "512,4096",
                "--stream-bp-chunk",
                "1024",
            ][..],
            "--stream-bp-chunk 1024 is longer than the shortest --tokens-per-device (512)",
        ),
        (
            &["--tokens-per-device", "1"][..],
            "invalid value '1' for '--tokens-per-device <TOKENS_PER_DEVICE>'",
        ),
        (
            &["--paths", "engine,fast"][..],
            "invalid value 'fast' for '--paths <PATHS>'",
        ),
        (
            &["--profile", "/nonexistent.json"][..],
            "--profile /nonexistent.json",
        ),
        (
            &["--ranks", "0"][..],
            "invalid value '0' for '--ranks <RANKS>'",
        ),
        (
            &["--json", "/nonexistent/report.json"][..],
            "--json /nonexistent/report.json",
        ),
        (
            &["--paths", "plain", "--stream-bp-chunk", "64"][..],
            "--stream-bp-chunk sets the engine's runs, and --paths runs the plain path alone",
        ),
        (
            &["--paths", "plain", "--ranks", "2"][..],
            "--ranks sets the engine's runs",
        ),
        (
            &["--warmup", "99999999999"][..],
            "invalid value '99999999999' for '--warmup <WARMUP>'",
        ),
    ] {
        let out = throughput(args);
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(expected), "{args:?}: {err}");
    }
}

/// A run that outlives `--timeout-s` is stopped and reported as such; the
/// benchmark goes on and succeeds.
#[test]
fn a_run_past_its_time_is_stopped_and_reported() {
    let out = throughput(&[
        "--paths",
        "plain",
        "--tokens-per-device",
        "65536",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--timeout-s",
        "1",
        "--format",
        "json",
    ]);
    ok(&out);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let failed = &report["rows"][0]["failed"];
    assert_eq!(failed["category"], "timeout", "{report}");
    assert_eq!(failed["message"], "stopped after 1 s (--timeout-s)");
}

/// `WEFT_ATTENTION` takes `blockwise` or nothing; anything else is refused
/// by name before anything runs.
#[test]
fn an_unknown_attention_setting_is_refused() {
    let out = trainer()
        .env("WEFT_ATTENTION", "flash")
        .args(["selfcheck", "--ranks", "1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("WEFT_ATTENTION=\"flash\": the one value it takes is \"blockwise\""),
        "{err}"
    );
}
