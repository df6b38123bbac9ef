//! The followup role: closed-loop follow-up cases on Kafka, in two steps on one consumer group
//! (like ingest):
//!
//! 1. Repartition. Detractor alerts (`npsflow.followups`, keyed by customer) are forwarded
//!    as they are to the internal topic `npsflow.followup-events`, on the partition of their
//!    `case_id` (`alert_id`); outcome events (`npsflow.followup-outcomes`) are validated,
//!    invalid ones dead-lettered byte-for-byte, valid ones forwarded to the partition of their
//!    `case_id`. The ingest role adds a small `responded` notice, on the partition of the
//!    `customer_id`, for every accepted response ([`push_notice`]). Items are bundled (one
//!    record per partition and batch, [`crate::bundle`]); each item's first byte says what it
//!    is (`a` alert, `o` outcome event, `n` notice).
//! 2. Decide. A partition of the internal topic owns the cases whose `case_id` hashes to it
//!    and the recovery watches of the customers whose `customer_id` does: a [`CaseBook`] per
//!    partition (the core's state machine). When a case closes, a `case_closed` notice goes
//!    to the customer's partition; the customer's next response there sends a `recovery`
//!    notice back to the case's partition.
//!
//! State, per internal partition `p` (written to partition `p` of each topic, so it is
//! co-partitioned): every case on the compacted `npsflow.cases` (tombstoned after
//! `followup.closed_retention`), outcomes waiting for their case and recovery watches on the
//! compacted `npsflow.followup-state`, escalation notices on `npsflow.escalations`. On
//! assignment all three are read back; the last escalation notices of the partition are read
//! too, so that an escalation sent just before a crash (whose case record was not written yet)
//! is never sent again. The engine stores input offsets only after all of a batch's records
//! are delivered, and at least once it delivers the state records (cases, follow-up state)
//! after the others ([`Outgoing::in_round`]), and outcomes kept for unknown cases after the
//! cases (which may have taken them in): a crash between them leaves the state as
//! it was before the batch, so the replay from the last commit decides the batch again with
//! everything it consumed (an alert's waiting outcomes, a customer's watches). An outcome
//! record left by a crash between two state records, for a case already written, is dropped
//! when read back and tombstoned. With `processing.guarantee = exactly_once` a batch is one
//! transaction.
//!
//! Deadlines are timers: [`RoleMachine::poll_timeout`] is the earliest deadline of any case,
//! and the engine fires it on the wall clock with no traffic. With `windows.clock =
//! event_time` (replays), "now" is the largest event time seen, and deadlines fire as it
//! passes them.

use std::collections::{BTreeMap, BTreeSet};

use npsflow_core::case::EscalationNotice;
use npsflow_core::{
    decode_alert, decode_outcome, CaseBook, Effect, FollowupNotice, FollowupPolicy, Timestamp,
};
use rdkafka::message::Headers;
use rdkafka::Message;
use tokio::sync::watch;

use crate::bundle::{self, Bundler};
use crate::config::{ClockKind, Config, TopicSettings};
use crate::engine::{Binding, Engine, RoleMachine, TopicPartition};
use crate::envelope::{headers, Received};
use crate::kafka::Outgoing;
use crate::metrics::{events, Metrics};
use crate::state::{StateRead, StoredRecord};
use crate::RuntimeError;

/// The role's name in logs, metrics and health.
pub const ROLE: &str = "followup";

/// How many of the last escalation notices of a partition are read back on assignment.
pub const ESCALATIONS_READ_BACK: i64 = 10_000;

/// What an item on the internal topic carries: its first byte (records written before
/// bundles carried one item and said what it was in the header `npsflow-kind`).
mod kind {
    pub const ALERT: u8 = b'a';
    pub const OUTCOME: u8 = b'o';
    pub const NOTICE: u8 = b'n';

    /// The kind named by a pre-bundle record's `npsflow-kind` header.
    pub fn from_header(value: &[u8]) -> Option<u8> {
        match value {
            b"alert" => Some(ALERT),
            b"outcome" => Some(OUTCOME),
            b"notice" => Some(NOTICE),
            _ => None,
        }
    }
}

/// The delivery round ([`Outgoing::in_round`]) of a batch's cases and recovery watches: after
/// its notices and escalations.
const STATE_ROUND: u8 = 1;
/// The delivery round of the outcome events kept for unknown cases: after the cases that may
/// have taken them in.
const CONSUMED_ROUND: u8 = 2;

/// Keys on the follow-up state topic.
const ORPHANS_PREFIX: &str = "orphans/";
const WATCH_PREFIX: &str = "watch/";

