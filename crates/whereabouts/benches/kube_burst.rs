//! Bursts of pod starts on one pool through the Kubernetes store, one plugin process per call as the
//! kubelets would exec them:
//! * 200 pods on 1 node, all at once;
//! * 200 pods over 10 nodes (20 each), all at once;
//! * 1000 pods over 20 nodes (50 each), 5 at a time per node (100 at once);
//! * 20 pods one after another (sequential latency);
//!
//! each followed by the DELs of the same pods the same way. Baseline measured in the same run: the
//! same calls through `upstream-whereabouts`, which serialises every update in the cluster through the
//! Lease `whereabouts` as upstream does (same process contract, same pool objects).
//!
//! Targets: against the in-process fake API server with its calibrated costs
//! ([`FakeOptions::calibrated`]: per request, per write growing with the object's size, writes to one
//! object serialised), and against a real cluster when `WHEREABOUTS_TEST_KUBECONFIG` names its
//! kubeconfig; each printed row names its target. Every configuration runs in a fresh fake or
//! namespace. After each burst the IPPool is read back: every answered address must be held by its
//! pod ("lost" otherwise), no address answered twice or held by another pod ("dup"), and no entry may
//! be held for an ADD that failed ("stored for failed"); after the DELs the pool must be empty
//! ("leftover"). Any of them, or any failed call, fails the run. ADDs/s counts successful ADDs over the
//! burst's wall time (first spawn to last exit); the ratio is ours over the baseline's throughput in
//! the same target and run.
//!
//! Run with `cargo bench -p whereabouts --bench kube_burst`; `WHEREABOUTS_BENCH_SKIP_BASELINE_1000=1`
//! skips the slowest row (the baseline's 1000 pods), `WHEREABOUTS_BENCH_OURS_ONLY=1` every baseline
//! row and the fake when a real cluster is named (for quick turns while tuning), and
//! `WHEREABOUTS_BENCH_ONLY=<text>` runs only the rows whose label contains it (`"from 10 nodes"`).

#![allow(clippy::print_stdout, reason = "a benchmark reports on stdout")]

use std::collections::BTreeMap;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use serde_json::{Value, json};
use tempfile::TempDir;
use whereabouts_core::pool::Pool;
use whereabouts_core::range::pool_name;
use whereabouts_k8s::crd::{IPPool, crds};
use whereabouts_k8s::k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use whereabouts_k8s::kube::api::PostParams;
use whereabouts_k8s::kube::{Api, Client};
use whereabouts_kube_testing::{FakeApiServer, FakeOptions, TestCluster, binaries};

const RANGE: &str = "10.70.0.0/20";
const NETWORK: &str = "burst";
const NAMESPACE: &str = "kube-system";

/// How the pods of one row start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Scenario {
    nodes: usize,
    pods_per_node: usize,
    /// Calls in flight at once per node (the kubelet's parallel pod starts).
    per_node: usize,
    /// The wall time the ADDs must stay within, if any.
    target: Option<Duration>,
}

const SCENARIOS: [Scenario; 4] = [
    Scenario { nodes: 1, pods_per_node: 200, per_node: 200, target: Some(Duration::from_millis(1500)) },
    Scenario { nodes: 10, pods_per_node: 20, per_node: 20, target: Some(Duration::from_millis(1500)) },
    Scenario { nodes: 20, pods_per_node: 50, per_node: 5, target: Some(Duration::from_secs(27)) },
    Scenario { nodes: 1, pods_per_node: 20, per_node: 1, target: None },
];

/// The throughput ratio over the Lease-serialised baseline that the concurrent rows must reach.
const RATIO_TARGET: f64 = 10.0;

impl Scenario {
    fn label(self) -> String {
        match (self.nodes, self.per_node) {
            (_, 1) => format!("{} sequential", self.pods()),
            (1, _) => format!("{} from 1 node", self.pods()),
            (nodes, per_node) if per_node == self.pods_per_node => {
                format!("{} from {nodes} nodes", self.pods())
            }
            (nodes, per_node) => format!("{} from {nodes} nodes, {per_node}/node", self.pods()),
        }
    }

