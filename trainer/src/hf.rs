//! Hugging Face model directories: `config.json` and the weights in
//! safetensors files (one `model.safetensors`, or shards named by
//! `model.safetensors.index.json`), read into weft's [`Llama`] and written
//! back in the same form, loadable by `transformers` unchanged.
//!
//! Architectures: `LlamaForCausalLM`, `MistralForCausalLM` and
//! `Qwen2ForCausalLM`, with grouped-query attention, `rms_norm_eps`,
//! `tie_word_embeddings`, biases where the architecture has them, and the
//! rotary settings of both forms `config.json` files carry: `rope_theta`
//! beside `rope_scaling` (older `transformers`) or `rope_parameters` holding
//! both (newer), of the types `default`, `linear`, `llama3` and `yarn`.
//! Anything else is refused by name, as is a file whose tensors do not fit
//! the config; a model is either loaded whole or not at all.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};
use serde_json::{Map, Value};
use tch::{Device, Kind, Tensor, nn};
use weft_planner::model::ModelSpec;

use crate::model::{Architecture, Llama, Rope, RopeScaling};

/// The architectures weft reads.
pub const ARCHITECTURES: [&str; 3] = ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"];

/// The rotary settings weft reads, in either form of a config.
const ROPE_KEYS: [&str; 14] = [
    "rope_type",
    "type",
    "rope_theta",
    "factor",
    "low_freq_factor",
    "high_freq_factor",
    "original_max_position_embeddings",
    "beta_fast",
    "beta_slow",
    "mscale",
    "mscale_all_dim",
    "attention_factor",
    "truncate",
    "partial_rotary_factor",
];

/// The file of a single-file checkpoint, and the index of a sharded one.
const SINGLE: &str = "model.safetensors";
const INDEX: &str = "model.safetensors.index.json";
/// Files of a model directory written back beside the weights when present.
const TOKENIZER_FILES: [&str; 5] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
];

/// What is wrong with a Hugging Face model directory.
#[derive(Debug, thiserror::Error)]
pub enum HfError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not valid JSON: {message}")]
    Json { path: PathBuf, message: String },
    #[error("{path}: {field}: {message}")]
    Config {
        path: PathBuf,
        field: String,
        message: String,
    },
    #[error(
        "{path}: architecture {name:?} is not supported (weft reads LlamaForCausalLM, MistralForCausalLM and Qwen2ForCausalLM)"
    )]
    Architecture { path: PathBuf, name: String },
    #[error(
        "{path}: rope type {name:?} is not supported (weft reads default, linear, llama3 and yarn){hint}"
    )]
    RopeType {
        path: PathBuf,
        name: String,
        hint: &'static str,
    },
    #[error("{dir}: has neither {SINGLE} nor {INDEX}")]
    NoWeights { dir: PathBuf },
    #[error("{path}: not a safetensors file: {message}")]
    Safetensors { path: PathBuf, message: String },
    #[error("{path}: tensor {name} has shape {found:?}, but the config makes it {expected:?}")]
    Shape {
        path: PathBuf,
        name: String,
        found: Vec<usize>,
        expected: Vec<i64>,
    },
    #[error("{path}: tensor {name} is {found}; weft reads F32, BF16 and F16 weights")]
    Dtype {
        path: PathBuf,
        name: String,
        found: String,
    },
    #[error("{path}: tensor {name} is not a weight of this {architecture}")]
    Unexpected {
        path: PathBuf,
        name: String,
        architecture: String,
    },
    #[error("{dir}: no file holds tensor {name}{more}")]
    Missing {
        dir: PathBuf,
        name: String,
        more: String,
    },
    #[error("{path}: {name} appears in more than one file")]
    Duplicate { path: PathBuf, name: String },
    #[error("{path}: already exists; weft writes a model into a new directory")]
    Exists { path: PathBuf },
    #[error("{path}: {message}")]
    Tokenizer { path: PathBuf, message: String },
    #[error(
        "{path}: the tokenizer produces token ids up to {largest}, but the model's embedding has {vocab} rows (vocab_size)"
    )]
    Vocabulary {
        path: PathBuf,
        largest: u32,
        vocab: u32,
    },
    #[error("{dir}: its config.json changed while the run was set up ({what})")]
    Changed { dir: PathBuf, what: String },
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    #[error("model: {0}")]
    Model(#[from] crate::model::ModelError),
}

impl HfError {
    /// A stable, machine-readable name for the kind of failure.
    pub fn category(&self) -> &'static str {
        match self {
            HfError::Io { .. } | HfError::Exists { .. } | HfError::Changed { .. } => "model_files",
            HfError::Tokenizer { .. } | HfError::Vocabulary { .. } => "tokenizer",
            HfError::Json { .. }
            | HfError::Config { .. }
            | HfError::Architecture { .. }
            | HfError::RopeType { .. } => "model_config",
            HfError::NoWeights { .. }
            | HfError::Safetensors { .. }
            | HfError::Shape { .. }
            | HfError::Dtype { .. }
            | HfError::Unexpected { .. }
            | HfError::Missing { .. }
            | HfError::Duplicate { .. } => "model_weights",
            HfError::Torch(_) | HfError::Model(_) => "torch",
        }
    }
}

/// A Hugging Face model's config, read: its shapes for the planner and the
/// model, what else its architecture sets, and the config itself (written
/// back with the weights).
#[derive(Clone, Debug, PartialEq)]
pub struct HfConfig {
    /// `LlamaForCausalLM`, `MistralForCausalLM` or `Qwen2ForCausalLM`.
    pub architecture_name: String,
    pub spec: ModelSpec,
    pub architecture: Architecture,
    /// The config as read.
    pub raw: Map<String, Value>,
}

