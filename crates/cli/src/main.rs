//! The `npsflow` binary: a thin command line over `npsflow-runtime`.
//!
//! - `npsflow run [--roles ingest,aggregate,followup]`: the pipeline against your Kafka.
//! - `npsflow demo`: everything on an embedded broker with generated traffic.
//! - `npsflow loadgen`: realistic survey traffic to a real broker.
//! - `npsflow topics create`: creates the topics.
//! - `npsflow config check`: prints the effective configuration, secrets redacted.
//! - `npsflow validate FILE.jsonl`: decides each line as the pipeline decodes a message.
//!
//! Exit codes (sysexits): 0 success, 1 a failure at run time (Kafka, I/O, a role that
//! stopped), 64 (`EX_USAGE`) a usage error (clap's included), 78 (`EX_CONFIG`) an invalid
//! configuration. Errors print as one line of readable causes, each cause once.

mod demo;
mod errors;
mod loadgen;
mod validate;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use npsflow_runtime::{Config, Process, Role};
use tokio::sync::watch;

/// mimalloc instead of the system allocator: the pipeline allocates and frees many small
/// buffers per message (decoded fields, records, JSON), where glibc's malloc spent about a
/// third of the ingest role's CPU (see BENCHMARKS.md). Built without transparent huge pages
/// (`no_thp`): with them its peak RSS in the end-to-end bench was ~40 % higher (2 MiB pages
/// half used) for no measurable CPU gain.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Real-time Net Promoter Score on Kafka.
#[derive(Parser)]
#[command(name = "npsflow", version, about)]
struct Cli {
    /// A TOML configuration file; overrides the embedded defaults. `NPSFLOW__SECTION__KEY`
    /// environment variables override both.
    #[arg(long, global = true, env = "NPSFLOW_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs the pipeline roles against the configured Kafka.
    Run {
        /// Roles to run, comma-separated: ingest, aggregate, followup. Default: all.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "ingest,aggregate,followup"
        )]
        roles: Vec<String>,
    },
    /// Runs everything on an embedded Kafka-protocol broker with generated traffic and prints
    /// a live table of segment NPS. No external Kafka needed.
    Demo(demo::DemoArgs),
    /// Sends realistic survey traffic to the configured Kafka.
    Loadgen(loadgen::LoadgenArgs),
    /// Topic administration.
    Topics {
        #[command(subcommand)]
        action: TopicsAction,
    },
    /// Configuration.
    Config {
        #[command(subcommand)]
        action: ConfigAction,
    },
    /// Decides each line of a JSON Lines file (or `-`: standard input) as the pipeline decodes
    /// a message: prints `LINE valid`, or `LINE invalid CODE SENTENCE` (tab-separated). Exit
    /// code 0 if all are valid, 1 if some are not, 64 on a usage error, 66 if the file cannot
    /// be read.
    Validate(validate::ValidateArgs),
}

#[derive(Subcommand)]
enum TopicsAction {
    /// Creates npsflow's topics (existing ones are left alone).
    Create,
}

#[derive(Subcommand)]
enum ConfigAction {
    /// Checks the configuration and prints the effective settings, secrets redacted.
    Check,
}

fn load_config(path: Option<&std::path::Path>) -> anyhow::Result<Config> {
    Ok(Config::load(path, std::env::vars())?)
}

/// A channel that turns true on Ctrl-C or SIGTERM.
pub fn shutdown_signal() -> watch::Receiver<bool> {
    let (sender, receiver) = watch::channel(false);
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler");
            tokio::select! {
                _ = ctrl_c => {},
                _ = term.recv() => {},
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("shutdown requested");
        let _ = sender.send(true);
    });
    receiver
}

fn parse_roles(names: &[String]) -> anyhow::Result<Vec<Role>> {
    let mut roles = Vec::new();
    for name in names {
        match Role::parse(name) {
            Some(role) if !roles.contains(&role) => roles.push(role),
            Some(_) => {}
            None => {
                return Err(errors::UsageError(format!(
                    "unknown role \"{name}\"; roles are ingest, aggregate, followup"
                ))
                .into())
            }
        }
    }
    Ok(roles)
}

fn main() -> std::process::ExitCode {
    npsflow_runtime::metrics::set_build_revision(env!("NPSFLOW_GIT_REVISION"));
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            let _ = error.print();
            // sysexits: a usage error is 64, not clap's 2.
            return std::process::ExitCode::from(errors::clap_exit_code(error.kind()));
        }
    };
    if let Command::Validate(args) = &cli.command {
        return validate::run(args);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(execute(cli));
    // Kafka clients closing against an unreachable broker must not hold the process.
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {}", errors::render(&error));
            std::process::ExitCode::from(errors::exit_code(&error))
        }
    }
}

