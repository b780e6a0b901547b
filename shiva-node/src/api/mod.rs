//! The node's HTTP server (axum): the v1 JSON API, the event stream, `/metrics`, `/healthz`,
//! `/readyz` and the dashboard. Every node serves it, leader or not, from its own view of the
//! log (see docs/api.md).
//!
//! # Invariants
//! * The log view stays the driver's alone: lists and the event stream are served from the
//!   published [`Snapshot`]; a task's detail, its runs and commands are asked of the driver
//!   ([`Request`]), which answers from its view in its next turn.
//! * A command writes exactly what `shiva-ctl` writes (`shiva_proto::commands`): the same pure
//!   plan, the same keys, in the same order; its answer waits for the bus's acknowledgement and
//!   for this node to read the records back (a read after a write on the same node sees it).
//! * Writes need a token of scope `write` (`--api-tokens`); without a tokens file every write is
//!   refused. In a signed cluster (`--authorized-keys`) the API writes nothing: the nodes would
//!   refuse its unsigned records, so it says so instead.
//! * No request can take the node down: bodies are bounded, every input is checked, and each
//!   failure is a JSON error with its status.

pub mod metrics;
pub mod snapshot;
mod tokens;

use std::net::SocketAddr;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, Request as HttpRequest, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::{Stream, StreamExt};
use serde::Deserialize;
use shiva_bus::BusConfig;
use shiva_bus::logs::{LogFilter, Scanned};
use shiva_proto::commands::{Command, CommandError};
use shiva_proto::rows::HistoryRow;
use shiva_proto::{TaskId, TaskSpec};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use metrics::Metrics;
pub use snapshot::Snapshot;
pub use tokens::{Scope, Tokens};

/// A question for the driver, answered from its view.
pub enum Request {
    /// A task's row, spec and refusal (`None`: no such task).
    Task { task: TaskId, reply: oneshot::Sender<Option<serde_json::Value>> },
    /// A task's runs, newest first (`None`: no such task).
    Runs { task: TaskId, limit: usize, reply: oneshot::Sender<Option<Vec<HistoryRow>>> },
    /// A command to write, on behalf of the token named `by`.
    Command { command: Command, by: String, reply: oneshot::Sender<Result<Planned, Refusal>> },
}

/// Why the driver wrote no command.
#[derive(Debug)]
pub enum Refusal {
    /// The command itself (see `shiva_proto::commands`).
    Command(CommandError),
    /// The cluster takes signed commands only, and the API cannot sign.
    Signed,
}

/// A delivery: resolves to the record's offset once the bus acknowledged it.
pub type Delivery =
    std::pin::Pin<Box<dyn Future<Output = Result<i64, shiva_bus::BusError>> + Send + 'static>>;

/// A command the driver queued.
pub struct Planned {
    /// The task was defined before.
    pub existed: bool,
    /// A submit: the task's own revision it writes.
    pub revision: Option<u64>,
    /// Its records' keys and deliveries, in order.
    pub writes: Vec<(String, Delivery)>,
}

/// Largest request body: the largest record (4 MiB; a spec's own limits are checked when it is
/// read, see docs/protocol.md).
const BODY_LIMIT: usize = 4 << 20;
/// Past `BODY_LIMIT`, how much more of a body is read and dropped before the 413, and for how
/// long at most (see `read_body`).
const DRAIN_LIMIT: usize = 64 << 20;
const DRAIN_WITHIN: Duration = Duration::from_secs(5);
/// How long a request waits for the driver, and for the bus to acknowledge a command.
const ANSWER_WITHIN: Duration = Duration::from_secs(10);
/// The newest runs a task's runs endpoint serves at most.
const MAX_RUNS: usize = 1000;
/// Reads of the logs topic served at once (each a thread and a consumer).
const MAX_LOG_READERS: usize = 16;

/// The dashboard: one page, its script and style inline, nothing fetched from elsewhere.
const DASHBOARD: &str = include_str!("dashboard.html");

#[derive(Clone)]
struct AppState {
    snapshot: watch::Receiver<Arc<Snapshot>>,
    requests: mpsc::Sender<Request>,
    metrics: Arc<Metrics>,
    tokens: Option<Arc<Tokens>>,
    bus: BusConfig,
    log_readers: Arc<tokio::sync::Semaphore>,
    /// It listens on loopback (see `host_guard`).
    loopback: bool,
}