fn read(path: &Path) -> Result<Vec<u8>, HfError> {
    std::fs::read(path).map_err(|source| HfError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn read_json(path: &Path) -> Result<Value, HfError> {
    serde_json::from_slice(&read(path)?).map_err(|e| HfError::Json {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// The fields of a config, read with the path and field in every error.
struct Fields<'a> {
    path: &'a Path,
    map: &'a Map<String, Value>,
}

impl Fields<'_> {
    fn error(&self, field: &str, message: impl Into<String>) -> HfError {
        HfError::Config {
            path: self.path.to_path_buf(),
            field: field.to_string(),
            message: message.into(),
        }
    }

    /// `field`, absent or null as None.
    fn get(&self, field: &str) -> Option<&Value> {
        self.map.get(field).filter(|v| !v.is_null())
    }

    /// `field` read by `read`, absent or null as None; a value `read`
    /// refuses is named, with `what` it must be.
    fn typed<'a, T>(
        &'a self,
        field: &str,
        what: &str,
        read: impl Fn(&'a Value) -> Option<T>,
    ) -> Result<Option<T>, HfError> {
        self.get(field)
            .map(|v| read(v).ok_or_else(|| self.error(field, format!("must be {what}, got {v}"))))
            .transpose()
    }

    fn number(&self, field: &str) -> Result<Option<f64>, HfError> {
        self.typed(field, "a positive number", |v| {
            v.as_f64().filter(|x| x.is_finite() && *x > 0.0)
        })
    }

    fn flag(&self, field: &str) -> Result<Option<bool>, HfError> {
        self.typed(field, "true or false", Value::as_bool)
    }

    fn text(&self, field: &str) -> Result<Option<&str>, HfError> {
        self.typed(field, "a string", Value::as_str)
    }
}

/// Reads `dir/config.json`.
pub fn read_config(dir: &Path) -> Result<HfConfig, HfError> {
    let path = dir.join("config.json");
    let value = read_json(&path)?;
    let Value::Object(map) = value else {
        return Err(HfError::Json {
            path,
            message: "the config is not a JSON object".to_string(),
        });
    };
    parse_config(&path, map)
}

/// A config read from `path`.
pub fn parse_config(path: &Path, map: Map<String, Value>) -> Result<HfConfig, HfError> {
    let f = Fields { path, map: &map };
    let architecture_name = match f.get("architectures") {
        Some(Value::Array(names)) => match names.as_slice() {
            [Value::String(name)] => name.clone(),
            _ => {
                return Err(f.error(
                    "architectures",
                    format!(
                        "must name one architecture, got {}",
                        Value::Array(names.clone())
                    ),
                ));
            }
        },
        Some(other) => {
            return Err(f.error("architectures", format!("must be a list, got {other}")));
        }
        None => match f.text("model_type")? {
            Some("llama") => "LlamaForCausalLM".to_string(),
            Some("mistral") => "MistralForCausalLM".to_string(),
            Some("qwen2") => "Qwen2ForCausalLM".to_string(),
            Some(other) => other.to_string(),
            None => return Err(f.error("architectures", "is missing (and so is model_type)")),
        },
    };
    if !ARCHITECTURES.contains(&architecture_name.as_str()) {
        return Err(HfError::Architecture {
            path: path.to_path_buf(),
            name: architecture_name,
        });
    }
    let qwen2 = architecture_name == "Qwen2ForCausalLM";
    let mistral = architecture_name == "MistralForCausalLM";

    // Named by the architecture alone: a run resumes from its checkpoint
    // whatever the directory is called now.
    let name = architecture_name.clone();
    // The shapes as the planner reads them, so plans and the model agree.
    let spec = ModelSpec::from_hf_config(&name, &map).map_err(|e| match e {
        weft_planner::model::ModelError::ConfigField { field, message, .. } => {
            f.error(field, message)
        }
        other => f.error("num_attention_heads", other.to_string()),
    })?;
    if let Some(act) = f.text("hidden_act")?
        && act != "silu"
    {
        return Err(f.error(
            "hidden_act",
            format!("{act:?}: weft's MLP is SwiGLU (silu)"),
        ));
    }
    if f.flag("mlp_bias")? == Some(true) {
        return Err(f.error("mlp_bias", "true: weft's MLP has no biases"));
    }
    // Attention over whole documents: a sliding window would change what a
    // token sees.
    if mistral && let Some(window) = f.get("sliding_window") {
        return Err(f.error(
            "sliding_window",
            format!("{window}: weft attends over whole documents; set it to null to train with full attention"),
        ));
    }
    if mistral && !map.contains_key("sliding_window") {
        return Err(f.error(
            "sliding_window",
            "is absent, which transformers reads as 4096: weft attends over whole documents; set it to null",
        ));
    }
    if qwen2 && f.flag("use_sliding_window")? == Some(true) {
        return Err(f.error(
            "use_sliding_window",
            "true: weft attends over whole documents; set it to false",
        ));
    }
    let attention_bias = f.flag("attention_bias")?.unwrap_or(false);
    if mistral && attention_bias {
        return Err(f.error(
            "attention_bias",
            "true, but MistralForCausalLM has no biases (transformers would not read them either)",
        ));
    }
    let architecture = Architecture {
        rope: read_rope(&f)?,
        norm_eps: f.number("rms_norm_eps")?.unwrap_or(1e-6),
        qkv_bias: qwen2 || attention_bias,
        output_bias: !qwen2 && attention_bias,
        tied_embeddings: f.flag("tie_word_embeddings")?.unwrap_or(false),
    };
    Ok(HfConfig {
        architecture_name,
        spec,
        architecture,
        raw: map,
    })
}

/// The rotary settings, from `rope_scaling` beside a top-level
/// `rope_theta`, or from `rope_parameters` holding both (`rope_scaling`
/// first, as `transformers` reads them).
fn read_rope(f: &Fields) -> Result<Rope, HfError> {
    let (field, settings) = match (f.get("rope_scaling"), f.get("rope_parameters")) {
        (Some(v), _) => ("rope_scaling", Some(v)),
        (None, Some(v)) => ("rope_parameters", Some(v)),
        (None, None) => ("rope_parameters", None),
    };
    let empty = Map::new();
    let settings = match settings {
        None => &empty,
        Some(Value::Object(m)) => m,
        Some(other) => return Err(f.error(field, format!("must be an object, got {other}"))),
    };
    let s = Fields {
        path: f.path,
        map: settings,
    };
    let named = |key: &str| format!("{field}.{key}");
    // A setting weft does not read would be silently ignored: refused. (A
    // nested object is a per-layer-type form, which these models do not use.)
    for (key, value) in settings {
        if value.is_object() || !ROPE_KEYS.contains(&key.as_str()) {
            return Err(f.error(
                &named(key),
                format!(
                    "{value}: not a rotary setting weft reads (it reads {})",
                    ROPE_KEYS.join(", ")
                ),
            ));
        }
    }
    let in_settings = |key: &str| -> Result<Option<f64>, HfError> {
        s.number(key)
            .map_err(|_| f.error(&named(key), "must be a positive number"))
    };
    let theta = match in_settings("rope_theta")? {
        Some(theta) => theta,
        None => f.number("rope_theta")?.unwrap_or(10_000.0),
    };
    if let Some(partial) =
        in_settings("partial_rotary_factor")?.or(f.number("partial_rotary_factor")?)
        && partial != 1.0
    {
        return Err(f.error(
            "partial_rotary_factor",
            format!("{partial}: weft rotates whole heads"),
        ));
    }
    let kind = match s.text("rope_type")?.or(s.text("type")?) {
        Some(kind) => kind.to_string(),
        None => "default".to_string(),
    };
    let required = |key: &str| -> Result<f64, HfError> {
        in_settings(key)?.ok_or_else(|| f.error(&named(key), "is missing"))
    };
    let max_positions = f.number("max_position_embeddings")?;
    let original = |key: &str| -> Result<f64, HfError> {
        in_settings(key)?
            .or(f.number("original_max_position_embeddings")?)
            .or(max_positions)
            .ok_or_else(|| {
                f.error(
                    &named(key),
                    "is missing (and so is max_position_embeddings)",
                )
            })
    };
    let scaling = match kind.as_str() {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear {
            factor: required("factor")?,
        },
        "llama3" => {
            let low_freq_factor = required("low_freq_factor")?;
            let high_freq_factor = required("high_freq_factor")?;
            if high_freq_factor <= low_freq_factor {
                return Err(f.error(
                    &named("high_freq_factor"),
                    format!("{high_freq_factor} must exceed low_freq_factor {low_freq_factor}"),
                ));
            }
            RopeScaling::Llama3 {
                factor: required("factor")?,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: original("original_max_position_embeddings")?,
            }
        }
        "yarn" => {
            let original_max_position_embeddings = original("original_max_position_embeddings")?;
            let factor = match in_settings("factor")? {
                Some(factor) => factor,
                None => {
                    max_positions.ok_or_else(|| f.error(&named("factor"), "is missing"))?
                        / original_max_position_embeddings
                }
            };
            let mscale = |scale: f64, m: f64| {
                if scale <= 1.0 {
                    1.0
                } else {
                    0.1 * m * scale.ln() + 1.0
                }
            };
            let attention_factor = match in_settings("attention_factor")? {
                Some(a) => a,
                None => match (in_settings("mscale")?, in_settings("mscale_all_dim")?) {
                    (Some(m), Some(all)) => mscale(factor, m) / mscale(factor, all),
                    _ => mscale(factor, 1.0),
                },
            };
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                beta_fast: in_settings("beta_fast")?.unwrap_or(32.0),
                beta_slow: in_settings("beta_slow")?.unwrap_or(1.0),
                attention_factor,
                truncate: s
                    .flag("truncate")
                    .map_err(|_| f.error(&named("truncate"), "must be true or false"))?
                    .unwrap_or(true),
            }
        }
        // transformers grows the base past max_position_embeddings (not an
        // original length of the rope's own).
        "dynamic" => RopeScaling::Dynamic {
            factor: required("factor")?,
            max_position_embeddings: max_positions.ok_or_else(|| {
                f.error(
                    "max_position_embeddings",
                    "is missing (dynamic scaling grows the base past it)",
                )
            })?,
        },
        _ => {
            return Err(HfError::RopeType {
                path: f.path.to_path_buf(),
                name: kind,
                hint: "",
            });
        }
    };
    Ok(Rope { theta, scaling })
}

/// The safetensors files of a model directory and the tensors each holds
/// (by the index when the model is sharded).
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>, HfError> {
    let index = dir.join(INDEX);
    if index.exists() {
        let value = read_json(&index)?;
        let map = value
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| HfError::Json {
                path: index.clone(),
                message: "has no weight_map object".to_string(),
            })?;
        let mut files = BTreeSet::new();
        for (name, file) in map {
            let file = file.as_str().ok_or_else(|| HfError::Json {
                path: index.clone(),
                message: format!("weight_map names no file for {name}"),
            })?;
            // A shard is a file in the directory, never a path out of it.
            if file.contains('/') || file == ".." {
                return Err(HfError::Json {
                    path: index.clone(),
                    message: format!("weight_map names {file:?}, not a file of the directory"),
                });
            }
            files.insert(dir.join(file));
        }
        return Ok(files.into_iter().collect());
    }
    let single = dir.join(SINGLE);
    if single.exists() {
        return Ok(vec![single]);
    }
    Err(HfError::NoWeights {
        dir: dir.to_path_buf(),
    })
}

fn kind_of(dtype: Dtype) -> Option<Kind> {
    match dtype {
        Dtype::F32 => Some(Kind::Float),
        Dtype::BF16 => Some(Kind::BFloat16),
        Dtype::F16 => Some(Kind::Half),
        _ => None,
    }
}

/// The largest safetensors file weft writes (`transformers`' default
/// `max_shard_size` of 5 GB).
pub const SHARD_BYTES: usize = 5_000_000_000;

/// A config's `eos_token_id` (the first, when it lists several; none when
/// absent, null or an empty list), refused by name when it is not a token id.
fn eos_token_id(value: Option<&Value>, config: &Path) -> Result<Option<u32>, HfError> {
    let named = match value {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Array(ids)) if ids.is_empty() => return Ok(None),
        Some(named) => named,
    };
    let id = match named {
        Value::Array(ids) => ids.first().and_then(Value::as_u64),
        id => id.as_u64(),
    };
    id.and_then(|id| u32::try_from(id).ok())
        .map(Some)
        .ok_or_else(|| HfError::Config {
            path: config.to_path_buf(),
            field: "eos_token_id".to_string(),
            message: format!("{named} is not a token id"),
        })
}

