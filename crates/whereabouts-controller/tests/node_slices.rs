//! The node-slice controller against the in-process fake API server, or the cluster named by
//! `WHEREABOUTS_TEST_KUBECONFIG` (each test in a fresh namespace, which is also the whereabouts
//! namespace). Nodes and NADs are listed cluster-wide, and a real cluster is shared with other tests
//! and what earlier runs left: each test's Nodes and NADs carry its label, and its controller selects
//! them by it (the controller's node and NAD selectors), so it sees only its own.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::events::v1::Event;
use serde_json::{Value, json};
use whereabouts_controller::Context;
use whereabouts_controller::metrics::{Metrics, SliceLabels, SliceState};
use whereabouts_controller::nad::FlatFile;
use whereabouts_controller::nodeslice::{self, Settings, nad_resource};
use whereabouts_core::range::pool_name;
use whereabouts_k8s::crd::{IPPool, NodeSlicePool};
use whereabouts_k8s::kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams,
};
use whereabouts_kube_testing::TestCluster;

struct Fixture {
    cluster: TestCluster,
    ctx: Context,
    settings: Settings,
}

/// The flat file names the store, as on a node; the NADs carry the rest.
fn flat() -> FlatFile {
    FlatFile {
        path: "/host/etc/cni/net.d/whereabouts.d/whereabouts.conf".into(),
        content: br#"{"datastore": "kubernetes", "kubernetes": {"kubeconfig": "/etc/kubeconfig"}}"#.to_vec(),
    }
}

impl Fixture {
    async fn start() -> Fixture {
        let cluster = TestCluster::start().await;
        let ctx = Context {
            client: cluster.client(),
            namespace: cluster.namespace().to_string(),
            metrics: Arc::new(Metrics::new()),
            dry_run: false,
        };
        let settings = Settings {
            flat_file: Some(flat()),
            node_selector: Some(cluster.selector()),
            nad_selector: Some(cluster.selector()),
        };
        Fixture { cluster, ctx, settings }
    }

    fn ns(&self) -> &str {
        self.cluster.namespace()
    }

    /// A name unique to this test (NodeSlicePools).
    fn unique(&self, name: &str) -> String {
        self.cluster.unique(name)
    }

    async fn add_node(&self, name: &str) -> String {
        self.cluster.create_node(name).await
    }

    async fn add_nad(&self, name: &str, config: Value) {
        let nad: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "k8s.cni.cncf.io/v1", "kind": "NetworkAttachmentDefinition",
            "metadata": {"name": name, "namespace": self.ns(), "labels": self.cluster.labels()},
            "spec": {"config": config.to_string()},
        }))
        .expect("a NAD");
        Api::<DynamicObject>::namespaced_with(self.cluster.client(), self.ns(), &nad_resource())
            .create(&PostParams::default(), &nad)
            .await
            .expect("NAD created");
    }

    async fn reconcile(&self) -> nodeslice::Summary {
        let summary = nodeslice::reconcile_all(&self.ctx, &self.settings).await.expect("reconciled");
        assert!(summary.failed.is_empty(), "{summary:?}");
        summary
    }

    /// The NodeSlicePool's (slice, node) entries, in order; `None` if it does not exist.
    async fn slices(&self, pool: &str) -> Option<Vec<(String, String)>> {
        let api: Api<NodeSlicePool> = Api::namespaced(self.cluster.client(), self.ns());
        let found = api.get_opt(pool).await.expect("get NodeSlicePool")?;
        let allocations = found.status.map(|s| s.allocations).unwrap_or_default();
        Some(allocations.into_iter().map(|a| (a.slice_range, a.node_name)).collect())
    }

    async fn slice_of(&self, pool: &str, node: &str) -> Option<String> {
        let slices = self.slices(pool).await.expect("the NodeSlicePool exists");
        slices.into_iter().find(|(_, n)| n == node).map(|(s, _)| s)
    }

    async fn set_pool(&self, name: &str, range: &str, allocations: Value) {
        let api: Api<IPPool> = Api::namespaced(self.cluster.client(), self.ns());
        let mut pool: IPPool = serde_json::from_value(json!({
            "apiVersion": "whereabouts.cni.cncf.io/v1alpha1", "kind": "IPPool",
            "metadata": {"name": name}, "spec": {"range": range, "allocations": allocations},
        }))
        .expect("an IPPool");
        match api.get_opt(name).await.expect("get IPPool") {
            Some(old) => {
                pool.metadata.resource_version = old.metadata.resource_version;
                api.replace(name, &PostParams::default(), &pool).await.expect("IPPool replaced");
            }
            None => {
                api.create(&PostParams::default(), &pool).await.expect("IPPool created");
            }
        }
    }

    async fn warnings(&self) -> Vec<(String, String, String)> {
        let events: Api<Event> = Api::namespaced(self.cluster.client(), self.ns());
        let list = events.list(&ListParams::default()).await.expect("events listed");
        list.items
            .into_iter()
            .filter(|e| e.type_.as_deref() == Some("Warning"))
            .map(|e| {
                let regarding = e.regarding.and_then(|r| r.name).unwrap_or_default();
                (regarding, e.reason.unwrap_or_default(), e.note.unwrap_or_default())
            })
            .collect()
    }

    async fn cleanup(self) {
        self.cluster.cleanup().await;
    }
}

