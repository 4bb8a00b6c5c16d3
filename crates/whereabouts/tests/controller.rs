//! The controller (`whereabouts controller`, `whereabouts reconcile`) as processes, against the
//! in-process fake API server by default or the cluster named by `WHEREABOUTS_TEST_KUBECONFIG` (each
//! test in a fresh namespace).
//!
//! The tests act out what the rest of a cluster does: they create Pods and Nodes as objects, run the
//! real plugin binary for the ADDs a runtime would make (with the pod's uid in `CNI_ARGS`, as Multus
//! passes it), write the `network-status` annotation as Multus would, set pod phases as a kubelet
//! would, and delete pods without the runtime's DEL (a node that died, a force delete): what is left
//! is the controller's to release.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use whereabouts_core::pool::Allocation;
use whereabouts_k8s::crd::{IPPool, OverlappingRangeIPReservation, OverlappingRangeIPReservationSpec};
use whereabouts_k8s::kube::api::{Api, Patch, PatchParams, PostParams};
use whereabouts_kube_testing::plugin::Call;
use whereabouts_kube_testing::{TestCluster, upstream};
use whereabouts_store::Reservation;

const NETWORK: &str = "ctl-net";
const RANGE: &str = "192.0.2.0/24";
/// The pool's name: the range's, as the configuration sets no `network_name`.
const POOL: &str = "192.0.2.0-24";

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_whereabouts"))
}

fn netconf(cluster: &TestCluster) -> Value {
    network(cluster, json!({}))
}

/// The network configuration with `extra` keys in its `ipam`.
fn network(cluster: &TestCluster, extra: Value) -> Value {
    let mut netconf = json!({
        "cniVersion": "1.0.0",
        "name": NETWORK,
        "type": "macvlan",
        "ipam": {
            "type": "whereabouts",
            "range": RANGE,
            "datastore": "kubernetes",
            "kubernetes": { "kubeconfig": cluster.kubeconfig_path() },
            "log_level": "error",
        }
    });
    for (key, value) in extra.as_object().expect("an object") {
        netconf["ipam"][key] = value.clone();
    }
    netconf
}

// ---------------------------------------------------------------------------------------------
// acting as the scheduler, the kubelet and Multus

fn pods(cluster: &TestCluster) -> Api<Pod> {
    Api::namespaced(cluster.client(), cluster.namespace())
}

async fn set_phase(cluster: &TestCluster, name: &str, phase: &str) {
    let patch = json!({ "status": { "phase": phase } });
    pods(cluster)
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("set phase");
}

/// Writes the `network-status` annotation as Multus does after the ADDs.
async fn annotate(cluster: &TestCluster, name: &str, ips: &[&str]) {
    let status = json!([
        { "name": "cbr0", "interface": "eth0", "ips": ["10.244.0.9"], "default": true },
        { "name": format!("{}/{NETWORK}", cluster.namespace()), "interface": "net1", "ips": ips },
    ]);
    let patch =
        json!({ "metadata": { "annotations": { "k8s.v1.cni.cncf.io/network-status": status.to_string() } } });
    pods(cluster).patch(name, &PatchParams::default(), &Patch::Merge(&patch)).await.expect("annotate pod");
}

/// The plugin's ADD for a pod, as the runtime makes it; the address it got.
async fn add(cluster: &TestCluster, pod: &str, uid: &str, container: &str, node: &str) -> String {
    add_to(cluster, &netconf(cluster), (pod, uid), container, node).await
}

/// [`add`] on the network `netconf`.
async fn add_to(
    cluster: &TestCluster,
    netconf: &Value,
    (pod, uid): (&str, &str),
    container: &str,
    node: &str,
) -> String {
    let addresses =
        plugin(cluster, netconf, "ADD", (pod, uid), container, node).await.addresses(&format!("ADD {pod}"));
    addresses[0].split('/').next().expect("an address").to_string()
}

/// The runtime's DEL of a pod's sandbox on the network `netconf`.
async fn del_from(
    cluster: &TestCluster,
    netconf: &Value,
    (pod, uid): (&str, &str),
    container: &str,
    node: &str,
) {
    plugin(cluster, netconf, "DEL", (pod, uid), container, node).await.silent(&format!("DEL {pod}"));
}

/// One plugin call for a pod's sandbox.
async fn plugin(
    cluster: &TestCluster,
    netconf: &Value,
    command: &str,
    (pod, uid): (&str, &str),
    container: &str,
    node: &str,
) -> whereabouts_kube_testing::plugin::Outcome {
    let cni_args = format!(
        "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={pod};K8S_POD_UID={uid}",
        cluster.namespace()
    );
    Call { binary: binary(), command, container, cni_args: &cni_args, node }.run(netconf).await
}

