//! The fate of one incoming message: decoded, checked against the clock and against the ids
//! seen before, and given exactly one [`Outcome`].
//!
//! Checks run in a fixed order: decoding (`invalid`), then the duplicate filter
//! (`duplicate`: an accepted response with the same id came before), then the clock
//! (`too_old`, `future`). Only accepted responses are remembered by the duplicate filter,
//! so a response that was too far in the future may be accepted when sent again later.
//!
//! Messages reach the deciding step through a repartition by `response_id`
//! ([`repartition_key`]), so that every copy of a response meets its earlier copies on one
//! partition whatever key or partition it was sent with. Each message is remembered with a
//! tag of its source (input partition and offset): a second copy of the very same input
//! message, which a replay of the repartition step can forward, is [`Outcome::Resent`] and
//! has no effect, while a new message with a known id is a `duplicate`.

use std::borrow::Cow;

use crate::dedupe::DuplicateFilter;
use crate::response::{decode, decode_invitation, InvalidReason, Invitation, SurveyResponse};
use crate::time::Timestamp;
use crate::window::{Admission, WindowSpecs};

/// What happens to one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome<'a> {
    /// A valid, new, timely response: it counts.
    Accepted(SurveyResponse<'a>),
    /// A valid, new, timely invitation (from `survey.invitations`): it counts.
    Invited(Invitation<'a>),
    /// Not a valid response; dead-lettered with the reason.
    Invalid(InvalidReason),
    /// A response with this id was accepted before; dropped.
    Duplicate,
    /// Older than the longest window; dead-lettered.
    TooOld,
    /// Further ahead of the clock than the allowed skew; dead-lettered.
    Future,
    /// The very same input message, forwarded again by a replay of the repartition step:
    /// it was decided already, so it has no outcome of its own and no effect.
    Resent,
}

impl Outcome<'_> {
    /// The `outcome` label of `npsflow_events_total`.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Accepted(_) | Outcome::Invited(_) => "accepted",
            Outcome::Invalid(_) => "invalid",
            Outcome::Duplicate => "duplicate",
            Outcome::TooOld => "too_old",
            Outcome::Future => "future",
            Outcome::Resent => "resent",
        }
    }

    /// Every outcome label of a message's one outcome, for pre-registering metric series
    /// (`resent` is not among them: it is a second copy of a message already counted).
    pub const LABELS: [&'static str; 5] = ["accepted", "invalid", "duplicate", "too_old", "future"];

    /// The machine-readable reason for the dead-letter topic, if this outcome goes there.
    pub fn dead_letter_reason(&self) -> Option<&'static str> {
        match self {
            Outcome::Accepted(_) | Outcome::Invited(_) | Outcome::Duplicate | Outcome::Resent => {
                None
            }
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

/// The key a message from the input topic is repartitioned by: its `response_id`, or why
/// it is invalid. Messages over `max_bytes` are not decoded at all.
pub fn repartition_key(bytes: &[u8], max_bytes: usize) -> Result<Cow<'_, str>, InvalidReason> {
    if bytes.len() > max_bytes {
        return Err(InvalidReason::TooLarge {
            bytes: bytes.len(),
            max_bytes,
        });
    }
    decode(bytes).map(|response| response.response_id)
}

/// A tag naming the input message a response came from: its partition and offset.
pub fn source_tag(partition: i32, offset: i64) -> u64 {
    let mut bytes = [0u8; 12];
    bytes[..4].copy_from_slice(&partition.to_le_bytes());
    bytes[4..].copy_from_slice(&offset.to_le_bytes());
    xxhash_rust::xxh3::xxh3_64(&bytes)
}

/// Decides the outcome of one message that came from the input message tagged `source`
/// (see [`source_tag`]), remembering accepted ids.
pub fn classify<'a>(
    bytes: &'a [u8],
    source: u64,
    clock: Clock,
    windows: &WindowSpecs,
    seen: &mut DuplicateFilter,
) -> Outcome<'a> {
    match decode(bytes) {
        Err(reason) => Outcome::Invalid(reason),
        Ok(response) => match judge(
            &response.response_id,
            response.responded_at,
            source,
            clock,
            windows,
            seen,
        ) {
            Some(rejected) => rejected,
            None => Outcome::Accepted(response),
        },
    }
}

