//! `weft-trainer` under faults and bad input, as a hostile user drives it:
//! every world size from 1 to 16 ranks trains, checkpoints are verified on
//! load and a damaged one is refused by name, a run killed while writing a
//! checkpoint resumes from an intact one with the loss curve of an
//! uninterrupted run, two runs cannot share a checkpoint directory, a full
//! disk leaves nothing half written, a resume that would change the data
//! order is refused, and every bad flag is refused by name before any
//! worker starts.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use weft_trainer::checkpoint::{MANIFEST_FILE, Manifest, OPTIMIZER_FILE, sha256_file};
use weft_trainer::train::StepMetrics;

#[path = "support/cli.rs"]
mod cli;
use cli::{local, local_env, ok, trainer};

fn scratch(name: &str) -> PathBuf {
    cli::scratch("faults", name)
}

/// A small, quick run: 2 ranks, short documents.
const SMALL: &[&str] = &["--tokens-per-step", "2048", "--max-seq-len", "256"];

fn text(output: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn fails_with(output: &Output, expected: &str) {
    let all = text(output);
    assert!(!output.status.success(), "should fail: {all}");
    assert!(all.contains(expected), "expected {expected:?} in: {all}");
}

fn losses(steps: &[StepMetrics]) -> Vec<(u64, f64)> {
    steps.iter().map(|m| (m.step, m.loss)).collect()
}

fn assert_same_curve(got: &[StepMetrics], want: &[StepMetrics]) {
    assert_eq!(
        got.len(),
        want.len(),
        "{:?} vs {:?}",
        losses(got),
        losses(want)
    );
    for (g, w) in got.iter().zip(want) {
        assert_eq!((g.step, g.tokens), (w.step, w.tokens), "same batches");
        assert!(
            (g.loss - w.loss).abs() <= 1e-4 * w.loss.abs(),
            "step {}: loss {} vs {}",
            g.step,
            g.loss,
            w.loss
        );
    }
}

fn with(base: &[&str], more: &[&str]) -> Vec<String> {
    base.iter().chain(more).map(|s| s.to_string()).collect()
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn every_world_size_from_1_to_16_trains_the_same_steps() {
    // The plan check once failed at step 1 on 6, 8, 16, ... ranks: the
    // digests' sum lost bits in an f64. Each world size trains two steps;
    // all follow one loss curve.
    let dir = scratch("worlds");
    let (out, reference) = local(
        &dir,
        "w1",
        &strs(&with(SMALL, &["--ranks", "1", "--steps", "2"])),
    );
    ok(&out);
    for ranks in 2..=16u32 {
        let r = ranks.to_string();
        let (out, steps) = local(
            &dir,
            &format!("w{ranks}"),
            &strs(&with(SMALL, &["--ranks", &r, "--steps", "2"])),
        );
        ok(&out);
        assert_same_curve(&steps, &reference);
        assert!(steps.iter().all(|m| m.world == ranks));
    }
}

/// Overwrites 1 KiB inside `file` with 0xFF, as a disk or a copy that went
/// wrong would.
fn damage(file: &Path) {
    let mut bytes = std::fs::read(file).unwrap();
    let at = bytes.len() / 2;
    bytes[at..at + 1024].fill(0xFF);
    std::fs::write(file, bytes).unwrap();
}

fn step_dir(root: &Path, step: u64) -> PathBuf {
    root.join(format!("step-{step:08}"))
}

#[test]
fn a_damaged_checkpoint_is_refused_by_name_and_the_run_resumes_from_an_intact_one() {
    let dir = scratch("damaged");
    let (out, whole) = local(
        &dir,
        "whole",
        &strs(&with(SMALL, &["--ranks", "2", "--steps", "6"])),
    );
    ok(&out);
    let ckpt = dir.join("ckpt");
    let c = ckpt.to_str().unwrap();
    let (out, _) = local(
        &dir,
        "first",
        &strs(&with(
            SMALL,
            &[
                "--ranks",
                "2",
                "--steps",
                "4",
                "--checkpoint-dir",
                c,
                "--checkpoint-every",
                "2",
            ],
        )),
    );
    ok(&out);
    damage(&step_dir(&ckpt, 4).join(OPTIMIZER_FILE));
    let (out, resumed) = local(
        &dir,
        "resumed",
        &strs(&with(
            SMALL,
            &[
                "--ranks",
                "3",
                "--steps",
                "6",
                "--checkpoint-dir",
                c,
                "--resume",
            ],
        )),
    );
    ok(&out);
    let said = text(&out);
    assert!(
        said.contains("step-00000004 is refused") && said.contains(OPTIMIZER_FILE),
        "{said}"
    );
    assert!(
        said.contains("resuming from") && said.contains("(step 2)"),
        "{said}"
    );
    // Steps 3 to 6, exactly as the run that was never interrupted.
    assert_same_curve(&resumed, &whole[2..]);
    // With every checkpoint damaged, nothing is silently started over.
    for step in [2, 4, 6] {
        if step_dir(&ckpt, step).exists() {
            damage(&step_dir(&ckpt, step).join("model.safetensors"));
        }
    }
    let (out, _) = local(
        &dir,
        "none",
        &strs(&with(
            SMALL,
            &[
                "--ranks",
                "2",
                "--steps",
                "8",
                "--checkpoint-dir",
                c,
                "--resume",
            ],
        )),
    );
    fails_with(&out, "no intact checkpoint in");
}

#[test]
fn nan_weights_are_never_saved() {
    // A checkpoint whose optimizer state holds NaN (its manifest agrees, so
    // it is intact as written): the next update turns the weights to NaN,
    // and the run stops naming the step instead of saving them.
    let dir = scratch("nan");
    let ckpt = dir.join("ckpt");
    let c = ckpt.to_str().unwrap();
    let (out, _) = local(
        &dir,
        "first",
        &strs(&with(
            SMALL,
            &["--ranks", "2", "--steps", "2", "--checkpoint-dir", c],
        )),
    );
    ok(&out);
    let step = step_dir(&ckpt, 2);
    let optimizer = step.join(OPTIMIZER_FILE);
    let tensors: Vec<(String, tch::Tensor)> = tch::Tensor::read_safetensors(&optimizer)
        .unwrap()
        .into_iter()
        .map(|(name, t)| {
            if name.starts_with("exp_avg.") {
                (name, t.fill(f64::NAN))
            } else {
                (name, t)
            }
        })
        .collect();
    tch::Tensor::write_safetensors(&tensors, &optimizer).unwrap();
    let manifest_path = step.join(MANIFEST_FILE);
    let mut manifest: Manifest =
        serde_json::from_str(&std::fs::read_to_string(&manifest_path).unwrap()).unwrap();
    manifest
        .files
        .insert(OPTIMIZER_FILE.to_string(), sha256_file(&optimizer).unwrap());
    std::fs::write(&manifest_path, serde_json::to_string(&manifest).unwrap()).unwrap();
    let (out, _) = local(
        &dir,
        "nan",
        &strs(&with(
            SMALL,
            &[
                "--ranks",
                "2",
                "--steps",
                "3",
                "--checkpoint-dir",
                c,
                "--resume",
            ],
        )),
    );
    fails_with(&out, "step 3: parameter");
    fails_with(&out, "NaN or infinite");
    assert!(!step_dir(&ckpt, 3).exists());
}

/// The names in `dir` that end with `suffix`.
fn names_ending(dir: &Path, suffix: &str) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(suffix))
        .collect()
}

