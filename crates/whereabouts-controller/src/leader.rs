//! Leader election on a `coordination.k8s.io/v1` Lease, so that of several controller replicas only
//! one releases addresses at a time.
//!
//! kube-runtime has no leader election, so this is our own, written to client-go's conventions (its
//! `leaderelection` package with a `LeaseLock`): the Lease carries `holderIdentity`,
//! `leaseDurationSeconds`, `acquireTime`, `renewTime` and `leaseTransitions` with their usual meanings,
//! so `kubectl get lease` and client-go candidates read it as they would their own, and one of ours can
//! stand by behind a client-go leader or the other way round.
//!
//! # How a candidate decides
//!
//! Every [`LeaseConfig::retry_period`] (with up to 20% jitter, so standbys do not call in step) a
//! candidate reads the Lease and takes it when it does not exist (create), names no holder, names this
//! candidate, or has expired. Expiry is judged as client-go judges it: on the candidate's *own*
//! monotonic clock, from when it last saw the record change (a new resourceVersion), never by
//! comparing the holder's `renewTime` with the local wall clock. Clock skew between nodes therefore
//! cannot make a live leader's Lease look expired; only the rate at which the clocks run matters.
//! Every write is a compare-and-swap: a replace carrying the resourceVersion read (or a create), so of
//! two candidates that judged the Lease free at once, one gets 409 Conflict and stays a candidate.
//!
//! # Why two leaders cannot overlap
//!
//! The leader renews every retry period and counts its renew deadline from the *start* of its last
//! successful renewal, which is before the server stored it. Any other candidate first sees that record
//! after it was stored, and waits a whole lease duration from then before it may take over; if the
//! leader renewed meanwhile, the record changed and its wait starts again (or its compare-and-swap fails).
//! The leader stops calling itself leader once the renew deadline has passed without a successful
//! renewal, and the renew deadline is shorter than the lease duration ([`LeaseConfig::new`] refuses
//! anything else). So the old leader reports `false` at least `lease_duration - renew_deadline` (5 s with
//! the defaults) before anyone else can report `true`: that margin is what the work guarded by
//! leadership has to stop in, and what absorbs clocks running at slightly different rates. Requests
//! still in flight at the deadline are abandoned; if one lands late it only changes the record, which
//! restarts every other candidate's wait.
//!
//! Leadership can come back: a leader that lost its Lease to a slow API server stays a candidate, and
//! takes the Lease again if nobody else did. Work guarded by leadership should follow the receiver of
//! [`Leadership::subscribe`] both ways.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, PostParams};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep_until, timeout, timeout_at};

use crate::metrics::Metrics;

/// client-go's default lease duration.
pub const DEFAULT_LEASE_DURATION: Duration = Duration::from_secs(15);
/// client-go's default renew deadline.
pub const DEFAULT_RENEW_DEADLINE: Duration = Duration::from_secs(10);
/// client-go's default retry period.
pub const DEFAULT_RETRY_PERIOD: Duration = Duration::from_secs(2);

/// The most a candidate's retry period is stretched by, at random (client-go's jitter factor).
const JITTER: f64 = 0.2;

/// Why a [`LeaseConfig`] was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The Lease's name, its namespace or the candidate's identity is empty.
    #[error("the lease's {0} is empty")]
    Empty(&'static str),
    /// The retry period is zero.
    #[error("the retry period is zero")]
    ZeroRetryPeriod,
    /// The leader could still think itself leader when others may take over.
    #[error(
        "the renew deadline ({renew_deadline:?}) is not shorter than the lease duration ({lease_duration:?})"
    )]
    RenewDeadlineTooLong {
        /// The renew deadline asked for.
        renew_deadline: Duration,
        /// The lease duration asked for.
        lease_duration: Duration,
    },
    /// The leader would not get a second try at renewing before its deadline.
    #[error(
        "the retry period ({retry_period:?}) is not shorter than the renew deadline ({renew_deadline:?})"
    )]
    RetryPeriodTooLong {
        /// The retry period asked for.
        retry_period: Duration,
        /// The renew deadline asked for.
        renew_deadline: Duration,
    },
    /// The lease duration does not fit `leaseDurationSeconds` (an int32).
    #[error("the lease duration ({0:?}) is too long for a Lease")]
    LeaseDurationTooLong(Duration),
}

