//! The input messages: decoding raw bytes from `survey.responses` into a typed
//! [`SurveyResponse`], and from `survey.invitations` into an [`Invitation`], or into an
//! [`InvalidReason`] that says exactly what is wrong (the same rules and reasons for both).
//!
//! Decoding borrows from the input where it can and never panics, whatever the bytes.
//! Rules beyond the contract's table (all documented in the README):
//! - `null` counts as absent, for every field;
//! - optional string fields, segment keys and segment values are 1..=128 characters;
//!   `comment` is at most 10,000 characters; `segments` has at most 64 entries;
//! - a field given twice (at the top level or in `segments`) is invalid;
//! - unknown fields are ignored.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use crate::nps::Score;
use crate::time::Timestamp;

/// Longest `response_id`, `customer_id` and other identifier fields, in characters.
pub const MAX_ID_CHARS: usize = 128;
/// Longest `comment`, in characters.
pub const MAX_COMMENT_CHARS: usize = 10_000;
/// Most entries in `segments`.
pub const MAX_SEGMENT_ENTRIES: usize = 64;

/// One `dimension: value` pair from `segments`.
pub type SegmentEntry<'a> = (Cow<'a, str>, Cow<'a, str>);

/// A valid survey response, borrowing its text from the message where possible.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SurveyResponse<'a> {
    /// Unique per response; a repeat is a duplicate.
    pub response_id: Cow<'a, str>,
    /// The 0..=10 answer.
    pub score: Score,
    /// Event time: when the customer answered.
    pub responded_at: Timestamp,
    /// `responded_at` exactly as sent (a valid RFC 3339 timestamp).
    pub responded_at_text: Cow<'a, str>,
    /// Who answered. Personal data: never logged.
    pub customer_id: Cow<'a, str>,
    /// The customer's account, if given.
    pub account_id: Option<Cow<'a, str>>,
    /// The owner of follow-up, if given; overrides routing.
    pub account_manager: Option<Cow<'a, str>>,
    /// Which survey this answers, if given.
    pub survey_id: Option<Cow<'a, str>>,
    /// Segment dimensions the response carries, sorted by key.
    pub segments: Vec<SegmentEntry<'a>>,
    /// Free text. Personal data: never logged.
    pub comment: Option<Cow<'a, str>>,
}

impl<'a> SurveyResponse<'a> {
    /// The value of one segment dimension, if the response carries it.
    pub fn segment(&self, dimension: &str) -> Option<&str> {
        self.segments
            .binary_search_by(|(key, _)| key.as_ref().cmp(dimension))
            .ok()
            .map(|i| self.segments[i].1.as_ref())
    }
}

/// What the JSON type of a field should have been.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expected {
    /// A JSON string.
    String,
    /// A JSON integer.
    Integer,
    /// A JSON object whose values are strings.
    ObjectOfStrings,
}

impl fmt::Display for Expected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Expected::String => "a string",
            Expected::Integer => "an integer",
            Expected::ObjectOfStrings => "an object of string values",
        })
    }
}

