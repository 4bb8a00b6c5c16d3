//! Stored pools and reservations as the controller reads them: every allocation with the pool it is
//! in, and the reservations that belong to it.

use std::net::IpAddr;

use kube::api::{Api, ApiResource, DynamicObject, ListParams};
use serde::de::DeserializeOwned;

use whereabouts_core::addr::parse_cidr_strict;
use whereabouts_core::config::PoolTarget;
use whereabouts_core::pool::{Allocation, Pool, PoolSpec};
use whereabouts_core::range::{IpRange, normalize_range, reservation_name};
use whereabouts_k8s::crd::IPPool;
use whereabouts_store::VersionedReservation;
use whereabouts_store::ipam::JudgedReservation;

/// One allocation as found in a stored pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// The pool it is in.
    pub pool: PoolTarget,
    /// The address.
    pub ip: IpAddr,
    /// Its record, as read (a release is a compare-and-swap on exactly this).
    pub allocation: Allocation,
}

/// Why a stored pool could not be read.
#[derive(Debug, Clone, thiserror::Error)]
#[error("IPPool {pool}: {reason}")]
pub struct UnreadablePool {
    /// The pool.
    pub pool: String,
    /// What is wrong with it.
    pub reason: String,
}

/// Every allocation of a stored pool, in address order. Keys that are not addresses are skipped, as
/// the plugin skips them (and keeps them).
pub fn allocations(pool: &IPPool) -> Result<Vec<Found>, UnreadablePool> {
    let name = pool.metadata.name.clone().unwrap_or_default();
    Ok(decode_spec(&name, &pool.spec.pool)?.found)
}

/// A stored pool's spec, decoded (from whichever store it was read).
#[derive(Debug, Clone)]
pub struct DecodedPool {
    /// The pool.
    pub target: PoolTarget,
    /// Its allocations, in address order.
    pub found: Vec<Found>,
    /// Allocation keys that are not addresses of the pool's family (kept as they are by every writer).
    pub skipped: Vec<String>,
}

/// Decodes the spec of the pool called `name`.
pub fn decode_spec(name: &str, spec: &PoolSpec) -> Result<DecodedPool, UnreadablePool> {
    let unreadable = |reason: String| UnreadablePool { pool: name.to_string(), reason };
    let network = parse_cidr_strict(&spec.range)
        .ok_or_else(|| unreadable(format!("spec.range {:?} is not a CIDR", spec.range)))?;
    let (decoded, skipped) = Pool::from_spec(spec, network).map_err(|e| unreadable(e.to_string()))?;
    let target = PoolTarget { name: name.to_string(), network };
    let found = decoded
        .iter()
        .map(|(ip, allocation)| Found { pool: target.clone(), ip, allocation: allocation.clone() })
        .collect();
    Ok(DecodedPool { target, found, skipped: skipped.into_iter().map(|key| key.0).collect() })
}

/// How many addresses a pool's `spec.range` spans (the network and broadcast addresses left out, as
/// allocation leaves them out); `None` when the range is unreadable.
pub fn capacity(pool: &IPPool) -> Option<f64> {
    // Precision is of no concern: a gauge of a /64's size is an estimate either way.
    #[allow(clippy::cast_precision_loss)]
    range_capacity(&pool.spec.pool.range).map(|n| n as f64)
}

/// How many addresses the CIDR `range` spans, the network and broadcast addresses left out; `None`
/// when it is not a CIDR.
pub fn range_capacity(range: &str) -> Option<u128> {
    let network = parse_cidr_strict(range)?;
    let range = IpRange::new(network.trunc(), None, None, Vec::new()).ok()?;
    Some(range.last() - range.first() + 1)
}

/// Whether the reservation called `name` could be one of `ip`: `[network_name-]<ip>`, for any network
/// name. Loose on purpose: it decides which reservations a pool entry stands behind, where a false match
/// only keeps a reservation longer (IPv6 names are ambiguous: `net-fd00-1--5` reads as `fd00:1::5` of
/// network `net` or as `1::5` of network `net-fd00`).
pub fn names_address(name: &str, ip: IpAddr) -> bool {
    let address = reservation_name("", ip);
    name.strip_suffix(address.as_str()).is_some_and(|prefix| prefix.is_empty() || prefix.ends_with('-'))
}

