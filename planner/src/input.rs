//! Reading the planner's inputs: sequence lengths files, and cluster and model
//! descriptions given as a shorthand, a preset name, or a YAML/JSON file.
//!
//! Lengths file: one positive integer (tokens) per line; blank lines and `#`
//! comments (whole-line or trailing) are ignored.
//!
//! Cluster file (YAML or JSON), either pools of identical nodes with the keys of
//! the shorthand, or explicit nodes:
//!
//! ```yaml
//! pools:
//!   - {nodes: 8, gpus: 8, gpu: h100, nics: 8}
//!   - {nodes: 4, gpus: 4, gpu: a100-80g, nics: 2, name: small}
//! nodes:
//!   - name: odd-0
//!     gpu: h200
//!     gpus: 8
//!     rack: r9
//!     nics: [{name: mlx5_0, gbps: 400, gpus: [0, 1, 2, 3]}, {name: mlx5_1, gbps: 400, gpus: [4, 5, 6, 7]}]
//! ```
//!
//! Model file: `{name, layers, hidden, heads, kv_heads, ffn, vocab}`.

use std::path::Path;

use serde::Deserialize;

use crate::cluster::{Cluster, ClusterError, GpuModel, Nic, Node, parse_cluster};
use crate::model::{ModelError, ModelSpec};

/// What is wrong with an input.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("could not read {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("{path}:{line}: {text:?} is not a positive whole number of tokens")]
    BadLength {
        path: String,
        line: usize,
        text: String,
    },
    #[error("{path} holds no sequence lengths")]
    NoLengths { path: String },
    #[error("{path}: not a valid {what} description: {reason}")]
    BadFile {
        path: String,
        what: &'static str,
        reason: String,
    },
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("{what} must be at least 1")]
    Zero { what: &'static str },
}

impl InputError {
    /// A stable, machine-readable name for the kind of failure.
    pub fn category(&self) -> &'static str {
        match self {
            InputError::Read { .. } => "input_io",
            InputError::Cluster(_) => "cluster_description",
            InputError::Model(_) => "model_description",
            _ => "input_format",
        }
    }
}

