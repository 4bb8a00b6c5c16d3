//! The etcd store through the real plugin binary, against real etcd 3.4 servers that each test
//! starts for itself (`etcd_support`): the CNI commands, the stored layout, the TLS and
//! user/password settings and how their mistakes are reported, and faults: etcd restarted, or a
//! cluster member killed, in the middle of a burst of concurrent ADDs; plugin processes SIGKILLed
//! mid-transaction; many processes on one pool. After every burst the store is compared with the
//! ledger of the ADD answers the workers saw ([`assert_ledger`]).
//!
//! Without `etcd`/`etcdctl` the tests that need them say so and pass, except when `CI` is set:
//! then they fail.

mod etcd_support;

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Barrier, Mutex};
use std::thread::sleep;
use std::time::{Duration, Instant};

use etcd_support::{EtcdCluster, etcd_bin, etcdctl_bin};
use ipnet::IpNet;
use serde_json::{Value, json};
use whereabouts_core::config::EtcdConfig;
use whereabouts_core::pool::{Allocation, Pool};
use whereabouts_core::range::{pool_name, reservation_name};
use whereabouts_store::etcd::EtcdStore;
use whereabouts_store::{Deletion, Reservation, Store, StoreError};

const V4: &str = "192.0.2.0/24";
/// Overlaps [`V4`]: half the workers of a burst allocate from it, racing the reservations.
const V4_HALF: &str = "192.0.2.0/25";
const V6: &str = "2001:db8:5::/64";
/// What the first and second pod on empty pools of [`V4`] and [`V6`] get.
const FIRST: [&str; 2] = ["192.0.2.1/24", "2001:db8:5::1/64"];
const SECOND: [&str; 2] = ["192.0.2.2/24", "2001:db8:5::2/64"];
const DEFAULT_PREFIX: &str = "/whereabouts/";
/// The CNI network name (`name` of the network configuration).
const NETWORK: &str = "etcd-net";
const NODE: &str = "node-a";
const NAMESPACE: &str = "etcd-store";

const INVALID_CONFIG: u64 = 7;
const TRY_AGAIN: u64 = 11;
const INTERNAL: u64 = 999;

