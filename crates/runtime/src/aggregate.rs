//! The aggregate role: consumes segment deltas, owns the rolling windows of the segments on
//! its assigned partitions, and serves them to `/metrics` and `/v1/segments` through an
//! [`AggregateView`]. A partition's segments are dropped when the partition is revoked, so a
//! segment is only ever shown by the one process that owns it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, RwLock};

use npsflow_core::{
    SegmentDelta, SegmentSnapshot, SegmentStore, Timestamp, WindowSpecs, WindowSummary,
};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::Message;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::{ClockKind, Config};
use crate::health::Health;
use crate::kafka::{self, AssignmentChange, Outgoing, RoleContext};
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

/// Restores every newly assigned partition from the state topic, before any delta of it is
/// applied; `/readyz` says not-ready meanwhile.
async fn restore_assigned(
    config: &Config,
    health: &Health,
    view: &RwLock<AggregateView>,
    partitions: Vec<i32>,
) -> Result<(), RuntimeError> {
    health.set_restored(ROLE, false);
    let kafka = config.settings.kafka.clone();
    let topic = config.settings.topics.state.clone();
    let started = std::time::Instant::now();
    let wanted = partitions.clone();
    let restored = tokio::task::spawn_blocking(move || {
        crate::state::read_snapshots(&kafka, &topic, &wanted, RESTORE_LIMIT)
    })
    .await
    .map_err(|e| RuntimeError::Task(e.to_string()))??;
    let mut view = view.write().unwrap_or_else(|e| e.into_inner());
    for partition in partitions {
        let snapshots = restored.get(&partition).map_or(&[][..], Vec::as_slice);
        info!(
            partition,
            segments = snapshots.len(),
            millis = started.elapsed().as_millis() as u64,
            "restored"
        );
        view.restore(partition, snapshots);
    }
    drop(view);
    health.set_restored(ROLE, true);
    Ok(())
}

/// The longest a partition's restore may take before the role gives up (and the process
/// exits to be restarted). The consumer stays in its group meanwhile.
const RESTORE_LIMIT: std::time::Duration = std::time::Duration::from_secs(180);

/// Runs the aggregate role until `shutdown` turns true. Per batch of deltas: apply what was
/// not applied before, write the snapshot of every segment the batch touched to the state
/// topic (same partition number), and only then store the deltas' offsets.
pub async fn run(
    config: Arc<Config>,
    metrics: Metrics,
    health: Arc<Health>,
    view: Arc<RwLock<AggregateView>>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), RuntimeError> {
    health.register(ROLE);
    let settings = &config.settings;
    let topics = &settings.topics;
    let group = &settings.kafka.aggregate_group;
    {
        let kafka = settings.kafka.clone();
        let (deltas, state) = (topics.segment_deltas.clone(), topics.state.clone());
        tokio::task::spawn_blocking(move || {
            crate::state::check_copartitioned(&kafka, &deltas, &state)
        })
        .await
        .map_err(|e| RuntimeError::Task(e.to_string()))??;
    }
    let context = RoleContext::new(ROLE, group, metrics.clone(), health.clone());
    let consumer: StreamConsumer<RoleContext> =
        kafka::consumer_config(&settings.kafka, group, "npsflow-aggregate")
            .create_with_context(context)?;
    let producer = kafka::role_producer(
        kafka::producer_config(
            &settings.kafka,
            "npsflow-aggregate-producer",
            settings.topics.max_message_bytes as usize,
        ),
        ROLE,
        health.clone(),
        metrics.clone(),
    )?;
    consumer.subscribe(&[topics.segment_deltas.as_str()])?;
    info!(topic = %topics.segment_deltas, %group, "aggregate started");
    let max = settings.ingest.batch_max_messages;
    let wait = std::time::Duration::from_millis(config.batch_max_wait.millis() as u64);
    let idle = std::time::Duration::from_millis(500);
    // Deltas received but not applied yet because the assignment changed meanwhile.
    let mut carried: Vec<rdkafka::message::OwnedMessage> = Vec::new();
    while let Some(received) = kafka::receive_batch(&consumer, max, wait, idle, &mut shutdown).await
    {
        let started = std::time::Instant::now();
        let mut batch = std::mem::take(&mut carried);
        batch.extend(received);
        let mut assigned = Vec::new();
        for change in consumer.context().take_changes() {
            match change {
                AssignmentChange::Revoked(partitions) => {
                    let mut view = view.write().unwrap_or_else(|e| e.into_inner());
                    for (_, partition) in partitions {
                        view.drop_partition(partition);
                        assigned.retain(|p| *p != partition);
                    }
                }
                AssignmentChange::Assigned(partitions) => {
                    assigned.extend(partitions.into_iter().map(|(_, p)| p));
                }
            }
        }
        let role_health = health.snapshot().get(ROLE).copied().unwrap_or_default();
        if !assigned.is_empty() {
            let restore = restore_assigned(&config, &health, &view, assigned);
            let (restored, held) = kafka::keep_polling(&consumer, restore).await;
            restored?;
            batch.extend(held);
            if consumer.context().has_changes() {
                // Partitions moved during the restore: attend to that before applying.
                carried = batch;
                continue;
            }
        } else if role_health.joined && !role_health.restored {
            // Joined with nothing new to restore (e.g. an empty assignment).
            health.set_restored(ROLE, true);
        }
        if batch.is_empty() {
            continue;
        }
        let mut touched: BTreeSet<(i32, String)> = BTreeSet::new();
        {
            let mut view = view.write().unwrap_or_else(|e| e.into_inner());
            for message in &batch {
                match SegmentDelta::from_json(message.payload().unwrap_or_default()) {
                    Ok(delta) => {
                        let Some(applied) = view.apply(message.partition(), &delta) else {
                            continue; // revoked meanwhile: the new owner applies it
                        };
                        metrics
                            .delta_responses
                            .with_label_values(&["applied"])
                            .inc_by(applied.counted);
                        metrics
                            .delta_responses
                            .with_label_values(&["skipped"])
                            .inc_by(applied.skipped);
                        if applied.counted > 0 {
                            touched.insert((message.partition(), delta.segment));
                        }
                    }
                    Err(error) => warn!(
                        %error,
                        partition = message.partition(),
                        offset = message.offset(),
                        "skipping a message that is not a segment delta"
                    ),
                }
            }
            metrics.segments_owned.set(view.segment_count() as f64);
        }
        let snapshots: Vec<Outgoing> = {
            let view = view.read().unwrap_or_else(|e| e.into_inner());
            touched
                .iter()
                .filter_map(|(partition, segment)| {
                    let snapshot = view.snapshot(*partition, segment)?;
                    Some(Outgoing::new(
                        &topics.state,
                        Some(*partition),
                        Some(segment.clone().into_bytes()),
                        Some(snapshot.to_json()),
                        rdkafka::message::OwnedHeaders::new(),
                    ))
                })
                .collect()
        };
        kafka::deliver_all(&producer, &snapshots, &metrics).await?;
        let owned: Vec<(String, i32, i64)> = {
            let view = view.read().unwrap_or_else(|e| e.into_inner());
            kafka::last_offsets(&batch)
                .into_iter()
                .filter(|(_, partition, _)| view.owns(*partition))
                .collect()
        };
        kafka::store_offsets(&consumer, &owned);
        metrics
            .batch_seconds
            .with_label_values(&[ROLE])
            .observe(started.elapsed().as_secs_f64());
    }
    info!("aggregate stopping: committing offsets");
    kafka::close_consumer(consumer, ROLE, true, std::time::Duration::from_secs(15)).await;
    Ok(())
}
