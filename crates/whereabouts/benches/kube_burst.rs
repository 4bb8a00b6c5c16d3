//! A burst of pod starts on one pool through the Kubernetes store: 10 simulated nodes x 20 pods ADD at
//! once (one plugin process each, as the kubelets would exec them), then all 200 DEL at once; and 20
//! ADDs one after another, then their DELs. Baseline measured in the same run: the same calls through
//! `upstream-whereabouts`, which serialises every update in the cluster through the Lease
//! `whereabouts` as upstream does (same process contract, same pool objects).
//!
//! Against the in-process fake API server twice, without write latency and with 5 ms per write
//! (modelling a real API server's etcd round trip; writes to one object queue behind each other), and
//! against a real cluster when `WHEREABOUTS_TEST_KUBECONFIG` names its kubeconfig. Every configuration
//! runs in a fresh fake or namespace. After each burst the IPPool is read back: every answered address
//! must be held by its pod ("lost" otherwise) and no address answered twice or held by another pod
//! ("dup"); after the DELs the pool must be empty ("leftover"). Any of them non-zero fails the run.
//! ADDs/s counts successful ADDs over the burst's wall time (first spawn to last exit); the speed-up
//! is ours over the baseline's in the same backend and run.
//!
//! CAS retries: answers 409 and 422 counted by the fake during the ADDs (for upstream these include
//! the Lease's conflicts); on a real cluster ours are counted from the plugin's debug logs ("conflict
//! on attempt"), upstream's are not known.
//!
//! Run with `cargo bench -p whereabouts --bench kube_burst`.

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

const NODES: usize = 10;
const PODS_PER_NODE: usize = 20;
const SEQUENTIAL: usize = 20;
const RANGE: &str = "10.70.0.0/24";
const NETWORK: &str = "burst";
const NAMESPACE: &str = "kube-system";
/// The targets.
const BURST_TARGET: Duration = Duration::from_secs(2);
const SPEEDUP_TARGET: f64 = 10.0;

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

/// How the calls are made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// All at once, then all DELs at once.
    Burst,
    /// One after another, then the DELs one after another.
    Sequential,
}

impl Mode {
    fn label(self) -> String {
        match self {
            Mode::Burst => format!("{} concurrent", NODES * PODS_PER_NODE),
            Mode::Sequential => format!("{SEQUENTIAL} sequential"),
        }
    }
}

/// Where the calls go: a fresh fake, or a fresh namespace of a real cluster.
enum Target {
    Fake { server: FakeApiServer, client: Client, kubeconfig: PathBuf, _dir: TempDir },
    Real(TestCluster),
}

