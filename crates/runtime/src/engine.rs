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
//!   stored in batch order. Exactly once, each input partition has a transactional producer
//!   of its own (created, and so fencing any earlier owner, before its state is read back),
//!   and a batch's records go in the transaction of the partition that caused them, with that
//!   partition's offset (see [`Transactions`]);
//! - health (progress per partition, restored or not), timers (they fire on the injected
//!   clock even when no message arrives), and graceful shutdown (finish, commit, leave).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt;
use npsflow_core::Timestamp;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, OwnedMessage};
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

/// How long a stopping role may take to deliver its batch in flight, commit and leave its
/// group while the broker is reachable.
pub const SHUTDOWN_LIMIT: Duration = Duration::from_secs(15);

/// The same while the role's consumer or producer cannot reach a broker: nothing can be
/// delivered or committed then, so the process does not wait for it.
pub const SHUTDOWN_LIMIT_UNREACHABLE: Duration = Duration::from_secs(2);

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
        )
        .with_start_at_end(
            binding
                .topics
                .iter()
                .filter(|topic| {
                    settings
                        .kafka
                        .start_position
                        .starts_at_end(&settings.topics, topic)
                })
                .cloned()
                .collect(),
        );
        let mut consumer_config =
            kafka::consumer_config(&settings.kafka, &binding.group, &format!("npsflow-{name}"));
        let producer_config = kafka::producer_config(
            &settings.kafka,
            &format!("npsflow-{name}-producer"),
            settings.topics.max_message_bytes as usize,
        );
        if transactional {
            // Offsets are committed inside the transactions, never by the consumer; what
            // aborted transactions wrote is never read.
            consumer_config
                .set("enable.auto.commit", "false")
                .set("isolation.level", "read_committed");
        }
        let consumer: StreamConsumer<RoleContext> = consumer_config.create_with_context(context)?;
        // At least once it delivers every record; exactly once it only reports whether the
        // role reaches a broker (each partition's transactional producer sends).
        let producer = kafka::role_producer(
            producer_config.clone(),
            name,
            self.health.clone(),
            self.metrics.clone(),
            unsettled.clone(),
        )?;
        let mut committer = if transactional {
            let fencing = Fencing {
                config: producer_config,
                prefix: transactional_prefix(&self.config, &binding.group),
                role: name,
                health: self.health.clone(),
                metrics: self.metrics.clone(),
                unsettled,
            };
            Committer::Transactional(Box::new(Transactions::new(fencing, shutdown.clone())))
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
                let (new, held) = apply_changes(
                    &mut role,
                    &mut assigned,
                    &mut restores,
                    &mut committer,
                    changes,
                );
                self.start_restore(
                    &mut role,
                    &binding,
                    &consumer,
                    &committer,
                    &mut restores,
                    new,
                    held,
                );
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
                held.extend(self.finish_restore(
                    &mut role,
                    &binding,
                    &consumer,
                    &mut committer,
                    done,
                    found?,
                    now,
                )?);
            }
            self.health.set_restored(name, restores.is_empty());
            // What the role makes of it, with the input partition that caused each part
            // (exactly once, the role sees one partition at a time, so every record has its
            // partition's transaction; at least once, the whole batch at once).
            let mut caused: Vec<(Option<TopicPartition>, Vec<Outgoing>)> = Vec::new();
            handle(&mut role, &mut held, transactional, now, &mut caused);
            handle(&mut role, &mut batch, transactional, now, &mut caused);
            if role.poll_timeout().is_some_and(|due| due <= now) {
                let mut records = Vec::new();
                role.handle_timeout(now, &mut records);
                caused.push((None, records));
            }
            if batch.is_empty() && held.is_empty() && caused.iter().all(|(_, r)| r.is_empty()) {
                // Nothing new: the batch in flight reaches its commit point if it is
                // delivered. If it is not (the broker may be down), the driver goes back to
                // receiving, which keeps the consumer's statistics and errors (and so the
                // health) served; `settled` wakes it once the delivery is done.
                committer
                    .commit_if_settled(&consumer, name, &self.metrics)
                    .await?;
                continue;
            }
            let max = kafka::max_record_bytes(settings.topics.max_message_bytes as usize);
            let caused = caused
                .into_iter()
                .map(|(cause, records)| (cause, kafka::fit_records(records, max, &self.metrics)))
                .collect();
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
                    caused,
                    offsets,
                    started,
                )
                .await?;
        }
        events::RoleStopping { role: name }.emit(&self.metrics);
        // With the broker reachable the batch in flight is delivered and the offsets are
        // committed in moments; without it, deliveries retry forever and a commit waits for
        // its timeout, so the process gives up soon: the next owner replays from the last
        // commit and makes the same decisions.
        let reachable = self
            .health
            .snapshot()
            .get(name)
            .is_some_and(|h| h.connected && h.producing);
        let limit = if reachable {
            SHUTDOWN_LIMIT
        } else {
            SHUTDOWN_LIMIT_UNREACHABLE
        };
        let deadline = tokio::time::Instant::now() + limit;
        let drained = match tokio::time::timeout_at(
            deadline,
            committer.drain(&consumer, name, &self.metrics),
        )
        .await
        {
            Ok(drained) => drained,
            Err(_) => {
                events::ShutdownUndelivered { role: name }.emit(&self.metrics);
                Ok(())
            }
        };
        let left = deadline
            .saturating_duration_since(tokio::time::Instant::now())
            .max(Duration::from_secs(1));
        kafka::close_consumer(consumer, name, &self.metrics, !transactional, left).await;
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
    /// them received already (from a restore abandoned because the assignment moved). Exactly
    /// once, every new partition goes this way, state or not: its producer is made first,
    /// which fences the partition's previous owner, and only then are its state and its
    /// committed offset read, so they include everything that owner committed.
    #[allow(clippy::too_many_arguments)]
    fn start_restore<R: RoleMachine>(
        &self,
        role: &mut R,
        binding: &Binding,
        consumer: &StreamConsumer<RoleContext>,
        committer: &Committer,
        restores: &mut Restores,
        partitions: Vec<TopicPartition>,
        held: Vec<OwnedMessage>,
    ) {
        if partitions.is_empty() {
            return;
        }
        let list = partition_list(&partitions);
        // One partition at a time, so that each read is known to belong to its partition.
        let mut reads = Vec::new();
        let mut owners = Vec::new();
        for tp in &partitions {
            for read in role.handle_assigned(std::slice::from_ref(tp)) {
                owners.push(((read.topic().to_owned(), read.partition()), tp.clone()));
                reads.push(read);
            }
        }
        let fencing = match committer {
            Committer::Transactional(transactions) => Some(transactions.fencing.clone()),
            Committer::AtLeastOnce { .. } => None,
        };
        if reads.is_empty() && fencing.is_none() {
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
        let fenced = partitions.clone();
        restores.pending.push(Restore {
            partitions,
            reads,
            owners,
            task: tokio::task::spawn_blocking(move || {
                let deadline = Instant::now() + RESTORE_LIMIT;
                let producers = match &fencing {
                    Some(fencing) => fencing.fence(&fenced, RESTORE_LIMIT)?,
                    None => Vec::new(),
                };
                let left = deadline.saturating_duration_since(Instant::now());
                let found = if wanted.is_empty() {
                    Vec::new()
                } else {
                    state::read(&kafka, &group, &wanted, left)?
                };
                let committed = if fencing.is_some() {
                    let left = deadline.saturating_duration_since(Instant::now());
                    kafka::committed_offsets(
                        &kafka,
                        &group,
                        &fenced,
                        left.max(Duration::from_secs(10)),
                    )?
                } else {
                    Vec::new()
                };
                Ok(Restored {
                    found,
                    producers,
                    committed,
                })
            }),
            found: None,
            held,
            started: Instant::now(),
        });
    }

    /// Hands a finished restore's state to the role and resumes its partitions; returns the
    /// messages of them received meanwhile, to be handled next. Exactly once, the partitions'
    /// producers are taken into use, and a partition is read again from the offset committed
    /// when its state was read (its previous owner may have committed a last transaction
    /// after this consumer asked where to start).
    #[allow(clippy::too_many_arguments)]
    fn finish_restore<R: RoleMachine>(
        &self,
        role: &mut R,
        binding: &Binding,
        consumer: &StreamConsumer<RoleContext>,
        committer: &mut Committer,
        done: Restore,
        found: Result<Restored, RuntimeError>,
        now: Timestamp,
    ) -> Result<Vec<OwnedMessage>, RuntimeError> {
        let restored = found?;
        let mut count = 0;
        for (read, records) in done.reads.iter().zip(restored.found) {
            count += records.len();
            role.handle_restored(read, records, now);
        }
        let mut held = done.held;
        if let Committer::Transactional(transactions) = committer {
            transactions.producers.extend(restored.producers);
            transactions.owners.extend(done.owners);
            for ((topic, partition), committed) in restored.committed {
                let tp = (topic, partition);
                let Some(offset) = committed else {
                    transactions.committed.remove(&tp);
                    continue;
                };
                transactions.committed.insert(tp.clone(), offset);
                let of_tp = |m: &OwnedMessage| m.partition() == tp.1 && m.topic() == tp.0;
                let first_held = held.iter().filter(|m| of_tp(m)).map(|m| m.offset()).min();
                if first_held != Some(offset) {
                    held.retain(|m| !of_tp(m));
                    if let Err(error) = consumer.seek(
                        &tp.0,
                        tp.1,
                        rdkafka::Offset::Offset(offset),
                        Duration::from_secs(10),
                    ) {
                        tracing::warn!(%error, topic = tp.0, partition = tp.1, offset, "seeking to the committed offset after a restore");
                    }
                }
            }
        }
        if let Err(error) = consumer.resume(&partition_list(&done.partitions)) {
            tracing::debug!(%error, "resuming after a restore");
        }
        events::Restored {
            role: binding.role,
            partitions: done.partitions.len(),
            records: count,
            seconds: done.started.elapsed().as_secs_f64(),
        }
        .emit(&self.metrics);
        Ok(held)
    }
}

