//! The admin API (feature `admin`): status, breaker commands and fault injection over HTTP,
//! safe by default.
//!
//! * **Bound to loopback** unless told otherwise: [`bind`] refuses an address other machines
//!   can reach without [`Exposure::Remote`].
//! * **Served with bounds** by [`serve`]: at most [`MAX_CONNECTIONS`] connections at once, and
//!   a request's head read within [`HEADER_READ_TIMEOUT`] (an idle or trickling connection is
//!   closed then), and none kept past [`CONNECTION_LIFETIME`]. `axum::serve` has neither: a local process holding thousands of idle
//!   connections used up the file descriptors of the process that also serves your traffic.
//! * **A token for every write**: commands and chaos changes need `Authorization: Bearer
//!   <token>` (at least 16 bytes, compared in constant time); a missing or wrong one gets
//!   401. Reads (`GET /status`, `GET /chaos`) need none: they show class names and states,
//!   which the metrics show as well.
//!
//! | request | answer |
//! |---|---|
//! | `GET /` | a status page: above all, the faults injected, a failing predictor, and refused or quarantined policies; every class with its state (and the state it would be in, where a dry run or its predictor's trial differs), why, success, p99 and prediction, the queues and limiters, refreshed every second from `/status`; force open / close / reset buttons that send the token typed into it |
//! | `GET /status` | the service, its health score, every class (tier, state, the state it would be in, why, success and p99 over the recent windows, the calls in flight past their SLA (`overdue`: failures to the breaker, not in `success`), prediction, its threshold, or while it calibrates `calibration_left`, the healthy scores still to come before it holds, whether its calibration was restored from a saved file (`calibration_restored`), and its record), the admission limiters, the fallback queues (per queue `len` and `oldest_ms`, the oldest task's creation time in milliseconds since the Unix epoch, not an age), the faults in force and the policies (version, names, quarantined, switched-off hooks, whether the latest load was refused), as JSON |
//! | `POST /classes/{class}/{command}` | a breaker command (`force_open`, `force_closed`, `degrade`, `metrics_only`, `reset`; no body, `{}` or `null`, and no query: a command has nothing to set): `{"class": .., "state": ..}`, the state it left the class in (`force_closed` disables the breaker: `"disabled"`; `reset`: `"closed"`) |
//! | `GET /chaos` | the faults in force (with [`Admin::chaos`]) |
//! | `PUT /chaos` | set a fault: `{"target": "dependency:db", "latency_ms": 900, "errors": 0.2}` (also `jitter_ms`, `aborts`, `hangs`, `hang_for_ms`; targets `class:<name>`, `dependency:<name>`, `route:<pattern>`), replacing the target's (a fault with nothing in it clears it; either way, calls the old one is delaying or hanging go on at once) |
//! | `DELETE /chaos` | stop every fault; `?target=dependency:db` stops one (either way, calls that faults are delaying or hanging go on at once) |
//!
//! ```no_run
//! use tower_degrade::admin::{Admin, Exposure, bind};
//! use tower_degrade::{ClassConfig, Degrader};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower_degrade::BoxError> {
//! let degrader = Degrader::builder("shop").class(ClassConfig::gold("payment")).build()?;
//! let token = std::env::var("ADMIN_TOKEN")?;
//! let admin = Admin::new(&degrader, &token)?.router();
//! let listener = bind("127.0.0.1:9901".parse()?, Exposure::Loopback).await?;
//! tower_degrade::admin::serve(listener, admin).await?;
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::net::SocketAddr;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

use crate::auth::Token;
use crate::breaker::Command;
use crate::degrader::Degrader;
use crate::error::ConfigError;
use crate::gate::{Directive, Reason};

/// The most connections [`serve`] keeps open at once; more wait in the listener's backlog.
pub const MAX_CONNECTIONS: usize = 64;

