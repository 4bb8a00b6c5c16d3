//! Integration tests of the IPAM engine ([`Ipam`]) over a real [`FileStore`] in a temporary directory.
//!
//! Every test asserts exact addresses, and where it matters the exact stored pool entries and
//! cluster-wide reservations left behind.

#![allow(clippy::unwrap_used, reason = "test helpers panic on unexpected store errors by design")]

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use serde_json::{Value, json};
use tempfile::TempDir;
use whereabouts_core::addr::{Family, from_u128, to_u128};
use whereabouts_core::allocate::{AllocError, Lane, lane_start};
use whereabouts_core::config::{self, CallContext, IpamConfig};
use whereabouts_core::interval::IntervalSet;
use whereabouts_core::pool::{Allocation, Owner, Pool, PoolSpec};
use whereabouts_core::range::{pool_name, reservation_name};
use whereabouts_store::file::FileStore;
use whereabouts_store::ipam::{AllocatedIp, Ipam, IpamError, RetryPolicy};
use whereabouts_store::{
    Deletion, PoolLock, Reservation, ReservationVersion, ReserveOutcome, Store, StoreError, Version,
    VersionedPool, VersionedReservation,
};

// === helpers ===

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn ips(list: &[&str]) -> Vec<IpAddr> {
    list.iter().map(|s| ip(s)).collect()
}

/// A fresh file store in a temporary directory (keep the directory alive as long as the store).
fn file_store() -> (TempDir, FileStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::open(dir.path()).unwrap();
    (dir, store)
}

/// Loads an `ipam` object (type and `"datastore": "file"` filled in) with a call context.
fn config_with(mut ipam: Value, call: &CallContext) -> IpamConfig {
    let object = ipam.as_object_mut().expect("the ipam config is an object");
    object.insert("type".into(), json!("whereabouts"));
    object.insert("datastore".into(), json!("file"));
    config::load(&ipam, None, call).unwrap()
}

/// Loads an `ipam` object without anything from the call.
fn cfg(ipam: Value) -> IpamConfig {
    config_with(ipam, &CallContext::default())
}

/// A configuration with one range.
fn single(range: &str) -> IpamConfig {
    cfg(json!({ "range": range }))
}

/// The pool name of the `index`th range of a configuration.
fn pool_of(config: &IpamConfig, index: usize) -> String {
    pool_name(&config.network_name, None, &config.ranges[index].range.network())
}

/// A Kubernetes owner: container `c<n>`, pod `ns/p<n>`, interface `eth0`.
fn owner(n: usize) -> Owner {
    Owner {
        container_id: format!("c{n}"),
        pod_ref: Some(format!("ns/p{n}")),
        ifname: "eth0".into(),
        node: None,
        cni_network: None,
        pod_uid: None,
        statefulset: None,
        ipam_claim: None,
    }
}

/// An owner outside Kubernetes (no pod reference).
fn bare_owner(container_id: &str) -> Owner {
    Owner {
        container_id: container_id.into(),
        pod_ref: None,
        ifname: "eth0".into(),
        node: None,
        cni_network: None,
        pod_uid: None,
        statefulset: None,
        ipam_claim: None,
    }
}

/// An owner recorded with a node and a CNI network name (for GC).
fn owner_on(n: usize, node: Option<&str>, network: Option<&str>) -> Owner {
    Owner { node: node.map(Into::into), cni_network: network.map(Into::into), ..owner(n) }
}

/// The reservation an owner's allocation writes.
fn reservation(owner: &Owner) -> Reservation {
    Reservation {
        pod_ref: owner.pod_ref.clone().unwrap_or_default(),
        ifname: owner.ifname.clone(),
        container_id: owner.container_id.clone(),
    }
}

fn just_ips(allocated: &[AllocatedIp]) -> Vec<IpAddr> {
    allocated.iter().map(|a| a.ip).collect()
}

/// Allocates and returns only the addresses.
async fn alloc<S: Store>(ipam: &Ipam<'_, S>, config: &IpamConfig, owner: &Owner) -> Vec<IpAddr> {
    just_ips(&ipam.allocate(config, owner).await.unwrap())
}

/// The stored allocations of a pool by address (empty when the pool does not exist).
async fn allocations(store: &impl Store, name: &str) -> BTreeMap<IpAddr, Allocation> {
    let Some(stored) = store.read_pool(name).await.unwrap() else {
        return BTreeMap::new();
    };
    let network: IpNet = stored.spec.range.parse().unwrap();
    let (pool, skipped) = Pool::from_spec(&stored.spec, network).unwrap();
    assert!(skipped.is_empty(), "pool {name} has undecodable keys: {skipped:?}");
    pool.iter().map(|(ip, a)| (ip, a.clone())).collect()
}

/// Every reservation, by name.
async fn reservations(store: &impl Store) -> BTreeMap<String, Reservation> {
    store.list_reservations().await.unwrap().into_iter().map(|(name, read)| (name, read.holder)).collect()
}

/// The expected reservation map for (reservation name, owner) pairs.
fn reserved_by(entries: &[(&str, &Owner)]) -> BTreeMap<String, Reservation> {
    entries.iter().map(|(name, o)| (name.to_string(), reservation(o))).collect()
}

/// Replaces a pool's stored state with `entries` (creating it if needed), bypassing the engine.
async fn write_state(store: &impl Store, name: &str, network: IpNet, entries: &[(&str, &Owner)]) {
    let mut pool = Pool::new(network);
    for (addr, o) in entries {
        pool.insert(to_u128(ip(addr)), o.allocation());
    }
    let base = store.read_pool(name).await.unwrap();
    store.write_pool(name, &pool.to_spec(), base.as_ref(), None).await.unwrap();
}

/// Asserts that every reservation is backed by an entry of the same attachment at its address in one of
/// `pools` (network name ""): a reservation without its pool entry is never released by DEL.
async fn assert_reservations_backed(store: &impl Store, pools: &[&str]) {
    let mut entries = BTreeMap::new();
    for name in pools {
        entries.extend(allocations(store, name).await);
    }
    for (name, held) in reservations(store).await {
        let backed = entries.iter().any(|(addr, a)| {
            reservation_name("", *addr) == name && a.pod_ref == held.pod_ref && a.ifname == held.ifname
        });
        assert!(backed, "reservation {name} of {held:?} has no pool entry in {pools:?}: {entries:?}");
    }
}

/// Lost races retried at once, within `budget`.
fn quick_retry(budget: Duration) -> RetryPolicy {
    RetryPolicy { budget, first_backoff: Duration::from_millis(1), max_backoff: Duration::from_millis(1) }
}

/// The default policy, but giving up after 200 ms.
fn briefly_patient() -> RetryPolicy {
    RetryPolicy { budget: Duration::from_millis(200), ..RetryPolicy::default() }
}

// === 1. lowest free address, reuse, `.0` and gateway ===

#[tokio::test]
async fn lowest_free_address_and_reuse_of_released_ones() {
    let (_dir, store) = file_store();
    let ipam = Ipam::new(&store);
    let config = single("192.0.2.0/24");
    for n in 1..=3 {
        assert_eq!(alloc(&ipam, &config, &owner(n)).await, ips(&[&format!("192.0.2.{n}")]));
    }
    assert_eq!(ipam.release(&config, "c2", "eth0").await.unwrap(), ips(&["192.0.2.2"]));
    assert_eq!(alloc(&ipam, &config, &owner(4)).await, ips(&["192.0.2.2"]));
    assert_eq!(alloc(&ipam, &config, &owner(5)).await, ips(&["192.0.2.4"]));

    let stored = allocations(&store, "192.0.2.0-24").await;
    let expected: BTreeMap<IpAddr, Allocation> = [(1, 1), (2, 4), (3, 3), (4, 5)]
        .into_iter()
        .map(|(host, n)| (ip(&format!("192.0.2.{host}")), owner(n).allocation()))
        .collect();
    assert_eq!(stored, expected);
    assert_eq!(store.list_pools().await.unwrap(), ["192.0.2.0-24"]);
}

#[tokio::test]
async fn ipv4_addresses_ending_in_dot_zero_are_skipped() {
    let (_dir, store) = file_store();
    let ipam = Ipam::new(&store);
    let config = cfg(json!({ "range": "10.20.0.0/16", "range_start": "10.20.0.254" }));
    let mut got = Vec::new();
    for n in 1..=4 {
        got.extend(alloc(&ipam, &config, &owner(n)).await);
    }
    assert_eq!(got, ips(&["10.20.0.254", "10.20.0.255", "10.20.1.1", "10.20.1.2"]));
}

#[tokio::test]
async fn the_gateway_is_never_handed_out() {
    let (_dir, store) = file_store();
    let ipam = Ipam::new(&store);
    let config = cfg(json!({ "range": "192.0.2.0/24", "gateway": "192.0.2.1" }));
    assert_eq!(alloc(&ipam, &config, &owner(1)).await, ips(&["192.0.2.2"]));
    assert_eq!(alloc(&ipam, &config, &owner(2)).await, ips(&["192.0.2.3"]));

    // A gateway in the middle of the interval, and right after a `.0` address.
    let config =
        cfg(json!({ "range": "10.30.0.0/16", "range_start": "10.30.0.255", "gateway": "10.30.1.1" }));
    let mut got = Vec::new();
    for n in 1..=3 {
        got.extend(alloc(&ipam, &config, &owner(n)).await);
    }
    assert_eq!(got, ips(&["10.30.0.255", "10.30.1.2", "10.30.1.3"]));
}

// === 2. idempotent ADD ===

