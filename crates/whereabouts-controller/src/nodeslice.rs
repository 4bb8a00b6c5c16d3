//! The node-slice controller: keeps one NodeSlicePool per whereabouts network with `node_slice_size`,
//! assigning each node a slice of the network's first range ([`whereabouts_core::slice::assign_slices`]).
//!
//! Every reconcile looks at the whole picture (NetworkAttachmentDefinitions of every namespace, Nodes,
//! the NodeSlicePools and IPPools of the whereabouts namespace) and writes each NodeSlicePool that is not
//! as it should be, by compare-and-swap. [`run`] reconciles on every change, debounced, and every minute.
//!
//! Differences from upstream's controller, on purpose:
//! * NADs of one network that disagree (first range, slice size) do not block every network: the oldest
//!   wins and the others get a Warning Event.
//! * A departed node's slice is freed only once its pool of the slice is empty, and re-slicing never
//!   hands a busy slice's addresses to another node (upstream frees and reshuffles at once, which can
//!   give one address to two pods). The per-node IPPools holding allocations count too, whatever the
//!   NodeSlicePool says: one deleted, lost or recreated with its NAD keeps each busy slice with its node.
//! * IPv6 works; nodes left without a slice get a Warning Event.
//! * Owner references only name NADs of the whereabouts namespace (they cannot cross namespaces: the
//!   garbage collector would delete the pool); NodeSlicePools are also labelled as managed here, and
//!   deleted by this controller when no NAD wants them any more.
//! * Label selectors ([`Settings`]) may narrow the Nodes that take slices (say, those with the secondary
//!   interface: others would hold a slice they never use) and the NADs that are sliced.
//! * NodeSlicePools and IPPools are decoded one by one: one the types cannot read (no `spec`, which the
//!   CRDs allow) gets a Warning Event, once per change of it, and the rest is sliced.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, ListParams, PostParams, Preconditions};
use kube::core::PartialObjectMeta;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};
use thiserror::Error;
use whereabouts_core::range::pool_name;
use whereabouts_core::slice::{
    SliceAssignment, Slicing, assign_slices, holders_from_pools, parse_slice_size,
};
use whereabouts_k8s::crd::{
    IPPool, NodeSliceAllocation, NodeSlicePool, NodeSlicePoolSpec, NodeSlicePoolStatus,
};

use crate::Context;
use crate::metrics::{SliceLabels, SliceState};
use crate::nad::{FlatFile, NadConfig};
use crate::pools::{Undecodable, decode};

/// The name the controller reports Events under.
pub const COMPONENT: &str = "whereabouts-controller";

/// The label marking NodeSlicePools this controller manages (with its value [`COMPONENT`]).
pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";

const NAD_API_VERSION: &str = "k8s.cni.cncf.io/v1";
const NAD_KIND: &str = "NetworkAttachmentDefinition";

/// Compare-and-swap attempts per NodeSlicePool and reconcile.
const WRITE_ATTEMPTS: usize = 5;

/// How long [`run`] gathers changes before reconciling, so a burst of node joins is one reconcile.
const DEBOUNCE: Duration = Duration::from_millis(100);

/// How often [`run`] reconciles without any change seen.
const RESYNC: Duration = Duration::from_secs(60);

/// The longest wait before [`run`] retries a failed reconcile.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// The NetworkAttachmentDefinition resource (Multus's CRD), for dynamic access.
pub fn nad_resource() -> ApiResource {
    ApiResource {
        group: "k8s.cni.cncf.io".into(),
        version: "v1".into(),
        api_version: NAD_API_VERSION.into(),
        kind: NAD_KIND.into(),
        plural: "network-attachment-definitions".into(),
    }
}

/// What the node-slice controller works from, beside the [`Context`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Settings {
    /// Merged into every NAD's configuration.
    pub flat_file: Option<FlatFile>,
    /// A label selector of the Nodes that take slices; `None`: every Node. A node that stops matching
    /// is treated as departed: its slice is freed once its pool of the slice is empty.
    pub node_selector: Option<String>,
    /// A label selector of the NetworkAttachmentDefinitions that are sliced; `None`: every one. The
    /// NodeSlicePools that no selected NAD wants are deleted, as those of deleted NADs.
    pub nad_selector: Option<String>,
}

/// A list or watch of what `selector` selects (everything when `None`).
fn listing(selector: &Option<String>) -> ListParams {
    ListParams { label_selector: selector.clone(), ..ListParams::default() }
}

fn watching(selector: &Option<String>) -> watcher::Config {
    watcher::Config { label_selector: selector.clone(), ..watcher::Config::default() }
}

