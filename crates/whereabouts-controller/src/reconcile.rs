//! One reconciliation (upstream's ip-reconciler): releases every allocation whose pod is gone, has
//! finished, or was replaced, and every reservation no pool entry stands behind; and gives the
//! allocations of running pods whose reservation is missing their reservation again.
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
//!
//! A missing reservation is made again as the plugin makes it (`[network_name-]<ip>`, with
//! `enable_overlapping_ranges` semantics: the controller does not know a network's setting, and a
//! reservation made for a network without them is harmless, deleted as orphaned after its DEL), only
//! for an allocation whose pod is running and holds it (its recorded uid, or its network-status lists
//! the address), and as an ADD makes it: one that another attachment made meanwhile is left as it is.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetSpec};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::ResourceExt;
use kube::api::{Api, DynamicObject, ListParams};
use serde::de::DeserializeOwned;
use whereabouts_k8s::crd::ipam_claim_resource;
use whereabouts_k8s::crd::{IPPool, OverlappingRangeIPReservation};
use whereabouts_store::ipam::{Ipam, JudgedReservation};
use whereabouts_store::kubernetes::{KubeStore, versioned};
use whereabouts_store::{Deletion, Reservation, ReserveOutcome, VersionedReservation};

use crate::Context;
use crate::cleanup::{COMPONENT, pod_view};
use crate::judge::{KeepReason, Persistence, PodView, Verdict, WantedOrdinals, judge};
use crate::metrics::{ReleaseReason, RunLabels, RunResult, Source};
use crate::pools::{Found, allocations, list_decoded, names_address, reservation_name_for, reservations_of};
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
    /// Missing reservations made again.
    pub restored_reservations: Vec<String>,
    /// Pools that could not be read (their allocations were left alone, and orphaned reservations were
    /// not collected: their pool entries might be in them).
    pub unreadable_pools: Vec<String>,
}

/// What a reconciliation reads, in the order it reads it (see the module).
#[derive(Debug, Clone, Default)]
pub struct Listings {
    /// Every reservation, by name, as listed.
    pub reservations: BTreeMap<String, VersionedReservation>,
    /// Every allocation in the pools that could be read.
    pub found: Vec<Found>,
    /// The pools that could not be read.
    pub unreadable_pools: Vec<String>,
    /// What is known of each pod, by `namespace/name`.
    pub pods: HashMap<String, PodView>,
    /// The Nodes that exist (a missing static pod keeps its addresses while its node does).
    pub nodes: BTreeSet<String>,
    /// The StatefulSets and IPAMClaims, for persistent allocations (listed after the pods).
    pub persistence: Persistence,
}

impl Listings {
    /// Lists `ctx.namespace`'s reservations, then its pools, then the pods of every namespace.
    pub async fn read(ctx: &Context) -> Result<Listings, ReconcileError> {
        let reservations = list::<OverlappingRangeIPReservation>(ctx, "reservations")
            .await?
            .0
            .iter()
            .map(|(name, orip)| (name.clone(), versioned(orip)))
            .collect();
        let (pools, mut unreadable_pools) = list::<IPPool>(ctx, "IPPools").await?;
        let mut found = Vec::new();
        for (name, pool) in pools {
            match allocations(&pool) {
                Ok(pool_allocations) => found.extend(pool_allocations),
                Err(e) => {
                    tracing::warn!("{e}; left alone");
                    unreadable_pools.push(name);
                }
            }
        }
        let pods = Api::<Pod>::all(ctx.client.clone())
            .list(&ListParams::default())
            .await
            .map_err(|source| ReconcileError::List { what: "pods", source })?;
        let nodes =
            node_names(&ctx.client).await.map_err(|source| ReconcileError::List { what: "nodes", source })?;
        let persistence = list_persistence(&ctx.client)
            .await
            .map_err(|source| ReconcileError::List { what: "statefulsets and ipamclaims", source })?;
        let pods = pod_views(&pods.items);
        Ok(Listings { reservations, found, unreadable_pools, pods, nodes, persistence })
    }
}