#[tokio::test]
async fn add_is_idempotent_on_pod_and_interface() {
    let (_dir, store) = file_store();
    let ipam = Ipam::new(&store);
    let config = single("192.0.2.0/24");
    let name = pool_of(&config, 0);
    assert_eq!(alloc(&ipam, &config, &owner(1)).await, ips(&["192.0.2.1"]));
    let version_before = store.read_pool(&name).await.unwrap().unwrap().version;

    // The very same ADD again changes nothing, not even the pool's version.
    assert_eq!(alloc(&ipam, &config, &owner(1)).await, ips(&["192.0.2.1"]));
    assert_eq!(store.read_pool(&name).await.unwrap().unwrap().version, version_before);

    // A new sandbox of the same pod gets the same address, and the record follows the new container.
    let resandboxed = Owner { container_id: "c1-new".into(), ..owner(1) };
    assert_eq!(alloc(&ipam, &config, &resandboxed).await, ips(&["192.0.2.1"]));
    let stored = store.read_pool(&name).await.unwrap().unwrap();
    assert_ne!(stored.version, version_before);
    assert_eq!(stored.spec.allocations.len(), 1);
    assert_eq!(stored.spec.allocations["1"].container_id, "c1-new");
    assert_eq!(stored.spec.allocations["1"].pod_ref, "ns/p1");
    assert_eq!(ipam.held(&config, "c1-new", "eth0").await.unwrap(), [Some(ip("192.0.2.1"))]);
    assert_eq!(ipam.held(&config, "c1", "eth0").await.unwrap(), [None]);

    // Another interface of the same pod is another attachment.
    let second_if = Owner { ifname: "net1".into(), ..resandboxed.clone() };
    assert_eq!(alloc(&ipam, &config, &second_if).await, ips(&["192.0.2.2"]));

    // DEL with the new container ID releases the address and its reservation.
    assert_eq!(ipam.release(&config, "c1-new", "eth0").await.unwrap(), ips(&["192.0.2.1"]));
    assert_eq!(reservations(&store).await, reserved_by(&[("192.0.2.2", &second_if)]));
}

#[tokio::test]
async fn owners_outside_kubernetes_are_matched_by_container() {
    let (_dir, store) = file_store();
    let ipam = Ipam::new(&store);
    let config = single("192.0.2.0/24");
    assert_eq!(alloc(&ipam, &config, &owner(1)).await, ips(&["192.0.2.1"]));
    // A bare container whose ID equals a pod's container ID does not own the pod's address.
    assert_eq!(alloc(&ipam, &config, &bare_owner("c1")).await, ips(&["192.0.2.2"]));
    assert_eq!(alloc(&ipam, &config, &bare_owner("c1")).await, ips(&["192.0.2.2"]));
    assert_eq!(alloc(&ipam, &config, &bare_owner("x")).await, ips(&["192.0.2.3"]));
    assert_eq!(alloc(&ipam, &config, &bare_owner("x")).await, ips(&["192.0.2.3"]));
    let other_if = Owner { ifname: "net1".into(), ..bare_owner("x") };
    assert_eq!(alloc(&ipam, &config, &other_if).await, ips(&["192.0.2.4"]));

    let stored = allocations(&store, &pool_of(&config, 0)).await;
    assert_eq!(stored.len(), 4);
    assert_eq!(stored[&ip("192.0.2.2")], bare_owner("c1").allocation());
    assert_eq!(stored[&ip("192.0.2.3")], bare_owner("x").allocation());
    assert_eq!(
        reservations(&store).await,
        reserved_by(&[
            ("192.0.2.1", &owner(1)),
            ("192.0.2.2", &bare_owner("c1")),
            ("192.0.2.3", &bare_owner("x")),
            ("192.0.2.4", &other_if),
        ])
    );
}

// === 3. dual stack ===

fn dual_stack() -> IpamConfig {
    cfg(json!({ "range": "192.0.2.0/24", "ipRanges": [{ "range": "2001:db8::/64" }] }))
}

#[tokio::test]
async fn dual_stack_allocates_one_address_per_range_in_order() {
    let (_dir, store) = file_store();
    let ipam = Ipam::new(&store);
    let config = dual_stack();
    assert_eq!(pool_of(&config, 0), "192.0.2.0-24");
    assert_eq!(pool_of(&config, 1), "2001-db8---64");

    let first = ipam.allocate(&config, &owner(1)).await.unwrap();
    assert_eq!(
        first,
        [
            AllocatedIp { ip: ip("192.0.2.1"), network: "192.0.2.0/24".parse().unwrap() },
            AllocatedIp { ip: ip("2001:db8::1"), network: "2001:db8::/64".parse().unwrap() },
        ]
    );
    assert_eq!(alloc(&ipam, &config, &owner(2)).await, ips(&["192.0.2.2", "2001:db8::2"]));
    assert_eq!(
        ipam.held(&config, "c2", "eth0").await.unwrap(),
        [Some(ip("192.0.2.2")), Some(ip("2001:db8::2"))]
    );
    assert_eq!(
        reservations(&store).await,
        reserved_by(&[
            ("192.0.2.1", &owner(1)),
            ("192.0.2.2", &owner(2)),
            ("2001-db8--1", &owner(1)),
            ("2001-db8--2", &owner(2)),
        ])
    );

    // DEL frees both families.
    assert_eq!(ipam.release(&config, "c1", "eth0").await.unwrap(), ips(&["192.0.2.1", "2001:db8::1"]));
    assert_eq!(ipam.held(&config, "c1", "eth0").await.unwrap(), [None, None]);
    assert_eq!(
        reservations(&store).await,
        reserved_by(&[("192.0.2.2", &owner(2)), ("2001-db8--2", &owner(2))])
    );
    assert_eq!(alloc(&ipam, &config, &owner(3)).await, ips(&["192.0.2.1", "2001:db8::1"]));
}

#[tokio::test]
async fn releasing_an_unknown_container_frees_nothing() {
    let (_dir, store) = file_store();
    let ipam = Ipam::new(&store);
    let config = dual_stack();
    alloc(&ipam, &config, &owner(1)).await;
    let versions = [
        store.read_pool(&pool_of(&config, 0)).await.unwrap().unwrap().version,
        store.read_pool(&pool_of(&config, 1)).await.unwrap().unwrap().version,
    ];
    assert_eq!(ipam.release(&config, "nobody", "eth0").await.unwrap(), Vec::<IpAddr>::new());
    // The right container with the wrong interface is not the attachment either.
    assert_eq!(ipam.release(&config, "c1", "net1").await.unwrap(), Vec::<IpAddr>::new());
    assert_eq!(store.read_pool(&pool_of(&config, 0)).await.unwrap().unwrap().version, versions[0]);
    assert_eq!(store.read_pool(&pool_of(&config, 1)).await.unwrap().unwrap().version, versions[1]);
    assert_eq!(reservations(&store).await.len(), 2);

    // On a store that has never seen the network, DEL succeeds and creates nothing.
    let (_dir, empty) = file_store();
    assert_eq!(Ipam::new(&empty).release(&config, "c1", "eth0").await.unwrap(), Vec::<IpAddr>::new());
    assert!(empty.list_pools().await.unwrap().is_empty());
}

#[tokio::test]
async fn release_continues_past_a_range_without_an_allocation() {
    let (_dir, store) = file_store();
    let ipam = Ipam::new(&store);
    let config = dual_stack();
    alloc(&ipam, &config, &owner(1)).await;
    // Only the IPv6 pool knows container c9 (upstream stops at the IPv4 pool and leaks this).
    let v6 = config.ranges[1].range.network();
    write_state(&store, &pool_of(&config, 1), v6, &[("2001:db8::1", &owner(1)), ("2001:db8::99", &owner(9))])
        .await;

    assert_eq!(ipam.release(&config, "c9", "eth0").await.unwrap(), ips(&["2001:db8::99"]));
    assert_eq!(
        allocations(&store, &pool_of(&config, 1)).await,
        BTreeMap::from([(ip("2001:db8::1"), owner(1).allocation())])
    );
    assert_eq!(
        allocations(&store, &pool_of(&config, 0)).await,
        BTreeMap::from([(ip("192.0.2.1"), owner(1).allocation())])
    );
}

// === 4. all or nothing ===

/// A first range with room and a second range that is a /30.
fn with_small_second_range() -> IpamConfig {
    cfg(json!({ "range": "192.0.2.0/24", "ipRanges": [{ "range": "198.51.100.0/30" }] }))
}

/// Fills 198.51.100.0/30 with owners 10 and 11.
async fn fill_slash_30<S: Store>(ipam: &Ipam<'_, S>) {
    let small = single("198.51.100.0/30");
    assert_eq!(alloc(ipam, &small, &owner(10)).await, ips(&["198.51.100.1"]));
    assert_eq!(alloc(ipam, &small, &owner(11)).await, ips(&["198.51.100.2"]));
}

fn assert_exhausted(result: Result<Vec<AllocatedIp>, IpamError>, expected_pool: &str) {
    match result {
        Err(IpamError::Alloc { pool, source: AllocError::Exhausted(range) }) => {
            assert_eq!(pool, expected_pool);
            assert!(range.contains("198.51.100.1 - 198.51.100.2 in 198.51.100.0/30"), "{range}");
        }
        other => panic!("expected exhaustion of {expected_pool}, got {other:?}"),
    }
}

#[tokio::test]
async fn a_failing_range_rolls_back_the_earlier_ones() {
    let (_dir, store) = file_store();
    let ipam = Ipam::new(&store);
    let config = with_small_second_range();
    fill_slash_30(&ipam).await;

    assert_exhausted(ipam.allocate(&config, &owner(1)).await, "198.51.100.0-30");
    assert!(allocations(&store, "192.0.2.0-24").await.is_empty(), "the first address was rolled back");
    assert_eq!(ipam.held(&config, "c1", "eth0").await.unwrap(), [None, None]);
    assert_eq!(
        reservations(&store).await,
        reserved_by(&[("198.51.100.1", &owner(10)), ("198.51.100.2", &owner(11))])
    );
    // The rolled back address is free for the next owner.
    assert_eq!(alloc(&ipam, &single("192.0.2.0/24"), &owner(2)).await, ips(&["192.0.2.1"]));
}