/// Why a message is not a valid survey response. Its [`code`](InvalidReason::code) is the
/// machine-readable reason in the `npsflow-error` dead-letter header; its `Display` is a
/// human sentence that never quotes the message's content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InvalidReason {
    /// The bytes are not UTF-8.
    NotUtf8 {
        /// Byte offset of the first invalid byte.
        at_byte: usize,
    },
    /// The text is not JSON.
    NotJson {
        /// 1-based line of the syntax error.
        line: usize,
        /// 1-based column of the syntax error.
        column: usize,
    },
    /// The JSON is not an object.
    NotObject,
    /// A required field is absent (or `null`).
    MissingField(&'static str),
    /// A field has the wrong JSON type.
    WrongType {
        /// The field.
        field: &'static str,
        /// What it should have been.
        expected: Expected,
    },
    /// `score` is an integer outside 0..=10.
    ScoreOutOfRange,
    /// A timestamp field (`responded_at`, `sent_at`) is not an RFC 3339 timestamp.
    BadTimestamp(&'static str),
    /// A string field is longer than allowed.
    FieldTooLong {
        /// The field.
        field: &'static str,
        /// The most characters allowed.
        max_chars: usize,
    },
    /// A string field is empty.
    EmptyField(&'static str),
    /// A field appears more than once.
    DuplicateField(&'static str),
    /// `segments` has more entries than allowed.
    TooManySegments,
    /// The message is larger than the input topic's size limit (`topics.max_message_bytes`);
    /// it is not decoded at all.
    TooLarge {
        /// The message's size in bytes.
        bytes: usize,
        /// The limit.
        max_bytes: usize,
    },
}

impl InvalidReason {
    /// The machine-readable reason, stable across versions.
    pub fn code(&self) -> &'static str {
        match self {
            InvalidReason::NotUtf8 { .. } => "not_utf8",
            InvalidReason::NotJson { .. } => "not_json",
            InvalidReason::NotObject => "not_object",
            InvalidReason::MissingField(_) => "missing_field",
            InvalidReason::WrongType { .. } => "wrong_type",
            InvalidReason::ScoreOutOfRange => "score_out_of_range",
            InvalidReason::BadTimestamp(_) => "bad_timestamp",
            InvalidReason::FieldTooLong { .. } => "field_too_long",
            InvalidReason::EmptyField(_) => "empty_field",
            InvalidReason::DuplicateField(_) => "duplicate_field",
            InvalidReason::TooManySegments => "too_many_segments",
            InvalidReason::TooLarge { .. } => "too_large",
        }
    }

    /// Every code, for documentation and for pre-registering metric labels.
    pub const CODES: [&'static str; 12] = [
        "not_utf8",
        "not_json",
        "not_object",
        "missing_field",
        "wrong_type",
        "score_out_of_range",
        "bad_timestamp",
        "field_too_long",
        "empty_field",
        "duplicate_field",
        "too_many_segments",
        "too_large",
    ];
}

impl fmt::Display for InvalidReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InvalidReason::NotUtf8 { at_byte } => {
                write!(f, "message is not UTF-8 (invalid byte at offset {at_byte})")
            }
            InvalidReason::NotJson { line, column } => {
                write!(
                    f,
                    "message is not JSON (syntax error at line {line}, column {column})"
                )
            }
            InvalidReason::NotObject => f.write_str("message is JSON but not an object"),
            InvalidReason::MissingField(field) => write!(f, "required field `{field}` is missing"),
            InvalidReason::WrongType { field, expected } => {
                write!(f, "field `{field}` must be {expected}")
            }
            InvalidReason::ScoreOutOfRange => f.write_str("field `score` must be 0..=10"),
            InvalidReason::BadTimestamp(field) => {
                write!(f, "field `{field}` must be an RFC 3339 timestamp")
            }
            InvalidReason::FieldTooLong { field, max_chars } => {
                write!(f, "field `{field}` is longer than {max_chars} characters")
            }
            InvalidReason::EmptyField(field) => write!(f, "field `{field}` is empty"),
            InvalidReason::DuplicateField(field) => {
                write!(f, "field `{field}` appears more than once")
            }
            InvalidReason::TooManySegments => {
                write!(
                    f,
                    "field `segments` has more than {MAX_SEGMENT_ENTRIES} entries"
                )
            }
            InvalidReason::TooLarge { bytes, max_bytes } => {
                write!(
                    f,
                    "message has {bytes} bytes, more than the limit of {max_bytes}"
                )
            }
        }
    }
}

impl std::error::Error for InvalidReason {}

/// Decodes one message from `survey.responses`.
pub fn decode(bytes: &[u8]) -> Result<SurveyResponse<'_>, InvalidReason> {
    fields(bytes)?.validate()
}

/// A valid survey invitation from `survey.invitations`: the denominator of the response rate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invitation<'a> {
    /// Unique per invitation; a repeat is a duplicate.
    pub invitation_id: Cow<'a, str>,
    /// Who was invited. Personal data: never logged.
    pub customer_id: Cow<'a, str>,
    /// Event time: when the invitation was sent.
    pub sent_at: Timestamp,
    /// Which survey, if given.
    pub survey_id: Option<Cow<'a, str>>,
    /// Segment dimensions the invitation carries, sorted by key.
    pub segments: Vec<SegmentEntry<'a>>,
}

