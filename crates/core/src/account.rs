//! Accounts (B2B): per `account_id`, the NPS of the responses in one rolling window
//! (`analytics.account_window`, default 28d), kept sparse because accounts are many and most
//! answer rarely.
//!
//! Ingest sends, per batch and input partition, an [`AccountDelta`] per account (keyed so
//! that an account always lands on one partition of the deltas topic); the aggregator that
//! owns the partition applies it to its [`AccountBook`] at most once per response, as it
//! does segment deltas (a high-water mark per input partition), snapshots it
//! ([`AccountSnapshot`]) and publishes its [`AccountSummary`].
//!
//! Memory: an account holds only the window steps that have responses (at most the
//! window's 60 steps, 16 bytes each) and a mark per input partition that sent it some; an
//! account with no response left in the window is forgotten ([`AccountBook::expire`]).
//! So memory grows with the accounts that answered within the window, not with all accounts
//! ever seen, and never with metric series (accounts are never metric labels).

use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};

use crate::delta::{check_responses, Applied, BadDelta, DeltaResponse};
use crate::nps::{Score, Tally};
use crate::time::Timestamp;
use crate::window::WindowSpec;

/// The key prefix that marks an account's records on the deltas and state topics
/// (`account/<account_id>`); segment names never take this form (they are `all` or contain
/// `=`).
pub const KEY_PREFIX: &str = "account/";

/// The deltas/state topic key of an account.
pub fn account_key(account_id: &str) -> String {
    format!("{KEY_PREFIX}{account_id}")
}

/// One account's share of an ingest batch from one input partition.
///
/// Wire format (JSON, keyed `account/<account_id>` on the deltas topic):
/// `{"account":"acme","partition":3,"responses":[[1041,1795348800000,9]]}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountDelta {
    /// The `account_id`.
    pub account: String,
    /// The input partition the responses came from.
    pub partition: i32,
    /// `[position, event time in ms, score]` per response, in position order.
    pub responses: Vec<DeltaResponse>,
}

impl AccountDelta {
    /// The JSON message body.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a delta always serialises")
    }

    /// Parses and checks an account delta.
    pub fn from_json(bytes: &[u8]) -> Result<AccountDelta, BadDelta> {
        let delta: AccountDelta =
            serde_json::from_slice(bytes).map_err(|e| BadDelta(format!("account: {e}")))?;
        if delta.account.is_empty() {
            return Err(BadDelta("empty account".into()));
        }
        check_responses(&delta.responses)?;
        Ok(delta)
    }
}

/// One account's durable state, on the state topic keyed `account/<account_id>`.
///
/// Wire format: `{"account":"acme","high_water":[[0,1041]],"steps":[[29921879,3,1,2]]}`,
/// each step `[step number, promoters, passives, detractors]` with steps of the account
/// window's resolution.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountSnapshot {
    /// The `account_id`.
    pub account: String,
    /// `(input partition, highest position applied)`.
    pub high_water: Vec<(i32, i64)>,
    /// `[step, promoters, passives, detractors]`, steps ascending.
    pub steps: Vec<(i64, u32, u32, u32)>,
}

impl AccountSnapshot {
    /// True if this snapshot has applied at least everything `other` has, for every input
    /// partition: of two snapshots of an account, restore the one that is further along.
    pub fn covers(&self, other: &AccountSnapshot) -> bool {
        crate::delta::covers(&self.high_water, &other.high_water)
    }

    /// The JSON message body.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a snapshot always serialises")
    }

    /// Parses a snapshot message.
    pub fn from_json(bytes: &[u8]) -> Result<AccountSnapshot, BadDelta> {
        serde_json::from_slice(bytes).map_err(|e| BadDelta(format!("account snapshot: {e}")))
    }
}

/// An account's numbers over the account window at some `now`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AccountSummary {
    /// Start of the interval, inclusive.
    pub from: Timestamp,
    /// End of the interval, exclusive.
    pub to: Timestamp,
    /// The responses in `[from, to)` (their NPS, margin and band: [`Tally::nps`],
    /// [`Tally::ci95`], [`Tally::band`]).
    pub tally: Tally,
}

impl AccountSummary {
    /// The summary of a tally of the responses in `[from, to)`.
    pub fn of(tally: Tally, from: Timestamp, to: Timestamp) -> AccountSummary {
        AccountSummary { from, to, tally }
    }
}

