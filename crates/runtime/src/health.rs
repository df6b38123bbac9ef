//! Liveness and readiness. Each running role reports whether its clients reach a broker,
//! whether its consumer has joined its group, whether its state is restored, whether it has
//! stopped with an error, and how far it has got in each assigned partition.
//!
//! `/readyz` is ready only when every role is connected, joined and restored. `/healthz`
//! (liveness) fails when a role has stopped with an error, or when a partition is stalled:
//! messages wait in it (received by the role, or on the broker past the role's position),
//! the role's consumer and producer both reach a broker, its state is restored (a restore has
//! its own time limit), and its position has not moved for longer than
//! `health.stall_timeout`. [`ProgressWatch`] decides stalls from what it is
//! told, with `now` passed in, so it is tested without a clock; a broker outage is not a
//! stall (readiness covers it).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// What one role reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RoleHealth {
    /// The consumer has a broker connection up.
    pub connected: bool,
    /// The producer has a broker connection up.
    pub producing: bool,
    /// The consumer has received its (possibly empty) assignment.
    pub joined: bool,
    /// State for the assigned partitions is in place.
    pub restored: bool,
    /// The role stopped with an error (the process is about to exit).
    pub failed: bool,
    /// Assigned partitions that are stalled.
    pub stalled: usize,
}

impl RoleHealth {
    /// Ready to do its work.
    pub fn ready(&self) -> bool {
        self.connected && self.producing && self.joined && self.restored && !self.failed
    }

    /// Alive and able to make progress.
    pub fn live(&self) -> bool {
        !self.failed && self.stalled == 0
    }
}

/// One assigned partition's progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PartitionProgress {
    /// The next offset the role will process (its committed or stored position), if known.
    position: Option<i64>,
    /// The end of the partition (the next offset to be written), if known.
    end: Option<i64>,
    /// The first offset still on the broker, if known.
    start: Option<i64>,
    /// One past the last offset the role has received, if any.
    received: Option<i64>,
    /// Since when messages have been waiting without the position moving.
    waiting_since: Option<Instant>,
}

impl PartitionProgress {
    fn waiting(&self) -> bool {
        let end = self.end.max(self.received);
        match (self.position, end, self.start) {
            (Some(position), Some(end), _) => end > position,
            (None, Some(end), Some(start)) => end > start,
            _ => false,
        }
    }
}

/// Per assigned partition of one role: where the role is, where the partition ends, and
/// since when messages have waited without progress. Pure: every input carries `now`.
#[derive(Debug, Default, Clone)]
pub struct ProgressWatch {
    partitions: BTreeMap<(String, i32), PartitionProgress>,
}

impl ProgressWatch {
    /// Partitions now assigned: watched from now on.
    pub fn assigned(&mut self, partitions: &[(String, i32)]) {
        for key in partitions {
            self.partitions
                .entry(key.clone())
                .or_insert(PartitionProgress {
                    position: None,
                    end: None,
                    start: None,
                    received: None,
                    waiting_since: None,
                });
        }
    }

    /// Partitions taken away: no longer watched.
    pub fn revoked(&mut self, partitions: &[(String, i32)]) {
        for key in partitions {
            self.partitions.remove(key);
        }
    }

    /// The role's position in a partition (the next offset it will process), e.g. after a
    /// batch's offsets are stored or committed. A position that moves resets the stall clock.
    pub fn progressed(&mut self, topic: &str, partition: i32, position: i64, now: Instant) {
        let Some(p) = self.partitions.get_mut(&(topic.to_owned(), partition)) else {
            return;
        };
        if p.position.is_some_and(|old| old >= position) {
            return;
        }
        p.position = Some(position);
        p.waiting_since = p.waiting().then_some(now);
    }

    /// The role received the message at `offset` of a partition: it waits until the role's
    /// position passes it. If the position was not known yet (nothing committed), it is at
    /// this message. Not progress.
    pub fn received(&mut self, topic: &str, partition: i32, offset: i64, now: Instant) {
        let Some(p) = self.partitions.get_mut(&(topic.to_owned(), partition)) else {
            return;
        };
        if p.position.is_none() {
            p.position = Some(offset);
        }
        p.received = p.received.max(Some(offset + 1));
        if p.waiting() && p.waiting_since.is_none() {
            p.waiting_since = Some(now);
        }
    }

    /// What the broker says of a partition: its first and end offsets (negative: unknown).
    pub fn observed(&mut self, topic: &str, partition: i32, start: i64, end: i64, now: Instant) {
        let Some(p) = self.partitions.get_mut(&(topic.to_owned(), partition)) else {
            return;
        };
        p.start = (start >= 0).then_some(start);
        p.end = (end >= 0).then_some(end);
        match (p.waiting(), p.waiting_since) {
            (true, None) => p.waiting_since = Some(now),
            (false, Some(_)) => p.waiting_since = None,
            _ => {}
        }
    }

