//! Configuration: embedded defaults < a TOML file (`--config`) < environment variables
//! (`NPSFLOW__SECTION__KEY`). The settings turn into the core's types here, so the rest of
//! the runtime never sees an unchecked value.
//!
//! How a configuration is checked: the three layers are merged as trees that remember where
//! each value came from (the defaults, the file, or which environment variable), and then
//! every key is read and checked on its own, against its own type. So one bad value never
//! hides another: wrong types, out-of-range values, unknown keys, and settings that do not
//! fit together are all reported at once ([`ConfigErrors`]). Each problem names its key
//! (`topics.partitions`), the environment variable that sets it
//! (`NPSFLOW__TOPICS__PARTITIONS`) and where the bad value came from. No problem ever
//! repeats a configured value: any value may be a secret.
//!
//! Environment variables: `NPSFLOW__SECTION__KEY` sets `section.key` (names are lower-cased;
//! `NPSFLOW__KAFKA__PROPERTIES__SASL_MECHANISMS` sets the property `sasl.mechanisms`, since
//! property names have dots). Values are read as the key's type:
//!
//! - lists of strings: comma-separated, `NPSFLOW__WINDOWS__LENGTHS=1h,24h,7d` (an empty value
//!   is an empty list), or a JSON array, `["1h","24h"]`;
//! - `segments.combinations` (a list of lists): combinations separated by commas, the
//!   dimensions of each joined by `+`, `region+product,channel+tier`, or JSON,
//!   `[["region","product"]]`;
//! - tables of strings (`kafka.properties`, `routing.accounts`, `windows.resolutions`): one
//!   variable per entry (`NPSFLOW__WINDOWS__RESOLUTIONS__28D=1h`), or the whole table as
//!   `name=value` pairs separated by commas, `28d=1h,7d=10m`, or a JSON object;
//! - `routing.segments`: a JSON array of `{"dimension", "value", "owner"}` objects.
//!
//! Secrets: [`is_secret`] decides which `kafka.properties` values are never printed:
//! everything librdkafka itself treats as sensitive ([`SENSITIVE_PROPERTIES`]) and any name
//! containing one of [`SECRET_WORDS`]. [`Config::redacted_toml`] and the `Debug` output of
//! [`KafkaSettings`] show them as `<redacted>`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;

use npsflow_core::window::{WindowSpecError, MIN_STEPS};
use npsflow_core::{Routing, SegmentRoute, SegmentSpec, Span, WindowSpecs};
use serde::{Deserialize, Serialize};

/// The defaults, as a user would write them in a file.
pub const DEFAULTS: &str = include_str!("defaults.toml");

/// The prefix of the environment variables that set keys: `NPSFLOW__SECTION__KEY`.
pub const ENV_PREFIX: &str = "NPSFLOW__";

/// What a secret value is replaced with when settings are printed.
pub const REDACTED: &str = "<redacted>";

/// The most steps a window may be cut into (`windows.buckets`, or length / resolution):
/// every segment keeps one tally per step, so a typo such as a resolution of `1ms` must not
/// be able to exhaust memory. A 28d window in 1-minute steps needs 40,320.
pub const MAX_STEPS: i64 = 100_000;

/// The largest `topics.max_message_bytes`: producers that forward input messages get
/// `message.max.bytes` of this plus 64 KiB for npsflow's headers, and librdkafka accepts at
/// most 1,000,000,000.
pub const MAX_MESSAGE_BYTES: i64 = 1_000_000_000 - 64 * 1024;

/// The smallest `topics.max_message_bytes`.
pub const MIN_MESSAGE_BYTES: i64 = 1024;

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
    /// Liveness (`/healthz`).
    pub health: HealthSettings,
    /// Logging.
    pub log: LogSettings,
    /// Closed-loop follow-up: SLAs, escalations, recovery.
    pub followup: FollowupSettings,
    /// What the numbers mean: change tests, accounts.
    pub analytics: AnalyticsSettings,
}

/// Change tests and account summaries.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct AnalyticsSettings {
    /// A window's change from the window before is `significant` only with at least this many
    /// responses on both sides.
    pub min_responses: u64,
    /// Accounts' NPS covers this span (e.g. `28d`, at least 60 ms so it can move in steps of a
    /// sixtieth of itself). Parsed into [`Config::account_window`].
    pub account_window: String,
    /// An account whose NPS is below this (-100..100) is at risk.
    pub at_risk_below: i64,
}

/// Where Kafka is and how to talk to it. Its `Debug` output redacts secret properties.
#[derive(Clone, Deserialize, Serialize)]
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
    /// Consumer group of the followup role.
    pub followup_group: String,
    /// Where a consumer group with no committed offset starts reading the external inputs
    /// ([`TopicSettings::external_inputs`]); internal topics always start at the earliest.
    pub start_position: StartPosition,
}

/// Where a new consumer group (no committed offset) starts on an external input topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StartPosition {
    /// Everything still on the topic: each old message gets its outcome (responses older
    /// than the longest window are dead-lettered as `too_old`, detractors of the window get
    /// alerts).
    Earliest,
    /// Only what arrives after the group's partitions are first assigned.
    Latest,
}

impl StartPosition {
    /// Whether a partition of `topic` with no committed offset starts at its end: only for
    /// `latest`, and only on an external input topic, never on npsflow's internal topics
    /// (deltas, follow-up events, state), which must be read from their start.
    pub fn starts_at_end(self, topics: &TopicSettings, topic: &str) -> bool {
        self == StartPosition::Latest && topics.external_inputs().contains(&topic)
    }
}

impl fmt::Debug for KafkaSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaSettings")
            .field("brokers", &self.brokers)
            .field("properties", &redact_properties(&self.properties))
            .field("ingest_group", &self.ingest_group)
            .field("aggregate_group", &self.aggregate_group)
            .field("followup_group", &self.followup_group)
            .field("start_position", &self.start_position)
            .finish()
    }
}

/// Topic names.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct TopicSettings {
    /// Survey responses in.
    pub responses: String,
    /// Internal: the responses repartitioned by `response_id`.
    pub responses_by_id: String,
    /// Dead letters out.
    pub dead_letters: String,
    /// Detractor alerts out.
    pub followups: String,
    /// Pre-aggregated segment counts between ingest and aggregate.
    pub segment_deltas: String,
    /// Compacted segment snapshots, co-partitioned with the deltas.
    pub state: String,
    /// Outcome events from the follow-up team's tools, keyed by `case_id`.
    pub followup_outcomes: String,
    /// Internal: alerts, outcomes and notices, keyed by case or customer (the followup
    /// role's repartition topic).
    pub followup_events: String,
    /// Compacted: the current state of every case, keyed by `case_id`.
    pub cases: String,
    /// Escalation notices, keyed by `case_id`.
    pub escalations: String,
    /// Internal, compacted: outcomes waiting for their case and recovery watches.
    pub followup_state: String,
    /// Optional input: survey invitations sent (for the response rate).
    pub invitations: String,
    /// Compacted view: every segment summary the API serves, keyed by window and segment.
    pub segment_view: String,
    /// Compacted view: every account summary the API serves, keyed by `account_id`.
    pub account_view: String,
    /// Partitions used by `npsflow topics create`.
    pub partitions: i32,
    /// Replication factor used by `npsflow topics create`.
    pub replication: i32,
    /// The input topic's message size limit in bytes (at least 1024). `topics create` gives
    /// the input this limit and the topics that carry whole input messages (dead letters,
    /// repartition) this plus room for npsflow's headers; producers get a matching
    /// `message.max.bytes`.
    pub max_message_bytes: u64,
}

impl TopicSettings {
    /// The topics other systems write and npsflow's roles consume: the survey responses,
    /// the outcome events and the invitations. `kafka.start_position` applies to these only.
    pub fn external_inputs(&self) -> [&str; 3] {
        [&self.responses, &self.followup_outcomes, &self.invitations]
    }
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
    /// Steps per window, for windows without a resolution: each moves in steps of
    /// `length / buckets`.
    pub buckets: u32,
    /// Window name (as in `lengths`) -> the step it moves in (a span such as `1h`),
    /// e.g. `{ "28d" = "1h" }`.
    #[serde(default)]
    pub resolutions: BTreeMap<String, String>,
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
    /// owner -> whom their cases escalate to.
    #[serde(default)]
    pub escalations: BTreeMap<String, String>,
}

/// Closed-loop follow-up.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct FollowupSettings {
    /// Contacted within this of the response, or escalation level 1.
    pub first_contact_sla: String,
    /// Resolved within this of the response, or escalation level 2.
    pub resolve_sla: String,
    /// Scores that escalate to level 1 as soon as the case opens.
    pub escalate_scores: Vec<String>,
    /// Whom cases escalate to when `routing.escalations` has no entry for the owner.
    pub escalation_owner: String,
    /// A customer's next response within this of closing decides recovery.
    pub recovery_horizon: String,
    /// A closed case is tombstoned on the cases topic this long after closing.
    pub closed_retention: String,
    /// Outcome events for a case not known yet are kept this long.
    pub orphan_horizon: String,
    /// Whether this process reads the whole cases topic to answer `/v1/cases` for every case.
    pub case_directory: bool,
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

/// How the roles' outputs, state and input offsets are committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Guarantee {
    /// Outputs are delivered, then offsets stored: after a crash some outputs may be sent
    /// again (alerts keep their `alert_id`; the aggregator skips re-sent counts).
    AtLeastOnce,
    /// Each batch's outputs, state writes and input offsets are committed in Kafka
    /// transactions (one per input partition, whose transactional id fences the partition's
    /// previous owner): consumers reading with `isolation.level=read_committed` see every
    /// output once. Needs a broker with transactions (Apache Kafka and noida-db have them;
    /// Tansu 0.6 does not).
    ExactlyOnce,
}

/// Delivery guarantee settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ProcessingSettings {
    /// `at_least_once` or `exactly_once`.
    pub guarantee: Guarantee,
    /// Prefix of the transactional ids (exactly_once): each input partition's producer has
    /// the id `<prefix>-<topic>-<partition>`; empty: the role's consumer group is the prefix.
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

/// Liveness.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct HealthSettings {
    /// A span such as `60s` (more than zero): a partition whose committed position has not
    /// moved for longer than this while messages wait makes `/healthz` fail. Parsed into
    /// [`Config::stall_timeout`].
    pub stall_timeout: String,
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

