//! On a real cluster (`WHEREABOUTS_TEST_KUBECONFIG` names its kubeconfig): the CRDs, deploy/whereabouts.yaml
//! and the chart (defaults, and the reconciler as a CronJob) applied with a server-side dry run, so the
//! API server's own validation (defaulting, immutable fields of an existing install included) accepts
//! them. Nothing is changed. Without the variable the test says so and passes.

use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use serde_json::{Value, json};
use whereabouts_deploy_check::{deploy_dir, documents, identity, plain_manifests, rendered_chart};

fn resource(document: &Value) -> ApiResource {
    let api_version = document["apiVersion"].as_str().expect("an apiVersion");
    let kind = document["kind"].as_str().expect("a kind");
    let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
    let plural = match kind {
        "ServiceAccount" => "serviceaccounts",
        "ConfigMap" => "configmaps",
        "ClusterRole" => "clusterroles",
        "ClusterRoleBinding" => "clusterrolebindings",
        "DaemonSet" => "daemonsets",
        "Deployment" => "deployments",
        "CronJob" => "cronjobs",
        "CustomResourceDefinition" => "customresourcedefinitions",
        other => panic!("no plural for {other}"),
    };
    ApiResource {
        group: group.into(),
        version: version.into(),
        api_version: api_version.into(),
        kind: kind.into(),
        plural: plural.into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_cluster_accepts_the_manifests_in_a_dry_run() {
    let Some(path) = std::env::var_os("WHEREABOUTS_TEST_KUBECONFIG").filter(|p| !p.is_empty()) else {
        eprintln!("WHEREABOUTS_TEST_KUBECONFIG is not set: no server-side dry run");
        return;
    };
    let kubeconfig = Kubeconfig::read_from(&path).expect("the kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("a client configuration");
    let client = kube::Client::try_from(config).expect("a client");

    let mut docs = Vec::new();
    for entry in std::fs::read_dir(deploy_dir().join("crds")).expect("deploy/crds").flatten() {
        docs.extend(documents(&std::fs::read_to_string(entry.path()).expect("readable")).expect("YAML"));
    }
    docs.extend(plain_manifests());
    docs.extend(rendered_chart(None));
    docs.extend(rendered_chart(Some(&json!({"ip_reconciler": {"mode": "cronjob"}}))));

    let params = PatchParams::apply("whereabouts-deploy-check").dry_run().force();
    for doc in &docs {
        let (_, namespace, name) = identity(doc);
        let resource = resource(doc);
        let api: Api<DynamicObject> = if namespace.is_empty() {
            Api::all_with(client.clone(), &resource)
        } else {
            Api::namespaced_with(client.clone(), &namespace, &resource)
        };
        if let Err(e) = api.patch(&name, &params, &Patch::Apply(doc)).await {
            panic!("{:?} refused: {e}", identity(doc));
        }
    }
}
