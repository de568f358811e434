//! Hugging Face models against their reference: tiny Llama, Llama 3 (rope
//! scaling, tied embeddings), YaRN (twice: with mscale and no truncation),
//! linear scaling in the old config form, Mistral and Qwen2 (biases), built with `transformers` by
//! `tests/reference/hf_models.py`. weft reads each directory and computes
//! the same logits, loss and gradients; what it saves, `transformers` reads
//! back to the same loss; a directory that does not fit its config is
//! refused by name.
//!
//! The reference runs in the Python environment `scripts/setup-reference`
//! installs (`scripts/test` sets `WEFT_REFERENCE_PYTHON` to it).

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use tch::{Device, Kind, Tensor, nn};
use weft_trainer::hf;

fn python() -> PathBuf {
    let python = std::env::var_os("WEFT_REFERENCE_PYTHON").expect(
        "WEFT_REFERENCE_PYTHON must name a Python with transformers: scripts/setup-reference installs one and prints it (scripts/test sets it)",
    );
    PathBuf::from(python)
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference/hf_models.py")
}

/// What `hf_models.py ARGS` prints last (a JSON object), once it succeeded.
fn reference_says(args: &[&std::ffi::OsStr]) -> serde_json::Value {
    let run = Command::new(python())
        .arg(script())
        .args(args)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "hf_models.py {args:?} (its environment, with transformers and pyarrow, is scripts/setup-reference's): {}",
        String::from_utf8_lossy(&run.stderr)
    );
    let line = run
        .stdout
        .split(|b| *b == b'\n')
        .rfind(|l| !l.is_empty())
        .unwrap();
    serde_json::from_slice(line).unwrap()
}

/// The reference models, made once per test run.
fn models() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        // What earlier runs, now gone, left behind.
        if let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if let Some(pid) = name.strip_prefix("weft-hf-")
                    && pid.parse::<u32>().is_ok()
                    && !Path::new("/proc").join(pid).exists()
                {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
        let dir = std::env::temp_dir().join(format!("weft-hf-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let out = Command::new(python())
            .arg(script())
            .arg("make")
            .arg(&dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "the reference models were not made: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        dir
    })
}

const MODELS: [&str; 8] = [
    "llama-gqa",
    "llama3-tied",
    "llama-yarn",
    "llama-yarn-mscale",
    "llama-linear-old-form",
    "llama-dynamic",
    "mistral",
    "qwen2-bias-tied",
];

fn reference(dir: &Path) -> Vec<(String, Tensor)> {
    Tensor::read_safetensors(dir.join("reference.safetensors")).unwrap()
}

fn get<'a>(reference: &'a [(String, Tensor)], name: &str) -> &'a Tensor {
    &reference.iter().find(|(n, _)| n == name).unwrap().1
}

/// max |a − b| / max |b|.
fn relative(a: &Tensor, b: &Tensor) -> f64 {
    let scale = b.abs().max().double_value(&[]).max(1e-30);
    (a - b).abs().max().double_value(&[]) / scale
}

fn load(dir: &Path) -> (nn::VarStore, weft_trainer::model::Llama, hf::HfConfig) {
    let vs = nn::VarStore::new(Device::Cpu);
    let (model, config) = hf::load(dir, &vs.root(), Device::Cpu).unwrap();
    (vs, model, config)
}

/// weft's logits, loss and every gradient equal `transformers'` on a batch
/// of packed documents (each from position 0, none seeing another), in
/// fp32, for every architecture and rope setting.
#[test]
fn weft_computes_what_transformers_computes() {
    for name in MODELS {
        let dir = models().join(name);
        let (vs, model, config) = load(&dir);
        assert_eq!(vs.trainable_variables().len(), model.hf_parameters().len());
        let reference = reference(&dir);
        let tokens = get(&reference, "tokens");
        let documents: Vec<i64> = Vec::try_from(get(&reference, "documents")).unwrap();
        let logits = model.forward(tokens, &documents).unwrap().squeeze_dim(0);
        let error = relative(&logits, get(&reference, "logits"));
        println!("{name}: logits within {error:.1e} of transformers'");
        assert!(error <= 1e-5, "{name}: logits {error:e}");
        let loss = model.loss(tokens, &documents).unwrap();
        let expected = get(&reference, "loss").double_value(&[0]);
        let error = (loss.double_value(&[]) - expected).abs() / expected;
        assert!(error <= 1e-5, "{name}: loss {error:e}");
        loss.backward();
        let mut worst: f64 = 0.0;
        for (param, tensor) in model.hf_parameters() {
            let error = relative(&tensor.grad(), get(&reference, &format!("grad.{param}")));
            assert!(error <= 1e-5, "{name}: gradient of {param} {error:e}");
            worst = worst.max(error);
        }
        println!("{name}: every gradient within {worst:.1e}");
        // The architecture read is the one the reference has.
        match name {
            "qwen2-bias-tied" => {
                assert!(config.architecture.qkv_bias && config.architecture.tied_embeddings)
            }
            "llama3-tied" => assert!(config.architecture.tied_embeddings),
            _ => assert!(!config.architecture.tied_embeddings),
        }
    }
}

