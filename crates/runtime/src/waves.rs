//! Waves: how a delivery round is handed to an idempotent producer so that no record ever
//! waits in librdkafka behind a request in flight for its partition.
//!
//! librdkafka 2.12's idempotent producer allows at most five *messages* (not requests) in
//! flight per partition before it sends more (`rd_kafka_toppar_producer_serve`), and once the
//! waiting records' `linger.ms` has passed, its broker thread wakes up again at once, busy
//! polling for the whole round trip of the request in flight (librdkafka PR #4989). A round
//! with more for one partition than one produce request carries (`batch.size` bytes or
//! `batch.num.messages` records) therefore burnt a core while the broker wrote the first
//! request: about half the process's CPU in `scripts/bench.sh` (BENCHMARKS.md, session 10).
//!
//! So a round is cut into waves: each wave holds, per partition, either at most four records
//! or no more than one request carries, and the next wave is handed over once the one
//! before is delivered, so the wait is a sleep on delivery reports instead of a spin. The
//! partition of a keyed record is the one the producer's partitioner (`murmur2_random`) will
//! choose, when the topic's partition count is known; otherwise all the topic's records
//! count as one partition, which only makes waves smaller. Within a wave, each partition's
//! records are handed over together (the order within a partition is kept), so that the
//! whole of a partition's share is queued well within `linger.ms` of its first record.
//! Pure: no I/O.

use std::collections::HashMap;

use crate::bundle::partition_for_key;
use crate::kafka::Outgoing;

/// What one produce request carries at most, from the producer's configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestLimits {
    /// `min(batch.size, message.max.bytes)`: bytes of records, framing included.
    pub bytes: usize,
    /// `batch.num.messages`.
    pub records: usize,
}

impl RequestLimits {
    /// librdkafka's defaults: `batch.size` 1,000,000, `batch.num.messages` 10,000.
    pub const DEFAULT: RequestLimits = RequestLimits {
        bytes: 1_000_000,
        records: 10_000,
    };

    /// The limits of a producer configured with these properties (librdkafka's defaults
    /// for those not given or not numbers).
    pub fn from_properties(get: impl Fn(&str) -> Option<String>) -> RequestLimits {
        let number = |name: &str| get(name).and_then(|v| v.trim().parse::<usize>().ok());
        let batch_bytes = number("batch.size").unwrap_or(RequestLimits::DEFAULT.bytes);
        let bytes = match number("message.max.bytes") {
            Some(max) => batch_bytes.min(max),
            None => batch_bytes,
        };
        RequestLimits {
            bytes,
            records: number("batch.num.messages").unwrap_or(RequestLimits::DEFAULT.records),
        }
    }
}

/// More records than this per partition in flight make librdkafka hold the rest back.
const FREE_IN_FLIGHT: usize = 4;

/// What a record adds to a request beyond its key, value and headers (record framing:
/// attributes, timestamp and offset deltas, lengths), rounded up.
const RECORD_OVERHEAD: usize = 32;

/// Room kept free in each request for the batch header and for misjudged framing.
const REQUEST_MARGIN: usize = 1024;

/// The bytes a record takes in a produce request (before compression), roughly and never
/// less.
fn request_bytes(record: &Outgoing) -> usize {
    use rdkafka::message::Headers;
    let headers: usize = record.headers.as_ref().map_or(0, |headers| {
        headers
            .iter()
            .map(|h| h.key.len() + h.value.map_or(0, <[u8]>::len) + RECORD_OVERHEAD)
            .sum()
    });
    record.key.as_ref().map_or(0, Vec::len)
        + record.payload.as_ref().map_or(0, Vec::len)
        + headers
        + RECORD_OVERHEAD
}

/// The partition a record will be written to, as far as it can be known before the
/// producer's partitioner runs: `None` when its topic's partition count (`count`) is unknown
/// or the record has neither key nor partition (the partitioner picks one at random).
fn partition(record: &Outgoing, count: Option<i32>) -> Option<i32> {
    match (record.partition, &record.key) {
        (Some(partition), _) => Some(partition),
        (None, Some(key)) => count.map(|n| partition_for_key(key, n)),
        (None, None) => None,
    }
}

/// A topic (its place among the round's topics) and the partition its record goes to, if
/// known.
type Destination = (usize, Option<i32>);

