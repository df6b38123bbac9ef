//! Configuration: embedded defaults < a TOML file (`--config`) < environment variables
//! (`NPSFLOW__SECTION__KEY`). Unknown keys are rejected, and every problem found is reported
//! at once. The settings turn into the core's types here, so the rest of the runtime never
//! sees an unchecked value.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use npsflow_core::{Routing, SegmentRoute, SegmentSpec, Span, WindowSpecs};
use serde::{Deserialize, Serialize};

/// The defaults, as a user would write them in a file.
pub const DEFAULTS: &str = include_str!("defaults.toml");

/// Every setting.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Settings {
    /// Brokers, client properties, consumer groups.
    pub kafka: KafkaSettings,
    /// Topic names.
    pub topics: TopicSettings,
    /// Rolling windows and the clock.
    pub windows: WindowSettings,
    /// Segment dimensions and combinations.
    pub segments: SegmentSettings,
    /// Duplicate detection.
    pub dedupe: DedupeSettings,
    /// Who follows up detractors.
    pub routing: RoutingSettings,
    /// Delivery guarantee.
    pub processing: ProcessingSettings,
    /// Ingest batching.
    pub ingest: IngestSettings,
    /// The HTTP server (metrics and API).
    pub http: HttpSettings,
    /// Logging.
    pub log: LogSettings,
}

/// Where Kafka is and how to talk to it.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct KafkaSettings {
    /// `bootstrap.servers`.
    pub brokers: String,
    /// Any librdkafka property, passed through (`security.protocol`, `sasl.*`, `ssl.*`, ...).
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
    /// Consumer group of the ingest role.
    pub ingest_group: String,
    /// Consumer group of the aggregate role.
    pub aggregate_group: String,
}

/// Topic names.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct TopicSettings {
    /// Survey responses in.
    pub responses: String,
    /// Dead letters out.
    pub dead_letters: String,
    /// Detractor alerts out.
    pub followups: String,
    /// Pre-aggregated segment counts between ingest and aggregate.
    pub segment_deltas: String,
    /// Compacted segment snapshots, co-partitioned with the deltas.
    pub state: String,
    /// Partitions used by `npsflow topics create`.
    pub partitions: i32,
    /// Replication factor used by `npsflow topics create`.
    pub replication: i32,
}

/// The clock that defines "now" for windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ClockKind {
    /// The machine's wall clock.
    Wall,
    /// The largest event time seen (for replays).
    EventTime,
}

/// Rolling windows.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct WindowSettings {
    /// Window lengths, e.g. `["1h", "24h", "7d", "28d"]`.
    pub lengths: Vec<String>,
    /// Buckets per window.
    pub buckets: u32,
    /// How far ahead of the clock a response may be.
    pub max_future_skew: String,
    /// Which clock is "now".
    pub clock: ClockKind,
}

/// Segments.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct SegmentSettings {
    /// Dimensions, e.g. `["region", "product"]`.
    #[serde(default)]
    pub dimensions: Vec<String>,
    /// Combinations, e.g. `[["region", "product"]]`.
    #[serde(default)]
    pub combinations: Vec<Vec<String>>,
    /// Most distinct values per dimension; more count as `__other__`.
    pub max_values_per_dimension: usize,
}

/// Duplicate detection.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct DedupeSettings {
    /// How long an id is remembered, in event time; empty means the longest window.
    pub horizon: String,
    /// Most ids remembered per input partition.
    pub capacity: usize,
    /// On assignment, how many messages before the committed offset of each input
    /// partition are read back to rebuild the duplicate memory.
    pub restore_messages: i64,
}

/// Routing of detractor alerts.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct RoutingSettings {
    /// Owner when nothing else matches.
    pub default_owner: String,
    /// account_id -> owner.
    #[serde(default)]
    pub accounts: BTreeMap<String, String>,
    /// Segment rules, first match wins.
    #[serde(default)]
    pub segments: Vec<SegmentRouteSettings>,
}

/// One segment routing rule.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SegmentRouteSettings {
    /// Dimension name.
    pub dimension: String,
    /// Value.
    pub value: String,
    /// Owner.
    pub owner: String,
}

