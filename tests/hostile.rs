//! The hostile-input tier: the `npsflow` binary against a real broker process (Tansu), fed
//! a table of labelled hostile messages and hostile HTTP requests, judged only by the
//! external contract (topics, headers, metrics, HTTP).
//!
//! Each case is produced on its own and the test waits until `npsflow_events_total` has
//! counted it, so every case's outcome is observed separately (from the counters' deltas).
//! At the end: nothing lost (the counters add up to what was sent, per outcome as
//! expected), every expected dead letter is on the dead-letter topic exactly once, with its
//! reason, original key, original bytes (or, for messages of 1 MiB and more, the value-less
//! form with `npsflow-original-size`) and source partition and offset; no panics, comments or
//! customer ids in the log; the metric series bounded; the process alive and healthy; a
//! clean stop on SIGINT. A table `label | expected | observed` is printed and every mismatch
//! is listed.
//!
//! Needs `NPSFLOW_HOSTILE_BROKERS` and `NPSFLOW_HOSTILE_BIN`; run by `scripts/hostile.sh`:
//! `cargo test -p npsflow-runtime --test hostile -- --ignored --nocapture`.

mod util;

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::message::{Header, Headers, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::util::Timeout;
use rdkafka::{ClientConfig, Message};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use util::header;

/// Partitions of the input topic.
const PARTITIONS: i32 = 3;
/// The input size limit npsflow uses by default (`topics.max_message_bytes`).
const MAX_MESSAGE_BYTES: usize = 1_048_588;
/// Messages this large may be dead-lettered without their value.
const VALUE_LESS_FROM: usize = 1 << 20;
/// `segments.max_values_per_dimension`, set explicitly for the run.
const CAP: usize = 100;
/// Distinct values of `tier` sent by the cardinality flood.
const FLOOD: usize = 500;
/// The longest window (28d) and its step (28d / 60 buckets), in milliseconds.
const LONGEST_MS: i64 = 28 * 86_400_000;
const LONGEST_STEP_MS: i64 = LONGEST_MS / 60;
const MINUTE_MS: i64 = 60_000;
/// How long one case may take to be counted (a valid message after a 10 MiB one included).
const CASE_PATIENCE: Duration = Duration::from_secs(30);
/// After one case was not counted in time, the pipeline is probably stuck: later cases get
/// this much, so the run still ends in minutes and reports every case.
const STUCK_PATIENCE: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------
// The case table
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq)]
enum Expect {
    Accepted,
    Invalid(&'static str),
    Duplicate,
    TooOld,
    Future,
}

impl Expect {
    fn outcome(&self) -> &'static str {
        match self {
            Expect::Accepted => "accepted",
            Expect::Invalid(_) => "invalid",
            Expect::Duplicate => "duplicate",
            Expect::TooOld => "too_old",
            Expect::Future => "future",
        }
    }

    /// The `npsflow-error` of its dead letter, if it gets one.
    fn dead_letter_reason(&self) -> Option<&'static str> {
        match self {
            Expect::Accepted | Expect::Duplicate => None,
            Expect::Invalid(reason) => Some(reason),
            Expect::TooOld => Some("too_old"),
            Expect::Future => Some("future"),
        }
    }

    fn label(&self) -> String {
        match self {
            Expect::Invalid(reason) => format!("invalid({reason})"),
            other => other.outcome().to_owned(),
        }
    }
}

/// Where a case is produced.
#[derive(Debug, Clone)]
enum Placement {
    /// By the key (murmur2, as Java producers do), or at random without a key.
    ByKey,
    /// On this partition.
    Fixed(i32),
    /// On a partition other than the one the named case went to.
    NotWith(&'static str),
}

struct Case {
    label: String,
    key: Option<String>,
    placement: Placement,
    /// `None`: a record without a value (a tombstone).
    payload: Option<Vec<u8>>,
    headers: Vec<(String, Vec<u8>)>,
    expected: Expect,
    /// How many messages the case is (the cardinality flood is one case of many messages).
    count: usize,
    /// Where each message landed: (partition, offset).
    landed: Vec<(i32, i64)>,
    observed: String,
    /// How long it took to be counted, if that was long.
    note: String,
    /// Problems found with this case's dead letters.
    dead_letter_problems: Vec<String>,
}

/// A JSON object built from raw JSON texts, so that anything (duplicate keys, wrong types,
/// odd numbers) can be written exactly.
#[derive(Clone)]
struct Msg(Vec<(String, String)>);

impl Msg {
    fn set(mut self, key: &str, raw: impl Into<String>) -> Msg {
        let raw = raw.into();
        match self.0.iter_mut().find(|(k, _)| k == key) {
            Some(entry) => entry.1 = raw,
            None => self.0.push((key.to_owned(), raw)),
        }
        self
    }

    fn without(mut self, key: &str) -> Msg {
        self.0.retain(|(k, _)| k != key);
        self
    }

    /// Appends `key` even if it is there already.
    fn push(mut self, key: &str, raw: impl Into<String>) -> Msg {
        self.0.push((key.to_owned(), raw.into()));
        self
    }

    fn text(&self) -> String {
        let fields: Vec<String> = self
            .0
            .iter()
            .map(|(k, v)| format!("{}:{v}", js(k)))
            .collect();
        format!("{{{}}}", fields.join(","))
    }

    fn bytes(&self) -> Vec<u8> {
        self.text().into_bytes()
    }

    /// This message, its `comment` padded so that the whole is exactly `size` bytes.
    fn padded_comment(self, size: usize) -> Vec<u8> {
        self.padded("comment", size)
    }

    /// This message, with string field `field` padded so that the whole is `size` bytes.
    fn padded(self, field: &str, size: usize) -> Vec<u8> {
        let empty = self.clone().set(field, "\"\"").bytes().len();
        assert!(size > empty, "room for padding");
        let body = self.set(field, js(&"p".repeat(size - empty))).bytes();
        assert_eq!(body.len(), size);
        body
    }
}

/// A JSON string literal.
fn js(text: &str) -> String {
    serde_json::to_string(text).expect("a string serialises")
}

fn rfc3339(millis: i64) -> String {
    npsflow_core::Timestamp(millis).to_rfc3339()
}

struct Table {
    run: String,
    secret: String,
    now: i64,
    cases: Vec<Case>,
}

impl Table {
    fn customer(&self) -> String {
        format!("cust-hostile-{}", self.cases.len())
    }

    fn id(&self, label: &str) -> String {
        format!("{}-{label}", self.run)
    }

    /// A valid response for the next case, with a recent timestamp, a comment that must
    /// never reach a log, and segments.
    fn msg(&self, label: &str) -> Msg {
        Msg(vec![
            ("response_id".into(), js(&self.id(label))),
            ("score".into(), "8".into()),
            ("responded_at".into(), js(&rfc3339(self.now - MINUTE_MS))),
            ("customer_id".into(), js(&self.customer())),
            ("comment".into(), js(&format!("{} {label}", self.secret))),
            (
                "segments".into(),
                r#"{"region":"east","product":"sedan","channel":"web"}"#.into(),
            ),
        ])
    }

    /// Adds a case keyed by its customer id, placed by the key.
    fn add(&mut self, label: &str, payload: Vec<u8>, expected: Expect) -> &mut Case {
        let key = Some(self.customer());
        self.add_raw(label, key, Placement::ByKey, Some(payload), expected)
    }