    fn pods(self) -> usize {
        self.nodes * self.pods_per_node
    }
}

/// Which plugin answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Implementation {
    Ours,
    Upstream,
}

impl Implementation {
    fn label(self) -> &'static str {
        match self {
            Implementation::Ours => "ours",
            Implementation::Upstream => "upstream (Lease)",
        }
    }

    fn program(self) -> PathBuf {
        match self {
            Implementation::Ours => PathBuf::from(env!("CARGO_BIN_EXE_whereabouts")),
            Implementation::Upstream => binaries::upstream_whereabouts(),
        }
    }
}

/// Where the calls go: a fresh fake, or a fresh namespace of a real cluster.
enum Target {
    Fake { server: FakeApiServer, client: Client, kubeconfig: PathBuf, _dir: TempDir },
    Real(TestCluster),
}

impl Target {
    /// A fake API server with its calibrated costs and the whereabouts CRDs installed; the calls use
    /// its `kube-system`.
    async fn start_fake() -> Target {
        let server = FakeApiServer::start_with(FakeOptions::calibrated());
        let dir = tempfile::tempdir().expect("tempdir");
        let kubeconfig = dir.path().join("kubeconfig");
        let config: Value = serde_json::from_str(&server.kubeconfig(NAMESPACE)).expect("kubeconfig JSON");
        std::fs::write(&kubeconfig, config.to_string()).expect("write kubeconfig");
        let client =
            whereabouts_k8s::client::connect(&kubeconfig, whereabouts_k8s::client::Timeouts::REQUESTS)
                .await
                .expect("client of the fake")
                .client;
        let api: Api<CustomResourceDefinition> = Api::all(client.clone());
        for crd in crds() {
            api.create(&PostParams::default(), &crd).await.expect("install CRD");
        }
        Target::Fake { server, client, kubeconfig, _dir: dir }
    }

    fn client(&self) -> Client {
        match self {
            Target::Fake { client, .. } => client.clone(),
            Target::Real(cluster) => cluster.client(),
        }
    }

    fn namespace(&self) -> &str {
        match self {
            Target::Fake { .. } => NAMESPACE,
            Target::Real(cluster) => cluster.namespace(),
        }
    }

    fn kubeconfig(&self) -> &Path {
        match self {
            Target::Fake { kubeconfig, .. } => kubeconfig,
            Target::Real(cluster) => cluster.kubeconfig_path(),
        }
    }

    fn fake(&self) -> Option<&FakeApiServer> {
        match self {
            Target::Fake { server, .. } => Some(server),
            Target::Real(_) => None,
        }
    }

    async fn cleanup(self) {
        if let Target::Real(cluster) = self {
            cluster.cleanup().await;
        }
    }
}

/// One pod: its container, name and node.
struct Pod {
    container: String,
    name: String,
    node: usize,
}

/// How one call ended and how long it took.
struct Call {
    started: Instant,
    took: Duration,
    /// The answered address (ADD) or nothing (DEL); the failure otherwise.
    result: Result<Option<IpAddr>, String>,
}

/// Runs the plugins of one configuration.
struct Runner<'a> {
    program: PathBuf,
    target: &'a Target,
    /// On a real cluster our plugins log at debug level here, to count their lost races.
    logs: Option<TempDir>,
}

