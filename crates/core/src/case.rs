//! Closed-loop follow-up: the case each detractor alert opens, the outcome events the
//! follow-up team reports, SLA deadlines, escalations and recovery, as a pure state machine.
//!
//! A [`CaseBook`] holds the cases of one partition (keyed by `case_id`) and the recovery
//! watch of the customers of that partition (keyed by `customer_id`). Inputs come with `now`
//! (the caller's clock: the wall clock, or event time in replays); what they cause comes out
//! as [`Effect`]s; deadlines are polled with [`CaseBook::poll_timeout`] and fired with
//! [`CaseBook::handle_timeout`].
//!
//! A case's state is a fold of its outcome history sorted by `occurred_at` (then `event_id`),
//! so it does not depend on the order events arrive in: a late event is inserted where it
//! belongs and the fold is run again. Moves are forward only (`max` of the states), except
//! `reopened`, which returns a resolved or closed case to `contacted`. Escalations depend on
//! what was known when a deadline passed, so they are recorded on the case, once per level,
//! and never undone.

use std::borrow::Cow;
use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;

use crate::alert::Severity;
use crate::time::{Span, Timestamp};

/// Longest identifier (event, case, actor, assignee, root cause), in characters.
pub const MAX_ID_CHARS: usize = 128;
/// Longest `comment` on an outcome event, in characters.
pub const MAX_COMMENT_CHARS: usize = 10_000;
/// Most `root_causes` on one outcome event.
pub const MAX_ROOT_CAUSES: usize = 16;
/// Most outcome events one case keeps in its history; later ones are counted, not kept.
pub const MAX_HISTORY: usize = 200;

macro_rules! named_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        pub enum $name {
            $($(#[$vmeta])* #[serde(rename = $text)] $variant),+
        }

        impl $name {
            /// Every value, in order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The name used in JSON and metric labels.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }

            /// The value with this name.
            pub fn parse(text: &str) -> Option<$name> {
                match text { $($text => Some($name::$variant),)+ _ => None }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

named_enum! {
    /// Where a case stands. Ordered: a case only moves forward, except by `reopened`.
    CaseState {
        /// Opened by a detractor alert; nobody has acted yet.
        Open = "open",
        /// Someone took it.
        Acknowledged = "acknowledged",
        /// The customer was reached.
        Contacted = "contacted",
        /// The cause was dealt with.
        Resolved = "resolved",
        /// Done.
        Closed = "closed",
    }
}

named_enum! {
    /// What an outcome event reports.
    OutcomeType {
        /// Someone took the case.
        Acknowledged = "acknowledged",
        /// A contact was tried (no state change).
        ContactAttempted = "contact_attempted",
        /// The customer was reached.
        Contacted = "contacted",
        /// A note (no state change).
        Note = "note",
        /// The case has a new owner (`assignee`).
        Reassigned = "reassigned",
        /// The cause was dealt with (`resolution`).
        Resolved = "resolved",
        /// The case is done (`resolution`).
        Closed = "closed",
        /// A resolved or closed case is open again (back to `contacted`).
        Reopened = "reopened",
    }
}

named_enum! {
    /// How a case was resolved.
    Resolution {
        /// The problem was fixed.
        Fixed = "fixed",
        /// It was explained to the customer.
        Explained = "explained",
        /// The customer was compensated.
        Compensated = "compensated",
        /// It cannot be fixed.
        NotFixable = "not_fixable",
        /// The customer could not be reached.
        Unreachable = "unreachable",
        /// Another case covers it.
        Duplicate = "duplicate",
    }
}

named_enum! {
    /// What a contact attempt achieved.
    ContactResult {
        /// The customer was reached.
        Reached = "reached",
        /// Nobody answered.
        NoAnswer = "no_answer",
        /// A message was left.
        Voicemail = "voicemail",
        /// The customer declined to talk.
        Declined = "declined",
    }
}

named_enum! {
    /// Why a case escalated.
    EscalationReason {
        /// Not contacted by the first-contact deadline (level 1).
        FirstContactOverdue = "first_contact_overdue",
        /// A score configured to escalate at once (level 1).
        SevereScore = "severe_score",
        /// Not resolved by the resolve deadline (level 2).
        ResolveOverdue = "resolve_overdue",
    }
}

/// An outcome event from `npsflow.followup-outcomes`, valid.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutcomeEvent {
    /// Unique; a repeat is ignored.
    pub event_id: String,
    /// The case (the alert's `alert_id`).
    pub case_id: String,
    /// What happened.
    #[serde(rename = "type")]
    pub kind: OutcomeType,
    /// When it happened.
    pub occurred_at: Timestamp,
    /// Who did it. Personal data: never logged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    /// The new owner (`reassigned`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assignee: Option<String>,
    /// What a contact achieved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contact_result: Option<ContactResult>,
    /// Root-cause codes as sent.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub root_causes: Vec<String>,
    /// How it was resolved (`resolved`, `closed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolution: Option<Resolution>,
    /// Free text. Personal data: never logged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
}

impl OutcomeEvent {
    fn order(&self) -> (Timestamp, &str) {
        (self.occurred_at, &self.event_id)
    }
}

/// Why an outcome event (or an alert the followup role reads) is invalid. The detail never
/// quotes the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InvalidOutcome {
    /// Not UTF-8 JSON.
    NotJson(String),
    /// JSON, but not an object.
    NotAnObject,
    /// A field appears twice.
    DuplicateField(String),
    /// A required field is absent or null.
    MissingField(&'static str),
    /// A field has the wrong JSON type.
    WrongType(&'static str, &'static str),
    /// A field's value is not one of the allowed ones.
    UnknownValue(&'static str),
    /// A field is empty or too long.
    BadLength(&'static str, usize),
    /// A timestamp field is not RFC 3339.
    BadTimestamp(&'static str),
}

impl InvalidOutcome {
    /// The machine-readable reason code (the `npsflow-error` header).
    pub fn code(&self) -> &'static str {
        match self {
            InvalidOutcome::NotJson(_) => "not_json",
            InvalidOutcome::NotAnObject => "not_an_object",
            InvalidOutcome::DuplicateField(_) => "duplicate_field",
            InvalidOutcome::MissingField(_) => "missing_field",
            InvalidOutcome::WrongType(..) => "wrong_type",
            InvalidOutcome::UnknownValue(_) => "unknown_value",
            InvalidOutcome::BadLength(..) => "bad_length",
            InvalidOutcome::BadTimestamp(_) => "bad_timestamp",
        }
    }
}

impl fmt::Display for InvalidOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InvalidOutcome::NotJson(why) => write!(f, "not a JSON document: {why}"),
            InvalidOutcome::NotAnObject => f.write_str("not a JSON object"),
            InvalidOutcome::DuplicateField(name) => write!(f, "field {name} appears twice"),
            InvalidOutcome::MissingField(name) => write!(f, "required field {name} is missing"),
            InvalidOutcome::WrongType(name, expected) => {
                write!(f, "field {name} must be {expected}")
            }
            InvalidOutcome::UnknownValue(name) => {
                write!(f, "field {name} is not one of the allowed values")
            }
            InvalidOutcome::BadLength(name, max) => {
                write!(f, "field {name} must have 1 to {max} characters")
            }
            InvalidOutcome::BadTimestamp(name) => {
                write!(f, "field {name} is not an RFC 3339 timestamp")
            }
        }
    }
}

impl std::error::Error for InvalidOutcome {}

/// A field name (or a short string value such as a tag), borrowed from the message unless it
/// has escapes.
struct Name<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Name<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Name<'de>, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Name<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a field name")
            }
            fn visit_borrowed_str<E>(self, name: &'de str) -> Result<Name<'de>, E> {
                Ok(Name(Cow::Borrowed(name)))
            }
            fn visit_str<E>(self, name: &str) -> Result<Name<'de>, E> {
                Ok(Name(Cow::Owned(name.to_owned())))
            }
        }
        d.deserialize_str(V)
    }
}

