//! Node slices (upstream's "fast IPAM"): a network's range cut into equal CIDR blocks, each node
//! allocating only inside the block assigned to it, so that a node's allocations need no coordination
//! with other nodes.
//!
//! Unlike upstream, slicing works for IPv6 as well as IPv4, honours `range_start`, `range_end` and
//! `exclude` (a slice without any candidate left is never assigned, and inside a slice the range's
//! bounds and exclusions still apply), and never lists every slice of a huge range: slices are found on
//! demand, lowest first.
//!
//! [`assign_slices`] is the controller's decision of which node holds which slice, kept pure so that its
//! safety rules (nobody takes a slice whose previous node's pool still holds addresses) are tested here.

use std::collections::BTreeSet;
use std::net::IpAddr;

use ipnet::IpNet;
use thiserror::Error;

use crate::addr::{Family, from_u128, net_bounds, to_u128};
use crate::allocate::lowest_free;
use crate::interval::IntervalSet;
use crate::pool::Pool;
use crate::range::{IpRange, pool_node};

/// Why a slice size cannot be used; the message names the key and the value.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SliceError {
    /// Not a prefix length.
    #[error("invalid node_slice_size {0:?}: expected a prefix length such as \"/28\"")]
    NotAPrefix(String),
    /// Larger slices than the range itself.
    #[error("invalid node_slice_size \"/{size}\": slices cannot be larger than the range {range}")]
    LargerThanRange {
        /// The slice prefix length.
        size: u8,
        /// The range.
        range: IpNet,
    },
    /// Slices too small to hold an address besides their own network and broadcast addresses.
    #[error("invalid node_slice_size \"/{size}\": a slice needs at least two host bits")]
    TooSmall {
        /// The slice prefix length.
        size: u8,
    },
}

/// Why a node cannot allocate from what a NodeSlicePool says about it.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AssignedSliceError {
    /// The NodeSlicePool was cut from another range or into slices of another size than configured.
    #[error(
        "it slices range {range:?} into slices of {size:?}, but the configuration slices {configured} into /{configured_size}"
    )]
    Mismatch {
        /// Its `spec.range`.
        range: String,
        /// Its `spec.sliceSize`.
        size: String,
        /// The configured (first) range.
        configured: IpNet,
        /// `node_slice_size`.
        configured_size: u8,
    },
    /// No slice is assigned to the node (yet).
    #[error("it assigns no slice to the node (yet)")]
    Unassigned,
    /// The slice assigned to the node is not one of the slicing's slices.
    #[error("the node's sliceRange {slice:?} is not a /{size} slice of {range}")]
    NotASlice {
        /// The `sliceRange` as stored.
        slice: String,
        /// `node_slice_size`.
        size: u8,
        /// The sliced range.
        range: IpNet,
    },
    /// The slice holds no candidate: it lies outside `range_start`..`range_end` or is excluded.
    #[error("the node's slice {slice} holds no address of range {range}")]
    Unusable {
        /// The slice.
        slice: IpNet,
        /// The range's candidates, described.
        range: String,
    },
}

/// Parses `node_slice_size` as upstream writes it (`"/28"`, or `"28"`).
pub fn parse_slice_size(text: &str) -> Result<u8, SliceError> {
    let digits = text.trim().strip_prefix('/').unwrap_or(text.trim());
    digits
        .parse::<u8>()
        .ok()
        .filter(|_| !digits.is_empty())
        .ok_or_else(|| SliceError::NotAPrefix(text.into()))
}

/// A range cut into slices of one prefix length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slicing {
    range: IpRange,
    size: u8,
}

impl Slicing {
    /// Slices of prefix length `size` over `range`.
    pub fn new(range: IpRange, size: u8) -> Result<Self, SliceError> {
        let network = range.network();
        if size < network.prefix_len() {
            return Err(SliceError::LargerThanRange { size, range: network });
        }
        if u32::from(range.family().bits()) < u32::from(size) + 2 {
            return Err(SliceError::TooSmall { size });
        }
        Ok(Slicing { range, size })
    }

    /// The prefix length of every slice.
    pub fn size(&self) -> u8 {
        self.size
    }

    /// The sliced range.
    pub fn range(&self) -> &IpRange {
        &self.range
    }

    fn slice_bits(&self) -> u32 {
        u32::from(self.range.family().bits() - self.size)
    }

