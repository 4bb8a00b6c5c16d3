//! Upstream's Kubernetes storage path (`IPManagementKubernetesUpdate` and the `KubernetesIPPool` and
//! overlapping-range stores of `pkg/storage/kubernetes/ipam.go`), for one range, run while the Lease is
//! held.

use std::collections::BTreeMap;
use std::time::Duration;

use json_patch::jsonptr::PointerBuf;
use json_patch::{
    AddOperation, Patch as JsonPatch, PatchOperation, RemoveOperation, ReplaceOperation, TestOperation,
};
use kube::api::{DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::Value;
use tokio::time::Instant;
use whereabouts_core::addr::parse_cidr_strict;
use whereabouts_core::pool::{Allocation, PoolSpec, Reservation as OripHolder};
use whereabouts_core::range::{pool_name, reservation_name};
use whereabouts_k8s::crd::{
    IPPool, IPPoolSpec, OverlappingRangeIPReservation, OverlappingRangeIPReservationSpec,
};

use super::assign::{Reservation, assign_ip, deallocate_ip};
use super::goip::{add_offset, from_std, offset, to_std};
use super::{CallContext, Mode, UpstreamConfig, UpstreamError};

/// Attempts per range (`storage.DatastoreRetries`), with no pause in between.
const ATTEMPTS: usize = 100;

/// One budget for every API call of an update (`storage.RequestTimeout`).
const REQUEST_BUDGET: Duration = Duration::from_secs(10);

/// A pool decoded as upstream decodes it.
pub(crate) struct Decoded {
    /// The IP written in `spec.range`, the base of every offset.
    base: u128,
    /// Every entry whose key parses as a signed 64-bit decimal, in key order.
    pub(crate) reservations: Vec<Reservation>,
    /// Whether an entry decoded to Go's nil IP (an IPv4 offset ≥ 2^32 − 1); upstream keeps it in its
    /// list, and every write of the list then fails on it.
    has_nil: bool,
}

/// Decodes `spec` as upstream's `toIPReservationList` does: keys parsed as signed 64-bit decimals
/// (unparsable keys skipped), reinterpreted as unsigned and added to the IP literally written in
/// `spec.range`.
pub(crate) fn decode(spec: &PoolSpec) -> Result<Decoded, UpstreamError> {
    let base = parse_cidr_strict(&spec.range)
        .map(|range| from_std(range.addr()))
        .ok_or_else(|| UpstreamError::Pool(format!("invalid CIDR address: {}", spec.range)))?;
    let mut decoded = Decoded { base, reservations: Vec::new(), has_nil: false };
    for (key, allocation) in &spec.allocations {
        let Ok(offset) = key.parse::<i64>() else { continue };
        match add_offset(base, offset as u64) {
            Some(ip) => decoded.reservations.push(Reservation {
                ip,
                container_id: allocation.container_id.clone(),
                pod_ref: allocation.pod_ref.clone(),
                ifname: allocation.ifname.clone(),
                dummy: false,
            }),
            None => decoded.has_nil = true,
        }
    }
    Ok(decoded)
}

/// An allocation as upstream's `IPAllocation` struct holds it: fields it does not know are gone.
fn go_view(allocation: &Allocation) -> Allocation {
    Allocation { node: None, cni_network: None, pod_uid: None, ..allocation.clone() }
}

/// `toAllocationMap`: the list (dummies excluded) as stored allocations, keyed by unsigned decimal
/// offsets from the base.
fn encode(decoded: &Decoded, list: &[Reservation]) -> Result<BTreeMap<String, Allocation>, UpstreamError> {
    if decoded.has_nil {
        return Err(UpstreamError::Pool(format!(
            "cannot calculate offset between IPv6 (<nil>) and IPv4 address ({})",
            to_std(decoded.base)
        )));
    }
    let mut allocations = BTreeMap::new();
    for r in list.iter().filter(|r| !r.dummy) {
        let key = offset(r.ip, decoded.base).map_err(UpstreamError::Pool)?.to_string();
        let allocation = Allocation {
            container_id: r.container_id.clone(),
            pod_ref: r.pod_ref.clone(),
            ifname: r.ifname.clone(),
            node: None,
            cni_network: None,
            pod_uid: None,
            statefulset: None,
            ipam_claim: None,
        };
        allocations.insert(key, allocation);
    }
    Ok(allocations)
}

/// The JSON Patch upstream's `KubernetesIPPool.Update` sends to turn the pool it read (`read`, at
/// `resource_version`) into one holding `allocations`: a `test` of the resourceVersion, a `test` that
/// each path about to be added is `null` (absent), then the diff of the two pools as upstream's struct
/// serialises them (so fields upstream does not know are neither compared nor touched).
pub fn pool_update_patch(
    resource_version: &str,
    read: &PoolSpec,
    allocations: &BTreeMap<String, Allocation>,
) -> JsonPatch {
    let read: BTreeMap<&String, Allocation> = read.allocations.iter().map(|(k, a)| (k, go_view(a))).collect();
    let mut diff_ops = Vec::new();
    diff(
        PointerBuf::from_tokens(["spec", "allocations"]),
        &serde_json::to_value(read).unwrap_or_default(),
        &serde_json::to_value(allocations).unwrap_or_default(),
        &mut diff_ops,
    );
    let mut ops = vec![PatchOperation::Test(TestOperation {
        path: PointerBuf::from_tokens(["metadata", "resourceVersion"]),
        value: Value::String(resource_version.to_string()),
    })];
    for op in &diff_ops {
        if let PatchOperation::Add(add) = op {
            ops.push(PatchOperation::Test(TestOperation { path: add.path.clone(), value: Value::Null }));
        }
    }
    ops.extend(diff_ops);
    JsonPatch(ops)
}

/// The diff upstream's patch library (`jsonpatch.CreatePatch`) computes: objects key by key (keys of
/// `to` first: `add` when new, recursion when both hold an object, `replace` when the values differ;
/// then `remove` for keys only `from` has), any other change a `replace`.
fn diff(path: PointerBuf, from: &Value, to: &Value, ops: &mut Vec<PatchOperation>) {
    match (from, to) {
        (Value::Object(from), Value::Object(to)) => {
            for (key, to_value) in to {
                let path = path.with_trailing_token(key.as_str());
                match from.get(key) {
                    None => ops.push(PatchOperation::Add(AddOperation { path, value: to_value.clone() })),
                    Some(from_value) => diff(path, from_value, to_value, ops),
                }
            }
            for key in from.keys().filter(|key| !to.contains_key(*key)) {
                ops.push(PatchOperation::Remove(RemoveOperation {
                    path: path.with_trailing_token(key.as_str()),
                }));
            }
        }
        (from, to) if from == to => {}
        (_, to) => ops.push(PatchOperation::Replace(ReplaceOperation { path, value: to.clone() })),
    }
}

/// The HTTP status of an API error, if the server answered.
fn status(error: &kube::Error) -> Option<u16> {
    match error {
        kube::Error::Api(status) => Some(status.code),
        _ => None,
    }
}

/// How one attempt ended short of a pool write.
enum Interrupted {
    /// Upstream's `temporaryError` (and an overlapping reservation of another pod): next attempt.
    Retry(String),
    /// Anything else: the update fails.
    Fail(UpstreamError),
}

/// The objects of one namespace that the update reads and writes.
struct Store {
    pools: Api<IPPool>,
    reservations: Api<OverlappingRangeIPReservation>,
}

impl Store {
    /// `getPool`: GET the pool; when absent CREATE it empty and have the attempt retried, so that the
    /// next one reads it with its resourceVersion.
    async fn get_or_create(&self, name: &str, range: &str) -> Result<IPPool, Interrupted> {
        match self.pools.get(name).await {
            Ok(pool) => Ok(pool),
            Err(e) if status(&e) == Some(404) => {
                let pool = IPPool {
                    metadata: ObjectMeta { name: Some(name.to_string()), ..ObjectMeta::default() },
                    spec: IPPoolSpec {
                        pool: PoolSpec {
                            range: range.to_string(),
                            allocations: BTreeMap::new(),
                            ..Default::default()
                        },
                    },
                };
                match self.pools.create(&PostParams::default(), &pool).await {
                    Ok(_) => Err(Interrupted::Retry("k8s pool initialized".into())),
                    Err(e) if status(&e) == Some(409) => Err(Interrupted::Retry(e.to_string())),
                    Err(e) => Err(Interrupted::Fail(UpstreamError::PoolCreate(e))),
                }
            }
            Err(e) => Err(Interrupted::Fail(UpstreamError::PoolGet(e))),
        }
    }

    /// `KubernetesIPPool.Update`: one JSON Patch; a failed `test` (HTTP 422, "Invalid") is temporary.
    async fn write(&self, pool: &IPPool, decoded: &Decoded, list: &[Reservation]) -> Result<(), Interrupted> {
        let allocations = encode(decoded, list).map_err(Interrupted::Fail)?;
        let resource_version = pool.metadata.resource_version.as_deref().unwrap_or_default();
        let patch = pool_update_patch(resource_version, &pool.spec.pool, &allocations);
        let name = pool.metadata.name.as_deref().unwrap_or_default();
        match self.pools.patch(name, &PatchParams::default(), &Patch::Json::<()>(patch)).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 422 || s.reason == "Invalid" => {
                Err(Interrupted::Retry(s.message))
            }
            Err(e) => Err(Interrupted::Fail(UpstreamError::Api(e))),
        }
    }

    /// `GetOverlappingRangeIPReservation`: the holder of an address's reservation, if any.
    async fn reservation_holder(&self, name: &str) -> Result<Option<String>, UpstreamError> {
        match self.reservations.get_opt(name).await {
            Ok(found) => Ok(found.map(|r| r.spec.holder.pod_ref)),
            Err(e) => Err(UpstreamError::ReservationGet(e)),
        }
    }

    /// `UpdateOverlappingRangeAllocation`: CREATE the reservation (podref and ifname only; upstream
    /// never writes `containerid`) or DELETE it whoever holds it.
    async fn write_reservation(
        &self,
        mode: Mode,
        name: &str,
        call: &CallContext,
    ) -> Result<(), UpstreamError> {
        match mode {
            Mode::Allocate => {
                let reservation = OverlappingRangeIPReservation {
                    metadata: ObjectMeta { name: Some(name.to_string()), ..ObjectMeta::default() },
                    spec: OverlappingRangeIPReservationSpec {
                        holder: OripHolder {
                            pod_ref: call.pod_ref(),
                            ifname: call.ifname.clone(),
                            container_id: String::new(),
                        },
                    },
                };
                self.reservations.create(&PostParams::default(), &reservation).await.map(drop)
            }
            Mode::Deallocate => self.reservations.delete(name, &DeleteParams::default()).await.map(drop),
        }
        .map_err(UpstreamError::Api)
    }
}

