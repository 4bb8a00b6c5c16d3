//! The Helm chart `deploy/helm/whereabouts`, rendered here without helm (see the crate's docs): with
//! its defaults it makes exactly `deploy/whereabouts.yaml`; its values (the Tanzu package's names
//! among them) change what they say; its `crds/` are `deploy/crds/`.
//!
//! `crds/` is a copy: `WHEREABOUTS_UPDATE_CRDS=1 cargo test -p whereabouts-deploy-check --test chart`
//! refreshes it (after `-p whereabouts-k8s --test crds` regenerated deploy/crds).

use std::collections::BTreeMap;

use serde_json::{Value, json};
use whereabouts_deploy_check::helm::{Release, render};
use whereabouts_deploy_check::{
    RELEASE, chart_dir, deploy_dir, documents, find, identity, kinds, plain_manifests, rendered_chart,
    rendered_chart_as,
};

fn by_identity(docs: &[Value]) -> BTreeMap<(String, String, String), Value> {
    let mut map = BTreeMap::new();
    for doc in docs {
        assert!(map.insert(identity(doc), doc.clone()).is_none(), "twice: {:?}", identity(doc));
    }
    map
}

fn tanzu_values() -> Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/tanzu-values.yaml");
    serde_saphyr::from_str(&std::fs::read_to_string(path).expect("readable")).expect("YAML")
}

