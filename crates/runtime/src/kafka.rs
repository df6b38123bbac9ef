//! Kafka plumbing shared by the roles: client configuration (our defaults, then every
//! user-given librdkafka property), the consumer context that tracks assignments, broker
//! connectivity, lag and progress, and delivery of a batch of output records: transient
//! errors are retried until the broker takes the record, permanent ones (too large, unknown
//! topic, not authorised, ...) are never retried forever: the record's fallback (a dead
//! letter without its value) is sent instead, or the role stops with the error.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::statistics::Statistics;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::Message;

use crate::config::KafkaSettings;
use crate::health::Health;
use crate::metrics::{events, Metrics};
use crate::repeats::Repeats;
use crate::waves::{waves, RequestLimits};

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
    partitions: Arc<PartitionCounts>,
}

impl ProducerHealth {
    /// A context for `role`'s producer.
    pub fn new(role: &'static str, health: Arc<Health>, metrics: Metrics) -> ProducerHealth {
        ProducerHealth {
            role,
            health,
            metrics,
            partitions: Arc::default(),
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

/// Every Kafka client's error and log lines, rate limited (see [`crate::repeats`]): one
/// limiter for the process, keyed by client and error, so that identical lines from a
/// client that cannot reach a broker are said once per window with how often they came.
static REPEATS: std::sync::LazyLock<Mutex<Repeats>> =
    std::sync::LazyLock::new(|| Mutex::new(Repeats::default()));

fn repeats() -> std::sync::MutexGuard<'static, Repeats> {
    REPEATS.lock().unwrap_or_else(|e| e.into_inner())
}

/// Reports a client error (librdkafka's error callback): counted every time, logged unless
/// the same client reported the same error within the window.
pub fn report_client_error(metrics: &Metrics, client: &str, error: &KafkaError, reason: &str) {
    if is_partition_end(error) {
        return;
    }
    let said = crate::readable::text(&error.to_string());
    let key = format!("error|{client}|{said}");
    let verdict = repeats().check(&key, std::time::Instant::now());
    events::KafkaClientFailed {
        client,
        error: &said,
        reason,
    }
    .emit_limited(metrics, verdict);
}

/// Whether `error` only says a partition's end was reached (`Broker: No more messages`): a
/// reader's progress, not a fault, however the client delivers it (as a consumed event, or
/// through the error callback, as some brokers' fetch responses make librdkafka do).
pub fn is_partition_end(error: &KafkaError) -> bool {
    matches!(error, KafkaError::PartitionEOF(_))
        || error.rdkafka_error_code() == Some(RDKafkaErrorCode::PartitionEOF)
}

/// A librdkafka log line of `client`, rate limited like [`report_client_error`]: lines that
/// differ only in the parenthesised detail at their end (`(after 0ms in state CONNECT, 1
/// identical error(s) suppressed)`) are the same line.
pub fn client_log(client: &str, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
    use rdkafka::config::RDKafkaLogLevel as L;
    let kind = message.split(" (").next().unwrap_or(message);
    let key = format!("log|{client}|{fac} {kind}");
    let repeated = match repeats().check(&key, std::time::Instant::now()) {
        crate::repeats::Verdict::Suppress => return,
        crate::repeats::Verdict::Log { repeated: 0, .. } => String::new(),
        crate::repeats::Verdict::Log { repeated, over } => {
            format!(" [{}]", crate::repeats::describe(repeated, over))
        }
    };
    match level {
        L::Emerg | L::Alert | L::Critical | L::Error => {
            tracing::error!(target: "librdkafka", client, "{fac} {message}{repeated}")
        }
        L::Warning => tracing::warn!(target: "librdkafka", client, "{fac} {message}{repeated}"),
        L::Notice | L::Info => {
            tracing::info!(target: "librdkafka", client, "{fac} {message}{repeated}")
        }
        L::Debug => tracing::debug!(target: "librdkafka", client, "{fac} {message}{repeated}"),
    }
}

/// Says how often the suppressed lines came, for every kind whose window has passed; called
/// from the clients' statistics callbacks (every second).
pub fn summarise_repeats(metrics: &Metrics) {
    let owed = repeats().due(std::time::Instant::now());
    for summary in owed {
        let mut parts = summary.key.splitn(3, '|');
        let (kind, client, said) = (
            parts.next().unwrap_or_default(),
            parts.next().unwrap_or_default(),
            parts.next().unwrap_or_default(),
        );
        events::KafkaClientRepeated {
            client,
            kind: if kind == "error" {
                "kafka client error"
            } else {
                "librdkafka"
            },
            said,
            repeated: summary.repeated,
            over: summary.over,
        }
        .emit(metrics);
    }
}

/// The context of a client that only needs its log lines and errors rate limited (metadata
/// lookups, table readers).
pub struct Limited {
    /// The client's name in the log.
    pub client: &'static str,
}

impl ClientContext for Limited {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        client_log(self.client, level, fac, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if is_partition_end(&error) {
            return;
        }
        let said = crate::readable::text(&error.to_string());
        let key = format!("error|{}|{said}", self.client);
        if let crate::repeats::Verdict::Log { .. } =
            repeats().check(&key, std::time::Instant::now())
        {
            tracing::debug!(client = self.client, error = %said, reason, "kafka client error");
        }
    }
}

impl ConsumerContext for Limited {}

/// Sets `npsflow_stalled_partitions{role}` from the role's health now.
fn publish_stalled(health: &Health, metrics: &Metrics, role: &'static str) {
    let count = health.snapshot().get(role).map_or(0, |h| h.stalled);
    events::PartitionsStalled { role, count }.emit(metrics);
}

impl ClientContext for ProducerHealth {
    fn stats(&self, statistics: Statistics) {
        let up = broker_up(&statistics);
        self.partitions.learn(&statistics);
        self.health.set_producing(self.role, up);
        publish_stalled(&self.health, &self.metrics, self.role);
        summarise_repeats(&self.metrics);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if all_brokers_down(&error) {
            self.health.set_producing(self.role, false);
        }
        report_client_error(
            &self.metrics,
            &format!("{}-producer", self.role),
            &error,
            reason,
        );
    }

    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        client_log(&format!("{}-producer", self.role), level, fac, message);
    }
}

impl ProducerContext for ProducerHealth {
    type DeliveryOpaque = DeliveryTicket;