#[test]
fn a_run_killed_while_writing_a_checkpoint_resumes_with_the_uninterrupted_curve() {
    let dir = scratch("killed");
    let (out, whole) = local(
        &dir,
        "whole",
        &strs(&with(SMALL, &["--ranks", "2", "--steps", "6"])),
    );
    ok(&out);
    // Rank 0 dies (abort, as kill -9) at a point of writing one of its
    // checkpoints (one every step), chosen at random: which checkpoint, and
    // where in its writing. The seed is printed, and WEFT_TEST_SEED repeats
    // a run.
    let seed = weft_planner::rng::test_seed();
    eprintln!("WEFT_TEST_SEED={seed}");
    let mut rng = weft_planner::rng::SplitMix64::new(seed);
    let points = [
        "checkpoint-dir",
        "checkpoint-tensors",
        "checkpoint-sums",
        "checkpoint-manifest",
        "checkpoint-renamed",
    ];
    for point in points {
        for damage_newest in [false, true] {
            // The checkpoint of step 3, 4 or 5.
            let dies_at = 3 + rng.below(3);
            let ckpt = dir.join(format!("ckpt-{point}-{damage_newest}"));
            let c = ckpt.to_str().unwrap();
            let fault = format!("{point}@{dies_at}");
            let run = with(
                SMALL,
                &[
                    "--ranks",
                    "2",
                    "--steps",
                    "6",
                    "--checkpoint-dir",
                    c,
                    "--checkpoint-every",
                    "1",
                ],
            );
            let (out, _) = local_env(&dir, "dies", &strs(&run), &[("WEFT_FAULT_POINT", &fault)]);
            fails_with(&out, "worker 0 failed");
            // Only after the rename is the dying step's checkpoint there,
            // and then it is whole.
            let written = dies_at - u64::from(point != "checkpoint-renamed");
            let newest = weft_trainer::checkpoint::checkpoints(&ckpt)
                .unwrap()
                .pop()
                .unwrap();
            assert_eq!(newest.0, written, "{fault}");
            assert!(
                weft_trainer::checkpoint::verify(&newest.1).is_ok(),
                "{fault}"
            );
            // Killed with its manifest written, the staged checkpoint is
            // complete: the next owner gives it its name.
            let promoted = point == "checkpoint-manifest";
            let (newest_dir, mut resumes_at) = if promoted {
                (ckpt.join(format!(".step-{dies_at:08}.writing")), dies_at)
            } else {
                (newest.1, written)
            };
            let mut refused = 0;
            if damage_newest {
                damage(&newest_dir.join("model.safetensors"));
                resumes_at -= 1;
                // A damaged staged copy is a dead write, deleted; a damaged
                // checkpoint is set aside.
                refused = usize::from(!promoted);
            }
            let (out, resumed) = local(
                &dir,
                "resumed",
                &strs(&with(
                    SMALL,
                    &[
                        "--ranks",
                        "2",
                        "--steps",
                        "6",
                        "--checkpoint-dir",
                        c,
                        "--resume",
                    ],
                )),
            );
            ok(&out);
            assert!(
                text(&out).contains(&format!("(step {resumes_at})")),
                "{fault}: {}",
                text(&out)
            );
            assert_same_curve(&resumed, &whole[resumes_at as usize..]);
            // What the dead writer left is gone, or has its name.
            assert!(names_ending(&ckpt, ".writing").is_empty(), "{fault}");
            assert!(names_ending(&ckpt, ".old").is_empty(), "{fault}");
            assert_eq!(names_ending(&ckpt, ".refused").len(), refused, "{fault}");
        }
    }
}