/// What a wave holds for one partition so far.
#[derive(Default)]
struct Share {
    wave: usize,
    records: usize,
    bytes: usize,
}

/// Cuts `records` (one delivery round) into waves, in the order they are to be handed over:
/// per partition at most [`FREE_IN_FLIGHT`] records or what one request carries, each
/// partition's records together and in their order. `partitions` gives a topic's partition
/// count, if known.
pub fn waves(
    records: Vec<Outgoing>,
    partitions: &dyn Fn(&str) -> Option<i32>,
    limits: RequestLimits,
) -> Vec<Vec<Outgoing>> {
    let byte_room = limits.bytes.saturating_sub(REQUEST_MARGIN).max(1);
    let mut shares: HashMap<Destination, Share> = HashMap::new();
    // The round's topics (a handful) with their partition counts, looked up once each.
    let mut topics: Vec<(String, Option<i32>)> = Vec::new();
    // Per wave: each record with its destination and arrival, to group partitions.
    let mut placed: Vec<Vec<(Destination, usize, Outgoing)>> = Vec::new();
    for (arrival, record) in records.into_iter().enumerate() {
        let topic = match topics.iter().position(|(name, _)| *name == record.topic) {
            Some(topic) => topic,
            None => {
                topics.push((record.topic.clone(), partitions(&record.topic)));
                topics.len() - 1
            }
        };
        let key = (topic, partition(&record, topics[topic].1));
        let bytes = request_bytes(&record);
        let share = shares.entry(key).or_default();
        let fits = share.records < FREE_IN_FLIGHT
            || (share.bytes + bytes <= byte_room && share.records < limits.records);
        if !fits {
            *share = Share {
                wave: share.wave + 1,
                ..Share::default()
            };
        }
        share.records += 1;
        share.bytes += bytes;
        if placed.len() <= share.wave {
            placed.resize_with(share.wave + 1, Vec::new);
        }
        placed[share.wave].push((key, arrival, record));
    }
    placed
        .into_iter()
        .map(|mut wave| {
            // A partition's records keep their order (arrivals are distinct).
            wave.sort_unstable_by_key(|(destination, arrival, _)| (*destination, *arrival));
            wave.into_iter().map(|(_, _, record)| record).collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(topic: &str, partition: Option<i32>, key: Option<&str>, bytes: usize) -> Outgoing {
        Outgoing::new(
            topic,
            partition,
            key.map(|k| k.as_bytes().to_vec()),
            Some(vec![b'x'; bytes]),
            None,
        )
    }

    fn unknown(_: &str) -> Option<i32> {
        None
    }

    const SMALL: RequestLimits = RequestLimits {
        bytes: 10_000 + REQUEST_MARGIN,
        records: 100,
    };

    #[test]
    fn a_round_one_request_carries_per_partition_is_one_wave() {
        let records = (0..50)
            .map(|i| record("alerts", Some(i % 2), None, 150))
            .collect();
        let waves = waves(records, &unknown, SMALL);
        assert_eq!(waves.len(), 1);
        assert_eq!(waves[0].len(), 50);
    }

    #[test]
    fn more_than_one_request_carries_for_a_partition_waits_for_the_next_wave() {
        // 100 records of ~182 bytes: 54 fit in 10,000 bytes, so two waves; the other
        // partition's few records all go in the first.
        let mut records: Vec<Outgoing> = (0..100)
            .map(|_| record("cases", Some(0), None, 150))
            .collect();
        records.push(record("cases", Some(1), None, 150));
        let waves = waves(records, &unknown, SMALL);
        assert_eq!(waves.len(), 2);
        let per_wave: Vec<usize> = waves
            .iter()
            .map(|w| w.iter().filter(|r| r.partition == Some(0)).count())
            .collect();
        assert_eq!(per_wave, vec![54, 46]);
        assert!(waves[0].iter().any(|r| r.partition == Some(1)));
        for wave in &waves {
            let bytes: usize = wave
                .iter()
                .filter(|r| r.partition == Some(0))
                .map(request_bytes)
                .sum();
            assert!(
                bytes <= SMALL.bytes - REQUEST_MARGIN,
                "{bytes} bytes in one wave"
            );
        }
    }

    /// How many of `count` records of `bytes` each, for one partition, go in each wave.
    fn wave_sizes(count: usize, bytes: usize) -> Vec<usize> {
        let records = (0..count)
            .map(|_| record("topic", Some(0), None, bytes))
            .collect();
        waves(records, &unknown, SMALL)
            .iter()
            .map(Vec::len)
            .collect()
    }

    #[test]
    fn the_record_count_of_a_request_bounds_a_wave_too() {
        assert_eq!(wave_sizes(250, 1), vec![100, 100, 50]);
    }

    #[test]
    fn up_to_four_records_of_any_size_share_a_wave() {
        // Four large bundles need four requests, but librdkafka sends them without waiting:
        // only the fifth record in flight holds the rest back.
        assert_eq!(wave_sizes(6, 60_000), vec![4, 2]);
    }

    #[test]
    fn each_partitions_records_are_handed_over_together_and_in_order() {
        let records: Vec<Outgoing> = (0..12)
            .map(|i| {
                let mut r = record("deltas", Some(i % 3), None, 10);
                r.payload = Some(vec![i as u8; 10]);
                r
            })
            .collect();
        let waves = waves(records, &unknown, SMALL);
        assert_eq!(waves.len(), 1);
        let order: Vec<(i32, u8)> = waves[0]
            .iter()
            .map(|r| {
                (
                    r.partition.expect("set"),
                    r.payload.as_ref().expect("set")[0],
                )
            })
            .collect();
        assert_eq!(
            order,
            vec![
                (0, 0),
                (0, 3),
                (0, 6),
                (0, 9),
                (1, 1),
                (1, 4),
                (1, 7),
                (1, 10),
                (2, 2),
                (2, 5),
                (2, 8),
                (2, 11)
            ]
        );
    }

    #[test]
    fn keyed_records_are_placed_by_the_partitioner_when_the_count_is_known() {
        // Keys that murmur2 spreads over two partitions: with the count known, each
        // partition has its own room; unknown, the topic's records share one.
        let keys: Vec<String> = (0..200).map(|i| format!("case-{i}")).collect();
        let records = || -> Vec<Outgoing> {
            keys.iter()
                .map(|k| record("cases", None, Some(k), 100))
                .collect()
        };
        let known = |topic: &str| (topic == "cases").then_some(2);
        let known_waves = waves(records(), &known, SMALL);
        let unknown_waves = waves(records(), &unknown, SMALL);
        assert!(
            known_waves.len() < unknown_waves.len(),
            "{} waves with the partition count known, {} without",
            known_waves.len(),
            unknown_waves.len()
        );
        for wave in &known_waves {
            for p in 0..2 {
                let bytes: usize = wave
                    .iter()
                    .filter(|r| partition_for_key(r.key.as_ref().expect("set"), 2) == p)
                    .map(request_bytes)
                    .sum();
                assert!(bytes <= SMALL.bytes - REQUEST_MARGIN);
            }
        }
        // Every record once, and each partition's records in their order.
        let flat: Vec<&Outgoing> = known_waves.iter().flatten().collect();
        assert_eq!(flat.len(), 200);
        for p in 0..2 {
            let mine: Vec<&[u8]> = flat
                .iter()
                .filter(|r| partition_for_key(r.key.as_ref().expect("set"), 2) == p)
                .map(|r| r.key.as_deref().expect("set"))
                .collect();
            let expected: Vec<&[u8]> = keys
                .iter()
                .map(|k| k.as_bytes())
                .filter(|k| partition_for_key(k, 2) == p)
                .collect();
            assert_eq!(mine, expected);
        }
    }

    #[test]
    fn an_empty_round_has_no_waves() {
        assert!(waves(Vec::new(), &unknown, SMALL).is_empty());
    }

    #[test]
    fn limits_come_from_the_producers_properties() {
        let none = RequestLimits::from_properties(|_| None);
        assert_eq!(none, RequestLimits::DEFAULT);
        let given = RequestLimits::from_properties(|name| match name {
            "batch.size" => Some("2000000".into()),
            "message.max.bytes" => Some("1114112".into()),
            "batch.num.messages" => Some("500".into()),
            _ => None,
        });
        assert_eq!(
            given,
            RequestLimits {
                bytes: 1_114_112,
                records: 500
            }
        );
    }
}
