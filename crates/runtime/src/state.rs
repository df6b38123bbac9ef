//! Reading state back from Kafka when partitions are assigned: a role names what it needs
//! ([`StateRead`]: a whole partition of a compacted state topic, the messages just before
//! its group's committed offset, or the last messages of a partition) and gets the records, all partitions read at once within a
//! time limit. Also the check that a role's state topic is co-partitioned with its input.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::{Message, Offset, TopicPartitionList};

use crate::config::KafkaSettings;
use crate::kafka::{client_config, Limited};
use crate::RuntimeError;

/// State a role reads back before it handles messages of a newly assigned partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateRead {
    /// A partition of a (compacted) topic, from its first offset to its end now.
    Whole {
        /// The topic.
        topic: String,
        /// The partition.
        partition: i32,
    },
    /// Up to `count` messages of a partition just before the role's group's committed offset
    /// (nothing if the group has not committed there).
    BeforeCommit {
        /// The topic.
        topic: String,
        /// The partition.
        partition: i32,
        /// How many messages at most.
        count: i64,
    },
    /// Up to `count` messages at the end of a partition (what was written last).
    Tail {
        /// The topic.
        topic: String,
        /// The partition.
        partition: i32,
        /// How many messages at most.
        count: i64,
    },
}

impl StateRead {
    /// The partition read.
    pub fn partition(&self) -> i32 {
        match self {
            StateRead::Whole { partition, .. }
            | StateRead::BeforeCommit { partition, .. }
            | StateRead::Tail { partition, .. } => *partition,
        }
    }

    /// The topic read.
    pub fn topic(&self) -> &str {
        match self {
            StateRead::Whole { topic, .. }
            | StateRead::BeforeCommit { topic, .. }
            | StateRead::Tail { topic, .. } => topic,
        }
    }
}

/// A record read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRecord {
    /// Its offset.
    pub offset: i64,
    /// Its key.
    pub key: Option<Vec<u8>>,
    /// Its value (`None`: a tombstone).
    pub payload: Option<Vec<u8>>,
}

/// A restore that did not finish in time.
#[derive(Debug, thiserror::Error)]
#[error("state not read back in {limit:?}: {behind}")]
pub struct RestoreTimedOut {
    /// The limit.
    pub limit: Duration,
    /// Where each unfinished partition stands.
    pub behind: String,
}

/// Topics that cannot work together.
#[derive(Debug, thiserror::Error)]
pub enum TopicError {
    /// A topic the role needs does not exist.
    #[error("topic {0} does not exist; run `npsflow topics create`")]
    Missing(String),
    /// The state topic has fewer partitions than the input it follows.
    #[error("state topic {state} has {state_partitions} partitions, fewer than the {input_partitions} of {input}; it must have as many")]
    NotCopartitioned {
        /// The state topic.
        state: String,
        /// Its partitions.
        state_partitions: usize,
        /// The input topic.
        input: String,
        /// Its partitions.
        input_partitions: usize,
    },
}

/// Performs every read at once (`group` is the role's consumer group, whose committed offsets
/// [`StateRead::BeforeCommit`] reads up to) and returns the records of each, in offset order,
/// in the order of `reads`. Blocking; fails past `limit`.
pub fn read(
    kafka: &KafkaSettings,
    group: &str,
    reads: &[StateRead],
    limit: Duration,
) -> Result<Vec<Vec<StoredRecord>>, RuntimeError> {
    let mut config = client_config(kafka, "npsflow-restore");
    // Only what committed transactions wrote is state (an aborted transaction's writes, a
    // fenced process's among them, never are).
    config
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("isolation.level", "read_committed");
    let consumer: BaseConsumer<Limited> = config.create_with_context(Limited {
        client: "state-reader",
    })?;
    let mut wanted = TopicPartitionList::new();
    for read in reads {
        if let StateRead::BeforeCommit {
            topic, partition, ..
        } = read
        {
            wanted.add_partition(topic, *partition);
        }
    }
    let committed = if wanted.count() > 0 {
        consumer.committed_offsets(wanted, limit)?
    } else {
        wanted
    };
    let mut ranges = Vec::with_capacity(reads.len());
    for read in reads {
        let (low, high) = consumer.fetch_watermarks(read.topic(), read.partition(), limit)?;
        let range = match read {
            StateRead::Whole { .. } => (low, high),
            StateRead::Tail { count, .. } => (low.max(high - (*count).max(0)), high),
            StateRead::BeforeCommit {
                topic,
                partition,
                count,
            } => match committed
                .find_partition(topic, *partition)
                .map(|e| e.offset())
            {
                Some(Offset::Offset(end)) => (low.max(end - (*count).max(0)), end),
                _ => (0, 0),
            },
        };
        ranges.push(range);
    }
    read_ranges(&consumer, reads, &ranges, limit)
}

