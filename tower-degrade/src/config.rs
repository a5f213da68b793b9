//! The degrader's settings from a TOML file: the service, its classes and their tiers, the
//! breakers, admission and the HTTP / gRPC routes. Unknown fields are errors, and every error
//! names the file, the line and the field (``shop.toml:14: field `classes[1].sla_ms`: ...``),
//! what serde refuses (a wrong type, a missing field, a tier that does not exist) and what the
//! library refuses (an SLA of zero, a failure rate above 1, a route to a class not in the
//! file) alike, all when the file is read, before anything is built.
//!
//! Everything here can be built in code as well: the file gives a plain
//! [`DegraderBuilder`] and [`HttpClassifierBuilder`], to which code may add what the file does
//! not say (a predictor, the policy limits, a clock).
//!
//! ```toml
//! service = "checkout"
//! tick_ms = 500
//!
//! [breaker]            # every class's, unless it has its own
//! min_requests = 10
//! open_duration_ms = 2000
//!
//! [admission]          # priority admission under overload (off unless `adaptive = true`)
//! adaptive = true
//! max_limit = 500
//!
//! [[classes]]
//! name = "payment_callback"
//! tier = "gold"
//! sla_ms = 300
//! depends_on = ["db"]
//! fallback = "delayed_retry"
//! breaker = { failure_rate = 0.3 }
//!
//! [[classes]]
//! name = "browse_log"
//! tier = "bronze"
//! fallback = "spool"
//!
//! [[http.routes]]
//! method = "POST"
//! path = "/pay/{id}"
//! class = "payment_callback"
//!
//! [[http.routes]]
//! path = "/log"
//! class = "browse_log"
//! ```
//!
//! ```
//! use tower_degrade::config::DegraderFile;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let text = "service = \"checkout\"\n[[classes]]\nname = \"pay\"\ntier = \"gold\"\n\
//! #     [[http.routes]]\npath = \"/pay/{id}\"\nclass = \"pay\"\n";
//! // DegraderFile::load("checkout.toml")? reads a file; parse takes the text and its name.
//! let file = DegraderFile::parse(text, "checkout.toml")?;
//! let degrader = file.builder().build()?;
//! let classify = file.http_classifier(&degrader)?.build();
//! let layer = degrader.layer(classify).http();
//! # let _ = layer;
//! # Ok(())
//! # }
//! ```
//!
//! An application with settings of its own keeps them in the same file:
//! [`DegraderFile::parse_with`] gives the top-level keys this module does not know to a type of
//! the application's, with the same errors; a key neither reads is an error too. The
//! degrader's keys are `service`, `env`, `tick_ms`, `breaker`, `admission`, `classes` and
//! `http`: the application's are any others. In TOML a key after a `[table]` header belongs to
//! that table, so the application's plain top-level keys come before the first header.
//! Another format (YAML, JSON) is read with [`DegraderFile::from_deserializer`], errors then
//! naming the field but not the line (and with the degrader's keys only). The class named
//! `default` is the one of calls no rule classifies.
//!
//! Why these crates: `toml` parses with the span of every key and value (the line in every
//! error), `serde_path_to_error` gives the path of the field serde refused, `serde_ignored`
//! the keys an application's type would skip.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use serde::de::DeserializeOwned;
use toml::Spanned;
use toml::de::{DeTable, DeValue};

use crate::admit::Admission;
use crate::breaker::{BreakerConfig, Calibration, DegradeRule, PredictThreshold};
use crate::class::{ClassConfig, DEFAULT_CLASS, Registry, Route, Tier};
use crate::classify::{HttpClassifier, HttpClassifierBuilder};
use crate::error::ConfigError;
use crate::{Degrader, DegraderBuilder};

/// The top-level keys [`DegraderFile`] reads; [`DegraderFile::parse_with`] gives the others to
/// the application.
const KEYS: [&str; 7] = [
    "service",
    "env",
    "tick_ms",
    "breaker",
    "admission",
    "classes",
    "http",
];

/// The degrader's settings, as read from a file (see the [module](self)).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct DegraderFile {
    /// The service's name: the `service` label of every metric.
    pub service: String,
    /// The environment policies see as `ctx.env` (`DegraderBuilder::env`).
    #[serde(default)]
    pub env: Option<String>,
    /// The control tick, in milliseconds (500 when unset; 10 to 3,600,000).
    #[serde(default)]
    pub tick_ms: Option<u64>,
    /// `[breaker]`: the breaker settings of every class without its own.
    #[serde(default)]
    pub breaker: BreakerSection,
    /// `[admission]`: priority admission under overload.
    #[serde(default)]
    pub admission: AdmissionSection,
    /// `[[classes]]`: the task classes, in order.
    #[serde(default)]
    pub classes: Vec<ClassSection>,
    /// `[http]`: how HTTP and gRPC requests are classified.
    #[serde(default)]
    pub http: HttpSection,
    #[serde(skip)]
    source: Source,
}

/// `[breaker]`, or a class's `breaker`: each setting unset keeps the value it overrides (the
/// `[breaker]` table's for a class, [`BreakerConfig::default`]'s for `[breaker]`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct BreakerSection {
    /// [`BreakerConfig::min_requests`].
    pub min_requests: Option<u64>,
    /// [`BreakerConfig::failure_rate`].
    pub failure_rate: Option<f64>,
    /// [`BreakerConfig::slow_call_rate`].
    pub slow_call_rate: Option<f64>,
    /// [`BreakerConfig::open_duration`], in milliseconds.
    pub open_duration_ms: Option<u64>,
    /// [`BreakerConfig::max_open_duration`], in milliseconds.
    pub max_open_duration_ms: Option<u64>,
    /// [`BreakerConfig::half_open_probes`].
    pub half_open_probes: Option<u32>,
    /// [`BreakerConfig::probe_success_rate`].
    pub probe_success_rate: Option<f64>,
    /// [`BreakerConfig::recovery_step`].
    pub recovery_step: Option<f64>,
    /// [`BreakerConfig::recovery_ticks`].
    pub recovery_ticks: Option<u32>,
    /// [`BreakerConfig::degraded_admit_fraction`].
    pub degraded_admit_fraction: Option<f64>,
    /// [`BreakerConfig::degraded_recovery_ticks`].
    pub degraded_recovery_ticks: Option<u32>,
    /// A fixed prediction threshold (the seed's 0.87) in place of the calibrated one.
    pub predict_threshold: Option<f64>,
    /// The calibrated threshold's budget ([`Calibration::false_trips_per_day`]).
    pub predict_false_trips_per_day: Option<f64>,
    /// The calibrated threshold's warm-up ([`Calibration::warm_up_ticks`]).
    pub predict_warm_up_ticks: Option<u32>,
    /// [`BreakerConfig::predict_ticks`].
    pub predict_ticks: Option<u32>,
    /// [`BreakerConfig::predict_shadow`].
    pub predict_shadow: Option<bool>,
    /// `degrade_rule`: the seed's degrade rule ([`BreakerConfig::degrade_rule`]).
    pub degrade_rule: Option<DegradeRuleSection>,
}

/// A breaker's `degrade_rule`: each setting unset keeps the value it overrides (the seed's
/// where the rule it overrides is off). Setting any of them turns the rule on.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct DegradeRuleSection {
    /// `false` turns the rule off (with no other setting beside it), `true` on; unset: on if
    /// any other setting is given, else as it was.
    pub enabled: Option<bool>,
    /// [`DegradeRule::windows`].
    pub windows: Option<u32>,
    /// [`DegradeRule::success_below`].
    pub success_below: Option<f64>,
    /// [`DegradeRule::p99_above`], in milliseconds.
    pub p99_above_ms: Option<u64>,
    /// [`DegradeRule::min_requests`].
    pub min_requests: Option<u64>,
}

/// `[admission]`: [`Admission::adaptive`] when `adaptive = true`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct AdmissionSection {
    /// An adaptive concurrency limit in front of the service, gold first.
    #[serde(default)]
    pub adaptive: bool,
    /// [`Admission::initial_limit`].
    pub initial_limit: Option<u32>,
    /// [`Admission::min_limit`].
    pub min_limit: Option<u32>,
    /// [`Admission::max_limit`].
    pub max_limit: Option<u32>,
    /// [`Admission::per_dependency`].
    pub per_dependency: Option<bool>,
    /// [`Admission::cpu_threshold`].
    pub cpu_threshold: Option<f64>,
}

/// `[[classes]]`: one task class ([`ClassConfig`]); what is unset is the tier's default. The
/// class named `default` is the one of calls no rule classifies
/// ([`DegraderBuilder::default_class`]; a bronze class with the `reject` route when the file
/// has none).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct ClassSection {
    /// The class's name.
    pub name: String,
    /// `gold`, `silver` or `bronze`.
    #[serde(deserialize_with = "parsed")]
    pub tier: Tier,
    /// [`ClassConfig::sla`], in milliseconds.
    pub sla_ms: Option<u64>,
    /// [`ClassConfig::timeout`], in milliseconds.
    pub timeout_ms: Option<u64>,
    /// [`ClassConfig::max_queue_delay`], in milliseconds.
    pub max_queue_delay_ms: Option<u64>,
    /// [`ClassConfig::depends_on`].
    #[serde(default)]
    pub depends_on: Vec<String>,
    /// [`ClassConfig::fallback_route`]: `reject`, `delayed_retry`, `spool` ...
    #[serde(default, deserialize_with = "parsed_opt")]
    pub fallback: Option<Route>,
    /// [`ClassConfig::tag`]s, as a table (`tags = { team = "payments" }`).
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// The class's own breaker settings, over `[breaker]`'s.
    pub breaker: Option<BreakerSection>,
}

