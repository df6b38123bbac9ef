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

use std::collections::{BTreeMap, BTreeSet};
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

/// `npsflow run` on this broker: the binary named by `NPSFLOW_E2E_BIN` (scripts/e2e.sh builds
/// it), else the workspace's debug binary, built here first so it is never stale.
fn npsflow_binary() -> std::path::PathBuf {
    if let Ok(path) = std::env::var("NPSFLOW_E2E_BIN") {
        return path.into();
    }
    let workspace = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace");
    let status = std::process::Command::new(env!("CARGO"))
        .args(["build", "-j2", "-p", "npsflow"])
        .current_dir(workspace)
        .status()
        .expect("cargo runs");
    assert!(status.success(), "cargo build -p npsflow");
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| workspace.join("target"));
    target.join("debug").join("npsflow")
}

/// A free loopback port (the kernel's choice, released for the process to bind).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("address")
        .port()
}

/// An `npsflow run` process with every role, on its own HTTP port; SIGKILLed when dropped.
struct RunProcess {
    port: u16,
    child: std::process::Child,
    log: std::path::PathBuf,
}

impl RunProcess {
    fn start(
        binary: &std::path::Path,
        brokers: &str,
        env: &[(&str, String)],
        log: std::path::PathBuf,
    ) -> RunProcess {
        let port = free_port();
        let child = std::process::Command::new(binary)
            .arg("run")
            .env("NPSFLOW__KAFKA__BROKERS", brokers)
            .env("NPSFLOW__HTTP__LISTEN", format!("127.0.0.1:{port}"))
            .env("NPSFLOW__LOG__FORMAT", "json")
            .env("NPSFLOW__TOPICS__PARTITIONS", "3")
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("npsflow starts");
        RunProcess { port, child, log }
    }

    /// `GET path` as JSON, `None` unless it answers 200.
    async fn get(&self, path: &str) -> Option<serde_json::Value> {
        http_json(self.port, path).await
    }

    fn kill(&mut self) {
        let _ = self.child.kill(); // SIGKILL
        let _ = self.child.wait();
    }
}

impl Drop for RunProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One raw response of the two-process test: id, score, event time (ms), region, product.
struct Raw {
    score: u64,
    at: i64,
    region: &'static str,
    product: &'static str,
}

/// The segments a raw response counts in, by the contract's rules (configured dimensions
/// region and product, their combination, and `all`).
fn raw_segments(r: &Raw) -> [String; 4] {
    [
        "all".to_owned(),
        format!("region={}", r.region),
        format!("product={}", r.product),
        format!("product={},region={}", r.product, r.region),
    ]
}

/// (responses, promoters, passives, detractors) of `segment` in `[from, to)`, recomputed
/// from the raw responses.
fn raw_counts(raw: &[Raw], segment: &str, from: i64, to: i64) -> (u64, u64, u64, u64) {
    let mut counts = (0, 0, 0, 0);
    for r in raw
        .iter()
        .filter(|r| from <= r.at && r.at < to && raw_segments(r).iter().any(|s| s == segment))
    {
        counts.0 += 1;
        match r.score {
            9..=10 => counts.1 += 1,
            7..=8 => counts.2 += 1,
            _ => counts.3 += 1,
        }
    }
    counts
}