/// Hands `messages` to the role: at once, or (`per_partition`) one input partition at a time
/// in offset order, noting which partition caused which records.
fn handle<R: RoleMachine, M: Message>(
    role: &mut R,
    messages: &mut [M],
    per_partition: bool,
    now: Timestamp,
    caused: &mut Vec<(Option<TopicPartition>, Vec<Outgoing>)>,
) {
    if messages.is_empty() {
        return;
    }
    if !per_partition {
        let mut records = Vec::new();
        role.handle_messages(messages, now, &mut records);
        caused.push((None, records));
        return;
    }
    // Stable: each partition's messages stay in offset order.
    messages.sort_by(|a, b| (a.topic(), a.partition()).cmp(&(b.topic(), b.partition())));
    for chunk in messages.chunk_by(|a, b| a.partition() == b.partition() && a.topic() == b.topic())
    {
        let mut records = Vec::new();
        role.handle_messages(chunk, now, &mut records);
        let cause = (chunk[0].topic().to_owned(), chunk[0].partition());
        caused.push((Some(cause), records));
    }
}

fn partition_list(partitions: &[TopicPartition]) -> rdkafka::TopicPartitionList {
    let mut list = rdkafka::TopicPartitionList::new();
    for (topic, partition) in partitions {
        list.add_partition(topic, *partition);
    }
    list
}