fn macvlan(name: &str, ipam: Value) -> Value {
    let mut ipam = ipam;
    ipam["type"] = json!("whereabouts");
    json!({"cniVersion": "0.3.1", "name": name, "type": "macvlan", "master": "eth0", "ipam": ipam})
}

fn overlap(a: &str, b: &str) -> bool {
    let (a, b): (ipnet::IpNet, ipnet::IpNet) = (a.parse().expect("a CIDR"), b.parse().expect("a CIDR"));
    a.contains(&b) || b.contains(&a)
}

#[tokio::test]
async fn slices_follow_nodes_and_a_busy_slice_waits_for_its_pool_to_empty() {
    let f = Fixture::start().await;
    let net = f.unique("net");
    f.add_nad("net", macvlan(&net, json!({"range": "192.0.2.0/24", "node_slice_size": "/27"}))).await;
    let (a, b, c) = (f.add_node("a").await, f.add_node("b").await, f.add_node("c").await);
    let summary = f.reconcile().await;
    assert_eq!(summary.written, std::slice::from_ref(&net), "{summary:?}");

    let all = f.slices(&net).await.expect("created");
    assert_eq!(all.len(), 8, "{all:?}");
    let mine: Vec<String> =
        [&a, &b, &c].iter().map(|n| all.iter().find(|(_, h)| h == *n).expect("assigned").0.clone()).collect();
    assert!(!overlap(&mine[0], &mine[1]) && !overlap(&mine[0], &mine[2]) && !overlap(&mine[1], &mine[2]));
    let pool: NodeSlicePool = Api::namespaced(f.cluster.client(), f.ns()).get(&net).await.expect("get");
    assert_eq!((pool.spec.range.as_str(), pool.spec.slice_size.as_str()), ("192.0.2.0/24", "/27"));
    let owners = pool.metadata.owner_references.expect("owned");
    assert_eq!((owners[0].name.as_str(), owners[0].controller), ("net", Some(true)));
    let labels = SliceLabels { pool: net.clone(), state: SliceState::Assigned };
    assert_eq!(f.ctx.metrics.node_slices.get_or_create(&labels).get(), 3);
    // Nothing changed: nothing written.
    assert_eq!(f.reconcile().await.unchanged, std::slice::from_ref(&net));

    // b leaves while its pool of its slice holds an address: the slice stays b's.
    let slice_b = mine[1].clone();
    let b_pool = pool_name("", Some(&b), &slice_b.parse().expect("a CIDR"));
    f.set_pool(&b_pool, &slice_b, json!({"1": {"id": "c1", "podref": "apps/p1"}})).await;
    f.cluster.delete_node(&b).await;
    let d = f.add_node("d").await;
    f.reconcile().await;
    assert_eq!(f.slice_of(&net, &b).await, Some(slice_b.clone()), "freed while busy");
    let slice_d = f.slice_of(&net, &d).await.expect("d got a slice");
    assert_ne!(slice_d, slice_b);

    // Emptied: freed; the next node to join takes it (the lowest free), and nobody else moves.
    f.set_pool(&b_pool, &slice_b, json!({})).await;
    f.reconcile().await;
    assert_eq!(f.slice_of(&net, &b).await, None, "still held after its pool emptied");
    let e = f.add_node("e").await;
    f.reconcile().await;
    assert_eq!(f.slice_of(&net, &e).await, Some(slice_b));
    assert_eq!(f.slice_of(&net, &a).await, Some(mine[0].clone()));
    assert_eq!(f.slice_of(&net, &c).await, Some(mine[2].clone()));
    assert_eq!(f.slice_of(&net, &d).await, Some(slice_d));
    f.cleanup().await;
}

