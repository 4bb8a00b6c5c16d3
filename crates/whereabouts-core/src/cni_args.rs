//! `CNI_ARGS` parsing with the rules of the CNI library's `LoadArgs`, as upstream uses it.

use std::net::IpAddr;

use ipnet::IpNet;
use thiserror::Error;

use crate::addr::{parse_cidr_sloppy, parse_ip_sloppy};

/// The keys whereabouts understands in `CNI_ARGS`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CniArgs {
    /// `K8S_POD_NAME`.
    pub pod_name: String,
    /// `K8S_POD_NAMESPACE`.
    pub pod_namespace: String,
    /// `K8S_POD_UID` (Multus and the container runtimes pass it): which pod of that name the call is for.
    pub pod_uid: String,
    /// `IP=`: requested addresses (comma-separated CIDRs or bare addresses).
    pub ips: Vec<RequestedIp>,
    /// `GATEWAY=`: gateways for the requested addresses (comma-separated IPs).
    pub gateways: Vec<IpAddr>,
}

/// An address asked for in `IP=`: a CIDR (host-local's form), or a bare address, which podman sends
/// for `--ip` whenever a network gets one static address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestedIp {
    /// The address.
    pub ip: IpAddr,
    /// The address with the prefix it was written with, when it was written as a CIDR.
    pub net: Option<IpNet>,
}

impl RequestedIp {
    fn parse(item: &str) -> Option<Self> {
        match parse_cidr_sloppy(item) {
            Some(net) => Some(RequestedIp { ip: net.addr(), net: Some(net) }),
            None => parse_ip_sloppy(item).map(|ip| RequestedIp { ip, net: None }),
        }
    }
}

impl std::fmt::Display for RequestedIp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.net {
            Some(net) => net.fmt(f),
            None => self.ip.fmt(f),
        }
    }
}

/// Why `CNI_ARGS` was refused. Messages keep upstream's wording.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CniArgsError {
    /// A `;`-separated item is not exactly `key=value`.
    #[error("CNI_ARGS: invalid pair {0:?}")]
    InvalidPair(String),
    /// Unknown keys without `IgnoreUnknown`.
    #[error("CNI_ARGS: unknown args {0:?}")]
    Unknown(Vec<String>),
    /// `IgnoreUnknown` is not a boolean.
    #[error("CNI_ARGS: error parsing value of pair {0:?}: boolean unmarshal error: invalid input")]
    BadBool(String),
    /// An `IP=` item is neither a CIDR nor an address.
    #[error("CNI_ARGS: invalid address in IP {0:?}: expected an IP address or a CIDR")]
    BadIp(String),
    /// A `GATEWAY=` item is not an IP.
    #[error("CNI_ARGS: invalid gateway address {0:?}")]
    BadGateway(String),
}

impl CniArgs {
    /// `<namespace>/<name>`, or `None` without a pod name (containers outside Kubernetes). Runtimes
    /// outside Kubernetes (podman) pass a container name without a namespace: `/<name>`, kept for the
    /// operator to read but not an identity ([`crate::pool::identifying_pod_ref`]).
    pub fn pod_ref(&self) -> Option<String> {
        (!self.pod_name.is_empty()).then(|| format!("{}/{}", self.pod_namespace, self.pod_name))
    }

    /// Whether the call names a Kubernetes pod: a name and a namespace.
    pub fn names_kubernetes_pod(&self) -> bool {
        !self.pod_name.is_empty() && !self.pod_namespace.is_empty()
    }

    /// The pod's uid, when the runtime passed one.
    pub fn pod_uid(&self) -> Option<String> {
        (!self.pod_uid.is_empty()).then(|| self.pod_uid.clone())
    }
}

fn parse_bool(pair: &str, value: &str) -> Result<bool, CniArgsError> {
    match value.to_ascii_lowercase().as_str() {
        "1" | "true" => Ok(true),
        "0" | "false" => Ok(false),
        _ => Err(CniArgsError::BadBool(pair.to_string())),
    }
}