/// Whether etcd and etcdctl can run here. When they cannot: fail under `CI`, otherwise say why and
/// let the test return early.
fn etcd_or_skip() -> bool {
    let runs = |bin: &std::ffi::OsStr, arg: &str| {
        Command::new(bin).arg(arg).output().is_ok_and(|o| o.status.success())
    };
    let problem = if !runs(&etcd_bin(), "--version") {
        Some(etcd_bin())
    } else if !runs(&etcdctl_bin(), "version") {
        Some(etcdctl_bin())
    } else {
        None
    };
    match problem {
        None => true,
        Some(bin) if std::env::var_os("CI").is_some() => {
            panic!("etcd_store: cannot run {}; these tests must run in CI", bin.display())
        }
        Some(bin) => {
            eprintln!(
                "etcd_store: skipped: cannot run {} (apt-get install etcd-server etcd-client)",
                bin.display()
            );
            false
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Configuration

/// The `ipam` section for `etcd_host` alone: dual stack, [`V4`] and [`V6`].
fn ipam_at(etcd_host: &str) -> Value {
    json!({
        "type": "whereabouts",
        "datastore": "etcd",
        "etcd_host": etcd_host,
        "range": V4,
        "ipRanges": [{ "range": V6 }],
        "log_level": "error",
    })
}

/// The `ipam` section for `etcd`: its members without a scheme, and its TLS files and credentials
/// when it has them.
fn ipam(etcd: &EtcdCluster) -> Value {
    let mut ipam = ipam_at(&etcd.hosts_csv());
    if etcd.tls_files().is_some() {
        ipam["etcd_ca_cert_file"] = json!(etcd.ca_file());
        ipam["etcd_cert_file"] = json!(etcd.client_cert_file());
        ipam["etcd_key_file"] = json!(etcd.client_key_file());
    }
    if let Some(credentials) = etcd.credentials() {
        ipam["etcd_username"] = json!(credentials.user);
        ipam["etcd_password"] = json!(credentials.password);
    }
    ipam
}

/// `ipam` with `key` set to `value`.
fn with(ipam: &Value, key: &str, value: Value) -> Value {
    let mut ipam = ipam.clone();
    ipam[key] = value;
    ipam
}

/// `ipam` without `keys`.
fn without(ipam: &Value, keys: &[&str]) -> Value {
    let mut ipam = ipam.clone();
    for key in keys {
        ipam.as_object_mut().expect("an object").remove(*key);
    }
    ipam
}

/// A network configuration (spec 1.0.0) around `ipam`.
fn netconf(ipam: &Value) -> String {
    netconf_with(ipam, "1.0.0", json!({}))
}

/// A network configuration around `ipam`, with `extra` top-level keys added or replaced.
fn netconf_with(ipam: &Value, cni_version: &str, extra: Value) -> String {
    let mut conf = json!({ "cniVersion": cni_version, "name": NETWORK, "type": "macvlan", "ipam": ipam });
    if let Value::Object(extra) = extra {
        for (key, value) in extra {
            conf[key] = value;
        }
    }
    conf.to_string()
}

// ---------------------------------------------------------------------------------------------
// Running the plugin

/// The identity of one attachment: pod, sandbox (container ID), interface and node.
#[derive(Debug, Clone)]
struct Pod {
    name: String,
    container: String,
    ifname: &'static str,
    node: &'static str,
}

impl Pod {
    fn new(name: impl Into<String>) -> Self {
        let name = name.into();
        Pod { container: format!("{name}-sandbox-1"), name, ifname: "net1", node: NODE }
    }

    /// The same pod and interface in another sandbox (a new container ID).
    fn sandbox(&self, n: u32) -> Self {
        Pod { container: format!("{}-sandbox-{n}", self.name), ..self.clone() }
    }

    fn on_node(self, node: &'static str) -> Self {
        Pod { node, ..self }
    }

    fn pod_ref(&self) -> String {
        format!("{NAMESPACE}/{}", self.name)
    }
}

/// How one plugin run ended.
#[derive(Debug)]
enum Outcome {
    /// Exit 0; the parsed stdout, `Null` when it printed nothing.
    Success(Value),
    /// Exit 1 with an error object.
    Failed { code: u64, msg: String },
    /// SIGKILLed by the test on purpose.
    Killed,
    /// Still running after [`HUNG_AFTER`] (then killed).
    Hung(Duration),
}

impl Outcome {
    #[track_caller]
    fn ok(self, what: &str) -> Value {
        match self {
            Outcome::Success(value) => value,
            other => panic!("{what}: expected success, got {other:?}"),
        }
    }

    /// A success that printed nothing (DEL, CHECK, GC).
    #[track_caller]
    fn silent(self, what: &str) {
        let value = self.ok(what);
        assert_eq!(value, Value::Null, "{what}: must print nothing");
    }

    #[track_caller]
    fn error(self, what: &str) -> (u64, String) {
        match self {
            Outcome::Failed { code, msg } => (code, msg),
            other => panic!("{what}: expected an error, got {other:?}"),
        }
    }

    /// An error with `code` whose message names every one of `words`.
    #[track_caller]
    fn error_naming(self, what: &str, code: u64, words: &[&str]) -> String {
        let (got, msg) = self.error(what);
        assert_eq!(got, code, "{what}: code of {msg:?}");
        for word in words {
            assert!(msg.contains(word), "{what}: {msg:?} does not name {word}");
        }
        msg
    }
}

/// The budget the tests give a plugin call (`WHEREABOUTS_CALL_BUDGET`), in seconds: far beyond what
/// a call takes on a busy machine, short enough that an outage test ends soon.
const PLUGIN_BUDGET_SECONDS: u64 = 20;

/// How long any plugin run may take before the test kills it and reports it as hung: beyond the
/// plugin's own bound (its budget, a failed ADD's 15 s to roll back, a margin).
const HUNG_AFTER: Duration = Duration::from_secs(PLUGIN_BUDGET_SECONDS + 25);

/// Runs the plugin once for `pod`; with `kill_after`, SIGKILLs it if it still runs after that long.
fn run_plugin(command: &str, pod: &Pod, netconf: &str, kill_after: Option<Duration>) -> Outcome {
    run_plugin_within(command, pod, netconf, kill_after, PLUGIN_BUDGET_SECONDS)
}

/// [`run_plugin`], with the call's budget set to `budget_seconds` instead of the tests' default (the
/// plugin keeps trying a store that does not answer until its budget is spent).
fn run_plugin_within(
    command: &str,
    pod: &Pod,
    netconf: &str,
    kill_after: Option<Duration>,
    budget_seconds: u64,
) -> Outcome {
    let mut child = Command::new(env!("CARGO_BIN_EXE_whereabouts"))
        .env_clear()
        .env(whereabouts_cni::BUDGET_ENV, budget_seconds.to_string())
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", &pod.container)
        .env("CNI_NETNS", format!("/var/run/netns/{}", pod.container))
        .env("CNI_IFNAME", pod.ifname)
        .env("CNI_PATH", "/opt/cni/bin")
        .env("CNI_ARGS", format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={NAMESPACE};K8S_POD_NAME={}", pod.name))
        .env("NODENAME", pod.node)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the plugin");
    let started = Instant::now();
    child.stdin.take().expect("stdin").write_all(netconf.as_bytes()).expect("write stdin");
    // Its output is a few hundred bytes: it never blocks on a full pipe while this polls.
    let kill_at = kill_after.unwrap_or(HUNG_AFTER).min(HUNG_AFTER);
    while child.try_wait().expect("poll the plugin").is_none() {
        if started.elapsed() >= kill_at {
            let _ = child.kill();
            break;
        }
        let poll = if kill_after.is_some() { Duration::from_millis(1) } else { Duration::from_millis(5) };
        sleep(poll.min(kill_at.saturating_sub(started.elapsed())));
    }
    let output = child.wait_with_output().expect("wait for the plugin");
    if output.status.signal() == Some(libc::SIGKILL) {
        return if kill_after.is_some_and(|k| k < HUNG_AFTER) {
            Outcome::Killed
        } else {
            Outcome::Hung(started.elapsed())
        };
    }
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    let parsed = || {
        serde_json::from_str::<Value>(&stdout).unwrap_or_else(|e| {
            panic!("{command} {}: stdout is not JSON ({e}): {stdout:?}; stderr: {stderr}", pod.container)
        })
    };
    match output.status.code() {
        Some(0) => Outcome::Success(if stdout.is_empty() { Value::Null } else { parsed() }),
        Some(1) => {
            let reply = parsed();
            let code = reply["code"].as_u64().unwrap_or_else(|| panic!("error without a code: {reply}"));
            let msg = reply["msg"].as_str().unwrap_or_else(|| panic!("error without a msg: {reply}"));
            Outcome::Failed { code, msg: msg.to_string() }
        }
        _ => panic!(
            "{command} {}: exited {}; stdout {stdout:?}; stderr: {stderr}",
            pod.container, output.status
        ),
    }
}

fn cni(command: &str, pod: &Pod, netconf: &str) -> Outcome {
    run_plugin(command, pod, netconf, None)
}

/// The addresses of an ADD result, in order.
fn addresses(result: &Value) -> Vec<String> {
    result["ips"]
        .as_array()
        .unwrap_or_else(|| panic!("no ips in {result}"))
        .iter()
        .map(|ip| ip["address"].as_str().unwrap_or_else(|| panic!("no address in {ip}")).to_string())
        .collect()
}

/// ADD that must succeed; its addresses.
#[track_caller]
fn add(pod: &Pod, netconf: &str) -> Vec<String> {
    addresses(&cni("ADD", pod, netconf).ok(&format!("ADD {}", pod.container)))
}

/// DEL that must succeed silently.
#[track_caller]
fn del(pod: &Pod, netconf: &str) {
    cni("DEL", pod, netconf).silent(&format!("DEL {}", pod.container));
}

// ---------------------------------------------------------------------------------------------
// Reading the store

/// The store's connection settings for `etcd` (all endpoints, its TLS files and credentials).
fn settings(etcd: &EtcdCluster, prefix: &str) -> EtcdConfig {
    let path = |p: &Path| Some(p.to_string_lossy().into_owned());
    let tls = etcd.tls_files();
    EtcdConfig {
        hosts: etcd.endpoints_csv(),
        username: etcd.credentials().map(|c| c.user.clone()),
        password: etcd.credentials().map(|c| c.password.clone()),
        ca_cert_file: tls.and_then(|t| path(&t.ca)),
        cert_file: tls.and_then(|t| path(&t.client_cert)),
        key_file: tls.and_then(|t| path(&t.client_key)),
        key_prefix: prefix.to_string(),
    }
}

/// Everything stored under one key prefix, decoded.
#[derive(Debug, Default)]
struct Snapshot {
    /// Pool name → (its network, address → allocation).
    pools: BTreeMap<String, (IpNet, BTreeMap<IpAddr, Allocation>)>,
    /// Reservation name → reservation.
    reservations: BTreeMap<String, Reservation>,
}

impl Snapshot {
    /// Every allocation as (address with its pool's prefix length, allocation).
    fn entries(&self) -> impl Iterator<Item = (String, &Allocation)> {
        self.pools.values().flat_map(|(network, allocations)| {
            allocations.iter().map(|(ip, a)| (format!("{ip}/{}", network.prefix_len()), a))
        })
    }

    /// The addresses (with prefix length) `container` holds, sorted.
    fn addresses_of(&self, container: &str) -> Vec<String> {
        let mut out: Vec<String> =
            self.entries().filter(|(_, a)| a.container_id == container).map(|(ip, _)| ip).collect();
        out.sort();
        out
    }

    /// Who holds `ip` (without prefix) in any pool.
    fn holder(&self, ip: &str) -> Option<&Allocation> {
        let ip: IpAddr = ip.parse().expect("an address");
        self.pools.values().find_map(|(_, allocations)| allocations.get(&ip))
    }

    /// The reservation of `ip` (without prefix).
    fn reservation(&self, ip: &str) -> Option<&Reservation> {
        self.reservations.get(&reservation_name("", ip.parse().expect("an address")))
    }
}

/// Reads everything below `prefix` through the store itself (as the plugin sees it).
fn snapshot(etcd: &EtcdCluster, prefix: &str) -> Snapshot {
    let settings = settings(etcd, prefix);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    runtime.block_on(async {
        let store = EtcdStore::connect(&settings)
            .await
            .unwrap_or_else(|e| panic!("connecting to read the store: {e}"));
        let mut snapshot = Snapshot::default();
        for name in store.list_pools().await.expect("list pools") {
            let stored = store
                .read_pool(&name)
                .await
                .expect("read pool")
                .unwrap_or_else(|| panic!("pool {name} was listed but is gone"));
            let network: IpNet = stored.spec.range.parse().expect("a stored pool's range is a CIDR");
            assert_eq!(pool_name("", None, &network), name, "a pool's key names its range");
            let (pool, skipped) = Pool::from_spec(&stored.spec, network).expect("decode pool");
            assert!(skipped.is_empty(), "pool {name}: undecodable keys {skipped:?}");
            let allocations = pool.iter().map(|(ip, a)| (ip, a.clone())).collect();
            snapshot.pools.insert(name, (network, allocations));
        }
        snapshot.reservations = store
            .list_reservations()
            .await
            .expect("list reservations")
            .into_iter()
            .map(|(name, read)| (name, read.holder))
            .collect();
        snapshot
    })
}

/// Container ID → the addresses its successful ADD answered.
type Ledger = BTreeMap<String, Vec<String>>;

/// The ledger of pods that each hold the given addresses.
fn ledger_of<S: AsRef<str>>(entries: &[(&Pod, &[S])]) -> Ledger {
    entries
        .iter()
        .map(|(pod, ips)| (pod.container.clone(), ips.iter().map(|ip| ip.as_ref().to_string()).collect()))
        .collect()
}

/// The exact check: every container of the ledger holds exactly its addresses and nothing else is
/// held; no address is held twice across pools; every allocation has its reservation, recording
/// the same pod, interface and container, and there is no other reservation.
#[track_caller]
fn assert_ledger(snapshot: &Snapshot, ledger: &Ledger) {
    let mut problems = Vec::new();
    let mut owners: HashMap<IpAddr, &Allocation> = HashMap::new();
    let mut held: Ledger = BTreeMap::new();
    for (pool, (network, allocations)) in &snapshot.pools {
        for (ip, allocation) in allocations {
            if let Some(other) = owners.insert(*ip, allocation) {
                problems.push(format!(
                    "{ip} is held twice: by {} and (in pool {pool}) by {}",
                    other.container_id, allocation.container_id
                ));
            }
            held.entry(allocation.container_id.clone())
                .or_default()
                .push(format!("{ip}/{}", network.prefix_len()));
        }
    }
    for (name, reservation) in &snapshot.reservations {
        let owner = name.replace('-', ":").parse::<IpAddr>().ok().and_then(|ip| owners.get(&ip));
        match owner {
            None => problems.push(format!("reservation {name} {reservation:?} has no pool entry")),
            Some(a)
                if (&a.pod_ref, &a.ifname, &a.container_id)
                    != (&reservation.pod_ref, &reservation.ifname, &reservation.container_id) =>
            {
                problems
                    .push(format!("reservation {name} {reservation:?} does not match its pool entry {a:?}"));
            }
            Some(_) => {}
        }
    }
    for (ip, allocation) in &owners {
        if !snapshot.reservations.contains_key(&reservation_name("", *ip)) {
            problems.push(format!("{ip} of {} has no reservation", allocation.container_id));
        }
    }
    let sorted = |ips: &[String]| {
        let mut ips = ips.to_vec();
        ips.sort();
        ips
    };
    for (container, ips) in ledger {
        match held.get(container) {
            None => problems.push(format!("{container} answered {ips:?} but holds nothing")),
            Some(got) if sorted(got) != sorted(ips) => {
                problems.push(format!("{container} answered {ips:?} but holds {got:?}"));
            }
            Some(_) => {}
        }
    }
    for (container, ips) in &held {
        if !ledger.contains_key(container) {
            problems.push(format!("{container} holds {ips:?} but has no successful ADD outstanding"));
        }
    }
    assert!(
        problems.is_empty(),
        "the store does not match the ledger of successful ADDs ({} containers):\n{}",
        ledger.len(),
        problems.join("\n")
    );
}

/// [`assert_ledger`] after faults. A release removes the pool entry first, then the reservation: a
/// release that a fault cut off in between (a DEL killed, etcd gone) leaves the reservation of an
/// address it freed, which blocks the address (it is never handed out twice) until it is deleted as
/// orphaned. `whereabouts check --repair` does that, and then nothing is amiss.
#[track_caller]
fn repair_then_assert_ledger(etcd: &EtcdCluster, ledger: &Ledger) {
    let output = Command::new(env!("CARGO_BIN_EXE_whereabouts"))
        .args(["check", "--repair", "--etcd-host", &etcd.hosts_csv(), "-o", "json"])
        // No pods to look up: only the store is repaired.
        .env_remove("KUBECONFIG")
        .output()
        .expect("run whereabouts check");
    let report: Value = serde_json::from_slice(&output.stdout).expect("a JSON report");
    let repaired = report["problems"].as_array().map_or(0, Vec::len);
    eprintln!("check --repair: {repaired} reservations left by releases cut off between their two writes");
    assert!(output.status.success(), "{report:#}\n{}", String::from_utf8_lossy(&output.stderr));
    assert_ledger(&snapshot(etcd, DEFAULT_PREFIX), ledger);
}

/// The JSON value of one key, read raw with etcdctl.
fn raw_json(etcd: &EtcdCluster, key: &str) -> Value {
    let value = etcd.etcdctl(&["get", "--print-value-only", key]);
    serde_json::from_str(value.trim()).unwrap_or_else(|e| panic!("{key}: {e}: {value:?}"))
}

/// Every key in etcd, sorted.
fn all_keys(etcd: &EtcdCluster) -> Vec<String> {
    let out = etcd.etcdctl(&["get", "--prefix", "--keys-only", ""]);
    let mut keys: Vec<String> = out.lines().filter(|l| !l.is_empty()).map(str::to_string).collect();
    keys.sort();
    keys
}

// ---------------------------------------------------------------------------------------------
// Bursts of concurrent plugin processes

/// Concurrent workers, each doing rounds of ADD (a new pod each round) and sometimes DEL of one of
/// its live pods. A failed or killed ADD is followed by DELs until one succeeds (as a runtime
/// does), as is a failed or killed DEL.
#[derive(Debug)]
struct Burst {
    /// Prefix of the pod names.
    tag: &'static str,
    /// Worker `i` uses `netconfs[i % len]`.
    netconfs: Vec<String>,
    workers: usize,
    /// Rounds per worker, unless the fault stops the burst first.
    rounds: usize,
    /// When set, one call in three is SIGKILLed after a random delay ([`Burst::kill_delay`]).
    kill_window: Option<Duration>,
    /// Whether calls may fail with code 11 (the store is being faulted); any other failure, and
    /// any failure at all without this, fails the test.
    unavailability_expected: bool,
}

/// A worker keeps at most this many pods, so that the workers of a burst never exhaust a /25.
const MAX_LIVE: usize = 3;
/// How long a worker keeps retrying the DEL that must follow a failed call.
const DEL_RETRY_DEADLINE: Duration = Duration::from_secs(45);

/// What the workers of a burst did; the fault watches it.
#[derive(Debug, Default)]
struct Progress {
    stop: AtomicBool,
    adds_ok: AtomicUsize,
    adds_failed: AtomicUsize,
    dels_failed: AtomicUsize,
    kills: AtomicUsize,
    /// Kills that came after the process had already exited.
    late_kills: AtomicUsize,
    ledger: Mutex<LiveLedger>,
    /// How long the calls that ran to completion took.
    durations: Mutex<Vec<Duration>>,
    /// Error code → (how many, the first message).
    failures: Mutex<BTreeMap<u64, (usize, String)>>,
}

/// The ledger, and which live container each answered address belongs to.
#[derive(Debug, Default)]
struct LiveLedger {
    ledger: Ledger,
    by_address: HashMap<String, String>,
}

impl Progress {
    fn adds_ok(&self) -> usize {
        self.adds_ok.load(Ordering::SeqCst)
    }

    fn adds_failed(&self) -> usize {
        self.adds_failed.load(Ordering::SeqCst)
    }

    fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Waits until `condition` holds; panics (stopping the burst) after 30 s or when a worker gave
    /// up.
    #[track_caller]
    fn wait_until(&self, what: &str, condition: impl Fn(&Progress) -> bool) {
        let held = self.wait_at_most(Duration::from_secs(30), what, condition);
        assert!(held, "no {what} within 30 s: {}", self.summary());
    }

    /// Waits up to `limit` for `condition`; says whether it held. Panics when a worker gave up.
    #[track_caller]
    fn wait_at_most(&self, limit: Duration, what: &str, condition: impl Fn(&Progress) -> bool) -> bool {
        let deadline = Instant::now() + limit;
        while !condition(self) {
            assert!(!self.stopped(), "a worker failed while waiting for {what} (see its panic above)");
            if Instant::now() >= deadline {
                return false;
            }
            sleep(Duration::from_millis(10));
        }
        true
    }

    /// Records a successful ADD, checking that no live pod was answered any of its addresses.
    fn answered(&self, container: &str, ips: Vec<String>) {
        let mut live = self.ledger.lock().expect("ledger");
        for ip in &ips {
            if let Some(other) = live.by_address.insert(ip.clone(), container.to_string()) {
                panic!("{ip} was answered to {container} while {other} still holds it");
            }
        }
        live.ledger.insert(container.to_string(), ips);
        self.adds_ok.fetch_add(1, Ordering::SeqCst);
    }

    /// Takes a container off the ledger before its DEL (from then on its addresses may go to others).
    fn releasing(&self, container: &str) {
        let mut live = self.ledger.lock().expect("ledger");
        for ip in live.ledger.remove(container).unwrap_or_default() {
            live.by_address.remove(&ip);
        }
    }

    fn failed(&self, burst: &Burst, what: &str, code: u64, msg: &str) {
        assert!(
            burst.unavailability_expected && code == TRY_AGAIN,
            "{what} failed unexpectedly with code {code}: {msg}"
        );
        let mut failures = self.failures.lock().expect("failures");
        failures.entry(code).or_insert((0, msg.to_string())).0 += 1;
    }

    /// The `p`th percentile of the durations of the calls that ran to completion so far.
    fn percentile(&self, p: usize) -> Duration {
        let mut durations = self.durations.lock().expect("durations").clone();
        durations.sort();
        durations.get(durations.len() * p / 100).copied().unwrap_or_default()
    }

    fn summary(&self) -> String {
        format!(
            "{} ADDs answered, {} ADDs and {} DELs failed, {} processes killed ({} kills came too late), \
             calls took {:.0?} (median) {:.0?} (p90), failures by code {:?}",
            self.adds_ok(),
            self.adds_failed(),
            self.dels_failed.load(Ordering::SeqCst),
            self.kills.load(Ordering::SeqCst),
            self.late_kills.load(Ordering::SeqCst),
            self.percentile(50),
            self.percentile(90),
            self.failures.lock().expect("failures")
        )
    }

    fn into_ledger(self) -> Ledger {
        self.ledger.into_inner().expect("ledger").ledger
    }
}

/// Stops the burst when the thread holding it panics, so that the others do not run on.
struct StopOnPanic<'a>(&'a AtomicBool);

impl Drop for StopOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.store(true, Ordering::SeqCst);
        }
    }
}