    fn delivery(&self, result: &DeliveryResult<'_>, opaque: Self::DeliveryOpaque) {
        let (batch, index) = *opaque;
        match result {
            Ok(_) => batch.settle(None),
            Err((error, _)) => batch.settle(Some((index, error.clone()))),
        }
    }
}

/// What a record carries to its delivery report: its batch and its index in it.
pub type DeliveryTicket = Box<(Arc<DeliveryBatch>, usize)>;

/// A role's producer: a thread of its own polls it, so each delivery is reported to the
/// [`DeliveryBatch`] the record belongs to (no future or channel per record). It polls with
/// a long timeout (rdkafka's `ThreadedProducer` polls every 100 ms, and each poll ends in a
/// millisecond of busy waiting, a visible cost for an idle role).
#[derive(Clone)]
pub struct RoleProducer {
    producer: Arc<BaseProducer<ProducerHealth>>,
    unsettled: Arc<Unsettled>,
    limits: RequestLimits,
    _polling: Arc<StopPolling>,
}

/// The partition counts of the topics a producer writes, as its statistics report them
/// (each second): what [`waves`] needs to place keyed records by partition.
#[derive(Debug, Default)]
pub struct PartitionCounts(std::sync::RwLock<HashMap<String, i32>>);

impl PartitionCounts {
    fn learn(&self, statistics: &Statistics) {
        let counts = statistics.topics.iter().filter_map(|(name, topic)| {
            let known = topic.partitions.keys().filter(|&&p| p >= 0).count();
            (known > 0).then(|| (name.clone(), known as i32))
        });
        let mut map = self.0.write().unwrap_or_else(|e| e.into_inner());
        for (name, count) in counts {
            map.insert(name, count);
        }
    }

    /// The partition count of `topic`, if the producer has reported it.
    pub fn get(&self, topic: &str) -> Option<i32> {
        self.0
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(topic)
            .copied()
    }
}

/// Tells the polling thread to stop once the last clone of its producer is dropped.
struct StopPolling(Arc<std::sync::atomic::AtomicBool>);

impl Drop for StopPolling {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

impl std::ops::Deref for RoleProducer {
    type Target = BaseProducer<ProducerHealth>;

    fn deref(&self) -> &Self::Target {
        &self.producer
    }
}

/// How long one poll of a role's producer waits for delivery reports (each report is served
/// as it comes); also how long its thread may outlive the producer. rdkafka's poll
/// busy-waits the last millisecond before its deadline (it rounds the time left down to
/// whole milliseconds), so a longer poll costs less: with 500 ms, the three role producers'
/// threads were half an idle process's CPU.
const PRODUCER_POLL: Duration = Duration::from_secs(2);

/// How many records a role has handed to its producer whose delivery has not settled. When
/// the group takes partitions away, the consumer waits (within [`REVOKE_WAIT`]) until this is
/// zero before it lets them go: their next owner reads back what was written for them (case
/// records, escalation notices, snapshots) and must find everything this process sent.
/// Counted by the producer's delivery reports, so the wait needs no async runtime.
#[derive(Debug, Default)]
pub struct Unsettled {
    count: Mutex<usize>,
    drained: std::sync::Condvar,
}

/// The longest a revoke waits for the role's records in flight to settle.
pub const REVOKE_WAIT: Duration = Duration::from_secs(30);

impl Unsettled {
    fn add(&self, records: usize) {
        *self.count.lock().unwrap_or_else(|e| e.into_inner()) += records;
    }

    fn settle_one(&self) {
        self.settle(1);
    }

    fn settle(&self, records: usize) {
        let mut count = self.count.lock().unwrap_or_else(|e| e.into_inner());
        *count = count.saturating_sub(records);
        if *count == 0 {
            self.drained.notify_all();
        }
    }

    /// Records not settled yet.
    pub fn count(&self) -> usize {
        *self.count.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until every record handed to the producer has settled, at most `limit`; true if
    /// they have.
    pub fn wait_drained(&self, limit: Duration) -> bool {
        let count = self.count.lock().unwrap_or_else(|e| e.into_inner());
        let (count, _) = self
            .drained
            .wait_timeout_while(count, limit, |count| *count > 0)
            .unwrap_or_else(|e| e.into_inner());
        *count == 0
    }
}

/// One round of records handed to the producer: how many are not settled yet, and which
/// failed (by index). The last delivery report wakes the waiting role.
#[derive(Debug)]
pub struct DeliveryBatch {
    pending: std::sync::atomic::AtomicUsize,
    failed: Mutex<Vec<(usize, KafkaError)>>,
    settled: tokio::sync::Notify,
    unsettled: Arc<Unsettled>,
}

impl DeliveryBatch {
    fn new(records: usize, unsettled: &Arc<Unsettled>) -> Arc<DeliveryBatch> {
        unsettled.add(records);
        Arc::new(DeliveryBatch {
            pending: std::sync::atomic::AtomicUsize::new(records),
            failed: Mutex::new(Vec::new()),
            settled: tokio::sync::Notify::new(),
            unsettled: unsettled.clone(),
        })
    }

    /// One record is delivered, or failed with an error.
    fn settle(&self, failure: Option<(usize, KafkaError)>) {
        if let Some(failure) = failure {
            self.failed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(failure);
        }
        self.unsettled.settle_one();
        if self
            .pending
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel)
            == 1
        {
            self.settled.notify_one();
        }
    }