/// Decodes one message from `survey.invitations`: `invitation_id`, `customer_id` and
/// `sent_at` required; `survey_id` and `segments` optional; the same rules as responses.
pub fn decode_invitation(bytes: &[u8]) -> Result<Invitation<'_>, InvalidReason> {
    fields(bytes)?.validate_invitation()
}

/// The known fields of a JSON object message, or why it is not one.
fn fields(bytes: &[u8]) -> Result<RawFields<'_>, InvalidReason> {
    let text = std::str::from_utf8(bytes).map_err(|e| InvalidReason::NotUtf8 {
        at_byte: e.valid_up_to(),
    })?;
    let document: Document<'_> =
        serde_json::from_str(text).map_err(|e| InvalidReason::NotJson {
            line: e.line(),
            column: e.column(),
        })?;
    document.fields
}

/// A top-level JSON value: an object's known fields, or why it cannot be a response.
struct Document<'a> {
    fields: Result<RawFields<'a>, InvalidReason>,
}

/// The known fields of the object, as found, before validation.
#[derive(Default)]
struct RawFields<'a> {
    response_id: Option<Json<'a>>,
    score: Option<Json<'a>>,
    responded_at: Option<Json<'a>>,
    customer_id: Option<Json<'a>>,
    account_id: Option<Json<'a>>,
    account_manager: Option<Json<'a>>,
    survey_id: Option<Json<'a>>,
    comment: Option<Json<'a>>,
    segments: Option<RawSegments<'a>>,
    invitation_id: Option<Json<'a>>,
    sent_at: Option<Json<'a>>,
}

impl<'a> RawFields<'a> {
    fn validate(self) -> Result<SurveyResponse<'a>, InvalidReason> {
        let response_id = required_id("response_id", self.response_id)?;
        let score = match present(self.score) {
            None => return Err(InvalidReason::MissingField("score")),
            Some(Json::Int(value)) => Score::new(value).ok_or(InvalidReason::ScoreOutOfRange)?,
            Some(Json::BigInt) => return Err(InvalidReason::ScoreOutOfRange),
            Some(_) => {
                return Err(InvalidReason::WrongType {
                    field: "score",
                    expected: Expected::Integer,
                })
            }
        };
        let responded_at_text = match present(self.responded_at) {
            None => return Err(InvalidReason::MissingField("responded_at")),
            Some(value) => string("responded_at", value)?,
        };
        let responded_at = Timestamp::parse_rfc3339(&responded_at_text)
            .ok_or(InvalidReason::BadTimestamp("responded_at"))?;
        let customer_id = required_id("customer_id", self.customer_id)?;
        let account_id = optional_text("account_id", self.account_id, MAX_ID_CHARS)?;
        let account_manager = optional_text("account_manager", self.account_manager, MAX_ID_CHARS)?;
        let survey_id = optional_text("survey_id", self.survey_id, MAX_ID_CHARS)?;
        let segments = match self.segments {
            None => Vec::new(),
            Some(raw) => raw.validate()?,
        };
        let comment = optional_text("comment", self.comment, MAX_COMMENT_CHARS)?;
        Ok(SurveyResponse {
            response_id,
            score,
            responded_at,
            responded_at_text,
            customer_id,
            account_id,
            account_manager,
            survey_id,
            segments,
            comment,
        })
    }
}

impl<'a> RawFields<'a> {
    fn validate_invitation(self) -> Result<Invitation<'a>, InvalidReason> {
        let invitation_id = required_id("invitation_id", self.invitation_id)?;
        let customer_id = required_id("customer_id", self.customer_id)?;
        let sent_at = match present(self.sent_at) {
            None => return Err(InvalidReason::MissingField("sent_at")),
            Some(value) => string("sent_at", value)?,
        };
        let sent_at =
            Timestamp::parse_rfc3339(&sent_at).ok_or(InvalidReason::BadTimestamp("sent_at"))?;
        let survey_id = optional_text("survey_id", self.survey_id, MAX_ID_CHARS)?;
        let segments = match self.segments {
            None => Vec::new(),
            Some(raw) => raw.validate()?,
        };
        Ok(Invitation {
            invitation_id,
            customer_id,
            sent_at,
            survey_id,
            segments,
        })
    }
}