/// Everything wrong with a configuration, one problem per line. Each problem names the key
/// and its environment variable, and never contains a configured value.
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
    /// Windows (with their resolutions) and time rules.
    pub windows: WindowSpecs,
    /// Segment spec.
    pub segments: SegmentSpec,
    /// Alert routing.
    pub routing: Routing,
    /// Dedupe horizon.
    pub dedupe_horizon: Span,
    /// Ingest batch wait.
    pub batch_max_wait: Span,
    /// `health.stall_timeout`: how long a partition's committed position may stand still
    /// while messages wait before `/healthz` fails.
    pub stall_timeout: Span,
    /// SLAs, escalation routing and horizons of follow-up cases.
    pub followup: npsflow_core::FollowupPolicy,
    /// `analytics.account_window`.
    pub account_window: Span,
}

/// The properties librdkafka itself treats as sensitive (flagged `_RK_SENSITIVE` in
/// librdkafka 2.12's `rdkafka_conf.c`, and redacted in its own configuration dumps), with
/// their aliases.
pub const SENSITIVE_PROPERTIES: &[&str] = &[
    "sasl.username",
    "sasl.password",
    "sasl.oauthbearer.config",
    "sasl.oauthbearer.client.secret",
    "sasl.oauthbearer.client.credentials.client.secret",
    "sasl.oauthbearer.assertion.private.key.file",
    "sasl.oauthbearer.assertion.private.key.passphrase",
    "sasl.oauthbearer.assertion.private.key.pem",
    "ssl.key.location",
    "ssl.key.password",
    "ssl.key.pem",
    "ssl_key",
    "ssl.ca.pem",
    "ssl.keystore.password",
];

/// Words that make a property secret wherever they appear in its name (unless the name ends
/// in `.location`, a file path, and is not in [`SENSITIVE_PROPERTIES`]).
pub const SECRET_WORDS: &[&str] = &[
    "password",
    "passphrase",
    "secret",
    "key",
    "token",
    "credential",
    "jaas",
    "private",
];

/// Property names whose values are never printed or logged: librdkafka's sensitive
/// properties ([`SENSITIVE_PROPERTIES`]; names compare ignoring case, and `_` as `.`), and
/// names containing one of [`SECRET_WORDS`] (`sasl.kerberos.keytab`,
/// `ssl.truststore.password`, ...), except other `*.location` paths.
pub fn is_secret(property: &str) -> bool {
    let lower = property.trim().to_ascii_lowercase();
    let dotted = lower.replace('_', ".");
    let listed = SENSITIVE_PROPERTIES
        .iter()
        .any(|name| *name == lower || name.replace('_', ".") == dotted);
    listed
        || (SECRET_WORDS.iter().any(|word| lower.contains(word)) && !lower.ends_with(".location"))
}

/// The properties with secret values ([`is_secret`]) replaced by `<redacted>`: what may be
/// printed or logged.
pub fn redact_properties(properties: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    properties
        .iter()
        .map(|(name, value)| {
            let shown = if is_secret(name) {
                REDACTED.to_owned()
            } else {
                value.clone()
            };
            (name.clone(), shown)
        })
        .collect()
}

impl Config {
    /// Loads defaults, then `file` if given, then `NPSFLOW__*` variables from `env` (other
    /// variables are ignored). Every problem is reported at once, including an unreadable
    /// file.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigErrors> {
        match file {
            None => Self::from_sources(None, env),
            Some(path) => {
                let label = path.display().to_string();
                match std::fs::read_to_string(path) {
                    Ok(text) => Self::from_sources(Some((&label, &text)), env),
                    Err(error) => {
                        let unreadable =
                            format!("cannot read the configuration file {label}: {error}");
                        match Self::from_sources(None, env) {
                            Ok(_) => Err(ConfigErrors(vec![unreadable])),
                            Err(ConfigErrors(mut problems)) => {
                                problems.insert(0, unreadable);
                                Err(ConfigErrors(problems))
                            }
                        }
                    }
                }
            }
        }
    }

    /// Like [`Config::load`], with the file given as text: `file` is `(label, text)`, the
    /// label naming it in problems (usually its path).
    pub fn from_sources(
        file: Option<(&str, &str)>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigErrors> {
        let mut problems = Vec::new();
        let mut root = match DEFAULTS.parse::<toml::Table>() {
            Ok(table) => Node::table(table, &Origin::Defaults),
            Err(error) => {
                problems.push(syntax_problem("the embedded defaults", DEFAULTS, &error));
                BTreeMap::new()
            }
        };
        if let Some((label, text)) = file {
            match text.parse::<toml::Table>() {
                Ok(table) => merge(&mut root, Node::table(table, &Origin::File(label.into()))),
                Err(error) => problems.push(syntax_problem(label, text, &error)),
            }
        }
        let mut env: Vec<(String, String)> = env
            .into_iter()
            .filter(|(name, _)| name.starts_with(ENV_PREFIX))
            .collect();
        env.sort();
        for (var, text) in env {
            apply_env(&mut root, var, text, &mut problems);
        }
        let mut reader = Reader {
            problems,
            origins: BTreeMap::new(),
            failed: BTreeSet::new(),
        };
        let read = reader.settings(&mut root);
        let checked = reader.check(&read);
        match checked {
            Some(config) if reader.problems.is_empty() => Ok(config),
            _ => Err(ConfigErrors(reader.problems)),
        }
    }

    /// The effective settings as TOML, with secret property values replaced by
    /// `<redacted>` ([`is_secret`]).
    pub fn redacted_toml(&self) -> String {
        let mut settings = self.settings.clone();
        settings.kafka.properties = redact_properties(&settings.kafka.properties);
        toml::to_string(&settings).expect("settings serialise as TOML")
    }
}

/// A TOML syntax problem: the parser's message and where, never the text around it.
fn syntax_problem(label: &str, text: &str, error: &toml::de::Error) -> String {
    let place = match error.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            format!(" at line {line}, column {column}")
        }
        None => String::new(),
    };
    let message = error.message().trim().replace('\n', "; ");
    format!("{label} is not valid TOML{place}: {message}")
}

// ---------------------------------------------------------------------------------------
// The layers, merged as a tree that remembers where each value came from.

/// Where a value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Origin {
    Defaults,
    /// The file, by its label (path).
    File(String),
    /// An environment variable, by name.
    Env(String),
}

#[derive(Debug, Clone)]
enum Raw {
    Table(BTreeMap<String, Node>),
    /// Any TOML value but a table (arrays keep their elements as TOML values).
    Toml(toml::Value),
    /// The text of an environment variable, read as the key's type when the key is read.
    Env(String),
}

#[derive(Debug, Clone)]
struct Node {
    raw: Raw,
    origin: Origin,
}

impl Node {
    fn from_toml(value: toml::Value, origin: &Origin) -> Node {
        let raw = match value {
            toml::Value::Table(table) => Raw::Table(Node::table(table, origin)),
            other => Raw::Toml(other),
        };
        Node {
            raw,
            origin: origin.clone(),
        }
    }

    fn table(table: toml::Table, origin: &Origin) -> BTreeMap<String, Node> {
        table
            .into_iter()
            .map(|(name, value)| (name, Node::from_toml(value, origin)))
            .collect()
    }
}

/// Lays `layer` over `base`: tables merge key by key, anything else replaces.
fn merge(base: &mut BTreeMap<String, Node>, layer: BTreeMap<String, Node>) {
    for (name, node) in layer {
        match node.raw {
            Raw::Table(above) => match base.get_mut(&name) {
                Some(Node {
                    raw: Raw::Table(below),
                    ..
                }) => merge(below, above),
                _ => {
                    base.insert(
                        name,
                        Node {
                            raw: Raw::Table(above),
                            origin: node.origin,
                        },
                    );
                }
            },
            raw => {
                base.insert(
                    name,
                    Node {
                        raw,
                        origin: node.origin,
                    },
                );
            }
        }
    }
}

/// Sets the key an `NPSFLOW__*` variable names.
fn apply_env(
    root: &mut BTreeMap<String, Node>,
    var: String,
    text: String,
    problems: &mut Vec<String>,
) {
    let rest = &var[ENV_PREFIX.len()..];
    let mut path: Vec<String> = rest.split("__").map(str::to_ascii_lowercase).collect();
    if path.iter().any(String::is_empty) {
        problems.push(format!(
            "{var} names no key: expected NPSFLOW__SECTION__KEY, with names separated by \
             double underscores"
        ));
        return;
    }
    if let [section] = path.as_slice() {
        // Applying it would replace the whole section, hiding its other keys' problems.
        let key = Key::default().name(section);
        problems.push(if root.contains_key(section) {
            format!(
                "`{key}` ({var}): a section is set key by key, as {}__KEY; set in the \
                 environment",
                key.env()
            )
        } else {
            format!("unknown key `{key}` ({var}); set in the environment")
        });
        return;
    }
    // Property names have dots: NPSFLOW__KAFKA__PROPERTIES__SASL_MECHANISMS sets
    // `sasl.mechanisms`.
    if path.len() == 3 && path[0] == "kafka" && path[1] == "properties" {
        path[2] = path[2].replace('_', ".");
    }
    let origin = Origin::Env(var.clone());
    let key = Key::from_names(&path);
    let leaf = Node {
        raw: Raw::Env(text),
        origin: origin.clone(),
    };
    match insert_env(root, &path, leaf, &origin) {
        Ok(()) => {}
        Err(EnvConflict::NotATable(depth)) => {
            let parent = Key::from_names(&path[..depth]);
            problems.push(format!(
                "unknown key `{key}` ({var}): `{parent}` is not a table of settings"
            ));
        }
        Err(EnvConflict::Twice(other)) => problems.push(format!(
            "`{key}` ({}) is set by two environment variables, {other} and {var}",
            key.env()
        )),
    }
}

enum EnvConflict {
    /// The name at this depth holds a value, not a table.
    NotATable(usize),
    /// Another variable already set the key.
    Twice(String),
}

fn insert_env(
    table: &mut BTreeMap<String, Node>,
    path: &[String],
    leaf: Node,
    origin: &Origin,
) -> Result<(), EnvConflict> {
    let Some((first, rest)) = path.split_first() else {
        return Ok(());
    };
    if rest.is_empty() {
        if let Some(Node {
            origin: Origin::Env(other),
            ..
        }) = table.get(first)
        {
            return Err(EnvConflict::Twice(other.clone()));
        }
        table.insert(first.clone(), leaf);
        return Ok(());
    }
    let node = table.entry(first.clone()).or_insert_with(|| Node {
        raw: Raw::Table(BTreeMap::new()),
        origin: origin.clone(),
    });
    match &mut node.raw {
        Raw::Table(next) => {
            insert_env(next, rest, leaf, origin).map_err(|conflict| match conflict {
                EnvConflict::NotATable(depth) => EnvConflict::NotATable(depth + 1),
                twice => twice,
            })
        }
        _ => Err(EnvConflict::NotATable(1)),
    }
}