/// Why a reconcile failed.
#[derive(Debug, Error)]
pub enum Error {
    /// Listing one of the inputs failed: nothing was decided.
    #[error("listing {what}: {source}")]
    List {
        /// What was listed.
        what: &'static str,
        /// The API error.
        source: kube::Error,
    },
    /// Reading, writing or deleting a NodeSlicePool failed.
    #[error("NodeSlicePool {name}: {source}")]
    Write {
        /// The NodeSlicePool.
        name: String,
        /// The API error.
        source: kube::Error,
    },
    /// Every compare-and-swap attempt lost a race.
    #[error("NodeSlicePool {name}: still conflicting after {WRITE_ATTEMPTS} attempts")]
    Contended {
        /// The NodeSlicePool.
        name: String,
    },
}

/// What a reconcile did (or, in a dry run, would have done).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// NodeSlicePools created or updated.
    pub written: Vec<String>,
    /// NodeSlicePools that were already right.
    pub unchanged: Vec<String>,
    /// NodeSlicePools deleted, no NAD wanting them any more.
    pub deleted: Vec<String>,
    /// Nodes that got no slice, by NodeSlicePool.
    pub unassigned: BTreeMap<String, Vec<String>>,
    /// NADs (`<namespace>/<name>`) overruled by an older NAD of the same network that slices otherwise.
    pub overruled: Vec<String>,
    /// NodeSlicePool writes that failed, with why (retried with a growing delay); the rest was done.
    pub failed: Vec<String>,
    /// NADs whose configuration could not be loaded, with why (a missing flat file, say). Not retried
    /// before they or the flat file change (the next change seen, or the minutely reconcile), and
    /// nothing is deleted meanwhile: they may still want their NodeSlicePool.
    pub unloadable: Vec<String>,
    /// Objects that do not decode (`<kind> <name>`): IPPools are left out, NodeSlicePools taken as
    /// having no spec (see [`readable_part`]).
    pub unreadable: Vec<String>,
}

/// The Event reason of an object that does not decode.
const UNREADABLE: &str = "UnreadableObject";

/// What is done about an IPPool that does not decode. It has no `spec` (the CRD requires `range` in
/// one, and `id` and `podref` in every allocation, which is all the types require), so it holds no
/// allocations: no slice is busy because of it.
const UNREADABLE_IP_POOL: &str = "left out of node slicing (without a spec it holds no allocations)";

/// What is done about a NodeSlicePool that does not decode ([`readable_part`]).
const UNREADABLE_SLICE_POOL: &str =
    "taken as having no spec: rewritten if a NetworkAttachmentDefinition wants it, its readable status kept";

/// What was reported, so that each problem is reported once per change, not on every reconcile.
#[derive(Debug, Default)]
struct Reported {
    /// The objects found unreadable, by (kind, name), with the resourceVersion each was reported at.
    unreadable: BTreeMap<(String, String), Option<String>>,
    /// Why NADs could not be loaded.
    unloadable: BTreeSet<String>,
}

/// One whereabouts NAD with node slices.
struct SlicedNad {
    namespace: String,
    name: String,
    uid: String,
    config: NadConfig,
    slicing: Slicing,
}

impl SlicedNad {
    fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    fn reference(&self) -> ObjectReference {
        ObjectReference {
            api_version: Some(NAD_API_VERSION.into()),
            kind: Some(NAD_KIND.into()),
            namespace: Some(self.namespace.clone()),
            name: Some(self.name.clone()),
            uid: Some(self.uid.clone()),
            ..ObjectReference::default()
        }
    }

    fn owner_reference(&self, controller: bool) -> OwnerReference {
        OwnerReference {
            api_version: NAD_API_VERSION.into(),
            kind: NAD_KIND.into(),
            name: self.name.clone(),
            uid: self.uid.clone(),
            controller: controller.then_some(true),
            block_owner_deletion: controller.then_some(true),
        }
    }
}

/// The NADs of one NodeSlicePool, oldest first, and those of them that slice as the oldest does.
struct Network {
    nads: Vec<SlicedNad>,
}

impl Network {
    fn winner(&self) -> &SlicedNad {
        &self.nads[0]
    }

    fn agreeing(&self) -> impl Iterator<Item = &SlicedNad> {
        self.nads.iter().filter(|n| n.slicing == self.winner().slicing)
    }
}

/// Reconciles every NodeSlicePool once (see the module documentation).
pub async fn reconcile_all(ctx: &Context, settings: &Settings) -> Result<Summary, Error> {
    let recorder = Recorder::new(ctx.client.clone(), reporter());
    let inputs = Inputs::list(ctx, settings).await?;
    Ok(reconcile_with(ctx, settings, &recorder, &mut Reported::default(), inputs).await)
}

fn reporter() -> Reporter {
    Reporter { controller: COMPONENT.into(), instance: std::env::var("POD_NAME").ok() }
}