/// The top-level fields of a JSON object, each as its raw JSON text, refusing duplicate names
/// (serde_json would keep the last). One pass over the message: only the fields a decoder
/// reads are parsed further, so unknown fields cost a syntax check and no allocation.
fn object_fields(bytes: &[u8]) -> Result<Fields<'_>, InvalidOutcome> {
    struct Object<'a>(Fields<'a>);
    impl<'de> Deserialize<'de> for Object<'de> {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Object<'de>, D::Error> {
            struct V;
            impl<'de> serde::de::Visitor<'de> for V {
                type Value = Object<'de>;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("an object")
                }
                fn visit_map<A: serde::de::MapAccess<'de>>(
                    self,
                    mut map: A,
                ) -> Result<Object<'de>, A::Error> {
                    let mut out = BTreeMap::new();
                    while let Some(Name(name)) = map.next_key::<Name<'de>>()? {
                        let value: &'de RawValue = map.next_value()?;
                        match out.entry(name) {
                            Entry::Vacant(free) => {
                                free.insert(value);
                            }
                            Entry::Occupied(taken) => {
                                return Err(serde::de::Error::custom(format_args!(
                                    "\u{0}duplicate:{}",
                                    taken.key()
                                )))
                            }
                        }
                    }
                    Ok(Object(Fields(out)))
                }
            }
            d.deserialize_any(V)
        }
    }
    match serde_json::from_slice::<Object<'_>>(bytes) {
        Ok(object) => Ok(object.0),
        Err(e) => {
            let text = e.to_string();
            if let Some(rest) = text.strip_prefix("\u{0}duplicate:") {
                let name: String = rest.split(" at line").next().unwrap_or("").to_owned();
                let name = if name.chars().count() > MAX_ID_CHARS {
                    "(a long name)".to_owned()
                } else {
                    name
                };
                return Err(InvalidOutcome::DuplicateField(name));
            }
            if e.classify() == serde_json::error::Category::Data {
                return Err(InvalidOutcome::NotAnObject);
            }
            Err(InvalidOutcome::NotJson(format!(
                "{:?} error at line {} column {}",
                e.classify(),
                e.line(),
                e.column()
            )))
        }
    }
}

/// A message's top-level fields as raw JSON (see [`object_fields`]).
struct Fields<'a>(BTreeMap<Cow<'a, str>, &'a RawValue>);

impl Fields<'_> {
    /// The field's raw JSON; `None` when it is absent or `null`.
    fn raw(&self, name: &str) -> Option<&RawValue> {
        self.0.get(name).copied().filter(|raw| raw.get() != "null")
    }

    /// The field parsed as a `T`; `None` when absent or `null`. A value of another JSON type
    /// is `wrong_type` (`expected` says what it should be); a string with an escape JSON does
    /// not allow (a lone surrogate) is `not_json`, as it would be anywhere else.
    fn parse<'de, T: Deserialize<'de>>(
        &'de self,
        name: &'static str,
        expected: &'static str,
    ) -> Result<Option<T>, InvalidOutcome> {
        let Some(raw) = self.raw(name) else {
            return Ok(None);
        };
        serde_json::from_str(raw.get()).map(Some).map_err(|e| {
            if e.classify() == serde_json::error::Category::Data {
                InvalidOutcome::WrongType(name, expected)
            } else {
                InvalidOutcome::NotJson(format!("{:?} error in field {name}", e.classify()))
            }
        })
    }

    fn string(&self, name: &'static str) -> Result<Option<String>, InvalidOutcome> {
        self.parse(name, "a string")
    }

    fn text(&self, name: &'static str, max: usize) -> Result<Option<String>, InvalidOutcome> {
        match self.string(name)? {
            Some(s) if s.is_empty() || s.chars().count() > max => {
                Err(InvalidOutcome::BadLength(name, max))
            }
            text => Ok(text),
        }
    }

    fn required(&self, name: &'static str, max: usize) -> Result<String, InvalidOutcome> {
        self.text(name, max)?
            .ok_or(InvalidOutcome::MissingField(name))
    }

    fn named<T>(
        &self,
        name: &'static str,
        parse: fn(&str) -> Option<T>,
    ) -> Result<Option<T>, InvalidOutcome> {
        match self.text(name, MAX_ID_CHARS)? {
            None => Ok(None),
            Some(text) => parse(&text)
                .map(Some)
                .ok_or(InvalidOutcome::UnknownValue(name)),
        }
    }

    fn timestamp(&self, name: &'static str) -> Result<Timestamp, InvalidOutcome> {
        let text = self.required(name, 64)?;
        Timestamp::parse_rfc3339(&text).ok_or(InvalidOutcome::BadTimestamp(name))
    }
}

/// Decodes and validates an outcome event (the contract's table). Unknown fields are
/// ignored; `null` counts as absent; `assignee` is required for `reassigned` and
/// `resolution` for `resolved` and `closed`. Never panics.
pub fn decode_outcome(bytes: &[u8]) -> Result<OutcomeEvent, InvalidOutcome> {
    let fields = object_fields(bytes)?;
    let kind = fields
        .named("type", OutcomeType::parse)?
        .ok_or(InvalidOutcome::MissingField("type"))?;
    let root_causes = match fields.parse::<Vec<Value>>("root_causes", "an array of strings")? {
        None => Vec::new(),
        Some(items) if items.len() <= MAX_ROOT_CAUSES => items
            .into_iter()
            .map(|item| match item {
                Value::String(s) if !s.is_empty() && s.chars().count() <= MAX_ID_CHARS => Ok(s),
                Value::String(_) => Err(InvalidOutcome::BadLength("root_causes", MAX_ID_CHARS)),
                _ => Err(InvalidOutcome::WrongType(
                    "root_causes",
                    "an array of strings",
                )),
            })
            .collect::<Result<_, _>>()?,
        Some(_) => {
            return Err(InvalidOutcome::WrongType(
                "root_causes",
                "an array of at most 16 strings",
            ))
        }
    };
    let event = OutcomeEvent {
        event_id: fields.required("event_id", MAX_ID_CHARS)?,
        case_id: fields.required("case_id", MAX_ID_CHARS)?,
        kind,
        occurred_at: fields.timestamp("occurred_at")?,
        actor: fields.text("actor", MAX_ID_CHARS)?,
        assignee: fields.text("assignee", MAX_ID_CHARS)?,
        contact_result: fields.named("contact_result", ContactResult::parse)?,
        root_causes,
        resolution: fields.named("resolution", Resolution::parse)?,
        comment: fields.text("comment", MAX_COMMENT_CHARS)?,
    };
    if kind == OutcomeType::Reassigned && event.assignee.is_none() {
        return Err(InvalidOutcome::MissingField("assignee"));
    }
    if matches!(kind, OutcomeType::Resolved | OutcomeType::Closed) && event.resolution.is_none() {
        return Err(InvalidOutcome::MissingField("resolution"));
    }
    Ok(event)
}

