//! A validated allocation range: its network, the candidate interval derived from `range_start` /
//! `range_end` (upstream `GetIPRange`), and its excluded blocks.

use std::net::IpAddr;

use ipnet::IpNet;

use crate::addr::{Family, from_u128, net_bounds, to_u128};
use crate::interval::IntervalSet;

/// One range of a network configuration, ready for allocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpRange {
    network: IpNet,
    first: u128,
    last: u128,
    exclude: Vec<IpNet>,
    excluded: IntervalSet,
}

/// Why a range cannot be built. The config loader turns these into errors naming the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RangeProblem {
    /// Fewer than two host bits: no address is left once network and broadcast are removed.
    TooSmall,
    /// `range_start` / `range_end` lies outside the range's network.
    OutsideNetwork(IpAddr),
    /// `range_start` is after `range_end`.
    StartAfterEnd,
    /// An `exclude` entry is of the other address family.
    ExcludeFamily(IpNet),
}

impl IpRange {
    /// Builds a range from its network (host bits ignored) and optional start and end.
    ///
    /// Network and broadcast addresses are never candidates; a start or end on them is ignored, as
    /// upstream ignores it.
    pub fn new(
        network: IpNet,
        start: Option<IpAddr>,
        end: Option<IpAddr>,
        exclude: Vec<IpNet>,
    ) -> Result<Self, RangeProblem> {
        let network = network.trunc();
        let family = Family::of(network.addr());
        if family.bits() - network.prefix_len() < 2 {
            return Err(RangeProblem::TooSmall);
        }
        let (net_first, net_last) = net_bounds(&network);
        let mut first = net_first + 1;
        let mut last = net_last - 1;
        let bound = |ip: IpAddr| -> Result<u128, RangeProblem> {
            if Family::of(ip) == family && network.contains(&ip) {
                Ok(to_u128(ip))
            } else {
                Err(RangeProblem::OutsideNetwork(ip))
            }
        };
        // A bound on the network or broadcast address is ignored, as upstream ignores it.
        let usable = first..=last;
        if let Some(start) = start.map(bound).transpose()?.filter(|s| usable.contains(s)) {
            first = start;
        }
        if let Some(end) = end.map(bound).transpose()?.filter(|e| usable.contains(e)) {
            last = end;
        }
        if first > last {
            return Err(RangeProblem::StartAfterEnd);
        }
        let mut excluded = IntervalSet::new();
        let mut canonical = Vec::with_capacity(exclude.len());
        for block in exclude {
            if Family::of(block.addr()) != family {
                return Err(RangeProblem::ExcludeFamily(block));
            }
            let block = block.trunc();
            let (s, e) = net_bounds(&block);
            excluded.insert_range(s, e);
            canonical.push(block);
        }
        Ok(IpRange { network, first, last, exclude: canonical, excluded })
    }

    /// The canonical network (`192.168.2.224/28`, `abcd::/64`).
    pub fn network(&self) -> IpNet {
        self.network
    }

    /// The address family.
    pub fn family(&self) -> Family {
        Family::of(self.network.addr())
    }

    /// The first candidate address.
    pub fn first(&self) -> u128 {
        self.first
    }

    /// The last candidate address.
    pub fn last(&self) -> u128 {
        self.last
    }

    /// The excluded blocks, network-normalised.
    pub fn exclude(&self) -> &[IpNet] {
        &self.exclude
    }

    /// The excluded blocks as intervals.
    pub fn excluded(&self) -> &IntervalSet {
        &self.excluded
    }

    /// Whether `ip` lies in this range's network.
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.network.contains(&ip)
    }

    /// Whether `ip` lies in the candidate interval (`range_start`..=`range_end`).
    pub fn in_interval(&self, ip: IpAddr) -> bool {
        Family::of(ip) == self.family() && (self.first..=self.last).contains(&to_u128(ip))
    }

    /// Whether two ranges' networks share an address.
    pub fn overlaps(&self, other: &IpRange) -> bool {
        self.network.contains(&other.network.network()) || other.network.contains(&self.network.network())
    }

    /// The candidate interval, network and excludes, for error messages.
    pub fn describe(&self) -> String {
        let excludes: Vec<String> = self.exclude.iter().map(ToString::to_string).collect();
        format!(
            "{} - {} in {} excluding [{}]",
            from_u128(self.family(), self.first),
            from_u128(self.family(), self.last),
            self.network,
            excludes.join(" ")
        )
    }
}

