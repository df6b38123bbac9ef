//! Everything npsflow reports, one struct per thing that happens (in the style of Vector's
//! internal events). `emit` writes the log line and the metric together, so a call site is one
//! line, names stay consistent, and every warning is also counted in
//! `npsflow_warnings_total{event}` (the event names are [`WARNINGS`]). Label values come from
//! the core's enums or from configuration; never from message contents. Log lines never carry
//! personal data (comments, customer ids): only codes, topics, partitions and offsets.

use npsflow_core::{Outcome, Severity};
use tracing::{debug, error, info, warn};

use super::Metrics;

/// The name of every warning event, the label values of `npsflow_warnings_total`.
pub const WARNINGS: [&str; 10] = [
    DeliveryRetried::NAME,
    RevokedUnsettled::NAME,
    RecordRejected::NAME,
    TransactionRetried::NAME,
    ConsumeFailed::NAME,
    KafkaClientFailed::NAME,
    RebalanceFailed::NAME,
    UnreadableRecord::NAME,
    ClosedWithoutCommit::NAME,
    RoleFailed::NAME,
];

/// An error's text for a log line, without rdkafka's Rust names (see [`crate::readable`]).
fn said(error: &dyn std::fmt::Display) -> String {
    crate::readable::text(&error.to_string())
}

/// Warnings that can come once per record or per poll while the broker is away (a delivery
/// retried, a consume error) are rate limited like the Kafka clients' own lines
/// ([`crate::repeats`]): the first of a kind is logged, identical ones within the window only
/// counted (in `npsflow_warnings_total`, always), and the next one logged says how many were
/// not. `None`: do not log this one; `Some(note)`: log it, with `note` ("" or "repeated ...").
fn limited(key: &str) -> Option<String> {
    use std::sync::{LazyLock, Mutex};
    static REPEATS: LazyLock<Mutex<crate::repeats::Repeats>> = LazyLock::new(Mutex::default);
    let mut repeats = REPEATS.lock().unwrap_or_else(|e| e.into_inner());
    let now = std::time::Instant::now();
    // Forget keys quiet for a whole window, so the map stays small.
    let _ = repeats.due(now);
    match repeats.check(key, now) {
        crate::repeats::Verdict::Suppress => None,
        crate::repeats::Verdict::Log { repeated: 0, .. } => Some(String::new()),
        crate::repeats::Verdict::Log { repeated, over } => {
            Some(crate::repeats::describe(repeated, over))
        }
    }
}

fn warned(metrics: &Metrics, event: &str) {
    metrics.warnings.with_label_values(&[event]).inc();
}

/// A response message got its outcome (`Outcome::LABELS`).
pub struct ResponseDecided {
    /// The outcome's label.
    pub outcome: &'static str,
}

impl ResponseDecided {
    /// Counts it.
    pub fn emit(&self, metrics: &Metrics) {
        if let Some(i) = Outcome::LABELS.iter().position(|o| *o == self.outcome) {
            metrics.outcomes[i].inc();
        }
    }
}

/// An invitation message got its one outcome.
pub struct InvitationDecided {
    /// The outcome's label.
    pub outcome: &'static str,
}

impl InvitationDecided {
    /// Counts it.
    pub fn emit(&self, metrics: &Metrics) {
        if let Some(i) = Outcome::LABELS.iter().position(|o| *o == self.outcome) {
            metrics.invitations[i].inc();
        }
    }
}

/// A message went to the dead-letter topic.
pub struct DeadLettered {
    /// The reason code.
    pub reason: &'static str,
}

impl DeadLettered {
    /// Counts it.
    pub fn emit(&self, metrics: &Metrics) {
        metrics.dead_letters.with_label_values(&[self.reason]).inc();
    }
}

/// A forwarded copy of an input message that was decided already (a replay of the
/// repartition step) was recognised and had no effect.
pub struct ResentRecognised;

impl ResentRecognised {
    /// Counts it.
    pub fn emit(&self, metrics: &Metrics) {
        metrics.resent.inc();
    }
}

/// A detractor alert was emitted, routed to `owner` by `route`.
pub struct AlertEmitted<'a> {
    /// Its severity.
    pub severity: Severity,
    /// The owner from the routing table, or `account_manager` for the response's own.
    pub owner: &'a str,
    /// The routing rule.
    pub route: &'static str,
}

