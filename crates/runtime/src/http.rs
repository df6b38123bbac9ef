//! The HTTP server: `/metrics` (Prometheus text), `/healthz`, `/readyz`, the segment API
//! `/v1/segments` and `/v1/segments/{segment}?window=7d`, and the case API `/v1/cases`
//! (`?owner=&state=&overdue=true&limit=`) and `/v1/cases/{case_id}`, answered from the case
//! directory ([`crate::directory`]) on every instance, and the account API
//! `/v1/accounts/{account_id}` and `/v1/accounts?at_risk=true&limit=`, from the account view
//! topic joined with the cases.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use crate::directory::CaseDirectory;
use crate::health::Health;
use crate::metrics::Metrics;
use crate::view::AggregateView;

/// What the handlers read.
#[derive(Clone)]
pub struct AppState {
    /// Metrics registry.
    pub metrics: Metrics,
    /// Role health.
    pub health: Arc<Health>,
    /// Segment windows, if the aggregate role runs here.
    pub view: Option<Arc<RwLock<AggregateView>>>,
    /// Every segment summary from the view topic, by `<window>|<segment>`.
    pub segment_view: Arc<crate::directory::SegmentViewTable>,
    /// The configured windows' names, in order.
    pub windows: Vec<String>,
    /// Every account summary from the account view topic, by `account_id`.
    pub account_view: Arc<crate::directory::Table<crate::accounts::AccountRow>>,
    /// The account window (`analytics.account_window`).
    pub account_window: npsflow_core::WindowSpec,
    /// `analytics.at_risk_below`: an account whose NPS is below it is at risk.
    pub at_risk_below: f64,
    /// Every follow-up case, unless this process does not read them.
    pub cases: Option<Arc<CaseDirectory>>,
    /// The process's clock (overdue cases, window ends).
    pub clock: Arc<dyn crate::engine::Clock>,
}

/// The router with every endpoint.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/v1/segments", get(segments))
        .route("/v1/segments/{segment}", get(segment))
        .route("/v1/cases", get(cases))
        .route("/v1/cases/{case_id}", get(case))
        .route("/v1/accounts", get(accounts))
        .route("/v1/accounts/{account_id}", get(account))
        .with_state(state)
}

/// Serves the router on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

/// Binds the listen address.
pub async fn bind(address: &str) -> std::io::Result<(tokio::net::TcpListener, SocketAddr)> {
    let listener = tokio::net::TcpListener::bind(address).await?;
    let local = listener.local_addr()?;
    Ok((listener, local))
}

/// The text exposition, sent in pieces as they are written (with many segments the whole text
/// is tens of megabytes, never held at once).
async fn metrics(State(state): State<AppState>) -> Response {
    let pieces = state.metrics.exposition_with(&state.health);
    let body = axum::body::Body::from_stream(futures::stream::iter(
        pieces.map(Ok::<_, std::convert::Infallible>),
    ));
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

/// Liveness: 200 while every role runs and no partition is stalled; 503 with the reason per
/// role otherwise, so an orchestrator restarts the process.
async fn healthz(State(state): State<AppState>) -> Response {
    let roles: serde_json::Map<String, Value> = state
        .health
        .snapshot()
        .into_iter()
        .map(|(role, h)| {
            let value =
                json!({ "live": h.live(), "failed": h.failed, "stalled_partitions": h.stalled });
            (role.to_owned(), value)
        })
        .collect();
    let live = roles.values().all(|r| r["live"] == json!(true));
    let status = if live {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(json!({ "live": live, "roles": roles }))).into_response()
}

async fn readyz(State(state): State<AppState>) -> Response {
    let roles: serde_json::Map<String, Value> = state
        .health
        .snapshot()
        .into_iter()
        .map(|(role, h)| {
            let value = json!({
                "ready": h.ready(), "connected": h.connected, "producing": h.producing, "joined": h.joined,
                "restored": h.restored,
            });
            (role.to_owned(), value)
        })
        .collect();
    let ready = state.health.ready();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(json!({ "ready": ready, "roles": roles }))).into_response()
}

fn error(status: StatusCode, message: String) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}

