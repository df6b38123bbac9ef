//! `npsflow demo`: the whole pipeline on librdkafka's in-process mock cluster, fed by the
//! traffic generator, with a live table of segment NPS per window on stdout; a simulated
//! follow-up team answers the detractor alerts with outcome events under short SLAs (20 s to
//! first contact, 50 s to resolve, unless configured), so cases open, close, escalate and
//! recover within a minute, and the table shows the loop.

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
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
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
    for (name, value) in [
        ("NPSFLOW__FOLLOWUP__FIRST_CONTACT_SLA", "20s"),
        ("NPSFLOW__FOLLOWUP__RESOLVE_SLA", "50s"),
    ] {
        if !env.iter().any(|(k, _)| k == name) {
            env.push((name.into(), value.into()));
        }
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
    println!("  cases    http://{address}/v1/cases?overdue=true");

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
        config.clone(),
        args.rate,
        args.seed,
        stopped.clone(),
    ));
    let team = tokio::spawn(follow_up(config.clone(), args.seed, stopped.clone()));
    let table = tokio::spawn(print_table(process.clone(), stopped.clone()));
    // The last table stays on screen; the summary below goes after it.
    npsflow_runtime::run(config, &roles, process.clone(), listener, stopped).await?;
    let sent = generator.await.unwrap_or(0);
    team.abort();
    let _ = table.await;
    println!("demo finished: {sent} messages generated");
    drop(cluster);
    Ok(())
}

/// Sends the generated traffic: first a history (responses with event times spread over the
/// last two shortest windows, as far back as the windows admit, so the shortest window has a
/// busy window before it to compare with), then `rate` responses per second; each response
/// with about three invitations to `topics.invitations` before it. Returns the messages sent.
async fn generate(
    producer: FutureProducer,
    config: Arc<Config>,
    rate: u32,
    seed: u64,
    mut stop: watch::Receiver<bool>,
) -> u64 {
    use npsflow_runtime::traffic::{history_from, Generated, Input};
    let topics = &config.settings.topics;
    let mut traffic = Traffic::new(seed);
    traffic.invitations_per_response = 3.0;
    let now = wall_now();
    let shortest = config
        .windows
        .windows()
        .iter()
        .map(|w| w.length().millis())
        .min();
    let from = history_from(&config.windows, now, Span(2 * shortest.unwrap_or(0)));
    let mut pending: std::collections::VecDeque<Generated> =
        traffic.backfill(history_responses(rate), from, now).into();
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let started = std::time::Instant::now();
    let (mut responses, mut sent) = (0, 0);
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            _ = tick.tick() => {},
        }
        // Paced by the clock, not by ticks: whatever is due by now, so N/s for T s sends
        // about N*T responses however late a tick fires. Records are queued without waiting
        // for each delivery (the producer retries; the demo does not stop for one record).
        let due = messages_due(rate, started.elapsed());
        loop {
            if pending.is_empty() {
                if responses >= due {
                    break;
                }
                pending.extend(traffic.next_messages(wall_now()));
                responses += 1;
            }
            let Some(next) = pending.front() else { break };
            let topic = match next.input {
                Input::Response => &topics.responses,
                Input::Invitation => &topics.invitations,
            };
            let mut record = FutureRecord::to(topic).payload(&next.message.payload);
            if let Some(key) = &next.message.key {
                record = record.key(key);
            }
            match producer.send_result(record) {
                Ok(_delivery) => {
                    sent += 1;
                    pending.pop_front();
                }
                Err(_) => {
                    // The queue is full: try the rest at the next tick.
                    break;
                }
            }
        }
    }
    let _ = producer.flush(Timeout::After(Duration::from_secs(5)));
    sent
}

/// How many responses the demo's history holds: 30 seconds' worth at `rate`, at least 2,000
/// (so the busiest segments have 30 in the window before the shortest one) and at most 20,000.
pub fn history_responses(rate: u32) -> u64 {
    (u64::from(rate) * 30).clamp(2_000, 20_000)
}

/// How many messages `rate` per second calls for after `elapsed`: rate × elapsed, rounded
/// down.
pub fn messages_due(rate: u32, elapsed: Duration) -> u64 {
    (u128::from(rate) * elapsed.as_millis() / 1000) as u64
}