#[test]
fn two_runs_cannot_share_a_checkpoint_directory() {
    let dir = scratch("shared");
    let ckpt = dir.join("ckpt");
    let c = ckpt.to_str().unwrap();
    let metrics = dir.join("first.jsonl");
    let mut first = trainer()
        .arg("local")
        .args(with(
            SMALL,
            &[
                "--ranks",
                "2",
                "--steps",
                "400",
                "--checkpoint-dir",
                c,
                "--metrics",
            ],
        ))
        .arg(&metrics)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait until the first run trains (it holds the lock by then).
    let started = Instant::now();
    while std::fs::read_to_string(&metrics)
        .unwrap_or_default()
        .is_empty()
    {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the first run did not start"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (out, _) = local(
        &dir,
        "second",
        &strs(&with(
            SMALL,
            &["--ranks", "2", "--steps", "2", "--checkpoint-dir", c],
        )),
    );
    let _ = first.kill();
    let _ = first.wait();
    fails_with(&out, "is in use by another run (process");
    // Once the first is gone, the directory is free again.
    std::thread::sleep(Duration::from_millis(500));
    let (out, _) = local(
        &dir,
        "third",
        &strs(&with(
            SMALL,
            &["--ranks", "2", "--steps", "1", "--checkpoint-dir", c],
        )),
    );
    ok(&out);
}