impl Runner<'_> {
    fn config(&self, pod: &Pod) -> String {
        let mut ipam = json!({
            "type": "whereabouts",
            "datastore": "kubernetes",
            "kubernetes": { "kubeconfig": self.target.kubeconfig() },
            "range": RANGE,
            "network_name": NETWORK,
            "log_level": "error",
        });
        if let Some(dir) = &self.logs {
            ipam["log_level"] = "debug".into();
            ipam["log_file"] = dir.path().join(format!("{}.log", pod.container)).to_string_lossy().into();
        }
        json!({ "cniVersion": "1.0.0", "name": "burst-net", "type": "macvlan", "ipam": ipam }).to_string()
    }

    fn call(&self, command: &str, pod: &Pod) -> Call {
        let started = Instant::now();
        let mut child = Command::new(&self.program)
            .env_clear()
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &pod.container)
            .env("CNI_NETNS", format!("/var/run/netns/{}", pod.container))
            .env("CNI_IFNAME", "net1")
            .env("CNI_PATH", "/opt/cni/bin")
            .env(
                "CNI_ARGS",
                format!(
                    "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={}",
                    self.target.namespace(),
                    pod.name
                ),
            )
            .env("NODENAME", format!("node-{}", pod.node))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the plugin");
        child.stdin.take().expect("stdin").write_all(self.config(pod).as_bytes()).expect("write stdin");
        let output = child.wait_with_output().expect("wait for the plugin");
        let took = started.elapsed();
        let stdout = String::from_utf8_lossy(&output.stdout);
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            return Call { started, took, result: Err(format!("{}: {stdout} {stderr}", output.status)) };
        }
        if command == "DEL" {
            return Call { started, took, result: Ok(None) };
        }
        let address = serde_json::from_str::<Value>(&stdout)
            .ok()
            .and_then(|v| v["ips"][0]["address"].as_str().and_then(|a| a.parse::<IpNet>().ok()));
        match address {
            Some(address) => Call { started, took, result: Ok(Some(address.addr())) },
            None => Call { started, took, result: Err(format!("no address in {stdout}")) },
        }
    }

    /// Runs one call per pod, `scenario.per_node` at a time on each node, every node at once; returns
    /// the calls in the order of `pods`, the wall time of the whole burst (from the first spawn to the
    /// last exit) and the CPU time the machine spent meanwhile (every process: the plugins, the API
    /// server or the fake, etcd).
    fn burst(&self, command: &str, pods: &[Pod], scenario: Scenario) -> (Vec<Call>, Duration, Duration) {
        let workers: Vec<Vec<usize>> = (0..scenario.nodes)
            .flat_map(|node| {
                let on_node: Vec<usize> = (0..pods.len()).filter(|i| pods[*i].node == node).collect();
                (0..scenario.per_node)
                    .map(move |w| on_node.iter().copied().skip(w).step_by(scenario.per_node).collect())
                    .collect::<Vec<Vec<usize>>>()
            })
            .collect();
        let start = Barrier::new(workers.len());
        let cpu_before = machine_cpu();
        let mut calls: Vec<(usize, Call)> = std::thread::scope(|scope| {
            let handles: Vec<_> = workers
                .iter()
                .map(|mine| {
                    let start = &start;
                    scope.spawn(move || {
                        start.wait();
                        mine.iter().map(|i| (*i, self.call(command, &pods[*i]))).collect::<Vec<_>>()
                    })
                })
                .collect();
            handles.into_iter().flat_map(|h| h.join().expect("call thread")).collect()
        });
        let cpu = machine_cpu().saturating_sub(cpu_before);
        calls.sort_by_key(|(i, _)| *i);
        let calls: Vec<Call> = calls.into_iter().map(|(_, call)| call).collect();
        let first = calls.iter().map(|c| c.started).min().expect("calls");
        let last = calls.iter().map(|c| c.started + c.took).max().expect("calls");
        (calls, last - first, cpu)
    }

    /// Lost races of ours according to the debug logs (a real cluster only); they accumulate
    /// over the phases, so this is read once per phase and differences are taken.
    fn logged_retries(&self) -> Option<u64> {
        let dir = self.logs.as_ref()?;
        let mut retries = 0;
        for entry in std::fs::read_dir(dir.path()).expect("log dir").flatten() {
            let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
            retries += text.matches("conflict on attempt").count() as u64;
        }
        Some(retries)
    }
}

