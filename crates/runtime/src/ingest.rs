//! The ingest role: consumes `survey.responses` in batches, lets the core decide each
//! message, and delivers what the batch caused (dead letters byte-for-byte, detractor alerts,
//! segment deltas) before storing the batch's offsets. One commit point per batch.

use std::sync::Arc;
use std::time::Instant;

use npsflow_core::{ClockKind, Ingest, IngestSpec, Route};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Header, Headers, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, Producer};
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

/// Header names on dead letters and alerts.
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

fn source_headers(base: OwnedHeaders, message: &OwnedMessage) -> OwnedHeaders {
    base.insert(Header {
        key: headers::SOURCE_TOPIC,
        value: Some(message.topic()),
    })
    .insert(Header {
        key: headers::SOURCE_PARTITION,
        value: Some(&message.partition().to_string()),
    })
    .insert(Header {
        key: headers::SOURCE_OFFSET,
        value: Some(&message.offset().to_string()),
    })
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
        let payload = message.payload().unwrap_or_default();
        let decision = ingest.process(message.partition(), message.offset(), payload, now);
        metrics.events.with_label_values(&[decision.outcome]).inc();
        if let Some((code, detail)) = &decision.dead_letter {
            metrics.dead_letters.with_label_values(&[code]).inc();
            let mut headers = OwnedHeaders::new();
            if let Some(original) = message.headers() {
                for header in original.iter() {
                    headers = headers.insert(header);
                }
            }
            let headers = headers
                .insert(Header {
                    key: headers::ERROR,
                    value: Some(*code),
                })
                .insert(Header {
                    key: headers::ERROR_DETAIL,
                    value: Some(detail.as_str()),
                });
            records.push(Outgoing {
                partition: None,
                topic: topics.dead_letters.clone(),
                key: message.key().map(<[u8]>::to_vec),
                payload: message.payload().map(<[u8]>::to_vec),
                headers: source_headers(headers, message),
            });
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
            records.push(Outgoing {
                partition: None,
                topic: topics.followups.clone(),
                key: Some(alert.customer_id.clone().into_bytes()),
                payload: Some(alert.to_json()),
                headers: source_headers(OwnedHeaders::new(), message),
            });
        }
    }
    for delta in ingest.take_deltas() {
        records.push(Outgoing {
            partition: None,
            topic: topics.segment_deltas.clone(),
            key: Some(delta.segment.clone().into_bytes()),
            payload: Some(delta.to_json()),
            headers: OwnedHeaders::new(),
        });
    }
    records
}

/// Rebuilds the duplicate memory of newly assigned input partitions from the messages just
/// before the group's committed offset, before any new message of them is decided.
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
    for partition in partitions {
        let kafka = config.settings.kafka.clone();
        let group = config.settings.kafka.ingest_group.clone();
        let topic = config.settings.topics.responses.clone();
        let started = Instant::now();
        let payloads = tokio::task::spawn_blocking(move || {
            crate::state::read_before_commit(
                &kafka,
                &group,
                &topic,
                partition,
                count,
                std::time::Duration::from_secs(45),
            )
        })
        .await
        .map_err(|e| RuntimeError::Task(e.to_string()))??;
        let now = wall_now();
        ingest.forget_partition(partition);
        for payload in &payloads {
            ingest.remember(partition, payload, now);
        }
        info!(
            partition,
            messages = payloads.len(),
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
    let mut producer_config = kafka::producer_config(&settings.kafka, "npsflow-ingest-producer");
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
    let producer: FutureProducer = producer_config.create()?;
    if transactional {
        let producer = producer.clone();
        tokio::task::spawn_blocking(move || {
            producer.init_transactions(std::time::Duration::from_secs(60))
        })
        .await
        .map_err(|e| RuntimeError::Task(e.to_string()))??;
        info!("exactly-once: transactions initialised");
    }
    consumer.subscribe(&[settings.topics.responses.as_str()])?;
    info!(topic = %settings.topics.responses, group = %settings.kafka.ingest_group, "ingest started");

    let mut ingest = Ingest::new(spec(&config));
    let max_messages = settings.ingest.batch_max_messages;
    let max_wait = std::time::Duration::from_millis(config.batch_max_wait.millis() as u64);
    let mut evicted_reported = 0;
    let idle = std::time::Duration::from_millis(500);
    while let Some(batch) =
        kafka::receive_batch(&consumer, max_messages, max_wait, idle, &mut shutdown).await
    {
        let started = Instant::now();
        let mut assigned = Vec::new();
        let mut revoked = Vec::new();
        for change in consumer.context().take_changes() {
            match change {
                AssignmentChange::Revoked(partitions) => {
                    for (_, partition) in partitions {
                        ingest.forget_partition(partition);
                        assigned.retain(|p| *p != partition);
                        revoked.push(partition);
                    }
                }
                AssignmentChange::Assigned(partitions) => {
                    for (_, partition) in partitions {
                        revoked.retain(|p| *p != partition);
                        assigned.push(partition);
                    }
                }
            }
        }
        if !assigned.is_empty() {
            restore_dedupe(&config, &health, &mut ingest, assigned).await?;
        }
        // Messages fetched just before their partition was revoked belong to the new owner,
        // which decides them with that partition's full duplicate memory.
        let batch: Vec<OwnedMessage> = batch
            .into_iter()
            .filter(|m| !revoked.contains(&m.partition()))
            .collect();
        let records = decide_batch(&mut ingest, &batch, &config, &metrics);
        let offsets = kafka::last_offsets(&batch);
        if transactional {
            let group = consumer
                .group_metadata()
                .ok_or_else(|| RuntimeError::Task("the consumer has no group metadata".into()))?;
            let (producer, metrics) = (producer.clone(), metrics.clone());
            tokio::task::spawn_blocking(move || {
                kafka::commit_transaction(
                    &producer,
                    &records,
                    &kafka::next_offsets(&offsets),
                    &group,
                    &metrics,
                )
            })
            .await
            .map_err(|e| RuntimeError::Task(e.to_string()))??;
        } else {
            kafka::deliver_all(&producer, &records, &metrics).await;
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
