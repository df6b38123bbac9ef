//! The role engine: one driver owns the Kafka side of every role, and each role is a plain
//! state machine ([`RoleMachine`]) in the quinn-proto style: assignment changes, restored
//! state, messages and timeouts go in with `now`; the records they cause come out; timers are
//! polled. The driver does the rest, once for every role:
//!
//! - batched receive (up to `ingest.batch_max_messages` or `ingest.batch_max_wait`);
//! - assignment changes: revoked partitions are forgotten and their late messages dropped
//!   (their new owner decides them); newly assigned ones are restored (the role names the
//!   state reads, the driver performs them while the consumer stays in its group) before any
//!   of their messages is handled;
//! - delivery with error classification (transient: retried; permanent: the record's
//!   fallback, or the role stops), and the commit point: an input offset is stored only after
//!   everything its batch caused is delivered. At least once, delivery is pipelined: the next
//!   batch is received and decided while the previous one is delivered, and offsets are
//!   stored in batch order. Exactly once, outputs and offsets go in one transaction;
//! - health (progress per partition, restored or not), timers (they fire on the injected
//!   clock even when no message arrives), and graceful shutdown (finish, commit, leave).

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt;
use npsflow_core::Timestamp;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, OwnedMessage};
use rdkafka::producer::Producer;
use rdkafka::Message;
use tokio::sync::watch;

use crate::config::{Config, Guarantee};
use crate::health::Health;
use crate::kafka::{self, AssignmentChange, Outgoing, RoleContext, RoleProducer};
use crate::metrics::{events, Metrics};
use crate::state::{self, StateRead, StoredRecord};
use crate::RuntimeError;

/// A topic and partition.
pub type TopicPartition = (String, i32);

/// A role as a state machine. No Kafka, no clock: the driver calls it with `now`.
pub trait RoleMachine: Send + 'static {
    /// Partitions newly assigned. Returns the state to read before any of their messages is
    /// handled; each read is handed back with [`RoleMachine::handle_restored`].
    fn handle_assigned(&mut self, partitions: &[TopicPartition]) -> Vec<StateRead>;

    /// What a state read found, in offset order (possibly nothing).
    fn handle_restored(&mut self, read: &StateRead, records: Vec<StoredRecord>, now: Timestamp);

    /// Partitions taken away: their state is forgotten.
    fn handle_revoked(&mut self, partitions: &[TopicPartition]);

    /// Messages of assigned, restored partitions, in offset order per partition. The records
    /// they cause go to `out`.
    fn handle_messages<M: Message>(
        &mut self,
        messages: &[M],
        now: Timestamp,
        out: &mut Vec<Outgoing>,
    );

    /// When the role next wants [`RoleMachine::handle_timeout`], if ever.
    fn poll_timeout(&self) -> Option<Timestamp> {
        None
    }

    /// Timers due at `now`; the records they cause go to `out`.
    fn handle_timeout(&mut self, now: Timestamp, out: &mut Vec<Outgoing>) {
        let _ = (now, out);
    }
}

/// Where "now" comes from.
pub trait Clock: Send + Sync {
    /// The current time.
    fn now(&self) -> Timestamp;
}

/// The system's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct WallClock;

impl Clock for WallClock {
    fn now(&self) -> Timestamp {
        crate::wall_now()
    }
}

/// A clock that moves only when told to: time paused for tests. (tokio's paused time does
/// not serve here: rdkafka's stream consumer keeps a 30 s wake-up timer of its own, so a
/// paused runtime jumps ahead whenever the driver waits for the broker.)
#[derive(Debug, Default)]
pub struct ManualClock(std::sync::atomic::AtomicI64);

impl ManualClock {
    /// A clock that reads `start`.
    pub fn new(start: Timestamp) -> ManualClock {
        ManualClock(std::sync::atomic::AtomicI64::new(start.millis()))
    }

