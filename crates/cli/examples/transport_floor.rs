//! The transport floor for the end-to-end benchmark (`scripts/bench.sh`): a bare rdkafka
//! consumer that reads every message of a topic from the earliest offset and does nothing
//! with them, so its CPU time is what consuming alone costs on the same broker and data.
//!   cargo run --release --example transport_floor -- BROKERS TOPIC COUNT

use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: transport_floor BROKERS TOPIC COUNT";
    let brokers = args.next().ok_or(usage)?;
    let topic = args.next().ok_or(usage)?;
    let count: u64 = args.next().ok_or(usage)?.parse()?;
    let group = format!("npsflow-transport-floor-{}", std::process::id());
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", &group)
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()?;
    consumer.subscribe(&[topic.as_str()])?;
    let mut seen = 0u64;
    let mut bytes = 0usize;
    while seen < count {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(message)) => {
                seen += 1;
                bytes += rdkafka::Message::payload(&message).map_or(0, <[u8]>::len);
            }
            Some(Err(error)) => eprintln!("consume error: {error}"),
            None => {}
        }
    }
    // Its own CPU ticks (user + sys) and peak RSS, read before exiting, for the benchmark.
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    let fields: Vec<&str> = stat.rsplit_once(") ").ok_or("stat")?.1.split(' ').collect();
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    let status = std::fs::read_to_string("/proc/self/status")?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0);
    eprintln!("{seen} messages, {bytes} bytes");
    println!("{ticks} {rss_kib}");
    Ok(())
}
