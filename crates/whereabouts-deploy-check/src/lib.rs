//! Support for the tests of `deploy/`: reading multi-document YAML, holding every document against the
//! Kubernetes type its `kind` names, and rendering the Helm chart without helm.
//!
//! The chart is rendered with [`gtmpl`] (Go's text/template for Rust). Helm adds sprig's functions to
//! text/template; gtmpl has only Go's own, so the few sprig and Helm functions the chart uses are
//! implemented here ([`helm`]) with their semantics. The chart must keep to what this renderer
//! supports: Go template actions, the functions in [`helm::FUNCTIONS`] (`include` among them),
//! `define`/`template`, and no `range` over maps (gtmpl ranges over maps in hash order, Go in key
//! order).

pub mod helm;
pub mod kinds;

use std::path::PathBuf;

use serde_json::{Value, json};

/// The workspace's root directory.
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Every non-empty document of a YAML stream, as JSON values.
///
/// # Errors
/// When the text is not YAML.
pub fn documents(text: &str) -> Result<Vec<Value>, String> {
    let documents: Vec<Value> = serde_saphyr::from_multiple(text).map_err(|e| e.to_string())?;
    Ok(documents.into_iter().filter(|document| !document.is_null()).collect())
}

/// `(kind, namespace, name)` of a manifest, for messages and lookups.
pub fn identity(document: &Value) -> (String, String, String) {
    let text = |value: &Value| value.as_str().unwrap_or_default().to_owned();
    (text(&document["kind"]), text(&document["metadata"]["namespace"]), text(&document["metadata"]["name"]))
}

/// `deploy/`.
pub fn deploy_dir() -> PathBuf {
    workspace_root().join("deploy")
}

/// `deploy/helm/whereabouts`.
pub fn chart_dir() -> PathBuf {
    deploy_dir().join("helm/whereabouts")
}

/// The documents of `deploy/whereabouts.yaml`.
///
/// # Panics
/// When it cannot be read or parsed (test support).
pub fn plain_manifests() -> Vec<Value> {
    let path = deploy_dir().join("whereabouts.yaml");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    documents(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The release the tests install unless they say otherwise: upstream's layout,
/// `helm install whereabouts deploy/helm/whereabouts --namespace kube-system`.
pub const RELEASE: helm::Release<'static> = helm::Release { name: "whereabouts", namespace: "kube-system" };

/// The image repository `deploy/whereabouts.yaml` names: the Dockerfile's build under a local name,
/// which a user replaces with where they pushed it (README.md, "Installing"). The chart has none.
pub const STATIC_IMAGE_REPOSITORY: &str = "whereabouts-rs";

/// [`rendered_chart_as`] [`RELEASE`].
///
/// # Panics
/// When it does not render or parse (test support).
pub fn rendered_chart(values: Option<&Value>) -> Vec<Value> {
    rendered_chart_as(RELEASE, values)
}

/// The chart rendered as `release` with `values` over its defaults, as documents. Unless `values` name
/// an image repository, [`STATIC_IMAGE_REPOSITORY`] (the chart requires one).
///
/// # Panics
/// When it does not render or parse (test support).
pub fn rendered_chart_as(release: helm::Release<'_>, values: Option<&Value>) -> Vec<Value> {
    let mut values = values.cloned().unwrap_or_else(|| json!({}));
    if values["image"]["repository"].is_null() {
        values["image"]["repository"] = json!(STATIC_IMAGE_REPOSITORY);
    }
    let text = helm::render(&chart_dir(), release, Some(&values))
        .unwrap_or_else(|e| panic!("rendering the chart: {e}"))
        .manifests;
    documents(&text).unwrap_or_else(|e| panic!("the rendered chart is not YAML: {e}\n{text}"))
}

/// The one document of `kind` named `name`.
///
/// # Panics
/// When there is none or more than one.
pub fn find<'a>(documents: &'a [Value], kind: &str, name: &str) -> &'a Value {
    let found: Vec<&Value> =
        documents.iter().filter(|d| d["kind"] == kind && d["metadata"]["name"] == name).collect();
    assert_eq!(found.len(), 1, "one {kind} {name}, found {}", found.len());
    found[0]
}