/// The update (upstream-behaviour §3.7) of the configured range, under one 10 s budget for all its
/// API calls; `deadline` is the command's (ADD 2 min, DEL 1 min). Answers the address allocated or
/// released; `None` when a DEL found nothing to release.
pub(crate) async fn update(
    client: &Client,
    namespace: &str,
    config: &UpstreamConfig,
    call: &CallContext,
    mode: Mode,
    deadline: Instant,
) -> Result<Option<u128>, UpstreamError> {
    let store = Store {
        pools: Api::namespaced(client.clone(), namespace),
        reservations: Api::namespaced(client.clone(), namespace),
    };
    let budget = deadline.min(Instant::now() + REQUEST_BUDGET);
    tokio::time::timeout_at(budget, update_range(&store, config, call, mode, deadline))
        .await
        .unwrap_or(Err(UpstreamError::RequestBudget))
}

async fn update_range(
    store: &Store,
    config: &UpstreamConfig,
    call: &CallContext,
    mode: Mode,
    deadline: Instant,
) -> Result<Option<u128>, UpstreamError> {
    // The connectivity check.
    store.pools.list(&ListParams::default()).await.map_err(UpstreamError::Api)?;
    let name = pool_name(&config.network_name, None, &config.range);
    let range = config.range.to_string();
    let pod_ref = call.pod_ref();
    let mut dummies: Vec<Reservation> = Vec::new();
    let mut skip_reservation = false;
    let mut last_retry = String::from("deadline exceeded");
    let mut written = None;
    for _ in 0..ATTEMPTS {
        if Instant::now() >= deadline {
            break;
        }
        let pool = match store.get_or_create(&name, &range).await {
            Ok(pool) => pool,
            Err(Interrupted::Retry(why)) => {
                last_retry = why;
                continue;
            }
            Err(Interrupted::Fail(e)) => return Err(e),
        };
        let decoded = decode(&pool.spec.pool)?;
        let mut list = decoded.reservations.clone();
        list.extend(dummies.iter().cloned());
        let ip = match mode {
            Mode::Allocate => {
                let ip = assign_ip(config, &mut list, &call.container_id, &pod_ref, &call.ifname)
                    .map_err(UpstreamError::Assign)?;
                if config.enable_overlapping_ranges {
                    let holder =
                        store.reservation_holder(&reservation_name(&config.network_name, to_std(ip))).await?;
                    match holder {
                        Some(holder) if holder != pod_ref => {
                            dummies.push(Reservation::dummy(ip));
                            last_retry = format!("{} is reserved by {holder}", to_std(ip));
                            continue;
                        }
                        Some(_) => skip_reservation = true,
                        None => {}
                    }
                }
                ip
            }
            Mode::Deallocate => match deallocate_ip(&mut list, &call.container_id, &call.ifname) {
                Some(ip) => ip,
                None => return Ok(None),
            },
        };
        match store.write(&pool, &decoded, &list).await {
            Ok(()) => {
                written = Some(ip);
                break;
            }
            Err(Interrupted::Retry(why)) => last_retry = why,
            // Upstream leaves the loop keeping this error, and a successful reservation write below then
            // overwrites it: the ADD succeeds with an address that was never stored. Emulated, that would
            // make the harness hand out duplicates of its own making, so the error is returned.
            Err(Interrupted::Fail(e)) => return Err(e),
        }
    }
    // Upstream falls through to the reservation step after its last attempt (or at the deadline) with
    // whatever address the last attempt picked; that too would be a duplicate of the harness's making.
    let Some(ip) = written else {
        return Err(UpstreamError::GaveUp { last: last_retry });
    };
    if config.enable_overlapping_ranges && !skip_reservation {
        store.write_reservation(mode, &reservation_name(&config.network_name, to_std(ip)), call).await?;
    }
    Ok(Some(ip))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn allocation(id: &str, pod: &str) -> Allocation {
        Allocation {
            container_id: id.into(),
            pod_ref: format!("ns/{pod}"),
            ifname: "net1".into(),
            node: None,
            cni_network: None,
            pod_uid: None,
            statefulset: None,
            ipam_claim: None,
        }
    }

    fn spec(range: &str, entries: &[(&str, Allocation)]) -> PoolSpec {
        PoolSpec {
            range: range.into(),
            allocations: entries.iter().cloned().map(|(k, a)| (k.to_string(), a)).collect(),
            ..Default::default()
        }
    }

    fn addresses(spec: &PoolSpec) -> Vec<String> {
        decode(spec).unwrap().reservations.iter().map(|r| to_std(r.ip).to_string()).collect()
    }

    #[test]
    fn keys_are_signed_decimals_from_the_literal_range_ip() {
        let a = allocation("a", "a");
        let pool = spec(
            "10.0.0.4/24",
            &[
                ("1", a.clone()),
                ("+2", a.clone()),
                ("x", a.clone()),
                ("-1", a.clone()),
                ("4294967294", a.clone()),
            ],
        );
        // In key order: "+2", "-1" (2^64 − 1, Go's nil IP for an IPv4 base), "1", then 2^32 − 2, which
        // carries out of the IPv4-mapped prefix into an IPv6 address.
        assert_eq!(addresses(&pool), ["10.0.0.6", "10.0.0.5", "::1:0:a00:2"]);
        assert!(decode(&pool).unwrap().has_nil);
        let v6 = spec("fd00::/64", &[("9223372036854775807", a.clone()), ("9223372036854775808", a.clone())]);
        assert_eq!(addresses(&v6), ["fd00::7fff:ffff:ffff:ffff"]);
    }

    #[test]
    fn a_nil_entry_makes_every_write_fail() {
        let pool = spec("10.0.0.0/24", &[("4294967295", allocation("a", "a"))]);
        let decoded = decode(&pool).unwrap();
        assert_eq!(
            encode(&decoded, &decoded.reservations).unwrap_err().to_string(),
            "cannot calculate offset between IPv6 (<nil>) and IPv4 address (10.0.0.0)"
        );
    }

    #[test]
    fn writes_use_unsigned_offsets_and_drop_dummies_and_unreadable_keys() {
        let pool = spec("10.0.0.0/16", &[("256", allocation("a", "a")), ("junk", allocation("j", "j"))]);
        let decoded = decode(&pool).unwrap();
        let mut list = decoded.reservations.clone();
        list.push(Reservation::dummy(from_std("10.0.0.9".parse().unwrap())));
        let encoded = encode(&decoded, &list).unwrap();
        assert_eq!(encoded.keys().collect::<Vec<_>>(), ["256"]);
    }

    #[test]
    fn an_added_allocation_is_tested_absent_after_the_resource_version() {
        let read = spec("10.0.0.0/24", &[("1", allocation("a", "a"))]);
        let mut next = read.allocations.clone();
        next.insert("2".into(), allocation("b", "b"));
        let patch = pool_update_patch("42", &read, &next);
        assert_eq!(
            serde_json::to_value(patch).unwrap(),
            json!([
                {"op": "test", "path": "/metadata/resourceVersion", "value": "42"},
                {"op": "test", "path": "/spec/allocations/2", "value": null},
                {"op": "add", "path": "/spec/allocations/2", "value": {"id": "b", "podref": "ns/b", "ifname": "net1"}},
            ])
        );
    }

    #[test]
    fn a_new_container_id_is_one_replace_and_fields_upstream_ignores_stay_untouched() {
        let mut ours = allocation("a", "a");
        ours.node = Some("node-1".into());
        ours.cni_network = Some("net".into());
        let read = spec("10.0.0.0/24", &[("1", ours), ("2", allocation("b", "b"))]);
        let next = BTreeMap::from([("1".to_string(), allocation("a2", "a"))]);
        assert_eq!(
            serde_json::to_value(pool_update_patch("7", &read, &next)).unwrap(),
            json!([
                {"op": "test", "path": "/metadata/resourceVersion", "value": "7"},
                {"op": "replace", "path": "/spec/allocations/1/id", "value": "a2"},
                {"op": "remove", "path": "/spec/allocations/2"},
            ])
        );
    }

    #[test]
    fn an_unchanged_pool_is_still_patched_with_its_resource_version_test() {
        let read = spec("10.0.0.0/24", &[("1", allocation("a", "a"))]);
        assert_eq!(
            serde_json::to_value(pool_update_patch("9", &read, &read.allocations)).unwrap(),
            json!([{"op": "test", "path": "/metadata/resourceVersion", "value": "9"}])
        );
    }
}