    /// Waits until every record is settled; returns the failures, by index.
    async fn all_settled(&self) -> Vec<(usize, KafkaError)> {
        while self.pending.load(std::sync::atomic::Ordering::Acquire) > 0 {
            self.settled.notified().await;
        }
        let mut failed =
            std::mem::take(&mut *self.failed.lock().unwrap_or_else(|e| e.into_inner()));
        failed.sort_by_key(|(index, _)| *index);
        failed
    }
}

/// Creates `role`'s producer from `config`, reporting its connectivity to `health` and the
/// records it has not settled yet to `unsettled`.
pub fn role_producer(
    mut config: ClientConfig,
    role: &'static str,
    health: Arc<Health>,
    metrics: Metrics,
    unsettled: Arc<Unsettled>,
) -> Result<RoleProducer, KafkaError> {
    health.set_producing(role, false);
    config.set("statistics.interval.ms", "1000");
    polled_producer(config, role, health, metrics, unsettled)
}

/// The transactional producer of one input partition (`processing.guarantee =
/// exactly_once`): `config` with `transactional_id`, initialised, which fences every earlier
/// producer with that id (the broker aborts its open transaction and refuses its writes from
/// then on). Its statistics are off: the role's own producer reports connectivity. Blocking.
pub fn partition_producer(
    config: &ClientConfig,
    transactional_id: &str,
    role: &'static str,
    health: Arc<Health>,
    metrics: Metrics,
    unsettled: Arc<Unsettled>,
    limit: Duration,
) -> Result<RoleProducer, KafkaError> {
    let mut config = config.clone();
    config
        .set("transactional.id", transactional_id)
        .set("statistics.interval.ms", "0");
    let producer = polled_producer(config, role, health, metrics, unsettled)?;
    let deadline = std::time::Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match producer.init_transactions(left.max(Duration::from_secs(1))) {
            Ok(()) => return Ok(producer),
            // A broker that is away or slow: ask again within the limit.
            Err(KafkaError::Transaction(e))
                if e.is_retriable() && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(error) => return Err(error),
        }
    }
}

fn polled_producer(
    config: ClientConfig,
    role: &'static str,
    health: Arc<Health>,
    metrics: Metrics,
    unsettled: Arc<Unsettled>,
) -> Result<RoleProducer, KafkaError> {
    let limits = RequestLimits::from_properties(|name| config.get(name).map(str::to_owned));
    let producer: Arc<BaseProducer<ProducerHealth>> =
        Arc::new(config.create_with_context(ProducerHealth::new(role, health, metrics))?);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (polled, stopped) = (producer.clone(), stop.clone());
    std::thread::Builder::new()
        .name(format!("{role}-producer"))
        .spawn(move || {
            while !stopped.load(std::sync::atomic::Ordering::Relaxed) {
                polled.poll(PRODUCER_POLL);
            }
        })
        .map_err(|_| KafkaError::ClientCreation("cannot start the producer thread".into()))?;
    Ok(RoleProducer {
        producer,
        unsettled,
        limits,
        _polling: Arc::new(StopPolling(stop)),
    })
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
    unsettled: Arc<Unsettled>,
    start_at_end: Vec<String>,
}

impl RoleContext {
    /// A context for `role` consuming in `group`; a revoke waits for `unsettled` to drain.
    pub fn new(
        role: &'static str,
        group: &str,
        metrics: Metrics,
        health: Arc<Health>,
        unsettled: Arc<Unsettled>,
    ) -> Self {
        RoleContext {
            role,
            group: group.to_owned(),
            metrics,
            health,
            changes: Mutex::new(Vec::new()),
            unsettled,
            start_at_end: Vec::new(),
        }
    }

    /// Partitions of these topics that the group has no committed offset for start at their
    /// end, not at the earliest (`kafka.start_position = "latest"` on external inputs).
    pub fn with_start_at_end(mut self, topics: Vec<String>) -> Self {
        self.start_at_end = topics;
        self
    }

