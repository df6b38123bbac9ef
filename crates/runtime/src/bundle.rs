//! Bundles: many items in one record of an internal topic (`npsflow.responses-by-id`,
//! `npsflow.followup-events`). A role that repartitions sends, per batch, one record per
//! destination partition holding every item bound there, instead of one record per item:
//! each record costs the broker and both clients far more than its bytes (on Tansu's sqlite
//! storage, a row per record and per header; on any broker, a produce and a fetch entry), so
//! bundling cuts the internal topics' records by the batch size.
//!
//! An item goes to the partition Kafka's default partitioner gives its key (murmur2, as the
//! Java client and librdkafka's `murmur2_random` do), so every item with one key still meets
//! on one partition, in order. Within a partition, items are ordered by (record offset,
//! index in the record): [`position`] packs both into one increasing number, which is what
//! deltas carry as the apply-once position.
//!
//! Wire format: `NPB1`, the item count (u32, big-endian), then per item its length (u32) and
//! bytes. A record without the magic (written before bundles existed) is one item.

use std::collections::BTreeMap;

use crate::kafka::Outgoing;

const BUNDLE_MAGIC: &[u8] = b"NPB1";

/// The size a bundle is filled up to (an item larger than this travels alone). Small enough
/// that the clients' buffers for it stay below the C allocator's mmap threshold (128 KiB:
/// larger ones are mapped and unmapped each time, and zeroing fresh pages cost the
/// producer's thread a sixth of its time with 800 KB bundles), large enough to carry a few
/// hundred typical items.
pub const TARGET_BYTES: usize = 64 * 1024;

/// Most items in one bundle: the index must fit [`position`]'s low bits.
pub const MAX_ITEMS: usize = 1 << INDEX_BITS;
const INDEX_BITS: u32 = 16;

/// The position of item `index` of the record at `offset`: increasing within a partition in
/// (offset, index) order. Offsets up to 2^47 fit.
pub fn position(offset: i64, index: usize) -> i64 {
    (offset << INDEX_BITS) | (index as i64 & (MAX_ITEMS as i64 - 1))
}

/// Kafka's default partition for a keyed record: murmur2 of the key, made positive, modulo
/// the partition count (the Java client's `Utils.toPositive(Utils.murmur2(key)) % n`).
pub fn partition_for_key(key: &[u8], partitions: i32) -> i32 {
    (murmur2(key) & 0x7fff_ffff) as i32 % partitions.max(1)
}

