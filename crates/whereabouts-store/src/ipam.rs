//! The IPAM engine: the core's allocation policy applied to a [`Store`] with compare-and-swap retries.
//!
//! Every change to a pool is read → compute (pure core) → write-if-unchanged. A lost race is retried
//! from a fresh read after a jittered exponential backoff.
//!
//! # One deadline per operation
//!
//! Each operation (an ADD, a DEL, a controller's release) has one budget ([`RetryPolicy::budget`]) and
//! every wait inside it ends at the same deadline: the node-local writer queue, lost races, a store
//! that is unavailable (an API server or etcd member restarting). A busy node is not an outage, so
//! nothing gives up on a shorter clock of its own. Past the deadline the caller gets
//! [`IpamError::Contention`] or the store's error (CNI code 11, try again later), and an ADD that
//! failed leaves nothing stored: what it took is released within a short grace
//! ([`ROLLBACK_GRACE`]) after the deadline, also an entry that the head of the writer queue stored for
//! it.
//!
//! # Allocation order under contention
//!
//! Without contention an ADD gets the lowest free address. Writers on different nodes that write one
//! pool at once would all pick the same lowest free addresses; a writer that lost a race, or whose node
//! lost one on this pool within the last seconds, takes its node's lane instead
//! ([`whereabouts_core::allocate::Lane`]): its whole batch takes consecutive free addresses from a
//! block chosen by a hash of its node, so that concurrent nodes' batches land side by side instead of
//! on top of each other.
//!
//! Every range says which pool holds its allocations ([`ManagedRange::pool`]): the pool named after the
//! range, or with node slices this node's pool of its slice. The engine reads and writes only that pool
//! and hands addresses out with the configured range's prefix ([`AllocatedIp::network`]).
//!
//! Order of writes:
//! * ADD writes the pool entry first, then the cluster-wide reservation. An address counts as handed out
//!   only once both exist. If the reservation is held by another attachment (an overlapping pool got
//!   there first), our pool entry is removed again and the address is skipped on the next try. A kill in
//!   between leaves a pool entry without reservation, which the runtime's DEL finds through the pool.
//! * Every release (DEL, GC, the rollback of a failed ADD, the controller's) is a compare-and-swap on
//!   what it decided on: the pool entry goes first, only if it is still exactly the record read, and
//!   then the reservation, only if it is still in the state read (a compare-and-delete), and only if the
//!   pool entry's holder (pod and interface; the container outside Kubernetes) held it. A pool entry that
//!   changed meanwhile (a new sandbox took it over, upstream's plugin rewrote its `id`) keeps its
//!   reservation; and a reservation taken over after the pool entry went is not deleted on the strength
//!   of the old reading. The container a reservation records is not compared: upstream's plugin takes
//!   an entry over for a new sandbox without touching the reservation, so the DEL of that sandbox
//!   releases a reservation that records the one before; the entry it removed is what stood behind it.
//!   A release cut off between the two writes (killed, the store gone) leaves a reservation without its
//!   entry, which blocks the address (it is never handed out twice) until the controller's reconciler
//!   or `whereabouts check --repair` deletes it; the other order would leave an entry without its
//!   reservation, an address an overlapping range can hand out again.

use std::collections::HashSet;
use std::future::Future;
use std::net::IpAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::future::join_all;
use ipnet::IpNet;
use thiserror::Error;
use whereabouts_core::addr::{Family, from_u128, to_u128};
use whereabouts_core::allocate::{
    AllocError, Assignment, Lane, apply, assign, assign_from, lane_start, lowest_free,
};
use whereabouts_core::config::{IpamConfig, ManagedRange, PoolTarget};
use whereabouts_core::interval::IntervalSet;
use whereabouts_core::pool::{Allocation, Owner, Pool, PoolError};
use whereabouts_core::range::reservation_name;

use crate::queue::{
    Announced, Announcement, Request, batch_key, mark_contended, recently_contended, remember_shape,
    was_large_and_shared,
};
use crate::{
    Deletion, PoolLock, Reservation, ReservationVersion, ReserveOutcome, Store, StoreError, VersionedPool,
};

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

/// How long after an operation's deadline a failed ADD may still spend releasing what it took.
pub const ROLLBACK_GRACE: Duration = Duration::from_secs(15);

/// The retry budget of one operation.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// The longest one operation (all its pools, queues, races and store outages together) may take
    /// before it gives up; a failed ADD's rollback may take [`ROLLBACK_GRACE`] more. Retrying an
    /// unavailable store is safe: every write is a compare-and-swap or idempotent, so a write that did
    /// land is found by the next read.
    pub budget: Duration,
    /// The first backoff ceiling after a lost race; it doubles per race lost.
    pub first_backoff: Duration,
    /// The largest backoff ceiling.
    pub max_backoff: Duration,
}

impl RetryPolicy {
    /// The budget of a CNI call: well inside the kubelet's two-minute runtime request timeout, with
    /// room for the rollback grace, and far beyond an API server or etcd restart (seconds).
    pub const DEFAULT_BUDGET: Duration = Duration::from_secs(90);
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            budget: Self::DEFAULT_BUDGET,
            first_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(50),
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

/// The answers of a head to the DELs it served: their entry was there and is removed, or was gone.
const REMOVED: &str = "removed";
const ABSENT: &str = "absent";

/// How a writer's wait in a pool's queue ended.
enum Turn {
    /// It holds the queue (`None` when the store has none).
    Locked(Option<PoolLock>),
    /// The head of the queue stored the request it announced, and answered this.
    Served(String),
}

/// What the writer at the head of a pool's queue needs beyond the range: the network's configuration
/// (for the reservations of the waiters it serves) and whether its node lost a race on the pool lately.
#[derive(Clone, Copy)]
struct Head<'c> {
    config: &'c IpamConfig,
    contended: bool,
}