/// What a case keeps of its detractor alert (`npsflow.followups`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaseAlert {
    /// The alert's id: the case's id.
    pub alert_id: String,
    /// The response.
    pub response_id: String,
    /// The customer. Personal data.
    pub customer_id: String,
    /// The account, if known.
    #[serde(default)]
    pub account_id: Option<String>,
    /// The survey, if known.
    #[serde(default)]
    pub survey_id: Option<String>,
    /// Who the alert was routed to.
    pub owner: String,
    /// 0..=6.
    pub score: u8,
    /// How urgent.
    pub severity: Severity,
    /// The response's segments.
    #[serde(default)]
    pub segments: BTreeMap<String, String>,
    /// When the customer answered: the SLAs start here.
    pub responded_at: Timestamp,
}

/// Decodes the fields a case needs from a detractor alert. Like the other decoders it says
/// why an alert is unusable by the contract's reasons (`not_json`, `not_an_object`,
/// `duplicate_field`, `missing_field`, `wrong_type`, `unknown_value`, `bad_timestamp`), never
/// quoting the message. Unknown fields are ignored; `null` counts as absent.
pub fn decode_alert(bytes: &[u8]) -> Result<CaseAlert, InvalidOutcome> {
    decode_valid_alert(bytes).map_or_else(|| decode_alert_exactly(bytes), Ok)
}

/// [`decode_alert`] field by field from a table of the message's raw fields, giving the reason
/// an alert is unusable.
fn decode_alert_exactly(bytes: &[u8]) -> Result<CaseAlert, InvalidOutcome> {
    let fields = object_fields(bytes)?;
    let required = |name| {
        fields
            .string(name)?
            .ok_or(InvalidOutcome::MissingField(name))
    };
    let (alert_id, response_id, customer_id, owner) = (
        required("alert_id")?,
        required("response_id")?,
        required("customer_id")?,
        required("owner")?,
    );
    let (account_id, survey_id) = (fields.string("account_id")?, fields.string("survey_id")?);
    let score = fields
        .parse::<u8>("score", "a whole number from 0 to 10")?
        .ok_or(InvalidOutcome::MissingField("score"))?;
    if score > 10 {
        return Err(InvalidOutcome::WrongType(
            "score",
            "a whole number from 0 to 10",
        ));
    }
    let severity = fields
        .named("severity", |text| {
            Severity::ALL.into_iter().find(|s| s.as_str() == text)
        })?
        .ok_or(InvalidOutcome::MissingField("severity"))?;
    let segments = fields
        .parse("segments", "an object of strings")?
        .unwrap_or_default();
    Ok(CaseAlert {
        alert_id,
        response_id,
        customer_id,
        account_id,
        survey_id,
        owner,
        score,
        severity,
        segments,
        responded_at: fields.timestamp("responded_at")?,
    })
}

/// [`decode_alert`]'s usual case in one pass: each field parsed where it stands, with no
/// table of raw fields and no second parse (the followup role decodes every alert twice, and
/// this was most of its cost). It returns an alert only where the exact path returns the same
/// one, and `None` for anything else (an invalid alert, a name given twice, bytes that are not
/// UTF-8), which the exact path then explains with its reason. A property test holds the two
/// to it (`case_tests`).
fn decode_valid_alert(bytes: &[u8]) -> Option<CaseAlert> {
    // The exact path refuses bytes that are not UTF-8 anywhere in the message (it checks the
    // raw text of every field it keeps); skipping a field does not check, so all is checked
    // here once.
    let text = std::str::from_utf8(bytes).ok()?;
    serde_json::from_str::<ValidAlert>(text).ok()?.0
}

/// What [`decode_valid_alert`] reads: the alert if it is valid.
struct ValidAlert(Option<CaseAlert>);

impl<'de> Deserialize<'de> for ValidAlert {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<ValidAlert, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = ValidAlert;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an alert")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<ValidAlert, A::Error> {
                // Each field once: a name seen twice (known or not) ends the pass.
                let mut seen: Vec<Cow<'de, str>> = Vec::new();
                let (mut alert_id, mut response_id, mut customer_id, mut owner) =
                    (None::<String>, None, None, None);
                let (mut account_id, mut survey_id) = (None::<String>, None);
                let (mut score, mut severity) = (None::<u8>, None::<String>);
                let mut segments = None::<BTreeMap<String, String>>;
                let mut responded_at = None::<String>;
                while let Some(Name(name)) = map.next_key::<Name<'de>>()? {
                    if seen.contains(&name) {
                        return Err(serde::de::Error::custom("a field given twice"));
                    }
                    match &*name {
                        "alert_id" => alert_id = map.next_value()?,
                        "response_id" => response_id = map.next_value()?,
                        "customer_id" => customer_id = map.next_value()?,
                        "owner" => owner = map.next_value()?,
                        "account_id" => account_id = map.next_value()?,
                        "survey_id" => survey_id = map.next_value()?,
                        "score" => score = map.next_value()?,
                        "severity" => severity = map.next_value()?,
                        "segments" => segments = map.next_value()?,
                        "responded_at" => responded_at = map.next_value()?,
                        _ => {
                            map.next_value::<serde::de::IgnoredAny>()?;
                        }
                    }
                    seen.push(name);
                }
                let text = |s: &String, max: usize| !s.is_empty() && s.chars().count() <= max;
                let severity = severity
                    .filter(|s| text(s, MAX_ID_CHARS))
                    .and_then(|s| Severity::ALL.into_iter().find(|v| v.as_str() == s));
                let responded_at = responded_at
                    .filter(|s| text(s, 64))
                    .and_then(|s| Timestamp::parse_rfc3339(&s));
                let score = score.filter(|s| *s <= 10);
                let fields = (alert_id, response_id, customer_id, owner);
                let alert = match (fields, score, severity, responded_at) {
                    (
                        (Some(alert_id), Some(response_id), Some(customer_id), Some(owner)),
                        Some(score),
                        Some(severity),
                        Some(responded_at),
                    ) => Some(CaseAlert {
                        alert_id,
                        response_id,
                        customer_id,
                        account_id,
                        survey_id,
                        owner,
                        score,
                        severity,
                        segments: segments.unwrap_or_default(),
                        responded_at,
                    }),
                    _ => None,
                };
                Ok(ValidAlert(alert))
            }
        }
        d.deserialize_map(V)
    }
}

impl CaseState {
    /// Whether a case in this state has missed a deadline by `now`: first contact (before
    /// `contacted`) or resolution (before `resolved`).
    pub fn overdue(
        self,
        first_contact_deadline: Timestamp,
        resolve_deadline: Timestamp,
        now: Timestamp,
    ) -> bool {
        (self < CaseState::Contacted && now >= first_contact_deadline)
            || (self < CaseState::Resolved && now >= resolve_deadline)
    }
}

