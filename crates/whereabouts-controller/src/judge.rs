//! Whether an allocation still belongs to a live pod: the one decision every release by the controller
//! rests on, pure so that it can be tested exhaustively.
//!
//! Upstream's reconciler freed an address whenever the pod's `network-status` annotation did not list
//! it, including pods still starting whose annotation Multus had not written yet, and the address was
//! handed out twice (upstream issues #162, #176, #207). Here an address is released only on evidence
//! that its pod is gone:
//!
//! * no pod of that namespace and name exists, unless it may be a static pod whose mirror pod is
//!   missing (below);
//! * a pod of that name exists but it is not the pod the address was allocated to: the allocation
//!   records the pod's uid (`poduid`, written by this plugin from `K8S_POD_UID`), the uids differ, and
//!   the pod does not claim the address either (below);
//! * the pod has finished (phase `Succeeded` or `Failed`): its sandbox is torn down;
//! * for allocations without a recorded uid (written by upstream, or by a runtime that does not pass
//!   `K8S_POD_UID`): the pod is running (not `Pending`), its `network-status` is written, and it does
//!   not list the address. Without a uid this is the only evidence there is; a pod whose status is not
//!   written yet, or which is still `Pending` (a new sandbox may be taking the address over), keeps it.
//!
//! A recorded uid can be stale: upstream's plugin takes an entry of the same pod and interface over for
//! a new pod's sandbox by rewriting only its `id`, and leaves our `poduid` as it was. So an allocation
//! whose uid is not the pod's is kept, and judged as one without a uid, when the pod's `network-status`
//! lists the address, or when the pod has none yet and has not finished (it may be that new pod,
//! starting).
//!
//! A static pod runs whatever the API server says: its mirror pod (named `<name>-<node>` by the
//! kubelet) can be deleted by hand, or be missing for a while after a kubelet restart, and the kubelet
//! makes it again. So an allocation that records its node, of a pod whose name ends with `-<node>`,
//! is kept while that node exists, though no pod of that name does; it goes once the node is gone, or
//! once the new mirror pod is judged as any pod (its uid, the kubelet's, is not the one recorded, and
//! it does not claim the address). Allocations written by upstream record no node: for them a missing
//! pod is gone.
//!
//! A pod being deleted (with a `deletionTimestamp`) keeps its addresses until it is gone: its
//! containers may still be running through their grace period.
//!
//! An allocation for an IPAMClaim (a virtual machine's address, passed by Multus as the attachment's
//! `ipam-claim-reference`) is kept while the claim exists, whatever its pods: the claim holds it.
//!
//! An allocation of a StatefulSet's pod on a network with `sticky_statefulsets` (it records the
//! StatefulSet) is kept, whatever the pod's state, while the StatefulSet wants the pod: it exists and
//! the pod's ordinal (the number its name ends in) lies in `spec.ordinals.start` ..
//! `start + spec.replicas`. The pod is then between two sandboxes (rescheduled, restarted) and its next
//! ADD, on any node, takes the address back. Once the StatefulSet is scaled below the ordinal or
//! deleted, the allocation is judged as any other.
//!
//! A release is still a compare-and-swap on the allocation as it was read, so an allocation that changed
//! since (a new sandbox of the pod took it over) is never released on the strength of an old reading.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::time::Duration;

use whereabouts_core::pool::Allocation;

use crate::metrics::ReleaseReason;
use crate::network_status::NetworkStatus;

/// How long after its last container stopped a finished pod keeps its addresses: the kubelet reports
/// the phase before it tears the sandbox down (and the CNI DEL runs), and retries a failed teardown.
pub const FINISHED_GRACE: Duration = Duration::from_secs(30);