/// Query parameter `name`, `true` or `false` if given; anything else is a bad request (the
/// error says why).
fn flag(query: &HashMap<String, String>, name: &str) -> Result<Option<bool>, String> {
    match query.get(name).map(String::as_str) {
        None => Ok(None),
        Some("true") => Ok(Some(true)),
        Some("false") => Ok(Some(false)),
        Some(_) => Err(format!("{name} is true or false")),
    }
}

/// Query parameter `limit`, a whole number from 1 to `max` (`default` if not given);
/// anything else is a bad request (the error says why).
fn limit(query: &HashMap<String, String>, default: usize, max: usize) -> Result<usize, String> {
    match query.get("limit").map(|l| l.parse::<usize>()) {
        None => Ok(default),
        Some(Ok(n)) if (1..=max).contains(&n) => Ok(n),
        Some(_) => Err(format!("limit is a whole number from 1 to {max}")),
    }
}

/// A path parameter that cannot be read (not UTF-8 once percent-decoded): a JSON error like
/// every other, instead of axum's plain-text one.
fn bad_path(rejection: PathRejection) -> Response {
    error(rejection.status(), rejection.body_text())
}

/// The `window` query parameter, if given and known; else the 400 message.
fn check_window(
    windows: &[String],
    query: &HashMap<String, String>,
) -> Result<Option<String>, String> {
    match query.get("window") {
        None => Ok(None),
        Some(window) if windows.contains(window) => Ok(Some(window.clone())),
        Some(window) => Err(format!(
            "unknown window {window:?}; windows are {}",
            windows.join(", ")
        )),
    }
}

/// The segment summaries (optionally one segment's, one window's), in segment then window
/// order, each saying where it comes from and how fresh it is: a segment this process owns
/// is computed now from its windows (`as_of.source` `owner`); any other comes from the view
/// topic, as its owner last published it (`view`). So every instance answers for every
/// segment, and the same once the owners' latest summaries are read.
fn segment_rows(state: &AppState, segment: Option<&str>, window: Option<&str>) -> Vec<Value> {
    let now = state.clock.now();
    let order = |w: &str| state.windows.iter().position(|known| known == w);
    let wanted =
        |name: &str, w: &str| segment.is_none_or(|s| s == name) && window.is_none_or(|x| x == w);
    let mut rows: BTreeMap<(String, usize), Value> = BTreeMap::new();
    let caught_up_at = state.segment_view.caught_up_at();
    for (key, row) in state.segment_view.read().iter() {
        let Some((w, name)) = key.split_once('|') else {
            continue;
        };
        let (Some(index), true) = (order(w), wanted(name, w)) else {
            continue;
        };
        // Parsed only when served: the table keeps each record's text (see the table).
        let Ok(row) = serde_json::from_str::<Value>(row.get()) else {
            continue;
        };
        let computed_at = row["computed_at"]
            .as_str()
            .and_then(npsflow_core::Timestamp::parse_rfc3339);
        let as_of = json!({
            "source": "view",
            "computed_at": computed_at.map(|t| t.to_rfc3339()),
            "age_seconds": computed_at.map(|t| (now.millis() - t.millis()).max(0) as f64 / 1000.0),
            "caught_up_at": caught_up_at.map(|t| t.to_rfc3339()),
        });
        rows.insert((name.to_owned(), index), with_as_of(row, as_of));
    }
    if let Some(view) = &state.view {
        let view = view.read().unwrap_or_else(|e| e.into_inner());
        let owned = match segment {
            Some(name) => view.segment(name, now).unwrap_or_default(),
            None => view.rows(now),
        };
        for row in owned.into_iter().filter(|r| wanted(&r.segment, &r.window)) {
            let Some(index) = order(&row.window) else {
                continue;
            };
            let as_of = json!({
                "source": "owner",
                "computed_at": now.to_rfc3339(),
                "age_seconds": 0.0,
                "caught_up_at": now.to_rfc3339(),
            });
            rows.insert(
                (row.segment.clone(), index),
                with_as_of(row.to_json(now), as_of),
            );
        }
    }
    rows.into_values().collect()
}

/// A summary as the API serves it: the view record's `computed_at` moves into `as_of`.
fn with_as_of(mut row: Value, as_of: Value) -> Value {
    if let Value::Object(fields) = &mut row {
        fields.remove("computed_at");
        fields.insert("as_of".into(), as_of);
    }
    row
}

