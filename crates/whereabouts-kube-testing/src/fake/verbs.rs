//! Request handling: routing a request to discovery or to a resource verb (GET, LIST, WATCH, POST,
//! PUT, PATCH, DELETE, DELETE collection) and the semantics of each verb: preconditions, no-op
//! updates, finalizers, graceful pod deletion, namespace termination, dry runs.
//!
//! Every write runs through [`Shared::write`]: the object's write path is taken (and the modelled
//! latency spent) first, then the change is computed and committed in one go under the state lock.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::Request;
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::admission::{self, generate_name, timestamp_in};
use super::error::{ApiError, FieldError};
use super::locks::LockKey;
use super::patch::{self, Operation};
use super::path::{self, ObjectPath, Params, Route};
use super::resource::{Behaviour, Representation, ResourceType, TypeKey};
use super::select::Selector;
use super::store::{State, metadata_mut, metadata_str};
use super::watch::{self, Start, WatchRequest};
use super::{Shared, discovery};

/// The largest request body accepted.
const BODY_LIMIT: usize = 64 << 20;

/// Namespaces the real server refuses to delete.
const PROTECTED_NAMESPACES: [&str; 3] = ["default", "kube-system", "kube-public"];

/// A JSON answer.
pub(crate) fn json_response(code: StatusCode, body: &Value) -> Response {
    (code, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

/// Answers one request (the server's availability and statistics are handled by the caller).
pub(crate) async fn dispatch(shared: &Arc<Shared>, request: Request) -> Result<Response, ApiError> {
    let (parts, body) = request.into_parts();
    let route = path::route(parts.uri.path());
    let document = |document: Option<Value>| -> Result<Response, ApiError> {
        if parts.method != Method::GET {
            return Err(ApiError::method_not_allowed());
        }
        document.map(|document| json_response(StatusCode::OK, &document)).ok_or_else(ApiError::no_resource)
    };
    match route {
        Route::Version => document(Some(discovery::version())),
        Route::Health => Ok((StatusCode::OK, "ok").into_response()),
        Route::CoreVersions => document(Some(discovery::core_versions(&shared.address))),
        Route::Groups => document(Some(discovery::groups(&shared.state()))),
        Route::Group(group) => document(discovery::group(&shared.state(), &group)),
        Route::Resources { group, version } => {
            document(discovery::resources(&shared.state(), &group, &version))
        }
        Route::Object(object_path) => {
            let body = axum::body::to_bytes(body, BODY_LIMIT)
                .await
                .map_err(|e| ApiError::bad_request(format!("reading the request body: {e}")))?;
            let request =
                ResourceRequest::new(shared, object_path, Params::parse(&parts.uri), &parts.headers, body)?;
            request.run(&parts.method).await
        }
        Route::Unknown => Err(ApiError::no_resource()),
    }
}

/// The media type of a header, without parameters ("" when absent).
fn media_type(headers: &HeaderMap, name: header::HeaderName) -> String {
    let value = headers.get(name).and_then(|value| value.to_str().ok()).unwrap_or_default();
    value.split(';').next().unwrap_or_default().trim().to_ascii_lowercase()
}

/// The kinds of PATCH.
#[derive(Debug)]
enum PatchDocument {
    /// RFC 6902.
    Json(Vec<Operation>),
    /// RFC 7386; also used for strategic merge patches (see the `fake` module documentation).
    Merge(Value),
    /// Server-side apply, modelled as create-or-merge.
    Apply(Value),
}

/// DELETE options, from the body (`DeleteOptions`) and the query.
#[derive(Debug)]
struct DeleteOptions {
    uid: Option<String>,
    resource_version: Option<String>,
    grace_period_seconds: Option<i64>,
    dry_run: bool,
}

/// What a DELETE did to one object.
#[derive(Debug)]
enum Deletion {
    /// Deletion pending (finalizers, graceful pod deletion, namespace termination): the object now
    /// carries a deletionTimestamp.
    Pending(Arc<Value>),
    /// Removed; the last stored state.
    Removed(Arc<Value>),
}

/// A request for a collection, an object or its status.
struct ResourceRequest<'a> {
    shared: &'a Arc<Shared>,
    rt: Arc<ResourceType>,
    namespace: Option<String>,
    name: Option<String>,
    /// The `/status` subresource.
    status: bool,
    params: Params,
    content_type: String,
    representation: Representation,
    body: Bytes,
}

impl<'a> ResourceRequest<'a> {
    fn new(
        shared: &'a Arc<Shared>,
        path: ObjectPath,
        params: Params,
        headers: &HeaderMap,
        body: Bytes,
    ) -> Result<ResourceRequest<'a>, ApiError> {
        let rt = shared
            .state()
            .resolve(&path.group, &path.version, &path.plural)
            .ok_or_else(ApiError::no_resource)?;
        // A cluster-scoped type has no namespaced paths; a namespaced object needs its namespace.
        if matches!((rt.namespaced, &path.namespace, &path.name), (false, Some(_), _) | (true, None, Some(_)))
        {
            return Err(ApiError::no_resource());
        }
        let status = match path.subresource.as_deref() {
            None => false,
            Some("status") if rt.status_subresource => true,
            Some(_) => return Err(ApiError::no_resource()),
        };
        let accept = headers.get(header::ACCEPT).and_then(|value| value.to_str().ok()).unwrap_or_default();
        Ok(ResourceRequest {
            shared,
            rt,
            namespace: path.namespace,
            name: path.name,
            status,
            params,
            content_type: media_type(headers, header::CONTENT_TYPE),
            representation: Representation::from_accept(accept),
            body,
        })
    }

    async fn run(self, method: &Method) -> Result<Response, ApiError> {
        let namespace_given = self.namespace.is_some() || !self.rt.namespaced;
        match (method, self.name.is_some()) {
            (&Method::GET, false) if self.params.flag("watch") => self.watch(),
            (&Method::GET, false) => self.list(),
            (&Method::GET, true) => self.get(),
            (&Method::POST, false) if namespace_given => self.create().await,
            (&Method::PUT, true) => self.replace().await,
            (&Method::PATCH, true) => self.patch().await,
            (&Method::DELETE, true) if !self.status => self.delete().await,
            (&Method::DELETE, false) if namespace_given => self.delete_collection().await,
            _ => Err(ApiError::method_not_allowed()),
        }
    }

    /// The namespace part of stored keys ("" for cluster-scoped types).
    fn namespace_key(&self) -> &str {
        self.namespace.as_deref().unwrap_or_default()
    }

    fn name(&self) -> &str {
        self.name.as_deref().unwrap_or_default()
    }

    fn lock_key(&self, name: &str) -> LockKey {
        (self.rt.type_key(), self.namespace_key().to_owned(), name.to_owned())
    }

    fn dry_run(&self) -> bool {
        self.params.dry_run()
    }

    fn selector(&self) -> Result<Selector, ApiError> {
        Selector::parse(self.params.get("labelSelector"), self.params.get("fieldSelector"))
            .map_err(ApiError::bad_request)
    }

    fn respond(&self, code: StatusCode, object: &Value) -> Response {
        json_response(code, &self.rt.render(object, self.representation))
    }

    /// The type as currently registered (a CRD may have changed or gone since the request began).
    fn current(&self, state: &State) -> Result<Arc<ResourceType>, ApiError> {
        state.resolve(&self.rt.group, &self.rt.version, &self.rt.plural).ok_or_else(ApiError::no_resource)
    }

    /// The stored object named by the URL, at the URL's version.
    fn stored(&self, state: &State, rt: &ResourceType) -> Result<Value, ApiError> {
        state
            .get(&rt.type_key(), self.namespace_key(), self.name())
            .map(|object| rt.present(object))
            .ok_or_else(|| ApiError::not_found(rt, self.name()))
    }

    /// A POST or PUT body: JSON, or YAML for `application/yaml`.
    fn body_object(&self) -> Result<Value, ApiError> {
        match self.content_type.as_str() {
            "" | "application/json" => serde_json::from_slice(&self.body)
                .map_err(|e| ApiError::bad_request(format!("the body is not valid JSON: {e}"))),
            "application/yaml" => self.yaml_body(),
            other => Err(ApiError::unsupported_media_type(other, "application/json, application/yaml")),
        }
    }

    /// A YAML body; JSON (which clients usually send) is read as such, faster and exactly.
    fn yaml_body(&self) -> Result<Value, ApiError> {
        serde_json::from_slice(&self.body).or_else(|_| {
            serde_saphyr::from_slice(&self.body)
                .map_err(|e| ApiError::bad_request(format!("the body is not valid YAML: {e}")))
        })
    }

    fn get(&self) -> Result<Response, ApiError> {
        let object = self
            .shared
            .state()
            .get(&self.rt.type_key(), self.namespace_key(), self.name())
            .cloned()
            .ok_or_else(|| ApiError::not_found(&self.rt, self.name()))?;
        Ok(self.respond(StatusCode::OK, &object))
    }

    fn list(&self) -> Result<Response, ApiError> {
        let selector = self.selector()?;
        let (objects, resource_version) = {
            let state = self.shared.state();
            (state.list(&self.rt.type_key(), self.namespace.as_deref()), state.resource_version())
        };
        let items = objects
            .iter()
            .filter(|object| selector.matches(object))
            .map(|object| self.rt.render(object, self.representation))
            .collect();
        Ok(json_response(StatusCode::OK, &self.rt.render_list(items, resource_version, self.representation)))
    }

    fn watch(&self) -> Result<Response, ApiError> {
        let initial_events_end = self.params.flag("sendInitialEvents");
        let start = match self.params.get("resourceVersion") {
            _ if initial_events_end => Start::Snapshot,
            None | Some("" | "0") => Start::Snapshot,
            Some(resource_version) => Start::After(resource_version.parse().map_err(|_| {
                ApiError::bad_request(format!("invalid resource version: {resource_version}"))
            })?),
        };
        let timeout = match self.params.get("timeoutSeconds") {
            None => None,
            Some(seconds) => Some(Duration::from_secs(
                seconds
                    .parse()
                    .map_err(|_| ApiError::bad_request(format!("invalid timeoutSeconds: {seconds}")))?,
            )),
        };
        Ok(watch::start(
            self.shared,
            WatchRequest {
                rt: self.rt.clone(),
                namespace: self.namespace.clone(),
                selector: self.selector()?,
                representation: self.representation,
                start,
                initial_events_end,
                bookmarks: self.params.flag("allowWatchBookmarks"),
                timeout,
            },
        ))
    }

    /// Admits and stores a new object (POST, or an apply that creates).
    fn insert(
        &self,
        state: &mut State,
        rt: &ResourceType,
        object: Value,
        dry_run: bool,
    ) -> Result<Arc<Value>, ApiError> {
        let name = metadata_str(&object, "name").to_owned();
        if let Some(namespace) = &self.namespace {
            let terminating = match state.namespace(namespace) {
                None => return Err(ApiError::namespace_not_found(namespace)),
                Some(found) => found.pointer("/metadata/deletionTimestamp").is_some(),
            };
            if terminating {
                return Err(ApiError::forbidden(
                    rt,
                    &name,
                    &format!(
                        "unable to create new content in namespace {namespace} because it is being terminated"
                    ),
                ));
            }
        }
        let object = admission::prepare_create(rt, object)?;
        if state.get(&rt.type_key(), self.namespace_key(), &name).is_some() {
            return Err(ApiError::already_exists(rt, &name));
        }
        Ok(if dry_run { Arc::new(object) } else { state.put(rt, object) })
    }

    async fn create(&self) -> Result<Response, ApiError> {
        let mut object = admission::shape(&self.rt, self.namespace.as_deref(), self.body_object()?)?;
        let name = match (metadata_str(&object, "name"), metadata_str(&object, "generateName")) {
            ("", "") => String::new(),
            ("", prefix) => generate_name(prefix),
            (name, _) => name.to_owned(),
        };
        if let Some(metadata) = metadata_mut(&mut object) {
            metadata.insert("name".to_owned(), Value::from(name.clone()));
        }
        let dry_run = self.dry_run();
        let stored = self
            .shared
            .write(Some(self.lock_key(&name)), |state| {
                let rt = self.current(state)?;
                self.insert(state, &rt, object, dry_run)
            })
            .await?;
        Ok(self.respond(StatusCode::CREATED, &stored))
    }

    /// The name in a written body must be the URL's (400 otherwise, as `checkName` answers).
    fn check_name(&self, object: &Value) -> Result<(), ApiError> {
        match metadata_str(object, "name") {
            name if name == self.name() => Ok(()),
            name => Err(ApiError::bad_request(format!(
                "the name of the object ({name}) does not match the name on the URL ({})",
                self.name()
            ))),
        }
    }

    /// Stores the admitted update `new` of `old` (both at the URL's version) unless it changes
    /// nothing; removes the object instead when the update drops the last finalizer of an object
    /// being deleted.
    fn commit_update(
        &self,
        state: &mut State,
        rt: &ResourceType,
        old: &Value,
        mut new: Value,
        dry_run: bool,
    ) -> Arc<Value> {
        if let Some(metadata) = metadata_mut(&mut new) {
            metadata.insert("resourceVersion".to_owned(), Value::from(metadata_str(old, "resourceVersion")));
        }
        if new == *old || dry_run {
            return Arc::new(new);
        }
        let finalizers = |object: &Value| {
            object
                .pointer("/metadata/finalizers")
                .and_then(Value::as_array)
                .is_some_and(|list| !list.is_empty())
        };
        let grace = old.pointer("/metadata/deletionGracePeriodSeconds").and_then(Value::as_i64).unwrap_or(0);
        let finalized = old.pointer("/metadata/deletionTimestamp").is_some()
            && finalizers(old)
            && !finalizers(&new)
            && grace == 0;
        if finalized && let Some(removed) = state.remove(&rt.type_key(), self.namespace_key(), self.name()) {
            return removed;
        }
        state.put(rt, new)
    }

    async fn replace(&self) -> Result<Response, ApiError> {
        let object = admission::shape(&self.rt, self.namespace.as_deref(), self.body_object()?)?;
        self.check_name(&object)?;
        let dry_run = self.dry_run();
        let stored = self
            .shared
            .write(Some(self.lock_key(self.name())), |state| {
                let rt = self.current(state)?;
                let old = self.stored(state, &rt)?;
                match metadata_str(&object, "resourceVersion") {
                    "" if rt.is_apiextensions() => {
                        return Err(ApiError::invalid_object(
                            &rt,
                            self.name(),
                            vec![FieldError::invalid(
                                "metadata.resourceVersion",
                                "0x0",
                                "must be specified for an update",
                            )],
                        ));
                    }
                    "" => {}
                    given if given != metadata_str(&old, "resourceVersion") => {
                        return Err(ApiError::stale(&rt, self.name()));
                    }
                    _ => {}
                }
                let (given_uid, stored_uid) = (metadata_str(&object, "uid"), metadata_str(&old, "uid"));
                if !given_uid.is_empty() && given_uid != stored_uid {
                    return Err(ApiError::conflict(
                        &rt,
                        self.name(),
                        &format!(
                            "Precondition failed: UID in precondition: {given_uid}, UID in object meta: {stored_uid}"
                        ),
                    ));
                }
                let new = admission::prepare_update(&rt, &old, object, self.status)?;
                Ok(self.commit_update(state, &rt, &old, new, dry_run))
            })
            .await?;
        Ok(self.respond(StatusCode::OK, &stored))
    }

    fn patch_document(&self) -> Result<PatchDocument, ApiError> {
        let object = |value: Value| {
            if value.is_object() {
                Ok(value)
            } else {
                Err(ApiError::bad_request("the patch must be a JSON object"))
            }
        };
        match self.content_type.as_str() {
            "application/json-patch+json" => {
                patch::decode_json_patch(&self.body).map(PatchDocument::Json).map_err(ApiError::bad_request)
            }
            "application/merge-patch+json" => self.merge_document(),
            "application/strategic-merge-patch+json" if !self.rt.is_custom() => self.merge_document(),
            "application/apply-patch+yaml" => {
                if self.params.get("fieldManager").unwrap_or_default().is_empty() {
                    return Err(ApiError::invalid(
                        "meta.k8s.io",
                        "PatchOptions",
                        "",
                        vec![FieldError::required("fieldManager", "is required for apply patch")],
                    ));
                }
                self.yaml_body().and_then(object).map(PatchDocument::Apply)
            }
            other => {
                let strategic =
                    if self.rt.is_custom() { "" } else { "application/strategic-merge-patch+json, " };
                Err(ApiError::unsupported_media_type(
                    other,
                    &format!(
                        "application/json-patch+json, application/merge-patch+json, {strategic}application/apply-patch+yaml"
                    ),
                ))
            }
        }
    }

    fn merge_document(&self) -> Result<PatchDocument, ApiError> {
        match serde_json::from_slice::<Value>(&self.body) {
            Ok(document @ Value::Object(_)) => Ok(PatchDocument::Merge(document)),
            Ok(_) => Err(ApiError::bad_request("invalid JSON merge patch: the patch must be a JSON object")),
            Err(e) => Err(ApiError::bad_request(format!("error decoding patch: {e}"))),
        }
    }

    async fn patch(&self) -> Result<Response, ApiError> {
        let document = self.patch_document()?;
        let dry_run = self.dry_run();
        let (code, stored) = self
            .shared
            .write(Some(self.lock_key(self.name())), |state| {
                let rt = self.current(state)?;
                let old = match (self.stored(state, &rt), &document) {
                    (Ok(old), _) => old,
                    (Err(_), PatchDocument::Apply(applied)) if !self.status => {
                        let mut object = admission::shape(&rt, self.namespace.as_deref(), applied.clone())?;
                        if let Some(metadata) = metadata_mut(&mut object) {
                            metadata.entry("name").or_insert_with(|| Value::from(self.name()));
                        }
                        self.check_name(&object)?;
                        return Ok((StatusCode::CREATED, self.insert(state, &rt, object, dry_run)?));
                    }
                    (Err(not_found), _) => return Err(not_found),
                };
                let mut patched = old.clone();
                match &document {
                    PatchDocument::Json(operations) => {
                        patch::apply_json_patch(&mut patched, operations).map_err(|reason| {
                            tracing::debug!(%reason, "JSON patch does not apply");
                            ApiError::patch_not_applicable()
                        })?;
                    }
                    PatchDocument::Merge(merge) | PatchDocument::Apply(merge) => {
                        patch::merge_patch(&mut patched, merge)
                    }
                }
                let patched = admission::shape(&rt, self.namespace.as_deref(), patched)?;
                self.check_name(&patched)?;
                let given = metadata_str(&patched, "resourceVersion");
                if !given.is_empty() && given != metadata_str(&old, "resourceVersion") {
                    return Err(ApiError::stale(&rt, self.name()));
                }
                let (given_uid, stored_uid) = (metadata_str(&patched, "uid"), metadata_str(&old, "uid"));
                if !given_uid.is_empty() && given_uid != stored_uid {
                    return Err(ApiError::invalid_object(
                        &rt,
                        self.name(),
                        vec![FieldError::invalid(
                            "metadata.uid",
                            &json!(given_uid).to_string(),
                            "field is immutable",
                        )],
                    ));
                }
                let new = admission::prepare_update(&rt, &old, patched, self.status)?;
                Ok((StatusCode::OK, self.commit_update(state, &rt, &old, new, dry_run)))
            })
            .await?;
        Ok(self.respond(code, &stored))
    }

    fn delete_options(&self) -> Result<DeleteOptions, ApiError> {
        let body: Value = if self.body.iter().all(u8::is_ascii_whitespace) {
            json!({})
        } else {
            serde_json::from_slice(&self.body).map_err(|e| {
                ApiError::bad_request(format!("the DeleteOptions body is not valid JSON: {e}"))
            })?
        };
        let text = |pointer: &str| body.pointer(pointer).and_then(Value::as_str).map(str::to_owned);
        let grace_in_query = match self.params.get("gracePeriodSeconds") {
            None => None,
            Some(seconds) => Some(
                seconds
                    .parse()
                    .map_err(|_| ApiError::bad_request(format!("invalid gracePeriodSeconds: {seconds}")))?,
            ),
        };
        Ok(DeleteOptions {
            uid: text("/preconditions/uid"),
            resource_version: text("/preconditions/resourceVersion"),
            grace_period_seconds: body.get("gracePeriodSeconds").and_then(Value::as_i64).or(grace_in_query),
            dry_run: self.dry_run()
                || body
                    .get("dryRun")
                    .and_then(Value::as_array)
                    .is_some_and(|modes| modes.contains(&json!("All"))),
        })
    }

    /// Deletes one object: checks the preconditions, then either marks it as being deleted (pending
    /// finalizers, a graceful pod deletion, a terminating namespace) or removes it.
    fn delete_one(
        state: &mut State,
        rt: &ResourceType,
        namespace: &str,
        name: &str,
        options: &DeleteOptions,
    ) -> Result<Deletion, ApiError> {
        let old = state
            .get(&rt.type_key(), namespace, name)
            .cloned()
            .ok_or_else(|| ApiError::not_found(rt, name))?;
        let failed = |what: &str, wanted: &str, actual: &str| {
            ApiError::conflict(
                rt,
                name,
                &format!(
                    "Precondition failed: {what} in precondition: {wanted}, {what} in object meta: {actual}"
                ),
            )
        };
        if let Some(uid) = options.uid.as_deref().filter(|uid| *uid != metadata_str(&old, "uid")) {
            return Err(failed("UID", uid, metadata_str(&old, "uid")));
        }
        if let Some(version) = options
            .resource_version
            .as_deref()
            .filter(|version| *version != metadata_str(&old, "resourceVersion"))
        {
            return Err(failed("ResourceVersion", version, metadata_str(&old, "resourceVersion")));
        }
        if rt.behaviour == Behaviour::Namespace && PROTECTED_NAMESPACES.contains(&name) {
            return Err(ApiError::forbidden(rt, name, "this namespace may not be deleted"));
        }
        let grace = match rt.behaviour {
            Behaviour::Pod => pod_grace_period(&old, options),
            _ => 0,
        };
        let finalizers = old
            .pointer("/metadata/finalizers")
            .and_then(Value::as_array)
            .is_some_and(|list| !list.is_empty());
        let namespace_terminates = rt.behaviour == Behaviour::Namespace;
        if grace == 0 && !finalizers && !namespace_terminates {
            return Ok(Deletion::Removed(if options.dry_run {
                old
            } else {
                state.remove(&rt.type_key(), namespace, name).unwrap_or(old)
            }));
        }
        let mut marked = rt.present(&old);
        let current_grace = old.pointer("/metadata/deletionGracePeriodSeconds").and_then(Value::as_i64);
        let already_sooner = old.pointer("/metadata/deletionTimestamp").is_some()
            && current_grace.is_some_and(|current| current <= grace);
        if let Some(metadata) = metadata_mut(&mut marked)
            && !already_sooner
        {
            metadata.insert("deletionTimestamp".to_owned(), Value::from(timestamp_in(grace)));
            metadata.insert("deletionGracePeriodSeconds".to_owned(), Value::from(grace));
        }
        if namespace_terminates {
            marked["status"] = json!({"phase": "Terminating"});
        }
        let unchanged = marked == rt.present(&old);
        Ok(Deletion::Pending(if options.dry_run || unchanged {
            Arc::new(marked)
        } else {
            state.put(rt, marked)
        }))
    }

    /// Answers a completed deletion: the object, or a `Success` Status for types whose registry does
    /// not return deleted objects.
    fn deletion_response(&self, deletion: &Deletion) -> Response {
        match deletion {
            Deletion::Removed(object) if !self.rt.returns_deleted_object() => {
                let mut details = json!({"name": metadata_str(object, "name"), "kind": self.rt.plural});
                if !self.rt.group.is_empty() {
                    details["group"] = json!(self.rt.group);
                }
                details["uid"] = json!(metadata_str(object, "uid"));
                json_response(
                    StatusCode::OK,
                    &json!({
                        "kind": "Status",
                        "apiVersion": "v1",
                        "metadata": {},
                        "status": "Success",
                        "details": details,
                    }),
                )
            }
            Deletion::Removed(object) | Deletion::Pending(object) => self.respond(StatusCode::OK, object),
        }
    }

    /// Removes a terminating namespace's contents, then the namespace itself (unless metadata
    /// finalizers hold it), in the background as the namespace controller does.
    fn finish_namespace(&self, name: &str) {
        let shared = self.shared.clone();
        let name = name.to_owned();
        tokio::spawn(async move {
            let mut state = shared.state();
            let Some(namespace) = state.namespace(&name).cloned() else { return };
            if namespace.pointer("/metadata/deletionTimestamp").is_none() {
                return;
            }
            state.remove_contents(&name);
            let held = namespace
                .pointer("/metadata/finalizers")
                .and_then(Value::as_array)
                .is_some_and(|l| !l.is_empty());
            if !held {
                let type_key = TypeKey { group: String::new(), plural: "namespaces".to_owned() };
                state.remove(&type_key, "", &name);
            }
        });
    }

    async fn delete(&self) -> Result<Response, ApiError> {
        let options = self.delete_options()?;
        let deletion = self
            .shared
            .write(Some(self.lock_key(self.name())), |state| {
                let rt = self.current(state)?;
                Self::delete_one(state, &rt, self.namespace_key(), self.name(), &options)
            })
            .await?;
        if self.rt.behaviour == Behaviour::Namespace && !options.dry_run {
            self.finish_namespace(self.name());
        }
        Ok(self.deletion_response(&deletion))
    }

    async fn delete_collection(&self) -> Result<Response, ApiError> {
        let options = self.delete_options()?;
        let selector = self.selector()?;
        let deletions = self
            .shared
            .write(None, |state| {
                let rt = self.current(state)?;
                let matching: Vec<Arc<Value>> = state
                    .list(&rt.type_key(), self.namespace.as_deref())
                    .into_iter()
                    .filter(|object| selector.matches(object))
                    .collect();
                matching
                    .iter()
                    .map(|object| {
                        let (namespace, name) =
                            (metadata_str(object, "namespace"), metadata_str(object, "name"));
                        Self::delete_one(state, &rt, namespace, name, &options).map(|d| (name.to_owned(), d))
                    })
                    .collect::<Result<Vec<_>, _>>()
            })
            .await?;
        let mut items = Vec::with_capacity(deletions.len());
        for (name, deletion) in deletions {
            if self.rt.behaviour == Behaviour::Namespace && !options.dry_run {
                self.finish_namespace(&name);
            }
            let (Deletion::Removed(object) | Deletion::Pending(object)) = deletion;
            items.push(self.rt.render(&object, self.representation));
        }
        let resource_version = self.shared.state().resource_version();
        Ok(json_response(StatusCode::OK, &self.rt.render_list(items, resource_version, self.representation)))
    }
}

