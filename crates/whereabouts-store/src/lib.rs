//! Storage for whereabouts-rs.
//!
//! [`Store`] is the one trait every backend implements. It is shaped for distributed stores: a
//! versioned read of one pool, a compare-and-swap write of that pool, and create-if-absent /
//! compare-and-delete of a cluster-wide reservation of one address (upstream's
//! OverlappingRangeIPReservation). Backends hold no allocation rules: [`ipam`] drives them with the
//! core's policy and retries conflicts.

use std::future::Future;
use std::time::Instant;

use thiserror::Error;
use whereabouts_core::pool::PoolSpec;
pub use whereabouts_core::pool::Reservation;

#[cfg(feature = "etcd")]
pub mod etcd;
pub mod file;
pub mod ipam;
#[cfg(feature = "kubernetes")]
pub mod kubernetes;
mod lock;
#[cfg(feature = "kubernetes")]
mod pool_lease;
mod queue;

/// Which stored state of a pool a read saw, in the terms of the store that holds it. A write presents
/// it back to the same store; each store accepts only its own kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Version {
    /// The file store's write counter.
    Counter(u64),
    /// The etcd key's `mod_revision`.
    Revision(i64),
    /// The IPPool's resourceVersion, with the allocations and annotation as the API server sent them,
    /// which the Kubernetes store's patch tests.
    #[cfg(feature = "kubernetes")]
    Object(kubernetes::ObjectVersion),
}

impl Version {
    /// A store's answer to a version of another store's kind: a caller's bug, never a lost race.
    fn foreign(&self, store: &str) -> StoreError {
        StoreError::ForeignVersion(format!("the {store} store was given {self:?}"))
    }
}

/// A pool as read, with the version a write must present.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionedPool {
    /// The stored spec.
    pub spec: PoolSpec,
    /// Its version.
    pub version: Version,
}

/// A writer lock on one pool, held from before the read to after the write of a read-modify-write;
/// dropping it releases the lock. Only backends that can lock cheaply and locally hand these out.
pub struct PoolLock {
    key: String,
    _held: Box<dyn Send + Sync>,
}

impl PoolLock {
    /// A lock identified by `key` (unique per backend and pool), released when `held` is dropped.
    pub fn new(key: String, held: impl Send + Sync + 'static) -> Self {
        PoolLock { key, _held: Box::new(held) }
    }

    /// What the lock is for.
    pub fn key(&self) -> &str {
        &self.key
    }
}

impl std::fmt::Debug for PoolLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolLock").field("key", &self.key).finish_non_exhaustive()
    }
}

/// One stored state of a reservation, as a read saw it: [`Store::delete_reservation`] removes the
/// reservation only while it is still in this state.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ReservationVersion {
    /// Which object: the Kubernetes store's `metadata.uid` (a reservation deleted and created again is
    /// another object). Empty in stores whose revisions never repeat (etcd) or that compare content
    /// (the file store).
    pub uid: String,
    /// Which state of it: the Kubernetes store's `resourceVersion`, the etcd key's `mod_revision`, the
    /// file store's content.
    pub revision: String,
}

/// A reservation as read, with its version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionedReservation {
    /// Who holds it.
    pub holder: Reservation,
    /// The stored state it was read in.
    pub version: ReservationVersion,
}

/// What `delete_reservation` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deletion {
    /// The reservation is gone: deleted now, or already before.
    Deleted,
    /// It changed since it was read (taken over, or deleted and created again): left as it is.
    Changed,
}

/// What `create_reservation` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReserveOutcome {
    /// The reservation did not exist and now belongs to the caller (or already did).
    Reserved,
    /// Someone else holds it.
    HeldBy(Reservation),
}

