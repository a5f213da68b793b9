//! The admin API is safe by default: loopback unless told otherwise, a token for every write
//! (a missing or wrong one is refused), reads without one.

#[path = "../support.rs"]
mod support;

mod browser;

use std::net::SocketAddr;
use std::time::Duration;

use axum::body::Body;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;
use tower_degrade::admin::{Admin, Exposure, bind};
use tower_degrade::breaker::State;
use tower_degrade::chaos::{Chaos, Target};
use tower_degrade::{ClassConfig, Degrader};

const TOKEN: &str = "an-admin-token-of-32-characters!";

fn shop() -> Degrader {
    support::builder("shop")
        .class(ClassConfig::gold("payment").depends_on("db"))
        .class(ClassConfig::bronze("browse_log").depends_on("third_party:analytics"))
        .build_with_worker()
        .expect("valid config")
        .0
}

/// The class named `name` in a `/status` body.
fn class_in(status: &Value, name: &str) -> Value {
    status["classes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no class {name} in {status}"))
        .clone()
}

async fn call(
    app: &axum::Router,
    method: &str,
    uri: &str,
    token: Option<&str>,
    body: &str,
) -> (StatusCode, Value) {
    let mut req = Request::builder().method(method).uri(uri);
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let res = app
        .clone()
        .oneshot(req.body(Body::from(body.to_owned())).unwrap())
        .await
        .unwrap();
    let status = res.status();
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (status, json)
}

#[tokio::test]
async fn a_listener_reachable_from_other_machines_needs_an_explicit_opt_in() {
    let any: SocketAddr = "0.0.0.0:0".parse().unwrap();
    let e = bind(any, Exposure::Loopback).await.unwrap_err().to_string();
    assert!(
        e.contains("0.0.0.0:0") && e.contains("Exposure::Remote"),
        "{e}"
    );
    let l = bind("127.0.0.1:0".parse().unwrap(), Exposure::Loopback)
        .await
        .unwrap();
    assert!(l.local_addr().unwrap().ip().is_loopback());
    // A port in use is told apart from a refused address (it was a string alone).
    let taken = bind(l.local_addr().unwrap(), Exposure::Loopback)
        .await
        .unwrap_err();
    assert_eq!(
        taken.io_error().map(|e| e.kind()),
        Some(std::io::ErrorKind::AddrInUse)
    );
    assert!(std::error::Error::source(&taken).is_some());
    assert!(
        bind(any, Exposure::Loopback)
            .await
            .unwrap_err()
            .io_error()
            .is_none()
    );
    let l = bind(any, Exposure::Remote).await.unwrap();
    assert!(l.local_addr().unwrap().ip().is_unspecified());
    // An IPv4-mapped address is judged as the IPv4 one it maps (binding it may still fail
    // where IPv6 is off, but not as reachable from other machines).
    let mapped = bind("[::ffff:10.0.0.1]:0".parse().unwrap(), Exposure::Loopback).await;
    assert!(
        mapped
            .unwrap_err()
            .to_string()
            .contains("reachable from other machines")
    );
    if let Err(e) = bind("[::ffff:127.0.0.1]:0".parse().unwrap(), Exposure::Loopback).await {
        assert!(
            !e.to_string().contains("reachable from other machines"),
            "{e}"
        );
    }
}

#[tokio::test]
async fn a_short_token_is_refused() {
    let e = Admin::new(&shop(), "short").unwrap_err().to_string();
    assert!(e.contains("admin.token") && e.contains("16 bytes"), "{e}");
}

