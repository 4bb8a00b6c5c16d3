//! Batching the ADDs (and the DELs) waiting in a node-local writer queue into one pool write.
//!
//! On a distributed store every pool write is a round trip, and writes to one pool are serialised by
//! the store (one object in etcd or the API server), each costing time that grows with the pool's
//! size. When a burst of pods starts (or stops) on a node, their plugin processes queue on the
//! node-local lock ([`crate::Store::lock_pool`]) and would each write the pool in turn. Instead, a
//! process announces its request in the queue's directory before it waits; the process holding the
//! lock makes the change for every compatible announcement it finds in the same write (flat
//! combining), and once that write is stored tells each served process so ([`Announcement::done`]).
//! A served process then stops waiting for the lock and writes nothing: the answer carries its
//! address (or whether its released entry was there). Where the network has cluster-wide reservations
//! the head also makes those of the ADDs it served before it answers, so that a served ADD sends no
//! request to the store at all; one whose reservation the head could not make (another attachment
//! holds it, the store failed) makes it itself, as when it allocates alone. Served processes therefore
//! leave the queue together instead of one by one.
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
//! ([`whereabouts_core::allocate::Lane`]) instead of first colliding on the lowest free address. And it
//! remembers whether the pool was large and shared by nodes when last read ([`remember_shape`]).

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use whereabouts_core::pool::{Allocation, Owner, Pool};

/// What a waiting process asks the head of the queue to do for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Request {
    /// Allocate an address for this owner (an ADD without a requested address).
    Allocate(Owner),
    /// Remove the entry of this address (a decimal offset as [`whereabouts_core::addr`] counts it) if
    /// it is still exactly this allocation (a DEL, which deletes the reservation once told so).
    Release {
        /// The address.
        addr: String,
        /// The entry as the DEL found it.
        allocation: Allocation,
        /// When the address's release cooldown ends (Unix seconds), if its network has one.
        #[serde(default)]
        cool_until: Option<u64>,
    },
}

/// One announced request.
#[derive(Debug)]
pub(crate) struct Announcement {
    /// The file; removed once claimed or when its process is gone.
    pub path: PathBuf,
    /// What to do.
    pub request: Request,
}

/// The batch key of requests that one write may serve together: a hash of what they must share.
pub(crate) fn batch_key(shared: impl std::hash::Hash) -> u64 {
    use std::hash::Hasher;
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    shared.hash(&mut hasher);
    hasher.finish()
}

/// The marker telling the process of the announcement at `path` that its request is stored.
fn done_marker(path: &Path) -> PathBuf {
    path.with_extension("done")
}

/// The socket on which the process of the announcement at `path` waits to be woken once it is served.
fn wake_socket(path: &Path) -> PathBuf {
    path.with_extension("sock")
}

/// How often a waiting process that has no wake-up socket looks for its done marker: often at first (a
/// batch is written within milliseconds), then less and less, up to the longest pause.
const DONE_POLL_FIRST: Duration = Duration::from_millis(2);
const DONE_POLL_LONGEST: Duration = Duration::from_millis(20);

/// How long a process with a wake-up socket waits on it before it looks for its done marker anyway.
/// Only a safety net: a head sends the wake-up right after the marker, and a head that died in between
/// let go of the queue, where the waiter finds the marker too.
const WAKE_FALLBACK: Duration = Duration::from_millis(500);

impl Announcement {
    /// Takes this announcement to serve it: true when it was still there, that is, its process has
    /// neither withdrawn it nor been served by someone else.
    pub fn claim(&self) -> bool {
        fs::remove_file(&self.path).is_ok()
    }

    /// Tells the announcing process that its request is stored (once the write that served it is),
    /// with `answer`: the address allocated for it, or whether its entry was there to remove.
    pub fn done(&self, answer: &str) {
        let marker = done_marker(&self.path);
        // Renamed into place, so the waiter never reads half an answer.
        let temp = self.path.with_extension("done.tmp");
        if let Err(e) = fs::write(&temp, answer).and_then(|()| fs::rename(&temp, &marker)) {
            // It then learns it the slow way: its own turn at the lock.
            tracing::debug!("{}: {e}", marker.display());
            return;
        }
        // An empty datagram wakes it; it reads the marker. No socket (an older version's process, or one
        // that could not bind it) or a full one: it finds the marker when it next looks.
        let woken = std::os::unix::net::UnixDatagram::unbound()
            .and_then(|socket| socket.set_nonblocking(true).map(|()| socket))
            .and_then(|socket| socket.send_to(&[], wake_socket(&self.path)));
        if let Err(e) = woken {
            tracing::debug!("{}: {e}", wake_socket(&self.path).display());
        }
    }
}

