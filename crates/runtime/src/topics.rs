//! Creating npsflow's topics with the admin API: sensible partition counts, and existing
//! topics left as they are.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;

use crate::config::Settings;
use crate::kafka::client_config;
use crate::RuntimeError;

/// What happened to one topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopicResult {
    /// Made now.
    Created(String),
    /// Was there already.
    Existed(String),
}

/// Every topic npsflow uses, with its partition count: the input, deltas and state topics
/// get `topics.partitions` (they are what scales; state is co-partitioned with deltas), the
/// others a third of that, at least one.
pub fn planned(settings: &Settings) -> Vec<(String, i32)> {
    let t = &settings.topics;
    let small = (t.partitions / 3).max(1);
    vec![
        (t.responses.clone(), t.partitions),
        (t.segment_deltas.clone(), t.partitions),
        (t.state.clone(), t.partitions),
        (t.followups.clone(), small),
        (t.dead_letters.clone(), small),
    ]
}

/// Creates every planned topic that does not exist yet.
pub async fn create(settings: &Settings) -> Result<Vec<TopicResult>, RuntimeError> {
    let admin: AdminClient<DefaultClientContext> =
        client_config(&settings.kafka, "npsflow-admin").create()?;
    let plan = planned(settings);
    let new_topics: Vec<NewTopic<'_>> = plan
        .iter()
        .map(|(name, partitions)| {
            let topic = NewTopic::new(
                name,
                *partitions,
                TopicReplication::Fixed(settings.topics.replication),
            );
            if *name == settings.topics.state {
                topic.set("cleanup.policy", "compact")
            } else {
                topic
            }
        })
        .collect();
    let options = AdminOptions::new()
        .operation_timeout(Some(Duration::from_secs(30)))
        .request_timeout(Some(Duration::from_secs(60)));
    let results = admin.create_topics(&new_topics, &options).await?;
    let mut outcome = Vec::new();
    for result in results {
        match result {
            Ok(name) => outcome.push(TopicResult::Created(name)),
            Err((name, RDKafkaErrorCode::TopicAlreadyExists)) => {
                outcome.push(TopicResult::Existed(name))
            }
            Err((_, code)) => return Err(rdkafka::error::KafkaError::AdminOp(code).into()),
        }
    }
    Ok(outcome)
}
