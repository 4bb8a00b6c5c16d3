//! Node slices (`node_slice_size`), the plugin side, on the Kubernetes store: the real plugin binary
//! against the in-process fake API server by default, or the cluster named by
//! `WHEREABOUTS_TEST_KUBECONFIG` (each test in a fresh namespace).
//!
//! The tests write NodeSlicePools by hand, as the controller would: `spec.range` and `spec.sliceSize`
//! as configured, `status.allocations` one entry per slice with the node holding it. Each node's ADDs
//! must land inside its slice, in the pool `[network_name-]<node>-<slice>` whose `spec.range` is the
//! slice (keys are offsets from the slice's network address), while the result keeps the whole range's
//! prefix and the cluster-wide reservations (ORIPs) are written as usual.

use std::collections::BTreeMap;

use serde_json::{Value, json};
use whereabouts_k8s::crd::{
    IPPool, NodeSliceAllocation, NodeSlicePool, NodeSlicePoolSpec, NodeSlicePoolStatus,
    OverlappingRangeIPReservation,
};
use whereabouts_k8s::kube::ResourceExt;
use whereabouts_k8s::kube::api::{Api, DeleteParams, ListParams, PostParams};
use whereabouts_kube_testing::TestCluster;
use whereabouts_kube_testing::plugin::{Call, Outcome};

/// The CNI network name (`name` of the network configuration).
const NETWORK: &str = "slice-net";
/// The namespace of the pods: not where the objects go.
const POD_NAMESPACE: &str = "apps";
const NODE_A: &str = "node-a";
const NODE_B: &str = "node-b";

const INVALID_CONFIG: u64 = 7;
const TRY_AGAIN: u64 = 11;
const NOT_AVAILABLE: u64 = 50;

// ---------------------------------------------------------------------------------------------
// NodeSlicePools, as the controller writes them

fn node_slice_pools(cluster: &TestCluster) -> Api<NodeSlicePool> {
    Api::namespaced(cluster.client(), cluster.namespace())
}

/// `status.allocations` from (slice, node) pairs; `""` is a free slice.
fn assignments(slices: &[(&str, &str)]) -> NodeSlicePoolStatus {
    NodeSlicePoolStatus {
        allocations: slices
            .iter()
            .map(|(slice, node)| NodeSliceAllocation {
                node_name: node.to_string(),
                slice_range: slice.to_string(),
            })
            .collect(),
    }
}

/// Creates the NodeSlicePool `name` slicing `range` into `size`, with the slices assigned as given.
async fn create_node_slice_pool(
    cluster: &TestCluster,
    name: &str,
    range: &str,
    size: &str,
    slices: &[(&str, &str)],
) {
    let mut pool = NodeSlicePool::new(
        name,
        NodeSlicePoolSpec { range: range.to_string(), slice_size: size.to_string() },
    );
    pool.status = Some(assignments(slices));
    node_slice_pools(cluster)
        .create(&PostParams::default(), &pool)
        .await
        .unwrap_or_else(|e| panic!("create NodeSlicePool {name}: {e}"));
}

/// Replaces the slice assignments of the NodeSlicePool `name`, as the controller does when nodes join.
async fn reassign(cluster: &TestCluster, name: &str, slices: &[(&str, &str)]) {
    let api = node_slice_pools(cluster);
    let mut pool = api.get(name).await.unwrap_or_else(|e| panic!("get NodeSlicePool {name}: {e}"));
    pool.status = Some(assignments(slices));
    api.replace(name, &PostParams::default(), &pool).await.unwrap_or_else(|e| panic!("replace {name}: {e}"));
}

// ---------------------------------------------------------------------------------------------
// What the plugin stored

/// The stored `spec` of an IPPool, as JSON.
async fn pool_spec(cluster: &TestCluster, name: &str) -> Option<Value> {
    let api: Api<IPPool> = Api::namespaced(cluster.client(), cluster.namespace());
    let found = api.get_opt(name).await.unwrap_or_else(|e| panic!("get IPPool {name}: {e}"));
    found.map(|pool| serde_json::to_value(pool.spec).expect("a spec serialises"))
}

