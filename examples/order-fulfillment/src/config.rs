//! The service's configuration file (TOML, through serde): the degrader's settings (the
//! service, classes, breaker settings, admission), read by the library's
//! [`DegraderFile`], and the example's own (policies, storage, the backfill, the queue, the
//! predictor, and the storm to play) beside them in the same file. Unknown fields are
//! errors, and every error names the file, the line and the field (`classes[2].sla_ms`).
//!
//! Everything here can be built in code as well: [`Config::degrader`] is a plain
//! `DegraderBuilder`, and the example's `main` shows both.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use tower_degrade::chaos::{Chaos, Fault, Target};
use tower_degrade::config::{DegraderFile, FileError};
use tower_degrade::error::ConfigError;
use tower_degrade::fallback::{Backfill, FallbackRouter, MemoryStore, Replayed, replay_fn};
use tower_degrade::{DegraderBuilder, Route};

/// The whole file: the degrader's settings (`service`, `tick_ms`, `[breaker]`,
/// `[admission]`, `[[classes]]`: the library's [`DegraderFile`]) and the example's own.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    /// The degrader's settings, with the line of each for errors.
    pub(crate) file: DegraderFile,
    /// The policies directory, relative to the configuration file; none: no policies.
    pub(crate) policies: Option<PathBuf>,
    pub(crate) storage: StorageSection,
    pub(crate) backfill: BackfillSection,
    pub(crate) queue: QueueSection,
    /// The failure predictor beside the protected run (the example built with
    /// `--features predictor`); none: no predictor.
    pub(crate) predictor: Option<PredictorSection>,
    /// The simulated dependencies.
    pub(crate) dependencies: DependenciesSection,
    /// The storm the example plays.
    pub(crate) storm: StormSection,
}

/// The example's own top-level keys.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Sections {
    #[serde(default)]
    policies: Option<PathBuf>,
    #[serde(default)]
    storage: StorageSection,
    #[serde(default)]
    backfill: BackfillSection,
    #[serde(default)]
    queue: QueueSection,
    #[serde(default)]
    predictor: Option<PredictorSection>,
    dependencies: DependenciesSection,
    storm: StormSection,
}

/// `[storage]`: where kept calls are stored.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct StorageSection {
    /// The embedded store's file; none: a new file in the system's temp dir per run.
    pub(crate) path: Option<PathBuf>,
}

/// `[queue]`: where the order events the queue consumer handles come from.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct QueueSection {
    /// A Redis server whose stream holds the events (the example built with
    /// `--features redis`); none: an in-process channel.
    pub(crate) redis_url: Option<String>,
    /// How long an event may stay unacknowledged before another consumer takes it over.
    pub(crate) claim_idle_ms: Option<u64>,
}

impl QueueSection {
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn claim_idle(&self) -> Duration {
        Duration::from_millis(self.claim_idle_ms.unwrap_or(5_000))
    }
}

/// `[predictor]`: the failure predictor (`tower-degrade-ai`) in the protected run.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PredictorSection {
    /// `bundled` (the model shipped with tower-degrade-ai), or an ONNX file relative to the
    /// configuration file.
    pub(crate) model: String,
    /// The probability the storm's report counts as an alarm (2 ticks in a row); the seed's
    /// fixed 0.87.
    #[serde(default = "default_alarm_at")]
    pub(crate) alarm_at: f64,
}

fn default_alarm_at() -> f64 {
    0.87
}

/// `[backfill]`: when spooled calls are replayed.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct BackfillSection {
    /// Replays per second at most.
    #[serde(default = "default_backfill_rate")]
    pub(crate) rate: f64,
    /// Off-peak: the class receives fewer requests a second than this.
    pub(crate) below_rps: Option<f64>,
    /// Off-peak: a daily window, `["22:00", "06:00"]` (UTC).
    pub(crate) window: Option<[String; 2]>,
}

fn default_backfill_rate() -> f64 {
    200.0
}

impl Default for BackfillSection {
    fn default() -> Self {
        Self {
            rate: default_backfill_rate(),
            below_rps: None,
            window: None,
        }
    }
}

/// The longest a simulated dependency may take (a minute): the storm waits for its calls.
const MAX_DEPENDENCY_MS: u64 = 60_000;

/// The most calls per second the storm plays, all classes together at its peak.
const MAX_RATE: f64 = 20_000.0;

