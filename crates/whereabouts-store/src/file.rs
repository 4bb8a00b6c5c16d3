//! The embedded file store: one JSON file per pool and one per reservation under a directory.
//!
//! * A pool lives in `pools/<name>.json` as upstream's IPPool spec plus a `version` counter. Reads take no
//!   lock: files are only ever replaced by rename, so a reader sees the old or the new file whole.
//! * A write takes `pools/<name>.lock` (flock, released by the kernel when a process dies), checks the
//!   version, and replaces the file through a temporary file, fsync, rename and a directory fsync.
//!   A process killed at any point leaves the previous or the new state.
//! * A reservation is created by writing a temporary file and hard-linking it to its name, which fails
//!   atomically when the name exists; so a reservation file is never seen half-written. Deletes hold
//!   `reservations.lock` so a read-compare-unlink cannot remove a reservation that a concurrent delete and
//!   create just replaced.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use whereabouts_core::pool::{Allocation, PoolSpec};

use crate::lock::{lock, one_write_deadline};
use crate::{
    Deletion, PoolLock, Reservation, ReservationVersion, ReserveOutcome, Store, StoreError, Version,
    VersionedPool, VersionedReservation,
};

/// The file store rooted at a directory.
#[derive(Debug, Clone)]
pub struct FileStore {
    pools: PathBuf,
    reservations: PathBuf,
}

/// A pool file: upstream's IPPool spec plus a version counter and the release cooldowns
/// ([`PoolSpec::cooldowns`]), written in the same file so a release and its cooldown land together.
#[derive(Deserialize)]
struct PoolFile {
    version: u64,
    range: String,
    #[serde(default)]
    allocations: BTreeMap<String, Allocation>,
    #[serde(default)]
    cooldowns: BTreeMap<String, u64>,
}

/// The same, borrowed, for writing without copying the allocations.
#[derive(Serialize)]
struct PoolFileRef<'a> {
    version: u64,
    range: &'a str,
    allocations: &'a BTreeMap<String, Allocation>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    cooldowns: &'a BTreeMap<String, u64>,
}

#[derive(Deserialize)]
struct PoolFileVersion {
    version: u64,
}

fn io_error(path: &Path, e: std::io::Error) -> StoreError {
    StoreError::Io(format!("{}: {e}", path.display()))
}

/// Store object names come from configuration (`network_name`), so refuse anything that could leave
/// the directory.
fn checked_name(name: &str) -> Result<&str, StoreError> {
    if name.is_empty() || name.starts_with('.') || name.contains(['/', '\0']) {
        return Err(StoreError::Io(format!("invalid object name {name:?}")));
    }
    Ok(name)
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io_error(dir, e))
}

/// Reads a file, `None` when it does not exist.
fn read_optional(path: &Path) -> Result<Option<Vec<u8>>, StoreError> {
    match fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_error(path, e)),
    }
}

fn corrupt(path: &Path, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt { location: path.display().to_string(), reason: e.to_string() }
}

impl FileStore {
    /// Opens (creating if needed) a store directory.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, StoreError> {
        let dir = dir.as_ref();
        let store = FileStore { pools: dir.join("pools"), reservations: dir.join("reservations") };
        for d in [&store.pools, &store.reservations] {
            fs::create_dir_all(d).map_err(|e| io_error(d, e))?;
        }
        Ok(store)
    }

    fn pool_path(&self, name: &str) -> Result<PathBuf, StoreError> {
        Ok(self.pools.join(format!("{}.json", checked_name(name)?)))
    }

    fn pool_lock_path(&self, name: &str) -> Result<PathBuf, StoreError> {
        Ok(self.pools.join(format!("{}.lock", checked_name(name)?)))
    }

    fn reservation_path(&self, name: &str) -> Result<PathBuf, StoreError> {
        Ok(self.reservations.join(format!("{}.json", checked_name(name)?)))
    }

    /// A reservation file as read; its content is its version (see `delete_reservation`).
    fn read_reservation_file(path: &Path) -> Result<Option<VersionedReservation>, StoreError> {
        read_optional(path)?
            .map(|bytes| {
                let holder = serde_json::from_slice(&bytes).map_err(|e| corrupt(path, e))?;
                let revision = String::from_utf8_lossy(&bytes).into_owned();
                Ok(VersionedReservation {
                    holder,
                    version: ReservationVersion { uid: String::new(), revision },
                })
            })
            .transpose()
    }

    /// Who holds a reservation file.
    fn read_holder(path: &Path) -> Result<Option<Reservation>, StoreError> {
        Ok(Self::read_reservation_file(path)?.map(|read| read.holder))
    }

    /// Writes `content` to a fresh temporary file in `dir` and fsyncs it.
    fn write_temp(dir: &Path, content: &[u8]) -> Result<PathBuf, StoreError> {
        let temp = dir.join(format!(".tmp-{}-{:016x}", std::process::id(), fastrand::u64(..)));
        let mut file =
            OpenOptions::new().write(true).create_new(true).open(&temp).map_err(|e| io_error(&temp, e))?;
        file.write_all(content).and_then(|()| file.sync_all()).map_err(|e| io_error(&temp, e))?;
        Ok(temp)
    }
}

