//! The ingest role, in two steps on one consumer group:
//!
//! 1. Repartition: messages from `survey.responses` (and the optional `survey.invitations`)
//!    are validated; invalid ones go to the dead-letter topic byte-for-byte, valid ones are
//!    forwarded in an envelope ([`crate::envelope`]) to the internal topic
//!    `npsflow.responses-by-id`, on the partition of their `response_id` (`invitation_id`)
//!    (bundled: one record per partition and batch, see [`crate::bundle`]). So every copy of
//!    a response, whatever key or partition it was sent with, lands on one partition of that
//!    topic.
//! 2. Decide: responses from the repartition topic get their outcome from the core
//!    (duplicate, too old, future, accepted), detractors get an alert, and accepted responses
//!    become segment deltas (each response named by its position in the repartition
//!    partition) and a `responded` notice for the followup role (bundled too). Invitations
//!    are decided the same way (their own duplicate memory) and join the deltas of the
//!    segments they carry. A response with an `account_id` also goes into its account's
//!    delta (keyed `account/<account_id>` on the deltas topic). Dead letters are rebuilt exactly as the message was received.
//!
//! [`IngestRole`] is the state machine (the core's `Ingest` and the records each message
//! causes); the engine ([`crate::engine`]) delivers them and commits. A repartition-topic
//! partition's duplicate memory is read back from the messages just before the group's
//! committed offset when it is assigned.

use npsflow_core::intake::invitation_key;
use npsflow_core::{repartition_key, ClockKind, Ingest, IngestSpec, Route, Source, Timestamp};
use rdkafka::message::OwnedHeaders;
use rdkafka::Message;
use tokio::sync::watch;

use crate::bundle::{self, Bundler};
use crate::config::{self, Config, TopicSettings};
use crate::engine::{Binding, Engine, RoleMachine, TopicPartition};
use crate::envelope::{source_headers, Received};
use crate::kafka::Outgoing;
use crate::metrics::{events, Metrics};
use crate::state::{StateRead, StoredRecord};
use crate::RuntimeError;

/// The role's name in logs, metrics and health.
pub const ROLE: &str = "ingest";

/// The core's ingest spec from the configuration.
pub fn spec(config: &Config) -> IngestSpec {
    IngestSpec {
        windows: config.windows.clone(),
        segments: config.segments.clone(),
        routing: config.routing.clone(),
        dedupe_horizon: config.dedupe_horizon,
        dedupe_capacity: config.settings.dedupe.capacity,
        clock: match config.settings.windows.clock {
            config::ClockKind::Wall => ClockKind::Wall,
            config::ClockKind::EventTime => ClockKind::EventTime,
        },
    }
}

/// How many partitions the internal topics ingest writes to have (it picks their partitions
/// itself, to bundle what goes to each).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Partitions {
    /// `topics.responses_by_id`.
    pub responses_by_id: i32,
    /// `topics.followup_events`.
    pub followup_events: i32,
}

/// The ingest role as a state machine.
pub struct IngestRole {
    ingest: Ingest,
    topics: TopicSettings,
    /// Records read back per assigned repartition-topic partition to rebuild its duplicate
    /// memory.
    restore_messages: i64,
    metrics: Metrics,
    evicted_reported: u64,
    /// Valid messages on their way to the repartition topic.
    forwarded: Bundler,
    /// `responded` notices on their way to the followup role.
    notices: Bundler,
}

impl IngestRole {
    /// The role for `config`, writing to internal topics with `partitions`, reporting to
    /// `metrics`.
    pub fn new(config: &Config, partitions: Partitions, metrics: Metrics) -> IngestRole {
        let topics = &config.settings.topics;
        IngestRole {
            ingest: Ingest::new(spec(config)),
            forwarded: Bundler::new(
                &topics.responses_by_id,
                partitions.responses_by_id,
                bundle::TARGET_BYTES,
            ),
            notices: crate::followup::notice_bundler(topics, partitions.followup_events),
            topics: topics.clone(),
            restore_messages: config.settings.dedupe.restore_messages,
            metrics,
            evicted_reported: 0,
        }
    }