/// What the controller knows of a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodView {
    /// `metadata.uid`.
    pub uid: String,
    /// For a static pod, the uid the kubelet knows it by (its `kubernetes.io/config.mirror`
    /// annotation): the one the runtime passes as `K8S_POD_UID`, unlike the mirror pod's own uid.
    pub kubelet_uid: Option<String>,
    /// `status.phase`, or `Pending` when absent.
    pub phase: String,
    /// How long ago its last container stopped, when its status says.
    pub stopped_ago: Option<Duration>,
    /// Its `network-status` annotation, when it is written and readable.
    pub network_status: Option<NetworkStatus>,
    /// The node it is scheduled to (`spec.nodeName`).
    pub node: Option<String>,
}

impl PodView {
    /// Whether the pod has finished for good: phase `Succeeded` or `Failed`, and its containers
    /// stopped at least [`FINISHED_GRACE`] ago (or when is not known), so its sandbox is gone.
    pub fn is_finished(&self) -> bool {
        self.phase_is_final() && self.stopped_ago.is_none_or(|ago| ago >= FINISHED_GRACE)
    }

    /// Whether the pod's phase is `Succeeded` or `Failed` (whether or not its sandbox is gone yet).
    pub fn phase_is_final(&self) -> bool {
        matches!(self.phase.as_str(), "Succeeded" | "Failed")
    }

    /// Whether `uid`, as the runtime passed it, names this pod.
    fn is(&self, uid: &str) -> bool {
        uid == self.uid || self.kubelet_uid.as_deref() == Some(uid)
    }
}

/// Which ordinals a StatefulSet wants: `start .. start + replicas`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WantedOrdinals {
    /// `spec.ordinals.start` (0 when unset).
    pub start: u32,
    /// `spec.replicas` (1 when unset, as the API server defaults it).
    pub replicas: u32,
}

impl WantedOrdinals {
    /// Whether every ordinal `other` wants is wanted here too.
    pub fn covers(self, other: WantedOrdinals) -> bool {
        let end = |w: WantedOrdinals| u64::from(w.start) + u64::from(w.replicas);
        other.replicas == 0 || (self.start <= other.start && end(self) >= end(other))
    }
}

/// What the controller knows of the owners that persistent allocations name: the wanted ordinals of
/// StatefulSets and the IPAMClaims that exist, by `namespace/name`; one absent does not exist.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Persistence {
    statefulsets: HashMap<String, WantedOrdinals>,
    claims: HashSet<String>,
}

impl Persistence {
    /// Records that StatefulSet `namespace/name` exists and wants `ordinals`.
    pub fn insert_statefulset(&mut self, namespace: &str, name: &str, ordinals: WantedOrdinals) {
        self.statefulsets.insert(format!("{namespace}/{name}"), ordinals);
    }

    /// Records that IPAMClaim `namespace/name` exists.
    pub fn insert_claim(&mut self, namespace: &str, name: &str) {
        self.claims.insert(format!("{namespace}/{name}"));
    }

    /// Why `allocation` is kept whatever its pod's state, if it is: its IPAMClaim exists, or the
    /// StatefulSet it records still wants its pod (see the module).
    pub fn keeps(&self, allocation: &Allocation) -> Option<KeepReason> {
        let (namespace, _) = allocation.pod_ref.split_once('/')?;
        if let Some(claim) = &allocation.ipam_claim {
            return self.claims.contains(&format!("{namespace}/{claim}")).then_some(KeepReason::ClaimExists);
        }
        self.wants(allocation).then_some(KeepReason::StatefulSetWants)
    }

    /// Whether the StatefulSet that `allocation` records still wants its pod.
    fn wants(&self, allocation: &Allocation) -> bool {
        let Some(statefulset) = &allocation.statefulset else { return false };
        let Some((namespace, pod)) = allocation.pod_ref.split_once('/') else { return false };
        let Some(wanted) = self.statefulsets.get(&format!("{namespace}/{statefulset}")) else { return false };
        pod.strip_prefix(statefulset.as_str())
            .and_then(|rest| rest.strip_prefix('-'))
            .filter(|ordinal| ordinal.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|ordinal| ordinal.parse::<u32>().ok())
            .is_some_and(|ordinal| {
                ordinal >= wanted.start
                    && u64::from(ordinal) < u64::from(wanted.start) + u64::from(wanted.replicas)
            })
    }
}

