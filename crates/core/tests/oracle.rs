//! Property tests: random streams of survey messages (out of order, late, early, duplicated,
//! invalid) go through the core exactly as the services use it, and every outcome, every
//! segment's window counts, NPS and margin of error must equal what a naive oracle computes
//! from the raw list of messages.

use std::collections::{BTreeSet, HashSet};

use npsflow_core::{
    classify, decode, Category, Clock, DuplicateFilter, Outcome, Scoreboard, SegmentCatalog,
    SegmentId, SegmentSpec, Span, Tally, Timestamp, WindowSpecs,
};
use proptest::prelude::*;

const WINDOWS: [&str; 4] = ["1h", "24h", "7d", "28d"];
const BUCKETS: u32 = 60;
const SKEW: Span = Span::minutes(5);
const CAP: usize = 3;
const REGIONS: [&str; 5] = ["east", "west", "north", "south", "a,b=c"];
const PRODUCTS: [&str; 2] = ["sedan", "van"];
/// 2026-11-22T00:00:00Z
const START: i64 = 1_795_305_600_000;

/// One generated message and what the generator knows about it.
#[derive(Debug, Clone)]
enum Message {
    Valid {
        id: u8,
        score: u8,
        /// Event time relative to the clock, in seconds.
        offset_s: i64,
        region: Option<usize>,
        product: Option<usize>,
    },
    /// Bytes that must not decode.
    Invalid(Vec<u8>),
}

#[derive(Debug, Clone)]
struct Step {
    /// How far the wall clock moves before this message, in seconds.
    advance_s: i64,
    message: Message,
}

fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        8 => (
            0u8..40,
            0u8..=10,
            // Mostly recent, some late by days, a few too old or too far ahead.
            prop_oneof![
                6 => -3_600i64..=60,
                3 => -30 * 86_400i64..=0,
                1 => 0i64..=900,
                // Exactly on the edges of the longest window and of the skew.
                1 => prop_oneof![Just(-28 * 86_400i64), Just(-28 * 86_400 + 1), Just(300), Just(301)],
            ],
            proptest::option::of(0..REGIONS.len()),
            proptest::option::of(0..PRODUCTS.len()),
        )
            .prop_map(|(id, score, offset_s, region, product)| Message::Valid {
                id,
                score,
                offset_s,
                region,
                product,
            }),
        1 => prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..40),
            Just(br#"{"response_id":"x","score":11,"responded_at":"2026-11-22T00:00:00Z","customer_id":"c"}"#.to_vec()),
            Just(br#"{"response_id":"x","score":7.0,"responded_at":"2026-11-22T00:00:00Z","customer_id":"c"}"#.to_vec()),
            Just(br#"{"response_id":"x","score":"7","responded_at":"2026-11-22T00:00:00Z","customer_id":"c"}"#.to_vec()),
            Just(br#"{"response_id":"x","score":7,"responded_at":"yesterday","customer_id":"c"}"#.to_vec()),
        ]
        .prop_filter("must be invalid", |bytes| decode(bytes).is_err())
        .prop_map(Message::Invalid),
    ]
}

fn steps() -> impl Strategy<Value = Vec<Step>> {
    proptest::collection::vec(
        (
            prop_oneof![3 => Just(0i64), 2 => 0i64..600, 1 => 0i64..3 * 86_400],
            message(),
        )
            .prop_map(|(advance_s, message)| Step { advance_s, message }),
        1..300,
    )
}

fn encode(message: &Message, now: i64) -> (Vec<u8>, i64) {
    match message {
        Message::Invalid(bytes) => (bytes.clone(), 0),
        Message::Valid {
            id,
            score,
            offset_s,
            region,
            product,
        } => {
            let t = now + offset_s * 1_000;
            let mut segments = serde_json::Map::new();
            if let Some(r) = region {
                segments.insert("region".into(), REGIONS[*r].into());
            }
            if let Some(p) = product {
                segments.insert("product".into(), PRODUCTS[*p].into());
            }
            let json = serde_json::json!({
                "response_id": format!("resp-{id}"),
                "score": score,
                "responded_at": Timestamp(t).to_rfc3339(),
                "customer_id": "cust",
                "segments": segments,
            });
            (serde_json::to_vec(&json).expect("serialises"), t)
        }
    }
}

/// The naive model: a list of accepted responses and their segment names.
#[derive(Default)]
struct Oracle {
    accepted_ids: HashSet<u8>,
    admitted_regions: Vec<&'static str>,
    admitted_products: Vec<&'static str>,
    /// (event time ms, score, segment names)
    accepted: Vec<(i64, u8, Vec<String>)>,
}

fn capped(admitted: &mut Vec<&'static str>, value: &'static str) -> String {
    if !admitted.contains(&value) && admitted.len() < CAP {
        admitted.push(value);
    }
    let shown = if admitted.contains(&value) {
        value
    } else {
        "__other__"
    };
    shown
        .replace('%', "%25")
        .replace(',', "%2C")
        .replace('=', "%3D")
}

impl Oracle {
    fn outcome(&mut self, message: &Message, now: i64, t: i64) -> &'static str {
        let Message::Valid {
            id,
            score,
            region,
            product,
            ..
        } = message
        else {
            return "invalid";
        };
        if self.accepted_ids.contains(id) {
            return "duplicate";
        }
        if t <= now - 28 * 86_400_000 {
            return "too_old";
        }
        if t > now + SKEW.millis() {
            return "future";
        }
        self.accepted_ids.insert(*id);
        let mut names = vec!["all".to_owned()];
        let region = region.map(|r| capped(&mut self.admitted_regions, REGIONS[r]));
        let product = product.map(|p| capped(&mut self.admitted_products, PRODUCTS[p]));
        if let Some(p) = &product {
            names.push(format!("product={p}"));
        }
        if let Some(r) = &region {
            names.push(format!("region={r}"));
        }
        if let (Some(p), Some(r)) = (&product, &region) {
            names.push(format!("product={p},region={r}"));
        }
        self.accepted.push((t, *score, names));
        "accepted"
    }

    /// Counts for a segment and window at `now`, straight from the definition: a response
    /// counts if its bucket is one of the window's `BUCKETS` buckets ending with `now`'s.
    fn tally(&self, segment: &str, window: Span, now: i64) -> Tally {
        let bucket = window.millis() / i64::from(BUCKETS);
        let last = now.div_euclid(bucket);
        let mut tally = Tally::default();
        for (t, score, names) in &self.accepted {
            let b = t.div_euclid(bucket);
            if b > last - i64::from(BUCKETS) && b <= last && names.iter().any(|n| n == segment) {
                match score {
                    9..=10 => tally.promoters += 1,
                    7..=8 => tally.passives += 1,
                    _ => tally.detractors += 1,
                }
            }
        }
        tally
    }

    fn segments(&self) -> BTreeSet<String> {
        self.accepted
            .iter()
            .flat_map(|(_, _, names)| names.iter().cloned())
            .collect()
    }
}