/// The CPU time this machine's processors spent busy since boot (user, nice, system, irq and softirq
/// time of `/proc/stat`, counted in the fixed 100 Hz ticks of the kernel's user ABI).
fn machine_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/stat").expect("/proc/stat");
    let ticks: u64 = stat
        .lines()
        .next()
        .and_then(|all| all.strip_prefix("cpu "))
        .map(|fields| {
            let fields: Vec<u64> = fields.split_whitespace().filter_map(|f| f.parse().ok()).collect();
            // user, nice, system, (idle, iowait), irq, softirq
            [0, 1, 2, 5, 6].iter().filter_map(|i| fields.get(*i)).sum()
        })
        .expect("the machine's line of /proc/stat");
    Duration::from_millis(ticks * 10)
}

/// The measurements of one row.
struct Row {
    backend: String,
    implementation: Implementation,
    scenario: Scenario,
    add_wall: Duration,
    add_p50: Duration,
    add_p99: Duration,
    /// The machine's CPU time during the ADDs.
    add_cpu: Duration,
    retries: Option<u64>,
    failed: usize,
    duplicates: usize,
    lost: usize,
    stored_for_failed: usize,
    del_wall: Duration,
    del_failed: usize,
    left_in_pool: usize,
}

impl Row {
    fn adds_per_second(&self) -> f64 {
        (self.scenario.pods() - self.failed) as f64 / self.add_wall.as_secs_f64()
    }

    fn broken(&self) -> bool {
        self.failed
            + self.del_failed
            + self.duplicates
            + self.lost
            + self.stored_for_failed
            + self.left_in_pool
            > 0
    }
}

fn percentile(samples: &[Duration], p: f64) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort();
    sorted.get(((sorted.len() as f64 - 1.0) * p).round() as usize).copied().unwrap_or_default()
}

/// The pool as stored: address -> container.
async fn pool_holders(target: &Target) -> BTreeMap<IpAddr, String> {
    let range: IpNet = RANGE.parse().expect("range");
    let pools: Api<IPPool> = Api::namespaced(target.client(), target.namespace());
    let Some(stored) = pools.get_opt(&pool_name(NETWORK, None, &range)).await.expect("read IPPool") else {
        return BTreeMap::new();
    };
    let (pool, _) = Pool::from_spec(&stored.spec.pool, range).expect("decode IPPool");
    pool.iter().map(|(ip, a)| (ip, a.container_id.clone())).collect()
}

/// Answers checked against the pool: (addresses answered to two pods or held by another pod, answered
/// addresses the pool does not hold, entries held for ADDs that failed).
fn audit(pods: &[Pod], calls: &[Call], holders: &BTreeMap<IpAddr, String>) -> (usize, usize, usize) {
    let mut answered: BTreeMap<IpAddr, usize> = BTreeMap::new();
    let (mut duplicates, mut lost) = (0, 0);
    let failed: std::collections::BTreeSet<&str> = pods
        .iter()
        .zip(calls)
        .filter(|(_, call)| call.result.is_err())
        .map(|(pod, _)| pod.container.as_str())
        .collect();
    let stored_for_failed = holders.values().filter(|holder| failed.contains(holder.as_str())).count();
    for (pod, call) in pods.iter().zip(calls) {
        let Ok(Some(ip)) = call.result else { continue };
        *answered.entry(ip).or_default() += 1;
        match holders.get(&ip) {
            None => lost += 1,
            Some(holder) if *holder != pod.container => duplicates += 1,
            Some(_) => {}
        }
    }
    duplicates += answered.values().map(|n| n - 1).sum::<usize>();
    (duplicates, lost, stored_for_failed)
}

fn failures(calls: &[Call]) -> Vec<&str> {
    calls.iter().filter_map(|c| c.result.as_ref().err().map(String::as_str)).collect()
}

/// The phase's lost races: from the fake's counters, or from our logs on a real cluster.
fn retries_since(runner: &Runner<'_>, logged_before: Option<u64>) -> Option<u64> {
    match runner.target.fake() {
        Some(fake) => {
            let stats = fake.stats();
            Some(stats.conflicts + stats.invalid)
        }
        None => Some(runner.logged_retries()? - logged_before.unwrap_or(0)),
    }
}

