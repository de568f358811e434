//! How a node tells weft its GPU and NIC topology.
//!
//! weft reads standard labels where they exist (`nvidia.com/gpu.product`, set by
//! NVIDIA GPU feature discovery; `topology.kubernetes.io/zone`) and defines its own
//! for what has no standard name:
//!
//! | key | kind | value |
//! |---|---|---|
//! | `nvidia.com/gpu` | allocatable resource | GPUs on the node |
//! | `nvidia.com/gpu.product` | label | GPU product, e.g. `NVIDIA-H100-80GB-HBM3` |
//! | `topology.kubernetes.io/zone` | label | zone |
//! | `topology.weft.dev/block` | label | network block (a group of racks under one spine) |
//! | `topology.weft.dev/rack` | label | rack (nodes under one leaf switch) |
//! | `topology.weft.dev/nics` | annotation | JSON list of the node's NICs, see [`Nic`] |
//!
//! The NIC annotation is a JSON array, one object per NIC:
//! `[{"name":"mlx5_0","gbps":400,"gpus":[0,1]},{"name":"mlx5_1","gbps":400,"gpus":[2,3]}]`.
//! `gpus` lists the GPU indices (0-based, as CUDA numbers them on the node) that sit
//! close to the NIC (same PCIe switch or NUMA node). A GPU appears under at most one
//! NIC; a GPU under none is treated as equally far from all of them.

use std::collections::BTreeSet;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Extended resource that counts a node's GPUs.
pub const RESOURCE_GPU: &str = "nvidia.com/gpu";
/// GPU product label, as NVIDIA GPU feature discovery sets it.
pub const LABEL_GPU_PRODUCT: &str = "nvidia.com/gpu.product";
/// Well-known zone label.
pub const LABEL_ZONE: &str = "topology.kubernetes.io/zone";
/// Network block: racks that share a spine. weft packs a job into as few blocks as it can.
pub const LABEL_BLOCK: &str = "topology.weft.dev/block";
/// Rack: nodes that share a leaf switch. weft packs a job into as few racks as it can.
pub const LABEL_RACK: &str = "topology.weft.dev/rack";
/// Annotation that lists a node's NICs and the GPUs close to each, as JSON.
pub const ANNOTATION_NICS: &str = "topology.weft.dev/nics";

/// One network card of a node, as carried in the [`ANNOTATION_NICS`] annotation.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Nic {
    /// Device name, e.g. `mlx5_0`. Unique on the node.
    pub name: String,
    /// Line rate in Gbit/s.
    pub gbps: f64,
    /// Indices of the GPUs close to this NIC.
    #[serde(default)]
    pub gpus: Vec<u32>,
}

/// What is wrong with a node's topology description.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TopologyError {
    #[error("annotation {ANNOTATION_NICS} is not a JSON list of NICs: {0}")]
    NicsNotJson(String),
    #[error("annotation {ANNOTATION_NICS}: NIC #{index} has an empty name")]
    NicNameEmpty { index: usize },
    #[error("annotation {ANNOTATION_NICS}: NIC name {name:?} appears twice")]
    NicNameDuplicate { name: String },
    #[error(
        "annotation {ANNOTATION_NICS}: NIC {name:?} has bandwidth {gbps} Gbit/s; it must be a positive number"
    )]
    NicBandwidth { name: String, gbps: f64 },
    #[error(
        "annotation {ANNOTATION_NICS}: NIC {name:?} lists GPU {gpu}, but the node has {gpus_on_node} GPUs (indices 0..{gpus_on_node})"
    )]
    NicGpuOutOfRange {
        name: String,
        gpu: u32,
        gpus_on_node: u32,
    },
    #[error("annotation {ANNOTATION_NICS}: GPU {gpu} is listed under more than one NIC")]
    GpuUnderTwoNics { gpu: u32 },
}

impl TopologyError {
    /// A stable, machine-readable name for the kind of failure.
    pub fn category(&self) -> &'static str {
        "node_topology"
    }
}