/// A number as a person reads it: `1e300`, not three hundred digits.
fn shown(v: f64) -> String {
    if v.abs() >= 1e6 {
        format!("{v:e}")
    } else {
        v.to_string()
    }
}

/// `[dependencies]`: the simulated database, cache and third-party APIs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DependenciesSection {
    /// Database connections: the capacity every DB user shares.
    pub(crate) db_connections: usize,
    /// A query's time on a healthy database.
    pub(crate) db_query_ms: u64,
    pub(crate) redis_ms: u64,
    pub(crate) payments_api_ms: u64,
    pub(crate) analytics_api_ms: u64,
}

/// `[storm]`: the Double-11 scenario.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct StormSection {
    /// The seed of the chaos layer's draws and the traffic's arrival times.
    pub(crate) seed: u64,
    pub(crate) normal_secs: f64,
    pub(crate) fault_secs: f64,
    pub(crate) recovery_secs: f64,
    /// How long the run may wait after the recovery for kept calls to be replayed.
    pub(crate) drain_secs: f64,
    /// The traffic multiplier during the fault.
    pub(crate) spike: f64,
    /// A client gives up on a call after this long.
    pub(crate) client_timeout_ms: u64,
    /// Calls per second of each class in the normal phase.
    pub(crate) rates: std::collections::BTreeMap<String, f64>,
    /// The faults switched on for the fault phase.
    pub(crate) faults: Vec<FaultSection>,
}

/// `[[storm.faults]]`: one fault of the fault phase.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FaultSection {
    /// `dependency:db`, `class:payment_callback` or `route:/products/{id}`.
    #[serde(deserialize_with = "tower_degrade::config::parsed")]
    pub(crate) target: Target,
    #[serde(default)]
    pub(crate) latency_ms: u64,
    #[serde(default)]
    pub(crate) jitter_ms: u64,
    #[serde(default)]
    pub(crate) errors: f64,
    #[serde(default)]
    pub(crate) aborts: f64,
    #[serde(default)]
    pub(crate) hangs: f64,
}

impl FaultSection {
    pub(crate) fn fault(&self) -> Fault {
        Fault::new()
            .latency(Duration::from_millis(self.latency_ms))
            .jitter(Duration::from_millis(self.jitter_ms))
            .errors(self.errors)
            .aborts(self.aborts)
            .hangs(self.hangs)
    }
}

impl Config {
    /// Read and check the file at `path`.
    pub(crate) fn load(path: &Path) -> Result<Config, FileError> {
        let (file, sections) = DegraderFile::load_with::<Sections>(path)?;
        let mut config = Config::checked(file, sections)?;
        let dir = path.parent().unwrap_or(Path::new("."));
        if let Some(p) = config.policies.as_ref().filter(|p| p.is_relative()) {
            config.policies = Some(dir.join(p));
        }
        if let Some(p) = &config.policies {
            // Loaded once here, so that a missing directory or a script that does not
            // compile is said before the storm, not when the protected run starts.
            let bad = |e: &dyn fmt::Display| config.file.error("policies", e);
            let (degrader, _worker) = config.degrader().build_with_worker().map_err(|e| bad(&e))?;
            degrader.load_policies(p).map_err(|e| bad(&e))?;
        }
        if let Some(p) = config.predictor.as_mut().filter(|p| p.model != "bundled") {
            let model = dir.join(&p.model);
            // Said now, in any build: a name mistyped is not found out after the storm.
            if !model.is_file() {
                return Err(config.file.error(
                    "predictor.model",
                    format!(
                        "{}: no such file (`bundled`, or an ONNX file)",
                        model.display()
                    ),
                ));
            }
            p.model = model.to_string_lossy().into_owned();
        }
        Ok(config)
    }

    /// Parse and check `text`, naming `file` in errors.
    #[cfg(test)]
    pub(crate) fn parse(text: &str, file: &str) -> Result<Config, FileError> {
        let (file, sections) = DegraderFile::parse_with::<Sections>(text, file)?;
        Config::checked(file, sections)
    }

    fn checked(file: DegraderFile, s: Sections) -> Result<Config, FileError> {
        let config = Config {
            file,
            policies: s.policies,
            storage: s.storage,
            backfill: s.backfill,
            queue: s.queue,
            predictor: s.predictor,
            dependencies: s.dependencies,
            storm: s.storm,
        };
        config.check()?;
        Ok(config)
    }

