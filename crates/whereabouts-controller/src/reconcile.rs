//! One reconciliation (upstream's ip-reconciler): releases every allocation whose pod is gone, has
//! finished, or was replaced, and every reservation no pool entry stands behind.
//!
//! Order of reads, each a consistent LIST: reservations, then pools, then pods. An ADD writes its pool
//! entry before its reservation, so a reservation listed first has its pool entry in the later pool
//! listing unless it was released in between (and then the reservation is one to delete: a release
//! removes the pool entry first); and a pool entry listed before the pods has its pod in the pod
//! listing if the pod exists (upstream commit 47e5b17d fixed duplicate addresses by listing pools
//! before pods). What the listings say is then judged ([`judge`](crate::judge)) and released with
//! compare-and-swaps on the records as read: pool entries still exactly as listed, and reservations
//! deleted with the uid and resourceVersion they were listed with (a reservation taken over since, by
//! a recreated pod, say, is left alone), so a change since the listings is never overwritten.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ApiResource, DynamicObject, ListParams};
use serde::de::DeserializeOwned;
use whereabouts_k8s::crd::{IPPool, OverlappingRangeIPReservation};
use whereabouts_store::ipam::{Ipam, JudgedReservation};
use whereabouts_store::kubernetes::{KubeStore, versioned};
use whereabouts_store::{Deletion, VersionedReservation};

use crate::Context;
use crate::cleanup::{COMPONENT, pod_view};
use crate::judge::{PodView, Verdict, judge};
use crate::metrics::{ReleaseReason, RunLabels, RunResult, Source};
use crate::pools::{Found, allocations, decode, holder, names_address, reservations_of};
use crate::release::{Plan, Release};

/// Why a reconciliation failed. The next scheduled run tries again.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// A listing failed.
    #[error("listing {what}: {source}")]
    List {
        /// What was listed.
        what: &'static str,
        /// Why.
        source: kube::Error,
    },
    /// Some releases failed (the others went through).
    #[error("could not release everything: {}", .0.join("; "))]
    Release(Vec<String>),
}

/// One address released (or, in a dry run, to be released).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Released {
    /// The address.
    pub ip: IpAddr,
    /// Its pool.
    pub pool: String,
    /// The pod it was held for.
    pub pod_ref: String,
    /// Why.
    pub reason: ReleaseReason,
}

/// What a reconciliation did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Allocations released.
    pub released: Vec<Released>,
    /// Orphaned reservations deleted (those that changed since they were listed are left alone).
    pub orphan_reservations: Vec<String>,
    /// Pools that could not be read (their allocations were left alone, and orphaned reservations were
    /// not collected: their pool entries might be in them).
    pub unreadable_pools: Vec<String>,
}

/// What the listings say is to be released: the whole decision of a reconciliation, without I/O, so
/// that `whereabouts leaks` decides exactly as the controller does.
#[derive(Debug, Default)]
pub struct Leaks {
    /// The allocations whose pod is gone ([`judge`]), with their holders' reservations, by pool.
    pub plan: Plan<()>,
    /// Reservations no pool entry of the same holder stands behind, as listed.
    pub orphans: Vec<Orphan>,
}

/// A reservation no pool entry of its holder stands behind, as it was listed.
#[derive(Debug, Clone)]
pub struct Orphan {
    /// Its name.
    pub name: String,
    /// As listed.
    pub listed: VersionedReservation,
}

impl Orphan {
    /// What deleting it presents: it goes only if it is still as listed (a recreated pod may have
    /// taken it over since).
    pub fn judged(&self) -> JudgedReservation {
        JudgedReservation { name: self.name.clone(), version: self.listed.version.clone() }
    }
}

/// The reservations, among `reservations`, that no allocation `found` of the same holder (pod and
/// interface; the container outside Kubernetes) stands behind at their address. Only meaningful when
/// every pool was read: an unreadable pool may hold their entries. The reservations must have been
/// listed before the pools: an ADD writes its pool entry first.
pub fn orphans(found: &[Found], reservations: &BTreeMap<String, VersionedReservation>) -> Vec<Orphan> {
    reservations
        .iter()
        .filter(|(name, listed)| {
            !found
                .iter()
                .any(|f| names_address(name, f.ip) && holder(&f.allocation).same_owner(&listed.holder))
        })
        .map(|(name, listed)| Orphan { name: name.clone(), listed: listed.clone() })
        .collect()
}

/// Judges every allocation `found` in the pools against the pod now under its name in `pods` (by
/// `namespace/name`), and finds the reservations no allocation stands behind. Orphaned reservations
/// are only collected when `all_pools_read`: an unreadable pool may hold their entries. The listings
/// must have been made in this order: reservations, pools, pods (see the module).
pub fn leaks(
    found: &[Found],
    reservations: &BTreeMap<String, VersionedReservation>,
    pods: &HashMap<String, PodView>,
    all_pools_read: bool,
) -> Leaks {
    let mut plan = Plan::default();
    for entry in found {
        if let Verdict::Release(reason) =
            judge(&entry.allocation, entry.ip, pods.get(&entry.allocation.pod_ref))
        {
            let reservations = reservations_of(entry, reservations.iter());
            plan.add(Release { found: entry.clone(), reason, reservations, tag: () });
        }
    }
    let orphans = if all_pools_read { orphans(found, reservations) } else { Vec::new() };
    Leaks { plan, orphans }
}

