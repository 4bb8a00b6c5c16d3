//! A watch-maintained index of the stored pools and reservations: which pod holds what, where. It
//! spares the pod cleanup a LIST of every pool for each deleted pod, and it is where the pool metrics
//! come from.
//!
//! Objects are watched as raw JSON and decoded one by one, so that one object the types cannot read (an
//! IPPool without `spec`, which the CRD allows) is skipped with a warning instead of failing the whole
//! watch.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use futures::{Stream, StreamExt};
use kube::api::{Api, ApiResource, DynamicObject};
use kube::runtime::{WatchStreamExt, watcher};
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use whereabouts_core::pool::Allocation;
use whereabouts_k8s::crd::{IPPool, OverlappingRangeIPReservation};
use whereabouts_store::VersionedReservation;
use whereabouts_store::kubernetes::versioned;

use crate::Context;
use crate::metrics::{Metrics, PoolLabels};
use crate::pools::{Found, allocations, capacity, decode};

/// What the index holds.
#[derive(Debug, Default)]
pub struct Contents {
    /// Every readable pool's allocations, by pool name.
    pools: HashMap<String, Vec<Found>>,
    /// Pool names by the pod references they hold allocations of.
    by_pod: HashMap<String, BTreeSet<String>>,
    /// Every reservation, by name, as last seen.
    pub reservations: BTreeMap<String, VersionedReservation>,
}

impl Contents {
    /// The allocations recorded for `pod_ref` (`<namespace>/<name>`) in every pool.
    pub fn held_by(&self, pod_ref: &str) -> Vec<Found> {
        let Some(pools) = self.by_pod.get(pod_ref) else { return Vec::new() };
        pools
            .iter()
            .filter_map(|name| self.pools.get(name))
            .flatten()
            .filter(|found| found.allocation.pod_ref == pod_ref)
            .cloned()
            .collect()
    }

    /// The pod references holding allocations; with `node`, only those with an allocation recorded as
    /// made on that node.
    pub fn pod_refs(&self, node: Option<&str>) -> Vec<String> {
        self.by_pod
            .keys()
            .filter(|pod_ref| !pod_ref.is_empty())
            .filter(|pod_ref| {
                node.is_none_or(|node| {
                    self.held_by(pod_ref).iter().any(|found| found.allocation.node.as_deref() == Some(node))
                })
            })
            .cloned()
            .collect()
    }

    /// The pod references of namespace `namespace` whose allocations pass `depends` (those of a
    /// StatefulSet, or of an IPAMClaim).
    pub fn pods_holding(&self, namespace: &str, depends: impl Fn(&Allocation) -> bool) -> BTreeSet<String> {
        self.pools
            .values()
            .flatten()
            .filter(|found| {
                depends(&found.allocation)
                    && found.allocation.pod_ref.split_once('/').is_some_and(|(ns, _)| ns == namespace)
            })
            .map(|found| found.allocation.pod_ref.clone())
            .collect()
    }

    fn set_pool(&mut self, name: &str, found: Vec<Found>) {
        self.remove_pool(name);
        for entry in &found {
            self.by_pod.entry(entry.allocation.pod_ref.clone()).or_default().insert(name.to_string());
        }
        self.pools.insert(name.to_string(), found);
    }

    fn remove_pool(&mut self, name: &str) -> Option<Vec<Found>> {
        let old = self.pools.remove(name)?;
        for entry in &old {
            if let Some(pools) = self.by_pod.get_mut(&entry.allocation.pod_ref) {
                pools.remove(name);
                if pools.is_empty() {
                    self.by_pod.remove(&entry.allocation.pod_ref);
                }
            }
        }
        Some(old)
    }
}

/// The shared index, kept current by [`PoolIndex::run`].
#[derive(Debug, Clone)]
pub struct PoolIndex {
    contents: Arc<Mutex<Contents>>,
    synced: watch::Sender<bool>,
}

impl Default for PoolIndex {
    fn default() -> Self {
        PoolIndex { contents: Arc::default(), synced: watch::Sender::new(false) }
    }
}

impl PoolIndex {
    /// A read of the current contents (held briefly: no awaiting while holding it).
    pub fn read(&self) -> MutexGuard<'_, Contents> {
        self.contents.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// True once both watches have listed everything.
    pub fn synced(&self) -> watch::Receiver<bool> {
        self.synced.subscribe()
    }