    /// How the role meets Kafka: one group reading the input and the repartition topic.
    pub fn binding(config: &Config) -> Binding {
        let topics = &config.settings.topics;
        Binding {
            role: ROLE,
            group: config.settings.kafka.ingest_group.clone(),
            topics: vec![
                topics.responses.clone(),
                topics.invitations.clone(),
                topics.responses_by_id.clone(),
            ],
            transactional: true,
        }
    }

    /// Step 1 for one input message: forward it to the partition of its `response_id`, or
    /// dead-letter it.
    fn repartition<M: Message>(&mut self, message: &M, out: &mut Vec<Outgoing>) {
        let topics = &self.topics;
        let received = Received::direct(message);
        let payload = message.payload().unwrap_or_default();
        let invitation = message.topic() == topics.invitations;
        let key = if invitation {
            invitation_key(payload, topics.max_message_bytes as usize)
        } else {
            repartition_key(payload, topics.max_message_bytes as usize)
        };
        match key {
            Ok(id) => {
                self.forwarded
                    .push_keyed(id.as_bytes(), out, |w| received.write_envelope(w));
            }
            Err(reason) => {
                let code = reason.code();
                if invitation {
                    events::InvitationDecided { outcome: "invalid" }.emit(&self.metrics);
                } else {
                    events::ResponseDecided { outcome: "invalid" }.emit(&self.metrics);
                }
                events::DeadLettered { reason: code }.emit(&self.metrics);
                out.push(received.dead_letter(&topics.dead_letters, code, &reason.to_string()));
            }
        }
    }

    /// Step 2 for one record of the repartition topic: each response in it, in order.
    fn decide<M: Message>(&mut self, message: &M, now: Timestamp, out: &mut Vec<Outgoing>) {
        let payload = message.payload().unwrap_or_default();
        let Some(items) = bundle::items(payload) else {
            return events::UnreadableRecord {
                topic: message.topic(),
                partition: message.partition(),
                offset: message.offset(),
                error: &"not a bundle of forwarded messages",
            }
            .emit(&self.metrics);
        };
        for (index, item) in items.into_iter().enumerate() {
            // A record written before bundles existed, or not by npsflow, stands for itself.
            let received =
                Received::from_envelope(item).unwrap_or_else(|| Received::direct(message));
            let position = bundle::position(message.offset(), index);
            self.decide_one(message.partition(), position, &received, now, out);
        }
    }

    /// Step 2 for one response: the core decides; dead letter, alert, delta, notice.
    fn decide_one(
        &mut self,
        partition: i32,
        position: i64,
        received: &Received<'_>,
        now: Timestamp,
        out: &mut Vec<Outgoing>,
    ) {
        let metrics = &self.metrics;
        let topics = &self.topics;
        let payload = received.payload.unwrap_or_default();
        let invitation = received.topic == topics.invitations;
        let decision = if invitation {
            self.ingest
                .process_invitation(partition, position, received.source(), payload, now)
        } else {
            self.ingest
                .process_forwarded(partition, position, received.source(), payload, now)
        };
        if decision.is_resent() {
            events::ResentRecognised.emit(metrics);
            return;
        }
        if invitation {
            events::InvitationDecided {
                outcome: decision.outcome,
            }
            .emit(metrics);
        } else {
            events::ResponseDecided {
                outcome: decision.outcome,
            }
            .emit(metrics);
        }
        if let Some((code, detail)) = &decision.dead_letter {
            events::DeadLettered { reason: code }.emit(metrics);
            out.push(received.dead_letter(&topics.dead_letters, code, detail));
        }
        if let Some(notice) = &decision.responded {
            crate::followup::push_notice(&mut self.notices, notice, out);
        }
        if let (Some(t), false) = (decision.event_time, invitation) {
            events::EventTimeLag {
                seconds: (now.millis() - t.millis()) as f64 / 1000.0,
            }
            .emit(metrics);
        }
        if decision.overflowed_values > 0 {
            events::SegmentValuesOverflowed {
                count: u64::from(decision.overflowed_values),
            }
            .emit(metrics);
        }
        if let Some(alert) = decision.alert {
            events::AlertEmitted {
                severity: alert.severity,
                owner: match alert.route {
                    Route::AccountManager => "account_manager",
                    _ => alert.owner.as_str(),
                },
                route: alert.route.as_str(),
            }
            .emit(metrics);
            out.push(Outgoing::new(
                &topics.followups,
                None,
                Some(alert.customer_id.clone().into_bytes()),
                Some(alert.to_json()),
                Some(source_headers(
                    OwnedHeaders::new(),
                    received.topic,
                    received.partition,
                    received.offset,
                )),
            ));
        }
    }
}

