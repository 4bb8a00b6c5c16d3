//! The IPAM engine: the core's allocation policy applied to a [`Store`] with compare-and-swap retries.
//!
//! Every change to a pool is read → compute (pure core) → write-if-unchanged. A lost race is retried
//! from a fresh read after a jittered exponential backoff, within a bound of attempts and time; past
//! the bound the caller gets [`IpamError::Contention`] naming the pool (CNI code 11, try again later).
//! A retried ADD picks among the lowest few free addresses by a hash of its owner
//! ([`Spread`]) rather than the lowest one, so that writers of a busy pool whose store compares only the
//! addresses a write changes (the Kubernetes store) stop colliding; without contention it is always the
//! lowest free address.
//!
//! Every range says which pool holds its allocations ([`ManagedRange::pool`]): the pool named after the
//! range, or with node slices this node's pool of its slice. The engine reads and writes only that pool
//! and hands addresses out with the configured range's prefix ([`AllocatedIp::network`]).
//!
//! Order of writes, chosen so that a process killed between two writes never leaves state that
//! nothing will find again:
//! * ADD writes the pool entry first, then the cluster-wide reservation. An address counts as handed out
//!   only once both exist. If the reservation is held by another attachment (an overlapping pool got
//!   there first), our pool entry is removed again and the address is skipped on the next try. A kill in
//!   between leaves a pool entry without reservation, which the runtime's DEL finds through the pool.
//! * DEL (and GC, and the rollback of a failed ADD) deletes the reservation first, then the pool entry.
//!   A kill in between again leaves only a pool entry, which the retried DEL finishes. (The reverse
//!   order would leave a reservation that no DEL can find, blocking the address for good.)

use std::collections::HashSet;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use thiserror::Error;
use whereabouts_core::addr::{Family, from_u128, to_u128};
use whereabouts_core::allocate::{AllocError, Assignment, Spread, apply, assign, assign_spread, lowest_free};
use whereabouts_core::config::{IpamConfig, ManagedRange, PoolTarget};
use whereabouts_core::interval::IntervalSet;
use whereabouts_core::pool::{Allocation, Owner, Pool, PoolError};
use whereabouts_core::range::reservation_name;

use crate::queue::Announced;
use crate::{Reservation, ReserveOutcome, Store, StoreError, VersionedPool};

/// Why an IPAM operation failed; every variant names the pool or reservation involved.
#[derive(Debug, Error)]
pub enum IpamError {
    /// The store failed.
    #[error("{object}: {source}")]
    Store {
        /// The pool or reservation.
        object: String,
        /// The store's error.
        source: StoreError,
    },
    /// The stored pool cannot be used.
    #[error("pool {pool}: {source}")]
    Pool {
        /// The pool.
        pool: String,
        /// What is wrong with it.
        source: PoolError,
    },
    /// The range gave no address.
    #[error("pool {pool}: {source}")]
    Alloc {
        /// The pool.
        pool: String,
        /// Why.
        source: AllocError,
    },
    /// Too many concurrent writers won the race; the caller should try again later.
    #[error("pool {pool}: gave up after {attempts} conflicting updates, try again later")]
    Contention {
        /// The pool.
        pool: String,
        /// How many writes were tried.
        attempts: u32,
    },
}

/// Bounds of the compare-and-swap retry loop.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Most writes tried per pool update.
    pub attempts: u32,
    /// The first backoff ceiling; it doubles per conflict.
    pub first_backoff: Duration,
    /// The largest backoff ceiling.
    pub max_backoff: Duration,
    /// The longest one pool update may take; far below the kubelet's CNI timeout.
    pub deadline: Duration,
    /// How long calls failing with [`StoreError::Unavailable`] (an etcd leader election, a member
    /// restarting) are retried before the error is returned. Retrying is safe: every write is a
    /// compare-and-swap or idempotent, so a write that did land is found by the next read.
    pub unavailable_window: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 500,
            first_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(50),
            deadline: Duration::from_secs(30),
            unavailable_window: Duration::from_secs(8),
        }
    }
}

impl RetryPolicy {
    /// Full jitter: a uniformly random wait below the exponential ceiling.
    fn backoff(&self, attempt: u32) -> Duration {
        let ceiling = self.first_backoff.saturating_mul(1 << attempt.min(16)).min(self.max_backoff);
        ceiling.mul_f64(fastrand::f64())
    }
}