/// Bundles for the internal topic, which has `partitions` partitions.
pub fn notice_bundler(topics: &TopicSettings, partitions: i32) -> Bundler {
    Bundler::new(&topics.followup_events, partitions, bundle::TARGET_BYTES)
}

/// A notice for the internal topic, on the partition of its case or customer.
pub fn push_notice(bundler: &mut Bundler, notice: &FollowupNotice, out: &mut Vec<Outgoing>) {
    bundler.push_keyed(notice.key().as_bytes(), out, |w| {
        w.push(kind::NOTICE);
        w.extend_from_slice(&notice.to_json());
    });
}

/// The cases this process owns, by internal partition; shared with `/metrics`.
pub use crate::metrics::CaseBooks;

/// The followup role as a state machine.
pub struct FollowupRole {
    topics: TopicSettings,
    policy: FollowupPolicy,
    books: CaseBooks,
    metrics: Metrics,
    clock: ClockKind,
    /// The largest event time seen (the clock with `windows.clock = event_time`).
    event_now: Timestamp,
    /// Alerts, outcome events and notices on their way to the internal topic.
    forwarded: Bundler,
}

/// The kind a pre-bundle record of the internal topic names in its header.
fn kind_of<M: Message>(message: &M) -> Option<u8> {
    message
        .headers()?
        .iter()
        .find(|h| h.key == headers::KIND)
        .and_then(|h| kind::from_header(h.value?))
}

impl FollowupRole {
    /// The role for `config`, keeping its cases in `books`; its internal topic has
    /// `partitions` partitions.
    pub fn new(
        config: &Config,
        partitions: i32,
        books: CaseBooks,
        metrics: Metrics,
    ) -> FollowupRole {
        FollowupRole {
            forwarded: notice_bundler(&config.settings.topics, partitions),
            topics: config.settings.topics.clone(),
            policy: config.followup.clone(),
            books,
            metrics,
            clock: config.settings.windows.clock,
            event_now: Timestamp(i64::MIN),
        }
    }

    /// How the role meets Kafka: one group reading the alerts, the outcome events and its
    /// internal topic.
    pub fn binding(config: &Config) -> Binding {
        let topics = &config.settings.topics;
        Binding {
            role: ROLE,
            group: config.settings.kafka.followup_group.clone(),
            topics: vec![
                topics.followups.clone(),
                topics.followup_outcomes.clone(),
                topics.followup_events.clone(),
            ],
            transactional: true,
        }
    }