/// One escalation of a case.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EscalationRecord {
    /// 1 or 2.
    pub level: u8,
    /// Why.
    pub reason: EscalationReason,
    /// The deadline that passed (for a severe score: when the case opened).
    pub deadline: Timestamp,
    /// When it escalated (the clock of the process that escalated it).
    pub escalated_at: Timestamp,
    /// To whom.
    pub escalate_to: String,
    /// Whether the notice is known to be delivered. Records are written after their notices
    /// (see [`Effect::Escalated`]), so an escalation is recorded notified; `false` comes from
    /// records of earlier versions, which wrote the record with its notice and again, notified,
    /// in the next batch. On restore, an escalation not notified whose notice is not on the
    /// escalations topic never went out: it is forgotten and fires again.
    #[serde(default = "delivered")]
    pub notified: bool,
}

fn delivered() -> bool {
    true
}

/// A follow-up case: its alert, where it stands, its deadlines, escalations and history. Its
/// JSON is the value on `npsflow.cases` and in `GET /v1/cases`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FollowupCase {
    /// The alert's `alert_id`.
    pub case_id: String,
    /// Where it stands.
    pub state: CaseState,
    /// Who owns it now (the routed owner, or the last `reassigned` assignee).
    pub owner: String,
    /// 0, 1 or 2: the highest level escalated.
    pub escalation_level: u8,
    /// Contacted by then, or level 1.
    pub first_contact_deadline: Timestamp,
    /// Resolved by then, or level 2.
    pub resolve_deadline: Timestamp,
    /// When npsflow opened the case (its clock).
    pub opened_at: Timestamp,
    /// When the customer was first reached (or the case skipped past `contacted`).
    pub first_contact_at: Option<Timestamp>,
    /// When it was resolved (cleared by `reopened`).
    pub resolved_at: Option<Timestamp>,
    /// When it was closed (cleared by `reopened`).
    pub closed_at: Option<Timestamp>,
    /// The last resolution given.
    pub resolution: Option<Resolution>,
    /// Root causes reported, each once.
    pub root_causes: Vec<String>,
    /// The customer's next response after closing: passive or promoter (true), detractor
    /// (false), not yet known (null).
    pub recovered: Option<bool>,
    /// The response that decided `recovered`.
    pub recovery_response_id: Option<String>,
    /// Escalations, in the order they happened.
    pub escalations: Vec<EscalationRecord>,
    /// Outcome events applied, in `occurred_at` order.
    pub history: Vec<OutcomeEvent>,
    /// Outcome events beyond [`MAX_HISTORY`], counted but not kept.
    #[serde(default)]
    pub history_dropped: u32,
    /// The alert that opened it.
    pub alert: CaseAlert,
}

impl FollowupCase {
    fn new(alert: CaseAlert, policy: &FollowupPolicy, now: Timestamp) -> FollowupCase {
        FollowupCase {
            case_id: alert.alert_id.clone(),
            state: CaseState::Open,
            owner: alert.owner.clone(),
            escalation_level: 0,
            first_contact_deadline: alert.responded_at.plus(policy.first_contact_sla),
            resolve_deadline: alert.responded_at.plus(policy.resolve_sla),
            opened_at: now,
            first_contact_at: None,
            resolved_at: None,
            closed_at: None,
            resolution: None,
            root_causes: Vec::new(),
            recovered: None,
            recovery_response_id: None,
            escalations: Vec::new(),
            history: Vec::new(),
            history_dropped: 0,
            alert,
        }
    }

    /// True if it has escalated to `level`.
    pub fn escalated(&self, level: u8) -> bool {
        self.escalations.iter().any(|e| e.level == level)
    }

    /// Records an escalation whose notice was sent (found on the escalations topic); true if
    /// it was not recorded yet.
    fn record_sent(&mut self, sent: &EscalationNotice) -> bool {
        if self.escalated(sent.level) {
            return false;
        }
        self.escalations.push(EscalationRecord {
            level: sent.level,
            reason: sent.reason,
            deadline: sent.deadline,
            escalated_at: sent.escalated_at,
            escalate_to: sent.escalate_to.clone(),
            notified: true,
        });
        self.escalation_level = self.escalation_level.max(sent.level);
        true
    }

    /// True if a deadline it has not met has passed at `now` (first contact while not
    /// contacted, resolve while not resolved).
    pub fn overdue(&self, now: Timestamp) -> bool {
        self.state
            .overdue(self.first_contact_deadline, self.resolve_deadline, now)
    }

    fn knows(&self, event_id: &str) -> bool {
        self.history.iter().any(|e| e.event_id == event_id)
    }

    /// Inserts an event in order (false if the history is full).
    fn insert(&mut self, event: OutcomeEvent) -> bool {
        if self.history.len() >= MAX_HISTORY {
            self.history_dropped = self.history_dropped.saturating_add(1);
            return false;
        }
        let at = self.history.partition_point(|e| e.order() <= event.order());
        self.history.insert(at, event);
        true
    }

    /// Recomputes everything the history decides.
    fn fold(&mut self) {
        let (mut state, mut owner) = (CaseState::Open, self.alert.owner.clone());
        let (mut contacted, mut resolved, mut closed) = (None, None, None);
        let mut resolution = None;
        let mut causes: Vec<String> = Vec::new();
        for event in &self.history {
            let target = match event.kind {
                OutcomeType::Acknowledged => Some(CaseState::Acknowledged),
                OutcomeType::Contacted => Some(CaseState::Contacted),
                OutcomeType::Resolved => Some(CaseState::Resolved),
                OutcomeType::Closed => Some(CaseState::Closed),
                OutcomeType::Reopened => {
                    if state >= CaseState::Resolved {
                        state = CaseState::Contacted;
                        resolved = None;
                        closed = None;
                    }
                    None
                }
                OutcomeType::Reassigned => {
                    if let Some(assignee) = &event.assignee {
                        owner.clone_from(assignee);
                    }
                    None
                }
                OutcomeType::ContactAttempted | OutcomeType::Note => None,
            };
            if let Some(target) = target {
                state = state.max(target);
                let at = Some(event.occurred_at);
                if state >= CaseState::Contacted && contacted.is_none() {
                    contacted = at;
                }
                if state >= CaseState::Resolved && resolved.is_none() {
                    resolved = at;
                }
                if state == CaseState::Closed && closed.is_none() {
                    closed = at;
                }
            }
            if event.resolution.is_some() {
                resolution = event.resolution;
            }
            for cause in &event.root_causes {
                if !causes.contains(cause) {
                    causes.push(cause.clone());
                }
            }
        }
        self.state = state;
        self.owner = owner;
        self.first_contact_at = contacted;
        self.resolved_at = resolved;
        self.closed_at = closed;
        self.resolution = resolution;
        self.root_causes = causes;
    }

    /// The escalation due next and when, if any is still possible.
    fn next_escalation(
        &self,
        policy: &FollowupPolicy,
    ) -> Option<(Timestamp, u8, EscalationReason)> {
        let first = (!self.escalated(1) && self.state < CaseState::Contacted).then(|| {
            if policy.escalate_scores.contains(&self.alert.score) {
                (self.opened_at, 1, EscalationReason::SevereScore)
            } else {
                (
                    self.first_contact_deadline,
                    1,
                    EscalationReason::FirstContactOverdue,
                )
            }
        });
        let second = (!self.escalated(2) && self.state < CaseState::Resolved).then_some((
            self.resolve_deadline,
            2,
            EscalationReason::ResolveOverdue,
        ));
        match (first, second) {
            (Some(a), Some(b)) => Some(if b.0 < a.0 { b } else { a }),
            (a, b) => a.or(b),
        }
    }

