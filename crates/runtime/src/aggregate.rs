//! The aggregate role: consumes segment deltas and owns the rolling windows of the segments
//! on its assigned partitions, in the shared [`AggregateView`] that `/metrics` and
//! `/v1/segments` read. Per batch it applies what was not applied before and writes the
//! snapshot of every segment the batch touched to the state topic (same partition number);
//! the engine stores the deltas' offsets only after those snapshots are delivered. A newly
//! assigned partition is restored from its state partition before any delta of it is applied.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, RwLock};

use npsflow_core::{SegmentDelta, SegmentSnapshot, Timestamp};
use rdkafka::message::{OwnedHeaders, OwnedMessage};
use rdkafka::Message;
use tokio::sync::watch;

use crate::config::{Config, TopicSettings};
use crate::engine::{Binding, Engine, RoleMachine, TopicPartition};
use crate::kafka::Outgoing;
use crate::metrics::{events, Metrics};
use crate::state::{StateRead, StoredRecord};
use crate::view::AggregateView;
use crate::RuntimeError;

/// The role's name in logs, metrics and health.
pub const ROLE: &str = "aggregate";

/// The aggregate role as a state machine over the shared view.
pub struct AggregateRole {
    view: Arc<RwLock<AggregateView>>,
    topics: TopicSettings,
    metrics: Metrics,
}

impl AggregateRole {
    /// The role writing `view`, reporting to `metrics`.
    pub fn new(config: &Config, view: Arc<RwLock<AggregateView>>, metrics: Metrics) -> Self {
        AggregateRole {
            view,
            topics: config.settings.topics.clone(),
            metrics,
        }
    }

    /// How the role meets Kafka: its group reading the deltas topic.
    pub fn binding(config: &Config) -> Binding {
        Binding {
            role: ROLE,
            group: config.settings.kafka.aggregate_group.clone(),
            topics: vec![config.settings.topics.segment_deltas.clone()],
            transactional: false,
        }
    }

    fn view(&self) -> std::sync::RwLockWriteGuard<'_, AggregateView> {
        self.view.write().unwrap_or_else(|e| e.into_inner())
    }
}

/// Of the snapshots read back for one partition (compaction may not have run yet, so older
/// ones can still be there), one per segment: the one that has applied the most.
fn latest_snapshots(
    topic: &str,
    partition: i32,
    records: &[StoredRecord],
    metrics: &Metrics,
) -> Vec<SegmentSnapshot> {
    let mut latest: BTreeMap<&[u8], SegmentSnapshot> = BTreeMap::new();
    for record in records {
        let Some(key) = record.key.as_deref() else {
            continue;
        };
        match record.payload.as_deref().map(SegmentSnapshot::from_json) {
            None => {
                latest.remove(key);
            }
            Some(Ok(snapshot)) => {
                let keep = latest
                    .get(key)
                    .is_none_or(|current| !current.covers(&snapshot) || snapshot.covers(current));
                if keep {
                    latest.insert(key, snapshot);
                }
            }
            Some(Err(error)) => events::UnreadableRecord {
                topic,
                partition,
                offset: record.offset,
                error: &error,
            }
            .emit(metrics),
        }
    }
    latest.into_values().collect()
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

    fn handle_restored(&mut self, read: &StateRead, records: Vec<StoredRecord>, _now: Timestamp) {
        let partition = read.partition();
        let snapshots = latest_snapshots(&self.topics.state, partition, &records, &self.metrics);
        let mut view = self.view();
        view.restore(partition, &snapshots);
        events::SegmentsOwned {
            count: view.segment_count(),
        }
        .emit(&self.metrics);
    }

    fn handle_revoked(&mut self, partitions: &[TopicPartition]) {
        let mut view = self.view();
        for (_, partition) in partitions {
            view.drop_partition(*partition);
        }
        events::SegmentsOwned {
            count: view.segment_count(),
        }
        .emit(&self.metrics);
    }

    fn handle_messages(
        &mut self,
        messages: &[OwnedMessage],
        _now: Timestamp,
        out: &mut Vec<Outgoing>,
    ) {
        let metrics = self.metrics.clone();
        let state_topic = self.topics.state.clone();
        let mut view = self.view();
        let mut touched: BTreeSet<(i32, String)> = BTreeSet::new();
        for message in messages {
            match SegmentDelta::from_json(message.payload().unwrap_or_default()) {
                Ok(delta) => {
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
        for (partition, segment) in touched {
            if let Some(snapshot) = view.snapshot(partition, &segment) {
                out.push(Outgoing::new(
                    &state_topic,
                    Some(partition),
                    Some(segment.into_bytes()),
                    Some(snapshot.to_json()),
                    OwnedHeaders::new(),
                ));
            }
        }
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
    tokio::task::spawn_blocking(move || {
        crate::state::check_copartitioned(&kafka, &topics.segment_deltas, &topics.state)
    })
    .await??;
    let role = AggregateRole::new(&engine.config, view, engine.metrics.clone());
    let binding = AggregateRole::binding(&engine.config);
    engine.drive(role, binding, shutdown).await
}
