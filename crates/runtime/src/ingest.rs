//! The ingest role, in two steps on one consumer group:
//!
//! 1. Repartition: messages from `survey.responses` are validated; invalid ones go to the
//!    dead-letter topic byte-for-byte, valid ones are forwarded unchanged (with their
//!    original key and source coordinates in headers) to the internal topic
//!    `npsflow.responses-by-id`, keyed by `response_id`. So every copy of a response, whatever
//!    key or partition it was sent with, lands on one partition of that topic.
//! 2. Decide: messages from the repartition topic get their outcome from the core (duplicate,
//!    too old, future, accepted), detractors get an alert, and accepted responses become
//!    segment deltas. Dead letters are rebuilt exactly as the message was received.
//!
//! Both steps deliver what a batch caused before storing the batch's offsets (one commit
//! point per batch); a message too large to dead-letter whole is dead-lettered without its
//! value.

use std::sync::Arc;
use std::time::Instant;

use npsflow_core::{repartition_key, ClockKind, Ingest, IngestSpec, Route, Source};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Header, Headers, OwnedHeaders, OwnedMessage};
use rdkafka::producer::Producer;
use rdkafka::Message;
use tokio::sync::watch;
use tracing::info;

use crate::config::{self, Config, Guarantee};
use crate::health::Health;
use crate::kafka::{self, AssignmentChange, Outgoing, RoleContext};
use crate::metrics::Metrics;
use crate::{wall_now, RuntimeError};

/// The role's name in logs, metrics and health.
pub const ROLE: &str = "ingest";

/// Header names on dead letters, forwarded messages and alerts.
pub mod headers {
    /// Machine-readable reason code.
    pub const ERROR: &str = "npsflow-error";
    /// Human-readable reason (never quotes the message).
    pub const ERROR_DETAIL: &str = "npsflow-error-detail";
    /// Topic the message came from.
    pub const SOURCE_TOPIC: &str = "npsflow-source-topic";
    /// Partition the message came from.
    pub const SOURCE_PARTITION: &str = "npsflow-source-partition";
    /// Offset of the message.
    pub const SOURCE_OFFSET: &str = "npsflow-source-offset";
    /// Size in bytes of a message dead-lettered without its value.
    pub const ORIGINAL_SIZE: &str = "npsflow-original-size";
}

/// The core's ingest spec from the configuration.
pub fn spec(config: &Config) -> IngestSpec {
    IngestSpec {
        windows: config.windows.clone(),
        segments: config.segments.clone(),
        routing: config.routing.clone(),
        dedupe_horizon: config.dedupe_horizon,
        dedupe_capacity: config.settings.dedupe.capacity,
        clock: match config.settings.windows.clock {
            config::ClockKind::Wall => ClockKind::Wall,
            config::ClockKind::EventTime => ClockKind::EventTime,
        },
    }
}

/// The first bytes of a message wrapped for the repartition topic.
const ENVELOPE_MAGIC: &[u8] = b"NPF1";

/// A message as it was received on the input topic: where, its key, headers and bytes.
struct Received<'a> {
    topic: &'a str,
    partition: i32,
    offset: i64,
    key: Option<&'a [u8]>,
    /// The original headers, without the ones npsflow added when forwarding.
    headers: Vec<Header<'a, &'a [u8]>>,
    payload: Option<&'a [u8]>,
}

