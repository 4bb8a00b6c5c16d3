//! Go's `net.IP` arithmetic as upstream whereabouts does it (`pkg/iphelpers`), bugs included.
//!
//! An address is held as Go holds it after `net.ParseIP`/`net.ParseCIDR`: 16 bytes, IPv4 as the
//! IPv4-mapped `::ffff:a.b.c.d`. Here those 16 bytes are one big-endian `u128`, so Go's byte loops become
//! integer operations wherever they are exact, and stay byte loops where upstream's are not (the
//! subtraction's borrow).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The 96 high bits of an IPv4-mapped address.
const V4_MAPPED: u128 = 0xffff << 32;

/// The 16-byte form of an address.
pub(crate) fn from_std(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => V4_MAPPED | u128::from(u32::from(v4)),
        IpAddr::V6(v6) => v6.to_bits(),
    }
}

/// Go's `ip.To4() != nil`: the address is IPv4-mapped.
pub(crate) fn is_v4(ip: u128) -> bool {
    ip >> 32 == 0xffff
}

/// The address Go prints: dotted IPv4 for mapped addresses, IPv6 otherwise.
pub(crate) fn to_std(ip: u128) -> IpAddr {
    if is_v4(ip) { IpAddr::V4(Ipv4Addr::from(ip as u32)) } else { IpAddr::V6(Ipv6Addr::from_bits(ip)) }
}

/// `IncIP`: +1, wrapping inside the family (255.255.255.255 + 1 = 0.0.0.0).
pub(crate) fn inc(ip: u128) -> u128 {
    if is_v4(ip) { V4_MAPPED | u128::from((ip as u32).wrapping_add(1)) } else { ip.wrapping_add(1) }
}

/// `DecIP`: −1, wrapping inside the family.
pub(crate) fn dec(ip: u128) -> u128 {
    if is_v4(ip) { V4_MAPPED | u128::from((ip as u32).wrapping_sub(1)) } else { ip.wrapping_sub(1) }
}

/// `IPGetOffset(ip, base)`: `|ip − base|` folded to the low 64 bits, computed with upstream's
/// `byteSliceSub`, whose borrow is wrong when a minuend byte is non-zero and smaller than the
/// subtrahend byte (it computes `256 − a − b` instead of `256 + a − b`). With a canonical network as
/// the base no byte ever borrows, so pools written by whereabouts get exact offsets.
pub(crate) fn offset(ip: u128, base: u128) -> Result<u64, String> {
    match (is_v4(ip), is_v4(base)) {
        (true, false) => {
            return Err(format!(
                "cannot calculate offset between IPv4 ({}) and IPv6 address ({})",
                to_std(ip),
                to_std(base)
            ));
        }
        (false, true) => {
            return Err(format!(
                "cannot calculate offset between IPv6 ({}) and IPv4 address ({})",
                to_std(ip),
                to_std(base)
            ));
        }
        _ => {}
    }
    let (high, low) = if ip < base { (base, ip) } else { (ip, base) };
    let (a, b) = (high.to_be_bytes(), low.to_be_bytes());
    let mut difference = [0u8; 16];
    let mut borrow = 0i32;
    for n in (0..16).rev() {
        let (x, y) = (i32::from(a[n]), i32::from(b[n]));
        let mut byte = x - y - borrow;
        if byte < 0 {
            byte = 0x100 - x - y - borrow;
            borrow = 1;
        } else {
            borrow = 0;
        }
        difference[n] = byte as u8;
    }
    // ipAddrToUint64 shifts all 16 bytes through a u64: only the low 8 survive.
    Ok(u128::from_be_bytes(difference) as u64)
}

/// `IPAddOffset(base, offset)`: a 16-byte add with carry (the final carry is lost), except that an IPv4
/// base with an offset of `u32::MAX` or more gives Go's nil IP (`None`).
pub(crate) fn add_offset(base: u128, offset: u64) -> Option<u128> {
    if is_v4(base) && offset >= u64::from(u32::MAX) {
        return None;
    }
    Some(base.wrapping_add(u128::from(offset)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> u128 {
        from_std(s.parse().unwrap())
    }

    #[test]
    fn ipv4_is_mapped_and_printed_dotted() {
        assert_eq!(ip("10.0.0.1"), 0xffff_0a00_0001);
        assert!(is_v4(ip("10.0.0.1")));
        assert!(!is_v4(ip("::a00:1")));
        assert_eq!(to_std(ip("10.0.0.1")).to_string(), "10.0.0.1");
        assert_eq!(to_std(ip("caa5::8000")).to_string(), "caa5::8000");
    }

    #[test]
    fn increments_wrap_inside_the_family() {
        assert_eq!(inc(ip("255.255.255.255")), ip("0.0.0.0"));
        assert_eq!(dec(ip("0.0.0.0")), ip("255.255.255.255"));
        assert_eq!(inc(ip("10.0.0.255")), ip("10.0.1.0"));
        assert_eq!(inc(ip("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff")), ip("::"));
    }

    #[test]
    fn offsets_from_a_network_base_are_exact() {
        assert_eq!(offset(ip("192.168.1.5"), ip("192.168.1.0")), Ok(5));
        assert_eq!(offset(ip("10.10.1.0"), ip("10.10.0.0")), Ok(256));
        assert_eq!(offset(ip("caa5::8000"), ip("caa5::")), Ok(32768));
        // Folded to 64 bits: the upper half of a /64 host part is lost.
        assert_eq!(offset(ip("2001:db8::1:0:0:5"), ip("2001:db8::")), Ok(0x0001_0000_0000_0005));
        assert_eq!(offset(ip("2001:db8:0:1::5"), ip("2001:db8::")), Ok(5));
    }

    #[test]
    fn offsets_below_the_base_are_absolute_and_borrows_are_wrong() {
        assert_eq!(offset(ip("10.0.0.3"), ip("10.0.0.5")), Ok(2));
        // 10.0.1.2 − 10.0.0.5: the last byte borrows, 256 − 2 − 5 = 249 instead of 253.
        assert_eq!(offset(ip("10.0.1.2"), ip("10.0.0.5")), Ok(249));
    }

    #[test]
    fn offsets_across_families_are_refused() {
        assert_eq!(
            offset(ip("10.0.0.1"), ip("fd00::")),
            Err("cannot calculate offset between IPv4 (10.0.0.1) and IPv6 address (fd00::)".into())
        );
        assert_eq!(
            offset(ip("fd00::1"), ip("10.0.0.0")),
            Err("cannot calculate offset between IPv6 (fd00::1) and IPv4 address (10.0.0.0)".into())
        );
    }

    #[test]
    fn adding_offsets_carries_and_ipv4_overflows_to_nil() {
        assert_eq!(add_offset(ip("10.0.0.0"), 256), Some(ip("10.0.1.0")));
        assert_eq!(add_offset(ip("10.0.0.0"), u64::from(u32::MAX)), None);
        assert_eq!(add_offset(ip("10.0.0.0"), u64::MAX), None);
        assert_eq!(add_offset(ip("fd00::"), u64::MAX), Some(ip("fd00::ffff:ffff:ffff:ffff")));
    }
}
