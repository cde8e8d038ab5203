use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A set of disjoint, non-adjacent half-open byte ranges `[start, end)`.
/// Inserting merges neighbours, so a part written in order stays a single range and
/// bookkeeping costs O(log n) per chunk, never a scan of every chunk seen.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeSet {
    ranges: BTreeMap<u64, u64>,
}

impl RangeSet {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let (mut start, mut end) = (start, end);
        // Absorb a range that begins before `start` and reaches it.
        if let Some((&s, &e)) = self.ranges.range(..=start).next_back() {
            if e >= start {
                start = s;
                end = end.max(e);
            }
        }
        // Absorb every range beginning inside the new one (or touching its end).
        let overlapped: Vec<u64> = self.ranges.range(start..=end).map(|(&s, _)| s).collect();
        for s in overlapped {
            if let Some(e) = self.ranges.remove(&s) {
                end = end.max(e);
            }
        }
        self.ranges.insert(start, end);
    }

    /// True when every byte of `[start, end)` is in the set.
    pub fn covers(&self, start: u64, end: u64) -> bool {
        if start >= end {
            return true;
        }
        match self.ranges.range(..=start).next_back() {
            Some((_, &e)) => e >= end,
            None => false,
        }
    }

    /// The parts of `[start, end)` that are in the set, in order.
    pub fn intersect(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        if let Some((_, &e)) = self.ranges.range(..start).next_back() {
            if e > start {
                out.push((start, e.min(end)));
            }
        }
        for (&s, &e) in self.ranges.range(start..end) {
            out.push((s, e.min(end)));
        }
        out
    }

    /// Length of the run of bytes starting at 0.
    pub fn contiguous_prefix(&self) -> u64 {
        match self.ranges.first_key_value() {
            Some((&0, &e)) => e,
            _ => 0,
        }
    }

    pub fn total(&self) -> u64 {
        self.ranges.iter().map(|(s, e)| e - s).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    /// The highest byte offset recorded plus one.
    pub fn end(&self) -> u64 {
        self.ranges.last_key_value().map(|(_, &e)| e).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_inserts_stay_one_range() {
        let mut r = RangeSet::new();
        for i in 0..100 {
            r.insert(i * 10, i * 10 + 10);
        }
        assert_eq!(r.len(), 1);
        assert_eq!(r.contiguous_prefix(), 1000);
    }

    #[test]
    fn out_of_order_inserts_merge() {
        let mut r = RangeSet::new();
        r.insert(20, 30);
        r.insert(0, 10);
        assert_eq!(r.len(), 2);
        assert!(!r.covers(0, 30));
        assert_eq!(r.intersect(5, 25), vec![(5, 10), (20, 25)]);
        r.insert(5, 22);
        assert_eq!(r.len(), 1);
        assert!(r.covers(0, 30));
        assert_eq!(r.total(), 30);
    }

    #[test]
    fn overlapping_insert_spanning_many() {
        let mut r = RangeSet::new();
        r.insert(10, 20);
        r.insert(30, 40);
        r.insert(50, 60);
        r.insert(15, 55);
        assert_eq!(r.intersect(0, 100), vec![(10, 60)]);
        assert_eq!(r.contiguous_prefix(), 0);
        assert_eq!(r.end(), 60);
    }
}