#[tokio::test]
async fn ipv6_and_the_candidate_interval() {
    let f = Fixture::start().await;
    let (v6, v4) = (f.unique("v6"), f.unique("v4"));
    f.add_nad("v6", macvlan(&v6, json!({"range": "2001:db8::/112", "node_slice_size": "/120"}))).await;
    let ipam = json!({"range": "198.51.100.0/24", "range_start": "198.51.100.70", "exclude": ["198.51.100.128/26"],
        "node_slice_size": "/26"});
    f.add_nad("v4", macvlan(&v4, ipam)).await;
    let (a, b) = (f.add_node("a").await, f.add_node("b").await);
    f.reconcile().await;

    let slices = f.slices(&v6).await.expect("created");
    assert_eq!(slices.len(), 256);
    let (sa, sb) = (f.slice_of(&v6, &a).await.expect("a"), f.slice_of(&v6, &b).await.expect("b"));
    assert!(sa.ends_with("/120") && sb.ends_with("/120") && !overlap(&sa, &sb), "{sa} {sb}");

    // The slice below range_start and the excluded one are not offered.
    let offered: Vec<String> = f.slices(&v4).await.expect("created").into_iter().map(|(s, _)| s).collect();
    assert_eq!(offered, ["198.51.100.64/26", "198.51.100.192/26"]);
    f.cleanup().await;
}

#[tokio::test]
async fn the_oldest_nad_of_a_network_wins_and_others_are_not_blocked() {
    let f = Fixture::start().await;
    let (shared, other) = (f.unique("shared"), f.unique("other"));
    // Named so that name order would pick the wrong one: only age decides.
    f.add_nad(
        "z-old",
        macvlan("x", json!({"range": "203.0.113.0/24", "node_slice_size": "/26", "network_name": shared})),
    )
    .await;
    // creationTimestamp has one-second resolution.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    f.add_nad(
        "a-new",
        macvlan("y", json!({"range": "203.0.113.0/24", "node_slice_size": "/27", "network_name": shared})),
    )
    .await;
    f.add_nad("unrelated", macvlan(&other, json!({"range": "10.10.0.0/24", "node_slice_size": "/28"}))).await;
    f.add_node("a").await;
    let summary = f.reconcile().await;
    assert_eq!(summary.overruled, [format!("{}/a-new", f.ns())]);

    let pool: NodeSlicePool = Api::namespaced(f.cluster.client(), f.ns()).get(&shared).await.expect("get");
    assert_eq!(pool.spec.slice_size, "/26");
    let owners: Vec<(String, Option<bool>)> = pool
        .metadata
        .owner_references
        .unwrap_or_default()
        .into_iter()
        .map(|o| (o.name, o.controller))
        .collect();
    assert_eq!(owners, [("z-old".to_string(), Some(true))]);
    assert!(f.slices(&other).await.is_some(), "the unrelated network is not blocked");
    let warnings = f.warnings().await;
    assert!(
        warnings.iter().any(|(about, reason, note)| about == "a-new"
            && reason == "ConflictingNodeSlices"
            && note.contains("z-old")),
        "{warnings:?}"
    );
    assert!(!warnings.iter().any(|(about, _, _)| about == "z-old"), "{warnings:?}");
    f.cleanup().await;
}

