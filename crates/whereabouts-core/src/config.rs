//! The IPAM configuration: upstream's keys, decoding rules, flat-file merge and normalisation
//! (shared/upstream-behaviour.md §1.2-1.5), plus the validation upstream lacks.
//!
//! Loading has two pure steps around one I/O step the shell performs:
//! 1. [`InlineIpam::parse`] decodes the inline `ipam` object (keys matched case-insensitively, the last
//!    duplicate winning, unknown keys ignored, wrong JSON types refused) and checks `type`;
//! 2. the shell looks for the flat file ([`InlineIpam::flat_file_candidates`]) and reads it;
//! 3. [`InlineIpam::resolve`] merges the flat file in (inline non-empty values win, objects merge field by
//!    field, arrays are replaced whole, `enable_overlapping_ranges` only ever comes from inline) and
//!    validates everything, refusing bad values with an error that names the key and the value.

use std::net::IpAddr;
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::addr::{Family, parse_cidr_sloppy, parse_cidr_strict, parse_ip_sloppy};
use crate::cni_args::CniArgs;
use crate::duration::parse_duration;
use crate::error::ConfigError;
use crate::range::{IpRange, RangeProblem, pool_name};
use crate::slice::{SliceError, Slicing, parse_slice_size};

/// Where the embedded file store keeps its pools unless `file_store_dir` says otherwise.
pub const DEFAULT_FILE_STORE_DIR: &str = "/var/lib/cni/whereabouts";

/// The etcd store's key prefix unless `etcd_key_prefix` says otherwise.
pub const DEFAULT_ETCD_KEY_PREFIX: &str = "/whereabouts/";

/// The flat-file locations searched after an inline `configuration_path`, in order (upstream §1.3).
pub const FLAT_FILE_PATHS: [&str; 3] = [
    "/etc/kubernetes/cni/net.d/whereabouts.d/whereabouts.conf",
    "/etc/cni/net.d/whereabouts.d/whereabouts.conf",
    "/host/etc/cni/net.d/whereabouts.d/whereabouts.conf",
];

// === raw model (keys lowercased before decoding) ===

#[derive(Debug, Default, Deserialize)]
struct RawIpam {
    #[serde(rename = "type")]
    plugin_type: Option<String>,
    range: Option<String>,
    range_start: Option<String>,
    range_end: Option<String>,
    exclude: Option<Vec<String>>,
    #[serde(rename = "ipranges")]
    ip_ranges: Option<Vec<RawRange>>,
    gateway: Option<String>,
    routes: Option<Vec<RawRoute>>,
    dns: Option<RawDns>,
    addresses: Option<Vec<RawAddress>>,
    enable_overlapping_ranges: Option<bool>,
    network_name: Option<String>,
    node_slice_size: Option<String>,
    release_cooldown: Option<String>,
    sticky_statefulsets: Option<bool>,
    kubernetes: Option<RawKubernetes>,
    configuration_path: Option<String>,
    log_file: Option<String>,
    log_level: Option<String>,
    // Accepted for compatibility; the Lease they tune does not exist in whereabouts-rs.
    #[allow(dead_code)]
    leader_lease_duration: Option<i64>,
    #[allow(dead_code)]
    leader_renew_deadline: Option<i64>,
    #[allow(dead_code)]
    leader_retry_period: Option<i64>,
    #[allow(dead_code)]
    sleep_for_race: Option<i64>,
    #[allow(dead_code)]
    reconciler_cron_expression: Option<String>,
    datastore: Option<String>,
    file_store_dir: Option<String>,
    etcd_host: Option<String>,
    etcd_username: Option<String>,
    etcd_password: Option<String>,
    etcd_key_file: Option<String>,
    etcd_cert_file: Option<String>,
    etcd_ca_cert_file: Option<String>,
    etcd_key_prefix: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct RawRange {
    range: Option<String>,
    range_start: Option<String>,
    range_end: Option<String>,
    exclude: Option<Vec<String>>,
    gateway: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct RawRoute {
    dst: Option<String>,
    gw: Option<String>,
    mtu: Option<i64>,
    advmss: Option<i64>,
    priority: Option<i64>,
    table: Option<i64>,
    scope: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
struct RawDns {
    nameservers: Option<Vec<String>>,
    domain: Option<String>,
    search: Option<Vec<String>>,
    options: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
struct RawAddress {
    address: Option<String>,
    gateway: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct RawKubernetes {
    kubeconfig: Option<String>,
}

// === validated model ===

/// A route handed back in the result, as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Destination, host bits kept as written.
    pub dst: IpNet,
    /// Next hop.
    pub gw: Option<IpAddr>,
    /// Route MTU (CNI 1.1).
    pub mtu: Option<i64>,
    /// Advertised MSS (CNI 1.1).
    pub advmss: Option<i64>,
    /// Route priority (CNI 1.1).
    pub priority: Option<i64>,
    /// Routing table (CNI 1.1).
    pub table: Option<i64>,
    /// Route scope (CNI 1.1).
    pub scope: Option<i64>,
}

/// DNS settings handed back in the result, as configured.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Dns {
    /// Name servers.
    pub nameservers: Vec<String>,
    /// Local domain.
    pub domain: Option<String>,
    /// Search domains.
    pub search: Vec<String>,
    /// Resolver options.
    pub options: Vec<String>,
}

impl Dns {
    /// Whether nothing is set.
    pub fn is_empty(&self) -> bool {
        self.nameservers.is_empty()
            && self.domain.is_none()
            && self.search.is_empty()
            && self.options.is_empty()
    }
}

/// An address returned as is, after the allocated ones; never stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticAddress {
    /// The address with its prefix, host bits kept.
    pub address: IpNet,
    /// Its gateway.
    pub gateway: Option<IpAddr>,
}

/// The pool a range's allocations are stored in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolTarget {
    /// Its name (upstream's `IPPoolName`).
    pub name: String,
    /// The network its `spec.range` holds: offsets count from its address.
    pub network: IpNet,
}

/// One range to allocate from, with the address this call asked for in it (if any).
///
/// A range is allocated cluster-wide, in the pool named after it, or, with `node_slice_size`, only
/// inside the slice of it assigned to this node ([`ManagedRange::in_node_slice`]), in that node's
/// pool of the slice. Either way the CNI result carries the configured range's prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManagedRange {
    /// The addresses allocation picks from: the configured range, or the node's slice of it.
    pub range: IpRange,
    /// An address requested through `runtimeConfig.ips`, `args.cni.ips` or `CNI_ARGS` `IP=` that lies
    /// in this range's network: it is allocated (reserved) instead of the lowest free one, also outside
    /// `range_start`..`range_end` and inside `exclude` (those shape the dynamic pick only).
    pub requested: Option<IpAddr>,
    /// The gateway of this range's network: its own `gateway` (an `ipRanges` entry's), else the
    /// top-level one when it lies in this network. Returned with the range's address, never handed out.
    pub gateway: Option<IpAddr>,
    /// Where the allocations are stored.
    pub pool: PoolTarget,
    /// The configured range's network, whose prefix the CNI result carries (also when sliced, as
    /// upstream since commit f2102bfc).
    pub network: IpNet,
}

