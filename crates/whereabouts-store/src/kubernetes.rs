//! The Kubernetes store: upstream's custom resources, unchanged, in the namespace of the kubeconfig's
//! context (`kube-system` by default).
//!
//! * A pool is an `IPPool` named as upstream names it, its allocations keyed by the decimal offset from
//!   the IP written in `spec.range`. Pools we create are complete objects; upstream reads them as its own.
//! * A reservation is an `OverlappingRangeIPReservation` named after the address.
//! * A `NodeSlicePool` (which node allocates in which slice of a range) is written by the controller and
//!   only read here ([`KubeStore::node_slice`]); a node's pool of its slice is an ordinary `IPPool`.
//!
//! # No cluster-wide lock: every change is a compare-and-swap on the keys it changes
//!
//! Upstream serialises every ADD and DEL in the cluster through one Lease and then patches the pool with
//! a JSON Patch that `test`s `/metadata/resourceVersion`. A resourceVersion test makes *every* pair of
//! concurrent writers of a pool conflict, whatever addresses they pick, so without the Lease the writers
//! of a busy pool would mostly lose races, and with it they wait in line.
//!
//! We send no Lease and no resourceVersion test. A pool write is one JSON Patch whose `test` operations
//! pin every allocation it changes to the value it was read with: `null` (absent) for an address it
//! takes, the exact allocation for one it releases or rewrites. The API server applies a patch
//! atomically to the object's current state (retrying internally on its own storage conflicts), so a
//! patch is a compare-and-swap on exactly the keys it touches, and a failed `test` (HTTP 422) is a lost
//! race, retried from a fresh read. Two writers taking different addresses both succeed; two taking the
//! same address cannot both succeed.
//!
//! That alone would leave the writers of different nodes racing for the same lowest free addresses.
//! The engine therefore moves a node that lost a race into its lane of the free addresses
//! ([`whereabouts_core::allocate::Lane`]); with no contention it is exactly upstream's lowest-free
//! order.
//!
//! # What a write costs the API server
//!
//! The API server applies every write to the whole object and serialises the writes of one object, so
//! a pool's throughput is set by how many allocations each write carries and by the object's size. On
//! every write the server also recomputes `metadata.managedFields`, which for an object changed by JSON
//! patches lists every allocation key again: as large as the spec itself, and the larger part of a
//! write's cost on a big pool (measured on kube-apiserver v1.31 with 1000 allocations: 280 ms per
//! write with them, 110 ms without). Nothing applies IPPools server-side, so each pool patch also sets
//! `managedFields` to `[{}]`, the API's documented way to clear them; upstream ignores the field.
//!
//! Mixed with upstream during a rolling upgrade, the two implementations still serialise on the pool
//! object: each of our patches changes the resourceVersion, so an upstream writer that read the pool
//! before it fails its resourceVersion test and retries; and an upstream write that lands first takes
//! its addresses, which our `test`s on those keys then see.
//!
//! A `test` compares JSON values, so it is made with each allocation exactly as it was read (with a
//! `null` or an empty field a hand edit may have left), not as this code would write it again.
//!
//! Release cooldowns ([`PoolSpec::cooldowns`]) live in the IPPool's annotation
//! [`COOLDOWNS_ANNOTATION`] (a JSON object of offset to Unix seconds), outside the spec that upstream
//! reads, and change in the same patch as the allocations, under a `test` of the annotation as read.
//!
//! Writers of one pool on one node queue on a node-local lock file ([`Store::lock_pool`]) instead of
//! racing each other, and the writer at the head of the queue allocates for every ADD waiting behind
//! it in one patch ([`crate::queue`]), so a burst of pods on a node costs the API server one write per
//! batch rather than per pod. The heads of different nodes' queues then take turns through a Lease per
//! pool (see `pool_lease` for why). Queue and Lease are optimisations: correctness rests on the
//! patches' tests alone.
//!
//! Reservations are created with a plain create (409 when they exist), taken over only under a
//! resourceVersion precondition and deleted only under uid and resourceVersion preconditions from the
//! reading the delete was decided on, so a reservation that changed hands since it was read is never
//! overwritten or removed.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use json_patch::jsonptr::PointerBuf;
use json_patch::{
    AddOperation, Patch as JsonPatch, PatchOperation, RemoveOperation, ReplaceOperation, TestOperation,
};
use kube::api::{
    ApiResource, DeleteParams, DynamicObject, ListParams, ObjectMeta, Patch, PatchParams, PostParams,
    Preconditions,
};
use kube::{Api, Client};
use serde_json::{Map, Value};
use whereabouts_core::pool::{Allocation, COOLDOWNS_ANNOTATION, PoolSpec};
use whereabouts_k8s::client::{ConnectError, Timeouts, connect};
use whereabouts_k8s::crd::{
    IPPool, IPPoolSpec, NodeSlicePool, OverlappingRangeIPReservation, OverlappingRangeIPReservationSpec,
    ipam_claim_resource,
};
use whereabouts_k8s::k8s_openapi::api::coordination::v1::Lease;
use whereabouts_k8s::k8s_openapi::api::core::v1::Pod;
use whereabouts_k8s::kube;