/// Reads offsets `start..end` of each read's partition, all at once.
fn read_ranges(
    consumer: &BaseConsumer<Limited>,
    reads: &[StateRead],
    ranges: &[(i64, i64)],
    limit: Duration,
) -> Result<Vec<Vec<StoredRecord>>, RuntimeError> {
    let mut found: Vec<Vec<StoredRecord>> = vec![Vec::new(); reads.len()];
    let mut list = TopicPartitionList::new();
    // (topic, partition) -> (index of the read, end)
    let mut pending: BTreeMap<(String, i32), (usize, i64)> = BTreeMap::new();
    for (index, (read, &(start, end))) in reads.iter().zip(ranges).enumerate() {
        if start < end {
            list.add_partition_offset(read.topic(), read.partition(), Offset::Offset(start))?;
            pending.insert((read.topic().to_owned(), read.partition()), (index, end));
        }
    }
    if pending.is_empty() {
        return Ok(found);
    }
    consumer.assign(&list)?;
    let deadline = Instant::now() + limit;
    let mut key = (String::new(), 0);
    while !pending.is_empty() {
        if Instant::now() > deadline {
            let behind: Vec<String> = pending
                .iter()
                .map(|((t, p), (i, end))| {
                    let at = found[*i].last().map_or(0, |r| r.offset + 1);
                    format!("{t} partition {p} at {at} of {end}")
                })
                .collect();
            return Err(RestoreTimedOut {
                limit,
                behind: behind.join(", "),
            }
            .into());
        }
        let message = match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(message)) => message,
            // The end of a partition, or a pause: a partition is read when the consumer's
            // position has reached its end, which may be past the last message read (the
            // offsets of transaction markers and of aborted transactions hold no message).
            None | Some(Err(KafkaError::PartitionEOF(_))) => {
                let positions = consumer.position()?;
                pending.retain(|(topic, partition), (_, end)| {
                    !positions
                        .find_partition(topic, *partition)
                        .is_some_and(|e| matches!(e.offset(), Offset::Offset(at) if at >= *end))
                });
                continue;
            }
            Some(Err(error)) => return Err(error.into()),
        };
        key.0.clear();
        key.0.push_str(message.topic());
        key.1 = message.partition();
        let Some(&(index, end)) = pending.get(&key) else {
            continue;
        };
        if message.offset() < end {
            found[index].push(StoredRecord {
                offset: message.offset(),
                key: message.key().map(<[u8]>::to_vec),
                payload: message.payload().map(<[u8]>::to_vec),
            });
        }
        if message.offset() + 1 >= end {
            pending.remove(&key);
        }
    }
    Ok(found)
}

/// [`check_copartitioned`] for every state topic of a role, patiently: a broker that cannot
/// be reached (or answers too slowly) is asked again every few seconds, as an outage pauses
/// the rest of the pipeline, instead of failing the role; missing or mismatched topics fail at
/// once. Returns false if `stop` turned true first (at once, even while a question is still
/// waiting for the broker). Blocking.
pub fn wait_for_copartitioned(
    kafka: &KafkaSettings,
    role: &'static str,
    input: &str,
    states: &[&str],
    metrics: &crate::metrics::Metrics,
    stop: &tokio::sync::watch::Receiver<bool>,
) -> Result<bool, RuntimeError> {
    let kafka = kafka.clone();
    let input = input.to_owned();
    let states: Vec<String> = states.iter().map(|s| (*s).to_owned()).collect();
    patiently(role, metrics, stop, move || {
        states
            .iter()
            .try_for_each(|state| check_copartitioned(&kafka, &input, state))
    })
    .map(|done| done.is_some())
}

