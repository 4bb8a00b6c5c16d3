//! One writer at a time per pool across nodes: a Lease per IPPool, held by the head of a node's writer
//! queue for one read-modify-write.
//!
//! The API server applies each write to the whole object, and when writes to one object overlap it
//! applies, validates and tries to commit each of them again until it lands: N nodes writing one pool
//! at once cost it about N times the work of each write, and on a big pool under load that work
//! outgrows the machine (measured: 1000 ADDs from 20 nodes on one pool, 5 at a time per node, took
//! 163 s and ended in 504s, the API server's two cores saturated by re-validation). With the Lease the
//! heads of the nodes' queues take turns: each turn is one write carrying its node's whole batch, at
//! the cost of two small writes (take and give back the Lease).
//!
//! The Lease is an optimisation, never a safety device: every pool write stays a compare-and-swap, so
//! a writer that cannot have the Lease (no permission, the API server failing, the deadline near)
//! writes without it, and a holder that died is taken over once its Lease was seen unchanged for
//! [`LEASE_DURATION`] on the waiter's own clock (clocks of nodes may disagree). A holder never
//! renews: one turn is a read and a write.
//!
//! Waiters watch the Lease rather than poll it: a watch from the version they saw wakes them when
//! the holder gives it back, at once and without a stream of reads (twenty nodes polling every few
//! milliseconds cost a busy API server more than the writes they wait for). A waiter keeps its watch
//! across the hand-overs it loses. Without permission to watch, or when a watch fails, they poll.

use std::time::{Duration, Instant};

use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::Api;
use kube::api::{ObjectMeta, PostParams, WatchEvent, WatchParams};
use whereabouts_k8s::{k8s_openapi, kube};

/// How long a Lease seen unchanged is taken as held by a writer that died.
const LEASE_DURATION: Duration = Duration::from_secs(2);
/// The first and the longest pause between two looks at a busy Lease.
const FIRST_POLL: Duration = Duration::from_millis(2);
const LONGEST_POLL: Duration = Duration::from_millis(25);

/// The Lease name of pool `pool`: `whereabouts-pool-<pool>` when that is a valid object name, else
/// with a hash of the pool's name.
pub(crate) fn lease_name(pool: &str) -> String {
    let valid = pool.len() <= 200
        && pool.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && pool.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && pool.bytes().last().is_some_and(|b| b.is_ascii_alphanumeric());
    if valid {
        format!("whereabouts-pool-{pool}")
    } else {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        pool.hash(&mut hasher);
        format!("whereabouts-pool-{:016x}", hasher.finish())
    }
}

/// A pool's Lease as this process holds it.
#[derive(Debug)]
pub(crate) struct HeldLease {
    lease: Lease,
    /// Whether another writer held it when first looked at: other nodes are writing the pool.
    pub(crate) waited: bool,
}

/// Takes the Lease of pool `pool` for `holder`, waiting for its current holder until `deadline`.
/// `None` when it could not be had (not permitted, an error, the deadline): the caller writes anyway.
///
/// A waiter keeps one watch open for its whole wait: each change of the Lease arrives on it, also the
/// one that shows another waiter took the Lease first, so losing a race to take it costs no new read
/// and no new watch (twenty nodes each reading and watching again after every hand-over cost the API
/// server more than the hand-overs).
pub(crate) async fn acquire(
    leases: &Api<Lease>,
    pool: &str,
    holder: &str,
    deadline: Instant,
) -> Option<HeldLease> {
    let name = lease_name(pool);
    // The version last seen and since when, on this clock.
    let mut seen: Option<(String, Instant)> = None;
    let mut waited = false;
    // The Lease as last read or delivered; `None` means read it.
    let mut known: Option<Lease> = None;
    // The version whose replace lost a race: wait for the next change instead of trying it again.
    let mut lost_at: Option<String> = None;
    let mut changes: Option<BoxStream<'_, Result<WatchEvent<Lease>, kube::Error>>> = None;
    let mut watching = true;
    let mut pause = FIRST_POLL;
    while Instant::now() < deadline {
        let lease = match known.take() {
            Some(lease) => lease,
            None => match leases.get_opt(&name).await {
                Ok(Some(lease)) => lease,
                Ok(None) => {
                    let lease = Lease {
                        metadata: ObjectMeta { name: Some(name.clone()), ..ObjectMeta::default() },
                        spec: Some(spec_for(holder)),
                    };
                    match leases.create(&PostParams::default(), &lease).await {
                        Ok(lease) => return Some(HeldLease { lease, waited }),
                        Err(kube::Error::Api(status)) if status.code == 409 => {
                            waited = true;
                            continue;
                        }
                        Err(e) => {
                            tracing::debug!("Lease {name}: {e}; writing without it");
                            return None;
                        }
                    }
                }
                Err(e) => {
                    tracing::debug!("Lease {name}: {e}; writing without it");
                    return None;
                }
            },
        };
        let version = lease.metadata.resource_version.clone().unwrap_or_default();
        let busy =
            lease.spec.as_ref().and_then(|s| s.holder_identity.as_deref()).is_some_and(|h| !h.is_empty());
        let expired = match &seen {
            Some((seen_version, since)) if *seen_version == version => since.elapsed() >= LEASE_DURATION,
            _ => {
                seen = Some((version.clone(), Instant::now()));
                false
            }
        };
        // A version whose replace lost is never tried again, also not as expired: the change that beat
        // it is waited for (or read).
        let lost_this_one = lost_at.as_deref() == Some(version.as_str());
        if lost_this_one || (busy && !expired) {
            waited = true;
            // Until the Lease changes (given back, or taken by the waiter that won), or until it has
            // looked unchanged for long enough to be taken over.
            let since = seen.as_ref().map_or_else(Instant::now, |(_, since)| *since);
            let until = if lost_this_one {
                deadline.min(Instant::now() + LEASE_DURATION)
            } else {
                deadline.min(since + LEASE_DURATION)
            };
            if watching && changes.is_none() {
                match open_watch(leases, &name, &version, deadline).await {
                    Ok(stream) => changes = Some(stream),
                    Err(e) => {
                        tracing::debug!("Lease {name}: watching: {e}; polling instead");
                        watching = false;
                    }
                }
            }
            match changes.as_mut() {
                Some(stream) => match next_change(stream, until).await {
                    Change::Changed(lease) => known = Some(*lease),
                    // After a lost race the watch owes a change: without it, read the Lease again.
                    Change::Unchanged if lost_this_one => {}
                    Change::Unchanged => known = Some(lease),
                    Change::Ended => changes = None,
                    Change::Failed(e) => {
                        tracing::debug!("Lease {name}: watching: {e}; reading it again");
                        changes = None;
                    }
                },
                None => {
                    let wait = pause
                        .mul_f64(0.5 + fastrand::f64())
                        .min(until.saturating_duration_since(Instant::now()));
                    tokio::time::sleep(wait).await;
                    pause = (pause * 2).min(LONGEST_POLL);
                }
            }
            continue;
        }
        if expired {
            tracing::debug!("Lease {name}: unchanged for {LEASE_DURATION:?}, taking it over");
        }
        let taken = Lease { spec: Some(spec_for(holder)), ..lease.clone() };
        // A replace carries the version read: it fails if anyone took the Lease in between.
        match leases.replace(&name, &PostParams::default(), &taken).await {
            Ok(lease) => return Some(HeldLease { lease, waited }),
            Err(kube::Error::Api(status)) if status.code == 409 => {
                waited = true;
                // The change that beat us is on its way on the watch; without one, read again.
                if changes.is_some() {
                    lost_at = Some(version);
                    known = Some(lease);
                }
            }
            Err(kube::Error::Api(status)) if status.code == 404 => waited = true,
            Err(e) => {
                tracing::debug!("Lease {name}: {e}; writing without it");
                return None;
            }
        }
    }
    None
}