impl Burst {
    /// One call in three is killed, after a delay spread over a call's whole life: below the kill
    /// window, or 1.5 times the median duration of the burst's calls so far if that is longer.
    fn kill_delay(&self, progress: &Progress) -> Option<Duration> {
        let window = self.kill_window?;
        if fastrand::u8(..3) != 0 {
            return None;
        }
        let median = progress.percentile(50).mul_f64(1.5);
        Some(window.max(median).mul_f64(fastrand::f64()))
    }

    /// One call that may be killed or fail; when it does not succeed, DELs until one does.
    fn call(&self, progress: &Progress, command: &str, pod: &Pod, netconf: &str) -> Option<Value> {
        let kill_after = self.kill_delay(progress);
        let started = Instant::now();
        let outcome = run_plugin(command, pod, netconf, kill_after);
        if !matches!(outcome, Outcome::Killed) {
            progress.durations.lock().expect("durations").push(started.elapsed());
        }
        match outcome {
            Outcome::Success(value) => {
                if kill_after.is_some() {
                    progress.late_kills.fetch_add(1, Ordering::SeqCst);
                }
                return Some(value);
            }
            Outcome::Failed { code, msg } => {
                let counter = if command == "ADD" { &progress.adds_failed } else { &progress.dels_failed };
                counter.fetch_add(1, Ordering::SeqCst);
                progress.failed(self, &format!("{command} {}", pod.container), code, &msg);
            }
            Outcome::Killed => {
                progress.kills.fetch_add(1, Ordering::SeqCst);
            }
            Outcome::Hung(after) => panic!("{command} {} did not answer within {after:?}", pod.container),
        }
        self.del_until_done(progress, pod, netconf);
        None
    }

