//! Admission of written objects: checking a request body against its URL, validating it, and filling
//! in what the server owns (uid, creationTimestamp, generation, deletion fields, type-specific status)
//! the way the real registries' strategies do.

use k8s_openapi::jiff::Timestamp;
use serde_json::{Map, Value, json};

use super::error::{ApiError, FieldError};
use super::resource::{Behaviour, ResourceType};
use super::store::{metadata_mut, metadata_str};
use super::{crd, validation};

/// Now, as Kubernetes writes timestamps (RFC 3339, UTC, whole seconds).
pub(crate) fn timestamp_now() -> String {
    timestamp_in(0)
}

/// `seconds` from now, formatted like [`timestamp_now`].
pub(crate) fn timestamp_in(seconds: i64) -> String {
    let second = Timestamp::now().as_second().saturating_add(seconds);
    Timestamp::from_second(second)
        .unwrap_or_else(|_| Timestamp::now())
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

/// A random version-4 UUID.
fn new_uid() -> String {
    let hex: String = (0..32)
        .map(|index| match index {
            12 => '4',
            16 => ['8', '9', 'a', 'b'][fastrand::usize(..4)],
            _ => char::from_digit(fastrand::u32(..16), 16).unwrap_or('0'),
        })
        .collect();
    format!("{}-{}-{}-{}-{}", &hex[..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..])
}

/// `generateName` plus five random characters, from the alphabet (and with the prefix limit) the
/// real name generator uses.
pub(crate) fn generate_name(prefix: &str) -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let prefix: String = prefix.chars().take(58).collect();
    let suffix: String = (0..5).map(|_| char::from(ALPHABET[fastrand::usize(..ALPHABET.len())])).collect();
    format!("{prefix}{suffix}")
}

/// Checks a request body against the URL it was sent to, the checks that answer 400: it must be an
/// object whose `apiVersion` and `kind` (filled in when absent) are the URL's and whose namespace
/// (filled in when absent) is the URL's. Cluster-scoped objects lose any namespace.
pub(crate) fn shape(rt: &ResourceType, namespace: Option<&str>, body: Value) -> Result<Value, ApiError> {
    let Value::Object(mut object) = body else {
        return Err(ApiError::bad_request(format!(
            "the object provided is unrecognized (must be of type {}): the body is not a JSON object",
            rt.kind
        )));
    };
    for (field, expected, what) in
        [("apiVersion", rt.api_version(), "API version"), ("kind", rt.kind.clone(), "kind")]
    {
        match object.get(field).and_then(Value::as_str) {
            None | Some("") => {
                object.insert(field.to_owned(), Value::from(expected));
            }
            Some(given) if given == expected => {}
            Some(given) => {
                return Err(ApiError::bad_request(format!(
                    "the {what} in the data ({given}) does not match the expected {what} ({expected})"
                )));
            }
        }
    }
    let metadata = object.entry("metadata").or_insert_with(|| json!({}));
    let Value::Object(metadata) = metadata else {
        return Err(ApiError::bad_request("metadata must be a JSON object"));
    };
    match (rt.namespaced, namespace) {
        (true, Some(namespace)) => match metadata.get("namespace").and_then(Value::as_str) {
            None | Some("") => {
                metadata.insert("namespace".to_owned(), Value::from(namespace));
            }
            Some(given) if given == namespace => {}
            Some(_) => {
                return Err(ApiError::bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request",
                ));
            }
        },
        _ => {
            metadata.remove("namespace");
        }
    }
    Ok(Value::Object(object))
}

/// The errors of `metadata.name`: a DNS-1123 label for namespaces, a subdomain for the rest.
fn validate_name(rt: &ResourceType, name: &str) -> Vec<FieldError> {
    if name.is_empty() {
        return vec![FieldError::required("metadata.name", "name or generateName is required")];
    }
    let problems = if rt.behaviour == Behaviour::Namespace {
        validation::label_problems(name)
    } else {
        validation::subdomain_problems(name)
    };
    validation::invalid_each("metadata.name", name, problems)
}

/// Prunes, defaults and validates a custom resource against its version's schema.
fn apply_schema(rt: &ResourceType, object: &mut Value) -> Vec<FieldError> {
    match &rt.schema {
        Some(schema) => {
            schema.normalise(object);
            schema.validate(object)
        }
        None => Vec::new(),
    }
}

/// Sets (or with `None` removes) `.status`.
fn set_status(object: &mut Value, status: Option<Value>) {
    if let Some(map) = object.as_object_mut() {
        match status {
            Some(status) => map.insert("status".to_owned(), status),
            None => map.shift_remove("status"),
        };
    }
}

/// The label the real server puts on every namespace.
fn label_namespace(object: &mut Value, name: &str) {
    if let Some(metadata) = metadata_mut(object) {
        let labels = metadata.entry("labels").or_insert_with(|| json!({}));
        if let Value::Object(labels) = labels {
            labels.insert("kubernetes.io/metadata.name".to_owned(), Value::from(name));
        }
    }
}

fn invalid_if_any(rt: &ResourceType, name: &str, errors: Vec<FieldError>) -> Result<(), ApiError> {
    if errors.is_empty() { Ok(()) } else { Err(ApiError::invalid_object(rt, name, errors)) }
}

