//! Throughput of the core hot path on realistic ~300-byte survey events, one core, no I/O,
//! through the same functions the services call (no second copy of the pipeline here):
//!
//! - `decode`: parsing and validation only.
//! - `ingest stage`: `Ingest::process` for every event (decode, duplicate check, clock rules,
//!   segment assignment, alerts) and `Ingest::take_deltas` per batch of 2000.
//! - `pipeline`: the ingest stage plus `SegmentStore::apply` of every delta (the aggregator's
//!   window updates), i.e. ingest to counted windows, without Kafka and the delta JSON.
//! - `restore`: rebuilding 10,000 segments from snapshot messages.
//! - `decode alert`: the followup role's decoding of the detractor alerts those events cause,
//!   as the ingest stage writes them to `npsflow.followups`.
//!
//! Run: `cargo bench -p npsflow-core --bench core`. Results go in BENCHMARKS.md.

use criterion::{criterion_main, BatchSize, Criterion, Throughput};
use npsflow_core::{
    decode, decode_alert, ClockKind, Ingest, IngestSpec, Routing, SegmentDelta, SegmentSnapshot,
    SegmentSpec, SegmentStore, Span, Timestamp, WindowSpecs,
};

const EVENTS: usize = 100_000;
/// Messages per ingest batch.
const BATCH: usize = 2000;
/// 2026-11-22T12:00:00Z
const NOW: i64 = 1_795_348_800_000;