/// How long [`serve`] waits for a request's head (the first, or the next on a kept-alive
/// connection) before it closes the connection.
pub const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// How long [`serve`] keeps a connection, however busy: then it ends it after the request in
/// flight, or [`HEADER_READ_TIMEOUT`] later if that one does not finish (a client that
/// pipelines requests and never reads the answers is never idle, and held its connection,
/// one of [`MAX_CONNECTIONS`], for as long as it liked). A status page refreshing each
/// second opens a new one, unseen.
pub const CONNECTION_LIFETIME: std::time::Duration = std::time::Duration::from_secs(60);

/// Serve the admin `router` on `listener` (from [`bind`]) over HTTP/1.1, with bounds an admin
/// port needs: at most [`MAX_CONNECTIONS`] connections at once, each closed when a request's
/// head does not arrive whole within [`HEADER_READ_TIMEOUT`], and any after
/// [`CONNECTION_LIFETIME`]. An HTTP/1.1 request with no `Host` is refused `400`. On a
/// loopback listener, a
/// request addressed to another host (its `Host` header not `localhost`, a `*.localhost` name
/// or a loopback address) is refused `403`: a web page that rebinds its own name to
/// 127.0.0.1 (DNS rebinding) would otherwise read `/status` and the page through its
/// visitor's browser. Runs until the future is dropped; a failed accept (out of file
/// descriptors, a connection reset before it was taken) is logged and retried after a pause.
pub async fn serve(listener: tokio::net::TcpListener, router: Router) -> std::io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let open = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let router = match listener.local_addr() {
        Ok(addr) if is_loopback(addr.ip()) => {
            router.layer(axum::middleware::from_fn(addressed_to_loopback))
        }
        _ => router,
    };
    let router = router.layer(axum::middleware::from_fn(host_required));
    loop {
        // Never closed.
        let Ok(slot) = open.clone().acquire_owned().await else {
            return Ok(());
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "admin: accept failed; retrying in 1 s");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                continue;
            }
        };
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT);
            // A client that goes away or sends garbage ends only its own connection.
            let conn = http.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                () = tokio::time::sleep(CONNECTION_LIFETIME) => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(HEADER_READ_TIMEOUT, conn).await;
                }
            }
        });
    }
}

/// A path the admin API does not serve: 404 naming it (escaped and cut) and the ones it does.
async fn not_found(uri: axum::http::Uri) -> Response {
    (
        StatusCode::NOT_FOUND,
        axum::Json(json!({
            "error": format!(
                "no such path: {} (the admin API serves /, /status, /chaos and \
                 /classes/{{class}}/{{command}})",
                crate::error::escape_cut(uri.path(), 256)
            )
        })),
    )
        .into_response()
}

/// Refuse an HTTP/1.1 request with no `Host` header `400`, as RFC 9112 (section 3.2) asks of
/// a server; an HTTP/1.0 one may have none.
async fn host_required(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    if req.version() != axum::http::Version::HTTP_11 || req.headers().contains_key(header::HOST) {
        return next.run(req).await;
    }
    (
        StatusCode::BAD_REQUEST,
        axum::Json(json!({"error": "an HTTP/1.1 request needs a Host header"})),
    )
        .into_response()
}

/// Refuse a request whose `Host` is not a loopback name or address, that sends two `Host`
/// headers, or whose target names another host (an absolute-form URI, HTTP/2's
/// `:authority`). One without either, from an HTTP/1.0 tool, is let through: a browser always
/// sends one.
async fn addressed_to_loopback(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let host = hosts.next().map(|h| h.to_str().unwrap_or(""));
    let loopback = hosts.next().is_none()
        && host.is_none_or(is_loopback_host)
        && req
            .uri()
            .authority()
            .is_none_or(|a| is_loopback_host(a.as_str()));
    if loopback {
        return next.run(req).await;
    }
    (
        StatusCode::FORBIDDEN,
        axum::Json(
            json!({"error": "this admin listener is on a loopback address: it \
            answers requests addressed to localhost, a *.localhost name, 127.0.0.1 or [::1] \
            only (one Host \
            header, and the request's target if it names a host), so that a web page cannot \
            reach it by rebinding its own name"}),
        ),
    )
        .into_response()
}