fn container<'a>(doc: &'a Value, name: &str) -> &'a Value {
    let spec = match doc["kind"].as_str() {
        Some("CronJob") => &doc["spec"]["jobTemplate"]["spec"]["template"]["spec"],
        _ => &doc["spec"]["template"]["spec"],
    };
    spec["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

fn command(container: &Value) -> Vec<String> {
    container["args"]
        .as_array()
        .expect("a command")
        .iter()
        .filter_map(|a| a.as_str().map(str::to_owned))
        .collect()
}

#[test]
fn crds_are_a_copy_of_deploy_crds() {
    let source = deploy_dir().join("crds");
    let copy = chart_dir().join("crds");
    let update = std::env::var_os("WHEREABOUTS_UPDATE_CRDS").is_some();
    let names = |dir: &std::path::Path| {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .map(|entries| entries.flatten().filter_map(|e| e.file_name().into_string().ok()).collect())
            .unwrap_or_default();
        names.sort();
        names
    };
    if update {
        let _ = std::fs::remove_dir_all(&copy);
        std::fs::create_dir_all(&copy).expect("mkdir");
        for name in names(&source) {
            std::fs::copy(source.join(&name), copy.join(&name)).expect("copy");
        }
    }
    let hint = "refresh with WHEREABOUTS_UPDATE_CRDS=1 cargo test -p whereabouts-deploy-check --test chart";
    assert_eq!(names(&source), names(&copy), "{hint}");
    for name in names(&source) {
        let a = std::fs::read(source.join(&name)).expect("readable");
        let b = std::fs::read(copy.join(&name)).expect("readable");
        assert!(a == b, "{name} differs; {hint}");
    }
    assert_eq!(names(&source).len(), 3);
}

#[test]
fn the_defaults_render_deploy_whereabouts_yaml() {
    let rendered = by_identity(&rendered_chart(None));
    let plain = by_identity(&plain_manifests());
    assert_eq!(rendered.keys().collect::<Vec<_>>(), plain.keys().collect::<Vec<_>>());
    for (id, doc) in &plain {
        assert_eq!(&rendered[id], doc, "{id:?} differs between the chart and deploy/whereabouts.yaml");
    }
}

fn chart_yaml() -> Value {
    serde_saphyr::from_str(&std::fs::read_to_string(chart_dir().join("Chart.yaml")).expect("readable"))
        .expect("YAML")
}

#[test]
fn the_chart_yaml_names_the_workspace_version() {
    let chart = chart_yaml();
    assert_eq!(chart["name"], "whereabouts");
    assert_eq!(chart["apiVersion"], "v2");
    assert_eq!(chart["appVersion"], env!("CARGO_PKG_VERSION"));
}

/// Namespaces of the namespaced objects and of the binding's subject.
fn namespaces(docs: &[Value]) -> Vec<String> {
    let mut namespaces: Vec<String> = docs
        .iter()
        .filter(|doc| !identity(doc).0.starts_with("Cluster"))
        .map(|doc| identity(doc).1)
        .collect();
    let binding = find(docs, "ClusterRoleBinding", "whereabouts");
    namespaces.push(binding["subjects"][0]["namespace"].as_str().unwrap_or_default().to_owned());
    namespaces.sort();
    namespaces.dedup();
    namespaces
}

#[test]
fn everything_goes_into_the_release_namespace_unless_namespace_is_set() {
    let release = Release { name: "cni", namespace: "foo" };
    assert_eq!(namespaces(&rendered_chart_as(release, None)), ["foo"]);
    let cronjob = json!({"ip_reconciler": {"mode": "cronjob"}});
    assert_eq!(namespaces(&rendered_chart_as(release, Some(&cronjob))), ["foo"]);
    // `namespace` (the Tanzu package's key) wins over the release's.
    assert_eq!(namespaces(&rendered_chart_as(release, Some(&json!({"namespace": "bar"})))), ["bar"]);
    assert_eq!(namespaces(&rendered_chart_as(release, Some(&tanzu_values()))), ["tanzu-system-networking"]);
}

#[test]
fn every_object_carries_helms_labels_and_selectors_stay_upstreams() {
    let chart = chart_yaml();
    let version = chart["version"].as_str().expect("a version");
    let release = Release { name: "cni", namespace: "foo" };
    let expected = json!({
        "app.kubernetes.io/name": "whereabouts",
        "app.kubernetes.io/instance": "cni",
        "app.kubernetes.io/version": env!("CARGO_PKG_VERSION"),
        "app.kubernetes.io/managed-by": "Helm",
        "helm.sh/chart": format!("whereabouts-{version}"),
    });
    let plain = plain_manifests();
    let cronjob = json!({"ip_reconciler": {"mode": "cronjob"}});
    for docs in [rendered_chart_as(release, None), rendered_chart_as(release, Some(&cronjob))] {
        for doc in &docs {
            let labels = &doc["metadata"]["labels"];
            for (key, value) in expected.as_object().expect("a map") {
                assert_eq!(&labels[key], value, "{key} of {:?}", identity(doc));
            }
            // A workload's selector cannot change on upgrade: it and its pods' labels stay those of
            // deploy/whereabouts.yaml (upstream's).
            let (kind, _, name) = identity(doc);
            if matches!(kind.as_str(), "DaemonSet" | "Deployment") {
                let upstream = find(&plain, &kind, &name);
                assert_eq!(doc["spec"]["selector"], upstream["spec"]["selector"], "{kind} {name}");
                assert_eq!(
                    doc["spec"]["template"]["metadata"], upstream["spec"]["template"]["metadata"],
                    "{kind} {name}"
                );
            }
        }
    }
}

#[test]
fn tanzu_values_set_namespace_resources_and_schedule() {
    let values = tanzu_values();
    let docs = rendered_chart(Some(&values));
    for doc in &docs {
        kinds::check(doc).unwrap_or_else(|e| panic!("{:?}: {e}", identity(doc)));
        let (kind, namespace, _) = identity(doc);
        if !kind.starts_with("Cluster") {
            assert_eq!(namespace, "tanzu-system-networking", "{:?}", identity(doc));
        }
    }
    let binding = find(&docs, "ClusterRoleBinding", "whereabouts");
    assert_eq!(binding["subjects"][0]["namespace"], "tanzu-system-networking");
    let daemonset = find(&docs, "DaemonSet", "whereabouts");
    assert_eq!(
        container(daemonset, "whereabouts-controller")["resources"],
        json!({"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"cpu": "200m", "memory": "256Mi"}})
    );
    // Controller mode (the default): the schedule goes to the ConfigMap the controller reads.
    let config = find(&docs, "ConfigMap", "whereabouts-config");
    assert_eq!(config["data"]["cron-expression"], "*/10 * * * *");
    assert!(!docs.iter().any(|d| d["kind"] == "CronJob"));
}

#[test]
fn the_reconciler_as_a_cronjob() {
    let mut values = tanzu_values();
    values["ip_reconciler"]["mode"] = json!("cronjob");
    let docs = rendered_chart(Some(&values));
    let cronjob = find(&docs, "CronJob", "whereabouts-reconciler");
    kinds::check(cronjob).expect("a CronJob");
    assert_eq!(cronjob["metadata"]["namespace"], "tanzu-system-networking");
    assert_eq!(cronjob["spec"]["schedule"], "*/10 * * * *");
    assert_eq!(cronjob["spec"]["concurrencyPolicy"], "Forbid");
    assert_eq!(cronjob["spec"]["jobTemplate"]["spec"]["backoffLimit"], 0);
    assert_eq!(cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["restartPolicy"], "Never");
    let reconciler = container(cronjob, "whereabouts-reconciler");
    assert_eq!(reconciler["command"], json!(["/whereabouts"]));
    assert_eq!(command(reconciler)[0], "reconcile");
    // Tanzu sets the requests; the limits are the chart's.
    assert_eq!(
        reconciler["resources"],
        json!({"requests": {"cpu": "25m", "memory": "32Mi"}, "limits": {"cpu": "100m", "memory": "200Mi"}})
    );
    let controller = container(find(&docs, "Deployment", "whereabouts-controller"), "whereabouts");
    assert!(command(controller).contains(&"--no-reconciler".to_owned()));

    // Without a schedule: the Tanzu package's default.
    let docs = rendered_chart(Some(&json!({"ip_reconciler": {"mode": "cronjob"}})));
    assert_eq!(find(&docs, "CronJob", "whereabouts-reconciler")["spec"]["schedule"], "*/5 * * * *");
    assert_eq!(find(&docs, "ConfigMap", "whereabouts-config")["data"]["cron-expression"], "30 4 * * *");
}

#[test]
fn image_log_level_node_slices_metrics_and_scheduling_values() {
    let docs = rendered_chart(Some(&json!({
        "image": {"repository": "registry.example/wa", "tag": "v9", "pullPolicy": "Always"},
        "imagePullSecrets": [{"name": "pull"}],
        "logLevel": "debug",
        "nodeSlices": {"enabled": false},
        "metrics": {"enabled": false},
        "nodeController": {"enabled": false},
        "whereabouts": {"nodeSelector": {"pool": "cni"}, "tolerations": [{"operator": "Exists"}], "priorityClassName": "system-node-critical"},
        "controller": {"replicas": 3, "nodeSelector": null, "tolerations": [{"key": "infra", "operator": "Exists", "effect": "NoSchedule"}]},
    })));
    for doc in &docs {
        kinds::check(doc).unwrap_or_else(|e| panic!("{:?}: {e}", identity(doc)));
    }
    let daemonset = find(&docs, "DaemonSet", "whereabouts");
    let spec = &daemonset["spec"]["template"]["spec"];
    // Helm merges maps of the user's values into the chart's.
    assert_eq!(spec["nodeSelector"], json!({"kubernetes.io/os": "linux", "pool": "cni"}));
    assert_eq!(spec["tolerations"], json!([{"operator": "Exists"}]));
    assert_eq!(spec["priorityClassName"], "system-node-critical");
    assert_eq!(spec["imagePullSecrets"], json!([{"name": "pull"}]));
    assert_eq!(spec["containers"].as_array().map(Vec::len), Some(1), "no node controller");
    let install = container(daemonset, "whereabouts");
    assert_eq!(install["image"], "registry.example/wa:v9");
    assert_eq!(install["imagePullPolicy"], "Always");

    let deployment = find(&docs, "Deployment", "whereabouts-controller");
    assert_eq!(deployment["spec"]["replicas"], 3);
    let spec = &deployment["spec"]["template"]["spec"];
    assert!(spec.get("nodeSelector").is_none());
    assert_eq!(spec["tolerations"][0]["key"], "infra");
    let controller = container(deployment, "whereabouts");
    let args = command(controller);
    for flag in ["--log-level=debug", "--no-node-slices", "--metrics-address="] {
        assert!(args.contains(&flag.to_owned()), "{flag} in {args:?}");
    }
    assert!(controller.get("readinessProbe").is_none() && controller.get("ports").is_none());

    let docs = rendered_chart(Some(&json!({"metrics": {"port": 9555}})));
    let controller = container(find(&docs, "Deployment", "whereabouts-controller"), "whereabouts");
    assert!(command(controller).contains(&"--metrics-address=0.0.0.0:9555".to_owned()));
    assert_eq!(controller["ports"][0]["containerPort"], 9555);
}

#[test]
fn without_an_image_repository_the_render_fails_and_says_how_to_make_one() {
    let error = render(&chart_dir(), RELEASE, None).expect_err("no image");
    assert!(error.contains("image.repository is required"), "{error}");
    assert!(error.contains("Dockerfile") && error.contains("push it to a registry"), "{error}");
}

#[test]
fn the_notes_say_what_was_installed_where_and_how_to_make_the_image() {
    let release = Release { name: "cni", namespace: "foo" };
    let values =
        json!({"image": {"repository": "registry.example/wa"}, "ip_reconciler": {"mode": "cronjob"}});
    let rendered = render(&chart_dir(), release, Some(&values)).expect("renders");
    let notes = rendered.notes;
    for said in [
        "installed as the release cni, in the namespace foo",
        "CronJob whereabouts-reconciler",
        &format!("the image registry.example/wa:{}", env!("CARGO_PKG_VERSION")),
        "built from the Dockerfile",
        "pushed to a\nregistry every node can pull from",
        "image.repository (and image.tag) must name it",
        "kubectl -n foo rollout status daemonset/whereabouts",
    ] {
        assert!(notes.contains(said), "{said:?} not in the notes:\n{notes}");
    }
    assert!(!notes.contains("<no value>"), "{notes}");
    // The notes are printed, not applied.
    assert!(!rendered.manifests.contains("NOTES") && !rendered.manifests.contains("ImagePullBackOff"));
    let tanzu = render(&chart_dir(), release, Some(&json!({"namespace": "bar", "image": values["image"]})))
        .expect("renders")
        .notes;
    assert!(tanzu.contains("in the namespace bar") && !tanzu.contains("CronJob"), "{tanzu}");
}

#[test]
fn the_schema_refuses_misspelt_keys_and_values_the_chart_does_not_know() {
    let image = json!({"repository": "registry.example/wa"});
    let cases = [
        (
            json!({"metrics": {"enabeld": false}}),
            "at '/metrics': Additional properties are not allowed ('enabeld'",
        ),
        (
            json!({"ip_reconciler": {"mode": "CronJob"}}),
            "at '/ip_reconciler/mode': \"CronJob\" is not one of",
        ),
        (json!({"imagePullSecret": [{"name": "pull"}]}), "('imagePullSecret' was unexpected)"),
        (json!({"logLevel": "trace"}), "at '/logLevel'"),
        (json!({"metrics": {"port": "9445"}}), "at '/metrics/port'"),
        (json!({"whereabouts": {"config": {"resources": {"limts": {}}}}}), "('limts' was unexpected)"),
        (
            json!({"controller": {"tolerations": [{"operator": "exists"}]}}),
            "at '/controller/tolerations/0/operator'",
        ),
    ];
    for (mut values, problem) in cases {
        values["image"] = image.clone();
        let error = render(&chart_dir(), RELEASE, Some(&values)).expect_err("refused");
        assert!(error.contains("values.schema.json") && error.contains(problem), "{values}: {error}");
    }
}

#[test]
fn the_schema_accepts_the_defaults_and_the_tanzu_values() {
    let mut tanzu = tanzu_values();
    for values in [json!({}), tanzu.clone()] {
        // Only image.repository is required, by the templates rather than the schema.
        let error = render(&chart_dir(), RELEASE, Some(&values)).expect_err("no image");
        assert!(error.contains("image.repository is required") && !error.contains("schema"), "{error}");
    }
    tanzu["image"] = json!({"repository": "registry.example/wa"});
    render(&chart_dir(), RELEASE, Some(&tanzu)).expect("Tanzu values pass");
}

#[test]
fn rendered_documents_parse_as_yaml_streams() {
    let values = json!({"image": {"repository": "registry.example/wa"}});
    let text = render(&chart_dir(), RELEASE, Some(&values)).expect("renders").manifests;
    assert!(!text.contains("<no value>"), "{text}");
    assert_eq!(documents(&text).expect("YAML").len(), 6);
}