/// What the server needs.
pub struct Server {
    /// Where it listens (bound before the node reads the log, so that `/healthz` answers).
    pub listener: tokio::net::TcpListener,
    /// Published by the driver.
    pub snapshot: watch::Receiver<Arc<Snapshot>>,
    /// To the driver.
    pub requests: mpsc::Sender<Request>,
    /// The node's series.
    pub metrics: Arc<Metrics>,
    /// `--api-tokens`.
    pub tokens: Option<Arc<Tokens>>,
    /// For the logs topic.
    pub bus: BusConfig,
}

/// Binds `addr` (port 0: any free port) and writes the bound address to `record` (tests and
/// scripts read it there).
pub async fn bind(addr: SocketAddr, record: &std::path::Path) -> anyhow::Result<tokio::net::TcpListener> {
    use anyhow::Context;
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| {
        format!("--http {addr}: cannot listen (another node on this host? give each its own --http, or --http off)")
    })?;
    let bound = listener.local_addr().context("the HTTP listener has no address")?;
    std::fs::write(record, format!("{bound}\n"))
        .with_context(|| format!("cannot write {}", record.display()))?;
    Ok(listener)
}

impl Server {
    /// Serves until `shutdown`.
    pub async fn serve(self, shutdown: CancellationToken) {
        let addr = self.listener.local_addr().map(|addr| addr.to_string()).unwrap_or_default();
        let state = AppState {
            snapshot: self.snapshot,
            requests: self.requests,
            metrics: self.metrics,
            tokens: self.tokens,
            bus: self.bus,
            log_readers: Arc::new(tokio::sync::Semaphore::new(MAX_LOG_READERS)),
            loopback: self.listener.local_addr().is_ok_and(|addr| addr.ip().is_loopback()),
        };
        info!(%addr, writes = state.tokens.as_ref().is_some_and(|tokens| tokens.any_writer()), "HTTP API listening");
        let app = router(state);
        let served = axum::serve(self.listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await;
        if let Err(err) = served {
            warn!(error = %err, "the HTTP server stopped");
        }
    }
}

fn router(state: AppState) -> Router {
    let guarded = Router::new()
        .route("/v1/cluster", get(cluster))
        .route("/v1/tasks", get(tasks).post(submit))
        .route("/v1/tasks/{id}", get(task).delete(delete))
        .route("/v1/tasks/{id}/runs", get(runs))
        .route("/v1/tasks/{id}/logs", get(logs))
        .route("/v1/tasks/{id}/{action}", post(act))
        .route("/v1/nodes", get(nodes))
        .route("/v1/events", get(events))
        .route("/metrics", get(metrics_text))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), authenticate));
    Router::new()
        .route("/", get(dashboard))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .merge(guarded)
        .layer(middleware::from_fn_with_state(state.clone(), host_guard))
        .layer(middleware::from_fn_with_state(state.clone(), count))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(state)
}

/// An error answer: `{"error": "...", "status": N}`.
#[derive(Debug)]
struct ApiError(StatusCode, String);