    /// Moves the clock to `to`.
    pub fn set(&self, to: Timestamp) {
        self.0
            .store(to.millis(), std::sync::atomic::Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        Timestamp(self.0.load(std::sync::atomic::Ordering::SeqCst))
    }
}

/// What the driver needs besides the role.
#[derive(Clone)]
pub struct Engine {
    /// The configuration.
    pub config: Arc<Config>,
    /// Metrics.
    pub metrics: Metrics,
    /// Health.
    pub health: Arc<Health>,
    /// The clock handed to the role.
    pub clock: Arc<dyn Clock>,
}

/// How a role meets Kafka: its name, group and input topics.
#[derive(Debug, Clone)]
pub struct Binding {
    /// The role's name (logs, metrics, health, client ids).
    pub role: &'static str,
    /// Its consumer group.
    pub group: String,
    /// The topics it reads.
    pub topics: Vec<String>,
    /// Whether it may use transactions (`processing.guarantee = exactly_once`).
    pub transactional: bool,
}

/// The longest a restore may take before the role gives up (and the process exits to be
/// restarted). The consumer stays in its group meanwhile.
pub const RESTORE_LIMIT: Duration = Duration::from_secs(180);

/// How long the driver waits for a first message before it attends to timers, rebalances and
/// shutdown anyway.
const IDLE: Duration = Duration::from_millis(500);

impl Engine {
    /// Runs `role` until `shutdown` turns true: then finishes the batch in flight, commits
    /// and leaves the group. Returns an error when the role cannot go on (a record rejected
    /// for good, a restore that cannot finish, a fenced transactional producer).
    pub async fn drive<R: RoleMachine>(
        &self,
        mut role: R,
        binding: Binding,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), RuntimeError> {
        let name = binding.role;
        let settings = &self.config.settings;
        self.health.register(name);
        self.health.set_restored(name, true);
        let transactional =
            binding.transactional && settings.processing.guarantee == Guarantee::ExactlyOnce;
        let unsettled = Arc::new(kafka::Unsettled::default());
        let context = RoleContext::new(
            name,
            &binding.group,
            self.metrics.clone(),
            self.health.clone(),
            unsettled.clone(),
        );
        let mut consumer_config =
            kafka::consumer_config(&settings.kafka, &binding.group, &format!("npsflow-{name}"));
        let mut producer_config = kafka::producer_config(
            &settings.kafka,
            &format!("npsflow-{name}-producer"),
            settings.topics.max_message_bytes as usize,
        );
        if transactional {
            // Offsets are committed inside each batch's transaction, never by the consumer.
            consumer_config.set("enable.auto.commit", "false");
            producer_config.set("transactional.id", transactional_id(&self.config, name));
        }
        let consumer: StreamConsumer<RoleContext> = consumer_config.create_with_context(context)?;
        let producer = kafka::role_producer(
            producer_config,
            name,
            self.health.clone(),
            self.metrics.clone(),
            unsettled,
        )?;
        let mut committer = if transactional {
            let producer = producer.clone();
            tokio::task::spawn_blocking(move || {
                producer.init_transactions(Duration::from_secs(60))
            })
            .await??;
            Committer::Transactional
        } else {
            Committer::AtLeastOnce { in_flight: None }
        };
        let topics: Vec<&str> = binding.topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topics)?;
        events::RoleStarted {
            role: name,
            topics: &binding.topics,
            group: &binding.group,
        }
        .emit(&self.metrics);

