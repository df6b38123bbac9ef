//! The contract artefacts under `deploy/schemas/` against the code (the decoder side; the
//! schema side is `deploy/schemas/check.py`, run by `scripts/schemas.sh`):
//!
//! - every sample in `deploy/schemas/samples/<format>.jsonl` gets the verdict and reason code
//!   it states from the production decoder (`decode` / `repartition_key` for survey responses,
//!   `decode_outcome` for outcome events); every reason code has a sample;
//! - the output samples (alerts, cases, escalation notices) marked valid are read back by
//!   npsflow's own readers, and cases and notices round-trip byte for byte as JSON values;
//! - the schemas' enums and limits are the core's (reason codes, event types, resolutions,
//!   states, escalation reasons, lengths);
//! - real outputs are written for the schema check to validate: alerts, cases and escalation
//!   notices made by the core (`DetractorAlert::for_response`, `CaseBook`) from every valid
//!   sample, and the alerts, cases, escalation notices and dead-letter headers that the whole
//!   pipeline writes on the in-process broker; also a corpus of timestamps with the decoder's
//!   verdict, and the samples' raw messages for `npsflow validate`.
//!
//! Outputs go to `$NPSFLOW_SCHEMA_OUTPUTS`, or `schema-outputs` in Cargo's temporary directory
//! for integration tests.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use npsflow_core::case::{ContactResult, EscalationReason, MAX_HISTORY, MAX_ROOT_CAUSES};
use npsflow_core::intake::invitation_key;
use npsflow_core::response::{MAX_COMMENT_CHARS, MAX_ID_CHARS, MAX_SEGMENT_ENTRIES};
use npsflow_core::{
    decode, decode_alert, decode_invitation, decode_outcome, repartition_key, AccountDelta,
    AccountSnapshot, CaseBook, CaseState, DetractorAlert, Effect, EscalationNotice, FollowupCase,
    FollowupPolicy, InvalidOutcome, InvalidReason, Outcome, OutcomeEvent, OutcomeType, Resolution,
    Routing, Score, SegmentDelta, SegmentRoute, SegmentSnapshot, Severity, Timestamp,
};
use npsflow_runtime::accounts::AccountRow;
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::Message;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;

mod util;

use util::*;

fn schemas_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/schemas")
}

fn outputs_dir() -> PathBuf {
    let dir = std::env::var_os("NPSFLOW_SCHEMA_OUTPUTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_TARGET_TMPDIR")).join("schema-outputs"));
    std::fs::create_dir_all(&dir).expect("outputs directory");
    dir
}

/// Writes `lines` (each without a newline) to `name` in the outputs directory.
fn write_lines(name: &str, lines: impl IntoIterator<Item = Vec<u8>>) {
    let mut bytes = Vec::new();
    for line in lines {
        assert!(!line.contains(&b'\n'), "{name}: a line with a newline");
        bytes.extend_from_slice(&line);
        bytes.push(b'\n');
    }
    std::fs::write(outputs_dir().join(name), bytes).expect("write output");
}

fn schema(name: &str) -> Value {
    let path = schemas_dir().join(format!("{name}.schema.json"));
    serde_json::from_slice(&std::fs::read(&path).expect("schema")).expect("schema is JSON")
}

/// One line of a samples file.
struct Sample {
    line: usize,
    valid: bool,
    /// For records npsflow writes and reads back: the reader's verdict where it differs from
    /// `valid` (it ignores a field or an invariant that the schema checks).
    decodes: Option<bool>,
    reason: Option<String>,
    note: String,
    bytes: Vec<u8>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SampleLine {
    valid: bool,
    reason: Option<String>,
    #[serde(default)]
    schema_valid: Option<bool>,
    #[serde(default)]
    decodes: Option<bool>,
    note: String,
    #[serde(default, deserialize_with = "raw")]
    message: Option<Box<RawValue>>,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    hex: Option<String>,
}

/// The message exactly as written in the line (`null` included), not re-encoded.
fn raw<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Box<RawValue>>, D::Error> {
    Box::<RawValue>::deserialize(d).map(Some)
}

fn from_hex(text: &str) -> Vec<u8> {
    assert!(text.len().is_multiple_of(2), "hex of odd length");
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).expect("hex"))
        .collect()
}

fn samples(format: &str) -> Vec<Sample> {
    let path = schemas_dir().join(format!("samples/{format}.jsonl"));
    let text = std::fs::read_to_string(&path).expect("samples");
    text.lines()
        .enumerate()
        .map(|(i, line)| {
            let parsed: SampleLine = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{format}.jsonl:{}: {e}", i + 1));
            let bytes = match (parsed.message, parsed.text, parsed.hex) {
                (Some(raw), None, None) => raw.get().as_bytes().to_vec(),
                (None, Some(text), None) => text.into_bytes(),
                (None, None, Some(hex)) => from_hex(&hex),
                _ => panic!("{format}.jsonl:{}: one of message, text, hex", i + 1),
            };
            // Input samples name the decoder's reason exactly when invalid; output samples
            // (what npsflow writes) have no decoder reason.
            let input = matches!(
                format,
                "survey-response" | "followup-outcome" | "survey-invitation"
            );
            assert_eq!(
                input && !parsed.valid,
                parsed.reason.is_some(),
                "{format}.jsonl:{}: a reason exactly for invalid input samples",
                i + 1
            );
            if parsed.schema_valid.is_some() {
                assert_ne!(
                    parsed.schema_valid,
                    Some(parsed.valid),
                    "{format}.jsonl:{}: schema_valid only where it differs",
                    i + 1
                );
            }
            if parsed.decodes.is_some() {
                assert!(!input, "{format}.jsonl:{}: decodes is for outputs", i + 1);
                assert_ne!(
                    parsed.decodes,
                    Some(parsed.valid),
                    "{format}.jsonl:{}: decodes only where it differs",
                    i + 1
                );
            }
            Sample {
                line: i + 1,
                valid: parsed.valid,
                decodes: parsed.decodes,
                reason: parsed.reason,
                note: parsed.note,
                bytes,
            }
        })
        .collect()
}

