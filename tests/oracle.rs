//! Property tests of the production path: random streams of survey messages (out of order,
//! late, early, duplicated, invalid, on several input partitions) go through the core exactly
//! as the services use it:
//!
//! `Ingest::process(partition, offset, bytes, wall)` for every message, `Ingest::take_deltas()`
//! per batch, each delta through `SegmentDelta::to_json` / `SegmentDelta::from_json` (the
//! deltas topic), and `SegmentStore::apply` (the aggregator), with replays of batches, snapshot
//! round trips (`SegmentStore::snapshot`, `SegmentSnapshot::to_json` / `from_json`,
//! `SegmentStore::restore`), aggregator crashes (restore from older snapshots, replay every
//! delta) and ingest restarts (a fresh `Ingest` re-processes every message; its deltas must
//! change nothing).
//!
//! Every outcome, and every segment's window counts, NPS and margin of error, must equal what
//! a naive oracle recomputes from the raw list of messages with the contract's rules: a
//! message counts when it is valid, the first accepted occurrence of its `response_id`, not
//! older than the longest window's `from` and not further ahead of the clock than the skew;
//! it then counts in `all` and its segments, and in a window at `now` exactly when
//! `from <= responded_at < to`, with `(from, to)` the window's interval at `now`.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use npsflow_core::{
    decode, Category, ClockKind, Decision, Ingest, IngestSpec, Routing, SegmentDelta,
    SegmentSnapshot, SegmentSpec, SegmentStore, Span, Tally, Timestamp, WindowSpec, WindowSpecs,
};
use proptest::prelude::*;

const BUCKETS: u32 = 60;
const CAP: usize = 3;
const PARTITIONS: i32 = 3;
const REGIONS: [&str; 6] = ["east", "west", "north", "south", "a,b=c", "__other__"];
const PRODUCTS: [&str; 2] = ["sedan", "van"];
/// 2026-11-22T00:00:00Z
const START: i64 = 1_795_305_600_000;

/// A window configuration: lengths, per-window resolutions, skew.
struct Config {
    lengths: &'static [&'static str],
    resolutions: &'static [(&'static str, Span)],
    skew: Span,
}

/// The defaults; per-window steps (gcd finer than every step but one); short windows with
/// steps whose gcd (5s) is finer than both, so streams cross many step edges.
const CONFIGS: [Config; 3] = [
    Config {
        lengths: &["1h", "24h", "7d", "28d"],
        resolutions: &[],
        skew: Span::minutes(5),
    },
    Config {
        lengths: &["1h", "24h", "7d"],
        resolutions: &[("1h", Span::seconds(30)), ("7d", Span::hours(1))],
        skew: Span::minutes(5),
    },
    Config {
        lengths: &["10m", "1h"],
        resolutions: &[("10m", Span::seconds(10)), ("1h", Span::seconds(45))],
        skew: Span::minutes(1),
    },
];

fn window_specs(config: &Config) -> WindowSpecs {
    let resolutions: Vec<(String, Span)> = config
        .resolutions
        .iter()
        .map(|(name, step)| ((*name).to_owned(), *step))
        .collect();
    WindowSpecs::with_resolutions(config.lengths, BUCKETS, &resolutions, config.skew)
        .expect("valid windows")
}

fn ingest_spec(windows: &WindowSpecs, clock: ClockKind) -> IngestSpec {
    IngestSpec {
        windows: windows.clone(),
        segments: SegmentSpec::new(&["region", "product"], &[vec!["region", "product"]], CAP)
            .expect("valid segments"),
        routing: Routing::new(Default::default(), vec![], "queue"),
        // Longer than any stream: the oracle does not model forgetting ids.
        dedupe_horizon: Span::days(3650),
        dedupe_capacity: 1_000_000,
        clock,
    }
}