/// Which Lease to elect on, who this candidate is, and the timings. Valid by construction:
/// `retry_period < renew_deadline < lease_duration`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseConfig {
    name: String,
    namespace: String,
    identity: String,
    lease_duration: Duration,
    renew_deadline: Duration,
    retry_period: Duration,
}

impl LeaseConfig {
    /// The Lease `namespace/name`, elected on as `identity` (unique among the candidates: the pod's
    /// name, say), with client-go's default timings (15 s, 10 s, 2 s).
    ///
    /// # Errors
    ///
    /// [`ConfigError::Empty`] when a name is empty.
    pub fn new(
        name: impl Into<String>,
        namespace: impl Into<String>,
        identity: impl Into<String>,
    ) -> Result<LeaseConfig, ConfigError> {
        LeaseConfig {
            name: name.into(),
            namespace: namespace.into(),
            identity: identity.into(),
            lease_duration: DEFAULT_LEASE_DURATION,
            renew_deadline: DEFAULT_RENEW_DEADLINE,
            retry_period: DEFAULT_RETRY_PERIOD,
        }
        .validated()
    }

    /// The same with other timings: others may take the Lease `lease_duration` after they last saw it
    /// renewed, the leader gives up when it could not renew for `renew_deadline`, and both try every
    /// `retry_period`. `leaseDurationSeconds` is the lease duration rounded up to whole seconds (at
    /// least 1), so readers never wait less than asked.
    ///
    /// # Errors
    ///
    /// Unless `0 < retry_period < renew_deadline < lease_duration` (and the lease duration fits an
    /// int32 of seconds).
    pub fn with_timings(
        self,
        lease_duration: Duration,
        renew_deadline: Duration,
        retry_period: Duration,
    ) -> Result<LeaseConfig, ConfigError> {
        LeaseConfig { lease_duration, renew_deadline, retry_period, ..self }.validated()
    }

    fn validated(self) -> Result<LeaseConfig, ConfigError> {
        for (what, value) in
            [("name", &self.name), ("namespace", &self.namespace), ("identity", &self.identity)]
        {
            if value.is_empty() {
                return Err(ConfigError::Empty(what));
            }
        }
        if self.retry_period.is_zero() {
            return Err(ConfigError::ZeroRetryPeriod);
        }
        if self.renew_deadline >= self.lease_duration {
            return Err(ConfigError::RenewDeadlineTooLong {
                renew_deadline: self.renew_deadline,
                lease_duration: self.lease_duration,
            });
        }
        if self.retry_period >= self.renew_deadline {
            return Err(ConfigError::RetryPeriodTooLong {
                retry_period: self.retry_period,
                renew_deadline: self.renew_deadline,
            });
        }
        if i32::try_from(self.lease_duration.as_secs()).is_err() {
            return Err(ConfigError::LeaseDurationTooLong(self.lease_duration));
        }
        Ok(self)
    }

    /// The Lease's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The Lease's namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// This candidate's `holderIdentity`.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// How long others wait, after they last saw the Lease change, before they may take it.
    pub fn lease_duration(&self) -> Duration {
        self.lease_duration
    }

    /// How long the leader keeps calling itself leader without a successful renewal.
    pub fn renew_deadline(&self) -> Duration {
        self.renew_deadline
    }

    /// How often the Lease is tried (renewed, or read by a candidate).
    pub fn retry_period(&self) -> Duration {
        self.retry_period
    }

    /// `leaseDurationSeconds`: rounded up, so that a reader never waits less than the lease duration.
    fn lease_duration_seconds(&self) -> i32 {
        let seconds = self.lease_duration.as_secs() + u64::from(self.lease_duration.subsec_nanos() > 0);
        // validated() checked the whole seconds fit; rounding up may add one more.
        i32::try_from(seconds).unwrap_or(i32::MAX).max(1)
    }
}