    /// Assignment changes since the last call, oldest first.
    pub fn take_changes(&self) -> Vec<AssignmentChange> {
        std::mem::take(&mut *self.changes.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// The health the context reports to.
    pub fn health(&self) -> &Health {
        &self.health
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
        events::BrokerConnectivity {
            client: self.role,
            up,
        }
        .emit(&self.metrics);
        let now = std::time::Instant::now();
        let mut ends = Vec::new();
        for (topic_name, topic) in &statistics.topics {
            for (id, partition) in &topic.partitions {
                if *id < 0 {
                    continue;
                }
                if partition.consumer_lag >= 0 {
                    events::LagObserved {
                        group: &self.group,
                        topic: topic_name,
                        partition: *id,
                        lag: partition.consumer_lag,
                    }
                    .emit(&self.metrics);
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
        summarise_repeats(&self.metrics);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if all_brokers_down(&error) {
            self.health.set_connected(self.role, false);
            events::BrokerConnectivity {
                client: self.role,
                up: false,
            }
            .emit(&self.metrics);
        }
        report_client_error(&self.metrics, self.role, &error, reason);
    }

    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        client_log(self.role, level, fac, message);
    }
}

/// How long an assignment waits for the group's committed offsets of partitions that may
/// start at their end; on a timeout they start as configured for the consumer (earliest).
const COMMITTED_LOOKUP: Duration = Duration::from_secs(10);

/// Which newly assigned partitions start at their end: those of a `start_at_end` topic for
/// which the group has no committed offset (`committed` gives each partition's committed
/// offset, `None` when there is none).
pub fn partitions_starting_at_end(
    committed: &[((String, i32), Option<i64>)],
    start_at_end: &[String],
) -> Vec<(String, i32)> {
    committed
        .iter()
        .filter(|((topic, _), offset)| offset.is_none() && start_at_end.contains(topic))
        .map(|(partition, _)| partition.clone())
        .collect()
}

impl RoleContext {
    /// Sets the start of newly assigned partitions that have no committed offset to their
    /// end, for the `start_at_end` topics. Leaves the list alone if the lookup fails.
    fn start_new_partitions_at_end(
        &self,
        consumer: &BaseConsumer<Self>,
        assigned: &mut rdkafka::TopicPartitionList,
    ) {
        let mut candidates = rdkafka::TopicPartitionList::new();
        for element in assigned.elements() {
            if self.start_at_end.iter().any(|t| t == element.topic()) {
                candidates.add_partition(element.topic(), element.partition());
            }
        }
        if candidates.count() == 0 {
            return;
        }
        let committed = match consumer.committed_offsets(candidates, COMMITTED_LOOKUP) {
            Ok(committed) => committed,
            Err(error) => {
                events::KafkaClientFailed {
                    client: self.role,
                    error: &error,
                    reason: "could not read committed offsets to apply kafka.start_position; starting at the earliest",
                }
                .emit(&self.metrics);
                return;
            }
        };
        let found: Vec<((String, i32), Option<i64>)> = committed
            .elements()
            .iter()
            .map(|e| {
                let offset = match e.offset() {
                    rdkafka::Offset::Offset(offset) => Some(offset),
                    _ => None,
                };
                ((e.topic().to_owned(), e.partition()), offset)
            })
            .collect();
        for (topic, partition) in partitions_starting_at_end(&found, &self.start_at_end) {
            let _ = assigned.set_partition_offset(&topic, partition, rdkafka::Offset::End);
        }
    }
}

impl ConsumerContext for RoleContext {
    /// The default rebalance (rdkafka's), except that on an assignment the partitions of
    /// `start_at_end` topics without a committed offset are set to start at their end.
    fn rebalance(
        &self,
        base_consumer: &BaseConsumer<Self>,
        err: rdkafka::types::RDKafkaRespErr,
        tpl: &mut rdkafka::TopicPartitionList,
    ) {
        use rdkafka::consumer::RebalanceProtocol;
        use rdkafka::types::RDKafkaRespErr;
        let cooperative = matches!(
            base_consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                if !self.start_at_end.is_empty() {
                    self.start_new_partitions_at_end(base_consumer, tpl);
                }
                self.pre_rebalance(base_consumer, &Rebalance::Assign(tpl));
                let result = if cooperative {
                    base_consumer.incremental_assign(tpl)
                } else {
                    base_consumer.assign(tpl)
                };
                if let Err(error) = result {
                    events::RebalanceFailed {
                        role: self.role,
                        error: &error,
                    }
                    .emit(&self.metrics);
                }
                self.post_rebalance(base_consumer, &Rebalance::Assign(tpl));
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                self.pre_rebalance(base_consumer, &Rebalance::Revoke(tpl));
                let result = if cooperative {
                    base_consumer.incremental_unassign(tpl)
                } else {
                    base_consumer.unassign()
                };
                if let Err(error) = result {
                    events::RebalanceFailed {
                        role: self.role,
                        error: &error,
                    }
                    .emit(&self.metrics);
                }
                self.post_rebalance(base_consumer, &Rebalance::Revoke(tpl));
            }
            other => {
                let error = KafkaError::Rebalance(other.into());
                self.pre_rebalance(base_consumer, &Rebalance::Error(error.clone()));
                self.post_rebalance(base_consumer, &Rebalance::Error(error));
            }
        }
    }

    /// Before partitions go, what this process wrote for them must be on the broker: their
    /// next owner starts by reading it back. (The records of a batch are handed to the
    /// producer before the consumer is polled again, so all of them are counted here.)
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(list) = rebalance {
            let unsettled = self.unsettled.count();
            if unsettled > 0 && !self.unsettled.wait_drained(REVOKE_WAIT) {
                events::RevokedUnsettled {
                    role: self.role,
                    partitions: list.count(),
                    records: self.unsettled.count(),
                }
                .emit(&self.metrics);
            }
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let change = match rebalance {
            Rebalance::Assign(list) => AssignmentChange::Assigned(partitions(list)),
            Rebalance::Revoke(list) => AssignmentChange::Revoked(partitions(list)),
            Rebalance::Error(error) => {
                events::RebalanceFailed {
                    role: self.role,
                    error,
                }
                .emit(&self.metrics);
                return;
            }
        };
        let (event, partitions) = match &change {
            AssignmentChange::Assigned(p) => ("assign", p),
            AssignmentChange::Revoked(p) => ("revoke", p),
        };
        events::Rebalanced {
            role: self.role,
            group: &self.group,
            event,
            partitions,
        }
        .emit(&self.metrics);
        self.health.progress(self.role, |watch| match &change {
            AssignmentChange::Assigned(p) => watch.assigned(p),
            AssignmentChange::Revoked(p) => watch.revoked(p),
        });
        if matches!(change, AssignmentChange::Assigned(_)) {
            // Not ready until the role has restored what it needs for them.
            self.health.set_restored(self.role, false);
        }
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
    /// Headers, if any (none saves the client a native header list per record).
    pub headers: Option<OwnedHeaders>,
    /// What to send instead if the broker or the producer rejects this record for good (for
    /// a dead letter: the same without its value). `None`: such a rejection stops the role.
    pub fallback: Option<Box<Outgoing>>,
    /// The delivery round of its batch: handed to the producer only once every record of the
    /// batch's earlier rounds is delivered (see [`Outgoing::in_round`]). 0 for most.
    pub round: u8,
}

impl Outgoing {
    /// A record without a fallback.
    pub fn new(
        topic: &str,
        partition: Option<i32>,
        key: Option<Vec<u8>>,
        payload: Option<Vec<u8>>,
        headers: Option<OwnedHeaders>,
    ) -> Outgoing {
        Outgoing {
            topic: topic.to_owned(),
            partition,
            key,
            payload,
            headers,
            fallback: None,
            round: 0,
        }
    }

    /// This record is handed to the producer only once every record of its batch in an
    /// earlier round is delivered (at least once; a transaction makes a batch one unit
    /// anyway). For a role's state records: a crash in between leaves the state as it was
    /// before the batch, and the replay from the last commit makes the batch's records again,
    /// never the reverse (state that says the batch happened, or that has forgotten what the
    /// batch consumed, while some of the batch's records are lost). State that records what
    /// other state consumed goes a round later still.
    pub fn in_round(mut self, round: u8) -> Outgoing {
        self.round = round;
        self
    }

    fn record(
        &self,
        batch: &Arc<DeliveryBatch>,
        index: usize,
    ) -> BaseRecord<'_, [u8], [u8], DeliveryTicket> {
        let mut record = BaseRecord::with_opaque_to(&self.topic, Box::new((batch.clone(), index)));
        if let Some(headers) = &self.headers {
            record = record.headers(headers.clone());
        }
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

/// Delivers every record: hands those of round 0 to the producer now (so a revoke that
/// follows waits for them, see [`Unsettled`]), each later round ([`Outgoing::in_round`]) once
/// every record of the rounds before is delivered (a revoke meanwhile waits for those too),
/// and returns the future that waits for their delivery. A round with more for one
/// partition than a produce request carries goes in [`waves`], each handed over once the
/// one before is delivered, as rounds are. Transient failures are retried with
/// backoff until the broker takes the record (a broker outage pauses the role, it never drops
/// a record). A record rejected for good is replaced by its fallback; without one, the role
/// gets the error (and the later rounds are not sent).
pub fn deliver_all(
    producer: &RoleProducer,
    records: Vec<Outgoing>,
    metrics: &Metrics,
) -> impl std::future::Future<Output = Result<(), DeliveryError>> + Send + 'static {
    let mut rounds: BTreeMap<u8, Vec<Outgoing>> = BTreeMap::new();
    for record in records {
        rounds.entry(record.round).or_default().push(record);
    }
    let partitions = |topic: &str| producer.context().partitions.get(topic);
    let mut steps = rounds
        .into_values()
        .flat_map(|round| waves(round, &partitions, producer.limits));
    let first = steps.next().unwrap_or_default();
    let later: Vec<(Vec<Outgoing>, Reserved)> = steps
        .map(|records| {
            let reserved = Reserved::new(&producer.unsettled, records.len());
            (records, reserved)
        })
        .collect();
    let handed = hand_over(producer, &first);
    let (producer, metrics) = (producer.clone(), metrics.clone());
    async move {
        deliver_rounds(&producer, &first, handed, &metrics).await?;
        for (records, reserved) in later {
            let handed = hand_over(&producer, &records);
            drop(reserved);
            deliver_rounds(&producer, &records, handed, &metrics).await?;
        }
        Ok(())
    }
}

/// Records counted as unsettled before they are handed to the producer; the count is given
/// back when dropped (once they are handed over, and so counted by their own round, or when
/// their batch failed before).
struct Reserved {
    unsettled: Arc<Unsettled>,
    records: usize,
}

impl Reserved {
    fn new(unsettled: &Arc<Unsettled>, records: usize) -> Reserved {
        unsettled.add(records);
        Reserved {
            unsettled: unsettled.clone(),
            records,
        }
    }
}

impl Drop for Reserved {
    fn drop(&mut self) {
        self.unsettled.settle(self.records);
    }
}

/// Waits for `first` (the round `records` were handed over in) and retries what failed
/// transiently, until every record is delivered or one is rejected for good without a
/// fallback.
async fn deliver_rounds(
    producer: &RoleProducer,
    records: &[Outgoing],
    first: Arc<DeliveryBatch>,
    metrics: &Metrics,
) -> Result<(), DeliveryError> {
    let mut round = Some(first);
    let mut pending: Vec<&Outgoing> = records.iter().collect();
    let mut backoff = Duration::from_millis(100);
    while !pending.is_empty() {
        let batch = match round.take() {
            Some(batch) => batch,
            None => hand_over_refs(producer, &pending),
        };
        let failures = batch.all_settled().await;
        let mut retry = Vec::new();
        let mut transient = false;
        for (index, error) in failures {
            let record = pending[index];
            if !is_permanent(&error) {
                events::DeliveryRetried {
                    topic: &record.topic,
                    error: &error,
                }
                .emit(metrics);
                transient = true;
                retry.push(record);
                continue;
            }
            events::RecordRejected {
                topic: &record.topic,
                error: &error,
                fallback: record.fallback.is_some(),
            }
            .emit(metrics);
            match &record.fallback {
                Some(fallback) => {
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

fn hand_over(producer: &RoleProducer, records: &[Outgoing]) -> Arc<DeliveryBatch> {
    let refs: Vec<&Outgoing> = records.iter().collect();
    hand_over_refs(producer, &refs)
}

/// Hands `records` to the producer, now, and returns the round that counts their delivery
/// reports. A full producer queue (the broker far behind) is waited out on this thread.
fn hand_over_refs(producer: &RoleProducer, records: &[&Outgoing]) -> Arc<DeliveryBatch> {
    let batch = DeliveryBatch::new(records.len(), &producer.unsettled);
    for (index, outgoing) in records.iter().enumerate() {
        if let Err(error) = send_when_room(producer, outgoing.record(&batch, index), &|| false) {
            // Not handed over, so no delivery report will settle it.
            batch.settle(Some((index, error)));
        }
    }
    batch
}

/// Hands `record` to the producer, waiting on this thread while its queue is full (the
/// broker far behind or away) unless `give_up` says so ([`KafkaError::Canceled`]).
fn send_when_room(
    producer: &RoleProducer,
    mut record: BaseRecord<'_, [u8], [u8], DeliveryTicket>,
    give_up: &dyn Fn() -> bool,
) -> Result<(), KafkaError> {
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                if give_up() {
                    return Err(KafkaError::Canceled);
                }
                record = back;
                std::thread::sleep(Duration::from_millis(5));
            }
            Err((error, _)) => return Err(error),
        }
    }
}

/// Commits the stored offsets (if `commit`), leaves the group and closes the consumer, on a
/// blocking thread and for at most `limit`: with the broker gone this cannot finish, and the
/// stored offsets are then simply replayed by the next owner, which makes the same decisions.
pub async fn close_consumer(
    consumer: StreamConsumer<RoleContext>,
    role: &'static str,
    metrics: &Metrics,
    commit: bool,
    limit: Duration,
) {
    let task_metrics = metrics.clone();
    let closing = tokio::task::spawn_blocking(move || {
        if commit {
            if let Err(error) = consumer.commit_consumer_state(CommitMode::Sync) {
                events::FinalCommitSkipped {
                    role,
                    error: &error,
                }
                .emit(&task_metrics);
            }
        }
        consumer.unsubscribe();
        drop(consumer);
    });
    match tokio::time::timeout(limit, closing).await {
        Ok(_) => events::Closed { role }.emit(metrics),
        Err(_) => events::ClosedWithoutCommit { role }.emit(metrics),
    }
}

/// How long one attempt of a transaction may block on the broker (adding offsets, the
/// commit, an abort): a commit takes milliseconds with the broker up; with it down, the attempt
/// ends after this and the transaction is aborted and tried again.
pub const TRANSACTION_ATTEMPT: Duration = Duration::from_secs(10);

/// Produces `records` and commits the input `offsets` (the next offset to read, per
/// partition) in one Kafka transaction, retrying the whole transaction after abortable or
/// retriable errors. Blocking. Returns an error when the producer can no longer be used
/// (fenced by a newer instance, or a fatal error) or a record is rejected for good (records
/// that cannot fit are replaced by their fallback before they get here, see
/// [`fit_records`]). Once `stopping` says so, a failed attempt is aborted and not tried
/// again: the result is then [`KafkaError::Canceled`] (nothing of it committed), so that a
/// process told to stop during an outage stops within about one attempt.
pub fn commit_transaction(
    producer: &RoleProducer,
    records: &[Outgoing],
    offsets: &rdkafka::TopicPartitionList,
    group: &rdkafka::consumer::ConsumerGroupMetadata,
    metrics: &Metrics,
    stopping: &dyn Fn() -> bool,
) -> Result<(), KafkaError> {
    let timeout = TRANSACTION_ATTEMPT;
    let mut backoff = Duration::from_millis(100);
    loop {
        let attempt = (|| {
            producer.begin_transaction()?;
            // Delivery is confirmed by the commit below, which fails if any record failed.
            // (No waves here: the commit's flush waits anyway, and on noida-db a flush
            // between waves cost more than it saved, see BENCHMARKS.md, session 10.)
            let batch = DeliveryBatch::new(records.len(), &producer.unsettled);
            for (index, r) in records.iter().enumerate() {
                if let Err(error) = send_when_room(producer, r.record(&batch, index), stopping) {
                    // Neither this record nor the ones after it are in flight.
                    (index..records.len()).for_each(|_| batch.settle(None));
                    return Err(error);
                }
            }
            if offsets.count() > 0 {
                producer.send_offsets_to_transaction(offsets, group, timeout)?;
            }
            producer.commit_transaction(timeout)
        })();
        let error = match attempt {
            Ok(()) => return Ok(()),
            Err(error) => error,
        };
        let given_up = matches!(error, KafkaError::Canceled);
        if !given_up && !is_retried_in_transaction(&error) {
            if !is_fatal_in_transaction(&error) {
                let _ = producer.abort_transaction(timeout);
            }
            return Err(error);
        }
        let _ = producer.abort_transaction(timeout);
        if given_up || stopping() {
            return Err(KafkaError::Canceled);
        }
        events::TransactionRetried { error: &error }.emit(metrics);
        std::thread::sleep(backoff);
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

/// Whether a transaction error leaves the producer unusable: fenced by a newer producer with
/// its transactional id (another process owns the partition now), or another fatal error.
pub fn is_fatal_in_transaction(error: &KafkaError) -> bool {
    use RDKafkaErrorCode as C;
    match error {
        KafkaError::Transaction(e) => {
            e.is_fatal() || matches!(e.code(), C::ProducerFenced | C::InvalidProducerEpoch)
        }
        _ => false,
    }
}

/// Whether a failed transaction is aborted and tried again: not when the producer is fenced or
/// in a fatal state, a record is rejected for good, or the group has moved on without this
/// member (an illegal generation or unknown member when the offsets are sent: the batch was
/// decided for partitions that may belong to another process now, so the role stops and
/// starts again from what is committed).
pub fn is_retried_in_transaction(error: &KafkaError) -> bool {
    use RDKafkaErrorCode as C;
    if is_fatal_in_transaction(error) || is_permanent(error) {
        return false;
    }
    match error {
        KafkaError::Transaction(e) => !matches!(
            e.code(),
            C::IllegalGeneration | C::UnknownMemberId | C::FencedInstanceId
        ),
        _ => true,
    }
}

/// A partition and the offset committed on it (the next to read), `None` where none is.
pub type CommittedOffset = ((String, i32), Option<i64>);

/// The offsets `group` has committed on `partitions` (the next offset to read), `None` where
/// it has none. Blocking.
pub fn committed_offsets(
    kafka: &KafkaSettings,
    group: &str,
    partitions: &[(String, i32)],
    limit: Duration,
) -> Result<Vec<CommittedOffset>, KafkaError> {
    if partitions.is_empty() {
        return Ok(Vec::new());
    }
    let mut config = client_config(kafka, "npsflow-offsets");
    config
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed");
    let consumer: BaseConsumer = config.create()?;
    let mut list = rdkafka::TopicPartitionList::new();
    for (topic, partition) in partitions {
        list.add_partition(topic, *partition);
    }
    let committed = consumer.committed_offsets(list, limit)?;
    Ok(partitions
        .iter()
        .map(|(topic, partition)| {
            let offset =
                committed
                    .find_partition(topic, *partition)
                    .and_then(|e| match e.offset() {
                        rdkafka::Offset::Offset(offset) => Some(offset),
                        _ => None,
                    });
            ((topic.clone(), *partition), offset)
        })
        .collect())
}

/// Replaces every record that cannot fit in `max_bytes` (its key, value and headers, with a
/// little room for the record's framing) by its fallback. A transaction cannot swap one
/// record for another after the broker rejects it, so this is decided before sending.
pub fn fit_records(records: Vec<Outgoing>, max_bytes: usize, metrics: &Metrics) -> Vec<Outgoing> {
    records
        .into_iter()
        .map(|record| {
            let headers: usize = record.headers.as_ref().map_or(0, |headers| {
                headers
                    .iter()
                    .map(|h| h.key.len() + h.value.map_or(0, <[u8]>::len) + 16)
                    .sum()
            });
            let size = record.key.as_ref().map_or(0, Vec::len)
                + record.payload.as_ref().map_or(0, Vec::len)
                + headers
                + 128;
            match record.fallback {
                Some(fallback) if size > max_bytes => {
                    events::RecordShrunk {
                        topic: &record.topic,
                        size,
                    }
                    .emit(metrics);
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

/// The last offset of each (topic, partition) among `messages` (topic, partition, offset).
pub fn last_offsets<'a>(
    messages: impl IntoIterator<Item = (&'a str, i32, i64)>,
) -> Vec<(String, i32, i64)> {
    let mut offsets: Vec<(String, i32, i64)> = Vec::new();
    for (topic, partition, offset) in messages {
        match offsets
            .iter_mut()
            .find(|(t, p, _)| *p == partition && t == topic)
        {
            Some(entry) => entry.2 = entry.2.max(offset),
            None => offsets.push((topic.to_owned(), partition, offset)),
        }
    }
    offsets
}

/// Where a message is: topic, partition, offset.
pub fn position<M: Message>(message: &M) -> (&str, i32, i64) {
    (message.topic(), message.partition(), message.offset())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_uncommitted_partitions_of_start_at_end_topics_start_at_their_end() {
        let external = vec!["survey.responses".to_owned()];
        let committed = vec![
            (("survey.responses".to_owned(), 0), None),
            (("survey.responses".to_owned(), 1), Some(42)),
            (("npsflow.responses-by-id".to_owned(), 0), None),
        ];
        assert_eq!(
            partitions_starting_at_end(&committed, &external),
            vec![("survey.responses".to_owned(), 0)]
        );
        assert!(partitions_starting_at_end(&committed, &[]).is_empty());
    }

    /// A revoke's wait ends when the last record in flight settles, and not before; with
    /// records that never settle it gives up at its limit.
    #[test]
    fn the_revoke_fence_waits_for_every_record_in_flight() {
        let unsettled = Arc::new(Unsettled::default());
        let batch = DeliveryBatch::new(2, &unsettled);
        assert_eq!(unsettled.count(), 2);
        assert!(
            !unsettled.wait_drained(Duration::from_millis(50)),
            "nothing settled yet"
        );
        let settling = std::thread::spawn(move || {
            batch.settle(None);
            std::thread::sleep(Duration::from_millis(200));
            batch.settle(Some((1, KafkaError::Canceled)));
        });
        let started = std::time::Instant::now();
        assert!(unsettled.wait_drained(Duration::from_secs(10)));
        assert!(
            started.elapsed() >= Duration::from_millis(150),
            "returned before the last record settled"
        );
        assert_eq!(unsettled.count(), 0);
        settling.join().expect("settled");
    }

    /// A mock cluster of two brokers with one partition per topic, each led by the broker
    /// given, a producer on it, and a way to count a topic's records.
    fn two_brokers(
        leaders: &[(&str, i32)],
    ) -> (
        rdkafka::mocking::MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
        RoleProducer,
        impl Fn(&str) -> i64,
    ) {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        let cluster = rdkafka::mocking::MockCluster::new(2).expect("mock cluster");
        let brokers = cluster.bootstrap_servers();
        for (topic, leader) in leaders {
            cluster.create_topic(topic, 1, 1).expect("topic");
            cluster
                .partition_leader(topic, 0, Some(*leader))
                .expect("leader");
        }
        let env = vec![("NPSFLOW__KAFKA__BROKERS".to_owned(), brokers.clone())];
        let config = crate::Config::load(None, env).expect("config");
        let producer = role_producer(
            producer_config(&config.settings.kafka, "test", 1_000_000),
            "test",
            Arc::new(Health::default()),
            Metrics::new(),
            Arc::new(Unsettled::default()),
        )
        .expect("producer");
        let count = move |topic: &str| {
            let consumer: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", &brokers)
                .set("group.id", format!("count-{topic}"))
                .set("enable.auto.commit", "false")
                .create()
                .expect("consumer");
            let (low, high) = consumer
                .fetch_watermarks(topic, 0, Duration::from_secs(10))
                .expect("watermarks");
            high - low
        };
        (cluster, producer, count)
    }

    /// Delivers one record to each topic, so that every partition's leader is known.
    async fn warm_up(producer: &RoleProducer, topics: &[&str]) {
        let records = topics
            .iter()
            .map(|t| Outgoing::new(t, Some(0), None, Some(b"warm".to_vec()), None))
            .collect();
        deliver_all(producer, records, &Metrics::new())
            .await
            .expect("delivered");
    }

    /// Brings `broker` back up and waits for `delivery` to finish, delivered.
    async fn delivered_once_back(
        cluster: &rdkafka::mocking::MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
        broker: i32,
        delivery: tokio::task::JoinHandle<Result<(), DeliveryError>>,
    ) {
        cluster.broker_up(broker).expect("up");
        tokio::time::timeout(Duration::from_secs(60), delivery)
            .await
            .expect("delivered once the broker is back")
            .expect("joined")
            .expect("delivered");
    }

    /// Records of round 1 reach the broker only once the batch's records of round 0 are
    /// delivered, and a revoke meanwhile waits for them too: with the broker that leads the
    /// other records' partition down, the state record stays unsent (and counted as
    /// unsettled); once it is back, both are delivered.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn state_records_are_sent_after_the_rest_of_their_batch() {
        let (cluster, producer, count) = two_brokers(&[("outputs", 2), ("state", 1)]);
        warm_up(&producer, &["outputs", "state"]).await;
        cluster.broker_down(2).expect("down");
        let delivery = tokio::spawn(deliver_all(
            &producer,
            vec![
                Outgoing::new("state", Some(0), None, Some(b"state".to_vec()), None).in_round(1),
                Outgoing::new("outputs", Some(0), None, Some(b"notice".to_vec()), None),
            ],
            &Metrics::new(),
        ));
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(!delivery.is_finished(), "delivered with a broker down");
        assert_eq!(count("state"), 1, "the state record went ahead of the rest");
        assert_eq!(
            producer.unsettled.count(),
            2,
            "a revoke would not wait for both"
        );
        delivered_once_back(&cluster, 2, delivery).await;
        assert_eq!((count("outputs"), count("state")), (2, 2));
        assert_eq!(producer.unsettled.count(), 0);
    }

    /// Round 2 waits for round 1 as round 1 waits for round 0: with the broker leading round
    /// 1's partition down, round 0 is delivered and round 2 (on the broker that is up) stays
    /// unsent until round 1 is delivered.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn each_round_waits_for_the_one_before() {
        let (cluster, producer, count) =
            two_brokers(&[("outputs", 1), ("cases", 2), ("consumed", 1)]);
        warm_up(&producer, &["outputs", "cases", "consumed"]).await;
        cluster.broker_down(2).expect("down");
        let record = |topic: &str, round: u8| {
            Outgoing::new(topic, Some(0), None, Some(topic.as_bytes().to_vec()), None)
                .in_round(round)
        };
        let delivery = tokio::spawn(deliver_all(
            &producer,
            vec![
                record("consumed", 2),
                record("cases", 1),
                record("outputs", 0),
            ],
            &Metrics::new(),
        ));
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(!delivery.is_finished(), "delivered with a broker down");
        assert_eq!(count("outputs"), 2, "round 0 is not held back");
        assert_eq!(count("consumed"), 1, "round 2 went ahead of round 1");
        assert_eq!(producer.unsettled.count(), 2, "a revoke would not wait");
        delivered_once_back(&cluster, 2, delivery).await;
        assert_eq!(
            (count("outputs"), count("cases"), count("consumed")),
            (2, 2, 2)
        );
        assert_eq!(producer.unsettled.count(), 0);
    }

    /// A round with more for one partition than a produce request carries goes in waves:
    /// what does not fit waits for the whole first wave, as a later round would (here the
    /// first wave cannot finish, its record for the other topic's partition being on a
    /// broker that is down), and a revoke meanwhile waits for it too. Once the broker is
    /// back, every record is delivered once, in its partition's order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_partitions_share_beyond_one_request_waits_for_the_wave_before() {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        let (cluster, producer, count) = two_brokers(&[("cases", 1), ("alerts", 2)]);
        warm_up(&producer, &["cases", "alerts"]).await;
        cluster.broker_down(2).expect("down");
        // 12 cases of 100 kB: 9 fit the 1 MB of one request, 3 wait for the next wave.
        let mut records: Vec<Outgoing> = (0..12u8)
            .map(|i| Outgoing::new("cases", Some(0), None, Some(vec![i; 100_000]), None))
            .collect();
        records.push(Outgoing::new(
            "alerts",
            Some(0),
            None,
            Some(b"a".to_vec()),
            None,
        ));
        let delivery = tokio::spawn(deliver_all(&producer, records, &Metrics::new()));
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(!delivery.is_finished(), "delivered with a broker down");
        assert_eq!(
            count("cases"),
            1 + 9,
            "the second wave went ahead of the first"
        );
        assert_eq!(producer.unsettled.count(), 1 + 3, "a revoke would not wait");
        delivered_once_back(&cluster, 2, delivery).await;
        assert_eq!((count("cases"), count("alerts")), (1 + 12, 2));
        assert_eq!(producer.unsettled.count(), 0);
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", cluster.bootstrap_servers())
            .set("group.id", "read-cases")
            .set("auto.offset.reset", "earliest")
            .create()
            .expect("consumer");
        let mut assignment = rdkafka::TopicPartitionList::new();
        assignment
            .add_partition_offset("cases", 0, rdkafka::Offset::Offset(1))
            .expect("partition");
        consumer.assign(&assignment).expect("assign");
        let mut firsts = Vec::new();
        while firsts.len() < 12 {
            if let Some(message) = consumer.poll(Duration::from_secs(10)) {
                let message = message.expect("message");
                firsts.push(message.payload().expect("payload")[0]);
            }
        }
        assert_eq!(firsts, (0..12u8).collect::<Vec<_>>());
    }

    /// A transaction whose record the producer refuses at once (too large for it) fails
    /// with that error, and leaves nothing counted as unsettled: the records not handed over
    /// will never have a delivery report, so a revoke must not wait for them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_transaction_with_a_refused_record_leaves_nothing_unsettled() {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        let (cluster, _, _) = two_brokers(&[("cases", 1)]);
        let env = vec![(
            "NPSFLOW__KAFKA__BROKERS".to_owned(),
            cluster.bootstrap_servers(),
        )];
        let config = crate::Config::load(None, env).expect("config");
        let producer = tokio::task::spawn_blocking(move || {
            partition_producer(
                &producer_config(&config.settings.kafka, "txn-test", 1_000_000),
                "txn-test-input-0",
                "test",
                Arc::new(Health::default()),
                Metrics::new(),
                Arc::new(Unsettled::default()),
                Duration::from_secs(30),
            )
        })
        .await
        .expect("joined")
        .expect("transactional producer");
        let group: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", cluster.bootstrap_servers())
            .set("group.id", "txn-test")
            .create()
            .expect("consumer");
        let metadata = group.group_metadata().expect("group metadata");
        let record =
            |bytes: usize| Outgoing::new("cases", Some(0), None, Some(vec![1; bytes]), None);
        let records = vec![record(10), record(3_000_000), record(10)];
        let committing = producer.clone();
        let result = tokio::task::spawn_blocking(move || {
            commit_transaction(
                &committing,
                &records,
                &rdkafka::TopicPartitionList::new(),
                &metadata,
                &Metrics::new(),
                &|| false,
            )
        })
        .await
        .expect("joined");
        let error = result.expect_err("a record too large for the producer");
        assert!(is_permanent(&error), "{error}");
        let drained = tokio::task::spawn_blocking(move || {
            producer.unsettled.wait_drained(Duration::from_secs(10))
        })
        .await
        .expect("joined");
        assert!(drained, "records never handed over are still counted");
    }

    /// A partition's end is progress, not a fault, in both forms the client delivers it:
    /// neither is logged nor counted as a warning; a real client error is.
    #[test]
    fn a_partition_end_is_not_a_client_error() {
        use crate::metrics::Metrics;
        let metrics = Metrics::new();
        let counted = |m: &Metrics| m.warning_count(events::KafkaClientFailed::NAME);
        assert!(is_partition_end(&KafkaError::PartitionEOF(2)));
        let from_callback = KafkaError::Global(RDKafkaErrorCode::PartitionEOF);
        assert!(is_partition_end(&from_callback));
        report_client_error(&metrics, "table-reader", &from_callback, "fetch");
        assert_eq!(counted(&metrics), 0);
        let down = KafkaError::Global(RDKafkaErrorCode::AllBrokersDown);
        assert!(!is_partition_end(&down));
        report_client_error(&metrics, "table-reader", &down, "connect");
        assert_eq!(counted(&metrics), 1);
    }
}
