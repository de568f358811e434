//! The cluster as the planner sees it: nodes, their GPUs, their NICs and which GPUs
//! sit close to which NIC, and where each node sits in the network (zone, block,
//! rack). Heterogeneous clusters are lists of pools of identical nodes.
//!
//! A cluster can be written as a shorthand, used by the `weft` CLI and by the local
//! test cluster alike:
//!
//! ```text
//! 16x8                          16 nodes of 8 GPUs (h100 preset, 8 NICs of 400 Gbit/s)
//! 64x8:nics=4                   4 NICs per node, 2 GPUs close to each
//! 8x8:nics=8+8x4:gpu=a100-80g,nics=2   two pools in one cluster
//! ```
//!
//! Pool options (`key=value`, comma-separated after `:`): `gpu` (a preset name, see
//! [`GpuModel::preset`]), `nics`, `nic-gbps`, `rack` (nodes per rack), `block`
//! (racks per block), `zone`, `cpu` (cores), `mem` (GiB), `name` (prefix of the node
//! names; by default pools are named `gpu-a`, `gpu-b`, ...).

use std::fmt;

/// The GPU model of nodes that name none (and of CPU workers, to plan with).
pub const DEFAULT_GPU: &str = "h100";

/// A GPU model with the constants the cost model needs.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GpuModel {
    /// Preset name, e.g. `h100`.
    pub name: String,
    /// Value of the `nvidia.com/gpu.product` label that GPU feature discovery sets.
    pub product_label: String,
    /// Dense bf16 tensor-core peak, TFLOP/s.
    pub peak_bf16_tflops: f64,
    /// Device memory, GiB.
    pub memory_gib: f64,
    /// NVLink bandwidth per GPU, one direction, GB/s.
    pub nvlink_gbytes_per_s: f64,
    /// Line rate of the NICs such nodes usually carry, Gbit/s.
    pub default_nic_gbps: f64,
    /// Host link (PCIe) bandwidth one way, GB/s achievable: what offloaded
    /// activations move at.
    #[serde(default = "default_pcie")]
    pub pcie_gbytes_per_s: f64,
}

fn default_pcie() -> f64 {
    25.0
}

impl GpuModel {
    /// Names of the presets, the default first.
    pub const PRESETS: [&'static str; 3] = ["h100", "a100-80g", "h200"];

    /// A GPU preset by name.
    ///
    /// Constants are from NVIDIA's datasheets: A100 80GB SXM (312 TFLOP/s dense
    /// bf16, 80 GB HBM2e, NVLink 3 at 600 GB/s total, i.e. 300 GB/s each way; nodes
    /// with HDR 200 Gbit/s NICs); H100 SXM5 (989 TFLOP/s dense bf16, 80 GB HBM3,
    /// NVLink 4 at 900 GB/s total; NDR 400 Gbit/s NICs); H200 SXM (same compute as
    /// H100, 141 GB HBM3e). Host links: PCIe Gen4 x16 (A100) and Gen5 x16
    /// (H100, H200), 32 and 64 GB/s each way nominal, taken at about 80%.
    pub fn preset(name: &str) -> Result<GpuModel, ClusterError> {
        let (product, tflops, memory, nvlink, nic, pcie) = match name {
            "a100-80g" => ("NVIDIA-A100-SXM4-80GB", 312.0, 80.0, 300.0, 200.0, 25.0),
            "h100" => ("NVIDIA-H100-80GB-HBM3", 989.0, 80.0, 450.0, 400.0, 50.0),
            "h200" => ("NVIDIA-H200", 989.0, 141.0, 450.0, 400.0, 50.0),
            other => {
                return Err(ClusterError::UnknownGpuPreset {
                    name: other.to_string(),
                });
            }
        };
        Ok(GpuModel {
            name: name.to_string(),
            product_label: product.to_string(),
            peak_bf16_tflops: tflops,
            memory_gib: memory,
            nvlink_gbytes_per_s: nvlink,
            default_nic_gbps: nic,
            pcie_gbytes_per_s: pcie,
        })
    }
}

/// One NIC of a node.
#[derive(Clone, Debug, PartialEq)]
pub struct Nic {
    pub name: String,
    /// Line rate, Gbit/s.
    pub gbps: f64,
    /// GPUs (indices on the node) close to this NIC.
    pub gpus: Vec<u32>,
}

/// One node.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub name: String,
    pub gpu: GpuModel,
    pub gpus: u32,
    pub nics: Vec<Nic>,
    pub zone: String,
    pub block: String,
    pub rack: String,
    pub cpu_cores: u32,
    pub memory_gib: u32,
}

