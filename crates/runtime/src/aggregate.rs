//! The aggregate role: consumes segment deltas and owns the rolling windows of the segments
//! on its assigned partitions, in the shared [`AggregateView`] that `/metrics` and
//! `/v1/segments` read. Per batch it applies what was not applied before and writes the
//! snapshot of every segment the batch touched to the state topic (same partition number);
//! It also publishes every summary it serves (each segment in each window, with its change
//! and response rate) to the compacted view topic `npsflow.segment-nps`, keyed
//! `<window>|<segment>`, from which every instance answers `/v1/segments`: after a batch,
//! the segments it touched; and on a timer at every step of any window (windows drain as
//! time passes, with no new response), whatever changed since it was last published.
//! Records keyed `account/<account_id>` on the deltas and state topics are accounts'
//! ([`crate::accounts`]): applied, snapshotted and published the same way, to their own view
//! topic `npsflow.account-nps`.
//! The engine stores the deltas' offsets only after those snapshots are delivered (with
//! `processing.guarantee = exactly_once`, snapshots and offsets are one transaction per deltas
//! partition, so a process that lost the partition cannot overwrite its new owner's
//! snapshots). A newly assigned partition is restored from its state partition before any
//! delta of it is applied.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, RwLock};

use npsflow_core::{AccountDelta, SegmentDelta, SegmentSnapshot, Timestamp, WindowSummary};
use rdkafka::Message;
use tokio::sync::watch;

use crate::accounts::{is_account_key, OwnedAccounts};
use crate::config::{ClockKind, Config, TopicSettings};
use crate::engine::{Binding, Engine, RoleMachine, TopicPartition};
use crate::kafka::Outgoing;
use crate::metrics::{events, Metrics};
use crate::state::{latest_snapshots, StateRead, StoredRecord};
use crate::view::{AggregateView, Row};
use crate::RuntimeError;

/// The role's name in logs, metrics and health.
pub const ROLE: &str = "aggregate";

/// A record of the deltas topic: a segment's delta, or (keyed `account/<id>`) an account's.
enum Delta {
    Segment(SegmentDelta),
    Account(AccountDelta),
}

/// The aggregate role as a state machine over the shared view.
pub struct AggregateRole {
    view: Arc<RwLock<AggregateView>>,
    topics: TopicSettings,
    metrics: Metrics,
    clock: ClockKind,
    /// What was last published to the view topic, by key: only changes are published again.
    published: HashMap<String, WindowSummary>,
    /// When the next step of some window begins (wall clock): summaries change then.
    next_step: Option<Timestamp>,
    /// The accounts of the owned partitions.
    accounts: OwnedAccounts,
}

impl AggregateRole {
    /// The role writing `view`, reporting to `metrics`.
    pub fn new(config: &Config, view: Arc<RwLock<AggregateView>>, metrics: Metrics) -> Self {
        AggregateRole {
            view,
            topics: config.settings.topics.clone(),
            metrics,
            clock: config.settings.windows.clock,
            published: HashMap::new(),
            next_step: None,
            accounts: OwnedAccounts::new(config),
        }
    }

    /// Publishes the rows whose summary changed since last published to the view topic.
    fn publish(&mut self, rows: Vec<Row>, wall: Timestamp, out: &mut Vec<Outgoing>) {
        for row in rows {
            let key = row.view_key();
            if self.published.get(&key) == Some(&row.summary) {
                continue;
            }
            let value = serde_json::to_vec(&row.to_json(wall)).unwrap_or_default();
            out.push(Outgoing::new(
                &self.topics.segment_view,
                None,
                Some(key.clone().into_bytes()),
                Some(value),
                None,
            ));
            self.published.insert(key, row.summary);
        }
    }

    /// With the wall clock, the next instant some window moves a step after `wall`.
    fn schedule(&mut self, wall: Timestamp) {
        if self.clock != ClockKind::Wall {
            return;
        }
        let view = self.view.read().unwrap_or_else(|e| e.into_inner());
        self.next_step = view
            .windows()
            .windows()
            .iter()
            .map(|w| w.interval(wall).1)
            .chain([self.accounts.next_step(wall)])
            .min();
    }

