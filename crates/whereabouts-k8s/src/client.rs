//! Building a kube client from a kubeconfig file, as upstream does: the explicit path from
//! `kubernetes.kubeconfig` (never `$KUBECONFIG` or `$HOME`), every credential kind the file may carry
//! (tokens, token files, client certificates, exec plugins), and the namespace of the current context,
//! `kube-system` when it names none. That namespace holds the pools and reservations.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_rustls::{FixedServerNameResolver, HttpsConnector, HttpsConnectorBuilder};
use hyper_timeout::TimeoutConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use kube::client::retry::RetryPolicy;
use kube::client::{Body, ClientBuilder, ConfigExt};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use rustls::pki_types::ServerName;
use thiserror::Error;
use tower::retry::RetryLayer;
use tower::{BoxError, ServiceBuilder};

/// The namespace used when the kubeconfig's current context names none (upstream's default).
pub const DEFAULT_NAMESPACE: &str = "kube-system";

/// Timeouts of every request. kube 4+ sets no read timeout by default, so a stuck API server would
/// block the caller (the kubelet, for the CNI plugin) for good.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// Establishing a connection.
    pub connect: Duration,
    /// Waiting for a response (for watches: between two bytes of the stream).
    pub read: Duration,
    /// Sending a request.
    pub write: Duration,
}

impl Timeouts {
    /// For short requests (the CNI plugin, the CLI).
    pub const REQUESTS: Timeouts = Timeouts {
        connect: Duration::from_secs(5),
        read: Duration::from_secs(10),
        write: Duration::from_secs(10),
    };

    /// For the controller, whose watches stay open: long enough between two bytes of a watch for a
    /// real API server's bookmarks (about one a minute) to keep it alive.
    pub const WATCHES: Timeouts = Timeouts {
        connect: Duration::from_secs(10),
        read: Duration::from_secs(300),
        write: Duration::from_secs(30),
    };
}

/// A client and the namespace of the whereabouts objects.
#[derive(Clone)]
pub struct Connection {
    /// The client; its default namespace is `namespace`.
    pub client: Client,
    /// The kubeconfig context's namespace, or [`DEFAULT_NAMESPACE`].
    pub namespace: String,
    /// The API server's URL.
    pub server: String,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection").field("namespace", &self.namespace).finish_non_exhaustive()
    }
}

/// Why no client could be built; always names the kubeconfig.
#[derive(Debug, Error)]
#[error("kubernetes.kubeconfig {path:?}: {reason}")]
pub struct ConnectError {
    /// The kubeconfig path.
    pub path: String,
    /// What is wrong with it.
    pub reason: String,
}

/// The namespace of the kubeconfig's current context.
pub fn context_namespace(kubeconfig: &Kubeconfig) -> Result<String, String> {
    let current = kubeconfig.current_context.as_deref().ok_or("it has no current-context")?;
    let context = kubeconfig
        .contexts
        .iter()
        .find(|c| c.name == current)
        .ok_or_else(|| format!("its current-context {current:?} is not among its contexts"))?;
    let namespace = context.context.as_ref().and_then(|c| c.namespace.clone()).unwrap_or_default();
    Ok(if namespace.is_empty() { DEFAULT_NAMESPACE.to_string() } else { namespace })
}

/// The kubeconfig a command uses, chosen as kubectl and client-go choose it: `flag` (`--kubeconfig`),
/// else `KUBECONFIG`, else none (in-cluster).
pub fn kubeconfig_path(flag: Option<&Path>) -> Option<PathBuf> {
    flag.map(Path::to_path_buf).or_else(|| kubeconfig_from_env(std::env::var_os("KUBECONFIG")?.as_os_str()))
}

/// The file a `KUBECONFIG` value names: the first of its list that exists (kubectl merges the list;
/// whereabouts reads one file), else its first entry, so that the error names it.
fn kubeconfig_from_env(listed: &OsStr) -> Option<PathBuf> {
    let paths: Vec<PathBuf> = std::env::split_paths(listed).filter(|p| !p.as_os_str().is_empty()).collect();
    paths.iter().find(|p| p.is_file()).or(paths.first()).cloned()
}

/// Reads the kubeconfig at `path` and builds a client with `timeouts` on every request. No request is
/// sent; an unreachable server shows on the first call. kube's retries of 429/503/504 inside one
/// request (up to 15 times) are off: the callers retry with their own bounds and need to see the
/// failure to apply them.
pub async fn connect(path: &Path, timeouts: Timeouts) -> Result<Connection, ConnectError> {
    from_kubeconfig(path, timeouts, false).await
}

async fn from_kubeconfig(path: &Path, timeouts: Timeouts, retries: bool) -> Result<Connection, ConnectError> {
    let failed = |reason: String| ConnectError { path: path.display().to_string(), reason };
    let kubeconfig = Kubeconfig::read_from(path).map_err(|e| failed(e.to_string()))?;
    let namespace = context_namespace(&kubeconfig).map_err(failed)?;
    let mut config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .map_err(|e| failed(e.to_string()))?;
    config.default_namespace.clone_from(&namespace);
    apply_timeouts(&mut config, timeouts);
    config.default_retry = retries;
    let server = config.cluster_url.to_string();
    let client = client(&config).map_err(|e| failed(e.to_string()))?;
    Ok(Connection { client, namespace, server })
}