        let max_messages = settings.ingest.batch_max_messages;
        let max_wait = Duration::from_millis(self.config.batch_max_wait.millis() as u64);
        let mut assigned: Vec<TopicPartition> = Vec::new();
        let mut restores = Restores::default();
        loop {
            let idle = self.until_timer(&role).min(IDLE);
            let receiving = Receiving {
                consumer: &consumer,
                role: name,
                metrics: &self.metrics,
                max: max_messages,
                wait: max_wait,
                idle,
            };
            let wake = async {
                tokio::select! {
                    _ = committer.settled() => {}
                    _ = restores.finished() => {}
                }
            };
            let Some(mut batch) = receiving.next(&mut shutdown, wake).await else {
                break;
            };
            let started = Instant::now();
            let changes = consumer.context().take_changes();
            if !changes.is_empty() {
                // Attend to the new assignment with nothing of the old one still in flight.
                committer.drain(&consumer, name, &self.metrics).await?;
                let (new, held) = apply_changes(&mut role, &mut assigned, &mut restores, changes);
                self.start_restore(&mut role, &binding, &consumer, &mut restores, new, held);
            }
            // Messages fetched just before their partition was revoked belong to the new
            // owner, which decides them with that partition's full state.
            batch.retain(|m| {
                assigned
                    .iter()
                    .any(|(t, p)| *p == m.partition() && t == m.topic())
            });
            // Messages of partitions still being restored wait for their state; the others
            // flow. Restores that finished hand their state to the role, then their messages.
            // Held messages (of partitions just restored) come first: they are older.
            let mut held = restores.hold(&mut batch);
            let now = self.clock.now();
            for (done, found) in restores.take_finished() {
                held.extend(
                    self.finish_restore(&mut role, &binding, &consumer, done, found?, now)?,
                );
            }
            self.health.set_restored(name, restores.is_empty());
            let mut records = Vec::new();
            if !held.is_empty() {
                role.handle_messages(&held, now, &mut records);
            }
            if !batch.is_empty() {
                role.handle_messages(&batch, now, &mut records);
            }
            if role.poll_timeout().is_some_and(|due| due <= now) {
                role.handle_timeout(now, &mut records);
            }
            if batch.is_empty() && held.is_empty() && records.is_empty() {
                // Nothing new: the batch in flight reaches its commit point if it is
                // delivered. If it is not (the broker may be down), the driver goes back to
                // receiving, which keeps the consumer's statistics and errors (and so the
                // health) served; `settled` wakes it once the delivery is done.
                committer.store_if_settled(&consumer, name, &self.metrics)?;
                continue;
            }
            let max = kafka::max_record_bytes(settings.topics.max_message_bytes as usize);
            let records = kafka::fit_records(records, max, &self.metrics);
            let offsets = kafka::last_offsets(
                held.iter()
                    .map(kafka::position)
                    .chain(batch.iter().map(kafka::position)),
            );
            committer
                .commit(
                    &consumer,
                    &producer,
                    name,
                    &self.metrics,
                    records,
                    offsets,
                    started,
                )
                .await?;
        }
        events::RoleStopping { role: name }.emit(&self.metrics);
        let drained = committer.drain(&consumer, name, &self.metrics).await;
        kafka::close_consumer(
            consumer,
            name,
            &self.metrics,
            !transactional,
            Duration::from_secs(15),
        )
        .await;
        drained
    }

    /// How long until the role's next timer is due on the clock (zero if it is overdue).
    fn until_timer<R: RoleMachine>(&self, role: &R) -> Duration {
        match role.poll_timeout() {
            None => Duration::MAX,
            Some(due) => Duration::from_millis(
                due.millis()
                    .saturating_sub(self.clock.now().millis())
                    .max(0) as u64,
            ),
        }
    }

    /// Starts reading back the state the role needs for newly assigned `partitions`, on a
    /// blocking thread. They are paused until it is handed to the role; `held` are messages of
    /// them received already (from a restore abandoned because the assignment moved).
    fn start_restore<R: RoleMachine>(
        &self,
        role: &mut R,
        binding: &Binding,
        consumer: &StreamConsumer<RoleContext>,
        restores: &mut Restores,
        partitions: Vec<TopicPartition>,
        held: Vec<OwnedMessage>,
    ) {
        if partitions.is_empty() {
            return;
        }
        let list = partition_list(&partitions);
        let reads = role.handle_assigned(&partitions);
        if reads.is_empty() {
            // Nothing to read: they flow at once (and are not left paused from before).
            if let Err(error) = consumer.resume(&list) {
                tracing::debug!(%error, "resuming partitions that need no restore");
            }
            restores.ready.extend(held);
            return;
        }
        if let Err(error) = consumer.pause(&list) {
            tracing::debug!(%error, "pausing partitions for their restore");
        }
        self.health.set_restored(binding.role, false);
        let kafka = self.config.settings.kafka.clone();
        let group = binding.group.clone();
        let wanted = reads.clone();
        restores.pending.push(Restore {
            partitions,
            reads,
            task: tokio::task::spawn_blocking(move || {
                state::read(&kafka, &group, &wanted, RESTORE_LIMIT)
            }),
            found: None,
            held,
            started: Instant::now(),
        });
    }

