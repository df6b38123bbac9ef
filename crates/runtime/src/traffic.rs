//! Realistic survey traffic for the demo and the load generator: several regions, products,
//! channels and tiers with different satisfaction, B2B accounts (a few of them unhappy),
//! comments, late arrivals, and a few duplicates and invalid messages; optionally the survey
//! invitations behind the responses (about three per response, sent a little before, at a
//! response rate that depends on the channel and tier), and a history of both spread over the
//! past ([`Traffic::backfill`]); and a simulated follow-up team ([`FollowupTeam`]) that
//! answers detractor alerts with outcome events (most in time, some late, some never) and
//! has a few customers answer again. Seeded, so a run can be repeated exactly.

use npsflow_core::{Span, Timestamp, WindowSpecs};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const REGIONS: [(&str, i32); 4] = [("east", 2), ("west", 0), ("north", -2), ("south", 1)];
const PRODUCTS: [(&str, i32); 4] = [("sedan", 1), ("suv", 0), ("van", -2), ("truck", 1)];
/// Channels with their response propensity (relative to the mean, which is 1).
const CHANNELS: [(&str, f64); 3] = [("email", 0.85), ("sms", 1.15), ("web", 1.0)];
/// Tiers with their response propensity (relative to the mean, which is 1).
const TIERS: [(&str, f64); 3] = [("standard", 0.9), ("gold", 1.0), ("platinum", 1.1)];
const COMMENTS: [&str; 5] = [
    "Waited too long for a callback.",
    "The advisor was great.",
    "App keeps logging me out.",
    "Delivery was on time.",
    "Billing was confusing.",
];
const INVALID: [&[u8]; 4] = [
    br#"{"response_id":"bad-1","score":11,"responded_at":"2026-01-01T00:00:00Z","customer_id":"c"}"#,
    br#"{"response_id":"bad-2","score":"7","responded_at":"2026-01-01T00:00:00Z","customer_id":"c"}"#,
    br#"{"score":7}"#,
    b"this is not json",
];
/// Customers, numbered `cust-000000` up.
const CUSTOMERS: u32 = 200_000;
/// B2B accounts, numbered `acct-0000` up; customer `n` belongs to account `n % ACCOUNTS`.
pub const ACCOUNTS: u32 = 300;
/// The longest an invitation is sent before its response (and the spread of the other
/// invitations of the same send-out around it).
const INVITATION_LEAD_MS: i64 = 20 * 60_000;

/// How much an account's customers like us, added to every score of theirs: one account in
/// twenty is unhappy (mostly detractors, NPS around -75), the others are content.
pub fn account_bias(account: u32) -> i32 {
    match account % 20 {
        3 => -4,
        _ if account % 4 == 1 => 1,
        _ => 2,
    }
}

/// The account a customer belongs to: `acct-NNNN`.
fn account_name(account: u32) -> String {
    format!("acct-{account:04}")
}

/// One generated message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SurveyMessage {
    /// Kafka key (the customer id; none for some invalid messages).
    pub key: Option<String>,
    /// Message body.
    pub payload: Vec<u8>,
}

/// Which input topic a generated message goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Input {
    /// `topics.responses` (`survey.responses`).
    Response,
    /// `topics.invitations` (`survey.invitations`).
    Invitation,
}

/// A generated message, the input it goes to and its event time (`sent_at` of an invitation,
/// `responded_at` of a response; `None` for an invalid message).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generated {
    /// Which topic.
    pub input: Input,
    /// Event time, when the message has one.
    pub at: Option<Timestamp>,
    /// Key and body.
    pub message: SurveyMessage,
}