/// A running election. Dropping it stops the election *without* releasing the Lease, as a crash
/// would (others take over after the lease duration); [`Leadership::step_down`] hands over at once.
#[derive(Debug)]
pub struct Leadership {
    state: watch::Receiver<bool>,
    stop: Arc<Notify>,
    task: JoinHandle<()>,
}

/// Starts campaigning for the Lease in a background task; the election runs until
/// [`Leadership::step_down`] (or the `Leadership` is dropped). Sets `metrics.leader` to 1 while leading.
///
/// # Panics
///
/// Outside a tokio runtime.
pub fn spawn(client: kube::Client, config: LeaseConfig, metrics: Arc<Metrics>) -> Leadership {
    let (sender, state) = watch::channel(false);
    let stop = Arc::new(Notify::new());
    metrics.leader.set(0);
    let elector = Elector { api: Api::namespaced(client, &config.namespace), config, observed: None };
    let task = tokio::spawn(elector.run(Reporter { state: sender, metrics }, stop.clone()));
    Leadership { state, stop, task }
}

impl Leadership {
    /// A receiver of whether this candidate leads now: `true` from when it took or renewed the Lease,
    /// `false` from the moment it may no longer rely on it. It turns `false` when the election stops,
    /// however it stops.
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.state.clone()
    }

    /// Stops campaigning and, if leading, reports `false` and then releases the Lease (an empty
    /// `holderIdentity`, written as a compare-and-swap; `leaseTransitions` is kept), so a standby takes
    /// over within its retry period instead of after the lease duration. Stop the work guarded by
    /// leadership first: once this returns, another candidate may already lead. Gives the release at
    /// most the renew deadline; if the API server does not answer by then, the Lease expires as usual.
    pub async fn step_down(mut self) {
        // A stored permit: the task sees it at its next wait even if it is in a call to the API now.
        self.stop.notify_one();
        // A panicked task has reported false already (see Reporter's Drop); nothing else to do.
        let _ = (&mut self.task).await;
    }
}

impl Drop for Leadership {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// === impl Elector ===

/// Publishes whether this candidate leads, to the receivers and to the metric; `false` when dropped,
/// so an election that ends in any way (stepping down, abort, panic) never leaves a stale `true`.
struct Reporter {
    state: watch::Sender<bool>,
    metrics: Arc<Metrics>,
}

impl Reporter {
    fn set(&self, leading: bool) {
        self.metrics.leader.set(i64::from(leading));
        self.state.send_replace(leading);
    }
}

impl Drop for Reporter {
    fn drop(&mut self) {
        self.set(false);
    }
}

/// The Lease as last read or written by this candidate.
struct Observed {
    lease: Lease,
    /// When this candidate first saw this version of it (by its own clock).
    since: Instant,
}

/// How one try at the Lease went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Attempt {
    /// We hold it (took or renewed it).
    Holding,
    /// Another candidate holds it and it has not expired.
    HeldByOther,
    /// Our compare-and-swap lost to another write.
    Conflict,
}

struct Elector {
    api: Api<Lease>,
    config: LeaseConfig,
    observed: Option<Observed>,
}

