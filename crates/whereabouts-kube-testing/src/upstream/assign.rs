//! Upstream's allocator (`pkg/allocate` and `iphelpers.GetIPRange`), written from its behaviour: the
//! lowest free address of the candidate interval, no randomisation, no skipping of `.0`/`.255` host
//! addresses inside larger subnets, no skipping of the gateway.

use std::collections::HashSet;
use std::net::IpAddr;

use ipnet::IpNet;
use whereabouts_core::addr::parse_cidr_strict;

use super::UpstreamConfig;
use super::goip::{dec, from_std, inc, to_std};

/// One entry of upstream's in-memory reservation list (`types.IPReservation`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Reservation {
    /// The address, in Go's 16-byte form.
    pub(crate) ip: u128,
    pub(crate) container_id: String,
    pub(crate) pod_ref: String,
    pub(crate) ifname: String,
    /// An address an overlapping range's reservation holds: excluded from the pick, never written
    /// (upstream's `IsAllocated` "dummy" records).
    pub(crate) dummy: bool,
}

impl Reservation {
    /// A dummy record for an address another pod holds through an overlapping range.
    pub(crate) fn dummy(ip: u128) -> Self {
        Reservation {
            ip,
            container_id: String::new(),
            pod_ref: String::new(),
            ifname: String::new(),
            dummy: true,
        }
    }
}

/// `AssignIP`: the address this (pod, interface) already holds, its recorded container ID updated to
/// `container_id`; otherwise the lowest free address, appended to `list`.
pub(crate) fn assign_ip(
    config: &UpstreamConfig,
    list: &mut Vec<Reservation>,
    container_id: &str,
    pod_ref: &str,
    ifname: &str,
) -> Result<u128, String> {
    if let Some(held) = list.iter_mut().find(|r| r.pod_ref == pod_ref && r.ifname == ifname) {
        if held.container_id != container_id {
            held.container_id = container_id.to_string();
        }
        return Ok(held.ip);
    }
    let ip = lowest_free(config, list)?;
    list.push(Reservation {
        ip,
        container_id: container_id.to_string(),
        pod_ref: pod_ref.to_string(),
        ifname: ifname.to_string(),
        dummy: false,
    });
    Ok(ip)
}

/// `DeallocateIP`: removes the first entry of (`container_id`, `ifname`) and returns its address.
/// (Upstream's list is in Go map order, i.e. random; ours is in key order. Only duplicates could tell.)
pub(crate) fn deallocate_ip(list: &mut Vec<Reservation>, container_id: &str, ifname: &str) -> Option<u128> {
    let index = list.iter().position(|r| r.container_id == container_id && r.ifname == ifname)?;
    Some(list.swap_remove(index).ip)
}

/// `IterateForAssignment`: walks the candidate interval upwards; a reserved address is skipped, an
/// address inside an excluded subnet jumps past that whole subnet (first match in list order).
fn lowest_free(config: &UpstreamConfig, list: &[Reservation]) -> Result<u128, String> {
    let network = config.range;
    let (first, last) = candidate_interval(network, config.range_start, config.range_end)?;
    let reserved: HashSet<u128> = list.iter().map(|r| r.ip).collect();
    let excluded = config.exclude.iter().map(|e| parse_excluded(e)).collect::<Result<Vec<_>, _>>()?;
    let mut ip = first;
    while network.contains(&to_std(ip)) && ip <= last {
        if !reserved.contains(&ip) {
            match excluded.iter().find(|subnet| subnet.contains(&to_std(ip))) {
                Some(subnet) => ip = from_std(subnet.broadcast()),
                None => return Ok(ip),
            }
        }
        ip = inc(ip);
    }
    Err(format!(
        "Could not allocate IP in range: ip: {} / - {} / range: {network} / excludeRanges: [{}]",
        to_std(first),
        to_std(last),
        config.exclude.join(" ")
    ))
}

/// `GetIPRange`: network + 1 to broadcast − 1, narrowed by `start` and then `end` when each lies
/// inside what is left (otherwise silently ignored).
fn candidate_interval(
    network: IpNet,
    start: Option<IpAddr>,
    end: Option<IpAddr>,
) -> Result<(u128, u128), String> {
    if network.max_prefix_len() - network.prefix_len() < 2 {
        // Go prints the IPNet value with %s: `{<ip> <hex mask>}`.
        let mask = match network.netmask() {
            IpAddr::V4(mask) => format!("{:08x}", u32::from(mask)),
            IpAddr::V6(mask) => format!("{:032x}", mask.to_bits()),
        };
        return Err(format!(
            "net mask is too short, subnet {{{} {mask}}} has no usable IP addresses, it is too small",
            network.network()
        ));
    }
    let mut first = inc(from_std(network.network()));
    let mut last = dec(from_std(network.broadcast()));
    if let Some(start) = start.map(from_std).filter(|s| (first..=last).contains(s)) {
        first = start;
    }
    if let Some(end) = end.map(from_std).filter(|e| (first..=last).contains(e)) {
        last = end;
    }
    Ok((first, last))
}

