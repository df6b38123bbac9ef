//! Helpers shared by the service tests (mock broker) and the end-to-end tests (real
//! broker): a pipeline running every role in-process, producing, reading topics back.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use npsflow_runtime::{Config, Process, Role};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use serde_json::Value;
use tokio::sync::watch;
use tower::ServiceExt;

/// Long enough for anything on a loaded 2-core machine; tests end as soon as data arrives.
pub const PATIENCE: Duration = Duration::from_secs(60);

pub fn config(brokers: &str, extra: &[(&str, &str)]) -> Arc<Config> {
    let env = [
        ("NPSFLOW__KAFKA__BROKERS", brokers),
        ("NPSFLOW__INGEST__BATCH_MAX_WAIT", "20ms"),
        ("NPSFLOW__HTTP__LISTEN", "127.0.0.1:0"),
        ("NPSFLOW__TOPICS__PARTITIONS", "3"),
        ("NPSFLOW__ROUTING__DEFAULT_OWNER", "cx-queue"),
        ("NPSFLOW__ROUTING__ACCOUNTS__ACME", "acme-owner"),
    ];
    let env = env
        .iter()
        .chain(extra)
        .map(|(k, v)| (k.to_string(), v.to_string()));
    Arc::new(Config::load(None, env).expect("valid test config"))
}

/// The guarantee and client properties a real-broker tier runs with, from its script:
/// `NPSFLOW_E2E_GUARANTEE` (`processing.guarantee`, default at_least_once) and
/// `NPSFLOW_E2E_KAFKA_PROPERTIES` (`kafka.properties` as `name=value,...`, e.g.
/// `partition.assignment.strategy=range` for noida-db), as config environment entries.
pub fn broker_env() -> Vec<(&'static str, String)> {
    let mut env = Vec::new();
    if let Ok(guarantee) = std::env::var("NPSFLOW_E2E_GUARANTEE") {
        env.push(("NPSFLOW__PROCESSING__GUARANTEE", guarantee));
    }
    if let Ok(properties) = std::env::var("NPSFLOW_E2E_KAFKA_PROPERTIES") {
        env.push(("NPSFLOW__KAFKA__PROPERTIES", properties));
    }
    env
}

/// True when the real-broker tier runs with `processing.guarantee = exactly_once`.
pub fn exactly_once() -> bool {
    std::env::var("NPSFLOW_E2E_GUARANTEE").is_ok_and(|g| g == "exactly_once")
}

/// A consumer of test outputs: a fresh group, nothing committed, and only what committed
/// transactions wrote (librdkafka's default, said here because the exactly-once tiers rely
/// on it: an aborted or fenced transaction's records must not count).
pub fn reader(brokers: &str, group: &str) -> BaseConsumer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("isolation.level", "read_committed")
        .create()
        .expect("consumer")
}

pub struct Pipeline {
    pub process: Process,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), npsflow_runtime::RuntimeError>>,
}

impl Pipeline {
    pub async fn start(config: &Arc<Config>) -> Pipeline {
        Pipeline::start_with_clock(config, Arc::new(npsflow_runtime::engine::WallClock)).await
    }

    /// A pipeline whose roles read `clock` (e.g. a hand-moved `ManualClock`).
    pub async fn start_with_clock(
        config: &Arc<Config>,
        clock: Arc<dyn npsflow_runtime::engine::Clock>,
    ) -> Pipeline {
        let mut process = Process::new(config, &Role::ALL);
        process.clock = clock;
        let (listener, _) = npsflow_runtime::http::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(npsflow_runtime::run(
            config.clone(),
            &Role::ALL,
            process.clone(),
            listener,
            stopped,
        ));
        Pipeline {
            process,
            stop,
            task,
        }
    }

    pub async fn stop(self) {
        self.stop.send(true).expect("pipeline listening");
        self.task.await.expect("joined").expect("clean stop");
    }

    /// Waits until the pipeline stops by itself, and returns how.
    pub async fn finished(self) -> Result<(), npsflow_runtime::RuntimeError> {
        self.task.await.expect("joined")
    }

    pub fn events(&self, outcome: &str) -> u64 {
        self.process.metrics.outcome_count(outcome)
    }

    pub fn total_events(&self) -> u64 {
        ["accepted", "invalid", "duplicate", "too_old", "future"]
            .iter()
            .map(|o| self.events(o))
            .sum()
    }

    pub async fn get(&self, uri: &str) -> (StatusCode, Value) {
        let response = npsflow_runtime::http::router(self.process.app_state())
            .oneshot(Request::get(uri).body(Body::empty()).expect("request"))
            .await
            .expect("served");
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .expect("body");
        let text = String::from_utf8(bytes.to_vec()).expect("utf8");
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }
}

