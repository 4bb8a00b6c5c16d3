//! The allocation state of one pool and its stored form.
//!
//! The stored form ([`PoolSpec`]) is upstream's `IPPool.spec` bit for bit: `range` plus `allocations`
//! keyed by the unsigned decimal offset of each address from the IP literally written in `range`. We add
//! two optional fields per allocation (`node`, `network`) that upstream ignores. Unlike upstream, offsets
//! use the full 128 bits, so every address of an IPv6 /64 round-trips.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::sync::OnceLock;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::addr::{Family, from_u128, parse_cidr_strict, to_u128};
use crate::interval::IntervalSet;

/// Who holds an address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Allocation {
    /// The container (sandbox) ID of the CNI call that made it.
    #[serde(rename = "id")]
    pub container_id: String,
    /// `<namespace>/<pod>`; empty for containers outside Kubernetes.
    #[serde(rename = "podref")]
    pub pod_ref: String,
    /// The interface name inside the container.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub ifname: String,
    /// The node that made the allocation (additive; upstream ignores it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The CNI network name of the call that made it (additive; upstream ignores it). It lets CNI GC of
    /// one network leave another network's allocations in a shared pool alone.
    #[serde(rename = "network", default, skip_serializing_if = "Option::is_none")]
    pub cni_network: Option<String>,
    /// The uid of the pod it was allocated to (additive; upstream ignores it). It tells the pod that
    /// holds the address from a newer pod of the same name, so the controller never has to guess.
    #[serde(rename = "poduid", default, skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
    /// The StatefulSet that owns the pod, recorded by networks with `sticky_statefulsets` (additive;
    /// upstream ignores it): DEL then holds the address for the pod's next sandbox instead of
    /// releasing it, until the controller sees the StatefulSet no longer wants the pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub statefulset: Option<String>,
    /// The IPAMClaim (`k8s.cni.cncf.io`, in the pod's namespace) the address is allocated for
    /// (additive; upstream ignores it): the claim, not the pod, holds it, across the pods that use it
    /// (a virtual machine's launcher pods) until the claim is deleted.
    #[serde(rename = "ipamclaim", default, skip_serializing_if = "Option::is_none")]
    pub ipam_claim: Option<String>,
}

/// Who an allocation or an owner stands for, for idempotent ADD: its IPAMClaim when it has one
/// (`<namespace>/ipamclaim:<claim>`, which no pod reference can be: pod names have no `:`), else its pod
/// reference.
fn identity<'a>(pod_ref: &'a str, ipam_claim: Option<&str>) -> std::borrow::Cow<'a, str> {
    match (ipam_claim, pod_ref.split_once('/')) {
        (Some(claim), Some((namespace, _))) => format!("{namespace}/ipamclaim:{claim}").into(),
        _ => pod_ref.into(),
    }
}

impl Allocation {
    /// Who the allocation stands for: its IPAMClaim, else its pod (see [`Owner::identity`]).
    pub fn identity(&self) -> std::borrow::Cow<'_, str> {
        identity(&self.pod_ref, self.ipam_claim.as_deref())
    }

    /// The cluster-wide reservation of this allocation's address: its identity (the claim, for a
    /// claim's address, so that the claim's next pod takes it over), interface and container.
    pub fn reservation(&self) -> Reservation {
        Reservation {
            pod_ref: self.identity().into_owned(),
            ifname: self.ifname.clone(),
            container_id: self.container_id.clone(),
        }
    }

    /// Whether DEL holds this allocation for its holder's next sandbox instead of releasing it: a
    /// claim's always, a StatefulSet's pod's on a network with `sticky_statefulsets`.
    pub fn is_persistent(&self, sticky_statefulsets: bool) -> bool {
        self.ipam_claim.is_some() || (sticky_statefulsets && self.statefulset.is_some())
    }

    /// Whether the address is held for a StatefulSet's pod between two of its sandboxes: a sticky
    /// entry whose sandbox's DEL has run ([`Allocation::held`]).
    pub fn is_held(&self) -> bool {
        (self.statefulset.is_some() || self.ipam_claim.is_some()) && self.container_id.is_empty()
    }

    /// This sticky entry as DEL leaves it: no sandbox (`id` empty, which no CNI call's container ID
    /// matches, so upstream's DEL leaves it alone too) and no node (CNI GC of the node it was on
    /// leaves it alone), pod, interface and StatefulSet kept for the pod's next ADD on any node.
    pub fn held(&self) -> Allocation {
        Allocation { container_id: String::new(), node: None, ..self.clone() }
    }

    /// Whether two records name the same holder: container, pod and interface. The additive fields
    /// (`node`, `network`, `poduid`) are left out: a cluster still on upstream's CRDs prunes them, so a record
    /// read back may lack them.
    pub fn same_holder(&self, other: &Allocation) -> bool {
        (&self.container_id, &self.pod_ref, &self.ifname)
            == (&other.container_id, &other.pod_ref, &other.ifname)
    }

    /// Whether this allocation belongs to `owner` for the purpose of idempotent ADD.
    pub fn is_owned_by(&self, owner: &Owner) -> bool {
        self.ifname == owner.ifname
            && same_attachment(
                (&owner.identity(), &owner.container_id),
                (&self.identity(), &self.container_id),
            )
    }
}

