//! npsflow-runtime: the I/O shell around `npsflow-core`. The role engine and the roles on it,
//! configuration, Prometheus metrics, the HTTP API, logging, and the embedded demo broker.
//!
//! - [`config`]: layered settings, checked into the core's types.
//! - [`engine`]: the one driver of every role (receive, restore, deliver, commit, timers).
//! - [`kafka`]: client configuration, consumer context, reliable delivery; [`waves`]: how a
//!   delivery round is handed to the producer without making it busy-wait.
//! - [`ingest`]: the ingest role; [`envelope`]: how it carries messages byte-exact.
//! - [`aggregate`]: the aggregate role; [`view`]: the segment query model it writes.
//! - [`metrics`]: the Prometheus registry; [`metrics::events`]: everything reported.
//! - [`http`]: `/metrics`, `/healthz`, `/readyz`, `/v1/segments`.
//! - [`health`]: readiness and liveness per role.
//! - [`state`]: reading role state back from Kafka on assignment.
//! - [`traffic`]: realistic survey traffic (demo and load generator).
//! - [`topics`]: topic creation.

pub mod accounts;
pub mod aggregate;
pub mod bundle;
pub mod config;
pub mod directory;
pub mod engine;
pub mod envelope;
pub mod followup;
pub mod health;
pub mod http;
pub mod ingest;
pub mod kafka;
pub mod metrics;
pub mod readable;
pub mod repeats;
pub mod state;
pub mod topics;
pub mod traffic;
pub mod view;
pub mod waves;

use std::sync::{Arc, RwLock};

use npsflow_core::Timestamp;
use tokio::sync::watch;

pub use config::Config;