    /// What serde and the library's file cannot check: names that must exist, values that
    /// must be in range for the example.
    fn check(&self) -> Result<(), FileError> {
        let err = |field: &str, what: String| Err(self.file.error(field, what));
        let classes = &self.file.classes;
        for name in self.storm.rates.keys() {
            if !classes.iter().any(|c| &c.name == name) {
                return err(
                    &format!("storm.rates.{name}"),
                    format!("no class is called `{name}`"),
                );
            }
        }
        for (i, f) in self.storm.faults.iter().enumerate() {
            if let Err(e) = f.fault().validate() {
                return err(&format!("storm.faults[{i}]"), e.to_string());
            }
        }
        if self.queue.redis_url.is_some() && !cfg!(feature = "redis") {
            return err(
                "queue.redis_url",
                "this build has no Redis support: run the example with `--features redis`"
                    .to_owned(),
            );
        }
        if let Some(i) = classes
            .iter()
            .position(|c| c.fallback == Some(Route::Service))
        {
            return err(
                &format!("classes[{i}].fallback"),
                "`service` is a route to a fallback service of your own, which this example \
                 has none of: its calls would be answered 503"
                    .to_owned(),
            );
        }
        if self.queue.claim_idle_ms == Some(0) {
            return err("queue.claim_idle_ms", "must be more than 0".to_owned());
        }
        if let Some(p) = &self.predictor
            && !(p.alarm_at > 0.0 && p.alarm_at <= 1.0)
        {
            return err(
                "predictor.alarm_at",
                format!("{} must be within 0.0 (excluded) and 1.0", p.alarm_at),
            );
        }
        let s = &self.storm;
        // Positive, and within what a run on one machine can play: a negative rate made the
        // traffic generator allocate without end, a day's storm never ends.
        for (field, v, most) in [
            ("storm.normal_secs", s.normal_secs, 3600.0),
            ("storm.fault_secs", s.fault_secs, 3600.0),
            ("storm.recovery_secs", s.recovery_secs, 3600.0),
            ("storm.drain_secs", s.drain_secs, 3600.0),
            ("storm.spike", s.spike, 100.0),
        ] {
            if !(v.is_finite() && v > 0.0 && v <= most) {
                return err(
                    field,
                    format!("{} must be a positive number, at most {most}", shown(v)),
                );
            }
        }
        for (name, &rate) in &s.rates {
            if !(rate.is_finite() && (0.0..=MAX_RATE).contains(&rate)) {
                return err(
                    &format!("storm.rates.{name}"),
                    format!("{} must be 0 to {MAX_RATE} calls per second", shown(rate)),
                );
            }
        }
        let total: f64 = s.rates.values().sum::<f64>() * s.spike;
        if total > MAX_RATE {
            return err(
                "storm.spike",
                format!(
                    "the rates times the spike are {total:.0} calls per second during the \
                     fault, over the {MAX_RATE} one machine can play"
                ),
            );
        }
        if s.client_timeout_ms == 0 {
            return err(
                "storm.client_timeout_ms",
                "must be more than 0: every call would be given up at once".to_owned(),
            );
        }
        let d = &self.dependencies;
        // A day's query is a storm that never ends: the example's callers wait for it.
        for (key, ms) in [
            ("db_query_ms", d.db_query_ms),
            ("redis_ms", d.redis_ms),
            ("payments_api_ms", d.payments_api_ms),
            ("analytics_api_ms", d.analytics_api_ms),
        ] {
            if ms > MAX_DEPENDENCY_MS {
                return err(
                    &format!("dependencies.{key}"),
                    format!("{ms} must be at most {MAX_DEPENDENCY_MS} ms"),
                );
            }
        }
        if !(1..=10_000).contains(&d.db_connections) {
            return err(
                "dependencies.db_connections",
                format!(
                    "{} must be 1 to 10,000 (with none, no query ever runs)",
                    d.db_connections
                ),
            );
        }
        self.check_with_the_library()
    }