impl Target {
    /// A fake API server with the whereabouts CRDs installed; the calls use its `kube-system`.
    async fn start_fake(write_latency: Duration) -> Target {
        let server = FakeApiServer::start_with(FakeOptions { write_latency });
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
    implementation: Implementation,
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

    /// Runs one call per pod, all at once; returns the calls and the wall time of the whole burst
    /// (from the first spawn to the last exit).
    fn burst(&self, command: &str, pods: &[Pod]) -> (Vec<Call>, Duration) {
        let start = Barrier::new(pods.len());
        let calls: Vec<Call> = std::thread::scope(|scope| {
            let handles: Vec<_> = pods
                .iter()
                .map(|pod| {
                    let start = &start;
                    scope.spawn(move || {
                        start.wait();
                        self.call(command, pod)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("call thread")).collect()
        });
        let first = calls.iter().map(|c| c.started).min().expect("calls");
        let last = calls.iter().map(|c| c.started + c.took).max().expect("calls");
        (calls, last - first)
    }

    /// Runs one call per pod, one after another.
    fn sequence(&self, command: &str, pods: &[Pod]) -> (Vec<Call>, Duration) {
        let started = Instant::now();
        let calls = pods.iter().map(|pod| self.call(command, pod)).collect();
        (calls, started.elapsed())
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

/// The measurements of one row.
struct Row {
    backend: String,
    implementation: Implementation,
    mode: Mode,
    adds: usize,
    add_wall: Duration,
    add_p50: Duration,
    add_p99: Duration,
    retries: Option<u64>,
    failed: usize,
    duplicates: usize,
    lost: usize,
    del_wall: Duration,
    del_failed: usize,
    left_in_pool: usize,
}

impl Row {
    fn adds_per_second(&self) -> f64 {
        (self.adds - self.failed) as f64 / self.add_wall.as_secs_f64()
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
/// addresses the pool does not hold).
fn audit(pods: &[Pod], calls: &[Call], holders: &BTreeMap<IpAddr, String>) -> (usize, usize) {
    let mut answered: BTreeMap<IpAddr, usize> = BTreeMap::new();
    let (mut duplicates, mut lost) = (0, 0);
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
    (duplicates, lost)
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

/// One configuration: a burst of ADDs then DELs, then sequential ADDs then DELs, on one target.
fn measure(
    runtime: &tokio::runtime::Runtime,
    target: &Target,
    backend: &str,
    implementation: Implementation,
) -> Vec<Row> {
    let logs = (target.fake().is_none() && implementation == Implementation::Ours)
        .then(|| tempfile::tempdir().expect("log dir"));
    let runner = Runner { program: implementation.program(), implementation, target, logs };
    let burst: Vec<Pod> = (0..NODES)
        .flat_map(|node| {
            (0..PODS_PER_NODE).map(move |i| Pod {
                container: format!("burst-{node}-{i}"),
                name: format!("burst-pod-{node}-{i}"),
                node,
            })
        })
        .collect();
    let sequential: Vec<Pod> = (0..SEQUENTIAL)
        .map(|i| Pod { container: format!("seq-{i}"), name: format!("seq-pod-{i}"), node: i % NODES })
        .collect();
    let mut rows = Vec::new();
    for (mode, pods) in [(Mode::Burst, &burst), (Mode::Sequential, &sequential)] {
        let run = |command| match mode {
            Mode::Burst => runner.burst(command, pods),
            Mode::Sequential => runner.sequence(command, pods),
        };
        let label = mode.label();
        if let Some(fake) = target.fake() {
            fake.reset_stats();
        }
        let logged = runner.logged_retries();
        let (adds, add_wall) = run("ADD");
        let retries = if implementation == Implementation::Upstream && target.fake().is_none() {
            None
        } else {
            retries_since(&runner, logged)
        };
        let holders = runtime.block_on(pool_holders(target));
        let (duplicates, lost) = audit(pods, &adds, &holders);
        let add_failures = failures(&adds);
        if let Some(first) = add_failures.first() {
            println!(
                "  ({backend}, {}, {label}: {} ADDs failed, e.g. {first})",
                runner.implementation.label(),
                add_failures.len()
            );
        }
        let (dels, del_wall) = run("DEL");
        let del_failures = failures(&dels);
        if let Some(first) = del_failures.first() {
            println!(
                "  ({backend}, {}, {label}: {} DELs failed, e.g. {first})",
                runner.implementation.label(),
                del_failures.len()
            );
        }
        let left_in_pool = runtime.block_on(pool_holders(target)).len();
        let took: Vec<Duration> = adds.iter().map(|c| c.took).collect();
        rows.push(Row {
            backend: backend.to_string(),
            implementation,
            mode,
            adds: pods.len(),
            add_wall,
            add_p50: percentile(&took, 0.5),
            add_p99: percentile(&took, 0.99),
            retries,
            failed: add_failures.len(),
            duplicates,
            lost,
            del_wall,
            del_failed: del_failures.len(),
            left_in_pool,
        });
    }
    rows
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn print_table(rows: &[Row]) {
    println!(
        "{:<18} {:<17} {:<15} {:>11} {:>8} {:>10} {:>10} {:>16} {:>6} {:>4} {:>4} {:>11} {:>8} {:>9}",
        "backend",
        "implementation",
        "run",
        "ADD wall",
        "ADDs/s",
        "ADD p50",
        "ADD p99",
        "retries",
        "failed",
        "dup",
        "lost",
        "DEL wall",
        "leftover",
        "speed-up"
    );
    for row in rows {
        let baseline = rows.iter().find(|b| {
            b.backend == row.backend && b.mode == row.mode && b.implementation == Implementation::Upstream
        });
        let speedup = baseline
            .map_or("-".to_string(), |b| format!("{:.1}x", row.adds_per_second() / b.adds_per_second()));
        println!(
            "{:<18} {:<17} {:<15} {:>11} {:>8.1} {:>10} {:>10} {:>16} {:>6} {:>4} {:>4} {:>11} {:>8} {:>9}",
            row.backend,
            row.implementation.label(),
            row.mode.label(),
            ms(row.add_wall),
            row.adds_per_second(),
            ms(row.add_p50),
            ms(row.add_p99),
            row.retries.map_or("n/a".to_string(), |r| format!("{r} ({:.1}/ADD)", r as f64 / row.adds as f64)),
            row.failed + row.del_failed,
            row.duplicates,
            row.lost,
            ms(row.del_wall),
            row.left_in_pool,
            speedup,
        );
    }
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else is taken. The baseline is built (if needed) first.
    let upstream = binaries::upstream_whereabouts();
    assert!(upstream.exists(), "{} was not built", upstream.display());
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let mut backends: Vec<(String, Option<Duration>)> = vec![
        ("fake, 0 ms writes".to_string(), Some(Duration::ZERO)),
        ("fake, 5 ms writes".to_string(), Some(Duration::from_millis(5))),
    ];
    if std::env::var_os("WHEREABOUTS_TEST_KUBECONFIG").is_some_and(|v| !v.is_empty()) {
        backends.push(("real cluster".to_string(), None));
    }
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    println!(
        "kube_burst: {NODES} nodes x {PODS_PER_NODE} pods ADD at once on {RANGE} then DEL at once; \
         {SEQUENTIAL} ADDs then DELs one after another. One process per call, {cpus} CPUs."
    );
    let mut rows = Vec::new();
    for (backend, latency) in &backends {
        for implementation in [Implementation::Ours, Implementation::Upstream] {
            let target = runtime.block_on(async {
                match latency {
                    Some(latency) => Target::start_fake(*latency).await,
                    None => Target::Real(TestCluster::start().await),
                }
            });
            let started = Instant::now();
            rows.extend(measure(&runtime, &target, backend, implementation));
            println!("  ({backend}, {}: measured in {:.1?})", implementation.label(), started.elapsed());
            runtime.block_on(target.cleanup());
        }
    }
    println!();
    print_table(&rows);
    println!();
    for (backend, _) in &backends {
        let find = |implementation, mode| {
            rows.iter()
                .find(|r| &r.backend == backend && r.implementation == implementation && r.mode == mode)
                .expect("row")
        };
        let ours = find(Implementation::Ours, Mode::Burst);
        let upstream = find(Implementation::Upstream, Mode::Burst);
        let speedup = ours.adds_per_second() / upstream.adds_per_second();
        let verdict = |met: bool| if met { "met" } else { "NOT met" };
        println!(
            "{backend}: {} ADDs in < {BURST_TARGET:?}: {} ({}); >= {SPEEDUP_TARGET}x the Lease-serialised \
             throughput: {} ({speedup:.1}x)",
            Mode::Burst.label(),
            verdict(ours.add_wall < BURST_TARGET && ours.failed == 0),
            ms(ours.add_wall),
            verdict(speedup >= SPEEDUP_TARGET),
        );
    }
    let broken: Vec<&Row> = rows.iter().filter(|r| r.duplicates + r.lost + r.left_in_pool > 0).collect();
    for row in &broken {
        println!(
            "CORRECTNESS FAILURE: {}, {}, {}: {} duplicates, {} lost, {} left in the pool after DEL",
            row.backend,
            row.implementation.label(),
            row.mode.label(),
            row.duplicates,
            row.lost,
            row.left_in_pool
        );
    }
    if !broken.is_empty() {
        std::process::exit(1);
    }
}