/// The network names (`network_name`) a pool may be of, going by its name
/// (`[network_name-][node-]<range>`): what the name has before its range, and that less the node for
/// each of `nodes` (those its allocations record) it ends with, as a node-slice pool's name does. Empty
/// for a pool whose name does not end with its range.
pub fn network_names<'a>(pool: &'a PoolTarget, nodes: impl IntoIterator<Item = &'a str>) -> Vec<&'a str> {
    let range = normalize_range(&pool.network.trunc());
    let Some(prefix) = pool.name.strip_suffix(range.as_str()) else { return Vec::new() };
    let Some(network_name) = prefix.strip_suffix('-').or(prefix.is_empty().then_some("")) else {
        return Vec::new();
    };
    let mut networks = vec![network_name];
    for node in nodes.into_iter().filter(|node| !node.is_empty()) {
        let without_node = if network_name == node {
            Some("")
        } else {
            network_name.strip_suffix(node).and_then(|n| n.strip_suffix('-'))
        };
        if let Some(network) = without_node.filter(|network| !networks.contains(network)) {
            networks.push(network);
        }
    }
    networks
}

/// The names the reservation of `found`'s address has, exactly: `[network_name-]<ip>`, for the
/// [`network_names`] of its pool given the node the allocation records.
pub fn reservation_names(found: &Found) -> Vec<String> {
    network_names(&found.pool, found.allocation.node.as_deref())
        .into_iter()
        .map(|network| reservation_name(network, found.ip))
        .collect()
}

/// The name the plugin gives the reservation of `found`'s address when `node` made it: as
/// [`reservation_names`], and when the pool is `node`'s pool of its slice, without the node (the
/// slice's pool is named after the node, its reservations are not). `None` for a pool whose name does
/// not end with its range.
pub fn reservation_name_for(found: &Found, node: Option<&str>) -> Option<String> {
    network_names(&found.pool, node).last().map(|network| reservation_name(network, found.ip))
}

/// The reservations, among `reservations`, of `found`'s address held by its holder (by exact name,
/// see [`reservation_names`]), with the state they were read in: what releasing it deletes, if they are
/// still in that state once the pool entry is gone. The container a reservation records is not
/// compared: upstream's plugin takes an entry over for a new sandbox without touching its reservation.
pub fn reservations_of<'r>(
    found: &Found,
    reservations: impl IntoIterator<Item = (&'r String, &'r VersionedReservation)>,
) -> Vec<JudgedReservation> {
    let holder = found.allocation.reservation();
    let names = reservation_names(found);
    reservations
        .into_iter()
        .filter(|(name, read)| names.contains(name) && read.holder.same_owner(&holder))
        .map(|(name, read)| JudgedReservation { name: name.clone(), version: read.version.clone() })
        .collect()
}

/// An object the types cannot read (an IPPool or NodeSlicePool without `spec`, which the CRDs allow),
/// as listed or watched.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{kind} {name} is unreadable ({reason})")]
pub struct Undecodable {
    /// Its kind.
    pub kind: String,
    /// Its name.
    pub name: String,
    /// Why it does not decode.
    pub reason: String,
    /// The object as read (boxed: it is large, and errors travel).
    pub object: Box<DynamicObject>,
}

/// Decodes one object read as raw JSON, so that one odd object cannot fail a whole listing or watch;
/// the caller decides what to say about one that does not decode.
pub fn decode<K: DeserializeOwned>(kind: &str, object: DynamicObject) -> Result<(String, K), Undecodable> {
    let name = object.metadata.name.clone().unwrap_or_default();
    match serde_json::to_value(&object).and_then(serde_json::from_value::<K>) {
        Ok(typed) => Ok((name, typed)),
        Err(e) => {
            Err(Undecodable { kind: kind.to_string(), name, reason: e.to_string(), object: Box::new(object) })
        }
    }
}