impl<'a> Received<'a> {
    /// A message read from the input topic itself.
    fn direct<M: Message>(message: &'a M) -> Received<'a> {
        Received {
            topic: message.topic(),
            partition: message.partition(),
            offset: message.offset(),
            key: message.key(),
            headers: message
                .headers()
                .map_or_else(Vec::new, |h| h.iter().collect()),
            payload: message.payload(),
        }
    }

    /// A message read from the repartition topic: the original, unwrapped from the envelope
    /// the repartition step put it in. A message that is not an envelope stands for itself.
    fn forwarded<M: Message>(message: &'a M) -> Received<'a> {
        message
            .payload()
            .and_then(Received::from_envelope)
            .unwrap_or_else(|| Received::direct(message))
    }

    /// The message wrapped for the repartition topic, so that it carries everything a dead
    /// letter needs: `NPF1`, source partition (i32) and offset (i64), source topic, key (or
    /// none), header count and headers, then the original bytes. Big-endian lengths; -1
    /// stands for a null key, header value or payload. Kept in the value rather than in
    /// Kafka headers, which some brokers store at a high cost per header.
    fn to_envelope(&self) -> Vec<u8> {
        fn bytes(out: &mut Vec<u8>, value: Option<&[u8]>) {
            match value {
                Some(v) => {
                    out.extend_from_slice(&(v.len() as i32).to_be_bytes());
                    out.extend_from_slice(v);
                }
                None => out.extend_from_slice(&(-1i32).to_be_bytes()),
            }
        }
        let payload = self.payload.unwrap_or_default();
        let mut out = Vec::with_capacity(payload.len() + 64);
        out.extend_from_slice(ENVELOPE_MAGIC);
        out.extend_from_slice(&self.partition.to_be_bytes());
        out.extend_from_slice(&self.offset.to_be_bytes());
        bytes(&mut out, Some(self.topic.as_bytes()));
        bytes(&mut out, self.key);
        out.extend_from_slice(&(self.headers.len() as i32).to_be_bytes());
        for header in &self.headers {
            bytes(&mut out, Some(header.key.as_bytes()));
            bytes(&mut out, header.value);
        }
        bytes(&mut out, self.payload);
        out
    }

    /// The message inside an envelope (see [`Received::to_envelope`]), if it is one.
    fn from_envelope(envelope: &'a [u8]) -> Option<Received<'a>> {
        struct Reader<'a>(&'a [u8]);
        impl<'a> Reader<'a> {
            fn take(&mut self, n: usize) -> Option<&'a [u8]> {
                let (head, rest) = (self.0.get(..n)?, self.0.get(n..)?);
                self.0 = rest;
                Some(head)
            }
            fn i32(&mut self) -> Option<i32> {
                Some(i32::from_be_bytes(self.take(4)?.try_into().ok()?))
            }
            fn i64(&mut self) -> Option<i64> {
                Some(i64::from_be_bytes(self.take(8)?.try_into().ok()?))
            }
            fn bytes(&mut self) -> Option<Option<&'a [u8]>> {
                match self.i32()? {
                    -1 => Some(None),
                    n => Some(Some(self.take(usize::try_from(n).ok()?)?)),
                }
            }
            fn text(&mut self) -> Option<&'a str> {
                std::str::from_utf8(self.bytes()??).ok()
            }
        }
        let mut r = Reader(envelope.strip_prefix(ENVELOPE_MAGIC)?);
        let partition = r.i32()?;
        let offset = r.i64()?;
        let topic = r.text()?;
        let key = r.bytes()?;
        let count = usize::try_from(r.i32()?).ok()?;
        let mut headers = Vec::with_capacity(count.min(1024));
        for _ in 0..count {
            let key = r.text()?;
            let value = r.bytes()?;
            headers.push(Header { key, value });
        }
        let payload = r.bytes()?;
        r.0.is_empty().then_some(Received {
            topic,
            partition,
            offset,
            key,
            headers,
            payload,
        })
    }

    fn source(&self) -> Source {
        Source {
            partition: self.partition,
            offset: self.offset,
        }
    }

    /// The original headers followed by `extra` and the source coordinates.
    fn headers_with(&self, extra: &[(&str, &[u8])]) -> OwnedHeaders {
        let mut out = OwnedHeaders::new_with_capacity(self.headers.len() + extra.len() + 3);
        for header in &self.headers {
            out = out.insert(Header {
                key: header.key,
                value: header.value,
            });
        }
        for (key, value) in extra {
            out = out.insert(Header {
                key,
                value: Some(*value),
            });
        }
        source_headers(out, self.topic, self.partition, self.offset)
    }

    /// The dead letter of this message: its original key, bytes and headers, plus why and
    /// where it came from. Its fallback, used when it cannot be written whole, has no value
    /// and says the original size.
    fn dead_letter(&self, topic: &str, code: &str, detail: &str) -> Outgoing {
        let size = self.payload.map_or(0, <[u8]>::len).to_string();
        let without_value = Outgoing::new(
            topic,
            None,
            self.key.map(<[u8]>::to_vec),
            None,
            self.headers_with(&[
                (headers::ERROR, code.as_bytes()),
                (headers::ERROR_DETAIL, detail.as_bytes()),
                (headers::ORIGINAL_SIZE, size.as_bytes()),
            ]),
        );
        Outgoing {
            fallback: Some(Box::new(without_value)),
            ..Outgoing::new(
                topic,
                None,
                self.key.map(<[u8]>::to_vec),
                self.payload.map(<[u8]>::to_vec),
                self.headers_with(&[
                    (headers::ERROR, code.as_bytes()),
                    (headers::ERROR_DETAIL, detail.as_bytes()),
                ]),
            )
        }
    }
}

