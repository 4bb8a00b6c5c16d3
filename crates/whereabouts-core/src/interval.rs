//! A set of `u128` values stored as coalesced inclusive intervals.
//!
//! The allocator keeps the taken addresses of a pool here so that "the lowest free address at or after
//! X" costs a logarithmic lookup per blocking run instead of a walk over every taken address: a /64 with
//! 100,000 contiguous allocations is one interval.

use std::collections::BTreeMap;
use std::ops::RangeInclusive;

/// Coalesced inclusive intervals, keyed by their start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IntervalSet {
    runs: BTreeMap<u128, u128>,
}

impl IntervalSet {
    /// The empty set, for borrowing where a set is optional.
    pub const EMPTY: IntervalSet = IntervalSet { runs: BTreeMap::new() };

    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// The interval that contains `value`, if any.
    pub fn run_containing(&self, value: u128) -> Option<RangeInclusive<u128>> {
        let (&start, &end) = self.runs.range(..=value).next_back()?;
        (value <= end).then_some(start..=end)
    }

    /// Whether `value` is in the set.
    pub fn contains(&self, value: u128) -> bool {
        self.run_containing(value).is_some()
    }

    /// Adds every value of `start..=end` (`start <= end`), merging with overlapping or touching intervals.
    pub fn insert_range(&mut self, start: u128, end: u128) {
        debug_assert!(start <= end);
        let (mut new_start, mut new_end) = (start, end);
        if let Some((&s, &e)) = self.runs.range(..=start).next_back()
            && e.saturating_add(1) >= start
        {
            self.runs.remove(&s);
            new_start = s;
            new_end = new_end.max(e);
        }
        while let Some((&s, &e)) = self.runs.range(new_start..).next() {
            if new_end != u128::MAX && s > new_end + 1 {
                break;
            }
            self.runs.remove(&s);
            new_end = new_end.max(e);
        }
        self.runs.insert(new_start, new_end);
    }

    /// Adds one value.
    pub fn insert(&mut self, value: u128) {
        self.insert_range(value, value);
    }

    /// Removes one value, splitting its interval if needed.
    pub fn remove(&mut self, value: u128) {
        let Some(run) = self.run_containing(value) else {
            return;
        };
        let (start, end) = (*run.start(), *run.end());
        self.runs.remove(&start);
        if start < value {
            self.runs.insert(start, value - 1);
        }
        if value < end {
            self.runs.insert(value + 1, end);
        }
    }

    /// The intervals in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = RangeInclusive<u128>> + '_ {
        self.runs.iter().map(|(s, e)| *s..=*e)
    }

    /// Number of intervals.
    pub fn run_count(&self) -> usize {
        self.runs.len()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }
}

impl FromIterator<u128> for IntervalSet {
    fn from_iter<I: IntoIterator<Item = u128>>(iter: I) -> Self {
        let mut set = IntervalSet::new();
        for v in iter {
            set.insert(v);
        }
        set
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    #[test]
    fn coalesces_touching_values() {
        let set: IntervalSet = [1, 2, 3, 5, 4, 10].into_iter().collect();
        assert_eq!(set.iter().collect::<Vec<_>>(), vec![1..=5, 10..=10]);
    }

    #[test]
    fn remove_splits() {
        let mut set: IntervalSet = (0..10).collect();
        set.remove(5);
        assert_eq!(set.iter().collect::<Vec<_>>(), vec![0..=4, 6..=9]);
        set.remove(0);
        set.remove(9);
        assert_eq!(set.iter().collect::<Vec<_>>(), vec![1..=4, 6..=8]);
    }

    #[test]
    fn extremes_do_not_overflow() {
        let mut set = IntervalSet::new();
        set.insert(u128::MAX);
        set.insert(u128::MAX - 1);
        set.insert_range(0, 3);
        assert_eq!(set.iter().collect::<Vec<_>>(), vec![0..=3, u128::MAX - 1..=u128::MAX]);
        set.remove(u128::MAX);
        assert!(!set.contains(u128::MAX));
    }

    proptest! {
        #[test]
        fn matches_a_naive_set(ops in proptest::collection::vec((any::<bool>(), 0u128..64, 0u128..6), 0..200)) {
            let mut set = IntervalSet::new();
            let mut model = BTreeSet::new();
            for (add, start, len) in ops {
                if add {
                    set.insert_range(start, start + len);
                    model.extend(start..=start + len);
                } else {
                    set.remove(start);
                    model.remove(&start);
                }
                let runs: Vec<_> = set.iter().collect();
                // Coalesced: sorted, disjoint, never touching.
                for pair in runs.windows(2) {
                    prop_assert!(pair[0].end() + 1 < *pair[1].start());
                }
                let flattened: BTreeSet<u128> = runs.into_iter().flatten().collect();
                prop_assert_eq!(&flattened, &model);
                for v in 0..72 {
                    prop_assert_eq!(set.contains(v), model.contains(&v));
                }
            }
        }
    }
}