#[derive(Debug, Clone, Default)]
struct Account {
    /// `(step, [promoters, passives, detractors])`, steps ascending, only steps with counts.
    steps: Vec<(i64, [u32; 3])>,
    high_water: Vec<(i32, i64)>,
}

/// Every account an aggregator owns (one input partition's worth, or more).
#[derive(Debug, Clone)]
pub struct AccountBook {
    window: WindowSpec,
    accounts: FxHashMap<String, Account>,
}

impl AccountBook {
    /// An empty book over `window`.
    pub fn new(window: WindowSpec) -> AccountBook {
        AccountBook {
            window,
            accounts: FxHashMap::default(),
        }
    }

    /// The account window.
    pub fn window(&self) -> &WindowSpec {
        &self.window
    }

    /// How many accounts it holds.
    pub fn len(&self) -> usize {
        self.accounts.len()
    }

    /// True if it holds none.
    pub fn is_empty(&self) -> bool {
        self.accounts.is_empty()
    }

    /// Every account id it holds.
    pub fn accounts(&self) -> impl Iterator<Item = &str> {
        self.accounts.keys().map(String::as_str)
    }

    /// Counts the responses of a delta that were not applied before.
    pub fn apply(&mut self, delta: &AccountDelta) -> Applied {
        let account = self.accounts.entry(delta.account.clone()).or_default();
        let mark = match account
            .high_water
            .iter()
            .position(|(p, _)| *p == delta.partition)
        {
            Some(i) => i,
            None => {
                account.high_water.push((delta.partition, i64::MIN));
                account.high_water.len() - 1
            }
        };
        let mut applied = Applied::default();
        for &(position, at, score) in &delta.responses {
            let Some(score) = Score::new(i64::from(score)) else {
                continue;
            };
            if position <= account.high_water[mark].1 {
                applied.skipped += 1;
                continue;
            }
            account.high_water[mark].1 = position;
            let step = self.window.bucket_of(Timestamp(at));
            let slot = match account.steps.binary_search_by_key(&step, |s| s.0) {
                Ok(i) => i,
                Err(i) => {
                    account.steps.insert(i, (step, [0; 3]));
                    i
                }
            };
            let count = &mut account.steps[slot].1[score.category() as usize];
            *count = count.saturating_add(1);
            applied.counted += 1;
        }
        applied
    }

    /// An account's numbers at `now`, if the book holds it.
    pub fn summary(&self, account_id: &str, now: Timestamp) -> Option<AccountSummary> {
        let account = self.accounts.get(account_id)?;
        let (from, to) = self.window.interval(now);
        let (first, last) = (self.window.bucket_of(from), self.window.bucket_of(to) - 1);
        let mut counts = [0u64; 3];
        for (_, step) in account
            .steps
            .iter()
            .filter(|(s, _)| (first..=last).contains(s))
        {
            for (total, count) in counts.iter_mut().zip(step) {
                *total += u64::from(*count);
            }
        }
        let tally = Tally {
            promoters: counts[0],
            passives: counts[1],
            detractors: counts[2],
            invitations: 0,
        };
        Some(AccountSummary::of(tally, from, to))
    }

    /// Forgets every step before the window at `now` and every account left with none;
    /// returns the accounts forgotten (their snapshots and published summaries are to be
    /// deleted).
    pub fn expire(&mut self, now: Timestamp) -> Vec<String> {
        let (from, _) = self.window.interval(now);
        let first = self.window.bucket_of(from);
        let mut gone = Vec::new();
        self.accounts.retain(|id, account| {
            account.steps.retain(|(step, _)| *step >= first);
            if account.steps.is_empty() {
                gone.push(id.clone());
            }
            !account.steps.is_empty()
        });
        gone.sort_unstable();
        gone
    }

    /// An account's snapshot, if the book holds it.
    pub fn snapshot(&self, account_id: &str) -> Option<AccountSnapshot> {
        let account = self.accounts.get(account_id)?;
        let mut high_water = account.high_water.clone();
        high_water.sort_unstable();
        Some(AccountSnapshot {
            account: account_id.to_owned(),
            high_water,
            steps: account
                .steps
                .iter()
                .map(|(step, [p, n, d])| (*step, *p, *n, *d))
                .collect(),
        })
    }

