//! The ClusterRole `whereabouts-cni` against what the components really ask the API server: the plugin
//! (ADD and DEL, plain ranges and node slices, overlapping-range reservations, a StatefulSet's pod on a
//! sticky network), `whereabouts controller`
//! in cluster mode (leader election, pod-deletion cleanup, node slices) and in node mode, and
//! `whereabouts reconcile`, run as processes against the fake API server with a token of their own. The
//! fake's request log gives every (verb, group, resource) they used:
//!
//! * each must be granted by the role (else the component fails on a real cluster);
//! * each rule must be used, or carry a comment saying why it is kept ("kept for upstream": upstream's
//!   pods still need it while a cluster rolls; "not exercised": used, but not by these flows).
//!
//! A real cluster (`WHEREABOUTS_TEST_KUBECONFIG`) has no request log: there the test only says so.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use k8s_openapi::api::rbac::v1::{ClusterRole, PolicyRule};
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, PostParams};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use whereabouts_deploy_check::{deploy_dir, documents, find};
use whereabouts_kube_testing::TestCluster;
use whereabouts_kube_testing::plugin::Call;

/// The components' bearer token: tells their requests from the test's own.
const TOKEN: &str = "system-serviceaccount-kube-system-whereabouts";

/// (verb, group, resource[/subresource]).
type Access = (String, String, String);

/// The rules of the ClusterRole in `deploy/whereabouts.yaml`, each with the comment lines just above it.
fn role_with_notes() -> Vec<(PolicyRule, String)> {
    let text = std::fs::read_to_string(deploy_dir().join("whereabouts.yaml")).expect("readable");
    let docs = documents(&text).expect("YAML");
    let role: ClusterRole =
        serde_json::from_value(find(&docs, "ClusterRole", "whereabouts-cni").clone()).expect("a ClusterRole");
    // The comments: the rules are the `- apiGroups:` items after `rules:` in the ClusterRole document.
    let document = text
        .split("\n---\n")
        .find(|d| d.lines().any(|l| l == "kind: ClusterRole"))
        .expect("the ClusterRole document");
    let mut notes = Vec::new();
    let mut comment = String::new();
    let mut in_rules = false;
    for line in document.lines() {
        if line == "rules:" {
            in_rules = true;
        } else if in_rules && line.trim_start().starts_with('#') {
            comment.push_str(line.trim_start().trim_start_matches('#').trim());
            comment.push(' ');
        } else if in_rules && line.trim_start().starts_with("- apiGroups:") {
            notes.push(std::mem::take(&mut comment));
        }
    }
    let rules = role.rules.unwrap_or_default();
    assert_eq!(rules.len(), notes.len(), "every rule starts with `- apiGroups:`");
    rules.into_iter().zip(notes).collect()
}

fn grants(rule: &PolicyRule, (verb, group, resource): &Access) -> bool {
    let any = |list: &Option<Vec<String>>, item: &str| {
        list.as_ref().is_some_and(|l| l.iter().any(|x| x == "*" || x == item))
    };
    rule.verbs.iter().any(|v| v == "*" || v == verb)
        && any(&rule.api_groups, group)
        && any(&rule.resources, resource)
}