/// This process's announcement in a queue; removed on drop.
///
/// The process waits for its answer on a Unix datagram socket beside the announcement, which the head
/// that served it wakes: the kernel keeps it asleep until then. Polling for the done marker instead
/// cost a waiting process about 6 ms of CPU per second of waiting on this kind of VM (each wake-up is a
/// timer, a context switch and a failed open), which on a burst of hundreds of ADDs was a fifth of the
/// node's CPU, on the node whose pods are starting.
#[derive(Debug)]
pub(crate) struct Announced {
    dir: PathBuf,
    path: PathBuf,
    prefix: String,
    /// The wake-up socket, bound before the announcement is written so that no wake-up is missed;
    /// `None` when it could not be bound (a lock directory whose path is too long for a socket
    /// address): the process then polls.
    wake: Option<std::os::unix::net::UnixDatagram>,
}

fn process_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

impl Announced {
    /// Announces `request` in `dir`, batchable with announcements of the same `batch_key`. `None`
    /// when the directory cannot be written (the request then just does not batch).
    pub fn write(dir: &Path, batch_key: u64, request: &Request) -> Option<Announced> {
        fs::create_dir_all(dir).ok()?;
        let prefix = format!("{batch_key:016x}-");
        // Short enough that the socket's path fits a socket address (107 bytes) under the default lock
        // directory.
        let path = dir.join(format!("{prefix}{}-{:08x}.json", std::process::id(), fastrand::u32(..)));
        let content = serde_json::to_vec(request).ok()?;
        let wake = std::os::unix::net::UnixDatagram::bind(wake_socket(&path))
            .and_then(|socket| socket.set_nonblocking(true).map(|()| socket))
            .inspect_err(|e| tracing::debug!("{}: {e}; polling instead", wake_socket(&path).display()))
            .ok();
        // Written under a temporary name and renamed, so a reader never sees half a file.
        let temp = path.with_extension("tmp");
        let announced = Announced { dir: dir.to_path_buf(), path, prefix, wake };
        fs::write(&temp, content).ok()?;
        fs::rename(&temp, &announced.path).ok()?;
        Some(announced)
    }