/// A failed assertion ends the test process at once, with the usual report. Without this, a
/// failing test would wait on Kafka clients that are still closing (tokio's runtime waits for
/// blocking tasks when it shuts down).
pub fn fail_fast() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        std::panic::set_hook(Box::new(|info| {
            // Straight to the process's stderr: the test harness's capture dies with us.
            use std::io::Write;
            let thread = std::thread::current();
            let name = thread.name().unwrap_or("unnamed");
            let _ = writeln!(std::io::stderr(), "\ntest thread '{name}' {info}");
            std::process::exit(101);
        }));
    });
}

/// One idempotent producer per broker address, kept for the test binary's life: making one
/// per call costs a connection and a producer id each time, which slows a test that sends
/// many small chunks (the chaos test) to a crawl.
fn producer_for(brokers: &str) -> FutureProducer {
    static PRODUCERS: std::sync::OnceLock<std::sync::Mutex<BTreeMap<String, FutureProducer>>> =
        std::sync::OnceLock::new();
    let mut producers = PRODUCERS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    producers
        .entry(brokers.to_owned())
        .or_insert_with(|| {
            ClientConfig::new()
                .set("bootstrap.servers", brokers)
                .set("enable.idempotence", "true")
                .set("partitioner", "murmur2_random")
                .set("linger.ms", "5")
                .create()
                .expect("producer")
        })
        .clone()
}

pub async fn produce(
    brokers: &str,
    topic: &str,
    messages: &[(Option<&str>, Vec<u8>, OwnedHeaders)],
) {
    let producer = producer_for(brokers);
    // All in flight at once; the idempotent producer keeps each partition's order.
    let sends = messages.iter().map(|(key, payload, headers)| {
        let mut record = FutureRecord::to(topic)
            .payload(payload.as_slice())
            .headers(headers.clone());
        if let Some(key) = key {
            record = record.key(*key);
        }
        producer.send(record, Timeout::Never)
    });
    for result in futures::future::join_all(sends).await {
        result.expect("delivered");
    }
}

/// One message without a key on an explicit partition.
pub async fn produce_to(brokers: &str, topic: &str, partition: i32, payload: &[u8]) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("producer");
    let record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic)
        .payload(payload)
        .partition(partition);
    producer
        .send(record, Timeout::Never)
        .await
        .expect("delivered");
}

/// Like [`produce`], with a producer that accepts messages of up to 20 MB.
pub async fn produce_large(
    brokers: &str,
    topic: &str,
    messages: &[(Option<&str>, Vec<u8>, OwnedHeaders)],
) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("message.max.bytes", "20000000")
        .create()
        .expect("producer");
    for (key, payload, headers) in messages {
        let mut record = FutureRecord::to(topic)
            .payload(payload.as_slice())
            .headers(headers.clone());
        if let Some(key) = key {
            record = record.key(*key);
        }
        producer
            .send(record, Timeout::Never)
            .await
            .expect("delivered");
    }
}

/// Every message of a topic, read from the start until `count` arrived.
pub fn read_topic(brokers: &str, topic: &str, count: usize) -> Vec<OwnedMessage> {
    let consumer = reader(brokers, &format!("reader-{topic}-{}", rand_suffix()));
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("metadata");
    let mut list = TopicPartitionList::new();
    for partition in metadata.topics()[0].partitions() {
        list.add_partition_offset(topic, partition.id(), Offset::Beginning)
            .expect("partition");
    }
    consumer.assign(&list).expect("assign");
    let deadline = std::time::Instant::now() + PATIENCE;
    let mut messages = Vec::new();
    while messages.len() < count && std::time::Instant::now() < deadline {
        if let Some(Ok(message)) = consumer.poll(Duration::from_millis(100)) {
            messages.push(message.detach());
        }
    }
    // Anything beyond `count` would be a duplicate: give it a moment to show up.
    let settle = std::time::Instant::now() + Duration::from_millis(500);
    while std::time::Instant::now() < settle {
        if let Some(Ok(message)) = consumer.poll(Duration::from_millis(50)) {
            messages.push(message.detach());
        }
    }
    messages
}