/// A watch of the Lease `name` from `version`, ended by the server at the caller's `deadline`.
async fn open_watch<'a>(
    leases: &'a Api<Lease>,
    name: &str,
    version: &str,
    deadline: Instant,
) -> Result<BoxStream<'a, Result<WatchEvent<Lease>, kube::Error>>, kube::Error> {
    // The server ends the watch after whole seconds.
    let seconds = deadline.saturating_duration_since(Instant::now()).as_secs() + 1;
    let seconds = u32::try_from(seconds).unwrap_or(u32::MAX);
    let params = WatchParams::default().fields(&format!("metadata.name={name}")).timeout(seconds);
    Ok(leases.watch(&params, version).await?.boxed())
}

/// What a watch of a Lease said by a given time.
enum Change {
    /// The Lease as changed.
    Changed(Box<Lease>),
    /// Nothing changed by then.
    Unchanged,
    /// The watch ended (the server's timeout, or the Lease deleted); read the Lease again.
    Ended,
    /// The watch failed (its version too old, the server going away); read the Lease again.
    Failed(kube::Error),
}

/// The next change of the Lease on `changes`, waiting until `until` at most.
async fn next_change(
    changes: &mut BoxStream<'_, Result<WatchEvent<Lease>, kube::Error>>,
    until: Instant,
) -> Change {
    loop {
        let next = match tokio::time::timeout_at(until.into(), changes.try_next()).await {
            Err(_elapsed) => return Change::Unchanged,
            Ok(Err(e)) => return Change::Failed(e),
            Ok(Ok(next)) => next,
        };
        match next {
            Some(WatchEvent::Modified(lease)) => return Change::Changed(Box::new(lease)),
            Some(WatchEvent::Bookmark(_) | WatchEvent::Added(_)) => {}
            Some(WatchEvent::Deleted(_)) | None => return Change::Ended,
            Some(WatchEvent::Error(status)) => return Change::Failed(kube::Error::Api(status)),
        }
    }
}

/// Gives the Lease back (empties its holder), unless someone took it over since.
pub(crate) async fn release(leases: &Api<Lease>, held: HeldLease) {
    let HeldLease { mut lease, .. } = held;
    let name = lease.metadata.name.clone().unwrap_or_default();
    if let Some(spec) = lease.spec.as_mut() {
        spec.holder_identity = None;
    }
    if let Err(e) = leases.replace(&name, &PostParams::default(), &lease).await {
        // Taken over after it seemed expired, or the server failing: the next writer waits out the
        // Lease's duration at worst.
        tracing::debug!("Lease {name}: giving it back: {e}");
    }
}

fn spec_for(holder: &str) -> LeaseSpec {
    let now = MicroTime(k8s_openapi::jiff::Timestamp::now());
    LeaseSpec {
        holder_identity: Some(holder.to_string()),
        lease_duration_seconds: Some(LEASE_DURATION.as_secs() as i32),
        acquire_time: Some(now.clone()),
        renew_time: Some(now),
        ..LeaseSpec::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_names_are_valid_object_names() {
        assert_eq!(lease_name("net-10.0.0.0-24"), "whereabouts-pool-net-10.0.0.0-24");
        for odd in ["Net_A-10.0.0.0-24", &"x".repeat(240), "-a", "a-"] {
            let name = lease_name(odd);
            assert!(name.starts_with("whereabouts-pool-") && name.len() == 33, "{name}");
        }
        assert_ne!(lease_name("A"), lease_name("B"));
    }
}