/// Where a message of the repartition topic was first read, and its bytes: what the
/// duplicate memory is rebuilt from.
pub fn forwarded_source<M: Message>(message: &M) -> (Source, Vec<u8>) {
    let received = Received::forwarded(message);
    (
        received.source(),
        received.payload.unwrap_or_default().to_vec(),
    )
}

fn source_headers(base: OwnedHeaders, topic: &str, partition: i32, offset: i64) -> OwnedHeaders {
    base.insert(Header {
        key: headers::SOURCE_TOPIC,
        value: Some(topic),
    })
    .insert(Header {
        key: headers::SOURCE_PARTITION,
        value: Some(&partition.to_string()),
    })
    .insert(Header {
        key: headers::SOURCE_OFFSET,
        value: Some(&offset.to_string()),
    })
}

/// Step 1 for one input message: forward it keyed by `response_id`, or dead-letter it.
fn repartition(
    message: &OwnedMessage,
    config: &Config,
    metrics: &Metrics,
    records: &mut Vec<Outgoing>,
) {
    let topics = &config.settings.topics;
    let received = Received::direct(message);
    let payload = message.payload().unwrap_or_default();
    match repartition_key(payload, topics.max_message_bytes as usize) {
        Ok(response_id) => records.push(Outgoing::new(
            &topics.responses_by_id,
            None,
            Some(response_id.as_bytes().to_vec()),
            Some(received.to_envelope()),
            OwnedHeaders::new(),
        )),
        Err(reason) => {
            let code = reason.code();
            metrics.events.with_label_values(&["invalid"]).inc();
            metrics.dead_letters.with_label_values(&[code]).inc();
            records.push(received.dead_letter(&topics.dead_letters, code, &reason.to_string()));
        }
    }
}

/// Step 2 for one repartitioned message: the core decides; dead letter, alert, delta.
fn decide(
    ingest: &mut Ingest,
    message: &OwnedMessage,
    now: npsflow_core::Timestamp,
    config: &Config,
    metrics: &Metrics,
    records: &mut Vec<Outgoing>,
) {
    let topics = &config.settings.topics;
    let received = Received::forwarded(message);
    let payload = received.payload.unwrap_or_default();
    let decision = ingest.process_forwarded(
        message.partition(),
        message.offset(),
        received.source(),
        payload,
        now,
    );
    if decision.is_resent() {
        metrics.resent.inc();
        return;
    }
    metrics.events.with_label_values(&[decision.outcome]).inc();
    if let Some((code, detail)) = &decision.dead_letter {
        metrics.dead_letters.with_label_values(&[code]).inc();
        records.push(received.dead_letter(&topics.dead_letters, code, detail));
    }
    if let Some(t) = decision.event_time {
        let lag = (now.millis() - t.millis()) as f64 / 1000.0;
        metrics.event_time_lag.observe(lag.max(0.0));
    }
    if decision.overflowed_values > 0 {
        metrics
            .overflowed
            .inc_by(u64::from(decision.overflowed_values));
    }
    if let Some(alert) = decision.alert {
        metrics
            .alerts
            .with_label_values(&["detractor", alert.severity.as_str()])
            .inc();
        let owner = match alert.route {
            Route::AccountManager => "account_manager",
            _ => alert.owner.as_str(),
        };
        metrics
            .alerts_by_owner
            .with_label_values(&[owner, alert.route.as_str()])
            .inc();
        records.push(Outgoing::new(
            &topics.followups,
            None,
            Some(alert.customer_id.clone().into_bytes()),
            Some(alert.to_json()),
            source_headers(
                OwnedHeaders::new(),
                received.topic,
                received.partition,
                received.offset,
            ),
        ));
    }
}

/// Decides a batch and builds the records it causes. Pure apart from reading the clock.
fn decide_batch(
    ingest: &mut Ingest,
    batch: &[OwnedMessage],
    config: &Config,
    metrics: &Metrics,
) -> Vec<Outgoing> {
    let topics = &config.settings.topics;
    let now = wall_now();
    let mut records = Vec::new();
    for message in batch {
        if message.topic() == topics.responses_by_id {
            decide(ingest, message, now, config, metrics, &mut records);
        } else {
            repartition(message, config, metrics, &mut records);
        }
    }
    for delta in ingest.take_deltas() {
        records.push(Outgoing::new(
            &topics.segment_deltas,
            None,
            Some(delta.segment.clone().into_bytes()),
            Some(delta.to_json()),
            OwnedHeaders::new(),
        ));
    }
    let max = kafka::max_record_bytes(topics.max_message_bytes as usize);
    kafka::fit_records(records, max, metrics)
}

