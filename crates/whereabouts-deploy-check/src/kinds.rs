//! Manifests against the k8s-openapi types of their kinds.
//!
//! k8s-openapi's types skip fields they do not know, so a misspelt field would pass a plain
//! deserialisation: each document is deserialised, serialised again and compared with what was
//! written. Anything the type dropped or changed is reported.

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::batch::v1::CronJob;
use k8s_openapi::api::core::v1::{ConfigMap, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;

/// The kinds deploy/ may contain, as `apiVersion`, `kind`.
pub const KNOWN: &[(&str, &str)] = &[
    ("v1", "ServiceAccount"),
    ("v1", "ConfigMap"),
    ("rbac.authorization.k8s.io/v1", "ClusterRole"),
    ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"),
    ("apps/v1", "DaemonSet"),
    ("apps/v1", "Deployment"),
    ("batch/v1", "CronJob"),
    ("apiextensions.k8s.io/v1", "CustomResourceDefinition"),
];

/// Deserialises `document` as the type its apiVersion and kind name and checks that nothing was lost.
///
/// # Errors
/// An unknown kind, a document that is not of its type, or fields the type does not have.
pub fn check(document: &Value) -> Result<(), String> {
    let api_version = document["apiVersion"].as_str().unwrap_or_default();
    let kind = document["kind"].as_str().unwrap_or_default();
    match (api_version, kind) {
        ("v1", "ServiceAccount") => round_trip::<ServiceAccount>(document),
        ("v1", "ConfigMap") => round_trip::<ConfigMap>(document),
        ("rbac.authorization.k8s.io/v1", "ClusterRole") => round_trip::<ClusterRole>(document),
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => round_trip::<ClusterRoleBinding>(document),
        ("apps/v1", "DaemonSet") => round_trip::<DaemonSet>(document),
        ("apps/v1", "Deployment") => round_trip::<Deployment>(document),
        ("batch/v1", "CronJob") => round_trip::<CronJob>(document),
        ("apiextensions.k8s.io/v1", "CustomResourceDefinition") => {
            round_trip::<CustomResourceDefinition>(document)
        }
        _ => Err(format!("unknown kind {api_version}/{kind}: add it to deploy_check::kinds")),
    }
}

fn round_trip<K: DeserializeOwned + Serialize>(document: &Value) -> Result<(), String> {
    let typed: K = serde_json::from_value(document.clone()).map_err(|e| e.to_string())?;
    let again = serde_json::to_value(&typed).map_err(|e| e.to_string())?;
    let mut lost = Vec::new();
    differences("", document, &again, &mut lost);
    if lost.is_empty() { Ok(()) } else { Err(format!("not kept by the type: {}", lost.join(", "))) }
}

/// Paths where `written` has something `typed` has not, or has differently.
fn differences(path: &str, written: &Value, typed: &Value, out: &mut Vec<String>) {
    match (written, typed) {
        (Value::Object(written), Value::Object(typed)) => {
            for (key, value) in written {
                let at = format!("{path}.{key}");
                match typed.get(key) {
                    Some(typed) => differences(&at, value, typed, out),
                    None => out.push(at),
                }
            }
        }
        (Value::Array(written), Value::Array(typed)) if written.len() == typed.len() => {
            for (i, (written, typed)) in written.iter().zip(typed).enumerate() {
                differences(&format!("{path}[{i}]"), written, typed, out);
            }
        }
        (Value::Number(a), Value::Number(b)) if a.as_f64() == b.as_f64() => {}
        (written, typed) if written == typed => {}
        _ => out.push(format!("{path} ({written} became {typed})")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn misspelt_fields_and_unknown_kinds_are_refused() {
        let good =
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "a"}, "data": {"k": "v"}});
        assert_eq!(check(&good), Ok(()));
        let typo = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "a", "lables": {}}});
        assert!(check(&typo).unwrap_err().contains(".metadata.lables"));
        let unknown = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "a"}});
        assert!(check(&unknown).unwrap_err().contains("unknown kind"));
    }
}