use crate::lock::{DEFAULT_LOCK_DIR, node_local_lock, queue_path};
use crate::pool_lease::{self, HeldLease};
use crate::{
    Deletion, Reservation, ReservationVersion, ReserveOutcome, Store, StoreError, Version, VersionedPool,
    VersionedReservation,
};

/// Rounds of read-then-precondition on one reservation before giving up (each lost round means
/// another writer changed it in between).
const RESERVATION_ROUNDS: usize = 50;

/// The Kubernetes store over one namespace.
pub struct KubeStore {
    pools: Api<IPPool>,
    /// The same objects, read as JSON: a pool write tests allocations as they were read.
    pools_as_read: Api<DynamicObject>,
    reservations: Api<OverlappingRangeIPReservation>,
    /// Read only: the controller writes them.
    node_slice_pools: Api<NodeSlicePool>,
    /// The pools' Leases, and those this process holds, by pool.
    leases: Api<Lease>,
    /// For pods, in their own namespaces (`sticky_statefulsets`).
    client: Client,
    held_leases: Mutex<HashMap<String, HeldLease>>,
    namespace: String,
    /// The node-local writer queue: its directory, and what tells this cluster, namespace and node
    /// apart from others sharing it (simulated nodes in tests share one machine).
    lock_dir: PathBuf,
    queue_key: (String, String, String),
}

/// An IPPool's resourceVersion as a read (or our own write) saw it, with what a patch from that state
/// tests: the allocations and the cooldowns annotation exactly as the API server sent them.
#[derive(Clone, PartialEq, Eq)]
pub struct ObjectVersion {
    resource_version: String,
    as_read: Arc<PoolAsRead>,
}

impl std::fmt::Debug for ObjectVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("ObjectVersion").field(&self.resource_version).finish()
    }
}

impl ObjectVersion {
    /// The state of `object` (an IPPool as JSON).
    fn of(object: &DynamicObject) -> Self {
        let allocations = match object.data.get("spec").and_then(|spec| spec.get("allocations")) {
            Some(Value::Object(allocations)) => allocations.clone(),
            _ => Map::new(),
        };
        let annotations = AnnotationsAsRead {
            exist: object.metadata.annotations.is_some(),
            cooldowns: object
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(COOLDOWNS_ANNOTATION))
                .cloned(),
        };
        ObjectVersion {
            resource_version: object.metadata.resource_version.clone().unwrap_or_default(),
            as_read: Arc::new(PoolAsRead { allocations, annotations }),
        }
    }
}

/// What a pool patch tests: the allocations and annotations of one state of the IPPool, as JSON.
#[derive(PartialEq, Eq)]
struct PoolAsRead {
    allocations: Map<String, Value>,
    annotations: AnnotationsAsRead,
}

/// What a read saw of the IPPool's annotations: a patch tests the cooldowns annotation against it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AnnotationsAsRead {
    /// Whether `metadata.annotations` exists at all (a patch adds the whole map when it does not).
    pub exist: bool,
    /// The cooldowns annotation's value.
    pub cooldowns: Option<String>,
}

impl std::fmt::Debug for KubeStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeStore").field("namespace", &self.namespace).finish_non_exhaustive()
    }
}

impl KubeStore {
    /// A store over `namespace` through `client` (whose API server is `server`, for the node-local
    /// writer queue).
    pub fn new(client: Client, namespace: &str, server: &str) -> Self {
        KubeStore {
            pools: Api::namespaced(client.clone(), namespace),
            pools_as_read: Api::namespaced_with(
                client.clone(),
                namespace,
                &ApiResource::erase::<IPPool>(&()),
            ),
            reservations: Api::namespaced(client.clone(), namespace),
            node_slice_pools: Api::namespaced(client.clone(), namespace),
            leases: Api::namespaced(client.clone(), namespace),
            client,
            held_leases: Mutex::new(HashMap::new()),
            namespace: namespace.to_string(),
            lock_dir: DEFAULT_LOCK_DIR.into(),
            queue_key: (server.to_string(), namespace.to_string(), String::new()),
        }
    }