impl ApiError {
    fn bad(message: impl Into<String>) -> ApiError {
        ApiError(StatusCode::BAD_REQUEST, message.into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": self.1, "status": self.0.as_u16() });
        (self.0, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
    }
}

impl From<CommandError> for ApiError {
    fn from(err: CommandError) -> Self {
        let status = match err {
            CommandError::NotFound(_) | CommandError::NoSuchNode(_) => StatusCode::NOT_FOUND,
            CommandError::Invalid(_) => StatusCode::BAD_REQUEST,
            CommandError::Conflict(_) => StatusCode::CONFLICT,
        };
        ApiError(status, err.to_string())
    }
}

fn json_text(status: StatusCode, body: String) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

fn json_bytes(body: Bytes) -> Response {
    (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

fn json_value(status: StatusCode, value: &impl serde::Serialize) -> Response {
    json_text(status, serde_json::to_string(value).expect("answers serialise"))
}

/// Counts requests by route and status.
async fn count(State(state): State<AppState>, request: HttpRequest, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or_else(|| route_of(request.uri().path()), |path| path.as_str().to_owned());
    let (method, path) = (request.method().clone(), request.uri().path().to_owned());
    let response = next.run(request).await;
    let status = response.status();
    state.metrics.http_requests.with_label_values(&[&route, status.as_str()]).inc();
    tracing::debug!(%method, %path, status = status.as_u16(), "HTTP request");
    response
}

/// A bounded route label for a path no route matched (the matched route is known only inside).
fn route_of(path: &str) -> String {
    match path {
        "/" | "/healthz" | "/readyz" | "/metrics" | "/v1/cluster" | "/v1/tasks" | "/v1/nodes"
        | "/v1/events" => path.to_owned(),
        path if path.starts_with("/v1/tasks/") => "/v1/tasks/{id}…".to_owned(),
        _ => "other".to_owned(),
    }
}

/// On a loopback listener, only `Host`s that are IP addresses or `localhost` are served: a web
/// page cannot reach the API through a name of its own made to resolve to 127.0.0.1 (DNS
/// rebinding), which would let its script read the answers.
async fn host_guard(State(state): State<AppState>, request: HttpRequest, next: Next) -> Response {
    if state.loopback
        && let Some(host) = request.headers().get(header::HOST)
        && !host.to_str().is_ok_and(local_host)
    {
        return ApiError(
            StatusCode::MISDIRECTED_REQUEST,
            "this node's API listens on loopback and answers requests for an IP address or localhost only"
                .into(),
        )
        .into_response();
    }
    next.run(request).await
}

/// Whether a `Host` header names an IP address or `localhost`.
fn local_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::IpAddr>().is_ok()
}

/// Checks the bearer token (or `access_token`, for browsers' event streams) against the scope
/// the request needs: `write` for POST and DELETE, `read` for the rest.
async fn authenticate(State(state): State<AppState>, request: HttpRequest, next: Next) -> Response {
    // Only POST and DELETE write (no route takes another writing method: they get a 405).
    let needs = if request.method() == Method::POST || request.method() == Method::DELETE {
        Scope::Write
    } else {
        Scope::Read
    };
    let presented = bearer(request.headers()).or_else(|| query_token(request.uri()));
    let Some(tokens) = &state.tokens else {
        if needs == Scope::Write {
            return ApiError(
                StatusCode::FORBIDDEN,
                "writes are off on this node: start it with --api-tokens FILE and use a token of scope write"
                    .into(),
            )
            .into_response();
        }
        return next.run(request).await;
    };
    let Some(presented) = presented else {
        let mut response = ApiError(
            StatusCode::UNAUTHORIZED,
            "this node needs a token: send 'Authorization: Bearer TOKEN' (or ?access_token=TOKEN)".into(),
        )
        .into_response();
        response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return response;
    };
    match tokens.find(&presented) {
        None => {
            let mut response = ApiError(StatusCode::UNAUTHORIZED, "unknown token".into()).into_response();
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer error=\"invalid_token\""));
            response
        }
        Some(token) if !token.scope.allows(needs) => ApiError(
            StatusCode::FORBIDDEN,
            format!("token '{}' may only read; this request writes (it needs scope write)", token.name),
        )
        .into_response(),
        Some(token) => {
            let name = token.name.clone();
            let mut request = request;
            request.extensions_mut().insert(Caller(name));
            next.run(request).await
        }
    }
}

/// The name of the token a request came with.
#[derive(Clone)]
struct Caller(String);

fn bearer(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim().to_owned())
}

fn query_token(uri: &axum::http::Uri) -> Option<String> {
    let Query(query) = Query::<std::collections::HashMap<String, String>>::try_from_uri(uri).ok()?;
    query.get("access_token").cloned()
}

async fn dashboard() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'",
            ),
        ],
        DASHBOARD,
    )
        .into_response()
}

async fn healthz() -> Response {
    json_value(StatusCode::OK, &serde_json::json!({ "status": "ok" }))
}