/// Changed weights saved by weft (in shards) load into `transformers`
/// unchanged, which computes the loss weft computes on a new batch.
#[test]
fn what_weft_saves_transformers_reads() {
    for name in ["llama-gqa", "qwen2-bias-tied", "llama3-tied"] {
        let source = models().join(name);
        let (_vs, model, config) = load(&source);
        // A step of plain gradient descent, so the saved weights are weft's.
        let reference = reference(&source);
        let tokens = get(&reference, "tokens");
        let documents: Vec<i64> = Vec::try_from(get(&reference, "documents")).unwrap();
        model.loss(tokens, &documents).unwrap().backward();
        tch::no_grad(|| {
            for (_, p) in model.hf_parameters() {
                let _ = p.shallow_clone().f_sub_(&(p.grad() * 0.5)).unwrap();
            }
        });
        let out = models().join(format!("{name}-saved"));
        hf::save(&model, &config, Some(&source), &out, 60_000).unwrap();
        let files: Vec<String> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            files.iter().any(|f| f == "model.safetensors.index.json"),
            "{files:?}"
        );
        // A new batch: every document again, shifted by one token.
        let ids: Vec<i64> = Vec::try_from(tokens).unwrap();
        let mut docs = Vec::new();
        let mut start = 0;
        for n in &documents {
            let n = *n as usize;
            let doc: Vec<i64> = ids[start..start + n].iter().map(|t| (t + 1) % 97).collect();
            docs.push(doc);
            start += n;
        }
        let docs_file = out.with_extension("docs.json");
        std::fs::write(&docs_file, serde_json::to_string(&docs).unwrap()).unwrap();
        let theirs = reference_says(&["loss".as_ref(), out.as_os_str(), docs_file.as_os_str()]);
        let theirs = theirs["loss"].as_f64().unwrap();
        let flat: Vec<i64> = docs.concat();
        let ours = model
            .loss(&Tensor::from_slice(&flat), &documents)
            .unwrap()
            .double_value(&[]);
        assert!(
            ((ours - theirs) / theirs).abs() <= 1e-5,
            "{name}: weft {ours}, transformers {theirs}"
        );
        // weft reads back what it wrote.
        let (_vs, again, _) = load(&out);
        for ((n, a), (_, b)) in model.hf_parameters().iter().zip(again.hf_parameters()) {
            assert!(relative(a, &b) == 0.0, "{name}: {n} changed on the way");
        }
        // And refuses to write over a directory.
        let err = hf::save(&model, &config, None, &out, 60_000).unwrap_err();
        assert!(err.to_string().contains("already exists"), "{err}");
    }
}

/// Copies the reference model `name` into a new directory to damage.
fn copy_of(name: &str, as_name: &str) -> PathBuf {
    let from = models().join(name);
    let to = models().join(as_name);
    let _ = std::fs::remove_dir_all(&to);
    std::fs::create_dir_all(&to).unwrap();
    for entry in std::fs::read_dir(&from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
    to
}

fn refused(dir: &Path) -> String {
    let vs = nn::VarStore::new(Device::Cpu);
    match hf::load(dir, &vs.root(), Device::Cpu) {
        Ok(_) => panic!("{} was loaded", dir.display()),
        Err(e) => e.to_string(),
    }
}

/// A missing shard, a tensor of the wrong shape or dtype, a tensor the
/// architecture has no place for, a missing tensor, an architecture or rope
/// type weft does not compute: each refused naming the file, the tensor and
/// what was expected.
#[test]
fn a_damaged_model_directory_is_refused_by_name() {
    // A missing shard.
    let dir = copy_of("llama-gqa", "no-shard");
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("model.safetensors.index.json")).unwrap())
            .unwrap();
    let shard = index["weight_map"]["model.norm.weight"]
        .as_str()
        .unwrap()
        .to_string();
    std::fs::remove_file(dir.join(&shard)).unwrap();
    let err = refused(&dir);
    assert!(
        err.contains(&shard) && err.contains("No such file"),
        "{err}"
    );

    // A tensor of the wrong shape, of an unreadable dtype, one the model has
    // no place for, one missing.
    let write = |name: &str, tensors: Vec<(&str, Tensor)>| {
        let dir = copy_of("mistral", name);
        let path = dir.join("model.safetensors");
        let mut all = Tensor::read_safetensors(&path).unwrap();
        for (name, tensor) in tensors {
            all.retain(|(n, _)| n != name);
            if tensor.numel() > 0 {
                all.push((name.to_string(), tensor));
            }
        }
        Tensor::write_safetensors(&all, &path).unwrap();
        dir
    };
    let err = refused(&write(
        "wrong-shape",
        vec![(
            "model.layers.1.self_attn.k_proj.weight",
            Tensor::zeros([64, 64], (Kind::Float, Device::Cpu)),
        )],
    ));
    assert!(
        err.contains("model.safetensors")
            && err.contains("model.layers.1.self_attn.k_proj.weight")
            && err.contains("[64, 64]")
            && err.contains("[32, 64]"),
        "{err}"
    );
    let err = refused(&write(
        "wrong-dtype",
        vec![(
            "model.norm.weight",
            Tensor::zeros([64], (Kind::Int64, Device::Cpu)),
        )],
    ));
    assert!(err.contains("model.norm.weight is I64"), "{err}");
    let err = refused(&write(
        "stray",
        vec![(
            "model.layers.0.self_attn.q_proj.bias",
            Tensor::zeros([64], (Kind::Float, Device::Cpu)),
        )],
    ));
    assert!(
        err.contains(
            "model.layers.0.self_attn.q_proj.bias is not a weight of this MistralForCausalLM"
        ),
        "{err}"
    );
    let err = refused(&write(
        "missing",
        vec![(
            "lm_head.weight",
            Tensor::zeros([0], (Kind::Float, Device::Cpu)),
        )],
    ));
    assert!(err.contains("no file holds tensor lm_head.weight"), "{err}");

    // No weights at all; a config weft does not compute.
    let dir = copy_of("mistral", "no-weights");
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    assert!(
        refused(&dir).contains("has neither model.safetensors nor model.safetensors.index.json")
    );
    let edit = |name: &str, change: &dyn Fn(&mut serde_json::Value)| {
        let dir = copy_of("llama-gqa", name);
        let path = dir.join("config.json");
        let mut config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        change(&mut config);
        std::fs::write(&path, config.to_string()).unwrap();
        refused(&dir)
    };
    let err = edit("gpt2", &|c| {
        c["architectures"] = serde_json::json!(["GPT2LMHeadModel"])
    });
    assert!(
        err.contains("architecture \"GPT2LMHeadModel\" is not supported"),
        "{err}"
    );
    let err =
        edit(
            "longrope",
            &|c| {
                c["rope_parameters"] =
                    serde_json::json!({"rope_type": "longrope", "rope_theta": 10000.0})
            },
        );
    assert!(
        err.contains("rope type \"longrope\" is not supported"),
        "{err}"
    );
    let err = edit("bad-json", &|c| *c = serde_json::json!([1, 2]));
    assert!(
        err.contains("config.json") && err.contains("not a JSON object"),
        "{err}"
    );
}

