//! The allocation policy (upstream `AssignIP` / `IterateForAssignment`), with our fixes: the gateway and
//! IPv4 addresses ending in `.0` are never handed out, requested addresses are reserved, and the search
//! for the lowest free address jumps over runs of taken addresses instead of stepping through them.
//!
//! Addresses in their release cooldown ([`Pool::cooling`]) are passed over while any other candidate is
//! free; when none is, the one whose cooldown ends first is handed out (a full range still serves).
//! A requested address is given whether or not it is cooling: it was asked for by name.

use std::hash::{Hash, Hasher};
use std::net::IpAddr;

use thiserror::Error;

use crate::addr::{Family, from_u128, to_u128};
use crate::interval::IntervalSet;
use crate::pool::{Owner, Pool};
use crate::range::IpRange;

/// What an ADD gets from one range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Assignment {
    /// The owner already holds this address (idempotent ADD); its record is refreshed.
    Existing(u128),
    /// A newly taken address; `replaces` is the owner's previous address when it asked for another one.
    New {
        /// The address.
        addr: u128,
        /// The owner's previous address in this pool, released in the same write.
        replaces: Option<u128>,
    },
}

impl Assignment {
    /// The address handed out.
    pub fn addr(self) -> u128 {
        match self {
            Assignment::Existing(addr) | Assignment::New { addr, .. } => addr,
        }
    }
}

/// Why a range could not give an address.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AllocError {
    /// Every candidate is taken, excluded or reserved elsewhere.
    #[error("no free address in range {0}")]
    Exhausted(String),
    /// A requested address is held by someone else.
    #[error("requested address {ip} is already allocated to {holder}")]
    Held {
        /// The address.
        ip: IpAddr,
        /// The holder's pod reference or container ID.
        holder: String,
    },
    /// A requested address lies below the IP written in the pool's stored range (only in pools written
    /// by hand with host bits set), so no offset can record it.
    #[error("requested address {0} lies below the start of its pool's stored range")]
    BelowPoolBase(IpAddr),
    /// A requested address is the gateway.
    #[error("requested address {0} is the gateway")]
    Gateway(IpAddr),
}

/// Never hand out IPv4 addresses ending in `.0`: old equipment treats them as invalid, and
/// whereabouts' README has always promised it.
fn is_dot_zero(family: Family, addr: u128) -> bool {
    family == Family::V4 && addr & 0xff == 0
}

/// The lowest candidate of `range` that is not taken in `pool`, not excluded, not in `blocked`
/// (addresses found reserved by an overlapping pool), not the gateway and not an IPv4 `.0` address.
///
/// Each step jumps past a whole blocking run, so the cost grows with the number of runs crossed, not
/// with the number of taken addresses.
pub fn lowest_free(
    range: &IpRange,
    pool: &Pool,
    gateway: Option<IpAddr>,
    blocked: &IntervalSet,
) -> Option<u128> {
    free_from(range, pool, gateway, blocked, range.first(), Cooldowns::PassOver)
        .or_else(|| coolest_free(range, pool, gateway, blocked))
}

/// Whether a search passes over addresses in their release cooldown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cooldowns {
    /// Cooling addresses count as taken.
    PassOver,
    /// Cooling addresses count as free.
    Ignore,
}

/// The cooling address whose cooldown ends first among those that are otherwise free candidates: what
/// a range with no other free address hands out.
fn coolest_free(
    range: &IpRange,
    pool: &Pool,
    gateway: Option<IpAddr>,
    blocked: &IntervalSet,
) -> Option<u128> {
    pool.cooling_by_end()
        .into_iter()
        .find(|addr| free_from(range, pool, gateway, blocked, *addr, Cooldowns::Ignore) == Some(*addr))
}

