//! Accounts in the services: the aggregate role's share of them ([`OwnedAccounts`]: the
//! account books of the deltas partitions it owns, their snapshots on the state topic and
//! their summaries on the compacted view topic `npsflow.account-nps`), and the record every
//! instance reads back from that topic to answer `/v1/accounts` ([`AccountRow`]).
//!
//! An account's deltas and snapshots are keyed `account/<account_id>` on the deltas and state
//! topics, so an account lives on one partition, restored and fenced with it like a segment.
//! Its summary is published after every batch that changed it and whenever the account
//! window moves a step; an account with no response left in the window is deleted
//! (tombstones on the state and view topics), so both stay as small as the accounts that
//! answered within the window.

use std::collections::{BTreeMap, BTreeSet};

use npsflow_core::account::{account_key, KEY_PREFIX};
use npsflow_core::{
    AccountBook, AccountDelta, AccountSnapshot, AccountSummary, Applied, Span, Timestamp,
    WindowSpec, WindowSpecs,
};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::config::Config;
use crate::kafka::Outgoing;
use crate::metrics::Metrics;
use crate::state::{latest_snapshots, StoredRecord};

/// The account window of `config` (`analytics.account_window`, in 60 steps).
pub fn account_window(config: &Config) -> WindowSpec {
    let name = config.settings.analytics.account_window.trim();
    WindowSpecs::new(&[name], 60, Span(0))
        .ok()
        .and_then(|specs| specs.windows().first().cloned())
        .unwrap_or_else(|| {
            // Validated by the configuration; the default if it ever were not.
            WindowSpecs::new(&["28d"], 60, Span(0))
                .expect("28d is a window")
                .windows()[0]
                .clone()
        })
}

/// True if a deltas/state topic key is an account's.
pub fn is_account_key(key: &[u8]) -> bool {
    key.starts_with(KEY_PREFIX.as_bytes())
}

/// The accounts of the deltas partitions this process owns.
pub struct OwnedAccounts {
    window: WindowSpec,
    books: BTreeMap<i32, AccountBook>,
    state_topic: String,
    view_topic: String,
    /// The account window's step at the last full publication; `None` to publish all at the
    /// next tick (after a restore).
    published_step: Option<i64>,
}

impl OwnedAccounts {
    /// None owned yet.
    pub fn new(config: &Config) -> OwnedAccounts {
        let topics = &config.settings.topics;
        OwnedAccounts {
            window: account_window(config),
            books: BTreeMap::new(),
            state_topic: topics.state.clone(),
            view_topic: topics.account_view.clone(),
            published_step: None,
        }
    }

    /// How many accounts it holds.
    pub fn len(&self) -> usize {
        self.books.values().map(AccountBook::len).sum()
    }

    /// True if it holds none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Takes over `partition` with the account snapshots among its state records (the latest
    /// per account, or the one that applied the most if a stale writer left an older one after
    /// it); its accounts are published at the next tick.
    pub fn restore(
        &mut self,
        partition: i32,
        records: &[StoredRecord],
        metrics: &Metrics,
        now: Timestamp,
    ) {
        let latest: Vec<AccountSnapshot> = latest_snapshots(
            (&self.state_topic, partition),
            records,
            is_account_key,
            metrics,
        );
        let mut book = AccountBook::new(self.window.clone());
        for snapshot in &latest {
            book.restore(snapshot);
        }
        book.expire(now);
        self.books.insert(partition, book);
        self.published_step = None;
    }

    /// Gives up `partition`'s accounts (its new owner publishes them).
    pub fn drop_partition(&mut self, partition: i32) {
        self.books.remove(&partition);
    }

    /// Applies a delta read from `partition`, if this process owns it.
    pub fn apply(&mut self, partition: i32, delta: &AccountDelta) -> Option<Applied> {
        Some(self.books.get_mut(&partition)?.apply(delta))
    }

    /// The snapshot and the published summary of every account in `touched` (partition,
    /// account id).
    pub fn flush(&self, touched: BTreeSet<(i32, String)>, now: Timestamp, out: &mut Vec<Outgoing>) {
        for (partition, account) in touched {
            let Some(book) = self.books.get(&partition) else {
                continue;
            };
            self.write(book, partition, &account, now, out);
        }
    }

    /// When the account window moves its next step after `now`.
    pub fn next_step(&self, now: Timestamp) -> Timestamp {
        self.window.interval(now).1
    }

