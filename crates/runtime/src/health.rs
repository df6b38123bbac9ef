//! Liveness and readiness: each running role reports whether its clients reach a broker,
//! whether its consumer has joined its group, and whether its state is restored. `/readyz`
//! is ready only when every role is.

use std::collections::BTreeMap;
use std::sync::Mutex;

/// What one role reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RoleHealth {
    /// A broker connection is up.
    pub connected: bool,
    /// The consumer has received its (possibly empty) assignment.
    pub joined: bool,
    /// State for the assigned partitions is in place.
    pub restored: bool,
}

impl RoleHealth {
    /// Ready to do its work.
    pub fn ready(&self) -> bool {
        self.connected && self.joined && self.restored
    }
}

/// The health of every role in this process.
#[derive(Debug, Default)]
pub struct Health {
    roles: Mutex<BTreeMap<&'static str, RoleHealth>>,
}

impl Health {
    /// Registers a role, not yet ready.
    pub fn register(&self, role: &'static str) {
        self.update(role, |_| {});
    }

    fn update(&self, role: &'static str, change: impl FnOnce(&mut RoleHealth)) {
        let mut roles = self.roles.lock().unwrap_or_else(|e| e.into_inner());
        change(roles.entry(role).or_default());
    }

    /// Records whether the role reaches a broker.
    pub fn set_connected(&self, role: &'static str, connected: bool) {
        self.update(role, |h| h.connected = connected);
    }

    /// Records that the role's consumer joined its group.
    pub fn set_joined(&self, role: &'static str) {
        self.update(role, |h| h.joined = true);
    }

    /// Records whether the role's state is restored.
    pub fn set_restored(&self, role: &'static str, restored: bool) {
        self.update(role, |h| h.restored = restored);
    }

    /// Every role's health.
    pub fn snapshot(&self) -> BTreeMap<&'static str, RoleHealth> {
        self.roles.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// True when at least one role runs and all are ready.
    pub fn ready(&self) -> bool {
        let roles = self.snapshot();
        !roles.is_empty() && roles.values().all(RoleHealth::ready)
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
        health.set_joined("ingest");
        health.set_restored("ingest", true);
        assert!(health.ready());
        health.register("aggregate");
        assert!(!health.ready());
        health.set_connected("ingest", false);
        assert!(!health.snapshot()["ingest"].ready());
    }
}
