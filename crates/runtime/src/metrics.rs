//! Prometheus metrics: one registry per process with every counter, gauge and histogram the
//! contract names, and a collector that turns the aggregate role's segment windows into
//! `npsflow_segment_*` gauges at scrape time (so windows drain as the clock moves, and a
//! segment with no responses has no NPS gauge at all).
//!
//! The fields are private: everything that happens is an [`events`] struct whose `emit`
//! writes the log line and the metric together, so names stay consistent and every warning
//! is counted. Label values are bounded: outcomes, reasons, severities and routes are the
//! core's fixed sets, topics and owners come from configuration, segments are capped by it.
//! The per-message counters are resolved to their label values once, at start.

pub mod events;

use std::sync::{Arc, RwLock};

use npsflow_core::response::InvalidReason;
use npsflow_core::{Category, Outcome, Severity};
use prometheus::core::Collector;
use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::health::Health;
use crate::view::AggregateView;

static BUILD_REVISION: std::sync::OnceLock<&'static str> = std::sync::OnceLock::new();

/// Sets the git revision `npsflow_build_info` reports (the binary captures it at build time;
/// set once, before the first [`Metrics::new`]). Without it the label is `unknown`.
pub fn set_build_revision(revision: &'static str) {
    let _ = BUILD_REVISION.set(revision);
}

/// The git revision `npsflow_build_info` reports.
pub fn build_revision() -> &'static str {
    BUILD_REVISION.get().copied().unwrap_or("unknown")
}

/// The follow-up cases a process owns, by partition of the followup role's internal topic:
/// written by the role, summarised into the case gauges at every scrape.
pub type CaseBooks = Arc<RwLock<std::collections::BTreeMap<i32, npsflow_core::CaseBook>>>;

/// Every metric of one process. Cheap to clone (the metrics are shared).
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// `npsflow_events_total{outcome}`, one counter per [`Outcome::LABELS`] entry.
    outcomes: Arc<[IntCounter; Outcome::LABELS.len()]>,
    /// `npsflow_invitations_total{outcome}`, one counter per [`Outcome::LABELS`] entry.
    invitations: Arc<[IntCounter; Outcome::LABELS.len()]>,
    /// `npsflow_dead_letters_total{reason}`.
    dead_letters: IntCounterVec,
    /// `npsflow_alerts_total{kind,severity}`, one counter per severity.
    alerts: Arc<[IntCounter; Severity::ALL.len()]>,
    /// `npsflow_alerts_by_owner_total{owner,route}`.
    alerts_by_owner: IntCounterVec,
    event_time_lag: Histogram,
    overflowed: IntCounter,
    dedupe_evicted: IntCounter,
    /// `npsflow_delta_responses_total{result}`: applied, skipped.
    delta_applied: IntCounter,
    delta_skipped: IntCounter,
    consumer_lag: IntGaugeVec,
    rebalances: IntCounterVec,
    connected: IntGaugeVec,
    batch_seconds: HistogramVec,
    restore_seconds: HistogramVec,
    produce_errors: IntCounterVec,
    dead_letters_without_value: IntCounter,
    resent: IntCounter,
    stalled_partitions: IntGaugeVec,
    role_up: IntGaugeVec,
    /// `npsflow_role_ready{role}`: set from [`Health`] at every scrape ([`Metrics::exposition_with`]).
    role_ready: IntGaugeVec,
    segments_owned: Gauge,
    unreadable_records: IntCounterVec,
    warnings: IntCounterVec,
    /// The aggregate role's segments, rendered at every scrape, when the role runs here.
    segments: Arc<std::sync::OnceLock<Arc<RwLock<AggregateView>>>>,
    /// The followup role's cases, summarised at every scrape, when the role runs here.
    books: Arc<std::sync::OnceLock<CaseBooks>>,
    /// The followup role's metrics.
    cases: Arc<CaseMetrics>,
}

/// The followup role's metrics (the contract's "Closing the loop" list, and more).
struct CaseMetrics {
    /// `npsflow_cases_open{state,escalation_level}`: cases this process owns, not closed.
    open: IntGaugeVec,
    opened: IntCounter,
    /// `npsflow_cases_closed_total{resolution,within_sla}`.
    closed: IntCounterVec,
    /// `npsflow_case_escalations_total{level}`.
    escalations: IntCounterVec,
    /// `npsflow_case_first_contacts_total{within_sla}`.
    first_contacts: IntCounterVec,
    time_to_first_contact: Histogram,
    time_to_close: Histogram,
    /// `npsflow_case_oldest_open_age_seconds{state}`, set at scrape.
    oldest_open_age: GaugeVec,
    /// `npsflow_detractors_recovered_total{result}`.
    recovered: IntCounterVec,
    /// `npsflow_followup_inputs_total{kind,result}`: alerts, outcomes and notices.
    inputs: IntCounterVec,
}