    fn books(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<i32, CaseBook>> {
        self.books.write().unwrap_or_else(|e| e.into_inner())
    }

    /// "Now" for deadlines: the engine's clock, or the largest event time seen.
    fn now(&self, wall: Timestamp) -> Timestamp {
        match self.clock {
            ClockKind::Wall => wall,
            ClockKind::EventTime => self.event_now,
        }
    }

    fn saw_event_time(&mut self, at: Timestamp) {
        self.event_now = self.event_now.max(at);
    }

    /// Step 1 for a message of an input topic.
    fn repartition<M: Message>(&mut self, message: &M, out: &mut Vec<Outgoing>) {
        let topics = &self.topics;
        let payload = message.payload().unwrap_or_default();
        let forwarded = &mut self.forwarded;
        let mut forward = |key: &str, kind: u8, out: &mut Vec<Outgoing>| {
            forwarded.push_keyed(key.as_bytes(), out, |w| {
                w.push(kind);
                w.extend_from_slice(payload);
            });
        };
        if message.topic() == topics.followups {
            match decode_alert(payload) {
                Ok(alert) => {
                    forward(&alert.alert_id, kind::ALERT, out);
                    events::FollowupInput {
                        kind: "alert",
                        result: "forwarded",
                        count: 1,
                    }
                    .emit(&self.metrics);
                }
                Err(reason) => self.dead_letter(message, "alert", &reason, out),
            }
        } else if message.topic() == topics.followup_outcomes {
            match decode_outcome(payload) {
                Ok(event) => {
                    forward(&event.case_id, kind::OUTCOME, out);
                    events::FollowupInput {
                        kind: "outcome",
                        result: "forwarded",
                        count: 1,
                    }
                    .emit(&self.metrics);
                }
                Err(reason) => self.dead_letter(message, "outcome", &reason, out),
            }
        }
    }

    fn dead_letter<M: Message>(
        &self,
        message: &M,
        kind: &'static str,
        reason: &npsflow_core::InvalidOutcome,
        out: &mut Vec<Outgoing>,
    ) {
        let code = reason.code();
        events::FollowupInput {
            kind,
            result: "invalid",
            count: 1,
        }
        .emit(&self.metrics);
        events::DeadLettered { reason: code }.emit(&self.metrics);
        out.push(Received::direct(message).dead_letter(
            &self.topics.dead_letters,
            code,
            &reason.to_string(),
        ));
    }

    /// Step 2 for a record of the internal topic: each item in it, in order.
    fn decide<M: Message>(
        &mut self,
        message: &M,
        wall: Timestamp,
        effects: &mut Vec<(i32, Effect)>,
    ) {
        let payload = message.payload().unwrap_or_default();
        let items: Vec<(Option<u8>, &[u8])> = if bundle::is_bundle(payload) {
            bundle::items(payload)
                .unwrap_or_default()
                .into_iter()
                .map(|item| match item.split_first() {
                    Some((kind, rest)) => (Some(*kind), rest),
                    None => (None, item),
                })
                .collect()
        } else {
            vec![(kind_of(message), payload)]
        };
        for (kind, item) in items {
            if let Err(error) = self.decide_one(message.partition(), kind, item, wall, effects) {
                events::UnreadableRecord {
                    topic: message.topic(),
                    partition: message.partition(),
                    offset: message.offset(),
                    error: &error,
                }
                .emit(&self.metrics);
            }
        }
    }

    /// Step 2 for one item: the partition's book decides.
    fn decide_one(
        &mut self,
        partition: i32,
        kind: Option<u8>,
        payload: &[u8],
        wall: Timestamp,
        effects: &mut Vec<(i32, Effect)>,
    ) -> Result<(), UnreadableItem> {
        enum Input {
            Alert(npsflow_core::CaseAlert),
            Outcome(npsflow_core::OutcomeEvent),
            Notice(FollowupNotice),
        }
        let input = match kind {
            Some(kind::ALERT) => decode_alert(payload)
                .map(Input::Alert)
                .map_err(UnreadableItem::Alert),
            Some(kind::OUTCOME) => decode_outcome(payload)
                .map(Input::Outcome)
                .map_err(UnreadableItem::Outcome),
            Some(kind::NOTICE) => FollowupNotice::from_json(payload)
                .map(Input::Notice)
                .map_err(UnreadableItem::Notice),
            _ => Err(UnreadableItem::UnknownKind),
        }?;
        let event_time = match &input {
            Input::Alert(alert) => Some(alert.responded_at),
            Input::Outcome(event) => Some(event.occurred_at),
            Input::Notice(FollowupNotice::Responded { responded_at, .. }) => Some(*responded_at),
            Input::Notice(_) => None,
        };
        if let Some(at) = event_time {
            self.saw_event_time(at);
        }
        let now = self.now(wall);
        let mut out = Vec::new();
        {
            let policy = &self.policy;
            let mut books = self.books.write().unwrap_or_else(|e| e.into_inner());
            let book = books.entry(partition).or_default();
            match input {
                Input::Alert(alert) => book.open(alert, policy, now, &mut out),
                Input::Outcome(event) => {
                    book.apply(event, policy, now, &mut out);
                    let applied = !out
                        .iter()
                        .any(|e| matches!(e, Effect::Duplicate(_) | Effect::OrphanKept));
                    if applied {
                        events::FollowupInput {
                            kind: "outcome",
                            result: "applied",
                            count: 1,
                        }
                        .emit(&self.metrics);
                    }
                }
                Input::Notice(notice) => book.handle_notice(notice, policy, &mut out),
            }
        }
        effects.extend(out.into_iter().map(|e| (partition, e)));
        Ok(())
    }

    /// What restores left to write ([`CaseBook::write_repairs`]): escalations missing from
    /// their case's record (their notice was read back) or unconfirmed in a record of an
    /// earlier version, and outcome events kept for cases that have their record.
    fn write_repairs(&mut self) -> Vec<(i32, Effect)> {
        let mut effects = Vec::new();
        for (partition, book) in self.books().iter_mut() {
            let mut out = Vec::new();
            book.write_repairs(&mut out);
            effects.extend(out.into_iter().map(|e| (*partition, e)));
        }
        effects
    }

    /// Turns what the books decided into records and metrics. A case, orphan list or watch
    /// changed several times in one batch is written once, as it is now.
    fn emit(&mut self, effects: Vec<(i32, Effect)>, out: &mut Vec<Outgoing>) {
        let topics = &self.topics;
        let metrics = &self.metrics;
        let mut cases = BTreeSet::new();
        let mut orphans = BTreeSet::new();
        let mut watches = BTreeSet::new();
        for (partition, effect) in effects {
            match effect {
                Effect::CaseChanged(id) => {
                    cases.insert((partition, id));
                }
                Effect::OrphansChanged(id) => {
                    orphans.insert((partition, id));
                }
                Effect::WatchChanged(id) => {
                    watches.insert((partition, id));
                }
                Effect::Opened => {
                    events::CaseOpened.emit(metrics);
                    events::FollowupInput {
                        kind: "alert",
                        result: "applied",
                        count: 1,
                    }
                    .emit(metrics);
                }
                Effect::Duplicate(kind) => events::FollowupInput {
                    kind: if kind == "alert" { "alert" } else { "outcome" },
                    result: "duplicate",
                    count: 1,
                }
                .emit(metrics),
                Effect::OrphanKept => events::FollowupInput {
                    kind: "outcome",
                    result: "kept",
                    count: 1,
                }
                .emit(metrics),
                Effect::OrphansExpired(count) => events::FollowupInput {
                    kind: "outcome",
                    result: "expired",
                    count: count as u64,
                }
                .emit(metrics),
                Effect::Escalated(notice) => {
                    events::CaseEscalated {
                        case_id: &notice.case_id,
                        level: notice.level,
                        reason: notice.reason.as_str(),
                    }
                    .emit(metrics);
                    out.push(Outgoing::new(
                        &topics.escalations,
                        Some(partition),
                        Some(notice.case_id.clone().into_bytes()),
                        Some(serde_json::to_vec(&*notice).expect("a notice serialises")),
                        None,
                    ));
                }
                Effect::FirstContact {
                    seconds,
                    within_sla,
                } => events::CaseFirstContact {
                    seconds,
                    within_sla,
                }
                .emit(metrics),
                Effect::Closed {
                    resolution,
                    within_sla,
                    seconds,
                } => events::CaseClosed {
                    resolution: resolution.map_or("none", |r| r.as_str()),
                    within_sla,
                    seconds,
                }
                .emit(metrics),
                Effect::Notice(notice) => push_notice(&mut self.forwarded, &notice, out),
                Effect::RecoveryDecided(result) => events::RecoveryDecided {
                    result: result.as_str(),
                }
                .emit(metrics),
            }
        }
        let books = self.books.read().unwrap_or_else(|e| e.into_inner());
        // State records go after the batch's other records (notices, escalations): a crash
        // in between leaves the state as before the batch, and the replay remakes them. The
        // outcome events kept for cases go after the cases (which take them in): a replay
        // that found them removed, and its case not written, opened the case without them
        // (chaos --long; the cases of a batch go out in key order, and a SIGKILL during them
        // left 365 cases open). The other way round, what is read back for a known case is
        // dropped.
        let record = |topic: &str, partition: i32, key: String, value: Option<Vec<u8>>, round| {
            Outgoing::new(topic, Some(partition), Some(key.into_bytes()), value, None)
                .in_round(round)
        };
        for (partition, id) in cases {
            let value = books
                .get(&partition)
                .and_then(|b| b.case(&id))
                .map(|case| serde_json::to_vec(case).expect("a case serialises"));
            out.push(record(&topics.cases, partition, id, value, STATE_ROUND));
        }
        for (partition, id) in orphans {
            let value = books
                .get(&partition)
                .and_then(|b| b.orphans(&id))
                .map(|kept| serde_json::to_vec(kept).expect("orphans serialise"));
            out.push(record(
                &topics.followup_state,
                partition,
                format!("{ORPHANS_PREFIX}{id}"),
                value,
                CONSUMED_ROUND,
            ));
        }
        for (partition, id) in watches {
            let value = books
                .get(&partition)
                .and_then(|b| b.watches(&id))
                .map(|w| serde_json::to_vec(w).expect("watches serialise"));
            out.push(record(
                &topics.followup_state,
                partition,
                format!("{WATCH_PREFIX}{id}"),
                value,
                STATE_ROUND,
            ));
        }
    }
}

/// Why an item of the internal topic could not be decided (a record this version did not
/// write, or damaged): it is reported and skipped.
#[derive(Debug, thiserror::Error)]
enum UnreadableItem {
    #[error("a detractor alert: {0}")]
    Alert(npsflow_core::InvalidOutcome),
    #[error("an outcome event: {0}")]
    Outcome(npsflow_core::InvalidOutcome),
    #[error("a notice: {0}")]
    Notice(serde_json::Error),
    #[error("an item of unknown kind")]
    UnknownKind,
}

/// Of the records read back from a compacted topic (compaction may not have run yet), the
/// last per key, tombstones removing.
fn latest(records: Vec<StoredRecord>) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let mut latest = BTreeMap::new();
    for record in records {
        let Some(key) = record.key else { continue };
        match record.payload {
            Some(value) => {
                latest.insert(key, value);
            }
            None => {
                latest.remove(&key);
            }
        }
    }
    latest
}

