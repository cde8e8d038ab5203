//! Byte ranges of a part the POP has acknowledged: sorted, disjoint, merged.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RangeSet(Vec<[u64; 2]>);

impl RangeSet {
    pub fn new() -> Self {
        RangeSet(Vec::new())
    }

    /// Adds `[start, end)`, merging with touching or overlapping ranges.
    pub fn insert(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let (mut start, mut end) = (start, end);
        let mut kept = Vec::with_capacity(self.0.len() + 1);
        for &[s, e] in &self.0 {
            if e < start || s > end {
                kept.push([s, e]);
            } else {
                start = start.min(s);
                end = end.max(e);
            }
        }
        kept.push([start, end]);
        kept.sort_unstable();
        self.0 = kept;
    }

    /// The first range inside `[0, len)` not yet covered.
    pub fn first_gap(&self, len: u64) -> Option<(u64, u64)> {
        let mut at = 0;
        for &[s, e] in &self.0 {
            if s > at {
                return Some((at, s.min(len))).filter(|(a, b)| a < b);
            }
            at = at.max(e);
            if at >= len {
                return None;
            }
        }
        (at < len).then_some((at, len))
    }

    pub fn covered(&self) -> u64 {
        self.0.iter().map(|[s, e]| e - s).sum()
    }

    /// Bytes of `[start, end)` already covered.
    pub fn overlap(&self, start: u64, end: u64) -> u64 {
        self.0
            .iter()
            .map(|&[s, e]| e.min(end).saturating_sub(s.max(start)))
            .sum()
    }

    pub fn ranges(&self) -> &[[u64; 2]] {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_and_finds_gaps() {
        let mut r = RangeSet::new();
        assert_eq!(r.first_gap(10), Some((0, 10)));
        r.insert(0, 3);
        r.insert(5, 7);
        assert_eq!(r.first_gap(10), Some((3, 5)));
        r.insert(3, 5);
        assert_eq!(r.ranges(), &[[0, 7]]);
        assert_eq!(r.first_gap(10), Some((7, 10)));
        r.insert(8, 10);
        assert_eq!(r.first_gap(10), Some((7, 8)));
        r.insert(6, 9);
        assert_eq!(r.first_gap(10), None);
        assert_eq!(r.covered(), 10);
        assert_eq!(r.overlap(5, 20), 5);
    }
}
