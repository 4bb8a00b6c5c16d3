//! The operator commands (`pools`, `ips`, `leaks`, `release`, `check`) as processes: against the file
//! store in a temporary directory, and against the fake Kubernetes API server (or the cluster named by
//! `WHEREABOUTS_TEST_KUBECONFIG`). Addresses are allocated by the plugin binary itself.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use serde_json::{Value, json};
use whereabouts_core::pool::{Allocation, PoolSpec};
use whereabouts_k8s::crd::{
    IPPool, IPPoolSpec, OverlappingRangeIPReservation, OverlappingRangeIPReservationSpec,
};
use whereabouts_k8s::k8s_openapi::api::core::v1::Pod;
use whereabouts_k8s::kube::api::{Api, Patch, PatchParams, PostParams};
use whereabouts_kube_testing::TestCluster;
use whereabouts_kube_testing::plugin::Call;
use whereabouts_store::file::FileStore;
use whereabouts_store::{Reservation, Store};

const POOL: &str = "192.0.2.0-24";

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_whereabouts"))
}

/// Runs `whereabouts ARGS` (no CNI_COMMAND): (exit code, stdout, stderr).
fn cli(args: &[&str]) -> (i32, String, String) {
    cli_with_env(args, &[])
}

/// [`cli`] with `env` set (and `KUBECONFIG` only when `env` sets it).
fn cli_with_env(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let out: Output = Command::new(binary())
        .args(args)
        .env_remove("KUBECONFIG")
        .envs(env.iter().copied())
        .env_remove("CNI_COMMAND")
        .env_remove("WHEREABOUTS_NAMESPACE")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .stdin(Stdio::null())
        .output()
        .expect("run the CLI");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs the CLI expecting exit `code` and JSON on stdout.
fn cli_json(args: &[&str], code: i32) -> Value {
    let mut all = args.to_vec();
    all.extend(["-o", "json"]);
    let (got, stdout, stderr) = cli(&all);
    assert_eq!(got, code, "{args:?}: {stdout}{stderr}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {stdout}"))
}

/// Runs the CLI expecting exit `code`; its table output.
fn cli_table(args: &[&str], code: i32) -> String {
    let (got, stdout, stderr) = cli(args);
    assert_eq!(got, code, "{args:?}: {stdout}{stderr}");
    stdout
}

// ---------------------------------------------------------------------------------------------
// the file store

fn file_netconf(dir: &Path, range: &str) -> String {
    json!({
        "cniVersion": "1.0.0",
        "name": "cli-net",
        "ipam": { "type": "whereabouts", "datastore": "file", "file_store_dir": dir, "range": range, "log_level": "error" }
    })
    .to_string()
}