#[tokio::test]
async fn a_conflist_with_whereabouts_second_and_its_pool_goes_with_it() {
    let f = Fixture::start().await;
    let list = f.unique("list");
    let config = json!({"cniVersion": "1.0.0", "name": list, "plugins": [
        {"type": "tuning"},
        {"type": "macvlan", "ipam": {"type": "whereabouts", "range": "10.20.0.0/24", "node_slice_size": "/28"}},
    ]});
    f.add_nad("list", config).await;
    let a = f.add_node("a").await;
    f.reconcile().await;
    assert!(f.slice_of(&list, &a).await.is_some(), "named after the list");

    Api::<DynamicObject>::namespaced_with(f.cluster.client(), f.ns(), &nad_resource())
        .delete("list", &DeleteParams::default())
        .await
        .expect("NAD deleted");
    let summary = f.reconcile().await;
    assert_eq!(summary.deleted, std::slice::from_ref(&list));
    assert!(f.slices(&list).await.is_none());
    f.cleanup().await;
}

#[tokio::test]
async fn a_dry_run_writes_nothing() {
    let mut f = Fixture::start().await;
    let net = f.unique("net");
    f.add_nad("net", macvlan(&net, json!({"range": "192.0.2.0/24", "node_slice_size": "/26"}))).await;
    for n in ["a", "b", "c", "d", "e"] {
        f.add_node(n).await;
    }
    f.ctx.dry_run = true;
    let summary = f.reconcile().await;
    assert_eq!(summary.written, std::slice::from_ref(&net), "{summary:?}");
    assert!(f.slices(&net).await.is_none(), "written in a dry run");
    assert!(f.warnings().await.is_empty());
    f.cleanup().await;
}

#[tokio::test]
async fn nodes_beyond_the_slices_get_a_warning() {
    let f = Fixture::start().await;
    let net = f.unique("net");
    f.add_nad("net", macvlan(&net, json!({"range": "192.0.2.0/24", "node_slice_size": "/25"}))).await;
    for n in ["a", "b", "c"] {
        f.add_node(n).await;
    }
    let summary = f.reconcile().await;
    let unassigned = summary.unassigned.get(&net).expect("someone left out");
    assert!(unassigned.contains(&f.unique("c")), "{unassigned:?}");
    let warnings = f.warnings().await;
    assert!(
        warnings.iter().any(|(about, reason, _)| about == "net" && reason == "NoFreeNodeSlice"),
        "{warnings:?}"
    );
    f.cleanup().await;
}