    /// When this case next needs attention: an escalation, or its tombstone.
    fn due(&self, policy: &FollowupPolicy) -> Option<Timestamp> {
        let escalation = self.next_escalation(policy).map(|e| e.0);
        let tombstone = self
            .closed_at
            .filter(|_| self.state == CaseState::Closed)
            .map(|at| at.plus(policy.closed_retention));
        match (escalation, tombstone) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// The escalation notice on `npsflow.escalations`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EscalationNotice {
    /// `<case_id>:<level>`: what consumers dedupe by.
    pub escalation_id: String,
    /// The case.
    pub case_id: String,
    /// 1 or 2.
    pub level: u8,
    /// Why.
    pub reason: EscalationReason,
    /// The case's owner.
    pub owner: String,
    /// Who it escalates to.
    pub escalate_to: String,
    /// The deadline that passed.
    pub deadline: Timestamp,
    /// When.
    pub escalated_at: Timestamp,
    /// The case's state then.
    pub state: CaseState,
    /// The response's fields.
    pub response_id: String,
    /// The customer. Personal data.
    pub customer_id: String,
    /// The account.
    pub account_id: Option<String>,
    /// The score.
    pub score: u8,
    /// The severity.
    pub severity: Severity,
    /// The response's segments.
    pub segments: BTreeMap<String, String>,
    /// When the customer answered.
    pub responded_at: Timestamp,
}

/// How cases behave: SLAs, escalation routing, horizons.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FollowupPolicy {
    /// Contacted within this of `responded_at`, or level 1.
    pub first_contact_sla: Span,
    /// Resolved within this of `responded_at`, or level 2.
    pub resolve_sla: Span,
    /// Scores that escalate to level 1 when the case opens.
    pub escalate_scores: Vec<u8>,
    /// Owner -> whom their cases escalate to.
    pub escalation_owners: BTreeMap<String, String>,
    /// Whom cases escalate to when the owner has no entry.
    pub escalation_owner: String,
    /// A customer's next response within this of closing decides recovery.
    pub recovery_horizon: Span,
    /// A closed case's record is tombstoned this long after closing.
    pub closed_retention: Span,
    /// Outcome events for an unknown case are kept this long for it to appear.
    pub orphan_horizon: Span,
}

impl Default for FollowupPolicy {
    fn default() -> FollowupPolicy {
        FollowupPolicy {
            first_contact_sla: Span::hours(48),
            resolve_sla: Span::days(7),
            escalate_scores: vec![0, 1, 2, 3],
            escalation_owners: BTreeMap::new(),
            escalation_owner: "cx-escalations".into(),
            recovery_horizon: Span::days(180),
            closed_retention: Span::days(180),
            orphan_horizon: Span::days(7),
        }
    }
}

impl FollowupPolicy {
    /// Level 1 goes to the owner's escalation owner, level 2 to that one's.
    fn escalate_to(&self, owner: &str, level: u8) -> String {
        let mut target = owner;
        for _ in 0..level {
            target = self
                .escalation_owners
                .get(target)
                .map_or(self.escalation_owner.as_str(), String::as_str);
        }
        target.to_owned()
    }
}

/// Messages the followup role sends itself on its internal topic to join cases (keyed by
/// `case_id`) with customers (keyed by `customer_id`) for recovery.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "notice", rename_all = "snake_case")]
pub enum FollowupNotice {
    /// To the customer's partition: a case of theirs closed; watch for their next response.
    CaseClosed {
        /// The customer.
        customer_id: String,
        /// The case.
        case_id: String,
        /// When it closed.
        closed_at: Timestamp,
    },
    /// To the customer's partition: the case is open again; stop watching.
    CaseReopened {
        /// The customer.
        customer_id: String,
        /// The case.
        case_id: String,
    },
    /// To the customer's partition: the customer answered a survey (valid response).
    Responded {
        /// The customer.
        customer_id: String,
        /// The response.
        response_id: String,
        /// Its score.
        score: u8,
        /// When they answered.
        responded_at: Timestamp,
    },
    /// To the case's partition: what the customer's next response said.
    Recovery {
        /// The case.
        case_id: String,
        /// Passive or promoter.
        recovered: bool,
        /// The response.
        response_id: String,
    },
}

impl FollowupNotice {
    /// The key it travels under (its partition).
    pub fn key(&self) -> &str {
        match self {
            FollowupNotice::CaseClosed { customer_id, .. }
            | FollowupNotice::CaseReopened { customer_id, .. }
            | FollowupNotice::Responded { customer_id, .. } => customer_id,
            FollowupNotice::Recovery { case_id, .. } => case_id,
        }
    }

    /// Its JSON.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a notice always serialises")
    }

    /// A notice from its JSON. The `responded` notice, one per accepted response, is read in
    /// one pass when it has exactly its own fields, each once (as [`FollowupNotice::to_json`]
    /// writes it); anything else takes serde's reading of the tagged enum, which first copies
    /// every field into a buffer to find the tag.
    pub fn from_json(bytes: &[u8]) -> Result<FollowupNotice, serde_json::Error> {
        match serde_json::from_slice::<RespondedNotice>(bytes) {
            Ok(RespondedNotice(Some(notice))) => Ok(notice),
            _ => serde_json::from_slice(bytes),
        }
    }
}

/// What [`FollowupNotice::from_json`] reads in one pass: a `responded` notice, if the message is
/// one with its four fields and the tag, each once, and nothing else.
struct RespondedNotice(Option<FollowupNotice>);

impl<'de> Deserialize<'de> for RespondedNotice {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<RespondedNotice, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = RespondedNotice;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a responded notice")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<RespondedNotice, A::Error> {
                let other = || serde::de::Error::custom("not a plain responded notice");
                let (mut tag, mut customer_id, mut response_id) = (None, None, None);
                let (mut score, mut responded_at) = (None, None);
                while let Some(Name(name)) = map.next_key::<Name<'de>>()? {
                    match &*name {
                        "notice" if tag.is_none() => tag = Some(map.next_value::<Name<'de>>()?.0),
                        "customer_id" if customer_id.is_none() => {
                            customer_id = Some(map.next_value::<String>()?);
                        }
                        "response_id" if response_id.is_none() => {
                            response_id = Some(map.next_value::<String>()?);
                        }
                        "score" if score.is_none() => score = Some(map.next_value::<u8>()?),
                        "responded_at" if responded_at.is_none() => {
                            responded_at = Some(map.next_value::<Timestamp>()?);
                        }
                        _ => return Err(other()),
                    }
                }
                match (
                    tag.as_deref(),
                    customer_id,
                    response_id,
                    score,
                    responded_at,
                ) {
                    (
                        Some("responded"),
                        Some(customer_id),
                        Some(response_id),
                        Some(score),
                        Some(responded_at),
                    ) => Ok(RespondedNotice(Some(FollowupNotice::Responded {
                        customer_id,
                        response_id,
                        score,
                        responded_at,
                    }))),
                    _ => Err(other()),
                }
            }
        }
        d.deserialize_map(V)
    }
}

/// Outcome events kept for a case not known yet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrphanOutcomes {
    /// Kept until then.
    pub kept_until: Timestamp,
    /// The events, as decoded.
    pub events: Vec<OutcomeEvent>,
}

