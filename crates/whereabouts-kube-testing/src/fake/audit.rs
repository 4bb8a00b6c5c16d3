//! The request log: who asked for what, in the terms of Kubernetes authorisation (verb, API group,
//! resource, namespace), so that tests can hold RBAC rules against what components really call.
//!
//! Requests are recorded once per distinct (user, verb, group, version, resource, subresource,
//! namespace) with a count, so the log stays small however many requests a benchmark makes.

use std::collections::HashMap;

use axum::http::{HeaderMap, Method, Uri, header};

use super::path::{self, Params, Route};

/// One kind of request a [`super::FakeApiServer`] answered, with how often it came.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RecordedRequest {
    /// The bearer token the client sent ("" without one): the fake authenticates nobody, so tests tell
    /// components apart by giving each its own token.
    pub user: String,
    /// The authorisation verb: `get`, `list`, `watch`, `create`, `update`, `patch`, `delete` or
    /// `deletecollection`.
    pub verb: String,
    /// The API group ("" for the core group).
    pub group: String,
    pub version: String,
    /// The resource's plural (`pods`, `ippools`).
    pub resource: String,
    /// `status` and the like; `None` for the object itself.
    pub subresource: Option<String>,
    /// `None` for cluster-scoped resources and for requests across all namespaces.
    pub namespace: Option<String>,
    /// How many such requests came (filled in by [`super::FakeApiServer::requests`]).
    pub count: u64,
}

/// The distinct requests in the order first seen.
#[derive(Debug, Default)]
pub(crate) struct RequestLog {
    order: Vec<RecordedRequest>,
    index: HashMap<RecordedRequest, usize>,
}

impl RequestLog {
    /// Records a request to a resource; discovery and health requests are not resource requests and
    /// are not recorded (RBAC grants them to every authenticated user).
    pub(crate) fn record(&mut self, method: &Method, uri: &Uri, headers: &HeaderMap) {
        let Route::Object(object) = path::route(uri.path()) else { return };
        let params = Params::parse(uri);
        let verb = match *method {
            Method::GET if params.flag("watch") => "watch",
            Method::GET if object.name.is_some() => "get",
            Method::GET => "list",
            Method::POST => "create",
            Method::PUT => "update",
            Method::PATCH => "patch",
            Method::DELETE if object.name.is_some() => "delete",
            Method::DELETE => "deletecollection",
            _ => return,
        };
        let user = headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
            .unwrap_or_default();
        let key = RecordedRequest {
            user: user.to_owned(),
            verb: verb.to_owned(),
            group: object.group,
            version: object.version,
            resource: object.plural,
            subresource: object.subresource,
            namespace: object.namespace,
            count: 0,
        };
        match self.index.get(&key) {
            Some(&at) => self.order[at].count += 1,
            None => {
                self.index.insert(key.clone(), self.order.len());
                self.order.push(RecordedRequest { count: 1, ..key });
            }
        }
    }

    pub(crate) fn requests(&self) -> Vec<RecordedRequest> {
        self.order.clone()
    }

    pub(crate) fn clear(&mut self) {
        self.order.clear();
        self.index.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(log: &mut RequestLog, method: Method, uri: &'static str, token: Option<&str>) {
        let mut headers = HeaderMap::new();
        if let Some(token) = token {
            headers.insert(header::AUTHORIZATION, format!("Bearer {token}").parse().expect("a header"));
        }
        log.record(&method, &Uri::from_static(uri), &headers);
    }

    /// user, verb, resource, subresource, namespace, count.
    type Row = (String, String, String, Option<String>, Option<String>, u64);

    #[test]
    fn verbs_and_resources_as_rbac_sees_them() {
        let mut log = RequestLog::default();
        record(&mut log, Method::GET, "/api/v1/namespaces/a/pods/p", Some("t"));
        record(&mut log, Method::GET, "/api/v1/namespaces/a/pods/q", Some("t"));
        record(&mut log, Method::GET, "/api/v1/pods?watch=true&fieldSelector=x", Some("t"));
        record(&mut log, Method::GET, "/api/v1/pods", None);
        record(&mut log, Method::PATCH, "/api/v1/namespaces/a/pods/p/status", Some("t"));
        record(&mut log, Method::DELETE, "/apis/x.io/v1/namespaces/a/things", Some("t"));
        record(&mut log, Method::PUT, "/apis/x.io/v1/namespaces/a/things/t", Some("t"));
        record(&mut log, Method::GET, "/apis/x.io/v1", Some("t"));
        record(&mut log, Method::GET, "/version", Some("t"));
        let seen: Vec<Row> = log
            .requests()
            .into_iter()
            .map(|r| (r.user, r.verb, r.resource, r.subresource, r.namespace, r.count))
            .collect();
        let row = |user: &str, verb: &str, resource: &str, sub: Option<&str>, ns: Option<&str>, count| {
            (
                user.to_owned(),
                verb.to_owned(),
                resource.to_owned(),
                sub.map(str::to_owned),
                ns.map(str::to_owned),
                count,
            )
        };
        assert_eq!(
            seen,
            vec![
                row("t", "get", "pods", None, Some("a"), 2),
                row("t", "watch", "pods", None, None, 1),
                row("", "list", "pods", None, None, 1),
                row("t", "patch", "pods", Some("status"), Some("a"), 1),
                row("t", "deletecollection", "things", None, Some("a"), 1),
                row("t", "update", "things", None, Some("a"), 1),
            ]
        );
        log.clear();
        assert!(log.requests().is_empty());
    }
}
