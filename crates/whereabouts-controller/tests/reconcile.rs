//! The reconciler's releases act on what it judged: against the in-process fake API server, or the
//! cluster named by `WHEREABOUTS_TEST_KUBECONFIG` (each test in a fresh namespace, which is also the
//! whereabouts namespace).

use std::sync::Arc;

use whereabouts_controller::Context;
use whereabouts_controller::metrics::Metrics;
use whereabouts_controller::reconcile::{Listings, carry_out, leaks};
use whereabouts_k8s::crd::{OverlappingRangeIPReservation, OverlappingRangeIPReservationSpec};
use whereabouts_k8s::kube::api::{Api, PostParams};
use whereabouts_kube_testing::TestCluster;
use whereabouts_store::kubernetes::KubeStore;
use whereabouts_store::{Reservation, ReserveOutcome, Store};

fn context(cluster: &TestCluster) -> Context {
    Context {
        client: cluster.client(),
        namespace: cluster.namespace().to_string(),
        metrics: Arc::new(Metrics::new()),
        dry_run: false,
    }
}

/// Upstream's reservation records no container. The reconciler lists it with no pool entry behind it;
/// then the pod is recreated and its ADD takes the address and the reservation over. The deletion the
/// reconciler decided on its listing must not remove what the new pod holds now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_orphan_taken_over_after_it_was_listed_is_left_alone() {
    let cluster = TestCluster::start().await;
    let ctx = context(&cluster);
    let pod_ref = format!("{}/web-0", cluster.namespace());
    let upstreams =
        Reservation { pod_ref: pod_ref.clone(), ifname: "net1".into(), container_id: String::new() };
    let reservations: Api<OverlappingRangeIPReservation> =
        Api::namespaced(cluster.client(), cluster.namespace());
    let orip = OverlappingRangeIPReservation::new(
        "192.0.2.9",
        OverlappingRangeIPReservationSpec { holder: upstreams.clone() },
    );
    reservations.create(&PostParams::default(), &orip).await.expect("create the reservation");

    let listings = Listings::read(&ctx).await.expect("list");
    let decided = leaks(&listings);
    let orphans: Vec<&str> = decided.orphans.iter().map(|o| o.name.as_str()).collect();
    assert_eq!(orphans, ["192.0.2.9"]);

    let new_sandbox = Reservation { container_id: "sandbox-new".into(), ..upstreams };
    let store = KubeStore::new(cluster.client(), cluster.namespace(), "test");
    assert_eq!(store.create_reservation("192.0.2.9", &new_sandbox).await, Ok(ReserveOutcome::Reserved));

    let report = carry_out(&ctx, &decided).await.expect("reconcile");
    assert!(report.orphan_reservations.is_empty(), "{report:?}");
    let left = reservations.get_opt("192.0.2.9").await.expect("GET").expect("the reservation stays");
    assert_eq!(left.spec.holder, new_sandbox);

    // Judged again, it is an orphan as it is now, and goes.
    let report =
        carry_out(&ctx, &leaks(&Listings::read(&ctx).await.expect("list"))).await.expect("reconcile");
    assert_eq!(report.orphan_reservations, ["192.0.2.9"]);
    assert!(reservations.get_opt("192.0.2.9").await.expect("GET").is_none());
    cluster.cleanup().await;
}