    /// What the library refuses of the example's own sections (the backfill, the storm's
    /// fault targets; the degrader's settings were checked with the file), checked before
    /// any storm and named by line and field. Both were only checked when the protected run
    /// began, after the whole unprotected one.
    fn check_with_the_library(&self) -> Result<(), FileError> {
        // The example's app and jobs make calls of these classes (the classes' settings are
        // the file's, their names the app's).
        for class in crate::storm::CLASSES {
            if !self.file.classes.iter().any(|c| c.name == class) {
                return Err(self.file.error(
                    "classes",
                    format!(
                        "no class is called `{class}`, which the example's app has calls of \
                         (it routes to {})",
                        crate::storm::CLASSES.join(", ")
                    ),
                ));
            }
        }
        let (degrader, _worker) = self
            .degrader()
            .build_with_worker()
            .map_err(|e| self.file.error("classes", e))?;
        let backfill = self.backfill().map_err(|e| self.backfill_error(&e))?;
        let router = FallbackRouter::builder(&degrader)
            .store(MemoryStore::default())
            // Nothing is kept here: only the settings are checked.
            .replay(replay_fn(|_, _| async { Replayed::Done }))
            .backfill(backfill);
        // Silenced: what it would say of the routes it does not serve (the shop's router
        // has the inventory's batch_merge) is not about the shop.
        let built =
            tracing::subscriber::with_default(tracing::subscriber::NoSubscriber::default(), || {
                router.build()
            });
        let (_router, _worker) = built.map_err(|e| self.backfill_error(&e))?;
        let chaos = Chaos::builder(&degrader).build();
        for (i, f) in self.storm.faults.iter().enumerate() {
            chaos
                .set(f.target.clone(), f.fault())
                .map_err(|e| self.file.error(&format!("storm.faults[{i}].target"), e))?;
        }
        Ok(())
    }

    /// A backfill setting the library refused (`fallback.backfill.rate`), at the file's
    /// `[backfill]` key.
    fn backfill_error(&self, e: &ConfigError) -> FileError {
        let field = match e {
            // `window.start` and `window.end` are the two strings of `window`.
            ConfigError::InvalidValue { field, .. } if field.contains("backfill.window") => {
                "backfill.window"
            }
            ConfigError::InvalidValue { field, .. } => {
                field.strip_prefix("fallback.").unwrap_or(field)
            }
            _ => "backfill",
        };
        self.file.error(field, e)
    }

    /// The classes and settings as a degrader builder.
    pub(crate) fn degrader(&self) -> DegraderBuilder {
        self.file.builder()
    }

