//! The CNI protocol of whereabouts-rs.
//!
//! [`run`] is the whole plugin as a function of (environment, stdin) to (stdout, exit code): the binary
//! only collects its environment and stdin, calls it, prints [`Reply::stdout`] and exits with
//! [`Reply::exit_code`]. The little I/O the protocol itself needs (the flat file, the node name file,
//! installing the logger) goes through [`Host`], so tests can drive every path in-process.

use std::collections::{HashMap, HashSet};
use std::io::ErrorKind;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{Value, json};
use whereabouts_core::cni_args::CniArgs;
use whereabouts_core::cni_args::parse_cni_args;
use whereabouts_core::config::{
    CallContext, Datastore, FlatFile, InlineIpam, IpamConfig, LogSettings, Purpose,
};
use whereabouts_core::pool::Owner;
use whereabouts_store::AnyStore;
#[cfg(feature = "etcd")]
use whereabouts_store::etcd::{EtcdConnectError, EtcdStore};
use whereabouts_store::file::FileStore;
use whereabouts_store::ipam::{Ipam, ROLLBACK_GRACE, RetryPolicy};
#[cfg(feature = "kubernetes")]
use whereabouts_store::kubernetes::KubeStore;

pub mod env;
pub mod error;
pub mod logging;
pub mod persistent;
pub mod result;
pub mod slices;
pub mod version;

use env::{CniEnv, Command, is_valid_name};
use error::{CniError, codes};
use result::{IpamResult, addresses_of};
use version::{LATEST, SUPPORTED_VERSIONS, SpecVersion};

/// The I/O the protocol layer needs besides the store.
pub trait Host {
    /// Reads a whole file.
    fn read_file(&self, path: &str) -> std::io::Result<Vec<u8>>;
    /// Installs the logger for this process from the loaded configuration.
    fn init_logging(&self, settings: &LogSettings);
}

/// The real host: the file system and a tracing subscriber.
#[derive(Debug, Default)]
pub struct FsHost;

impl Host for FsHost {
    fn read_file(&self, path: &str) -> std::io::Result<Vec<u8>> {
        std::fs::read(path)
    }

    fn init_logging(&self, settings: &LogSettings) {
        logging::init(settings);
    }
}

/// What the plugin prints and how it exits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The JSON document for stdout (empty for a silent success).
    pub stdout: String,
    /// 0 on success, 1 with an error object.
    pub exit_code: i32,
}

/// The network configuration's top level. Keys are lowercased first ([`parse_netconf`]), as Go's
/// decoder matches them case-insensitively.
#[derive(Debug, Default, Deserialize)]
struct NetConf {
    // `null` means absent, as with Go's decoder.
    #[serde(rename = "cniversion", default, deserialize_with = "null_as_empty")]
    cni_version: String,
    /// Spec 1.1: the versions a configuration list supports; used when `cniVersion` is absent.
    #[serde(rename = "cniversions", default)]
    cni_versions: Option<Vec<String>>,
    #[serde(default, deserialize_with = "null_as_empty")]
    name: String,
    #[serde(default)]
    ipam: Option<Value>,
    #[serde(rename = "runtimeconfig", default)]
    runtime_config: Option<Value>,
    #[serde(default)]
    args: Option<Value>,
    #[serde(rename = "prevresult", default)]
    prev_result: Option<Value>,
    /// KubeVirt's switch for persistent addresses: allocate for the attachment's IPAMClaim.
    #[serde(rename = "allowpersistentips", default)]
    allow_persistent_ips: Option<bool>,
    /// GC's list of attachments still in use (spec 1.1).
    #[serde(rename = "cni.dev/valid-attachments", default)]
    valid_attachments: Option<Vec<Attachment>>,
    /// The same list under the name spec 1.1.0 first gave it (runtimes before libcni 1.2.3 send this).
    #[serde(rename = "cni.dev/attachments", default)]
    attachments: Option<Vec<Attachment>>,
}