async fn segments(
    State(state): State<AppState>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    match check_window(&state.windows, &query) {
        Ok(window) => {
            Json(Value::Array(segment_rows(&state, None, window.as_deref()))).into_response()
        }
        Err(message) => error(StatusCode::BAD_REQUEST, message),
    }
}

async fn segment(
    State(state): State<AppState>,
    name: Result<Path<String>, PathRejection>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let Path(name) = match name {
        Ok(name) => name,
        Err(rejection) => return bad_path(rejection),
    };
    let window = match check_window(&state.windows, &query) {
        Ok(window) => window,
        Err(message) => return error(StatusCode::BAD_REQUEST, message),
    };
    let mut rows = segment_rows(&state, Some(&name), window.as_deref());
    match (rows.len(), window) {
        (0, _) => error(
            StatusCode::NOT_FOUND,
            format!("segment {name:?} is not owned here and no summary of it has been read from the view topic"),
        ),
        (_, Some(_)) => Json(rows.remove(0)).into_response(),
        (_, None) => Json(Value::Array(rows)).into_response(),
    }
}

/// Most cases one `/v1/cases` answer lists (`limit` may ask for fewer or up to this).
const MAX_CASES: usize = 10_000;

/// A case as the API shows it: its record, plus whether a deadline it has not met has passed.
fn case_json(case: &npsflow_core::FollowupCase, now: npsflow_core::Timestamp) -> Value {
    let mut value = serde_json::to_value(case).unwrap_or(Value::Null);
    if let Value::Object(fields) = &mut value {
        fields.insert("overdue".into(), Value::Bool(case.overdue(now)));
    }
    value
}

fn freshness(directory: &CaseDirectory) -> Value {
    json!({
        "source": "the compacted cases topic, read by this instance",
        "caught_up_at": directory.caught_up_at().map(|t| t.to_rfc3339()),
    })
}

async fn cases(
    State(state): State<AppState>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    use npsflow_core::CaseState;
    let wanted_state = match query.get("state") {
        None => None,
        Some(text) => match CaseState::parse(text) {
            Some(s) => Some(s),
            None => {
                let known: Vec<&str> = CaseState::ALL.iter().map(|s| s.as_str()).collect();
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("unknown state; states are {}", known.join(", ")),
                );
            }
        },
    };
    let (overdue, limit) = match (flag(&query, "overdue"), limit(&query, 1000, MAX_CASES)) {
        (Ok(overdue), Ok(limit)) => (overdue, limit),
        (Err(why), _) | (_, Err(why)) => return error(StatusCode::BAD_REQUEST, why),
    };
    let Some(directory) = &state.cases else {
        return no_directory();
    };
    let owner = query.get("owner");
    let now = state.clock.now();
    let (found, count) = directory.find(
        |case| {
            owner.is_none_or(|o| &case.owner == o)
                && wanted_state.is_none_or(|s| case.state == s)
                && overdue.is_none_or(|o| case.overdue(now) == o)
        },
        limit,
    );
    Json(json!({
        // Each listed case parsed whole from its record (one this version cannot read is
        // left out).
        "cases": found
            .iter()
            .filter_map(|c| c.case())
            .map(|c| case_json(&c, now))
            .collect::<Vec<_>>(),
        "count": count,
        "truncated": count > found.len(),
        "as_of": freshness(directory),
    }))
    .into_response()
}

fn no_directory() -> Response {
    error(
        StatusCode::NOT_FOUND,
        "this process does not read the cases topic (followup.case_directory = false)".into(),
    )
}

async fn case(
    State(state): State<AppState>,
    case_id: Result<Path<String>, PathRejection>,
) -> Response {
    let Path(case_id) = match case_id {
        Ok(case_id) => case_id,
        Err(rejection) => return bad_path(rejection),
    };
    let Some(directory) = &state.cases else {
        return no_directory();
    };
    let row = directory.get(&case_id);
    match row.as_ref().map(|row| row.case()) {
        Some(Some(case)) => {
            let mut value = case_json(&case, state.clock.now());
            if let Value::Object(fields) = &mut value {
                fields.insert("as_of".into(), freshness(directory));
            }
            Json(value).into_response()
        }
        Some(None) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the case's record on the cases topic is not one this version can read".into(),
        ),
        None => error(
            StatusCode::NOT_FOUND,
            "no such case (or not read yet: see as_of on /v1/cases)".into(),
        ),
    }
}