    /// Names the node this store writes from, so its writer queue is this node's.
    pub fn with_node(mut self, node: &str) -> Self {
        self.queue_key.2 = node.to_string();
        self
    }

    /// The store the kubeconfig at `path` points to, in its current context's namespace.
    pub async fn connect(path: &Path) -> Result<Self, ConnectError> {
        let connection = connect(path, Timeouts::REQUESTS).await?;
        Ok(KubeStore::new(connection.client, &connection.namespace, &connection.server))
    }

    /// The namespace of the pools and reservations.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    fn pool_location(&self, name: &str) -> String {
        format!("IPPool {}/{name}", self.namespace)
    }

    fn reservation_location(&self, name: &str) -> String {
        format!("OverlappingRangeIPReservation {}/{name}", self.namespace)
    }

    /// `NodeSlicePool <namespace>/<name>`, as errors name it.
    pub fn node_slice_pool_location(&self, name: &str) -> String {
        format!("NodeSlicePool {}/{name}", self.namespace)
    }

    /// What the NodeSlicePool `name` says about node `node` (upstream's plugin reads the same object:
    /// `status.allocations[].sliceRange` of the first entry whose `nodeName` is the node); `None` when
    /// the NodeSlicePool does not exist.
    pub async fn node_slice(
        &self,
        name: &str,
        node: &str,
    ) -> Result<Option<NodeSliceAssignment>, StoreError> {
        let location = self.node_slice_pool_location(name);
        let Some(pool) = self.node_slice_pools.get_opt(name).await.map_err(|e| store_error(&location, e))?
        else {
            return Ok(None);
        };
        let slice = pool
            .status
            .iter()
            .flat_map(|status| &status.allocations)
            .find_map(|a| (!node.is_empty() && a.node_name == node).then(|| a.slice_range.clone()));
        Ok(Some(NodeSliceAssignment { range: pool.spec.range, slice_size: pool.spec.slice_size, slice }))
    }
}

impl KubeStore {
    /// What pod `namespace/name` says about the persistence of its attachment `ifname`; `None` when
    /// the pod does not exist.
    pub async fn pod_persistence(
        &self,
        namespace: &str,
        name: &str,
        ifname: &str,
    ) -> Result<Option<PodPersistence>, StoreError> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        let pod = pods.get_opt(name).await.map_err(|e| store_error(&format!("Pod {namespace}/{name}"), e))?;
        Ok(pod.map(|pod| PodPersistence::of(&pod, ifname)))
    }

    fn claims(&self, namespace: &str) -> Api<DynamicObject> {
        Api::namespaced_with(self.client.clone(), namespace, &ipam_claim_resource())
    }

    /// Whether the IPAMClaim `namespace/name` exists.
    pub async fn claim_exists(&self, namespace: &str, name: &str) -> Result<bool, StoreError> {
        let found = self.claims(namespace).get_opt(name).await;
        Ok(found.map_err(|e| store_error(&format!("IPAMClaim {namespace}/{name}"), e))?.is_some())
    }

    /// Writes the addresses allocated for the IPAMClaim `namespace/name` to its status, with the pod
    /// that holds them (`status.ips`, `status.ownerPod`, as OVN-Kubernetes writes them).
    pub async fn set_claim_status(
        &self,
        namespace: &str,
        name: &str,
        ips: &[String],
        owner_pod: &str,
    ) -> Result<(), StoreError> {
        let patch = serde_json::json!({ "status": { "ips": ips, "ownerPod": owner_pod } });
        let patched =
            self.claims(namespace).patch_status(name, &PatchParams::default(), &Patch::Merge(&patch)).await;
        patched.map(drop).map_err(|e| store_error(&format!("IPAMClaim {namespace}/{name}"), e))
    }
}

/// The annotation in which Multus reads a pod's network selection elements.
const NETWORKS_ANNOTATION: &str = "k8s.v1.cni.cncf.io/networks";

