//! Kafka plumbing shared by the roles: client configuration (our defaults, then every
//! user-given librdkafka property), the consumer context that tracks assignments, broker
//! connectivity and lag, and reliable delivery of a batch of output records.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::KafkaError;
use rdkafka::message::{OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::statistics::Statistics;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::util::Timeout;
use rdkafka::Message;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::KafkaSettings;
use crate::health::Health;
use crate::metrics::Metrics;

/// Client settings common to every client: brokers, client id, stats, then the user's
/// properties (which win).
pub fn client_config(kafka: &KafkaSettings, client_id: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &kafka.brokers)
        .set("client.id", client_id)
        .set("log_level", "4");
    for (name, value) in &kafka.properties {
        config.set(name, value);
    }
    config
}

/// A consumer in `group`: offsets are stored by the role after delivery and committed by
/// librdkafka (and on shutdown); cooperative-sticky assignment.
pub fn consumer_config(kafka: &KafkaSettings, group: &str, client_id: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("group.id", group)
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set("session.timeout.ms", "10000")
        // Also bounds how long a rebalance waits for members that do not rejoin. The loops
        // poll at least every half second; a restore must finish well within this.
        .set("max.poll.interval.ms", "60000")
        .set("heartbeat.interval.ms", "1000")
        // Lag and connectivity come from statistics (see RoleContext::stats).
        .set("statistics.interval.ms", "1000");
    merge(config, client_config(kafka, client_id))
}

/// An idempotent producer with the Java client's partitioner, that retries until delivery:
/// a broker outage pauses the role instead of failing messages.
pub fn producer_config(kafka: &KafkaSettings, client_id: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("enable.idempotence", "true")
        .set("partitioner", "murmur2_random")
        .set("message.timeout.ms", "0")
        .set("linger.ms", "5")
        .set("compression.type", "lz4");
    merge(config, client_config(kafka, client_id))
}

fn merge(mut base: ClientConfig, overrides: ClientConfig) -> ClientConfig {
    for (name, value) in overrides.config_map() {
        base.set(name, value);
    }
    base
}

/// A change of a consumer's assignment, seen by the role loop after it happens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AssignmentChange {
    /// Partitions added.
    Assigned(Vec<(String, i32)>),
    /// Partitions taken away.
    Revoked(Vec<(String, i32)>),
}

/// The context of a role's consumer: records assignment changes for the role loop, and
/// publishes connectivity and lag.
pub struct RoleContext {
    role: &'static str,
    group: String,
    metrics: Metrics,
    health: Arc<Health>,
    changes: Mutex<Vec<AssignmentChange>>,
}

impl RoleContext {
    /// A context for `role` consuming in `group`.
    pub fn new(role: &'static str, group: &str, metrics: Metrics, health: Arc<Health>) -> Self {
        RoleContext {
            role,
            group: group.to_owned(),
            metrics,
            health,
            changes: Mutex::new(Vec::new()),
        }
    }