    /// Checks what a NodeSlicePool says against this slicing: it must have been cut from this range
    /// (`range`, its `spec.range`) into slices of this size (`size`, its `spec.sliceSize`), and the
    /// node's `sliceRange` (`assigned`; `None` when the node has none) must be one of the slices and
    /// hold at least one candidate. The slice and the range a node allocates from inside it.
    pub fn check_assigned(
        &self,
        range: &str,
        size: &str,
        assigned: Option<&str>,
    ) -> Result<(IpNet, IpRange), AssignedSliceError> {
        let configured = self.range.network();
        let same_range = range.trim().parse::<IpNet>().is_ok_and(|r| r.trunc() == configured);
        if !same_range || parse_slice_size(size) != Ok(self.size) {
            return Err(AssignedSliceError::Mismatch {
                range: range.into(),
                size: size.into(),
                configured,
                configured_size: self.size,
            });
        }
        let assigned = assigned.ok_or(AssignedSliceError::Unassigned)?;
        let not_a_slice =
            || AssignedSliceError::NotASlice { slice: assigned.into(), size: self.size, range: configured };
        let slice = assigned.trim().parse::<IpNet>().map_err(|_| not_a_slice())?;
        if !self.is_slice(&slice) {
            return Err(not_a_slice());
        }
        match self.slice_range(&slice) {
            Some(inside) => Ok((slice, inside)),
            None => Err(AssignedSliceError::Unusable { slice, range: self.range.describe() }),
        }
    }

    /// The slice containing `addr`.
    fn slice_of(&self, addr: u128) -> IpNet {
        let start = (addr >> self.slice_bits()) << self.slice_bits();
        IpNet::new(from_u128(self.range.family(), start), self.size).unwrap_or(self.range.network())
    }

    /// Whether `slice` is one of this slicing's slices.
    pub fn is_slice(&self, slice: &IpNet) -> bool {
        is_slice_of(&self.range.network(), self.size, slice)
    }

    /// The range a node allocates from inside `slice`: the slice's usable addresses (its own network and
    /// broadcast addresses excluded, as upstream), within the range's `range_start`..`range_end`, minus
    /// the range's excluded blocks. `None` when nothing is left.
    pub fn slice_range(&self, slice: &IpNet) -> Option<IpRange> {
        if !self.is_slice(slice) {
            return None;
        }
        let (slice_first, slice_last) = net_bounds(slice);
        let first = (slice_first + 1).max(self.range.first());
        let last = (slice_last - 1).min(self.range.last());
        if first > last {
            return None;
        }
        let family = self.range.family();
        let excludes: Vec<IpNet> =
            self.range.exclude().iter().copied().filter(|e| overlaps(e, slice)).collect();
        let range =
            IpRange::new(*slice, Some(from_u128(family, first)), Some(from_u128(family, last)), excludes)
                .ok()?;
        let empty = Pool::new(*slice);
        lowest_free(&range, &empty, None, &IntervalSet::new()).map(|_| range)
    }

    /// Slices with at least one candidate, lowest first, skipping any in `skip`.
    pub fn usable_slices<'a>(
        &'a self,
        skip: impl Fn(&IpNet) -> bool + 'a,
    ) -> impl Iterator<Item = IpNet> + 'a {
        let step = 1u128 << self.slice_bits();
        let mut next = Some(self.slice_of(self.range.first()));
        std::iter::from_fn(move || {
            loop {
                let slice = next?;
                let (start, end) = net_bounds(&slice);
                if start > self.range.last() {
                    return None;
                }
                // A slice inside one excluded block: jump past the block instead of trying each slice.
                let after = match self.range.excluded().run_containing(start) {
                    Some(run) if *run.end() >= end => run.end().checked_add(1).map(|a| self.slice_of(a)),
                    _ => start.checked_add(step).map(|a| self.slice_of(a)),
                };
                next = after.filter(|s| to_u128(s.addr()) > start);
                if !skip(&slice) && self.slice_range(&slice).is_some() {
                    return Some(slice);
                }
            }
        })
    }

    /// The slice an address belongs to, if the address lies in the range.
    pub fn slice_containing(&self, ip: IpAddr) -> Option<IpNet> {
        (Family::of(ip) == self.range.family() && self.range.contains(ip)).then(|| self.slice_of(to_u128(ip)))
    }
}

/// Whether `slice` is one of the slices of prefix length `size` of `network`.
pub fn is_slice_of(network: &IpNet, size: u8, slice: &IpNet) -> bool {
    slice.prefix_len() == size
        && slice.trunc() == *slice
        && Family::of(slice.addr()) == Family::of(network.addr())
        && network.contains(slice)
}

