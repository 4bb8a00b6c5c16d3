//! Pod-deletion cleanup (upstream's ip-control-loop): when a pod is deleted, or finishes, the addresses
//! it still holds are released within seconds, in every pool and with their reservations.
//!
//! Normally the runtime's CNI DEL has released them already; this is for the pods whose DEL never ran
//! (a node that died, a force-deleted pod, a runtime that lost track). Where upstream maps a deleted
//! pod to pools through its `network-status` annotation and the NetworkAttachmentDefinitions (and so
//! never finds node-slice pools, whereabouts further down a conflist, or pods Multus did not annotate),
//! the controller keeps an index of what every pod holds in every pool ([`PoolIndex`]) and looks the
//! pod up there. Every address found is judged against the pod that now exists under that name
//! ([`judge`](crate::judge)) — a StatefulSet's recreated pod keeps what it took over — and released with
//! a compare-and-swap on the record as read.
//!
//! Work is batched: all pods waiting when a worker pass starts are looked up together and their
//! releases go out as one write per pool, so a thousand deletions at once cost a handful of writes per
//! pool rather than a thousand. A pass that fails for a pod is retried with a doubling backoff capped at
//! a minute until it succeeds (the queue holds each pod once), and after five failures the pod gets a
//! Warning Event saying so. A pod found holding nothing is looked at again while the pool watch may
//! still be behind (after 1, 2, 4, 8 and 16 s). A reservation is deleted whether or not the index has
//! seen it yet: those of an address are also read by their names.
//!
//! Pods deleted while the watch was down (no delete event) are noticed when the watch lists again.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Node, ObjectReference, Pod};
use kube::api::{Api, DynamicObject};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::Notify;
use whereabouts_k8s::crd::ipam_claim_resource;
use whereabouts_store::ipam::JudgedReservation;
use whereabouts_store::kubernetes::KubeStore;
use whereabouts_store::{Store, StoreError};

use crate::Context;
use crate::index::PoolIndex;
use crate::judge::{
    FINISHED_GRACE, KeepReason, Persistence, PodView, Verdict, WantedOrdinals, judge, mirror_pod_node,
};
use crate::metrics::Source;
use crate::network_status::{ANNOTATION, NetworkStatus};
use crate::pools::{Found, reservation_names, reservations_of};
use crate::reconcile::{wanted_ordinals, wanted_ordinals_of};
use crate::release::{Plan, Release};

/// After how many failed attempts a pod's cleanup is reported in a Warning Event (and still retried).
const REPORT_AFTER: u32 = 5;
/// The first wait before a failed cleanup is tried again; it doubles per failure.
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
/// The longest wait before a failed cleanup is tried again.
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// The most pods one worker pass takes.
const BATCH: usize = 512;
/// Concurrent pod lookups and pool writes within a pass.
const PARALLEL: usize = 16;
/// How long a pod found holding nothing waits for its next look; it doubles per look.
const SETTLE: Duration = Duration::from_secs(1);
/// How many more looks a pod found holding nothing gets before it is dropped.
const SETTLE_LOOKS: u32 = 5;

/// The reporting component of the controller's Events.
pub const COMPONENT: &str = "whereabouts-controller";

/// A pod whose addresses are to be released.
#[derive(Debug, Clone)]
struct Gone {
    namespace: String,
    name: String,
    uid: String,
    /// Its last network-status, to name networks in Events.
    network_status: Option<NetworkStatus>,
    attempts: u32,
    /// How many times it was found holding nothing (see [`SETTLE`]).
    looks: u32,
    not_before: Instant,
}

impl Gone {
    fn of(pod: &Pod) -> Option<Gone> {
        Some(Gone {
            namespace: pod.metadata.namespace.clone()?,
            name: pod.metadata.name.clone()?,
            uid: pod.metadata.uid.clone().unwrap_or_default(),
            network_status: network_status(pod),
            attempts: 0,
            looks: 0,
            not_before: Instant::now(),
        })
    }