/// An `exclude` entry: a CIDR (network-normalised) or a bare IP (/32 or /128).
fn parse_excluded(entry: &str) -> Result<IpNet, String> {
    if let Some(subnet) = parse_cidr_strict(entry) {
        return Ok(subnet.trunc());
    }
    let ip: IpAddr = entry
        .parse()
        .map_err(|_| format!("could not parse exclude range, err: \"invalid CIDR address: {entry}\""))?;
    let prefix = if ip.is_ipv4() { 32 } else { 128 };
    Ok(IpNet::new(ip, prefix).expect("a full-length prefix is valid"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(range: &str) -> UpstreamConfig {
        UpstreamConfig::new(range.parse().unwrap())
    }

    fn taken(ips: &[&str]) -> Vec<Reservation> {
        ips.iter()
            .enumerate()
            .map(|(i, ip)| Reservation {
                ip: from_std(ip.parse().unwrap()),
                container_id: format!("c{i}"),
                pod_ref: format!("ns/p{i}"),
                ifname: "net1".into(),
                dummy: false,
            })
            .collect()
    }

    fn pick(config: &UpstreamConfig, list: &[&str]) -> Result<String, String> {
        let mut list = taken(list);
        assign_ip(config, &mut list, "new", "ns/new", "net1").map(|ip| to_std(ip).to_string())
    }

    #[test]
    fn the_lowest_free_address_is_picked_gateway_and_zero_included() {
        assert_eq!(pick(&config("10.0.0.0/24"), &[]).unwrap(), "10.0.0.1");
        assert_eq!(pick(&config("10.0.0.0/24"), &["10.0.0.1", "10.0.0.3"]).unwrap(), "10.0.0.2");
        let full_first_half: Vec<String> = (1..=255).map(|i| format!("10.0.0.{i}")).collect();
        let refs: Vec<&str> = full_first_half.iter().map(String::as_str).collect();
        assert_eq!(pick(&config("10.0.0.0/23"), &refs).unwrap(), "10.0.1.0");
    }

    #[test]
    fn excluded_subnets_are_jumped_over_whole() {
        let mut c = config("10.0.0.0/24");
        c.exclude = vec!["10.0.0.0/30".into(), "10.0.0.4".into()];
        assert_eq!(pick(&c, &[]).unwrap(), "10.0.0.5");
        c.exclude = vec!["10.0.0.1/30".into()];
        assert_eq!(pick(&c, &[]).unwrap(), "10.0.0.4");
        c.exclude = vec!["10.0.0.1/123".into()];
        assert_eq!(
            pick(&c, &[]).unwrap_err(),
            "could not parse exclude range, err: \"invalid CIDR address: 10.0.0.1/123\""
        );
    }

    #[test]
    fn start_and_end_apply_only_inside_the_usable_interval() {
        let mut c = config("10.0.0.0/24");
        c.range_start = Some("10.0.0.200".parse().unwrap());
        c.range_end = Some("10.0.0.201".parse().unwrap());
        assert_eq!(pick(&c, &[]).unwrap(), "10.0.0.200");
        assert_eq!(
            pick(&c, &["10.0.0.200", "10.0.0.201"]).unwrap_err(),
            "Could not allocate IP in range: ip: 10.0.0.200 / - 10.0.0.201 / range: 10.0.0.0/24 / \
             excludeRanges: []"
        );
        // The network address (upstream's default start) and an end below the start are ignored.
        c.range_start = Some("10.0.0.0".parse().unwrap());
        c.range_end = Some("10.0.0.250".parse().unwrap());
        assert_eq!(pick(&c, &[]).unwrap(), "10.0.0.1");
    }

    #[test]
    fn subnets_without_usable_addresses_are_refused() {
        assert_eq!(
            pick(&config("192.168.21.100/31"), &[]).unwrap_err(),
            "net mask is too short, subnet {192.168.21.100 fffffffe} has no usable IP addresses, it is too small"
        );
    }

    #[test]
    fn ipv6_ranges_hand_out_addresses_ending_in_zero() {
        assert_eq!(pick(&config("fd00::/120"), &[]).unwrap(), "fd00::1");
        let mut c = config("fd00::/64");
        c.range_start = Some("fd00::ff".parse().unwrap());
        assert_eq!(pick(&c, &["fd00::ff"]).unwrap(), "fd00::100");
    }

    #[test]
    fn the_same_pod_and_interface_get_their_address_back_under_a_new_container() {
        let mut list = taken(&["10.0.0.1", "10.0.0.2"]);
        let ip = assign_ip(&config("10.0.0.0/24"), &mut list, "c9", "ns/p1", "net1").unwrap();
        assert_eq!(to_std(ip).to_string(), "10.0.0.2");
        assert_eq!(list.len(), 2);
        assert_eq!(list[1].container_id, "c9");
        // Another interface of the same pod is another allocation.
        let ip = assign_ip(&config("10.0.0.0/24"), &mut list, "c9", "ns/p1", "net2").unwrap();
        assert_eq!(to_std(ip).to_string(), "10.0.0.3");
    }

    #[test]
    fn dummies_are_skipped() {
        let mut list = taken(&["10.0.0.1"]);
        list.push(Reservation::dummy(from_std("10.0.0.2".parse().unwrap())));
        let ip = assign_ip(&config("10.0.0.0/24"), &mut list, "c", "ns/x", "net1").unwrap();
        assert_eq!(to_std(ip).to_string(), "10.0.0.3");
    }

    #[test]
    fn deallocation_matches_container_and_interface() {
        let mut list = taken(&["10.0.0.1", "10.0.0.2", "10.0.0.3"]);
        assert_eq!(deallocate_ip(&mut list, "c1", "eth0"), None);
        assert_eq!(deallocate_ip(&mut list, "c1", "net1"), Some(from_std("10.0.0.2".parse().unwrap())));
        let left: Vec<&str> = list.iter().map(|r| r.container_id.as_str()).collect();
        assert_eq!(left, ["c0", "c2"]);
    }
}
