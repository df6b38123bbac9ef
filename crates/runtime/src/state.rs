//! State restored on partition assignment: the aggregate role's segment snapshots from the
//! compacted state topic (and the check that it is co-partitioned with the deltas topic),
//! and the ingest role's duplicate memory, rebuilt from the input messages just before the
//! group's committed offset.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use npsflow_core::{SegmentSnapshot, Source};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use tracing::warn;

use crate::config::KafkaSettings;
use crate::kafka::client_config;
use crate::RuntimeError;

/// Reads partition `partition` of the state topic from its start to its current end and
/// returns one snapshot per segment: the one that has applied the most (compaction may not
/// have run yet, so older snapshots can still be there). Blocking; bounded by `limit`.
pub fn read_snapshots(
    kafka: &KafkaSettings,
    topic: &str,
    partition: i32,
    limit: Duration,
) -> Result<Vec<SegmentSnapshot>, RuntimeError> {
    let mut config = client_config(kafka, "npsflow-restore");
    config
        .set("group.id", "npsflow-restore")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false");
    let consumer: BaseConsumer = config.create()?;
    let (low, high) = consumer.fetch_watermarks(topic, partition, limit)?;
    let mut latest: BTreeMap<String, SegmentSnapshot> = BTreeMap::new();
    if high <= low {
        return Ok(Vec::new());
    }
    read_range(&consumer, topic, partition, low, high, limit, |message| {
        let Some(key) = message
            .key()
            .map(|k| String::from_utf8_lossy(k).into_owned())
        else {
            return;
        };
        match message.payload().map(SegmentSnapshot::from_json) {
            None => {
                latest.remove(&key);
            }
            Some(Ok(snapshot)) => {
                let keep = latest
                    .get(&key)
                    .is_none_or(|current| !current.covers(&snapshot) || snapshot.covers(current));
                if keep {
                    latest.insert(key, snapshot);
                }
            }
            Some(Err(error)) => {
                warn!(%error, partition, offset = message.offset(), "unreadable snapshot skipped")
            }
        }
    })?;
    Ok(latest.into_values().collect())
}

/// Fails unless `state` has at least as many partitions as `deltas`: a segment's snapshot
/// goes to the state partition with the number of its deltas partition.
pub fn check_copartitioned(
    kafka: &KafkaSettings,
    deltas: &str,
    state: &str,
) -> Result<(), RuntimeError> {
    let consumer: BaseConsumer = client_config(kafka, "npsflow-metadata").create()?;
    let count = |topic: &str| -> Result<usize, RuntimeError> {
        let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(30))?;
        let partitions = metadata
            .topics()
            .first()
            .filter(|t| t.error().is_none())
            .map(|t| t.partitions().len())
            .unwrap_or(0);
        if partitions == 0 {
            return Err(RuntimeError::Restore(format!(
                "topic {topic} does not exist; run `npsflow topics create`"
            )));
        }
        Ok(partitions)
    };
    let (d, s) = (count(deltas)?, count(state)?);
    if s < d {
        return Err(RuntimeError::Restore(format!(
            "state topic {state} has {s} partitions, fewer than the {d} of {deltas}; it must have as many"
        )));
    }
    Ok(())
}

/// Reads back the messages of repartition-topic partition `partition` from `count` messages
/// before the group's committed offset up to it, as (source, bytes), to rebuild duplicate
/// memory. Blocking; bounded by `limit`. Empty if the group has no committed offset yet.
pub fn read_before_commit(
    kafka: &KafkaSettings,
    group: &str,
    topic: &str,
    partition: i32,
    count: i64,
    limit: Duration,
) -> Result<Vec<(Source, Vec<u8>)>, RuntimeError> {
    let mut config = client_config(kafka, "npsflow-dedupe-restore");
    config
        .set("group.id", group)
        .set("enable.auto.commit", "false");
    let consumer: BaseConsumer = config.create()?;
    let mut wanted = TopicPartitionList::new();
    wanted.add_partition(topic, partition);
    let committed = consumer.committed_offsets(wanted, limit)?;
    let Some(Offset::Offset(end)) = committed
        .find_partition(topic, partition)
        .map(|e| e.offset())
    else {
        return Ok(Vec::new());
    };
    let (low, _) = consumer.fetch_watermarks(topic, partition, limit)?;
    let start = low.max(end - count);
    if count <= 0 || start >= end {
        return Ok(Vec::new());
    }
    let mut messages = Vec::with_capacity((end - start) as usize);
    read_range(&consumer, topic, partition, start, end, limit, |message| {
        messages.push(crate::ingest::forwarded_source(message));
    })?;
    Ok(messages)
}

/// Hands every message of `partition` at offsets `start..end` to `each`, in order. Blocking;
/// fails if that takes longer than `limit`.
fn read_range(
    consumer: &BaseConsumer,
    topic: &str,
    partition: i32,
    start: i64,
    end: i64,
    limit: Duration,
    mut each: impl FnMut(&rdkafka::message::BorrowedMessage<'_>),
) -> Result<(), RuntimeError> {
    let mut list = TopicPartitionList::new();
    list.add_partition_offset(topic, partition, Offset::Offset(start))?;
    consumer.assign(&list)?;
    let deadline = Instant::now() + limit;
    let mut position = start;
    while position < end {
        if Instant::now() > deadline {
            return Err(RuntimeError::Restore(format!(
                "partition {partition} of {topic}: read up to offset {position} of {end} in {limit:?}"
            )));
        }
        let Some(received) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let message = received?;
        if message.offset() >= end {
            break;
        }
        position = message.offset() + 1;
        each(&message);
    }
    Ok(())
}