/// Upstream's object-name normalisation of a CIDR: `:` and `/` become `-` (`abcd::/64` → `abcd---64`).
pub fn normalize_range(cidr: &IpNet) -> String {
    let mut s = cidr.to_string();
    if s.ends_with(':') {
        s.push('0');
    }
    s.replace([':', '/'], "-")
}

/// The IPPool name for a range (upstream `IPPoolName`): `[network_name-][node-]normalised-range`.
pub fn pool_name(network_name: &str, node: Option<&str>, cidr: &IpNet) -> String {
    let mut name = pool_name_prefix(network_name, node);
    name.push_str(&normalize_range(cidr));
    name
}

/// What [`pool_name`] puts before the normalised range: `[network_name-][node-]`.
fn pool_name_prefix(network_name: &str, node: Option<&str>) -> String {
    let mut prefix = String::new();
    for part in [network_name, node.unwrap_or("")] {
        if !part.is_empty() {
            prefix.push_str(part);
            prefix.push('-');
        }
    }
    prefix
}

/// The CIDR of the per-node IPPool `name` of node `node` in the network `network_name`: the inverse of
/// [`pool_name`] with a node, given the network name and the node. `None` when `name` is not such a
/// name (what follows `[network_name-]<node>-` is not a normalised CIDR, exactly as [`pool_name`]
/// writes it).
pub fn node_pool_cidr(network_name: &str, node: &str, name: &str) -> Option<IpNet> {
    let normalised = name.strip_prefix(pool_name_prefix(network_name, Some(node)).as_str())?;
    let (address, prefix_len) = normalised.rsplit_once('-')?;
    // Only IPv6 addresses had `:`, which became `-`; IPv4 addresses have none.
    let cidr: IpNet = format!("{}/{prefix_len}", address.replace('-', ":")).parse().ok()?;
    (normalize_range(&cidr) == normalised).then_some(cidr)
}

/// The node and slice of the per-node IPPool `name` of any node in the network `network_name` whose
/// slice overlaps `range` (the first range's network). Node names may contain `-`, so every split is
/// tried, the longest slice first; the overlap with `range` tells an IPv6 slice from a shorter suffix of
/// it that also reads as a CIDR.
pub fn any_node_pool(network_name: &str, name: &str, range: &IpNet) -> Option<(String, IpNet)> {
    let rest =
        if network_name.is_empty() { name } else { name.strip_prefix(network_name)?.strip_prefix('-')? };
    rest.match_indices('-').find_map(|(at, _)| {
        let node = &rest[..at];
        let slice = node_pool_cidr(network_name, node, name)?;
        let overlaps = slice.trunc().contains(&range.trunc()) || range.trunc().contains(&slice);
        (!node.is_empty() && overlaps).then(|| (node.to_string(), slice))
    })
}

/// The node of the per-node IPPool `name` of `cidr` in the network `network_name`: the inverse of
/// [`pool_name`] with a node, given the known prefix (`network_name-`, if set) and the known suffix
/// (`-` and the normalised CIDR). `None` when `name` is not such a name (or names no node).
pub fn pool_node<'a>(network_name: &str, name: &'a str, cidr: &IpNet) -> Option<&'a str> {
    let rest =
        if network_name.is_empty() { name } else { name.strip_prefix(network_name)?.strip_prefix('-')? };
    let node = rest.strip_suffix(normalize_range(cidr).as_str())?.strip_suffix('-')?;
    (!node.is_empty()).then_some(node)
}

/// The name of the cluster-wide reservation of one address (upstream `NormalizeIP` for ORIPs):
/// `2001::3` → `2001--3`, `fd00::` → `fd00--0`, prefixed with `network_name-` when set.
pub fn reservation_name(network_name: &str, ip: IpAddr) -> String {
    let mut s = ip.to_string();
    if s.ends_with(':') {
        s.push('0');
    }
    let s = s.replace(':', "-");
    if network_name.is_empty() { s } else { format!("{network_name}-{s}") }
}

