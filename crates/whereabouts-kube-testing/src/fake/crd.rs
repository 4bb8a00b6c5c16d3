//! CustomResourceDefinitions: what the apiextensions server checks and fills in when one is written,
//! and the resource types a stored one serves.

use std::sync::Arc;

use serde_json::{Value, json};

use super::admission::timestamp_now;
use super::error::FieldError;
use super::resource::{Behaviour, ResourceType};
use super::schema::Schema;
use super::store::metadata_str;

fn text<'a>(value: &'a Value, pointer: &str) -> &'a str {
    value.pointer(pointer).and_then(Value::as_str).unwrap_or_default()
}

/// Validates a CRD about to be stored and completes it: defaulted names (`singular`, `listKind`),
/// the `None` conversion strategy, and the status the CRD controllers would report (names accepted,
/// Established, stored versions). Returns the validation errors (empty if none).
pub(crate) fn complete(crd: &mut Value) -> Vec<FieldError> {
    let mut errors = Vec::new();
    let group = text(crd, "/spec/group").to_owned();
    let plural = text(crd, "/spec/names/plural").to_owned();
    let kind = text(crd, "/spec/names/kind").to_owned();
    let name = metadata_str(crd, "name").to_owned();
    if group.is_empty() {
        errors.push(FieldError::required("spec.group", ""));
    } else if !group.contains('.') {
        errors.push(FieldError::invalid(
            "spec.group",
            &json!(group).to_string(),
            "should be a domain with at least one dot",
        ));
    }
    if plural.is_empty() {
        errors.push(FieldError::required("spec.names.plural", ""));
    }
    if kind.is_empty() {
        errors.push(FieldError::required("spec.names.kind", ""));
    }
    if !group.is_empty() && !plural.is_empty() && name != format!("{plural}.{group}") {
        errors.push(FieldError::invalid(
            "metadata.name",
            &json!(name).to_string(),
            "must be spec.names.plural+\".\"+spec.group",
        ));
    }
    let scope = crd.pointer("/spec/scope").cloned().unwrap_or(Value::Null);
    if scope != "Namespaced" && scope != "Cluster" {
        errors.push(FieldError::not_supported(
            "spec.scope",
            &scope,
            &[json!("Cluster"), json!("Namespaced")],
        ));
    }
    let versions = crd.pointer("/spec/versions").and_then(Value::as_array).cloned().unwrap_or_default();
    if versions.is_empty() {
        errors.push(FieldError::required(
            "spec.versions",
            "must have exactly one version marked as storage version",
        ));
    }
    for (index, version) in versions.iter().enumerate() {
        if version.pointer("/schema/openAPIV3Schema").is_none_or(|schema| !schema.is_object()) {
            errors.push(FieldError::required(
                &format!("spec.versions[{index}].schema.openAPIV3Schema"),
                "schemas are required",
            ));
        }
    }
    let storage: Vec<&str> = versions
        .iter()
        .filter(|v| v.get("storage").and_then(Value::as_bool) == Some(true))
        .map(|v| v.get("name").and_then(Value::as_str).unwrap_or_default())
        .collect();
    if !versions.is_empty() && storage.len() != 1 {
        errors.push(FieldError::invalid(
            "spec.versions",
            &json!(versions).to_string(),
            "must have exactly one version marked as storage version",
        ));
    }
    if !errors.is_empty() {
        return errors;
    }

    let mut names = crd.pointer("/spec/names").cloned().unwrap_or_else(|| json!({}));
    names["singular"] = json!(match text(&names, "/singular") {
        "" => kind.to_lowercase(),
        singular => singular.to_owned(),
    });
    names["listKind"] = json!(match text(&names, "/listKind") {
        "" => format!("{kind}List"),
        list_kind => list_kind.to_owned(),
    });
    crd["spec"]["names"] = names.clone();
    if crd.pointer("/spec/conversion").is_none() {
        crd["spec"]["conversion"] = json!({"strategy": "None"});
    }
    let mut stored_versions: Vec<Value> =
        crd.pointer("/status/storedVersions").and_then(Value::as_array).cloned().unwrap_or_default();
    if let Some(storage) = storage.first().map(|s| json!(s))
        && !stored_versions.contains(&storage)
    {
        stored_versions.push(storage);
    }
    let conditions = match crd.pointer("/status/conditions") {
        Some(conditions @ Value::Array(list)) if !list.is_empty() => conditions.clone(),
        _ => {
            let now = timestamp_now();
            json!([
                {"type": "NamesAccepted", "status": "True", "lastTransitionTime": now,
                 "reason": "NoConflicts", "message": "no conflicts found"},
                {"type": "Established", "status": "True", "lastTransitionTime": now,
                 "reason": "InitialNamesAccepted", "message": "the initial names have been accepted"},
            ])
        }
    };
    crd["status"] =
        json!({"acceptedNames": names, "conditions": conditions, "storedVersions": stored_versions});
    errors
}

/// The resource types of a (completed) CRD's served versions.
pub(crate) fn served_types(crd: &Value) -> Vec<ResourceType> {
    let preserve_everything = json!({"x-kubernetes-preserve-unknown-fields": true});
    let versions = crd.pointer("/spec/versions").and_then(Value::as_array).cloned().unwrap_or_default();
    versions
        .iter()
        .filter(|version| version.get("served").and_then(Value::as_bool).unwrap_or(true))
        .map(|version| ResourceType {
            group: text(crd, "/spec/group").to_owned(),
            version: text(version, "/name").to_owned(),
            plural: text(crd, "/spec/names/plural").to_owned(),
            singular: text(crd, "/spec/names/singular").to_owned(),
            kind: text(crd, "/spec/names/kind").to_owned(),
            list_kind: text(crd, "/spec/names/listKind").to_owned(),
            namespaced: text(crd, "/spec/scope") == "Namespaced",
            short_names: crd
                .pointer("/spec/names/shortNames")
                .and_then(Value::as_array)
                .map(|names| names.iter().filter_map(Value::as_str).map(str::to_owned).collect())
                .unwrap_or_default(),
            status_subresource: version.pointer("/subresources/status").is_some(),
            schema: Some(Arc::new(Schema::parse(
                version.pointer("/schema/openAPIV3Schema").unwrap_or(&preserve_everything),
            ))),
            behaviour: Behaviour::Custom { crd: metadata_str(crd, "name").to_owned() },
        })
        .collect()
}