fn register<C: Collector + Clone + 'static>(registry: &Registry, metric: C) -> C {
    registry
        .register(Box::new(metric.clone()))
        .expect("each metric is registered once");
    metric
}

fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    register(registry, IntCounter::new(name, help).expect("valid metric"))
}

fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    register(
        registry,
        IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"),
    )
}

fn gauge_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    register(
        registry,
        IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric"),
    )
}

fn histogram_vec(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: &[f64],
) -> HistogramVec {
    register(
        registry,
        HistogramVec::new(
            HistogramOpts::new(name, help).buckets(buckets.to_vec()),
            labels,
        )
        .expect("valid metric"),
    )
}

impl Metrics {
    /// A registry with every metric, label sets that are known in advance pre-filled with 0.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let build = GaugeVec::new(
            Opts::new(
                "npsflow_build_info",
                "Build information (version, git revision, librdkafka version); always 1.",
            ),
            &["version", "revision", "librdkafka"],
        )
        .expect("valid metric");
        let (_, librdkafka) = rdkafka::util::get_rdkafka_version();
        build
            .with_label_values(&[env!("CARGO_PKG_VERSION"), build_revision(), &librdkafka])
            .set(1.0);
        register(&registry, build);
        // process_cpu_seconds_total, process_resident_memory_bytes, process_open_fds, ...
        // (Linux only; elsewhere the collector reports nothing).
        registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("the process collector is registered once");

        let events = counter_vec(
            &registry,
            "npsflow_events_total",
            "Survey-response messages by outcome.",
            &["outcome"],
        );
        let outcomes = Arc::new(Outcome::LABELS.map(|o| events.with_label_values(&[o])));
        let invitation_events = counter_vec(
            &registry,
            "npsflow_invitations_total",
            "Survey-invitation messages (survey.invitations) by outcome.",
            &["outcome"],
        );
        let invitations =
            Arc::new(Outcome::LABELS.map(|o| invitation_events.with_label_values(&[o])));
        let dead_letters = counter_vec(
            &registry,
            "npsflow_dead_letters_total",
            "Messages sent to the dead-letter topic, by reason.",
            &["reason"],
        );
        for reason in InvalidReason::CODES.iter().chain(&["too_old", "future"]) {
            dead_letters.with_label_values(&[reason]);
        }
        let alerts_vec = counter_vec(
            &registry,
            "npsflow_alerts_total",
            "Alerts emitted, by kind and severity.",
            &["kind", "severity"],
        );
        let alerts = Arc::new(
            Severity::ALL.map(|s| alerts_vec.with_label_values(&["detractor", s.as_str()])),
        );
        let alerts_by_owner = counter_vec(
            &registry,
            "npsflow_alerts_by_owner_total",
            "Detractor alerts by owner (from the routing table) and routing rule.",
            &["owner", "route"],
        );
        let event_time_lag = register(
            &registry,
            Histogram::with_opts(
                HistogramOpts::new(
                    "npsflow_event_time_lag_seconds",
                    "Wall clock minus responded_at when a response is accepted.",
                )
                .buckets(vec![
                    0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 21600.0, 86400.0, 604800.0,
                ]),
            )
            .expect("valid metric"),
        );
        let overflowed = counter(
            &registry,
            "npsflow_segment_values_overflowed_total",
            "Segment values past the per-dimension cap, counted as __other__.",
        );
        let dedupe_evicted = counter(
            &registry,
            "npsflow_dedupe_evicted_early_total",
            "Response ids forgotten before the dedupe horizon because memory was full.",
        );
        let delta_responses = counter_vec(
            &registry,
            "npsflow_delta_responses_total",
            "Responses in segment deltas: applied, or skipped as already applied.",
            &["result"],
        );
        let consumer_lag = gauge_vec(
            &registry,
            "npsflow_consumer_lag_messages",
            "Messages between the committed offset and the end of each assigned partition.",
            &["group", "topic", "partition"],
        );
        let rebalances = counter_vec(
            &registry,
            "npsflow_rebalances_total",
            "Partition assignment changes, by consumer group and event.",
            &["group", "event"],
        );
        let connected = gauge_vec(
            &registry,
            "npsflow_kafka_connected",
            "1 when the client has at least one broker connection up.",
            &["client"],
        );
        let batch_seconds = histogram_vec(
            &registry,
            "npsflow_batch_seconds",
            "Time from a batch's first message to its commit point, by role.",
            &["role"],
            &[0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0],
        );
        let restore_seconds = histogram_vec(
            &registry,
            "npsflow_restore_seconds",
            "Time to read back a role's state for newly assigned partitions, by role.",
            &["role"],
            &[0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 180.0],
        );
        let produce_errors = counter_vec(
            &registry,
            "npsflow_produce_errors_total",
            "Failed deliveries by topic and kind: transient ones are retried until they succeed, permanent ones are replaced by their fallback or stop the role.",
            &["topic", "kind"],
        );
        let dead_letters_without_value = counter(
            &registry,
            "npsflow_dead_letters_without_value_total",
            "Dead letters written without the message's bytes (too large to write whole).",
        );
        let resent = counter(
            &registry,
            "npsflow_resent_messages_total",
            "Input messages forwarded twice by a replay of the repartition step; the copy has no effect.",
        );
        let stalled_partitions = gauge_vec(
            &registry,
            "npsflow_stalled_partitions",
            "Assigned partitions with messages waiting whose position has not moved for longer than health.stall_timeout.",
            &["role"],
        );
        let role_up = gauge_vec(
            &registry,
            "npsflow_role_up",
            "1 while a role runs; 0 once it has stopped with an error (the process then exits).",
            &["role"],
        );
        let role_ready = gauge_vec(
            &registry,
            "npsflow_role_ready",
            "1 when the role is ready (consumer and producer reach a broker, joined its group, state restored), as /readyz says; 0 otherwise.",
            &["role"],
        );
        let segments_owned = register(
            &registry,
            Gauge::new(
                "npsflow_segments",
                "Segments whose windows this process owns.",
            )
            .expect("valid metric"),
        );
        let unreadable_records = counter_vec(
            &registry,
            "npsflow_unreadable_records_total",
            "Records on an internal topic (deltas, state) that npsflow could not read and skipped, by topic.",
            &["topic"],
        );
        let warnings = counter_vec(
            &registry,
            "npsflow_warnings_total",
            "Warnings logged, by event.",
            &["event"],
        );
        for event in events::WARNINGS {
            warnings.with_label_values(&[event]);
        }
        let cases = Arc::new(CaseMetrics::new(&registry));
        Metrics {
            cases,
            books: Arc::default(),
            registry,
            outcomes,
            invitations,
            dead_letters,
            alerts,
            alerts_by_owner,
            event_time_lag,
            overflowed,
            dedupe_evicted,
            delta_applied: delta_responses.with_label_values(&["applied"]),
            delta_skipped: delta_responses.with_label_values(&["skipped"]),
            consumer_lag,
            rebalances,
            connected,
            batch_seconds,
            restore_seconds,
            produce_errors,
            dead_letters_without_value,
            resent,
            stalled_partitions,
            role_up,
            role_ready,
            segments_owned,
            unreadable_records,
            warnings,
            segments: Arc::default(),
        }
    }

    /// Pre-fills the label sets of a process running `roles` that write to `topics`, so that
    /// every series exists (at 0) from the first scrape.
    pub fn prepare(&self, roles: &[&str], topics: &[&str]) {
        for topic in topics {
            for kind in ["transient", "permanent"] {
                self.produce_errors.with_label_values(&[topic, kind]);
            }
        }
        for role in roles {
            self.stalled_partitions.with_label_values(&[role]);
            self.role_up.with_label_values(&[role]).set(1);
            self.role_ready.with_label_values(&[role]);
            self.batch_seconds.with_label_values(&[role]);
        }
    }

    /// How many response messages had `outcome` (one of [`Outcome::LABELS`]) so far.
    pub fn outcome_count(&self, outcome: &str) -> u64 {
        Outcome::LABELS
            .iter()
            .position(|o| *o == outcome)
            .map_or(0, |i| self.outcomes[i].get())
    }

    /// How many detractor alerts were emitted so far.
    pub fn alert_count(&self) -> u64 {
        self.alerts.iter().map(IntCounter::get).sum()
    }

    /// How many responses the aggregate role has applied so far (not counting replays).
    pub fn applied_responses(&self) -> u64 {
        self.delta_applied.get()
    }

    /// How many warnings of `event` (one of [`events::WARNINGS`]) were counted so far.
    pub fn warning_count(&self, event: &str) -> u64 {
        self.warnings.with_label_values(&[event]).get()
    }

    /// How many follow-up cases this process opened so far.
    pub fn cases_opened(&self) -> u64 {
        self.cases.opened.get()
    }

    /// How many alerts, outcome events or notices (`kind`) had `result` in the followup role.
    pub fn followup_input_count(&self, kind: &str, result: &str) -> u64 {
        self.cases.inputs.with_label_values(&[kind, result]).get()
    }

    /// How many recoveries were decided with `result` so far.
    pub fn recovery_count(&self, result: &str) -> u64 {
        self.cases.recovered.with_label_values(&[result]).get()
    }

    /// How many deliveries to `topic` failed with `kind` (`transient` or `permanent`).
    pub fn produce_error_count(&self, topic: &str, kind: &str) -> u64 {
        self.produce_errors.with_label_values(&[topic, kind]).get()
    }

    /// Adds the segment gauges, read from the aggregate role's state at every scrape.
    pub fn register_segments(&self, view: Arc<RwLock<AggregateView>>) {
        let _ = self.segments.set(view);
    }

    /// Adds the open-case gauges, summarised from the followup role's cases at every scrape
    /// (not per batch: that would walk every case each time).
    pub fn register_cases(&self, books: CaseBooks) {
        let _ = self.books.set(books);
    }

    /// The Prometheus text exposition of every metric, as one text.
    pub fn render(&self) -> String {
        self.exposition().collect()
    }

    /// [`Metrics::exposition`], with `npsflow_role_ready` set from `health` at this moment
    /// (what `/readyz` would answer per role).
    pub fn exposition_with(
        &self,
        health: &Health,
    ) -> impl Iterator<Item = String> + Send + 'static {
        for (role, state) in health.snapshot() {
            self.role_ready
                .with_label_values(&[role])
                .set(i64::from(state.ready()));
        }
        self.exposition()
    }

    /// The Prometheus text exposition of every metric, in pieces to be sent one after another:
    /// the registry's metrics first, then the segment gauges ([`SegmentSeries`]), written only
    /// as each piece is asked for.
    pub fn exposition(&self) -> impl Iterator<Item = String> + Send + 'static {
        if let Some(books) = self.books.get() {
            let books = books.read().unwrap_or_else(|e| e.into_inner());
            self.cases.summarise(&books, crate::wall_now());
        }
        let mut buffer = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buffer)
            .expect("text encoding cannot fail");
        let registry = String::from_utf8(buffer).expect("text exposition is UTF-8");
        let segments = self.segments.get().map(|view| {
            let view = view.read().unwrap_or_else(|e| e.into_inner());
            SegmentSeries::of(&view, crate::wall_now())
        });
        std::iter::once(registry).chain(segments.into_iter().flat_map(SegmentSeries::pieces))
    }
}

