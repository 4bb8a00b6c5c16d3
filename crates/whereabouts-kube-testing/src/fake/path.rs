//! Request URLs: which endpoint a path names, and the query parameters.

use axum::extract::Query;
use axum::http::Uri;

/// What a request path addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Route {
    /// `/version`
    Version,
    /// `/healthz`, `/readyz`, `/livez`
    Health,
    /// `/api`: the core group's versions.
    CoreVersions,
    /// `/apis`: every other group.
    Groups,
    /// `/apis/{group}`
    Group(String),
    /// `/api/v1` or `/apis/{group}/{version}`: the resources of a group version.
    Resources {
        group: String,
        version: String,
    },
    /// A collection, an object, or an object's subresource.
    Object(ObjectPath),
    Unknown,
}

/// `[/namespaces/{namespace}]/{plural}[/{name}[/{subresource}]]` under a group version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ObjectPath {
    pub(crate) group: String,
    pub(crate) version: String,
    pub(crate) plural: String,
    pub(crate) namespace: Option<String>,
    pub(crate) name: Option<String>,
    pub(crate) subresource: Option<String>,
}

/// Parses a request path.
pub(crate) fn route(path: &str) -> Route {
    let segments: Vec<&str> = path.split('/').filter(|segment| !segment.is_empty()).collect();
    let (group, version, rest) = match segments.as_slice() {
        ["version"] => return Route::Version,
        ["healthz" | "readyz" | "livez", ..] => return Route::Health,
        ["api"] => return Route::CoreVersions,
        ["apis"] => return Route::Groups,
        ["apis", group] => return Route::Group((*group).to_owned()),
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return Route::Unknown,
    };
    let object = |namespace: Option<&str>, plural: &str, name: Option<&str>, subresource: Option<&str>| {
        Route::Object(ObjectPath {
            group: group.to_owned(),
            version: version.to_owned(),
            plural: plural.to_owned(),
            namespace: namespace.map(str::to_owned),
            name: name.map(str::to_owned),
            subresource: subresource.map(str::to_owned),
        })
    };
    match rest {
        [] => Route::Resources { group: group.to_owned(), version: version.to_owned() },
        // A namespace's own subresources, not a collection in the namespace.
        ["namespaces", name, subresource @ ("status" | "finalize")] => {
            object(None, "namespaces", Some(name), Some(subresource))
        }
        ["namespaces", namespace, plural] => object(Some(namespace), plural, None, None),
        ["namespaces", namespace, plural, name] => object(Some(namespace), plural, Some(name), None),
        ["namespaces", namespace, plural, name, subresource] => {
            object(Some(namespace), plural, Some(name), Some(subresource))
        }
        [plural] => object(None, plural, None, None),
        [plural, name] => object(None, plural, Some(name), None),
        [plural, name, subresource] => object(None, plural, Some(name), Some(subresource)),
        _ => Route::Unknown,
    }
}

/// The decoded query parameters of a request.
#[derive(Debug, Clone, Default)]
pub(crate) struct Params(Vec<(String, String)>);

impl Params {
    pub(crate) fn parse(uri: &Uri) -> Params {
        Params(Query::<Vec<(String, String)>>::try_from_uri(uri).map(|query| query.0).unwrap_or_default())
    }

    /// The first value of a parameter.
    pub(crate) fn get(&self, key: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, value)| value.as_str())
    }

    /// A boolean parameter (`true` or `1`).
    pub(crate) fn flag(&self, key: &str) -> bool {
        matches!(self.get(key), Some("true" | "1"))
    }

    /// `dryRun=All`.
    pub(crate) fn dry_run(&self) -> bool {
        self.0.iter().any(|(k, value)| k == "dryRun" && value == "All")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(
        group: &str,
        plural: &str,
        namespace: Option<&str>,
        name: Option<&str>,
        sub: Option<&str>,
    ) -> Route {
        Route::Object(ObjectPath {
            group: group.to_owned(),
            version: "v1".to_owned(),
            plural: plural.to_owned(),
            namespace: namespace.map(str::to_owned),
            name: name.map(str::to_owned),
            subresource: sub.map(str::to_owned),
        })
    }

    #[test]
    fn paths() {
        assert_eq!(route("/version"), Route::Version);
        assert_eq!(route("/api"), Route::CoreVersions);
        assert_eq!(route("/apis/"), Route::Groups);
        assert_eq!(route("/apis/x.io"), Route::Group("x.io".to_owned()));
        assert_eq!(route("/api/v1"), Route::Resources { group: String::new(), version: "v1".to_owned() });
        assert_eq!(route("/api/v1/namespaces"), object("", "namespaces", None, None, None));
        assert_eq!(route("/api/v1/namespaces/a"), object("", "namespaces", None, Some("a"), None));
        assert_eq!(
            route("/api/v1/namespaces/a/status"),
            object("", "namespaces", None, Some("a"), Some("status"))
        );
        assert_eq!(route("/api/v1/namespaces/a/pods"), object("", "pods", Some("a"), None, None));
        assert_eq!(route("/api/v1/namespaces/a/pods/p"), object("", "pods", Some("a"), Some("p"), None));
        assert_eq!(
            route("/api/v1/namespaces/a/pods/p/status"),
            object("", "pods", Some("a"), Some("p"), Some("status"))
        );
        assert_eq!(route("/api/v1/nodes/n"), object("", "nodes", None, Some("n"), None));
        assert_eq!(route("/apis/x.io/v1/things"), object("x.io", "things", None, None, None));
        assert_eq!(
            route("/apis/x.io/v1/namespaces/a/things/t"),
            object("x.io", "things", Some("a"), Some("t"), None)
        );
        assert_eq!(route("/nope"), Route::Unknown);
        assert_eq!(route("/api/v1/namespaces/a/pods/p/status/x"), Route::Unknown);

        let params = Params::parse(&Uri::from_static("/x?&watch=1&labelSelector=a%3Db&dryRun=All"));
        assert!(params.flag("watch") && params.dry_run() && !params.flag("other"));
        assert_eq!(params.get("labelSelector"), Some("a=b"));
    }
}