impl RoleMachine for FollowupRole {
    fn handle_assigned(&mut self, partitions: &[TopicPartition]) -> Vec<StateRead> {
        let mut reads = Vec::new();
        let mut books = self.books();
        for (topic, partition) in partitions {
            if *topic != self.topics.followup_events {
                continue;
            }
            books.insert(*partition, CaseBook::new());
            let partition = *partition;
            reads.push(StateRead::Whole {
                topic: self.topics.cases.clone(),
                partition,
            });
            reads.push(StateRead::Whole {
                topic: self.topics.followup_state.clone(),
                partition,
            });
            reads.push(StateRead::Tail {
                topic: self.topics.escalations.clone(),
                partition,
                count: ESCALATIONS_READ_BACK,
            });
        }
        reads
    }

    fn handle_restored(&mut self, read: &StateRead, records: Vec<StoredRecord>, _now: Timestamp) {
        let partition = read.partition();
        let (topic, metrics, policy) = (read.topic(), self.metrics.clone(), self.policy.clone());
        let unreadable = |offset: i64, error: &dyn std::fmt::Display| {
            events::UnreadableRecord {
                topic,
                partition,
                offset,
                error,
            }
            .emit(&metrics)
        };
        let mut books = self.books();
        let book = books.entry(partition).or_default();
        if topic == self.topics.cases {
            for (_, value) in latest(records) {
                match serde_json::from_slice(&value) {
                    Ok(case) => book.restore_case(case, &policy),
                    Err(error) => unreadable(-1, &error),
                }
            }
        } else if topic == self.topics.followup_state {
            for (key, value) in latest(records) {
                let key = String::from_utf8_lossy(&key).into_owned();
                let restored = if let Some(case_id) = key.strip_prefix(ORPHANS_PREFIX) {
                    serde_json::from_slice(&value)
                        .map(|kept| book.restore_orphans(case_id.to_owned(), kept))
                } else if let Some(customer) = key.strip_prefix(WATCH_PREFIX) {
                    serde_json::from_slice(&value)
                        .map(|w| book.restore_watches(customer.to_owned(), w, &policy))
                } else {
                    Ok(())
                };
                if let Err(error) = restored {
                    unreadable(-1, &error);
                }
            }
        } else {
            // The last notices sent: an escalation the case's record does not know yet is
            // recorded; one recorded but never sent is forgotten, to fire again.
            let mut sent = BTreeSet::new();
            for record in records {
                let Some(value) = record.payload else {
                    continue;
                };
                match serde_json::from_slice::<EscalationNotice>(&value) {
                    Ok(notice) => {
                        book.restore_escalation(&notice, &policy);
                        sent.insert((notice.case_id, notice.level));
                    }
                    Err(error) => unreadable(record.offset, &error),
                }
            }
            book.reconcile_escalations(&sent, &policy);
        }
    }