type Found = Result<Result<Restored, RuntimeError>, tokio::task::JoinError>;

/// What a restore found: the records of each read, and exactly once each partition's
/// producer (already fencing its previous owner) and committed offset.
struct Restored {
    found: Vec<Vec<StoredRecord>>,
    producers: Vec<(TopicPartition, RoleProducer)>,
    committed: Vec<(TopicPartition, Option<i64>)>,
}

/// A restore in progress: partitions paused until the role has their state.
struct Restore {
    partitions: Vec<TopicPartition>,
    reads: Vec<StateRead>,
    /// Each state partition read, with the input partition whose state it holds.
    owners: Vec<(TopicPartition, TopicPartition)>,
    task: tokio::task::JoinHandle<Result<Restored, RuntimeError>>,
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
    committer: &mut Committer,
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
                if let Committer::Transactional(transactions) = committer {
                    transactions.revoked(&partitions);
                }
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
    /// Records and offsets in Kafka transactions, one per input partition and batch.
    Transactional(Box<Transactions>),
}

impl Committer {
    /// Takes a batch to its commit point: `caused` are its records by the input partition
    /// that caused them (`None`: the batch as a whole, or timers), `offsets` the last offset
    /// handled per partition.
    #[allow(clippy::too_many_arguments)]
    async fn commit(
        &mut self,
        consumer: &StreamConsumer<RoleContext>,
        producer: &RoleProducer,
        role: &'static str,
        metrics: &Metrics,
        caused: Vec<(Option<TopicPartition>, Vec<Outgoing>)>,
        offsets: Vec<(String, i32, i64)>,
        started: Instant,
    ) -> Result<(), RuntimeError> {
        match self {
            Committer::AtLeastOnce { in_flight } => {
                if let Some(previous) = in_flight.take() {
                    finish(consumer, role, metrics, previous).await?;
                }
                let records = caused
                    .into_iter()
                    .flat_map(|(_, records)| records)
                    .collect();
                *in_flight = Some(InFlight {
                    delivery: tokio::spawn(kafka::deliver_all(producer, records, metrics)),
                    delivered: None,
                    offsets,
                    started,
                });
                Ok(())
            }
            Committer::Transactional(transactions) => {
                let work = transactions.attribute(caused);
                transactions
                    .commit(consumer, role, metrics, work, &offsets)
                    .await?;
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

    /// With nothing new received: at least once, stores the offsets of the batch in flight
    /// if its delivery has settled (never waits); exactly once, commits the positions of
    /// partitions the consumer has moved past transaction markers only.
    async fn commit_if_settled(
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
            Committer::Transactional(transactions) => {
                transactions
                    .commit(consumer, role, metrics, BTreeMap::new(), &[])
                    .await
            }
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
            Committer::Transactional(_) => Ok(()),
        }
    }
}

/// Sorts records into transactions by input partition: a record written to a state partition
/// (one read back on assignment, in `owners`) goes with the input partition whose state it
/// holds, if that one is `ready` (restored, with a producer); any other with the partition
/// whose messages caused it. A record no partition claims (a role's timer writing to no state
/// partition) goes with `fallback` (a ready partition), if any.
fn attribute(
    caused: Vec<(Option<TopicPartition>, Vec<Outgoing>)>,
    owners: &BTreeMap<TopicPartition, TopicPartition>,
    ready: impl Fn(&TopicPartition) -> bool,
    fallback: Option<TopicPartition>,
) -> BTreeMap<TopicPartition, Vec<Outgoing>> {
    let mut work: BTreeMap<TopicPartition, Vec<Outgoing>> = BTreeMap::new();
    for (cause, records) in caused {
        for record in records {
            let state = record.partition.and_then(|partition| {
                owners
                    .get(&(record.topic.clone(), partition))
                    .filter(|input| ready(input))
            });
            match state.or(cause.as_ref()).or(fallback.as_ref()).cloned() {
                Some(owner) => work.entry(owner).or_default().push(record),
                None => tracing::warn!(
                    topic = record.topic,
                    "a record with no assigned partition to commit it with was dropped"
                ),
            }
        }
    }
    work
}

/// What makes an input partition's transactional producer.
#[derive(Clone)]
struct Fencing {
    /// The producers' configuration, without a transactional id.
    config: rdkafka::ClientConfig,
    /// The transactional ids' prefix: a partition's id is `<prefix>-<topic>-<partition>`.
    prefix: String,
    role: &'static str,
    health: Arc<Health>,
    metrics: Metrics,
    unsettled: Arc<kafka::Unsettled>,
}

impl Fencing {
    /// An initialised producer for each of `partitions`. Initialising a transactional id
    /// fences every earlier producer with it: the broker aborts the transaction it left open
    /// and refuses anything it sends from then on. Blocking.
    fn fence(
        &self,
        partitions: &[TopicPartition],
        limit: Duration,
    ) -> Result<Vec<(TopicPartition, RoleProducer)>, RuntimeError> {
        let mut producers = Vec::with_capacity(partitions.len());
        for (topic, partition) in partitions {
            let producer = kafka::partition_producer(
                &self.config,
                &transactional_id(&self.prefix, topic, *partition),
                self.role,
                self.health.clone(),
                self.metrics.clone(),
                self.unsettled.clone(),
                limit,
            )?;
            producers.push(((topic.clone(), *partition), producer));
        }
        Ok(producers)
    }
}

/// Exactly once (`processing.guarantee = exactly_once`): one transactional producer per
/// assigned input partition, with a transactional id made from the partition
/// (`<prefix>-<topic>-<partition>`), the pre-KIP-447 scheme (Kafka Streams' first
/// exactly-once). Whoever is assigned a partition initialises that id before it reads the
/// partition's state and committed offset, which fences the partition's previous owner: a
/// process that stalled past its session timeout (a zombie) and wakes up cannot commit
/// anything for a partition it lost, even on a broker that does not check the group
/// generation of transactional offset commits (KIP-447; noida-db 0.2.3 does not).
///
/// Each transaction holds the records one partition's messages caused and that partition's
/// offset; records a role writes to a partition it reads back as state (a snapshot, a case, an
/// escalation notice: also from timers) go in the transaction of the input partition whose
/// state it is. Offsets committed are the consumer's position when it is past the last
/// message handled: past transaction markers, so that a drained partition has no lag.
struct Transactions {
    fencing: Fencing,
    /// Input partition -> its producer, from the end of its restore until it is revoked.
    producers: BTreeMap<TopicPartition, RoleProducer>,
    /// State partition -> the input partition whose state it holds.
    owners: BTreeMap<TopicPartition, TopicPartition>,
    /// Input partition -> the offset committed (the next to read), where known.
    committed: BTreeMap<TopicPartition, i64>,
    /// Turns true when the role is told to stop: a transaction that cannot commit (the broker
    /// is unreachable) is then aborted instead of tried again.
    stopping: watch::Receiver<bool>,
}

impl Transactions {
    fn new(fencing: Fencing, stopping: watch::Receiver<bool>) -> Transactions {
        Transactions {
            fencing,
            producers: BTreeMap::new(),
            owners: BTreeMap::new(),
            committed: BTreeMap::new(),
            stopping,
        }
    }

    /// Partitions taken away: their producers are dropped (never used again).
    fn revoked(&mut self, partitions: &[TopicPartition]) {
        for tp in partitions {
            self.producers.remove(tp);
            self.committed.remove(tp);
        }
        self.owners.retain(|_, input| !partitions.contains(input));
    }

    /// Sorts records into transactions by input partition (see [`attribute`]).
    fn attribute(
        &self,
        caused: Vec<(Option<TopicPartition>, Vec<Outgoing>)>,
    ) -> BTreeMap<TopicPartition, Vec<Outgoing>> {
        let fallback = self.producers.keys().next().cloned();
        attribute(
            caused,
            &self.owners,
            |tp| self.producers.contains_key(tp),
            fallback,
        )
    }

    /// Commits each partition's records with its offset, one transaction per partition, all
    /// at once; a partition with no records is committed when the consumer's position has
    /// moved past transaction markers. `offsets` are the last offsets handled.
    async fn commit(
        &mut self,
        consumer: &StreamConsumer<RoleContext>,
        role: &'static str,
        metrics: &Metrics,
        mut work: BTreeMap<TopicPartition, Vec<Outgoing>>,
        offsets: &[(String, i32, i64)],
    ) -> Result<(), RuntimeError> {
        let mut next: BTreeMap<TopicPartition, i64> = offsets
            .iter()
            .map(|(topic, partition, offset)| ((topic.clone(), *partition), offset + 1))
            .collect();
        // The consumer's position, where it is past what was handled: control records only
        // (every message received of a partition with a producer has been handled).
        if let Ok(positions) = consumer.position() {
            for element in positions.elements() {
                let tp = (element.topic().to_owned(), element.partition());
                let rdkafka::Offset::Offset(position) = element.offset() else {
                    continue;
                };
                if !self.producers.contains_key(&tp) {
                    continue;
                }
                let committed = self.committed.get(&tp).copied().unwrap_or(-1);
                let handled = next.get(&tp).copied().unwrap_or(committed);
                if position > handled.max(committed) {
                    next.insert(tp, position);
                }
            }
        }
        next.retain(|tp, offset| self.committed.get(tp).is_none_or(|c| *offset > *c));
        for tp in next.keys() {
            work.entry(tp.clone()).or_default();
        }
        if work.is_empty() {
            return Ok(());
        }
        let mut tasks = Vec::with_capacity(work.len());
        for (tp, records) in work {
            let Some(producer) = self.producers.get(&tp).cloned() else {
                // Every partition handled was restored, so it has a producer.
                tracing::warn!(
                    topic = tp.0,
                    partition = tp.1,
                    "no producer for a partition"
                );
                continue;
            };
            let group = consumer
                .group_metadata()
                .ok_or(RuntimeError::NoGroupMetadata)?;
            let offset = next.get(&tp).copied();
            let list = kafka::next_offsets(
                &offset
                    .map(|o| (tp.0.clone(), tp.1, o - 1))
                    .into_iter()
                    .collect::<Vec<_>>(),
            );
            let task_metrics = metrics.clone();
            let partition = tp.clone();
            let stopping = self.stopping.clone();
            tasks.push(tokio::task::spawn_blocking(move || {
                let result = kafka::commit_transaction(
                    &producer,
                    &records,
                    &list,
                    &group,
                    &task_metrics,
                    &|| *stopping.borrow(),
                );
                (partition, offset, result)
            }));
        }
        let mut failed = None;
        let mut progressed = Vec::new();
        let mut abandoned = false;
        for task in futures::future::join_all(tasks).await {
            let (tp, offset, result) = task?;
            match result {
                Ok(()) => {
                    if let Some(offset) = offset {
                        self.committed.insert(tp.clone(), offset);
                        progressed.push((tp.0, tp.1, offset - 1));
                    }
                }
                // Stopping with the broker unreachable: aborted, the offsets not committed;
                // the next owner decides these messages again.
                Err(rdkafka::error::KafkaError::Canceled) => abandoned = true,
                Err(error) => {
                    if kafka::is_fatal_in_transaction(&error) {
                        events::PartitionFenced {
                            role,
                            topic: &tp.0,
                            partition: tp.1,
                            error: &error,
                        }
                        .emit(metrics);
                    }
                    failed.get_or_insert(error);
                }
            }
        }
        kafka::record_progress(consumer, &progressed);
        if abandoned {
            events::ShutdownUndelivered { role }.emit(metrics);
        }
        match failed {
            Some(error) => Err(error.into()),
            None => Ok(()),
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

/// The prefix of a role's transactional ids: `processing.transactional_id`, else the role's
/// consumer group. The same in every process of a deployment, so that the next owner of a
/// partition fences the last one whichever process it is.
fn transactional_prefix(config: &Config, group: &str) -> String {
    match config.settings.processing.transactional_id.as_str() {
        "" => group.to_owned(),
        prefix => prefix.to_owned(),
    }
}

/// The transactional id of an input partition's producer.
fn transactional_id(prefix: &str, topic: &str, partition: i32) -> String {
    format!("{prefix}-{topic}-{partition}")
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

    /// A ticker role (`left` timers, one an hour from `start`) driven on a mock cluster with
    /// topics `input` and `ticks`, on a manual clock, exactly once or not.
    struct TickerRun {
        cluster: MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
        brokers: String,
        start: Timestamp,
        clock: Arc<ManualClock>,
        health: Arc<Health>,
        fired: Arc<Mutex<Vec<i64>>>,
        firings: tokio::sync::mpsc::UnboundedReceiver<()>,
        stop: watch::Sender<bool>,
        task: tokio::task::JoinHandle<Result<(), RuntimeError>>,
    }

    fn start_ticker(left: usize, exactly_once: bool) -> TickerRun {
        let cluster = MockCluster::new(1).expect("mock cluster");
        let brokers = cluster.bootstrap_servers();
        for topic in ["input", "ticks"] {
            cluster.create_topic(topic, 1, 1).expect("topic");
        }
        let mut env = vec![("NPSFLOW__KAFKA__BROKERS".to_owned(), brokers.clone())];
        if exactly_once {
            env.push((
                "NPSFLOW__PROCESSING__GUARANTEE".to_owned(),
                "exactly_once".to_owned(),
            ));
        }
        let config = Arc::new(Config::load(None, env).expect("config"));
        let start = Timestamp(1_700_000_000_000);
        let clock = Arc::new(ManualClock::new(start));
        let health = Arc::new(Health::default());
        let engine = Engine {
            config,
            metrics: Metrics::new(),
            health: health.clone(),
            clock: clock.clone(),
        };
        let fired = Arc::new(Mutex::new(Vec::new()));
        let (told, firings) = tokio::sync::mpsc::unbounded_channel();
        let ticker = Ticker {
            next: Timestamp(start.millis() + HOUR),
            left,
            fired: fired.clone(),
            told,
        };
        let binding = Binding {
            role: "ticker",
            group: "ticker".into(),
            topics: vec!["input".into()],
            transactional: exactly_once,
        };
        let (stop, stopping) = watch::channel(false);
        let task = tokio::spawn(async move { engine.drive(ticker, binding, stopping).await });
        TickerRun {
            cluster,
            brokers,
            start,
            clock,
            health,
            fired,
            firings,
            stop,
            task,
        }
    }

    fn record(topic: &str, partition: Option<i32>, key: &str) -> Outgoing {
        Outgoing::new(topic, partition, Some(key.as_bytes().to_vec()), None, None)
    }

    /// Exactly once, each record goes in the transaction of the input partition it belongs
    /// to: a write to a state partition with that partition's owner (also from a timer, and
    /// also when another partition's messages caused it), anything else with its cause; a
    /// state partition whose owner is not ready yet does not claim.
    #[test]
    fn records_go_in_the_transaction_of_their_input_partition() {
        let tp = |t: &str, p: i32| (t.to_owned(), p);
        let owners: BTreeMap<TopicPartition, TopicPartition> = [
            (tp("cases", 0), tp("events", 0)),
            (tp("cases", 1), tp("events", 1)),
            (tp("escalations", 1), tp("events", 1)),
            (tp("cases", 2), tp("events", 2)),
        ]
        .into();
        let ready = |input: &TopicPartition| input.1 != 2;
        let caused = vec![
            (
                Some(tp("events", 0)),
                vec![
                    record("cases", Some(0), "a"),
                    // A confirmation of another partition's case, made while handling p0.
                    record("cases", Some(1), "b"),
                    // Keyed, no explicit partition: the cause's.
                    record("followup-events", None, "c"),
                    // Partition 2 is still being restored: not its transaction.
                    record("cases", Some(2), "d"),
                ],
            ),
            (
                Some(tp("outcomes", 1)),
                vec![record("followup-events", Some(1), "e")],
            ),
            // Timers.
            (
                None,
                vec![
                    record("escalations", Some(1), "f"),
                    record("elsewhere", None, "g"),
                ],
            ),
        ];
        let work = attribute(caused, &owners, ready, Some(tp("events", 0)));
        let keys = |input: TopicPartition| -> Vec<String> {
            work.get(&input)
                .map(|records| {
                    records
                        .iter()
                        .map(|r| {
                            String::from_utf8_lossy(r.key.as_deref().unwrap_or_default())
                                .into_owned()
                        })
                        .collect()
                })
                .unwrap_or_default()
        };
        assert_eq!(keys(tp("events", 0)), ["a", "c", "d", "g"]);
        assert_eq!(keys(tp("events", 1)), ["b", "f"]);
        assert_eq!(keys(tp("outcomes", 1)), ["e"]);
        assert_eq!(work.len(), 3);
    }

    /// Transactional ids are made from the partition, never from the process, so that the
    /// next owner of a partition (any process) fences the previous one.
    #[test]
    fn transactional_ids_name_the_partition_not_the_process() {
        let env = |id: &str| {
            let env = [(
                "NPSFLOW__PROCESSING__TRANSACTIONAL_ID".to_owned(),
                id.to_owned(),
            )];
            Config::load(None, env).expect("config")
        };
        let prefix = transactional_prefix(&env(""), "npsflow-aggregate");
        assert_eq!(prefix, "npsflow-aggregate");
        assert_eq!(
            transactional_id(&prefix, "npsflow.segment-deltas", 4),
            "npsflow-aggregate-npsflow.segment-deltas-4"
        );
        let prefix = transactional_prefix(&env("prod-eu"), "npsflow-aggregate");
        assert_eq!(
            transactional_id(&prefix, "npsflow.segment-deltas", 4),
            "prod-eu-npsflow.segment-deltas-4"
        );
    }

    /// A role told to stop while its batch in flight cannot be delivered (the broker is
    /// down: deliveries retry forever) finishes within seconds, without storing that batch's
    /// offsets; before, it waited for the delivery for as long as the outage lasted.
    #[tokio::test]
    async fn a_role_stops_soon_while_the_broker_is_down() {
        let took = stop_during_an_outage(false).await;
        eprintln!("stopped in {took:?} with the broker down");
    }

    /// The same exactly once: the transaction that cannot commit is aborted once the role is
    /// told to stop (about one attempt, [`kafka::TRANSACTION_ATTEMPT`]), instead of being
    /// tried again for as long as the outage lasts.
    #[tokio::test]
    async fn a_transactional_role_stops_soon_while_the_broker_is_down() {
        let took = stop_during_an_outage(true).await;
        eprintln!("stopped in {took:?} with the broker down, exactly once");
    }

    /// Runs a ticker role until it has joined, takes the broker down, lets a timer make a
    /// record that cannot be delivered, tells the role to stop and returns how long it took
    /// (failing after 30 s).
    async fn stop_during_an_outage(exactly_once: bool) -> Duration {
        let TickerRun {
            cluster,
            start,
            clock,
            health,
            mut firings,
            stop,
            task,
            ..
        } = start_ticker(1, exactly_once);
        // Joined (and, exactly once, its partition's producer made), then the broker goes
        // away and a timer sends a record that cannot arrive.
        let deadline = Instant::now() + Duration::from_secs(60);
        while !health.ready() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(health.ready(), "the role joined");
        tokio::time::sleep(Duration::from_secs(1)).await;
        cluster.broker_down(1).expect("broker down");
        tokio::time::sleep(Duration::from_secs(2)).await;
        clock.set(Timestamp(start.millis() + HOUR));
        tokio::time::timeout(Duration::from_secs(60), firings.recv())
            .await
            .expect("the timer fires")
            .expect("ticker alive");
        tokio::time::sleep(Duration::from_secs(1)).await;
        let stopped = Instant::now();
        stop.send(true).expect("driver listening");
        tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .expect("the role stops within 30 s with the broker down")
            .expect("joined")
            .expect("driver finished cleanly");
        stopped.elapsed()
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
        let TickerRun {
            cluster: _cluster,
            brokers,
            start,
            clock,
            fired,
            mut firings,
            stop,
            task,
            ..
        } = start_ticker(3, false);
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
