//! Every follow-up case, answerable from any instance: a reader of the whole compacted cases
//! topic (like a Kafka Streams GlobalKTable), kept in memory and followed as it grows. The
//! followup role owns and writes cases; the directory only reads what the owners wrote, so
//! `GET /v1/cases` gives the same answer on every instance, at most a moment behind.
//!
//! Freshness: the directory says when it last had read every partition to its end
//! (`caught_up_at`), so an answer states how old it may be.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use npsflow_core::{FollowupCase, Timestamp};
use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Message, Offset, TopicPartitionList};

use crate::config::KafkaSettings;
use crate::kafka::client_config;
use crate::metrics::{events, Metrics};

/// The cases read so far and how fresh they are.
#[derive(Debug, Default)]
pub struct CaseDirectory {
    cases: RwLock<BTreeMap<String, FollowupCase>>,
    caught_up_at: RwLock<Option<Timestamp>>,
}

impl CaseDirectory {
    /// A case by id.
    pub fn case(&self, case_id: &str) -> Option<FollowupCase> {
        self.read().get(case_id).cloned()
    }

    /// The cases that pass `keep`, in `case_id` order, at most `limit`; and how many passed.
    pub fn find(
        &self,
        mut keep: impl FnMut(&FollowupCase) -> bool,
        limit: usize,
    ) -> (Vec<FollowupCase>, usize) {
        let cases = self.read();
        let mut found = Vec::new();
        let mut count = 0;
        for case in cases.values().filter(|c| keep(c)) {
            count += 1;
            if found.len() < limit {
                found.push(case.clone());
            }
        }
        (found, count)
    }

    /// How many cases it holds.
    pub fn len(&self) -> usize {
        self.read().len()
    }

    /// True if it holds none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// When it last had read every partition of the topic to its end.
    pub fn caught_up_at(&self) -> Option<Timestamp> {
        *self.caught_up_at.read().unwrap_or_else(|e| e.into_inner())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, FollowupCase>> {
        self.cases.read().unwrap_or_else(|e| e.into_inner())
    }

    fn apply(&self, key: &[u8], value: Option<&[u8]>) -> Result<(), serde_json::Error> {
        let key = String::from_utf8_lossy(key).into_owned();
        let mut cases = self.cases.write().unwrap_or_else(|e| e.into_inner());
        match value {
            None => {
                cases.remove(&key);
            }
            Some(value) => {
                cases.insert(key, serde_json::from_slice(value)?);
            }
        }
        Ok(())
    }
}

/// Reads `topic` into `directory` on a thread of its own until `stop` turns true: from the
/// beginning of every partition, then following new records. A topic that does not exist
/// yet is looked for again every few seconds.
pub fn follow(
    kafka: KafkaSettings,
    topic: String,
    directory: Arc<CaseDirectory>,
    metrics: Metrics,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            match read(&kafka, &topic, &directory, &metrics, &stop) {
                Ok(()) => return,
                Err(error) => {
                    tracing::debug!(%error, topic, "case directory: retrying");
                    let until = Instant::now() + Duration::from_secs(3);
                    while Instant::now() < until && !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            }
        }
    })
}

/// The reader's client context: reaching the end of a partition is how it knows it caught
/// up, not an error to log (librdkafka also reports it as a global error).
struct Quiet;

impl ClientContext for Quiet {
    fn error(&self, error: KafkaError, reason: &str) {
        if !matches!(error, KafkaError::PartitionEOF(_)) {
            tracing::debug!(%error, reason, "case directory: kafka client");
        }
    }
}

impl ConsumerContext for Quiet {}

fn read(
    kafka: &KafkaSettings,
    topic: &str,
    directory: &CaseDirectory,
    metrics: &Metrics,
    stop: &AtomicBool,
) -> Result<(), KafkaError> {
    let mut config = client_config(kafka, "npsflow-case-directory");
    // Cases a committed transaction wrote, never an aborted one's (exactly once).
    config
        .set("group.id", "npsflow-case-directory")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("isolation.level", "read_committed");
    let consumer: BaseConsumer<Quiet> = config.create_with_context(Quiet)?;
    let partitions = |consumer: &BaseConsumer<Quiet>| -> Result<Vec<i32>, KafkaError> {
        let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
        let found = metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic)
            .map(|t| {
                (
                    t.error(),
                    t.partitions().iter().map(|p| p.id()).collect::<Vec<_>>(),
                )
            });
        match found {
            Some((None, ids)) if !ids.is_empty() => Ok(ids),
            _ => Err(KafkaError::MetadataFetch(
                RDKafkaErrorCode::UnknownTopicOrPartition,
            )),
        }
    };
    let mut assigned = partitions(&consumer)?;
    let mut list = TopicPartitionList::new();
    for p in &assigned {
        list.add_partition_offset(topic, *p, Offset::Beginning)?;
    }
    consumer.assign(&list)?;
    let mut at_end: BTreeMap<i32, bool> = assigned.iter().map(|p| (*p, false)).collect();
    let mut checked = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        match consumer.poll(Duration::from_millis(200)) {
            None => {}
            Some(Ok(message)) => {
                at_end.insert(message.partition(), false);
                let Some(key) = message.key() else { continue };
                if let Err(error) = directory.apply(key, message.payload()) {
                    events::UnreadableRecord {
                        topic,
                        partition: message.partition(),
                        offset: message.offset(),
                        error: &error,
                    }
                    .emit(metrics);
                }
            }
            Some(Err(KafkaError::PartitionEOF(partition))) => {
                at_end.insert(partition, true);
                if at_end.values().all(|end| *end) {
                    *directory
                        .caught_up_at
                        .write()
                        .unwrap_or_else(|e| e.into_inner()) = Some(crate::wall_now());
                }
            }
            Some(Err(error)) => tracing::debug!(%error, "case directory: reading"),
        }
        // Partitions added to the topic later are followed too.
        if checked.elapsed() > Duration::from_secs(30) {
            checked = Instant::now();
            if let Ok(now) = partitions(&consumer) {
                let new: Vec<i32> = now.into_iter().filter(|p| !assigned.contains(p)).collect();
                if !new.is_empty() {
                    let mut list = TopicPartitionList::new();
                    for p in &new {
                        list.add_partition_offset(topic, *p, Offset::Beginning)?;
                        at_end.insert(*p, false);
                    }
                    consumer.incremental_assign(&list)?;
                    assigned.extend(new);
                }
            }
        }
    }
    Ok(())
}