/// The plugin's ADD for pod `ns/<pod>` on the file store: the address it got.
fn file_add(dir: &Path, range: &str, namespace: &str, pod: &str, uid: &str) -> String {
    let cni_args =
        format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={pod};K8S_POD_UID={uid}");
    let container = format!("sandbox-{pod}");
    let mut child = Command::new(binary())
        .env_clear()
        .envs([
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", container.as_str()),
            ("CNI_NETNS", "/var/run/netns/none"),
            ("CNI_IFNAME", "net1"),
            ("CNI_PATH", "/opt/cni/bin"),
            ("CNI_ARGS", cni_args.as_str()),
            ("NODENAME", "node-a"),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the plugin");
    child.stdin.take().expect("stdin").write_all(file_netconf(dir, range).as_bytes()).expect("stdin");
    let out = child.wait_with_output().expect("wait");
    assert!(out.status.success(), "ADD {pod}: {}", String::from_utf8_lossy(&out.stdout));
    let result: Value = serde_json::from_slice(&out.stdout).expect("a result");
    let address = result["ips"][0]["address"].as_str().expect("an address");
    address.split('/').next().expect("an address").to_string()
}

fn dir_arg(dir: &Path) -> String {
    dir.display().to_string()
}

/// Three pods on the file store: 192.0.2.1-3.
fn three_pods() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for (i, pod) in ["web-0", "web-1", "web-2"].iter().enumerate() {
        assert_eq!(
            file_add(dir.path(), "192.0.2.0/24", "ns", pod, &format!("uid-{i}")),
            format!("192.0.2.{}", i + 1)
        );
    }
    dir
}

#[test]
fn pools_in_both_forms() {
    let dir = three_pods();
    let d = dir_arg(dir.path());
    let table = cli_table(&["pools", "--file-store-dir", &d], 0);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(
        lines[0].split_whitespace().collect::<Vec<_>>(),
        ["POOL", "RANGE", "SIZE", "USED", "FREE", "USED%", "NOTE"]
    );
    assert_eq!(
        lines[1].split_whitespace().collect::<Vec<_>>(),
        [POOL, "192.0.2.0/24", "254", "3", "251", "1.2%"]
    );
    let json = cli_json(&["pools", "--file-store-dir", &d], 0);
    assert_eq!(
        json,
        json!([{ "name": POOL, "range": "192.0.2.0/24", "size": 254, "used": 3, "free": 251, "percent_used": 1.18, "undecodable_keys": 0 }])
    );
    // The same store, found through a flat file and through a network configuration.
    let flat = dir.path().join("whereabouts.conf");
    std::fs::write(&flat, json!({ "datastore": "file", "file_store_dir": dir.path() }).to_string())
        .expect("write");
    assert_eq!(cli_json(&["pools", "--config", &dir_arg(&flat)], 0), json);
    let netconf = dir.path().join("net.conf");
    std::fs::write(&netconf, file_netconf(dir.path(), "192.0.2.0/24")).expect("write");
    assert_eq!(cli_json(&["pools", "--config", &dir_arg(&netconf)], 0), json);
}

#[test]
fn ips_in_both_forms() {
    let dir = three_pods();
    let d = dir_arg(dir.path());
    let table = cli_table(&["ips", POOL, "--file-store-dir", &d], 0);
    let rows: Vec<Vec<&str>> = table.lines().map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(rows[0], ["IP", "POD", "CONTAINER", "ID", "INTERFACE", "NODE", "POD", "UID", "STATEFULSET"]);
    assert_eq!(rows[2], ["192.0.2.2", "ns/web-1", "sandbox-web-1", "net1", "node-a", "uid-1", "-"]);
    assert_eq!(rows.len(), 4);
    let json = cli_json(&["ips", POOL, "--file-store-dir", &d], 0);
    assert_eq!(
        json[0],
        json!({ "ip": "192.0.2.1", "pod": "ns/web-0", "container_id": "sandbox-web-0", "interface": "net1",
                "node": "node-a", "pod_uid": "uid-0", "network": "cli-net", "statefulset": null, "held": false })
    );
    assert_eq!(json.as_array().map(Vec::len), Some(3));
    let (code, _, stderr) = cli(&["ips", "10.0.0.0-8", "--file-store-dir", &d]);
    assert_eq!(code, 1);
    assert!(stderr.contains("no pool named \"10.0.0.0-8\""), "{stderr}");
}

#[test]
fn release_frees_a_held_address_and_refuses_one_not_held() {
    let dir = three_pods();
    let d = dir_arg(dir.path());
    let out = cli_table(&["release", "192.0.2.2", "--pool", POOL, "--file-store-dir", &d], 0);
    assert!(out.contains("released 192.0.2.2 from pool 192.0.2.0-24 (pod ns/web-1, container sandbox-web-1, interface net1)"), "{out}");
    assert!(out.contains("released reservation 192.0.2.2"), "{out}");
    assert!(!dir.path().join("reservations/192.0.2.2.json").exists());
    let ips = cli_json(&["ips", POOL, "--file-store-dir", &d], 0);
    let held: Vec<&str> = ips.as_array().expect("a list").iter().filter_map(|h| h["ip"].as_str()).collect();
    assert_eq!(held, ["192.0.2.1", "192.0.2.3"]);

    let (code, stdout, stderr) = cli(&["release", "192.0.2.2", "--pool", POOL, "--file-store-dir", &d]);
    assert_eq!((code, stdout.as_str()), (1, ""));
    assert!(stderr.contains("pool 192.0.2.0-24 does not hold 192.0.2.2"), "{stderr}");
    let (code, _, stderr) = cli(&["release", "192.0.2.1", "--pool", "nope", "--file-store-dir", &d]);
    assert_eq!(code, 1, "{stderr}");

    let json = cli_json(&["release", "192.0.2.3", "--pool", POOL, "--file-store-dir", &d], 0);
    assert_eq!(
        json,
        json!({ "ip": "192.0.2.3", "pool": POOL, "pod": "ns/web-2", "container_id": "sandbox-web-2",
                "interface": "net1", "reservations": ["192.0.2.3"] })
    );
    // The plugin hands the freed addresses out again, lowest first.
    assert_eq!(file_add(dir.path(), "192.0.2.0/24", "ns", "web-3", "uid-3"), "192.0.2.2");
}

fn allocation(pod: &str) -> Allocation {
    Allocation {
        container_id: format!("sandbox-{pod}"),
        pod_ref: format!("ns/{pod}"),
        ifname: "net1".into(),
        node: None,
        cni_network: None,
        pod_uid: None,
        statefulset: None,
        ipam_claim: None,
    }
}

#[tokio::test]
async fn check_finds_planted_inconsistencies_in_the_file_store() {
    let dir = three_pods();
    let d = dir_arg(dir.path());
    let clean = cli_table(&["check", "--file-store-dir", &d], 0);
    assert_eq!(clean, "0 problems in 1 pools, 3 allocations, 3 reservations\n");
    assert_eq!(cli_json(&["check", "--file-store-dir", &d], 0)["problems"], json!([]));

    let store = FileStore::open(dir.path()).expect("open");
    // A reservation without a pool entry.
    let ghost = Reservation {
        pod_ref: "ns/ghost".into(),
        ifname: "net1".into(),
        container_id: "sandbox-ghost".into(),
    };
    store.create_reservation("192.0.2.99", &ghost).await.expect("plant a reservation");
    // An overlapping pool holding 192.0.2.1 (web-0's) for another pod, and an undecodable key.
    let mut allocations: std::collections::BTreeMap<String, Allocation> =
        [("1".to_string(), allocation("intruder")), ("x".to_string(), allocation("odd"))].into();
    allocations.insert("2".into(), allocation("web-1"));
    let spec = PoolSpec { range: "192.0.2.0/25".into(), allocations, ..Default::default() };
    store.write_pool("192.0.2.0-25", &spec, None, None).await.expect("plant a pool");

    let table = cli_table(&["check", "--file-store-dir", &d], 1);
    assert!(table.contains("orphan-reservation"), "{table}");
    assert!(
        table.lines().any(|l| l.split_whitespace().take(3).eq(["duplicate-address", POOL, "192.0.2.1"])),
        "{table}"
    );
    let report = cli_json(&["check", "--file-store-dir", &d], 1);
    let kinds: Vec<(&str, &str)> = report["problems"]
        .as_array()
        .expect("problems")
        .iter()
        .map(|p| {
            (
                p["kind"].as_str().unwrap_or_default(),
                p["ip"].as_str().or(p["reservation"].as_str()).unwrap_or(""),
            )
        })
        .collect();
    assert!(kinds.contains(&("orphan-reservation", "192.0.2.99")), "{kinds:?}");
    assert!(kinds.contains(&("duplicate-address", "192.0.2.1")), "{kinds:?}");
    assert!(kinds.contains(&("undecodable-key", "")), "{kinds:?}");
    // web-1's second entry (same holder) is no duplicate.
    assert!(!kinds.contains(&("duplicate-address", "192.0.2.2")), "{kinds:?}");
    assert_eq!(report["pools"], 2);
    assert_eq!(report["reservations"], 4);

    // With overlapping ranges off, nothing needs a reservation; the intruder still collides.
    std::fs::remove_file(dir.path().join("reservations/192.0.2.3.json")).expect("remove");
    let report = cli_json(&["check", "--file-store-dir", &d], 1);
    assert!(report.to_string().contains("missing-reservation"), "{report}");
    let report = cli_json(&["check", "--file-store-dir", &d, "--no-overlapping-ranges"], 1);
    assert!(!report.to_string().contains("missing-reservation"), "{report}");

    // --repair without pods to look up: the orphan goes; whether web-2 runs cannot be told, so its
    // reservation is not made again, and the intruder is not --repair's to resolve.
    let (code, out, stderr) = cli(&["check", "--file-store-dir", &d, "--repair", "-o", "json"]);
    assert_eq!(code, 1, "{out}{stderr}");
    assert!(stderr.contains("give --kubeconfig"), "{stderr}");
    let report: Value = serde_json::from_str(&out).expect("JSON");
    let repairs: Vec<(&str, &str)> = report["problems"]
        .as_array()
        .expect("problems")
        .iter()
        .map(|p| (p["kind"].as_str().unwrap_or_default(), p["repair"].as_str().unwrap_or("-")))
        .collect();
    assert!(repairs.contains(&("orphan-reservation", "repaired")), "{repairs:?}");
    assert!(repairs.contains(&("missing-reservation", "-")), "{repairs:?}");
    assert!(repairs.contains(&("duplicate-address", "-")), "{repairs:?}");
    assert_eq!(store.read_reservation("192.0.2.99").await, Ok(None), "the orphan is gone");
    let report = cli_json(&["check", "--file-store-dir", &d], 1);
    assert!(!report.to_string().contains("orphan-reservation"), "{report}");
}

#[test]
fn usage_errors_exit_2() {
    let dir = three_pods();
    let d = dir_arg(dir.path());
    let (code, _, stderr) = cli(&["leaks", "--file-store-dir", &d]);
    assert_eq!(code, 2);
    assert!(stderr.contains("with the file store, give --kubeconfig"), "{stderr}");
    let (code, _, stderr) = cli(&["pools"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("which store?"), "{stderr}");
    let (code, _, _) = cli(&["pools", "--config", "x", "--file-store-dir", &d]);
    assert_eq!(code, 2, "clap refuses both");
    let (code, _, stderr) = cli(&["pools", "--file-store-dir", "/nonexistent/store"]);
    assert_eq!(code, 1);
    assert!(stderr.contains("/nonexistent/store is not a directory"), "{stderr}");
    assert!(!Path::new("/nonexistent/store").exists());
}

// ---------------------------------------------------------------------------------------------
// the Kubernetes store, and pods looked up in Kubernetes

fn kube_netconf(cluster: &TestCluster) -> Value {
    json!({
        "cniVersion": "1.0.0",
        "name": "cli-net",
        "type": "macvlan",
        "ipam": {
            "type": "whereabouts",
            "range": "192.0.2.0/24",
            "datastore": "kubernetes",
            "kubernetes": { "kubeconfig": cluster.kubeconfig_path() },
            "log_level": "error",
        }
    })
}

async fn kube_add(cluster: &TestCluster, pod: &str, uid: &str) -> String {
    let cni_args = format!(
        "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={pod};K8S_POD_UID={uid}",
        cluster.namespace()
    );
    let container = format!("sandbox-{pod}-{uid}");
    let call =
        Call { binary: binary(), command: "ADD", container: &container, cni_args: &cni_args, node: "node-a" };
    let addresses = call.run(&kube_netconf(cluster)).await.addresses(&format!("ADD {pod}"));
    addresses[0].split('/').next().expect("an address").to_string()
}

/// Runs the CLI off the async test's thread.
async fn acli(args: Vec<String>) -> (i32, String, String) {
    tokio::task::spawn_blocking(move || cli(&args.iter().map(String::as_str).collect::<Vec<_>>()))
        .await
        .expect("join")
}

fn kube_args(cluster: &TestCluster, command: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = command.iter().map(|s| (*s).to_string()).collect();
    args.extend(["--kubeconfig".into(), cluster.kubeconfig_path().display().to_string()]);
    args.extend(["--namespace".into(), cluster.namespace().to_string()]);
    args
}

/// Every Kubernetes client honours `KUBECONFIG` (kubectl, client-go, kube-rs): so does the CLI, after
/// `--kubeconfig` and before in-cluster.
#[tokio::test]
async fn kubeconfig_env_names_the_cluster() {
    let cluster = TestCluster::start().await;
    kube_add(&cluster, "pod-env", "uid-env").await;
    let kubeconfig = cluster.kubeconfig_path().display().to_string();
    let namespace = cluster.namespace().to_string();
    let (code, stdout, stderr) = tokio::task::spawn_blocking(move || {
        cli_with_env(&["pools", "-o", "json", "--namespace", &namespace], &[("KUBECONFIG", &kubeconfig)])
    })
    .await
    .expect("join");
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains(POOL), "{stdout}");
    cluster.cleanup().await;
}

/// A kubeconfig whose server nothing verifies (one that skips TLS verification, or a plain HTTP
/// server) needs no root certificates on the machine: with none (an empty `SSL_CERT_FILE` and
/// `SSL_CERT_DIR`) the CLI still builds its client and goes as far as connecting, which fails here
/// because nothing listens.
#[test]
fn a_kubeconfig_verifying_nothing_needs_no_root_certificates_on_the_machine() {
    let dir = tempfile::tempdir().expect("temp dir");
    let no_roots = dir.path().join("no-roots.pem");
    std::fs::write(&no_roots, "").expect("write empty bundle");
    let no_root_dir = dir.path().join("no-roots.d");
    std::fs::create_dir(&no_root_dir).expect("create empty dir");
    for cluster in
        ["{server: 'https://127.0.0.1:1', insecure-skip-tls-verify: true}", "{server: 'http://127.0.0.1:1'}"]
    {
        let kubeconfig = dir.path().join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\ncurrent-context: ctx\n\
                 clusters: [{{name: c, cluster: {cluster}}}]\n\
                 users: [{{name: u, user: {{token: t}}}}]\n\
                 contexts: [{{name: ctx, context: {{cluster: c, user: u}}}}]\n"
            ),
        )
        .expect("write kubeconfig");
        let (code, stdout, stderr) = cli_with_env(
            &["pools", "--kubeconfig", &kubeconfig.display().to_string()],
            &[
                ("SSL_CERT_FILE", &no_roots.display().to_string()),
                ("SSL_CERT_DIR", &no_root_dir.display().to_string()),
            ],
        );
        assert_ne!(code, 0, "{cluster}: {stdout}");
        assert!(!stderr.contains("CA certificates"), "{cluster}: {stderr}");
        assert!(
            stderr.contains("127.0.0.1:1") || stderr.to_lowercase().contains("connect"),
            "{cluster}: {stderr}"
        );
    }
}