impl AlertEmitted<'_> {
    /// Counts it.
    pub fn emit(&self, metrics: &Metrics) {
        if let Some(i) = Severity::ALL.iter().position(|s| *s == self.severity) {
            metrics.alerts[i].inc();
        }
        metrics
            .alerts_by_owner
            .with_label_values(&[self.owner, self.route])
            .inc();
    }
}

/// A response was accepted `seconds` after it was given (`responded_at`).
pub struct EventTimeLag {
    /// Wall clock minus event time, in seconds (at least 0).
    pub seconds: f64,
}

impl EventTimeLag {
    /// Observes it.
    pub fn emit(&self, metrics: &Metrics) {
        metrics.event_time_lag.observe(self.seconds.max(0.0));
    }
}

/// Segment values past the per-dimension cap were counted as `__other__`.
pub struct SegmentValuesOverflowed {
    /// How many values.
    pub count: u64,
}

impl SegmentValuesOverflowed {
    /// Counts them.
    pub fn emit(&self, metrics: &Metrics) {
        metrics.overflowed.inc_by(self.count);
    }
}

/// Response ids were forgotten before the dedupe horizon because memory was full.
pub struct DedupeEvictedEarly {
    /// How many ids.
    pub count: u64,
}

impl DedupeEvictedEarly {
    /// Counts them.
    pub fn emit(&self, metrics: &Metrics) {
        metrics.dedupe_evicted.inc_by(self.count);
    }
}

/// A segment delta was applied: `counted` responses were new, `skipped` had been applied.
pub struct DeltaApplied {
    /// Responses counted.
    pub counted: u64,
    /// Responses skipped as already applied (replays).
    pub skipped: u64,
}

impl DeltaApplied {
    /// Counts them.
    pub fn emit(&self, metrics: &Metrics) {
        metrics.delta_applied.inc_by(self.counted);
        metrics.delta_skipped.inc_by(self.skipped);
    }
}

/// The aggregate role owns `count` segments.
pub struct SegmentsOwned {
    /// How many.
    pub count: usize,
}

impl SegmentsOwned {
    /// Sets the gauge.
    pub fn emit(&self, metrics: &Metrics) {
        metrics.segments_owned.set(self.count as f64);
    }
}

/// A delivery failed for a reason that passes (broker down, timeout); it is retried.
pub struct DeliveryRetried<'a> {
    /// The record's topic.
    pub topic: &'a str,
    /// The error.
    pub error: &'a dyn std::fmt::Display,
}

impl DeliveryRetried<'_> {
    /// Its name in `npsflow_warnings_total`.
    pub const NAME: &'static str = "delivery_retried";

    /// Logs and counts it.
    pub fn emit(&self, metrics: &Metrics) {
        let error = said(self.error);
        if let Some(repeats) = limited(&format!("delivery|{}|{error}", self.topic)) {
            warn!(topic = %self.topic, %error, repeats, "delivery failed; retrying");
        }
        metrics
            .produce_errors
            .with_label_values(&[self.topic, "transient"])
            .inc();
        warned(metrics, Self::NAME);
    }
}

/// Partitions were revoked while records this process wrote for them were still not
/// delivered after [`crate::kafka::REVOKE_WAIT`]: their next owner may not see them when it
/// reads back its state (at worst an escalation notice is sent again; its `escalation_id`
/// lets consumers drop it).
pub struct RevokedUnsettled {
    /// The role.
    pub role: &'static str,
    /// Partitions revoked.
    pub partitions: usize,
    /// Records still not delivered.
    pub records: usize,
}

impl RevokedUnsettled {
    /// Its name in `npsflow_warnings_total`.
    pub const NAME: &'static str = "revoked_unsettled";

    /// Logs and counts it.
    pub fn emit(&self, metrics: &Metrics) {
        warn!(
            role = self.role,
            partitions = self.partitions,
            records = self.records,
            "partitions revoked before this process's records for them were delivered"
        );
        warned(metrics, Self::NAME);
    }
}