impl ManagedRange {
    /// A range allocated cluster-wide, in the pool named after it (`[network_name-]<range>`).
    pub fn new(
        range: IpRange,
        requested: Option<IpAddr>,
        gateway: Option<IpAddr>,
        network_name: &str,
    ) -> Self {
        let network = range.network();
        let pool = PoolTarget { name: pool_name(network_name, None, &network), network };
        ManagedRange { range, requested, gateway, pool, network }
    }

    /// This range narrowed to `slice`, the slice of it assigned to node `node`, where `inside` is what
    /// the slice offers ([`Slicing::check_assigned`]): allocation picks from `inside`, in the pool
    /// `[network_name-]<node>-<slice>` whose `spec.range` is the slice, and the result keeps this range's
    /// prefix. A requested address must lie in the slice.
    pub fn in_node_slice(
        &self,
        network_name: &str,
        node: &str,
        slice: IpNet,
        inside: IpRange,
    ) -> Result<ManagedRange, ConfigError> {
        if let Some(ip) = self.requested.filter(|ip| !slice.contains(ip)) {
            return Err(ConfigError::invalid(
                "requested address",
                ip.to_string(),
                format!("lies outside {}, the slice of node {node}", inside.describe()),
            ));
        }
        let released = self.releasing_in_node_slice(network_name, node, slice);
        Ok(ManagedRange { range: inside, requested: self.requested, ..released })
    }

    /// This range's pool `[network_name-]<node>-<slice>` of a slice node `node` holds or held, to
    /// release from (DEL and GC look in every one: a re-slicing moves a node off a slice in which its
    /// pods keep their addresses). Nothing is allocated from it, so `range` stays this range's and
    /// nothing is requested.
    pub fn releasing_in_node_slice(&self, network_name: &str, node: &str, slice: IpNet) -> ManagedRange {
        let pool = PoolTarget { name: pool_name(network_name, Some(node), &slice), network: slice };
        ManagedRange { pool, requested: None, ..self.clone() }
    }
}

/// Where allocations are stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Datastore {
    /// The embedded file store in a directory (`"datastore": "file"`).
    File {
        /// `file_store_dir`.
        dir: String,
    },
    /// Kubernetes custom resources (the default, as upstream).
    Kubernetes {
        /// `kubernetes.kubeconfig`.
        kubeconfig: String,
    },
    /// etcd v3 (`"datastore": "etcd"`).
    Etcd(EtcdConfig),
}

