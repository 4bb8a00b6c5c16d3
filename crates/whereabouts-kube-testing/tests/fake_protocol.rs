//! The fake API server's protocol, exercised through a real `kube::Client`.

use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Node, Pod};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams, Preconditions,
    WatchEvent, WatchParams,
};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::core::Status;
use kube::{Client, Config};
use serde_json::{Value, json};
use whereabouts_kube_testing::{FakeApiServer, FakeOptions, Stats, TestCluster};

const NS: &str = "default";

async fn config_for(server: &FakeApiServer) -> Config {
    let kubeconfig = Kubeconfig::from_yaml(&server.kubeconfig(NS)).expect("kubeconfig");
    Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await.expect("config")
}

async fn client_for(server: &FakeApiServer) -> Client {
    Client::try_from(config_for(server).await).expect("client")
}

/// A server and a client of it.
async fn start() -> (FakeApiServer, Client) {
    let server = FakeApiServer::start();
    let client = client_for(&server).await;
    (server, client)
}

/// The API error of a failed call.
fn api_error<T: std::fmt::Debug>(result: Result<T, kube::Error>) -> Box<Status> {
    match result {
        Err(kube::Error::Api(status)) => status,
        other => panic!("expected an API error, got {other:?}"),
    }
}

fn assert_status<T: std::fmt::Debug>(result: Result<T, kube::Error>, code: u16, reason: &str) -> Box<Status> {
    let status = api_error(result);
    assert_eq!((status.code, status.reason.as_str()), (code, reason), "{status:?}");
    status
}

/// Sends a request as is; answers the status code and the JSON body.
async fn raw(client: &Client, method: &str, uri: &str, content_type: &str, body: &str) -> (u16, Value) {
    let request = axum::http::Request::builder()
        .method(method)
        .uri(uri)
        .header("content-type", content_type)
        .body(kube::client::Body::from(body.as_bytes().to_vec()))
        .expect("request");
    let response = client.send(request).await.expect("response");
    let code = response.status().as_u16();
    let bytes = response.into_body().collect_bytes().await.expect("body");
    (code, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

fn rv<K: kube::Resource>(object: &K) -> u64 {
    object.meta().resource_version.as_deref().expect("a resourceVersion").parse().expect("a number")
}

fn from_json<T: serde::de::DeserializeOwned>(value: Value) -> T {
    serde_json::from_value(value).expect("deserialisable")
}

fn pod(name: &str, node: Option<&str>) -> Pod {
    from_json(json!({
        "metadata": {"name": name, "labels": {"app": "web"}},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "busybox"}]},
    }))
}

fn json_patch(operations: Value) -> Patch<()> {
    Patch::Json(from_json::<json_patch::Patch>(operations))
}

/// The Widget CRD (example.com/v1, namespaced, with a status subresource) used by these tests.
fn widget_crd() -> CustomResourceDefinition {
    from_json(json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "widgets.example.com"},
        "spec": {
            "group": "example.com",
            "scope": "Namespaced",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
            "versions": [{
                "name": "v1", "served": true, "storage": true,
                "subresources": {"status": {}},
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "properties": {
                        "spec": {
                            "type": "object",
                            "required": ["size"],
                            "properties": {
                                "size": {"type": "integer", "minimum": 1},
                                "color": {"type": "string", "enum": ["red", "blue"]},
                                "note": {"type": "string", "nullable": true},
                                "mode": {"type": "string", "default": "auto"},
                                "parts": {"type": "object", "additionalProperties": {
                                    "type": "object",
                                    "required": ["id"],
                                    "properties": {"id": {"type": "string"}},
                                }},
                                "blob": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
                                "list": {"type": "array", "items": {
                                    "type": "object", "properties": {"id": {"type": "string"}},
                                }},
                            },
                        },
                        "status": {"type": "object", "properties": {"phase": {"type": "string"}}},
                    },
                }},
            }],
        },
    }))
}

fn widget_resource() -> ApiResource {
    ApiResource {
        group: "example.com".into(),
        version: "v1".into(),
        api_version: "example.com/v1".into(),
        kind: "Widget".into(),
        plural: "widgets".into(),
    }
}

async fn install_widgets(client: &Client) -> Api<DynamicObject> {
    Api::<CustomResourceDefinition>::all(client.clone())
        .create(&PostParams::default(), &widget_crd())
        .await
        .expect("CRD created");
    Api::namespaced_with(client.clone(), NS, &widget_resource())
}

fn widget(name: &str, spec: Value) -> DynamicObject {
    from_json(
        json!({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": name}, "spec": spec}),
    )
}

#[test]
fn the_handles_can_be_shared_between_threads() {
    fn shareable<T: Send + Sync>() {}
    shareable::<FakeApiServer>();
    shareable::<TestCluster>();
}

#[tokio::test]
async fn builtin_objects_create_get_list_replace_patch_delete() {
    let (_server, client) = start().await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let created = pods.create(&PostParams::default(), &pod("a", Some("node-1"))).await.expect("created");
    let meta = &created.metadata;
    assert_eq!(meta.namespace.as_deref(), Some(NS));
    assert_eq!(meta.uid.as_ref().map(String::len), Some(36));
    assert!(meta.creation_timestamp.is_some() && meta.resource_version.is_some());
    assert_eq!(created.status.and_then(|s| s.phase).as_deref(), Some("Pending"));
    pods.create(&PostParams::default(), &pod("b", None)).await.expect("created");

    let got = pods.get("a").await.expect("got");
    assert_eq!(got.metadata.uid, created.metadata.uid);
    assert_status(pods.get("missing").await, 404, "NotFound");

    let names = |list: kube::core::ObjectList<Pod>| -> Vec<String> {
        list.items.into_iter().map(|p| p.metadata.name.unwrap_or_default()).collect()
    };
    assert_eq!(names(pods.list(&ListParams::default()).await.expect("list")), ["a", "b"]);
    assert_eq!(
        names(pods.list(&ListParams::default().fields("spec.nodeName=node-1")).await.expect("list")),
        ["a"]
    );
    assert_eq!(
        names(pods.list(&ListParams::default().fields("spec.nodeName!=node-1")).await.expect("l")),
        ["b"]
    );
    assert_eq!(
        names(pods.list(&ListParams::default().labels("app=web,!other")).await.expect("l")),
        ["a", "b"]
    );
    assert_eq!(
        names(pods.list(&ListParams::default().labels("app=db")).await.expect("list")),
        Vec::<String>::new()
    );
    let everywhere: Api<Pod> = Api::all(client.clone());
    let list = everywhere.list(&ListParams::default()).await.expect("list");
    assert_eq!(list.items.len(), 2);
    let list_rv: u64 = list.metadata.resource_version.as_deref().expect("rv").parse().expect("number");
    assert!(list_rv >= rv(&got));

    let mut changed = got.clone();
    changed.metadata.labels = Some([("app".to_owned(), "api".to_owned())].into());
    let replaced = pods.replace("a", &PostParams::default(), &changed).await.expect("replaced");
    assert!(rv(&replaced) > rv(&got));
    assert_eq!(replaced.metadata.creation_timestamp, got.metadata.creation_timestamp);

    let patched = pods
        .patch("a", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"annotations": {"x": "y"}}})))
        .await
        .expect("patched");
    assert_eq!(patched.metadata.annotations.as_ref().and_then(|a| a.get("x")).map(String::as_str), Some("y"));
    assert_eq!(patched.metadata.labels, changed.metadata.labels);
    let patched = pods
        .patch(
            "a",
            &PatchParams::default(),
            &Patch::Strategic(json!({"metadata": {"annotations": {"x": null}}})),
        )
        .await
        .expect("patched");
    assert_eq!(patched.metadata.annotations.unwrap_or_default().len(), 0);

    // An unscheduled pod goes at once.
    let deleted = pods.delete("b", &DeleteParams::default()).await.expect("deleted");
    assert!(deleted.is_left());
    assert_status(pods.get("b").await, 404, "NotFound");
    assert_status(pods.delete("b", &DeleteParams::default()).await, 404, "NotFound");
}

