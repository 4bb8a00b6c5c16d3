//! Upstream's cluster-wide mutex: client-go `leaderelection` over a `coordination.k8s.io/v1` Lease
//! with `ReleaseOnCancel`, reproduced step by step (`tryAcquireOrRenew`, `acquire`, `renew`, `release`)
//! so that a process running this shares the Lease with real upstream plugins.
//!
//! What matters for interoperation:
//! * the record written: `holderIdentity`, `leaseDurationSeconds` (whole seconds of the configured
//!   duration), `acquireTime`/`renewTime` (MicroTime), `leaseTransitions` (+1 when the holder changes);
//! * when a held Lease may be taken: its holder is empty or ourselves, or the record has not changed for
//!   its *own* `leaseDurationSeconds`, measured on the local clock from when this candidate first saw
//!   it. "Changed" is judged on the record as client-go serialises it, with second-precision times, so
//!   renewals within one second do not count as changes;
//! * every write is a PUT carrying the resourceVersion last read or written (optimistic);
//! * release writes an empty holder with `leaseDurationSeconds: 1`, so waiting candidates take it at
//!   their next try.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::UpstreamError;

/// The Lease every upstream plugin takes outside node-slice mode.
pub const LEASE_NAME: &str = "whereabouts";

/// client-go's `JitterFactor`: acquisition retries wait `RetryPeriod × [1, 1 + 1.2)`.
const JITTER_FACTOR: f64 = 1.2;

/// The three leader-election durations (`leader_lease_duration`, `leader_renew_deadline`,
/// `leader_retry_period`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseTiming {
    /// How long a record stays valid; written as whole seconds.
    pub lease_duration: Duration,
    /// How long a holder keeps retrying a failed renewal before it gives up.
    pub renew_deadline: Duration,
    /// The pause between tries, and between renewals.
    pub retry_period: Duration,
}

impl Default for LeaseTiming {
    /// Upstream's 1500/1000/500 ms.
    fn default() -> Self {
        LeaseTiming::from_millis(0, 0, 0)
    }
}

impl LeaseTiming {
    /// From the configuration's milliseconds, 0 meaning upstream's default for that knob.
    pub fn from_millis(lease_duration: u64, renew_deadline: u64, retry_period: u64) -> Self {
        let or = |ms: u64, default: u64| Duration::from_millis(if ms == 0 { default } else { ms });
        LeaseTiming {
            lease_duration: or(lease_duration, 1500),
            renew_deadline: or(renew_deadline, 1000),
            retry_period: or(retry_period, 500),
        }
    }
}

/// client-go's `LeaderElectionRecord`: the Lease spec as the elector sees it.
#[derive(Debug, Clone, Default, PartialEq)]
struct Record {
    holder: String,
    duration_seconds: i32,
    acquire_time: Option<Timestamp>,
    renew_time: Option<Timestamp>,
    transitions: i32,
    strategy: Option<String>,
    preferred_holder: Option<String>,
}

/// A record as client-go compares records (its JSON serialisation, where times have whole seconds).
type RawRecord = (String, i32, Option<i64>, Option<i64>, i32, Option<String>, Option<String>);

impl Record {
    fn from_spec(spec: Option<&LeaseSpec>) -> Self {
        let Some(spec) = spec else { return Record::default() };
        Record {
            holder: spec.holder_identity.clone().unwrap_or_default(),
            duration_seconds: spec.lease_duration_seconds.unwrap_or_default(),
            acquire_time: spec.acquire_time.as_ref().map(|t| t.0),
            renew_time: spec.renew_time.as_ref().map(|t| t.0),
            transitions: spec.lease_transitions.unwrap_or_default(),
            strategy: spec.strategy.clone().filter(|s| !s.is_empty()),
            preferred_holder: spec.preferred_holder.clone().filter(|s| !s.is_empty()),
        }
    }

    fn to_spec(&self) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.holder.clone()),
            lease_duration_seconds: Some(self.duration_seconds),
            acquire_time: self.acquire_time.map(MicroTime),
            renew_time: self.renew_time.map(MicroTime),
            lease_transitions: Some(self.transitions),
            strategy: self.strategy.clone(),
            preferred_holder: self.preferred_holder.clone(),
        }
    }

    fn raw(&self) -> RawRecord {
        (
            self.holder.clone(),
            self.duration_seconds,
            self.acquire_time.map(|t| t.as_second()),
            self.renew_time.map(|t| t.as_second()),
            self.transitions,
            self.strategy.clone(),
            self.preferred_holder.clone(),
        )
    }
}

