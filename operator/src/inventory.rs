//! Observe step for nodes: turns Kubernetes Node objects into the planner's
//! cluster model, reading the GPU capacity, the GPU product, the zone/block/rack
//! labels and the NIC annotation defined in `weft_crds::topology`.
//!
//! Pure: no client. A node that cannot be understood is reported with a typed
//! error naming the node and the field, and the others are still used.

use std::borrow::Borrow;

use k8s_openapi::api::core::v1::Node as KubeNode;
use weft_crds::topology::{self, TopologyError};
use weft_planner::cluster::{GpuModel, Nic, Node};

/// A node as weft sees it, with what the scheduler needs to know about it:
/// a GPU node, or a CPU-only one (`node.gpus` 0), where CPU-only workers run.
#[derive(Clone, Debug, PartialEq)]
pub struct ClusterNode {
    pub node: Node,
    /// The node's Ready condition is True.
    pub ready: bool,
    /// Not cordoned (`spec.unschedulable` unset).
    pub schedulable: bool,
}

/// Why a node could not be read.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InventoryError {
    #[error("node has no name")]
    Unnamed,
    #[error("node {node}: {resource} quantity {value:?} is not a whole number")]
    BadGpuQuantity {
        node: String,
        resource: &'static str,
        value: String,
    },
    #[error(
        "node {node}: GPU product {product:?} (label {label}) is not one weft has constants for (known: {known})"
    )]
    UnknownGpuProduct {
        node: String,
        product: String,
        label: &'static str,
        known: String,
    },
    #[error("node {node}: {source}")]
    Topology {
        node: String,
        #[source]
        source: TopologyError,
    },
}

impl InventoryError {
    /// The node that cannot be read, when it has a name.
    pub fn node(&self) -> Option<&str> {
        match self {
            InventoryError::Unnamed => None,
            InventoryError::BadGpuQuantity { node, .. }
            | InventoryError::UnknownGpuProduct { node, .. }
            | InventoryError::Topology { node, .. } => Some(node),
        }
    }

    /// A stable, machine-readable name for the kind of failure.
    pub fn category(&self) -> &'static str {
        match self {
            InventoryError::Unnamed | InventoryError::BadGpuQuantity { .. } => "node_status",
            InventoryError::UnknownGpuProduct { .. } => "gpu_product",
            InventoryError::Topology { .. } => "node_topology",
        }
    }
}

/// When `node` turned not Ready (its Ready condition False or Unknown, as of
/// the condition's last transition); `None` for a Ready node, or one whose
/// condition says no time.
pub fn not_ready_since(
    node: &KubeNode,
) -> Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::Time> {
    node.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Ready" && c.status != "True")?
        .last_transition_time
        .as_ref()
}

/// The GPU preset whose product label is `product`.
pub fn gpu_model_for_product(product: &str) -> Option<GpuModel> {
    GpuModel::PRESETS
        .iter()
        .filter_map(|name| GpuModel::preset(name).ok())
        .find(|model| model.product_label == product)
}