/// NPS and margin straight from percentages, written independently of the core.
fn naive_nps_and_ci(t: &Tally) -> Option<(f64, f64)> {
    let n = (t.promoters + t.passives + t.detractors) as f64;
    if n == 0.0 {
        return None;
    }
    let pct_promoters = 100.0 * t.promoters as f64 / n;
    let pct_detractors = 100.0 * t.detractors as f64 / n;
    let (p, d) = (pct_promoters / 100.0, pct_detractors / 100.0);
    let ci = 196.0 * ((p * (1.0 - p) + d * (1.0 - d) + 2.0 * p * d) / n).sqrt();
    Some((pct_promoters - pct_detractors, ci))
}

struct Core {
    windows: WindowSpecs,
    seen: DuplicateFilter,
    catalog: SegmentCatalog,
    board: Scoreboard<SegmentId>,
    ids: Vec<SegmentId>,
}

impl Core {
    fn new() -> Core {
        let windows = WindowSpecs::new(&WINDOWS, BUCKETS, SKEW).expect("valid windows");
        let spec = SegmentSpec::new(&["region", "product"], &[vec!["region", "product"]], CAP)
            .expect("valid segments");
        Core {
            seen: DuplicateFilter::new(Span::days(365), 1_000_000),
            catalog: SegmentCatalog::new(spec),
            board: Scoreboard::new(windows.clone()),
            windows,
            ids: Vec::new(),
        }
    }