impl Elector {
    async fn run(mut self, reporter: Reporter, stop: Arc<Notify>) {
        let config = self.config.clone();
        // The start of the last successful try while leading: the renew deadline counts from there.
        let mut renewed: Option<Instant> = None;
        loop {
            if let Some(since) = renewed
                && Instant::now() >= since + config.renew_deadline
            {
                tracing::warn!(lease = %config.name, "could not renew the leader lease in time; no longer leader");
                renewed = None;
                reporter.set(false);
            }
            let started = Instant::now();
            let limit = renewed.unwrap_or(started) + config.renew_deadline;
            let outcome = timeout_at(limit, self.try_acquire_or_renew(renewed.is_some())).await;
            match outcome {
                Ok(Ok(Attempt::Holding)) => {
                    if renewed.is_none() {
                        tracing::info!(lease = %config.name, identity = %config.identity, "became leader");
                        reporter.set(true);
                    }
                    renewed = Some(started);
                }
                Ok(Ok(Attempt::HeldByOther)) => {
                    if renewed.take().is_some() {
                        tracing::warn!(lease = %config.name, "another candidate holds the leader lease");
                        reporter.set(false);
                    }
                }
                Ok(Ok(Attempt::Conflict)) => {
                    tracing::debug!(lease = %config.name, "lost a compare-and-swap on the leader lease")
                }
                Ok(Err(error)) => tracing::warn!(lease = %config.name, %error, "leader lease call failed"),
                Err(_) => tracing::warn!(lease = %config.name, "leader lease call timed out"),
            }
            let next = match renewed {
                // Wake by the deadline at the latest, so that losing it is reported on time.
                Some(since) => (started + config.retry_period).min(since + config.renew_deadline),
                None => Instant::now() + config.retry_period.mul_f64(1.0 + JITTER * fastrand::f64()),
            };
            tokio::select! {
                () = sleep_until(next) => {}
                () = stop.notified() => break,
            }
        }
        // Before the release: from then on another candidate may lead.
        reporter.set(false);
        match timeout(config.renew_deadline, self.release()).await {
            Ok(Ok(true)) => tracing::info!(lease = %config.name, "released the leader lease"),
            Ok(Ok(false)) => {}
            Ok(Err(error)) => {
                tracing::warn!(lease = %config.name, %error, "could not release the leader lease")
            }
            Err(_) => tracing::warn!(lease = %config.name, "releasing the leader lease timed out"),
        }
    }

    /// Reads the Lease and takes or renews it if it may. A leader first tries to renew the Lease as it
    /// last wrote it without reading it (client-go's optimistic renewal: one request instead of two);
    /// if anything was written in between, the compare-and-swap fails and it reads as a candidate does.
    async fn try_acquire_or_renew(&mut self, leading: bool) -> Result<Attempt, kube::Error> {
        if leading && let Some(Observed { lease, .. }) = &self.observed {
            let renewal = Lease {
                spec: Some(claim(&self.config, lease.spec.as_ref(), Timestamp::now())),
                ..lease.clone()
            };
            match self.write(self.api.replace(&self.config.name, &PostParams::default(), &renewal).await) {
                Ok(Attempt::Holding) => return Ok(Attempt::Holding),
                Ok(_) => tracing::debug!(lease = %self.config.name, "the leader lease changed; reading it"),
                Err(error) => {
                    tracing::debug!(lease = %self.config.name, %error, "renewing the leader lease failed; reading it")
                }
            }
        }
        let Some(lease) = self.api.get_opt(&self.config.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta { name: Some(self.config.name.clone()), ..ObjectMeta::default() },
                spec: Some(claim(&self.config, None, Timestamp::now())),
            };
            return self.write(self.api.create(&PostParams::default(), &lease).await);
        };
        let now = Instant::now();
        let since = match &self.observed {
            Some(observed) if observed.lease.metadata.resource_version == lease.metadata.resource_version => {
                observed.since
            }
            _ => now,
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.as_deref().unwrap_or_default();
        let expires = since + record_duration(&spec).unwrap_or(self.config.lease_duration);
        self.observed = Some(Observed { lease: lease.clone(), since });
        if !holder.is_empty() && holder != self.config.identity && now < expires {
            return Ok(Attempt::HeldByOther);
        }
        let claimed = Lease { spec: Some(claim(&self.config, Some(&spec), Timestamp::now())), ..lease };
        self.write(self.api.replace(&self.config.name, &PostParams::default(), &claimed).await)
    }

    /// Takes in the answer to our write of the Lease.
    fn write(&mut self, result: Result<Lease, kube::Error>) -> Result<Attempt, kube::Error> {
        match result {
            Ok(lease) => {
                self.observed = Some(Observed { lease, since: Instant::now() });
                Ok(Attempt::Holding)
            }
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(Attempt::Conflict),
            Err(error) => Err(error),
        }
    }

