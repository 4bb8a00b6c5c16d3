//! The Kubernetes store, written once and run against two API servers: the in-process fake of
//! `whereabouts-kube-testing` by default, a real cluster when `WHEREABOUTS_TEST_KUBECONFIG` names a
//! kubeconfig (every test then works in a fresh namespace of its own).
//!
//! * The CRDs: served, upstream's objects accepted and read back unchanged, our additive fields kept,
//!   unknown fields pruned.
//! * [`KubeStore`] itself: create-if-absent, the key-level compare-and-swap of pool writes (a stale
//!   write conflicts exactly when it touches a key someone else changed), reservations with one owner.
//! * Compatibility with pools upstream wrote: undecodable keys skipped and kept, unsigned offsets from
//!   the literal `spec.range` IP (IPv6 offsets of 2^63 and above included), upstream's object names.
//! * The plugin binary end to end: what ADD and DEL store, all-or-nothing multi-range ADDs,
//!   overlapping ranges of one network, refusals, an unreachable or failing API server.
//!
//! Tests that need the fake (its counters, or making it fail) say so and pass on a real cluster.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::task::JoinSet;
use whereabouts_core::pool::{Allocation, COOLDOWNS_ANNOTATION, Pool, PoolSpec, SkippedKey};
use whereabouts_k8s::crd::{IPPool, NodeSlicePool, OverlappingRangeIPReservation};
use whereabouts_k8s::k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use whereabouts_k8s::kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, ListParams, ObjectMeta, PostParams,
};
use whereabouts_k8s::kube::{Resource, ResourceExt};
use whereabouts_kube_testing::TestCluster;
use whereabouts_kube_testing::plugin::{Call, Outcome, addresses_of};
use whereabouts_store::kubernetes::KubeStore;
use whereabouts_store::{Deletion, Reservation, ReserveOutcome, Store, StoreError};

/// The CNI network name (`name` of the network configuration).
const NETWORK: &str = "kube-net";
/// The namespace of the pods the plugin allocates for: not where the objects go.
const POD_NAMESPACE: &str = "apps";
const NODE: &str = "node-a";

const INVALID_ENV: u64 = 4;
const TRY_AGAIN: u64 = 11;
const INTERNAL: u64 = 999;

// ---------------------------------------------------------------------------------------------
// Objects as the API server holds them

fn pools_api(cluster: &TestCluster) -> Api<IPPool> {
    Api::namespaced(cluster.client(), cluster.namespace())
}

fn reservations_api(cluster: &TestCluster) -> Api<OverlappingRangeIPReservation> {
    Api::namespaced(cluster.client(), cluster.namespace())
}

fn store(cluster: &TestCluster) -> KubeStore {
    KubeStore::new(cluster.client(), cluster.namespace(), "test-cluster")
}

/// Objects of kind `K` as untyped JSON in `namespace`, to see exactly what is stored.
fn raw_api<K: Resource<DynamicType = ()>>(
    cluster: &TestCluster,
    namespace: &str,
) -> (Api<DynamicObject>, ApiResource) {
    let resource = ApiResource::erase::<K>(&());
    (Api::namespaced_with(cluster.client(), namespace, &resource), resource)
}

/// Creates an object of kind `K` from raw JSON (`spec`, maybe `status`) in the test namespace; its
/// stored body without metadata.
async fn create_raw<K: Resource<DynamicType = ()>>(cluster: &TestCluster, name: &str, body: Value) -> Value {
    let (api, resource) = raw_api::<K>(cluster, cluster.namespace());
    let object = DynamicObject::new(name, &resource).data(body);
    let created = api
        .create(&PostParams::default(), &object)
        .await
        .unwrap_or_else(|e| panic!("create {} {name}: {e}", resource.kind));
    created.data
}

/// The stored `spec` of an object of kind `K` in `namespace`, as JSON.
async fn raw_spec_in<K: Resource<DynamicType = ()>>(
    cluster: &TestCluster,
    namespace: &str,
    name: &str,
) -> Option<Value> {
    let (api, resource) = raw_api::<K>(cluster, namespace);
    let found = api.get_opt(name).await.unwrap_or_else(|e| panic!("get {} {name}: {e}", resource.kind));
    found.map(|object| object.data["spec"].clone())
}

async fn raw_spec<K: Resource<DynamicType = ()>>(cluster: &TestCluster, name: &str) -> Option<Value> {
    raw_spec_in::<K>(cluster, cluster.namespace(), name).await
}

/// The allocations of a pool as stored, by key; empty when the pool does not exist.
async fn stored_allocations(cluster: &TestCluster, pool: &str) -> BTreeMap<String, Value> {
    let spec = raw_spec::<IPPool>(cluster, pool).await.unwrap_or(Value::Null);
    match &spec["allocations"] {
        Value::Object(map) => map.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        _ => BTreeMap::new(),
    }
}

async fn stored_keys(cluster: &TestCluster, pool: &str) -> Vec<String> {
    stored_allocations(cluster, pool).await.into_keys().collect()
}

/// Every reservation in the test namespace: name → its stored spec.
async fn stored_reservations(cluster: &TestCluster) -> BTreeMap<String, Value> {
    let (api, _) = raw_api::<OverlappingRangeIPReservation>(cluster, cluster.namespace());
    let list = api.list(&ListParams::default()).await.expect("list reservations");
    list.items.into_iter().map(|o| (o.name_any(), o.data["spec"].clone())).collect()
}

async fn stored_reservation_names(cluster: &TestCluster) -> Vec<String> {
    stored_reservations(cluster).await.into_keys().collect()
}

/// An allocation for pod `pod` (sandbox `<pod>-c1`, interface `net1`) as the store tests write it.
fn entry(pod: &str) -> Allocation {
    Allocation {
        container_id: format!("{pod}-c1"),
        pod_ref: format!("{POD_NAMESPACE}/{pod}"),
        ifname: "net1".into(),
        node: None,
        cni_network: None,
        pod_uid: None,
        statefulset: None,
        ipam_claim: None,
    }
}