/// The lowest free candidate at or above `from` (see [`lowest_free`]).
fn free_from(
    range: &IpRange,
    pool: &Pool,
    gateway: Option<IpAddr>,
    blocked: &IntervalSet,
    from: u128,
    cooldowns: Cooldowns,
) -> Option<u128> {
    let family = range.family();
    let gateway = gateway.filter(|g| Family::of(*g) == family).map(to_u128);
    let cooling = match cooldowns {
        Cooldowns::PassOver => pool.cooling(),
        Cooldowns::Ignore => &IntervalSet::EMPTY,
    };
    let mut candidate = from.max(range.first()).max(pool.base());
    while candidate <= range.last() {
        let run = [pool.taken(), range.excluded(), blocked, cooling]
            .into_iter()
            .find_map(|set| set.run_containing(candidate));
        candidate = match run {
            Some(run) => run.end().checked_add(1)?,
            None if gateway == Some(candidate) || is_dot_zero(family, candidate) => candidate + 1,
            None => return Some(candidate),
        };
    }
    None
}

/// Where a writer's new addresses start among the free ones of a range.
///
/// A writer alone on a pool takes the lowest free addresses, in order: compact and predictable. But
/// writers on several nodes that write one pool at the same moment, each for a batch of the ADDs queued
/// on its node, would all take the same lowest free addresses, and on a store that compares the keys a
/// write changes (the Kubernetes store) all but one would lose the compare-and-swap, again and again.
///
/// So a writer that is racing (it lost a race on this pool, or its node did recently) takes a *lane*:
/// the free addresses, counted from the lowest, are cut into consecutive blocks of [`Lane::WIDTH`], and
/// the writer's batch takes consecutive free addresses from the start of block
/// `hash(writer, round) % lanes`. Writers in different lanes never pick the same address; two that
/// hashed into one lane collide once more and move on to `round + 1`, with more lanes. Addresses stay
/// within the lowest `lanes x WIDTH` free ones (fewer free addresses than that: the count wraps), and
/// a lane is a pure function of the writer, the round and the pool as read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Lane {
    /// How many of the lowest free addresses to pass over before the batch starts.
    pub skip: u64,
}

impl Lane {
    /// Not racing: the lowest free address.
    pub const LOWEST: Lane = Lane { skip: 0 };
    /// Free addresses per lane: room for a node's batch without spilling into the next lane.
    pub const WIDTH: u64 = 16;

    /// How many lanes there are in `round`: 32 at the first, 128 from the second on (at most 2048
    /// addresses passed over).
    pub fn count(round: u32) -> u64 {
        match round {
            0 => 1,
            1 => 32,
            _ => 128,
        }
    }

    /// The lane of `writer` (its node) in `round` (0: not racing, the lowest free address).
    pub fn of(writer: &str, round: u32) -> Lane {
        if round == 0 {
            return Lane::LOWEST;
        }
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        (writer, round).hash(&mut hasher);
        Lane { skip: hasher.finish() % Lane::count(round) * Lane::WIDTH }
    }
}

/// The first free address of `lane`: the `lane.skip`-th free address counted from the lowest (0: the
/// lowest), or, when the range has only `n <= lane.skip` free addresses, the `lane.skip % n`-th. `None`
/// when no address is free. Addresses in their release cooldown are not counted; when only those are
/// free, the lane starts at the one whose cooldown ends first.
pub fn lane_start(
    range: &IpRange,
    pool: &Pool,
    gateway: Option<IpAddr>,
    blocked: &IntervalSet,
    lane: Lane,
) -> Option<u128> {
    let Some(lowest) = free_from(range, pool, gateway, blocked, range.first(), Cooldowns::PassOver) else {
        return coolest_free(range, pool, gateway, blocked);
    };
    let mut passed = 0u64;
    let mut at = lowest;
    while passed < lane.skip {
        let next = at
            .checked_add(1)
            .and_then(|from| free_from(range, pool, gateway, blocked, from, Cooldowns::PassOver));
        match next {
            Some(next) => {
                at = next;
                passed += 1;
            }
            None => {
                // Fewer free addresses than the lane passes over: count again from the lowest.
                let wrapped = lane.skip % (passed + 1);
                return lane_start(range, pool, gateway, blocked, Lane { skip: wrapped });
            }
        }
    }
    Some(at)
}