/// A closed case waiting for its customer's next response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoveryWatch {
    /// The case.
    pub case_id: String,
    /// When it closed.
    pub closed_at: Timestamp,
}

/// How a recovery watch ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RecoveryResult {
    /// The next response was a passive or promoter.
    Recovered,
    /// The next response was a detractor.
    NotRecovered,
    /// No response within the horizon.
    NoResponse,
}

impl RecoveryResult {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            RecoveryResult::Recovered => "recovered",
            RecoveryResult::NotRecovered => "not_recovered",
            RecoveryResult::NoResponse => "no_response",
        }
    }
}

/// What an input or a timer caused.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// The case's record changed: write [`CaseBook::case`] (a tombstone if gone).
    CaseChanged(String),
    /// A case opened.
    Opened,
    /// An alert or outcome event was seen before.
    Duplicate(&'static str),
    /// An outcome event came for a case not known yet and is kept.
    OrphanKept,
    /// Kept outcome events whose case never came were dropped.
    OrphansExpired(usize),
    /// The outcome events kept for a case changed: write [`CaseBook::orphans`].
    OrphansChanged(String),
    /// A case was escalated: send the notice. The case's record (a [`Effect::CaseChanged`]
    /// of the same call) says it was notified, so write that record only once the notice is
    /// delivered (or in one transaction with it).
    Escalated(Box<EscalationNotice>),
    /// A case was first contacted, this long after the response.
    FirstContact {
        /// Seconds since `responded_at`.
        seconds: f64,
        /// By the first-contact deadline.
        within_sla: bool,
    },
    /// A case closed.
    Closed {
        /// How.
        resolution: Option<Resolution>,
        /// Resolved by its resolve deadline.
        within_sla: bool,
        /// Seconds from `responded_at` to closing.
        seconds: f64,
    },
    /// Send this notice on the internal topic.
    Notice(FollowupNotice),
    /// A customer's recovery watch changed: write [`CaseBook::watches`].
    WatchChanged(String),
    /// A recovery watch ended.
    RecoveryDecided(RecoveryResult),
}

/// Which timer a deadline belongs to.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Due {
    Case(String),
    Orphans(String),
    Watch(String),
}

/// Deadlines by time, one per key.
#[derive(Debug, Default, Clone)]
struct Deadlines {
    by_time: BTreeSet<(Timestamp, Due)>,
    by_key: HashMap<Due, Timestamp>,
}

impl Deadlines {
    fn set(&mut self, key: Due, at: Option<Timestamp>) {
        if let Some(old) = self.by_key.remove(&key) {
            self.by_time.remove(&(old, key.clone()));
        }
        if let Some(at) = at {
            self.by_time.insert((at, key.clone()));
            self.by_key.insert(key, at);
        }
    }

    fn first(&self) -> Option<Timestamp> {
        self.by_time.first().map(|(at, _)| *at)
    }

    fn take_due(&mut self, now: Timestamp) -> Vec<Due> {
        let mut due = Vec::new();
        while let Some((at, _)) = self.by_time.first() {
            if *at > now {
                break;
            }
            let (_, key) = self.by_time.pop_first().expect("not empty");
            self.by_key.remove(&key);
            due.push(key);
        }
        due
    }
}

/// The cases and recovery watches of one partition.
#[derive(Debug, Default, Clone)]
pub struct CaseBook {
    /// Boxed: a case is ~400 bytes, and a B-tree moves its neighbours' values on every insert
    /// and removal (a case changes by removal and insertion).
    cases: BTreeMap<String, Box<FollowupCase>>,
    orphans: BTreeMap<String, OrphanOutcomes>,
    watches: BTreeMap<String, Vec<RecoveryWatch>>,
    deadlines: Deadlines,
    /// Cases whose record a restore found behind its notices: written again, confirming them.
    unconfirmed: BTreeSet<String>,
    /// Outcome events kept for a case that a restore found with its record (a crash came
    /// between the case's record and the tombstone of what it took in): tombstoned.
    stale_orphans: BTreeSet<String>,
    /// Escalation notices read back for cases not known yet: the process that sent them
    /// stopped before its case record was written, and the replayed alert opens the case
    /// again with them (at most the notices read back; forgotten with the book).
    sent_before_case: BTreeMap<String, Vec<EscalationNotice>>,
}

impl CaseBook {
    /// An empty book.
    pub fn new() -> CaseBook {
        CaseBook::default()
    }

    /// A case.
    pub fn case(&self, case_id: &str) -> Option<&FollowupCase> {
        self.cases.get(case_id).map(|case| &**case)
    }

    /// Every case.
    pub fn cases(&self) -> impl Iterator<Item = &FollowupCase> {
        self.cases.values().map(|case| &**case)
    }

    /// The outcome events kept for a case not known yet.
    pub fn orphans(&self, case_id: &str) -> Option<&OrphanOutcomes> {
        self.orphans.get(case_id)
    }

    /// A customer's recovery watches.
    pub fn watches(&self, customer_id: &str) -> Option<&Vec<RecoveryWatch>> {
        self.watches.get(customer_id)
    }

    /// How many cases, orphan lists and watched customers it holds.
    pub fn sizes(&self) -> (usize, usize, usize) {
        (self.cases.len(), self.orphans.len(), self.watches.len())
    }

    /// Opens the case of a detractor alert (a repeat is a duplicate), applying any outcome
    /// events that came before it.
    pub fn open(
        &mut self,
        alert: CaseAlert,
        policy: &FollowupPolicy,
        now: Timestamp,
        out: &mut Vec<Effect>,
    ) {
        if self.cases.contains_key(&alert.alert_id) {
            out.push(Effect::Duplicate("alert"));
            return;
        }
        let case_id = alert.alert_id.clone();
        let mut case = Box::new(FollowupCase::new(alert, policy, now));
        for sent in self.sent_before_case.remove(&case_id).unwrap_or_default() {
            case.record_sent(&sent);
        }
        out.push(Effect::Opened);
        let before = Snapshot::of(&case);
        if let Some(kept) = self.orphans.remove(&case_id) {
            self.deadlines.set(Due::Orphans(case_id.clone()), None);
            out.push(Effect::OrphansChanged(case_id.clone()));
            for event in kept.events {
                if !case.knows(&event.event_id) {
                    case.insert(event);
                }
            }
            case.fold();
        }
        before.report(&case, out);
        self.store(case, policy, out);
    }

    /// Applies an outcome event (a repeat `event_id` is a duplicate); keeps it if its case
    /// is not known yet.
    pub fn apply(
        &mut self,
        event: OutcomeEvent,
        policy: &FollowupPolicy,
        now: Timestamp,
        out: &mut Vec<Effect>,
    ) {
        match self.cases.get(&event.case_id) {
            None => return self.keep_orphan(event, policy, now, out),
            Some(case) if case.knows(&event.event_id) => {
                out.push(Effect::Duplicate("outcome"));
                return;
            }
            Some(_) => {}
        }
        let mut case = self.cases.remove(&event.case_id).expect("present");
        let before = Snapshot::of(&case);
        case.insert(event);
        case.fold();
        before.report(&case, out);
        self.store(case, policy, out);
    }