/// Whether a `Host` header names this machine: `localhost` or a `*.localhost` name
/// (RFC 6761), or a loopback address, with or without a port (digits only).
fn is_loopback_host(host: &str) -> bool {
    let (name, port) = match host.strip_prefix('[') {
        Some(v6) => match v6.split_once(']') {
            Some((name, "")) => (name, None),
            Some((name, rest)) => (name, Some(rest.strip_prefix(':').unwrap_or("x"))),
            None => return false,
        },
        None => match host.rsplit_once(':') {
            Some((name, port)) => (name, Some(port)),
            None => (host, None),
        },
    };
    if port.is_some_and(|p| p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit())) {
        return false;
    }
    let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    name == "localhost"
        || name.ends_with(".localhost")
        || name.parse::<std::net::IpAddr>().is_ok_and(is_loopback)
}

/// Whether `ip` is a loopback address, an IPv4-mapped one (`::ffff:127.0.0.1`) included, as
/// [`bind`] reads it.
fn is_loopback(ip: std::net::IpAddr) -> bool {
    ip.to_canonical().is_loopback()
}

#[cfg(test)]
mod tests {
    use super::{is_loopback, is_loopback_host};

    #[test]
    fn a_listener_on_an_ipv4_mapped_loopback_address_is_guarded_as_loopback() {
        // `bind` took `::ffff:127.0.0.1` for loopback and `serve` did not: such a listener
        // answered any `Host`.
        for ip in ["127.0.0.1", "::1", "::ffff:127.0.0.1"] {
            assert!(is_loopback(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["0.0.0.0", "::", "10.0.0.1", "::ffff:10.0.0.1"] {
            assert!(!is_loopback(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn a_host_naming_this_machine_is_loopback_and_no_other() {
        for host in [
            "localhost",
            "LOCALHOST:9100",
            "localhost.",
            "admin.localhost:80",
            "127.0.0.1",
            "127.0.0.2:9100",
            "[::1]:9100",
            "[::ffff:127.0.0.1]:9100",
            "localhost:",
        ] {
            assert!(is_loopback_host(host), "{host}");
        }
        for host in [
            "evil.example",
            "localhost.evil.example",
            "10.0.0.1:9100",
            "[::ffff:10.0.0.1]",
            "[::2]",
            "",
            "127.0.0.1:80@evil.example",
            "localhost:evil.example",
            "[::1]evil.example",
            "[::1]:80x",
            "[::1",
        ] {
            assert!(!is_loopback_host(host), "{host}");
        }
    }
}

/// Who may reach an admin listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exposure {
    /// This machine only: the address must be a loopback address.
    Loopback,
    /// Other machines too: an explicit opt-in, for an admin API behind your own network
    /// controls.
    Remote,
}

/// [`bind`] refused an address, or could not listen on it.
#[derive(Debug)]
pub struct BindError {
    message: String,
    io: Option<std::io::Error>,
}

impl BindError {
    /// Why the listener could not be opened (`AddrInUse`, `PermissionDenied`...), when it was
    /// the operating system's refusal; `None` when `bind` refused a non-loopback address.
    pub fn io_error(&self) -> Option<&std::io::Error> {
        self.io.as_ref()
    }
}

impl fmt::Display for BindError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for BindError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.io.as_ref().map(|e| e as _)
    }
}

/// Listen on `addr` for an admin router: refused unless `addr` is a loopback address or
/// `exposure` is [`Exposure::Remote`].
pub async fn bind(
    addr: SocketAddr,
    exposure: Exposure,
) -> Result<tokio::net::TcpListener, BindError> {
    // An IPv4-mapped loopback address (`::ffff:127.0.0.1`) is loopback too.
    if !is_loopback(addr.ip()) && exposure != Exposure::Remote {
        return Err(BindError {
            message: format!(
                "admin address {addr} is reachable from other machines: bind a loopback \
                 address (127.0.0.1, ::1), or opt in with Exposure::Remote behind your own \
                 network controls"
            ),
            io: None,
        });
    }
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| BindError {
            message: format!("admin address {addr}: {e}"),
            io: Some(e),
        })
}

/// Builds the admin router. See the [module docs](self).
#[derive(Clone)]
pub struct Admin {
    degrader: Degrader,
    token: Token,
    #[cfg(feature = "chaos")]
    chaos: Option<crate::chaos::Chaos>,
    #[cfg(feature = "fallback")]
    store: Option<std::sync::Arc<dyn crate::fallback::store::Store>>,
}

impl fmt::Debug for Admin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Admin")
            .field("classes", &self.degrader.registry().len())
            .finish_non_exhaustive()
    }
}

impl Admin {
    /// An admin API over `degrader`, its writes guarded by `token` (at least 16 bytes).
    pub fn new(degrader: &Degrader, token: &str) -> Result<Admin, ConfigError> {
        Ok(Admin {
            degrader: degrader.clone(),
            token: Token::new(token, "admin.token")?,
            #[cfg(feature = "chaos")]
            chaos: None,
            #[cfg(feature = "fallback")]
            store: None,
        })
    }