async fn held_ips(cluster: &TestCluster) -> Vec<String> {
    let (code, stdout, stderr) = acli(kube_args(cluster, &["ips", POOL, "-o", "json"])).await;
    assert_eq!(code, 0, "{stderr}");
    let json: Value = serde_json::from_str(&stdout).expect("JSON");
    json.as_array().expect("a list").iter().filter_map(|h| h["ip"].as_str().map(String::from)).collect()
}

async fn reservation_names(cluster: &TestCluster) -> Vec<String> {
    let api: Api<OverlappingRangeIPReservation> = Api::namespaced(cluster.client(), cluster.namespace());
    let mut names: Vec<String> = api
        .list(&Default::default())
        .await
        .expect("list")
        .items
        .into_iter()
        .filter_map(|r| r.metadata.name)
        .collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_pools_ips_release_and_check() {
    let cluster = TestCluster::start().await;
    let uid = cluster.create_pod("web-0", None).await;
    assert_eq!(kube_add(&cluster, "web-0", &uid).await, "192.0.2.1");
    let uid1 = cluster.create_pod("web-1", None).await;
    assert_eq!(kube_add(&cluster, "web-1", &uid1).await, "192.0.2.2");

    let (code, table, _) = acli(kube_args(&cluster, &["pools"])).await;
    assert_eq!(code, 0);
    assert!(
        table
            .lines()
            .nth(1)
            .is_some_and(|l| l.split_whitespace().collect::<Vec<_>>()
                == [POOL, "192.0.2.0/24", "254", "2", "252", "0.8%"]),
        "{table}"
    );
    let (_, json, _) = acli(kube_args(&cluster, &["pools", "-o", "json"])).await;
    let json: Value = serde_json::from_str(&json).expect("JSON");
    assert_eq!((json[0]["used"].clone(), json[0]["free"].clone()), (json!(2), json!(252)));

    let (code, table, _) = acli(kube_args(&cluster, &["ips", POOL])).await;
    assert_eq!(code, 0);
    let pod_ref = format!("{}/web-0", cluster.namespace());
    assert!(table.contains(&pod_ref) && table.contains(&uid), "{table}");
    let (_, json, _) = acli(kube_args(&cluster, &["ips", POOL, "-o", "json"])).await;
    let json: Value = serde_json::from_str(&json).expect("JSON");
    assert_eq!(json[1]["pod_uid"], json!(uid1));
    assert_eq!(json[1]["node"], "node-a");

    let (code, out, stderr) = acli(kube_args(&cluster, &["check"])).await;
    assert_eq!(code, 0, "{out}{stderr}");
    let (code, out, _) = acli(kube_args(&cluster, &["check", "-o", "json"])).await;
    assert_eq!(code, 0);
    assert_eq!(serde_json::from_str::<Value>(&out).expect("JSON")["allocations"], 2);

    let (code, out, stderr) = acli(kube_args(&cluster, &["release", "192.0.2.2", "--pool", POOL])).await;
    assert_eq!(code, 0, "{stderr}");
    assert!(out.contains("released 192.0.2.2") && out.contains("released reservation 192.0.2.2"), "{out}");
    assert_eq!(held_ips(&cluster).await, ["192.0.2.1"]);
    assert_eq!(reservation_names(&cluster).await, ["192.0.2.1"]);
    let (code, _, stderr) =
        acli(kube_args(&cluster, &["release", "192.0.2.2", "--pool", POOL, "-o", "json"])).await;
    assert_eq!(code, 1);
    assert!(stderr.contains("does not hold 192.0.2.2"), "{stderr}");

    // Planted: a reservation without a pool entry, and two overlapping pools holding one address for
    // different pods.
    let ns = cluster.namespace();
    let reservations: Api<OverlappingRangeIPReservation> = Api::namespaced(cluster.client(), ns);
    let holder =
        Reservation { pod_ref: format!("{ns}/ghost"), ifname: "net1".into(), container_id: "g".into() };
    let orip = OverlappingRangeIPReservation::new("192.0.2.77", OverlappingRangeIPReservationSpec { holder });
    reservations.create(&PostParams::default(), &orip).await.expect("plant a reservation");
    let mut intruder = allocation("intruder");
    intruder.pod_ref = format!("{ns}/intruder");
    let spec = PoolSpec {
        range: "192.0.2.0/25".into(),
        allocations: [("1".to_string(), intruder)].into(),
        ..Default::default()
    };
    let pools: Api<IPPool> = Api::namespaced(cluster.client(), ns);
    pools
        .create(&PostParams::default(), &IPPool::new("192.0.2.0-25", IPPoolSpec { pool: spec }))
        .await
        .expect("plant a pool");

    let (code, table, _) = acli(kube_args(&cluster, &["check"])).await;
    assert_eq!(code, 1, "{table}");
    assert!(table.contains("orphan-reservation") && table.contains("192.0.2.77"), "{table}");
    assert!(table.contains("duplicate-address"), "{table}");
    let (code, out, _) = acli(kube_args(&cluster, &["check", "-o", "json"])).await;
    assert_eq!(code, 1);
    let report: Value = serde_json::from_str(&out).expect("JSON");
    let kinds: Vec<&str> =
        report["problems"].as_array().expect("problems").iter().filter_map(|p| p["kind"].as_str()).collect();
    assert!(kinds.contains(&"orphan-reservation") && kinds.contains(&"duplicate-address"), "{kinds:?}");

    // --repair deletes the orphaned reservation (as listed); the duplicate is not its to resolve.
    let (code, out, stderr) = acli(kube_args(&cluster, &["check", "--repair", "-o", "json"])).await;
    assert_eq!(code, 1, "{out}{stderr}");
    let report: Value = serde_json::from_str(&out).expect("JSON");
    let repairs: Vec<(&str, &str)> = report["problems"]
        .as_array()
        .expect("problems")
        .iter()
        .map(|p| (p["kind"].as_str().unwrap_or(""), p["repair"].as_str().unwrap_or("-")))
        .collect();
    assert!(repairs.contains(&("orphan-reservation", "repaired")), "{repairs:?}");
    assert!(repairs.contains(&("duplicate-address", "-")), "{repairs:?}");
    assert!(reservations.get_opt("192.0.2.77").await.expect("GET").is_none(), "the orphan is gone");
    assert_eq!(reservation_names(&cluster).await, ["192.0.2.1"]);
    let (code, table, _) = acli(kube_args(&cluster, &["check"])).await;
    assert_eq!(code, 1, "{table}");
    assert!(!table.contains("orphan-reservation") && table.contains("duplicate-address"), "{table}");
    cluster.cleanup().await;
}

/// `check --repair` makes the missing reservation of a running pod's allocation again (as the
/// reconciler does), and leaves that of a pod still starting, whose ADD may be making it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_check_repair_restores_missing_reservations() {
    let cluster = TestCluster::start().await;
    let running = cluster.create_pod("running", None).await;
    assert_eq!(kube_add(&cluster, "running", &running).await, "192.0.2.1");
    let phase = json!({ "status": { "phase": "Running" } });
    Api::<Pod>::namespaced(cluster.client(), cluster.namespace())
        .patch_status("running", &PatchParams::default(), &Patch::Merge(&phase))
        .await
        .expect("set the phase");
    let starting = cluster.create_pod("starting", None).await;
    assert_eq!(kube_add(&cluster, "starting", &starting).await, "192.0.2.2");
    let reservations: Api<OverlappingRangeIPReservation> =
        Api::namespaced(cluster.client(), cluster.namespace());
    for name in ["192.0.2.1", "192.0.2.2"] {
        reservations.delete(name, &Default::default()).await.expect("delete a reservation");
    }

    let (code, out, stderr) = acli(kube_args(&cluster, &["check", "--repair", "-o", "json"])).await;
    assert_eq!(code, 1, "the starting pod's remains: {out}{stderr}");
    let report: Value = serde_json::from_str(&out).expect("JSON");
    let problems: Vec<(&str, &str, &str)> = report["problems"]
        .as_array()
        .expect("problems")
        .iter()
        .map(|p| {
            (
                p["kind"].as_str().unwrap_or(""),
                p["ip"].as_str().unwrap_or(""),
                p["repair"].as_str().unwrap_or("-"),
            )
        })
        .collect();
    assert_eq!(
        problems,
        [("missing-reservation", "192.0.2.1", "repaired"), ("missing-reservation", "192.0.2.2", "-")]
    );
    assert_eq!(report["problems"][0]["reservation"], "192.0.2.1");
    let restored = reservations.get("192.0.2.1").await.expect("restored");
    assert_eq!(restored.spec.holder.pod_ref, format!("{}/running", cluster.namespace()));
    assert_eq!(reservation_names(&cluster).await, ["192.0.2.1"]);
    cluster.cleanup().await;
}

