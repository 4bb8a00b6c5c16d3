//! Validation of built-in objects, as the real registries do it (k8s.io/kubernetes
//! `pkg/apis/core/validation`, `pkg/apis/coordination/validation`), for what the real server
//! requires of the objects the tests and benchmarks write: labels of every object; a pod's containers
//! (a name and an image each) and node name; an Event's fields (the strict rules of `events.k8s.io/v1`,
//! the legacy namespace rule of `v1`); a Lease's durations; ConfigMap and Secret keys. The messages
//! are the real ones, so the `Invalid` (422) answers read the same.

use std::collections::BTreeSet;
use std::sync::LazyLock;

use regex::Regex;
use serde_json::{Map, Value, json};

use super::error::FieldError;
use super::resource::ResourceType;
use super::store::metadata_str;

const QUALIFIED_NAME_RULE: &str = "must consist of alphanumeric characters, '-', '_' or '.', and must \
     start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex \
     used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')";

const LABEL_VALUE_RULE: &str = "a valid label must be an empty string or consist of alphanumeric \
     characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyValue',  \
     or 'my_value',  or '12345', regex used for validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')";

const CONFIG_KEY_RULE: &str = "a valid config key must consist of alphanumeric characters, '-', '_' or \
     '.' (e.g. 'key.name',  or 'KEY_NAME',  or 'key-name', regex used for validation is '[-._a-zA-Z0-9]+')";

const LABEL_RULE: &str = "a lowercase RFC 1123 label must consist of lower case alphanumeric \
     characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or \
     '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')";

const SUBDOMAIN_RULE: &str = "a lowercase RFC 1123 subdomain must consist of lower case \
     alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. \
     'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')";

/// Events' `note` (`message` in core/v1) limit.
const NOTE_LIMIT: usize = 1024;
const REPORTING_INSTANCE_LIMIT: usize = 128;
const ACTION_LIMIT: usize = 128;
const REASON_LIMIT: usize = 128;

static QUALIFIED_NAME_PART: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$").expect("a regex"));
static LABEL_VALUE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$").expect("a regex"));
static CONFIG_KEY: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"^[-._a-zA-Z0-9]+$").expect("a regex"));

/// Whether `part` is a DNS-1123 label (without the length limit).
fn is_label(part: &str) -> bool {
    let bytes = part.as_bytes();
    let alphanumeric = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    bytes.first().is_some_and(alphanumeric)
        && bytes.last().is_some_and(alphanumeric)
        && bytes.iter().all(|b| alphanumeric(b) || *b == b'-')
}

/// Whether `name` is a DNS-1123 subdomain (without the length limit).
fn is_subdomain(name: &str) -> bool {
    name.split('.').all(is_label)
}

/// The problems of a DNS-1123 label (`IsDNS1123Label`).
pub(crate) fn label_problems(value: &str) -> Vec<String> {
    name_problems(value, 63, is_label, LABEL_RULE)
}

/// The problems of a DNS-1123 subdomain (`IsDNS1123Subdomain`).
pub(crate) fn subdomain_problems(value: &str) -> Vec<String> {
    name_problems(value, 253, is_subdomain, SUBDOMAIN_RULE)
}

/// The problems of a name of at most `longest` characters that `valid` accepts (as `rule` says).
fn name_problems(value: &str, longest: usize, valid: fn(&str) -> bool, rule: &str) -> Vec<String> {
    let mut problems = Vec::new();
    if value.len() > longest {
        problems.push(format!("must be no more than {longest} characters"));
    }
    if !valid(value) {
        problems.push(rule.to_owned());
    }
    problems
}

/// The problems of a qualified name, `[prefix/]name` (`IsQualifiedName`).
fn qualified_name_problems(value: &str) -> Vec<String> {
    let parts: Vec<&str> = value.split('/').collect();
    let name = match parts.as_slice() {
        [name] => *name,
        ["", name] => {
            let mut problems = vec!["prefix part must be non-empty".to_owned()];
            problems.extend(name_part_problems(name));
            return problems;
        }
        [prefix, name] => {
            let mut problems: Vec<String> =
                subdomain_problems(prefix).into_iter().map(|p| format!("prefix part {p}")).collect();
            problems.extend(name_part_problems(name));
            return problems;
        }
        _ => {
            return vec![format!(
                "a qualified name {QUALIFIED_NAME_RULE} with an optional DNS subdomain prefix and '/' (e.g. \
                 'example.com/MyName')"
            )];
        }
    };
    name_part_problems(name)
}

fn name_part_problems(name: &str) -> Vec<String> {
    let mut problems = Vec::new();
    if name.is_empty() {
        problems.push("name part must be non-empty".to_owned());
    } else if name.len() > 63 {
        problems.push("name part must be no more than 63 characters".to_owned());
    }
    if !QUALIFIED_NAME_PART.is_match(name) {
        problems.push(format!("name part {QUALIFIED_NAME_RULE}"));
    }
    problems
}