/// The broker or producer rejected a record for good.
pub struct RecordRejected<'a> {
    /// The record's topic.
    pub topic: &'a str,
    /// The error.
    pub error: &'a dyn std::fmt::Display,
    /// Whether its fallback (a dead letter without the value) is sent instead; if not, the
    /// role stops.
    pub fallback: bool,
}

impl RecordRejected<'_> {
    /// Its name in `npsflow_warnings_total`.
    pub const NAME: &'static str = "record_rejected";

    /// Logs and counts it.
    pub fn emit(&self, metrics: &Metrics) {
        if self.fallback {
            warn!(topic = %self.topic, error = %said(self.error), "record rejected for good; sending its fallback");
            metrics.dead_letters_without_value.inc();
        } else {
            warn!(topic = %self.topic, error = %said(self.error), "record rejected for good");
        }
        metrics
            .produce_errors
            .with_label_values(&[self.topic, "permanent"])
            .inc();
        warned(metrics, Self::NAME);
    }
}

/// A dead letter was too large to write whole and is written without its value.
pub struct RecordShrunk<'a> {
    /// The record's topic.
    pub topic: &'a str,
    /// Its size in bytes.
    pub size: usize,
}

impl RecordShrunk<'_> {
    /// Logs and counts it.
    pub fn emit(&self, metrics: &Metrics) {
        info!(topic = %self.topic, size = self.size, "record too large; sending its fallback");
        metrics.dead_letters_without_value.inc();
    }
}

/// A transaction failed and is aborted and retried.
pub struct TransactionRetried<'a> {
    /// The error.
    pub error: &'a dyn std::fmt::Display,
}

impl TransactionRetried<'_> {
    /// Its name in `npsflow_warnings_total`.
    pub const NAME: &'static str = "transaction_retried";

    /// Logs and counts it.
    pub fn emit(&self, metrics: &Metrics) {
        warn!(error = %said(self.error), "transaction failed; aborting and retrying the batch");
        metrics
            .produce_errors
            .with_label_values(&["transaction", "transient"])
            .inc();
        warned(metrics, Self::NAME);
    }
}

/// The consumer returned an error instead of a message.
pub struct ConsumeFailed<'a> {
    /// The role.
    pub role: &'static str,
    /// The error.
    pub error: &'a dyn std::fmt::Display,
}

impl ConsumeFailed<'_> {
    /// Its name in `npsflow_warnings_total`.
    pub const NAME: &'static str = "consume_failed";

    /// Logs and counts it.
    pub fn emit(&self, metrics: &Metrics) {
        let error = said(self.error);
        if let Some(repeats) = limited(&format!("consume|{}|{error}", self.role)) {
            warn!(role = self.role, %error, repeats, "consume error");
        }
        warned(metrics, Self::NAME);
    }
}

/// A Kafka client reported an error (librdkafka's error callback).
pub struct KafkaClientFailed<'a> {
    /// The client (role, or role-producer).
    pub client: &'a str,
    /// The error.
    pub error: &'a dyn std::fmt::Display,
    /// librdkafka's reason text.
    pub reason: &'a str,
}

impl KafkaClientFailed<'_> {
    /// Its name in `npsflow_warnings_total`.
    pub const NAME: &'static str = "kafka_client_error";

    /// Logs and counts it.
    pub fn emit(&self, metrics: &Metrics) {
        warn!(client = self.client, error = %said(self.error), reason = self.reason, "kafka client error");
        warned(metrics, Self::NAME);
    }

    /// Counts it, and logs it if `verdict` says so (identical errors within a window are
    /// only counted; the next one logged says how many there were).
    pub fn emit_limited(&self, metrics: &Metrics, verdict: crate::repeats::Verdict) {
        use crate::repeats::Verdict;
        warned(metrics, Self::NAME);
        match verdict {
            Verdict::Suppress => {}
            Verdict::Log { repeated: 0, .. } => {
                warn!(client = self.client, error = %said(self.error), reason = self.reason, "kafka client error");
            }
            Verdict::Log { repeated, over } => {
                let repeats = crate::repeats::describe(repeated, over);
                warn!(client = self.client, error = %said(self.error), reason = self.reason, repeats, "kafka client error");
            }
        }
    }
}

