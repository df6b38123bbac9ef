//! Segment deltas: what ingest tells the segment-owning aggregators, and how they apply it.
//!
//! A delta carries, for one segment and one input partition, every response of an ingest
//! batch that counts in the segment: its input offset, its event time (rounded down to the
//! windows' resolution) and its score. Naming each response's source offset lets the
//! aggregator apply each response at most once: it keeps, per segment and input partition,
//! the highest offset applied and skips anything at or below it, so replays after a crash,
//! re-sent batches and zombie producers change nothing.
//!
//! Wire format (JSON, keyed by segment):
//! `{"segment":"region=east","partition":3,"responses":[[1041,1795348800000,9],...]}`.

use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};

use crate::nps::{Score, Tally};
use crate::scoreboard::Scoreboard;
use crate::time::Timestamp;
use crate::window::{SegmentWindows, WindowCounts, WindowSpecs};

/// One response in a delta: `(input offset, event time in ms, score)`.
pub type DeltaResponse = (i64, i64, u8);

/// One segment's share of an ingest batch from one input partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SegmentDelta {
    /// The segment's canonical name.
    pub segment: String,
    /// The input partition the responses came from.
    pub partition: i32,
    /// `[offset, event time in ms, score]` per response, in offset order.
    pub responses: Vec<DeltaResponse>,
    /// `[offset, event time in ms]` per invitation sent (`survey.invitations`), in offset
    /// order; absent when there are none. Offsets are positions on the same partition as the
    /// responses', so the high-water mark covers both.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub invitations: Vec<DeltaInvitation>,
}

/// One invitation in a delta: `(input offset, event time in ms)`.
pub type DeltaInvitation = (i64, i64);

/// Why a delta message was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadDelta(pub String);

impl std::fmt::Display for BadDelta {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "bad segment delta: {}", self.0)
    }
}

impl std::error::Error for BadDelta {}

impl SegmentDelta {
    /// The JSON message body.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a delta always serialises")
    }

    /// Parses and checks a delta message.
    pub fn from_json(bytes: &[u8]) -> Result<SegmentDelta, BadDelta> {
        let delta: SegmentDelta =
            serde_json::from_slice(bytes).map_err(|e| BadDelta(e.to_string()))?;
        if delta.segment.is_empty() {
            return Err(BadDelta("empty segment".into()));
        }
        check_responses(&delta.responses)?;
        if delta.invitations.windows(2).any(|w| w[0].0 >= w[1].0) {
            return Err(BadDelta("offsets not increasing".into()));
        }
        Ok(delta)
    }
}

/// Checks the responses of a delta (a segment's or an account's): every score in range,
/// input offsets strictly increasing.
pub(crate) fn check_responses(responses: &[DeltaResponse]) -> Result<(), BadDelta> {
    if responses
        .iter()
        .any(|r| Score::new(i64::from(r.2)).is_none())
    {
        return Err(BadDelta("score out of range".into()));
    }
    if responses.windows(2).any(|w| w[0].0 >= w[1].0) {
        return Err(BadDelta("offsets not increasing".into()));
    }
    Ok(())
}

/// One segment's durable state: its windows and, per input partition, the highest input
/// offset applied. Each snapshot is consistent on its own, so restoring any set of them and
/// replaying the deltas after them counts every response exactly once.
///
/// Wire format (JSON, keyed by segment, on the compacted state topic):
/// `{"segment":"all","high_water":[[0,1041],[1,977]],"windows":[{"window":"1h","bucket_ms":60000,"newest":29921880,"buckets":[[29921879,3,1,2]]}]}`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SegmentSnapshot {
    /// The segment's canonical name.
    pub segment: String,
    /// `(input partition, highest offset applied)`.
    pub high_water: Vec<(i32, i64)>,
    /// The windows' counts.
    pub windows: Vec<WindowCounts>,
}

impl SegmentSnapshot {
    /// The JSON message body.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a snapshot always serialises")
    }

    /// Parses a snapshot message.
    pub fn from_json(bytes: &[u8]) -> Result<SegmentSnapshot, BadDelta> {
        serde_json::from_slice(bytes).map_err(|e| BadDelta(format!("snapshot: {e}")))
    }

    /// True if this snapshot has applied at least everything `other` has, for every input
    /// partition: of two snapshots of a segment, restore the one that is further along.
    pub fn covers(&self, other: &SegmentSnapshot) -> bool {
        covers(&self.high_water, &other.high_water)
    }
}

/// True if high-water marks `a` reach at least `b`'s for every input partition `b` names.
pub(crate) fn covers(a: &[(i32, i64)], b: &[(i32, i64)]) -> bool {
    b.iter()
        .all(|(partition, offset)| a.iter().any(|(p, o)| p == partition && o >= offset))
}