    /// Hands a finished restore's state to the role and resumes its partitions; returns the
    /// messages of them received meanwhile, to be handled next.
    fn finish_restore<R: RoleMachine>(
        &self,
        role: &mut R,
        binding: &Binding,
        consumer: &StreamConsumer<RoleContext>,
        done: Restore,
        found: Result<Vec<Vec<StoredRecord>>, RuntimeError>,
        now: Timestamp,
    ) -> Result<Vec<OwnedMessage>, RuntimeError> {
        let found = found?;
        let mut count = 0;
        for (read, records) in done.reads.iter().zip(found) {
            count += records.len();
            role.handle_restored(read, records, now);
        }
        if let Err(error) = consumer.resume(&partition_list(&done.partitions)) {
            tracing::debug!(%error, "resuming after a restore");
        }
        events::Restored {
            role: binding.role,
            partitions: done.reads.len(),
            records: count,
            seconds: done.started.elapsed().as_secs_f64(),
        }
        .emit(&self.metrics);
        Ok(done.held)
    }
}

fn partition_list(partitions: &[TopicPartition]) -> rdkafka::TopicPartitionList {
    let mut list = rdkafka::TopicPartitionList::new();
    for (topic, partition) in partitions {
        list.add_partition(topic, *partition);
    }
    list
}

type Found = Result<Result<Vec<Vec<StoredRecord>>, RuntimeError>, tokio::task::JoinError>;

/// A restore in progress: partitions paused until the role has their state.
struct Restore {
    partitions: Vec<TopicPartition>,
    reads: Vec<StateRead>,
    task: tokio::task::JoinHandle<Result<Vec<Vec<StoredRecord>>, RuntimeError>>,
    /// What the reads found, once [`Restores::finished`] has seen it.
    found: Option<Found>,
    /// Messages of these partitions received meanwhile, in order.
    held: Vec<OwnedMessage>,
    started: Instant,
}

/// Every restore in progress. The partitions they cover wait; the others keep flowing, so a
/// rebalance stalls only the partitions that moved.
#[derive(Default)]
struct Restores {
    pending: Vec<Restore>,
    /// Held messages released without a restore, to be handled next.
    ready: Vec<OwnedMessage>,
}

impl Restores {
    fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Sets aside (copied) the messages of partitions being restored, in order. Returns the
    /// messages held earlier that are free to go now.
    fn hold(&mut self, batch: &mut Vec<BorrowedMessage<'_>>) -> Vec<OwnedMessage> {
        if !self.pending.is_empty() {
            batch.retain(|message| {
                let restore = self.pending.iter_mut().find(|r| {
                    r.partitions
                        .iter()
                        .any(|(t, p)| *p == message.partition() && t == message.topic())
                });
                match restore {
                    Some(restore) => {
                        restore.held.push(message.detach());
                        false
                    }
                    None => true,
                }
            });
        }
        std::mem::take(&mut self.ready)
    }

    /// Partitions revoked: a restore that covered any of them is abandoned. Returns the
    /// partitions it covered that are still assigned, which need a new restore, and the
    /// messages held for them.
    fn revoke(&mut self, revoked: &[TopicPartition]) -> (Vec<TopicPartition>, Vec<OwnedMessage>) {
        let mut again = Vec::new();
        let mut held = Vec::new();
        let (lost, kept): (Vec<Restore>, Vec<Restore>) = std::mem::take(&mut self.pending)
            .into_iter()
            .partition(|r| r.partitions.iter().any(|tp| revoked.contains(tp)));
        self.pending = kept;
        for restore in lost {
            restore.task.abort();
            again.extend(
                restore
                    .partitions
                    .into_iter()
                    .filter(|tp| !revoked.contains(tp)),
            );
            held.extend(restore.held.into_iter().filter(|m| {
                !revoked
                    .iter()
                    .any(|(t, p)| *p == m.partition() && t == m.topic())
            }));
        }
        (again, held)
    }