    /// The other live processes' announcements with this batch key, oldest first. Announcements and
    /// done markers of processes that are gone are removed.
    pub fn others(&self) -> Vec<Announcement> {
        let Ok(entries) = fs::read_dir(&self.dir) else { return Vec::new() };
        let mut found: Vec<(std::time::SystemTime, Announcement)> = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else { continue };
            let Some(rest) = name.strip_prefix(&self.prefix) else { continue };
            let suffixes =
                (rest.strip_suffix(".json"), rest.strip_suffix(".done"), rest.strip_suffix(".sock"));
            let (rest, marker) = match suffixes {
                (Some(rest), _, _) => (rest, false),
                (None, Some(rest), _) | (None, None, Some(rest)) => (rest, true),
                (None, None, None) => continue,
            };
            if path == self.path || path == wake_socket(&self.path) {
                continue;
            }
            let pid = rest.split('-').next().and_then(|p| p.parse::<u32>().ok());
            if !pid.is_some_and(process_alive) {
                let _ = fs::remove_file(&path);
                continue;
            }
            if marker {
                continue;
            }
            let Ok(request) =
                fs::read(&path).map_err(drop).and_then(|b| serde_json::from_slice(&b).map_err(drop))
            else {
                continue;
            };
            let modified = entry.metadata().and_then(|m| m.modified()).unwrap_or(std::time::UNIX_EPOCH);
            found.push((modified, Announcement { path, request }));
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

    /// Resolves, with the head's answer, once a head has stored this request
    /// ([`Announcement::done`]); never otherwise.
    pub async fn served(&self) -> String {
        let mut pause = DONE_POLL_FIRST;
        // Registered with this runtime's I/O driver for as long as this wait lasts.
        let wake = self.wake.as_ref().and_then(|socket| {
            socket
                .try_clone()
                .and_then(tokio::net::UnixDatagram::from_std)
                .inspect_err(|e| {
                    tracing::debug!("{}: {e}; polling instead", wake_socket(&self.path).display())
                })
                .ok()
        });
        loop {
            if let Some(answer) = self.answer() {
                return answer;
            }
            match &wake {
                Some(socket) => {
                    let mut datagram = [0u8; 1];
                    let woken = tokio::time::timeout(WAKE_FALLBACK, socket.recv(&mut datagram)).await;
                    if let Ok(Err(e)) = woken {
                        // Not expected of a bound datagram socket; do not spin on it.
                        tracing::debug!("{}: {e}", wake_socket(&self.path).display());
                        tokio::time::sleep(DONE_POLL_LONGEST).await;
                    }
                }
                None => {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(DONE_POLL_LONGEST);
                }
            }
        }
    }

    /// The head's answer, if a head has stored this request by now. A head tells the processes it
    /// served before it lets go of the queue, so a process that gets the queue after it finds its
    /// answer here.
    pub fn answer(&self) -> Option<String> {
        fs::read_to_string(done_marker(&self.path)).ok()
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

/// From this many allocations on, a pool counts as large: a write of it costs the API server enough
/// (the whole object re-applied and validated) that nodes writing it at once would overwhelm it before
/// any of them saw a lost race, so its writers always take turns when it is shared by nodes.
pub(crate) const LARGE_POOL: usize = 64;

fn large_and_shared_marker(dir: &Path) -> PathBuf {
    dir.join("large-and-shared")
}

/// Remembers in the queue's directory `dir` whether `pool`, as just read, is large and shared: its
/// allocations record more than one node, or one without a node (upstream's plugin, which does not
/// record it, may write it from anywhere). A node's slice pool is never shared.
pub(crate) fn remember_shape(dir: &Path, pool: &Pool) {
    let marker = large_and_shared_marker(dir);
    let mut nodes = pool.iter().map(|(_, allocation)| allocation.node.as_deref());
    let shared = match nodes.next() {
        None => false,
        Some(None) => true,
        Some(first) => nodes.any(|node| node != first),
    };
    let large_and_shared = pool.len() >= LARGE_POOL && shared;
    if large_and_shared == marker.exists() {
        return;
    }
    let changed = if large_and_shared {
        fs::create_dir_all(dir).and_then(|()| fs::write(&marker, b""))
    } else {
        fs::remove_file(&marker)
    };
    if let Err(e) = changed {
        tracing::debug!("{}: {e}", marker.display());
    }
}

/// Whether the pool was large and shared by nodes when this node last read it.
pub(crate) fn was_large_and_shared(dir: &Path) -> bool {
    large_and_shared_marker(dir).exists()
}

impl Drop for Announced {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
        let _ = fs::remove_file(done_marker(&self.path));
        if self.wake.is_some() {
            let _ = fs::remove_file(wake_socket(&self.path));
        }
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
            statefulset: None,
            ipam_claim: None,
        }
    }

    fn allocate(n: u32) -> Request {
        Request::Allocate(owner(n))
    }

    #[test]
    fn announcements_of_one_batch_key_are_seen_by_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let first = Announced::write(dir.path(), 7, &allocate(1)).unwrap();
        let second = Announced::write(dir.path(), 7, &allocate(2)).unwrap();
        let other_key = Announced::write(dir.path(), 8, &allocate(3)).unwrap();
        let seen: Vec<Request> = first.others().into_iter().map(|a| a.request).collect();
        assert_eq!(seen, [allocate(2)]);
        assert!(other_key.others().is_empty());
        drop(second);
        assert!(first.others().is_empty(), "a dropped announcement is gone");
    }

