//! serve: the live dashboard, `/metrics`, `/health`, and the alert rules.
//!
//! Inputs: the store the pipeline writes (read only: SQLite through a read-only
//! connection in WAL mode, PostgreSQL through a connection of its own), the
//! pipeline's [`Progress`] when it runs in this process, and the process's metrics
//! registry. Outputs: HTTP and notifications.
//!
//! ```text
//! refresh task (1/s) --reads--> store          one Snapshot, serialized once
//!      |  evaluates alerts --> notifier tasks (own queues, retries)
//!      v
//! watch<Arc<str>> --> GET /api/snapshot, GET /events (SSE), dashboard page
//! ```
//!
//! Invariants: serving never writes to the store and never holds anything the
//! pipeline waits for. Reads happen once per second (the scans less often, see
//! [`snapshot::SLOW_EVERY`]) whatever the number of clients
//! (each client gets the shared, pre-serialized snapshot); a failing read or a
//! notifier that is down shows up on the dashboard and in logs, and stops nothing.
//! The pipeline's counters are recorded per batch through the `metrics` facade
//! (see [`crate::telemetry`]).
//!
//! Routes: `/` (dashboard), `/assets/*`, `/api/snapshot`, `/api/quarantine`,
//! `/events`, `/metrics`, `/health` (readiness: the store answers) and
//! `/health/live` (liveness).

pub mod alerts;
pub mod notify;
pub mod reader;
pub mod snapshot;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::spec::{PipelineSpec, StoreSpec};
use crate::event::time;
use crate::telemetry;
use crate::topology::Progress;
use alerts::{AlertEngine, Observation};
use notify::Notifiers;
use reader::{StoreReader, TopLists};
use snapshot::{Rates, Snapshot};

/// The port the issue asks for; `--listen` changes it.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// How often the store is read and alerts are evaluated.
const REFRESH: Duration = Duration::from_secs(1);
/// A store read slower than this is reported as failed (and retried next refresh).
const READ_TIMEOUT: Duration = Duration::from_secs(5);

const INDEX_HTML: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const UPLOT_JS: &str = include_str!("assets/uPlot.iife.min.js");
const UPLOT_CSS: &str = include_str!("assets/uPlot.min.css");
const UPLOT_LICENSE: &str = include_str!("assets/uPlot.LICENSE");

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}: {source} (is another caudal or program using it? pick another with --listen)")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("http server failed")]
    Server(#[source] std::io::Error),
}

/// Runtime knobs of serving (command-line flags, not the pipeline file).
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// ISO 4217 code money measures are shown in.
    pub currency: String,
}

impl Default for ServeOptions {
    fn default() -> Self {
        // The simulated ERP sells in Peruvian soles.
        Self { currency: "PEN".to_owned() }
    }
}

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    snapshot: watch::Receiver<Arc<str>>,
    reader: Arc<StoreReader>,
    shutdown: CancellationToken,
}

/// Binds the listener first, so a taken port is reported before anything runs.
///
/// # Errors
/// [`ServeError::Bind`] when the address is taken or not local.
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, ServeError> {
    tokio::net::TcpListener::bind(addr).await.map_err(|source| ServeError::Bind { addr, source })
}

/// Serves until `shutdown` is cancelled: the refresh and alert task, the notifier
/// tasks and the HTTP server.
///
/// # Errors
/// [`ServeError::Server`] when the HTTP server fails.
pub async fn serve(
    listener: tokio::net::TcpListener,
    spec: Arc<PipelineSpec>,
    store: StoreSpec,
    options: ServeOptions,
    progress: Option<watch::Receiver<Progress>>,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    telemetry::prometheus();
    let reader = Arc::new(StoreReader::new(&store));
    let (tx, rx) = watch::channel::<Arc<str>>(Arc::from("{}"));
    let notifiers = Notifiers::start(&spec.notifiers, &shutdown);
    let refresh = tokio::spawn(refresh_loop(
        spec.clone(),
        options,
        reader.clone(),
        progress,
        tx,
        notifiers,
        shutdown.clone(),
    ));
    if let Ok(addr) = listener.local_addr() {
        info!(url = %format!("http://{addr}/"), store = %reader.describe(), "dashboard serving");
    }
    let state = AppState { snapshot: rx, reader, shutdown: shutdown.clone() };
    let result = axum::serve(listener, app(state))
        .with_graceful_shutdown(shutdown.clone().cancelled_owned())
        .await
        .map_err(ServeError::Server);
    shutdown.cancel();
    let _ = refresh.await;
    result
}