    /// Resolves once some restore has finished; never if none is in progress. Cancel-safe:
    /// the result is kept for [`Restores::take_finished`].
    async fn finished(&mut self) {
        if self.pending.iter().any(|r| r.found.is_some()) {
            return;
        }
        if self.pending.is_empty() {
            return std::future::pending().await;
        }
        let (found, index, _) =
            futures::future::select_all(self.pending.iter_mut().map(|r| &mut r.task)).await;
        self.pending[index].found = Some(found);
    }

    /// The restores that have finished, with what they found, in the order they started.
    fn take_finished(&mut self) -> Vec<(Restore, Found)> {
        use futures::FutureExt;
        let mut done = Vec::new();
        let mut index = 0;
        while index < self.pending.len() {
            let restore = &mut self.pending[index];
            if restore.found.is_none() && restore.task.is_finished() {
                restore.found = (&mut restore.task).now_or_never();
            }
            match restore.found.take() {
                Some(found) => done.push((self.pending.remove(index), found)),
                None => index += 1,
            }
        }
        done
    }
}

/// Tells the role about assignment changes, oldest first, and keeps `assigned` current.
/// Returns the partitions that need a restore (newly assigned, or whose restore was abandoned
/// because the assignment moved meanwhile) and the messages already held for them.
fn apply_changes<R: RoleMachine>(
    role: &mut R,
    assigned: &mut Vec<TopicPartition>,
    restores: &mut Restores,
    changes: Vec<AssignmentChange>,
) -> (Vec<TopicPartition>, Vec<OwnedMessage>) {
    let mut new: Vec<TopicPartition> = Vec::new();
    let mut held = Vec::new();
    for change in changes {
        match change {
            AssignmentChange::Revoked(partitions) => {
                assigned.retain(|tp| !partitions.contains(tp));
                new.retain(|tp| !partitions.contains(tp));
                held.retain(|m: &OwnedMessage| {
                    !partitions
                        .iter()
                        .any(|(t, p)| *p == m.partition() && t == m.topic())
                });
                role.handle_revoked(&partitions);
                let (again, again_held) = restores.revoke(&partitions);
                new.extend(again);
                held.extend(again_held);
            }
            AssignmentChange::Assigned(partitions) => {
                for tp in partitions {
                    if !assigned.contains(&tp) {
                        assigned.push(tp.clone());
                        new.push(tp);
                    }
                }
            }
        }
    }
    (new, held)
}

type Delivered = Result<Result<(), kafka::DeliveryError>, tokio::task::JoinError>;

/// A batch whose records are being delivered; its offsets are stored once they are.
struct InFlight {
    delivery: tokio::task::JoinHandle<Result<(), kafka::DeliveryError>>,
    /// The delivery's result, once [`Committer::settled`] has seen it.
    delivered: Option<Delivered>,
    offsets: Vec<(String, i32, i64)>,
    started: Instant,
}

/// How a batch reaches its commit point.
enum Committer {
    /// Deliver, then store the offsets for the consumer's next commit. Pipelined: one batch
    /// may be in flight while the next is received and decided.
    AtLeastOnce { in_flight: Option<InFlight> },
    /// Records and offsets in one Kafka transaction per batch.
    Transactional,
}