#[tokio::test]
async fn creates_refuse_duplicates_bad_names_and_missing_namespaces() {
    let (server, client) = start().await;
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), NS);
    let map: ConfigMap = from_json(json!({"metadata": {"name": "m"}, "data": {"k": "v"}}));
    maps.create(&PostParams::default(), &map).await.expect("created");
    let status = assert_status(maps.create(&PostParams::default(), &map).await, 409, "AlreadyExists");
    assert_eq!(status.message, "configmaps \"m\" already exists");

    let generated: ConfigMap = from_json(json!({"metadata": {"generateName": "gen-"}}));
    let created = maps.create(&PostParams::default(), &generated).await.expect("created");
    let name = created.metadata.name.expect("a name");
    assert!(name.starts_with("gen-") && name.len() == 9, "{name}");

    let bad: ConfigMap = from_json(json!({"metadata": {"name": "-bad"}}));
    let status = assert_status(maps.create(&PostParams::default(), &bad).await, 422, "Invalid");
    assert!(
        status.message.starts_with("ConfigMap \"-bad\" is invalid: metadata.name: Invalid value: \"-bad\"")
    );
    let causes = status.details.expect("details").causes;
    assert_eq!(causes[0].field, "metadata.name");

    let elsewhere: Api<ConfigMap> = Api::namespaced(client.clone(), "nowhere");
    let status = assert_status(elsewhere.create(&PostParams::default(), &map).await, 404, "NotFound");
    assert_eq!(status.message, "namespaces \"nowhere\" not found");

    let other_namespace: ConfigMap =
        from_json(json!({"metadata": {"name": "x", "namespace": "kube-system"}}));
    assert_status(maps.create(&PostParams::default(), &other_namespace).await, 400, "BadRequest");
    let (code, body) = raw(
        &client,
        "POST",
        "/api/v1/namespaces/default/configmaps",
        "application/json",
        r#"{"apiVersion": "v2", "kind": "ConfigMap", "metadata": {"name": "y"}}"#,
    )
    .await;
    assert_eq!((code, body["reason"].as_str()), (400, Some("BadRequest")));

    // YAML bodies are accepted.
    let (code, body) = raw(
        &client,
        "POST",
        "/api/v1/namespaces/default/configmaps",
        "application/yaml",
        "metadata:\n  name: from-yaml\ndata:\n  a: b\n",
    )
    .await;
    assert_eq!((code, &body["data"]), (201, &json!({"a": "b"})));

    assert_eq!(server.stats(), Stats { requests: 8, writes: 8, conflicts: 1, invalid: 1, not_found: 1 });
    server.reset_stats();
    assert_eq!(server.stats(), Stats::default());
}

/// The fields named by the causes of a refusal, in order.
fn cause_fields(body: &Value) -> Vec<&str> {
    body["details"]["causes"].as_array().into_iter().flatten().filter_map(|c| c["field"].as_str()).collect()
}

/// What the real server (v1.31) answers for built-in objects missing what it requires, recorded
/// against it: status code, reason, message and causes.
#[tokio::test]
async fn built_in_objects_are_validated_as_the_real_server_does() {
    let (_server, client) = start().await;
    let post = |uri: &'static str, body: Value| {
        let client = client.clone();
        async move { raw(&client, "POST", uri, "application/json", &body.to_string()).await }
    };
    let pods = "/api/v1/namespaces/default/pods";
    let (code, body) =
        post(pods, json!({"metadata": {"name": "pod-0-0"}, "spec": {"containers": [{"name": "app"}]}})).await;
    assert_eq!(
        (code, &body),
        (
            422,
            &json!({
                "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": "Pod \"pod-0-0\" is invalid: spec.containers[0].image: Required value",
                "reason": "Invalid",
                "details": {"name": "pod-0-0", "kind": "Pod", "causes": [
                    {"reason": "FieldValueRequired", "message": "Required value", "field": "spec.containers[0].image"},
                ]},
                "code": 422,
            })
        )
    );
    let message = |body: &Value| body["message"].as_str().unwrap_or_default().to_owned();
    let two = json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "a"}, {"image": "x"}]}});
    let (code, body) = post(pods, two).await;
    assert_eq!(
        (code, message(&body)),
        (
            422,
            "Pod \"p\" is invalid: [spec.containers[0].image: Required value, spec.containers[1].name: \
             Required value]"
                .to_owned()
        )
    );
    for (spec, expected) in [
        (json!({}), "Pod \"p\" is invalid: spec.containers: Required value"),
        (
            json!({"containers": [{"name": "a", "image": "x"}, {"name": "a", "image": "x"}]}),
            "Pod \"p\" is invalid: spec.containers[1].name: Duplicate value: \"a\"",
        ),
        (
            json!({"nodeName": "What_ever", "containers": [{"name": "a", "image": "x"}]}),
            "Pod \"p\" is invalid: spec.nodeName: Invalid value: \"What_ever\": a lowercase RFC 1123 subdomain",
        ),
    ] {
        let (code, body) = post(pods, json!({"metadata": {"name": "p"}, "spec": spec})).await;
        assert!(code == 422 && message(&body).starts_with(expected), "{body}");
    }
    let valid =
        json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "app", "image": "pause"}]}});
    assert_eq!(post(pods, valid).await.0, 201);

    let (code, body) =
        post("/api/v1/nodes", json!({"metadata": {"name": "n", "labels": {"k": "v v"}}})).await;
    assert!(
        code == 422
            && message(&body)
                .starts_with("Node \"n\" is invalid: metadata.labels: Invalid value: \"v v\": a valid label"),
        "{body}"
    );
    let labelled =
        json!({"metadata": {"name": "n", "labels": {"whereabouts-kube-testing/test": "wb-test-1"}}});
    assert_eq!(post("/api/v1/nodes", labelled).await.0, 201);

    let events = "/apis/events.k8s.io/v1/namespaces/default/events";
    let (code, body) = post(events, json!({"metadata": {"name": "e"}})).await;
    assert_eq!(
        (code, message(&body)),
        (
            422,
            "Event \"e\" is invalid: [eventTime: Required value, type: Invalid value: \"\": has \
             invalid value: ]"
                .to_owned()
        )
    );
    let timed =
        json!({"metadata": {"name": "e"}, "eventTime": "2024-01-01T00:00:00.000000Z", "type": "Normal"});
    let (code, body) = post(events, timed.clone()).await;
    let fields = cause_fields(&body);
    assert_eq!(code, 422, "{body}");
    assert_eq!(
        fields,
        [
            "reportingController",
            "reportingController",
            "reportingController",
            "reportingInstance",
            "action",
            "reason"
        ],
        "{body}"
    );
    let mut complete = timed;
    for (key, value) in
        [("reportingController", "x/y"), ("reportingInstance", "i"), ("action", "A"), ("reason", "R")]
    {
        complete[key] = json!(value);
    }
    assert_eq!(post(events, complete).await.0, 201);
    let core_event =
        json!({"metadata": {"name": "c"}, "involvedObject": {"kind": "Pod", "namespace": "other"}});
    let (code, body) = post("/api/v1/namespaces/default/events", core_event).await;
    assert_eq!(
        (code, message(&body)),
        (422, "Event \"c\" is invalid: involvedObject.namespace: Invalid value: \"other\": does not match event.namespace".to_owned())
    );

    let lease =
        json!({"metadata": {"name": "l"}, "spec": {"leaseDurationSeconds": 0, "leaseTransitions": -1}});
    let (code, body) = post("/apis/coordination.k8s.io/v1/namespaces/default/leases", lease).await;
    assert_eq!(
        (code, message(&body)),
        (
            422,
            "Lease.coordination.k8s.io \"l\" is invalid: [spec.leaseDurationSeconds: Invalid value: 0: must be \
             greater than 0, spec.leaseTransitions: Invalid value: -1: must be greater than or equal to 0]"
                .to_owned()
        )
    );
    let map = json!({"metadata": {"name": "c"}, "data": {"a": "x", "a b": "y"}, "binaryData": {"a": "eA=="}});
    let (code, body) = post("/api/v1/namespaces/default/configmaps", map).await;
    let fields = cause_fields(&body);
    assert_eq!((code, fields), (422, vec!["data[a]", "data[a b]"]), "{body}");
}