    /// The backfill settings (checked when the file was).
    pub(crate) fn backfill(&self) -> Result<Backfill, ConfigError> {
        let mut b = Backfill::default().rate(self.backfill.rate);
        if let Some(rps) = self.backfill.below_rps {
            b = b.below_rps(rps);
        }
        if let Some([start, end]) = &self.backfill.window {
            b = b.window(start, end)?;
        }
        Ok(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHIPPED: &str = include_str!("../order-fulfillment.toml");

    /// The shipped file with `from` replaced by `to` (which must be there).
    fn edited(from: &str, to: &str) -> String {
        assert!(SHIPPED.contains(from), "{from}");
        SHIPPED.replacen(from, to, 1)
    }

    fn error(text: &str) -> String {
        Config::parse(text, "shop.toml").unwrap_err().to_string()
    }

    fn line_of(text: &str, needle: &str) -> usize {
        text.lines().position(|l| l.contains(needle)).unwrap() + 1
    }

    /// The shipped file with `from` replaced by `to` is refused naming the line holding `at`
    /// and `field`.
    fn assert_names_line_and_field(from: &str, to: &str, at: &str, field: &str) {
        let text = edited(from, to);
        let e = error(&text);
        let line = line_of(&text, at);
        assert!(
            e.starts_with(&format!("shop.toml:{line}: field `{field}`: ")),
            "{to}: {e}"
        );
    }

    #[test]
    fn what_the_library_refuses_is_named_by_line_and_field_before_any_storm() {
        // These were accepted, then refused mid-storm (the backfill and the fault targets when
        // the protected run began) or with the file alone, neither line nor field.
        for (from, to, at, field) in [
            (
                "rate = 300.0",
                "rate = -1.0",
                "rate = -1.0",
                "backfill.rate",
            ),
            (
                "below_rps = 1000.0",
                "below_rps = -inf",
                "below_rps",
                "backfill.below_rps",
            ),
            (
                "below_rps = 1000.0",
                "below_rps = 1000.0\nwindow = [\"25:00\", \"06:00\"]",
                "window",
                "backfill.window",
            ),
            (
                "sla_ms = 300\n#",
                "sla_ms = 0\n#",
                "sla_ms = 0",
                "classes[0].sla_ms",
            ),
            (
                "min_requests = 10",
                "min_requests = 0",
                "min_requests",
                "breaker.min_requests",
            ),
            ("tick_ms = 500", "tick_ms = 0", "tick_ms", "tick_ms"),
            (
                "target = \"dependency:third_party:payments\"",
                "target = \"class:nope\"",
                "class:nope",
                "storm.faults[1].target",
            ),
            (
                "target = \"dependency:db\"",
                "target = \"dependency:dbb\"",
                "dependency:dbb",
                "storm.faults[0].target",
            ),
            (
                "depends_on = [\"db\", \"redis\"]",
                "depends_on = [\"\"]",
                "depends_on = [\"\"]",
                "classes[1].depends_on",
            ),
        ] {
            assert_names_line_and_field(from, to, at, field);
        }
    }

    #[test]
    fn settings_the_example_would_ignore_or_could_not_serve_are_errors() {
        for (from, to, at, field) in [
            (
                "adaptive = true",
                "adaptive = false",
                "per_dependency",
                "admission.per_dependency",
            ),
            (
                "db_query_ms = 8",
                "db_query_ms = 18446744073709551615",
                "db_query_ms",
                "dependencies.db_query_ms",
            ),
            (
                "fallback = \"delayed_retry\"",
                "fallback = \"service\"",
                "fallback = \"service\"",
                "classes[0].fallback",
            ),
        ] {
            assert_names_line_and_field(from, to, at, field);
        }
        // A class the app calls, renamed.
        let text = SHIPPED.replace("order_status", "status");
        let e = error(&text);
        assert!(
            e.contains("field `classes`: no class is called `order_status`"),
            "{e}"
        );
    }

    #[test]
    fn a_policies_directory_that_is_not_there_is_said_when_the_file_is_loaded() {
        let dir = std::env::temp_dir().join(format!("order-fulfillment-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("shop.toml");
        let text = SHIPPED.replacen(
            "tick_ms = 500",
            "tick_ms = 500\npolicies = \"none-here\"",
            1,
        );
        std::fs::write(&path, &text).unwrap();
        let e = Config::load(&path).unwrap_err().to_string();
        let line = line_of(&text, "policies =");
        assert!(
            e.starts_with(&format!("{}:{line}: field `policies`: ", path.display())),
            "{e}"
        );
        assert!(e.contains("none-here"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_predictor_model_that_is_not_there_is_said_when_the_file_is_loaded() {
        let dir =
            std::env::temp_dir().join(format!("order-fulfillment-model-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("shop.toml");
        let text = SHIPPED.replacen("model = \"bundled\"", "model = \"nosuch.onnx\"", 1);
        std::fs::write(&path, &text).unwrap();
        let e = Config::load(&path).unwrap_err().to_string();
        let line = line_of(&text, "model = ");
        assert_eq!(
            e,
            format!(
                "{}:{line}: field `predictor.model`: {}: no such file (`bundled`, or an ONNX file)",
                path.display(),
                dir.join("nosuch.onnx").display()
            )
        );
        // A file there is taken, in any build (whether it loads is checked before the storm
        // in a build with the predictor).
        std::fs::write(dir.join("nosuch.onnx"), b"not a model").unwrap();
        let config = Config::load(&path).unwrap();
        let model = config.predictor.as_ref().unwrap().model.clone();
        assert_eq!(model, dir.join("nosuch.onnx").to_string_lossy());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn the_shipped_file_builds_the_classes_the_app_routes_to() {
        let config = Config::parse(SHIPPED, "order-fulfillment.toml").unwrap();
        let (degrader, _worker) = config.degrader().build_with_worker().unwrap();
        crate::shop::classifier(&degrader).unwrap();
        for class in crate::storm::CLASSES {
            degrader.class_id(class).unwrap();
        }
        let _backfill = config.backfill().unwrap();
    }

    #[test]
    fn an_unknown_field_is_an_error_naming_file_line_and_field() {
        let text = edited("sla_ms = 300\n", "sla_ms = 300\ncolour = \"red\"\n");
        let e = error(&text);
        let line = line_of(&text, "colour");
        assert!(
            e.starts_with(&format!("shop.toml:{line}: field `classes[0]")),
            "{e}"
        );
        assert!(e.contains("unknown field `colour`"), "{e}");
    }

    #[test]
    fn a_value_of_the_wrong_type_names_its_field() {
        let text = edited("db_query_ms = 8", "db_query_ms = \"fast\"");
        let e = error(&text);
        let line = line_of(&text, "db_query_ms");
        assert!(
            e.starts_with(&format!(
                "shop.toml:{line}: field `dependencies.db_query_ms`"
            )),
            "{e}"
        );
    }

    #[test]
    fn a_tier_route_or_target_that_does_not_exist_is_named() {
        let text = edited("tier = \"gold\"", "tier = \"platinum\"");
        let e = error(&text);
        assert!(
            e.starts_with(&format!("shop.toml:{}:", line_of(&text, "platinum"))),
            "{e}"
        );
        assert!(
            e.contains("classes[0].tier") && e.contains("`platinum` is not a tier"),
            "{e}"
        );

        let text = edited("fallback = \"spool\"", "fallback = \"tape\"");
        let e = error(&text);
        assert!(
            e.contains("`tape` is not a route: use one of reject,"),
            "{e}"
        );

        let text = edited("target = \"dependency:db\"", "target = \"db\"");
        let e = error(&text);
        assert!(
            e.contains("storm.faults[0].target") && e.contains("`db` is not a target"),
            "{e}"
        );
    }

    #[test]
    fn names_and_values_serde_cannot_check_are_checked_with_their_line() {
        let text = edited("browse_log = 120", "browse_logs = 120");
        let e = error(&text);
        let line = line_of(&text, "browse_logs");
        assert_eq!(
            e,
            format!(
                "shop.toml:{line}: field `storm.rates.browse_logs`: no class is called `browse_logs`"
            )
        );

        let text = edited("errors = 1.0\n", "errors = 1.5\n");
        let e = error(&text);
        assert!(
            e.contains("field `storm.faults[1]`: invalid `chaos.errors`: 1.5"),
            "{e}"
        );

        let text = edited("spike = 3.0", "spike = -1");
        let e = error(&text);
        assert!(
            e.contains("field `storm.spike`: -1 must be a positive number"),
            "{e}"
        );

        // Values a run cannot play: a negative rate allocated without end, no database
        // connection hung the run, a day-long phase never ends.
        for (from, to, field, what) in [
            (
                "payment_callback = 30",
                "payment_callback = -30",
                "storm.rates.payment_callback",
                "-30 must be 0 to 20000",
            ),
            (
                "browse_log = 120",
                "browse_log = 100000000",
                "storm.rates.browse_log",
                "1e8 must be 0 to 20000",
            ),
            (
                "db_connections = ",
                "db_connections = 0 #",
                "dependencies.db_connections",
                "0 must be 1 to 10,000",
            ),
            (
                "fault_secs = 15",
                "fault_secs = 100000000",
                "storm.fault_secs",
                "1e8 must be a positive number, at most 3600",
            ),
            (
                "spike = 3.0",
                "spike = 1e300",
                "storm.spike",
                "1e300 must be a positive number, at most 100",
            ),
            (
                "spike = 3.0",
                "spike = 90",
                "storm.spike",
                "over the 20000 one machine can play",
            ),
            (
                "client_timeout_ms = 2000",
                "client_timeout_ms = 0",
                "storm.client_timeout_ms",
                "must be more than 0",
            ),
        ] {
            let text = edited(from, to);
            let e = error(&text);
            let line = line_of(&text, to.split(" #").next().unwrap());
            assert!(
                e.starts_with(&format!("shop.toml:{line}: field `{field}`: ")) && e.contains(what),
                "{to}: {e}"
            );
        }

        let text = edited("# claim_idle_ms = 5000", "claim_idle_ms = 0");
        let e = error(&text);
        let line = line_of(&text, "claim_idle_ms = 0");
        assert_eq!(
            e,
            format!("shop.toml:{line}: field `queue.claim_idle_ms`: must be more than 0")
        );
        let text = edited("alarm_at = 0.87", "alarm_at = 1.5");
        let e = error(&text);
        let line = line_of(&text, "alarm_at = 1.5");
        assert_eq!(
            e,
            format!(
                "shop.toml:{line}: field `predictor.alarm_at`: 1.5 must be within 0.0 (excluded) and 1.0"
            )
        );
        let text = edited("# redis_url", "redis_url");
        if cfg!(feature = "redis") {
            assert!(Config::parse(&text, "shop.toml").is_ok());
        } else {
            let e = error(&text);
            assert!(
                e.contains("field `queue.redis_url`: this build has no Redis support"),
                "{e}"
            );
        }
    }

    #[test]
    fn a_file_that_is_not_toml_names_its_line() {
        let e = error("service = \"x\"\n\n[classes\n");
        assert!(e.starts_with("shop.toml:3:"), "{e}");
    }
}