    #[tokio::test]
    async fn a_claimed_announcement_cannot_be_withdrawn_and_a_withdrawn_one_cannot_be_claimed() {
        let dir = tempfile::tempdir().unwrap();
        let head = Announced::write(dir.path(), 7, &allocate(1)).unwrap();
        let served = Announced::write(dir.path(), 7, &allocate(2)).unwrap();
        let [seen] = &head.others()[..] else { panic!() };
        assert!(seen.claim());
        assert!(served.was_served());
        seen.done("42");
        let answer = tokio::time::timeout(Duration::from_secs(5), served.served()).await;
        assert_eq!(answer.expect("told it was served"), "42");
        assert!(!served.withdraw(), "claimed first: the waiter must undo what may be stored for it");

        let gone = Announced::write(dir.path(), 7, &allocate(3)).unwrap();
        let [seen] = &head.others()[..] else { panic!() };
        assert!(gone.withdraw());
        assert!(!seen.claim(), "withdrawn first: the head must not serve it");
    }

    #[test]
    fn the_head_wakes_the_process_it_served_and_its_socket_goes_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let head = Announced::write(dir.path(), 7, &allocate(1)).unwrap();
        let served = Announced::write(dir.path(), 7, &allocate(2)).unwrap();
        let socket = served.wake.as_ref().expect("a wake-up socket under a short path");
        let mut datagram = [0u8; 1];
        let before = socket.recv(&mut datagram).unwrap_err();
        assert_eq!(before.kind(), std::io::ErrorKind::WouldBlock, "nothing to wake it before it is served");
        let [seen] = &head.others()[..] else { panic!("the head sees the sockets as no announcement") };
        assert!(seen.claim());
        seen.done("42");
        assert_eq!(socket.recv(&mut datagram).unwrap(), 0, "woken by an empty datagram");
        assert_eq!(served.answer().as_deref(), Some("42"));
        drop((head, served));
        let left: Vec<_> = fs::read_dir(dir.path()).unwrap().flatten().map(|e| e.file_name()).collect();
        assert!(left.is_empty(), "{left:?}");
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

    /// A pool of `len` allocations, made by `node(i)` for the i-th.
    fn pool_of(len: usize, node: impl Fn(usize) -> Option<&'static str>) -> Pool {
        let mut pool = Pool::new("10.0.0.0/16".parse().unwrap());
        for i in 0..len {
            let mut owner = owner(u32::try_from(i).unwrap());
            owner.node = node(i).map(Into::into);
            pool.insert(pool.base() + 1 + i as u128, owner.allocation());
        }
        pool
    }

    #[test]
    fn a_large_shared_pool_is_remembered_until_it_is_read_small_or_one_nodes() {
        let dir = tempfile::tempdir().unwrap();
        let queue = dir.path().join("q.queue");
        let two_nodes = |i: usize| Some(if i.is_multiple_of(2) { "a" } else { "b" });
        assert!(!was_large_and_shared(&queue));
        remember_shape(&queue, &pool_of(LARGE_POOL - 1, two_nodes));
        assert!(!was_large_and_shared(&queue));
        remember_shape(&queue, &pool_of(LARGE_POOL, two_nodes));
        assert!(was_large_and_shared(&queue));
        remember_shape(&queue, &pool_of(3, two_nodes));
        assert!(!was_large_and_shared(&queue));
        // A node's slice pool, or a single node's: its node never contends with another.
        remember_shape(&queue, &pool_of(1000, |_| Some("a")));
        assert!(!was_large_and_shared(&queue));
        // Upstream's entries record no node: anyone may write them.
        remember_shape(&queue, &pool_of(LARGE_POOL, |_| None));
        assert!(was_large_and_shared(&queue));
        remember_shape(&queue, &pool_of(LARGE_POOL, |i| (i > 0).then_some("a")));
        assert!(was_large_and_shared(&queue));
        remember_shape(&queue, &pool_of(LARGE_POOL, |i| (i == 0).then_some("a")));
        assert!(was_large_and_shared(&queue));
    }

    #[test]
    fn announcements_of_dead_processes_are_removed_not_served() {
        let dir = tempfile::tempdir().unwrap();
        let mine = Announced::write(dir.path(), 7, &allocate(1)).unwrap();
        // No process has PID 0 in /proc.
        let stale = dir.path().join(format!("{:016x}-0-{:016x}.json", 7, 1));
        fs::write(&stale, serde_json::to_vec(&allocate(9)).unwrap()).unwrap();
        assert!(mine.others().is_empty());
        assert!(!stale.exists());
    }
}