/// The controller's connection: the kubeconfig at `path`, or the pod's service account when `None`
/// (in-cluster), with [`Timeouts::WATCHES`] and kube's own retries on (a controller has no caller
/// waiting). The namespace of the whereabouts objects is `namespace` when given
/// (`WHEREABOUTS_NAMESPACE`), else the kubeconfig context's, else [`DEFAULT_NAMESPACE`] (as upstream's
/// controllers).
pub async fn connect_controller(
    path: Option<&Path>,
    namespace: Option<&str>,
) -> Result<Connection, ConnectError> {
    let mut connection = match path {
        Some(path) => from_kubeconfig(path, Timeouts::WATCHES, true).await?,
        None => {
            let failed =
                |reason: String| ConnectError { path: "(in-cluster service account)".into(), reason };
            let mut config = Config::incluster().map_err(|e| failed(e.to_string()))?;
            apply_timeouts(&mut config, Timeouts::WATCHES);
            let server = config.cluster_url.to_string();
            let client = client(&config).map_err(|e| failed(e.to_string()))?;
            Connection { client, namespace: DEFAULT_NAMESPACE.to_string(), server }
        }
    };
    if let Some(namespace) = namespace.filter(|n| !n.is_empty()) {
        connection.namespace = namespace.to_string();
    }
    Ok(connection)
}

/// The client of `config`: kube's own stack (TLS, timeouts, base URI, retries when the config asks
/// for them, credentials, extra headers), with two changes to its connections. A proxied config keeps
/// kube's stack (its tunnels).
///
/// - TCP_NODELAY. kube leaves Nagle's algorithm on, and the first request on a fresh connection then
///   waits for the server's delayed ACK (about 40 ms on Linux) before its body goes out: that was most
///   of a plugin process's ADD, which opens one connection and sends a handful of small requests.
/// - HTTP/2 when the server offers it (ALPN; every kube-apiserver does), as client-go speaks it. kube
///   speaks HTTP/1.1 only, where every request in flight needs a connection of its own and a watch
///   given up closes its connection: each costs a TLS handshake, and the API server's share of one
///   (signing with its certificate's key) costs more than a small request. Measured on a burst of
///   200 ADDs from 10 nodes: 103 handshakes on the real server, a quarter of its CPU.
fn client(config: &Config) -> Result<Client, kube::Error> {
    if config.proxy_url.is_some() {
        return Client::try_from(config.clone());
    }
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    let mut connector = TimeoutConnector::new(https_connector(config, http)?);
    connector.set_connect_timeout(config.connect_timeout);
    connector.set_read_timeout(config.read_timeout);
    connector.set_write_timeout(config.write_timeout);
    connector.set_reset_reader_on_write(config.reset_reader_on_write);
    let http_client: hyper_util::client::legacy::Client<_, Body> =
        hyper_util::client::legacy::Builder::new(TokioExecutor::new()).build(connector);
    let service = ServiceBuilder::new()
        .layer(config.base_uri_layer())
        .option_layer(config.default_retry.then(|| RetryLayer::new(RetryPolicy::server_retry())))
        .option_layer(config.auth_layer()?)
        .layer(config.extra_headers_layer()?)
        .map_err(BoxError::from)
        .service(http_client);
    Ok(ClientBuilder::new(service, config.default_namespace.clone()).build())
}

/// kube's TLS connector of `config` (its client configuration, and the server name it checks the
/// certificate against), offering HTTP/2 as well as HTTP/1.1.
fn https_connector(
    config: &Config,
    http: HttpConnector,
) -> Result<HttpsConnector<HttpConnector>, kube::Error> {
    let builder = HttpsConnectorBuilder::new().with_tls_config(rustls_client_config(config)?).https_or_http();
    let builder = match &config.tls_server_name {
        Some(name) => {
            let name = ServerName::try_from(name.clone())
                .map_err(|e| kube::Error::Service(format!("tls-server-name {name:?}: {e}").into()))?;
            builder.with_server_name_resolver(FixedServerNameResolver::new(name))
        }
        None => builder,
    };
    Ok(builder.enable_all_versions().wrap_connector(http))
}

/// kube's TLS client configuration of `config`, without the machine's root certificates when nothing
/// will be verified against them: the server speaks plain HTTP, or the kubeconfig skips verification
/// (`insecure-skip-tls-verify`), and names no CA. kube trusts the machine's roots whenever no CA is
/// named, and reading them (some 150 PEM certificates, on every process start) was a seventh of a
/// plugin process's CPU, and an error on a machine that has none.
fn rustls_client_config(config: &Config) -> Result<rustls::ClientConfig, kube::Error> {
    let verifies_nothing = config.accept_invalid_certs || config.cluster_url.scheme_str() == Some("http");
    if verifies_nothing && config.root_cert.is_none() {
        let mut without_roots = config.clone();
        without_roots.root_cert = Some(Vec::new());
        return without_roots.rustls_client_config();
    }
    config.rustls_client_config()
}