/// The tokenizer of the model in `dir`: its `tokenizer.json`, closing every
/// document with the config's `eos_token_id` (the first, when it lists
/// several). Refused when the tokenizer can produce an id the embedding has
/// no row for.
pub fn tokenizer(dir: &Path, config: &HfConfig) -> Result<crate::data::Tokenizer, HfError> {
    let path = dir.join("tokenizer.json");
    let end = eos_token_id(config.raw.get("eos_token_id"), &dir.join("config.json"))?;
    let tokenizer =
        crate::data::Tokenizer::from_file(&path, end).map_err(|e| HfError::Tokenizer {
            path: path.clone(),
            message: match e {
                crate::data::DataError::Tokenizer { message, .. } => {
                    format!("not a tokenizer weft can read: {message}")
                }
                other => other.to_string(),
            },
        })?;
    let size = tokenizer.vocab_size();
    if size > config.spec.vocab {
        return Err(HfError::Vocabulary {
            path,
            largest: size - 1,
            vocab: config.spec.vocab,
        });
    }
    Ok(tokenizer)
}

/// A tokenizer named on its own (`--tokenizer`, the job's
/// `data.tokenizer`): a `tokenizer.json`, or a directory holding one.
/// Documents are closed by the end-of-sequence token its directory names:
/// `config.json`'s `eos_token_id`, else `tokenizer_config.json`'s
/// `eos_token` (a token of the tokenizer); by none when neither does.
pub fn tokenizer_at(path: &Path) -> Result<crate::data::Tokenizer, HfError> {
    let file = if path.is_dir() {
        path.join("tokenizer.json")
    } else {
        path.to_path_buf()
    };
    let dir = file.parent().unwrap_or(Path::new("."));
    let refused = |message: String| HfError::Tokenizer {
        path: file.clone(),
        message,
    };
    if !file.is_file() {
        return Err(refused(if path.is_dir() {
            "the directory has no tokenizer.json".to_string()
        } else {
            "no such file".to_string()
        }));
    }
    let read = |e: crate::data::DataError| match e {
        crate::data::DataError::Tokenizer { message, .. } => {
            refused(format!("not a tokenizer weft can read: {message}"))
        }
        other => refused(other.to_string()),
    };
    let json = |name: &str| -> Result<Option<Value>, HfError> {
        let path = dir.join(name);
        if !path.is_file() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path).map_err(|source| HfError::Io {
            path: path.clone(),
            source,
        })?;
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| HfError::Json {
                path,
                message: e.to_string(),
            })
    };
    let config = json("config.json")?;
    let from_config = eos_token_id(
        config.as_ref().and_then(|c| c.get("eos_token_id")),
        &dir.join("config.json"),
    )?;
    if let Some(end) = from_config {
        return crate::data::Tokenizer::from_file(&file, Some(end)).map_err(read);
    }
    let plain = crate::data::Tokenizer::from_file(&file, None).map_err(read)?;
    let named = json("tokenizer_config.json")?.and_then(|c| match c.get("eos_token")? {
        Value::String(token) => Some(token.clone()),
        Value::Object(token) => token.get("content")?.as_str().map(str::to_string),
        _ => None,
    });
    let Some(token) = named else {
        return Ok(plain);
    };
    let crate::data::Tokenizer::File { tokenizer, .. } = &plain else {
        return Ok(plain);
    };
    let end = tokenizer.token_to_id(&token).ok_or_else(|| {
        refused(format!(
            "tokenizer_config.json names the end-of-sequence token {token:?}, which the tokenizer does not have"
        ))
    })?;
    crate::data::Tokenizer::from_file(&file, Some(end)).map_err(read)
}