/// Why a role or command stopped.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// A Kafka client could not be created or used.
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// The HTTP server failed.
    #[error("http: {0}")]
    Io(#[from] std::io::Error),
    /// State could not be read back in time.
    #[error(transparent)]
    Restore(#[from] state::RestoreTimedOut),
    /// The topics do not exist or do not fit together.
    #[error(transparent)]
    Topics(#[from] state::TopicError),
    /// A task panicked or was cancelled.
    #[error("a task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    /// A role stopped although nobody asked it to.
    #[error("the {0} role stopped on its own")]
    StoppedOnItsOwn(&'static str),
    /// The transactional consumer has no group metadata (it has not joined its group).
    #[error("the consumer has no group metadata")]
    NoGroupMetadata,
    /// A record was rejected for good and had no fallback.
    #[error(transparent)]
    Delivery(#[from] kafka::DeliveryError),
}

/// The wall clock as the core's timestamp.
pub fn wall_now() -> Timestamp {
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    Timestamp(since_epoch.as_millis() as i64)
}

/// A role npsflow can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Validate, dedupe, alert, pre-aggregate.
    Ingest,
    /// Own segments' windows; gauges and API.
    Aggregate,
    /// Follow-up cases: SLAs, escalations, recovery.
    Followup,
}

impl Role {
    /// Every role, in pipeline order.
    pub const ALL: [Role; 3] = [Role::Ingest, Role::Aggregate, Role::Followup];

    /// The role's name.
    pub fn name(self) -> &'static str {
        match self {
            Role::Ingest => ingest::ROLE,
            Role::Aggregate => aggregate::ROLE,
            Role::Followup => followup::ROLE,
        }
    }

    /// A role by name.
    pub fn parse(name: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.name() == name.trim())
    }
}

/// The shared parts of a running process, for the HTTP server and the demo's table.
#[derive(Clone)]
pub struct Process {
    /// Metrics.
    pub metrics: metrics::Metrics,
    /// Health.
    pub health: Arc<health::Health>,
    /// Segment view, when the aggregate role runs.
    pub view: Option<Arc<RwLock<view::AggregateView>>>,
    /// The cases this process owns, when the followup role runs.
    pub books: followup::CaseBooks,
    /// Every case, read from the cases topic (any instance answers for all of them), unless
    /// `followup.case_directory` is false.
    pub directory: Option<Arc<directory::CaseDirectory>>,
    /// Every segment summary, read from the segment view topic (any instance answers for
    /// every segment), by `<window>|<segment>`.
    pub segment_view: Arc<directory::SegmentViewTable>,
    /// Every account summary, read from the account view topic, by `account_id`.
    pub account_view: Arc<directory::Table<accounts::AccountRow>>,
    /// The configured windows' names, in order.
    pub windows: Vec<String>,
    /// `analytics.at_risk_below`.
    pub at_risk_below: f64,
    /// The account window (`analytics.account_window`).
    pub account_window: npsflow_core::WindowSpec,
    /// The roles' clock: the wall clock, or a test's hand-moved one.
    pub clock: Arc<dyn engine::Clock>,
}

impl Process {
    /// Shared state for running `roles` with `config`.
    pub fn new(config: &Config, roles: &[Role]) -> Process {
        let metrics = metrics::Metrics::new();
        let topics = &config.settings.topics;
        let names: Vec<&str> = roles.iter().map(|r| r.name()).collect();
        metrics.prepare(
            &names,
            &[
                &topics.dead_letters,
                &topics.followups,
                &topics.segment_deltas,
                &topics.responses_by_id,
                &topics.state,
                &topics.followup_events,
                &topics.cases,
                &topics.escalations,
                &topics.followup_state,
                &topics.segment_view,
                &topics.account_view,
            ],
        );
        let view = roles.contains(&Role::Aggregate).then(|| {
            let view = Arc::new(RwLock::new(view::AggregateView::new(
                config.windows.clone(),
                config.settings.windows.clock,
                config.settings.analytics.min_responses,
            )));
            metrics.register_segments(view.clone());
            view
        });
        let books = followup::CaseBooks::default();
        if roles.contains(&Role::Followup) {
            metrics.register_cases(books.clone());
        }
        Process {
            metrics,
            health: Arc::new(health::Health::new(std::time::Duration::from_millis(
                config.stall_timeout.millis().max(1) as u64,
            ))),
            view,
            books,
            directory: config.settings.followup.case_directory.then(Arc::default),
            segment_view: Arc::default(),
            account_view: Arc::default(),
            at_risk_below: config.settings.analytics.at_risk_below as f64,
            account_window: accounts::account_window(config),
            windows: config
                .windows
                .windows()
                .iter()
                .map(|w| w.name().to_owned())
                .collect(),
            clock: Arc::new(engine::WallClock),
        }
    }

    /// The HTTP server's state.
    pub fn app_state(&self) -> http::AppState {
        http::AppState {
            metrics: self.metrics.clone(),
            health: self.health.clone(),
            view: self.view.clone(),
            segment_view: self.segment_view.clone(),
            account_view: self.account_view.clone(),
            account_window: self.account_window.clone(),
            at_risk_below: self.at_risk_below,
            windows: self.windows.clone(),
            cases: self.directory.clone(),
            clock: self.clock.clone(),
        }
    }
}

/// Runs `roles` and the HTTP server until `shutdown` turns true. A role that stops with an
/// error (or stops at all before shutdown) fails the whole process: its health turns
/// not-live, the other roles are asked to finish and commit, and the error is returned, so
/// the binary exits non-zero and an orchestrator restarts it with its own backoff.
pub async fn run(
    config: Arc<Config>,
    roles: &[Role],
    process: Process,
    listener: tokio::net::TcpListener,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), RuntimeError> {
    // The roles stop on the caller's shutdown, or when one of them fails.
    let (stop, stopping) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    let engine = engine::Engine {
        config,
        metrics: process.metrics.clone(),
        health: process.health.clone(),
        clock: process.clock.clone(),
    };
    for &role in roles {
        let (engine, view, stopping) = (engine.clone(), process.view.clone(), stopping.clone());
        let books = process.books.clone();
        tasks.spawn(async move {
            let result = match (role, view) {
                (Role::Ingest, _) => ingest::run(engine, stopping).await,
                (Role::Aggregate, Some(view)) => aggregate::run(engine, view, stopping).await,
                (Role::Aggregate, None) => {
                    Err(RuntimeError::StoppedOnItsOwn(Role::Aggregate.name()))
                }
                (Role::Followup, _) => followup::run(engine, books, stopping).await,
            };
            (role, result)
        });
    }
    let directory_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let settings = &engine.config.settings;
    let mut readers = vec![
        directory::follow(
            settings.kafka.clone(),
            settings.topics.segment_view.clone(),
            process.segment_view.clone(),
            process.metrics.clone(),
            directory_stop.clone(),
        ),
        directory::follow(
            settings.kafka.clone(),
            settings.topics.account_view.clone(),
            process.account_view.clone(),
            process.metrics.clone(),
            directory_stop.clone(),
        ),
    ];
    readers.extend(process.directory.clone().map(|cases| {
        directory::follow(
            settings.kafka.clone(),
            settings.topics.cases.clone(),
            cases,
            process.metrics.clone(),
            directory_stop.clone(),
        )
    }));
    let http_stopping = stopping.clone();
    let http = tokio::spawn(http::serve(listener, process.app_state(), async move {
        let mut stopping = http_stopping;
        let _ = stopping.wait_for(|stop| *stop).await;
    }));
    let mut result = Ok(());
    loop {
        let joined = tokio::select! {
            _ = shutdown.wait_for(|stop| *stop), if !*stop.borrow() => {
                let _ = stop.send(true);
                continue;
            }
            joined = tasks.join_next() => joined,
        };
        let Some(joined) = joined else { break };
        let (role, outcome) = match joined {
            Ok((role, outcome)) => (Some(role), outcome),
            Err(error) => (None, Err(RuntimeError::Task(error))),
        };
        let outcome = match (outcome, role) {
            (Ok(()), Some(role)) if !*stop.borrow() => {
                Err(RuntimeError::StoppedOnItsOwn(role.name()))
            }
            (other, _) => other,
        };
        if let Err(error) = outcome {
            let name = role.map_or("unknown", Role::name);
            metrics::events::RoleFailed {
                role: name,
                error: &error,
            }
            .emit(&process.metrics);
            if let Some(role) = role {
                process.health.set_failed(role.name());
            }
            let _ = stop.send(true);
            if result.is_ok() {
                result = Err(error);
            }
        }
    }
    http.abort();
    directory_stop.store(true, std::sync::atomic::Ordering::Relaxed);
    // A reader sees the stop within a poll (200 ms), unless it waits for an unreachable
    // broker (a metadata request, a client closing): it is then left behind, as the process
    // is about to exit and the reader has nothing to save.
    let deadline = tokio::time::Instant::now() + READERS_STOP;
    while readers.iter().any(|reader| !reader.is_finished())
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    for reader in readers.into_iter().filter(|reader| reader.is_finished()) {
        let _ = reader.join();
    }
    result
}

/// How long a stopping process waits for its table readers.
const READERS_STOP: std::time::Duration = std::time::Duration::from_secs(1);

/// Sets up logging from the configuration (pretty or JSON lines on stderr).
pub fn init_logging(settings: &config::LogSettings) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("NPSFLOW_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&settings.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = match settings.format {
        config::LogFormat::Json => builder.json().try_init(),
        config::LogFormat::Pretty => builder.compact().try_init(),
    };
}