/// The etcd store's settings: upstream's legacy `etcd_*` keys and `etcd_key_prefix`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EtcdConfig {
    /// `etcd_host`: endpoints, comma-separated, with or without `http://` / `https://`.
    pub hosts: String,
    /// `etcd_username`.
    pub username: Option<String>,
    /// `etcd_password`.
    pub password: Option<String>,
    /// `etcd_key_file`: the client key (PEM).
    pub key_file: Option<String>,
    /// `etcd_cert_file`: the client certificate (PEM).
    pub cert_file: Option<String>,
    /// `etcd_ca_cert_file`: the CA that signed the server certificate (PEM).
    pub ca_cert_file: Option<String>,
    /// `etcd_key_prefix` (default [`DEFAULT_ETCD_KEY_PREFIX`]): every key lives below it.
    pub key_prefix: String,
}

/// Upstream's log levels, most verbose first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogLevel {
    /// Everything.
    Debug,
    /// Informational messages and errors.
    Verbose,
    /// Errors only.
    Error,
    /// Nothing but fatal failures.
    Panic,
}

impl LogLevel {
    /// Upstream's name of the level, as printed in log lines.
    pub fn name(self) -> &'static str {
        match self {
            LogLevel::Debug => "debug",
            LogLevel::Verbose => "verbose",
            LogLevel::Error => "error",
            LogLevel::Panic => "panic",
        }
    }
}

/// Logging settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogSettings {
    /// `log_file`: appended to besides stderr.
    pub file: Option<String>,
    /// `log_level` (default `debug`, as upstream).
    pub level: LogLevel,
    /// Upstream's warning for an unknown `log_level`, which leaves the level unchanged.
    pub warning: Option<String>,
}

/// A fully loaded and validated IPAM configuration for one CNI call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpamConfig {
    /// Ranges in allocation order: top-level `range` first, then `ipRanges`.
    pub ranges: Vec<ManagedRange>,
    /// The top-level `gateway`: returned on the static addresses whose subnet contains it (each range
    /// carries its own in [`ManagedRange::gateway`]).
    pub gateway: Option<IpAddr>,
    /// `routes`.
    pub routes: Vec<Route>,
    /// `dns`.
    pub dns: Dns,
    /// Static `addresses`, then requested addresses outside every candidate interval.
    pub addresses: Vec<StaticAddress>,
    /// `network_name`.
    pub network_name: String,
    /// `enable_overlapping_ranges` (inline value only; default true).
    pub enable_overlapping_ranges: bool,
    /// `node_slice_size`.
    pub node_slice_size: Option<String>,
    /// `release_cooldown`: how long a released address is not handed out again while the range has
    /// other free addresses (`None`: no cooldown).
    pub release_cooldown: Option<Duration>,
    /// `sticky_statefulsets`: a StatefulSet's pod keeps its addresses across DEL while the StatefulSet
    /// wants its ordinal.
    pub sticky_statefulsets: bool,
    /// `configuration_path` after the merge (where the installer's `nodename` file lives).
    pub configuration_path: Option<String>,
    /// The store.
    pub datastore: Datastore,
    /// Logging.
    pub log: LogSettings,
}

impl IpamConfig {
    /// An ADD must give the pod an address: a configuration without `range`, `ipRanges` or `addresses`
    /// (and no requested address outside every range) would answer success with none, and the pod
    /// would get an interface nobody addressed.
    pub fn check_assigns_an_address(&self) -> Result<(), ConfigError> {
        if self.ranges.is_empty() && self.addresses.is_empty() {
            return Err(ConfigError::invalid(
                "range",
                "",
                "nothing to assign: set range, ipRanges or addresses (or request an address outside any range)",
            ));
        }
        Ok(())
    }

    /// `node_slice_size` as a slicing of the first range (the only one upstream's controller slices);
    /// `None` without `node_slice_size`. Errors name `node_slice_size`.
    pub fn node_slicing(&self) -> Result<Option<Slicing>, ConfigError> {
        let Some(written) = &self.node_slice_size else { return Ok(None) };
        let invalid = |reason: String| ConfigError::invalid("node_slice_size", written, reason);
        let first = self.ranges.first().ok_or_else(|| invalid("there is no range to slice".into()))?;
        let size = parse_slice_size(written)
            .map_err(|_| invalid("expected a prefix length such as \"/28\"".into()))?;
        Slicing::new(first.range.clone(), size).map(Some).map_err(|e| {
            invalid(match e {
                SliceError::LargerThanRange { range, .. } => {
                    format!("slices cannot be larger than the range {range}")
                }
                SliceError::TooSmall { .. } => "a slice needs at least two host bits".into(),
                SliceError::NotAPrefix(_) => "expected a prefix length such as \"/28\"".into(),
            })
        })
    }
}

/// The flat file as read by the shell.
#[derive(Debug, Clone, Copy)]
pub struct FlatFile<'a> {
    /// Where it was found.
    pub path: &'a str,
    /// Its content.
    pub content: &'a [u8],
}