    fn process(&mut self, bytes: &[u8], clock: Clock) -> &'static str {
        let outcome = classify(bytes, clock, &self.windows, &mut self.seen);
        if let Outcome::Accepted(response) = &outcome {
            self.catalog.assign(response, &mut self.ids);
            self.board
                .record(&self.ids, response.responded_at, response.score.category());
        }
        outcome.label()
    }

    fn check_against(&self, oracle: &Oracle, now: i64) -> Result<(), TestCaseError> {
        let segments = oracle.segments();
        prop_assert_eq!(
            segments.len(),
            self.board.len(),
            "segment sets differ in size"
        );
        for name in &segments {
            let id = self.catalog.id(name);
            prop_assert!(id.is_some(), "core has no segment {}", name);
            let id = id.expect("checked");
            for (index, spec) in self.windows.windows().iter().enumerate() {
                let expected = oracle.tally(name, spec.length(), now);
                let summary = self
                    .board
                    .summary(&id, index, Timestamp(now))
                    .expect("known");
                prop_assert_eq!(
                    summary.tally,
                    expected,
                    "{} {} at {}",
                    name,
                    spec.name(),
                    now
                );
                match naive_nps_and_ci(&expected) {
                    None => {
                        prop_assert_eq!(summary.nps, None);
                        prop_assert_eq!(summary.ci95, None);
                    }
                    Some((nps, ci)) => {
                        let got_nps = summary.nps.expect("has responses");
                        let got_ci = summary.ci95.expect("has responses");
                        prop_assert!((got_nps - nps).abs() < 1e-9, "nps {} vs {}", got_nps, nps);
                        prop_assert!((got_ci - ci).abs() < 1e-9, "ci {} vs {}", got_ci, ci);
                        prop_assert!((-100.0..=100.0).contains(&got_nps));
                    }
                }
            }
        }
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Wall clock: the clock moves on its own; events arrive late, early and repeated.
    #[test]
    fn windows_match_the_oracle_on_a_wall_clock(steps in steps()) {
        let mut core = Core::new();
        let mut oracle = Oracle::default();
        let mut now = START;
        for step in &steps {
            now += step.advance_s * 1_000;
            let (bytes, t) = encode(&step.message, now);
            let expected = oracle.outcome(&step.message, now, t);
            prop_assert_eq!(core.process(&bytes, Clock::Wall(Timestamp(now))), expected);
        }
        core.check_against(&oracle, now)?;
        // Queried later, as a dashboard would, windows drain exactly as the oracle says.
        for later in [60_000, 3_600_000, 86_400_000, 8 * 86_400_000, 30 * 86_400_000] {
            core.check_against(&oracle, now + later)?;
        }
    }

    /// Event-time clock: "now" is the largest event time seen, as in a replay.
    #[test]
    fn windows_match_the_oracle_on_an_event_time_clock(steps in steps()) {
        let mut core = Core::new();
        let mut oracle = Oracle::default();
        let mut base = START;
        let mut latest: Option<i64> = None;
        for step in &steps {
            base += step.advance_s * 1_000;
            let (bytes, t) = encode(&step.message, base);
            let now = latest.map_or(t, |l| l.max(t));
            let expected = oracle.outcome(&step.message, now, t);
            prop_assert!(expected != "future");
            let clock = Clock::EventTime(latest.map(Timestamp));
            prop_assert_eq!(core.process(&bytes, clock), expected);
            if expected == "accepted" {
                latest = Some(now);
            }
        }
        core.check_against(&oracle, latest.unwrap_or(base))?;
    }

    /// Decoding never panics and always gives an answer, whatever the bytes.
    #[test]
    fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode(&bytes);
    }

    /// Any JSON object with the required fields of the right shape decodes, and its score
    /// category is the one the definition gives.
    #[test]
    fn well_formed_responses_decode(score in 0u8..=10, id in "[a-zA-Z0-9-]{1,128}", extra in "[a-z]{1,8}") {
        let json = serde_json::json!({
            "response_id": id, "score": score, "responded_at": "2026-11-22T10:00:00Z",
            "customer_id": "c", extra: [1, {"x": null}],
        });
        let bytes = serde_json::to_vec(&json).expect("serialises");
        let response = decode(&bytes).expect("valid");
        let expected = match score { 9..=10 => Category::Promoter, 7..=8 => Category::Passive, _ => Category::Detractor };
        prop_assert_eq!(response.score.category(), expected);
    }
}

/// The worked example from the contract, through the whole pipeline: 20 promoters,
/// 50 passives and 30 detractors give NPS -10.
#[test]
fn worked_example_through_the_pipeline() {
    let mut core = Core::new();
    let scores = std::iter::repeat_n(9, 20)
        .chain(std::iter::repeat_n(7, 50))
        .chain(std::iter::repeat_n(3, 30));
    for (i, score) in scores.enumerate() {
        let json = serde_json::json!({
            "response_id": format!("r{i}"), "score": score,
            "responded_at": Timestamp(START).to_rfc3339(), "customer_id": "c",
        });
        let bytes = serde_json::to_vec(&json).expect("serialises");
        assert_eq!(
            core.process(&bytes, Clock::Wall(Timestamp(START))),
            "accepted"
        );
    }
    let all = core.catalog.id("all").expect("all exists");
    let summary = core
        .board
        .summary(&all, 0, Timestamp(START))
        .expect("known");
    assert_eq!(summary.tally.responses(), 100);
    assert!((summary.nps.expect("nps") - -10.0).abs() < 1e-9);
}
