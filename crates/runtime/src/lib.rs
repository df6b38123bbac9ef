//! npsflow-runtime: the I/O shell around `npsflow-core`. Kafka role loops, configuration,
//! Prometheus metrics, the HTTP API, logging, and the embedded demo broker.
//!
//! - [`config`]: layered settings, checked into the core's types.
//! - [`kafka`]: client configuration, consumer context, reliable delivery.
//! - [`ingest`]: the ingest role.
//! - [`aggregate`]: the aggregate role and the segment view it serves.
//! - [`metrics`]: the Prometheus registry.
//! - [`http`]: `/metrics`, `/healthz`, `/readyz`, `/v1/segments`.
//! - [`health`]: readiness per role.
//! - [`state`]: snapshots on the compacted state topic; restore.
//! - [`traffic`]: realistic survey traffic (demo and load generator).
//! - [`topics`]: topic creation.

pub mod aggregate;
pub mod config;
pub mod health;
pub mod http;
pub mod ingest;
pub mod kafka;
pub mod metrics;
pub mod state;
pub mod topics;
pub mod traffic;

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
    /// State could not be restored or the topics do not fit together.
    #[error("state: {0}")]
    Restore(String),
    /// A role task panicked or was cancelled.
    #[error("role task failed: {0}")]
    Task(String),
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
}

impl Role {
    /// Every role, in pipeline order.
    pub const ALL: [Role; 2] = [Role::Ingest, Role::Aggregate];

    /// The role's name.
    pub fn name(self) -> &'static str {
        match self {
            Role::Ingest => ingest::ROLE,
            Role::Aggregate => aggregate::ROLE,
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
    pub view: Option<Arc<RwLock<aggregate::AggregateView>>>,
}

impl Process {
    /// Shared state for running `roles` with `config`.
    pub fn new(config: &Config, roles: &[Role]) -> Process {
        let metrics = metrics::Metrics::new();
        let topics = &config.settings.topics;
        for topic in [
            &topics.dead_letters,
            &topics.followups,
            &topics.segment_deltas,
            &topics.responses_by_id,
        ] {
            for kind in ["transient", "permanent"] {
                metrics
                    .produce_errors
                    .with_label_values(&[topic.as_str(), kind]);
            }
        }
        for role in roles {
            metrics.stalled_partitions.with_label_values(&[role.name()]);
            metrics.role_up.with_label_values(&[role.name()]).set(1);
        }
        let view = roles.contains(&Role::Aggregate).then(|| {
            let view = Arc::new(RwLock::new(aggregate::AggregateView::new(
                config.windows.clone(),
                config.settings.windows.clock,
            )));
            metrics.register_segments(view.clone());
            view
        });
        Process {
            metrics,
            health: Arc::new(health::Health::new(std::time::Duration::from_millis(
                config.stall_timeout.millis().max(1) as u64,
            ))),
            view,
        }
    }

    /// The HTTP server's state.
    pub fn app_state(&self) -> http::AppState {
        http::AppState {
            metrics: self.metrics.clone(),
            health: self.health.clone(),
            view: self.view.clone(),
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
    for &role in roles {
        let (config, process, stopping) = (config.clone(), process.clone(), stopping.clone());
        tasks.spawn(async move {
            let result = match role {
                Role::Ingest => {
                    ingest::run(config, process.metrics, process.health, stopping).await
                }
                Role::Aggregate => {
                    let view = process
                        .view
                        .clone()
                        .expect("view exists with the aggregate role");
                    aggregate::run(config, process.metrics, process.health, view, stopping).await
                }
            };
            (role, result)
        });
    }
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
            Err(error) => (None, Err(RuntimeError::Task(error.to_string()))),
        };
        let outcome = match outcome {
            Ok(()) if !*stop.borrow() => Err(RuntimeError::Task(format!(
                "the {} role stopped on its own",
                role.map_or("unknown", Role::name)
            ))),
            other => other,
        };
        if let Err(error) = outcome {
            let name = role.map_or("unknown", Role::name);
            tracing::error!(role = name, %error, "role stopped with an error; the process exits");
            if let Some(role) = role {
                process.health.set_failed(role.name());
                process
                    .metrics
                    .role_up
                    .with_label_values(&[role.name()])
                    .set(0);
            }
            let _ = stop.send(true);
            if result.is_ok() {
                result = Err(error);
            }
        }
    }
    http.abort();
    result
}

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