impl Committer {
    #[allow(clippy::too_many_arguments)]
    async fn commit(
        &mut self,
        consumer: &StreamConsumer<RoleContext>,
        producer: &RoleProducer,
        role: &'static str,
        metrics: &Metrics,
        records: Vec<Outgoing>,
        offsets: Vec<(String, i32, i64)>,
        started: Instant,
    ) -> Result<(), RuntimeError> {
        match self {
            Committer::AtLeastOnce { in_flight } => {
                if let Some(previous) = in_flight.take() {
                    finish(consumer, role, metrics, previous).await?;
                }
                *in_flight = Some(InFlight {
                    delivery: tokio::spawn(kafka::deliver_all(producer, records, metrics)),
                    delivered: None,
                    offsets,
                    started,
                });
                Ok(())
            }
            Committer::Transactional => {
                let group = consumer
                    .group_metadata()
                    .ok_or(RuntimeError::NoGroupMetadata)?;
                let next = kafka::next_offsets(&offsets);
                let (producer, task_metrics) = (producer.clone(), metrics.clone());
                tokio::task::spawn_blocking(move || {
                    kafka::commit_transaction(&producer, &records, &next, &group, &task_metrics)
                })
                .await??;
                kafka::record_progress(consumer, &offsets);
                events::BatchCommitted {
                    role,
                    seconds: started.elapsed().as_secs_f64(),
                }
                .emit(metrics);
                Ok(())
            }
        }
    }

    /// Resolves once the batch in flight, if any, is delivered (or has failed); never if
    /// there is none. Cancel-safe: the result is kept for [`Committer::drain`].
    async fn settled(&mut self) {
        match self {
            Committer::AtLeastOnce {
                in_flight: Some(batch),
            } => {
                if batch.delivered.is_none() {
                    batch.delivered = Some((&mut batch.delivery).await);
                }
            }
            _ => std::future::pending().await,
        }
    }

    /// Stores the offsets of the batch in flight if its delivery has settled; never waits.
    fn store_if_settled(
        &mut self,
        consumer: &StreamConsumer<RoleContext>,
        role: &'static str,
        metrics: &Metrics,
    ) -> Result<(), RuntimeError> {
        match self {
            Committer::AtLeastOnce { in_flight } => {
                if let Some(batch) = in_flight.as_mut() {
                    if batch.delivered.is_none() {
                        batch.delivered = (&mut batch.delivery).now_or_never();
                    }
                }
                match in_flight.take() {
                    Some(InFlight {
                        delivered: Some(delivered),
                        offsets,
                        started,
                        ..
                    }) => stored(consumer, role, metrics, delivered, &offsets, started),
                    unsettled => {
                        *in_flight = unsettled;
                        Ok(())
                    }
                }
            }
            Committer::Transactional => Ok(()),
        }
    }

    /// Waits for the batch in flight, if any, and stores its offsets.
    async fn drain(
        &mut self,
        consumer: &StreamConsumer<RoleContext>,
        role: &'static str,
        metrics: &Metrics,
    ) -> Result<(), RuntimeError> {
        match self {
            Committer::AtLeastOnce { in_flight } => match in_flight.take() {
                Some(previous) => finish(consumer, role, metrics, previous).await,
                None => Ok(()),
            },
            Committer::Transactional => Ok(()),
        }
    }
}

async fn finish(
    consumer: &StreamConsumer<RoleContext>,
    role: &'static str,
    metrics: &Metrics,
    batch: InFlight,
) -> Result<(), RuntimeError> {
    let delivered = match batch.delivered {
        Some(delivered) => delivered,
        None => batch.delivery.await,
    };
    stored(
        consumer,
        role,
        metrics,
        delivered,
        &batch.offsets,
        batch.started,
    )
}

/// Stores a delivered batch's offsets: its commit point.
fn stored(
    consumer: &StreamConsumer<RoleContext>,
    role: &'static str,
    metrics: &Metrics,
    delivered: Delivered,
    offsets: &[(String, i32, i64)],
    started: Instant,
) -> Result<(), RuntimeError> {
    delivered??;
    kafka::store_offsets(consumer, offsets);
    events::BatchCommitted {
        role,
        seconds: started.elapsed().as_secs_f64(),
    }
    .emit(metrics);
    Ok(())
}

/// The role's transactional id: configured, or one per host and process.
fn transactional_id(config: &Config, role: &str) -> String {
    match config.settings.processing.transactional_id.as_str() {
        "" => format!("npsflow-{role}-{}-{}", host_name(), std::process::id()),
        id if role == crate::ingest::ROLE => id.to_owned(),
        id => format!("{id}-{role}"),
    }
}

fn host_name() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "npsflow".into())
}