async fn execute(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Config {
            action: ConfigAction::Check,
        } => {
            // Every problem at once, each naming its key and environment variable and never
            // a value; on success the effective settings, secret properties redacted, with
            // the layers they came from as TOML comments (variable names only).
            let config = load_config(cli.config.as_deref())?;
            let mut variables: Vec<String> = std::env::vars_os()
                .filter_map(|(name, _)| name.into_string().ok())
                .filter(|name| name.starts_with(npsflow_runtime::config::ENV_PREFIX))
                .collect();
            variables.sort();
            println!("# effective configuration: the embedded defaults");
            if let Some(path) = &cli.config {
                println!("# < {}", path.display());
            }
            for name in &variables {
                println!("# < {name}");
            }
            println!(
                "# values of secret kafka.properties are shown as {}",
                npsflow_runtime::config::REDACTED
            );
            print!("{}", config.redacted_toml());
            eprintln!("configuration is valid");
        }
        Command::Run { roles } => {
            let roles = parse_roles(&roles)?;
            let config = Arc::new(load_config(cli.config.as_deref())?);
            npsflow_runtime::init_logging(&config.settings.log);
            let process = Process::new(&config, &roles);
            let (listener, address) = npsflow_runtime::http::bind(&config.settings.http.listen)
                .await
                .with_context(|| format!("listening on {}", config.settings.http.listen))?;
            tracing::info!(%address, roles = ?roles, "npsflow running");
            npsflow_runtime::run(config, &roles, process, listener, shutdown_signal()).await?;
        }
        Command::Demo(args) => demo::run(args, cli.config.as_deref()).await?,
        Command::Loadgen(args) => {
            let config = load_config(cli.config.as_deref())?;
            npsflow_runtime::init_logging(&config.settings.log);
            loadgen::run(args, &config).await?;
        }
        Command::Validate(_) => unreachable!("validate runs before the async runtime starts"),
        Command::Topics {
            action: TopicsAction::Create,
        } => {
            let config = load_config(cli.config.as_deref())?;
            npsflow_runtime::init_logging(&config.settings.log);
            let plan = npsflow_runtime::topics::planned(&config.settings);
            let results = npsflow_runtime::topics::create(&config.settings).await?;
            print!("{}", topics_report(&plan, &results));
        }
    }
    Ok(())
}

/// What `topics create` did, a line per topic: created (with its partitions) or already
/// there (left as it is).
fn topics_report(
    plan: &[npsflow_runtime::topics::PlannedTopic],
    results: &[npsflow_runtime::topics::TopicResult],
) -> String {
    use npsflow_runtime::topics::TopicResult;
    let width = results
        .iter()
        .map(|r| match r {
            TopicResult::Created(name) | TopicResult::Existed(name) => name.len(),
        })
        .max()
        .unwrap_or(0);
    let mut text = String::new();
    for result in results {
        let line = match result {
            TopicResult::Created(name) => {
                let partitions = plan
                    .iter()
                    .find(|p| &p.name == name)
                    .map_or(String::new(), |p| {
                        format!(
                            ", {} partition{}",
                            p.partitions,
                            if p.partitions == 1 { "" } else { "s" }
                        )
                    });
                format!("{name:<width$}  created{partitions}")
            }
            TopicResult::Existed(name) => {
                format!("{name:<width$}  already exists, left as it is")
            }
        };
        text.push_str(&line);
        text.push('\n');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use npsflow_runtime::topics::{PlannedTopic, TopicResult};

    #[test]
    fn topics_create_prints_a_line_per_topic() {
        let plan = vec![
            PlannedTopic {
                name: "survey.responses".into(),
                partitions: 6,
                config: vec![],
            },
            PlannedTopic {
                name: "npsflow.dlq".into(),
                partitions: 1,
                config: vec![],
            },
        ];
        let results = vec![
            TopicResult::Created("survey.responses".into()),
            TopicResult::Created("npsflow.dlq".into()),
            TopicResult::Existed("npsflow.state".into()),
        ];
        assert_eq!(
            topics_report(&plan, &results),
            "survey.responses  created, 6 partitions\n\
             npsflow.dlq       created, 1 partition\n\
             npsflow.state     already exists, left as it is\n"
        );
    }

    #[test]
    fn an_unknown_role_is_a_usage_error() {
        let error = parse_roles(&["ingest".into(), "aggregator".into()]).expect_err("unknown");
        assert_eq!(errors::exit_code(&error), 64);
        assert_eq!(
            parse_roles(&["ingest".into(), "ingest".into()]).expect("known"),
            vec![Role::Ingest]
        );
    }
}