/// Whether two (pod reference, container ID) records name one attachment, interfaces aside: by the
/// first one's pod when its reference identifies one, else by container when neither names a pod.
fn same_attachment((pod, container): (&str, &str), (other_pod, other_container): (&str, &str)) -> bool {
    match identifying_pod_ref(pod) {
        Some(pod) => other_pod == pod,
        None => identifying_pod_ref(other_pod).is_none() && container == other_container,
    }
}

/// `pod_ref` when it identifies an attachment across sandboxes: a Kubernetes pod's
/// `<namespace>/<name>`. Runtimes outside Kubernetes (podman) pass a container's name as
/// `K8S_POD_NAME` without a namespace; such a name is unique only within one runtime's storage (two
/// storage roots on one network may each run a `web`), so those attachments, like nameless ones, are
/// identified by their container.
pub fn identifying_pod_ref(pod_ref: &str) -> Option<&str> {
    (!pod_ref.is_empty() && !pod_ref.starts_with('/')).then_some(pod_ref)
}

/// The owner of a cluster-wide address reservation: upstream's ORIP spec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Reservation {
    /// `<namespace>/<pod>` (empty outside Kubernetes).
    #[serde(rename = "podref")]
    pub pod_ref: String,
    /// Interface name.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub ifname: String,
    /// Container ID (in upstream's schema, but only we write it).
    #[serde(rename = "containerid", default, skip_serializing_if = "String::is_empty")]
    pub container_id: String,
}

impl Reservation {
    /// Whether `other` is the same attachment (pod and interface; the container alone outside
    /// Kubernetes).
    pub fn same_owner(&self, other: &Reservation) -> bool {
        self.ifname == other.ifname
            && same_attachment((&self.pod_ref, &self.container_id), (&other.pod_ref, &other.container_id))
    }
}

/// The identity a CNI call allocates for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `<namespace>/<pod>` from `CNI_ARGS`, when running under Kubernetes.
    pub pod_ref: Option<String>,
    /// `CNI_IFNAME`.
    pub ifname: String,
    /// The node this call runs on.
    pub node: Option<String>,
    /// The CNI network name (the configuration's `name`; not whereabouts' `network_name`).
    pub cni_network: Option<String>,
    /// `K8S_POD_UID` from `CNI_ARGS`.
    pub pod_uid: Option<String>,
    /// The StatefulSet owning the pod, when the network has `sticky_statefulsets`.
    #[serde(default)]
    pub statefulset: Option<String>,
    /// The IPAMClaim the attachment allocates for, when the runtime passed one.
    #[serde(default)]
    pub ipam_claim: Option<String>,
}

impl Owner {
    /// Who this owner allocates for: its IPAMClaim when it has one, else its pod reference.
    pub fn identity(&self) -> std::borrow::Cow<'_, str> {
        identity(self.pod_ref.as_deref().unwrap_or_default(), self.ipam_claim.as_deref())
    }

    /// The allocation record this owner writes.
    pub fn allocation(&self) -> Allocation {
        Allocation {
            container_id: self.container_id.clone(),
            pod_ref: self.pod_ref.clone().unwrap_or_default(),
            ifname: self.ifname.clone(),
            node: self.node.clone(),
            cni_network: self.cni_network.clone(),
            pod_uid: self.pod_uid.clone(),
            statefulset: self.statefulset.clone(),
            ipam_claim: self.ipam_claim.clone(),
        }
    }
}

/// The stored form of a pool: upstream's `IPPool.spec`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct PoolSpec {
    /// The range as written when the pool was created (canonical network CIDR for pools we create).
    pub range: String,
    /// Allocations keyed by the decimal offset from `range`'s IP.
    #[serde(default)]
    pub allocations: BTreeMap<String, Allocation>,
    /// Addresses released within their network's `release_cooldown`, keyed like `allocations`: the Unix
    /// time (seconds) until which each is handed out only when nothing else is free. Not part of
    /// upstream's spec (upstream would read an entry there as an allocation): every store keeps it
    /// beside the spec (the Kubernetes store in the annotation [`COOLDOWNS_ANNOTATION`]) and writes it
    /// in the same compare-and-swap as the allocations.
    #[serde(skip)]
    #[cfg_attr(feature = "schema", schemars(skip))]
    pub cooldowns: BTreeMap<String, u64>,
}

