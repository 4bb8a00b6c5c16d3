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

use std::fs;
use std::path::{Path, PathBuf};

use whereabouts_core::pool::Owner;

/// One announced ADD.
#[derive(Debug)]
pub(crate) struct Announcement {
    /// The file; removed once served or when its process is gone.
    pub path: PathBuf,
    /// Who to allocate for.
    pub owner: Owner,
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
    /// Whether the head of the queue served this announcement (and removed it).
    pub fn was_served(&self) -> bool {
        !self.path.exists()
    }
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