    /// Show and switch the faults of `chaos` (`/chaos`).
    #[cfg(feature = "chaos")]
    #[cfg_attr(docsrs, doc(cfg(feature = "chaos")))]
    pub fn chaos(mut self, chaos: crate::chaos::Chaos) -> Self {
        self.chaos = Some(chaos);
        self
    }

    /// Show the depth and oldest task of the fallback queues in `store` (in `/status`).
    #[cfg(feature = "fallback")]
    #[cfg_attr(docsrs, doc(cfg(feature = "fallback")))]
    pub fn queues(mut self, store: std::sync::Arc<dyn crate::fallback::store::Store>) -> Self {
        self.store = Some(store);
        self
    }

    /// The router.
    pub fn router(self) -> Router {
        let writes = Router::new()
            .route("/classes/{class}/{command}", post(command))
            .route("/chaos", axum::routing::put(set_fault).delete(clear_faults))
            // On the routes only: a path that is none of them is a 404, not a request for the
            // token (a typo in a read's URL looked like an auth failure).
            .route_layer(axum::middleware::from_fn_with_state(
                self.token.clone(),
                crate::auth::require,
            ));
        Router::new()
            .route("/", get(page))
            .route("/status", get(status))
            .route("/chaos", get(faults))
            .merge(writes)
            .method_not_allowed_fallback(crate::auth::method_not_allowed)
            .fallback(not_found)
            .with_state(self)
    }

