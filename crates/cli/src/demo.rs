//! `npsflow demo`: the whole pipeline on librdkafka's in-process mock cluster, fed by the
//! traffic generator, with a live table of segment NPS per window on stdout.

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use npsflow_core::Span;
use npsflow_runtime::traffic::Traffic;
use npsflow_runtime::view::Row;
use npsflow_runtime::{wall_now, Config, Process, Role};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use tokio::sync::watch;

/// Options of `npsflow demo`.
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Stop after this long (e.g. 30s, 5m); default: until Ctrl-C.
    #[arg(long)]
    duration: Option<Span>,
    /// Survey responses per second from the generator.
    #[arg(long, default_value_t = 200)]
    rate: u32,
    /// Where to serve /metrics and the API.
    #[arg(long, default_value = "127.0.0.1:9464")]
    http: String,
    /// Seed of the generated traffic.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

pub async fn run(args: DemoArgs, config_path: Option<&Path>) -> anyhow::Result<()> {
    let cluster = MockCluster::new(1).context("starting the embedded broker")?;
    let brokers = cluster.bootstrap_servers();
    let mut env: Vec<(String, String)> = std::env::vars().collect();
    let has_level = env.iter().any(|(k, _)| k == "NPSFLOW__LOG__LEVEL");
    env.push(("NPSFLOW__KAFKA__BROKERS".into(), brokers.clone()));
    env.push(("NPSFLOW__HTTP__LISTEN".into(), args.http.clone()));
    env.push(("NPSFLOW__TOPICS__PARTITIONS".into(), "3".into()));
    if !has_level {
        env.push(("NPSFLOW__LOG__LEVEL".into(), "warn".into()));
    }
    let config = Arc::new(Config::load(config_path, env)?);
    npsflow_runtime::init_logging(&config.settings.log);
    for topic in npsflow_runtime::topics::planned(&config.settings) {
        cluster
            .create_topic(&topic.name, topic.partitions, 1)
            .with_context(|| format!("creating {} on the embedded broker", topic.name))?;
    }

    let roles = Role::ALL;
    let process = Process::new(&config, &roles);
    let (listener, address) = npsflow_runtime::http::bind(&args.http)
        .await
        .with_context(|| format!("listening on {}", args.http))?;
    println!("npsflow demo: embedded broker at {brokers}");
    println!("  metrics  http://{address}/metrics");
    println!("  segments http://{address}/v1/segments?window=1h");

    let (stop, stopped) = watch::channel(false);
    let mut signal = crate::shutdown_signal();
    let duration = args
        .duration
        .map(|d| Duration::from_millis(d.millis() as u64));
    tokio::spawn(async move {
        let timer = async {
            match duration {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = signal.wait_for(|s| *s) => {},
            _ = timer => {},
        }
        let _ = stop.send(true);
    });

    let producer: FutureProducer = npsflow_runtime::kafka::producer_config(
        &config.settings.kafka,
        "npsflow-demo-traffic",
        config.settings.topics.max_message_bytes as usize,
    )
    .create()?;
    let generator = tokio::spawn(generate(
        producer,
        config.settings.topics.responses.clone(),
        args.rate,
        args.seed,
        stopped.clone(),
    ));
    let table = tokio::spawn(print_table(process.clone(), stopped.clone()));
    npsflow_runtime::run(config, &roles, process.clone(), listener, stopped).await?;
    let sent = generator.await.unwrap_or(0);
    table.abort();
    print!("{}", render(&process, wall_now()));
    println!("demo finished: {sent} messages generated");
    drop(cluster);
    Ok(())
}

async fn generate(
    producer: FutureProducer,
    topic: String,
    rate: u32,
    seed: u64,
    mut stop: watch::Receiver<bool>,
) -> u64 {
    let mut traffic = Traffic::new(seed);
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let per_tick = (rate / 10).max(1);
    let mut sent = 0;
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            _ = tick.tick() => {},
        }
        for _ in 0..per_tick {
            let message = traffic.next_message(wall_now());
            let mut record = FutureRecord::to(&topic).payload(&message.payload);
            if let Some(key) = &message.key {
                record = record.key(key);
            }
            if producer.send(record, Timeout::Never).await.is_ok() {
                sent += 1;
            }
        }
    }
    sent
}

async fn print_table(process: Process, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let terminal = std::io::stdout().is_terminal();
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            _ = tick.tick() => {},
        }
        let text = render(&process, wall_now());
        let mut out = std::io::stdout().lock();
        if terminal {
            let _ = write!(out, "\x1b[2J\x1b[H");
        }
        let _ = write!(out, "{text}");
        let _ = out.flush();
    }
}

/// The live table: NPS ± margin (responses) per segment and window, then the counters.
pub fn render(process: &Process, now: npsflow_core::Timestamp) -> String {
    let mut text = String::new();
    let rows: Vec<Row> = process
        .view
        .as_ref()
        .map(|v| v.read().unwrap_or_else(|e| e.into_inner()).rows(now))
        .unwrap_or_default();
    let mut windows: Vec<String> = Vec::new();
    for row in &rows {
        if !windows.contains(&row.window) {
            windows.push(row.window.clone());
        }
    }
    text.push_str(&format!("{:<24}", "segment"));
    for window in &windows {
        text.push_str(&format!("{:>26}", format!("{window}: NPS ±95% (n)")));
    }
    text.push('\n');
    let mut segments: Vec<&str> = rows
        .iter()
        .map(|r| r.segment.as_str())
        .filter(|s| !s.contains(','))
        .collect();
    segments.dedup();
    for segment in segments {
        text.push_str(&format!("{segment:<24}"));
        for window in &windows {
            let cell = rows
                .iter()
                .find(|r| r.segment == segment && &r.window == window)
                .map(|r| match (r.summary.nps, r.summary.ci95) {
                    (Some(nps), Some(ci)) => {
                        format!("{nps:>6.1} ±{ci:>5.1} ({})", r.summary.tally.responses())
                    }
                    _ => "-".to_owned(),
                })
                .unwrap_or_else(|| "-".to_owned());
            text.push_str(&format!("{cell:>26}"));
        }
        text.push('\n');
    }
    let m = &process.metrics;
    let outcome = |o: &str| m.outcome_count(o);
    let alerts = m.alert_count();
    let dead_letters = outcome("invalid") + outcome("too_old") + outcome("future");
    text.push_str(&format!(
        "\nevents: {} accepted, {} duplicate, {} invalid, {} too old, {} future | detractor alerts: {alerts} | dead letters: {dead_letters}\n",
        outcome("accepted"),
        outcome("duplicate"),
        outcome("invalid"),
        outcome("too_old"),
        outcome("future"),
    ));
    text
}
