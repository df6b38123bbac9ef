//! End-to-end test against a real, separate Kafka-compatible broker process (Tansu in CI):
//! a seeded data set with a known answer goes in, and alerts, dead letters, metrics and the
//! API must match that answer exactly. The answer is computed here from the raw messages,
//! with serde_json and the contract's rules, not with npsflow's own code.
//!
//! Needs `NPSFLOW_E2E_BROKERS` (e.g. `127.0.0.1:19092`); `scripts/e2e.sh` starts Tansu and
//! runs it: `cargo test -p npsflow-runtime --test real_broker -- --ignored`.

mod util;

use std::collections::BTreeSet;

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
    let names = [
        ("NPSFLOW__TOPICS__RESPONSES", format!("{run}.responses")),
        ("NPSFLOW__TOPICS__RESPONSES_BY_ID", format!("{run}.by-id")),
        ("NPSFLOW__TOPICS__DEAD_LETTERS", format!("{run}.dlq")),
        ("NPSFLOW__TOPICS__FOLLOWUPS", format!("{run}.followups")),
        ("NPSFLOW__TOPICS__SEGMENT_DELTAS", format!("{run}.deltas")),
        ("NPSFLOW__TOPICS__STATE", format!("{run}.state")),
        ("NPSFLOW__KAFKA__INGEST_GROUP", format!("{run}-ingest")),
        (
            "NPSFLOW__KAFKA__AGGREGATE_GROUP",
            format!("{run}-aggregate"),
        ),
    ];
    let names: Vec<(&str, String)> = names.into_iter().chain(followup_names(&run)).collect();
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
    pipeline.stop().await;
}