fn trainer() -> Command {
    Command::new(env!("CARGO_BIN_EXE_weft-trainer"))
}

/// The loss of every step a `local` run reports in its metrics file.
fn losses(metrics: &Path) -> Vec<f64> {
    std::fs::read_to_string(metrics)
        .unwrap()
        .lines()
        .map(|line| {
            serde_json::from_str::<serde_json::Value>(line).unwrap()["loss"]
                .as_f64()
                .unwrap()
        })
        .collect()
}

/// `transformers`' loss over the reference corpus with the model in `dir`.
fn corpus_loss(dir: &Path) -> f64 {
    let corpus = models().join("corpus");
    let value = reference_says(&["corpus-loss".as_ref(), dir.as_os_str(), corpus.as_os_str()]);
    value["loss"].as_f64().unwrap()
}

/// Runs `local --model MODEL` over the reference corpus, each step holding
/// all of it (`--tokens-per-step` is its token count), with `flags`, its
/// metrics into `metrics`; once it succeeded, what it told the person
/// running it (its standard error).
fn local_on_corpus(model: &Path, flags: &[&str], metrics: &Path) -> String {
    let tokens = std::fs::read_to_string(models().join("corpus-tokens.txt")).unwrap();
    let out = trainer()
        .arg("local")
        .arg("--model")
        .arg(model)
        .arg("--data")
        .arg(models().join("corpus"))
        .args(["--tokens-per-step", tokens.trim()])
        .arg("--metrics")
        .arg(metrics)
        .args(flags)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `local --model DIR` trains a Hugging Face model with its own tokenizer
/// on the distributed engine: on 3 ranks whose rings split the documents
/// (context parallelism), the first step's loss over the whole corpus is
/// `transformers'`; `--save` writes what 2 steps trained, and
/// `transformers` computes on it the loss a run on 2 ranks reports for its
/// third step.
#[test]
fn local_trains_a_hugging_face_model_with_its_tokenizer_and_saves_it() {
    let model = models().join("llama-tokenized");
    // One step is the whole corpus, each document whole.
    let run = |ranks: &str, steps: &str, extra: &[&str], metrics: &Path| {
        let mut flags = vec!["--ranks", ranks, "--steps", steps, "--rank-tokens", "40"];
        flags.extend(["--max-seq-len", "64"]);
        flags.extend(extra);
        local_on_corpus(&model, &flags, metrics)
    };
    let saved = models().join("trained");
    let _ = std::fs::remove_dir_all(&saved);
    let three = models().join("three.jsonl");
    let said = run("3", "2", &["--save", saved.to_str().unwrap()], &three);
    assert!(said.contains("saved the trained model into"), "{said}");
    let metrics: Vec<serde_json::Value> = std::fs::read_to_string(&three)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        metrics
            .iter()
            .all(|m| m["max_cp_degree"].as_u64().unwrap() > 1),
        "no document was split over ranks: {metrics:?}"
    );
    let first = losses(&three)[0];
    let reference = corpus_loss(&model);
    println!("step 1 on 3 ranks: weft {first}, transformers {reference}");
    assert!(((first - reference) / reference).abs() <= 1e-5);

    let two = models().join("two.jsonl");
    run("2", "3", &[], &two);
    let third = losses(&two)[2];
    let reference = corpus_loss(&saved);
    println!(
        "after 2 steps: weft {third} (step 3 on 2 ranks), transformers {reference} (what weft saved)"
    );
    assert!(((third - reference) / reference).abs() <= 1e-5);
}