/// The HTTP routes (tests call it with `oneshot`, no socket).
pub fn app(state: AppState) -> Router {
    Router::new()
        .route("/", get(|| async { html(INDEX_HTML) }))
        .route("/assets/app.js", get(|| async { asset("text/javascript", APP_JS) }))
        .route("/assets/uPlot.iife.min.js", get(|| async { asset("text/javascript", UPLOT_JS) }))
        .route("/assets/uPlot.min.css", get(|| async { asset("text/css", UPLOT_CSS) }))
        .route("/assets/uPlot.LICENSE", get(|| async { asset("text/plain", UPLOT_LICENSE) }))
        .route("/api/snapshot", get(api_snapshot))
        .route("/api/quarantine", get(api_quarantine))
        .route("/events", get(events))
        .route("/metrics", get(metrics))
        .route("/health", get(health))
        .route("/health/live", get(|| async { "ok\n" }))
        .with_state(state)
}

fn html(body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], body).into_response()
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type), (header::CACHE_CONTROL, "public, max-age=3600")], body)
        .into_response()
}

fn json(body: String) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

async fn api_snapshot(State(s): State<AppState>) -> Response {
    let body = s.snapshot.borrow().to_string();
    json(body)
}

#[derive(serde::Deserialize)]
struct QuarantineQuery {
    reason: Option<String>,
    limit: Option<usize>,
}

/// The latest open quarantine records, newest first (`?reason=..&limit=..`).
async fn api_quarantine(State(s): State<AppState>, Query(q): Query<QuarantineQuery>) -> Response {
    let limit = q.limit.unwrap_or(50).clamp(1, 500);
    let read = tokio::time::timeout(READ_TIMEOUT, s.reader.quarantine(q.reason.as_deref(), limit));
    match read.await {
        Ok(Ok(items)) => json(serde_json::to_string(&items).unwrap_or_else(|_| "[]".into())),
        Ok(Err(e)) => {
            warn!(error = %e, "quarantine read failed");
            (StatusCode::SERVICE_UNAVAILABLE, "store unavailable\n").into_response()
        }
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "store read timed out\n").into_response(),
    }
}