/// The (slice, node) pairs the per-node IPPools themselves tell of, for when a NodeSlicePool's status
/// cannot be trusted to name them all (it was deleted, lost, or its NAD deleted and recreated).
///
/// `pools` are the (name, `spec.range`) of the IPPools that hold allocations. A pool counts when its
/// `spec.range` is a slice of one of `layouts` (a network and a slice size: the configured slicing, the
/// one the NodeSlicePool holds) and its name is `[network_name-]<node>-<normalised slice>`
/// ([`crate::range::pool_name`]); the node is what lies between. Sorted, without duplicates; they are
/// meant to join `previous` in [`assign_slices`], and are busy.
pub fn holders_from_pools<'a>(
    network_name: &str,
    layouts: &[(IpNet, u8)],
    pools: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Vec<(IpNet, String)> {
    let mut found = BTreeSet::new();
    for (name, range) in pools {
        let Ok(slice) = range.trim().parse::<IpNet>() else { continue };
        if !layouts.iter().any(|(network, size)| is_slice_of(&network.trunc(), *size, &slice)) {
            continue;
        }
        if let Some(node) = pool_node(network_name, name, &slice) {
            found.insert((slice, node.to_string()));
        }
    }
    found.into_iter().collect()
}

/// The most slices a NodeSlicePool lists: the first this many usable slices. A NodeSlicePool is one
/// object, limited in size by etcd (1.5 MiB), while an IPv6 range may hold 2^56 slices; 5000 is the
/// largest cluster Kubernetes supports, so every node can still get a slice.
pub const MAX_LISTED_SLICES: usize = 5000;

/// The slices of a NodeSlicePool and who holds them, as the controller writes them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceAssignment {
    /// One entry per listed slice, ascending: the slice and the node holding it (`None`: free). A node
    /// that no longer exists still holds its slice while its pool of the slice has allocations.
    pub slices: Vec<(IpNet, Option<String>)>,
    /// Existing nodes that got no slice (sorted): there are not enough usable slices.
    pub unassigned: Vec<String>,
}

impl SliceAssignment {
    /// The slice held by `node`.
    pub fn slice_of(&self, node: &str) -> Option<IpNet> {
        self.slices.iter().find(|(_, n)| n.as_deref() == Some(node)).map(|(slice, _)| *slice)
    }
}

/// Assigns the slices of `slicing` (its first [`MAX_LISTED_SLICES`] usable ones) to `nodes`, starting
/// from `previous`, the (slice, node) pairs a NodeSlicePool holds now (possibly cut from another range
/// or into another size). `busy(node, slice)` says whether the node's pool of a previous slice still
/// holds allocations.
///
/// * A node keeps the slice it has; nodes joining never move others.
/// * Joining nodes, in name order, get the lowest free slice; those left over are
///   [`SliceAssignment::unassigned`].
/// * A departed node's slice is freed only once its pool of the slice is empty: the plugin of a node
///   that took it over would allocate in that node's own pool, blind to the addresses still in use.
/// * After re-slicing, a new slice overlapping a busy previous slice can only go to that previous
///   slice's node, for the same reason; a node gets a new slice overlapping its previous one if it can.
pub fn assign_slices(
    slicing: &Slicing,
    previous: &[(IpNet, String)],
    nodes: &BTreeSet<String>,
    busy: impl Fn(&str, &IpNet) -> bool,
) -> SliceAssignment {
    let listed: Vec<IpNet> = slicing.usable_slices(|_| false).take(MAX_LISTED_SLICES).collect();
    let previous: Vec<(IpNet, &str)> =
        previous.iter().filter(|(_, node)| !node.is_empty()).map(|(s, n)| (*s, n.as_str())).collect();
    let mut table = Table { holder: vec![None; listed.len()], reserve: vec![Reserve::Anyone; listed.len()] };
    for (old, node) in previous.iter().filter(|(old, node)| busy(node, old)) {
        for (i, slice) in listed.iter().enumerate() {
            if overlaps(slice, old) {
                table.reserve[i] = table.reserve[i].and(node);
            }
        }
    }
    let mut holding: BTreeSet<&str> = BTreeSet::new();

    // A live node keeps its slice; a departed one too while its pool of the slice is busy (the slice is
    // then reserved to it).
    for (old, node) in &previous {
        let Ok(i) = listed.binary_search(old) else { continue };
        let keeps = nodes.contains(*node) || table.reserve[i] == Reserve::Only((*node).to_string());
        if keeps && !holding.contains(node) && table.take(i, node) {
            holding.insert(node);
        }
    }
    // After re-slicing: a live node takes a new slice containing its previous one, else one overlapping
    // it, if one is free.
    for (old, node) in &previous {
        if !nodes.contains(*node) || holding.contains(node) {
            continue;
        }
        let containing = (0..listed.len()).find(|&i| listed[i].contains(old) && table.may_take(i, node));
        let overlapping =
            || (0..listed.len()).find(|&i| overlaps(&listed[i], old) && table.may_take(i, node));
        if let Some(i) = containing.or_else(overlapping) {
            table.take(i, node);
            holding.insert(node);
        }
    }
    // Everyone else, in name order, takes the lowest free slice.
    let mut unassigned = Vec::new();
    for node in nodes.iter().filter(|n| !holding.contains(n.as_str())) {
        match (0..listed.len()).find(|&i| table.may_take(i, node)) {
            Some(i) => {
                table.take(i, node);
            }
            None => unassigned.push(node.clone()),
        }
    }
    SliceAssignment { slices: listed.into_iter().zip(table.holder).collect(), unassigned }
}