    /// At a new step of the account window (or after a restore): forgets the accounts left
    /// with no response in the window (tombstones for their snapshot and summary) and
    /// publishes every other account's summary, which moved with the window.
    pub fn tick(&mut self, now: Timestamp, out: &mut Vec<Outgoing>) {
        let step = self.window.bucket_of(now);
        if self.published_step == Some(step) {
            return;
        }
        self.published_step = Some(step);
        for (&partition, book) in &mut self.books {
            for account in book.expire(now) {
                out.push(Outgoing::new(
                    &self.state_topic,
                    Some(partition),
                    Some(account_key(&account).into_bytes()),
                    None,
                    None,
                ));
                out.push(Outgoing::new(
                    &self.view_topic,
                    None,
                    Some(account.into_bytes()),
                    None,
                    None,
                ));
            }
        }
        for book in self.books.values() {
            let mut accounts: Vec<&str> = book.accounts().collect();
            accounts.sort_unstable();
            for account in accounts {
                if let Some(summary) = book.summary(account, now) {
                    out.push(self.view_record(account, &summary, now));
                }
            }
        }
    }

    fn write(
        &self,
        book: &AccountBook,
        partition: i32,
        account: &str,
        now: Timestamp,
        out: &mut Vec<Outgoing>,
    ) {
        if let Some(snapshot) = book.snapshot(account) {
            out.push(Outgoing::new(
                &self.state_topic,
                Some(partition),
                Some(account_key(account).into_bytes()),
                Some(snapshot.to_json()),
                None,
            ));
        }
        if let Some(summary) = book.summary(account, now) {
            out.push(self.view_record(account, &summary, now));
        }
    }

    fn view_record(&self, account: &str, summary: &AccountSummary, now: Timestamp) -> Outgoing {
        let row = AccountRow::new(account, self.window.name(), summary, now);
        Outgoing::new(
            &self.view_topic,
            None,
            Some(account.as_bytes().to_vec()),
            Some(serde_json::to_vec(&row).unwrap_or_default()),
            None,
        )
    }
}

/// One account's summary as the view topic carries it (keyed by `account_id`) and every
/// instance keeps it: the account window's `[from, to)`, the counts, NPS, margin and band,
/// and when the owner computed it. Timestamps are RFC 3339 on the wire and numbers in memory
/// (an instance keeps one per account).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AccountRow {
    /// The account.
    pub account_id: String,
    /// The account window's name (`analytics.account_window`).
    pub window: String,
    /// Start of the interval, inclusive.
    #[serde(with = "rfc3339")]
    pub from: Timestamp,
    /// End of the interval, exclusive.
    #[serde(with = "rfc3339")]
    pub to: Timestamp,
    /// Responses in `[from, to)`.
    pub responses: u64,
    /// Promoters among them.
    pub promoters: u64,
    /// Passives among them.
    pub passives: u64,
    /// Detractors among them.
    pub detractors: u64,
    /// NPS; `null` with no responses.
    pub nps: Option<f64>,
    /// 95 % half-width of the NPS.
    pub ci95: Option<f64>,
    /// `high`, `medium` or `low`.
    pub band: Option<String>,
    /// When the owner computed it.
    #[serde(with = "rfc3339")]
    pub computed_at: Timestamp,
}

impl AccountRow {
    /// The row of `account`'s summary in `window`, computed at `now`.
    pub fn new(
        account: &str,
        window: &str,
        summary: &AccountSummary,
        now: Timestamp,
    ) -> AccountRow {
        AccountRow {
            account_id: account.to_owned(),
            window: window.to_owned(),
            from: summary.from,
            to: summary.to,
            responses: summary.tally.responses(),
            promoters: summary.tally.promoters,
            passives: summary.tally.passives,
            detractors: summary.tally.detractors,
            nps: summary.tally.nps(),
            ci95: summary.tally.ci95(),
            band: summary.tally.band().map(|b| b.as_str().to_owned()),
            computed_at: now,
        }
    }
}

/// Timestamps as RFC 3339 text.
mod rfc3339 {
    use super::*;

