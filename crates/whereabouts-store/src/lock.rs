//! Exclusive advisory locks on files (flock), waited for until the caller's deadline.

use std::fs::{File, OpenOptions, TryLockError};
use std::hash::{Hash, Hasher};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::{PoolLock, StoreError};

/// Where the node-local writer queues of the distributed stores keep their lock files (tmpfs; emptied
/// at boot, which is fine).
pub const DEFAULT_LOCK_DIR: &str = "/run/whereabouts/locks";

/// How long to wait for a lock that is only ever held across one file write (the file store's
/// reservation lock, its pool lock taken by a writer that holds no queue): a wait this long means a hung
/// process, not a queue.
const ONE_WRITE_HOLD: Duration = Duration::from_secs(60);

/// The deadline for taking a lock held only across one file write.
pub(crate) fn one_write_deadline() -> Instant {
    Instant::now() + ONE_WRITE_HOLD
}

/// An exclusive flock on a lock file, released on drop (or by the kernel if the process dies).
#[derive(Debug)]
pub(crate) struct LockGuard(File);

impl Drop for LockGuard {
    fn drop(&mut self) {
        let _ = self.0.unlock();
    }
}

fn io_error(path: &Path, e: std::io::Error) -> StoreError {
    StoreError::Io(format!("{}: {e}", path.display()))
}

/// Takes an exclusive flock, waiting until `deadline` at most: the holder is a process of this machine
/// doing its write, and a process that dies lets go of its lock at once, so a long wait means a long
/// queue (a busy node), not a lost lock, and is no reason to give up before the command's own deadline.
/// Waiting is a blocking `flock` on a blocking thread, so waiters queue in the kernel instead of polling.
pub(crate) async fn lock(path: &Path, deadline: Instant) -> Result<LockGuard, StoreError> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| io_error(path, e))?;
    match file.try_lock() {
        Ok(()) => return Ok(LockGuard(file)),
        Err(TryLockError::WouldBlock) => {}
        Err(TryLockError::Error(e)) => return Err(io_error(path, e)),
    }
    let waiting = tokio::task::spawn_blocking(move || file.lock().map(|()| LockGuard(file)));
    match tokio::time::timeout_at(deadline.into(), waiting).await {
        Ok(Ok(locked)) => locked.map_err(|e| io_error(path, e)),
        Ok(Err(join)) => Err(StoreError::Io(format!("{}: {join}", path.display()))),
        Err(_) => Err(StoreError::Unavailable(format!("timed out waiting for lock {}", path.display()))),
    }
}

/// A node-local writer queue on one pool of a distributed store: writers of the pool on this node take
/// turns instead of losing compare-and-swap races to each other. `key` identifies the store and pool
/// (and whatever else must not share a queue). It is an optimisation only: without a usable lock
/// directory writers just race in compare-and-swap, as they do across nodes.
pub(crate) async fn node_local_lock(
    dir: &Path,
    kind: &str,
    key: impl Hash,
    deadline: Instant,
) -> Result<Option<PoolLock>, StoreError> {
    if std::fs::create_dir_all(dir).is_err() {
        return Ok(None);
    }
    let path = queue_path(dir, kind, key).with_extension("lock");
    match lock(&path, deadline).await {
        Ok(guard) => Ok(Some(PoolLock::new(path.display().to_string(), guard))),
        Err(StoreError::Io(_)) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The node-local writer queue of `key`, without its extension: `.lock` for the lock file, `.queue`
/// for the directory of announced ADDs (see [`crate::queue`]).
pub(crate) fn queue_path(dir: &Path, kind: &str, key: impl Hash) -> std::path::PathBuf {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut hasher);
    dir.join(format!("{kind}-{:016x}", hasher.finish()))
}
