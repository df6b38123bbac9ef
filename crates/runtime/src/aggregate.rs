//! The aggregate role: consumes segment deltas, owns the rolling windows of the segments on
//! its assigned partitions, and serves them to `/metrics` and `/v1/segments` through an
//! [`AggregateView`]. A partition's segments are dropped when the partition is revoked, so a
//! segment is only ever shown by the one process that owns it.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use npsflow_core::{SegmentDelta, SegmentStore, Timestamp, WindowSpecs, WindowSummary};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::Message;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::config::{ClockKind, Config};
use crate::health::Health;
use crate::kafka::{self, AssignmentChange, RoleContext};
use crate::metrics::Metrics;
use crate::RuntimeError;

pub use crate::wall_now;

/// The role's name in logs, metrics and health.
pub const ROLE: &str = "aggregate";

/// One segment's summary in one window.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// Canonical segment name.
    pub segment: String,
    /// Window name.
    pub window: String,
    /// Counts, NPS, margin, band.
    pub summary: WindowSummary,
}

/// The segments this process owns, by deltas-topic partition.
#[derive(Debug)]
pub struct AggregateView {
    windows: WindowSpecs,
    clock: ClockKind,
    partitions: BTreeMap<i32, SegmentStore>,
    latest_event: Option<Timestamp>,
}

impl AggregateView {
    /// An empty view.
    pub fn new(windows: WindowSpecs, clock: ClockKind) -> AggregateView {
        AggregateView {
            windows,
            clock,
            partitions: BTreeMap::new(),
            latest_event: None,
        }
    }

    /// The windows.
    pub fn windows(&self) -> &WindowSpecs {
        &self.windows
    }

    /// "now" for queries: the wall clock, or the latest event time applied.
    pub fn now(&self, wall: Timestamp) -> Timestamp {
        match self.clock {
            ClockKind::Wall => wall,
            ClockKind::EventTime => self.latest_event.unwrap_or(wall),
        }
    }

    /// Applies a delta that arrived on `partition` of the deltas topic.
    pub fn apply(&mut self, partition: i32, delta: &SegmentDelta) -> npsflow_core::Applied {
        if let Some(latest) = delta.responses.iter().map(|r| r.1).max() {
            let latest = Timestamp(latest);
            self.latest_event = Some(self.latest_event.map_or(latest, |l| l.max(latest)));
        }
        self.partitions
            .entry(partition)
            .or_insert_with(|| SegmentStore::new(self.windows.clone()))
            .apply(delta)
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
        let now = self.now(wall);
        let mut rows = Vec::new();
        for store in self.partitions.values() {
            let board = store.board();
            for segment in board.segments() {
                rows.extend(self.segment_rows(store, segment, now));
            }
        }
        rows.sort_by(|a, b| a.segment.cmp(&b.segment));
        rows
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
                Some(Row {
                    segment: segment.clone(),
                    window: window.name().to_owned(),
                    summary: store.board().summary(segment, index, now)?,
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

/// Runs the aggregate role until `shutdown` turns true.
pub async fn run(
    config: Arc<Config>,
    metrics: Metrics,
    health: Arc<Health>,
    view: Arc<RwLock<AggregateView>>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), RuntimeError> {
    health.register(ROLE);
    health.set_restored(ROLE, true);
    let settings = &config.settings;
    let group = &settings.kafka.aggregate_group;
    let context = RoleContext::new(ROLE, group, metrics.clone(), health.clone());
    let consumer: StreamConsumer<RoleContext> =
        kafka::consumer_config(&settings.kafka, group, "npsflow-aggregate")
            .create_with_context(context)?;
    consumer.subscribe(&[settings.topics.segment_deltas.as_str()])?;
    info!(topic = %settings.topics.segment_deltas, %group, "aggregate started");
    loop {
        let received = tokio::select! {
            _ = shutdown.wait_for(|stop| *stop) => break,
            received = consumer.recv() => received,
        };
        let changes = consumer.context().take_changes();
        let mut view_guard = view.write().unwrap_or_else(|e| e.into_inner());
        for change in changes {
            if let AssignmentChange::Revoked(partitions) = change {
                for (_, partition) in partitions {
                    view_guard.drop_partition(partition);
                }
            }
        }
        let message = match received {
            Ok(message) => message,
            Err(error) => {
                warn!(%error, "consume error");
                continue;
            }
        };
        match SegmentDelta::from_json(message.payload().unwrap_or_default()) {
            Ok(delta) => {
                let applied = view_guard.apply(message.partition(), &delta);
                metrics
                    .delta_responses
                    .with_label_values(&["applied"])
                    .inc_by(applied.counted);
                metrics
                    .delta_responses
                    .with_label_values(&["skipped"])
                    .inc_by(applied.skipped);
            }
            Err(error) => warn!(
                %error,
                partition = message.partition(),
                offset = message.offset(),
                "skipping a message that is not a segment delta"
            ),
        }
        metrics
            .segments_owned
            .set(view_guard.segment_count() as f64);
        drop(view_guard);
        if let Err(error) = consumer.store_offset_from_message(&message) {
            debug!(%error, "offset not stored");
        }
    }
    info!("aggregate stopping: committing offsets");
    kafka::close_consumer(consumer, ROLE, std::time::Duration::from_secs(15)).await;
    Ok(())
}