/// What the listings say is to be done: the whole decision of a reconciliation, without I/O, so that
/// `whereabouts leaks` decides exactly as the controller does.
#[derive(Debug, Default)]
pub struct Leaks {
    /// The allocations whose pod is gone ([`judge`]), with their holders' reservations, by pool.
    pub plan: Plan<()>,
    /// Reservations no pool entry of the same holder stands behind, as listed.
    pub orphans: Vec<Orphan>,
    /// Allocations of running pods without a reservation.
    pub missing: Vec<MissingReservation>,
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

/// An allocation of a running pod whose address no listed reservation names.
#[derive(Debug, Clone)]
pub struct MissingReservation {
    /// The allocation.
    pub found: Found,
    /// The name its reservation gets (see [`reservation_name_for`]).
    pub name: String,
}

impl MissingReservation {
    /// Who the reservation is made for: the allocation's holder.
    pub fn holder(&self) -> Reservation {
        self.found.allocation.reservation()
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
                .any(|f| names_address(name, f.ip) && f.allocation.reservation().same_owner(&listed.holder))
        })
        .map(|(name, listed)| Orphan { name: name.clone(), listed: listed.clone() })
        .collect()
}

/// The allocations, among `found`, whose address no reservation among `reservations` names, of pods
/// in `pods` that are running and hold them: the recorded uid is the pod's, or its network-status lists
/// the address (so its ADD is done: a reservation made now does not race the ADD's own). The name is
/// the one the plugin gives it, on the node the allocation records, else the pod's.
pub fn missing_reservations(
    found: &[Found],
    reservations: &BTreeMap<String, VersionedReservation>,
    pods: &HashMap<String, PodView>,
) -> Vec<MissingReservation> {
    found
        .iter()
        .filter(|entry| !reservations.keys().any(|name| names_address(name, entry.ip)))
        .filter_map(|entry| {
            let pod = pods.get(&entry.allocation.pod_ref).filter(|pod| pod.phase == "Running")?;
            // The pod is found: whether its node exists does not matter.
            let verdict = judge(&entry.allocation, entry.ip, Some(pod), &Persistence::default(), |_| false);
            if !matches!(verdict, Verdict::Keep(KeepReason::PodLive | KeepReason::Listed)) {
                return None;
            }
            let node = entry.allocation.node.as_deref().or(pod.node.as_deref());
            let name = reservation_name_for(entry, node)?;
            Some(MissingReservation { found: entry.clone(), name })
        })
        .collect()
}

/// The wanted ordinals of every StatefulSet of the cluster, and every IPAMClaim (none where their CRD
/// is not installed).
pub async fn list_persistence(client: &kube::Client) -> Result<Persistence, kube::Error> {
    let listed = Api::<StatefulSet>::all(client.clone()).list(&ListParams::default()).await?;
    let mut known = Persistence::default();
    for statefulset in &listed.items {
        if let (Some(namespace), Some(name)) = (&statefulset.metadata.namespace, &statefulset.metadata.name) {
            known.insert_statefulset(namespace, name, wanted_ordinals(statefulset));
        }
    }
    let claims = Api::<DynamicObject>::all_with(client.clone(), &ipam_claim_resource());
    match claims.list_metadata(&ListParams::default()).await {
        Ok(listed) => {
            for claim in &listed.items {
                if let (Some(namespace), Some(name)) = (&claim.metadata.namespace, &claim.metadata.name) {
                    known.insert_claim(namespace, name);
                }
            }
        }
        Err(kube::Error::Api(status)) if status.code == 404 => {}
        Err(e) => return Err(e),
    }
    Ok(known)
}