/// `[http]`: the rules of an [`HttpClassifier`].
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct HttpSection {
    /// `[[http.routes]]`: [`HttpClassifierBuilder::route`].
    #[serde(default)]
    pub routes: Vec<RouteSection>,
    /// `[[http.grpc]]`: [`HttpClassifierBuilder::grpc`].
    #[serde(default)]
    pub grpc: Vec<GrpcSection>,
    /// [`HttpClassifierBuilder::default_class`].
    pub default_class: Option<String>,
    /// [`HttpClassifierBuilder::override_header`].
    pub override_header: Option<String>,
    /// [`HttpClassifierBuilder::override_allowed`].
    pub override_allowed: Option<Vec<String>>,
    /// [`HttpClassifierBuilder::request_key`].
    pub request_key: Option<String>,
    /// [`HttpClassifierBuilder::group_header`].
    pub group_header: Option<String>,
    /// [`HttpClassifierBuilder::user_key`].
    pub user_key: Option<String>,
    /// [`HttpClassifierBuilder::deadline_header`].
    pub deadline_header: Option<String>,
    /// [`HttpClassifierBuilder::start_header`].
    pub start_header: Option<String>,
    /// [`HttpClassifierBuilder::upstream_priority`].
    pub upstream_priority: Option<UpstreamSection>,
}

/// `[[http.routes]]`: requests matching `method` (any when unset) and `path` are `class`'s.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct RouteSection {
    /// A standard method (`GET`, `HEAD`, `POST`, `PUT`, `DELETE`, `CONNECT`, `OPTIONS`,
    /// `TRACE`, `PATCH`; any case); unset: any. A rule for another method is set in code.
    pub method: Option<String>,
    /// A pattern in axum's syntax (`/pay/{id}`, `/static/{*rest}`).
    pub path: String,
    /// The class.
    pub class: String,
}

/// `[[http.grpc]]`: gRPC calls to `path` (`/pkg.Service/Method` or `/pkg.Service/*`) are
/// `class`'s.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct GrpcSection {
    /// The full method, or a whole service.
    pub path: String,
    /// The class.
    pub class: String,
}

/// `upstream_priority = { header = "x-degrade-priority", cap = "silver" }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct UpstreamSection {
    /// The header an upstream writes its priority in.
    pub header: String,
    /// The highest tier it may raise a call to.
    #[serde(deserialize_with = "parsed")]
    pub cap: Tier,
}

/// A file's settings refused: where and why. Its `Display` is ``file:line: field `path`: why``
/// (the line and field when known).
#[derive(Debug, Clone)]
pub struct FileError {
    file: String,
    line: Option<usize>,
    field: Option<String>,
    message: String,
    /// Why the file could not be read (its [`source`](std::error::Error::source)).
    io: Option<std::sync::Arc<std::io::Error>>,
}

impl FileError {
    /// The file, as it was named.
    pub fn file(&self) -> &str {
        &self.file
    }

    /// The line (from 1), when known.
    pub fn line(&self) -> Option<usize> {
        self.line
    }

    /// The field's path (`classes[1].sla_ms`), when known.
    pub fn field(&self) -> Option<&str> {
        self.field.as_deref()
    }

    /// What is wrong.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for FileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.file)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if let Some(field) = &self.field {
            write!(f, ": field `{field}`")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for FileError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.io
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

/// Where the settings came from: the file's name and the line of every key and array item,
/// by path (`classes[1].sla_ms`, `http.routes[0]`).
#[derive(Debug, Clone, Default)]
struct Source {
    file: String,
    lines: HashMap<String, usize>,
}

impl Source {
    fn new(file: &str, text: &str, root: &DeTable<'_>) -> Self {
        let index = LineIndex::new(text);
        let mut lines = HashMap::new();
        walk_table("", root, &index, &mut lines);
        Self {
            file: file.to_owned(),
            lines,
        }
    }

    /// An error at the first of `paths` the file has (the field named is the first path).
    fn error(&self, paths: &[String], message: impl fmt::Display) -> FileError {
        FileError {
            file: self.file.clone(),
            line: paths.iter().find_map(|p| self.lines.get(p).copied()),
            field: paths.first().cloned(),
            message: message.to_string(),
            io: None,
        }
    }

    /// A value the library refused, as [`error`](Self::error); where the file does not set
    /// the field named, the message says the value refused is one it did not write.
    fn refused(&self, paths: &[String], e: &dyn fmt::Display) -> FileError {
        match paths.first().filter(|p| !self.lines.contains_key(*p)) {
            Some(p) if !self.lines.is_empty() => self.error(
                paths,
                format_args!(
                    "{e} (`{}` is not set here: the value refused is its default, or one it \
                     inherits)",
                    p.rsplit(['.', ']']).next().unwrap_or(p)
                ),
            ),
            _ => self.error(paths, e),
        }
    }
}

/// The line of every key and array item under `path` in `table`.
fn walk_table(
    path: &str,
    table: &DeTable<'_>,
    index: &LineIndex,
    lines: &mut HashMap<String, usize>,
) {
    for (k, v) in table.iter() {
        let p = if path.is_empty() {
            k.get_ref().to_string()
        } else {
            format!("{path}.{}", k.get_ref())
        };
        lines.insert(p.clone(), index.line(k.span().start));
        walk_value(&p, v.get_ref(), index, lines);
    }
}

fn walk_value(
    path: &str,
    value: &DeValue<'_>,
    index: &LineIndex,
    lines: &mut HashMap<String, usize>,
) {
    match value {
        DeValue::Table(t) => walk_table(path, t, index, lines),
        DeValue::Array(a) => {
            for (i, v) in a.iter().enumerate() {
                let p = format!("{path}[{i}]");
                lines.entry(p.clone()).or_insert(index.line(v.span().start));
                walk_value(&p, v.get_ref(), index, lines);
            }
        }
        _ => {}
    }
}

/// Where each line of a text starts, to turn byte offsets into lines.
struct LineIndex(Vec<usize>);

impl LineIndex {
    fn new(text: &str) -> Self {
        let mut starts = vec![0];
        starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        Self(starts)
    }

    /// The line (from 1) holding byte `offset`.
    fn line(&self, offset: usize) -> usize {
        self.0.partition_point(|&s| s <= offset)
    }
}

/// For `#[serde(deserialize_with = "tower_degrade::config::parsed")]` in an application's own
/// settings: a string parsed with the type's `FromStr` (a [`Tier`], a [`Route`], a chaos
/// target), its error as serde's, so that it names the line and field as the file's own do.
pub fn parsed<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: std::str::FromStr<Err: fmt::Display>,
{
    let s = String::deserialize(d)?;
    s.parse().map_err(serde::de::Error::custom)
}

fn parsed_opt<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: std::str::FromStr<Err: fmt::Display>,
{
    parsed(d).map(Some)
}

/// `table` (with the span of the document) as `T`, errors naming `file`, line and field; the
/// paths of the keys `T` ignored (a type without `deny_unknown_fields`) in `ignored`.
fn deserialize<T: DeserializeOwned>(
    table: Spanned<DeTable<'_>>,
    text: &str,
    file: &str,
    ignored: &mut Vec<String>,
) -> Result<T, FileError> {
    let mut note = |path: serde_ignored::Path<'_>| ignored.push(path_of(&path));
    let de = serde_ignored::Deserializer::new(toml::de::Deserializer::from(table), &mut note);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let field = e.path().to_string();
        let inner = e.into_inner();
        FileError {
            file: file.to_owned(),
            // A field missing from the document itself has the document's empty span at 0:
            // no line to name.
            line: inner
                .span()
                .filter(|s| !s.is_empty() || s.start > 0)
                .map(|s| LineIndex::new(text).line(s.start)),
            field: (field != ".").then_some(field),
            message: inner.message().trim().to_owned(),
            io: None,
        }
    })
}

/// `path` as errors write it (`classes[1].sla_ms`).
fn path_of(path: &serde_ignored::Path<'_>) -> String {
    use serde_ignored::Path;
    match path {
        Path::Root => String::new(),
        Path::Seq { parent, index } => format!("{}[{index}]", path_of(parent)),
        Path::Map { parent, key } => match path_of(parent) {
            p if p.is_empty() => key.clone(),
            p => format!("{p}.{key}"),
        },
        Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => path_of(parent),
    }
}

/// The most a configuration file may hold: larger is a mistake (a log, a device).
const MAX_FILE_BYTES: u64 = 16 << 20;