    fn pod_ref(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    fn reference(&self) -> ObjectReference {
        ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            namespace: Some(self.namespace.clone()),
            name: Some(self.name.clone()),
            uid: Some(self.uid.clone()).filter(|uid| !uid.is_empty()),
            ..ObjectReference::default()
        }
    }
}

/// A pod's `network-status`, when written and readable.
pub fn network_status(pod: &Pod) -> Option<NetworkStatus> {
    let value = pod.metadata.annotations.as_ref()?.get(ANNOTATION)?;
    match NetworkStatus::parse(value) {
        Ok(status) => Some(status),
        Err(e) => {
            let name = pod.metadata.name.as_deref().unwrap_or("");
            tracing::warn!("pod {name}: unreadable {ANNOTATION} annotation ({e}); treated as not written");
            None
        }
    }
}

/// What the controller knows of a pod now.
pub fn pod_view(pod: &Pod) -> PodView {
    let status = pod.status.as_ref();
    let stopped = status
        .into_iter()
        .flat_map(|s| s.container_statuses.iter().flatten().chain(s.init_container_statuses.iter().flatten()))
        .filter_map(|c| c.state.as_ref()?.terminated.as_ref()?.finished_at.as_ref())
        .map(|time| time.0)
        .max();
    let now = k8s_openapi::jiff::Timestamp::now();
    PodView {
        uid: pod.metadata.uid.clone().unwrap_or_default(),
        kubelet_uid: pod.metadata.annotations.as_ref().and_then(|a| a.get(MIRROR_ANNOTATION)).cloned(),
        phase: status.and_then(|s| s.phase.clone()).unwrap_or_else(|| "Pending".into()),
        // A stop time ahead of this clock (skew) counts as just now.
        stopped_ago: stopped.map(|at| {
            let ago = now.duration_since(at);
            if ago.is_negative() { Duration::ZERO } else { ago.unsigned_abs() }
        }),
        network_status: network_status(pod),
        node: pod.spec.as_ref().and_then(|spec| spec.node_name.clone()),
    }
}

/// The annotation of a static pod's mirror pod naming the uid the kubelet (and the runtime) knows it by.
const MIRROR_ANNOTATION: &str = "kubernetes.io/config.mirror";

/// The queue of pods to clean up: deduplicated by pod uid, in arrival order.
#[derive(Debug, Default)]
struct Queue {
    waiting: Mutex<VecDeque<Gone>>,
    wake: Notify,
}

impl Queue {
    fn push(&self, gone: Gone, metrics: &crate::metrics::Metrics) {
        let mut waiting = self.waiting.lock().unwrap_or_else(PoisonError::into_inner);
        if !waiting.iter().any(|w| w.uid == gone.uid && w.pod_ref() == gone.pod_ref()) {
            waiting.push_back(gone);
        }
        metrics.queue_depth.set(i64::try_from(waiting.len()).unwrap_or(i64::MAX));
        self.wake.notify_one();
    }

    /// Sets the queue-depth gauge to the pods still waiting (after a pass).
    fn settle(&self, metrics: &crate::metrics::Metrics) {
        let waiting = self.waiting.lock().unwrap_or_else(PoisonError::into_inner);
        metrics.queue_depth.set(i64::try_from(waiting.len()).unwrap_or(i64::MAX));
    }

    /// Up to [`BATCH`] pods that are due, and when the next of the others is.
    fn take_due(&self, metrics: &crate::metrics::Metrics) -> (Vec<Gone>, Option<Instant>) {
        let mut waiting = self.waiting.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        let (mut due, mut later) = (Vec::new(), VecDeque::new());
        while let Some(gone) = waiting.pop_front() {
            if gone.not_before <= now && due.len() < BATCH { due.push(gone) } else { later.push_back(gone) }
        }
        let next = later.iter().map(|g| g.not_before).min();
        *waiting = later;
        metrics.queue_depth.set(i64::try_from(waiting.len() + due.len()).unwrap_or(i64::MAX));
        (due, next)
    }
}