/// The most accounts `/v1/accounts` lists at once.
const MAX_ACCOUNTS: usize = 10_000;

/// Open and escalated (open, escalation level above 0) cases per account, from the case
/// directory; `None` if this process does not read the cases topic.
fn cases_by_account(state: &AppState, only: Option<&str>) -> Option<HashMap<String, (u64, u64)>> {
    let directory = state.cases.as_ref()?;
    let mut counts: HashMap<String, (u64, u64)> = HashMap::new();
    for case in directory.read().values() {
        let Some(account) = case.account_id.as_deref() else {
            continue;
        };
        if only.is_some_and(|o| o != account) || case.state == npsflow_core::CaseState::Closed {
            continue;
        }
        let entry = counts.entry(account.to_owned()).or_default();
        entry.0 += 1;
        if case.escalation_level > 0 {
            entry.1 += 1;
        }
    }
    Some(counts)
}

/// One account as the API serves it: its summary over the account window (from the view
/// topic; zero responses if it has none in the window), its open and escalated cases, and
/// whether it is at risk and why.
fn account_json(
    state: &AppState,
    account_id: &str,
    row: Option<&crate::accounts::AccountRow>,
    cases: Option<(u64, u64)>,
    with_cases: bool,
) -> Value {
    let now = state.clock.now();
    let mut value = match row {
        Some(row) => serde_json::to_value(row).unwrap_or(Value::Null),
        None => {
            let (from, to) = state.account_window.interval(now);
            json!({
                "account_id": account_id, "window": state.account_window.name(),
                "from": from.to_rfc3339(), "to": to.to_rfc3339(), "responses": 0,
                "promoters": 0, "passives": 0, "detractors": 0, "nps": null, "ci95": null,
                "band": null,
            })
        }
    };
    let (open, escalated) = cases.unwrap_or_default();
    let reasons = risk_reasons(state, row, escalated);
    let computed_at = row.map(|r| r.computed_at);
    let caught_up_at = state.account_view.caught_up_at();
    if let Value::Object(fields) = &mut value {
        fields.remove("computed_at");
        fields.insert("open_cases".into(), json!(with_cases.then_some(open)));
        fields.insert(
            "escalated_cases".into(),
            json!(with_cases.then_some(escalated)),
        );
        fields.insert("at_risk".into(), json!(!reasons.is_empty()));
        fields.insert("at_risk_reasons".into(), json!(reasons));
        fields.insert(
            "as_of".into(),
            json!({
                "source": "view",
                "computed_at": computed_at.map(|t| t.to_rfc3339()),
                "age_seconds": computed_at.map(|t| (now.millis() - t.millis()).max(0) as f64 / 1000.0),
                "caught_up_at": caught_up_at.map(|t| t.to_rfc3339()),
            }),
        );
    }
    value
}

/// Why an account is at risk (none: it is not): its NPS below `analytics.at_risk_below`, an
/// escalated open case.
fn risk_reasons(
    state: &AppState,
    row: Option<&crate::accounts::AccountRow>,
    escalated: u64,
) -> Vec<&'static str> {
    let mut reasons = Vec::new();
    if row
        .and_then(|r| r.nps)
        .is_some_and(|nps| nps < state.at_risk_below)
    {
        reasons.push("nps_below");
    }
    if escalated > 0 {
        reasons.push("escalated_case");
    }
    reasons
}

async fn account(
    State(state): State<AppState>,
    account_id: Result<Path<String>, PathRejection>,
) -> Response {
    let Path(account_id) = match account_id {
        Ok(account_id) => account_id,
        Err(rejection) => return bad_path(rejection),
    };
    let row = state.account_view.get(&account_id);
    let cases = cases_by_account(&state, Some(&account_id));
    let with_cases = cases.is_some();
    let counts = cases.and_then(|mut c| c.remove(&account_id));
    if row.is_none() && counts.is_none() {
        return error(
            StatusCode::NOT_FOUND,
            format!(
                "no responses from this account in the last {} and no open case (or not read yet: see as_of on /v1/accounts)",
                state.account_window.name()
            ),
        );
    }
    Json(account_json(
        &state,
        &account_id,
        row.as_ref(),
        counts,
        with_cases,
    ))
    .into_response()
}