fn check_reason(format: &str, sample: &Sample, got: Option<(&str, String)>) {
    let expected = sample.reason.as_deref();
    let code = got.as_ref().map(|(code, _)| *code);
    assert_eq!(
        code, expected,
        "{format}.jsonl:{} ({}): the decoder says {:?}",
        sample.line, sample.note, got
    );
    if let Some((_, sentence)) = got {
        assert!(!sentence.is_empty());
    }
}

#[test]
fn survey_response_samples_get_the_decoders_verdict() {
    let samples = samples("survey-response");
    let mut codes = BTreeSet::new();
    for sample in &samples {
        let got = decode(&sample.bytes).err();
        // The ingest role's first step decides with the size limit first; below it, the same.
        assert_eq!(
            repartition_key(&sample.bytes, usize::MAX).err(),
            got,
            "line {}",
            sample.line
        );
        check_reason(
            "survey-response",
            sample,
            got.map(|r| (r.code(), r.to_string())),
        );
        codes.extend(sample.reason.clone());
    }
    let every: BTreeSet<String> = InvalidReason::CODES
        .iter()
        .filter(|code| **code != "too_large") // not decoded: the size limit, tested in validate
        .map(|code| code.to_string())
        .collect();
    assert_eq!(codes, every, "every reason code has a sample, and no other");
    write_lines(
        "survey-response.messages",
        samples.iter().map(|s| s.bytes.clone()),
    );
    write_lines(
        "survey-response.valid.messages",
        samples.iter().filter(|s| s.valid).map(|s| s.bytes.clone()),
    );
}

#[test]
fn outcome_samples_get_the_decoders_verdict() {
    let samples = samples("followup-outcome");
    let mut codes = BTreeSet::new();
    for sample in &samples {
        let got = decode_outcome(&sample.bytes).err();
        check_reason(
            "followup-outcome",
            sample,
            got.map(|r| (r.code(), r.to_string())),
        );
        codes.extend(sample.reason.clone());
    }
    let every: BTreeSet<String> = outcome_reasons()
        .iter()
        .map(|r| r.code().to_owned())
        .collect();
    assert_eq!(codes, every, "every reason code has a sample, and no other");
    write_lines(
        "followup-outcome.messages",
        samples.iter().map(|s| s.bytes.clone()),
    );
}

#[test]
fn survey_invitation_samples_get_the_decoders_verdict() {
    let samples = samples("survey-invitation");
    let mut codes = BTreeSet::new();
    for sample in &samples {
        let got = decode_invitation(&sample.bytes).err();
        // The ingest role's first step decides with the size limit first; below it, the same.
        assert_eq!(
            invitation_key(&sample.bytes, usize::MAX).err(),
            got,
            "line {}",
            sample.line
        );
        check_reason(
            "survey-invitation",
            sample,
            got.map(|r| (r.code(), r.to_string())),
        );
        codes.extend(sample.reason.clone());
    }
    let every: BTreeSet<String> = InvalidReason::CODES
        .iter()
        // A size, not content; and an invitation has no score.
        .filter(|code| !matches!(**code, "too_large" | "score_out_of_range"))
        .map(|code| code.to_string())
        .collect();
    assert_eq!(codes, every, "every reason code has a sample, and no other");
    let schema = schema("survey-invitation");
    let p = &schema["properties"];
    for field in ["invitation_id", "customer_id"] {
        assert_eq!(p[field]["maxLength"], MAX_ID_CHARS, "{field}");
    }
    assert_eq!(p["segments"]["maxProperties"], MAX_SEGMENT_ENTRIES);
}

/// The records npsflow writes and reads back itself (deltas, snapshots, the account view):
/// every sample gets its verdict from npsflow's reader (`decodes` where the reader is more
/// lenient than what npsflow writes), each file has samples the reader refuses, and the valid
/// ones are written back exactly as they are.
#[test]
fn internal_record_samples_get_the_readers_verdict() {
    fn check<T: serde::Serialize>(format: &str, read: impl Fn(&[u8]) -> Result<T, String>) {
        let samples = samples(format);
        assert!(samples.iter().any(|s| s.valid), "{format}: no valid sample");
        assert!(
            samples.iter().any(|s| !s.decodes.unwrap_or(s.valid)),
            "{format}: no sample the reader refuses"
        );
        for sample in &samples {
            let got = read(&sample.bytes);
            assert_eq!(
                got.is_ok(),
                sample.decodes.unwrap_or(sample.valid),
                "{format}.jsonl:{} ({}): the reader says {:?}",
                sample.line,
                sample.note,
                got.as_ref().err()
            );
            if let (true, Ok(value)) = (sample.valid, &got) {
                assert_round_trip(
                    value,
                    &sample.bytes,
                    &format!("{format}.jsonl"),
                    sample.line,
                );
            }
        }
    }
    check("segment-delta", |b| {
        SegmentDelta::from_json(b).map_err(|e| e.to_string())
    });
    check("account-delta", |b| {
        AccountDelta::from_json(b).map_err(|e| e.to_string())
    });
    check("segment-snapshot", |b| {
        SegmentSnapshot::from_json(b).map_err(|e| e.to_string())
    });
    check("account-snapshot", |b| {
        AccountSnapshot::from_json(b).map_err(|e| e.to_string())
    });
    check("account-view", |b| {
        serde_json::from_slice::<AccountRow>(b).map_err(|e| e.to_string())
    });
}

/// The field names of a JSON value, nested ones as `outer.inner`.
fn field_names(value: &Value, prefix: &str, names: &mut BTreeSet<String>) {
    if let Value::Object(fields) = value {
        for (key, inner) in fields {
            let name = format!("{prefix}{key}");
            field_names(inner, &format!("{name}."), names);
            names.insert(name);
        }
    }
}

/// The segment view has no reader beyond JSON: its valid samples must have exactly the fields
/// of a record `Row::to_json` writes.
#[test]
fn segment_view_samples_have_the_fields_npsflow_writes() {
    let rows = segment_view_rows();
    let mut written = BTreeSet::new();
    field_names(&rows[0], "", &mut written);
    for sample in samples("segment-view") {
        let value: Value = serde_json::from_slice(&sample.bytes).expect("JSON");
        let mut names = BTreeSet::new();
        field_names(&value, "", &mut names);
        if sample.valid {
            assert_eq!(names, written, "segment-view.jsonl:{}", sample.line);
        }
    }
}