/// What a pod says about the persistence of one of its attachments.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodPersistence {
    /// The StatefulSet owning the pod: its owner reference of kind `StatefulSet` (group `apps`).
    pub statefulset: Option<String>,
    /// The IPAMClaim of the attachment: the `ipam-claim-reference` of its network selection element
    /// in the pod's `k8s.v1.cni.cncf.io/networks` annotation (KubeVirt's ipam-extensions puts it there
    /// for a virtual machine's launcher pod).
    pub ipam_claim: Option<String>,
}

impl PodPersistence {
    /// What `pod` says about its attachment `ifname`.
    pub fn of(pod: &Pod, ifname: &str) -> PodPersistence {
        let statefulset = pod.metadata.owner_references.iter().flatten().find_map(|owner| {
            let apps = owner.api_version.split_once('/').is_some_and(|(group, _)| group == "apps");
            (apps && owner.kind == "StatefulSet").then(|| owner.name.clone())
        });
        let networks = pod.metadata.annotations.as_ref().and_then(|a| a.get(NETWORKS_ANNOTATION));
        PodPersistence { statefulset, ipam_claim: networks.and_then(|n| claim_reference(n, ifname)) }
    }
}

/// The `ipam-claim-reference` of the network selection element (in a `k8s.v1.cni.cncf.io/networks`
/// value) of the attachment `ifname`: the element that requests that interface, else the one Multus
/// names `ifname` by its position (`net1` for the first element without an interface request, as
/// Multus numbers them). The annotation's short form (`ns/name,other`) carries no claims.
fn claim_reference(networks: &str, ifname: &str) -> Option<String> {
    let elements: Vec<Map<String, Value>> = serde_json::from_str(networks).ok()?;
    fn requested(element: &Map<String, Value>) -> Option<&str> {
        element.get("interface").and_then(Value::as_str).filter(|i| !i.is_empty())
    }
    let element = elements.iter().find(|e| requested(e) == Some(ifname)).or_else(|| {
        elements
            .iter()
            .enumerate()
            .find(|(index, e)| requested(e).is_none() && format!("net{}", index + 1) == ifname)
            .map(|(_, e)| e)
    })?;
    element.get("ipam-claim-reference").and_then(Value::as_str).filter(|c| !c.is_empty()).map(str::to_string)
}

/// What a NodeSlicePool says about one node, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSliceAssignment {
    /// `spec.range`: the whole range it slices.
    pub range: String,
    /// `spec.sliceSize`.
    pub slice_size: String,
    /// The node's `sliceRange`, when a slice is assigned to it.
    pub slice: Option<String>,
}

/// The HTTP status of an API error, if the server answered.
fn status_code(error: &kube::Error) -> Option<u16> {
    match error {
        kube::Error::Api(status) => Some(status.code),
        _ => None,
    }
}

/// Maps a client error on `location` to a store error. A 422 is a refused object here; a pool patch
/// maps its 422 (a failed `test`) to a conflict itself.
fn store_error(location: &str, error: kube::Error) -> StoreError {
    match &error {
        kube::Error::Api(status) => {
            let what = format!("{location}: {} ({})", status.message, status.code);
            match status.code {
                401 | 403 => StoreError::Denied(what),
                409 => StoreError::Conflict,
                400 | 422 => StoreError::Rejected(what),
                408 | 429 | 500..=599 => StoreError::Unavailable(what),
                _ => StoreError::Io(what),
            }
        }
        kube::Error::SerdeError(e) => {
            StoreError::Corrupt { location: location.to_string(), reason: e.to_string() }
        }
        kube::Error::Auth(e) => StoreError::Denied(format!("{location}: {e}")),
        // Connection refused or reset, timeouts, TLS handshakes: the server may be back soon.
        _ => StoreError::Unavailable(format!("{location}: {error}")),
    }
}

/// A reservation that kept changing between our read and our precondition.
fn churned(location: &str) -> StoreError {
    StoreError::Unavailable(format!("{location}: changed {RESERVATION_ROUNDS} times while being read"))
}

/// A JSON Pointer to one allocation. Keys are decimal offsets, but keys we could not decode are written
/// back as they were read and may hold anything, so they are escaped (RFC 6901).
fn allocation_path(key: &str) -> PointerBuf {
    PointerBuf::from_tokens(["spec", "allocations", key])
}

fn test_op(path: PointerBuf, value: Value) -> PatchOperation {
    PatchOperation::Test(TestOperation { path, value })
}

/// The cooldowns annotation's value for `spec`.
fn cooldowns_value(spec: &PoolSpec) -> String {
    serde_json::to_string(&spec.cooldowns).unwrap_or_default()
}