/// Pods deleted, alive, and recreated under the same name (the new pod's network-status written
/// without the old pod's address): `leaks` lists exactly the first and the last, changes nothing in a
/// dry run, and `--release` frees exactly those.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_leaks_dry_run_then_release() {
    let cluster = TestCluster::start().await;
    let mut ips = Vec::new();
    for pod in ["alive", "gone", "recreated"] {
        let uid = cluster.create_pod(pod, None).await;
        ips.push(kube_add(&cluster, pod, &uid).await);
    }
    assert_eq!(ips, ["192.0.2.1", "192.0.2.2", "192.0.2.3"]);
    cluster.delete_pod("gone").await;
    cluster.delete_pod("recreated").await;
    cluster.create_pod("recreated", None).await;
    let status = json!([{ "name": "cbr0", "interface": "eth0", "ips": ["10.244.0.9"], "default": true }]);
    let annotation =
        json!({ "metadata": { "annotations": { "k8s.v1.cni.cncf.io/network-status": status.to_string() } } });
    Api::<Pod>::namespaced(cluster.client(), cluster.namespace())
        .patch("recreated", &PatchParams::default(), &Patch::Merge(&annotation))
        .await
        .expect("annotate the recreated pod");
    let before = held_ips(&cluster).await;
    let reservations_before = reservation_names(&cluster).await;

    let (code, out, stderr) = acli(kube_args(&cluster, &["leaks", "-o", "json"])).await;
    assert_eq!(code, 1, "leaks found: {stderr}");
    let report: Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(report["dry_run"], true);
    let leaked: Vec<(&str, &str, &str)> = report["allocations"]
        .as_array()
        .expect("allocations")
        .iter()
        .map(|a| {
            (
                a["ip"].as_str().unwrap_or(""),
                a["reason"].as_str().unwrap_or(""),
                a["status"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(leaked, [("192.0.2.2", "pod_gone", "leaked"), ("192.0.2.3", "pod_replaced", "leaked")]);
    assert_eq!(report["allocations"][0]["reservations"], json!(["192.0.2.2"]));
    let (code, table, _) = acli(kube_args(&cluster, &["leaks"])).await;
    assert_eq!(code, 1);
    assert!(table.contains("2 leaked addresses and 0 orphaned reservations (dry run"), "{table}");
    assert_eq!(held_ips(&cluster).await, before, "a dry run changes nothing");
    assert_eq!(reservation_names(&cluster).await, reservations_before);

    let (code, table, stderr) = acli(kube_args(&cluster, &["leaks", "--release"])).await;
    assert_eq!(code, 0, "{table}{stderr}");
    assert!(table.contains("released 2 addresses"), "{table}");
    assert_eq!(held_ips(&cluster).await, ["192.0.2.1"]);
    assert_eq!(reservation_names(&cluster).await, ["192.0.2.1"]);
    let (code, out, _) = acli(kube_args(&cluster, &["leaks", "-o", "json"])).await;
    assert_eq!(code, 0, "nothing left");
    assert_eq!(serde_json::from_str::<Value>(&out).expect("JSON")["allocations"], json!([]));
    cluster.cleanup().await;
}

/// The file store with pods looked up through `--kubeconfig`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_store_leaks_with_pods_in_kubernetes() {
    let cluster = TestCluster::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let ns = cluster.namespace().to_string();
    for pod in ["keep", "lose"] {
        let uid = cluster.create_pod(pod, None).await;
        let (path, ns, pod) = (dir.path().to_path_buf(), ns.clone(), pod.to_string());
        tokio::task::spawn_blocking(move || file_add(&path, "192.0.2.0/24", &ns, &pod, &uid))
            .await
            .expect("join");
    }
    cluster.delete_pod("lose").await;
    let d = dir_arg(dir.path());
    let kubeconfig = cluster.kubeconfig_path().display().to_string();
    let args = |extra: &[&str]| -> Vec<String> {
        ["leaks", "--file-store-dir", &d, "--kubeconfig", &kubeconfig]
            .iter()
            .chain(extra)
            .map(|s| (*s).to_string())
            .collect()
    };
    let (code, out, stderr) = acli(args(&["-o", "json", "--release"])).await;
    assert_eq!(code, 0, "{out}{stderr}");
    let report: Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(report["allocations"][0]["ip"], "192.0.2.2");
    assert_eq!(report["allocations"][0]["status"], "released");
    assert_eq!(report["allocations"].as_array().map(Vec::len), Some(1));
    let ips = cli_json(&["ips", POOL, "--file-store-dir", &d], 0);
    assert_eq!(ips.as_array().map(Vec::len), Some(1));
    assert_eq!(ips[0]["pod"], format!("{ns}/keep"));
    cluster.cleanup().await;
}

/// Creates the IPPool `name` of `range` with allocations (key, pod, node that made it).
async fn plant_pool(cluster: &TestCluster, name: &str, range: &str, entries: &[(&str, &str, &str)]) {
    let allocations = entries
        .iter()
        .map(|(key, pod, node)| {
            let mut held = allocation(pod);
            held.node = Some(node.to_string());
            (key.to_string(), held)
        })
        .collect();
    let spec = PoolSpec { range: range.into(), allocations, ..Default::default() };
    Api::<IPPool>::namespaced(cluster.client(), cluster.namespace())
        .create(&PostParams::default(), &IPPool::new(name, IPPoolSpec { pool: spec }))
        .await
        .unwrap_or_else(|e| panic!("plant pool {name}: {e}"));
}

/// `check -o json` (reservations not required): the exit code and the (kind, pool, ip) of its problems
/// and of its warnings (none when it lists none).
async fn kube_check(
    cluster: &TestCluster,
) -> (i32, Vec<(String, String, String)>, Vec<(String, String, String)>) {
    let (code, out, stderr) =
        acli(kube_args(cluster, &["check", "--no-overlapping-ranges", "-o", "json"])).await;
    let report: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}{stderr}"));
    let findings = |list: &Value| -> Vec<(String, String, String)> {
        let field = |f: &Value, key: &str| f[key].as_str().unwrap_or_default().to_string();
        let mut found: Vec<_> = list
            .as_array()
            .into_iter()
            .flatten()
            .map(|f| (field(f, "kind"), field(f, "pool"), field(f, "ip")))
            .collect();
        found.sort();
        found
    };
    (code, findings(&report["problems"]), findings(&report["warnings"]))
}

/// Node-slice pools of one network, of different nodes and of the layouts before and after a
/// re-slicing (/26, then /27), holding one address for different pods: a duplicate, with and without a
/// `network_name`. Another network's pool holding it is not one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_check_compares_the_node_slice_pools_of_one_network() {
    let cluster = TestCluster::start().await;
    plant_pool(&cluster, "blue-node-a-10.99.0.0-26", "10.99.0.0/26", &[("5", "a", "node-a")]).await;
    plant_pool(&cluster, "blue-node-b-10.99.0.0-27", "10.99.0.0/27", &[("5", "b", "node-b")]).await;
    plant_pool(&cluster, "red-node-c-10.99.0.0-26", "10.99.0.0/26", &[("5", "c", "node-c")]).await;
    plant_pool(
        &cluster,
        "node-a-10.99.1.0-26",
        "10.99.1.0/26",
        &[("7", "d", "node-a"), ("8", "e", "node-a")],
    )
    .await;
    plant_pool(
        &cluster,
        "node-b-10.99.1.0-27",
        "10.99.1.0/27",
        &[("7", "f", "node-b"), ("8", "e", "node-b")],
    )
    .await;

    let (code, problems, warnings) = kube_check(&cluster).await;
    assert_eq!(code, 1);
    let duplicate =
        |pool: &str, ip: &str| ("duplicate-address".to_string(), pool.to_string(), ip.to_string());
    assert_eq!(
        problems,
        [duplicate("blue-node-a-10.99.0.0-26", "10.99.0.5"), duplicate("node-a-10.99.1.0-26", "10.99.1.7")],
        "e's two entries are one holder's"
    );
    assert!(warnings.is_empty(), "{warnings:?}");
    cluster.cleanup().await;
}