/// Checks a served row against the raw responses at the row's own `[from, to)` and the
/// window before it: counts, NPS and the previous window's responses and NPS.
fn check_row_against_raw(raw: &[Raw], row: &serde_json::Value, who: &str) {
    let ts = |v: &serde_json::Value| {
        npsflow_core::Timestamp::parse_rfc3339(v.as_str().expect("a timestamp"))
            .expect("rfc3339")
            .millis()
    };
    let segment = row["segment"].as_str().expect("segment");
    let (from, to) = (ts(&row["from"]), ts(&row["to"]));
    let (n, p, m, d) = raw_counts(raw, segment, from, to);
    let label = format!("{who}: {segment} {}", row["window"]);
    assert_eq!(
        (
            row["responses"].as_u64(),
            row["promoters"].as_u64(),
            row["passives"].as_u64(),
            row["detractors"].as_u64()
        ),
        (Some(n), Some(p), Some(m), Some(d)),
        "{label}: counts in [from, to) from the raw responses"
    );
    let nps = |p: u64, d: u64, n: u64| 100.0 * (p as f64 - d as f64) / n as f64;
    match row["nps"].as_f64() {
        Some(got) => assert!(n > 0 && (got - nps(p, d, n)).abs() < 1e-9, "{label}: nps"),
        None => assert_eq!(n, 0, "{label}: nps null only with no responses"),
    }
    let previous = &row["previous"];
    assert_eq!(ts(&previous["to"]), from, "{label}: previous ends at from");
    assert_eq!(
        ts(&previous["from"]),
        2 * from - to,
        "{label}: previous length"
    );
    let (pn, pp, _, pd) = raw_counts(raw, segment, 2 * from - to, from);
    assert_eq!(
        previous["responses"].as_u64(),
        Some(pn),
        "{label}: previous responses"
    );
    match previous["nps"].as_f64() {
        Some(got) => assert!(
            pn > 0 && (got - nps(pp, pd, pn)).abs() < 1e-9,
            "{label}: previous nps"
        ),
        None => assert_eq!(pn, 0, "{label}: previous nps null only with none"),
    }
}

/// A row as compared between processes: everything but where it came from and when it was
/// computed (`as_of`, `computed_at`: the owner computes at the moment of the request, the
/// view holds what the owner last published).
fn comparable(row: &serde_json::Value) -> serde_json::Value {
    let mut row = row.clone();
    if let serde_json::Value::Object(fields) = &mut row {
        fields.remove("as_of");
        fields.remove("computed_at");
    }
    row
}

/// `/v1/segments` by (segment, window), each row's `as_of.source` checked.
fn by_key(rows: &serde_json::Value, who: &str) -> BTreeMap<(String, String), serde_json::Value> {
    rows.as_array()
        .unwrap_or_else(|| panic!("{who}: /v1/segments is an array"))
        .iter()
        .map(|row| {
            let source = row["as_of"]["source"].as_str();
            assert!(
                matches!(source, Some("owner" | "view")),
                "{who}: as_of.source is owner or view: {row}"
            );
            (
                (
                    row["segment"].as_str().expect("segment").to_owned(),
                    row["window"].as_str().expect("window").to_owned(),
                ),
                row.clone(),
            )
        })
        .collect()
}