/// Histogram buckets for follow-up times: 5 minutes to 60 days.
const CASE_SECONDS: [f64; 12] = [
    300.0,
    1800.0,
    3600.0,
    4.0 * 3600.0,
    12.0 * 3600.0,
    86400.0,
    2.0 * 86400.0,
    3.0 * 86400.0,
    7.0 * 86400.0,
    14.0 * 86400.0,
    30.0 * 86400.0,
    60.0 * 86400.0,
];

impl CaseMetrics {
    fn new(registry: &Registry) -> CaseMetrics {
        use npsflow_core::case::{CaseState, Resolution};
        let open = gauge_vec(
            registry,
            "npsflow_cases_open",
            "Follow-up cases this process owns that are not closed, by state and escalation level.",
            &["state", "escalation_level"],
        );
        for state in CaseState::ALL.iter().filter(|s| **s != CaseState::Closed) {
            for level in ["0", "1", "2"] {
                open.with_label_values(&[state.as_str(), level]);
            }
        }
        let closed = counter_vec(
            registry,
            "npsflow_cases_closed_total",
            "Follow-up cases closed, by resolution and whether they were resolved by the resolve deadline.",
            &["resolution", "within_sla"],
        );
        for resolution in Resolution::ALL.iter().map(|r| r.as_str()).chain(["none"]) {
            for within in ["true", "false"] {
                closed.with_label_values(&[resolution, within]);
            }
        }
        let escalations = counter_vec(
            registry,
            "npsflow_case_escalations_total",
            "Follow-up cases escalated, by level (each case and level once).",
            &["level"],
        );
        for level in ["1", "2"] {
            escalations.with_label_values(&[level]);
        }
        let histogram = |name: &str, help: &str| {
            register(
                registry,
                Histogram::with_opts(HistogramOpts::new(name, help).buckets(CASE_SECONDS.to_vec()))
                    .expect("valid metric"),
            )
        };
        let oldest_open_age = register(
            registry,
            GaugeVec::new(
                Opts::new(
                    "npsflow_case_oldest_open_age_seconds",
                    "Age (since the response) of the oldest case this process owns in each open state; 0 when there is none.",
                ),
                &["state"],
            )
            .expect("valid metric"),
        );
        for state in CaseState::ALL.iter().filter(|s| **s != CaseState::Closed) {
            oldest_open_age.with_label_values(&[state.as_str()]);
        }
        let recovered = counter_vec(
            registry,
            "npsflow_detractors_recovered_total",
            "Closed cases whose recovery was decided: the customer's next response was a passive or promoter (recovered), a detractor (not_recovered), or none came within the horizon (no_response).",
            &["result"],
        );
        for result in ["recovered", "not_recovered", "no_response"] {
            recovered.with_label_values(&[result]);
        }
        let inputs = counter_vec(
            registry,
            "npsflow_followup_inputs_total",
            "What the followup role did with each alert, outcome event and notice: applied, duplicate, kept (outcome before its case), expired (kept past the horizon), invalid.",
            &["kind", "result"],
        );
        let first_contacts = counter_vec(
            registry,
            "npsflow_case_first_contacts_total",
            "Follow-up cases first contacted (or moved past contacted), by whether it was by the first-contact deadline.",
            &["within_sla"],
        );
        for within in ["true", "false"] {
            first_contacts.with_label_values(&[within]);
        }
        CaseMetrics {
            open,
            first_contacts,
            opened: counter(
                registry,
                "npsflow_cases_opened_total",
                "Follow-up cases opened (one per detractor alert).",
            ),
            closed,
            escalations,
            time_to_first_contact: histogram(
                "npsflow_case_time_to_first_contact_seconds",
                "From the response to the first contact with the customer.",
            ),
            time_to_close: histogram(
                "npsflow_case_time_to_close_seconds",
                "From the response to the case's closing.",
            ),
            oldest_open_age,
            recovered,
            inputs,
        }
    }