    fn handle_revoked(&mut self, partitions: &[TopicPartition]) {
        let mut books = self.books();
        for (topic, partition) in partitions {
            if *topic == self.topics.followup_events {
                books.remove(partition);
            }
        }
    }

    fn handle_messages<M: Message>(
        &mut self,
        messages: &[M],
        now: Timestamp,
        out: &mut Vec<Outgoing>,
    ) {
        let mut effects = self.write_repairs();
        for message in messages {
            if message.topic() == self.topics.followup_events {
                self.decide(message, now, &mut effects);
            } else {
                self.repartition(message, out);
            }
        }
        if !effects.is_empty() {
            self.emit(effects, out);
        }
        self.forwarded.finish(out);
    }

    fn poll_timeout(&self) -> Option<Timestamp> {
        let books = self.books.read().unwrap_or_else(|e| e.into_inner());
        if books.values().any(CaseBook::has_repairs) {
            return Some(Timestamp(i64::MIN));
        }
        let due = books.values().filter_map(CaseBook::poll_timeout).min()?;
        match self.clock {
            ClockKind::Wall => Some(due),
            // Event time moves only with events: due now if it has passed, else not yet.
            ClockKind::EventTime => (due <= self.event_now).then_some(Timestamp(i64::MIN)),
        }
    }

    fn handle_timeout(&mut self, wall: Timestamp, out: &mut Vec<Outgoing>) {
        let now = self.now(wall);
        let mut effects = self.write_repairs();
        {
            let policy = &self.policy;
            let mut books = self.books.write().unwrap_or_else(|e| e.into_inner());
            for (partition, book) in books.iter_mut() {
                let mut fired = Vec::new();
                book.handle_timeout(now, policy, &mut fired);
                effects.extend(fired.into_iter().map(|e| (*partition, e)));
            }
        }
        if !effects.is_empty() {
            self.emit(effects, out);
        }
        self.forwarded.finish(out);
    }
}