/// A whole cluster.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Cluster {
    pub nodes: Vec<Node>,
}

impl Cluster {
    /// Total GPUs.
    pub fn gpus(&self) -> u64 {
        self.nodes.iter().map(|n| u64::from(n.gpus)).sum()
    }
}

/// A pool of identical nodes, as written in the shorthand.
#[derive(Clone, Debug, PartialEq)]
pub struct PoolSpec {
    pub name: String,
    pub nodes: u32,
    pub gpus_per_node: u32,
    pub gpu: GpuModel,
    pub nics_per_node: u32,
    pub nic_gbps: f64,
    pub nodes_per_rack: u32,
    pub racks_per_block: u32,
    pub zone: String,
    pub cpu_cores: u32,
    pub memory_gib: u32,
}

/// What is wrong with a cluster description.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ClusterError {
    #[error("cluster description is empty")]
    Empty,
    #[error(
        "pool {pool:?}: expected NODESxGPUS (e.g. 16x8), optionally followed by :key=value,..."
    )]
    PoolShape { pool: String },
    #[error("pool {pool:?}: {field} must be a whole number of at least {min}, got {value:?}")]
    BadCount {
        pool: String,
        field: &'static str,
        min: u32,
        value: String,
    },
    #[error("pool {pool:?}: {field} must be a positive number, got {value:?}")]
    BadNumber {
        pool: String,
        field: &'static str,
        value: String,
    },
    #[error(
        "pool {pool:?}: unknown option {key:?} (known: gpu, nics, nic-gbps, rack, block, zone, cpu, mem, name)"
    )]
    UnknownOption { pool: String, key: String },
    #[error("pool {pool:?}: option {option:?} is not of the form key=value")]
    OptionShape { pool: String, option: String },
    #[error(
        "pool {pool:?}: name {name:?} must be lowercase letters, digits and '-', starting with a letter"
    )]
    BadName { pool: String, name: String },
    #[error("two pools are both named {name:?}; give one of them name=...")]
    DuplicatePoolName { name: String },
    #[error("unknown GPU preset {name:?} (known: h100, a100-80g, h200)")]
    UnknownGpuPreset { name: String },
}

impl ClusterError {
    /// A stable, machine-readable name for the kind of failure.
    pub fn category(&self) -> &'static str {
        "cluster_description"
    }
}

/// Parses a cluster shorthand into its pools.
pub fn parse_pools(text: &str) -> Result<Vec<PoolSpec>, ClusterError> {
    let text = text.trim();
    if text.is_empty() {
        return Err(ClusterError::Empty);
    }
    let mut pools = Vec::new();
    for (index, part) in text.split('+').enumerate() {
        let pool = parse_pool(part.trim(), index)?;
        if pools.iter().any(|p: &PoolSpec| p.name == pool.name) {
            return Err(ClusterError::DuplicatePoolName { name: pool.name });
        }
        pools.push(pool);
    }
    Ok(pools)
}