/// Decides the outcome of one message from `survey.invitations` by the same rules as a
/// response's (its own duplicate memory, keyed by `invitation_id`; the clock judges
/// `sent_at`); an accepted one is [`Outcome::Invited`].
pub fn classify_invitation<'a>(
    bytes: &'a [u8],
    source: u64,
    clock: Clock,
    windows: &WindowSpecs,
    seen: &mut DuplicateFilter,
) -> Outcome<'a> {
    match decode_invitation(bytes) {
        Err(reason) => Outcome::Invalid(reason),
        Ok(invitation) => match judge(
            &invitation.invitation_id,
            invitation.sent_at,
            source,
            clock,
            windows,
            seen,
        ) {
            Some(rejected) => rejected,
            None => Outcome::Invited(invitation),
        },
    }
}

/// The checks after decoding, for a message with `id` at event time `t`: the duplicate
/// filter, then the clock. `None` if the message is accepted (its id is then remembered).
fn judge(
    id: &str,
    t: Timestamp,
    source: u64,
    clock: Clock,
    windows: &WindowSpecs,
    seen: &mut DuplicateFilter,
) -> Option<Outcome<'static>> {
    match seen.source_of(id) {
        Some(first) if first == source => return Some(Outcome::Resent),
        Some(_) => return Some(Outcome::Duplicate),
        None => {}
    }
    match windows.admit(t, clock.now_for(t)) {
        Admission::TooOld => Some(Outcome::TooOld),
        Admission::Future => Some(Outcome::Future),
        Admission::Admitted => {
            seen.remember(id, t, source);
            None
        }
    }
}

/// The key a message from the invitations topic is repartitioned by: its `invitation_id`,
/// or why it is invalid.
pub fn invitation_key(bytes: &[u8], max_bytes: usize) -> Result<Cow<'_, str>, InvalidReason> {
    if bytes.len() > max_bytes {
        return Err(InvalidReason::TooLarge {
            bytes: bytes.len(),
            max_bytes,
        });
    }
    decode_invitation(bytes).map(|invitation| invitation.invitation_id)
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
        let mut offset = 0;
        let mut outcome = |bytes: &[u8], seen: &mut DuplicateFilter| {
            offset += 1;
            classify(
                bytes,
                source_tag(0, offset),
                Clock::Wall(now),
                &windows,
                seen,
            )
            .label()
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
            classify(&far_ahead, 1, clock, &windows, &mut seen).label(),
            "accepted"
        );
        let old = message("b", "2026-11-22T11:00:00Z");
        assert_eq!(
            classify(&old, 2, clock, &windows, &mut seen).label(),
            "too_old"
        );
        let fresh = Clock::EventTime(None);
        assert_eq!(
            classify(&old, 3, fresh, &windows, &mut seen).label(),
            "accepted"
        );
    }

    #[test]
    fn a_forwarded_copy_of_the_same_message_is_resent_not_a_duplicate() {
        let windows = WindowSpecs::new(&["1h"], 60, Span::minutes(5)).expect("valid");
        let mut seen = DuplicateFilter::new(Span::hours(1), 100);
        let now = Clock::Wall(Timestamp::parse_rfc3339("2026-11-22T12:00:00Z").expect("ts"));
        let m = message("a", "2026-11-22T11:30:00Z");
        let first = source_tag(3, 17);
        assert_eq!(
            classify(&m, first, now, &windows, &mut seen).label(),
            "accepted"
        );
        assert_eq!(
            classify(&m, first, now, &windows, &mut seen),
            Outcome::Resent
        );
        // The same response sent again is another message: a duplicate.
        assert_eq!(
            classify(&m, source_tag(3, 18), now, &windows, &mut seen).label(),
            "duplicate"
        );
        assert_eq!(
            classify(&m, source_tag(4, 17), now, &windows, &mut seen).label(),
            "duplicate"
        );
        assert_eq!(Outcome::Resent.dead_letter_reason(), None);
    }

    #[test]
    fn repartition_key_is_the_response_id_or_why_not() {
        let m = message("r-9", "2026-11-22T11:30:00Z");
        assert_eq!(repartition_key(&m, 10_000).as_deref(), Ok("r-9"));
        assert_eq!(
            repartition_key(&m, 10).map_err(|e| e.code()),
            Err("too_large")
        );
        assert_eq!(
            repartition_key(b"{", 10_000).map_err(|e| e.code()),
            Err("not_json")
        );
        assert_ne!(source_tag(1, 2), source_tag(2, 1));
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