#[tokio::test]
async fn the_rollback_keeps_an_allocation_the_owner_already_had() {
    let (_dir, store) = file_store();
    let ipam = Ipam::new(&store);
    let config = with_small_second_range();
    fill_slash_30(&ipam).await;
    assert_eq!(alloc(&ipam, &single("192.0.2.0/24"), &owner(1)).await, ips(&["192.0.2.1"]));

    assert_exhausted(ipam.allocate(&config, &owner(1)).await, "198.51.100.0-30");
    assert_eq!(
        allocations(&store, "192.0.2.0-24").await,
        BTreeMap::from([(ip("192.0.2.1"), owner(1).allocation())])
    );
    assert_eq!(reservations(&store).await["192.0.2.1"], reservation(&owner(1)));

    // The same with a new sandbox of the pod: the (refreshed) allocation stays too.
    let resandboxed = Owner { container_id: "c1-new".into(), ..owner(1) };
    assert_exhausted(ipam.allocate(&config, &resandboxed).await, "198.51.100.0-30");
    assert_eq!(ipam.held(&config, "c1-new", "eth0").await.unwrap(), [Some(ip("192.0.2.1")), None]);
    assert_eq!(reservations(&store).await.len(), 3);
}

// === 5. overlapping ranges and reservations ===

#[tokio::test]
async fn overlapping_ranges_never_share_an_address() {
    let (_dir, store) = file_store();
    let ipam = Ipam::new(&store);
    let a = single("10.10.0.0/16");
    let b = single("10.10.0.0/17");
    assert!(a.enable_overlapping_ranges && b.enable_overlapping_ranges);
    assert_eq!(alloc(&ipam, &a, &owner(1)).await, ips(&["10.10.0.1"]));
    assert_eq!(alloc(&ipam, &b, &owner(2)).await, ips(&["10.10.0.2"]));
    assert_eq!(
        allocations(&store, "10.10.0.0-17").await,
        BTreeMap::from([(ip("10.10.0.2"), owner(2).allocation())]),
        "pool B keeps no entry for the address reserved through pool A"
    );
    assert_eq!(alloc(&ipam, &a, &owner(3)).await, ips(&["10.10.0.3"]), "A skips the address B took");
    assert_eq!(
        reservations(&store).await,
        reserved_by(&[("10.10.0.1", &owner(1)), ("10.10.0.2", &owner(2)), ("10.10.0.3", &owner(3))])
    );

    // Releases delete the releasing owner's reservations only.
    assert_eq!(ipam.release(&a, "c1", "eth0").await.unwrap(), ips(&["10.10.0.1"]));
    assert_eq!(ipam.release(&a, "c2", "eth0").await.unwrap(), Vec::<IpAddr>::new(), "c2 is in pool B");
    assert_eq!(
        reservations(&store).await,
        reserved_by(&[("10.10.0.2", &owner(2)), ("10.10.0.3", &owner(3))])
    );
    assert_eq!(ipam.release(&b, "c2", "eth0").await.unwrap(), ips(&["10.10.0.2"]));
    assert_eq!(reservations(&store).await, reserved_by(&[("10.10.0.3", &owner(3))]));
    // Freed addresses are usable from the other pool again.
    assert_eq!(alloc(&ipam, &b, &owner(4)).await, ips(&["10.10.0.1"]));
}

#[tokio::test]
async fn without_overlapping_ranges_no_reservation_is_consulted() {
    let (_dir, store) = file_store();
    let ipam = Ipam::new(&store);
    let a = single("10.10.0.0/16");
    let b = cfg(json!({ "range": "10.10.0.0/17", "enable_overlapping_ranges": false }));
    assert!(!b.enable_overlapping_ranges);
    assert_eq!(alloc(&ipam, &a, &owner(1)).await, ips(&["10.10.0.1"]));
    // Upstream-pinned: B neither checks nor writes reservations, so it hands out the same address.
    assert_eq!(alloc(&ipam, &b, &owner(2)).await, ips(&["10.10.0.1"]));
    assert_eq!(reservations(&store).await, reserved_by(&[("10.10.0.1", &owner(1))]));
    assert_eq!(ipam.release(&b, "c2", "eth0").await.unwrap(), ips(&["10.10.0.1"]));
    assert_eq!(reservations(&store).await, reserved_by(&[("10.10.0.1", &owner(1))]));
}

#[tokio::test]
async fn different_network_names_are_independent() {
    let (_dir, store) = file_store();
    let ipam = Ipam::new(&store);
    let red = cfg(json!({ "range": "10.10.0.0/16", "network_name": "red" }));
    let blue = cfg(json!({ "range": "10.10.0.0/17", "network_name": "blue" }));
    assert_eq!(pool_of(&red, 0), "red-10.10.0.0-16");
    assert_eq!(pool_of(&blue, 0), "blue-10.10.0.0-17");
    assert_eq!(alloc(&ipam, &red, &owner(1)).await, ips(&["10.10.0.1"]));
    assert_eq!(alloc(&ipam, &blue, &owner(2)).await, ips(&["10.10.0.1"]));
    // Same range, same network name as `red`: shared pool.
    let red_again = cfg(json!({ "range": "10.10.0.0/16", "network_name": "red" }));
    assert_eq!(alloc(&ipam, &red_again, &owner(3)).await, ips(&["10.10.0.2"]));
    assert_eq!(
        reservations(&store).await,
        reserved_by(&[
            ("blue-10.10.0.1", &owner(2)),
            ("red-10.10.0.1", &owner(1)),
            ("red-10.10.0.2", &owner(3)),
        ])
    );
    assert_eq!(store.list_pools().await.unwrap(), ["blue-10.10.0.0-17", "red-10.10.0.0-16"]);
    assert_eq!(ipam.release(&blue, "c2", "eth0").await.unwrap(), ips(&["10.10.0.1"]));
    assert!(!reservations(&store).await.contains_key("blue-10.10.0.1"));
    assert!(reservations(&store).await.contains_key("red-10.10.0.1"));
}

#[tokio::test]
async fn a_release_never_deletes_another_owners_reservation() {
    let (_dir, store) = file_store();
    let ipam = Ipam::new(&store);
    let a = single("10.10.0.0/16");
    let b = single("10.10.0.0/17");
    assert_eq!(alloc(&ipam, &a, &owner(1)).await, ips(&["10.10.0.1"]));
    // Pool B holds 10.10.0.1 for owner 2 without a reservation (a writer died between its two writes).
    write_state(&store, "10.10.0.0-17", b.ranges[0].range.network(), &[("10.10.0.1", &owner(2))]).await;

    assert_eq!(ipam.release(&b, "c2", "eth0").await.unwrap(), ips(&["10.10.0.1"]));
    assert!(allocations(&store, "10.10.0.0-17").await.is_empty());
    assert_eq!(reservations(&store).await, reserved_by(&[("10.10.0.1", &owner(1))]));
}

#[tokio::test]
async fn an_existing_entry_whose_address_another_owner_reserved_is_given_up() {
    let (_dir, store) = file_store();
    let ipam = Ipam::new(&store);
    let a = single("10.10.0.0/16");
    let b = single("10.10.0.0/17");
    assert_eq!(alloc(&ipam, &a, &owner(1)).await, ips(&["10.10.0.1"]));
    write_state(&store, "10.10.0.0-17", b.ranges[0].range.network(), &[("10.10.0.1", &owner(2))]).await;
    // Owner 2's retried ADD finds its entry, loses the reservation race, and moves on.
    assert_eq!(alloc(&ipam, &b, &owner(2)).await, ips(&["10.10.0.2"]));
    assert_eq!(
        allocations(&store, "10.10.0.0-17").await,
        BTreeMap::from([(ip("10.10.0.2"), owner(2).allocation())])
    );
    assert_eq!(
        reservations(&store).await,
        reserved_by(&[("10.10.0.1", &owner(1)), ("10.10.0.2", &owner(2))])
    );
}

// === 6. requested addresses ===

fn requesting(ipam: Value, requested: &str) -> IpamConfig {
    let call =
        CallContext { requested_ips: vec![("runtimeConfig.ips", requested.into())], ..Default::default() };
    config_with(ipam, &call)
}

#[tokio::test]
async fn a_requested_address_is_granted_and_reserved() {
    let (_dir, store) = file_store();
    let ipam = Ipam::new(&store);
    let config = requesting(json!({ "range": "10.0.0.0/24" }), "10.0.0.50/24");
    assert_eq!(config.ranges[0].requested, Some(ip("10.0.0.50")));

    assert_eq!(alloc(&ipam, &config, &owner(1)).await, ips(&["10.0.0.50"]));
    assert_eq!(reservations(&store).await, reserved_by(&[("10.0.0.50", &owner(1))]));
    // Idempotent for its owner.
    assert_eq!(alloc(&ipam, &config, &owner(1)).await, ips(&["10.0.0.50"]));

    match ipam.allocate(&config, &owner(2)).await {
        Err(IpamError::Alloc { pool, source: AllocError::Held { ip: held, holder } }) => {
            assert_eq!(pool, "10.0.0.0-24");
            assert_eq!(held, ip("10.0.0.50"));
            assert_eq!(holder, "ns/p1");
        }
        other => panic!("expected the request to be refused, got {other:?}"),
    }
    assert_eq!(
        allocations(&store, "10.0.0.0-24").await,
        BTreeMap::from([(ip("10.0.0.50"), owner(1).allocation())])
    );
    // Without a request, the lowest free address.
    assert_eq!(alloc(&ipam, &single("10.0.0.0/24"), &owner(3)).await, ips(&["10.0.0.1"]));
}

#[tokio::test]
async fn a_requested_address_reserved_through_an_overlapping_range_is_refused() {
    let (_dir, store) = file_store();
    let ipam = Ipam::new(&store);
    let wide = requesting(json!({ "range": "10.0.0.0/16" }), "10.0.0.50/16");
    let narrow = requesting(json!({ "range": "10.0.0.0/24" }), "10.0.0.50/24");
    assert_eq!(alloc(&ipam, &wide, &owner(1)).await, ips(&["10.0.0.50"]));
    match ipam.allocate(&narrow, &owner(2)).await {
        Err(IpamError::Alloc { pool, source: AllocError::Held { ip: held, .. } }) => {
            assert_eq!(pool, "10.0.0.0-24");
            assert_eq!(held, ip("10.0.0.50"));
        }
        other => panic!("expected the request to be refused, got {other:?}"),
    }
    assert!(allocations(&store, "10.0.0.0-24").await.is_empty());
    assert_eq!(reservations(&store).await, reserved_by(&[("10.0.0.50", &owner(1))]));
}