/// Chooses the address `owner` gets from `range` (without changing the pool; see [`apply`]).
///
/// * The owner's existing allocation is returned again (idempotent ADD), unless it asked for a
///   different address.
/// * A `requested` address must be free (or already the owner's) and not the gateway; `exclude` and
///   `range_start`..`range_end` shape only the dynamic pick, as upstream.
/// * Otherwise the lowest free address.
pub fn assign(
    range: &IpRange,
    pool: &Pool,
    owner: &Owner,
    requested: Option<IpAddr>,
    gateway: Option<IpAddr>,
    blocked: &IntervalSet,
) -> Result<Assignment, AllocError> {
    assign_from(range, pool, owner, requested, gateway, blocked, range.first())
}

/// [`assign`], with a new address taken at or above `start` (a [`lane_start`], or the address after
/// the previous one of a batch), or the lowest free one when none is free there.
pub fn assign_from(
    range: &IpRange,
    pool: &Pool,
    owner: &Owner,
    requested: Option<IpAddr>,
    gateway: Option<IpAddr>,
    blocked: &IntervalSet,
    start: u128,
) -> Result<Assignment, AllocError> {
    let Some(ip) = requested else {
        if let Some(addr) = pool.reused_by(owner) {
            return Ok(Assignment::Existing(addr));
        }
        return free_from(range, pool, gateway, blocked, start, Cooldowns::PassOver)
            .or_else(|| lowest_free(range, pool, gateway, blocked))
            .map(|addr| Assignment::New { addr, replaces: None })
            .ok_or_else(|| AllocError::Exhausted(range.describe()));
    };
    let owned = pool.owned(owner);
    let addr = to_u128(ip);
    let elsewhere = owned.iter().copied().find(|a| *a != addr);
    if owned.contains(&addr) {
        // Already ours; an address we were moving away from (the first try of this move landed but
        // its answer was lost) is finished off now.
        return Ok(match elsewhere {
            None => Assignment::Existing(addr),
            Some(old) => Assignment::New { addr, replaces: Some(old) },
        });
    }
    if let Some(holder) = pool.get(addr) {
        let holder =
            if holder.pod_ref.is_empty() { holder.container_id.clone() } else { holder.pod_ref.clone() };
        return Err(AllocError::Held { ip, holder });
    }
    if blocked.contains(addr) {
        return Err(AllocError::Held { ip, holder: "an overlapping range".into() });
    }
    if gateway == Some(ip) {
        return Err(AllocError::Gateway(ip));
    }
    if addr < pool.base() {
        return Err(AllocError::BelowPoolBase(ip));
    }
    Ok(Assignment::New { addr, replaces: elsewhere })
}