/// Identical Kafka client errors or librdkafka log lines were suppressed, and their window
/// passed without another: how many there were. Not counted again (each was counted when it
/// came).
pub struct KafkaClientRepeated<'a> {
    /// The client.
    pub client: &'a str,
    /// `kafka client error` or `librdkafka`.
    pub kind: &'a str,
    /// The error or the line.
    pub said: &'a str,
    /// How many were suppressed.
    pub repeated: u64,
    /// Since the last one logged.
    pub over: std::time::Duration,
}

impl KafkaClientRepeated<'_> {
    /// Logs it.
    pub fn emit(&self, _metrics: &Metrics) {
        let repeats = crate::repeats::describe(self.repeated, self.over);
        warn!(
            client = self.client,
            said = self.said,
            repeats,
            "{}: the same again",
            self.kind
        );
    }
}

/// Whether a client reaches a broker.
pub struct BrokerConnectivity<'a> {
    /// The client.
    pub client: &'a str,
    /// Up or not.
    pub up: bool,
}

impl BrokerConnectivity<'_> {
    /// Sets the gauge.
    pub fn emit(&self, metrics: &Metrics) {
        metrics
            .connected
            .with_label_values(&[self.client])
            .set(i64::from(self.up));
    }
}

/// A partition's lag, from the consumer's statistics.
pub struct LagObserved<'a> {
    /// The group.
    pub group: &'a str,
    /// The topic.
    pub topic: &'a str,
    /// The partition.
    pub partition: i32,
    /// Messages between the committed offset and the end.
    pub lag: i64,
}

impl LagObserved<'_> {
    /// Sets the gauge.
    pub fn emit(&self, metrics: &Metrics) {
        metrics
            .consumer_lag
            .with_label_values(&[self.group, self.topic, &self.partition.to_string()])
            .set(self.lag);
    }
}

/// A consumer's assignment changed.
pub struct Rebalanced<'a> {
    /// The role.
    pub role: &'static str,
    /// Its group.
    pub group: &'a str,
    /// `assign` or `revoke`.
    pub event: &'static str,
    /// The partitions assigned or revoked.
    pub partitions: &'a [(String, i32)],
}

impl Rebalanced<'_> {
    /// Logs and counts it.
    pub fn emit(&self, metrics: &Metrics) {
        let list: Vec<String> = self
            .partitions
            .iter()
            .map(|(topic, partition)| format!("{topic}/{partition}"))
            .collect();
        info!(
            role = self.role,
            event = self.event,
            partitions = self.partitions.len(),
            which = %list.join(","),
            "rebalance"
        );
        metrics
            .rebalances
            .with_label_values(&[self.group, self.event])
            .inc();
    }
}

/// A rebalance failed (librdkafka retries it).
pub struct RebalanceFailed<'a> {
    /// The role.
    pub role: &'static str,
    /// The error.
    pub error: &'a dyn std::fmt::Display,
}

impl RebalanceFailed<'_> {
    /// Its name in `npsflow_warnings_total`.
    pub const NAME: &'static str = "rebalance_failed";

    /// Logs and counts it.
    pub fn emit(&self, metrics: &Metrics) {
        warn!(role = self.role, error = %said(self.error), "rebalance error");
        warned(metrics, Self::NAME);
    }
}

/// State for newly assigned partitions was read back.
pub struct Restored {
    /// The role.
    pub role: &'static str,
    /// How many partitions.
    pub partitions: usize,
    /// How many records were read.
    pub records: usize,
    /// How long it took.
    pub seconds: f64,
}

impl Restored {
    /// Logs and observes it.
    pub fn emit(&self, metrics: &Metrics) {
        info!(
            role = self.role,
            partitions = self.partitions,
            records = self.records,
            millis = (self.seconds * 1000.0) as u64,
            "restored"
        );
        metrics
            .restore_seconds
            .with_label_values(&[self.role])
            .observe(self.seconds);
    }
}

/// A record on an internal topic could not be read and was skipped.
pub struct UnreadableRecord<'a> {
    /// The topic.
    pub topic: &'a str,
    /// The partition.
    pub partition: i32,
    /// The offset.
    pub offset: i64,
    /// Why.
    pub error: &'a dyn std::fmt::Display,
}