/// Runs the cleanup of pods on `node` (every node when `None`) until dropped.
pub async fn run(ctx: Context, index: PoolIndex, node: Option<String>) {
    let queue = Arc::new(Queue::default());
    let recorder = Recorder::new(
        ctx.client.clone(),
        Reporter { controller: COMPONENT.into(), instance: node.clone().or_else(hostname) },
    );
    // Node mode leaves StatefulSets to the cluster's controller: every node would react to each one.
    let statefulsets = async {
        if node.is_none() {
            watch_statefulsets(&ctx, &index, &queue).await;
        }
    };
    let claims = async {
        if node.is_none() {
            watch_claims(&ctx, &index, &queue).await;
        }
    };
    tokio::join!(
        watch_pods(&ctx, &index, &queue, node.as_deref()),
        statefulsets,
        claims,
        work(&ctx, &index, &queue, &recorder)
    );
}

/// How long the claim watch waits before looking again for the IPAMClaim CRD when it is not installed.
const NO_CLAIMS_RETRY: Duration = Duration::from_secs(60);

/// Queues the pods of the addresses of a deleted IPAMClaim (its last pod may be gone long since), so
/// that they are released. Without the IPAMClaim CRD there is nothing to watch: looked for again now
/// and then.
async fn watch_claims(ctx: &Context, index: &PoolIndex, queue: &Queue) {
    let api = Api::<DynamicObject>::all_with(ctx.client.clone(), &ipam_claim_resource());
    loop {
        let mut events = Box::pin(watcher(api.clone(), watcher::Config::default()));
        while let Some(event) = events.next().await {
            let claim = match event {
                Ok(watcher::Event::Delete(claim)) => claim,
                Ok(_) => continue,
                Err(watcher::Error::InitialListFailed(kube::Error::Api(status))) if status.code == 404 => {
                    break;
                }
                Err(e) => {
                    tracing::warn!("watching ipamclaims: {e}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            let (Some(namespace), Some(name)) = (claim.metadata.namespace, claim.metadata.name) else {
                continue;
            };
            let pods =
                index.read().pods_holding(&namespace, |a| a.ipam_claim.as_deref() == Some(name.as_str()));
            queue_pods(ctx, queue, pods, &format!("IPAMClaim {namespace}/{name} deleted"));
        }
        tracing::debug!("no IPAMClaim CRD; looking again in {NO_CLAIMS_RETRY:?}");
        tokio::time::sleep(NO_CLAIMS_RETRY).await;
    }
}

/// Queues `pods` (`namespace/name`) for their addresses to be judged, `why` says for the log.
fn queue_pods(ctx: &Context, queue: &Queue, pods: BTreeSet<String>, why: &str) {
    for pod_ref in pods {
        let Some((namespace, name)) = pod_ref.split_once('/') else { continue };
        tracing::debug!("{why}: judging {pod_ref}");
        let gone = Gone {
            namespace: namespace.to_string(),
            name: name.to_string(),
            uid: String::new(),
            network_status: None,
            attempts: 0,
            looks: SETTLE_LOOKS,
            not_before: Instant::now(),
        };
        queue.push(gone, &ctx.metrics);
    }
}

/// Queues the pods holding sticky addresses of a StatefulSet that was deleted or now wants fewer
/// ordinals (scaled down, or its `ordinals.start` moved): their held addresses may be released now,
/// with no pod deletion to announce it (the pod may be gone already, between two sandboxes).
async fn watch_statefulsets(ctx: &Context, index: &PoolIndex, queue: &Queue) {
    let api: Api<StatefulSet> = Api::all(ctx.client.clone());
    let mut wanted: HashMap<(String, String), WantedOrdinals> = HashMap::new();
    let mut events = Box::pin(watcher(api, watcher::Config::default()).default_backoff());
    while let Some(event) = events.next().await {
        let (statefulset, deleted) = match event {
            Ok(watcher::Event::InitApply(s) | watcher::Event::Apply(s)) => (s, false),
            Ok(watcher::Event::Delete(s)) => (s, true),
            Ok(watcher::Event::Init | watcher::Event::InitDone) => continue,
            Err(e) => {
                tracing::warn!("watching statefulsets: {e}");
                continue;
            }
        };
        let (Some(namespace), Some(name)) = (statefulset.metadata.namespace, statefulset.metadata.name)
        else {
            continue;
        };
        let key = (namespace, name);
        let now = wanted_ordinals_of(statefulset.spec.as_ref());
        let before = if deleted { wanted.remove(&key) } else { wanted.insert(key.clone(), now) };
        let fewer = deleted || before.is_some_and(|before| !now.covers(before));
        if !fewer {
            continue;
        }
        let (namespace, name) = key;
        let pods = index.read().pods_holding(&namespace, |a| a.statefulset.as_deref() == Some(name.as_str()));
        queue_pods(ctx, queue, pods, &format!("StatefulSet {namespace}/{name} wants fewer pods"));
    }
}

fn hostname() -> Option<String> {
    std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty())
}

/// Feeds the queue with deleted and finished pods.
///
/// Pods deleted while no watch ran (the controller was down, or was not the leader) get no delete
/// event: once the first listing is complete and the index is too, every pod the pools name that the
/// listing does not hold is queued (in node mode, those whose allocations record this node).
async fn watch_pods(ctx: &Context, index: &PoolIndex, queue: &Queue, node: Option<&str>) {
    let api: Api<Pod> = Api::all(ctx.client.clone());
    let mut config = watcher::Config::default();
    if let Some(node) = node {
        config = config.fields(&format!("spec.nodeName={node}"));
    }
    // What is known of each pod (by namespace/name), and whether it had finished: only what a cleanup
    // needs, not the whole object.
    let mut known: HashMap<(String, String), (Gone, bool)> = HashMap::new();
    let mut relisted: Option<HashMap<(String, String), (Gone, bool)>> = None;
    let mut swept = false;
    let mut events = Box::pin(watcher(api, config).default_backoff());
    while let Some(event) = events.next().await {
        let event = match event {
            Ok(event) => event,
            Err(e) => {
                tracing::warn!("watching pods: {e}");
                continue;
            }
        };
        match event {
            watcher::Event::Init => relisted = Some(HashMap::new()),
            watcher::Event::InitApply(pod) | watcher::Event::Apply(pod) => {
                let Some(gone) = Gone::of(&pod) else { continue };
                let key = (gone.namespace.clone(), gone.name.clone());
                let finished = pod_view(&pod).phase_is_final();
                match known.get(&key) {
                    // The same name, another pod: the one known was deleted meanwhile.
                    Some((old, _)) if old.uid != gone.uid => queue.push(old.clone(), &ctx.metrics),
                    Some((_, true)) => {}
                    _ if finished => queue.push(gone.clone(), &ctx.metrics),
                    _ => {}
                }
                if let Some(seen) = &mut relisted {
                    seen.insert(key.clone(), (gone.clone(), finished));
                }
                known.insert(key, (gone, finished));
            }
            watcher::Event::Delete(pod) => {
                let Some(gone) = Gone::of(&pod) else { continue };
                known.remove(&(gone.namespace.clone(), gone.name.clone()));
                queue.push(gone, &ctx.metrics);
            }
            watcher::Event::InitDone => {
                let seen = relisted.take().unwrap_or_default();
                for (key, (gone, _)) in &known {
                    if seen.get(key).is_none_or(|(now, _)| now.uid != gone.uid) {
                        queue.push(gone.clone(), &ctx.metrics);
                    }
                }
                known = seen;
                if !swept {
                    swept = true;
                    sweep(ctx, index, queue, node, &known).await;
                }
            }
        }
    }
}

/// Queues every pod the pools name that the first listing does not hold.
async fn sweep(
    ctx: &Context,
    index: &PoolIndex,
    queue: &Queue,
    node: Option<&str>,
    listed: &HashMap<(String, String), (Gone, bool)>,
) {
    let mut synced = index.synced();
    if synced.wait_for(|synced| *synced).await.is_err() {
        return;
    }
    let missing: Vec<Gone> = index
        .read()
        .pod_refs(node)
        .into_iter()
        .filter_map(|pod_ref| {
            let (namespace, name) = pod_ref.split_once('/')?;
            let key = (namespace.to_string(), name.to_string());
            (!listed.contains_key(&key)).then(|| Gone {
                namespace: key.0,
                name: key.1,
                uid: String::new(),
                network_status: None,
                attempts: 0,
                // Named by the pools: holding nothing later means released meanwhile.
                looks: SETTLE_LOOKS,
                not_before: Instant::now(),
            })
        })
        .collect();
    if !missing.is_empty() {
        tracing::info!("{} pods hold addresses but no longer exist here; releasing", missing.len());
    }
    for gone in missing {
        queue.push(gone, &ctx.metrics);
    }
}

/// Works the queue off in batches, once the index is complete.
async fn work(ctx: &Context, index: &PoolIndex, queue: &Queue, recorder: &Recorder) {
    let mut synced = index.synced();
    if synced.wait_for(|synced| *synced).await.is_err() {
        return;
    }
    loop {
        let (due, next) = queue.take_due(&ctx.metrics);
        if due.is_empty() {
            let sleep =
                next.map_or(Duration::from_secs(3600), |at| at.saturating_duration_since(Instant::now()));
            let _ = tokio::time::timeout(sleep, queue.wake.notified()).await;
            continue;
        }
        let Outcome { failures, settle } = pass(ctx, index, recorder, due).await;
        for gone in settle {
            queue.push(gone, &ctx.metrics);
        }
        queue.settle(&ctx.metrics);
        for failed in failures {
            let attempts = failed.attempts + 1;
            if attempts == REPORT_AFTER {
                let note = format!("failed to garbage collect addresses for pod {}", failed.pod_ref());
                tracing::error!("{note} {attempts} times; still retrying");
                publish(recorder, &failed, EventType::Warning, "IPAddressGarbageCollectionFailed", note)
                    .await;
            }
            let not_before = Instant::now() + retry_backoff(attempts);
            queue.push(Gone { attempts, not_before, ..failed }, &ctx.metrics);
        }
    }
}

/// The wait before the next attempt at a cleanup that failed `attempts` times.
fn retry_backoff(attempts: u32) -> Duration {
    FIRST_BACKOFF.saturating_mul(1 << attempts.saturating_sub(1).min(16)).min(MAX_BACKOFF)
}

/// What a persistent allocation's address depends on: its IPAMClaim or its StatefulSet.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Keeper {
    Claim { namespace: String, name: String },
    StatefulSet { namespace: String, name: String },
}