    /// How the role meets Kafka: its group reading the deltas topic.
    pub fn binding(config: &Config) -> Binding {
        Binding {
            role: ROLE,
            group: config.settings.kafka.aggregate_group.clone(),
            topics: vec![config.settings.topics.segment_deltas.clone()],
            transactional: true,
        }
    }

    fn view(&self) -> std::sync::RwLockWriteGuard<'_, AggregateView> {
        self.view.write().unwrap_or_else(|e| e.into_inner())
    }
}

impl RoleMachine for AggregateRole {
    fn handle_assigned(&mut self, partitions: &[TopicPartition]) -> Vec<StateRead> {
        partitions
            .iter()
            .map(|(_, partition)| StateRead::Whole {
                topic: self.topics.state.clone(),
                partition: *partition,
            })
            .collect()
    }

    fn handle_restored(&mut self, read: &StateRead, records: Vec<StoredRecord>, now: Timestamp) {
        let partition = read.partition();
        // An account's snapshots: see OwnedAccounts::restore.
        let snapshots: Vec<SegmentSnapshot> = latest_snapshots(
            (&self.topics.state, partition),
            &records,
            |key| !is_account_key(key),
            &self.metrics,
        );
        self.accounts
            .restore(partition, &records, &self.metrics, now);
        {
            let mut view = self.view();
            view.restore(partition, &snapshots);
            events::SegmentsOwned {
                count: view.segment_count(),
            }
            .emit(&self.metrics);
        }
        // The restored segments are published at once (their summaries may have moved on
        // since their last owner published them).
        self.next_step = Some(now);
    }

    fn handle_revoked(&mut self, partitions: &[TopicPartition]) {
        // Their new owner publishes them from now on; if they come back, publish afresh.
        self.published.clear();
        for (_, partition) in partitions {
            self.accounts.drop_partition(*partition);
        }
        let mut view = self.view();
        for (_, partition) in partitions {
            view.drop_partition(*partition);
        }
        events::SegmentsOwned {
            count: view.segment_count(),
        }
        .emit(&self.metrics);
    }

    fn handle_messages<M: Message>(
        &mut self,
        messages: &[M],
        now: Timestamp,
        out: &mut Vec<Outgoing>,
    ) {
        let metrics = self.metrics.clone();
        let state_topic = self.topics.state.clone();
        let view_lock = self.view.clone();
        let mut view = view_lock.write().unwrap_or_else(|e| e.into_inner());
        let mut touched: BTreeSet<(i32, String)> = BTreeSet::new();
        let mut touched_accounts: BTreeSet<(i32, String)> = BTreeSet::new();
        for message in messages {
            let payload = message.payload().unwrap_or_default();
            let decoded = if message.key().is_some_and(is_account_key) {
                AccountDelta::from_json(payload).map(Delta::Account)
            } else {
                SegmentDelta::from_json(payload).map(Delta::Segment)
            };
            match decoded {
                Ok(Delta::Account(delta)) => {
                    let Some(applied) = self.accounts.apply(message.partition(), &delta) else {
                        continue;
                    };
                    if applied.counted > 0 {
                        touched_accounts.insert((message.partition(), delta.account));
                    }
                }
                Ok(Delta::Segment(delta)) => {
                    let Some(applied) = view.apply(message.partition(), &delta) else {
                        continue; // not owned here: its owner applies it
                    };
                    events::DeltaApplied {
                        counted: applied.counted,
                        skipped: applied.skipped,
                    }
                    .emit(&metrics);
                    if applied.counted > 0 {
                        touched.insert((message.partition(), delta.segment));
                    }
                }
                Err(error) => events::UnreadableRecord {
                    topic: message.topic(),
                    partition: message.partition(),
                    offset: message.offset(),
                    error: &error,
                }
                .emit(&metrics),
            }
        }
        events::SegmentsOwned {
            count: view.segment_count(),
        }
        .emit(&metrics);
        let mut rows = Vec::new();
        for (partition, segment) in touched {
            if let Some(snapshot) = view.snapshot(partition, &segment) {
                out.push(Outgoing::new(
                    &state_topic,
                    Some(partition),
                    Some(segment.clone().into_bytes()),
                    Some(snapshot.to_json()),
                    None,
                ));
            }
            rows.extend(view.segment(&segment, now).unwrap_or_default());
        }
        drop(view);
        self.publish(rows, now, out);
        self.accounts.flush(touched_accounts, now, out);
        if self.next_step.is_none() {
            self.schedule(now);
        }
    }

