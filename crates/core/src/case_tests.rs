//! Tests of the case state machine: decoding, the fold, deadlines, recovery, and a property
//! test against a naive oracle over random event orders, duplicates and late events.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;

use super::*;

const HOUR: i64 = 3_600_000;
const T0: i64 = 1_800_000_000_000;

fn policy() -> FollowupPolicy {
    FollowupPolicy {
        first_contact_sla: Span::hours(48),
        resolve_sla: Span::days(7),
        escalate_scores: vec![0, 1],
        escalation_owners: [("ann".to_owned(), "bea".to_owned())].into(),
        escalation_owner: "head-of-cx".into(),
        recovery_horizon: Span::days(180),
        closed_retention: Span::days(200),
        orphan_horizon: Span::days(7),
    }
}

fn alert(case: &str, score: u8) -> CaseAlert {
    CaseAlert {
        alert_id: case.into(),
        response_id: format!("r-{case}"),
        customer_id: format!("cust-{case}"),
        account_id: None,
        survey_id: None,
        owner: "ann".into(),
        score,
        severity: Severity::Medium,
        segments: BTreeMap::new(),
        responded_at: Timestamp(T0),
    }
}

fn event(id: &str, case: &str, kind: OutcomeType, at_hours: i64) -> OutcomeEvent {
    OutcomeEvent {
        event_id: id.into(),
        case_id: case.into(),
        kind,
        occurred_at: Timestamp(T0 + at_hours * HOUR),
        actor: None,
        assignee: (kind == OutcomeType::Reassigned).then(|| format!("agent-{id}")),
        contact_result: None,
        root_causes: Vec::new(),
        resolution: matches!(kind, OutcomeType::Resolved | OutcomeType::Closed)
            .then_some(Resolution::Fixed),
        comment: None,
    }
}

/// A book with `cases` opened at T0 (score 5: no escalation at opening), and what its timer
/// 49 hours on caused: each case's first-contact escalation.
fn escalated(policy: &FollowupPolicy, cases: &[&str]) -> (CaseBook, Vec<Effect>) {
    let mut book = CaseBook::new();
    let mut out = Vec::new();
    for case in cases {
        book.open(alert(case, 5), policy, Timestamp(T0), &mut out);
    }
    out.clear();
    book.handle_timeout(Timestamp(T0 + 49 * HOUR), policy, &mut out);
    (book, out)
}

/// The escalation notices among `effects`.
fn notices(effects: &[Effect]) -> Vec<EscalationNotice> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Escalated(n) => Some((**n).clone()),
            _ => None,
        })
        .collect()
}

fn escalations(effects: &[Effect]) -> Vec<(String, u8)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Escalated(n) => Some((n.case_id.clone(), n.level)),
            _ => None,
        })
        .collect()
}