/// Writes an assignment into the pool and returns the address as an IP.
pub fn apply(pool: &mut Pool, assignment: Assignment, owner: &Owner) -> IpAddr {
    if let Assignment::New { replaces: Some(old), .. } = assignment {
        pool.remove(old);
    }
    let addr = assignment.addr();
    pool.insert(addr, owner.allocation());
    from_u128(pool.family(), addr)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ipnet::IpNet;
    use proptest::prelude::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }
    fn range(cidr: &str, start: Option<&str>, end: Option<&str>, exclude: &[&str]) -> IpRange {
        IpRange::new(
            cidr.parse().unwrap(),
            start.map(ip),
            end.map(ip),
            exclude.iter().map(|e| e.parse::<IpNet>().unwrap()).collect(),
        )
        .unwrap()
    }
    fn owner(n: usize) -> Owner {
        Owner {
            container_id: format!("c{n}"),
            pod_ref: Some(format!("ns/p{n}")),
            ifname: "eth0".into(),
            node: Some("node-a".into()),
            cni_network: Some("net".into()),
            pod_uid: None,
            statefulset: None,
            ipam_claim: None,
        }
    }
    fn take(r: &IpRange, pool: &mut Pool, n: usize) -> IpAddr {
        let o = owner(n);
        let a = assign(r, pool, &o, None, None, &IntervalSet::new()).unwrap();
        apply(pool, a, &o)
    }

    #[test]
    fn lowest_first() {
        let r = range("192.168.1.0/24", None, None, &[]);
        let mut pool = Pool::new(r.network());
        assert_eq!(take(&r, &mut pool, 1), ip("192.168.1.1"));
        assert_eq!(take(&r, &mut pool, 2), ip("192.168.1.2"));
        pool.remove(to_u128(ip("192.168.1.1")));
        assert_eq!(take(&r, &mut pool, 3), ip("192.168.1.1"), "freed addresses are reused first");
    }

    #[test]
    fn range_start_and_end() {
        let r = range("192.168.1.0/24", Some("192.168.1.5"), Some("192.168.1.6"), &[]);
        let mut pool = Pool::new(r.network());
        assert_eq!(take(&r, &mut pool, 1), ip("192.168.1.5"));
        assert_eq!(take(&r, &mut pool, 2), ip("192.168.1.6"));
        let err = assign(&r, &pool, &owner(3), None, None, &IntervalSet::new()).unwrap_err();
        assert!(matches!(err, AllocError::Exhausted(_)));
        assert!(err.to_string().contains("192.168.1.5 - 192.168.1.6 in 192.168.1.0/24"), "{err}");
    }

    #[test]
    fn excluded_blocks_are_skipped_whole() {
        let r = range("192.168.2.0/24", None, None, &["192.168.2.0/30", "192.168.2.5/32"]);
        let mut pool = Pool::new(r.network());
        assert_eq!(take(&r, &mut pool, 1), ip("192.168.2.4"));
        assert_eq!(take(&r, &mut pool, 2), ip("192.168.2.6"));
    }

    #[test]
    fn an_exclude_reaching_past_the_range_ends_it() {
        let r = range("10.0.0.0/28", None, None, &["10.0.0.0/24"]);
        let pool = Pool::new(r.network());
        assert_eq!(lowest_free(&r, &pool, None, &IntervalSet::new()), None);
    }

    #[test]
    fn gateway_and_dot_zero_are_never_handed_out() {
        let r = range("10.0.0.0/16", Some("10.0.0.254"), None, &[]);
        let mut pool = Pool::new(r.network());
        let gw = Some(ip("10.0.1.1"));
        let mut got = Vec::new();
        for n in 0..4 {
            let o = owner(n);
            let a = assign(&r, &pool, &o, None, gw, &IntervalSet::new()).unwrap();
            got.push(apply(&mut pool, a, &o));
        }
        assert_eq!(got, [ip("10.0.0.254"), ip("10.0.0.255"), ip("10.0.1.2"), ip("10.0.1.3")]);
        assert_eq!(
            assign(&r, &pool, &owner(9), Some(ip("10.0.1.1")), gw, &IntervalSet::new()),
            Err(AllocError::Gateway(ip("10.0.1.1")))
        );
    }

    #[test]
    fn ipv6_addresses_ending_in_zero_are_fine() {
        let r = range("2001:db8::/112", Some("2001:db8::ff"), None, &[]);
        let mut pool = Pool::new(r.network());
        assert_eq!(take(&r, &mut pool, 1), ip("2001:db8::ff"));
        assert_eq!(take(&r, &mut pool, 2), ip("2001:db8::100"));
    }

    #[test]
    fn idempotent_on_pod_and_interface() {
        let r = range("10.0.0.0/24", None, None, &[]);
        let mut pool = Pool::new(r.network());
        let first = take(&r, &mut pool, 1);
        let mut again = owner(1);
        again.container_id = "new-sandbox".into();
        let a = assign(&r, &pool, &again, None, None, &IntervalSet::new()).unwrap();
        assert_eq!(a, Assignment::Existing(to_u128(first)));
        apply(&mut pool, a, &again);
        assert_eq!(pool.get(to_u128(first)).unwrap().container_id, "new-sandbox");
        let mut other_if = owner(1);
        other_if.ifname = "net1".into();
        assert_ne!(take_owner(&r, &mut pool, &other_if), first);
    }

    fn take_owner(r: &IpRange, pool: &mut Pool, o: &Owner) -> IpAddr {
        let a = assign(r, pool, o, None, None, &IntervalSet::new()).unwrap();
        apply(pool, a, o)
    }

    #[test]
    fn requested_addresses() {
        let r = range("10.0.0.0/24", None, None, &["10.0.0.128/25"]);
        let mut pool = Pool::new(r.network());
        let o = owner(1);
        let a = assign(&r, &pool, &o, Some(ip("10.0.0.50")), None, &IntervalSet::new()).unwrap();
        assert_eq!(apply(&mut pool, a, &o), ip("10.0.0.50"));
        assert_eq!(
            assign(&r, &pool, &owner(2), Some(ip("10.0.0.50")), None, &IntervalSet::new()),
            Err(AllocError::Held { ip: ip("10.0.0.50"), holder: "ns/p1".into() })
        );
        // An excluded address is still given when asked for: exclude shapes the dynamic pick only.
        assert_eq!(
            assign(&r, &pool, &owner(2), Some(ip("10.0.0.200")), None, &IntervalSet::new()),
            Ok(Assignment::New { addr: to_u128(ip("10.0.0.200")), replaces: None })
        );
        // Asking for another address moves the owner's allocation.
        let a = assign(&r, &pool, &o, Some(ip("10.0.0.60")), None, &IntervalSet::new()).unwrap();
        assert_eq!(
            a,
            Assignment::New { addr: to_u128(ip("10.0.0.60")), replaces: Some(to_u128(ip("10.0.0.50"))) }
        );
        apply(&mut pool, a, &o);
        assert_eq!(pool.len(), 1);
        // The lowest free skips the requested one.
        assert_eq!(take(&r, &mut pool, 3), ip("10.0.0.1"));
    }

    #[test]
    fn requested_addresses_below_a_hand_made_pools_base_are_refused() {
        let r = range("10.0.0.0/24", None, None, &[]);
        let spec = crate::pool::PoolSpec { range: "10.0.0.5/24".into(), ..Default::default() };
        let (pool, _) = Pool::from_spec(&spec, r.network()).unwrap();
        assert_eq!(
            assign(&r, &pool, &owner(1), Some(ip("10.0.0.3")), None, &IntervalSet::new()),
            Err(AllocError::BelowPoolBase(ip("10.0.0.3")))
        );
        // The lowest free starts at the base.
        assert_eq!(lowest_free(&r, &pool, None, &IntervalSet::new()), Some(to_u128(ip("10.0.0.5"))));
    }

    #[test]
    fn a_move_whose_first_write_landed_is_finished_not_refused() {
        let r = range("10.7.0.0/24", None, None, &[]);
        let mut pool = Pool::new(r.network());
        let o = owner(1);
        // The owner holds its old address 10.7.0.2 and, from a landed first try, the requested .5.
        pool.insert(to_u128(ip("10.7.0.2")), o.allocation());
        pool.insert(to_u128(ip("10.7.0.5")), o.allocation());
        assert_eq!(
            assign(&r, &pool, &o, Some(ip("10.7.0.5")), None, &IntervalSet::new()),
            Ok(Assignment::New { addr: to_u128(ip("10.7.0.5")), replaces: Some(to_u128(ip("10.7.0.2"))) })
        );
        // Either order of the two addresses.
        let mut pool = Pool::new(r.network());
        pool.insert(to_u128(ip("10.7.0.9")), o.allocation());
        pool.insert(to_u128(ip("10.7.0.5")), o.allocation());
        assert_eq!(
            assign(&r, &pool, &o, Some(ip("10.7.0.5")), None, &IntervalSet::new()),
            Ok(Assignment::New { addr: to_u128(ip("10.7.0.5")), replaces: Some(to_u128(ip("10.7.0.9"))) })
        );
    }

    #[test]
    fn blocked_addresses_are_skipped() {
        let r = range("10.0.0.0/24", None, None, &[]);
        let pool = Pool::new(r.network());
        let blocked: IntervalSet = [to_u128(ip("10.0.0.1")), to_u128(ip("10.0.0.2"))].into_iter().collect();
        assert_eq!(lowest_free(&r, &pool, None, &blocked), Some(to_u128(ip("10.0.0.3"))));
    }

    #[test]
    fn a_slash_64_with_many_allocations() {
        let r = range("2001:db8::/64", None, None, &[]);
        let mut pool = Pool::new(r.network());
        let base = r.first();
        for i in 0..10_000u128 {
            pool.insert(base + i, owner(0).allocation());
        }
        pool.remove(base + 5_000);
        assert_eq!(lowest_free(&r, &pool, None, &IntervalSet::new()), Some(base + 5_000));
        assert_eq!(pool.taken().run_count(), 2);
    }

    #[test]
    fn lanes_start_at_the_lowest_and_multiply_per_round() {
        assert_eq!(Lane::of("node-a", 0), Lane::LOWEST);
        for round in 1..4 {
            let lane = Lane::of("node-a", round);
            assert_eq!(lane, Lane::of("node-a", round), "deterministic");
            assert_eq!(lane.skip % Lane::WIDTH, 0);
            assert!(lane.skip < Lane::count(round) * Lane::WIDTH);
        }
        let lanes: std::collections::HashSet<u64> =
            (0..20).map(|n| Lane::of(&format!("node-{n}"), 2).skip).collect();
        assert!(lanes.len() > 15, "20 nodes over 128 lanes mostly differ: {lanes:?}");
    }

    #[test]
    fn batches_of_racing_nodes_land_in_disjoint_runs() {
        // Ten nodes read the same pool and each takes a batch of ten from its lane: as long as their
        // lanes differ, no address is picked twice.
        let r = range("10.0.0.0/16", None, None, &[]);
        let mut pool = Pool::new(r.network());
        for n in 0..7 {
            take(&r, &mut pool, 1000 + n);
        }
        let mut picked = std::collections::HashMap::new();
        let mut lanes = std::collections::HashSet::new();
        for node in 0..10 {
            let lane = Lane::of(&format!("node-{node}"), 1);
            if !lanes.insert(lane) {
                continue;
            }
            let mut batch = pool.clone();
            let start = lane_start(&r, &batch, None, &IntervalSet::new(), lane).unwrap();
            for i in 0..10 {
                let o = owner(node * 100 + i);
                let a = assign_from(&r, &batch, &o, None, None, &IntervalSet::new(), start).unwrap();
                let addr = to_u128(apply(&mut batch, a, &o));
                assert_eq!(picked.insert(addr, node), None, "{addr} picked twice");
            }
        }
        assert!(lanes.len() > 5, "{lanes:?}");
    }

    #[test]
    fn a_lane_past_the_free_addresses_wraps() {
        let r = range("10.0.0.0/29", None, None, &[]);
        let pool = Pool::new(r.network());
        // Six free addresses, .1 to .6: the 8th free one wraps to the 8 % 6 = 2nd, .3.
        let start = lane_start(&r, &pool, None, &IntervalSet::new(), Lane { skip: 8 });
        assert_eq!(start, Some(to_u128(ip("10.0.0.3"))));
        let full = range("10.0.0.0/30", Some("10.0.0.1"), Some("10.0.0.1"), &[]);
        let mut pool = Pool::new(full.network());
        take(&full, &mut pool, 1);
        assert_eq!(lane_start(&full, &pool, None, &IntervalSet::new(), Lane { skip: 16 }), None);
    }

    #[test]
    fn a_cooling_address_waits_while_others_are_free() {
        let r = range("10.0.0.0/29", None, None, &[]);
        let mut pool = Pool::new(r.network());
        let first = take(&r, &mut pool, 1);
        assert_eq!(first, ip("10.0.0.1"));
        pool.release(to_u128(first), Some(100));
        assert_eq!(take(&r, &mut pool, 2), ip("10.0.0.2"), "the released .1 cools");
        for n in 3..=6 {
            take(&r, &mut pool, n);
        }
        // .1 is the only free address left: it is handed out, and its cooldown goes with it.
        assert_eq!(take(&r, &mut pool, 8), ip("10.0.0.1"));
        assert!(pool.cooling().is_empty());
        assert!(pool.to_spec().cooldowns.is_empty());
    }

    #[test]
    fn with_only_cooling_addresses_free_the_first_to_end_is_handed_out() {
        let r = range("10.0.0.0/29", None, None, &[]);
        let mut pool = Pool::new(r.network());
        for n in 1..=6 {
            take(&r, &mut pool, n);
        }
        pool.release(to_u128(ip("10.0.0.2")), Some(300));
        pool.release(to_u128(ip("10.0.0.5")), Some(200));
        assert_eq!(lowest_free(&r, &pool, None, &IntervalSet::new()), Some(to_u128(ip("10.0.0.5"))));
        assert_eq!(
            lane_start(&r, &pool, None, &IntervalSet::new(), Lane { skip: 16 }),
            Some(to_u128(ip("10.0.0.5")))
        );
        // Expired, both are ordinary free addresses again: the lowest first.
        assert!(pool.expire_cooldowns(300));
        assert_eq!(lowest_free(&r, &pool, None, &IntervalSet::new()), Some(to_u128(ip("10.0.0.2"))));
        assert!(!pool.expire_cooldowns(300));
    }

    #[test]
    fn a_cooling_address_is_given_when_asked_for_by_name() {
        let r = range("10.0.0.0/24", None, None, &[]);
        let mut pool = Pool::new(r.network());
        pool.cool(to_u128(ip("10.0.0.9")), 100);
        let o = owner(1);
        let a = assign(&r, &pool, &o, Some(ip("10.0.0.9")), None, &IntervalSet::new()).unwrap();
        assert_eq!(apply(&mut pool, a, &o), ip("10.0.0.9"));
        assert!(pool.cooling().is_empty());
    }

    #[test]
    fn cooldowns_round_trip_beside_the_spec() {
        let net: IpNet = "10.0.0.0/24".parse().unwrap();
        let mut pool = Pool::new(net);
        pool.insert(to_u128(ip("10.0.0.3")), owner(1).allocation());
        pool.release(to_u128(ip("10.0.0.3")), Some(1234));
        let spec = pool.to_spec();
        assert!(spec.allocations.is_empty());
        assert_eq!(spec.cooldowns, [("3".to_string(), 1234)].into());
        // Upstream's spec is untouched: the cooldowns are not serialised with it.
        assert_eq!(
            serde_json::to_value(&spec).unwrap(),
            serde_json::json!({"range": "10.0.0.0/24", "allocations": {}})
        );
        let (decoded, _) = Pool::from_spec(&spec, net).unwrap();
        assert_eq!(decoded, pool);
        // A cooldown of an address someone holds again (an upstream writer took it) is dropped.
        let mut taken = spec.clone();
        taken.allocations.insert("3".into(), owner(2).allocation());
        let (decoded, _) = Pool::from_spec(&taken, net).unwrap();
        assert!(decoded.cooling().is_empty());
    }

    /// The naive model: walk every candidate in order.
    fn naive_lowest(r: &IpRange, pool: &Pool, gw: Option<IpAddr>, blocked: &IntervalSet) -> Option<u128> {
        (r.first()..=r.last()).find(|a| {
            pool.get(*a).is_none()
                && !r.excluded().contains(*a)
                && !blocked.contains(*a)
                && gw.map(to_u128) != Some(*a)
                && !(r.family() == Family::V4 && a & 0xff == 0)
        })
    }

    proptest! {
        /// With cooling addresses: the lowest free non-cooling candidate, else the otherwise free
        /// cooling candidate whose cooldown ends first; lanes count non-cooling candidates only.
        #[test]
        fn cooldowns_match_a_linear_scan(
            taken in proptest::collection::vec(0u128..64, 0..64),
            cooling in proptest::collection::vec((0u128..64, 0u64..8), 0..16),
            excludes in proptest::collection::vec(0u128..64, 0..4),
            skip in 0u64..80,
        ) {
            let base = to_u128(ip("10.30.0.0"));
            let net: IpNet = "10.30.0.0/26".parse().unwrap();
            let excludes = excludes.iter().map(|o| IpNet::new(from_u128(Family::V4, base + o), 32).unwrap()).collect();
            let r = IpRange::new(net, None, None, excludes).unwrap();
            let mut pool = Pool::new(net);
            for t in &taken {
                pool.insert(base + t, owner(0).allocation());
            }
            for (c, until) in &cooling {
                if pool.get(base + c).is_none() {
                    pool.cool(base + c, *until);
                }
            }
            let none = IntervalSet::new();
            let is_candidate = |a: u128| pool.get(a).is_none() && !r.excluded().contains(a) && a & 0xff != 0;
            let plain: Vec<u128> = (r.first()..=r.last()).filter(|a| is_candidate(*a) && !pool.cooling().contains(*a)).collect();
            let mut cooled: Vec<(u64, u128)> = cooling.iter()
                .map(|(c, _)| base + c)
                .filter(|a| pool.cooling().contains(*a) && *a >= r.first() && *a <= r.last() && is_candidate(*a))
                .map(|a| (pool.to_spec().cooldowns[&(a - base).to_string()], a))
                .collect();
            cooled.sort_unstable();
            let expected = plain.first().copied().or(cooled.first().map(|(_, a)| *a));
            prop_assert_eq!(lowest_free(&r, &pool, None, &none), expected);
            let lane = if plain.is_empty() { expected } else { Some(plain[(skip % plain.len() as u64) as usize]) };
            prop_assert_eq!(lane_start(&r, &pool, None, &none, Lane { skip }), lane);
        }

        #[test]
        fn matches_a_linear_scan(
            v6 in any::<bool>(),
            prefix in 22u8..30,
            start in proptest::option::of(0u128..1024),
            excludes in proptest::collection::vec((0u128..1024, 28u8..33), 0..4),
            taken in proptest::collection::vec(0u128..1024, 0..300),
            blocked in proptest::collection::vec(0u128..1024, 0..5),
            gw in proptest::option::of(0u128..1024),
            skip in 0u64..400,
        ) {
            let (base, bits, prefix) = if v6 {
                (to_u128(ip("2001:db8::")), 128u8, prefix + 96)
            } else {
                (to_u128(ip("10.20.0.0")), 32u8, prefix)
            };
            let family = if v6 { Family::V6 } else { Family::V4 };
            let size = 1u128 << (bits - prefix);
            let net = IpNet::new(from_u128(family, base), prefix).unwrap();
            let excludes: Vec<IpNet> = excludes.iter()
                .map(|(o, p)| IpNet::new(from_u128(family, base + o % size), if v6 { p + 96 } else { *p }).unwrap())
                .collect();
            let r = IpRange::new(net, start.map(|s| from_u128(family, base + 1 + s % (size - 2))), None, excludes).unwrap();
            let mut pool = Pool::new(net);
            for t in &taken {
                pool.insert(base + t % size, owner(0).allocation());
            }
            let blocked: IntervalSet = blocked.iter().map(|b| base + b % size).collect();
            let gw = gw.map(|g| from_u128(family, base + g % size));
            let fast = lowest_free(&r, &pool, gw, &blocked);
            prop_assert_eq!(fast, naive_lowest(&r, &pool, gw, &blocked));
            // A lane starts at the `skip % n`-th of the n free candidates of the naive walk, the lowest
            // one with no skip.
            let started = lane_start(&r, &pool, gw, &blocked, Lane { skip });
            let naive_free: Vec<u128> = (r.first()..=r.last())
                .filter(|a| {
                    pool.get(*a).is_none() && !r.excluded().contains(*a) && !blocked.contains(*a)
                        && gw.map(to_u128) != Some(*a) && !(r.family() == Family::V4 && a & 0xff == 0)
                        && *a >= pool.base()
                })
                .collect();
            prop_assert_eq!(started.is_some(), fast.is_some());
            if let Some(p) = started {
                prop_assert_eq!(p, naive_free[(skip % naive_free.len() as u64) as usize]);
            }
            if skip == 0 {
                prop_assert_eq!(started, fast);
            }
            if let Some(addr) = fast {
                // Inside the interval, never network/broadcast, never excluded, reserved or the gateway.
                prop_assert!(addr >= r.first() && addr <= r.last());
                prop_assert!(addr != base && addr != base + size - 1);
                prop_assert!(pool.get(addr).is_none() && !r.excluded().contains(addr) && !blocked.contains(addr));
                prop_assert!(gw.map(to_u128) != Some(addr));
                // ADD then DEL restores the state.
                let before = pool.clone();
                let o = owner(1);
                apply(&mut pool, Assignment::New { addr, replaces: None }, &o);
                let released = pool.container_addresses(&o.container_id, &o.ifname)[0];
                pool.remove(released);
                prop_assert_eq!(pool, before);
            }
        }
    }
}
