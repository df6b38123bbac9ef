//! Service tests against an in-process Kafka-protocol broker (librdkafka's mock cluster): the
//! real client and wire protocol, every role end to end, with injectable broker errors.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use npsflow_runtime::Config;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::mocking::MockCluster;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use rdkafka::Message;
use serde_json::Value;

mod util;

use util::*;

type Cluster = MockCluster<'static, rdkafka::producer::DefaultProducerContext>;

/// A mock cluster with every topic, its bootstrap address, and the test configuration for it
/// (with `extra` settings).
fn broker(extra: &[(&str, &str)]) -> (Cluster, String, Arc<Config>) {
    fail_fast();
    let cluster = MockCluster::new(1).expect("mock cluster");
    let brokers = cluster.bootstrap_servers();
    let config = config(&brokers, extra);
    for topic in npsflow_runtime::topics::planned(&config.settings) {
        cluster
            .create_topic(&topic.name, topic.partitions, 1)
            .expect("topic");
    }
    (cluster, brokers, config)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_role_end_to_end_with_exact_dead_letters_and_routed_alerts() {
    let (_cluster, brokers, config) = broker(&[]);
    let topics = &config.settings.topics;
    let pipeline = Pipeline::start(&config).await;

    let plain = OwnedHeaders::new();
    let traced = OwnedHeaders::new().insert(Header {
        key: "trace-id",
        value: Some("abc"),
    });
    let east = r#","segments":{"region":"east","product":"sedan"}"#;
    let west = r#","segments":{"region":"west"}"#;
    let invalid: Vec<(Option<&str>, Vec<u8>, OwnedHeaders)> = vec![
        (Some("k-bad-score"), br#"{"response_id":"x1","score":11,"responded_at":"2026-11-22T00:00:00Z","customer_id":"c"}"#.to_vec(), traced.clone()),
        (Some("k-not-utf8"), vec![b'{', 0xff, 0xfe, b'}'], plain.clone()),
        (None, b"not json at all".to_vec(), plain.clone()),
        (Some("k-old"), format!(r#"{{"response_id":"old","score":9,"responded_at":"{}","customer_id":"c"}}"#, now_rfc3339(-29 * 86_400)).into_bytes(), plain.clone()),
        (Some("k-future"), format!(r#"{{"response_id":"fut","score":9,"responded_at":"{}","customer_id":"c"}}"#, now_rfc3339(3_600)).into_bytes(), plain.clone()),
    ];
    let mut messages: Vec<(Option<&str>, Vec<u8>, OwnedHeaders)> = vec![
        (Some("cust-p1"), response("p1", 10, east), plain.clone()),
        (Some("cust-p2"), response("p2", 9, east), plain.clone()),
        (Some("cust-n1"), response("n1", 8, west), plain.clone()),
        (
            Some("cust-d1"),
            response("d1", 2, &format!(r#","account_manager":"ann"{east}"#)),
            plain.clone(),
        ),
        (
            Some("cust-d2"),
            response("d2", 5, r#","account_id":"acme""#),
            plain.clone(),
        ),
        (Some("cust-d3"), response("d3", 6, west), plain.clone()),
    ];
    messages.push(messages[3].clone()); // an exact re-send: a duplicate
    messages.extend(invalid.iter().cloned());
    produce(&brokers, &topics.responses, &messages).await;

    wait_until("every message to be decided", || {
        pipeline.total_events() == messages.len() as u64
    })
    .await;
    assert_eq!(pipeline.events("accepted"), 6);
    assert_eq!(pipeline.events("duplicate"), 1);
    assert_eq!(pipeline.events("invalid"), 3);
    assert_eq!(pipeline.events("too_old"), 1);
    assert_eq!(pipeline.events("future"), 1);

    // Dead letters: exactly as received, with the reason and the source in headers.
    let dead = read_topic(&brokers, &topics.dead_letters, invalid.len());
    assert_eq!(dead.len(), invalid.len(), "one dead letter per bad message");
    let mut expected_reasons: BTreeMap<Vec<u8>, &str> = BTreeMap::new();
    for ((_, payload, _), reason) in invalid.iter().zip([
        "score_out_of_range",
        "not_utf8",
        "not_json",
        "too_old",
        "future",
    ]) {
        expected_reasons.insert(payload.clone(), reason);
    }
    for letter in &dead {
        let payload = letter.payload().expect("payload").to_vec();
        let original = invalid
            .iter()
            .find(|(_, p, _)| *p == payload)
            .expect("dead letter is byte-for-byte one of the bad messages");
        assert_eq!(letter.key(), original.0.map(str::as_bytes));
        assert_eq!(
            header(letter, "npsflow-error").as_deref(),
            Some(expected_reasons[&payload])
        );
        assert_eq!(
            header(letter, "npsflow-source-topic").as_deref(),
            Some(topics.responses.as_str())
        );
        assert!(header(letter, "npsflow-source-offset").is_some());
        assert!(header(letter, "npsflow-source-partition").is_some());
        assert!(header(letter, "npsflow-error-detail").is_some());
        if original.0 == Some("k-bad-score") {
            assert_eq!(
                header(letter, "trace-id").as_deref(),
                Some("abc"),
                "original headers kept"
            );
        }
    }

    // Alerts: one per detractor, routed, keyed by customer.
    let alerts = read_topic(&brokers, &topics.followups, 3);
    assert_eq!(
        alerts.len(),
        3,
        "one alert per detractor, none for the duplicate"
    );
    let mut owners = BTreeMap::new();
    for alert in &alerts {
        let json: Value = serde_json::from_slice(alert.payload().expect("payload")).expect("json");
        let id = json["response_id"].as_str().expect("id").to_owned();
        assert_eq!(json["alert_id"], npsflow_core::alert_id(&id));
        assert_eq!(alert.key(), Some(format!("cust-{id}").as_bytes()));
        owners.insert(id, json["owner"].as_str().expect("owner").to_owned());
    }
    let expected: BTreeMap<String, String> =
        [("d1", "ann"), ("d2", "acme-owner"), ("d3", "cx-queue")]
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
    assert_eq!(owners, expected);

    // Windows: the API and the gauges agree with the accepted responses.
    wait_until("the aggregator to count every response", || {
        pipeline.process.metrics.applied_responses() >= 17
    })
    .await;
    let (status, all) = pipeline.get("/v1/segments/all?window=1h").await;
    assert_eq!(status, StatusCode::OK, "{all}");
    assert_eq!(all["responses"], 6);
    assert_eq!(all["promoters"], 2);
    assert_eq!(all["passives"], 1);
    assert_eq!(all["detractors"], 3);
    let nps = all["nps"].as_f64().expect("nps");
    assert!((nps - 100.0 * (2.0 - 3.0) / 6.0).abs() < 1e-9);
    assert_eq!(all["band"], "low");
    let (_, east) = pipeline.get("/v1/segments/region=east?window=24h").await;
    assert_eq!(
        (east["responses"].as_u64(), east["nps"].as_f64()),
        (Some(3), Some(100.0 / 3.0))
    );
    let (_, combo) = pipeline.get("/v1/segments/product=sedan,region=east").await;
    assert_eq!(
        combo.as_array().map(Vec::len),
        Some(4),
        "one row per window"
    );
    let (status, _) = pipeline.get("/v1/segments/all?window=2h").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = pipeline.get("/v1/segments/region=nowhere").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (_, listing) = pipeline.get("/v1/segments?window=7d").await;
    let names: BTreeSet<&str> = listing
        .as_array()
        .expect("array")
        .iter()
        .map(|row| row["segment"].as_str().expect("segment"))
        .collect();
    assert_eq!(
        names,
        [
            "all",
            "product=sedan",
            "product=sedan,region=east",
            "region=east",
            "region=west"
        ]
        .into()
    );
    let metrics = pipeline.process.metrics.render();
    assert!(
        metrics.contains(
            r#"npsflow_segment_responses{category="detractor",segment="all",window="1h"} 3"#
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"npsflow_segment_nps{segment="region=west",window="28d"} -50"#),
        "{metrics}"
    );
    assert!(metrics.contains(r#"npsflow_alerts_total{kind="detractor",severity="high"} 1"#));
    for line in [
        r#"npsflow_alerts_by_owner_total{owner="account_manager",route="account_manager"} 1"#,
        r#"npsflow_alerts_by_owner_total{owner="acme-owner",route="account"} 1"#,
        r#"npsflow_alerts_by_owner_total{owner="cx-queue",route="default"} 1"#,
    ] {
        assert!(metrics.contains(line), "missing {line}");
    }
    assert!(
        !metrics.contains(r#"owner="ann""#),
        "a customer-supplied name became a label"
    );
    assert!(metrics.contains(r#"npsflow_dead_letters_total{reason="not_utf8"} 1"#));
    let (status, ready) = pipeline.get("/readyz").await;
    assert_eq!(status, StatusCode::OK, "{ready}");
    pipeline.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_errors_are_retried_and_nothing_is_lost() {
    let (cluster, brokers, config) = broker(&[]);
    let topics = &config.settings.topics;
    let input = responses("e", 40, |i| (i % 11) as u8, "");
    produce(&brokers, &topics.responses, &input).await;
    // Every produce request and offset commit fails a few times before it succeeds.
    let transient = [
        RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
        RDKafkaRespErr::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
        RDKafkaRespErr::RD_KAFKA_RESP_ERR_LEADER_NOT_AVAILABLE,
    ];
    cluster.request_errors(RDKafkaApiKey::Produce, &transient.repeat(3));
    cluster.request_errors(RDKafkaApiKey::OffsetCommit, &transient[2..].repeat(2));
    let pipeline = Pipeline::start(&config).await;
    wait_until("all 40 responses", || pipeline.events("accepted") == 40).await;
    let detractors = (0..40).filter(|i| i % 11 <= 6).count();
    let alerts = read_topic(&brokers, &topics.followups, detractors);
    let ids: BTreeSet<String> = alerts
        .iter()
        .map(|a| alert_id_of(a.payload().expect("payload")))
        .collect();
    assert_eq!(ids.len(), detractors, "every detractor alerted");
    wait_until("the aggregator to count all 40", || {
        let view = pipeline.process.view.as_ref().expect("view");
        let rows = view
            .read()
            .expect("lock")
            .segment("all", npsflow_runtime::wall_now())
            .unwrap_or_default();
        rows.first().map(|r| r.summary.tally.responses()) == Some(40)
    })
    .await;
    assert!(
        pipeline
            .process
            .metrics
            .produce_error_count(topics.followups.as_str(), "transient")
            + pipeline
                .process
                .metrics
                .produce_error_count(topics.segment_deltas.as_str(), "transient")
            == 0,
        "librdkafka retries transient errors itself; none reach the role"
    );
    pipeline.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_commits_offsets_so_a_restart_reprocesses_nothing() {
    let (_cluster, brokers, config) = broker(&[]);
    let topics = &config.settings.topics;
    let first = responses("s", 10, |_| 1, "");
    produce(&brokers, &topics.responses, &first).await;
    let pipeline = Pipeline::start(&config).await;
    wait_until("the first ten", || pipeline.events("accepted") == 10).await;
    pipeline.stop().await;

    // The group's committed offsets cover everything consumed.
    let total = committed_total(
        &brokers,
        &config.settings.kafka.ingest_group,
        &topics.responses,
    );
    assert_eq!(total, Some(10), "committed offsets cover all ten messages");

    let second: Vec<(Option<&str>, Vec<u8>, OwnedHeaders)> =
        vec![(Some("k"), response("s-after", 1, ""), OwnedHeaders::new())];
    produce(&brokers, &topics.responses, &second).await;
    let restarted = Pipeline::start(&config).await;
    wait_until("the new message", || restarted.events("accepted") == 1).await;
    let alerts = read_topic(&brokers, &topics.followups, 11);
    assert_eq!(
        alerts.len(),
        11,
        "no alert was sent twice after the restart"
    );
    assert_eq!(
        restarted.total_events(),
        1,
        "nothing before the commit was read again"
    );
    restarted.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_pauses_work_and_readiness_then_both_resume() {
    let (cluster, brokers, config) = broker(&[]);
    let topics = config.settings.topics.clone();
    let before = responses("o", 5, |_| 9, "");
    produce(&brokers, &topics.responses, &before).await;
    let pipeline = Pipeline::start(&config).await;
    wait_until("the first five", || pipeline.events("accepted") == 5).await;
    wait_until("readiness", || pipeline.process.health.ready()).await;

    cluster.broker_down(-1).expect("broker down");
    wait_until("readiness to drop", || !pipeline.process.health.ready()).await;
    wait_until("the consumer to see the outage", || {
        !pipeline.process.health.snapshot()["ingest"].connected
    })
    .await;
    let (status, body) = pipeline.get("/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["roles"]["ingest"]["connected"], false);
    // An outage is not a stall: liveness stays.
    let (status, body) = pipeline.get("/healthz").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // Messages sent during the outage wait in the producer; nothing is lost or failed.
    let during = tokio::spawn({
        let brokers = brokers.clone();
        let topic = topics.responses.clone();
        async move {
            let messages = responses("o-late", 5, |_| 3, "");
            produce(&brokers, &topic, &messages).await;
        }
    });
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        pipeline.events("accepted"),
        5,
        "nothing is processed while the broker is down"
    );

    cluster.broker_up(-1).expect("broker up");
    during.await.expect("produced after the outage");
    wait_until("work to resume", || pipeline.events("accepted") == 10).await;
    wait_until("readiness to return", || pipeline.process.health.ready()).await;
    let alerts = read_topic(&brokers, &topics.followups, 5);
    assert_eq!(
        alerts.len(),
        5,
        "the detractors sent during the outage were alerted once each"
    );
    pipeline.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_aggregator_restores_its_segments_from_snapshots() {
    let (_cluster, brokers, config) = broker(&[]);
    let topics = config.settings.topics.clone();
    let east = r#","segments":{"region":"east"}"#;
    let first = responses("r", 12, |i| (i % 11) as u8, east);
    produce(&brokers, &topics.responses, &first).await;
    let pipeline = Pipeline::start(&config).await;
    wait_until("all twelve counted", || {
        pipeline.process.metrics.applied_responses() == 24
    })
    .await;
    let (_, before) = pipeline.get("/v1/segments/region=east?window=24h").await;
    assert_eq!(before["responses"], 12);
    pipeline.stop().await;

    // A new process: its windows start empty and come back from the state topic alone.
    let restarted = Pipeline::start(&config).await;
    wait_until("restore and readiness", || restarted.process.health.ready()).await;
    let (status, after) = restarted.get("/v1/segments/region=east?window=24h").await;
    assert_eq!(status, StatusCode::OK, "{after}");
    assert_eq!(
        after["as_of"]["source"], "owner",
        "answered from its own windows"
    );
    let counts = |v: &serde_json::Value| {
        let mut v = v.clone();
        if let Some(fields) = v.as_object_mut() {
            fields.remove("as_of");
            fields.remove("computed_at");
        }
        v
    };
    assert_eq!(counts(&after), counts(&before), "restored exactly");
    assert_eq!(
        restarted.process.metrics.applied_responses(),
        0,
        "nothing was re-applied: the committed offsets and snapshots agree"
    );
    // New responses count on top of the restored state, once.
    let more: Vec<(Option<&str>, Vec<u8>, OwnedHeaders)> =
        vec![(Some("k"), response("r-new", 10, east), OwnedHeaders::new())];
    produce(&brokers, &topics.responses, &more).await;
    wait_until("the new response", || {
        restarted.process.metrics.applied_responses() == 2
    })
    .await;
    let (_, latest) = restarted.get("/v1/segments/region=east?window=24h").await;
    assert_eq!(latest["responses"], 13);
    restarted.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_a_resent_response_is_still_a_duplicate() {
    let (_cluster, brokers, config) = broker(&[]);
    let topics = config.settings.topics.clone();
    let original = vec![(Some("cust-x"), response("x", 1, ""), OwnedHeaders::new())];
    produce(&brokers, &topics.responses, &original).await;
    let pipeline = Pipeline::start(&config).await;
    wait_until("the original", || pipeline.events("accepted") == 1).await;
    pipeline.stop().await;

    produce(&brokers, &topics.responses, &original).await;
    let restarted = Pipeline::start(&config).await;
    wait_until("the re-send to be decided", || {
        restarted.total_events() == 1
    })
    .await;
    assert_eq!(
        restarted.events("duplicate"),
        1,
        "recognised after the restart"
    );
    let alerts = read_topic(&brokers, &topics.followups, 1);
    assert_eq!(alerts.len(), 1, "no second alert");
    restarted.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_commits_outputs_and_offsets_in_transactions() {
    let (_cluster, brokers, config) = broker(&[
        ("NPSFLOW__PROCESSING__GUARANTEE", "exactly_once"),
        ("NPSFLOW__PROCESSING__TRANSACTIONAL_ID", "npsflow-test-tx"),
    ]);
    let topics = config.settings.topics.clone();
    let input = responses("t", 8, |_| 2, "");
    produce(&brokers, &topics.responses, &input).await;
    let pipeline = Pipeline::start(&config).await;
    wait_until("all eight", || pipeline.events("accepted") == 8).await;
    let alerts = read_topic(&brokers, &topics.followups, 8);
    assert_eq!(alerts.len(), 8);
    // Every batch went through a committed transaction: none failed or was retried. (The
    // mock cluster accepts TxnOffsetCommit but does not apply it to the group's offsets, so
    // the offset half of the transaction can only be checked on Apache Kafka.)
    assert_eq!(
        pipeline
            .process
            .metrics
            .produce_error_count("transaction", "transient"),
        0
    );
    let ids: BTreeSet<String> = alerts
        .iter()
        .map(|a| alert_id_of(a.payload().expect("payload")))
        .collect();
    let expected: BTreeSet<String> = (0..8)
        .map(|i| npsflow_core::alert_id(&format!("t{i}")))
        .collect();
    assert_eq!(ids, expected);
    pipeline.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resend_is_a_duplicate_whatever_its_key_or_partition() {
    let (_cluster, brokers, config) = broker(&[]);
    let topics = config.settings.topics.clone();
    let body = response("rk", 3, "");
    let plain = OwnedHeaders::new();
    let copies = vec![
        (Some("cust-rk"), body.clone(), plain.clone()),
        (Some("another-key"), body.clone(), plain.clone()),
        (None, body.clone(), plain.clone()),
        (Some("yet-another"), body.clone(), plain.clone()),
    ];
    produce(&brokers, &topics.responses, &copies).await;
    // And once on every partition explicitly.
    for partition in 0..3 {
        produce_to(&brokers, &topics.responses, partition, &body).await;
    }
    let pipeline = Pipeline::start(&config).await;
    wait_until("all seven copies to be decided", || {
        pipeline.total_events() == 7
    })
    .await;
    assert_eq!(pipeline.events("accepted"), 1);
    assert_eq!(pipeline.events("duplicate"), 6);
    let alerts = read_topic(&brokers, &topics.followups, 1);
    assert_eq!(alerts.len(), 1, "one alert for the one response");
    wait_until("the aggregator to count it", || {
        let view = pipeline.process.view.as_ref().expect("view");
        let rows = view
            .read()
            .expect("lock")
            .segment("all", npsflow_runtime::wall_now())
            .unwrap_or_default();
        rows.first().map(|r| r.summary.tally.responses()) == Some(1)
    })
    .await;
    pipeline.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_messages_cost_one_dead_letter_and_stop_nothing() {
    // Input limit 100,000 bytes; the producers refuse records over 50,000 (as a broker
    // with a smaller dead-letter topic would), so a 60,000-byte dead letter is rejected for
    // good and must go out without its value.
    let (_cluster, brokers, config) = broker(&[
        ("NPSFLOW__TOPICS__MAX_MESSAGE_BYTES", "100000"),
        ("NPSFLOW__KAFKA__PROPERTIES__MESSAGE_MAX_BYTES", "50000"),
    ]);
    let topics = config.settings.topics.clone();
    let rejected_by_producer = vec![b'x'; 60_000]; // not_json, too big for the producer
    let over_the_limit = vec![b'{'; 300_000]; // too_large: never decoded
    let plain = OwnedHeaders::new();
    let traced = OwnedHeaders::new().insert(Header {
        key: "trace-id",
        value: Some("t-1"),
    });
    let messages = vec![
        (Some("big-1"), rejected_by_producer.clone(), traced),
        (None, over_the_limit.clone(), plain.clone()),
        (Some("cust-ok"), response("ok", 9, ""), plain.clone()),
    ];
    produce_large(&brokers, &topics.responses, &messages).await;
    let pipeline = Pipeline::start(&config).await;
    wait_until("the valid message after the big ones", || {
        pipeline.events("accepted") == 1
    })
    .await;
    assert_eq!(pipeline.events("invalid"), 2);
    let dead = read_topic(&brokers, &topics.dead_letters, 2);
    assert_eq!(dead.len(), 2, "one dead letter per oversized message");
    let mut reasons = BTreeSet::new();
    for letter in &dead {
        assert!(letter.payload().is_none(), "written without its value");
        let reason = header(letter, "npsflow-error").expect("reason");
        let size = header(letter, "npsflow-original-size").expect("size");
        match reason.as_str() {
            "not_json" => {
                assert_eq!(size, "60000");
                assert_eq!(letter.key(), Some(&b"big-1"[..]));
                assert_eq!(header(letter, "trace-id").as_deref(), Some("t-1"));
            }
            "too_large" => {
                assert_eq!(size, "300000");
                assert_eq!(letter.key(), None);
            }
            other => panic!("unexpected reason {other}"),
        }
        assert!(header(letter, "npsflow-source-offset").is_some());
        assert_eq!(
            header(letter, "npsflow-source-topic").as_deref(),
            Some(topics.responses.as_str())
        );
        reasons.insert(reason);
    }
    assert_eq!(reasons.len(), 2);
    let metrics = pipeline.process.metrics.render();
    assert_eq!(
        sample(&metrics, "npsflow_dead_letters_without_value_total"),
        Some(2.0)
    );
    let permanent = format!(
        "npsflow_produce_errors_total{{kind=\"permanent\",topic=\"{}\"}}",
        topics.dead_letters
    );
    assert!(
        sample(&metrics, &permanent) >= Some(1.0),
        "the producer's rejection was classified permanent: {metrics}"
    );
    let (status, _) = pipeline.get("/healthz").await;
    assert_eq!(status, StatusCode::OK);
    pipeline.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_error_without_a_fallback_stops_the_process() {
    let (cluster, brokers, config) = broker(&[]);
    let topics = config.settings.topics.clone();
    produce_to(&brokers, &topics.responses, 0, &response("denied", 9, "")).await;
    // The broker's errors apply to the next produce requests of any client: the pipeline's.
    let denied = [RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED];
    cluster.request_errors(RDKafkaApiKey::Produce, &denied.repeat(20));
    let pipeline = Pipeline::start(&config).await;
    let health = pipeline.process.health.clone();
    let result = tokio::time::timeout(PATIENCE, pipeline.finished())
        .await
        .expect("the process stops by itself");
    let error = result.expect_err("with an error").to_string();
    assert!(error.contains("rejected for good"), "{error}");
    assert!(!health.live(), "liveness says so until the process exits");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_that_cannot_move_fails_liveness_until_it_moves_again() {
    let (cluster, brokers, config) = broker(&[("NPSFLOW__HEALTH__STALL_TIMEOUT", "2s")]);
    let topics = config.settings.topics.clone();
    produce_to(&brokers, &topics.responses, 1, &response("stuck", 9, "")).await;
    // Then every produce request fails with a retriable error for a while: nothing is
    // delivered, so no offset moves while the message waits.
    let busy = [RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS];
    cluster.request_errors(RDKafkaApiKey::Produce, &busy.repeat(25));
    let pipeline = Pipeline::start(&config).await;
    let mut failed = None;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while failed.is_none() && tokio::time::Instant::now() < deadline {
        let (status, body) = pipeline.get("/healthz").await;
        if status == StatusCode::SERVICE_UNAVAILABLE {
            failed = Some(body);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let body = failed.expect("liveness fails while the partition is stuck");
    assert_eq!(body["roles"]["ingest"]["stalled_partitions"], 1, "{body}");
    wait_until("the stall to show in the metric", || {
        pipeline
            .process
            .metrics
            .render()
            .contains("npsflow_stalled_partitions{role=\"ingest\"} 1")
    })
    .await;
    // Once the errors are used up the message goes through and liveness recovers.
    wait_until("the message to be decided", || {
        pipeline.events("accepted") == 1
    })
    .await;
    let mut live = false;
    for _ in 0..100 {
        if pipeline.get("/healthz").await.0 == StatusCode::OK {
            live = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(live, "liveness recovers");
    pipeline.stop().await;
}

/// The value of one series (name and labels exactly as rendered) in a text exposition.
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
}

fn outcome(event_id: &str, case_id: &str, kind: &str, occurred_at: &str, extra: &str) -> Vec<u8> {
    format!(
        r#"{{"event_id":"{event_id}","case_id":"{case_id}","type":"{kind}","occurred_at":"{occurred_at}"{extra}}}"#
    )
    .into_bytes()
}

fn escalations_seen(brokers: &str, topic: &str) -> BTreeMap<(String, u64), usize> {
    let mut seen = BTreeMap::new();
    for message in read_to_end(brokers, topic) {
        let notice: Value =
            serde_json::from_slice(message.payload().expect("a notice")).expect("json");
        let key = (
            notice["case_id"].as_str().expect("case_id").to_owned(),
            notice["level"].as_u64().expect("level"),
        );
        *seen.entry(key).or_insert(0) += 1;
    }
    seen
}

/// The closed loop on the in-process broker, with the roles on a hand-moved clock: cases open
/// from alerts, outcome events move them (in any order, duplicates ignored, invalid ones
/// dead-lettered byte-for-byte, early ones kept for their case), deadlines escalate on the
/// clock with no message arriving, each (case, level) once, never a closed case; a customer's
/// next response decides recovery; a restarted process restores every case and escalates
/// nothing again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followup_cases_escalate_on_the_clock_close_by_outcomes_and_recover() {
    let (_cluster, brokers, config) = broker(&[
        ("NPSFLOW__FOLLOWUP__FIRST_CONTACT_SLA", "1h"),
        ("NPSFLOW__FOLLOWUP__RESOLVE_SLA", "2h"),
        ("NPSFLOW__FOLLOWUP__ESCALATE_SCORES", ""),
        ("NPSFLOW__FOLLOWUP__ESCALATION_OWNER", "head-of-cx"),
    ]);
    let topics = config.settings.topics.clone();
    let start = npsflow_runtime::wall_now();
    let clock = Arc::new(npsflow_runtime::engine::ManualClock::new(start));
    let pipeline = Pipeline::start_with_clock(&config, clock.clone()).await;
    let detractors: Vec<(Option<&str>, Vec<u8>, OwnedHeaders)> = ["closed", "contacted", "ignored"]
        .iter()
        .map(|id| (Some("any-key"), response(id, 4, ""), OwnedHeaders::new()))
        .collect();
    let case = |id: &str| npsflow_core::alert_id(id);
    let soon = now_rfc3339(-20);
    // An outcome for the case `closed` may come before its alert: it waits for it.
    let early = vec![(
        Some("early"),
        outcome("e0", &case("closed"), "acknowledged", &soon, ""),
        OwnedHeaders::new(),
    )];
    produce(&brokers, &topics.followup_outcomes, &early).await;
    produce(&brokers, &topics.responses, &detractors).await;
    wait_until("three cases opened", || {
        pipeline.process.metrics.cases_opened() == 3
    })
    .await;

    let invalid = outcome(
        "bad",
        &case("closed"),
        "teleported",
        &soon,
        r#","comment":"secret""#,
    );
    let outcomes: Vec<(Option<&str>, Vec<u8>, OwnedHeaders)> = vec![
        outcome(
            "e2",
            &case("closed"),
            "resolved",
            &soon,
            r#","resolution":"fixed""#,
        ),
        outcome("e1", &case("closed"), "contacted", &soon, ""),
        outcome(
            "e3",
            &case("closed"),
            "closed",
            &soon,
            r#","resolution":"fixed""#,
        ),
        outcome(
            "e3",
            &case("closed"),
            "closed",
            &soon,
            r#","resolution":"fixed""#,
        ),
        outcome(
            "e4",
            &case("contacted"),
            "contacted",
            &soon,
            r#","contact_result":"reached""#,
        ),
        invalid.clone(),
    ]
    .into_iter()
    .map(|payload| (Some("k"), payload, OwnedHeaders::new()))
    .collect();
    produce(&brokers, &topics.followup_outcomes, &outcomes).await;
    wait_until("the outcomes applied", || {
        // The early event is usually kept until its alert comes (then applied with it), but
        // may also come after the alert and be applied like the others.
        let m = &pipeline.process.metrics;
        m.followup_input_count("outcome", "applied") + m.followup_input_count("outcome", "kept")
            == 5
            && m.followup_input_count("outcome", "duplicate") == 1
    })
    .await;
    let dead = read_topic(&brokers, &topics.dead_letters, 1);
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].payload(), Some(invalid.as_slice()), "byte for byte");
    assert_eq!(
        header(&dead[0], "npsflow-error").as_deref(),
        Some("unknown_value")
    );
    let (status, closed) = pipeline.get(&format!("/v1/cases/{}", case("closed"))).await;
    assert_eq!(status, StatusCode::OK, "{closed}");
    assert_eq!(closed["state"], "closed");
    assert_eq!(closed["history"].as_array().expect("history").len(), 4);
    assert!(escalations_seen(&brokers, &topics.escalations).is_empty());

    // Past the first-contact deadline, with no message arriving: only the case nobody
    // contacted escalates.
    clock.set(npsflow_core::Timestamp(start.millis() + 61 * 60_000));
    wait_until("the first escalation", || {
        !escalations_seen(&brokers, &topics.escalations).is_empty()
    })
    .await;
    let first = escalations_seen(&brokers, &topics.escalations);
    assert_eq!(first, BTreeMap::from([((case("ignored"), 1), 1)]));
    // Past the resolve deadline: level 2 for both open cases; none for the closed one.
    clock.set(npsflow_core::Timestamp(start.millis() + 121 * 60_000));
    wait_until("three escalations", || {
        escalations_seen(&brokers, &topics.escalations).len() == 3
    })
    .await;
    let (_, overdue) = pipeline.get("/v1/cases?overdue=true&state=contacted").await;
    assert_eq!(overdue["count"], 1, "{overdue}");

    // The customer of the closed case answers again, as a promoter: recovered.
    let again = format!(
        r#"{{"response_id":"closed-later","score":9,"responded_at":"{}","customer_id":"cust-closed"}}"#,
        now_rfc3339(0)
    );
    let again = vec![(Some("x"), again.into_bytes(), OwnedHeaders::new())];
    produce(&brokers, &topics.responses, &again).await;
    wait_until("recovery decided", || {
        pipeline.process.metrics.recovery_count("recovered") == 1
    })
    .await;
    wait_until("the directory to show it", || {
        pipeline
            .process
            .directory
            .as_ref()
            .expect("directory")
            .case(&case("closed"))
            .is_some_and(|c| c.recovered == Some(true))
    })
    .await;
    pipeline.stop().await;

    // A new process, later still: every case comes back, nothing escalates again.
    clock.set(npsflow_core::Timestamp(start.millis() + 300 * 60_000));
    let restarted = Pipeline::start_with_clock(&config, clock.clone()).await;
    wait_until("restore and readiness", || restarted.process.health.ready()).await;
    wait_until("the cases read back", || {
        restarted
            .process
            .directory
            .as_ref()
            .expect("directory")
            .len()
            == 3
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = escalations_seen(&brokers, &topics.escalations);
    assert_eq!(after.len(), 3);
    assert!(
        after.values().all(|n| *n == 1),
        "each (case, level) once: {after:?}"
    );
    let (_, ignored) = restarted
        .get(&format!("/v1/cases/{}", case("ignored")))
        .await;
    assert_eq!(ignored["escalation_level"], 2);
    assert_eq!(ignored["escalations"][0]["escalate_to"], "head-of-cx");
    restarted.stop().await;
}

/// Invitations and accounts on the path the service runs: invitations are counted per
/// segment and window (a re-send with another key once; an invalid one dead-lettered byte for
/// byte), so the response rate is right; responses with an `account_id` make their account's
/// NPS, served by `/v1/accounts` from the account view topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invitations_make_the_response_rate_and_accounts_their_nps() {
    let (_cluster, brokers, config) = broker(&[]);
    let topics = config.settings.topics.clone();
    let plain = OwnedHeaders::new();
    let invitation = |id: &str| {
        format!(
            r#"{{"invitation_id":"{id}","customer_id":"cust-{id}","sent_at":"{}","segments":{{"region":"east"}}}}"#,
            now_rfc3339(-120)
        )
        .into_bytes()
    };
    let invalid = br#"{"invitation_id":"i-bad","customer_id":"c"}"#.to_vec();
    let mut invitations: Vec<(Option<&str>, Vec<u8>, OwnedHeaders)> = ["i1", "i2", "i3", "i4"]
        .iter()
        .map(|id| (Some("k"), invitation(id), plain.clone()))
        .collect();
    invitations.push((Some("other-key"), invitation("i1"), plain.clone()));
    invitations.push((Some("k-bad"), invalid.clone(), plain.clone()));
    produce(&brokers, &topics.invitations, &invitations).await;
    let east_acme = r#","segments":{"region":"east"},"account_id":"acme""#;
    let responses = vec![
        (Some("c1"), response("a1", 10, east_acme), plain.clone()),
        (Some("c2"), response("a2", 3, east_acme), plain.clone()),
        (
            Some("c3"),
            response("b1", 9, r#","account_id":"beta""#),
            plain.clone(),
        ),
    ];
    produce(&brokers, &topics.responses, &responses).await;
    let pipeline = Pipeline::start(&config).await;

    let mut east = Value::Null;
    for _ in 0..600 {
        let (status, body) = pipeline.get("/v1/segments/region=east?window=1h").await;
        east = body;
        if status == StatusCode::OK && east["invitations"] == 4 && east["responses"] == 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(east["invitations"], 4, "{east}");
    assert_eq!(east["response_rate"], 0.5);
    let (_, all) = pipeline.get("/v1/segments/all?window=1h").await;
    assert_eq!(
        (all["invitations"].clone(), all["responses"].clone()),
        (serde_json::json!(4), serde_json::json!(3))
    );

    let dead = read_topic(&brokers, &topics.dead_letters, 1);
    assert_eq!(dead[0].payload(), Some(&invalid[..]), "byte for byte");
    assert_eq!(
        header(&dead[0], "npsflow-error").as_deref(),
        Some("missing_field")
    );
    assert_eq!(
        header(&dead[0], "npsflow-source-topic").as_deref(),
        Some(topics.invitations.as_str())
    );
    let metrics = pipeline.process.metrics.render();
    assert_eq!(
        sample(&metrics, "npsflow_invitations_total{outcome=\"duplicate\"}"),
        Some(1.0)
    );
    assert_eq!(
        pipeline.events("accepted"),
        3,
        "invitations are not responses"
    );

    let mut acme = Value::Null;
    for _ in 0..600 {
        let (status, body) = pipeline.get("/v1/accounts/acme").await;
        if status == StatusCode::OK && body["responses"] == 2 {
            acme = body;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(acme["nps"], 0.0, "{acme}");
    assert_eq!(acme["window"], "28d");
    assert_eq!(acme["as_of"]["source"], "view");
    let (_, beta) = pipeline.get("/v1/accounts/beta").await;
    assert_eq!(
        (beta["responses"].clone(), beta["nps"].clone()),
        (serde_json::json!(1), serde_json::json!(100.0))
    );
    let (status, _) = pipeline.get("/v1/accounts/nobody").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    pipeline.stop().await;
}