/// How many reservations of `served` waiters the head makes at once. Each one at once needs a
/// connection of its own, and each new connection costs the API server a TLS handshake (about as much
/// as the request); one at a time keeps the head, and the ADDs it answers, waiting `served` round
/// trips. The square root balances the two: 3 at once for a batch of 8, 14 for 200.
fn served_reservations_at_once(served: usize) -> usize {
    (1..).find(|n| n * n >= served).unwrap_or(1)
}

/// The head's answer to a waiting ADD: the address stored for it (a decimal offset), and ` reserved`
/// when the head also made its reservation.
fn answer(addr: u128, reserved: bool) -> String {
    if reserved { format!("{addr} {RESERVED}") } else { addr.to_string() }
}

const RESERVED: &str = "reserved";

/// An answer [`answer`] wrote: the address, if it can be read, and whether it is reserved. An answer
/// that cannot be read (another version's) leaves the waiter to queue up after all.
fn parse_answer(answer: &str) -> (Option<u128>, bool) {
    let (addr, reserved) = match answer.split_once(' ') {
        Some((addr, flag)) => (addr, flag == RESERVED),
        None => (answer, false),
    };
    match addr.parse::<u128>() {
        Ok(addr) => (Some(addr), reserved),
        Err(_) => (None, false),
    }
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
    /// The reservations of its address it held, as read.
    pub reservations: Vec<JudgedReservation>,
}

/// A reservation a release was decided on: its name and the state it was read in, which its delete
/// presents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JudgedReservation {
    /// Its name.
    pub name: String,
    /// The state it was read in.
    pub version: ReservationVersion,
}

/// The engine over one store.
pub struct Ipam<'s, S> {
    store: &'s S,
    retry: RetryPolicy,
    /// The deadline of every operation, when the caller set one (a CNI call); else each operation
    /// gets [`RetryPolicy::budget`] from its start.
    deadline: Option<Instant>,
    observer: Option<&'s (dyn Fn(EngineEvent) + Sync)>,
}

impl<S> std::fmt::Debug for Ipam<'_, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ipam").field("retry", &self.retry).finish_non_exhaustive()
    }
}

/// Until when a failed ADD that reached `deadline` may still release what it took.
/// The time as release cooldowns record it: Unix seconds.
fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |since| since.as_secs())
}

/// When the release cooldown of an address `config` releases now ends: Unix seconds, rounded up.
fn cooldown_end(config: &IpamConfig) -> Option<u64> {
    config.release_cooldown.map(|cooldown| unix_now() + cooldown.as_millis().div_ceil(1000) as u64)
}

fn rollback_deadline(deadline: Instant) -> Instant {
    deadline.max(Instant::now()) + ROLLBACK_GRACE
}