/// A candidate for the Lease: one CNI call, identified by its pod.
pub struct LeaseLock {
    api: Api<Lease>,
    name: String,
    identity: String,
    timing: LeaseTiming,
}

impl std::fmt::Debug for LeaseLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseLock")
            .field("name", &self.name)
            .field("identity", &self.identity)
            .field("timing", &self.timing)
            .finish_non_exhaustive()
    }
}

impl LeaseLock {
    /// The Lease [`LEASE_NAME`] in `namespace`, for `identity` (upstream: `<podNamespace>/<podName>`).
    pub fn new(client: Client, namespace: &str, identity: impl Into<String>, timing: LeaseTiming) -> Self {
        LeaseLock {
            api: Api::namespaced(client, namespace),
            name: LEASE_NAME.to_string(),
            identity: identity.into(),
            timing,
        }
    }

    /// Runs the elector in the background until it leads, as `IPManagement` does: at `deadline` it is
    /// stopped and the wait fails with "time limit exceeded while waiting to become leader".
    pub async fn acquire(self, deadline: Instant) -> Result<Leadership, UpstreamError> {
        let (stop, stopped) = watch::channel(false);
        let (leading, elected) = oneshot::channel();
        let task = tokio::spawn(Elector::new(self).run(leading, stopped));
        let leadership = Leadership { stop, task };
        match tokio::time::timeout_at(deadline, elected).await {
            Ok(Ok(())) => Ok(leadership),
            // The elector cannot end on its own before leading; a panic in it lands here too.
            Ok(Err(_)) | Err(_) => {
                leadership.release().await;
                Err(UpstreamError::LeaderTimeout)
            }
        }
    }
}