/// What the invitations of one response need to know about it.
struct Respondent {
    customer: String,
    responded_at: Timestamp,
    segments: [&'static str; 4],
    /// The chance that an invitation with these segments is answered.
    response_rate: f64,
}

/// A seeded stream of survey messages.
pub struct Traffic {
    rng: SmallRng,
    sequence: u64,
    invitation_sequence: u64,
    run_id: u64,
    previous: Option<SurveyMessage>,
    /// Share of invalid messages, 0..1.
    pub invalid_share: f64,
    /// Share of exact re-sends of the previous message, 0..1.
    pub duplicate_share: f64,
    /// Share of responses that arrive hours late, 0..1.
    pub late_share: f64,
    /// Invitations sent per response on average (0: none; otherwise at least 1): each
    /// response of [`Traffic::next_messages`] and [`Traffic::backfill`] comes with its own
    /// invitation and those of the customers of the same send-out who did not answer. The
    /// response rate of a segment is `1 / invitations_per_response` times its channel's and
    /// tier's propensity (sms answers most, email least; platinum more than standard).
    pub invitations_per_response: f64,
}

impl Traffic {
    /// A stream from a seed (no invitations until `invitations_per_response` is set).
    pub fn new(seed: u64) -> Traffic {
        Traffic {
            rng: SmallRng::seed_from_u64(seed),
            sequence: 0,
            invitation_sequence: 0,
            run_id: seed,
            previous: None,
            invalid_share: 0.02,
            duplicate_share: 0.02,
            late_share: 0.05,
            invitations_per_response: 0.0,
        }
    }

    /// The next message to the responses topic, with event times around `now` (never any
    /// invitation: see [`Traffic::next_messages`]).
    pub fn next_message(&mut self, now: Timestamp) -> SurveyMessage {
        self.next_response(now, None).0
    }

    /// The next response (or invalid message or re-send) with event time around `now`, and
    /// before it the invitations behind it when `invitations_per_response` is set: all
    /// invitations of a send-out first (`sent_at` a little before the response's
    /// `responded_at`), then the response.
    pub fn next_messages(&mut self, now: Timestamp) -> Vec<Generated> {
        let (message, respondent) = self.next_response(now, None);
        let mut out = Vec::new();
        if let Some(respondent) = &respondent {
            self.invitations(respondent, None, &mut out);
        }
        out.push(Generated {
            input: Input::Response,
            at: respondent.map(|r| r.responded_at),
            message,
        });
        out
    }

    /// History: `responses` valid responses (no invalid messages, re-sends or late arrivals)
    /// with `responded_at` spread evenly at random over `[from, to)`, with their invitations
    /// when `invitations_per_response` is set (none sent before `from`), all in event-time
    /// order. Deterministic given the seed, `from` and `to`.
    pub fn backfill(&mut self, responses: u64, from: Timestamp, to: Timestamp) -> Vec<Generated> {
        let span = to.millis() - from.millis();
        if span <= 0 {
            return Vec::new();
        }
        let mut times: Vec<i64> = (0..responses)
            .map(|_| from.millis() + self.rng.random_range(0..span))
            .collect();
        times.sort_unstable();
        let mut out = Vec::new();
        for t in times {
            let (message, respondent) = self.next_response(Timestamp(t), Some(Timestamp(t)));
            let respondent = respondent.expect("a backfilled response is valid");
            self.invitations(&respondent, Some(from), &mut out);
            out.push(Generated {
                input: Input::Response,
                at: Some(respondent.responded_at),
                message,
            });
        }
        // Stable: a response stays after the invitations sent at the same instant.
        out.sort_by_key(|g| g.at);
        out
    }

    /// A response at `at` (exactly, valid and new), or else one around `now` that may be
    /// invalid, a re-send or late; with what its invitations need when it is a new valid one.
    fn next_response(
        &mut self,
        now: Timestamp,
        at: Option<Timestamp>,
    ) -> (SurveyMessage, Option<Respondent>) {
        if at.is_none() {
            if self.rng.random_bool(self.invalid_share) {
                let payload = INVALID[self.rng.random_range(0..INVALID.len())].to_vec();
                return (SurveyMessage { key: None, payload }, None);
            }
            if let Some(previous) = &self.previous {
                if self.rng.random_bool(self.duplicate_share) {
                    return (previous.clone(), None);
                }
            }
        }
        self.sequence += 1;
        let (region, region_bias) = REGIONS[self.rng.random_range(0..REGIONS.len())];
        let (product, product_bias) = PRODUCTS[self.rng.random_range(0..PRODUCTS.len())];
        let (channel, channel_propensity) = CHANNELS[self.rng.random_range(0..CHANNELS.len())];
        let (tier, tier_propensity) = TIERS[self.rng.random_range(0..TIERS.len())];
        let number = self.rng.random_range(0..CUSTOMERS);
        let account = number % ACCOUNTS;
        let base: i32 = self.rng.random_range(3..=11);
        let score = (base + region_bias + product_bias + account_bias(account)).clamp(0, 10);
        let responded_at = match at {
            Some(at) => at,
            None => {
                let late_ms = if self.rng.random_bool(self.late_share) {
                    self.rng.random_range(0..6 * 3_600_000)
                } else {
                    self.rng.random_range(0..5_000)
                };
                Timestamp(now.millis() - late_ms)
            }
        };
        let customer = format!("cust-{number:06}");
        let mut json = serde_json::json!({
            "response_id": format!("r-{:x}-{}", self.run_id, self.sequence),
            "score": score,
            "responded_at": responded_at.to_rfc3339(),
            "customer_id": customer,
            "account_id": account_name(account),
            "survey_id": "relationship-2026",
            "segments": segments_json([region, product, channel, tier]),
        });
        if self.rng.random_bool(0.3) {
            json["comment"] = COMMENTS[self.rng.random_range(0..COMMENTS.len())].into();
        }
        let message = SurveyMessage {
            key: Some(customer.clone()),
            payload: serde_json::to_vec(&json).expect("serialises"),
        };
        self.previous = Some(message.clone());
        let respondent = Respondent {
            customer,
            responded_at,
            segments: [region, product, channel, tier],
            response_rate: self.response_rate(channel_propensity * tier_propensity),
        };
        (message, Some(respondent))
    }