/// Ready: the node has read the log to its end, checked its id, and is not cut off.
async fn readyz(State(state): State<AppState>) -> Response {
    let snapshot = state.snapshot.borrow().clone();
    let (status, reason) = match &snapshot.cluster {
        None => (StatusCode::SERVICE_UNAVAILABLE, Some("reading the log to its end")),
        Some(cluster) if cluster.stopping => (StatusCode::SERVICE_UNAVAILABLE, Some("shutting down")),
        Some(cluster) if !cluster.ready => {
            (StatusCode::SERVICE_UNAVAILABLE, Some("reading the log to its end"))
        }
        Some(cluster) if cluster.fenced => (
            StatusCode::SERVICE_UNAVAILABLE,
            Some("cut off from the bus: it cannot read its own heartbeats back"),
        ),
        Some(_) => (StatusCode::OK, None),
    };
    let body = match reason {
        Some(reason) => serde_json::json!({ "status": "not ready", "reason": reason }),
        None => serde_json::json!({ "status": "ready" }),
    };
    json_value(status, &body)
}

async fn metrics_text(State(state): State<AppState>) -> Result<Response, ApiError> {
    let metrics = state.metrics.clone();
    let text = tokio::task::spawn_blocking(move || metrics.render())
        .await
        .map_err(|err| ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("metrics failed: {err}")))?;
    Ok(([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], text).into_response())
}

async fn not_found(method: Method, uri: axum::http::Uri) -> ApiError {
    let path = uri.path();
    let hint = if path.starts_with("/v1/tasks/") {
        " (a task id with '/' goes in the path encoded: /v1/tasks/demo%2Fhello)"
    } else {
        " (see docs/api.md)"
    };
    ApiError(StatusCode::NOT_FOUND, format!("no endpoint {method} {path}{hint}"))
}

async fn method_not_allowed(method: Method, uri: axum::http::Uri) -> ApiError {
    let path = uri.path();
    let hint = if path.starts_with("/v1/tasks/") && path.matches('/').count() > 3 {
        " (a task id with '/' goes in the path encoded: /v1/tasks/demo%2Fhello)"
    } else {
        " (see docs/api.md)"
    };
    ApiError(StatusCode::METHOD_NOT_ALLOWED, format!("{method} is not allowed on {path}{hint}"))
}

async fn cluster(State(state): State<AppState>) -> Response {
    let snapshot = state.snapshot.borrow().clone();
    match &snapshot.cluster {
        Some(cluster) => json_value(StatusCode::OK, cluster),
        None => ApiError(StatusCode::SERVICE_UNAVAILABLE, "this node has not read the log yet".into())
            .into_response(),
    }
}

async fn tasks(State(state): State<AppState>) -> Result<Response, ApiError> {
    let snapshot = ready_snapshot(&state)?;
    Ok(json_bytes(snapshot.tasks.json.clone()))
}

async fn nodes(State(state): State<AppState>) -> Result<Response, ApiError> {
    let snapshot = ready_snapshot(&state)?;
    Ok(json_bytes(snapshot.nodes.json.clone()))
}

fn ready_snapshot(state: &AppState) -> Result<Arc<Snapshot>, ApiError> {
    let snapshot = state.snapshot.borrow().clone();
    if snapshot.cluster.is_none() {
        return Err(ApiError(StatusCode::SERVICE_UNAVAILABLE, "this node has not read the log yet".into()));
    }
    Ok(snapshot)
}

/// A query's parameters, or a JSON `400` naming what is wrong (an unknown parameter, a bad value).
fn query_of<T>(query: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    query.map(|Query(value)| value).map_err(|err| ApiError::bad(err.body_text()))
}

/// A path's parameters, or a JSON `400` naming what is wrong (a bad percent-escape, not UTF-8).
fn path_of<T>(path: Result<Path<T>, PathRejection>) -> Result<T, ApiError> {
    path.map(|Path(value)| value).map_err(|err| ApiError::bad(format!("the path: {}", err.body_text())))
}

fn task_id(id: &str) -> Result<TaskId, ApiError> {
    TaskId::new(id).map_err(|err| ApiError::bad(format!("task id '{id}': {err}")))
}

/// Asks the driver; waits for its answer.
async fn ask<T>(
    state: &AppState,
    request: impl FnOnce(oneshot::Sender<T>) -> Request,
) -> Result<T, ApiError> {
    let (reply, answer) = oneshot::channel();
    let unavailable = || {
        ApiError(StatusCode::SERVICE_UNAVAILABLE, "the node is not answering (starting or stopping)".into())
    };
    tokio::time::timeout(ANSWER_WITHIN, state.requests.send(request(reply)))
        .await
        .map_err(|_| unavailable())?
        .map_err(|_| unavailable())?;
    tokio::time::timeout(ANSWER_WITHIN, answer).await.map_err(|_| unavailable())?.map_err(|_| unavailable())
}