/// Parses and checks the [`ANNOTATION_NICS`] annotation of a node with `gpus_on_node` GPUs.
pub fn parse_nics(value: &str, gpus_on_node: u32) -> Result<Vec<Nic>, TopologyError> {
    let nics: Vec<Nic> =
        serde_json::from_str(value).map_err(|e| TopologyError::NicsNotJson(e.to_string()))?;
    validate_nics(&nics, gpus_on_node)?;
    Ok(nics)
}

/// Checks a NIC list against the rules in the module documentation.
pub fn validate_nics(nics: &[Nic], gpus_on_node: u32) -> Result<(), TopologyError> {
    let mut names = BTreeSet::new();
    let mut seen_gpus = BTreeSet::new();
    for (index, nic) in nics.iter().enumerate() {
        if nic.name.trim().is_empty() {
            return Err(TopologyError::NicNameEmpty { index });
        }
        if !names.insert(nic.name.as_str()) {
            return Err(TopologyError::NicNameDuplicate {
                name: nic.name.clone(),
            });
        }
        if !(nic.gbps.is_finite() && nic.gbps > 0.0) {
            return Err(TopologyError::NicBandwidth {
                name: nic.name.clone(),
                gbps: nic.gbps,
            });
        }
        for &gpu in &nic.gpus {
            if gpu >= gpus_on_node {
                return Err(TopologyError::NicGpuOutOfRange {
                    name: nic.name.clone(),
                    gpu,
                    gpus_on_node,
                });
            }
            if !seen_gpus.insert(gpu) {
                return Err(TopologyError::GpuUnderTwoNics { gpu });
            }
        }
    }
    Ok(())
}

/// Renders a NIC list as the value of the [`ANNOTATION_NICS`] annotation.
pub fn format_nics(nics: &[Nic]) -> String {
    // A Vec of plain structs always serialises; fall back to an empty list rather than panic.
    serde_json::to_string(nics).unwrap_or_else(|_| "[]".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nic(name: &str, gbps: f64, gpus: &[u32]) -> Nic {
        Nic {
            name: name.into(),
            gbps,
            gpus: gpus.to_vec(),
        }
    }

    #[test]
    fn round_trips_a_valid_list() {
        let nics = vec![nic("mlx5_0", 400.0, &[0, 1]), nic("mlx5_1", 400.0, &[2, 3])];
        let text = format_nics(&nics);
        assert_eq!(parse_nics(&text, 4).unwrap(), nics);
    }

    #[test]
    fn accepts_gpus_far_from_every_nic_and_no_nics() {
        assert!(parse_nics(r#"[{"name":"eth0","gbps":100}]"#, 8).is_ok());
        assert_eq!(parse_nics("[]", 8).unwrap(), vec![]);
    }

    #[test]
    fn rejects_each_kind_of_bad_annotation_with_a_message_naming_it() {
        let cases: &[(&str, u32, &str)] = &[
            ("not json", 8, "is not a JSON list"),
            (r#"{"name":"a"}"#, 8, "is not a JSON list"),
            (r#"[{"name":"","gbps":1}]"#, 8, "empty name"),
            (
                r#"[{"name":"a","gbps":1},{"name":"a","gbps":1}]"#,
                8,
                "appears twice",
            ),
            (r#"[{"name":"a","gbps":0}]"#, 8, "positive number"),
            (r#"[{"name":"a","gbps":-5}]"#, 8, "positive number"),
            (
                r#"[{"name":"a","gbps":1,"gpus":[8]}]"#,
                8,
                "node has 8 GPUs",
            ),
            (
                r#"[{"name":"a","gbps":1,"gpus":[1]},{"name":"b","gbps":1,"gpus":[1]}]"#,
                8,
                "more than one NIC",
            ),
            (r#"[{"name":"a","gbps":1,"speed":3}]"#, 8, "unknown field"),
        ];
        for (value, gpus, expected) in cases {
            let err = parse_nics(value, *gpus).expect_err(value);
            assert!(
                err.to_string().contains(expected),
                "{value}: {err} should mention {expected:?}"
            );
            assert!(err.to_string().contains(ANNOTATION_NICS));
        }
    }
}
