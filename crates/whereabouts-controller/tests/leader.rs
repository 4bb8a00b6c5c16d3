//! Leader election against a test cluster (the fake by default, a real one with
//! `WHEREABOUTS_TEST_KUBECONFIG`): one leader at a time, hand-over at once on stepping down and after
//! the lease duration when the leader dies, expiry judged on the candidate's own clock whatever the
//! Lease's renewTime says, the Lease's fields as client-go writes them, and (fake only) a leader that
//! cannot reach the API server giving up by its renew deadline.
//!
//! Timings are short (lease 2 s, renew deadline 1.5 s, retry 300 ms); the bounds asserted leave room
//! for a loaded two-core machine, but each still fails for the wrong algorithm.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use tokio::sync::watch;
use tokio::time::{Instant, sleep};
use whereabouts_controller::leader::{self, Leadership, LeaseConfig};
use whereabouts_controller::metrics::Metrics;
use whereabouts_kube_testing::TestCluster;

const LEASE_DURATION: Duration = Duration::from_secs(2);
const RENEW_DEADLINE: Duration = Duration::from_millis(1500);
const RETRY_PERIOD: Duration = Duration::from_millis(300);

fn config(cluster: &TestCluster, lease: &str, identity: &str) -> LeaseConfig {
    LeaseConfig::new(lease, cluster.namespace(), identity)
        .and_then(|config| config.with_timings(LEASE_DURATION, RENEW_DEADLINE, RETRY_PERIOD))
        .expect("a valid lease config")
}

/// A candidate, with its own metrics.
struct Candidate {
    identity: &'static str,
    leadership: Leadership,
    leading: watch::Receiver<bool>,
    metrics: Arc<Metrics>,
}

fn candidate(cluster: &TestCluster, lease: &str, identity: &'static str) -> Candidate {
    let metrics = Arc::new(Metrics::new());
    let leadership = leader::spawn(cluster.client(), config(cluster, lease, identity), metrics.clone());
    let leading = leadership.subscribe();
    Candidate { identity, leadership, leading, metrics }
}

impl Candidate {
    fn leads(&self) -> bool {
        *self.leading.borrow()
    }

    /// Waits until it reports `leading`; how long that took.
    async fn until(&mut self, leading: bool, within: Duration) -> Duration {
        let start = Instant::now();
        tokio::time::timeout(within, self.leading.wait_for(|now| *now == leading))
            .await
            .unwrap_or_else(|_| {
                panic!("not {} within {within:?}", if leading { "leading" } else { "standing by" })
            })
            .expect("the election's state");
        start.elapsed()
    }
}

/// The value of the `whereabouts_leader` gauge.
fn gauge(metrics: &Metrics) -> i64 {
    let text = metrics.encode();
    let line = text.lines().find(|line| line.starts_with("whereabouts_leader ")).expect("the leader gauge");
    line["whereabouts_leader ".len()..].parse().expect("a number")
}

async fn lease(client: &Client, name: &str) -> LeaseSpec {
    let lease = Api::<Lease>::default_namespaced(client.clone()).get(name).await.expect("the Lease");
    lease.spec.expect("a Lease spec")
}