    fn poll_timeout(&self) -> Option<Timestamp> {
        self.next_step
    }

    fn handle_timeout(&mut self, now: Timestamp, out: &mut Vec<Outgoing>) {
        let rows = self
            .view
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .rows(now);
        self.publish(rows, now, out);
        self.accounts.tick(now, out);
        self.next_step = None;
        self.schedule(now);
    }
}

/// Runs the aggregate role on `engine` until `shutdown` turns true, after checking that the
/// state topic is co-partitioned with the deltas topic.
pub async fn run(
    engine: Engine,
    view: Arc<RwLock<AggregateView>>,
    shutdown: watch::Receiver<bool>,
) -> Result<(), RuntimeError> {
    let kafka = engine.config.settings.kafka.clone();
    let topics = engine.config.settings.topics.clone();
    let (metrics, stop) = (engine.metrics.clone(), shutdown.clone());
    let checked = tokio::task::spawn_blocking(move || {
        crate::state::wait_for_copartitioned(
            &kafka,
            ROLE,
            &topics.segment_deltas,
            &[topics.state.as_str()],
            &metrics,
            &stop,
        )
    })
    .await??;
    if !checked {
        return Ok(());
    }
    let role = AggregateRole::new(&engine.config, view, engine.metrics.clone());
    let binding = AggregateRole::binding(&engine.config);
    engine.drive(role, binding, shutdown).await
}

#[cfg(test)]
mod tests {
    use rdkafka::message::OwnedMessage;

    use super::*;
    use crate::ingest::IngestRole;

    const NOW: Timestamp = Timestamp(1_750_000_000_000);

    fn message(
        topic: &str,
        partition: i32,
        offset: i64,
        key: &[u8],
        payload: &[u8],
    ) -> OwnedMessage {
        OwnedMessage::new(
            Some(payload.to_vec()),
            Some(key.to_vec()),
            topic.to_owned(),
            rdkafka::Timestamp::NotAvailable,
            partition,
            offset,
            None,
        )
    }