pub(crate) fn invalid_each(field: &str, value: &str, problems: Vec<String>) -> Vec<FieldError> {
    let rendered = json!(value).to_string();
    problems.iter().map(|problem| FieldError::invalid(field, &rendered, problem)).collect()
}

fn text<'a>(object: &'a Value, pointer: &str) -> &'a str {
    object.pointer(pointer).and_then(Value::as_str).unwrap_or_default()
}

/// `metadata.labels`: qualified-name keys, label values (`ValidateLabels`).
fn labels(object: &Value) -> Vec<FieldError> {
    let Some(Value::Object(labels)) = object.pointer("/metadata/labels") else { return Vec::new() };
    let mut errors = Vec::new();
    for (key, value) in labels {
        errors.extend(invalid_each("metadata.labels", key, qualified_name_problems(key)));
        let value = value.as_str().unwrap_or_default();
        let mut problems = Vec::new();
        if value.len() > 63 {
            problems.push("must be no more than 63 characters".to_owned());
        }
        if !LABEL_VALUE.is_match(value) {
            problems.push(LABEL_VALUE_RULE.to_owned());
        }
        errors.extend(invalid_each("metadata.labels", value, problems));
    }
    errors
}

/// A pod's containers (at least one; each a unique DNS-1123 label name and an image) and node name.
fn pod(object: &Value) -> Vec<FieldError> {
    let mut errors = Vec::new();
    let containers = object.pointer("/spec/containers").and_then(Value::as_array).map(Vec::as_slice);
    match containers {
        None | Some([]) => errors.push(FieldError::required("spec.containers", "")),
        Some(containers) => {
            let mut names = BTreeSet::new();
            for (index, container) in containers.iter().enumerate() {
                let field = |key: &str| format!("spec.containers[{index}].{key}");
                let name = text(container, "/name");
                if name.is_empty() {
                    errors.push(FieldError::required(&field("name"), ""));
                } else {
                    errors.extend(invalid_each(&field("name"), name, label_problems(name)));
                    if !names.insert(name) {
                        errors.push(FieldError::duplicate(&field("name"), &json!(name).to_string()));
                    }
                }
                if text(container, "/image").trim().is_empty() {
                    errors.push(FieldError::required(&field("image"), ""));
                }
            }
        }
    }
    let node = text(object, "/spec/nodeName");
    if !node.is_empty() {
        errors.extend(invalid_each("spec.nodeName", node, subdomain_problems(node)));
    }
    errors
}

/// An Event at create: `strict` for `events.k8s.io/v1` (`ValidateEventCreate`), the legacy rules
/// alone for core/v1. `reporting` and `message` are the version's names of the reporting controller
/// and of the note.
fn event(object: &Value, strict: bool) -> Vec<FieldError> {
    let (regarding, reporting, message) = if strict {
        ("regarding", "reportingController", "note")
    } else {
        ("involvedObject", "reportingComponent", "message")
    };
    let namespace = metadata_str(object, "namespace");
    let regarding_namespace = object.get(regarding).map_or("", |r| text(r, "/namespace"));
    let event_time = text(object, "/eventTime");
    let mut errors = Vec::new();
    let mismatch = || {
        FieldError::invalid(
            "involvedObject.namespace",
            &json!(regarding_namespace).to_string(),
            "does not match event.namespace",
        )
    };
    if event_time.is_empty() {
        let matching = if regarding_namespace.is_empty() {
            namespace.is_empty() || namespace == "default"
        } else {
            namespace == regarding_namespace
        };
        if !matching {
            errors.push(mismatch());
        }
    } else {
        if regarding_namespace.is_empty() && namespace != "default" && namespace != "kube-system" {
            errors.push(mismatch());
        }
        let controller = text(object, "/reportingController");
        if controller.is_empty() {
            errors.push(FieldError::required(reporting, ""));
        }
        errors.extend(invalid_each(reporting, controller, qualified_name_problems(controller)));
        for (field, limit) in [
            ("reportingInstance", REPORTING_INSTANCE_LIMIT),
            ("action", ACTION_LIMIT),
            ("reason", REASON_LIMIT),
        ] {
            let value = text(object, &format!("/{field}"));
            if value.is_empty() {
                errors.push(FieldError::required(field, ""));
            }
            if value.len() > limit {
                errors.push(FieldError::invalid(
                    field,
                    "\"\"",
                    &format!("can have at most {limit} characters"),
                ));
            }
        }
        if text(object, &format!("/{message}")).len() > NOTE_LIMIT {
            errors.push(FieldError::invalid(
                "message",
                "\"\"",
                &format!("can have at most {NOTE_LIMIT} characters"),
            ));
        }
    }
    if !strict {
        return errors;
    }
    if event_time.is_empty() {
        errors.push(FieldError::required("eventTime", ""));
    }
    let kind = text(object, "/type");
    if kind != "Normal" && kind != "Warning" {
        errors.push(FieldError::invalid("type", "\"\"", &format!("has invalid value: {kind}")));
    }
    errors
}

