//! The detractor alert: one per detractor response, with a stable id, an owner chosen by
//! routing rules, a severity, and its JSON form on the `npsflow.followups` topic.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::nps::{Category, Score};
use crate::response::SurveyResponse;
use crate::time::Timestamp;

/// How urgent a detractor is, by score: 0-3 high, 4-5 medium, 6 low.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Score 6.
    Low,
    /// Scores 4-5.
    Medium,
    /// Scores 0-3.
    High,
}

impl Severity {
    /// The severity of a detractor score; `None` for promoters and passives.
    pub fn of(score: Score) -> Option<Severity> {
        match score.value() {
            0..=3 => Some(Severity::High),
            4..=5 => Some(Severity::Medium),
            6 => Some(Severity::Low),
            _ => None,
        }
    }

    /// The lower-case name used in JSON and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Low => "low",
            Severity::Medium => "medium",
            Severity::High => "high",
        }
    }

    /// Every severity, for pre-registering metric labels.
    pub const ALL: [Severity; 3] = [Severity::High, Severity::Medium, Severity::Low];
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which rule chose an alert's owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Route {
    /// The response named its `account_manager`.
    AccountManager,
    /// The routing table maps the response's account to an owner.
    Account,
    /// The routing table maps one of the response's segment values to an owner.
    Segment,
    /// Nothing matched: the default queue.
    Default,
}

impl Route {
    /// The snake-case name used in JSON and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Route::AccountManager => "account_manager",
            Route::Account => "account",
            Route::Segment => "segment",
            Route::Default => "default",
        }
    }
}

/// Who follows up a detractor: `account_manager` on the response, else the owner of its
/// account, else the owner of the first matching segment rule, else the default owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routing {
    by_account: BTreeMap<String, String>,
    by_segment: Vec<SegmentRoute>,
    default_owner: String,
}

/// A routing rule: responses whose `dimension` has `value` go to `owner`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentRoute {
    /// The segment dimension, e.g. `region`.
    pub dimension: String,
    /// The value, e.g. `east`.
    pub value: String,
    /// Who gets the alert.
    pub owner: String,
}

impl Routing {
    /// Routing with an account table, segment rules (first match wins) and a default owner.
    pub fn new(
        by_account: BTreeMap<String, String>,
        by_segment: Vec<SegmentRoute>,
        default_owner: impl Into<String>,
    ) -> Routing {
        Routing {
            by_account,
            by_segment,
            default_owner: default_owner.into(),
        }
    }

    /// The owner of a response's follow-up, and the rule that chose it.
    pub fn owner<'r>(&'r self, response: &'r SurveyResponse<'_>) -> (&'r str, Route) {
        if let Some(manager) = &response.account_manager {
            return (manager, Route::AccountManager);
        }
        if let Some(owner) = response
            .account_id
            .as_deref()
            .and_then(|account| self.by_account.get(account))
        {
            return (owner, Route::Account);
        }
        if let Some(rule) = self
            .by_segment
            .iter()
            .find(|rule| response.segment(&rule.dimension) == Some(rule.value.as_str()))
        {
            return (&rule.owner, Route::Segment);
        }
        (&self.default_owner, Route::Default)
    }
}

/// The stable id of the alert for a response: the same `response_id` always gives the same
/// id, on any machine and version (`det-` and 32 hex digits of xxh3-128).
pub fn alert_id(response_id: &str) -> String {
    let hash = xxhash_rust::xxh3::xxh3_128_with_seed(response_id.as_bytes(), 0x6e7073_666c6f77);
    format!("det-{hash:032x}")
}

/// A detractor alert as sent on `npsflow.followups`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DetractorAlert {
    /// Stable id: the same response always yields the same id.
    pub alert_id: String,
    /// Always `detractor`.
    pub kind: &'static str,
    /// The response that caused it.
    pub response_id: String,
    /// The customer who answered. Personal data.
    pub customer_id: String,
    /// The customer's account, if known.
    pub account_id: Option<String>,
    /// The survey, if known.
    pub survey_id: Option<String>,
    /// Who follows up.
    pub owner: String,
    /// Which rule chose the owner.
    pub route: Route,
    /// The 0..=6 score.
    pub score: u8,
    /// How urgent.
    pub severity: Severity,
    /// The response's segment values.
    pub segments: BTreeMap<String, String>,
    /// The customer's comment, if any. Personal data.
    pub comment: Option<String>,
    /// When the customer answered, as sent.
    pub responded_at: String,
    /// When npsflow emitted the alert (RFC 3339, UTC).
    pub emitted_at: String,
}

