//! Prometheus metrics: one registry per process with every counter, gauge and histogram the
//! contract names, and a collector that turns the aggregate role's segment windows into
//! `npsflow_segment_*` gauges at scrape time (so windows drain as the clock moves, and a
//! segment with no responses has no NPS gauge at all). Label values are bounded: outcomes,
//! reasons, severities and routes are fixed sets; segments are capped by configuration.

use std::sync::{Arc, RwLock};

use npsflow_core::response::InvalidReason;
use npsflow_core::{Category, Outcome, Severity};
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

use crate::aggregate::AggregateView;

/// Every metric of one process.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// `npsflow_events_total{outcome}`.
    pub events: IntCounterVec,
    /// `npsflow_dead_letters_total{reason}`.
    pub dead_letters: IntCounterVec,
    /// `npsflow_alerts_total{kind,severity}`.
    pub alerts: IntCounterVec,
    /// `npsflow_alerts_by_owner_total{owner,route}`: owners from the routing table (bounded
    /// by configuration); alerts routed by the response's own `account_manager` count under
    /// `owner="account_manager"`, so customer-supplied names never become label values.
    pub alerts_by_owner: IntCounterVec,
    /// `npsflow_event_time_lag_seconds`: wall clock minus `responded_at` at ingest.
    pub event_time_lag: Histogram,
    /// `npsflow_segment_values_overflowed_total`.
    pub overflowed: IntCounter,
    /// `npsflow_dedupe_evicted_early_total`.
    pub dedupe_evicted: IntCounter,
    /// `npsflow_deltas_responses_total{result}`: applied or skipped (replays).
    pub delta_responses: IntCounterVec,
    /// `npsflow_consumer_lag_messages{group,topic,partition}`.
    pub consumer_lag: IntGaugeVec,
    /// `npsflow_rebalances_total{group,event}`.
    pub rebalances: IntCounterVec,
    /// `npsflow_kafka_connected{client}`: 1 when a broker is reachable.
    pub connected: IntGaugeVec,
    /// `npsflow_batch_seconds{role}`: time from a batch's first message to its commit point.
    pub batch_seconds: prometheus::HistogramVec,
    /// `npsflow_produce_errors_total{topic,kind}`: `transient` (retried) or `permanent`.
    pub produce_errors: IntCounterVec,
    /// `npsflow_dead_letters_without_value_total`: dead letters written without the
    /// message's bytes because they could not be written whole.
    pub dead_letters_without_value: IntCounter,
    /// `npsflow_resent_messages_total`: input messages forwarded again by a replay of the
    /// repartition step and recognised as the same message (no outcome of their own).
    pub resent: IntCounter,
    /// `npsflow_stalled_partitions{role}`: assigned partitions with messages waiting whose
    /// position has not moved for longer than `health.stall_timeout`.
    pub stalled_partitions: IntGaugeVec,
    /// `npsflow_role_up{role}`: 1 while the role runs, 0 once it has stopped with an error.
    pub role_up: IntGaugeVec,
    /// `npsflow_segments{}`: segments owned by this process.
    pub segments_owned: Gauge,
}

fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let metric = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    registry
        .register(Box::new(metric.clone()))
        .expect("registered once");
    metric
}

