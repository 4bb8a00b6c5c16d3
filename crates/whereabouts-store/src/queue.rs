//! Batching the ADDs waiting in a node-local writer queue into one pool write.
//!
//! On a distributed store every pool write is a round trip, and writes to one pool are serialised by
//! the store (one object in etcd or the API server). When a burst of pods starts on a node, their
//! plugin processes queue on the node-local lock ([`crate::Store::lock_pool`]) and would each write the
//! pool in turn. Instead, a process announces its ADD in the queue's directory before it waits; the
//! process holding the lock allocates for every compatible announcement it finds in the same write
//! (flat combining), and removes the announcements it served. A waiter that gets the lock later reads
//! the pool, finds its allocation already there (ADD is idempotent on the owner) and writes nothing.
//!
//! Safety rests on what it always did: the write is one compare-and-swap, and an allocation made for
//! another process is exactly the record that process would have written itself; a served process
//! treats the entry as one it made (it undoes it if its ADD fails). Only announcements with the same
//! batch key are served (the same pool, candidate interval, exclusions and gateway, no requested
//! address), and only those of processes still running: the file of a process killed while waiting is
//! removed once seen. A process killed just after that check is served anyway; its entry is then
//! released by the runtime's DEL after the failed ADD, or taken over by the pod's next sandbox.
//!
//! Whoever removes an announcement file owns the outcome: the head removes it to *claim* it before it
//! allocates for it ([`Announcement::claim`]), and a waiter that gives up removes it to *withdraw*
//! ([`Announced::withdraw`]). Exactly one of them succeeds, so a waiter that withdrew is never served
//! afterwards, and one that finds its file gone knows an entry may be (or be about to be) stored for
//! it, and undoes it once the head has let go of the queue.
//!
//! The queue's directory also remembers, for a few seconds, that a write of this node lost a race to
//! another node ([`mark_contended`]): the next head then starts in its lane
//! ([`whereabouts_core::allocate::Lane`]) instead of first colliding on the lowest free address.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use whereabouts_core::pool::Owner;

/// One announced ADD.
#[derive(Debug)]
pub(crate) struct Announcement {
    /// The file; removed once served or when its process is gone.
    pub path: PathBuf,
    /// Who to allocate for.
    pub owner: Owner,
}

impl Announcement {
    /// Takes this announcement to serve it: true when it was still there, that is, its process has
    /// neither withdrawn it nor been served by someone else.
    pub fn claim(&self) -> bool {
        fs::remove_file(&self.path).is_ok()
    }
}

/// This process's announcement in a queue; removed on drop.
#[derive(Debug)]
pub(crate) struct Announced {
    dir: PathBuf,
    path: PathBuf,
    prefix: String,
}

fn process_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

impl Announced {
    /// Announces an ADD for `owner` in `dir`, batchable with announcements of the same `batch_key`.
    /// `None` when the directory cannot be written (the ADD then just does not batch).
    pub fn write(dir: &Path, batch_key: u64, owner: &Owner) -> Option<Announced> {
        fs::create_dir_all(dir).ok()?;
        let prefix = format!("{batch_key:016x}-");
        let path = dir.join(format!("{prefix}{}-{:016x}.json", std::process::id(), fastrand::u64(..)));
        let content = serde_json::to_vec(owner).ok()?;
        // Written under a temporary name and renamed, so a reader never sees half a file.
        let temp = path.with_extension("tmp");
        fs::write(&temp, content).ok()?;
        fs::rename(&temp, &path).ok()?;
        Some(Announced { dir: dir.to_path_buf(), path, prefix })
    }

    /// The other live processes' announcements with this batch key, oldest first. Announcements of
    /// processes that are gone are removed.
    pub fn others(&self) -> Vec<Announcement> {
        let Ok(entries) = fs::read_dir(&self.dir) else { return Vec::new() };
        let mut found: Vec<(std::time::SystemTime, Announcement)> = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else { continue };
            let Some(rest) = name.strip_prefix(&self.prefix).and_then(|r| r.strip_suffix(".json")) else {
                continue;
            };
            if path == self.path {
                continue;
            }
            let pid = rest.split('-').next().and_then(|p| p.parse::<u32>().ok());
            if !pid.is_some_and(process_alive) {
                let _ = fs::remove_file(&path);
                continue;
            }
            let Ok(owner) =
                fs::read(&path).map_err(drop).and_then(|b| serde_json::from_slice(&b).map_err(drop))
            else {
                continue;
            };
            let modified = entry.metadata().and_then(|m| m.modified()).unwrap_or(std::time::UNIX_EPOCH);
            found.push((modified, Announcement { path, owner }));
        }
        found.sort_by_key(|(modified, _)| *modified);
        found.into_iter().map(|(_, a)| a).collect()
    }
}