impl Keeper {
    /// The keeper of `found`'s allocation, if it is persistent.
    fn of(found: &Found) -> Option<Keeper> {
        let (namespace, _) = found.allocation.pod_ref.split_once('/')?;
        let namespace = namespace.to_string();
        match (&found.allocation.ipam_claim, &found.allocation.statefulset) {
            (Some(claim), _) => Some(Keeper::Claim { namespace, name: claim.clone() }),
            (None, Some(statefulset)) => Some(Keeper::StatefulSet { namespace, name: statefulset.clone() }),
            (None, None) => None,
        }
    }
}

/// Looks up now the IPAMClaims and StatefulSets that the persistent allocations among `found` depend
/// on; also returns those that could not be looked up (their pods' allocations are left for the next
/// attempt).
async fn look_up_keepers(
    ctx: &Context,
    found: impl Iterator<Item = &Found>,
) -> (Persistence, HashSet<Keeper>) {
    /// A keeper found: a StatefulSet's wanted ordinals, or that a claim exists.
    enum Looked {
        StatefulSet(WantedOrdinals),
        Claim,
    }
    let keepers: BTreeSet<Keeper> = found.filter_map(Keeper::of).collect();
    let lookups = futures::stream::iter(keepers.into_iter().map(|keeper| async move {
        let client = ctx.client.clone();
        let found = match &keeper {
            Keeper::StatefulSet { namespace, name } => Api::<StatefulSet>::namespaced(client, namespace)
                .get_opt(name)
                .await
                .map(|found| found.map(|statefulset| Looked::StatefulSet(wanted_ordinals(&statefulset)))),
            Keeper::Claim { namespace, name } => {
                let claims = Api::<DynamicObject>::namespaced_with(client, namespace, &ipam_claim_resource());
                match claims.get_opt(name).await {
                    // No IPAMClaim CRD: no claim.
                    Err(kube::Error::Api(status)) if status.code == 404 => Ok(None),
                    found => found.map(|found| found.map(|_| Looked::Claim)),
                }
            }
        };
        (keeper, found)
    }))
    .buffered(PARALLEL)
    .collect::<Vec<_>>()
    .await;
    let (mut known, mut unknown) = (Persistence::default(), HashSet::new());
    for (keeper, found) in lookups {
        match (found, &keeper) {
            (Ok(Some(Looked::StatefulSet(ordinals))), Keeper::StatefulSet { namespace, name }) => {
                known.insert_statefulset(namespace, name, ordinals);
            }
            (Ok(Some(Looked::Claim)), Keeper::Claim { namespace, name }) => {
                known.insert_claim(namespace, name)
            }
            (Ok(_), _) => {}
            (Err(e), _) => {
                tracing::warn!("looking up {keeper:?}: {e}");
                unknown.insert(keeper);
            }
        }
    }
    (known, unknown)
}