/// How ingest's outputs and input offsets are committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Guarantee {
    /// Outputs are delivered, then offsets stored: after a crash some outputs may be sent
    /// again (alerts keep their `alert_id`; the aggregator skips re-sent counts).
    AtLeastOnce,
    /// Each batch's outputs and its input offsets are committed in one Kafka transaction:
    /// consumers reading with `isolation.level=read_committed` see every output once. Needs a
    /// broker with transactions (Apache Kafka has them; Tansu 0.6 does not).
    ExactlyOnce,
}

/// Delivery guarantee settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ProcessingSettings {
    /// `at_least_once` or `exactly_once`.
    pub guarantee: Guarantee,
    /// Transactional id of this ingest process (exactly_once); empty: one is made from the
    /// host name and process id.
    pub transactional_id: String,
}

/// Ingest batching.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct IngestSettings {
    /// Most messages per batch.
    pub batch_max_messages: usize,
    /// Longest wait to fill a batch.
    pub batch_max_wait: String,
}

/// HTTP server.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct HttpSettings {
    /// Address to listen on, e.g. `0.0.0.0:9464`.
    pub listen: String,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    Pretty,
    /// One JSON object per line.
    Json,
}

/// Logging.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct LogSettings {
    /// Format.
    pub format: LogFormat,
    /// `tracing` filter, e.g. `info` or `npsflow=debug,rdkafka=warn`.
    pub level: String,
}