    fn status(&self) -> Value {
        let s = self.degrader.status();
        let classes: Vec<Value> = s
            .classes
            .iter()
            .map(|c| {
                // Over the history (the last minute at most): calls the inner service
                // completed, how many succeeded, the worst window's p99, calls the layer
                // diverted to a fallback or shed, and of those, the ones admission turned
                // away for overload; calls in flight past their SLA, which the breaker counts
                // as failures.
                let (calls, ok, p99, secs, diverted, shed, overloaded, overdue) = self
                    .degrader
                    .history(&c.name)
                    .map(|h| {
                        h.iter().fold(
                            (0u64, 0u64, 0.0f64, 0.0f64, 0u64, 0u64, 0u64, 0u64),
                            |(n, ok, p99, secs, diverted, shed, overloaded, overdue), w| {
                                let completed = w.completed();
                                (
                                    n + completed,
                                    ok + w.successes,
                                    if completed > 0 {
                                        p99.max(w.p99.as_secs_f64() * 1000.0)
                                    } else {
                                        p99
                                    },
                                    secs + w.period.as_secs_f64(),
                                    diverted + w.degraded,
                                    shed + w.rejected,
                                    overloaded + w.overloaded,
                                    overdue + w.overdue,
                                )
                            },
                        )
                    })
                    .unwrap_or_default();
                let arrived = calls + diverted + shed;
                let (reason, route) = match c.directive {
                    Directive::Divert { reason, route, .. }
                    | Directive::AdmitFraction { reason, route, .. } => {
                        (Some(reason.as_str()), Some(route.as_str()))
                    }
                    // Half-open: the calls that find every probe taken are refused so.
                    Directive::Probe { route, .. } => (
                        Some(Reason::ProbesExhausted.as_str()),
                        Some(route.as_str()),
                    ),
                    Directive::Admit | Directive::Delay { .. } => (None, None),
                };
                json!({
                    "name": &*c.name,
                    "tier": c.tier.as_str(),
                    "state": c.state.as_str(),
                    // what the class would be in: in `MetricsOnly`, or with a predictor on trial
                    "shadow_state": c.shadow_state.as_str(),
                    "manual": c.manual,
                    "reason": reason,
                    "route": route,
                    "calls": calls,
                    "success": if calls > 0 { Some(ok as f64 / calls as f64) } else { None },
                    "p99_ms": if calls > 0 { Some(p99) } else { None },
                    "window_secs": secs,
                    "diverted": diverted,
                    "shed": shed,
                    // of `diverted` and `shed`, those admission turned away for overload
                    "overloaded": overloaded,
                    "diverted_share": if arrived > 0 { Some((diverted + shed) as f64 / arrived as f64) } else { None },
                    // in flight past the SLA: failures to the breaker, not in `success`
                    "overdue": overdue,
                    "inflight": c.window.inflight,
                    "queue_depth": c.window.queue_depth,
                    "prediction": c.prediction,
                    "prediction_threshold": c.prediction_threshold,
                    // the predictor only warns in the shadow: the rules alone act
                    "predict_trial": c.predict_trial,
                    "calibrating": c.calibrating,
                    "calibration_left": c.calibration_left,
                    "calibration_restored": c.calibration_restored,
                    "prediction_record": c.prediction_record.map(|r| json!({
                        "confirmed": r.confirmed,
                        "false_alarms": r.false_alarms,
                        "missed": r.missed,
                        "last_lead_ticks": r.last_lead_ticks,
                    })),
                })
            })
            .collect();
        let admission: Vec<Value> = s
            .admission
            .iter()
            .map(|l| json!({"name": &*l.name, "limit": l.limit, "inflight": l.inflight, "waiting": l.waiting}))
            .collect();
        #[allow(unused_mut)]
        let mut out = json!({
            "service": &*s.service,
            "tick": s.tick,
            "stopped": s.stopped,
            "health_score": s.health_score,
            "classes": classes,
            "admission": admission,
            "predictor": s.predictor.as_ref().map(|p| json!({
                "last_batch": p.last_batch.map(|b| b.as_str()),
                "error": p.error.as_deref(),
                "not_probabilities": p.not_probabilities.iter().map(|n| &**n).collect::<Vec<_>>(),
                "failed_batches": p.failed_batches,
                "overrun_batches": p.overrun_batches,
                "last_error": p.last_error.as_deref(),
                "late_ticks": p.late_ticks,
                "unused_ticks_left": p.unused_ticks_left,
            })),
        });
        #[cfg(feature = "fallback")]
        if let Some(store) = &self.store {
            let queues: serde_json::Map<String, Value> = crate::fallback::Queue::ALL
                .iter()
                .map(|q| {
                    let d = store.depth(*q);
                    (
                        q.as_str().to_owned(),
                        json!({"len": d.len, "oldest_ms": d.oldest_ms}),
                    )
                })
                .collect();
            out["queues"] = Value::Object(queues);
        }
        #[cfg(feature = "chaos")]
        if let Some(chaos) = &self.chaos {
            out["chaos"] = chaos_json(chaos);
        }
        #[cfg(feature = "rhai")]
        {
            out["policies"] = self.policies_json();
        }
        out
    }