#[cfg(test)]
impl PodView {
    /// A pod of `uid` in `phase` (its containers not stopped), for the judgement's tests.
    pub(crate) fn running_as(
        uid: &str,
        phase: &str,
        network_status: Option<NetworkStatus>,
        node: Option<&str>,
    ) -> PodView {
        PodView {
            uid: uid.into(),
            kubelet_uid: None,
            phase: phase.into(),
            stopped_ago: None,
            network_status,
            node: node.map(Into::into),
        }
    }
}

/// Why an allocation is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeepReason {
    /// Its pod is a StatefulSet's that the StatefulSet still wants (sticky; see the module).
    StatefulSetWants,
    /// It is allocated for an IPAMClaim, which exists.
    ClaimExists,
    /// It has no pod reference: a container outside Kubernetes, which only its DEL releases.
    NotAPod,
    /// The pod it was allocated to (same uid) still exists and has not finished.
    PodLive,
    /// The pod's network-status annotation is not written yet (or unreadable): it may be starting.
    StatusNotWritten,
    /// The pod is `Pending`: a new sandbox may be taking the address over.
    PodPending,
    /// The pod has finished, but its containers stopped less than [`FINISHED_GRACE`] ago: its sandbox
    /// may still be up.
    Finishing,
    /// The pod's network-status lists the address.
    Listed,
    /// No pod of that name exists, but it may be a static pod whose mirror pod is missing: its node
    /// still exists.
    MirrorMissing,
}

/// The decision on one allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Leave it.
    Keep(KeepReason),
    /// Release it.
    Release(ReleaseReason),
}

/// Decides whether `allocation` of `ip` is still held by its pod, where `pod` is the pod now found
/// under its `podref` (`None` when there is none), `persistence` what is known of the owners
/// persistent allocations name, and `node_exists` says whether a Node exists.
pub fn judge(
    allocation: &Allocation,
    ip: IpAddr,
    pod: Option<&PodView>,
    persistence: &Persistence,
    node_exists: impl Fn(&str) -> bool,
) -> Verdict {
    if allocation.pod_ref.is_empty() {
        return Verdict::Keep(KeepReason::NotAPod);
    }
    if let Some(reason) = persistence.keeps(allocation) {
        return Verdict::Keep(reason);
    }
    let Some(pod) = pod else {
        return if may_be_unmirrored_static_pod(allocation, node_exists) {
            Verdict::Keep(KeepReason::MirrorMissing)
        } else {
            Verdict::Release(ReleaseReason::PodGone)
        };
    };
    let recorded_uid_is_pods = allocation.pod_uid.as_deref().map(|uid| pod.is(uid));
    if recorded_uid_is_pods == Some(false) && !pod_claims(pod, ip) {
        return Verdict::Release(ReleaseReason::PodReplaced);
    }
    if pod.is_finished() {
        return Verdict::Release(ReleaseReason::PodFinished);
    }
    if pod.phase_is_final() {
        return Verdict::Keep(KeepReason::Finishing);
    }
    if recorded_uid_is_pods == Some(true) {
        return Verdict::Keep(KeepReason::PodLive);
    }
    let Some(status) = &pod.network_status else { return Verdict::Keep(KeepReason::StatusNotWritten) };
    if status.lists(ip) {
        Verdict::Keep(KeepReason::Listed)
    } else if pod.phase == "Pending" {
        Verdict::Keep(KeepReason::PodPending)
    } else {
        Verdict::Release(ReleaseReason::NotInNetworkStatus)
    }
}

/// Whether the missing pod of `allocation` may be a static pod whose mirror pod is missing (see the
/// module): its name is a mirror pod's on the node the allocation records ([`mirror_pod_node`]), and
/// that node exists.
fn may_be_unmirrored_static_pod(allocation: &Allocation, node_exists: impl Fn(&str) -> bool) -> bool {
    mirror_pod_node(allocation).is_some_and(node_exists)
}