/// Every message of `topic` up to its current end (read with a fresh group, from the start).
pub fn read_to_end(brokers: &str, topic: &str) -> Vec<OwnedMessage> {
    let consumer = reader(
        brokers,
        &format!(
            "reader-to-end-{topic}-{}-{}",
            std::process::id(),
            rand_suffix()
        ),
    );
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(30))
        .expect("metadata");
    let mut ends = HashMap::new();
    let mut list = TopicPartitionList::new();
    for partition in metadata.topics()[0].partitions() {
        let (low, high) = consumer
            .fetch_watermarks(topic, partition.id(), Duration::from_secs(30))
            .expect("watermarks");
        if high > low {
            ends.insert(partition.id(), high);
            list.add_partition_offset(topic, partition.id(), Offset::Beginning)
                .expect("partition");
        }
    }
    let mut messages = Vec::new();
    if ends.is_empty() {
        return messages;
    }
    consumer.assign(&list).expect("assign");
    let deadline = Instant::now() + Duration::from_secs(120);
    // A partition is read when the position reaches its end: with transactions, the last
    // offsets may be markers or aborted records, which are never delivered.
    while !ends.is_empty() && Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(message)) => {
                if ends.get(&message.partition()) == Some(&(message.offset() + 1)) {
                    ends.remove(&message.partition());
                }
                messages.push(message.detach());
            }
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) | None => {
                let positions = consumer.position().expect("positions");
                ends.retain(|partition, end| {
                    !positions
                        .find_partition(topic, *partition)
                        .is_some_and(|e| matches!(e.offset(), Offset::Offset(at) if at >= *end))
                });
            }
            Some(Err(e)) => println!("reading {topic}: {e}"),
        }
    }
    assert!(ends.is_empty(), "read {topic} to its end: {ends:?} left");
    messages
}

pub fn rand_suffix() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

pub async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn now_rfc3339(offset_s: i64) -> String {
    npsflow_core::Timestamp(npsflow_runtime::wall_now().millis() + offset_s * 1000).to_rfc3339()
}

pub fn response(id: &str, score: u8, extra: &str) -> Vec<u8> {
    format!(
        r#"{{"response_id":"{id}","score":{score},"responded_at":"{}","customer_id":"cust-{id}"{extra}}}"#,
        now_rfc3339(-30)
    )
    .into_bytes()
}

pub fn header(message: &OwnedMessage, name: &str) -> Option<String> {
    message.headers().and_then(|h| {
        h.iter()
            .find(|header| header.key == name)
            .and_then(|header| header.value)
            .map(|v| String::from_utf8_lossy(v).into_owned())
    })
}

/// What the contract says the pipeline must make of a data set, computed from the raw
/// messages with serde_json and the contract's rules, not with npsflow's own code.
#[derive(Default)]
pub struct Answer {
    pub accepted: u64,
    pub duplicates: u64,
    pub invalid: Vec<Vec<u8>>,
    pub detractor_ids: BTreeSet<String>,
    /// segment -> (promoters, passives, detractors)
    pub segments: BTreeMap<String, (u64, u64, u64)>,
}

pub fn answer(messages: &[(Option<String>, Vec<u8>)]) -> Answer {
    let mut answer = Answer::default();
    let mut seen = HashSet::new();
    for (_, payload) in messages {
        let json: Option<Value> = serde_json::from_slice(payload).ok();
        let valid = json.as_ref().filter(|j| {
            j["response_id"].is_string()
                && j["customer_id"].is_string()
                && j["responded_at"].is_string()
                && j["score"].as_u64().is_some_and(|s| s <= 10)
        });
        let Some(json) = valid else {
            answer.invalid.push(payload.clone());
            continue;
        };
        let id = json["response_id"].as_str().expect("string").to_owned();
        if !seen.insert(id.clone()) {
            answer.duplicates += 1;
            continue;
        }
        answer.accepted += 1;
        let score = json["score"].as_u64().expect("score");
        if score <= 6 {
            answer.detractor_ids.insert(id);
        }
        let s = &json["segments"];
        let value = |d: &str| s[d].as_str().map(|v| format!("{d}={v}"));
        let mut names = vec!["all".to_owned()];
        names.extend(
            ["region", "product", "channel", "tier"]
                .iter()
                .filter_map(|d| value(d)),
        );
        if let (Some(p), Some(r)) = (value("product"), value("region")) {
            names.push(format!("{p},{r}"));
        }
        for name in names {
            let counts = answer.segments.entry(name).or_default();
            match score {
                9..=10 => counts.0 += 1,
                7..=8 => counts.1 += 1,
                _ => counts.2 += 1,
            }
        }
    }
    answer
}

/// `n` keyed response messages with ids `{prefix}{i}`, scores from `score`, and `extra` JSON.
pub fn responses(
    prefix: &str,
    n: usize,
    score: impl Fn(usize) -> u8,
    extra: &str,
) -> Vec<(Option<&'static str>, Vec<u8>, OwnedHeaders)> {
    (0..n)
        .map(|i| {
            let body = response(&format!("{prefix}{i}"), score(i), extra);
            (Some("k"), body, OwnedHeaders::new())
        })
        .collect()
}

