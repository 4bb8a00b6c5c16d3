//! A rolling upgrade: some nodes still run upstream whereabouts (which serialises its writers through
//! the cluster-wide Lease), others already run ours (which takes no Lease), all on the same pools at
//! once. Upstream is the upstream-shaped writer of `whereabouts-kube-testing` (its `upstream-whereabouts`
//! plugin binary), ours is this crate's binary; every call is a plugin process.
//!
//! * Ten nodes, the even ones not upgraded yet, every pod ADDed at once: every ADD that answered
//!   success holds exactly its address (in its pool, with its container and interface), no address is
//!   answered or held twice, every reservation matches an allocation of the same pod, and upstream's
//!   decoder and ours read the same allocations from every pool. Then every pod is DELeted at once, a
//!   pod ADDed by one implementation DELeted by the other for half of them (the node was upgraded in
//!   between), and no allocation and no reservation is left.
//! * The same on two overlapping ranges of one network (a /24 and the /25 inside it), so that the
//!   cluster-wide reservations are raced too.
//! * Sequentially, a pool written by one implementation is extended by the other, each finds the
//!   other's allocation of a pod again (upstream's idempotency is by pod and interface), and each
//!   releases the other's allocations.
//!
//! Runs against the in-process fake API server, or against the cluster `WHEREABOUTS_TEST_KUBECONFIG`
//! names (each test in a fresh namespace).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Mutex, MutexGuard};

use ipnet::IpNet;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::process::Command;
use tokio::task::JoinSet;
use whereabouts_core::pool::{Allocation, Pool};
use whereabouts_core::range::{pool_name, reservation_name};
use whereabouts_k8s::crd::{IPPool, OverlappingRangeIPReservation};
use whereabouts_k8s::kube::Api;
use whereabouts_k8s::kube::api::ListParams;
use whereabouts_kube_testing::{TestCluster, binaries, upstream};

const NODES: usize = 10;
const IFNAME: &str = "net1";

/// The two bursts take turns: each already runs over a hundred processes at once.
fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime")
}

/// Which plugin a node runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Plugin {
    Ours,
    Upstream,
}

impl Plugin {
    /// The even nodes are not upgraded yet.
    fn of_node(node: usize) -> Plugin {
        if node.is_multiple_of(2) { Plugin::Upstream } else { Plugin::Ours }
    }

    fn other(self) -> Plugin {
        match self {
            Plugin::Ours => Plugin::Upstream,
            Plugin::Upstream => Plugin::Ours,
        }
    }
}

/// One whereabouts network: its `network_name` and its ranges (one pool each).
struct Network {
    name: &'static str,
    ranges: &'static [&'static str],
}

impl Network {
    fn range(&self, index: usize) -> IpNet {
        self.ranges[index].parse().expect("a CIDR")
    }
}

/// One attachment: a pod's container on a node, allocating from one range of the network.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Pod {
    name: String,
    container: String,
    node: usize,
    range: usize,
}

impl Pod {
    fn new(name: &str, container: &str, node: usize, range: usize) -> Pod {
        Pod { name: name.to_string(), container: container.to_string(), node, range }
    }
}

/// What a pool holds for a pod (or what an answer says it holds).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Held {
    range: usize,
    ip: IpAddr,
    container: String,
}

/// The plugins of a test cluster, on one network.
struct Harness {
    cluster: TestCluster,
    network: Network,
    upstream: PathBuf,
}

impl Harness {
    async fn start(network: Network) -> Harness {
        Harness { cluster: TestCluster::start().await, network, upstream: binaries::upstream_whereabouts() }
    }

    fn namespace(&self) -> &str {
        self.cluster.namespace()
    }

    fn pod_ref(&self, pod: &Pod) -> String {
        format!("{}/{}", self.namespace(), pod.name)
    }