/// Summaries of a few segments as the aggregate role computes them (`AggregateView` on
/// `SegmentStore`): responses and invitations in this window and the one before.
fn segment_view_rows() -> Vec<Value> {
    use npsflow_runtime::config::ClockKind;
    use npsflow_runtime::view::AggregateView;
    let windows =
        npsflow_core::WindowSpecs::new(&["1h", "7d"], 60, npsflow_core::Span(0)).expect("windows");
    let mut view = AggregateView::new(windows, ClockKind::Wall, 5);
    view.restore(0, &[]);
    let now = Timestamp(T0);
    let hour = 60 * MINUTE;
    // Positions: every response and invitation its own, increasing.
    let deltas = [
        // `all`: this hour and the one before, with invitations: a significant change.
        (
            "all",
            (0..40)
                .map(|i| (i, T0 - hour / 2 + i, 10))
                .chain((0..40).map(|i| (40 + i, T0 - hour - hour / 2 + i, 0)))
                .collect::<Vec<_>>(),
            vec![(80, T0 - MINUTE), (81, T0 - 2 * MINUTE)],
        ),
        (
            "region=east",
            vec![
                (82, T0 - MINUTE, 9),
                (83, T0 - MINUTE, 7),
                (84, T0 - MINUTE, 3),
            ],
            Vec::new(),
        ),
        // Invitations only.
        (
            "product=sedan,region=east",
            Vec::new(),
            vec![(85, T0 - MINUTE)],
        ),
    ];
    for (segment, responses, invitations) in deltas {
        let mut responses = responses;
        let mut invitations = invitations;
        responses.sort_unstable();
        invitations.sort_unstable();
        let delta = SegmentDelta {
            segment: segment.into(),
            partition: 0,
            responses: responses
                .into_iter()
                .map(|(o, t, s)| (o, t - t.rem_euclid(MINUTE), s))
                .collect(),
            invitations,
        };
        let delta = SegmentDelta::from_json(&delta.to_json()).expect("read back");
        view.apply(0, &delta).expect("owned");
    }
    let rows: Vec<Value> = view.rows(now).iter().map(|r| r.to_json(now)).collect();
    assert!(rows
        .iter()
        .any(|r| r["change"]["significant"] == Value::Bool(true)));
    assert!(rows
        .iter()
        .any(|r| r["responses"] == 0 && r["invitations"] == 1));
    rows
}

/// View records, deltas and snapshots made by the core and the aggregate role's view, for
/// the schema check; each read back by npsflow's reader.
#[test]
fn core_view_delta_and_snapshot_records_are_written_for_the_schema_check() {
    write_lines(
        "segment-view.core.jsonl",
        segment_view_rows()
            .iter()
            .map(|r| serde_json::to_vec(r).expect("JSON")),
    );
    let window = npsflow_core::WindowSpecs::new(&["28d"], 60, npsflow_core::Span(0))
        .expect("window")
        .windows()[0]
        .clone();
    let mut book = npsflow_core::AccountBook::new(window.clone());
    let day = 24 * 60 * MINUTE;
    let mut deltas = Vec::new();
    for (account, scores) in [("acme", vec![2, 3, 9]), ("beta", vec![10, 10, 9, 8])] {
        let responses: Vec<(i64, i64, u8)> = scores
            .iter()
            .enumerate()
            .map(|(i, s)| (i as i64 * 65_536, T0 - (i as i64 + 1) * day, *s))
            .collect();
        let delta = AccountDelta {
            account: account.into(),
            partition: 2,
            responses,
        };
        let json = delta.to_json();
        book.apply(&AccountDelta::from_json(&json).expect("read back"));
        deltas.push(json);
    }
    let mut rows = Vec::new();
    let mut snapshots = Vec::new();
    for account in ["acme", "beta"] {
        let summary = book.summary(account, Timestamp(T0)).expect("summary");
        let row = AccountRow::new(account, window.name(), &summary, Timestamp(T0));
        let json = serde_json::to_vec(&row).expect("JSON");
        let back: AccountRow = serde_json::from_slice(&json).expect("read back");
        // As JSON: serde_json reads a float to within an ulp, the same way both times.
        assert_eq!(
            serde_json::to_value(&back).expect("JSON"),
            serde_json::from_slice::<Value>(&json).expect("JSON")
        );
        rows.push(json);
        let snapshot = book.snapshot(account).expect("snapshot").to_json();
        AccountSnapshot::from_json(&snapshot).expect("read back");
        snapshots.push(snapshot);
    }
    write_lines("account-view.core.jsonl", rows);
    write_lines("account-delta.core.jsonl", deltas);
    write_lines("account-snapshot.core.jsonl", snapshots);
    let windows =
        npsflow_core::WindowSpecs::new(&["1h", "7d"], 60, npsflow_core::Span(0)).expect("windows");
    let mut store = npsflow_core::SegmentStore::new(windows);
    let delta = SegmentDelta {
        segment: "region=east".into(),
        partition: 1,
        responses: vec![(1, T0 - MINUTE, 9), (3, T0 - 2 * MINUTE, 4)],
        invitations: vec![(2, T0 - 3 * MINUTE)],
    };
    store.apply(&delta);
    let snapshot = store.snapshot("region=east").expect("snapshot").to_json();
    let back = SegmentSnapshot::from_json(&snapshot).expect("read back");
    assert!(back.windows.iter().all(|w| !w.buckets.is_empty()));
    write_lines("segment-delta.core.jsonl", [delta.to_json()]);
    write_lines("segment-snapshot.core.jsonl", [snapshot]);
}

/// One of each reason an outcome event (or an alert) can be invalid for.
fn outcome_reasons() -> Vec<InvalidOutcome> {
    let all = vec![
        InvalidOutcome::NotJson(String::new()),
        InvalidOutcome::NotAnObject,
        InvalidOutcome::DuplicateField(String::new()),
        InvalidOutcome::MissingField("f"),
        InvalidOutcome::WrongType("f", "t"),
        InvalidOutcome::UnknownValue("f"),
        InvalidOutcome::BadLength("f", 1),
        InvalidOutcome::BadTimestamp("f"),
    ];
    // A new variant must be added above: this match stops compiling without it.
    for reason in &all {
        match reason {
            InvalidOutcome::NotJson(_)
            | InvalidOutcome::NotAnObject
            | InvalidOutcome::DuplicateField(_)
            | InvalidOutcome::MissingField(_)
            | InvalidOutcome::WrongType(..)
            | InvalidOutcome::UnknownValue(_)
            | InvalidOutcome::BadLength(..)
            | InvalidOutcome::BadTimestamp(_) => {}
        }
    }
    all
}