/// The text of the file at `path`, and its name as errors show it. Only a regular file (a
/// FIFO would block, a device never end) of at most [`MAX_FILE_BYTES`].
fn read(path: &Path) -> Result<(String, String), FileError> {
    use std::io::Read;
    let name = match path.display().to_string() {
        n if n.is_empty() => "(an empty path)".to_owned(),
        n => n,
    };
    let failed = |e: std::io::Error| FileError {
        file: name.clone(),
        line: None,
        field: None,
        message: format!("cannot read it: {e}"),
        io: Some(std::sync::Arc::new(e)),
    };
    let refused = |why: String| FileError {
        file: name.clone(),
        line: None,
        field: None,
        message: why,
        io: None,
    };
    let meta = std::fs::metadata(path).map_err(failed)?;
    if !meta.is_file() {
        return Err(refused("cannot read it: not a regular file".to_owned()));
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(refused(format!(
            "cannot read it: {} bytes, over the {MAX_FILE_BYTES} a configuration may have",
            meta.len()
        )));
    }
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_FILE_BYTES + 1).read_to_end(&mut bytes))
        .map_err(failed)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(refused(format!(
            "cannot read it: over the {MAX_FILE_BYTES} bytes a configuration may have"
        )));
    }
    match String::from_utf8(bytes) {
        Ok(text) => Ok((text, name)),
        // Where: a file saved in another encoding is mended at its line.
        Err(e) => {
            let bytes = e.as_bytes();
            let at = e.utf8_error().valid_up_to();
            let line_start = bytes[..at]
                .iter()
                .rposition(|&b| b == b'\n')
                .map_or(0, |i| i + 1);
            Err(FileError {
                file: name.clone(),
                line: Some(bytes[..at].iter().filter(|&&b| b == b'\n').count() + 1),
                field: None,
                message: format!(
                    "cannot read it: not UTF-8 (byte 0x{:02x}, column {}): save it as UTF-8",
                    bytes[at],
                    at - line_start + 1
                ),
                io: None,
            })
        }
    }
}

fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

/// The file's key for a setting the library names (`breaker.open_duration` is
/// `open_duration_ms`), without its table.
/// The methods a route of the file may name (RFC 9110's and `PATCH`).
const STANDARD_METHODS: [http::Method; 9] = [
    http::Method::GET,
    http::Method::HEAD,
    http::Method::POST,
    http::Method::PUT,
    http::Method::DELETE,
    http::Method::CONNECT,
    http::Method::OPTIONS,
    http::Method::TRACE,
    http::Method::PATCH,
];

fn file_key(field: &str) -> String {
    let field = field
        .strip_prefix("breaker.")
        .or_else(|| field.strip_prefix("admission."))
        .or_else(|| field.strip_prefix("http."))
        .unwrap_or(field);
    match field {
        "predict_threshold.false_trips_per_day" => "predict_false_trips_per_day".to_owned(),
        "predict_threshold.warm_up_ticks" => "predict_warm_up_ticks".to_owned(),
        "tick"
        | "sla"
        | "timeout"
        | "max_queue_delay"
        | "open_duration"
        | "max_open_duration"
        | "degrade_rule.p99_above" => format!("{field}_ms"),
        // Derived from the SLA.
        "abandon_timeout" => "sla_ms".to_owned(),
        other => other.to_owned(),
    }
}

impl BreakerSection {
    /// `base` with this section's settings over it.
    pub fn apply(&self, base: BreakerConfig) -> BreakerConfig {
        let mut b = base;
        if let Some(v) = self.min_requests {
            b = b.min_requests(v);
        }
        if let Some(v) = self.failure_rate {
            b = b.failure_rate(v);
        }
        if let Some(v) = self.slow_call_rate {
            b = b.slow_call_rate(Some(v));
        }
        if let Some(v) = self.open_duration_ms {
            b = b.open_duration(ms(v));
        }
        if let Some(v) = self.max_open_duration_ms {
            b = b.max_open_duration(ms(v));
        }
        if let Some(v) = self.half_open_probes {
            b = b.half_open_probes(v);
        }
        if let Some(v) = self.probe_success_rate {
            b = b.probe_success_rate(v);
        }
        if let Some(v) = self.recovery_step {
            b = b.recovery_step(v);
        }
        if let Some(v) = self.recovery_ticks {
            b = b.recovery_ticks(v);
        }
        if let Some(v) = self.degraded_admit_fraction {
            b = b.degraded_admit_fraction(v);
        }
        if let Some(v) = self.degraded_recovery_ticks {
            b = b.degraded_recovery_ticks(v);
        }
        if let Some(v) = self.predict_threshold {
            b = b.predict_threshold(v);
        }
        if self.predict_false_trips_per_day.is_some() || self.predict_warm_up_ticks.is_some() {
            let mut c = match b.predict_threshold {
                PredictThreshold::Calibrated(c) => c,
                PredictThreshold::Fixed(_) => Calibration::default(),
            };
            if let Some(v) = self.predict_false_trips_per_day {
                c = c.false_trips_per_day(v);
            }
            if let Some(v) = self.predict_warm_up_ticks {
                c = c.warm_up_ticks(v);
            }
            b = b.predict_calibrated(c);
        }
        if let Some(v) = self.predict_ticks {
            b = b.predict_ticks(v);
        }
        if let Some(v) = self.predict_shadow {
            b = b.predict_shadow(v);
        }
        if let Some(r) = &self.degrade_rule {
            let rule = r.apply(b.degrade_rule);
            b = b.degrade_rule(rule);
        }
        b
    }

    /// A fixed and a calibrated threshold both set: which one was meant?
    fn both_thresholds(&self) -> bool {
        self.predict_threshold.is_some()
            && (self.predict_false_trips_per_day.is_some() || self.predict_warm_up_ticks.is_some())
    }
}

impl DegradeRuleSection {
    /// Whether any setting of the rule itself is given.
    fn sets_any(&self) -> bool {
        self.windows.is_some()
            || self.success_below.is_some()
            || self.p99_above_ms.is_some()
            || self.min_requests.is_some()
    }

    fn apply(&self, base: Option<DegradeRule>) -> Option<DegradeRule> {
        match self.enabled {
            Some(false) => return None,
            None if !self.sets_any() => return base,
            _ => {}
        }
        let mut r = base.unwrap_or_default();
        if let Some(v) = self.windows {
            r.windows = v;
        }
        if let Some(v) = self.success_below {
            r.success_below = v;
        }
        if let Some(v) = self.p99_above_ms {
            r.p99_above = ms(v);
        }
        if let Some(v) = self.min_requests {
            r.min_requests = v;
        }
        Some(r)
    }
}

impl AdmissionSection {
    /// The admission these settings describe; `None` unless `adaptive = true`.
    pub fn admission(&self) -> Option<Admission> {
        if !self.adaptive {
            return None;
        }
        let mut a = Admission::adaptive();
        if let Some(v) = self.initial_limit {
            a = a.initial_limit(v);
        }
        if let Some(v) = self.min_limit {
            a = a.min_limit(v);
        }
        if let Some(v) = self.max_limit {
            a = a.max_limit(v);
        }
        if let Some(v) = self.per_dependency {
            a = a.per_dependency(v);
        }
        if let Some(v) = self.cpu_threshold {
            a = a.cpu_threshold(v);
        }
        Some(a)
    }

    /// The first setting given that takes effect only with `adaptive = true`.
    fn set_without_adaptive(&self) -> Option<&'static str> {
        if self.adaptive {
            return None;
        }
        [
            ("initial_limit", self.initial_limit.is_some()),
            ("min_limit", self.min_limit.is_some()),
            ("max_limit", self.max_limit.is_some()),
            ("per_dependency", self.per_dependency.is_some()),
            ("cpu_threshold", self.cpu_threshold.is_some()),
        ]
        .into_iter()
        .find_map(|(k, set)| set.then_some(k))
    }
}

impl ClassSection {
    /// The class these settings describe.
    pub fn class(&self) -> ClassConfig {
        let mut class = self.tier.class(&self.name);
        if let Some(v) = self.sla_ms {
            class = class.sla(ms(v));
        }
        if let Some(v) = self.timeout_ms {
            class = class.timeout(ms(v));
        }
        if let Some(v) = self.max_queue_delay_ms {
            class = class.max_queue_delay(ms(v));
        }
        for d in &self.depends_on {
            class = class.depends_on(d);
        }
        if let Some(r) = self.fallback {
            class = class.fallback_route(r);
        }
        for (k, v) in &self.tags {
            class = class.tag(k, v);
        }
        class
    }
}

impl DegraderFile {
    /// Read and check the file at `path` (errors name it as given).
    pub fn load(path: impl AsRef<Path>) -> Result<Self, FileError> {
        let (text, name) = read(path.as_ref())?;
        Self::parse(&text, &name)
    }

    /// Read and check the file at `path`, whose top-level keys this module does not know are
    /// the application's `T` (see [`parse_with`](Self::parse_with)).
    pub fn load_with<T: DeserializeOwned>(path: impl AsRef<Path>) -> Result<(Self, T), FileError> {
        let (text, name) = read(path.as_ref())?;
        Self::parse_with(&text, &name)
    }

    /// Parse and check `text`, naming `file` in errors. Unknown keys are errors.
    pub fn parse(text: &str, file: &str) -> Result<Self, FileError> {
        let (parsed, _) = Self::split(text, file, false)?;
        parsed.check()?;
        Ok(parsed)
    }