/// Cleans up a batch of pods.
async fn pass(ctx: &Context, index: &PoolIndex, recorder: &Recorder, due: Vec<Gone>) -> Outcome {
    // What each pod holds, from the index; pods holding nothing need no lookup. The pool watch may
    // still be behind the pod watch, so a pod found holding nothing is looked at again a few times
    // before it is dropped.
    let mut settle = Vec::new();
    let holdings: Vec<(Gone, Vec<Found>)> = {
        let contents = index.read();
        due.into_iter()
            .filter_map(|gone| {
                let held = contents.held_by(&gone.pod_ref());
                if held.is_empty() {
                    if gone.looks < SETTLE_LOOKS {
                        let not_before = Instant::now() + SETTLE * (1 << gone.looks);
                        settle.push(Gone { looks: gone.looks + 1, not_before, ..gone });
                    }
                    return None;
                }
                Some((gone, held))
            })
            .collect()
    };
    // The pods now found under those names.
    let lookups = futures::stream::iter(holdings.iter().map(|(gone, _)| async move {
        Api::<Pod>::namespaced(ctx.client.clone(), &gone.namespace).get_opt(&gone.name).await
    }))
    .buffered(PARALLEL)
    .collect::<Vec<_>>()
    .await;
    // The nodes of pods not found whose names are mirror pods' names there: a static pod's mirror pod
    // may be missing while its node runs it (see the judge). Other pods need no node lookup.
    let absent_pods_nodes: BTreeSet<&str> = holdings
        .iter()
        .zip(&lookups)
        .filter(|(_, lookup)| matches!(lookup, Ok(None)))
        .flat_map(|((_, held), _)| held.iter().filter_map(|found| mirror_pod_node(&found.allocation)))
        .collect();
    let node_lookups = futures::stream::iter(absent_pods_nodes.into_iter().map(|node| async move {
        (node, Api::<Node>::all(ctx.client.clone()).get_metadata_opt(node).await.map(|n| n.is_some()))
    }))
    .buffered(PARALLEL)
    .collect::<Vec<_>>()
    .await;
    let (persistence, unknown) = look_up_keepers(ctx, holdings.iter().flat_map(|(_, held)| held)).await;
    let mut failed = vec![false; holdings.len()];
    let mut nodes_found = BTreeMap::new();
    for (node, lookup) in node_lookups {
        match lookup {
            Ok(exists) => {
                nodes_found.insert(node, exists);
            }
            Err(e) => tracing::warn!("looking up node {node}: {e}"),
        }
    }
    let mut finishing = vec![false; holdings.len()];
    let mut decided = Vec::new();
    {
        let contents = index.read();
        for (i, ((gone, held), lookup)) in holdings.iter().zip(lookups).enumerate() {
            if held.iter().any(|found| Keeper::of(found).is_some_and(|keeper| unknown.contains(&keeper))) {
                failed[i] = true;
                continue;
            }
            let now = match lookup {
                Ok(pod) => pod.as_ref().map(pod_view),
                Err(e) => {
                    tracing::warn!("looking up pod {}: {e}", gone.pod_ref());
                    failed[i] = true;
                    continue;
                }
            };
            let node_unknown = now.is_none()
                && held
                    .iter()
                    .any(|f| mirror_pod_node(&f.allocation).is_some_and(|n| !nodes_found.contains_key(n)));
            if node_unknown {
                failed[i] = true;
                continue;
            }
            for found in held {
                let node_exists = |node: &str| nodes_found.get(node).copied().unwrap_or(false);
                match judge(&found.allocation, found.ip, now.as_ref(), &persistence, node_exists) {
                    Verdict::Release(reason) => {
                        let reservations = reservations_of(found, contents.reservations.iter());
                        decided.push(Release { found: found.clone(), reason, reservations, tag: i });
                    }
                    // The kubelet reports the phase before it tears the sandbox down: look again
                    // once the grace is over.
                    Verdict::Keep(KeepReason::Finishing) if !finishing[i] => {
                        finishing[i] = true;
                        let later = Instant::now() + FINISHED_GRACE;
                        settle.push(Gone { not_before: later, ..gone.clone() });
                    }
                    Verdict::Keep(_) => {}
                }
            }
        }
    }
    let mut plan = Plan::default();
    let store = KubeStore::new(ctx.client.clone(), &ctx.namespace, COMPONENT);
    let completed = futures::stream::iter(decided.into_iter().map(|release| with_unindexed(&store, release)))
        .buffered(PARALLEL)
        .collect::<Vec<_>>()
        .await;
    for completed in completed {
        match completed {
            Ok(release) => plan.add(release),
            Err((tag, e)) => {
                tracing::warn!("reading the reservations of pod {}: {e}", holdings[tag].0.pod_ref());
                failed[tag] = true;
            }
        }
    }
    let results = plan.execute(ctx).await;
    let mut released: Vec<Vec<(IpAddr, String)>> = vec![Vec::new(); holdings.len()];
    for (batch, result) in results {
        match result {
            Ok(_) if ctx.dry_run => {}
            Ok(ips) => {
                for r in batch.iter().filter(|r| ips.contains(&r.found.ip)) {
                    ctx.metrics.released(Source::PodCleanup, r.reason);
                    released[r.tag].push((r.found.ip, r.found.pool.name.clone()));
                }
            }
            Err(e) => {
                tracing::warn!(
                    "releasing in pool {}: {e}",
                    batch.first().map_or("", |r| r.found.pool.name.as_str())
                );
                for r in batch {
                    failed[r.tag] = true;
                }
            }
        }
    }
    let events = holdings.iter().zip(&released).flat_map(|((gone, _), ips)| {
        ips.iter().map(move |(ip, pool)| {
            let network = gone
                .network_status
                .as_ref()
                .and_then(|s| s.network_of(*ip))
                .map_or_else(|| format!("pool {pool}"), |n| n.rsplit('/').next().unwrap_or(n).to_string());
            let note = format!("successful cleanup of IP address [{ip}] from network {network}");
            publish(recorder, gone, EventType::Normal, "IPAddressGarbageCollected", note)
        })
    });
    futures::stream::iter(events).buffer_unordered(PARALLEL).collect::<Vec<()>>().await;
    let failures = holdings.into_iter().zip(failed).filter(|(_, failed)| *failed).map(|((gone, _), _)| gone);
    Outcome { failures: failures.collect(), settle }
}