    /// Sets the open-case gauges from the cases owned now: count per open state and
    /// escalation level, and the age of the oldest case per open state (0: none).
    fn summarise(
        &self,
        books: &std::collections::BTreeMap<i32, npsflow_core::CaseBook>,
        now: npsflow_core::Timestamp,
    ) {
        use npsflow_core::case::CaseState;
        let states = CaseState::ALL.len();
        let mut open = vec![[0_i64; 3]; states];
        let mut oldest: Vec<Option<npsflow_core::Timestamp>> = vec![None; states];
        for case in books.values().flat_map(npsflow_core::CaseBook::cases) {
            if case.state == CaseState::Closed {
                continue;
            }
            let Some(index) = CaseState::ALL.iter().position(|s| *s == case.state) else {
                continue;
            };
            open[index][usize::from(case.escalation_level.min(2))] += 1;
            let at = case.alert.responded_at;
            oldest[index] = Some(oldest[index].map_or(at, |t| t.min(at)));
        }
        for (index, state) in CaseState::ALL.iter().enumerate() {
            if *state == CaseState::Closed {
                continue;
            }
            for (level, count) in open[index].iter().enumerate() {
                let level = level.to_string();
                self.open
                    .with_label_values(&[state.as_str(), level.as_str()])
                    .set(*count);
            }
            let age =
                oldest[index].map_or(0.0, |t| (now.millis() - t.millis()).max(0) as f64 / 1000.0);
            self.oldest_open_age
                .with_label_values(&[state.as_str()])
                .set(age);
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

const NPS: &str = "npsflow_segment_nps";
const CI95: &str = "npsflow_segment_nps_ci95";
const RESPONSES: &str = "npsflow_segment_responses";
const ZSCORE: &str = "npsflow_segment_nps_change_zscore";
const INVITATIONS: &str = "npsflow_segment_invitations";
const RESPONSE_RATE: &str = "npsflow_segment_response_rate";

/// The segment gauge families, with their help texts.
const SEGMENT_FAMILIES: [(&str, &str); 6] = [
    (NPS, "NPS of a segment in a rolling window, -100..100."),
    (
        CI95,
        "Half-width of the 95% confidence interval of the segment NPS, in NPS points.",
    ),
    (
        RESPONSES,
        "Responses of a segment in a rolling window, by category.",
    ),
    (
        ZSCORE,
        "Two-sample z of the window's NPS against the window just before it (same length); absent with fewer than analytics.min_responses responses on either side, or no spread.",
    ),
    (
        INVITATIONS,
        "Survey invitations sent in a segment's rolling window (survey.invitations).",
    ),
    (
        RESPONSE_RATE,
        "Responses per invitation sent in a segment's rolling window; absent with no invitations.",
    ),
];

/// The segment gauges (`npsflow_segment_nps`, `_ci95`, `_responses`, `_nps_change_zscore`,
/// `_invitations`, `_response_rate`) of every owned segment and window at one scrape:
/// computed at scrape time (so windows drain as the clock moves, and a segment with no
/// responses has no NPS series), without a gauge vector per scrape. Only the numbers the
/// series need are taken from the view while its lock is held (about 60 bytes per segment and
/// window); the text (~25 MB with 10,000 segments x 4 windows) is written in pieces of
/// [`SegmentSeries::ROWS_PER_PIECE`] rows as the response is sent, never all at once.
struct SegmentSeries {
    /// The segment names, escaped for the text format, one after another.
    names: String,
    /// The window names, escaped, by window index.
    windows: Vec<String>,
    /// By segment, then window order.
    rows: Vec<SeriesRow>,
}

/// One segment in one window.
struct SeriesRow {
    /// Its name in [`SegmentSeries::names`].
    name: std::ops::Range<usize>,
    window: usize,
    tally: npsflow_core::Tally,
    /// The change's z, when both sides have `analytics.min_responses`.
    z: Option<f64>,
}

impl SegmentSeries {
    /// Rows per piece of text (each row writes 8 lines, ~80 bytes each).
    const ROWS_PER_PIECE: usize = 512;

    fn of(view: &AggregateView, wall: npsflow_core::Timestamp) -> SegmentSeries {
        let windows = view
            .windows()
            .windows()
            .iter()
            .map(|w| escape(w.name()).into_owned())
            .collect();
        let mut series = SegmentSeries {
            names: String::new(),
            windows,
            rows: Vec::new(),
        };
        let mut last: Option<(&str, std::ops::Range<usize>)> = None;
        view.each_summary(wall, |segment, window, summary| {
            let name = match &last {
                Some((previous, range)) if *previous == segment => range.clone(),
                _ => {
                    let start = series.names.len();
                    series.names.push_str(&escape(segment));
                    start..series.names.len()
                }
            };
            last = Some((segment, name.clone()));
            let (now, before) = summary.change.responses;
            let enough = now.min(before) >= view.min_responses();
            series.rows.push(SeriesRow {
                name,
                window,
                tally: summary.tally,
                z: summary.change.z.filter(|_| enough),
            });
        });
        series
    }

    /// The text, one piece per family and [`Self::ROWS_PER_PIECE`] rows.
    fn pieces(self) -> impl Iterator<Item = String> + Send + 'static {
        let series = Arc::new(self);
        let per_family = series.rows.len().div_ceil(Self::ROWS_PER_PIECE).max(1);
        (0..SEGMENT_FAMILIES.len()).flat_map(move |family| {
            let series = Arc::clone(&series);
            (0..per_family).map(move |piece| series.piece(family, piece))
        })
    }

    /// Piece `piece` of family `family`: its header first if it is the family's first.
    fn piece(&self, family: usize, piece: usize) -> String {
        use std::fmt::Write;
        let (name, help) = SEGMENT_FAMILIES[family];
        let start = piece * Self::ROWS_PER_PIECE;
        let rows = &self.rows
            [start.min(self.rows.len())..(start + Self::ROWS_PER_PIECE).min(self.rows.len())];
        let mut out = String::with_capacity(
            rows.iter()
                .map(|row| 80 + row.name.len() + self.windows[row.window].len())
                .sum::<usize>()
                * if name == RESPONSES { 3 } else { 1 },
        );
        if piece == 0 {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        }
        for row in rows {
            let (segment, window) = (&self.names[row.name.clone()], &self.windows[row.window]);
            let tally = &row.tally;
            let value = match name {
                NPS => tally.nps(),
                CI95 => tally.ci95(),
                ZSCORE => row.z,
                INVITATIONS => Some(tally.invitations as f64),
                RESPONSE_RATE => tally.response_rate(),
                _ => {
                    for category in Category::ALL {
                        let _ = writeln!(
                            out,
                            "{name}{{category=\"{}\",segment=\"{segment}\",window=\"{window}\"}} {}",
                            category.as_str(),
                            Sample(tally.get(category) as f64)
                        );
                    }
                    None
                }
            };
            if let Some(value) = value {
                let _ = writeln!(
                    out,
                    "{name}{{segment=\"{segment}\",window=\"{window}\"}} {}",
                    Sample(value)
                );
            }
        }
        out
    }
}

/// A label value escaped for the text format: backslash, double quote and line feed.
fn escape(value: &str) -> std::borrow::Cow<'_, str> {
    if value.contains(['\\', '"', '\n']) {
        std::borrow::Cow::Owned(
            value
                .replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n"),
        )
    } else {
        std::borrow::Cow::Borrowed(value)
    }
}

/// A sample value as the text format writes it.
struct Sample(f64);

impl std::fmt::Display for Sample {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            v if v.is_nan() => f.write_str("NaN"),
            v if v == f64::INFINITY => f.write_str("+Inf"),
            v if v == f64::NEG_INFINITY => f.write_str("-Inf"),
            v => write!(f, "{v}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_info_names_the_revision_and_librdkafka_and_process_metrics_are_served() {
        let text = Metrics::new().render();
        let (_, librdkafka) = rdkafka::util::get_rdkafka_version();
        let line = text
            .lines()
            .find(|l| l.starts_with("npsflow_build_info{"))
            .expect("build info");
        assert!(
            line.contains(&format!("librdkafka=\"{librdkafka}\"")),
            "{line}"
        );
        assert!(
            line.contains(&format!("revision=\"{}\"", build_revision())),
            "{line}"
        );
        assert!(line.contains("version=\""), "{line}");
        if cfg!(target_os = "linux") {
            for name in ["process_cpu_seconds_total", "process_resident_memory_bytes"] {
                assert!(text.contains(&format!("\n{name} ")), "{name}");
            }
        }
    }