/// The ordinals a StatefulSet wants: `spec.ordinals.start` .. `+ spec.replicas` (1 when unset, as the
/// API server defaults it).
pub fn wanted_ordinals(statefulset: &StatefulSet) -> WantedOrdinals {
    wanted_ordinals_of(statefulset.spec.as_ref())
}

/// [`wanted_ordinals`] of a StatefulSet's spec.
pub fn wanted_ordinals_of(spec: Option<&StatefulSetSpec>) -> WantedOrdinals {
    let start = spec.and_then(|s| s.ordinals.as_ref()).and_then(|o| o.start).unwrap_or(0);
    let replicas = spec.and_then(|s| s.replicas).unwrap_or(1);
    WantedOrdinals {
        start: u32::try_from(start).unwrap_or(0),
        replicas: u32::try_from(replicas).unwrap_or(0),
    }
}

/// Judges every allocation of `listings` against the pod now under its name, finds the reservations
/// no allocation stands behind, and the allocations of running pods whose reservation is missing.
/// Orphaned reservations are only collected when every pool was read: an unreadable pool may hold
/// their entries.
pub fn leaks(listings: &Listings) -> Leaks {
    let Listings { reservations, found, unreadable_pools, pods, nodes, persistence } = listings;
    let mut plan = Plan::default();
    for entry in found {
        let node_exists = |node: &str| nodes.contains(node);
        if let Verdict::Release(reason) =
            judge(&entry.allocation, entry.ip, pods.get(&entry.allocation.pod_ref), persistence, node_exists)
        {
            let reservations = reservations_of(entry, reservations.iter());
            plan.add(Release { found: entry.clone(), reason, reservations, tag: () });
        }
    }
    let orphans = if unreadable_pools.is_empty() { orphans(found, reservations) } else { Vec::new() };
    Leaks { plan, orphans, missing: missing_reservations(found, reservations, pods) }
}

/// The names of the Nodes that exist (listed as metadata only).
pub async fn node_names(client: &kube::Client) -> Result<BTreeSet<String>, kube::Error> {
    let nodes = Api::<Node>::all(client.clone()).list_metadata(&ListParams::default()).await?;
    Ok(nodes.items.iter().map(ResourceExt::name_any).collect())
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
    let listings = Listings::read(ctx).await?;
    let report = carry_out(ctx, &leaks(&listings)).await?;
    Ok(Report { unreadable_pools: listings.unreadable_pools, ..report })
}