impl RoleMachine for IngestRole {
    fn handle_assigned(&mut self, partitions: &[TopicPartition]) -> Vec<StateRead> {
        if self.restore_messages <= 0 {
            return Vec::new();
        }
        partitions
            .iter()
            .filter(|(topic, _)| *topic == self.topics.responses_by_id)
            .map(|(topic, partition)| StateRead::BeforeCommit {
                topic: topic.clone(),
                partition: *partition,
                count: self.restore_messages,
            })
            .collect()
    }

    fn handle_restored(&mut self, read: &StateRead, records: Vec<StoredRecord>, now: Timestamp) {
        let partition = read.partition();
        self.ingest.forget_partition(partition);
        for record in &records {
            let payload = record.payload.as_deref().unwrap_or_default();
            for item in bundle::items(payload).unwrap_or_default() {
                let (source, bytes) = match Received::from_envelope(item) {
                    Some(original) if original.topic == self.topics.invitations => {
                        let bytes = original.payload.unwrap_or_default();
                        self.ingest
                            .remember_invitation(partition, original.source(), bytes, now);
                        continue;
                    }
                    Some(original) => (original.source(), original.payload.unwrap_or_default()),
                    None => (
                        Source {
                            partition,
                            offset: record.offset,
                        },
                        item,
                    ),
                };
                self.ingest.remember(partition, source, bytes, now);
            }
        }
    }

    fn handle_revoked(&mut self, partitions: &[TopicPartition]) {
        for (topic, partition) in partitions {
            if *topic == self.topics.responses_by_id {
                self.ingest.forget_partition(*partition);
            }
        }
    }

    fn handle_messages<M: Message>(
        &mut self,
        messages: &[M],
        now: Timestamp,
        out: &mut Vec<Outgoing>,
    ) {
        for message in messages {
            if message.topic() == self.topics.responses_by_id {
                self.decide(message, now, out);
            } else {
                self.repartition(message, out);
            }
        }
        self.forwarded.finish(out);
        self.notices.finish(out);
        for delta in self.ingest.take_deltas() {
            out.push(Outgoing::new(
                &self.topics.segment_deltas,
                None,
                Some(delta.segment.clone().into_bytes()),
                Some(delta.to_json()),
                None,
            ));
        }
        for delta in self.ingest.take_account_deltas() {
            out.push(Outgoing::new(
                &self.topics.segment_deltas,
                None,
                Some(npsflow_core::account::account_key(&delta.account).into_bytes()),
                Some(delta.to_json()),
                None,
            ));
        }
        let evicted = self.ingest.dedupe_evicted_early();
        if evicted > self.evicted_reported {
            events::DedupeEvictedEarly {
                count: evicted - self.evicted_reported,
            }
            .emit(&self.metrics);
            self.evicted_reported = evicted;
        }
    }
}

/// Runs the ingest role on `engine` until `shutdown` turns true, once it knows how many
/// partitions its internal topics have.
pub async fn run(engine: Engine, shutdown: watch::Receiver<bool>) -> Result<(), RuntimeError> {
    let kafka = engine.config.settings.kafka.clone();
    let topics = engine.config.settings.topics.clone();
    let (metrics, stop) = (engine.metrics.clone(), shutdown.clone());
    let counts = tokio::task::spawn_blocking(move || {
        crate::state::wait_for_partition_counts(
            &kafka,
            ROLE,
            &[&topics.responses_by_id, &topics.followup_events],
            &metrics,
            &stop,
        )
    })
    .await??;
    let Some(counts) = counts else {
        return Ok(());
    };
    let partitions = Partitions {
        responses_by_id: counts[0],
        followup_events: counts[1],
    };
    let role = IngestRole::new(&engine.config, partitions, engine.metrics.clone());
    let binding = IngestRole::binding(&engine.config);
    engine.drive(role, binding, shutdown).await
}

#[cfg(test)]
mod tests {
    use rdkafka::message::{Headers, OwnedMessage};

    use super::*;

    const NOW: Timestamp = Timestamp(1_750_000_000_000);

    const PARTITIONS: Partitions = Partitions {
        responses_by_id: 3,
        followup_events: 2,
    };