impl UnreadableRecord<'_> {
    /// Its name in `npsflow_warnings_total`.
    pub const NAME: &'static str = "unreadable_record";

    /// Logs and counts it.
    pub fn emit(&self, metrics: &Metrics) {
        warn!(topic = %self.topic, partition = self.partition, offset = self.offset, error = %said(self.error), "unreadable record skipped");
        metrics
            .unreadable_records
            .with_label_values(&[self.topic])
            .inc();
        warned(metrics, Self::NAME);
    }
}

/// A batch reached its commit point.
pub struct BatchCommitted {
    /// The role.
    pub role: &'static str,
    /// Seconds from its first message to its commit point.
    pub seconds: f64,
}

impl BatchCommitted {
    /// Observes it.
    pub fn emit(&self, metrics: &Metrics) {
        metrics
            .batch_seconds
            .with_label_values(&[self.role])
            .observe(self.seconds);
    }
}

/// A role's stalled partitions, from its progress watch.
pub struct PartitionsStalled {
    /// The role.
    pub role: &'static str,
    /// How many.
    pub count: usize,
}

impl PartitionsStalled {
    /// Sets the gauge.
    pub fn emit(&self, metrics: &Metrics) {
        metrics
            .stalled_partitions
            .with_label_values(&[self.role])
            .set(self.count as i64);
    }
}

/// A role's consumer was closed without its final commit (the broker was unreachable); the
/// next owner replays from the last commit.
pub struct ClosedWithoutCommit {
    /// The role.
    pub role: &'static str,
}

impl ClosedWithoutCommit {
    /// Its name in `npsflow_warnings_total`.
    pub const NAME: &'static str = "closed_without_commit";

    /// Logs and counts it.
    pub fn emit(&self, metrics: &Metrics) {
        warn!(
            role = self.role,
            "broker unreachable: closing without a final commit"
        );
        warned(metrics, Self::NAME);
    }
}

/// A stopping role gave up waiting for the delivery of its batch in flight (the broker was
/// unreachable or too slow); its offsets are not stored, so the next owner replays it.
pub struct ShutdownUndelivered {
    /// The role.
    pub role: &'static str,
}

impl ShutdownUndelivered {
    /// Its name in `npsflow_warnings_total`.
    pub const NAME: &'static str = "shutdown_undelivered";

    /// Logs and counts it.
    pub fn emit(&self, metrics: &Metrics) {
        warn!(
            role = self.role,
            "stopping without the batch in flight delivered; it will be processed again"
        );
        warned(metrics, Self::NAME);
    }
}

/// A role's consumer was closed after its final commit.
pub struct Closed {
    /// The role.
    pub role: &'static str,
}

impl Closed {
    /// Logs it.
    pub fn emit(&self, _metrics: &Metrics) {
        info!(role = self.role, "consumer closed");
    }
}

/// A role stopped with an error; the process exits.
pub struct RoleFailed<'a> {
    /// The role.
    pub role: &'static str,
    /// The error.
    pub error: &'a dyn std::fmt::Display,
}

impl RoleFailed<'_> {
    /// Its name in `npsflow_warnings_total`.
    pub const NAME: &'static str = "role_failed";

    /// Logs and counts it, and sets `npsflow_role_up{role}` to 0.
    pub fn emit(&self, metrics: &Metrics) {
        error!(role = self.role, error = %said(self.error), "role stopped with an error; the process exits");
        metrics.role_up.with_label_values(&[self.role]).set(0);
        warned(metrics, Self::NAME);
    }
}

/// A partition's transactional producer was fenced: another process has been assigned the
/// partition and initialised its transactional id since (this process stalled past its
/// session timeout). Nothing this process writes for it is committed; the role stops.
pub struct PartitionFenced<'a> {
    /// The role.
    pub role: &'static str,
    /// The input topic.
    pub topic: &'a str,
    /// The input partition.
    pub partition: i32,
    /// The error.
    pub error: &'a dyn std::fmt::Display,
}

impl PartitionFenced<'_> {
    /// Logs it (the role's failure that follows is counted).
    pub fn emit(&self, _metrics: &Metrics) {
        error!(
            role = self.role,
            topic = self.topic,
            partition = self.partition,
            error = %said(self.error),
            "transactional producer fenced: another process owns the partition now"
        );
    }
}

