//! npsflow-core: everything npsflow knows about NPS, as pure functions and plain data.
//!
//! No I/O, no async runtime, no Kafka and no clock: time is always passed in as a
//! [`Timestamp`]. The services in `npsflow-runtime` are a thin shell around this crate.
//!
//! - [`nps`]: scores, categories, tallies, NPS, margin of error, band.
//! - [`time`]: timestamps and spans.
//! - [`response`]: decoding and validating a survey-response message.
//! - [`segment`]: which segments a response counts in; canonical names; the value cap.
//! - [`window`]: rolling windows over [from, to) intervals, with per-window resolution;
//!   too-old and future rules.
//! - [`dedupe`]: duplicate detection by `response_id`.
//! - [`intake`]: one outcome per message.
//! - [`alert`]: detractor alerts, routing, severity.
//! - [`ingest`]: the ingest stage: decisions and per-batch segment deltas.
//! - [`delta`]: segment deltas and the aggregator's exactly-once apply.
//! - [`scoreboard`]: windows for many segments, and their summaries.
//! - [`account`]: per-account NPS over one window, sparse; deltas and snapshots.
//! - [`case`]: closed-loop follow-up cases: outcome events, SLAs, escalations, recovery.

pub mod account;
pub mod alert;
pub mod case;
pub mod dedupe;
pub mod delta;
pub mod ingest;
pub mod intake;
pub mod nps;
pub mod response;
pub mod scoreboard;
pub mod segment;
pub mod time;
pub mod window;

pub use account::{AccountBook, AccountDelta, AccountSnapshot, AccountSummary};
pub use alert::{alert_id, DetractorAlert, Route, Routing, SegmentRoute, Severity};
pub use case::{
    decode_alert, decode_outcome, CaseAlert, CaseBook, CaseState, Effect, EscalationNotice,
    FollowupCase, FollowupNotice, FollowupPolicy, InvalidOutcome, OutcomeEvent, OutcomeType,
    RecoveryResult, Resolution,
};
pub use dedupe::DuplicateFilter;
pub use delta::{Applied, SegmentDelta, SegmentSnapshot, SegmentStore};
pub use ingest::{ClockKind, Decision, Ingest, IngestSpec, Source};
pub use intake::{classify, repartition_key, source_tag, Clock, Outcome};
pub use nps::{Band, Category, Change, Score, Tally};
pub use response::{decode, decode_invitation, InvalidReason, Invitation, SurveyResponse};
pub use scoreboard::{Scoreboard, WindowSummary};
pub use segment::{SegmentCatalog, SegmentId, SegmentSpec};
pub use time::{Span, Timestamp};
pub use window::{Admission, SegmentWindows, WindowCounts, WindowSpec, WindowSpecs};