fn apply_timeouts(config: &mut Config, timeouts: Timeouts) {
    config.connect_timeout = Some(timeouts.connect);
    config.read_timeout = Some(timeouts.read);
    config.write_timeout = Some(timeouts.write);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kubeconfig(current: &str, namespace: Option<&str>) -> Kubeconfig {
        let namespace = namespace.map(|n| format!(", namespace: {n}")).unwrap_or_default();
        Kubeconfig::from_yaml(&format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: {current}\n\
             clusters: [{{name: c, cluster: {{server: 'http://127.0.0.1:1'}}}}]\n\
             users: [{{name: u, user: {{token: t}}}}]\n\
             contexts: [{{name: ctx, context: {{cluster: c, user: u{namespace}}}}}]\n"
        ))
        .expect("valid kubeconfig")
    }

    #[test]
    fn namespace_comes_from_the_current_context() {
        assert_eq!(context_namespace(&kubeconfig("ctx", Some("whereabouts"))).unwrap(), "whereabouts");
    }

    #[test]
    fn a_context_without_namespace_means_kube_system() {
        assert_eq!(context_namespace(&kubeconfig("ctx", None)).unwrap(), "kube-system");
    }

    #[test]
    fn a_missing_current_context_is_named() {
        let error = context_namespace(&kubeconfig("other", None)).unwrap_err();
        assert!(error.contains("\"other\""), "{error}");
    }

    #[tokio::test]
    async fn an_unreadable_kubeconfig_names_its_path() {
        let error = connect(Path::new("/nonexistent/kubeconfig"), Timeouts::REQUESTS).await.unwrap_err();
        assert!(
            error.to_string().starts_with("kubernetes.kubeconfig \"/nonexistent/kubeconfig\""),
            "{error}"
        );
    }

    #[tokio::test]
    async fn a_client_is_built_without_contacting_the_server() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kubeconfig");
        std::fs::write(
            &path,
            "apiVersion: v1\nkind: Config\ncurrent-context: ctx\n\
             clusters: [{name: c, cluster: {server: 'http://127.0.0.1:1'}}]\n\
             users: [{name: u, user: {token: t}}]\n\
             contexts: [{name: ctx, context: {cluster: c, user: u, namespace: wb}}]\n",
        )
        .unwrap();
        let connection = connect(&path, Timeouts::REQUESTS).await.unwrap();
        assert_eq!(connection.namespace, "wb");
        assert_eq!(connection.client.default_namespace(), "wb");
    }

    /// The client offers HTTP/2 and speaks it where the server takes it up, as a kube-apiserver does:
    /// a TLS server that offers both sees the client choose `h2`.
    #[tokio::test]
    async fn the_client_speaks_http2_to_a_server_that_offers_it() {
        use std::sync::Arc;
        let dir = tempfile::tempdir().unwrap();
        let certified = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, certified.cert.pem()).unwrap();
        let key = rustls::pki_types::PrivateKeyDer::try_from(certified.signing_key.serialize_der()).unwrap();
        let mut server = tokio_rustls::rustls::ServerConfig::builder_with_provider(Arc::new(
            tokio_rustls::rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![certified.cert.der().clone()], key)
        .unwrap();
        server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let negotiated = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let tls = acceptor.accept(tcp).await.unwrap();
            tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec)
        });
        let path = dir.path().join("kubeconfig");
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\ncurrent-context: ctx\n\
                 clusters: [{{name: c, cluster: {{server: 'https://127.0.0.1:{port}', \
                 certificate-authority: '{}'}}}}]\n\
                 users: [{{name: u, user: {{token: t}}}}]\n\
                 contexts: [{{name: ctx, context: {{cluster: c, user: u}}}}]\n",
                ca.display()
            ),
        )
        .unwrap();
        let connection = connect(&path, Timeouts::REQUESTS).await.unwrap();
        // The server hangs up after the handshake: the request fails, the handshake is what counts.
        let _ = connection.client.apiserver_version().await;
        assert_eq!(negotiated.await.unwrap().as_deref(), Some(&b"h2"[..]));
    }

    #[test]
    fn kubeconfig_env_names_the_first_existing_file_else_its_first_entry() {
        let dir = tempfile::tempdir().expect("temp dir");
        let present = dir.path().join("present");
        std::fs::write(&present, "").expect("write");
        let missing = dir.path().join("missing");
        let list = std::env::join_paths([&missing, &present]).expect("joinable");
        assert_eq!(kubeconfig_from_env(&list), Some(present.clone()));
        assert_eq!(kubeconfig_from_env(missing.as_os_str()), Some(missing.clone()));
        assert_eq!(kubeconfig_from_env(OsStr::new("")), None);
        assert_eq!(kubeconfig_from_env(OsStr::new("::")), None);
        // The flag wins over the environment.
        assert_eq!(kubeconfig_path(Some(&missing)), Some(missing));
    }
}