/// A Lease's spec: a positive duration, no negative transition count.
fn lease(object: &Value) -> Vec<FieldError> {
    let mut errors = Vec::new();
    let number = |key: &str| object.pointer(&format!("/spec/{key}")).and_then(Value::as_i64);
    if let Some(seconds) = number("leaseDurationSeconds")
        && seconds <= 0
    {
        errors.push(FieldError::invalid(
            "spec.leaseDurationSeconds",
            &seconds.to_string(),
            "must be greater than 0",
        ));
    }
    if let Some(transitions) = number("leaseTransitions")
        && transitions < 0
    {
        errors.push(FieldError::invalid(
            "spec.leaseTransitions",
            &transitions.to_string(),
            "must be greater than or equal to 0",
        ));
    }
    errors
}

/// The keys of `data` and `binaryData` (ConfigMaps) or `data` and `stringData` (Secrets).
fn config_keys(object: &Value, maps: &[&str]) -> Vec<FieldError> {
    let empty = Map::new();
    let map = |name: &str| object.get(name).and_then(Value::as_object).unwrap_or(&empty);
    let mut errors = Vec::new();
    for (index, name) in maps.iter().enumerate() {
        for key in map(name).keys() {
            let field = format!("{name}[{key}]");
            if index == 0 && maps.get(1) == Some(&"binaryData") && map("binaryData").contains_key(key) {
                let rendered = json!(key).to_string();
                errors.push(FieldError::invalid(&field, &rendered, "duplicate of key present in binaryData"));
            }
            let mut problems = Vec::new();
            if key.len() > 253 {
                problems.push("must be no more than 253 characters".to_owned());
            }
            if !CONFIG_KEY.is_match(key) {
                problems.push(CONFIG_KEY_RULE.to_owned());
            }
            errors.extend(invalid_each(&field, key, problems));
        }
    }
    errors
}

/// The errors of a built-in object being written (`creating`: a create, else an update); custom
/// resources are validated against their schema instead.
pub(crate) fn validate(rt: &ResourceType, object: &Value, creating: bool) -> Vec<FieldError> {
    let mut errors = labels(object);
    match (rt.group.as_str(), rt.plural.as_str()) {
        ("", "pods") => errors.extend(pod(object)),
        ("", "events") if creating => errors.extend(event(object, false)),
        ("events.k8s.io", "events") if creating => errors.extend(event(object, true)),
        ("coordination.k8s.io", "leases") => errors.extend(lease(object)),
        ("", "configmaps") => errors.extend(config_keys(object, &["data", "binaryData"])),
        ("", "secrets") => errors.extend(config_keys(object, &["data", "stringData"])),
        _ => {}
    }
    errors
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qualified_names_and_label_values() {
        assert!(qualified_name_problems("whereabouts-kube-testing/test").is_empty());
        assert!(qualified_name_problems("app.kubernetes.io/managed-by").is_empty());
        assert!(qualified_name_problems("Name_1.x").is_empty());
        assert_eq!(qualified_name_problems("a b")[0], format!("name part {QUALIFIED_NAME_RULE}"));
        assert_eq!(qualified_name_problems("Ex.com/a")[0], format!("prefix part {SUBDOMAIN_RULE}"));
        assert_eq!(qualified_name_problems("/a"), ["prefix part must be non-empty"]);
        assert_eq!(
            qualified_name_problems(""),
            ["name part must be non-empty".to_owned(), format!("name part {QUALIFIED_NAME_RULE}")]
        );
        assert_eq!(qualified_name_problems("a/b/c").len(), 1);
        let object = json!({"metadata": {"labels": {"k": "v v", "ok": "", "x": "a".repeat(64)}}});
        let found: Vec<String> = labels(&object).iter().map(ToString::to_string).collect();
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(found[0].starts_with("metadata.labels: Invalid value: \"v v\": a valid label"), "{found:?}");
    }

    #[test]
    fn events_of_both_groups() {
        let strict = json!({"metadata": {"namespace": "ns"}, "eventTime": "2024-01-01T00:00:00.000000Z",
            "type": "Normal", "reason": "R", "action": "A", "reportingController": "x/y",
            "reportingInstance": "i", "regarding": {"namespace": "ns"}});
        assert!(event(&strict, true).is_empty());
        let mut untyped = strict.clone();
        untyped["type"] = json!("Info");
        let found: Vec<String> = event(&untyped, true).iter().map(ToString::to_string).collect();
        assert_eq!(found, ["type: Invalid value: \"\": has invalid value: Info"]);
        let found: Vec<String> =
            event(&json!({"metadata": {"namespace": "ns"}}), true).iter().map(ToString::to_string).collect();
        assert_eq!(
            found,
            [
                "involvedObject.namespace: Invalid value: \"\": does not match event.namespace",
                "eventTime: Required value",
                "type: Invalid value: \"\": has invalid value: "
            ]
        );
        let legacy = json!({"metadata": {"namespace": "ns"}, "involvedObject": {"namespace": "other"}});
        let found: Vec<String> = event(&legacy, false).iter().map(ToString::to_string).collect();
        assert_eq!(
            found,
            ["involvedObject.namespace: Invalid value: \"other\": does not match event.namespace"]
        );
    }
}
