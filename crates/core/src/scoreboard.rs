//! The counts of many segments: each segment's rolling windows, keyed by whatever names the
//! segment (a [`SegmentId`](crate::segment::SegmentId) in one process, its canonical name
//! across processes), plus the NPS summary the API and gauges show.
//!
//! A [`WindowSummary`] states the interval it counts: at `now`, a window covers the half-open
//! event-time interval `[from, to)` ([`WindowSpec::interval`](crate::window::WindowSpec::interval)),
//! and the summary's counts are exactly the responses with `from <= responded_at < to`, so
//! anyone can recompute them from the raw responses. It also counts the window just before,
//! `[from - length, from)`, and says how the NPS changed from it ([`Change`]).

use rustc_hash::FxHashMap;
use std::hash::Hash;

use crate::nps::{Category, Change, Tally};
use crate::time::Timestamp;
use crate::window::{SegmentWindows, WindowSpecs};

/// Rolling windows for a set of segments.
#[derive(Debug, Clone)]
pub struct Scoreboard<K> {
    specs: WindowSpecs,
    segments: FxHashMap<K, SegmentWindows>,
}

/// What one segment's window says at one instant.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WindowSummary {
    /// Start of the interval counted (inclusive): `to - length`.
    pub from: Timestamp,
    /// End of the interval counted (exclusive): the end of the step that holds `now`.
    pub to: Timestamp,
    /// The counts of responses with `from <= responded_at < to` (its NPS, margin and band
    /// are [`Tally::nps`], [`Tally::ci95`] and [`Tally::band`]).
    pub tally: Tally,
    /// The counts of the window just before, `[from - (to - from), from)`.
    pub previous: Tally,
    /// How the NPS changed from the window just before.
    pub change: Change,
}

impl WindowSummary {
    /// The summary of a tally of the responses in `[from, to)`, and of `previous`, the
    /// responses in the window just before.
    pub fn of(tally: Tally, previous: Tally, from: Timestamp, to: Timestamp) -> WindowSummary {
        WindowSummary {
            from,
            to,
            tally,
            previous,
            change: Change::between(&tally, &previous),
        }
    }
}

impl<K: Hash + Eq + Clone> Scoreboard<K> {
    /// An empty scoreboard with these windows.
    pub fn new(specs: WindowSpecs) -> Scoreboard<K> {
        Scoreboard {
            specs,
            segments: FxHashMap::default(),
        }
    }

    /// The windows.
    pub fn specs(&self) -> &WindowSpecs {
        &self.specs
    }

    /// Counts one response at event time `t` in each of `segments`.
    pub fn record<'k>(
        &mut self,
        segments: impl IntoIterator<Item = &'k K>,
        t: Timestamp,
        category: Category,
    ) where
        K: 'k,
    {
        for key in segments {
            self.add(key, t, Tally::of(category, 1));
        }
    }

    /// Adds a tally at event time `t` to one segment.
    pub fn add(&mut self, segment: &K, t: Timestamp, tally: Tally) {
        let specs = &self.specs;
        match self.segments.get_mut(segment) {
            Some(windows) => windows.add(specs, t, tally),
            None => {
                let mut windows = SegmentWindows::new(specs);
                windows.add(specs, t, tally);
                self.segments.insert(segment.clone(), windows);
            }
        }
    }

    /// A segment's counts in window number `window` at `now` (the responses in the window's
    /// [`interval`](crate::window::WindowSpec::interval) at `now`); `None` for an unknown
    /// segment.
    pub fn tally(&self, segment: &K, window: usize, now: Timestamp) -> Option<Tally> {
        self.segments
            .get(segment)
            .map(|w| w.tally(&self.specs, window, now))
    }

    /// A segment's summary in window number `window` at `now`, with the interval it counts.
    pub fn summary(&self, segment: &K, window: usize, now: Timestamp) -> Option<WindowSummary> {
        let (from, to) = self.specs.windows()[window].interval(now);
        let windows = self.segments.get(segment)?;
        Some(WindowSummary::of(
            windows.tally(&self.specs, window, now),
            windows.previous_tally(&self.specs, window, now),
            from,
            to,
        ))
    }

    /// Every segment known, in no particular order.
    pub fn segments(&self) -> impl Iterator<Item = &K> {
        self.segments.keys()
    }

    /// How many segments are known.
    pub fn len(&self) -> usize {
        self.segments.len()
    }

    /// True when no segment is known.
    pub fn is_empty(&self) -> bool {
        self.segments.is_empty()
    }

    /// A segment's windows.
    pub fn windows(&self, segment: &K) -> Option<&SegmentWindows> {
        self.segments.get(segment)
    }

    /// Sets a segment's windows (when restoring it).
    pub fn insert(&mut self, segment: K, windows: SegmentWindows) {
        self.segments.insert(segment, windows);
    }

    /// Forgets a segment (when another process takes it over).
    pub fn remove(&mut self, segment: &K) -> Option<SegmentWindows> {
        self.segments.remove(segment)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::Span;

    #[test]
    fn segments_count_independently() {
        let specs = WindowSpecs::new(&["1h"], 60, Span(0)).expect("valid");
        let mut board: Scoreboard<&str> = Scoreboard::new(specs);
        board.record(&["all", "region=east"], Timestamp(0), Category::Promoter);
        board.record(&["all"], Timestamp(0), Category::Detractor);
        let all = board.summary(&"all", 0, Timestamp(0)).expect("known");
        assert_eq!(all.tally.responses(), 2);
        assert_eq!(all.tally.nps(), Some(0.0));
        let east = board
            .summary(&"region=east", 0, Timestamp(0))
            .expect("known");
        assert_eq!(east.tally.nps(), Some(100.0));
        assert_eq!(east.tally.band(), Some(crate::nps::Band::High));
        assert_eq!(board.summary(&"region=west", 0, Timestamp(0)), None);
        // The summary states the interval it counts: the hour up to the end of now's minute.
        assert_eq!(
            (all.from, all.to),
            (Timestamp(60_000 - 3_600_000), Timestamp(60_000))
        );
        let later = board
            .summary(&"all", 0, Timestamp(3_600_000))
            .expect("known");
        assert_eq!(
            (later.from, later.to),
            (Timestamp(60_000), Timestamp(3_660_000))
        );
        assert_eq!(later.tally.responses(), 0);
        assert_eq!(later.tally.nps(), None);
        assert_eq!(board.len(), 2);
        board.remove(&"all");
        assert_eq!(board.len(), 1);
    }
}