/// Everything a rule grants, one (verb, group, resource) each.
fn granted(rule: &PolicyRule) -> Vec<Access> {
    let mut out = Vec::new();
    for group in rule.api_groups.iter().flatten() {
        for resource in rule.resources.iter().flatten() {
            for verb in &rule.verbs {
                out.push((verb.clone(), group.clone(), resource.clone()));
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// acting out a cluster

struct Components {
    kubeconfig: PathBuf,
    binary: PathBuf,
    namespace: String,
    _dir: tempfile::TempDir,
}

impl Components {
    /// A kubeconfig like the test's, with the components' token.
    fn new(cluster: &TestCluster) -> Components {
        let text = std::fs::read_to_string(cluster.kubeconfig_path()).expect("the test kubeconfig");
        assert!(text.contains("fake-token"), "the fake's kubeconfig carries its token");
        let dir = tempfile::tempdir().expect("a temporary directory");
        let kubeconfig = dir.path().join("kubeconfig.json");
        std::fs::write(&kubeconfig, text.replace("fake-token", TOKEN)).expect("write");
        Components {
            kubeconfig,
            binary: whereabouts_kube_testing::binaries::whereabouts(),
            namespace: cluster.namespace().to_owned(),
            _dir: dir,
        }
    }

    /// `whereabouts controller ARGS`, until it says it serves /readyz.
    async fn controller(&self, args: &[&str]) -> tokio::process::Child {
        let mut child = tokio::process::Command::new(&self.binary)
            .arg("controller")
            .args(["--kubeconfig", &self.kubeconfig.display().to_string()])
            .args(["--namespace", &self.namespace, "--metrics-address", "127.0.0.1:0"])
            .args(["--cron-file", "/nonexistent/config", "--log-level", "debug"])
            .args(args)
            .env_remove("WHEREABOUTS_RECONCILER_CRON")
            .env_remove("NODENAME")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start the controller");
        let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
        let started = async {
            while let Ok(Some(line)) = lines.next_line().await {
                if line.contains("/readyz on ") {
                    return true;
                }
            }
            false
        };
        let started = tokio::time::timeout(Duration::from_secs(30), started).await;
        assert!(matches!(started, Ok(true)), "controller {args:?} did not start");
        // Keep draining stderr so the process never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        child
    }

    fn netconf(&self, ipam: Value) -> Value {
        let mut ipam = ipam;
        ipam["type"] = json!("whereabouts");
        ipam["datastore"] = json!("kubernetes");
        ipam["kubernetes"] = json!({ "kubeconfig": self.kubeconfig });
        ipam["log_level"] = json!("error");
        json!({ "cniVersion": "1.0.0", "name": "rbac-net", "type": "macvlan", "ipam": ipam })
    }

    async fn plugin(
        &self,
        command: &str,
        (pod, container): (&str, &str),
        uid: &str,
        node: &str,
        netconf: &Value,
    ) {
        let cni_args = format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={pod};K8S_POD_UID={uid}",
            self.namespace
        );
        let call = Call { binary: &self.binary, command, container, cni_args: &cni_args, node };
        let outcome = call.run(netconf).await;
        if command == "ADD" {
            outcome.addresses(&format!("ADD {pod}"));
        } else {
            outcome.silent(&format!("{command} {pod}"));
        }
    }
}

async fn terminate(mut child: tokio::process::Child) {
    if let Some(pid) = child.id() {
        let _ = tokio::process::Command::new("kill").arg("-TERM").arg(pid.to_string()).status().await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(20), child.wait()).await;
}

async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn custom(group: &str, version: &str, kind: &str, plural: &str) -> ApiResource {
    ApiResource {
        group: group.into(),
        version: version.into(),
        api_version: format!("{group}/{version}"),
        kind: kind.into(),
        plural: plural.into(),
    }
}

/// The allocations of every IPPool of the namespace.
async fn allocations(cluster: &TestCluster) -> usize {
    let pools: Api<DynamicObject> = Api::namespaced_with(
        cluster.client(),
        cluster.namespace(),
        &custom("whereabouts.cni.cncf.io", "v1alpha1", "IPPool", "ippools"),
    );
    let list = pools.list(&Default::default()).await.expect("list pools");
    list.items.iter().map(|p| p.data["spec"]["allocations"].as_object().map_or(0, serde_json::Map::len)).sum()
}

/// Everything the components do in a cluster's life, as the cluster would see it.
async fn act_out(cluster: &TestCluster, components: &Components) {
    let node = cluster.create_node("n1").await;

    // A NetworkAttachmentDefinition with node slices.
    let sliced = components.netconf(json!({
        "range": "10.9.0.0/24", "node_slice_size": "/28", "network_name": "slicenet",
    }));
    let nads: Api<DynamicObject> = Api::namespaced_with(
        cluster.client(),
        cluster.namespace(),
        &custom("k8s.cni.cncf.io", "v1", "NetworkAttachmentDefinition", "network-attachment-definitions"),
    );
    let nad: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "k8s.cni.cncf.io/v1",
        "kind": "NetworkAttachmentDefinition",
        "metadata": { "name": "slicenet", "namespace": cluster.namespace() },
        "spec": { "config": sliced.to_string() },
    }))
    .expect("a NAD");
    nads.create(&PostParams::default(), &nad).await.expect("create the NAD");

    let leader = components.controller(&[]).await;
    let per_node = components.controller(&["--mode", "node", "--node", &node]).await;

    let slices: Api<DynamicObject> = Api::namespaced_with(
        cluster.client(),
        cluster.namespace(),
        &custom("whereabouts.cni.cncf.io", "v1alpha1", "NodeSlicePool", "nodeslicepools"),
    );
    let has_slice = |node: String| {
        let slices = slices.clone();
        async move {
            let Ok(Some(pool)) = slices.get_opt("slicenet").await else { return false };
            pool.data["status"]["allocations"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|s| s["nodeName"] == node.as_str())
        }
    };
    eventually("the node's slice", || has_slice(node.clone())).await;
    // A node joins: the controller updates the NodeSlicePool.
    let joining = cluster.create_node("n2").await;
    eventually("the joining node's slice", || has_slice(joining.clone())).await;

    // The plugin: plain range (pool and overlapping-range reservations), node slices, ADD and DEL.
    let plain = components.netconf(json!({ "range": "192.0.2.0/24" }));
    let uid1 = cluster.create_pod("p1", Some(&node)).await;
    components.plugin("ADD", ("p1", "p1"), &uid1, &node, &plain).await;
    // The same attachment from a new sandbox: the reservation is taken over.
    components.plugin("ADD", ("p1", "p1-again"), &uid1, &node, &plain).await;
    let uid2 = cluster.create_pod("p2", Some(&node)).await;
    components.plugin("ADD", ("p2", "p2"), &uid2, &node, &plain).await;
    components.plugin("DEL", ("p2", "p2"), &uid2, &node, &plain).await;
    let uid3 = cluster.create_pod("p3", Some(&node)).await;
    components.plugin("ADD", ("p3", "p3"), &uid3, &node, &sliced).await;
    assert_eq!(allocations(cluster).await, 2);

    // Pods deleted without DEL: the controllers release their addresses (and record Events).
    cluster.delete_pod("p1").await;
    cluster.delete_pod("p3").await;
    eventually("the controllers' cleanup", || async { allocations(cluster).await == 0 }).await;

    // The reconciler, as the CronJob runs it.
    let output = tokio::process::Command::new(&components.binary)
        .arg("reconcile")
        .args(["--kubeconfig", &components.kubeconfig.display().to_string()])
        .args(["--namespace", &components.namespace])
        .output()
        .await
        .expect("run reconcile");
    assert!(output.status.success(), "reconcile: {}", String::from_utf8_lossy(&output.stderr));

    // sticky_statefulsets: the plugin reads the pod's StatefulSet, DEL holds its address; the pod goes
    // (the controller reads the StatefulSet: still wanted), then the StatefulSet (released).
    let sticky = components.netconf(json!({ "range": "192.0.2.0/24", "sticky_statefulsets": true }));
    let web = cluster.create_statefulset("web", 1).await;
    let uid = cluster.create_statefulset_pod(("web", &web), 0, &node).await;
    components.plugin("ADD", ("web-0", "web-0"), &uid, &node, &sticky).await;
    components.plugin("DEL", ("web-0", "web-0"), &uid, &node, &sticky).await;
    cluster.delete_pod("web-0").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(allocations(cluster).await, 1, "held while the StatefulSet wants web-0");
    cluster.delete_statefulset("web").await;
    eventually("the held address's release", || async { allocations(cluster).await == 0 }).await;

    // IPAMClaims: the plugin allocates for a launcher pod's claim (and writes its status), DEL holds
    // the address, the pod goes (the controller reads the claim: kept), then the claim (released).
    let mut persistent = components.netconf(json!({ "range": "192.0.2.0/24" }));
    persistent["allowPersistentIPs"] = json!(true);
    cluster.create_ipam_claim("vm1.rbac-net", "rbac-net", "net1").await;
    let networks = json!([{ "name": "rbac-net", "ipam-claim-reference": "vm1.rbac-net" }]);
    let launcher = cluster
        .create_annotated_pod(
            "launcher",
            &node,
            [("k8s.v1.cni.cncf.io/networks".into(), networks.to_string())].into(),
        )
        .await;
    components.plugin("ADD", ("launcher", "launcher"), &launcher, &node, &persistent).await;
    components.plugin("DEL", ("launcher", "launcher"), &launcher, &node, &persistent).await;
    cluster.delete_pod("launcher").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(allocations(cluster).await, 1, "held while the claim exists");
    cluster.delete_ipam_claim("vm1.rbac-net").await;
    eventually("the claim's address's release", || async { allocations(cluster).await == 0 }).await;

    // The NetworkAttachmentDefinition goes: so does its NodeSlicePool.
    nads.delete("slicenet", &DeleteParams::default()).await.expect("delete the NAD");
    eventually("the NodeSlicePool's deletion", || async {
        matches!(slices.get_opt("slicenet").await, Ok(None))
    })
    .await;

    terminate(per_node).await;
    // SIGTERM: the leader hands its Lease back.
    terminate(leader).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_role_grants_what_the_components_call_and_no_more() {
    let cluster = TestCluster::start().await;
    let Some(fake) = cluster.fake() else {
        eprintln!("a real cluster has no request log: the RBAC check runs on the fake API server only");
        cluster.cleanup().await;
        return;
    };
    let components = Components::new(&cluster);
    act_out(&cluster, &components).await;

    let used: BTreeSet<Access> = fake
        .requests()
        .into_iter()
        .filter(|r| r.user == TOKEN)
        .map(|r| {
            let resource = match &r.subresource {
                Some(sub) => format!("{}/{sub}", r.resource),
                None => r.resource.clone(),
            };
            (r.verb, r.group, resource)
        })
        .collect();
    eprintln!("used by the components: {used:#?}");
    let rules = role_with_notes();

    let refused: Vec<&Access> =
        used.iter().filter(|a| !rules.iter().any(|(rule, _)| grants(rule, a))).collect();
    assert!(refused.is_empty(), "called but not granted by whereabouts-cni: {refused:#?}");

    let mut unused = Vec::new();
    for (rule, note) in &rules {
        let justified = note.contains("kept for upstream") || note.contains("not exercised");
        for access in granted(rule) {
            if !used.contains(&access) && !justified {
                unused.push(access);
            }
        }
    }
    assert!(
        unused.is_empty(),
        "granted but used by no component (drop them, or move them to a rule commented \
         \"kept for upstream\" / \"not exercised\"): {unused:#?}"
    );
    cluster.cleanup().await;
}

#[test]
fn the_role_check_sees_comments_and_wildcards() {
    let rules = role_with_notes();
    assert!(rules.iter().any(|(_, note)| note.contains("kept for upstream")));
    let rule = PolicyRule {
        api_groups: Some(vec!["".into()]),
        resources: Some(vec!["*".into()]),
        verbs: vec!["get".into()],
        ..PolicyRule::default()
    };
    assert!(grants(&rule, &("get".into(), String::new(), "pods".into())));
    assert!(!grants(&rule, &("list".into(), String::new(), "pods".into())));
    assert!(!grants(&rule, &("get".into(), "apps".into(), "pods".into())));
}
