//! Duplicate detection by `response_id`: remembers the ids of accepted responses for a
//! horizon of event time, in bounded memory, and says whether a response was seen before,
//! and from which source message (so that a forwarded copy of the very same message, which a
//! replay of the repartition step can produce, is told apart from a re-send).
//!
//! The filter's clock is the largest event time it has been told about, so its decisions
//! depend only on the order of the responses it is shown: replaying the same input gives the
//! same answers. Ids are kept as 64-bit fingerprints (xxh3), so memory per id is fixed; two
//! different ids collide with odds of about one in 10^13 per check at a million ids.

use std::collections::VecDeque;

use rustc_hash::FxHashMap;

use crate::time::{Span, Timestamp};

/// Remembers recently accepted `response_id`s.
#[derive(Debug, Clone)]
pub struct DuplicateFilter {
    horizon: Span,
    capacity: usize,
    clock: Timestamp,
    /// Fingerprint -> event time and source tag of the response that was remembered.
    seen: FxHashMap<u64, (Timestamp, u64)>,
    /// Fingerprints in the order they were remembered, for eviction.
    order: VecDeque<(u64, Timestamp)>,
    evicted_early: u64,
}

impl DuplicateFilter {
    /// A filter that remembers ids for `horizon` of event time, and at most `capacity` ids
    /// (the oldest remembered are forgotten first).
    pub fn new(horizon: Span, capacity: usize) -> DuplicateFilter {
        DuplicateFilter {
            horizon,
            capacity: capacity.max(1),
            clock: Timestamp(i64::MIN),
            seen: FxHashMap::default(),
            order: VecDeque::new(),
            evicted_early: 0,
        }
    }

    fn fingerprint(response_id: &str) -> u64 {
        xxhash_rust::xxh3::xxh3_64(response_id.as_bytes())
    }

    fn cutoff(&self) -> Timestamp {
        self.clock.minus(self.horizon)
    }

    /// True if `response_id` was remembered and is still within the horizon: a response at
    /// event time `t` is forgotten once the clock passes `t + horizon`.
    pub fn contains(&self, response_id: &str) -> bool {
        self.source_of(response_id).is_some()
    }

    /// The source tag `response_id` was remembered with, if it is still within the horizon.
    pub fn source_of(&self, response_id: &str) -> Option<u64> {
        self.seen
            .get(&Self::fingerprint(response_id))
            .filter(|(t, _)| *t > self.cutoff())
            .map(|&(_, source)| source)
    }

    /// Remembers an accepted response's id at its event time, with a tag naming the message
    /// it came from, and moves the clock.
    pub fn remember(&mut self, response_id: &str, t: Timestamp, source: u64) {
        self.clock = self.clock.max(t);
        let fingerprint = Self::fingerprint(response_id);
        self.seen.insert(fingerprint, (t, source));
        self.order.push_back((fingerprint, t));
        self.forget_expired();
    }

    fn forget_expired(&mut self) {
        let cutoff = self.cutoff();
        while let Some(&(fingerprint, t)) = self.order.front() {
            let over_capacity = self.order.len() > self.capacity;
            if !over_capacity && t > cutoff {
                break;
            }
            self.order.pop_front();
            if self.seen.get(&fingerprint).map(|(seen, _)| *seen) == Some(t) {
                self.seen.remove(&fingerprint);
                if over_capacity && t > cutoff {
                    self.evicted_early += 1;
                }
            }
        }
    }

    /// How many ids are remembered now.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    /// True when no id is remembered.
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    /// How many ids were forgotten before their horizon because the filter was full: a
    /// non-zero value means the capacity is too small for the traffic.
    pub fn evicted_early(&self) -> u64 {
        self.evicted_early
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_within_the_horizon_only() {
        let mut filter = DuplicateFilter::new(Span(100), 10);
        filter.remember("a", Timestamp(1_000), 1);
        assert!(filter.contains("a"));
        assert_eq!(filter.source_of("a"), Some(1));
        assert!(!filter.contains("b"));
        filter.remember("b", Timestamp(1_099), 2);
        assert!(filter.contains("a"), "clock 1099 is within 100 of 1000");
        filter.remember("c", Timestamp(1_100), 3);
        assert!(!filter.contains("a"), "clock 1100 passed 1000 + 100");
        assert!(filter.contains("b"));
        assert_eq!(filter.len(), 2);
    }

    #[test]
    fn capacity_bounds_memory_and_counts_early_evictions() {
        let mut filter = DuplicateFilter::new(Span::days(1), 3);
        for (i, id) in ["a", "b", "c", "d"].iter().enumerate() {
            filter.remember(id, Timestamp(i as i64), i as u64);
        }
        assert_eq!(filter.len(), 3);
        assert!(!filter.contains("a"));
        assert!(filter.contains("d"));
        assert_eq!(filter.evicted_early(), 1);
    }

    #[test]
    fn late_responses_are_remembered_by_their_own_time() {
        let mut filter = DuplicateFilter::new(Span(100), 10);
        filter.remember("new", Timestamp(1_000), 1);
        filter.remember("late", Timestamp(950), 2);
        assert!(filter.contains("late"));
        filter.remember("newer", Timestamp(1_050), 3);
        assert!(!filter.contains("late"), "950 + 100 <= 1050");
        assert!(filter.contains("new"));
    }
}