/// Decodes the network configuration: top-level keys case-insensitively, the last duplicate winning and
/// a later `null` leaving an earlier value alone (Go's rules).
fn parse_netconf(stdin: &[u8]) -> Result<NetConf, CniError> {
    let decode_error =
        |e: String| CniError::new(codes::DECODE, format!("error unmarshall network config: {e}"));
    let value: Value = serde_json::from_slice(stdin).map_err(|e| decode_error(e.to_string()))?;
    let Value::Object(map) = value else {
        return Err(decode_error(format!("expected an object, found {value}")));
    };
    let mut lowered = serde_json::Map::with_capacity(map.len());
    for (key, value) in map {
        let key = key.to_ascii_lowercase();
        if !(value.is_null() && lowered.contains_key(&key)) {
            lowered.insert(key, value);
        }
    }
    serde_json::from_value(Value::Object(lowered)).map_err(|e| decode_error(e.to_string()))
}

fn null_as_empty<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    Option::<String>::deserialize(deserializer).map(Option::unwrap_or_default)
}

#[derive(Debug, Deserialize)]
struct Attachment {
    #[serde(rename = "containerID")]
    container_id: String,
    ifname: String,
}

/// The environment variable that shortens (or lengthens) a call's budget, in whole seconds: for
/// runtimes whose CNI timeout is not the kubelet's two minutes, and for tests of what happens when a
/// store never answers.
pub const BUDGET_ENV: &str = "WHEREABOUTS_CALL_BUDGET";

/// The one budget of a call, in which every wait (the node's writer queue, lost races, a store
/// restarting) ends and then gives its error: [`RetryPolicy::DEFAULT_BUDGET`], below the kubelet's
/// two-minute runtime request timeout, unless [`BUDGET_ENV`] says otherwise.
fn call_budget(vars: &HashMap<String, String>) -> Duration {
    vars.get(BUDGET_ENV)
        .and_then(|seconds| seconds.trim().parse::<u64>().ok())
        .map_or(RetryPolicy::DEFAULT_BUDGET, Duration::from_secs)
}

/// The longest one CNI call may take, whatever the store does (a cluster store whose every member
/// stopped answering, say): the call's budget, plus the time a failed ADD has to release what it took,
/// plus a margin; so the caller gets a CNI error to act on rather than a killed plugin.
fn call_deadline(budget: Duration) -> Duration {
    budget.saturating_add(ROLLBACK_GRACE).saturating_add(Duration::from_secs(5))
}

/// Runs one CNI call. Never panics on any input; every failure is a CNI error object.
pub async fn run(vars: &HashMap<String, String>, stdin: &[u8], host: &impl Host) -> Reply {
    let mut cni_version = LATEST.to_string();
    let budget = call_budget(vars);
    let hard_limit = call_deadline(budget);
    let outcome = tokio::time::timeout(hard_limit, dispatch(vars, stdin, host, budget, &mut cni_version))
        .await
        .unwrap_or_else(|_| {
            Err(CniError::new(codes::TRY_AGAIN, format!("the store did not answer within {hard_limit:?}")))
        });
    match outcome {
        Ok(None) => Reply { stdout: String::new(), exit_code: 0 },
        Ok(Some(value)) => Reply { stdout: value.to_string(), exit_code: 0 },
        Err(e) => {
            tracing::error!("{}", e.msg);
            Reply { stdout: e.to_json(&cni_version).to_string(), exit_code: 1 }
        }
    }
}

