//! Finding the store the way the plugin does: from its configuration (`--config`: a flat file, a
//! network configuration or a conflist), or from flags. And reading every pool of it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use clap::{Args, ValueEnum};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use serde_json::{Value, json};
use whereabouts_cni::{FsHost, find_flat_file, open_store};
use whereabouts_controller::judge::PodView;
use whereabouts_controller::pools::{DecodedPool, UnreadablePool, decode_spec};
use whereabouts_controller::reconcile::pod_views;
use whereabouts_core::config::{
    CallContext, DEFAULT_ETCD_KEY_PREFIX, DEFAULT_FILE_STORE_DIR, Datastore, EtcdConfig, FlatFile,
    InlineIpam, IpamConfig, Purpose,
};
use whereabouts_k8s::client::{Connection, Timeouts, connect, connect_controller, kubeconfig_path};
use whereabouts_store::kubernetes::KubeStore;
use whereabouts_store::{AnyStore, Store, StoreError};

use super::CliError;
use super::output::Progress;

/// The stores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Kind {
    /// IPPools and OverlappingRangeIPReservations in a namespace.
    Kubernetes,
    /// etcd v3.
    Etcd,
    /// The embedded file store.
    File,
}

/// Where the store is.
#[derive(Debug, Clone, Args)]
pub struct StoreArgs {
    /// The plugin's configuration: a flat file (whereabouts.conf), or a network configuration or
    /// conflist whose whereabouts `ipam` names the store (the flat file is then searched for as the
    /// plugin does).
    #[arg(long, value_name = "FILE", conflicts_with_all = ["datastore", "etcd_host", "file_store_dir"])]
    pub config: Option<PathBuf>,
    /// The store (default: file with --file-store-dir, etcd with --etcd-host, else kubernetes).
    #[arg(long, value_enum)]
    pub datastore: Option<Kind>,
    /// A kubeconfig: the Kubernetes store's (overriding the configuration's), and where pods are
    /// looked up. Without one, the one `KUBECONFIG` names; without that, the configuration's, else
    /// in-cluster.
    #[arg(long, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// The namespace of the IPPools and reservations (default: the kubeconfig context's, else
    /// kube-system).
    #[arg(long, env = "WHEREABOUTS_NAMESPACE")]
    pub namespace: Option<String>,
    /// etcd endpoints, comma-separated (TLS and credentials: use --config).
    #[arg(long, value_name = "ENDPOINTS")]
    pub etcd_host: Option<String>,
    /// The file store's directory.
    #[arg(long, value_name = "DIR")]
    pub file_store_dir: Option<PathBuf>,
}

/// An open store, and what else the commands need to know about it.
pub struct Opened {
    /// The store.
    pub store: AnyStore,
    /// Where pods are looked up: the Kubernetes store's cluster, or `--kubeconfig`'s.
    pub pods: Option<kube::Client>,
    /// `enable_overlapping_ranges` of the configuration (true without one, as the plugin's default):
    /// whether every allocation should have a reservation.
    pub overlapping: bool,
    /// Which store this is.
    pub kind: Kind,
}

impl std::fmt::Debug for Opened {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Opened").field("store", &self.store).field("kind", &self.kind).finish_non_exhaustive()
    }
}

/// Opens the store `args` name.
pub async fn open(args: &StoreArgs) -> Result<Opened, CliError> {
    let named_kubeconfig = kubeconfig_path(args.kubeconfig.as_deref());
    let (datastore, overlapping) = match &args.config {
        Some(path) => {
            let config = load_config(path)?;
            (config.datastore, config.enable_overlapping_ranges)
        }
        None => (from_flags(args, named_kubeconfig.is_some())?, true),
    };
    match datastore {
        Datastore::Kubernetes { kubeconfig } => {
            let kubeconfig =
                named_kubeconfig.or_else(|| (!kubeconfig.is_empty()).then(|| PathBuf::from(kubeconfig)));
            let connection = kube_connection(kubeconfig.as_deref(), args.namespace.as_deref()).await?;
            let store = KubeStore::new(connection.client.clone(), &connection.namespace, &connection.server);
            Ok(Opened {
                store: AnyStore::Kubernetes(Box::new(store)),
                pods: Some(connection.client),
                overlapping,
                kind: Kind::Kubernetes,
            })
        }
        other => {
            let kind = match &other {
                Datastore::File { dir } => {
                    // Reading must not create a store where a mistyped path points.
                    if !Path::new(dir).is_dir() {
                        return Err(CliError::Open {
                            store: "file",
                            reason: format!("{dir} is not a directory"),
                        });
                    }
                    Kind::File
                }
                _ => Kind::Etcd,
            };
            // An operator at a terminal wants the error at once rather than a wait for the store.
            let store = open_store(&other, None, std::time::Instant::now()).await.map_err(|e| {
                CliError::Open { store: if kind == Kind::File { "file" } else { "etcd" }, reason: e.msg }
            })?;
            let pods = match &named_kubeconfig {
                Some(path) => Some(kube_connection(Some(path), None).await?.client),
                None => None,
            };
            Ok(Opened { store, pods, overlapping, kind })
        }
    }
}

