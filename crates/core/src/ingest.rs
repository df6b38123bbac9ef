//! The ingest stage as a pure function of (input partition, offset, message, config, clock):
//! each message gets an outcome, detractors get an alert, and accepted responses are
//! combined into one [`SegmentDelta`] per segment and input partition per batch.
//!
//! Duplicate detection and the event-time clock are kept per partition of the topic ingest
//! decides from, so that a partition's decisions depend only on that partition's messages in
//! offset order: replaying the same offsets after a crash makes the same decisions. In the
//! services that topic is the repartition by `response_id` (see
//! [`repartition_key`](crate::intake::repartition_key)), so every copy of a response lands
//! on one partition whatever key it was sent with, and each message carries its [`Source`]
//! on the input topic.

use std::collections::BTreeMap;

use rustc_hash::FxHashMap;

use crate::account::AccountDelta;
use crate::alert::{DetractorAlert, Routing};
use crate::dedupe::DuplicateFilter;
use crate::delta::{DeltaInvitation, DeltaResponse, SegmentDelta};
use crate::intake::{classify, classify_invitation, source_tag, Clock, Outcome};
use crate::segment::{SegmentCatalog, SegmentId, SegmentSpec};
use crate::time::{Span, Timestamp};
use crate::window::WindowSpecs;

/// Which clock ingest judges `too_old` and `future` by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClockKind {
    /// The wall clock passed to [`Ingest::process`].
    Wall,
    /// The largest event time accepted from the same partition.
    EventTime,
}

/// Everything ingest needs to decide.
#[derive(Debug, Clone)]
pub struct IngestSpec {
    /// Windows and time rules.
    pub windows: WindowSpecs,
    /// Segments.
    pub segments: SegmentSpec,
    /// Alert routing.
    pub routing: Routing,
    /// Dedupe horizon (event time).
    pub dedupe_horizon: Span,
    /// Most ids remembered per partition.
    pub dedupe_capacity: usize,
    /// The clock.
    pub clock: ClockKind,
}

/// Where a message was first read: its partition and offset on the input topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Source {
    /// Input partition.
    pub partition: i32,
    /// Input offset.
    pub offset: i64,
}

impl Source {
    fn tag(self) -> u64 {
        source_tag(self.partition, self.offset)
    }
}

/// What ingest decided about one message.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// The `outcome` label; `resent` for a second copy of an input message already decided
    /// (which has no outcome of its own, see [`Decision::is_resent`]).
    pub outcome: &'static str,
    /// If the message goes to the dead-letter topic: the reason code and a sentence.
    pub dead_letter: Option<(&'static str, String)>,
    /// The detractor alert, if any.
    pub alert: Option<DetractorAlert>,
    /// Event time of an accepted response.
    pub event_time: Option<Timestamp>,
    /// Dimension values that were past the cap and counted as `__other__`.
    pub overflowed_values: u32,
    /// For an accepted response: the notice that tells the followup role the customer
    /// answered (it decides whether a closed case's detractor recovered).
    pub responded: Option<crate::case::FollowupNotice>,
}

impl Decision {
    /// The decision for `outcome` before anything is added for an accepted message: its
    /// label and, if it goes to the dead-letter topic, the reason (`time_field` names the
    /// event time judged).
    fn of(outcome: &Outcome<'_>, time_field: &str) -> Decision {
        Decision {
            outcome: outcome.label(),
            dead_letter: outcome
                .dead_letter_reason()
                .map(|code| (code, dead_letter_detail(outcome, time_field))),
            alert: None,
            event_time: None,
            overflowed_values: 0,
            responded: None,
        }
    }

    /// True for a forwarded copy of an input message that was decided before: it is not a
    /// message of its own and changes nothing.
    pub fn is_resent(&self) -> bool {
        self.outcome == "resent"
    }
}

#[derive(Debug)]
struct PartitionState {
    seen: DuplicateFilter,
    /// Invitation ids, apart from response ids (the two may coincide).
    invited: DuplicateFilter,
    latest: Option<Timestamp>,
}

/// The ingest stage's state: per-partition dedupe and clocks, the segment catalog, and the
/// deltas of the batch being built.
#[derive(Debug)]
pub struct Ingest {
    spec: IngestSpec,
    catalog: SegmentCatalog,
    partitions: FxHashMap<i32, PartitionState>,
    resolution: i64,
    segments_scratch: Vec<SegmentId>,
    pending: BTreeMap<(SegmentId, i32), Vec<DeltaResponse>>,
    pending_invitations: BTreeMap<(SegmentId, i32), Vec<DeltaInvitation>>,
    pending_accounts: BTreeMap<(String, i32), Vec<DeltaResponse>>,
}