/// Runs the followup role on `engine` until `shutdown` turns true, after checking that its
/// state topics are co-partitioned with its internal topic.
pub async fn run(
    engine: Engine,
    books: CaseBooks,
    shutdown: watch::Receiver<bool>,
) -> Result<(), RuntimeError> {
    let kafka = engine.config.settings.kafka.clone();
    let topics = engine.config.settings.topics.clone();
    let (metrics, stop) = (engine.metrics.clone(), shutdown.clone());
    let partitions = tokio::task::spawn_blocking(move || {
        let states = [
            topics.cases.as_str(),
            topics.followup_state.as_str(),
            topics.escalations.as_str(),
        ];
        let checked = crate::state::wait_for_copartitioned(
            &kafka,
            ROLE,
            &topics.followup_events,
            &states,
            &metrics,
            &stop,
        )?;
        if !checked {
            return Ok(None);
        }
        crate::state::wait_for_partition_counts(
            &kafka,
            ROLE,
            &[&topics.followup_events],
            &metrics,
            &stop,
        )
    })
    .await??;
    let Some(partitions) = partitions else {
        return Ok(());
    };
    let role = FollowupRole::new(&engine.config, partitions[0], books, engine.metrics.clone());
    let binding = FollowupRole::binding(&engine.config);
    engine.drive(role, binding, shutdown).await
}

#[cfg(test)]
mod tests {
    use rdkafka::message::OwnedMessage;

    use super::*;

    const HOUR: i64 = 3_600_000;
    const T0: i64 = 1_800_000_000_000;

    fn role(env: &[(&str, &str)]) -> (FollowupRole, TopicSettings) {
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        let config = Config::load(None, env).expect("valid");
        let topics = config.settings.topics.clone();
        (
            FollowupRole::new(&config, PARTITIONS, CaseBooks::default(), Metrics::new()),
            topics,
        )
    }

    /// The internal topic's partitions in these tests.
    const PARTITIONS: i32 = 3;

    /// One item of `kind`, bundled as the role writes it.
    fn bundled(kind: u8, payload: &[u8]) -> Vec<u8> {
        let mut bundler = Bundler::new("events", 1, 1 << 20);
        let mut out = Vec::new();
        bundler.push(0, &mut out, |w| {
            w.push(kind);
            w.extend_from_slice(payload);
        });
        bundler.finish(&mut out);
        out.remove(0).payload.expect("a bundle")
    }

    /// A record of `topic`: on the internal topic (`kind` given), a bundle of one item.
    fn message(
        topic: &str,
        partition: i32,
        key: &str,
        payload: &[u8],
        kind: Option<u8>,
    ) -> OwnedMessage {
        let payload = match kind {
            Some(kind) => bundled(kind, payload),
            None => payload.to_vec(),
        };
        OwnedMessage::new(
            Some(payload),
            Some(key.as_bytes().to_vec()),
            topic.to_owned(),
            rdkafka::Timestamp::NotAvailable,
            partition,
            0,
            None,
        )
    }

    fn alert(case_id: &str, responded_at: i64) -> Vec<u8> {
        format!(
            r#"{{"alert_id":"{case_id}","kind":"detractor","response_id":"r","customer_id":"c","owner":"ann","route":"default","score":5,"severity":"medium","segments":{{}},"responded_at":"{}","emitted_at":"{}"}}"#,
            Timestamp(responded_at).to_rfc3339(),
            Timestamp(responded_at).to_rfc3339()
        )
        .into_bytes()
    }