/// Mounts a tmpfs of `size` at `dir`; false where this process may not
/// mount (not root), said on the test's output.
fn small_disk(dir: &Path, size: &str) -> bool {
    std::fs::create_dir_all(dir).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(dir)
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("SKIPPED: mounting a small tmpfs needs root");
    }
    mounted
}

fn unmount(dir: &Path) {
    let _ = Command::new("umount").arg(dir).status();
}

#[test]
fn a_full_disk_prunes_first_or_says_how_much_is_needed_and_leaves_nothing_half_written() {
    let dir = scratch("disk");
    // One checkpoint of the tiny model is about 1.5 MB.
    let roomy = dir.join("roomy");
    if !small_disk(&roomy, "4m") {
        return;
    }
    let c = roomy.join("ckpt");
    let (out, steps) = local(
        &dir,
        "roomy",
        &strs(&with(
            SMALL,
            &[
                "--ranks",
                "2",
                "--steps",
                "4",
                "--checkpoint-every",
                "1",
                "--checkpoint-keep",
                "3",
                "--checkpoint-dir",
                c.to_str().unwrap(),
            ],
        )),
    );
    let names: Vec<String> = std::fs::read_dir(&c)
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    unmount(&roomy);
    ok(&out);
    assert_eq!(steps.len(), 4);
    // Room for two: the oldest went first, the newest two are whole.
    let mut checkpoints: Vec<&String> = names.iter().filter(|n| n.starts_with("step-")).collect();
    checkpoints.sort();
    assert_eq!(checkpoints, ["step-00000003", "step-00000004"], "{names:?}");

    let tiny = dir.join("tiny");
    assert!(small_disk(&tiny, "1m"));
    let c = tiny.join("ckpt");
    let (out, _) = local(
        &dir,
        "tiny",
        &strs(&with(
            SMALL,
            &[
                "--ranks",
                "2",
                "--steps",
                "2",
                "--checkpoint-dir",
                c.to_str().unwrap(),
            ],
        )),
    );
    let left: Vec<String> = std::fs::read_dir(&c)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != ".lock")
        .collect();
    unmount(&tiny);
    fails_with(&out, "not enough space in");
    fails_with(&out, "it needs 1.");
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn a_resume_that_would_change_the_data_order_is_refused_by_name() {
    let dir = scratch("resume");
    let ckpt = dir.join("ckpt");
    let c = ckpt.to_str().unwrap();
    let run = |name: &str, more: &[&str]| {
        let base = with(SMALL, &["--ranks", "2", "--checkpoint-dir", c]);
        let args: Vec<String> = base
            .into_iter()
            .chain(more.iter().map(|s| s.to_string()))
            .collect();
        local(&dir, name, &strs(&args))
    };
    let (out, _) = run("first", &["--steps", "2"]);
    ok(&out);
    let (out, _) = run("seed", &["--steps", "3", "--resume", "--seed", "7"]);
    fails_with(&out, "the seed was 0, this run's is 7 (--seed)");
    let (out, _) = local(
        &dir,
        "tokens",
        &[
            "--ranks",
            "2",
            "--checkpoint-dir",
            c,
            "--steps",
            "3",
            "--resume",
            "--tokens-per-step",
            "4096",
            "--max-seq-len",
            "256",
        ],
    );
    fails_with(&out, "--tokens-per-step was 2048");
    let other = dir.join("other-corpus");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("a.txt"), "another corpus altogether").unwrap();
    let (out, _) = run(
        "data",
        &[
            "--steps",
            "3",
            "--resume",
            "--data",
            other.to_str().unwrap(),
        ],
    );
    fails_with(&out, "the corpus differs");
    // Asked for, the change is made.
    let (out, steps) = run(
        "accepted",
        &[
            "--steps",
            "3",
            "--resume",
            "--seed",
            "7",
            "--accept-data-change",
        ],
    );
    ok(&out);
    assert_eq!(steps.iter().map(|m| m.step).collect::<Vec<_>>(), [3]);
    // Already at --steps: said, not an error.
    let (out, _) = run("complete", &["--steps", "3", "--resume", "--seed", "7"]);
    ok(&out);
    assert!(
        text(&out).contains("the run is already complete"),
        "{}",
        text(&out)
    );
    // A model of the same name with other dimensions: both shapes named.
    let model = dir.join("tiny.json");
    std::fs::write(
        &model,
        r#"{"name": "tiny", "layers": 1, "hidden": 64, "heads": 4, "kv_heads": 2, "ffn": 128, "vocab": 257}"#,
    )
    .unwrap();
    let (out, _) = run(
        "model",
        &[
            "--steps",
            "5",
            "--resume",
            "--seed",
            "7",
            "--model",
            model.to_str().unwrap(),
        ],
    );
    fails_with(&out, "1 layers, hidden 64");
    fails_with(&out, "2 layers");
    // Nothing there to resume: said, then a new run.
    let missing = dir.join("missing");
    let (out, steps) = local(
        &dir,
        "missing",
        &strs(&with(
            SMALL,
            &[
                "--ranks",
                "2",
                "--steps",
                "1",
                "--resume",
                "--checkpoint-dir",
                missing.to_str().unwrap(),
            ],
        )),
    );
    ok(&out);
    assert_eq!(steps.len(), 1);
    assert!(
        text(&out).contains("yet: starting from step 1"),
        "{}",
        text(&out)
    );
    // A new run in a directory that holds another run's checkpoints: its
    // own would be pruned among them.
    let (out, _) = run("fresh", &["--steps", "2"]);
    fails_with(&out, "already holds checkpoints (the newest of step 3)");
}