// === 7. contention and store failures ===

/// A file store whose pool writes conflict a number of times and whose reservations can be made to fail.
#[derive(Debug)]
struct Flaky {
    inner: FileStore,
    /// Pool writes still to answer with a conflict.
    conflicts_left: AtomicUsize,
    /// Pool writes attempted.
    writes: AtomicUsize,
    /// The tasks that asked for reservations (`create_reservation` calls), one entry per call.
    reservation_callers: std::sync::Mutex<Vec<Option<tokio::task::Id>>>,
    /// Reservation reads answered.
    reservation_reads: AtomicUsize,
    /// Creating a reservation whose name contains this answers "unavailable".
    reservations_down: Option<&'static str>,
    /// Pool reads still to answer "unavailable" (an etcd election, say).
    reads_unavailable: AtomicUsize,
    /// The writer queue's announcement directory, as the distributed stores have one.
    queue: Option<std::path::PathBuf>,
    /// Drops the additive fields (`node`, `network`) from written pools, as an API server still serving
    /// upstream's CRDs prunes them.
    prune_additive: bool,
    /// Written over the pool right after the next read of it: another writer acting between a
    /// reader's read and its write.
    written_after_next_read: std::sync::Mutex<Option<PoolSpec>>,
}

impl Flaky {
    fn new(inner: FileStore, conflicts: usize, reservations_down: Option<&'static str>) -> Self {
        Flaky {
            inner,
            conflicts_left: AtomicUsize::new(conflicts),
            writes: AtomicUsize::new(0),
            reservation_callers: std::sync::Mutex::default(),
            reservation_reads: AtomicUsize::new(0),
            reservations_down,
            reads_unavailable: AtomicUsize::new(0),
            queue: None,
            prune_additive: false,
            written_after_next_read: std::sync::Mutex::new(None),
        }
    }

    fn writing_after_next_read(self, spec: PoolSpec) -> Self {
        *self.written_after_next_read.lock().unwrap() = Some(spec);
        self
    }

    fn pruning_additive_fields(mut self) -> Self {
        self.prune_additive = true;
        self
    }

    fn with_queue(mut self, dir: std::path::PathBuf) -> Self {
        self.queue = Some(dir);
        self
    }

    fn reservation_callers(&self) -> Vec<Option<tokio::task::Id>> {
        self.reservation_callers.lock().unwrap().clone()
    }

    fn writes(&self) -> usize {
        self.writes.load(Ordering::SeqCst)
    }
}

impl Store for Flaky {
    fn queue_dir(&self, _name: &str) -> Option<std::path::PathBuf> {
        self.queue.clone()
    }

    async fn lock_pool(&self, name: &str, deadline: Instant) -> Result<Option<PoolLock>, StoreError> {
        self.inner.lock_pool(name, deadline).await
    }

    async fn read_pool(&self, name: &str) -> Result<Option<VersionedPool>, StoreError> {
        if self
            .reads_unavailable
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(StoreError::Unavailable("injected".into()));
        }
        let read = self.inner.read_pool(name).await?;
        let next = self.written_after_next_read.lock().unwrap().take();
        if let Some(spec) = next {
            self.inner.write_pool(name, &spec, read.as_ref(), None).await?;
        }
        Ok(read)
    }

    async fn write_pool(
        &self,
        name: &str,
        spec: &PoolSpec,
        base: Option<&VersionedPool>,
        lock: Option<&PoolLock>,
    ) -> Result<Version, StoreError> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        let conflict =
            self.conflicts_left.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        if conflict.is_ok() {
            return Err(StoreError::Conflict);
        }
        let mut spec = spec.clone();
        if self.prune_additive {
            for allocation in spec.allocations.values_mut() {
                (allocation.node, allocation.cni_network) = (None, None);
            }
        }
        self.inner.write_pool(name, &spec, base, lock).await
    }

    async fn create_reservation(
        &self,
        name: &str,
        owner: &Reservation,
    ) -> Result<ReserveOutcome, StoreError> {
        self.reservation_callers.lock().unwrap().push(tokio::task::try_id());
        if self.reservations_down.is_some_and(|down| name.contains(down)) {
            return Err(StoreError::Unavailable("injected".into()));
        }
        self.inner.create_reservation(name, owner).await
    }

    async fn read_reservation(&self, name: &str) -> Result<Option<VersionedReservation>, StoreError> {
        let read = self.inner.read_reservation(name).await;
        self.reservation_reads.fetch_add(1, Ordering::SeqCst);
        read
    }

    async fn delete_reservation(
        &self,
        name: &str,
        as_read: &ReservationVersion,
    ) -> Result<Deletion, StoreError> {
        self.inner.delete_reservation(name, as_read).await
    }

    async fn list_pools(&self) -> Result<Vec<String>, StoreError> {
        self.inner.list_pools().await
    }

    async fn list_reservations(&self) -> Result<Vec<(String, VersionedReservation)>, StoreError> {
        self.inner.list_reservations().await
    }
}

#[tokio::test]
async fn conflicting_writes_are_retried() {
    let (_dir, inner) = file_store();
    let store = Flaky::new(inner, 3, None);
    let ipam = Ipam::new(&store).with_retry(quick_retry(Duration::from_secs(30)));
    let config = single("192.0.2.0/24");
    let got = alloc(&ipam, &config, &owner(1)).await;
    assert_eq!(store.writes(), 4);
    // After three lost races the writer (without a node: its pod) takes its lane of the free addresses.
    let range = &config.ranges[0].range;
    let lane = Lane::of("ns/p1", 3);
    let start = lane_start(range, &Pool::new(range.network()), None, &IntervalSet::new(), lane).unwrap();
    assert_eq!(got, [from_u128(Family::V4, start)]);
    let addr = got[0].to_string();
    assert_eq!(
        allocations(&store, "192.0.2.0-24").await,
        BTreeMap::from([(ip(&addr), owner(1).allocation())])
    );
    assert_eq!(reservations(&store).await, reserved_by(&[(addr.as_str(), &owner(1))]));
    // Without lost races, the next owner gets the lowest free address.
    let next = if addr == "192.0.2.1" { "192.0.2.2" } else { "192.0.2.1" };
    let calm = Ipam::new(&store.inner).with_retry(quick_retry(Duration::from_secs(30)));
    assert_eq!(alloc(&calm, &config, &owner(2)).await, ips(&[next]));
}

#[tokio::test]
async fn endless_conflicts_end_in_contention_naming_the_pool() {
    let (_dir, inner) = file_store();
    let store = Flaky::new(inner, usize::MAX, None);
    let ipam = Ipam::new(&store).with_retry(quick_retry(Duration::from_millis(300)));
    let config = dual_stack();
    match ipam.allocate(&config, &owner(1)).await {
        Err(IpamError::Contention { pool, attempts }) => {
            assert_eq!(pool, "192.0.2.0-24");
            assert!(attempts > 5, "retried until the deadline, not a count: {attempts}");
            assert_eq!(store.writes(), attempts as usize);
        }
        other => panic!("expected contention, got {other:?}"),
    }
    assert!(store.list_pools().await.unwrap().is_empty());
    assert!(reservations(&store).await.is_empty());
}

#[tokio::test]
async fn contention_past_the_deadline_reports_the_writes_tried() {
    let (_dir, inner) = file_store();
    let store = Flaky::new(inner, usize::MAX, None);
    let retry = quick_retry(Duration::ZERO);
    let ipam = Ipam::new(&store).with_retry(retry);
    let err = ipam.allocate(&single("192.0.2.0/24"), &owner(1)).await.unwrap_err();
    assert_eq!(store.writes(), 1, "the deadline is already past after the first conflict");
    match err {
        IpamError::Contention { attempts, .. } => assert_eq!(attempts, 1, "{err}"),
        other => panic!("expected contention, got {other:?}"),
    }
}

#[tokio::test]
async fn an_unavailable_reservation_store_leaves_no_pool_entry() {
    let (_dir, inner) = file_store();
    let store = Flaky::new(inner, 0, Some(""));
    let ipam = Ipam::new(&store).with_retry(briefly_patient());
    let config = single("192.0.2.0/24");
    match ipam.allocate(&config, &owner(1)).await {
        Err(IpamError::Store { object, source: StoreError::Unavailable(_) }) => {
            assert_eq!(object, "reservation 192.0.2.1");
        }
        other => panic!("expected the reservation failure, got {other:?}"),
    }
    assert!(allocations(&store, "192.0.2.0-24").await.is_empty());
    assert!(reservations(&store).await.is_empty());
}

#[tokio::test]
async fn an_unavailable_reservation_store_in_a_later_range_rolls_back_the_earlier_ones() {
    let (_dir, inner) = file_store();
    let store = Flaky::new(inner, 0, Some("2001-db8"));
    let ipam = Ipam::new(&store).with_retry(briefly_patient());
    let config = dual_stack();
    match ipam.allocate(&config, &owner(1)).await {
        Err(IpamError::Store { object, source: StoreError::Unavailable(_) }) => {
            assert_eq!(object, "reservation 2001-db8--1");
        }
        other => panic!("expected the reservation failure, got {other:?}"),
    }
    assert!(allocations(&store, "192.0.2.0-24").await.is_empty());
    assert!(allocations(&store, "2001-db8---64").await.is_empty());
    assert!(reservations(&store).await.is_empty());
}

// === 8. garbage collection ===