impl<'s, S: Store> Ipam<'s, S> {
    /// An engine with the default retry policy.
    pub fn new(store: &'s S) -> Self {
        Ipam { store, retry: RetryPolicy::default(), deadline: None, observer: None }
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

    /// Ends every operation at `deadline` (a CNI call's, which opening the store already counted
    /// against), instead of [`RetryPolicy::budget`] after its start.
    pub fn with_deadline(mut self, deadline: Instant) -> Self {
        self.deadline = Some(deadline);
        self
    }

    /// The deadline of an operation starting now.
    fn deadline(&self) -> Instant {
        self.deadline.unwrap_or_else(|| Instant::now() + self.retry.budget)
    }

    /// Runs a store call, retrying it while it fails with [`StoreError::Unavailable`] until `deadline`.
    async fn patiently<T, F: Future<Output = Result<T, StoreError>>>(
        &self,
        deadline: Instant,
        object: impl Fn() -> String,
        mut call: impl FnMut() -> F,
    ) -> Result<T, IpamError> {
        let mut wait = Duration::from_millis(50);
        loop {
            match call().await {
                Err(StoreError::Unavailable(reason)) if Instant::now() < deadline => {
                    tracing::debug!("{}: store unavailable ({reason}), retrying", object());
                    self.observe(EngineEvent::Unavailable);
                    let pause = wait.mul_f64(0.5 + fastrand::f64());
                    tokio::time::sleep_until(deadline.min(Instant::now() + pause).into()).await;
                    wait = (wait * 2).min(Duration::from_secs(1));
                }
                result => return result.map_err(|source| IpamError::Store { object: object(), source }),
            }
        }
    }

    /// Reads and decodes a pool (an empty one when it does not exist yet).
    async fn load_pool(
        &self,
        deadline: Instant,
        name: &str,
        network: IpNet,
    ) -> Result<(Pool, Option<VersionedPool>), IpamError> {
        let stored =
            self.patiently(deadline, || format!("pool {name}"), || self.store.read_pool(name)).await?;
        let Some(stored) = stored else { return Ok((Pool::new(network), None)) };
        let (mut pool, skipped) = Pool::from_spec(&stored.spec, network)
            .map_err(|source| IpamError::Pool { pool: name.to_string(), source })?;
        // Ended cooldowns are dropped from what is written next (nothing is written for them alone).
        pool.expire_cooldowns(unix_now());
        if let Some(queue) = self.store.queue_dir(name).filter(|_| self.store.takes_turns()) {
            remember_shape(&queue, &pool);
        }
        for key in skipped {
            tracing::warn!("Error decoding ip offset (pool {name}): skipping key {:?}", key.0);
        }
        Ok((pool, Some(stored)))
    }

    /// The compare-and-swap loop every pool change goes through, until `deadline`; `change` also gets
    /// the number of races lost so far.
    async fn update_pool<T>(
        &self,
        deadline: Instant,
        name: &str,
        network: IpNet,
        change: impl FnMut(&mut Pool, u32) -> Result<Change<T>, IpamError>,
    ) -> Result<T, IpamError> {
        let lock = self.lock(deadline, name).await?;
        let updated = self.update_locked(deadline, name, network, lock.as_ref(), change).await;
        self.unlock(name, lock).await;
        updated
    }

    /// Ends this node's turn at a pool and lets go of its writer queue.
    async fn unlock(&self, name: &str, lock: Option<PoolLock>) {
        self.store.end_turn(name).await;
        drop(lock);
    }

    /// Takes this node's writer queue of a pool (see [`Store::lock_pool`]), then this node's turn among
    /// the nodes writing it ([`Store::take_turn`]).
    async fn lock(&self, deadline: Instant, name: &str) -> Result<Option<PoolLock>, IpamError> {
        let lock = self.lock_queue(deadline, name).await?;
        self.take_turn(deadline, name).await;
        Ok(lock)
    }

    /// Takes this node's turn among the nodes writing a pool when they may contend for it: a write of
    /// this node lost a race recently, the last turn had to wait for another node, or the pool is
    /// large and shared by nodes (a burst of overlapping writes to a large pool overwhelms the API
    /// server before anyone sees a lost race). A turn costs requests of its own (the pool Lease: read,
    /// take, give back), which a pool written by one node (a node's slice, a single-node cluster)
    /// would pay on every ADD for nothing.
    async fn take_turn(&self, deadline: Instant, name: &str) {
        let Some(queue) = self
            .store
            .queue_dir(name)
            .filter(|queue| recently_contended(queue) || was_large_and_shared(queue))
        else {
            return;
        };
        if self.store.take_turn(name, deadline).await {
            mark_contended(&queue);
        }
    }

    async fn lock_queue(&self, deadline: Instant, name: &str) -> Result<Option<PoolLock>, IpamError> {
        self.store
            .lock_pool(name, deadline)
            .await
            .map_err(|source| IpamError::Store { object: format!("pool {name}"), source })
    }

    /// Waits for this writer's turn in the pool's queue, or, when it announced a request there, until
    /// the head of the queue stored it, whichever comes first.
    async fn wait_turn(
        &self,
        deadline: Instant,
        name: &str,
        announced: Option<&Announced>,
    ) -> Result<Turn, IpamError> {
        let Some(announced) = announced else { return self.lock(deadline, name).await.map(Turn::Locked) };
        // Only the wait for the queue races the head's answer; the turn (a request to the store, not
        // to be abandoned half-way) is taken once the queue is ours.
        let lock = tokio::select! {
            lock = self.lock_queue(deadline, name) => lock?,
            answer = announced.served() => return Ok(Turn::Served(answer)),
        };
        // The head before us may have served us: it told us before it let go of the queue.
        if let Some(answer) = announced.answer() {
            return Ok(Turn::Served(answer));
        }
        self.take_turn(deadline, name).await;
        Ok(Turn::Locked(lock))
    }

    /// [`Ipam::update_pool`] for a writer that holds the pool's queue (`lock`, if the store has one).
    async fn update_locked<T>(
        &self,
        deadline: Instant,
        name: &str,
        network: IpNet,
        lock: Option<&PoolLock>,
        mut change: impl FnMut(&mut Pool, u32) -> Result<Change<T>, IpamError>,
    ) -> Result<T, IpamError> {
        let mut attempt = 0;
        loop {
            let (mut pool, base) = self.load_pool(deadline, name, network).await?;
            let Change { value, changed } = change(&mut pool, attempt)?;
            if !changed {
                return Ok(value);
            }
            let spec = pool.to_spec();
            let written = self
                .patiently(
                    deadline,
                    || format!("pool {name}"),
                    || async {
                        // A write that failed as unavailable may still have landed: it then conflicts here,
                        // and the re-read below finds it.
                        match self.store.write_pool(name, &spec, base.as_ref(), lock).await {
                            Err(StoreError::Conflict) => Ok(Err(StoreError::Conflict)),
                            other => other.map(Ok),
                        }
                    },
                )
                .await?;
            match written {
                Ok(_) => return Ok(value),
                Err(StoreError::Conflict) if Instant::now() < deadline => {
                    tracing::debug!("pool {name}: conflict on attempt {attempt}, retrying");
                    self.observe(EngineEvent::Conflict);
                    if let Some(queue) = self.store.queue_dir(name) {
                        mark_contended(&queue);
                    }
                    let pause = self.retry.backoff(attempt);
                    tokio::time::sleep_until(deadline.min(Instant::now() + pause).into()).await;
                    attempt += 1;
                }
                Err(StoreError::Conflict) => {
                    return Err(IpamError::Contention { pool: name.to_string(), attempts: attempt + 1 });
                }
                Err(source) => return Err(IpamError::Store { object: format!("pool {name}"), source }),
            }
        }
    }

    /// Reads a pool without changing it.
    async fn inspect<T>(
        &self,
        deadline: Instant,
        name: &str,
        network: IpNet,
        f: impl FnOnce(&Pool) -> T,
    ) -> Result<T, IpamError> {
        let (pool, _) = self.load_pool(deadline, name, network).await?;
        Ok(f(&pool))
    }

    /// Removes `addr` from a pool if its holder still passes `still_held`; says whether it did.
    async fn remove_if(
        &self,
        deadline: Instant,
        name: &str,
        network: IpNet,
        addr: u128,
        still_held: impl Fn(&Allocation) -> bool,
    ) -> Result<bool, IpamError> {
        self.update_pool(deadline, name, network, |pool, _| {
            let held = pool.get(addr).is_some_and(&still_held);
            if held {
                pool.remove(addr);
            }
            Ok(Change { value: held, changed: held })
        })
        .await
    }

    /// Releases one allocation: the pool entry, if it is still exactly `allocation`, then its
    /// reservation as read before (see the module on the order); says whether the entry was removed.
    /// With `cool_until`, the address's release cooldown is recorded in the same pool write.
    async fn release_entry(
        &self,
        deadline: Instant,
        config: &IpamConfig,
        pool: &PoolTarget,
        ip: IpAddr,
        allocation: &Allocation,
        cool_until: Option<u64>,
    ) -> Result<bool, IpamError> {
        let removal = self.remove_entry(deadline, pool, to_u128(ip), allocation, cool_until);
        self.with_reservation(deadline, config, ip, allocation, Some(&pool.name), removal).await
    }

    /// Runs `removal` of the pool entry of `ip` held by `holder`, reading the reservation of the address
    /// before and deleting it as read once the entry is gone (see the module): the entry is the
    /// holder's from before the read to the removal, so a reservation of the same attachment is the one
    /// that entry stood behind. Says whether the entry was removed.
    ///
    /// `queue` is the pool whose writer queue the caller does not hold: a head that stored the entry
    /// for a waiting ADD makes its reservation afterwards, while it still holds the queue, so a
    /// reservation not found yet may be in the making. The queue is then waited for once and the
    /// reservation read again; without that, the DEL of a served ADD killed in between would remove
    /// the entry and leave the reservation the head made next, blocking the address until the
    /// reconciler found it orphaned. A caller that holds the queue passes `None` (waiting for it would
    /// wait for itself); so does one for whom no head made the reservation. Stores without a writer
    /// queue have no heads.
    async fn with_reservation(
        &self,
        deadline: Instant,
        config: &IpamConfig,
        ip: IpAddr,
        holder: &Allocation,
        queue: Option<&str>,
        removal: impl Future<Output = Result<bool, IpamError>>,
    ) -> Result<bool, IpamError> {
        let reserved = if config.enable_overlapping_ranges {
            let name = reservation_name(&config.network_name, ip);
            let read_reservation = || {
                self.patiently(
                    deadline,
                    || format!("reservation {name}"),
                    || self.store.read_reservation(&name),
                )
            };
            let mut read = read_reservation().await?;
            let served_by_heads = |queue: &&str| self.store.queue_dir(queue).is_some();
            if let Some(queue) = queue.filter(served_by_heads).filter(|_| read.is_none()) {
                drop(self.lock_queue(deadline, queue).await?);
                read = read_reservation().await?;
            }
            read.filter(|read| read.holder.same_owner(&holder.reservation()))
                .map(|read| JudgedReservation { name: name.clone(), version: read.version })
        } else {
            None
        };
        let removed = removal.await?;
        if let Some(judged) = reserved.filter(|_| removed) {
            self.delete_judged(deadline, &judged).await?;
        }
        Ok(removed)
    }

    /// Removes the pool entry of `addr` if it is still exactly `allocation`; says whether it was there.
    /// The removal is announced in the node's writer queue, so that whoever holds it removes the
    /// entries of every DEL waiting there in one write.
    async fn remove_entry(
        &self,
        deadline: Instant,
        target: &PoolTarget,
        addr: u128,
        allocation: &Allocation,
        cool_until: Option<u64>,
    ) -> Result<bool, IpamError> {
        let PoolTarget { name, network } = target;
        let announced = self.store.queue_dir(name).and_then(|dir| {
            let request =
                Request::Release { addr: addr.to_string(), allocation: allocation.clone(), cool_until };
            Announced::write(&dir, batch_key((name, "release")), &request)
        });
        let lock = match self.wait_turn(deadline, name, announced.as_ref()).await? {
            Turn::Locked(lock) => lock,
            Turn::Served(answer) => return Ok(answer == REMOVED),
        };
        let mut claimed: Vec<Announcement> = Vec::new();
        let mut answers: Vec<&str> = Vec::new();
        let removed = self
            .update_locked(deadline, name, *network, lock.as_ref(), |pool, _| {
                let held = pool.get(addr) == Some(allocation);
                if held {
                    pool.release(addr, cool_until);
                }
                claimed.extend(announced.iter().flat_map(Announced::others).filter(Announcement::claim));
                answers.clear();
                for waiting in &claimed {
                    let Request::Release { addr, allocation, cool_until } = &waiting.request else {
                        continue;
                    };
                    let there = addr.parse::<u128>().ok().filter(|addr| pool.get(*addr) == Some(allocation));
                    if let Some(addr) = there {
                        pool.release(addr, *cool_until);
                    }
                    answers.push(if there.is_some() { REMOVED } else { ABSENT });
                }
                let changed = held || answers.contains(&REMOVED);
                Ok(Change { value: held, changed })
            })
            .await;
        // Told before the queue is let go of, so that a served DEL that gets the queue next still
        // learns that its entry was removed (it goes on to delete the reservation only then).
        if removed.is_ok() {
            for (waiting, answer) in claimed.iter().zip(answers) {
                waiting.done(answer);
            }
        }
        self.unlock(name, lock).await;
        removed
    }

    /// Deletes a reservation if it is still in the state it was judged in.
    async fn delete_judged(
        &self,
        deadline: Instant,
        judged: &JudgedReservation,
    ) -> Result<Deletion, IpamError> {
        let JudgedReservation { name, version } = judged;
        let deletion = self
            .patiently(
                deadline,
                || format!("reservation {name}"),
                || self.store.delete_reservation(name, version),
            )
            .await?;
        if deletion == Deletion::Changed {
            tracing::debug!("reservation {name} changed since it was read; left alone");
        }
        Ok(deletion)
    }

    /// One address from every range for `owner`, all or nothing: when a range fails, the addresses this
    /// call newly took in earlier ranges are released before the error is returned, and addresses the
    /// owner is moving away from (to a requested one) are only released once every range succeeded.
    pub async fn allocate(&self, config: &IpamConfig, owner: &Owner) -> Result<Vec<AllocatedIp>, IpamError> {
        let deadline = self.deadline();
        let mut done: Vec<Taken<'_>> = Vec::with_capacity(config.ranges.len());
        for managed in &config.ranges {
            match self.allocate_in_range(deadline, config, managed, owner).await {
                Ok(taken) => done.push(taken),
                Err(e) => {
                    // Exactly what this call wrote: a new sandbox of the same pod may have taken over since.
                    let wanted = owner.allocation();
                    let rollback = rollback_deadline(deadline);
                    for taken in done.iter().filter(|t| t.is_new) {
                        let (pool, ip) = (&taken.managed.pool, taken.allocated.ip);
                        let undone =
                            self.release_if(rollback, config, pool, ip, |a| a.same_holder(&wanted)).await;
                        if let Err(undo) = undone {
                            tracing::error!("releasing {} after a failed ADD: {undo}", taken.allocated.ip);
                        }
                    }
                    return Err(e);
                }
            }
        }
        for taken in &done {
            if let Some(old) = taken.moved_from {
                self.release_if(deadline, config, &taken.managed.pool, old, |a| a.is_owned_by(owner)).await?;
            }
        }
        Ok(done.into_iter().map(|t| t.allocated).collect())
    }

    /// Releases an address (and its reservation) if its holder passes `matches`.
    async fn release_if(
        &self,
        deadline: Instant,
        config: &IpamConfig,
        target: &PoolTarget,
        ip: IpAddr,
        matches: impl Fn(&Allocation) -> bool,
    ) -> Result<(), IpamError> {
        let addr = to_u128(ip);
        let held =
            self.inspect(deadline, &target.name, target.network, |pool| pool.get(addr).cloned()).await?;
        if let Some(allocation) = held.filter(|a| matches(a)) {
            self.release_entry(deadline, config, target, ip, &allocation, None).await?;
        }
        Ok(())
    }

    /// Allocates in one range, leaving an address the owner moves away from in place. An ADD without a
    /// requested address announces itself in the node's writer queue, so that whoever holds the queue
    /// allocates for it in the same write (see [`crate::queue`]); when the ADD fails after such a head
    /// claimed it, the entry stored for it is released, so that a failed ADD leaves nothing behind.
    async fn allocate_in_range<'c>(
        &self,
        deadline: Instant,
        config: &IpamConfig,
        managed: &'c ManagedRange,
        owner: &Owner,
    ) -> Result<Taken<'c>, IpamError> {
        let PoolTarget { name, network } = &managed.pool;
        let mut announced = match managed.requested {
            None => self.store.queue_dir(name).and_then(|dir| {
                // Waiters served together get their reservations made by the head too: they must
                // agree on whether and under which network name.
                let reserved_as = config.enable_overlapping_ranges.then_some(&config.network_name);
                let batch = batch_key((name, managed.range.describe(), managed.gateway, reserved_as));
                Announced::write(&dir, batch, &Request::Allocate(owner.clone()))
            }),
            Some(_) => None,
        };
        let taken = self.take_in_range(deadline, config, managed, owner, &mut announced).await;
        if taken.is_err() && announced.is_some_and(|a| !a.withdraw()) {
            // A head claimed us, and may have stored an entry for us (and made its reservation, when
            // the network has them) or still be doing so. It does so while holding the queue, so what
            // it stored is read once we hold the queue ourselves.
            let wanted = owner.allocation();
            let rollback = rollback_deadline(deadline);
            let undone = async {
                let lock = self.lock(rollback, name).await?;
                let undone = async {
                    let (pool, _) = self.load_pool(rollback, name, *network).await?;
                    let mine = pool.owned(owner).into_iter();
                    let mine = mine.filter(|addr| pool.get(*addr).is_some_and(|a| a.same_holder(&wanted)));
                    for addr in mine {
                        let removal =
                            self.update_locked(rollback, name, *network, lock.as_ref(), |pool, _| {
                                let held = pool.get(addr).is_some_and(|a| a.same_holder(&wanted));
                                if held {
                                    pool.remove(addr);
                                }
                                Ok(Change { value: held, changed: held })
                            });
                        let ip = from_u128(pool.family(), addr);
                        self.with_reservation(rollback, config, ip, &wanted, None, removal).await?;
                    }
                    Ok::<(), IpamError>(())
                }
                .await;
                self.unlock(name, lock).await;
                undone
            };
            if let Err(undo) = undone.await {
                tracing::error!("pool {name}: releasing what was allocated for a failed ADD: {undo}");
            }
        }
        taken
    }

    /// [`Ipam::allocate_in_range`] until the address is stored (and reserved); `announced` is this
    /// ADD's place in the writer queue, dropped once serving it would no longer be right.
    async fn take_in_range<'c>(
        &self,
        deadline: Instant,
        config: &IpamConfig,
        managed: &'c ManagedRange,
        owner: &Owner,
        announced: &mut Option<Announced>,
    ) -> Result<Taken<'c>, IpamError> {
        let PoolTarget { name, network } = &managed.pool;
        let (name, network) = (name.clone(), *network);
        let wanted = owner.allocation();
        let mut blocked = IntervalSet::new();
        // A node that lost a race on this pool moments ago starts in its lane (see `Lane`).
        let contended = self.store.queue_dir(&name).is_some_and(|queue| recently_contended(&queue));
        loop {
            let turn = self.wait_turn(deadline, &name, announced.as_ref()).await?;
            let (answered, reserved_by_head) = match &turn {
                Turn::Served(answer) => parse_answer(answer),
                Turn::Locked(_) => (None, false),
            };
            let (assignment, ip) = match (answered, turn) {
                // The head's write that stored our entry succeeded: its answer is our address.
                (Some(addr), _) => {
                    (Assignment::Existing(addr), from_u128(Family::of(managed.network.addr()), addr))
                }
                (None, turn) => {
                    let lock = match turn {
                        Turn::Locked(lock) => lock,
                        // An answer that cannot be read: queue up after all.
                        Turn::Served(_) => self.lock(deadline, &name).await?,
                    };
                    let announced = announced.as_ref();
                    let head = Head { config, contended };
                    self.allocate_locked(deadline, managed, owner, &blocked, announced, lock, head).await?
                }
            };
            let allocated = AllocatedIp { ip, network: managed.network };
            // An entry the head of the writer queue made for us is ours to undo like one we made.
            let served = announced.as_ref().is_some_and(Announced::was_served);
            let is_new = matches!(assignment, Assignment::New { .. }) || served;
            let moved_from = match assignment {
                Assignment::New { replaces, .. } => replaces.map(|old| from_u128(Family::of(ip), old)),
                Assignment::Existing(_) => None,
            };
            let taken = Taken { managed, allocated, is_new, moved_from };
            if !config.enable_overlapping_ranges || reserved_by_head {
                return Ok(taken);
            }
            let reservation = wanted.reservation();
            let reservation_key = reservation_name(&config.network_name, ip);
            let created = self
                .patiently(
                    deadline,
                    || format!("reservation {reservation_key}"),
                    || self.store.create_reservation(&reservation_key, &reservation),
                )
                .await;
            let outcome = match created {
                Ok(outcome) => outcome,
                Err(error) => {
                    // Without its reservation the address is not ours to keep; the failed call may
                    // have landed, so what it made goes too, as every release goes.
                    if is_new {
                        let rollback = rollback_deadline(deadline);
                        let removal =
                            self.remove_if(rollback, &name, network, to_u128(ip), |a| a.same_holder(&wanted));
                        let undo = self.with_reservation(rollback, config, ip, &wanted, None, removal);
                        if let Err(undo) = undo.await {
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
                    self.remove_if(deadline, &name, network, to_u128(ip), |a| a.same_holder(&wanted)).await?;
                    // Allocate for ourselves from now on: a head serving us would not know what we
                    // just learned about this address.
                    *announced = None;
                    blocked.insert(to_u128(ip));
                    self.skip_reserved(deadline, config, managed, owner, &reservation, &mut blocked).await?;
                }
            }
        }
    }

    /// The one pool write of an ADD that holds the pool's queue (`lock`, let go of here): the owner's
    /// address, and addresses for the ADDs announced behind it (told once the write is stored), from
    /// the owner's node's lane.
    #[allow(clippy::too_many_arguments, reason = "one call site, every argument a distinct input")]
    async fn allocate_locked(
        &self,
        deadline: Instant,
        managed: &ManagedRange,
        owner: &Owner,
        blocked: &IntervalSet,
        announced: Option<&Announced>,
        lock: Option<PoolLock>,
        head: Head<'_>,
    ) -> Result<(Assignment, IpAddr), IpamError> {
        let Head { config, contended } = head;
        let PoolTarget { name, network } = &managed.pool;
        let wanted = owner.allocation();
        // The lane is this node's: its queue's head allocates for the whole node (see `Lane`).
        let writer = owner.node.as_deref().or(owner.pod_ref.as_deref()).unwrap_or(&owner.container_id);
        // Announcements claimed by this write stay claimed when it is retried.
        let mut claimed: Vec<Announcement> = Vec::new();
        let mut served: Vec<(usize, u128)> = Vec::new();
        let taken = self
            .update_locked(deadline, name, *network, lock.as_ref(), |pool, conflicts| {
                let lane = Lane::of(writer, conflicts + u32::from(contended));
                let start = lane_start(&managed.range, pool, managed.gateway, blocked, lane)
                    .unwrap_or(managed.range.first());
                let assignment =
                    assign_from(&managed.range, pool, owner, managed.requested, managed.gateway, blocked, start)
                        .map_err(|source| IpamError::Alloc { pool: name.clone(), source })?;
                let unchanged = matches!(assignment, Assignment::Existing(a) if pool.get(a).is_some_and(|a| a.same_holder(&wanted)));
                // A move to a requested address keeps the old address until the new one is
                // reserved, so a failed move leaves the owner as it was.
                let first_step = match assignment {
                    Assignment::New { addr, .. } => Assignment::New { addr, replaces: None },
                    existing => existing,
                };
                let ip = apply(pool, first_step, owner);
                // Then the ADDs waiting behind us, on from our lane's start; one that holds something
                // here already, or cannot be served (the range is full for it), allocates for itself
                // when its turn comes. Addresses we know an overlapping range reserved are skipped for
                // them too.
                claimed.extend(announced.into_iter().flat_map(Announced::others).filter(Announcement::claim));
                served.clear();
                for (index, waiting) in claimed.iter().enumerate() {
                    let Request::Allocate(waiting) = &waiting.request else { continue };
                    if !pool.owned(waiting).is_empty() {
                        continue;
                    }
                    if let Ok(new) = assign_from(&managed.range, pool, waiting, None, managed.gateway, blocked, start) {
                        apply(pool, new, waiting);
                        served.push((index, new.addr()));
                    }
                }
                Ok(Change { value: (assignment, ip), changed: !unchanged || !served.is_empty() })
            })
            .await;
        // Told before the queue is let go of (see `Announced::answer`).
        if taken.is_ok() && !served.is_empty() {
            let reserved = self.reserve_served(managed, config, &claimed, &served).await;
            for ((index, addr), reserved) in served.into_iter().zip(reserved) {
                claimed[index].done(&answer(addr, reserved));
            }
        }
        self.unlock(name, lock).await;
        taken
    }

    /// Makes the reservations of the addresses just stored for waiting ADDs (`served`, indices into
    /// `claimed`), when the network has reservations; says for each whether it is made. A served process
    /// told so sends no request of its own at all (on a burst, each would otherwise open a connection to
    /// the store for this one request, and the API server's share of a TLS handshake costs about as
    /// much as the request). Anything but a reservation made (held by another attachment, the store
    /// failing) is left to the served process, which handles it as when it allocates for itself. The
    /// pool's turn among nodes ends first: other nodes need not wait for these.
    async fn reserve_served(
        &self,
        managed: &ManagedRange,
        config: &IpamConfig,
        claimed: &[Announcement],
        served: &[(usize, u128)],
    ) -> Vec<bool> {
        if !config.enable_overlapping_ranges {
            return vec![false; served.len()];
        }
        self.store.end_turn(&managed.pool.name).await;
        let family = Family::of(managed.network.addr());
        let mut reservations = served.iter().map(|(index, addr)| {
            let holder = match &claimed[*index].request {
                Request::Allocate(waiting) => Some(waiting.allocation().reservation()),
                Request::Release { .. } => None,
            };
            let key = reservation_name(&config.network_name, from_u128(family, *addr));
            async move {
                let holder = holder?;
                match self.store.create_reservation(&key, &holder).await {
                    Ok(ReserveOutcome::Reserved) => Some(()),
                    _ => None,
                }
            }
        });
        let at_once = served_reservations_at_once(served.len());
        let mut made = Vec::with_capacity(served.len());
        loop {
            let some: Vec<_> = reservations.by_ref().take(at_once).collect();
            if some.is_empty() {
                return made;
            }
            made.extend(join_all(some).await.into_iter().map(|made| made.is_some()));
        }
    }

    /// After a lost reservation, finds the next candidates that overlapping ranges already reserved by
    /// reading reservations, instead of writing the pool once for each of them.
    async fn skip_reserved(
        &self,
        deadline: Instant,
        config: &IpamConfig,
        managed: &ManagedRange,
        owner: &Owner,
        reservation: &Reservation,
        blocked: &mut IntervalSet,
    ) -> Result<(), IpamError> {
        let PoolTarget { name, network } = &managed.pool;
        let (pool, _) = self.load_pool(deadline, name, *network).await?;
        loop {
            let assignment =
                assign(&managed.range, &pool, owner, managed.requested, managed.gateway, blocked)
                    .map_err(|source| IpamError::Alloc { pool: name.clone(), source })?;
            let Assignment::New { addr, .. } = assignment else { return Ok(()) };
            let key = reservation_name(&config.network_name, from_u128(pool.family(), addr));
            let holder = self
                .patiently(deadline, || format!("reservation {key}"), || self.store.read_reservation(&key))
                .await?;
            match holder.map(|read| read.holder) {
                Some(holder) if !holder.same_owner(reservation) => {
                    blocked.insert(addr);
                }
                _ => return Ok(()),
            }
        }
    }

    /// Releases what (`container_id`, `ifname`) holds in every range (upstream stops at the first range
    /// without an allocation and leaks the others). Keeps going after an error and returns the first.
    /// Persistent entries ([`Allocation::is_persistent`]) are held for the next sandbox instead
    /// ([`Allocation::held`]) and not counted as released.
    pub async fn release(
        &self,
        config: &IpamConfig,
        container_id: &str,
        ifname: &str,
    ) -> Result<Vec<IpAddr>, IpamError> {
        let deadline = self.deadline();
        let cool_until = cooldown_end(config);
        let mut released = Vec::new();
        let mut first_error = None;
        for managed in &config.ranges {
            let target = &managed.pool;
            let outcome = async {
                // Normally one; more after a crash mid-move to a requested address.
                let held_now = || {
                    self.inspect(deadline, &target.name, target.network, |pool| {
                        pool.container_addresses(container_id, ifname)
                            .into_iter()
                            .filter_map(|addr| {
                                Some((from_u128(pool.family(), addr), pool.get(addr)?.clone()))
                            })
                            .collect::<Vec<(IpAddr, Allocation)>>()
                    })
                };
                let mut held = held_now().await?;
                if held.is_empty() {
                    // The DEL of an ADD killed while it waited in the writer queue: the head may have
                    // claimed it and be writing its entry right now. Heads write while holding the
                    // queue, so once we have held it too, whatever they stored for it is there to see.
                    drop(self.lock_queue(deadline, &target.name).await?);
                    held = held_now().await?;
                }
                for (ip, allocation) in held {
                    if allocation.is_persistent(config.sticky_statefulsets) {
                        self.hold_entry(deadline, target, to_u128(ip), &allocation).await?;
                        continue;
                    }
                    if self.release_entry(deadline, config, target, ip, &allocation, cool_until).await? {
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

    /// Keeps a persistent entry (an IPAMClaim's, or a StatefulSet's pod's with `sticky_statefulsets`)
    /// for the next sandbox: rewritten as [`Allocation::held`] if it is still exactly `allocation`, its
    /// reservation left as it is (the next ADD takes it over, as it takes the entry over).
    async fn hold_entry(
        &self,
        deadline: Instant,
        target: &PoolTarget,
        addr: u128,
        allocation: &Allocation,
    ) -> Result<(), IpamError> {
        self.update_pool(deadline, &target.name, target.network, |pool, _| {
            let still = pool.get(addr) == Some(allocation);
            if still {
                pool.insert(addr, allocation.held());
            }
            Ok(Change { value: (), changed: still })
        })
        .await
    }

    /// Releases allocations of one pool found by looking at the stored state (the controller's way):
    /// one compare-and-swap write of the pool removing each allocation that is still exactly the record
    /// given, then the reservations of the removed ones, each only if it is still in the state it was
    /// read in (see the module on the order). An allocation that changed since it was read (a new
    /// sandbox of the pod took it over) is left alone with its reservations. Returns the addresses
    /// whose pool entries were removed; an error after the pool write means a reservation could not be
    /// deleted (the reconciler finds it orphaned).
    pub async fn release_found(
        &self,
        target: &PoolTarget,
        found: &[FoundAllocation<'_>],
    ) -> Result<Vec<IpAddr>, IpamError> {
        let deadline = self.deadline();
        let removed = self
            .update_pool(deadline, &target.name, target.network, |pool, _| {
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
            .await?;
        let mut first_error = None;
        for entry in found.iter().filter(|entry| removed.contains(&entry.ip)) {
            for judged in &entry.reservations {
                if let Err(e) = self.delete_judged(deadline, judged).await {
                    first_error.get_or_insert(e);
                }
            }
        }
        first_error.map_or(Ok(removed), Err)
    }

    /// Makes the reservation `name` for `holder` as an ADD makes it ([`Store::create_reservation`]):
    /// the controller's repair of an allocation whose reservation is missing.
    pub async fn reserve(&self, name: &str, holder: &Reservation) -> Result<ReserveOutcome, IpamError> {
        self.patiently(
            self.deadline(),
            || format!("reservation {name}"),
            || self.store.create_reservation(name, holder),
        )
        .await
    }

    /// Deletes the reservation `judged` names if it is still in the state it was judged in (an orphan
    /// found by the controller: no pool entry stood behind it).
    pub async fn release_reservation(&self, judged: &JudgedReservation) -> Result<Deletion, IpamError> {
        self.delete_judged(self.deadline(), judged).await
    }

    /// The first of `candidates` whose pool holds an address of `owner` (its pod and interface): where
    /// a StatefulSet's pod's address is held when it may be another node's slice pool.
    pub async fn find_owner<'r>(
        &self,
        candidates: &'r [ManagedRange],
        owner: &Owner,
    ) -> Result<Option<&'r ManagedRange>, IpamError> {
        let deadline = self.deadline();
        for candidate in candidates {
            let PoolTarget { name, network } = &candidate.pool;
            if self.inspect(deadline, name, *network, |pool| !pool.owned(owner).is_empty()).await? {
                return Ok(Some(candidate));
            }
        }
        Ok(None)
    }

    /// The address (`container_id`, `ifname`) holds in each range, in range order (for CHECK).
    pub async fn held(
        &self,
        config: &IpamConfig,
        container_id: &str,
        ifname: &str,
    ) -> Result<Vec<Option<IpAddr>>, IpamError> {
        let deadline = self.deadline();
        let mut out = Vec::with_capacity(config.ranges.len());
        for managed in &config.ranges {
            let PoolTarget { name, network } = &managed.pool;
            let held = self
                .inspect(deadline, name, *network, |pool| {
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
        let deadline = self.deadline();
        let mut released = Vec::new();
        for managed in &config.ranges {
            let target = &managed.pool;
            let stale: Vec<(IpAddr, Allocation)> = self
                .inspect(deadline, &target.name, target.network, |pool| {
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
                if self.release_entry(deadline, config, target, ip, &allocation, cooldown_end(config)).await?
                {
                    released.push(ip);
                }
            }
        }
        Ok(released)
    }

    /// The pools (by name) in which no address is left (for STATUS).
    pub async fn exhausted_pools(&self, config: &IpamConfig) -> Result<Vec<String>, IpamError> {
        let deadline = self.deadline();
        let mut exhausted = Vec::new();
        for managed in &config.ranges {
            let PoolTarget { name, network } = &managed.pool;
            let free = self
                .inspect(deadline, name, *network, |pool| {
                    lowest_free(&managed.range, pool, managed.gateway, &IntervalSet::new())
                })
                .await?;
            if free.is_none() {
                exhausted.push(name.clone());
            }
        }
        Ok(exhausted)
    }
}
