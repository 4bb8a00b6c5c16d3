//! 1000 pods on 10 simulated nodes, with node slices and without (the baseline, measured in the same
//! run): the time until every pod holds an address, duplicates (must be 0), and the time the controller
//! takes to release every address once the pods are deleted without CNI DEL (the nodes "died").
//!
//! Each configuration runs on a fresh fake API server with its calibrated costs
//! ([`FakeOptions::calibrated`]: per request, per stored write growing with the object's size, writes
//! to one object queued behind each other), or in a fresh namespace of the cluster
//! named by `WHEREABOUTS_TEST_KUBECONFIG` (whose Nodes and NAD carry the run's label, which the
//! controller is told to select: the cluster may be shared). The controller is the real `whereabouts controller` process;
//! the ADDs are real plugin processes, ten at a time per node (as ten kubelets starting pods). With node
//! slices every node allocates in its own pool of its own slice: no write of one node ever races
//! another node's.
//!
//! Run with `cargo bench -p whereabouts --bench controller_scale`.

#![allow(clippy::print_stdout, reason = "a benchmark reports on stdout")]

use std::collections::BTreeMap;
use std::io::Write;
use std::net::IpAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures::StreamExt;
use ipnet::IpNet;
use serde_json::{Value, json};
use whereabouts_core::addr::parse_cidr_strict;
use whereabouts_core::pool::Pool;
use whereabouts_k8s::crd::{IPPool, NodeSlicePool};
use whereabouts_k8s::kube::api::{DynamicObject, PostParams};
use whereabouts_k8s::kube::{Api, Client};
use whereabouts_kube_testing::{FakeOptions, TestCluster};

const NODES: usize = 10;
const PODS_PER_NODE: usize = 100;
/// Plugin processes running at once per node.
const PER_NODE: usize = 10;
const RANGE: &str = "10.80.0.0/16";
const SLICE: &str = "/24";
const NETWORK: &str = "scale";
const RELEASE_LIMIT: Duration = Duration::from_secs(300);

struct Row {
    label: &'static str,
    add_wall: Duration,
    p50: Duration,
    p99: Duration,
    conflicts: Option<u64>,
    failed: usize,
    duplicates: usize,
    lost: usize,
    release: Option<Duration>,
}

fn netconf(kubeconfig: &Path, slices: bool) -> Value {
    let mut ipam = json!({
        "type": "whereabouts",
        "datastore": "kubernetes",
        "kubernetes": { "kubeconfig": kubeconfig },
        "range": RANGE,
        "network_name": NETWORK,
        "log_level": "error",
    });
    if slices {
        ipam["node_slice_size"] = SLICE.into();
    }
    json!({ "cniVersion": "1.0.0", "name": NETWORK, "type": "macvlan", "ipam": ipam })
}

/// The node's name: unique to the run's namespace (Nodes are cluster-wide, a real cluster shared).
fn node(cluster: &TestCluster, n: usize) -> String {
    cluster.unique(&node_suffix(n))
}

fn node_suffix(n: usize) -> String {
    format!("scale-node-{n}")
}

async fn create_objects(cluster: &TestCluster, slices: bool) -> Vec<(String, String, usize)> {
    let client = cluster.client();
    for n in 0..NODES {
        cluster.create_node(&node_suffix(n)).await;
    }
    let nad = whereabouts_controller::nodeslice::nad_resource();
    let config = netconf(cluster.kubeconfig_path(), slices).to_string();
    let object: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "k8s.cni.cncf.io/v1",
        "kind": "NetworkAttachmentDefinition",
        "metadata": { "name": NETWORK, "namespace": cluster.namespace(), "labels": cluster.labels() },
        "spec": { "config": config },
    }))
    .expect("a NAD");
    Api::<DynamicObject>::namespaced_with(client.clone(), cluster.namespace(), &nad)
        .create(&PostParams::default(), &object)
        .await
        .expect("create the NAD");
    let wanted: Vec<(String, usize)> =
        (0..NODES).flat_map(|n| (0..PODS_PER_NODE).map(move |i| (format!("pod-{n}-{i}"), n))).collect();
    futures::stream::iter(wanted.into_iter().map(|(name, n)| async move {
        let uid = cluster.create_pod(&name, Some(&node(cluster, n))).await;
        (name, uid, n)
    }))
    .buffer_unordered(32)
    .collect()
    .await
}

