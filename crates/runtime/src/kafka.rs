//! Kafka plumbing shared by the roles: client configuration (our defaults, then every
//! user-given librdkafka property), the consumer context that tracks assignments, broker
//! connectivity, lag and progress, and delivery of a batch of output records: transient
//! errors are retried until the broker takes the record, permanent ones (too large, unknown
//! topic, not authorised, ...) are never retried forever: the record's fallback (a dead
//! letter without its value) is sent instead, or the role stops with the error.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, OwnedHeaders, OwnedMessage};
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

/// Bytes allowed on top of the input's size limit for what npsflow adds to a record it
/// forwards or dead-letters (its own headers): the producers' `message.max.bytes` and the
/// size limit `topics create` gives the topics that carry input messages.
pub const HEADER_ALLOWANCE: usize = 64 * 1024;

/// The size limit of the topics that carry whole input messages (the repartition topic and
/// the dead-letter topic), and of the producers that write them.
pub fn max_record_bytes(max_message_bytes: usize) -> usize {
    max_message_bytes.saturating_add(HEADER_ALLOWANCE)
}

/// An idempotent producer with the Java client's partitioner, that retries until delivery:
/// a broker outage pauses the role instead of failing messages. Records up to
/// `max_message_bytes` (the input's limit) plus [`HEADER_ALLOWANCE`] are accepted.
pub fn producer_config(
    kafka: &KafkaSettings,
    client_id: &str,
    max_message_bytes: usize,
) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set(
            "message.max.bytes",
            max_record_bytes(max_message_bytes).to_string(),
        )
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

/// The context of a role's producer: publishes whether it reaches a broker (its statistics
/// come from the producer's own polling thread, so they keep coming while the role waits
/// for a delivery, when the role's consumer is not polled).
pub struct ProducerHealth {
    role: &'static str,
    health: Arc<Health>,
    metrics: Metrics,
}

impl ProducerHealth {
    /// A context for `role`'s producer.
    pub fn new(role: &'static str, health: Arc<Health>, metrics: Metrics) -> ProducerHealth {
        ProducerHealth {
            role,
            health,
            metrics,
        }
    }
}

/// True if the client has a connection up to at least one real broker.
fn broker_up(statistics: &Statistics) -> bool {
    statistics
        .brokers
        .values()
        .any(|b| b.state == "UP" && b.nodeid >= 0)
}

/// True for the client error that says no broker can be reached.
fn all_brokers_down(error: &KafkaError) -> bool {
    matches!(
        error.rdkafka_error_code(),
        Some(RDKafkaErrorCode::AllBrokersDown)
    )
}

/// Sets `npsflow_stalled_partitions{role}` from the role's health now.
fn publish_stalled(health: &Health, metrics: &Metrics, role: &'static str) {
    let stalled = health.snapshot().get(role).map_or(0, |h| h.stalled);
    metrics
        .stalled_partitions
        .with_label_values(&[role])
        .set(stalled as i64);
}

impl ClientContext for ProducerHealth {
    fn stats(&self, statistics: Statistics) {
        let up = broker_up(&statistics);
        self.health.set_producing(self.role, up);
        publish_stalled(&self.health, &self.metrics, self.role);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if all_brokers_down(&error) {
            self.health.set_producing(self.role, false);
        }
        warn!(role = self.role, %error, reason, "kafka producer error");
    }
}

/// A role's producer.
pub type RoleProducer = FutureProducer<ProducerHealth>;

