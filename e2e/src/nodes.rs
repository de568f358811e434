//! Fake GPU nodes (and CPU-only ones: nodes of no GPUs) for kwok, rendered
//! from a planner cluster description.
//!
//! Each node carries the GPU capacity, the GPU product label, the zone/block/rack
//! labels and the NIC annotation that weft reads (names from `weft_crds::topology`),
//! plus the annotation that tells kwok to manage it.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Node, NodeSpec, NodeStatus};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use weft_crds::topology::{self, Nic};
use weft_planner::cluster::Cluster;

/// Annotation kwok's controller selects the nodes it manages by (`up` starts kwok with it).
pub const KWOK_NODE_ANNOTATION: &str = "kwok.x-k8s.io/node";
/// Label that marks the nodes this harness created, so tests and `down` can find them.
pub const FAKE_NODE_LABEL: &str = "weft.dev/fake-node";
/// Label of the real kubelet nodes `e2e/cluster/up --real-nodes` starts
/// (pods placed on them run in real containers).
pub const REAL_NODE_LABEL: &str = "weft.dev/real-node";

/// The network namespace of the real nodes and their pods, and its address
/// on the pods' bridge, as `e2e/cluster/real-nodes.sh` makes them: what is
/// served there, the pods reach.
pub const REAL_NODES_NETNS: &str = "weft-nodes";
pub const REAL_NODES_BRIDGE_IP: &str = "10.244.0.1";

/// The Node objects for every node of `cluster`.
pub fn node_objects(cluster: &Cluster) -> Vec<Node> {
    cluster
        .nodes
        .iter()
        .map(|node| {
            let mut labels = BTreeMap::from([
                ("kubernetes.io/hostname".to_string(), node.name.clone()),
                ("kubernetes.io/os".to_string(), "linux".to_string()),
                ("kubernetes.io/arch".to_string(), "amd64".to_string()),
                ("type".to_string(), "kwok".to_string()),
                (FAKE_NODE_LABEL.to_string(), "true".to_string()),
                (topology::LABEL_ZONE.to_string(), node.zone.clone()),
                (topology::LABEL_BLOCK.to_string(), node.block.clone()),
                (topology::LABEL_RACK.to_string(), node.rack.clone()),
            ]);
            // A node of no GPUs is a CPU-only node: no GPU product, resource
            // or NIC table, as on a cluster without the GPU operator.
            let gpu_node = node.gpus > 0;
            if gpu_node {
                labels.insert(
                    topology::LABEL_GPU_PRODUCT.to_string(),
                    node.gpu.product_label.clone(),
                );
            }
            let nics: Vec<Nic> = node
                .nics
                .iter()
                .map(|n| Nic {
                    name: n.name.clone(),
                    gbps: n.gbps,
                    gpus: n.gpus.clone(),
                })
                .collect();
            let mut annotations =
                BTreeMap::from([(KWOK_NODE_ANNOTATION.to_string(), "fake".to_string())]);
            let mut resources = BTreeMap::from([
                ("cpu".to_string(), Quantity(node.cpu_cores.to_string())),
                (
                    "memory".to_string(),
                    Quantity(format!("{}Gi", node.memory_gib)),
                ),
                ("pods".to_string(), Quantity("110".to_string())),
            ]);
            if gpu_node {
                annotations.insert(
                    topology::ANNOTATION_NICS.to_string(),
                    topology::format_nics(&nics),
                );
                resources.insert(
                    topology::RESOURCE_GPU.to_string(),
                    Quantity(node.gpus.to_string()),
                );
            }
            Node {
                metadata: ObjectMeta {
                    name: Some(node.name.clone()),
                    labels: Some(labels),
                    annotations: Some(annotations),
                    ..Default::default()
                },
                spec: Some(NodeSpec {
                    provider_id: Some(format!("kwok://{}", node.name)),
                    ..Default::default()
                }),
                status: Some(NodeStatus {
                    capacity: Some(resources.clone()),
                    allocatable: Some(resources),
                    ..Default::default()
                }),
            }
        })
        .collect()
}

/// The nodes as one `v1/List` JSON document, which `kubectl apply -f -` and
/// `kubectl create -f -` accept.
pub fn node_list_json(cluster: &Cluster) -> Result<String, serde_json::Error> {
    let list = serde_json::json!({
        "apiVersion": "v1",
        "kind": "List",
        "items": node_objects(cluster),
    });
    serde_json::to_string_pretty(&list)
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_planner::cluster::parse_cluster;

    #[test]
    fn nodes_carry_capacity_labels_and_a_parsable_nic_annotation() {
        let cluster = parse_cluster("1x8:nics=8+1x4:gpu=a100-80g,nics=2").unwrap();
        let nodes = node_objects(&cluster);
        assert_eq!(nodes.len(), 2);
        let small = &nodes[1];
        let meta = &small.metadata;
        assert_eq!(meta.name.as_deref(), Some("gpu-b-0"));
        let labels = meta.labels.as_ref().unwrap();
        assert_eq!(labels[topology::LABEL_GPU_PRODUCT], "NVIDIA-A100-SXM4-80GB");
        assert_eq!(labels[topology::LABEL_RACK], "gpu-b-rack-0");
        let annotations = meta.annotations.as_ref().unwrap();
        assert_eq!(annotations[KWOK_NODE_ANNOTATION], "fake");
        let nics = topology::parse_nics(&annotations[topology::ANNOTATION_NICS], 4).unwrap();
        assert_eq!(nics.len(), 2);
        assert_eq!(nics[1].gpus, vec![2, 3]);
        let status = small.status.as_ref().unwrap();
        assert_eq!(
            status.allocatable.as_ref().unwrap()[topology::RESOURCE_GPU].0,
            "4"
        );
    }

    #[test]
    fn list_is_valid_json_with_every_node() {
        let cluster = parse_cluster("3x8").unwrap();
        let json: serde_json::Value =
            serde_json::from_str(&node_list_json(&cluster).unwrap()).unwrap();
        assert_eq!(json["kind"], "List");
        assert_eq!(json["items"].as_array().unwrap().len(), 3);
        assert_eq!(json["items"][0]["kind"], "Node");
    }
}