/// Reads the model of `dir` into a new model under `vs`, on `device`: the
/// config, then every tensor of every file, each checked against the
/// config's shapes. Any error leaves nothing half-loaded in the caller's
/// hands: the model is returned only when every weight was read.
pub fn load(dir: &Path, vs: &nn::Path, device: Device) -> Result<(Llama, HfConfig), HfError> {
    let config = read_config(dir)?;
    let model = load_into(dir, vs, device, &config)?;
    Ok((model, config))
}

/// [`load`] with `config`, the directory's config as a run was set up with
/// it (its rotary settings changed by [`with_rope`], for instance): the
/// directory's config must still give the same shapes.
pub fn load_into(
    dir: &Path,
    vs: &nn::Path,
    device: Device,
    config: &HfConfig,
) -> Result<Llama, HfError> {
    let now = read_config(dir)?;
    if now.spec != config.spec {
        return Err(HfError::Changed {
            dir: dir.to_path_buf(),
            what: format!("it now says {:?}, the run has {:?}", now.spec, config.spec),
        });
    }
    let model = Llama::with_architecture(vs, &config.spec, &config.architecture)?;
    let targets: BTreeMap<String, Tensor> = model.hf_parameters().into_iter().collect();
    each_weight(dir, config, |name, data, kind, shape| {
        let Some(target) = targets.get(name) else {
            return Err(HfError::Torch(tch::TchError::Shape(format!(
                "the model has no parameter {name}"
            ))));
        };
        let value = Tensor::f_from_data_size(data, shape, kind)?
            .f_to_kind(Kind::Float)?
            .f_to_device(device)?;
        tch::no_grad(|| target.shallow_clone().f_copy_(&value))?;
        Ok(())
    })?;
    Ok(model)
}

/// Checks every tensor of the model in `dir` against `config` (names,
/// shapes, dtypes, none missing, none left over) from the files' headers,
/// reading no weights: what [`load_into`] would refuse, found before a run
/// starts its ranks.
pub fn check_weights(dir: &Path, config: &HfConfig) -> Result<(), HfError> {
    each_weight(dir, config, |_, _, _, _| Ok(()))
}