async fn task(
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let task = task_id(&path_of(id)?)?;
    let answer = ask(&state, |reply| Request::Task { task: task.clone(), reply }).await?;
    match answer {
        Some(value) => Ok(json_value(StatusCode::OK, &value)),
        None => Err(CommandError::NotFound(task).into()),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RunsQuery {
    limit: Option<String>,
    /// Read by `authenticate`; allowed here so that `deny_unknown_fields` takes it.
    #[allow(dead_code)]
    access_token: Option<String>,
}

async fn runs(
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
    query: Result<Query<RunsQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let task = task_id(&path_of(id)?)?;
    let query = query_of(query)?;
    let limit = match query.limit.as_deref() {
        None => 20,
        Some(text) => match text.parse::<usize>() {
            Ok(limit @ 1..=MAX_RUNS) => limit,
            _ => {
                return Err(ApiError::bad(format!("limit '{text}': expected a number from 1 to {MAX_RUNS}")));
            }
        },
    };
    let answer = ask(&state, |reply| Request::Runs { task: task.clone(), limit, reply }).await?;
    match answer {
        Some(rows) => Ok(json_value(StatusCode::OK, &rows)),
        None => Err(CommandError::NotFound(task).into()),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LogsQuery {
    follow: Option<bool>,
    run: Option<String>,
    since: Option<String>,
    /// Read by `authenticate`; allowed here so that `deny_unknown_fields` takes it.
    #[allow(dead_code)]
    access_token: Option<String>,
}

/// A task's output: as written (`text/plain`), or with `follow=true` as an event stream of
/// `output` events (`{"run","stream","node","text"}`) that goes on until the client leaves.
async fn logs(
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
    query: Result<Query<LogsQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let task = task_id(&path_of(id)?)?;
    let query = query_of(query)?;
    if let Some(run) = &query.run
        && (run.is_empty() || run.len() > 36 || !run.chars().all(|c| c.is_ascii_hexdigit() || c == '-'))
    {
        return Err(ApiError::bad(format!("run '{run}' is not a run id (or the start of one)")));
    }
    let from_ms = match &query.since {
        None => None,
        Some(text) => {
            let since = humantime::parse_duration(text)
                .map_err(|err| ApiError::bad(format!("since '{text}': {err} (expected e.g. 10m)")))?;
            Some(
                shiva_proto::wall::now_ms()
                    .saturating_sub(i64::try_from(since.as_millis()).unwrap_or(i64::MAX)),
            )
        }
    };
    let snapshot = ready_snapshot(&state)?;
    if !snapshot.tasks.rows.contains_key(&task) {
        return Err(CommandError::NotFound(task).into());
    }
    let filter = LogFilter { task: task.to_string(), run: query.run.clone(), from_ms, from_offset: None };
    let follow = query.follow.unwrap_or(false);
    // Each reader is a thread and a consumer of the logs topic: a few at a time.
    let permit = state.log_readers.clone().try_acquire_owned().map_err(|_| {
        ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "this node serves {MAX_LOG_READERS} log reads at a time; try again, or read from another node"
            ),
        )
    })?;
    let (lines, mut received) = mpsc::channel::<Result<shiva_bus::logs::LoggedChunk, String>>(256);
    let bus = state.bus.clone();
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        let scanned = shiva_bus::logs::scan(&bus, ANSWER_WITHIN, &filter, follow, |seen| match seen {
            Scanned::Chunk(chunk) if lines.blocking_send(Ok(chunk.clone())).is_err() => {
                ControlFlow::Break(())
            }
            // The client left: noticed at the next record or poll, whatever the topic holds.
            Scanned::Idle | Scanned::Passed if lines.is_closed() => ControlFlow::Break(()),
            _ => ControlFlow::Continue(()),
        });
        if let Err(err) = scanned {
            let _ = lines.blocking_send(Err(err.to_string()));
        }
    });
    if !follow {
        // Streamed as read (a task's output may be larger than the node's memory). A failure
        // before the first chunk is an error answer; a later one cuts the body short.
        let first = received.recv().await;
        if let Some(Err(message)) = &first {
            return Err(ApiError(StatusCode::SERVICE_UNAVAILABLE, message.clone()));
        }
        let first = first.map(|chunk| chunk.map(|chunk| Bytes::from(chunk.bytes)));
        let rest = futures_util::stream::unfold(received, |mut received| async move {
            let line = received.recv().await?;
            Some((line.map(|chunk| Bytes::from(chunk.bytes)), received))
        });
        let body =
            futures_util::stream::iter(first).chain(rest).map(|chunk| chunk.map_err(std::io::Error::other));
        return Ok((
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            axum::body::Body::from_stream(body),
        )
            .into_response());
    }
    let stream = futures_util::stream::unfold(received, |mut received| async move {
        let line = received.recv().await?;
        let event = match line {
            Ok(chunk) => Event::default().event("output").data(
                serde_json::json!({
                    "run": chunk.run,
                    "stream": chunk.stream,
                    "node": chunk.node,
                    "text": String::from_utf8_lossy(&chunk.bytes),
                })
                .to_string(),
            ),
            Err(message) => {
                Event::default().event("error").data(serde_json::json!({ "error": message }).to_string())
            }
        };
        Some((Ok::<_, std::convert::Infallible>(event), received))
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()).into_response())
}