    fn keep_orphan(
        &mut self,
        event: OutcomeEvent,
        policy: &FollowupPolicy,
        now: Timestamp,
        out: &mut Vec<Effect>,
    ) {
        let case_id = event.case_id.clone();
        let kept = self
            .orphans
            .entry(case_id.clone())
            .or_insert_with(|| OrphanOutcomes {
                kept_until: now.plus(policy.orphan_horizon),
                events: Vec::new(),
            });
        if kept.events.iter().any(|e| e.event_id == event.event_id) {
            out.push(Effect::Duplicate("outcome"));
            return;
        }
        if kept.events.len() < MAX_HISTORY {
            kept.events.push(event);
        }
        let until = kept.kept_until;
        self.deadlines
            .set(Due::Orphans(case_id.clone()), Some(until));
        out.push(Effect::OrphanKept);
        out.push(Effect::OrphansChanged(case_id));
    }

    /// Records what the customer's next response after closing said.
    pub fn record_recovery(
        &mut self,
        case_id: &str,
        recovered: bool,
        response_id: &str,
        policy: &FollowupPolicy,
        out: &mut Vec<Effect>,
    ) {
        let Some(mut case) = self.cases.remove(case_id) else {
            return;
        };
        if case.recovered.is_none() {
            case.recovered = Some(recovered);
            case.recovery_response_id = Some(response_id.to_owned());
        }
        self.store(case, policy, out);
    }

    /// Handles a notice addressed to a customer of this partition.
    pub fn handle_notice(
        &mut self,
        notice: FollowupNotice,
        policy: &FollowupPolicy,
        out: &mut Vec<Effect>,
    ) {
        match notice {
            FollowupNotice::CaseClosed {
                customer_id,
                case_id,
                closed_at,
            } => {
                let watches = self.watches.entry(customer_id.clone()).or_default();
                match watches.iter_mut().find(|w| w.case_id == case_id) {
                    Some(watch) => watch.closed_at = closed_at,
                    None => watches.push(RecoveryWatch { case_id, closed_at }),
                }
                self.rearm_watch(&customer_id, policy);
                out.push(Effect::WatchChanged(customer_id));
            }
            FollowupNotice::CaseReopened {
                customer_id,
                case_id,
            } => {
                if let Some(watches) = self.watches.get_mut(&customer_id) {
                    watches.retain(|w| w.case_id != case_id);
                    self.forget_empty_watch(&customer_id);
                    self.rearm_watch(&customer_id, policy);
                    out.push(Effect::WatchChanged(customer_id));
                }
            }
            FollowupNotice::Responded {
                customer_id,
                response_id,
                score,
                responded_at,
            } => {
                let Some(watches) = self.watches.get_mut(&customer_id) else {
                    return;
                };
                let recovered = score >= 7;
                let before = watches.len();
                watches.retain(|watch| {
                    let next = responded_at > watch.closed_at
                        && responded_at <= watch.closed_at.plus(policy.recovery_horizon);
                    if next {
                        out.push(Effect::Notice(FollowupNotice::Recovery {
                            case_id: watch.case_id.clone(),
                            recovered,
                            response_id: response_id.clone(),
                        }));
                        out.push(Effect::RecoveryDecided(if recovered {
                            RecoveryResult::Recovered
                        } else {
                            RecoveryResult::NotRecovered
                        }));
                    }
                    !next
                });
                if watches.len() != before {
                    self.forget_empty_watch(&customer_id);
                    self.rearm_watch(&customer_id, policy);
                    out.push(Effect::WatchChanged(customer_id));
                }
            }
            FollowupNotice::Recovery {
                case_id,
                recovered,
                response_id,
            } => self.record_recovery(&case_id, recovered, &response_id, policy, out),
        }
    }