/// The pool's allocations by address.
async fn held(cluster: &TestCluster) -> Vec<(String, Allocation)> {
    let api: Api<IPPool> = Api::namespaced(cluster.client(), cluster.namespace());
    let Some(pool) = api.get_opt(POOL).await.expect("read the pool") else {
        return Vec::new();
    };
    let base: std::net::Ipv4Addr = "192.0.2.0".parse().expect("an address");
    let mut out: Vec<(String, Allocation)> = pool
        .spec
        .pool
        .allocations
        .into_iter()
        .map(|(offset, a)| {
            let ip =
                std::net::Ipv4Addr::from(u32::from(base) + offset.parse::<u32>().expect("a decimal offset"));
            (ip.to_string(), a)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

async fn held_ips(cluster: &TestCluster) -> Vec<String> {
    held(cluster).await.into_iter().map(|(ip, _)| ip).collect()
}

/// Polls `check` until it holds or `limit` passes; says whether it held.
async fn eventually<F, Fut>(limit: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let started = Instant::now();
    loop {
        if check().await {
            return true;
        }
        if started.elapsed() > limit {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// the controller process

struct Controller {
    child: tokio::process::Child,
    address: SocketAddr,
    log: Arc<Mutex<String>>,
}

impl Controller {
    /// Starts `whereabouts controller` on the test cluster with `args`, serving metrics on a free
    /// loopback port; waits until it says where.
    async fn start(cluster: &TestCluster, args: &[&str]) -> Controller {
        // No schedule file unless the test gives one: the default schedule is not due during a test.
        let cron: &[&str] =
            if args.contains(&"--cron-file") { &[] } else { &["--cron-file", "/nonexistent/config"] };
        let mut child = tokio::process::Command::new(binary())
            .arg("controller")
            .args(cron)
            // Through KUBECONFIG, as kubectl users name a cluster: the controller honours it.
            .env("KUBECONFIG", cluster.kubeconfig_path())
            .env_remove("KUBECONFIG_PATH")
            .args(["--namespace", cluster.namespace(), "--metrics-address", "127.0.0.1:0"])
            .args(["--log-level", "debug"])
            // A real cluster is shared: slice only this test's Nodes and NADs.
            .args(["--node-slice-node-selector", &cluster.selector()])
            .args(["--node-slice-nad-selector", &cluster.selector()])
            .args(args)
            .env_remove("WHEREABOUTS_RECONCILER_CRON")
            .env_remove("NODENAME")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start the controller");
        let log = Arc::new(Mutex::new(String::new()));
        let (found, address) = tokio::sync::oneshot::channel();
        let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
        let sink = log.clone();
        tokio::spawn(async move {
            let mut found = Some(found);
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(rest) = line.split("/readyz on ").nth(1)
                    && let (Some(found), Ok(address)) = (found.take(), rest.trim().parse::<SocketAddr>())
                {
                    let _ = found.send(address);
                }
                sink.lock().expect("the log").push_str(&(line + "\n"));
            }
        });
        let address = tokio::time::timeout(Duration::from_secs(30), address)
            .await
            .unwrap_or_else(|_| panic!("the controller did not start: {}", log.lock().expect("the log")))
            .unwrap_or_else(|_| panic!("the controller exited: {}", log.lock().expect("the log")));
        Controller { child, address, log }
    }

    fn log(&self) -> String {
        self.log.lock().expect("the log").clone()
    }

    /// GET `path` on the metrics server: (status, body).
    async fn get(&self, path: &str) -> (u16, String) {
        let mut stream = tokio::net::TcpStream::connect(self.address).await.expect("connect");
        let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.expect("send");
        let mut response = String::new();
        stream.read_to_string(&mut response).await.expect("read");
        let status = response.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("a status");
        let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
        (status, body)
    }

    async fn ready(&self) -> bool {
        self.get("/readyz").await.0 == 200
    }

    /// The value of the metric line starting with `series` (name and labels), if present.
    async fn metric(&self, series: &str) -> Option<f64> {
        let (_, body) = self.get("/metrics").await;
        body.lines().find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
    }

    async fn kill(mut self) {
        let _ = self.child.kill().await;
    }

    /// SIGTERM, as Kubernetes stops a pod; the exit status.
    async fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().expect("running");
        // kill(1) rather than libc::kill: the workspace forbids unsafe code, tests included.
        let _ = tokio::process::Command::new("kill").arg("-TERM").arg(pid.to_string()).status().await;
        tokio::time::timeout(Duration::from_secs(20), self.child.wait())
            .await
            .expect("the controller stops on SIGTERM")
            .expect("wait")
    }
}

/// A controller without election or node slices, ready to act.
async fn single_controller(cluster: &TestCluster) -> Controller {
    let controller = Controller::start(cluster, &["--no-leader-election", "--no-node-slices"]).await;
    assert!(
        eventually(Duration::from_secs(20), || controller.ready()).await,
        "never ready: {}",
        controller.log()
    );
    controller
}

/// `whereabouts reconcile` once: (exit code, stdout).
async fn reconcile(cluster: &TestCluster, extra: &[&str]) -> (i32, String) {
    let output = tokio::process::Command::new(binary())
        .arg("reconcile")
        .args(["--kubeconfig", &cluster.kubeconfig_path().display().to_string()])
        .args(["--namespace", cluster.namespace()])
        .args(extra)
        .output()
        .await
        .expect("run reconcile");
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    let code = output.status.code().unwrap_or(-1);
    assert!(code == 0, "reconcile failed ({code}): {stdout}{}", String::from_utf8_lossy(&output.stderr));
    (code, stdout)
}

// ---------------------------------------------------------------------------------------------
// pod-deletion cleanup

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_pod_is_released_within_seconds_with_an_event() {
    let cluster = TestCluster::start().await;
    let node = cluster.unique("a");
    let controller = single_controller(&cluster).await;
    let uid = cluster.create_pod("web-0", Some(&node)).await;
    let ip = add(&cluster, "web-0", &uid, "sandbox-1", &node).await;
    annotate(&cluster, "web-0", &[&ip]).await;
    let kept_uid = cluster.create_pod("web-1", Some(&node)).await;
    let kept = add(&cluster, "web-1", &kept_uid, "sandbox-2", &node).await;
    let stored = held(&cluster).await;
    assert_eq!(stored[0].1.pod_uid.as_deref(), Some(uid.as_str()), "the plugin records the pod's uid");

    let deleted = Instant::now();
    cluster.delete_pod("web-0").await;
    assert!(
        eventually(Duration::from_secs(10), || async { held_ips(&cluster).await == [kept.clone()] }).await,
        "{ip} still held: {:?}\n{}",
        held_ips(&cluster).await,
        controller.log()
    );
    println!("released {:?} after the delete", deleted.elapsed());
    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(cluster.client(), cluster.namespace());
    let found = eventually(Duration::from_secs(10), || async {
        let list = events.list(&Default::default()).await.expect("list events");
        list.items.iter().any(|e| {
            e.reason.as_deref() == Some("IPAddressGarbageCollected")
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("web-0")
                && e.note.as_deref().is_some_and(|n| n.contains(&format!("[{ip}]")) && n.contains(NETWORK))
        })
    })
    .await;
    assert!(found, "no IPAddressGarbageCollected event naming {ip}");
    let reservations: Api<OverlappingRangeIPReservation> =
        Api::namespaced(cluster.client(), cluster.namespace());
    assert!(reservations.get_opt(&ip).await.unwrap().is_none(), "its reservation too");
    assert!(reservations.get_opt(&kept).await.unwrap().is_some());
    controller.kill().await;
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recreated_pod_keeps_the_address_it_took_over() {
    let cluster = TestCluster::start().await;
    let node = cluster.unique("a");
    let controller = single_controller(&cluster).await;
    let old_uid = cluster.create_pod("db-0", Some(&node)).await;
    add(&cluster, "db-0", &old_uid, "sandbox-old", &node).await;
    // The StatefulSet controller deletes and recreates db-0, and the new pod's sandbox ADD runs while
    // the controller acts on the deletion.
    cluster.delete_pod("db-0").await;
    let new_uid = cluster.create_pod("db-0", Some(&node)).await;
    assert_ne!(old_uid, new_uid);
    let again = add(&cluster, "db-0", &new_uid, "sandbox-new", &node).await;
    // Either the new sandbox took the address over before the controller acted on the deletion (then
    // the controller's compare-and-swap on the old record fails), or the controller released it first
    // and the new sandbox got a fresh one: in both cases the new pod holds what it was answered.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let stored = held(&cluster).await;
    assert_eq!(stored.len(), 1, "{stored:?}");
    assert_eq!(stored[0].0, again);
    assert_eq!(stored[0].1.pod_uid.as_deref(), Some(new_uid.as_str()));
    assert_eq!(stored[0].1.container_id, "sandbox-new");
    let (_, out) = reconcile(&cluster, &[]).await;
    assert!(out.contains("released 0 addresses"), "{out}");
    assert_eq!(held_ips(&cluster).await, [again]);
    controller.kill().await;
    cluster.cleanup().await;
}

/// A static pod's mirror pod deleted by hand (`kubectl delete`): the kubelet keeps running the pod and
/// makes the mirror again later, so neither the cleanup nor the reconciler may free its address while
/// its node exists. Once the node is gone, the reconciler frees it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_static_pods_address_outlives_its_deleted_mirror_pod_while_its_node_exists() {
    let cluster = TestCluster::start().await;
    let node = cluster.create_node("static").await;
    let controller = single_controller(&cluster).await;
    // The kubelet names the mirror pod `<name>-<node>` and passes its own uid for it.
    let mirror = format!("etcd-{node}");
    cluster.create_pod(&mirror, Some(&node)).await;
    let ip = add(&cluster, &mirror, "static-config-hash", "sandbox-static", &node).await;
    let plain_uid = cluster.create_pod("plain", Some(&node)).await;
    let plain = add(&cluster, "plain", &plain_uid, "sandbox-plain", &node).await;

    cluster.delete_pod(&mirror).await;
    cluster.delete_pod("plain").await;
    // The plain pod's address goes within seconds; by then the cleanup has judged the mirror's too.
    assert!(
        eventually(Duration::from_secs(10), || async { held_ips(&cluster).await == [ip.clone()] }).await,
        "{plain} released and {ip} kept: {:?}\n{}",
        held_ips(&cluster).await,
        controller.log()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(held_ips(&cluster).await, std::slice::from_ref(&ip), "{}", controller.log());
    let (_, out) = reconcile(&cluster, &[]).await;
    assert!(out.contains("released 0 addresses"), "{out}");
    assert_eq!(held_ips(&cluster).await, [ip]);

    cluster.delete_node(&node).await;
    let (_, out) = reconcile(&cluster, &[]).await;
    assert!(out.contains("released 1 addresses"), "{out}");
    assert!(held_ips(&cluster).await.is_empty());
    controller.kill().await;
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_pod_is_released() {
    let cluster = TestCluster::start().await;
    let node = cluster.unique("a");
    let controller = single_controller(&cluster).await;
    let uid = cluster.create_pod("job-1", Some(&node)).await;
    let ip = add(&cluster, "job-1", &uid, "sandbox-job", &node).await;
    annotate(&cluster, "job-1", &[&ip]).await;
    set_phase(&cluster, "job-1", "Running").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(held_ips(&cluster).await, std::slice::from_ref(&ip), "a running pod keeps its address");
    set_phase(&cluster, "job-1", "Succeeded").await;
    assert!(
        eventually(Duration::from_secs(10), || async { held_ips(&cluster).await.is_empty() }).await,
        "{}",
        controller.log()
    );
    controller.kill().await;
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_node_mode_cleans_up_only_its_node() {
    let cluster = TestCluster::start().await;
    let (mine, other) = (cluster.create_node("mine").await, cluster.unique("other"));
    let controller = Controller::start(&cluster, &["--mode", "node", "--node", &mine]).await;
    assert!(eventually(Duration::from_secs(20), || controller.ready()).await, "{}", controller.log());
    let here = cluster.create_pod("here", Some(&mine)).await;
    let there = cluster.create_pod("there", Some(&other)).await;
    let _ = add(&cluster, "here", &here, "sandbox-here", &mine).await;
    let left = add(&cluster, "there", &there, "sandbox-there", &other).await;
    cluster.delete_pod("there").await;
    cluster.delete_pod("here").await;
    assert!(
        eventually(Duration::from_secs(10), || async { held_ips(&cluster).await == [left.clone()] }).await,
        "{:?}\n{}",
        held_ips(&cluster).await,
        controller.log()
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(held_ips(&cluster).await, [left], "another node's pod is that node's controller's");
    // A node that does not exist is refused at start, as upstream.
    let output = tokio::process::Command::new(binary())
        .args(["controller", "--mode", "node", "--node", "no-such-node", "--metrics-address", ""])
        .args(["--kubeconfig", &cluster.kubeconfig_path().display().to_string()])
        .output()
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("no-such-node"));
    controller.kill().await;
    cluster.cleanup().await;
}

// ---------------------------------------------------------------------------------------------
// reconciliation

/// An allocation the way upstream's plugin writes it: no uid, no node, no network.
fn upstream_record(cluster: &TestCluster, pod: &str, container: &str) -> Value {
    json!({ "id": container, "podref": format!("{}/{pod}", cluster.namespace()), "ifname": "net1" })
}

async fn write_pool(cluster: &TestCluster, allocations: Value) {
    let api: Api<IPPool> = Api::namespaced(cluster.client(), cluster.namespace());
    let pool: IPPool = serde_json::from_value(json!({
        "apiVersion": "whereabouts.cni.cncf.io/v1alpha1",
        "kind": "IPPool",
        "metadata": { "name": POOL },
        "spec": { "range": RANGE, "allocations": allocations },
    }))
    .expect("an IPPool");
    api.create(&PostParams::default(), &pool).await.expect("create the pool");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reconciler_never_releases_a_starting_pod_and_dry_run_changes_nothing() {
    let cluster = TestCluster::start().await;
    let node = cluster.unique("a");
    // Upstream-written records (no uid), so only the pods' state can decide.
    for pod in ["starting", "pending", "running-listed", "running-unlisted"] {
        cluster.create_pod(pod, Some(&node)).await;
    }
    write_pool(
        &cluster,
        json!({
            "1": upstream_record(&cluster, "starting", "c1"),         // no network-status yet
            "2": upstream_record(&cluster, "pending", "c2"),          // Pending, status lists another IP
            "3": upstream_record(&cluster, "running-listed", "c3"),   // listed
            "4": upstream_record(&cluster, "running-unlisted", "c4"), // running, status lists another IP
            "5": upstream_record(&cluster, "gone", "c5"),             // no such pod
        }),
    )
    .await;
    annotate(&cluster, "pending", &["192.0.2.99"]).await;
    annotate(&cluster, "running-listed", &["192.0.2.3"]).await;
    annotate(&cluster, "running-unlisted", &["192.0.2.98"]).await;
    set_phase(&cluster, "starting", "Running").await;
    set_phase(&cluster, "running-listed", "Running").await;
    set_phase(&cluster, "running-unlisted", "Running").await;
    // An orphaned reservation (nothing in any pool), and one a pool entry stands behind.
    let reservations: Api<OverlappingRangeIPReservation> =
        Api::namespaced(cluster.client(), cluster.namespace());
    for (name, pod) in [("other-net-192.0.2.200", "vanished"), ("192.0.2.3", "running-listed")] {
        let holder = Reservation {
            pod_ref: format!("{}/{pod}", cluster.namespace()),
            ifname: "net1".into(),
            container_id: if pod == "vanished" { "cx".into() } else { "c3".into() },
        };
        let orip = OverlappingRangeIPReservation::new(name, OverlappingRangeIPReservationSpec { holder });
        reservations.create(&PostParams::default(), &orip).await.expect("create reservation");
    }

    let before = held_ips(&cluster).await;
    let (_, out) = reconcile(&cluster, &["--dry-run"]).await;
    assert!(out.contains("would release 192.0.2.4 ") && out.contains("would release 192.0.2.5 "), "{out}");
    assert!(out.contains("would release orphaned reservation other-net-192.0.2.200"), "{out}");
    assert!(out.contains("would release 2 addresses and 1 orphaned reservations"), "{out}");
    assert_eq!(held_ips(&cluster).await, before, "dry run changes nothing");
    assert!(reservations.get_opt("other-net-192.0.2.200").await.unwrap().is_some());

    let (_, out) = reconcile(&cluster, &[]).await;
    assert!(out.contains("released 2 addresses and 1 orphaned reservations"), "{out}");
    assert!(
        out.contains("(pod ") && out.contains("not_in_network_status") && out.contains("pod_gone"),
        "{out}"
    );
    assert_eq!(held_ips(&cluster).await, ["192.0.2.1", "192.0.2.2", "192.0.2.3"]);
    assert!(reservations.get_opt("other-net-192.0.2.200").await.unwrap().is_none());
    assert!(reservations.get_opt("192.0.2.3").await.unwrap().is_some());
    let (_, out) = reconcile(&cluster, &[]).await;
    assert!(out.contains("released 0 addresses and 0 orphaned reservations"), "idempotent: {out}");
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_upstream_took_over_for_a_recreated_pod_is_kept() {
    let cluster = TestCluster::start().await;
    let node = cluster.unique("a");
    let old_uid = cluster.create_pod("db-0", Some(&node)).await;
    let ip = add(&cluster, "db-0", &old_uid, "sandbox-old", &node).await;
    // The pod is recreated and its new sandbox's ADD runs on a node still on upstream's plugin, which
    // takes the entry of the same pod and interface over by rewriting only its `id`.
    cluster.delete_pod("db-0").await;
    let new_uid = cluster.create_pod("db-0", Some(&node)).await;
    assert_ne!(old_uid, new_uid);
    let call = upstream::CallContext {
        container_id: "sandbox-new".into(),
        ifname: "net1".into(),
        pod_namespace: cluster.namespace().into(),
        pod_name: "db-0".into(),
    };
    let config = upstream::UpstreamConfig::new(RANGE.parse().expect("a CIDR"));
    let again =
        upstream::add(&cluster.client(), cluster.namespace(), &config, &call).await.expect("upstream ADD");
    assert_eq!(again.to_string(), ip);
    let stored = held(&cluster).await;
    assert_eq!(stored[0].1.container_id, "sandbox-new");
    assert_eq!(stored[0].1.pod_uid.as_deref(), Some(old_uid.as_str()), "upstream leaves our poduid");

    // Starting (no network-status yet), then running with the address listed: the new pod's.
    let (_, out) = reconcile(&cluster, &[]).await;
    assert!(out.contains("released 0 addresses"), "{out}");
    annotate(&cluster, "db-0", &[&ip]).await;
    set_phase(&cluster, "db-0", "Running").await;
    let (_, out) = reconcile(&cluster, &[]).await;
    assert!(out.contains("released 0 addresses"), "{out}");
    assert_eq!(held_ips(&cluster).await, std::slice::from_ref(&ip));
    // Once the pod's network-status lists another address, the stale uid's entry is a leak.
    annotate(&cluster, "db-0", &["192.0.2.200"]).await;
    let (_, out) = reconcile(&cluster, &[]).await;
    assert!(out.contains(&format!("released {ip} ")) && out.contains("pod_replaced"), "{out}");
    assert!(held_ips(&cluster).await.is_empty());
    cluster.cleanup().await;
}

/// An allocation whose reservation is missing (upstream's plugin and ours raced for the address in
/// overlapping pools during a rolling upgrade, say) gets it again from the reconciler once its pod runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reconciler_restores_the_missing_reservation_of_a_running_pod() {
    let cluster = TestCluster::start().await;
    let node = cluster.unique("a");
    let reservations: Api<OverlappingRangeIPReservation> =
        Api::namespaced(cluster.client(), cluster.namespace());
    let running_uid = cluster.create_pod("running", Some(&node)).await;
    let running = add(&cluster, "running", &running_uid, "sandbox-running", &node).await;
    set_phase(&cluster, "running", "Running").await;
    let starting_uid = cluster.create_pod("starting", Some(&node)).await;
    let starting = add(&cluster, "starting", &starting_uid, "sandbox-starting", &node).await;
    for ip in [&running, &starting] {
        reservations.delete(ip, &Default::default()).await.expect("delete the reservation");
    }

    let (_, out) = reconcile(&cluster, &["--dry-run"]).await;
    assert!(out.contains(&format!("would restore missing reservation {running}")), "{out}");
    assert!(reservations.get_opt(&running).await.expect("GET").is_none(), "a dry run changes nothing");
    let (_, out) = reconcile(&cluster, &[]).await;
    assert!(out.contains("released 0 addresses and 0 orphaned reservations; restored 1 missing"), "{out}");
    let restored = reservations.get_opt(&running).await.expect("GET").expect("restored");
    let holder = Reservation {
        pod_ref: format!("{}/running", cluster.namespace()),
        ifname: "net1".into(),
        container_id: "sandbox-running".into(),
    };
    assert_eq!(restored.spec.holder, holder);
    // A pod still starting may be in the middle of its ADD, which makes the reservation itself.
    assert!(reservations.get_opt(&starting).await.expect("GET").is_none());
    let (_, out) = reconcile(&cluster, &[]).await;
    assert!(out.contains("restored 0 missing reservations"), "idempotent: {out}");
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scheduled_reconciler_follows_its_cron_file() {
    let cluster = TestCluster::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cron = dir.path().join("config");
    std::fs::write(&cron, "0 0 1 1 *").unwrap();
    let controller = Controller::start(
        &cluster,
        &[
            "--no-leader-election",
            "--no-node-slices",
            "--schedule-reload",
            "200ms",
            "--cron-file",
            &cron.display().to_string(),
        ],
    )
    .await;
    // A running pod whose network-status no longer lists its (upstream-written) address: only the
    // reconciler releases that, the pod-deletion cleanup never looks at a live pod.
    cluster.create_pod("moved-on", Some(&cluster.unique("a"))).await;
    set_phase(&cluster, "moved-on", "Running").await;
    annotate(&cluster, "moved-on", &["192.0.2.99"]).await;
    write_pool(&cluster, json!({ "7": upstream_record(&cluster, "moved-on", "c7") })).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(held_ips(&cluster).await, ["192.0.2.7"], "not due yet");
    // Every second, with the optional seconds field.
    std::fs::write(&cron, "* * * * * *").unwrap();
    assert!(
        eventually(Duration::from_secs(10), || async { held_ips(&cluster).await.is_empty() }).await,
        "{}",
        controller.log()
    );
    assert!(controller.log().contains("reconciler schedule changed"), "{}", controller.log());
    assert!(
        controller.metric("whereabouts_reconciler_runs_total{result=\"success\"}").await.unwrap_or(0.0)
            >= 1.0
    );
    controller.kill().await;
    cluster.cleanup().await;
}

// ---------------------------------------------------------------------------------------------
// leadership, metrics, health

async fn lease_holder(cluster: &TestCluster) -> Option<String> {
    let leases: Api<Lease> = Api::namespaced(cluster.client(), cluster.namespace());
    let lease = leases.get_opt("whereabouts-controller").await.ok()??;
    lease.spec?.holder_identity.filter(|h| !h.is_empty())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_leader_and_a_standby_takes_over_when_it_dies() {
    let cluster = TestCluster::start().await;
    let node = cluster.unique("a");
    let timing =
        ["--lease-duration", "3s", "--renew-deadline", "2s", "--retry-period", "500ms", "--no-node-slices"];
    let first = Controller::start(&cluster, &[&timing[..], &["--identity", "first"]].concat()).await;
    assert!(
        eventually(Duration::from_secs(15), || async { lease_holder(&cluster).await.is_some() }).await,
        "nobody leads: {}",
        first.log()
    );
    let second = Controller::start(&cluster, &[&timing[..], &["--identity", "second"]].concat()).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let holder = lease_holder(&cluster).await.expect("a holder");
    assert!(holder.starts_with("first_"), "{holder}");
    assert_eq!(first.metric("whereabouts_leader").await, Some(1.0));
    assert_eq!(second.metric("whereabouts_leader").await, Some(0.0));

    // The leader dies without handing over: the standby waits out the lease, then leads and works.
    first.kill().await;
    assert!(
        eventually(Duration::from_secs(20), || async {
            lease_holder(&cluster).await.is_some_and(|h| h.starts_with("second_"))
        })
        .await,
        "no takeover: {}",
        second.log()
    );
    let uid = cluster.create_pod("after-failover", Some(&node)).await;
    add(&cluster, "after-failover", &uid, "sandbox-f", &node).await;
    cluster.delete_pod("after-failover").await;
    assert!(
        eventually(Duration::from_secs(15), || async { held_ips(&cluster).await.is_empty() }).await,
        "the new leader does not clean up: {}",
        second.log()
    );
    // A leader stopped by SIGTERM hands the Lease back.
    let status = second.terminate().await;
    assert!(status.success(), "{status}");
    assert_eq!(lease_holder(&cluster).await, None, "the Lease is released on shutdown");
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_match_the_pools_and_health_answers() {
    let cluster = TestCluster::start().await;
    let node = cluster.unique("a");
    let controller = single_controller(&cluster).await;
    assert_eq!(controller.get("/healthz").await.0, 200);
    let mut uids = Vec::new();
    for i in 0..3 {
        let name = format!("m-{i}");
        let uid = cluster.create_pod(&name, Some(&node)).await;
        add(&cluster, &name, &uid, &format!("sandbox-m{i}"), &node).await;
        uids.push(uid);
    }
    let series = format!("whereabouts_pool_allocated_addresses{{pool=\"{POOL}\"}}");
    assert!(
        eventually(Duration::from_secs(10), || async { controller.metric(&series).await == Some(3.0) }).await,
        "{}",
        controller.get("/metrics").await.1
    );
    let capacity = format!("whereabouts_pool_capacity_addresses{{pool=\"{POOL}\"}}");
    assert_eq!(controller.metric(&capacity).await, Some(254.0));
    cluster.delete_pod("m-1").await;
    assert!(
        eventually(Duration::from_secs(10), || async { controller.metric(&series).await == Some(2.0) }).await,
        "{}",
        controller.get("/metrics").await.1
    );
    assert_eq!(held(&cluster).await.len(), 2);
    let released = "whereabouts_controller_releases_total{source=\"pod_cleanup\",reason=\"pod_gone\"}";
    assert_eq!(controller.metric(released).await, Some(1.0));
    let (status, body) = controller.get("/metrics").await;
    assert_eq!(status, 200);
    assert!(body.ends_with("# EOF\n"), "{body}");
    assert_eq!(controller.get("/nope").await.0, 404);
    controller.kill().await;
    cluster.cleanup().await;
}

// ---------------------------------------------------------------------------------------------
// node slices, end to end

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_get_ipv6_slices_and_their_plugins_allocate_inside_them() {
    use whereabouts_k8s::crd::NodeSlicePool;
    use whereabouts_k8s::kube::api::DynamicObject;

    let cluster = TestCluster::start().await;
    let (a, b, c) = (cluster.unique("a"), cluster.unique("b"), cluster.unique("c"));
    for node in ["a", "b"] {
        cluster.create_node(node).await;
    }
    // range_start leaves the first /120 slice without a candidate: it is never offered.
    let ipam = json!({
        "type": "whereabouts",
        "range": "2001:db8:5::/112",
        "range_start": "2001:db8:5::100",
        "node_slice_size": "/120",
        "network_name": "v6net",
        "datastore": "kubernetes",
        "kubernetes": { "kubeconfig": cluster.kubeconfig_path() },
        "log_level": "error",
    });
    let config = json!({ "cniVersion": "1.0.0", "name": "v6", "type": "macvlan", "ipam": ipam });
    let nad: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "k8s.cni.cncf.io/v1",
        "kind": "NetworkAttachmentDefinition",
        "metadata": { "name": "v6", "namespace": cluster.namespace(), "labels": cluster.labels() },
        "spec": { "config": config.to_string() },
    }))
    .expect("a NAD");
    let nads: Api<DynamicObject> = Api::namespaced_with(
        cluster.client(),
        cluster.namespace(),
        &whereabouts_controller::nodeslice::nad_resource(),
    );
    nads.create(&PostParams::default(), &nad).await.expect("create the NAD");
    let controller = Controller::start(&cluster, &["--no-leader-election"]).await;
    let slices: Api<NodeSlicePool> = Api::namespaced(cluster.client(), cluster.namespace());
    let slice_of = |node: String| {
        let slices = slices.clone();
        async move {
            let pool = slices.get_opt("v6net").await.ok()??;
            let found = pool.status?.allocations.into_iter().find(|s| s.node_name == node)?;
            Some(found.slice_range.parse::<ipnet::Ipv6Net>().expect("a slice"))
        }
    };
    assert!(
        eventually(Duration::from_secs(15), || async { slice_of(b.clone()).await.is_some() }).await,
        "no slices: {}",
        controller.log()
    );
    let (slice_a, slice_b) =
        (slice_of(a.clone()).await.expect("a's"), slice_of(b.clone()).await.expect("b's"));
    assert_ne!(slice_a, slice_b);
    for slice in [slice_a, slice_b] {
        assert_ne!(
            slice.network(),
            "2001:db8:5::".parse::<std::net::Ipv6Addr>().unwrap(),
            "range_start honoured"
        );
    }

    let mut addresses = Vec::new();
    for (node, slice) in [(&a, slice_a), (&b, slice_b)] {
        let pod = format!("p-{}", &node[node.len() - 1..]);
        let uid = cluster.create_pod(&pod, Some(node)).await;
        let cni_args = format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={pod};K8S_POD_UID={uid}",
            cluster.namespace()
        );
        let call = Call { binary: binary(), command: "ADD", container: &pod, cni_args: &cni_args, node };
        let got = call.run(&config).await.addresses(&format!("ADD {pod}"));
        let ip: ipnet::Ipv6Net = got[0].parse().expect("an IPv6 address");
        assert_eq!(ip.prefix_len(), 112, "the result keeps the range's prefix");
        assert!(slice.contains(&ip.addr()), "{ip} outside {node}'s slice {slice}");
        addresses.push((pod, ip.addr(), slice));
    }

    // A node joining gets a slice of its own, and nobody moves.
    cluster.create_node("c").await;
    assert!(
        eventually(Duration::from_secs(15), || async { slice_of(c.clone()).await.is_some() }).await,
        "{}",
        controller.log()
    );
    let slice_c = slice_of(c.clone()).await.expect("c's");
    assert!(![slice_a, slice_b].contains(&slice_c));
    assert_eq!(slice_of(a.clone()).await, Some(slice_a));

    // A pod on b deleted without DEL: the controller releases it from b's pool of its slice (upstream's
    // cleanup never looks in node-slice pools).
    let pools: Api<IPPool> = Api::namespaced(cluster.client(), cluster.namespace());
    let pool_b = whereabouts_core::range::pool_name("v6net", Some(&b), &ipnet::IpNet::V6(slice_b));
    assert_eq!(pools.get(&pool_b).await.expect("b's pool").spec.pool.allocations.len(), 1);
    cluster.delete_pod(&addresses[1].0).await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            pools.get(&pool_b).await.is_ok_and(|p| p.spec.pool.allocations.is_empty())
        })
        .await,
        "{}",
        controller.log()
    );
    controller.kill().await;
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_can_be_json_lines() {
    let cluster = TestCluster::start().await;
    write_pool(&cluster, json!({ "9": upstream_record(&cluster, "gone", "c9") })).await;
    let output = tokio::process::Command::new(binary())
        .args(["reconcile", "--dry-run", "--log-format", "json"])
        .args(["--kubeconfig", &cluster.kubeconfig_path().display().to_string()])
        .args(["--namespace", cluster.namespace()])
        .output()
        .await
        .expect("run reconcile");
    assert!(output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    let lines: Vec<Value> =
        stderr.lines().map(|line| serde_json::from_str(line).expect("every line is JSON")).collect();
    assert!(
        lines.iter().any(|line| line["level"] == "INFO"
            && line["fields"]["message"].as_str().is_some_and(|m| m.contains("would release 192.0.2.9"))),
        "{stderr}"
    );
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_deleted_while_no_controller_ran_are_released_when_one_starts() {
    let cluster = TestCluster::start().await;
    let node = cluster.unique("a");
    let uid = cluster.create_pod("gone-early", Some(&node)).await;
    add(&cluster, "gone-early", &uid, "sandbox-early", &node).await;
    let alive = cluster.create_pod("alive", Some(&node)).await;
    let kept = add(&cluster, "alive", &alive, "sandbox-alive", &node).await;
    cluster.delete_pod("gone-early").await;
    let controller = single_controller(&cluster).await;
    assert!(
        eventually(Duration::from_secs(10), || async { held_ips(&cluster).await == [kept.clone()] }).await,
        "{:?}\n{}",
        held_ips(&cluster).await,
        controller.log()
    );
    controller.kill().await;
    cluster.cleanup().await;
}

// ---------------------------------------------------------------------------------------------
// sticky_statefulsets: the test acts as the StatefulSet controller (no controller-manager runs here)

/// The allocation at `ip`, if any.
async fn entry_at(cluster: &TestCluster, ip: &str) -> Option<Allocation> {
    held(cluster).await.into_iter().find(|(at, _)| at == ip).map(|(_, a)| a)
}

/// Waits until the controller released `ip`; `what` says whose address it is, should it not.
async fn assert_released(cluster: &TestCluster, controller: &Controller, ip: &str, what: &str) {
    let released =
        eventually(Duration::from_secs(20), || async { entry_at(cluster, ip).await.is_none() }).await;
    assert!(released, "{what}: {}", controller.log());
}

/// `whereabouts ips` of the pool as JSON.
async fn ips_json(cluster: &TestCluster) -> Value {
    let output = tokio::process::Command::new(binary())
        .args(["ips", POOL, "-o", "json"])
        .args(["--kubeconfig", &cluster.kubeconfig_path().display().to_string()])
        .args(["--namespace", cluster.namespace()])
        .output()
        .await
        .expect("run whereabouts ips");
    serde_json::from_slice(&output.stdout).expect("JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statefulset_pod_gets_its_address_back_on_another_node_until_the_statefulset_lets_go() {
    let cluster = TestCluster::start().await;
    let (n1, n2) = (cluster.create_node("n1").await, cluster.create_node("n2").await);
    let net = network(&cluster, json!({ "sticky_statefulsets": true }));
    let web = cluster.create_statefulset("web", 3).await;
    let mut uids = Vec::new();
    for ordinal in 0..3 {
        let pod = format!("web-{ordinal}");
        let uid = cluster.create_statefulset_pod(("web", &web), ordinal, &n1).await;
        let ip = add_to(&cluster, &net, (&pod, &uid), &format!("{pod}-a"), &n1).await;
        assert_eq!(ip, format!("192.0.2.{}", ordinal + 1));
        uids.push(uid);
    }
    assert_eq!(entry_at(&cluster, "192.0.2.2").await.and_then(|a| a.statefulset), Some("web".into()));
    let controller = single_controller(&cluster).await;

    // web-1 moves to n2: its sandbox goes (DEL holds the address), the pod object is made again.
    del_from(&cluster, &net, ("web-1", &uids[1]), "web-1-a", &n1).await;
    let held_entry = entry_at(&cluster, "192.0.2.2").await.expect("held");
    assert!(held_entry.is_held() && held_entry.node.is_none(), "{held_entry:?}");
    let listed = ips_json(&cluster).await;
    let row = listed.as_array().expect("rows").iter().find(|r| r["ip"] == "192.0.2.2").expect("row").clone();
    assert_eq!((row["held"].clone(), row["statefulset"].clone()), (json!(true), json!("web")), "{row}");
    cluster.delete_pod("web-1").await;
    // The controller sees the pod gone, and keeps the address: the StatefulSet wants web-1.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(entry_at(&cluster, "192.0.2.2").await.is_some_and(|a| a.is_held()), "{}", controller.log());

    // A second StatefulSet scales up on the same pool, on n2, while web-1 comes back there.
    let db = cluster.create_statefulset("db", 4).await;
    let mut adds = tokio::task::JoinSet::new();
    for ordinal in 0..4 {
        let uid = cluster.create_statefulset_pod(("db", &db), ordinal, &n2).await;
        let pod = format!("db-{ordinal}");
        let cni_args = format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={pod};K8S_POD_UID={uid}",
            cluster.namespace()
        );
        let (net, node) = (net.clone(), n2.clone());
        adds.spawn(async move {
            let container = format!("{pod}-a");
            let call = Call {
                binary: binary(),
                command: "ADD",
                container: &container,
                cni_args: &cni_args,
                node: &node,
            };
            let addresses = call.run(&net).await.addresses(&format!("ADD {pod}"));
            (pod, addresses)
        });
    }
    let new_uid = cluster.create_statefulset_pod(("web", &web), 1, &n2).await;
    let back = add_to(&cluster, &net, ("web-1", &new_uid), "web-1-b", &n2).await;
    assert_eq!(back, "192.0.2.2", "web-1 gets its address back on another node");
    let mut db_ips = Vec::new();
    while let Some(done) = adds.join_next().await {
        let (pod, addresses) = done.expect("an ADD task");
        let ip = addresses[0].split('/').next().expect("an address").to_string();
        assert!(!["192.0.2.1", "192.0.2.2", "192.0.2.3"].contains(&ip.as_str()), "{pod} got web's {ip}");
        db_ips.push(ip);
    }
    db_ips.sort();
    db_ips.dedup();
    assert_eq!(db_ips.len(), 4, "{db_ips:?}");
    let taken_back = entry_at(&cluster, "192.0.2.2").await.expect("web-1's");
    assert_eq!(
        (taken_back.container_id.as_str(), taken_back.node.as_deref()),
        ("web-1-b", Some(n2.as_str()))
    );

    // Scaled down to 2: web-2's sandbox goes, then the pod; its address is released.
    cluster.scale_statefulset("web", 2).await;
    del_from(&cluster, &net, ("web-2", &uids[2]), "web-2-a", &n1).await;
    cluster.delete_pod("web-2").await;
    assert_released(&cluster, &controller, "192.0.2.3", "web-2's address after the scale-down").await;

    // web-0 is between sandboxes when the StatefulSet is deleted: its held address goes with it.
    del_from(&cluster, &net, ("web-0", &uids[0]), "web-0-a", &n1).await;
    cluster.delete_pod("web-0").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(entry_at(&cluster, "192.0.2.1").await.is_some_and(|a| a.is_held()), "still wanted");
    cluster.delete_statefulset("web").await;
    assert_released(
        &cluster,
        &controller,
        "192.0.2.1",
        "web-0's held address after the StatefulSet's deletion",
    )
    .await;
    // web-1 still runs (nothing collects the orphaned pod here): its address stays until it goes.
    assert!(entry_at(&cluster, "192.0.2.2").await.is_some());
    cluster.delete_pod("web-1").await;
    assert_released(&cluster, &controller, "192.0.2.2", "web-1's address once it is gone").await;
    let mut left = held_ips(&cluster).await;
    left.sort();
    assert_eq!(left, db_ips);
    controller.kill().await;
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reconciler_keeps_a_held_address_while_the_statefulset_wants_its_pod() {
    let cluster = TestCluster::start().await;
    let node = cluster.create_node("n1").await;
    let net = network(&cluster, json!({ "sticky_statefulsets": true }));
    let web = cluster.create_statefulset("web", 2).await;
    let uid = cluster.create_statefulset_pod(("web", &web), 1, &node).await;
    assert_eq!(add_to(&cluster, &net, ("web-1", &uid), "web-1-a", &node).await, "192.0.2.1");
    del_from(&cluster, &net, ("web-1", &uid), "web-1-a", &node).await;
    cluster.delete_pod("web-1").await;
    let (_, report) = reconcile(&cluster, &[]).await;
    assert_eq!(held_ips(&cluster).await, ["192.0.2.1"], "{report}");
    // `ordinals.start` moves past web-1: no longer wanted.
    let statefulsets: Api<k8s_openapi::api::apps::v1::StatefulSet> =
        Api::namespaced(cluster.client(), cluster.namespace());
    let patch = json!({ "spec": { "ordinals": { "start": 2 } } });
    statefulsets
        .patch("web", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("move the ordinals");
    reconcile(&cluster, &[]).await;
    assert_eq!(held_ips(&cluster).await, Vec::<String>::new());
    cluster.cleanup().await;
}

// ---------------------------------------------------------------------------------------------
// IPAMClaims: the test acts as KubeVirt (the claim, the launcher pods and their network selection
// elements) and as Multus (the plugin's calls)

/// A virtual machine's launcher pod `pod` on `node`, its network selection element naming `claim`.
async fn launcher_pod(cluster: &TestCluster, pod: &str, node: &str, claim: &str) -> String {
    let networks =
        json!([{ "name": NETWORK, "namespace": cluster.namespace(), "ipam-claim-reference": claim }]);
    let annotations = [("k8s.v1.cni.cncf.io/networks".to_string(), networks.to_string())].into();
    cluster.create_annotated_pod(pod, node, annotations).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claims_address_survives_its_launcher_pods_until_the_claim_is_deleted() {
    let cluster = TestCluster::start().await;
    let (n1, n2) = (cluster.create_node("n1").await, cluster.create_node("n2").await);
    let mut net = netconf(&cluster);
    net["allowPersistentIPs"] = json!(true);
    cluster.create_ipam_claim("vm1.net", NETWORK, "net1").await;
    let controller = single_controller(&cluster).await;

    let uid_a = launcher_pod(&cluster, "virt-launcher-vm1-a", &n1, "vm1.net").await;
    assert_eq!(add_to(&cluster, &net, ("virt-launcher-vm1-a", &uid_a), "sandbox-a", &n1).await, "192.0.2.1");
    let status = cluster.ipam_claim_status("vm1.net").await;
    assert_eq!(status, json!({ "ips": ["192.0.2.1/24"], "ownerPod": "virt-launcher-vm1-a" }));
    let entry = entry_at(&cluster, "192.0.2.1").await.expect("the claim's");
    assert_eq!(entry.ipam_claim.as_deref(), Some("vm1.net"));
    // A pod without a claim gets another address.
    let plain = cluster.create_pod("plain", Some(&n1)).await;
    assert_eq!(add_to(&cluster, &net, ("plain", &plain), "sandbox-plain", &n1).await, "192.0.2.2");

    // Live migration: the target launcher pod runs beside the source and gets the same address.
    let uid_b = launcher_pod(&cluster, "virt-launcher-vm1-b", &n2, "vm1.net").await;
    assert_eq!(add_to(&cluster, &net, ("virt-launcher-vm1-b", &uid_b), "sandbox-b", &n2).await, "192.0.2.1");
    assert_eq!(cluster.ipam_claim_status("vm1.net").await["ownerPod"], "virt-launcher-vm1-b");
    // The source goes: its DEL finds nothing of its own, and its deletion leaves the claim's address.
    del_from(&cluster, &net, ("virt-launcher-vm1-a", &uid_a), "sandbox-a", &n1).await;
    cluster.delete_pod("virt-launcher-vm1-a").await;
    // The virtual machine stops: DEL holds the address, the pod goes, the address stays.
    del_from(&cluster, &net, ("virt-launcher-vm1-b", &uid_b), "sandbox-b", &n2).await;
    assert!(entry_at(&cluster, "192.0.2.1").await.is_some_and(|a| a.is_held()));
    cluster.delete_pod("virt-launcher-vm1-b").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(entry_at(&cluster, "192.0.2.1").await.is_some(), "{}", controller.log());
    // It starts again, anywhere: the same address.
    let uid_c = launcher_pod(&cluster, "virt-launcher-vm1-c", &n1, "vm1.net").await;
    assert_eq!(add_to(&cluster, &net, ("virt-launcher-vm1-c", &uid_c), "sandbox-c", &n1).await, "192.0.2.1");

    // A launcher pod whose claim does not exist (yet) is told to try again.
    let uid_d = launcher_pod(&cluster, "virt-launcher-vm2-a", &n1, "vm2.net").await;
    let (code, msg) = plugin(&cluster, &net, "ADD", ("virt-launcher-vm2-a", &uid_d), "sandbox-d", &n1)
        .await
        .failure("ADD for a missing claim");
    assert!(code == 11 && msg.contains("vm2.net"), "{code}: {msg}");

    // The virtual machine is deleted: its pod, then its claim; the address is released.
    del_from(&cluster, &net, ("virt-launcher-vm1-c", &uid_c), "sandbox-c", &n1).await;
    cluster.delete_pod("virt-launcher-vm1-c").await;
    cluster.delete_ipam_claim("vm1.net").await;
    assert_released(&cluster, &controller, "192.0.2.1", "the deleted claim's address").await;
    assert_eq!(held_ips(&cluster).await, ["192.0.2.2"]);
    controller.kill().await;
    cluster.cleanup().await;
}