    /// Replaces an account's state with a snapshot's.
    pub fn restore(&mut self, snapshot: &AccountSnapshot) {
        let mut steps: Vec<(i64, [u32; 3])> = snapshot
            .steps
            .iter()
            .map(|&(step, p, n, d)| (step, [p, n, d]))
            .collect();
        steps.sort_unstable_by_key(|s| s.0);
        steps.dedup_by_key(|s| s.0);
        self.accounts.insert(
            snapshot.account.clone(),
            Account {
                steps,
                high_water: snapshot.high_water.clone(),
            },
        );
    }

    /// Forgets an account.
    pub fn remove(&mut self, account_id: &str) {
        self.accounts.remove(account_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::Span;
    use crate::window::WindowSpecs;

    const DAY: i64 = 86_400_000;
    const NOW: Timestamp = Timestamp(1_795_348_800_000);

    fn book() -> AccountBook {
        let specs = WindowSpecs::new(&["28d"], 60, Span(0)).expect("valid");
        AccountBook::new(specs.windows()[0].clone())
    }

    fn delta(account: &str, partition: i32, responses: &[(i64, i64, u8)]) -> AccountDelta {
        AccountDelta {
            account: account.into(),
            partition,
            responses: responses.to_vec(),
        }
    }

    /// The naive answer: the responses in [from, to) of the window at `now`.
    fn naive(responses: &[(i64, u8)], window: &WindowSpec, now: Timestamp) -> Tally {
        let (from, to) = window.interval(now);
        let mut tally = Tally::default();
        for &(at, score) in responses {
            if from.millis() <= at && at < to.millis() {
                let category = Score::new(i64::from(score)).expect("score").category();
                tally += Tally::of(category, 1);
            }
        }
        tally
    }

    #[test]
    fn counts_each_response_once_within_the_window() {
        let mut book = book();
        let responses = [
            (NOW.0 - DAY, 10),
            (NOW.0 - 10 * DAY, 2),
            (NOW.0 - 27 * DAY, 8),
        ];
        let first = delta(
            "acme",
            0,
            &[
                (1, responses[0].0, responses[0].1),
                (2, responses[1].0, responses[1].1),
            ],
        );
        assert_eq!(book.apply(&first).counted, 2);
        assert_eq!(book.apply(&first).skipped, 2, "a replay counts nothing");
        let second = delta("acme", 1, &[(1, responses[2].0, responses[2].1)]);
        assert_eq!(
            book.apply(&second).counted,
            1,
            "partitions have their own marks"
        );
        let summary = book.summary("acme", NOW).expect("known");
        assert_eq!(summary.tally, naive(&responses, book.window(), NOW));
        assert_eq!(summary.tally.responses(), 3);
        assert_eq!(summary.tally.nps(), Some(0.0));
        assert_eq!(book.summary("other", NOW), None);
        // Two days on, the oldest response has left the window.
        let later = Timestamp(NOW.0 + 2 * DAY);
        let moved = book.summary("acme", later).expect("known");
        assert_eq!(moved.tally, naive(&responses, book.window(), later));
        assert_eq!(moved.tally.responses(), 2);
        assert!(book.expire(later).is_empty());
        // A month on, nothing is left: the account is forgotten.
        let gone = book.expire(Timestamp(NOW.0 + 40 * DAY));
        assert_eq!(gone, ["acme"]);
        assert!(book.is_empty());
    }

    #[test]
    fn snapshots_restore_the_same_numbers_and_marks() {
        let mut book = book();
        let d = delta("acme", 3, &[(5, NOW.0 - DAY, 0), (6, NOW.0 - 2 * DAY, 9)]);
        book.apply(&d);
        let snapshot = book.snapshot("acme").expect("known");
        let json = snapshot.to_json();
        assert_eq!(AccountSnapshot::from_json(&json), Ok(snapshot.clone()));
        let mut restored = self::book();
        restored.restore(&snapshot);
        assert_eq!(restored.summary("acme", NOW), book.summary("acme", NOW));
        assert_eq!(restored.apply(&d).skipped, 2, "the marks came along");
        assert!(
            AccountDelta::from_json(br#"{"account":"","partition":0,"responses":[]}"#).is_err()
        );
        assert!(AccountDelta::from_json(
            br#"{"account":"a","partition":0,"responses":[[2,0,1],[1,0,1]]}"#
        )
        .is_err());
        assert_eq!(AccountDelta::from_json(&d.to_json()), Ok(d));
        assert_eq!(account_key("acme"), "account/acme");
    }
}