/// The simulated follow-up team: reads the detractor alerts and sends what the team (and, now
/// and then, the customer) does, each message when its time comes.
async fn follow_up(config: Arc<Config>, seed: u64, mut stop: watch::Receiver<bool>) {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;

    use npsflow_runtime::traffic::{FollowupTeam, PlannedKind};
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use rdkafka::Message;

    let settings = &config.settings;
    let consumer: StreamConsumer =
        match npsflow_runtime::kafka::client_config(&settings.kafka, "npsflow-demo-team")
            .set("group.id", "npsflow-demo-team")
            .set("auto.offset.reset", "earliest")
            .create()
        {
            Ok(consumer) => consumer,
            Err(error) => return eprintln!("demo follow-up team: {error}"),
        };
    if let Err(error) = consumer.subscribe(&[&settings.topics.followups]) {
        return eprintln!("demo follow-up team: {error}");
    }
    let producer: FutureProducer = match npsflow_runtime::kafka::producer_config(
        &settings.kafka,
        "npsflow-demo-team",
        settings.topics.max_message_bytes as usize,
    )
    .create()
    {
        Ok(producer) => producer,
        Err(error) => return eprintln!("demo follow-up team: {error}"),
    };
    let mut team = FollowupTeam::new(seed);
    let (first, resolve) = (
        config.followup.first_contact_sla.millis(),
        config.followup.resolve_sla.millis(),
    );
    // (when, order sent, topic, key, payload), soonest first.
    type Due = Reverse<(i64, u64, PlannedKind, String, Vec<u8>)>;
    let mut due: BinaryHeap<Due> = BinaryHeap::new();
    let mut order = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        let received = tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            _ = tick.tick() => None,
            received = consumer.recv() => Some(received.map(|m| m.detach())),
        };
        match received {
            None => {
                let now = wall_now().millis();
                // Queued, not awaited one by one (a delivery takes at least linger.ms, and
                // the history's cases come all at once); a full queue waits for the next tick.
                while due.peek().is_some_and(|Reverse(next)| next.0 <= now) {
                    let Some(Reverse((at, order, kind, key, payload))) = due.pop() else {
                        break;
                    };
                    let topic = match kind {
                        PlannedKind::Outcome => &settings.topics.followup_outcomes,
                        PlannedKind::Response => &settings.topics.responses,
                    };
                    let record = FutureRecord::to(topic).key(&key).payload(&payload);
                    if producer.send_result(record).is_err() {
                        due.push(Reverse((at, order, kind, key, payload)));
                        break;
                    }
                }
            }
            Some(Ok(message)) => {
                let Ok(alert) = npsflow_core::decode_alert(message.payload().unwrap_or_default())
                else {
                    continue;
                };
                let (_, planned) = team.plan(
                    &alert.alert_id,
                    &alert.customer_id,
                    alert.responded_at,
                    first,
                    resolve,
                );
                for message in planned {
                    order += 1;
                    due.push(Reverse((
                        message.at.millis(),
                        order,
                        message.kind,
                        message.key,
                        message.payload,
                    )));
                }
            }
            Some(Err(_)) => {}
        }
    }
}

/// Prints the table every second, and once more when the demo stops. On a terminal each
/// table replaces the one before in place (the lines above it, the URLs, stay); elsewhere
/// tables follow each other.
async fn print_table(process: Process, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let terminal = std::io::stdout().is_terminal();
    let colour = use_colour(terminal, std::env::var_os("NO_COLOR"));
    let mut previous_lines = 0;
    loop {
        let stopping = tokio::select! {
            _ = stop.wait_for(|s| *s) => true,
            _ = tick.tick() => false,
        };
        let text = render_table(&process, wall_now(), colour);
        let mut out = std::io::stdout().lock();
        if terminal {
            let _ = write!(out, "{}", redraw_prefix(previous_lines));
        }
        let _ = write!(out, "{text}");
        let _ = out.flush();
        previous_lines = text.lines().count();
        if stopping {
            break;
        }
    }
}