#[test]
fn an_unwritable_checkpoint_directory_or_a_model_too_large_is_refused_before_training() {
    let dir = scratch("upfront");
    let file = dir.join("a-file");
    std::fs::write(&file, "x").unwrap();
    let started = Instant::now();
    let (out, steps) = local(
        &dir,
        "unwritable",
        &strs(&with(
            SMALL,
            &[
                "--ranks",
                "2",
                "--steps",
                "50",
                "--checkpoint-dir",
                file.join("below").to_str().unwrap(),
            ],
        )),
    );
    fails_with(&out, "cannot be written");
    assert!(steps.is_empty(), "trained before finding out");
    let (out, steps) = local(&dir, "huge", &["--ranks", "2", "--model", "llama-70b"]);
    fails_with(&out, "model llama-70b does not fit");
    fails_with(&out, "is available");
    assert!(steps.is_empty());
    assert!(started.elapsed() < Duration::from_secs(30));
}

#[test]
fn bad_flags_are_refused_by_name_before_any_worker_starts() {
    let cases: &[(&[&str], &str)] = &[
        (&["--lr", "nan"], "--lr must be a positive number, got NaN"),
        (&["--lr", "inf"], "--lr must be a positive number, got inf"),
        (
            &["--clip-norm", "nan"],
            "--clip-norm must be a positive number",
        ),
        (&["--rank-tokens", "1"], "--rank-tokens must be at least 2"),
        (
            &["--rank-tokens", "100", "--max-seq-len", "1024"],
            "2 rank(s) of --rank-tokens 100 cannot hold one sequence of --max-seq-len 1024",
        ),
        (&["--max-seq-len", "0"], "--max-seq-len must be at least 2"),
        (&["--max-seq-len", "1"], "--max-seq-len must be at least 2"),
        (
            &["--tokens-per-step", "1"],
            "--tokens-per-step (1) must hold at least one sequence of --max-seq-len",
        ),
        (
            &["--collective-timeout-s", "0"],
            "--collective-timeout-s must be at least 1",
        ),
        (
            &["--model", "nosuch.json"],
            "nosuch.json: no such model file",
        ),
        (
            &["--accept-data-change"],
            "--accept-data-change only means something with --resume",
        ),
    ];
    for (args, expected) in cases {
        let output = trainer()
            .args(["local", "--ranks", "2", "--steps", "1"])
            .args(*args)
            .output()
            .unwrap();
        fails_with(&output, expected);
        let all = text(&output);
        assert!(
            !all.contains("worker"),
            "{args:?} reached the workers: {all}"
        );
    }
    let selfcheck: &[(&[&str], &str)] = &[
        (&["--cases", "0"], "--cases must be at least 1"),
        (
            &["--tolerance", "nan"],
            "--tolerance must be a positive number",
        ),
        (&["--tolerance=-1"], "--tolerance must be a positive number"),
        (
            &["--tolerance", "0"],
            "--tolerance must be a positive number",
        ),
    ];
    for (args, expected) in selfcheck {
        let output = trainer()
            .args(["selfcheck", "--ranks", "2"])
            .args(*args)
            .output()
            .unwrap();
        fails_with(&output, expected);
    }
}