    #[test]
    fn label_values_and_samples_are_written_as_the_text_format_wants() {
        assert_eq!(escape("region=east"), "region=east");
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        assert_eq!(Sample(-50.0).to_string(), "-50");
        assert_eq!(Sample(3.5).to_string(), "3.5");
        assert_eq!(Sample(f64::INFINITY).to_string(), "+Inf");
        assert_eq!(Sample(f64::NEG_INFINITY).to_string(), "-Inf");
        assert_eq!(Sample(f64::NAN).to_string(), "NaN");
    }

    /// With more rows than one piece holds, the segment gauges still come as whole families
    /// (one header each, all of a family's series together), one series per segment and
    /// window, with the view's numbers and escaped names.
    #[test]
    fn segment_gauges_are_written_in_pieces_each_family_whole() {
        use npsflow_core::{SegmentDelta, Span, WindowSpecs};
        let windows = WindowSpecs::new(&["1h", "24h"], 60, Span::minutes(5)).expect("windows");
        let mut view = AggregateView::new(windows, crate::config::ClockKind::Wall, 1);
        view.restore(0, &[]);
        let at = crate::wall_now().millis() - 60_000;
        // 700 segments x 2 windows: three pieces per family.
        let mut names: Vec<String> = (0..699).map(|i| format!("region=r{i:03}")).collect();
        names.push("region=a\"b".to_owned());
        for (i, segment) in names.iter().enumerate() {
            let delta = SegmentDelta {
                segment: segment.clone(),
                partition: 0,
                responses: vec![(i as i64, at, (i % 11) as u8)],
                invitations: vec![],
            };
            view.apply(0, &delta).expect("owned");
        }
        let metrics = Metrics::new();
        metrics.register_segments(Arc::new(RwLock::new(view)));
        let pieces: Vec<String> = metrics.exposition().collect();
        assert_eq!(
            pieces.len(),
            1 + 6 * 3,
            "the registry, then 3 pieces per family"
        );
        let text = pieces.concat();

        let mut families: Vec<&str> = Vec::new();
        for line in text.lines().filter(|l| l.starts_with("npsflow_segment_")) {
            let family = line.split('{').next().expect("a name");
            if families.last() != Some(&family) {
                families.push(family);
            }
        }
        let mut unique = families.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), families.len(), "a family split: {families:?}");
        for (family, _) in SEGMENT_FAMILIES {
            let header = format!("# TYPE {family} gauge\n");
            assert_eq!(text.matches(&header).count(), 1, "{family}");
        }
        let series = |family: &str| {
            text.lines()
                .filter(|l| l.split('{').next() == Some(family))
                .count()
        };
        assert_eq!(series(NPS), 1400);
        assert_eq!(series(RESPONSES), 1400 * 3);
        assert_eq!(series(INVITATIONS), 1400);
        assert_eq!(series(RESPONSE_RATE), 0, "no invitations, no rate");
        // r009 answered 9, r006 answered 6; the last one's name is escaped.
        assert!(text.contains("npsflow_segment_nps{segment=\"region=r009\",window=\"24h\"} 100\n"));
        assert!(text.contains("npsflow_segment_nps{segment=\"region=r006\",window=\"1h\"} -100\n"));
        assert!(text.contains(
            "npsflow_segment_responses{category=\"detractor\",segment=\"region=a\\\"b\",window=\"1h\"} 1\n"
        ));
    }

    /// The open-case gauges come from the cases owned at scrape time: counts by state and
    /// escalation level, and the age of the oldest open case.
    #[test]
    fn open_case_gauges_are_summarised_at_scrape_time() {
        use npsflow_core::{decode_alert, CaseBook, FollowupPolicy, Timestamp};
        const HOUR: i64 = 3_600_000;
        let now = crate::wall_now();
        let alert = |id: &str, score: u8, hours_ago: i64| {
            let at = Timestamp(now.millis() - hours_ago * HOUR).to_rfc3339();
            let json = format!(
                r#"{{"alert_id":"{id}","kind":"detractor","response_id":"r-{id}","customer_id":"c","owner":"ann","route":"default","score":{score},"severity":"medium","segments":{{}},"responded_at":"{at}","emitted_at":"{at}"}}"#
            );
            decode_alert(json.as_bytes()).expect("an alert")
        };
        let metrics = Metrics::new();
        let books = CaseBooks::default();
        metrics.register_cases(books.clone());
        let gauge = |text: &str, series: &str| -> f64 {
            text.lines()
                .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
                .unwrap_or_else(|| panic!("{series} missing"))
        };
        let open0 = r#"npsflow_cases_open{escalation_level="0",state="open"}"#;
        let open1 = r#"npsflow_cases_open{escalation_level="1",state="open"}"#;
        let oldest = r#"npsflow_case_oldest_open_age_seconds{state="open"}"#;
        assert_eq!(gauge(&metrics.render(), open0), 0.0);
        {
            let policy = FollowupPolicy::default();
            let mut books = books.write().expect("not poisoned");
            let book = books.entry(0).or_insert_with(CaseBook::default);
            let mut out = Vec::new();
            book.open(alert("a", 5, 1), &policy, now, &mut out);
            book.open(alert("b", 6, 5), &policy, now, &mut out);
            // Score 2 escalates to level 1 at once (its timer is due now).
            let book = books.entry(1).or_insert_with(CaseBook::default);
            book.open(alert("c", 2, 2), &policy, now, &mut out);
            book.handle_timeout(now, &policy, &mut out);
        }
        let text = metrics.render();
        assert_eq!(gauge(&text, open0), 2.0);
        assert_eq!(gauge(&text, open1), 1.0);
        let age = gauge(&text, oldest);
        assert!((5.0 * 3600.0..5.0 * 3600.0 + 60.0).contains(&age), "{age}");
        books.write().expect("not poisoned").remove(&0);
        let text = metrics.render();
        assert_eq!(gauge(&text, open0), 0.0);
        assert_eq!(gauge(&text, open1), 1.0);
    }
}