/// What applying a delta did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Applied {
    /// Responses counted.
    pub counted: u64,
    /// Responses and invitations skipped because their offset was applied before.
    pub skipped: u64,
    /// Invitations counted.
    pub invited: u64,
}

/// The aggregator's state: segment windows plus, per segment and input partition, the
/// highest input offset applied.
#[derive(Debug, Clone)]
pub struct SegmentStore {
    board: Scoreboard<String>,
    high_water: FxHashMap<String, FxHashMap<i32, i64>>,
}

impl SegmentStore {
    /// An empty store with these windows.
    pub fn new(windows: WindowSpecs) -> SegmentStore {
        SegmentStore {
            board: Scoreboard::new(windows),
            high_water: FxHashMap::default(),
        }
    }

    /// Counts the responses of a delta that were not applied before.
    pub fn apply(&mut self, delta: &SegmentDelta) -> Applied {
        let marks = self.high_water.entry(delta.segment.clone()).or_default();
        let mark = marks.entry(delta.partition).or_insert(i64::MIN);
        let mut applied = Applied::default();
        // Responses and invitations in one offset order, each applied at most once.
        let responses = delta.responses.iter().filter_map(|&(offset, at, score)| {
            let score = Score::new(i64::from(score))?;
            Some((offset, at, Tally::of(score.category(), 1)))
        });
        let invitations = delta
            .invitations
            .iter()
            .map(|&(offset, at)| (offset, at, Tally::invited(1)));
        let mut items: Vec<(i64, i64, Tally)> = responses.chain(invitations).collect();
        if !delta.invitations.is_empty() {
            items.sort_unstable_by_key(|item| item.0);
        }
        for (offset, at, tally) in items {
            if offset <= *mark {
                applied.skipped += 1;
                continue;
            }
            *mark = offset;
            self.board.add(&delta.segment, Timestamp(at), tally);
            if tally.invitations > 0 {
                applied.invited += 1;
            } else {
                applied.counted += 1;
            }
        }
        applied
    }

    /// The windows of every segment.
    pub fn board(&self) -> &Scoreboard<String> {
        &self.board
    }

    /// The highest input offset applied for a segment and input partition.
    pub fn high_water(&self, segment: &str, partition: i32) -> Option<i64> {
        self.high_water.get(segment)?.get(&partition).copied()
    }

    /// A segment's snapshot, if the store knows it.
    pub fn snapshot(&self, segment: &str) -> Option<SegmentSnapshot> {
        let key = segment.to_owned();
        let windows = self.board.windows(&key)?.export(self.board.specs());
        let mut high_water: Vec<(i32, i64)> = self
            .high_water
            .get(segment)
            .map(|marks| marks.iter().map(|(p, o)| (*p, *o)).collect())
            .unwrap_or_default();
        high_water.sort_unstable();
        Some(SegmentSnapshot {
            segment: key,
            high_water,
            windows,
        })
    }

    /// Replaces a segment's state with a snapshot's.
    pub fn restore(&mut self, snapshot: &SegmentSnapshot) {
        let windows = SegmentWindows::import(self.board.specs(), &snapshot.windows);
        self.board.insert(snapshot.segment.clone(), windows);
        self.high_water.insert(
            snapshot.segment.clone(),
            snapshot.high_water.iter().copied().collect(),
        );
    }

