//! The fate of one incoming message: decoded, checked against the clock and against the ids
//! seen before, and given exactly one [`Outcome`].
//!
//! Checks run in a fixed order: decoding (`invalid`), then the duplicate filter
//! (`duplicate`: an accepted response with the same id came before), then the clock
//! (`too_old`, `future`). Only accepted responses are remembered by the duplicate filter,
//! so a response that was too far in the future may be accepted when sent again later.

use crate::dedupe::DuplicateFilter;
use crate::response::{decode, InvalidReason, SurveyResponse};
use crate::time::Timestamp;
use crate::window::{Admission, WindowSpecs};

/// What happens to one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome<'a> {
    /// A valid, new, timely response: it counts.
    Accepted(SurveyResponse<'a>),
    /// Not a valid response; dead-lettered with the reason.
    Invalid(InvalidReason),
    /// A response with this id was accepted before; dropped.
    Duplicate,
    /// Older than the longest window; dead-lettered.
    TooOld,
    /// Further ahead of the clock than the allowed skew; dead-lettered.
    Future,
}

impl Outcome<'_> {
    /// The `outcome` label of `npsflow_events_total`.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Accepted(_) => "accepted",
            Outcome::Invalid(_) => "invalid",
            Outcome::Duplicate => "duplicate",
            Outcome::TooOld => "too_old",
            Outcome::Future => "future",
        }
    }

    /// Every outcome label, for pre-registering metric series.
    pub const LABELS: [&'static str; 5] = ["accepted", "invalid", "duplicate", "too_old", "future"];

    /// The machine-readable reason for the dead-letter topic, if this outcome goes there.
    pub fn dead_letter_reason(&self) -> Option<&'static str> {
        match self {
            Outcome::Accepted(_) | Outcome::Duplicate => None,
            Outcome::Invalid(reason) => Some(reason.code()),
            Outcome::TooOld => Some("too_old"),
            Outcome::Future => Some("future"),
        }
    }
}

/// What "now" is for one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Clock {
    /// The wall clock's reading.
    Wall(Timestamp),
    /// Event time: the largest event time accepted so far (`None` before any), or the
    /// message's own event time if that is larger. Nothing is ever `future` on this clock.
    EventTime(Option<Timestamp>),
}

impl Clock {
    /// "now" for a response at event time `t`.
    pub fn now_for(self, t: Timestamp) -> Timestamp {
        match self {
            Clock::Wall(now) => now,
            Clock::EventTime(latest) => latest.map_or(t, |latest| latest.max(t)),
        }
    }
}

/// Decides the outcome of one message, remembering accepted ids.
pub fn classify<'a>(
    bytes: &'a [u8],
    clock: Clock,
    windows: &WindowSpecs,
    seen: &mut DuplicateFilter,
) -> Outcome<'a> {
    let response = match decode(bytes) {
        Ok(response) => response,
        Err(reason) => return Outcome::Invalid(reason),
    };
    if seen.contains(&response.response_id) {
        return Outcome::Duplicate;
    }
    match windows.admit(response.responded_at, clock.now_for(response.responded_at)) {
        Admission::TooOld => Outcome::TooOld,
        Admission::Future => Outcome::Future,
        Admission::Admitted => {
            seen.remember(&response.response_id, response.responded_at);
            Outcome::Accepted(response)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::Span;

    fn message(id: &str, at: &str) -> Vec<u8> {
        format!(r#"{{"response_id":"{id}","score":9,"responded_at":"{at}","customer_id":"c"}}"#)
            .into_bytes()
    }

    #[test]
    fn every_message_gets_one_outcome() {
        let windows = WindowSpecs::new(&["1h"], 60, Span::minutes(5)).expect("valid");
        let mut seen = DuplicateFilter::new(Span::hours(1), 100);
        let now = Timestamp::parse_rfc3339("2026-11-22T12:00:00Z").expect("ts");
        let outcome = |bytes: &[u8], seen: &mut DuplicateFilter| {
            classify(bytes, Clock::Wall(now), &windows, seen).label()
        };
        assert_eq!(
            outcome(&message("a", "2026-11-22T11:30:00Z"), &mut seen),
            "accepted"
        );
        assert_eq!(
            outcome(&message("a", "2026-11-22T11:30:00Z"), &mut seen),
            "duplicate"
        );
        assert_eq!(
            outcome(&message("b", "2026-11-22T11:00:00Z"), &mut seen),
            "too_old"
        );
        assert_eq!(
            outcome(&message("c", "2026-11-22T12:06:00Z"), &mut seen),
            "future"
        );
        assert_eq!(outcome(b"nope", &mut seen), "invalid");
        // Rejected ids are not remembered: "c" counts once its time has come.
        assert_eq!(
            outcome(&message("c", "2026-11-22T11:59:00Z"), &mut seen),
            "accepted"
        );
    }

    #[test]
    fn event_time_clock_follows_the_latest_accepted_event() {
        let windows = WindowSpecs::new(&["1h"], 60, Span::minutes(5)).expect("valid");
        let mut seen = DuplicateFilter::new(Span::hours(1), 100);
        let latest = Timestamp::parse_rfc3339("2026-11-22T12:00:00Z");
        let far_ahead = message("a", "2030-01-01T00:00:00Z");
        let clock = Clock::EventTime(latest);
        assert_eq!(
            classify(&far_ahead, clock, &windows, &mut seen).label(),
            "accepted"
        );
        let old = message("b", "2026-11-22T11:00:00Z");
        assert_eq!(
            classify(&old, clock, &windows, &mut seen).label(),
            "too_old"
        );
        let fresh = Clock::EventTime(None);
        assert_eq!(
            classify(&old, fresh, &windows, &mut seen).label(),
            "accepted"
        );
    }

    #[test]
    fn dead_letter_reasons_name_the_cause() {
        assert_eq!(Outcome::TooOld.dead_letter_reason(), Some("too_old"));
        assert_eq!(Outcome::Duplicate.dead_letter_reason(), None);
        assert_eq!(
            Outcome::Invalid(InvalidReason::NotObject).dead_letter_reason(),
            Some("not_object")
        );
    }
}