/// Whether to colour the NPS bands: only on a terminal, and not when `NO_COLOR` is set to
/// anything but the empty string (no-color.org).
pub fn use_colour(terminal: bool, no_color: Option<std::ffi::OsString>) -> bool {
    terminal && no_color.is_none_or(|value| value.is_empty())
}

/// What goes before a table on a terminal: up over the `previous_lines` of the last table
/// and clear from there down, so the table replaces it and the lines above it stay.
pub fn redraw_prefix(previous_lines: usize) -> String {
    if previous_lines == 0 {
        String::new()
    } else {
        format!("\x1b[{previous_lines}F\x1b[J")
    }
}

/// The live table: NPS ± margin (responses) per segment and window, worst first (by the
/// first window's NPS; `all` on top), combined segments included, then the closed loop and
/// the counters. With `colour`, each NPS is coloured by its band.
fn render_table(process: &Process, now: npsflow_core::Timestamp, colour: bool) -> String {
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
    let mut segments: Vec<&str> = Vec::new();
    for row in &rows {
        if !segments.contains(&row.segment.as_str()) {
            segments.push(&row.segment);
        }
    }
    let first_nps = |segment: &str| {
        rows.iter()
            .find(|r| r.segment == segment && windows.first() == Some(&r.window))
            .and_then(|r| r.summary.tally.nps())
    };
    let keyed: Vec<(&str, Option<f64>)> = segments.iter().map(|s| (*s, first_nps(s))).collect();
    let segments = worst_first(keyed);
    if segments.is_empty() {
        text.push_str("waiting for data: no response counted yet\n");
    }
    let width = segments.iter().map(|s| s.len()).max().unwrap_or(0).max(24);
    for segment in segments {
        text.push_str(&format!("{segment:<width$}"));
        for window in &windows {
            let cell = rows
                .iter()
                .find(|r| r.segment == segment && &r.window == window)
                .map(|r| match (r.summary.tally.nps(), r.summary.tally.ci95()) {
                    (Some(nps), Some(ci)) => (
                        format!("{nps:>6.1} ±{ci:>5.1} ({})", r.summary.tally.responses()),
                        Some(npsflow_core::Band::of(nps)),
                    ),
                    _ => ("-".to_owned(), None),
                })
                .unwrap_or_else(|| ("-".to_owned(), None));
            let (cell, band) = cell;
            let padded = format!("{cell:>26}");
            match band.filter(|_| colour) {
                Some(band) => text.push_str(&format!("{}{padded}\x1b[0m", band_colour(band))),
                None => text.push_str(&padded),
            }
        }
        text.push('\n');
    }
    let m = &process.metrics;
    let outcome = |o: &str| m.outcome_count(o);
    let alerts = m.alert_count();
    let dead_letters = outcome("invalid") + outcome("too_old") + outcome("future");
    text.push_str(&render_cases(process, now));
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

/// The ANSI colour of an NPS band: red below 30, yellow to 50, green from 50.
fn band_colour(band: npsflow_core::Band) -> &'static str {
    match band {
        npsflow_core::Band::Low => "\x1b[31m",
        npsflow_core::Band::Medium => "\x1b[33m",
        npsflow_core::Band::High => "\x1b[32m",
    }
}

/// Segments in table order: `all` first, then the lowest NPS first; segments without an
/// NPS yet last, each group in name order.
pub fn worst_first(mut segments: Vec<(&str, Option<f64>)>) -> Vec<&str> {
    segments.sort_by(|(a, x), (b, y)| {
        let rank = |name: &str, nps: &Option<f64>| match (name, nps) {
            ("all", _) => 0,
            (_, Some(_)) => 1,
            (_, None) => 2,
        };
        rank(a, x)
            .cmp(&rank(b, y))
            .then(x.unwrap_or(0.0).total_cmp(&y.unwrap_or(0.0)))
            .then(a.cmp(b))
    });
    segments.into_iter().map(|(name, _)| name).collect()
}