    /// Parse and check `text`, naming `file` in errors: the keys of this module's
    /// [`DegraderFile`] are read as such, every other top-level key is the application's `T`.
    /// A key `T` does not read is an error (a misspelt `[[clases]]` is not dropped), whether or
    /// not `T` denies unknown fields. An application's own checks can name a line and field
    /// with [`error`](Self::error).
    ///
    /// ```
    /// use tower_degrade::config::DegraderFile;
    ///
    /// #[derive(serde::Deserialize)]
    /// #[serde(deny_unknown_fields)]
    /// struct App {
    ///     listen: String,
    /// }
    ///
    /// let text = "service = \"shop\"\nlisten = \"127.0.0.1:8080\"\n";
    /// let (file, app): (DegraderFile, App) = DegraderFile::parse_with(text, "shop.toml")?;
    /// assert_eq!((file.service.as_str(), app.listen.as_str()), ("shop", "127.0.0.1:8080"));
    ///
    /// let e = DegraderFile::parse_with::<App>("service = \"shop\"\nlisen = \"x\"\n", "shop.toml")
    ///     .err()
    ///     .unwrap();
    /// assert!(e.to_string().starts_with("shop.toml:2: "), "{e}");
    /// # Ok::<(), tower_degrade::config::FileError>(())
    /// ```
    pub fn parse_with<T: DeserializeOwned>(text: &str, file: &str) -> Result<(Self, T), FileError> {
        let (parsed, rest) = Self::split(text, file, true)?;
        let mut ignored = Vec::new();
        let app = deserialize(rest, text, file, &mut ignored).map_err(|mut e| {
            // `T`'s own list of its keys: the degrader's are keys of the file too.
            if e.field.as_deref().is_some_and(|f| !f.contains(['.', '[']))
                && e.message.starts_with("unknown field")
            {
                e.message = format!(
                    "{} (or a setting of the degrader: {})",
                    e.message,
                    KEYS.join(", ")
                );
            }
            e
        })?;
        match ignored.first() {
            None => {
                // After the application's keys: a misspelt table of the degrader's is said
                // as such, not as what its absence breaks.
                parsed.check()?;
                Ok((parsed, app))
            }
            // `T` does not deny unknown fields: a misspelt `[[clases]]` would be dropped.
            Some(path) => Err(parsed.error(
                path,
                format!(
                    "unknown field: neither a setting of the degrader ({}) nor one of the \
                     application's",
                    KEYS.join(", ")
                ),
            )),
        }
    }