/// What a call needs the configuration for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Purpose {
    /// ADD, CHECK, STATUS: everything is validated.
    #[default]
    Allocate,
    /// DEL and GC: only what finds the pools is needed, so only that is checked (see
    /// [`IpamConfig`]'s release view): a sandbox whose ADD was refused can always be torn down.
    Release,
}

/// What the CNI call adds to the configuration.
#[derive(Debug, Clone, Default)]
pub struct CallContext {
    /// What the configuration is for.
    pub purpose: Purpose,
    /// The configuration's `cniVersion`.
    pub cni_version: String,
    /// Parsed `CNI_ARGS`.
    pub args: CniArgs,
    /// Requested addresses from the network configuration: (`runtimeConfig.ips` or `args.cni.ips`, value).
    pub requested_ips: Vec<(&'static str, String)>,
}

// === loading ===

/// Lowercases every object key, recursively; with duplicates the last one wins, as Go's decoder does.
fn lowercase_keys(value: &Value) -> Value {
    match value {
        Value::Object(map) => {
            let mut out = Map::with_capacity(map.len());
            for (k, v) in map {
                let key = k.to_ascii_lowercase();
                // Go's decoder leaves a field unchanged on `null`, so a later `null` duplicate does not
                // undo an earlier value.
                if v.is_null() && out.contains_key(&key) {
                    continue;
                }
                out.insert(key, lowercase_keys(v));
            }
            Value::Object(out)
        }
        Value::Array(items) => Value::Array(items.iter().map(lowercase_keys).collect()),
        other => other.clone(),
    }
}

fn decode(context: &str, value: &Value) -> Result<RawIpam, ConfigError> {
    serde_path_to_error::deserialize(value).map_err(|e| ConfigError::Decode {
        context: context.to_string(),
        message: format!("{}: {}", e.path(), e.inner()),
    })
}

/// Go's "empty value" for mergo: `null`, `""`, `0`, `false`, `[]`.
fn is_empty_value(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(_) => false,
    }
}

/// mergo `Merge` without override: inline non-empty values win, objects merge field by field.
fn merge(inline: &mut Map<String, Value>, flat: &Map<String, Value>) {
    for (key, flat_value) in flat {
        match inline.get_mut(key) {
            None => {
                inline.insert(key.clone(), flat_value.clone());
            }
            Some(Value::Object(inline_obj)) => {
                if let Value::Object(flat_obj) = flat_value {
                    merge(inline_obj, flat_obj);
                }
            }
            Some(inline_value) if is_empty_value(inline_value) => *inline_value = flat_value.clone(),
            Some(_) => {}
        }
    }
}

/// The inline `ipam` object, decoded and type-checked.
#[derive(Debug)]
pub struct InlineIpam {
    value: Map<String, Value>,
    raw: RawIpam,
}

impl InlineIpam {
    /// Decodes the inline `ipam` object and checks that its `type` is `whereabouts`.
    pub fn parse(ipam: &Value) -> Result<Self, ConfigError> {
        let Value::Object(value) = lowercase_keys(ipam) else {
            return Err(ConfigError::Decode {
                context: "ipam".into(),
                message: format!("expected an object, found {ipam}"),
            });
        };
        let raw = decode("ipam", &Value::Object(value.clone()))?;
        let plugin_type = raw.plugin_type.as_deref().unwrap_or("");
        if plugin_type != "whereabouts" {
            return Err(ConfigError::invalid(
                "ipam.type",
                plugin_type,
                "only networks whose IPAM type is 'whereabouts' are handled",
            ));
        }
        Ok(InlineIpam { value, raw })
    }

    /// The flat-file paths to try, in order: an inline `configuration_path` first, then upstream's.
    pub fn flat_file_candidates(&self) -> Vec<String> {
        let inline = self.raw.configuration_path.iter().filter(|p| !p.is_empty()).cloned();
        inline.chain(FLAT_FILE_PATHS.iter().map(|p| p.to_string())).collect()
    }

    /// Whether the inline configuration names a usable store by itself, so that no flat file is needed
    /// (a deliberate difference: upstream always requires the flat file).
    pub fn is_complete(&self) -> bool {
        let set = |v: &Option<String>| v.as_deref().is_some_and(|s| !s.is_empty());
        match self.raw.datastore.as_deref() {
            Some("file") => true,
            Some("etcd") => set(&self.raw.etcd_host),
            _ => self.raw.kubernetes.as_ref().is_some_and(|k| set(&k.kubeconfig)),
        }
    }