#[cfg(feature = "rhai")]
#[tokio::test]
async fn status_shows_the_policies_in_force_what_they_quarantined_and_a_refused_load() {
    // What was live, and what a failing policy had been put out of, was only in the log.
    let d = shop();
    let app = Admin::new(&d, TOKEN).unwrap().router();
    let (_, body) = call(&app, "GET", "/status", None, "").await;
    assert_eq!(body["policies"]["version"], Value::Null);
    let fails = "fn policy() { #{ governs: [\"browse_log\"] } }\nfn on_tick(ctx) {\n if ctx.requests == 7 { throw \"boom\"; }\n shed()\n}";
    d.load_policy_sources([("fails", fails)]).unwrap();
    support::window(&d, "browse_log", 7, 0, 0).await;
    d.tick_now();
    d.load_policy_sources([("broken", "fn on_tick(ctx) {")])
        .unwrap_err();
    let (_, body) = call(&app, "GET", "/status", None, "").await;
    let p = &body["policies"];
    assert_eq!(p["version"], 1, "{p}");
    assert_eq!(p["names"], serde_json::json!(["fails"]));
    assert_eq!(
        p["quarantined"],
        serde_json::json!([{"class": "browse_log", "policy": "fails"}])
    );
    assert_eq!(p["last_load_refused"], true);
}

/// Half-open, the calls that find every probe taken are refused `probes_exhausted`: the
/// status says so (it said no reason, and the page blamed overload under admission).
#[tokio::test(start_paused = true)]
async fn a_half_open_class_says_its_calls_are_refused_for_want_of_a_probe() {
    let d = shop();
    let app = Admin::new(&d, TOKEN).unwrap().router();
    support::window(&d, "payment", 40, 1, 0).await;
    assert_eq!(d.state("payment").unwrap(), State::Open);
    tokio::time::advance(Duration::from_secs(5)).await;
    d.tick_now();
    assert_eq!(d.state("payment").unwrap(), State::HalfOpen);
    let (_, body) = call(&app, "GET", "/status", None, "").await;
    let payment = class_in(&body, "payment");
    assert_eq!(payment["state"], "half_open");
    assert_eq!(payment["reason"], "probes_exhausted", "{payment}");
    assert_eq!(payment["route"], "reject");
    // A closed class has none.
    assert_eq!(class_in(&body, "browse_log")["reason"], Value::Null);
}

#[tokio::test]
async fn commands_need_the_token_and_status_shows_what_they_did() {
    let d = shop();
    let app = Admin::new(&d, TOKEN).unwrap().router();
    let uri = "/classes/payment/force_open";
    for token in [
        None,
        Some("wrong-token-of-32-characters!!!!"),
        Some(&TOKEN[..31]),
    ] {
        let (status, body) = call(&app, "POST", uri, token, "").await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{token:?}");
        assert_eq!(body["error"], "a valid bearer token is required");
    }
    assert_eq!(d.state("payment").unwrap(), State::Closed);

    let (status, body) = call(&app, "POST", uri, Some(TOKEN), "").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["state"], "forced_open");
    assert_eq!(d.state("payment").unwrap(), State::ForcedOpen);

    // Calls to the forced-open class are shed, and the status counts them.
    support::window(&d, "payment", 20, 0, 0).await;
    let (status, body) = call(&app, "GET", "/status", None, "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["service"], "shop");
    let payment = class_in(&body, "payment");
    assert_eq!(payment["tier"], "gold");
    assert_eq!(payment["state"], "forced_open");
    assert_eq!(
        payment["shadow_state"], "forced_open",
        "no shadow: the state in force"
    );
    assert_eq!(payment["manual"], true);
    assert_eq!(payment["reason"], "forced_open");
    assert_eq!(payment["shed"], 20);
    assert_eq!(
        payment["overloaded"], 0,
        "shed by its breaker, not by admission"
    );
    assert_eq!(payment["diverted_share"], 1.0);
    assert_eq!(payment["prediction_record"], Value::Null, "no predictor");
    assert_eq!(payment["calibration_restored"], false, "no predictor");
    assert_eq!(
        payment["success"],
        Value::Null,
        "no call reached the service"
    );

    // A command has nothing to set: a level or a duration sent with one is refused, not
    // taken for done (a hostile trial's `{"duration_ms": -1}` was answered `200 degraded`).
    for (uri, body) in [
        (
            "/classes/payment/degrade",
            r#"{"state": "open", "duration_ms": -1}"#,
        ),
        ("/classes/payment/reset?duration=99999999999", ""),
    ] {
        let (status, json) = call(&app, "POST", uri, Some(TOKEN), body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{uri}: {json}");
        assert!(
            json["error"]
                .as_str()
                .unwrap()
                .contains("takes no body and no query"),
            "{json}"
        );
    }
    assert_eq!(d.state("payment").unwrap(), State::ForcedOpen, "unchanged");
    for nothing in ["\n", "{}", " null "] {
        let (status, _) = call(&app, "POST", "/classes/payment/reset", Some(TOKEN), nothing).await;
        assert_eq!(status, StatusCode::OK, "{nothing:?} sets nothing");
    }

    let (status, _) = call(&app, "POST", "/classes/nope/reset", Some(TOKEN), "").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, body) = call(&app, "POST", "/classes/payment/explode", Some(TOKEN), "").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
}