/// What an IPPool means to node slicing: whether it holds allocations, and of which range.
#[derive(Debug, Clone)]
enum IpPoolView {
    /// Holds no allocations.
    Idle,
    /// Holds allocations; its `spec.range`.
    Busy(String),
    /// Does not decode (see [`UNREADABLE_IP_POOL`]).
    Unreadable(Undecodable),
}

impl IpPoolView {
    fn of(object: DynamicObject) -> Self {
        match decode::<IPPool>(&ApiResource::erase::<IPPool>(&()).kind, object) {
            Ok((_, pool)) if pool.spec.pool.allocations.is_empty() => IpPoolView::Idle,
            Ok((_, pool)) => IpPoolView::Busy(pool.spec.pool.range),
            Err(bad) => IpPoolView::Unreadable(bad),
        }
    }
}

/// Equal when slicing would not tell them apart: an IPPool's allocations coming and going leave it
/// busy, and are no reason to reconcile (under churn they change many times a second).
impl PartialEq for IpPoolView {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (IpPoolView::Idle, IpPoolView::Idle) => true,
            (IpPoolView::Busy(a), IpPoolView::Busy(b)) => a == b,
            (IpPoolView::Unreadable(a), IpPoolView::Unreadable(b)) => {
                a.object.resource_version() == b.object.resource_version()
            }
            _ => false,
        }
    }
}

/// What a reconcile decides from: the NADs and Nodes its selectors select, and the NodeSlicePools and
/// IPPools of the whereabouts namespace, by name.
#[derive(Debug, Clone, Default)]
struct Inputs {
    nads: BTreeMap<String, DynamicObject>,
    nodes: BTreeMap<String, ()>,
    slice_pools: BTreeMap<String, DynamicObject>,
    ip_pools: BTreeMap<String, IpPoolView>,
}

impl Inputs {
    /// Lists them from the API server (a one-off reconcile: [`reconcile_all`]).
    async fn list(ctx: &Context, settings: &Settings) -> Result<Inputs, Error> {
        let list = |what| move |source| Error::List { what, source };
        let raw = |resource: &ApiResource| {
            Api::<DynamicObject>::namespaced_with(ctx.client.clone(), &ctx.namespace, resource)
        };
        let nads = Api::<DynamicObject>::all_with(ctx.client.clone(), &nad_resource())
            .list(&listing(&settings.nad_selector))
            .await
            .map_err(list("NetworkAttachmentDefinitions"))?;
        let nodes = Api::<Node>::all(ctx.client.clone())
            .list_metadata(&listing(&settings.node_selector))
            .await
            .map_err(list("Nodes"))?;
        let slice_pools = raw(&ApiResource::erase::<NodeSlicePool>(&()))
            .list(&ListParams::default())
            .await
            .map_err(list("NodeSlicePools"))?;
        let ip_pools = raw(&ApiResource::erase::<IPPool>(&()))
            .list(&ListParams::default())
            .await
            .map_err(list("IPPools"))?;
        Ok(Inputs {
            nads: nads.items.into_iter().map(|nad| (key_of(&nad), nad)).collect(),
            nodes: nodes.items.iter().map(|node| (node.name_any(), ())).collect(),
            slice_pools: slice_pools.items.into_iter().map(|pool| (pool.name_any(), pool)).collect(),
            ip_pools: ip_pools
                .items
                .into_iter()
                .map(|pool| (pool.name_any(), IpPoolView::of(pool)))
                .collect(),
        })
    }
}

/// An object's key among those of its kind: `<namespace>/<name>`, or its name when cluster-scoped.
fn key_of(object: &impl Resource) -> String {
    match object.meta().namespace.as_deref() {
        Some(namespace) => format!("{namespace}/{}", object.name_any()),
        None => object.name_any(),
    }
}