    /// Empties `holderIdentity` if the Lease as last seen names us, as client-go's `ReleaseOnCancel`
    /// does; whether it did. Also after a missed renew deadline: if another candidate has taken the
    /// Lease since, the compare-and-swap fails. A renewal abandoned at its deadline may have landed after
    /// all, so a conflict is read again once.
    async fn release(&mut self) -> Result<bool, kube::Error> {
        let Some(Observed { mut lease, .. }) = self.observed.take() else { return Ok(false) };
        for _ in 0..2 {
            let spec = lease.spec.clone().unwrap_or_default();
            if spec.holder_identity.as_deref() != Some(self.config.identity.as_str()) {
                return Ok(false);
            }
            let now = Some(MicroTime(Timestamp::now()));
            let released = LeaseSpec {
                holder_identity: Some(String::new()),
                // client-go writes 1 s too, so that readers who ignore an empty holder see it expired.
                lease_duration_seconds: Some(1),
                acquire_time: now.clone(),
                renew_time: now,
                ..spec
            };
            let released = Lease { spec: Some(released), ..lease };
            match self.api.replace(&self.config.name, &PostParams::default(), &released).await {
                Ok(_) => return Ok(true),
                Err(kube::Error::Api(status)) if status.code == 409 => {
                    lease = self.api.get(&self.config.name).await?
                }
                Err(error) => return Err(error),
            }
        }
        Ok(false)
    }
}

/// The record's `leaseDurationSeconds`, unless it is missing or not positive.
fn record_duration(spec: &LeaseSpec) -> Option<Duration> {
    let seconds = u64::try_from(spec.lease_duration_seconds?).ok().filter(|&seconds| seconds > 0)?;
    Some(Duration::from_secs(seconds))
}