/// The grace period of a pod deletion: none for pods that are not scheduled or have finished (as the
/// real pod strategy decides), else the DeleteOptions', the pod's, or 30 s.
fn pod_grace_period(pod: &Value, options: &DeleteOptions) -> i64 {
    let scheduled = !pod.pointer("/spec/nodeName").and_then(Value::as_str).unwrap_or_default().is_empty();
    let finished =
        matches!(pod.pointer("/status/phase").and_then(Value::as_str), Some("Succeeded" | "Failed"));
    if !scheduled || finished {
        return 0;
    }
    options
        .grace_period_seconds
        .or_else(|| pod.pointer("/spec/terminationGracePeriodSeconds").and_then(Value::as_i64))
        .unwrap_or(30)
        .max(0)
}

impl Shared {
    /// Runs one write: takes the object's write path (if any), computes and commits the change under
    /// the state lock, then, if something was stored, spends the modelled storage latency before
    /// answering and releasing the write path. A refused write (a failed JSON Patch `test`, a stale
    /// resourceVersion) costs no storage round trip, as on a real server, which checks against the
    /// object it holds before it writes to etcd.
    async fn write<T>(
        &self,
        lock: Option<LockKey>,
        change: impl FnOnce(&mut State) -> Result<T, ApiError>,
    ) -> Result<T, ApiError> {
        let _write_path = match lock {
            Some(key) => Some(self.locks.lock(key).await),
            None => None,
        };
        let (result, stored) = {
            let mut state = self.state();
            let before = state.resource_version();
            let result = change(&mut state);
            let stored = state.resource_version() != before;
            (result, stored.then(|| self.options.stored_write_latency(|| state.last_stored_size())))
        };
        if let Some(latency) = stored.filter(|latency| !latency.is_zero()) {
            tokio::time::sleep(latency).await;
        }
        result
    }
}