    /// The file's settings, not checked yet, and (`with`) the top-level keys that are not
    /// this module's.
    fn split<'t>(
        text: &'t str,
        file: &str,
        with: bool,
    ) -> Result<(Self, Spanned<DeTable<'t>>), FileError> {
        let root = DeTable::parse(text).map_err(|e| {
            let line = e.span().map(|s| LineIndex::new(text).line(s.start));
            // The line itself: toml's "duplicate key" names no key. Not from a file with no
            // `service` key, which is no degrader's file (a path that names `/etc/passwd`, as
            // a hostile trial's did): its content is not written to the log.
            let ours = text.lines().any(|l| {
                l.trim_start()
                    .strip_prefix("service")
                    .is_some_and(|rest| rest.trim_start().starts_with('='))
            });
            let shown = line
                .filter(|_| ours)
                .and_then(|n| text.lines().nth(n - 1))
                .map(str::trim)
                .filter(|l| !l.is_empty());
            let hint = match shown {
                Some(l) if l.starts_with('[') && !l.starts_with("[[") => {
                    format!(
                        " (in `{}`; an item of an array of tables is `[{l}]`)",
                        crate::error::escape_cut(l, 80)
                    )
                }
                Some(l) => format!(" (in `{}`)", crate::error::escape_cut(l, 80)),
                None => String::new(),
            };
            FileError {
                file: file.to_owned(),
                line,
                field: None,
                message: format!("{}{hint}", e.message().trim()),
                io: None,
            }
        })?;
        let source = Source::new(file, text, root.get_ref());
        let span = root.span();
        let (mine, theirs): (DeTable<'t>, DeTable<'t>) = if with {
            root.into_inner()
                .into_iter()
                .partition(|(k, _)| KEYS.contains(&k.get_ref().as_ref()))
        } else {
            (root.into_inner(), DeTable::default())
        };
        let mut parsed: DegraderFile = deserialize(
            Spanned::new(span.clone(), mine),
            text,
            file,
            &mut Vec::new(),
        )?;
        parsed.source = source;
        Ok((parsed, Spanned::new(span, theirs)))
    }

    /// Settings read through another serde format (YAML, JSON ...: the spans TOML gives are
    /// this module's), checked as a file is: errors name `file` and the field, not the line
    /// (a format's own errors may say it in their message).
    ///
    /// ```
    /// use tower_degrade::config::DegraderFile;
    ///
    /// let json = r#"{"service": "shop", "classes": [{"name": "pay", "tier": "gold"}]}"#;
    /// let mut de = serde_json::Deserializer::from_str(json);
    /// let file = DegraderFile::from_deserializer(&mut de, "shop.json")?;
    /// de.end()?; // serde_json leaves what follows the value to its caller
    /// assert_eq!(file.classes[0].name, "pay");
    ///
    /// let json = r#"{"service": "shop", "classes": [{"name": "pay", "tier": "gold", "sla_ms": 0}]}"#;
    /// let e = DegraderFile::from_deserializer(&mut serde_json::Deserializer::from_str(json), "shop.json")
    ///     .unwrap_err();
    /// assert_eq!(e.field(), Some("classes[0].sla_ms"));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn from_deserializer<'de, D: serde::Deserializer<'de>>(
        de: D,
        file: &str,
    ) -> Result<Self, FileError> {
        let mut parsed: DegraderFile = serde_path_to_error::deserialize(de).map_err(|e| {
            let field = e.path().to_string();
            FileError {
                file: file.to_owned(),
                line: None,
                field: (field != ".").then_some(field),
                message: e.into_inner().to_string(),
                io: None,
            }
        })?;
        parsed.source = Source {
            file: file.to_owned(),
            lines: HashMap::new(),
        };
        parsed.check()?;
        Ok(parsed)
    }

    /// An error naming this file, the line of `field` (a path as errors show it,
    /// `classes[1].sla_ms`; the line of the nearest table holding it when the file does not
    /// set it) and `field`: for an application's own checks of its settings.
    pub fn error(&self, field: &str, message: impl fmt::Display) -> FileError {
        let mut paths = vec![field.to_owned()];
        let mut at = field;
        while let Some(i) = at.rfind(['.', '[']) {
            at = &at[..i];
            paths.push(at.to_owned());
        }
        self.source.error(&paths, message)
    }

    /// The line (from 1) of `field` (`classes[1].sla_ms`), if the file sets it.
    pub fn line(&self, field: &str) -> Option<usize> {
        self.source.lines.get(field).copied()
    }

    /// The default breaker, `[breaker]` over [`BreakerConfig::default`].
    pub fn breaker_config(&self) -> BreakerConfig {
        self.breaker.apply(BreakerConfig::default())
    }

    /// The degrader these settings describe, to build (or to add to in code first).
    pub fn builder(&self) -> DegraderBuilder {
        let default = self.breaker_config();
        let mut b = Degrader::builder(&self.service).breaker(default.clone());
        if let Some(env) = &self.env {
            b = b.env(env);
        }
        if let Some(t) = self.tick_ms {
            b = b.tick(ms(t));
        }
        if let Some(a) = self.admission.admission() {
            b = b.admission(a);
        }
        for c in &self.classes {
            b = if c.name == DEFAULT_CLASS {
                b.default_class(c.class())
            } else {
                b.class(c.class())
            };
            if let Some(own) = &c.breaker {
                b = b.class_breaker(&c.name, own.apply(default.clone()));
            }
        }
        b
    }

    /// The `[http]` rules over `degrader`'s classes (built from [`builder`](Self::builder)),
    /// to build or to add rules to in code.
    pub fn http_classifier(&self, degrader: &Degrader) -> Result<HttpClassifierBuilder, FileError> {
        self.http_rules(degrader.http_classifier())
    }

    fn http_rules(&self, mut b: HttpClassifierBuilder) -> Result<HttpClassifierBuilder, FileError> {
        let h = &self.http;
        let at = |path: String, e: &ConfigError| self.error(&path, e);
        // A rule refused: for its class, or for its path.
        let rule = |table: &str, i: usize, e: ConfigError| {
            let key = match e {
                ConfigError::UnknownClass(_) => "class",
                _ => "path",
            };
            at(format!("http.{table}[{i}].{key}"), &e)
        };
        for (i, r) in h.routes.iter().enumerate() {
            let method = match &r.method {
                None => None,
                Some(m) if m.trim() == "*" || m.trim().eq_ignore_ascii_case("any") => {
                    return Err(self.error(
                        &format!("http.routes[{i}].method"),
                        format!("`{m}`: leave `method` unset for any method"),
                    ));
                }
                Some(m) => {
                    let method = http::Method::from_bytes(m.trim().to_ascii_uppercase().as_bytes())
                        .ok()
                        // Any token is a method to HTTP: a misspelt one (`PSOT`) would be a
                        // rule that never matches. Others are set in code.
                        .filter(|m| STANDARD_METHODS.contains(m));
                    Some(method.ok_or_else(|| {
                        self.error(
                            &format!("http.routes[{i}].method"),
                            format!(
                                "`{}` is not one of the standard HTTP methods (GET, HEAD, POST, \
                                 PUT, DELETE, CONNECT, OPTIONS, TRACE, PATCH); a rule for \
                                 another method is set in code (`HttpClassifierBuilder::route`)",
                                m.escape_debug()
                            ),
                        )
                    })?)
                }
            };
            b = b
                .route(method, &r.path, &r.class)
                .map_err(|e| rule("routes", i, e))?;
        }
        for (i, g) in h.grpc.iter().enumerate() {
            b = b.grpc(&g.path, &g.class).map_err(|e| rule("grpc", i, e))?;
        }
        let header = |b: HttpClassifierBuilder,
                      key: &str,
                      value: &Option<String>,
                      set: fn(
            HttpClassifierBuilder,
            &str,
        ) -> Result<HttpClassifierBuilder, ConfigError>| {
            match value {
                None => Ok(b),
                Some(v) => set(b, v).map_err(|e| at(format!("http.{key}"), &e)),
            }
        };
        b = header(b, "default_class", &h.default_class, |b, v| {
            b.default_class(v)
        })?;
        b = header(b, "override_header", &h.override_header, |b, v| {
            b.override_header(v)
        })?;
        if let Some(allowed) = &h.override_allowed {
            b = b
                .override_allowed(allowed.iter().map(String::as_str))
                .map_err(|e| at("http.override_allowed".to_owned(), &e))?;
        }
        b = header(b, "request_key", &h.request_key, |b, v| b.request_key(v))?;
        b = header(b, "group_header", &h.group_header, |b, v| b.group_header(v))?;
        b = header(b, "user_key", &h.user_key, |b, v| b.user_key(v))?;
        b = header(b, "deadline_header", &h.deadline_header, |b, v| {
            b.deadline_header(v)
        })?;
        b = header(b, "start_header", &h.start_header, |b, v| b.start_header(v))?;
        if let Some(u) = &h.upstream_priority {
            b = b
                .upstream_priority(&u.header, u.cap)
                .map_err(|e| at("http.upstream_priority.header".to_owned(), &e))?;
        }
        Ok(b)
    }

    /// What serde cannot check, checked as the builders will (every value the library would
    /// refuse), and settings that would have no effect: each named by line and field.
    fn check(&self) -> Result<(), FileError> {
        let err = |paths: &[String], e: &dyn fmt::Display| self.source.error(paths, e);
        let refused = |paths: &[String], e: &ConfigError| self.source.refused(paths, e);
        // The file's key for the field a library error names.
        let key = |e: &ConfigError| match e {
            ConfigError::InvalidValue { field, .. } | ConfigError::InvalidClass { field, .. } => {
                file_key(field)
            }
            _ => String::new(),
        };
        let tick = self.tick_ms.map_or(crate::degrader::DEFAULT_TICK, ms);
        crate::degrader::check_service_and_tick(&self.service, tick)
            .map_err(|e| refused(&[key(&e)], &e))?;
        crate::degrader::check_env(self.env.as_deref().unwrap_or(""))
            .map_err(|e| refused(&[key(&e)], &e))?;
        // A breaker's error at `table`'s key, else at the table (a class's breaker refused for
        // a value it took from `[breaker]`: the class's table, where the fix goes).
        let breaker = |table: &str, section: &BreakerSection, cfg: &BreakerConfig| {
            if section.both_thresholds() {
                return Err(err(
                    &[format!("{table}.predict_threshold"), table.to_owned()],
                    &"a fixed threshold and a calibrated one's settings: set one or the other",
                ));
            }
            if let Some(r) = &section.degrade_rule
                && r.enabled == Some(false)
                && r.sets_any()
            {
                return Err(err(
                    &[format!("{table}.degrade_rule.enabled"), table.to_owned()],
                    &"`false` turns the rule off: its other settings would be ignored",
                ));
            }
            cfg.validate()
                .map_err(|e| refused(&[format!("{table}.{}", key(&e)), table.to_owned()], &e))
        };
        let default = self.breaker_config();
        breaker("breaker", &self.breaker, &default)?;
        // Too many classes: named at the first one past the most, before any is built.
        let own = || {
            self.classes
                .iter()
                .enumerate()
                .filter(|(_, c)| c.name != DEFAULT_CLASS)
        };
        if let Some((i, _)) = own().nth(crate::class::MAX_CLASSES - 1) {
            return Err(refused(
                &[format!("classes[{i}].name"), format!("classes[{i}]")],
                &ConfigError::TooManyClasses(own().count()),
            ));
        }
        // Each class alone, in the file's order, so that the one refused is the one named.
        let mut seen = std::collections::HashSet::new();
        for (i, c) in self.classes.iter().enumerate() {
            let alone = if c.name == DEFAULT_CLASS {
                Registry::new(Some(c.class()), Vec::new())
            } else {
                Registry::new(None, vec![c.class()])
            };
            let at = |key: String| vec![format!("classes[{i}].{key}"), format!("classes[{i}]")];
            alone.map_err(|e| {
                let k = match &e {
                    ConfigError::InvalidName(_) => "name".to_owned(),
                    e => key(e),
                };
                refused(&at(k), &e)
            })?;
            if !seen.insert(c.name.as_str()) {
                return Err(refused(
                    &at("name".to_owned()),
                    &ConfigError::DuplicateClass(c.name.clone()),
                ));
            }
            if let Some(own) = &c.breaker {
                breaker(
                    &format!("classes[{i}].breaker"),
                    own,
                    &own.apply(default.clone()),
                )?;
            }
        }
        let registry = self
            .registry()
            .map_err(|e| err(&["classes".to_owned()], &e))?;
        // Settings that take effect only under admission.
        if let Some(key) = self.admission.set_without_adaptive() {
            return Err(err(
                &[format!("admission.{key}")],
                &"takes effect only with `adaptive = true`",
            ));
        }
        if !self.admission.adaptive {
            let only = "takes effect only with admission (`[admission] adaptive = true`)";
            if let Some(i) = self
                .classes
                .iter()
                .position(|c| c.max_queue_delay_ms.is_some())
            {
                return Err(err(&[format!("classes[{i}].max_queue_delay_ms")], &only));
            }
            let h = &self.http;
            for (key, set) in [
                ("user_key", h.user_key.is_some()),
                ("deadline_header", h.deadline_header.is_some()),
                ("upstream_priority", h.upstream_priority.is_some()),
            ] {
                if set {
                    return Err(err(&[format!("http.{key}")], &only));
                }
            }
        }
        if self
            .http
            .override_allowed
            .as_ref()
            .is_some_and(Vec::is_empty)
        {
            let fix = if self.http.override_header.is_some() {
                "remove `override_header` and `override_allowed` to turn it off"
            } else {
                "remove it: without `override_header` no header picks a class"
            };
            return Err(err(
                &["http.override_allowed".to_owned()],
                &format!("allows no class: the header would pick none ({fix})"),
            ));
        }
        if let Some(class) = &self.http.default_class
            && let Some(i) = self.classes.iter().position(|c| c.name == DEFAULT_CLASS)
        {
            return Err(err(
                &["http.default_class".to_owned()],
                &format!(
                    "sends the calls no rule classifies to `{class}`: the `default` class \
                     configured at classes[{i}] would get none; keep one of the two"
                ),
            ));
        }
        if self.http.override_allowed.is_some() && self.http.override_header.is_none() {
            return Err(err(
                &["http.override_allowed".to_owned()],
                &"takes effect only with `override_header`",
            ));
        }
        if let Some(a) = self.admission.admission() {
            a.validate().map_err(|e| {
                refused(
                    &[format!("admission.{}", key(&e)), "admission".to_owned()],
                    &e,
                )
            })?;
            crate::degrader::check_dependency_limiters(&a, &registry)
                .map_err(|e| err(&["admission.per_dependency".to_owned()], &e))?;
        }
        self.http_rules(HttpClassifier::builder(&registry))
            .map(drop)
    }

    /// The classes' registry, as the degrader will have it.
    fn registry(&self) -> Result<Registry, ConfigError> {
        let (default, classes): (Vec<_>, Vec<_>) =
            self.classes.iter().partition(|c| c.name == DEFAULT_CLASS);
        Registry::new(
            default.first().map(|c| c.class()),
            classes.into_iter().map(ClassSection::class).collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHOP: &str = r#"service = "shop"
tick_ms = 250

[breaker]
min_requests = 10
open_duration_ms = 2000

[admission]
adaptive = true
max_limit = 400

[[classes]]
name = "payment_callback"
tier = "gold"
sla_ms = 300
depends_on = ["db"]
fallback = "delayed_retry"
tags = { team = "payments" }
breaker = { failure_rate = 0.3 }

[[classes]]
name = "browse_log"
tier = "bronze"
fallback = "spool"

[[classes]]
name = "refund"
tier = "silver"
timeout_ms = 5000

[http]
override_header = "x-degrade-class"
override_allowed = ["browse_log"]

[[http.routes]]
method = "POST"
path = "/pay/{id}"
class = "payment_callback"

[[http.routes]]
path = "/log"
class = "browse_log"

[[http.grpc]]
path = "/shop.Refunds/*"
class = "refund"
"#;

    fn edited(from: &str, to: &str) -> String {
        assert!(SHOP.contains(from), "{from}");
        SHOP.replacen(from, to, 1)
    }

    fn error(text: &str) -> FileError {
        DegraderFile::parse(text, "shop.toml").unwrap_err()
    }

    fn line_of(text: &str, needle: &str) -> usize {
        text.lines().position(|l| l.contains(needle)).unwrap() + 1
    }

    /// `from` replaced by `to` is refused at the line holding `at`, naming `field`.
    fn assert_refused(from: &str, to: &str, at: &str, field: &str, what: &str) {
        let text = edited(from, to);
        let e = error(&text);
        assert_eq!(
            (e.line(), e.field()),
            (Some(line_of(&text, at)), Some(field)),
            "{to}: {e}"
        );
        assert!(e.message().contains(what), "{to}: {e}");
        assert!(
            e.to_string().starts_with(&format!(
                "shop.toml:{}: field `{field}`: ",
                line_of(&text, at)
            )),
            "{e}"
        );
    }

    #[tokio::test]
    async fn the_file_builds_the_degrader_and_classifier_it_describes() {
        let file = DegraderFile::parse(SHOP, "shop.toml").unwrap();
        let degrader = file.builder().build().unwrap();
        let classify = file.http_classifier(&degrader).unwrap().build();
        use crate::classify::ClassifyRequest;
        let req = http::Request::post("/pay/7").body(()).unwrap();
        assert_eq!(
            classify.classify(&req),
            degrader.class_id("payment_callback").unwrap()
        );
        let req = http::Request::get("/pay/7").body(()).unwrap();
        assert_eq!(classify.classify(&req), crate::ClassId::DEFAULT);
        let req = http::Request::post("/shop.Refunds/Create")
            .header("content-type", "application/grpc")
            .body(())
            .unwrap();
        assert_eq!(
            classify.classify(&req),
            degrader.class_id("refund").unwrap()
        );
        let req = http::Request::get("/other")
            .header("x-degrade-class", "browse_log")
            .body(())
            .unwrap();
        assert_eq!(
            classify.classify(&req),
            degrader.class_id("browse_log").unwrap()
        );
        let registry = degrader.registry();
        let pay = registry.class(degrader.class_id("payment_callback").unwrap());
        assert_eq!(pay.sla_target(), Duration::from_millis(300));
        assert_eq!(pay.route(), Route::DelayedRetry);
        assert_eq!(pay.tags(), &[("team".to_owned(), "payments".to_owned())]);
        let refund = registry.class(degrader.class_id("refund").unwrap());
        assert_eq!(refund.tier(), Tier::Silver);
        assert_eq!(degrader.admission()[0].limit, 10);
        // The class's breaker is `[breaker]`'s with its own setting over it.
        let b = file.breaker_config();
        assert_eq!((b.min_requests, b.open_duration), (10, ms(2000)));
        let own = file.classes[0].breaker.as_ref().unwrap().apply(b.clone());
        assert_eq!((own.min_requests, own.failure_rate), (10, 0.3));
        degrader.shutdown();
    }

    #[test]
    fn what_the_library_refuses_is_named_by_line_and_field() {
        for (from, to, at, field, what) in [
            (
                "tick_ms = 250",
                "tick_ms = 0",
                "tick_ms",
                "tick_ms",
                "10 ms to an hour",
            ),
            (
                "service = \"shop\"",
                "service = \" \"",
                "service",
                "service",
                "empty",
            ),
            (
                "min_requests = 10",
                "min_requests = 0",
                "min_requests",
                "breaker.min_requests",
                "at least 1",
            ),
            (
                "sla_ms = 300",
                "sla_ms = 0",
                "sla_ms",
                "classes[0].sla_ms",
                "greater than zero",
            ),
            (
                "timeout_ms = 5000",
                "timeout_ms = 100000000",
                "timeout_ms",
                "classes[2].timeout_ms",
                "at most a day",
            ),
            (
                "depends_on = [\"db\"]",
                "depends_on = [\"\"]",
                "depends_on",
                "classes[0].depends_on",
                "must not be empty",
            ),
            (
                "name = \"refund\"",
                "name = \"browse_log\" # again",
                "# again",
                "classes[2].name",
                "browse_log",
            ),
            (
                "name = \"refund\"",
                "name = \"ref und\"",
                "ref und",
                "classes[2].name",
                "ref und",
            ),
            (
                "breaker = { failure_rate = 0.3 }",
                "breaker = { failure_rate = 1.3 }",
                "failure_rate = 1.3",
                "classes[0].breaker.failure_rate",
                "0.0..=1.0",
            ),
            (
                "max_limit = 400",
                "max_limit = 0",
                "max_limit",
                "admission.max_limit",
                "at least 1",
            ),
            (
                "class = \"payment_callback\"",
                "class = \"payment\"",
                "class = \"payment\"",
                "http.routes[0].class",
                "payment",
            ),
            (
                "path = \"/log\"",
                "path = \"log\"",
                "path = \"log\"",
                "http.routes[1].path",
                "log",
            ),
            (
                "method = \"POST\"",
                "method = \"P OST\"",
                "P OST",
                "http.routes[0].method",
                "not one of the standard HTTP methods",
            ),
            // `env` is read and logged by policies as `service` labels lines: it was taken
            // with a newline in it.
            (
                "tick_ms = 250",
                "tick_ms = 250\nenv = \"prod\\nevil_metric 1\"",
                "env = ",
                "env",
                "no control character",
            ),
            // Any token is a method to HTTP: a misspelt one never matched, without a word.
            (
                "method = \"POST\"",
                "method = \"PSOT\"",
                "PSOT",
                "http.routes[0].method",
                "not one of the standard HTTP methods",
            ),
            (
                "path = \"/shop.Refunds/*\"",
                "path = \"shop.Refunds\"",
                "shop.Refunds",
                "http.grpc[0].path",
                "not `/package.Service/Method`",
            ),
            // Rules that could never match.
            (
                "path = \"/log\"",
                "path = \"/log?x=1\"",
                "/log?x=1",
                "http.routes[1].path",
                "no request's path holds it",
            ),
            (
                "path = \"/log\"",
                "path = \"/lo g\"",
                "/lo g",
                "http.routes[1].path",
                "can never match",
            ),
            (
                "method = \"POST\"",
                "method = \"*\"",
                "method = \"*\"",
                "http.routes[0].method",
                "leave `method` unset",
            ),
            (
                "path = \"/shop.Refunds/*\"",
                "path = \"/shop.*/Create\"",
                "shop.*",
                "http.grpc[0].path",
                "not `/package.Service/Method`",
            ),
            // Dependencies label metrics: one line each, named once.
            (
                "depends_on = [\"db\"]",
                "depends_on = [\"db\\n# HELP forged\"]",
                "forged",
                "classes[0].depends_on",
                "no control character",
            ),
            (
                "depends_on = [\"db\"]",
                "depends_on = [\"db\", \"db\"]",
                "depends_on",
                "classes[0].depends_on",
                "named twice",
            ),
            (
                "service = \"shop\"",
                "service = \"shoooooooooooooooooooooooooooooooooooooooooooooooooooooooooooooooooooooooooooooooooooooooooooooooooooooooooooooooooooooooooooooooop\"",
                "service",
                "service",
                "at most 128",
            ),
            (
                "override_allowed = [\"browse_log\"]",
                "override_allowed = []",
                "override_allowed",
                "http.override_allowed",
                "allows no class",
            ),
            (
                "override_header = \"x-degrade-class\"",
                "override_header = \"x degrade\"",
                "override_header",
                "http.override_header",
                "not a valid HTTP header name",
            ),
            (
                "override_allowed = [\"browse_log\"]",
                "override_allowed = [\"gold_class\"]",
                "override_allowed",
                "http.override_allowed",
                "gold_class",
            ),
        ] {
            assert_refused(from, to, at, field, what);
        }
    }

    #[test]
    fn a_value_a_class_inherits_is_named_where_it_is_set() {
        // The class's breaker is refused for the default's value: the default's line.
        let text = edited(
            "open_duration_ms = 2000",
            "open_duration_ms = 2000\nmax_open_duration_ms = 3000",
        )
        .replacen(
            "breaker = { failure_rate = 0.3 }",
            "breaker = { max_open_duration_ms = 1000 }",
            1,
        );
        let e = error(&text);
        assert_eq!(
            e.field(),
            Some("classes[0].breaker.open_duration_ms"),
            "{e}"
        );
        assert_eq!(
            e.line(),
            Some(line_of(&text, "breaker = { max_open")),
            "{e}"
        );
    }

    #[test]
    fn settings_that_would_be_ignored_are_errors() {
        assert_refused(
            "adaptive = true",
            "adaptive = false",
            "max_limit",
            "admission.max_limit",
            "only with `adaptive = true`",
        );
        let text = edited("adaptive = true\nmax_limit = 400", "");
        let e = error(&text.replacen("sla_ms = 300", "sla_ms = 300\nmax_queue_delay_ms = 250", 1));
        assert_eq!(e.field(), Some("classes[0].max_queue_delay_ms"), "{e}");
        assert_refused(
            "open_duration_ms = 2000",
            "open_duration_ms = 2000\npredict_threshold = 0.87\npredict_warm_up_ticks = 100",
            "predict_threshold",
            "breaker.predict_threshold",
            "one or the other",
        );
    }

    #[test]
    fn what_serde_refuses_is_named_by_line_and_field() {
        let text = edited("sla_ms = 300", "sla_ms = 300\ncolour = \"red\"");
        let e = error(&text);
        assert_eq!(e.line(), Some(line_of(&text, "colour")), "{e}");
        assert!(e.to_string().contains("unknown field `colour`"), "{e}");

        let text = edited("tier = \"bronze\"", "tier = \"platinum\"");
        let e = error(&text);
        assert_eq!(
            (e.line(), e.field()),
            (Some(line_of(&text, "platinum")), Some("classes[1].tier")),
            "{e}"
        );
        assert!(e.message().contains("`platinum` is not a tier"), "{e}");

        let text = edited("fallback = \"spool\"", "fallback = \"tape\"");
        let e = error(&text);
        assert_eq!(e.field(), Some("classes[1].fallback"), "{e}");

        let text = edited("max_limit = 400", "max_limit = \"many\"");
        let e = error(&text);
        assert_eq!(
            (e.line(), e.field()),
            (Some(line_of(&text, "many")), Some("admission.max_limit")),
            "{e}"
        );

        let text = edited("max_limit = 400", "max_limit = -1");
        assert_eq!(error(&text).field(), Some("admission.max_limit"));
        let text = edited("max_limit = 400", "max_limit = 4294967295");
        let e = error(&text);
        assert_eq!(e.field(), Some("admission.max_limit"), "{e}");
        assert!(e.message().contains("over 1,000,000"), "{e}");

        let e = error("tick_ms = 5\n");
        assert!(e.message().contains("missing field `service`"), "{e}");

        let e = error("service = \"x\"\nflavour = 1\n");
        assert_eq!(e.line(), Some(2), "{e}");
        assert!(e.message().contains("unknown field `flavour`"), "{e}");
    }

    #[test]
    fn a_file_that_is_not_toml_names_its_line() {
        let e = error("service = \"x\"\n\n[classes\n");
        assert_eq!(e.line(), Some(3), "{e}");
        assert!(e.to_string().starts_with("shop.toml:3: "), "{e}");
        assert!(e.message().contains("(in `[classes`"), "{e}");
        // No degrader's file (no `service`): its line is named, not quoted into the log.
        let e = error("root:x:0:0:root:/root:/bin/bash\n");
        assert_eq!(e.line(), Some(1), "{e}");
        assert!(!e.to_string().contains("root:x"), "{e}");
    }

    #[test]
    fn an_applications_own_keys_are_its_own_and_still_checked() {
        #[derive(Debug, Deserialize)]
        #[serde(deny_unknown_fields)]
        struct App {
            listen: String,
            #[serde(default)]
            storm: Option<Storm>,
        }
        #[derive(Debug, Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Storm {
            spike: f64,
        }
        // The application's keys before the first table (after it, TOML puts them in it).
        let text = SHOP.replacen(
            "tick_ms = 250\n",
            "tick_ms = 250\nlisten = \"127.0.0.1:0\"\n[storm]\nspike = 3.0\n",
            1,
        );
        let (file, app) = DegraderFile::parse_with::<App>(&text, "shop.toml").unwrap();
        assert_eq!(file.classes.len(), 3);
        assert_eq!(app.listen, "127.0.0.1:0");
        assert_eq!(app.storm.unwrap().spike, 3.0);
        // The application's errors name line and field too.
        let bad = text.replacen("spike = 3.0", "spike = \"high\"", 1);
        let e = DegraderFile::parse_with::<App>(&bad, "shop.toml").unwrap_err();
        assert_eq!(
            (e.line(), e.field()),
            (Some(line_of(&bad, "high")), Some("storm.spike")),
            "{e}"
        );
        // And the library's, as without it.
        let bad = text.replacen("sla_ms = 300", "sla_ms = 0", 1);
        let e = DegraderFile::parse_with::<App>(&bad, "shop.toml").unwrap_err();
        assert_eq!(e.field(), Some("classes[0].sla_ms"), "{e}");
        // A misspelt table of the degrader's: the application's type refuses it, and the
        // error lists the degrader's keys beside the application's.
        let bad = text.replacen("[breaker]", "[breakr]", 1);
        let e = DegraderFile::parse_with::<App>(&bad, "shop.toml").unwrap_err();
        assert_eq!(e.line(), Some(line_of(&bad, "[breakr]")), "{e}");
        assert!(
            e.message()
                .contains("or a setting of the degrader: service, env"),
            "{e}"
        );
        // Its own checks, at the line of the key, or of its table when the key is not set.
        let e = file.error("storm.spike", "too high");
        assert_eq!(
            e.to_string(),
            format!(
                "shop.toml:{}: field `storm.spike`: too high",
                line_of(&text, "spike")
            )
        );
        let e = file.error("storm.rate", "missing");
        assert_eq!(e.line(), Some(line_of(&text, "[storm]")));
        // A key a class does not set: the class's table.
        let e = file.error("classes[1].sla_ms", "missing");
        assert_eq!(
            e.line(),
            Some(line_of(&text, "name = \"browse_log\"") - 1),
            "the `[[classes]]` line: {e}"
        );
        // Without parse_with, its keys are unknown.
        let e = error(&text);
        assert!(e.message().contains("unknown field `listen`"), "{e}");
    }

    #[test]
    fn the_readmes_file_reads_and_its_error_is_the_one_shown() {
        let readme = include_str!("../../README.md");
        let at = readme.find("```toml\nservice = \"shop\"").unwrap() + "```toml\n".len();
        let text = &readme[at..at + readme[at..].find("```").unwrap()];
        let file = DegraderFile::parse(text, "shop.toml").unwrap();
        assert_eq!((file.classes.len(), file.http.grpc.len()), (2, 1));
        let e = error(&text.replacen("sla_ms = 300", "sla_ms = 0", 1));
        assert_eq!(
            e.to_string(),
            "shop.toml:9: field `classes[0].sla_ms`: class `payment_callback`: invalid `sla`: \
             must be greater than zero: every call would be slow"
        );
    }

    #[test]
    fn a_damaged_file_is_an_error_not_a_panic() {
        // Every line dropped, every cut, and values out of every range: an error or a file,
        // never a panic, and every error names the file.
        let lines: Vec<&str> = SHOP.lines().collect();
        let mut texts: Vec<String> = (0..lines.len())
            .map(|i| [&lines[..i], &lines[i + 1..]].concat().join("\n"))
            .collect();
        texts.extend((0..SHOP.len()).filter_map(|n| SHOP.get(..n).map(str::to_owned)));
        for big in [
            "18446744073709551615",
            "4294967295",
            "1e308",
            "-0.0",
            "nan",
            "inf",
        ] {
            for key in [
                "tick_ms",
                "sla_ms",
                "open_duration_ms",
                "min_requests",
                "max_limit",
            ] {
                texts.push(SHOP.replacen(&format!("{key} = "), &format!("{key} = {big} #"), 1));
            }
        }
        for text in &texts {
            if let Err(e) = DegraderFile::parse(text, "shop.toml") {
                assert!(e.to_string().starts_with("shop.toml"), "{e}");
            }
        }
    }

    #[test]
    fn the_class_refused_is_the_one_named_and_default_is_the_default_class() {
        // Two classes of one name, the second with an SLA of 0: the second is named.
        let text = edited("name = \"refund\"", "name = \"browse_log\"").replacen(
            "timeout_ms = 5000",
            "sla_ms = 0",
            1,
        );
        let e = error(&text);
        assert_eq!(e.field(), Some("classes[2].sla_ms"), "{e}");
        // Three of one name: the second is refused.
        let text = format!("{SHOP}\n[[classes]]\nname = \"refund\"\ntier = \"silver\"\n").replacen(
            "name = \"browse_log\"",
            "name = \"refund\"",
            1,
        );
        let e = error(&text);
        assert_eq!(e.field(), Some("classes[2].name"), "{e}");
        assert_eq!(e.line(), Some(line_of(&text, "timeout_ms") - 2), "{e}");
        // `default` configures the class of unclassified calls.
        let text = format!(
            "{SHOP}\n[[classes]]\nname = \"default\"\ntier = \"bronze\"\nfallback = \"spool\"\n"
        );
        let file = DegraderFile::parse(&text, "shop.toml").unwrap();
        let registry = file.registry().unwrap();
        assert_eq!(
            registry.class(crate::ClassId::DEFAULT).route(),
            Route::Spool
        );
        assert_eq!(registry.len(), 4);
    }

    #[test]
    fn a_class_can_run_the_predictor_as_a_trial() {
        let text = edited(
            "breaker = { failure_rate = 0.3 }",
            "breaker = { predict_shadow = true }",
        );
        let file = DegraderFile::parse(&text, "shop.toml").unwrap();
        let default = file.breaker_config();
        assert!(!default.predict_shadow);
        let own = file.classes[0].breaker.as_ref().unwrap().apply(default);
        assert!(own.predict_shadow);
        let e = error(&edited(
            "breaker = { failure_rate = 0.3 }",
            "breaker = { predict_shadow = 1 }",
        ));
        assert_eq!(e.field(), Some("classes[0].breaker.predict_shadow"), "{e}");
    }

    #[test]
    fn a_degrade_rule_unset_is_inherited_and_any_setting_turns_it_on() {
        let text = edited(
            "open_duration_ms = 2000",
            "open_duration_ms = 2000\ndegrade_rule = { enabled = false }",
        );
        let file = DegraderFile::parse(&text, "shop.toml").unwrap();
        let default = file.breaker_config();
        assert_eq!(default.degrade_rule, None);
        // A class setting nothing of the rule keeps it off ...
        let off = BreakerSection::default().apply(default.clone());
        assert_eq!(off.degrade_rule, None);
        // ... one setting a window count turns it on, the seed's otherwise.
        let text = text.replacen(
            "breaker = { failure_rate = 0.3 }",
            "breaker = { degrade_rule = { windows = 5 } }",
            1,
        );
        let file = DegraderFile::parse(&text, "shop.toml").unwrap();
        let own = file.classes[0].breaker.as_ref().unwrap().apply(default);
        let rule = own.degrade_rule.unwrap();
        assert_eq!((rule.windows, rule.success_below), (5, 0.92));
        // Off with settings beside it: which was meant?
        let text = text.replacen("{ windows = 5 }", "{ enabled = false, windows = 5 }", 1);
        let e = error(&text);
        assert_eq!(
            e.field(),
            Some("classes[0].breaker.degrade_rule.enabled"),
            "{e}"
        );
    }

    #[test]
    fn a_value_refused_that_the_file_does_not_set_says_so() {
        let text = edited("max_limit = 400", "max_limit = 5");
        let e = error(&text);
        assert_eq!(e.field(), Some("admission.initial_limit"), "{e}");
        assert_eq!(e.line(), Some(line_of(&text, "[admission]")), "{e}");
        assert!(
            e.message().contains("`initial_limit` is not set here"),
            "{e}"
        );
        // A missing top-level field: no line to name (the document's start is a comment or
        // anything else).
        let e = error("# the shop\ntick_ms = 5\n");
        assert_eq!(e.line(), None, "{e}");
        assert!(e.message().contains("missing field `service`"), "{e}");
    }

    #[test]
    fn http_settings_that_would_be_ignored_are_errors() {
        let e = error(&edited("override_header = \"x-degrade-class\"\n", ""));
        assert_eq!(e.field(), Some("http.override_allowed"), "{e}");
        let text = edited("adaptive = true\nmax_limit = 400", "").replacen(
            "[http]\n",
            "[http]\nuser_key = \"x-user\"\n",
            1,
        );
        let e = error(&text);
        assert_eq!(
            (e.field(), e.line()),
            (Some("http.user_key"), Some(line_of(&text, "x-user"))),
            "{e}"
        );
    }

    #[test]
    fn a_syntax_error_shows_its_line() {
        let e = error(&edited("sla_ms = 300", "sla_ms = 300\nsla_ms = 400"));
        assert!(e.message().contains("(in `sla_ms = 400`)"), "{e}");
        let e = error(&format!("{SHOP}\n[classes]\nname = \"x\"\n"));
        assert!(
            e.message()
                .contains("an item of an array of tables is `[[classes]]`"),
            "{e}"
        );
    }

    #[test]
    fn the_default_class_is_configured_once() {
        let text = format!("{SHOP}\n[[classes]]\nname = \"default\"\ntier = \"bronze\"\n")
            .replacen("[http]\n", "[http]\ndefault_class = \"refund\"\n", 1);
        let e = error(&text);
        assert_eq!(e.field(), Some("http.default_class"), "{e}");
        assert!(e.message().contains("would get none"), "{e}");
    }

    #[test]
    fn a_dependency_named_like_the_service_limiter_is_refused() {
        let text = edited("max_limit = 400", "max_limit = 400\nper_dependency = true").replacen(
            "depends_on = [\"db\"]",
            "depends_on = [\"service\"]",
            1,
        );
        let e = error(&text);
        assert_eq!(e.field(), Some("admission.per_dependency"), "{e}");
        assert!(
            e.message().contains("share the service's own limiter"),
            "{e}"
        );
    }

    #[test]
    fn too_many_classes_are_refused_at_the_first_past_the_most() {
        // 50,000 classes took 7.65 s and 1.8 GB to build, in a hostile trial.
        let mut text = SHOP.to_owned();
        let have = text.matches("[[classes]]").count();
        for i in have..crate::class::MAX_CLASSES + 5 {
            text.push_str(&format!(
                "\n[[classes]]\nname = \"c{i}\"\ntier = \"bronze\"\n"
            ));
        }
        let e = error(&text);
        let first_past = format!("name = \"c{}\"", crate::class::MAX_CLASSES - 1);
        assert_eq!(
            (e.field(), e.line()),
            (
                Some(format!("classes[{}].name", crate::class::MAX_CLASSES - 1).as_str()),
                Some(line_of(&text, &first_past))
            ),
            "{e}"
        );
        assert!(
            e.message()
                .starts_with("1029 classes configured: at most 1023 besides `default`"),
            "{e}"
        );
        // The most is accepted.
        let most: String = text
            .split_inclusive("\n")
            .take_while(|l| !l.contains(&first_past))
            .collect();
        let most = most.trim_end().trim_end_matches("[[classes]]");
        DegraderFile::parse(most, "shop.toml").unwrap();
    }

    #[test]
    fn too_many_dependencies_for_a_limiter_each_are_refused_when_read() {
        let mut text = edited("max_limit = 400", "max_limit = 400\nper_dependency = true");
        for i in 0..300 {
            text.push_str(&format!(
                "\n[[classes]]\nname = \"c{i}\"\ntier = \"bronze\"\ndepends_on = [\"d{i}\"]\n"
            ));
        }
        let e = error(&text);
        assert_eq!(e.field(), Some("admission.per_dependency"), "{e}");
        assert!(e.message().contains("at most 254"), "{e}");
    }

    #[test]
    fn keys_an_application_type_would_ignore_are_errors() {
        // An application type that does not deny unknown fields: a misspelt table of the
        // library's would be dropped without a word.
        #[derive(Debug, Deserialize)]
        struct Lax {
            #[serde(default)]
            #[allow(dead_code)]
            listen: Option<String>,
        }
        let text = SHOP.replacen("[[classes]]", "[[clases]]", 1);
        let e = DegraderFile::parse_with::<Lax>(&text, "shop.toml").unwrap_err();
        assert_eq!(
            (e.field(), e.line()),
            (Some("clases"), Some(line_of(&text, "[[clases]]"))),
            "{e}"
        );
        assert!(
            e.message().contains("neither a setting of the degrader"),
            "{e}"
        );
        assert!(DegraderFile::parse_with::<Lax>(SHOP, "shop.toml").is_ok());
    }

    #[test]
    fn the_keys_handed_to_an_application_are_every_key_but_the_files() {
        let file = DegraderFile::parse(SHOP, "shop.toml").unwrap();
        // Fails to compile when a field is added: add its key to KEYS too.
        let DegraderFile {
            service: _,
            env: _,
            tick_ms: _,
            breaker: _,
            admission: _,
            classes: _,
            http: _,
            source: _,
        } = file;
        assert_eq!(
            KEYS,
            [
                "service",
                "env",
                "tick_ms",
                "breaker",
                "admission",
                "classes",
                "http"
            ]
        );
    }

    #[test]
    fn a_file_that_cannot_be_read_is_named() {
        let e = DegraderFile::load("/nonexistent/shop.toml").unwrap_err();
        let io = std::error::Error::source(&e)
            .and_then(|e| e.downcast_ref::<std::io::Error>())
            .unwrap();
        assert_eq!(io.kind(), std::io::ErrorKind::NotFound);
        assert!(
            e.to_string()
                .starts_with("/nonexistent/shop.toml: cannot read it: "),
            "{e}"
        );
        // What is not a regular file is refused before it is read: a FIFO would block, a
        // device never end.
        let dir = std::env::temp_dir();
        let e = DegraderFile::load(&dir).unwrap_err();
        assert!(e.message().contains("not a regular file"), "{e}");
        #[cfg(unix)]
        {
            let e = DegraderFile::load("/dev/zero").unwrap_err();
            assert!(e.message().contains("not a regular file"), "{e}");
        }
    }

    #[test]
    fn a_file_not_in_utf8_is_named_at_its_line() {
        // A file saved in Latin-1 was refused with "stream did not contain valid UTF-8", no
        // line (an adopter's trial).
        let path = std::env::temp_dir().join(format!("latin1-{}.toml", std::process::id()));
        std::fs::write(&path, b"service = \"shop\"\n# caf\xe9\n").unwrap();
        let e = DegraderFile::load(&path).unwrap_err();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(e.line(), Some(2), "{e}");
        assert_eq!(
            e.message(),
            "cannot read it: not UTF-8 (byte 0xe9, column 6): save it as UTF-8"
        );
    }
}