/// The slices being assigned, by position: their holders and who may take them.
struct Table {
    holder: Vec<Option<String>>,
    reserve: Vec<Reserve>,
}

impl Table {
    fn may_take(&self, i: usize, node: &str) -> bool {
        self.holder[i].is_none() && self.reserve[i].allows(node)
    }

    /// Gives slice `i` to `node` if it may take it.
    fn take(&mut self, i: usize, node: &str) -> bool {
        let may = self.may_take(i, node);
        if may {
            self.holder[i] = Some(node.to_string());
        }
        may
    }
}

/// Who may take a slice.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Reserve {
    Anyone,
    Only(String),
    Nobody,
}

impl Reserve {
    /// Also reserved to `node`.
    fn and(&self, node: &str) -> Reserve {
        match self {
            Reserve::Anyone => Reserve::Only(node.to_string()),
            Reserve::Only(n) if n == node => self.clone(),
            _ => Reserve::Nobody,
        }
    }

    fn allows(&self, node: &str) -> bool {
        match self {
            Reserve::Anyone => true,
            Reserve::Only(n) => n == node,
            Reserve::Nobody => false,
        }
    }
}

fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(b) || b.contains(a)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn range(cidr: &str, start: Option<&str>, end: Option<&str>, exclude: &[&str]) -> IpRange {
        IpRange::new(
            cidr.parse().unwrap(),
            start.map(|s| s.parse().unwrap()),
            end.map(|s| s.parse().unwrap()),
            exclude.iter().map(|e| e.parse().unwrap()).collect(),
        )
        .unwrap()
    }

    fn slices(slicing: &Slicing, n: usize) -> Vec<String> {
        slicing.usable_slices(|_| false).take(n).map(|s| s.to_string()).collect()
    }

    #[test]
    fn sizes_parse_as_upstream_writes_them() {
        assert_eq!(parse_slice_size("/28"), Ok(28));
        assert_eq!(parse_slice_size("28"), Ok(28));
        assert_eq!(parse_slice_size("/x"), Err(SliceError::NotAPrefix("/x".into())));
        assert_eq!(parse_slice_size("/"), Err(SliceError::NotAPrefix("/".into())));
    }

    #[test]
    fn bad_sizes_are_refused() {
        let r = range("10.0.0.0/16", None, None, &[]);
        assert!(matches!(Slicing::new(r.clone(), 15), Err(SliceError::LargerThanRange { size: 15, .. })));
        assert_eq!(Slicing::new(r, 31), Err(SliceError::TooSmall { size: 31 }));
    }

    #[test]
    fn ipv4_slices_in_order() {
        let s = Slicing::new(range("10.0.0.0/24", None, None, &[]), 26).unwrap();
        assert_eq!(slices(&s, 10), ["10.0.0.0/26", "10.0.0.64/26", "10.0.0.128/26", "10.0.0.192/26"]);
        let slice_range = s.slice_range(&"10.0.0.64/26".parse().unwrap()).unwrap();
        assert_eq!(slice_range.describe(), "10.0.0.65 - 10.0.0.126 in 10.0.0.64/26 excluding []");
    }

    #[test]
    fn ipv6_slices_of_a_slash_64() {
        let s = Slicing::new(range("2001:db8::/64", None, None, &[]), 80).unwrap();
        assert_eq!(slices(&s, 3), ["2001:db8::/80", "2001:db8:0:0:1::/80", "2001:db8:0:0:2::/80"]);
    }

    #[test]
    fn range_start_end_and_exclude_are_honoured() {
        let s =
            Slicing::new(range("10.0.0.0/24", Some("10.0.0.70"), Some("10.0.0.200"), &["10.0.0.128/26"]), 26)
                .unwrap();
        // The first slice lies below range_start, the third is wholly excluded.
        assert_eq!(slices(&s, 10), ["10.0.0.64/26", "10.0.0.192/26"]);
        let second = s.slice_range(&"10.0.0.64/26".parse().unwrap()).unwrap();
        assert_eq!(second.describe(), "10.0.0.70 - 10.0.0.126 in 10.0.0.64/26 excluding []");
        let last = s.slice_range(&"10.0.0.192/26".parse().unwrap()).unwrap();
        assert_eq!(last.describe(), "10.0.0.193 - 10.0.0.200 in 10.0.0.192/26 excluding []");
        assert_eq!(s.slice_range(&"10.0.0.128/26".parse().unwrap()), None);
        assert_eq!(s.slice_range(&"10.0.1.0/26".parse().unwrap()), None, "outside the range");
    }

    #[test]
    fn a_huge_excluded_block_is_jumped_over() {
        let s = Slicing::new(range("2001:db8::/48", None, None, &["2001:db8::/49"]), 112).unwrap();
        assert_eq!(slices(&s, 1), ["2001:db8:0:8000::/112"]);
    }

    #[test]
    fn taken_slices_are_skipped() {
        let s = Slicing::new(range("10.0.0.0/24", None, None, &[]), 26).unwrap();
        let taken: IpNet = "10.0.0.0/26".parse().unwrap();
        let free: Vec<IpNet> = s.usable_slices(|slice| *slice == taken).take(1).collect();
        assert_eq!(free, ["10.0.0.64/26".parse::<IpNet>().unwrap()]);
    }

    #[test]
    fn an_assigned_slice_is_checked_against_the_configuration() {
        let s = Slicing::new(range("10.0.0.0/24", Some("10.0.0.70"), None, &["10.0.0.128/26"]), 26).unwrap();
        let (slice, inside) = s.check_assigned("10.0.0.0/24", "/26", Some("10.0.0.64/26")).unwrap();
        assert_eq!(slice.to_string(), "10.0.0.64/26");
        assert_eq!(inside.describe(), "10.0.0.70 - 10.0.0.126 in 10.0.0.64/26 excluding []");
        // The size may be written without its slash, as upstream's controller accepts it.
        assert!(s.check_assigned("10.0.0.0/24", "26", Some("10.0.0.64/26")).is_ok());
        for (range, size) in
            [("10.0.0.0/23", "/26"), ("10.0.0.0/24", "/27"), ("x", "/26"), ("10.0.0.0/24", "")]
        {
            assert!(
                matches!(
                    s.check_assigned(range, size, Some("10.0.0.64/26")),
                    Err(AssignedSliceError::Mismatch { .. })
                ),
                "{range} {size}"
            );
        }
        assert_eq!(s.check_assigned("10.0.0.0/24", "/26", None), Err(AssignedSliceError::Unassigned));
        for bad in ["10.0.0.64/27", "10.0.0.65/26", "10.0.1.0/26", "fd00::/122", "nonsense", ""] {
            assert_eq!(
                s.check_assigned("10.0.0.0/24", "/26", Some(bad)),
                Err(AssignedSliceError::NotASlice {
                    slice: bad.into(),
                    size: 26,
                    range: "10.0.0.0/24".parse().unwrap()
                }),
            );
        }
        // Below range_start, and wholly excluded: upstream's controller assigns them, we cannot use them.
        for unusable in ["10.0.0.0/26", "10.0.0.128/26"] {
            assert!(matches!(
                s.check_assigned("10.0.0.0/24", "/26", Some(unusable)),
                Err(AssignedSliceError::Unusable { .. })
            ));
        }
    }

    fn net(text: &str) -> IpNet {
        text.parse().unwrap()
    }

    fn node_set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    fn held(assignment: &SliceAssignment) -> Vec<(String, String)> {
        let holders = assignment.slices.iter().filter_map(|(s, n)| n.clone().map(|n| (s.to_string(), n)));
        holders.collect()
    }

    fn pairs(list: &[(&str, &str)]) -> Vec<(IpNet, String)> {
        list.iter().map(|(s, n)| (net(s), n.to_string())).collect()
    }

    fn quarter() -> Slicing {
        Slicing::new(range("10.0.0.0/24", None, None, &[]), 26).unwrap()
    }

    fn pair(slice: &str, node: &str) -> (String, String) {
        (slice.to_string(), node.to_string())
    }

    #[test]
    fn joining_nodes_take_the_lowest_free_slices_in_name_order() {
        let a = assign_slices(&quarter(), &[], &node_set(&["n3", "n1", "n2"]), |_, _| false);
        assert_eq!(
            held(&a),
            [pair("10.0.0.0/26", "n1"), pair("10.0.0.64/26", "n2"), pair("10.0.0.128/26", "n3")]
        );
        assert_eq!(a.slices.len(), 4);
        assert_eq!(a.slices[3], (net("10.0.0.192/26"), None));
        assert!(a.unassigned.is_empty());
        assert_eq!(a.slice_of("n2"), Some(net("10.0.0.64/26")));

        let full = assign_slices(&quarter(), &[], &node_set(&["a", "b", "c", "d", "e", "f"]), |_, _| false);
        assert_eq!(full.unassigned, ["e", "f"]);
    }

    #[test]
    fn nodes_keep_their_slices_when_others_join() {
        let previous = pairs(&[("10.0.0.128/26", "m")]);
        let a = assign_slices(&quarter(), &previous, &node_set(&["a", "m", "z"]), |_, _| false);
        assert_eq!(
            held(&a),
            [pair("10.0.0.0/26", "a"), pair("10.0.0.64/26", "z"), pair("10.0.0.128/26", "m")]
        );
    }

    #[test]
    fn a_departed_nodes_slice_is_freed_only_once_its_pool_is_empty() {
        let previous =
            pairs(&[("10.0.0.0/26", "gone-busy"), ("10.0.0.64/26", "gone-idle"), ("10.0.0.128/26", "b")]);
        let busy = |node: &str, slice: &IpNet| node == "gone-busy" && *slice == net("10.0.0.0/26");
        let a = assign_slices(&quarter(), &previous, &node_set(&["b", "c", "d"]), busy);
        assert_eq!(
            held(&a),
            [
                pair("10.0.0.0/26", "gone-busy"),
                pair("10.0.0.64/26", "c"),
                pair("10.0.0.128/26", "b"),
                pair("10.0.0.192/26", "d"),
            ]
        );
        // Once emptied, the slice is free for the next node.
        let previous: Vec<(IpNet, String)> =
            a.slices.iter().filter_map(|(s, n)| n.clone().map(|n| (*s, n))).collect();
        let b = assign_slices(&quarter(), &previous, &node_set(&["b", "c", "d", "e"]), |_, _| false);
        assert_eq!(b.slice_of("e"), Some(net("10.0.0.0/26")));
        assert_eq!(b.slice_of("gone-busy"), None);
    }

    #[test]
    fn reslicing_keeps_busy_addresses_with_their_node() {
        // /26 → /27: "a" (busy) keeps the lower half of its old slice and the upper half is reserved to
        // it; "b" (idle) moves into a /27 of its old slice; "c" gets the lowest slice nobody reserved
        // (the other half of b's idle slice), never the busy slice of the departed node.
        let smaller = Slicing::new(range("10.0.0.0/24", None, None, &[]), 27).unwrap();
        let previous = pairs(&[("10.0.0.0/26", "a"), ("10.0.0.64/26", "b"), ("10.0.0.128/26", "gone")]);
        let busy = |node: &str, _: &IpNet| node == "a" || node == "gone";
        let r = assign_slices(&smaller, &previous, &node_set(&["a", "b", "c"]), busy);
        assert_eq!(
            held(&r),
            [pair("10.0.0.0/27", "a"), pair("10.0.0.64/27", "b"), pair("10.0.0.96/27", "c")]
        );

        // /27 → /26: two busy /27s of different nodes in one /26: nobody gets it.
        let previous = pairs(&[("10.0.0.0/27", "a"), ("10.0.0.32/27", "b"), ("10.0.0.64/27", "c")]);
        let r = assign_slices(&quarter(), &previous, &node_set(&["a", "b", "c"]), |n, _| n != "c");
        assert_eq!(
            held(&r),
            [pair("10.0.0.64/26", "c"), pair("10.0.0.128/26", "a"), pair("10.0.0.192/26", "b")]
        );

        // A moved range: the old slices do not overlap the new ones at all.
        let moved = Slicing::new(range("10.0.1.0/24", None, None, &[]), 26).unwrap();
        let r = assign_slices(&moved, &pairs(&[("10.0.0.0/26", "b")]), &node_set(&["a", "b"]), |_, _| true);
        assert_eq!(held(&r), [pair("10.0.1.0/26", "a"), pair("10.0.1.64/26", "b")]);
    }

    #[test]
    fn per_node_pools_tell_who_holds_which_slice() {
        let new = (net("10.0.0.0/24"), 27);
        let old = (net("10.0.0.0/24"), 26);
        let pools = [
            ("net-x-10.0.0.64-27", "10.0.0.64/27"),    // the configured layout
            ("net-y-10.0.0.128-26", " 10.0.0.128/26"), // the NodeSlicePool's (old) layout
            ("net-x-10.0.0.64-27", "10.0.0.64/27"),    // listed twice: once
            ("net-10.0.0.0-24", "10.0.0.0/24"),        // the whole range's pool: no node
            ("net-z-10.0.0.0-28", "10.0.0.0/28"),      // a slice of neither layout
            ("net-z-10.0.1.0-27", "10.0.1.0/27"),      // outside the range
            ("other-z-10.0.0.0-27", "10.0.0.0/27"),    // another network's
            ("net-z-10.0.0.32-27", "10.0.0.0/27"),     // named for another slice than its range
            ("net-z-10.0.0.1-27", "10.0.0.1/27"),      // not a slice's own address
            ("net-z-x", "nonsense"),
        ];
        assert_eq!(
            holders_from_pools("net", &[new, old], pools),
            pairs(&[("10.0.0.64/27", "x"), ("10.0.0.128/26", "y")])
        );
        assert_eq!(holders_from_pools("net", &[new], pools), pairs(&[("10.0.0.64/27", "x")]));
        let v6 = [("w-2001-db8--100-120", "2001:db8::100/120")];
        assert_eq!(
            holders_from_pools("", &[(net("2001:db8::/112"), 120)], v6),
            pairs(&[("2001:db8::100/120", "w")])
        );
    }

    #[test]
    fn recovered_holders_keep_their_busy_slices() {
        // No NodeSlicePool status at all: x (live) keeps the slice its busy pool is in, though name order
        // would give it to "a"; gone (departed) keeps its busy one; nobody else gets either.
        let recovered = pairs(&[("10.0.0.0/26", "x"), ("10.0.0.128/26", "gone")]);
        let r = assign_slices(&quarter(), &recovered, &node_set(&["a", "b", "x"]), |_, _| true);
        assert_eq!(
            held(&r),
            [
                pair("10.0.0.0/26", "x"),
                pair("10.0.0.64/26", "a"),
                pair("10.0.0.128/26", "gone"),
                pair("10.0.0.192/26", "b")
            ]
        );
        // A busy pool of the old /26 layout: x takes the /27 holding its old slice's start and the other
        // half is reserved to it; a departed node's old /26 is kept from everyone.
        let smaller = Slicing::new(range("10.0.0.0/24", None, None, &[]), 27).unwrap();
        let r = assign_slices(&smaller, &recovered, &node_set(&["a", "b", "x"]), |_, _| true);
        assert_eq!(
            held(&r),
            [pair("10.0.0.0/27", "x"), pair("10.0.0.64/27", "a"), pair("10.0.0.96/27", "b")]
        );
    }

    #[test]
    fn only_usable_slices_are_offered() {
        let s = Slicing::new(range("10.0.0.0/24", Some("10.0.0.70"), None, &["10.0.0.128/26"]), 26).unwrap();
        let a = assign_slices(&s, &[], &node_set(&["a", "b", "c"]), |_, _| false);
        assert_eq!(held(&a), [pair("10.0.0.64/26", "a"), pair("10.0.0.192/26", "b")]);
        assert_eq!(a.unassigned, ["c"]);
        assert_eq!(a.slices.len(), 2);
    }

    #[test]
    fn ipv6_slices_are_assigned() {
        let s = Slicing::new(range("2001:db8::/112", None, None, &[]), 120).unwrap();
        let a = assign_slices(&s, &[], &node_set(&["a", "b"]), |_, _| false);
        assert_eq!(held(&a), [pair("2001:db8::/120", "a"), pair("2001:db8::100/120", "b")]);
        assert_eq!(a.slices.len(), 256);
        let huge = Slicing::new(range("2001:db8::/64", None, None, &[]), 120).unwrap();
        assert_eq!(
            assign_slices(&huge, &[], &node_set(&["a"]), |_, _| false).slices.len(),
            MAX_LISTED_SLICES
        );
    }

    /// A valid previous assignment: distinct slices of one /24 cut into `/size`, distinct nodes.
    fn previous_strategy() -> impl Strategy<Value = (u8, Vec<(IpNet, String)>)> {
        (25u8..29)
            .prop_flat_map(|size| {
                let count = 1usize << (size - 24);
                (Just(size), proptest::collection::vec(proptest::option::of(0usize..8), count))
            })
            .prop_map(|(size, holders)| {
                let mut seen = BTreeSet::new();
                let slices = Slicing::new(range("10.0.0.0/24", None, None, &[]), size).unwrap();
                let listed: Vec<IpNet> = slices.usable_slices(|_| false).collect();
                let previous = listed
                    .into_iter()
                    .zip(holders)
                    .filter_map(|(slice, n)| n.filter(|n| seen.insert(*n)).map(|n| (slice, format!("n{n}"))))
                    .collect();
                (size, previous)
            })
    }

    proptest! {
        /// Nobody holds two slices, only live nodes and busy departed ones hold slices, busy previous
        /// slices are only ever overlapped by their own node's, an unassigned node could not take any
        /// free slice, and an unchanged layout keeps every live node where it was.
        #[test]
        fn assignments_are_safe_and_stable(
            (old_size, previous) in previous_strategy(),
            new_size in 25u8..29,
            live in proptest::collection::btree_set(0usize..10, 0..10),
            busy_nodes in proptest::collection::btree_set(0usize..8, 0..8),
            start in proptest::option::of(0u8..128),
        ) {
            let nodes: BTreeSet<String> = live.iter().map(|n| format!("n{n}")).collect();
            let busy_set: BTreeSet<String> = busy_nodes.iter().map(|n| format!("n{n}")).collect();
            let busy = |node: &str, _: &IpNet| busy_set.contains(node);
            let start = start.map(|o| format!("10.0.0.{o}"));
            let slicing = Slicing::new(range("10.0.0.0/24", start.as_deref(), None, &[]), new_size).unwrap();
            let r = assign_slices(&slicing, &previous, &nodes, busy);

            let holders: Vec<&str> = r.slices.iter().filter_map(|(_, n)| n.as_deref()).collect();
            let distinct: BTreeSet<&str> = holders.iter().copied().collect();
            prop_assert_eq!(distinct.len(), holders.len(), "a node holds two slices: {:?}", r);
            let usable: Vec<IpNet> = slicing.usable_slices(|_| false).collect();
            prop_assert_eq!(&r.slices.iter().map(|(s, _)| *s).collect::<Vec<_>>(), &usable);
            for (slice, holder) in &r.slices {
                let Some(holder) = holder else { continue };
                if !nodes.contains(holder) {
                    prop_assert!(busy_set.contains(holder), "{holder} left with an idle pool: {:?}", r);
                    prop_assert!(previous.contains(&(*slice, holder.clone())), "{holder} moved after leaving");
                }
            }
            for (old, node) in previous.iter().filter(|(_, n)| busy_set.contains(n)) {
                for (slice, holder) in r.slices.iter().filter(|(s, _)| overlaps(s, old)) {
                    prop_assert!(
                        holder.is_none() || holder.as_ref() == Some(node),
                        "{slice} overlaps {node}'s busy {old} but went to {holder:?}"
                    );
                }
            }
            for node in &r.unassigned {
                prop_assert!(nodes.contains(node) && !holders.contains(&node.as_str()));
                for (slice, _) in r.slices.iter().filter(|(_, h)| h.is_none()) {
                    let reserved_elsewhere = previous
                        .iter()
                        .any(|(old, n)| n != node && busy_set.contains(n) && overlaps(old, slice));
                    prop_assert!(reserved_elsewhere, "{node} got nothing though {slice} is free: {:?}", r);
                }
            }
            prop_assert_eq!(holders.iter().filter(|h| nodes.contains(**h)).count() + r.unassigned.len(), nodes.len());
            if old_size == new_size {
                for (old, node) in previous.iter().filter(|(old, n)| nodes.contains(n) && usable.contains(old)) {
                    prop_assert_eq!(r.slice_of(node), Some(*old), "{} moved", node);
                }
            }

            // Nodes joining move nobody.
            let kept: Vec<(IpNet, String)> = r.slices.iter().filter_map(|(s, n)| n.clone().map(|n| (*s, n))).collect();
            let mut more = nodes.clone();
            more.extend(["a-new", "z-new"].map(String::from));
            let again = assign_slices(&slicing, &kept, &more, busy);
            for (slice, node) in kept.iter().filter(|(_, n)| nodes.contains(n)) {
                prop_assert_eq!(again.slice_of(node), Some(*slice), "{} moved when nodes joined", node);
            }
        }
    }

    proptest! {
        /// Every address a slice's range offers is a candidate of the whole range, slices never overlap,
        /// and every candidate of the range lies in exactly one usable slice.
        #[test]
        fn slices_partition_the_candidates(
            start in 0u32..256, len in 0u32..256, size in 24u8..31,
            exclude in proptest::option::of((0u32..256, 26u8..33)),
        ) {
            let base = u32::from(std::net::Ipv4Addr::new(10, 9, 0, 0));
            let at = |o: u32| IpAddr::from(std::net::Ipv4Addr::from(base + o.min(255)));
            let excludes: Vec<IpNet> = exclude
                .map(|(o, p)| IpNet::new(at(o), p).unwrap().trunc())
                .into_iter()
                .collect();
            let Ok(r) = IpRange::new("10.9.0.0/24".parse().unwrap(), Some(at(start)), Some(at(start + len)), excludes)
            else { return Ok(()) };
            let s = Slicing::new(r.clone(), size).unwrap();
            let usable: Vec<IpNet> = s.usable_slices(|_| false).collect();
            for (i, a) in usable.iter().enumerate() {
                for b in &usable[i + 1..] {
                    prop_assert!(!overlaps(a, b));
                }
                let sr = s.slice_range(a).unwrap();
                for addr in sr.first()..=sr.last() {
                    if !sr.excluded().contains(addr) {
                        prop_assert!(addr >= r.first() && addr <= r.last() && !r.excluded().contains(addr));
                    }
                }
            }
            for addr in r.first()..=r.last() {
                if r.excluded().contains(addr) {
                    continue;
                }
                let (slice_first, slice_last) = net_bounds(&s.slice_of(addr));
                if addr == slice_first || addr == slice_last {
                    continue; // a slice's own network and broadcast addresses are not used, as upstream
                }
                prop_assert!(usable.contains(&s.slice_of(addr)), "{addr} has no usable slice");
            }
        }
    }
}
