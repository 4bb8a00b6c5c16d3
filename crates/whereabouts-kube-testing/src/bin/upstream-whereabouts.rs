//! `upstream-whereabouts`: a CNI IPAM plugin running the upstream emulation
//! ([`whereabouts_kube_testing::upstream`]), with the process contract of ours and upstream's:
//! `CNI_COMMAND` (ADD or DEL), `CNI_CONTAINERID`, `CNI_IFNAME`, `CNI_ARGS` with `K8S_POD_NAMESPACE` and
//! `K8S_POD_NAME`, the network configuration on stdin. It stands in for an upstream node in tests.
//!
//! Read from `ipam`: `kubernetes.kubeconfig`, `range` (a CIDR), `range_start`, `range_end`, `exclude`,
//! `network_name`, `enable_overlapping_ranges` (default true), `leader_lease_duration`,
//! `leader_renew_deadline`, `leader_retry_period` (ms, 0 = upstream's default). Keys are matched
//! exactly (upstream's Go decoder ignores case) and there is no flat file.
//!
//! ADD prints `{"cniVersion":"1.0.0","ips":[{"address":"<ip>/<prefix>"}]}`; DEL prints nothing and, as
//! upstream, succeeds whatever its update did once the configuration and kubeconfig were read. A
//! failure prints `{"cniVersion","code","msg"}` on stdout and exits with status 1.

use std::io::{Read, Write};
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use serde::Deserialize;
use serde_json::json;
use whereabouts_k8s::client::{Timeouts, connect};
use whereabouts_kube_testing::upstream::{self, CallContext, LeaseTiming, UpstreamConfig};

/// The CNI version of every answer.
const CNI_VERSION: &str = "1.0.0";

/// The network configuration, as far as it is read.
#[derive(Deserialize)]
struct NetConf {
    ipam: Ipam,
}

#[derive(Deserialize)]
struct Ipam {
    kubernetes: Kubernetes,
    range: String,
    #[serde(default)]
    range_start: Option<IpAddr>,
    #[serde(default)]
    range_end: Option<IpAddr>,
    #[serde(default)]
    exclude: Vec<String>,
    #[serde(default)]
    network_name: String,
    #[serde(default = "enabled")]
    enable_overlapping_ranges: bool,
    #[serde(default)]
    leader_lease_duration: u64,
    #[serde(default)]
    leader_renew_deadline: u64,
    #[serde(default)]
    leader_retry_period: u64,
}

fn enabled() -> bool {
    true
}

#[derive(Deserialize)]
struct Kubernetes {
    kubeconfig: PathBuf,
}

/// A CNI error answer.
struct Failure {
    code: u32,
    msg: String,
}

impl Failure {
    /// An error of whereabouts itself (CNI code 999, upstream's `ErrInternal`).
    fn internal(msg: impl Into<String>) -> Self {
        Failure { code: 999, msg: msg.into() }
    }
}

fn main() -> ExitCode {
    let answer = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime.block_on(run()),
        Err(e) => Err(Failure::internal(format!("tokio runtime: {e}"))),
    };
    let (text, status) = match answer {
        Ok(None) => return ExitCode::SUCCESS,
        Ok(Some(result)) => (result.to_string(), ExitCode::SUCCESS),
        Err(failure) => (
            json!({"cniVersion": CNI_VERSION, "code": failure.code, "msg": failure.msg}).to_string(),
            ExitCode::FAILURE,
        ),
    };
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush());
    status
}

/// An environment variable the CNI contract requires (CNI code 4 when missing).
fn required(name: &str) -> Result<String, Failure> {
    std::env::var(name)
        .map_err(|_| Failure { code: 4, msg: format!("required env variables [{name}] missing") })
}

/// Runs the command; the result to print, if any.
async fn run() -> Result<Option<serde_json::Value>, Failure> {
    let command = required("CNI_COMMAND")?;
    let adding = match command.as_str() {
        "ADD" => true,
        "DEL" => false,
        other => return Err(Failure { code: 4, msg: format!("unknown CNI_COMMAND: {other}") }),
    };
    let call = call_context(required("CNI_CONTAINERID")?, required("CNI_IFNAME")?);
    let mut stdin = Vec::new();
    std::io::stdin().read_to_end(&mut stdin).map_err(|e| Failure::internal(format!("reading stdin: {e}")))?;
    let netconf: NetConf = serde_json::from_slice(&stdin)
        .map_err(|e| Failure { code: 6, msg: format!("error unmarshall network config: {e}") })?;
    let config = upstream_config(&netconf.ipam)?;
    let connection = connect(&netconf.ipam.kubernetes.kubeconfig, Timeouts::REQUESTS).await.map_err(|e| {
        let context = if adding {
            "failed to create Kubernetes IPAM manager"
        } else {
            "IPAM client initialization error"
        };
        Failure::internal(format!("{context}: {e}"))
    })?;
    let (client, namespace) = (&connection.client, connection.namespace.as_str());
    if !adding {
        let _ = upstream::del(client, namespace, &config, &call).await;
        return Ok(None);
    }
    let ip = upstream::add(client, namespace, &config, &call)
        .await
        .map_err(|e| Failure::internal(format!("error at storage engine: {e}")))?;
    let address = format!("{ip}/{}", config.range.prefix_len());
    Ok(Some(json!({"cniVersion": CNI_VERSION, "ips": [{"address": address}]})))
}

/// The call's identity; the pod comes from `CNI_ARGS` (`K8S_POD_NAMESPACE`, `K8S_POD_NAME`).
fn call_context(container_id: String, ifname: String) -> CallContext {
    let args = std::env::var("CNI_ARGS").unwrap_or_default();
    let arg = |key: &str| {
        args.split(';')
            .filter_map(|pair| pair.split_once('='))
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.to_string())
    };
    CallContext {
        container_id,
        ifname,
        pod_namespace: arg("K8S_POD_NAMESPACE").unwrap_or_default(),
        pod_name: arg("K8S_POD_NAME").unwrap_or_default(),
    }
}

fn upstream_config(ipam: &Ipam) -> Result<UpstreamConfig, Failure> {
    let range =
        ipam.range.parse().map_err(|e| Failure::internal(format!("invalid CIDR {}: {e}", ipam.range)))?;
    Ok(UpstreamConfig {
        range_start: ipam.range_start,
        range_end: ipam.range_end,
        exclude: ipam.exclude.clone(),
        network_name: ipam.network_name.clone(),
        enable_overlapping_ranges: ipam.enable_overlapping_ranges,
        lease: LeaseTiming::from_millis(
            ipam.leader_lease_duration,
            ipam.leader_renew_deadline,
            ipam.leader_retry_period,
        ),
        ..UpstreamConfig::new(range)
    })
}