/// The change stream: a `snapshot` event with everything, then `cluster`, `task`,
/// `task-removed`, `node` and `node-removed` events as this node's view changes.
async fn events(
    State(state): State<AppState>,
) -> Sse<impl Stream<Item = Result<Event, std::convert::Infallible>>> {
    let mut receiver = state.snapshot.clone();
    let first = receiver.borrow_and_update().clone();
    let pending = std::collections::VecDeque::from([first.full()]);
    let stream = futures_util::stream::unfold(
        (receiver, first, pending),
        |(mut receiver, mut seen, mut pending)| async move {
            loop {
                if let Some(change) = pending.pop_front() {
                    let event = Event::default().event(change.event).data(change.data);
                    return Some((Ok(event), (receiver, seen, pending)));
                }
                receiver.changed().await.ok()?;
                let newer = receiver.borrow_and_update().clone();
                pending.extend(seen.changes(&newer));
                seen = newer;
            }
        },
    );
    Sse::new(stream).keep_alive(KeepAlive::default())
}

fn caller(request: &axum::http::Extensions) -> String {
    request.get::<Caller>().map_or_else(|| "anonymous".to_owned(), |caller| caller.0.clone())
}

/// Sends a command to the driver and waits for its records to be acknowledged.
async fn command(
    state: &AppState,
    by: String,
    command: Command,
) -> Result<(Planned, Vec<(String, i64)>), ApiError> {
    // Judged on a view read to its end, like the CLI's: no command is planned on a partial one.
    if !state.snapshot.borrow().cluster.as_ref().is_some_and(|cluster| cluster.ready && !cluster.stopping) {
        return Err(ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "this node has not read the log to its end yet: it takes commands once ready (see /readyz)"
                .into(),
        ));
    }
    let mut planned = match ask(state, |reply| Request::Command { command, by, reply }).await? {
        Ok(planned) => planned,
        Err(Refusal::Command(err)) => return Err(err.into()),
        Err(Refusal::Signed) => {
            return Err(ApiError(
                StatusCode::FORBIDDEN,
                "this cluster accepts signed commands only (--authorized-keys): the API cannot sign; use shiva-ctl --sign-key"
                    .into(),
            ));
        }
    };
    let mut written = Vec::with_capacity(planned.writes.len());
    let deliveries = std::mem::take(&mut planned.writes);
    for (key, delivery) in deliveries {
        let offset = tokio::time::timeout(ANSWER_WITHIN, delivery)
            .await
            .map_err(|_| {
                ApiError(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("the bus did not acknowledge '{key}' in time"),
                )
            })?
            .map_err(|err| {
                ApiError(StatusCode::SERVICE_UNAVAILABLE, format!("the bus refused '{key}': {err}"))
            })?;
        written.push((key, offset));
    }
    // Read-your-writes: answer once this node's view holds the command.
    let last = written.iter().map(|(_, offset)| *offset).max().unwrap_or(-1);
    let mut snapshots = state.snapshot.clone();
    let read = snapshots.wait_for(|snapshot| snapshot.commands_read > last);
    if tokio::time::timeout(ANSWER_WITHIN, read).await.is_err() {
        warn!(offset = last, "a command was written but not read back in time");
    }
    Ok((planned, written))
}

