//! The kubeconfig the plugin uses on the host: the pod's service account token and the cluster's CA,
//! with the names upstream's install-cni.sh gives (cluster `local`, user `whereabouts`, context
//! `whereabouts-context`). Written as JSON, which kube and kubectl read like YAML.

use base64::Engine;
use serde_json::{Value, json};

/// How the plugin checks the API server's certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Tls {
    /// Against this CA bundle (PEM).
    Ca(Vec<u8>),
    /// Not at all (`SKIP_TLS_VERIFY=true`).
    Insecure,
    /// Against the host's roots: no CA file was found.
    SystemRoots,
}

/// `protocol://host:port`, the host bracketed when it is an IPv6 address.
pub(super) fn server_url(protocol: &str, host: &str, port: &str) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("{protocol}://[{host}]:{port}")
    } else {
        format!("{protocol}://{host}:{port}")
    }
}

/// The kubeconfig's bytes (pretty JSON, one trailing newline).
pub(super) fn render(server: &str, tls: &Tls, token: &str, namespace: &str) -> Vec<u8> {
    let mut cluster = json!({ "server": server });
    match tls {
        Tls::Ca(pem) => {
            cluster["certificate-authority-data"] = Value::from(base64::prelude::BASE64_STANDARD.encode(pem));
        }
        Tls::Insecure => cluster["insecure-skip-tls-verify"] = Value::Bool(true),
        Tls::SystemRoots => {}
    }
    let config = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{ "name": "local", "cluster": cluster }],
        "users": [{ "name": "whereabouts", "user": { "token": token } }],
        "contexts": [{
            "name": "whereabouts-context",
            "context": { "cluster": "local", "user": "whereabouts", "namespace": namespace },
        }],
        "current-context": "whereabouts-context",
    });
    let mut bytes = serde_json::to_vec_pretty(&config).unwrap_or_default();
    bytes.push(b'\n');
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_hosts_are_bracketed() {
        assert_eq!(server_url("https", "10.96.0.1", "443"), "https://10.96.0.1:443");
        assert_eq!(server_url("https", "fd00:10:96::1", "443"), "https://[fd00:10:96::1]:443");
        assert_eq!(server_url("https", "::1", "6443"), "https://[::1]:6443");
        assert_eq!(server_url("https", "[::1]", "6443"), "https://[::1]:6443");
        assert_eq!(server_url("http", "api.example", "80"), "http://api.example:80");
    }

    #[test]
    fn tls_settings() {
        let parse =
            |tls| -> Value { serde_json::from_slice(&render("https://h:1", &tls, "t", "ns")).unwrap() };
        let ca = parse(Tls::Ca(b"PEM".to_vec()));
        assert_eq!(ca["clusters"][0]["cluster"]["certificate-authority-data"], "UEVN");
        assert_eq!(ca["clusters"][0]["cluster"].get("insecure-skip-tls-verify"), None);
        let insecure = parse(Tls::Insecure);
        assert_eq!(insecure["clusters"][0]["cluster"]["insecure-skip-tls-verify"], true);
        assert_eq!(insecure["clusters"][0]["cluster"].get("certificate-authority-data"), None);
        let roots = parse(Tls::SystemRoots);
        assert_eq!(roots["clusters"][0]["cluster"], json!({ "server": "https://h:1" }));
        assert_eq!(roots["users"][0]["user"]["token"], "t");
        assert_eq!(roots["contexts"][0]["context"]["namespace"], "ns");
    }
}
