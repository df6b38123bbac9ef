//! End-to-end test against a real, separate Kafka-compatible broker process (Tansu in CI):
//! a seeded data set with a known answer goes in, and alerts, dead letters, metrics and the
//! API must match that answer exactly. The answer is computed here from the raw messages,
//! with serde_json and the contract's rules, not with npsflow's own code.
//!
//! Needs `NPSFLOW_E2E_BROKERS` (e.g. `127.0.0.1:19092`); `scripts/e2e.sh` starts Tansu and
//! runs it: `cargo test -p npsflow-runtime --test real_broker -- --ignored`.
//!
//! The same tests prove `processing.guarantee = exactly_once` on a broker with transactions
//! (`scripts/eos.sh`, noida-db: `NPSFLOW_E2E_GUARANTEE=exactly_once`, and
//! `NPSFLOW_E2E_KAFKA_PROPERTIES` for the client properties that broker needs). Every output
//! is read back with `isolation.level=read_committed` and must be there exactly once (no
//! alert, escalation or dead letter re-sent), and the offsets committed inside the
//! transactions must be exactly where the inputs end.

mod util;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use npsflow_runtime::traffic::Traffic;
use rdkafka::message::OwnedHeaders;
use rdkafka::Message;
use util::*;

const MESSAGES: usize = 3_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real broker: run through scripts/e2e.sh"]
async fn a_seeded_data_set_gives_exactly_the_known_answer() {
    fail_fast();
    let brokers = std::env::var("NPSFLOW_E2E_BROKERS").expect("NPSFLOW_E2E_BROKERS is set");
    let run = format!(
        "e2e-{}-{}",
        std::process::id(),
        npsflow_runtime::wall_now().millis()
    );
    let mut names = run_names(&run);
    names.extend(broker_env());
    let extra: Vec<(&str, &str)> = names.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let config = config(&brokers, &extra);
    let topics = &config.settings.topics;
    npsflow_runtime::topics::create(&config.settings)
        .await
        .expect("topics created on the real broker");

    let mut traffic = Traffic::new(2026);
    traffic.invalid_share = 0.03;
    traffic.duplicate_share = 0.03;
    let now = npsflow_runtime::wall_now();
    let messages: Vec<(Option<String>, Vec<u8>)> = (0..MESSAGES)
        .map(|_| {
            let m = traffic.next_message(now);
            (m.key, m.payload)
        })
        .collect();
    let expected = answer(&messages);
    assert!(
        expected.duplicates > 0
            && !expected.invalid.is_empty()
            && !expected.detractor_ids.is_empty()
    );

    let pipeline = Pipeline::start(&config).await;
    let records: Vec<(Option<&str>, Vec<u8>, OwnedHeaders)> = messages
        .iter()
        .map(|(k, p)| (k.as_deref(), p.clone(), OwnedHeaders::new()))
        .collect();
    produce(&brokers, &topics.responses, &records).await;

    wait_until("every message decided", || {
        pipeline.total_events() == MESSAGES as u64
    })
    .await;
    assert_eq!(pipeline.events("accepted"), expected.accepted);
    assert_eq!(pipeline.events("duplicate"), expected.duplicates);
    assert_eq!(pipeline.events("invalid"), expected.invalid.len() as u64);

    // Dead letters: the invalid messages, byte for byte, as a multiset.
    let dead = read_topic(&brokers, &topics.dead_letters, expected.invalid.len());
    let mut got: Vec<Vec<u8>> = dead
        .iter()
        .map(|m| m.payload().unwrap_or_default().to_vec())
        .collect();
    let mut want = expected.invalid.clone();
    got.sort();
    want.sort();
    assert_eq!(
        got, want,
        "dead-letter topic holds exactly the invalid messages"
    );

    // Alerts: one per detractor response, with its stable id.
    let alerts = read_topic(&brokers, &topics.followups, expected.detractor_ids.len());
    let ids: Vec<String> = alerts
        .iter()
        .map(|a| alert_id_of(a.payload().expect("payload")))
        .collect();
    let want_ids: BTreeSet<String> = expected
        .detractor_ids
        .iter()
        .map(|id| npsflow_core::alert_id(id))
        .collect();
    assert_eq!(ids.len(), want_ids.len(), "no alert missing or sent twice");
    assert_eq!(ids.into_iter().collect::<BTreeSet<_>>(), want_ids);

    // Windows: every segment's 28d counts through the API, and the gauges for `all`.
    let total_in_segments: u64 = expected.segments.values().map(|(p, n, d)| p + n + d).sum();
    wait_until("the aggregator to apply everything", || {
        pipeline.process.metrics.applied_responses() == total_in_segments
    })
    .await;
    for (segment, (promoters, passives, detractors)) in &expected.segments {
        let (status, row) = pipeline
            .get(&format!("/v1/segments/{segment}?window=28d"))
            .await;
        assert_eq!(status, StatusCode::OK, "{segment}: {row}");
        assert_eq!(
            (
                row["promoters"].as_u64(),
                row["passives"].as_u64(),
                row["detractors"].as_u64()
            ),
            (Some(*promoters), Some(*passives), Some(*detractors)),
            "{segment}"
        );
        let n = (promoters + passives + detractors) as f64;
        let nps = 100.0 * (*promoters as f64 - *detractors as f64) / n;
        assert!(
            (row["nps"].as_f64().expect("nps") - nps).abs() < 1e-9,
            "{segment}"
        );
    }
    let (_, listing) = pipeline.get("/v1/segments?window=28d").await;
    assert_eq!(
        listing.as_array().map(Vec::len),
        Some(expected.segments.len())
    );
    let metrics = pipeline.process.metrics.render();
    let (p, n, d) = expected.segments["all"];
    for (category, count) in [("promoter", p), ("passive", n), ("detractor", d)] {
        let line = format!(
            r#"npsflow_segment_responses{{category="{category}",segment="all",window="28d"}} {count}"#
        );
        assert!(metrics.contains(&line), "missing {line}");
    }
    if exactly_once() {
        // The offset half of the transactions: each group's committed offsets reach the end
        // of its inputs (past the transaction markers on the internal topics, so a drained
        // partition shows no lag), and a restart would process nothing again.
        let kafka = &config.settings.kafka;
        let groups = [
            (&kafka.ingest_group, &topics.responses),
            (&kafka.ingest_group, &topics.responses_by_id),
            (&kafka.aggregate_group, &topics.segment_deltas),
            (&kafka.followup_group, &topics.followups),
            (&kafka.followup_group, &topics.followup_events),
        ];
        wait_until(
            "every group's offsets committed to the end of its inputs",
            || {
                groups
                    .iter()
                    .all(|(group, topic)| lag(&brokers, group, topic) == Some(0))
            },
        )
        .await;
        assert_eq!(
            committed_total(&brokers, &kafka.ingest_group, &topics.responses),
            Some(MESSAGES as i64)
        );
        println!("exactly once: every group's offsets committed to the end of its inputs");
    }
    pipeline.stop().await;
}