async fn reconcile_with(
    ctx: &Context,
    settings: &Settings,
    recorder: &Recorder,
    reported: &mut Reported,
    inputs: Inputs,
) -> Summary {
    ctx.metrics.node_slice_reconciles.inc();
    let nodes: BTreeSet<String> = inputs.nodes.into_keys().collect();
    let slice_pools: Api<NodeSlicePool> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    // Decoded one by one: an object the types cannot read must not stop the slicing of every network.
    let slice_pool_kind = ApiResource::erase::<NodeSlicePool>(&()).kind;
    let (mut existing, mut unreadable_slice_pools) = (BTreeMap::new(), Vec::new());
    for object in inputs.slice_pools.into_values() {
        match decode::<NodeSlicePool>(&slice_pool_kind, object) {
            Ok((name, pool)) => {
                existing.insert(name, pool);
            }
            Err(bad) => unreadable_slice_pools.push(bad),
        }
    }
    let (mut busy_pools, mut unreadable_ip_pools) = (BTreeMap::new(), Vec::new());
    for (name, view) in inputs.ip_pools {
        match view {
            IpPoolView::Idle => {}
            IpPoolView::Busy(range) => {
                busy_pools.insert(name, range);
            }
            IpPoolView::Unreadable(bad) => unreadable_ip_pools.push(bad),
        }
    }
    let mut summary = Summary::default();
    let unreadable = [
        (ApiResource::erase::<NodeSlicePool>(&()), unreadable_slice_pools.as_slice(), UNREADABLE_SLICE_POOL),
        (ApiResource::erase::<IPPool>(&()), unreadable_ip_pools.as_slice(), UNREADABLE_IP_POOL),
    ];
    report_unreadable(ctx, recorder, reported, unreadable, &mut summary).await;
    existing.extend(unreadable_slice_pools.iter().map(|bad| (bad.name.clone(), readable_part(&bad.object))));

    let networks =
        group(inputs.nads.into_values().collect(), settings.flat_file.as_ref(), reported, &mut summary);
    for network in networks.values() {
        for loser in network.nads.iter().filter(|n| n.slicing != network.winner().slicing) {
            let why = format!(
                "it slices {} into /{} while the older NetworkAttachmentDefinition {} of the same network \
                 slices {} into /{}: the older one is used",
                loser.slicing.range().describe(),
                loser.slicing.size(),
                network.winner().key(),
                network.winner().slicing.range().describe(),
                network.winner().slicing.size(),
            );
            tracing::warn!(nad = %loser.key(), "node slices: {why}");
            publish(ctx, recorder, &loser.reference(), "ConflictingNodeSlices", why).await;
            summary.overruled.push(loser.key());
        }
    }
    for (name, network) in &networks {
        let current = existing.get(name).cloned();
        match write_pool(ctx, &slice_pools, name, network, &nodes, current, &busy_pools).await {
            Ok((written, assignment)) => {
                record_gauges(ctx, name, &assignment);
                if written {
                    summary.written.push(name.clone())
                } else {
                    summary.unchanged.push(name.clone())
                }
                if !assignment.unassigned.is_empty() {
                    let why = format!(
                        "no free slice of {} for node(s) {}",
                        network.winner().slicing.range().describe(),
                        assignment.unassigned.join(", ")
                    );
                    tracing::warn!(pool = %name, "node slices: {why}");
                    publish(ctx, recorder, &network.winner().reference(), "NoFreeNodeSlice", why).await;
                    summary.unassigned.insert(name.clone(), assignment.unassigned);
                }
            }
            Err(e) => {
                tracing::warn!("node slices: {e}");
                summary.failed.push(e.to_string());
            }
        }
    }
    // A NAD that could not be loaded may still want its NodeSlicePool: delete nothing this time.
    if summary.failed.is_empty() && summary.unloadable.is_empty() {
        for (name, pool) in
            existing.iter().filter(|(name, pool)| !networks.contains_key(*name) && managed(pool))
        {
            match delete_pool(ctx, &slice_pools, name, pool).await {
                Ok(true) => summary.deleted.push(name.clone()),
                Ok(false) => {}
                Err(e) => summary.failed.push(e.to_string()),
            }
        }
    }
    summary
}

/// The whereabouts NADs with node slices, by NodeSlicePool name, oldest first; NADs that cannot be
/// loaded are listed in `summary.unloadable`, and logged unless `reported` already was.
fn group(
    nads: Vec<DynamicObject>,
    flat: Option<&FlatFile>,
    reported: &mut Reported,
    summary: &mut Summary,
) -> BTreeMap<String, Network> {
    let mut loaded: Vec<(Option<k8s_openapi::jiff::Timestamp>, SlicedNad)> = Vec::new();
    for nad in nads {
        let (namespace, name) = (nad.namespace().unwrap_or_default(), nad.name_any());
        let key = format!("{namespace}/{name}");
        let text = nad.data.get("spec").and_then(|s| s.get("config")).and_then(|c| c.as_str());
        let sliced = crate::nad::load(&key, text, flat).map_err(|e| e.to_string()).and_then(|config| {
            let Some(config) = config else { return Ok(None) };
            let slicing =
                config.ipam.node_slicing().map_err(|e| format!("NetworkAttachmentDefinition {key}: {e}"))?;
            Ok(slicing.map(|slicing| (config, slicing)))
        });
        match sliced {
            Ok(Some((config, slicing))) => {
                let created = nad.metadata.creation_timestamp.as_ref().map(|t| t.0);
                let uid = nad.uid().unwrap_or_default();
                loaded.push((created, SlicedNad { namespace, name, uid, config, slicing }));
            }
            Ok(None) => {}
            Err(e) => {
                if !reported.unloadable.contains(&e) {
                    tracing::warn!("node slices: {e}");
                }
                summary.unloadable.push(e);
            }
        }
    }
    reported.unloadable = summary.unloadable.iter().cloned().collect();
    loaded.sort_by(|(a, x), (b, y)| (a, &x.namespace, &x.name).cmp(&(b, &y.namespace, &y.name)));
    let mut networks: BTreeMap<String, Network> = BTreeMap::new();
    for (_, nad) in loaded {
        let name = nad.config.slice_pool_name().to_string();
        networks.entry(name).or_insert_with(|| Network { nads: Vec::new() }).nads.push(nad);
    }
    networks
}

