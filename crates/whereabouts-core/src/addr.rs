//! Address arithmetic and the lenient ("sloppy") parsers upstream uses for ranges.
//!
//! Every address is handled as a `u128` together with its [`Family`]: IPv4 addresses occupy the low 32
//! bits. That gives one code path for both families and full 128-bit arithmetic for IPv6 (upstream folds
//! offsets to 64 bits and loses the upper half of a /64).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

/// The address family of a range, pool or address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

impl Family {
    /// The family of an address.
    pub fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    /// Number of address bits.
    pub fn bits(self) -> u8 {
        match self {
            Family::V4 => 32,
            Family::V6 => 128,
        }
    }

    /// The CNI 0.3/0.4 `version` string of an IP entry.
    pub fn cni_version_tag(self) -> &'static str {
        match self {
            Family::V4 => "4",
            Family::V6 => "6",
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        })
    }
}

/// An address as an integer (IPv4 in the low 32 bits).
pub fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => v6.to_bits(),
    }
}

/// The inverse of [`to_u128`]. For IPv4 only the low 32 bits are used; callers keep values in range.
pub fn from_u128(family: Family, value: u128) -> IpAddr {
    match family {
        Family::V4 => IpAddr::V4(Ipv4Addr::from(value as u32)),
        Family::V6 => IpAddr::V6(Ipv6Addr::from_bits(value)),
    }
}

/// The first and last address of a network, as integers.
pub fn net_bounds(net: &IpNet) -> (u128, u128) {
    (to_u128(net.network()), to_u128(net.broadcast()))
}

/// Parses an IP the way Kubernetes' `ParseIPSloppy` does: IPv4 octets may carry leading zeros and are
/// read as decimal (`010.0.0.1` is `10.0.0.1`). IPv6 is parsed normally.
pub fn parse_ip_sloppy(s: &str) -> Option<IpAddr> {
    if s.contains(':') {
        return s.parse::<Ipv6Addr>().ok().map(IpAddr::V6);
    }
    let mut octets = [0u8; 4];
    let mut parts = s.split('.');
    for octet in &mut octets {
        let part = parts.next()?;
        if part.is_empty() || part.len() > 8 || !part.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        *octet = part.parse::<u8>().ok()?;
    }
    if parts.next().is_some() {
        return None;
    }
    Some(IpAddr::V4(Ipv4Addr::from(octets)))
}

/// Parses `ip/prefix` with [`parse_ip_sloppy`] for the address part, keeping host bits.
pub fn parse_cidr_sloppy(s: &str) -> Option<IpNet> {
    let (ip, prefix) = s.split_once('/')?;
    let ip = parse_ip_sloppy(ip)?;
    parse_prefix(prefix, Family::of(ip)).and_then(|p| IpNet::new(ip, p).ok())
}

/// Parses `ip/prefix` strictly (no leading zeros), keeping host bits.
pub fn parse_cidr_strict(s: &str) -> Option<IpNet> {
    let (ip, prefix) = s.split_once('/')?;
    let ip: IpAddr = ip.parse().ok()?;
    parse_prefix(prefix, Family::of(ip)).and_then(|p| IpNet::new(ip, p).ok())
}

fn parse_prefix(s: &str, family: Family) -> Option<u8> {
    if s.is_empty() || s.len() > 3 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse::<u8>().ok().filter(|p| *p <= family.bits())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sloppy_ipv4_accepts_leading_zeros_as_decimal() {
        assert_eq!(parse_ip_sloppy("00192.00168.1.010"), "192.168.1.10".parse().ok());
        assert_eq!(parse_ip_sloppy("010.0.0.1"), "10.0.0.1".parse().ok());
        assert_eq!(parse_ip_sloppy("256.0.0.1"), None);
        assert_eq!(parse_ip_sloppy("1.2.3"), None);
        assert_eq!(parse_ip_sloppy("1.2.3.4.5"), None);
        assert_eq!(parse_ip_sloppy("1.2.3.+4"), None);
        assert_eq!(parse_ip_sloppy(""), None);
    }

    #[test]
    fn sloppy_cidr_keeps_host_bits() {
        let net = parse_cidr_sloppy("00192.00168.1.5/24").unwrap();
        assert_eq!(net.to_string(), "192.168.1.5/24");
        assert_eq!(net.trunc().to_string(), "192.168.1.0/24");
        assert_eq!(parse_cidr_sloppy("abcd::1/64").unwrap().trunc().to_string(), "abcd::/64");
        assert!(parse_cidr_sloppy("10.0.0.0/33").is_none());
        assert!(parse_cidr_sloppy("10.0.0.0/").is_none());
        assert!(parse_cidr_sloppy("10.0.0.0").is_none());
    }

    #[test]
    fn strict_cidr_rejects_leading_zeros() {
        assert!(parse_cidr_strict("010.0.0.0/8").is_none());
        assert_eq!(parse_cidr_strict("3ffe:ffff:0:01ff::1/64").unwrap().to_string(), "3ffe:ffff:0:1ff::1/64");
    }

    #[test]
    fn integer_round_trip() {
        for s in ["0.0.0.0", "255.255.255.255", "10.1.2.3", "::", "2001:db8::1", "ffff::ffff"] {
            let ip: IpAddr = s.parse().unwrap();
            assert_eq!(from_u128(Family::of(ip), to_u128(ip)), ip);
        }
    }
}