impl Announced {
    /// Whether the head of the queue claimed this announcement to serve it (and removed it).
    pub fn was_served(&self) -> bool {
        !self.path.exists()
    }

    /// Takes the announcement back, so that nobody serves it from now on: false when a head had
    /// already claimed it, and may have stored (or be storing) an entry for this process.
    pub fn withdraw(self) -> bool {
        fs::remove_file(&self.path).is_ok()
    }
}

/// How long a node remembers that one of its writes of a pool lost a race (to another node: this
/// node's writers of a pool take turns). Long enough to span a burst, short enough that a lone writer
/// is soon back at the lowest free address.
const CONTENTION_MEMORY: Duration = Duration::from_secs(5);

fn contention_marker(dir: &Path) -> PathBuf {
    dir.join("contended")
}

/// Remembers in the queue's directory `dir` that a write of this node lost a race.
pub(crate) fn mark_contended(dir: &Path) {
    let marker = contention_marker(dir);
    let touched = fs::create_dir_all(dir).and_then(|()| {
        fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&marker)?
            .set_modified(SystemTime::now())
    });
    if let Err(e) = touched {
        tracing::debug!("{}: {e}", marker.display());
    }
}

/// Whether a write of this node lost a race on the queue's pool within [`CONTENTION_MEMORY`].
pub(crate) fn recently_contended(dir: &Path) -> bool {
    fs::metadata(contention_marker(dir))
        .and_then(|m| m.modified())
        .is_ok_and(|at| at.elapsed().is_ok_and(|age| age < CONTENTION_MEMORY))
}

impl Drop for Announced {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(n: u32) -> Owner {
        Owner {
            container_id: format!("c{n}"),
            pod_ref: Some(format!("ns/p{n}")),
            ifname: "net1".into(),
            node: Some("node-a".into()),
            cni_network: Some("net".into()),
            pod_uid: None,
        }
    }

    #[test]
    fn announcements_of_one_batch_key_are_seen_by_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let first = Announced::write(dir.path(), 7, &owner(1)).unwrap();
        let second = Announced::write(dir.path(), 7, &owner(2)).unwrap();
        let other_key = Announced::write(dir.path(), 8, &owner(3)).unwrap();
        let seen: Vec<Owner> = first.others().into_iter().map(|a| a.owner).collect();
        assert_eq!(seen, [owner(2)]);
        assert!(other_key.others().is_empty());
        drop(second);
        assert!(first.others().is_empty(), "a dropped announcement is gone");
    }

    #[test]
    fn a_claimed_announcement_cannot_be_withdrawn_and_a_withdrawn_one_cannot_be_claimed() {
        let dir = tempfile::tempdir().unwrap();
        let head = Announced::write(dir.path(), 7, &owner(1)).unwrap();
        let served = Announced::write(dir.path(), 7, &owner(2)).unwrap();
        let [seen] = &head.others()[..] else { panic!() };
        assert!(seen.claim());
        assert!(served.was_served());
        assert!(!served.withdraw(), "claimed first: the waiter must undo what may be stored for it");

        let gone = Announced::write(dir.path(), 7, &owner(3)).unwrap();
        let [seen] = &head.others()[..] else { panic!() };
        assert!(gone.withdraw());
        assert!(!seen.claim(), "withdrawn first: the head must not serve it");
    }

    #[test]
    fn contention_is_remembered_for_a_few_seconds() {
        let dir = tempfile::tempdir().unwrap();
        let queue = dir.path().join("q.queue");
        assert!(!recently_contended(&queue));
        mark_contended(&queue);
        assert!(recently_contended(&queue));
        let old = SystemTime::now() - CONTENTION_MEMORY - Duration::from_secs(1);
        fs::File::options().write(true).open(contention_marker(&queue)).unwrap().set_modified(old).unwrap();
        assert!(!recently_contended(&queue));
    }

    #[test]
    fn announcements_of_dead_processes_are_removed_not_served() {
        let dir = tempfile::tempdir().unwrap();
        let mine = Announced::write(dir.path(), 7, &owner(1)).unwrap();
        // No process has PID 0 in /proc.
        let stale = dir.path().join(format!("{:016x}-0-{:016x}.json", 7, 1));
        fs::write(&stale, serde_json::to_vec(&owner(9)).unwrap()).unwrap();
        assert!(mine.others().is_empty());
        assert!(!stale.exists());
    }
}