/// Does what a reconciliation decided (in a dry run, logs it): each release a compare-and-swap on the
/// listings it was decided on.
pub async fn carry_out(ctx: &Context, leaks: &Leaks) -> Result<Report, ReconcileError> {
    let mut report = Report::default();
    let mut errors = Vec::new();
    for (batch, result) in leaks.plan.execute(ctx).await {
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
    for orphan in &leaks.orphans {
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
    for missing in &leaks.missing {
        let (name, ip, pod_ref) = (&missing.name, missing.found.ip, &missing.found.allocation.pod_ref);
        let verb = if ctx.dry_run { "dry run: would make" } else { "making" };
        tracing::info!("{verb} the missing reservation {name} of {ip} (pod {pod_ref})");
        if !ctx.dry_run {
            match ipam.reserve(name, &missing.holder()).await {
                Ok(ReserveOutcome::Reserved) => {}
                Ok(ReserveOutcome::HeldBy(other)) => {
                    tracing::warn!(
                        "{ip} of pod {pod_ref} is reserved by {} since it was listed",
                        other.pod_ref
                    );
                    continue;
                }
                Err(e) => {
                    errors.push(e.to_string());
                    continue;
                }
            }
        }
        report.restored_reservations.push(name.clone());
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
    let listing = list_decoded::<K>(&ctx.client, &ctx.namespace)
        .await
        .map_err(|source| ReconcileError::List { what, source })?;
    let mut undecodable = Vec::new();
    for object in listing.undecodable {
        tracing::warn!("{object}; skipped");
        undecodable.push(object.name);
    }
    Ok((listing.decoded, undecodable))
}

#[cfg(test)]
mod tests {
    use whereabouts_core::config::PoolTarget;
    use whereabouts_core::pool::Allocation;
    use whereabouts_store::ReservationVersion;

    use super::*;
    use crate::network_status::NetworkStatus;

    fn entry(pool: &str, range: &str, ip: &str, pod: &str, uid: Option<&str>, node: Option<&str>) -> Found {
        Found {
            pool: PoolTarget { name: pool.into(), network: range.parse().unwrap() },
            ip: ip.parse().unwrap(),
            allocation: Allocation {
                container_id: format!("c-{pod}"),
                pod_ref: format!("ns/{pod}"),
                ifname: "net1".into(),
                node: node.map(Into::into),
                cni_network: None,
                pod_uid: uid.map(Into::into),
                statefulset: None,
                ipam_claim: None,
            },
        }
    }

    fn pod(uid: &str, phase: &str, listed: Option<&str>, node: &str) -> PodView {
        let network_status = listed.map(|ip| {
            NetworkStatus::parse(&format!(r#"[{{"name":"ns/net","interface":"net1","ips":["{ip}"]}}]"#))
                .unwrap()
        });
        PodView::running_as(uid, phase, network_status, Some(node))
    }

    fn reserved(names: &[&str]) -> BTreeMap<String, VersionedReservation> {
        let holder =
            Reservation { pod_ref: "ns/other".into(), ifname: "net1".into(), container_id: "x".into() };
        let version = ReservationVersion { uid: "u".into(), revision: "1".into() };
        names
            .iter()
            .map(|name| {
                (name.to_string(), VersionedReservation { holder: holder.clone(), version: version.clone() })
            })
            .collect()
    }

    #[test]
    fn only_running_holders_get_their_missing_reservation_again() {
        let found = [
            entry("net-192.0.2.0-24", "192.0.2.0/24", "192.0.2.1", "ours", Some("u1"), Some("n1")),
            entry("net-192.0.2.0-24", "192.0.2.0/24", "192.0.2.2", "upstreams", None, None),
            entry("net-192.0.2.0-24", "192.0.2.0/24", "192.0.2.3", "pending", Some("u3"), Some("n1")),
            entry("net-192.0.2.0-24", "192.0.2.0/24", "192.0.2.4", "unlisted", None, None),
            entry("net-192.0.2.0-24", "192.0.2.0/24", "192.0.2.5", "gone", Some("u5"), Some("n1")),
            entry("net-192.0.2.0-24", "192.0.2.0/24", "192.0.2.6", "reserved", Some("u6"), Some("n1")),
            entry("net-n1-10.0.0.16-28", "10.0.0.16/28", "10.0.0.17", "sliced", None, None),
        ];
        let pods: HashMap<String, PodView> = [
            ("ours", pod("u1", "Running", None, "n1")),
            ("upstreams", pod("u2", "Running", Some("192.0.2.2"), "n1")),
            ("pending", pod("u3", "Pending", None, "n1")),
            ("unlisted", pod("u4", "Running", None, "n1")),
            ("reserved", pod("u6", "Running", None, "n1")),
            ("sliced", pod("u7", "Running", Some("10.0.0.17"), "n1")),
        ]
        .into_iter()
        .map(|(name, view)| (format!("ns/{name}"), view))
        .collect();
        let missing = missing_reservations(&found, &reserved(&["other-net-192.0.2.6"]), &pods);
        let made: Vec<(&str, &str)> =
            missing.iter().map(|m| (m.name.as_str(), m.found.allocation.pod_ref.as_str())).collect();
        assert_eq!(
            made,
            [("net-192.0.2.1", "ns/ours"), ("net-192.0.2.2", "ns/upstreams"), ("net-10.0.0.17", "ns/sliced")]
        );
        assert_eq!(missing[0].holder(), found[0].allocation.reservation());
    }
}