#[tokio::test]
async fn replace_needs_the_current_resource_version() {
    let (_server, client) = start().await;
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), NS);
    let first =
        maps.create(&PostParams::default(), &from_json(json!({"metadata": {"name": "m"}}))).await.expect("c");
    let mut second = first.clone();
    second.data = Some([("a".to_owned(), "1".to_owned())].into());
    let second = maps.replace("m", &PostParams::default(), &second).await.expect("replaced");

    let mut stale = first.clone();
    stale.data = Some([("b".to_owned(), "2".to_owned())].into());
    let status = assert_status(maps.replace("m", &PostParams::default(), &stale).await, 409, "Conflict");
    assert_eq!(
        status.message,
        "Operation cannot be fulfilled on configmaps \"m\": the object has been modified; please apply your \
         changes to the latest version and try again"
    );

    // Built-in types accept an unconditional update.
    stale.metadata.resource_version = None;
    let third = maps.replace("m", &PostParams::default(), &stale).await.expect("unconditional update");
    assert!(rv(&third) > rv(&second));

    let mut renamed = third.clone();
    renamed.metadata.name = Some("other".to_owned());
    assert_status(maps.replace("m", &PostParams::default(), &renamed).await, 400, "BadRequest");
    assert_status(
        maps.replace("absent", &PostParams::default(), &from_json(json!({"metadata": {"name": "absent"}})))
            .await,
        404,
        "NotFound",
    );

    // Custom resources do not.
    let widgets = install_widgets(&client).await;
    let created =
        widgets.create(&PostParams::default(), &widget("w", json!({"size": 1}))).await.expect("created");
    let mut unconditional = created.clone();
    unconditional.metadata.resource_version = None;
    let status =
        assert_status(widgets.replace("w", &PostParams::default(), &unconditional).await, 422, "Invalid");
    assert!(
        status
            .message
            .contains("metadata.resourceVersion: Invalid value: 0x0: must be specified for an update")
    );
}

#[tokio::test]
async fn unchanged_writes_keep_the_resource_version() {
    let (_server, client) = start().await;
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), NS);
    let created = maps
        .create(&PostParams::default(), &from_json(json!({"metadata": {"name": "m"}, "data": {"a": "1"}})))
        .await
        .expect("created");
    let same = maps.replace("m", &PostParams::default(), &created).await.expect("replaced");
    assert_eq!(rv(&same), rv(&created));
    let same = maps
        .patch("m", &PatchParams::default(), &Patch::Merge(json!({"data": {"a": "1"}})))
        .await
        .expect("p");
    assert_eq!(rv(&same), rv(&created));
    let other = maps
        .create(&PostParams::default(), &from_json(json!({"metadata": {"name": "n"}})))
        .await
        .expect("created");
    assert_eq!(rv(&other), rv(&created) + 1, "one global counter");
    let changed = maps
        .patch("m", &PatchParams::default(), &Patch::Merge(json!({"data": {"a": "2"}})))
        .await
        .expect("p");
    assert_eq!(rv(&changed), rv(&other) + 1);
}

#[tokio::test]
async fn json_patches_follow_the_real_server() {
    let (_server, client) = start().await;
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), NS);
    let created = maps
        .create(&PostParams::default(), &from_json(json!({"metadata": {"name": "m"}, "data": {"a": "1"}})))
        .await
        .expect("created");
    let pp = PatchParams::default();

    // `test` with null passes on a missing path, so "add only if absent" works.
    let patched = maps
        .patch(
            "m",
            &pp,
            &json_patch(json!([
                {"op": "test", "path": "/data/b", "value": null},
                {"op": "add", "path": "/data/b", "value": "2"},
                {"op": "add", "path": "/metadata/finalizers", "value": []},
                {"op": "add", "path": "/metadata/finalizers/-", "value": "x/y"},
                {"op": "add", "path": "/data/a", "value": "replaced"},
            ])),
        )
        .await
        .expect("patched");
    assert_eq!(patched.data, Some([("a".into(), "replaced".into()), ("b".into(), "2".into())].into()));
    assert_eq!(patched.metadata.finalizers, Some(vec!["x/y".to_owned()]));

    let failing = [
        json!([{"op": "test", "path": "/data/b", "value": null}, {"op": "add", "path": "/data/b", "value": "3"}]),
        json!([{"op": "test", "path": "/metadata/resourceVersion", "value": created.metadata.resource_version}]),
        json!([{"op": "remove", "path": "/data/missing"}]),
        json!([{"op": "replace", "path": "/data/missing", "value": "x"}]),
        json!([{"op": "add", "path": "/spec/missing/x", "value": "x"}]),
    ];
    for operations in failing {
        let status =
            assert_status(maps.patch("m", &pp, &json_patch(operations.clone())).await, 422, "Invalid");
        assert_eq!(
            status.message, "the server rejected our request due to an error in our request",
            "{operations}"
        );
    }
    let after = maps.get("m").await.expect("got");
    assert_eq!(rv(&after), rv(&patched), "failed patches change nothing");

    let uri = "/api/v1/namespaces/default/configmaps/m";
    let (code, body) = raw(&client, "PATCH", uri, "application/json-patch+json", "{not json").await;
    assert_eq!((code, body["reason"].as_str()), (400, Some("BadRequest")));
    let (code, _) = raw(&client, "PATCH", uri, "application/json-patch+json", r#"{"op": "add"}"#).await;
    assert_eq!(code, 400);
    let (code, body) = raw(&client, "PATCH", uri, "text/plain", "x").await;
    assert_eq!((code, body["reason"].as_str()), (415, Some("UnsupportedMediaType")));

    // A resourceVersion carried by a patch is a precondition: 409 when stale.
    let stale =
        json!({"metadata": {"resourceVersion": created.metadata.resource_version}, "data": {"c": "3"}});
    assert_status(maps.patch("m", &pp, &Patch::Merge(stale)).await, 409, "Conflict");
    let current =
        json!({"metadata": {"resourceVersion": after.metadata.resource_version}, "data": {"c": "3"}});
    maps.patch("m", &pp, &Patch::Merge(current)).await.expect("current resourceVersion");
    let renaming = json!([{"op": "replace", "path": "/metadata/name", "value": "n"}]);
    assert_status(maps.patch("m", &pp, &json_patch(renaming)).await, 400, "BadRequest");
    let new_uid = json!([{"op": "replace", "path": "/metadata/uid", "value": "0000"}]);
    assert_status(maps.patch("m", &pp, &json_patch(new_uid)).await, 422, "Invalid");
    assert_status(maps.patch("absent", &pp, &Patch::Merge(json!({}))).await, 404, "NotFound");
}