async fn dispatch(
    vars: &HashMap<String, String>,
    stdin: &[u8],
    host: &impl Host,
    budget: Duration,
    cni_version: &mut String,
) -> Result<Option<Value>, CniError> {
    let env = CniEnv::from_vars(vars).unwrap_or_else(|| {
        Err(CniError::new(codes::INVALID_ENV, "required env variables [CNI_COMMAND] missing"))
    })?;
    if env.command == Command::Version {
        return Ok(Some(version_reply()));
    }
    let mut netconf = parse_netconf(stdin)?;
    if netconf.cni_version.is_empty()
        && let Some(listed) = netconf.cni_versions.as_ref().filter(|l| !l.is_empty())
    {
        // The highest listed version we speak, as the spec has the runtime choose.
        netconf.cni_version = listed
            .iter()
            .filter_map(|v| SpecVersion::parse(v).map(|parsed| (parsed, v)))
            .max()
            .map(|(_, v)| v.clone())
            .ok_or_else(|| {
                CniError::new(codes::INCOMPATIBLE_VERSION, "incompatible CNI versions")
                    .with_details(format!("config lists {listed:?}, plugin supports {SUPPORTED_VERSIONS:?}"))
            })?;
    }
    if !netconf.cni_version.is_empty() {
        cni_version.clone_from(&netconf.cni_version);
    }
    if netconf.name.is_empty() {
        return Err(CniError::new(codes::INVALID_CONFIG, "missing network name"));
    }
    if !is_valid_name(&netconf.name) {
        return Err(CniError::new(codes::INVALID_CONFIG, "invalid characters found in network name")
            .with_details(netconf.name.clone()));
    }
    let version = SpecVersion::parse(&netconf.cni_version).ok_or_else(|| {
        CniError::new(codes::INCOMPATIBLE_VERSION, "incompatible CNI versions").with_details(format!(
            "config is {:?}, plugin supports {SUPPORTED_VERSIONS:?}",
            netconf.cni_version
        ))
    })?;
    let (minimum, what) = match env.command {
        Command::Check => (Some(SpecVersion::CHECK), "CHECK"),
        Command::Gc => (Some(SpecVersion::GC), "GC"),
        Command::Status => (Some(SpecVersion::GC), "STATUS"),
        _ => (None, ""),
    };
    if minimum.is_some_and(|m| version < m) {
        return Err(CniError::new(
            codes::INCOMPATIBLE_VERSION,
            format!("config version does not allow {what}"),
        ));
    }

    let purpose = match env.command {
        Command::Del | Command::Gc => Purpose::Release,
        _ => Purpose::Allocate,
    };
    let args = match purpose {
        Purpose::Allocate => parse_cni_args(&env.args)?,
        Purpose::Release => parse_cni_args(&env.args).unwrap_or_default(),
    };
    let mut config = load_config(&netconf, &args, purpose, host)?;
    if env.command == Command::Add {
        config.check_assigns_an_address()?;
    }
    host.init_logging(&config.log);
    if let Some(warning) = &config.log.warning {
        tracing::error!("{warning}");
    }
    // STATUS reports every way of not being able to serve ADD as "not available".
    let not_available = |e: CniError| match env.command {
        Command::Status => CniError::new(codes::NOT_AVAILABLE, e.msg),
        _ => e,
    };
    let deadline = Instant::now() + budget;
    let node = node_name(&env, &config, host);
    if purpose == Purpose::Allocate {
        persistent::check(&config).map_err(not_available)?;
    }
    let node_slices = slices::prepare(&config, purpose, node.as_deref()).map_err(not_available)?;
    // A StatefulSet's pod may hold its address in another node's slice pool (see `persistent`).
    let sticky_slice = match config.node_slice_size {
        Some(_) if config.sticky_statefulsets => config.ranges.first().cloned(),
        _ => None,
    };
    let opened = async {
        let store = open_store(&config.datastore, node.as_deref(), deadline).await?;
        slices::apply(node_slices, &mut config, &store, &netconf.name, purpose).await?;
        if let Some(first) = &sticky_slice
            && env.command == Command::Del
        {
            persistent::widen_release(&mut config, &store, first).await?;
        }
        Ok(store)
    };
    let store = match opened.await {
        Err(e) if env.command == Command::Del && !worth_retrying_del(&e) => {
            return Ok(del_given_up(&env, &e));
        }
        opened => opened.map_err(not_available)?,
    };
    let ipam = Ipam::new(&store).with_deadline(deadline);

    match env.command {
        Command::Add => {
            // The controller releases allocations whose pod is gone; one without a pod would be
            // released at once.
            if matches!(config.datastore, Datastore::Kubernetes { .. }) && !args.names_kubernetes_pod() {
                return Err(CniError::new(
                    codes::INVALID_ENV,
                    "CNI_ARGS has no K8S_POD_NAMESPACE and K8S_POD_NAME: the kubernetes datastore allocates for pods only",
                ));
            }
            let allow_persistent_ips = netconf.allow_persistent_ips.unwrap_or(false);
            let persistence =
                persistent::persistence_of(&config, allow_persistent_ips, &store, &args, &env.ifname).await?;
            let owner = Owner {
                container_id: env.container_id.clone(),
                pod_ref: args.pod_ref(),
                ifname: env.ifname.clone(),
                node: node.clone(),
                cni_network: Some(netconf.name.clone()),
                pod_uid: args.pod_uid(),
                statefulset: persistence.statefulset,
                ipam_claim: persistence.ipam_claim,
            };
            if let Some(first) = &sticky_slice {
                persistent::follow_held_entry(&mut config, &store, &ipam, first, &owner).await?;
            }
            tracing::debug!("ADD {} {} pod {:?}", env.container_id, env.ifname, owner.pod_ref);
            let allocated = ipam.allocate(&config, &owner).await?;
            let result = IpamResult::new(&config, &allocated);
            if let Some(claim) = &owner.ipam_claim {
                // As CIDRs with the range's prefix, as the result gives them.
                let ips: Vec<String> = allocated
                    .iter()
                    .filter_map(|a| ipnet::IpNet::new(a.ip, a.network.prefix_len()).ok())
                    .map(|net| net.to_string())
                    .collect();
                persistent::record_claim(&store, &args.pod_namespace, claim, &ips, &args.pod_name).await?;
            }
            result.to_json(&netconf.cni_version, version).map(Some)
        }
        Command::Del => match ipam.release(&config, &env.container_id, &env.ifname).await {
            Ok(released) => {
                tracing::debug!("DEL {} {}: released {released:?}", env.container_id, env.ifname);
                Ok(None)
            }
            Err(e) => {
                let e = CniError::from(e);
                if worth_retrying_del(&e) { Err(e) } else { Ok(del_given_up(&env, &e)) }
            }
        },
        Command::Check => {
            let prev = netconf
                .prev_result
                .as_ref()
                .ok_or_else(|| CniError::new(codes::INVALID_CONFIG, "CHECK needs prevResult"))?;
            check(&ipam, &config, &env, prev).await.map(|()| None)
        }
        Command::Gc => {
            let Some(node) = node else {
                return Err(CniError::new(
                    codes::INVALID_CONFIG,
                    "GC needs the node name (NODENAME or /etc/hostname)",
                ));
            };
            // Without the list nothing is known to be valid, which is not the same as "nothing is".
            if netconf.valid_attachments.is_none() && netconf.attachments.is_none() {
                return Err(CniError::new(codes::INVALID_CONFIG, "GC needs cni.dev/valid-attachments"));
            }
            let valid: HashSet<(String, String)> = [netconf.valid_attachments, netconf.attachments]
                .into_iter()
                .flatten()
                .flatten()
                .map(|a| (a.container_id, a.ifname))
                .collect();
            let released = ipam.collect_garbage(&config, &node, &netconf.name, &valid).await?;
            tracing::debug!("GC {}: released {released:?}", netconf.name);
            Ok(None)
        }
        Command::Status => {
            let exhausted = ipam.exhausted_pools(&config).await.map_err(|e| not_available(e.into()))?;
            if exhausted.is_empty() {
                Ok(None)
            } else {
                Err(CniError::new(
                    codes::NOT_AVAILABLE,
                    format!("no free address in pool {}", exhausted.join(", ")),
                ))
            }
        }
        Command::Version => Ok(Some(version_reply())),
    }
}