/// An address handed out by [`Ipam::allocate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllocatedIp {
    /// The address.
    pub ip: IpAddr,
    /// The configured range's network (its prefix is the result's prefix), also when the address
    /// comes from a node's slice of it.
    pub network: IpNet,
}

/// What one range gave an ADD.
#[derive(Debug, Clone, Copy)]
struct Taken<'c> {
    /// The range, whose pool holds the address.
    managed: &'c ManagedRange,
    allocated: AllocatedIp,
    /// Not held by the owner before this call (so a failed ADD releases it).
    is_new: bool,
    /// The owner's previous address in this range, released once the whole ADD succeeded.
    moved_from: Option<IpAddr>,
}

/// The result of a pool update closure: a value, and whether the pool must be written.
struct Change<T> {
    value: T,
    changed: bool,
}

/// Something the engine went through that a long-running caller may want to count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineEvent {
    /// A pool write lost a compare-and-swap race and is retried.
    Conflict,
    /// A store call failed as unavailable and is retried.
    Unavailable,
}

/// An allocation to release as the controller found it ([`Ipam::release_found`]).
#[derive(Debug, Clone)]
pub struct FoundAllocation<'a> {
    /// Its address.
    pub ip: IpAddr,
    /// Its record as read.
    pub allocation: &'a Allocation,
    /// The names of the reservations of its address it holds.
    pub reservations: Vec<String>,
}

/// The engine over one store.
pub struct Ipam<'s, S> {
    store: &'s S,
    retry: RetryPolicy,
    observer: Option<&'s (dyn Fn(EngineEvent) + Sync)>,
}

impl<S> std::fmt::Debug for Ipam<'_, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ipam").field("retry", &self.retry).finish_non_exhaustive()
    }
}

fn reservation_of(allocation: &Allocation) -> Reservation {
    Reservation {
        pod_ref: allocation.pod_ref.clone(),
        ifname: allocation.ifname.clone(),
        container_id: allocation.container_id.clone(),
    }
}

impl<'s, S: Store> Ipam<'s, S> {
    /// An engine with the default retry policy.
    pub fn new(store: &'s S) -> Self {
        Ipam { store, retry: RetryPolicy::default(), observer: None }
    }

    /// Tells `observer` of every retried conflict and unavailable store (the controller counts them).
    pub fn with_observer(mut self, observer: &'s (dyn Fn(EngineEvent) + Sync)) -> Self {
        self.observer = Some(observer);
        self
    }

    fn observe(&self, event: EngineEvent) {
        if let Some(observer) = self.observer {
            observer(event);
        }
    }

    /// Replaces the retry policy.
    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// Runs a store call, retrying it while it fails with [`StoreError::Unavailable`] within
    /// [`RetryPolicy::unavailable_window`].
    async fn patiently<T, F: Future<Output = Result<T, StoreError>>>(
        &self,
        object: impl Fn() -> String,
        mut call: impl FnMut() -> F,
    ) -> Result<T, IpamError> {
        let started = Instant::now();
        let mut wait = Duration::from_millis(50);
        loop {
            match call().await {
                Err(StoreError::Unavailable(reason)) if started.elapsed() < self.retry.unavailable_window => {
                    tracing::debug!("{}: store unavailable ({reason}), retrying", object());
                    self.observe(EngineEvent::Unavailable);
                    tokio::time::sleep(wait.mul_f64(0.5 + fastrand::f64())).await;
                    wait = (wait * 2).min(Duration::from_secs(1));
                }
                result => return result.map_err(|source| IpamError::Store { object: object(), source }),
            }
        }
    }

    /// Reads and decodes a pool (an empty one when it does not exist yet).
    async fn load_pool(
        &self,
        name: &str,
        network: IpNet,
    ) -> Result<(Pool, Option<VersionedPool>), IpamError> {
        let stored = self.patiently(|| format!("pool {name}"), || self.store.read_pool(name)).await?;
        let Some(stored) = stored else { return Ok((Pool::new(network), None)) };
        let (pool, skipped) = Pool::from_spec(&stored.spec, network)
            .map_err(|source| IpamError::Pool { pool: name.to_string(), source })?;
        for key in skipped {
            tracing::warn!("Error decoding ip offset (pool {name}): skipping key {:?}", key.0);
        }
        Ok((pool, Some(stored)))
    }