/// The longest one partition's duplicate memory may take to read back before the role gives
/// up (and the process exits to be restarted). The consumer stays in its group meanwhile.
const RESTORE_LIMIT: std::time::Duration = std::time::Duration::from_secs(180);

/// Rebuilds the duplicate memory of newly assigned repartition-topic partitions from the
/// messages just before the group's committed offset, before any new message of them is
/// decided.
async fn restore_dedupe(
    config: &Config,
    health: &Health,
    ingest: &mut Ingest,
    partitions: Vec<i32>,
) -> Result<(), RuntimeError> {
    let count = config.settings.dedupe.restore_messages;
    if count == 0 {
        return Ok(());
    }
    health.set_restored(ROLE, false);
    let kafka = config.settings.kafka.clone();
    let group = config.settings.kafka.ingest_group.clone();
    let topic = config.settings.topics.responses_by_id.clone();
    let started = Instant::now();
    let wanted = partitions.clone();
    let mut restored = tokio::task::spawn_blocking(move || {
        crate::state::read_before_commit(&kafka, &group, &topic, &wanted, count, RESTORE_LIMIT)
    })
    .await
    .map_err(|e| RuntimeError::Task(e.to_string()))??;
    let now = wall_now();
    for partition in partitions {
        let messages = restored.remove(&partition).unwrap_or_default();
        ingest.forget_partition(partition);
        for (source, payload) in &messages {
            ingest.remember(partition, *source, payload, now);
        }
        info!(
            partition,
            messages = messages.len(),
            millis = started.elapsed().as_millis() as u64,
            "duplicate memory restored"
        );
    }
    health.set_restored(ROLE, true);
    Ok(())
}