/// `null` counts as absent.
fn present(value: Option<Json<'_>>) -> Option<Json<'_>> {
    value.filter(|v| !matches!(v, Json::Null))
}

fn string<'a>(field: &'static str, value: Json<'a>) -> Result<Cow<'a, str>, InvalidReason> {
    match value {
        Json::Str(text) => Ok(text),
        _ => Err(InvalidReason::WrongType {
            field,
            expected: Expected::String,
        }),
    }
}

fn check_length(field: &'static str, text: &str, max_chars: usize) -> Result<(), InvalidReason> {
    if text.is_empty() {
        return Err(InvalidReason::EmptyField(field));
    }
    // Bytes bound characters from above, so most strings need no character count.
    if text.len() > max_chars && text.chars().count() > max_chars {
        return Err(InvalidReason::FieldTooLong { field, max_chars });
    }
    Ok(())
}

fn required_id<'a>(
    field: &'static str,
    value: Option<Json<'a>>,
) -> Result<Cow<'a, str>, InvalidReason> {
    let text = string(
        field,
        present(value).ok_or(InvalidReason::MissingField(field))?,
    )?;
    check_length(field, &text, MAX_ID_CHARS)?;
    Ok(text)
}

fn optional_text<'a>(
    field: &'static str,
    value: Option<Json<'a>>,
    max_chars: usize,
) -> Result<Option<Cow<'a, str>>, InvalidReason> {
    present(value)
        .map(|value| {
            let text = string(field, value)?;
            check_length(field, &text, max_chars)?;
            Ok(text)
        })
        .transpose()
}

/// A JSON value reduced to what validation needs to know about it.
enum Json<'a> {
    Null,
    Int(i64),
    /// An integer that does not fit in an i64.
    BigInt,
    Str(Cow<'a, str>),
    Other,
}

/// `score` as written: an integer literal is read exactly from its text, so one too large for
/// any integer type (`100000000000000000000`, which JSON parsers turn into a float) is out
/// of range, while `7.0` or `1e1` is a wrong type.
struct ScoreToken<'a>(Json<'a>);

impl<'de> Deserialize<'de> for ScoreToken<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw: &'de serde_json::value::RawValue = Deserialize::deserialize(deserializer)?;
        let text = raw.get();
        let digits = text.strip_prefix('-').unwrap_or(text);
        let json = if text == "null" {
            Json::Null
        } else if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
            text.parse().map_or(Json::BigInt, Json::Int)
        } else {
            Json::Other
        };
        Ok(ScoreToken(json))
    }
}

impl<'de> Deserialize<'de> for Json<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(JsonVisitor)
    }
}

struct JsonVisitor;

impl<'de> Visitor<'de> for JsonVisitor {
    type Value = Json<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_unit<E>(self) -> Result<Json<'de>, E> {
        Ok(Json::Null)
    }
    fn visit_none<E>(self) -> Result<Json<'de>, E> {
        Ok(Json::Null)
    }
    fn visit_bool<E>(self, _: bool) -> Result<Json<'de>, E> {
        Ok(Json::Other)
    }
    fn visit_i64<E>(self, v: i64) -> Result<Json<'de>, E> {
        Ok(Json::Int(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Json<'de>, E> {
        Ok(i64::try_from(v).map_or(Json::BigInt, Json::Int))
    }
    fn visit_f64<E>(self, _: f64) -> Result<Json<'de>, E> {
        Ok(Json::Other)
    }
    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Json<'de>, E> {
        Ok(Json::Str(Cow::Borrowed(v)))
    }
    fn visit_str<E>(self, v: &str) -> Result<Json<'de>, E> {
        Ok(Json::Str(Cow::Owned(v.to_owned())))
    }
    fn visit_string<E>(self, v: String) -> Result<Json<'de>, E> {
        Ok(Json::Str(Cow::Owned(v)))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Json<'de>, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Json::Other)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Json<'de>, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Json::Other)
    }
}