/// Reports the objects that do not decode, each with what is done about it, as a warning and a Warning
/// Event on the object; those `reported` already at their current resourceVersion only in `summary`.
async fn report_unreadable(
    ctx: &Context,
    recorder: &Recorder,
    reported: &mut Reported,
    unreadable: [(ApiResource, &[Undecodable], &str); 2],
    summary: &mut Summary,
) {
    let mut now = BTreeMap::new();
    for (resource, objects, consequence) in unreadable {
        for bad in objects {
            summary.unreadable.push(format!("{} {}", bad.kind, bad.name));
            let key = (bad.kind.clone(), bad.name.clone());
            let version = bad.object.resource_version();
            if reported.unreadable.get(&key) != Some(&version) {
                let why = format!("{bad}: {consequence}");
                tracing::warn!("node slices: {why}");
                publish(ctx, recorder, &bad.object.object_ref(&resource), UNREADABLE, why).await;
            }
            now.insert(key, version);
        }
    }
    reported.unreadable = now;
}

/// A NodeSlicePool that does not decode, as far as it can be read: its metadata, and its status when
/// that decodes; its spec empty. Whatever a NAD wants then differs from it and is written over it, by
/// compare-and-swap on its resourceVersion (repairing it), while the slices its status assigns stay
/// with their nodes; one no NAD wants is deleted if this controller manages it, as any other.
fn readable_part(object: &DynamicObject) -> NodeSlicePool {
    let spec = NodeSlicePoolSpec { range: String::new(), slice_size: String::new() };
    let mut pool = NodeSlicePool::new("", spec);
    pool.metadata = object.metadata.clone();
    pool.status = object.data.get("status").and_then(|status| serde_json::from_value(status.clone()).ok());
    pool
}

/// Reads the NodeSlicePool `name` as [`reconcile_with`] lists it: one that does not decode as far as
/// it can be read ([`readable_part`]).
async fn read_slice_pool(ctx: &Context, name: &str) -> Result<Option<NodeSlicePool>, kube::Error> {
    let resource = ApiResource::erase::<NodeSlicePool>(&());
    let api: Api<DynamicObject> = Api::namespaced_with(ctx.client.clone(), &ctx.namespace, &resource);
    Ok(api.get_opt(name).await?.map(|object| match decode::<NodeSlicePool>(&resource.kind, object) {
        Ok((_, pool)) => pool,
        Err(bad) => readable_part(&bad.object),
    }))
}

/// Whether this controller manages a NodeSlicePool: labelled so, or owned by a NAD (as upstream's are).
fn managed(pool: &NodeSlicePool) -> bool {
    pool.labels().get(MANAGED_BY).is_some_and(|v| v == COMPONENT)
        || pool.owner_references().iter().any(|o| o.kind == NAD_KIND && o.api_version == NAD_API_VERSION)
}