fn parse_pool(text: &str, index: usize) -> Result<PoolSpec, ClusterError> {
    let shape_err = || ClusterError::PoolShape {
        pool: text.to_string(),
    };
    let (shape, options) = match text.split_once(':') {
        Some((shape, options)) => (shape, Some(options)),
        None => (text, None),
    };
    let (nodes, gpus) = shape.split_once('x').ok_or_else(shape_err)?;
    let count = |field: &'static str, min: u32, value: &str| -> Result<u32, ClusterError> {
        value
            .trim()
            .parse::<u32>()
            .ok()
            .filter(|v| *v >= min)
            .ok_or_else(|| ClusterError::BadCount {
                pool: text.to_string(),
                field,
                min,
                value: value.to_string(),
            })
    };
    let nodes = count("node count", 1, nodes)?;
    let gpus_per_node = count("GPUs per node", 1, gpus)?;

    let mut gpu = GpuModel::preset(DEFAULT_GPU)?;
    let mut nics_per_node = None;
    let mut nic_gbps = None;
    let mut nodes_per_rack = 4;
    let mut racks_per_block = 4;
    let mut zone = "zone-a".to_string();
    let mut cpu_cores = None;
    let mut memory_gib = None;
    let letter = char::from(b'a' + (index % 26) as u8);
    let mut name = format!("gpu-{letter}");

    for option in options.into_iter().flat_map(|o| o.split(',')) {
        let option = option.trim();
        if option.is_empty() {
            continue;
        }
        let (key, value) = option
            .split_once('=')
            .ok_or_else(|| ClusterError::OptionShape {
                pool: text.to_string(),
                option: option.to_string(),
            })?;
        let value = value.trim();
        match key.trim() {
            "gpu" => gpu = GpuModel::preset(value)?,
            "nics" => nics_per_node = Some(count("nics", 0, value)?),
            "nic-gbps" => {
                nic_gbps = Some(
                    value
                        .parse::<f64>()
                        .ok()
                        .filter(|v| v.is_finite() && *v > 0.0)
                        .ok_or_else(|| ClusterError::BadNumber {
                            pool: text.to_string(),
                            field: "nic-gbps",
                            value: value.to_string(),
                        })?,
                )
            }
            "rack" => nodes_per_rack = count("rack (nodes per rack)", 1, value)?,
            "block" => racks_per_block = count("block (racks per block)", 1, value)?,
            "zone" => zone = checked_name(text, value)?,
            "cpu" => cpu_cores = Some(count("cpu", 1, value)?),
            "mem" => memory_gib = Some(count("mem (GiB)", 1, value)?),
            "name" => name = checked_name(text, value)?,
            other => {
                return Err(ClusterError::UnknownOption {
                    pool: text.to_string(),
                    key: other.to_string(),
                });
            }
        }
    }
    Ok(PoolSpec {
        name,
        nodes,
        gpus_per_node,
        nics_per_node: nics_per_node.unwrap_or(gpus_per_node),
        nic_gbps: nic_gbps.unwrap_or(gpu.default_nic_gbps),
        gpu,
        nodes_per_rack,
        racks_per_block,
        zone,
        // A DGX-class node has about 14 cores and 256 GiB per GPU; tests only need
        // the scheduler to see plausible numbers.
        cpu_cores: cpu_cores.unwrap_or(14 * gpus_per_node),
        memory_gib: memory_gib.unwrap_or(256 * gpus_per_node),
    })
}

/// Names become parts of Kubernetes object names and label values: keep them DNS-safe.
fn checked_name(pool: &str, name: &str) -> Result<String, ClusterError> {
    let ok = name.len() <= 40
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.ends_with('-');
    if ok {
        Ok(name.to_string())
    } else {
        Err(ClusterError::BadName {
            pool: pool.to_string(),
            name: name.to_string(),
        })
    }
}

/// GPU `g` of `gpus` is close to NIC `g * nics / gpus`: GPUs are spread evenly in
/// index order, as on DGX-class boards where consecutive GPUs share a PCIe switch.
pub fn even_nic_affinity(gpus: u32, nics: u32, gbps: f64) -> Vec<Nic> {
    (0..nics)
        .map(|k| Nic {
            name: format!("mlx5_{k}"),
            gbps,
            gpus: (0..gpus)
                .filter(|g| u64::from(*g) * u64::from(nics) / u64::from(gpus) == u64::from(k))
                .collect(),
        })
        .collect()
}

impl PoolSpec {
    /// The nodes of this pool, numbered from `first_index`.
    pub fn nodes_from(&self, first_index: u32) -> Vec<Node> {
        (first_index..first_index + self.nodes)
            .map(|i| {
                let rack = i / self.nodes_per_rack;
                let block = rack / self.racks_per_block;
                Node {
                    name: format!("{}-{i}", self.name),
                    gpu: self.gpu.clone(),
                    gpus: self.gpus_per_node,
                    nics: even_nic_affinity(self.gpus_per_node, self.nics_per_node, self.nic_gbps),
                    zone: self.zone.clone(),
                    block: format!("{}-block-{block}", self.name),
                    rack: format!("{}-rack-{rack}", self.name),
                    cpu_cores: self.cpu_cores,
                    memory_gib: self.memory_gib,
                }
            })
            .collect()
    }
}

/// Builds the cluster a shorthand describes.
pub fn parse_cluster(text: &str) -> Result<Cluster, ClusterError> {
    let pools = parse_pools(text)?;
    Ok(Cluster {
        nodes: pools.iter().flat_map(|p| p.nodes_from(0)).collect(),
    })
}