/// An object key, borrowed when it has no escapes.
struct Key<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        match Json::deserialize(deserializer)? {
            Json::Str(text) => Ok(Key(text)),
            _ => Err(de::Error::custom("object keys are strings")),
        }
    }
}

/// `segments` as found: its entries, or why it is not an object of strings.
struct RawSegments<'a>(Result<Vec<SegmentEntry<'a>>, InvalidReason>);

impl<'a> RawSegments<'a> {
    fn validate(self) -> Result<Vec<SegmentEntry<'a>>, InvalidReason> {
        let mut entries = self.0?;
        if entries.len() > MAX_SEGMENT_ENTRIES {
            return Err(InvalidReason::TooManySegments);
        }
        for (key, value) in &entries {
            check_length("segments", key, MAX_ID_CHARS)?;
            check_length("segments", value, MAX_ID_CHARS)?;
        }
        entries.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        if entries.windows(2).any(|pair| pair[0].0 == pair[1].0) {
            return Err(InvalidReason::DuplicateField("segments"));
        }
        Ok(entries)
    }
}

impl<'de> Deserialize<'de> for RawSegments<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(SegmentsVisitor)
    }
}

struct SegmentsVisitor;

const SEGMENTS_WRONG_TYPE: InvalidReason = InvalidReason::WrongType {
    field: "segments",
    expected: Expected::ObjectOfStrings,
};

impl<'de> Visitor<'de> for SegmentsVisitor {
    type Value = RawSegments<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawSegments<'de>, A::Error> {
        let mut entries = Ok(Vec::new());
        while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
            let value = map.next_value::<Json<'de>>()?;
            if let Ok(list) = &mut entries {
                match value {
                    Json::Str(value) => list.push((key, value)),
                    Json::Null => {}
                    _ => entries = Err(SEGMENTS_WRONG_TYPE),
                }
            }
        }
        Ok(RawSegments(entries))
    }
    fn visit_unit<E>(self) -> Result<RawSegments<'de>, E> {
        Ok(RawSegments(Ok(Vec::new())))
    }
    fn visit_none<E>(self) -> Result<RawSegments<'de>, E> {
        Ok(RawSegments(Ok(Vec::new())))
    }
    fn visit_bool<E>(self, _: bool) -> Result<RawSegments<'de>, E> {
        Ok(RawSegments(Err(SEGMENTS_WRONG_TYPE)))
    }
    fn visit_i64<E>(self, _: i64) -> Result<RawSegments<'de>, E> {
        Ok(RawSegments(Err(SEGMENTS_WRONG_TYPE)))
    }
    fn visit_u64<E>(self, _: u64) -> Result<RawSegments<'de>, E> {
        Ok(RawSegments(Err(SEGMENTS_WRONG_TYPE)))
    }
    fn visit_f64<E>(self, _: f64) -> Result<RawSegments<'de>, E> {
        Ok(RawSegments(Err(SEGMENTS_WRONG_TYPE)))
    }
    fn visit_str<E>(self, _: &str) -> Result<RawSegments<'de>, E> {
        Ok(RawSegments(Err(SEGMENTS_WRONG_TYPE)))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<RawSegments<'de>, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(RawSegments(Err(SEGMENTS_WRONG_TYPE)))
    }
}

impl<'de> Deserialize<'de> for Document<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(DocumentVisitor)
    }
}

struct DocumentVisitor;

/// Stores a field's value, or notes that the field was given twice.
fn put<T>(
    slot: &mut Option<T>,
    value: T,
    field: &'static str,
    duplicate: &mut Option<&'static str>,
) {
    if slot.is_some() {
        duplicate.get_or_insert(field);
    } else {
        *slot = Some(value);
    }
}