    fn del_until_done(&self, progress: &Progress, pod: &Pod, netconf: &str) {
        let deadline = Instant::now() + DEL_RETRY_DEADLINE;
        loop {
            match run_plugin("DEL", pod, netconf, None) {
                Outcome::Success(_) => return,
                Outcome::Failed { code, msg } => {
                    progress.dels_failed.fetch_add(1, Ordering::SeqCst);
                    progress.failed(self, &format!("DEL {}", pod.container), code, &msg);
                    assert!(Instant::now() < deadline, "DEL {} kept failing: {msg}", pod.container);
                    sleep(Duration::from_millis(100));
                }
                other => panic!("DEL {} did not answer: {other:?}", pod.container),
            }
        }
    }

    fn worker(&self, worker: usize, progress: &Progress) {
        let netconf = &self.netconfs[worker % self.netconfs.len()];
        let mut live: Vec<Pod> = Vec::new();
        for round in 0..self.rounds {
            if progress.stopped() {
                break;
            }
            let pod = Pod::new(format!("{}-w{worker}-r{round}", self.tag));
            if let Some(result) = self.call(progress, "ADD", &pod, netconf) {
                progress.answered(&pod.container, addresses(&result));
                live.push(pod);
            }
            if !live.is_empty() && (fastrand::bool() || live.len() >= MAX_LIVE) {
                let victim = live.swap_remove(fastrand::usize(..live.len()));
                progress.releasing(&victim.container);
                self.call(progress, "DEL", &victim, netconf);
            }
        }
    }

    /// Runs the workers, all starting at once, and `fault` beside them on this thread; returns when
    /// every worker has finished its rounds or seen [`Progress::stop`].
    fn run(&self, fault: impl FnOnce(&Progress)) -> Progress {
        let progress = Progress::default();
        let start = Barrier::new(self.workers + 1);
        let started = Instant::now();
        std::thread::scope(|scope| {
            for worker in 0..self.workers {
                let (progress, start) = (&progress, &start);
                scope.spawn(move || {
                    let _stop = StopOnPanic(&progress.stop);
                    start.wait();
                    self.worker(worker, progress);
                });
            }
            let _stop = StopOnPanic(&progress.stop);
            start.wait();
            fault(&progress);
        });
        eprintln!(
            "burst {}: {} workers, {:.1?}: {}",
            self.tag,
            self.workers,
            started.elapsed(),
            progress.summary()
        );
        progress
    }
}

/// Dual-stack configurations on two overlapping IPv4 ranges (and one IPv6 range) of `etcd`.
fn overlapping_netconfs(etcd: &EtcdCluster) -> Vec<String> {
    let ipam = ipam(etcd);
    vec![netconf(&with(&ipam, "range", json!(V4))), netconf(&with(&ipam, "range", json!(V4_HALF)))]
}

// ---------------------------------------------------------------------------------------------
// 1. One member, the CNI commands through the binary

#[test]
fn add_check_del_and_idempotent_add() {
    if !etcd_or_skip() {
        return;
    }
    let etcd = EtcdCluster::single();
    let ipam = ipam(&etcd);
    let conf = netconf(&ipam);
    let a = Pod::new("basic-a");
    let b = Pod::new("basic-b");

    let result = cni("ADD", &a, &conf).ok("ADD a");
    assert_eq!(result["cniVersion"], "1.0.0", "{result}");
    assert_eq!(addresses(&result), FIRST);
    assert_eq!(add(&b, &conf), SECOND);

    // The stored layout, read raw.
    let v4 = raw_json(&etcd, "/whereabouts/pools/192.0.2.0-24");
    assert_eq!(v4["range"], V4);
    assert_eq!(
        v4["allocations"]["1"],
        json!({ "id": a.container, "podref": a.pod_ref(), "ifname": "net1", "node": NODE, "network": NETWORK })
    );
    let v6 = raw_json(&etcd, "/whereabouts/pools/2001-db8-5---64");
    assert_eq!(v6["range"], V6);
    assert_eq!(v6["allocations"]["2"]["id"], json!(b.container));
    assert_eq!(
        raw_json(&etcd, "/whereabouts/reservations/2001-db8-5--1"),
        json!({ "podref": a.pod_ref(), "ifname": "net1", "containerid": a.container })
    );
    assert_eq!(
        all_keys(&etcd),
        [
            "/whereabouts/pools/192.0.2.0-24",
            "/whereabouts/pools/2001-db8-5---64",
            "/whereabouts/reservations/192.0.2.1",
            "/whereabouts/reservations/192.0.2.2",
            "/whereabouts/reservations/2001-db8-5--1",
            "/whereabouts/reservations/2001-db8-5--2",
        ]
    );

    // CHECK: the ADD's result as prevResult passes; another address, or a container holding
    // nothing, fails.
    let check = |prev: &Value| netconf_with(&ipam, "1.0.0", json!({ "prevResult": prev }));
    cni("CHECK", &a, &check(&result)).silent("CHECK a");
    let mut wrong = result.clone();
    wrong["ips"][0]["address"] = json!("192.0.2.9/24");
    cni("CHECK", &a, &check(&wrong)).error_naming("CHECK with a wrong prevResult", INTERNAL, &["192.0.2.1"]);
    cni("CHECK", &Pod::new("basic-nobody"), &check(&result)).error_naming(
        "CHECK of a container without addresses",
        INTERNAL,
        &["basic-nobody"],
    );

    // The same pod and interface in a new sandbox keeps its addresses; the stored ID follows.
    let a2 = a.sandbox(2);
    assert_eq!(add(&a2, &conf), FIRST);
    let snap = snapshot(&etcd, DEFAULT_PREFIX);
    for ip in ["192.0.2.1", "2001:db8:5::1"] {
        assert_eq!(snap.holder(ip).map(|h| h.container_id.as_str()), Some(a2.container.as_str()), "{ip}");
        assert_eq!(
            snap.reservation(ip).map(|r| r.container_id.as_str()),
            Some(a2.container.as_str()),
            "{ip}"
        );
    }
    let ab = [(&a2, &FIRST[..]), (&b, &SECOND[..])];
    assert_ledger(&snap, &ledger_of(&ab));
    // The old sandbox's DEL (the runtime tears it down after the new one is up) frees nothing.
    del(&a, &conf);
    assert_ledger(&snapshot(&etcd, DEFAULT_PREFIX), &ledger_of(&ab));
    cni("CHECK", &a2, &check(&result)).silent("CHECK a in its new sandbox");

    // DEL frees; the next ADD gets the lowest free addresses again.
    del(&a2, &conf);
    let c = Pod::new("basic-c");
    assert_eq!(add(&c, &conf), FIRST);
    // DEL of what was never added, and a repeated DEL, succeed.
    del(&Pod::new("basic-never-added"), &conf);
    del(&c, &conf);
    del(&c, &conf);
    assert_ledger(&snapshot(&etcd, DEFAULT_PREFIX), &ledger_of(&ab[1..]));
}