/// Parses `CNI_ARGS` (`IgnoreUnknown=1;K8S_POD_NAMESPACE=ns;K8S_POD_NAME=pod`).
pub fn parse_cni_args(input: &str) -> Result<CniArgs, CniArgsError> {
    let mut args = CniArgs::default();
    if input.is_empty() {
        return Ok(args);
    }
    let mut pairs = Vec::new();
    for pair in input.split(';') {
        let mut kv = pair.split('=');
        match (kv.next(), kv.next(), kv.next()) {
            (Some(k), Some(v), None) => pairs.push((pair, k, v)),
            _ => return Err(CniArgsError::InvalidPair(pair.to_string())),
        }
    }
    let mut ignore_unknown = false;
    for (pair, key, value) in &pairs {
        if *key == "IgnoreUnknown" {
            ignore_unknown = parse_bool(pair, value)?;
        }
    }
    let mut unknown = Vec::new();
    for (pair, key, value) in pairs {
        match key {
            "IgnoreUnknown" | "K8S_POD_INFRA_CONTAINER_ID" => {}
            "K8S_POD_NAME" => args.pod_name = value.to_string(),
            "K8S_POD_NAMESPACE" => args.pod_namespace = value.to_string(),
            // Not one of upstream's args: still refused without IgnoreUnknown, as there.
            "K8S_POD_UID" if ignore_unknown => args.pod_uid = value.to_string(),
            "IP" => {
                args.ips = split_list(value)
                    .map(|item| RequestedIp::parse(item).ok_or_else(|| CniArgsError::BadIp(item.to_string())))
                    .collect::<Result<_, _>>()?;
            }
            "GATEWAY" => {
                args.gateways = split_list(value)
                    .map(|item| {
                        parse_ip_sloppy(item).ok_or_else(|| CniArgsError::BadGateway(item.to_string()))
                    })
                    .collect::<Result<_, _>>()?;
            }
            _ if ignore_unknown => {}
            _ => unknown.push(pair.to_string()),
        }
    }
    if !unknown.is_empty() {
        return Err(CniArgsError::Unknown(unknown));
    }
    Ok(args)
}

fn split_list(value: &str) -> impl Iterator<Item = &str> {
    value.split(',').map(str::trim).filter(|s| !s.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn kubernetes_args() {
        let args =
            parse_cni_args("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;K8S_POD_UID=abc")
                .unwrap();
        assert_eq!(args.pod_ref().as_deref(), Some("default/web-0"));
        assert_eq!(args.pod_uid().as_deref(), Some("abc"));
        assert_eq!(parse_cni_args("K8S_POD_NAME=a").unwrap().pod_uid(), None);
    }

    #[test]
    fn missing_namespace_and_name() {
        let args = parse_cni_args("K8S_POD_NAME=p").unwrap();
        assert_eq!(args.pod_ref().as_deref(), Some("/p"));
        assert_eq!(parse_cni_args("").unwrap().pod_ref(), None);
    }

    #[test]
    fn upstream_errors() {
        assert_eq!(parse_cni_args("K8S_POD_NAME=p;"), Err(CniArgsError::InvalidPair(String::new())));
        assert_eq!(parse_cni_args("A=b=c"), Err(CniArgsError::InvalidPair("A=b=c".into())));
        assert_eq!(parse_cni_args("K8S_POD_UID=x"), Err(CniArgsError::Unknown(vec!["K8S_POD_UID=x".into()])));
        assert_eq!(
            parse_cni_args("IgnoreUnknown=yes"),
            Err(CniArgsError::BadBool("IgnoreUnknown=yes".into()))
        );
        assert!(parse_cni_args("IgnoreUnknown=TRUE;X=1").is_ok());
        assert!(matches!(parse_cni_args("IgnoreUnknown=0;X=1"), Err(CniArgsError::Unknown(_))));
    }

    #[test]
    fn static_ips_and_gateways() {
        let args = parse_cni_args("IP=10.1.1.5/24, 2001:db8::5/64;GATEWAY=10.1.1.1").unwrap();
        assert_eq!(args.ips.len(), 2);
        assert_eq!(args.ips[0].to_string(), "10.1.1.5/24");
        assert_eq!(args.gateways, vec!["10.1.1.1".parse::<IpAddr>().unwrap()]);
        let bare = parse_cni_args("IP=10.1.1.5").unwrap();
        assert_eq!(bare.ips, vec![RequestedIp { ip: "10.1.1.5".parse().unwrap(), net: None }]);
        assert_eq!(bare.ips[0].to_string(), "10.1.1.5");
        assert_eq!(parse_cni_args("IP=10.1.1.x"), Err(CniArgsError::BadIp("10.1.1.x".into())));
        assert_eq!(parse_cni_args("GATEWAY=x"), Err(CniArgsError::BadGateway("x".into())));
    }

    proptest! {
        #[test]
        fn never_panics(input in ".{0,80}") {
            let _ = parse_cni_args(&input);
        }

        #[test]
        fn round_trips_pod_identity(ns in "[a-z0-9-]{0,12}", name in "[a-z0-9-]{1,12}") {
            let args = parse_cni_args(&format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={ns};K8S_POD_NAME={name}")).unwrap();
            prop_assert_eq!(args.pod_ref(), Some(format!("{ns}/{name}")));
        }
    }
}
