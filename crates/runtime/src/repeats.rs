//! Rate limiting of repeated log lines: a broker that cannot be reached makes librdkafka
//! report the same error many times a second, per client. The first of a kind is logged;
//! identical ones (same key: client and error code) within [`Repeats::window`] of the last
//! logged are only counted, and said as "repeated N times in the last Xs" with the next one
//! logged after the window, or by [`Repeats::due`] when the window has passed without one.
//! Pure: the caller passes the time in. Metrics are counted by the caller for every
//! occurrence, logged or not.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// The window of the Kafka clients' error and log lines.
pub const WINDOW: Duration = Duration::from_secs(30);

/// What to do with one occurrence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Log it; `repeated` identical ones were suppressed since the last logged, over `over`.
    Log {
        /// How many were suppressed (0: none, or the first of its kind).
        repeated: u64,
        /// Since the last one logged.
        over: Duration,
    },
    /// Identical to one logged within the window: counted, not logged.
    Suppress,
}

/// A summary owed: `repeated` suppressed occurrences of `key` over `over`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// The key.
    pub key: String,
    /// How many were suppressed.
    pub repeated: u64,
    /// Since the last one logged.
    pub over: Duration,
}

#[derive(Debug, Clone, Copy)]
struct Seen {
    logged_at: Instant,
    suppressed: u64,
}

/// The keys seen lately, when each was last logged and how many were suppressed since.
#[derive(Debug)]
pub struct Repeats {
    window: Duration,
    seen: HashMap<String, Seen>,
}

impl Default for Repeats {
    fn default() -> Self {
        Repeats::new(WINDOW)
    }
}

impl Repeats {
    /// A limiter that logs a key at most once per `window`.
    pub fn new(window: Duration) -> Repeats {
        Repeats {
            window,
            seen: HashMap::new(),
        }
    }

    /// The window.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// One occurrence of `key` at `now`.
    pub fn check(&mut self, key: &str, now: Instant) -> Verdict {
        match self.seen.get_mut(key) {
            Some(seen) if now.saturating_duration_since(seen.logged_at) < self.window => {
                seen.suppressed += 1;
                Verdict::Suppress
            }
            Some(seen) => {
                let verdict = Verdict::Log {
                    repeated: seen.suppressed,
                    over: now.saturating_duration_since(seen.logged_at),
                };
                *seen = Seen {
                    logged_at: now,
                    suppressed: 0,
                };
                verdict
            }
            None => {
                self.seen.insert(
                    key.to_owned(),
                    Seen {
                        logged_at: now,
                        suppressed: 0,
                    },
                );
                Verdict::Log {
                    repeated: 0,
                    over: Duration::ZERO,
                }
            }
        }
    }

    /// The summaries owed at `now`: every key with suppressed occurrences whose window has
    /// passed (its count starts again, so the next occurrence is logged as new). Keys quiet
    /// for a whole window are forgotten. Call it now and then (a client's statistics
    /// callback, every second).
    pub fn due(&mut self, now: Instant) -> Vec<Summary> {
        let window = self.window;
        let mut owed = Vec::new();
        self.seen.retain(|key, seen| {
            let over = now.saturating_duration_since(seen.logged_at);
            if over < window {
                return true;
            }
            if seen.suppressed > 0 {
                owed.push(Summary {
                    key: key.clone(),
                    repeated: seen.suppressed,
                    over,
                });
            }
            false
        });
        owed.sort_by(|a, b| a.key.cmp(&b.key));
        owed
    }
}

/// "repeated 57 times in the last 30s".
pub fn describe(repeated: u64, over: Duration) -> String {
    let times = if repeated == 1 { "time" } else { "times" };
    format!(
        "repeated {repeated} {times} in the last {}s",
        over.as_secs()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn the_first_is_logged_and_identical_ones_within_the_window_are_counted() {
        let t0 = Instant::now();
        let mut repeats = Repeats::new(30 * S);
        assert_eq!(
            repeats.check("ingest|AllBrokersDown", t0),
            Verdict::Log {
                repeated: 0,
                over: Duration::ZERO
            }
        );
        for i in 1..=57 {
            assert_eq!(
                repeats.check("ingest|AllBrokersDown", t0 + Duration::from_millis(i * 100)),
                Verdict::Suppress
            );
        }
        // Another client or another code is its own kind.
        assert!(matches!(
            repeats.check("aggregate|AllBrokersDown", t0 + S),
            Verdict::Log { repeated: 0, .. }
        ));
        assert!(matches!(
            repeats.check("ingest|BrokerTransportFailure", t0 + S),
            Verdict::Log { repeated: 0, .. }
        ));
        // After the window the next is logged with how many were suppressed.
        assert_eq!(
            repeats.check("ingest|AllBrokersDown", t0 + 31 * S),
            Verdict::Log {
                repeated: 57,
                over: 31 * S
            }
        );
        assert_eq!(
            repeats.check("ingest|AllBrokersDown", t0 + 32 * S),
            Verdict::Suppress
        );
    }

    #[test]
    fn a_summary_is_owed_when_the_window_passes_without_another() {
        let t0 = Instant::now();
        let mut repeats = Repeats::new(30 * S);
        repeats.check("producer|BrokerTransportFailure", t0);
        repeats.check("producer|BrokerTransportFailure", t0 + S);
        repeats.check("producer|BrokerTransportFailure", t0 + 2 * S);
        repeats.check("consumer|AllBrokersDown", t0);
        assert!(repeats.due(t0 + 29 * S).is_empty(), "the window is open");
        assert_eq!(
            repeats.due(t0 + 30 * S),
            vec![Summary {
                key: "producer|BrokerTransportFailure".into(),
                repeated: 2,
                over: 30 * S
            }],
            "only the key with suppressed ones is summarised"
        );
        assert!(repeats.due(t0 + 31 * S).is_empty(), "said once");
        // Forgotten: the next one is logged as new.
        assert_eq!(
            repeats.check("producer|BrokerTransportFailure", t0 + 40 * S),
            Verdict::Log {
                repeated: 0,
                over: Duration::ZERO
            }
        );
    }

    #[test]
    fn the_summary_reads_as_a_sentence() {
        assert_eq!(describe(57, 30 * S), "repeated 57 times in the last 30s");
        assert_eq!(describe(1, 31 * S), "repeated 1 time in the last 31s");
    }
}
