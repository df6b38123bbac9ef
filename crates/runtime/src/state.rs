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

/// Reads the given partitions of the state topic from their start to their current end,
/// all at once, and returns per partition one snapshot per segment: the one that has applied
/// the most (compaction may not have run yet, so older snapshots can still be there).
/// Blocking; bounded by `limit`.
pub fn read_snapshots(
    kafka: &KafkaSettings,
    topic: &str,
    partitions: &[i32],
    limit: Duration,
) -> Result<BTreeMap<i32, Vec<SegmentSnapshot>>, RuntimeError> {
    let mut config = client_config(kafka, "npsflow-restore");
    config
        .set("group.id", "npsflow-restore")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false");
    let consumer: BaseConsumer = config.create()?;
    let mut ranges = Vec::with_capacity(partitions.len());
    for &partition in partitions {
        let (low, high) = consumer.fetch_watermarks(topic, partition, limit)?;
        ranges.push((partition, low, high));
    }
    let mut latest: BTreeMap<i32, BTreeMap<String, SegmentSnapshot>> =
        partitions.iter().map(|p| (*p, BTreeMap::new())).collect();
    read_ranges(&consumer, topic, &ranges, limit, |partition, message| {
        let Some(key) = message
            .key()
            .map(|k| String::from_utf8_lossy(k).into_owned())
        else {
            return;
        };
        let latest = latest.entry(partition).or_default();
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
    Ok(latest
        .into_iter()
        .map(|(partition, snapshots)| (partition, snapshots.into_values().collect()))
        .collect())
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

/// A message read back to rebuild duplicate memory: where it was first read, and its bytes.
pub type Remembered = (Source, Vec<u8>);

/// Reads back the messages of the given repartition-topic partitions, all at once, from
/// `count` messages before the group's committed offset up to it, as (source, bytes) per
/// partition, to rebuild duplicate memory. Blocking; bounded by `limit`. A partition without
/// a committed offset has nothing to read.
pub fn read_before_commit(
    kafka: &KafkaSettings,
    group: &str,
    topic: &str,
    partitions: &[i32],
    count: i64,
    limit: Duration,
) -> Result<BTreeMap<i32, Vec<Remembered>>, RuntimeError> {
    let mut config = client_config(kafka, "npsflow-dedupe-restore");
    config
        .set("group.id", group)
        .set("enable.auto.commit", "false");
    let consumer: BaseConsumer = config.create()?;
    let mut wanted = TopicPartitionList::new();
    for &partition in partitions {
        wanted.add_partition(topic, partition);
    }
    let committed = consumer.committed_offsets(wanted, limit)?;
    let mut ranges = Vec::with_capacity(partitions.len());
    let mut messages: BTreeMap<i32, Vec<Remembered>> =
        partitions.iter().map(|p| (*p, Vec::new())).collect();
    for &partition in partitions {
        let Some(Offset::Offset(end)) = committed
            .find_partition(topic, partition)
            .map(|e| e.offset())
        else {
            continue;
        };
        let (low, _) = consumer.fetch_watermarks(topic, partition, limit)?;
        ranges.push((partition, low.max(end - count.max(0)), end));
    }
    read_ranges(&consumer, topic, &ranges, limit, |partition, message| {
        messages
            .entry(partition)
            .or_default()
            .push(crate::ingest::forwarded_source(message));
    })?;
    Ok(messages)
}

/// Hands every message of each `(partition, start, end)` range (offsets `start..end`) to
/// `each`, in offset order per partition, reading all partitions at once. Blocking; fails if
/// that takes longer than `limit`.
fn read_ranges(
    consumer: &BaseConsumer,
    topic: &str,
    ranges: &[(i32, i64, i64)],
    limit: Duration,
    mut each: impl FnMut(i32, &rdkafka::message::BorrowedMessage<'_>),
) -> Result<(), RuntimeError> {
    let mut list = TopicPartitionList::new();
    // partition -> (next offset wanted, end)
    let mut pending: BTreeMap<i32, (i64, i64)> = BTreeMap::new();
    for &(partition, start, end) in ranges.iter().filter(|(_, start, end)| start < end) {
        list.add_partition_offset(topic, partition, Offset::Offset(start))?;
        pending.insert(partition, (start, end));
    }
    if pending.is_empty() {
        return Ok(());
    }
    consumer.assign(&list)?;
    let deadline = Instant::now() + limit;
    while !pending.is_empty() {
        if Instant::now() > deadline {
            let behind: Vec<String> = pending
                .iter()
                .map(|(p, (at, end))| format!("partition {p} at {at} of {end}"))
                .collect();
            return Err(RuntimeError::Restore(format!(
                "{topic}: not read back in {limit:?}: {}",
                behind.join(", ")
            )));
        }
        let Some(received) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let message = received?;
        let partition = message.partition();
        let Some((next, end)) = pending.get_mut(&partition) else {
            continue;
        };
        if message.offset() < *end {
            *next = message.offset() + 1;
            each(partition, &message);
        }
        if message.offset() + 1 >= *end {
            pending.remove(&partition);
        }
    }
    Ok(())
}