/// Any instance answers for every segment, with the same numbers: two `npsflow run` processes
/// in one group split the segments between them, yet `/v1/segments` on each lists every
/// segment in every window, its own (as owner) and the other's (from the view topic), and the
/// two answers agree row for row (all but `as_of` and `computed_at`), each row matching the
/// raw responses at its own `[from, to)`. Then one process is SIGKILLed: once the survivor
/// owns every segment (restored from the state topic), it answers for every segment with the
/// same numbers. Without the view topic read, a process would list only its own segments;
/// without the restore, the survivor's numbers would differ.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real broker: run through scripts/e2e.sh"]
async fn two_processes_answer_identically_for_every_segment() {
    use std::collections::BTreeMap as Map;

    fail_fast();
    let brokers = std::env::var("NPSFLOW_E2E_BROKERS").expect("NPSFLOW_E2E_BROKERS is set");
    let run = format!(
        "twins-{}-{}",
        std::process::id(),
        npsflow_runtime::wall_now().millis()
    );
    let mut env = run_names(&run);
    env.extend(broker_env());
    env.extend([
        ("NPSFLOW__SEGMENTS__DIMENSIONS", "region,product".to_owned()),
        (
            "NPSFLOW__SEGMENTS__COMBINATIONS",
            "region+product".to_owned(),
        ),
        ("NPSFLOW__FOLLOWUP__CASE_DIRECTORY", "false".to_owned()),
    ]);
    let extra: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let config = config(&brokers, &extra);
    env.push(("NPSFLOW__INGEST__BATCH_MAX_WAIT", "20ms".to_owned()));
    npsflow_runtime::topics::create(&config.settings)
        .await
        .expect("topics created on the real broker");

    // A seeded data set over the last two hours: the 1h window and the hour before it both
    // hold responses (the older hour less happy), so every field of the change has data.
    const RESPONSES: usize = 1_200;
    const REGIONS: [&str; 3] = ["east", "west", "north"];
    const PRODUCTS: [&str; 3] = ["sedan", "suv", "van"];
    let now = npsflow_runtime::wall_now().millis();
    let mut seed: u64 = 0x5eed_2026;
    let mut next = |bound: u64| {
        seed = seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (seed >> 33) % bound
    };
    let mut raw = Vec::new();
    let mut messages = Vec::new();
    for i in 0..RESPONSES {
        let age = next(115 * 60_000) as i64 + 1_000;
        let older = age > 3_600_000;
        let score = if older { next(9) } else { next(11) }.min(10);
        let r = Raw {
            score,
            at: now - age,
            region: REGIONS[next(3) as usize],
            product: PRODUCTS[next(3) as usize],
        };
        let body = serde_json::json!({
            "response_id": format!("{run}-{i}"),
            "score": r.score,
            "responded_at": npsflow_core::Timestamp(r.at).to_rfc3339(),
            "customer_id": format!("cust-{}", next(500)),
            "segments": {"region": r.region, "product": r.product},
        });
        messages.push((
            Some(format!("cust-{i}")),
            serde_json::to_vec(&body).expect("json"),
        ));
        raw.push(r);
    }
    let segments: BTreeSet<String> = raw.iter().flat_map(raw_segments).collect();
    let windows: Vec<String> = config
        .settings
        .windows
        .lengths
        .iter()
        .map(ToString::to_string)
        .collect();

    let binary = npsflow_binary();
    let logs = std::env::temp_dir().join(format!("npsflow-twins-{}", std::process::id()));
    std::fs::create_dir_all(&logs).expect("log dir");
    println!("twins: logs in {}", logs.display());
    // The first process leads every group; the second joins it, and both are in the groups
    // before any data, so each owns some of the segments. (The one killed below is the second:
    // Tansu 0.6 never expires a dead group *leader*, so with the leader killed the group stays
    // "rebalancing" for good and nobody takes its partitions; a Kafka broker would.)
    let mut processes = vec![RunProcess::start(
        &binary,
        &brokers,
        &env,
        logs.join("npsflow-1.log"),
    )];
    let first = &processes[0];
    wait_until_async("the first process ready", move || async move {
        first.get("/readyz").await.is_some()
    })
    .await;
    processes.push(RunProcess::start(
        &binary,
        &brokers,
        &env,
        logs.join("npsflow-2.log"),
    ));
    let running = &processes;
    wait_until_async("both processes ready", move || async move {
        let mut ready = true;
        for p in running {
            ready &= p.get("/readyz").await.is_some();
        }
        ready
    })
    .await;

    let records: Vec<(Option<&str>, Vec<u8>, OwnedHeaders)> = messages
        .iter()
        .map(|(k, p)| (k.as_deref(), p.clone(), OwnedHeaders::new()))
        .collect();
    produce(&brokers, &config.settings.topics.responses, &records).await;

    // Processed: segment `all` counts every response in the 28d window, on both.
    let total = RESPONSES as u64;
    wait_until_async(
        "every response counted in segment all on both",
        move || async move {
            let mut done = true;
            for p in running {
                done &= p
                    .get("/v1/segments/all?window=28d")
                    .await
                    .is_some_and(|row| row["responses"].as_u64() == Some(total));
            }
            done
        },
    )
    .await;

    // Both answer for every segment in every window, with the same rows. The view is a moment
    // behind its owner (and an owner republishes a window when it steps), so the two answers
    // are compared until they agree; they must, within the patience.
    let want_keys: BTreeSet<(String, String)> = segments
        .iter()
        .flat_map(|s| windows.iter().map(move |w| (s.clone(), w.clone())))
        .collect();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let (a, b, agreed) = loop {
        let (a, b) = (
            processes[0].get("/v1/segments").await,
            processes[1].get("/v1/segments").await,
        );
        if let (Some(a), Some(b)) = (a, b) {
            let (a, b) = (by_key(&a, "process 1"), by_key(&b, "process 2"));
            let same = a.keys().cloned().collect::<BTreeSet<_>>() == want_keys
                && b.keys().cloned().collect::<BTreeSet<_>>() == want_keys
                && a.iter()
                    .all(|(k, row)| comparable(row) == comparable(&b[k]));
            if same || tokio::time::Instant::now() >= deadline {
                break (a, b, same);
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for /v1/segments on both"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    if !agreed {
        let missing = |m: &Map<(String, String), serde_json::Value>| {
            want_keys
                .iter()
                .filter(|k| !m.contains_key(*k))
                .cloned()
                .collect::<Vec<_>>()
        };
        let differing: Vec<_> = a
            .iter()
            .filter(|(k, row)| b.get(*k).is_some_and(|o| comparable(row) != comparable(o)))
            .map(|(k, row)| format!("{k:?}:\n  1: {row}\n  2: {}", b[k]))
            .take(5)
            .collect();
        panic!(
            "the two processes never answered alike: missing on 1: {:?}, missing on 2: {:?}, differing: {}",
            missing(&a),
            missing(&b),
            differing.join("\n")
        );
    }
    // Each owns some segments and reads the others from the view.
    for (who, rows) in [("process 1", &a), ("process 2", &b)] {
        let sources: BTreeSet<&str> = rows
            .values()
            .map(|r| r["as_of"]["source"].as_str().expect("source"))
            .collect();
        assert_eq!(
            sources,
            BTreeSet::from(["owner", "view"]),
            "{who} owns some segments and reads the rest from the view"
        );
    }
    for row in a.values() {
        check_row_against_raw(&raw, row, "both");
    }
    let significant = a
        .values()
        .filter(|r| r["change"]["significant"] == serde_json::Value::Bool(true))
        .count();
    println!(
        "twins: {} rows alike on both processes ({} segments), {significant} with a significant change",
        a.len(),
        segments.len()
    );

    // SIGKILL one; the survivor takes every partition, restores, and answers as owner. The
    // rebalance waits for the dead member's session to time out, then up to the rebalance
    // timeout (max.poll.interval.ms, 60 s) for it to rejoin: more patience here.
    processes[1].kill();
    let survivor = &processes[0];
    let deadline = tokio::time::Instant::now() + 3 * PATIENCE;
    let mut seen = Map::new();
    let after =
        loop {
            if let Some(rows) = survivor.get("/v1/segments").await {
                let rows = by_key(&rows, "survivor");
                if rows.keys().cloned().collect::<BTreeSet<_>>() == want_keys
                    && rows.values().all(|r| r["as_of"]["source"] == "owner")
                {
                    break rows;
                }
                seen = rows;
            }
            assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for the survivor to own every segment: missing {:?}, not owned {:?}",
            want_keys.iter().filter(|k| !seen.contains_key(*k)).collect::<Vec<_>>(),
            seen.iter()
                .filter(|(_, r)| r["as_of"]["source"] != "owner")
                .map(|(k, _)| k)
                .collect::<Vec<_>>()
        );
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
    let mut unmoved = 0;
    for (key, row) in &after {
        check_row_against_raw(&raw, row, "survivor");
        // Where the window has not stepped since, the row is the same as before the kill.
        if row["to"] == a[key]["to"] {
            unmoved += 1;
            assert_eq!(
                comparable(row),
                comparable(&a[key]),
                "survivor: {key:?} as before the kill"
            );
        }
    }
    println!(
        "twins: the survivor owns all {} rows, each matching the raw responses ({unmoved} in unmoved windows identical to before)",
        after.len()
    );
    let log = std::fs::read_to_string(&survivor.log).unwrap_or_default();
    assert!(!log.contains("cust-"), "a customer id reached the logs");
}

/// Waits until the async `done` holds; fails after the patience.
async fn wait_until_async<F, Fut>(what: &str, mut done: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !done().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