impl fmt::Display for PoolSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}x{}:gpu={},nics={},nic-gbps={},rack={},block={},zone={},cpu={},mem={},name={}",
            self.nodes,
            self.gpus_per_node,
            self.gpu.name,
            self.nics_per_node,
            self.nic_gbps,
            self.nodes_per_rack,
            self.racks_per_block,
            self.zone,
            self.cpu_cores,
            self.memory_gib,
            self.name
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn plain_shape_uses_h100_defaults() {
        let cluster = parse_cluster("16x8").unwrap();
        assert_eq!(cluster.nodes.len(), 16);
        assert_eq!(cluster.gpus(), 128);
        let node = &cluster.nodes[5];
        assert_eq!(node.name, "gpu-a-5");
        assert_eq!(node.gpu.product_label, "NVIDIA-H100-80GB-HBM3");
        assert_eq!(node.nics.len(), 8);
        assert_eq!(node.nics[3].gpus, vec![3]);
        assert_eq!(node.rack, "gpu-a-rack-1");
        assert_eq!(node.block, "gpu-a-block-0");
    }

    #[test]
    fn heterogeneous_pools() {
        let cluster = parse_cluster("2x8:nics=8+3x4:gpu=a100-80g,nics=2").unwrap();
        assert_eq!(cluster.nodes.len(), 5);
        let small = &cluster.nodes[4];
        assert_eq!(small.name, "gpu-b-2");
        assert_eq!(small.gpus, 4);
        assert_eq!(small.gpu.name, "a100-80g");
        assert_eq!(small.nics.len(), 2);
        assert_eq!(small.nics[0].gpus, vec![0, 1]);
        assert_eq!(small.nics[1].gpus, vec![2, 3]);
        assert_eq!(small.nics[0].gbps, 200.0);
    }

    #[test]
    fn shorthand_round_trips_through_display() {
        let pools = parse_pools("3x4:gpu=h200,nics=2,rack=2,block=3,name=big,zone=z1").unwrap();
        let again = parse_pools(&pools[0].to_string()).unwrap();
        assert_eq!(pools, again);
    }

    #[test]
    fn bad_descriptions_name_the_problem() {
        let cases = [
            ("", "empty"),
            ("16", "NODESxGPUS"),
            ("0x8", "node count"),
            ("4x0", "GPUs per node"),
            ("4xeight", "GPUs per node"),
            ("4x8:gpu=v100", "unknown GPU preset \"v100\""),
            ("4x8:speed=3", "unknown option \"speed\""),
            ("4x8:nics", "key=value"),
            ("4x8:nic-gbps=-1", "nic-gbps"),
            ("4x8:name=Big", "name \"Big\""),
            ("2x8:name=a+2x8:name=a", "both named"),
        ];
        for (text, expected) in cases {
            let err = parse_pools(text).expect_err(text);
            assert!(
                err.to_string().contains(expected),
                "{text:?}: {err} should mention {expected:?}"
            );
        }
    }

    proptest! {
        #[test]
        fn every_gpu_is_close_to_at_most_one_nic(gpus in 1u32..=16, nics in 0u32..=16) {
            let list = even_nic_affinity(gpus, nics, 400.0);
            prop_assert_eq!(list.len() as u32, nics);
            let mut seen = vec![0u32; gpus as usize];
            for nic in &list {
                for g in &nic.gpus { seen[*g as usize] += 1; }
            }
            // With at least one NIC every GPU has exactly one; with none, none.
            let expected = u32::from(nics > 0);
            prop_assert!(seen.iter().all(|c| *c == expected));
            // Spread evenly: NIC loads differ by at most one GPU.
            if nics > 0 && nics <= gpus {
                let loads: Vec<usize> = list.iter().map(|n| n.gpus.len()).collect();
                prop_assert!(loads.iter().max().unwrap() - loads.iter().min().unwrap() <= 1);
            }
        }

        #[test]
        fn racks_hold_at_most_their_size(nodes in 1u32..200, per_rack in 1u32..16) {
            let pools = parse_pools(&format!("{nodes}x8:rack={per_rack}")).unwrap();
            let cluster = pools[0].nodes_from(0);
            let mut counts = std::collections::BTreeMap::new();
            for n in &cluster { *counts.entry(n.rack.clone()).or_insert(0u32) += 1; }
            prop_assert!(counts.values().all(|c| *c <= per_rack));
            prop_assert_eq!(counts.len() as u32, nodes.div_ceil(per_rack));
        }
    }
}
