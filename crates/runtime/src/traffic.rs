//! Realistic survey traffic for the demo and the load generator: several regions, products,
//! channels and tiers with different satisfaction, comments, late arrivals, and a few
//! duplicates and invalid messages. Seeded, so a run can be repeated exactly.

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
}
