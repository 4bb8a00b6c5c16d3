//! Carrying out the releases the controller decided: grouped by pool, one compare-and-swap write per
//! pool (then the reservations of each address released), pools in parallel; in a dry run, only
//! logged.

use std::collections::BTreeMap;
use std::net::IpAddr;

use futures::StreamExt;
use whereabouts_core::config::PoolTarget;
use whereabouts_store::Store;
use whereabouts_store::ipam::{FoundAllocation, Ipam, IpamError, JudgedReservation};
use whereabouts_store::kubernetes::KubeStore;

use crate::Context;
use crate::cleanup::COMPONENT;
use crate::metrics::ReleaseReason;
use crate::pools::Found;

/// Pools written at once.
const PARALLEL: usize = 8;

/// One release decided.
#[derive(Debug, Clone)]
pub struct Release<T> {
    /// The allocation, as read.
    pub found: Found,
    /// Why it goes.
    pub reason: ReleaseReason,
    /// The reservations of its address its holder had, as read.
    pub reservations: Vec<JudgedReservation>,
    /// The caller's tag (which pod it was for, say).
    pub tag: T,
}

/// Releases grouped by pool.
#[derive(Debug)]
pub struct Plan<T> {
    by_pool: BTreeMap<String, (PoolTarget, Vec<Release<T>>)>,
}

impl<T> Default for Plan<T> {
    fn default() -> Self {
        Plan { by_pool: BTreeMap::new() }
    }
}

/// How one pool's releases went: the addresses released (in a dry run, all of them).
pub type Outcome<'p, T> = (&'p [Release<T>], Result<Vec<IpAddr>, IpamError>);

impl<T: Sync> Plan<T> {
    /// Adds a release.
    pub fn add(&mut self, release: Release<T>) {
        let pool = release.found.pool.clone();
        self.by_pool.entry(pool.name.clone()).or_insert_with(|| (pool, Vec::new())).1.push(release);
    }

    /// The releases of each pool, pools in name order.
    pub fn batches(&self) -> impl ExactSizeIterator<Item = (&PoolTarget, &[Release<T>])> {
        self.by_pool.values().map(|(target, batch)| (target, batch.as_slice()))
    }

    /// Whether nothing is to be released.
    pub fn is_empty(&self) -> bool {
        self.by_pool.is_empty()
    }

    /// Carries the plan out (in a dry run, logs it), each pool's outcome apart.
    pub async fn execute(&self, ctx: &Context) -> Vec<Outcome<'_, T>> {
        let store = KubeStore::new(ctx.client.clone(), &ctx.namespace, COMPONENT);
        let observe = |event| ctx.metrics.observe_engine(event);
        let ipam = Ipam::new(&store).with_observer(&observe);
        futures::stream::iter(self.by_pool.values().map(|(target, batch)| {
            let ipam = &ipam;
            async move { (batch.as_slice(), release(ctx, ipam, target, batch).await) }
        }))
        .buffer_unordered(PARALLEL)
        .collect()
        .await
    }
}

async fn release<T>(
    ctx: &Context,
    ipam: &Ipam<'_, KubeStore>,
    target: &PoolTarget,
    batch: &[Release<T>],
) -> Result<Vec<IpAddr>, IpamError> {
    let verb = if ctx.dry_run { "dry run: would release" } else { "releasing" };
    for r in batch {
        let holder = &r.found.allocation.pod_ref;
        tracing::info!(
            "{verb} {} in pool {} held by {holder} ({})",
            r.found.ip,
            target.name,
            r.reason.as_str()
        );
    }
    if ctx.dry_run {
        return Ok(batch.iter().map(|r| r.found.ip).collect());
    }
    release_batch(ipam, target, batch).await
}

/// Releases one pool's batch through any store: one compare-and-swap write of the pool removing the
/// allocations still exactly as read, then the reservations of the removed ones still as read (see
/// [`Ipam::release_found`]). Returns the addresses released.
pub async fn release_batch<S: Store, T>(
    ipam: &Ipam<'_, S>,
    target: &PoolTarget,
    batch: &[Release<T>],
) -> Result<Vec<IpAddr>, IpamError> {
    let found: Vec<FoundAllocation<'_>> = batch
        .iter()
        .map(|r| FoundAllocation {
            ip: r.found.ip,
            allocation: &r.found.allocation,
            reservations: r.reservations.clone(),
        })
        .collect();
    ipam.release_found(target, &found).await
}