impl Metrics {
    /// A registry with every metric, label sets that are known in advance pre-filled with 0.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let build = GaugeVec::new(
            Opts::new("npsflow_build_info", "Build information; always 1."),
            &["version"],
        )
        .expect("valid metric");
        build
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1.0);
        registry.register(Box::new(build)).expect("registered once");

        let events = counter_vec(
            &registry,
            "npsflow_events_total",
            "Survey-response messages by outcome.",
            &["outcome"],
        );
        for outcome in Outcome::LABELS {
            events.with_label_values(&[outcome]);
        }
        let dead_letters = counter_vec(
            &registry,
            "npsflow_dead_letters_total",
            "Messages sent to the dead-letter topic, by reason.",
            &["reason"],
        );
        for reason in InvalidReason::CODES.iter().chain(&["too_old", "future"]) {
            dead_letters.with_label_values(&[reason]);
        }
        let alerts = counter_vec(
            &registry,
            "npsflow_alerts_total",
            "Alerts emitted, by kind and severity.",
            &["kind", "severity"],
        );
        for severity in Severity::ALL {
            alerts.with_label_values(&["detractor", severity.as_str()]);
        }
        let alerts_by_owner = counter_vec(
            &registry,
            "npsflow_alerts_by_owner_total",
            "Detractor alerts by owner (from the routing table) and routing rule.",
            &["owner", "route"],
        );
        let event_time_lag = Histogram::with_opts(
            HistogramOpts::new(
                "npsflow_event_time_lag_seconds",
                "Wall clock minus responded_at when a response is accepted.",
            )
            .buckets(vec![
                0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 21600.0, 86400.0, 604800.0,
            ]),
        )
        .expect("valid metric");
        registry
            .register(Box::new(event_time_lag.clone()))
            .expect("registered once");
        let overflowed = IntCounter::new(
            "npsflow_segment_values_overflowed_total",
            "Segment values past the per-dimension cap, counted as __other__.",
        )
        .expect("valid metric");
        registry
            .register(Box::new(overflowed.clone()))
            .expect("registered once");
        let dedupe_evicted = IntCounter::new(
            "npsflow_dedupe_evicted_early_total",
            "Response ids forgotten before the dedupe horizon because memory was full.",
        )
        .expect("valid metric");
        registry
            .register(Box::new(dedupe_evicted.clone()))
            .expect("registered once");
        let delta_responses = counter_vec(
            &registry,
            "npsflow_delta_responses_total",
            "Responses in segment deltas: applied, or skipped as already applied.",
            &["result"],
        );
        for result in ["applied", "skipped"] {
            delta_responses.with_label_values(&[result]);
        }
        let consumer_lag = IntGaugeVec::new(
            Opts::new(
                "npsflow_consumer_lag_messages",
                "Messages between the committed offset and the end of each assigned partition.",
            ),
            &["group", "topic", "partition"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(consumer_lag.clone()))
            .expect("registered once");
        let rebalances = counter_vec(
            &registry,
            "npsflow_rebalances_total",
            "Partition assignment changes, by consumer group and event.",
            &["group", "event"],
        );
        let connected = IntGaugeVec::new(
            Opts::new(
                "npsflow_kafka_connected",
                "1 when the client has at least one broker connection up.",
            ),
            &["client"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(connected.clone()))
            .expect("registered once");
        let batch_seconds = prometheus::HistogramVec::new(
            HistogramOpts::new(
                "npsflow_batch_seconds",
                "Time from a batch's first message to its commit point, by role.",
            )
            .buckets(vec![0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0]),
            &["role"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(batch_seconds.clone()))
            .expect("registered once");
        let produce_errors = counter_vec(
            &registry,
            "npsflow_produce_errors_total",
            "Failed deliveries by topic and kind: transient ones are retried until they succeed, permanent ones are replaced by their fallback or stop the role.",
            &["topic", "kind"],
        );
        let dead_letters_without_value = IntCounter::new(
            "npsflow_dead_letters_without_value_total",
            "Dead letters written without the message's bytes (too large to write whole).",
        )
        .expect("valid metric");
        registry
            .register(Box::new(dead_letters_without_value.clone()))
            .expect("registered once");
        let resent = IntCounter::new(
            "npsflow_resent_messages_total",
            "Input messages forwarded twice by a replay of the repartition step; the copy has no effect.",
        )
        .expect("valid metric");
        registry
            .register(Box::new(resent.clone()))
            .expect("registered once");
        let stalled_partitions = IntGaugeVec::new(
            Opts::new(
                "npsflow_stalled_partitions",
                "Assigned partitions with messages waiting whose position has not moved for longer than health.stall_timeout.",
            ),
            &["role"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(stalled_partitions.clone()))
            .expect("registered once");
        let role_up = IntGaugeVec::new(
            Opts::new(
                "npsflow_role_up",
                "1 while a role runs; 0 once it has stopped with an error (the process then exits).",
            ),
            &["role"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(role_up.clone()))
            .expect("registered once");
        let segments_owned = Gauge::new(
            "npsflow_segments",
            "Segments whose windows this process owns.",
        )
        .expect("valid metric");
        registry
            .register(Box::new(segments_owned.clone()))
            .expect("registered once");
        Metrics {
            registry,
            events,
            dead_letters,
            alerts,
            alerts_by_owner,
            event_time_lag,
            overflowed,
            dedupe_evicted,
            delta_responses,
            consumer_lag,
            rebalances,
            connected,
            batch_seconds,
            produce_errors,
            dead_letters_without_value,
            resent,
            stalled_partitions,
            role_up,
            segments_owned,
        }
    }

    /// Counts a failed delivery to `topic`: `kind` is `transient` or `permanent`.
    pub fn produce_error(&self, topic: &str, kind: &str) {
        self.produce_errors.with_label_values(&[topic, kind]).inc();
    }

    /// Adds the segment gauges, read from the aggregate role's state at every scrape.
    pub fn register_segments(&self, view: Arc<RwLock<AggregateView>>) {
        self.registry
            .register(Box::new(SegmentCollector::new(view)))
            .expect("registered once");
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buffer)
            .expect("text encoding cannot fail");
        String::from_utf8(buffer).expect("text exposition is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// Builds `npsflow_segment_nps`, `_ci95` and `_responses` from the segment windows.
struct SegmentCollector {
    view: Arc<RwLock<AggregateView>>,
    descs: Vec<Desc>,
}

const NPS: &str = "npsflow_segment_nps";
const CI95: &str = "npsflow_segment_nps_ci95";
const RESPONSES: &str = "npsflow_segment_responses";

impl SegmentCollector {
    fn new(view: Arc<RwLock<AggregateView>>) -> SegmentCollector {
        let desc = |name: &str, help: &str, labels: &[&str]| {
            Desc::new(
                name.into(),
                help.into(),
                labels.iter().map(|l| l.to_string()).collect(),
                Default::default(),
            )
            .expect("valid desc")
        };
        SegmentCollector {
            view,
            descs: vec![
                desc(
                    NPS,
                    "NPS of a segment in a rolling window, -100..100.",
                    &["segment", "window"],
                ),
                desc(
                    CI95,
                    "Half-width of the 95% confidence interval of the segment NPS, in NPS points.",
                    &["segment", "window"],
                ),
                desc(
                    RESPONSES,
                    "Responses of a segment in a rolling window, by category.",
                    &["segment", "window", "category"],
                ),
            ],
        }
    }
}

impl Collector for SegmentCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let nps = GaugeVec::new(Opts::new(NPS, &self.descs[0].help), &["segment", "window"])
            .expect("valid metric");
        let ci95 = GaugeVec::new(Opts::new(CI95, &self.descs[1].help), &["segment", "window"])
            .expect("valid metric");
        let responses = GaugeVec::new(
            Opts::new(RESPONSES, &self.descs[2].help),
            &["segment", "window", "category"],
        )
        .expect("valid metric");
        let view = self.view.read().unwrap_or_else(|e| e.into_inner());
        for row in view.rows(crate::aggregate::wall_now()) {
            let labels = [row.segment.as_str(), row.window.as_str()];
            for category in Category::ALL {
                responses
                    .with_label_values(&[labels[0], labels[1], category.as_str()])
                    .set(row.summary.tally.get(category) as f64);
            }
            if let (Some(value), Some(margin)) = (row.summary.nps, row.summary.ci95) {
                nps.with_label_values(&labels).set(value);
                ci95.with_label_values(&labels).set(margin);
            }
        }
        let mut families = nps.collect();
        families.extend(ci95.collect());
        families.extend(responses.collect());
        families
    }
}
