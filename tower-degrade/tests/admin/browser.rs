//! The status page in a real browser: headless Chromium driven over WebDriver by
//! `chromedriver` (Debian's `chromium` and `chromium-driver`; `scripts/test` installs them).
//! The page renders the classes, shows a class opening on its next refresh after the tick
//! that opened it (and, under the prediction, the predictor's record of it), and its buttons
//! work with the token and are refused without it.
//!
//! `CHROMEDRIVER` and `CHROME` name other binaries than `chromedriver` and `chromium` on the
//! `PATH`.

use std::net::{Ipv4Addr, SocketAddr, TcpListener as StdListener};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::elements::Element;
use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::json;
use tower_degrade::admin::{Admin, Exposure, bind};
use tower_degrade::breaker::{BreakerConfig, State};
use tower_degrade::chaos::{Chaos, Fault, Target};
use tower_degrade::predict::{Predictor, PredictorConfig};
use tower_degrade::{BoxError, ClassConfig};

use super::{TOKEN, support};

/// How long the page may take to show what the degrader already holds: its refresh interval
/// (1 s) several times over, for a loaded machine. Waiting stops as soon as it shows.
const PAGE_DEADLINE: Duration = Duration::from_secs(15);

/// A `chromedriver` on a free loopback port, killed when dropped.
struct Driver {
    child: Child,
    port: u16,
}

