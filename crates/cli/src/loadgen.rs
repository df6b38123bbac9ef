//! `npsflow loadgen`: realistic, seeded survey traffic to the configured Kafka, at a chosen
//! rate or as fast as possible, with a progress bar; with `--invitations-per-response N`, the
//! survey invitations behind the responses too (to `topics.invitations`); with `--outcomes`,
//! a simulated follow-up team's outcome events for the detractor alerts already on the
//! follow-up topic.

use std::time::{Duration, Instant};

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use npsflow_runtime::traffic::{Input, Traffic};
use npsflow_runtime::{wall_now, Config};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;

/// Options of `npsflow loadgen`.
#[derive(Args, Debug)]
pub struct LoadgenArgs {
    /// Messages to send to the responses topic (invitations, if any, come on top).
    #[arg(long, default_value_t = 10_000)]
    count: u64,
    /// Messages per second; 0 sends as fast as possible.
    #[arg(long, default_value_t = 1_000)]
    rate: u64,
    /// Seed: the same seed sends the same messages.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Share of invalid messages (0..1).
    #[arg(long, default_value_t = 0.02)]
    invalid_share: f64,
    /// Share of duplicate re-sends (0..1).
    #[arg(long, default_value_t = 0.02)]
    duplicate_share: f64,
    /// Also send survey invitations to `topics.invitations`: this many per response on
    /// average (0: none; otherwise at least 1), each response's own and those of the
    /// customers of the same send-out who did not answer, sent a little before the response,
    /// at a response rate that varies by channel and tier. They come on top of `--count`.
    #[arg(long, default_value_t = 0.0)]
    invitations_per_response: f64,
    /// Instead of responses: outcome events for up to `--count` alerts read from the
    /// follow-up topic (from its start), as a seeded team would send them (most in time, some
    /// late, some never), with `occurred_at` planned from each response's `responded_at` and
    /// the configured SLAs.
    #[arg(long)]
    outcomes: bool,
}

/// Reads up to `count` detractor alerts from the start of the follow-up topic and sends the
/// simulated team's outcome events for them.
async fn send_outcomes(args: &LoadgenArgs, config: &Config) -> anyhow::Result<()> {
    use npsflow_runtime::traffic::{FollowupTeam, PlannedKind};
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::{Message, Offset, TopicPartitionList};

    let settings = &config.settings;
    let topic = settings.topics.followups.clone();
    let consumer: BaseConsumer =
        npsflow_runtime::kafka::client_config(&settings.kafka, "npsflow-loadgen")
            .set("group.id", "npsflow-loadgen-outcomes")
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "true")
            .create()?;
    let metadata = consumer.fetch_metadata(Some(&topic), Duration::from_secs(30))?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    anyhow::ensure!(!partitions.is_empty(), "topic {topic} does not exist");
    let mut list = TopicPartitionList::new();
    for p in &partitions {
        list.add_partition_offset(&topic, *p, Offset::Beginning)?;
    }
    consumer.assign(&list)?;
    let mut team = FollowupTeam::new(args.seed);
    let (first, resolve) = (
        config.followup.first_contact_sla.millis(),
        config.followup.resolve_sla.millis(),
    );
    let mut events = Vec::new();
    let (mut alerts, mut at_end) = (0u64, std::collections::BTreeSet::new());
    let deadline = Instant::now() + Duration::from_secs(120);
    while alerts < args.count && at_end.len() < partitions.len() && Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(message)) => {
                let Ok(alert) = npsflow_core::decode_alert(message.payload().unwrap_or_default())
                else {
                    continue;
                };
                alerts += 1;
                let (_, planned) = team.plan(
                    &alert.alert_id,
                    &alert.customer_id,
                    alert.responded_at,
                    first,
                    resolve,
                );
                events.extend(
                    planned
                        .into_iter()
                        .filter(|m| m.kind == PlannedKind::Outcome),
                );
            }
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => {
                at_end.insert(p);
            }
            Some(Err(error)) => tracing::debug!(%error, "reading alerts"),
            None => {}
        }
    }
    let producer: FutureProducer = npsflow_runtime::kafka::producer_config(
        &settings.kafka,
        "npsflow-loadgen",
        settings.topics.max_message_bytes as usize,
    )
    .create()?;
    let outcomes = &settings.topics.followup_outcomes;
    let mut in_flight = Vec::with_capacity(events.len());
    for m in &events {
        let mut record = FutureRecord::to(outcomes).key(&m.key).payload(&m.payload);
        loop {
            match producer.send_result(record) {
                Ok(delivery) => break in_flight.push(delivery),
                Err((_, returned)) => {
                    record = returned;
                    producer.poll(Duration::from_millis(10));
                }
            }
        }
    }
    for delivery in in_flight {
        delivery.await?.map_err(|(error, _)| error)?;
    }
    println!(
        "sent {} outcome events for {alerts} alerts to {outcomes}",
        events.len()
    );
    Ok(())
}