async fn accounts(
    State(state): State<AppState>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let (at_risk, limit) = match (flag(&query, "at_risk"), limit(&query, 100, MAX_ACCOUNTS)) {
        (Ok(at_risk), Ok(limit)) => (at_risk.unwrap_or(false), limit),
        (Err(why), _) | (_, Err(why)) => return error(StatusCode::BAD_REQUEST, why),
    };
    let cases = cases_by_account(&state, None);
    let with_cases = cases.is_some();
    let cases = cases.unwrap_or_default();
    let rows = state.account_view.read();
    // Chosen and ordered first (lowest NPS first, accounts with none last, then by id); only
    // the accounts listed are rendered.
    let ids: std::collections::BTreeSet<&String> = rows.keys().chain(cases.keys()).collect();
    let escalated = |id: &str| cases.get(id).map_or(0, |c| c.1);
    let mut chosen: Vec<(f64, &String)> = ids
        .into_iter()
        .filter(|id| !at_risk || !risk_reasons(&state, rows.get(*id), escalated(id)).is_empty())
        .map(|id| {
            (
                rows.get(id).and_then(|r| r.nps).unwrap_or(f64::INFINITY),
                id,
            )
        })
        .collect();
    chosen.sort_by(|a, b| a.0.total_cmp(&b.0).then_with(|| a.1.cmp(b.1)));
    let count = chosen.len();
    let listed: Vec<Value> = chosen
        .into_iter()
        .take(limit)
        .map(|(_, id)| account_json(&state, id, rows.get(id), cases.get(id).copied(), with_cases))
        .collect();
    drop(rows);
    Json(json!({
        "accounts": listed,
        "count": count,
        "truncated": count > limit,
        "as_of": {
            "source": "view",
            "caught_up_at": state.account_view.caught_up_at().map(|t| t.to_rfc3339()),
        },
    }))
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn scrape(state: &AppState) -> String {
        let response = metrics(State(state.clone())).await;
        assert_eq!(response.status(), StatusCode::OK);
        let body = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .expect("body");
        String::from_utf8(body.to_vec()).expect("UTF-8")
    }

    /// A process's HTTP state with nothing read yet: no owned segments, empty view tables, no
    /// case directory, the default account window, the wall clock.
    fn test_state(windows: &[&str]) -> AppState {
        let config =
            crate::config::Config::load(None, Vec::<(String, String)>::new()).expect("defaults");
        AppState {
            metrics: Metrics::new(),
            health: Arc::new(Health::default()),
            view: None,
            segment_view: Arc::default(),
            windows: windows.iter().map(|w| (*w).to_owned()).collect(),
            account_view: Arc::default(),
            account_window: crate::accounts::account_window(&config),
            at_risk_below: 0.0,
            cases: None,
            clock: Arc::new(crate::engine::WallClock),
        }
    }

    #[tokio::test]
    async fn metrics_show_each_roles_readiness_as_readyz_does() {
        let metrics = Metrics::new();
        metrics.prepare(&["ingest", "aggregate"], &[]);
        let state = AppState {
            metrics,
            ..test_state(&["1h"])
        };
        // Prepared but not started yet: not ready.
        let text = scrape(&state).await;
        assert!(
            text.contains("npsflow_role_ready{role=\"ingest\"} 0"),
            "{text}"
        );
        assert!(text.contains("npsflow_role_ready{role=\"aggregate\"} 0"));

        let health = &state.health;
        health.register("ingest");
        health.set_connected("ingest", true);
        health.set_producing("ingest", true);
        health.set_joined("ingest");
        assert!(scrape(&state)
            .await
            .contains("npsflow_role_ready{role=\"ingest\"} 0"));
        health.set_restored("ingest", true);
        let text = scrape(&state).await;
        assert!(
            text.contains("npsflow_role_ready{role=\"ingest\"} 1"),
            "{text}"
        );
        assert!(text.contains("npsflow_role_ready{role=\"aggregate\"} 0"));

        // A broker outage makes it not ready again, at the next scrape.
        health.set_connected("ingest", false);
        assert!(scrape(&state)
            .await
            .contains("npsflow_role_ready{role=\"ingest\"} 0"));
    }

    /// Segments this process does not own are served from the view table, which keeps each
    /// record's text: parsed when asked for, `computed_at` moved into `as_of`, a record that
    /// is not JSON refused when read (not served), a tombstone removing the row.
    #[test]
    fn segments_from_the_view_table_are_parsed_when_served() {
        let state = test_state(&["1h", "24h"]);
        let table = &state.segment_view;
        let record = br#"{"segment":"region=east","window":"24h","nps":12.5,"responses":{"promoter":3},"computed_at":"2026-11-22T12:00:00Z"}"#;
        table.apply(b"24h|region=east", Some(record)).expect("JSON");
        table
            .apply(
                b"1h|region=east",
                Some(br#"{"segment":"region=east","window":"1h","nps":-5.0}"#),
            )
            .expect("JSON");
        table.apply(b"1h|all", Some(b"{}")).expect("JSON");
        assert!(table.apply(b"24h|all", Some(b"{not json")).is_err());
        table.apply(b"1h|all", None).expect("a tombstone");

        let rows = segment_rows(&state, Some("region=east"), None);
        assert_eq!(rows.len(), 2, "{rows:?}");
        assert_eq!(
            (rows[0]["window"].as_str(), rows[1]["window"].as_str()),
            (Some("1h"), Some("24h"))
        );
        assert_eq!(rows[1]["nps"], json!(12.5));
        assert_eq!(rows[1]["responses"]["promoter"], json!(3));
        assert_eq!(rows[1]["as_of"]["source"], "view");
        assert_eq!(rows[1]["as_of"]["computed_at"], "2026-11-22T12:00:00.000Z");
        assert!(rows[1].get("computed_at").is_none());
        assert_eq!(segment_rows(&state, None, Some("24h")).len(), 1);
        assert!(segment_rows(&state, Some("all"), None).is_empty());
    }

    /// Calls the account handlers as the router would for `uri`.
    async fn get_json(state: &AppState, uri: &str) -> (StatusCode, Value) {
        let response = match uri.strip_prefix("/v1/accounts/") {
            Some(id) => account(State(state.clone()), Ok(Path(id.to_owned()))).await,
            None => {
                let query = uri
                    .split_once('?')
                    .map(|(_, q)| q)
                    .unwrap_or_default()
                    .split('&')
                    .filter_map(|pair| pair.split_once('='))
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .collect();
                accounts(State(state.clone()), Query(query)).await
            }
        };
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .expect("body");
        (status, serde_json::from_slice(&body).expect("JSON"))
    }

    /// Accounts from the view topic joined with the case directory: at risk by NPS or by an
    /// escalated open case (also for an account with no responses in the window), lowest NPS
    /// first; closed cases do not count; unknown accounts are a 404.
    #[tokio::test]
    async fn accounts_join_the_view_with_open_cases() {
        let config =
            crate::config::Config::load(None, Vec::<(String, String)>::new()).expect("defaults");
        let now = npsflow_core::Timestamp::parse_rfc3339("2026-11-22T12:00:00Z").expect("ts");
        let window = crate::accounts::account_window(&config);
        let views: Arc<crate::directory::Table<crate::accounts::AccountRow>> = Arc::default();
        let row = |id: &str, promoters: u64, detractors: u64| {
            let tally = npsflow_core::Tally {
                promoters,
                passives: 0,
                detractors,
                invitations: 0,
            };
            let (from, to) = window.interval(now);
            let summary = npsflow_core::AccountSummary::of(tally, from, to);
            crate::accounts::AccountRow::new(id, window.name(), &summary, now)
        };
        for (id, p, d) in [("acme", 2, 3), ("beta", 3, 1)] {
            let bytes = serde_json::to_vec(&row(id, p, d)).expect("JSON");
            views.apply(id.as_bytes(), Some(&bytes)).expect("row");
        }
        let directory: Arc<CaseDirectory> = Arc::default();
        let sample = include_str!("../../../deploy/schemas/samples/case.jsonl")
            .lines()
            .next()
            .expect("a sample");
        let sample: Value = serde_json::from_str(sample).expect("JSON");
        for (case_id, account, state, level) in [
            ("c1", "gamma", "open", 1),
            ("c2", "beta", "closed", 2),
            ("c3", "acme", "contacted", 0),
        ] {
            let mut case = sample["message"].clone();
            case["case_id"] = json!(case_id);
            case["state"] = json!(state);
            case["escalation_level"] = json!(level);
            case["alert"]["account_id"] = json!(account);
            let bytes = serde_json::to_vec(&case).expect("JSON");
            directory
                .apply(case_id.as_bytes(), Some(&bytes))
                .expect("case");
        }
        let state = AppState {
            account_view: views,
            account_window: window,
            cases: Some(directory),
            clock: Arc::new(crate::engine::ManualClock::new(now)),
            ..test_state(&["28d"])
        };
        let (status, acme) = get_json(&state, "/v1/accounts/acme").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(acme["nps"], json!(-20.0));
        assert_eq!(
            (acme["open_cases"].clone(), acme["escalated_cases"].clone()),
            (json!(1), json!(0))
        );
        assert_eq!(acme["at_risk_reasons"], json!(["nps_below"]));
        assert_eq!(acme["as_of"]["source"], "view");
        assert!(acme.get("computed_at").is_none());
        let (_, beta) = get_json(&state, "/v1/accounts/beta").await;
        assert_eq!(
            (beta["at_risk"].clone(), beta["open_cases"].clone()),
            (json!(false), json!(0))
        );
        let (_, gamma) = get_json(&state, "/v1/accounts/gamma").await;
        assert_eq!(
            (gamma["responses"].clone(), gamma["nps"].clone()),
            (json!(0), Value::Null)
        );
        assert_eq!(gamma["at_risk_reasons"], json!(["escalated_case"]));
        let (status, _) = get_json(&state, "/v1/accounts/nobody").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let (_, risky) = get_json(&state, "/v1/accounts?at_risk=true").await;
        let ids: Vec<&str> = risky["accounts"]
            .as_array()
            .expect("list")
            .iter()
            .map(|a| a["account_id"].as_str().expect("id"))
            .collect();
        assert_eq!(ids, ["acme", "gamma"]);
        let (_, all) = get_json(&state, "/v1/accounts?limit=2").await;
        assert_eq!(
            (all["count"].clone(), all["truncated"].clone()),
            (json!(3), json!(true))
        );
        let first: Vec<&str> = all["accounts"]
            .as_array()
            .expect("list")
            .iter()
            .map(|a| a["account_id"].as_str().expect("id"))
            .collect();
        assert_eq!(
            first,
            ["acme", "beta"],
            "lowest NPS first, the first `limit`"
        );
        for bad in ["at_risk=maybe", "limit=0", "limit=10001", "limit=ten"] {
            let (status, body) = get_json(&state, &format!("/v1/accounts?{bad}")).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
            assert!(body["error"].as_str().is_some_and(|e| e.contains(" is ")));
        }
    }

    /// A case is served whole from its record; a record the directory keeps (it has the
    /// fields it selects on) but this version cannot read as a case is an error, not "no such
    /// case", and is left out of lists.
    #[tokio::test]
    async fn a_case_record_this_version_cannot_read_is_an_error_not_a_missing_case() {
        let directory: Arc<CaseDirectory> = Arc::default();
        let sample = include_str!("../../../deploy/schemas/samples/case.jsonl")
            .lines()
            .next()
            .expect("a sample");
        let sample: Value = serde_json::from_str(sample).expect("JSON");
        let mut good = sample["message"].clone();
        good["case_id"] = json!("good");
        let mut odd = good.clone();
        odd["case_id"] = json!("odd");
        odd["history"] = json!("not a list");
        for (id, case) in [("good", &good), ("odd", &odd)] {
            let bytes = serde_json::to_vec(case).expect("JSON");
            directory.apply(id.as_bytes(), Some(&bytes)).expect("kept");
        }
        let state = AppState {
            cases: Some(directory),
            ..test_state(&["28d"])
        };
        let get = |id: &str| case(State(state.clone()), Ok(Path(id.to_owned())));
        let status = |response: Response| response.status();
        assert_eq!(status(get("good").await), StatusCode::OK);
        assert_eq!(status(get("odd").await), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(status(get("none").await), StatusCode::NOT_FOUND);
        let listed = cases(State(state.clone()), Query(HashMap::new())).await;
        let body = axum::body::to_bytes(listed.into_body(), usize::MAX)
            .await
            .expect("body");
        let listed: Value = serde_json::from_slice(&body).expect("JSON");
        let ids: Vec<&str> = listed["cases"]
            .as_array()
            .expect("cases")
            .iter()
            .filter_map(|c| c["case_id"].as_str())
            .collect();
        assert_eq!(ids, ["good"]);
    }
}