#[test]
fn gc_releases_only_stale_attachments_of_its_node_and_network() {
    if !etcd_or_skip() {
        return;
    }
    let etcd = EtcdCluster::single();
    let ipam = ipam(&etcd);
    let conf = netconf(&ipam);
    let other_network = netconf_with(&ipam, "1.0.0", json!({ "name": "other-net" }));
    let stale = Pod::new("gc-stale");
    let valid = Pod::new("gc-valid");
    let elsewhere = Pod::new("gc-elsewhere").on_node("node-b");
    let foreign = Pod::new("gc-other-network");
    let ips_stale = add(&stale, &conf);
    let ips_valid = add(&valid, &conf);
    let ips_elsewhere = add(&elsewhere, &conf);
    let ips_foreign = add(&foreign, &other_network);

    let gc = |valid: &[&Pod], extra: Value| {
        let attachments: Vec<Value> =
            valid.iter().map(|p| json!({ "containerID": p.container, "ifname": p.ifname })).collect();
        let mut keys = json!({ "cni.dev/valid-attachments": attachments });
        if let (Value::Object(keys), Value::Object(extra)) = (&mut keys, extra) {
            keys.extend(extra);
        }
        netconf_with(&ipam, "1.1.0", keys)
    };
    let runner = Pod::new("gc-runner");
    // Refused: without the list of valid attachments, and below spec 1.1.0.
    cni("GC", &runner, &netconf_with(&ipam, "1.1.0", json!({}))).error_naming(
        "GC without valid-attachments",
        INVALID_CONFIG,
        &["valid-attachments"],
    );
    let (code, _) =
        cni("GC", &runner, &netconf_with(&ipam, "1.0.0", json!({ "cni.dev/valid-attachments": [] })))
            .error("GC at 1.0.0");
    assert_eq!(code, 1);
    let untouched = [
        (&stale, &ips_stale[..]),
        (&valid, &ips_valid[..]),
        (&elsewhere, &ips_elsewhere[..]),
        (&foreign, &ips_foreign[..]),
    ];
    assert_ledger(&snapshot(&etcd, DEFAULT_PREFIX), &ledger_of(&untouched));

    cni("GC", &runner, &gc(&[&valid], json!({}))).silent("GC");
    // Released: node-a's allocation of this network that is not listed. Kept: the listed one,
    // node-b's, and the other network's.
    assert_ledger(&snapshot(&etcd, DEFAULT_PREFIX), &ledger_of(&untouched[1..]));
    // A GC on node-b for the other network (listing nothing) releases only the other network's
    // allocations of node-b: none.
    cni("GC", &runner.clone().on_node("node-b"), &gc(&[], json!({ "name": "other-net" })))
        .silent("GC other-net");
    assert_ledger(&snapshot(&etcd, DEFAULT_PREFIX), &ledger_of(&untouched[1..]));
    // The freed addresses are the lowest again.
    assert_eq!(add(&Pod::new("gc-next"), &conf), ips_stale);
}

#[test]
fn a_dual_range_add_is_all_or_nothing() {
    if !etcd_or_skip() {
        return;
    }
    let etcd = EtcdCluster::single();
    let conf = netconf(&with(&ipam(&etcd), "ipRanges", json!([{ "range": "198.51.100.0/30" }])));
    let first = Pod::new("aon-1");
    let second = Pod::new("aon-2");
    assert_eq!(add(&first, &conf), ["192.0.2.1/24", "198.51.100.1/30"]);
    assert_eq!(add(&second, &conf), ["192.0.2.2/24", "198.51.100.2/30"]);
    let full = [
        (&first, &["192.0.2.1/24", "198.51.100.1/30"][..]),
        (&second, &["192.0.2.2/24", "198.51.100.2/30"][..]),
    ];

    // The /30 is full: the ADD fails, and what it took in the /24 first is released again.
    let third = Pod::new("aon-3");
    cni("ADD", &third, &conf).error_naming("ADD into a full /30", INTERNAL, &["198.51.100.0-30"]);
    let snap = snapshot(&etcd, DEFAULT_PREFIX);
    assert_eq!(snap.addresses_of(&third.container), Vec::<String>::new());
    assert!(
        snap.reservations.values().all(|r| r.container_id != third.container && r.pod_ref != third.pod_ref()),
        "{:?}",
        snap.reservations
    );
    assert_ledger(&snap, &ledger_of(&full));
    // The runtime's DEL after the failed ADD is harmless, and the /24 address is free for others.
    del(&third, &conf);
    del(&first, &conf);
    assert_eq!(add(&third, &conf), ["192.0.2.1/24", "198.51.100.1/30"]);
    let now = [(&second, full[1].1), (&third, &["192.0.2.1/24", "198.51.100.1/30"][..])];
    assert_ledger(&snapshot(&etcd, DEFAULT_PREFIX), &ledger_of(&now));
}

#[test]
fn a_different_key_prefix_keeps_data_apart() {
    if !etcd_or_skip() {
        return;
    }
    let etcd = EtcdCluster::single();
    let default = netconf(&ipam(&etcd));
    let tenant = netconf(&with(&ipam(&etcd), "etcd_key_prefix", json!("/tenant-b/")));
    let p = Pod::new("prefix-p");
    let q = Pod::new("prefix-q");
    let lowest = FIRST;
    assert_eq!(add(&p, &default), lowest);
    // Another prefix is another store: its lowest addresses are free.
    assert_eq!(add(&q, &tenant), lowest);
    assert_ledger(&snapshot(&etcd, DEFAULT_PREFIX), &ledger_of(&[(&p, &lowest)]));
    assert_ledger(&snapshot(&etcd, "/tenant-b/"), &ledger_of(&[(&q, &lowest)]));
    let keys = all_keys(&etcd);
    assert_eq!(keys.len(), 8, "{keys:#?}");
    assert!(keys.iter().all(|k| k.starts_with(DEFAULT_PREFIX) || k.starts_with("/tenant-b/")), "{keys:#?}");

    // A DEL under one prefix does not touch the other.
    del(&p, &tenant);
    del(&q, &default);
    assert_ledger(&snapshot(&etcd, DEFAULT_PREFIX), &ledger_of(&[(&p, &lowest)]));
    assert_ledger(&snapshot(&etcd, "/tenant-b/"), &ledger_of(&[(&q, &lowest)]));
    del(&q, &tenant);
    assert_ledger(&snapshot(&etcd, "/tenant-b/"), &Ledger::new());
    assert_ledger(&snapshot(&etcd, DEFAULT_PREFIX), &ledger_of(&[(&p, &lowest)]));
}