fn json_names(dir: &Path) -> Result<Vec<String>, StoreError> {
    let mut names = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| io_error(dir, e))? {
        let entry = entry.map_err(|e| io_error(dir, e))?;
        let file_name = entry.file_name();
        let file_name = file_name.to_string_lossy();
        if let Some(name) = file_name.strip_suffix(".json").filter(|n| !n.starts_with('.')) {
            names.push(name.to_string());
        }
    }
    names.sort();
    Ok(names)
}

impl Store for FileStore {
    async fn read_pool(&self, name: &str) -> Result<Option<VersionedPool>, StoreError> {
        let path = self.pool_path(name)?;
        let Some(bytes) = read_optional(&path)? else {
            return Ok(None);
        };
        let file: PoolFile = serde_json::from_slice(&bytes).map_err(|e| corrupt(&path, e))?;
        Ok(Some(VersionedPool {
            spec: PoolSpec { range: file.range, allocations: file.allocations, cooldowns: file.cooldowns },
            version: Version::Counter(file.version),
        }))
    }

    async fn lock_pool(&self, name: &str, deadline: Instant) -> Result<Option<PoolLock>, StoreError> {
        let path = self.pool_lock_path(name)?;
        let guard = lock(&path, deadline).await?;
        Ok(Some(PoolLock::new(path.display().to_string(), guard)))
    }

    async fn write_pool(
        &self,
        name: &str,
        spec: &PoolSpec,
        base: Option<&VersionedPool>,
        held: Option<&PoolLock>,
    ) -> Result<Version, StoreError> {
        let path = self.pool_path(name)?;
        let lock_path = self.pool_lock_path(name)?;
        let _guard = match held {
            Some(held) if held.key() == lock_path.display().to_string() => None,
            _ => Some(lock(&lock_path, one_write_deadline()).await?),
        };
        let current = read_optional(&path)?
            .map(|bytes| serde_json::from_slice::<PoolFileVersion>(&bytes).map_err(|e| corrupt(&path, e)))
            .transpose()?
            .map(|f| f.version);
        let expected = base
            .map(|b| match b.version {
                Version::Counter(counter) => Ok(counter),
                ref other => Err(other.foreign("file")),
            })
            .transpose()?;
        if current != expected {
            return Err(StoreError::Conflict);
        }
        let version = current.map_or(1, |v| v + 1);
        let file = PoolFileRef {
            version,
            range: &spec.range,
            allocations: &spec.allocations,
            cooldowns: &spec.cooldowns,
        };
        let content = serde_json::to_vec(&file).map_err(|e| StoreError::Io(e.to_string()))?;
        let mut out = atomic_write_file::AtomicWriteFile::open(&path).map_err(|e| io_error(&path, e))?;
        out.write_all(&content).map_err(|e| io_error(&path, e))?;
        out.commit().map_err(|e| io_error(&path, e))?;
        Ok(Version::Counter(version))
    }