    /// Assignment changes since the last call, oldest first.
    pub fn take_changes(&self) -> Vec<AssignmentChange> {
        std::mem::take(&mut *self.changes.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

fn partitions(list: &rdkafka::TopicPartitionList) -> Vec<(String, i32)> {
    list.elements()
        .iter()
        .map(|e| (e.topic().to_owned(), e.partition()))
        .collect()
}

impl ClientContext for RoleContext {
    fn stats(&self, statistics: Statistics) {
        let up = statistics
            .brokers
            .values()
            .any(|b| b.state == "UP" && b.nodeid >= 0);
        self.health.set_connected(self.role, up);
        self.metrics
            .connected
            .with_label_values(&[self.role])
            .set(i64::from(up));
        for (topic_name, topic) in &statistics.topics {
            for (id, partition) in &topic.partitions {
                if *id < 0 {
                    continue;
                }
                let labels = [self.group.as_str(), topic_name.as_str(), &id.to_string()];
                if partition.consumer_lag >= 0 {
                    self.metrics
                        .consumer_lag
                        .with_label_values(&labels)
                        .set(partition.consumer_lag);
                }
            }
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if matches!(
            error.rdkafka_error_code(),
            Some(RDKafkaErrorCode::AllBrokersDown)
        ) {
            self.health.set_connected(self.role, false);
            self.metrics
                .connected
                .with_label_values(&[self.role])
                .set(0);
        }
        warn!(role = self.role, %error, reason, "kafka client error");
    }
}

impl ConsumerContext for RoleContext {
    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let change = match rebalance {
            Rebalance::Assign(list) => AssignmentChange::Assigned(partitions(list)),
            Rebalance::Revoke(list) => AssignmentChange::Revoked(partitions(list)),
            Rebalance::Error(error) => {
                warn!(role = self.role, %error, "rebalance error");
                return;
            }
        };
        let (event, count) = match &change {
            AssignmentChange::Assigned(p) => ("assign", p.len()),
            AssignmentChange::Revoked(p) => ("revoke", p.len()),
        };
        info!(role = self.role, event, partitions = count, "rebalance");
        self.metrics
            .rebalances
            .with_label_values(&[self.group.as_str(), event])
            .inc();
        self.health.set_joined(self.role);
        self.changes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(change);
    }
}

/// A record to produce, owning its bytes.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// Topic.
    pub topic: String,
    /// Partition; `None` lets the partitioner choose by key.
    pub partition: Option<i32>,
    /// Key, if any.
    pub key: Option<Vec<u8>>,
    /// Payload, if any (a dead letter of a tombstone has none).
    pub payload: Option<Vec<u8>>,
    /// Headers.
    pub headers: OwnedHeaders,
}

/// Delivers every record, retrying failed ones until they are acknowledged. Returns when all
/// are delivered; never drops a record.
pub async fn deliver_all(producer: &FutureProducer, records: &[Outgoing], metrics: &Metrics) {
    let mut pending: Vec<&Outgoing> = records.iter().collect();
    let mut backoff = Duration::from_millis(100);
    while !pending.is_empty() {
        let results = futures::future::join_all(pending.iter().map(|r| {
            let mut record: FutureRecord<'_, [u8], [u8]> =
                FutureRecord::to(&r.topic).headers(r.headers.clone());
            if let Some(key) = &r.key {
                record = record.key(key.as_slice());
            }
            if let Some(partition) = r.partition {
                record = record.partition(partition);
            }
            if let Some(payload) = &r.payload {
                record = record.payload(payload.as_slice());
            }
            producer.send(record, Timeout::Never)
        }))
        .await;
        let mut failed = Vec::new();
        for (record, result) in pending.iter().zip(results) {
            if let Err((error, _)) = result {
                warn!(topic = %record.topic, %error, "delivery failed; retrying");
                metrics
                    .produce_errors
                    .with_label_values(&[record.topic.as_str()])
                    .inc();
                failed.push(*record);
            }
        }
        if !failed.is_empty() {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
        pending = failed;
    }
}

/// Commits the stored offsets (if `commit`), leaves the group and closes the consumer, on a
/// blocking thread and for at most `limit`: with the broker gone this cannot finish, and the
/// stored offsets are then simply replayed by the next owner, which makes the same decisions.
pub async fn close_consumer(
    consumer: StreamConsumer<RoleContext>,
    role: &'static str,
    commit: bool,
    limit: Duration,
) {
    let closing = tokio::task::spawn_blocking(move || {
        if commit {
            if let Err(error) = consumer.commit_consumer_state(CommitMode::Sync) {
                info!(role, %error, "final commit skipped");
            }
        }
        consumer.unsubscribe();
        drop(consumer);
    });
    match tokio::time::timeout(limit, closing).await {
        Ok(_) => info!(role, "consumer closed"),
        Err(_) => warn!(role, "broker unreachable: closing without a final commit"),
    }
}

/// Produces `records` and commits the input `offsets` (the next offset to read, per
/// partition) in one Kafka transaction, retrying the whole transaction after abortable or
/// retriable errors. Blocking. Returns an error only when the producer can no longer be used
/// (fenced by a newer instance, or a fatal error).
pub fn commit_transaction(
    producer: &FutureProducer,
    records: &[Outgoing],
    offsets: &rdkafka::TopicPartitionList,
    group: &rdkafka::consumer::ConsumerGroupMetadata,
    metrics: &Metrics,
) -> Result<(), KafkaError> {
    let timeout = Duration::from_secs(60);
    let mut backoff = Duration::from_millis(100);
    loop {
        let attempt = (|| {
            producer.begin_transaction()?;
            for r in records {
                let mut record: FutureRecord<'_, [u8], [u8]> =
                    FutureRecord::to(&r.topic).headers(r.headers.clone());
                if let Some(key) = &r.key {
                    record = record.key(key.as_slice());
                }
                if let Some(payload) = &r.payload {
                    record = record.payload(payload.as_slice());
                }
                if let Some(partition) = r.partition {
                    record = record.partition(partition);
                }
                loop {
                    match producer.send_result(record) {
                        // Delivery is confirmed by the commit below.
                        Ok(_delivery) => break,
                        Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                            record = back;
                            producer.poll(Duration::from_millis(10));
                        }
                        Err((error, _)) => return Err(error),
                    }
                }
            }
            producer.send_offsets_to_transaction(offsets, group, timeout)?;
            producer.commit_transaction(timeout)
        })();
        let error = match attempt {
            Ok(()) => return Ok(()),
            Err(error) => error,
        };
        let fatal = match &error {
            KafkaError::Transaction(e) => e.is_fatal(),
            _ => false,
        };
        if fatal {
            return Err(error);
        }
        warn!(%error, "transaction failed; aborting and retrying the batch");
        metrics
            .produce_errors
            .with_label_values(&["transaction"])
            .inc();
        let _ = producer.abort_transaction(timeout);
        std::thread::sleep(backoff);
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

/// The offsets to commit after a batch: one past the last message, per partition.
pub fn next_offsets(offsets: &[(String, i32, i64)]) -> rdkafka::TopicPartitionList {
    let mut list = rdkafka::TopicPartitionList::new();
    for (topic, partition, offset) in offsets {
        let _ = list.add_partition_offset(topic, *partition, rdkafka::Offset::Offset(offset + 1));
    }
    list
}

/// Receives the next batch: waits up to `idle` for a first message (an empty batch if none
/// comes, so that the role still attends to rebalances), then takes more until `max`
/// messages or `wait` has passed. `None` once `shutdown` turns true (or its sender is gone).
pub async fn receive_batch(
    consumer: &StreamConsumer<RoleContext>,
    max: usize,
    wait: Duration,
    idle: Duration,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<Vec<OwnedMessage>> {
    let first = tokio::select! {
        _ = shutdown.wait_for(|stop| *stop) => return None,
        received = tokio::time::timeout(idle, consumer.recv()) => received,
    };
    let mut batch = Vec::new();
    match first {
        Ok(Ok(message)) => batch.push(message.detach()),
        Ok(Err(error)) => {
            // Typically the broker is unreachable: wait a little instead of spinning.
            warn!(%error, "consume error");
            tokio::time::sleep(Duration::from_secs(1)).await;
            return Some(batch);
        }
        Err(_) => return Some(batch),
    }
    let deadline = tokio::time::Instant::now() + wait;
    while batch.len() < max {
        match tokio::time::timeout_at(deadline, consumer.recv()).await {
            Ok(Ok(message)) => batch.push(message.detach()),
            Ok(Err(error)) => {
                warn!(%error, "consume error");
                break;
            }
            Err(_) => break,
        }
    }
    Some(batch)
}

/// The last offset of each (topic, partition) in a batch.
pub fn last_offsets(batch: &[OwnedMessage]) -> Vec<(String, i32, i64)> {
    let mut offsets: Vec<(String, i32, i64)> = Vec::new();
    for message in batch {
        match offsets
            .iter_mut()
            .find(|(t, p, _)| t == message.topic() && *p == message.partition())
        {
            Some(entry) => entry.2 = entry.2.max(message.offset()),
            None => offsets.push((
                message.topic().to_owned(),
                message.partition(),
                message.offset(),
            )),
        }
    }
    offsets
}

/// Stores offsets for the next commit. A partition revoked meanwhile is skipped: its new
/// owner replays from the last commit, which changes nothing.
pub fn store_offsets(consumer: &StreamConsumer<RoleContext>, offsets: &[(String, i32, i64)]) {
    for (topic, partition, offset) in offsets {
        if let Err(error) = consumer.store_offset(topic, *partition, *offset) {
            tracing::debug!(%error, partition, "offset not stored");
        }
    }
}