/// The ledger check is not vacuous: it sees a stray reservation, a pool entry without its
/// reservation, an address held twice, and a successful ADD whose addresses are gone.
#[test]
fn the_ledger_check_sees_what_it_must() {
    if !etcd_or_skip() {
        return;
    }
    let etcd = EtcdCluster::single();
    let conf = netconf(&ipam(&etcd));
    let a = Pod::new("check-a");
    assert_eq!(add(&a, &conf), FIRST);
    let ledger = ledger_of(&[(&a, &FIRST)]);
    assert_ledger(&snapshot(&etcd, DEFAULT_PREFIX), &ledger);
    let rejects = |what: &str, ledger: &Ledger| {
        let snap = snapshot(&etcd, DEFAULT_PREFIX);
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| assert_ledger(&snap, ledger)));
        assert!(outcome.is_err(), "the ledger check missed {what}");
    };
    rejects(
        "a successful ADD whose addresses are gone",
        &ledger_of(&[(&a, &FIRST), (&Pod::new("x"), &SECOND)]),
    );
    rejects("addresses held by nobody in the ledger", &Ledger::new());

    let stray = "/whereabouts/reservations/192.0.2.7";
    etcd.etcdctl(&["put", stray, r#"{"podref":"etcd-store/stray","ifname":"net1","containerid":"stray"}"#]);
    rejects("a reservation without a pool entry", &ledger);
    etcd.etcdctl(&["del", stray]);
    etcd.etcdctl(&["del", "/whereabouts/reservations/192.0.2.1"]);
    rejects("a pool entry without its reservation", &ledger);
    // 192.0.2.1 held again in an overlapping pool (with its reservation back).
    let mut pool = raw_json(&etcd, "/whereabouts/pools/192.0.2.0-24");
    pool["range"] = json!(V4_HALF);
    etcd.etcdctl(&["put", "/whereabouts/pools/192.0.2.0-25", &pool.to_string()]);
    etcd.etcdctl(&[
        "put",
        "/whereabouts/reservations/192.0.2.1",
        &json!({ "podref": a.pod_ref(), "ifname": "net1", "containerid": a.container }).to_string(),
    ]);
    rejects("an address held twice", &ledger);
    etcd.etcdctl(&["del", "/whereabouts/pools/192.0.2.0-25"]);
    assert_ledger(&snapshot(&etcd, DEFAULT_PREFIX), &ledger);
}

// ---------------------------------------------------------------------------------------------
// 2. TLS, credentials, and no etcd

#[test]
fn tls_with_client_certificates() {
    if !etcd_or_skip() {
        return;
    }
    let etcd = EtcdCluster::single_tls(true);
    let ipam = ipam(&etcd);
    let a = Pod::new("tls-a");
    let b = Pod::new("tls-b");
    // `etcd_host` without a scheme gets https:// because TLS files are configured; with one, too.
    assert_eq!(add(&a, &netconf(&ipam)), FIRST);
    assert!(etcd.endpoints_csv().starts_with("https://"));
    let with_scheme = netconf(&with(&ipam, "etcd_host", json!(etcd.endpoints_csv())));
    assert_eq!(add(&b, &with_scheme), SECOND);
    let both = ledger_of(&[(&a, &FIRST), (&b, &SECOND)]);
    assert_ledger(&snapshot(&etcd, DEFAULT_PREFIX), &both);

    // Every refusal below is an error answer (the ledger is unchanged after them).
    let broken = Pod::new("tls-broken");
    let refused = |what: &str, ipam: &Value| cni("ADD", &broken, &netconf(ipam)).error(what);
    // A missing or non-PEM file: invalid configuration naming the key.
    let missing = etcd.dir().join("missing.pem");
    let garbage = etcd.dir().join("garbage.pem");
    std::fs::write(&garbage, "this is not a certificate\n").expect("write garbage.pem");
    for key in ["etcd_ca_cert_file", "etcd_cert_file", "etcd_key_file"] {
        for file in [&missing, &garbage] {
            let what = format!("ADD with {key} = {}", file.display());
            cni("ADD", &broken, &netconf(&with(&ipam, key, json!(file)))).error_naming(
                &what,
                INVALID_CONFIG,
                &[key],
            );
        }
        // A certificate without its key, or a key without its certificate, names the missing one.
        if key != "etcd_ca_cert_file" {
            cni("ADD", &broken, &netconf(&without(&ipam, &[key]))).error_naming(
                &format!("ADD without {key}"),
                INVALID_CONFIG,
                &[key],
            );
        }
    }
    // Without a client certificate etcd refuses the connection; trusting another CA, the plugin
    // refuses etcd. Both are configuration mistakes a retry would not fix: code 7 naming the key.
    let foreign_ca = etcd.tls_files().expect("TLS files").foreign_ca.clone();
    let no_client_cert = without(&ipam, &["etcd_cert_file", "etcd_key_file"]);
    for (what, ipam, key) in [
        ("no client certificate", no_client_cert, "etcd_cert_file"),
        ("a foreign CA", with(&ipam, "etcd_ca_cert_file", json!(foreign_ca)), "etcd_ca_cert_file"),
    ] {
        let (code, msg) = refused(&format!("ADD with {what}"), &ipam);
        assert!(code == INVALID_CONFIG && msg.contains(key), "ADD with {what}: code {code}: {msg}");
    }
    assert_ledger(&snapshot(&etcd, DEFAULT_PREFIX), &both);

    del(&a, &netconf(&ipam));
    del(&b, &with_scheme);
    assert_ledger(&snapshot(&etcd, DEFAULT_PREFIX), &Ledger::new());
}

#[test]
fn user_and_password() {
    if !etcd_or_skip() {
        return;
    }
    let mut etcd = EtcdCluster::single();
    etcd.enable_auth("whereabouts", "s3cret");
    let ipam = ipam(&etcd);
    let a = Pod::new("auth-a");
    assert_eq!(add(&a, &netconf(&ipam)), FIRST);

    // Wrong or missing credentials: invalid configuration naming etcd_username. A DEL refused so
    // answers done (a retry cannot cure it, and the pod must be able to go) and leaves the entry.
    let anonymous = without(&ipam, &["etcd_username", "etcd_password"]);
    let refusals = [
        ("a wrong password", with(&ipam, "etcd_password", json!("wrong"))),
        ("an unknown user", with(&ipam, "etcd_username", json!("nobody"))),
        ("no credentials", anonymous.clone()),
        ("only a password", with(&anonymous, "etcd_password", json!("s3cret"))),
    ];
    for (what, ipam) in &refusals {
        cni("ADD", &Pod::new("auth-refused"), &netconf(ipam)).error_naming(
            &format!("ADD with {what}"),
            INVALID_CONFIG,
            &["etcd_username"],
        );
        cni("DEL", &a, &netconf(ipam)).silent(&format!("DEL with {what}"));
    }

    // A user that may only read: its writes are refused, a configuration problem naming the user.
    let root = etcd_support::Credentials { user: "root".into(), password: "s3cret".into() };
    for args in [
        &["role", "add", "reader-ro"][..],
        &["role", "grant-permission", "reader-ro", "read", "/", "--prefix=true"],
        &["user", "add", "reader:r3ad", "--interactive=false"],
        &["user", "grant-role", "reader", "reader-ro"],
    ] {
        etcd_support::run(etcd.etcdctl_command_as(&root).args(args)).expect("etcdctl as root");
    }
    let reader = with(&with(&ipam, "etcd_username", json!("reader")), "etcd_password", json!("r3ad"));
    cni("ADD", &Pod::new("auth-reader"), &netconf(&reader)).error_naming(
        "ADD by a read-only user",
        INVALID_CONFIG,
        &["etcd_username", "reader"],
    );

    assert_ledger(&snapshot(&etcd, DEFAULT_PREFIX), &ledger_of(&[(&a, &FIRST)]));
    del(&a, &netconf(&ipam));
    assert_ledger(&snapshot(&etcd, DEFAULT_PREFIX), &Ledger::new());
}

/// Credentials for a cluster without authentication are not an error (upstream's client ignores
/// them too).
#[test]
fn credentials_for_a_cluster_without_auth_are_ignored() {
    if !etcd_or_skip() {
        return;
    }
    let etcd = EtcdCluster::single();
    let ipam = with(&with(&ipam(&etcd), "etcd_username", json!("someone")), "etcd_password", json!("pw"));
    let a = Pod::new("noauth-a");
    assert_eq!(add(&a, &netconf(&ipam)), FIRST);
    del(&a, &netconf(&ipam));
    assert_ledger(&snapshot(&etcd, DEFAULT_PREFIX), &Ledger::new());
}

/// A port on 127.0.0.1 that nothing listens on (free a moment ago).
fn dead_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local address").port()
}