impl<'de> Visitor<'de> for DocumentVisitor {
    type Value = Document<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Document<'de>, A::Error> {
        let mut fields = RawFields::default();
        let mut duplicate = None;
        while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
            let d = &mut duplicate;
            match key.as_ref() {
                "response_id" => put(&mut fields.response_id, map.next_value()?, "response_id", d),
                "score" => put(
                    &mut fields.score,
                    map.next_value::<ScoreToken<'de>>()?.0,
                    "score",
                    d,
                ),
                "responded_at" => put(
                    &mut fields.responded_at,
                    map.next_value()?,
                    "responded_at",
                    d,
                ),
                "customer_id" => put(&mut fields.customer_id, map.next_value()?, "customer_id", d),
                "account_id" => put(&mut fields.account_id, map.next_value()?, "account_id", d),
                "account_manager" => put(
                    &mut fields.account_manager,
                    map.next_value()?,
                    "account_manager",
                    d,
                ),
                "survey_id" => put(&mut fields.survey_id, map.next_value()?, "survey_id", d),
                "comment" => put(&mut fields.comment, map.next_value()?, "comment", d),
                "segments" => put(&mut fields.segments, map.next_value()?, "segments", d),
                "invitation_id" => put(
                    &mut fields.invitation_id,
                    map.next_value()?,
                    "invitation_id",
                    d,
                ),
                "sent_at" => put(&mut fields.sent_at, map.next_value()?, "sent_at", d),
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(Document {
            fields: match duplicate {
                Some(field) => Err(InvalidReason::DuplicateField(field)),
                None => Ok(fields),
            },
        })
    }

    fn visit_unit<E>(self) -> Result<Document<'de>, E> {
        Ok(not_object())
    }
    fn visit_bool<E>(self, _: bool) -> Result<Document<'de>, E> {
        Ok(not_object())
    }
    fn visit_i64<E>(self, _: i64) -> Result<Document<'de>, E> {
        Ok(not_object())
    }
    fn visit_u64<E>(self, _: u64) -> Result<Document<'de>, E> {
        Ok(not_object())
    }
    fn visit_f64<E>(self, _: f64) -> Result<Document<'de>, E> {
        Ok(not_object())
    }
    fn visit_str<E>(self, _: &str) -> Result<Document<'de>, E> {
        Ok(not_object())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Document<'de>, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(not_object())
    }
}

