//! Many plugin processes at once on the Kubernetes store (no Lease: every pool write is a JSON Patch
//! pinning the allocations it changes), then the IPPools and OverlappingRangeIPReservations are checked
//! against what the calls answered: every ADD that answered success holds exactly its address in its
//! pool, with its pod, interface, node and network; no address is in two pools or held by two
//! containers; nothing else is held; every allocation has its reservation, with the same holder, and no
//! reservation is left over. The answers are checked too: between an ADD's answer and the start of its
//! DEL the address is its holder's, so two such intervals of one address must never overlap.
//!
//! Runs against the in-process fake API server, or against the cluster `WHEREABOUTS_TEST_KUBECONFIG`
//! names (each test in a fresh namespace). The tests take turns: each one already runs up to 200
//! processes at once.
//!
//! * A burst on one pool: 10 nodes x 20 pods ADD at once, then half of them DEL while 100 new pods
//!   ADD, then everything is deleted at once. The pool is a /23: the second step may hold 300
//!   addresses at its peak (every new ADD landing before any DEL), more than a /24 has.
//! * Overlapping pools: half the pods on a /24, half on the /25 inside it (one `network_name`, so the
//!   reservations are raced too), ADD at once, then mixed DEL and ADD, then DEL of everything.
//! * Chaos: 30 workers (3 per node) ADD and DEL in rounds on the overlapping pools, a third of the
//!   calls SIGKILLed at a random point of their life, and (on the fake) the API server answering 503 to
//!   everything for 300 ms half way through. A killed ADD is followed by a DEL (as a runtime does after
//!   a failed ADD), a killed DEL by another DEL (as the kubelet retries), so the ledger of expected
//!   state stays exact.
//! * The checks themselves: each kind of damage they look for, made by hand, is caught.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Barrier, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use serde_json::{Value, json};
use whereabouts_core::pool::{Allocation, Pool, PoolSpec};
use whereabouts_core::range::{pool_name, reservation_name};
use whereabouts_k8s::crd::{IPPool, OverlappingRangeIPReservation};
use whereabouts_k8s::k8s_openapi::api::coordination::v1::Lease;
use whereabouts_k8s::kube::api::{DeleteParams, ListParams, PostParams};
use whereabouts_k8s::kube::{Api, ResourceExt};
use whereabouts_kube_testing::TestCluster;

const NODES: usize = 10;
const IFNAME: &str = "net1";

/// The tests take turns; a failed one must not stop the others.
fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn runtime() -> tokio::runtime::Runtime {
    // Multi-threaded, so that worker threads can read the store through its handle while the test's
    // thread waits for them.
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime")
}

/// One whereabouts network: its `network_name` and its ranges (one pool each).
struct Network {
    name: &'static str,
    ranges: &'static [&'static str],
}

impl Network {
    fn range(&self, index: usize) -> IpNet {
        self.ranges[index].parse().expect("range")
    }

    fn pool(&self, index: usize) -> String {
        pool_name(self.name, None, &self.range(index))
    }

    /// The CNI network name (the configuration's `name`), recorded in every allocation.
    fn cni_name(&self) -> String {
        format!("cni-{}", self.name)
    }
}

/// One pod attachment: a container of a pod on a node, allocating from one range of the network.
#[derive(Debug, Clone)]
struct Pod {
    container: String,
    name: String,
    node: usize,
    index: usize,
    range: usize,
}

impl Pod {
    fn new(scenario: &str, node: usize, index: usize, range: usize) -> Pod {
        Pod {
            container: format!("{scenario}-{node}-{index}-sandbox"),
            name: format!("{scenario}-pod-{node}-{index}"),
            node,
            index,
            range,
        }
    }

    fn node_name(&self) -> String {
        format!("node-{}", self.node)
    }
}

/// What one plugin run ended as.
#[derive(Debug)]
enum Outcome {
    Success(Value),
    Failed(String),
    Killed,
}

/// One plugin run: how it ended, when it was spawned and when it had exited.
#[derive(Debug)]
struct Call {
    outcome: Outcome,
    started: Instant,
    ended: Instant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Add,
    Del,
}

impl Op {
    fn command(self) -> &'static str {
        match self {
            Op::Add => "ADD",
            Op::Del => "DEL",
        }
    }
}

/// How the plugin reaches the cluster.
struct Plugin<'a> {
    kubeconfig: PathBuf,
    namespace: String,
    network: &'a Network,
}

impl<'a> Plugin<'a> {
    fn new(cluster: &TestCluster, network: &'a Network) -> Self {
        Plugin {
            kubeconfig: cluster.kubeconfig_path().to_path_buf(),
            namespace: cluster.namespace().to_string(),
            network,
        }
    }