/// Kafka's murmur2 (seed 0x9747b28c), as its Java client computes it.
fn murmur2(data: &[u8]) -> u32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let mut h = SEED ^ data.len() as u32;
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let rest = chunks.remainder();
    if rest.len() >= 3 {
        h ^= u32::from(rest[2]) << 16;
    }
    if rest.len() >= 2 {
        h ^= u32::from(rest[1]) << 8;
    }
    if !rest.is_empty() {
        h ^= u32::from(rest[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h
}

/// True if `record` is a bundle (not a record written before bundles existed).
pub fn is_bundle(record: &[u8]) -> bool {
    record.starts_with(BUNDLE_MAGIC)
}

/// The items of a record: a bundle's items, or the record itself if it is not a bundle.
/// `None` for a bundle that is cut short or has bytes left over.
pub fn items(record: &[u8]) -> Option<Vec<&[u8]>> {
    let Some(mut rest) = record.strip_prefix(BUNDLE_MAGIC) else {
        return Some(vec![record]);
    };
    let mut take = |n: usize| -> Option<&[u8]> {
        let (head, tail) = (rest.get(..n)?, rest.get(n..)?);
        rest = tail;
        Some(head)
    };
    let count = u32::from_be_bytes(take(4)?.try_into().ok()?) as usize;
    let mut found = Vec::with_capacity(count.min(MAX_ITEMS));
    for _ in 0..count {
        let length = u32::from_be_bytes(take(4)?.try_into().ok()?) as usize;
        found.push(take(length)?);
    }
    rest.is_empty().then_some(found)
}

/// Items gathered per destination partition of one topic, written as bundles: one record per
/// partition, or more when the items outgrow `max_bytes` or [`MAX_ITEMS`] (an item larger
/// than `max_bytes` travels alone).
#[derive(Debug)]
pub struct Bundler {
    topic: String,
    partitions: i32,
    max_bytes: usize,
    open: BTreeMap<i32, (Vec<u8>, u32)>,
}

impl Bundler {
    /// Bundles for `topic`, which has `partitions` partitions, each record at most
    /// `max_bytes` unless a single item is larger.
    pub fn new(topic: &str, partitions: i32, max_bytes: usize) -> Bundler {
        Bundler {
            topic: topic.to_owned(),
            partitions: partitions.max(1),
            max_bytes,
            open: BTreeMap::new(),
        }
    }

    /// Adds an item bound for the partition of `key`, its bytes written by `write`.
    pub fn push_keyed(
        &mut self,
        key: &[u8],
        out: &mut Vec<Outgoing>,
        write: impl Fn(&mut Vec<u8>),
    ) {
        let partition = partition_for_key(key, self.partitions);
        self.push(partition, out, write);
    }

    /// Adds an item bound for `partition`, its bytes written by `write`; a bundle that is
    /// full goes to `out` first.
    pub fn push(&mut self, partition: i32, out: &mut Vec<Outgoing>, write: impl Fn(&mut Vec<u8>)) {
        let mut item = Vec::new();
        write(&mut item);
        let (bundle, count) = self
            .open
            .entry(partition)
            .or_insert_with(|| (Vec::new(), 0));
        let full = *count as usize >= MAX_ITEMS
            || (*count > 0 && bundle.len() + 4 + item.len() > self.max_bytes);
        if full {
            let (bundle, count) = std::mem::take(self.open.get_mut(&partition).expect("open"));
            out.push(self.record(partition, bundle, count));
        }
        let (bundle, count) = self.open.get_mut(&partition).expect("open");
        if *count == 0 {
            bundle.extend_from_slice(BUNDLE_MAGIC);
            bundle.extend_from_slice(&[0; 4]);
        }
        bundle.extend_from_slice(&(item.len() as u32).to_be_bytes());
        bundle.extend_from_slice(&item);
        *count += 1;
    }

    /// Every open bundle to `out`, in partition order.
    pub fn finish(&mut self, out: &mut Vec<Outgoing>) {
        for (partition, (bundle, count)) in std::mem::take(&mut self.open) {
            if count > 0 {
                out.push(self.record(partition, bundle, count));
            }
        }
    }

    fn record(&self, partition: i32, mut bundle: Vec<u8>, count: u32) -> Outgoing {
        bundle[BUNDLE_MAGIC.len()..BUNDLE_MAGIC.len() + 4].copy_from_slice(&count.to_be_bytes());
        Outgoing::new(&self.topic, Some(partition), None, Some(bundle), None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Java client's murmur2 on the test vectors of Kafka's own `UtilsTest`.
    #[test]
    fn murmur2_is_kafkas() {
        let cases: [(&[u8], i32); 6] = [
            (b"21", -973_932_308),
            (b"foobar", -790_332_482),
            (b"a-little-bit-long-string", -985_981_536),
            (b"a-little-bit-longer-string", -1_486_304_829),
            (
                b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58_897_971,
            ),
            (b"abc", 479_470_107),
        ];
        for (key, want) in cases {
            assert_eq!(
                murmur2(key) as i32,
                want,
                "{}",
                String::from_utf8_lossy(key)
            );
        }
    }

    /// The partition of a key is the one librdkafka's `murmur2_random` partitioner (the
    /// one the roles' producers use) gives it.
    #[test]
    fn partitions_agree_with_librdkafka() {
        use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
        let cluster = rdkafka::mocking::MockCluster::new(1).expect("mock cluster");
        cluster.create_topic("keys", 7, 1).expect("topic");
        let producer: BaseProducer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", cluster.bootstrap_servers())
            .set("partitioner", "murmur2_random")
            .create()
            .expect("producer");
        let keys: Vec<String> = (0..200).map(|i| format!("response-{i}")).collect();
        // Metadata first, so that the partitioner runs with the real partition count.
        producer
            .client()
            .fetch_metadata(Some("keys"), std::time::Duration::from_secs(10))
            .expect("metadata");
        for key in &keys {
            let record: BaseRecord<'_, str, str> =
                BaseRecord::to("keys").key(key.as_str()).payload("x");
            producer.send(record).map_err(|(e, _)| e).expect("queued");
        }
        producer
            .flush(std::time::Duration::from_secs(10))
            .expect("flushed");
        let consumer: rdkafka::consumer::BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", cluster.bootstrap_servers())
            .set("group.id", "check")
            .set("auto.offset.reset", "earliest")
            .create()
            .expect("consumer");
        use rdkafka::consumer::Consumer;
        use rdkafka::Message;
        consumer.subscribe(&["keys"]).expect("subscribed");
        let mut seen = 0;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while seen < keys.len() && std::time::Instant::now() < deadline {
            if let Some(Ok(m)) = consumer.poll(std::time::Duration::from_millis(100)) {
                let key = m.key().expect("key");
                assert_eq!(m.partition(), partition_for_key(key, 7), "{key:?}");
                seen += 1;
            }
        }
        assert_eq!(seen, keys.len());
    }

    #[test]
    fn positions_order_records_then_items() {
        assert!(position(7, MAX_ITEMS - 1) < position(8, 0));
        assert!(position(8, 0) < position(8, 1));
        assert_eq!(position(0, 0), 0);
        assert_eq!(position(1 << 40, 3) >> INDEX_BITS, 1 << 40);
    }

    /// Items come back from the bundles in the order pushed, per partition; a bundle splits
    /// at the size limit (an oversized item alone); a record that is not a bundle is one item.
    #[test]
    fn bundles_carry_items_in_order_within_limits() {
        let mut bundler = Bundler::new("t", 4, 64);
        let mut out = Vec::new();
        let payloads: Vec<Vec<u8>> = (0..20u8).map(|i| vec![i; 10]).collect();
        for (i, p) in payloads.iter().enumerate() {
            bundler.push((i % 2) as i32, &mut out, |w| w.extend_from_slice(p));
        }
        bundler.push(3, &mut out, |w| w.extend_from_slice(&[9; 200]));
        bundler.finish(&mut out);
        assert!(out.iter().all(|r| r.key.is_none() && r.topic == "t"));
        let mut back: BTreeMap<i32, Vec<Vec<u8>>> = BTreeMap::new();
        for record in &out {
            let payload = record.payload.as_deref().expect("payload");
            let partition = record.partition.expect("partition");
            assert!(payload.len() <= 64 || partition == 3, "{}", payload.len());
            for item in items(payload).expect("a bundle") {
                back.entry(partition).or_default().push(item.to_vec());
            }
        }
        let even: Vec<Vec<u8>> = payloads.iter().step_by(2).cloned().collect();
        let odd: Vec<Vec<u8>> = payloads.iter().skip(1).step_by(2).cloned().collect();
        assert_eq!(back[&0], even);
        assert_eq!(back[&1], odd);
        assert_eq!(back[&3], vec![vec![9; 200]]);
        assert!(out.len() > 3, "split at the size limit: {}", out.len());
        assert_eq!(items(b"{\"plain\":1}"), Some(vec![&b"{\"plain\":1}"[..]]));
        let first = out[0].payload.clone().expect("payload");
        assert_eq!(items(&first[..first.len() - 1]), None, "cut short");
        let mut longer = first.clone();
        longer.push(0);
        assert_eq!(items(&longer), None, "bytes left over");
    }
}