/// Reads one node: a GPU node, or a CPU-only one (no GPUs allocatable), which
/// only CPU-only workers use. Always `Some` for a node it can read.
pub fn read_node(node: &KubeNode) -> Result<Option<ClusterNode>, InventoryError> {
    let name = node.metadata.name.clone().ok_or(InventoryError::Unnamed)?;
    let status = node.status.as_ref();
    let gpus = match status
        .and_then(|s| s.allocatable.as_ref())
        .and_then(|a| a.get(topology::RESOURCE_GPU))
    {
        None => 0,
        Some(quantity) => {
            quantity
                .0
                .parse::<u32>()
                .map_err(|_| InventoryError::BadGpuQuantity {
                    node: name.clone(),
                    resource: topology::RESOURCE_GPU,
                    value: quantity.0.clone(),
                })?
        }
    };
    let labels = node.metadata.labels.clone().unwrap_or_default();
    let label = |key: &str| labels.get(key).cloned().unwrap_or_default();
    let product = label(topology::LABEL_GPU_PRODUCT);
    // A CPU-only node has no GPU product to know and no GPU for a NIC to be
    // close to; the default model only fills the field (no GPU work goes there).
    let cpu_only = if gpus == 0 {
        GpuModel::preset(weft_planner::cluster::DEFAULT_GPU).ok()
    } else {
        None
    };
    let known = cpu_only.or_else(|| gpu_model_for_product(&product));
    let gpu = known.ok_or_else(|| InventoryError::UnknownGpuProduct {
        node: name.clone(),
        product: product.clone(),
        label: topology::LABEL_GPU_PRODUCT,
        known: GpuModel::PRESETS
            .iter()
            .filter_map(|n| GpuModel::preset(n).ok())
            .map(|m| m.product_label)
            .collect::<Vec<_>>()
            .join(", "),
    })?;
    let nics = match node
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(topology::ANNOTATION_NICS))
        .filter(|_| gpus > 0)
    {
        None => Vec::new(),
        Some(value) => topology::parse_nics(value, gpus)
            .map_err(|source| InventoryError::Topology {
                node: name.clone(),
                source,
            })?
            .into_iter()
            .map(|n| Nic {
                name: n.name,
                gbps: n.gbps,
                gpus: n.gpus,
            })
            .collect(),
    };
    let capacity = |key: &str| {
        status
            .and_then(|s| s.allocatable.as_ref())
            .and_then(|a| a.get(key))
            .map(|q| q.0.clone())
    };
    let ready = status
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    let schedulable = !node
        .spec
        .as_ref()
        .and_then(|s| s.unschedulable)
        .unwrap_or(false);
    Ok(Some(ClusterNode {
        node: Node {
            name,
            gpu,
            gpus,
            nics,
            zone: label(topology::LABEL_ZONE),
            block: label(topology::LABEL_BLOCK),
            rack: label(topology::LABEL_RACK),
            cpu_cores: capacity("cpu").and_then(|c| c.parse().ok()).unwrap_or(0),
            memory_gib: capacity("memory")
                .and_then(|m| m.strip_suffix("Gi").and_then(|g| g.parse().ok()))
                .unwrap_or(0),
        },
        ready,
        schedulable,
    }))
}

/// Reads every node; GPU nodes that could be read, and the errors of those that could not.
/// `nodes` may be the nodes themselves or shared handles to them (the
/// controller's cache), so a reconcile need not copy the cluster.
pub fn read_nodes<N: Borrow<KubeNode>>(nodes: &[N]) -> (Vec<ClusterNode>, Vec<InventoryError>) {
    let mut good = Vec::new();
    let mut bad = Vec::new();
    for node in nodes {
        match read_node(node.borrow()) {
            Ok(Some(cluster_node)) => good.push(cluster_node),
            Ok(None) => {}
            Err(err) => bad.push(err),
        }
    }
    good.sort_by(|a, b| a.node.name.cmp(&b.node.name));
    (good, bad)
}

/// Narrows the cluster to what one job may use: a node whose labels miss the
/// job's node selector, or that has a NoSchedule/NoExecute taint the job does
/// not tolerate, is not schedulable for it (a worker pinned there would wait
/// forever); and the rack of each node is read from the job's topology key.
pub fn fit_to_job<N: Borrow<KubeNode>>(
    cluster_nodes: &mut [ClusterNode],
    nodes: &[N],
    scheduling: &weft_crds::SchedulingSpec,
) {
    let by_name: std::collections::HashMap<&str, &KubeNode> = nodes
        .iter()
        .map(Borrow::borrow)
        .filter_map(|n: &KubeNode| Some((n.metadata.name.as_deref()?, n)))
        .collect();
    for cluster_node in cluster_nodes.iter_mut() {
        let Some(node) = by_name.get(cluster_node.node.name.as_str()) else {
            continue;
        };
        let empty = std::collections::BTreeMap::new();
        let labels = node.metadata.labels.as_ref().unwrap_or(&empty);
        let selected = scheduling
            .node_selector
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v));
        let tolerated = node
            .spec
            .as_ref()
            .and_then(|s| s.taints.as_ref())
            .into_iter()
            .flatten()
            .filter(|t| t.effect == "NoSchedule" || t.effect == "NoExecute")
            .all(|t| scheduling.tolerations.iter().any(|tol| tolerates(tol, t)));
        if !(selected && tolerated) {
            cluster_node.schedulable = false;
        }
        if scheduling.topology_key != topology::LABEL_RACK {
            cluster_node.node.rack = labels
                .get(&scheduling.topology_key)
                .cloned()
                .unwrap_or_default();
        }
    }
}

