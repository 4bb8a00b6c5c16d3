//! Exclusive advisory locks on files (flock), with a bounded wait.

use std::fs::{File, OpenOptions, TryLockError};
use std::path::Path;
use std::time::Duration;

use crate::StoreError;

/// How long a writer waits for a lock before answering "try again later".
const LOCK_TIMEOUT: Duration = Duration::from_secs(10);

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

/// Takes an exclusive flock, waiting at most [`LOCK_TIMEOUT`]. Waiting is a blocking `flock` on a
/// blocking thread, so waiters queue in the kernel instead of polling.
pub(crate) async fn lock(path: &Path) -> Result<LockGuard, StoreError> {
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
    match tokio::time::timeout(LOCK_TIMEOUT, waiting).await {
        Ok(Ok(locked)) => locked.map_err(|e| io_error(path, e)),
        Ok(Err(join)) => Err(StoreError::Io(format!("{}: {join}", path.display()))),
        Err(_) => Err(StoreError::Unavailable(format!("timed out waiting for lock {}", path.display()))),
    }
}