/// The NodeSlicePool `name` as `network` wants it, given the one stored (`current`, `None` if absent)
/// and the IPPools holding allocations (`busy_pools`, name → `spec.range`).
///
/// The previous assignment is what `current`'s status says, and also every (node, slice) a per-node
/// IPPool holding allocations tells of, of the configured layout or of `current`'s: a NodeSlicePool
/// deleted, lost or recreated with its NAD has forgotten them, and a node that took such a slice over
/// would allocate addresses still in use. Those pools are busy, so their slices stay with their node.
fn desired(
    ctx: &Context,
    name: &str,
    network: &Network,
    nodes: &BTreeSet<String>,
    current: Option<&NodeSlicePool>,
    busy_pools: &BTreeMap<String, String>,
) -> (NodeSlicePool, SliceAssignment) {
    let winner = network.winner();
    let mut previous: Vec<(ipnet::IpNet, String)> = current
        .and_then(|p| p.status.as_ref())
        .map(|s| s.allocations.as_slice())
        .unwrap_or_default()
        .iter()
        .filter(|a| !a.node_name.is_empty())
        .filter_map(|a| a.slice_range.trim().parse().ok().map(|slice| (slice, a.node_name.clone())))
        .collect();
    let mut layouts = vec![(winner.slicing.range().network(), winner.slicing.size())];
    let stored_layout = current.and_then(|p| {
        let network = p.spec.range.trim().parse::<ipnet::IpNet>().ok()?;
        Some((network, parse_slice_size(&p.spec.slice_size).ok()?))
    });
    layouts.extend(stored_layout);
    // The NADs of one NodeSlicePool may name their pools differently: `network_name` set, or empty
    // with the CNI network name as the NodeSlicePool's name.
    let prefixes: BTreeSet<&str> = network.agreeing().map(|n| n.config.ipam.network_name.as_str()).collect();
    let mut listed: BTreeSet<(ipnet::IpNet, String)> = previous.iter().cloned().collect();
    for prefix in &prefixes {
        let pools = busy_pools.iter().map(|(name, range)| (name.as_str(), range.as_str()));
        for pair in holders_from_pools(prefix, &layouts, pools) {
            if listed.insert(pair.clone()) {
                previous.push(pair);
            }
        }
    }
    // A node's pool of a slice is busy when it holds allocations.
    let busy = |node: &str, slice: &ipnet::IpNet| {
        prefixes.iter().any(|prefix| busy_pools.contains_key(&pool_name(prefix, Some(node), slice)))
    };
    let assignment = assign_slices(&winner.slicing, &previous, nodes, busy);
    let spec = NodeSlicePoolSpec {
        range: winner.slicing.range().network().to_string(),
        slice_size: winner.config.ipam.node_slice_size.clone().unwrap_or_default(),
    };
    let mut pool = current.cloned().unwrap_or_else(|| NodeSlicePool::new(name, spec.clone()));
    pool.spec = spec;
    pool.status = Some(NodeSlicePoolStatus {
        allocations: assignment
            .slices
            .iter()
            .map(|(slice, node)| NodeSliceAllocation {
                node_name: node.clone().unwrap_or_default(),
                slice_range: slice.to_string(),
            })
            .collect(),
    });
    let meta = pool.meta_mut();
    meta.namespace = Some(ctx.namespace.clone());
    meta.labels.get_or_insert_default().insert(MANAGED_BY.into(), COMPONENT.into());
    // Foreign owners stay; NAD owners are the agreeing NADs of this namespace, the oldest the controller.
    let mut owners: Vec<OwnerReference> =
        meta.owner_references.take().unwrap_or_default().into_iter().filter(|o| o.kind != NAD_KIND).collect();
    let local = network.agreeing().filter(|n| n.namespace == ctx.namespace);
    owners.extend(local.enumerate().map(|(i, nad)| nad.owner_reference(i == 0 && nad.uid == winner.uid)));
    meta.owner_references = (!owners.is_empty()).then_some(owners);
    (pool, assignment)
}

/// Brings the NodeSlicePool `name` to what `network` wants, by compare-and-swap. Whether it was (or
/// would have been) written, and the assignment.
async fn write_pool(
    ctx: &Context,
    api: &Api<NodeSlicePool>,
    name: &str,
    network: &Network,
    nodes: &BTreeSet<String>,
    mut current: Option<NodeSlicePool>,
    busy_pools: &BTreeMap<String, String>,
) -> Result<(bool, SliceAssignment), Error> {
    let failed = |source| Error::Write { name: name.to_string(), source };
    for attempt in 0..WRITE_ATTEMPTS {
        if attempt > 0 {
            current = read_slice_pool(ctx, name).await.map_err(failed)?;
        }
        let (pool, assignment) = desired(ctx, name, network, nodes, current.as_ref(), busy_pools);
        if current.as_ref() == Some(&pool) {
            return Ok((false, assignment));
        }
        if ctx.dry_run {
            let held: Vec<String> = pool
                .status
                .iter()
                .flat_map(|s| &s.allocations)
                .map(|a| format!("{}={}", a.slice_range, a.node_name))
                .collect();
            tracing::info!(pool = %name, "dry run: would write NodeSlicePool {name}: {}", held.join(" "));
            return Ok((true, assignment));
        }
        let written = match &current {
            None => api.create(&PostParams::default(), &pool).await,
            Some(_) => api.replace(name, &PostParams::default(), &pool).await,
        };
        match written {
            Ok(_) => {
                tracing::info!(pool = %name, "wrote NodeSlicePool {name}");
                return Ok((true, assignment));
            }
            Err(kube::Error::Api(status)) if status.code == 409 => {
                ctx.metrics.cas_conflicts.inc();
                tracing::debug!(pool = %name, "NodeSlicePool {name} changed meanwhile: {status:?}");
            }
            Err(e) => return Err(failed(e)),
        }
    }
    Err(Error::Contended { name: name.to_string() })
}