    /// The chance an invitation is answered, for a segment of this propensity.
    fn response_rate(&self, propensity: f64) -> f64 {
        if self.invitations_per_response <= 0.0 {
            return 0.0;
        }
        (propensity / self.invitations_per_response.max(1.0)).clamp(0.01, 1.0)
    }

    /// The invitations of one send-out that brought `respondent`'s response: the
    /// respondent's own (1 to 20 minutes before the response), and those of other customers
    /// with the same segments who did not answer (as many as the response rate implies on
    /// average: a geometric number with mean `(1 - rate) / rate`), sent around the same time;
    /// none before `not_before`.
    fn invitations(
        &mut self,
        respondent: &Respondent,
        not_before: Option<Timestamp>,
        out: &mut Vec<Generated>,
    ) {
        if self.invitations_per_response <= 0.0 {
            return;
        }
        let sent = self.rng.random_range(60_000..=INVITATION_LEAD_MS);
        let mut sent_at = Timestamp(respondent.responded_at.millis() - sent);
        let floor = |t: Timestamp| match not_before {
            Some(floor) if t < floor => floor,
            _ => t,
        };
        sent_at = floor(sent_at);
        let own = self.invitation(&respondent.customer, sent_at, respondent.segments);
        out.push(own);
        let mut others = 0u32;
        // A geometric count, capped so that a tiny rate cannot run away.
        while others < 1_000 && !self.rng.random_bool(respondent.response_rate) {
            others += 1;
            let customer = format!("cust-{:06}", self.rng.random_range(0..CUSTOMERS));
            let jitter = self.rng.random_range(0..=INVITATION_LEAD_MS / 4);
            let at = floor(Timestamp(sent_at.millis() - jitter).min(respondent.responded_at));
            let invitation = self.invitation(&customer, at, respondent.segments);
            out.push(invitation);
        }
    }

    fn invitation(
        &mut self,
        customer: &str,
        sent_at: Timestamp,
        [region, product, channel, tier]: [&'static str; 4],
    ) -> Generated {
        self.invitation_sequence += 1;
        let json = serde_json::json!({
            "invitation_id": format!("i-{:x}-{}", self.run_id, self.invitation_sequence),
            "customer_id": customer,
            "sent_at": sent_at.to_rfc3339(),
            "survey_id": "relationship-2026",
            "segments": segments_json([region, product, channel, tier]),
        });
        Generated {
            input: Input::Invitation,
            at: Some(sent_at),
            message: SurveyMessage {
                key: Some(customer.to_owned()),
                payload: serde_json::to_vec(&json).expect("serialises"),
            },
        }
    }
}

/// Where a history for a stream starting at `now` may begin: `wanted` before `now` (e.g.
/// twice the shortest window, so that window has a full window before it), but never so far
/// back that a response would be too old for every window by the time it is read (the
/// longest window's `from`, plus its step and a minute of slack, since `from` moves by a step
/// while the history is on its way). `now` itself when no history fits.
pub fn history_from(specs: &WindowSpecs, now: Timestamp, wanted: Span) -> Timestamp {
    let step = specs
        .windows()
        .iter()
        .map(|w| w.bucket().millis())
        .max()
        .unwrap_or(0);
    let oldest = specs.longest_from(now).millis() + step + 60_000;
    Timestamp(
        (now.millis() - wanted.millis().max(0))
            .max(oldest)
            .min(now.millis()),
    )
}

/// What the simulated team does with one case.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TeamBehaviour {
    /// Contacted and resolved in time, then closed.
    InTime,
    /// Contacted after the first-contact deadline, resolved in time.
    LateContact,
    /// Reassigned, contacted in time, resolved after the resolve deadline.
    LateResolve,
    /// Nobody ever acts.
    Never,
}

/// Something the simulated team (or its customer) sends, at `at`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedMessage {
    /// When it happens (also its `occurred_at` / `responded_at`).
    pub at: Timestamp,
    /// An outcome event (to the outcomes topic) or a survey response (to the input).
    pub kind: PlannedKind,
    /// Kafka key: the case id for outcomes, the customer id for responses.
    pub key: String,
    /// The JSON body.
    pub payload: Vec<u8>,
}