/// Runs the ingest role until `shutdown` turns true: then finishes the batch in flight,
/// commits and leaves the group.
pub async fn run(
    config: Arc<Config>,
    metrics: Metrics,
    health: Arc<Health>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), RuntimeError> {
    health.register(ROLE);
    health.set_restored(ROLE, true);
    let settings = &config.settings;
    let context = RoleContext::new(
        ROLE,
        &settings.kafka.ingest_group,
        metrics.clone(),
        health.clone(),
    );
    let transactional = settings.processing.guarantee == Guarantee::ExactlyOnce;
    let mut consumer_config = kafka::consumer_config(
        &settings.kafka,
        &settings.kafka.ingest_group,
        "npsflow-ingest",
    );
    let mut producer_config = kafka::producer_config(
        &settings.kafka,
        "npsflow-ingest-producer",
        settings.topics.max_message_bytes as usize,
    );
    if transactional {
        // Offsets are committed inside each batch's transaction, never by the consumer.
        consumer_config.set("enable.auto.commit", "false");
        let id = match settings.processing.transactional_id.as_str() {
            "" => format!("npsflow-ingest-{}-{}", host_name(), std::process::id()),
            id => id.to_owned(),
        };
        producer_config.set("transactional.id", &id);
    }
    let consumer: StreamConsumer<RoleContext> = consumer_config.create_with_context(context)?;
    let producer = kafka::role_producer(producer_config, ROLE, health.clone(), metrics.clone())?;
    if transactional {
        let producer = producer.clone();
        tokio::task::spawn_blocking(move || {
            producer.init_transactions(std::time::Duration::from_secs(60))
        })
        .await
        .map_err(|e| RuntimeError::Task(e.to_string()))??;
        info!("exactly-once: transactions initialised");
    }
    let by_id = settings.topics.responses_by_id.as_str();
    consumer.subscribe(&[settings.topics.responses.as_str(), by_id])?;
    info!(topic = %settings.topics.responses, repartition_topic = %by_id, group = %settings.kafka.ingest_group, "ingest started");

    let mut ingest = Ingest::new(spec(&config));
    let max_messages = settings.ingest.batch_max_messages;
    let max_wait = std::time::Duration::from_millis(config.batch_max_wait.millis() as u64);
    let mut evicted_reported = 0;
    let idle = std::time::Duration::from_millis(500);
    // Messages received but not decided yet because the assignment changed meanwhile.
    let mut carried: Vec<OwnedMessage> = Vec::new();
    while let Some(received) =
        kafka::receive_batch(&consumer, max_messages, max_wait, idle, &mut shutdown).await
    {
        let started = Instant::now();
        let mut batch = std::mem::take(&mut carried);
        batch.extend(received);
        // Only the repartition topic's partitions hold state (duplicate memory and clock).
        let mut assigned: Vec<i32> = Vec::new();
        let mut revoked: Vec<(String, i32)> = Vec::new();
        for change in consumer.context().take_changes() {
            match change {
                AssignmentChange::Revoked(partitions) => {
                    for (topic, partition) in partitions {
                        if topic == by_id {
                            ingest.forget_partition(partition);
                            assigned.retain(|p| *p != partition);
                        }
                        revoked.push((topic, partition));
                    }
                }
                AssignmentChange::Assigned(partitions) => {
                    for (topic, partition) in partitions {
                        revoked.retain(|(t, p)| !(*t == topic && *p == partition));
                        if topic == by_id {
                            assigned.push(partition);
                        }
                    }
                }
            }
        }
        if !assigned.is_empty() {
            let restore = restore_dedupe(&config, &health, &mut ingest, assigned);
            let (restored, held) = kafka::keep_polling(&consumer, restore).await;
            restored?;
            batch.extend(held);
            if consumer.context().has_changes() {
                // Partitions moved during the restore: attend to that before deciding.
                carried = batch;
                continue;
            }
        }
        // Messages fetched just before their partition was revoked belong to the new owner,
        // which decides them with that partition's full duplicate memory.
        let batch: Vec<OwnedMessage> = batch
            .into_iter()
            .filter(|m| {
                !revoked
                    .iter()
                    .any(|(t, p)| t == m.topic() && *p == m.partition())
            })
            .collect();
        let records = decide_batch(&mut ingest, &batch, &config, &metrics);
        let offsets = kafka::last_offsets(&batch);
        if transactional {
            let group = consumer
                .group_metadata()
                .ok_or_else(|| RuntimeError::Task("the consumer has no group metadata".into()))?;
            let (producer, metrics) = (producer.clone(), metrics.clone());
            let next = kafka::next_offsets(&offsets);
            tokio::task::spawn_blocking(move || {
                kafka::commit_transaction(&producer, &records, &next, &group, &metrics)
            })
            .await
            .map_err(|e| RuntimeError::Task(e.to_string()))??;
            kafka::record_progress(&consumer, &offsets);
        } else {
            kafka::deliver_all(&producer, &records, &metrics).await?;
            kafka::store_offsets(&consumer, &offsets);
        }
        let evicted = ingest.dedupe_evicted_early();
        if evicted > evicted_reported {
            metrics.dedupe_evicted.inc_by(evicted - evicted_reported);
            evicted_reported = evicted;
        }
        metrics
            .batch_seconds
            .with_label_values(&[ROLE])
            .observe(started.elapsed().as_secs_f64());
    }
    info!("ingest stopping: committing offsets");
    kafka::close_consumer(
        consumer,
        ROLE,
        !transactional,
        std::time::Duration::from_secs(15),
    )
    .await;
    Ok(())
}

fn host_name() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "npsflow".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_envelope_carries_the_message_exactly() {
        let headers = vec![
            Header {
                key: "trace-id",
                value: Some(&b"abc"[..]),
            },
            Header {
                key: "empty",
                value: None,
            },
        ];
        for (key, payload) in [
            (Some(&b"cust-1"[..]), Some(&b"{\"response_id\":\"r\"}"[..])),
            (None, Some(&b""[..])),
            (Some(&b""[..]), None),
        ] {
            let original = Received {
                topic: "survey.responses",
                partition: 7,
                offset: 1 << 40,
                key,
                headers: headers.clone(),
                payload,
            };
            let envelope = original.to_envelope();
            let back = Received::from_envelope(&envelope).expect("an envelope");
            assert_eq!(
                (
                    back.topic,
                    back.partition,
                    back.offset,
                    back.key,
                    back.payload
                ),
                (
                    original.topic,
                    original.partition,
                    original.offset,
                    original.key,
                    original.payload
                )
            );
            let pairs = |h: &[Header<'_, &[u8]>]| -> Vec<(String, Option<Vec<u8>>)> {
                h.iter()
                    .map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec)))
                    .collect()
            };
            assert_eq!(pairs(&back.headers), pairs(&original.headers));
            // Anything cut short or with bytes left over is not an envelope.
            assert!(Received::from_envelope(&envelope[..envelope.len() - 1]).is_none());
            let mut longer = envelope.clone();
            longer.push(0);
            assert!(Received::from_envelope(&longer).is_none());
        }
        assert!(Received::from_envelope(b"{\"response_id\":1}").is_none());
    }
}