/// A pool's allocations: key → pod reference.
async fn pool_entries(cluster: &TestCluster, name: &str) -> BTreeMap<String, String> {
    let spec = pool_spec(cluster, name).await.unwrap_or(Value::Null);
    let Value::Object(allocations) = &spec["allocations"] else { return BTreeMap::new() };
    allocations
        .iter()
        .map(|(key, a)| (key.clone(), a["podref"].as_str().unwrap_or_default().into()))
        .collect()
}

async fn pool_names(cluster: &TestCluster) -> Vec<String> {
    let api: Api<IPPool> = Api::namespaced(cluster.client(), cluster.namespace());
    let list = api.list_metadata(&ListParams::default()).await.expect("list IPPools");
    let mut names: Vec<String> = list.items.iter().map(ResourceExt::name_any).collect();
    names.sort();
    names
}

/// Every reservation: name → pod reference.
async fn reservations(cluster: &TestCluster) -> BTreeMap<String, String> {
    let api: Api<OverlappingRangeIPReservation> = Api::namespaced(cluster.client(), cluster.namespace());
    let list = api.list(&ListParams::default()).await.expect("list reservations");
    list.items.into_iter().map(|r| (r.name_any(), r.spec.holder.pod_ref)).collect()
}

// ---------------------------------------------------------------------------------------------
// Running the plugin

/// One attachment (`net1`) of a pod on a node.
#[derive(Debug, Clone)]
struct Pod {
    name: String,
    node: String,
}

impl Pod {
    fn on(node: &str, name: &str) -> Self {
        Pod { name: name.into(), node: node.into() }
    }

    fn container(&self) -> String {
        format!("{}-sandbox", self.name)
    }
}

/// A network configuration (CNI 1.1.0, for STATUS and GC) whose `ipam` has `ipam`'s keys.
fn netconf(cluster: &TestCluster, ipam: Value) -> Value {
    let mut full = json!({
        "type": "whereabouts",
        "datastore": "kubernetes",
        "kubernetes": { "kubeconfig": cluster.kubeconfig_path() },
        "log_level": "error",
    });
    for (key, value) in ipam.as_object().expect("ipam keys") {
        full[key] = value.clone();
    }
    json!({ "cniVersion": "1.1.0", "name": NETWORK, "type": "macvlan", "ipam": full })
}

/// Runs the plugin once for `pod` on its node.
async fn cni(command: &str, pod: &Pod, netconf: &Value) -> Outcome {
    let args = format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={POD_NAMESPACE};K8S_POD_NAME={}", pod.name);
    let binary = std::path::Path::new(env!("CARGO_BIN_EXE_whereabouts"));
    let container = pod.container();
    Call { binary, command, container: &container, cni_args: &args, node: &pod.node }.run(netconf).await
}

/// ADD that must succeed: the whole result.
async fn add_result(pod: &Pod, netconf: &Value) -> Value {
    match cni("ADD", pod, netconf).await {
        Outcome::Success(result) if !result.is_null() => result,
        other => panic!("ADD {} on {}: {other:?}", pod.name, pod.node),
    }
}

/// ADD that must succeed: its addresses.
async fn add(pod: &Pod, netconf: &Value) -> Vec<String> {
    let result = add_result(pod, netconf).await;
    let ips = result["ips"].as_array().unwrap_or_else(|| panic!("no ips in {result}"));
    ips.iter().map(|ip| ip["address"].as_str().unwrap_or_default().to_string()).collect()
}

async fn del(pod: &Pod, netconf: &Value) {
    cni("DEL", pod, netconf).await.silent(&format!("DEL {} on {}", pod.name, pod.node));
}

// ---------------------------------------------------------------------------------------------
// The tests

