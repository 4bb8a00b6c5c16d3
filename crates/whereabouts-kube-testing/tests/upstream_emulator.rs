//! The upstream emulation against a test cluster (the fake by default): the Lease behaves as client-go's
//! leader election (mutual exclusion, immediate hand-over on release, theft of a stale record after its
//! own duration), the pool writes are upstream's JSON Patches, ADD is idempotent per pod and interface,
//! DEL releases by container and interface, reservations are created and deleted as upstream does, and
//! concurrent ADDs serialised by the Lease hand out the lowest addresses, each once.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::IpAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::{Value, json};
use tokio::time::Instant;
use whereabouts_core::pool::{Allocation, PoolSpec, Reservation};
use whereabouts_k8s::crd::{IPPool, OverlappingRangeIPReservation, OverlappingRangeIPReservationSpec};
use whereabouts_kube_testing::TestCluster;
use whereabouts_kube_testing::upstream::{
    self, CallContext, LEASE_NAME, LeaseLock, LeaseTiming, UpstreamConfig, UpstreamError, pool_update_patch,
};

/// Retries every 100 ms so that the tests wait little; lease duration and renew deadline as upstream.
fn quick_lease() -> LeaseTiming {
    LeaseTiming::from_millis(1500, 1000, 100)
}

fn config(range: &str, network_name: &str) -> UpstreamConfig {
    UpstreamConfig {
        network_name: network_name.to_string(),
        lease: quick_lease(),
        ..UpstreamConfig::new(range.parse().expect("a CIDR"))
    }
}

