//! `deploy/whereabouts.yaml` and `deploy/crds/`: every document is of a known kind and type, names,
//! namespace, labels and selectors are upstream's (so `kubectl apply` upgrades an upstream install),
//! the workloads run the binary the Dockerfile builds, with flags it accepts.

use std::path::Path;
use std::process::Command;

use serde_json::{Value, json};
use whereabouts_deploy_check::{
    STATIC_IMAGE_REPOSITORY, deploy_dir, documents, find, identity, kinds, plain_manifests,
};
const BINARY: &str = "/whereabouts";

fn yaml_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "yaml"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_document_is_of_a_known_kind_and_its_type() {
    let mut count = 0;
    for dir in [deploy_dir(), deploy_dir().join("crds")] {
        for file in yaml_files(&dir) {
            let text = std::fs::read_to_string(&file).expect("readable");
            let docs = documents(&text).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            for doc in &docs {
                if let Err(e) = kinds::check(doc) {
                    panic!("{} {:?}: {e}", file.display(), identity(doc));
                }
                count += 1;
            }
        }
    }
    assert!(count >= 9, "only {count} documents");
}

/// Every pod template of the documents, with where it is.
fn pod_specs(docs: &[Value]) -> Vec<(String, &Value)> {
    docs.iter()
        .filter_map(|doc| {
            let spec = match doc["kind"].as_str()? {
                "DaemonSet" | "Deployment" => &doc["spec"]["template"]["spec"],
                "CronJob" => &doc["spec"]["jobTemplate"]["spec"]["template"]["spec"],
                _ => return None,
            };
            Some((format!("{:?}", identity(doc)), spec))
        })
        .collect()
}

/// Every container (init containers too) of the documents.
pub fn containers(docs: &[Value]) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for (at, spec) in pod_specs(docs) {
        for list in ["initContainers", "containers"] {
            for container in spec[list].as_array().into_iter().flatten() {
                out.push((format!("{at} {}", container["name"]), container.clone()));
            }
        }
    }
    out
}