pub async fn run(args: LoadgenArgs, config: &Config) -> anyhow::Result<()> {
    if args.outcomes {
        return send_outcomes(&args, config).await;
    }
    anyhow::ensure!(
        (0.0..=1.0).contains(&args.invalid_share) && (0.0..=1.0).contains(&args.duplicate_share),
        "shares must be between 0 and 1"
    );
    anyhow::ensure!(
        args.invitations_per_response == 0.0
            || (args.invitations_per_response >= 1.0 && args.invitations_per_response.is_finite()),
        "--invitations-per-response must be 0 or at least 1"
    );
    let producer: FutureProducer = npsflow_runtime::kafka::producer_config(
        &config.settings.kafka,
        "npsflow-loadgen",
        config.settings.topics.max_message_bytes as usize,
    )
    .create()?;
    let topic = &config.settings.topics.responses;
    let mut traffic = Traffic::new(args.seed);
    traffic.invalid_share = args.invalid_share;
    traffic.duplicate_share = args.duplicate_share;
    traffic.invitations_per_response = args.invitations_per_response;
    let invitations_topic = &config.settings.topics.invitations;
    let mut invitations = 0u64;
    let bar = ProgressBar::new(args.count);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} {per_sec} eta {eta}")
            .expect("valid template"),
    );
    let started = Instant::now();
    let mut in_flight = Vec::new();
    for sent in 0..args.count {
        if args.rate > 0 {
            let due = started + Duration::from_secs_f64(sent as f64 / args.rate as f64);
            tokio::time::sleep_until(due.into()).await;
        }
        // The response last, after its invitations (if any).
        for generated in traffic.next_messages(wall_now()) {
            let message = &generated.message;
            let to = match generated.input {
                Input::Response => topic,
                Input::Invitation => {
                    invitations += 1;
                    invitations_topic
                }
            };
            let mut record = FutureRecord::to(to).payload(&message.payload);
            if let Some(key) = &message.key {
                record = record.key(key);
            }
            loop {
                match producer.send_result(record) {
                    Ok(delivery) => {
                        in_flight.push(delivery);
                        break;
                    }
                    Err((_, returned)) => {
                        record = returned;
                        producer.poll(Duration::from_millis(10));
                    }
                }
            }
        }
        if in_flight.len() >= 10_000 {
            for delivery in in_flight.drain(..) {
                delivery.await?.map_err(|(error, _)| error)?;
            }
        }
        bar.inc(1);
    }
    for delivery in in_flight {
        delivery.await?.map_err(|(error, _)| error)?;
    }
    producer.flush(Timeout::After(Duration::from_secs(30)))?;
    bar.finish();
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "sent {} messages to {topic} in {seconds:.1}s ({:.0}/s)",
        args.count,
        args.count as f64 / seconds
    );
    if invitations > 0 {
        println!("sent {invitations} invitations to {invitations_topic}");
    }
    Ok(())
}
