//! The aggregate role's query model: the segments this process owns, by deltas-topic
//! partition, and their rolling windows as rows for `/metrics` and `/v1/segments`. The role
//! writes it ([`crate::aggregate`]); the HTTP server and the metrics collector read it.
//! A partition's segments are dropped when the partition is revoked, so a segment is only
//! ever shown by the one process that owns it.

use std::collections::BTreeMap;

use npsflow_core::{
    SegmentDelta, SegmentSnapshot, SegmentStore, Timestamp, WindowSpecs, WindowSummary,
};

use crate::config::ClockKind;

/// One segment's summary in one window.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// Canonical segment name.
    pub segment: String,
    /// Window name.
    pub window: String,
    /// Counts, NPS, margin, band, the window before and the change from it.
    pub summary: WindowSummary,
    /// Whether the change is more than noise (`analytics.min_responses` on both sides).
    pub significant: bool,
}

impl Row {
    /// The JSON form of one segment in one window, as the API serves it and the view topic
    /// carries it: the half-open event-time interval `[from, to)` it counts (RFC 3339 UTC
    /// with milliseconds), the counts, NPS and margin, invitations and response rate, the
    /// window just before and the change from it, and when it was computed.
    pub fn to_json(&self, computed_at: Timestamp) -> serde_json::Value {
        let s = &self.summary;
        serde_json::json!({
            "segment": self.segment,
            "window": self.window,
            "from": s.from.to_rfc3339(),
            "to": s.to.to_rfc3339(),
            "responses": s.tally.responses(),
            "promoters": s.tally.promoters,
            "passives": s.tally.passives,
            "detractors": s.tally.detractors,
            "nps": s.tally.nps(),
            "ci95": s.tally.ci95(),
            "band": s.tally.band().map(|b| b.as_str()),
            "invitations": s.tally.invitations,
            "response_rate": s.tally.response_rate(),
            "previous": {
                "from": Timestamp(2 * s.from.millis() - s.to.millis()).to_rfc3339(),
                "to": s.from.to_rfc3339(),
                "responses": s.previous.responses(),
                "nps": s.change.previous_nps,
            },
            "change": {
                "previous_nps": s.change.previous_nps,
                "delta": s.change.delta,
                "z": s.change.z,
                "significant": self.significant,
            },
            "computed_at": computed_at.to_rfc3339(),
        })
    }

    /// Its key on the view topic: `<window>|<segment>` (window names hold no `|`).
    pub fn view_key(&self) -> String {
        format!("{}|{}", self.window, self.segment)
    }
}

/// The segments this process owns, by deltas-topic partition.
#[derive(Debug)]
pub struct AggregateView {
    windows: WindowSpecs,
    clock: ClockKind,
    /// `analytics.min_responses`.
    min_responses: u64,
    partitions: BTreeMap<i32, SegmentStore>,
    latest_event: Option<Timestamp>,
}

impl AggregateView {
    /// An empty view; a change is significant with `min_responses` on both sides.
    pub fn new(windows: WindowSpecs, clock: ClockKind, min_responses: u64) -> AggregateView {
        AggregateView {
            windows,
            clock,
            min_responses,
            partitions: BTreeMap::new(),
            latest_event: None,
        }
    }

    /// The windows.
    pub fn windows(&self) -> &WindowSpecs {
        &self.windows
    }

    /// `analytics.min_responses`: the responses each side of a change test needs.
    pub fn min_responses(&self) -> u64 {
        self.min_responses
    }

    /// "now" for queries: the wall clock, or the latest event time applied.
    pub fn now(&self, wall: Timestamp) -> Timestamp {
        match self.clock {
            ClockKind::Wall => wall,
            ClockKind::EventTime => self.latest_event.unwrap_or(wall),
        }
    }

    /// Applies a delta that arrived on `partition` of the deltas topic; `None` (and nothing
    /// applied) unless that partition is owned here, i.e. was restored on assignment. A
    /// message fetched just before its partition was revoked must not start a new, empty
    /// store whose snapshot would then overwrite the new owner's.
    pub fn apply(&mut self, partition: i32, delta: &SegmentDelta) -> Option<npsflow_core::Applied> {
        let applied = self.partitions.get_mut(&partition)?.apply(delta);
        if let Some(latest) = delta.responses.iter().map(|r| r.1).max() {
            let latest = Timestamp(latest);
            self.latest_event = Some(self.latest_event.map_or(latest, |l| l.max(latest)));
        }
        Some(applied)
    }

    /// Replaces a partition's segments with restored snapshots.
    pub fn restore(&mut self, partition: i32, snapshots: &[SegmentSnapshot]) {
        let mut store = SegmentStore::new(self.windows.clone());
        for snapshot in snapshots {
            store.restore(snapshot);
        }
        self.partitions.insert(partition, store);
    }

    /// A segment's snapshot, as owned on `partition`.
    pub fn snapshot(&self, partition: i32, segment: &str) -> Option<SegmentSnapshot> {
        self.partitions.get(&partition)?.snapshot(segment)
    }

    /// True if `partition` of the deltas topic is owned (restored) here.
    pub fn owns(&self, partition: i32) -> bool {
        self.partitions.contains_key(&partition)
    }

    /// Drops a partition's segments.
    pub fn drop_partition(&mut self, partition: i32) {
        self.partitions.remove(&partition);
    }

    /// How many segments are owned.
    pub fn segment_count(&self) -> usize {
        self.partitions.values().map(|s| s.board().len()).sum()
    }

    /// Every owned segment in every window, sorted by segment then window order.
    pub fn rows(&self, wall: Timestamp) -> Vec<Row> {
        let mut rows = Vec::new();
        self.each_summary(wall, |segment, window, summary| {
            rows.push(Row {
                segment: segment.to_owned(),
                window: self.windows.windows()[window].name().to_owned(),
                significant: summary.change.significant(self.min_responses),
                summary,
            });
        });
        rows
    }

    /// Calls `visit` with every owned segment's summary in every window at `wall` (with the
    /// window's index in [`Self::windows`]), sorted by segment then window order, without
    /// copying a segment's name.
    pub fn each_summary<'a>(
        &'a self,
        wall: Timestamp,
        mut visit: impl FnMut(&'a str, usize, WindowSummary),
    ) {
        let now = self.now(wall);
        let mut segments: Vec<(&String, &SegmentStore)> = self
            .partitions
            .values()
            .flat_map(|store| store.board().segments().map(move |s| (s, store)))
            .collect();
        segments.sort_by(|a, b| a.0.cmp(b.0));
        for (segment, store) in segments {
            for window in 0..self.windows.windows().len() {
                if let Some(summary) = store.board().summary(segment, window, now) {
                    visit(segment, window, summary);
                }
            }
        }
    }

    fn segment_rows<'a>(
        &'a self,
        store: &'a SegmentStore,
        segment: &'a String,
        now: Timestamp,
    ) -> impl Iterator<Item = Row> + 'a {
        self.windows
            .windows()
            .iter()
            .enumerate()
            .filter_map(move |(index, window)| {
                let summary = store.board().summary(segment, index, now)?;
                Some(Row {
                    segment: segment.clone(),
                    window: window.name().to_owned(),
                    significant: summary.change.significant(self.min_responses),
                    summary,
                })
            })
    }

    /// One segment's rows, if this process owns it.
    pub fn segment(&self, name: &str, wall: Timestamp) -> Option<Vec<Row>> {
        let now = self.now(wall);
        let key = name.to_owned();
        self.partitions
            .values()
            .find(|store| store.board().tally(&key, 0, now).is_some())
            .map(|store| self.segment_rows(store, &key, now).collect())
    }
}
