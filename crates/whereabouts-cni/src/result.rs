//! The IPAM result and its shape for each spec version.

use std::net::IpAddr;

use ipnet::IpNet;
use serde_json::{Map, Value, json};
use whereabouts_core::addr::Family;
use whereabouts_core::config::{Dns, IpamConfig, Route};
use whereabouts_store::ipam::AllocatedIp;

use crate::error::{CniError, codes};
use crate::version::{Layout, SpecVersion};

/// One address of the result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpConfig {
    /// Address with prefix.
    pub address: IpNet,
    /// Gateway.
    pub gateway: Option<IpAddr>,
}

/// The result of an ADD, independent of the spec version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpamResult {
    /// Allocated addresses in range order, then static ones.
    pub ips: Vec<IpConfig>,
    /// Routes.
    pub routes: Vec<Route>,
    /// DNS.
    pub dns: Dns,
}

impl IpamResult {
    /// Allocated addresses carry the range's prefix, and their range's gateway (upstream puts the one
    /// top-level gateway on every address, a v4 gateway on v6 addresses included).
    pub fn new(config: &IpamConfig, allocated: &[AllocatedIp]) -> Self {
        let allocated = allocated.iter().map(|a| IpConfig {
            address: IpNet::new(a.ip, a.network.prefix_len()).unwrap_or_else(|_| IpNet::from(a.ip)),
            gateway: config.ranges.iter().find(|r| r.network == a.network).and_then(|r| r.gateway),
        });
        let statics = config.addresses.iter().map(|s| IpConfig {
            address: s.address,
            gateway: s.gateway.or(config.gateway.filter(|g| s.address.contains(g))),
        });
        IpamResult {
            ips: allocated.chain(statics).collect(),
            routes: config.routes.clone(),
            dns: config.dns.clone(),
        }
    }

    /// The result object for `cni_version`.
    pub fn to_json(&self, cni_version: &str, version: SpecVersion) -> Result<Value, CniError> {
        match version.layout() {
            Layout::Legacy => self.legacy_json(cni_version),
            layout => {
                let mut out = Map::new();
                out.insert("cniVersion".into(), cni_version.into());
                let ips = self
                    .ips
                    .iter()
                    .map(|ip| {
                        let mut entry = Map::new();
                        if layout == Layout::Versioned {
                            entry.insert(
                                "version".into(),
                                Family::of(ip.address.addr()).cni_version_tag().into(),
                            );
                        }
                        entry.insert("address".into(), ip.address.to_string().into());
                        if let Some(gw) = ip.gateway {
                            entry.insert("gateway".into(), gw.to_string().into());
                        }
                        Value::Object(entry)
                    })
                    .collect();
                out.insert("ips".into(), Value::Array(ips));
                if !self.routes.is_empty() {
                    out.insert("routes".into(), self.routes.iter().map(|r| route_json(r, true)).collect());
                }
                if layout == Layout::Versioned || !self.dns.is_empty() {
                    out.insert("dns".into(), dns_json(&self.dns));
                }
                Ok(Value::Object(out))
            }
        }
    }

    fn legacy_json(&self, cni_version: &str) -> Result<Value, CniError> {
        let mut out = Map::new();
        out.insert("cniVersion".into(), cni_version.into());
        for (key, family) in [("ip4", Family::V4), ("ip6", Family::V6)] {
            let Some(ip) = self.ips.iter().find(|ip| Family::of(ip.address.addr()) == family) else {
                continue;
            };
            let mut entry = json!({ "ip": ip.address.to_string() });
            if let Some(gw) = ip.gateway {
                entry["gateway"] = gw.to_string().into();
            }
            let routes: Vec<Value> = self
                .routes
                .iter()
                .filter(|r| Family::of(r.dst.addr()) == family)
                .map(|r| route_json(r, false))
                .collect();
            if !routes.is_empty() {
                entry["routes"] = Value::Array(routes);
            }
            out.insert(key.into(), entry);
        }
        if out.len() == 1 {
            return Err(CniError::new(codes::INTERNAL, "cannot convert: no valid IP addresses"));
        }
        out.insert("dns".into(), dns_json(&self.dns));
        Ok(Value::Object(out))
    }
}

fn route_json(route: &Route, extended: bool) -> Value {
    let mut r = Map::new();
    r.insert("dst".into(), route.dst.to_string().into());
    if let Some(gw) = route.gw {
        r.insert("gw".into(), gw.to_string().into());
    }
    if extended {
        let extra = [
            ("mtu", route.mtu),
            ("advmss", route.advmss),
            ("priority", route.priority),
            ("table", route.table),
            ("scope", route.scope),
        ];
        for (key, value) in extra {
            if let Some(v) = value {
                r.insert(key.into(), v.into());
            }
        }
    }
    Value::Object(r)
}

fn dns_json(dns: &Dns) -> Value {
    let mut d = Map::new();
    if !dns.nameservers.is_empty() {
        d.insert("nameservers".into(), dns.nameservers.clone().into());
    }
    if let Some(domain) = &dns.domain {
        d.insert("domain".into(), domain.clone().into());
    }
    if !dns.search.is_empty() {
        d.insert("search".into(), dns.search.clone().into());
    }
    if !dns.options.is_empty() {
        d.insert("options".into(), dns.options.clone().into());
    }
    Value::Object(d)
}

/// The addresses a previous result lists, in any layout (for CHECK).
pub fn addresses_of(prev: &Value) -> Vec<IpAddr> {
    let from_ips = prev["ips"].as_array().into_iter().flatten().filter_map(|ip| ip["address"].as_str());
    let legacy = ["ip4", "ip6"].into_iter().filter_map(|k| prev[k]["ip"].as_str());
    from_ips.chain(legacy).filter_map(|a| a.parse::<IpNet>().ok()).map(|n| n.addr()).collect()
}