/// The tensors of a Hugging Face checkpoint of `spec` and `architecture`,
/// by name, with their shapes: what [`Llama::hf_parameters`] lists.
pub fn expected_tensors(
    spec: &ModelSpec,
    architecture: &Architecture,
) -> BTreeMap<String, Vec<i64>> {
    let (h, f, v) = (
        i64::from(spec.hidden),
        i64::from(spec.ffn),
        i64::from(spec.vocab),
    );
    let kv = i64::from(spec.kv_heads) * (h / i64::from(spec.heads));
    let mut tensors = BTreeMap::new();
    let mut add = |name: String, shape: Vec<i64>| {
        tensors.insert(name, shape);
    };
    add("model.embed_tokens.weight".to_string(), vec![v, h]);
    add("model.norm.weight".to_string(), vec![h]);
    if !architecture.tied_embeddings {
        add("lm_head.weight".to_string(), vec![v, h]);
    }
    for i in 0..spec.layers {
        let at = format!("model.layers.{i}");
        for (name, out, bias) in [
            ("self_attn.q_proj", h, architecture.qkv_bias),
            ("self_attn.k_proj", kv, architecture.qkv_bias),
            ("self_attn.v_proj", kv, architecture.qkv_bias),
            ("self_attn.o_proj", h, architecture.output_bias),
        ] {
            add(format!("{at}.{name}.weight"), vec![out, h]);
            if bias {
                add(format!("{at}.{name}.bias"), vec![out]);
            }
        }
        add(format!("{at}.mlp.gate_proj.weight"), vec![f, h]);
        add(format!("{at}.mlp.up_proj.weight"), vec![f, h]);
        add(format!("{at}.mlp.down_proj.weight"), vec![h, f]);
        add(format!("{at}.input_layernorm.weight"), vec![h]);
        add(format!("{at}.post_attention_layernorm.weight"), vec![h]);
    }
    tensors
}

/// Calls `take` with every tensor of the model in `dir` (its name, bytes,
/// kind and shape) after checking it against `config`: a tensor the
/// architecture has no place for, of another shape or of a dtype weft does
/// not read, one in two files, and one no file holds are refused by name.
fn each_weight(
    dir: &Path,
    config: &HfConfig,
    mut take: impl FnMut(&str, &[u8], Kind, &[i64]) -> Result<(), HfError>,
) -> Result<(), HfError> {
    let wanted = expected_tensors(&config.spec, &config.architecture);
    let mut loaded: BTreeSet<String> = BTreeSet::new();
    for path in weight_files(dir)? {
        let file = std::fs::File::open(&path).map_err(|source| HfError::Io {
            path: path.clone(),
            source,
        })?;
        // SAFETY: the file is only read, and only while mapped here; a
        // checkpoint changed under a running load is the writer's fault,
        // as with any reader of it.
        #[allow(unsafe_code)]
        let bytes = unsafe { memmap2::Mmap::map(&file) }.map_err(|source| HfError::Io {
            path: path.clone(),
            source,
        })?;
        let tensors = SafeTensors::deserialize(&bytes).map_err(|e| HfError::Safetensors {
            path: path.clone(),
            message: e.to_string(),
        })?;
        for (name, view) in tensors.iter() {
            let Some(expected) = wanted.get(name) else {
                // Older Llama checkpoints store the rotary frequencies they
                // recompute; a tied head may be stored too.
                if name.ends_with("rotary_emb.inv_freq")
                    || (name == "lm_head.weight" && config.architecture.tied_embeddings)
                {
                    continue;
                }
                return Err(HfError::Unexpected {
                    path,
                    name: name.to_string(),
                    architecture: config.architecture_name.clone(),
                });
            };
            if !loaded.insert(name.to_string()) {
                return Err(HfError::Duplicate {
                    path,
                    name: name.to_string(),
                });
            }
            let found: Vec<usize> = view.shape().to_vec();
            if found.len() != expected.len()
                || found.iter().zip(expected).any(|(a, b)| *a as i64 != *b)
            {
                return Err(HfError::Shape {
                    path,
                    name: name.to_string(),
                    found,
                    expected: expected.clone(),
                });
            }
            let kind = kind_of(view.dtype()).ok_or_else(|| HfError::Dtype {
                path: path.clone(),
                name: name.to_string(),
                found: format!("{:?}", view.dtype()),
            })?;
            take(name, view.data(), kind, expected)?;
        }
    }
    let missing: Vec<&String> = wanted.keys().filter(|n| !loaded.contains(*n)).collect();
    if let Some(first) = missing.first() {
        return Err(HfError::Missing {
            dir: dir.to_path_buf(),
            name: first.to_string(),
            more: match missing.len() {
                1 => String::new(),
                n => format!(" (nor {} other tensors)", n - 1),
            },
        });
    }
    Ok(())
}