/// A deterministic stream of realistic events (a small LCG, so no RNG crate is needed).
fn events() -> Vec<Vec<u8>> {
    let regions = ["east", "west", "north", "south", "central"];
    let products = ["sedan", "van", "suv", "truck", "coupe", "wagon"];
    let channels = ["email", "sms", "web", "app"];
    let tiers = ["bronze", "silver", "gold", "platinum"];
    let comments = [
        "Delivery was quick but the app keeps logging me out.",
        "Great service, the advisor explained everything twice.",
        "Waited forty minutes on hold; nobody called back.",
        "",
    ];
    let mut state: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = move |n: usize| {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        ((state >> 33) as usize) % n
    };
    (0..EVENTS)
        .map(|i| {
            let t = Timestamp(NOW - (next(86_400) as i64) * 1_000);
            let comment = comments[next(comments.len())];
            let comment = if comment.is_empty() {
                String::new()
            } else {
                format!(r#","comment":"{comment}""#)
            };
            format!(
                r#"{{"response_id":"{i:08x}-1b4d-4c8e-9f1a-2b3c4d5e6f70","score":{score},"responded_at":"{at}","customer_id":"cust-{customer:07}","account_id":"acct-{account:05}","survey_id":"relationship-2026q4","segments":{{"region":"{region}","product":"{product}","channel":"{channel}","tier":"{tier}"}}{comment}}}"#,
                score = next(11),
                at = t.to_rfc3339(),
                customer = next(10_000_000),
                account = next(100_000),
                region = regions[next(regions.len())],
                product = products[next(products.len())],
                channel = channels[next(channels.len())],
                tier = tiers[next(tiers.len())],
            )
            .into_bytes()
        })
        .collect()
}

fn windows() -> WindowSpecs {
    WindowSpecs::new(&["1h", "24h", "7d", "28d"], 60, Span::minutes(5)).expect("valid")
}

/// The ingest stage as the service configures it by default.
fn ingest() -> Ingest {
    let segments = SegmentSpec::new(
        &["region", "product", "channel", "tier"],
        &[vec!["region", "product"]],
        100,
    )
    .expect("valid");
    Ingest::new(IngestSpec {
        windows: windows(),
        segments,
        routing: Routing::new(Default::default(), vec![], "queue"),
        dedupe_horizon: Span::days(28),
        dedupe_capacity: 1_000_000,
        clock: ClockKind::Wall,
    })
}

/// Every event through the production path, in batches of `BATCH`: `Ingest::process` each,
/// `Ingest::take_deltas` per batch, and (with a store) `SegmentStore::apply` each delta.
/// Returns how many responses the store counted (or the deltas carried, without a store).
fn run(events: &[Vec<u8>], ingest: &mut Ingest, mut store: Option<&mut SegmentStore>) -> u64 {
    let mut counted = 0;
    for (batch, chunk) in events.chunks(BATCH).enumerate() {
        for (i, e) in chunk.iter().enumerate() {
            let offset = (batch * BATCH + i) as i64;
            ingest.process(0, offset, e, Timestamp(NOW));
        }
        for delta in ingest.take_deltas() {
            counted += match store.as_deref_mut() {
                Some(store) => store.apply(&delta).counted,
                None => delta.responses.len() as u64,
            };
        }
    }
    counted
}

fn bench(c: &mut Criterion) {
    let events = events();
    let mean = events.iter().map(Vec::len).sum::<usize>() / events.len();
    eprintln!("{} events, mean size {mean} bytes", events.len());

    let mut group = c.benchmark_group("core");
    group.throughput(Throughput::Elements(events.len() as u64));
    group.sample_size(20);

    group.bench_function("decode", |b| {
        b.iter(|| events.iter().filter(|e| decode(e).is_ok()).count())
    });

    group.bench_function("ingest stage (decisions, alerts, deltas per 2000)", |b| {
        b.iter_batched(
            ingest,
            |mut ingest| {
                assert!(run(&events, &mut ingest, None) > 0);
                ingest
            },
            BatchSize::PerIteration,
        )
    });
    group.bench_function("pipeline (ingest, deltas per 2000, aggregate apply)", |b| {
        b.iter_batched(
            || (ingest(), SegmentStore::new(windows())),
            |(mut ingest, mut store)| {
                // 6 segments per event (all, 4 dimensions, region+product), all accepted.
                assert_eq!(
                    run(&events, &mut ingest, Some(&mut store)),
                    6 * EVENTS as u64
                );
                (ingest, store)
            },
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

/// The detractor alerts of `events()`, as JSON on `npsflow.followups`.
fn alerts(events: &[Vec<u8>]) -> Vec<Vec<u8>> {
    let mut ingest = ingest();
    events
        .iter()
        .enumerate()
        .filter_map(|(offset, e)| ingest.process(0, offset as i64, e, Timestamp(NOW)).alert)
        .map(|alert| alert.to_json())
        .collect()
}

fn followup(c: &mut Criterion) {
    let alerts = alerts(&events());
    let mut group = c.benchmark_group("followup");
    group.throughput(Throughput::Elements(alerts.len() as u64));
    group.sample_size(20);
    group.bench_function("decode alert", |b| {
        b.iter(|| {
            let decoded = alerts.iter().filter(|a| decode_alert(a).is_ok()).count();
            assert_eq!(decoded, alerts.len());
        })
    });
    // The `responded` notice ingest sends the followup role for every accepted response.
    let notices: Vec<Vec<u8>> = (0..alerts.len())
        .map(|i| {
            npsflow_core::FollowupNotice::Responded {
                customer_id: format!("customer-{i}"),
                response_id: format!("response-{i}"),
                score: (i % 11) as u8,
                responded_at: Timestamp(NOW),
            }
            .to_json()
        })
        .collect();
    group.bench_function("decode responded notice", |b| {
        b.iter(|| {
            let decoded = notices
                .iter()
                .filter(|n| npsflow_core::FollowupNotice::from_json(n).is_ok())
                .count();
            assert_eq!(decoded, notices.len());
        })
    });
    group.finish();
}

#[allow(missing_docs)]
mod group {
    criterion::criterion_group!(benches, super::bench, super::followup);
}
use group::benches;
/// 10,000 segments, each with all four windows full (responses in every bucket), as
/// snapshot messages; restoring means parsing each and rebuilding its windows.
fn restore(c: &mut Criterion) {
    const SEGMENTS: usize = 10_000;
    let windows = windows();
    let mut store = SegmentStore::new(windows.clone());
    let mut offset = 0;
    let mut snapshots = Vec::with_capacity(SEGMENTS);
    for s in 0..SEGMENTS {
        let segment = format!("product=p{},region=r{}", s % 100, s / 100);
        // One response a minute for the last hour and one every 28 minutes over 28 days:
        // every bucket of every window holds counts.
        let times = (0..60)
            .map(|m| NOW - m * 60_000)
            .chain((0..1440).map(|k| NOW - k * 28 * 60_000));
        let responses = times
            .map(|t| {
                offset += 1;
                (offset, t - t.rem_euclid(60_000), (offset % 11) as u8)
            })
            .collect();
        store.apply(&SegmentDelta {
            segment: segment.clone(),
            partition: (s % 6) as i32,
            responses,
            invitations: Vec::new(),
        });
        snapshots.push(store.snapshot(&segment).expect("known").to_json());
    }
    let bytes: usize = snapshots.iter().map(Vec::len).sum();
    eprintln!("{SEGMENTS} snapshots, {} MiB", bytes / (1 << 20));
    let mut group = c.benchmark_group("restore");
    group.sample_size(10);
    group.throughput(Throughput::Elements(SEGMENTS as u64));
    group.bench_function("10k segments x 4 windows", |b| {
        b.iter(|| {
            let mut restored = SegmentStore::new(windows.clone());
            for json in &snapshots {
                restored.restore(&SegmentSnapshot::from_json(json).expect("valid"));
            }
            restored
        })
    });
    group.finish();
}

#[allow(missing_docs)]
mod restore_group {
    criterion::criterion_group!(restore_benches, super::restore);
}
use restore_group::restore_benches;

criterion_main!(benches, restore_benches);