fn records(written: &[(String, i64)]) -> serde_json::Value {
    written.iter().map(|(key, offset)| serde_json::json!({ "key": key, "offset": offset })).collect()
}

/// `POST /v1/tasks`: a task spec (JSON, as `shiva-ctl submit FILE` takes it).
async fn submit(State(state): State<AppState>, request: HttpRequest) -> Result<Response, ApiError> {
    let by = caller(request.extensions());
    let body = read_body(request).await?;
    let spec = spec_of(&body)?;
    let id = spec.id.clone();
    let (planned, written) = command(&state, by, Command::Submit(Box::new(spec))).await?;
    let status = if planned.existed { StatusCode::OK } else { StatusCode::CREATED };
    let offset = written.first().map(|(_, offset)| *offset);
    Ok(json_value(
        status,
        &serde_json::json!({ "id": id, "revision": planned.revision, "offset": offset, "updated": planned.existed, "records": records(&written) }),
    ))
}

/// A request's body of at most `BODY_LIMIT` bytes.
///
/// A larger one is refused with 413, but only once the rest of it has been read and dropped (up
/// to `DRAIN_LIMIT` more bytes, for `DRAIN_WITHIN` at most): most clients write their whole body
/// before they read, and a server that closes on unread bytes resets the connection, so such a
/// client would see a broken pipe instead of the answer (nginx's "lingering close" does the same).
/// Nothing is read when the declared length says it is useless: a client that waits for a
/// go-ahead (`Expect: 100-continue`, as curl does above 1 MiB) sends nothing more, and a body
/// larger than the drain would be reset anyway.
async fn read_body(request: HttpRequest) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the body is larger than {} MiB (the largest record)", BODY_LIMIT >> 20),
        )
    };
    let headers = request.headers();
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|value| value.to_str().ok()?.trim().parse::<u64>().ok());
    if let Some(declared) = declared
        && declared > BODY_LIMIT as u64
    {
        let waits = headers
            .get(header::EXPECT)
            .is_some_and(|value| value.as_bytes().eq_ignore_ascii_case(b"100-continue"));
        if waits || declared > (BODY_LIMIT + DRAIN_LIMIT) as u64 {
            return Err(too_large());
        }
    }
    let mut stream = request.into_body().into_data_stream();
    let mut read = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|err| ApiError::bad(format!("the body cannot be read: {err}")))?;
        if read.len() + chunk.len() > BODY_LIMIT {
            let mut seen = read.len() + chunk.len();
            drop(read);
            let drain = async {
                while seen < BODY_LIMIT + DRAIN_LIMIT {
                    match stream.next().await {
                        Some(Ok(chunk)) => seen += chunk.len(),
                        _ => break,
                    }
                }
            };
            let _ = tokio::time::timeout(DRAIN_WITHIN, drain).await;
            return Err(too_large());
        }
        read.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(read))
}

fn spec_of(body: &Bytes) -> Result<TaskSpec, ApiError> {
    let text = std::str::from_utf8(body).map_err(|_| ApiError::bad("the body is not UTF-8 JSON"))?;
    TaskSpec::from_user_json(text).map_err(|err| ApiError::bad(err.to_string()))
}

/// `DELETE /v1/tasks/{id}`.
async fn delete(
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
    request: HttpRequest,
) -> Result<Response, ApiError> {
    let task = task_id(&path_of(id)?)?;
    let (_, written) = command(&state, caller(request.extensions()), Command::Delete(task.clone())).await?;
    Ok(json_value(
        StatusCode::OK,
        &serde_json::json!({ "id": task, "command": "delete", "records": records(&written) }),
    ))
}