    /// Forgets a segment entirely (it moved to another process).
    pub fn remove(&mut self, segment: &str) {
        self.board.remove(&segment.to_owned());
        self.high_water.remove(segment);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::Span;

    fn delta(partition: i32, responses: &[(i64, i64, u8)]) -> SegmentDelta {
        SegmentDelta {
            segment: "region=east".into(),
            partition,
            responses: responses.to_vec(),
            invitations: Vec::new(),
        }
    }

    #[test]
    fn invitations_share_the_offset_order_and_count_once() {
        let windows = WindowSpecs::new(&["1h"], 60, Span(0)).expect("valid");
        let mut store = SegmentStore::new(windows);
        let t = 1_795_348_800_000;
        let mut mixed = delta(0, &[(2, t, 9), (5, t, 3)]);
        mixed.invitations = vec![(1, t), (3, t), (4, t)];
        let json = mixed.to_json();
        assert!(String::from_utf8_lossy(&json).contains("\"invitations\":[[1,"));
        assert_eq!(SegmentDelta::from_json(&json), Ok(mixed.clone()));
        // Without invitations the wire format is unchanged.
        assert!(!String::from_utf8_lossy(&delta(0, &[(1, t, 9)]).to_json()).contains("invitations"));
        let applied = store.apply(&mixed);
        assert_eq!(
            (applied.counted, applied.invited, applied.skipped),
            (2, 3, 0)
        );
        // A replay, and a later delta overlapping it, count only what is new.
        assert_eq!(store.apply(&mixed).skipped, 5);
        let mut later = delta(0, &[(6, t, 10)]);
        later.invitations = vec![(4, t), (7, t)];
        let applied = store.apply(&later);
        assert_eq!(
            (applied.counted, applied.invited, applied.skipped),
            (1, 1, 1)
        );
        let tally = store
            .board()
            .windows(&"region=east".to_owned())
            .expect("known")
            .tally(store.board().specs(), 0, Timestamp(t + 1));
        assert_eq!((tally.responses(), tally.invitations), (3, 4));
        let mut unordered = delta(0, &[]);
        unordered.invitations = vec![(3, t), (3, t)];
        assert!(SegmentDelta::from_json(&unordered.to_json()).is_err());
    }

    #[test]
    fn replayed_offsets_are_skipped_per_partition() {
        let windows = WindowSpecs::new(&["1h"], 60, Span(0)).expect("valid");
        let mut store = SegmentStore::new(windows);
        assert_eq!(store.apply(&delta(0, &[(10, 0, 9), (11, 0, 3)])).counted, 2);
        // A replay overlapping what was applied counts only the new offset.
        let again = store.apply(&delta(0, &[(10, 0, 9), (11, 0, 3), (12, 0, 7)]));
        assert_eq!(
            again,
            Applied {
                counted: 1,
                skipped: 2,
                invited: 0,
            }
        );
        // Another partition has its own offsets.
        assert_eq!(store.apply(&delta(1, &[(10, 0, 9)])).counted, 1);
        let tally = store
            .board()
            .tally(&"region=east".to_owned(), 0, Timestamp(0))
            .expect("known");
        assert_eq!(
            tally,
            Tally {
                promoters: 2,
                passives: 1,
                detractors: 1,
                invitations: 0,
            }
        );
        assert_eq!(store.high_water("region=east", 0), Some(12));
        store.remove("region=east");
        assert_eq!(store.high_water("region=east", 0), None);
        assert!(store.board().is_empty());
    }

    #[test]
    fn a_restored_store_counts_exactly_like_the_original() {
        let windows = WindowSpecs::new(&["1h", "24h"], 60, Span(0)).expect("valid");
        let mut original = SegmentStore::new(windows.clone());
        original.apply(&delta(0, &[(10, 0, 9), (11, 60_000, 3)]));
        original.apply(&delta(1, &[(4, 120_000, 7)]));
        let snapshot = original.snapshot("region=east").expect("known");
        let json = snapshot.to_json();
        let mut restored = SegmentStore::new(windows);
        restored.restore(&SegmentSnapshot::from_json(&json).expect("parses"));
        // A replay of everything after the restore changes nothing; new offsets count.
        let replay = delta(0, &[(10, 0, 9), (11, 60_000, 3), (12, 60_000, 10)]);
        assert_eq!(
            restored.apply(&replay),
            Applied {
                counted: 1,
                skipped: 2,
                invited: 0,
            }
        );
        original.apply(&replay);
        for window in 0..2 {
            for now in [0, 60_000, 3_600_000, 90_000_000] {
                let key = "region=east".to_owned();
                assert_eq!(
                    restored.board().tally(&key, window, Timestamp(now)),
                    original.board().tally(&key, window, Timestamp(now))
                );
            }
        }
        assert_eq!(
            restored.snapshot("region=east"),
            original.snapshot("region=east")
        );
        assert!(original
            .snapshot("region=east")
            .expect("known")
            .covers(&snapshot));
        assert!(!snapshot.covers(&original.snapshot("region=east").expect("known")));
    }

    #[test]
    fn deltas_round_trip_and_bad_ones_are_refused() {
        let d = delta(2, &[(1, 60_000, 10), (5, 120_000, 0)]);
        let json = d.to_json();
        assert_eq!(
            std::str::from_utf8(&json).expect("utf8"),
            r#"{"segment":"region=east","partition":2,"responses":[[1,60000,10],[5,120000,0]]}"#
        );
        assert_eq!(SegmentDelta::from_json(&json), Ok(d));
        assert!(SegmentDelta::from_json(b"{}").is_err());
        assert!(SegmentDelta::from_json(&delta(0, &[(1, 0, 11)]).to_json()).is_err());
        assert!(SegmentDelta::from_json(&delta(0, &[(2, 0, 1), (2, 0, 1)]).to_json()).is_err());
    }
}