/// Whether a toleration tolerates a taint (the rules of the Kubernetes scheduler).
fn tolerates(
    toleration: &k8s_openapi::api::core::v1::Toleration,
    taint: &k8s_openapi::api::core::v1::Taint,
) -> bool {
    let effect_ok = toleration
        .effect
        .as_deref()
        .is_none_or(|e| e.is_empty() || e == taint.effect);
    let key = toleration.key.as_deref().unwrap_or("");
    let exists = toleration.operator.as_deref() == Some("Exists");
    let key_ok = (key.is_empty() && exists) || key == taint.key;
    let value_ok =
        exists || toleration.value.as_deref().unwrap_or("") == taint.value.as_deref().unwrap_or("");
    effect_ok && key_ok && value_ok
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{NodeCondition, NodeSpec, NodeStatus};
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use std::collections::BTreeMap;

    fn kube_node(
        name: &str,
        gpus: &str,
        product: &str,
        nics: Option<&str>,
        ready: bool,
    ) -> KubeNode {
        KubeNode {
            metadata: ObjectMeta {
                name: Some(name.into()),
                labels: Some(BTreeMap::from([
                    (topology::LABEL_GPU_PRODUCT.to_string(), product.to_string()),
                    (topology::LABEL_RACK.to_string(), "r1".to_string()),
                    (topology::LABEL_BLOCK.to_string(), "b0".to_string()),
                ])),
                annotations: nics.map(|n| {
                    BTreeMap::from([(topology::ANNOTATION_NICS.to_string(), n.to_string())])
                }),
                ..Default::default()
            },
            spec: Some(NodeSpec::default()),
            status: Some(NodeStatus {
                allocatable: Some(BTreeMap::from([
                    (topology::RESOURCE_GPU.to_string(), Quantity(gpus.into())),
                    ("cpu".to_string(), Quantity("112".into())),
                    ("memory".to_string(), Quantity("2048Gi".into())),
                ])),
                conditions: Some(vec![NodeCondition {
                    type_: "Ready".into(),
                    status: if ready { "True" } else { "False" }.into(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn reads_a_gpu_node_with_its_topology() {
        let node = kube_node(
            "n1",
            "8",
            "NVIDIA-H100-80GB-HBM3",
            Some(
                r#"[{"name":"mlx5_0","gbps":400,"gpus":[0,1,2,3]},{"name":"mlx5_1","gbps":400,"gpus":[4,5,6,7]}]"#,
            ),
            true,
        );
        let read = read_node(&node).unwrap().unwrap();
        assert!(read.ready && read.schedulable);
        assert_eq!(read.node.gpus, 8);
        assert_eq!(read.node.gpu.name, "h100");
        assert_eq!(read.node.rack, "r1");
        assert_eq!(read.node.nics[1].gpus, vec![4, 5, 6, 7]);
        assert_eq!(read.node.cpu_cores, 112);
        assert_eq!(read.node.memory_gib, 2048);
    }

    #[test]
    fn reads_cpu_only_nodes_and_reports_bad_ones_by_name() {
        let mut cpu = kube_node("cpu", "0", "", None, true);
        cpu.status
            .as_mut()
            .unwrap()
            .allocatable
            .as_mut()
            .unwrap()
            .remove(topology::RESOURCE_GPU);
        let nodes = vec![
            cpu,
            kube_node("zero", "0", "NVIDIA-H100-80GB-HBM3", None, true),
            kube_node("ok", "4", "NVIDIA-A100-SXM4-80GB", None, false),
            kube_node("odd", "eight", "NVIDIA-H100-80GB-HBM3", None, true),
            kube_node("l40", "4", "NVIDIA-L40S", None, true),
            kube_node(
                "badnic",
                "4",
                "NVIDIA-H200",
                Some(r#"[{"name":"x","gbps":1,"gpus":[9]}]"#),
                true,
            ),
        ];
        let (good, bad) = read_nodes(&nodes);
        let names: Vec<&str> = good.iter().map(|n| n.node.name.as_str()).collect();
        assert_eq!(names, ["cpu", "ok", "zero"]);
        // CPU-only nodes: no GPU, whatever their product label says.
        assert_eq!((good[0].node.gpus, good[2].node.gpus), (0, 0));
        assert!(good[0].node.nics.is_empty());
        assert_eq!(good[1].node.gpus, 4);
        assert!(!good[1].ready);
        let messages: Vec<String> = bad.iter().map(|e| e.to_string()).collect();
        assert_eq!(messages.len(), 3, "{messages:?}");
        assert!(messages[0].contains("node odd") && messages[0].contains("\"eight\""));
        assert!(messages[1].contains("node l40") && messages[1].contains("NVIDIA-L40S"));
        assert!(messages[2].contains("node badnic") && messages[2].contains("GPU 9"));
        assert_eq!(bad[1].category(), "gpu_product");
    }

    #[test]
    fn a_job_sees_only_the_nodes_its_selector_and_tolerations_allow() {
        use k8s_openapi::api::core::v1::{Taint, Toleration};
        let mut tainted = kube_node("n2", "8", "NVIDIA-H100-80GB-HBM3", None, true);
        tainted.spec = Some(NodeSpec {
            taints: Some(vec![Taint {
                key: "nvidia.com/gpu".into(),
                effect: "NoSchedule".into(),
                value: Some("present".into()),
                ..Default::default()
            }]),
            ..Default::default()
        });
        let mut pooled = kube_node("n1", "8", "NVIDIA-H100-80GB-HBM3", None, true);
        pooled
            .metadata
            .labels
            .as_mut()
            .unwrap()
            .insert("pool".into(), "a".into());
        pooled
            .metadata
            .labels
            .as_mut()
            .unwrap()
            .insert("example.com/switch".into(), "leaf-7".into());
        let nodes = vec![pooled, tainted];
        let fit = |scheduling: &weft_crds::SchedulingSpec| {
            let (mut cluster_nodes, _) = read_nodes(&nodes);
            fit_to_job(&mut cluster_nodes, &nodes, scheduling);
            cluster_nodes
                .iter()
                .map(|n| (n.node.name.clone(), n.schedulable, n.node.rack.clone()))
                .collect::<Vec<_>>()
        };
        let mut scheduling = weft_crds::SchedulingSpec::default();
        assert_eq!(
            fit(&scheduling),
            [
                ("n1".into(), true, "r1".into()),
                ("n2".into(), false, "r1".into())
            ]
        );
        scheduling.tolerations = vec![Toleration {
            key: Some("nvidia.com/gpu".into()),
            operator: Some("Exists".into()),
            ..Default::default()
        }];
        scheduling.node_selector = BTreeMap::from([("pool".to_string(), "a".to_string())]);
        scheduling.topology_key = "example.com/switch".into();
        assert_eq!(
            fit(&scheduling),
            [
                ("n1".into(), true, "leaf-7".into()),
                ("n2".into(), false, String::new())
            ]
        );
        scheduling.node_selector.clear();
        assert!(
            fit(&scheduling)[1].1,
            "the toleration admits the tainted node"
        );
        // A toleration of another value does not.
        scheduling.tolerations = vec![Toleration {
            key: Some("nvidia.com/gpu".into()),
            operator: Some("Equal".into()),
            value: Some("absent".into()),
            effect: Some("NoSchedule".into()),
            ..Default::default()
        }];
        assert!(!fit(&scheduling)[1].1);
    }
}
