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

use npsflow_core::{CaseState, FollowupCase, Timestamp};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Message, Offset, TopicPartitionList};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::value::RawValue;

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
pub type CaseDirectory = Table<DirectoryCase>;

/// A case as the directory keeps it: the fields `/v1/cases` and `/v1/accounts` select on, and
/// the record's JSON text, parsed whole only when the case is served. Every instance keeps
/// every case, and most records are replaced by a newer one before anybody asks for them:
/// parsing each record whole on arrival was 5 % of an end-to-end run's CPU (BENCHMARKS.md,
/// session 11).
#[derive(Debug, Clone)]
pub struct DirectoryCase {
    /// Where it stands.
    pub state: CaseState,
    /// Who owns it now.
    pub owner: String,
    /// 0, 1 or 2.
    pub escalation_level: u8,
    /// Its alert's account, if known.
    pub account_id: Option<String>,
    first_contact_deadline: Timestamp,
    resolve_deadline: Timestamp,
    record: Box<RawValue>,
}

impl DirectoryCase {
    /// True if a deadline it has not met has passed at `now` ([`FollowupCase::overdue`]).
    pub fn overdue(&self, now: Timestamp) -> bool {
        self.state
            .overdue(self.first_contact_deadline, self.resolve_deadline, now)
    }

    /// The whole case, parsed from its record; `None` if the record has what the directory
    /// selects on but is not a case this version reads.
    pub fn case(&self) -> Option<FollowupCase> {
        serde_json::from_str(self.record.get()).ok()
    }
}

impl<'de> Deserialize<'de> for DirectoryCase {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<DirectoryCase, D::Error> {
        /// The fields selected on; serde skips the rest (history, segments, ...).
        #[derive(Deserialize)]
        struct Selected {
            state: CaseState,
            owner: String,
            escalation_level: u8,
            first_contact_deadline: Timestamp,
            resolve_deadline: Timestamp,
            alert: SelectedAlert,
        }
        #[derive(Deserialize)]
        struct SelectedAlert {
            #[serde(default)]
            account_id: Option<String>,
        }
        let record = <Box<RawValue>>::deserialize(d)?;
        let selected: Selected =
            serde_json::from_str(record.get()).map_err(serde::de::Error::custom)?;
        Ok(DirectoryCase {
            state: selected.state,
            owner: selected.owner,
            escalation_level: selected.escalation_level,
            account_id: selected.alert.account_id,
            first_contact_deadline: selected.first_contact_deadline,
            resolve_deadline: selected.resolve_deadline,
            record,
        })
    }
}

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
    /// A case by id, parsed whole (`None` also for a record this version cannot read).
    pub fn case(&self, case_id: &str) -> Option<FollowupCase> {
        self.read().get(case_id)?.case()
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The contract's sample case records that are valid, the last of each `case_id`.
    fn sample_cases() -> Vec<(String, Vec<u8>)> {
        include_str!("../../../deploy/schemas/samples/case.jsonl")
            .lines()
            .map(|line| serde_json::from_str::<serde_json::Value>(line).expect("JSON"))
            .filter(|sample| sample["valid"] == true)
            .map(|sample| {
                let message = &sample["message"];
                let id = message["case_id"].as_str().expect("case_id").to_owned();
                (id, serde_json::to_vec(message).expect("bytes"))
            })
            .collect::<BTreeMap<_, _>>()
            .into_iter()
            .collect()
    }

    #[test]
    fn the_directory_selects_on_what_the_whole_case_says_and_serves_the_whole_case() {
        let directory = CaseDirectory::default();
        let samples = sample_cases();
        assert!(samples.len() >= 3, "samples of several states");
        for (id, bytes) in &samples {
            directory.apply(id.as_bytes(), Some(bytes)).expect("a case");
        }
        assert_eq!(directory.len(), samples.len());
        for (id, bytes) in &samples {
            let whole: FollowupCase = serde_json::from_slice(bytes).expect("a case");
            let kept = directory.read().get(id).cloned().expect("kept");
            assert_eq!(kept.state, whole.state, "{id}");
            assert_eq!(kept.owner, whole.owner, "{id}");
            assert_eq!(kept.escalation_level, whole.escalation_level, "{id}");
            assert_eq!(kept.account_id, whole.alert.account_id, "{id}");
            for hours in [0, 24, 48, 24 * 7, 24 * 30] {
                let now = Timestamp(whole.opened_at.millis() + hours * 3_600_000);
                assert_eq!(kept.overdue(now), whole.overdue(now), "{id} at +{hours}h");
            }
            assert_eq!(directory.case(id), Some(whole), "{id}");
        }
        let (id, _) = &samples[0];
        directory.apply(id.as_bytes(), None).expect("a tombstone");
        assert_eq!(directory.case(id), None);
        assert_eq!(directory.len(), samples.len() - 1);
    }

    #[test]
    fn a_record_that_is_not_a_case_is_refused_or_not_served() {
        let directory = CaseDirectory::default();
        let (id, bytes) = sample_cases().remove(0);
        let mut case: serde_json::Value = serde_json::from_slice(&bytes).expect("JSON");
        assert!(directory.apply(b"x", Some(b"{not json")).is_err());
        let mut stateless = case.clone();
        stateless.as_object_mut().expect("object").remove("state");
        let stateless = serde_json::to_vec(&stateless).expect("bytes");
        assert!(directory.apply(b"x", Some(&stateless)).is_err());
        assert!(directory.is_empty());
        // What the directory selects on is there, the rest is not a case: kept, never served.
        case["history"] = serde_json::json!("not a list");
        let odd = serde_json::to_vec(&case).expect("bytes");
        directory
            .apply(id.as_bytes(), Some(&odd))
            .expect("selected fields");
        assert_eq!(directory.len(), 1);
        assert_eq!(directory.case(&id), None);
    }
}