/// `config` with its rotary settings replaced by `rope`, as a job extends a
/// model's context: `rope` is an object in `config.json`'s
/// `rope_parameters` form (`rope_type` and its keys; `rope_theta` is the
/// model's unless given; a `llama3` or `yarn` type's
/// `original_max_position_embeddings` is the model's
/// `max_position_embeddings`, its pretrained context, unless given), and
/// `max_position_embeddings` is raised to `context` when that is longer
/// (not for `dynamic`, which scales past it as it is). The
/// config written with the trained model carries the new settings, in the
/// newer form only. Errors name `--rope`.
pub fn with_rope(
    config: &HfConfig,
    rope: &Map<String, Value>,
    context: u64,
) -> Result<HfConfig, HfError> {
    let mut raw = config.raw.clone();
    raw.remove("rope_scaling");
    raw.remove("rope_theta");
    let mut parameters = rope.clone();
    if !parameters.contains_key("rope_theta") {
        parameters.insert(
            "rope_theta".to_string(),
            Value::from(config.architecture.rope.theta),
        );
    }
    if !parameters.contains_key("rope_type") && !parameters.contains_key("type") {
        parameters.insert("rope_type".to_string(), Value::from("default"));
    }
    let kind = parameters
        .get("rope_type")
        .or(parameters.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default")
        .to_string();
    let pretrained = raw.get("max_position_embeddings").cloned();
    if matches!(kind.as_str(), "llama3" | "yarn")
        && !parameters.contains_key("original_max_position_embeddings")
        && let Some(pretrained) = &pretrained
    {
        parameters.insert(
            "original_max_position_embeddings".to_string(),
            pretrained.clone(),
        );
    }
    raw.insert("rope_parameters".to_string(), Value::Object(parameters));
    // Dynamic scaling grows the base only past max_position_embeddings:
    // raised, it would leave the longer sequences unscaled.
    if kind != "dynamic"
        && pretrained
            .as_ref()
            .and_then(Value::as_u64)
            .is_none_or(|n| n < context)
    {
        raw.insert("max_position_embeddings".to_string(), Value::from(context));
    }
    let changed = parse_config(Path::new("--rope"), raw)?;
    Ok(HfConfig {
        spec: config.spec.clone(),
        ..changed
    })
}

/// Writes `model` into the directory `dir` (which exists) as a Hugging Face
/// model: fp32 safetensors shards of at most `shard_bytes` (with their
/// index when there are several), `config.json` from `config`, and the
/// tokenizer's files found in `source`; every file synced. What [`save`]
/// writes, and a checkpoint of a Hugging Face run holds in its `model/`.
pub fn write_model(
    model: &Llama,
    config: &HfConfig,
    source: Option<&Path>,
    dir: &Path,
    shard_bytes: usize,
) -> Result<(), HfError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| HfError::Io { path, source }
    };
    let mut metadata = std::collections::HashMap::new();
    metadata.insert("format".to_string(), "pt".to_string());
    // Shards go out under a number each; they are named `-of-N` once N
    // is known.
    let mut shard: Vec<(String, Raw)> = Vec::new();
    let mut shard_names: Vec<Vec<String>> = Vec::new();
    let mut size = 0usize;
    let mut total = 0usize;
    let flush = |shard: &mut Vec<(String, Raw)>,
                 shard_names: &mut Vec<Vec<String>>|
     -> Result<(), HfError> {
        let path = dir.join(format!("shard-{}", shard_names.len()));
        safetensors::serialize_to_file(
            shard.iter().map(|(name, raw)| (name.as_str(), raw)),
            Some(metadata.clone()),
            &path,
        )
        .map_err(|e| HfError::Safetensors {
            path: path.clone(),
            message: e.to_string(),
        })?;
        shard_names.push(shard.drain(..).map(|(name, _)| name).collect());
        Ok(())
    };
    for (name, tensor) in model.hf_parameters() {
        let raw = raw(&tensor)?;
        let len = raw.bytes.len();
        if size > 0 && size + len > shard_bytes {
            flush(&mut shard, &mut shard_names)?;
            size = 0;
        }
        size += len;
        total += len;
        shard.push((name, raw));
    }
    if !shard.is_empty() {
        flush(&mut shard, &mut shard_names)?;
    }
    let count = shard_names.len();
    let mut weight_map = Map::new();
    let mut files = Vec::new();
    for (i, names) in shard_names.iter().enumerate() {
        let file = if count == 1 {
            SINGLE.to_string()
        } else {
            format!("model-{:05}-of-{count:05}.safetensors", i + 1)
        };
        let from = dir.join(format!("shard-{i}"));
        std::fs::rename(&from, dir.join(&file)).map_err(io(&from))?;
        for name in names {
            weight_map.insert(name.clone(), Value::String(file.clone()));
        }
        files.push(file);
    }
    if count > 1 {
        let index = serde_json::json!({
            "metadata": {"total_size": total},
            "weight_map": weight_map,
        });
        std::fs::write(dir.join(INDEX), pretty(&index)).map_err(io(&dir.join(INDEX)))?;
        files.push(INDEX.to_string());
    }
    let mut raw_config = config.raw.clone();
    raw_config.remove("torch_dtype");
    raw_config.insert("dtype".to_string(), Value::String("float32".to_string()));
    let path = dir.join("config.json");
    std::fs::write(&path, pretty(&Value::Object(raw_config))).map_err(io(&path))?;
    files.push("config.json".to_string());
    if let Some(source) = source {
        for name in TOKENIZER_FILES {
            let from = source.join(name);
            if from.exists() {
                std::fs::copy(&from, dir.join(name)).map_err(io(&from))?;
                files.push(name.to_string());
            }
        }
    }
    for file in &files {
        let path = dir.join(file);
        std::fs::File::open(&path)
            .and_then(|f| f.sync_all())
            .map_err(io(&path))?;
    }
    sync_dir(dir);
    Ok(())
}

/// A tensor's bytes, as safetensors writes them.
struct Raw {
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl safetensors::View for &Raw {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.bytes)
    }

    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

fn raw(tensor: &Tensor) -> Result<Raw, HfError> {
    let values = tensor
        .f_to_device(Device::Cpu)?
        .f_to_kind(Kind::Float)?
        .f_contiguous()?
        .f_flatten(0, -1)?;
    let values: Vec<f32> = Vec::<f32>::try_from(&values)?;
    Ok(Raw {
        shape: tensor.size().iter().map(|d| *d as usize).collect(),
        bytes: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    })
}

/// The directory [`save`] writes before it renames it to `out`, and the
/// prefix of those a killed writer may have left.
fn partial_of(out: &Path) -> (PathBuf, String) {
    let prefix = format!(
        ".{}.partial-",
        out.file_name()
            .map_or("model".into(), |n| n.to_string_lossy())
    );
    (
        out.with_file_name(format!("{prefix}{}", std::process::id())),
        prefix,
    )
}

/// Checks, before a run trains, that [`save`] can write `out`: it does not
/// exist yet, and a directory can be made beside it (made and removed).
pub fn probe_save(out: &Path) -> Result<(), HfError> {
    if out.exists() {
        return Err(HfError::Exists {
            path: out.to_path_buf(),
        });
    }
    let (partial, _) = partial_of(out);
    std::fs::create_dir_all(&partial).map_err(|source| HfError::Io {
        path: partial.clone(),
        source,
    })?;
    let _ = std::fs::remove_dir(&partial);
    Ok(())
}