    /// Step 1 on its own: alerts and valid outcome events are forwarded, as received, to the
    /// partition of their case (bundled, each item marked with its kind); invalid ones are
    /// dead-lettered byte for byte.
    #[test]
    fn the_repartition_step_forwards_by_case() {
        let (mut role, topics) = role(&[]);
        let bad = br#"{"event_id":"e","case_id":"c","type":"teleported","occurred_at":"2026-11-22T12:00:00Z"}"#;
        let good = br#"{"event_id":"e","case_id":"det-1","type":"note","occurred_at":"2026-11-22T12:00:00Z"}"#;
        let the_alert = alert("det-1", T0);
        let mut out = Vec::new();
        role.handle_messages(
            &[
                message(&topics.followups, 0, "cust", &the_alert, None),
                message(&topics.followup_outcomes, 0, "k", good, None),
                message(&topics.followup_outcomes, 0, "k", bad, None),
            ],
            Timestamp(T0),
            &mut out,
        );
        let summary: Vec<(&str, Option<i32>)> = out
            .iter()
            .map(|r| (r.topic.as_str(), r.partition))
            .collect();
        let case_partition = bundle::partition_for_key(b"det-1", PARTITIONS);
        assert_eq!(
            summary,
            [
                (topics.dead_letters.as_str(), None),
                (topics.followup_events.as_str(), Some(case_partition)),
            ]
        );
        assert_eq!(
            out[0].payload.as_deref(),
            Some(&bad[..]),
            "dead letter byte for byte"
        );
        assert_eq!(out[0].key.as_deref(), Some(&b"k"[..]));
        let items = bundle::items(out[1].payload.as_deref().expect("a bundle")).expect("items");
        let mut want_alert = vec![kind::ALERT];
        want_alert.extend_from_slice(&the_alert);
        let mut want_outcome = vec![kind::OUTCOME];
        want_outcome.extend_from_slice(good);
        assert_eq!(
            items,
            [&want_alert[..], &want_outcome[..]],
            "forwarded as received, in order"
        );
    }

    /// Items of a bundle that cannot be decided (an unknown kind, a damaged notice) are each
    /// reported as an unreadable record and skipped; the bundle's other items are decided.
    #[test]
    fn unreadable_items_are_reported_and_skipped() {
        let (mut role, topics) = role(&[]);
        let internal = topics.followup_events.clone();
        for read in role.handle_assigned(&[(internal.clone(), 0)]) {
            role.handle_restored(&read, Vec::new(), Timestamp(T0));
        }
        let mut bundler = Bundler::new(&internal, 1, 1 << 20);
        let mut out = Vec::new();
        let items: [(u8, &[u8]); 3] = [
            (b'x', b"{}"),
            (kind::NOTICE, b"{\"kind\":"),
            (kind::ALERT, &alert("det-7", T0)),
        ];
        for (kind, payload) in items {
            bundler.push(0, &mut out, |w| {
                w.push(kind);
                w.extend_from_slice(payload);
            });
        }
        bundler.finish(&mut out);
        let record = OwnedMessage::new(
            out.remove(0).payload,
            Some(b"det-7".to_vec()),
            internal,
            rdkafka::Timestamp::NotAvailable,
            0,
            0,
            None,
        );
        let mut out = Vec::new();
        role.handle_messages(&[record], Timestamp(T0), &mut out);
        let unreadable = events::UnreadableRecord::NAME;
        assert_eq!(role.metrics.warning_count(unreadable), 2);
        assert_eq!(role.metrics.cases_opened(), 1, "the good item is decided");
    }

    /// A record of the internal topic written before bundles (one item, its kind in the
    /// `npsflow-kind` header) is still read.
    #[test]
    fn records_from_before_bundles_are_read() {
        let (mut role, topics) = role(&[]);
        let events = topics.followup_events.clone();
        for read in role.handle_assigned(&[(events.clone(), 0)]) {
            role.handle_restored(&read, Vec::new(), Timestamp(T0));
        }
        let header = rdkafka::message::OwnedHeaders::new().insert(rdkafka::message::Header {
            key: headers::KIND,
            value: Some(&b"alert"[..]),
        });
        let legacy = OwnedMessage::new(
            Some(alert("det-9", T0)),
            Some(b"det-9".to_vec()),
            events,
            rdkafka::Timestamp::NotAvailable,
            0,
            0,
            Some(header),
        );
        let mut out = Vec::new();
        role.handle_messages(&[legacy], Timestamp(T0), &mut out);
        assert_eq!(role.metrics.cases_opened(), 1);
        assert!(out.iter().any(|r| r.topic == topics.cases));
    }