    /// The policy set in force, what it quarantined or switched off, and whether the latest
    /// load was refused (the files on disk differ from what is in force).
    #[cfg(feature = "rhai")]
    fn policies_json(&self) -> Value {
        let d = &self.degrader;
        let refused = d.shared.policies.load_failing();
        let Some(set) = d.policies() else {
            return json!({"version": null, "last_load_refused": refused});
        };
        let name = |c: crate::ClassId| d.shared.names.get(c.index()).map(|n| n.to_string());
        let quarantined: Vec<Value> = set
            .quarantined()
            .into_iter()
            .map(|(c, p)| json!({"class": name(c), "policy": p}))
            .collect();
        json!({
            "version": set.version(),
            "names": set.names(),
            "warnings": set.warnings(),
            "skipped": set.skipped(),
            "quarantined": quarantined,
            "hooks_off": set.hooks_off(),
            "last_load_refused": refused,
        })
    }
}

fn answer(status: StatusCode, body: Value) -> Response {
    (status, axum::Json(body)).into_response()
}

/// The status page: static, it reads everything from `/status`.
const PAGE: &str = include_str!("page.html");

async fn page() -> Response {
    let mut res = (StatusCode::OK, PAGE).into_response();
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // Its own inline script and style, requests to this origin only, never in a frame (its
    // buttons act with the token).
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
             connect-src 'self'; frame-ancestors 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    res
}

async fn status(State(admin): State<Admin>) -> Response {
    answer(StatusCode::OK, admin.status())
}

async fn command(
    State(admin): State<Admin>,
    path: Result<Path<(String, String)>, axum::extract::rejection::PathRejection>,
    uri: axum::http::Uri,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let (class, command) = match path {
        Ok(Path(p)) => p,
        Err(e) => return crate::auth::rejected(e),
    };
    let body = match body {
        Ok(b) => b,
        Err(e) => return crate::auth::rejected(e),
    };
    let command: Command = match command.parse() {
        Ok(c) => c,
        Err(e) => return answer(StatusCode::BAD_REQUEST, json!({"error": e.to_string()})),
    };
    // A command has nothing to set: a client that sent a level or a duration would take the
    // `200` for it (a trial's `{"duration_ms": ...}` and `?duration=` were answered so). A
    // client that always sends JSON sends nothing with `{}` or `null`.
    let empty = |b: &[u8]| {
        let b = b.trim_ascii();
        b.is_empty()
            || serde_json::from_slice::<Value>(b)
                .is_ok_and(|v| v.is_null() || v.as_object().is_some_and(|o| o.is_empty()))
    };
    if uri.query().is_some_and(|q| !q.is_empty()) || !empty(&body) {
        return answer(
            StatusCode::BAD_REQUEST,
            json!({"error": format!(
                "`{}` takes no body and no query: a command holds until another replaces it, \
                 with the breaker's settings (send an empty POST)",
                command.as_str()
            )}),
        );
    }
    match admin.degrader.command(&class, command) {
        Ok(state) => answer(
            StatusCode::OK,
            json!({"class": class, "state": state.as_str()}),
        ),
        Err(e) => answer(StatusCode::NOT_FOUND, json!({"error": e.to_string()})),
    }
}

#[cfg(feature = "chaos")]
fn chaos_json(chaos: &crate::chaos::Chaos) -> Value {
    chaos
        .faults()
        .iter()
        .map(|(t, f)| {
            let target = t.spec();
            let (errors, aborts, hangs) = f.rates();
            json!({
                "target": target,
                "latency_ms": f.delay().as_millis() as u64,
                "jitter_ms": f.max_jitter().as_millis() as u64,
                "errors": errors,
                "aborts": aborts,
                "hangs": hangs,
                "hang_for_ms": f.hang_limit().as_millis() as u64,
            })
        })
        .collect()
}

async fn faults(State(admin): State<Admin>) -> Response {
    #[cfg(feature = "chaos")]
    if let Some(chaos) = &admin.chaos {
        return answer(StatusCode::OK, chaos_json(chaos));
    }
    let _ = admin;
    answer(
        StatusCode::NOT_FOUND,
        json!({"error": "no chaos handle: build the admin API with Admin::chaos"}),
    )
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(not(feature = "chaos"), allow(dead_code))]
struct FaultBody {
    target: String,
    #[serde(default)]
    latency_ms: u64,
    #[serde(default)]
    jitter_ms: u64,
    #[serde(default)]
    errors: f64,
    #[serde(default)]
    aborts: f64,
    #[serde(default)]
    hangs: f64,
    hang_for_ms: Option<u64>,
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(not(feature = "chaos"), allow(dead_code))]
struct TargetQuery {
    target: Option<String>,
}

#[cfg(feature = "chaos")]
fn parse_target(s: &str) -> Result<crate::chaos::Target, String> {
    s.parse().map_err(|e: ConfigError| e.to_string())
}

async fn set_fault(
    State(admin): State<Admin>,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let body = match body {
        Ok(b) => b,
        Err(e) => return crate::auth::rejected(e),
    };
    // An object only: serde also reads a struct from a JSON array of its fields in order,
    // which neither names nor checks them. (Read from the bytes, not through a `Value`,
    // which would keep the last of a field given twice where the struct refuses it.)
    if body.trim_ascii_start().first() != Some(&b'{') {
        return answer(
            StatusCode::BAD_REQUEST,
            json!({"error": "the body must be a JSON object: {\"target\": \"class:NAME\", \"errors\": 0.5, ...}"}),
        );
    }
    let body: FaultBody = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => return answer(StatusCode::BAD_REQUEST, json!({"error": e.to_string()})),
    };
    #[cfg(feature = "chaos")]
    if let Some(chaos) = &admin.chaos {
        use std::time::Duration;
        let target = match parse_target(&body.target) {
            Ok(t) => t,
            Err(e) => return answer(StatusCode::BAD_REQUEST, json!({"error": e})),
        };
        let mut fault = crate::chaos::Fault::new()
            .latency(Duration::from_millis(body.latency_ms))
            .jitter(Duration::from_millis(body.jitter_ms))
            .errors(body.errors)
            .aborts(body.aborts)
            .hangs(body.hangs);
        if let Some(ms) = body.hang_for_ms {
            fault = fault.hang_for(Duration::from_millis(ms));
        }
        return match chaos.set(target, fault) {
            Ok(()) => answer(StatusCode::OK, chaos_json(chaos)),
            Err(e) => answer(StatusCode::BAD_REQUEST, json!({"error": e.to_string()})),
        };
    }
    let _ = (admin, body);
    answer(
        StatusCode::NOT_FOUND,
        json!({"error": "no chaos handle: build the admin API with Admin::chaos"}),
    )
}

async fn clear_faults(
    State(admin): State<Admin>,
    q: Result<Query<TargetQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let q = match q {
        Ok(Query(q)) => q,
        Err(e) => return crate::auth::rejected(e),
    };
    #[cfg(feature = "chaos")]
    if let Some(chaos) = &admin.chaos {
        match q.target.as_deref().map(parse_target) {
            None => chaos.clear_all(),
            Some(Ok(t)) => {
                if !chaos.clear(&t) {
                    return answer(
                        StatusCode::NOT_FOUND,
                        json!({"error": format!("no fault is set for {t}")}),
                    );
                }
            }
            Some(Err(e)) => return answer(StatusCode::BAD_REQUEST, json!({"error": e})),
        }
        return answer(StatusCode::OK, chaos_json(chaos));
    }
    let _ = (admin, q);
    answer(
        StatusCode::NOT_FOUND,
        json!({"error": "no chaos handle: build the admin API with Admin::chaos"}),
    )
}
