//! Memory of accounts (a benchmark, not a test): what the aggregate role keeps for 100,000
//! accounts (their sparse books) and what every instance keeps to answer `/v1/accounts` (the
//! account view table), as the growth of the resident set while building each, every case in
//! a process of its own (so memory freed by one is not reused by the next). Run with
//! `cargo bench -p npsflow-runtime --bench accounts_memory`; the figures are in BENCHMARKS.md.

use npsflow_core::{AccountBook, AccountDelta, Timestamp};
use npsflow_runtime::accounts::{account_window, AccountRow};
use npsflow_runtime::config::Config;

const ACCOUNTS: usize = 100_000;
const NOW: Timestamp = Timestamp(1_795_348_800_000);
const DAY: i64 = 86_400_000;

/// The resident set, in bytes (Linux).
fn live() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: usize = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

fn main() {
    let mut args = std::env::args().skip(1);
    match (args.next().as_deref(), args.next()) {
        (Some("--case"), Some(case)) => measure(&case),
        _ => {
            for case in ["book-1", "book-4", "book-20", "table"] {
                let status = std::process::Command::new(std::env::current_exe().expect("exe"))
                    .args(["--case", case])
                    .status()
                    .expect("run a case");
                assert!(status.success(), "{case}");
            }
        }
    }
}

fn measure(case: &str) {
    let config = Config::load(None, Vec::<(String, String)>::new()).expect("defaults");
    let window = account_window(&config);
    if let Some(n) = case.strip_prefix("book-") {
        let responses_per_account: usize = n.parse().expect("a number");
        let before = live();
        let mut book = AccountBook::new(window.clone());
        for a in 0..ACCOUNTS {
            let responses = (0..responses_per_account)
                .map(|r| {
                    let position = (a * responses_per_account + r) as i64;
                    let at = NOW.0 - ((a + r * 7) as i64 % 27) * DAY;
                    (position, at, ((a + r) % 11) as u8)
                })
                .collect();
            book.apply(&AccountDelta {
                account: format!("account-{a:08}"),
                partition: (a % 6) as i32,
                responses,
            });
        }
        let bytes = live() - before;
        println!(
            "account book: {ACCOUNTS} accounts x {responses_per_account} responses: {:.1} MiB, {} bytes per account",
            bytes as f64 / (1 << 20) as f64,
            bytes / ACCOUNTS
        );
        drop(book);
        return;
    }
    let before = live();
    let table: std::collections::BTreeMap<String, AccountRow> = (0..ACCOUNTS)
        .map(|a| {
            let id = format!("account-{a:08}");
            let row = serde_json::json!({
                "account_id": id, "window": "28d", "from": "2026-11-09T16:00:00.000Z",
                "to": "2026-12-07T16:00:00.000Z", "responses": 4, "promoters": 2,
                "passives": 1, "detractors": 1, "nps": 25.0, "ci95": 80.1, "band": "low",
                "computed_at": "2026-12-07T05:00:00.000Z",
            });
            (id, serde_json::from_value(row).expect("row"))
        })
        .collect();
    let bytes = live() - before;
    println!(
        "account view table (every instance): {ACCOUNTS} accounts: {:.1} MiB, {} bytes per account",
        bytes as f64 / (1 << 20) as f64,
        bytes / ACCOUNTS
    );
    drop(table);
}