    /// A crash between a batch's case round and its kept-outcomes round leaves both records:
    /// read back, the kept outcomes of a known case are dropped and their record tombstoned
    /// by the next timer, in the kept-outcomes round.
    #[test]
    fn kept_outcomes_read_back_for_a_known_case_are_tombstoned() {
        let (mut written, topics) = role(&[]);
        let events = topics.followup_events.clone();
        let assigned = [(events.clone(), 0)];
        for read in written.handle_assigned(&assigned) {
            written.handle_restored(&read, Vec::new(), Timestamp(T0));
        }
        let outcome = format!(
            r#"{{"event_id":"e1","case_id":"det-1","type":"contacted","occurred_at":"{}"}}"#,
            Timestamp(T0 + HOUR).to_rfc3339()
        );
        let mut kept = Vec::new();
        let item = message(&events, 0, "det-1", outcome.as_bytes(), Some(kind::OUTCOME));
        written.handle_messages(&[item], Timestamp(T0), &mut kept);
        let mut opened = Vec::new();
        let item = message(&events, 0, "det-1", &alert("det-1", T0), Some(kind::ALERT));
        written.handle_messages(&[item], Timestamp(T0), &mut opened);
        let stored = |records: &[Outgoing], topic: &str| -> Vec<StoredRecord> {
            records
                .iter()
                .filter(|r| r.topic == topic && r.payload.is_some())
                .map(|r| StoredRecord {
                    offset: 0,
                    key: r.key.clone(),
                    payload: r.payload.clone(),
                })
                .collect()
        };
        let cases = stored(&opened, &topics.cases);
        let orphans = stored(&kept, &topics.followup_state);
        assert_eq!((cases.len(), orphans.len()), (1, 1));

        let (mut restored, _) = role(&[]);
        for read in restored.handle_assigned(&assigned) {
            let records = match read.topic() {
                t if t == topics.cases => cases.clone(),
                t if t == topics.followup_state => orphans.clone(),
                _ => Vec::new(),
            };
            restored.handle_restored(&read, records, Timestamp(T0));
        }
        assert_eq!(
            restored.poll_timeout(),
            Some(Timestamp(i64::MIN)),
            "due now"
        );
        let mut out = Vec::new();
        restored.handle_timeout(Timestamp(T0 + 2 * HOUR), &mut out);
        let tombstones: Vec<&Outgoing> = out
            .iter()
            .filter(|r| r.topic == topics.followup_state)
            .collect();
        assert_eq!(tombstones.len(), 1, "{out:?}");
        assert_eq!(tombstones[0].key.as_deref(), Some(&b"orphans/det-1"[..]));
        assert_eq!(tombstones[0].payload, None);
        assert_eq!(tombstones[0].round, CONSUMED_ROUND);
        assert_eq!(
            restored.poll_timeout().map(|t| t > Timestamp(T0)),
            Some(true)
        );
    }

    /// With `windows.clock = event_time` (a replay), deadlines fire as event time passes them,
    /// not on the wall clock: nothing fires however late the wall clock is, until an event
    /// later than the deadline is seen.
    #[test]
    fn in_event_time_deadlines_fire_as_event_time_passes() {
        let (mut role, topics) = role(&[
            ("NPSFLOW__WINDOWS__CLOCK", "event_time"),
            ("NPSFLOW__FOLLOWUP__ESCALATE_SCORES", ""),
        ]);
        let events = topics.followup_events.clone();
        let reads = role.handle_assigned(&[(events.clone(), 0)]);
        assert_eq!(
            reads.len(),
            3,
            "cases, follow-up state, escalations: {reads:?}"
        );
        for read in &reads {
            role.handle_restored(read, Vec::new(), Timestamp(T0));
        }
        let wall_much_later = Timestamp(T0 + 1000 * HOUR);
        let mut out = Vec::new();
        role.handle_messages(
            &[message(
                &events,
                0,
                "det-1",
                &alert("det-1", T0),
                Some(kind::ALERT),
            )],
            wall_much_later,
            &mut out,
        );
        assert_eq!(
            role.poll_timeout(),
            None,
            "event time has not reached the deadline"
        );
        // An outcome of another case, 49 hours on in event time, moves the clock past 48 h.
        let note = format!(
            r#"{{"event_id":"n","case_id":"det-2","type":"note","occurred_at":"{}"}}"#,
            Timestamp(T0 + 49 * HOUR).to_rfc3339()
        );
        role.handle_messages(
            &[message(
                &events,
                0,
                "det-2",
                note.as_bytes(),
                Some(kind::OUTCOME),
            )],
            wall_much_later,
            &mut out,
        );
        assert!(role
            .poll_timeout()
            .is_some_and(|due| due <= wall_much_later));
        out.clear();
        role.handle_timeout(wall_much_later, &mut out);
        let escalations: Vec<&Outgoing> = out
            .iter()
            .filter(|r| r.topic == topics.escalations)
            .collect();
        assert_eq!(escalations.len(), 1);
        let notice: serde_json::Value =
            serde_json::from_slice(escalations[0].payload.as_deref().expect("payload"))
                .expect("json");
        assert_eq!(notice["level"], 1);
        assert_eq!(
            notice["escalated_at"],
            Timestamp(T0 + 49 * HOUR).to_rfc3339(),
            "escalated at event time"
        );
        assert!(out
            .iter()
            .any(|r| r.topic == topics.cases && r.partition == Some(0)));
    }
}