#[tokio::test]
async fn merge_and_apply_patches() {
    let (_server, client) = start().await;
    let widgets = install_widgets(&client).await;
    widgets
        .create(&PostParams::default(), &widget("w", json!({"size": 1, "color": "red", "note": "n"})))
        .await
        .expect("created");
    let merged = widgets
        .patch("w", &PatchParams::default(), &Patch::Merge(json!({"spec": {"color": null, "size": 2}})))
        .await
        .expect("merged");
    assert_eq!(merged.data["spec"], json!({"size": 2, "note": "n", "mode": "auto"}));
    // Custom resources do not take strategic merge patches.
    let strategic = Patch::Strategic(json!({"spec": {"size": 3}}));
    assert_status(widgets.patch("w", &PatchParams::default(), &strategic).await, 415, "UnsupportedMediaType");

    let uri = "/apis/example.com/v1/namespaces/default/widgets/applied?fieldManager=test";
    let applied = "apiVersion: example.com/v1\nkind: Widget\nmetadata:\n  name: applied\nspec:\n  size: 5\n";
    let (code, body) = raw(&client, "PATCH", uri, "application/apply-patch+yaml", applied).await;
    assert_eq!((code, &body["spec"]), (201, &json!({"size": 5, "mode": "auto"})));
    let (code, body) =
        raw(&client, "PATCH", uri, "application/apply-patch+yaml", &applied.replace('5', "6")).await;
    assert_eq!((code, &body["spec"]["size"]), (200, &json!(6)));
    let (code, body) = raw(
        &client,
        "PATCH",
        &uri.replace("?fieldManager=test", ""),
        "application/apply-patch+yaml",
        applied,
    )
    .await;
    assert_eq!((code, body["reason"].as_str()), (422, Some("Invalid")));
    assert!(body["message"].as_str().unwrap_or_default().contains("fieldManager: Required value"));

    let apply = PatchParams::apply("test").force();
    let by_kube = widgets
        .patch("kube", &apply, &Patch::Apply(widget("kube", json!({"size": 7}))))
        .await
        .expect("applied");
    assert_eq!(by_kube.data["spec"]["size"], 7);
}

#[tokio::test]
async fn custom_resources_are_pruned_defaulted_and_validated() {
    let (_server, client) = start().await;
    let widgets = install_widgets(&client).await;
    let mut object = widget(
        "w",
        json!({
            "size": 3, "unknown": 1, "color": null, "note": null,
            "parts": {"a": {"id": "1", "junk": true}, "b": null},
            "blob": {"anything": {"goes": [1, 2]}},
            "list": [{"id": "x", "junk": 1}],
        }),
    );
    object.data["junk"] = json!("top level");
    object.data["status"] = json!({"phase": "set by the client"});
    let created = widgets.create(&PostParams::default(), &object).await.expect("created");
    assert_eq!(
        created.data,
        json!({
            "spec": {
                "size": 3, "note": null, "parts": {"a": {"id": "1"}},
                "blob": {"anything": {"goes": [1, 2]}}, "list": [{"id": "x"}], "mode": "auto",
            },
        })
    );
    assert_eq!(created.metadata.generation, Some(1));

    let status = assert_status(
        widgets
            .create(&PostParams::default(), &widget("bad", json!({"size": "x", "parts": {"5": {"id": 7}}})))
            .await,
        422,
        "Invalid",
    );
    assert_eq!(
        status.message,
        "Widget.example.com \"bad\" is invalid: [spec.parts.5.id: Invalid value: \"integer\": spec.parts.5.id in \
         body must be of type string: \"integer\", spec.size: Invalid value: \"string\": spec.size in body must \
         be of type integer: \"string\"]"
    );
    let details = status.details.expect("details");
    assert_eq!(
        (details.kind.as_str(), details.group.as_str(), details.name.as_str()),
        ("Widget", "example.com", "bad")
    );
    let fields: Vec<&str> = details.causes.iter().map(|c| c.field.as_str()).collect();
    assert_eq!(fields, ["spec.parts.5.id", "spec.size"]);
    assert_eq!(details.causes[0].reason, "FieldValueInvalid");

    let status = assert_status(
        widgets.create(&PostParams::default(), &widget("bad", json!({"color": "green"}))).await,
        422,
        "Invalid",
    );
    assert_eq!(
        status.message,
        "Widget.example.com \"bad\" is invalid: [spec.size: Required value, spec.color: Unsupported value: \
         \"green\": supported values: \"red\", \"blue\"]"
    );
    let patch = Patch::Merge(json!({"spec": {"size": 0}}));
    let status = assert_status(widgets.patch("w", &PatchParams::default(), &patch).await, 422, "Invalid");
    assert!(
        status
            .message
            .ends_with("spec.size: Invalid value: 0: spec.size in body should be greater than or equal to 1")
    );
    assert_status(widgets.get("bad").await, 404, "NotFound");
}

#[tokio::test]
async fn status_subresource() {
    let (_server, client) = start().await;
    let widgets = install_widgets(&client).await;
    let created =
        widgets.create(&PostParams::default(), &widget("w", json!({"size": 1}))).await.expect("created");
    let with_status = widgets
        .patch_status(
            "w",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "Ready"}, "spec": {"size": 9}})),
        )
        .await
        .expect("status patched");
    assert_eq!(with_status.data["status"], json!({"phase": "Ready"}));
    assert_eq!(with_status.data["spec"]["size"], 1, "a status write changes only the status");
    assert_eq!(with_status.metadata.generation, Some(1));

    let mut main = with_status.clone();
    main.data["status"] = json!({"phase": "Overwritten"});
    main.data["spec"]["size"] = json!(2);
    let replaced = widgets.replace("w", &PostParams::default(), &main).await.expect("replaced");
    assert_eq!(replaced.data["status"], json!({"phase": "Ready"}), "a main write keeps the status");
    assert_eq!(replaced.metadata.generation, Some(2), "a spec change bumps the generation");
    let got = widgets.get_status("w").await.expect("got status");
    assert_eq!(got.metadata.uid, created.metadata.uid);

    let mut status_only = replaced.clone();
    status_only.data["status"] = json!({"phase": "Done"});
    let replaced = widgets.replace_status("w", &PostParams::default(), &status_only).await.expect("replaced");
    assert_eq!(
        (replaced.data["status"]["phase"].as_str(), replaced.metadata.generation),
        (Some("Done"), Some(2))
    );

    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    pods.create(&PostParams::default(), &pod("p", Some("n1"))).await.expect("created");
    let running = pods
        .patch_status("p", &PatchParams::default(), &Patch::Merge(json!({"status": {"phase": "Running"}})))
        .await
        .expect("patched");
    assert_eq!(running.status.and_then(|s| s.phase).as_deref(), Some("Running"));
    let leases: Api<Lease> = Api::namespaced(client.clone(), NS);
    leases
        .create(&PostParams::default(), &from_json(json!({"metadata": {"name": "l"}})))
        .await
        .expect("created");
    assert_status(leases.get_status("l").await, 404, "NotFound");
}