    async fn create_reservation(
        &self,
        name: &str,
        owner: &Reservation,
    ) -> Result<ReserveOutcome, StoreError> {
        let path = self.reservation_path(name)?;
        let content = serde_json::to_vec(owner).map_err(|e| StoreError::Io(e.to_string()))?;
        // A reservation deleted between our failed link and our read: link again.
        loop {
            let temp = Self::write_temp(&self.reservations, &content)?;
            let linked = fs::hard_link(&temp, &path);
            let _ = fs::remove_file(&temp);
            match linked {
                Ok(()) => {
                    sync_dir(&self.reservations)?;
                    return Ok(ReserveOutcome::Reserved);
                }
                Err(e) if e.kind() == ErrorKind::AlreadyExists => match Self::read_holder(&path)? {
                    Some(holder) if holder == *owner => return Ok(ReserveOutcome::Reserved),
                    Some(holder) if holder.same_owner(owner) => {
                        // Take it over under the lock deletes hold, so a concurrent delete cannot
                        // interleave.
                        let _guard = lock(&self.reservations.join(".lock"), one_write_deadline()).await?;
                        match Self::read_holder(&path)? {
                            Some(holder) if holder.same_owner(owner) => {
                                let temp = Self::write_temp(&self.reservations, &content)?;
                                fs::rename(&temp, &path).map_err(|e| io_error(&path, e))?;
                                sync_dir(&self.reservations)?;
                                return Ok(ReserveOutcome::Reserved);
                            }
                            Some(holder) => return Ok(ReserveOutcome::HeldBy(holder)),
                            None => continue,
                        }
                    }
                    Some(holder) => return Ok(ReserveOutcome::HeldBy(holder)),
                    None => continue,
                },
                Err(e) => return Err(io_error(&path, e)),
            }
        }
    }

    async fn read_reservation(&self, name: &str) -> Result<Option<VersionedReservation>, StoreError> {
        Self::read_reservation_file(&self.reservation_path(name)?)
    }

    /// Compares the content under the lock that take-overs hold: every writer records a container ID
    /// and a take-over changes it, so a reservation that changed hands has other content.
    async fn delete_reservation(
        &self,
        name: &str,
        as_read: &ReservationVersion,
    ) -> Result<Deletion, StoreError> {
        let path = self.reservation_path(name)?;
        let _guard = lock(&self.reservations.join(".lock"), one_write_deadline()).await?;
        match read_optional(&path)? {
            None => Ok(Deletion::Deleted),
            Some(content) if content == as_read.revision.as_bytes() => {
                fs::remove_file(&path).map_err(|e| io_error(&path, e))?;
                sync_dir(&self.reservations)?;
                Ok(Deletion::Deleted)
            }
            Some(_) => Ok(Deletion::Changed),
        }
    }

    async fn list_pools(&self) -> Result<Vec<String>, StoreError> {
        json_names(&self.pools)
    }

    async fn list_reservations(&self) -> Result<Vec<(String, VersionedReservation)>, StoreError> {
        let mut out = Vec::new();
        for name in json_names(&self.reservations)? {
            if let Some(r) = Self::read_reservation_file(&self.reservation_path(&name)?)? {
                out.push((name, r));
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(range: &str) -> PoolSpec {
        PoolSpec { range: range.into(), allocations: BTreeMap::new(), ..Default::default() }
    }
    fn owner(pod: &str) -> Reservation {
        Reservation { pod_ref: format!("ns/{pod}"), ifname: "eth0".into(), container_id: pod.into() }
    }

    #[tokio::test]
    async fn pools_are_compare_and_swap() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        assert_eq!(store.read_pool("p").await.unwrap(), None);
        let v1 = store.write_pool("p", &spec("10.0.0.0/24"), None, None).await.unwrap();
        assert_eq!(store.write_pool("p", &spec("10.0.0.0/24"), None, None).await, Err(StoreError::Conflict));
        let read = store.read_pool("p").await.unwrap().unwrap();
        assert_eq!(read.version, v1);
        let v2 = store.write_pool("p", &spec("10.0.0.0/24"), Some(&read), None).await.unwrap();
        assert_ne!(v1, v2);
        assert_eq!(
            store.write_pool("p", &spec("10.0.0.0/24"), Some(&read), None).await,
            Err(StoreError::Conflict)
        );
        assert_eq!(store.list_pools().await.unwrap(), vec!["p".to_string()]);
    }

    /// A version of another store's kind is the caller's bug, reported as such, never a lost race
    /// (which the engine would retry until its deadline).
    #[tokio::test]
    async fn a_version_of_another_store_is_an_error_not_a_conflict() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        store.write_pool("p", &spec("10.0.0.0/24"), None, None).await.unwrap();
        let foreign = VersionedPool { spec: spec("10.0.0.0/24"), version: Version::Revision(1) };
        let written = store.write_pool("p", &spec("10.0.0.0/24"), Some(&foreign), None).await;
        assert!(matches!(written, Err(StoreError::ForeignVersion(_))), "{written:?}");
    }

    #[tokio::test]
    async fn corrupt_pool_is_reported_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        fs::write(dir.path().join("pools/p.json"), b"{not json").unwrap();
        assert!(matches!(store.read_pool("p").await, Err(StoreError::Corrupt { .. })));
        assert!(matches!(
            store.write_pool("p", &spec("10.0.0.0/24"), None, None).await,
            Err(StoreError::Corrupt { .. })
        ));
        assert_eq!(fs::read(dir.path().join("pools/p.json")).unwrap(), b"{not json");
    }