#[tokio::test(start_paused = true)]
async fn status_shows_the_calls_in_flight_past_their_sla_the_breaker_counts_as_failures() {
    // A user's trial: a class opened on "failure rate 57 % (11 of them overdue)" beside a
    // `success` of 0.99, and nothing in the status said why.
    let d = shop();
    let app = Admin::new(&d, TOKEN).unwrap().router();
    let id = d.class_id("payment").unwrap();
    let svc = tower::Layer::layer(&d.layer(id), support::failing_after(10_000));
    let hung: Vec<_> = (0..5)
        .map(|_| tokio::spawn(svc.clone().oneshot(false)))
        .collect();
    // Past gold's 50 ms SLA, and a tick and its slots later.
    tokio::time::sleep(Duration::from_millis(200)).await;
    d.tick_now();
    tokio::time::sleep(Duration::from_millis(500)).await;
    d.tick_now();
    let (_, body) = call(&app, "GET", "/status", None, "").await;
    let payment = class_in(&body, "payment");
    assert_eq!(payment["overdue"], 5, "{payment}");
    assert_eq!(payment["calls"], 0);
    assert_eq!(payment["success"], Value::Null, "none completed");
    for h in hung {
        h.abort();
    }
}

#[tokio::test(start_paused = true)]
async fn faults_are_switched_at_run_time_with_the_token() {
    let d = shop();
    let chaos = Chaos::builder(&d).build();
    let app = Admin::new(&d, TOKEN).unwrap().chaos(chaos.clone()).router();
    let fault = r#"{"target": "dependency:db", "latency_ms": 900, "errors": 0.2}"#;
    let (status, _) = call(&app, "PUT", "/chaos", None, fault).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(chaos.faults().is_empty());

    let (status, body) = call(&app, "PUT", "/chaos", Some(TOKEN), fault).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let faults = chaos.faults();
    assert_eq!(faults.len(), 1);
    assert_eq!(faults[0].0, Target::dependency("db"));
    assert_eq!(faults[0].1.delay(), Duration::from_millis(900));
    assert_eq!(faults[0].1.rates(), (0.2, 0.0, 0.0));
    let (_, listed) = call(&app, "GET", "/chaos", None, "").await;
    assert_eq!(listed[0]["target"], "dependency:db");

    // Bad input is refused, naming what is wrong, and changes nothing.
    let (status, body) = call(&app, "PUT", "/chaos", Some(TOKEN), r#"{"target": "db"}"#).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("`db` is not a target"),
        "{body}"
    );
    let (status, body) = call(
        &app,
        "PUT",
        "/chaos",
        Some(TOKEN),
        r#"{"target": "class:payment", "errors": 2}"#,
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body["error"].as_str().unwrap().contains("chaos.errors"),
        "{body}"
    );
    let (status, body) = call(
        &app,
        "PUT",
        "/chaos",
        Some(TOKEN),
        r#"{"target": "class:payment", "colour": 1}"#,
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body["error"].as_str().unwrap().contains("colour"), "{body}");
    assert_eq!(chaos.faults().len(), 1);

    let (status, _) = call(&app, "DELETE", "/chaos", None, "").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = call(
        &app,
        "DELETE",
        "/chaos?target=dependency:db",
        Some(TOKEN),
        "",
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(chaos.faults().is_empty());
    let (status, _) = call(
        &app,
        "DELETE",
        "/chaos?target=dependency:db",
        Some(TOKEN),
        "",
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn the_status_page_reads_status_and_cannot_be_framed() {
    let d = shop();
    let app = Admin::new(&d, TOKEN).unwrap().router();
    let res = app
        .oneshot(Request::get("/").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let h = res.headers();
    assert_eq!(h["content-type"], "text/html; charset=utf-8");
    assert_eq!(h["x-frame-options"], "DENY");
    assert!(
        h["content-security-policy"]
            .to_str()
            .unwrap()
            .contains("frame-ancestors 'none'")
    );
    let page =
        String::from_utf8(res.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
    // It reads the JSON this router serves, relative to where it is mounted, and sends the
    // token it is given with the commands this router takes.
    assert!(page.contains(r#"new URL("status", base)"#));
    assert!(page.contains(r#""classes/" + encodeURIComponent(cls) + "/" + cmd"#));
    assert!(page.contains(r#""Authorization": "Bearer " + token.value"#));
    for cmd in ["force_open", "force_closed", "reset"] {
        assert!(page.contains(&format!("\"{cmd}\"")), "{cmd}");
    }
    // What an operator must not miss is said above the classes, from the fields `/status`
    // has (a fault left in force, a failing predictor, refused policies were in the JSON
    // only).
    for field in [
        "s.chaos",
        "f.latency_ms",
        "f.errors",
        "p.error",
        "p.failed_batches",
        "p.not_probabilities",
        "pol.last_load_refused",
        "pol.quarantined",
    ] {
        assert!(page.contains(field), "{field}");
    }
    // Data goes in with textContent only: no markup from the server's answers.
    assert!(!page.contains("innerHTML"));
}

#[tokio::test]
async fn faults_show_every_setting_and_odd_requests_get_json_errors() {
    let d = shop();
    let chaos = Chaos::builder(&d).build();
    let app = Admin::new(&d, TOKEN).unwrap().chaos(chaos.clone()).router();
    // Jitter and the hang limit were set but not shown: the fault looked like a no-op.
    let fault =
        r#"{"target": "class:browse_log", "jitter_ms": 5000, "hangs": 0.5, "hang_for_ms": 2000}"#;
    let (status, body) = call(&app, "PUT", "/chaos", Some(TOKEN), fault).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (_, listed) = call(&app, "GET", "/chaos", None, "").await;
    assert_eq!(listed[0]["jitter_ms"], 5000, "{listed}");
    assert_eq!(listed[0]["hang_for_ms"], 2000, "{listed}");
    assert_eq!(listed[0]["hangs"], 0.5, "{listed}");

    // A fault is an object naming its fields: serde reads a struct from an array of its
    // fields in order too, and a hostile trial set one so; and a hang that lasts no time.
    for (fault, says) in [
        (
            r#"["class:browse_log", 0, 0, 0.5, 0, 0, null]"#,
            "a JSON object",
        ),
        ("[]", "a JSON object"),
        (
            r#"{"target": "class:browse_log", "hangs": 1.0, "hang_for_ms": 0}"#,
            "chaos.hang_for",
        ),
        (
            r#"{"target": "class:browse_log", "target": "class:payment", "errors": 1.0}"#,
            "duplicate field",
        ),
    ] {
        let (status, json) = call(&app, "PUT", "/chaos", Some(TOKEN), fault).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{fault}");
        let error = json["error"].as_str().unwrap();
        assert!(
            error.contains(says) && !error.contains("FaultBody"),
            "{error}"
        );
    }
    assert_eq!(chaos.faults().len(), 1, "nothing set");

    // What an extractor refuses is answered in JSON too, with its status; an unknown or
    // repeated query parameter clears nothing.
    for (method, uri, body, want) in [
        (
            "DELETE",
            "/chaos?colour=red",
            String::new(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "DELETE",
            "/chaos?target=class:browse_log&target=class:payment",
            String::new(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "POST",
            "/classes/%FF/reset",
            String::new(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "PUT",
            "/chaos",
            "x".repeat(3 * 1024 * 1024),
            StatusCode::PAYLOAD_TOO_LARGE,
        ),
        // A method the path does not take (axum's own answer has an empty body).
        (
            "DELETE",
            "/status",
            String::new(),
            StatusCode::METHOD_NOT_ALLOWED,
        ),
        (
            "GET",
            "/classes/payment/reset",
            String::new(),
            StatusCode::METHOD_NOT_ALLOWED,
        ),
    ] {
        let (status, json) = call(&app, method, uri, Some(TOKEN), &body).await;
        assert_eq!(status, want, "{method} {uri}");
        assert!(json["error"].is_string(), "{method} {uri}: {json}");
    }
    assert_eq!(chaos.faults().len(), 1, "nothing cleared");
    let res = app
        .clone()
        .oneshot(
            Request::builder()
                .method("DELETE")
                .uri("/status")
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.headers()["allow"], "GET,HEAD");
    // A name from the path is echoed cut, not at whatever length it was sent.
    let long = "c".repeat(10_000);
    let (status, json) = call(
        &app,
        "POST",
        &format!("/classes/{long}/reset"),
        Some(TOKEN),
        "",
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let error = json["error"].as_str().unwrap();
    assert!(
        error.len() < 200 && error.contains("10000 bytes"),
        "{error}"
    );

    // A bounded number of faults: every call matches its path against the route faults.
    for i in 0..tower_degrade::chaos::MAX_FAULTS * 2 {
        let fault = format!(r#"{{"target": "route:/r{i}/{{x}}", "latency_ms": 1}}"#);
        let (status, json) = call(&app, "PUT", "/chaos", Some(TOKEN), &fault).await;
        if status != StatusCode::OK {
            assert_eq!(status, StatusCode::BAD_REQUEST);
            assert!(
                json["error"].as_str().unwrap().contains("faults are set"),
                "{json}"
            );
            break;
        }
    }
    assert_eq!(chaos.faults().len(), tower_degrade::chaos::MAX_FAULTS);
}

#[tokio::test]
async fn a_path_the_api_does_not_serve_is_a_404_naming_it_with_or_without_the_token() {
    // It was a 401 asking for the token (the token's check covered the router's fallback),
    // and with the token an empty 404: a typo in a read's URL looked like an auth failure.
    let d = shop();
    let app = Admin::new(&d, TOKEN).unwrap().router();
    for token in [None, Some(TOKEN)] {
        for uri in ["/nope", "/status/", "/classes/payment"] {
            let (status, json) = call(&app, "GET", uri, token, "").await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{uri}: {json}");
            let error = json["error"].as_str().unwrap();
            assert!(
                error.starts_with(&format!("no such path: {uri} ")),
                "{error}"
            );
        }
    }
    // The writes still need it.
    let (status, _) = call(&app, "POST", "/classes/payment/reset", None, "").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_client_that_never_reads_its_answers_gives_its_connection_back() {
    // A client that pipelines requests and never reads the answers is never idle: 64 of
    // them held the admin API (its every connection) for as long as they liked.
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpStream;
    use tower_degrade::admin::{CONNECTION_LIFETIME, HEADER_READ_TIMEOUT, MAX_CONNECTIONS};

    let (_d, addr) = served_on_loopback().await;
    let pipelined = b"GET /status HTTP/1.1\r\nhost: localhost\r\n\r\n".repeat(5_000);
    let mut holders = Vec::new();
    for _ in 0..MAX_CONNECTIONS {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let requests = pipelined.clone();
        holders.push(tokio::spawn(async move {
            let _ = s.write_all(&requests).await;
            // Held, never read.
            std::future::pending::<()>().await;
            drop(s);
        }));
    }
    // The clock runs on while every task waits on its socket: the held connections end
    // within their lifetime and the time their last answer may take, and a request is
    // answered.
    answered_within(addr, CONNECTION_LIFETIME + HEADER_READ_TIMEOUT * 2).await;
    for h in holders {
        h.abort();
    }
}

/// `GET /status` on a connection of its own to `addr` is answered `200` within `limit`.
async fn answered_within(addr: std::net::SocketAddr, limit: std::time::Duration) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let answer = tokio::time::timeout(limit, async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(b"GET /status HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
            .await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        Ok::<_, std::io::Error>(buf)
    })
    .await
    .unwrap_or_else(|_| panic!("not answered within {limit:?}"))
    .unwrap();
    assert!(
        answer.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
}

/// The shop's admin API served by `admin::serve` on a loopback port: the degrader (keep it)
/// and the address.
async fn served_on_loopback() -> (Degrader, std::net::SocketAddr) {
    let d = shop();
    let app = Admin::new(&d, TOKEN).unwrap().router();
    let listener = bind("127.0.0.1:0".parse().unwrap(), Exposure::Loopback)
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(tower_degrade::admin::serve(listener, app));
    (d, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_trickling_connections_are_closed_and_never_crowd_out_the_api() {
    // With `axum::serve`, connections sending a byte and then nothing stayed open for ever:
    // enough of them used up the process's file descriptors. `admin::serve` caps how many
    // are open and closes one whose request head does not arrive in time.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;
    use tower_degrade::admin::{HEADER_READ_TIMEOUT, MAX_CONNECTIONS};

    let (_d, addr) = served_on_loopback().await;
    let mut idle = Vec::new();
    for _ in 0..MAX_CONNECTIONS + 16 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"G").await.unwrap();
        idle.push(s);
    }
    // A real request waits for a slot at most until the idle ones time out.
    let started = std::time::Instant::now();
    answered_within(addr, HEADER_READ_TIMEOUT * 3).await;
    assert!(started.elapsed() < HEADER_READ_TIMEOUT * 3);
    // The idle connections were closed by the server.
    for mut s in idle.drain(..MAX_CONNECTIONS) {
        let mut rest = Vec::new();
        tokio::time::timeout(HEADER_READ_TIMEOUT, s.read_to_end(&mut rest))
            .await
            .expect("closed by the server")
            .ok();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loopback_listener_answers_only_requests_addressed_to_this_machine() {
    // In a trial, `Host: evil.example` read `/status` and the page from a loopback listener:
    // a web page that rebinds its own name to 127.0.0.1 reads them through the browser.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    let (_d, addr) = served_on_loopback().await;
    let raw = |head: String| async move {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(head.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.unwrap();
        String::from_utf8_lossy(&buf).into_owned()
    };
    let get = |path: &'static str, host: String| {
        raw(format!(
            "GET {path} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n"
        ))
    };
    for host in [
        "evil.example",
        "evil.example:9901",
        "127.0.0.1.evil.example",
        "localhost.evil",
    ] {
        for path in ["/status", "/"] {
            let answer = get(path, host.to_owned()).await;
            assert!(
                answer.starts_with("HTTP/1.1 403"),
                "{host} {path}: {answer}"
            );
            assert!(answer.contains("loopback"), "{answer}");
        }
    }
    for host in [
        format!("localhost:{}", addr.port()),
        format!("127.0.0.1:{}", addr.port()),
        "LOCALHOST".to_owned(),
        "admin.localhost".to_owned(),
        "[::1]:9901".to_owned(),
    ] {
        let answer = get("/status", host.clone()).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{host}: {answer}");
    }
    // In a hostile trial: a second `Host`, a target naming another host, a "port" carrying
    // another name were let through.
    for head in [
        "GET /status HTTP/1.1\r\nhost: localhost\r\nhost: evil.example\r\nconnection: close\r\n\r\n",
        "GET http://evil.example/status HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n",
        "GET /status HTTP/1.1\r\nhost: 127.0.0.1:80@evil.example\r\nconnection: close\r\n\r\n",
    ] {
        let answer = raw(head.to_owned()).await;
        assert!(answer.starts_with("HTTP/1.1 403"), "{head:?}: {answer}");
    }
    let answer = raw(format!(
        "GET http://localhost:{}/status HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n",
        addr.port()
    ))
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // HTTP/1.1 with no `Host` is refused, as RFC 9112 asks (a hostile trial's was served);
    // an HTTP/1.0 tool may send none.
    let answer = raw("GET /status HTTP/1.1\r\nconnection: close\r\n\r\n".to_owned()).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("needs a Host header"), "{answer}");
    let answer = raw("GET /status HTTP/1.0\r\n\r\n".to_owned()).await;
    assert!(
        answer.starts_with("HTTP/1.0 200") || answer.starts_with("HTTP/1.1 200"),
        "{answer}"
    );
}