#[tokio::test]
async fn deletes_check_preconditions_and_wait_for_finalizers() {
    let (_server, client) = start().await;
    let widgets = install_widgets(&client).await;
    let mut object = widget("w", json!({"size": 1}));
    object.metadata.finalizers = Some(vec!["example.com/hold".to_owned()]);
    let created = widgets.create(&PostParams::default(), &object).await.expect("created");

    let wrong_uid = DeleteParams {
        preconditions: Some(Preconditions { uid: Some("nope".into()), resource_version: None }),
        ..DeleteParams::default()
    };
    let status = assert_status(widgets.delete("w", &wrong_uid).await, 409, "Conflict");
    assert!(status.message.contains("Precondition failed: UID in precondition: nope"), "{}", status.message);
    let wrong_rv = DeleteParams {
        preconditions: Some(Preconditions { uid: None, resource_version: Some("1".into()) }),
        ..DeleteParams::default()
    };
    assert_status(widgets.delete("w", &wrong_rv).await, 409, "Conflict");

    let right = DeleteParams {
        preconditions: Some(Preconditions {
            uid: created.metadata.uid.clone(),
            resource_version: created.metadata.resource_version.clone(),
        }),
        ..DeleteParams::default()
    };
    let pending = widgets.delete("w", &right).await.expect("deleting").left().expect("the object");
    assert!(pending.metadata.deletion_timestamp.is_some());
    let still = widgets.get("w").await.expect("still there");
    assert!(still.metadata.deletion_timestamp.is_some());
    widgets.delete("w", &DeleteParams::default()).await.expect("deleting again is fine");

    widgets
        .patch(
            "w",
            &PatchParams::default(),
            &json_patch(json!([{"op": "remove", "path": "/metadata/finalizers"}])),
        )
        .await
        .expect("finalizer removed");
    assert_status(widgets.get("w").await, 404, "NotFound");

    // Plain built-in types answer a completed deletion with a Success Status.
    let leases: Api<Lease> = Api::namespaced(client.clone(), NS);
    leases
        .create(&PostParams::default(), &from_json(json!({"metadata": {"name": "l"}})))
        .await
        .expect("created");
    let status =
        leases.delete("l", &DeleteParams::default()).await.expect("deleted").right().expect("a Status");
    assert_eq!(status.details.map(|d| d.name), Some("l".to_owned()));
}

#[tokio::test]
async fn scheduled_pods_are_deleted_gracefully() {
    let (_server, client) = start().await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    pods.create(&PostParams::default(), &pod("p", Some("node-1"))).await.expect("created");
    let terminating =
        pods.delete("p", &DeleteParams::default()).await.expect("deleting").left().expect("the pod");
    assert_eq!(terminating.metadata.deletion_grace_period_seconds, Some(30));
    assert!(terminating.metadata.deletion_timestamp.is_some());
    let got = pods.get("p").await.expect("still there while terminating");
    assert_eq!(got.metadata.deletion_grace_period_seconds, Some(30));
    // The kubelet's final deletion.
    pods.delete("p", &DeleteParams { grace_period_seconds: Some(0), ..DeleteParams::default() })
        .await
        .expect("deleted");
    assert_status(pods.get("p").await, 404, "NotFound");

    let mut finished = pod("done", Some("node-1"));
    finished.metadata.name = Some("done".into());
    pods.create(&PostParams::default(), &finished).await.expect("created");
    pods.patch_status(
        "done",
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"phase": "Succeeded"}})),
    )
    .await
    .expect("finished");
    pods.delete("done", &DeleteParams::default()).await.expect("deleted");
    assert_status(pods.get("done").await, 404, "NotFound");
}

#[tokio::test]
async fn deleting_a_namespace_deletes_its_contents() {
    let (_server, client) = start().await;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let created = namespaces
        .create(&PostParams::default(), &from_json(json!({"metadata": {"name": "doomed"}})))
        .await
        .expect("created");
    assert_eq!(created.status.and_then(|s| s.phase).as_deref(), Some("Active"));
    let labels = created.metadata.labels.unwrap_or_default();
    assert_eq!(labels.get("kubernetes.io/metadata.name").map(String::as_str), Some("doomed"));
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), "doomed");
    maps.create(&PostParams::default(), &from_json(json!({"metadata": {"name": "m"}})))
        .await
        .expect("created");
    let widgets = install_widgets(&client).await;
    let doomed_widgets: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), "doomed", &widget_resource());
    doomed_widgets.create(&PostParams::default(), &widget("w", json!({"size": 1}))).await.expect("created");
    widgets.create(&PostParams::default(), &widget("kept", json!({"size": 1}))).await.expect("created");

    let terminating =
        namespaces.delete("doomed", &DeleteParams::default()).await.expect("deleting").left().expect("ns");
    assert_eq!(terminating.status.and_then(|s| s.phase).as_deref(), Some("Terminating"));
    let deadline = Instant::now() + Duration::from_secs(5);
    while namespaces.get("doomed").await.is_ok() {
        assert!(Instant::now() < deadline, "the namespace is never removed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_status(maps.get("m").await, 404, "NotFound");
    assert_status(doomed_widgets.get("w").await, 404, "NotFound");
    widgets.get("kept").await.expect("other namespaces are untouched");
    assert_status(namespaces.delete("default", &DeleteParams::default()).await, 403, "Forbidden");
}

#[tokio::test]
async fn custom_resources_exist_only_while_their_crd_does() {
    let (_server, client) = start().await;
    let widgets: Api<DynamicObject> = Api::namespaced_with(client.clone(), NS, &widget_resource());
    assert_status(widgets.list(&ListParams::default()).await, 404, "NotFound");
    assert_status(
        widgets.create(&PostParams::default(), &widget("w", json!({"size": 1}))).await,
        404,
        "NotFound",
    );

    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd = crds.create(&PostParams::default(), &widget_crd()).await.expect("created");
    let conditions = crd.status.and_then(|s| s.conditions).unwrap_or_default();
    let established = conditions.iter().find(|c| c.type_ == "Established").map(|c| c.status.as_str());
    assert_eq!(established, Some("True"));
    widgets.create(&PostParams::default(), &widget("w", json!({"size": 1}))).await.expect("served now");

    let groups = client.list_api_groups().await.expect("groups");
    assert!(groups.groups.iter().any(|g| g.name == "example.com"));
    let resources = client.list_api_group_resources("example.com/v1").await.expect("resources");
    let names: Vec<&str> = resources.resources.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["widgets", "widgets/status"]);
    let core = client.list_core_api_resources("v1").await.expect("core resources");
    assert!(core.resources.iter().any(|r| r.name == "pods/status" && r.namespaced));
    assert_eq!(client.apiserver_version().await.expect("version").git_version, "v1.33.0-fake");

    crds.delete("widgets.example.com", &DeleteParams::default()).await.expect("deleted");
    assert_status(widgets.get("w").await, 404, "NotFound");
    crds.create(&PostParams::default(), &widget_crd()).await.expect("created again");
    assert!(
        widgets.list(&ListParams::default()).await.expect("listed").items.is_empty(),
        "objects went with the CRD"
    );
}