#[test]
fn no_etcd_is_try_again_later_naming_etcd_host() {
    // Nothing listens: refused at once.
    let refused = format!("127.0.0.1:{}", dead_port());
    // Something accepts connections but never answers (a hung etcd).
    let silent = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1:0");
    let silent_host = format!("127.0.0.1:{}", silent.local_addr().expect("local address").port());
    // The plugin keeps trying until its call's budget (2 s here) is spent, then answers; a silent
    // endpoint costs one 5 s connect timeout first.
    let cases = [(&refused, &["ADD", "DEL"][..], 2, 5), (&silent_host, &["ADD"][..], 2, 12)];
    for (host, commands, budget, bound) in cases {
        for command in commands {
            let started = Instant::now();
            let what = format!("{command} with etcd_host {host}");
            let netconf = netconf(&ipam_at(host));
            run_plugin_within(command, &Pod::new("no-etcd"), &netconf, None, budget).error_naming(
                &what,
                TRY_AGAIN,
                &["etcd_host", host],
            );
            let elapsed = started.elapsed();
            eprintln!("{what}: answered after {elapsed:.1?}");
            assert!(elapsed >= Duration::from_secs(budget) / 2, "{what}: gave up after {elapsed:?}");
            assert!(elapsed < Duration::from_secs(bound), "{what}: answered after {elapsed:?}");
        }
    }
    drop(silent);
}

// ---------------------------------------------------------------------------------------------
// 3. Faults in the middle of bursts, each followed by the exact ledger check

/// A burst of 16 workers over the two overlapping ranges of `etcd`, running until the fault stops it.
fn fault_burst(tag: &'static str, etcd: &EtcdCluster) -> Burst {
    Burst {
        tag,
        netconfs: overlapping_netconfs(etcd),
        workers: 16,
        rounds: 1000,
        kill_window: None,
        unavailability_expected: true,
    }
}

#[test]
fn single_member_restarted_mid_burst() {
    if !etcd_or_skip() {
        return;
    }
    let mut etcd = EtcdCluster::single();
    let burst = fault_burst("restart", &etcd);
    let progress = burst.run(|progress| {
        progress.wait_until("16 ADDs before the outage", |p| p.adds_ok() >= 16);
        // A crash, down until an ADD has failed on it (at most 3 s): calls meanwhile answer 11.
        etcd.kill(0);
        let failed = progress.adds_failed();
        progress.wait_at_most(Duration::from_secs(3), "an ADD failing during the outage", |p| {
            p.adds_failed() > failed
        });
        etcd.restart(0);
        let answered = progress.adds_ok();
        progress.wait_until("16 ADDs after the restart", |p| p.adds_ok() >= answered + 16);
        // A quick full stop and start, calls in flight.
        etcd.stop_all_and_restart();
        let answered = progress.adds_ok();
        progress.wait_until("16 ADDs after the second restart", |p| p.adds_ok() >= answered + 16);
        progress.stop();
    });
    repair_then_assert_ledger(&etcd, &progress.into_ledger());
}

#[test]
fn three_member_cluster_loses_its_leader_mid_burst() {
    if !etcd_or_skip() {
        return;
    }
    let mut etcd = EtcdCluster::cluster(3);
    let burst = fault_burst("cluster", &etcd);
    let progress = burst.run(|progress| {
        progress.wait_until("16 ADDs before the kill", |p| p.adds_ok() >= 16);
        let leader = etcd.wait_for_leader();
        etcd.kill(leader);
        // Two of three members keep serving: ADDs go on succeeding (though about one in three
        // fails with 11: `one_dead_member_of_three_fails_no_call`).
        let answered = progress.adds_ok();
        progress.wait_until("24 ADDs with one member down", |p| p.adds_ok() >= answered + 24);
        etcd.restart(leader);
        let answered = progress.adds_ok();
        progress.wait_until("16 ADDs after the member's restart", |p| p.adds_ok() >= answered + 16);
        progress.stop();
    });
    repair_then_assert_ledger(&etcd, &progress.into_ledger());
}

/// How long an ADD (and its DEL) takes on `netconf` when nothing else runs: the slowest of three.
fn solo_add_time(netconf: &str) -> Duration {
    let pod = Pod::new("calibration");
    (0..3)
        .map(|_| {
            let started = Instant::now();
            add(&pod, netconf);
            let elapsed = started.elapsed();
            del(&pod, netconf);
            elapsed
        })
        .max()
        .unwrap_or_default()
}

#[test]
fn plugin_processes_killed_mid_transaction() {
    if !etcd_or_skip() {
        return;
    }
    let etcd = EtcdCluster::single();
    let netconfs = overlapping_netconfs(&etcd);
    // Kills land anywhere from exec to well after the last write, under the burst's load.
    let window = solo_add_time(&netconfs[0]) * 4;
    eprintln!("sigkill: kill window {window:?}");
    let burst = Burst {
        tag: "sigkill",
        netconfs,
        workers: 16,
        rounds: 10,
        kill_window: Some(window),
        unavailability_expected: false,
    };
    let progress = burst.run(|_| {});
    let kills = progress.kills.load(Ordering::SeqCst);
    assert!(kills >= 10, "too few processes were killed (window {window:?}): {}", progress.summary());
    repair_then_assert_ledger(&etcd, &progress.into_ledger());
}

// ---------------------------------------------------------------------------------------------
// 4. Many processes on one pool

#[test]
fn many_concurrent_processes_on_one_pool() {
    if !etcd_or_skip() {
        return;
    }
    let etcd = EtcdCluster::single();
    let burst = Burst {
        tag: "crowd",
        netconfs: vec![netconf(&ipam(&etcd))],
        workers: 32,
        rounds: 3,
        kill_window: None,
        unavailability_expected: false,
    };
    let progress = burst.run(|_| {});
    assert_eq!(progress.adds_ok(), 32 * 3, "{}", progress.summary());
    assert_ledger(&snapshot(&etcd, DEFAULT_PREFIX), &progress.into_ledger());
}

// ---------------------------------------------------------------------------------------------
// Hung and frozen members, dead members, untrusted certificates

/// Sends `signal` (`STOP`, `CONT`) to member `i` of `etcd`.
fn signal(etcd: &EtcdCluster, i: usize, signal: &str) {
    let pid = etcd.pid(i).expect("the member runs");
    let status =
        Command::new("kill").arg(format!("-{signal}")).arg(pid.to_string()).status().expect("run kill");
    assert!(status.success(), "kill -{signal} {pid}: {status}");
}

/// A frozen etcd (SIGSTOP): the read times out after 5 s, which is "try again later", not an I/O
/// failure (tonic reports its timeout as `Cancelled`).
#[test]
fn a_request_timeout_is_try_again_later() {
    if !etcd_or_skip() {
        return;
    }
    let etcd = EtcdCluster::single();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let (result, elapsed) = runtime.block_on(async {
        let store = EtcdStore::connect(&settings(&etcd, DEFAULT_PREFIX)).await.expect("connect");
        signal(&etcd, 0, "STOP");
        let started = Instant::now();
        let result = store.read_pool("192.0.2.0-24").await;
        signal(&etcd, 0, "CONT");
        (result, started.elapsed())
    });
    assert!(matches!(result, Err(StoreError::Unavailable(_))), "after {elapsed:.1?}: {result:?}");
}

/// Reproduction: a three-member cluster with one follower killed (the other two are a healthy
/// quorum), `etcd_host` naming all three: about one ADD in three fails with code 11 "etcd cannot be
/// reached: tcp connect error" to the dead member. etcd-client's balanced channel does not route
/// around an endpoint that refuses connections (etcdv3/etcd-client#39); upstream's Go client does.
#[test]
fn one_dead_member_of_three_fails_no_call() {
    if !etcd_or_skip() {
        return;
    }
    let mut etcd = EtcdCluster::cluster(3);
    let follower = (etcd.wait_for_leader() + 1) % 3;
    etcd.kill(follower);
    etcd.wait_for_leader();
    let conf = netconf(&ipam(&etcd));
    let failures: Vec<String> = (0..12)
        .filter_map(|i| match cni("ADD", &Pod::new(format!("one-down-{i}")), &conf) {
            Outcome::Success(_) => None,
            other => Some(format!("ADD {i}: {other:?}")),
        })
        .collect();
    assert!(failures.is_empty(), "{} of 12 ADDs failed:\n{}", failures.len(), failures.join("\n"));
}