    /// Merges the flat file (when one was found) and validates the result.
    pub fn resolve(self, flat: Option<FlatFile<'_>>, call: &CallContext) -> Result<IpamConfig, ConfigError> {
        let overlapping = self.raw.enable_overlapping_ranges.unwrap_or(true);
        let raw = match flat {
            Some(flat) => {
                let context = format!("flat file {}", flat.path);
                let parsed: Value = serde_json::from_slice(flat.content)
                    .map_err(|e| ConfigError::Decode { context: context.clone(), message: e.to_string() })?;
                let Value::Object(flat_map) = lowercase_keys(&parsed) else {
                    return Err(ConfigError::Decode { context, message: "expected a JSON object".into() });
                };
                decode(&context, &Value::Object(flat_map.clone()))?;
                let mut merged = self.value;
                merge(&mut merged, &flat_map);
                decode("merged configuration", &Value::Object(merged))?
            }
            None if self.is_complete() => self.raw,
            None => return Err(ConfigError::Missing("config file not found".into())),
        };
        validate(raw, overlapping, call)
    }
}

/// Which reserved address of an IPv4 subnet `ip` is, if any: a pod given the network or the broadcast
/// address gets an interface that cannot talk, so asking for one is a mistake to name. (A range always
/// has usable addresses, so its prefix is at most /30 and both exist.)
fn subnet_role(network: IpNet, ip: IpAddr) -> Option<&'static str> {
    if !ip.is_ipv4() {
        None
    } else if ip == network.network() {
        Some("network address")
    } else if ip == network.broadcast() {
        Some("broadcast address")
    } else {
        None
    }
}

fn non_empty(value: Option<String>) -> Option<String> {
    value.filter(|v| !v.is_empty())
}

/// An IP value (`range_start`, `range_end`, a gateway), parsed, with the text it was written as (errors quote that).
#[derive(Debug, Clone)]
struct Bound {
    ip: IpAddr,
    written: String,
}

fn parse_bound(key: &str, value: Option<String>, sloppy: bool) -> Result<Option<Bound>, ConfigError> {
    let Some(written) = non_empty(value) else {
        return Ok(None);
    };
    let parsed = if sloppy { parse_ip_sloppy(&written) } else { written.parse().ok() };
    match parsed {
        Some(ip) => Ok(Some(Bound { ip, written })),
        None => Err(ConfigError::invalid(key, written, "not an IP address")),
    }
}

/// `exclude` entries, parsed, each with the text it was written as.
fn parse_exclude(key: &str, entries: Option<Vec<String>>) -> Result<Vec<(IpNet, String)>, ConfigError> {
    entries
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .map(|(i, entry)| {
            match parse_cidr_strict(&entry).or_else(|| entry.parse::<IpAddr>().ok().map(IpNet::from)) {
                Some(net) => Ok((net, entry)),
                None => {
                    Err(ConfigError::invalid(format!("{key}[{i}]"), entry, "not a CIDR or an IP address"))
                }
            }
        })
        .collect()
}

/// Builds one range from `range` (CIDR or `first-last/prefix`), `range_start`, `range_end`, `exclude`.
/// Errors name the key the user wrote and quote the value as written.
fn build_range(
    prefix: &str,
    range: String,
    start: Option<Bound>,
    end: Option<Bound>,
    exclude: Vec<(IpNet, String)>,
) -> Result<IpRange, ConfigError> {
    let key = format!("{prefix}range");
    let range_end_syntax = range.contains('-');
    let (network, start, end) = match range.split_once('-') {
        Some((first, cidr)) => {
            let first_ip = parse_ip_sloppy(first).ok_or_else(|| {
                ConfigError::invalid(&key, &range, format!("range start {first:?} is not an IP"))
            })?;
            let net = parse_cidr_sloppy(cidr)
                .ok_or_else(|| ConfigError::invalid(&key, &range, format!("{cidr:?} is not a CIDR")))?;
            if !net.trunc().contains(&first_ip) {
                return Err(ConfigError::invalid(
                    &key,
                    &range,
                    format!("range start {first_ip} is outside {}", net.trunc()),
                ));
            }
            let start = Bound { ip: first_ip, written: first.to_string() };
            let end = Bound { ip: net.addr(), written: cidr.to_string() };
            (net, Some(start), Some(end))
        }
        None => {
            let net =
                parse_cidr_sloppy(&range).ok_or_else(|| ConfigError::invalid(&key, &range, "not a CIDR"))?;
            (net, start, end)
        }
    };
    let blocks = exclude.iter().map(|(net, _)| *net).collect();
    IpRange::new(network, start.as_ref().map(|b| b.ip), end.as_ref().map(|b| b.ip), blocks).map_err(
        |problem| match problem {
            RangeProblem::TooSmall => {
                ConfigError::invalid(&key, &range, "the subnet has no usable addresses")
            }
            RangeProblem::OutsideNetwork(ip) => {
                let (which, written) = match &start {
                    Some(b) if b.ip == ip => ("range_start", b.written.clone()),
                    _ => ("range_end", end.as_ref().map_or_else(|| ip.to_string(), |b| b.written.clone())),
                };
                ConfigError::invalid(
                    format!("{prefix}{which}"),
                    written,
                    format!("outside {}", network.trunc()),
                )
            }
            RangeProblem::StartAfterEnd if range_end_syntax => {
                ConfigError::invalid(&key, &range, "its first address is after its last")
            }
            RangeProblem::StartAfterEnd => ConfigError::invalid(
                format!("{prefix}range_start"),
                start.as_ref().map(|b| b.written.clone()).unwrap_or_default(),
                format!("after range_end {}", end.as_ref().map(|b| b.written.as_str()).unwrap_or_default()),
            ),
            RangeProblem::ExcludeFamily(block) => {
                let (key, written) = match exclude.iter().position(|(net, _)| *net == block) {
                    Some(i) => (format!("{prefix}exclude[{i}]"), exclude[i].1.clone()),
                    None => (format!("{prefix}exclude"), block.to_string()),
                };
                ConfigError::invalid(
                    key,
                    written,
                    format!("not of the address family of {}", network.trunc()),
                )
            }
        },
    )
}