/// The next `n` events of a watch (with a deadline).
async fn next_events<K>(
    stream: &mut (impl futures::Stream<Item = Result<WatchEvent<K>, kube::Error>> + Unpin),
    n: usize,
) -> Vec<WatchEvent<K>> {
    let mut events = Vec::new();
    while events.len() < n {
        let event = tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .expect("an event in time")
            .expect("the stream goes on")
            .expect("an event");
        if !matches!(event, WatchEvent::Bookmark(_)) {
            events.push(event);
        }
    }
    events
}

fn summary(events: &[WatchEvent<ConfigMap>]) -> Vec<(String, String)> {
    events
        .iter()
        .map(|event| match event {
            WatchEvent::Added(m) => ("ADDED".to_owned(), m.metadata.name.clone().unwrap_or_default()),
            WatchEvent::Modified(m) => ("MODIFIED".to_owned(), m.metadata.name.clone().unwrap_or_default()),
            WatchEvent::Deleted(m) => ("DELETED".to_owned(), m.metadata.name.clone().unwrap_or_default()),
            other => (format!("{other:?}"), String::new()),
        })
        .collect()
}

fn pairs(expected: &[(&str, &str)]) -> Vec<(String, String)> {
    expected.iter().map(|(a, b)| ((*a).to_owned(), (*b).to_owned())).collect()
}

#[tokio::test]
async fn watches_from_a_resource_version_and_from_zero() {
    let (server, client) = start().await;
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), NS);
    let a =
        maps.create(&PostParams::default(), &from_json(json!({"metadata": {"name": "a"}}))).await.expect("a");

    let mut from_zero = maps.watch(&WatchParams::default(), "0").await.expect("watch").boxed();
    let mut from_a = maps.watch(&WatchParams::default(), &rv(&a).to_string()).await.expect("watch").boxed();
    let selected = WatchParams::default().labels("keep=yes");
    let mut labelled = maps.watch(&selected, "0").await.expect("watch").boxed();
    assert_eq!(summary(&next_events(&mut from_zero, 1).await), pairs(&[("ADDED", "a")]));

    let b = maps
        .create(
            &PostParams::default(),
            &from_json(json!({"metadata": {"name": "b", "labels": {"keep": "yes"}}})),
        )
        .await
        .expect("b");
    maps.patch("a", &PatchParams::default(), &Patch::Merge(json!({"data": {"x": "1"}})))
        .await
        .expect("patched");
    maps.patch("b", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"labels": {"keep": "no"}}})))
        .await
        .expect("p");
    let deleted = maps.delete("a", &DeleteParams::default()).await.expect("deleted");
    assert!(deleted.is_right(), "configmaps answer a Status");

    let expected = pairs(&[("ADDED", "b"), ("MODIFIED", "a"), ("MODIFIED", "b"), ("DELETED", "a")]);
    assert_eq!(summary(&next_events(&mut from_zero, 4).await), expected);
    let events = next_events(&mut from_a, 4).await;
    assert_eq!(summary(&events), expected);
    let versions: Vec<u64> = events
        .iter()
        .map(|event| match event {
            WatchEvent::Added(m) | WatchEvent::Modified(m) | WatchEvent::Deleted(m) => rv(m),
            _ => 0,
        })
        .collect();
    assert!(versions.windows(2).all(|pair| pair[0] < pair[1]) && versions[0] == rv(&b), "{versions:?}");
    // The label selector turns "stops matching" into DELETED.
    assert_eq!(summary(&next_events(&mut labelled, 2).await), pairs(&[("ADDED", "b"), ("DELETED", "b")]));

    // Once compacted, an old resourceVersion is gone: an ERROR event with 410.
    server.compact();
    let mut expired = maps.watch(&WatchParams::default(), &rv(&a).to_string()).await.expect("watch").boxed();
    match next_events(&mut expired, 1).await.pop() {
        Some(WatchEvent::Error(status)) => {
            assert_eq!((status.code, status.reason.as_str()), (410, "Expired"))
        }
        other => panic!("expected a 410 ERROR event, got {other:?}"),
    }
    // A single object's watch, as kube's watcher does it.
    let single = WatchParams::default().fields("metadata.name=b");
    let mut one = maps.watch(&single, "0").await.expect("watch").boxed();
    assert_eq!(summary(&next_events(&mut one, 1).await), pairs(&[("ADDED", "b")]));
}