/// A role started.
pub struct RoleStarted<'a> {
    /// The role.
    pub role: &'static str,
    /// The topics it reads.
    pub topics: &'a [String],
    /// Its group.
    pub group: &'a str,
}

impl RoleStarted<'_> {
    /// Logs it.
    pub fn emit(&self, _metrics: &Metrics) {
        info!(role = self.role, topics = ?self.topics, group = self.group, "role started");
    }
}

/// A role is stopping: it finishes the batch in flight, commits and leaves its group.
pub struct RoleStopping {
    /// The role.
    pub role: &'static str,
}

impl RoleStopping {
    /// Logs it.
    pub fn emit(&self, _metrics: &Metrics) {
        info!(role = self.role, "stopping: committing offsets");
    }
}

/// A final commit failed (the next owner replays from the previous one).
pub struct FinalCommitSkipped<'a> {
    /// The role.
    pub role: &'static str,
    /// The error.
    pub error: &'a dyn std::fmt::Display,
}

impl FinalCommitSkipped<'_> {
    /// Logs it.
    pub fn emit(&self, _metrics: &Metrics) {
        debug!(role = self.role, error = %said(self.error), "final commit skipped");
    }
}

/// What the followup role did with an alert, outcome event or notice.
pub struct FollowupInput {
    /// `alert`, `outcome`, `response` or `notice`.
    pub kind: &'static str,
    /// `applied`, `forwarded`, `duplicate`, `kept`, `expired` or `invalid`.
    pub result: &'static str,
    /// How many.
    pub count: u64,
}

impl FollowupInput {
    /// Counts it.
    pub fn emit(&self, metrics: &Metrics) {
        metrics
            .cases
            .inputs
            .with_label_values(&[self.kind, self.result])
            .inc_by(self.count);
    }
}

/// A follow-up case opened.
pub struct CaseOpened;

impl CaseOpened {
    /// Counts it.
    pub fn emit(&self, metrics: &Metrics) {
        metrics.cases.opened.inc();
    }
}

/// A case was first contacted.
pub struct CaseFirstContact {
    /// Seconds since the response.
    pub seconds: f64,
    /// By the first-contact deadline.
    pub within_sla: bool,
}

impl CaseFirstContact {
    /// Counts and observes it.
    pub fn emit(&self, metrics: &Metrics) {
        let within = if self.within_sla { "true" } else { "false" };
        metrics
            .cases
            .first_contacts
            .with_label_values(&[within])
            .inc();
        metrics.cases.time_to_first_contact.observe(self.seconds);
    }
}

/// A case closed.
pub struct CaseClosed {
    /// How it was resolved (`none` if no resolution was given).
    pub resolution: &'static str,
    /// Resolved by its resolve deadline.
    pub within_sla: bool,
    /// Seconds since the response.
    pub seconds: f64,
}

impl CaseClosed {
    /// Counts and observes it.
    pub fn emit(&self, metrics: &Metrics) {
        let within = if self.within_sla { "true" } else { "false" };
        metrics
            .cases
            .closed
            .with_label_values(&[self.resolution, within])
            .inc();
        metrics.cases.time_to_close.observe(self.seconds);
    }
}

/// A case escalated.
pub struct CaseEscalated<'a> {
    /// The case (an alert id: a hash, not personal data).
    pub case_id: &'a str,
    /// 1 or 2.
    pub level: u8,
    /// Why.
    pub reason: &'static str,
}

impl CaseEscalated<'_> {
    /// Logs and counts it.
    pub fn emit(&self, metrics: &Metrics) {
        info!(
            case_id = self.case_id,
            level = self.level,
            reason = self.reason,
            "case escalated"
        );
        let level = if self.level >= 2 { "2" } else { "1" };
        metrics.cases.escalations.with_label_values(&[level]).inc();
    }
}

/// A closed case's recovery was decided.
pub struct RecoveryDecided {
    /// `recovered`, `not_recovered` or `no_response`.
    pub result: &'static str,
}

impl RecoveryDecided {
    /// Counts it.
    pub fn emit(&self, metrics: &Metrics) {
        metrics
            .cases
            .recovered
            .with_label_values(&[self.result])
            .inc();
    }
}
