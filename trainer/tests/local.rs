//! `weft-trainer local` as a user runs it: real text, real worker processes,
//! real collectives. Four ranks train exactly like one; every strategy's
//! plans give the same losses; a job that dies resumes from its checkpoint on
//! another number of ranks with the same data order and losses; Dataset
//! Decomposition's batches do all of that too; bad input gets a clear error
//! and no hang.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use weft_trainer::train::StepMetrics;

#[path = "support/cli.rs"]
mod cli;
use cli::{local, ok, trainer};

fn scratch(name: &str) -> PathBuf {
    cli::scratch("local", name)
}

fn max_loss_gap(a: &[StepMetrics], b: &[StepMetrics]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            assert_eq!(
                (x.step, x.tokens),
                (y.step, y.tokens),
                "same global batches"
            );
            (x.loss - y.loss).abs()
        })
        .fold(0.0, f64::max)
}

#[test]
fn four_ranks_train_exactly_like_one_and_the_loss_falls() {
    let dir = scratch("four");
    // 384 tokens a rank: the longer documents are split over up to three ranks.
    let (four_out, four) = local(
        &dir,
        "four",
        &["--ranks", "4", "--steps", "50", "--rank-tokens", "384"],
    );
    ok(&four_out);
    let (one_out, one) = local(&dir, "one", &["--ranks", "1", "--steps", "50"]);
    ok(&one_out);
    assert_eq!(four.len(), 50);
    let gap = max_loss_gap(&four, &one);
    assert!(gap < 1e-4, "loss curves differ by {gap}");
    let (first, last) = (four[0].loss, four[49].loss);
    assert!(last < 0.6 * first, "loss {first} -> {last}");
    assert!(
        four.iter().any(|m| m.max_cp_degree > 1),
        "no context parallelism"
    );
    assert!(
        four.iter()
            .all(|m| m.world == 4 && m.tokens > 0 && m.tokens_per_s > 0.0)
    );
    // The data thread's speed and the steps' wait for it are reported; the
    // byte tokenizer runs far ahead of training, so after the first step
    // the batches are ready when a step wants them.
    assert!(
        four.iter().all(|m| m.data_tokens_per_s > m.tokens_per_s)
            && four[1..]
                .iter()
                .all(|m| m.data_wait_s < 0.5 * m.step_time_s),
        "{:?}",
        four.iter()
            .map(|m| (m.data_tokens_per_s, m.tokens_per_s, m.data_wait_s))
            .collect::<Vec<_>>()
    );
    let summary = String::from_utf8_lossy(&four_out.stdout);
    assert!(summary.contains("trained 50 steps on 4 ranks"), "{summary}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn every_strategy_gives_the_same_losses() {
    let dir = scratch("strategies");
    let (out, reference) = local(&dir, "one", &["--ranks", "1", "--steps", "4"]);
    ok(&out);
    for strategy in ["zeppelin", "static", "hdp", "weft"] {
        let (out, got) = local(
            &dir,
            strategy,
            &[
                "--ranks",
                "3",
                "--steps",
                "4",
                "--rank-tokens",
                "400",
                "--strategy",
                strategy,
            ],
        );
        ok(&out);
        let gap = max_loss_gap(&got, &reference);
        assert!(gap < 1e-4, "{strategy}: {gap}");
        if strategy == "zeppelin" {
            assert!(got.iter().any(|m| m.remap_s > 0.0), "zeppelin remaps");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Mixed precision (`--precision bf16`) on three ranks with context
/// parallelism follows the fp32 curve of one rank within bf16 rounding, and
/// the loss falls.
#[test]
fn bf16_on_three_ranks_follows_the_fp32_curve() {
    let dir = scratch("bf16");
    let (out, fp32) = local(&dir, "fp32", &["--ranks", "1", "--steps", "12"]);
    ok(&out);
    let (out, bf16) = local(
        &dir,
        "bf16",
        &[
            "--ranks",
            "3",
            "--steps",
            "12",
            "--rank-tokens",
            "400",
            "--precision",
            "bf16",
        ],
    );
    ok(&out);
    assert!(
        bf16.iter().any(|m| m.max_cp_degree > 1),
        "no context parallelism"
    );
    let gap = max_loss_gap(&bf16, &fp32);
    assert!(gap < 2e-2, "bf16 strays from fp32 by {gap}");
    assert!(
        gap > 0.0,
        "bf16 gives fp32's losses exactly: not computed in bf16"
    );
    assert!(
        bf16[11].loss < 0.7 * bf16[0].loss,
        "loss {} -> {}",
        bf16[0].loss,
        bf16[11].loss
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `weft-trainer profile` measures this device; `local --profile` plans with
/// it, and so predicts steps at this CPU's speed rather than an H100's (the
/// prediction's accuracy is a benchmark figure, trainer/BENCHMARKS.md).
#[test]
fn a_measured_profile_prices_steps_at_this_devices_speed() {
    let dir = scratch("profile");
    let profile = dir.join("cpu.json");
    let out = trainer()
        .args(["profile", "--threads", "1", "--steps", "2", "--out"])
        .arg(&profile)
        .output()
        .unwrap();
    ok(&out);
    let measured = weft_planner::input::load_profile(profile.to_str().unwrap()).unwrap();
    assert!(measured.device.contains("model tiny"), "{measured:?}");
    assert_eq!(
        measured.stream_bp_chunk_overhead_s, None,
        "no step streamed"
    );
    // Profiled with StreamBP, the profile says what a chunk costs.
    let streamed = dir.join("streamed.json");
    let out = trainer()
        .args([
            "profile",
            "--threads",
            "1",
            "--steps",
            "2",
            "--stream-bp-chunk",
            "64",
        ])
        .arg("--out")
        .arg(&streamed)
        .output()
        .unwrap();
    ok(&out);
    let streamed = weft_planner::input::load_profile(streamed.to_str().unwrap()).unwrap();
    assert!(
        streamed.stream_bp_chunk_overhead_s.is_some(),
        "{streamed:?}"
    );
    let (out, datasheet) = local(&dir, "datasheet", &["--ranks", "2", "--steps", "3"]);
    ok(&out);
    let (out, profiled) = local(
        &dir,
        "profiled",
        &[
            "--ranks",
            "2",
            "--steps",
            "3",
            "--profile",
            profile.to_str().unwrap(),
        ],
    );
    ok(&out);
    // The same batches and plans' losses; predictions a CPU's, not an H100's.
    assert!(max_loss_gap(&datasheet, &profiled) < 1e-4);
    for (a, b) in datasheet.iter().zip(&profiled) {
        assert!(
            b.predicted_step_s > 100.0 * a.predicted_step_s,
            "step {}: {} with the profile, {} without",
            a.step,
            b.predicted_step_s,
            a.predicted_step_s
        );
    }
    std::fs::write(dir.join("bad.json"), "{\"version\": 2}").unwrap();
    fails_with(
        &["--profile", dir.join("bad.json").to_str().unwrap()],
        "bad.json",
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_dead_job_resumes_on_another_world_size_with_the_same_data_and_losses() {
    let dir = scratch("resume");
    let (out, straight) = local(&dir, "straight", &["--ranks", "2", "--steps", "6"]);
    ok(&out);
    let checkpoint = dir.join("checkpoint");
    let checkpoint = checkpoint.to_str().unwrap();
    let started = Instant::now();
    let (out, first) = local(
        &dir,
        "first",
        &[
            "--ranks",
            "2",
            "--steps",
            "6",
            "--checkpoint-dir",
            checkpoint,
            "--checkpoint-every",
            "3",
            "--fail-at",
            "1:5",
        ],
    );
    assert!(!out.status.success());
    assert!(started.elapsed() < Duration::from_secs(60), "no hang");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("worker 1 failed") && err.contains("step 5"),
        "{err}"
    );
    assert_eq!(first.len(), 4);
    let (out, resumed) = local(
        &dir,
        "resumed",
        &[
            "--ranks",
            "3",
            "--steps",
            "6",
            "--checkpoint-dir",
            checkpoint,
            "--resume",
        ],
    );
    ok(&out);
    assert_eq!(
        resumed.iter().map(|m| m.step).collect::<Vec<_>>(),
        vec![4, 5, 6]
    );
    let gap = max_loss_gap(&resumed, &straight[3..]);
    assert!(gap < 1e-4, "resumed losses differ by {gap}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Dataset Decomposition: 2,048 tokens a step from buckets of 64 to 512.
const DECOMPOSED: [&str; 10] = [
    "--data-order",
    "decomposed",
    "--max-seq-len",
    "512",
    "--tokens-per-step",
    "2048",
    "--bucket-min",
    "64",
    "--curriculum-steps",
    "4",
];

#[test]
fn decomposed_batches_are_one_bucket_each_train_exactly_and_resume() {
    let dir = scratch("decomposed");
    let run = |name: &str, extra: &[&str]| {
        let mut args = DECOMPOSED.to_vec();
        args.extend_from_slice(extra);
        local(&dir, name, &args)
    };
    let (out, one) = run("one", &["--ranks", "1", "--steps", "6"]);
    ok(&out);
    // Every step is 2,048 tokens of equal sequences, and the curriculum starts
    // with the shortest bucket (32 sequences of 64 tokens).
    assert!(one.iter().all(|m| m.tokens == 2048), "{one:?}");
    assert!(
        one.iter()
            .all(|m| m.sequences.is_power_of_two() && (4..=32).contains(&m.sequences))
    );
    assert_eq!(one[0].sequences, 32);
    let buckets: std::collections::BTreeSet<u64> = one.iter().map(|m| m.sequences).collect();
    assert!(buckets.len() >= 2, "one bucket only: {buckets:?}");
    // Three ranks (the 512-token chunks split over two or three) train alike.
    let (out, three) = run(
        "three",
        &["--ranks", "3", "--steps", "6", "--rank-tokens", "300"],
    );
    ok(&out);
    assert!(three.iter().any(|m| m.max_cp_degree > 1));
    let gap = max_loss_gap(&three, &one);
    assert!(gap < 1e-4, "decomposed losses differ by {gap}");
    // A run that dies after its step-3 checkpoint resumes on one rank with
    // the same batches; the other data order is refused by name.
    let checkpoint = dir.join("checkpoint");
    let checkpoint = checkpoint.to_str().unwrap();
    let (out, _) = run(
        "first",
        &[
            "--ranks",
            "2",
            "--steps",
            "6",
            "--checkpoint-dir",
            checkpoint,
            "--checkpoint-every",
            "3",
            "--fail-at",
            "0:5",
        ],
    );
    assert!(!out.status.success());
    let (out, resumed) = run(
        "resumed",
        &[
            "--ranks",
            "1",
            "--steps",
            "6",
            "--checkpoint-dir",
            checkpoint,
            "--resume",
        ],
    );
    ok(&out);
    assert_eq!(
        resumed.iter().map(|m| m.step).collect::<Vec<_>>(),
        vec![4, 5, 6]
    );
    let gap = max_loss_gap(&resumed, &one[3..]);
    assert!(gap < 1e-4, "resumed losses differ by {gap}");
    let (out, _) = local(
        &dir,
        "documents",
        &[
            "--ranks",
            "1",
            "--steps",
            "6",
            "--max-seq-len",
            "512",
            "--checkpoint-dir",
            checkpoint,
            "--resume",
        ],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("data order"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A rank whose plan differs from the others' (fault injection) stops every
/// rank before the step's first collective, with the digest error naming
/// the step: none hangs (none is left running for the launcher to stop),
/// and the step does not run.
#[test]
fn a_rank_that_plans_otherwise_stops_every_rank_before_the_step() {
    let output = trainer()
        .args([
            "local",
            "--ranks",
            "3",
            "--steps",
            "3",
            "--misplan-at",
            "1:2",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&output.stderr);
    let out = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(2), "{err}");
    for part in [
        "step 2: rank(s) [",
        "planned a different step than rank",
        "plan digests differ",
    ] {
        assert!(err.contains(part), "{part}: {err}");
    }
    assert!(
        !err.contains("were stopped"),
        "every rank stops by itself: {err}"
    );
    assert!(
        !format!("{out}{err}").contains("2/3"),
        "step 2 ran: {out}{err}"
    );
}

fn fails_with(args: &[&str], expected: &str) {
    let started = Instant::now();
    let output = trainer().arg("local").args(args).output().unwrap();
    let err = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{args:?}: {err}");
    assert!(err.contains(expected), "{args:?}: {err}");
    assert!(started.elapsed() < Duration::from_secs(60), "{args:?} hung");
}

#[test]
fn bad_input_gets_a_clear_error() {
    let dir = scratch("bad");
    let missing = dir.join("missing");
    fails_with(&["--data", missing.to_str().unwrap()], "corpus directory");
    let corrupt = dir.join("corrupt");
    std::fs::create_dir_all(&corrupt).unwrap();
    std::fs::write(corrupt.join("a.jsonl"), "{\"text\": \"fine\"}\n{not json\n").unwrap();
    fails_with(&["--data", corrupt.to_str().unwrap()], "a.jsonl");
    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    fails_with(&["--data", empty.to_str().unwrap()], "holds no documents");
    fails_with(
        &["--model", "llama-5b"],
        "unknown model preset \"llama-5b\"",
    );
    fails_with(
        &["--strategy", "fastest"],
        "invalid value 'fastest' for '--strategy <STRATEGY>'",
    );
    fails_with(&["--ranks", "0"], "--ranks must be at least 1");
    fails_with(
        &["--ranks", "2", "--rank-tokens", "100"],
        "cannot fit even on the whole cluster",
    );
    fails_with(
        &["--ranks", "3", "--steps", "3", "--fail-at", "2:2"],
        "worker 2 failed",
    );
    fails_with(
        &["--data-order", "decomposed", "--max-seq-len", "1000"],
        "--max-seq-len to be a power of two",
    );
    fails_with(
        &["--data-order", "decomposed", "--bucket-min", "48"],
        "--bucket-min 48 must be a power of two",
    );
    fails_with(
        &[
            "--data-order",
            "decomposed",
            "--max-seq-len",
            "8192",
            "--tokens-per-step",
            "4096",
        ],
        "--tokens-per-step (4096) must hold at least one sequence of --max-seq-len (8192)",
    );
    fails_with(&["--data-order", "shuffled"], "invalid value 'shuffled'");
    fails_with(&["--stream-bp-chunk", "0"], "invalid value '0'");
    fails_with(
        &["--stream-bp", "always"],
        "--stream-bp always needs --stream-bp-chunk TOKENS",
    );
    fails_with(
        &["--stream-bp", "per-ring"],
        "--stream-bp per-ring needs --stream-bp-chunk TOKENS",
    );
    fails_with(&["--stream-bp", "sometimes"], "invalid value 'sometimes'");
    fails_with(
        &["--stream-bp-chunk", "2048", "--max-seq-len", "1024"],
        "--stream-bp-chunk 2048 is longer than the longest sequence allowed (--max-seq-len 1024)",
    );
    fails_with(
        &["--strategy", "hdp-offload"],
        "which the engine does not do",
    );
    fails_with(
        &["--cp-degree", "2"],
        "--cp-degree is the degree of static context parallelism",
    );
    fails_with(
        &[
            "--strategy",
            "static",
            "--cp-degree",
            "4",
            "--max-cp-degree",
            "2",
        ],
        "--cp-degree 4 must not be greater than --max-cp-degree 2",
    );
    fails_with(
        &["--ranks", "2", "--strategy", "static", "--cp-degree", "3"],
        "parallelism.cpDegree (--cp-degree) 3 is more ranks than the 2 there are",
    );
    fails_with(
        &[
            "--ranks",
            "4",
            "--rank-tokens",
            "300",
            "--max-cp-degree",
            "2",
        ],
        "but parallelism.maxCpDegree (--max-cp-degree) allows 2",
    );
    fails_with(
        &["--max-cp-degree", "2", "--strategy", "hdp"],
        "the hdp strategy cannot keep to parallelism.maxCpDegree",
    );
    fails_with(&["--precision", "fp16"], "invalid value 'fp16'");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The loss curve of a fixed run, against the one kept in
/// `tests/golden/loss-curve.json` (`WEFT_UPDATE_GOLDEN=1` rewrites it): a
/// change to the model, the data order, the plan's execution or the optimizer
/// shows here. The tolerance absorbs what libtorch's kernels may round
/// differently on another CPU (1e-6 relative and below), not a real change.
#[test]
fn the_loss_curve_of_a_fixed_run_is_the_golden_one() {
    let dir = scratch("golden");
    let (output, steps) = local(
        &dir,
        "curve",
        &[
            "--ranks",
            "3",
            "--steps",
            "12",
            "--seed",
            "3",
            "--rank-tokens",
            "384",
            "--device",
            "cpu",
        ],
    );
    ok(&output);
    let losses: Vec<f64> = steps.iter().map(|m| m.loss).collect();
    assert_eq!(losses.len(), 12);
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/loss-curve.json");
    if std::env::var_os("WEFT_UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, serde_json::to_string_pretty(&losses).unwrap() + "\n").unwrap();
    }
    let golden: Vec<f64> = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(golden.len(), losses.len());
    for (step, (got, want)) in losses.iter().zip(&golden).enumerate() {
        assert!(
            (got - want).abs() <= 1e-4 * want.abs(),
            "step {}: loss {got}, golden {want}",
            step + 1
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--plan-svg DIR --plan-svg-every 2`: the plan of every second step is
/// drawn, whole, as `weft plan --svg` draws one; a directory that cannot be
/// made is refused by the flag's name before any rank starts.
#[test]
fn the_plan_each_step_ran_is_drawn() {
    let dir = scratch("plan-svg");
    let pictures = dir.join("pictures");
    let (out, steps) = local(
        &dir,
        "drawn",
        &[
            "--ranks",
            "2",
            "--steps",
            "4",
            "--max-seq-len",
            "512",
            "--tokens-per-step",
            "2048",
            "--rank-tokens",
            "384",
            "--plan-svg",
            pictures.to_str().unwrap(),
            "--plan-svg-every",
            "2",
        ],
    );
    ok(&out);
    assert_eq!(steps.len(), 4);
    let mut names: Vec<String> = std::fs::read_dir(&pictures)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["step-00000002.svg", "step-00000004.svg"]);
    let svg = std::fs::read_to_string(pictures.join("step-00000004.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    assert!(
        svg.contains(&format!("{}: 2 ranks", steps[3].strategy)),
        "{svg}"
    );

    let blocked = dir.join("a-file");
    std::fs::write(&blocked, b"").unwrap();
    let (out, _) = local(
        &dir,
        "blocked",
        &[
            "--ranks",
            "1",
            "--steps",
            "1",
            "--plan-svg",
            blocked.join("x").to_str().unwrap(),
        ],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--plan-svg: cannot create the directory"),
        "{err}"
    );
    // How often, without where: refused, not ignored.
    let (out, _) = local(
        &dir,
        "every-alone",
        &["--ranks", "1", "--steps", "1", "--plan-svg-every", "2"],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--plan-svg"), "{err}");
}

/// StreamBP trains exactly like plain backprop: the same loss at every one of
/// 20 steps (fp32, within 1e-6 relative), with long documents split over
/// ranks, and the metrics say each step streamed.
#[test]
fn streambp_follows_the_plain_loss_curve() {
    let dir = scratch("streambp");
    let common = [
        "--ranks",
        "3",
        "--steps",
        "20",
        "--rank-tokens",
        "384",
        "--device",
        "cpu",
    ];
    let (out, plain) = local(&dir, "plain", &common);
    ok(&out);
    let mut streamed_args = common.to_vec();
    streamed_args.extend(["--stream-bp-chunk", "37", "--stream-bp", "always"]);
    let (out, streamed) = local(&dir, "streamed", &streamed_args);
    ok(&out);
    assert_eq!(streamed.len(), 20);
    assert!(streamed.iter().all(|m| m.streamed_rings == m.rings));
    assert!(
        plain.iter().any(|m| m.max_cp_degree > 1),
        "no context parallelism"
    );
    // The job's chunk, or a power of two times it where memory allows.
    assert!(
        streamed.iter().all(|m| m
            .stream_bp_chunk
            .is_some_and(|c| c % 37 == 0 && (c / 37).is_power_of_two())),
        "{streamed:?}"
    );
    assert!(plain.iter().all(|m| m.stream_bp_chunk.is_none()));
    for (p, s) in plain.iter().zip(&streamed) {
        assert_eq!((p.step, p.tokens), (s.step, s.tokens));
        let gap = (p.loss - s.loss).abs() / p.loss.abs();
        assert!(
            gap <= 1e-6,
            "step {}: loss {} with StreamBP, {} without ({gap:.2e})",
            p.step,
            s.loss,
            p.loss
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--max-cp-degree` caps the rings and `--cp-degree` sets static's one
/// degree (the job's `maxCpDegree` and `cpDegree`), and both train the same
/// losses. (The planner's own tests show the cap on weft's wider rings.)
#[test]
fn cp_degree_flags_shape_the_plans_that_run() {
    let dir = scratch("degrees");
    // 400 tokens a rank: a 1024-token document needs 3 of the 4 ranks, and
    // static, whose degree divides the world, takes all 4.
    let common = [
        "--ranks",
        "4",
        "--steps",
        "3",
        "--rank-tokens",
        "400",
        "--strategy",
        "static",
    ];
    let (out, own) = local(&dir, "static", &common);
    ok(&out);
    assert!(own.iter().any(|m| m.max_cp_degree == 4), "{own:?}");
    for (name, flag) in [("capped", "--max-cp-degree"), ("fixed", "--cp-degree")] {
        let mut args = common.to_vec();
        args.extend([flag, "3"]);
        let (out, got) = local(&dir, name, &args);
        ok(&out);
        assert!(got.iter().all(|m| m.max_cp_degree == 3), "{flag}: {got:?}");
        assert!(max_loss_gap(&got, &own) < 1e-4);
    }
    let _ = std::fs::remove_dir_all(&dir);
}