/// Two nodes, each with its /26 of 10.90.0.0/24: ADDs land only in the node's slice, in the node's pool
/// of it, keyed by offsets from the slice; the result is /24; ORIPs are written; CHECK and STATUS find
/// the same slice.
#[tokio::test(flavor = "multi_thread")]
async fn ipv4_nodes_allocate_only_inside_their_slices() {
    let cluster = TestCluster::start().await;
    let slices =
        [("10.90.0.0/26", NODE_A), ("10.90.0.64/26", NODE_B), ("10.90.0.128/26", ""), ("10.90.0.192/26", "")];
    create_node_slice_pool(&cluster, "blue", "10.90.0.0/24", "/26", &slices).await;
    let net = netconf(
        &cluster,
        json!({ "range": "10.90.0.0/24", "node_slice_size": "/26", "network_name": "blue" }),
    );

    let on_a: Vec<Pod> = (1..=3).map(|i| Pod::on(NODE_A, &format!("a{i}"))).collect();
    let on_b: Vec<Pod> = (1..=2).map(|i| Pod::on(NODE_B, &format!("b{i}"))).collect();
    for (i, pod) in on_b.iter().enumerate() {
        assert_eq!(add(pod, &net).await, [format!("10.90.0.{}/24", 65 + i)], "{}", pod.name);
    }
    for (i, pod) in on_a.iter().enumerate() {
        assert_eq!(add(pod, &net).await, [format!("10.90.0.{}/24", 1 + i)], "{}", pod.name);
    }

    let (pool_a, pool_b) = ("blue-node-a-10.90.0.0-26", "blue-node-b-10.90.0.64-26");
    assert_eq!(pool_names(&cluster).await, [pool_a, pool_b], "no pool of the whole range");
    let spec_b = pool_spec(&cluster, pool_b).await.expect("node-b's pool");
    assert_eq!(spec_b["range"], "10.90.0.64/26");
    assert_eq!(spec_b["allocations"]["1"]["podref"], "apps/b1", "offset 1 from the slice is .65");
    assert_eq!(spec_b["allocations"]["1"]["node"], NODE_B);
    assert_eq!(
        pool_entries(&cluster, pool_b).await,
        BTreeMap::from([("1".into(), "apps/b1".into()), ("2".into(), "apps/b2".into())])
    );
    assert_eq!(pool_entries(&cluster, pool_a).await.into_keys().collect::<Vec<_>>(), ["1", "2", "3"]);
    let expected: BTreeMap<String, String> = [
        ("blue-10.90.0.1", "apps/a1"),
        ("blue-10.90.0.2", "apps/a2"),
        ("blue-10.90.0.3", "apps/a3"),
        ("blue-10.90.0.65", "apps/b1"),
        ("blue-10.90.0.66", "apps/b2"),
    ]
    .into_iter()
    .map(|(name, pod)| (name.to_string(), pod.to_string()))
    .collect();
    assert_eq!(reservations(&cluster).await, expected);

    // An ADD again is the same address; CHECK finds it in the slice's pool; STATUS has room.
    let result = add_result(&on_b[0], &net).await;
    assert_eq!(result["ips"][0]["address"], "10.90.0.65/24");
    let mut check = net.clone();
    check["prevResult"] = result;
    cni("CHECK", &on_b[0], &check).await.silent("CHECK b1");
    cni("STATUS", &on_b[0], &net).await.silent("STATUS on node-b");
    cluster.cleanup().await;
}