fn spec(range: &str, entries: &[(&str, &str)]) -> PoolSpec {
    PoolSpec {
        range: range.into(),
        allocations: entries.iter().map(|(key, pod)| (key.to_string(), entry(pod))).collect(),
        ..Default::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Running the plugin

/// One attachment: pod, sandbox and interface.
#[derive(Debug, Clone)]
struct Pod {
    name: String,
    container: String,
}

impl Pod {
    fn new(name: &str) -> Self {
        Pod { name: name.into(), container: format!("{name}-sandbox") }
    }

    /// The same pod and interface in another sandbox.
    fn sandbox(&self, n: u32) -> Self {
        Pod { name: self.name.clone(), container: format!("{}-sandbox-{n}", self.name) }
    }

    fn pod_ref(&self) -> String {
        format!("{POD_NAMESPACE}/{}", self.name)
    }

    fn cni_args(&self) -> String {
        format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={POD_NAMESPACE};K8S_POD_NAME={}", self.name)
    }

    /// The pool entry the plugin writes for this pod.
    fn stored_entry(&self, cni_network: &str) -> Value {
        json!({
            "id": self.container, "podref": self.pod_ref(), "ifname": "net1",
            "node": NODE, "network": cni_network,
        })
    }

    /// The reservation the plugin writes for this pod.
    fn stored_reservation(&self) -> Value {
        json!({ "podref": self.pod_ref(), "ifname": "net1", "containerid": self.container })
    }
}

/// A network configuration named `name` whose `ipam` uses the kubeconfig at `kubeconfig`, with
/// `ipam` keys added.
fn netconf_at(kubeconfig: &Path, name: &str, ipam: Value) -> Value {
    let mut full = json!({
        "type": "whereabouts",
        "datastore": "kubernetes",
        "kubernetes": { "kubeconfig": kubeconfig },
        "log_level": "error",
    });
    if let Value::Object(extra) = ipam {
        for (key, value) in extra {
            full[key] = value;
        }
    }
    json!({ "cniVersion": "1.0.0", "name": name, "type": "macvlan", "ipam": full })
}

/// The network configuration [`NETWORK`] on the test cluster.
fn netconf(cluster: &TestCluster, ipam: Value) -> Value {
    netconf_at(cluster.kubeconfig_path(), NETWORK, ipam)
}

async fn cni(command: &str, pod: &Pod, netconf: &Value) -> Outcome {
    run_plugin(command, pod, &pod.cni_args(), netconf).await
}

/// Runs the plugin once with `cni_args`.
async fn run_plugin(command: &str, pod: &Pod, cni_args: &str, netconf: &Value) -> Outcome {
    let binary = std::path::Path::new(env!("CARGO_BIN_EXE_whereabouts"));
    Call { binary, command, container: &pod.container, cni_args, node: NODE }.run(netconf).await
}

/// ADD that must succeed: its addresses.
async fn add(pod: &Pod, netconf: &Value) -> Vec<String> {
    cni("ADD", pod, netconf).await.addresses(&format!("ADD {}", pod.name))
}

/// Starts an ADD for `pod` in `running`.
fn spawn_add(running: &mut JoinSet<(Outcome, Pod)>, pod: Pod, netconf: &Value) {
    let netconf = netconf.clone();
    running.spawn(async move { (cni("ADD", &pod, &netconf).await, pod) });
}

/// DEL that must succeed and print nothing.
async fn del(pod: &Pod, netconf: &Value) {
    match cni("DEL", pod, netconf).await {
        Outcome::Success(Value::Null) => {}
        other => panic!("DEL {}: expected silent success, got {other:?}", pod.name),
    }
}

// ---------------------------------------------------------------------------------------------
// 1. The CRDs

#[tokio::test(flavor = "multi_thread")]
async fn the_three_crds_are_served_in_the_namespace() {
    let cluster = TestCluster::start().await;
    let params = ListParams::default();
    let pools = pools_api(&cluster).list(&params).await.expect("list IPPools");
    assert!(pools.items.is_empty(), "a fresh namespace holds no pool");
    let reservations = reservations_api(&cluster).list(&params).await.expect("list ORIPs");
    assert!(reservations.items.is_empty());
    let slices: Api<NodeSlicePool> = Api::namespaced(cluster.client(), cluster.namespace());
    assert!(slices.list(&params).await.expect("list NodeSlicePools").items.is_empty());

    // Upstream's controller writes a NodeSlicePool's status through the main resource: without a
    // status subresource it is stored with the object.
    let body = json!({
        "spec": { "range": "192.0.2.0/24", "sliceSize": "/26" },
        "status": { "allocations": [
            { "nodeName": NODE, "sliceRange": "192.0.2.0/26" },
            { "nodeName": "", "sliceRange": "192.0.2.64/26" },
        ] },
    });
    let stored = create_raw::<NodeSlicePool>(&cluster, "slices", body.clone()).await;
    assert_eq!(stored, body);
    let typed = slices.get("slices").await.expect("typed read");
    let status = typed.status.expect("status kept");
    assert_eq!(status.allocations[0].node_name, NODE);
    assert_eq!(status.allocations[1].slice_range, "192.0.2.64/26");
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pool_as_upstream_writes_it_reads_back_unchanged() {
    let cluster = TestCluster::start().await;
    let spec = json!({
        "range": "192.0.2.0/24",
        "allocations": {
            "5": { "id": "c", "podref": "ns/p", "ifname": "net1" },
            // Before v0.8 upstream wrote no ifname; `id` and `podref` are always there, maybe empty.
            "6": { "id": "d", "podref": "" },
        },
    });
    let created = create_raw::<IPPool>(&cluster, "192.0.2.0-24", json!({ "spec": spec })).await;
    assert_eq!(created, json!({ "spec": spec }), "accepted as is");
    assert_eq!(raw_spec::<IPPool>(&cluster, "192.0.2.0-24").await, Some(spec));

    let read = store(&cluster).read_pool("192.0.2.0-24").await.expect("read").expect("the pool exists");
    let expected = PoolSpec {
        range: "192.0.2.0/24".into(),
        allocations: BTreeMap::from([
            (
                "5".into(),
                Allocation {
                    container_id: "c".into(),
                    pod_ref: "ns/p".into(),
                    ifname: "net1".into(),
                    node: None,
                    cni_network: None,
                    pod_uid: None,
                    statefulset: None,
                    ipam_claim: None,
                },
            ),
            (
                "6".into(),
                Allocation {
                    container_id: "d".into(),
                    pod_ref: String::new(),
                    ifname: String::new(),
                    node: None,
                    cni_network: None,
                    pod_uid: None,
                    statefulset: None,
                    ipam_claim: None,
                },
            ),
        ]),
        ..Default::default()
    };
    assert_eq!(read.spec, expected);
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn additive_fields_survive_and_unknown_fields_are_pruned() {
    let cluster = TestCluster::start().await;
    let body = json!({
        "spec": {
            "range": "192.0.2.0/24",
            "allocations": {
                "1": { "id": "a", "podref": "ns/a", "ifname": "net1", "node": "n1", "network": "blue",
                       "colour": "red" },
            },
            "owner": "someone",
        },
        "extra": true,
    });
    let kept = json!({
        "range": "192.0.2.0/24",
        "allocations": { "1": { "id": "a", "podref": "ns/a", "ifname": "net1", "node": "n1", "network": "blue" } },
    });
    let created = create_raw::<IPPool>(&cluster, "192.0.2.0-24", body).await;
    assert_eq!(created, json!({ "spec": kept }), "unknown fields pruned on create");
    assert_eq!(raw_spec::<IPPool>(&cluster, "192.0.2.0-24").await, Some(kept));
    let read = store(&cluster).read_pool("192.0.2.0-24").await.expect("read").expect("exists");
    let allocation = &read.spec.allocations["1"];
    assert_eq!(allocation.node.as_deref(), Some("n1"));
    assert_eq!(allocation.cni_network.as_deref(), Some("blue"));

    // The ORIP's `containerid` is in upstream's schema (never written by upstream): kept.
    let body = json!({ "spec": { "podref": "ns/a", "ifname": "net1", "containerid": "a", "pod": "x" } });
    let created = create_raw::<OverlappingRangeIPReservation>(&cluster, "192.0.2.1", body).await;
    let kept = json!({ "podref": "ns/a", "ifname": "net1", "containerid": "a" });
    assert_eq!(created, json!({ "spec": kept }));
    let read = store(&cluster).read_reservation("192.0.2.1").await.expect("read");
    assert_eq!(
        read.map(|read| read.holder),
        Some(Reservation { pod_ref: "ns/a".into(), ifname: "net1".into(), container_id: "a".into() })
    );
    cluster.cleanup().await;
}

// ---------------------------------------------------------------------------------------------
// 2. The store's paths

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_pool_reads_as_none_and_is_created_once() {
    let cluster = TestCluster::start().await;
    let store = store(&cluster);
    let name = "192.0.2.0-24";
    assert_eq!(store.read_pool(name).await, Ok(None));
    let first = spec("192.0.2.0/24", &[("1", "a")]);
    let version = store.write_pool(name, &first, None, None).await.expect("create");
    let read = store.read_pool(name).await.expect("read").expect("created");
    assert_eq!(read.spec, first);
    assert_eq!(read.version, version);
    assert_eq!(raw_spec::<IPPool>(&cluster, name).await, Some(serde_json::to_value(&first).expect("json")));

    // A second create is a lost race, and changes nothing.
    let second = spec("192.0.2.0/24", &[("2", "b")]);
    assert_eq!(store.write_pool(name, &second, None, None).await, Err(StoreError::Conflict));
    assert_eq!(store.read_pool(name).await.expect("read"), Some(read));
    assert_eq!(store.list_pools().await.expect("list"), vec![name.to_string()]);
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stale_write_conflicts_on_a_key_someone_else_changed() {
    let cluster = TestCluster::start().await;
    let store = store(&cluster);
    let name = "192.0.2.0-24";
    let range = "192.0.2.0/24";
    store.write_pool(name, &spec(range, &[("1", "a")]), None, None).await.expect("create");
    let stale = store.read_pool(name).await.expect("read").expect("exists");

    // Someone else takes .2 and gives .1 a new sandbox.
    let mut theirs = spec(range, &[("1", "a"), ("2", "b")]);
    theirs.allocations.get_mut("1").expect("1").container_id = "a-c2".into();
    let written = store.write_pool(name, &theirs, Some(&stale), None).await.expect("their write");
    assert_ne!(written, stale.version);

    // From the stale read: taking .2, rewriting .1, releasing .1 all lose.
    let take_same = spec(range, &[("1", "a"), ("2", "c")]);
    assert_eq!(store.write_pool(name, &take_same, Some(&stale), None).await, Err(StoreError::Conflict));
    let mut rewrite = spec(range, &[("1", "a")]);
    rewrite.allocations.get_mut("1").expect("1").ifname = "net2".into();
    assert_eq!(store.write_pool(name, &rewrite, Some(&stale), None).await, Err(StoreError::Conflict));
    let release = spec(range, &[]);
    assert_eq!(store.write_pool(name, &release, Some(&stale), None).await, Err(StoreError::Conflict));
    assert_eq!(store.read_pool(name).await.expect("read").expect("exists").spec, theirs, "nothing of ours");

    // From a fresh read the release goes through, and only removes what was read.
    let fresh = store.read_pool(name).await.expect("read").expect("exists");
    let mut released = theirs.clone();
    released.allocations.remove("1");
    store.write_pool(name, &released, Some(&fresh), None).await.expect("release");
    assert_eq!(stored_keys(&cluster, name).await, ["2"]);
    cluster.cleanup().await;
}

/// The designed behaviour of the store (see its module): a write compares only the keys it changes,
/// so two writers that read the same version and take different addresses both succeed.
#[tokio::test(flavor = "multi_thread")]
async fn a_stale_write_of_other_keys_succeeds_and_keeps_both() {
    let cluster = TestCluster::start().await;
    let store = store(&cluster);
    let name = "192.0.2.0-24";
    let range = "192.0.2.0/24";
    store.write_pool(name, &spec(range, &[("1", "a")]), None, None).await.expect("create");
    let stale = store.read_pool(name).await.expect("read").expect("exists");

    let theirs = spec(range, &[("1", "a"), ("2", "b")]);
    store.write_pool(name, &theirs, Some(&stale), None).await.expect("their write");
    let ours = spec(range, &[("1", "a"), ("3", "c")]);
    store.write_pool(name, &ours, Some(&stale), None).await.expect("ours, on other keys");
    assert_eq!(
        store.read_pool(name).await.expect("read").expect("exists").spec,
        spec(range, &[("1", "a"), ("2", "b"), ("3", "c")])
    );

    // Releasing .1, still what the stale read saw, goes through too and leaves the rest.
    store.write_pool(name, &spec(range, &[]), Some(&stale), None).await.expect("release .1");
    assert_eq!(stored_keys(&cluster, name).await, ["2", "3"]);

    // Writing back what was read is no write at all.
    let now = store.read_pool(name).await.expect("read").expect("exists");
    let unchanged = store.write_pool(name, &now.spec, Some(&now), None).await.expect("no-op");
    assert_eq!(unchanged, now.version);
    cluster.cleanup().await;
}

/// Each read carries the allocations as the API server sent them, which its write tests: two readings
/// of one pool in one process (the writer queue's head and a DEL, say) each write from their own, even
/// when an entry is stored in a form this code would not write (explicit `null`s).
#[tokio::test(flavor = "multi_thread")]
async fn two_readings_in_one_process_each_write_from_their_own() {
    let cluster = TestCluster::start().await;
    let store = store(&cluster);
    let name = "192.0.2.0-24";
    let range = "192.0.2.0/24";
    let nulled = json!({ "id": "a-c1", "podref": "ns/a", "ifname": "net1", "node": null, "network": null });
    create_raw::<IPPool>(
        &cluster,
        name,
        json!({ "spec": { "range": range, "allocations": { "1": nulled } } }),
    )
    .await;
    let first = store.read_pool(name).await.expect("read").expect("exists");
    let second = store.read_pool(name).await.expect("read").expect("exists");

    let mut taken = second.spec.clone();
    taken.allocations.insert("2".into(), entry("b"));
    store.write_pool(name, &taken, Some(&second), None).await.expect("the second reading takes .2");
    let mut released = first.spec.clone();
    released.allocations.remove("1");
    store.write_pool(name, &released, Some(&first), None).await.expect("the first reading releases .1");
    assert_eq!(stored_keys(&cluster, name).await, ["2"]);
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_write_to_a_pool_deleted_since_it_was_read_conflicts() {
    let cluster = TestCluster::start().await;
    let store = store(&cluster);
    let name = "192.0.2.0-24";
    store.write_pool(name, &spec("192.0.2.0/24", &[("1", "a")]), None, None).await.expect("create");
    let read = store.read_pool(name).await.expect("read").expect("exists");
    pools_api(&cluster).delete(name, &DeleteParams::default()).await.expect("delete the pool");
    let next = spec("192.0.2.0/24", &[("1", "a"), ("2", "b")]);
    assert_eq!(store.write_pool(name, &next, Some(&read), None).await, Err(StoreError::Conflict));
    assert_eq!(store.read_pool(name).await, Ok(None), "not recreated by a patch");
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reservation_has_one_owner() {
    let cluster = TestCluster::start().await;
    let store = store(&cluster);
    let name = "192.0.2.7";
    let owner = Reservation { pod_ref: "apps/a".into(), ifname: "net1".into(), container_id: "a-c1".into() };
    let other = Reservation { pod_ref: "apps/b".into(), ifname: "net1".into(), container_id: "b-c1".into() };
    let new_sandbox = Reservation { container_id: "a-c2".into(), ..owner.clone() };

    let holder =
        async |store: &KubeStore| store.read_reservation(name).await.expect("read").map(|r| r.holder);
    assert_eq!(holder(&store).await, None);
    assert_eq!(store.create_reservation(name, &owner).await, Ok(ReserveOutcome::Reserved));
    assert_eq!(
        raw_spec::<OverlappingRangeIPReservation>(&cluster, name).await,
        Some(json!({ "podref": "apps/a", "ifname": "net1", "containerid": "a-c1" }))
    );
    let version = reservations_api(&cluster).get(name).await.expect("get").resource_version();

    // Again by its owner: nothing to write.
    assert_eq!(store.create_reservation(name, &owner).await, Ok(ReserveOutcome::Reserved));
    assert_eq!(reservations_api(&cluster).get(name).await.expect("get").resource_version(), version);

    assert_eq!(store.create_reservation(name, &other).await, Ok(ReserveOutcome::HeldBy(owner.clone())));
    let first = store.read_reservation(name).await.expect("read").expect("exists");
    assert_eq!(first.holder, owner);

    // The same pod and interface in a new sandbox takes it over.
    assert_eq!(store.create_reservation(name, &new_sandbox).await, Ok(ReserveOutcome::Reserved));
    let taken_over = store.read_reservation(name).await.expect("read").expect("exists");
    assert_eq!(taken_over.holder, new_sandbox);

    // A delete decided on the reading before the take-over is refused by its preconditions.
    assert_eq!(store.delete_reservation(name, &first.version).await, Ok(Deletion::Changed));
    assert_eq!(store.list_reservations().await, Ok(vec![(name.to_string(), taken_over.clone())]));

    store.delete_reservation(name, &taken_over.version).await.expect("delete as read");
    assert_eq!(holder(&store).await, None);
    assert_eq!(
        store.delete_reservation(name, &taken_over.version).await,
        Ok(Deletion::Deleted),
        "already gone"
    );
    // Created again, it is another object: the old reading's uid no longer matches.
    assert_eq!(store.create_reservation(name, &new_sandbox).await, Ok(ReserveOutcome::Reserved));
    assert_eq!(store.delete_reservation(name, &taken_over.version).await, Ok(Deletion::Changed));
    assert_eq!(holder(&store).await, Some(new_sandbox));
    cluster.cleanup().await;
}

// ---------------------------------------------------------------------------------------------
// 3. Upstream's pools and names

#[tokio::test(flavor = "multi_thread")]
async fn keys_upstream_cannot_decode_are_skipped_and_kept() {
    let cluster = TestCluster::start().await;
    let pool = "192.0.2.0-24";
    let upstream = json!({
        "1": { "id": "up-1", "podref": "apps/up" },
        "abc": { "id": "odd-1", "podref": "apps/odd", "ifname": "net1" },
        "-1": { "id": "odd-2", "podref": "apps/odd", "ifname": "net2" },
        "18446744073709551616": { "id": "odd-3", "podref": "apps/odd", "ifname": "net3" },
    });
    create_raw::<IPPool>(
        &cluster,
        pool,
        json!({ "spec": { "range": "192.0.2.0/24", "allocations": upstream } }),
    )
    .await;
    let read = store(&cluster).read_pool(pool).await.expect("read").expect("exists");
    let (decoded, skipped) =
        Pool::from_spec(&read.spec, "192.0.2.0/24".parse().expect("cidr")).expect("decode");
    assert_eq!(
        skipped,
        ["-1", "18446744073709551616", "abc"].map(|k| SkippedKey(k.to_string())),
        "only the three odd keys are skipped"
    );
    assert_eq!(decoded.len(), 1);

    let net = netconf(&cluster, json!({ "range": "192.0.2.0/24" }));
    let ours = Pod::new("keys-ours");
    assert_eq!(add(&ours, &net).await, ["192.0.2.2/24"], ".1 is upstream's, the odd keys hold nothing");
    let mut expected: BTreeMap<String, Value> =
        upstream.as_object().expect("object").iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    expected.insert("2".into(), ours.stored_entry(NETWORK));
    assert_eq!(stored_allocations(&cluster, pool).await, expected, "odd keys written back unchanged");

    del(&ours, &net).await;
    expected.remove("2");
    assert_eq!(stored_allocations(&cluster, pool).await, expected);
    cluster.cleanup().await;
}

/// Two keys for one address ("05" and "5", only ever written by hand): the second is kept aside like
/// an undecodable key, and a write for another address changes neither.
#[tokio::test(flavor = "multi_thread")]
async fn two_keys_for_one_address_both_survive_an_unrelated_write() {
    let cluster = TestCluster::start().await;
    let pool = "192.0.2.0-24";
    let upstream = json!({
        "05": { "id": "x-sandbox", "podref": "apps/x", "ifname": "net1" },
        "5": { "id": "y-sandbox", "podref": "apps/y", "ifname": "net1" },
    });
    create_raw::<IPPool>(
        &cluster,
        pool,
        json!({ "spec": { "range": "192.0.2.0/24", "allocations": upstream } }),
    )
    .await;
    let net = netconf(&cluster, json!({ "range": "192.0.2.0/24" }));
    let ours = Pod::new("dup-ours");
    assert_eq!(add(&ours, &net).await, ["192.0.2.1/24"]);
    let mut expected: BTreeMap<String, Value> =
        upstream.as_object().expect("object").iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    expected.insert("1".into(), ours.stored_entry(NETWORK));
    assert_eq!(stored_allocations(&cluster, pool).await, expected);
    cluster.cleanup().await;
}

/// Offsets are unsigned decimals from the literal `spec.range` IP, over the full width: upstream
/// decodes them as signed 64-bit numbers and ignores those of 2^63 and above, handing their address
/// out again.
#[tokio::test(flavor = "multi_thread")]
async fn ipv6_offsets_of_2_63_and_above_are_stored_unsigned_and_never_handed_out_twice() {
    let cluster = TestCluster::start().await;
    let range = json!({ "range": "2001:db8:1::/64", "range_start": "2001:db8:1::ffff:ffff:ffff:fff0" });
    let net = netconf(&cluster, range.clone());
    // Without reservations only the pool's keys keep b off a's address.
    let mut pool_only = range;
    pool_only["enable_overlapping_ranges"] = json!(false);
    let pool_only = netconf(&cluster, pool_only);
    let pool = "2001-db8-1---64";
    let (a, b, c) = (Pod::new("v6-a"), Pod::new("v6-b"), Pod::new("v6-c"));
    assert_eq!(add(&a, &net).await, ["2001:db8:1:0:ffff:ffff:ffff:fff0/64"]);
    assert_eq!(stored_keys(&cluster, pool).await, ["18446744073709551600"]);
    assert_eq!(add(&b, &pool_only).await, ["2001:db8:1:0:ffff:ffff:ffff:fff1/64"], "fff0 is taken");
    assert_eq!(stored_keys(&cluster, pool).await, ["18446744073709551600", "18446744073709551601"]);
    assert_eq!(
        add(&a, &pool_only).await,
        ["2001:db8:1:0:ffff:ffff:ffff:fff0/64"],
        "idempotent: the key is read"
    );
    assert_eq!(add(&c, &net).await, ["2001:db8:1:0:ffff:ffff:ffff:fff2/64"]);
    assert_eq!(
        stored_keys(&cluster, pool).await,
        ["18446744073709551600", "18446744073709551601", "18446744073709551602"]
    );
    // A single zero group is not compressed (RFC 5952, as Go prints it).
    assert_eq!(
        stored_reservation_names(&cluster).await,
        ["2001-db8-1-0-ffff-ffff-ffff-fff0", "2001-db8-1-0-ffff-ffff-ffff-fff2"]
    );
    assert_eq!(
        raw_spec::<OverlappingRangeIPReservation>(&cluster, "2001-db8-1-0-ffff-ffff-ffff-fff2").await,
        Some(c.stored_reservation())
    );
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pool_with_host_bits_in_its_range_counts_offsets_from_that_ip() {
    let cluster = TestCluster::start().await;
    // Hand-made, as upstream accepts: the offset base is 192.0.2.16, not the network address.
    let pool = "192.0.2.0-24";
    create_raw::<IPPool>(
        &cluster,
        pool,
        json!({ "spec": { "range": "192.0.2.16/24", "allocations": { "0": { "id": "x", "podref": "apps/x" } } } }),
    )
    .await;
    let net = netconf(&cluster, json!({ "range": "192.0.2.0/24", "range_start": "192.0.2.16" }));
    let pod = Pod::new("based");
    assert_eq!(add(&pod, &net).await, ["192.0.2.17/24"], "key 0 is 192.0.2.16");
    assert_eq!(stored_keys(&cluster, pool).await, ["0", "1"]);
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_network_name_prefixes_pool_and_reservation_names() {
    let cluster = TestCluster::start().await;
    let net = netconf(&cluster, json!({ "range": "203.0.113.0/24", "network_name": "blue" }));
    let pod = Pod::new("named");
    assert_eq!(add(&pod, &net).await, ["203.0.113.1/24"]);
    assert_eq!(store(&cluster).list_pools().await, Ok(vec!["blue-203.0.113.0-24".to_string()]));
    assert_eq!(stored_keys(&cluster, "blue-203.0.113.0-24").await, ["1"]);
    assert_eq!(stored_reservation_names(&cluster).await, ["blue-203.0.113.1"]);
    cluster.cleanup().await;
}

// ---------------------------------------------------------------------------------------------
// 4. The plugin end to end

#[tokio::test(flavor = "multi_thread")]
async fn add_stores_entry_and_reservation_and_del_frees_both() {
    let cluster = TestCluster::start().await;
    let net = netconf(&cluster, json!({ "range": "192.0.2.0/24" }));
    let pool = "192.0.2.0-24";
    let (a, b) = (Pod::new("life-a"), Pod::new("life-b"));

    let result = match cni("ADD", &a, &net).await {
        Outcome::Success(result) => result,
        other => panic!("ADD: {other:?}"),
    };
    assert_eq!(result, json!({ "cniVersion": "1.0.0", "ips": [{ "address": "192.0.2.1/24" }] }));
    assert_eq!(
        stored_allocations(&cluster, pool).await,
        BTreeMap::from([("1".into(), a.stored_entry(NETWORK))])
    );
    assert_eq!(
        raw_spec::<IPPool>(&cluster, pool).await.expect("pool")["range"],
        "192.0.2.0/24",
        "spec.range is the canonical network"
    );
    assert_eq!(
        stored_reservations(&cluster).await,
        BTreeMap::from([("192.0.2.1".into(), a.stored_reservation())])
    );

    assert_eq!(add(&b, &net).await, ["192.0.2.2/24"]);

    // Again for the same attachment: the same address, and nothing written.
    let pool_version = pools_api(&cluster).get(pool).await.expect("pool").resource_version();
    let reservation_version =
        reservations_api(&cluster).get("192.0.2.1").await.expect("orip").resource_version();
    assert_eq!(add(&a, &net).await, ["192.0.2.1/24"]);
    assert_eq!(pools_api(&cluster).get(pool).await.expect("pool").resource_version(), pool_version);
    assert_eq!(
        reservations_api(&cluster).get("192.0.2.1").await.expect("orip").resource_version(),
        reservation_version
    );

    del(&a, &net).await;
    assert_eq!(
        stored_allocations(&cluster, pool).await,
        BTreeMap::from([("2".into(), b.stored_entry(NETWORK))])
    );
    assert_eq!(stored_reservation_names(&cluster).await, ["192.0.2.2"]);
    del(&a, &net).await;
    // The freed address is the lowest free one again.
    assert_eq!(add(&Pod::new("life-c"), &net).await, ["192.0.2.1/24"]);
    cluster.cleanup().await;
}

/// At `log_level: debug` (upstream's default) the log says what whereabouts did and why; the HTTP and
/// Kubernetes client libraries under it are held at warn (they once wrote 64 of 89 lines for two ADDs
/// and two DELs: connection pooling, streams opened and closed).
#[tokio::test(flavor = "multi_thread")]
async fn debug_logs_are_whereabouts_own() {
    let cluster = TestCluster::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let log = dir.path().join("whereabouts.log");
    let net = netconf(&cluster, json!({ "range": "192.0.2.0/24", "log_level": "debug", "log_file": log }));
    let pods = [Pod::new("log-a"), Pod::new("log-b")];
    for pod in &pods {
        add(pod, &net).await;
    }
    for pod in &pods {
        del(pod, &net).await;
    }
    let written = std::fs::read_to_string(&log).expect("the log file");
    let lines: Vec<&str> = written.lines().collect();
    assert!(lines.iter().any(|l| l.contains("[debug] ADD")), "{written}");
    let library_phrases =
        ["pooling idle connection", "stream closed", "connecting to", "starting new connection", "http"];
    let noise: Vec<&&str> = lines.iter().filter(|l| library_phrases.iter().any(|p| l.contains(p))).collect();
    assert!(noise.is_empty(), "library internals in the log: {noise:#?}");
    cluster.cleanup().await;
}

/// A pod's new sandbox (same pod and interface, new container ID) keeps the address and takes over
/// the entry and the reservation; the old sandbox's late DEL then leaves them alone.
#[tokio::test(flavor = "multi_thread")]
async fn a_new_sandbox_of_a_pod_takes_over_its_address() {
    let cluster = TestCluster::start().await;
    let net = netconf(&cluster, json!({ "range": "192.0.2.0/24" }));
    let pool = "192.0.2.0-24";
    let old = Pod::new("moved");
    let new = old.sandbox(2);
    assert_eq!(add(&old, &net).await, ["192.0.2.1/24"]);
    assert_eq!(add(&new, &net).await, ["192.0.2.1/24"]);
    let entry = BTreeMap::from([("1".to_string(), new.stored_entry(NETWORK))]);
    assert_eq!(stored_allocations(&cluster, pool).await, entry);
    let reservation = BTreeMap::from([("192.0.2.1".to_string(), new.stored_reservation())]);
    assert_eq!(stored_reservations(&cluster).await, reservation);

    del(&old, &net).await;
    assert_eq!(stored_allocations(&cluster, pool).await, entry, "the old sandbox's DEL frees nothing");
    assert_eq!(stored_reservations(&cluster).await, reservation);
    del(&new, &net).await;
    assert_eq!(stored_keys(&cluster, pool).await, Vec::<String>::new());
    assert_eq!(stored_reservation_names(&cluster).await, Vec::<String>::new());
    cluster.cleanup().await;
}

/// Two pods of one name (a StatefulSet's pod deleted and created again on another node) whose ADDs
/// landed side by side, as per-key compare-and-swap lets them: the new pod's sandbox, ADDed again, gets
/// its own address back, never the old pod's, and the old sandbox's DEL then leaves the attachment one
/// entry.
#[tokio::test(flavor = "multi_thread")]
async fn two_pods_of_one_name_that_landed_side_by_side_each_keep_their_own() {
    let cluster = TestCluster::start().await;
    let net = netconf(&cluster, json!({ "range": "192.0.2.0/24", "enable_overlapping_ranges": false }));
    let pool = "192.0.2.0-24";
    let old = Pod::new("web-0");
    let new = old.sandbox(2);
    let entry = |pod: &Pod, node: &str, uid: &str| {
        let mut entry = pod.stored_entry(NETWORK);
        entry["node"] = json!(node);
        entry["poduid"] = json!(uid);
        entry
    };
    let (old_entry, new_entry) = (entry(&old, "node-b", "uid-old"), entry(&new, NODE, "uid-new"));
    create_raw::<IPPool>(
        &cluster,
        pool,
        json!({ "spec": { "range": "192.0.2.0/24", "allocations": { "1": old_entry, "5": new_entry } } }),
    )
    .await;
    let again = run_plugin("ADD", &new, &format!("{};K8S_POD_UID=uid-new", new.cni_args()), &net).await;
    assert_eq!(again.addresses("ADD of the new pod again"), ["192.0.2.5/24"]);
    let both = BTreeMap::from([("1".to_string(), old_entry), ("5".to_string(), new_entry.clone())]);
    assert_eq!(stored_allocations(&cluster, pool).await, both, "the old pod's entry is not taken over");

    del(&old, &net).await;
    assert_eq!(stored_allocations(&cluster, pool).await, BTreeMap::from([("5".to_string(), new_entry)]));
    del(&new, &net).await;
    assert_eq!(stored_keys(&cluster, pool).await, Vec::<String>::new());
    cluster.cleanup().await;
}

/// Upstream's e2e "reclaim": an entry and a reservation upstream wrote (no `containerid`) for a pod
/// go back to that pod in its new sandbox, which then owns both.
#[tokio::test(flavor = "multi_thread")]
async fn an_upstream_allocation_is_reclaimed_by_its_pod_in_a_new_sandbox() {
    let cluster = TestCluster::start().await;
    let pool = "192.0.2.0-24";
    let pod = Pod::new("reclaim");
    let upstream_entry = json!({ "id": "upstream-sandbox", "podref": pod.pod_ref(), "ifname": "net1" });
    create_raw::<IPPool>(
        &cluster,
        pool,
        json!({ "spec": { "range": "192.0.2.0/24", "allocations": { "7": upstream_entry } } }),
    )
    .await;
    let upstream_reservation = json!({ "podref": pod.pod_ref(), "ifname": "net1" });
    create_raw::<OverlappingRangeIPReservation>(
        &cluster,
        "192.0.2.7",
        json!({ "spec": upstream_reservation }),
    )
    .await;

    let net = netconf(&cluster, json!({ "range": "192.0.2.0/24" }));
    assert_eq!(add(&pod, &net).await, ["192.0.2.7/24"]);
    assert_eq!(
        stored_allocations(&cluster, pool).await,
        BTreeMap::from([("7".to_string(), pod.stored_entry(NETWORK))])
    );
    assert_eq!(
        stored_reservations(&cluster).await,
        BTreeMap::from([("192.0.2.7".to_string(), pod.stored_reservation())])
    );
    del(&pod, &net).await;
    assert_eq!(stored_keys(&cluster, pool).await, Vec::<String>::new());
    assert_eq!(stored_reservation_names(&cluster).await, Vec::<String>::new());
    cluster.cleanup().await;
}

/// The CRD declares `node` and `network` nullable, so the API server keeps an explicit `null` that
/// another writer (kubectl, a Go client without `omitempty`) stores. Such an entry must still be
/// released.
#[tokio::test(flavor = "multi_thread")]
async fn an_entry_stored_with_null_optional_fields_is_released() {
    let cluster = TestCluster::start().await;
    let pool = "192.0.2.0-24";
    let pod = Pod::new("nulled");
    let entry = json!({
        "id": pod.container, "podref": pod.pod_ref(), "ifname": "net1", "node": null, "network": null,
    });
    let stored = create_raw::<IPPool>(
        &cluster,
        pool,
        json!({ "spec": { "range": "192.0.2.0/24", "allocations": { "1": entry } } }),
    )
    .await;
    assert_eq!(stored["spec"]["allocations"]["1"], entry, "nullable fields keep their null");
    let net = netconf(&cluster, json!({ "range": "192.0.2.0/24", "enable_overlapping_ranges": false }));
    del(&pod, &net).await;
    assert_eq!(stored_keys(&cluster, pool).await, Vec::<String>::new());
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_multi_range_add_is_all_or_nothing() {
    let cluster = TestCluster::start().await;
    let net = netconf(
        &cluster,
        json!({ "ipRanges": [{ "range": "192.0.2.0/24" }, { "range": "2001:db8:2::/126" }] }),
    );
    let (v4, v6) = ("192.0.2.0-24", "2001-db8-2---126");
    let (a, b, c) = (Pod::new("dual-a"), Pod::new("dual-b"), Pod::new("dual-c"));
    assert_eq!(add(&a, &net).await, ["192.0.2.1/24", "2001:db8:2::1/126"]);
    assert_eq!(add(&b, &net).await, ["192.0.2.2/24", "2001:db8:2::2/126"]);

    // The IPv6 range is full: the IPv4 address taken for c is given back.
    let (code, msg) = cni("ADD", &c, &net).await.failure("ADD with the second range full");
    assert_eq!(code, INTERNAL, "{msg}");
    assert_eq!(
        msg,
        "pool 2001-db8-2---126: no free address in range 2001:db8:2::1 - 2001:db8:2::2 in 2001:db8:2::/126 excluding []"
    );
    assert_eq!(stored_keys(&cluster, v4).await, ["1", "2"]);
    assert_eq!(stored_keys(&cluster, v6).await, ["1", "2"]);
    assert_eq!(
        stored_reservation_names(&cluster).await,
        ["192.0.2.1", "192.0.2.2", "2001-db8-2--1", "2001-db8-2--2"]
    );

    del(&b, &net).await;
    assert_eq!(stored_keys(&cluster, v4).await, ["1"]);
    assert_eq!(stored_keys(&cluster, v6).await, ["1"]);
    assert_eq!(add(&c, &net).await, ["192.0.2.2/24", "2001:db8:2::2/126"]);
    assert_eq!(stored_reservation_names(&cluster).await.len(), 4);
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn overlapping_ranges_of_one_network_never_share_an_address() {
    let cluster = TestCluster::start().await;
    let kubeconfig = cluster.kubeconfig_path();
    let whole =
        netconf_at(kubeconfig, "ovl-whole", json!({ "range": "198.51.100.0/24", "network_name": "ovl" }));
    let half =
        netconf_at(kubeconfig, "ovl-half", json!({ "range": "198.51.100.0/25", "network_name": "ovl" }));
    let (whole_pool, half_pool) = ("ovl-198.51.100.0-24", "ovl-198.51.100.0-25");
    let pods: Vec<Pod> = ["ovl-a", "ovl-b", "ovl-c", "ovl-d", "ovl-e"].map(Pod::new).into();

    assert_eq!(add(&pods[0], &whole).await, ["198.51.100.1/24"]);
    assert_eq!(add(&pods[1], &half).await, ["198.51.100.2/25"], ".1 is reserved by the /24");
    assert_eq!(stored_keys(&cluster, half_pool).await, ["2"], "no entry left behind for .1");
    assert_eq!(add(&pods[2], &whole).await, ["198.51.100.3/24"], ".2 is reserved by the /25");
    assert_eq!(stored_keys(&cluster, whole_pool).await, ["1", "3"]);
    assert_eq!(add(&pods[3], &half).await, ["198.51.100.4/25"]);
    assert_eq!(stored_keys(&cluster, half_pool).await, ["2", "4"]);

    // Freed in the /24, .1 goes to the next pod of the /25.
    del(&pods[0], &whole).await;
    assert_eq!(add(&pods[4], &half).await, ["198.51.100.1/25"]);
    assert_eq!(stored_keys(&cluster, whole_pool).await, ["3"]);
    assert_eq!(stored_keys(&cluster, half_pool).await, ["1", "2", "4"]);
    let reservations = stored_reservations(&cluster).await;
    let holders: BTreeMap<&str, &str> = reservations
        .iter()
        .map(|(name, spec)| (name.as_str(), spec["podref"].as_str().unwrap_or_default()))
        .collect();
    assert_eq!(
        holders,
        BTreeMap::from([
            ("ovl-198.51.100.1", "apps/ovl-e"),
            ("ovl-198.51.100.2", "apps/ovl-b"),
            ("ovl-198.51.100.3", "apps/ovl-c"),
            ("ovl-198.51.100.4", "apps/ovl-d"),
        ])
    );
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn add_without_a_pod_name_is_refused() {
    let cluster = TestCluster::start().await;
    let net = netconf(&cluster, json!({ "range": "192.0.2.0/24" }));
    let pod = Pod::new("nameless");
    let outcome =
        run_plugin("ADD", &pod, &format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={POD_NAMESPACE}"), &net).await;
    let (code, msg) = outcome.failure("ADD without K8S_POD_NAME");
    assert_eq!(code, INVALID_ENV);
    assert_eq!(
        msg,
        "CNI_ARGS has no K8S_POD_NAMESPACE and K8S_POD_NAME: the kubernetes datastore allocates for pods only"
    );
    assert_eq!(store(&cluster).list_pools().await, Ok(vec![]), "nothing written");
    cluster.cleanup().await;
}

/// Needs no cluster: nothing listens on 127.0.0.1:1.
#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_api_server_is_try_again_later() {
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n\
         clusters: [{name: c, cluster: {server: 'https://127.0.0.1:1'}}]\n\
         users: [{name: u, user: {token: t}}]\n\
         contexts: [{name: c, context: {cluster: c, user: u, namespace: wb-away}}]\n",
    )
    .expect("write kubeconfig");
    let net = netconf_at(&kubeconfig, NETWORK, json!({ "range": "192.0.2.0/24" }));
    let started = Instant::now();
    let (code, msg) = cni("ADD", &Pod::new("away"), &net).await.failure("ADD with the API server away");
    let elapsed = started.elapsed();
    assert_eq!(code, TRY_AGAIN, "{msg}");
    assert!(msg.starts_with("pool 192.0.2.0-24: store unavailable: IPPool wb-away/192.0.2.0-24: "), "{msg}");
    // The plugin retries an unavailable store until its call's budget (the tests' 20 s) is spent.
    let budget = Duration::from_secs(whereabouts_kube_testing::plugin::PLUGIN_BUDGET_SECONDS);
    assert!(elapsed >= budget / 2 && elapsed < budget * 2, "answered after {elapsed:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_burst_of_adds_on_one_pool_gets_distinct_compact_addresses() {
    let cluster = TestCluster::start().await;
    let net = netconf(&cluster, json!({ "range": "192.0.2.0/24" }));
    let pods: Vec<Pod> = (0..16).map(|i| Pod::new(&format!("burst-{i}"))).collect();
    let mut running = JoinSet::new();
    for pod in pods {
        spawn_add(&mut running, pod, &net);
    }
    let mut answered = BTreeMap::new();
    while let Some(joined) = running.join_next().await {
        let (outcome, pod) = joined.expect("join");
        let address = outcome.addresses(&format!("ADD {}", pod.name));
        assert_eq!(address.len(), 1);
        let key = address[0]
            .strip_prefix("192.0.2.")
            .and_then(|rest| rest.strip_suffix("/24"))
            .unwrap_or_else(|| panic!("{address:?}"))
            .to_string();
        assert!(answered.insert(key, pod.stored_entry(NETWORK)).is_none(), "{address:?} handed out twice");
    }
    assert_eq!(stored_allocations(&cluster, "192.0.2.0-24").await, answered);
    let highest = answered.keys().filter_map(|k| k.parse::<u32>().ok()).max().unwrap_or_default();
    assert!(highest <= 16 + 64, "spread past the lowest 64 free addresses: .{highest}");
    let reserved: BTreeSet<String> = stored_reservation_names(&cluster).await.into_iter().collect();
    let expected: BTreeSet<String> = answered.keys().map(|k| format!("192.0.2.{k}")).collect();
    assert_eq!(reserved, expected);
    cluster.cleanup().await;
}

/// A cluster for a test that needs the fake API server itself (its counters, failures on demand); on a
/// real cluster the test is skipped, saying `why`.
async fn fake_cluster(why: &str) -> Option<TestCluster> {
    let cluster = TestCluster::start().await;
    if cluster.is_real() {
        eprintln!("kube_store: skipped: {why}");
        cluster.cleanup().await;
        return None;
    }
    Some(cluster)
}

/// An ADD on an empty pool is two writes of whereabouts objects (the pool, created with its entry,
/// then the reservation; no separate create of an empty pool), and one on an existing pool one patch
/// and one reservation: no Lease turn while no other node contends for the pool.
#[tokio::test(flavor = "multi_thread")]
async fn an_add_on_a_quiet_pool_is_two_object_writes() {
    let Some(cluster) = fake_cluster("counts requests of the fake API server").await else { return };
    let fake = cluster.fake().expect("the fake API server");
    let net = netconf(&cluster, json!({ "range": "192.0.2.0/24" }));
    let before = fake.stats();
    assert_eq!(add(&Pod::new("quiet-a"), &net).await, ["192.0.2.1/24"]);
    let after = fake.stats();
    assert_eq!(after.writes - before.writes, 2, "{before:?} → {after:?}");
    assert_eq!(after.conflicts - before.conflicts, 0, "{before:?} → {after:?}");
    assert_eq!(add(&Pod::new("quiet-b"), &net).await, ["192.0.2.2/24"]);
    let last = fake.stats();
    assert_eq!(last.writes - after.writes, 2, "{after:?} → {last:?}");
    let leases: Api<Lease> = Api::namespaced(cluster.client(), cluster.namespace());
    assert_eq!(leases.get_opt("whereabouts-pool-192.0.2.0-24").await.expect("get"), None);
    cluster.cleanup().await;
}

/// ADDs racing an API server outage (every request answered 503) of 9 s, shorter than the call's
/// budget: the outage is ridden through, no ADD fails, and every ADD holds exactly the addresses it
/// answered, in the pools and their reservations.
#[tokio::test(flavor = "multi_thread")]
async fn adds_during_an_outage_never_answer_an_unstored_address() {
    let Some(cluster) = fake_cluster("needs the fake API server to fail on demand").await else { return };
    let fake = cluster.fake().expect("the fake API server");
    let net =
        netconf(&cluster, json!({ "range": "192.0.2.0/24", "ipRanges": [{ "range": "2001:db8:3::/64" }] }));
    let mut running = JoinSet::new();
    for i in 0..8 {
        spawn_add(&mut running, Pod::new(&format!("outage-early-{i}")), &net);
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    fake.set_unavailable(true);
    for i in 0..4 {
        spawn_add(&mut running, Pod::new(&format!("outage-late-{i}")), &net);
    }
    tokio::time::sleep(Duration::from_secs(9)).await;
    fake.set_unavailable(false);

    let mut held: BTreeMap<String, Pod> = BTreeMap::new();
    while let Some(joined) = running.join_next().await {
        let (outcome, pod) = joined.expect("join");
        match outcome {
            Outcome::Success(result) => {
                let addresses = addresses_of(&result);
                assert_eq!(addresses.len(), 2, "{addresses:?}");
                for address in addresses {
                    assert!(held.insert(address.clone(), pod.clone()).is_none(), "{address} answered twice");
                }
            }
            Outcome::Failed { code, msg } => {
                panic!("{}: failed with {code} during an outage shorter than its budget: {msg}", pod.name)
            }
        }
    }
    assert_eq!(held.len(), 2 * 12, "every ADD succeeded with two addresses");

    let store = store(&cluster);
    let mut stored = BTreeMap::new();
    for (pool, network) in [("192.0.2.0-24", "192.0.2.0/24"), ("2001-db8-3---64", "2001:db8:3::/64")] {
        let Some(read) = store.read_pool(pool).await.expect("read") else { continue };
        let (decoded, skipped) = Pool::from_spec(&read.spec, network.parse().expect("cidr")).expect("decode");
        assert!(skipped.is_empty());
        let prefix = network.split('/').nth(1).unwrap_or_default();
        for (ip, allocation) in decoded.iter() {
            stored.insert(format!("{ip}/{prefix}"), allocation.container_id.clone());
        }
    }
    let answered: BTreeMap<String, String> =
        held.iter().map(|(address, pod)| (address.clone(), pod.container.clone())).collect();
    assert_eq!(stored, answered, "the pools hold exactly what ADD answered");
    let reserved: BTreeSet<String> = stored_reservation_names(&cluster).await.into_iter().collect();
    let expected: BTreeSet<String> =
        held.keys().map(|address| address.split('/').next().unwrap_or_default().replace(':', "-")).collect();
    assert_eq!(reserved, expected, "the reservations are exactly those of the answered addresses");

    // Back in service.
    assert_eq!(add(&Pod::new("outage-after"), &net).await.len(), 2);
    cluster.cleanup().await;
}

// ---------------------------------------------------------------------------------------------
// 5. The namespace

#[tokio::test(flavor = "multi_thread")]
async fn objects_land_in_the_kubeconfig_context_namespace() {
    let cluster = TestCluster::start().await;
    let connected = KubeStore::connect(cluster.kubeconfig_path()).await.expect("connect");
    assert_eq!(connected.namespace(), cluster.namespace());

    // A network name of its own, so that objects of a real whereabouts in kube-system cannot match.
    let network_name = format!("nsprobe-{:08x}", fastrand::u32(..));
    let net = netconf(&cluster, json!({ "range": "192.0.2.0/24", "network_name": network_name }));
    let pod = Pod::new("where");
    assert_eq!(add(&pod, &net).await, ["192.0.2.1/24"]);
    let pool = format!("{network_name}-192.0.2.0-24");
    let reservation = format!("{network_name}-192.0.2.1");
    assert!(raw_spec::<IPPool>(&cluster, &pool).await.is_some(), "pool in the test namespace");
    assert_eq!(
        raw_spec::<OverlappingRangeIPReservation>(&cluster, &reservation).await,
        Some(pod.stored_reservation())
    );
    // Not upstream's cluster-wide Lease `whereabouts` (nor, on a quiet pool, the pool's own).
    let leases: Api<Lease> = Api::namespaced(cluster.client(), cluster.namespace());
    let names: Vec<String> = leases
        .list(&ListParams::default())
        .await
        .expect("list leases")
        .items
        .iter()
        .map(|l| l.name_any())
        .collect();
    assert_eq!(names, Vec::<String>::new());
    for elsewhere in ["kube-system", POD_NAMESPACE] {
        assert_eq!(raw_spec_in::<IPPool>(&cluster, elsewhere, &pool).await, None, "pool in {elsewhere}");
        assert_eq!(
            raw_spec_in::<OverlappingRangeIPReservation>(&cluster, elsewhere, &reservation).await,
            None,
            "reservation in {elsewhere}"
        );
    }
    cluster.cleanup().await;
}

/// An API server that answers 503 (restarting, overloaded) is "try again later" naming the pool
/// once the call's budget is spent (the tests' 20 s), as an unreachable one is.
#[tokio::test(flavor = "multi_thread")]
async fn a_failing_api_server_is_try_again_later_within_the_retry_window() {
    let Some(cluster) = fake_cluster("needs the fake API server to fail on demand").await else { return };
    let net = netconf(&cluster, json!({ "range": "192.0.2.0/24" }));
    cluster.fake().expect("the fake API server").set_unavailable(true);
    let started = Instant::now();
    let outcome = cni("ADD", &Pod::new("refused"), &net).await;
    let elapsed = started.elapsed();
    cluster.fake().expect("the fake API server").set_unavailable(false);
    let (code, msg) = outcome.failure("ADD while the API server answers 503");
    assert_eq!(code, TRY_AGAIN, "{msg}");
    let prefix =
        format!("pool 192.0.2.0-24: store unavailable: IPPool {}/192.0.2.0-24: ", cluster.namespace());
    assert!(msg.starts_with(&prefix), "{msg}");
    let budget = Duration::from_secs(whereabouts_kube_testing::plugin::PLUGIN_BUDGET_SECONDS);
    assert!(elapsed >= budget / 2 && elapsed < budget * 2, "answered after {elapsed:?}");
    assert_eq!(store(&cluster).list_pools().await, Ok(vec![]));
    cluster.cleanup().await;
}

/// A pool's Lease left held by a plugin that died is passed over once it was seen unchanged for its
/// duration (2 s): a turn waits that long, then takes it (saying it waited for another writer), and
/// gives it back. An ADD on a pool no other node contends for does not look at the Lease at all.
#[tokio::test(flavor = "multi_thread")]
async fn a_pool_lease_left_by_a_dead_writer_is_taken_over() {
    let cluster = TestCluster::start().await;
    let net = netconf(&cluster, json!({ "range": "192.0.2.0/24" }));
    let leases: Api<Lease> = Api::namespaced(cluster.client(), cluster.namespace());
    let pool = "192.0.2.0-24";
    let name = format!("whereabouts-pool-{pool}");
    let stale = Lease {
        metadata: ObjectMeta { name: Some(name.clone()), ..ObjectMeta::default() },
        spec: Some(LeaseSpec {
            holder_identity: Some("gone-node/1-dead".to_owned()),
            lease_duration_seconds: Some(2),
            ..LeaseSpec::default()
        }),
    };
    leases.create(&PostParams::default(), &stale).await.expect("create the Lease of a dead writer");
    let started = Instant::now();
    assert_eq!(add(&Pod::new("quiet-pool"), &net).await, ["192.0.2.1/24"]);
    assert!(started.elapsed() < Duration::from_secs(2), "a quiet pool's ADD waited for its Lease");

    let store = store(&cluster);
    let started = Instant::now();
    assert!(store.take_turn(pool, started + Duration::from_secs(20)).await, "waited for another writer");
    let waited = started.elapsed();
    assert!(waited >= Duration::from_secs(2), "took a live-looking Lease after {waited:?}");
    let holder = |lease: Lease| lease.spec.and_then(|spec| spec.holder_identity);
    assert_ne!(holder(leases.get(&name).await.expect("the pool's Lease")), Some("gone-node/1-dead".into()));
    store.end_turn(pool).await;
    assert_eq!(holder(leases.get(&name).await.expect("the pool's Lease")), None, "the Lease was given back");
    cluster.cleanup().await;
}

// ---------------------------------------------------------------------------------------------
// Release cooldown

/// The release cooldowns an IPPool's annotation holds: offset → Unix seconds.
async fn stored_cooldowns(cluster: &TestCluster, pool: &str) -> BTreeMap<String, u64> {
    let object = pools_api(cluster).get(pool).await.expect("pool");
    object
        .annotations()
        .get(COOLDOWNS_ANNOTATION)
        .map(|value| serde_json::from_str(value).expect("the annotation is a JSON object"))
        .unwrap_or_default()
}

/// `release_cooldown` on the Kubernetes store: the DEL's patch records the release time in the IPPool's
/// annotation (not in `spec.allocations`, which upstream reads), the next ADD of another pod passes the
/// address over while others are free, and takes it when it is the only free one.
#[tokio::test(flavor = "multi_thread")]
async fn a_released_address_cools_down_in_the_ippool_annotation() {
    let cluster = TestCluster::start().await;
    let net = netconf(&cluster, json!({ "range": "198.51.100.0/29", "release_cooldown": "10m" }));
    let pool = "198.51.100.0-29";
    let first = Pod::new("cool-a");
    assert_eq!(add(&first, &net).await, ["198.51.100.1/29"]);
    del(&first, &net).await;
    assert_eq!(stored_allocations(&cluster, pool).await, BTreeMap::new(), "no entry stands for the cooldown");
    let cooling = stored_cooldowns(&cluster, pool).await;
    assert_eq!(cooling.keys().collect::<Vec<_>>(), ["1"]);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs();
    assert!((now + 590..=now + 601).contains(&cooling["1"]), "{cooling:?} at {now}");
    // Upstream reads the pool as it always did: a range and its allocations.
    let read = store(&cluster).read_pool(pool).await.expect("read").expect("pool");
    let (decoded, skipped) =
        Pool::from_spec(&read.spec, "198.51.100.0/29".parse().expect("cidr")).expect("pool");
    assert!(skipped.is_empty() && decoded.is_empty());

    assert_eq!(add(&Pod::new("cool-b"), &net).await, ["198.51.100.2/29"], "the released .1 cools down");
    for n in 3..=6 {
        assert_eq!(add(&Pod::new(&format!("cool-{n}")), &net).await, [format!("198.51.100.{n}/29")]);
    }
    assert_eq!(add(&Pod::new("cool-last"), &net).await, ["198.51.100.1/29"], "the only free address");
    assert_eq!(stored_cooldowns(&cluster, pool).await, BTreeMap::new(), "handed out, it no longer cools");
    cluster.cleanup().await;
}

/// The annotation changes in the same patch as the allocations, under a test of its value as read: a
/// stale write of other cooldowns conflicts, and annotations others set on the IPPool are kept.
#[tokio::test(flavor = "multi_thread")]
async fn cooldowns_are_written_with_a_compare_and_swap_beside_other_annotations() {
    let cluster = TestCluster::start().await;
    let store = store(&cluster);
    let name = "198.51.100.0-28";
    let mut created = spec("198.51.100.0/28", &[("1", "a"), ("2", "b")]);
    created.cooldowns.insert("5".into(), 4_000_000_000);
    store.write_pool(name, &created, None, None).await.expect("create with a cooldown");
    assert_eq!(stored_cooldowns(&cluster, name).await, created.cooldowns);
    // Someone else's annotation beside ours.
    let mut object = pools_api(&cluster).get(name).await.expect("pool");
    object.annotations_mut().insert("example.org/owner".into(), "team-a".into());
    pools_api(&cluster).replace(name, &PostParams::default(), &object).await.expect("annotate");

    let stale = store.read_pool(name).await.expect("read").expect("pool");
    let mut release_a = stale.spec.clone();
    release_a.allocations.remove("1");
    release_a.cooldowns.insert("1".into(), 4_000_000_001);
    store.write_pool(name, &release_a, Some(&stale), None).await.expect("release .1 with its cooldown");
    // Releasing .2 from the same stale reading touches other allocation keys, but the cooldowns changed.
    let mut release_b = stale.spec.clone();
    release_b.allocations.remove("2");
    release_b.cooldowns.insert("2".into(), 4_000_000_002);
    assert_eq!(store.write_pool(name, &release_b, Some(&stale), None).await, Err(StoreError::Conflict));
    let fresh = store.read_pool(name).await.expect("read").expect("pool");
    let mut release_b = fresh.spec.clone();
    release_b.allocations.remove("2");
    release_b.cooldowns.insert("2".into(), 4_000_000_002);
    store.write_pool(name, &release_b, Some(&fresh), None).await.expect("release .2 from a fresh reading");
    assert_eq!(stored_cooldowns(&cluster, name).await.keys().collect::<Vec<_>>(), ["1", "2", "5"]);
    assert_eq!(
        pools_api(&cluster).get(name).await.expect("pool").annotations()["example.org/owner"],
        "team-a"
    );
    // Every cooldown gone: the annotation goes, the others stay.
    let read = store.read_pool(name).await.expect("read").expect("pool");
    let cleared = PoolSpec { cooldowns: BTreeMap::new(), ..read.spec.clone() };
    let mut cleared = cleared;
    cleared.allocations.insert("3".into(), entry("c"));
    store.write_pool(name, &cleared, Some(&read), None).await.expect("clear the cooldowns");
    let annotations = pools_api(&cluster).get(name).await.expect("pool").annotations().clone();
    assert!(!annotations.contains_key(COOLDOWNS_ANNOTATION), "{annotations:?}");
    assert_eq!(annotations["example.org/owner"], "team-a");
    cluster.cleanup().await;
}