/// How many partitions each of `topics` has, asked patiently like
/// [`wait_for_copartitioned`]; a missing topic fails at once. `None` if `stop` turned true
/// first. Blocking.
pub fn wait_for_partition_counts(
    kafka: &KafkaSettings,
    role: &'static str,
    topics: &[&str],
    metrics: &crate::metrics::Metrics,
    stop: &tokio::sync::watch::Receiver<bool>,
) -> Result<Option<Vec<i32>>, RuntimeError> {
    let kafka = kafka.clone();
    let topics: Vec<String> = topics.iter().map(|t| (*t).to_owned()).collect();
    patiently(role, metrics, stop, move || {
        let consumer: BaseConsumer<Limited> = client_config(&kafka, "npsflow-metadata")
            .create_with_context(Limited { client: role })?;
        topics
            .iter()
            .map(|topic| partition_count(&consumer, topic).map(|n| n as i32))
            .collect()
    })
}

/// How often a caller waiting for the broker looks at its stop signal.
const STOP_CHECK: Duration = Duration::from_millis(100);

/// Runs `ask` until it answers, again every few seconds while the broker cannot be reached
/// (as an outage pauses the rest of the pipeline); other errors fail at once. `None` if
/// `stop` turned true first. The questions run on a thread of their own, so a stop is seen
/// within [`STOP_CHECK`] even while one waits for an unreachable broker (a metadata request
/// waits up to 30 s): that thread is left to finish on its own, and ends the process with it.
fn patiently<T: Send + 'static>(
    role: &'static str,
    metrics: &crate::metrics::Metrics,
    stop: &tokio::sync::watch::Receiver<bool>,
    mut ask: impl FnMut() -> Result<T, RuntimeError> + Send + 'static,
) -> Result<Option<T>, RuntimeError> {
    let (answer, answered) = std::sync::mpsc::channel();
    let (metrics, worker_stop) = (metrics.clone(), stop.clone());
    let spawned = std::thread::Builder::new()
        .name(format!("{role}-topics"))
        .spawn(move || {
            let outcome = loop {
                match ask() {
                    Ok(found) => break Ok(Some(found)),
                    Err(RuntimeError::Kafka(error)) => {
                        crate::metrics::events::KafkaClientFailed {
                            client: role,
                            error: &error,
                            reason: "checking the role's topics; asking again",
                        }
                        .emit(&metrics);
                    }
                    Err(other) => break Err(other),
                }
                crate::kafka::summarise_repeats(&metrics);
                let until = Instant::now() + Duration::from_secs(3);
                while Instant::now() < until && !*worker_stop.borrow() {
                    std::thread::sleep(STOP_CHECK);
                }
                if *worker_stop.borrow() {
                    break Ok(None);
                }
            };
            let _ = answer.send(outcome);
        });
    if let Err(error) = spawned {
        return Err(RuntimeError::Io(error));
    }
    loop {
        if *stop.borrow() {
            return Ok(None);
        }
        match answered.recv_timeout(STOP_CHECK) {
            Ok(outcome) => return outcome,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                return Err(RuntimeError::StoppedOnItsOwn(role))
            }
        }
    }
}

/// How many partitions `topic` has; an error if it does not exist.
fn partition_count(consumer: &BaseConsumer<Limited>, topic: &str) -> Result<usize, RuntimeError> {
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(30))?;
    let partitions = metadata
        .topics()
        .first()
        .filter(|t| t.error().is_none())
        .map(|t| t.partitions().len())
        .unwrap_or(0);
    if partitions == 0 {
        return Err(TopicError::Missing(topic.to_owned()).into());
    }
    Ok(partitions)
}