/// Every object of a kind in one namespace, decoded one by one.
#[derive(Debug)]
pub struct Listing<K> {
    /// The objects that decode, by name.
    pub decoded: Vec<(String, K)>,
    /// Those that do not.
    pub undecodable: Vec<Undecodable>,
}

/// Lists every object of a kind in `namespace` as raw JSON and decodes each on its own ([`decode`]).
pub async fn list_decoded<K>(client: &kube::Client, namespace: &str) -> Result<Listing<K>, kube::Error>
where
    K: DeserializeOwned + kube::Resource<DynamicType = ()>,
{
    let resource = ApiResource::erase::<K>(&());
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, &resource);
    let mut listing = Listing { decoded: Vec::new(), undecodable: Vec::new() };
    for object in api.list(&ListParams::default()).await?.items {
        match decode(&resource.kind, object) {
            Ok(typed) => listing.decoded.push(typed),
            Err(undecodable) => listing.undecodable.push(undecodable),
        }
    }
    Ok(listing)
}

#[cfg(test)]
mod tests {
    use whereabouts_k8s::crd::IPPoolSpec;
    use whereabouts_store::Reservation;

    use super::*;

    fn stored(name: &str, range: &str, keys: &[(&str, &str)]) -> IPPool {
        let allocations = keys
            .iter()
            .map(|(key, pod)| {
                let allocation = Allocation {
                    container_id: format!("c-{pod}"),
                    pod_ref: format!("ns/{pod}"),
                    ifname: "net1".into(),
                    node: None,
                    cni_network: None,
                    pod_uid: None,
                    statefulset: None,
                    ipam_claim: None,
                };
                (key.to_string(), allocation)
            })
            .collect();
        IPPool::new(
            name,
            IPPoolSpec { pool: PoolSpec { range: range.into(), allocations, ..Default::default() } },
        )
    }

    #[test]
    fn finds_allocations_with_their_pool() {
        let pool = stored("net-192.0.2.0-24", "192.0.2.0/24", &[("5", "a"), ("x", "b"), ("1", "c")]);
        let found = allocations(&pool).unwrap();
        let ips: Vec<String> = found.iter().map(|f| f.ip.to_string()).collect();
        assert_eq!(ips, ["192.0.2.1", "192.0.2.5"], "the undecodable key is skipped");
        assert_eq!(found[0].pool.name, "net-192.0.2.0-24");
        assert_eq!(found[0].allocation.pod_ref, "ns/c");
        assert!(allocations(&stored("bad", "nope", &[])).is_err());
    }

    #[test]
    fn capacity_leaves_out_network_and_broadcast() {
        assert_eq!(capacity(&stored("p", "192.0.2.0/24", &[])), Some(254.0));
        assert_eq!(capacity(&stored("p", "2001:db8::/64", &[])), Some(2f64.powi(64) - 1.0));
        assert_eq!(capacity(&stored("p", "junk", &[])), None);
    }

    #[test]
    fn matches_reservation_names_by_address() {
        let v4: IpAddr = "192.0.2.5".parse().unwrap();
        assert!(names_address("192.0.2.5", v4));
        assert!(names_address("blue-net-192.0.2.5", v4));
        assert!(!names_address("192.0.2.55", v4));
        assert!(!names_address("1192.0.2.5", v4));
        let v6: IpAddr = "2001:db8::".parse().unwrap();
        assert!(names_address("net-2001-db8--0", v6));
        assert!(!names_address("net-2001-db8--10", v6));
    }