/// Deletes a NodeSlicePool no NAD wants, unless it changed since it was read. Whether it was (or would
/// have been) deleted.
async fn delete_pool(
    ctx: &Context,
    api: &Api<NodeSlicePool>,
    name: &str,
    pool: &NodeSlicePool,
) -> Result<bool, Error> {
    if ctx.dry_run {
        tracing::info!(pool = %name, "dry run: would delete NodeSlicePool {name}: no NetworkAttachmentDefinition uses it");
        return Ok(true);
    }
    let preconditions = Preconditions { resource_version: pool.resource_version(), uid: pool.uid() };
    let params = DeleteParams { preconditions: Some(preconditions), ..DeleteParams::default() };
    match api.delete(name, &params).await {
        Ok(_) => {
            tracing::info!(pool = %name, "deleted NodeSlicePool {name}: no NetworkAttachmentDefinition uses it");
            for state in [SliceState::Assigned, SliceState::Free] {
                ctx.metrics.node_slices.remove(&SliceLabels { pool: name.to_string(), state });
            }
            Ok(true)
        }
        // Changed or gone meanwhile: the next reconcile looks again.
        Err(kube::Error::Api(status)) if status.code == 409 || status.code == 404 => Ok(false),
        Err(e) => Err(Error::Write { name: name.to_string(), source: e }),
    }
}

fn record_gauges(ctx: &Context, name: &str, assignment: &SliceAssignment) {
    let assigned = assignment.slices.iter().filter(|(_, n)| n.is_some()).count();
    let free = assignment.slices.len() - assigned;
    for (state, count) in [(SliceState::Assigned, assigned), (SliceState::Free, free)] {
        let gauge = ctx.metrics.node_slices.get_or_create(&SliceLabels { pool: name.to_string(), state });
        gauge.set(i64::try_from(count).unwrap_or(i64::MAX));
    }
}

/// Publishes a Warning Event about an object (not in a dry run, which writes nothing); failing to is
/// only logged.
async fn publish(
    ctx: &Context,
    recorder: &Recorder,
    regarding: &ObjectReference,
    reason: &str,
    note: String,
) {
    if ctx.dry_run {
        return;
    }
    let event = Event {
        type_: EventType::Warning,
        reason: reason.into(),
        note: Some(note.chars().take(1000).collect()),
        action: "AssignNodeSlices".into(),
        secondary: None,
    };
    if let Err(e) = recorder.publish(&event, regarding).await {
        let kind = regarding.kind.as_deref().unwrap_or_default();
        let name = regarding.name.as_deref().unwrap_or_default();
        tracing::warn!("could not publish a {reason} event about {kind} {name}: {e}");
    }
}

/// Reconciles on every change of a NAD, Node, NodeSlicePool or IPPool that can change an assignment
/// (debounced) and every minute, retrying failures with a growing delay; returns only if every watch
/// ends, which they do not. It decides from what its watches keep ([`Inputs`]), so a reconcile costs
/// the API server nothing but the writes it makes: under churn IPPools change many times a second,
/// and only a pool becoming busy or idle matters here. Nodes are watched as metadata only.
pub async fn run(ctx: Context, settings: Settings) -> Result<(), Error> {
    let recorder = Recorder::new(ctx.client.clone(), reporter());
    let client = ctx.client.clone();
    let raw = |resource: ApiResource| {
        Api::<DynamicObject>::namespaced_with(client.clone(), &ctx.namespace, &resource)
    };
    let every = watcher::Config::default;
    let nads = Api::<DynamicObject>::all_with(client.clone(), &nad_resource());
    // Metadata only: a Node object is large, and its status changes all the time.
    let nodes = Api::<PartialObjectMeta<Node>>::all(client.clone());
    let mut changes = futures::stream::select_all([
        changes(NAD_KIND, watcher(nads, watching(&settings.nad_selector)), Change::Nad),
        changes("Node", watcher(nodes, watching(&settings.node_selector)), Change::Node),
        changes(
            "NodeSlicePool",
            watcher(raw(ApiResource::erase::<NodeSlicePool>(&())), every()),
            Change::SlicePool,
        ),
        changes("IPPool", watcher(raw(ApiResource::erase::<IPPool>(&())), every()), Change::IpPool),
    ]);
    let mut caches = Caches::default();
    let mut resync = tokio::time::interval(RESYNC);
    let mut backoff = Duration::ZERO;
    let mut dirty = false;
    let mut reported = Reported::default();
    loop {
        if dirty && caches.ready() {
            // Gather the rest of a burst (and wait out the backoff) before looking.
            let wait = tokio::time::sleep(DEBOUNCE.max(backoff));
            tokio::pin!(wait);
            loop {
                tokio::select! {
                    _ = &mut wait => break,
                    change = changes.next() => match change {
                        Some(change) => { caches.apply(change); }
                        None => return Ok(()),
                    },
                }
            }
            dirty = false;
            let summary = reconcile_with(&ctx, &settings, &recorder, &mut reported, caches.inputs()).await;
            if summary.failed.is_empty() {
                backoff = Duration::ZERO;
                tracing::debug!(?summary, "node slices reconciled");
            } else {
                backoff = next_backoff(backoff);
                dirty = true;
                tracing::warn!(failed = ?summary.failed, "node slices partly reconciled; retrying in {backoff:?}");
            }
            continue;
        }
        tokio::select! {
            change = changes.next() => match change {
                Some(change) => dirty |= caches.apply(change),
                None => return Ok(()),
            },
            _ = resync.tick() => dirty = true,
        }
    }
}

