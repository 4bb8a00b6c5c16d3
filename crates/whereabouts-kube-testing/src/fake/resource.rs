//! The resource types the fake serves: the built-in ones it starts with, and those that
//! CustomResourceDefinitions register. Type-specific behaviour (which types keep their status on a
//! main-resource write, which track `metadata.generation`, ...) is decided here, from [`Behaviour`].

use std::sync::Arc;

use serde_json::{Value, json};

use super::schema::Schema;

/// How objects are written in answers: whole, or as `PartialObjectMetadata` when the client asks
/// for it in `Accept` (kube's `get_metadata`, `list_metadata`, `watch_metadata`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Representation {
    Full,
    Metadata,
}

impl Representation {
    pub(crate) fn from_accept(accept: &str) -> Representation {
        if accept.contains("as=PartialObjectMetadata") {
            Representation::Metadata
        } else {
            Representation::Full
        }
    }
}

/// Where objects of a type are stored: every served version of a CRD shares one storage, as on a
/// real server (objects are converted between versions by rewriting `apiVersion`, the CRD `None`
/// conversion strategy).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct TypeKey {
    pub(crate) group: String,
    pub(crate) plural: String,
}

/// The per-type rules the fake models.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Behaviour {
    /// core/v1 namespaces: DNS-1123 label names, cascade deletion, `status.phase`.
    Namespace,
    /// core/v1 pods: status reset on create, graceful deletion once scheduled.
    Pod,
    /// apiextensions.k8s.io/v1 customresourcedefinitions: register and unregister resource types.
    CustomResourceDefinition,
    /// Any other built-in type: stored as sent.
    Plain,
    /// A custom resource, defined by the named CRD.
    Custom { crd: String },
}

/// One served group/version/resource.
#[derive(Debug, Clone)]
pub(crate) struct ResourceType {
    pub(crate) group: String,
    pub(crate) version: String,
    pub(crate) plural: String,
    pub(crate) singular: String,
    pub(crate) kind: String,
    pub(crate) list_kind: String,
    pub(crate) namespaced: bool,
    pub(crate) short_names: Vec<String>,
    /// Whether `/status` is served; then main-resource writes keep the stored `.status`.
    pub(crate) status_subresource: bool,
    /// The structural schema of this version (custom resources only).
    pub(crate) schema: Option<Arc<Schema>>,
    pub(crate) behaviour: Behaviour,
}

impl ResourceType {
    pub(crate) fn type_key(&self) -> TypeKey {
        TypeKey { group: self.group.clone(), plural: self.plural.clone() }
    }

    /// `v1` or `group/version`.
    pub(crate) fn api_version(&self) -> String {
        if self.group.is_empty() { self.version.clone() } else { format!("{}/{}", self.group, self.version) }
    }

    /// `pods` or `leases.coordination.k8s.io`, as error messages name a resource.
    pub(crate) fn qualified_resource(&self) -> String {
        if self.group.is_empty() { self.plural.clone() } else { format!("{}.{}", self.plural, self.group) }
    }

    pub(crate) fn is_custom(&self) -> bool {
        matches!(self.behaviour, Behaviour::Custom { .. })
    }

    /// Custom resources and CRDs count `metadata.generation` (bumped when anything but metadata and
    /// status changes) and refuse unconditional updates (a PUT without `resourceVersion`).
    pub(crate) fn is_apiextensions(&self) -> bool {
        matches!(self.behaviour, Behaviour::Custom { .. } | Behaviour::CustomResourceDefinition)
    }

    /// Whether a completed DELETE answers with the deleted object (else with a `Success` Status),
    /// as the real registries do.
    pub(crate) fn returns_deleted_object(&self) -> bool {
        !matches!(self.behaviour, Behaviour::Plain)
    }

    /// The object as served at this type's version.
    pub(crate) fn present(&self, stored: &Value) -> Value {
        let mut object = stored.clone();
        if let Some(map) = object.as_object_mut() {
            map.insert("apiVersion".to_owned(), Value::from(self.api_version()));
        }
        object
    }

    /// The object as an answer writes it.
    pub(crate) fn render(&self, stored: &Value, representation: Representation) -> Value {
        match representation {
            Representation::Full => self.present(stored),
            Representation::Metadata => json!({
                "kind": "PartialObjectMetadata",
                "apiVersion": "meta.k8s.io/v1",
                "metadata": stored.get("metadata").cloned().unwrap_or_else(|| json!({})),
            }),
        }
    }

    /// A list answer holding rendered `items`, at `resource_version`.
    pub(crate) fn render_list(
        &self,
        items: Vec<Value>,
        resource_version: u64,
        representation: Representation,
    ) -> Value {
        let (api_version, kind) = match representation {
            Representation::Full => (self.api_version(), self.list_kind.clone()),
            Representation::Metadata => ("meta.k8s.io/v1".to_owned(), "PartialObjectMetadataList".to_owned()),
        };
        json!({
            "apiVersion": api_version,
            "kind": kind,
            "metadata": {"resourceVersion": resource_version.to_string()},
            "items": items,
        })
    }
}

/// A built-in type: (apiVersion, plural, kind, namespaced, status subresource, behaviour, short names).
type BuiltinType = (&'static str, &'static str, &'static str, bool, bool, Behaviour, &'static [&'static str]);

/// The types served from the start.
pub(crate) fn builtin_types() -> Vec<ResourceType> {
    use Behaviour::{CustomResourceDefinition, Namespace, Plain, Pod};
    let table: [BuiltinType; 11] = [
        ("v1", "namespaces", "Namespace", false, true, Namespace, &["ns"]),
        ("apps/v1", "statefulsets", "StatefulSet", true, true, Plain, &["sts"]),
        ("v1", "pods", "Pod", true, true, Pod, &["po"]),
        ("v1", "nodes", "Node", false, true, Plain, &["no"]),
        ("v1", "events", "Event", true, false, Plain, &["ev"]),
        ("v1", "configmaps", "ConfigMap", true, false, Plain, &["cm"]),
        ("v1", "secrets", "Secret", true, false, Plain, &[]),
        ("v1", "serviceaccounts", "ServiceAccount", true, false, Plain, &["sa"]),
        ("coordination.k8s.io/v1", "leases", "Lease", true, false, Plain, &[]),
        ("events.k8s.io/v1", "events", "Event", true, false, Plain, &["ev"]),
        (
            "apiextensions.k8s.io/v1",
            "customresourcedefinitions",
            "CustomResourceDefinition",
            false,
            true,
            CustomResourceDefinition,
            &["crd", "crds"],
        ),
    ];
    table
        .into_iter()
        .map(|(api_version, plural, kind, namespaced, status_subresource, behaviour, short_names)| {
            let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
            ResourceType {
                group: group.to_owned(),
                version: version.to_owned(),
                plural: plural.to_owned(),
                singular: kind.to_lowercase(),
                kind: kind.to_owned(),
                list_kind: format!("{kind}List"),
                namespaced,
                short_names: short_names.iter().map(|s| (*s).to_owned()).collect(),
                status_subresource,
                schema: None,
                behaviour,
            }
        })
        .collect()
}