/// The patch operations that turn `base`'s release cooldowns into `spec`'s, guarded by a `test` of
/// the annotation as it was read (`annotations`); empty when they are the same.
pub fn cooldowns_patch(
    base: &PoolSpec,
    spec: &PoolSpec,
    annotations: &AnnotationsAsRead,
) -> Vec<PatchOperation> {
    if base.cooldowns == spec.cooldowns {
        return Vec::new();
    }
    let map = PointerBuf::from_tokens(["metadata", "annotations"]);
    let path = PointerBuf::from_tokens(["metadata", "annotations", COOLDOWNS_ANNOTATION]);
    let value = Value::String(cooldowns_value(spec));
    if !annotations.exist {
        let annotations = Value::Object([(COOLDOWNS_ANNOTATION.to_string(), value)].into_iter().collect());
        return vec![
            test_op(map.clone(), Value::Null),
            PatchOperation::Add(AddOperation { path: map, value: annotations }),
        ];
    }
    let read = annotations.cooldowns.clone().map_or(Value::Null, Value::String);
    let change = if spec.cooldowns.is_empty() {
        PatchOperation::Remove(RemoveOperation { path: path.clone() })
    } else {
        PatchOperation::Add(AddOperation { path: path.clone(), value })
    };
    match (&read, &change) {
        // Nothing stored and nothing to store (an unreadable value counted as none): nothing to do.
        (Value::Null, PatchOperation::Remove(_)) => Vec::new(),
        _ => vec![test_op(path, read), change],
    }
}

fn allocation_value(allocation: &Allocation) -> Value {
    serde_json::to_value(allocation).unwrap_or(Value::Null)
}

/// The patch that turns `base`'s allocations into `spec`'s, each change guarded by a `test` of the
/// value it replaces: the allocation's JSON in `as_read` when it is there, else as it serialises. Empty
/// when nothing changed. Every patch also tests `spec.range` (never rewritten): keys are offsets from
/// it, so a pool deleted and created again with another range must not take our keys.
pub fn pool_patch(base: &PoolSpec, spec: &PoolSpec, as_read: &Map<String, Value>) -> Vec<PatchOperation> {
    let read =
        |key: &str, old: &Allocation| as_read.get(key).cloned().unwrap_or_else(|| allocation_value(old));
    let mut ops = Vec::new();
    for (key, old) in &base.allocations {
        let path = allocation_path(key);
        match spec.allocations.get(key) {
            None => {
                ops.push(test_op(path.clone(), read(key, old)));
                ops.push(PatchOperation::Remove(RemoveOperation { path }));
            }
            Some(new) if new != old => {
                ops.push(test_op(path.clone(), read(key, old)));
                ops.push(PatchOperation::Replace(ReplaceOperation { path, value: allocation_value(new) }));
            }
            Some(_) => {}
        }
    }
    for (key, new) in &spec.allocations {
        if !base.allocations.contains_key(key) {
            let path = allocation_path(key);
            // Kubernetes' JSON Patch passes a `null` test on a missing path: "nobody holds it".
            ops.push(test_op(path.clone(), Value::Null));
            ops.push(PatchOperation::Add(AddOperation { path, value: allocation_value(new) }));
        }
    }
    if !ops.is_empty() {
        let range = PointerBuf::from_tokens(["spec", "range"]);
        ops.insert(0, test_op(range, Value::String(base.range.clone())));
    }
    ops
}

impl Store for KubeStore {
    async fn lock_pool(&self, name: &str, deadline: Instant) -> Result<Option<crate::PoolLock>, StoreError> {
        node_local_lock(&self.lock_dir, "kubernetes", (&self.queue_key, name), deadline).await
    }

    fn takes_turns(&self) -> bool {
        true
    }

    async fn take_turn(&self, name: &str, deadline: Instant) -> bool {
        let holder = format!("{}/{}-{:08x}", self.queue_key.2, std::process::id(), fastrand::u32(..));
        let Some(held) = pool_lease::acquire(&self.leases, name, &holder, deadline).await else {
            return false;
        };
        let waited = held.waited;
        self.held_leases.lock().unwrap_or_else(PoisonError::into_inner).insert(name.to_string(), held);
        waited
    }

    async fn end_turn(&self, name: &str) {
        let held = self.held_leases.lock().unwrap_or_else(PoisonError::into_inner).remove(name);
        if let Some(held) = held {
            pool_lease::release(&self.leases, held).await;
        }
    }