#[tokio::test]
async fn gc_releases_only_this_nodes_stale_attachments_of_this_network() {
    let (_dir, store) = file_store();
    let ipam = Ipam::new(&store);
    let config = single("192.0.2.0/24");
    let valid = owner_on(1, Some("n1"), Some("net"));
    let stale = owner_on(2, Some("n1"), Some("net"));
    let other_node = owner_on(3, Some("n2"), Some("net"));
    let other_network = owner_on(4, Some("n1"), Some("other"));
    let no_node = owner_on(5, None, Some("net"));
    for (n, o) in [&valid, &stale, &other_node, &other_network, &no_node].into_iter().enumerate() {
        assert_eq!(alloc(&ipam, &config, o).await, ips(&[&format!("192.0.2.{}", n + 1)]));
    }

    let attachments = HashSet::from([("c1".to_string(), "eth0".to_string())]);
    let released = ipam.collect_garbage(&config, "n1", "net", &attachments).await.unwrap();
    assert_eq!(released, ips(&["192.0.2.2"]));
    let expected: BTreeMap<IpAddr, Allocation> = [
        ("192.0.2.1", &valid),
        ("192.0.2.3", &other_node),
        ("192.0.2.4", &other_network),
        ("192.0.2.5", &no_node),
    ]
    .into_iter()
    .map(|(addr, o)| (ip(addr), o.allocation()))
    .collect();
    assert_eq!(allocations(&store, "192.0.2.0-24").await, expected);
    assert_eq!(
        reservations(&store).await,
        reserved_by(&[
            ("192.0.2.1", &valid),
            ("192.0.2.3", &other_node),
            ("192.0.2.4", &other_network),
            ("192.0.2.5", &no_node),
        ])
    );
    // A second pass has nothing left to do.
    assert!(ipam.collect_garbage(&config, "n1", "net", &attachments).await.unwrap().is_empty());
}

// === 9. exhausted pools ===

#[tokio::test]
async fn exhausted_pools_are_reported_by_name() {
    let (_dir, store) = file_store();
    let ipam = Ipam::new(&store);
    let config = with_small_second_range();
    assert!(ipam.exhausted_pools(&config).await.unwrap().is_empty(), "fresh pools have room");
    assert!(store.list_pools().await.unwrap().is_empty(), "STATUS writes nothing");
    fill_slash_30(&ipam).await;
    assert_eq!(ipam.exhausted_pools(&config).await.unwrap(), ["198.51.100.0-30"]);
    assert_eq!(
        ipam.release(&single("198.51.100.0/30"), "c10", "eth0").await.unwrap(),
        ips(&["198.51.100.1"])
    );
    assert!(ipam.exhausted_pools(&config).await.unwrap().is_empty());

    // The gateway counts as unavailable.
    let with_gateway = cfg(json!({ "range": "203.0.113.0/30", "gateway": "203.0.113.1" }));
    assert!(ipam.exhausted_pools(&with_gateway).await.unwrap().is_empty());
    assert_eq!(alloc(&ipam, &with_gateway, &owner(1)).await, ips(&["203.0.113.2"]));
    assert_eq!(ipam.exhausted_pools(&with_gateway).await.unwrap(), ["203.0.113.0-30"]);
}

// === 9b. node slices ===

/// `config`'s first range narrowed to node `node`'s slice `slice`, as the CNI shell does it.
fn in_slice(mut config: IpamConfig, node: &str, slice: &str) -> IpamConfig {
    let slicing = config.node_slicing().unwrap().expect("node_slice_size is set");
    let network = slicing.range().network().to_string();
    let size = format!("/{}", slicing.size());
    let (slice, inside) = slicing.check_assigned(&network, &size, Some(slice)).unwrap();
    config.ranges[0] = config.ranges[0].in_node_slice(&config.network_name, node, slice, inside).unwrap();
    config
}

/// Every engine path works in the node's pool of its slice: keys are offsets from the slice, the result
/// keeps the whole range's prefix, the gateway is honoured, and the second range is not sliced.
#[tokio::test]
async fn a_node_slice_is_allocated_released_and_reported_in_its_own_pool() {
    let (_dir, store) = file_store();
    let ipam = Ipam::new(&store);
    let sliced = cfg(json!({
        "range": "10.0.0.0/24", "gateway": "10.0.0.5", "node_slice_size": "/30", "network_name": "blue",
        "ipRanges": [{ "range": "2001:db8::/64" }],
    }));
    let config = in_slice(sliced.clone(), "n1", "10.0.0.4/30");
    let pool = "blue-n1-10.0.0.4-30";
    let a = owner_on(1, Some("n1"), Some("net"));
    let allocated = ipam.allocate(&config, &a).await.unwrap();
    assert_eq!(
        allocated,
        [
            AllocatedIp { ip: ip("10.0.0.6"), network: "10.0.0.0/24".parse().unwrap() },
            AllocatedIp { ip: ip("2001:db8::1"), network: "2001:db8::/64".parse().unwrap() },
        ]
    );
    let stored = store.read_pool(pool).await.unwrap().expect("the slice's pool");
    assert_eq!(stored.spec.range, "10.0.0.4/30");
    assert_eq!(stored.spec.allocations.keys().collect::<Vec<_>>(), ["2"], "offset from the slice");
    let mut pools = store.list_pools().await.unwrap();
    pools.sort();
    assert_eq!(pools, ["blue-2001-db8---64", pool], "no pool of the whole IPv4 range");
    assert_eq!(reservations(&store).await, reserved_by(&[("blue-10.0.0.6", &a), ("blue-2001-db8--1", &a)]));
    assert_eq!(
        ipam.held(&config, "c1", "eth0").await.unwrap(),
        [Some(ip("10.0.0.6")), Some(ip("2001:db8::1"))]
    );

    // The slice's only other address is the gateway: it is full.
    let full = ipam.allocate(&config, &owner(2)).await;
    assert!(matches!(&full, Err(IpamError::Alloc { pool: p, .. }) if p == pool), "{full:?}");
    assert!(allocations(&store, "blue-2001-db8---64").await.len() == 1, "the IPv6 address was rolled back");
    assert_eq!(ipam.exhausted_pools(&config).await.unwrap(), [pool]);

    // Another node's slice is another pool.
    let other = in_slice(sliced, "n2", "10.0.0.8/30");
    assert_eq!(alloc(&ipam, &other, &owner(3)).await, ips(&["10.0.0.9", "2001:db8::2"]));
    assert_eq!(
        allocations(&store, "blue-n2-10.0.0.8-30").await.keys().collect::<Vec<_>>(),
        [&ip("10.0.0.9")]
    );

    // GC and DEL find the address in the slice's pool.
    let released = ipam.collect_garbage(&config, "n1", "net", &HashSet::new()).await.unwrap();
    assert_eq!(released, ips(&["10.0.0.6", "2001:db8::1"]));
    assert!(allocations(&store, pool).await.is_empty());
    assert!(ipam.exhausted_pools(&config).await.unwrap().is_empty());
    assert_eq!(alloc(&ipam, &config, &owner(4)).await, ips(&["10.0.0.6", "2001:db8::1"]));
    assert_eq!(ipam.release(&config, "c4", "eth0").await.unwrap(), ips(&["10.0.0.6", "2001:db8::1"]));
    assert!(allocations(&store, pool).await.is_empty());
    assert_eq!(
        reservations(&store).await,
        reserved_by(&[("blue-10.0.0.9", &owner(3)), ("blue-2001-db8--2", &owner(3))])
    );
}

/// A move to a requested address inside the slice releases the old one from the slice's pool.
#[tokio::test]
async fn a_move_inside_a_node_slice_releases_the_old_address_from_its_pool() {
    let (_dir, store) = file_store();
    let ipam = Ipam::new(&store);
    let base = json!({ "range": "10.0.0.0/24", "node_slice_size": "/28" });
    let config = in_slice(cfg(base.clone()), "n1", "10.0.0.16/28");
    assert_eq!(alloc(&ipam, &config, &owner(1)).await, ips(&["10.0.0.17"]));
    let call =
        CallContext { requested_ips: vec![("runtimeConfig.ips", "10.0.0.20".into())], ..Default::default() };
    let moving = in_slice(config_with(base, &call), "n1", "10.0.0.16/28");
    assert_eq!(alloc(&ipam, &moving, &owner(1)).await, ips(&["10.0.0.20"]));
    assert_eq!(allocations(&store, "n1-10.0.0.16-28").await.keys().collect::<Vec<_>>(), [&ip("10.0.0.20")]);
    assert_eq!(reservations(&store).await, reserved_by(&[("10.0.0.20", &owner(1))]));
}

// === 10. concurrency ===

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_allocations_never_share_an_address() {
    const TASKS: usize = 16;
    const PER_TASK: usize = 10;
    let (_dir, store) = file_store();
    let store = Arc::new(store);
    let config = Arc::new(single("192.0.2.0/24"));
    let tasks: Vec<_> = (0..TASKS)
        .map(|t| {
            let store = Arc::clone(&store);
            let config = Arc::clone(&config);
            tokio::spawn(async move {
                let ipam = Ipam::new(&*store);
                let mut got = Vec::with_capacity(PER_TASK);
                for i in 0..PER_TASK {
                    let o = owner(t * PER_TASK + i);
                    let allocated = ipam.allocate(&config, &o).await.unwrap();
                    assert_eq!(allocated.len(), 1);
                    got.push((o, allocated[0].ip));
                }
                got
            })
        })
        .collect();
    let mut results = Vec::with_capacity(TASKS * PER_TASK);
    for task in tasks {
        results.extend(task.await.unwrap());
    }
    assert_eq!(results.len(), TASKS * PER_TASK);

    let distinct: HashSet<IpAddr> = results.iter().map(|(_, ip)| *ip).collect();
    assert_eq!(distinct.len(), TASKS * PER_TASK, "an address was handed out twice");
    let expected_pool: BTreeMap<IpAddr, Allocation> =
        results.iter().map(|(o, ip)| (*ip, o.allocation())).collect();
    assert_eq!(allocations(&*store, "192.0.2.0-24").await, expected_pool);
    let expected_reservations: BTreeMap<String, Reservation> =
        results.iter().map(|(o, ip)| (reservation_name("", *ip), reservation(o))).collect();
    assert_eq!(reservations(&*store).await, expected_reservations);
    // Lowest free first: with no releases the handed-out addresses are exactly .1 to .160.
    let expected_ips: HashSet<IpAddr> = (1..=TASKS * PER_TASK).map(|h| ip(&format!("192.0.2.{h}"))).collect();
    assert_eq!(distinct, expected_ips);
}