    /// The compare-and-swap loop every pool change goes through; `change` also gets the number of races
    /// lost so far.
    async fn update_pool<T>(
        &self,
        name: &str,
        network: IpNet,
        mut change: impl FnMut(&mut Pool, u32) -> Result<Change<T>, IpamError>,
    ) -> Result<T, IpamError> {
        let started = Instant::now();
        let lock = self
            .store
            .lock_pool(name)
            .await
            .map_err(|source| IpamError::Store { object: format!("pool {name}"), source })?;
        for attempt in 0..self.retry.attempts {
            let (mut pool, base) = self.load_pool(name, network).await?;
            let Change { value, changed } = change(&mut pool, attempt)?;
            if !changed {
                return Ok(value);
            }
            let spec = pool.to_spec();
            let written = self
                .patiently(
                    || format!("pool {name}"),
                    || async {
                        // A write that failed as unavailable may still have landed: it then conflicts here,
                        // and the re-read below finds it.
                        match self.store.write_pool(name, &spec, base.as_ref(), lock.as_ref()).await {
                            Err(StoreError::Conflict) => Ok(Err(StoreError::Conflict)),
                            other => other.map(Ok),
                        }
                    },
                )
                .await?;
            match written {
                Ok(_) => return Ok(value),
                Err(StoreError::Conflict) if started.elapsed() < self.retry.deadline => {
                    tracing::debug!("pool {name}: conflict on attempt {attempt}, retrying");
                    self.observe(EngineEvent::Conflict);
                    tokio::time::sleep(self.retry.backoff(attempt)).await;
                }
                Err(StoreError::Conflict) => {
                    return Err(IpamError::Contention { pool: name.to_string(), attempts: attempt + 1 });
                }
                Err(source) => return Err(IpamError::Store { object: format!("pool {name}"), source }),
            }
        }
        Err(IpamError::Contention { pool: name.to_string(), attempts: self.retry.attempts })
    }

    /// Reads a pool without changing it.
    async fn inspect<T>(
        &self,
        name: &str,
        network: IpNet,
        f: impl FnOnce(&Pool) -> T,
    ) -> Result<T, IpamError> {
        let (pool, _) = self.load_pool(name, network).await?;
        Ok(f(&pool))
    }

    /// Removes `addr` from a pool if its holder still passes `still_held`; says whether it did.
    async fn remove_if(
        &self,
        name: &str,
        network: IpNet,
        addr: u128,
        still_held: impl Fn(&Allocation) -> bool,
    ) -> Result<bool, IpamError> {
        self.update_pool(name, network, |pool, _| {
            let held = pool.get(addr).is_some_and(&still_held);
            if held {
                pool.remove(addr);
            }
            Ok(Change { value: held, changed: held })
        })
        .await
    }

    /// Releases one allocation: its reservation first, then the pool entry (if `allocation` still holds
    /// it). A process killed in between leaves a pool entry without reservation, which the next DEL
    /// finds through the pool and finishes; the other order would leave a reservation nothing finds.
    async fn release_entry(
        &self,
        config: &IpamConfig,
        pool: &PoolTarget,
        ip: IpAddr,
        allocation: &Allocation,
    ) -> Result<bool, IpamError> {
        if config.enable_overlapping_ranges {
            self.delete_reservation(&config.network_name, ip, &reservation_of(allocation)).await?;
        }
        self.remove_if(&pool.name, pool.network, to_u128(ip), |a| a == allocation).await
    }

    async fn delete_reservation(
        &self,
        network_name: &str,
        ip: IpAddr,
        holder: &Reservation,
    ) -> Result<(), IpamError> {
        let name = reservation_name(network_name, ip);
        self.patiently(|| format!("reservation {name}"), || self.store.delete_reservation(&name, holder))
            .await
    }