/// An IPv6 allocation at an offset of 2^63 or more, which upstream whereabouts skips when reading (and
/// its next write of the pool removes): a warning, which alone leaves the exit code 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_check_warns_of_offsets_upstream_cannot_read() {
    let cluster = TestCluster::start().await;
    let entries = [
        ("1", "low", "node-a"),
        ("9223372036854775807", "below", "node-a"),
        ("9223372036854775808", "high", "node-a"),
    ];
    plant_pool(&cluster, "v6-2001-db8---64", "2001:db8::/64", &entries).await;

    let (code, problems, warnings) = kube_check(&cluster).await;
    assert_eq!(code, 0, "{problems:?}");
    let unreadable = (
        "upstream-unreadable-offset".to_string(),
        "v6-2001-db8---64".to_string(),
        "2001:db8:0:0:8000::".to_string(),
    );
    assert_eq!(warnings, [unreadable]);
    let (code, table, _) = acli(kube_args(&cluster, &["check", "--no-overlapping-ranges"])).await;
    assert_eq!(code, 0, "{table}");
    assert!(
        table.lines().any(|l| l.split_whitespace().take(3).eq([
            "upstream-unreadable-offset",
            "v6-2001-db8---64",
            "2001:db8:0:0:8000::"
        ])),
        "{table}"
    );
    assert!(table.ends_with("0 problems in 1 pools, 3 allocations, 0 reservations; 1 warnings\n"), "{table}");
    cluster.cleanup().await;
}