/// Writes `model` into the new directory `out` as a Hugging Face model:
/// its fp32 weights in safetensors shards of at most `shard_bytes`, each
/// written as soon as it is full (one `model.safetensors` when they fit
/// one, else `model-0000K-of-0000N.safetensors` and their index),
/// `config.json` (`config`'s, in fp32), and the tokenizer's files of
/// `source` when it has them. Every file is synced, and the directory is
/// renamed into place only then: it appears whole or not at all, and what a
/// killed writer left beside it is removed by the next.
pub fn save(
    model: &Llama,
    config: &HfConfig,
    source: Option<&Path>,
    out: &Path,
    shard_bytes: usize,
) -> Result<(), HfError> {
    if out.exists() {
        return Err(HfError::Exists {
            path: out.to_path_buf(),
        });
    }
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| HfError::Io { path, source }
    };
    let (partial, prefix) = partial_of(out);
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty())
        && let Ok(entries) = std::fs::read_dir(parent)
    {
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with(&prefix) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    std::fs::create_dir_all(&partial).map_err(io(&partial))?;
    let written = (|| {
        write_model(model, config, source, &partial, shard_bytes)?;
        sync_dir(&partial);
        // Never over a directory that appeared meanwhile.
        rustix::fs::renameat_with(
            rustix::fs::CWD,
            &partial,
            rustix::fs::CWD,
            out,
            rustix::fs::RenameFlags::NOREPLACE,
        )
        .map_err(|e| {
            if e == rustix::io::Errno::EXIST || e == rustix::io::Errno::NOTEMPTY {
                HfError::Exists {
                    path: out.to_path_buf(),
                }
            } else {
                HfError::Io {
                    path: out.to_path_buf(),
                    source: e.into(),
                }
            }
        })?;
        if let Some(parent) = out.parent() {
            sync_dir(parent);
        }
        Ok(())
    })();
    if written.is_err() {
        let _ = std::fs::remove_dir_all(&partial);
    }
    written
}

/// Syncs a directory's entries (a new or renamed file in it), where the
/// file system allows.
fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