/// Why a store operation failed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum StoreError {
    /// The compare-and-swap lost: the pool changed (or appeared) since it was read.
    #[error("the pool changed since it was read")]
    Conflict,
    /// The store did not answer in time or cannot be reached; trying again later may work.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// Stored data cannot be decoded; it is left untouched.
    #[error("stored data at {location} is corrupt: {reason}")]
    Corrupt {
        /// Which object or file.
        location: String,
        /// What is wrong.
        reason: String,
    },
    /// Any other I/O failure.
    #[error("store I/O error: {0}")]
    Io(String),
    /// The store refused an object as invalid (a Kubernetes object name derived from a range or an
    /// address that the API server does not accept, say): retrying cannot help.
    #[error("{0}")]
    Rejected(String),
    /// The store refused the credentials or their permissions: a configuration problem.
    #[error("{0} (check the store's credentials and their permissions)")]
    Denied(String),
    /// A write presented a version this store never hands out.
    #[error("a pool version of another store: {0}")]
    ForeignVersion(String),
}

/// A store of pools and reservations. Every change is a compare-and-swap or a create-if-absent.
pub trait Store: Send + Sync {
    /// Reads one pool; `None` when it does not exist.
    fn read_pool(&self, name: &str)
    -> impl Future<Output = Result<Option<VersionedPool>, StoreError>> + Send;

    /// Serialises the writers of one pool where the backend can do so cheaply (the file store's flock),
    /// so that many processes on one pool queue up instead of losing compare-and-swap races over and
    /// over. Distributed stores keep this default (no lock) and rely on compare-and-swap alone; either
    /// way every write stays a compare-and-swap. Waits for the lock until `deadline` at most.
    fn lock_pool(
        &self,
        name: &str,
        deadline: Instant,
    ) -> impl Future<Output = Result<Option<PoolLock>, StoreError>> + Send {
        let _ = (name, deadline);
        std::future::ready(Ok(None))
    }

    /// Whether [`Store::take_turn`] takes turns at all (the Kubernetes store); the engine keeps what it
    /// decides them on only for stores that do.
    fn takes_turns(&self) -> bool {
        false
    }

    /// Waits, after [`Store::lock_pool`], for this node's turn among the nodes writing the pool, where
    /// the store has such turns (the Kubernetes store's pool Lease), until `deadline` at most; says
    /// whether another node held the turn meanwhile. Turns are an optimisation: without one the write
    /// is still a compare-and-swap.
    fn take_turn(&self, name: &str, deadline: Instant) -> impl Future<Output = bool> + Send {
        let _ = (name, deadline);
        std::future::ready(false)
    }

    /// Ends the turn [`Store::take_turn`] took, before the lock is dropped.
    fn end_turn(&self, name: &str) -> impl Future<Output = ()> + Send {
        let _ = name;
        std::future::ready(())
    }

    /// Where ADDs waiting in this node's writer queue of a pool announce themselves, so that the writer
    /// holding the [`Store::lock_pool`] lock allocates for them in its own write (see [`queue`]). Only
    /// stores with a node-local writer queue whose writes are round trips have one.
    fn queue_dir(&self, name: &str) -> Option<std::path::PathBuf> {
        let _ = name;
        None
    }

    /// Replaces the pool read as `base` with `spec` if it has not changed since (its version is still
    /// `base.version`); with `None`, creates it if it does not exist. Fails with [`StoreError::Conflict`]
    /// otherwise. A store may narrow the compare to the allocations that differ between `base` and
    /// `spec` (the Kubernetes store does: see its module). `lock` is the caller's [`Store::lock_pool`]
    /// guard, if it holds one.
    fn write_pool(
        &self,
        name: &str,
        spec: &PoolSpec,
        base: Option<&VersionedPool>,
        lock: Option<&PoolLock>,
    ) -> impl Future<Output = Result<Version, StoreError>> + Send;

    /// Creates the reservation of one address unless it exists.
    /// When the same attachment already holds it under another container ID (a pod's new sandbox), the
    /// reservation is taken over: its container ID is updated.
    fn create_reservation(
        &self,
        name: &str,
        owner: &Reservation,
    ) -> impl Future<Output = Result<ReserveOutcome, StoreError>> + Send;

    /// Reads one reservation; `None` when nobody holds it.
    fn read_reservation(
        &self,
        name: &str,
    ) -> impl Future<Output = Result<Option<VersionedReservation>, StoreError>> + Send;