    fn role() -> (IngestRole, TopicSettings) {
        let config = Config::load(None, Vec::<(String, String)>::new()).expect("defaults");
        let topics = config.settings.topics.clone();
        (IngestRole::new(&config, PARTITIONS, Metrics::new()), topics)
    }

    fn message(
        topic: &str,
        partition: i32,
        offset: i64,
        key: &str,
        payload: &[u8],
    ) -> OwnedMessage {
        OwnedMessage::new(
            Some(payload.to_vec()),
            Some(key.as_bytes().to_vec()),
            topic.to_owned(),
            rdkafka::Timestamp::NotAvailable,
            partition,
            offset,
            None,
        )
    }

    fn response(id: &str, score: u8) -> Vec<u8> {
        format!(
            r#"{{"response_id":"{id}","score":{score},"responded_at":"{}","customer_id":"c-{id}"}}"#,
            Timestamp(NOW.millis() - 60_000).to_rfc3339()
        )
        .into_bytes()
    }

    fn topics_of(out: &[Outgoing]) -> Vec<&str> {
        out.iter().map(|r| r.topic.as_str()).collect()
    }

    /// The record `out` has for the repartition topic, as the decide step reads it.
    fn forwarded(out: &[Outgoing], topics: &TopicSettings, offset: i64) -> OwnedMessage {
        let record = out
            .iter()
            .find(|r| r.topic == topics.responses_by_id)
            .expect("a bundle for the repartition topic");
        message(
            &topics.responses_by_id,
            record.partition.expect("a partition"),
            offset,
            "",
            record.payload.as_deref().expect("payload"),
        )
    }

    /// The role on its own, no Kafka: input messages are forwarded to the partition of their
    /// response id (bundled) or dead-lettered byte for byte; forwarded ones are decided (an
    /// alert, a notice and a delta for a new detractor); the same input message forwarded
    /// again is recognised, and the same response re-sent from elsewhere is a duplicate.
    #[test]
    fn forwards_decides_and_recognises_repeats() {
        let (mut role, topics) = role();
        let by_id = topics.responses_by_id.as_str();
        let reads = role.handle_assigned(&[(topics.responses.clone(), 0), (by_id.to_owned(), 0)]);
        assert_eq!(
            reads.len(),
            1,
            "only the repartition topic holds state: {reads:?}"
        );
        role.handle_restored(&reads[0], Vec::new(), NOW);

        let mut out = Vec::new();
        let bad = b"{not json";
        role.handle_messages(
            &[
                message(&topics.responses, 0, 5, "k", &response("r1", 2)),
                message(&topics.responses, 0, 6, "k", bad),
            ],
            NOW,
            &mut out,
        );
        assert_eq!(topics_of(&out), [topics.dead_letters.as_str(), by_id]);
        assert_eq!(
            out[1].partition,
            Some(crate::bundle::partition_for_key(
                b"r1",
                PARTITIONS.responses_by_id
            )),
            "on the partition of the response id"
        );
        assert_eq!(
            out[0].payload.as_deref(),
            Some(&bad[..]),
            "dead letter byte for byte"
        );
        assert_eq!(out[0].key.as_deref(), Some(&b"k"[..]));
        let headers = out[0].headers.as_ref().expect("headers");
        let reason = headers.iter().find(|h| h.key == "npsflow-error");
        assert_eq!(reason.and_then(|h| h.value), Some(&b"not_json"[..]));

        let first = forwarded(&out, &topics, 0);
        let mut decided = Vec::new();
        role.handle_messages(std::slice::from_ref(&first), NOW, &mut decided);
        assert_eq!(
            topics_of(&decided),
            [
                topics.followups.as_str(),
                topics.followup_events.as_str(),
                topics.segment_deltas.as_str()
            ],
            "a new detractor: one alert, the followup role's notice that the customer answered, then its segment delta"
        );
        assert_eq!(
            decided[1].partition,
            Some(crate::bundle::partition_for_key(
                b"c-r1",
                PARTITIONS.followup_events
            )),
            "the notice goes to the customer's partition"
        );
        let items =
            crate::bundle::items(decided[1].payload.as_deref().expect("notice")).expect("a bundle");
        let (kind, json) = items[0].split_first().expect("an item");
        assert_eq!(*kind, b'n');
        let notice: npsflow_core::FollowupNotice = serde_json::from_slice(json).expect("json");
        assert!(matches!(
            notice,
            npsflow_core::FollowupNotice::Responded { score: 2, .. }
        ));

        // The same input message forwarded again (a replay of step 1), and the same response
        // re-sent with another key: neither has any effect.
        let mut again = Vec::new();
        role.handle_messages(
            &[message(
                &topics.responses,
                1,
                9,
                "other",
                &response("r1", 2),
            )],
            NOW,
            &mut again,
        );
        let mut repeats = Vec::new();
        let replayed = forwarded(&out, &topics, 1);
        let resent_elsewhere = forwarded(&again, &topics, 2);
        role.handle_messages(&[replayed, resent_elsewhere], NOW, &mut repeats);
        assert!(repeats.is_empty(), "{:?}", topics_of(&repeats));
        assert_eq!(role.metrics.outcome_count("duplicate"), 1);
        assert_eq!(role.metrics.outcome_count("accepted"), 1);
        assert_eq!(role.metrics.outcome_count("invalid"), 1);
    }