/// The IPPool annotation that holds [`PoolSpec::cooldowns`] as a JSON object.
pub const COOLDOWNS_ANNOTATION: &str = "whereabouts.cni.cncf.io/release-cooldowns";

/// A stored pool that cannot be used at all.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PoolError {
    /// `spec.range` is not a CIDR.
    #[error("pool range {0:?} is not a CIDR")]
    BadRange(String),
    /// `spec.range` is not the configured range's network.
    #[error("pool range {stored} does not match the configured range {configured}")]
    RangeMismatch {
        /// The stored range.
        stored: String,
        /// The configured range.
        configured: IpNet,
    },
}

/// An allocation key that was skipped while decoding (upstream logs and ignores these too); the entry
/// is kept and written back as it was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedKey(pub String);

/// A pool in memory: allocations by address, plus two indexes derived from them: the taken addresses
/// as intervals (for the lowest-free search) and the addresses by owner (for idempotent ADD and DEL),
/// so that neither walks every allocation of a large pool.
#[derive(Debug, Clone)]
pub struct Pool {
    family: Family,
    spec_range: String,
    base: u128,
    allocations: BTreeMap<u128, Allocation>,
    taken: IntervalSet,
    /// Built on first use: a CNI call decodes the pool, looks one owner up and exits, so building it
    /// eagerly would only add to every call; long-lived users get constant-time lookups.
    by_owner: OnceLock<OwnerIndex>,
    /// Entries under keys this version cannot read, written back untouched (upstream drops them on its
    /// next write; another writer may still understand them).
    undecodable: BTreeMap<String, Allocation>,
    /// The keys of decoded entries that were not written in canonical form ("05" for 5, as a hand edit
    /// or another writer may spell them), so that writing the pool back does not rename them.
    spelled: BTreeMap<u128, String>,
    /// Free addresses in their release cooldown: the Unix time (seconds) it ends, and the same
    /// addresses as intervals for the lowest-free search.
    cooling: BTreeMap<u128, u64>,
    cooling_set: IntervalSet,
}

impl PartialEq for Pool {
    fn eq(&self, other: &Self) -> bool {
        (self.family, &self.spec_range, self.base, &self.allocations, &self.undecodable, &self.spelled)
            == (
                other.family,
                &other.spec_range,
                other.base,
                &other.allocations,
                &other.undecodable,
                &other.spelled,
            )
            && self.cooling == other.cooling
    }
}

impl Eq for Pool {}

/// Addresses by a hash of (pod reference, interface) and of (container ID, interface). Lookups check
/// the allocation itself, so hash collisions cost a comparison, never a wrong answer.
#[derive(Debug, Clone, Default)]
struct OwnerIndex {
    by_pod: HashMap<u64, Vec<u128>>,
    by_container: HashMap<u64, Vec<u128>>,
}

fn owner_hash(id: &str, ifname: &str) -> u64 {
    let mut hasher = DefaultHasher::new();
    (id, ifname).hash(&mut hasher);
    hasher.finish()
}

impl OwnerIndex {
    fn keys(a: &Allocation) -> (u64, u64) {
        (owner_hash(&a.identity(), &a.ifname), owner_hash(&a.container_id, &a.ifname))
    }

    fn insert(&mut self, addr: u128, a: &Allocation) {
        let (pod, container) = Self::keys(a);
        self.by_pod.entry(pod).or_default().push(addr);
        self.by_container.entry(container).or_default().push(addr);
    }

    fn remove(&mut self, addr: u128, a: &Allocation) {
        let (pod, container) = Self::keys(a);
        for (map, key) in [(&mut self.by_pod, pod), (&mut self.by_container, container)] {
            if let Some(addrs) = map.get_mut(&key) {
                addrs.retain(|x| *x != addr);
                if addrs.is_empty() {
                    map.remove(&key);
                }
            }
        }
    }
}

impl Pool {
    /// An empty pool for a range; `spec.range` is the canonical network.
    pub fn new(network: IpNet) -> Self {
        let network = network.trunc();
        Pool {
            family: Family::of(network.addr()),
            spec_range: network.to_string(),
            base: to_u128(network.addr()),
            allocations: BTreeMap::new(),
            taken: IntervalSet::new(),
            by_owner: OnceLock::new(),
            undecodable: BTreeMap::new(),
            spelled: BTreeMap::new(),
            cooling: BTreeMap::new(),
            cooling_set: IntervalSet::new(),
        }
    }