    /// Deletes the reservation `name` if it is still in the state `as_read` (a compare-and-delete): one
    /// that changed since is left alone ([`Deletion::Changed`]), so a delete decided on a reading
    /// never removes what another writer made of the reservation meanwhile.
    fn delete_reservation(
        &self,
        name: &str,
        as_read: &ReservationVersion,
    ) -> impl Future<Output = Result<Deletion, StoreError>> + Send;

    /// Names of every pool (for operators' tools and tests).
    fn list_pools(&self) -> impl Future<Output = Result<Vec<String>, StoreError>> + Send;

    /// Every reservation, by name, with its version.
    fn list_reservations(
        &self,
    ) -> impl Future<Output = Result<Vec<(String, VersionedReservation)>, StoreError>> + Send;
}

/// Any of the stores, chosen by configuration at run time.
#[derive(Debug)]
pub enum AnyStore {
    /// The embedded file store.
    File(file::FileStore),
    /// The etcd v3 store (boxed: its client is large).
    #[cfg(feature = "etcd")]
    Etcd(Box<etcd::EtcdStore>),
    /// The Kubernetes store.
    #[cfg(feature = "kubernetes")]
    Kubernetes(Box<kubernetes::KubeStore>),
}

/// Calls the same method on whichever store this is.
macro_rules! delegate {
    ($self:ident, $store:ident => $call:expr) => {
        match $self {
            AnyStore::File($store) => $call.await,
            #[cfg(feature = "etcd")]
            AnyStore::Etcd($store) => $call.await,
            #[cfg(feature = "kubernetes")]
            AnyStore::Kubernetes($store) => $call.await,
        }
    };
}

impl Store for AnyStore {
    async fn read_pool(&self, name: &str) -> Result<Option<VersionedPool>, StoreError> {
        delegate!(self, s => s.read_pool(name))
    }

    async fn lock_pool(&self, name: &str, deadline: Instant) -> Result<Option<PoolLock>, StoreError> {
        delegate!(self, s => s.lock_pool(name, deadline))
    }

    fn takes_turns(&self) -> bool {
        match self {
            AnyStore::File(s) => s.takes_turns(),
            #[cfg(feature = "etcd")]
            AnyStore::Etcd(s) => s.takes_turns(),
            #[cfg(feature = "kubernetes")]
            AnyStore::Kubernetes(s) => s.takes_turns(),
        }
    }

    async fn take_turn(&self, name: &str, deadline: Instant) -> bool {
        delegate!(self, s => s.take_turn(name, deadline))
    }

    async fn end_turn(&self, name: &str) {
        delegate!(self, s => s.end_turn(name))
    }

    fn queue_dir(&self, name: &str) -> Option<std::path::PathBuf> {
        match self {
            AnyStore::File(s) => s.queue_dir(name),
            #[cfg(feature = "etcd")]
            AnyStore::Etcd(s) => s.queue_dir(name),
            #[cfg(feature = "kubernetes")]
            AnyStore::Kubernetes(s) => s.queue_dir(name),
        }
    }

    async fn write_pool(
        &self,
        name: &str,
        spec: &PoolSpec,
        base: Option<&VersionedPool>,
        lock: Option<&PoolLock>,
    ) -> Result<Version, StoreError> {
        delegate!(self, s => s.write_pool(name, spec, base, lock))
    }

    async fn create_reservation(
        &self,
        name: &str,
        owner: &Reservation,
    ) -> Result<ReserveOutcome, StoreError> {
        delegate!(self, s => s.create_reservation(name, owner))
    }

    async fn read_reservation(&self, name: &str) -> Result<Option<VersionedReservation>, StoreError> {
        delegate!(self, s => s.read_reservation(name))
    }

    async fn delete_reservation(
        &self,
        name: &str,
        as_read: &ReservationVersion,
    ) -> Result<Deletion, StoreError> {
        delegate!(self, s => s.delete_reservation(name, as_read))
    }

    async fn list_pools(&self) -> Result<Vec<String>, StoreError> {
        delegate!(self, s => s.list_pools())
    }

    async fn list_reservations(&self) -> Result<Vec<(String, VersionedReservation)>, StoreError> {
        delegate!(self, s => s.list_reservations())
    }
}