    /// Many responses of one batch share one record per partition, and each is decided on
    /// its own, named in the deltas by its position (record offset, index in the record).
    #[test]
    fn a_bundle_carries_a_batch_and_each_response_keeps_its_position() {
        let (mut role, topics) = role();
        let inputs: Vec<OwnedMessage> = (0..50)
            .map(|i| message(&topics.responses, 0, i, "k", &response(&format!("r{i}"), 9)))
            .collect();
        let mut out = Vec::new();
        role.handle_messages(&inputs, NOW, &mut out);
        assert!(
            out.len() <= PARTITIONS.responses_by_id as usize,
            "{}",
            out.len()
        );
        let records: Vec<OwnedMessage> = out
            .iter()
            .enumerate()
            .map(|(offset, r)| {
                message(
                    &topics.responses_by_id,
                    r.partition.expect("partition"),
                    100 + offset as i64,
                    "",
                    r.payload.as_deref().expect("payload"),
                )
            })
            .collect();
        let mut decided = Vec::new();
        role.handle_messages(&records, NOW, &mut decided);
        assert_eq!(role.metrics.outcome_count("accepted"), 50);
        let all: Vec<npsflow_core::SegmentDelta> = decided
            .iter()
            .filter(|r| r.topic == topics.segment_deltas)
            .map(|r| npsflow_core::SegmentDelta::from_json(r.payload.as_deref().expect("delta")))
            .collect::<Result<_, _>>()
            .expect("deltas");
        let positions: std::collections::BTreeSet<i64> = all
            .iter()
            .filter(|d| d.segment == "all")
            .flat_map(|d| d.responses.iter().map(|r| r.0))
            .collect();
        assert_eq!(
            positions.len(),
            50,
            "every response has a position of its own"
        );
        for record in &records {
            let items = crate::bundle::items(record.payload().expect("payload")).expect("items");
            for index in 0..items.len() {
                let position = crate::bundle::position(record.offset(), index);
                assert!(positions.contains(&position), "{position}");
            }
        }
    }

    /// Duplicate memory read back on assignment: a response decided by the partition's
    /// previous owner is a duplicate here, and its forwarded copy is recognised.
    #[test]
    fn restored_memory_makes_earlier_responses_duplicates() {
        let (mut first, topics) = role();
        let by_id = topics.responses_by_id.as_str();
        let mut out = Vec::new();
        first.handle_messages(
            &[message(&topics.responses, 2, 40, "k", &response("r7", 9))],
            NOW,
            &mut out,
        );
        let earlier = forwarded(&out, &topics, 10);

        let (mut second, _) = role();
        let reads = second.handle_assigned(&[(by_id.to_owned(), earlier.partition())]);
        let stored = StoredRecord {
            offset: 10,
            key: None,
            payload: earlier.payload().map(<[u8]>::to_vec),
        };
        second.handle_restored(&reads[0], vec![stored], NOW);
        let mut resend = Vec::new();
        second.handle_messages(
            &[message(&topics.responses, 0, 3, "x", &response("r7", 9))],
            NOW,
            &mut resend,
        );
        let mut decided = Vec::new();
        second.handle_messages(
            &[earlier, forwarded(&resend, &topics, 11)],
            NOW,
            &mut decided,
        );
        assert!(decided.is_empty(), "{:?}", topics_of(&decided));
        assert_eq!(second.metrics.outcome_count("duplicate"), 1);
        assert_eq!(second.metrics.outcome_count("accepted"), 0);
    }