    /// One address from every range for `owner`, all or nothing: when a range fails, the addresses this
    /// call newly took in earlier ranges are released before the error is returned, and addresses the
    /// owner is moving away from (to a requested one) are only released once every range succeeded.
    pub async fn allocate(&self, config: &IpamConfig, owner: &Owner) -> Result<Vec<AllocatedIp>, IpamError> {
        let mut done: Vec<Taken<'_>> = Vec::with_capacity(config.ranges.len());
        for managed in &config.ranges {
            match self.allocate_in_range(config, managed, owner).await {
                Ok(taken) => done.push(taken),
                Err(e) => {
                    // Exactly what this call wrote: a new sandbox of the same pod may have taken over since.
                    let wanted = owner.allocation();
                    for taken in done.iter().filter(|t| t.is_new) {
                        let (pool, ip) = (&taken.managed.pool, taken.allocated.ip);
                        if let Err(undo) = self.release_if(config, pool, ip, |a| a.same_holder(&wanted)).await
                        {
                            tracing::error!("releasing {} after a failed ADD: {undo}", taken.allocated.ip);
                        }
                    }
                    return Err(e);
                }
            }
        }
        for taken in &done {
            if let Some(old) = taken.moved_from {
                self.release_if(config, &taken.managed.pool, old, |a| a.is_owned_by(owner)).await?;
            }
        }
        Ok(done.into_iter().map(|t| t.allocated).collect())
    }

    /// Releases an address (and its reservation) if its holder passes `matches`.
    async fn release_if(
        &self,
        config: &IpamConfig,
        target: &PoolTarget,
        ip: IpAddr,
        matches: impl Fn(&Allocation) -> bool,
    ) -> Result<(), IpamError> {
        let addr = to_u128(ip);
        let held = self.inspect(&target.name, target.network, |pool| pool.get(addr).cloned()).await?;
        if let Some(allocation) = held.filter(|a| matches(a)) {
            self.release_entry(config, target, ip, &allocation).await?;
        }
        Ok(())
    }