/// Whether a DEL that failed with `e` once the store was reached is answered as a failure. The
/// runtime retries a failed DEL until it succeeds, and the pod cannot finish terminating meanwhile, so
/// only what a retry may cure is: the store busy or unreachable (code 11) and I/O errors (code 5). A
/// pool that does not decode, credentials the store refuses, an object it rejects, fail the same way
/// on every retry.
fn worth_retrying_del(e: &CniError) -> bool {
    matches!(e.code, codes::TRY_AGAIN | codes::IO)
}

/// Answers a DEL that failed for good as done, saying loudly what stays behind: the attachment's
/// entries are still in the store, where the controller's reconciler releases them once the pod is
/// gone (and `whereabouts check` reports a pool that does not decode).
fn del_given_up(env: &CniEnv, e: &CniError) -> Option<Value> {
    tracing::error!(
        "DEL {} {} failed for good: {}; answered as done so that the pod can go. Its addresses stay \
         allocated until the controller's reconciler (or `whereabouts leaks --release`) releases them \
         once the pod is gone",
        env.container_id,
        env.ifname,
        e.msg
    );
    None
}

fn version_reply() -> Value {
    json!({ "cniVersion": LATEST, "supportedVersions": SUPPORTED_VERSIONS })
}

/// Loads the configuration for `purpose`. For a release (DEL, GC) what only ADD uses is not parsed, so
/// a bad `CNI_ARGS` or requested address cannot keep a sandbox from being torn down.
fn load_config(
    netconf: &NetConf,
    args: &CniArgs,
    purpose: Purpose,
    host: &impl Host,
) -> Result<IpamConfig, CniError> {
    let ipam = netconf
        .ipam
        .as_ref()
        .filter(|v| !v.is_null())
        .ok_or_else(|| CniError::new(codes::INVALID_CONFIG, "IPAM config missing 'ipam' key"))?;
    let inline = InlineIpam::parse(ipam)?;
    let flat = find_flat_file(&inline, host)?;
    let requested_ips = match purpose {
        Purpose::Allocate => requested_ips(netconf)?,
        Purpose::Release => Vec::new(),
    };
    let call =
        CallContext { purpose, cni_version: netconf.cni_version.clone(), args: args.clone(), requested_ips };
    let flat = flat.as_ref().map(|(path, content)| FlatFile { path, content });
    Ok(inline.resolve(flat, &call)?)
}