#[tokio::test]
async fn watches_send_bookmarks_initial_events_and_end_on_timeout() {
    let (_server, client) = start().await;
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), NS);
    maps.create(&PostParams::default(), &from_json(json!({"metadata": {"name": "a"}})))
        .await
        .expect("created");
    let mut streaming = maps.watch(&WatchParams::streaming_lists(), "").await.expect("watch").boxed();
    let first = tokio::time::timeout(Duration::from_secs(5), streaming.try_next()).await.expect("in time");
    assert!(matches!(first, Ok(Some(WatchEvent::Added(_)))));
    match tokio::time::timeout(Duration::from_secs(5), streaming.try_next()).await.expect("in time") {
        Ok(Some(WatchEvent::Bookmark(bookmark))) => {
            assert_eq!(
                bookmark.metadata.annotations.get("k8s.io/initial-events-end").map(String::as_str),
                Some("true")
            );
        }
        other => panic!("expected the initial-events-end bookmark, got {other:?}"),
    }
    // Idle: a plain bookmark within a couple of seconds.
    match tokio::time::timeout(Duration::from_secs(3), streaming.try_next()).await.expect("in time") {
        Ok(Some(WatchEvent::Bookmark(bookmark))) => assert!(bookmark.metadata.annotations.is_empty()),
        other => panic!("expected a bookmark, got {other:?}"),
    }

    let started = Instant::now();
    let short = WatchParams::default().timeout(1).disable_bookmarks();
    let events: Vec<_> = maps.watch(&short, "0").await.expect("watch").try_collect().await.expect("events");
    assert_eq!(events.len(), 1);
    assert!(started.elapsed() >= Duration::from_millis(900) && started.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn unavailable_answers_503_until_it_comes_back() {
    let (server, client) = start().await;
    let mut config = config_for(&server).await;
    config.default_retry = false;
    let impatient = Client::try_from(config).expect("client");
    let maps: Api<ConfigMap> = Api::namespaced(impatient, NS);
    let mut watch = Api::<ConfigMap>::namespaced(client.clone(), NS)
        .watch(&WatchParams::default().disable_bookmarks(), "0")
        .await
        .expect("watch")
        .boxed();

    server.set_unavailable(true);
    assert_status(maps.get("x").await, 503, "ServiceUnavailable");
    let ended = tokio::time::timeout(Duration::from_secs(5), watch.next()).await.expect("the watch ends");
    assert!(ended.is_none(), "{ended:?}");

    // kube's default client retries 503s, so its request succeeds once the server is back.
    let patient: Api<ConfigMap> = Api::namespaced(client.clone(), NS);
    let request = tokio::spawn(async move { patient.list(&ListParams::default()).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    server.set_unavailable(false);
    request.await.expect("task").expect("listed after recovery");
    assert_status(maps.get("x").await, 404, "NotFound");
}

#[tokio::test]
async fn dry_runs_store_nothing() {
    let (_server, client) = start().await;
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), NS);
    let dry = PostParams { dry_run: true, ..PostParams::default() };
    let answer = maps.create(&dry, &from_json(json!({"metadata": {"name": "m"}}))).await.expect("dry create");
    assert_eq!(answer.metadata.name.as_deref(), Some("m"));
    assert_status(maps.get("m").await, 404, "NotFound");

    let created =
        maps.create(&PostParams::default(), &from_json(json!({"metadata": {"name": "m"}}))).await.expect("c");
    let patch = Patch::Merge(json!({"data": {"a": "b"}}));
    let answer = maps.patch("m", &PatchParams::default().dry_run(), &patch).await.expect("dry patch");
    assert_eq!(answer.data, Some([("a".to_owned(), "b".to_owned())].into()));
    assert_eq!(maps.get("m").await.expect("got").data, None);
    maps.delete("m", &DeleteParams { dry_run: true, ..DeleteParams::default() }).await.expect("dry delete");
    assert_eq!(rv(&maps.get("m").await.expect("still there")), rv(&created));
}

#[tokio::test]
async fn delete_collection_takes_a_label_selector() {
    let (_server, client) = start().await;
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), NS);
    for (name, group) in [("a", "x"), ("b", "x"), ("c", "y")] {
        let map = from_json(json!({"metadata": {"name": name, "labels": {"group": group}}}));
        maps.create(&PostParams::default(), &map).await.expect("created");
    }
    let deleted = maps
        .delete_collection(&DeleteParams::default(), &ListParams::default().labels("group=x"))
        .await
        .expect("deleted")
        .left()
        .expect("a list");
    assert_eq!(deleted.items.len(), 2);
    let left: Vec<String> = maps
        .list(&ListParams::default())
        .await
        .expect("l")
        .items
        .into_iter()
        .filter_map(|m| m.metadata.name)
        .collect();
    assert_eq!(left, ["c"]);
}

#[tokio::test]
async fn cluster_scoped_objects_and_metadata_only_reads() {
    let (_server, client) = start().await;
    let nodes: Api<Node> = Api::all(client.clone());
    nodes
        .create(&PostParams::default(), &from_json(json!({"metadata": {"name": "n1", "labels": {"a": "b"}}})))
        .await
        .expect("c");
    let node = nodes.get("n1").await.expect("got");
    assert_eq!(node.metadata.namespace, None);
    let metadata = nodes.get_metadata("n1").await.expect("metadata");
    assert_eq!(metadata.types.map(|t| t.kind).as_deref(), Some("PartialObjectMetadata"));
    assert_eq!(metadata.metadata.labels, node.metadata.labels);
    let (code, _) = raw(&client, "GET", "/api/v1/namespaces/default/nodes", "", "").await;
    assert_eq!(code, 404);
}

/// Writers adding their own key behind a `test` for its absence never conflict with each other.
#[tokio::test]
async fn concurrent_json_patch_writers_with_absence_tests_all_succeed() {
    let server = server_with_write_latency();
    let maps: Api<ConfigMap> = Api::namespaced(client_for(&server).await, NS);
    maps.create(&PostParams::default(), &from_json(json!({"metadata": {"name": "m"}, "data": {}})))
        .await
        .expect("c");
    // A few clients, as several plugin processes would have.
    let mut clients = Vec::new();
    for _ in 0..10 {
        clients.push(client_for(&server).await);
    }
    let mut writers = Vec::new();
    for index in 0..50 {
        let maps: Api<ConfigMap> = Api::namespaced(clients[index % clients.len()].clone(), NS);
        writers.push(tokio::spawn(async move {
            let key = format!("k{index}");
            let patch = json_patch(json!([
                {"op": "test", "path": format!("/data/{key}"), "value": null},
                {"op": "add", "path": format!("/data/{key}"), "value": "v"},
            ]));
            maps.patch("m", &PatchParams::default(), &patch).await.map(drop)
        }));
    }
    for writer in writers {
        writer.await.expect("task").expect("patched");
    }
    assert_eq!(maps.get("m").await.expect("got").data.unwrap_or_default().len(), 50);
    assert_eq!(server.stats().invalid, 0);
}

/// Writers guarding with the resourceVersion see 422 and succeed after re-reading.
#[tokio::test]
async fn concurrent_writers_testing_the_resource_version_retry_until_they_succeed() {
    let server = server_with_write_latency();
    let client = client_for(&server).await;
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), NS);
    maps.create(&PostParams::default(), &from_json(json!({"metadata": {"name": "m"}, "data": {}})))
        .await
        .expect("c");
    let mut writers = Vec::new();
    for index in 0..50 {
        let maps = maps.clone();
        writers.push(tokio::spawn(async move {
            let mut refused = 0;
            loop {
                let current = maps.get("m").await?;
                let patch = json_patch(json!([
                    {"op": "test", "path": "/metadata/resourceVersion", "value": current.metadata.resource_version},
                    {"op": "add", "path": format!("/data/k{index}"), "value": "v"},
                ]));
                match maps.patch("m", &PatchParams::default(), &patch).await {
                    Ok(_) => return Ok::<u32, kube::Error>(refused),
                    Err(kube::Error::Api(status)) if status.code == 422 => refused += 1,
                    Err(other) => return Err(other),
                }
            }
        }));
    }
    let mut refused = 0;
    for writer in writers {
        refused += writer.await.expect("task").expect("patched eventually");
    }
    assert_eq!(maps.get("m").await.expect("got").data.unwrap_or_default().len(), 50);
    assert!(refused > 0);
    assert_eq!(server.stats().invalid, u64::from(refused));
}

/// A server whose writes take 1 ms, so that concurrent writers overlap.
fn server_with_write_latency() -> FakeApiServer {
    FakeApiServer::start_with(FakeOptions {
        write_latency: Duration::from_millis(1),
        ..FakeOptions::default()
    })
}

#[tokio::test]
async fn write_latency_serialises_writes_to_one_object_only() {
    let server = FakeApiServer::start_with(FakeOptions {
        write_latency: Duration::from_millis(200),
        ..FakeOptions::default()
    });
    let client = client_for(&server).await;
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), NS);
    for name in ["a", "b", "c", "d"] {
        maps.create(&PostParams::default(), &from_json(json!({"metadata": {"name": name}})))
            .await
            .expect("created");
    }
    let patch_all = |names: [&'static str; 4]| {
        let maps = maps.clone();
        async move {
            let started = Instant::now();
            let patches = names.iter().enumerate().map(|(index, name)| {
                let maps = maps.clone();
                async move {
                    let patch = Patch::Merge(json!({"data": {format!("k{index}"): "v"}}));
                    maps.patch(name, &PatchParams::default(), &patch).await.expect("patched");
                }
            });
            futures::future::join_all(patches).await;
            started.elapsed()
        }
    };
    let one_object = patch_all(["a", "a", "a", "a"]).await;
    let four_objects = patch_all(["a", "b", "c", "d"]).await;
    assert!(one_object >= Duration::from_millis(800), "{one_object:?}");
    assert!(four_objects < Duration::from_millis(600), "{four_objects:?}");
}