#[test]
fn outcome_events_decode_with_their_rules() {
    let ok = br#"{"event_id":"e1","case_id":"det-1","type":"reassigned","occurred_at":"2026-11-22T12:00:00+01:00","assignee":"bob","root_causes":["price"],"comment":"x","extra":1}"#;
    let event = decode_outcome(ok).expect("valid");
    assert_eq!(event.kind, OutcomeType::Reassigned);
    assert_eq!(event.assignee.as_deref(), Some("bob"));
    assert_eq!(
        event.occurred_at,
        Timestamp::parse_rfc3339("2026-11-22T11:00:00Z").expect("ts")
    );
    let cases: [(&[u8], &str); 11] = [
        (b"{", "not_json"),
        (b"[1]", "not_an_object"),
        (br#"{"event_id":"e","event_id":"f"}"#, "duplicate_field"),
        (br#"{"case_id":"c","type":"note","occurred_at":"2026-11-22T12:00:00Z"}"#, "missing_field"),
        (br#"{"event_id":"e","case_id":"c","type":"teleported","occurred_at":"2026-11-22T12:00:00Z"}"#, "unknown_value"),
        (br#"{"event_id":"e","case_id":"c","type":"note","occurred_at":"yesterday"}"#, "bad_timestamp"),
        (br#"{"event_id":"","case_id":"c","type":"note","occurred_at":"2026-11-22T12:00:00Z"}"#, "bad_length"),
        (br#"{"event_id":1,"case_id":"c","type":"note","occurred_at":"2026-11-22T12:00:00Z"}"#, "wrong_type"),
        (br#"{"event_id":"e","case_id":"c","type":"reassigned","occurred_at":"2026-11-22T12:00:00Z"}"#, "missing_field"),
        (br#"{"event_id":"e","case_id":"c","type":"closed","occurred_at":"2026-11-22T12:00:00Z"}"#, "missing_field"),
        (br#"{"event_id":"e","case_id":"c","type":"note","occurred_at":"2026-11-22T12:00:00Z","root_causes":"price"}"#, "wrong_type"),
    ];
    for (bytes, code) in cases {
        let error = decode_outcome(bytes).expect_err(&String::from_utf8_lossy(bytes));
        assert_eq!(error.code(), code, "{}", String::from_utf8_lossy(bytes));
    }
    // The detail never quotes the message.
    let secret = br#"{"event_id":"e","case_id":"c","type":"note","occurred_at":"2026-11-22T12:00:00Z","comment":7}"#;
    assert!(!decode_outcome(secret)
        .expect_err("bad")
        .to_string()
        .contains('7'));
}

#[test]
fn alerts_decode_from_the_followups_json() {
    let json = br#"{"alert_id":"det-1","kind":"detractor","response_id":"r","customer_id":"c","account_id":"acme","survey_id":null,"owner":"ann","route":"account","score":3,"severity":"high","segments":{"region":"east"},"comment":"slow","responded_at":"2026-11-22T12:00:00+01:00","emitted_at":"2026-11-22T11:00:01.000Z"}"#;
    let alert = decode_alert(json).expect("valid");
    assert_eq!(alert.alert_id, "det-1");
    assert_eq!(alert.severity, Severity::High);
    assert_eq!(alert.segments["region"], "east");
    assert!(decode_alert(br#"{"alert_id":"det-1"}"#).is_err());
}

#[test]
fn unusable_alerts_get_the_reason_that_fits_not_always_not_json() {
    let valid: serde_json::Value = serde_json::from_str(
        r#"{"alert_id":"det-1","response_id":"r","customer_id":"c","owner":"ann","score":3,"severity":"high","segments":{"region":"east"},"responded_at":"2026-11-22T12:00:00Z"}"#,
    )
    .expect("json");
    let with = |field: &str, value: serde_json::Value| {
        let mut alert = valid.clone();
        match value {
            serde_json::Value::Null => alert.as_object_mut().expect("object").remove(field),
            value => alert
                .as_object_mut()
                .expect("object")
                .insert(field.to_owned(), value),
        };
        serde_json::to_vec(&alert).expect("bytes")
    };
    let code = |bytes: &[u8]| decode_alert(bytes).expect_err("unusable").code();
    assert!(decode_alert(&serde_json::to_vec(&valid).expect("bytes")).is_ok());
    assert_eq!(code(b"{\"alert_id\":"), "not_json");
    assert_eq!(code(b"\xff\xfe"), "not_json");
    assert_eq!(code(b"[1,2]"), "not_an_object");
    assert_eq!(code(br#"{"owner":"a","owner":"b"}"#), "duplicate_field");
    // A name written with an escape is still the same name.
    assert_eq!(
        code(br#"{"owner":"a","own\u0065r":"b"}"#),
        "duplicate_field"
    );
    // A known field's string with an escape JSON does not allow is not JSON, as anywhere.
    let lone = String::from_utf8(with("owner", "LONE".into()))
        .expect("utf-8")
        .replace(r#""LONE""#, r#""\ud800""#);
    assert_eq!(code(lone.as_bytes()), "not_json");
    // Unknown fields are checked for syntax only and otherwise ignored.
    let extra = String::from_utf8(with("extra", "EXTRA".into()))
        .expect("utf-8")
        .replace(
            r#""EXTRA""#,
            r#"{"deep":[1,{"a":null}],"n":1e400,"s":"\ud800"}"#,
        );
    assert!(decode_alert(extra.as_bytes()).is_ok(), "{extra}");
    assert_eq!(code(&extra.as_bytes()[..extra.len() - 1]), "not_json");
    for field in [
        "alert_id",
        "response_id",
        "customer_id",
        "owner",
        "score",
        "severity",
    ] {
        assert_eq!(
            code(&with(field, serde_json::Value::Null)),
            "missing_field",
            "{field}"
        );
    }
    assert_eq!(
        code(&with("responded_at", serde_json::Value::Null)),
        "missing_field"
    );
    assert_eq!(code(&with("alert_id", 7.into())), "wrong_type");
    assert_eq!(code(&with("score", "3".into())), "wrong_type");
    assert_eq!(code(&with("score", 300.into())), "wrong_type");
    assert_eq!(code(&with("account_id", 1.into())), "wrong_type");
    assert_eq!(
        code(&with("segments", serde_json::json!({"region": 1}))),
        "wrong_type"
    );
    assert_eq!(code(&with("severity", "urgent".into())), "unknown_value");
    assert_eq!(
        code(&with("responded_at", "yesterday".into())),
        "bad_timestamp"
    );
    let detail = decode_alert(&with("customer_id", 12345.into()))
        .expect_err("unusable")
        .to_string();
    assert!(!detail.contains("12345"), "{detail}");
}

#[test]
fn late_events_are_applied_in_time_order_and_reopen_goes_back_to_contacted() {
    let policy = policy();
    let mut book = CaseBook::new();
    let mut out = Vec::new();
    let now = Timestamp(T0 + HOUR);
    book.open(alert("c", 5), &policy, now, &mut out);
    book.apply(
        event("e3", "c", OutcomeType::Resolved, 30),
        &policy,
        now,
        &mut out,
    );
    assert_eq!(book.case("c").expect("present").state, CaseState::Resolved);
    // Earlier events never move it backwards.
    book.apply(
        event("e1", "c", OutcomeType::Acknowledged, 2),
        &policy,
        now,
        &mut out,
    );
    book.apply(
        event("e2", "c", OutcomeType::Contacted, 10),
        &policy,
        now,
        &mut out,
    );
    let case = book.case("c").expect("present");
    assert_eq!(case.state, CaseState::Resolved);
    assert_eq!(case.first_contact_at, Some(Timestamp(T0 + 10 * HOUR)));
    assert_eq!(
        case.history
            .iter()
            .map(|e| e.event_id.as_str())
            .collect::<Vec<_>>(),
        ["e1", "e2", "e3"]
    );
    book.apply(
        event("e4", "c", OutcomeType::Closed, 40),
        &policy,
        now,
        &mut out,
    );
    book.apply(
        event("e5", "c", OutcomeType::Reopened, 50),
        &policy,
        now,
        &mut out,
    );
    let case = book.case("c").expect("present");
    assert_eq!(case.state, CaseState::Contacted);
    assert_eq!(case.closed_at, None);
    // A reopen before the close happened (late) does not undo the close.
    book.apply(
        event("e6", "c", OutcomeType::Closed, 60),
        &policy,
        now,
        &mut out,
    );
    book.apply(
        event("e0", "c", OutcomeType::Reopened, 1),
        &policy,
        now,
        &mut out,
    );
    assert_eq!(book.case("c").expect("present").state, CaseState::Closed);
    // Reassignment changes the owner; a repeat is a duplicate.
    book.apply(
        event("e7", "c", OutcomeType::Reassigned, 61),
        &policy,
        now,
        &mut out,
    );
    assert_eq!(book.case("c").expect("present").owner, "agent-e7");
    out.clear();
    book.apply(
        event("e7", "c", OutcomeType::Reassigned, 61),
        &policy,
        now,
        &mut out,
    );
    assert_eq!(out, [Effect::Duplicate("outcome")]);
}

#[test]
fn deadlines_escalate_each_level_once_and_never_a_closed_case() {
    let policy = policy();
    let mut book = CaseBook::new();
    let mut out = Vec::new();
    let open_at = Timestamp(T0 + HOUR);
    book.open(alert("late", 5), &policy, open_at, &mut out);
    book.open(alert("closed", 5), &policy, open_at, &mut out);
    book.open(alert("severe", 1), &policy, open_at, &mut out);
    // The severe score escalates at once.
    assert_eq!(book.poll_timeout(), Some(open_at));
    out.clear();
    book.handle_timeout(open_at, &policy, &mut out);
    assert_eq!(escalations(&out), [("severe".to_owned(), 1)]);
    // Nothing else until the first-contact deadline.
    assert_eq!(book.poll_timeout(), Some(Timestamp(T0 + 48 * HOUR)));
    book.apply(
        event("x", "closed", OutcomeType::Closed, 47),
        &policy,
        open_at,
        &mut out,
    );
    out.clear();
    // A burst of overdue deadlines (e.g. after a restart): both levels, once each.
    let much_later = Timestamp(T0 + 30 * 24 * HOUR);
    book.handle_timeout(much_later, &policy, &mut out);
    let mut fired = escalations(&out);
    fired.sort();
    assert_eq!(
        fired,
        [
            ("late".to_owned(), 1),
            ("late".to_owned(), 2),
            ("severe".to_owned(), 2)
        ]
    );
    let notice = out.iter().find_map(|e| match e {
        Effect::Escalated(n) if n.level == 2 && n.case_id == "late" => Some(n.clone()),
        _ => None,
    });
    let notice = notice.expect("level 2");
    assert_eq!(notice.escalation_id, "late:2");
    assert_eq!(
        notice.escalate_to, "head-of-cx",
        "bea has no escalation owner"
    );
    assert_eq!(notice.reason, EscalationReason::ResolveOverdue);
    out.clear();
    book.handle_timeout(Timestamp(much_later.0 + 1), &policy, &mut out);
    assert!(escalations(&out).is_empty());
    assert_eq!(book.case("late").expect("present").escalation_level, 2);
    // Level 1 went to the owner's escalation owner.
    assert_eq!(
        book.case("late").expect("present").escalations[0].escalate_to,
        "bea"
    );
}

/// A crash between writing a case (which took in the outcomes that waited for it) and
/// removing those outcomes leaves both on the topics: read back in either order, the case
/// keeps them and they wait no more (no second application, no expiry counted later), and
/// their record is tombstoned.
#[test]
fn outcomes_read_back_for_a_case_already_written_are_dropped_and_tombstoned() {
    let policy = policy();
    let mut written = CaseBook::new();
    let mut out = Vec::new();
    let now = Timestamp(T0);
    written.apply(
        event("e1", "early", OutcomeType::Contacted, 1),
        &policy,
        now,
        &mut out,
    );
    let waiting = written.orphans("early").expect("waiting").clone();
    written.open(alert("early", 5), &policy, Timestamp(T0 + HOUR), &mut out);
    let case = written.case("early").expect("present").clone();
    assert_eq!(case.state, CaseState::Contacted);
    for case_first in [true, false] {
        let mut book = CaseBook::new();
        if case_first {
            book.restore_case(case.clone(), &policy);
            book.restore_orphans("early".to_owned(), waiting.clone());
        } else {
            book.restore_orphans("early".to_owned(), waiting.clone());
            book.restore_case(case.clone(), &policy);
        }
        assert!(book.orphans("early").is_none(), "case first: {case_first}");
        assert_eq!(
            book.case("early").expect("restored").state,
            CaseState::Contacted
        );
        // Their record is tombstoned with the next writes, once.
        assert!(book.has_repairs(), "case first: {case_first}");
        out.clear();
        book.write_repairs(&mut out);
        assert_eq!(out, [Effect::OrphansChanged("early".into())]);
        assert!(!book.has_repairs());
        out.clear();
        book.handle_timeout(Timestamp(T0 + 8 * 24 * HOUR), &policy, &mut out);
        assert!(
            !out.iter().any(|e| matches!(e, Effect::OrphansExpired(_))),
            "case first: {case_first}: {out:?}"
        );
    }
}

#[test]
fn outcomes_before_their_alert_wait_for_it_then_expire() {
    let policy = policy();
    let mut book = CaseBook::new();
    let mut out = Vec::new();
    let now = Timestamp(T0);
    book.apply(
        event("e1", "early", OutcomeType::Contacted, 1),
        &policy,
        now,
        &mut out,
    );
    book.apply(
        event("e1", "early", OutcomeType::Contacted, 1),
        &policy,
        now,
        &mut out,
    );
    book.apply(
        event("e9", "never", OutcomeType::Note, 1),
        &policy,
        now,
        &mut out,
    );
    assert!(out.contains(&Effect::Duplicate("outcome")));
    book.open(alert("early", 5), &policy, Timestamp(T0 + HOUR), &mut out);
    assert_eq!(
        book.case("early").expect("present").state,
        CaseState::Contacted
    );
    assert!(book.orphans("early").is_none());
    out.clear();
    book.handle_timeout(Timestamp(T0 + 8 * 24 * HOUR), &policy, &mut out);
    assert!(out.contains(&Effect::OrphansExpired(1)));
    assert!(book.orphans("never").is_none());
}

#[test]
fn the_next_response_after_closing_decides_recovery() {
    let policy = policy();
    let mut book = CaseBook::new();
    let mut out = Vec::new();
    let now = Timestamp(T0);
    book.open(alert("c", 5), &policy, now, &mut out);
    book.apply(
        event("e1", "c", OutcomeType::Closed, 24),
        &policy,
        now,
        &mut out,
    );
    let closed = out
        .iter()
        .find_map(|e| match e {
            Effect::Notice(n @ FollowupNotice::CaseClosed { .. }) => Some(n.clone()),
            _ => None,
        })
        .expect("a closed notice for the customer");
    assert_eq!(closed.key(), "cust-c");
    assert!(out.iter().any(|e| matches!(
        e,
        Effect::Closed {
            within_sla: true,
            ..
        }
    )));
    // The customer's side (any partition's book).
    let mut customers = CaseBook::new();
    out.clear();
    customers.handle_notice(closed, &policy, &mut out);
    // A response from before the close does not count; the next one does, once.
    let responded = |id: &str, score: u8, hours: i64| FollowupNotice::Responded {
        customer_id: "cust-c".into(),
        response_id: id.into(),
        score,
        responded_at: Timestamp(T0 + hours * HOUR),
    };
    out.clear();
    customers.handle_notice(responded("old", 9, 10), &policy, &mut out);
    assert!(out.is_empty());
    customers.handle_notice(responded("next", 8, 100), &policy, &mut out);
    customers.handle_notice(responded("after", 2, 200), &policy, &mut out);
    let recovery: Vec<FollowupNotice> = out
        .iter()
        .filter_map(|e| match e {
            Effect::Notice(n @ FollowupNotice::Recovery { .. }) => Some(n.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(recovery.len(), 1);
    assert!(customers.watches("cust-c").is_none());
    for notice in recovery {
        assert_eq!(notice.key(), "c");
        book.handle_notice(notice, &policy, &mut out);
    }
    let case = book.case("c").expect("present");
    assert_eq!(case.recovered, Some(true));
    assert_eq!(case.recovery_response_id.as_deref(), Some("next"));
}

#[test]
fn a_watch_without_a_response_ends_at_the_horizon() {
    let policy = policy();
    let mut book = CaseBook::new();
    let mut out = Vec::new();
    let closed = FollowupNotice::CaseClosed {
        customer_id: "k".into(),
        case_id: "c".into(),
        closed_at: Timestamp(T0),
    };
    book.handle_notice(closed, &policy, &mut out);
    out.clear();
    book.handle_timeout(Timestamp(T0 + 179 * 24 * HOUR), &policy, &mut out);
    assert!(out.is_empty());
    book.handle_timeout(Timestamp(T0 + 181 * 24 * HOUR), &policy, &mut out);
    assert!(out.contains(&Effect::RecoveryDecided(RecoveryResult::NoResponse)));
    assert!(book.watches("k").is_none());
}

#[test]
fn closed_cases_are_tombstoned_after_the_retention() {
    let policy = policy();
    let mut book = CaseBook::new();
    let mut out = Vec::new();
    book.open(alert("c", 5), &policy, Timestamp(T0), &mut out);
    book.apply(
        event("e", "c", OutcomeType::Closed, 1),
        &policy,
        Timestamp(T0),
        &mut out,
    );
    out.clear();
    book.handle_timeout(Timestamp(T0 + HOUR + 200 * 24 * HOUR), &policy, &mut out);
    assert_eq!(out, [Effect::CaseChanged("c".into())]);
    assert!(
        book.case("c").is_none(),
        "gone: the runtime writes a tombstone"
    );
}

#[test]
fn an_escalation_found_on_the_topic_is_not_repeated_after_a_restore() {
    let policy = policy();
    let (_, mut out) = escalated(&policy, &["c"]);
    let sent = notices(&out).pop().expect("escalated");
    // A process restored the case as it was before the escalation was written.
    let mut restored = CaseBook::new();
    let mut before = Vec::new();
    restored.open(alert("c", 5), &policy, Timestamp(T0), &mut before);
    let record = restored.case("c").expect("present").clone();
    let mut restored = CaseBook::new();
    restored.restore_case(record, &policy);
    assert!(restored.restore_escalation(&sent, &policy));
    assert!(!restored.restore_escalation(&sent, &policy));
    out.clear();
    restored.handle_timeout(Timestamp(T0 + 50 * HOUR), &policy, &mut out);
    assert!(escalations(&out).is_empty());
}

/// A process that sent a case's escalation and stopped before the case's record was
/// written: after the restore the case is not known, the alert is replayed and opens it again,
/// and the escalation found on the topic is recorded instead of sent a second time.
#[test]
fn an_escalation_sent_before_its_case_was_written_is_not_repeated_after_a_restore() {
    let policy = policy();
    let (_, mut out) = escalated(&policy, &["c"]);
    let sent = notices(&out);
    assert!(!sent.is_empty(), "escalated");
    let mut restored = CaseBook::new();
    for notice in &sent {
        assert!(!restored.restore_escalation(notice, &policy), "no case yet");
    }
    out.clear();
    restored.open(alert("c", 5), &policy, Timestamp(T0 + 50 * HOUR), &mut out);
    restored.handle_timeout(Timestamp(T0 + 50 * HOUR), &policy, &mut out);
    assert!(escalations(&out).is_empty(), "sent again: {out:?}");
    let case = restored.case("c").expect("opened");
    assert_eq!(case.escalations.len(), sent.len());
    assert!(case.escalations.iter().all(|e| e.notified));
}

#[test]
fn an_escalation_is_recorded_notified_in_the_one_record_it_writes() {
    let policy = policy();
    let (mut book, mut out) = escalated(&policy, &["c"]);
    assert_eq!(escalations(&out), [("c".to_owned(), 1)]);
    let written = out
        .iter()
        .filter(|e| matches!(e, Effect::CaseChanged(id) if id == "c"))
        .count();
    assert_eq!(written, 1, "{out:?}");
    let case = book.case("c").expect("present");
    assert!(case.escalations.iter().all(|e| e.notified));
    // Nothing left to confirm: no second write of the record.
    assert!(!book.has_repairs());
    out.clear();
    book.write_repairs(&mut out);
    assert!(out.is_empty(), "{out:?}");
}

#[test]
fn an_escalation_recorded_but_never_sent_of_an_earlier_version_fires_again_after_a_restore() {
    let policy = policy();
    let (book, mut out) = escalated(&policy, &["sent", "lost"]);
    assert_eq!(escalations(&out).len(), 2);
    // Records of earlier versions went out saying "not notified yet", with their notices in
    // the same batch; only one notice did.
    let mut records: Vec<FollowupCase> = book.cases().cloned().collect();
    for record in &mut records {
        record.escalations[0].notified = false;
    }
    let mut restored = CaseBook::new();
    for record in records {
        restored.restore_case(record, &policy);
    }
    let sent: BTreeSet<(String, u8)> = [("sent".to_owned(), 1)].into();
    restored.reconcile_escalations(&sent, &policy);
    assert!(restored.case("sent").expect("present").escalations[0].notified);
    assert!(restored
        .case("lost")
        .expect("present")
        .escalations
        .is_empty());
    out.clear();
    restored.handle_timeout(Timestamp(T0 + 50 * HOUR), &policy, &mut out);
    assert_eq!(
        escalations(&out),
        [("lost".to_owned(), 1)],
        "once more, the lost one only"
    );
    // Confirming writes the records with the escalations notified.
    out.clear();
    restored.write_repairs(&mut out);
    assert!(out.contains(&Effect::CaseChanged("lost".into())));
    assert!(restored.case("lost").expect("present").escalations[0].notified);
    assert!(!restored.has_repairs());
}

#[test]
fn case_records_round_trip_through_json() {
    let policy = policy();
    let mut book = CaseBook::new();
    let mut out = Vec::new();
    book.open(alert("c", 5), &policy, Timestamp(T0), &mut out);
    book.apply(
        event("e", "c", OutcomeType::Resolved, 3),
        &policy,
        Timestamp(T0),
        &mut out,
    );
    let case = book.case("c").expect("present");
    let json = serde_json::to_vec(case).expect("json");
    let back: FollowupCase = serde_json::from_slice(&json).expect("back");
    assert_eq!(&back, case);
    let value: serde_json::Value = serde_json::from_slice(&json).expect("value");
    assert_eq!(value["state"], "resolved");
    assert_eq!(value["first_contact_deadline"], "2027-01-17T08:00:00.000Z");
}

// ---- the oracle ----------------------------------------------------------------------------

/// One event of the pool: (case, kind, hours after the response).
type PoolEvent = (usize, OutcomeType, i64);

#[derive(Debug, Clone)]
enum Action {
    Alert(usize),
    Outcome(usize),
    Tick,
}

fn naive_state(events: &[&OutcomeEvent]) -> (CaseState, String) {
    let mut sorted: Vec<&OutcomeEvent> = events.to_vec();
    sorted.sort_by(|a, b| (a.occurred_at, &a.event_id).cmp(&(b.occurred_at, &b.event_id)));
    let mut state = CaseState::Open;
    let mut owner = "ann".to_owned();
    for e in sorted {
        state = match e.kind {
            OutcomeType::Acknowledged => state.max(CaseState::Acknowledged),
            OutcomeType::Contacted => state.max(CaseState::Contacted),
            OutcomeType::Resolved => state.max(CaseState::Resolved),
            OutcomeType::Closed => CaseState::Closed,
            OutcomeType::Reopened if state >= CaseState::Resolved => CaseState::Contacted,
            OutcomeType::Reassigned => {
                owner = e.assignee.clone().unwrap_or_default();
                state
            }
            _ => state,
        };
    }
    (state, owner)
}

fn kinds() -> impl Strategy<Value = OutcomeType> {
    prop::sample::select(OutcomeType::ALL.to_vec())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]
    #[test]
    fn cases_match_the_oracle_in_any_order(
        scores in prop::collection::vec(0u8..=6, 1..4),
        pool in prop::collection::vec((0usize..3, kinds(), 0i64..400), 0..14),
        steps in prop::collection::vec((0i64..60, 0usize..3, 0usize..20), 1..40),
    ) {
        // Outcomes wait for their case longer than a run lasts here (expiry has its own test).
        let policy = FollowupPolicy { orphan_horizon: Span::days(365), ..policy() };
        let cases = scores.len();
        let pool: Vec<PoolEvent> = pool.into_iter().map(|(c, k, h)| (c % cases, k, h)).collect();
        let events: Vec<OutcomeEvent> = pool
            .iter()
            .enumerate()
            .map(|(i, (c, k, h))| event(&format!("e{i}"), &format!("c{c}"), *k, *h))
            .collect();
        let actions: Vec<(i64, Action)> = steps
            .into_iter()
            .map(|(advance, what, index)| {
                let action = match what {
                    0 => Action::Alert(index % cases),
                    1 if !events.is_empty() => Action::Outcome(index % events.len()),
                    _ => Action::Tick,
                };
                (advance, action)
            })
            .collect();

        let mut book = CaseBook::new();
        let mut fired: Vec<(String, u8)> = Vec::new();
        // The oracle: what is known, and escalations recomputed from scratch every step.
        let mut opened: BTreeMap<usize, Timestamp> = BTreeMap::new();
        let mut known: BTreeSet<usize> = BTreeSet::new();
        let mut expected: BTreeSet<(String, u8)> = BTreeSet::new();
        let mut now = Timestamp(T0);
        for (advance, action) in actions {
            now = Timestamp(now.0 + advance * HOUR);
            let mut out = Vec::new();
            match action {
                Action::Alert(c) => {
                    book.open(alert(&format!("c{c}"), scores[c]), &policy, now, &mut out);
                    opened.entry(c).or_insert(now);
                }
                Action::Outcome(i) => {
                    book.apply(events[i].clone(), &policy, now, &mut out);
                    known.insert(i);
                }
                Action::Tick => {}
            }
            if book.poll_timeout().is_some_and(|due| due <= now) {
                book.handle_timeout(now, &policy, &mut out);
            }
            for effect in &out {
                if let Effect::Escalated(notice) = effect {
                    fired.push((notice.case_id.clone(), notice.level));
                    let (state, _) = naive_state(
                        &known.iter().filter(|i| pool[**i].0 == notice.case_id[1..].parse::<usize>().expect("present")).map(|i| &events[*i]).collect::<Vec<_>>(),
                    );
                    prop_assert!(state != CaseState::Closed, "escalated a closed case");
                }
            }
            for (&c, &opened_at) in &opened {
                let mine: Vec<&OutcomeEvent> = known.iter().filter(|i| pool[**i].0 == c).map(|i| &events[*i]).collect();
                let (state, _) = naive_state(&mine);
                let id = format!("c{c}");
                let first_due = if policy.escalate_scores.contains(&scores[c]) {
                    opened_at
                } else {
                    Timestamp(T0).plus(policy.first_contact_sla)
                };
                if state < CaseState::Contacted && now >= first_due {
                    expected.insert((id.clone(), 1));
                }
                if state < CaseState::Resolved && now >= Timestamp(T0).plus(policy.resolve_sla) {
                    expected.insert((id, 2));
                }
            }
        }
        let unique: BTreeSet<(String, u8)> = fired.iter().cloned().collect();
        prop_assert_eq!(unique.len(), fired.len(), "an escalation happened twice: {:?}", fired);
        prop_assert_eq!(unique, expected);
        for &c in opened.keys() {
            let mine: Vec<&OutcomeEvent> = known.iter().filter(|i| pool[**i].0 == c).map(|i| &events[*i]).collect();
            let (state, owner) = naive_state(&mine);
            let case = book.case(&format!("c{c}")).expect("opened");
            prop_assert_eq!(case.state, state);
            prop_assert_eq!(&case.owner, &owner);
            prop_assert_eq!(case.history.len(), mine.len());
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]
    /// Any bytes: an outcome event or a reason with a known code, never a panic; and a
    /// detail that never quotes the input.
    #[test]
    fn hostile_outcome_events_get_a_reason_never_a_panic(
        bytes in prop::collection::vec(any::<u8>(), 0..200),
        value in "[a-zA-Z0-9 \"{}:,\\[\\]\\\\]{0,40}",
        field in prop::sample::select(vec!["event_id", "case_id", "type", "occurred_at", "assignee", "resolution", "root_causes", "comment", "contact_result"]),
    ) {
        let codes = ["not_json", "not_an_object", "duplicate_field", "missing_field", "wrong_type", "unknown_value", "bad_length", "bad_timestamp"];
        if let Err(e) = decode_outcome(&bytes) {
            prop_assert!(codes.contains(&e.code()));
        }
        let text = format!(
            r#"{{"event_id":"e","case_id":"c","type":"resolved","resolution":"fixed","occurred_at":"2026-11-22T12:00:00Z","{field}":{value}}}"#
        );
        match decode_outcome(text.as_bytes()) {
            Ok(event) => prop_assert_eq!(event.case_id.is_empty(), false),
            Err(e) => {
                prop_assert!(codes.contains(&e.code()));
                let detail = e.to_string();
                prop_assert!(value.len() < 4 || !detail.contains(value.as_str()), "{} quotes {}", detail, value);
            }
        }
    }
}

/// Alert fields with a valid value each, in the order the followups topic has them.
const ALERT_FIELDS: [(&str, &str); 10] = [
    ("alert_id", r#""det-1""#),
    ("response_id", r#""r-1""#),
    ("customer_id", r#""c-1""#),
    ("account_id", r#""acme""#),
    ("survey_id", r#""s""#),
    ("owner", r#""ann""#),
    ("score", "3"),
    ("severity", r#""high""#),
    ("segments", r#"{"region":"east","plan":"pro"}"#),
    ("responded_at", r#""2026-11-22T12:00:00+01:00""#),
];

/// Values an alert's fields may have instead: other types, empty, too long, escaped,
/// lone surrogates, out of range, nested oddities.
const ALERT_VALUES: [&str; 27] = [
    "null",
    r#""""#,
    r#""h\u0069gh""#,
    r#""\ud800""#,
    r#""é""#,
    "7",
    "3.0",
    "-1",
    "10",
    "11",
    "300",
    "1e400",
    "true",
    "{}",
    "[]",
    r#""low""#,
    r#""urgent""#,
    r#""2026-11-22T12:00:00Z""#,
    r#""yesterday""#,
    r#"{"region":1}"#,
    r#"{"a":"b","a":"c"}"#,
    r#"{"deep":[1,{"a":null}],"s":"\ud800"}"#,
    r#""det-2""#,
    r#"{"region":null}"#,
    r#""2026-11-22T12:00:00.123456789Z""#,
    r#""2026-11-22T12:00:00.000000000000000000000000000000000000000000000001Z""#,
    "{",
];

/// Names of fields added: known ones again, written with escapes, unknown ones.
const ALERT_EXTRA_NAMES: [&str; 8] = [
    "owner",
    r"own\u0065r",
    r"\u0073core",
    "extra",
    "comment",
    "kind",
    "segments",
    "responded_at",
];

#[test]
fn a_valid_alert_takes_the_one_pass_decoder() {
    let json = br#"{"alert_id":"det-1","kind":"detractor","response_id":"r","customer_id":"c","account_id":"acme","survey_id":null,"owner":"ann","route":"account","score":3,"severity":"high","segments":{"region":"east"},"comment":"slow","responded_at":"2026-11-22T12:00:00+01:00","emitted_at":"2026-11-22T11:00:01.000Z"}"#;
    let alert = decode_valid_alert(json).expect("one pass");
    assert_eq!(Ok(alert), decode_alert_exactly(json));
    let twice = br#"{"alert_id":"det-1","response_id":"r","customer_id":"c","owner":"ann","score":3,"severity":"high","responded_at":"2026-11-22T12:00:00Z","x":1,"x":2}"#;
    assert_eq!(decode_valid_alert(twice), None);
    assert_eq!(
        decode_alert(twice).expect_err("twice").code(),
        "duplicate_field"
    );
}

#[test]
fn the_one_pass_alert_decoder_agrees_with_the_exact_one_on_every_single_change() {
    let object = |pairs: &[(&str, &str)]| {
        let fields: Vec<String> = pairs.iter().map(|(n, v)| format!(r#""{n}":{v}"#)).collect();
        format!("{{{}}}", fields.join(",")).into_bytes()
    };
    let mut changed = vec![object(&ALERT_FIELDS)];
    for field in 0..ALERT_FIELDS.len() {
        let mut without = ALERT_FIELDS.to_vec();
        without.remove(field);
        changed.push(object(&without));
        for value in ALERT_VALUES {
            let mut with = ALERT_FIELDS.to_vec();
            with[field].1 = value;
            changed.push(object(&with));
        }
    }
    for name in ALERT_EXTRA_NAMES {
        for value in ALERT_VALUES {
            let mut with = ALERT_FIELDS.to_vec();
            with.push((name, value));
            changed.push(object(&with));
        }
    }
    // Bytes that are not UTF-8 inside a field the decoders skip.
    let mut not_utf8 = object(&ALERT_FIELDS);
    not_utf8.pop();
    not_utf8.extend_from_slice(b",\"comment\":\"\xff\"}");
    changed.push(not_utf8);
    let mut valid = 0;
    for bytes in &changed {
        let exact = decode_alert_exactly(bytes).ok();
        valid += usize::from(exact.is_some());
        assert_eq!(
            decode_valid_alert(bytes),
            exact,
            "{}",
            String::from_utf8_lossy(bytes)
        );
    }
    assert!(valid > 50, "only {valid} of {} valid", changed.len());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(5000))]
    /// The one-pass alert decoder returns exactly the alerts the exact decoder returns, and
    /// nothing where the exact one finds a reason: valid alerts with fields changed, dropped,
    /// given twice, written with escapes, in any order, and with bytes that are not UTF-8.
    #[test]
    fn the_one_pass_alert_decoder_agrees_with_the_exact_one(
        choices in prop::collection::vec(0usize..100, ALERT_FIELDS.len()),
        extras in prop::collection::vec((0..ALERT_EXTRA_NAMES.len(), 0..ALERT_VALUES.len()), 0..3),
        order in Just((0..ALERT_FIELDS.len() + 3).collect::<Vec<usize>>()).prop_shuffle(),
        not_utf8 in prop::option::weighted(0.05, 0usize..400),
    ) {
        let mut pairs: Vec<(&str, &str)> = Vec::new();
        for ((name, valid), choice) in ALERT_FIELDS.iter().zip(&choices) {
            match choice {
                0..=84 => pairs.push((name, valid)),
                85..=89 => {}
                other => pairs.push((name, ALERT_VALUES[other % ALERT_VALUES.len()])),
            }
        }
        pairs.extend(extras.iter().map(|(n, v)| (ALERT_EXTRA_NAMES[*n], ALERT_VALUES[*v])));
        let fields: Vec<String> = order
            .iter()
            .filter_map(|i| pairs.get(*i))
            .map(|(name, value)| format!(r#""{name}":{value}"#))
            .collect();
        let mut bytes = format!("{{{}}}", fields.join(",")).into_bytes();
        if let Some(at) = not_utf8 {
            let at = at % bytes.len();
            bytes.insert(at, 0xff);
        }
        prop_assert_eq!(decode_valid_alert(&bytes), decode_alert_exactly(&bytes).ok(), "{}", String::from_utf8_lossy(&bytes));
    }
}

#[test]
fn notices_read_in_one_pass_are_the_notices_serde_reads() {
    let responded = FollowupNotice::Responded {
        customer_id: "c-1".into(),
        response_id: "r-1".into(),
        score: 9,
        responded_at: Timestamp(T0),
    };
    let written = responded.to_json();
    assert!(matches!(
        serde_json::from_slice::<RespondedNotice>(&written),
        Ok(RespondedNotice(Some(_)))
    ));
    let fields: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&written).expect("an object");
    let object = |pairs: &[(String, String)]| {
        let pairs: Vec<String> = pairs.iter().map(|(n, v)| format!(r#""{n}":{v}"#)).collect();
        format!("{{{}}}", pairs.join(",")).into_bytes()
    };
    let valid: Vec<(String, String)> = fields
        .iter()
        .map(|(n, v)| (n.clone(), v.to_string()))
        .collect();
    let values = [
        "null",
        r#""""#,
        "9",
        "10",
        "300",
        "-1",
        "9.0",
        r#""9""#,
        r#""responded""#,
        r#""respond\u0065d""#,
        r#""recovery""#,
        r#""case_closed""#,
        r#""2026-11-22T12:00:00Z""#,
        r#""yesterday""#,
        r#""\ud800""#,
        "true",
        "{}",
        "[]",
    ];
    let mut changed = vec![object(&valid)];
    for field in 0..valid.len() {
        let mut without = valid.clone();
        without.remove(field);
        changed.push(object(&without));
        let mut twice = valid.clone();
        twice.push(valid[field].clone());
        changed.push(object(&twice));
        for value in values {
            let mut with = valid.clone();
            with[field].1 = value.to_owned();
            changed.push(object(&with));
        }
    }
    for name in ["case_id", "closed_at", "recovered", "extra"] {
        for value in values {
            let mut with = valid.clone();
            with.push((name.to_owned(), value.to_owned()));
            changed.push(object(&with));
        }
    }
    let mut read = 0;
    for bytes in &changed {
        let serde = serde_json::from_slice::<FollowupNotice>(bytes).ok();
        read += usize::from(serde.is_some());
        assert_eq!(
            FollowupNotice::from_json(bytes).ok(),
            serde,
            "{}",
            String::from_utf8_lossy(bytes)
        );
    }
    assert!(read > 10, "only {read} of {} read", changed.len());
}