/// `release` with the reservations of its address its holder has that the index has not seen yet (its
/// reservation watch may be behind the pool watch), read by their names: a reservation left behind
/// would block the address until the scheduled reconciler found it. On failure, the release's tag.
async fn with_unindexed(
    store: &KubeStore,
    mut release: Release<usize>,
) -> Result<Release<usize>, (usize, StoreError)> {
    let holder = release.found.allocation.reservation();
    for name in reservation_names(&release.found) {
        if release.reservations.iter().any(|known| known.name == name) {
            continue;
        }
        match store.read_reservation(&name).await {
            Ok(Some(read)) if read.holder.same_owner(&holder) => {
                release.reservations.push(JudgedReservation { name, version: read.version });
            }
            Ok(_) => {}
            Err(e) => return Err((release.tag, e)),
        }
    }
    Ok(release)
}

/// What a pass leaves to do.
struct Outcome {
    /// Pods whose cleanup failed: retried with backoff.
    failures: Vec<Gone>,
    /// Pods found holding nothing on their first look: looked at once more.
    settle: Vec<Gone>,
}

/// Publishes an Event on a pod; a failure is only logged (Events are best effort).
async fn publish(recorder: &Recorder, pod: &Gone, type_: EventType, reason: &str, note: String) {
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: "ReleaseAddresses".into(),
        secondary: None,
    };
    if let Err(e) = recorder.publish(&event, &pod.reference()).await {
        tracing::debug!("publishing an event on pod {}: {e}", pod.pod_ref());
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::PodStatus;
    use kube::api::ObjectMeta;

    use super::*;

    #[test]
    fn pod_view_reads_phase_and_annotation() {
        let pod = Pod {
            metadata: ObjectMeta {
                name: Some("web".into()),
                uid: Some("u1".into()),
                annotations: Some(
                    [(ANNOTATION.to_string(), r#"[{"name":"ns/n","ips":["192.0.2.1"]}]"#.into())].into(),
                ),
                ..ObjectMeta::default()
            },
            status: Some(PodStatus { phase: Some("Running".into()), ..PodStatus::default() }),
            ..Pod::default()
        };
        let view = pod_view(&pod);
        assert_eq!((view.uid.as_str(), view.phase.as_str()), ("u1", "Running"));
        assert!(view.network_status.unwrap().lists("192.0.2.1".parse().unwrap()));
        let bare = pod_view(&Pod::default());
        assert_eq!((bare.phase.as_str(), bare.network_status), ("Pending", None));
    }

    #[test]
    fn the_queue_deduplicates_and_defers() {
        let metrics = crate::metrics::Metrics::new();
        let queue = Queue::default();
        let gone = |name: &str, uid: &str, delay: u64| Gone {
            namespace: "ns".into(),
            name: name.into(),
            uid: uid.into(),
            network_status: None,
            attempts: 0,
            looks: 0,
            not_before: Instant::now() + Duration::from_secs(delay),
        };
        queue.push(gone("a", "u1", 0), &metrics);
        queue.push(gone("a", "u1", 0), &metrics);
        queue.push(gone("a", "u2", 0), &metrics);
        queue.push(gone("b", "u3", 60), &metrics);
        let (due, next) = queue.take_due(&metrics);
        assert_eq!(due.iter().map(|g| g.uid.as_str()).collect::<Vec<_>>(), ["u1", "u2"]);
        assert!(next.is_some());
        assert_eq!(metrics.queue_depth.get(), 3, "taken pods count until their pass ends");
    }

    #[test]
    fn failed_cleanups_are_retried_ever_later_up_to_a_minute_apart() {
        let waits: Vec<Duration> = (1..=10).map(retry_backoff).collect();
        assert_eq!(waits[0], FIRST_BACKOFF);
        assert!(waits.windows(2).all(|w| w[0] <= w[1]), "{waits:?}");
        assert_eq!(waits[9], MAX_BACKOFF);
        assert_eq!(retry_backoff(u32::MAX), MAX_BACKOFF);
    }
}