    /// The network configuration both plugins read (each ignores the other's keys).
    fn netconf(&self, range: usize) -> String {
        json!({
            "cniVersion": "1.0.0",
            "name": format!("cni-{}", self.network.name),
            "type": "macvlan",
            "ipam": {
                "type": "whereabouts",
                "datastore": "kubernetes",
                "kubernetes": {"kubeconfig": self.cluster.kubeconfig_path()},
                "range": self.network.ranges[range],
                "network_name": self.network.name,
                "log_level": "error",
                // Upstream's knob (ours ignores it): the upstream calls queueing for the Lease retry
                // every 100-220 ms rather than 500-1100 ms, so the burst spends less time with the
                // Lease free and every candidate asleep.
                "leader_retry_period": 100,
            }
        })
        .to_string()
    }

    /// The process of one CNI call, ready to spawn.
    fn command(&self, plugin: Plugin, verb: &str, pod: &Pod) -> Command {
        let binary: &Path = match plugin {
            Plugin::Ours => Path::new(env!("CARGO_BIN_EXE_whereabouts")),
            Plugin::Upstream => &self.upstream,
        };
        let mut command = Command::new(binary);
        command
            .env_clear()
            .env("CNI_COMMAND", verb)
            .env("CNI_CONTAINERID", &pod.container)
            .env("CNI_NETNS", "/var/run/netns/x")
            .env("CNI_IFNAME", IFNAME)
            .env("CNI_PATH", "/opt/cni/bin")
            .env(
                "CNI_ARGS",
                format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={}", self.namespace(), pod.name),
            )
            .env("NODENAME", format!("node-{}", pod.node))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        command
    }