fn pretty(value: &Value) -> String {
    serde_json::to_string_pretty(value).unwrap_or_default() + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn config(extra: Value) -> Result<HfConfig, HfError> {
        let mut map = json!({
            "architectures": ["LlamaForCausalLM"],
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": 100,
            "max_position_embeddings": 256,
        });
        if let (Some(map), Value::Object(extra)) = (map.as_object_mut(), extra) {
            map.extend(extra);
        }
        let Value::Object(map) = map else {
            unreachable!("an object")
        };
        parse_config(Path::new("m/config.json"), map)
    }

    /// A word-level tokenizer of four tokens, with `files` beside it.
    fn tokenizer_dir(name: &str, files: &[(&str, Value)]) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("weft-tok-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap_or_default();
        let tokenizer = json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
            "normalizer": null, "pre_tokenizer": {"type": "Whitespace"},
            "post_processor": null, "decoder": null,
            "model": {"type": "WordLevel", "unk_token": "[UNK]",
                      "vocab": {"[UNK]": 0, "a": 1, "b": 2, "</s>": 3}},
        });
        let _ = std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string());
        for (name, value) in files {
            let _ = std::fs::write(dir.join(name), value.to_string());
        }
        dir
    }

    fn end_of(tokenizer: &crate::data::Tokenizer) -> Option<u32> {
        match tokenizer {
            crate::data::Tokenizer::File { end, .. } => *end,
            crate::data::Tokenizer::Bytes => None,
        }
    }

    /// `--tokenizer`: a file or its directory; the end token from the
    /// directory's config.json, else tokenizer_config.json (a string or an
    /// object), else none; what cannot be read is refused by name.
    #[test]
    fn a_tokenizer_named_on_its_own_closes_documents_with_its_directorys_end_token() {
        let cases = [
            (
                "config",
                vec![("config.json", json!({"eos_token_id": 2}))],
                Some(2),
            ),
            (
                "both",
                vec![
                    ("config.json", json!({"eos_token_id": [2, 3]})),
                    ("tokenizer_config.json", json!({"eos_token": "</s>"})),
                ],
                Some(2),
            ),
            (
                "string",
                vec![("tokenizer_config.json", json!({"eos_token": "</s>"}))],
                Some(3),
            ),
            (
                "object",
                vec![(
                    "tokenizer_config.json",
                    json!({"eos_token": {"content": "</s>", "lstrip": false}}),
                )],
                Some(3),
            ),
            ("none", vec![], None),
        ];
        for (name, files, wanted) in cases {
            let dir = tokenizer_dir(name, &files);
            for path in [dir.clone(), dir.join("tokenizer.json")] {
                let tokenizer = tokenizer_at(&path);
                assert!(tokenizer.is_ok(), "{name}: {tokenizer:?}");
                let tokenizer = tokenizer.unwrap_or_default();
                assert_eq!(end_of(&tokenizer), wanted, "{name}");
                let tokens = tokenizer.encode("doc", "a a").unwrap_or_default();
                let closed: Vec<u32> = [1, 1].into_iter().chain(wanted).collect();
                assert_eq!(tokens, closed, "{name}");
            }
            let _ = std::fs::remove_dir_all(&dir);
        }
        let refused = |path: &Path| match tokenizer_at(path) {
            Err(e) => e.to_string(),
            Ok(_) => String::new(),
        };
        let dir = tokenizer_dir(
            "unknown-end",
            &[("tokenizer_config.json", json!({"eos_token": "<|end|>"}))],
        );
        let err = refused(&dir);
        assert!(
            err.contains("\"<|end|>\", which the tokenizer does not have"),
            "{err}"
        );
        let empty = dir.join("empty");
        let _ = std::fs::create_dir_all(&empty);
        let err = refused(&empty);
        assert!(err.contains("has no tokenizer.json"), "{err}");
        let err = refused(&dir.join("missing.json"));
        assert!(
            err.contains("missing.json") && err.contains("no such file"),
            "{err}"
        );
        let _ = std::fs::write(dir.join("tokenizer.json"), "{not json");
        let err = refused(&dir);
        assert!(err.contains("not a tokenizer weft can read"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn both_forms_of_the_rope_settings_read_alike() {
        let old = config(json!({
            "rope_theta": 500000.0,
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
        }))
        .unwrap();
        let new = config(json!({
            "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 64}
        }))
        .unwrap();
        assert_eq!(old.architecture.rope, new.architecture.rope);
        assert_eq!(old.architecture.rope.theta, 500000.0);
        // An older config's `type` key, and the defaults.
        let linear = config(json!({"rope_scaling": {"type": "linear", "factor": 2.0}})).unwrap();
        assert_eq!(
            linear.architecture.rope,
            Rope {
                theta: 10_000.0,
                scaling: RopeScaling::Linear { factor: 2.0 }
            }
        );
        let plain = config(json!({})).unwrap();
        assert_eq!(plain.architecture.rope, Rope::default());
        assert_eq!(plain.architecture.norm_eps, 1e-6);
        // YaRN's factor and attention factor when the config leaves them out.
        let yarn = config(
            json!({"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0,
                                                     "original_max_position_embeddings": 64}}),
        )
        .unwrap();
        let RopeScaling::Yarn {
            factor,
            attention_factor,
            truncate,
            ..
        } = yarn.architecture.rope.scaling
        else {
            panic!("yarn")
        };
        assert_eq!(factor, 4.0);
        assert!((attention_factor - (0.1 * 4f64.ln() + 1.0)).abs() < 1e-12);
        assert!(truncate);
    }

    /// Dynamic NTK: the base as it is up to max_position_embeddings, then
    /// grown with the sequence's length, as transformers computes it.
    #[test]
    fn dynamic_scaling_grows_the_base_with_the_sequence() {
        let dynamic = config(
            json!({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0},
                                    "rope_theta": 10000.0}),
        )
        .unwrap_or_else(|e| unreachable!("{e}"));
        let rope = &dynamic.architecture.rope;
        assert!(rope.per_sequence());
        let plain = rope.inv_freq(16);
        assert_eq!(rope.inv_freq_at(16, 256), plain);
        assert_eq!(rope.inv_freq_at(16, 100), plain);
        // 512 tokens past 256: base 10000 · (2·512/256 − 1)^(16/14).
        let base = 10000f64 * 3f64.powf(16.0 / 14.0);
        let longer = rope.inv_freq_at(16, 512);
        for (i, f) in longer.iter().enumerate() {
            let want = 1.0 / base.powf(2.0 * i as f64 / 16.0);
            assert!(
                (f64::from(*f) - want).abs() <= 1e-6 * want,
                "{i}: {f} {want}"
            );
        }
        assert!(longer[1] < plain[1]);
        // A rope of no dynamic kind has the same frequencies at any length.
        let yarn = config(json!({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}))
            .unwrap_or_else(|e| unreachable!("{e}"));
        assert!(!yarn.architecture.rope.per_sequence());
        assert_eq!(
            yarn.architecture.rope.inv_freq_at(16, 100_000),
            yarn.architecture.rope.inv_freq(16)
        );
    }

    #[test]
    fn what_weft_cannot_compute_is_refused_by_name() {
        let refused = |extra: Value, needle: &str| {
            let err = config(extra).unwrap_err().to_string();
            assert!(err.contains(needle), "{err} does not name {needle}");
            assert!(err.starts_with("m/config.json"), "{err}");
        };
        refused(
            json!({"architectures": ["GPT2LMHeadModel"]}),
            "\"GPT2LMHeadModel\" is not supported",
        );
        refused(
            json!({"rope_scaling": {"rope_type": "longrope"}}),
            "rope type \"longrope\"",
        );
        refused(
            json!({"rope_scaling": {"rope_type": "dynamic"}}),
            "rope_scaling.factor: is missing",
        );
        refused(
            json!({"rope_scaling": {"rope_type": "linear"}}),
            "rope_scaling.factor: is missing",
        );
        refused(json!({"hidden_act": "gelu"}), "hidden_act");
        refused(
            json!({"rope_scaling": {"rope_type": "linear", "factor": 2.0, "scale": 3}}),
            "rope_scaling.scale",
        );
        refused(
            json!({"rope_parameters": {"full_attention": {"rope_type": "default"}}}),
            "rope_parameters.full_attention",
        );
        refused(
            json!({"architectures": ["MistralForCausalLM"], "sliding_window": null, "attention_bias": true}),
            "attention_bias",
        );
        refused(json!({"mlp_bias": true}), "mlp_bias");
        refused(json!({"head_dim": 32}), "head_dim");
        refused(
            json!({"partial_rotary_factor": 0.5}),
            "partial_rotary_factor",
        );
        refused(json!({"num_key_value_heads": 3}), "num_attention_heads");
        refused(json!({"vocab_size": 0}), "vocab_size");
        refused(json!({"hidden_size": "big"}), "hidden_size");
        refused(
            json!({"architectures": ["MistralForCausalLM"], "sliding_window": 4096}),
            "sliding_window",
        );
        refused(
            json!({"architectures": ["MistralForCausalLM"]}),
            "sliding_window",
        );
        refused(
            json!({"architectures": ["Qwen2ForCausalLM"], "use_sliding_window": true}),
            "use_sliding_window",
        );
        let err = config(json!({"architectures": ["GPT2LMHeadModel"]})).unwrap_err();
        assert_eq!(err.category(), "model_config");
    }

    #[test]
    fn qwen2_has_qkv_biases_and_llama_follows_attention_bias() {
        let qwen =
            config(json!({"architectures": ["Qwen2ForCausalLM"], "tie_word_embeddings": true}))
                .unwrap();
        assert!(qwen.architecture.qkv_bias && !qwen.architecture.output_bias);
        assert!(qwen.architecture.tied_embeddings);
        let llama = config(json!({"attention_bias": true})).unwrap();
        assert!(llama.architecture.qkv_bias && llama.architecture.output_bias);
        let mistral =
            config(json!({"architectures": ["MistralForCausalLM"], "sliding_window": null}))
                .unwrap();
        assert!(!mistral.architecture.qkv_bias);
    }
}
