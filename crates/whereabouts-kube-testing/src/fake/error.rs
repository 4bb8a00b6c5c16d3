//! Failures as the API server reports them: `Status` objects with the matching HTTP code, and the
//! per-field errors (`details.causes`) that an `Invalid` (422) answer carries.
//!
//! The wording follows k8s.io/apimachinery (`NewNotFound`, `NewConflict`, `NewInvalid`, ...), so that
//! a test asserting on a message or reason behaves the same against the fake and a real cluster.

use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use super::resource::ResourceType;

/// An API failure, rendered as a `Status` object.
#[derive(Debug, Clone)]
pub(crate) struct ApiError {
    code: StatusCode,
    reason: &'static str,
    message: String,
    details: Map<String, Value>,
}

impl ApiError {
    fn new(code: StatusCode, reason: &'static str, message: String) -> ApiError {
        ApiError { code, reason, message, details: Map::new() }
    }

    /// Adds `details.{name,group,kind}` the way apimachinery does (empty values are left out).
    fn with_details(mut self, name: &str, group: &str, kind: &str) -> ApiError {
        for (key, value) in [("name", name), ("group", group), ("kind", kind)] {
            if !value.is_empty() {
                self.details.insert(key.to_owned(), Value::from(value));
            }
        }
        self
    }

    /// `pods "x" not found`.
    pub(crate) fn not_found(rt: &ResourceType, name: &str) -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("{} \"{name}\" not found", rt.qualified_resource()),
        )
        .with_details(name, &rt.group, &rt.plural)
    }

    /// `namespaces "x" not found`: a namespaced write into a namespace that does not exist.
    pub(crate) fn namespace_not_found(namespace: &str) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "NotFound", format!("namespaces \"{namespace}\" not found"))
            .with_details(namespace, "", "namespaces")
    }

    /// A path that names no served resource (for instance a custom resource before its CRD exists).
    pub(crate) fn no_resource() -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource".to_owned(),
        )
    }

    /// `pods "x" already exists`.
    pub(crate) fn already_exists(rt: &ResourceType, name: &str) -> ApiError {
        ApiError::new(
            StatusCode::CONFLICT,
            "AlreadyExists",
            format!("{} \"{name}\" already exists", rt.qualified_resource()),
        )
        .with_details(name, &rt.group, &rt.plural)
    }

    /// `Operation cannot be fulfilled on pods "x": <detail>`.
    pub(crate) fn conflict(rt: &ResourceType, name: &str, detail: &str) -> ApiError {
        ApiError::new(
            StatusCode::CONFLICT,
            "Conflict",
            format!("Operation cannot be fulfilled on {} \"{name}\": {detail}", rt.qualified_resource()),
        )
        .with_details(name, &rt.group, &rt.plural)
    }

    /// The optimistic-concurrency conflict: the write carried a stale `resourceVersion`.
    pub(crate) fn stale(rt: &ResourceType, name: &str) -> ApiError {
        ApiError::conflict(
            rt,
            name,
            "the object has been modified; please apply your changes to the latest version and try again",
        )
    }

    /// `Kind.group "name" is invalid: field: error` (or `[e1, e2]` for several), with one cause each.
    pub(crate) fn invalid(group: &str, kind: &str, name: &str, errors: Vec<FieldError>) -> ApiError {
        let qualified_kind = if group.is_empty() { kind.to_owned() } else { format!("{kind}.{group}") };
        let rendered: Vec<String> = errors.iter().map(FieldError::to_string).collect();
        let summary = match rendered.as_slice() {
            [one] => one.clone(),
            many => format!("[{}]", many.join(", ")),
        };
        let causes: Vec<Value> =
            errors.iter().map(|e| json!({"reason": e.reason, "message": e.body, "field": e.field})).collect();
        let mut error = ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            format!("{qualified_kind} \"{name}\" is invalid: {summary}"),
        )
        .with_details(name, group, kind);
        error.details.insert("causes".to_owned(), Value::Array(causes));
        error
    }

    /// An invalid object of resource type `rt`. It names the group of the type the real server
    /// validates: events.k8s.io Events are core Events inside, so their answers say `Event "x"`.
    pub(crate) fn invalid_object(rt: &ResourceType, name: &str, errors: Vec<FieldError>) -> ApiError {
        let group = if rt.group == "events.k8s.io" { "" } else { rt.group.as_str() };
        ApiError::invalid(group, &rt.kind, name, errors)
    }

    /// A JSON patch that could not be applied. The real server answers these through
    /// `NewGenericServerResponse(422, ...)`, which keeps only this generic message (the json-patch
    /// library's text, such as "testing value /x failed", is not part of the answer).
    pub(crate) fn patch_not_applicable() -> ApiError {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            "the server rejected our request due to an error in our request".to_owned(),
        )
    }

    pub(crate) fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "BadRequest", message.into())
    }

    pub(crate) fn forbidden(rt: &ResourceType, name: &str, detail: &str) -> ApiError {
        ApiError::new(
            StatusCode::FORBIDDEN,
            "Forbidden",
            format!("{} \"{name}\" is forbidden: {detail}", rt.qualified_resource()),
        )
        .with_details(name, &rt.group, &rt.plural)
    }

    pub(crate) fn method_not_allowed() -> ApiError {
        ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource".to_owned(),
        )
    }

    pub(crate) fn unsupported_media_type(content_type: &str, accepted: &str) -> ApiError {
        ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format ({content_type}) - accepted media types include: {accepted}"
            ),
        )
    }

    pub(crate) fn unavailable() -> ApiError {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceUnavailable",
            "the server is currently unable to handle the request".to_owned(),
        )
    }

    /// What a watch from a compacted-away resourceVersion gets (as an ERROR event).
    pub(crate) fn expired(requested: u64, oldest: u64) -> ApiError {
        ApiError::new(
            StatusCode::GONE,
            "Expired",
            format!("too old resource version: {requested} ({oldest})"),
        )
    }

    /// The `Status` object.
    pub(crate) fn status(&self) -> Value {
        json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "details": self.details,
            "code": self.code.as_u16(),
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (code, reason) = (self.code.as_u16(), self.reason);
        tracing::debug!(code, reason, message = %self.message, "request failed");
        (self.code, [(header::CONTENT_TYPE, "application/json")], self.status().to_string()).into_response()
    }
}

