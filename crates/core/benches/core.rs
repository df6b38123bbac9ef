//! Throughput of the core hot path on realistic ~300-byte survey events: decode + classify
//! (dedupe, clock) + segment assignment + rolling-window update, one core, no I/O.
//!
//! Run: `cargo bench -p npsflow-core --bench core`. Results go in BENCHMARKS.md.

use criterion::{criterion_main, BatchSize, Criterion, Throughput};
use npsflow_core::{
    classify, decode, Clock, ClockKind, DuplicateFilter, Ingest, IngestSpec, Outcome, Routing,
    Scoreboard, SegmentCatalog, SegmentId, SegmentSpec, Span, Timestamp, WindowSpecs,
};

const EVENTS: usize = 100_000;
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

struct Pipeline {
    windows: WindowSpecs,
    seen: DuplicateFilter,
    catalog: SegmentCatalog,
    board: Scoreboard<SegmentId>,
    ids: Vec<SegmentId>,
}

impl Pipeline {
    fn new() -> Pipeline {
        let windows =
            WindowSpecs::new(&["1h", "24h", "7d", "28d"], 60, Span::minutes(5)).expect("valid");
        let spec = SegmentSpec::new(
            &["region", "product", "channel", "tier"],
            &[vec!["region", "product"]],
            100,
        )
        .expect("valid");
        Pipeline {
            seen: DuplicateFilter::new(Span::days(28), 1_000_000),
            catalog: SegmentCatalog::new(spec),
            board: Scoreboard::new(windows.clone()),
            windows,
            ids: Vec::with_capacity(8),
        }
    }

    fn process(&mut self, bytes: &[u8]) -> bool {
        match classify(
            bytes,
            Clock::Wall(Timestamp(NOW)),
            &self.windows,
            &mut self.seen,
        ) {
            Outcome::Accepted(response) => {
                self.catalog.assign(&response, &mut self.ids);
                self.board
                    .record(&self.ids, response.responded_at, response.score.category());
                true
            }
            _ => false,
        }
    }
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

    group.bench_function("decode+classify+segment+window", |b| {
        b.iter_batched(
            Pipeline::new,
            |mut pipeline| {
                let accepted = events.iter().filter(|e| pipeline.process(e)).count();
                assert_eq!(accepted, events.len());
                pipeline
            },
            BatchSize::PerIteration,
        )
    });
    group.bench_function("ingest stage (decisions, alerts, deltas per 2000)", |b| {
        b.iter_batched(
            || {
                let p = Pipeline::new();
                Ingest::new(IngestSpec {
                    windows: p.windows,
                    segments: p.catalog.spec().clone(),
                    routing: Routing::new(Default::default(), vec![], "queue"),
                    dedupe_horizon: Span::days(28),
                    dedupe_capacity: 1_000_000,
                    clock: ClockKind::Wall,
                })
            },
            |mut ingest| {
                let mut deltas = 0;
                for (offset, chunk) in events.chunks(2000).enumerate() {
                    for (i, e) in chunk.iter().enumerate() {
                        let offset = (offset * 2000 + i) as i64;
                        ingest.process(0, offset, e, Timestamp(NOW));
                    }
                    deltas += ingest.take_deltas().len();
                }
                assert!(deltas > 0);
                ingest
            },
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

#[allow(missing_docs)]
mod group {
    criterion::criterion_group!(benches, super::bench);
}
use group::benches;
criterion_main!(benches);