    /// Invitations take the responses' path: an invalid one is dead-lettered byte for byte
    /// and counted as an invitation; a valid one is forwarded by its id, decided (no alert,
    /// no notice) and joins its segments' deltas; its re-send from elsewhere is a duplicate,
    /// remembered across a restore.
    #[test]
    fn invitations_are_forwarded_decided_and_counted_in_the_deltas() {
        let (mut first_owner, topics) = role();
        let invitation = format!(
            r#"{{"invitation_id":"i1","customer_id":"c1","sent_at":"{}","segments":{{"region":"east"}}}}"#,
            Timestamp(NOW.millis() - 120_000).to_rfc3339()
        );
        let bad = br#"{"invitation_id":"i2","customer_id":"c2"}"#;
        let mut out = Vec::new();
        first_owner.handle_messages(
            &[
                message(&topics.invitations, 0, 1, "c1", invitation.as_bytes()),
                message(&topics.invitations, 0, 2, "c2", bad),
            ],
            NOW,
            &mut out,
        );
        assert_eq!(
            topics_of(&out),
            [
                topics.dead_letters.as_str(),
                topics.responses_by_id.as_str()
            ]
        );
        assert_eq!(out[0].payload.as_deref(), Some(&bad[..]));
        let headers = out[0].headers.as_ref().expect("headers");
        let header = |name: &str| {
            headers
                .iter()
                .find(|h| h.key == name)
                .and_then(|h| h.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
        };
        assert_eq!(header("npsflow-error").as_deref(), Some("missing_field"));
        assert_eq!(
            header("npsflow-source-topic"),
            Some(topics.invitations.clone())
        );
        assert_eq!(
            out[1].partition,
            Some(crate::bundle::partition_for_key(
                b"i1",
                PARTITIONS.responses_by_id
            ))
        );
        let first = forwarded(&out, &topics, 0);
        let mut decided = Vec::new();
        first_owner.handle_messages(std::slice::from_ref(&first), NOW, &mut decided);
        assert!(
            decided.iter().all(|r| r.topic == topics.segment_deltas),
            "{:?}",
            topics_of(&decided)
        );
        let deltas: Vec<npsflow_core::SegmentDelta> = decided
            .iter()
            .map(|r| npsflow_core::SegmentDelta::from_json(r.payload.as_deref().expect("delta")))
            .collect::<Result<_, _>>()
            .expect("deltas");
        let segments: Vec<(&str, usize, usize)> = deltas
            .iter()
            .map(|d| (d.segment.as_str(), d.responses.len(), d.invitations.len()))
            .collect();
        assert_eq!(segments, [("all", 0, 1), ("region=east", 0, 1)]);
        let rendered = first_owner.metrics.render();
        assert!(
            rendered.contains("npsflow_invitations_total{outcome=\"accepted\"} 1"),
            "{rendered}"
        );
        assert!(rendered.contains("npsflow_invitations_total{outcome=\"invalid\"} 1"));
        assert_eq!(
            first_owner.metrics.outcome_count("accepted"),
            0,
            "not a response"
        );

        // A new owner restored from the partition: the same invitation sent again is a duplicate.
        let (mut second, _) = role();
        let reads = second.handle_assigned(&[(topics.responses_by_id.clone(), first.partition())]);
        let stored = StoredRecord {
            offset: 0,
            key: None,
            payload: first.payload().map(<[u8]>::to_vec),
        };
        second.handle_restored(&reads[0], vec![stored], NOW);
        let mut resend = Vec::new();
        second.handle_messages(
            &[message(
                &topics.invitations,
                1,
                7,
                "x",
                invitation.as_bytes(),
            )],
            NOW,
            &mut resend,
        );
        let mut again = Vec::new();
        second.handle_messages(&[forwarded(&resend, &topics, 1)], NOW, &mut again);
        assert!(again.is_empty(), "{:?}", topics_of(&again));
        assert!(second
            .metrics
            .render()
            .contains("npsflow_invitations_total{outcome=\"duplicate\"} 1"));
    }
}