/// Fails unless `state` has at least as many partitions as `input`: a role writes the state
/// of an input partition to the state partition with the same number.
pub fn check_copartitioned(
    kafka: &KafkaSettings,
    input: &str,
    state: &str,
) -> Result<(), RuntimeError> {
    let consumer: BaseConsumer<Limited> = client_config(kafka, "npsflow-metadata")
        .create_with_context(Limited { client: "metadata" })?;
    let (i, s) = (
        partition_count(&consumer, input)?,
        partition_count(&consumer, state)?,
    );
    if s < i {
        return Err(TopicError::NotCopartitioned {
            state: state.to_owned(),
            state_partitions: s,
            input: input.to_owned(),
            input_partitions: i,
        }
        .into());
    }
    Ok(())
}

/// A snapshot kept on a compacted state topic (a segment's, an account's): how it is read,
/// and which of two snapshots of one key is further along.
pub trait Snapshot: Sized {
    /// Parses one.
    fn decode(bytes: &[u8]) -> Result<Self, npsflow_core::delta::BadDelta>;
    /// True if this one has applied at least everything `other` has.
    fn covers(&self, other: &Self) -> bool;
}

impl Snapshot for npsflow_core::SegmentSnapshot {
    fn decode(bytes: &[u8]) -> Result<Self, npsflow_core::delta::BadDelta> {
        Self::from_json(bytes)
    }
    fn covers(&self, other: &Self) -> bool {
        self.covers(other)
    }
}

impl Snapshot for npsflow_core::AccountSnapshot {
    fn decode(bytes: &[u8]) -> Result<Self, npsflow_core::delta::BadDelta> {
        Self::from_json(bytes)
    }
    fn covers(&self, other: &Self) -> bool {
        self.covers(other)
    }
}

/// Of the records read back from one partition of a compacted state topic whose keys
/// `wanted` accepts (compaction may not have run yet, so older snapshots can still be
/// there), one snapshot per key: the last, unless an earlier one has applied more (a stale
/// writer, such as a zombie, wrote after it); a tombstone removes the key. Unreadable records
/// are reported and skipped.
pub fn latest_snapshots<S: Snapshot>(
    (topic, partition): (&str, i32),
    records: &[StoredRecord],
    wanted: impl Fn(&[u8]) -> bool,
    metrics: &crate::metrics::Metrics,
) -> Vec<S> {
    let mut latest: BTreeMap<&[u8], S> = BTreeMap::new();
    for record in records {
        let Some(key) = record.key.as_deref().filter(|k| wanted(k)) else {
            continue;
        };
        match record.payload.as_deref().map(S::decode) {
            None => {
                latest.remove(key);
            }
            Some(Ok(snapshot)) => {
                let keep = latest
                    .get(key)
                    .is_none_or(|current| !current.covers(&snapshot) || snapshot.covers(current));
                if keep {
                    latest.insert(key, snapshot);
                }
            }
            Some(Err(error)) => crate::metrics::events::UnreadableRecord {
                topic,
                partition,
                offset: record.offset,
                error: &error,
            }
            .emit(metrics),
        }
    }
    latest.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With the broker unreachable a metadata request waits 30 s; a stop must not wait for
    /// it (the process would hang on SIGTERM until then).
    #[test]
    fn waiting_for_topics_ends_soon_after_a_stop_with_the_broker_unreachable() {
        let env = [(
            "NPSFLOW__KAFKA__BROKERS".to_owned(),
            "127.0.0.1:1".to_owned(),
        )];
        let config = crate::Config::load(None, env).expect("config");
        let metrics = crate::metrics::Metrics::new();
        let (stop, stopping) = tokio::sync::watch::channel(false);
        let stopper = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(500));
            stop.send(true).expect("listening");
            stop
        });
        let started = Instant::now();
        let counts = wait_for_partition_counts(
            &config.settings.kafka,
            "ingest",
            &["survey.responses"],
            &metrics,
            &stopping,
        )
        .expect("no error but the broker's");
        let waited = started.elapsed();
        assert_eq!(counts, None, "stopped before any answer");
        assert!(
            waited < Duration::from_secs(10),
            "took {waited:?} to see the stop"
        );
        drop(stopper.join());
    }
}