#[test]
fn names_namespace_labels_and_selectors_are_upstreams() {
    let docs = plain_manifests();
    let mut seen: Vec<(String, String, String)> = docs.iter().map(identity).collect();
    seen.sort();
    let mut expected: Vec<(String, String, String)> = [
        ("ClusterRole", "", "whereabouts-cni"),
        ("ClusterRoleBinding", "", "whereabouts"),
        ("ConfigMap", "kube-system", "whereabouts-config"),
        ("DaemonSet", "kube-system", "whereabouts"),
        ("Deployment", "kube-system", "whereabouts-controller"),
        ("ServiceAccount", "kube-system", "whereabouts"),
    ]
    .iter()
    .map(|(k, n, m)| ((*k).to_owned(), (*n).to_owned(), (*m).to_owned()))
    .collect();
    expected.sort();
    assert_eq!(seen, expected);

    let binding = find(&docs, "ClusterRoleBinding", "whereabouts");
    assert_eq!(
        binding["roleRef"],
        json!({"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "whereabouts-cni"})
    );
    assert_eq!(
        binding["subjects"],
        json!([{"kind": "ServiceAccount", "name": "whereabouts", "namespace": "kube-system"}])
    );
    let config = find(&docs, "ConfigMap", "whereabouts-config");
    assert_eq!(config["data"], json!({"cron-expression": "30 4 * * *"}));

    // Selectors are immutable: they must be upstream's for `kubectl apply` to update the objects.
    let daemonset = find(&docs, "DaemonSet", "whereabouts");
    assert_eq!(daemonset["spec"]["selector"], json!({"matchLabels": {"name": "whereabouts"}}));
    assert_eq!(
        daemonset["spec"]["template"]["metadata"]["labels"],
        json!({"tier": "node", "app": "whereabouts", "name": "whereabouts"})
    );
    // Upstream's labels, beside the chart's (Helm's recommended ones).
    let labels = &daemonset["metadata"]["labels"];
    assert_eq!((&labels["tier"], &labels["app"]), (&json!("node"), &json!("whereabouts")));
    let deployment = find(&docs, "Deployment", "whereabouts-controller");
    assert_eq!(deployment["spec"]["selector"], json!({"matchLabels": {"app": "whereabouts-controller"}}));
    assert_eq!(
        deployment["spec"]["template"]["metadata"]["labels"],
        json!({"app": "whereabouts-controller"})
    );
    for (at, spec) in pod_specs(&docs) {
        assert_eq!(spec["serviceAccountName"], "whereabouts", "{at}");
    }
}

fn env_of(container: &Value, name: &str) -> Value {
    container["env"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["name"] == name)
        .cloned()
        .unwrap_or(Value::Null)
}

fn field_ref(container: &Value, name: &str) -> Value {
    env_of(container, name)["valueFrom"]["fieldRef"]["fieldPath"].clone()
}

fn probes_on_metrics(container: &Value) {
    let name = &container["name"];
    assert_eq!(
        container["ports"],
        json!([{"name": "metrics", "containerPort": 9445, "protocol": "TCP"}]),
        "{name}"
    );
    assert_eq!(
        container["readinessProbe"]["httpGet"],
        json!({"path": "/readyz", "port": "metrics"}),
        "{name}"
    );
    assert_eq!(
        container["livenessProbe"]["httpGet"],
        json!({"path": "/healthz", "port": "metrics"}),
        "{name}"
    );
    let args: Vec<&str> =
        container["args"].as_array().expect("args").iter().filter_map(Value::as_str).collect();
    assert!(args.contains(&"--metrics-address=0.0.0.0:9445"), "{name}: {args:?}");
}

#[test]
fn the_daemonset_installs_on_the_host_and_cleans_up_its_node() {
    let docs = plain_manifests();
    let daemonset = find(&docs, "DaemonSet", "whereabouts");
    let spec = &daemonset["spec"]["template"]["spec"];
    assert_eq!(spec["hostNetwork"], true);
    assert_eq!(spec["tolerations"], json!([{"operator": "Exists", "effect": "NoSchedule"}]));
    assert_eq!(daemonset["spec"]["updateStrategy"], json!({"type": "RollingUpdate"}));
    assert_eq!(
        spec["volumes"],
        json!([
            {"name": "cnibin", "hostPath": {"path": "/opt/cni/bin"}},
            {"name": "cni-net-dir", "hostPath": {"path": "/etc/cni/net.d"}},
        ])
    );
    let mounts = json!([
        {"name": "cnibin", "mountPath": "/host/opt/cni/bin"},
        {"name": "cni-net-dir", "mountPath": "/host/etc/cni/net.d"},
    ]);
    let init = &spec["initContainers"][0];
    assert_eq!(init["args"], json!(["install", "--once"]));
    let install = &spec["containers"][0];
    assert_eq!(install["args"], json!(["install"]));
    for container in [init, install] {
        assert_eq!(container["volumeMounts"], mounts);
        assert_eq!(field_ref(container, "NODENAME"), "spec.nodeName");
        assert_eq!(field_ref(container, "WHEREABOUTS_NAMESPACE"), "metadata.namespace");
        assert_eq!(container["securityContext"], json!({"runAsUser": 0, "privileged": true}));
    }
    let controller = &spec["containers"][1];
    assert_eq!(controller["args"][0], "controller");
    assert!(controller["args"].as_array().expect("args").contains(&json!("--mode=node")));
    assert_eq!(field_ref(controller, "NODENAME"), "spec.nodeName");
    assert_eq!(field_ref(controller, "WHEREABOUTS_NAMESPACE"), "metadata.namespace");
    assert_eq!(
        controller["resources"],
        json!({"requests": {"cpu": "100m", "memory": "100Mi"}, "limits": {"cpu": "100m", "memory": "200Mi"}})
    );
    assert_eq!(controller["securityContext"]["runAsNonRoot"], true);
    assert!(controller.get("volumeMounts").is_none(), "the node controller needs no host files");
    probes_on_metrics(controller);
}

#[test]
fn the_controller_deployment_is_leader_elected_and_non_root() {
    let docs = plain_manifests();
    let deployment = find(&docs, "Deployment", "whereabouts-controller");
    assert_eq!(deployment["spec"]["replicas"], 2);
    let spec = &deployment["spec"]["template"]["spec"];
    assert_eq!(spec["securityContext"]["runAsNonRoot"], true);
    let containers = spec["containers"].as_array().expect("containers");
    assert_eq!(containers.len(), 1);
    let controller = &containers[0];
    // Upstream's container name: applied over upstream's Deployment, ours replaces its container.
    assert_eq!(controller["name"], "whereabouts");
    assert_eq!(controller["args"][0], "controller");
    assert!(!controller["args"].as_array().expect("args").iter().any(|a| a == "--no-leader-election"));
    assert_eq!(field_ref(controller, "POD_NAME"), "metadata.name");
    assert_eq!(field_ref(controller, "WHEREABOUTS_NAMESPACE"), "metadata.namespace");
    assert_eq!(
        controller["volumeMounts"],
        json!([{"name": "cron-scheduler-configmap", "mountPath": "/cron-schedule", "readOnly": true}])
    );
    assert_eq!(
        spec["volumes"][0]["configMap"]["items"],
        json!([{"key": "cron-expression", "path": "config"}])
    );
    assert_eq!(spec["volumes"][0]["configMap"]["name"], "whereabouts-config");
    probes_on_metrics(controller);
}

#[test]
fn workloads_run_the_released_image_and_only_installers_are_privileged() {
    let docs = plain_manifests();
    let all = containers(&docs);
    assert_eq!(all.len(), 4);
    for (at, container) in &all {
        assert_eq!(
            container["image"],
            format!("{STATIC_IMAGE_REPOSITORY}:{}", env!("CARGO_PKG_VERSION")),
            "{at}"
        );
        // Both set: nothing of upstream's command line (`/bin/sh -c ...`) survives a merge.
        assert_eq!(container["command"], json!([BINARY]), "{at}");
        let privileged = container["securityContext"]["privileged"] == true;
        let installs = container["args"][0] == "install";
        assert_eq!(privileged, installs, "{at}: privileged only to write the host's directories");
        if !installs {
            assert_eq!(container["securityContext"]["allowPrivilegeEscalation"], false, "{at}");
        }
    }
}

#[test]
fn the_dockerfile_builds_the_binary_the_manifests_run() {
    let dockerfile = std::fs::read_to_string(deploy_dir().join("../Dockerfile")).expect("a Dockerfile");
    assert!(dockerfile.contains("cargo build --release --locked -p whereabouts"), "{dockerfile}");
    assert!(dockerfile.contains(&format!("COPY --from=build /whereabouts {BINARY}")));
    assert!(dockerfile.contains(&format!("ENTRYPOINT [\"{BINARY}\"]")));
    assert!(dockerfile.contains("protobuf-compiler"));
}

/// Each container's command parses: the same arguments with `--help` appended exit 0 (clap reports an
/// unknown flag or a bad value before it prints help).
#[test]
fn every_container_command_is_accepted_by_the_binary() {
    let binary = whereabouts_kube_testing::binaries::whereabouts();
    let mut docs = plain_manifests();
    docs.extend(whereabouts_deploy_check::rendered_chart(Some(&json!({
        "ip_reconciler": {"mode": "cronjob"},
        "nodeSlices": {"enabled": false},
        "metrics": {"enabled": false},
        "logLevel": "debug",
    }))));
    for (at, container) in containers(&docs) {
        let args: Vec<String> = container["args"]
            .as_array()
            .expect("args")
            .iter()
            .map(|a| a.as_str().expect("string arguments").to_owned())
            .collect();
        let output = Command::new(&binary).args(&args).arg("--help").env_clear().output().expect("runs");
        assert!(
            output.status.success(),
            "{at}: {args:?} refused: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}
