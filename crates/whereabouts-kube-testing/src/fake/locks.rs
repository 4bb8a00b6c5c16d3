//! Per-object write paths: writes to one object queue behind each other (each spending the modelled
//! etcd latency while it holds the object's lock), writes to different objects run in parallel.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard};

use super::resource::TypeKey;

/// (type, namespace, name) of the object a write targets.
pub(crate) type LockKey = (TypeKey, String, String);

type Entries = Mutex<HashMap<LockKey, Arc<AsyncMutex<()>>>>;

/// The locks of the objects that are being written (entries are dropped when unused).
#[derive(Debug, Default)]
pub(crate) struct ObjectLocks {
    entries: Entries,
}

/// Holds one object's write path; releasing it forgets the lock if nobody else waits for it.
#[derive(Debug)]
pub(crate) struct ObjectLockGuard<'a> {
    // Field order matters: the guard (and its reference to the mutex) goes first.
    _guard: OwnedMutexGuard<()>,
    _entry: Entry<'a>,
}

/// One reference to a lock in the table, removing the table entry when it is the last one.
#[derive(Debug)]
struct Entry<'a> {
    entries: &'a Entries,
    key: LockKey,
    mutex: Option<Arc<AsyncMutex<()>>>,
}

impl Drop for Entry<'_> {
    fn drop(&mut self) {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        drop(self.mutex.take());
        if entries.get(&self.key).is_some_and(|mutex| Arc::strong_count(mutex) == 1) {
            entries.remove(&self.key);
        }
    }
}

impl ObjectLocks {
    /// Waits for the object's write path.
    pub(crate) async fn lock(&self, key: LockKey) -> ObjectLockGuard<'_> {
        let mutex = {
            let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
            entries.entry(key.clone()).or_default().clone()
        };
        let entry = Entry { entries: &self.entries, key, mutex: Some(mutex.clone()) };
        ObjectLockGuard { _guard: mutex.lock_owned().await, _entry: entry }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner).len()
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    fn key(name: &str) -> LockKey {
        (TypeKey { group: String::new(), plural: "pods".to_owned() }, "ns".to_owned(), name.to_owned())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_object_queues_and_others_run_in_parallel() {
        let locks = Arc::new(ObjectLocks::default());
        let hold = |name: &'static str| {
            let locks = locks.clone();
            tokio::spawn(async move {
                let _guard = locks.lock(key(name)).await;
                tokio::time::sleep(Duration::from_millis(200)).await;
            })
        };
        let started = Instant::now();
        let tasks = [hold("a"), hold("a"), hold("b")];
        for task in tasks {
            task.await.expect("task");
        }
        let elapsed = started.elapsed();
        // "a" twice in a row (400 ms), "b" alongside.
        assert!(elapsed >= Duration::from_millis(400) && elapsed < Duration::from_millis(600), "{elapsed:?}");
        assert_eq!(locks.len(), 0);
    }
}