fn from_flags(args: &StoreArgs, kubeconfig_named: bool) -> Result<Datastore, CliError> {
    let kind = args.datastore.unwrap_or(if args.file_store_dir.is_some() {
        Kind::File
    } else if args.etcd_host.is_some() {
        Kind::Etcd
    } else {
        Kind::Kubernetes
    });
    Ok(match kind {
        Kind::File => Datastore::File {
            dir: args
                .file_store_dir
                .as_ref()
                .map_or_else(|| DEFAULT_FILE_STORE_DIR.to_string(), |d| d.display().to_string()),
        },
        Kind::Etcd => Datastore::Etcd(EtcdConfig {
            hosts: args
                .etcd_host
                .clone()
                .filter(|h| !h.is_empty())
                .ok_or_else(|| CliError::Usage("--datastore etcd needs --etcd-host".into()))?,
            key_prefix: DEFAULT_ETCD_KEY_PREFIX.into(),
            ..EtcdConfig::default()
        }),
        Kind::Kubernetes => {
            if !kubeconfig_named && std::env::var_os("KUBERNETES_SERVICE_HOST").is_none() {
                return Err(CliError::Usage(
                    "which store? give --config FILE, or --kubeconfig or KUBECONFIG (the Kubernetes store), \
                     --etcd-host or --file-store-dir"
                        .into(),
                ));
            }
            Datastore::Kubernetes { kubeconfig: String::new() }
        }
    })
}

async fn kube_connection(kubeconfig: Option<&Path>, namespace: Option<&str>) -> Result<Connection, CliError> {
    let failed = |e: whereabouts_k8s::client::ConnectError| CliError::Open {
        store: "kubernetes",
        reason: e.to_string(),
    };
    let mut connection = match kubeconfig {
        Some(path) => connect(path, Timeouts::REQUESTS).await.map_err(failed)?,
        None => connect_controller(None, None).await.map_err(failed)?,
    };
    if let Some(namespace) = namespace.filter(|n| !n.is_empty()) {
        connection.namespace = namespace.to_string();
    }
    Ok(connection)
}

/// Loads the plugin's configuration from `path` with the core's loader, as for a DEL (only what finds
/// the store and the pools is needed).
pub fn load_config(path: &Path) -> Result<IpamConfig, CliError> {
    let shown = path.display().to_string();
    let failed = |reason: String| CliError::Config { path: shown.clone(), reason };
    let content = std::fs::read(path).map_err(|e| failed(e.to_string()))?;
    let value: Value = serde_json::from_slice(&content).map_err(|e| failed(format!("not JSON: {e}")))?;
    let (ipam, flat_content) = match (field(&value, "plugins"), field(&value, "ipam")) {
        (Some(Value::Array(plugins)), _) => {
            let ipam = plugins
                .iter()
                .filter_map(|plugin| field(plugin, "ipam"))
                .find(|ipam| field(ipam, "type").and_then(Value::as_str) == Some("whereabouts"))
                .ok_or_else(|| failed("no plugin of the list has a whereabouts ipam".into()))?;
            (ipam.clone(), None)
        }
        (_, Some(ipam)) => (ipam.clone(), None),
        // A flat file: the same keys as `ipam`, without `type`.
        _ => (json!({ "type": "whereabouts" }), Some(content)),
    };
    let inline = InlineIpam::parse(&ipam).map_err(|e| failed(e.to_string()))?;
    let flat = match flat_content {
        Some(content) => Some((shown.clone(), content)),
        None => find_flat_file(&inline, &FsHost).map_err(|e| failed(e.msg))?,
    };
    let flat = flat.as_ref().map(|(path, content)| FlatFile { path, content });
    let call = CallContext { purpose: Purpose::Release, ..CallContext::default() };
    inline.resolve(flat, &call).map_err(|e| failed(e.to_string()))
}

/// An object's field, its name matched case-insensitively (as the plugin matches keys).
fn field<'v>(value: &'v Value, name: &str) -> Option<&'v Value> {
    value.as_object()?.iter().rev().find(|(key, _)| key.eq_ignore_ascii_case(name)).map(|(_, v)| v)
}

/// One pool as read.
#[derive(Debug)]
pub struct ReadPool {
    /// Its name.
    pub name: String,
    /// `spec.range` as stored (empty when the pool could not be read at all).
    pub range: String,
    /// Its allocations, or why it cannot be decoded.
    pub decoded: Result<DecodedPool, UnreadablePool>,
}

/// Reads one pool; `None` when it does not exist.
pub async fn read_pool(store: &AnyStore, name: &str) -> Result<Option<ReadPool>, CliError> {
    match store.read_pool(name).await {
        Ok(None) => Ok(None),
        Ok(Some(pool)) => Ok(Some(ReadPool {
            name: name.to_string(),
            decoded: decode_spec(name, &pool.spec),
            range: pool.spec.range,
        })),
        Err(StoreError::Corrupt { reason, .. }) => Ok(Some(ReadPool {
            name: name.to_string(),
            range: String::new(),
            decoded: Err(UnreadablePool { pool: name.to_string(), reason }),
        })),
        Err(e) => Err(e.into()),
    }
}

/// Reads every pool, in name order (pools deleted meanwhile are left out), showing progress.
pub async fn read_pools(store: &AnyStore) -> Result<Vec<ReadPool>, CliError> {
    let mut names = store.list_pools().await?;
    names.sort();
    let mut progress = Progress::new("reading pools", names.len());
    let mut pools = Vec::with_capacity(names.len());
    for name in &names {
        if let Some(pool) = read_pool(store, name).await? {
            pools.push(pool);
        }
        progress.step();
    }
    progress.finish();
    Ok(pools)
}

/// What the controller knows of every pod `client` lists, by `namespace/name`.
pub async fn pod_views_of(client: kube::Client) -> Result<HashMap<String, PodView>, CliError> {
    let pods = Api::<Pod>::all(client).list(&ListParams::default()).await.map_err(CliError::Pods)?;
    Ok(pod_views(&pods.items))
}