    /// Decodes a stored pool, checking it belongs to `configured`'s family. Keys that are not unsigned
    /// decimals, or that point outside the address family, are skipped and reported.
    pub fn from_spec(spec: &PoolSpec, configured: IpNet) -> Result<(Self, Vec<SkippedKey>), PoolError> {
        let stored = parse_cidr_strict(&spec.range).ok_or_else(|| PoolError::BadRange(spec.range.clone()))?;
        let family = Family::of(stored.addr());
        if stored.trunc() != configured.trunc() {
            return Err(PoolError::RangeMismatch { stored: spec.range.clone(), configured });
        }
        let base = to_u128(stored.addr());
        let max = match family {
            Family::V4 => u128::from(u32::MAX),
            Family::V6 => u128::MAX,
        };
        let mut pool = Pool {
            family,
            spec_range: spec.range.clone(),
            base,
            allocations: BTreeMap::new(),
            taken: IntervalSet::new(),
            by_owner: OnceLock::new(),
            undecodable: BTreeMap::new(),
            spelled: BTreeMap::new(),
            cooling: BTreeMap::new(),
            cooling_set: IntervalSet::new(),
        };
        let decode = |key: &str| {
            key.parse::<u128>()
                .ok()
                .filter(|_| key.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|offset| Some((offset, base.checked_add(offset)?)))
                .filter(|(_, addr)| *addr <= max)
        };
        // Canonical keys first, so that of "5" and "05" the canonical one holds the address.
        let (canonical, other): (Vec<_>, Vec<_>) =
            spec.allocations.iter().map(|(key, allocation)| (key, allocation, decode(key))).partition(
                |(key, _, decoded)| decoded.is_some_and(|(offset, _)| offset.to_string() == **key),
            );
        let mut skipped = Vec::new();
        for (key, allocation, decoded) in canonical.into_iter().chain(other) {
            match decoded {
                Some((offset, addr)) if pool.get(addr).is_none() => {
                    pool.insert(addr, allocation.clone());
                    if offset.to_string() != *key {
                        pool.spelled.insert(addr, key.clone());
                    }
                }
                // A second key for the same address ("05" beside "5") is kept aside like an unreadable one.
                _ => {
                    skipped.push(SkippedKey(key.clone()));
                    pool.undecodable.insert(key.clone(), allocation.clone());
                }
            }
        }
        skipped.sort_by(|a, b| a.0.cmp(&b.0));
        // Cooldowns are ours alone: one that is unreadable, or whose address is taken again, is dropped.
        for (key, until) in &spec.cooldowns {
            if let Some((_, addr)) = decode(key).filter(|(_, addr)| pool.get(*addr).is_none()) {
                pool.cool(addr, *until);
            }
        }
        Ok((pool, skipped))
    }

    /// Encodes the pool in upstream's stored form.
    pub fn to_spec(&self) -> PoolSpec {
        PoolSpec {
            range: self.spec_range.clone(),
            allocations: self
                .allocations
                .iter()
                .filter_map(|(addr, a)| {
                    let key = match self.spelled.get(addr) {
                        Some(key) => key.clone(),
                        None => addr.checked_sub(self.base)?.to_string(),
                    };
                    Some((key, a.clone()))
                })
                .chain(self.undecodable.iter().map(|(k, a)| (k.clone(), a.clone())))
                .collect(),
            cooldowns: self
                .cooling
                .iter()
                .filter_map(|(addr, until)| Some((addr.checked_sub(self.base)?.to_string(), *until)))
                .collect(),
        }
    }

    /// The address family.
    pub fn family(&self) -> Family {
        self.family
    }

    /// The lowest address this pool can record (the IP written in `spec.range`).
    pub fn base(&self) -> u128 {
        self.base
    }

    /// The holder of an address.
    pub fn get(&self, addr: u128) -> Option<&Allocation> {
        self.allocations.get(&addr)
    }

    /// Records an allocation; `addr` must not be below [`Pool::base`].
    pub fn insert(&mut self, addr: u128, allocation: Allocation) {
        debug_assert!(addr >= self.base);
        if let Some(previous) = self.allocations.remove(&addr)
            && let Some(index) = self.by_owner.get_mut()
        {
            index.remove(addr, &previous);
        }
        if let Some(index) = self.by_owner.get_mut() {
            index.insert(addr, &allocation);
        }
        self.allocations.insert(addr, allocation);
        self.taken.insert(addr);
        self.spelled.remove(&addr);
        if self.cooling.remove(&addr).is_some() {
            self.cooling_set.remove(addr);
        }
    }