    fn queue_dir(&self, name: &str) -> Option<PathBuf> {
        Some(queue_path(&self.lock_dir, "kubernetes", (&self.queue_key, name)).with_extension("queue"))
    }

    async fn read_pool(&self, name: &str) -> Result<Option<VersionedPool>, StoreError> {
        let location = self.pool_location(name);
        let Some(object) = self.pools_as_read.get_opt(name).await.map_err(|e| store_error(&location, e))?
        else {
            return Ok(None);
        };
        let spec_json = object.data.get("spec").cloned().unwrap_or(Value::Null);
        let spec: PoolSpec = serde_json::from_value(spec_json)
            .map_err(|e| StoreError::Corrupt { location, reason: format!("spec: {e}") })?;
        let version = ObjectVersion::of(&object);
        // Ours alone, and only a hint: an unreadable value (a hand edit) counts as no cooldowns.
        let cooldowns = version
            .as_read
            .annotations
            .cooldowns
            .as_deref()
            .and_then(|value| serde_json::from_str(value).ok())
            .unwrap_or_default();
        Ok(Some(VersionedPool { spec: PoolSpec { cooldowns, ..spec }, version: Version::Object(version) }))
    }

    async fn write_pool(
        &self,
        name: &str,
        spec: &PoolSpec,
        base: Option<&VersionedPool>,
        _lock: Option<&crate::PoolLock>,
    ) -> Result<Version, StoreError> {
        let location = self.pool_location(name);
        let Some(base) = base else {
            let annotations = (!spec.cooldowns.is_empty())
                .then(|| [(COOLDOWNS_ANNOTATION.to_string(), cooldowns_value(spec))].into());
            let pool = IPPool {
                metadata: ObjectMeta { name: Some(name.to_string()), annotations, ..ObjectMeta::default() },
                spec: IPPoolSpec { pool: spec.clone() },
            };
            let pool = serde_json::to_value(&pool)
                .and_then(serde_json::from_value::<DynamicObject>)
                .map_err(|e| StoreError::Io(format!("{location}: {e}")))?;
            return match self.pools_as_read.create(&PostParams::default(), &pool).await {
                Ok(created) => Ok(Version::Object(ObjectVersion::of(&created))),
                Err(e) => Err(store_error(&location, e)),
            };
        };
        let Version::Object(read) = &base.version else {
            return Err(base.version.foreign("Kubernetes"));
        };
        let mut ops = pool_patch(&base.spec, spec, &read.as_read.allocations);
        ops.extend(cooldowns_patch(&base.spec, spec, &read.as_read.annotations));
        if ops.is_empty() {
            return Ok(base.version.clone());
        }
        ops.push(PatchOperation::Add(AddOperation {
            path: PointerBuf::from_tokens(["metadata", "managedFields"]),
            value: serde_json::json!([{}]),
        }));
        // Answered as JSON, as read: another writer's odd entry cannot turn a write that landed into an
        // error.
        let patch = Patch::Json::<()>(JsonPatch(ops));
        match self.pools_as_read.patch(name, &PatchParams::default(), &patch).await {
            Ok(patched) => Ok(Version::Object(ObjectVersion::of(&patched))),
            // A failed `test` (someone changed an allocation we change), or the pool was deleted since it
            // was read: the next read sees which.
            Err(e) if matches!(status_code(&e), Some(404 | 409 | 422)) => Err(StoreError::Conflict),
            Err(e) => Err(store_error(&location, e)),
        }
    }

    async fn create_reservation(
        &self,
        name: &str,
        owner: &Reservation,
    ) -> Result<ReserveOutcome, StoreError> {
        let location = self.reservation_location(name);
        let wanted = OverlappingRangeIPReservation {
            metadata: ObjectMeta { name: Some(name.to_string()), ..ObjectMeta::default() },
            spec: OverlappingRangeIPReservationSpec { holder: owner.clone() },
        };
        for _ in 0..RESERVATION_ROUNDS {
            match self.reservations.create(&PostParams::default(), &wanted).await {
                Ok(_) => return Ok(ReserveOutcome::Reserved),
                Err(e) if status_code(&e) == Some(409) => {}
                Err(e) => return Err(store_error(&location, e)),
            }
            let Some(mut existing) =
                self.reservations.get_opt(name).await.map_err(|e| store_error(&location, e))?
            else {
                continue;
            };
            let holder = &existing.spec.holder;
            if !holder.same_owner(owner) {
                return Ok(ReserveOutcome::HeldBy(holder.clone()));
            }
            if holder.container_id == owner.container_id || owner.container_id.is_empty() {
                return Ok(ReserveOutcome::Reserved);
            }
            // The same attachment under a new sandbox: take it over, if it is still what we read.
            existing.spec.holder.container_id.clone_from(&owner.container_id);
            match self.reservations.replace(name, &PostParams::default(), &existing).await {
                Ok(_) => return Ok(ReserveOutcome::Reserved),
                Err(e) if matches!(status_code(&e), Some(404 | 409)) => {}
                Err(e) => return Err(store_error(&location, e)),
            }
        }
        Err(churned(&location))
    }