/// What the controller knows of each listed pod, by `namespace/name`.
pub fn pod_views(pods: &[Pod]) -> HashMap<String, PodView> {
    pods.iter()
        .filter_map(|pod| {
            let pod_ref = format!("{}/{}", pod.metadata.namespace.as_deref()?, pod.metadata.name.as_deref()?);
            Some((pod_ref, pod_view(pod)))
        })
        .collect()
}

/// Runs one reconciliation of `ctx.namespace`'s pools against the pods of every namespace, counting it
/// in the metrics.
pub async fn reconcile_once(ctx: &Context) -> Result<Report, ReconcileError> {
    let outcome = reconcile(ctx).await;
    let result = if outcome.is_ok() { RunResult::Success } else { RunResult::Error };
    ctx.metrics.reconciler_runs.get_or_create(&RunLabels { result }).inc();
    if outcome.is_ok() {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        ctx.metrics.reconciler_last_success.set(now.as_secs_f64());
    }
    outcome
}

async fn reconcile(ctx: &Context) -> Result<Report, ReconcileError> {
    let reservations: BTreeMap<String, VersionedReservation> =
        list::<OverlappingRangeIPReservation>(ctx, "reservations")
            .await?
            .0
            .iter()
            .map(|(name, orip)| (name.clone(), versioned(orip)))
            .collect();
    let (pools, undecodable) = list::<IPPool>(ctx, "IPPools").await?;
    // Reservations whose entries an unreadable pool holds would look orphaned: see `unreadable_pools`.
    let mut report = Report { unreadable_pools: undecodable, ..Report::default() };
    let mut found: Vec<Found> = Vec::new();
    for (name, pool) in pools {
        match allocations(&pool) {
            Ok(pool_allocations) => found.extend(pool_allocations),
            Err(e) => {
                tracing::warn!("{e}; left alone");
                report.unreadable_pools.push(name);
            }
        }
    }
    let pods = pod_views(
        &Api::<Pod>::all(ctx.client.clone())
            .list(&ListParams::default())
            .await
            .map_err(|source| ReconcileError::List { what: "pods", source })?
            .items,
    );
    let Leaks { plan, orphans } = leaks(&found, &reservations, &pods, report.unreadable_pools.is_empty());

    let mut errors = Vec::new();
    for (batch, result) in plan.execute(ctx).await {
        match result {
            Ok(ips) => {
                for r in batch.iter().filter(|r| ips.contains(&r.found.ip)) {
                    if !ctx.dry_run {
                        ctx.metrics.released(Source::Reconciler, r.reason);
                    }
                    report.released.push(Released {
                        ip: r.found.ip,
                        pool: r.found.pool.name.clone(),
                        pod_ref: r.found.allocation.pod_ref.clone(),
                        reason: r.reason,
                    });
                }
            }
            Err(e) => errors.push(e.to_string()),
        }
    }
    let store = KubeStore::new(ctx.client.clone(), &ctx.namespace, COMPONENT);
    let observe = |event| ctx.metrics.observe_engine(event);
    let ipam = Ipam::new(&store).with_observer(&observe);
    for orphan in &orphans {
        let (name, pod_ref) = (&orphan.name, &orphan.listed.holder.pod_ref);
        let verb = if ctx.dry_run { "dry run: would delete" } else { "deleting" };
        tracing::info!("{verb} orphaned reservation {name} of {pod_ref} (no pool entry holds it)");
        if !ctx.dry_run {
            match ipam.release_reservation(&orphan.judged()).await {
                Ok(Deletion::Deleted) => {}
                Ok(Deletion::Changed) => {
                    tracing::info!("reservation {name} changed since it was listed; left alone");
                    continue;
                }
                Err(e) => {
                    errors.push(e.to_string());
                    continue;
                }
            }
            ctx.metrics.released(Source::Reconciler, ReleaseReason::OrphanReservation);
        }
        report.orphan_reservations.push(name.clone());
    }
    report.released.sort_by(|a, b| (&a.pool, a.ip).cmp(&(&b.pool, b.ip)));
    if errors.is_empty() { Ok(report) } else { Err(ReconcileError::Release(errors)) }
}

/// Every object of a kind in `ctx.namespace`, decoded one by one: one that does not decode is left out
/// (with a warning, and its name in the second list) rather than failing the listing.
async fn list<K: DeserializeOwned + kube::Resource<DynamicType = ()>>(
    ctx: &Context,
    what: &'static str,
) -> Result<(Vec<(String, K)>, Vec<String>), ReconcileError> {
    let api: Api<DynamicObject> =
        Api::namespaced_with(ctx.client.clone(), &ctx.namespace, &ApiResource::erase::<K>(&()));
    let listed =
        api.list(&ListParams::default()).await.map_err(|source| ReconcileError::List { what, source })?;
    let (mut decoded, mut undecodable) = (Vec::new(), Vec::new());
    for object in listed.items {
        let name = object.metadata.name.clone().unwrap_or_default();
        match decode(what, object) {
            Some(typed) => decoded.push(typed),
            None => undecodable.push(name),
        }
    }
    Ok((decoded, undecodable))
}