/// Creates `role`'s producer from `config`, reporting its connectivity to `health`.
pub fn role_producer(
    mut config: ClientConfig,
    role: &'static str,
    health: Arc<Health>,
    metrics: Metrics,
) -> Result<RoleProducer, KafkaError> {
    health.set_producing(role, false);
    config.set("statistics.interval.ms", "1000");
    config.create_with_context(ProducerHealth::new(role, health, metrics))
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

    /// True if the assignment changed since the last [`RoleContext::take_changes`].
    pub fn has_changes(&self) -> bool {
        !self
            .changes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
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
        let up = broker_up(&statistics);
        self.health.set_connected(self.role, up);
        self.metrics
            .connected
            .with_label_values(&[self.role])
            .set(i64::from(up));
        let now = std::time::Instant::now();
        let mut ends = Vec::new();
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
                let end = if partition.ls_offset >= 0 {
                    partition.ls_offset
                } else {
                    partition.hi_offset
                };
                let position = partition.committed_offset.max(partition.stored_offset);
                ends.push((topic_name, *id, partition.lo_offset, end, position));
            }
        }
        self.health.progress(self.role, |watch| {
            for (topic, partition, start, end, position) in ends {
                if position >= 0 {
                    watch.progressed(topic, partition, position, now);
                }
                watch.observed(topic, partition, start, end, now);
            }
        });
        publish_stalled(&self.health, &self.metrics, self.role);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if all_brokers_down(&error) {
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
        self.health.progress(self.role, |watch| match &change {
            AssignmentChange::Assigned(p) => watch.assigned(p),
            AssignmentChange::Revoked(p) => watch.revoked(p),
        });
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
    /// What to send instead if the broker or the producer rejects this record for good (for
    /// a dead letter: the same without its value). `None`: such a rejection stops the role.
    pub fallback: Option<Box<Outgoing>>,
}

impl Outgoing {
    /// A record without a fallback.
    pub fn new(
        topic: &str,
        partition: Option<i32>,
        key: Option<Vec<u8>>,
        payload: Option<Vec<u8>>,
        headers: OwnedHeaders,
    ) -> Outgoing {
        Outgoing {
            topic: topic.to_owned(),
            partition,
            key,
            payload,
            headers,
            fallback: None,
        }
    }

    fn record(&self) -> FutureRecord<'_, [u8], [u8]> {
        let mut record = FutureRecord::to(&self.topic).headers(self.headers.clone());
        if let Some(key) = &self.key {
            record = record.key(key.as_slice());
        }
        if let Some(partition) = self.partition {
            record = record.partition(partition);
        }
        if let Some(payload) = &self.payload {
            record = record.payload(payload.as_slice());
        }
        record
    }
}

/// A record the broker or the producer rejected for good, with no fallback left.
#[derive(Debug, thiserror::Error)]
#[error("a record for topic {topic} was rejected for good: {error}")]
pub struct DeliveryError {
    /// The record's topic.
    pub topic: String,
    /// The rejection.
    pub error: KafkaError,
}

/// Whether a delivery error is one that retrying cannot fix: the record is too large, the
/// topic does not exist or may not be written, the record is malformed, or the producer is
/// in a fatal state. Everything else (timeouts, broker transport errors, leader changes,
/// full queues) is transient.
pub fn is_permanent(error: &KafkaError) -> bool {
    use RDKafkaErrorCode as C;
    let Some(code) = error.rdkafka_error_code() else {
        return false;
    };
    matches!(
        code,
        C::MessageSizeTooLarge
            | C::MessageBatchTooLarge
            | C::InvalidMessageSize
            | C::InvalidRecord
            | C::InvalidMessage
            | C::InvalidTopic
            | C::UnknownTopic
            | C::UnknownPartition
            | C::TopicAuthorizationFailed
            | C::ClusterAuthorizationFailed
            | C::TransactionalIdAuthorizationFailed
            | C::SaslAuthenticationFailed
            | C::Authentication
            | C::UnsupportedForMessageFormat
            | C::InvalidRequiredAcks
            | C::InvalidArgument
            | C::Fatal
    )
}