/// One row: a burst of ADDs then of DELs on one target.
fn measure(
    runtime: &tokio::runtime::Runtime,
    target: &Target,
    backend: &str,
    implementation: Implementation,
    scenario: Scenario,
) -> Row {
    let logs = (target.fake().is_none() && implementation == Implementation::Ours)
        .then(|| tempfile::tempdir().expect("log dir"));
    let runner = Runner { program: implementation.program(), target, logs };
    let pods: Vec<Pod> = (0..scenario.nodes)
        .flat_map(|node| {
            (0..scenario.pods_per_node).map(move |i| Pod {
                container: format!("burst-{node}-{i}"),
                name: format!("burst-pod-{node}-{i}"),
                node,
            })
        })
        .collect();
    let label = format!("{backend}, {}, {}", implementation.label(), scenario.label());
    if let Some(fake) = target.fake() {
        fake.reset_stats();
    }
    let logged = runner.logged_retries();
    let (adds, add_wall, add_cpu) = runner.burst("ADD", &pods, scenario);
    let retries = if implementation == Implementation::Upstream && target.fake().is_none() {
        None
    } else {
        retries_since(&runner, logged)
    };
    let holders = runtime.block_on(pool_holders(target));
    let (duplicates, lost, stored_for_failed) = audit(&pods, &adds, &holders);
    let add_failures = failures(&adds);
    if let Some(first) = add_failures.first() {
        println!("  ({label}: {} ADDs failed, e.g. {first})", add_failures.len());
    }
    let (dels, del_wall, _) = runner.burst("DEL", &pods, scenario);
    let del_failures = failures(&dels);
    if let Some(first) = del_failures.first() {
        println!("  ({label}: {} DELs failed, e.g. {first})", del_failures.len());
    }
    let left_in_pool = runtime.block_on(pool_holders(target)).len();
    let took: Vec<Duration> = adds.iter().map(|c| c.took).collect();
    Row {
        backend: backend.to_string(),
        implementation,
        scenario,
        add_wall,
        add_p50: percentile(&took, 0.5),
        add_p99: percentile(&took, 0.99),
        add_cpu,
        retries,
        failed: add_failures.len(),
        duplicates,
        lost,
        stored_for_failed,
        del_wall,
        del_failed: del_failures.len(),
        left_in_pool,
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn print_table(rows: &[Row]) {
    println!(
        "{:<14} {:<17} {:<28} {:>10} {:>7} {:>9} {:>9} {:>9} {:>17} {:>6} {:>4} {:>4} {:>6} {:>10} {:>8} {:>8}",
        "target",
        "implementation",
        "run",
        "ADD wall",
        "ADDs/s",
        "ADD p50",
        "ADD p99",
        "CPU/ADD",
        "CAS retries",
        "failed",
        "dup",
        "lost",
        "failed",
        "DEL wall",
        "leftover",
        "ratio"
    );
    println!("{:>130}", "held");
    for row in rows {
        let baseline = rows.iter().find(|b| {
            b.backend == row.backend
                && b.scenario == row.scenario
                && b.implementation == Implementation::Upstream
        });
        let ratio = baseline
            .map_or("-".to_string(), |b| format!("{:.1}x", row.adds_per_second() / b.adds_per_second()));
        println!(
            "{:<14} {:<17} {:<28} {:>10} {:>7.1} {:>9} {:>9} {:>9} {:>17} {:>6} {:>4} {:>4} {:>6} {:>10} {:>8} {:>8}",
            row.backend,
            row.implementation.label(),
            row.scenario.label(),
            ms(row.add_wall),
            row.adds_per_second(),
            ms(row.add_p50),
            ms(row.add_p99),
            ms(row.add_cpu / row.scenario.pods() as u32),
            row.retries.map_or("n/a".to_string(), |r| {
                format!("{r} ({:.1}/ADD)", r as f64 / row.scenario.pods() as f64)
            }),
            row.failed + row.del_failed,
            row.duplicates,
            row.lost,
            row.stored_for_failed,
            ms(row.del_wall),
            row.left_in_pool,
            ratio,
        );
    }
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else is taken. The baseline is built (if needed) first.
    let upstream = binaries::upstream_whereabouts();
    assert!(upstream.exists(), "{} was not built", upstream.display());
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let set = |name: &str| std::env::var_os(name).is_some_and(|v| !v.is_empty());
    let ours_only = set("WHEREABOUTS_BENCH_OURS_ONLY");
    let mut backends = vec!["fake (calibrated)"];
    if set("WHEREABOUTS_TEST_KUBECONFIG") {
        if ours_only {
            backends.clear();
        }
        backends.push("real server");
    }
    let skip_slowest = set("WHEREABOUTS_BENCH_SKIP_BASELINE_1000");
    let only = std::env::var("WHEREABOUTS_BENCH_ONLY").unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    println!("kube_burst: ADD bursts on {RANGE} then their DELs; one process per call, {cpus} CPUs.");
    let mut rows = Vec::new();
    for backend in &backends {
        for scenario in SCENARIOS.into_iter().filter(|s| s.label().contains(&only)) {
            for implementation in [Implementation::Ours, Implementation::Upstream] {
                let baseline = implementation == Implementation::Upstream;
                if baseline && (ours_only || (skip_slowest && scenario.pods() == 1000)) {
                    continue;
                }
                let target = runtime.block_on(async {
                    match *backend {
                        "real server" => Target::Real(TestCluster::start().await),
                        _ => Target::start_fake().await,
                    }
                });
                let started = Instant::now();
                let row = measure(&runtime, &target, backend, implementation, scenario);
                println!(
                    "  ({backend}, {}, {}: ADDs {} failed {}, measured in {:.1?})",
                    implementation.label(),
                    scenario.label(),
                    ms(row.add_wall),
                    row.failed,
                    started.elapsed()
                );
                rows.push(row);
                runtime.block_on(target.cleanup());
            }
        }
    }
    println!();
    print_table(&rows);
    println!();
    for row in rows.iter().filter(|r| r.implementation == Implementation::Ours) {
        let verdict = |met: bool| if met { "met" } else { "NOT met" };
        let baseline = rows.iter().find(|b| {
            b.backend == row.backend
                && b.scenario == row.scenario
                && b.implementation == Implementation::Upstream
        });
        let ratio = baseline.map(|b| row.adds_per_second() / b.adds_per_second());
        let mut verdicts = Vec::new();
        if let Some(target) = row.scenario.target {
            verdicts.push(format!(
                "ADDs within {target:?}: {} ({})",
                verdict(row.add_wall <= target && row.failed == 0),
                ms(row.add_wall)
            ));
        }
        if let (Some(ratio), Some(_)) = (ratio, row.scenario.target) {
            verdicts.push(format!(
                ">= {RATIO_TARGET}x the baseline: {} ({ratio:.1}x)",
                verdict(ratio >= RATIO_TARGET)
            ));
        }
        if !verdicts.is_empty() {
            println!("{}, {}: {}", row.backend, row.scenario.label(), verdicts.join("; "));
        }
    }
    let broken: Vec<&Row> = rows.iter().filter(|r| r.broken()).collect();
    for row in &broken {
        println!(
            "CORRECTNESS FAILURE: {}, {}, {}: {} ADDs and {} DELs failed, {} duplicates, {} lost, {} held for \
             failed ADDs, {} left in the pool after DEL",
            row.backend,
            row.implementation.label(),
            row.scenario.label(),
            row.failed,
            row.del_failed,
            row.duplicates,
            row.lost,
            row.stored_for_failed,
            row.left_in_pool
        );
    }
    if !broken.is_empty() {
        std::process::exit(1);
    }
}