/// The spec with which this candidate creates (`current` None), takes or renews a Lease. As in
/// client-go, a created Lease starts at 0 `leaseTransitions`, each change of holder (an emptied one
/// included) adds one and sets `acquireTime`, a renewal keeps both. Fields we do not manage are kept.
fn claim(config: &LeaseConfig, current: Option<&LeaseSpec>, now: Timestamp) -> LeaseSpec {
    let base = current.cloned().unwrap_or_default();
    let renewing = base.holder_identity.as_deref() == Some(config.identity.as_str());
    let transitions = match current {
        None => 0,
        Some(_) if renewing => base.lease_transitions.unwrap_or(0),
        Some(_) => base.lease_transitions.unwrap_or(0).saturating_add(1),
    };
    let now = MicroTime(now);
    LeaseSpec {
        holder_identity: Some(config.identity.clone()),
        lease_duration_seconds: Some(config.lease_duration_seconds()),
        acquire_time: if renewing { base.acquire_time.clone() } else { Some(now.clone()) },
        renew_time: Some(now),
        lease_transitions: Some(transitions),
        ..base
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> LeaseConfig {
        LeaseConfig::new("whereabouts-controller", "kube-system", "me").unwrap()
    }

    fn ms(millis: u64) -> Duration {
        Duration::from_millis(millis)
    }

    #[test]
    fn defaults_are_client_gos() {
        let config = config();
        assert_eq!(
            (config.lease_duration(), config.renew_deadline(), config.retry_period()),
            (Duration::from_secs(15), Duration::from_secs(10), Duration::from_secs(2))
        );
        assert_eq!(
            (config.name(), config.namespace(), config.identity()),
            ("whereabouts-controller", "kube-system", "me")
        );
        assert_eq!(config.lease_duration_seconds(), 15);
    }

    #[test]
    fn timings_must_nest() {
        assert_eq!(LeaseConfig::new("", "ns", "me"), Err(ConfigError::Empty("name")));
        assert_eq!(LeaseConfig::new("l", "", "me"), Err(ConfigError::Empty("namespace")));
        assert_eq!(LeaseConfig::new("l", "ns", ""), Err(ConfigError::Empty("identity")));
        let with = |lease, renew, retry| config().with_timings(ms(lease), ms(renew), ms(retry));
        assert_eq!(
            with(2000, 2000, 300),
            Err(ConfigError::RenewDeadlineTooLong { renew_deadline: ms(2000), lease_duration: ms(2000) })
        );
        assert_eq!(
            with(2000, 1500, 1500),
            Err(ConfigError::RetryPeriodTooLong { retry_period: ms(1500), renew_deadline: ms(1500) })
        );
        assert_eq!(with(2000, 1500, 0), Err(ConfigError::ZeroRetryPeriod));
        let too_long = Duration::from_secs(u64::from(u32::MAX));
        assert_eq!(
            config().with_timings(too_long, ms(1500), ms(300)),
            Err(ConfigError::LeaseDurationTooLong(too_long))
        );
        assert!(with(2000, 1500, 300).is_ok());
    }

    #[test]
    fn lease_duration_seconds_round_up_to_at_least_one() {
        let seconds =
            |lease| config().with_timings(ms(lease), ms(100), ms(10)).unwrap().lease_duration_seconds();
        assert_eq!(seconds(150), 1);
        assert_eq!(seconds(1000), 1);
        assert_eq!(seconds(1001), 2);
        assert_eq!(seconds(2000), 2);
    }

    fn at(second: i64) -> Timestamp {
        Timestamp::from_second(second).unwrap()
    }

    fn held_by(holder: &str, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.to_owned()),
            lease_duration_seconds: Some(30),
            acquire_time: Some(MicroTime(at(10))),
            renew_time: Some(MicroTime(at(20))),
            lease_transitions: Some(transitions),
            strategy: Some("OldestEmulationVersion".to_owned()),
            ..LeaseSpec::default()
        }
    }

    #[test]
    fn a_created_lease_starts_with_no_transitions() {
        let spec = claim(&config(), None, at(100));
        assert_eq!(
            spec,
            LeaseSpec {
                holder_identity: Some("me".to_owned()),
                lease_duration_seconds: Some(15),
                acquire_time: Some(MicroTime(at(100))),
                renew_time: Some(MicroTime(at(100))),
                lease_transitions: Some(0),
                ..LeaseSpec::default()
            }
        );
    }

    #[test]
    fn a_renewal_keeps_the_acquire_time_and_the_transitions() {
        let spec = claim(&config(), Some(&held_by("me", 4)), at(100));
        assert_eq!(spec.acquire_time, Some(MicroTime(at(10))));
        assert_eq!(spec.renew_time, Some(MicroTime(at(100))));
        assert_eq!(spec.lease_transitions, Some(4));
        assert_eq!(spec.lease_duration_seconds, Some(15));
    }

    #[test]
    fn taking_over_counts_a_transition_and_keeps_unmanaged_fields() {
        for previous in ["other", ""] {
            let spec = claim(&config(), Some(&held_by(previous, 4)), at(100));
            assert_eq!(spec.holder_identity.as_deref(), Some("me"));
            assert_eq!(spec.acquire_time, Some(MicroTime(at(100))));
            assert_eq!(spec.lease_transitions, Some(5), "from {previous:?}");
            assert_eq!(spec.strategy.as_deref(), Some("OldestEmulationVersion"));
        }
        let spec = claim(&config(), Some(&LeaseSpec::default()), at(100));
        assert_eq!(spec.lease_transitions, Some(1));
    }

    #[test]
    fn a_record_without_a_positive_duration_has_none() {
        let with = |seconds| LeaseSpec { lease_duration_seconds: seconds, ..LeaseSpec::default() };
        assert_eq!(record_duration(&with(Some(7))), Some(Duration::from_secs(7)));
        assert_eq!(record_duration(&with(Some(0))), None);
        assert_eq!(record_duration(&with(Some(-3))), None);
        assert_eq!(record_duration(&with(None)), None);
    }
}