    async fn read_reservation(&self, name: &str) -> Result<Option<VersionedReservation>, StoreError> {
        let found = self
            .reservations
            .get_opt(name)
            .await
            .map_err(|e| store_error(&self.reservation_location(name), e))?;
        Ok(found.as_ref().map(versioned))
    }

    async fn delete_reservation(
        &self,
        name: &str,
        as_read: &ReservationVersion,
    ) -> Result<Deletion, StoreError> {
        let precondition = DeleteParams {
            preconditions: Some(Preconditions {
                uid: Some(as_read.uid.clone()),
                resource_version: Some(as_read.revision.clone()),
            }),
            ..DeleteParams::default()
        };
        match self.reservations.delete(name, &precondition).await {
            Ok(_) => Ok(Deletion::Deleted),
            Err(e) if status_code(&e) == Some(404) => Ok(Deletion::Deleted),
            // A failed precondition: another uid or resourceVersion than the one read.
            Err(e) if status_code(&e) == Some(409) => Ok(Deletion::Changed),
            Err(e) => Err(store_error(&self.reservation_location(name), e)),
        }
    }

    async fn list_pools(&self) -> Result<Vec<String>, StoreError> {
        let list = self
            .pools
            .list_metadata(&ListParams::default())
            .await
            .map_err(|e| store_error(&format!("IPPools in {}", self.namespace), e))?;
        Ok(list.items.into_iter().filter_map(|p| p.metadata.name).collect())
    }

    async fn list_reservations(&self) -> Result<Vec<(String, VersionedReservation)>, StoreError> {
        let list =
            self.reservations.list(&ListParams::default()).await.map_err(|e| {
                store_error(&format!("OverlappingRangeIPReservations in {}", self.namespace), e)
            })?;
        Ok(list.items.iter().filter_map(|r| Some((r.metadata.name.clone()?, versioned(r)))).collect())
    }
}