fn read(path: &Path) -> Result<String, InputError> {
    std::fs::read_to_string(path).map_err(|e| InputError::Read {
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

/// Parses the text of a lengths file; `path` only names it in errors.
pub fn parse_lengths(path: &str, text: &str) -> Result<Vec<u64>, InputError> {
    let mut lengths = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let content = line.split('#').next().unwrap_or("").trim();
        if content.is_empty() {
            continue;
        }
        match content.parse::<u64>() {
            Ok(n) if n > 0 => lengths.push(n),
            _ => {
                return Err(InputError::BadLength {
                    path: path.to_string(),
                    line: index + 1,
                    text: content.to_string(),
                });
            }
        }
    }
    if lengths.is_empty() {
        return Err(InputError::NoLengths {
            path: path.to_string(),
        });
    }
    Ok(lengths)
}

/// Reads a lengths file.
pub fn read_lengths(path: &Path) -> Result<Vec<u64>, InputError> {
    parse_lengths(&path.display().to_string(), &read(path)?)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClusterFile {
    #[serde(default)]
    pools: Vec<PoolEntry>,
    #[serde(default)]
    nodes: Vec<NodeEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PoolEntry {
    nodes: u32,
    gpus: u32,
    #[serde(default)]
    gpu: Option<String>,
    #[serde(default)]
    nics: Option<u32>,
    #[serde(default)]
    nic_gbps: Option<f64>,
    #[serde(default)]
    rack: Option<u32>,
    #[serde(default)]
    block: Option<u32>,
    #[serde(default)]
    zone: Option<String>,
    #[serde(default)]
    name: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeEntry {
    name: String,
    gpus: u32,
    #[serde(default)]
    gpu: Option<String>,
    #[serde(default)]
    nics: Vec<NicEntry>,
    #[serde(default)]
    rack: Option<String>,
    #[serde(default)]
    block: Option<String>,
    #[serde(default)]
    zone: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NicEntry {
    name: String,
    gbps: f64,
    #[serde(default)]
    gpus: Vec<u32>,
}

fn parse_structured<T: for<'de> Deserialize<'de>>(
    path: &str,
    text: &str,
    what: &'static str,
) -> Result<T, InputError> {
    let bad = |reason: String| InputError::BadFile {
        path: path.to_string(),
        what,
        reason,
    };
    if path.ends_with(".json") {
        serde_json::from_str(text).map_err(|e| bad(e.to_string()))
    } else {
        serde_saphyr::from_str(text).map_err(|e| bad(e.to_string()))
    }
}

/// Parses a cluster file's text (YAML, or JSON when `path` ends in `.json`).
pub fn parse_cluster_file(path: &str, text: &str) -> Result<Cluster, InputError> {
    let file: ClusterFile = parse_structured(path, text, "cluster")?;
    let mut shorthand = Vec::new();
    for pool in &file.pools {
        let mut options = Vec::new();
        if let Some(v) = &pool.gpu {
            options.push(format!("gpu={v}"));
        }
        if let Some(v) = pool.nics {
            options.push(format!("nics={v}"));
        }
        if let Some(v) = pool.nic_gbps {
            options.push(format!("nic-gbps={v}"));
        }
        if let Some(v) = pool.rack {
            options.push(format!("rack={v}"));
        }
        if let Some(v) = pool.block {
            options.push(format!("block={v}"));
        }
        if let Some(v) = &pool.zone {
            options.push(format!("zone={v}"));
        }
        if let Some(v) = &pool.name {
            options.push(format!("name={v}"));
        }
        shorthand.push(format!(
            "{}x{}:{}",
            pool.nodes,
            pool.gpus,
            options.join(",")
        ));
    }
    let mut cluster = if shorthand.is_empty() {
        Cluster::default()
    } else {
        parse_cluster(&shorthand.join("+"))?
    };
    for entry in file.nodes {
        if entry.gpus == 0 {
            return Err(InputError::BadFile {
                path: path.to_string(),
                what: "cluster",
                reason: format!("node {}: gpus must be at least 1", entry.name),
            });
        }
        let nics: Vec<Nic> = entry
            .nics
            .into_iter()
            .map(|n| Nic {
                name: n.name,
                gbps: n.gbps,
                gpus: n.gpus,
            })
            .collect();
        for nic in &nics {
            let bad = !(nic.gbps.is_finite() && nic.gbps > 0.0)
                || nic.gpus.iter().any(|g| *g >= entry.gpus);
            if bad {
                return Err(InputError::BadFile {
                    path: path.to_string(),
                    what: "cluster",
                    reason: format!(
                        "node {}: NIC {} needs a positive gbps and GPU indices below {}",
                        entry.name, nic.name, entry.gpus
                    ),
                });
            }
        }
        let gpu = GpuModel::preset(entry.gpu.as_deref().unwrap_or("h100"))?;
        cluster.nodes.push(Node {
            rack: entry.rack.unwrap_or_else(|| format!("{}-rack", entry.name)),
            block: entry
                .block
                .unwrap_or_else(|| format!("{}-block", entry.name)),
            zone: entry.zone.unwrap_or_else(|| "zone-a".to_string()),
            cpu_cores: 14 * entry.gpus,
            memory_gib: 256 * entry.gpus,
            name: entry.name,
            gpu,
            gpus: entry.gpus,
            nics,
        });
    }
    if cluster.nodes.is_empty() {
        return Err(InputError::BadFile {
            path: path.to_string(),
            what: "cluster",
            reason: "it lists no pools and no nodes".to_string(),
        });
    }
    Ok(cluster)
}

/// A cluster from a shorthand (`64x8:nics=4`) or from a YAML/JSON file.
pub fn load_cluster(spec: &str) -> Result<Cluster, InputError> {
    let path = Path::new(spec);
    if path.is_file() {
        parse_cluster_file(spec, &read(path)?)
    } else {
        Ok(parse_cluster(spec)?)
    }
}

/// A model from a preset name, a YAML/JSON file, or a Hugging Face model
/// directory (the shapes of its `config.json`).
pub fn load_model(spec: &str) -> Result<ModelSpec, InputError> {
    let path = Path::new(spec);
    // A Hugging Face model directory: the shapes of its config.json.
    if path.is_dir() {
        let config = path.join("config.json");
        let text = read(&config)?;
        let map: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(&text).map_err(|e| InputError::BadFile {
                path: config.display().to_string(),
                what: "model config",
                reason: e.to_string(),
            })?;
        return Ok(ModelSpec::from_hf_config(spec, &map)?);
    }
    if !path.is_file() {
        let preset = ModelSpec::preset(spec);
        // A name written as a file is reported as the file it names.
        let file_like = spec.contains('/')
            || matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("json" | "yaml" | "yml")
            );
        if preset.is_err() && file_like {
            return Err(InputError::Read {
                path: spec.to_string(),
                reason: if path.exists() {
                    "it is not a regular file".to_string()
                } else {
                    format!(
                        "no such model file ({})",
                        preset.err().map_or(String::new(), |e| e.to_string())
                    )
                },
            });
        }
        return Ok(preset?);
    }
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct ModelFile {
        name: Option<String>,
        layers: u32,
        hidden: u32,
        heads: u32,
        kv_heads: u32,
        ffn: u32,
        vocab: u32,
    }
    let file: ModelFile = parse_structured(spec, &read(path)?, "model")?;
    let model = ModelSpec {
        name: file.name.unwrap_or_else(|| spec.to_string()),
        layers: file.layers,
        hidden: file.hidden,
        heads: file.heads,
        kv_heads: file.kv_heads,
        ffn: file.ffn,
        vocab: file.vocab,
        tied_embeddings: false,
    };
    model.validate()?;
    Ok(model)
}

/// A profile (`weft-trainer profile`'s JSON), checked.
pub fn load_profile(path: &str) -> Result<crate::profile::Profile, InputError> {
    let profile: crate::profile::Profile =
        parse_structured(path, &read(Path::new(path))?, "profile")?;
    profile.validate().map_err(|e| InputError::BadFile {
        path: path.to_string(),
        what: "profile",
        reason: e.to_string(),
    })?;
    Ok(profile)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_with_comments_and_blank_lines() {
        let text = "# header\n100\n\n 2000  # trailing\n7\n";
        assert_eq!(parse_lengths("f", text).unwrap(), vec![100, 2000, 7]);
    }

    #[test]
    fn bad_lengths_are_named_with_their_line() {
        let err = parse_lengths("data.txt", "10\n0\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("data.txt:2") && err.contains("\"0\""), "{err}");
        let err = parse_lengths("data.txt", "10\nabc\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("data.txt:2") && err.contains("abc"), "{err}");
        let err = parse_lengths("data.txt", "-5\n").unwrap_err().to_string();
        assert!(err.contains("data.txt:1"), "{err}");
        let err = parse_lengths("empty.txt", "# nothing\n\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("empty.txt holds no sequence lengths"), "{err}");
    }

    #[test]
    fn cluster_file_with_pools_and_nodes() {
        let yaml = "pools:\n  - {nodes: 2, gpus: 8, nics: 4}\nnodes:\n  - name: odd-0\n    gpu: h200\n    gpus: 4\n    nics: [{name: mlx5_0, gbps: 200, gpus: [0, 1]}]\n";
        let cluster = parse_cluster_file("c.yaml", yaml).unwrap();
        assert_eq!(cluster.nodes.len(), 3);
        assert_eq!(cluster.nodes[0].nics.len(), 4);
        assert_eq!(cluster.nodes[2].gpu.name, "h200");
        let json = r#"{"pools":[{"nodes":1,"gpus":4,"gpu":"a100-80g"}]}"#;
        assert_eq!(parse_cluster_file("c.json", json).unwrap().gpus(), 4);
    }

    #[test]
    fn bad_cluster_files_say_what_is_wrong() {
        let err = parse_cluster_file("c.yaml", "pools:\n  - {nodes: 2, gpus: 8, speed: 3}\n")
            .unwrap_err();
        assert!(
            err.to_string().contains("c.yaml") && err.to_string().contains("speed"),
            "{err}"
        );
        let err = parse_cluster_file("c.yaml", "{}").unwrap_err();
        assert!(err.to_string().contains("no pools and no nodes"), "{err}");
        let err = parse_cluster_file("c.yaml", "pools:\n  - {nodes: 2, gpus: 8, gpu: v100}\n")
            .unwrap_err();
        assert!(err.to_string().contains("v100"), "{err}");
        let err = parse_cluster_file(
            "c.yaml",
            "nodes:\n  - {name: n, gpus: 2, nics: [{name: a, gbps: 100, gpus: [5]}]}\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("GPU indices below 2"), "{err}");
    }

    #[test]
    fn a_model_named_as_a_file_that_is_missing_is_reported_as_a_file() {
        let err = load_model("nosuch.json").unwrap_err();
        assert_eq!(err.category(), "input_io");
        assert!(
            err.to_string().contains("nosuch.json")
                && err.to_string().contains("no such model file"),
            "{err}"
        );
        assert!(load_model("models/x").is_err());
        // A bare unknown name is still an unknown preset.
        let err = load_model("nosuch").unwrap_err();
        assert_eq!(err.category(), "model_description");
        assert_eq!(load_model("tiny").unwrap().name, "tiny");
    }

    /// A Hugging Face model directory is priced by its config.json's
    /// shapes, the ones the trainer builds the model from.
    #[test]
    fn a_hugging_face_model_directory_gives_its_configs_shapes() {
        let dir = std::env::temp_dir().join(format!("weft-hf-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let write = |config: &str| std::fs::write(dir.join("config.json"), config).unwrap();
        write(
            r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
                "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                "vocab_size": 128256, "rope_theta": 500000.0}"#,
        );
        let spec = load_model(dir.to_str().unwrap()).unwrap();
        assert_eq!(
            (
                spec.layers,
                spec.hidden,
                spec.heads,
                spec.kv_heads,
                spec.ffn,
                spec.vocab
            ),
            (32, 4096, 32, 8, 14336, 128256)
        );
        assert!(!spec.tied_embeddings);
        // Tied embeddings: one table fewer to keep, and to price.
        write(
            r#"{"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                "tie_word_embeddings": true}"#,
        );
        let tied = load_model(dir.to_str().unwrap()).unwrap();
        assert!(tied.tied_embeddings);
        assert_eq!(spec.params() - tied.params(), 128256.0 * 4096.0);
        // Missing or bad fields are named.
        write(r#"{"hidden_size": 4096}"#);
        let err = load_model(dir.to_str().unwrap()).unwrap_err().to_string();
        assert!(err.contains("num_attention_heads is missing"), "{err}");
        write(
            r#"{"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
                  "intermediate_size": 8, "vocab_size": 10, "head_dim": 32}"#,
        );
        let err = load_model(dir.to_str().unwrap()).unwrap_err().to_string();
        assert!(err.contains("head_dim 32 differs"), "{err}");
        write("not json");
        let err = load_model(dir.to_str().unwrap()).unwrap_err().to_string();
        assert!(err.contains("config.json"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