/// The closed loop: cases by state and escalation level, SLA compliance, recovery.
fn render_cases(process: &Process, now: npsflow_core::Timestamp) -> String {
    use npsflow_core::CaseState;
    let Some(directory) = &process.directory else {
        return String::new();
    };
    let (cases, _) = directory.find(|_| true, usize::MAX);
    let cases: Vec<npsflow_core::FollowupCase> = cases.iter().filter_map(|c| c.case()).collect();
    if cases.is_empty() {
        return String::new();
    }
    let open = cases
        .iter()
        .filter(|c| c.state != CaseState::Closed)
        .count();
    let overdue = cases.iter().filter(|c| c.overdue(now)).count();
    let escalations: usize = cases
        .iter()
        .map(|c| usize::from(c.escalation_level.min(2)))
        .sum();
    let recovered = cases.iter().filter(|c| c.recovered == Some(true)).count();
    let mut text = format!(
        "\nclosed loop: {open} open, {overdue} overdue, {escalations} escalations, {recovered} recovered\n"
    );
    text.push_str("cases by state (escalation level 0/1/2):\n");
    for state in CaseState::ALL {
        let mut levels = [0usize; 3];
        for case in cases.iter().filter(|c| c.state == *state) {
            levels[usize::from(case.escalation_level.min(2))] += 1;
        }
        let overdue = cases
            .iter()
            .filter(|c| c.state == *state && c.overdue(now))
            .count();
        text.push_str(&format!(
            "  {:<13}{:>6}  ({} / {} / {}){}\n",
            state.as_str(),
            levels.iter().sum::<usize>(),
            levels[0],
            levels[1],
            levels[2],
            if overdue > 0 {
                format!("  {overdue} overdue")
            } else {
                String::new()
            },
        ));
    }
    let closed: Vec<_> = cases
        .iter()
        .filter(|c| c.state == CaseState::Closed)
        .collect();
    let in_time = closed
        .iter()
        .filter(|c| c.resolved_at.is_some_and(|at| at <= c.resolve_deadline))
        .count();
    let contacted: Vec<_> = cases
        .iter()
        .filter(|c| c.first_contact_at.is_some())
        .collect();
    let contacted_in_time = contacted
        .iter()
        .filter(|c| {
            c.first_contact_at
                .is_some_and(|at| at <= c.first_contact_deadline)
        })
        .count();
    let recovered = cases.iter().filter(|c| c.recovered == Some(true)).count();
    let not_recovered = cases.iter().filter(|c| c.recovered == Some(false)).count();
    text.push_str(&format!(
        "  first contact in SLA {contacted_in_time}/{} | resolved in SLA {in_time}/{} closed | recovered {recovered}, not {not_recovered}\n",
        contacted.len(),
        closed.len(),
    ));
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pace_is_rate_times_elapsed() {
        assert_eq!(messages_due(1000, Duration::from_secs(10)), 10_000);
        assert_eq!(messages_due(5, Duration::from_secs(5)), 25);
        assert_eq!(messages_due(5, Duration::from_millis(199)), 0);
        assert_eq!(messages_due(5, Duration::from_millis(200)), 1);
        assert_eq!(messages_due(200, Duration::from_millis(1_234)), 246);
        assert_eq!(messages_due(0, Duration::from_secs(60)), 0);
    }

    #[test]
    fn the_history_is_half_a_minute_of_traffic_within_bounds() {
        assert_eq!(history_responses(200), 6_000);
        assert_eq!(history_responses(5), 2_000);
        assert_eq!(history_responses(100_000), 20_000);
    }

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(use_colour(true, None));
        assert!(use_colour(true, Some("".into())));
        assert!(!use_colour(true, Some("1".into())));
        assert!(!use_colour(false, None));
    }

    #[test]
    fn a_redraw_moves_up_over_the_last_table_only() {
        assert_eq!(redraw_prefix(0), "");
        assert_eq!(redraw_prefix(12), "\x1b[12F\x1b[J");
    }

    #[test]
    fn segments_are_listed_worst_first_with_all_on_top() {
        let segments = vec![
            ("region=east", Some(40.0)),
            ("all", Some(20.0)),
            ("product=app", None),
            ("region=east,product=app", Some(-10.0)),
            ("region=west", Some(5.0)),
        ];
        assert_eq!(
            worst_first(segments),
            vec![
                "all",
                "region=east,product=app",
                "region=west",
                "region=east",
                "product=app"
            ]
        );
    }
}