#[cfg(test)]
mod tests {
    #[test]
    fn any_nodes_pool_of_a_slice_is_recognised() {
        let v4: IpNet = "10.0.0.0/24".parse().unwrap();
        let v6: IpNet = "fd00:0:0:10::/64".parse().unwrap();
        let slice4: IpNet = "10.0.0.64/26".parse().unwrap();
        let slice6: IpNet = "fd00:0:0:10::/80".parse().unwrap();
        for (network, node) in [("", "node-a"), ("blue", "node-a"), ("blue", "n"), ("", "worker-1-b")] {
            let name = pool_name(network, Some(node), &slice4);
            assert_eq!(any_node_pool(network, &name, &v4), Some((node.to_string(), slice4)), "{name}");
            let name = pool_name(network, Some(node), &slice6);
            assert_eq!(any_node_pool(network, &name, &v6), Some((node.to_string(), slice6)), "{name}");
            assert_eq!(any_node_pool(network, &name, &v4), None, "another range's slice");
        }
        assert_eq!(any_node_pool("blue", "blue-10.0.0.0-24", &v4), None, "no node: the cluster-wide pool");
        assert_eq!(any_node_pool("blue", "red-n-10.0.0.64-26", &v4), None, "another network");
    }

    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }
    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn interval_skips_network_and_broadcast() {
        let r = IpRange::new(net("192.168.1.0/24"), None, None, vec![]).unwrap();
        assert_eq!(from_u128(Family::V4, r.first()), ip("192.168.1.1"));
        assert_eq!(from_u128(Family::V4, r.last()), ip("192.168.1.254"));
        let r = IpRange::new(net("abcd::/64"), None, None, vec![]).unwrap();
        assert_eq!(from_u128(Family::V6, r.first()), ip("abcd::1"));
        assert_eq!(from_u128(Family::V6, r.last()), ip("abcd::ffff:ffff:ffff:fffe"));
    }

    #[test]
    fn start_and_end_narrow_the_interval() {
        let r = IpRange::new(
            net("192.168.2.225/28"),
            Some(ip("192.168.2.229")),
            Some(ip("192.168.2.230")),
            vec![],
        )
        .unwrap();
        assert_eq!(r.network().to_string(), "192.168.2.224/28");
        assert_eq!(from_u128(Family::V4, r.first()), ip("192.168.2.229"));
        assert_eq!(from_u128(Family::V4, r.last()), ip("192.168.2.230"));
        // Bounds on the network or broadcast address are ignored, whichever way round.
        for (start, end) in [("10.0.0.0", "10.0.0.255"), ("10.0.0.255", "10.0.0.0")] {
            let r = IpRange::new(net("10.0.0.0/24"), Some(ip(start)), Some(ip(end)), vec![]).unwrap();
            assert_eq!((r.first(), r.last()), (to_u128(ip("10.0.0.1")), to_u128(ip("10.0.0.254"))));
        }
    }

    #[test]
    fn refuses_what_upstream_silently_ignores() {
        assert_eq!(IpRange::new(net("10.0.0.0/31"), None, None, vec![]), Err(RangeProblem::TooSmall));
        assert_eq!(IpRange::new(net("10.0.0.5/32"), None, None, vec![]), Err(RangeProblem::TooSmall));
        assert_eq!(IpRange::new(net("2001:db8::/127"), None, None, vec![]), Err(RangeProblem::TooSmall));
        assert!(IpRange::new(net("10.0.0.0/30"), None, None, vec![]).is_ok());
        assert_eq!(
            IpRange::new(net("10.0.0.0/24"), Some(ip("10.0.1.5")), None, vec![]),
            Err(RangeProblem::OutsideNetwork(ip("10.0.1.5")))
        );
        assert_eq!(
            IpRange::new(net("10.0.0.0/24"), Some(ip("10.0.0.9")), Some(ip("10.0.0.8")), vec![]),
            Err(RangeProblem::StartAfterEnd)
        );
        assert_eq!(
            IpRange::new(net("10.0.0.0/24"), None, None, vec![net("2001:db8::/64")]),
            Err(RangeProblem::ExcludeFamily(net("2001:db8::/64")))
        );
    }

    #[test]
    fn excludes_are_network_normalised() {
        let r = IpRange::new(net("192.168.2.0/24"), None, None, vec![net("192.168.2.229/30")]).unwrap();
        assert_eq!(r.exclude()[0].to_string(), "192.168.2.228/30");
        assert!(r.excluded().contains(to_u128(ip("192.168.2.231"))));
    }

    #[test]
    fn upstream_pool_names() {
        assert_eq!(pool_name("", None, &net("10.0.0.0/8")), "10.0.0.0-8");
        assert_eq!(pool_name("test", None, &net("10.0.0.0/8")), "test-10.0.0.0-8");
        assert_eq!(pool_name("", Some("testnode"), &net("10.0.0.0/8")), "testnode-10.0.0.0-8");
        assert_eq!(
            pool_name("testnetwork", Some("testnode"), &net("10.0.0.0/8")),
            "testnetwork-testnode-10.0.0.0-8"
        );
        assert_eq!(pool_name("", None, &net("abcd::/64")), "abcd---64");
        assert_eq!(pool_name("", None, &net("fd00:0:0:10::/64")), "fd00-0-0-10---64");
        assert_eq!(pool_name("", None, &net("2001:db8:480:603d::/64")), "2001-db8-480-603d---64");
    }

    #[test]
    fn per_node_pool_names_give_back_their_node() {
        for (network, node, cidr) in [
            ("", "worker-1", "10.0.0.64/26"),
            ("net", "worker-1", "10.0.0.64/26"),
            ("net-a", "n", "2001:db8::/120"),
            ("", "a-b-c", "fd00::/120"),
        ] {
            let name = pool_name(network, Some(node), &net(cidr));
            assert_eq!(pool_node(network, &name, &net(cidr)), Some(node), "{name}");
        }
        let slice = net("10.0.0.64/26");
        // The whole-range pool names no node; another network's prefix or another CIDR do not match.
        assert_eq!(pool_node("", &pool_name("", None, &slice), &slice), None);
        assert_eq!(pool_node("net", &pool_name("net", None, &slice), &slice), None);
        assert_eq!(pool_node("net", "other-w-10.0.0.64-26", &slice), None);
        assert_eq!(pool_node("net", "netw-10.0.0.64-26", &slice), None);
        assert_eq!(pool_node("net", "net-w-10.0.0.0-26", &slice), None);
        assert_eq!(pool_node("", "w10.0.0.64-26", &slice), None);
        // Without a network name, another network's pool reads as a node named with its prefix: the
        // names alone cannot tell them apart (the controller then errs on the side of busy).
        assert_eq!(pool_node("", "net-w-10.0.0.64-26", &slice), Some("net-w"));
    }

    #[test]
    fn per_node_pool_names_give_back_their_cidr() {
        for (network, node, cidr) in [
            ("", "worker-1", "10.0.0.64/26"),
            ("net", "worker-1", "10.0.0.64/26"),
            ("net-a", "n", "2001:db8::/120"),
            ("", "a-b-c", "fd00::/120"),
            ("net", "n", "2001:db8:90:0:1::/80"),
        ] {
            let name = pool_name(network, Some(node), &net(cidr));
            assert_eq!(node_pool_cidr(network, node, &name), Some(net(cidr)), "{name}");
        }
        // Another node, another network, the whole-range pool, or no CIDR after the node: no match.
        let name = pool_name("net", Some("w"), &net("10.0.0.64/26"));
        assert_eq!(node_pool_cidr("net", "v", &name), None);
        assert_eq!(node_pool_cidr("other", "w", &name), None);
        assert_eq!(node_pool_cidr("net", "w", &pool_name("net", None, &net("10.0.0.0/24"))), None);
        assert_eq!(node_pool_cidr("", "w", &pool_name("", Some("w-x"), &net("10.0.0.64/26"))), None);
        assert_eq!(node_pool_cidr("", "w", "w-10.0.0.64-26-x"), None);
        // Not as pool_name writes it: the same CIDR spelled otherwise.
        assert_eq!(node_pool_cidr("", "w", "w-2001-0db8---120"), None);
    }

    #[test]
    fn upstream_reservation_names() {
        assert_eq!(reservation_name("", ip("10.10.0.1")), "10.10.0.1");
        assert_eq!(reservation_name("", ip("2001::3")), "2001--3");
        assert_eq!(reservation_name("", ip("fd00::")), "fd00--0");
        assert_eq!(reservation_name("", ip("caa5::8000")), "caa5--8000");
        assert_eq!(reservation_name("named-range", ip("10.10.0.1")), "named-range-10.10.0.1");
    }

    #[test]
    fn overlap() {
        let a = IpRange::new(net("10.10.0.0/16"), None, None, vec![]).unwrap();
        let b = IpRange::new(net("10.10.0.0/17"), None, None, vec![]).unwrap();
        let c = IpRange::new(net("10.11.0.0/16"), None, None, vec![]).unwrap();
        assert!(a.overlaps(&b) && b.overlaps(&a));
        assert!(!a.overlaps(&c));
    }
}