fn strings(value: &Value) -> BTreeSet<String> {
    value
        .as_array()
        .unwrap_or_else(|| panic!("an array: {value}"))
        .iter()
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect()
}

fn names<T: Copy>(all: &[T], name: fn(T) -> &'static str) -> BTreeSet<String> {
    all.iter().map(|v| name(*v).to_owned()).collect()
}

#[test]
fn schema_enums_and_limits_are_the_cores() {
    let headers = schema("dead-letter-headers");
    let mut codes: BTreeSet<String> = InvalidReason::CODES.iter().map(|c| c.to_string()).collect();
    for outcome in [Outcome::TooOld, Outcome::Future] {
        codes.insert(
            outcome
                .dead_letter_reason()
                .expect("dead-lettered")
                .to_owned(),
        );
    }
    codes.extend(outcome_reasons().iter().map(|r| r.code().to_owned()));
    assert_eq!(
        strings(&headers["properties"]["npsflow-error"]["enum"]),
        codes
    );

    let response = schema("survey-response");
    let p = &response["properties"];
    for field in ["response_id", "customer_id"] {
        assert_eq!(p[field]["maxLength"], MAX_ID_CHARS, "{field}");
    }
    assert_eq!(response["$defs"]["optionalId"]["maxLength"], MAX_ID_CHARS);
    assert_eq!(p["comment"]["maxLength"], MAX_COMMENT_CHARS);
    assert_eq!(p["segments"]["maxProperties"], MAX_SEGMENT_ENTRIES);
    assert_eq!(
        p["segments"]["additionalProperties"]["maxLength"],
        MAX_ID_CHARS
    );
    assert_eq!(p["score"]["maximum"], Score::MAX);

    let outcome = schema("followup-outcome");
    let p = &outcome["properties"];
    assert_eq!(
        strings(&p["type"]["enum"]),
        names(OutcomeType::ALL, OutcomeType::as_str)
    );
    assert_eq!(
        strings(&p["resolution"]["enum"]),
        names(Resolution::ALL, Resolution::as_str)
    );
    assert_eq!(
        strings(&p["contact_result"]["enum"]),
        names(ContactResult::ALL, ContactResult::as_str)
    );
    assert_eq!(p["root_causes"]["maxItems"], MAX_ROOT_CAUSES);
    assert_eq!(
        outcome["$defs"]["id"]["maxLength"],
        npsflow_core::case::MAX_ID_CHARS
    );
    assert_eq!(
        p["comment"]["maxLength"],
        npsflow_core::case::MAX_COMMENT_CHARS
    );

    let case = schema("case");
    let record = &case["$defs"]["record"]["properties"];
    assert_eq!(
        strings(&case["$defs"]["state"]["enum"]),
        names(CaseState::ALL, CaseState::as_str)
    );
    assert_eq!(record["history"]["maxItems"], MAX_HISTORY);
    assert_eq!(
        strings(&case["$defs"]["escalation"]["properties"]["reason"]["enum"]),
        names(EscalationReason::ALL, EscalationReason::as_str)
    );
    assert_eq!(
        strings(&case["$defs"]["storedOutcome"]["properties"]["type"]["enum"]),
        names(OutcomeType::ALL, OutcomeType::as_str)
    );
    let severities = names(&Severity::ALL, Severity::as_str);
    assert_eq!(
        strings(&case["$defs"]["caseAlert"]["properties"]["severity"]["enum"]),
        severities
    );
    let alert = schema("detractor-alert");
    assert_eq!(
        strings(&alert["properties"]["severity"]["enum"]),
        severities
    );
    let escalation = schema("escalation");
    assert_eq!(
        strings(&escalation["properties"]["reason"]["enum"]),
        names(EscalationReason::ALL, EscalationReason::as_str)
    );
}

#[test]
fn valid_output_samples_are_read_back_by_npsflow() {
    for sample in samples("detractor-alert").iter().filter(|s| s.valid) {
        decode_alert(&sample.bytes)
            .unwrap_or_else(|e| panic!("detractor-alert.jsonl:{}: {e}", sample.line));
    }
    for sample in samples("case").iter().filter(|s| s.valid) {
        let case: FollowupCase = serde_json::from_slice(&sample.bytes)
            .unwrap_or_else(|e| panic!("case.jsonl:{}: {e}", sample.line));
        assert_round_trip(&case, &sample.bytes, "case.jsonl", sample.line);
    }
    for sample in samples("escalation").iter().filter(|s| s.valid) {
        let notice: EscalationNotice = serde_json::from_slice(&sample.bytes)
            .unwrap_or_else(|e| panic!("escalation.jsonl:{}: {e}", sample.line));
        assert_round_trip(&notice, &sample.bytes, "escalation.jsonl", sample.line);
    }
    let headers = samples("dead-letter-headers");
    assert!(headers.iter().any(|s| s.valid) && headers.iter().any(|s| !s.valid));
}

fn assert_round_trip<T: serde::Serialize>(value: &T, bytes: &[u8], file: &str, line: usize) {
    let original: Value = serde_json::from_slice(bytes).expect("JSON");
    assert_eq!(
        serde_json::to_value(value).expect("serialises"),
        original,
        "{file}:{line}: written back differently"
    );
}

/// 2026-11-22T12:00:00Z
const T0: i64 = 1_795_348_800_000;
const MINUTE: i64 = 60_000;

fn routing() -> Routing {
    Routing::new(
        [("acme".to_owned(), "acme-owner".to_owned())].into(),
        vec![SegmentRoute {
            dimension: "region".into(),
            value: "east".into(),
            owner: "east-desk".into(),
        }],
        "cx-queue",
    )
}