/// The node the allocation records when its pod's name is a mirror pod's name there (`<name>-<node>`,
/// as the kubelet names them): the only node whose existence the judgement of a missing pod of
/// `allocation` asks about.
pub fn mirror_pod_node(allocation: &Allocation) -> Option<&str> {
    let node = allocation.node.as_deref().filter(|node| !node.is_empty())?;
    let name = allocation.pod_ref.rsplit_once('/').map_or(allocation.pod_ref.as_str(), |(_, name)| name);
    name.strip_suffix(node).is_some_and(|prefix| prefix.len() > 1 && prefix.ends_with('-')).then_some(node)
}

/// Whether `pod` may hold `ip` although the allocation records another pod's uid (see the module): its
/// network-status lists the address, or it has none yet and the pod has not finished.
fn pod_claims(pod: &PodView, ip: IpAddr) -> bool {
    match &pod.network_status {
        Some(status) => status.lists(ip),
        None => !pod.is_finished(),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::network_status::NetworkStatus;

    const IP: &str = "192.0.2.10";

    /// No node exists.
    fn gone(_: &str) -> bool {
        false
    }

    /// The judgement with no StatefulSet known (the allocations of these tests are not sticky).
    fn judge(
        allocation: &Allocation,
        ip: IpAddr,
        pod: Option<&PodView>,
        node_exists: impl Fn(&str) -> bool,
    ) -> Verdict {
        super::judge(allocation, ip, pod, &Persistence::default(), node_exists)
    }

    fn sticky(pod: &str, statefulset: &str) -> Allocation {
        Allocation {
            container_id: String::new(),
            pod_ref: format!("default/{pod}"),
            statefulset: Some(statefulset.into()),
            ..allocation(Some("u1"))
        }
    }

    fn web(start: u32, replicas: u32) -> Persistence {
        let mut known = Persistence::default();
        known.insert_statefulset("default", "web", WantedOrdinals { start, replicas });
        known
    }

    #[test]
    fn a_statefulset_keeps_the_addresses_of_the_ordinals_it_wants() {
        let absent = None;
        for (pod, known, kept) in [
            ("web-0", web(0, 3), true),
            ("web-2", web(0, 3), true),
            ("web-3", web(0, 3), false),
            ("web-2", web(0, 2), false),
            ("web-4", web(3, 2), true),
            ("web-2", web(3, 2), false),
            ("web-5", web(3, 2), false),
            ("web-0", Persistence::default(), false),
            ("web-x", web(0, 3), false),
            ("web-01", web(0, 3), true),
            ("webby-0", web(0, 3), false),
        ] {
            let verdict = super::judge(&sticky(pod, "web"), ip(), absent, &known, gone);
            let expected = if kept {
                Verdict::Keep(KeepReason::StatefulSetWants)
            } else {
                Verdict::Release(ReleaseReason::PodGone)
            };
            assert_eq!(verdict, expected, "{pod} with {known:?}");
        }
        // Another namespace's StatefulSet of the same name wants nothing of ours.
        let mut elsewhere = Persistence::default();
        elsewhere.insert_statefulset("other", "web", WantedOrdinals { start: 0, replicas: 3 });
        assert_eq!(
            super::judge(&sticky("web-0", "web"), ip(), None, &elsewhere, gone),
            Verdict::Release(ReleaseReason::PodGone)
        );
        // An IPAMClaim's allocation is kept while the claim exists, whatever its pod and StatefulSet.
        let claimed = Allocation { ipam_claim: Some("vm1.net".into()), ..sticky("web-9", "web") };
        let mut claims = Persistence::default();
        claims.insert_claim("default", "vm1.net");
        assert_eq!(super::judge(&claimed, ip(), None, &claims, gone), Verdict::Keep(KeepReason::ClaimExists));
        assert_eq!(
            super::judge(&claimed, ip(), None, &web(0, 10), gone),
            Verdict::Release(ReleaseReason::PodGone)
        );
        // An allocation that records no StatefulSet is judged as ever.
        let plain = Allocation { pod_ref: "default/web-0".into(), ..allocation(Some("u1")) };
        assert_eq!(
            super::judge(&plain, ip(), None, &web(0, 3), gone),
            Verdict::Release(ReleaseReason::PodGone)
        );
    }

    fn ip() -> IpAddr {
        IP.parse().unwrap()
    }

    fn allocation(uid: Option<&str>) -> Allocation {
        Allocation {
            container_id: "sandbox".into(),
            pod_ref: "default/web-0".into(),
            ifname: "net1".into(),
            node: None,
            cni_network: None,
            pod_uid: uid.map(Into::into),
            statefulset: None,
            ipam_claim: None,
        }
    }

    fn status(listed: &[&str]) -> NetworkStatus {
        let ips: Vec<_> = listed.iter().map(|s| format!("\"{s}\"")).collect();
        NetworkStatus::parse(&format!(
            r#"[{{"name":"cbr0","ips":["10.244.0.5"],"default":true}},
                {{"name":"default/macvlan","interface":"net1","ips":[{}]}}]"#,
            ips.join(",")
        ))
        .unwrap()
    }

    fn pod(uid: &str, phase: &str, network_status: Option<NetworkStatus>) -> PodView {
        PodView::running_as(uid, phase, network_status, None)
    }

    #[test]
    fn a_static_pod_is_known_by_its_kubelet_uid() {
        // The runtime passes the kubelet's uid (a hash of the manifest); the mirror pod has another.
        let mirror = PodView {
            kubelet_uid: Some("config-hash".into()),
            ..pod("mirror-uid", "Running", Some(status(&[])))
        };
        assert_eq!(
            judge(&allocation(Some("config-hash")), ip(), Some(&mirror), gone),
            Verdict::Keep(KeepReason::PodLive)
        );
        assert_eq!(
            judge(&allocation(Some("mirror-uid")), ip(), Some(&mirror), gone),
            Verdict::Keep(KeepReason::PodLive)
        );
        assert_eq!(
            judge(&allocation(Some("older-hash")), ip(), Some(&mirror), gone),
            Verdict::Release(ReleaseReason::PodReplaced)
        );
    }

    #[test]
    fn a_pod_that_just_finished_keeps_its_address_until_its_sandbox_is_gone() {
        let just = PodView { stopped_ago: Some(Duration::from_secs(2)), ..pod("u1", "Succeeded", None) };
        assert_eq!(
            judge(&allocation(Some("u1")), ip(), Some(&just), gone),
            Verdict::Keep(KeepReason::Finishing)
        );
        assert_eq!(judge(&allocation(None), ip(), Some(&just), gone), Verdict::Keep(KeepReason::Finishing));
        let long = PodView { stopped_ago: Some(FINISHED_GRACE), ..just };
        assert_eq!(
            judge(&allocation(Some("u1")), ip(), Some(&long), gone),
            Verdict::Release(ReleaseReason::PodFinished)
        );
    }

    #[test]
    fn a_gone_pod_releases() {
        assert_eq!(
            judge(&allocation(Some("u1")), ip(), None, gone),
            Verdict::Release(ReleaseReason::PodGone)
        );
        assert_eq!(judge(&allocation(None), ip(), None, gone), Verdict::Release(ReleaseReason::PodGone));
    }

    #[test]
    fn a_recreated_pod_of_the_same_name_is_not_the_holder() {
        let newer = pod("u2", "Running", Some(status(&["192.0.2.11"])));
        assert_eq!(
            judge(&allocation(Some("u1")), ip(), Some(&newer), gone),
            Verdict::Release(ReleaseReason::PodReplaced)
        );
        let newer_finished = pod("u2", "Succeeded", None);
        assert_eq!(
            judge(&allocation(Some("u1")), ip(), Some(&newer_finished), gone),
            Verdict::Release(ReleaseReason::PodReplaced)
        );
        // The new pod's own allocation is kept, whatever its status says yet.
        let starting = pod("u2", "Pending", None);
        assert_eq!(
            judge(&allocation(Some("u2")), ip(), Some(&starting), gone),
            Verdict::Keep(KeepReason::PodLive)
        );
    }

    #[test]
    fn a_stale_uid_is_not_evidence_while_the_pod_claims_the_address() {
        // Upstream's plugin took the entry over for the new pod u2 and rewrote only its `id`: the
        // recorded uid is still the old pod's.
        let stale = allocation(Some("u1"));
        assert_eq!(
            judge(&stale, ip(), Some(&pod("u2", "Running", Some(status(&[IP])))), gone),
            Verdict::Keep(KeepReason::Listed)
        );
        for phase in ["Pending", "Running"] {
            assert_eq!(
                judge(&stale, ip(), Some(&pod("u2", phase, None)), gone),
                Verdict::Keep(KeepReason::StatusNotWritten)
            );
        }
        // Claimed, the rest is judged as for an allocation without a uid.
        let just_finished =
            PodView { stopped_ago: Some(Duration::from_secs(2)), ..pod("u2", "Failed", Some(status(&[IP]))) };
        assert_eq!(judge(&stale, ip(), Some(&just_finished), gone), Verdict::Keep(KeepReason::Finishing));
        let finished = pod("u2", "Failed", Some(status(&[IP])));
        assert_eq!(judge(&stale, ip(), Some(&finished), gone), Verdict::Release(ReleaseReason::PodFinished));
    }

    #[test]
    fn a_starting_pod_is_never_released() {
        // The bug of upstream issues #162/#176/#207: the annotation is not written yet.
        for phase in ["Pending", "Running"] {
            assert_eq!(
                judge(&allocation(None), ip(), Some(&pod("u1", phase, None)), gone),
                Verdict::Keep(KeepReason::StatusNotWritten)
            );
        }
        assert_eq!(
            judge(&allocation(None), ip(), Some(&pod("u1", "Pending", Some(status(&[])))), gone),
            Verdict::Keep(KeepReason::PodPending)
        );
    }

    #[test]
    fn a_finished_pod_releases() {
        for phase in ["Succeeded", "Failed"] {
            assert_eq!(
                judge(&allocation(Some("u1")), ip(), Some(&pod("u1", phase, Some(status(&[IP])))), gone),
                Verdict::Release(ReleaseReason::PodFinished)
            );
        }
    }

    #[test]
    fn without_a_uid_the_network_status_decides_for_a_running_pod() {
        let running = |listed: &[&str]| pod("u1", "Running", Some(status(listed)));
        assert_eq!(
            judge(&allocation(None), ip(), Some(&running(&[IP])), gone),
            Verdict::Keep(KeepReason::Listed)
        );
        assert_eq!(
            judge(&allocation(None), ip(), Some(&running(&["192.0.2.11"])), gone),
            Verdict::Release(ReleaseReason::NotInNetworkStatus)
        );
        // The default network's addresses are not whereabouts' and do not count.
        assert_eq!(
            judge(&allocation(None), "10.244.0.5".parse().unwrap(), Some(&running(&[])), gone),
            Verdict::Release(ReleaseReason::NotInNetworkStatus)
        );
    }

    #[test]
    fn containers_outside_kubernetes_are_left_to_their_del() {
        let bare = Allocation { pod_ref: String::new(), ..allocation(None) };
        assert_eq!(judge(&bare, ip(), None, gone), Verdict::Keep(KeepReason::NotAPod));
    }

    #[test]
    fn a_missing_static_pod_keeps_its_address_while_its_node_exists() {
        let on = |node: &str, pod_ref: &str| Allocation {
            node: Some(node.into()),
            pod_ref: pod_ref.into(),
            ..allocation(Some("config-hash"))
        };
        let node_a = |node: &str| node == "node-a";
        // The kubelet names a mirror pod `<name>-<node>`.
        let mirrored = on("node-a", "kube-system/etcd-node-a");
        assert_eq!(judge(&mirrored, ip(), None, node_a), Verdict::Keep(KeepReason::MirrorMissing));
        // Its node is gone: so is the pod.
        assert_eq!(judge(&mirrored, ip(), None, gone), Verdict::Release(ReleaseReason::PodGone));
        // Not a mirror pod's name, or not of the recorded node, or no node recorded (upstream).
        for allocation in [
            on("node-a", "default/web-0"),
            on("node-a", "default/node-a"),
            on("node-a", "default/etcd-node-ab"),
            on("node-b", "kube-system/etcd-node-a"),
            Allocation { node: None, ..mirrored.clone() },
        ] {
            assert_eq!(
                judge(&allocation, ip(), None, |_| true),
                Verdict::Release(ReleaseReason::PodGone),
                "{allocation:?}"
            );
        }
        // A mirror pod found is judged as any pod.
        let mirror =
            PodView { kubelet_uid: Some("config-hash".into()), ..pod("mirror-uid", "Running", None) };
        assert_eq!(judge(&mirrored, ip(), Some(&mirror), node_a), Verdict::Keep(KeepReason::PodLive));
    }

    proptest! {
        /// A sticky allocation is kept whatever its pod's state while its StatefulSet wants the pod, and
        /// judged exactly as a plain one otherwise.
        #[test]
        fn stickiness_only_ever_keeps(
            ordinal in 0u32..8,
            start in 0u32..4,
            replicas in 0u32..6,
            exists in any::<bool>(),
            phase in prop::sample::select(vec!["Pending", "Running", "Succeeded", "Failed"]),
            listed in any::<bool>(),
        ) {
            let allocation = sticky(&format!("web-{ordinal}"), "web");
            let known = if exists { web(start, replicas) } else { Persistence::default() };
            let pod = pod("u2", phase, Some(status(if listed { &[IP] } else { &[] })));
            for pod in [None, Some(&pod)] {
                let verdict = super::judge(&allocation, ip(), pod, &known, gone);
                let wanted = exists && ordinal >= start && ordinal < start + replicas;
                if wanted {
                    prop_assert_eq!(verdict, Verdict::Keep(KeepReason::StatefulSetWants));
                } else {
                    let plain = Allocation { statefulset: None, ..allocation.clone() };
                    prop_assert_eq!(verdict, judge(&plain, ip(), pod, gone));
                }
            }
        }

        /// The safety property: an allocation whose recorded uid is the live, unfinished pod's is kept,
        /// and so is any allocation of a live pod whose network-status is not written yet or lists it,
        /// whatever uid it records (a stale one, after upstream's plugin took the entry over).
        #[test]
        fn a_live_holder_always_keeps_its_address(
            phase in prop::sample::select(vec!["Pending", "Running", "Unknown", "", "Succeeded", "Failed"]),
            recorded in any::<bool>(),
            stale in any::<bool>(),
            listed in any::<bool>(),
            written in any::<bool>(),
            mirror in any::<bool>(),
            stopped_secs in 0u64..29,
        ) {
            let status = written.then(|| status(if listed { &[IP] } else { &[] }));
            // A static pod's allocation records the kubelet's uid, not the mirror pod's.
            let (uid, kubelet_uid) = if mirror { ("hash", Some("hash".to_string())) } else { ("u1", None) };
            let live = PodView {
                uid: if mirror { "mirror".into() } else { "u1".into() },
                kubelet_uid,
                phase: phase.into(),
                stopped_ago: Some(Duration::from_secs(stopped_secs)),
                network_status: status,
                node: None,
            };
            let verdict = judge(&allocation(recorded.then_some(uid)), ip(), Some(&live), gone);
            if recorded || !written || listed || (phase == "Pending") {
                prop_assert!(matches!(verdict, Verdict::Keep(_)), "{verdict:?}");
            }
            let verdict = judge(&allocation(stale.then_some("old-uid")), ip(), Some(&live), gone);
            if !written || listed {
                prop_assert!(matches!(verdict, Verdict::Keep(_)), "{verdict:?}");
            }
        }
    }
}