impl Driver {
    fn start() -> Driver {
        let port = StdListener::bind((Ipv4Addr::LOCALHOST, 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let bin = std::env::var("CHROMEDRIVER").unwrap_or_else(|_| "chromedriver".into());
        let child = Command::new(&bin)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "{bin} must be installed (Debian's chromium-driver; scripts/test installs \
                     it), or CHROMEDRIVER set: {e}"
                )
            });
        Driver { child, port }
    }

    async fn session(&self) -> Client {
        let mut args = vec![
            "--headless=new",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--window-size=1400,900",
        ];
        // Chromium's sandbox refuses to run as root (as CI does).
        if is_root() {
            args.push("--no-sandbox");
        }
        let mut options = json!({ "args": args });
        if let Ok(chrome) = std::env::var("CHROME") {
            options["binary"] = chrome.into();
        }
        let mut caps = serde_json::Map::new();
        caps.insert("goog:chromeOptions".into(), options);
        let url = format!("http://127.0.0.1:{}", self.port);
        let started = Instant::now();
        loop {
            match ClientBuilder::new(HttpConnector::new())
                .capabilities(caps.clone())
                .connect(&url)
                .await
            {
                Ok(c) => return c,
                // chromedriver takes a moment to listen.
                Err(_) if started.elapsed() < PAGE_DEADLINE => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("no browser session from chromedriver at {url}: {e}"),
            }
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// Waits until `read` of the page gives `Some`, polling the DOM, up to [`PAGE_DEADLINE`].
async fn until<T, F, Fut>(what: &str, mut read: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let started = Instant::now();
    loop {
        if let Some(v) = read().await {
            return v;
        }
        assert!(
            started.elapsed() < PAGE_DEADLINE,
            "the page did not show {what} within {PAGE_DEADLINE:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The text of the first element matching `css`, if there is one.
async fn text(c: &Client, css: &str) -> Option<String> {
    let e: Element = c.find(Locator::Css(css)).await.ok()?;
    e.text().await.ok()
}

async fn badge(c: &Client, class: &str) -> Option<String> {
    text(c, &format!("tr[data-class=\"{class}\"] .state")).await
}

async fn click(c: &Client, class: &str, command: &str) {
    c.find(Locator::Css(&format!(
        "tr[data-class=\"{class}\"] button[data-command=\"{command}\"]"
    )))
    .await
    .unwrap()
    .click()
    .await
    .unwrap();
}

async fn type_token(c: &Client, token: &str) {
    let input = c.find(Locator::Id("token")).await.unwrap();
    input.clear().await.unwrap();
    if !token.is_empty() {
        input.send_keys(token).await.unwrap();
    }
}

/// Waits for the page's message line to change from `before` and returns it.
async fn message_after(c: &Client, before: &str) -> String {
    until("an answer to the command", || async {
        text(c, "#message").await.filter(|m| m != before)
    })
    .await
}

/// Answers 0.05 for every class, a predictor that sees nothing coming, until told to fail.
struct Quiet(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Predictor for Quiet {
    fn predict(&mut self, _input: &[f32], out: &mut [f32]) -> Result<(), BoxError> {
        if self.0.load(std::sync::atomic::Ordering::Relaxed) {
            return Err("the model's device is gone".into());
        }
        out.fill(0.05);
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_in_a_browser_shows_a_class_opening_and_its_buttons_need_the_token() {
    // The shop, with a predictor at a fixed threshold for payment (armed once a class's window
    // is whole: 68 ticks, ticked below before the page is opened).
    let failing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let d = support::builder("shop")
        .breaker(BreakerConfig::default().predict_threshold(0.87))
        .class(ClassConfig::gold("payment").depends_on("db"))
        .class(ClassConfig::bronze("browse_log").depends_on("third_party:analytics"))
        // browse_log calibrates its threshold (the default), and has no calls to learn from.
        .class_breaker("browse_log", BreakerConfig::default())
        .predictor(Quiet(failing.clone()), PredictorConfig::default())
        .build_with_worker()
        .expect("valid config")
        .0;
    let chaos = Chaos::builder(&d).build();
    let app = Admin::new(&d, TOKEN).unwrap().chaos(chaos.clone()).router();
    let listener = bind(
        SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
        Exposure::Loopback,
    )
    .await
    .unwrap();
    let page = format!("http://{}/", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    for _ in 0..2 * tower_degrade::predict::WINDOW {
        d.tick_now();
    }

    let driver = Driver::start();
    let c = driver.session().await;
    c.goto(&page).await.unwrap();

    // It renders every class with its tier and state.
    for (class, tier) in [("payment", "gold"), ("browse_log", "bronze")] {
        let row = until(class, || async {
            text(&c, &format!("tr[data-class=\"{class}\"]")).await
        })
        .await;
        assert!(row.contains(tier), "{row}");
        assert_eq!(badge(&c, class).await.as_deref(), Some("closed"));
    }

    // A failing window opens payment on the tick that ends it; the page shows it on its next
    // refresh, beside that tick's number (no tick runs after it here).
    let before = d.status().tick;
    support::window(&d, "payment", 200, 1, 0).await;
    assert_eq!(d.state("payment").unwrap(), State::Open);
    let opened_at = d.status().tick;
    assert_eq!(opened_at, before + 1, "one tick opened it");
    until("payment open", || async {
        badge(&c, "payment").await.filter(|s| s == "open")
    })
    .await;
    assert_eq!(text(&c, "#tick").await, Some(opened_at.to_string()));
    let why = text(&c, "tr[data-class=\"payment\"] td:nth-child(4)")
        .await
        .unwrap();
    assert!(!why.is_empty(), "the page says why payment is open");
    // The predictor did not warn of it: its record, under the prediction, says so.
    let prediction = c
        .find(Locator::Css("tr[data-class=\"payment\"] td:nth-child(8)"))
        .await
        .unwrap();
    // Beside it, the threshold it warns at.
    assert_eq!(prediction.text().await.unwrap(), "0.05 / 0.87");
    // One out of the model's reach says how far under 1 it is (it read "1.00").
    let near_one = c
        .execute("return threshold(0.99999999);", vec![])
        .await
        .unwrap();
    assert_eq!(near_one, serde_json::json!("1 − 1e-8 (out of reach)"));
    let shown = c
        .execute(
            "return [1, 0.9999, 0.995, 0.99, 0.004].map(threshold);",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(
        shown,
        serde_json::json!(["1 (out of reach)", "1 − 1e-4", "0.995", "0.99", "0.0040"])
    );
    let record = prediction.attr("title").await.unwrap().unwrap_or_default();
    assert_eq!(
        record,
        "warnings confirmed: 0, false alarms: 0, breaches missed: 1"
    );
    // A class still calibrating says how many healthy scores it has to go.
    assert_eq!(
        text(&c, "tr[data-class=\"browse_log\"] td:nth-child(8)")
            .await
            .as_deref(),
        Some("calibrating, 3600 to go")
    );

    // Without the token, or with a wrong one, a button is refused and changes nothing.
    let mut shown = text(&c, "#message").await.unwrap_or_default();
    for token in ["", "wrong-token-of-32-characters!!!!"] {
        type_token(&c, token).await;
        click(&c, "browse_log", "force_open").await;
        shown = message_after(&c, &shown).await;
        assert!(shown.starts_with("refused (401)"), "{shown}");
        assert_eq!(d.state("browse_log").unwrap(), State::Closed);
        // Clear it so the next answer is a change even if it reads the same.
        c.execute(
            "document.getElementById('message').textContent = ''",
            vec![],
        )
        .await
        .unwrap();
        shown.clear();
    }

    // With it, the button takes effect and the page shows the new state.
    type_token(&c, TOKEN).await;
    click(&c, "browse_log", "force_open").await;
    let answer = message_after(&c, &shown).await;
    assert_eq!(answer, "browse_log: forced_open");
    assert_eq!(d.state("browse_log").unwrap(), State::ForcedOpen);
    until("browse_log forced open", || async {
        badge(&c, "browse_log").await.filter(|s| s == "forced_open")
    })
    .await;
    let shadow = "tr[data-class=\"payment\"] .shadow";
    assert_eq!(
        text(&c, shadow).await.as_deref(),
        Some(""),
        "no shadow to show"
    );

    // A dry run: the state in force, and beside it the state the class would be in.
    d.metrics_only("payment").unwrap();
    until("payment's shadow shown", || async {
        text(&c, shadow).await.filter(|s| s == "would be open")
    })
    .await;
    assert_eq!(badge(&c, "payment").await.as_deref(), Some("metrics_only"));

    // A fault injected is said above the classes (it was in `/status` only), and so is a
    // predictor failing, and once it answers again, that it failed.
    assert_eq!(text(&c, "#notices").await.as_deref(), Some(""));
    let fault = Fault::new().latency(Duration::from_millis(900)).errors(0.2);
    chaos.set(Target::dependency("db"), fault).unwrap();
    until("the fault shown", || async {
        text(&c, "#notices")
            .await
            .filter(|m| m == "fault injected on dependency:db: +900 ms, 20.00 % errors")
    })
    .await;
    chaos.clear_all();
    until("the fault gone", || async {
        text(&c, "#notices").await.filter(|m| m.is_empty())
    })
    .await;
    failing.store(true, std::sync::atomic::Ordering::Relaxed);
    d.tick_now();
    until("the predictor's failure shown", || async {
        text(&c, "#notices")
            .await
            .filter(|m| m == "predictor failing: the model's device is gone")
    })
    .await;
    failing.store(false, std::sync::atomic::Ordering::Relaxed);
    d.tick_now();
    until("the predictor answering again", || async {
        text(&c, "#notices").await.filter(|m| {
            m == "predictor: 1 batch failed since start (last: the model's device is gone)"
        })
    })
    .await;

    // A refresh that fails says so, and the next one that succeeds clears it (it stayed on
    // the page for good after a restart of the service).
    c.execute(
        "window.realFetch = window.fetch; \
         window.fetch = () => Promise.reject(new TypeError('Failed to fetch'));",
        vec![],
    )
    .await
    .unwrap();
    until("the failed refresh", || async {
        text(&c, "#message")
            .await
            .filter(|m| m.starts_with("status unavailable"))
    })
    .await;
    c.execute("window.fetch = window.realFetch;", vec![])
        .await
        .unwrap();
    until("the message cleared", || async {
        text(&c, "#message").await.filter(|m| m.is_empty())
    })
    .await;

    c.close().await.unwrap();
}
