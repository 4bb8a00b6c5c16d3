//! An upstream-shaped writer: upstream whereabouts' Kubernetes storage path, emulated closely enough
//! that it can stand in for upstream plugins in tests (a rolling upgrade where some nodes still run
//! upstream while others run ours) and serve as a benchmark baseline.
//!
//! Emulated, from upstream's code and `shared/upstream-behaviour.md` §3.1–3.8:
//! * the cluster-wide Lease held around every update, with client-go's leader-election semantics
//!   ([`LeaseLock`]); ADD waits for it at most 2 minutes, DEL 1 minute;
//! * the update of one range: a LIST of the pools, get-or-create of the pool named as upstream names it,
//!   offsets decoded as upstream decodes them ([`decode_pool`]), upstream's allocator (lowest free
//!   address, idempotent on pod and interface), the overlapping-range reservation check with its
//!   in-memory "dummy" records, a JSON Patch that tests the resourceVersion and the absence of every
//!   added key ([`pool_update_patch`]), 100 attempts without pause on a failed test, then the
//!   reservation CREATE (ADD) or its DELETE without an owner check (DEL);
//! * allocations carry only `id`, `podref` and `ifname`; reservations only `podref` and `ifname`.
//!
//! Not emulated: configuration loading (the flat file, Go's case-insensitive keys, `ipRanges`, the
//! `a-b/p` range syntax), node slices, `sleep_for_race`. Two of upstream's bugs are fixed because
//! emulating them would make the harness itself hand out duplicates: see the comments in
//! `storage::update_range` (an update that never wrote the pool fails instead of going on to the
//! reservation step and answering success).

mod assign;
mod goip;
mod lease;
mod storage;

use std::net::IpAddr;
use std::time::Duration;

use ipnet::IpNet;
use kube::Client;
use thiserror::Error;
use tokio::time::Instant;
use whereabouts_core::pool::PoolSpec;

pub use lease::{LEASE_NAME, Leadership, LeaseLock, LeaseTiming};
pub use storage::pool_update_patch;

/// The part of an upstream IPAM configuration the storage path uses, for one range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamConfig {
    /// The range, as its canonical network (upstream normalises `range` to it before anything else).
    pub range: IpNet,
    /// `range_start`: applies only inside the usable interval.
    pub range_start: Option<IpAddr>,
    /// `range_end`: applies only between the effective start and the last usable address.
    pub range_end: Option<IpAddr>,
    /// `exclude`: CIDRs or bare IPs, parsed at every allocation (an invalid one fails it).
    pub exclude: Vec<String>,
    /// `network_name`: prefixes pool and reservation names.
    pub network_name: String,
    /// `enable_overlapping_ranges` (upstream's default: true).
    pub enable_overlapping_ranges: bool,
    /// The leader-election durations.
    pub lease: LeaseTiming,
}

impl UpstreamConfig {
    /// A configuration of `range` with upstream's defaults for everything else.
    pub fn new(range: IpNet) -> Self {
        UpstreamConfig {
            range: range.trunc(),
            range_start: None,
            range_end: None,
            exclude: Vec::new(),
            network_name: String::new(),
            enable_overlapping_ranges: true,
            lease: LeaseTiming::default(),
        }
    }
}

