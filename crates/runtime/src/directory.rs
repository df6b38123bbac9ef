//! Answers from any instance: a reader of a whole compacted topic (like a Kafka Streams
//! GlobalKTable), kept in memory by key and followed as it grows. The roles own and write
//! what they compute (cases, segment and account summaries); a [`Table`] only reads what the
//! owners wrote, so an API backed by it gives the same answer on every instance, at most a
//! moment behind. The case directory is a table of the cases topic; the segment and account
//! views are tables of their view topics.
//!
//! Freshness: a table says when it last had read every partition to its end
//! (`caught_up_at`), so an answer states how old it may be.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use npsflow_core::{FollowupCase, Timestamp};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Message, Offset, TopicPartitionList};
use serde::de::DeserializeOwned;

use crate::config::KafkaSettings;
use crate::kafka::{client_config, Limited};
use crate::metrics::{events, Metrics};

/// The latest JSON value of every key of a compacted topic read so far (a tombstone removes
/// its key), and how fresh it is.
#[derive(Debug)]
pub struct Table<V> {
    rows: RwLock<BTreeMap<String, V>>,
    caught_up_at: RwLock<Option<Timestamp>>,
}

impl<V> Default for Table<V> {
    fn default() -> Self {
        Table {
            rows: RwLock::new(BTreeMap::new()),
            caught_up_at: RwLock::new(None),
        }
    }
}

/// Every follow-up case by `case_id`, from the cases topic.
pub type CaseDirectory = Table<FollowupCase>;

/// Every segment summary by `<window>|<segment>`, from the segment view topic, each kept as
/// its record's JSON text (checked to be JSON when read) and parsed only when served: kept
/// as parsed JSON values, 10,000 segments x 4 windows took ~130 MB on every instance (the
/// restored aggregator's RSS fell from 353 to 201 MiB with text, BENCHMARKS.md).
pub type SegmentViewTable = Table<Box<serde_json::value::RawValue>>;

impl<V: Clone> Table<V> {
    /// The value of a key.
    pub fn get(&self, key: &str) -> Option<V> {
        self.read().get(key).cloned()
    }

    /// The values that pass `keep`, in key order, at most `limit`; and how many passed.
    pub fn find(&self, mut keep: impl FnMut(&V) -> bool, limit: usize) -> (Vec<V>, usize) {
        let rows = self.read();
        let mut found = Vec::new();
        let mut count = 0;
        for value in rows.values().filter(|v| keep(v)) {
            count += 1;
            if found.len() < limit {
                found.push(value.clone());
            }
        }
        (found, count)
    }
}

impl<V> Table<V> {
    /// How many keys it holds.
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

    /// Every row, under a read lock.
    pub fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, V>> {
        self.rows.read().unwrap_or_else(|e| e.into_inner())
    }
}

impl<V: DeserializeOwned> Table<V> {
    pub(crate) fn apply(&self, key: &[u8], value: Option<&[u8]>) -> Result<(), serde_json::Error> {
        let key = String::from_utf8_lossy(key).into_owned();
        let parsed = value.map(serde_json::from_slice::<V>).transpose()?;
        let mut rows = self.rows.write().unwrap_or_else(|e| e.into_inner());
        match parsed {
            None => {
                rows.remove(&key);
            }
            Some(value) => {
                rows.insert(key, value);
            }
        }
        Ok(())
    }
}

impl CaseDirectory {
    /// A case by id.
    pub fn case(&self, case_id: &str) -> Option<FollowupCase> {
        self.get(case_id)
    }
}

/// Reads `topic` into `table` on a thread of its own until `stop` turns true: from the
/// beginning of every partition, then following new records. A topic that does not exist
/// yet is looked for again every few seconds.
pub fn follow<V: DeserializeOwned + Send + Sync + 'static>(
    kafka: KafkaSettings,
    topic: String,
    directory: Arc<Table<V>>,
    metrics: Metrics,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            match read(&kafka, &topic, &directory, &metrics, &stop) {
                Ok(()) => return,
                Err(error) => {
                    tracing::debug!(%error, topic, "table reader: retrying");
                    let until = Instant::now() + Duration::from_secs(3);
                    while Instant::now() < until && !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            }
        }
    })
}

fn read<V: DeserializeOwned>(
    kafka: &KafkaSettings,
    topic: &str,
    directory: &Table<V>,
    metrics: &Metrics,
    stop: &AtomicBool,
) -> Result<(), KafkaError> {
    let mut config = client_config(kafka, "npsflow-table-reader");
    // What a committed transaction wrote, never an aborted one's (exactly once). Partitions
    // are assigned, not subscribed: the group id is never joined.
    config
        .set("group.id", "npsflow-table-reader")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("isolation.level", "read_committed");
    let consumer: BaseConsumer<Limited> = config.create_with_context(Limited {
        client: "table-reader",
    })?;
    let partitions = |consumer: &BaseConsumer<Limited>| -> Result<Vec<i32>, KafkaError> {
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