#[test]
fn a_fifo_in_the_corpus_is_skipped_and_named() {
    let dir = scratch("fifo");
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    for i in 0..40 {
        std::fs::write(
            data.join(format!("doc{i:02}.txt")),
            format!("document {i} ").repeat(20 + i),
        )
        .unwrap();
    }
    assert!(
        Command::new("mkfifo")
            .arg(data.join("a.txt"))
            .status()
            .unwrap()
            .success()
    );
    let (out, steps) = local(
        &dir,
        "fifo",
        &strs(&with(
            SMALL,
            &[
                "--ranks",
                "2",
                "--steps",
                "2",
                "--data",
                data.to_str().unwrap(),
            ],
        )),
    );
    ok(&out);
    assert_eq!(steps.len(), 2);
    assert!(text(&out).contains("a.txt (a FIFO)"), "{}", text(&out));
}

/// The pids of `parent`'s children whose command line contains `needle`.
fn children_with(parent: u32, needle: &str) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().filter_map(Result::ok) {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        // pid (comm) state ppid ...
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if ppid == Some(parent) && String::from_utf8_lossy(&cmdline).contains(needle) {
            found.push(pid);
        }
    }
    found
}

#[test]
fn a_stalled_rank_is_the_one_named() {
    let dir = scratch("stalled");
    let metrics = dir.join("m.jsonl");
    let launcher = trainer()
        .arg("local")
        .args(with(
            SMALL,
            &[
                "--ranks",
                "3",
                "--steps",
                "400",
                "--collective-timeout-s",
                "3",
                "--metrics",
            ],
        ))
        .arg(&metrics)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while std::fs::read_to_string(&metrics)
        .unwrap_or_default()
        .is_empty()
    {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the run did not start"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let rank2 = children_with(launcher.id(), "--rank=2");
    assert_eq!(rank2.len(), 1, "{rank2:?}");
    let stopped = Command::new("kill")
        .args(["-STOP", &rank2[0].to_string()])
        .status()
        .unwrap();
    assert!(stopped.success());
    let out = launcher.wait_with_output().unwrap();
    fails_with(&out, "worker(s) [2] stopped responding");
}