    #[tokio::test]
    async fn names_cannot_escape_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        for bad in ["../x", "a/b", "", ".hidden"] {
            assert!(store.read_pool(bad).await.is_err(), "{bad}");
            assert!(store.create_reservation(bad, &owner("a")).await.is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn reservations_are_create_if_absent_and_deleted_only_as_read() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        assert_eq!(
            store.create_reservation("10.0.0.1", &owner("a")).await.unwrap(),
            ReserveOutcome::Reserved
        );
        assert_eq!(
            store.create_reservation("10.0.0.1", &owner("a")).await.unwrap(),
            ReserveOutcome::Reserved
        );
        assert_eq!(
            store.create_reservation("10.0.0.1", &owner("b")).await.unwrap(),
            ReserveOutcome::HeldBy(owner("a"))
        );
        let first = store.read_reservation("10.0.0.1").await.unwrap().unwrap();
        assert_eq!(first.holder, owner("a"));
        assert_eq!(store.list_reservations().await.unwrap(), vec![("10.0.0.1".to_string(), first.clone())]);
        // The pod's new sandbox takes it over; a delete decided on the first reading leaves it alone.
        let new_sandbox = Reservation { container_id: "a-2".into(), ..owner("a") };
        assert_eq!(
            store.create_reservation("10.0.0.1", &new_sandbox).await.unwrap(),
            ReserveOutcome::Reserved
        );
        assert_eq!(store.delete_reservation("10.0.0.1", &first.version).await.unwrap(), Deletion::Changed);
        let taken_over = store.read_reservation("10.0.0.1").await.unwrap().unwrap();
        assert_eq!(taken_over.holder, new_sandbox);
        assert_eq!(
            store.delete_reservation("10.0.0.1", &taken_over.version).await.unwrap(),
            Deletion::Deleted
        );
        assert_eq!(
            store.delete_reservation("10.0.0.1", &taken_over.version).await.unwrap(),
            Deletion::Deleted
        );
        assert!(store.list_reservations().await.unwrap().is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_increments_are_never_lost() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        let tasks: Vec<_> = (0..8)
            .map(|t| {
                let store = store.clone();
                tokio::spawn(async move {
                    for i in 0..25 {
                        loop {
                            let current = store.read_pool("p").await.unwrap();
                            let mut s =
                                current.as_ref().map_or_else(|| spec("10.0.0.0/8"), |p| p.spec.clone());
                            let key = format!("{t}-{i}");
                            s.allocations.insert(
                                key,
                                whereabouts_core::pool::Allocation {
                                    container_id: String::new(),
                                    pod_ref: String::new(),
                                    ifname: String::new(),
                                    node: None,
                                    cni_network: None,
                                    pod_uid: None,
                                    statefulset: None,
                                    ipam_claim: None,
                                },
                            );
                            match store.write_pool("p", &s, current.as_ref(), None).await {
                                Ok(_) => break,
                                Err(StoreError::Conflict) => continue,
                                Err(e) => panic!("{e}"),
                            }
                        }
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        let pool = store.read_pool("p").await.unwrap().unwrap();
        assert_eq!(pool.spec.allocations.len(), 200);
        assert_eq!(pool.version, Version::Counter(200));
    }
}