    #[test]
    fn reservations_belong_to_the_holder_only() {
        use whereabouts_store::ReservationVersion;
        let pool = stored("p", "192.0.2.0/24", &[("5", "a")]);
        let found = &allocations(&pool).unwrap()[0];
        let ours = found.allocation.reservation();
        let theirs = Reservation { pod_ref: "ns/other".into(), ..ours.clone() };
        // Another sandbox of the same attachment (upstream took the entry over): still the holder's.
        let other_sandbox = Reservation { container_id: "c-older".into(), ..ours.clone() };
        let read = |holder: &Reservation, revision: &str| VersionedReservation {
            holder: holder.clone(),
            version: ReservationVersion { uid: "uid".into(), revision: revision.into() },
        };
        let reservations = [
            ("net-192.0.2.5".to_string(), read(&other_sandbox, "1")),
            ("192.0.2.5".to_string(), read(&ours, "2")),
            ("other-192.0.2.5".to_string(), read(&theirs, "3")),
            ("net-192.0.2.6".to_string(), read(&ours, "4")),
        ];
        let judged = |found: &Found| -> Vec<(String, String)> {
            reservations_of(found, reservations.iter().map(|(n, r)| (n, r)))
                .into_iter()
                .map(|judged| (judged.name, judged.version.revision))
                .collect()
        };
        // The pool "p" has no network name before its range... and is not named after it: nothing.
        assert!(judged(found).is_empty());
        let pool = stored("192.0.2.0-24", "192.0.2.0/24", &[("5", "a")]);
        assert_eq!(judged(&allocations(&pool).unwrap()[0]), [("192.0.2.5".to_string(), "2".to_string())]);
        let pool = stored("net-192.0.2.0-24", "192.0.2.0/24", &[("5", "a")]);
        assert_eq!(judged(&allocations(&pool).unwrap()[0]), [("net-192.0.2.5".to_string(), "1".to_string())]);
    }

    #[test]
    fn reservation_names_come_from_the_pool_name() {
        use whereabouts_core::range::pool_name;
        let found = |pool: &str, range: &str, ip: &str, node: Option<&str>| {
            let allocation = Allocation {
                container_id: "c".into(),
                pod_ref: "ns/p".into(),
                ifname: "net1".into(),
                node: node.map(Into::into),
                cni_network: None,
                pod_uid: None,
                statefulset: None,
                ipam_claim: None,
            };
            let network = parse_cidr_strict(range).unwrap();
            Found { pool: PoolTarget { name: pool.into(), network }, ip: ip.parse().unwrap(), allocation }
        };
        // The IPv6 case a suffix match gets wrong: 1::5 of "net" is not fd00:1::5's reservation.
        let v6 = found(&pool_name("net", None, &"1::/64".parse().unwrap()), "1::/64", "1::5", None);
        assert_eq!(reservation_names(&v6), ["net-1--5"]);
        assert!(!reservation_names(&v6).contains(&"net-fd00-1--5".to_string()));
        // A node-slice pool: the node the allocation records is not part of the network name.
        let sliced = found("net-node-1-10.0.0.16-28", "10.0.0.16/28", "10.0.0.17", Some("node-1"));
        assert_eq!(reservation_names(&sliced), ["net-node-1-10.0.0.17", "net-10.0.0.17"]);
        let bare = found("node-1-10.0.0.16-28", "10.0.0.16/28", "10.0.0.17", Some("node-1"));
        assert_eq!(reservation_names(&bare), ["node-1-10.0.0.17", "10.0.0.17"]);
        // The name to give a missing one: the slice's pool is named after the node, the reservation
        // not; an entry that records no node (upstream's) is placed by its pod's node.
        assert_eq!(reservation_name_for(&sliced, Some("node-1")).as_deref(), Some("net-10.0.0.17"));
        assert_eq!(reservation_name_for(&bare, Some("node-1")).as_deref(), Some("10.0.0.17"));
        let upstreams = found("net-node-1-10.0.0.16-28", "10.0.0.16/28", "10.0.0.17", None);
        assert_eq!(reservation_name_for(&upstreams, Some("node-1")).as_deref(), Some("net-10.0.0.17"));
        assert_eq!(reservation_name_for(&upstreams, Some("node-2")).as_deref(), Some("net-node-1-10.0.0.17"));
        assert_eq!(reservation_name_for(&v6, Some("node-1")).as_deref(), Some("net-1--5"));
        assert_eq!(reservation_name_for(&found("odd", "10.0.0.0/24", "10.0.0.1", None), None), None);
        assert!(reservation_names(&found("odd", "10.0.0.0/24", "10.0.0.1", None)).is_empty());
    }
}