/// Everything wrong with a configuration, one problem per line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<String>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "invalid configuration ({} problem(s)):", self.0.len())?;
        for problem in &self.0 {
            writeln!(f, "  - {problem}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Settings checked and turned into the core's types.
#[derive(Debug, Clone)]
pub struct Config {
    /// The settings as given.
    pub settings: Settings,
    /// Windows and time rules.
    pub windows: WindowSpecs,
    /// Segment spec.
    pub segments: SegmentSpec,
    /// Alert routing.
    pub routing: Routing,
    /// Dedupe horizon.
    pub dedupe_horizon: Span,
    /// Ingest batch wait.
    pub batch_max_wait: Span,
}

/// Property names whose values are never printed.
pub fn is_secret(property: &str) -> bool {
    let p = property.to_ascii_lowercase();
    ["password", "secret", "key", "token", "jaas", "credential"]
        .iter()
        .any(|word| p.contains(word))
        && !p.ends_with(".location")
}

impl Config {
    /// Loads defaults, then `file` if given, then `NPSFLOW__*` variables from `env`.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigErrors> {
        let mut builder = config::Config::builder()
            .add_source(config::File::from_str(DEFAULTS, config::FileFormat::Toml));
        if let Some(path) = file {
            builder = builder.add_source(
                config::File::from(path)
                    .format(config::FileFormat::Toml)
                    .required(true),
            );
        }
        let mut properties = String::new();
        for (key, value) in env {
            let Some(path) = key.strip_prefix("NPSFLOW__") else {
                continue;
            };
            let parts: Vec<String> = path.split("__").map(str::to_ascii_lowercase).collect();
            match parts.as_slice() {
                // Property names have dots: NPSFLOW__KAFKA__PROPERTIES__SASL_MECHANISMS
                // sets `sasl.mechanisms`.
                [kafka, props, name] if kafka == "kafka" && props == "properties" => {
                    let name = serde_json::Value::String(name.replace('_', "."));
                    let value = serde_json::Value::String(value);
                    properties.push_str(&format!("{name} = {value}\n"));
                }
                _ => {
                    builder = builder
                        .set_override(parts.join("."), value)
                        .map_err(|e| ConfigErrors(vec![e.to_string()]))?;
                }
            }
        }
        if !properties.is_empty() {
            let table = format!("[kafka.properties]\n{properties}");
            builder = builder.add_source(config::File::from_str(&table, config::FileFormat::Toml));
        }
        let merged = builder
            .build()
            .map_err(|e| ConfigErrors(vec![e.to_string()]))?;
        Config::from_deserializer(merged)
    }

    /// Checks a merged settings tree, collecting every problem.
    pub fn from_deserializer<'de, D: serde::Deserializer<'de>>(
        source: D,
    ) -> Result<Config, ConfigErrors>
    where
        D::Error: fmt::Display,
    {
        let mut problems = Vec::new();
        let mut unknown = Vec::new();
        let settings: Option<Settings> =
            serde_ignored::deserialize(source, |path| unknown.push(path.to_string()))
                .map_err(|e| problems.push(e.to_string()))
                .ok();
        for path in unknown {
            if !path.starts_with("kafka.properties.") {
                problems.push(format!("unknown key `{path}`"));
            }
        }
        let Some(settings) = settings else {
            return Err(ConfigErrors(problems));
        };
        let checked = Self::check(&settings, &mut problems);
        match checked {
            Some((windows, segments, routing, dedupe_horizon, batch_max_wait))
                if problems.is_empty() =>
            {
                Ok(Config {
                    settings,
                    windows,
                    segments,
                    routing,
                    dedupe_horizon,
                    batch_max_wait,
                })
            }
            _ => Err(ConfigErrors(problems)),
        }
    }

    #[allow(clippy::type_complexity)]
    fn check(
        s: &Settings,
        problems: &mut Vec<String>,
    ) -> Option<(WindowSpecs, SegmentSpec, Routing, Span, Span)> {
        let mut span = |key: &str, text: &str| -> Option<Span> {
            text.parse::<Span>()
                .map_err(|e| problems.push(format!("{key}: {e}")))
                .ok()
        };
        let skew = span("windows.max_future_skew", &s.windows.max_future_skew);
        let batch_wait = span("ingest.batch_max_wait", &s.ingest.batch_max_wait);
        let horizon = if s.dedupe.horizon.trim().is_empty() {
            None
        } else {
            span("dedupe.horizon", &s.dedupe.horizon)
        };
        let windows = skew.and_then(|skew| {
            WindowSpecs::new(&s.windows.lengths, s.windows.buckets, skew)
                .map_err(|e| problems.push(format!("windows: {e}")))
                .ok()
        });
        let segments = SegmentSpec::new(
            &s.segments.dimensions,
            &s.segments.combinations,
            s.segments.max_values_per_dimension,
        )
        .map_err(|e| problems.push(format!("segments: {e}")))
        .ok();
        if s.routing.default_owner.trim().is_empty() {
            problems.push("routing.default_owner must not be empty".into());
        }
        if s.dedupe.restore_messages < 0 {
            problems.push("dedupe.restore_messages must not be negative".into());
        }
        if s.dedupe.capacity == 0 {
            problems.push("dedupe.capacity must be at least 1".into());
        }
        if s.ingest.batch_max_messages == 0 {
            problems.push("ingest.batch_max_messages must be at least 1".into());
        }
        if s.http.listen.parse::<std::net::SocketAddr>().is_err() {
            problems.push(format!(
                "http.listen: {:?} is not an address such as 0.0.0.0:9464",
                s.http.listen
            ));
        }
        if s.kafka.brokers.trim().is_empty() {
            problems.push("kafka.brokers must not be empty".into());
        }
        if s.topics.partitions < 1 || s.topics.replication < 1 {
            problems.push("topics.partitions and topics.replication must be at least 1".into());
        }
        let topics = [
            &s.topics.responses,
            &s.topics.dead_letters,
            &s.topics.followups,
            &s.topics.segment_deltas,
            &s.topics.state,
        ];
        for (i, topic) in topics.iter().enumerate() {
            if topic.is_empty() {
                problems.push("topic names must not be empty".into());
            } else if topics[..i].contains(topic) {
                problems.push(format!("topic {topic:?} is used for two purposes"));
            }
        }
        if tracing_subscriber::EnvFilter::try_new(&s.log.level).is_err() {
            problems.push(format!(
                "log.level: {:?} is not a valid filter",
                s.log.level
            ));
        }
        let routing = Routing::new(
            s.routing.accounts.clone(),
            s.routing
                .segments
                .iter()
                .map(|r| SegmentRoute {
                    dimension: r.dimension.clone(),
                    value: r.value.clone(),
                    owner: r.owner.clone(),
                })
                .collect(),
            s.routing.default_owner.clone(),
        );
        let windows = windows?;
        let horizon = horizon.unwrap_or(windows.longest());
        Some((windows, segments?, routing, horizon, batch_wait?))
    }

    /// The effective settings as TOML, with secret property values replaced by `<redacted>`.
    pub fn redacted_toml(&self) -> String {
        let mut settings = self.settings.clone();
        for (name, value) in settings.kafka.properties.iter_mut() {
            if is_secret(name) {
                *value = "<redacted>".into();
            }
        }
        toml::to_string(&settings).expect("settings serialise as TOML")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(file: Option<&str>, env: &[(&str, &str)]) -> Result<Config, ConfigErrors> {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("npsflow-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join(format!("{n}.toml"));
        if let Some(text) = file {
            std::fs::write(&path, text).expect("write");
        }
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        Config::load(file.map(|_| path.as_path()), env)
    }

    #[test]
    fn defaults_are_valid_and_match_the_contract() {
        let config = load(None, &[]).expect("defaults are valid");
        let names: Vec<&str> = config.windows.windows().iter().map(|w| w.name()).collect();
        assert_eq!(names, ["1h", "24h", "7d", "28d"]);
        assert_eq!(config.settings.topics.responses, "survey.responses");
        assert_eq!(config.settings.topics.dead_letters, "npsflow.dlq");
        assert_eq!(config.settings.topics.followups, "npsflow.followups");
        assert_eq!(
            config.settings.topics.segment_deltas,
            "npsflow.segment-deltas"
        );
        assert_eq!(config.dedupe_horizon, Span::days(28));
    }

    #[test]
    fn file_overrides_defaults_and_env_overrides_file() {
        let file = "[windows]\nlengths = [\"1h\", \"7d\"]\n[http]\nlisten = \"127.0.0.1:1\"\n";
        let config = load(
            Some(file),
            &[
                ("NPSFLOW__HTTP__LISTEN", "127.0.0.1:2"),
                ("NPSFLOW__KAFKA__PROPERTIES__SASL_PASSWORD", "hunter2"),
                ("OTHER", "ignored"),
            ],
        )
        .expect("valid");
        assert_eq!(config.windows.windows().len(), 2);
        assert_eq!(config.settings.http.listen, "127.0.0.1:2");
        assert_eq!(config.settings.kafka.properties["sasl.password"], "hunter2");
        let printed = config.redacted_toml();
        assert!(!printed.contains("hunter2"), "{printed}");
        assert!(
            printed.contains("\"sasl.password\" = \"<redacted>\""),
            "{printed}"
        );
        assert!(printed.contains("listen = \"127.0.0.1:2\""), "{printed}");
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let file = r#"
[windows]
lengths = ["1h", "fortnight"]
max_future_skew = "soon"
colour = "blue"
[segments]
dimensions = ["region", "region"]
[routing]
default_owner = ""
[http]
listen = "nowhere"
[mystery]
x = 1
"#;
        let errors = load(Some(file), &[]).expect_err("invalid").0;
        let text = errors.join("\n");
        for needle in [
            "unknown key `windows.colour`",
            "unknown key `mystery`",
            "windows.max_future_skew",
            "segments: dimension \"region\" is listed twice",
            "routing.default_owner",
            "http.listen",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
        }
    }

    #[test]
    fn printed_config_reads_back_the_same() {
        let config = load(None, &[]).expect("valid");
        let printed = config.redacted_toml();
        let again = load(Some(&printed), &[]).expect("printed config is valid");
        assert_eq!(again.redacted_toml(), printed);
    }

    #[test]
    fn secret_property_names_are_recognised() {
        assert!(is_secret("sasl.password"));
        assert!(is_secret("ssl.key.password"));
        assert!(is_secret("sasl.oauthbearer.client.secret"));
        assert!(!is_secret("ssl.ca.location"));
        assert!(!is_secret("security.protocol"));
    }
}