// === bugs ===

/// Moving an attachment to a requested address that an overlapping range has reserved drops the
/// attachment's previous pool entry but keeps its previous reservation, which nothing ever deletes.
#[tokio::test]
async fn a_refused_move_to_a_requested_address_does_not_leak_the_old_reservation() {
    let (_dir, store) = file_store();
    let ipam = Ipam::new(&store);
    let narrow = single("10.0.0.0/24");
    let wide = single("10.0.0.0/16");
    // Owner 1 holds 10.0.0.1 in the /24; owner 2 holds 10.0.0.2 in the overlapping /16.
    assert_eq!(alloc(&ipam, &narrow, &owner(1)).await, ips(&["10.0.0.1"]));
    assert_eq!(alloc(&ipam, &wide, &owner(2)).await, ips(&["10.0.0.2"]));
    // Owner 1's pod is re-added asking for 10.0.0.2: refused.
    let moving = requesting(json!({ "range": "10.0.0.0/24" }), "10.0.0.2/24");
    assert!(matches!(
        ipam.allocate(&moving, &owner(1)).await,
        Err(IpamError::Alloc { source: AllocError::Held { .. }, .. })
    ));
    assert_reservations_backed(&store, &["10.0.0.0-24", "10.0.0.0-16"]).await;
    // Whatever happened to owner 1's pool entry, its DEL must leave no reservation of owner 1 behind.
    ipam.release(&narrow, "c1", "eth0").await.unwrap();
    assert_eq!(reservations(&store).await, reserved_by(&[("10.0.0.2", &owner(2))]), "10.0.0.1 leaked");
    // Otherwise 10.0.0.1 can never be handed out again in this network.
    assert_eq!(alloc(&ipam, &narrow, &owner(3)).await, ips(&["10.0.0.1"]));
}

/// The same leak when the reservation store fails while moving to a requested address.
#[tokio::test]
async fn a_failed_reservation_while_moving_does_not_leak_the_old_reservation() {
    let (_dir, inner) = file_store();
    let narrow = single("10.0.0.0/24");
    assert_eq!(alloc(&Ipam::new(&inner), &narrow, &owner(1)).await, ips(&["10.0.0.1"]));
    let flaky = Flaky::new(inner.clone(), 0, Some(""));
    let moving = requesting(json!({ "range": "10.0.0.0/24" }), "10.0.0.50/24");
    assert!(matches!(
        Ipam::new(&flaky).with_retry(briefly_patient()).allocate(&moving, &owner(1)).await,
        Err(IpamError::Store { source: StoreError::Unavailable(_), .. })
    ));
    assert_reservations_backed(&inner, &["10.0.0.0-24"]).await;
    let ipam = Ipam::new(&inner);
    ipam.release(&narrow, "c1", "eth0").await.unwrap();
    assert!(reservations(&inner).await.is_empty(), "10.0.0.1 leaked");
    assert_eq!(alloc(&ipam, &narrow, &owner(3)).await, ips(&["10.0.0.1"]));
}

/// A move to a requested address in the first range is undone when a later range fails: the owner keeps
/// its previous address and reservation, and the requested one is free again.
#[tokio::test]
async fn a_failed_multi_range_add_keeps_the_address_an_owner_was_moving_away_from() {
    let (_dir, store) = file_store();
    let ipam = Ipam::new(&store);
    let full = json!({ "range": "10.0.0.0/24", "ipRanges": [{ "range": "198.51.100.0/30" }] });
    assert_eq!(alloc(&ipam, &cfg(full.clone()), &owner(1)).await, ips(&["10.0.0.1", "198.51.100.1"]));
    assert_eq!(alloc(&ipam, &cfg(full.clone()), &owner(2)).await, ips(&["10.0.0.2", "198.51.100.2"]));
    // Owner 3 holds 10.0.0.3 through the first range only.
    assert_eq!(alloc(&ipam, &single("10.0.0.0/24"), &owner(3)).await, ips(&["10.0.0.3"]));
    let moving = requesting(full, "10.0.0.50/24");
    assert!(matches!(
        ipam.allocate(&moving, &owner(3)).await,
        Err(IpamError::Alloc { source: AllocError::Exhausted(_), .. })
    ));
    let held: Vec<IpAddr> = allocations(&store, "10.0.0.0-24").await.into_keys().collect();
    assert_eq!(held, ips(&["10.0.0.1", "10.0.0.2", "10.0.0.3"]));
    assert!(reservations(&store).await.contains_key("10.0.0.3"));
    assert!(!reservations(&store).await.contains_key("10.0.0.50"));
}

/// A pod's new sandbox takes over its address and reservation; the old sandbox's late DEL releases
/// neither (upstream's ORIP delete checks no owner at all).
#[tokio::test]
async fn the_old_sandboxs_del_leaves_the_new_sandboxs_address_and_reservation() {
    let (_dir, store) = file_store();
    let ipam = Ipam::new(&store);
    let config = single("10.0.0.0/24");
    assert_eq!(alloc(&ipam, &config, &owner(1)).await, ips(&["10.0.0.1"]));
    let new_sandbox = Owner { container_id: "c1-new".into(), ..owner(1) };
    assert_eq!(alloc(&ipam, &config, &new_sandbox).await, ips(&["10.0.0.1"]));
    assert_eq!(reservations(&store).await, reserved_by(&[("10.0.0.1", &new_sandbox)]));
    assert!(ipam.release(&config, "c1", "eth0").await.unwrap().is_empty());
    assert_eq!(reservations(&store).await, reserved_by(&[("10.0.0.1", &new_sandbox)]));
    assert_eq!(ipam.release(&config, "c1-new", "eth0").await.unwrap(), ips(&["10.0.0.1"]));
    assert!(reservations(&store).await.is_empty());
}

/// A crash in the middle of a move to a requested address can leave two entries of one attachment;
/// DEL releases both.
#[tokio::test]
async fn del_releases_every_entry_of_the_attachment() {
    let (_dir, store) = file_store();
    let ipam = Ipam::new(&store);
    let config = single("10.0.0.0/24");
    let network = config.ranges[0].range.network();
    write_state(&store, "10.0.0.0-24", network, &[("10.0.0.1", &owner(1)), ("10.0.0.50", &owner(1))]).await;
    assert_eq!(ipam.release(&config, "c1", "eth0").await.unwrap(), ips(&["10.0.0.1", "10.0.0.50"]));
    assert!(allocations(&store, "10.0.0.0-24").await.is_empty());
}

/// Hundreds of addresses already reserved through an overlapping range are skipped by reading their
/// reservations, not by writing the pool once for each (which used to end in a false "contention").
#[tokio::test]
async fn many_addresses_reserved_by_an_overlapping_range_are_skipped_cheaply() {
    let (_dir, inner) = file_store();
    let foreign = reservation(&owner(99));
    let mut reserved = 0;
    let mut next = to_u128(ip("10.10.0.1"));
    while reserved < 600 {
        let candidate = whereabouts_core::addr::from_u128(whereabouts_core::addr::Family::V4, next);
        next += 1;
        if candidate.to_string().ends_with(".0") {
            continue;
        }
        let outcome = inner.create_reservation(&reservation_name("", candidate), &foreign).await.unwrap();
        assert_eq!(outcome, ReserveOutcome::Reserved);
        reserved += 1;
    }
    let flaky = Flaky::new(inner, 0, None);
    let ipam = Ipam::new(&flaky);
    let expected = whereabouts_core::addr::from_u128(whereabouts_core::addr::Family::V4, next);
    assert_eq!(alloc(&ipam, &single("10.10.0.0/17"), &owner(1)).await, vec![expected]);
    // One write that lost the race for 10.10.0.1, its undo, then the write of the address it got.
    assert_eq!(flaky.writes(), 3);
}

/// A store briefly unavailable (an etcd leader election) is waited for, not reported.
#[tokio::test]
async fn a_briefly_unavailable_store_is_retried() {
    let (_dir, inner) = file_store();
    let store = Flaky::new(inner, 0, None);
    store.reads_unavailable.store(3, Ordering::SeqCst);
    let ipam = Ipam::new(&store);
    assert_eq!(alloc(&ipam, &single("192.0.2.0/24"), &owner(1)).await, ips(&["192.0.2.1"]));
    assert_eq!(store.reads_unavailable.load(Ordering::SeqCst), 0);
    // Past the window the error is returned.
    store.reads_unavailable.store(usize::MAX, Ordering::SeqCst);
    let started = std::time::Instant::now();
    let err =
        Ipam::new(&store).with_retry(briefly_patient()).allocate(&single("192.0.2.0/24"), &owner(2)).await;
    assert!(matches!(err, Err(IpamError::Store { source: StoreError::Unavailable(_), .. })), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(3));
}

/// A file store with a writer queue, a /24 configuration on it, and its pool's lock held by the test.
struct QueuedPool {
    dir: TempDir,
    queue: std::path::PathBuf,
    store: Arc<Flaky>,
    config: IpamConfig,
    name: String,
    lock_path: std::path::PathBuf,
    lock_file: std::fs::File,
}

fn queued_pool() -> QueuedPool {
    let (dir, inner) = file_store();
    let queue = dir.path().join("queue");
    let store = Arc::new(Flaky::new(inner, 0, None).with_queue(queue.clone()));
    let config = single("192.0.2.0/24");
    let name = pool_of(&config, 0);
    let lock_path = dir.path().join(format!("pools/{name}.lock"));
    let lock_file =
        std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&lock_path).unwrap();
    lock_file.lock().unwrap();
    QueuedPool { dir, queue, store, config, name, lock_path, lock_file }
}