fn datastore_of(raw: &RawIpam) -> Result<Datastore, ConfigError> {
    Ok(match raw.datastore.as_deref().unwrap_or("") {
        "file" => Datastore::File {
            dir: non_empty(raw.file_store_dir.clone()).unwrap_or_else(|| DEFAULT_FILE_STORE_DIR.into()),
        },
        "" | "kubernetes" => Datastore::Kubernetes {
            kubeconfig: non_empty(raw.kubernetes.as_ref().and_then(|k| k.kubeconfig.clone())).ok_or_else(
                || {
                    ConfigError::Missing(
                        "you have not configured the storage engine (looks like you're using an invalid \
                     `kubernetes.kubeconfig` parameter in your config)"
                            .into(),
                    )
                },
            )?,
        },
        "etcd" => Datastore::Etcd(EtcdConfig {
            hosts: non_empty(raw.etcd_host.clone()).ok_or_else(|| {
                ConfigError::invalid("etcd_host", "", "required with \"datastore\": \"etcd\"")
            })?,
            username: non_empty(raw.etcd_username.clone()),
            password: non_empty(raw.etcd_password.clone()),
            key_file: non_empty(raw.etcd_key_file.clone()),
            cert_file: non_empty(raw.etcd_cert_file.clone()),
            ca_cert_file: non_empty(raw.etcd_ca_cert_file.clone()),
            key_prefix: non_empty(raw.etcd_key_prefix.clone())
                .unwrap_or_else(|| DEFAULT_ETCD_KEY_PREFIX.into()),
        }),
        other => {
            return Err(ConfigError::invalid(
                "datastore",
                other,
                "expected \"file\", \"kubernetes\" or \"etcd\"",
            ));
        }
    })
}

fn log_settings(raw: &RawIpam) -> LogSettings {
    let (level, warning) = match non_empty(raw.log_level.clone()) {
        None => (LogLevel::Debug, None),
        Some(l) => match l.to_ascii_lowercase().as_str() {
            "debug" => (LogLevel::Debug, None),
            "verbose" => (LogLevel::Verbose, None),
            "error" => (LogLevel::Error, None),
            "panic" => (LogLevel::Panic, None),
            _ => (LogLevel::Debug, Some(format!("Whereabouts logging: cannot set logging level to {l}"))),
        },
    };
    LogSettings { file: non_empty(raw.log_file.clone()), level, warning }
}

/// `network_name` prefixes object names, so it must be a valid name itself (upstream does not check it
/// and then fails on every write).
fn checked_network_name(raw: &RawIpam) -> Result<String, ConfigError> {
    let name = raw.network_name.clone().unwrap_or_default();
    let valid_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.';
    let edge = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if name.is_empty()
        || (name.chars().all(valid_char) && edge(name.chars().next()) && edge(name.chars().last()))
    {
        Ok(name)
    } else {
        Err(ConfigError::invalid(
            "network_name",
            name,
            "must be lower-case letters, digits, '-' and '.', starting and ending with a letter or digit",
        ))
    }
}

/// The configuration DEL and GC work from: every range whose CIDR parses, by its network alone (that
/// is all that names a pool), and none of the values only ADD uses. So a configuration ADD refuses
/// (or one upstream accepted and we refuse) can still be torn down.
fn release_view(raw: RawIpam, enable_overlapping_ranges: bool) -> Result<IpamConfig, ConfigError> {
    let datastore = datastore_of(&raw)?;
    let log = log_settings(&raw);
    let network_name = checked_network_name(&raw);
    let written = non_empty(raw.range.clone())
        .into_iter()
        .chain(raw.ip_ranges.unwrap_or_default().into_iter().filter_map(|r| non_empty(r.range)));
    let ranges = match network_name {
        // No pool can have been written under an invalid name.
        Err(_) => Vec::new(),
        Ok(ref name) => written
            .filter_map(|range| {
                let cidr = range.split_once('-').map_or(range.as_str(), |(_, cidr)| cidr);
                let network = parse_cidr_sloppy(cidr)?;
                IpRange::new(network, None, None, Vec::new()).ok()
            })
            .map(|range| ManagedRange::new(range, None, None, name))
            .collect(),
    };
    Ok(IpamConfig {
        ranges,
        gateway: None,
        routes: Vec::new(),
        dns: Dns::default(),
        addresses: Vec::new(),
        network_name: network_name.unwrap_or_default(),
        enable_overlapping_ranges,
        node_slice_size: non_empty(raw.node_slice_size),
        // A value ADD would refuse starts no cooldown: DEL must still release.
        release_cooldown: release_cooldown(raw.release_cooldown).ok().flatten(),
        sticky_statefulsets: raw.sticky_statefulsets.unwrap_or(false),
        configuration_path: non_empty(raw.configuration_path),
        datastore,
        log,
    })
}