/// When a response happened, relative to the clock when it is sent. Fractions are in 1/1000.
#[derive(Debug, Clone, Copy)]
enum When {
    /// Within the length of window number `.1` (modulo the window count) before `now`.
    Recent(u16, usize),
    /// Up to 1.1 times the longest window before `now`.
    Late(u16),
    /// Up to twice the skew ahead of `now`.
    Early(u16),
    /// Exactly on or next to an edge: of the longest window's `from`, of the skew, or of
    /// window number `.1`'s interval.
    Edge(u8, usize),
}

/// One generated message and what the generator knows about it.
#[derive(Debug, Clone)]
enum Message {
    Valid {
        id: u8,
        score: u8,
        when: When,
        region: Option<usize>,
        product: Option<usize>,
    },
    /// Bytes that must not decode.
    Invalid(Vec<u8>),
}

/// How the wall clock moves before a message. Fractions are in 1/1000.
#[derive(Debug, Clone, Copy)]
enum Advance {
    None,
    /// Up to 1/200 of the longest window.
    Small(u16),
    /// Up to 1/3 of the longest window.
    Big(u16),
    /// To the next step edge of window number `.0`, then `.1 - 1` ms (1 ms before, on, or
    /// 1 ms after the edge).
    ToEdge(usize, u8),
}

/// What the aggregator side does at the end of a batch, after applying it.
#[derive(Debug, Clone, Copy)]
enum Action {
    Nothing,
    /// Applies the batch's deltas a second time: nothing may count twice.
    ReplayBatch,
    /// Applies every delta from a point in the log on again.
    ReplayLog(u16),
    /// Saves snapshots of some segments (selected by `.0`) for a later crash.
    Snapshot(u8),
    /// Snapshots every segment, restores them into a fresh store and goes on with it.
    RoundTrip,
    /// The aggregator crashes: a fresh store restores the saved snapshots (taken at
    /// different times) and every delta ever sent is applied again.
    Crash,
    /// Ingest restarts: a fresh `Ingest` processes every message so far again, with the
    /// same clocks; it decides the same, and its deltas count nothing.
    RestartIngest,
}

#[derive(Debug, Clone)]
struct Step {
    partition: i32,
    advance: Advance,
    message: Message,
    /// Ends the batch after this message, then does the action.
    end_batch: Option<Action>,
}

fn when() -> impl Strategy<Value = When> {
    prop_oneof![
        6 => (0u16..=1000, 0usize..4).prop_map(|(f, w)| When::Recent(f, w)),
        3 => (0u16..=1000).prop_map(When::Late),
        1 => (0u16..=1000).prop_map(When::Early),
        2 => (0u8..8, 0usize..4).prop_map(|(k, w)| When::Edge(k, w)),
    ]
}

fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        8 => (
            0u8..40,
            0u8..=10,
            when(),
            proptest::option::of(0..REGIONS.len()),
            proptest::option::of(0..PRODUCTS.len()),
        )
            .prop_map(|(id, score, when, region, product)| Message::Valid {
                id,
                score,
                when,
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

fn advance() -> impl Strategy<Value = Advance> {
    prop_oneof![
        6 => Just(Advance::None),
        4 => (0u16..=1000).prop_map(Advance::Small),
        1 => (0u16..=1000).prop_map(Advance::Big),
        2 => (0usize..4, 0u8..3).prop_map(|(w, d)| Advance::ToEdge(w, d)),
    ]
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        6 => Just(Action::Nothing),
        2 => Just(Action::ReplayBatch),
        1 => (0u16..=1000).prop_map(Action::ReplayLog),
        2 => any::<u8>().prop_map(Action::Snapshot),
        1 => Just(Action::RoundTrip),
        1 => Just(Action::Crash),
        1 => Just(Action::RestartIngest),
    ]
}

fn steps(partitions: i32) -> impl Strategy<Value = Vec<Step>> {
    proptest::collection::vec(
        (
            0..partitions,
            advance(),
            message(),
            prop_oneof![5 => Just(None), 1 => action().prop_map(Some)],
        )
            .prop_map(|(partition, advance, message, end_batch)| Step {
                partition,
                advance,
                message,
                end_batch,
            }),
        1..250,
    )
}

fn fraction(span: i64, f: u16) -> i64 {
    span / 1000 * i64::from(f)
}

/// The longest window, by the definition (not through `WindowSpecs`' own rule).
fn longest(windows: &WindowSpecs) -> &WindowSpec {
    windows
        .windows()
        .iter()
        .max_by_key(|w| w.length())
        .expect("windows")
}

/// The next step edge of `window` after `now`: the `to` of its interval at `now`.
fn next_edge(window: &WindowSpec, now: i64) -> i64 {
    let step = window.bucket().millis();
    (now.div_euclid(step) + 1) * step
}

fn advance_clock(windows: &WindowSpecs, now: i64, advance: Advance) -> i64 {
    let l = windows.longest().millis();
    match advance {
        Advance::None => now,
        Advance::Small(f) => now + fraction(l / 200, f),
        Advance::Big(f) => now + fraction(l / 3, f),
        Advance::ToEdge(w, d) => {
            let window = &windows.windows()[w % windows.windows().len()];
            let edge = next_edge(window, now) + i64::from(d) - 1;
            if edge >= now {
                edge
            } else {
                edge + window.bucket().millis()
            }
        }
    }
}

/// The event time of a response sent with the clock at `now`.
fn event_time(windows: &WindowSpecs, when: When, now: i64) -> i64 {
    let l = windows.longest().millis();
    let skew = windows.max_future_skew().millis();
    let nth = |w: usize| &windows.windows()[w % windows.windows().len()];
    match when {
        When::Recent(f, w) => now - fraction(nth(w).length().millis(), f),
        When::Late(f) => now - fraction(l + l / 10, f),
        When::Early(f) => now + fraction(2 * skew, f),
        When::Edge(kind, w) => {
            let longest_from = longest(windows).interval(Timestamp(now)).0.millis();
            let (from, to) = nth(w).interval(Timestamp(now));
            match kind {
                0 => longest_from,
                1 => longest_from - 1,
                2 => now + skew,
                3 => now + skew + 1,
                4 => to.millis() - 1,
                5 => to.millis(),
                6 => from.millis(),
                _ => from.millis() - 1,
            }
        }
    }
}

/// The message bytes and, for a valid one, its event time.
fn encode(windows: &WindowSpecs, partition: i32, message: &Message, now: i64) -> (Vec<u8>, i64) {
    match message {
        Message::Invalid(bytes) => (bytes.clone(), 0),
        Message::Valid {
            id,
            score,
            when,
            region,
            product,
        } => {
            let t = event_time(windows, *when, now);
            let mut segments = serde_json::Map::new();
            if let Some(r) = region {
                segments.insert("region".into(), REGIONS[*r].into());
            }
            if let Some(p) = product {
                segments.insert("product".into(), PRODUCTS[*p].into());
            }
            // Ids are unique per input partition: repeats happen only on the same partition
            // (see `Oracle::outcome`).
            let json = serde_json::json!({
                "response_id": format!("p{partition}-resp-{id}"),
                "score": score,
                "responded_at": Timestamp(t).to_rfc3339(),
                "customer_id": "cust",
                "segments": segments,
            });
            (serde_json::to_vec(&json).expect("serialises"), t)
        }
    }
}

/// The naive model: the accepted responses and their segment names, straight from the rules.
#[derive(Default)]
struct Oracle {
    accepted_ids: HashSet<(i32, u8)>,
    admitted_regions: Vec<&'static str>,
    admitted_products: Vec<&'static str>,
    /// (event time ms, score, segment names)
    accepted: Vec<(i64, u8, Vec<String>)>,
}

/// A value's name in a segment, after the cap: the first `CAP` values seen keep their own
/// (percent-encoded, `__other__` escaped as `%5F_other__`), later ones are `__other__`.
fn capped(admitted: &mut Vec<&'static str>, value: &'static str) -> String {
    if !admitted.contains(&value) && admitted.len() < CAP {
        admitted.push(value);
    }
    if !admitted.contains(&value) {
        return "__other__".into();
    }
    if value == "__other__" {
        return "%5F_other__".into();
    }
    value
        .replace('%', "%25")
        .replace(',', "%2C")
        .replace('=', "%3D")
}

impl Oracle {
    /// The outcome of a message on `partition` at event time `t`, with the clock at `now`.
    ///
    /// Duplicates are judged per partition here, and the generator repeats ids only on the
    /// same partition: today ingest judges duplicates per input partition, and the contract
    /// (and a coming change) judges them across partitions; on these streams both agree.
    fn outcome(
        &mut self,
        windows: &WindowSpecs,
        partition: i32,
        message: &Message,
        now: i64,
        t: i64,
    ) -> &'static str {
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
        if self.accepted_ids.contains(&(partition, *id)) {
            return "duplicate";
        }
        if t < longest(windows).interval(Timestamp(now)).0.millis() {
            return "too_old";
        }
        if t > now + windows.max_future_skew().millis() {
            return "future";
        }
        self.accepted_ids.insert((partition, *id));
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

    /// Counts for a segment in a window at `now`, straight from the definition: a response
    /// counts if `from <= t < to`.
    fn tally(&self, segment: &str, window: &WindowSpec, now: i64) -> Tally {
        let (from, to) = window.interval(Timestamp(now));
        let mut tally = Tally::default();
        for (t, score, names) in &self.accepted {
            if from.millis() <= *t && *t < to.millis() && names.iter().any(|n| n == segment) {
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

/// The production path: ingest, the deltas "topic" (a log of JSON messages), the aggregator.
struct Pipeline {
    windows: WindowSpecs,
    clock: ClockKind,
    ingest: Ingest,
    store: SegmentStore,
    /// Next offset per input partition.
    offsets: BTreeMap<i32, i64>,
    /// Every message processed: (partition, offset, bytes, wall clock, outcome).
    history: Vec<(i32, i64, Vec<u8>, i64, &'static str)>,
    /// Every delta message sent, in order.
    log: Vec<Vec<u8>>,
    /// Where the current batch starts in `log`.
    batch_start: usize,
    /// The latest saved snapshot of each segment.
    saved: BTreeMap<String, Vec<u8>>,
}

impl Pipeline {
    fn new(windows: &WindowSpecs, clock: ClockKind) -> Pipeline {
        Pipeline {
            windows: windows.clone(),
            clock,
            ingest: Ingest::new(ingest_spec(windows, clock)),
            store: SegmentStore::new(windows.clone()),
            offsets: BTreeMap::new(),
            history: Vec::new(),
            log: Vec::new(),
            batch_start: 0,
            saved: BTreeMap::new(),
        }
    }

    fn process(&mut self, partition: i32, bytes: &[u8], wall: i64) -> Decision {
        let offset = self.offsets.entry(partition).or_insert(0);
        *offset += 1;
        let decision = self
            .ingest
            .process(partition, *offset, bytes, Timestamp(wall));
        self.history
            .push((partition, *offset, bytes.to_vec(), wall, decision.outcome));
        decision
    }

    /// Applies one delta message as the aggregator receives it.
    fn apply_json(store: &mut SegmentStore, json: &[u8]) -> (u64, u64) {
        let delta = SegmentDelta::from_json(json).expect("a delta ingest made parses");
        let applied = store.apply(&delta);
        (applied.counted, applied.skipped)
    }

    /// Ends the batch: its deltas go through JSON to the aggregator; then `action`.
    fn end_batch(&mut self, action: Action) -> Result<(), TestCaseError> {
        self.batch_start = self.log.len();
        for delta in self.ingest.take_deltas() {
            let json = delta.to_json();
            let back = SegmentDelta::from_json(&json);
            prop_assert_eq!(back.as_ref(), Ok(&delta));
            let (_, skipped) = Self::apply_json(&mut self.store, &json);
            prop_assert_eq!(skipped, 0, "a new batch has only new offsets");
            self.log.push(json);
        }
        match action {
            Action::Nothing => {}
            Action::ReplayBatch => {
                for json in &self.log[self.batch_start..] {
                    let (counted, _) = Self::apply_json(&mut self.store, json);
                    prop_assert_eq!(counted, 0, "a replayed batch counted again");
                }
            }
            Action::ReplayLog(f) => {
                let from = self.log.len() * usize::from(f) / 1001;
                for json in &self.log[from..] {
                    let (counted, _) = Self::apply_json(&mut self.store, json);
                    prop_assert_eq!(counted, 0, "a replayed delta counted again");
                }
            }
            Action::Snapshot(selector) => {
                for segment in self.store.board().segments() {
                    let pick = segment.len() as u8 ^ selector;
                    if pick.is_multiple_of(2) || selector < 64 {
                        let snapshot = self.store.snapshot(segment).expect("known segment");
                        self.saved.insert(segment.clone(), snapshot.to_json());
                    }
                }
            }
            Action::RoundTrip => {
                let mut restored = SegmentStore::new(self.windows.clone());
                for segment in self.store.board().segments() {
                    let snapshot = self.store.snapshot(segment).expect("known segment");
                    let back = SegmentSnapshot::from_json(&snapshot.to_json()).expect("parses");
                    prop_assert_eq!(&back, &snapshot);
                    restored.restore(&back);
                    prop_assert_eq!(restored.snapshot(segment), Some(snapshot));
                }
                self.store = restored;
            }
            Action::Crash => {
                let mut restored = SegmentStore::new(self.windows.clone());
                for json in self.saved.values() {
                    restored.restore(&SegmentSnapshot::from_json(json).expect("parses"));
                }
                for json in &self.log {
                    Self::apply_json(&mut restored, json);
                }
                self.store = restored;
            }
            Action::RestartIngest => {
                let mut fresh = Ingest::new(ingest_spec(&self.windows, self.clock));
                for (partition, offset, bytes, wall, outcome) in &self.history {
                    let again = fresh.process(*partition, *offset, bytes, Timestamp(*wall));
                    prop_assert_eq!(again.outcome, *outcome, "a replay decided differently");
                }
                for delta in fresh.take_deltas() {
                    let (counted, _) = Self::apply_json(&mut self.store, &delta.to_json());
                    prop_assert_eq!(counted, 0, "a re-processed message counted again");
                }
                self.ingest = fresh;
            }
        }
        Ok(())
    }

    /// Every segment's every window at `now`, against the oracle.
    fn check(&self, oracle: &Oracle, now: i64) -> Result<(), TestCaseError> {
        let segments = oracle.segments();
        let known: BTreeSet<String> = self.store.board().segments().cloned().collect();
        prop_assert_eq!(&known, &segments, "segment sets differ");
        for name in &segments {
            for (index, spec) in self.windows.windows().iter().enumerate() {
                let expected = oracle.tally(name, spec, now);
                let summary = self
                    .store
                    .board()
                    .summary(name, index, Timestamp(now))
                    .expect("known");
                let (from, to) = (summary.from.millis(), summary.to.millis());
                let step = spec.bucket().millis();
                prop_assert!(from <= now && now < to && to - now <= step);
                prop_assert_eq!(to.rem_euclid(step), 0);
                prop_assert_eq!(to - from, spec.length().millis());
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
                        prop_assert_eq!(summary.tally.nps(), None);
                        prop_assert_eq!(summary.tally.ci95(), None);
                    }
                    Some((nps, ci)) => {
                        let got_nps = summary.tally.nps().expect("has responses");
                        let got_ci = summary.tally.ci95().expect("has responses");
                        prop_assert!((got_nps - nps).abs() < 1e-9, "nps {} vs {}", got_nps, nps);
                        prop_assert!((got_ci - ci).abs() < 1e-9, "ci {} vs {}", got_ci, ci);
                        prop_assert!((-100.0..=100.0).contains(&got_nps));
                    }
                }
            }
        }
        Ok(())
    }

    /// Checks at `now` and, as a dashboard would ask later, on and next to every window's
    /// coming step edges and after every window has drained.
    fn check_from(&self, oracle: &Oracle, now: i64) -> Result<(), TestCaseError> {
        let mut nows = vec![now];
        for window in self.windows.windows() {
            let step = window.bucket().millis();
            for k in 0..3 {
                let edge = next_edge(window, now) + k * step;
                nows.extend([edge - 1, edge, edge + 1]);
            }
            nows.push(now + window.length().millis());
            nows.push(now + window.length().millis() + step);
        }
        for now in nows {
            self.check(oracle, now)?;
        }
        Ok(())
    }
}

/// Checks that a decision carries what its outcome says.
fn check_decision(decision: &Decision, expected: &str, t: i64) -> Result<(), TestCaseError> {
    prop_assert_eq!(decision.outcome, expected);
    let dead_lettered = matches!(expected, "invalid" | "too_old" | "future");
    prop_assert_eq!(decision.dead_letter.is_some(), dead_lettered);
    if expected == "accepted" {
        prop_assert_eq!(decision.event_time, Some(Timestamp(t)));
    } else {
        prop_assert_eq!(decision.event_time, None);
        prop_assert!(decision.alert.is_none());
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    /// Wall clock, several input partitions: the clock moves on its own (onto step edges
    /// too); responses arrive late, early, on the edges of the windows and repeated.
    #[test]
    fn production_path_matches_the_oracle_on_a_wall_clock(
        config in 0..CONFIGS.len(),
        steps in steps(PARTITIONS),
    ) {
        let windows = window_specs(&CONFIGS[config]);
        let mut pipeline = Pipeline::new(&windows, ClockKind::Wall);
        let mut oracle = Oracle::default();
        let mut now = START;
        for step in &steps {
            now = advance_clock(&windows, now, step.advance);
            let (bytes, t) = encode(&windows, step.partition, &step.message, now);
            let expected = oracle.outcome(&windows, step.partition, &step.message, now, t);
            let decision = pipeline.process(step.partition, &bytes, now);
            check_decision(&decision, expected, t)?;
            if let Some(action) = step.end_batch {
                pipeline.end_batch(action)?;
                pipeline.check(&oracle, now)?;
            }
        }
        pipeline.end_batch(Action::Nothing)?;
        pipeline.check_from(&oracle, now)?;
    }

    /// Event-time clock: "now" is the largest event time accepted, as in a replay. One input
    /// partition, so the clock is the same whether ingest keeps it per partition or not.
    #[test]
    fn production_path_matches_the_oracle_on_an_event_time_clock(
        config in 0..CONFIGS.len(),
        steps in steps(1),
    ) {
        let windows = window_specs(&CONFIGS[config]);
        let mut pipeline = Pipeline::new(&windows, ClockKind::EventTime);
        let mut oracle = Oracle::default();
        let mut base = START;
        let mut latest: Option<i64> = None;
        for step in &steps {
            base = advance_clock(&windows, base, step.advance);
            // Responses are placed around the event-time clock, once there is one.
            let (bytes, t) = encode(&windows, 0, &step.message, latest.unwrap_or(base).max(base));
            let now = latest.map_or(t, |l| l.max(t));
            let expected = oracle.outcome(&windows, 0, &step.message, now, t);
            prop_assert!(expected != "future");
            // The wall clock plays no part in the decision.
            let decision = pipeline.process(0, &bytes, 0);
            check_decision(&decision, expected, t)?;
            if expected == "accepted" {
                latest = Some(now);
            }
            if let Some(action) = step.end_batch {
                pipeline.end_batch(action)?;
                if let Some(latest) = latest {
                    pipeline.check(&oracle, latest)?;
                }
            }
        }
        pipeline.end_batch(Action::Nothing)?;
        pipeline.check_from(&oracle, latest.unwrap_or(base))?;
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

/// The worked example from the contract, through the whole production path: 20 promoters,
/// 50 passives and 30 detractors give NPS -10.
#[test]
fn worked_example_through_the_pipeline() {
    let windows = window_specs(&CONFIGS[0]);
    let mut pipeline = Pipeline::new(&windows, ClockKind::Wall);
    let scores = std::iter::repeat_n(9, 20)
        .chain(std::iter::repeat_n(7, 50))
        .chain(std::iter::repeat_n(3, 30));
    for (i, score) in scores.enumerate() {
        let json = serde_json::json!({
            "response_id": format!("r{i}"), "score": score,
            "responded_at": Timestamp(START).to_rfc3339(), "customer_id": "c",
        });
        let bytes = serde_json::to_vec(&json).expect("serialises");
        let decision = pipeline.process(i as i32 % PARTITIONS, &bytes, START);
        assert_eq!(decision.outcome, "accepted");
    }
    pipeline.end_batch(Action::ReplayBatch).expect("replay");
    let summary = pipeline
        .store
        .board()
        .summary(&"all".to_owned(), 0, Timestamp(START))
        .expect("known");
    assert_eq!(summary.tally.responses(), 100);
    assert!((summary.tally.nps().expect("nps") - -10.0).abs() < 1e-9);
    // The hour up to the end of START's minute.
    assert_eq!(summary.to, Timestamp(START + 60_000));
    assert_eq!(summary.from, Timestamp(START + 60_000 - 3_600_000));
}

/// The change against the window before, recomputed naively from the raw responses: for the
/// window's interval `[from, to)` at `now` and the one before it, `[from - length, from)`,
/// the counts, both NPS, `delta`, the contract's two-sample z (`delta / sqrt(var1/n1 +
/// var2/n2)`, `var = p + d - (p - d)^2` per response, on the -1..1 scale like nps.rs: delta in
/// NPS points / 100) and `significant` (|z| > 1.96 with `min_responses` on both sides). Two
/// unanimous windows have no spread: z is 0 if they agree and absent if they do not, and
/// their difference is then significant (as `Change` documents).
struct NaiveChange {
    current: (u64, u64, u64),
    previous: (u64, u64, u64),
    previous_nps: Option<f64>,
    delta: Option<f64>,
    z: Option<f64>,
    significant: bool,
}

fn naive_change(
    responses: &[(i64, u8)],
    from: i64,
    to: i64,
    length: i64,
    min_responses: u64,
) -> NaiveChange {
    let count = |a: i64, b: i64| {
        let mut c = (0u64, 0u64, 0u64);
        for &(_, score) in responses.iter().filter(|(t, _)| a <= *t && *t < b) {
            match score {
                9..=10 => c.0 += 1,
                7..=8 => c.1 += 1,
                _ => c.2 += 1,
            }
        }
        c
    };
    let (current, previous) = (count(from, to), count(from - length, from));
    let n = |c: (u64, u64, u64)| c.0 + c.1 + c.2;
    let nps =
        |c: (u64, u64, u64)| (n(c) > 0).then(|| 100.0 * (c.0 as f64 - c.2 as f64) / n(c) as f64);
    let var = |c: (u64, u64, u64)| {
        let (p, d) = (c.0 as f64 / n(c) as f64, c.2 as f64 / n(c) as f64);
        p + d - (p - d) * (p - d)
    };
    let delta = nps(current).zip(nps(previous)).map(|(a, b)| a - b);
    let z = delta.and_then(|delta| {
        let se = (var(current) / n(current) as f64 + var(previous) / n(previous) as f64).sqrt();
        if se > 0.0 {
            Some(delta / 100.0 / se)
        } else {
            (delta == 0.0).then_some(0.0)
        }
    });
    let enough = n(current) >= min_responses && n(previous) >= min_responses;
    let beyond = match z {
        Some(z) => z.abs() > 1.96,
        None => delta.is_some_and(|d| d != 0.0),
    };
    NaiveChange {
        current,
        previous,
        previous_nps: nps(previous),
        delta,
        z,
        significant: delta.is_some() && enough && beyond,
    }
}

fn close(a: Option<f64>, b: Option<f64>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => (a - b).abs() <= 1e-9 * (1.0 + a.abs().max(b.abs())),
        _ => false,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Every window's change, as the aggregator reports it (deltas through their JSON into
    /// `SegmentStore::apply`, then `Scoreboard::summary`, as the aggregate role does), equals
    /// the naive recomputation at random instants, for responses spread over a few window
    /// lengths (both windows of a comparison often have data, sometimes a unanimous one).
    #[test]
    fn change_against_the_window_before_matches_a_naive_recomputation(
        config in 0..CONFIGS.len(),
        responses in proptest::collection::vec((0u16..=1000, 0u8..=10, 0u8..4), 0..300),
        unanimous in proptest::option::of(0u8..=10),
        nows in proptest::collection::vec(0u16..=1000, 1..6),
        min_responses in 0u64..12,
        chunk in 1usize..50,
        focus in 0usize..4,
    ) {
        let windows = window_specs(&CONFIGS[config]);
        let longest = longest(&windows).length().millis();
        // One window in focus: most responses fall in its last two lengths (its interval and
        // the one before), some over three longest windows, some up to the skew ahead.
        let focused = windows.windows()[focus % windows.windows().len()].length().millis();
        let span = 3 * longest;
        let end = START + span;
        let raw: Vec<(i64, u8)> = responses
            .iter()
            .map(|&(at, score, shape)| {
                let t = match shape {
                    0 => START + fraction(span, at),
                    1 => end - fraction(2 * focused, at),
                    2 => end - focused + fraction(focused / 30, at),
                    _ => end + fraction(windows.max_future_skew().millis(), at) - 1,
                };
                (t, unanimous.unwrap_or(score))
            })
            .collect();
        let mut store = SegmentStore::new(windows.clone());
        for (index, part) in raw.chunks(chunk).enumerate() {
            let items: Vec<String> = part
                .iter()
                .enumerate()
                .map(|(i, (t, score))| format!("[{},{t},{score}]", (index * chunk + i) as i64))
                .collect();
            let json = format!(
                r#"{{"segment":"all","partition":0,"responses":[{}]}}"#,
                items.join(",")
            );
            let delta = SegmentDelta::from_json(json.as_bytes()).expect("a delta parses");
            store.apply(&delta);
        }
        let all = "all".to_owned();
        for &at in &nows {
            // From the end (no response further ahead than the skew, as ingest admits them)
            // to two focused windows past it.
            let now = end + fraction(2 * focused, at);
            for (index, window) in windows.windows().iter().enumerate() {
                let (from, to) = window.interval(Timestamp(now));
                let length = window.length().millis();
                let naive = naive_change(&raw, from.millis(), to.millis(), length, min_responses);
                let Some(summary) = store.board().summary(&all, index, Timestamp(now)) else {
                    prop_assert!(raw.is_empty(), "no summary of a segment with responses");
                    continue;
                };
                let label = format!("{} at {now}: [{}, {})", window.name(), from.millis(), to.millis());
                prop_assert_eq!((summary.from, summary.to), (from, to), "{}", label);
                let t = |c: &Tally| (c.promoters, c.passives, c.detractors);
                prop_assert_eq!(t(&summary.tally), naive.current, "{}: counts", label);
                prop_assert_eq!(t(&summary.previous), naive.previous, "{}: previous counts", label);
                let change = summary.change;
                prop_assert!(close(change.previous_nps, naive.previous_nps), "{}: previous_nps {:?} vs {:?}", label, change.previous_nps, naive.previous_nps);
                prop_assert!(close(change.delta, naive.delta), "{}: delta {:?} vs {:?}", label, change.delta, naive.delta);
                prop_assert!(close(change.z, naive.z), "{}: z {:?} vs {:?}", label, change.z, naive.z);
                prop_assert_eq!(
                    change.responses,
                    (naive.current.0 + naive.current.1 + naive.current.2, naive.previous.0 + naive.previous.1 + naive.previous.2),
                    "{}: responses", label
                );
                // Away from the threshold's rounding edge, significance must agree exactly.
                if naive.z.is_none_or(|z| (z.abs() - 1.96).abs() > 1e-9) {
                    prop_assert_eq!(change.significant(min_responses), naive.significant, "{}: significant (z {:?})", label, naive.z);
                }
            }
        }
    }
}