impl Ingest {
    /// A fresh ingest stage.
    pub fn new(spec: IngestSpec) -> Ingest {
        Ingest {
            catalog: SegmentCatalog::new(spec.segments.clone()),
            resolution: spec.windows.resolution().millis().max(1),
            spec,
            partitions: FxHashMap::default(),
            segments_scratch: Vec::new(),
            pending: BTreeMap::new(),
            pending_invitations: BTreeMap::new(),
            pending_accounts: BTreeMap::new(),
        }
    }

    /// The spec, a partition's state (made if new) and its clock for a message now.
    fn partition(
        &mut self,
        partition: i32,
        wall: Timestamp,
    ) -> (&IngestSpec, &mut PartitionState, Clock) {
        let spec = &self.spec;
        let state = self
            .partitions
            .entry(partition)
            .or_insert_with(|| PartitionState {
                seen: DuplicateFilter::new(spec.dedupe_horizon, spec.dedupe_capacity),
                invited: DuplicateFilter::new(spec.dedupe_horizon, spec.dedupe_capacity),
                latest: None,
            });
        let clock = match spec.clock {
            ClockKind::Wall => Clock::Wall(wall),
            ClockKind::EventTime => Clock::EventTime(state.latest),
        };
        (spec, state, clock)
    }

    /// Decides one message at `offset` of input `partition`, with the wall clock at `wall`,
    /// and adds an accepted response to the pending deltas. The message is its own source.
    pub fn process(
        &mut self,
        partition: i32,
        offset: i64,
        bytes: &[u8],
        wall: Timestamp,
    ) -> Decision {
        self.process_forwarded(partition, offset, Source { partition, offset }, bytes, wall)
    }

    /// Decides one message at `offset` of `partition` of the repartitioned topic, first read
    /// at `source` on the input topic.
    pub fn process_forwarded(
        &mut self,
        partition: i32,
        offset: i64,
        source: Source,
        bytes: &[u8],
        wall: Timestamp,
    ) -> Decision {
        let (spec, state, clock) = self.partition(partition, wall);
        let outcome = classify(bytes, source.tag(), clock, &spec.windows, &mut state.seen);
        let mut decision = Decision::of(&outcome, "responded_at");
        let Outcome::Accepted(response) = outcome else {
            return decision;
        };
        let t = response.responded_at;
        state.latest = Some(state.latest.map_or(t, |l| l.max(t)));
        decision.event_time = Some(t);
        decision.alert = DetractorAlert::for_response(&response, &spec.routing, wall);
        decision.responded = Some(crate::case::FollowupNotice::Responded {
            customer_id: response.customer_id.to_string(),
            response_id: response.response_id.to_string(),
            score: response.score.value(),
            responded_at: t,
        });
        let assignment = self
            .catalog
            .assign(&response.segments, &mut self.segments_scratch);
        decision.overflowed_values = assignment.overflowed_values;
        let rounded = t.millis() - t.millis().rem_euclid(self.resolution);
        for &segment in &self.segments_scratch {
            self.pending.entry((segment, partition)).or_default().push((
                offset,
                rounded,
                response.score.value(),
            ));
        }
        if let Some(account) = &response.account_id {
            self.pending_accounts
                .entry((account.to_string(), partition))
                .or_default()
                .push((offset, rounded, response.score.value()));
        }
        decision
    }

    /// Decides one invitation at `offset` of `partition` of the repartitioned topic, first
    /// read at `source` on the invitations topic, and adds an accepted one to the pending
    /// deltas of every segment it carries. Invitations do not move the event-time clock.
    pub fn process_invitation(
        &mut self,
        partition: i32,
        offset: i64,
        source: Source,
        bytes: &[u8],
        wall: Timestamp,
    ) -> Decision {
        let (spec, state, clock) = self.partition(partition, wall);
        let outcome = classify_invitation(
            bytes,
            source.tag(),
            clock,
            &spec.windows,
            &mut state.invited,
        );
        let mut decision = Decision::of(&outcome, "sent_at");
        let Outcome::Invited(invitation) = outcome else {
            return decision;
        };
        let t = invitation.sent_at;
        let assignment = self
            .catalog
            .assign(&invitation.segments, &mut self.segments_scratch);
        let rounded = t.millis() - t.millis().rem_euclid(self.resolution);
        for &segment in &self.segments_scratch {
            self.pending_invitations
                .entry((segment, partition))
                .or_default()
                .push((offset, rounded));
        }
        decision.event_time = Some(t);
        decision.overflowed_values = assignment.overflowed_values;
        decision
    }