impl DetractorAlert {
    /// The alert for a response, or `None` if it is not a detractor.
    pub fn for_response(
        response: &SurveyResponse<'_>,
        routing: &Routing,
        emitted_at: Timestamp,
    ) -> Option<DetractorAlert> {
        if response.score.category() != Category::Detractor {
            return None;
        }
        let severity = Severity::of(response.score)?;
        let (owner, route) = routing.owner(response);
        Some(DetractorAlert {
            alert_id: alert_id(&response.response_id),
            kind: "detractor",
            response_id: response.response_id.to_string(),
            customer_id: response.customer_id.to_string(),
            account_id: response.account_id.as_deref().map(str::to_owned),
            survey_id: response.survey_id.as_deref().map(str::to_owned),
            owner: owner.to_owned(),
            route,
            score: response.score.value(),
            severity,
            segments: response
                .segments
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            comment: response.comment.as_deref().map(str::to_owned),
            responded_at: response.responded_at_text.to_string(),
            emitted_at: emitted_at.to_rfc3339(),
        })
    }

    /// The JSON message body.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("an alert always serialises")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::response::decode;

    fn routing() -> Routing {
        Routing::new(
            [("acme".to_owned(), "acme-team".to_owned())].into(),
            vec![SegmentRoute {
                dimension: "region".into(),
                value: "east".into(),
                owner: "east-desk".into(),
            }],
            "cx-queue",
        )
    }

    fn response(score: u8, extra: &str) -> String {
        format!(
            r#"{{"response_id":"r-1","score":{score},"responded_at":"2026-11-22T12:00:00+01:00","customer_id":"c-1"{extra}}}"#
        )
    }

    fn owner_of(extra: &str) -> (String, Route) {
        let text = response(2, extra);
        let r = decode(text.as_bytes()).expect("valid");
        let routing = routing();
        let (owner, route) = routing.owner(&r);
        (owner.to_owned(), route)
    }

    #[test]
    fn routing_prefers_manager_then_account_then_segment_then_default() {
        let all = r#","account_manager":"ann","account_id":"acme","segments":{"region":"east"}"#;
        assert_eq!(owner_of(all), ("ann".into(), Route::AccountManager));
        let no_manager = r#","account_id":"acme","segments":{"region":"east"}"#;
        assert_eq!(owner_of(no_manager), ("acme-team".into(), Route::Account));
        let unknown_account = r#","account_id":"other","segments":{"region":"east"}"#;
        assert_eq!(
            owner_of(unknown_account),
            ("east-desk".into(), Route::Segment)
        );
        assert_eq!(
            owner_of(r#","segments":{"region":"west"}"#),
            ("cx-queue".into(), Route::Default)
        );
    }

    #[test]
    fn only_detractors_alert_with_severity_by_score() {
        let severities: Vec<Option<Severity>> = (0..=10)
            .map(|s| {
                let text = response(s, "");
                let r = decode(text.as_bytes()).expect("valid");
                DetractorAlert::for_response(&r, &routing(), Timestamp(0)).map(|a| a.severity)
            })
            .collect();
        use Severity::*;
        let expected = [
            Some(High),
            Some(High),
            Some(High),
            Some(High),
            Some(Medium),
            Some(Medium),
            Some(Low),
            None,
            None,
            None,
            None,
        ];
        assert_eq!(severities, expected);
    }

    #[test]
    fn alert_ids_are_stable_and_distinct() {
        assert_eq!(alert_id("r-1"), alert_id("r-1"));
        assert_ne!(alert_id("r-1"), alert_id("r-2"));
        // Pinned: changing the derivation would re-alert every replayed response.
        assert_eq!(alert_id("r-1").len(), 36);
        assert_eq!(alert_id("r-1"), ALERT_ID_OF_R1);
    }

    const ALERT_ID_OF_R1: &str = "det-6560a2b9c767253d7acf64d40574c379";

    #[test]
    fn alert_json_carries_the_contract_fields() {
        let text = response(
            3,
            r#","account_id":"acme","segments":{"region":"east"},"comment":"too slow""#,
        );
        let r = decode(text.as_bytes()).expect("valid");
        let alert = DetractorAlert::for_response(&r, &routing(), Timestamp(0)).expect("detractor");
        let json: serde_json::Value = serde_json::from_slice(&alert.to_json()).expect("json");
        assert_eq!(json["alert_id"], alert_id("r-1"));
        assert_eq!(json["kind"], "detractor");
        assert_eq!(json["response_id"], "r-1");
        assert_eq!(json["customer_id"], "c-1");
        assert_eq!(json["account_id"], "acme");
        assert_eq!(json["owner"], "acme-team");
        assert_eq!(json["route"], "account");
        assert_eq!(json["score"], 3);
        assert_eq!(json["severity"], "high");
        assert_eq!(json["segments"]["region"], "east");
        assert_eq!(json["comment"], "too slow");
        assert_eq!(json["responded_at"], "2026-11-22T12:00:00+01:00");
        assert_eq!(json["emitted_at"], "1970-01-01T00:00:00.000Z");
        assert_eq!(json["survey_id"], serde_json::Value::Null);
    }
}