/// Who a CNI call is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallContext {
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_IFNAME`.
    pub ifname: String,
    /// `K8S_POD_NAMESPACE`.
    pub pod_namespace: String,
    /// `K8S_POD_NAME`; a call without one fails before anything is read.
    pub pod_name: String,
}

impl CallContext {
    /// `<namespace>/<pod>`: the allocation's `podref`, and the Lease identity.
    pub fn pod_ref(&self) -> String {
        format!("{}/{}", self.pod_namespace, self.pod_name)
    }
}

/// Why an upstream-shaped call failed. The texts are upstream's where upstream has one.
#[derive(Debug, Error)]
pub enum UpstreamError {
    /// The call has no pod name.
    #[error("IPAM client initialization error: no pod name")]
    NoPodName,
    /// The Lease was not obtained within the command's time limit.
    #[error("time limit exceeded while waiting to become leader")]
    LeaderTimeout,
    /// The 10 s budget of the update's API calls ran out.
    #[error("context deadline exceeded")]
    RequestBudget,
    /// An API call failed (the LIST, a PATCH other than a failed test, a reservation write).
    #[error("{0}")]
    Api(#[source] kube::Error),
    /// Reading the pool failed.
    #[error("k8s get error: {0}")]
    PoolGet(#[source] kube::Error),
    /// Creating the pool failed.
    #[error("k8s create error: {0}")]
    PoolCreate(#[source] kube::Error),
    /// Reading an overlapping-range reservation failed.
    #[error("k8s get OverlappingRangeIPReservation error: {0}")]
    ReservationGet(#[source] kube::Error),
    /// The stored pool cannot be decoded or written back (its range, an offset).
    #[error("{0}")]
    Pool(String),
    /// No address could be picked (range exhausted, bad `exclude`, subnet too small).
    #[error("{0}")]
    Assign(String),
    /// Every attempt lost a race (or the deadline passed) before the pool was written.
    #[error("no pool update succeeded: {last}")]
    GaveUp {
        /// Why the last attempt was retried.
        last: String,
    },
}

/// ADD or DEL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Allocate,
    Deallocate,
}

impl Mode {
    /// The command's overall deadline, the wait for the Lease included (`AddTimeLimit`/`DelTimeLimit`).
    fn time_limit(self) -> Duration {
        match self {
            Mode::Allocate => Duration::from_secs(120),
            Mode::Deallocate => Duration::from_secs(60),
        }
    }
}

/// One allocation as upstream reads it from a pool.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct UpstreamReservation {
    /// The address.
    pub ip: IpAddr,
    /// `id`.
    pub container_id: String,
    /// `podref`.
    pub pod_ref: String,
    /// `ifname` (empty when absent).
    pub ifname: String,
}

/// The allocations of a stored pool as upstream decodes them: keys parsed as signed 64-bit decimals
/// (others skipped), added as unsigned offsets to the IP written in `spec.range`. Entries upstream
/// decodes to a nil IP (IPv4 offsets ≥ 2^32 − 1, after which its every write of the pool fails) are
/// left out. Fails when `spec.range` is not a CIDR.
pub fn decode_pool(spec: &PoolSpec) -> Result<Vec<UpstreamReservation>, UpstreamError> {
    Ok(storage::decode(spec)?
        .reservations
        .into_iter()
        .map(|r| UpstreamReservation {
            ip: goip::to_std(r.ip),
            container_id: r.container_id,
            pod_ref: r.pod_ref,
            ifname: r.ifname,
        })
        .collect())
}

/// An upstream ADD (`IPManagement(Allocate)`) in `namespace`: the address allocated (or already held
/// by this pod and interface).
pub async fn add(
    client: &Client,
    namespace: &str,
    config: &UpstreamConfig,
    call: &CallContext,
) -> Result<IpAddr, UpstreamError> {
    let ip = ip_management(client, namespace, config, call, Mode::Allocate).await?;
    Ok(goip::to_std(ip.expect("an allocating update answers its address")))
}

/// An upstream DEL (`IPManagement(Deallocate)`): the address released, `None` when this container
/// and interface held none. (The upstream plugin reports success whatever this returns.)
pub async fn del(
    client: &Client,
    namespace: &str,
    config: &UpstreamConfig,
    call: &CallContext,
) -> Result<Option<IpAddr>, UpstreamError> {
    Ok(ip_management(client, namespace, config, call, Mode::Deallocate).await?.map(goip::to_std))
}

/// `IPManagement`: the update, run while the Lease is held.
async fn ip_management(
    client: &Client,
    namespace: &str,
    config: &UpstreamConfig,
    call: &CallContext,
    mode: Mode,
) -> Result<Option<u128>, UpstreamError> {
    if call.pod_name.is_empty() {
        return Err(UpstreamError::NoPodName);
    }
    let deadline = Instant::now() + mode.time_limit();
    let lock = LeaseLock::new(client.clone(), namespace, call.pod_ref(), config.lease);
    let leadership = lock.acquire(deadline).await?;
    let result = storage::update(client, namespace, config, call, mode, deadline).await;
    leadership.release().await;
    result
}