/// Where a planned message goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum PlannedKind {
    /// `npsflow.followup-outcomes`.
    Outcome,
    /// `survey.responses`.
    Response,
}

/// A seeded follow-up team: for each detractor alert, a plan of outcome events relative to
/// the SLAs (70 % in time, 15 % contacted late, 10 % never acted on, 5 % resolved late after
/// a reassignment), and for a third of the closed cases the customer's next response (mostly
/// passive or promoter).
pub struct FollowupTeam {
    rng: SmallRng,
    next_event: u64,
}

impl FollowupTeam {
    /// A team from a seed.
    pub fn new(seed: u64) -> FollowupTeam {
        FollowupTeam {
            rng: SmallRng::seed_from_u64(seed ^ 0x7465_616d),
            next_event: 0,
        }
    }

    /// What the team does with the case `case_id` of `customer_id`, whose response came at
    /// `responded_at`, given the SLAs (milliseconds).
    pub fn plan(
        &mut self,
        case_id: &str,
        customer_id: &str,
        responded_at: Timestamp,
        first_contact_sla: i64,
        resolve_sla: i64,
    ) -> (TeamBehaviour, Vec<PlannedMessage>) {
        let roll: f64 = self.rng.random();
        let behaviour = match roll {
            r if r < 0.70 => TeamBehaviour::InTime,
            r if r < 0.85 => TeamBehaviour::LateContact,
            r if r < 0.95 => TeamBehaviour::Never,
            _ => TeamBehaviour::LateResolve,
        };
        let at =
            |share: f64, sla: i64| Timestamp(responded_at.millis() + (share * sla as f64) as i64);
        let steps: Vec<(Timestamp, &str, &str)> = match behaviour {
            TeamBehaviour::InTime => vec![
                (at(0.1, first_contact_sla), "acknowledged", ""),
                (
                    at(0.5, first_contact_sla),
                    "contacted",
                    r#","contact_result":"reached""#,
                ),
                (
                    at(0.5, resolve_sla),
                    "resolved",
                    r#","resolution":"fixed","root_causes":["wait_time"]"#,
                ),
                (at(0.6, resolve_sla), "closed", r#","resolution":"fixed""#),
            ],
            TeamBehaviour::LateContact => vec![
                (
                    at(0.6, first_contact_sla),
                    "contact_attempted",
                    r#","contact_result":"no_answer""#,
                ),
                (
                    at(1.3, first_contact_sla).max(at(0.3, resolve_sla)),
                    "contacted",
                    r#","contact_result":"reached""#,
                ),
                (
                    at(0.9, resolve_sla),
                    "resolved",
                    r#","resolution":"explained""#,
                ),
                (
                    at(0.95, resolve_sla),
                    "closed",
                    r#","resolution":"explained""#,
                ),
            ],
            TeamBehaviour::LateResolve => vec![
                (
                    at(0.2, first_contact_sla),
                    "reassigned",
                    r#","assignee":"senior-cx""#,
                ),
                (
                    at(0.7, first_contact_sla),
                    "contacted",
                    r#","contact_result":"reached""#,
                ),
                (
                    at(1.2, resolve_sla),
                    "resolved",
                    r#","resolution":"compensated""#,
                ),
                (
                    at(1.3, resolve_sla),
                    "closed",
                    r#","resolution":"compensated""#,
                ),
            ],
            TeamBehaviour::Never => Vec::new(),
        };
        let mut planned = Vec::new();
        for (when, kind, extra) in &steps {
            self.next_event += 1;
            let payload = format!(
                r#"{{"event_id":"{case_id}-{}","case_id":"{case_id}","type":"{kind}","occurred_at":"{}","actor":"cx-agent"{extra}}}"#,
                self.next_event,
                when.to_rfc3339()
            );
            planned.push(PlannedMessage {
                at: *when,
                kind: PlannedKind::Outcome,
                key: case_id.to_owned(),
                payload: payload.into_bytes(),
            });
        }
        if let Some((closed_at, _, _)) = steps.last() {
            if self.rng.random_bool(0.35) {
                let score: u8 = if self.rng.random_bool(0.7) {
                    self.rng.random_range(7..=10)
                } else {
                    self.rng.random_range(0..=6)
                };
                let when = Timestamp(closed_at.millis() + resolve_sla / 5);
                let payload = serde_json::json!({
                    "response_id": format!("again-{case_id}"),
                    "score": score,
                    "responded_at": when.to_rfc3339(),
                    "customer_id": customer_id,
                    "survey_id": "after-followup",
                });
                planned.push(PlannedMessage {
                    at: when,
                    kind: PlannedKind::Response,
                    key: customer_id.to_owned(),
                    payload: serde_json::to_vec(&payload).expect("serialises"),
                });
            }
        }
        (behaviour, planned)
    }
}

/// The `segments` object of a generated response or invitation.
fn segments_json([region, product, channel, tier]: [&str; 4]) -> serde_json::Value {
    serde_json::json!({ "region": region, "product": product, "channel": channel, "tier": tier })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_stream_with_every_kind_of_message() {
        let now = Timestamp(1_795_348_800_000);
        let a: Vec<SurveyMessage> = {
            let mut t = Traffic::new(7);
            (0..2_000).map(|_| t.next_message(now)).collect()
        };
        let mut t = Traffic::new(7);
        let b: Vec<SurveyMessage> = (0..2_000).map(|_| t.next_message(now)).collect();
        assert_eq!(a, b);
        let decoded: Vec<_> = a.iter().map(|m| npsflow_core::decode(&m.payload)).collect();
        let invalid = decoded.iter().filter(|d| d.is_err()).count();
        assert!(invalid > 10 && invalid < 100, "invalid: {invalid}");
        let detractors = decoded
            .iter()
            .flatten()
            .filter(|r| r.score.value() <= 6)
            .count();
        assert!(detractors > 100, "detractors: {detractors}");
        let ids: std::collections::HashSet<_> = decoded
            .iter()
            .flatten()
            .map(|r| r.response_id.to_string())
            .collect();
        assert!(
            ids.len() < decoded.iter().flatten().count(),
            "some duplicates"
        );
    }

    fn segment(response: &npsflow_core::SurveyResponse<'_>, key: &str) -> String {
        response
            .segments
            .iter()
            .find(|e| e.0 == key)
            .map(|e| e.1.to_string())
            .expect("segment present")
    }

    #[test]
    fn invitations_decode_are_unique_and_precede_their_response() {
        let now = Timestamp(1_795_348_800_000);
        let mut t = Traffic::new(5);
        t.invitations_per_response = 3.0;
        let generated: Vec<Generated> = (0..3_000).flat_map(|_| t.next_messages(now)).collect();
        let mut ids = std::collections::HashSet::new();
        // customer -> (sent_at, segments) of their invitations
        let mut invited: std::collections::HashMap<String, Vec<(Timestamp, String)>> =
            std::collections::HashMap::new();
        let (mut invitations, mut responses) = (0usize, 0usize);
        for g in &generated {
            match g.input {
                Input::Invitation => {
                    let i = npsflow_core::decode_invitation(&g.message.payload)
                        .expect("a valid invitation");
                    assert!(ids.insert(i.invitation_id.to_string()), "repeated id");
                    assert_eq!(g.at, Some(i.sent_at));
                    assert_eq!(g.message.key.as_deref(), Some(&*i.customer_id));
                    let segments: Vec<String> = i
                        .segments
                        .iter()
                        .map(|e| format!("{}={}", e.0, e.1))
                        .collect();
                    assert_eq!(segments.len(), 4);
                    invited
                        .entry(i.customer_id.to_string())
                        .or_default()
                        .push((i.sent_at, segments.join(",")));
                    invitations += 1;
                }
                Input::Response => {
                    let Ok(r) = npsflow_core::decode(&g.message.payload) else {
                        continue;
                    };
                    if g.at.is_none() {
                        continue; // a re-send: its invitations came with the first copy
                    }
                    responses += 1;
                    let segments: Vec<String> = r
                        .segments
                        .iter()
                        .map(|e| format!("{}={}", e.0, e.1))
                        .collect();
                    let own = invited
                        .get(&*r.customer_id)
                        .expect("the respondent was invited")
                        .iter()
                        .any(|(sent_at, s)| {
                            *s == segments.join(",")
                                && *sent_at <= r.responded_at
                                && r.responded_at.millis() - sent_at.millis() <= INVITATION_LEAD_MS
                        });
                    assert!(own, "no invitation a little before {}", r.response_id);
                }
            }
        }
        let per_response = invitations as f64 / responses as f64;
        assert!(
            (2.7..3.4).contains(&per_response),
            "invitations per response: {per_response}"
        );
        // next_message stays responses only.
        let mut t = Traffic::new(5);
        t.invitations_per_response = 3.0;
        for _ in 0..200 {
            let m = t.next_message(now);
            assert!(npsflow_core::decode_invitation(&m.payload).is_err());
        }
    }

    #[test]
    fn response_rates_follow_channel_and_tier() {
        let mut t = Traffic::new(9);
        t.invitations_per_response = 3.0;
        let (from, to) = (Timestamp(1_795_341_600_000), Timestamp(1_795_348_800_000));
        let generated = t.backfill(30_000, from, to);
        // (channel, tier) -> (invitations, responses)
        let mut counts: std::collections::HashMap<(String, String), (f64, f64)> =
            std::collections::HashMap::new();
        for g in &generated {
            match g.input {
                Input::Invitation => {
                    let i = npsflow_core::decode_invitation(&g.message.payload).expect("valid");
                    let get = |k: &str| {
                        i.segments
                            .iter()
                            .find(|e| e.0 == k)
                            .map(|e| e.1.to_string())
                            .expect("segment")
                    };
                    counts.entry((get("channel"), get("tier"))).or_default().0 += 1.0;
                }
                Input::Response => {
                    let r = npsflow_core::decode(&g.message.payload).expect("valid");
                    let key = (segment(&r, "channel"), segment(&r, "tier"));
                    counts.entry(key).or_default().1 += 1.0;
                }
            }
        }
        assert_eq!(counts.len(), CHANNELS.len() * TIERS.len());
        for (channel, c) in CHANNELS {
            for (tier, p) in TIERS {
                let (invitations, responses) = counts[&(channel.to_owned(), tier.to_owned())];
                let rate = responses / invitations;
                let target = c * p / 3.0;
                assert!(
                    (rate - target).abs() < 0.03,
                    "{channel}/{tier}: {rate:.3}, target {target:.3}"
                );
            }
        }
        let sms = counts[&("sms".to_owned(), "platinum".to_owned())];
        let email = counts[&("email".to_owned(), "standard".to_owned())];
        assert!(sms.1 / sms.0 > email.1 / email.0 + 0.1);
    }

    #[test]
    fn backfill_is_admitted_ordered_and_repeatable() {
        let now = Timestamp(1_795_348_812_345);
        let two_hours = Span(2 * 3_600_000);
        let default = WindowSpecs::new(&["1h", "24h", "7d", "28d"], 60, Span(300_000))
            .expect("valid windows");
        let short = WindowSpecs::new(&["1h"], 60, Span(300_000)).expect("valid windows");
        for (specs, expected_from) in [
            (&default, Some(now.millis() - two_hours.millis())),
            (&short, None),
        ] {
            let from = history_from(specs, now, two_hours);
            if let Some(expected) = expected_from {
                assert_eq!(from.millis(), expected);
            } else {
                assert!(from.millis() > now.millis() - 3_600_000, "{from:?}");
            }
            let history = |seed| {
                let mut t = Traffic::new(seed);
                t.invitations_per_response = 3.0;
                t.backfill(4_000, from, now)
            };
            let a = history(3);
            assert_eq!(a, history(3), "deterministic given the seed");
            assert_ne!(a, history(4));
            assert!(
                a.windows(2).all(|w| w[0].at <= w[1].at),
                "in event-time order"
            );
            // Read up to two minutes later, everything still counts in some window.
            let read_at = Timestamp(now.millis() + 120_000);
            for g in &a {
                let at = g.at.expect("history has event times");
                assert!(at >= from && at < now, "{at:?} outside [{from:?}, {now:?})");
                assert_eq!(specs.admit(at, read_at), npsflow_core::Admission::Admitted);
            }
            let responses = a.iter().filter(|g| g.input == Input::Response).count();
            assert_eq!(responses, 4_000);
        }
        // With the default windows the 1h window has a full window before it, both busy.
        let from = history_from(&default, now, two_hours);
        let mut t = Traffic::new(3);
        let history = t.backfill(4_000, from, now);
        let spec = &default.windows()[0];
        let (previous_from, previous_to) = spec.previous_interval(now);
        let previous = history
            .iter()
            .filter_map(|g| g.at)
            .filter(|at| *at >= previous_from && *at < previous_to)
            .count();
        assert!(previous > 1_500, "previous 1h window: {previous}");
    }

    #[test]
    fn responses_come_from_a_few_hundred_accounts_some_unhappy() {
        let mut t = Traffic::new(12);
        t.invalid_share = 0.0;
        let now = Timestamp(1_795_348_800_000);
        let mut tallies: std::collections::HashMap<String, (i64, i64)> =
            std::collections::HashMap::new();
        for _ in 0..60_000 {
            let m = t.next_message(now);
            let r = npsflow_core::decode(&m.payload).expect("valid");
            assert!(r.account_manager.is_none());
            let account = r.account_id.expect("an account").to_string();
            let tally = tallies.entry(account).or_default();
            tally.0 += 1;
            tally.1 += match r.score.value() {
                9.. => 1,
                7..=8 => 0,
                _ => -1,
            };
        }
        assert_eq!(tallies.len(), ACCOUNTS as usize);
        let at_risk: Vec<&String> = tallies
            .iter()
            .filter(|(_, (n, net))| (*net as f64 / *n as f64) < 0.0)
            .map(|(a, _)| a)
            .collect();
        let unhappy = (0..ACCOUNTS).filter(|a| account_bias(*a) < 0).count();
        assert_eq!(at_risk.len(), unhappy, "at risk: {at_risk:?}");
        assert!((5..=30).contains(&unhappy));
        for account in at_risk {
            let number: u32 = account["acct-".len()..].parse().expect("a number");
            assert!(account_bias(number) < 0);
            let (n, net) = tallies[account];
            assert!(
                (net as f64 / n as f64) < -0.5,
                "{account} not mostly detractors"
            );
        }
    }

    #[test]
    fn the_team_plans_valid_outcomes_in_the_promised_shares() {
        let mut team = FollowupTeam::new(3);
        let start = Timestamp(1_795_348_800_000);
        let (first, resolve) = (20_000, 60_000);
        let mut counts = std::collections::HashMap::new();
        let mut responses = 0;
        for i in 0..2_000 {
            let (behaviour, planned) =
                team.plan(&format!("det-{i}"), "cust", start, first, resolve);
            *counts.entry(behaviour).or_insert(0) += 1;
            for message in &planned {
                match message.kind {
                    PlannedKind::Outcome => {
                        let event = npsflow_core::decode_outcome(&message.payload).expect("valid");
                        assert_eq!(event.occurred_at, message.at);
                        let contacted_in_time =
                            event.occurred_at.millis() - start.millis() <= first;
                        if event.kind == npsflow_core::OutcomeType::Contacted {
                            assert_eq!(contacted_in_time, behaviour != TeamBehaviour::LateContact);
                        }
                    }
                    PlannedKind::Response => {
                        npsflow_core::decode(&message.payload).expect("valid response");
                        responses += 1;
                    }
                }
            }
        }
        let share = |b| counts[&b] as f64 / 2_000.0;
        assert!((share(TeamBehaviour::InTime) - 0.70).abs() < 0.04);
        assert!((share(TeamBehaviour::Never) - 0.10).abs() < 0.03);
        assert!(
            responses > 400 && responses < 800,
            "customers answering again: {responses}"
        );
    }
}