/// A request's CPU cost is spent as CPU, as a real server beside its clients spends it: four
/// requests costing 50 ms each take at least 200 ms of the process's CPU time (a wait would take
/// next to none).
#[tokio::test]
async fn request_cpu_is_spent_as_cpu_time() {
    let server = FakeApiServer::start_with(FakeOptions {
        request_cpu: Duration::from_millis(50),
        ..FakeOptions::default()
    });
    let client = client_for(&server).await;
    let maps: Api<ConfigMap> = Api::namespaced(client, NS);
    let cpu = || {
        let now = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
        Duration::new(now.tv_sec.try_into().expect("seconds"), now.tv_nsec.try_into().expect("nanoseconds"))
    };
    let before = cpu();
    for _ in 0..4 {
        assert!(maps.get_opt("absent").await.expect("answered").is_none());
    }
    let spent = cpu() - before;
    assert!(spent >= Duration::from_millis(200), "{spent:?}");
}

fn write_crd_file(directory: &std::path::Path) {
    let crd = serde_json::to_value(widget_crd()).expect("json");
    let yaml = format!(
        "# two documents, one of them not a CRD\n---\n{}\n---\napiVersion: v1\nkind: ConfigMap\n",
        crd
    );
    std::fs::write(directory.join("widgets.yaml"), yaml).expect("written");
}

#[tokio::test]
async fn test_cluster_on_the_fake() {
    // The harness on the fake (its lifecycle, the CRDs it installs from a directory): with a real
    // cluster named, the harness uses that, and would install this test's CRD cluster-wide.
    if std::env::var_os(whereabouts_kube_testing::cluster::KUBECONFIG_ENV).is_some() {
        eprintln!("test_cluster_on_the_fake: a real cluster is named; this test is about the fake");
        return;
    }
    let crds = tempfile::tempdir().expect("directory");
    write_crd_file(crds.path());
    let cluster = TestCluster::start_with_crds(crds.path()).await;
    assert!(!cluster.is_real() && cluster.fake().is_some());
    let namespace = cluster.namespace().to_owned();
    assert!(namespace.starts_with("wb-test-") && namespace.len() == 16);
    let namespaces: Api<Namespace> = Api::all(cluster.client());
    namespaces.get(&namespace).await.expect("the namespace exists");

    // The kubeconfig works for a fresh client, whose default namespace is the test namespace.
    let kubeconfig = Kubeconfig::read_from(cluster.kubeconfig_path()).expect("kubeconfig");
    let config =
        Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await.expect("config");
    assert_eq!(config.default_namespace, namespace);
    let fresh = Client::try_from(config).expect("client");
    let widgets: Api<DynamicObject> = Api::default_namespaced_with(fresh.clone(), &widget_resource());
    let created =
        widgets.create(&PostParams::default(), &widget("w", json!({"size": 1}))).await.expect("served");
    assert_eq!(created.metadata.namespace.as_deref(), Some(namespace.as_str()));
    let nads = ApiResource {
        group: "k8s.cni.cncf.io".into(),
        version: "v1".into(),
        api_version: "k8s.cni.cncf.io/v1".into(),
        kind: "NetworkAttachmentDefinition".into(),
        plural: "network-attachment-definitions".into(),
    };
    let nad: DynamicObject = from_json(json!({
        "apiVersion": "k8s.cni.cncf.io/v1", "kind": "NetworkAttachmentDefinition",
        "metadata": {"name": "net"}, "spec": {"config": "{}", "other": 1},
    }));
    let nad = Api::<DynamicObject>::default_namespaced_with(fresh, &nads)
        .create(&PostParams::default(), &nad)
        .await
        .expect("created");
    assert_eq!(nad.data["spec"], json!({"config": "{}"}));

    let server_url = cluster.fake().map(FakeApiServer::url).expect("a fake");
    cluster.cleanup().await;
    let gone = reqwest_free_get(&server_url).await;
    assert!(gone, "the fake stops with the cluster");
}

/// Whether nothing answers at `url` any more.
async fn reqwest_free_get(url: &str) -> bool {
    let address = url.trim_start_matches("http://").to_owned();
    tokio::net::TcpStream::connect(address).await.is_err()
}

/// A shared cluster keeps nothing of a test: its labelled Nodes and everything in its namespace are
/// deleted, and nothing of anybody else.
#[tokio::test]
async fn test_cluster_cleanup_deletes_what_the_test_made_and_nothing_else() {
    let cluster = TestCluster::start().await;
    let node = cluster.create_node("a").await;
    assert_eq!(node, cluster.unique("a"));
    let nodes: Api<Node> = Api::all(cluster.client());
    // A node the test did not make through the harness (unlabelled): not the test's to delete.
    let unlabelled = cluster.unique("unlabelled");
    let foreign: Node = from_json(json!({"metadata": {"name": unlabelled}}));
    nodes.create(&PostParams::default(), &foreign).await.expect("created");
    let uid = cluster.create_pod("p", Some(&node)).await;
    assert!(!uid.is_empty());
    let maps: Api<ConfigMap> = Api::namespaced(cluster.client(), cluster.namespace());
    let map: ConfigMap = from_json(json!({"metadata": {"name": "m"}}));
    maps.create(&PostParams::default(), &map).await.expect("created");
    let selected = ListParams::default().labels(&cluster.selector());
    assert_eq!(nodes.list(&selected).await.expect("listed").items.len(), 1);

    cluster.delete_test_objects().await;
    assert!(nodes.get_opt(&node).await.expect("read").is_none());
    assert!(nodes.get_opt(&unlabelled).await.expect("read").is_some());
    nodes.delete(&unlabelled, &DeleteParams::default()).await.expect("deleted");
    let pods: Api<Pod> = Api::namespaced(cluster.client(), cluster.namespace());
    assert!(pods.get_opt("p").await.expect("read").is_none(), "deleted at once, though bound to a node");
    assert!(maps.get_opt("m").await.expect("read").is_none());
    let namespace = Api::<Namespace>::all(cluster.client()).get_opt(cluster.namespace()).await.expect("read");
    assert!(namespace.is_none_or(|n| n.metadata.deletion_timestamp.is_some()));
    cluster.cleanup().await;
}

#[tokio::test]
async fn test_cluster_installs_the_workspace_crds() {
    let cluster = TestCluster::start().await;
    let crds: Api<CustomResourceDefinition> = Api::all(cluster.client());
    let names: Vec<String> = crds
        .list(&ListParams::default())
        .await
        .expect("listed")
        .items
        .into_iter()
        .filter_map(|c| c.metadata.name)
        .collect();
    assert!(names.contains(&"network-attachment-definitions.k8s.cni.cncf.io".to_owned()), "{names:?}");
    let crd_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/crds");
    let files = std::fs::read_dir(crd_dir).map(|entries| entries.count()).unwrap_or(0);
    assert!(names.len() > files, "{names:?}");
    cluster.cleanup().await;
}
