//! Multus' `k8s.v1.cni.cncf.io/network-status` pod annotation: which networks a pod is attached to and
//! the addresses each gave it.

use std::net::IpAddr;

use serde::Deserialize;

/// The annotation's key.
pub const ANNOTATION: &str = "k8s.v1.cni.cncf.io/network-status";

/// One attachment in the annotation.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Attachment {
    /// The network: `<namespace>/<NetworkAttachmentDefinition>` for secondary networks, the cluster
    /// network's name for the default one.
    #[serde(default)]
    pub name: String,
    /// The interface inside the pod.
    #[serde(default)]
    pub interface: String,
    /// Its addresses, without prefix.
    #[serde(default)]
    pub ips: Vec<String>,
    /// Whether it is the cluster's default network (not whereabouts').
    #[serde(default)]
    pub default: bool,
}

/// A parsed annotation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetworkStatus {
    /// The attachments in the annotation's order.
    pub attachments: Vec<Attachment>,
}

impl NetworkStatus {
    /// Parses the annotation's value.
    pub fn parse(value: &str) -> Result<Self, serde_json::Error> {
        Ok(NetworkStatus { attachments: serde_json::from_str(value)? })
    }

    /// The secondary (non-default) attachments.
    pub fn secondary(&self) -> impl Iterator<Item = &Attachment> {
        self.attachments.iter().filter(|a| !a.default)
    }

    /// Whether a secondary attachment lists `ip` (compared as addresses, so `2001:db8::0:1` matches
    /// `2001:db8::1`).
    pub fn lists(&self, ip: IpAddr) -> bool {
        self.network_of(ip).is_some()
    }

    /// The secondary network that lists `ip`, if any.
    pub fn network_of(&self, ip: IpAddr) -> Option<&str> {
        self.secondary()
            .find(|a| a.ips.iter().any(|listed| listed.parse::<IpAddr>().is_ok_and(|l| l == ip)))
            .map(|a| a.name.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_multus_annotations() {
        let status = NetworkStatus::parse(
            r#"[{"name":"cbr0","interface":"eth0","ips":["10.244.1.7"],"mac":"aa:bb","default":true,"dns":{}},
                {"name":"kube-system/macvlan-v6","interface":"net1","ips":["2001:db8::0:1"],"mac":"cc:dd","dns":{}}]"#,
        )
        .unwrap();
        assert!(status.lists("2001:db8::1".parse().unwrap()));
        assert!(!status.lists("10.244.1.7".parse().unwrap()), "the default network is not ours");
        assert_eq!(status.network_of("2001:db8::1".parse().unwrap()), Some("kube-system/macvlan-v6"));
        assert_eq!(status.secondary().count(), 1);
    }

    #[test]
    fn rejects_what_is_not_a_list() {
        assert!(NetworkStatus::parse("{}").is_err());
        assert!(NetworkStatus::parse("").is_err());
        assert_eq!(NetworkStatus::parse("[]").unwrap(), NetworkStatus::default());
    }
}