/// The first flat file that exists; one that exists but cannot be read is an error (upstream too).
pub fn find_flat_file(inline: &InlineIpam, host: &impl Host) -> Result<Option<(String, Vec<u8>)>, CniError> {
    for path in inline.flat_file_candidates() {
        match host.read_file(&path) {
            Ok(content) => return Ok(Some((path, content))),
            Err(e) if e.kind() == ErrorKind::NotFound => continue,
            Err(e) => {
                return Err(CniError::new(
                    codes::IO,
                    format!("error opening flat configuration file @ {path} with: {e}"),
                ));
            }
        }
    }
    Ok(None)
}

/// Addresses asked for through the `ips` capability or `args.cni.ips`.
fn requested_ips(netconf: &NetConf) -> Result<Vec<(&'static str, String)>, CniError> {
    let sources = [
        ("runtimeConfig.ips", netconf.runtime_config.as_ref().and_then(|r| r.get("ips"))),
        ("args.cni.ips", netconf.args.as_ref().and_then(|a| a.get("cni")).and_then(|c| c.get("ips"))),
    ];
    let mut out = Vec::new();
    for (key, value) in sources {
        let Some(value) = value.filter(|v| !v.is_null()) else {
            continue;
        };
        let items = value.as_array().ok_or_else(|| {
            CniError::new(
                codes::INVALID_CONFIG,
                format!("invalid {key} {value}: expected a list of addresses"),
            )
        })?;
        for item in items {
            let ip = item.as_str().ok_or_else(|| {
                CniError::new(codes::INVALID_CONFIG, format!("invalid {key} entry {item}: expected a string"))
            })?;
            out.push((key, ip.to_string()));
        }
    }
    Ok(out)
}

