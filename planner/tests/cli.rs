//! The `weft` binary as a user runs it: golden step plans for fixed inputs, and
//! a clear error with a non-zero exit for every kind of bad input.
//!
//! The golden plans and their pictures are insta snapshots
//! (`tests/golden/*.snap`): after an intended change, review them with
//! `cargo insta review`, or accept them all with
//! `INSTA_UPDATE=always cargo test -p weft-planner --test cli`.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn weft(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_weft"))
        .args(args)
        .output()
        .expect("run weft")
}

fn fixture(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("weft-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

/// Fixed inputs whose plans are pinned: (name, lengths, cluster, model, strategy).
const GOLDEN: &[(&str, &str, &str, &str, &str)] = &[
    (
        "mixed-2x4-weft",
        "# one long, several short\n49152\n1200\n800\n3000\n150\n150\n9000\n",
        "2x4:nics=2",
        "llama-7b",
        "weft",
    ),
    (
        "mixed-2x4-static",
        "49152\n1200\n800\n3000\n150\n150\n9000\n",
        "2x4:nics=2",
        "llama-7b",
        "static",
    ),
    (
        "hetero-hdp",
        "40000\n20000\n5000\n5000\n700\n",
        "1x8:nics=8+1x4:gpu=a100-80g,nics=2",
        "llama-13b",
        "hdp",
    ),
    (
        "wiki-like-flexsp",
        "300\n1200\n90\n4000\n18000\n700\n2500\n150\n60000\n900\n",
        "2x8:nics=8",
        "llama-7b",
        "flexsp",
    ),
    (
        "long-zeppelin",
        "240000\n2000\n2000\n",
        "4x8:nics=8",
        "llama-7b",
        "zeppelin",
    ),
];

#[test]
fn golden_plans_for_fixed_inputs() {
    for (name, lengths, cluster, model, strategy) in GOLDEN {
        let file = fixture(&format!("{name}.txt"), lengths);
        let out = weft(&[
            "plan",
            "--lengths",
            file.to_str().unwrap(),
            "--cluster",
            cluster,
            "--model",
            model,
            "--strategy",
            strategy,
            "--format",
            "json",
            "--svg",
            file.with_extension("svg").to_str().unwrap(),
        ]);
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let plan = String::from_utf8(out.stdout).unwrap();
        // Its picture too (one of them has remaps).
        let picture = std::fs::read_to_string(file.with_extension("svg")).unwrap();
        golden_plan(name, &plan);
        golden_picture(name, &picture);
    }
}

#[test]
fn plan_table_and_simulate_json_have_what_users_read() {
    let file = fixture("few.txt", "100000\n3000\n200\n");
    let out = weft(&[
        "plan",
        "--lengths",
        file.to_str().unwrap(),
        "--cluster",
        "2x8",
        "--model",
        "llama-7b",
    ]);
    assert!(out.status.success());
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(
        table.contains("strategy weft on 16 GPUs: 3 sequences"),
        "{table}"
    );
    assert!(table.contains("lower bound"));
    let out = weft(&[
        "simulate",
        "--lengths",
        file.to_str().unwrap(),
        "--cluster",
        "2x8",
        "--model",
        "llama-7b",
        "--tokens-per-step",
        "50000",
        "--steps",
        "3",
        "--seed",
        "4",
        "--format",
        "json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(report["lower_bound_s"].as_f64().unwrap() > 0.0);
    let names: Vec<&str> = report["strategies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["static", "hdp", "hdp-offload", "flexsp", "zeppelin", "weft"]
    );
    for s in report["strategies"].as_array().unwrap() {
        for key in [
            "step_time_s",
            "vs_lower_bound",
            "max_over_mean",
            "comm_fraction",
            "peak_mem_gib",
            "planner_ms",
        ] {
            assert!(s[key].is_number(), "{key} missing in {s}");
        }
        assert!(s["vs_lower_bound"].as_f64().unwrap() >= 1.0 - 1e-9);
    }
}

#[test]
fn bad_inputs_exit_non_zero_naming_the_problem() {
    let good = fixture("good.txt", "1000\n2000\n");
    let empty = fixture("empty.txt", "# nothing here\n\n");
    let zero = fixture("zero.txt", "1000\n0\n");
    let garbage = fixture("garbage.txt", "1000\nlots\n");
    let huge = fixture("huge.txt", "100\n90000000\n");
    let good = good.to_str().unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec![
                "--lengths",
                empty.to_str().unwrap(),
                "--cluster",
                "2x8",
                "--model",
                "llama-7b",
            ],
            "holds no sequence lengths",
        ),
        (
            vec![
                "--lengths",
                zero.to_str().unwrap(),
                "--cluster",
                "2x8",
                "--model",
                "llama-7b",
            ],
            "zero.txt:2",
        ),
        (
            vec![
                "--lengths",
                garbage.to_str().unwrap(),
                "--cluster",
                "2x8",
                "--model",
                "llama-7b",
            ],
            "\"lots\"",
        ),
        (
            vec![
                "--lengths",
                "/no/such/file",
                "--cluster",
                "2x8",
                "--model",
                "llama-7b",
            ],
            "could not read /no/such/file",
        ),
        (
            vec![
                "--lengths",
                huge.to_str().unwrap(),
                "--cluster",
                "2x8",
                "--model",
                "llama-7b",
            ],
            "cannot fit even on the whole cluster",
        ),
        (
            vec!["--lengths", good, "--cluster", "2x8", "--model", "gpt-9"],
            "unknown model preset \"gpt-9\"",
        ),
        (
            vec![
                "--lengths",
                good,
                "--cluster",
                "2x8:gpu=v100",
                "--model",
                "llama-7b",
            ],
            "unknown GPU preset \"v100\"",
        ),
        (
            vec![
                "--lengths",
                good,
                "--cluster",
                "lots",
                "--model",
                "llama-7b",
            ],
            "NODESxGPUS",
        ),
        (
            vec![
                "--lengths",
                good,
                "--cluster",
                "1x8",
                "--model",
                "llama-70b",
            ],
            "does not fit on 8 GPUs",
        ),
        (
            vec![
                "--lengths",
                good,
                "--cluster",
                "2x8",
                "--model",
                "llama-7b",
                "--strategy",
                "magic",
            ],
            "invalid value 'magic' for '--strategy <STRATEGY>'",
        ),
    ];
    for (args, expected) in cases {
        let mut all = vec!["plan"];
        all.extend(args.iter().copied());
        let out = weft(&all);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{all:?} succeeded");
        assert!(
            stderr.contains(expected),
            "{all:?}: {stderr:?} should mention {expected:?}"
        );
    }
    let out = weft(&[
        "simulate",
        "--lengths",
        good,
        "--cluster",
        "2x8",
        "--model",
        "llama-7b",
        "--tokens-per-step",
        "0",
        "--steps",
        "1",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--tokens-per-step must be at least 1"));
}

/// `weft plan` of `lengths` on one node of 4 GPUs for the tiny model, with `extra` flags.
fn plan_tiny(lengths: &str, extra: &[&str]) -> Output {
    let mut args = vec![
        "plan",
        "--lengths",
        lengths,
        "--cluster",
        "1x4",
        "--model",
        "tiny",
    ];
    args.extend(extra);
    weft(&args)
}

/// The predicted step time of [`plan_tiny`] with `extra` flags.
fn predicted_step(lengths: &str, extra: &[&str]) -> f64 {
    let mut args = vec!["--format", "json"];
    args.extend(extra);
    let out = plan_tiny(lengths, &args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    plan["predicted"]["step_time_s"].as_f64().unwrap()
}

#[test]
fn a_profile_prices_the_plan_at_the_measured_speeds() {
    let lengths = fixture("profiled.txt", "4000\n1000\n700\n300\n");
    let lengths = lengths.to_str().unwrap();
    let datasheet = predicted_step(lengths, &[]);
    // A device a thousand times slower than an H100 at the default
    // efficiencies (0.55 and 0.40 of 989 TFLOP/s).
    let profile = fixture(
        "slow.json",
        r#"{"version": 1, "device": "a slow test device", "linear_tflops": 0.544,
            "attention_tflops": 0.396, "link_gbytes_per_s": 0.36, "p2p_latency_s": 0.015}"#,
    );
    let profiled = predicted_step(lengths, &["--profile", profile.to_str().unwrap()]);
    let ratio = profiled / datasheet;
    assert!(
        (900.0..1100.0).contains(&ratio),
        "{profiled} / {datasheet} = {ratio}"
    );
    // A bad profile is refused, naming the file and the field.
    let bad = fixture(
        "bad.json",
        r#"{"version": 1, "device": "x", "linear_tflops": -1, "attention_tflops": 1,
            "link_gbytes_per_s": 1, "p2p_latency_s": 0.001}"#,
    );
    let out = plan_tiny(lengths, &["--profile", bad.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("bad.json") && stderr.contains("linear_tflops is -1"),
        "{stderr}"
    );
}

/// The snapshots' settings: kept in `tests/golden`, named as the test names them.
fn in_golden_dir(check: impl FnOnce()) {
    let mut settings = insta::Settings::clone_current();
    settings.set_snapshot_path(golden_dir());
    settings.set_prepend_module_to_snapshot(false);
    settings.set_omit_expression(true);
    settings.bind(check);
}

/// Holds a plan's JSON to the snapshot `NAME-plan` (a diff on failure).
fn golden_plan(name: &str, plan: &str) {
    in_golden_dir(|| insta::assert_snapshot!(format!("{name}-plan"), plan));
}

/// Holds a picture to the snapshot `NAME-picture`, kept as an SVG file of
/// its own (`NAME-picture.snap.svg`), which a browser opens as it is (see
/// the rendering test below).
fn golden_picture(name: &str, drawn: &str) {
    in_golden_dir(|| {
        insta::assert_binary_snapshot!(&format!("{name}-picture.svg"), drawn.as_bytes().to_vec())
    });
}

/// Panics with weft's error output unless it succeeded.
fn succeeded(out: &Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The picture of a fixed plan is pinned (golden SVG), and a plan of 1,024
/// ranks is drawn one row per node, saying so.
#[test]
fn plans_are_drawn_as_pictures() {
    let lengths = fixture(
        "draw-lengths.txt",
        "49152\n1200\n800\n3000\n150\n150\n9000\n",
    );
    let dir = std::env::temp_dir().join(format!("weft-cli-svg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let svg = dir.join("mixed.svg");
    let out = weft(&[
        "plan",
        "--lengths",
        lengths.to_str().unwrap(),
        "--cluster",
        "2x4:nics=2",
        "--model",
        "llama-7b",
        "--format",
        "json",
        "--svg",
        svg.to_str().unwrap(),
    ]);
    succeeded(&out);
    let drawn = std::fs::read_to_string(&svg).unwrap();
    golden_picture("mixed-2x4-weft", &drawn);
    for part in [
        "<title>micro-batch 0: sequence 0 (49152 tokens)",
        "lower bound",
        "url(#exposed)",
    ] {
        assert!(drawn.contains(part), "missing {part}");
    }
    // `weft draw` draws the same picture from the plan's JSON.
    let plan = dir.join("mixed.json");
    std::fs::write(&plan, &out.stdout).unwrap();
    let again = dir.join("again.svg");
    let out = weft(&[
        "draw",
        plan.to_str().unwrap(),
        "--svg",
        again.to_str().unwrap(),
    ]);
    succeeded(&out);
    assert_eq!(std::fs::read_to_string(&again).unwrap(), drawn);

    // A simulation: every strategy per step against the bound.
    let sim = dir.join("sim.svg");
    let out = weft(&[
        "simulate",
        "--lengths",
        lengths.to_str().unwrap(),
        "--cluster",
        "2x4:nics=2",
        "--model",
        "llama-7b",
        "--tokens-per-step",
        "80000",
        "--steps",
        "3",
        "--svg",
        sim.to_str().unwrap(),
    ]);
    succeeded(&out);
    let drawn_sim = std::fs::read_to_string(&sim).unwrap();
    golden_picture("simulate-2x4", &drawn_sim);
    for strategy in ["static", "hdp", "hdp-offload", "flexsp", "zeppelin", "weft"] {
        assert!(
            drawn_sim.contains(&format!(
                "fill=\"{}\"",
                weft_planner::picture::strategy_colour(strategy)
            )),
            "{strategy} is not drawn in its colour"
        );
    }

    // 1,024 ranks: one row per node.
    let many: String = (0..2048)
        .map(|i| format!("{}\n", 500 + (i * 7919) % 30000))
        .collect();
    let many = fixture("draw-many.txt", &many);
    let big = dir.join("big.svg");
    let out = weft(&[
        "plan",
        "--lengths",
        many.to_str().unwrap(),
        "--cluster",
        "128x8:nics=8",
        "--model",
        "llama-7b",
        "--svg",
        big.to_str().unwrap(),
    ]);
    succeeded(&out);
    let drawn = std::fs::read_to_string(&big).unwrap();
    assert!(drawn.contains("1024 ranks are too many to draw one each"));
    let rows = drawn.matches("text-anchor=\"end\"").count();
    assert_eq!(rows, 128, "one row per node");

    // Bad input: a file that is not a plan, a path that cannot be written;
    // nothing is left half-written.
    let not_a_plan = fixture("not-a-plan.json", "{\"x\": 1}");
    let target = dir.join("never.svg");
    let out = weft(&[
        "draw",
        not_a_plan.to_str().unwrap(),
        "--svg",
        target.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a step plan"));
    assert!(!target.exists());
    let out = weft(&[
        "draw",
        plan.to_str().unwrap(),
        "--svg",
        "/nonexistent-dir/p.svg",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot write /nonexistent-dir/p.svg"));
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".partial-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// Width and height of a PNG, from its header.
fn png_size(png: &[u8]) -> (u32, u32) {
    assert!(png.len() > 24 && &png[1..4] == b"PNG", "not a PNG");
    let be = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    (be(&png[16..20]), be(&png[20..24]))
}

/// Every golden picture opens in a real browser (Debian's Chromium, which
/// scripts/test installs): as an image it loads, at the size it declares,
/// and it renders to a PNG.
#[test]
fn the_golden_pictures_render_in_a_browser() {
    let browser = ["chromium", "chromium-browser"]
        .into_iter()
        .find(|b| Command::new(b).arg("--version").output().is_ok_and(|o| o.status.success()))
        .expect("Chromium is needed to check the pictures (apt-get install chromium; scripts/test installs it)");
    let dir = std::env::temp_dir().join(format!("weft-cli-browser-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let profile = dir.join("profile");
    // Chromium refuses to run sandboxed as root: when the tests run as root
    // (a container, a CI job) it runs without its sandbox; otherwise with it.
    let as_root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    // Bounded: a browser that hangs fails the test rather than the suite.
    let run = |args: &[String]| {
        Command::new("timeout")
            .arg("60")
            .arg(browser)
            .args(["--headless", "--disable-gpu", "--hide-scrollbars"])
            .args(as_root.then_some("--no-sandbox"))
            .arg(format!("--user-data-dir={}", profile.display()))
            .args(args)
            .output()
            .unwrap()
    };
    let mut checked = 0;
    // The golden pictures, and the README's (docs/).
    let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs");
    let entries: Vec<PathBuf> = [golden_dir(), docs]
        .iter()
        .flat_map(|dir| std::fs::read_dir(dir).unwrap())
        .map(|e| e.unwrap().path())
        .collect();
    for path in entries {
        // Not a picture, or one awaiting review (`NAME.snap.new.svg`).
        let name = path.file_name().unwrap().to_string_lossy();
        if path.extension().and_then(|e| e.to_str()) != Some("svg") || name.contains(".snap.new") {
            continue;
        }
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(&path).unwrap();
        let attribute = |name: &str| -> u32 {
            let at = text.find(&format!(" {name}=\"")).unwrap() + name.len() + 3;
            let end = text[at..].find('"').unwrap();
            text[at..at + end].parse::<f64>().unwrap().round() as u32
        };
        let (width, height) = (attribute("width"), attribute("height"));
        // Loaded as an image, as a page embeds it: a picture the browser
        // cannot parse fails to load; one that loads reports its size.
        let page = dir.join(format!("{name}.html"));
        std::fs::write(
            &page,
            format!(
                "<!doctype html><body><img id=p src=\"file://{}\" \
                 onload=\"document.body.dataset.size=this.naturalWidth+'x'+this.naturalHeight\" \
                 onerror=\"document.body.dataset.size='error'\"></body>",
                path.display()
            ),
        )
        .unwrap();
        let dom = run(&[
            "--allow-file-access-from-files".to_string(),
            "--virtual-time-budget=5000".to_string(),
            "--dump-dom".to_string(),
            format!("file://{}", page.display()),
        ]);
        let dom = String::from_utf8_lossy(&dom.stdout);
        assert!(
            dom.contains(&format!("data-size=\"{width}x{height}\"")),
            "{name}: the browser did not load the picture at {width}x{height}: {dom}"
        );
        // And rendered to a PNG of its own.
        let png = dir.join(format!("{name}.png"));
        let _ = std::fs::remove_file(&png);
        let out = run(&[
            format!("--screenshot={}", png.display()),
            format!("--window-size={width},{height}"),
            format!("file://{}", path.display()),
        ]);
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let shot = std::fs::read(&png).unwrap();
        assert_eq!(png_size(&shot), (width, height), "{name}");
        checked += 1;
    }
    assert!(checked >= 3, "the golden and README pictures are missing");
}

/// The README's plan picture is the one weft draws today for its input
/// (`scripts/plan-picture` draws it again, and its PNG, after a change).
#[test]
fn the_readme_plan_picture_is_current() {
    let lengths = fixture(
        "readme-lengths.txt",
        "65536\n1200\n800\n3000\n150\n150\n9000\n20000\n4000\n33000\n700\n",
    );
    let svg = lengths.with_extension("svg");
    let out = weft(&[
        "plan",
        "--lengths",
        lengths.to_str().unwrap(),
        "--cluster",
        "2x8:nics=8",
        "--model",
        "llama-7b",
        "--svg",
        svg.to_str().unwrap(),
    ]);
    succeeded(&out);
    let committed = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/plan-example.svg");
    assert!(
        std::fs::read_to_string(&svg).unwrap() == std::fs::read_to_string(&committed).unwrap(),
        "docs/plan-example.svg is out of date: run scripts/plan-picture"
    );
}

/// `weft plan` takes a job's limits as flags, and StreamBP's chunk: a cap
/// the longest sequence cannot keep is refused by its name, and StreamBP
/// lets the same batch plan within it.
#[test]
fn plan_takes_the_jobs_limits_and_streambp() {
    let lengths = fixture("limits.txt", "98304\n4096\n8192\n2048\n");
    let lengths = lengths.to_str().unwrap();
    let plan = |extra: &[&str]| {
        let mut args = vec![
            "plan",
            "--lengths",
            lengths,
            "--cluster",
            "2x8:nics=8",
            "--model",
            "llama-7b",
        ];
        args.extend(extra);
        weft(&args)
    };
    let refused = plan(&["--max-cp-degree", "4"]);
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("parallelism.maxCpDegree (--max-cp-degree) allows 4"),
        "{err}"
    );
    // The plan as JSON, of a run that must succeed.
    let plan_json = |extra: &[&str]| -> serde_json::Value {
        let mut args = extra.to_vec();
        args.extend(["--format", "json"]);
        let out = plan(&args);
        succeeded(&out);
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let json = plan_json(&["--max-cp-degree", "4", "--stream-bp-chunk", "8192"]);
    let widest = json["sequences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["degree"].as_u64().unwrap())
        .max()
        .unwrap();
    assert!(widest <= 4, "{widest}");
    let json = plan_json(&["--no-nic-routing"]);
    assert!(
        json["routes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["legs"].as_array().unwrap().len() == 1)
    );
    let json = plan_json(&["--strategy", "static", "--cp-degree", "16"]);
    assert!(
        json["sequences"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["degree"] == 16)
    );
}

/// With a StreamBP chunk, `simulate` reports weft choosing per ring against
/// streaming every ring and none, and `plan` records each ring's choice;
/// `--stream-bp off` with a chunk is refused by both flags' names.
#[test]
fn simulate_reports_streambp_per_ring_against_always_and_never() {
    // One node; documents longer than plain backprop holds there, and many
    // short ones.
    let mut text = "120000\n".repeat(20);
    text.push_str(&"2000\n".repeat(300));
    let file = fixture("per-ring.txt", &text);
    let file = file.to_str().unwrap();
    let common = ["--lengths", file, "--cluster", "1x8", "--model", "llama-7b"];
    let mut args = vec!["simulate"];
    args.extend(common);
    args.extend([
        "--tokens-per-step",
        "800000",
        "--steps",
        "1",
        "--stream-bp-chunk",
        "4096",
        "--format",
        "json",
    ]);
    let out = weft(&args);
    succeeded(&out);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let stream = &report["stream_bp"];
    let (per_ring, always) = (
        stream["per_ring_s"].as_f64().unwrap(),
        stream["always_s"].as_f64().unwrap(),
    );
    assert!(per_ring <= always, "{stream}");
    let share = stream["streamed_ring_share"].as_f64().unwrap();
    assert!(share > 0.0 && share <= 1.0, "{stream}");
    let mut table_args = args.clone();
    table_args.truncate(table_args.len() - 2);
    let table = String::from_utf8(weft(&table_args).stdout).unwrap();
    assert!(table.contains("StreamBP per ring (weft):"), "{table}");
    assert!(table.contains("every ring streamed:"), "{table}");

    let mut plan_args = vec!["plan"];
    plan_args.extend(common);
    plan_args.extend(["--stream-bp-chunk", "4096", "--format", "json"]);
    let out = weft(&plan_args);
    succeeded(&out);
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let chunks: Vec<u64> = plan["micro_batches"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|m| m["groups"].as_array().unwrap())
        .map(|g| g["stream_bp_chunk"].as_u64().unwrap_or(0))
        .collect();
    // Streamed rings take the job's chunk times a power of two.
    assert!(chunks.contains(&0), "{chunks:?}");
    assert!(
        chunks
            .iter()
            .any(|c| *c >= 4096 && c % 4096 == 0 && (c / 4096).is_power_of_two()),
        "{chunks:?}"
    );
    assert!(
        chunks
            .iter()
            .all(|c| *c == 0 || (c % 4096 == 0 && (c / 4096).is_power_of_two())),
        "{chunks:?}"
    );

    let mut refused = vec!["plan"];
    refused.extend(common);
    refused.extend(["--stream-bp", "off", "--stream-bp-chunk", "64"]);
    let out = weft(&refused);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--stream-bp-chunk") && err.contains("--stream-bp off"),
        "{err}"
    );
}

#[test]
fn lengths_draws_the_family_and_refuses_a_cap_it_cannot_use() {
    let out = weft(&[
        "lengths",
        "--synthetic",
        "at-cap-75",
        "--count",
        "2000",
        "--seed",
        "3",
        "--cap",
        "131072",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let lengths: Vec<u64> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| l.parse().unwrap())
        .collect();
    assert_eq!(lengths.len(), 2000);
    assert!(lengths.iter().all(|s| *s <= 131_072));
    assert!(lengths.contains(&131_072));
    for (args, names) in [
        (vec!["--synthetic", "byted", "--cap", "131072"], "byted"),
        (vec!["--synthetic", "at-cap-30"], "at-cap-30"),
    ] {
        let mut all = vec!["lengths", "--count", "5"];
        all.extend(args);
        let out = weft(&all);
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(names), "{stderr}");
    }
}