/// `release_cooldown`, parsed; `None` when unset, empty or zero.
fn release_cooldown(written: Option<String>) -> Result<Option<Duration>, ConfigError> {
    let Some(written) = non_empty(written) else { return Ok(None) };
    let cooldown = parse_duration(&written)
        .map_err(|e| ConfigError::invalid("release_cooldown", &written, e.to_string()))?;
    Ok(Some(cooldown).filter(|c| !c.is_zero()))
}

fn validate(
    raw: RawIpam,
    enable_overlapping_ranges: bool,
    call: &CallContext,
) -> Result<IpamConfig, ConfigError> {
    if call.purpose == Purpose::Release {
        return release_view(raw, enable_overlapping_ranges);
    }
    let network_name = checked_network_name(&raw)?;
    let datastore = datastore_of(&raw)?;
    let log = log_settings(&raw);
    // Ranges: the top-level one first, then ipRanges (upstream §1.5 steps 8-9), each with its own
    // gateway when an ipRanges entry sets one.
    let mut ranges: Vec<IpRange> = Vec::new();
    let mut own_gateways: Vec<Option<IpAddr>> = Vec::new();
    match non_empty(raw.range) {
        Some(range) => {
            let start = parse_bound("range_start", raw.range_start, true)?;
            let end = parse_bound("range_end", raw.range_end, true)?;
            let exclude = parse_exclude("exclude", raw.exclude)?;
            ranges.push(build_range("", range, start, end, exclude)?);
            own_gateways.push(None);
        }
        None => {
            for (key, value) in [("range_start", &raw.range_start), ("range_end", &raw.range_end)] {
                if let Some(v) = value.as_ref().filter(|v| !v.is_empty()) {
                    return Err(ConfigError::invalid(key, v, "set without a top-level range"));
                }
            }
            if let Some(first) = raw.exclude.as_ref().and_then(|e| e.first()) {
                return Err(ConfigError::invalid("exclude[0]", first, "set without a top-level range"));
            }
        }
    }
    for (i, entry) in raw.ip_ranges.unwrap_or_default().into_iter().enumerate() {
        let prefix = format!("ipRanges[{i}].");
        let range = non_empty(entry.range)
            .ok_or_else(|| ConfigError::invalid(format!("{prefix}range"), "", "a range is required"))?;
        let start = parse_bound(&format!("{prefix}range_start"), entry.range_start, false)?;
        let end = parse_bound(&format!("{prefix}range_end"), entry.range_end, false)?;
        let exclude = parse_exclude(&format!("{prefix}exclude"), entry.exclude)?;
        let gateway = parse_bound(&format!("{prefix}gateway"), entry.gateway, false)?;
        let range = build_range(&prefix, range, start, end, exclude)?;
        if let Some(gateway) = gateway.as_ref().filter(|g| !range.contains(g.ip)) {
            return Err(ConfigError::invalid(
                format!("{prefix}gateway"),
                &gateway.written,
                format!("lies outside the range's network {}", range.network()),
            ));
        }
        ranges.push(range);
        own_gateways.push(gateway.map(|g| g.ip));
    }
    for (i, a) in ranges.iter().enumerate() {
        if let Some(b) = ranges[..i].iter().find(|b| b.overlaps(a)) {
            return Err(ConfigError::invalid(
                "ipRanges",
                a.network().to_string(),
                format!("overlaps {}; every range of a network must be disjoint", b.network()),
            ));
        }
    }

    let routes = raw
        .routes
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            let dst_value = r.dst.unwrap_or_default();
            let dst = parse_cidr_strict(&dst_value)
                .ok_or_else(|| ConfigError::invalid(format!("routes[{i}].dst"), &dst_value, "not a CIDR"))?;
            let gw = parse_bound(&format!("routes[{i}].gw"), r.gw, false)?.map(|b| b.ip);
            Ok(Route {
                dst,
                gw,
                mtu: r.mtu,
                advmss: r.advmss,
                priority: r.priority,
                table: r.table,
                scope: r.scope,
            })
        })
        .collect::<Result<Vec<_>, ConfigError>>()?;

    let dns = raw.dns.map_or_else(Dns::default, |d| Dns {
        nameservers: d.nameservers.unwrap_or_default(),
        domain: non_empty(d.domain),
        search: d.search.unwrap_or_default(),
        options: d.options.unwrap_or_default(),
    });

    let mut addresses = raw
        .addresses
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .map(|(i, a)| {
            let value = a.address.unwrap_or_default();
            let address = parse_cidr_sloppy(&value).ok_or_else(|| {
                ConfigError::invalid(format!("addresses[{i}].address"), &value, "not a CIDR")
            })?;
            let gateway = parse_bound(&format!("addresses[{i}].gateway"), a.gateway, false)?.map(|b| b.ip);
            Ok(StaticAddress { address, gateway })
        })
        .collect::<Result<Vec<_>, ConfigError>>()?;

    // Requested addresses: one in a range's network is allocated from that range (anywhere in it: a
    // dynamic interval carved out of a subnet leaves the rest for fixed addresses); one outside every
    // range is returned as a static address. The same address asked for twice counts once.
    let mut requested: Vec<Option<IpAddr>> = vec![None; ranges.len()];
    let from_conf = call.requested_ips.iter().map(|(key, value)| {
        let net = parse_cidr_sloppy(value);
        (*key, value.clone(), net.map(|n| n.addr()).or_else(|| parse_ip_sloppy(value)), net)
    });
    let from_args = call.args.ips.iter().map(|r| ("CNI_ARGS IP", r.to_string(), Some(r.ip), r.net));
    for (key, value, ip, net) in from_conf.chain(from_args) {
        let Some(ip) = ip else {
            return Err(ConfigError::invalid(key, value, "not an IP address or CIDR"));
        };
        match ranges.iter().position(|r| r.contains(ip)) {
            Some(i) => {
                if let Some(problem) = subnet_role(ranges[i].network(), ip) {
                    return Err(ConfigError::invalid(
                        key,
                        value,
                        format!("is the {problem} of {}", ranges[i].network()),
                    ));
                }
                match requested[i] {
                    Some(previous) if previous != ip => {
                        return Err(ConfigError::invalid(
                            key,
                            value,
                            format!("{previous} is already requested in range {}", ranges[i].network()),
                        ));
                    }
                    _ => requested[i] = Some(ip),
                }
            }
            None => {
                let address = net.ok_or_else(|| {
                    ConfigError::invalid(key, &value, "outside every range, so it needs a prefix length")
                })?;
                if addresses.iter().any(|a| a.address == address) {
                    continue;
                }
                let gateway = call.args.gateways.iter().copied().find(|g| address.contains(g));
                addresses.push(StaticAddress { address, gateway });
            }
        }
    }

    let old_result_format = matches!(call.cni_version.as_str(), "" | "0.1.0" | "0.2.0");
    for family in [Family::V4, Family::V6] {
        let count = addresses.iter().filter(|a| Family::of(a.address.addr()) == family).count();
        if old_result_format && count > 1 {
            return Err(ConfigError::invalid(
                "cniVersion",
                &call.cni_version,
                format!("does not support more than one static {family} address"),
            ));
        }
    }

    let gateway = match non_empty(raw.gateway) {
        None => None,
        Some(value) => {
            let gw = parse_ip_sloppy(&value)
                .ok_or_else(|| ConfigError::invalid("gateway", &value, "not an IP address"))?;
            let inside =
                ranges.iter().any(|r| r.contains(gw)) || addresses.iter().any(|a| a.address.contains(&gw));
            if !inside {
                return Err(ConfigError::invalid("gateway", &value, "lies outside every range"));
            }
            Some(gw)
        }
    };

    Ok(IpamConfig {
        ranges: ranges
            .into_iter()
            .zip(requested)
            .zip(own_gateways)
            .map(|((range, requested), own_gateway)| {
                let gateway = own_gateway.or(gateway.filter(|g| range.contains(*g)));
                ManagedRange::new(range, requested, gateway, &network_name)
            })
            .collect(),
        gateway,
        routes,
        dns,
        addresses,
        network_name,
        enable_overlapping_ranges,
        node_slice_size: non_empty(raw.node_slice_size),
        release_cooldown: release_cooldown(raw.release_cooldown)?,
        sticky_statefulsets: raw.sticky_statefulsets.unwrap_or(false),
        configuration_path: non_empty(raw.configuration_path),
        datastore,
        log,
    })
}

/// Loads a configuration from an inline `ipam` value and optional flat-file content in one call.
/// The fuzz and property tests drive the whole pipeline through this.
pub fn load(ipam: &Value, flat: Option<FlatFile<'_>>, call: &CallContext) -> Result<IpamConfig, ConfigError> {
    InlineIpam::parse(ipam)?.resolve(flat, call)
}
