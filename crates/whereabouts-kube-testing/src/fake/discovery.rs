//! `/version` and the (unaggregated) discovery documents, listing what is registered at the time.

use std::collections::BTreeSet;

use kube::core::Version;
use serde_json::{Value, json};

use super::store::State;

/// The version the fake claims to be.
pub(crate) fn version() -> Value {
    json!({
        "major": "1",
        "minor": "33",
        "gitVersion": "v1.33.0-fake",
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2025-04-23T00:00:00Z",
        "goVersion": "go1.24.2",
        "compiler": "gc",
        "platform": "linux/amd64",
    })
}

/// `/api`: APIVersions.
pub(crate) fn core_versions(address: &str) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": address}],
    })
}

/// The served versions of a group, preferred (most stable) first.
fn group_versions(state: &State, group: &str) -> Vec<String> {
    let mut versions: Vec<String> = state
        .types()
        .filter(|rt| rt.group == group)
        .map(|rt| rt.version.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    versions.sort_by_key(|version| std::cmp::Reverse(Version::parse(version).priority()));
    versions
}

/// An APIGroup document, or None if nothing of the group is served.
fn api_group(state: &State, group: &str) -> Option<Value> {
    let versions: Vec<Value> = group_versions(state, group)
        .iter()
        .map(|version| json!({"groupVersion": format!("{group}/{version}"), "version": version}))
        .collect();
    let preferred = versions.first()?.clone();
    Some(json!({"name": group, "versions": versions, "preferredVersion": preferred}))
}

/// `/apis`: APIGroupList.
pub(crate) fn groups(state: &State) -> Value {
    let names: BTreeSet<&str> =
        state.types().map(|rt| rt.group.as_str()).filter(|group| !group.is_empty()).collect();
    let groups: Vec<Value> = names.into_iter().filter_map(|group| api_group(state, group)).collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

/// `/apis/{group}`: APIGroup.
pub(crate) fn group(state: &State, group: &str) -> Option<Value> {
    let mut document = api_group(state, group)?;
    document["kind"] = json!("APIGroup");
    document["apiVersion"] = json!("v1");
    Some(document)
}

/// `/api/v1`, `/apis/{group}/{version}`: APIResourceList, or None if nothing is served there.
pub(crate) fn resources(state: &State, group: &str, version: &str) -> Option<Value> {
    let mut resources = Vec::new();
    for rt in state.types().filter(|rt| rt.group == group && rt.version == version) {
        let mut resource = json!({
            "name": rt.plural,
            "singularName": rt.singular,
            "namespaced": rt.namespaced,
            "kind": rt.kind,
            "verbs": ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"],
        });
        if !rt.short_names.is_empty() {
            resource["shortNames"] = json!(rt.short_names);
        }
        resources.push(resource);
        if rt.status_subresource {
            resources.push(json!({
                "name": format!("{}/status", rt.plural),
                "singularName": "",
                "namespaced": rt.namespaced,
                "kind": rt.kind,
                "verbs": ["get", "patch", "update"],
            }));
        }
    }
    if resources.is_empty() {
        return None;
    }
    let group_version = if group.is_empty() { version.to_owned() } else { format!("{group}/{version}") };
    Some(json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": group_version,
        "resources": resources,
    }))
}