/// The closed loop on the real broker, with a known answer: detractor responses open cases;
/// a seeded follow-up team sends outcome events as a hand-moved clock reaches their time (some
/// re-sent, a few invalid); customers answer again. Every case's final state, the
/// escalations as a set of (case, level) with none twice, and recovery must match what the
/// contract's rules give, computed here from the raw events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real broker: run through scripts/e2e.sh"]
async fn followup_cases_give_exactly_the_known_answer() {
    use std::collections::BTreeMap;

    use npsflow_runtime::traffic::{FollowupTeam, PlannedKind};

    fail_fast();
    let brokers = std::env::var("NPSFLOW_E2E_BROKERS").expect("NPSFLOW_E2E_BROKERS is set");
    let run = format!(
        "kat-followup-{}-{}",
        std::process::id(),
        npsflow_runtime::wall_now().millis()
    );
    let names: Vec<(&str, String)> = run_names(&run)
        .into_iter()
        .chain([
            ("NPSFLOW__FOLLOWUP__FIRST_CONTACT_SLA", "1h".into()),
            ("NPSFLOW__FOLLOWUP__RESOLVE_SLA", "2h".into()),
            ("NPSFLOW__FOLLOWUP__ESCALATE_SCORES", "0,1".into()),
        ])
        .chain(broker_env())
        .collect();
    let extra: Vec<(&str, &str)> = names.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let config = config(&brokers, &extra);
    let topics = config.settings.topics.clone();
    npsflow_runtime::topics::create(&config.settings)
        .await
        .expect("topics");

    const HOUR: i64 = 3_600_000;
    let start = npsflow_runtime::wall_now();
    let clock = Arc::new(npsflow_runtime::engine::ManualClock::new(start));
    let mut traffic = Traffic::new(11);
    (
        traffic.invalid_share,
        traffic.duplicate_share,
        traffic.late_share,
    ) = (0.0, 0.02, 0.0);
    let responses: Vec<(Option<String>, Vec<u8>)> = (0..400)
        .map(|_| {
            let m = traffic.next_message(start);
            (m.key, m.payload)
        })
        .collect();
    // The cases, from the raw responses: detractors, once per response_id.
    struct Case {
        customer: String,
        score: u64,
        responded_at: i64,
    }
    let mut cases: BTreeMap<String, Case> = BTreeMap::new();
    for (_, payload) in &responses {
        let v: serde_json::Value = serde_json::from_slice(payload).expect("json");
        let score = v["score"].as_u64().expect("score");
        if score <= 6 {
            let at =
                npsflow_core::Timestamp::parse_rfc3339(v["responded_at"].as_str().expect("at"))
                    .expect("rfc3339");
            cases
                .entry(npsflow_core::alert_id(
                    v["response_id"].as_str().expect("id"),
                ))
                .or_insert(Case {
                    customer: v["customer_id"].as_str().expect("customer").to_owned(),
                    score,
                    responded_at: at.millis(),
                });
        }
    }
    // What the team will send: (time, topic kind, key, payload).
    let mut team = FollowupTeam::new(5);
    let mut planned = Vec::new();
    for (case_id, case) in &cases {
        let (_, messages) = team.plan(
            case_id,
            &case.customer,
            npsflow_core::Timestamp(case.responded_at),
            HOUR,
            2 * HOUR,
        );
        planned.extend(messages);
    }
    planned.sort_by_key(|m| m.at);
    let outcomes: Vec<(String, i64, String, String)> = planned
        .iter()
        .filter(|m| m.kind == PlannedKind::Outcome)
        .map(|m| {
            let v: serde_json::Value = serde_json::from_slice(&m.payload).expect("json");
            (
                m.key.clone(),
                m.at.millis(),
                v["type"].as_str().expect("type").to_owned(),
                v["event_id"].as_str().expect("id").to_owned(),
            )
        })
        .collect();
    assert!(
        outcomes.len() > 100,
        "a real workload: {} outcome events",
        outcomes.len()
    );

    let pipeline = Pipeline::start_with_clock(&config, clock.clone()).await;
    let records: Vec<(Option<&str>, Vec<u8>, OwnedHeaders)> = responses
        .iter()
        .map(|(k, p)| (k.as_deref(), p.clone(), OwnedHeaders::new()))
        .collect();
    produce(&brokers, &topics.responses, &records).await;
    wait_until("every case opened", || {
        pipeline.process.metrics.cases_opened() == cases.len() as u64
    })
    .await;

    // The clock moves in 5-minute steps. Before each move, everything the team did up to then
    // is sent and applied; then the clock moves and the deadlines it passes fire.
    let step = 5 * 60_000;
    let mut steps = Vec::new();
    let mut sent = 0;
    let (mut outcome_sent, mut recoveries_expected) = (0u64, 0u64);
    // A customer answering again as a detractor opens a new case: (case, score, responded_at).
    let mut new_cases: Vec<(String, u64, i64)> = Vec::new();
    let mut invalid = Vec::new();
    let end = start.millis() + 4 * HOUR;
    let mut t = start.millis();
    while t <= end {
        let mut batch_outcomes = Vec::new();
        let mut batch_responses = Vec::new();
        while sent < planned.len() && planned[sent].at.millis() <= t {
            let m = &planned[sent];
            match m.kind {
                PlannedKind::Outcome => batch_outcomes.push((
                    Some(m.key.as_str()),
                    m.payload.clone(),
                    OwnedHeaders::new(),
                )),
                PlannedKind::Response => batch_responses.push((
                    Some(m.key.as_str()),
                    m.payload.clone(),
                    OwnedHeaders::new(),
                )),
            }
            sent += 1;
        }
        if !batch_outcomes.is_empty() {
            // Every fifth step re-sends one event and sends an invalid one.
            if steps.len() % 5 == 0 {
                batch_outcomes.push(batch_outcomes[0].clone());
                let bad = format!(r#"{{"event_id":"bad-{}","case_id":"x","type":"closed","occurred_at":"2026-01-01T00:00:00Z"}}"#, steps.len()).into_bytes();
                invalid.push(bad.clone());
                batch_outcomes.push((Some("x"), bad, OwnedHeaders::new()));
            }
            outcome_sent += batch_outcomes.len() as u64;
            produce(&brokers, &topics.followup_outcomes, &batch_outcomes).await;
        }
        for (_, payload, _) in &batch_responses {
            let v: serde_json::Value = serde_json::from_slice(payload).expect("json");
            let score = v["score"].as_u64().expect("score");
            if score <= 6 {
                let at =
                    npsflow_core::Timestamp::parse_rfc3339(v["responded_at"].as_str().expect("at"))
                        .expect("rfc3339");
                new_cases.push((
                    npsflow_core::alert_id(v["response_id"].as_str().expect("id")),
                    score,
                    at.millis(),
                ));
            }
        }
        if !batch_responses.is_empty() {
            recoveries_expected += batch_responses.len() as u64;
            produce(&brokers, &topics.responses, &batch_responses).await;
        }
        let m = &pipeline.process.metrics;
        wait_until("the step's events applied", || {
            m.followup_input_count("outcome", "applied")
                + m.followup_input_count("outcome", "duplicate")
                + m.followup_input_count("outcome", "invalid")
                == outcome_sent
                && m.recovery_count("recovered") + m.recovery_count("not_recovered")
                    == recoveries_expected
                && m.cases_opened() == (cases.len() + new_cases.len()) as u64
        })
        .await;
        clock.set(npsflow_core::Timestamp(t));
        steps.push(t);
        t += step;
    }
    // Let the last step's deadlines fire.
    tokio::time::sleep(Duration::from_secs(3)).await;

    // The known answer.
    let events_of = |case_id: &str, until: i64| -> Vec<(String, i64, String)> {
        outcomes
            .iter()
            .filter(|(c, at, _, _)| c == case_id && *at <= until)
            .map(|(_, at, kind, id)| (kind.clone(), *at, id.clone()))
            .collect()
    };
    let fired_at = |due: i64| steps.iter().copied().find(|s| *s >= due);
    let rank = |s: &str| {
        ["open", "acknowledged", "contacted", "resolved", "closed"]
            .iter()
            .position(|x| *x == s)
            .expect("state")
    };
    let mut expected_escalations = BTreeSet::new();
    let mut expected_state = BTreeMap::new();
    for (case_id, case) in &cases {
        let first_due = if case.score <= 1 {
            start.millis()
        } else {
            case.responded_at + HOUR
        };
        if let Some(at) = fired_at(first_due) {
            if rank(naive_case_state(&events_of(case_id, at))) < rank("contacted") {
                expected_escalations.insert((case_id.clone(), 1u64));
            }
        }
        if let Some(at) = fired_at(case.responded_at + 2 * HOUR) {
            if rank(naive_case_state(&events_of(case_id, at))) < rank("resolved") {
                expected_escalations.insert((case_id.clone(), 2u64));
            }
        }
        expected_state.insert(
            case_id.clone(),
            naive_case_state(&events_of(case_id, i64::MAX)),
        );
    }
    // The new cases get no outcome events: they escalate as their deadlines pass.
    for (case_id, score, responded_at) in &new_cases {
        if *score <= 1 || fired_at(responded_at + HOUR).is_some() {
            expected_escalations.insert((case_id.clone(), 1u64));
        }
        if fired_at(responded_at + 2 * HOUR).is_some() {
            expected_escalations.insert((case_id.clone(), 2u64));
        }
        expected_state.insert(case_id.clone(), "open");
    }
    let mut expected_recovery = BTreeMap::new();
    for m in planned.iter().filter(|m| m.kind == PlannedKind::Response) {
        let v: serde_json::Value = serde_json::from_slice(&m.payload).expect("json");
        let case_id = v["response_id"]
            .as_str()
            .expect("id")
            .trim_start_matches("again-")
            .to_owned();
        expected_recovery.insert(case_id, v["score"].as_u64().expect("score") >= 7);
    }

    println!(
        "{} cases ({} opened by customers answering again), {} outcome events, {} escalations, {} recoveries decided",
        cases.len() + new_cases.len(),
        new_cases.len(),
        outcomes.len(),
        expected_escalations.len(),
        expected_recovery.len()
    );
    // Escalations: exactly the expected set, none twice.
    let notices = read_topic(&brokers, &topics.escalations, expected_escalations.len());
    let got: Vec<(String, u64)> = notices
        .iter()
        .map(|m| {
            let v: serde_json::Value =
                serde_json::from_slice(m.payload().expect("payload")).expect("json");
            (
                v["case_id"].as_str().expect("case").to_owned(),
                v["level"].as_u64().expect("level"),
            )
        })
        .collect();
    assert_eq!(
        got.len(),
        expected_escalations.len(),
        "no escalation twice or missing"
    );
    assert_eq!(
        got.into_iter().collect::<BTreeSet<_>>(),
        expected_escalations
    );
    assert!(
        expected_escalations.iter().any(|(_, l)| *l == 2)
            && expected_escalations.iter().any(|(_, l)| *l == 1)
    );

    // Every case's final state and recovery, from the API (the directory of the cases topic).
    let all = cases.len() + new_cases.len();
    assert!(
        !new_cases.is_empty(),
        "some customers answered again as detractors"
    );
    wait_until("the directory to hold every case", || {
        pipeline
            .process
            .directory
            .as_ref()
            .expect("directory")
            .len()
            == all
    })
    .await;
    wait_until("the directory to catch up", || {
        expected_state.iter().all(|(id, state)| {
            pipeline
                .process
                .directory
                .as_ref()
                .expect("directory")
                .case(id)
                .is_some_and(|c| c.state.as_str() == *state)
        })
    })
    .await;
    for (case_id, state) in &expected_state {
        let (status, case) = pipeline.get(&format!("/v1/cases/{case_id}")).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(case["state"], *state, "{case_id}");
        let recovered = expected_recovery.get(case_id).copied();
        assert_eq!(case["recovered"].as_bool(), recovered, "{case_id}");
    }
    // Invalid outcome events were dead-lettered byte for byte.
    let dead = read_topic(&brokers, &topics.dead_letters, invalid.len());
    let mut got: Vec<Vec<u8>> = dead
        .iter()
        .map(|m| m.payload().unwrap_or_default().to_vec())
        .collect();
    got.sort();
    invalid.sort();
    assert_eq!(got, invalid);
    pipeline.stop().await;
}