/// ADDs that wait in a pool's writer queue are served by the writer at its head, in one write: with the
/// pool's lock held while 20 ADDs announce themselves, releasing it gives 20 distinct lowest addresses
/// for exactly one pool write.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn adds_waiting_in_the_writer_queue_are_served_in_one_write() {
    let QueuedPool { dir: _dir, queue, store, config, name, lock_file, .. } = queued_pool();
    let adds: Vec<_> = (0..20)
        .map(|i| {
            let (store, config) = (store.clone(), config.clone());
            tokio::spawn(async move {
                Ipam::new(&*store)
                    .with_retry(quick_retry(Duration::from_secs(30)))
                    .allocate(&config, &owner(i))
                    .await
                    .unwrap()
            })
        })
        .collect();
    // Announcements only (each also has a wake-up socket beside it).
    let announced = || {
        let entries = std::fs::read_dir(&queue).into_iter().flatten().flatten();
        entries.filter(|e| e.path().extension().is_some_and(|x| x == "json")).count()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while announced() < 20 {
        assert!(std::time::Instant::now() < deadline, "only {} ADDs announced themselves", announced());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    lock_file.unlock().unwrap();
    let mut got = HashSet::new();
    for add in adds {
        got.extend(just_ips(&add.await.unwrap()));
    }
    let expected: HashSet<IpAddr> = (1..=20).map(|i| ip(&format!("192.0.2.{i}"))).collect();
    assert_eq!(got, expected);
    assert_eq!(store.writes(), 1, "one write served every waiting ADD");
    assert_eq!(allocations(&*store, &name).await.len(), 20);
    assert_eq!(announced(), 0, "served announcements are removed");
    // The head made the served ADDs' reservations too: one call per address, all from the head's task.
    let callers = store.reservation_callers();
    assert_eq!(callers.len(), 20);
    assert!(callers.iter().all(|caller| caller.is_some() && *caller == callers[0]), "{callers:?}");
    let reserved: BTreeMap<String, Reservation> =
        store.list_reservations().await.unwrap().into_iter().map(|(name, r)| (name, r.holder)).collect();
    let held: BTreeMap<String, Reservation> = allocations(&*store, &name)
        .await
        .into_iter()
        .map(|(ip, allocation)| (reservation_name(&config.network_name, ip), allocation.reservation()))
        .collect();
    assert_eq!(reserved, held, "each address reserved for the ADD that holds it");
}

/// An ADD waiting in the writer queue that reaches its deadline after the head claimed it, while the
/// head is still writing an entry for it, fails and leaves nothing stored: it waits for the head to let
/// go of the queue, then releases the entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_waiter_giving_up_after_being_claimed_leaves_nothing_stored() {
    // The test is the head of the queue: it holds the pool's lock.
    let QueuedPool { dir: _dir, queue, store, config, name, lock_path, lock_file } = queued_pool();
    let budget = Duration::from_millis(500);
    let waiter = {
        let (store, config) = (store.clone(), config.clone());
        tokio::spawn(async move {
            Ipam::new(&*store).with_retry(quick_retry(budget)).allocate(&config, &owner(1)).await
        })
    };
    let announcement = loop {
        let found = std::fs::read_dir(&queue).into_iter().flatten().flatten().map(|e| e.path());
        if let Some(path) = found.into_iter().find(|p| p.extension().is_some_and(|e| e == "json")) {
            break path;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    // Claim it, as a head does, and store its entry, past the waiter's deadline.
    std::fs::remove_file(&announcement).unwrap();
    tokio::time::sleep(budget + Duration::from_millis(200)).await;
    let range: IpNet = "192.0.2.0/24".parse().unwrap();
    let mut pool = Pool::new(range);
    pool.insert(to_u128(ip("192.0.2.1")), owner(1).allocation());
    let held = PoolLock::new(lock_path.display().to_string(), ());
    store.inner.write_pool(&name, &pool.to_spec(), None, Some(&held)).await.unwrap();
    assert!(!waiter.is_finished(), "the waiter waits for the head to finish before it rolls back");
    assert_eq!(allocations(&*store, &name).await.len(), 1);
    lock_file.unlock().unwrap();
    let outcome = waiter.await.unwrap();
    assert!(
        matches!(outcome, Err(IpamError::Store { source: StoreError::Unavailable(_), .. })),
        "{outcome:?}"
    );
    assert!(allocations(&*store, &name).await.is_empty(), "nothing stored for the failed ADD");
}

/// The DEL of a served ADD killed after the head of the queue stored its entry, that reads the
/// reservation before the head has made it, waits for the head to let go of the queue and deletes the
/// reservation too: nothing blocks the address afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_del_that_finds_no_reservation_yet_waits_for_the_head_making_it() {
    // The test is the head of the queue: it holds the pool's lock and has stored the served entry.
    let QueuedPool { dir: _dir, store, config, name, lock_path, lock_file, .. } = queued_pool();
    let served = owner(1);
    let held = PoolLock::new(lock_path.display().to_string(), ());
    let mut pool = Pool::new("192.0.2.0/24".parse().unwrap());
    pool.insert(to_u128(ip("192.0.2.1")), served.allocation());
    store.inner.write_pool(&name, &pool.to_spec(), None, Some(&held)).await.unwrap();
    let del = {
        let (store, config, served) = (store.clone(), config.clone(), served.clone());
        tokio::spawn(async move {
            Ipam::new(&*store)
                .with_retry(quick_retry(Duration::from_secs(30)))
                .release(&config, &served.container_id, &served.ifname)
                .await
        })
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while store.reservation_reads.load(Ordering::SeqCst) == 0 {
        assert!(std::time::Instant::now() < deadline, "the DEL never read the reservation");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The head makes the reservation only now, then lets go of the queue.
    let key = reservation_name(&config.network_name, ip("192.0.2.1"));
    store.inner.create_reservation(&key, &served.allocation().reservation()).await.unwrap();
    lock_file.unlock().unwrap();
    assert_eq!(del.await.unwrap().unwrap(), ips(&["192.0.2.1"]));
    assert!(allocations(&*store, &name).await.is_empty());
    assert!(reservations(&*store).await.is_empty(), "the reservation the head made is released too");
}

/// On a cluster still serving upstream's CRDs the additive fields are pruned from what is stored: a
/// reservation found held in an overlapping range still removes our entry (matched on container, pod
/// and interface, not on the whole record) and the next address is taken, instead of retrying the same
/// one until the contention bound.
#[tokio::test]
async fn pruned_additive_fields_do_not_keep_a_rolled_back_entry() {
    let (_dir, inner) = file_store();
    let store = Flaky::new(inner, 0, None).pruning_additive_fields();
    let ipam = Ipam::new(&store).with_retry(quick_retry(Duration::from_secs(30)));
    let (wide, narrow) = (single("10.9.0.0/24"), single("10.9.0.0/25"));
    let first = owner_on(1, Some("node-a"), Some("net"));
    let second = owner_on(2, Some("node-a"), Some("net"));
    assert_eq!(alloc(&ipam, &wide, &first).await, ips(&["10.9.0.1"]));
    assert_eq!(alloc(&ipam, &narrow, &second).await, ips(&["10.9.0.2"]));
    let held: Vec<IpAddr> = allocations(&store, &pool_of(&narrow, 0)).await.into_keys().collect();
    assert_eq!(held, ips(&["10.9.0.2"]));
}

/// The controller's release is a compare-and-swap on the record as it read it: a pod's new sandbox that
/// took the address over in between keeps it, and so does its reservation.
#[tokio::test]
async fn a_found_allocation_taken_over_since_it_was_read_is_not_released() {
    use whereabouts_store::ipam::{FoundAllocation, JudgedReservation};
    let (_dir, store) = file_store();
    let ipam = Ipam::new(&store);
    let config = single("192.0.2.0/29");
    let target = config.ranges[0].pool.clone();
    let name = pool_of(&config, 0);
    alloc(&ipam, &config, &owner(1)).await;
    alloc(&ipam, &config, &owner(2)).await;
    let read = store.read_pool(&name).await.unwrap().unwrap().spec.allocations;
    let (first, second) = (read["1"].clone(), read["2"].clone());
    let reservation = reservation_name("", ip("192.0.2.1"));
    let version = store.read_reservation(&reservation).await.unwrap().unwrap().version;
    let judged = JudgedReservation { name: reservation.clone(), version };

    // The controller read the pool; then the pod of the first address got a new sandbox.
    let resandboxed = Owner { container_id: "c1-new".into(), ..owner(1) };
    assert_eq!(alloc(&ipam, &config, &resandboxed).await, ips(&["192.0.2.1"]));
    let stale = [
        FoundAllocation { ip: ip("192.0.2.1"), allocation: &first, reservations: vec![judged] },
        FoundAllocation { ip: ip("192.0.2.2"), allocation: &second, reservations: Vec::new() },
    ];
    assert_eq!(ipam.release_found(&target, &stale).await.unwrap(), ips(&["192.0.2.2"]));
    let after = store.read_pool(&name).await.unwrap().unwrap().spec.allocations;
    assert_eq!(after.len(), 1);
    assert_eq!(after["1"].container_id, "c1-new");
    assert!(
        store.read_reservation(&reservation).await.unwrap().is_some(),
        "the new sandbox's reservation stays"
    );
}

/// The reservation upstream's plugin writes records no container, and upstream takes a pod's entry
/// over for a new sandbox by rewriting only its `id`. The controller's release of the entry as it read
/// it before then fails its compare-and-swap, and must leave the reservation to the entry's new holder.
#[tokio::test]
async fn a_found_allocation_rewritten_by_upstream_keeps_its_reservation() {
    use whereabouts_store::ipam::{FoundAllocation, JudgedReservation};
    let (_dir, store) = file_store();
    let ipam = Ipam::new(&store);
    let config = single("192.0.2.0/29");
    let target = config.ranges[0].pool.clone();
    let network = config.ranges[0].range.network();
    let name = pool_of(&config, 0);
    let old_sandbox = owner(1);
    write_state(&store, &name, network, &[("192.0.2.1", &old_sandbox)]).await;
    let upstreams = Reservation { container_id: String::new(), ..reservation(&old_sandbox) };
    assert_eq!(store.create_reservation("192.0.2.1", &upstreams).await.unwrap(), ReserveOutcome::Reserved);
    let judged = JudgedReservation {
        name: "192.0.2.1".into(),
        version: store.read_reservation("192.0.2.1").await.unwrap().unwrap().version,
    };
    // Read by the controller; then upstream's ADD of the pod's new sandbox rewrites the entry's `id`.
    let as_read = old_sandbox.allocation();
    let new_sandbox = Owner { container_id: "c1-new".into(), ..old_sandbox };
    write_state(&store, &name, network, &[("192.0.2.1", &new_sandbox)]).await;

    let found = [FoundAllocation { ip: ip("192.0.2.1"), allocation: &as_read, reservations: vec![judged] }];
    assert!(ipam.release_found(&target, &found).await.unwrap().is_empty());
    assert_eq!(allocations(&store, &name).await[&ip("192.0.2.1")].container_id, "c1-new");
    assert_eq!(reservations(&store).await, BTreeMap::from([("192.0.2.1".to_string(), upstreams)]));
}

/// The same for a DEL: the old sandbox's DEL reads the pool, upstream's ADD of the new sandbox then
/// rewrites the entry's `id`; the DEL's compare-and-swap fails, and the reservation stays.
#[tokio::test]
async fn a_del_whose_entry_upstream_rewrote_meanwhile_keeps_the_reservation() {
    let (_dir, inner) = file_store();
    let config = single("192.0.2.0/29");
    let network = config.ranges[0].range.network();
    let name = pool_of(&config, 0);
    let old_sandbox = owner(1);
    write_state(&inner, &name, network, &[("192.0.2.1", &old_sandbox)]).await;
    let upstreams = Reservation { container_id: String::new(), ..reservation(&old_sandbox) };
    assert_eq!(inner.create_reservation("192.0.2.1", &upstreams).await.unwrap(), ReserveOutcome::Reserved);
    let new_sandbox = Owner { container_id: "c1-new".into(), ..old_sandbox.clone() };
    let mut rewritten = Pool::new(network);
    rewritten.insert(to_u128(ip("192.0.2.1")), new_sandbox.allocation());
    let store = Flaky::new(inner, 0, None).writing_after_next_read(rewritten.to_spec());

    let ipam = Ipam::new(&store);
    assert!(ipam.release(&config, &old_sandbox.container_id, "eth0").await.unwrap().is_empty());
    assert_eq!(allocations(&store, &name).await[&ip("192.0.2.1")].container_id, "c1-new");
    assert_eq!(reservations(&store).await, BTreeMap::from([("192.0.2.1".to_string(), upstreams)]));
}

/// Our reservation records the container that made it; upstream's plugin then takes the entry over for
/// the pod's new sandbox by rewriting only the entry's `id`. The new sandbox's DEL removes that entry,
/// and with it the reservation the entry stood behind, whatever container the reservation records.
#[tokio::test]
async fn a_del_releases_the_reservation_behind_an_entry_upstream_took_over() {
    let (_dir, store) = file_store();
    let ipam = Ipam::new(&store);
    let config = single("192.0.2.0/29");
    let network = config.ranges[0].range.network();
    let name = pool_of(&config, 0);
    let ours = owner(1);
    assert_eq!(alloc(&ipam, &config, &ours).await, ips(&["192.0.2.1"]));
    assert_eq!(reservations(&store).await, reserved_by(&[("192.0.2.1", &ours)]));
    let upstreams_sandbox = Owner { container_id: "c1-upstream".into(), ..ours };
    write_state(&store, &name, network, &[("192.0.2.1", &upstreams_sandbox)]).await;

    assert_eq!(ipam.release(&config, "c1-upstream", "eth0").await.unwrap(), ips(&["192.0.2.1"]));
    assert!(allocations(&store, &name).await.is_empty());
    assert!(reservations(&store).await.is_empty(), "the reservation leaked");
}

// === release cooldown ===

#[tokio::test]
async fn a_released_address_cools_down_in_the_pool_file_while_others_are_free() {
    let (dir, store) = file_store();
    let ipam = Ipam::new(&store);
    let config = cfg(json!({ "range": "10.9.0.0/29", "release_cooldown": "1h" }));
    let name = pool_of(&config, 0);
    assert_eq!(alloc(&ipam, &config, &owner(1)).await, ips(&["10.9.0.1"]));
    assert_eq!(ipam.release(&config, "c1", "eth0").await.unwrap(), ips(&["10.9.0.1"]));
    // The release time is in the pool file, beside upstream's spec, not among the allocations.
    let stored = store.read_pool(&name).await.unwrap().unwrap();
    assert!(stored.spec.allocations.is_empty());
    let until = stored.spec.cooldowns["1"];
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    assert!((now + 3599..=now + 3601).contains(&until), "{until} is an hour after {now}");
    let file: Value = serde_json::from_slice(
        &std::fs::read(dir.path().join("pools").join(format!("{name}.json"))).unwrap(),
    )
    .unwrap();
    assert_eq!(file["cooldowns"]["1"], json!(until));
    // Another pod (and the same pod again) gets the next address, until only the cooling one is left.
    assert_eq!(alloc(&ipam, &config, &owner(2)).await, ips(&["10.9.0.2"]));
    assert_eq!(alloc(&ipam, &config, &owner(1)).await, ips(&["10.9.0.3"]));
    for n in 3..=5 {
        alloc(&ipam, &config, &owner(n)).await;
    }
    assert_eq!(alloc(&ipam, &config, &owner(6)).await, ips(&["10.9.0.1"]), "the only free one");
    assert!(store.read_pool(&name).await.unwrap().unwrap().spec.cooldowns.is_empty());
}

#[tokio::test]
async fn an_ended_cooldown_is_pruned_by_the_next_write_and_without_one_nothing_cools() {
    let (_dir, store) = file_store();
    let ipam = Ipam::new(&store);
    let network: IpNet = "10.9.1.0/24".parse().unwrap();
    let name = pool_name("", None, &network);
    // Cooldowns that ended long ago (.1) and that end in an hour (.2), as an earlier release left them.
    let mut pool = Pool::new(network);
    pool.cool(to_u128(ip("10.9.1.1")), 1);
    pool.cool(to_u128(ip("10.9.1.2")), u64::MAX);
    store.write_pool(&name, &pool.to_spec(), None, None).await.unwrap();
    let plain = single("10.9.1.0/24");
    assert_eq!(alloc(&ipam, &plain, &owner(1)).await, ips(&["10.9.1.1"]), "an ended cooldown is no cooldown");
    let stored = store.read_pool(&name).await.unwrap().unwrap();
    assert_eq!(stored.spec.cooldowns, BTreeMap::from([("2".to_string(), u64::MAX)]));
    assert_eq!(alloc(&ipam, &plain, &owner(2)).await, ips(&["10.9.1.3"]), "a cooldown binds every network");
    // A network without release_cooldown releases without one.
    ipam.release(&plain, "c1", "eth0").await.unwrap();
    let stored = store.read_pool(&name).await.unwrap().unwrap();
    assert_eq!(stored.spec.cooldowns.keys().collect::<Vec<_>>(), ["2"]);
}

// === persistent addresses ===

/// DEL holds a persistent entry (a StatefulSet's pod's on a sticky network, an IPAMClaim's) for the
/// next sandbox, which gets it back; GC of the node it was on leaves it alone; a plain entry is
/// released as ever.
#[tokio::test]
async fn del_holds_persistent_entries_for_the_next_sandbox_and_gc_leaves_them() {
    let (_dir, store) = file_store();
    let ipam = Ipam::new(&store);
    let config = cfg(json!({ "range": "10.9.2.0/24", "sticky_statefulsets": true }));
    let name = pool_of(&config, 0);
    let web = Owner { statefulset: Some("web".into()), ..owner_on(1, Some("node-a"), Some("net")) };
    let vm = Owner { ipam_claim: Some("vm1.net".into()), ..owner_on(2, Some("node-a"), Some("net")) };
    let plain = owner_on(3, Some("node-a"), Some("net"));
    for o in [&web, &vm, &plain] {
        alloc(&ipam, &config, o).await;
    }
    for o in [&web, &vm, &plain] {
        ipam.release(&config, &o.container_id, &o.ifname).await.unwrap();
    }
    let stored = allocations(&store, &name).await;
    assert_eq!(stored.keys().copied().collect::<Vec<_>>(), ips(&["10.9.2.1", "10.9.2.2"]));
    assert!(stored.values().all(|a| a.is_held() && a.node.is_none()), "{stored:?}");
    // GC of node-a with nothing valid: the held entries are no sandbox's of node-a.
    assert_eq!(
        ipam.collect_garbage(&config, "node-a", "net", &HashSet::new()).await.unwrap(),
        Vec::<IpAddr>::new()
    );
    // The next sandboxes, on another node: the same addresses.
    let web_again = Owner { container_id: "c1-b".into(), node: Some("node-b".into()), ..web.clone() };
    assert_eq!(alloc(&ipam, &config, &web_again).await, ips(&["10.9.2.1"]));
    // Another pod of the same claim (a migration's target pod): the claim's address.
    let vm_target =
        Owner { pod_ref: Some("ns/launcher-b".into()), container_id: "c2-b".into(), ..vm.clone() };
    assert_eq!(alloc(&ipam, &config, &vm_target).await, ips(&["10.9.2.2"]));
    // Its reservation is the claim's, taken over by the new pod's sandbox.
    let reserved = reservations(&store).await;
    assert_eq!(reserved["10.9.2.2"].pod_ref, "ns/ipamclaim:vm1.net");
    assert_eq!(reserved["10.9.2.2"].container_id, "c2-b");
    // Without sticky_statefulsets, a StatefulSet's pod's entry is released; a claim's is still held.
    let plain_config = single("10.9.2.0/24");
    ipam.release(&plain_config, "c1-b", "eth0").await.unwrap();
    ipam.release(&plain_config, "c2-b", "eth0").await.unwrap();
    assert_eq!(allocations(&store, &name).await.keys().copied().collect::<Vec<_>>(), ips(&["10.9.2.2"]));
}