/// One field error of an `Invalid` answer (k8s.io/apimachinery `field.Error`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FieldError {
    /// The dotted field path, e.g. `spec.allocations.5.id`.
    pub(crate) field: String,
    /// The cause type, e.g. `FieldValueRequired`.
    pub(crate) reason: &'static str,
    /// What is wrong, e.g. `Required value` or `Invalid value: "x": ...`.
    pub(crate) body: String,
}

impl FieldError {
    pub(crate) fn required(field: &str, detail: &str) -> FieldError {
        let body =
            if detail.is_empty() { "Required value".to_owned() } else { format!("Required value: {detail}") };
        FieldError { field: field.to_owned(), reason: "FieldValueRequired", body }
    }

    /// `Invalid value: <value>: <detail>`; `value` is already rendered (see [`render_value`]).
    pub(crate) fn invalid(field: &str, value: &str, detail: &str) -> FieldError {
        FieldError {
            field: field.to_owned(),
            reason: "FieldValueInvalid",
            body: format!("Invalid value: {value}: {detail}"),
        }
    }

    /// `Duplicate value: <value>`; `value` is already rendered.
    pub(crate) fn duplicate(field: &str, value: &str) -> FieldError {
        FieldError {
            field: field.to_owned(),
            reason: "FieldValueDuplicate",
            body: format!("Duplicate value: {value}"),
        }
    }

    pub(crate) fn not_supported(field: &str, value: &Value, supported: &[Value]) -> FieldError {
        let supported: Vec<String> = supported.iter().map(render_value).collect();
        FieldError {
            field: field.to_owned(),
            reason: "FieldValueNotSupported",
            body: format!(
                "Unsupported value: {}: supported values: {}",
                render_value(value),
                supported.join(", ")
            ),
        }
    }

    pub(crate) fn too_long(field: &str, max: u64) -> FieldError {
        FieldError {
            field: field.to_owned(),
            reason: "FieldValueTooLong",
            body: format!("Too long: may not be more than {max} bytes"),
        }
    }

    pub(crate) fn too_many(field: &str, actual: usize, max: u64) -> FieldError {
        FieldError {
            field: field.to_owned(),
            reason: "FieldValueTooMany",
            body: format!("Too many: {actual}: must have at most {max} items"),
        }
    }
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.field.is_empty() {
            f.write_str(&self.body)
        } else {
            write!(f, "{}: {}", self.field, self.body)
        }
    }
}

/// Renders a value inside a field error as Go's `%#v` would for the decoded JSON: strings quoted,
/// numbers and booleans bare.
pub(crate) fn render_value(value: &Value) -> String {
    value.to_string()
}