    /// Segment deltas as the ingest role makes them, for `scores` (one response each).
    fn deltas(config: &Config, scores: &[u8]) -> Vec<Outgoing> {
        let topics = &config.settings.topics;
        let partitions = crate::ingest::Partitions {
            responses_by_id: 1,
            followup_events: 1,
        };
        let mut ingest = IngestRole::new(config, partitions, Metrics::new());
        let mut forwarded = Vec::new();
        for (i, score) in scores.iter().enumerate() {
            let payload = format!(
                r#"{{"response_id":"r{i}","score":{score},"responded_at":"{}","customer_id":"c{i}"}}"#,
                Timestamp(NOW.millis() - 60_000).to_rfc3339()
            );
            let input = message(&topics.responses, 0, i as i64, b"k", payload.as_bytes());
            ingest.handle_messages(&[input], NOW, &mut forwarded);
        }
        let forwarded: Vec<OwnedMessage> = forwarded
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let payload = r.payload.as_deref().unwrap_or_default();
                message(&topics.responses_by_id, 0, i as i64, b"id", payload)
            })
            .collect();
        let mut out = Vec::new();
        ingest.handle_messages(&forwarded, NOW, &mut out);
        out.retain(|r| r.topic == topics.segment_deltas);
        out
    }

    fn as_messages(topic: &str, records: &[Outgoing]) -> Vec<OwnedMessage> {
        records
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let key = r.key.as_deref().unwrap_or_default();
                message(
                    topic,
                    0,
                    i as i64,
                    key,
                    r.payload.as_deref().unwrap_or_default(),
                )
            })
            .collect()
    }

    fn view_of(config: &Config) -> Arc<RwLock<AggregateView>> {
        Arc::new(RwLock::new(AggregateView::new(
            config.windows.clone(),
            config.settings.windows.clock,
            config.settings.analytics.min_responses,
        )))
    }

    /// The role on its own, no Kafka: deltas are applied once and the touched segments'
    /// snapshots come out for the state topic, on the deltas' partition; a new owner restored
    /// from those snapshots (an unreadable record and a superseded snapshot among them) has the
    /// same numbers and skips a replay of the same deltas.
    #[test]
    fn applies_once_snapshots_and_restores() {
        let config = Config::load(None, Vec::<(String, String)>::new()).expect("defaults");
        let topics = config.settings.topics.clone();
        let deltas = as_messages(&topics.segment_deltas, &deltas(&config, &[10, 9, 3, 7]));
        assert!(!deltas.is_empty());

        let view = view_of(&config);
        let mut first = AggregateRole::new(&config, view.clone(), Metrics::new());
        let reads = first.handle_assigned(&[(topics.segment_deltas.clone(), 0)]);
        assert_eq!(
            reads,
            [StateRead::Whole {
                topic: topics.state.clone(),
                partition: 0
            }]
        );
        first.handle_restored(&reads[0], Vec::new(), NOW);
        let mut out = Vec::new();
        first.handle_messages(&deltas, NOW, &mut out);
        // Each response counts in every segment it belongs to (here only `all`).
        assert_eq!(first.metrics.applied_responses(), 4);
        let (snapshots, published): (Vec<Outgoing>, Vec<Outgoing>) =
            out.into_iter().partition(|r| r.topic == topics.state);
        assert!(!snapshots.is_empty());
        assert!(snapshots.iter().all(|r| r.partition == Some(0)));
        // Every window's summary of the touched segment goes to the view topic, by key.
        let view_keys = |records: &[Outgoing]| -> BTreeSet<String> {
            assert!(records.iter().all(|r| r.topic == topics.segment_view));
            records
                .iter()
                .map(|r| String::from_utf8(r.key.clone().expect("key")).expect("UTF-8"))
                .collect()
        };
        let every_window: BTreeSet<String> = ["1h", "24h", "7d", "28d"]
            .iter()
            .map(|w| format!("{w}|all"))
            .collect();
        assert_eq!(view_keys(&published), every_window);
        for record in &published {
            let row: serde_json::Value =
                serde_json::from_slice(record.payload.as_deref().expect("payload")).expect("JSON");
            assert_eq!(row["segment"], "all");
            assert_eq!(row["responses"], 4);
            assert_eq!(row["nps"], 25.0);
        }
        let all = |view: &Arc<RwLock<AggregateView>>| {
            let rows = view
                .read()
                .expect("view")
                .segment("all", NOW)
                .expect("owned");
            rows[0].summary
        };
        let before = all(&view);
        assert_eq!(before.tally.responses(), 4);
        assert_eq!(before.tally.nps(), Some(25.0));

        // A new owner: restored from the state topic as the broker would hand it back.
        let mut stored: Vec<StoredRecord> = Vec::new();
        stored.push(StoredRecord {
            offset: 0,
            key: Some(b"all".to_vec()),
            payload: Some(b"{garbage".to_vec()),
        });
        for (i, record) in snapshots.iter().enumerate() {
            stored.push(StoredRecord {
                offset: i as i64 + 1,
                key: record.key.clone(),
                payload: record.payload.clone(),
            });
        }
        let restored_view = view_of(&config);
        let metrics = Metrics::new();
        let mut second = AggregateRole::new(&config, restored_view.clone(), metrics.clone());
        let reads = second.handle_assigned(&[(topics.segment_deltas.clone(), 0)]);
        second.handle_restored(&reads[0], stored, NOW);
        assert_eq!(all(&restored_view), before);
        assert!(metrics.render().contains(&format!(
            "npsflow_unreadable_records_total{{topic=\"{}\"}} 1",
            topics.state
        )));
        let mut again = Vec::new();
        second.handle_messages(&deltas, NOW, &mut again);
        assert!(
            again.is_empty(),
            "a replay changes nothing and writes nothing"
        );
        assert_eq!(second.metrics.applied_responses(), 0);
        assert_eq!(all(&restored_view), before);

        // The new owner publishes what it restored at once, then only what changes.
        assert_eq!(second.poll_timeout(), Some(NOW));
        let mut republished = Vec::new();
        second.handle_timeout(NOW, &mut republished);
        assert_eq!(view_keys(&republished), every_window);
        let mut unchanged = Vec::new();
        second.handle_timeout(NOW, &mut unchanged);
        assert!(unchanged.is_empty(), "nothing changed, nothing published");
    }
}