    /// Allocates in one range, leaving an address the owner moves away from in place.
    async fn allocate_in_range<'c>(
        &self,
        config: &IpamConfig,
        managed: &'c ManagedRange,
        owner: &Owner,
    ) -> Result<Taken<'c>, IpamError> {
        let PoolTarget { name, network } = &managed.pool;
        let (name, network) = (name.clone(), *network);
        let wanted = owner.allocation();
        let mut blocked = IntervalSet::new();
        // ADDs without a requested address announce themselves in the node's writer queue, so that
        // whoever holds it allocates for them in the same write (see `crate::queue`).
        let mut announced = match managed.requested {
            None => self.store.queue_dir(&name).and_then(|dir| {
                let mut hasher = std::collections::hash_map::DefaultHasher::new();
                (&name, managed.range.describe(), config.gateway).hash(&mut hasher);
                Announced::write(&dir, hasher.finish(), owner)
            }),
            Some(_) => None,
        };
        for _ in 0..self.retry.attempts {
            let (assignment, ip) = self
                .update_pool(&name, network, |pool, conflicts| {
                    // After lost races, spread over the lowest few free addresses (see `Spread`).
                    let spread = Spread::after_conflicts(owner, conflicts);
                    let assignment = assign_spread(
                        &managed.range,
                        pool,
                        owner,
                        managed.requested,
                        config.gateway,
                        &blocked,
                        spread,
                    )
                    .map_err(|source| IpamError::Alloc { pool: name.clone(), source })?;
                    let unchanged =
                        matches!(assignment, Assignment::Existing(a) if pool.get(a).is_some_and(|a| a.same_holder(&wanted)));
                    // A move to a requested address keeps the old address until the new one is
                    // reserved, so a failed move leaves the owner as it was.
                    let first_step = match assignment {
                        Assignment::New { addr, .. } => Assignment::New { addr, replaces: None },
                        existing => existing,
                    };
                    let ip = apply(pool, first_step, owner);
                    // Then the ADDs waiting behind us that hold nothing here yet; one that cannot be
                    // served (the range is full for it) allocates for itself when its turn comes.
                    // Their announcements go now, while we hold the queue: one whose entry this write
                    // then fails to store finds nothing and allocates for itself.
                    let mut served = 0;
                    for waiting in announced.iter().flat_map(Announced::others) {
                        if !pool.owned(&waiting.owner).is_empty() {
                            continue;
                        }
                        // Addresses we know an overlapping range reserved are skipped for them too.
                        let gateway = config.gateway;
                        if let Ok(new) =
                            assign_spread(&managed.range, pool, &waiting.owner, None, gateway, &blocked, spread)
                        {
                            apply(pool, new, &waiting.owner);
                            let _ = std::fs::remove_file(&waiting.path);
                            served += 1;
                        }
                    }
                    Ok(Change { value: (assignment, ip), changed: !unchanged || served > 0 })
                })
                .await?;
            let allocated = AllocatedIp { ip, network: managed.network };
            // An entry the head of the writer queue made for us is ours to undo like one we made.
            let served = announced.as_ref().is_some_and(Announced::was_served);
            let is_new = matches!(assignment, Assignment::New { .. }) || served;
            let moved_from = match assignment {
                Assignment::New { replaces, .. } => replaces.map(|old| from_u128(Family::of(ip), old)),
                Assignment::Existing(_) => None,
            };
            let taken = Taken { managed, allocated, is_new, moved_from };
            if !config.enable_overlapping_ranges {
                return Ok(taken);
            }
            let reservation = reservation_of(&wanted);
            let reservation_key = reservation_name(&config.network_name, ip);
            let created = self
                .patiently(
                    || format!("reservation {reservation_key}"),
                    || self.store.create_reservation(&reservation_key, &reservation),
                )
                .await;
            let outcome = match created {
                Ok(outcome) => outcome,
                Err(error) => {
                    // Without its reservation the address is not ours to keep. But the failed call
                    // may have landed: undo it first, and drop the pool entry only once that worked,
                    // so that what is left is a pool entry the runtime's DEL finds, never a
                    // reservation nothing finds.
                    if is_new {
                        let undone =
                            match self.delete_reservation(&config.network_name, ip, &reservation).await {
                                Ok(()) => self
                                    .remove_if(&name, network, to_u128(ip), |a| a.same_holder(&wanted))
                                    .await
                                    .map(drop),
                                Err(e) => Err(e),
                            };
                        if let Err(undo) = undone {
                            tracing::error!("releasing {ip} after a failed reservation: {undo}");
                        }
                    }
                    return Err(error);
                }
            };
            match outcome {
                ReserveOutcome::Reserved => {
                    return Ok(taken);
                }
                ReserveOutcome::HeldBy(holder) => {
                    tracing::debug!(
                        "{ip} of pool {name} is reserved by {} in an overlapping range, skipping it",
                        holder.pod_ref
                    );
                    self.remove_if(&name, network, to_u128(ip), |a| a.same_holder(&wanted)).await?;
                    // Allocate for ourselves from now on: a head serving us would not know what we
                    // just learned about this address.
                    announced = None;
                    blocked.insert(to_u128(ip));
                    self.skip_reserved(config, managed, owner, &reservation, &mut blocked).await?;
                }
            }
        }
        Err(IpamError::Contention { pool: name, attempts: self.retry.attempts })
    }

    /// After a lost reservation, finds the next candidates that overlapping ranges already reserved by
    /// reading reservations, instead of writing the pool once for each of them.
    async fn skip_reserved(
        &self,
        config: &IpamConfig,
        managed: &ManagedRange,
        owner: &Owner,
        reservation: &Reservation,
        blocked: &mut IntervalSet,
    ) -> Result<(), IpamError> {
        let PoolTarget { name, network } = &managed.pool;
        let (pool, _) = self.load_pool(name, *network).await?;
        loop {
            let assignment = assign(&managed.range, &pool, owner, managed.requested, config.gateway, blocked)
                .map_err(|source| IpamError::Alloc { pool: name.clone(), source })?;
            let Assignment::New { addr, .. } = assignment else { return Ok(()) };
            let key = reservation_name(&config.network_name, from_u128(pool.family(), addr));
            let holder =
                self.patiently(|| format!("reservation {key}"), || self.store.read_reservation(&key)).await?;
            match holder {
                Some(holder) if !holder.same_owner(reservation) => {
                    blocked.insert(addr);
                }
                _ => return Ok(()),
            }
        }
    }

    /// Releases what (`container_id`, `ifname`) holds in every range (upstream stops at the first range
    /// without an allocation and leaks the others). Keeps going after an error and returns the first.
    pub async fn release(
        &self,
        config: &IpamConfig,
        container_id: &str,
        ifname: &str,
    ) -> Result<Vec<IpAddr>, IpamError> {
        let mut released = Vec::new();
        let mut first_error = None;
        for managed in &config.ranges {
            let target = &managed.pool;
            let outcome = async {
                // Normally one; more after a crash mid-move to a requested address.
                let held: Vec<(IpAddr, Allocation)> = self
                    .inspect(&target.name, target.network, |pool| {
                        pool.container_addresses(container_id, ifname)
                            .into_iter()
                            .filter_map(|addr| {
                                Some((from_u128(pool.family(), addr), pool.get(addr)?.clone()))
                            })
                            .collect()
                    })
                    .await?;
                for (ip, allocation) in held {
                    if self.release_entry(config, target, ip, &allocation).await? {
                        released.push(ip);
                    }
                }
                Ok::<(), IpamError>(())
            };
            if let Err(e) = outcome.await {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(released), Err)
    }

    /// Releases allocations of one pool found by looking at the stored state (the controller's way),
    /// in one pool write: for each, the reservations it names that still belong to its holder (see
    /// [`Reservation::deletable_by`]), then its pool entry if that is still exactly the record given.
    /// The pool write is a compare-and-swap on those records, so an allocation that changed since it
    /// was read (a new sandbox of the pod took it over) is left alone. Returns the addresses whose
    /// pool entries were removed.
    pub async fn release_found(
        &self,
        target: &PoolTarget,
        found: &[FoundAllocation<'_>],
    ) -> Result<Vec<IpAddr>, IpamError> {
        for entry in found {
            let holder = reservation_of(entry.allocation);
            for name in &entry.reservations {
                self.patiently(
                    || format!("reservation {name}"),
                    || self.store.delete_reservation(name, &holder),
                )
                .await?;
            }
        }
        self.update_pool(&target.name, target.network, |pool, _| {
            let mut removed = Vec::new();
            for entry in found {
                let addr = to_u128(entry.ip);
                if pool.get(addr) == Some(entry.allocation) {
                    pool.remove(addr);
                    removed.push(entry.ip);
                }
            }
            let changed = !removed.is_empty();
            Ok(Change { value: removed, changed })
        })
        .await
    }

    /// Deletes the reservation `name` if it still belongs to `holder` (an orphan found by the
    /// controller: no pool entry is behind it).
    pub async fn release_reservation(&self, name: &str, holder: &Reservation) -> Result<(), IpamError> {
        self.patiently(|| format!("reservation {name}"), || self.store.delete_reservation(name, holder)).await
    }

    /// The address (`container_id`, `ifname`) holds in each range, in range order (for CHECK).
    pub async fn held(
        &self,
        config: &IpamConfig,
        container_id: &str,
        ifname: &str,
    ) -> Result<Vec<Option<IpAddr>>, IpamError> {
        let mut out = Vec::with_capacity(config.ranges.len());
        for managed in &config.ranges {
            let PoolTarget { name, network } = &managed.pool;
            let held = self
                .inspect(name, *network, |pool| {
                    pool.container_addresses(container_id, ifname)
                        .first()
                        .map(|addr| from_u128(pool.family(), *addr))
                })
                .await?;
            out.push(held);
        }
        Ok(out)
    }

    /// CNI GC: releases this node's allocations of this network whose (container ID, interface) is not
    /// in `valid`. Allocations of other nodes, other networks, or without a recorded node are untouched.
    pub async fn collect_garbage(
        &self,
        config: &IpamConfig,
        node: &str,
        cni_network: &str,
        valid: &HashSet<(String, String)>,
    ) -> Result<Vec<IpAddr>, IpamError> {
        let mut released = Vec::new();
        for managed in &config.ranges {
            let target = &managed.pool;
            let stale: Vec<(IpAddr, Allocation)> = self
                .inspect(&target.name, target.network, |pool| {
                    pool.iter()
                        .filter(|(_, a)| {
                            a.node.as_deref() == Some(node)
                                && a.cni_network.as_deref() == Some(cni_network)
                                && !valid.contains(&(a.container_id.clone(), a.ifname.clone()))
                        })
                        .map(|(ip, a)| (ip, a.clone()))
                        .collect()
                })
                .await?;
            for (ip, allocation) in stale {
                if self.release_entry(config, target, ip, &allocation).await? {
                    released.push(ip);
                }
            }
        }
        Ok(released)
    }

    /// The pools (by name) in which no address is left (for STATUS).
    pub async fn exhausted_pools(&self, config: &IpamConfig) -> Result<Vec<String>, IpamError> {
        let mut exhausted = Vec::new();
        for managed in &config.ranges {
            let PoolTarget { name, network } = &managed.pool;
            let free = self
                .inspect(name, *network, |pool| {
                    lowest_free(&managed.range, pool, config.gateway, &IntervalSet::new())
                })
                .await?;
            if free.is_none() {
                exhausted.push(name.clone());
            }
        }
        Ok(exhausted)
    }
}