/// Opens the configured store. A store that cannot be reached fails the call: there is never a
/// fallback to another store, which could hand out an address another node holds.
///
/// An etcd cluster that cannot be reached (a member restarting) is tried again until `deadline`.
pub async fn open_store(
    datastore: &Datastore,
    node: Option<&str>,
    deadline: Instant,
) -> Result<AnyStore, CniError> {
    match datastore {
        Datastore::File { dir } => Ok(AnyStore::File(FileStore::open(dir)?)),
        #[cfg(feature = "kubernetes")]
        Datastore::Kubernetes { kubeconfig } => KubeStore::connect(std::path::Path::new(kubeconfig))
            .await
            .map(|store| AnyStore::Kubernetes(Box::new(store.with_node(node.unwrap_or_default()))))
            .map_err(|e| CniError::new(codes::INVALID_CONFIG, e.to_string())),
        #[cfg(not(feature = "kubernetes"))]
        Datastore::Kubernetes { .. } => Err(CniError::new(
            codes::UNSUPPORTED_FIELD,
            "datastore \"kubernetes\" is not available in this build (built without the kubernetes feature)",
        )),
        #[cfg(feature = "etcd")]
        Datastore::Etcd(settings) => {
            let mut pause = Duration::from_millis(100);
            loop {
                match EtcdStore::connect(settings).await {
                    Ok(store) => return Ok(AnyStore::Etcd(Box::new(store))),
                    Err(e @ EtcdConnectError::Unreachable { .. }) if Instant::now() + pause < deadline => {
                        tracing::debug!("{e}; trying again");
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_secs(1));
                    }
                    Err(e) => {
                        let code = match e {
                            EtcdConnectError::Invalid { .. } => codes::INVALID_CONFIG,
                            EtcdConnectError::Unreachable { .. } => codes::TRY_AGAIN,
                        };
                        return Err(CniError::new(code, e.to_string()));
                    }
                }
            }
        }
        #[cfg(not(feature = "etcd"))]
        Datastore::Etcd(_) => Err(CniError::new(
            codes::UNSUPPORTED_FIELD,
            "datastore \"etcd\" is not available in this build (built without the etcd feature)",
        )),
    }
}

/// The node name as upstream finds it: `NODENAME`, then `<configuration_path>/nodename`, then
/// `/etc/hostname`.
fn node_name(env: &CniEnv, config: &IpamConfig, host: &impl Host) -> Option<String> {
    if let Some(name) = &env.node_name {
        return Some(name.clone());
    }
    let from_file = config.configuration_path.iter().map(|dir| format!("{dir}/nodename"));
    from_file.chain(["/etc/hostname".to_string()]).find_map(|path| {
        let content = host.read_file(&path).ok()?;
        let name = String::from_utf8_lossy(&content[..content.len().min(1024)]).trim().to_string();
        (!name.is_empty()).then_some(name)
    })
}

async fn check<S: whereabouts_store::Store>(
    ipam: &Ipam<'_, S>,
    config: &IpamConfig,
    env: &CniEnv,
    prev: &Value,
) -> Result<(), CniError> {
    let listed = addresses_of(prev);
    let statics: Vec<IpAddr> = config.addresses.iter().map(|a| a.address.addr()).collect();
    let held = ipam.held(config, &env.container_id, &env.ifname).await?;
    for (managed, held) in config.ranges.iter().zip(held) {
        let network = managed.network;
        let Some(ip) = held else {
            return Err(CniError::new(
                codes::INTERNAL,
                format!(
                    "no allocation for container {} interface {} in range {network}",
                    env.container_id, env.ifname
                ),
            ));
        };
        if !listed.contains(&ip) {
            return Err(CniError::new(
                codes::INTERNAL,
                format!("the store holds {ip} in range {network}, but prevResult does not list it"),
            ));
        }
        if let Some(other) = listed.iter().find(|a| network.contains(*a) && **a != ip && !statics.contains(a))
        {
            return Err(CniError::new(
                codes::INTERNAL,
                format!("prevResult lists {other} in range {network}, but the store holds {ip}"),
            ));
        }
    }
    Ok(())
}