/// Alerts from every valid response sample at every detractor score, cases through their
/// life (every state, reassignment, reopening, recovery, a full history, every valid outcome
/// sample applied), and the escalation notices they send: all written for the schema check,
/// and each case read back by npsflow's reader.
#[test]
fn core_outputs_are_written_for_the_schema_check() {
    let routing = routing();
    let mut alerts = Vec::new();
    for sample in samples("survey-response").iter().filter(|s| s.valid) {
        let mut response = decode(&sample.bytes).expect("valid sample");
        for score in 0..=6 {
            response.score = Score::new(score).expect("score");
            let alert = DetractorAlert::for_response(&response, &routing, Timestamp(T0))
                .expect("a detractor");
            decode_alert(&alert.to_json()).expect("the followup role reads it");
            alerts.push(alert.to_json());
        }
        // Without a named manager, the routing table decides.
        response.account_manager = None;
        let alert =
            DetractorAlert::for_response(&response, &routing, Timestamp(T0)).expect("a detractor");
        alerts.push(alert.to_json());
        response.score = Score::new(7).expect("score");
        assert!(DetractorAlert::for_response(&response, &routing, Timestamp(T0)).is_none());
    }
    write_lines("detractor-alert.core.jsonl", alerts);

    let policy = FollowupPolicy {
        escalation_owners: [
            ("ann".to_owned(), "ann-lead".to_owned()),
            ("ann-lead".to_owned(), "head-of-cx".to_owned()),
        ]
        .into(),
        ..FollowupPolicy::default()
    };
    let mut book = CaseBook::new();
    let mut cases: Vec<Vec<u8>> = Vec::new();
    let mut notices: Vec<Vec<u8>> = Vec::new();
    let mut flush = |book: &CaseBook, out: &mut Vec<Effect>| {
        for effect in out.drain(..) {
            match effect {
                Effect::CaseChanged(id) => {
                    if let Some(case) = book.case(&id) {
                        let json = serde_json::to_vec(case).expect("serialises");
                        let back: FollowupCase = serde_json::from_slice(&json).expect("read back");
                        assert_eq!(&back, case);
                        cases.push(json);
                    }
                }
                Effect::Escalated(notice) => {
                    let json = serde_json::to_vec(&notice).expect("serialises");
                    let back: EscalationNotice = serde_json::from_slice(&json).expect("read back");
                    assert_eq!(back, *notice);
                    notices.push(json);
                }
                _ => {}
            }
        }
    };
    let mut out = Vec::new();
    let alert = |id: &str, score: i64, extra: &str| {
        let text = format!(
            r#"{{"response_id":"{id}","score":{score},"responded_at":"2026-11-22T13:00:00+01:00","customer_id":"cust-{id}"{extra}}}"#
        );
        let response = decode(text.as_bytes()).expect("valid");
        let alert = DetractorAlert::for_response(&response, &routing, Timestamp(T0 + MINUTE))
            .expect("detractor");
        decode_alert(&alert.to_json()).expect("readable")
    };
    let event = |n: &str, case: &str, kind: OutcomeType, minutes: i64| OutcomeEvent {
        event_id: n.to_owned(),
        case_id: case.to_owned(),
        kind,
        occurred_at: Timestamp(T0 + minutes * MINUTE),
        actor: None,
        assignee: None,
        contact_result: None,
        root_causes: Vec::new(),
        resolution: None,
        comment: None,
    };
    let now = Timestamp(T0 + 60 * MINUTE);

    // An outcome before its case: kept, then applied when the alert comes.
    let early = alert("early", 4, "");
    book.apply(
        event("early-ack", &early.alert_id, OutcomeType::Acknowledged, 5),
        &policy,
        now,
        &mut out,
    );
    flush(&book, &mut out);
    let scenarios: Vec<(&str, i64, &str)> = vec![
        ("open", 5, ""),
        (
            "severe",
            2,
            r#","segments":{"region":"east","product":"sedan"}"#,
        ),
        ("ack", 6, r#","account_id":"acme""#),
        ("contacted", 4, r#","survey_id":"q4","comment":"too slow""#),
        ("resolved", 5, ""),
        ("closed", 6, ""),
        ("skipped", 3, ""),
        ("reopened", 5, ""),
        ("reassigned", 5, r#","account_manager":"ann""#),
        ("managed", 6, r#","account_manager":"ann""#),
        ("full", 5, ""),
        ("late", 4, ""),
        ("samples", 5, ""),
    ];
    let mut ids = BTreeMap::new();
    for (name, score, extra) in &scenarios {
        let alert = alert(name, *score, extra);
        ids.insert(*name, alert.alert_id.clone());
        book.open(alert, &policy, now, &mut out);
        flush(&book, &mut out);
    }
    book.open(early, &policy, now, &mut out);
    flush(&book, &mut out);
    let id = |name: &str| ids[name].clone();
    let mut apply = |book: &mut CaseBook, event: OutcomeEvent| {
        book.apply(event, &policy, now, &mut out);
        flush(book, &mut out);
    };
    apply(
        &mut book,
        event("a1", &id("ack"), OutcomeType::Acknowledged, 10),
    );
    apply(
        &mut book,
        OutcomeEvent {
            actor: Some("ann".into()),
            contact_result: Some(ContactResult::Reached),
            comment: Some("called back".into()),
            ..event("c1", &id("contacted"), OutcomeType::Contacted, 10)
        },
    );
    for name in ["resolved", "closed", "reopened"] {
        apply(
            &mut book,
            event("c1", &id(name), OutcomeType::Contacted, 10),
        );
        apply(
            &mut book,
            OutcomeEvent {
                resolution: Some(Resolution::Fixed),
                root_causes: vec!["delivery".into(), "billing".into()],
                ..event("r1", &id(name), OutcomeType::Resolved, 20)
            },
        );
    }
    for name in ["closed", "reopened"] {
        apply(
            &mut book,
            OutcomeEvent {
                resolution: Some(Resolution::Explained),
                root_causes: vec!["delivery".into()],
                ..event("x1", &id(name), OutcomeType::Closed, 30)
            },
        );
    }
    apply(
        &mut book,
        event("o1", &id("reopened"), OutcomeType::Reopened, 40),
    );
    apply(
        &mut book,
        OutcomeEvent {
            resolution: Some(Resolution::NotFixable),
            ..event("x1", &id("skipped"), OutcomeType::Closed, 15)
        },
    );
    apply(
        &mut book,
        OutcomeEvent {
            assignee: Some("bob".into()),
            ..event("g1", &id("reassigned"), OutcomeType::Reassigned, 10)
        },
    );
    for n in 0..MAX_HISTORY + 5 {
        apply(
            &mut book,
            event(&format!("n{n}"), &id("full"), OutcomeType::Note, 10),
        );
    }
    // Out of order: closed first, then what came before it.
    apply(
        &mut book,
        OutcomeEvent {
            resolution: Some(Resolution::Compensated),
            ..event("l3", &id("late"), OutcomeType::Closed, 30)
        },
    );
    apply(
        &mut book,
        event("l1", &id("late"), OutcomeType::Contacted, 10),
    );
    apply(
        &mut book,
        OutcomeEvent {
            contact_result: Some(ContactResult::NoAnswer),
            ..event("l0", &id("late"), OutcomeType::ContactAttempted, 5)
        },
    );
    // Every valid outcome sample, on one case.
    for (n, sample) in samples("followup-outcome")
        .iter()
        .filter(|s| s.valid)
        .enumerate()
    {
        let mut event = decode_outcome(&sample.bytes).expect("valid sample");
        event.case_id = id("samples");
        event.event_id = format!("sample-{n}");
        apply(&mut book, event);
    }
    let mut recovery = |book: &mut CaseBook, name: &str, recovered: bool| {
        let mut out = Vec::new();
        book.record_recovery(
            &id(name),
            recovered,
            &format!("{name}-next"),
            &policy,
            &mut out,
        );
        flush(book, &mut out);
    };
    recovery(&mut book, "closed", true);
    recovery(&mut book, "skipped", false);

    // Deadlines: first contact (48 h), then resolve (7 d); then the notices are confirmed.
    for at in [
        T0 + MINUTE * 61,
        T0 + 49 * 60 * MINUTE,
        T0 + 8 * 24 * 60 * MINUTE,
    ] {
        let mut out = Vec::new();
        book.handle_timeout(Timestamp(at), &policy, &mut out);
        flush(&book, &mut out);
        book.write_repairs(&mut out);
        flush(&book, &mut out);
    }
    let states: BTreeSet<CaseState> = book.cases().map(|c| c.state).collect();
    assert_eq!(
        states.len(),
        CaseState::ALL.len(),
        "every state: {states:?}"
    );
    let reasons: BTreeSet<String> = notices
        .iter()
        .map(|n| serde_json::from_slice::<Value>(n).expect("json")["reason"].to_string())
        .collect();
    assert_eq!(reasons.len(), EscalationReason::ALL.len(), "{reasons:?}");
    assert!(book
        .case(&id("full"))
        .is_some_and(|c| c.history_dropped == 5));
    assert!(book
        .case(&id("managed"))
        .is_some_and(|c| c.escalations.iter().any(|e| e.escalate_to == "head-of-cx")));
    write_lines("case.core.jsonl", cases);
    write_lines("escalation.core.jsonl", notices);
}

/// The decoder's verdict on many timestamps (every day of several years' months including
/// impossible ones, and one-part variations of time, fraction, separator and offset), for the
/// schema check to compare with the schemas' timestamp pattern.
#[test]
fn timestamp_corpus_is_written_for_the_schema_check() {
    let mut texts = Vec::new();
    for year in [
        "0000", "0004", "1900", "2000", "2023", "2024", "2100", "2400", "9999",
    ] {
        for month in 0..=13 {
            for day in 0..=32 {
                texts.push(format!("{year}-{month:02}-{day:02}T12:00:00Z"));
            }
        }
    }
    let date = "2024-02-29";
    for hour in 0..=25 {
        for minute in [0, 59, 60] {
            for second in [0, 59, 60, 61] {
                texts.push(format!("{date}T{hour:02}:{minute:02}:{second:02}Z"));
            }
        }
    }
    let fractions = [
        "",
        ".",
        ".0",
        ".5",
        ".123",
        ".123456789",
        ".1234567890123",
        ",5",
        ".x",
    ];
    let offsets = [
        "Z",
        "z",
        "+00:00",
        "-00:00",
        "+23:59",
        "-23:59",
        "+24:00",
        "-24:00",
        "+01:60",
        "+0100",
        "+01",
        "+1:00",
        "\u{2212}01:00",
        "\u{2013}01:00",
        "",
        " Z",
        "Z ",
        "UTC",
        "GMT",
        "+01:00:00",
        "Zjunk",
    ];
    for separator in ["T", "t", " ", "_", "x", "TT", ""] {
        for fraction in fractions {
            for offset in offsets {
                texts.push(format!("{date}{separator}12:34:56{fraction}{offset}"));
            }
        }
    }
    for odd in [
        "",
        "2024-02-29T12:34:56Z\n",
        "\n2024-02-29T12:34:56Z",
        " 2024-02-29T12:34:56Z",
        "2024-2-29T12:34:56Z",
        "24-02-29T12:34:56Z",
        "+2024-02-29T12:34:56Z",
        "12024-02-29T12:34:56Z",
        "\u{0662}\u{0660}\u{0662}\u{0664}-02-29T12:34:56Z",
        "2024-02-29T12:34Z",
        "2024-02-29T1:34:56Z",
        "2024-02-29T12:34:5Z",
        "2024-02-29",
        "12:34:56Z",
        "2024-02-29T12:34:56.000000000000000000000000000000000000000001Z",
        "2024-02-29T12:34:56.0000000000000000000000000000000000000000001Z",
        "2024-02-29T12:34:56.00000000000000000000000000000000000000000001Z",
    ] {
        texts.push(odd.to_owned());
    }
    let mut lines = Vec::new();
    let mut accepted = 0;
    for text in &texts {
        let quoted = serde_json::to_string(text).expect("a string");
        let response =
            format!(r#"{{"response_id":"r","score":7,"responded_at":{quoted},"customer_id":"c"}}"#);
        let outcome =
            format!(r#"{{"event_id":"e","case_id":"c","type":"note","occurred_at":{quoted}}}"#);
        let survey = decode(response.as_bytes()).is_ok();
        let followup = decode_outcome(outcome.as_bytes()).is_ok();
        accepted += usize::from(survey);
        lines.push(
            serde_json::to_vec(&serde_json::json!({
                "text": text,
                "survey_response": survey,
                "followup_outcome": followup,
            }))
            .expect("JSON"),
        );
    }
    assert!(
        accepted > 1000 && texts.len() - accepted > 1000,
        "{accepted}"
    );
    write_lines("rfc3339.jsonl", lines);
}

fn outcome_message(
    event_id: &str,
    case_id: &str,
    kind: &str,
    occurred_at: &str,
    extra: &str,
) -> Vec<u8> {
    format!(
        r#"{{"event_id":"{event_id}","case_id":"{case_id}","type":"{kind}","occurred_at":"{occurred_at}"{extra}}}"#
    )
    .into_bytes()
}

/// Last header of each name, as text.
fn header_object(message: &rdkafka::message::OwnedMessage) -> Value {
    let mut object = serde_json::Map::new();
    if let Some(headers) = message.headers() {
        for header in headers.iter() {
            let value = header
                .value
                .map(|v| String::from_utf8_lossy(v).into_owned());
            object.insert(
                header.key.to_owned(),
                value.map_or(Value::Null, Value::String),
            );
        }
    }
    Value::Object(object)
}

/// The whole pipeline on the in-process broker, on a hand-moved clock: responses (valid and
/// invalid), outcome events (valid and invalid) and a bad alert; every alert, case record,
/// escalation notice and dead letter's headers it writes are kept for the schema check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipeline_outputs_on_the_in_process_broker_are_written_for_the_schema_check() {
    fail_fast();
    let cluster = rdkafka::mocking::MockCluster::new(1).expect("mock cluster");
    let brokers = cluster.bootstrap_servers();
    let config = config(
        &brokers,
        &[
            ("NPSFLOW__FOLLOWUP__FIRST_CONTACT_SLA", "1h"),
            ("NPSFLOW__FOLLOWUP__RESOLVE_SLA", "2h"),
            ("NPSFLOW__FOLLOWUP__ESCALATION_OWNER", "head-of-cx"),
        ],
    );
    for topic in npsflow_runtime::topics::planned(&config.settings) {
        cluster
            .create_topic(&topic.name, topic.partitions, 1)
            .expect("topic");
    }
    let topics = config.settings.topics.clone();
    let start = npsflow_runtime::wall_now();
    let clock = Arc::new(npsflow_runtime::engine::ManualClock::new(start));
    let pipeline = Pipeline::start_with_clock(&config, clock.clone()).await;

    let plain = OwnedHeaders::new();
    let traced = OwnedHeaders::new().insert(Header {
        key: "trace-id",
        value: Some("abc"),
    });
    let responses: Vec<(Option<&str>, Vec<u8>, OwnedHeaders)> = vec![
        (
            Some("c-severe"),
            response(
                "severe",
                2,
                r#","account_id":"acme","segments":{"region":"east","product":"sedan"},"comment":"never again""#,
            ),
            traced.clone(),
        ),
        (
            Some("c-slow"),
            response("slow", 5, r#","account_manager":"ann","survey_id":"q4""#),
            plain.clone(),
        ),
        (Some("c-fixed"), response("fixed", 6, ""), plain.clone()),
        (Some("c-fan"), response("fan", 10, ""), plain.clone()),
        (
            Some("k-bad-score"),
            response("bad-score", 11, ""),
            traced.clone(),
        ),
        (Some("k-not-utf8"), vec![b'{', 0xff, b'}'], plain.clone()),
        (None, b"not json".to_vec(), plain.clone()),
        (
            Some("k-old"),
            format!(
                r#"{{"response_id":"old","score":9,"responded_at":"{}","customer_id":"c"}}"#,
                now_rfc3339(-29 * 86_400)
            )
            .into_bytes(),
            plain.clone(),
        ),
        (
            Some("k-future"),
            format!(
                r#"{{"response_id":"future","score":9,"responded_at":"{}","customer_id":"c"}}"#,
                now_rfc3339(3_600)
            )
            .into_bytes(),
            plain.clone(),
        ),
    ];
    produce(&brokers, &topics.responses, &responses).await;
    let invitation = format!(
        r#"{{"invitation_id":"inv-1","customer_id":"c-fan","sent_at":"{}","segments":{{"region":"east"}}}}"#,
        now_rfc3339(-120)
    );
    produce(
        &brokers,
        &topics.invitations,
        &[(Some("c-fan"), invitation.into_bytes(), plain.clone())],
    )
    .await;
    wait_until("three cases opened", || {
        pipeline.process.metrics.cases_opened() == 3
    })
    .await;

    let case = |id: &str| npsflow_core::alert_id(id);
    let soon = now_rfc3339(-10);
    let outcomes: Vec<(Option<&str>, Vec<u8>, OwnedHeaders)> = vec![
        outcome_message(
            "e1",
            &case("fixed"),
            "contacted",
            &soon,
            r#","actor":"ann","contact_result":"reached""#,
        ),
        outcome_message(
            "e2",
            &case("fixed"),
            "resolved",
            &soon,
            r#","resolution":"fixed","root_causes":["delivery"]"#,
        ),
        outcome_message(
            "e3",
            &case("fixed"),
            "closed",
            &soon,
            r#","resolution":"fixed","comment":"done""#,
        ),
        outcome_message("e4", &case("slow"), "acknowledged", &soon, ""),
        outcome_message("bad", &case("slow"), "teleported", &soon, ""),
    ]
    .into_iter()
    .map(|payload| (Some("k"), payload, OwnedHeaders::new()))
    .collect();
    produce(&brokers, &topics.followup_outcomes, &outcomes).await;
    let not_an_alert = vec![(
        Some("not-an-alert"),
        br#"{"alert_id":1}"#.to_vec(),
        OwnedHeaders::new(),
    )];
    produce(&brokers, &topics.followups, &not_an_alert).await;
    wait_until("the outcomes applied", || {
        let m = &pipeline.process.metrics;
        m.followup_input_count("outcome", "applied") + m.followup_input_count("outcome", "kept")
            == 4
            && m.followup_input_count("alert", "invalid") == 1
    })
    .await;
    // Past the first-contact deadline (the slow case escalates; the severe one did at once),
    // then past the resolve deadline (both, level 2; never the closed one).
    clock.set(Timestamp(start.millis() + 61 * MINUTE));
    clock.set(Timestamp(start.millis() + 121 * MINUTE));
    let escalations = &topics.escalations;
    wait_until("four escalations", || {
        read_to_end(&brokers, escalations).len() >= 4
    })
    .await;
    // The case records (escalations notified) follow their notices.
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;

    let alerts: Vec<Vec<u8>> = read_topic(&brokers, &topics.followups, 4)
        .iter()
        .filter(|m| m.key() != Some(&b"not-an-alert"[..]))
        .map(|m| m.payload().expect("an alert").to_vec())
        .collect();
    assert_eq!(alerts.len(), 3);
    let cases: Vec<Vec<u8>> = read_to_end(&brokers, &topics.cases)
        .iter()
        .filter_map(|m| m.payload().map(<[u8]>::to_vec))
        .collect();
    for case in &cases {
        let _: FollowupCase = serde_json::from_slice(case).expect("a case record");
    }
    let notices: Vec<Vec<u8>> = read_to_end(&brokers, escalations)
        .iter()
        .map(|m| m.payload().expect("a notice").to_vec())
        .collect();
    let levels: BTreeSet<(String, u8)> = notices
        .iter()
        .map(|n| {
            let notice: EscalationNotice = serde_json::from_slice(n).expect("a notice");
            (notice.case_id, notice.level)
        })
        .collect();
    assert_eq!(
        levels,
        BTreeSet::from([
            (case("severe"), 1),
            (case("slow"), 1),
            (case("severe"), 2),
            (case("slow"), 2)
        ])
    );
    let dead = read_to_end(&brokers, &topics.dead_letters);
    let headers: Vec<Value> = dead.iter().map(header_object).collect();
    let codes: BTreeSet<&str> = headers
        .iter()
        .filter_map(|h| h["npsflow-error"].as_str())
        .collect();
    assert_eq!(
        codes,
        BTreeSet::from([
            "score_out_of_range",
            "not_utf8",
            "not_json",
            "too_old",
            "future",
            "unknown_value",
            // The alert that is not one (followup role).
            "wrong_type"
        ]),
        "{headers:?}"
    );
    assert_eq!(headers.len(), 7, "{headers:?}");
    assert!(headers.iter().any(|h| h["trace-id"] == "abc"));
    let (status, api) = pipeline.get("/v1/cases?limit=10").await;
    assert_eq!(status.as_u16(), 200, "{api}");
    let api_cases: Vec<Vec<u8>> = api["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .map(|c| serde_json::to_vec(c).expect("JSON"))
        .collect();
    assert_eq!(api_cases.len(), 3);
    // A path that is not UTF-8 once decoded gets a JSON error like every other error.
    for uri in ["/v1/cases/%FF", "/v1/segments/%FF"] {
        let (status, body) = pipeline.get(uri).await;
        assert_eq!(status.as_u16(), 400, "{uri}: {body}");
        assert!(body["error"].is_string(), "{uri}: {body}");
    }
    // The internal records and the view topics: deltas (segments, with the invitation, and
    // the account), snapshots and summaries, each read back by npsflow's reader.
    let deltas_topic = &topics.segment_deltas;
    wait_until("an invitation in the deltas", || {
        read_to_end(&brokers, deltas_topic).iter().any(|m| {
            m.payload()
                .and_then(|p| SegmentDelta::from_json(p).ok())
                .is_some_and(|d| !d.invitations.is_empty())
        })
    })
    .await;
    let split = |topic: &str| -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
        let (mut segments, mut accounts) = (Vec::new(), Vec::new());
        for m in read_to_end(&brokers, topic) {
            let Some(payload) = m.payload() else {
                continue; // a tombstone
            };
            if m.key().expect("keyed").starts_with(b"account/") {
                accounts.push(payload.to_vec());
            } else {
                segments.push(payload.to_vec());
            }
        }
        (segments, accounts)
    };
    let (segment_deltas, account_deltas) = split(deltas_topic);
    for delta in &segment_deltas {
        SegmentDelta::from_json(delta).expect("a segment delta");
    }
    for delta in &account_deltas {
        AccountDelta::from_json(delta).expect("an account delta");
    }
    let (segment_snapshots, account_snapshots) = split(&topics.state);
    for snapshot in &segment_snapshots {
        SegmentSnapshot::from_json(snapshot).expect("a segment snapshot");
    }
    for snapshot in &account_snapshots {
        AccountSnapshot::from_json(snapshot).expect("an account snapshot");
    }
    let (segment_views, _) = split(&topics.segment_view);
    let (account_views, _) = split(&topics.account_view);
    for row in &account_views {
        let _: AccountRow = serde_json::from_slice(row).expect("an account row");
    }
    for (name, records) in [
        ("segment deltas", &segment_deltas),
        ("account deltas", &account_deltas),
        ("segment snapshots", &segment_snapshots),
        ("account snapshots", &account_snapshots),
        ("segment summaries", &segment_views),
        ("account summaries", &account_views),
    ] {
        assert!(!records.is_empty(), "no {name}");
    }
    pipeline.stop().await;

    write_lines("segment-delta.broker.jsonl", segment_deltas);
    write_lines("account-delta.broker.jsonl", account_deltas);
    write_lines("segment-snapshot.broker.jsonl", segment_snapshots);
    write_lines("account-snapshot.broker.jsonl", account_snapshots);
    write_lines("segment-view.broker.jsonl", segment_views);
    write_lines("account-view.broker.jsonl", account_views);
    write_lines("detractor-alert.broker.jsonl", alerts);
    write_lines("case.broker.jsonl", cases);
    write_lines("escalation.broker.jsonl", notices);
    write_lines(
        "dead-letter-headers.broker.jsonl",
        headers.iter().map(|h| serde_json::to_vec(h).expect("JSON")),
    );
    write_lines("api-case.broker.jsonl", api_cases);
}