    /// Runs every call at once; each with its answer (stdout on success, everything on failure), in
    /// the order given.
    async fn run(
        &self,
        calls: Vec<(Plugin, &'static str, Pod)>,
    ) -> Vec<(Plugin, Pod, Result<String, String>)> {
        let mut running = JoinSet::new();
        for (index, (plugin, verb, pod)) in calls.into_iter().enumerate() {
            let (mut command, netconf) = (self.command(plugin, verb, &pod), self.netconf(pod.range));
            running.spawn(async move {
                let mut child = command.spawn().expect("spawn a plugin");
                let mut stdin = child.stdin.take().expect("stdin");
                stdin.write_all(netconf.as_bytes()).await.expect("write the configuration");
                drop(stdin);
                let output = child.wait_with_output().await.expect("wait for a plugin");
                let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
                let answer = if output.status.success() {
                    Ok(stdout)
                } else {
                    let stderr = String::from_utf8_lossy(&output.stderr);
                    Err(format!("{verb} by {plugin:?} of {}: {}: {stdout} {stderr}", pod.name, output.status))
                };
                (index, plugin, pod, answer)
            });
        }
        let mut answers: Vec<_> = running.join_all().await;
        answers.sort_by_key(|(index, ..)| *index);
        answers.into_iter().map(|(_, plugin, pod, answer)| (plugin, pod, answer)).collect()
    }

    /// One call; its stdout, the call failing the test when it fails.
    async fn call(&self, plugin: Plugin, verb: &'static str, pod: &Pod) -> String {
        let (_, _, answer) = self.run(vec![(plugin, verb, pod.clone())]).await.remove(0);
        answer.unwrap_or_else(|failure| panic!("{failure}"))
    }

    /// One ADD; the address answered.
    async fn add(&self, plugin: Plugin, pod: &Pod) -> IpAddr {
        answered_address(&self.call(plugin, "ADD", pod).await)
    }

    async fn pool(&self, range: usize) -> Option<IPPool> {
        let name = pool_name(self.network.name, None, &self.network.range(range));
        Api::<IPPool>::default_namespaced(self.cluster.client()).get_opt(&name).await.expect("GET the pool")
    }

    /// The allocations of every pool by pod reference, after checking that upstream's decoder and ours
    /// read every pool alike, that every key is the unsigned decimal offset of its address from the
    /// range's IP, and that no address is held twice across the pools.
    async fn allocations(&self) -> BTreeMap<String, Held> {
        let mut held = BTreeMap::new();
        let mut addresses = BTreeSet::new();
        for range in 0..self.network.ranges.len() {
            let Some(pool) = self.pool(range).await else { continue };
            let spec = pool.spec.pool;
            let (ours, skipped) = Pool::from_spec(&spec, self.network.range(range)).expect("our decoder");
            assert!(skipped.is_empty(), "keys we cannot read: {skipped:?}");
            assert_eq!(ours.to_spec(), spec, "keys that are not canonical offsets");
            let ours: BTreeSet<_> = ours
                .iter()
                .map(|(ip, a)| (ip, a.container_id.clone(), a.pod_ref.clone(), a.ifname.clone()))
                .collect();
            let theirs: BTreeSet<_> = upstream::decode_pool(&spec)
                .expect("upstream's decoder")
                .into_iter()
                .map(|r| (r.ip, r.container_id, r.pod_ref, r.ifname))
                .collect();
            assert_eq!(ours, theirs, "the decoders disagree on pool {range}");
            for (ip, container, pod_ref, ifname) in ours {
                assert_eq!(ifname, IFNAME);
                assert!(addresses.insert(ip), "{ip} is held twice");
                let previous = held.insert(pod_ref.clone(), Held { range, ip, container });
                assert_eq!(previous, None, "{pod_ref} holds two addresses");
            }
        }
        held
    }

    /// The reservations by name, with their pod.
    async fn reservations(&self) -> BTreeMap<String, String> {
        let api = Api::<OverlappingRangeIPReservation>::default_namespaced(self.cluster.client());
        let list = api.list(&ListParams::default()).await.expect("LIST reservations");
        list.items.into_iter().map(|r| (r.metadata.name.expect("a name"), r.spec.holder.pod_ref)).collect()
    }

    /// Checks the stored state against what the calls answered (see [`Harness::allocations`]); every
    /// reservation belongs to the allocation of its address, and with `every_reserved` every
    /// allocation has one.
    async fn check(&self, answered: &BTreeMap<String, Held>, every_reserved: bool) {
        let held = self.allocations().await;
        assert_eq!(&held, answered, "the pools do not hold what the ADDs answered");
        let reservations = self.reservations().await;
        let expected: BTreeMap<String, String> = held
            .iter()
            .map(|(pod_ref, h)| (reservation_name(self.network.name, h.ip), pod_ref.clone()))
            .collect();
        for (name, pod_ref) in &reservations {
            assert_eq!(
                expected.get(name),
                Some(pod_ref),
                "reservation {name} of {pod_ref} matches no allocation"
            );
        }
        if every_reserved {
            assert_eq!(reservations, expected);
        }
    }
}

/// The address of a CNI 1.0.0 result with one IP.
fn answered_address(stdout: &str) -> IpAddr {
    let result: Value = serde_json::from_str(stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    let ips = result["ips"].as_array().expect("ips");
    assert_eq!(ips.len(), 1, "{stdout}");
    let address: IpNet = ips[0]["address"].as_str().expect("an address").parse().expect("a CIDR");
    address.addr()
}

/// Every node ADDs all its pods at once, half of the nodes upstream; then every pod is DELeted at
/// once, half of them by the other implementation.
async fn rolling_upgrade(network: Network, pods_per_node: usize) {
    let harness = Harness::start(network).await;
    let ranges = harness.network.ranges.len();
    let pods: Vec<Pod> = (0..NODES)
        .flat_map(|node| {
            (0..pods_per_node).map(move |i| {
                Pod::new(&format!("pod-{node}-{i}"), &format!("sandbox-{node}-{i}"), node, i % ranges)
            })
        })
        .collect();

    let adds = pods.iter().map(|pod| (Plugin::of_node(pod.node), "ADD", pod.clone())).collect();
    let mut answered = BTreeMap::new();
    let mut answered_addresses = BTreeSet::new();
    let mut failed = Vec::new();
    for (plugin, pod, answer) in harness.run(adds).await {
        match answer {
            Ok(stdout) => {
                let ip = answered_address(&stdout);
                assert!(answered_addresses.insert(ip), "{ip} answered twice");
                let held = Held { range: pod.range, ip, container: pod.container.clone() };
                answered.insert(harness.pod_ref(&pod), held);
            }
            Err(failure) => failed.push((plugin, pod, failure)),
        }
    }
    // The one failure upstream has in a race: its pool write landed, then another range's writer
    // created the reservation of the same address first (upstream then fails the ADD, §3.11).
    for (plugin, _, failure) in &failed {
        let reservation_race =
            *plugin == Plugin::Upstream && ranges > 1 && failure.contains("already exists");
        assert!(reservation_race, "{failure}");
    }
    // As a runtime does after a failed ADD: the node DELs it.
    let cleanups = failed.iter().map(|(plugin, pod, _)| (*plugin, "DEL", pod.clone())).collect();
    for (_, _, answer) in harness.run(cleanups).await {
        answer.unwrap_or_else(|failure| panic!("{failure}"));
    }
    // Upstream's DEL of a failed ADD deletes the reservation by name, though it is another pod's.
    harness.check(&answered, failed.is_empty()).await;

    let dels = pods
        .iter()
        .enumerate()
        .filter(|(_, pod)| answered.contains_key(&harness.pod_ref(pod)))
        .map(|(i, pod)| {
            let plugin = Plugin::of_node(pod.node);
            (if i.is_multiple_of(2) { plugin } else { plugin.other() }, "DEL", pod.clone())
        })
        .collect();
    for (_, _, answer) in harness.run(dels).await {
        answer.unwrap_or_else(|failure| panic!("{failure}"));
    }
    harness.check(&BTreeMap::new(), true).await;
    harness.cluster.cleanup().await;
}

#[test]
fn a_mixed_burst_on_one_pool_never_duplicates() {
    let _serial = serial();
    runtime().block_on(rolling_upgrade(Network { name: "mixed", ranges: &["10.77.0.0/24"] }, 12));
}

#[test]
fn a_mixed_burst_on_overlapping_pools_never_duplicates() {
    let _serial = serial();
    let network = Network { name: "mixed-overlap", ranges: &["10.78.0.0/24", "10.78.0.0/25"] };
    runtime().block_on(rolling_upgrade(network, 10));
}

#[test]
fn each_implementation_extends_and_releases_the_others_allocations() {
    runtime().block_on(async {
        let harness = Harness::start(Network { name: "compat", ranges: &["10.79.0.0/24"] }).await;
        let pod = |name: &str, container: &str, node| Pod::new(name, container, node, 0);
        let (upstream_node, our_node) = (0, 1);
        assert_eq!(Plugin::of_node(upstream_node), Plugin::Upstream);
        assert_eq!(Plugin::of_node(our_node), Plugin::Ours);
        let pods = [
            (Plugin::Upstream, pod("a", "sandbox-a", upstream_node)),
            (Plugin::Ours, pod("b", "sandbox-b", our_node)),
            (Plugin::Upstream, pod("c", "sandbox-c", upstream_node)),
            (Plugin::Ours, pod("d", "sandbox-d", our_node)),
        ];
        for (n, (plugin, pod)) in pods.iter().enumerate() {
            assert_eq!(
                harness.add(*plugin, pod).await,
                format!("10.79.0.{}", n + 1).parse::<IpAddr>().unwrap()
            );
        }
        let held = harness.pool(0).await.expect("the pool").spec.pool;
        assert_eq!(held.allocations.keys().collect::<Vec<_>>(), ["1", "2", "3", "4"]);
        // Upstream writes id, podref and ifname only.
        let a_ref = harness.pod_ref(&pods[0].1);
        let upstream_entry = Allocation {
            container_id: "sandbox-a".into(),
            pod_ref: a_ref.clone(),
            ifname: IFNAME.into(),
            node: None,
            cni_network: None,
            pod_uid: None,
            statefulset: None,
            ipam_claim: None,
        };
        assert_eq!(held.allocations["1"], upstream_entry);
        // Ours records the node and the CNI network besides (fields upstream does not know).
        let ours = &held.allocations["4"];
        assert_eq!(ours.pod_ref, harness.pod_ref(&pods[3].1));
        assert_eq!((ours.node.as_deref(), ours.cni_network.as_deref()), (Some("node-1"), Some("cni-compat")));

        // Upstream finds our allocation of d again under a new sandbox, and rewrites only its id.
        let d_again = pod("d", "sandbox-d2", upstream_node);
        assert_eq!(harness.add(Plugin::Upstream, &d_again).await, "10.79.0.4".parse::<IpAddr>().unwrap());
        // Ours finds upstream's allocation of a again under a new sandbox.
        let a_again = pod("a", "sandbox-a2", our_node);
        assert_eq!(harness.add(Plugin::Ours, &a_again).await, "10.79.0.1".parse::<IpAddr>().unwrap());
        let after = harness.pool(0).await.expect("the pool").spec.pool;
        assert_eq!(
            after.allocations["4"],
            Allocation { container_id: "sandbox-d2".into(), ..ours.clone() },
            "upstream's patch touched more than the container ID"
        );
        assert_eq!(
            (after.allocations["1"].container_id.as_str(), &after.allocations["1"].pod_ref),
            ("sandbox-a2", &a_ref)
        );
        let expected: BTreeMap<String, Held> =
            [(&a_again, 1), (&pods[1].1, 2), (&pods[2].1, 3), (&d_again, 4)]
                .into_iter()
                .map(|(pod, n)| {
                    let ip = format!("10.79.0.{n}").parse().unwrap();
                    (harness.pod_ref(pod), Held { range: 0, ip, container: pod.container.clone() })
                })
                .collect();
        harness.check(&expected, true).await;

        // Each releases the other's: ours DELs upstream's c, upstream DELs our b.
        assert_eq!(harness.call(Plugin::Ours, "DEL", &pods[2].1).await, "");
        assert_eq!(harness.call(Plugin::Upstream, "DEL", &pods[1].1).await, "");
        let expected: BTreeMap<String, Held> = expected
            .into_iter()
            .filter(|(_, held)| !matches!(held.container.as_str(), "sandbox-b" | "sandbox-c"))
            .collect();
        harness.check(&expected, true).await;
        // And each allocates the lowest address the other freed.
        assert_eq!(
            harness.add(Plugin::Upstream, &pod("e", "sandbox-e", upstream_node)).await,
            "10.79.0.2".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            harness.add(Plugin::Ours, &pod("f", "sandbox-f", our_node)).await,
            "10.79.0.3".parse::<IpAddr>().unwrap()
        );
        harness.cluster.cleanup().await;
    });
}

/// Our reservation records the container that made it; upstream's plugin takes the pod's entry over for
/// a new sandbox by rewriting only the entry's `id` and leaves the reservation as it is. Once the node is
/// upgraded, our DEL of that sandbox removes the entry and the reservation it stood behind.
#[test]
fn our_del_releases_the_reservation_of_an_entry_upstream_took_over() {
    runtime().block_on(async {
        let harness = Harness::start(Network { name: "taken-over", ranges: &["10.80.0.0/24"] }).await;
        let (upstream_node, our_node) = (0, 1);
        let first = Pod::new("a", "sandbox-a", our_node, 0);
        let ip = harness.add(Plugin::Ours, &first).await;
        let again = Pod::new("a", "sandbox-a2", upstream_node, 0);
        assert_eq!(harness.add(Plugin::Upstream, &again).await, ip);
        let api = Api::<OverlappingRangeIPReservation>::default_namespaced(harness.cluster.client());
        let reservation =
            api.get(&reservation_name(harness.network.name, ip)).await.expect("GET the reservation");
        assert_eq!(
            reservation.spec.holder.container_id, "sandbox-a",
            "upstream leaves the reservation alone"
        );

        assert_eq!(harness.call(Plugin::Ours, "DEL", &again).await, "");
        harness.check(&BTreeMap::new(), true).await;
        harness.cluster.cleanup().await;
    });
}