/// A reservation object as read: its holder, and its uid and resourceVersion, which a delete decided on
/// this reading presents as preconditions.
pub fn versioned(reservation: &OverlappingRangeIPReservation) -> VersionedReservation {
    VersionedReservation {
        holder: reservation.spec.holder.clone(),
        version: ReservationVersion {
            uid: reservation.metadata.uid.clone().unwrap_or_default(),
            revision: reservation.metadata.resource_version.clone().unwrap_or_default(),
        },
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_claim_of_an_attachment_is_found_by_interface_or_position() {
        let networks = r#"[
            {"name": "blue", "namespace": "vms", "ipam-claim-reference": "vm1.blue"},
            {"name": "red", "interface": "eth7", "ipam-claim-reference": "vm1.red"},
            {"name": "green"}
        ]"#;
        assert_eq!(claim_reference(networks, "net1").as_deref(), Some("vm1.blue"));
        assert_eq!(claim_reference(networks, "eth7").as_deref(), Some("vm1.red"));
        assert_eq!(claim_reference(networks, "net2"), None, "the second element requests eth7");
        assert_eq!(claim_reference(networks, "net3"), None, "no claim");
        assert_eq!(claim_reference("vms/blue,red", "net1"), None, "the short form");
    }

    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn allocation(id: &str) -> Allocation {
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

    fn spec(entries: &[(&str, &str)]) -> PoolSpec {
        PoolSpec {
            range: "10.0.0.0/24".into(),
            allocations: entries
                .iter()
                .map(|(k, id)| (k.to_string(), allocation(id)))
                .collect::<BTreeMap<_, _>>(),
            ..Default::default()
        }
    }

    fn ops_json(ops: Vec<PatchOperation>) -> Value {
        serde_json::to_value(JsonPatch(ops)).unwrap()
    }

    #[test]
    fn an_unchanged_pool_needs_no_patch() {
        assert!(pool_patch(&spec(&[("1", "a")]), &spec(&[("1", "a")]), &Map::new()).is_empty());
    }

    #[test]
    fn every_change_is_guarded_by_a_test_of_what_it_replaces() {
        let base = spec(&[("1", "a"), ("2", "b")]);
        let next = spec(&[("2", "b2"), ("3", "c")]);
        let a = allocation_value(&allocation("a"));
        let b = allocation_value(&allocation("b"));
        let b2 = allocation_value(&allocation("b2"));
        let c = allocation_value(&allocation("c"));
        assert_eq!(
            ops_json(pool_patch(&base, &next, &Map::new())),
            serde_json::json!([
                {"op": "test", "path": "/spec/range", "value": "10.0.0.0/24"},
                {"op": "test", "path": "/spec/allocations/1", "value": a},
                {"op": "remove", "path": "/spec/allocations/1"},
                {"op": "test", "path": "/spec/allocations/2", "value": b},
                {"op": "replace", "path": "/spec/allocations/2", "value": b2},
                {"op": "test", "path": "/spec/allocations/3", "value": null},
                {"op": "add", "path": "/spec/allocations/3", "value": c},
            ])
        );
    }

    /// Applies `ops` as the API server does: a `null` test passes on a missing path (RFC 6902 and the
    /// json-patch crate would fail it), everything else per RFC 6902.
    fn apply_as_kubernetes(doc: &mut Value, ops: Vec<PatchOperation>) -> Result<(), json_patch::PatchError> {
        let ops = ops
            .into_iter()
            .filter(|op| match op {
                PatchOperation::Test(t) if t.value.is_null() => t.path.resolve(doc).is_ok(),
                _ => true,
            })
            .collect();
        json_patch::patch(doc, &JsonPatch(ops))
    }

    fn doc(spec: &PoolSpec) -> Value {
        serde_json::json!({ "spec": spec })
    }

    fn arb_spec() -> impl Strategy<Value = PoolSpec> {
        proptest::collection::btree_map("[0-9]{1,3}|[a-z/~]{1,4}", "[a-c]", 0..8).prop_map(|entries| {
            PoolSpec {
                range: "10.0.0.0/24".into(),
                allocations: entries.into_iter().map(|(k, id)| (k, allocation(&id))).collect(),
                ..Default::default()
            }
        })
    }

    proptest! {
        /// The patch turns the pool as read into the pool as wanted.
        #[test]
        fn the_patch_turns_base_into_spec(base in arb_spec(), spec in arb_spec()) {
            let mut stored = doc(&base);
            apply_as_kubernetes(&mut stored, pool_patch(&base, &spec, &Map::new())).unwrap();
            prop_assert_eq!(stored, doc(&spec));
        }

        /// A patch fails when any allocation it changes was changed by someone else since it was read,
        /// and applies when only other allocations changed (the other writer's changes are kept).
        #[test]
        fn the_patch_compares_exactly_the_keys_it_changes(
            base in arb_spec(),
            spec in arb_spec(),
            other_key in "[0-9]{1,3}",
        ) {
            let ops = pool_patch(&base, &spec, &Map::new());
            let touched = base.allocations.get(&other_key) != spec.allocations.get(&other_key);
            let mut concurrent = base.clone();
            let changed_to = allocation("z");
            concurrent.allocations.insert(other_key.clone(), changed_to.clone());
            let mut stored = doc(&concurrent);
            let result = apply_as_kubernetes(&mut stored, ops);
            prop_assert_eq!(result.is_err(), touched);
            if !touched {
                prop_assert_eq!(&stored["spec"]["allocations"][&other_key], &allocation_value(&changed_to));
            }
        }
    }

    #[test]
    fn tests_use_the_allocation_as_read() {
        let as_read = serde_json::json!({"1": {"id": "a", "podref": "ns/a", "ifname": "eth0", "node": null}});
        let Value::Object(as_read) = as_read else { unreachable!() };
        let ops = ops_json(pool_patch(&spec(&[("1", "a")]), &spec(&[]), &as_read));
        assert_eq!(ops[1]["value"], as_read["1"]);
    }

    #[test]
    fn odd_keys_are_escaped_as_json_pointers() {
        assert_eq!(allocation_path("a/b~c").as_str(), "/spec/allocations/a~1b~0c");
        let ops = pool_patch(&spec(&[]), &spec(&[("x/y", "a")]), &Map::new());
        assert_eq!(ops_json(ops)[2]["path"], "/spec/allocations/x~1y");
    }
}