    fn add_raw(
        &mut self,
        label: &str,
        key: Option<String>,
        placement: Placement,
        payload: Option<Vec<u8>>,
        expected: Expect,
    ) -> &mut Case {
        assert!(
            self.cases.iter().all(|c| c.label != label),
            "labels are unique: {label}"
        );
        self.cases.push(Case {
            label: label.to_owned(),
            key,
            placement,
            payload,
            headers: Vec::new(),
            expected,
            count: 1,
            landed: Vec::new(),
            observed: String::new(),
            note: String::new(),
            dead_letter_problems: Vec::new(),
        });
        self.cases.last_mut().expect("just pushed")
    }
}

/// Bytes of `text` with `bad` spliced into the comment's value (after its opening quote).
fn splice_into_comment(text: &str, bad: &[u8]) -> Vec<u8> {
    let at = text.find("\"comment\":\"").expect("has a comment") + "\"comment\":\"".len();
    let mut bytes = text.as_bytes()[..at].to_vec();
    bytes.extend_from_slice(bad);
    bytes.extend_from_slice(&text.as_bytes()[at..]);
    bytes
}

fn utf16(text: &str, big_endian: bool) -> Vec<u8> {
    let mut bytes = if big_endian {
        vec![0xFE, 0xFF]
    } else {
        vec![0xFF, 0xFE]
    };
    for unit in text.encode_utf16() {
        let pair = if big_endian {
            unit.to_be_bytes()
        } else {
            unit.to_le_bytes()
        };
        bytes.extend_from_slice(&pair);
    }
    bytes
}

fn segments_with(n: usize) -> String {
    let entries: Vec<String> = (0..n).map(|i| format!("\"d{i}\":\"v{i}\"")).collect();
    format!("{{{}}}", entries.join(","))
}

/// The start of the longest window at `now` (contract: `to` is the end of the step holding
/// `now`, `from = to - length`).
fn longest_from(now: i64) -> i64 {
    (now.div_euclid(LONGEST_STEP_MS) + 1) * LONGEST_STEP_MS - LONGEST_MS
}

fn build_table(run: &str, now: i64) -> Table {
    use Expect::*;
    let mut t = Table {
        run: run.to_owned(),
        secret: format!("SECRET-COMMENT-{run}"),
        now,
        cases: Vec::new(),
    };

    // --- encodings
    let text = t.msg("utf8-ff").text();
    t.add(
        "utf8-ff",
        splice_into_comment(&text, &[0xFF]),
        Invalid("not_utf8"),
    );
    let text = t.msg("utf16le-bom").text();
    t.add("utf16le-bom", utf16(&text, false), Invalid("not_utf8"));
    let text = t.msg("utf16be-bom").text();
    t.add("utf16be-bom", utf16(&text, true), Invalid("not_utf8"));
    let mut bom = vec![0xEF, 0xBB, 0xBF];
    bom.extend(t.msg("utf8-bom").bytes());
    t.add("utf8-bom", bom, Invalid("not_json"));
    for (label, bad) in [
        ("overlong-slash", &[0xC0, 0xAF][..]),
        ("overlong-nul", &[0xC0, 0x80][..]),
        ("overlong-3byte", &[0xE0, 0x80, 0xAF][..]),
        ("utf8-surrogate", &[0xED, 0xA0, 0x80][..]),
        ("utf8-truncated", &[0xE2, 0x82][..]),
        ("utf8-above-max", &[0xF4, 0x90, 0x80, 0x80][..]),
    ] {
        let text = t.msg(label).text();
        t.add(label, splice_into_comment(&text, bad), Invalid("not_utf8"));
    }
    let text = t.msg("nul-raw-in-string").text();
    t.add(
        "nul-raw-in-string",
        splice_into_comment(&text, b"\0"),
        Invalid("not_json"),
    );
    let mut body = t.msg("nul-after-object").bytes();
    body.push(0);
    t.add("nul-after-object", body, Invalid("not_json"));
    let body = t
        .msg("nul-escaped")
        .set("comment", format!("\"{} \\u0000 x\"", t.secret))
        .bytes();
    t.add("nul-escaped", body, Accepted);
    let body = t
        .msg("lone-surrogate")
        .set("comment", format!("\"{} \\ud800 x\"", t.secret))
        .bytes();
    t.add("lone-surrogate", body, Invalid("not_json"));
    let body = t
        .msg("non-ascii")
        .set("response_id", js(&t.id("non-ascii-ünï-中文-😀")))
        .set("comment", js(&format!("{} ünïcödé 中文 😀", t.secret)))
        .bytes();
    t.add("non-ascii", body, Accepted);

    // --- sizes
    let customer = t.customer();
    t.add_raw(
        "empty-value",
        Some(customer),
        Placement::ByKey,
        Some(Vec::new()),
        Invalid("not_json"),
    );
    let customer = t.customer();
    t.add_raw(
        "null-value",
        Some(customer),
        Placement::ByKey,
        None,
        Invalid("not_json"),
    );
    t.add("whitespace-only", b" \n\t ".to_vec(), Invalid("not_json"));
    let body = t.msg("size-999800").padded_comment(999_800);
    t.add("size-999800", body, Invalid("field_too_long"));
    let body = t.msg("size-1MiB").padded_comment(1 << 20);
    t.add("size-1MiB", body, Invalid("field_too_long"));
    // Exactly at the limit and one byte over, without a key (so the size is the value's).
    let body = t
        .msg("size-at-limit")
        .padded("x-unknown-padding", MAX_MESSAGE_BYTES);
    t.add_raw(
        "size-at-limit",
        None,
        Placement::ByKey,
        Some(body),
        Accepted,
    );
    let body = t
        .msg("size-limit+1")
        .padded("x-unknown-padding", MAX_MESSAGE_BYTES + 1);
    t.add_raw(
        "size-limit+1",
        None,
        Placement::ByKey,
        Some(body),
        Invalid("too_large"),
    );
    let body = t.msg("size-10MiB").padded_comment(10 << 20);
    t.add("size-10MiB", body, Invalid("too_large"));
    let body = t.msg("valid-after-10MiB").bytes();
    t.add("valid-after-10MiB", body, Accepted);

    // --- not JSON, not an object
    t.add("garbage", b"hello, world".to_vec(), Invalid("not_json"));
    let mut body = t.msg("trailing-garbage").bytes();
    body.extend_from_slice(b" x");
    t.add("trailing-garbage", body, Invalid("not_json"));
    let mut body = t.msg("two-objects").bytes();
    body.extend(t.msg("two-objects-2").bytes());
    t.add("two-objects", body, Invalid("not_json"));
    let mut body = t.msg("trailing-newline").bytes();
    body.extend_from_slice(b"\r\n");
    t.add("trailing-newline", body, Accepted);
    let mut body = t.msg("truncated-json").bytes();
    body.pop();
    t.add("truncated-json", body, Invalid("not_json"));
    let body = format!("[{}]", t.msg("top-array").text()).into_bytes();
    t.add("top-array", body, Invalid("not_object"));
    t.add("top-string", b"\"x\"".to_vec(), Invalid("not_object"));
    t.add("top-number", b"42".to_vec(), Invalid("not_object"));
    t.add("top-null", b"null".to_vec(), Invalid("not_object"));

    // --- deep nesting
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let body = t
        .msg("deep-array-unknown")
        .set("x-deep", deep.clone())
        .bytes();
    t.add("deep-array-unknown", body, Accepted);
    let deep_objects = format!("{}1{}", "{\"a\":".repeat(100_000), "}".repeat(100_000));
    let body = t
        .msg("deep-object-unknown")
        .set("x-deep", deep_objects)
        .bytes();
    t.add("deep-object-unknown", body, Accepted);
    let body = t
        .msg("deep-segment-value")
        .set("segments", format!("{{\"region\":{deep}}}"))
        .bytes();
    t.add("deep-segment-value", body, Invalid("wrong_type"));

    // --- duplicate keys
    let body = t
        .msg("dupkey-response_id")
        .push("response_id", js(&t.id("dupkey-response_id-2")))
        .bytes();
    t.add("dupkey-response_id", body, Invalid("duplicate_field"));
    let body = t.msg("dupkey-score").push("score", "8").bytes();
    t.add("dupkey-score", body, Invalid("duplicate_field"));
    let body = t
        .msg("dupkey-unknown")
        .push("x-extra", "1")
        .push("x-extra", "2")
        .bytes();
    // Unknown fields are ignored (contract), repeated or not.
    t.add("dupkey-unknown", body, Accepted);
    let body = t
        .msg("dupkey-segments")
        .set("segments", r#"{"region":"east","region":"west"}"#)
        .bytes();
    t.add("dupkey-segments", body, Invalid("duplicate_field"));

    // --- score
    for (label, raw, expected) in [
        ("score--1", "-1", Invalid("score_out_of_range")),
        ("score-11", "11", Invalid("score_out_of_range")),
        ("score-7.0", "7.0", Invalid("wrong_type")),
        ("score-\"7\"", "\"7\"", Invalid("wrong_type")),
        ("score-true", "true", Invalid("wrong_type")),
        ("score-null", "null", Invalid("missing_field")),
        ("score-1e1", "1e1", Invalid("wrong_type")),
        (
            "score-1e20-digits",
            "100000000000000000000",
            Invalid("score_out_of_range"),
        ),
        ("score-object", "{}", Invalid("wrong_type")),
        ("score-0", "0", Accepted),
        ("score-10", "10", Accepted),
    ] {
        let body = t.msg(label).set("score", raw).bytes();
        t.add(label, body, expected);
    }
    let body = t.msg("score-missing").without("score").bytes();
    t.add("score-missing", body, Invalid("missing_field"));

    // --- response_id
    let body = t.msg("rid-empty").set("response_id", "\"\"").bytes();
    t.add("rid-empty", body, Invalid("empty_field"));
    let pad = |prefix: String, c: char, chars: usize| -> String {
        let have = prefix.chars().count();
        format!("{prefix}{}", c.to_string().repeat(chars - have))
    };
    let id = pad(t.id("rid-128-"), 'x', 128);
    let body = t.msg("rid-128").set("response_id", js(&id)).bytes();
    t.add("rid-128", body, Accepted);
    let id = pad(t.id("rid-129-"), 'x', 129);
    let body = t.msg("rid-129").set("response_id", js(&id)).bytes();
    t.add("rid-129", body, Invalid("field_too_long"));
    let id = pad(t.id("rid-128mb-"), 'é', 128);
    let body = t
        .msg("rid-128-multibyte")
        .set("response_id", js(&id))
        .bytes();
    t.add("rid-128-multibyte", body, Accepted);
    let id = pad(t.id("rid-129mb-"), 'é', 129);
    let body = t
        .msg("rid-129-multibyte")
        .set("response_id", js(&id))
        .bytes();
    t.add("rid-129-multibyte", body, Invalid("field_too_long"));
    let body = t.msg("rid-number").set("response_id", "12345").bytes();
    t.add("rid-number", body, Invalid("wrong_type"));
    let body = t.msg("rid-missing").without("response_id").bytes();
    t.add("rid-missing", body, Invalid("missing_field"));

    // --- customer_id and the optional fields
    let body = t.msg("cust-missing").without("customer_id").bytes();
    t.add("cust-missing", body, Invalid("missing_field"));
    let body = t.msg("cust-empty").set("customer_id", "\"\"").bytes();
    t.add("cust-empty", body, Invalid("empty_field"));
    let long = js(&pad(t.customer(), 'x', 129));
    let body = t.msg("cust-129").set("customer_id", long).bytes();
    t.add("cust-129", body, Invalid("field_too_long"));
    let array = format!("[{}]", js(&t.customer()));
    let body = t.msg("cust-array").set("customer_id", array).bytes();
    t.add("cust-array", body, Invalid("wrong_type"));
    let body = t.msg("account-empty").set("account_id", "\"\"").bytes();
    t.add("account-empty", body, Invalid("empty_field"));
    let body = t.msg("manager-number").set("account_manager", "7").bytes();
    t.add("manager-number", body, Invalid("wrong_type"));
    let body = t
        .msg("survey-129")
        .set("survey_id", js(&"s".repeat(129)))
        .bytes();
    t.add("survey-129", body, Invalid("field_too_long"));
    let comment = pad(t.secret.clone(), 'c', 10_000);
    let body = t.msg("comment-10000").set("comment", js(&comment)).bytes();
    t.add("comment-10000", body, Accepted);
    let comment = pad(t.secret.clone(), 'c', 10_001);
    let body = t.msg("comment-10001").set("comment", js(&comment)).bytes();
    t.add("comment-10001", body, Invalid("field_too_long"));
    let body = t.msg("comment-number").set("comment", "42").bytes();
    t.add("comment-number", body, Invalid("wrong_type"));
    let body = t
        .msg("unknown-fields")
        .set("x-extra", r#"{"deep":[1,2,{"x":null}],"n":-0.5e-3}"#)
        .set("😀", "\"ok\"")
        .set("", "\"empty key\"")
        .bytes();
    t.add("unknown-fields", body, Accepted);
    // Valid JSON grammar, beyond f64: ignored like any unknown field.
    let body = t.msg("unknown-1e400").set("x-big", "1e400").bytes();
    t.add("unknown-1e400", body, Accepted);

    // --- segments
    for (label, raw, expected) in [
        ("seg-array", r#"["region","east"]"#, Invalid("wrong_type")),
        ("seg-string", r#""region=east""#, Invalid("wrong_type")),
        ("seg-null", "null", Accepted),
        ("seg-value-number", r#"{"region":7}"#, Invalid("wrong_type")),
        (
            "seg-value-object",
            r#"{"region":{}}"#,
            Invalid("wrong_type"),
        ),
        ("seg-value-null", r#"{"region":null}"#, Accepted),
        ("seg-key-empty", r#"{"":"east"}"#, Invalid("empty_field")),
        (
            "seg-value-empty",
            r#"{"region":""}"#,
            Invalid("empty_field"),
        ),
        (
            "seg-reserved-chars",
            r#"{"region":"a,b=c%d/../e"}"#,
            Accepted,
        ),
        (
            "seg-control-chars",
            r#"{"product":"\u0007\u001b[31mred\n\r\t\"\\"}"#,
            Accepted,
        ),
        ("seg-key-control", r#"{"re\u0000gion":"east"}"#, Accepted),
        (
            "seg-value-__other__",
            r#"{"channel":"__other__"}"#,
            Accepted,
        ),
    ] {
        let body = t.msg(label).set("segments", raw).bytes();
        t.add(label, body, expected);
    }
    let body = t.msg("seg-64").set("segments", segments_with(64)).bytes();
    t.add("seg-64", body, Accepted);
    let body = t.msg("seg-65").set("segments", segments_with(65)).bytes();
    t.add("seg-65", body, Invalid("too_many_segments"));
    let key129 = format!("{{{}:\"v\"}}", js(&"k".repeat(129)));
    let body = t.msg("seg-key-129").set("segments", key129).bytes();
    t.add("seg-key-129", body, Invalid("field_too_long"));
    let value129 = format!("{{\"region\":{}}}", js(&"v".repeat(129)));
    let body = t.msg("seg-value-129").set("segments", value129).bytes();
    t.add("seg-value-129", body, Invalid("field_too_long"));

    // --- timestamps
    let day = 86_400_000;
    let recent = rfc3339(now - MINUTE_MS);
    let yesterday = &rfc3339(now - day)[..10];
    for (label, raw, expected) in [
        (
            "ts-no-offset",
            js(&format!("{yesterday}T12:00:00")),
            Invalid("bad_timestamp"),
        ),
        (
            "ts-month-13",
            js("2026-13-01T00:00:00Z"),
            Invalid("bad_timestamp"),
        ),
        (
            "ts-feb-30",
            js("2026-02-30T00:00:00Z"),
            Invalid("bad_timestamp"),
        ),
        ("ts-date-only", js(yesterday), Invalid("bad_timestamp")),
        ("ts-words", js("yesterday"), Invalid("bad_timestamp")),
        (
            "ts-number",
            (now - MINUTE_MS).to_string(),
            Invalid("wrong_type"),
        ),
        // A real leap second: a valid RFC 3339 timestamp, long ago.
        ("ts-leap-second", js("2016-12-31T23:59:60Z"), TooOld),
        ("ts-year-0000", js("0000-01-01T00:00:00Z"), TooOld),
        ("ts-year-9999", js("9999-12-31T23:59:59Z"), Future),
        (
            "ts-lowercase",
            js(&recent.replace('T', "t").replace('Z', "z")),
            Accepted,
        ),
        (
            "ts-offset-+05:30",
            js(&format!(
                "{}+05:30",
                &rfc3339(now - MINUTE_MS + 5 * 3_600_000 + 30 * MINUTE_MS)[..23]
            )),
            Accepted,
        ),
        (
            "ts-nanoseconds",
            js(&format!("{}123456Z", &recent[..23])),
            Accepted,
        ),
        (
            "ts-28d-minus-1m",
            js(&rfc3339(now - LONGEST_MS - MINUTE_MS)),
            TooOld,
        ),
        (
            "ts-inside-from+5m",
            js(&rfc3339(longest_from(now) + 5 * MINUTE_MS)),
            Accepted,
        ),
        (
            "ts-past-from-5m",
            js(&rfc3339(longest_from(now) - 5 * MINUTE_MS)),
            TooOld,
        ),
        (
            "ts-future-in-skew+2m",
            js(&rfc3339(now + 2 * MINUTE_MS)),
            Accepted,
        ),
        (
            "ts-future-past-skew+10m",
            js(&rfc3339(now + 10 * MINUTE_MS)),
            Future,
        ),
    ] {
        let body = t.msg(label).set("responded_at", raw).bytes();
        t.add(label, body, expected);
    }
    let body = t.msg("ts-missing").without("responded_at").bytes();
    t.add("ts-missing", body, Invalid("missing_field"));

    // --- duplicates: one response, re-sent every way a producer might
    let base = t.msg("dup-base");
    let dup_key = t.customer();
    t.add_raw(
        "dup-base",
        Some(dup_key.clone()),
        Placement::ByKey,
        Some(base.bytes()),
        Accepted,
    );
    t.add_raw(
        "dup-same-key",
        Some(dup_key.clone()),
        Placement::ByKey,
        Some(base.bytes()),
        Duplicate,
    );
    t.add_raw(
        "dup-other-key",
        Some("cust-hostile-other-key".into()),
        Placement::ByKey,
        Some(base.bytes()),
        Duplicate,
    );
    t.add_raw(
        "dup-null-key",
        None,
        Placement::ByKey,
        Some(base.bytes()),
        Duplicate,
    );
    t.add_raw(
        "dup-other-partition",
        Some(dup_key.clone()),
        Placement::NotWith("dup-base"),
        Some(base.bytes()),
        Duplicate,
    );
    let changed = base.clone().set("score", "2").set("comment", js(&t.secret));
    t.add_raw(
        "dup-other-content",
        None,
        Placement::NotWith("dup-base"),
        Some(changed.bytes()),
        Duplicate,
    );
    // Decoding comes first: an invalid re-send is invalid, not a duplicate.
    t.add_raw(
        "dup-invalid-resend",
        Some(dup_key),
        Placement::ByKey,
        Some(base.set("score", "11").bytes()),
        Invalid("score_out_of_range"),
    );
    for partition in 0..PARTITIONS {
        let label = format!("no-key-partition-{partition}");
        let body = t.msg(&label).bytes();
        t.add_raw(
            &label,
            None,
            Placement::Fixed(partition),
            Some(body),
            Accepted,
        );
    }

    // --- input headers are kept on the dead letter (README)
    let case = t.add("headers-kept", b"{not json".to_vec(), Invalid("not_json"));
    case.headers = vec![
        ("x-trace".into(), b"trace-1".to_vec()),
        ("x-binary".into(), vec![0, 0xFF, 0xFE]),
    ];
    t
}

/// The cardinality flood: `FLOOD` valid responses, each with its own `tier` value.
fn flood_payloads(t: &Table) -> Vec<Vec<u8>> {
    (0..FLOOD)
        .map(|i| {
            t.msg(&format!("flood-{i:03}"))
                .set(
                    "segments",
                    format!("{{\"region\":\"east\",\"tier\":\"flood-{i:03}\"}}"),
                )
                .bytes()
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// Metrics and HTTP
// ---------------------------------------------------------------------------------------

struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parses the Prometheus text format (names, escaped label values, values).
fn parse_metrics(text: &str) -> Result<Vec<Sample>, String> {
    let mut samples = Vec::new();
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let name_end = line.find(['{', ' ']).ok_or(format!("bad line {line:?}"))?;
        let name = line[..name_end].to_owned();
        let mut labels = BTreeMap::new();
        let mut rest = &line[name_end..];
        if let Some(inner) = rest.strip_prefix('{') {
            let mut chars = inner.char_indices().peekable();
            let mut end = None;
            while let Some(&(i, c)) = chars.peek() {
                if c == '}' {
                    end = Some(i + 1);
                    break;
                }
                if c == ',' {
                    chars.next();
                    continue;
                }
                let mut key = String::new();
                for (_, c) in chars.by_ref() {
                    if c == '=' {
                        break;
                    }
                    key.push(c);
                }
                if chars.next().map(|(_, c)| c) != Some('"') {
                    return Err(format!("bad label in {line:?}"));
                }
                let mut value = String::new();
                while let Some((_, c)) = chars.next() {
                    match c {
                        '"' => break,
                        '\\' => match chars.next().map(|(_, c)| c) {
                            Some('n') => value.push('\n'),
                            Some(other) => value.push(other),
                            None => return Err(format!("bad escape in {line:?}")),
                        },
                        other => value.push(other),
                    }
                }
                labels.insert(key, value);
            }
            let end = end.ok_or(format!("unclosed labels in {line:?}"))?;
            rest = &inner[end..];
        }
        let value = rest
            .split_whitespace()
            .next()
            .ok_or(format!("no value in {line:?}"))?;
        let value = value
            .parse::<f64>()
            .map_err(|_| format!("bad value in {line:?}"))?;
        samples.push(Sample {
            name,
            labels,
            value,
        });
    }
    Ok(samples)
}

#[derive(Default)]
struct Scrape {
    samples: Vec<Sample>,
    text: String,
}

impl Scrape {
    fn sum(&self, name: &str, label: Option<(&str, &str)>) -> f64 {
        self.samples
            .iter()
            .filter(|s| s.name == name)
            .filter(|s| label.is_none_or(|(k, v)| s.labels.get(k).map(String::as_str) == Some(v)))
            .map(|s| s.value)
            .sum()
    }

    fn events(&self, outcome: &str) -> u64 {
        self.sum("npsflow_events_total", Some(("outcome", outcome))) as u64
    }

    fn total_events(&self) -> u64 {
        self.sum("npsflow_events_total", None) as u64
    }

    fn dead_letters(&self) -> u64 {
        self.sum("npsflow_dead_letters_total", None) as u64
    }

    fn by_label(&self, name: &str, label: &str) -> BTreeMap<String, u64> {
        let mut map = BTreeMap::new();
        for s in self.samples.iter().filter(|s| s.name == name) {
            if let Some(v) = s.labels.get(label) {
                *map.entry(v.clone()).or_default() += s.value as u64;
            }
        }
        map
    }

    /// Distinct `segment` label values of `npsflow_segment_nps`.
    fn nps_segments(&self) -> Vec<String> {
        let mut segments: Vec<String> = self
            .samples
            .iter()
            .filter(|s| s.name == "npsflow_segment_nps")
            .filter_map(|s| s.labels.get("segment").cloned())
            .collect();
        segments.sort();
        segments.dedup();
        segments
    }
}

/// One raw HTTP exchange: `(status, body)`, or why there was none.
async fn http_raw(port: u16, request: Vec<u8>) -> Result<(u16, Vec<u8>), String> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        // The server may answer (431, 400) and close before it has read everything.
        let written = stream.write_all(&request).await;
        let mut response = Vec::new();
        // The server may reset the connection after answering a request it did not read
        // to its end: keep what arrived.
        let read = stream.read_to_end(&mut response).await;
        if response.is_empty() {
            return Err(format!("no response (write {written:?}, read {read:?})"));
        }
        parse_response(&response)
    };
    tokio::time::timeout(Duration::from_secs(20), exchange)
        .await
        .map_err(|_| "no response within 20 s".to_owned())?
}

fn parse_response(response: &[u8]) -> Result<(u16, Vec<u8>), String> {
    let head_end = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("no end of headers")?;
    let head = String::from_utf8_lossy(&response[..head_end]).into_owned();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or(format!("no status in {:?}", head.lines().next()))?;
    let mut body = response[head_end + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body)?;
    }
    Ok((status, body))
}

fn dechunk(mut data: &[u8]) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    loop {
        let line_end = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("bad chunk")?;
        let size_text = String::from_utf8_lossy(&data[..line_end]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| "bad chunk size")?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Ok(body);
        }
        if data.len() < size + 2 {
            return Err("short chunk".into());
        }
        body.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

fn get_request(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").into_bytes()
}

async fn get(port: u16, path: &str) -> Result<(u16, Vec<u8>), String> {
    http_raw(port, get_request(path)).await
}

async fn scrape(port: u16) -> Result<Scrape, String> {
    let (status, body) = get(port, "/metrics").await?;
    if status != 200 {
        return Err(format!("/metrics answered {status}"));
    }
    let text = String::from_utf8(body).map_err(|_| "/metrics is not UTF-8".to_owned())?;
    Ok(Scrape {
        samples: parse_metrics(&text)?,
        text,
    })
}

/// Scrapes until one works (the process may be busy), for at most `patience`.
async fn scrape_patiently(port: u16, patience: Duration) -> Scrape {
    let deadline = Instant::now() + patience;
    loop {
        match scrape(port).await {
            Ok(scrape) => return scrape,
            Err(e) if Instant::now() > deadline => panic!("cannot scrape /metrics: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Percent-encodes everything but unreserved characters.
fn percent_encode(text: &str) -> String {
    let mut out = String::new();
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(byte as char);
        } else {
            let _ = write!(out, "%{byte:02X}");
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// Kafka
// ---------------------------------------------------------------------------------------

async fn create_input_topic(brokers: &str, topic: &str) -> String {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("admin client");
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let limit = (20 << 20).to_string();
    let with_limit = NewTopic::new(topic, PARTITIONS, TopicReplication::Fixed(1))
        .set("max.message.bytes", &limit);
    let result = admin
        .create_topics(&[with_limit], &options)
        .await
        .expect("create_topics answered");
    match &result[0] {
        Ok(_) => format!("input topic created with max.message.bytes={limit}"),
        Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => "input topic existed".into(),
        Err((_, code)) => {
            let plain = NewTopic::new(topic, PARTITIONS, TopicReplication::Fixed(1));
            let again = admin
                .create_topics(&[plain], &options)
                .await
                .expect("create_topics answered");
            assert!(again[0].is_ok(), "input topic created: {:?}", again[0]);
            format!("input topic created without max.message.bytes (the broker said {code:?})")
        }
    }
}

/// Produces one record; where it landed, `(partition, offset)`.
async fn send(
    producer: &FutureProducer,
    topic: &str,
    key: Option<&str>,
    partition: Option<i32>,
    payload: Option<&[u8]>,
    headers: &[(String, Vec<u8>)],
) -> Result<(i32, i64), String> {
    let mut owned = OwnedHeaders::new();
    for (name, value) in headers {
        owned = owned.insert(Header {
            key: name,
            value: Some(value),
        });
    }
    let mut record: FutureRecord<'_, str, [u8]> = FutureRecord::to(topic).headers(owned);
    if let Some(key) = key {
        record = record.key(key);
    }
    if let Some(payload) = payload {
        record = record.payload(payload);
    }
    if let Some(partition) = partition {
        record = record.partition(partition);
    }
    producer
        .send(record, Timeout::After(Duration::from_secs(60)))
        .await
        .map(|d| (d.partition, d.offset))
        .map_err(|(e, _)| e.to_string())
}

// ---------------------------------------------------------------------------------------
// The process
// ---------------------------------------------------------------------------------------

/// The `npsflow run` child: killed if the test ends without stopping it; its pid file (for
/// the script's clean-up) removed once it is gone.
struct Npsflow {
    child: Child,
    pidfile: Option<PathBuf>,
}

impl Drop for Npsflow {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(pidfile) = &self.pidfile {
            let _ = std::fs::remove_file(pidfile);
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

fn signal(pid: u32, name: &str) {
    let _ = Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status();
}

// ---------------------------------------------------------------------------------------
// The test
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real broker and the npsflow binary: run through scripts/hostile.sh"]
async fn hostile_input_never_stops_or_corrupts_the_pipeline() {
    let started = Instant::now();
    let var = |name: &str| std::env::var(name).unwrap_or_else(|_| panic!("{name} is set"));
    let brokers = var("NPSFLOW_HOSTILE_BROKERS");
    let binary = var("NPSFLOW_HOSTILE_BIN");
    let run = format!(
        "hostile-{}-{}",
        std::process::id(),
        npsflow_runtime::wall_now().millis() % 100_000_000
    );
    let given_dir = std::env::var("NPSFLOW_HOSTILE_DIR").ok().map(PathBuf::from);
    let work = given_dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(&run));
    std::fs::create_dir_all(&work).expect("work dir");
    let log_path = work.join("npsflow.log");
    let input = format!("{run}.responses");
    let dlq = format!("{run}.dlq");
    let http_port = free_port();
    let mut notes: Vec<String> = Vec::new();
    let mut failures: Vec<String> = Vec::new();

    // Topics: the input with room for 10 MiB messages, the rest by `npsflow topics create`.
    notes.push(create_input_topic(&brokers, &input).await);
    let mut env: Vec<(String, String)> = [
        ("NPSFLOW__KAFKA__BROKERS", brokers.clone()),
        ("NPSFLOW__HTTP__LISTEN", format!("127.0.0.1:{http_port}")),
        ("NPSFLOW__LOG__FORMAT", "json".into()),
        ("NPSFLOW__LOG__LEVEL", "debug,librdkafka=warn".into()),
        ("NPSFLOW__INGEST__BATCH_MAX_WAIT", "20ms".into()),
        ("NPSFLOW__TOPICS__PARTITIONS", PARTITIONS.to_string()),
        ("NPSFLOW__TOPICS__RESPONSES", input.clone()),
        ("NPSFLOW__TOPICS__DEAD_LETTERS", dlq.clone()),
        ("NPSFLOW__TOPICS__FOLLOWUPS", format!("{run}.followups")),
        ("NPSFLOW__TOPICS__SEGMENT_DELTAS", format!("{run}.deltas")),
        ("NPSFLOW__TOPICS__STATE", format!("{run}.state")),
        ("NPSFLOW__KAFKA__INGEST_GROUP", format!("{run}-ingest")),
        (
            "NPSFLOW__KAFKA__AGGREGATE_GROUP",
            format!("{run}-aggregate"),
        ),
        (
            "NPSFLOW__SEGMENTS__MAX_VALUES_PER_DIMENSION",
            CAP.to_string(),
        ),
        ("NPSFLOW__HEALTH__STALL_TIMEOUT", "20s".into()),
        (
            "NPSFLOW__TOPICS__RESPONSES_BY_ID",
            format!("{run}.responses-by-id"),
        ),
        (
            "NPSFLOW__TOPICS__MAX_MESSAGE_BYTES",
            MAX_MESSAGE_BYTES.to_string(),
        ),
    ]
    .into_iter()
    .chain(util::followup_names(&run))
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let topics_create = |env: &[(String, String)]| {
        Command::new(&binary)
            .args(["topics", "create"])
            .envs(env.iter().map(|(k, v)| (k, v)))
            .output()
            .expect("npsflow topics create runs")
    };
    // Settings that are being added to npsflow while this test is written: a binary that does
    // not know one yet (unknown keys are errors) runs without it, and the report says so.
    let mut optional = vec![
        ("NPSFLOW__HEALTH__STALL_TIMEOUT", "stall_timeout"),
        ("NPSFLOW__TOPICS__RESPONSES_BY_ID", "responses_by_id"),
        ("NPSFLOW__TOPICS__MAX_MESSAGE_BYTES", "max_message_bytes"),
    ];
    let mut created = topics_create(&env);
    while !created.status.success() {
        let stderr = String::from_utf8_lossy(&created.stderr).into_owned();
        let Some(at) = optional.iter().position(|(_, key)| stderr.contains(key)) else {
            break;
        };
        let (var, _) = optional.remove(at);
        notes.push(format!(
            "{var} is rejected by this binary's configuration: run without it"
        ));
        env.retain(|(k, _)| k != var);
        created = topics_create(&env);
    }
    assert!(
        created.status.success(),
        "npsflow topics create: {}",
        String::from_utf8_lossy(&created.stderr)
    );

    let log = std::fs::File::create(&log_path).expect("log file");
    let child = Command::new(&binary)
        .arg("run")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(log.try_clone().expect("log file"))
        .stderr(log)
        .stdin(Stdio::null())
        .spawn()
        .expect("npsflow run starts");
    let pid = child.id();
    let pidfile = std::env::var("NPSFLOW_HOSTILE_PIDFILE")
        .ok()
        .map(PathBuf::from);
    if let Some(pidfile) = &pidfile {
        std::fs::write(pidfile, pid.to_string()).expect("pid file");
    }
    let mut process = Npsflow { child, pidfile };
    println!(
        "hostile: npsflow run (pid {pid}) on 127.0.0.1:{http_port}, log {}",
        log_path.display()
    );

    // Ready: connected, joined, restored.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(status) = process.child.try_wait().expect("try_wait") {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            panic!("npsflow run exited at start ({status}):\n{log}");
        }
        if let Ok((200, _)) = get(http_port, "/readyz").await {
            break;
        }
        assert!(Instant::now() < deadline, "npsflow did not become ready");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!("hostile: ready after {:.1?}", started.elapsed());

    // If the longest window's step ends within the next few minutes, the boundary cases
    // would move under us: wait for the new step.
    let now = npsflow_runtime::wall_now().millis();
    let step_left = longest_from(now) + LONGEST_MS - now;
    if step_left < 4 * MINUTE_MS {
        println!("hostile: waiting {step_left} ms for the 28d window's next step");
        tokio::time::sleep(Duration::from_millis(step_left as u64 + 2_000)).await;
    }
    let now = npsflow_runtime::wall_now().millis();
    let mut table = build_table(&run, now);
    let flood = flood_payloads(&table);

    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("message.max.bytes", "20000000")
        .set("partitioner", "murmur2_random")
        .set("acks", "all")
        .set("linger.ms", "0")
        .create()
        .expect("producer");
    // --- every case on its own, observed by the counters
    let mut sent: u64 = 0;
    let mut stuck = false;
    let mut previous = scrape_patiently(http_port, Duration::from_secs(30)).await;
    let mut partitions_of: HashMap<String, i32> = HashMap::new();
    let case_count = table.cases.len();
    for i in 0..case_count {
        let case = &table.cases[i];
        let partition = match &case.placement {
            Placement::ByKey => None,
            Placement::Fixed(p) => Some(*p),
            Placement::NotWith(other) => Some((partitions_of[*other] + 1) % PARTITIONS),
        };
        let delivery = send(
            &producer,
            &input,
            case.key.as_deref(),
            partition,
            case.payload.as_deref(),
            &case.headers,
        )
        .await;
        let case = &mut table.cases[i];
        let (p, o) = match delivery {
            Ok(landed) => landed,
            Err(e) => {
                case.observed = format!("not produced: {e}");
                continue;
            }
        };
        case.landed.push((p, o));
        partitions_of.insert(case.label.clone(), p);
        sent += 1;
        let patience = if stuck { STUCK_PATIENCE } else { CASE_PATIENCE };
        let t0 = Instant::now();
        let mut after = scrape_patiently(http_port, Duration::from_secs(30)).await;
        while after.total_events() < sent && t0.elapsed() < patience {
            tokio::time::sleep(Duration::from_millis(20)).await;
            after = scrape_patiently(http_port, Duration::from_secs(30)).await;
        }
        // Dead letters may be counted when delivered, a moment after the decision.
        let dlq_outcomes = ["invalid", "too_old", "future"]
            .iter()
            .map(|o| after.events(o).saturating_sub(previous.events(o)))
            .sum::<u64>();
        let dlq_deadline = Instant::now() + Duration::from_secs(5);
        while after.dead_letters() < previous.dead_letters() + dlq_outcomes
            && Instant::now() < dlq_deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
            after = scrape_patiently(http_port, Duration::from_secs(30)).await;
        }
        case.observed = observe(&previous, &after);
        if after.total_events() < sent {
            if case.observed.is_empty() {
                case.observed = format!("not counted within {patience:?}");
            }
            stuck = true;
        } else if t0.elapsed() > Duration::from_secs(2) {
            case.note = format!("counted after {:.1?}", t0.elapsed());
        }
        previous = after;
    }

    // --- the cardinality flood: one case of FLOOD messages
    let overflowed_before = previous.sum("npsflow_segment_values_overflowed_total", None);
    let flood_sends = flood.iter().enumerate().map(|(i, payload)| {
        let key = format!("cust-hostile-flood-{i}");
        let (producer, input) = (&producer, &input);
        async move { send(producer, input, Some(&key), None, Some(payload), &[]).await }
    });
    let mut flood_case = Case {
        label: format!("cardinality-flood-x{FLOOD}"),
        key: None,
        placement: Placement::ByKey,
        payload: None,
        headers: Vec::new(),
        expected: Expect::Accepted,
        count: FLOOD,
        landed: Vec::new(),
        observed: String::new(),
        note: String::new(),
        dead_letter_problems: Vec::new(),
    };
    for delivery in futures::future::join_all(flood_sends).await {
        match delivery {
            Ok(landed) => flood_case.landed.push(landed),
            Err(e) => failures.push(format!("flood message not produced: {e}")),
        }
    }
    sent += flood_case.landed.len() as u64;
    let last_sent = Instant::now();
    let t0 = Instant::now();
    let mut after = scrape_patiently(http_port, Duration::from_secs(30)).await;
    while after.total_events() < sent && t0.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        after = scrape_patiently(http_port, Duration::from_secs(30)).await;
    }
    flood_case.observed = observe(&previous, &after);
    table.cases.push(flood_case);
    let overflowed = after.sum("npsflow_segment_values_overflowed_total", None) - overflowed_before;
    println!(
        "hostile: {} cases ({} messages) sent and counted after {:.1?}",
        table.cases.len(),
        sent,
        started.elapsed()
    );

    // Segment `all` counts every accepted response in the 28d window (the +2 minute case
    // only once the clock reaches its step): wait for the aggregator to catch up.
    let accepted_now = after.events("accepted");
    let mut want_all = accepted_now;
    let to = longest_from(npsflow_runtime::wall_now().millis()) + LONGEST_MS;
    if now + 2 * MINUTE_MS >= to {
        want_all = want_all.saturating_sub(1);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen_all = None;
    while Instant::now() < deadline {
        if let Ok((200, body)) = get(http_port, "/v1/segments/all?window=28d").await {
            let json: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            seen_all = json["responses"].as_u64();
            if seen_all == Some(want_all) {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if seen_all != Some(want_all) {
        failures.push(format!(
            "segment all, 28d: {seen_all:?} responses after 30 s, {accepted_now} accepted"
        ));
    }

    // --- hostile HTTP
    http_checks(http_port, &mut failures).await;

    // --- final state, once the aggregator has caught up
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut final_scrape = scrape_patiently(http_port, Duration::from_secs(30)).await;
    while final_scrape.total_events() < sent && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        final_scrape = scrape_patiently(http_port, Duration::from_secs(30)).await;
    }

    // Nothing lost: every message counted once, per outcome as the table says.
    let total = final_scrape.total_events();
    if total != sent {
        failures.push(format!(
            "npsflow_events_total sums to {total}, {sent} messages were sent"
        ));
    }
    let mut expected_by_outcome: BTreeMap<&str, u64> = BTreeMap::new();
    for case in &table.cases {
        *expected_by_outcome
            .entry(case.expected.outcome())
            .or_default() += case.count as u64;
    }
    for outcome in ["accepted", "invalid", "duplicate", "too_old", "future"] {
        let want = expected_by_outcome.get(outcome).copied().unwrap_or(0);
        let got = final_scrape.events(outcome);
        if want != got {
            failures.push(format!(
                "npsflow_events_total{{outcome=\"{outcome}\"}} is {got}, expected {want}"
            ));
        }
    }
    let mut expected_reasons: BTreeMap<String, u64> = BTreeMap::new();
    for case in &table.cases {
        if let Some(reason) = case.expected.dead_letter_reason() {
            *expected_reasons.entry(reason.to_owned()).or_default() += case.count as u64;
        }
    }
    let got_reasons: BTreeMap<String, u64> = final_scrape
        .by_label("npsflow_dead_letters_total", "reason")
        .into_iter()
        .filter(|(_, n)| *n > 0)
        .collect();
    if got_reasons != expected_reasons {
        failures.push(format!(
            "npsflow_dead_letters_total by reason is {got_reasons:?}, expected {expected_reasons:?}"
        ));
    }

    // The cardinality cap.
    if overflowed < 1.0 {
        failures.push(format!(
            "npsflow_segment_values_overflowed_total did not rise with {FLOOD} distinct tier values"
        ));
    }
    let segments = final_scrape.nps_segments();
    let tier_segments = segments.iter().filter(|s| s.starts_with("tier=")).count();
    if tier_segments > CAP + 1 {
        failures.push(format!(
            "{tier_segments} tier segments in npsflow_segment_nps, more than the cap {CAP} + __other__"
        ));
    }
    if !segments.iter().any(|s| s == "tier=__other__") {
        failures.push("no tier=__other__ segment after the flood".into());
    }
    // All the segments the table can make: all, region (east, a,b=c%d/../e), product (sedan,
    // the control characters), channel (web, __other__ escaped), the tier cap and its
    // overflow, their combinations, and the 64 unknown dimensions (which must not count).
    let segment_bound = 1 + 2 + 2 + 2 + (CAP + 1) + 4;
    if segments.len() > segment_bound {
        failures.push(format!(
            "{} segments have an NPS gauge, more than the {segment_bound} the input can make",
            segments.len()
        ));
    }
    let series = final_scrape.samples.len();
    let series_bound = segment_bound * 4 * 5 + 1_000;
    if series > series_bound {
        failures.push(format!(
            "/metrics has {series} series, more than {series_bound}"
        ));
    }
    println!(
        "hostile: /metrics: {series} series (bound {series_bound}), {} segments with an NPS \
         (bound {segment_bound}), {tier_segments} of them tier=..., {overflowed} values counted \
         as __other__",
        segments.len()
    );
    // A real value `__other__` is escaped, never merged with the overflow (channel never
    // overflows here, so `channel=__other__` can only be the real value, unescaped).
    if segments.iter().any(|s| s == "channel=__other__") {
        failures.push("the real channel value __other__ is shown as channel=__other__".into());
    }
    if !segments
        .iter()
        .any(|s| s.starts_with("channel=") && s.contains("other") && s != "channel=__other__")
    {
        failures.push("no segment for the real channel value __other__".into());
    }
    // A value with reserved characters: escaped, and reachable through the API.
    match segments.iter().find(|s| s.starts_with("region=a")) {
        None => failures.push("no segment for region value a,b=c%d/../e".into()),
        Some(name) => {
            if name.contains(',') || name.matches('=').count() != 1 {
                failures.push(format!("segment name {name:?} is not escaped"));
            }
            let path = format!("/v1/segments/{}?window=28d", percent_encode(name));
            match get(http_port, &path).await {
                Ok((200, body)) => {
                    let json: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                    if json["responses"].as_u64() != Some(1) {
                        failures.push(format!("GET {path}: {json}, expected 1 response"));
                    }
                }
                other => failures.push(format!("GET {path}: {other:?}, expected 200")),
            }
        }
    }
    if let Some(promtool) = which("promtool") {
        let mut check = Command::new(promtool)
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("promtool runs");
        use std::io::Write;
        check
            .stdin
            .take()
            .expect("stdin")
            .write_all(final_scrape.text.as_bytes())
            .expect("promtool reads");
        let output = check.wait_with_output().expect("promtool ends");
        if !output.status.success() {
            failures.push(format!(
                "promtool check metrics: {}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ));
        }
    } else {
        notes.push("promtool not installed: /metrics not linted".into());
    }

    // --- the dead-letter topic
    let dead_letters = util::read_to_end(&brokers, &dlq);
    println!("hostile: {} dead letters on {dlq}", dead_letters.len());
    check_dead_letters(&mut table, &dead_letters, &input, &mut failures);

    // --- the process: alive, healthy (also after an idle spell longer than the stall
    // timeout: no work is not a stall), no panics, no personal data in its log
    let idle_until = last_sent + Duration::from_secs(25);
    tokio::time::sleep_until(idle_until.into()).await;
    if let Some(status) = process.child.try_wait().expect("try_wait") {
        failures.push(format!("npsflow run exited during the test: {status}"));
    }
    match get(http_port, "/healthz").await {
        Ok((200, _)) => {}
        other => failures.push(format!("GET /healthz: {other:?}, expected 200")),
    }
    signal(pid, "INT");
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut exit = None;
    while Instant::now() < deadline {
        if let Some(status) = process.child.try_wait().expect("try_wait") {
            exit = Some(status);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    match exit {
        Some(status) if status.success() => {}
        Some(status) => failures.push(format!("npsflow run stopped on SIGINT with {status}")),
        None => failures.push("npsflow run did not stop within 30 s of SIGINT".into()),
    }
    let log_bytes = std::fs::read(&log_path).expect("log");
    let log_text = String::from_utf8_lossy(&log_bytes);
    for (needle, what) in [
        ("panicked", "a panic"),
        ("SECRET-COMMENT-", "comment text"),
        ("cust-hostile-", "a customer id"),
    ] {
        let hits = log_text.matches(needle).count();
        if hits > 0 {
            let first = log_text
                .lines()
                .find(|l| l.contains(needle))
                .unwrap_or_default();
            let first: String = first.chars().take(300).collect();
            failures.push(format!("the log has {what} ({hits} times), first: {first}"));
        }
    }

    // --- the report
    let mut report = String::new();
    let _ = writeln!(report, "\n{:<28} {:<26} observed", "case", "expected");
    let mut mismatches = 0;
    for case in &table.cases {
        let want = if case.count == 1 {
            case.expected.label()
        } else {
            format!("{} x{}", case.expected.label(), case.count)
        };
        let ok_outcome = case.observed == want;
        let ok = ok_outcome && case.dead_letter_problems.is_empty();
        if !ok {
            mismatches += 1;
        }
        let _ = writeln!(
            report,
            "{} {:<26} {:<26} {}{}{}",
            if ok { " " } else { "X" },
            case.label,
            want,
            case.observed,
            if case.note.is_empty() {
                String::new()
            } else {
                format!("  ({})", case.note)
            },
            if case.dead_letter_problems.is_empty() {
                String::new()
            } else {
                format!("  [dlq: {}]", case.dead_letter_problems.join("; "))
            }
        );
        if !ok_outcome {
            failures.push(format!(
                "case {}: expected {want}, observed {}",
                case.label, case.observed
            ));
        }
        for problem in &case.dead_letter_problems {
            failures.push(format!("case {}: dead letter: {problem}", case.label));
        }
    }
    println!("{report}");
    let labelled = table.cases.len();
    println!(
        "hostile: {labelled} cases, {sent} messages, {mismatches} cases mismatched, {} failures in all, {:.1?}",
        failures.len(),
        started.elapsed()
    );
    for note in &notes {
        println!("hostile: note: {note}");
    }
    if failures.is_empty() {
        if given_dir.is_none() {
            let _ = std::fs::remove_dir_all(&work);
        }
    } else {
        println!("hostile: npsflow log kept at {}", log_path.display());
        panic!("{} failures:\n  {}", failures.len(), failures.join("\n  "));
    }
}

/// The outcomes whose counters moved between two scrapes, e.g. `invalid(not_json)` or
/// `accepted x500`.
fn observe(before: &Scrape, after: &Scrape) -> String {
    let reasons_before = before.by_label("npsflow_dead_letters_total", "reason");
    let reasons_after = after.by_label("npsflow_dead_letters_total", "reason");
    let mut moved_reasons: Vec<String> = reasons_after
        .iter()
        .filter_map(|(reason, n)| {
            let d = n.saturating_sub(reasons_before.get(reason).copied().unwrap_or(0));
            (d > 0 && reason != "too_old" && reason != "future").then(|| {
                if d == 1 {
                    reason.clone()
                } else {
                    format!("{reason} x{d}")
                }
            })
        })
        .collect();
    let mut parts = Vec::new();
    for outcome in ["accepted", "invalid", "duplicate", "too_old", "future"] {
        let d = after.events(outcome).saturating_sub(before.events(outcome));
        if d == 0 {
            continue;
        }
        let name = if outcome == "invalid" {
            let reasons = if moved_reasons.is_empty() {
                "?".to_owned()
            } else {
                std::mem::take(&mut moved_reasons).join(",")
            };
            format!("invalid({reasons})")
        } else {
            outcome.to_owned()
        };
        parts.push(if d == 1 { name } else { format!("{name} x{d}") });
    }
    parts.join(" + ")
}

/// Every expected dead letter exactly once, as the contract says; nothing else there.
fn check_dead_letters(
    table: &mut Table,
    dead_letters: &[OwnedMessage],
    input: &str,
    failures: &mut Vec<String>,
) {
    let mut by_source: HashMap<(i32, i64), Vec<&OwnedMessage>> = HashMap::new();
    for message in dead_letters {
        let source = (
            header(message, "npsflow-source-partition").and_then(|p| p.parse().ok()),
            header(message, "npsflow-source-offset").and_then(|o| o.parse().ok()),
        );
        match source {
            (Some(p), Some(o)) => by_source.entry((p, o)).or_default().push(message),
            _ => failures.push(format!(
                "a dead letter without source partition and offset (error {:?})",
                header(message, "npsflow-error")
            )),
        }
    }
    let mut attributed = 0;
    for case in &mut table.cases {
        for (p, o) in case.landed.clone() {
            let found = by_source.get(&(p, o)).cloned().unwrap_or_default();
            attributed += found.len();
            let Some(reason) = case.expected.dead_letter_reason() else {
                if !found.is_empty() {
                    case.dead_letter_problems.push(format!(
                        "{} dead letter(s) for a message that is {}",
                        found.len(),
                        case.expected.outcome()
                    ));
                }
                continue;
            };
            if found.len() != 1 {
                case.dead_letter_problems
                    .push(format!("{} dead letters, expected 1", found.len()));
            }
            let Some(message) = found.first() else {
                continue;
            };
            let problems = &mut case.dead_letter_problems;
            let error = header(message, "npsflow-error");
            if error.as_deref() != Some(reason) {
                problems.push(format!("npsflow-error {error:?}, expected {reason:?}"));
            }
            let topic = header(message, "npsflow-source-topic");
            if topic.as_deref() != Some(input) {
                problems.push(format!("npsflow-source-topic {topic:?}"));
            }
            let key = message
                .key()
                .map(|k| String::from_utf8_lossy(k).into_owned());
            if key != case.key {
                problems.push(format!("key {key:?}, expected {:?}", case.key));
            }
            let original = case.payload.as_deref().unwrap_or_default();
            let value = message.payload().unwrap_or_default();
            if value != original {
                let size = header(message, "npsflow-original-size");
                let value_less_allowed = original.len() >= VALUE_LESS_FROM;
                if !(value_less_allowed && value.is_empty()) {
                    problems.push(format!(
                        "value of {} bytes differs from the original {} bytes{}",
                        value.len(),
                        original.len(),
                        if value.is_empty() {
                            format!(" (value-less, npsflow-original-size {size:?})")
                        } else {
                            String::new()
                        }
                    ));
                } else if size != Some(original.len().to_string()) {
                    problems.push(format!(
                        "value-less, npsflow-original-size {size:?}, expected {}",
                        original.len()
                    ));
                } else {
                    case.note = "dead letter without its value".into();
                }
            }
            for (name, value) in &case.headers {
                let kept = message.headers().is_some_and(|h| {
                    h.iter()
                        .any(|x| x.key == name && x.value == Some(value.as_slice()))
                });
                if !kept {
                    problems.push(format!("input header {name} not kept"));
                }
            }
        }
    }
    let unattributed = dead_letters.len() - attributed.min(dead_letters.len());
    if unattributed > 0 {
        failures.push(format!(
            "{unattributed} dead letters match no message that was sent"
        ));
    }
}

/// Hostile requests: odd paths, queries and methods, oversized heads, garbage, many
/// connections at once and connections that never finish their request. Every one must get
/// a proper answer, never a 5xx (`/readyz` may say 503).
async fn http_checks(port: u16, failures: &mut Vec<String>) {
    let long_path = format!("/v1/segments/{}", "a".repeat(64 * 1024));
    let long_header = |kib: usize| {
        format!(
            "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Long: {}\r\nConnection: close\r\n\r\n",
            "h".repeat(kib * 1024)
        )
        .into_bytes()
    };
    let many_headers: String = (0..1000).map(|i| format!("X-H{i}: v\r\n")).collect();
    let many_headers = format!(
        "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n{many_headers}Connection: close\r\n\r\n"
    );
    let requests: Vec<(String, Vec<u8>, &[u16])> = vec![
        ("GET /v1/segments/all?window=28d".into(), get_request("/v1/segments/all?window=28d"), &[200]),
        ("GET /v1/segments/%00".into(), get_request("/v1/segments/%00"), &[400, 404]),
        (
            "GET /v1/segments/..%2F..%2Fetc%2Fpasswd".into(),
            get_request("/v1/segments/..%2F..%2Fetc%2Fpasswd"),
            &[400, 404],
        ),
        (
            "GET /v1/segments/../../etc/passwd".into(),
            get_request("/v1/segments/../../etc/passwd"),
            &[400, 404],
        ),
        ("GET /v1/segments/<64 KiB>".into(), get_request(&long_path), &[400, 404, 414, 431]),
        ("GET /v1/segments/%FF%FE".into(), get_request("/v1/segments/%FF%FE"), &[400, 404]),
        ("GET /v1/segments/%C0%AF".into(), get_request("/v1/segments/%C0%AF"), &[400, 404]),
        ("GET /v1/segments/all?window=1y".into(), get_request("/v1/segments/all?window=1y"), &[400]),
        ("GET /v1/segments?window=1y".into(), get_request("/v1/segments?window=1y"), &[400]),
        (
            "GET /v1/segments/all?window=1h&window=7d".into(),
            get_request("/v1/segments/all?window=1h&window=7d"),
            &[200, 400],
        ),
        ("GET /v1/segments/all?window=".into(), get_request("/v1/segments/all?window="), &[200, 400]),
        ("GET /v1/segments/all?window=%FF".into(), get_request("/v1/segments/all?window=%FF"), &[400]),
        ("GET /v1/segments/all?window=%00".into(), get_request("/v1/segments/all?window=%00"), &[400]),
        (
            "GET /v1/segments/all?window=7d&&&==&%".into(),
            get_request("/v1/segments/all?window=7d&&&==&%"),
            &[200, 400],
        ),
        ("GET /v1/segments/all/extra".into(), get_request("/v1/segments/all/extra"), &[404]),
        ("GET //v1//segments".into(), get_request("//v1//segments"), &[404]),
        ("GET /v1/segments/tier=__other__".into(), get_request("/v1/segments/tier=__other__"), &[200]),
        (
            "POST /v1/segments".into(),
            b"POST /v1/segments HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"
                .to_vec(),
            &[404, 405],
        ),
        (
            "DELETE /v1/segments/all".into(),
            b"DELETE /v1/segments/all HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec(),
            &[404, 405],
        ),
        (
            "PUT /metrics".into(),
            b"PUT /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                .to_vec(),
            &[404, 405],
        ),
        (
            "DELETE /healthz".into(),
            b"DELETE /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec(),
            &[404, 405],
        ),
        (
            "TRACE /metrics".into(),
            b"TRACE /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec(),
            &[404, 405],
        ),
        (
            "OPTIONS *".into(),
            b"OPTIONS * HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec(),
            &[400, 404, 405],
        ),
        // No limit is promised below hyper's buffer (~400 KiB): any proper answer.
        ("GET /metrics with a 100 KiB header".into(), long_header(100), &[200, 400, 431]),
        ("GET /metrics with a 1 MiB header".into(), long_header(1024), &[400, 431]),
        ("GET /healthz with 1000 headers".into(), many_headers.into_bytes(), &[200, 400, 431]),
        ("garbage request line".into(), b"GARBAGE\r\n\r\n".to_vec(), &[400]),
        (
            "GET with a chunked body".into(),
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
                .to_vec(),
            &[200, 400],
        ),
        (
            "absolute-form URI".into(),
            b"GET http://evil.example/v1/segments HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                .to_vec(),
            &[200, 400, 404],
        ),
    ];
    for (what, request, allowed) in requests {
        match http_raw(port, request).await {
            Ok((status, _)) if allowed.contains(&status) => {}
            Ok((status, body)) => failures.push(format!(
                "HTTP {what}: {status} {}, expected one of {allowed:?}",
                String::from_utf8_lossy(&body[..body.len().min(200)])
            )),
            Err(e) => failures.push(format!("HTTP {what}: {e}")),
        }
    }

    // 50 connections that send half a request and hang on to it, while 200 others connect
    // at once and must all be answered.
    let mut idle = Vec::new();
    for _ in 0..50 {
        if let Ok(mut stream) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
            let _ = stream
                .write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
                .await;
            idle.push(stream);
        }
    }
    let paths = [
        "/metrics",
        "/healthz",
        "/readyz",
        "/v1/segments",
        "/v1/segments/all?window=1h",
        "/v1/segments/tier=flood-001",
        "/v1/segments/nope",
    ];
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(200));
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let path = paths[i % paths.len()];
            let barrier = barrier.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                (path, http_raw(port, get_request(path)).await)
            })
        })
        .collect();
    let mut answered = 0;
    let mut statuses: BTreeMap<u16, usize> = BTreeMap::new();
    for task in tasks {
        let (path, result) = task.await.expect("task");
        match result {
            Ok((status, _)) => {
                *statuses.entry(status).or_default() += 1;
                let fine = status < 500 || (path == "/readyz" && status == 503);
                if fine {
                    answered += 1;
                } else {
                    failures.push(format!("concurrent GET {path}: {status}"));
                }
            }
            Err(e) => failures.push(format!("concurrent GET {path}: {e}")),
        }
    }
    println!("hostile: 200 concurrent requests, {answered} answered properly: {statuses:?}");
    match get(port, "/healthz").await {
        Ok((200, _)) => {}
        other => failures.push(format!(
            "GET /healthz with 50 half-open connections: {other:?}"
        )),
    }
    drop(idle);
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(program))
            .find(|path| path.is_file())
    })
}

/// The table itself, checked with serde_json alone (no broker, no npsflow code): sizes are
/// exact, bytes that must not be UTF-8 are not, `not_json` cases are not JSON, `not_object`
/// ones are JSON but not objects, and accepted ones are valid by the contract's rules.
#[test]
fn the_case_table_is_what_it_says() {
    let now = npsflow_runtime::wall_now().millis();
    let table = build_table("selfcheck", now);
    assert!(table.cases.len() >= 60, "{} cases", table.cases.len());
    assert_eq!(flood_payloads(&table).len(), FLOOD);
    let size = |label: &str| {
        let case = table.cases.iter().find(|c| c.label == label).expect(label);
        case.payload.as_ref().expect("payload").len()
    };
    assert_eq!(size("size-999800"), 999_800);
    assert_eq!(size("size-1MiB"), 1 << 20);
    assert_eq!(size("size-at-limit"), MAX_MESSAGE_BYTES);
    assert_eq!(size("size-limit+1"), MAX_MESSAGE_BYTES + 1);
    assert_eq!(size("size-10MiB"), 10 << 20);
    for case in &table.cases {
        let Some(payload) = &case.payload else {
            continue;
        };
        let label = &case.label;
        let utf8 = std::str::from_utf8(payload).is_ok();
        assert_eq!(
            utf8,
            case.expected != Expect::Invalid("not_utf8"),
            "{label}: UTF-8 {utf8}"
        );
        if label.starts_with("deep-") || label.starts_with("size-") || label == "unknown-1e400" {
            continue; // beyond serde_json's limits, or checked by size above
        }
        let json: Result<serde_json::Value, _> = serde_json::from_slice(payload);
        match &case.expected {
            Expect::Invalid("not_utf8") => {}
            Expect::Invalid("not_json") => assert!(json.is_err(), "{label} is JSON"),
            Expect::Invalid("not_object") => {
                assert!(json.is_ok_and(|j| !j.is_object()), "{label}")
            }
            Expect::Accepted => {
                let json = json.unwrap_or_else(|e| panic!("{label}: {e}"));
                let id = json["response_id"].as_str().expect(label);
                assert!((1..=128).contains(&id.chars().count()), "{label}");
                assert!(json["score"].as_u64().is_some_and(|s| s <= 10), "{label}");
                assert!(json["customer_id"].is_string(), "{label}");
                assert!(json["responded_at"].is_string(), "{label}");
            }
            _ => assert!(json.is_ok(), "{label} is not JSON"),
        }
    }
}