    /// Removes the allocation of an address.
    pub fn remove(&mut self, addr: u128) -> Option<Allocation> {
        let removed = self.allocations.remove(&addr)?;
        if let Some(index) = self.by_owner.get_mut() {
            index.remove(addr, &removed);
        }
        self.taken.remove(addr);
        self.spelled.remove(&addr);
        Some(removed)
    }

    /// Removes the allocation of an address and starts its release cooldown, which ends at `until`
    /// (Unix seconds; `None`: no cooldown).
    pub fn release(&mut self, addr: u128, until: Option<u64>) -> Option<Allocation> {
        let removed = self.remove(addr)?;
        if let Some(until) = until {
            self.cool(addr, until);
        }
        Some(removed)
    }

    /// Records that the free address `addr` is in its release cooldown until `until` (Unix seconds).
    pub fn cool(&mut self, addr: u128, until: u64) {
        debug_assert!(addr >= self.base && self.get(addr).is_none());
        self.cooling.insert(addr, until);
        self.cooling_set.insert(addr);
    }

    /// Forgets the cooldowns that ended at or before `now` (Unix seconds); says whether there were any.
    pub fn expire_cooldowns(&mut self, now: u64) -> bool {
        let ended: Vec<u128> =
            self.cooling.iter().filter(|(_, until)| **until <= now).map(|(addr, _)| *addr).collect();
        for addr in &ended {
            self.cooling.remove(addr);
            self.cooling_set.remove(*addr);
        }
        !ended.is_empty()
    }

    /// The free addresses in their release cooldown, as intervals.
    pub fn cooling(&self) -> &IntervalSet {
        &self.cooling_set
    }

    /// The free addresses in their release cooldown, the one whose cooldown ends first first.
    pub fn cooling_by_end(&self) -> Vec<u128> {
        let mut by_end: Vec<(u64, u128)> = self.cooling.iter().map(|(addr, until)| (*until, *addr)).collect();
        by_end.sort_unstable();
        by_end.into_iter().map(|(_, addr)| addr).collect()
    }

    fn owner_index(&self) -> &OwnerIndex {
        self.by_owner.get_or_init(|| {
            let mut index = OwnerIndex::default();
            for (addr, allocation) in &self.allocations {
                index.insert(*addr, allocation);
            }
            index
        })
    }

    /// Every address `owner` holds, lowest first (normally one; two while it moves to a requested
    /// address).
    pub fn owned(&self, owner: &Owner) -> Vec<u128> {
        let identity = owner.identity();
        let (index, id) = match identifying_pod_ref(&identity) {
            Some(identity) => (&self.owner_index().by_pod, identity),
            None => (&self.owner_index().by_container, owner.container_id.as_str()),
        };
        let candidates = index.get(&owner_hash(id, &owner.ifname));
        let mut owned: Vec<u128> = candidates
            .into_iter()
            .flatten()
            .copied()
            .filter(|addr| self.get(*addr).is_some_and(|a| a.is_owned_by(owner)))
            .collect();
        owned.sort_unstable();
        owned
    }

    /// The address an ADD of `owner` without a requested address gets again, when its attachment holds
    /// any: the entry of its own sandbox first, then one of its own pod (by uid), then the lowest, which
    /// the ADD takes over as a new sandbox of the attachment. An attachment holds more than one entry
    /// only for a moment: two pods of one name (a StatefulSet's pod deleted and created again on
    /// another node) whose ADDs landed side by side under the Kubernetes store's per-key
    /// compare-and-swap, until the old pod's DEL (or the controller) releases its own. Meanwhile each
    /// sandbox's ADD answers with its own address, never the other pod's, and never takes it over.
    pub fn reused_by(&self, owner: &Owner) -> Option<u128> {
        let owned = self.owned(owner);
        let held_by = |matches: &dyn Fn(&Allocation) -> bool| {
            owned.iter().copied().find(|addr| self.get(*addr).is_some_and(matches))
        };
        held_by(&|a| a.container_id == owner.container_id)
            .or_else(|| owner.pod_uid.as_ref().and_then(|uid| held_by(&|a| a.pod_uid.as_ref() == Some(uid))))
            .or_else(|| owned.first().copied())
    }

    /// The addresses allocated to (`container_id`, `ifname`), lowest first: what DEL releases.
    pub fn container_addresses(&self, container_id: &str, ifname: &str) -> Vec<u128> {
        let candidates = self.owner_index().by_container.get(&owner_hash(container_id, ifname));
        let mut found: Vec<u128> = candidates
            .into_iter()
            .flatten()
            .copied()
            .filter(|addr| {
                self.get(*addr).is_some_and(|a| a.container_id == container_id && a.ifname == ifname)
            })
            .collect();
        found.sort_unstable();
        found
    }