/// Delivers every record. Transient failures are retried with backoff until the broker
/// takes the record (a broker outage pauses the role, it never drops a record). A record
/// rejected for good is replaced by its fallback; without one, the role gets the error.
pub async fn deliver_all(
    producer: &RoleProducer,
    records: &[Outgoing],
    metrics: &Metrics,
) -> Result<(), DeliveryError> {
    let mut pending: Vec<&Outgoing> = records.iter().collect();
    let mut backoff = Duration::from_millis(100);
    while !pending.is_empty() {
        let results = futures::future::join_all(
            pending
                .iter()
                .map(|r| producer.send(r.record(), Timeout::Never)),
        )
        .await;
        let mut retry = Vec::new();
        let mut transient = false;
        for (record, result) in pending.iter().zip(results) {
            let Err((error, _)) = result else {
                continue;
            };
            if !is_permanent(&error) {
                warn!(topic = %record.topic, %error, "delivery failed; retrying");
                metrics.produce_error(&record.topic, "transient");
                transient = true;
                retry.push(*record);
                continue;
            }
            metrics.produce_error(&record.topic, "permanent");
            match &record.fallback {
                Some(fallback) => {
                    warn!(topic = %record.topic, %error, "record rejected for good; sending its fallback");
                    metrics.dead_letters_without_value.inc();
                    retry.push(fallback.as_ref());
                }
                None => {
                    return Err(DeliveryError {
                        topic: record.topic.clone(),
                        error,
                    })
                }
            }
        }
        if transient {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
        pending = retry;
    }
    Ok(())
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
/// retriable errors. Blocking. Returns an error when the producer can no longer be used
/// (fenced by a newer instance, or a fatal error) or a record is rejected for good (records
/// that cannot fit are replaced by their fallback before they get here, see
/// [`fit_records`]).
pub fn commit_transaction(
    producer: &RoleProducer,
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
                let mut record = r.record();
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
        if is_permanent(&error) {
            return Err(error);
        }
        warn!(%error, "transaction failed; aborting and retrying the batch");
        metrics.produce_error("transaction", "transient");
        let _ = producer.abort_transaction(timeout);
        std::thread::sleep(backoff);
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

/// Replaces every record that cannot fit in `max_bytes` (its key, value and headers, with a
/// little room for the record's framing) by its fallback. A transaction cannot swap one
/// record for another after the broker rejects it, so this is decided before sending.
pub fn fit_records(records: Vec<Outgoing>, max_bytes: usize, metrics: &Metrics) -> Vec<Outgoing> {
    records
        .into_iter()
        .map(|record| {
            let headers: usize = record
                .headers
                .iter()
                .map(|h| h.key.len() + h.value.map_or(0, <[u8]>::len) + 16)
                .sum();
            let size = record.key.as_ref().map_or(0, Vec::len)
                + record.payload.as_ref().map_or(0, Vec::len)
                + headers
                + 128;
            match record.fallback {
                Some(fallback) if size > max_bytes => {
                    metrics.dead_letters_without_value.inc();
                    *fallback
                }
                _ => record,
            }
        })
        .collect()
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
    // Per partition, the first and last offsets received: what the progress watch needs,
    // without a lookup per message.
    let mut spans: Vec<(&str, i32, i64, i64)> = Vec::new();
    for message in &batch {
        let (topic, partition, offset) = (message.topic(), message.partition(), message.offset());
        match spans.iter_mut().find(|s| s.0 == topic && s.1 == partition) {
            Some(span) => span.3 = span.3.max(offset),
            None => spans.push((topic, partition, offset, offset)),
        }
    }
    let context = consumer.context();
    let now = std::time::Instant::now();
    context.health.progress(context.role, |watch| {
        for &(topic, partition, first, last) in &spans {
            watch.received(topic, partition, first, now);
            watch.received(topic, partition, last, now);
        }
    });
    Some(batch)
}

/// Runs `restore` while the consumer stays in its group: its assigned partitions are paused
/// and it keeps being polled, so heartbeats, rebalance callbacks and the poll interval are
/// served however long the restore takes. Messages it still hands out (fetched before the
/// pause) are returned in order, to be decided after the restore.
pub async fn keep_polling<T>(
    consumer: &StreamConsumer<RoleContext>,
    restore: impl std::future::Future<Output = T>,
) -> (T, Vec<OwnedMessage>) {
    let paused = consumer.assignment().ok();
    if let Some(list) = &paused {
        if let Err(error) = consumer.pause(list) {
            tracing::debug!(%error, "pausing for a restore");
        }
    }
    tokio::pin!(restore);
    let mut held = Vec::new();
    let result = loop {
        tokio::select! {
            result = &mut restore => break result,
            received = consumer.recv() => match received {
                Ok(message) => held.push(message.detach()),
                Err(error) => {
                    tracing::debug!(%error, "consume error during a restore");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    };
    if let Some(list) = &paused {
        if let Err(error) = consumer.resume(list) {
            tracing::debug!(%error, "resuming after a restore");
        }
    }
    (result, held)
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
    record_progress(consumer, offsets);
}

/// Tells the role's progress watch that everything up to these offsets (the last processed
/// per partition) is done.
pub fn record_progress(consumer: &StreamConsumer<RoleContext>, offsets: &[(String, i32, i64)]) {
    let context = consumer.context();
    let now = std::time::Instant::now();
    context.health.progress(context.role, |watch| {
        for (topic, partition, offset) in offsets {
            watch.progressed(topic, *partition, offset + 1, now);
        }
    });
}
