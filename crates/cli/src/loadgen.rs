//! `npsflow loadgen`: realistic, seeded survey traffic to the configured Kafka, at a chosen
//! rate or as fast as possible, with a progress bar.

use std::time::{Duration, Instant};

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use npsflow_runtime::traffic::Traffic;
use npsflow_runtime::{wall_now, Config};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;

/// Options of `npsflow loadgen`.
#[derive(Args, Debug)]
pub struct LoadgenArgs {
    /// Messages to send.
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
}

pub async fn run(args: LoadgenArgs, config: &Config) -> anyhow::Result<()> {
    anyhow::ensure!(
        (0.0..=1.0).contains(&args.invalid_share) && (0.0..=1.0).contains(&args.duplicate_share),
        "shares must be between 0 and 1"
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
        let message = traffic.next_message(wall_now());
        let mut record = FutureRecord::to(topic).payload(&message.payload);
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
    Ok(())
}