/// Samples both for `period`: never both leading, and the same one leading throughout.
async fn assert_one_leader(a: &Candidate, b: &Candidate, period: Duration) {
    let first = (a.leads(), b.leads());
    assert!(first.0 != first.1, "exactly one leader expected, got {first:?}");
    let end = Instant::now() + period;
    while Instant::now() < end {
        let now = (a.leads(), b.leads());
        assert!(!(now.0 && now.1), "two leaders at once");
        assert_eq!(now, first, "leadership moved while both candidates were healthy");
        sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_leader_at_a_time_and_stepping_down_hands_over_at_once() {
    let cluster = TestCluster::start().await;
    let client = cluster.client();
    let (mut a, mut b) = (candidate(&cluster, "ctl", "a"), candidate(&cluster, "ctl", "b"));
    let within = Duration::from_secs(10);
    tokio::select! {
        _ = a.until(true, within) => {}
        _ = b.until(true, within) => {}
    }
    assert_one_leader(&a, &b, Duration::from_secs(3)).await;
    let (mut leader, mut standby) = if a.leads() { (a, b) } else { (b, a) };
    let leader_id = leader.identity;
    assert_eq!((gauge(&leader.metrics), gauge(&standby.metrics)), (1, 0));

    let before = lease(&client, "ctl").await;
    assert_eq!(before.holder_identity.as_deref(), Some(leader_id));
    assert_eq!(before.lease_duration_seconds, Some(2));
    assert_eq!(before.lease_transitions, Some(0), "the Lease was created by its first holder");
    sleep(Duration::from_secs(1)).await;
    let renewed = lease(&client, "ctl").await;
    assert!(
        renewed.renew_time > before.renew_time,
        "{:?} not after {:?}",
        renewed.renew_time,
        before.renew_time
    );
    assert_eq!(renewed.acquire_time, before.acquire_time);
    assert_eq!(renewed.lease_transitions, Some(0));

    // Without the release the standby would wait a whole lease duration from the last renewal it saw
    // (at most a retry period ago), so taking over within 1.2 s needs the release.
    let start = Instant::now();
    let mut stepped_down = leader.leading.clone();
    let stepping_down = tokio::spawn(leader.leadership.step_down());
    standby.until(true, Duration::from_secs(10)).await;
    let handover = start.elapsed();
    assert!(handover < Duration::from_millis(1200), "the standby took {handover:?} to take over");
    assert!(!*stepped_down.borrow_and_update(), "the old leader still reports leading");
    stepping_down.await.expect("stepping down");
    leader.leading.wait_for(|leading| !leading).await.expect("the election's state");
    assert_eq!((gauge(&leader.metrics), gauge(&standby.metrics)), (0, 1));

    let after = lease(&client, "ctl").await;
    assert_eq!(after.holder_identity.as_deref(), Some(standby.identity));
    assert_eq!(after.lease_transitions, Some(1), "one hand-over");
    assert!(after.acquire_time > before.acquire_time);
    assert_eq!(after.lease_duration_seconds, Some(2));

    standby.leadership.step_down().await;
    let released = lease(&client, "ctl").await;
    assert_eq!(released.holder_identity.as_deref(), Some(""));
    assert_eq!(released.lease_transitions, Some(1), "a release is no transition");
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_leader_is_replaced_after_the_lease_duration() {
    let cluster = TestCluster::start().await;
    let mut a = candidate(&cluster, "ctl", "a");
    a.until(true, Duration::from_secs(10)).await;
    let mut b = candidate(&cluster, "ctl", "b");
    sleep(Duration::from_secs(1)).await;
    assert!(a.leads() && !b.leads());

    // Dropping the Leadership aborts its task without a release, as a crash would.
    let Candidate { leadership, leading: mut a_leading, metrics: a_metrics, .. } = a;
    drop(leadership);
    let killed = Instant::now();
    tokio::time::timeout(Duration::from_secs(5), a_leading.wait_for(|leading| !leading))
        .await
        .expect("an aborted election reports false")
        .expect("the election's state");
    assert_eq!(gauge(&a_metrics), 0);
    b.until(true, Duration::from_secs(10)).await;
    let waited = killed.elapsed();
    // Its last renewal was at most a retry period (and a slow request) before the kill.
    assert!(
        waited >= LEASE_DURATION - RETRY_PERIOD - Duration::from_millis(500),
        "the standby took over after only {waited:?}"
    );
    assert!(waited < Duration::from_secs(8), "the standby took {waited:?}");

    let spec = lease(&cluster.client(), "ctl").await;
    assert_eq!(spec.holder_identity.as_deref(), Some("b"));
    assert_eq!(spec.lease_transitions, Some(1));
    b.leadership.step_down().await;
    cluster.cleanup().await;
}

/// A Lease held by `holder` whose renewTime is `skew` away from now, as a node with a wrong clock
/// would write it.
async fn create_skewed(client: &Client, name: &str, holder: &str, skew: SignedDuration) {
    let renewed = Timestamp::now().checked_add(skew).expect("a timestamp");
    let lease = Lease {
        metadata: ObjectMeta { name: Some(name.to_owned()), ..ObjectMeta::default() },
        spec: Some(LeaseSpec {
            holder_identity: Some(holder.to_owned()),
            lease_duration_seconds: Some(2),
            acquire_time: Some(MicroTime(renewed)),
            renew_time: Some(MicroTime(renewed)),
            lease_transitions: Some(3),
            ..LeaseSpec::default()
        }),
    };
    Api::<Lease>::default_namespaced(client.clone())
        .create(&PostParams::default(), &lease)
        .await
        .expect("creating the Lease");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_is_judged_on_the_candidates_clock_not_the_renew_time() {
    let cluster = TestCluster::start().await;
    let client = cluster.client();
    // An hour behind: comparing renewTime with our clock would take it at once. An hour ahead: it
    // would wait an hour.
    create_skewed(&client, "behind", "ghost", SignedDuration::from_hours(-1)).await;
    create_skewed(&client, "ahead", "ghost", SignedDuration::from_hours(1)).await;
    let start = Instant::now();
    let (mut behind, mut ahead) = (candidate(&cluster, "behind", "me"), candidate(&cluster, "ahead", "me"));
    for (name, candidate) in [("behind", &mut behind), ("ahead", &mut ahead)] {
        candidate.until(true, Duration::from_secs(10)).await;
        // Its first look at the Lease came after `start`; from then it waits the record's 2 s.
        let waited = start.elapsed();
        assert!(waited >= LEASE_DURATION, "{name}: taken after {waited:?}");
        let spec = lease(&client, name).await;
        assert_eq!(spec.holder_identity.as_deref(), Some("me"));
        assert_eq!(spec.lease_transitions, Some(4), "{name}: one more transition");
    }
    assert!(start.elapsed() < Duration::from_secs(10));
    behind.leadership.step_down().await;
    ahead.leadership.step_down().await;
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_from_the_api_server_gives_up_by_its_renew_deadline() {
    let cluster = TestCluster::start().await;
    let Some(fake) = cluster.fake() else {
        eprintln!("skipped on a real cluster: needs the fake to make the API server unavailable");
        return cluster.cleanup().await;
    };
    let mut a = candidate(&cluster, "ctl", "a");
    a.until(true, Duration::from_secs(10)).await;
    let b = candidate(&cluster, "ctl", "b");
    sleep(Duration::from_secs(1)).await;
    assert!(!b.leads());

    fake.set_unavailable(true);
    // Its last successful renewal started at most a retry period (and a request) before the outage,
    // and it must give up by that plus the renew deadline, while kube still retries the 503s.
    let lost = a.until(false, Duration::from_secs(10)).await;
    assert!(lost >= RENEW_DEADLINE - RETRY_PERIOD - Duration::from_millis(500), "gave up after {lost:?}");
    assert!(lost <= RENEW_DEADLINE + Duration::from_millis(1500), "still leading {lost:?} into the outage");
    assert_eq!(gauge(&a.metrics), 0);
    assert!(!b.leads());

    // Back: the Lease still names a, so a takes it again at once, unless b's wait (from before the
    // outage) ran out first. Either is right; two leaders are not.
    fake.set_unavailable(false);
    let end = Instant::now() + Duration::from_secs(5);
    while Instant::now() < end {
        assert!(!(a.leads() && b.leads()), "two leaders at once");
        sleep(Duration::from_millis(10)).await;
    }
    let holder = if a.leads() { &a } else { &b };
    assert!(holder.leads() && (a.leads() != b.leads()), "nobody leads after the outage");
    let spec = lease(&cluster.client(), "ctl").await;
    assert_eq!(spec.holder_identity.as_deref(), Some(holder.identity));
    assert_eq!(spec.lease_transitions, Some(if holder.identity == "a" { 0 } else { 1 }));
    a.leadership.step_down().await;
    b.leadership.step_down().await;
    cluster.cleanup().await;
}