fn not_object<'a>() -> Document<'a> {
    Document {
        fields: Err(InvalidReason::NotObject),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = r#"{"response_id":"r-1","score":3,"responded_at":"2026-11-22T12:00:00Z",
        "customer_id":"c-9","account_id":"acme","account_manager":"ann@example.com",
        "survey_id":"q4","segments":{"region":"east","product":"sedan"},
        "comment":"slow \"support\"","extra":{"ignored":[1,2,3]}}"#;

    fn reason(json: &str) -> InvalidReason {
        decode(json.as_bytes()).expect_err("should be invalid")
    }

    fn with(field: &str, value: &str) -> String {
        let mut object: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(VALID).expect("valid");
        if value == "<absent>" {
            object.remove(field);
        } else {
            object.insert(field.into(), serde_json::from_str(value).expect("json"));
        }
        serde_json::to_string(&object).expect("serialises")
    }

    #[test]
    fn decodes_every_field() {
        let r = decode(VALID.as_bytes()).expect("valid");
        assert_eq!(r.response_id, "r-1");
        assert_eq!(r.score.value(), 3);
        assert_eq!(
            r.responded_at,
            Timestamp::parse_rfc3339("2026-11-22T12:00:00Z").expect("ts")
        );
        assert_eq!(r.responded_at_text, "2026-11-22T12:00:00Z");
        assert_eq!(r.customer_id, "c-9");
        assert_eq!(r.account_id.as_deref(), Some("acme"));
        assert_eq!(r.account_manager.as_deref(), Some("ann@example.com"));
        assert_eq!(r.survey_id.as_deref(), Some("q4"));
        assert_eq!(r.comment.as_deref(), Some("slow \"support\""));
        assert_eq!(r.segment("region"), Some("east"));
        assert_eq!(r.segment("product"), Some("sedan"));
        assert_eq!(r.segment("tier"), None);
        assert!(
            matches!(r.response_id, Cow::Borrowed(_)),
            "unescaped text is borrowed"
        );
    }

    #[test]
    fn contract_examples_of_bad_scores_are_invalid() {
        let wrong_type = InvalidReason::WrongType {
            field: "score",
            expected: Expected::Integer,
        };
        assert_eq!(reason(&with("score", "7.0")), wrong_type);
        assert_eq!(reason(&with("score", "\"7\"")), wrong_type);
        assert_eq!(reason(&with("score", "true")), wrong_type);
        assert_eq!(reason(&with("score", "11")), InvalidReason::ScoreOutOfRange);
        // Written as-is (a JSON library would turn the long integer into a float).
        let raw = |score: &str| VALID.replace(r#""score":3"#, &format!(r#""score":{score}"#));
        assert_eq!(
            reason(&raw("100000000000000000000")),
            InvalidReason::ScoreOutOfRange,
            "an integer too large for any integer type is still an integer"
        );
        assert_eq!(
            reason(&raw("-100000000000000000000")),
            InvalidReason::ScoreOutOfRange
        );
        assert_eq!(reason(&raw("1e1")), wrong_type);
        assert_eq!(reason(&raw("[7]")), wrong_type);
        assert_eq!(reason(&raw("-0.0")), wrong_type);
        assert_eq!(
            decode(raw(" 7 ").as_bytes()).map(|r| r.score.value()),
            Ok(7)
        );
        assert_eq!(reason(&with("score", "-1")), InvalidReason::ScoreOutOfRange);
        assert_eq!(
            reason(&with("score", "18446744073709551615")),
            InvalidReason::ScoreOutOfRange
        );
        assert_eq!(
            reason(&with("score", "null")),
            InvalidReason::MissingField("score")
        );
        for score in 0..=10 {
            assert!(decode(with("score", &score.to_string()).as_bytes()).is_ok());
        }
    }

    #[test]
    fn each_structural_problem_has_its_own_reason() {
        assert_eq!(reason("{"), InvalidReason::NotJson { line: 1, column: 1 });
        assert_eq!(
            decode(&[b'{', 0xff, b'}']).expect_err("not utf8"),
            InvalidReason::NotUtf8 { at_byte: 1 }
        );
        let mut hidden = br#"{"ignored":"x"}"#.to_vec();
        hidden[12] = 0xC3; // a lone lead byte inside an unknown field's string
        assert_eq!(
            decode(&hidden).expect_err("not utf8"),
            InvalidReason::NotUtf8 { at_byte: 12 }
        );
        assert_eq!(reason("[1,2]"), InvalidReason::NotObject);
        assert_eq!(reason("\"text\""), InvalidReason::NotObject);
        assert_eq!(reason("null"), InvalidReason::NotObject);
        assert!(matches!(
            reason("{} trailing"),
            InvalidReason::NotJson { .. }
        ));
        for field in ["response_id", "score", "responded_at", "customer_id"] {
            assert_eq!(
                reason(&with(field, "<absent>")),
                InvalidReason::MissingField(field)
            );
        }
        assert_eq!(
            reason(&with("customer_id", "42")),
            InvalidReason::WrongType {
                field: "customer_id",
                expected: Expected::String
            }
        );
        assert_eq!(
            reason(&with("response_id", "\"\"")),
            InvalidReason::EmptyField("response_id")
        );
        assert_eq!(
            reason(&with("responded_at", "\"2026-11-22 noon\"")),
            InvalidReason::BadTimestamp("responded_at")
        );
        assert_eq!(
            reason(&with("segments", "[\"east\"]")),
            InvalidReason::WrongType {
                field: "segments",
                expected: Expected::ObjectOfStrings
            }
        );
        assert_eq!(
            reason(&with("segments", r#"{"region":1}"#)),
            InvalidReason::WrongType {
                field: "segments",
                expected: Expected::ObjectOfStrings
            }
        );
        assert_eq!(
            reason(r#"{"score":1,"score":2}"#),
            InvalidReason::DuplicateField("score")
        );
    }

    #[test]
    fn duplicate_segment_keys_are_invalid() {
        let text = VALID.replace(r#""product":"sedan""#, r#""region":"west""#);
        assert_eq!(reason(&text), InvalidReason::DuplicateField("segments"));
    }

    #[test]
    fn lengths_are_counted_in_characters() {
        let exactly = "é".repeat(MAX_ID_CHARS);
        assert!(decode(with("customer_id", &format!("\"{exactly}\"")).as_bytes()).is_ok());
        assert_eq!(
            reason(&with("customer_id", &format!("\"{exactly}x\""))),
            InvalidReason::FieldTooLong {
                field: "customer_id",
                max_chars: MAX_ID_CHARS
            }
        );
        let many: serde_json::Map<String, serde_json::Value> = (0..=MAX_SEGMENT_ENTRIES)
            .map(|i| (format!("k{i}"), serde_json::Value::from("v")))
            .collect();
        let text = with("segments", &serde_json::Value::Object(many).to_string());
        assert_eq!(reason(&text), InvalidReason::TooManySegments);
    }

    #[test]
    fn null_optional_fields_are_absent_and_escapes_decode() {
        let r_text = with("comment", "null");
        let r = decode(r_text.as_bytes()).expect("valid");
        assert_eq!(r.comment, None);
        let escaped = with("response_id", r#""r\u002d1""#);
        assert_eq!(
            decode(escaped.as_bytes()).expect("valid").response_id,
            "r-1"
        );
    }

    #[test]
    fn messages_never_quote_content() {
        let secret = "jane.doe@example.com";
        for text in [
            with("score", &format!("\"{secret}\"")),
            with("responded_at", &format!("\"{secret}\"")),
            format!("{{\"{secret}\""),
        ] {
            let message = reason(&text).to_string();
            assert!(!message.contains(secret), "{message}");
        }
    }

    #[test]
    fn invitations_decode_with_the_same_rules_and_reasons() {
        let valid =
            br#"{"invitation_id":"i-1","customer_id":"c-9","sent_at":"2026-11-22T11:00:00Z",
            "survey_id":"q4","segments":{"region":"east"},"score":"ignored"}"#;
        let invitation = decode_invitation(valid).expect("valid");
        assert_eq!(invitation.invitation_id, "i-1");
        assert_eq!(invitation.customer_id, "c-9");
        assert_eq!(
            invitation.sent_at,
            Timestamp::parse_rfc3339("2026-11-22T11:00:00Z").expect("ts")
        );
        assert_eq!(invitation.survey_id.as_deref(), Some("q4"));
        assert_eq!(invitation.segments.len(), 1);
        let code = |json: &str| decode_invitation(json.as_bytes()).expect_err("invalid");
        assert_eq!(
            code(r#"{"customer_id":"c","sent_at":"2026-11-22T11:00:00Z"}"#),
            InvalidReason::MissingField("invitation_id")
        );
        assert_eq!(
            code(r#"{"invitation_id":"i","customer_id":"c"}"#),
            InvalidReason::MissingField("sent_at")
        );
        let bad_time = code(r#"{"invitation_id":"i","customer_id":"c","sent_at":"noon"}"#);
        assert_eq!(bad_time, InvalidReason::BadTimestamp("sent_at"));
        assert_eq!(
            bad_time.to_string(),
            "field `sent_at` must be an RFC 3339 timestamp"
        );
        assert_eq!(
            code(r#"{"invitation_id":"","customer_id":"c","sent_at":"2026-11-22T11:00:00Z"}"#),
            InvalidReason::EmptyField("invitation_id")
        );
        assert_eq!(
            code(r#"{"invitation_id":"i","customer_id":"c","sent_at":"2026-11-22T11:00:00Z","segments":[1]}"#)
                .code(),
            "wrong_type"
        );
        assert_eq!(code("{").code(), "not_json");
        // A response is not an invitation, and an invitation not a response.
        assert_eq!(
            code(
                r#"{"response_id":"r","score":3,"responded_at":"2026-11-22T11:00:00Z","customer_id":"c"}"#
            ),
            InvalidReason::MissingField("invitation_id")
        );
        assert_eq!(
            decode(valid).expect_err("no response"),
            InvalidReason::MissingField("response_id")
        );
    }
}