/// One watch event of one of [`run`]'s inputs.
enum Change {
    Nad(watcher::Event<DynamicObject>),
    Node(watcher::Event<PartialObjectMeta<Node>>),
    SlicePool(watcher::Event<DynamicObject>),
    IpPool(watcher::Event<DynamicObject>),
}

/// What [`run`]'s watches have told of its inputs.
#[derive(Default)]
struct Caches {
    nads: Cache<DynamicObject>,
    nodes: Cache<()>,
    slice_pools: Cache<DynamicObject>,
    ip_pools: Cache<IpPoolView>,
}

impl Caches {
    /// Whether every watch has listed once.
    fn ready(&self) -> bool {
        self.nads.ready && self.nodes.ready && self.slice_pools.ready && self.ip_pools.ready
    }

    /// Applies one event; whether what slicing decides from changed.
    fn apply(&mut self, change: Change) -> bool {
        match change {
            Change::Nad(event) => self.nads.apply(event, |nad| nad),
            Change::Node(event) => self.nodes.apply(event, |_| ()),
            Change::SlicePool(event) => self.slice_pools.apply(event, |pool| pool),
            Change::IpPool(event) => self.ip_pools.apply(event, IpPoolView::of),
        }
    }

    fn inputs(&self) -> Inputs {
        Inputs {
            nads: self.nads.current.clone(),
            nodes: self.nodes.current.clone(),
            slice_pools: self.slice_pools.current.clone(),
            ip_pools: self.ip_pools.current.clone(),
        }
    }
}

/// The objects of one kind a watch has told of, by [`key_of`], each as the part of it that matters.
struct Cache<V> {
    current: BTreeMap<String, V>,
    /// While the watch (re)lists: what it has listed so far.
    listing: Option<BTreeMap<String, V>>,
    /// Whether it has listed once.
    ready: bool,
}

impl<V> Default for Cache<V> {
    fn default() -> Self {
        Cache { current: BTreeMap::new(), listing: None, ready: false }
    }
}

impl<V: PartialEq> Cache<V> {
    /// Applies one watch event, keeping `view` of each object; whether the views changed.
    fn apply<K: Resource>(&mut self, event: watcher::Event<K>, view: impl Fn(K) -> V) -> bool {
        match event {
            watcher::Event::Apply(object) => {
                let key = key_of(&object);
                let view = view(object);
                if self.current.get(&key) == Some(&view) {
                    return false;
                }
                self.current.insert(key, view);
                true
            }
            watcher::Event::Delete(object) => self.current.remove(&key_of(&object)).is_some(),
            watcher::Event::Init => {
                self.listing = Some(BTreeMap::new());
                false
            }
            watcher::Event::InitApply(object) => {
                let key = key_of(&object);
                self.listing.get_or_insert_default().insert(key, view(object));
                false
            }
            watcher::Event::InitDone => {
                let listed = self.listing.take().unwrap_or_default();
                let changed = !self.ready || listed != self.current;
                self.current = listed;
                self.ready = true;
                changed
            }
        }
    }
}

/// The events of a watch of `kind`, as `change`s (errors are logged; the watcher retries with
/// backoff).
fn changes<T: Send + 'static>(
    kind: &'static str,
    events: impl futures::Stream<Item = Result<watcher::Event<T>, watcher::Error>> + Send + 'static,
    change: fn(watcher::Event<T>) -> Change,
) -> futures::stream::BoxStream<'static, Change> {
    events
        .default_backoff()
        .filter_map(move |event| {
            std::future::ready(match event {
                Ok(event) => Some(change(event)),
                Err(e) => {
                    tracing::warn!("watching {kind}: {e}");
                    None
                }
            })
        })
        .boxed()
}

fn next_backoff(previous: Duration) -> Duration {
    (previous * 2).clamp(Duration::from_millis(500), MAX_BACKOFF)
}
