//! Realistic survey traffic for the demo and the load generator: several regions, products,
//! channels and tiers with different satisfaction, comments, late arrivals, and a few
//! duplicates and invalid messages; and a simulated follow-up team ([`FollowupTeam`]) that
//! answers detractor alerts with outcome events (most in time, some late, some never) and
//! has a few customers answer again. Seeded, so a run can be repeated exactly.

use npsflow_core::Timestamp;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const REGIONS: [(&str, i32); 4] = [("east", 2), ("west", 0), ("north", -2), ("south", 1)];
const PRODUCTS: [(&str, i32); 4] = [("sedan", 1), ("suv", 0), ("van", -2), ("truck", 1)];
const CHANNELS: [&str; 3] = ["email", "sms", "web"];
const TIERS: [&str; 3] = ["standard", "gold", "platinum"];
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

/// One generated message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SurveyMessage {
    /// Kafka key (the customer id; none for some invalid messages).
    pub key: Option<String>,
    /// Message body.
    pub payload: Vec<u8>,
}

/// A seeded stream of survey messages.
pub struct Traffic {
    rng: SmallRng,
    sequence: u64,
    run_id: u64,
    previous: Option<SurveyMessage>,
    /// Share of invalid messages, 0..1.
    pub invalid_share: f64,
    /// Share of exact re-sends of the previous message, 0..1.
    pub duplicate_share: f64,
    /// Share of responses that arrive hours late, 0..1.
    pub late_share: f64,
}

impl Traffic {
    /// A stream from a seed.
    pub fn new(seed: u64) -> Traffic {
        Traffic {
            rng: SmallRng::seed_from_u64(seed),
            sequence: 0,
            run_id: seed,
            previous: None,
            invalid_share: 0.02,
            duplicate_share: 0.02,
            late_share: 0.05,
        }
    }

    /// The next message, with event times around `now`.
    pub fn next_message(&mut self, now: Timestamp) -> SurveyMessage {
        if self.rng.random_bool(self.invalid_share) {
            let payload = INVALID[self.rng.random_range(0..INVALID.len())].to_vec();
            return SurveyMessage { key: None, payload };
        }
        if let Some(previous) = &self.previous {
            if self.rng.random_bool(self.duplicate_share) {
                return previous.clone();
            }
        }
        self.sequence += 1;
        let (region, region_bias) = REGIONS[self.rng.random_range(0..REGIONS.len())];
        let (product, product_bias) = PRODUCTS[self.rng.random_range(0..PRODUCTS.len())];
        let base: i32 = self.rng.random_range(3..=11);
        let score = (base + region_bias + product_bias).clamp(0, 10);
        let late_ms = if self.rng.random_bool(self.late_share) {
            self.rng.random_range(0..6 * 3_600_000)
        } else {
            self.rng.random_range(0..5_000)
        };
        let customer = format!("cust-{:06}", self.rng.random_range(0..200_000));
        let account = format!("acct-{:04}", self.rng.random_range(0..2_000));
        let mut json = serde_json::json!({
            "response_id": format!("r-{:x}-{}", self.run_id, self.sequence),
            "score": score,
            "responded_at": Timestamp(now.millis() - late_ms).to_rfc3339(),
            "customer_id": customer,
            "account_id": account,
            "survey_id": "relationship-2026",
            "segments": {
                "region": region,
                "product": product,
                "channel": CHANNELS[self.rng.random_range(0..CHANNELS.len())],
                "tier": TIERS[self.rng.random_range(0..TIERS.len())],
            },
        });
        if self.rng.random_bool(0.3) {
            json["comment"] = COMMENTS[self.rng.random_range(0..COMMENTS.len())].into();
        }
        let message = SurveyMessage {
            key: Some(customer),
            payload: serde_json::to_vec(&json).expect("serialises"),
        };
        self.previous = Some(message.clone());
        message
    }
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