/// How the driver receives a batch.
struct Receiving<'a> {
    consumer: &'a StreamConsumer<RoleContext>,
    role: &'static str,
    metrics: &'a Metrics,
    /// At most this many messages.
    max: usize,
    /// At most this long after the first message.
    wait: Duration,
    /// At most this long for a first message.
    idle: Duration,
}

impl<'a> Receiving<'a> {
    /// Adds a received message to `batch`; false (and the error reported) if it is an error.
    fn take<'c>(
        &self,
        received: rdkafka::error::KafkaResult<BorrowedMessage<'c>>,
        batch: &mut Vec<BorrowedMessage<'c>>,
    ) -> bool {
        match received {
            Ok(message) => {
                batch.push(message);
                true
            }
            Err(error) => {
                events::ConsumeFailed {
                    role: self.role,
                    error: &error,
                }
                .emit(self.metrics);
                false
            }
        }
    }

    /// The next batch: waits up to `idle` for a first message (an empty batch if none comes,
    /// or if `settled` resolves first, so that the driver attends to timers, rebalances and
    /// the batch in flight), then takes more until `max` messages or `wait` has passed.
    /// `None` once `shutdown` turns true (or its sender is gone). Once a message is taken
    /// nothing can cancel it: every message taken is in the batch returned.
    async fn next(
        &self,
        shutdown: &mut watch::Receiver<bool>,
        settled: impl std::future::Future<Output = ()>,
    ) -> Option<Vec<BorrowedMessage<'a>>> {
        let (consumer, role) = (self.consumer, self.role);
        let first = tokio::select! {
            _ = shutdown.wait_for(|stop| *stop) => return None,
            _ = settled => return Some(Vec::new()),
            received = tokio::time::timeout(self.idle, consumer.recv()) => received,
        };
        let mut batch = Vec::new();
        let Ok(first) = first else {
            return Some(batch);
        };
        if !self.take(first, &mut batch) {
            // Typically the broker is unreachable: wait a little instead of spinning.
            tokio::time::sleep(Duration::from_secs(1)).await;
            return Some(batch);
        }
        let deadline = tokio::time::Instant::now() + self.wait;
        while batch.len() < self.max {
            let Ok(received) = tokio::time::timeout_at(deadline, consumer.recv()).await else {
                break;
            };
            if !self.take(received, &mut batch) {
                break;
            }
        }
        // Per partition, the first and last offsets received: what the progress watch
        // needs, without a lookup per message.
        let mut spans: Vec<(&str, i32, i64, i64)> = Vec::new();
        for message in &batch {
            let (topic, partition, offset) =
                (message.topic(), message.partition(), message.offset());
            match spans.iter_mut().find(|s| s.1 == partition && s.0 == topic) {
                Some(span) => span.3 = span.3.max(offset),
                None => spans.push((topic, partition, offset, offset)),
            }
        }
        let now = Instant::now();
        consumer.context().health().progress(role, |watch| {
            for &(topic, partition, first, last) in &spans {
                watch.received(topic, partition, first, now);
                watch.received(topic, partition, last, now);
            }
        });
        Some(batch)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use rdkafka::consumer::BaseConsumer;
    use rdkafka::mocking::MockCluster;

    use super::*;

    const HOUR: i64 = 3_600_000;

    /// A role with nothing but a timer: every hour it writes `now` to a topic.
    struct Ticker {
        next: Timestamp,
        left: usize,
        fired: Arc<Mutex<Vec<i64>>>,
        told: tokio::sync::mpsc::UnboundedSender<()>,
    }

    impl RoleMachine for Ticker {
        fn handle_assigned(&mut self, _: &[TopicPartition]) -> Vec<StateRead> {
            Vec::new()
        }
        fn handle_restored(&mut self, _: &StateRead, _: Vec<StoredRecord>, _: Timestamp) {}
        fn handle_revoked(&mut self, _: &[TopicPartition]) {}
        fn handle_messages<M: Message>(&mut self, _: &[M], _: Timestamp, _: &mut Vec<Outgoing>) {
            panic!("no message was sent");
        }
        fn poll_timeout(&self) -> Option<Timestamp> {
            (self.left > 0).then_some(self.next)
        }
        fn handle_timeout(&mut self, now: Timestamp, out: &mut Vec<Outgoing>) {
            while self.left > 0 && self.next <= now {
                out.push(Outgoing::new(
                    "ticks",
                    None,
                    None,
                    Some(now.millis().to_string().into_bytes()),
                    None,
                ));
                self.fired.lock().expect("not poisoned").push(now.millis());
                let _ = self.told.send(());
                self.next = Timestamp(self.next.millis() + HOUR);
                self.left -= 1;
            }
        }
    }

    fn read_all(brokers: &str, topic: &str, count: usize) -> Vec<String> {
        let consumer: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", "reader")
            .set("auto.offset.reset", "earliest")
            .create()
            .expect("consumer");
        consumer.subscribe(&[topic]).expect("subscribed");
        let mut found = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while found.len() < count && Instant::now() < deadline {
            if let Some(Ok(message)) = consumer.poll(Duration::from_millis(100)) {
                let payload = message.payload().unwrap_or_default();
                found.push(String::from_utf8_lossy(payload).into_owned());
            }
        }
        found
    }

    /// Timers fire on the injected clock with no message at all, at the clock's time, each
    /// due firing once (an overdue burst included), and what they cause is delivered in order.
    /// The clock is paused: it moves only when the test moves it.
    #[tokio::test]
    async fn timers_fire_on_the_clock_when_no_message_arrives() {
        let cluster = MockCluster::new(1).expect("mock cluster");
        let brokers = cluster.bootstrap_servers();
        for topic in ["input", "ticks"] {
            cluster.create_topic(topic, 1, 1).expect("topic");
        }
        let env = [("NPSFLOW__KAFKA__BROKERS".to_owned(), brokers.clone())];
        let config = Arc::new(Config::load(None, env).expect("config"));
        let start = Timestamp(1_700_000_000_000);
        let clock = Arc::new(ManualClock::new(start));
        let engine = Engine {
            config,
            metrics: Metrics::new(),
            health: Arc::new(Health::default()),
            clock: clock.clone(),
        };
        let fired = Arc::new(Mutex::new(Vec::new()));
        let (told, mut firings) = tokio::sync::mpsc::unbounded_channel();
        let ticker = Ticker {
            next: Timestamp(start.millis() + HOUR),
            left: 3,
            fired: fired.clone(),
            told,
        };
        let binding = Binding {
            role: "ticker",
            group: "ticker".into(),
            topics: vec!["input".into()],
            transactional: false,
        };
        let (stop, stopping) = watch::channel(false);
        let task = tokio::spawn(async move { engine.drive(ticker, binding, stopping).await });
        // Nothing is due yet: nothing fires, however long the driver idles.
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(fired.lock().expect("not poisoned").is_empty());
        // One hour later: the first timer.
        let at = |ms: i64| Timestamp(start.millis() + ms);
        clock.set(at(HOUR));
        let patience = Duration::from_secs(60);
        tokio::time::timeout(patience, firings.recv())
            .await
            .expect("the first timer fires with no message")
            .expect("ticker alive");
        // Two more are due after a long pause: both fire at once, at the clock's time.
        clock.set(at(3 * HOUR + 60_000));
        for _ in 0..2 {
            tokio::time::timeout(patience, firings.recv())
                .await
                .expect("the overdue timers fire")
                .expect("ticker alive");
        }
        stop.send(true).expect("driver listening");
        task.await
            .expect("joined")
            .expect("driver finished cleanly");
        let want = vec![HOUR, 3 * HOUR + 60_000, 3 * HOUR + 60_000];
        let want: Vec<i64> = want.into_iter().map(|ms| at(ms).millis()).collect();
        assert_eq!(*fired.lock().expect("not poisoned"), want);
        let delivered = tokio::task::spawn_blocking(move || read_all(&brokers, "ticks", 3))
            .await
            .expect("read");
        let want: Vec<String> = want.iter().map(i64::to_string).collect();
        assert_eq!(
            delivered, want,
            "what the timers caused was delivered, in order"
        );
    }
}