#[tokio::test]
async fn the_run_loop_reacts_to_a_node_joining() {
    let f = Fixture::start().await;
    let net = f.unique("net");
    f.add_nad("net", macvlan(&net, json!({"range": "192.0.2.0/24", "node_slice_size": "/28"}))).await;
    let task = tokio::spawn(nodeslice::run(f.ctx.clone(), f.settings.clone()));
    for name in ["a", "b"] {
        let node = f.add_node(name).await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if f.slices(&net).await.is_some() && f.slice_of(&net, &node).await.is_some() {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "{node} got no slice in time");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    assert!(!task.is_finished(), "the loop ended: {:?}", task.await);
    task.abort();
    f.cleanup().await;
}

/// Allocations coming and going in a pool that stays busy cannot change an assignment: the run loop
/// does not reconcile for them (under churn they change many times a second, and each reconcile used
/// to list every NAD, Node and IPPool). A pool becoming idle can (a departed node's slice is freed
/// once its pool is empty): that is reconciled.
#[tokio::test]
async fn the_run_loop_reconciles_only_for_changes_that_can_change_an_assignment() {
    let f = Fixture::start().await;
    let net = f.unique("net");
    f.add_nad("net", macvlan(&net, json!({"range": "192.0.2.0/24", "node_slice_size": "/28"}))).await;
    let node = f.add_node("a").await;
    let task = tokio::spawn(nodeslice::run(f.ctx.clone(), f.settings.clone()));
    let reconciles = || f.ctx.metrics.node_slice_reconciles.get();
    // Settled: the node has its slice, and the echo of the NodeSlicePool's own write is seen.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut last = (0, tokio::time::Instant::now());
    let slice = loop {
        let slice = if f.slices(&net).await.is_some() { f.slice_of(&net, &node).await } else { None };
        if reconciles() != last.0 {
            last = (reconciles(), tokio::time::Instant::now());
        }
        if let Some(slice) = slice.filter(|_| last.1.elapsed() > Duration::from_secs(1)) {
            break slice;
        }
        assert!(tokio::time::Instant::now() < deadline, "no settled slice for {node}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let pool = pool_name(&net, Some(&node), &slice.parse().expect("a CIDR"));
    f.set_pool(&pool, &slice, json!({"1": {"id": "c1", "podref": "apps/p1"}})).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let busy = reconciles();
    assert!(busy > last.0, "a pool becoming busy is looked at");

    for n in 2..12 {
        f.set_pool(&pool, &slice, json!({"1": {"id": "c1", "podref": "apps/p1"}, n.to_string(): {"id": format!("c{n}"), "podref": format!("apps/p{n}")}})).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(reconciles(), busy, "allocations changing in a busy pool were reconciled for");

    f.set_pool(&pool, &slice, json!({})).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while reconciles() == busy {
        assert!(tokio::time::Instant::now() < deadline, "a pool becoming idle was not reconciled for");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!task.is_finished(), "the loop ended: {:?}", task.await);
    task.abort();
    f.cleanup().await;
}

/// The slice's holder in the NodeSlicePool (`""` when free); `None` when the slice is not listed.
async fn holder_of(f: &Fixture, pool: &str, slice: &str) -> Option<String> {
    let slices = f.slices(pool).await.expect("the NodeSlicePool exists");
    slices.into_iter().find(|(s, _)| s == slice).map(|(_, n)| n)
}

/// A non-empty per-node IPPool and no NodeSlicePool yet (deleted, lost, or its NAD recreated): the
/// node keeps that slice, though name order would have given it to another node, and nobody else gets
/// it. Here with a `network_name`, so the pool's name carries it as a prefix.
#[tokio::test]
async fn a_busy_per_node_pool_keeps_its_slice_with_its_node_when_no_node_slice_pool_exists() {
    let f = Fixture::start().await;
    let net = f.unique("net");
    let (a, x) = (f.add_node("a").await, f.add_node("x").await);
    let slice = "192.0.2.0/27";
    let x_pool = pool_name(&net, Some(&x), &slice.parse().expect("a CIDR"));
    f.set_pool(&x_pool, slice, json!({"1": {"id": "c1", "podref": "apps/p1"}})).await;
    let ipam = json!({"range": "192.0.2.0/24", "node_slice_size": "/27", "network_name": net});
    f.add_nad("net", macvlan("whatever", ipam)).await;
    f.reconcile().await;

    assert_eq!(f.slice_of(&net, &x).await.as_deref(), Some(slice));
    assert_eq!(holder_of(&f, &net, slice).await, Some(x.clone()), "one entry per slice: x's alone");
    let slice_a = f.slice_of(&net, &a).await.expect("a got a slice");
    assert!(!overlap(&slice_a, slice), "{slice_a}");
    // Stable: the next reconcile (now with the NodeSlicePool) changes nothing.
    assert!(f.reconcile().await.unchanged.contains(&net));

    // The NAD deleted (so is its NodeSlicePool) and recreated: x still gets its busy slice back.
    Api::<DynamicObject>::namespaced_with(f.cluster.client(), f.ns(), &nad_resource())
        .delete("net", &DeleteParams::default())
        .await
        .expect("NAD deleted");
    assert_eq!(f.reconcile().await.deleted, std::slice::from_ref(&net));
    let b = f.add_node("b").await;
    let ipam = json!({"range": "192.0.2.0/24", "node_slice_size": "/27", "network_name": net});
    f.add_nad("net", macvlan("whatever", ipam)).await;
    f.reconcile().await;
    assert_eq!(f.slice_of(&net, &x).await.as_deref(), Some(slice));
    for other in [&a, &b] {
        let theirs = f.slice_of(&net, other).await.expect("a slice");
        assert!(!overlap(&theirs, slice), "{other} got {theirs}");
    }
    f.cleanup().await;
}

/// The same with the pool's node gone: its slice stays with it (departed but busy) and no other node
/// gets it; once its pool is empty, it is free. Without a `network_name`, the pool's name is
/// `<node>-<slice>`.
#[tokio::test]
async fn a_busy_pool_of_a_departed_node_keeps_its_slice_and_an_empty_one_does_not() {
    let f = Fixture::start().await;
    let (busy_net, idle_net) = (f.unique("busy"), f.unique("idle"));
    let x = f.unique("x"); // never a Node
    let (a, b) = (f.add_node("a").await, f.add_node("b").await);
    let (busy_slice, idle_slice) = ("198.51.100.0/27", "203.0.113.0/27");
    let busy_pool = pool_name("", Some(&x), &busy_slice.parse().expect("a CIDR"));
    let idle_pool = pool_name("", Some(&x), &idle_slice.parse().expect("a CIDR"));
    f.set_pool(&busy_pool, busy_slice, json!({"1": {"id": "c1", "podref": "apps/p1"}})).await;
    f.set_pool(&idle_pool, idle_slice, json!({})).await;
    // Two NADs of the busy network, naming their pools differently: the older one (it wins) by its
    // network_name, the other by nothing (its CNI name names the NodeSlicePool), as x's pool is named.
    let named = json!({"range": "198.51.100.0/24", "node_slice_size": "/27", "network_name": busy_net});
    f.add_nad("a-named", macvlan("another-cni-name", named)).await;
    f.add_nad("busy", macvlan(&busy_net, json!({"range": "198.51.100.0/24", "node_slice_size": "/27"})))
        .await;
    f.add_nad("idle", macvlan(&idle_net, json!({"range": "203.0.113.0/24", "node_slice_size": "/27"}))).await;
    let summary = f.reconcile().await;
    assert!(summary.overruled.is_empty(), "{summary:?}");

    assert_eq!(holder_of(&f, &busy_net, busy_slice).await, Some(x.clone()), "departed but busy");
    for node in [&a, &b] {
        let theirs = f.slice_of(&busy_net, node).await.expect("a slice");
        assert!(!overlap(&theirs, busy_slice), "{node} got {theirs}");
    }
    assert_eq!(f.slice_of(&idle_net, &x).await, None, "an empty pool holds nothing");
    // Only a and b: the lowest slice goes to a, in name order.
    assert_eq!(f.slice_of(&idle_net, &a).await.as_deref(), Some(idle_slice));

    // Emptied: freed.
    f.set_pool(&busy_pool, busy_slice, json!({})).await;
    f.reconcile().await;
    assert_eq!(f.slice_of(&busy_net, &x).await, None, "still held after its pool emptied");
    f.cleanup().await;
}

/// A NodeSlicePool of the old layout (/26) whose status names nobody, a busy /26 pool of node x, and the
/// NAD now slicing into /27: x takes a /27 of its old slice and no other node gets the other half.
#[tokio::test]
async fn a_busy_pool_of_the_old_layout_keeps_its_addresses_with_its_node() {
    let f = Fixture::start().await;
    let net = f.unique("net");
    let (a, b, x) = (f.add_node("a").await, f.add_node("b").await, f.add_node("x").await);
    let old: NodeSlicePool = serde_json::from_value(json!({
        "apiVersion": "whereabouts.cni.cncf.io/v1alpha1", "kind": "NodeSlicePool",
        "metadata": {"name": net, "namespace": f.ns()},
        "spec": {"range": "192.0.2.0/24", "sliceSize": "/26"},
        "status": {"allocations": []},
    }))
    .expect("a NodeSlicePool");
    Api::<NodeSlicePool>::namespaced(f.cluster.client(), f.ns())
        .create(&PostParams::default(), &old)
        .await
        .expect("NodeSlicePool created");
    let old_slice = "192.0.2.0/26";
    let x_pool = pool_name("", Some(&x), &old_slice.parse().expect("a CIDR"));
    f.set_pool(&x_pool, old_slice, json!({"1": {"id": "c1", "podref": "apps/p1"}})).await;
    f.add_nad("net", macvlan(&net, json!({"range": "192.0.2.0/24", "node_slice_size": "/27"}))).await;
    f.reconcile().await;

    let slice_x = f.slice_of(&net, &x).await.expect("x got a slice");
    assert!(overlap(&slice_x, old_slice), "{slice_x}");
    for half in ["192.0.2.0/27", "192.0.2.32/27"] {
        let holder = holder_of(&f, &net, half).await.expect("listed");
        assert!(holder.is_empty() || holder == x, "{half} went to {holder}");
    }
    for node in [&a, &b] {
        let theirs = f.slice_of(&net, node).await.expect("a slice");
        assert!(!overlap(&theirs, old_slice), "{node} got {theirs}");
    }
    f.cleanup().await;
}

/// Creates an object of the whereabouts kind `kind` from raw JSON, as the CRD allows it (without
/// `spec`, say), which the types could not write.
async fn create_raw(f: &Fixture, kind: &str, object: Value) {
    let (plural, api_version) = (format!("{}s", kind.to_lowercase()), "whereabouts.cni.cncf.io/v1alpha1");
    let resource = ApiResource {
        group: "whereabouts.cni.cncf.io".into(),
        version: "v1alpha1".into(),
        api_version: api_version.into(),
        kind: kind.into(),
        plural,
    };
    let mut object = object;
    object["apiVersion"] = json!(api_version);
    object["kind"] = json!(kind);
    let object: DynamicObject = serde_json::from_value(object).expect("an object");
    Api::<DynamicObject>::namespaced_with(f.cluster.client(), f.ns(), &resource)
        .create(&PostParams::default(), &object)
        .await
        .unwrap_or_else(|e| panic!("{kind} created: {e}"));
}

/// The Warning Events about `name` for an object that does not decode, with each one's series count
/// (`None`: published once).
async fn unreadable_events(f: &Fixture, name: &str) -> Vec<Option<i32>> {
    let events: Api<Event> = Api::namespaced(f.cluster.client(), f.ns());
    let list = events.list(&ListParams::default()).await.expect("events listed");
    list.items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some("UnreadableObject"))
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .map(|e| e.series.map(|s| s.count))
        .collect()
}

/// An IPPool and NodeSlicePools without `spec` (the CRDs allow it) do not stop node slicing: the IPPool
/// is left out, the NodeSlicePool a NAD wants is written over with the slices its status assigns kept
/// with their nodes, another is left alone; each gets a Warning Event.
#[tokio::test]
async fn unreadable_pools_are_reported_and_every_network_is_still_sliced() {
    let f = Fixture::start().await;
    let (net, other, stray) = (f.unique("net"), f.unique("other"), f.unique("stray"));
    let (a, x) = (f.add_node("a").await, f.add_node("x").await);
    create_raw(&f, "IPPool", json!({"metadata": {"name": "no-spec"}})).await;
    let lost_spec = json!({"metadata": {"name": net},
        "status": {"allocations": [{"nodeName": x, "sliceRange": "192.0.2.32/27"}]}});
    create_raw(&f, "NodeSlicePool", lost_spec).await;
    create_raw(&f, "NodeSlicePool", json!({"metadata": {"name": stray}})).await;
    f.add_nad("net", macvlan(&net, json!({"range": "192.0.2.0/24", "node_slice_size": "/27"}))).await;
    f.add_nad("other", macvlan(&other, json!({"range": "198.51.100.0/24", "node_slice_size": "/26"}))).await;

    let summary = f.reconcile().await;
    let mut written = summary.written.clone();
    written.sort();
    assert_eq!(written, [net.clone(), other.clone()], "{summary:?}");
    let mut unreadable = summary.unreadable.clone();
    unreadable.sort();
    assert_eq!(
        unreadable,
        ["IPPool no-spec".to_string(), format!("NodeSlicePool {net}"), format!("NodeSlicePool {stray}")]
    );
    assert_eq!(f.slice_of(&net, &x).await.as_deref(), Some("192.0.2.32/27"), "the readable status is kept");
    assert!(f.slice_of(&net, &a).await.is_some_and(|s| !overlap(&s, "192.0.2.32/27")));
    assert!(f.slice_of(&other, &a).await.is_some() && f.slice_of(&other, &x).await.is_some());
    let repaired: NodeSlicePool =
        Api::namespaced(f.cluster.client(), f.ns()).get(&net).await.expect("readable");
    assert_eq!(repaired.spec.range, "192.0.2.0/24");
    for name in ["no-spec", net.as_str(), stray.as_str()] {
        assert_eq!(unreadable_events(&f, name).await, [None], "{name}");
    }
    // Now readable: only the two left reported.
    let summary = f.reconcile().await;
    assert_eq!(summary.unreadable.len(), 2, "{summary:?}");
    assert!(summary.unchanged.contains(&net), "{summary:?}");
    f.cleanup().await;
}

/// The run loop reports an object that does not decode once per change of it, not on every
/// reconcile.
#[tokio::test]
async fn the_run_loop_reports_an_unreadable_pool_once_per_change() {
    let f = Fixture::start().await;
    let net = f.unique("net");
    create_raw(&f, "IPPool", json!({"metadata": {"name": "no-spec"}})).await;
    f.add_nad("net", macvlan(&net, json!({"range": "192.0.2.0/24", "node_slice_size": "/28"}))).await;
    let task = tokio::spawn(nodeslice::run(f.ctx.clone(), f.settings.clone()));
    let sliced = |node: String| {
        let f = &f;
        let net = &net;
        async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while f.slices(net).await.is_none() || f.slice_of(net, &node).await.is_none() {
                assert!(tokio::time::Instant::now() < deadline, "{node} got no slice in time");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    // Each node joining is a reconcile.
    for name in ["a", "b"] {
        sliced(f.add_node(name).await).await;
    }
    assert_eq!(unreadable_events(&f, "no-spec").await, [None], "reported on every reconcile");

    // Changed (still without spec): reported again, the Event's series counting it.
    let ip_pools = ApiResource::erase::<IPPool>(&());
    Api::<DynamicObject>::namespaced_with(f.cluster.client(), f.ns(), &ip_pools)
        .patch("no-spec", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"labels": {"x": "y"}}})))
        .await
        .expect("IPPool changed");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while unreadable_events(&f, "no-spec").await != [Some(2)] {
        assert!(tokio::time::Instant::now() < deadline, "{:?}", unreadable_events(&f, "no-spec").await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    sliced(f.add_node("c").await).await;
    assert_eq!(unreadable_events(&f, "no-spec").await, [Some(2)]);
    assert!(!task.is_finished(), "the loop ended: {:?}", task.await);
    task.abort();
    f.cleanup().await;
}