    pub fn serialize<S: Serializer>(t: &Timestamp, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&t.to_rfc3339())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Timestamp, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        Timestamp::parse_rfc3339(&text)
            .ok_or_else(|| serde::de::Error::custom("not an RFC 3339 timestamp"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: Timestamp = Timestamp(1_795_348_800_000);
    const DAY: i64 = 86_400_000;

    fn config() -> Config {
        Config::load(None, Vec::<(String, String)>::new()).expect("defaults")
    }

    fn keys(out: &[Outgoing], topic: &str) -> Vec<(String, bool)> {
        out.iter()
            .filter(|r| r.topic == topic)
            .map(|r| {
                (
                    String::from_utf8(r.key.clone().expect("key")).expect("UTF-8"),
                    r.payload.is_some(),
                )
            })
            .collect()
    }

    /// Owned accounts: applied, snapshotted and published; restored by a new owner with the
    /// same numbers; deleted (tombstones) once the window has left them behind.
    /// Of an account's snapshots on the state topic, restore keeps the one that applied the
    /// most, even when a stale writer (a zombie) left an older one after it.
    #[test]
    fn restore_keeps_the_snapshot_that_is_further_along() {
        let config = config();
        let step = account_window(&config).bucket_of(Timestamp(NOW.0 - DAY));
        let snapshot = |offset: i64, promoters: u32| AccountSnapshot {
            account: "acme".into(),
            high_water: vec![(0, offset)],
            steps: vec![(step, promoters, 0, 0)],
        };
        let record = |offset: i64, snapshot: AccountSnapshot| StoredRecord {
            offset,
            key: Some(account_key("acme").into_bytes()),
            payload: Some(snapshot.to_json()),
        };
        let records = [record(0, snapshot(10, 2)), record(1, snapshot(5, 1))];
        let mut owned = OwnedAccounts::new(&config);
        owned.restore(0, &records, &Metrics::new(), NOW);
        let delta = AccountDelta {
            account: "acme".into(),
            partition: 0,
            responses: vec![(7, NOW.0 - DAY, 10), (11, NOW.0 - DAY, 10)],
        };
        let applied = owned.apply(0, &delta).expect("owned");
        assert_eq!(
            (applied.skipped, applied.counted),
            (1, 1),
            "high water 10 kept"
        );
    }

    #[test]
    fn apply_publish_restore_and_expire() {
        let config = config();
        let topics = config.settings.topics.clone();
        let metrics = Metrics::new();
        let mut owned = OwnedAccounts::new(&config);
        owned.restore(0, &[], &metrics, NOW);
        let delta = AccountDelta {
            account: "acme".into(),
            partition: 4,
            responses: vec![(1, NOW.0 - DAY, 10), (2, NOW.0 - DAY, 3)],
        };
        assert!(owned.apply(1, &delta).is_none(), "partition 1 is not owned");
        assert_eq!(owned.apply(0, &delta).map(|a| a.counted), Some(2));
        let mut out = Vec::new();
        owned.flush([(0, "acme".to_owned())].into(), NOW, &mut out);
        assert_eq!(
            keys(&out, &topics.state),
            [("account/acme".to_owned(), true)]
        );
        assert_eq!(
            keys(&out, &topics.account_view),
            [("acme".to_owned(), true)]
        );
        let row: AccountRow =
            serde_json::from_slice(out[1].payload.as_deref().expect("row")).expect("JSON");
        assert_eq!((row.responses, row.nps), (2, Some(0.0)));
        assert_eq!(row.window, "28d");
        assert_eq!(row.computed_at, NOW);
        let text: serde_json::Value =
            serde_json::from_slice(out[1].payload.as_deref().expect("row")).expect("JSON");
        assert!(text["from"].as_str().expect("text").ends_with('Z'));

        // A new owner, from the state records (a segment's record among them is not its).
        let mut records = vec![StoredRecord {
            offset: 0,
            key: Some(b"all".to_vec()),
            payload: Some(b"{}".to_vec()),
        }];
        records.push(StoredRecord {
            offset: 1,
            key: out[0].key.clone(),
            payload: out[0].payload.clone(),
        });
        let mut second = OwnedAccounts::new(&config);
        second.restore(0, &records, &metrics, NOW);
        assert_eq!(second.len(), 1);
        assert_eq!(second.apply(0, &delta).map(|a| a.skipped), Some(2));
        let mut published = Vec::new();
        second.tick(NOW, &mut published);
        assert_eq!(
            keys(&published, &topics.account_view),
            [("acme".to_owned(), true)]
        );
        let mut again = Vec::new();
        second.tick(NOW, &mut again);
        assert!(again.is_empty(), "nothing moved");

        // Past the window: deleted from the state and the view.
        let mut expired = Vec::new();
        second.tick(Timestamp(NOW.0 + 30 * DAY), &mut expired);
        assert_eq!(
            keys(&expired, &topics.state),
            [("account/acme".to_owned(), false)]
        );
        assert_eq!(
            keys(&expired, &topics.account_view),
            [("acme".to_owned(), false)]
        );
        assert!(second.is_empty());
    }
}