/// The object to store for a create, from a shaped body whose `metadata.name` is final.
pub(crate) fn prepare_create(rt: &ResourceType, mut object: Value) -> Result<Value, ApiError> {
    let name = metadata_str(&object, "name").to_owned();
    let mut errors = validate_name(rt, &name);
    if rt.status_subresource && rt.is_apiextensions() {
        set_status(&mut object, None);
    }
    match rt.behaviour {
        Behaviour::Namespace => {
            set_status(&mut object, Some(json!({"phase": "Active"})));
            label_namespace(&mut object, &name);
            if object.pointer("/spec/finalizers").is_none() {
                object["spec"] = json!({"finalizers": ["kubernetes"]});
            }
        }
        Behaviour::Pod => set_status(&mut object, Some(json!({"phase": "Pending"}))),
        Behaviour::CustomResourceDefinition => errors.extend(crd::complete(&mut object)),
        Behaviour::Plain | Behaviour::Custom { .. } => {}
    }
    errors.extend(validation::validate(rt, &object, true));
    errors.extend(apply_schema(rt, &mut object));
    invalid_if_any(rt, &name, errors)?;
    if let Some(metadata) = metadata_mut(&mut object) {
        for owned in
            ["resourceVersion", "deletionTimestamp", "deletionGracePeriodSeconds", "generation", "selfLink"]
        {
            metadata.shift_remove(owned);
        }
        metadata.insert("uid".to_owned(), Value::from(new_uid()));
        metadata.insert("creationTimestamp".to_owned(), Value::from(timestamp_now()));
        if rt.is_apiextensions() {
            metadata.insert("generation".to_owned(), Value::from(1));
        }
    }
    Ok(object)
}

/// Whether anything but metadata (and status, when it has its own subresource) differs: what
/// `generation` counts.
fn generation_relevant_change(old: &Value, new: &Value, ignore_status: bool) -> bool {
    let counts = |key: &String| {
        !(matches!(key.as_str(), "apiVersion" | "kind" | "metadata") || (ignore_status && key == "status"))
    };
    let empty = Map::new();
    let (old, new) = (old.as_object().unwrap_or(&empty), new.as_object().unwrap_or(&empty));
    old.keys().chain(new.keys()).filter(|key| counts(key)).any(|key| old.get(key) != new.get(key))
}

/// The object to store for an update of `old` (as presented at this version) by the shaped `new`.
/// A `status_only` write (the `/status` subresource) changes only `.status`; a main-resource write
/// of a type with a status subresource keeps the stored `.status`.
pub(crate) fn prepare_update(
    rt: &ResourceType,
    old: &Value,
    new: Value,
    status_only: bool,
) -> Result<Value, ApiError> {
    let name = metadata_str(old, "name");
    let mut object = if status_only {
        let mut object = old.clone();
        set_status(&mut object, new.get("status").cloned());
        object
    } else {
        let mut object = new;
        if rt.status_subresource {
            set_status(&mut object, old.get("status").cloned());
        }
        object
    };
    let mut errors = Vec::new();
    if !status_only {
        match rt.behaviour {
            Behaviour::Namespace => label_namespace(&mut object, name),
            Behaviour::CustomResourceDefinition => errors.extend(crd::complete(&mut object)),
            Behaviour::Pod | Behaviour::Plain | Behaviour::Custom { .. } => {}
        }
    }
    errors.extend(validation::validate(rt, &object, false));
    errors.extend(apply_schema(rt, &mut object));
    invalid_if_any(rt, name, errors)?;
    let bump = rt.is_apiextensions() && generation_relevant_change(old, &object, rt.status_subresource);
    if let Some(metadata) = metadata_mut(&mut object) {
        for owned in
            ["uid", "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds", "generation"]
        {
            match old.get("metadata").and_then(|m| m.get(owned)) {
                Some(value) => metadata.insert(owned.to_owned(), value.clone()),
                None => metadata.shift_remove(owned),
            };
        }
        if bump {
            let generation = metadata.get("generation").and_then(Value::as_i64).unwrap_or(0);
            metadata.insert("generation".to_owned(), Value::from(generation + 1));
        }
    }
    Ok(object)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::resource::builtin_types;

    fn pods() -> ResourceType {
        builtin_types().into_iter().find(|rt| rt.plural == "pods").expect("pods are built in")
    }

    #[test]
    fn names_are_checked_like_the_real_server() {
        let rt = pods();
        assert!(validate_name(&rt, "a-b.c1").is_empty());
        for bad in ["-a", "a-", "A", "a..b", "a_b", &"a".repeat(254)] {
            assert!(!validate_name(&rt, bad).is_empty(), "{bad}");
        }
        assert_eq!(
            validate_name(&rt, "")[0].to_string(),
            "metadata.name: Required value: name or generateName is required"
        );
        let generated = generate_name("pod-");
        assert!(
            generated.starts_with("pod-")
                && generated.len() == 9
                && validate_name(&rt, &generated).is_empty()
        );
        let uid = new_uid();
        assert_eq!((uid.len(), uid.matches('-').count(), &uid[14..15]), (36, 4, "4"));
        assert!(timestamp_now().ends_with('Z') && timestamp_now().len() == 20);
    }

    #[test]
    fn shape_checks_the_body_against_the_url() {
        let rt = pods();
        let shaped = shape(&rt, Some("ns"), json!({"metadata": {"name": "p"}})).expect("shaped");
        assert_eq!(
            shaped,
            json!({"metadata": {"name": "p", "namespace": "ns"}, "apiVersion": "v1", "kind": "Pod"})
        );
        assert!(shape(&rt, Some("ns"), json!({"kind": "Node"})).is_err());
        assert!(shape(&rt, Some("ns"), json!({"apiVersion": "v2"})).is_err());
        assert!(shape(&rt, Some("ns"), json!({"metadata": {"namespace": "other"}})).is_err());
        assert!(shape(&rt, Some("ns"), json!([1])).is_err());
    }
}