fn call(namespace: &str, pod: &str, container: &str) -> CallContext {
    CallContext {
        container_id: container.to_string(),
        ifname: "net1".to_string(),
        pod_namespace: namespace.to_string(),
        pod_name: pod.to_string(),
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("an IP")
}

/// An allocation as upstream writes it.
fn allocation(container: &str, pod_ref: &str) -> Allocation {
    Allocation {
        container_id: container.to_string(),
        pod_ref: pod_ref.to_string(),
        ifname: "net1".to_string(),
        node: None,
        cni_network: None,
        pod_uid: None,
        statefulset: None,
        ipam_claim: None,
    }
}

async fn pool(client: &Client, name: &str) -> IPPool {
    Api::<IPPool>::default_namespaced(client.clone()).get(name).await.expect("the pool")
}

async fn lease(client: &Client) -> LeaseSpec {
    let lease = Api::<Lease>::default_namespaced(client.clone()).get(LEASE_NAME).await.expect("the Lease");
    lease.spec.expect("a Lease spec")
}

fn deadline_in(seconds: u64) -> Instant {
    Instant::now() + Duration::from_secs(seconds)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_holders_never_overlap() {
    let cluster = TestCluster::start().await;
    let inside = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..5)
        .map(|i| {
            let (client, namespace, inside) =
                (cluster.client(), cluster.namespace().to_string(), inside.clone());
            tokio::spawn(async move {
                for _ in 0..3 {
                    let lock = LeaseLock::new(
                        client.clone(),
                        &namespace,
                        format!("{namespace}/pod-{i}"),
                        quick_lease(),
                    );
                    let leadership = lock.acquire(deadline_in(60)).await.expect("leadership");
                    assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0, "two holders at once");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    inside.fetch_sub(1, Ordering::SeqCst);
                    leadership.release().await;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("a candidate");
    }
    let spec = lease(&cluster.client()).await;
    assert_eq!(spec.holder_identity.as_deref(), Some(""));
    assert_eq!(spec.lease_duration_seconds, Some(1));
    // 15 acquisitions: the first created the Lease, each of the 14 others changed its holder.
    assert_eq!(spec.lease_transitions, Some(14));
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_released_lease_is_taken_at_once() {
    let cluster = TestCluster::start().await;
    let (client, namespace) = (cluster.client(), cluster.namespace().to_string());
    // A 10 s record: only a release lets the second candidate in within a second.
    let timing = LeaseTiming::from_millis(10_000, 5_000, 100);
    let first = LeaseLock::new(client.clone(), &namespace, format!("{namespace}/first"), timing);
    let leadership = first.acquire(deadline_in(10)).await.expect("the first leads");
    let held = lease(&client).await;
    assert_eq!(held.holder_identity, Some(format!("{namespace}/first")));
    assert_eq!(held.lease_duration_seconds, Some(10));
    assert_eq!(held.lease_transitions, Some(0));
    assert!(held.acquire_time.is_some() && held.renew_time.is_some());

    let second = LeaseLock::new(client.clone(), &namespace, format!("{namespace}/second"), timing);
    let waiting = tokio::spawn(async move {
        let leadership = second.acquire(deadline_in(10)).await.expect("the second leads");
        (Instant::now(), leadership)
    });
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(!waiting.is_finished(), "the second candidate took a held Lease");
    let released = Instant::now();
    leadership.release().await;
    let (taken, leadership) = waiting.await.expect("the second candidate");
    assert!(taken - released < Duration::from_secs(1), "taken {:?} after the release", taken - released);
    let held = lease(&client).await;
    assert_eq!(held.holder_identity, Some(format!("{namespace}/second")));
    assert_eq!(held.lease_transitions, Some(1));
    leadership.release().await;
    let released = lease(&client).await;
    assert_eq!(released.holder_identity.as_deref(), Some(""));
    assert_eq!(released.lease_duration_seconds, Some(1));
    assert_eq!(released.lease_transitions, Some(1));
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_lease_is_stolen_after_its_own_duration() {
    let cluster = TestCluster::start().await;
    let (client, namespace) = (cluster.client(), cluster.namespace().to_string());
    let crashed = Lease {
        metadata: ObjectMeta { name: Some(LEASE_NAME.to_string()), ..ObjectMeta::default() },
        spec: Some(LeaseSpec {
            holder_identity: Some("other/crashed".to_string()),
            lease_duration_seconds: Some(2),
            acquire_time: Some(MicroTime(Timestamp::now())),
            renew_time: Some(MicroTime(Timestamp::now())),
            lease_transitions: Some(3),
            ..LeaseSpec::default()
        }),
    };
    Api::<Lease>::default_namespaced(client.clone())
        .create(&PostParams::default(), &crashed)
        .await
        .expect("create");
    let started = Instant::now();
    // Our own duration (1.5 s, written as 1) does not matter: the record's 2 s do.
    let lock = LeaseLock::new(client.clone(), &namespace, format!("{namespace}/thief"), quick_lease());
    let leadership = lock.acquire(deadline_in(10)).await.expect("the Lease is taken");
    let waited = started.elapsed();
    assert!(
        (Duration::from_secs(2)..Duration::from_millis(3500)).contains(&waited),
        "taken after {waited:?}"
    );
    let held = lease(&client).await;
    assert_eq!(held.holder_identity, Some(format!("{namespace}/thief")));
    assert_eq!(held.lease_duration_seconds, Some(1));
    assert_eq!(held.lease_transitions, Some(4));
    leadership.release().await;
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_for_a_held_lease_times_out_and_leaves_it_alone() {
    let cluster = TestCluster::start().await;
    let (client, namespace) = (cluster.client(), cluster.namespace().to_string());
    // A 5 s record: with client-go's whole-second comparison of records, a 1 s record renewed within
    // the same second can look stale to a waiter, and would be taken from a holder renewing it.
    let timing = LeaseTiming::from_millis(5000, 2500, 100);
    let holder = LeaseLock::new(client.clone(), &namespace, format!("{namespace}/holder"), timing);
    let leadership = holder.acquire(deadline_in(10)).await.expect("the holder leads");
    let started = Instant::now();
    let waiter = LeaseLock::new(client.clone(), &namespace, format!("{namespace}/waiter"), quick_lease());
    let error = waiter.acquire(started + Duration::from_secs(2)).await.expect_err("the holder renews");
    assert!((Duration::from_secs(2)..Duration::from_secs(3)).contains(&started.elapsed()));
    assert_eq!(error.to_string(), "time limit exceeded while waiting to become leader");
    assert_eq!(lease(&client).await.holder_identity, Some(format!("{namespace}/holder")));
    leadership.release().await;
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_patches_test_the_resource_version_and_the_absence_of_added_keys() {
    let cluster = TestCluster::start().await;
    let (client, namespace) = (cluster.client(), cluster.namespace().to_string());
    let config = config("10.61.0.0/24", "");
    let first = upstream::add(&client, &namespace, &config, &call(&namespace, "a", "ca")).await.expect("ADD");
    assert_eq!(first, ip("10.61.0.1"));
    let pools = Api::<IPPool>::default_namespaced(client.clone());
    let read = pool(&client, "10.61.0.0-24").await;
    let rv = read.metadata.resource_version.clone().expect("a resourceVersion");
    let mut wanted = read.spec.pool.allocations.clone();
    wanted.insert("2".to_string(), allocation("cb", &format!("{namespace}/b")));
    let send = |patch| {
        let pools = pools.clone();
        async move { pools.patch("10.61.0.0-24", &PatchParams::default(), &Patch::Json::<()>(patch)).await }
    };
    // A write since the read: the resourceVersion test fails with 422.
    let stale = pool_update_patch("1", &read.spec.pool, &wanted);
    match send(stale).await {
        Err(kube::Error::Api(status)) => assert_eq!((status.code, status.reason.as_str()), (422, "Invalid")),
        other => panic!("a stale resourceVersion was accepted: {other:?}"),
    }
    // A key added under a current resourceVersion but present already: the null test fails with 422.
    let mut as_if_absent = read.spec.pool.clone();
    as_if_absent.allocations.remove("1");
    let clobber = pool_update_patch(&rv, &as_if_absent, &read.spec.pool.allocations);
    match send(clobber).await {
        Err(kube::Error::Api(status)) => assert_eq!(status.code, 422),
        other => panic!("an existing allocation was overwritten: {other:?}"),
    }
    let written =
        send(pool_update_patch(&rv, &read.spec.pool, &wanted)).await.expect("a current patch applies");
    assert_eq!(written.spec.pool.allocations, wanted);
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_is_idempotent_per_pod_and_interface() {
    let cluster = TestCluster::start().await;
    let (client, namespace) = (cluster.client(), cluster.namespace().to_string());
    let config = config("10.62.0.0/24", "idem");
    let add = |pod: &'static str, container: &'static str, ifname: &'static str| {
        let (client, namespace, config) = (client.clone(), namespace.clone(), config.clone());
        async move {
            let call = CallContext { ifname: ifname.to_string(), ..call(&namespace, pod, container) };
            upstream::add(&client, &namespace, &config, &call).await.expect("ADD")
        }
    };
    assert_eq!(add("a", "c1", "net1").await, ip("10.62.0.1"));
    assert_eq!(add("b", "c2", "net1").await, ip("10.62.0.2"));
    assert_eq!(add("a", "c1", "net1").await, ip("10.62.0.1"));
    // A new sandbox of the same pod: the same address, the container ID rewritten.
    assert_eq!(add("a", "c3", "net1").await, ip("10.62.0.1"));
    // Another interface of the same pod is another allocation.
    assert_eq!(add("a", "c3", "net2").await, ip("10.62.0.3"));
    let spec = pool(&client, "idem-10.62.0.0-24").await.spec.pool;
    let a = format!("{namespace}/a");
    assert_eq!(
        spec,
        PoolSpec {
            range: "10.62.0.0/24".to_string(),
            allocations: BTreeMap::from([
                ("1".to_string(), allocation("c3", &a)),
                ("2".to_string(), allocation("c2", &format!("{namespace}/b"))),
                ("3".to_string(), Allocation { ifname: "net2".to_string(), ..allocation("c3", &a) }),
            ]),
            ..PoolSpec::default()
        }
    );
    let missing_pod = upstream::add(&client, &namespace, &config, &call(&namespace, "", "c9")).await;
    assert!(matches!(missing_pod, Err(UpstreamError::NoPodName)), "{missing_pod:?}");
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn del_releases_by_container_and_interface_and_creates_a_missing_pool() {
    let cluster = TestCluster::start().await;
    let (client, namespace) = (cluster.client(), cluster.namespace().to_string());
    let without_reservations =
        |range| UpstreamConfig { enable_overlapping_ranges: false, ..config(range, "") };
    let here = without_reservations("10.63.0.0/24");
    for (pod, container) in [("a", "ca"), ("b", "cb"), ("c", "cc")] {
        upstream::add(&client, &namespace, &here, &call(&namespace, pod, container)).await.expect("ADD");
    }
    // Matching is by container and interface: the pod does not matter, another interface misses.
    let wrong_interface = CallContext { ifname: "eth0".to_string(), ..call(&namespace, "b", "cb") };
    assert_eq!(upstream::del(&client, &namespace, &here, &wrong_interface).await.expect("DEL"), None);
    let released = upstream::del(&client, &namespace, &here, &call(&namespace, "someone", "cb")).await;
    assert_eq!(released.expect("DEL"), Some(ip("10.63.0.2")));
    let spec = pool(&client, "10.63.0.0-24").await.spec.pool;
    assert_eq!(spec.allocations.keys().collect::<Vec<_>>(), ["1", "3"]);
    // A DEL on a range without a pool creates the pool (the path is shared with ADD), empty.
    let elsewhere = without_reservations("10.64.0.0/24");
    assert_eq!(
        upstream::del(&client, &namespace, &elsewhere, &call(&namespace, "a", "ca")).await.expect("DEL"),
        None
    );
    let created = pool(&client, "10.64.0.0-24").await.spec.pool;
    assert_eq!(
        created,
        PoolSpec { range: "10.64.0.0/24".to_string(), allocations: BTreeMap::new(), ..Default::default() }
    );
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reservations_are_checked_created_and_deleted_as_upstream_does() {
    let cluster = TestCluster::start().await;
    let (client, namespace) = (cluster.client(), cluster.namespace().to_string());
    let reservations = Api::<OverlappingRangeIPReservation>::default_namespaced(client.clone());
    let reserve = |name: &str, pod_ref: &str| OverlappingRangeIPReservation {
        metadata: ObjectMeta { name: Some(name.to_string()), ..ObjectMeta::default() },
        spec: OverlappingRangeIPReservationSpec {
            holder: Reservation {
                pod_ref: pod_ref.to_string(),
                ifname: "net1".to_string(),
                container_id: String::new(),
            },
        },
    };
    let holder = |name: &'static str| {
        let reservations = reservations.clone();
        async move { reservations.get_opt(name).await.expect("GET").map(|r| r.spec.holder) }
    };
    let config = config("10.65.0.0/24", "orip");
    // .2 is held by a pod of an overlapping range, .3 by the pod that is about to ask.
    let (a, c) = (format!("{namespace}/a"), format!("{namespace}/c"));
    reservations
        .create(&PostParams::default(), &reserve("orip-10.65.0.2", "other/pod"))
        .await
        .expect("create");
    reservations.create(&PostParams::default(), &reserve("orip-10.65.0.3", &c)).await.expect("create");

    assert_eq!(
        upstream::add(&client, &namespace, &config, &call(&namespace, "a", "ca")).await.expect("ADD"),
        ip("10.65.0.1")
    );
    let written = holder("orip-10.65.0.1").await.expect("reserved");
    // podref and ifname only: upstream never writes the container ID.
    assert_eq!(
        written,
        Reservation { pod_ref: a.clone(), ifname: "net1".to_string(), container_id: String::new() }
    );
    // .2 is skipped (a "dummy" of the attempt), .3 is taken and its reservation kept as it was.
    let third = upstream::add(&client, &namespace, &config, &call(&namespace, "c", "cc")).await.expect("ADD");
    assert_eq!(third, ip("10.65.0.3"));
    let spec = pool(&client, "orip-10.65.0.0-24").await.spec.pool;
    assert_eq!(spec.allocations.keys().collect::<Vec<_>>(), ["1", "3"]);

    // DEL deletes the reservation named after the address, whoever holds it.
    reservations.delete("orip-10.65.0.1", &Default::default()).await.expect("delete");
    reservations
        .create(&PostParams::default(), &reserve("orip-10.65.0.1", "other/thief"))
        .await
        .expect("create");
    assert_eq!(
        upstream::del(&client, &namespace, &config, &call(&namespace, "a", "ca")).await.expect("DEL"),
        Some(ip("10.65.0.1"))
    );
    assert_eq!(holder("orip-10.65.0.1").await, None);
    // A reservation that is already gone fails the DEL after the pool write (upstream reports success).
    reservations.delete("orip-10.65.0.3", &Default::default()).await.expect("delete");
    let error = upstream::del(&client, &namespace, &config, &call(&namespace, "c", "cc"))
        .await
        .expect_err("no reservation");
    assert!(matches!(&error, UpstreamError::Api(kube::Error::Api(s)) if s.code == 404), "{error:?}");
    assert!(pool(&client, "orip-10.65.0.0-24").await.spec.pool.allocations.is_empty());
    assert_eq!(holder("orip-10.65.0.2").await.map(|h| h.pod_ref), Some("other/pod".to_string()));
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_concurrent_adds_get_the_twenty_lowest_addresses() {
    let cluster = TestCluster::start().await;
    let (client, namespace) = (cluster.client(), cluster.namespace().to_string());
    let config = config("10.66.0.0/24", "burst");
    if let Some(fake) = cluster.fake() {
        fake.reset_stats();
    }
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let (client, namespace, config) = (client.clone(), namespace.clone(), config.clone());
            tokio::spawn(async move {
                let call = call(&namespace, &format!("pod-{i}"), &format!("container-{i}"));
                (
                    format!("{namespace}/pod-{i}"),
                    upstream::add(&client, &namespace, &config, &call).await.expect("ADD"),
                )
            })
        })
        .collect();
    let mut answered = BTreeMap::new();
    for task in tasks {
        let (pod_ref, ip) = task.await.expect("an ADD");
        answered.insert(ip, pod_ref);
    }
    let expected: Vec<IpAddr> = (1..=20).map(|i| ip(&format!("10.66.0.{i}"))).collect();
    assert_eq!(answered.keys().copied().collect::<Vec<_>>(), expected);
    let stored = pool(&client, "burst-10.66.0.0-24").await.spec.pool;
    let decoded = upstream::decode_pool(&stored).expect("decodable");
    let stored: BTreeMap<IpAddr, String> = decoded.into_iter().map(|r| (r.ip, r.pod_ref)).collect();
    assert_eq!(stored, answered);
    // The Lease serialised the writers: no pool patch lost a race.
    if let Some(fake) = cluster.fake() {
        assert_eq!(fake.stats().invalid, 0);
    }
    cluster.cleanup().await;
}

/// Runs the `upstream-whereabouts` binary; its exit status and stdout.
fn run_binary(cluster: &TestCluster, command: &str, pod: &str, netconf: &Value) -> (bool, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_upstream-whereabouts"))
        .env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", format!("container-{pod}"))
        .env("CNI_IFNAME", "net1")
        .env(
            "CNI_ARGS",
            format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={pod}", cluster.namespace()),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn upstream-whereabouts");
    child.stdin.take().expect("stdin").write_all(netconf.to_string().as_bytes()).expect("write stdin");
    let output = child.wait_with_output().expect("wait upstream-whereabouts");
    (output.status.success(), String::from_utf8_lossy(&output.stdout).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_speaks_cni() {
    let cluster = TestCluster::start().await;
    let netconf = json!({
        "cniVersion": "1.0.0",
        "name": "binary",
        "type": "macvlan",
        "ipam": {
            "type": "whereabouts",
            "kubernetes": {"kubeconfig": cluster.kubeconfig_path()},
            "range": "10.67.0.0/30",
            "network_name": "bin",
            "leader_retry_period": 100,
        }
    });
    let expect_add = |pod: &str, address: &str| {
        assert_eq!(
            run_binary(&cluster, "ADD", pod, &netconf),
            (true, json!({"cniVersion": "1.0.0", "ips": [{"address": address}]}).to_string())
        );
    };
    expect_add("a", "10.67.0.1/30");
    expect_add("b", "10.67.0.2/30");
    let (ok, stdout) = run_binary(&cluster, "ADD", "c", &netconf);
    assert!(!ok);
    assert_eq!(
        serde_json::from_str::<Value>(&stdout).expect("a CNI error"),
        json!({
            "cniVersion": "1.0.0",
            "code": 999,
            "msg": "error at storage engine: Could not allocate IP in range: ip: 10.67.0.1 / - 10.67.0.2 / \
                    range: 10.67.0.0/30 / excludeRanges: []",
        })
    );
    assert_eq!(run_binary(&cluster, "DEL", "a", &netconf), (true, String::new()));
    // Nothing to release: still a success.
    assert_eq!(run_binary(&cluster, "DEL", "a", &netconf), (true, String::new()));
    expect_add("c", "10.67.0.1/30");
    let spec = pool(&cluster.client(), "bin-10.67.0.0-30").await.spec.pool;
    assert_eq!(spec.allocations.keys().collect::<Vec<_>>(), ["1", "2"]);
    cluster.cleanup().await;
}