    /// The partitions whose messages have waited without progress for longer than `limit`.
    pub fn stalled(&self, now: Instant, limit: Duration) -> Vec<(String, i32)> {
        self.partitions
            .iter()
            .filter(|(_, p)| {
                p.waiting_since
                    .is_some_and(|since| now.saturating_duration_since(since) > limit)
            })
            .map(|(key, _)| key.clone())
            .collect()
    }
}

#[derive(Debug, Default)]
struct RoleState {
    health: RoleHealth,
    progress: ProgressWatch,
}

/// The health of every role in this process.
#[derive(Debug)]
pub struct Health {
    roles: Mutex<BTreeMap<&'static str, RoleState>>,
    stall_timeout: Duration,
}

impl Default for Health {
    fn default() -> Self {
        Health::new(Duration::from_secs(60))
    }
}

impl Health {
    /// Health whose partitions count as stalled after `stall_timeout` without progress.
    pub fn new(stall_timeout: Duration) -> Health {
        Health {
            roles: Mutex::new(BTreeMap::new()),
            stall_timeout,
        }
    }

    /// Registers a role, not yet ready.
    pub fn register(&self, role: &'static str) {
        self.update(role, |_| {});
    }

    fn update<T>(&self, role: &'static str, change: impl FnOnce(&mut RoleState) -> T) -> T {
        let mut roles = self.roles.lock().unwrap_or_else(|e| e.into_inner());
        change(roles.entry(role).or_default())
    }

    /// Records whether the role's consumer reaches a broker.
    pub fn set_connected(&self, role: &'static str, connected: bool) {
        self.update(role, |r| r.health.connected = connected);
    }

    /// Records whether the role's producer reaches a broker.
    pub fn set_producing(&self, role: &'static str, producing: bool) {
        self.update(role, |r| r.health.producing = producing);
    }

    /// Records that the role's consumer joined its group.
    pub fn set_joined(&self, role: &'static str) {
        self.update(role, |r| r.health.joined = true);
    }

    /// Records whether the role's state is restored.
    pub fn set_restored(&self, role: &'static str, restored: bool) {
        self.update(role, |r| r.health.restored = restored);
    }

    /// Records that the role stopped with an error.
    pub fn set_failed(&self, role: &'static str) {
        self.update(role, |r| r.health.failed = true);
    }

    /// Changes the role's progress watch (assignments, positions, partition ends).
    pub fn progress(&self, role: &'static str, change: impl FnOnce(&mut ProgressWatch)) {
        self.update(role, |r| change(&mut r.progress));
    }