/// Reproduction: a TLS etcd whose server certificate the configured CA did not sign. The answer is
/// code 11 "etcd_host ...: etcd cannot be reached: invalid peer certificate: UnknownIssuer", so a
/// runtime retries a configuration mistake for ever; the store means TLS failures to be code 7 (see
/// `classify` in `EtcdStore::connect`), but a handshake failure is a transport error, which counts
/// as transient first.
#[test]
fn an_untrusted_server_certificate_is_a_configuration_error() {
    if !etcd_or_skip() {
        return;
    }
    let etcd = EtcdCluster::single_tls(true);
    let foreign_ca = &etcd.tls_files().expect("TLS files").foreign_ca;
    cni("ADD", &Pod::new("untrusted"), &netconf(&with(&ipam(&etcd), "etcd_ca_cert_file", json!(foreign_ca))))
        .error_naming("ADD trusting another CA", INVALID_CONFIG, &["etcd_ca_cert_file"]);
}

/// Reproduction: with TLS configured, an endpoint that accepts the TCP connection but never
/// answers (a frozen etcd: SIGSTOP, a hung host behind a live kernel) is never given up on: the plugin
/// blocks for good (seen: still waiting after 10 minutes). Without TLS the same endpoint gets code 11
/// after the 5 s connect timeout (`no_etcd_is_try_again_later_naming_etcd_host`), so the connect
/// timeout does not cover the TLS handshake.
#[test]
fn a_hung_tls_endpoint_is_try_again_later() {
    // No etcd needed: valid PEM files and a listener that never answers.
    let dir = tempfile::tempdir().expect("tempdir");
    let tls = etcd_support::tls::generate(dir.path());
    let silent = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1:0");
    let host = format!("127.0.0.1:{}", silent.local_addr().expect("local address").port());
    let mut ipam = ipam_at(&host);
    ipam["etcd_ca_cert_file"] = json!(tls.ca);
    ipam["etcd_cert_file"] = json!(tls.client_cert);
    ipam["etcd_key_file"] = json!(tls.client_key);
    let started = Instant::now();
    let outcome =
        run_plugin_within("ADD", &Pod::new("hung-tls"), &netconf(&ipam), Some(Duration::from_secs(15)), 2);
    let elapsed = started.elapsed();
    assert!(!matches!(outcome, Outcome::Killed), "no answer within {elapsed:.1?}");
    outcome.error_naming("ADD with a hung TLS endpoint", TRY_AGAIN, &["etcd_host", &host]);
    drop(silent);
}

/// The pool write itself is a compare-and-swap on etcd: creating an existing pool and writing with a
/// stale version are both refused.
#[test]
fn pool_writes_are_compare_and_swap() {
    if !etcd_or_skip() {
        return;
    }
    let etcd = EtcdCluster::single();
    let settings = settings(&etcd, "/cas/");
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    runtime.block_on(async {
        let (first, second) = (
            EtcdStore::connect(&settings).await.expect("connect"),
            EtcdStore::connect(&settings).await.expect("connect"),
        );
        let spec = whereabouts_core::pool::PoolSpec {
            range: V4.into(),
            allocations: Default::default(),
            ..Default::default()
        };
        let created = first.write_pool("p", &spec, None, None).await.expect("create");
        assert_eq!(second.write_pool("p", &spec, None, None).await, Err(StoreError::Conflict));
        let read = second.read_pool("p").await.expect("read").expect("exists");
        assert_eq!(read.version, created);
        second.write_pool("p", &spec, Some(&read), None).await.expect("write at the read version");
        assert_eq!(first.write_pool("p", &spec, Some(&read), None).await, Err(StoreError::Conflict));
    });
}

#[test]
fn reservations_are_deleted_only_as_read() {
    if !etcd_or_skip() {
        return;
    }
    let etcd = EtcdCluster::single();
    let settings = settings(&etcd, "/cad/");
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    runtime.block_on(async {
        let store = EtcdStore::connect(&settings).await.expect("connect");
        let owner = Reservation { pod_ref: "ns/a".into(), ifname: "eth0".into(), container_id: "a-1".into() };
        let new_sandbox = Reservation { container_id: "a-2".into(), ..owner.clone() };
        store.create_reservation("192.0.2.1", &owner).await.expect("create");
        let first = store.read_reservation("192.0.2.1").await.expect("read").expect("exists");
        store.create_reservation("192.0.2.1", &new_sandbox).await.expect("take over");
        let taken_over = store.read_reservation("192.0.2.1").await.expect("read").expect("exists");
        assert_eq!(taken_over.holder, new_sandbox);
        assert_eq!(store.delete_reservation("192.0.2.1", &first.version).await, Ok(Deletion::Changed));
        assert_eq!(store.delete_reservation("192.0.2.1", &taken_over.version).await, Ok(Deletion::Deleted));
        assert_eq!(store.read_reservation("192.0.2.1").await, Ok(None));
        assert_eq!(store.delete_reservation("192.0.2.1", &taken_over.version).await, Ok(Deletion::Deleted));
        // Created again with the same content, it is a new state: the old reading no longer matches.
        store.create_reservation("192.0.2.1", &new_sandbox).await.expect("create again");
        assert_eq!(store.delete_reservation("192.0.2.1", &taken_over.version).await, Ok(Deletion::Changed));
        assert_eq!(store.list_reservations().await.expect("list").len(), 1);
    });
}

/// Engines that do not share a node-local lock (as on different nodes) meet only in etcd's
/// compare-and-swap: many of them at once on one dual-stack pool never hand out an address twice.
#[test]
fn engines_on_different_nodes_never_duplicate() {
    if !etcd_or_skip() {
        return;
    }
    const NODES: usize = 8;
    const PODS_PER_NODE: usize = 5;
    let etcd = EtcdCluster::single();
    let settings = settings(&etcd, DEFAULT_PREFIX);
    let config = whereabouts_core::config::load(&ipam(&etcd), None, &Default::default()).expect("config");
    let config = std::sync::Arc::new(config);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let answered: Vec<(String, Vec<String>)> = runtime.block_on(async {
        let mut tasks = Vec::new();
        for node in 0..NODES {
            let (settings, config) = (settings.clone(), config.clone());
            let lock_dir = tempfile::tempdir().expect("lock dir");
            tasks.push(tokio::spawn(async move {
                let store =
                    EtcdStore::connect(&settings).await.expect("connect").with_lock_dir(lock_dir.path());
                let ipam = whereabouts_store::ipam::Ipam::new(&store);
                let mut answered = Vec::new();
                for pod in 0..PODS_PER_NODE {
                    let container = format!("node{node}-pod{pod}");
                    let owner = whereabouts_core::pool::Owner {
                        container_id: container.clone(),
                        pod_ref: Some(format!("{NAMESPACE}/{container}")),
                        ifname: "eth0".into(),
                        node: Some(format!("node-{node}")),
                        cni_network: Some(NETWORK.into()),
                        pod_uid: None,
                        statefulset: None,
                        ipam_claim: None,
                    };
                    let allocated = ipam.allocate(&config, &owner).await.expect("allocate");
                    let addresses =
                        allocated.iter().map(|a| format!("{}/{}", a.ip, a.network.prefix_len())).collect();
                    answered.push((container, addresses));
                }
                drop(lock_dir);
                answered
            }));
        }
        let mut answered = Vec::new();
        for task in tasks {
            answered.extend(task.await.expect("task"));
        }
        answered
    });
    let ledger: Ledger = answered.into_iter().collect();
    assert_eq!(ledger.len(), NODES * PODS_PER_NODE);
    assert_ledger(&snapshot(&etcd, DEFAULT_PREFIX), &ledger);
}

/// `release_cooldown` on etcd: the release time is stored in the pool's value beside upstream's spec
/// fields, by the DEL's own transaction, and the next ADD passes the address over.
#[test]
fn a_released_address_cools_down_in_the_pool_value() {
    if !etcd_or_skip() {
        return;
    }
    let etcd = EtcdCluster::single();
    let conf = netconf(&with(&without(&ipam(&etcd), &["ipRanges"]), "release_cooldown", json!("1h")));
    let first = Pod::new("cool-a");
    assert_eq!(add(&first, &conf), ["192.0.2.1/24"]);
    del(&first, &conf);
    let stored = raw_json(&etcd, &format!("{DEFAULT_PREFIX}pools/192.0.2.0-24"));
    assert_eq!(stored["allocations"], json!({}), "{stored}");
    assert!(stored["cooldowns"]["1"].as_u64().is_some(), "{stored}");
    assert_eq!(add(&Pod::new("cool-b"), &conf), ["192.0.2.2/24"], "the released .1 cools down");
}