/// Spawns the controller; it is killed when the returned child is dropped.
fn start_controller(cluster: &TestCluster) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_whereabouts"))
        .args(["controller", "--no-leader-election", "--metrics-address", ""])
        .args(["--kubeconfig", &cluster.kubeconfig_path().display().to_string()])
        .args(["--namespace", cluster.namespace(), "--cron-file", "/nonexistent/config"])
        .args(["--log-level", "warn"])
        // A real cluster is shared: slice only this run's Nodes and NAD.
        .args(["--node-slice-node-selector", &cluster.selector()])
        .args(["--node-slice-nad-selector", &cluster.selector()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("start the controller")
}

async fn wait_for_slices(client: &Client, namespace: &str) {
    let api: Api<NodeSlicePool> = Api::namespaced(client.clone(), namespace);
    let started = Instant::now();
    loop {
        if let Ok(Some(pool)) = api.get_opt(NETWORK).await {
            let assigned =
                pool.status.map_or(0, |s| s.allocations.iter().filter(|a| !a.node_name.is_empty()).count());
            if assigned == NODES {
                return;
            }
        }
        assert!(started.elapsed() < Duration::from_secs(60), "the controller assigned no slices");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One ADD: how long it took and the address (or the failure).
fn add(
    cluster: &TestCluster,
    config: &str,
    pod: &(String, String, usize),
) -> (Duration, Result<IpAddr, String>) {
    let (name, uid, n) = pod;
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_whereabouts"))
        .env_clear()
        .env("CNI_COMMAND", "ADD")
        .env("CNI_CONTAINERID", format!("sandbox-{name}"))
        .env("CNI_NETNS", format!("/var/run/netns/{name}"))
        .env("CNI_IFNAME", "net1")
        .env("CNI_PATH", "/opt/cni/bin")
        .env(
            "CNI_ARGS",
            format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={name};K8S_POD_UID={uid}",
                cluster.namespace()
            ),
        )
        .env("NODENAME", node(cluster, *n))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the plugin");
    child.stdin.take().expect("stdin").write_all(config.as_bytes()).expect("write stdin");
    let output = child.wait_with_output().expect("wait for the plugin");
    let took = started.elapsed();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let address = serde_json::from_str::<Value>(&stdout)
        .ok()
        .and_then(|v| v["ips"][0]["address"].as_str().and_then(|a| a.parse::<IpNet>().ok()));
    match (output.status.success(), address) {
        (true, Some(address)) => (took, Ok(address.addr())),
        _ => (took, Err(format!("{stdout} {}", String::from_utf8_lossy(&output.stderr)))),
    }
}

/// Every stored allocation: address → pod reference.
async fn holders(client: &Client, namespace: &str) -> (BTreeMap<IpAddr, String>, usize) {
    let api: Api<IPPool> = Api::namespaced(client.clone(), namespace);
    let (mut out, mut count) = (BTreeMap::new(), 0);
    for pool in api.list(&Default::default()).await.expect("list pools").items {
        let network = parse_cidr_strict(&pool.spec.pool.range).expect("a range");
        let (decoded, _) = Pool::from_spec(&pool.spec.pool, network).expect("a pool");
        for (ip, allocation) in decoded.iter() {
            count += 1;
            out.insert(ip, allocation.pod_ref.clone());
        }
    }
    (out, count)
}

fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    let index = ((samples.len() as f64 - 1.0) * p).round() as usize;
    samples.get(index).copied().unwrap_or_default()
}

async fn measure(label: &'static str, slices: bool) -> Row {
    let cluster = TestCluster::start_with_options(FakeOptions::calibrated()).await;
    let client = cluster.client();
    let pods = create_objects(&cluster, slices).await;
    let mut controller = start_controller(&cluster);
    if slices {
        wait_for_slices(&client, cluster.namespace()).await;
    }
    let before = cluster.fake().map(|f| f.stats());
    let config = netconf(cluster.kubeconfig_path(), slices).to_string();
    let by_node: Vec<Vec<&(String, String, usize)>> =
        (0..NODES).map(|n| pods.iter().filter(|p| p.2 == n).collect()).collect();
    let results = Mutex::new(Vec::new());
    let started = Instant::now();
    let queues: Vec<Mutex<_>> = by_node.iter().map(|node_pods| Mutex::new(node_pods.iter())).collect();
    std::thread::scope(|scope| {
        for queue in &queues {
            for _ in 0..PER_NODE {
                let (results, config, cluster) = (&results, &config, &cluster);
                scope.spawn(move || {
                    loop {
                        let next = queue.lock().expect("queue").next().copied();
                        let Some(pod) = next else { break };
                        let outcome = add(cluster, config, pod);
                        results.lock().expect("results").push((pod.0.clone(), outcome));
                    }
                });
            }
        }
    });
    let add_wall = started.elapsed();
    let conflicts = cluster.fake().zip(before).map(|(f, b)| {
        let now = f.stats();
        (now.conflicts - b.conflicts) + (now.invalid - b.invalid)
    });
    let results = results.into_inner().expect("results");
    let failed: Vec<&String> = results.iter().filter_map(|(_, (_, r))| r.as_ref().err()).collect();
    if let Some(first) = failed.first() {
        println!("{label}: {} ADDs failed, first: {first}", failed.len());
    }
    let (stored, _) = holders(&client, cluster.namespace()).await;
    let mut answered: BTreeMap<IpAddr, usize> = BTreeMap::new();
    let mut lost = 0;
    for (pod, (_, result)) in &results {
        let Ok(ip) = result else { continue };
        *answered.entry(*ip).or_default() += 1;
        if stored.get(ip).map(|p| p.rsplit('/').next()) != Some(Some(pod.as_str())) {
            lost += 1;
        }
    }
    let duplicates = answered.values().filter(|n| **n > 1).map(|n| n - 1).sum();
    let mut times: Vec<Duration> = results.iter().map(|(_, (t, _))| *t).collect();

    // The nodes die: every pod is deleted without DEL, and the controller releases what they held.
    let deleting = Instant::now();
    futures::stream::iter(pods.iter().map(|(name, _, _)| cluster.delete_pod(name)))
        .buffer_unordered(64)
        .collect::<Vec<()>>()
        .await;
    let release = loop {
        let (_, count) = holders(&client, cluster.namespace()).await;
        if count == 0 {
            break Some(deleting.elapsed());
        }
        if deleting.elapsed() > RELEASE_LIMIT {
            println!("{label}: {count} addresses still held after {RELEASE_LIMIT:?}");
            break None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let _ = controller.kill();
    let _ = controller.wait();
    cluster.cleanup().await;
    Row {
        label,
        add_wall,
        p50: percentile(&mut times, 0.5),
        p99: percentile(&mut times, 0.99),
        conflicts,
        failed: failed.len(),
        duplicates,
        lost,
        release,
    }
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let pods = NODES * PODS_PER_NODE;
    let server = match std::env::var_os(whereabouts_kube_testing::cluster::KUBECONFIG_ENV) {
        Some(path) if !path.is_empty() => format!("the cluster of {}", path.display()),
        _ => "the fake API server (calibrated costs)".to_string(),
    };
    println!("{pods} pods on {NODES} nodes ({PER_NODE} ADDs at a time per node), on {server}");
    let baseline = measure("without node slices (baseline)", false).await;
    let sliced = measure("node slices /24", true).await;
    println!(
        "| configuration | every pod addressed | ADDs/s | ADD p50 | ADD p99 | 409/422 answers | failed | dup | lost | all released after delete | speed-up (addressing) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let mut bad = false;
    for row in [&baseline, &sliced] {
        let ratio = baseline.add_wall.as_secs_f64() / row.add_wall.as_secs_f64();
        println!(
            "| {} | {} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {ratio:.2}x |",
            row.label,
            ms(row.add_wall),
            (pods - row.failed) as f64 / row.add_wall.as_secs_f64(),
            ms(row.p50),
            ms(row.p99),
            row.conflicts.map_or_else(|| "n/a".into(), |c| c.to_string()),
            row.failed,
            row.duplicates,
            row.lost,
            row.release.map_or_else(|| "did not finish".into(), ms),
        );
        bad |= row.duplicates > 0 || row.lost > 0 || row.failed > 0 || row.release.is_none();
    }
    assert!(!bad, "duplicates, lost or failed ADDs, or unreleased addresses");
}