/// `POST /v1/tasks/{id}/{kill|start|run|suspend|resume}`.
async fn act(
    State(state): State<AppState>,
    path: Result<Path<(String, String)>, PathRejection>,
    request: HttpRequest,
) -> Result<Response, ApiError> {
    let (id, action) = path_of(path)?;
    let task = task_id(&id)?;
    let command = match action.as_str() {
        "kill" => Command::Kill(task.clone()),
        "start" => Command::Start(task.clone()),
        "run" => Command::Run(task.clone()),
        "suspend" => Command::Suspend(task.clone()),
        "resume" => Command::Resume(task.clone()),
        other => {
            return Err(ApiError(
                StatusCode::NOT_FOUND,
                format!("no command '{other}': expected kill, start, run, suspend or resume"),
            ));
        }
    };
    let verb = command.verb();
    let (_, written) = self::command(&state, caller(request.extensions()), command).await?;
    Ok(json_value(
        StatusCode::ACCEPTED,
        &serde_json::json!({ "id": task, "command": verb, "records": records(&written) }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_tokens_are_percent_decoded() {
        let uri = |text: &'static str| axum::http::Uri::from_static(text);
        assert_eq!(query_token(&uri("/v1/events?a=1&access_token=ab%2Bc%3D")), Some("ab+c=".into()));
        assert_eq!(query_token(&uri("/v1/events?other=1")), None);
        assert_eq!(query_token(&uri("/v1/events")), None);
    }

    #[test]
    fn loopback_answers_ip_addresses_and_localhost_only() {
        for host in [
            "127.0.0.1:7878",
            "127.0.0.1",
            "localhost:7878",
            "LOCALHOST",
            "[::1]:7878",
            "[::1]",
            "10.0.0.5:80",
        ] {
            assert!(local_host(host), "{host}");
        }
        for host in ["evil.example:7878", "evil.example", "127.0.0.1.nip.io:7878", "[evil]:1", ""] {
            assert!(!local_host(host), "{host}");
        }
    }

    /// A client that writes its whole body before reading the answer, as most HTTP libraries
    /// do, is told 413 when the body is too large: it neither sees its write fail (a broken pipe)
    /// nor its connection reset before the answer.
    #[tokio::test]
    async fn an_oversized_body_is_answered_413_to_a_client_that_writes_it_all_first() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new().route(
            "/",
            post(|request: HttpRequest| async move {
                match read_body(request).await {
                    Ok(_) => (StatusCode::OK, String::new()).into_response(),
                    Err(err) => err.into_response(),
                }
            }),
        );
        tokio::spawn(async move { axum::serve(listener, app).await });
        // (size, the client's `Expect`, whether it sends the body before reading, the status)
        let cases = [
            (BODY_LIMIT, "", true, "200"),
            (BODY_LIMIT + 1, "", true, "413"),
            (3 * BODY_LIMIT, "", true, "413"),
            // Told at once, with no `100 Continue`, nothing sent.
            (BODY_LIMIT + 1, "Expect: 100-continue\r\n", false, "413"),
            (BODY_LIMIT + DRAIN_LIMIT + 1, "", false, "413"),
        ];
        for (size, expect, sends, status) in cases {
            let answer = tokio::task::spawn_blocking(move || {
                use std::io::{Read, Write};
                let mut stream = std::net::TcpStream::connect(addr).unwrap();
                stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                stream.set_write_timeout(Some(Duration::from_secs(30))).unwrap();
                let head = format!(
                    "POST / HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {size}\r\n{expect}Connection: close\r\n\r\n"
                );
                stream.write_all(head.as_bytes()).unwrap();
                if sends {
                    stream.write_all(&vec![b'x'; size]).map_err(|err| format!("writing {size} bytes: {err}"))?;
                }
                let mut answer = Vec::new();
                stream.read_to_end(&mut answer).map_err(|err| format!("reading the answer: {err}"))?;
                Ok::<_, String>(String::from_utf8_lossy(&answer).into_owned())
            })
            .await
            .unwrap();
            let answer = answer.unwrap_or_else(|err| panic!("a {size}-byte body: {err}"));
            assert!(
                answer.starts_with(&format!("HTTP/1.1 {status}")),
                "a {size}-byte body, {expect:?}: {answer}"
            );
            assert!(status == "200" || answer.contains("larger than 4 MiB"), "{answer}");
        }
    }

    #[test]
    fn bearer_tokens_are_read_case_insensitively() {
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("bearer  s3cret "));
        assert_eq!(bearer(&headers), Some("s3cret".into()));
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(bearer(&headers), None);
    }
}