/// A running elector that leads (or led: losing the Lease does not stop the caller, as upstream). It
/// renews in the background until [`Leadership::release`]; dropping it stops the elector too.
#[derive(Debug)]
pub struct Leadership {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Leadership {
    /// Cancels the elector and waits until it has released the Lease (if it still holds it).
    pub async fn release(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// client-go's `LeaderElector` state for one Lease.
struct Elector {
    lock: LeaseLock,
    /// The Lease object last read or written: the base of every update (`LeaseLock.lease`).
    lease: Option<Lease>,
    observed: Record,
    observed_raw: Option<RawRecord>,
    observed_time: Option<Instant>,
}

impl Elector {
    fn new(lock: LeaseLock) -> Self {
        Elector { lock, lease: None, observed: Record::default(), observed_raw: None, observed_time: None }
    }

    /// `Run`: acquire, report leadership, renew until stopped or a renewal fails, release.
    async fn run(mut self, leading: oneshot::Sender<()>, mut stop: watch::Receiver<bool>) {
        if !self.acquire(&mut stop).await {
            return;
        }
        let _ = leading.send(());
        self.renew(&mut stop).await;
        self.release().await;
    }

    /// `acquire`: a try, then one every `RetryPeriod × [1, 2.2)`, until one succeeds.
    async fn acquire(&mut self, stop: &mut watch::Receiver<bool>) -> bool {
        loop {
            match until_stopped(stop, self.try_acquire_or_renew()).await {
                None => return false,
                Some(true) => return true,
                Some(false) => {}
            }
            let retry = self.lock.timing.retry_period;
            let pause = retry + retry.mul_f64(fastrand::f64() * JITTER_FACTOR);
            if until_stopped(stop, tokio::time::sleep(pause)).await.is_none() {
                return false;
            }
        }
    }

    /// `renew`: every `RetryPeriod` (the first at once), a renewal that is retried every `RetryPeriod`
    /// until it succeeds or `RenewDeadline` passes; the latter ends leadership.
    async fn renew(&mut self, stop: &mut watch::Receiver<bool>) {
        let timing = self.lock.timing;
        loop {
            let give_up = Instant::now() + timing.renew_deadline;
            loop {
                let tried =
                    until_stopped(stop, tokio::time::timeout_at(give_up, self.try_acquire_or_renew())).await;
                match tried {
                    None => return,
                    Some(Ok(true)) => break,
                    Some(_) if Instant::now() + timing.retry_period >= give_up => return,
                    Some(_) => {
                        if until_stopped(stop, tokio::time::sleep(timing.retry_period)).await.is_none() {
                            return;
                        }
                    }
                }
            }
            if until_stopped(stop, tokio::time::sleep(timing.retry_period)).await.is_none() {
                return;
            }
        }
    }

    fn is_leader(&self) -> bool {
        self.observed.holder == self.lock.identity
    }

    fn is_lease_valid(&self, now: Instant) -> bool {
        let duration = Duration::from_secs(u64::try_from(self.observed.duration_seconds).unwrap_or(0));
        self.observed_time.is_some_and(|seen| seen + duration > now)
    }

    fn set_observed(&mut self, record: Record) {
        self.observed = record;
        self.observed_time = Some(Instant::now());
    }

    /// `tryAcquireOrRenew`.
    async fn try_acquire_or_renew(&mut self) -> bool {
        let now = Instant::now();
        let wall = Timestamp::now();
        let mut record = Record {
            holder: self.lock.identity.clone(),
            duration_seconds: i32::try_from(self.lock.timing.lease_duration.as_secs()).unwrap_or(i32::MAX),
            acquire_time: Some(wall),
            renew_time: Some(wall),
            ..Record::default()
        };
        // 1. A leader first renews optimistically on the object it last wrote.
        if self.is_leader() && self.is_lease_valid(now) {
            let renewal = Record {
                acquire_time: self.observed.acquire_time,
                transitions: self.observed.transitions,
                ..record.clone()
            };
            if self.update(&renewal).await {
                self.set_observed(renewal);
                return true;
            }
        }
        // 2. Read the Lease, creating it when absent.
        let current = match self.lock.api.get_opt(&self.lock.name).await {
            Ok(Some(current)) => current,
            Ok(None) => {
                let lease = Lease {
                    metadata: ObjectMeta { name: Some(self.lock.name.clone()), ..ObjectMeta::default() },
                    spec: Some(record.to_spec()),
                };
                self.lease = self.lock.api.create(&PostParams::default(), &lease).await.ok();
                if self.lease.is_none() {
                    return false;
                }
                self.set_observed(record);
                return true;
            }
            Err(_) => return false,
        };
        let old = Record::from_spec(current.spec.as_ref());
        self.lease = Some(current);
        // 3. The validity clock restarts whenever the record changes.
        let raw = old.raw();
        if self.observed_raw.as_ref() != Some(&raw) {
            self.set_observed(old.clone());
            self.observed_raw = Some(raw);
        }
        if !old.holder.is_empty() && self.is_lease_valid(now) && !self.is_leader() {
            return false;
        }
        // 4. Take or keep it.
        if self.is_leader() {
            record.acquire_time = old.acquire_time;
            record.transitions = old.transitions;
        } else {
            record.transitions = old.transitions + 1;
        }
        if !self.update(&record).await {
            return false;
        }
        self.set_observed(record);
        true
    }

    /// `release`: when still the leader, an empty holder with a 1 s duration, within `RenewDeadline`.
    async fn release(&mut self) {
        if !self.is_leader() {
            return;
        }
        let now = Timestamp::now();
        let record = Record {
            duration_seconds: 1,
            acquire_time: Some(now),
            renew_time: Some(now),
            transitions: self.observed.transitions,
            ..Record::default()
        };
        let deadline = Instant::now() + self.lock.timing.renew_deadline;
        // A renewal abandoned when we were stopped may still have landed, leaving our base stale. Go's
        // client gives up then and the Lease stays held until it expires; this emulation re-reads and
        // releases what is still ours, so that tests and the benchmark baseline are not slowed by that
        // race (a deviation kept on purpose).
        while Instant::now() < deadline {
            if matches!(tokio::time::timeout_at(deadline, self.update(&record)).await, Ok(true)) {
                self.set_observed(record);
                return;
            }
            match self.lock.api.get_opt(&self.lock.name).await {
                Ok(Some(current))
                    if current.spec.as_ref().and_then(|s| s.holder_identity.as_deref())
                        == Some(self.lock.identity.as_str()) =>
                {
                    self.lease = Some(current);
                }
                _ => return,
            }
        }
    }

    /// `LeaseLock.Update`: PUT the last-seen object with `record` as its spec (resourceVersion
    /// precondition included); the answer becomes the new base.
    async fn update(&mut self, record: &Record) -> bool {
        let Some(lease) = &self.lease else { return false };
        let mut lease = lease.clone();
        lease.spec = Some(record.to_spec());
        match self.lock.api.replace(&self.lock.name, &PostParams::default(), &lease).await {
            Ok(updated) => {
                self.lease = Some(updated);
                true
            }
            Err(_) => false,
        }
    }
}

/// Runs `work` unless or until the elector is stopped (in-flight requests are abandoned, as a cancelled
/// Go context abandons them).
async fn until_stopped<F: Future>(stop: &mut watch::Receiver<bool>, work: F) -> Option<F::Output> {
    tokio::select! {
        biased;
        _ = stop.wait_for(|stopped| *stopped) => None,
        output = work => Some(output),
    }
}