    fn config(&self, range: usize) -> String {
        json!({
            "cniVersion": "1.0.0",
            "name": self.network.cni_name(),
            "type": "macvlan",
            "ipam": {
                "type": "whereabouts",
                "datastore": "kubernetes",
                "kubernetes": { "kubeconfig": self.kubeconfig },
                "range": self.network.ranges[range],
                "network_name": self.network.name,
                "log_level": "error",
            }
        })
        .to_string()
    }

    /// Runs one call, SIGKILLing it after `kill_after` if it is still running then.
    fn run(&self, op: Op, pod: &Pod, kill_after: Option<Duration>) -> Call {
        let started = Instant::now();
        let outcome = self.outcome(op, pod, kill_after);
        Call { outcome, started, ended: Instant::now() }
    }

    fn outcome(&self, op: Op, pod: &Pod, kill_after: Option<Duration>) -> Outcome {
        let mut child = Command::new(env!("CARGO_BIN_EXE_whereabouts"))
            .env_clear()
            .env("CNI_COMMAND", op.command())
            .env("CNI_CONTAINERID", &pod.container)
            .env("CNI_NETNS", format!("/var/run/netns/{}", pod.container))
            .env("CNI_IFNAME", IFNAME)
            .env("CNI_PATH", "/opt/cni/bin")
            .env(
                "CNI_ARGS",
                format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={}", self.namespace, pod.name),
            )
            .env("NODENAME", pod.node_name())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the plugin");
        let config = self.config(pod.range);
        child.stdin.take().expect("stdin").write_all(config.as_bytes()).expect("write stdin");
        if let Some(delay) = kill_after {
            std::thread::sleep(delay);
            // Fails only when the process already exited, which the status below shows.
            let _ = child.kill();
        }
        let output = child.wait_with_output().expect("wait for the plugin");
        if output.status.signal() == Some(libc::SIGKILL) {
            return Outcome::Killed;
        }
        let stdout = String::from_utf8_lossy(&output.stdout).to_string();
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            return Outcome::Failed(format!("{}: stdout {stdout:?}, stderr {stderr:?}", output.status));
        }
        match op {
            Op::Del => Outcome::Success(Value::Null),
            Op::Add => match serde_json::from_str(&stdout) {
                Ok(result) => Outcome::Success(result),
                Err(e) => Outcome::Failed(format!("exit 0 but the result is not JSON ({e}): {stdout:?}")),
            },
        }
    }

    /// DEL until it answers success, as the kubelet retries; a failure is recorded in `problems`.
    fn del_until_done(&self, pod: &Pod, problems: &Mutex<Vec<String>>) {
        for _ in 0..5 {
            match self.run(Op::Del, pod, None).outcome {
                Outcome::Success(_) => return,
                Outcome::Failed(why) => {
                    problems.lock().expect("problems").push(format!("DEL {} failed: {why}", pod.container));
                }
                Outcome::Killed => unreachable!("not killed"),
            }
        }
        panic!("DEL {} failed 5 times: {:#?}", pod.container, problems.lock().expect("problems"));
    }

    /// Runs every call at the same moment (one thread and one process each, released together) and
    /// returns them in order.
    fn run_at_once(&self, calls: &[(Op, Pod)]) -> Vec<Call> {
        let start = Barrier::new(calls.len());
        std::thread::scope(|scope| {
            let handles: Vec<_> = calls
                .iter()
                .map(|(op, pod)| {
                    let start = &start;
                    scope.spawn(move || {
                        start.wait();
                        self.run(*op, pod, None)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("call thread")).collect()
        })
    }
}

/// What a successful ADD answered, and since when: the moment it had answered.
#[derive(Debug, Clone)]
struct Held {
    ip: IpAddr,
    pod: Pod,
    since: Instant,
}

/// What the calls answered: the live holdings (container -> address), and every holding that ended,
/// with the moment its DEL was started. Between its ADD's answer and the start of its DEL an address
/// is certainly its holder's, so two such intervals of one address must never overlap, whatever
/// order the calls of a burst ran in.
#[derive(Debug)]
struct Ledger {
    origin: Instant,
    live: BTreeMap<String, Held>,
    ended: Vec<(Held, Instant)>,
}

impl Ledger {
    fn new() -> Ledger {
        Ledger { origin: Instant::now(), live: BTreeMap::new(), ended: Vec::new() }
    }

    fn added(&mut self, pod: &Pod, ip: IpAddr, answered: Instant) {
        let held = Held { ip, pod: pod.clone(), since: answered };
        if let Some(before) = self.live.insert(pod.container.clone(), held) {
            // Each scenario adds a container once; a second answer would be the test's own mistake.
            panic!("{} was added twice (first {})", pod.container, before.ip);
        }
    }

    fn deleted(&mut self, container: &str, started: Instant) {
        if let Some(held) = self.live.remove(container) {
            self.ended.push((held, started));
        }
    }

    fn len(&self) -> usize {
        self.live.len()
    }

    /// Every pair of holdings of one address whose intervals overlap.
    fn overlaps(&self) -> Vec<String> {
        let mut intervals: Vec<(&Held, Option<Instant>)> =
            self.ended.iter().map(|(held, until)| (held, Some(*until))).collect();
        intervals.extend(self.live.values().map(|held| (held, None)));
        intervals.sort_by_key(|(held, _)| (held.ip, held.since));
        let at = |t: Instant| format!("{:.1?}", t.duration_since(self.origin));
        let until = |t: Option<Instant>| t.map_or("still held".to_string(), |t| format!("DEL at {}", at(t)));
        let mut problems = Vec::new();
        let mut latest: Option<(&Held, Option<Instant>)> = None;
        for (held, end) in intervals {
            if let Some((before, before_end)) = latest.filter(|(before, _)| before.ip == held.ip) {
                if before_end.is_none_or(|before_end| before_end > held.since) {
                    problems.push(format!(
                        "{} was answered to {} (at {}, {}) and to {} (at {}, {}) at the same time",
                        held.ip,
                        before.pod.container,
                        at(before.since),
                        until(before_end),
                        held.pod.container,
                        at(held.since),
                        until(end)
                    ));
                }
                // Compare the next holding with whichever of these two ends last.
                let ends_later = match (before_end, end) {
                    (None, _) => false,
                    (Some(_), None) => true,
                    (Some(before_end), Some(end)) => end > before_end,
                };
                if !ends_later {
                    continue;
                }
            }
            latest = Some((held, end));
        }
        problems
    }
}

/// The one address of an ADD result, checked against the pod's range; an error says what is wrong.
fn answered_address(network: &Network, pod: &Pod, result: &Value) -> Result<IpAddr, String> {
    let ips = result["ips"].as_array().ok_or_else(|| format!("no ips in {result}"))?;
    let [ip] = ips.as_slice() else { return Err(format!("{} addresses in {result}", ips.len())) };
    let address = ip["address"].as_str().ok_or_else(|| format!("no address in {result}"))?;
    let address: IpNet = address.parse().map_err(|e| format!("address {address:?}: {e}"))?;
    let range = network.range(pod.range);
    if address.prefix_len() != range.prefix_len() || !range.contains(&address.addr()) {
        return Err(format!("address {address} is not in range {range}"));
    }
    Ok(address.addr())
}

/// Applies the outcomes of `calls` to the ledger; every failure and every malformed answer is returned.
fn apply(network: &Network, ledger: &mut Ledger, calls: &[(Op, Pod)], outcomes: Vec<Call>) -> Vec<String> {
    let mut problems = Vec::new();
    for ((op, pod), call) in calls.iter().zip(outcomes) {
        match (op, call.outcome) {
            (Op::Add, Outcome::Success(result)) => match answered_address(network, pod, &result) {
                Ok(ip) => ledger.added(pod, ip, call.ended),
                Err(why) => problems.push(format!("ADD {}: {why}", pod.container)),
            },
            (Op::Del, Outcome::Success(_)) => ledger.deleted(&pod.container, call.started),
            (op, Outcome::Failed(why)) => {
                problems.push(format!("{} {} failed: {why}", op.command(), pod.container))
            }
            (op, Outcome::Killed) => problems.push(format!("{} {} was killed", op.command(), pod.container)),
        }
    }
    problems
}

/// Checks the store against the ledger and panics with every discrepancy found.
async fn check_store(cluster: &TestCluster, network: &Network, ledger: &Ledger, stage: &str) {
    let problems = store_problems(cluster, network, ledger).await;
    assert!(
        problems.is_empty(),
        "{stage}: the store disagrees with the {} successful ADDs still live ({} problems):\n  {}",
        ledger.len(),
        problems.len(),
        problems.join("\n  ")
    );
}

async fn store_problems(cluster: &TestCluster, network: &Network, ledger: &Ledger) -> Vec<String> {
    let namespace = cluster.namespace();
    let pools: Api<IPPool> = Api::namespaced(cluster.client(), namespace);
    let reservations: Api<OverlappingRangeIPReservation> = Api::namespaced(cluster.client(), namespace);
    let mut problems = Vec::new();

    // ip -> (range index, allocation), across every pool of the network.
    let mut held = BTreeMap::new();
    for index in 0..network.ranges.len() {
        let name = network.pool(index);
        let Some(stored) = pools.get_opt(&name).await.expect("read IPPool") else { continue };
        let (pool, skipped) = match Pool::from_spec(&stored.spec.pool, network.range(index)) {
            Ok(decoded) => decoded,
            Err(e) => {
                problems.push(format!("IPPool {name} does not decode: {e}"));
                continue;
            }
        };
        if !skipped.is_empty() {
            problems.push(format!("IPPool {name} has undecodable keys {skipped:?}"));
        }
        for (ip, allocation) in pool.iter() {
            if let Some((other, first)) = held.insert(ip, (index, allocation.clone())) {
                problems.push(format!(
                    "{ip} is held in IPPool {} by {} and in IPPool {name} by {}",
                    network.pool(other),
                    first.container_id,
                    allocation.container_id
                ));
            }
        }
    }

    let mut per_container: BTreeMap<&str, Vec<IpAddr>> = BTreeMap::new();
    for (ip, (_, allocation)) in &held {
        per_container.entry(&allocation.container_id).or_default().push(*ip);
    }
    for (container, ips) in per_container.iter().filter(|(_, ips)| ips.len() > 1) {
        problems.push(format!("{container} holds {} addresses in the pools: {ips:?}", ips.len()));
    }

    for (container, expected) in &ledger.live {
        let pod = &expected.pod;
        let pool = network.pool(pod.range);
        match held.get(&expected.ip) {
            None => problems.push(format!(
                "{container} was answered {} but no pool holds it (lost; expected in {pool})",
                expected.ip
            )),
            Some((index, allocation)) => {
                let wanted = (
                    pod.range,
                    container.as_str(),
                    cluster_pod_ref(namespace, pod),
                    IFNAME,
                    Some(pod.node_name()),
                    Some(network.cni_name()),
                );
                let found = (
                    *index,
                    allocation.container_id.as_str(),
                    allocation.pod_ref.clone(),
                    allocation.ifname.as_str(),
                    allocation.node.clone(),
                    allocation.cni_network.clone(),
                );
                if found != wanted {
                    problems.push(format!(
                        "{} was answered to {container}; the pools hold (range, container, podref, ifname, \
                         node, network) = {found:?}, expected {wanted:?}",
                        expected.ip
                    ));
                }
            }
        }
    }
    for (ip, (index, allocation)) in &held {
        let answered = ledger.live.get(&allocation.container_id).is_some_and(|h| h.ip == *ip);
        if !answered {
            problems.push(format!(
                "{ip} is held in IPPool {} by {} ({}) but no live successful ADD was answered it",
                network.pool(*index),
                allocation.container_id,
                allocation.pod_ref
            ));
        }
    }

    let listed = reservations.list(&ListParams::default()).await.expect("list ORIPs");
    let mut orips: BTreeMap<String, _> =
        listed.items.into_iter().filter_map(|r| Some((r.metadata.name?, r.spec.holder))).collect();
    for (ip, (_, allocation)) in &held {
        let name = reservation_name(network.name, *ip);
        match orips.remove(&name) {
            None => problems
                .push(format!("{ip} ({}) has no OverlappingRangeIPReservation {name}", allocation.pod_ref)),
            Some(holder) => {
                let wanted = (
                    allocation.pod_ref.as_str(),
                    allocation.ifname.as_str(),
                    allocation.container_id.as_str(),
                );
                let found = (holder.pod_ref.as_str(), holder.ifname.as_str(), holder.container_id.as_str());
                if found != wanted {
                    problems.push(format!(
                        "ORIP {name} is held by (podref, ifname, containerid) {found:?}, the pool entry by {wanted:?}"
                    ));
                }
            }
        }
    }
    for (name, holder) in orips {
        problems.push(format!(
            "orphan ORIP {name} held by {} {}: no pool entry has that address",
            holder.pod_ref, holder.container_id
        ));
    }
    problems
}

fn cluster_pod_ref(namespace: &str, pod: &Pod) -> String {
    format!("{namespace}/{}", pod.name)
}

/// Runs `calls` at once, applies them to the ledger, asserts every call succeeded, and checks the store.
fn step(
    runtime: &tokio::runtime::Runtime,
    cluster: &TestCluster,
    plugin: &Plugin<'_>,
    ledger: &mut Ledger,
    calls: &[(Op, Pod)],
    stage: &str,
) {
    let started = Instant::now();
    let outcomes = plugin.run_at_once(calls);
    let elapsed = started.elapsed();
    let mut problems = apply(plugin.network, ledger, calls, outcomes);
    problems.extend(ledger.overlaps());
    assert!(
        problems.is_empty(),
        "{stage}: {} of {} calls went wrong:\n  {}",
        problems.len(),
        calls.len(),
        problems.join("\n  ")
    );
    eprintln!("{stage}: {} calls at once in {elapsed:.2?}, {} addresses held", calls.len(), ledger.len());
    runtime.block_on(check_store(cluster, plugin.network, ledger, stage));
}

fn adds(pods: &[Pod]) -> Vec<(Op, Pod)> {
    pods.iter().map(|p| (Op::Add, p.clone())).collect()
}

fn dels<'a>(pods: impl IntoIterator<Item = &'a Pod>) -> Vec<(Op, Pod)> {
    pods.into_iter().map(|p| (Op::Del, p.clone())).collect()
}

#[test]
fn a_burst_of_adds_and_dels_on_one_pool_never_duplicates_or_loses() {
    let _turn = serial();
    let runtime = runtime();
    let cluster = runtime.block_on(TestCluster::start());
    let network = Network { name: "burst", ranges: &["10.60.0.0/23"] };
    let plugin = Plugin::new(&cluster, &network);
    let mut ledger = Ledger::new();

    let first: Vec<Pod> = (0..NODES).flat_map(|n| (0..20).map(move |i| Pod::new("a", n, i, 0))).collect();
    step(&runtime, &cluster, &plugin, &mut ledger, &adds(&first), "200 ADDs at once");
    // Ten nodes contended for the pool, so their writers took turns through its Lease.
    let leases: Api<Lease> = Api::namespaced(cluster.client(), cluster.namespace());
    let turns = runtime.block_on(leases.list(&ListParams::default())).expect("list Leases");
    assert!(
        turns.items.iter().any(|lease| lease.name_any().starts_with("whereabouts-pool-")),
        "no pool Lease after 200 ADDs from 10 nodes"
    );

    // Half of them go while 100 new pods come.
    let second: Vec<Pod> = (0..NODES).flat_map(|n| (20..30).map(move |i| Pod::new("a", n, i, 0))).collect();
    let mut mixed = dels(first.iter().filter(|p| p.index % 2 == 1));
    assert_eq!(mixed.len(), 100);
    mixed.extend(adds(&second));
    fastrand::shuffle(&mut mixed);
    step(&runtime, &cluster, &plugin, &mut ledger, &mixed, "100 DELs and 100 ADDs at once");
    assert_eq!(ledger.len(), 200);

    let everything: Vec<Pod> = ledger.live.values().map(|h| h.pod.clone()).collect();
    step(&runtime, &cluster, &plugin, &mut ledger, &dels(&everything), "200 DELs at once");
    assert_eq!(ledger.len(), 0);
    runtime.block_on(cluster.cleanup());
}

#[test]
fn overlapping_pools_never_hand_out_one_address_twice() {
    let _turn = serial();
    let runtime = runtime();
    let cluster = runtime.block_on(TestCluster::start());
    // The /25 has 126 addresses; the /24's pods may take the lowest ones first, so at most 120
    // addresses are ever held, the peak of the second step included.
    let network = Network { name: "overlap", ranges: &["10.61.0.0/24", "10.61.0.0/25"] };
    let plugin = Plugin::new(&cluster, &network);
    let mut ledger = Ledger::new();

    let first: Vec<Pod> = (0..NODES).flat_map(|n| (0..10).map(move |i| Pod::new("b", n, i, i % 2))).collect();
    step(&runtime, &cluster, &plugin, &mut ledger, &adds(&first), "100 ADDs at once on a /24 and its /25");

    let second: Vec<Pod> =
        (0..NODES).flat_map(|n| (10..12).map(move |i| Pod::new("b", n, i, i % 2))).collect();
    let mut mixed = dels(first.iter().filter(|p| p.index < 5));
    assert_eq!(mixed.len(), 50);
    mixed.extend(adds(&second));
    fastrand::shuffle(&mut mixed);
    step(&runtime, &cluster, &plugin, &mut ledger, &mixed, "50 DELs and 20 ADDs at once on both pools");

    let everything: Vec<Pod> = ledger.live.values().map(|h| h.pod.clone()).collect();
    step(&runtime, &cluster, &plugin, &mut ledger, &dels(&everything), "70 DELs at once on both pools");
    assert_eq!(ledger.len(), 0);
    runtime.block_on(cluster.cleanup());
}

const CHAOS_WORKERS: usize = 3 * NODES;
const CHAOS_ROUNDS: usize = 8;
/// Live containers per worker stay below this: 30 workers never exhaust the /25.
const CHAOS_MAX_LIVE: usize = 3;

/// The lifetimes of calls that were not killed, so that kills land anywhere in a typical call.
struct Lifetimes(Mutex<(Duration, u32)>);

impl Lifetimes {
    fn record(&self, call: &Call) {
        if !matches!(call.outcome, Outcome::Killed) {
            let mut sum = self.0.lock().expect("lifetimes");
            sum.0 += call.ended - call.started;
            sum.1 += 1;
        }
    }

    fn mean(&self) -> Duration {
        let (sum, count) = *self.0.lock().expect("lifetimes");
        if count == 0 { Duration::from_millis(30) } else { sum / count }
    }

    /// One call in three is killed, uniformly within the mean lifetime of a call so far.
    fn random_kill(&self) -> Option<Duration> {
        (fastrand::u8(..3) == 0).then(|| self.mean().mul_f64(fastrand::f64()))
    }
}

#[derive(Debug, Default)]
struct ChaosCounts {
    kills: AtomicUsize,
    /// Killed ADDs that had already written their pool entry.
    kills_after_pool_write: AtomicUsize,
    adds_done: AtomicUsize,
    in_flight: AtomicUsize,
}

/// When the outage began (since the start) and how many calls were running then.
#[derive(Debug, Clone, Copy)]
struct Outage {
    at: Duration,
    in_flight: usize,
}

#[test]
fn killed_calls_and_an_api_outage_never_duplicate_lose_or_orphan() {
    let _turn = serial();
    let runtime = runtime();
    let cluster = runtime.block_on(TestCluster::start());
    let network = Network { name: "chaos", ranges: &["10.62.0.0/24", "10.62.0.0/25"] };
    let plugin = Plugin::new(&cluster, &network);
    let pools: Api<IPPool> = Api::namespaced(cluster.client(), cluster.namespace());
    let ledger = Mutex::new(Ledger::new());
    let problems = Mutex::new(Vec::new());
    let lifetimes = Lifetimes(Mutex::new((Duration::ZERO, 0)));
    let counts = ChaosCounts::default();
    let workers_done = AtomicBool::new(false);
    let outage: Mutex<Option<Outage>> = Mutex::new(None);

    let started = Instant::now();
    std::thread::scope(|scope| {
        if let Some(fake) = cluster.fake() {
            let (counts, outage, workers_done) = (&counts, &outage, &workers_done);
            scope.spawn(move || {
                // Half way through the ADDs, the API server refuses everything for 300 ms.
                while counts.adds_done.load(Ordering::SeqCst) < CHAOS_WORKERS * CHAOS_ROUNDS / 2 {
                    if workers_done.load(Ordering::SeqCst) {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                let began =
                    Outage { at: started.elapsed(), in_flight: counts.in_flight.load(Ordering::SeqCst) };
                fake.set_unavailable(true);
                std::thread::sleep(Duration::from_millis(300));
                fake.set_unavailable(false);
                *outage.lock().expect("outage") = Some(began);
            });
        }
        let workers: Vec<_> = (0..CHAOS_WORKERS)
            .map(|worker| {
                let (plugin, pools, handle) = (&plugin, &pools, runtime.handle());
                let (ledger, problems, lifetimes, counts) = (&ledger, &problems, &lifetimes, &counts);
                scope.spawn(move || {
                    let range = worker % 2;
                    let problem = |what: String| problems.lock().expect("problems").push(what);
                    let run = |op: Op, pod: &Pod, kill: Option<Duration>| {
                        counts.in_flight.fetch_add(1, Ordering::SeqCst);
                        let call = plugin.run(op, pod, kill);
                        counts.in_flight.fetch_sub(1, Ordering::SeqCst);
                        lifetimes.record(&call);
                        call
                    };
                    let mut live: Vec<Pod> = Vec::new();
                    for round in 0..CHAOS_ROUNDS {
                        let index = worker / NODES * CHAOS_ROUNDS + round;
                        let pod = Pod::new("c", worker % NODES, index, range);
                        let call = run(Op::Add, &pod, lifetimes.random_kill());
                        match call.outcome {
                            Outcome::Success(result) => match answered_address(plugin.network, &pod, &result)
                            {
                                Ok(ip) => {
                                    ledger.lock().expect("ledger").added(&pod, ip, call.ended);
                                    live.push(pod);
                                }
                                Err(why) => problem(format!("ADD {}: {why}", pod.container)),
                            },
                            Outcome::Failed(why) => {
                                // The runtime deletes after a failed ADD, which keeps the ledger exact.
                                problem(format!("ADD {} failed: {why}", pod.container));
                                plugin.del_until_done(&pod, problems);
                            }
                            Outcome::Killed => {
                                counts.kills.fetch_add(1, Ordering::SeqCst);
                                let pool = handle.block_on(pools.get_opt(&plugin.network.pool(range)));
                                let written = pool.ok().flatten().is_some_and(|p| {
                                    p.spec.pool.allocations.values().any(|a| a.container_id == pod.container)
                                });
                                if written {
                                    counts.kills_after_pool_write.fetch_add(1, Ordering::SeqCst);
                                }
                                plugin.del_until_done(&pod, problems);
                            }
                        }
                        counts.adds_done.fetch_add(1, Ordering::SeqCst);
                        // Release one in two of the live containers, sometimes killing the DEL.
                        if !live.is_empty() && (fastrand::bool() || live.len() >= CHAOS_MAX_LIVE) {
                            let victim = live.swap_remove(fastrand::usize(..live.len()));
                            let call = run(Op::Del, &victim, lifetimes.random_kill());
                            match call.outcome {
                                Outcome::Success(_) => {}
                                Outcome::Failed(why) => {
                                    problem(format!("DEL {} failed: {why}", victim.container));
                                    plugin.del_until_done(&victim, problems);
                                }
                                Outcome::Killed => {
                                    counts.kills.fetch_add(1, Ordering::SeqCst);
                                    plugin.del_until_done(&victim, problems);
                                }
                            }
                            ledger.lock().expect("ledger").deleted(&victim.container, call.started);
                        }
                    }
                })
            })
            .collect();
        for worker in workers {
            worker.join().expect("worker");
        }
        workers_done.store(true, Ordering::SeqCst);
    });
    let elapsed = started.elapsed();

    let mut ledger = ledger.into_inner().expect("ledger");
    let mut problems = problems.into_inner().expect("problems");
    problems.extend(ledger.overlaps());
    let kills = counts.kills.load(Ordering::SeqCst);
    let after_write = counts.kills_after_pool_write.load(Ordering::SeqCst);
    let outage = outage.into_inner().expect("outage");
    let outage_seen = match outage {
        Some(o) => format!("a 300 ms API outage at {:.2?} with {} calls running", o.at, o.in_flight),
        None => "no API outage".to_string(),
    };
    eprintln!(
        "chaos: {} ADDs by {CHAOS_WORKERS} workers in {elapsed:.2?}, mean call {:.2?}, {kills} kills \
         ({after_write} killed ADDs had written their pool entry), {outage_seen}, \
         {} addresses held at the end",
        CHAOS_WORKERS * CHAOS_ROUNDS,
        lifetimes.mean(),
        ledger.len()
    );
    assert!(
        problems.is_empty(),
        "{} problems with calls that were not killed:\n  {}",
        problems.len(),
        problems.join("\n  ")
    );
    // About 1 call in 4 dies (a kill may come after the call ended): 50 to 100 of about 340.
    assert!(kills >= 20, "only {kills} calls were killed");
    assert!(after_write > 0, "no killed ADD had written its pool entry: the kills tested little");
    if cluster.fake().is_some() {
        let outage = outage.expect("the outage happened");
        assert!(outage.in_flight > 0, "no call was running when the API server went away");
    }
    // A release removes the pool entry first, then the reservation: one cut off in between (a DEL
    // killed, the API server gone) leaves the reservation of an address it freed, which blocks the
    // address until it is deleted as orphaned, as `whereabouts check --repair` (or the reconciler) does.
    let repair = Command::new(env!("CARGO_BIN_EXE_whereabouts"))
        .args(["check", "--repair", "-o", "json", "--namespace", cluster.namespace()])
        .arg("--kubeconfig")
        .arg(cluster.kubeconfig_path())
        .output()
        .expect("run whereabouts check");
    let report: Value = serde_json::from_slice(&repair.stdout).expect("a JSON report");
    assert!(repair.status.success(), "{report:#}\n{}", String::from_utf8_lossy(&repair.stderr));
    eprintln!(
        "chaos: check --repair deleted {} reservations",
        report["problems"].as_array().map_or(0, Vec::len)
    );
    runtime.block_on(check_store(&cluster, &network, &ledger, "after kills and an outage"));

    // And everything goes away again.
    let everything: Vec<Pod> = ledger.live.values().map(|h| h.pod.clone()).collect();
    step(&runtime, &cluster, &plugin, &mut ledger, &dels(&everything), "DEL of every survivor at once");
    assert_eq!(ledger.len(), 0);
    runtime.block_on(cluster.cleanup());
}

/// Replaces one IPPool's spec after `edit`.
async fn edit_pool(pools: &Api<IPPool>, name: &str, edit: impl FnOnce(&mut PoolSpec)) {
    let mut pool = pools.get(name).await.expect("read IPPool");
    edit(&mut pool.spec.pool);
    pools.replace(name, &PostParams::default(), &pool).await.expect("replace IPPool");
}

/// The checks above fail on each kind of damage they look for (and pass again once it is undone).
#[test]
fn the_checks_catch_every_kind_of_damage() {
    let _turn = serial();
    let runtime = runtime();
    let cluster = runtime.block_on(TestCluster::start());
    let network = Network { name: "audit", ranges: &["10.63.0.0/24", "10.63.0.0/25"] };
    let plugin = Plugin::new(&cluster, &network);
    let mut ledger = Ledger::new();
    let pods: Vec<Pod> = (0..4).map(|node| Pod::new("d", node, 0, node % 2)).collect();
    step(&runtime, &cluster, &plugin, &mut ledger, &adds(&pods), "4 ADDs on both pools");

    let pools: Api<IPPool> = Api::namespaced(cluster.client(), cluster.namespace());
    let orips: Api<OverlappingRangeIPReservation> = Api::namespaced(cluster.client(), cluster.namespace());
    let victim = ledger.live[&pods[0].container].clone();
    let key = match victim.ip {
        IpAddr::V4(ip) => (ip.octets()[3]).to_string(),
        IpAddr::V6(_) => unreachable!("IPv4 ranges"),
    };
    let orip = reservation_name(network.name, victim.ip);
    let (wide, narrow) = (network.pool(0), network.pool(1));
    let intruder = Allocation {
        container_id: "intruder".into(),
        pod_ref: format!("{}/intruder", cluster.namespace()),
        ifname: IFNAME.into(),
        node: None,
        cni_network: None,
        pod_uid: None,
        statefulset: None,
        ipam_claim: None,
    };
    let caught = async |damage: &str, needle: &str| {
        let problems = store_problems(&cluster, &network, &ledger).await;
        assert!(problems.iter().any(|p| p.contains(needle)), "{damage} went unnoticed: {problems:#?}");
    };
    runtime.block_on(async {
        let original = pools.get(&wide).await.expect("read IPPool").spec.pool;
        let entry = original.allocations[&key].clone();

        edit_pool(&pools, &wide, |p| drop(p.allocations.remove(&key))).await;
        caught("a lost pool entry", "no pool holds it").await;
        edit_pool(&pools, &wide, |p| drop(p.allocations.insert(key.clone(), entry.clone()))).await;

        edit_pool(&pools, &wide, |p| drop(p.allocations.insert("200".into(), intruder.clone()))).await;
        caught("an entry nobody was answered", "no live successful ADD").await;
        edit_pool(&pools, &wide, |p| drop(p.allocations.remove("200"))).await;

        edit_pool(&pools, &wide, |p| {
            p.allocations.get_mut(&key).expect("entry").node = Some("node-9".into());
        })
        .await;
        caught("an entry with the wrong node", "expected").await;
        edit_pool(&pools, &wide, |p| drop(p.allocations.insert(key.clone(), entry.clone()))).await;

        edit_pool(&pools, &narrow, |p| drop(p.allocations.insert(key.clone(), intruder.clone()))).await;
        caught("an address held in both overlapping pools", "and in IPPool").await;
        edit_pool(&pools, &narrow, |p| drop(p.allocations.remove(&key))).await;

        let reservation = orips.get(&orip).await.expect("read ORIP");
        orips.delete(&orip, &DeleteParams::default()).await.expect("delete ORIP");
        caught("a missing ORIP", "has no OverlappingRangeIPReservation").await;
        let mut recreated = OverlappingRangeIPReservation::new(&orip, reservation.spec.clone());
        recreated.spec.holder.pod_ref = intruder.pod_ref.clone();
        orips.create(&PostParams::default(), &recreated).await.expect("create ORIP");
        caught("an ORIP of another pod", "is held by").await;
        orips.delete(&orip, &DeleteParams::default()).await.expect("delete ORIP");
        let restored = OverlappingRangeIPReservation::new(&orip, reservation.spec.clone());
        orips.create(&PostParams::default(), &restored).await.expect("create ORIP");

        let orphan = reservation_name(network.name, "10.63.0.99".parse().expect("ip"));
        let stray = OverlappingRangeIPReservation::new(&orphan, reservation.spec.clone());
        orips.create(&PostParams::default(), &stray).await.expect("create ORIP");
        caught("an orphan ORIP", "orphan ORIP").await;
        orips.delete(&orphan, &DeleteParams::default()).await.expect("delete ORIP");
    });
    // Undone, the store passes again.
    runtime.block_on(check_store(&cluster, &network, &ledger, "after undoing the damage"));

    // Answers: an address out of range, and one address answered to two pods at once.
    let outside = json!({"ips": [{"address": "10.63.1.1/24"}]});
    assert!(answered_address(&network, &pods[0], &outside).is_err());
    let mut answers = Ledger::new();
    let now = Instant::now();
    answers.added(&pods[0], victim.ip, now);
    answers.deleted(&pods[0].container, now + Duration::from_millis(10));
    answers.added(&pods[1], victim.ip, now + Duration::from_millis(10));
    assert!(answers.overlaps().is_empty(), "a release then a reuse is no overlap");
    answers.added(&pods[2], victim.ip, now + Duration::from_millis(20));
    assert_eq!(answers.overlaps().len(), 1, "{:?}", answers.overlaps());

    let everything: Vec<Pod> = ledger.live.values().map(|h| h.pod.clone()).collect();
    step(&runtime, &cluster, &plugin, &mut ledger, &dels(&everything), "4 DELs");
    runtime.block_on(cluster.cleanup());
}