/// Without `network_name` the NodeSlicePool is the CNI network's name and pools are `<node>-<slice>`;
/// upstream's sliceSize without its slash is accepted.
#[tokio::test(flavor = "multi_thread")]
async fn without_network_name_the_node_slice_pool_is_named_after_the_cni_network() {
    let cluster = TestCluster::start().await;
    create_node_slice_pool(&cluster, NETWORK, "10.93.0.0/24", "26", &[("10.93.0.128/26", NODE_A)]).await;
    let net = netconf(&cluster, json!({ "range": "10.93.0.0/24", "node_slice_size": "/26" }));
    assert_eq!(add(&Pod::on(NODE_A, "p"), &net).await, ["10.93.0.129/24"]);
    assert_eq!(pool_names(&cluster).await, ["node-a-10.93.0.128-26"]);
    assert_eq!(reservations(&cluster).await.into_keys().collect::<Vec<_>>(), ["10.93.0.129"]);
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn ipv6_nodes_allocate_inside_their_slash_80_slices() {
    let cluster = TestCluster::start().await;
    let slices = [("2001:db8:90::/80", NODE_A), ("2001:db8:90:0:1::/80", NODE_B)];
    create_node_slice_pool(&cluster, "v6", "2001:db8:90::/64", "/80", &slices).await;
    let net = netconf(
        &cluster,
        json!({ "range": "2001:db8:90::/64", "node_slice_size": "/80", "network_name": "v6" }),
    );
    assert_eq!(add(&Pod::on(NODE_A, "a1"), &net).await, ["2001:db8:90::1/64"]);
    assert_eq!(add(&Pod::on(NODE_B, "b1"), &net).await, ["2001:db8:90:0:1::1/64"]);
    assert_eq!(add(&Pod::on(NODE_B, "b2"), &net).await, ["2001:db8:90:0:1::2/64"]);
    let pool_b = "v6-node-b-2001-db8-90-0-1---80";
    assert_eq!(pool_names(&cluster).await, ["v6-node-a-2001-db8-90---80", pool_b]);
    assert_eq!(pool_spec(&cluster, pool_b).await.expect("node-b's pool")["range"], "2001:db8:90:0:1::/80");
    assert_eq!(pool_entries(&cluster, pool_b).await.into_keys().collect::<Vec<_>>(), ["1", "2"]);
    assert_eq!(
        reservations(&cluster).await.into_keys().collect::<Vec<_>>(),
        ["v6-2001-db8-90--1", "v6-2001-db8-90-0-1--1", "v6-2001-db8-90-0-1--2"]
    );
    cluster.cleanup().await;
}

/// `range_start` and `exclude` still apply inside a slice; a slice they leave empty (upstream's
/// controller assigns it all the same) is a configuration error naming the node and the slice.
#[tokio::test(flavor = "multi_thread")]
async fn range_start_and_exclude_are_honoured_inside_a_slice() {
    let cluster = TestCluster::start().await;
    create_node_slice_pool(
        &cluster,
        "bounded",
        "10.91.0.0/24",
        "/26",
        &[("10.91.0.0/26", NODE_B), ("10.91.0.64/26", NODE_A)],
    )
    .await;
    let net = netconf(
        &cluster,
        json!({
            "range": "10.91.0.0/24", "range_start": "10.91.0.70", "exclude": ["10.91.0.72/30"],
            "node_slice_size": "/26", "network_name": "bounded",
        }),
    );
    let mut got = Vec::new();
    for i in 0..3 {
        got.extend(add(&Pod::on(NODE_A, &format!("a{i}")), &net).await);
    }
    assert_eq!(got, ["10.91.0.70/24", "10.91.0.71/24", "10.91.0.76/24"]);
    assert_eq!(
        pool_entries(&cluster, "bounded-node-a-10.91.0.64-26").await.into_keys().collect::<Vec<_>>(),
        ["12", "6", "7"]
    );

    let (code, msg) =
        cni("ADD", &Pod::on(NODE_B, "b"), &net).await.failure("ADD in a slice below range_start");
    assert_eq!(code, INVALID_CONFIG, "{msg}");
    assert!(
        msg.contains("node node-b") && msg.contains("10.91.0.0/26") && msg.contains("NodeSlicePool"),
        "{msg}"
    );
    cluster.cleanup().await;
}

/// A node the controller has not given a slice yet, or a network whose NodeSlicePool does not exist
/// yet: try again later, naming the NodeSlicePool and the node; once assigned, the ADD succeeds. The
/// DEL of the failed ADD succeeds meanwhile.
#[tokio::test(flavor = "multi_thread")]
async fn a_node_without_a_slice_is_told_to_try_again_later() {
    let cluster = TestCluster::start().await;
    let net = netconf(
        &cluster,
        json!({ "range": "10.94.0.0/24", "node_slice_size": "/26", "network_name": "later" }),
    );
    let location = format!("NodeSlicePool {}/later", cluster.namespace());
    let pod = Pod::on(NODE_B, "waiting");

    let (code, msg) = cni("ADD", &pod, &net).await.failure("ADD without a NodeSlicePool");
    assert_eq!(code, TRY_AGAIN, "{msg}");
    assert!(
        msg.contains(&location) && msg.contains("node node-b") && msg.contains("try again later"),
        "{msg}"
    );
    del(&pod, &net).await;

    create_node_slice_pool(
        &cluster,
        "later",
        "10.94.0.0/24",
        "/26",
        &[("10.94.0.0/26", NODE_A), ("10.94.0.64/26", "")],
    )
    .await;
    let (code, msg) = cni("ADD", &pod, &net).await.failure("ADD without a slice for the node");
    assert_eq!(code, TRY_AGAIN, "{msg}");
    assert!(
        msg.contains(&location) && msg.contains("node node-b") && msg.contains("try again later"),
        "{msg}"
    );
    let (code, msg) = cni("STATUS", &pod, &net).await.failure("STATUS without a slice");
    assert_eq!(code, NOT_AVAILABLE, "{msg}");
    del(&pod, &net).await;
    assert!(pool_names(&cluster).await.is_empty(), "nothing written");

    reassign(&cluster, "later", &[("10.94.0.0/26", NODE_A), ("10.94.0.64/26", NODE_B)]).await;
    assert_eq!(add(&pod, &net).await, ["10.94.0.65/24"]);
    cluster.cleanup().await;
}

/// A NodeSlicePool cut into another size (or from another range) than configured is a configuration
/// error naming both; the DEL of the refused ADD succeeds.
#[tokio::test(flavor = "multi_thread")]
async fn a_mismatching_node_slice_pool_is_a_configuration_error() {
    let cluster = TestCluster::start().await;
    create_node_slice_pool(&cluster, "sized", "10.95.0.0/24", "/27", &[("10.95.0.0/27", NODE_A)]).await;
    let net = netconf(
        &cluster,
        json!({ "range": "10.95.0.0/24", "node_slice_size": "/26", "network_name": "sized" }),
    );
    let pod = Pod::on(NODE_A, "p");
    let (code, msg) = cni("ADD", &pod, &net).await.failure("ADD with another slice size");
    assert_eq!(code, INVALID_CONFIG, "{msg}");
    assert!(msg.contains("\"/27\"") && msg.contains("/26") && msg.contains("NodeSlicePool"), "{msg}");
    del(&pod, &net).await;

    let other_range = netconf(
        &cluster,
        json!({ "range": "10.96.0.0/24", "node_slice_size": "/27", "network_name": "sized" }),
    );
    let (code, msg) = cni("ADD", &pod, &other_range).await.failure("ADD with another range");
    assert_eq!(code, INVALID_CONFIG, "{msg}");
    assert!(msg.contains("10.95.0.0/24") && msg.contains("10.96.0.0/24"), "{msg}");
    assert!(pool_names(&cluster).await.is_empty(), "nothing written");
    cluster.cleanup().await;
}

/// DEL and GC free the address in the slice's pool and its reservation; a DEL after the NodeSlicePool
/// is gone still finds the node's pool of its slice.
#[tokio::test(flavor = "multi_thread")]
async fn del_and_gc_free_addresses_in_the_slice() {
    let cluster = TestCluster::start().await;
    create_node_slice_pool(&cluster, "freed", "10.97.0.0/24", "/26", &[("10.97.0.64/26", NODE_A)]).await;
    let net = netconf(
        &cluster,
        json!({ "range": "10.97.0.0/24", "node_slice_size": "/26", "network_name": "freed" }),
    );
    let pool = "freed-node-a-10.97.0.64-26";
    let pods: Vec<Pod> = ["p1", "p2", "p3"].map(|p| Pod::on(NODE_A, p)).into();
    for pod in &pods {
        add(pod, &net).await;
    }
    assert_eq!(pool_entries(&cluster, pool).await.into_keys().collect::<Vec<_>>(), ["1", "2", "3"]);

    del(&pods[0], &net).await;
    assert_eq!(pool_entries(&cluster, pool).await.into_keys().collect::<Vec<_>>(), ["2", "3"]);
    assert_eq!(
        reservations(&cluster).await.into_keys().collect::<Vec<_>>(),
        ["freed-10.97.0.66", "freed-10.97.0.67"]
    );
    assert_eq!(add(&Pod::on(NODE_A, "p4"), &net).await, ["10.97.0.65/24"], "the freed address is reused");

    // GC on node-a with only p2 and p4 still attached releases p3.
    let mut gc = net.clone();
    gc["cni.dev/valid-attachments"] = json!([
        { "containerID": pods[1].container(), "ifname": "net1" },
        { "containerID": "p4-sandbox", "ifname": "net1" },
    ]);
    cni("GC", &pods[0], &gc).await.silent("GC");
    assert_eq!(
        pool_entries(&cluster, pool).await,
        BTreeMap::from([("1".into(), "apps/p4".into()), ("2".into(), "apps/p2".into())])
    );
    assert_eq!(
        reservations(&cluster).await.into_keys().collect::<Vec<_>>(),
        ["freed-10.97.0.65", "freed-10.97.0.66"]
    );

    node_slice_pools(&cluster)
        .delete("freed", &DeleteParams::default())
        .await
        .expect("delete the NodeSlicePool");
    del(&pods[1], &net).await;
    assert_eq!(pool_entries(&cluster, pool).await.into_keys().collect::<Vec<_>>(), ["1"]);
    assert_eq!(reservations(&cluster).await.into_keys().collect::<Vec<_>>(), ["freed-10.97.0.65"]);
    cluster.cleanup().await;
}

/// A re-slicing (into /27) moved node-a off the slice in which two of its pods keep their addresses:
/// one's DEL releases its address there, with its reservation, and GC on node-a looks there too; the
/// pool of another node holding the same attachment is left alone, and so is the new slice's.
#[tokio::test(flavor = "multi_thread")]
async fn del_and_gc_release_from_a_slice_the_node_was_moved_off() {
    let cluster = TestCluster::start().await;
    let before = [("10.98.0.0/26", NODE_A), ("10.98.0.64/26", NODE_B)];
    create_node_slice_pool(&cluster, "moved", "10.98.0.0/24", "/26", &before).await;
    let net = netconf(
        &cluster,
        json!({ "range": "10.98.0.0/24", "node_slice_size": "/26", "network_name": "moved" }),
    );
    let (old, stale) = (Pod::on(NODE_A, "old"), Pod::on(NODE_A, "stale"));
    assert_eq!(add(&old, &net).await, ["10.98.0.1/24"]);
    assert_eq!(add(&stale, &net).await, ["10.98.0.2/24"]);
    // The same attachment on node-b (not node-a's pool: left alone).
    assert_eq!(add(&Pod::on(NODE_B, "old"), &net).await, ["10.98.0.65/24"]);

    node_slice_pools(&cluster).delete("moved", &DeleteParams::default()).await.expect("delete");
    let after =
        [("10.98.0.0/27", ""), ("10.98.0.32/27", ""), ("10.98.0.64/27", NODE_B), ("10.98.0.128/27", NODE_A)];
    create_node_slice_pool(&cluster, "moved", "10.98.0.0/24", "/27", &after).await;
    let resliced = netconf(
        &cluster,
        json!({ "range": "10.98.0.0/24", "node_slice_size": "/27", "network_name": "moved" }),
    );
    let new = Pod::on(NODE_A, "new");
    assert_eq!(add(&new, &resliced).await, ["10.98.0.129/24"]);
    let (old_pool, new_pool) = ("moved-node-a-10.98.0.0-26", "moved-node-a-10.98.0.128-27");

    del(&old, &resliced).await;
    assert_eq!(pool_entries(&cluster, old_pool).await, BTreeMap::from([("2".into(), "apps/stale".into())]));
    assert_eq!(pool_entries(&cluster, new_pool).await, BTreeMap::from([("1".into(), "apps/new".into())]));
    assert_eq!(pool_entries(&cluster, "moved-node-b-10.98.0.64-26").await.len(), 1, "node-b's pool");
    assert_eq!(
        reservations(&cluster).await.into_keys().collect::<Vec<_>>(),
        ["moved-10.98.0.129", "moved-10.98.0.2", "moved-10.98.0.65"]
    );

    let mut gc = resliced.clone();
    gc["cni.dev/valid-attachments"] = json!([{ "containerID": new.container(), "ifname": "net1" }]);
    cni("GC", &new, &gc).await.silent("GC");
    assert!(pool_entries(&cluster, old_pool).await.is_empty(), "GC left the old slice's pool alone");
    assert_eq!(pool_entries(&cluster, new_pool).await.len(), 1);
    cluster.cleanup().await;
}

/// Dual stack: only the first range is sliced; the IPv6 range is one cluster-wide pool for all nodes.
#[tokio::test(flavor = "multi_thread")]
async fn dual_stack_slices_only_the_first_range() {
    let cluster = TestCluster::start().await;
    create_node_slice_pool(
        &cluster,
        "dual",
        "10.92.0.0/24",
        "/26",
        &[("10.92.0.0/26", NODE_A), ("10.92.0.64/26", NODE_B)],
    )
    .await;
    let net = netconf(
        &cluster,
        json!({
            "range": "10.92.0.0/24", "ipRanges": [{ "range": "fd00:92::/64" }],
            "node_slice_size": "/26", "network_name": "dual",
        }),
    );
    let (a, b) = (Pod::on(NODE_A, "a"), Pod::on(NODE_B, "b"));
    assert_eq!(add(&a, &net).await, ["10.92.0.1/24", "fd00:92::1/64"]);
    assert_eq!(add(&b, &net).await, ["10.92.0.65/24", "fd00:92::2/64"]);
    assert_eq!(
        pool_names(&cluster).await,
        ["dual-fd00-92---64", "dual-node-a-10.92.0.0-26", "dual-node-b-10.92.0.64-26"]
    );
    assert_eq!(
        pool_entries(&cluster, "dual-fd00-92---64").await,
        BTreeMap::from([("1".into(), "apps/a".into()), ("2".into(), "apps/b".into())])
    );
    del(&b, &net).await;
    assert!(pool_entries(&cluster, "dual-node-b-10.92.0.64-26").await.is_empty());
    assert_eq!(pool_entries(&cluster, "dual-fd00-92---64").await.into_keys().collect::<Vec<_>>(), ["1"]);
    cluster.cleanup().await;
}

/// `sticky_statefulsets` with node slices: a StatefulSet's pod keeps the address of the slice of the
/// node it first ran on. Moved to another node, its ADD there takes the address back from the first
/// node's pool, and its DEL there finds it and holds it again.
#[tokio::test(flavor = "multi_thread")]
async fn a_statefulset_pod_keeps_its_address_from_another_nodes_slice() {
    let cluster = TestCluster::start().await;
    let slices = [("10.90.0.0/26", NODE_A), ("10.90.0.64/26", NODE_B)];
    create_node_slice_pool(&cluster, "blue", "10.90.0.0/25", "/26", &slices).await;
    let net = netconf(
        &cluster,
        json!({ "range": "10.90.0.0/25", "node_slice_size": "/26", "network_name": "blue", "sticky_statefulsets": true }),
    );
    let web = cluster.create_statefulset("web", 1).await;
    let call = |command: &'static str, node: &'static str, container: &'static str, uid: String| {
        let cni_args = format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME=web-0;K8S_POD_UID={uid}",
            cluster.namespace()
        );
        let net = net.clone();
        async move {
            let binary = std::path::Path::new(env!("CARGO_BIN_EXE_whereabouts"));
            Call { binary, command, container, cni_args: &cni_args, node }.run(&net).await
        }
    };
    let (pool_a, pool_b) = ("blue-node-a-10.90.0.0-26", "blue-node-b-10.90.0.64-26");
    let web_0 = format!("{}/web-0", cluster.namespace());

    let uid = cluster.create_statefulset_pod(("web", &web), 0, NODE_A).await;
    assert_eq!(
        call("ADD", NODE_A, "web-0-a", uid.clone()).await.addresses("ADD on node-a"),
        ["10.90.0.1/25"]
    );
    call("DEL", NODE_A, "web-0-a", uid).await.silent("DEL on node-a");
    let held = pool_spec(&cluster, pool_a).await.expect("node-a's pool")["allocations"]["1"].clone();
    assert_eq!((held["id"].as_str(), held["statefulset"].as_str()), (Some(""), Some("web")), "{held}");

    cluster.delete_pod("web-0").await;
    let uid = cluster.create_statefulset_pod(("web", &web), 0, NODE_B).await;
    assert_eq!(
        call("ADD", NODE_B, "web-0-b", uid.clone()).await.addresses("ADD on node-b"),
        ["10.90.0.1/25"],
        "its address back, from node-a's slice"
    );
    assert_eq!(pool_entries(&cluster, pool_a).await, BTreeMap::from([("1".into(), web_0.clone())]));
    let taken = pool_spec(&cluster, pool_a).await.expect("node-a's pool")["allocations"]["1"].clone();
    assert_eq!((taken["id"].as_str(), taken["node"].as_str()), (Some("web-0-b"), Some(NODE_B)), "{taken}");
    // Another pod on node-b allocates in node-b's slice as ever.
    assert_eq!(add(&Pod::on(NODE_B, "plain"), &net).await, ["10.90.0.65/25"]);
    assert_eq!(pool_entries(&cluster, pool_b).await.into_values().collect::<Vec<_>>(), ["apps/plain"]);

    // DEL on node-b finds the entry in node-a's pool and holds it again.
    call("DEL", NODE_B, "web-0-b", uid).await.silent("DEL on node-b");
    let held = pool_spec(&cluster, pool_a).await.expect("node-a's pool")["allocations"]["1"].clone();
    assert_eq!(held["id"].as_str(), Some(""), "{held}");
    cluster.cleanup().await;
}