    /// The taken addresses as intervals.
    pub fn taken(&self) -> &IntervalSet {
        &self.taken
    }

    /// Allocations in address order.
    pub fn iter(&self) -> impl Iterator<Item = (IpAddr, &Allocation)> + '_ {
        self.allocations.iter().map(|(addr, a)| (from_u128(self.family, *addr), a))
    }

    /// Number of allocations.
    pub fn len(&self) -> usize {
        self.allocations.len()
    }

    /// Whether the pool holds no allocation.
    pub fn is_empty(&self) -> bool {
        self.allocations.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn alloc(id: &str) -> Allocation {
        Allocation {
            container_id: id.into(),
            pod_ref: format!("ns/{id}"),
            ifname: "eth0".into(),
            node: None,
            cni_network: None,
            pod_uid: None,
            statefulset: None,
            ipam_claim: None,
        }
    }

    #[test]
    fn upstream_offsets() {
        let mut pool = Pool::new("192.168.1.0/24".parse().unwrap());
        pool.insert(to_u128("192.168.1.5".parse().unwrap()), alloc("a"));
        let spec = pool.to_spec();
        assert_eq!(spec.range, "192.168.1.0/24");
        assert!(spec.allocations.contains_key("5"));

        let mut pool = Pool::new("caa5::/112".parse().unwrap());
        pool.insert(to_u128("caa5::8000".parse().unwrap()), alloc("a"));
        assert!(pool.to_spec().allocations.contains_key("32768"));
    }

    #[test]
    fn upstream_json_shape() {
        let json = r#"{"range":"10.10.0.0/16","allocations":{"256":{"id":"c1","podref":"default/p"},
            "257":{"id":"c2","podref":"default/q","ifname":"net1"},"-3":{"id":"x","podref":"y"},"abc":{"id":"x","podref":"y"}}}"#;
        let spec: PoolSpec = serde_json::from_str(json).unwrap();
        let (pool, skipped) = Pool::from_spec(&spec, "10.10.0.0/16".parse().unwrap()).unwrap();
        assert_eq!(skipped, vec![SkippedKey("-3".into()), SkippedKey("abc".into())]);
        let addrs: Vec<String> = pool.iter().map(|(ip, _)| ip.to_string()).collect();
        assert_eq!(addrs, ["10.10.1.0", "10.10.1.1"]);
        let written = serde_json::to_value(pool.to_spec()).unwrap();
        assert_eq!(written["allocations"]["abc"]["id"], "x", "unreadable entries are written back");
        assert_eq!(written["allocations"]["256"], serde_json::json!({"id": "c1", "podref": "default/p"}));
        assert_eq!(written["allocations"]["257"]["ifname"], "net1");
    }

    #[test]
    fn keys_spelled_otherwise_are_written_back_as_spelled() {
        let net: IpNet = "10.0.0.0/24".parse().unwrap();
        let spec = PoolSpec {
            range: "10.0.0.0/24".into(),
            allocations: [("05", "a"), ("5", "b"), ("007", "c")]
                .into_iter()
                .map(|(k, id)| (k.to_string(), alloc(id)))
                .collect(),
            ..Default::default()
        };
        let (mut pool, skipped) = Pool::from_spec(&spec, net).unwrap();
        // The canonical "5" holds .5; "05" is kept aside; "007" holds the free .7 under its own spelling.
        assert_eq!(skipped, vec![SkippedKey("05".into())]);
        assert_eq!(pool.get(to_u128("10.0.0.5".parse().unwrap())), Some(&alloc("b")));
        assert_eq!(pool.get(to_u128("10.0.0.7".parse().unwrap())), Some(&alloc("c")));
        pool.insert(to_u128("10.0.0.9".parse().unwrap()), alloc("d"));
        let written = pool.to_spec();
        let keys: Vec<&str> = written.allocations.keys().map(String::as_str).collect();
        assert_eq!(keys, ["007", "05", "5", "9"]);
        assert_eq!(written.allocations["05"], alloc("a"));
        // A rewritten entry gets the canonical key.
        pool.insert(to_u128("10.0.0.7".parse().unwrap()), alloc("e"));
        let keys: Vec<String> = pool.to_spec().allocations.into_keys().collect();
        assert_eq!(keys, ["05", "5", "7", "9"]);
    }

    #[test]
    fn offsets_beyond_the_ipv4_space_are_skipped() {
        let spec = PoolSpec {
            range: "255.255.255.0/24".into(),
            allocations: [("4294967295".to_string(), alloc("a"))].into_iter().collect(),
            ..Default::default()
        };
        let (pool, skipped) = Pool::from_spec(&spec, "255.255.255.0/24".parse().unwrap()).unwrap();
        assert!(pool.is_empty());
        assert_eq!(skipped.len(), 1);
    }

    #[test]
    fn a_stored_range_with_host_bits_keeps_its_base_and_another_network_is_refused() {
        let spec = PoolSpec {
            range: "10.0.0.5/24".into(),
            allocations: [("2".to_string(), alloc("a"))].into_iter().collect(),
            ..Default::default()
        };
        let (pool, _) = Pool::from_spec(&spec, "10.0.0.0/24".parse().unwrap()).unwrap();
        assert_eq!(pool.iter().map(|(ip, _)| ip.to_string()).collect::<Vec<_>>(), ["10.0.0.7"]);
        assert_eq!(pool.to_spec(), spec);
        assert!(matches!(
            Pool::from_spec(&spec, "10.0.1.0/24".parse().unwrap()),
            Err(PoolError::RangeMismatch { .. })
        ));
    }

    #[test]
    fn wrong_family_is_refused() {
        let spec = PoolSpec { range: "10.0.0.0/24".into(), ..PoolSpec::default() };
        assert!(Pool::from_spec(&spec, "2001:db8::/64".parse().unwrap()).is_err());
        let spec = PoolSpec { range: "garbage".into(), ..PoolSpec::default() };
        assert!(Pool::from_spec(&spec, "10.0.0.0/24".parse().unwrap()).is_err());
    }

    #[test]
    fn owner_matching() {
        let k8s = Owner {
            container_id: "c2".into(),
            pod_ref: Some("ns/a".into()),
            ifname: "eth0".into(),
            node: None,
            cni_network: None,
            pod_uid: None,
            statefulset: None,
            ipam_claim: None,
        };
        assert!(alloc("a").is_owned_by(&k8s), "a new container of the same pod owns it");
        let plain = Owner { container_id: "c1".into(), pod_ref: None, ..k8s.clone() };
        let mut bare = alloc("c1");
        bare.pod_ref.clear();
        assert!(bare.is_owned_by(&plain));
        assert!(!alloc("c1").is_owned_by(&plain), "a pod's allocation is not a bare container's");
        // Podman's container name without a namespace is no identity: the container is.
        let named = |container: &str| Owner {
            container_id: container.into(),
            pod_ref: Some("/web".into()),
            ..k8s.clone()
        };
        let mut web = alloc("c1");
        web.pod_ref = "/web".into();
        assert!(web.is_owned_by(&named("c1")));
        assert!(!web.is_owned_by(&named("c9")), "another storage root's `web` is another container");
        assert!(web.is_owned_by(&plain));
    }

    /// Two pods of one name (`ns/web-0`, deleted and created again on another node) whose ADDs landed
    /// side by side: each sandbox gets its own entry back, a new sandbox of the new pod its pod's, and
    /// only a sandbox that matches neither takes over the lowest.
    #[test]
    fn an_add_reuses_its_own_sandboxs_entry_then_its_pods_then_the_lowest() {
        let entry = |container: &str, uid: &str| Allocation {
            pod_ref: "ns/web-0".into(),
            pod_uid: Some(uid.into()),
            ..alloc(container)
        };
        let owner = |container: &str, uid: Option<&str>| Owner {
            container_id: container.into(),
            pod_ref: Some("ns/web-0".into()),
            ifname: "eth0".into(),
            node: None,
            cni_network: None,
            pod_uid: uid.map(Into::into),
            statefulset: None,
            ipam_claim: None,
        };
        let (low, high) = (to_u128("10.0.0.2".parse().unwrap()), to_u128("10.0.0.9".parse().unwrap()));
        let mut pool = Pool::new("10.0.0.0/24".parse().unwrap());
        pool.insert(low, entry("old-sandbox", "uid-old"));
        pool.insert(high, entry("new-sandbox", "uid-new"));
        assert_eq!(pool.reused_by(&owner("new-sandbox", Some("uid-new"))), Some(high), "its own sandbox's");
        assert_eq!(pool.reused_by(&owner("old-sandbox", Some("uid-old"))), Some(low));
        assert_eq!(pool.reused_by(&owner("newer-sandbox", Some("uid-new"))), Some(high), "its pod's");
        assert_eq!(pool.reused_by(&owner("other", None)), Some(low), "upstream's takeover: the lowest");
        assert_eq!(pool.reused_by(&owner("other", Some("uid-third"))), Some(low));
        assert_eq!(pool.reused_by(&Owner { pod_ref: Some("ns/web-1".into()), ..owner("x", None) }), None);
    }

    #[test]
    fn a_claims_allocation_belongs_to_the_claim_not_the_pod() {
        let claimed = Allocation { ipam_claim: Some("vm1.net".into()), ..alloc("launcher-a") };
        let owner = |pod: &str, claim: Option<&str>| Owner {
            container_id: format!("{pod}-sandbox"),
            pod_ref: Some(format!("ns/{pod}")),
            ifname: "eth0".into(),
            node: None,
            cni_network: None,
            pod_uid: None,
            statefulset: None,
            ipam_claim: claim.map(Into::into),
        };
        assert!(claimed.is_owned_by(&owner("launcher-b", Some("vm1.net"))), "another pod of the claim");
        assert!(!claimed.is_owned_by(&owner("launcher-a", None)), "its pod without the claim");
        assert!(!claimed.is_owned_by(&owner("launcher-a", Some("vm2.net"))), "another claim");
        assert_eq!(claimed.reservation().pod_ref, "ns/ipamclaim:vm1.net");
        assert_eq!(alloc("a").reservation().pod_ref, "ns/a");
        let mut pool = Pool::new("10.0.0.0/24".parse().unwrap());
        pool.insert(to_u128("10.0.0.7".parse().unwrap()), claimed.clone());
        assert_eq!(pool.owned(&owner("launcher-b", Some("vm1.net"))), [to_u128("10.0.0.7".parse().unwrap())]);
        assert!(pool.owned(&owner("launcher-a", None)).is_empty());
        // Held between pods, for a claim or a sticky StatefulSet.
        assert!(claimed.held().is_held() && !claimed.is_held());
        assert!(!alloc("a").held().is_held(), "a plain allocation is never held");
        assert!(claimed.is_persistent(false));
        let web = Allocation { statefulset: Some("web".into()), ..alloc("web-0") };
        assert!(web.is_persistent(true) && !web.is_persistent(false));
    }

    proptest! {
        #[test]
        fn ipv6_offsets_round_trip_over_the_whole_slash_64(host in any::<u64>()) {
            let net: IpNet = "2001:db8:1:2::/64".parse().unwrap();
            let addr = to_u128(net.network()) + u128::from(host);
            let mut pool = Pool::new(net);
            pool.insert(addr, alloc("a"));
            let spec: PoolSpec = serde_json::from_str(&serde_json::to_string(&pool.to_spec()).unwrap()).unwrap();
            let (decoded, skipped) = Pool::from_spec(&spec, net).unwrap();
            prop_assert!(skipped.is_empty());
            prop_assert_eq!(decoded, pool);
        }

        #[test]
        fn owner_lookups_match_a_linear_scan(
            ops in proptest::collection::vec((any::<bool>(), 0u128..16, 0usize..4, 0usize..3, any::<bool>()), 0..80)
        ) {
            let mut pool = Pool::new("10.0.0.0/24".parse().unwrap());
            for (add, offset, who, ifname, k8s) in ops {
                let addr = pool.base() + offset;
                if add {
                    let mut a = alloc(&format!("c{who}"));
                    a.ifname = format!("eth{ifname}");
                    if !k8s {
                        a.pod_ref.clear();
                    }
                    pool.insert(addr, a);
                } else {
                    pool.remove(addr);
                }
                for who in 0..4 {
                    for ifname in 0..3 {
                        let (id, ifname) = (format!("c{who}"), format!("eth{ifname}"));
                        let scan = pool.allocations.iter()
                            .find(|(_, a)| a.container_id == id && a.ifname == ifname).map(|(x, _)| *x);
                        prop_assert_eq!(pool.container_addresses(&id, &ifname).first().copied(), scan);
                        for pod_ref in [Some(format!("ns/c{who}")), None] {
                            let owner = Owner {
                                container_id: id.clone(), pod_ref, ifname: ifname.clone(), node: None, cni_network: None, pod_uid: None, statefulset: None, ipam_claim: None,
                            };
                            let scan = pool.allocations.iter().find(|(_, a)| a.is_owned_by(&owner)).map(|(x, _)| *x);
                            prop_assert_eq!(pool.owned(&owner).first().copied(), scan);
                        }
                    }
                }
            }
        }

        #[test]
        fn decoding_arbitrary_keys_never_panics(keys in proptest::collection::vec(".{0,45}", 0..8)) {
            let spec = PoolSpec {
                range: "10.0.0.0/8".into(),
                allocations: keys.into_iter().map(|k| (k, alloc("a"))).collect(),
                ..Default::default()
            };
            let _ = Pool::from_spec(&spec, "10.0.0.0/8".parse().unwrap());
        }
    }
}