    /// Replays an already-processed invitation into its partition's duplicate memory only.
    pub fn remember_invitation(
        &mut self,
        partition: i32,
        source: Source,
        bytes: &[u8],
        wall: Timestamp,
    ) {
        let (spec, state, clock) = self.partition(partition, wall);
        let _ = classify_invitation(
            bytes,
            source.tag(),
            clock,
            &spec.windows,
            &mut state.invited,
        );
    }

    /// Replays an already-processed message of `partition` (first read at `source`) into its
    /// duplicate memory and clock only, producing nothing: used on assignment to rebuild that
    /// memory from the messages before the committed offset.
    pub fn remember(&mut self, partition: i32, source: Source, bytes: &[u8], wall: Timestamp) {
        let (spec, state, clock) = self.partition(partition, wall);
        let outcome = classify(bytes, source.tag(), clock, &spec.windows, &mut state.seen);
        if let Outcome::Accepted(response) = outcome {
            let t = response.responded_at;
            state.latest = Some(state.latest.map_or(t, |l| l.max(t)));
        }
    }

    /// The deltas of everything processed since the last call, one per segment and input
    /// partition, in a fixed order.
    pub fn take_deltas(&mut self) -> Vec<SegmentDelta> {
        let mut invitations = std::mem::take(&mut self.pending_invitations);
        let mut deltas: Vec<SegmentDelta> = std::mem::take(&mut self.pending)
            .into_iter()
            .map(|(key, responses)| SegmentDelta {
                segment: self.catalog.name(key.0).to_owned(),
                partition: key.1,
                responses,
                invitations: invitations.remove(&key).unwrap_or_default(),
            })
            .collect();
        if !invitations.is_empty() {
            deltas.extend(
                invitations
                    .into_iter()
                    .map(|(key, invitations)| SegmentDelta {
                        segment: self.catalog.name(key.0).to_owned(),
                        partition: key.1,
                        responses: Vec::new(),
                        invitations,
                    }),
            );
            deltas.sort_by(|a, b| (&a.segment, a.partition).cmp(&(&b.segment, b.partition)));
        }
        deltas
    }

    /// The account deltas of everything processed since the last call, one per account and
    /// input partition, in a fixed order.
    pub fn take_account_deltas(&mut self) -> Vec<AccountDelta> {
        std::mem::take(&mut self.pending_accounts)
            .into_iter()
            .map(|((account, partition), responses)| AccountDelta {
                account,
                partition,
                responses,
            })
            .collect()
    }

    /// Forgets a partition's dedupe memory and clock (it moved to another process).
    pub fn forget_partition(&mut self, partition: i32) {
        self.partitions.remove(&partition);
    }

    /// Ids forgotten before their horizon because a partition's filter was full.
    pub fn dedupe_evicted_early(&self) -> u64 {
        self.partitions
            .values()
            .map(|p| p.seen.evicted_early())
            .sum()
    }

    /// The segment catalog (names of segments made so far).
    pub fn catalog(&self) -> &SegmentCatalog {
        &self.catalog
    }
}