/// The `alert_id` of an alert message body.
pub fn alert_id_of(payload: &[u8]) -> String {
    let json: Value = serde_json::from_slice(payload).expect("alert json");
    json["alert_id"].as_str().expect("alert_id").to_owned()
}

/// The group's committed offsets on every partition of `topic`, summed (none counts 0);
/// `None` if the broker does not answer.
pub fn committed_total(brokers: &str, group: &str, topic: &str) -> Option<i64> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .create()
        .ok()?;
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .ok()?;
    let mut list = TopicPartitionList::new();
    for partition in metadata.topics()[0].partitions() {
        list.add_partition(topic, partition.id());
    }
    let committed = consumer
        .committed_offsets(list, Duration::from_secs(10))
        .ok()?;
    Some(
        committed
            .elements()
            .iter()
            .map(|e| match e.offset() {
                Offset::Offset(o) => o,
                _ => 0,
            })
            .sum(),
    )
}

/// The end of `topic` (for read_committed readers: its last stable offset) minus the group's
/// committed offsets, summed over partitions; `None` if the broker does not answer.
pub fn lag(brokers: &str, group: &str, topic: &str) -> Option<i64> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("isolation.level", "read_committed")
        .create()
        .ok()?;
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(30))
        .ok()?;
    let mut total_end = 0;
    for partition in metadata.topics()[0].partitions() {
        total_end += consumer
            .fetch_watermarks(topic, partition.id(), Duration::from_secs(30))
            .ok()?
            .1;
    }
    Some(total_end - committed_total(brokers, group, topic)?)
}

/// Every topic and consumer group, named for one test run (on a shared broker).
pub fn run_names(run: &str) -> Vec<(&'static str, String)> {
    let mut names = vec![
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
    names.extend(followup_names(run));
    names
}

/// The followup role's topics and group, and the invitation and view topics, named for one
/// test run (on a shared broker).
pub fn followup_names(run: &str) -> Vec<(&'static str, String)> {
    vec![
        (
            "NPSFLOW__TOPICS__FOLLOWUP_OUTCOMES",
            format!("{run}.outcomes"),
        ),
        (
            "NPSFLOW__TOPICS__FOLLOWUP_EVENTS",
            format!("{run}.followup-events"),
        ),
        ("NPSFLOW__TOPICS__CASES", format!("{run}.cases")),
        ("NPSFLOW__TOPICS__ESCALATIONS", format!("{run}.escalations")),
        (
            "NPSFLOW__TOPICS__FOLLOWUP_STATE",
            format!("{run}.followup-state"),
        ),
        ("NPSFLOW__KAFKA__FOLLOWUP_GROUP", format!("{run}-followup")),
        ("NPSFLOW__TOPICS__INVITATIONS", format!("{run}.invitations")),
        (
            "NPSFLOW__TOPICS__SEGMENT_VIEW",
            format!("{run}.segment-nps"),
        ),
        (
            "NPSFLOW__TOPICS__ACCOUNT_VIEW",
            format!("{run}.account-nps"),
        ),
    ]
}

/// A case's state by the contract's rules, from its outcome events (type, occurred_at in ms,
/// event_id), written here without npsflow's code: sorted by time then id; forward only;
/// `reopened` takes a resolved or closed case back to contacted.
pub fn naive_case_state(events: &[(String, i64, String)]) -> &'static str {
    let rank = |s: &str| {
        ["open", "acknowledged", "contacted", "resolved", "closed"]
            .iter()
            .position(|x| *x == s)
            .expect("a state")
    };
    let mut sorted: Vec<&(String, i64, String)> = events.iter().collect();
    sorted.sort_by(|a, b| (a.1, &a.2).cmp(&(b.1, &b.2)));
    let mut state = "open";
    for (kind, _, _) in sorted {
        let target = match kind.as_str() {
            "acknowledged" => "acknowledged",
            "contacted" => "contacted",
            "resolved" => "resolved",
            "closed" => "closed",
            "reopened" if rank(state) >= rank("resolved") => {
                state = "contacted";
                continue;
            }
            _ => continue,
        };
        if rank(target) > rank(state) {
            state = target;
        }
    }
    state
}

/// GET a JSON body from a process on loopback; `None` unless it answers 200 in time.
pub async fn http_json(port: u16, path: &str) -> Option<Value> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()?;
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.ok()?;
        let text = String::from_utf8(response).ok()?;
        let (head, body) = text.split_once("\r\n\r\n")?;
        head.starts_with("HTTP/1.1 200").then_some(())?;
        serde_json::from_str(body).ok()
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .ok()
        .flatten()
}