/// Server-sent events: the current snapshot at once, then every new one.
async fn events(State(s): State<AppState>) -> impl IntoResponse {
    let mut rx = s.snapshot.clone();
    rx.mark_changed();
    let stream = futures_util::stream::unfold((rx, s.shutdown), |(mut rx, shutdown)| async move {
        tokio::select! {
            changed = rx.changed() => changed.ok()?,
            () = shutdown.cancelled() => return None,
        }
        let data = rx.borrow_and_update().clone();
        let event = Event::default().event("snapshot").data(&*data);
        Some((Ok::<_, Infallible>(event), (rx, shutdown)))
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

async fn metrics() -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        telemetry::prometheus().render(),
    )
        .into_response()
}

/// Readiness: 200 when the store answers, 503 otherwise.
async fn health(State(s): State<AppState>) -> Response {
    match tokio::time::timeout(READ_TIMEOUT, s.reader.ping()).await {
        Ok(Ok(())) => json(r#"{"live":true,"ready":true,"store":"ok"}"#.to_owned()),
        Ok(Err(e)) => {
            warn!(error = %e, "health check: store unavailable");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                json(r#"{"live":true,"ready":false,"store":"unavailable"}"#.to_owned()),
            )
                .into_response()
        }
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            json(r#"{"live":true,"ready":false,"store":"timeout"}"#.to_owned()),
        )
            .into_response(),
    }
}

async fn refresh_loop(
    spec: Arc<PipelineSpec>,
    options: ServeOptions,
    reader: Arc<StoreReader>,
    progress: Option<watch::Receiver<Progress>>,
    tx: watch::Sender<Arc<str>>,
    notifiers: Notifiers,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(REFRESH);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut engine = AlertEngine::new(&spec);
    let mut rates = Rates::default();
    let mut last_view = None;
    let mut top: Arc<TopLists> = Arc::default();
    let mut store_lag_ms = None;
    let mut slow_at: Option<tokio::time::Instant> = None;
    let mut summary_at: Option<tokio::time::Instant> = None;
    let mut quarantine_summary: Vec<(String, u64)> = Vec::new();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.cancelled() => return,
        }
        let now_ms = time::now_ms();
        let summary_due = summary_at.is_none_or(|t| t.elapsed() >= snapshot::SUMMARY_EVERY);
        let read = match tokio::time::timeout(READ_TIMEOUT, reader.read(&spec, summary_due)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("store read timed out".to_owned()),
        };
        let (view, store_error) = snapshot::keep_last(&mut last_view, read);
        if let Some(e) = &store_error {
            warn!(error = %e, "dashboard cannot read the store");
        }
        let view = view.unwrap_or_default();
        if let Some(s) = &view.quarantine_by_reason {
            if store_error.is_none() && summary_due {
                summary_at = Some(tokio::time::Instant::now());
                quarantine_summary.clone_from(s);
            }
        }
        // Top lists scan silver tables: every few seconds, not every refresh.
        // Until they have rows (a store still filling), try at every refresh.
        let due = slow_at.is_none_or(|t| t.elapsed() >= snapshot::SLOW_EVERY)
            || (top.products.is_empty()
                && slow_at.is_some_and(|t| t.elapsed() >= snapshot::SUMMARY_EVERY));
        if store_error.is_none() && due {
            slow_at = Some(tokio::time::Instant::now());
            match tokio::time::timeout(READ_TIMEOUT, reader.top(&spec, progress.is_none())).await {
                Ok(Ok((t, newest))) => {
                    top = Arc::new(t);
                    store_lag_ms = newest.map(|n| (now_ms - n).max(0));
                }
                Ok(Err(e)) => warn!(error = %e, "dashboard cannot read the top lists"),
                Err(_) => warn!("dashboard top lists timed out"),
            }
        }
        let progress_now = progress.as_ref().map(|p| p.borrow().clone());
        let health =
            snapshot::health(&spec, &view, progress_now.as_ref(), store_lag_ms, &mut rates, now_ms);
        let observation = Observation {
            now_ms,
            gold: &view.gold,
            quarantine_opened: view.quarantine_max_id,
            events: health.events_total,
            lag_ms: health.lag_s.map(|s| (s * 1000.0) as i64),
        };
        let fired =
            if store_error.is_none() { engine.evaluate(&spec, &observation) } else { Vec::new() };
        for event in &fired {
            info!(alert = %event.alert, state = ?event.state, notified = event.notified, "{}", event.message);
            if event.notified {
                if let Some(rule) = engine.rules().iter().find(|r| r.name == event.alert) {
                    notifiers.send(&rule.notify, event);
                }
            }
        }
        let status = engine.status(&spec);
        for s in &status {
            metrics::gauge!(telemetry::ALERT_FIRING, "alert" => s.alert.clone(), "severity" => s.severity.code())
                .set(if s.firing { 1.0 } else { 0.0 });
        }
        let snap = Snapshot {
            pipeline: spec.name.clone(),
            store: reader.describe(),
            currency: options.currency.clone(),
            generated_at_ms: now_ms,
            store_error,
            business: snapshot::business(&spec, &view),
            top: top.clone(),
            health,
            quarantine: snapshot::QuarantinePanel {
                open_total: quarantine_summary.iter().map(|r| r.1).sum(),
                by_reason: quarantine_summary.clone(),
                latest: view.latest_quarantine.clone(),
            },
            alerts: snapshot::AlertsPanel {
                rules: status,
                history: engine.history().cloned().collect(),
            },
        };
        match serde_json::to_string(&snap) {
            Ok(s) => {
                tx.send_replace(Arc::from(s));
            }
            Err(e) => warn!(error = %e, "cannot serialize the dashboard snapshot"),
        }
    }
}

/// Parses `--listen`: `HOST:PORT` or just a port (on 127.0.0.1).
pub fn parse_listen(s: &str) -> Option<SocketAddr> {
    s.parse().ok().or_else(|| s.parse::<u16>().ok().map(|p| SocketAddr::from(([127, 0, 0, 1], p))))
}