    /// Every role's health at `now`.
    pub fn snapshot_at(&self, now: Instant) -> BTreeMap<&'static str, RoleHealth> {
        let roles = self.roles.lock().unwrap_or_else(|e| e.into_inner());
        roles
            .iter()
            .map(|(role, state)| {
                let mut health = state.health;
                // Without a broker nothing can move: that is an outage, which readiness shows.
                // A restore is bounded by its own time limit (the role fails past it).
                health.stalled = if health.connected && health.producing && health.restored {
                    state.progress.stalled(now, self.stall_timeout).len()
                } else {
                    0
                };
                (*role, health)
            })
            .collect()
    }

    /// Every role's health now.
    pub fn snapshot(&self) -> BTreeMap<&'static str, RoleHealth> {
        self.snapshot_at(Instant::now())
    }

    /// True when at least one role runs and all are ready.
    pub fn ready(&self) -> bool {
        let roles = self.snapshot();
        !roles.is_empty() && roles.values().all(RoleHealth::ready)
    }

    /// True when no role has failed and no partition is stalled.
    pub fn live(&self) -> bool {
        self.snapshot().values().all(RoleHealth::live)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_every_role_is() {
        let health = Health::default();
        assert!(!health.ready());
        health.register("ingest");
        health.set_connected("ingest", true);
        health.set_producing("ingest", true);
        health.set_joined("ingest");
        health.set_restored("ingest", true);
        assert!(health.ready());
        health.register("aggregate");
        assert!(!health.ready());
        health.set_connected("ingest", false);
        assert!(!health.snapshot()["ingest"].ready());
    }

    #[test]
    fn a_failed_role_is_neither_live_nor_ready() {
        let health = Health::default();
        health.register("ingest");
        assert!(health.live());
        health.set_failed("ingest");
        assert!(!health.live());
        assert!(!health.snapshot()["ingest"].ready());
    }

    fn key(partition: i32) -> (String, i32) {
        ("t".to_owned(), partition)
    }

    #[test]
    fn a_partition_stalls_when_messages_wait_and_its_position_does_not_move() {
        let t0 = Instant::now();
        let limit = Duration::from_secs(60);
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut watch = ProgressWatch::default();
        watch.assigned(&[key(0), key(1)]);
        watch.progressed("t", 0, 100, at(0));
        watch.observed("t", 0, 0, 100, at(0)); // caught up
        watch.observed("t", 1, 0, 0, at(0)); // empty
        assert!(watch.stalled(at(1000), limit).is_empty(), "nothing waits");
        watch.observed("t", 0, 0, 150, at(10)); // 50 messages arrive
        assert!(
            watch.stalled(at(70), limit).is_empty(),
            "60 s is not past the limit"
        );
        assert_eq!(watch.stalled(at(71), limit), [key(0)]);
        // Progress that leaves messages waiting restarts the clock; catching up ends it.
        watch.progressed("t", 0, 120, at(80));
        assert!(watch.stalled(at(140), limit).is_empty());
        assert_eq!(watch.stalled(at(141), limit), [key(0)]);
        watch.progressed("t", 0, 150, at(150));
        assert!(watch.stalled(at(1000), limit).is_empty());
        // A position that does not move forward is no progress.
        watch.observed("t", 0, 0, 160, at(1000));
        watch.progressed("t", 0, 150, at(1050));
        assert_eq!(watch.stalled(at(1061), limit), [key(0)]);
        // A revoked partition is not watched.
        watch.revoked(&[key(0)]);
        assert!(watch.stalled(at(5000), limit).is_empty());
    }

    #[test]
    fn without_a_known_position_messages_past_the_start_are_waiting() {
        let t0 = Instant::now();
        let limit = Duration::from_secs(5);
        let mut watch = ProgressWatch::default();
        watch.assigned(&[key(3)]);
        watch.observed("t", 3, 10, 10, t0);
        assert!(watch.stalled(t0 + limit * 2, limit).is_empty());
        watch.observed("t", 3, 10, 11, t0);
        assert_eq!(watch.stalled(t0 + limit * 2, limit), [key(3)]);
        // Receiving messages tells where the role is; processing them is what moves it.
        let mut watch2 = ProgressWatch::default();
        watch2.assigned(&[key(4)]);
        watch2.observed("t", 4, -1, 30, t0);
        assert!(
            watch2.stalled(t0 + limit * 2, limit).is_empty(),
            "start unknown"
        );
        watch2.received("t", 4, 20, t0);
        assert_eq!(watch2.stalled(t0 + limit * 2, limit), [key(4)]);
        watch2.progressed("t", 4, 30, t0 + limit * 2);
        assert!(watch2.stalled(t0 + limit * 10, limit).is_empty());
        // Messages in the role's hand wait even when the broker's end is not known (the
        // consumer is not polled while the role is stuck delivering).
        let mut watch3 = ProgressWatch::default();
        watch3.assigned(&[key(5)]);
        watch3.received("t", 5, 7, t0);
        watch3.received("t", 5, 8, t0);
        assert_eq!(watch3.stalled(t0 + limit * 2, limit), [key(5)]);
        watch3.progressed("t", 5, 8, t0 + limit * 2);
        assert_eq!(
            watch3.stalled(t0 + limit * 4, limit),
            [key(5)],
            "one still in hand"
        );
        watch3.progressed("t", 5, 9, t0 + limit * 4);
        assert!(watch3.stalled(t0 + limit * 10, limit).is_empty());
        // Partitions never assigned are ignored.
        watch.observed("t", 9, 0, 100, t0);
        assert_eq!(watch.stalled(t0 + limit * 2, limit).len(), 1);
    }

    #[test]
    fn stalls_count_against_liveness_only_while_connected() {
        let health = Health::new(Duration::from_secs(1));
        health.register("ingest");
        let t0 = Instant::now();
        health.progress("ingest", |w| {
            w.assigned(&[key(0)]);
            w.observed("t", 0, 0, 5, t0);
        });
        let later = t0 + Duration::from_secs(2);
        assert_eq!(health.snapshot_at(later)["ingest"].stalled, 0, "outage");
        health.set_connected("ingest", true);
        assert_eq!(
            health.snapshot_at(later)["ingest"].stalled,
            0,
            "producer outage"
        );
        health.set_producing("ingest", true);
        assert_eq!(health.snapshot_at(later)["ingest"].stalled, 0, "restoring");
        health.set_restored("ingest", true);
        assert_eq!(health.snapshot_at(later)["ingest"].stalled, 1);
        assert!(!health.snapshot_at(later)["ingest"].live());
    }
}