    /// Watches the pools and reservations of `ctx.namespace` until the returned future is dropped.
    pub async fn run(&self, ctx: &Context) {
        let pools = watch_raw::<IPPool>(ctx, &ApiResource::erase::<IPPool>(&()));
        let reservations = watch_raw::<OverlappingRangeIPReservation>(
            ctx,
            &ApiResource::erase::<OverlappingRangeIPReservation>(&()),
        );
        let (mut pools_listed, mut reservations_listed) = (false, false);
        let mut pools_relist: Option<HashSet<String>> = None;
        let mut reservations_relist: Option<HashSet<String>> = None;
        let mut changes = Box::pin(futures::stream::select(
            pools.map(Either::Pools),
            reservations.map(Either::Reservations),
        ));
        while let Some(change) = changes.next().await {
            let mut contents = self.read();
            match change {
                Either::Pools(change) => match change {
                    Change::Restart => pools_relist = Some(HashSet::new()),
                    Change::Put(name, pool) => {
                        if let Some(seen) = &mut pools_relist {
                            seen.insert(name.clone());
                        }
                        observe_pool(&mut contents, &ctx.metrics, &name, &pool, pools_listed);
                    }
                    Change::Gone(name) => forget_pool(&mut contents, &ctx.metrics, &name),
                    Change::Listed => {
                        // Pools deleted while the watch was down get no delete event.
                        let seen = pools_relist.take().unwrap_or_default();
                        let gone: Vec<String> =
                            contents.pools.keys().filter(|name| !seen.contains(*name)).cloned().collect();
                        for name in gone {
                            forget_pool(&mut contents, &ctx.metrics, &name);
                        }
                        pools_listed = true;
                    }
                },
                Either::Reservations(change) => match change {
                    Change::Restart => reservations_relist = Some(HashSet::new()),
                    Change::Put(name, orip) => {
                        if let Some(seen) = &mut reservations_relist {
                            seen.insert(name.clone());
                        }
                        contents.reservations.insert(name, versioned(&orip));
                    }
                    Change::Gone(name) => {
                        contents.reservations.remove(&name);
                    }
                    Change::Listed => {
                        let seen = reservations_relist.take().unwrap_or_default();
                        contents.reservations.retain(|name, _| seen.contains(name));
                        reservations_listed = true;
                    }
                },
            }
            drop(contents);
            if pools_listed && reservations_listed {
                self.synced.send_if_modified(|synced| !std::mem::replace(synced, true));
            }
        }
    }
}

/// A change from one of the two watches.
enum Either {
    Pools(Change<IPPool>),
    Reservations(Change<OverlappingRangeIPReservation>),
}

/// A watch event reduced to what the index needs.
enum Change<K> {
    /// The watch (re)starts listing everything.
    Restart,
    /// An object as it is now.
    Put(String, K),
    /// An object was deleted.
    Gone(String),
    /// The listing is complete.
    Listed,
}

/// Records a pool's new version: its allocations, its gauges, and what appeared and disappeared. A
/// pool first seen in the initial listing (`listed` false) counts nothing: its allocations were made
/// before this process watched.
fn observe_pool(contents: &mut Contents, metrics: &Metrics, name: &str, pool: &IPPool, listed: bool) {
    let found = match allocations(pool) {
        Ok(found) => found,
        Err(e) => {
            tracing::warn!("{e}; its allocations are not watched");
            forget_pool(contents, metrics, name);
            return;
        }
    };
    let labels = PoolLabels { pool: name.to_string() };
    let counted = listed || contents.pools.contains_key(name);
    let before: HashMap<_, _> =
        contents.pools.get(name).into_iter().flatten().map(|f| (f.ip, &f.allocation)).collect();
    let after: HashMap<_, _> = found.iter().map(|f| (f.ip, &f.allocation)).collect();
    let appeared = after.iter().filter(|(ip, a)| before.get(*ip) != Some(*a)).count();
    let disappeared = before.iter().filter(|(ip, a)| after.get(*ip) != Some(*a)).count();
    if counted {
        metrics.allocations.get_or_create(&labels).inc_by(appeared as u64);
        metrics.releases.get_or_create(&labels).inc_by(disappeared as u64);
    }
    metrics.pool_allocated.get_or_create(&labels).set(i64::try_from(found.len()).unwrap_or(i64::MAX));
    if let Some(capacity) = capacity(pool) {
        metrics.pool_capacity.get_or_create(&labels).set(capacity);
    }
    contents.set_pool(name, found);
}

/// Drops a deleted pool: its allocations count as released, and its gauges go.
fn forget_pool(contents: &mut Contents, metrics: &Metrics, name: &str) {
    let labels = PoolLabels { pool: name.to_string() };
    if let Some(old) = contents.remove_pool(name) {
        metrics.releases.get_or_create(&labels).inc_by(old.len() as u64);
    }
    metrics.pool_allocated.remove(&labels);
    metrics.pool_capacity.remove(&labels);
}

/// A watch of one kind in `ctx.namespace`, decoding objects one by one: an object that does not decode
/// is skipped with a warning. Watch errors are logged and the watch restarts with backoff.
fn watch_raw<K: DeserializeOwned + Send + 'static>(
    ctx: &Context,
    resource: &ApiResource,
) -> impl Stream<Item = Change<K>> + Send + 'static {
    let api: Api<DynamicObject> = Api::namespaced_with(ctx.client.clone(), &ctx.namespace, resource);
    let kind = resource.kind.clone();
    watcher(api, watcher::Config::default()).default_backoff().filter_map(move |event| {
        let change = match event {
            Ok(event) => reduce(&kind, event),
            Err(e) => {
                tracing::warn!("watching {kind}s: {e}");
                None
            }
        };
        std::future::ready(change)
    })
}

fn reduce<K: DeserializeOwned>(kind: &str, event: watcher::Event<DynamicObject>) -> Option<Change<K>> {
    match event {
        watcher::Event::Apply(object) | watcher::Event::InitApply(object) => match decode(kind, object) {
            Ok((name, typed)) => Some(Change::Put(name, typed)),
            Err(e) => {
                tracing::warn!("{e}; skipped");
                None
            }
        },
        watcher::Event::Delete(object) => Some(Change::Gone(object.metadata.name.unwrap_or_default())),
        watcher::Event::Init => Some(Change::Restart),
        watcher::Event::InitDone => Some(Change::Listed),
    }
}