    /// When [`CaseBook::handle_timeout`] next has work.
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        self.deadlines.first()
    }

    /// Fires every deadline at or before `now`: escalations, tombstones, expiries.
    pub fn handle_timeout(
        &mut self,
        now: Timestamp,
        policy: &FollowupPolicy,
        out: &mut Vec<Effect>,
    ) {
        for due in self.deadlines.take_due(now) {
            match due {
                Due::Case(case_id) => {
                    let Some(mut case) = self.cases.remove(&case_id) else {
                        continue;
                    };
                    let gone = case.state == CaseState::Closed
                        && case
                            .closed_at
                            .is_some_and(|at| at.plus(policy.closed_retention) <= now);
                    if gone {
                        out.push(Effect::CaseChanged(case_id));
                        continue;
                    }
                    while let Some((deadline, level, reason)) =
                        case.next_escalation(policy).filter(|e| e.0 <= now)
                    {
                        let escalate_to = policy.escalate_to(&case.owner, level);
                        case.escalations.push(EscalationRecord {
                            level,
                            reason,
                            deadline,
                            escalated_at: now,
                            escalate_to: escalate_to.clone(),
                            notified: true,
                        });
                        case.escalation_level = case.escalation_level.max(level);
                        out.push(Effect::Escalated(Box::new(notice(&case, level))));
                    }
                    self.store(case, policy, out);
                }
                Due::Orphans(case_id) => {
                    if let Some(kept) = self.orphans.remove(&case_id) {
                        out.push(Effect::OrphansExpired(kept.events.len()));
                        out.push(Effect::OrphansChanged(case_id));
                    }
                }
                Due::Watch(customer_id) => {
                    let Some(watches) = self.watches.get_mut(&customer_id) else {
                        continue;
                    };
                    watches.retain(|watch| {
                        let over = watch.closed_at.plus(policy.recovery_horizon) < now;
                        if over {
                            out.push(Effect::RecoveryDecided(RecoveryResult::NoResponse));
                        }
                        !over
                    });
                    self.forget_empty_watch(&customer_id);
                    self.rearm_watch(&customer_id, policy);
                    out.push(Effect::WatchChanged(customer_id));
                }
            }
        }
    }

    /// Puts back a case read from the state topic.
    pub fn restore_case(&mut self, mut case: FollowupCase, policy: &FollowupPolicy) {
        for sent in self
            .sent_before_case
            .remove(&case.case_id)
            .unwrap_or_default()
        {
            if case.record_sent(&sent) {
                self.unconfirmed.insert(case.case_id.clone());
            }
        }
        let due = case.due(policy);
        self.deadlines.set(Due::Case(case.case_id.clone()), due);
        self.drop_stale_orphans(&case.case_id);
        self.cases.insert(case.case_id.clone(), Box::new(case));
    }

    /// Puts back outcome events kept for an unknown case. Those of a case that is known (a
    /// crash came between writing the case, which took them in, and their removal) are
    /// dropped, and their record is tombstoned with the next writes
    /// ([`CaseBook::write_repairs`]): the case has them.
    pub fn restore_orphans(&mut self, case_id: String, kept: OrphanOutcomes) {
        if self.cases.contains_key(&case_id) {
            self.stale_orphans.insert(case_id);
            return;
        }
        self.deadlines
            .set(Due::Orphans(case_id.clone()), Some(kept.kept_until));
        self.orphans.insert(case_id, kept);
    }

    /// Outcome events kept for a case restored after them: the case has them, so they are
    /// dropped and their record tombstoned ([`CaseBook::write_repairs`]).
    fn drop_stale_orphans(&mut self, case_id: &str) {
        if self.orphans.remove(case_id).is_some() {
            self.deadlines.set(Due::Orphans(case_id.to_owned()), None);
            self.stale_orphans.insert(case_id.to_owned());
        }
    }

    /// Puts back a customer's recovery watches.
    pub fn restore_watches(
        &mut self,
        customer_id: String,
        watches: Vec<RecoveryWatch>,
        policy: &FollowupPolicy,
    ) {
        self.watches.insert(customer_id.clone(), watches);
        self.forget_empty_watch(&customer_id);
        self.rearm_watch(&customer_id, policy);
    }

    /// Forgets a state record that was tombstoned.
    pub fn forget(&mut self, case_id: &str) {
        self.cases.remove(case_id);
        self.deadlines.set(Due::Case(case_id.to_owned()), None);
    }

    /// Records an escalation found on the escalations topic but not in the case's record (the
    /// process that sent it stopped before writing the case): it never happens twice.
    /// True if the case did not know it. A notice of a case with no record at all (the
    /// process stopped before writing it) is kept for the case the replayed alert opens.
    pub fn restore_escalation(&mut self, sent: &EscalationNotice, policy: &FollowupPolicy) -> bool {
        let Some(case) = self.cases.get_mut(&sent.case_id) else {
            let kept = self
                .sent_before_case
                .entry(sent.case_id.clone())
                .or_default();
            if !kept.iter().any(|k| k.level == sent.level) {
                kept.push(sent.clone());
            }
            return false;
        };
        if !case.record_sent(sent) {
            return false;
        }
        let due = case.due(policy);
        self.deadlines.set(Due::Case(sent.case_id.clone()), due);
        // Its record is written again, with the escalation.
        self.unconfirmed.insert(sent.case_id.clone());
        true
    }

    /// After a restore: escalations recorded as not yet notified are confirmed if their notice
    /// is among `sent` (the last notices on the escalations topic), and forgotten otherwise
    /// (the process stopped before the notice went out), so that they fire again.
    pub fn reconcile_escalations(
        &mut self,
        sent: &BTreeSet<(String, u8)>,
        policy: &FollowupPolicy,
    ) {
        for case in self.cases.values_mut() {
            if case.escalations.iter().all(|e| e.notified) {
                continue;
            }
            let id = case.case_id.clone();
            case.escalations.retain_mut(|e| {
                e.notified = e.notified || sent.contains(&(id.clone(), e.level));
                e.notified
            });
            case.escalation_level = case.escalations.iter().map(|e| e.level).max().unwrap_or(0);
            let due = case.due(policy);
            self.deadlines.set(Due::Case(id.clone()), due);
            self.unconfirmed.insert(id);
        }
    }

    /// True if a restore left records to write (see [`CaseBook::write_repairs`]).
    pub fn has_repairs(&self) -> bool {
        !self.unconfirmed.is_empty() || !self.stale_orphans.is_empty()
    }

    /// Writes what a restore found behind: the records of the cases it changed
    /// ([`CaseBook::restore_escalation`], [`CaseBook::reconcile_escalations`]), with every
    /// escalation marked notified, and tombstones for outcome events kept for cases that have
    /// their record ([`CaseBook::restore_orphans`]). Call it only once the notices sent before
    /// are delivered (the engine sends a batch's records only after the previous batch's are
    /// delivered).
    pub fn write_repairs(&mut self, out: &mut Vec<Effect>) {
        for case_id in std::mem::take(&mut self.unconfirmed) {
            if let Some(case) = self.cases.get_mut(&case_id) {
                for escalation in &mut case.escalations {
                    escalation.notified = true;
                }
                out.push(Effect::CaseChanged(case_id));
            }
        }
        for case_id in std::mem::take(&mut self.stale_orphans) {
            if !self.orphans.contains_key(&case_id) {
                out.push(Effect::OrphansChanged(case_id));
            }
        }
    }

    fn store(&mut self, case: Box<FollowupCase>, policy: &FollowupPolicy, out: &mut Vec<Effect>) {
        let case_id = case.case_id.clone();
        self.deadlines
            .set(Due::Case(case_id.clone()), case.due(policy));
        self.cases.insert(case_id.clone(), case);
        out.push(Effect::CaseChanged(case_id));
    }

    fn forget_empty_watch(&mut self, customer_id: &str) {
        if self.watches.get(customer_id).is_some_and(Vec::is_empty) {
            self.watches.remove(customer_id);
        }
    }

    fn rearm_watch(&mut self, customer_id: &str, policy: &FollowupPolicy) {
        let until = self.watches.get(customer_id).and_then(|watches| {
            watches
                .iter()
                .map(|w| {
                    Timestamp(
                        w.closed_at
                            .plus(policy.recovery_horizon)
                            .0
                            .saturating_add(1),
                    )
                })
                .min()
        });
        self.deadlines
            .set(Due::Watch(customer_id.to_owned()), until);
    }
}

/// What a change must report, from the case before it.
struct Snapshot {
    state: CaseState,
    first_contact_at: Option<Timestamp>,
}

impl Snapshot {
    fn of(case: &FollowupCase) -> Snapshot {
        Snapshot {
            state: case.state,
            first_contact_at: case.first_contact_at,
        }
    }

    fn report(&self, case: &FollowupCase, out: &mut Vec<Effect>) {
        let since_response =
            |at: Timestamp| (at.millis() - case.alert.responded_at.millis()).max(0) as f64 / 1000.0;
        if self.first_contact_at.is_none() {
            if let Some(at) = case.first_contact_at {
                out.push(Effect::FirstContact {
                    seconds: since_response(at),
                    within_sla: at <= case.first_contact_deadline,
                });
            }
        }
        let was_closed = self.state == CaseState::Closed;
        let closed = case.state == CaseState::Closed;
        if closed && !was_closed {
            let closed_at = case.closed_at.unwrap_or(case.opened_at);
            out.push(Effect::Closed {
                resolution: case.resolution,
                within_sla: case
                    .resolved_at
                    .is_some_and(|at| at <= case.resolve_deadline),
                seconds: since_response(closed_at),
            });
            out.push(Effect::Notice(FollowupNotice::CaseClosed {
                customer_id: case.alert.customer_id.clone(),
                case_id: case.case_id.clone(),
                closed_at,
            }));
        }
        if was_closed && !closed {
            out.push(Effect::Notice(FollowupNotice::CaseReopened {
                customer_id: case.alert.customer_id.clone(),
                case_id: case.case_id.clone(),
            }));
        }
    }
}

fn notice(case: &FollowupCase, level: u8) -> EscalationNotice {
    let record = case
        .escalations
        .iter()
        .find(|e| e.level == level)
        .expect("just recorded");
    EscalationNotice {
        escalation_id: format!("{}:{level}", case.case_id),
        case_id: case.case_id.clone(),
        level,
        reason: record.reason,
        owner: case.owner.clone(),
        escalate_to: record.escalate_to.clone(),
        deadline: record.deadline,
        escalated_at: record.escalated_at,
        state: case.state,
        response_id: case.alert.response_id.clone(),
        customer_id: case.alert.customer_id.clone(),
        account_id: case.alert.account_id.clone(),
        score: case.alert.score,
        severity: case.alert.severity,
        segments: case.alert.segments.clone(),
        responded_at: case.alert.responded_at,
    }
}

#[cfg(test)]
#[path = "case_tests.rs"]
mod tests;