/// The dead letter's sentence for an outcome; `time_field` names the event time judged.
fn dead_letter_detail(outcome: &Outcome<'_>, time_field: &str) -> String {
    match outcome {
        Outcome::Invalid(reason) => reason.to_string(),
        Outcome::TooOld => {
            format!("{time_field} is before the start (from) of the longest window")
        }
        Outcome::Future => format!("{time_field} is further ahead of the clock than allowed"),
        Outcome::Accepted(_) | Outcome::Invited(_) | Outcome::Duplicate | Outcome::Resent => {
            String::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ingest(clock: ClockKind) -> Ingest {
        Ingest::new(IngestSpec {
            windows: WindowSpecs::new(&["1h", "24h"], 60, Span::minutes(5)).expect("valid"),
            segments: SegmentSpec::new(&["region"], &[], 10).expect("valid"),
            routing: Routing::new(Default::default(), vec![], "queue"),
            dedupe_horizon: Span::days(1),
            dedupe_capacity: 1000,
            clock,
        })
    }

    fn message(id: &str, score: u8, at: &str) -> Vec<u8> {
        format!(
            r#"{{"response_id":"{id}","score":{score},"responded_at":"{at}","customer_id":"c","segments":{{"region":"east"}}}}"#
        )
        .into_bytes()
    }

    const NOW: &str = "2026-11-22T12:00:00Z";

    fn now() -> Timestamp {
        Timestamp::parse_rfc3339(NOW).expect("ts")
    }

    #[test]
    fn batches_become_one_delta_per_segment_and_partition() {
        let mut ingest = ingest(ClockKind::Wall);
        let d = ingest.process(0, 10, &message("a", 9, "2026-11-22T11:59:30Z"), now());
        assert_eq!((d.outcome, d.alert.is_none()), ("accepted", true));
        let d = ingest.process(0, 11, &message("b", 2, "2026-11-22T11:58:00Z"), now());
        assert_eq!(d.alert.as_ref().map(|a| a.owner.as_str()), Some("queue"));
        let d = ingest.process(1, 4, &message("c", 7, NOW), now());
        assert_eq!(d.outcome, "accepted");
        let deltas = ingest.take_deltas();
        let summary: Vec<(String, i32, Vec<i64>)> = deltas
            .iter()
            .map(|d| {
                (
                    d.segment.clone(),
                    d.partition,
                    d.responses.iter().map(|r| r.0).collect(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                ("all".to_owned(), 0, vec![10, 11]),
                ("all".to_owned(), 1, vec![4]),
                ("region=east".to_owned(), 0, vec![10, 11]),
                ("region=east".to_owned(), 1, vec![4]),
            ]
        );
        // Event times are rounded down to the windows' resolution (1 minute here).
        assert_eq!(deltas[0].responses[0].1, now().millis() - 60_000);
        assert!(ingest.take_deltas().is_empty());
    }

    #[test]
    fn responses_with_an_account_make_account_deltas() {
        let mut ingest = ingest(ClockKind::Wall);
        let with_account = |id: &str, account: &str, score: u8| {
            format!(
                r#"{{"response_id":"{id}","score":{score},"responded_at":"{NOW}","customer_id":"c","account_id":"{account}"}}"#
            )
            .into_bytes()
        };
        ingest.process(0, 1, &with_account("a", "acme", 9), now());
        ingest.process(0, 2, &with_account("b", "acme", 3), now());
        ingest.process(0, 3, &with_account("a", "acme", 3), now()); // duplicate
        ingest.process(1, 1, &with_account("c", "beta", 7), now());
        ingest.process(1, 2, &message("d", 7, NOW), now()); // no account
        type Summary = (String, i32, Vec<(i64, u8)>);
        let deltas: Vec<Summary> = ingest
            .take_account_deltas()
            .into_iter()
            .map(|d| {
                let responses = d.responses.iter().map(|r| (r.0, r.2)).collect();
                (d.account, d.partition, responses)
            })
            .collect();
        assert_eq!(
            deltas,
            [
                ("acme".to_owned(), 0, vec![(1, 9), (2, 3)]),
                ("beta".to_owned(), 1, vec![(1, 7)]),
            ]
        );
        assert!(ingest.take_account_deltas().is_empty());
    }

    #[test]
    fn duplicates_are_judged_per_partition_and_replays_decide_the_same() {
        let mut first = ingest(ClockKind::Wall);
        let mut replay = ingest(ClockKind::Wall);
        let stream = [
            (0, 1, message("a", 9, NOW)),
            (0, 2, message("a", 9, NOW)),
            (1, 1, message("a", 9, NOW)),
            (0, 3, b"not json".to_vec()),
            (0, 4, message("z", 9, "2026-11-20T00:00:00Z")),
        ];
        let outcomes: Vec<&str> = stream
            .iter()
            .map(|(p, o, m)| first.process(*p, *o, m, now()).outcome)
            .collect();
        assert_eq!(
            outcomes,
            ["accepted", "duplicate", "accepted", "invalid", "too_old"]
        );
        let replayed: Vec<Decision> = stream
            .iter()
            .map(|(p, o, m)| replay.process(*p, *o, m, now()))
            .collect();
        let replayed_outcomes: Vec<&str> = replayed.iter().map(|d| d.outcome).collect();
        assert_eq!(replayed_outcomes, outcomes);
        assert_eq!(first.take_deltas(), replay.take_deltas());
        assert_eq!(
            replayed[3].dead_letter.as_ref().map(|d| d.0),
            Some("not_json")
        );
        assert_eq!(
            replayed[4].dead_letter.as_ref().map(|d| d.0),
            Some("too_old")
        );
    }

    #[test]
    fn remembered_messages_make_later_resends_duplicates_and_produce_nothing() {
        let mut restarted = ingest(ClockKind::Wall);
        let source = Source {
            partition: 5,
            offset: 1,
        };
        restarted.remember(0, source, &message("a", 2, NOW), now());
        assert!(
            restarted.take_deltas().is_empty(),
            "remembering counts nothing"
        );
        let resend = restarted.process(0, 9, &message("a", 2, NOW), now());
        assert_eq!((resend.outcome, resend.alert), ("duplicate", None));
        // The same input message forwarded again is no message of its own.
        let again = restarted.process_forwarded(0, 10, source, &message("a", 2, NOW), now());
        assert!(again.is_resent());
        assert!(restarted.take_deltas().is_empty());
        // Memory is per partition.
        assert_eq!(
            restarted
                .process(1, 9, &message("a", 2, NOW), now())
                .outcome,
            "accepted"
        );
    }

    fn invitation(id: &str, at: &str) -> Vec<u8> {
        format!(
            r#"{{"invitation_id":"{id}","customer_id":"c","sent_at":"{at}","segments":{{"region":"east"}}}}"#
        )
        .into_bytes()
    }

    #[test]
    fn invitations_join_the_deltas_with_their_own_duplicate_memory() {
        let mut ingest = ingest(ClockKind::Wall);
        let source = |offset| Source {
            partition: 7,
            offset,
        };
        let sent = "2026-11-22T11:30:00Z";
        let d = ingest.process_invitation(0, 1, source(1), &invitation("a", sent), now());
        assert_eq!(
            (d.outcome, d.alert.is_none(), d.responded.is_none()),
            ("accepted", true, true)
        );
        // A response may have the same id as an invitation: both count.
        assert_eq!(
            ingest.process(0, 2, &message("a", 9, NOW), now()).outcome,
            "accepted"
        );
        let again = ingest.process_invitation(0, 3, source(2), &invitation("a", sent), now());
        assert_eq!((again.outcome, again.dead_letter), ("duplicate", None));
        assert!(ingest
            .process_invitation(0, 4, source(1), &invitation("a", sent), now())
            .is_resent());
        let old = ingest.process_invitation(
            0,
            5,
            source(3),
            &invitation("b", "2026-11-20T00:00:00Z"),
            now(),
        );
        assert_eq!(old.dead_letter.as_ref().map(|d| d.0), Some("too_old"));
        assert!(old
            .dead_letter
            .expect("dead letter")
            .1
            .starts_with("sent_at"));
        let bad = ingest.process_invitation(0, 6, source(4), b"{}", now());
        assert_eq!(bad.dead_letter.map(|d| d.0), Some("missing_field"));
        let late = ingest.process_invitation(1, 1, source(5), &invitation("c", sent), now());
        assert_eq!(late.outcome, "accepted");
        let deltas = ingest.take_deltas();
        let summary: Vec<(&str, i32, usize, Vec<i64>)> = deltas
            .iter()
            .map(|d| {
                (
                    d.segment.as_str(),
                    d.partition,
                    d.responses.len(),
                    d.invitations.iter().map(|i| i.0).collect(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                ("all", 0, 1, vec![1]),
                ("all", 1, 0, vec![1]),
                ("region=east", 0, 1, vec![1]),
                ("region=east", 1, 0, vec![1]),
            ]
        );
        // Remembered after a restart, a re-sent invitation is a duplicate.
        let mut restarted = ingest_for_test();
        restarted.remember_invitation(0, source(1), &invitation("a", sent), now());
        assert_eq!(
            restarted
                .process_invitation(0, 9, source(9), &invitation("a", sent), now())
                .outcome,
            "duplicate"
        );
    }

    fn ingest_for_test() -> Ingest {
        ingest(ClockKind::Wall)
    }

    #[test]
    fn event_time_clock_is_per_partition() {
        let mut ingest = ingest(ClockKind::EventTime);
        let wall = Timestamp(0); // the wall clock plays no part
        assert_eq!(
            ingest.process(0, 1, &message("a", 9, NOW), wall).outcome,
            "accepted"
        );
        let day_before = message("b", 9, "2026-11-21T11:00:00Z");
        assert_eq!(ingest.process(0, 2, &day_before, wall).outcome, "too_old");
        assert_eq!(ingest.process(1, 1, &day_before, wall).outcome, "accepted");
        ingest.forget_partition(0);
        let day_before_again = message("c", 9, "2026-11-21T11:00:00Z");
        assert_eq!(
            ingest.process(0, 3, &day_before_again, wall).outcome,
            "accepted"
        );
    }
}