// ---------------------------------------------------------------------------------------
// Keys, as problems name them.

#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    Name(String),
    Index(usize),
}

/// A key: `topics.partitions`, `windows.lengths[1]`, `kafka.properties."sasl.password"`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Key(Vec<Seg>);

impl Key {
    fn from_names(names: &[String]) -> Key {
        Key(names.iter().cloned().map(Seg::Name).collect())
    }

    fn name(&self, name: &str) -> Key {
        let mut key = self.clone();
        key.0.push(Seg::Name(name.to_owned()));
        key
    }

    fn index(&self, index: usize) -> Key {
        let mut key = self.clone();
        key.0.push(Seg::Index(index));
        key
    }

    /// The key without list positions: the key whose value holds this one.
    fn field(&self) -> Key {
        Key(self
            .0
            .iter()
            .take_while(|seg| matches!(seg, Seg::Name(_)))
            .cloned()
            .collect())
    }

    /// The environment variable that sets this key (for an element of a list, the list's).
    fn env(&self) -> String {
        let mut var = ENV_PREFIX.trim_end_matches('_').to_owned();
        for seg in &self.0 {
            let Seg::Name(name) = seg else { break };
            var.push_str("__");
            var.extend(name.chars().map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_uppercase()
                } else {
                    '_'
                }
            }));
        }
        var
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, seg) in self.0.iter().enumerate() {
            match seg {
                Seg::Index(index) => write!(f, "[{index}]")?,
                Seg::Name(name) => {
                    if i > 0 {
                        f.write_str(".")?;
                    }
                    let bare = !name.is_empty()
                        && name
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
                    if bare {
                        f.write_str(name)?;
                    } else {
                        write!(f, "{name:?}")?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// "a string", "an integer", ... for a TOML value's type.
fn a_type(raw: &Raw) -> String {
    let name = match raw {
        Raw::Table(_) => "table",
        Raw::Toml(value) => value.type_str(),
        Raw::Env(_) => "text",
    };
    let article = if name.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    };
    format!("{article} {name}")
}

const A_DURATION: &str =
    "a duration such as 100ms, 60s, 5m, 24h or 7d (a whole number and one of the units ms, \
     s, m, h, d, w)";

// ---------------------------------------------------------------------------------------
// Reading and checking, key by key.

/// A section being read: what is left of it is unknown.
struct Section {
    key: Key,
    entries: BTreeMap<String, Node>,
    /// The section was not a table (already reported): its keys are not reported missing.
    broken: bool,
}

struct Reader {
    problems: Vec<String>,
    /// Where each key read came from, by its text.
    origins: BTreeMap<String, Origin>,
    /// Keys already reported: later checks of what they mean would only repeat the
    /// problem, so they are not reported again.
    failed: BTreeSet<String>,
}

/// What was read, with the spans parsed on the way.
struct Read {
    settings: Settings,
    skew: Option<Span>,
    /// The resolutions that parsed; `resolutions_ok` if all did.
    resolutions: Vec<(String, Span)>,
    resolutions_ok: bool,
    horizon: Option<Option<Span>>,
    batch_max_wait: Option<Span>,
    stall_timeout: Option<Span>,
    followup_spans: [Option<Span>; 5],
    account_window: Option<Span>,
}

impl Reader {
    /// Reports a problem with `key`, saying where its value came from.
    fn report(&mut self, key: &Key, what: impl fmt::Display) {
        if self.failed(key) {
            return;
        }
        self.failed.insert(key.to_string());
        let env = key.env();
        let from = match self.origins.get(&key.field().to_string()) {
            Some(Origin::File(label)) => format!("; set in {label}"),
            Some(Origin::Env(var)) if *var == env => "; set in the environment".to_owned(),
            Some(Origin::Env(var)) => format!("; set by {var}"),
            Some(Origin::Defaults) => "; set in the defaults".to_owned(),
            None => String::new(),
        };
        self.problems.push(format!("`{key}` ({env}): {what}{from}"));
    }

    /// Whether `key` or a key holding it was already reported.
    fn failed(&self, key: &Key) -> bool {
        (1..=key.0.len()).any(|n| self.failed.contains(&Key(key.0[..n].to_vec()).to_string()))
    }

    /// Whether `key` or anything in it was already reported.
    fn failed_within(&self, key: &Key) -> bool {
        let text = key.to_string();
        self.failed.iter().any(|failed| {
            failed == &text
                || failed.starts_with(&format!("{text}."))
                || failed.starts_with(&format!("{text}["))
        }) || self.failed(key)
    }

    fn unknown(&mut self, key: &Key, node: &Node) {
        let from = match &node.origin {
            Origin::File(label) => format!("; set in {label}"),
            Origin::Env(var) => format!("; set by {var}"),
            Origin::Defaults => "; set in the defaults".to_owned(),
        };
        self.problems
            .push(format!("unknown key `{key}` ({}){from}", key.env()));
    }

    fn remember(&mut self, key: &Key, origin: &Origin) {
        self.origins.insert(key.to_string(), origin.clone());
    }

    fn section(&mut self, root: &mut BTreeMap<String, Node>, name: &str) -> Section {
        let key = Key::default().name(name);
        match root.remove(name) {
            Some(Node {
                raw: Raw::Table(entries),
                ..
            }) => Section {
                key,
                entries,
                broken: false,
            },
            Some(node) => {
                self.remember(&key, &node.origin);
                let hint = match node.raw {
                    Raw::Env(_) => format!("a section is set key by key, as {}__KEY", key.env()),
                    raw => format!("expected a table of settings, found {}", a_type(&raw)),
                };
                self.report(&key, hint);
                Section {
                    key,
                    entries: BTreeMap::new(),
                    broken: true,
                }
            }
            None => Section {
                key,
                entries: BTreeMap::new(),
                broken: false,
            },
        }
    }

    /// Reports what is left of a section as unknown keys.
    fn finish(&mut self, section: Section) {
        for (name, node) in &section.entries {
            self.unknown(&section.key.name(name), node);
        }
    }

    /// Takes a key out of its section; reports it missing if `required`.
    fn take(&mut self, section: &mut Section, name: &str, required: bool) -> Option<(Key, Node)> {
        let key = section.key.name(name);
        match section.entries.remove(name) {
            Some(node) => {
                self.remember(&key, &node.origin);
                Some((key, node))
            }
            None => {
                if required && !section.broken {
                    self.report(&key, "missing");
                }
                None
            }
        }
    }

    /// An environment value that looks like JSON (`[...]` or `{...}`) becomes the tree it
    /// describes; `None` if it is not valid JSON (reported).
    fn expand_json(&mut self, key: &Key, node: Node, expected: &str) -> Option<Node> {
        let Raw::Env(text) = &node.raw else {
            return Some(node);
        };
        let trimmed = text.trim();
        if !(trimmed.starts_with('[') || trimmed.starts_with('{')) {
            return Some(node);
        }
        let value = serde_json::from_str::<serde_json::Value>(trimmed)
            .ok()
            .and_then(|json| toml::Value::try_from(json).ok());
        match value {
            Some(value) => Some(Node::from_toml(value, &node.origin)),
            None => {
                self.report(
                    key,
                    format!("expected {expected}; the value is not JSON of that shape"),
                );
                None
            }
        }
    }

    fn string_value(&mut self, key: &Key, raw: Raw) -> Option<String> {
        match raw {
            Raw::Toml(toml::Value::String(text)) | Raw::Env(text) => Some(text),
            raw => {
                self.report(key, format!("expected a string, found {}", a_type(&raw)));
                None
            }
        }
    }

    fn string(&mut self, section: &mut Section, name: &str) -> String {
        self.take(section, name, true)
            .and_then(|(key, node)| self.string_value(&key, node.raw))
            .unwrap_or_default()
    }

    /// A whole number in `min..=max`.
    fn int(&mut self, section: &mut Section, name: &str, min: i64, max: i64) -> i64 {
        let Some((key, node)) = self.take(section, name, true) else {
            return min;
        };
        let (value, found) = match &node.raw {
            Raw::Toml(toml::Value::Integer(i)) => (Some(*i), String::new()),
            Raw::Env(text) => (text.trim().parse::<i64>().ok(), String::new()),
            raw => (None, format!(", found {}", a_type(raw))),
        };
        match value {
            Some(value) if (min..=max).contains(&value) => value,
            _ => {
                let range = if max == i64::MAX {
                    format!("at least {min}")
                } else {
                    format!("from {min} to {max}")
                };
                self.report(&key, format!("expected a whole number {range}{found}"));
                min
            }
        }
    }

    /// A span, at least `min`; an empty string is `None` if `empty_ok`.
    fn span(
        &mut self,
        section: &mut Section,
        name: &str,
        min: Span,
        empty_ok: bool,
    ) -> (String, Option<Option<Span>>) {
        let Some((key, node)) = self.take(section, name, true) else {
            return (String::new(), None);
        };
        let Some(text) = self.string_value(&key, node.raw) else {
            return (String::new(), None);
        };
        if empty_ok && text.trim().is_empty() {
            return (text, Some(None));
        }
        let parsed = match text.parse::<Span>() {
            Ok(span) if span >= min => Some(Some(span)),
            _ if min > Span(0) => {
                self.report(&key, format!("expected {A_DURATION}, more than zero"));
                None
            }
            _ => {
                self.report(&key, format!("expected {A_DURATION}"));
                None
            }
        };
        (text, parsed)
    }

    /// A flag: `true` or `false` (from the environment: the same words).
    fn flag(&mut self, section: &mut Section, name: &str) -> bool {
        let Some((key, node)) = self.take(section, name, true) else {
            return false;
        };
        match &node.raw {
            Raw::Toml(toml::Value::Boolean(value)) => *value,
            Raw::Env(text) if text == "true" => true,
            Raw::Env(text) if text == "false" => false,
            raw => {
                let found = match raw {
                    Raw::Env(_) => String::new(),
                    raw => format!(", found {}", a_type(raw)),
                };
                self.report(&key, format!("expected true or false{found}"));
                false
            }
        }
    }

    /// One of the named options.
    fn choice<T: Copy>(&mut self, section: &mut Section, name: &str, options: &[(&str, T)]) -> T {
        let fallback = options[0].1;
        let Some((key, node)) = self.take(section, name, true) else {
            return fallback;
        };
        let names: Vec<String> = options.iter().map(|(n, _)| format!("\"{n}\"")).collect();
        let expected = format!("expected one of {}", names.join(", "));
        let found = match &node.raw {
            Raw::Toml(toml::Value::String(_)) | Raw::Env(_) => String::new(),
            raw => format!(", found {}", a_type(raw)),
        };
        let chosen = match &node.raw {
            Raw::Toml(toml::Value::String(text)) | Raw::Env(text) => options
                .iter()
                .find(|(n, _)| *n == text.as_str())
                .map(|(_, v)| *v),
            _ => None,
        };
        chosen.unwrap_or_else(|| {
            self.report(&key, format!("{expected}{found}"));
            fallback
        })
    }

    /// Strings of a TOML array, each checked.
    fn array_strings(&mut self, key: &Key, items: Vec<toml::Value>) -> Option<Vec<String>> {
        let mut ok = true;
        let mut out = Vec::with_capacity(items.len());
        for (i, item) in items.into_iter().enumerate() {
            match self.string_value(&key.index(i), Raw::Toml(item)) {
                Some(text) => out.push(text),
                None => ok = false,
            }
        }
        ok.then_some(out)
    }

    /// A list of strings; from the environment comma-separated or a JSON array.
    fn strings(&mut self, section: &mut Section, name: &str) -> Vec<String> {
        const EXPECTED: &str = "a list of strings (from the environment: comma-separated, \
                                a,b,c, or a JSON array)";
        let Some((key, node)) = self.take(section, name, false) else {
            return Vec::new();
        };
        let Some(node) = self.expand_json(&key, node, EXPECTED) else {
            return Vec::new();
        };
        let list = match node.raw {
            Raw::Toml(toml::Value::Array(items)) => self.array_strings(&key, items),
            Raw::Env(text) => Some(split_list(&text)),
            raw => {
                self.report(&key, format!("expected {EXPECTED}, found {}", a_type(&raw)));
                None
            }
        };
        list.unwrap_or_default()
    }

    /// A list of lists of strings; from the environment `a+b,c+d` or JSON.
    fn string_lists(&mut self, section: &mut Section, name: &str) -> Vec<Vec<String>> {
        const EXPECTED: &str = "a list of lists of strings (from the environment: lists \
                                separated by commas, the items of each joined by +, a+b,c+d, or \
                                JSON)";
        let Some((key, node)) = self.take(section, name, false) else {
            return Vec::new();
        };
        let Some(node) = self.expand_json(&key, node, EXPECTED) else {
            return Vec::new();
        };
        let lists = match node.raw {
            Raw::Toml(toml::Value::Array(items)) => {
                let mut ok = true;
                let mut out = Vec::with_capacity(items.len());
                for (i, item) in items.into_iter().enumerate() {
                    let inner = key.index(i);
                    match item {
                        toml::Value::Array(items) => match self.array_strings(&inner, items) {
                            Some(list) => out.push(list),
                            None => ok = false,
                        },
                        other => {
                            let found = a_type(&Raw::Toml(other));
                            self.report(
                                &inner,
                                format!("expected a list of strings, found {found}"),
                            );
                            ok = false;
                        }
                    }
                }
                ok.then_some(out)
            }
            Raw::Env(text) => Some(
                split_list(&text)
                    .iter()
                    .map(|combo| combo.split('+').map(|s| s.trim().to_owned()).collect())
                    .collect(),
            ),
            raw => {
                self.report(&key, format!("expected {EXPECTED}, found {}", a_type(&raw)));
                None
            }
        };
        lists.unwrap_or_default()
    }

    /// A table of strings; from the environment one variable per entry, `k=v,k=v` or a JSON
    /// object. With `flatten` (for `kafka.properties`), nested tables become dotted names
    /// (`sasl.mechanisms = ...` written without quotes in TOML is a nested table), and
    /// numbers and booleans their text.
    fn string_table(
        &mut self,
        section: &mut Section,
        name: &str,
        flatten: bool,
    ) -> BTreeMap<String, String> {
        const EXPECTED: &str = "a table of strings (from the environment: one variable per \
                                entry, name=value pairs separated by commas, or a JSON object)";
        let mut out = BTreeMap::new();
        let Some((key, node)) = self.take(section, name, false) else {
            return out;
        };
        let Some(node) = self.expand_json(&key, node, EXPECTED) else {
            return out;
        };
        match node.raw {
            Raw::Table(entries) => self.table_entries(&key, "", entries, flatten, &mut out),
            Raw::Env(text) => match split_pairs(&text) {
                Some(pairs) => out.extend(pairs),
                None => self.report(&key, format!("expected {EXPECTED}")),
            },
            raw => self.report(&key, format!("expected {EXPECTED}, found {}", a_type(&raw))),
        }
        out
    }

    fn table_entries(
        &mut self,
        key: &Key,
        prefix: &str,
        entries: BTreeMap<String, Node>,
        flatten: bool,
        out: &mut BTreeMap<String, String>,
    ) {
        for (name, node) in entries {
            let full = format!("{prefix}{name}");
            let entry_key = key.name(&full);
            self.remember(&entry_key, &node.origin);
            match node.raw {
                Raw::Table(inner) if flatten => {
                    self.table_entries(key, &format!("{full}."), inner, flatten, out)
                }
                // librdkafka properties are text: `"linger.ms" = 5` means "5".
                Raw::Toml(toml::Value::Integer(number)) if flatten => {
                    out.insert(full, number.to_string());
                }
                Raw::Toml(toml::Value::Float(number)) if flatten => {
                    out.insert(full, number.to_string());
                }
                Raw::Toml(toml::Value::Boolean(flag)) if flatten => {
                    out.insert(full, flag.to_string());
                }
                raw => {
                    if let Some(value) = self.string_value(&entry_key, raw) {
                        out.insert(full, value);
                    }
                }
            }
        }
    }

    /// `routing.segments`: TOML tables, or from the environment a JSON array of objects.
    fn routes(&mut self, section: &mut Section, name: &str) -> Vec<SegmentRouteSettings> {
        const EXPECTED: &str = "a list of tables with the strings dimension, value and owner \
                                (from the environment: a JSON array of objects)";
        let Some((key, node)) = self.take(section, name, false) else {
            return Vec::new();
        };
        let Some(node) = self.expand_json(&key, node, EXPECTED) else {
            return Vec::new();
        };
        let items = match node.raw {
            Raw::Toml(toml::Value::Array(items)) => items,
            raw => {
                let found = match raw {
                    Raw::Env(_) => String::new(),
                    raw => format!(", found {}", a_type(&raw)),
                };
                self.report(&key, format!("expected {EXPECTED}{found}"));
                return Vec::new();
            }
        };
        let mut routes = Vec::with_capacity(items.len());
        for (i, item) in items.into_iter().enumerate() {
            let item_key = key.index(i);
            let toml::Value::Table(mut table) = item else {
                let found = a_type(&Raw::Toml(item));
                self.report(&item_key, format!("expected a table, found {found}"));
                continue;
            };
            let mut field = |reader: &mut Reader, name: &str| -> Option<String> {
                let field_key = item_key.name(name);
                match table.remove(name) {
                    Some(value) => reader.string_value(&field_key, Raw::Toml(value)),
                    None => {
                        reader.report(&field_key, "missing");
                        None
                    }
                }
            };
            let dimension = field(self, "dimension");
            let value = field(self, "value");
            let owner = field(self, "owner");
            for name in table.keys() {
                let unknown = item_key.name(name);
                self.report(
                    &unknown,
                    "unknown key; a rule has dimension, value and owner",
                );
            }
            if let (Some(dimension), Some(value), Some(owner)) = (dimension, value, owner) {
                routes.push(SegmentRouteSettings {
                    dimension,
                    value,
                    owner,
                });
            }
        }
        routes
    }

    /// Reads every section and key, reporting wrong types, missing and unknown keys.
    fn settings(&mut self, root: &mut BTreeMap<String, Node>) -> Read {
        let i32_max = i64::from(i32::MAX);
        let u32_max = i64::from(u32::MAX);

        let mut s = self.section(root, "kafka");
        let kafka = KafkaSettings {
            brokers: self.string(&mut s, "brokers"),
            properties: self.string_table(&mut s, "properties", true),
            ingest_group: self.string(&mut s, "ingest_group"),
            aggregate_group: self.string(&mut s, "aggregate_group"),
            followup_group: self.string(&mut s, "followup_group"),
            start_position: self.choice(
                &mut s,
                "start_position",
                &[
                    ("earliest", StartPosition::Earliest),
                    ("latest", StartPosition::Latest),
                ],
            ),
        };
        self.finish(s);

        let mut s = self.section(root, "topics");
        let topics = TopicSettings {
            responses: self.string(&mut s, "responses"),
            responses_by_id: self.string(&mut s, "responses_by_id"),
            dead_letters: self.string(&mut s, "dead_letters"),
            followups: self.string(&mut s, "followups"),
            segment_deltas: self.string(&mut s, "segment_deltas"),
            state: self.string(&mut s, "state"),
            followup_outcomes: self.string(&mut s, "followup_outcomes"),
            followup_events: self.string(&mut s, "followup_events"),
            cases: self.string(&mut s, "cases"),
            escalations: self.string(&mut s, "escalations"),
            followup_state: self.string(&mut s, "followup_state"),
            invitations: self.string(&mut s, "invitations"),
            segment_view: self.string(&mut s, "segment_view"),
            account_view: self.string(&mut s, "account_view"),
            partitions: to(self.int(&mut s, "partitions", 1, i32_max)),
            replication: to(self.int(&mut s, "replication", 1, i32_max)),
            max_message_bytes: to(self.int(
                &mut s,
                "max_message_bytes",
                MIN_MESSAGE_BYTES,
                MAX_MESSAGE_BYTES,
            )),
        };
        self.finish(s);

        let mut s = self.section(root, "windows");
        let lengths = self.strings(&mut s, "lengths");
        let buckets = to(self.int(&mut s, "buckets", 1, u32_max.min(MAX_STEPS)));
        let resolutions = self.string_table(&mut s, "resolutions", false);
        let (max_future_skew, skew) = self.span(&mut s, "max_future_skew", Span(0), false);
        let clock = self.choice(
            &mut s,
            "clock",
            &[
                ("wall", ClockKind::Wall),
                ("event_time", ClockKind::EventTime),
            ],
        );
        let windows_key = s.key.clone();
        self.finish(s);
        let mut steps = Vec::new();
        let mut steps_ok = true;
        for (name, text) in &resolutions {
            let key = windows_key.name("resolutions").name(name);
            match text.parse::<Span>() {
                Ok(step) if step > Span(0) => steps.push((name.clone(), step)),
                _ => {
                    self.report(&key, format!("expected {A_DURATION}, more than zero"));
                    steps_ok = false;
                }
            }
        }
        let windows = WindowSettings {
            lengths,
            buckets,
            resolutions,
            max_future_skew,
            clock,
        };

        let mut s = self.section(root, "segments");
        let segments = SegmentSettings {
            dimensions: self.strings(&mut s, "dimensions"),
            combinations: self.string_lists(&mut s, "combinations"),
            max_values_per_dimension: to(self.int(&mut s, "max_values_per_dimension", 1, i64::MAX)),
        };
        self.finish(s);

        let mut s = self.section(root, "dedupe");
        let (horizon_text, horizon) = self.span(&mut s, "horizon", Span(0), true);
        let dedupe = DedupeSettings {
            horizon: horizon_text,
            capacity: to(self.int(&mut s, "capacity", 1, i64::MAX)),
            restore_messages: self.int(&mut s, "restore_messages", 0, i64::MAX),
        };
        self.finish(s);

        let mut s = self.section(root, "routing");
        let routing = RoutingSettings {
            default_owner: self.string(&mut s, "default_owner"),
            accounts: self.string_table(&mut s, "accounts", false),
            segments: self.routes(&mut s, "segments"),
            escalations: self.string_table(&mut s, "escalations", false),
        };
        self.finish(s);

        let mut s = self.section(root, "processing");
        let processing = ProcessingSettings {
            guarantee: self.choice(
                &mut s,
                "guarantee",
                &[
                    ("at_least_once", Guarantee::AtLeastOnce),
                    ("exactly_once", Guarantee::ExactlyOnce),
                ],
            ),
            transactional_id: self.string(&mut s, "transactional_id"),
        };
        self.finish(s);

        let mut s = self.section(root, "ingest");
        let batch_max_messages = to(self.int(&mut s, "batch_max_messages", 1, i64::MAX));
        let (batch_max_wait, batch_wait) = self.span(&mut s, "batch_max_wait", Span(0), false);
        let ingest = IngestSettings {
            batch_max_messages,
            batch_max_wait,
        };
        self.finish(s);

        let mut s = self.section(root, "http");
        let http = HttpSettings {
            listen: self.string(&mut s, "listen"),
        };
        self.finish(s);

        let mut s = self.section(root, "analytics");
        let min_responses = to(self.int(&mut s, "min_responses", 0, i64::MAX));
        let (account_window, account_span) = self.span(&mut s, "account_window", Span(60), false);
        let at_risk_below = self.int(&mut s, "at_risk_below", -100, 100);
        let analytics = AnalyticsSettings {
            min_responses,
            account_window,
            at_risk_below,
        };
        self.finish(s);

        let mut s = self.section(root, "health");
        let (stall_timeout, stall) = self.span(&mut s, "stall_timeout", Span(1), false);
        let health = HealthSettings { stall_timeout };
        self.finish(s);

        let mut s = self.section(root, "log");
        let log = LogSettings {
            format: self.choice(
                &mut s,
                "format",
                &[("pretty", LogFormat::Pretty), ("json", LogFormat::Json)],
            ),
            level: self.string(&mut s, "level"),
        };
        self.finish(s);

        let mut s = self.section(root, "followup");
        let mut spans = [None; 5];
        let mut span = |reader: &mut Reader, s: &mut Section, name: &str, i: usize| {
            let (text, parsed) = reader.span(s, name, Span(1), false);
            spans[i] = parsed.flatten();
            text
        };
        let followup = FollowupSettings {
            first_contact_sla: span(self, &mut s, "first_contact_sla", 0),
            resolve_sla: span(self, &mut s, "resolve_sla", 1),
            escalate_scores: self.strings(&mut s, "escalate_scores"),
            escalation_owner: self.string(&mut s, "escalation_owner"),
            recovery_horizon: span(self, &mut s, "recovery_horizon", 2),
            closed_retention: span(self, &mut s, "closed_retention", 3),
            orphan_horizon: span(self, &mut s, "orphan_horizon", 4),
            case_directory: self.flag(&mut s, "case_directory"),
        };
        self.finish(s);

        for (name, node) in std::mem::take(root) {
            self.unknown(&Key::default().name(&name), &node);
        }

        Read {
            settings: Settings {
                kafka,
                topics,
                windows,
                segments,
                dedupe,
                routing,
                processing,
                ingest,
                http,
                health,
                log,
                followup,
                analytics,
            },
            skew: skew.flatten(),
            resolutions: steps,
            resolutions_ok: steps_ok,
            horizon,
            batch_max_wait: batch_wait.flatten(),
            stall_timeout: stall.flatten(),
            followup_spans: spans,
            account_window: account_span.flatten(),
        }
    }

    /// Checks what each key means and how keys fit together; builds the core's types.
    fn check(&mut self, read: &Read) -> Option<Config> {
        let s = &read.settings;
        let windows = self.check_windows(s, read);
        let segments = self.check_segments(s);
        let key =
            |path: &str| Key::from_names(&path.split('.').map(str::to_owned).collect::<Vec<_>>());

        if s.kafka.brokers.trim().is_empty() {
            self.report(&key("kafka.brokers"), "must not be empty");
        }
        let groups = [
            ("kafka.ingest_group", &s.kafka.ingest_group),
            ("kafka.aggregate_group", &s.kafka.aggregate_group),
            ("kafka.followup_group", &s.kafka.followup_group),
        ];
        for (i, (name, group)) in groups.iter().enumerate() {
            if group.trim().is_empty() {
                self.report(&key(name), "must not be empty");
            } else if let Some((other, _)) = groups[..i].iter().find(|(_, g)| g == group) {
                self.report(
                    &key(name),
                    format!("is the same group as `{other}`; each role needs its own"),
                );
            }
        }

        // Transactional ids are npsflow's to choose (one per input partition, see
        // `processing.transactional_id`); and exactly once, every client reads committed
        // records only, or what an aborted (or fenced) transaction wrote would be read.
        let property = Key::default().name("kafka").name("properties");
        if s.kafka.properties.contains_key("transactional.id") {
            self.report(
                &property.name("transactional.id"),
                "is set by npsflow (one per input partition in exactly_once); use `processing.transactional_id` for their prefix",
            );
        }
        if s.processing.guarantee == Guarantee::ExactlyOnce
            && s.kafka
                .properties
                .get("isolation.level")
                .is_some_and(|level| level.trim() != "read_committed")
        {
            self.report(
                &property.name("isolation.level"),
                "must be read_committed (librdkafka's default) with `processing.guarantee = exactly_once`: what aborted transactions wrote must never be read",
            );
        }

        let topics = [
            ("topics.responses", &s.topics.responses),
            ("topics.responses_by_id", &s.topics.responses_by_id),
            ("topics.dead_letters", &s.topics.dead_letters),
            ("topics.followups", &s.topics.followups),
            ("topics.segment_deltas", &s.topics.segment_deltas),
            ("topics.state", &s.topics.state),
            ("topics.followup_outcomes", &s.topics.followup_outcomes),
            ("topics.followup_events", &s.topics.followup_events),
            ("topics.cases", &s.topics.cases),
            ("topics.escalations", &s.topics.escalations),
            ("topics.followup_state", &s.topics.followup_state),
        ];
        for (i, (name, topic)) in topics.iter().enumerate() {
            let valid = !topic.is_empty()
                && topic.len() <= 249
                && topic.as_str() != "."
                && topic.as_str() != ".."
                && topic
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
            if !valid {
                self.report(
                    &key(name),
                    "expected a topic name: 1 to 249 of A-Z a-z 0-9 . _ -",
                );
            } else if let Some((other, _)) = topics[..i].iter().find(|(_, t)| t == topic) {
                self.report(
                    &key(name),
                    format!("is the same topic as `{other}`; each topic has one purpose"),
                );
            }
        }

        if s.routing.default_owner.trim().is_empty() {
            self.report(&key("routing.default_owner"), "must not be empty");
        }
        let accounts = key("routing.accounts");
        for (account, owner) in &s.routing.accounts {
            if owner.trim().is_empty() {
                self.report(&accounts.name(account), "an owner must not be empty");
            }
        }
        let rules = key("routing.segments");
        for (i, rule) in s.routing.segments.iter().enumerate() {
            if rule.owner.trim().is_empty() {
                self.report(&rules.index(i).name("owner"), "must not be empty");
            }
        }

        let escalations = key("routing.escalations");
        for (owner, to) in &s.routing.escalations {
            if to.trim().is_empty() {
                self.report(&escalations.name(owner), "must not be empty");
            }
        }
        let f = &s.followup;
        if f.escalation_owner.trim().is_empty() {
            self.report(&key("followup.escalation_owner"), "must not be empty");
        }
        let mut escalate_scores = Vec::new();
        for text in &f.escalate_scores {
            match text.trim().parse::<u8>() {
                Ok(score) if score <= 6 => escalate_scores.push(score),
                _ => self.report(
                    &key("followup.escalate_scores"),
                    "expected detractor scores, whole numbers 0 to 6",
                ),
            }
        }
        let followup = match read.followup_spans {
            [Some(first), Some(resolve), Some(recovery), Some(retention), Some(orphans)] => {
                if resolve < first {
                    self.report(
                        &key("followup.resolve_sla"),
                        "must be at least `followup.first_contact_sla`",
                    );
                }
                Some(npsflow_core::FollowupPolicy {
                    first_contact_sla: first,
                    resolve_sla: resolve,
                    escalate_scores,
                    escalation_owners: s.routing.escalations.clone(),
                    escalation_owner: f.escalation_owner.clone(),
                    recovery_horizon: recovery,
                    closed_retention: retention,
                    orphan_horizon: orphans,
                })
            }
            _ => None,
        };

        if s.http.listen.parse::<std::net::SocketAddr>().is_err() {
            self.report(
                &key("http.listen"),
                "expected an address and port such as 0.0.0.0:9464",
            );
        }
        if tracing_subscriber::EnvFilter::try_new(&s.log.level).is_err() {
            self.report(
                &key("log.level"),
                "expected a tracing filter such as info or info,librdkafka=warn",
            );
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
        let dedupe_horizon = read.horizon?.unwrap_or(windows.longest());
        Some(Config {
            settings: s.clone(),
            windows,
            segments: segments?,
            routing,
            dedupe_horizon,
            batch_max_wait: read.batch_max_wait?,
            stall_timeout: read.stall_timeout?,
            followup: followup?,
            account_window: read.account_window?,
        })
    }

    fn check_windows(&mut self, s: &Settings, read: &Read) -> Option<WindowSpecs> {
        let w = &s.windows;
        let lengths_key = Key::default().name("windows").name("lengths");
        let resolutions_key = Key::default().name("windows").name("resolutions");
        let buckets_key = Key::default().name("windows").name("buckets");
        let mut ok = true;
        if self.failed_within(&lengths_key) {
            // Nothing sensible to check the resolutions against.
            return None;
        }
        if w.lengths.is_empty() {
            self.report(&lengths_key, "at least one window is needed");
            ok = false;
        }
        let names: Vec<&str> = w.lengths.iter().map(|n| n.trim()).collect();
        let mut coarse_by_buckets = false;
        for (i, name) in names.iter().enumerate() {
            let key = lengths_key.index(i);
            let Ok(length) = name.parse::<Span>() else {
                self.report(&key, format!("expected {A_DURATION}, more than zero"));
                ok = false;
                continue;
            };
            if length <= Span(0) {
                self.report(&key, format!("expected {A_DURATION}, more than zero"));
                ok = false;
                continue;
            }
            if let Some(j) = names[..i].iter().position(|n| n == name) {
                self.report(&key, format!("repeats `{}`", lengths_key.index(j)));
                ok = false;
                continue;
            }
            let listed = w.resolutions.keys().find(|n| n.trim() == *name);
            match listed {
                Some(n) => {
                    let key = resolutions_key.name(n);
                    // A resolution that is not a span is already reported.
                    let step = read
                        .resolutions
                        .iter()
                        .find(|(m, _)| m == n)
                        .map(|(_, step)| step.millis());
                    let Some(step) = step else { continue };
                    if length.millis() % step != 0 {
                        self.report(&key, "must divide the window's length into whole steps");
                        ok = false;
                    } else if length.millis() / step < MIN_STEPS {
                        self.report(
                            &key,
                            format!("must be at most 1/{MIN_STEPS} of the window's length"),
                        );
                        ok = false;
                    } else if length.millis() / step > MAX_STEPS {
                        self.report(
                            &key,
                            format!(
                                "cuts the window into more than {MAX_STEPS} steps; every \
                                 segment keeps a tally per step"
                            ),
                        );
                        ok = false;
                    }
                }
                None => {
                    if length.millis() % i64::from(w.buckets) != 0 {
                        self.report(
                            &key,
                            "cannot be cut into `windows.buckets` steps of whole milliseconds; \
                             change windows.buckets or give the window a resolution",
                        );
                        ok = false;
                    } else if i64::from(w.buckets) < MIN_STEPS {
                        coarse_by_buckets = true;
                    }
                }
            }
        }
        if coarse_by_buckets {
            self.report(
                &buckets_key,
                format!(
                    "must be at least {MIN_STEPS} for windows without a resolution (a window \
                     moves in steps of at most 1/{MIN_STEPS} of its length)"
                ),
            );
            ok = false;
        }
        for name in w.resolutions.keys() {
            if !names.contains(&name.trim()) {
                self.report(
                    &resolutions_key.name(name),
                    "is not the name of a window in windows.lengths",
                );
                ok = false;
            }
        }
        let (true, true, Some(skew)) = (ok, read.resolutions_ok, read.skew) else {
            return None;
        };
        match WindowSpecs::with_resolutions(&names, w.buckets, &read.resolutions, skew) {
            Ok(specs) => Some(specs),
            Err(error) => {
                // Not expected after the checks above; named without values.
                let (key, what) = window_error(&error);
                self.report(&Key::default().name("windows").name(key), what);
                None
            }
        }
    }

    fn check_segments(&mut self, s: &Settings) -> Option<SegmentSpec> {
        let g = &s.segments;
        let dims_key = Key::default().name("segments").name("dimensions");
        let combos_key = Key::default().name("segments").name("combinations");
        let mut ok = true;
        for (i, name) in g.dimensions.iter().enumerate() {
            let valid = !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
            if !valid {
                self.report(
                    &dims_key.index(i),
                    "expected a dimension name: one or more of A-Z a-z 0-9 _ . -",
                );
                ok = false;
            } else if let Some(j) = g.dimensions[..i].iter().position(|n| n == name) {
                self.report(
                    &dims_key.index(i),
                    format!(
                        "repeats `{}`; a dimension is listed once",
                        dims_key.index(j)
                    ),
                );
                ok = false;
            }
        }
        let dimensions_known = !self.failed_within(&dims_key);
        for (i, combo) in g.combinations.iter().enumerate() {
            for (k, name) in combo.iter().enumerate() {
                if dimensions_known && !g.dimensions.contains(name) {
                    self.report(
                        &combos_key.index(i).index(k),
                        "is not one of segments.dimensions",
                    );
                    ok = false;
                }
            }
            let mut distinct: Vec<&String> = combo.iter().collect();
            distinct.sort();
            distinct.dedup();
            if distinct.len() < 2 {
                self.report(
                    &combos_key.index(i),
                    "a combination needs at least two different dimensions",
                );
                ok = false;
            }
        }
        if !ok || !dimensions_known || self.failed_within(&combos_key) {
            return None;
        }
        match SegmentSpec::new(&g.dimensions, &g.combinations, g.max_values_per_dimension) {
            Ok(spec) => Some(spec),
            Err(_) => {
                // Not expected after the checks above; named without values.
                self.report(
                    &Key::default().name("segments"),
                    "the dimensions and combinations do not fit together",
                );
                None
            }
        }
    }
}

/// The key a window error is about and what is wrong, without the values it carries.
fn window_error(error: &WindowSpecError) -> (&'static str, &'static str) {
    match error {
        WindowSpecError::Empty => ("lengths", "at least one window is needed"),
        WindowSpecError::BadName(_) => ("lengths", "a window is not a duration"),
        WindowSpecError::Repeated(_) => ("lengths", "a window is listed twice"),
        WindowSpecError::NotDivisible { .. } => (
            "buckets",
            "a window cannot be cut into this many steps of whole milliseconds",
        ),
        WindowSpecError::NegativeSkew => ("max_future_skew", "must not be negative"),
        WindowSpecError::StepTooCoarse { .. } => (
            "resolutions",
            "a window would move in steps coarser than 1/60 of its length",
        ),
        WindowSpecError::UnknownWindow(_) => ("resolutions", "names a window not in lengths"),
        WindowSpecError::RepeatedResolution(_) => {
            ("resolutions", "gives two resolutions for one window")
        }
        _ => ("resolutions", "a resolution does not fit its window"),
    }
}

/// A number read within its type's range (checked by [`Reader::int`]).
fn to<T: TryFrom<i64> + Default>(value: i64) -> T {
    T::try_from(value).unwrap_or_default()
}

/// `a, b ,c` -> `["a", "b", "c"]`; an empty text is an empty list.
fn split_list(text: &str) -> Vec<String> {
    if text.trim().is_empty() {
        return Vec::new();
    }
    text.split(',').map(|item| item.trim().to_owned()).collect()
}

/// `a=x, b=y` -> pairs; `None` if an item has no `=` or an empty name.
fn split_pairs(text: &str) -> Option<Vec<(String, String)>> {
    split_list(text)
        .into_iter()
        .map(|item| {
            let (name, value) = item.split_once('=')?;
            let name = name.trim();
            (!name.is_empty()).then(|| (name.to_owned(), value.trim().to_owned()))
        })
        .collect()
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

    fn problems(file: Option<&str>, env: &[(&str, &str)]) -> Vec<String> {
        match load(file, env) {
            Ok(_) => panic!("expected problems"),
            Err(errors) => errors.0,
        }
    }

    /// The one problem that mentions `needle`.
    fn the_problem<'a>(problems: &'a [String], needle: &str) -> &'a str {
        let found: Vec<&String> = problems.iter().filter(|p| p.contains(needle)).collect();
        assert_eq!(found.len(), 1, "{needle:?} in {problems:#?}");
        found[0]
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
    fn new_keys_have_their_defaults() {
        let config = load(None, &[]).expect("defaults are valid");
        let s = &config.settings;
        assert_eq!(s.topics.responses_by_id, "npsflow.responses-by-id");
        assert_eq!(s.topics.max_message_bytes, 1_048_588);
        assert_eq!(s.health.stall_timeout, "60s");
        assert_eq!(config.stall_timeout, Span::seconds(60));
        assert!(s.windows.resolutions.is_empty());
        for window in config.windows.windows() {
            assert_eq!(window.bucket().millis() * 60, window.length().millis());
        }
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
            "`windows.lengths[1]` (NPSFLOW__WINDOWS__LENGTHS)",
            "`segments.dimensions[1]` (NPSFLOW__SEGMENTS__DIMENSIONS): repeats \
             `segments.dimensions[0]`",
            "routing.default_owner",
            "http.listen",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
        }
    }

    #[test]
    fn type_errors_in_the_file_do_not_hide_other_problems() {
        let file = "[topics]\npartitions = \"six\"\n[windows]\nbuckets = [60]\n\
                    [segments]\ncolour = \"blue\"\n";
        let found = problems(Some(file), &[]);
        assert_eq!(found.len(), 3, "{found:#?}");
        for (key, var) in [
            ("`topics.partitions`", "NPSFLOW__TOPICS__PARTITIONS"),
            ("`windows.buckets`", "NPSFLOW__WINDOWS__BUCKETS"),
            ("`segments.colour`", "NPSFLOW__SEGMENTS__COLOUR"),
        ] {
            let problem = the_problem(&found, key);
            assert!(problem.contains(var), "{problem}");
            assert!(problem.contains("set in "), "{problem}");
            assert!(problem.contains(".toml"), "{problem}");
        }
        let partitions = the_problem(&found, "topics.partitions");
        assert!(partitions.contains("found a string"), "{partitions}");
        let buckets = the_problem(&found, "windows.buckets");
        assert!(buckets.contains("found an array"), "{buckets}");
    }

    #[test]
    fn type_errors_in_the_environment_do_not_hide_other_problems() {
        let found = problems(
            None,
            &[
                ("NPSFLOW__TOPICS__PARTITIONS", "six"),
                ("NPSFLOW__DEDUPE__CAPACITY", "-3"),
                ("NPSFLOW__WINDOWS__CLOCK", "sundial"),
                ("NPSFLOW__WINDOWS__COLOUR", "blue"),
                ("NPSFLOW__HEALTH__STALL_TIMEOUT", "0s"),
            ],
        );
        assert_eq!(found.len(), 5, "{found:#?}");
        for (key, var) in [
            ("`topics.partitions`", "NPSFLOW__TOPICS__PARTITIONS"),
            ("`dedupe.capacity`", "NPSFLOW__DEDUPE__CAPACITY"),
            ("`windows.clock`", "NPSFLOW__WINDOWS__CLOCK"),
            ("`windows.colour`", "NPSFLOW__WINDOWS__COLOUR"),
            ("`health.stall_timeout`", "NPSFLOW__HEALTH__STALL_TIMEOUT"),
        ] {
            let problem = the_problem(&found, key);
            assert!(problem.contains(var), "{problem}");
            assert!(
                problem.contains("environment") || problem.contains("set by NPSFLOW__"),
                "{problem}"
            );
        }
        assert!(the_problem(&found, "windows.clock").contains("\"event_time\""));
    }

    #[test]
    fn file_and_environment_problems_are_reported_together() {
        let file = "[topics]\nreplication = true\n";
        let found = problems(
            Some(file),
            &[("NPSFLOW__INGEST__BATCH_MAX_MESSAGES", "lots")],
        );
        assert_eq!(found.len(), 2, "{found:#?}");
        assert!(the_problem(&found, "topics.replication").contains("found a boolean"));
        assert!(the_problem(&found, "ingest.batch_max_messages").contains("environment"));
    }

    #[test]
    fn a_syntax_error_and_an_unreadable_file_are_reported_with_the_rest() {
        let found = problems(
            Some("[topics\npartitions = 6\n"),
            &[("NPSFLOW__TOPICS__PARTITIONS", "six")],
        );
        assert_eq!(found.len(), 2, "{found:#?}");
        assert!(the_problem(&found, "not valid TOML").contains("line 1"));
        the_problem(&found, "NPSFLOW__TOPICS__PARTITIONS");

        let missing = Path::new("/nonexistent/npsflow.toml");
        let env = [("NPSFLOW__LOG__FORMAT".to_owned(), "xml".to_owned())];
        let found = Config::load(Some(missing), env).expect_err("invalid").0;
        assert_eq!(found.len(), 2, "{found:#?}");
        the_problem(
            &found,
            "cannot read the configuration file /nonexistent/npsflow.toml",
        );
        the_problem(&found, "`log.format` (NPSFLOW__LOG__FORMAT)");
    }

    #[test]
    fn unknown_and_conflicting_environment_variables_are_problems() {
        let found = problems(
            None,
            &[
                ("NPSFLOW__NOPE", "1"),
                ("NPSFLOW__HTTP__LISTEN__PORT", "1"),
                ("NPSFLOW__HTTP__LISTEN", "127.0.0.1:1"),
                ("NPSFLOW__http__listen", "127.0.0.1:2"),
                ("NPSFLOW__KAFKA____BROKERS", "x"),
            ],
        );
        assert_eq!(found.len(), 4, "{found:#?}");
        the_problem(&found, "unknown key `nope` (NPSFLOW__NOPE)");
        the_problem(&found, "unknown key `http.listen.port`");
        the_problem(&found, "set by two environment variables");
        the_problem(&found, "NPSFLOW__KAFKA____BROKERS names no key");
    }

    #[test]
    fn a_variable_naming_a_section_hides_nothing_in_it() {
        let file = "[windows]\nlengths = [\"1h\", \"soon\"]\n";
        let found = problems(Some(file), &[("NPSFLOW__WINDOWS", "x")]);
        assert_eq!(found.len(), 2, "{found:#?}");
        the_problem(
            &found,
            "`windows` (NPSFLOW__WINDOWS): a section is set key by key",
        );
        the_problem(&found, "`windows.lengths[1]`");
    }

    #[test]
    fn lists_come_from_the_environment_comma_separated_or_as_json() {
        let config = load(
            None,
            &[
                ("NPSFLOW__WINDOWS__LENGTHS", "1h, 24h,7d"),
                (
                    "NPSFLOW__SEGMENTS__DIMENSIONS",
                    "region,product,channel,tier",
                ),
                (
                    "NPSFLOW__SEGMENTS__COMBINATIONS",
                    "region+product, channel + tier",
                ),
            ],
        )
        .expect("valid");
        let w = &config.settings.windows;
        assert_eq!(w.lengths, ["1h", "24h", "7d"]);
        assert_eq!(config.windows.windows().len(), 3);
        let g = &config.settings.segments;
        assert_eq!(g.dimensions, ["region", "product", "channel", "tier"]);
        assert_eq!(
            g.combinations,
            [vec!["region", "product"], vec!["channel", "tier"]]
        );

        let config = load(
            None,
            &[
                ("NPSFLOW__WINDOWS__LENGTHS", r#"["1h","7d"]"#),
                ("NPSFLOW__SEGMENTS__DIMENSIONS", r#"["region","tier"]"#),
                ("NPSFLOW__SEGMENTS__COMBINATIONS", r#"[["region","tier"]]"#),
            ],
        )
        .expect("valid");
        assert_eq!(config.settings.windows.lengths, ["1h", "7d"]);
        assert_eq!(config.settings.segments.combinations, [["region", "tier"]]);

        let config = load(
            None,
            &[
                ("NPSFLOW__SEGMENTS__DIMENSIONS", ""),
                ("NPSFLOW__SEGMENTS__COMBINATIONS", ""),
            ],
        )
        .expect("empty lists are valid");
        assert!(config.settings.segments.dimensions.is_empty());
    }

    #[test]
    fn bad_lists_from_the_environment_name_their_variable() {
        let found = problems(
            None,
            &[
                ("NPSFLOW__WINDOWS__LENGTHS", "1h,soon"),
                ("NPSFLOW__SEGMENTS__DIMENSIONS", "region,product"),
                ("NPSFLOW__SEGMENTS__COMBINATIONS", "region+nowhere"),
                ("NPSFLOW__ROUTING__SEGMENTS", "[{"),
                ("NPSFLOW__ROUTING__ACCOUNTS", r#"["acme"]"#),
            ],
        );
        assert_eq!(found.len(), 4, "{found:#?}");
        let lengths = the_problem(&found, "`windows.lengths[1]`");
        assert!(lengths.contains("NPSFLOW__WINDOWS__LENGTHS"), "{lengths}");
        let combination = the_problem(&found, "`segments.combinations[0][1]`");
        assert!(
            combination.contains("NPSFLOW__SEGMENTS__COMBINATIONS"),
            "{combination}"
        );
        assert!(the_problem(&found, "`routing.segments`").contains("JSON"));
        assert!(the_problem(&found, "`routing.accounts`").contains("found an array"));

        // A broken list of dimensions is one problem, not one per combination using it.
        let found = problems(
            None,
            &[
                ("NPSFLOW__SEGMENTS__DIMENSIONS", r#"["region", 7]"#),
                ("NPSFLOW__SEGMENTS__COMBINATIONS", "region+product"),
            ],
        );
        assert_eq!(found.len(), 1, "{found:#?}");
        let dimension = the_problem(&found, "`segments.dimensions[1]`");
        assert!(dimension.contains("found an integer"), "{dimension}");
    }

    #[test]
    fn tables_come_from_the_environment_entry_by_entry_as_pairs_or_as_json() {
        let config = load(
            None,
            &[
                (
                    "NPSFLOW__ROUTING__ACCOUNTS",
                    "acme=east-team, Globex = west-team",
                ),
                (
                    "NPSFLOW__KAFKA__PROPERTIES",
                    r#"{"security.protocol":"SASL_SSL"}"#,
                ),
                (
                    "NPSFLOW__ROUTING__SEGMENTS",
                    r#"[{"dimension":"region","value":"east","owner":"east-cx"}]"#,
                ),
            ],
        )
        .expect("valid");
        let s = &config.settings;
        assert_eq!(s.routing.accounts["acme"], "east-team");
        assert_eq!(s.routing.accounts["Globex"], "west-team");
        assert_eq!(s.kafka.properties["security.protocol"], "SASL_SSL");
        assert_eq!(s.routing.segments.len(), 1);
        assert_eq!(s.routing.segments[0].owner, "east-cx");

        let found = problems(None, &[("NPSFLOW__ROUTING__ACCOUNTS", "acme")]);
        assert_eq!(found.len(), 1, "{found:#?}");
        the_problem(&found, "`routing.accounts` (NPSFLOW__ROUTING__ACCOUNTS)");
    }

    #[test]
    fn property_names_may_be_written_without_quotes_in_the_file() {
        let file =
            "[kafka.properties]\nsecurity.protocol = \"SSL\"\n\"ssl.ca.location\" = \"/ca\"\n";
        let config = load(Some(file), &[]).expect("valid");
        let properties = &config.settings.kafka.properties;
        assert_eq!(properties["security.protocol"], "SSL");
        assert_eq!(properties["ssl.ca.location"], "/ca");

        // Numbers and booleans are text to librdkafka.
        let file = "[kafka.properties]\n\"linger.ms\" = 5\nenable.idempotence = true\n";
        let config = load(Some(file), &[]).expect("valid");
        let properties = &config.settings.kafka.properties;
        assert_eq!(properties["linger.ms"], "5");
        assert_eq!(properties["enable.idempotence"], "true");

        let found = problems(Some("[kafka.properties]\n\"linger.ms\" = [5]\n"), &[]);
        assert_eq!(found.len(), 1, "{found:#?}");
        let problem = the_problem(&found, "`kafka.properties.\"linger.ms\"`");
        assert!(
            problem.contains("NPSFLOW__KAFKA__PROPERTIES__LINGER_MS"),
            "{problem}"
        );
        assert!(
            problem.contains("expected a string, found an array"),
            "{problem}"
        );
    }

    #[test]
    fn routing_rules_are_checked_field_by_field() {
        let file = r#"
[[routing.segments]]
dimension = "region"
value = "east"
owner = "east-cx"
[[routing.segments]]
dimension = "region"
value = 7
colour = "blue"
"#;
        let found = problems(Some(file), &[]);
        assert_eq!(found.len(), 3, "{found:#?}");
        the_problem(
            &found,
            "`routing.segments[1].value` (NPSFLOW__ROUTING__SEGMENTS)",
        );
        the_problem(&found, "`routing.segments[1].owner`");
        the_problem(&found, "`routing.segments[1].colour`");
    }

    #[test]
    fn no_problem_repeats_a_value() {
        const MARKER: &str = "S3cr3tMarker";
        let env = [
            ("NPSFLOW__KAFKA__PROPERTIES", "S3cr3tMarker"),
            ("NPSFLOW__TOPICS__PARTITIONS", "S3cr3tMarker"),
            ("NPSFLOW__TOPICS__REPLICATION", "1"),
            ("NPSFLOW__TOPICS__REPLICATION_FACTOR", "S3cr3tMarker"),
            ("NPSFLOW__WINDOWS__CLOCK", "S3cr3tMarker"),
            ("NPSFLOW__WINDOWS__RESOLUTIONS", "S3cr3tMarker"),
            ("NPSFLOW__ROUTING__SEGMENTS", "[\"S3cr3tMarker\"]"),
            ("NPSFLOW__ROUTING__ACCOUNTS", "{\"a\": \"S3cr3tMarker"),
            ("NPSFLOW__PROCESSING__GUARANTEE", "S3cr3tMarker"),
            ("NPSFLOW__DEDUPE__HORIZON", "S3cr3tMarker"),
            ("NPSFLOW__HEALTH__STALL_TIMEOUT", "S3cr3tMarker"),
            ("NPSFLOW__KAFKA__BROKERS__X", "S3cr3tMarker"),
        ];
        let file = r#"
[kafka]
ingest_group = "S3cr3tMarker"
aggregate_group = "S3cr3tMarker"
[topics]
responses = "S3cr3tMarker!"
state = "S3cr3tMarker"
dead_letters = "S3cr3tMarker"
[windows]
lengths = ["S3cr3tMarker", "1h", "1h"]
max_future_skew = "S3cr3tMarker"
[segments]
dimensions = ["S3cr3tMarker!", "a", "a"]
combinations = [["S3cr3tMarker"]]
[ingest]
batch_max_wait = "S3cr3tMarker"
[http]
listen = "S3cr3tMarker"
[log]
level = "S3cr3tMarker[=]"
format = "S3cr3tMarker"
"#;
        let found = problems(Some(file), &env);
        assert!(found.len() >= 20, "{found:#?}");
        for problem in &found {
            assert!(!problem.contains(MARKER), "echoes a value: {problem}");
        }
        // Nor in a TOML syntax error.
        let found = problems(Some("password = \"S3cr3tMarker\n"), &[]);
        for problem in &found {
            assert!(!problem.contains(MARKER), "echoes a value: {problem}");
        }
        let found = problems(Some("x = S3cr3tMarker\n"), &[]);
        for problem in &found {
            assert!(!problem.contains(MARKER), "echoes a value: {problem}");
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
        for name in SENSITIVE_PROPERTIES {
            assert!(is_secret(name), "{name}");
        }
        for name in [
            "sasl.password",
            "sasl.username",
            "sasl.oauthbearer.config",
            "sasl.oauthbearer.client.secret",
            "sasl.oauthbearer.assertion.private.key.passphrase",
            "ssl.key.password",
            "ssl.key.pem",
            "ssl.key.location",
            "ssl_key",
            "SSL.KEYSTORE.PASSWORD",
            "ssl.truststore.password",
            "sasl.kerberos.keytab",
            "sasl.jaas.config",
        ] {
            assert!(is_secret(name), "{name}");
        }
        for name in [
            "ssl.ca.location",
            "ssl.keystore.location",
            "security.protocol",
            "sasl.mechanisms",
            "bootstrap.servers",
        ] {
            assert!(!is_secret(name), "{name}");
        }
    }

    #[test]
    fn sensitive_properties_are_redacted_when_printed_and_debugged() {
        let file = "[kafka.properties]\n\"sasl.oauthbearer.config\" = \"principal=S3cr3tMarker\"\n";
        let config = load(
            Some(file),
            &[
                (
                    "NPSFLOW__KAFKA__PROPERTIES__SSL_KEY_PEM",
                    "S3cr3tMarker-pem",
                ),
                (
                    "NPSFLOW__KAFKA__PROPERTIES__SASL_USERNAME",
                    "S3cr3tMarker-user",
                ),
                ("NPSFLOW__KAFKA__PROPERTIES__SASL_MECHANISMS", "OAUTHBEARER"),
            ],
        )
        .expect("valid");
        let properties = &config.settings.kafka.properties;
        assert_eq!(
            properties["sasl.oauthbearer.config"],
            "principal=S3cr3tMarker"
        );
        let printed = config.redacted_toml();
        let debugged = format!("{config:?}");
        for shown in [&printed, &debugged] {
            assert!(!shown.contains("S3cr3tMarker"), "{shown}");
            assert!(shown.contains("sasl.oauthbearer.config"), "{shown}");
            assert!(shown.contains("OAUTHBEARER"), "{shown}");
        }
        assert!(
            printed.contains("\"sasl.oauthbearer.config\" = \"<redacted>\""),
            "{printed}"
        );
    }

    #[test]
    fn exactly_once_reads_committed_and_owns_transactional_ids() {
        let found = problems(
            None,
            &[
                ("NPSFLOW__PROCESSING__GUARANTEE", "exactly_once"),
                (
                    "NPSFLOW__KAFKA__PROPERTIES__ISOLATION_LEVEL",
                    "read_uncommitted",
                ),
                ("NPSFLOW__KAFKA__PROPERTIES__TRANSACTIONAL_ID", "mine"),
            ],
        );
        assert_eq!(found.len(), 2, "{found:#?}");
        the_problem(&found, "`kafka.properties.\"isolation.level\"` (NPSFLOW__KAFKA__PROPERTIES__ISOLATION_LEVEL): must be read_committed");
        the_problem(&found, "`kafka.properties.\"transactional.id\"` (NPSFLOW__KAFKA__PROPERTIES__TRANSACTIONAL_ID): is set by npsflow");
        // At least once, reading uncommitted records is the user's choice.
        let env = [(
            "NPSFLOW__KAFKA__PROPERTIES__ISOLATION_LEVEL",
            "read_uncommitted",
        )];
        assert!(load(None, &env).is_ok());
    }

    #[test]
    fn start_position_is_earliest_by_default_and_applies_to_external_inputs_only() {
        let config = load(None, &[]).expect("defaults");
        let kafka = &config.settings.kafka;
        let topics = &config.settings.topics;
        assert_eq!(kafka.start_position, StartPosition::Earliest);
        assert!(!kafka
            .start_position
            .starts_at_end(topics, &topics.responses));

        let config = load(None, &[("NPSFLOW__KAFKA__START_POSITION", "latest")]).expect("latest");
        let topics = &config.settings.topics;
        let latest = config.settings.kafka.start_position;
        assert_eq!(latest, StartPosition::Latest);
        for external in [
            &topics.responses,
            &topics.followup_outcomes,
            &topics.invitations,
        ] {
            assert!(latest.starts_at_end(topics, external), "{external}");
        }
        for internal in [
            &topics.responses_by_id,
            &topics.segment_deltas,
            &topics.state,
            &topics.followup_events,
            &topics.followup_state,
            &topics.cases,
            &topics.escalations,
            &topics.followups,
            &topics.dead_letters,
            &topics.segment_view,
            &topics.account_view,
        ] {
            assert!(!latest.starts_at_end(topics, internal), "{internal}");
        }

        let file = "[kafka]\nstart_position = \"newest\"\n";
        the_problem(&problems(Some(file), &[]), "`kafka.start_position`");
    }

    #[test]
    fn new_keys_are_validated() {
        let file = r#"
[kafka]
aggregate_group = "npsflow-ingest"
[topics]
responses_by_id = "survey.responses"
max_message_bytes = 1000
[health]
stall_timeout = "0s"
"#;
        let found = problems(Some(file), &[]);
        assert_eq!(found.len(), 4, "{found:#?}");
        the_problem(&found, "`kafka.aggregate_group` (NPSFLOW__KAFKA__AGGREGATE_GROUP): is the same group as `kafka.ingest_group`");
        the_problem(&found, "`topics.responses_by_id` (NPSFLOW__TOPICS__RESPONSES_BY_ID): is the same topic as `topics.responses`");
        the_problem(&found, "`topics.max_message_bytes` (NPSFLOW__TOPICS__MAX_MESSAGE_BYTES): expected a whole number from 1024");
        the_problem(
            &found,
            "`health.stall_timeout` (NPSFLOW__HEALTH__STALL_TIMEOUT)",
        );

        let config = load(
            None,
            &[
                ("NPSFLOW__TOPICS__MAX_MESSAGE_BYTES", "1024"),
                ("NPSFLOW__HEALTH__STALL_TIMEOUT", "5m"),
                ("NPSFLOW__TOPICS__RESPONSES_BY_ID", "by-id"),
            ],
        )
        .expect("valid");
        assert_eq!(config.settings.topics.max_message_bytes, 1024);
        assert_eq!(config.stall_timeout, Span::minutes(5));
        assert_eq!(config.settings.topics.responses_by_id, "by-id");
    }

    #[test]
    fn resolutions_set_a_window_step() {
        let file = "[windows]\nresolutions = { \"28d\" = \"1h\" }\n";
        let config = load(Some(file), &[]).expect("valid");
        let specs = &config.windows;
        let by_name = |name: &str| &specs.windows()[specs.position(name).expect("window")];
        assert_eq!(by_name("28d").bucket(), Span::hours(1));
        assert_eq!(
            by_name("7d").bucket(),
            Span::days(7)
                .millis()
                .checked_div(60)
                .map(Span)
                .expect("step")
        );
        assert_eq!(config.settings.windows.resolutions["28d"], "1h");

        let config = load(None, &[("NPSFLOW__WINDOWS__RESOLUTIONS__7D", "10m")]).expect("valid");
        let specs = &config.windows;
        assert_eq!(
            specs.windows()[specs.position("7d").expect("7d")].bucket(),
            Span::minutes(10)
        );

        let config =
            load(None, &[("NPSFLOW__WINDOWS__RESOLUTIONS", "7d=10m,28d=1h")]).expect("valid");
        assert_eq!(config.settings.windows.resolutions.len(), 2);
    }

    #[test]
    fn bad_resolutions_are_named() {
        let file = r#"
[windows]
resolutions = { "28d" = "5h", "7d" = "1d", "5h" = "1m", "1h" = "soon", "24h" = "500ms" }
"#;
        let found = problems(Some(file), &[]);
        assert_eq!(found.len(), 5, "{found:#?}");
        assert!(the_problem(&found, "`windows.resolutions.28d`").contains("divide"));
        assert!(the_problem(&found, "`windows.resolutions.7d`").contains("1/60"));
        assert!(
            the_problem(&found, "`windows.resolutions.5h`").contains("not the name of a window")
        );
        assert!(the_problem(&found, "`windows.resolutions.1h`")
            .contains("NPSFLOW__WINDOWS__RESOLUTIONS__1H"));
        assert!(the_problem(&found, "`windows.resolutions.24h`").contains("more than 100000 steps"));

        let found = problems(None, &[("NPSFLOW__WINDOWS__BUCKETS", "30")]);
        assert_eq!(found.len(), 1, "{found:#?}");
        the_problem(
            &found,
            "`windows.buckets` (NPSFLOW__WINDOWS__BUCKETS): must be at least 60",
        );
        // With every window given a resolution, buckets does not matter.
        load(
            None,
            &[
                ("NPSFLOW__WINDOWS__BUCKETS", "30"),
                ("NPSFLOW__WINDOWS__LENGTHS", "1h"),
                ("NPSFLOW__WINDOWS__RESOLUTIONS__1H", "1m"),
            ],
        )
        .expect("valid");
    }
}
