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

/// One topic npsflow uses: its name, partition count and topic configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedTopic {
    /// Name.
    pub name: String,
    /// Partitions.
    pub partitions: i32,
    /// Topic-level configuration (`cleanup.policy`, `max.message.bytes`).
    pub config: Vec<(&'static str, String)>,
}

/// Every topic npsflow uses. The input, repartition, deltas and state topics get
/// `topics.partitions` (they are what scales; state is co-partitioned with deltas), and so
/// do the followup role's internal topic and the cases, escalations and follow-up state topics
/// co-partitioned with it, and the invitations input; the others get a third of that, at
/// least one. Cases, follow-up state and the segment and account views are compacted. The input accepts messages up to
/// `topics.max_message_bytes`; the topics that carry whole input messages (repartition and
/// dead letters) accept that plus room for npsflow's headers. State is compacted.
pub fn planned(settings: &Settings) -> Vec<PlannedTopic> {
    let t = &settings.topics;
    let small = (t.partitions / 3).max(1);
    let input_limit = t.max_message_bytes.to_string();
    let carried_limit = crate::kafka::max_record_bytes(t.max_message_bytes as usize).to_string();
    let topic = |name: &str, partitions: i32, config: Vec<(&'static str, String)>| PlannedTopic {
        name: name.to_owned(),
        partitions,
        config,
    };
    let compact = ("cleanup.policy", "compact".to_owned());
    vec![
        topic(
            &t.responses,
            t.partitions,
            vec![("max.message.bytes", input_limit.clone())],
        ),
        topic(
            &t.responses_by_id,
            t.partitions,
            vec![("max.message.bytes", carried_limit.clone())],
        ),
        topic(&t.segment_deltas, t.partitions, vec![]),
        topic(
            &t.state,
            t.partitions,
            vec![("cleanup.policy", "compact".to_owned())],
        ),
        topic(&t.followups, small, vec![]),
        topic(
            &t.dead_letters,
            small,
            vec![("max.message.bytes", carried_limit.clone())],
        ),
        topic(
            &t.followup_outcomes,
            small,
            vec![("max.message.bytes", input_limit.clone())],
        ),
        topic(
            &t.followup_events,
            t.partitions,
            vec![("max.message.bytes", carried_limit)],
        ),
        topic(&t.cases, t.partitions, vec![compact.clone()]),
        topic(&t.followup_state, t.partitions, vec![compact.clone()]),
        topic(&t.escalations, t.partitions, vec![]),
        topic(
            &t.invitations,
            t.partitions,
            vec![("max.message.bytes", input_limit)],
        ),
        topic(&t.segment_view, small, vec![compact.clone()]),
        topic(&t.account_view, small, vec![compact]),
    ]
}

/// Creates every planned topic that does not exist yet.
pub async fn create(settings: &Settings) -> Result<Vec<TopicResult>, RuntimeError> {
    let admin: AdminClient<DefaultClientContext> =
        client_config(&settings.kafka, "npsflow-admin").create()?;
    let plan = planned(settings);
    let new_topics: Vec<NewTopic<'_>> = plan
        .iter()
        .map(|planned| {
            planned.config.iter().fold(
                NewTopic::new(
                    &planned.name,
                    planned.partitions,
                    TopicReplication::Fixed(settings.topics.replication),
                ),
                |topic, (key, value)| topic.set(key, value),
            )
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