/// What `local` refuses before any rank starts: `--save` without a
/// Hugging Face model or into a directory that exists, a model without its
/// tokenizer, a tokenizer with ids past the embedding.
#[test]
fn local_refuses_what_it_cannot_train_or_save_by_name() {
    let refused = |args: &[&std::ffi::OsStr]| {
        let out = trainer()
            .arg("local")
            .args(args)
            .args(["--steps", "1"])
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let os = |s: &str| std::ffi::OsString::from(s);
    let model = models().join("llama-tokenized");
    let err = refused(&[&os("--save"), models().join("nowhere").as_os_str()]);
    assert!(err.contains("--save writes a Hugging Face model"), "{err}");
    let err = refused(&[
        &os("--model"),
        model.as_os_str(),
        &os("--save"),
        models().as_os_str(),
    ]);
    assert!(err.contains("already exists"), "{err}");
    let no_tokenizer = copy_of("llama-tokenized", "no-tokenizer");
    std::fs::remove_file(no_tokenizer.join("tokenizer.json")).unwrap();
    let err = refused(&[&os("--model"), no_tokenizer.as_os_str()]);
    assert!(
        err.contains("tokenizer.json") && err.contains("No such file"),
        "{err}"
    );
    // A damaged model is refused before any rank starts, naming the tensor.
    let damaged = copy_of("llama-tokenized", "tokenized-no-norm");
    let weights = damaged.join("model.safetensors");
    let mut tensors = Tensor::read_safetensors(&weights).unwrap();
    tensors.retain(|(name, _)| name != "model.norm.weight");
    Tensor::write_safetensors(&tensors, &weights).unwrap();
    let err = refused(&[&os("--model"), damaged.as_os_str()]);
    assert!(
        err.contains("no file holds tensor model.norm.weight") && !err.contains("rank"),
        "{err}"
    );
    // A checkpoint resumes only with the architecture it was trained with.
    let checkpoints = models().join("architecture-checkpoints");
    let tokens = std::fs::read_to_string(models().join("corpus-tokens.txt")).unwrap();
    let base = |steps: &str| {
        let mut command = trainer();
        command
            .arg("local")
            .arg("--model")
            .arg(&model)
            .arg("--data")
            .arg(models().join("corpus"))
            .args(["--ranks", "1", "--steps", steps])
            .args(["--tokens-per-step", tokens.trim(), "--max-seq-len", "64"])
            .arg("--checkpoint-dir")
            .arg(&checkpoints);
        command
    };
    let out = base("1").output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = base("2")
        .args(["--resume", "--rope", r#"{"rope_theta": 20000.0}"#])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("it holds a model of architecture") && err.contains("--rope"),
        "{err}"
    );
    let small = copy_of("llama-tokenized", "small-vocabulary");
    let path = small.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    config["vocab_size"] = serde_json::json!(16);
    std::fs::write(&path, config.to_string()).unwrap();
    let err = refused(&[&os("--model"), small.as_os_str()]);
    assert!(
        err.contains("tokenizer.json") && err.contains("embedding has 16 rows (vocab_size)"),
        "{err}"
    );
}

/// `--rope` extends a model's context: the Llama-3-scaled test model run
/// with YaRN (factor 4 over 32 positions) computes, at its first step, the
/// loss `transformers` computes with the same settings written into its
/// config, not the model's own; what weft saves carries them (in the newer
/// form, `max_position_embeddings` raised from 128 to `--max-seq-len`), and
/// `transformers` computes on it the loss weft reports next. Bad settings
/// are refused naming `--rope`.
#[test]
fn rope_extends_the_context_and_the_saved_model_carries_it() {
    let model = models().join("llama-tokenized");
    let yarn = r#"{"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}"#;
    // The reference: the same model with YaRN in its config.
    let reference_dir = copy_of("llama-tokenized", "llama-tokenized-yarn");
    let path = reference_dir.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let theta = config["rope_parameters"]["rope_theta"].clone();
    config["rope_parameters"] = serde_json::json!({
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "rope_theta": theta
    });
    std::fs::write(&path, config.to_string()).unwrap();

    let run = |steps: &str, extra: &[&str], metrics: &Path| {
        let mut flags = vec!["--ranks", "2", "--steps", steps, "--rank-tokens", "128"];
        flags.extend(["--max-seq-len", "150", "--rope", yarn]);
        flags.extend(extra);
        local_on_corpus(&model, &flags, metrics);
    };
    let saved = models().join("extended");
    let _ = std::fs::remove_dir_all(&saved);
    let one = models().join("extended-one.jsonl");
    run("1", &["--save", saved.to_str().unwrap()], &one);
    let first = losses(&one)[0];
    let extended = corpus_loss(&reference_dir);
    let own = corpus_loss(&model);
    println!("step 1 with YaRN: weft {first}, transformers {extended} (its own rope: {own})");
    assert!(((first - extended) / extended).abs() <= 1e-5);
    assert!(((first - own) / own).abs() > 1e-4, "--rope changed nothing");

    let written: serde_json::Value =
        serde_json::from_slice(&std::fs::read(saved.join("config.json")).unwrap()).unwrap();
    assert_eq!(written["rope_parameters"]["rope_type"], "yarn");
    assert_eq!(written["rope_parameters"]["factor"], 4.0);
    assert_eq!(written["max_position_embeddings"], 150);
    assert!(written.get("rope_scaling").is_none());
    let two = models().join("extended-two.jsonl");
    run("2", &[], &two);
    let second = losses(&two)[1];
    let theirs = corpus_loss(&saved);
    assert!(
        ((second - theirs) / theirs).abs() <= 1e-5,
        "weft {second}, transformers {theirs}"
    );

    // Refused by name.
    let refused = |args: &[&str]| {
        let out = trainer()
            .arg("local")
            .args(args)
            .args(["--steps", "1"])
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = refused(&["--rope", yarn]);
    assert!(
        err.contains("--rope changes a Hugging Face model's"),
        "{err}"
    );
    let m = model.to_str().unwrap();
    let err = refused(&["--model", m, "--rope", "yarn"]);
    assert!(err.contains("--rope: not a JSON object"), "{err}");
    let err = refused(&[
        "--model",
        m,
        "--rope",
        r#"{"rope_type": "longrope", "factor": 2.0}"#,
    ]);
    assert!(err.contains("--rope") && err.contains("longrope"), "{err}");
    let err = refused(&["--model", m, "--rope", r#"{"rope_type": "linear"}"#]);
    assert!(
        err.contains("--rope: rope_parameters.factor: is missing"),
        "{err}"
    );
}

/// The distributed engine with biases and tied embeddings, streamed: a
/// Qwen2 model (q/k/v biases, tied embeddings) on 3 ranks whose rings split
/// the documents, every ring streaming its backward (StreamBP in chunks of
/// 8 tokens), starts at `transformers'` loss and follows a plain run on one
/// rank step for step.
#[test]
fn qwen2_trains_alike_on_three_streamed_ranks_and_on_one() {
    let model = models().join("qwen2-tokenized");
    let run = |ranks: &str, extra: &[&str], metrics: &Path| {
        let mut flags = vec!["--ranks", ranks, "--steps", "3", "--max-seq-len", "64"];
        flags.extend(extra);
        local_on_corpus(&model, &flags, metrics);
        losses(metrics)
    };
    let streamed = run(
        "3",
        &[
            "--rank-tokens",
            "12",
            "--stream-bp-chunk",
            "8",
            "--stream-bp",
            "always",
        ],
        &models().join("qwen2-streamed.jsonl"),
    );
    let ran: Vec<serde_json::Value> =
        std::fs::read_to_string(models().join("qwen2-streamed.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
    assert!(
        ran.iter().all(|m| m["max_cp_degree"].as_u64().unwrap() > 1
            && m["streamed_rings"].as_u64().unwrap() > 0),
        "the documents were not split, or not streamed: {ran:?}"
    );
    let plain = run("1", &[], &models().join("qwen2-plain.jsonl"));
    let reference = corpus_loss(&model);
    assert!(((streamed[0] - reference) / reference).abs() <= 1e-5);
    for (step, (a, b)) in streamed.iter().zip(&plain).enumerate() {
        assert!(
            ((a - b) / b).abs() <= 1e-5,
            "step {}: 3 streamed ranks {a}, 1 plain rank {b}",
            step + 1
        );
    }
    println!(
        "qwen2: streamed on 3 ranks {streamed:?}, plain on 1 {plain:?}, transformers {reference}"
    );
}

/// `eval` gives each document's mean next-token loss and its tokens, and
/// the corpus's, on the distributed engine (3 ranks, the longest document
/// split over two), as `transformers` computes them: whole, and cut at
/// `--max-seq-len`; from a JSONL corpus's `--text-field`, the same. Ranks
/// that cannot hold the longest document, and what is not a Hugging Face
/// model, are refused by name before any rank starts.
#[test]
fn eval_gives_each_documents_loss_as_transformers_does() {
    let model = models().join("llama-tokenized");
    let eval = |data: &Path, flags: &[&str]| -> serde_json::Value {
        let out = trainer()
            .arg("eval")
            .arg("--model")
            .arg(&model)
            .arg("--data")
            .arg(data)
            .args(flags)
            .args(["--format", "json"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let reference = |longest: Option<&str>| -> serde_json::Value {
        let corpus = models().join("corpus");
        let mut args = vec![
            "corpus-loss".as_ref(),
            model.as_os_str(),
            corpus.as_os_str(),
        ];
        args.extend(longest.map(std::ffi::OsStr::new));
        reference_says(&args)
    };
    let close = |a: &serde_json::Value, b: &serde_json::Value| {
        let (a, b) = (a.as_f64().unwrap(), b.as_f64().unwrap());
        ((a - b) / b).abs() <= 1e-5
    };
    let agree = |ours: &serde_json::Value, theirs: &serde_json::Value| {
        assert!(
            close(&ours["loss"], &theirs["loss"]),
            "{ours} against {theirs}"
        );
        assert_eq!(ours["tokens"], theirs["tokens"]);
        let (documents, expected) = (
            ours["documents"].as_array().unwrap(),
            theirs["documents"].as_array().unwrap(),
        );
        assert_eq!(documents.len(), expected.len());
        for (d, e) in documents.iter().zip(expected) {
            assert!(close(&d["loss"], &e["loss"]), "{d} against {e}");
            assert_eq!(d["tokens"], e["tokens"]);
        }
    };
    let corpus = models().join("corpus");
    let whole = eval(
        &corpus,
        &["--ranks", "3", "--rank-tokens", "40", "--max-seq-len", "64"],
    );
    agree(&whole, &reference(None));
    let documents = whole["documents"].as_array().unwrap();
    for (i, d) in documents.iter().enumerate() {
        assert!(
            d["document"]
                .as_str()
                .unwrap()
                .ends_with(&format!("doc{i}.txt")),
            "{d}"
        );
    }
    assert!(
        documents.iter().any(|d| d["tokens"].as_u64().unwrap() > 40),
        "no document is longer than a rank holds: {whole}"
    );
    // Cut at 32 tokens.
    let cut = eval(&corpus, &["--max-seq-len", "32"]);
    agree(&cut, &reference(Some("32")));
    assert!(
        cut["documents"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["tokens"] == 32)
    );
    // The same documents as JSONL lines, in another field.
    let jsonl = models().join("corpus-jsonl");
    std::fs::create_dir_all(&jsonl).unwrap();
    let lines: Vec<String> = (0..5)
        .map(|i| {
            let text = std::fs::read_to_string(corpus.join(format!("doc{i}.txt"))).unwrap();
            serde_json::json!({"content": text, "text": "not this"}).to_string()
        })
        .collect();
    std::fs::write(jsonl.join("docs.jsonl"), lines.join("\n")).unwrap();
    let fielded = eval(&jsonl, &["--text-field", "content", "--max-seq-len", "64"]);
    agree(&fielded, &reference(None));

    let refused = |args: &[&std::ffi::OsStr]| {
        let out = trainer().args(args).output().unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let os = |s: &str| std::ffi::OsString::from(s);
    let err = refused(&[
        &os("eval"),
        &os("--model"),
        model.as_os_str(),
        &os("--data"),
        corpus.as_os_str(),
        &os("--ranks"),
        &os("3"),
        &os("--rank-tokens"),
        &os("12"),
        &os("--max-seq-len"),
        &os("64"),
    ]);
    assert!(
        err.contains("cannot hold one sequence of --max-seq-len 64"),
        "{err}"
    );
    let err = refused(&[
        &os("eval"),
        &os("--model"),
        &os("tiny"),
        &os("--data"),
        corpus.as_os_str(),
    ]);
    assert!(err.contains("not a Hugging Face model directory"), "{err}");
    let err = refused(&[&os("local"), &os("--text-field"), &os("content")]);
    assert!(
        err.contains("the built-in corpus keeps its documents in"),
        "{err}"
    );
}

/// `bench hf-load` reports loading a model and its tokenizer's speed:
/// every parameter counted, every document tokenized by both tokenizers.
#[test]
fn bench_hf_load_reports_the_load_and_the_tokenizers() {
    let out = trainer()
        .args(["bench", "hf-load", "--model"])
        .arg(models().join("llama-tokenized"))
        .arg("--data")
        .arg(models().join("corpus"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // 2 layers of 64 (q, o: 64×64; k, v: 32×64; MLP 3 × 96×64; two norms),
    // the tied 128×64 table and the final norm.
    let layer = 2 * 64 * 64 + 2 * 32 * 64 + 3 * 96 * 64 + 2 * 64;
    assert_eq!(report["params"], 2 * layer + 128 * 64 + 64);
    assert_eq!(report["corpus_documents"], 5);
    let tokens = std::fs::read_to_string(models().join("corpus-tokens.txt")).unwrap();
    assert_eq!(
        report["tokenizers"]["model"]["tokens"].as_u64().unwrap(),
        tokens.trim().parse::<u64>().unwrap()
    );
    assert!(
        report["tokenizers"]["bytes"]["tokens_per_s"]
            .as_f64()
            .unwrap()
            > 0.0
    );
    assert!(report["load_s"].as_f64().unwrap() >= 0.0);
}

/// The reference corpus written as Parquet by `pyarrow` (see
/// `hf_models.py parquet`), once per test run: the directory and the
/// documents' texts in path order.
fn parquet_files() -> &'static (PathBuf, Vec<String>) {
    static FILES: OnceLock<(PathBuf, Vec<String>)> = OnceLock::new();
    FILES.get_or_init(|| {
        let dir = models().join("parquet");
        // pyarrow: scripts/setup-reference installs it.
        let corpus = models().join("corpus");
        let printed = reference_says(&["parquet".as_ref(), dir.as_os_str(), corpus.as_os_str()]);
        let texts = printed["texts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap().to_string())
            .collect();
        (dir, texts)
    })
}

/// What `pyarrow` writes, weft reads: a document per row from the text
/// column, in every codec weft reads (snappy, zstd, gzip, lz4, none; small
/// row groups; `string` and `large_string`), each row's source its file and
/// row; what it cannot read is refused by file, row and column.
#[test]
fn parquet_documents_read_as_pyarrow_wrote_them() {
    use weft_trainer::data::{Corpus, DataFormat};
    let (dir, texts) = parquet_files();
    let corpus = Corpus::load_with(&dir.join("codecs"), DataFormat::Parquet, "content").unwrap();
    let read: Vec<&str> = corpus.documents.iter().map(|d| d.text.as_str()).collect();
    // Files in name order: gzip, lz4, none, snappy, zstd.
    let wanted: Vec<&str> = (0..5)
        .flat_map(|_| texts.iter().map(String::as_str))
        .collect();
    assert_eq!(read, wanted);
    assert!(corpus.documents[1].source.ends_with("gzip.parquet:2"));
    // Auto reads .parquet files by their extension too; the text format
    // finds none.
    let auto = Corpus::load_with(&dir.join("codecs"), DataFormat::Auto, "content").unwrap();
    assert_eq!(auto.documents.len(), read.len());
    let refused = |sub: &str, format: DataFormat, field: &str| {
        Corpus::load_with(&dir.join(sub), format, field)
            .unwrap_err()
            .to_string()
    };
    let err = refused("codecs", DataFormat::Text, "content");
    assert!(
        err.contains("holds no documents") && err.contains("data format text"),
        "{err}"
    );
    let err = refused("codecs", DataFormat::Parquet, "text");
    assert!(
        err.contains("no column \"text\"") && err.contains("\"content\""),
        "{err}"
    );
    let err = refused("null", DataFormat::Parquet, "content");
    assert!(
        err.contains("with-null.parquet:2") && err.contains("null"),
        "{err}"
    );
    let err = refused("number", DataFormat::Parquet, "content");
    assert!(err.contains("does not hold strings"), "{err}");
    let err = refused("brotli", DataFormat::Parquet, "content");
    assert!(err.to_lowercase().contains("brotli"), "{err}");
}

/// A mesh of one worker of two ranks meeting at a free port, written into
/// `dir/mesh.json`; the worker's name.
fn one_worker_mesh(dir: &Path) -> String {
    use weft_planner::mesh::{MeshNode, MeshRequest, plan_mesh};
    let cluster = weft_planner::cluster::parse_cluster("1x2").unwrap();
    let request = MeshRequest {
        job: "llm".into(),
        min_workers: 1,
        max_workers: 1,
        gpus_per_worker: 2,
        epoch: 1,
    };
    let mut mesh = plan_mesh(&request, &MeshNode::all_free(&cluster), &[]).unwrap();
    let port = weft_trainer::launch::free_port().unwrap();
    mesh.rendezvous = Some(format!("127.0.0.1:{port}"));
    std::fs::write(dir.join("mesh.json"), serde_json::to_string(&mesh).unwrap()).unwrap();
    mesh.workers[0].name.clone()
}

/// The training parameters the operator writes for a job that starts from
/// `llama-tokenized` with YaRN, reads the reference corpus from Parquet's
/// "content" column, and writes the trained model into `dir/output`.
fn pretrained_training(dir: &Path) -> serde_json::Value {
    let tokens = std::fs::read_to_string(models().join("corpus-tokens.txt")).unwrap();
    let golden =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../operator/tests/golden/training.json");
    let mut training: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(golden).unwrap()).unwrap();
    training["version"] = 2.into();
    training.as_object_mut().unwrap().remove("model");
    training["pretrained"] = serde_json::json!({
        "checkpoint": models().join("llama-tokenized"),
        "rope": {"rope_type": "yarn", "factor": 2.0},
        "output": dir.join("output"),
    });
    let data = &mut training["data"];
    data["source"] = parquet_files()
        .0
        .join("corpus")
        .display()
        .to_string()
        .into();
    data["format"] = "Parquet".into();
    data["textField"] = "content".into();
    data["maxSequenceLength"] = 64.into();
    data["tokensPerStep"] = tokens.trim().parse::<u64>().unwrap().into();
    training["checkpoint"]["path"] = dir.join("checkpoints").display().to_string().into();
    training["checkpoint"]["intervalSteps"] = 1.into();
    training
}

/// A pod's worker (`weft-trainer worker`) run on `training`, to its end.
fn worker_on(dir: &Path, training: &serde_json::Value, steps: &str) -> std::process::Output {
    std::fs::write(dir.join("training.json"), training.to_string()).unwrap();
    let worker = one_worker_mesh(dir);
    trainer()
        .args(["worker", "--steps", steps, "--rank-tokens", "40"])
        .args(["--collective-timeout-s", "60", "--epoch-wait-s", "5"])
        .env("WEFT_WORKER", worker)
        .env("WEFT_MESH", dir.join("mesh.json"))
        .env("WEFT_TRAINING", dir.join("training.json"))
        .env("WEFT_POD_IP", "127.0.0.1")
        .env("WEFT_MESH_POLL_MS", "100")
        .output()
        .unwrap()
}

fn fresh(dir: &Path) {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
}

/// A job that names a checkpoint (`model.checkpoint`, `model.rope`,
/// `model.output`, Parquet data with a text column of its own), as the
/// operator publishes it, trains in a pod as `local` trains the same model
/// on the same documents, and the pod writes the trained model, which
/// `transformers` reads with the job's rotary settings.
#[test]
fn a_pod_trains_the_jobs_checkpoint_from_parquet_and_writes_the_trained_model() {
    let dir = models().join("pod-job");
    fresh(&dir);
    let out = worker_on(&dir, &pretrained_training(&dir), "2");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let pod: Vec<f64> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("weft-metrics "))
        .map(|body| {
            serde_json::from_str::<serde_json::Value>(body).unwrap()["loss"]
                .as_f64()
                .unwrap()
        })
        .collect();
    assert_eq!(pod.len(), 2, "{stderr}");
    let metrics = dir.join("local.jsonl");
    let rope = r#"{"rope_type": "yarn", "factor": 2.0}"#;
    local_on_corpus(
        &models().join("llama-tokenized"),
        &[
            "--ranks",
            "2",
            "--steps",
            "3",
            "--rank-tokens",
            "40",
            "--max-seq-len",
            "64",
            "--rope",
            rope,
        ],
        &metrics,
    );
    let local = losses(&metrics);
    println!("pod {pod:?}, local {local:?}");
    for (p, l) in pod.iter().zip(&local) {
        assert!(((p - l) / l).abs() <= 1e-5, "pod {p} local {l}");
    }
    let output = dir.join("output");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(output.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(config["rope_parameters"]["rope_type"], "yarn", "{config}");
    // A pod restarted after the last step and the output has nothing to do.
    let again = worker_on(&dir, &pretrained_training(&dir), "2");
    let said = String::from_utf8_lossy(&again.stderr);
    assert!(again.status.success(), "{said}");
    assert!(said.contains("nothing left to do"), "{said}");
    let reference = corpus_loss(&output);
    println!(
        "after 2 steps: local's third {}, transformers on the pod's output {reference}",
        local[2]
    );
    assert!(((local[2] - reference) / reference).abs() <= 1e-5);
}

/// What a pod's worker refuses of a job's settings it names by the job's
/// field, before any rank starts, and exits with the code that tells the
/// operator to fail the job at once.
#[test]
fn a_pod_refuses_the_jobs_settings_by_field_with_the_refusal_code() {
    let dir = models().join("pod-refusals");
    let base = || {
        fresh(&dir);
        pretrained_training(&dir)
    };
    // What, the field (as a JSON pointer into training.json), its value,
    // and what the refusal says.
    let output = models().join("corpus").display().to_string();
    let cases: Vec<(&str, &str, serde_json::Value, &[&str])> = vec![
        (
            "a checkpoint that is not there",
            "/pretrained/checkpoint",
            "/nowhere/llama".into(),
            &["spec.model.checkpoint /nowhere/llama"],
        ),
        (
            "a rope type weft does not compute",
            "/pretrained/rope",
            serde_json::json!({"rope_type": "longrope", "factor": 2.0}),
            &["spec.model.rope", "longrope"],
        ),
        (
            "an output that exists",
            "/pretrained/output",
            output.into(),
            &["spec.model.output"],
        ),
        (
            "a text column the files do not have",
            "/data/textField",
            "body".into(),
            &["spec.data", "no column \"body\""],
        ),
        (
            "a format of which the source has no files",
            "/data/format",
            "JsonLines".into(),
            &["spec.data", "holds no documents"],
        ),
        (
            "a tokenizer that is not there",
            "/data/tokenizer",
            "/nowhere/tokenizer.json".into(),
            &["spec.data.tokenizer /nowhere/tokenizer.json"],
        ),
    ];
    for (what, pointer, value, wanted) in cases {
        let mut training = base();
        let (parent, key) = pointer.rsplit_once('/').unwrap();
        training.pointer_mut(parent).unwrap()[key] = value;
        let out = worker_on(&dir, &training, "1");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(weft_crds::SETTINGS_REFUSED_EXIT),
            "{what}: {stderr}"
        );
        for w in wanted {
            assert!(stderr.contains(w), "{what}: does not say {w:?}: {stderr}");
        }
    }
}

/// `--tokenizer`: a model of weft's own reads the documents with a
/// Hugging Face tokenizer (the step's tokens are its count of the corpus),
/// and a model whose vocabulary cannot hold its ids is refused by name.
#[test]
fn local_reads_the_documents_with_a_tokenizer_of_its_own() {
    let tokenizer = models().join("llama-tokenized");
    let metrics = models().join("own-tokenizer.jsonl");
    let tokens = std::fs::read_to_string(models().join("corpus-tokens.txt")).unwrap();
    let out = trainer()
        .args([
            "local",
            "--model",
            "tiny",
            "--steps",
            "1",
            "--max-seq-len",
            "64",
        ])
        .arg("--tokenizer")
        .arg(&tokenizer)
        .arg("--data")
        .arg(models().join("corpus"))
        .args(["--tokens-per-step", tokens.trim()])
        .arg("--metrics")
        .arg(&metrics)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let step: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(&metrics)
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        step["tokens"].as_u64().unwrap(),
        tokens.trim().parse::<u64>().unwrap()
    );
    let small = models().join("small-vocab.json");
    std::fs::write(
        &small,
        r#"{"layers": 1, "hidden": 16, "heads": 2, "kv_heads": 1, "ffn": 32, "vocab": 100}"#,
    )
    .unwrap();
    let out = trainer()
        .arg("local")
        .arg("--model")
        .arg(&small)
        .arg("--tokenizer")
        .arg(&tokenizer)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("has a vocabulary of 100") && err.contains("makes tokens up to 119"),
        "{err}"
    );
    let out = trainer()
        .args(["local", "--data-format", "parquet"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--data-format parquet: the built-in corpus"),
        "{err}"
    );
}

/// Dynamic NTK scaling on the distributed engine: each document rotates by
/// its whole length, also where its tokens are split over three ranks, and
/// the first loss over the corpus is `transformers'` (each document alone).
#[test]
fn dynamic_scaling_rotates_split_documents_by_their_whole_length() {
    let model = models().join("llama-dynamic-tokenized");
    let metrics = models().join("dynamic.jsonl");
    local_on_corpus(
        &model,
        &[
            "--ranks",
            "3",
            "--steps",
            "1",
            "--rank-tokens",
            "40",
            "--max-seq-len",
            "64",
        ],
        &metrics,
    );
    let step: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(&metrics)
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    assert!(step["max_cp_degree"].as_u64().unwrap() > 1, "{step}");
    let weft = losses(&metrics)[0];
    let reference = corpus_loss(&model);
    println!("dynamic NTK on 3 ranks: weft {weft}, transformers {reference}");
    assert!(((weft - reference) / reference).abs() <= 1e-5);
}

/// A checkpoint of a Hugging Face run holds the model as that model's
/// directory (`model/`: config, shards, tokenizer), which `transformers`
/// loads as it is; a run resumes from it exactly, and a damaged file of it
/// is refused by the manifest like any other.
#[test]
fn checkpoints_of_a_hugging_face_run_are_its_models_and_resume_exactly() {
    let model = models().join("llama-tokenized");
    let dir = models().join("hf-checkpoints");
    fresh(&dir);
    let ckpt = dir.join("checkpoints");
    let ckpt_flag = ckpt.to_str().unwrap();
    let run = |steps: &str, extra: &[&str], metrics: &Path| {
        let mut flags = vec!["--ranks", "2", "--steps", steps, "--rank-tokens", "40"];
        flags.extend(["--max-seq-len", "64"]);
        flags.extend(extra);
        local_on_corpus(&model, &flags, metrics);
        std::fs::read_to_string(metrics)
            .unwrap()
            .lines()
            .map(|l| {
                let m: serde_json::Value = serde_json::from_str(l).unwrap();
                (m["step"].as_u64().unwrap(), m["loss"].as_f64().unwrap())
            })
            .collect::<Vec<_>>()
    };
    let straight = run("3", &[], &dir.join("straight.jsonl"));
    let saving = ["--checkpoint-dir", ckpt_flag, "--checkpoint-every", "1"];
    let first = run("2", &saving, &dir.join("first.jsonl"));
    let step1 = ckpt.join("step-00000001");
    assert!(
        step1.join("model/config.json").is_file()
            && step1.join("model/tokenizer.json").is_file()
            && !step1.join("model.safetensors").exists(),
        "{:?}",
        std::fs::read_dir(&step1).unwrap().collect::<Vec<_>>()
    );
    let manifest = std::fs::read_to_string(step1.join("manifest.json")).unwrap();
    assert!(manifest.contains("model/config.json"), "{manifest}");
    // The model after step 1 is what step 2's loss was computed with.
    let reference = corpus_loss(&step1.join("model"));
    println!(
        "step 2: weft {}, transformers on checkpoint 1 {reference}",
        first[1].1
    );
    assert!(((first[1].1 - reference) / reference).abs() <= 1e-5);
    // Resumed from checkpoint 2, step 3 is the straight run's.
    let resume = [
        "--checkpoint-dir",
        ckpt_flag,
        "--checkpoint-every",
        "1",
        "--resume",
    ];
    let resumed = run("3", &resume, &dir.join("resumed.jsonl"));
    assert_eq!(resumed.len(), 1);
    assert_eq!(resumed[0].0, 3);
    assert!(((resumed[0].1 - straight[2].1) / straight[2].1).abs() <= 1e-6);
    // A damaged shard of checkpoint 3 is refused: the run goes back to 2.
    let shard = ckpt.join("step-00000003/model/model.safetensors");
    let mut bytes = std::fs::read(&shard).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&shard, bytes).unwrap();
    let again = run("3", &resume, &dir.join("again.jsonl"));
    assert_eq!(again.iter().map(|(s, _)| *s).collect::<Vec<_>>(), [3]);
    assert!(((again[0].1 - straight[2].1) / straight[2].1).abs() <= 1e-6);
}
