//! Request classification: which class a request belongs to.
//!
//! Classifiers resolve class names when they are built, so classifying a request is a lookup
//! that neither allocates nor locks, and only configured classes can come out of it: whatever
//! a client sends (paths, headers), label cardinality stays bounded.

use std::collections::HashMap;
use std::sync::Arc;

use http::{HeaderName, Method, Request};

use crate::class::{ClassId, ConfigError, Registry};
use crate::degrader::Degrader;

/// Decides the class of a request.
///
/// Closures `Fn(&Req) -> ClassId` implement it, and so does a [`ClassId`] (a fixed class).
///
/// ```
/// use tower_degrade::{ClassConfig, ClassId, Degrader, classify::ClassifyRequest};
///
/// # fn main() -> Result<(), tower_degrade::ConfigError> {
/// let (degrader, _worker) = Degrader::builder("jobs")
///     .class(ClassConfig::gold("payment_callback"))
///     .build_with_worker()?;
/// let payment = degrader.class_id("payment_callback")?;
///
/// struct Job { kind: &'static str }
/// let classify = move |job: &Job| if job.kind == "pay" { payment } else { ClassId::DEFAULT };
/// assert_eq!(classify.classify(&Job { kind: "pay" }), payment);
/// assert_eq!(classify.classify(&Job { kind: "log" }), ClassId::DEFAULT);
/// # Ok(())
/// # }
/// ```
pub trait ClassifyRequest<Req> {
    /// The class of `req`.
    fn classify(&self, req: &Req) -> ClassId;

    /// What per-request policy rules may see of `req`: its rollout key and group, and for
    /// `on_request` hooks its method, path, headers and start time. Only called for classes
    /// that have such rules; the default sees nothing.
    fn describe<'a>(&self, _req: &'a Req) -> RequestView<'a> {
        RequestView::default()
    }
}

impl<Req, F> ClassifyRequest<Req> for F
where
    F: Fn(&Req) -> ClassId,
{
    #[inline]
    fn classify(&self, req: &Req) -> ClassId {
        self(req)
    }
}

/// A borrowed view of a request for per-request policy rules (see
/// [`ClassifyRequest::describe`]).
#[derive(Debug, Clone, Copy, Default)]
#[non_exhaustive]
pub struct RequestView<'a> {
    /// The HTTP method, or a task kind.
    pub method: &'a str,
    /// The path (`/pkg.Service/Method` for gRPC).
    pub path: &'a str,
    /// The rollout key (a user id, say): requests with the same key always fall on the same
    /// side of a percentage rollout.
    pub key: Option<&'a str>,
    /// The rollout group (`beta`, `internal` ...).
    pub group: Option<&'a str>,
    /// When the request started, in milliseconds since the Unix epoch (from a header such as
    /// `x-request-start`), for `req.elapsed_ms`.
    pub started_unix_ms: Option<u64>,
    /// The request headers.
    pub headers: Option<&'a http::HeaderMap>,
}

impl<'a> RequestView<'a> {
    /// A view with a rollout key and group only.
    pub fn keyed(key: Option<&'a str>, group: Option<&'a str>) -> Self {
        Self {
            key,
            group,
            ..Self::default()
        }
    }
}

/// Parse a request-start header: Unix time in milliseconds, seconds with a fraction, or
/// microseconds, optionally prefixed with `t=` (nginx and Heroku style).
fn parse_start(v: &str) -> Option<u64> {
    let v = v.trim().trim_start_matches("t=");
    if let Some((secs, frac)) = v.split_once('.') {
        let secs: u64 = secs.parse().ok()?;
        let ms: u64 = format!("{:0<3}", &frac[..frac.len().min(3)]).parse().ok()?;
        return Some(secs * 1000 + ms);
    }
    let n: u64 = v.parse().ok()?;
    // Tell the units apart by magnitude: seconds < 1e11 <= milliseconds < 1e14 <= microseconds.
    Some(match n {
        0..100_000_000_000 => n * 1000,
        100_000_000_000..100_000_000_000_000 => n,
        _ => n / 1000,
    })
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(Box<str>),
    Param,
    CatchAll,
}

#[derive(Debug, Clone)]
struct PathRule {
    method: Option<Method>,
    pattern: Box<str>,
    segments: Box<[Segment]>,
    class: ClassId,
}

fn parse_pattern(pattern: &str) -> Result<Box<[Segment]>, ConfigError> {
    if !pattern.starts_with('/') {
        return Err(ConfigError::InvalidValue {
            field: "http.route",
            reason: format!("pattern `{pattern}` must start with `/`"),
        });
    }
    let parts: Vec<&str> = pattern[1..].split('/').collect();
    let mut segs = Vec::with_capacity(parts.len());
    for (i, p) in parts.iter().enumerate() {
        let seg = if p.starts_with("{*") && p.ends_with('}') || *p == "*" {
            if i + 1 != parts.len() {
                return Err(ConfigError::InvalidValue {
                    field: "http.route",
                    reason: format!("pattern `{pattern}`: a catch-all must be the last segment"),
                });
            }
            Segment::CatchAll
        } else if p.starts_with('{') && p.ends_with('}') || p.starts_with(':') {
            Segment::Param
        } else {
            Segment::Literal((*p).into())
        };
        segs.push(seg);
    }
    Ok(segs.into())
}

fn matches(segments: &[Segment], path: &str) -> bool {
    // Byte-wise: `str::split` costs more than the whole rest of the data path.
    let mut rest = Some(path.strip_prefix('/').unwrap_or(path));
    for seg in segments {
        if *seg == Segment::CatchAll {
            return true;
        }
        let Some(r) = rest else { return false };
        let (part, tail) = match r.as_bytes().iter().position(|&b| b == b'/') {
            Some(i) => (&r[..i], Some(&r[i + 1..])),
            None => (r, None),
        };
        let ok = match seg {
            Segment::Param => !part.is_empty(),
            Segment::Literal(l) => part == &**l,
            Segment::CatchAll => true,
        };
        if !ok {
            return false;
        }
        rest = tail;
    }
    rest.is_none()
}

#[derive(Debug)]
struct Rules {
    paths: Vec<PathRule>,
    grpc_methods: HashMap<Box<str>, ClassId>,
    grpc_services: HashMap<Box<str>, ClassId>,
    override_header: Option<HeaderName>,
    override_allowed: Option<Vec<ClassId>>,
    key_header: Option<HeaderName>,
    group_header: Option<HeaderName>,
    start_header: Option<HeaderName>,
    registry: Registry,
    default: ClassId,
}

/// Classifies `http::Request`s: an explicit override header, then (for gRPC) the
/// `/package.Service/Method` path, then method + route pattern (axum's `MatchedPath` when
/// present), else the default class. Built with [`Degrader::http_classifier`].
///
/// ```
/// use http::{Method, Request};
/// use tower_degrade::{ClassConfig, Degrader, classify::ClassifyRequest};
///
/// # fn main() -> Result<(), tower_degrade::ConfigError> {
/// let (degrader, _worker) = Degrader::builder("shop")
///     .class(ClassConfig::gold("payment"))
///     .class(ClassConfig::bronze("browse"))
///     .build_with_worker()?;
/// let classify = degrader
///     .http_classifier()
///     .route(Some(Method::POST), "/payments/{id}/callback", "payment")?
///     .route(None, "/products/{*rest}", "browse")?
///     .override_header("x-degrade-class")
///     .build();
/// let req = Request::post("/payments/42/callback").body(()).unwrap();
/// assert_eq!(classify.classify(&req), degrader.class_id("payment")?);
/// let req = Request::get("/unknown").body(()).unwrap();
/// assert_eq!(classify.classify(&req), tower_degrade::ClassId::DEFAULT);
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct HttpClassifier {
    rules: Arc<Rules>,
}

/// Builds an [`HttpClassifier`].
#[derive(Debug)]
pub struct HttpClassifierBuilder {
    rules: Rules,
}

impl Degrader {
    /// Start building an HTTP / gRPC classifier over this degrader's classes.
    pub fn http_classifier(&self) -> HttpClassifierBuilder {
        HttpClassifierBuilder {
            rules: Rules {
                paths: Vec::new(),
                grpc_methods: HashMap::new(),
                grpc_services: HashMap::new(),
                override_header: None,
                override_allowed: None,
                key_header: None,
                group_header: None,
                start_header: None,
                registry: self.inner.registry.clone(),
                default: ClassId::DEFAULT,
            },
        }
    }
}

impl HttpClassifierBuilder {
    /// Requests matching `method` (any when `None`) and `pattern` belong to `class`.
    ///
    /// Patterns use axum's syntax: literal segments, `{param}` (or `:param`) for one segment,
    /// and a trailing `{*rest}` (or `*`) for any remainder. Rules are tried in order.
    pub fn route(
        mut self,
        method: Option<Method>,
        pattern: &str,
        class: &str,
    ) -> Result<Self, ConfigError> {
        let class = self.rules.registry.require(class)?;
        self.rules.paths.push(PathRule {
            method,
            pattern: pattern.into(),
            segments: parse_pattern(pattern)?,
            class,
        });
        Ok(self)
    }

    /// gRPC calls to `path` belong to `class`: a full method (`/pkg.Service/Method`) or a whole
    /// service (`/pkg.Service/*`).
    pub fn grpc(mut self, path: &str, class: &str) -> Result<Self, ConfigError> {
        let class = self.rules.registry.require(class)?;
        let bad = || ConfigError::InvalidValue {
            field: "grpc.path",
            reason: format!("`{path}` is not `/package.Service/Method` or `/package.Service/*`"),
        };
        let rest = path.strip_prefix('/').ok_or_else(bad)?;
        let (service, method) = rest.split_once('/').ok_or_else(bad)?;
        if service.is_empty() || method.is_empty() || method.contains('/') {
            return Err(bad());
        }
        if method == "*" {
            self.rules
                .grpc_services
                .insert(format!("/{service}").into(), class);
        } else {
            self.rules.grpc_methods.insert(path.into(), class);
        }
        Ok(self)
    }

    /// Let callers pick their class with this header (e.g. `x-degrade-class`). Only configured
    /// class names are accepted (and only those of [`override_allowed`](Self::override_allowed)
    /// when set); any other value is ignored.
    pub fn override_header(mut self, name: &'static str) -> Self {
        self.rules.override_header = Some(HeaderName::from_static(name));
        self
    }

    /// Restrict the override header to these classes (so clients cannot promote themselves to
    /// gold, say).
    pub fn override_allowed<'a>(
        mut self,
        classes: impl IntoIterator<Item = &'a str>,
    ) -> Result<Self, ConfigError> {
        let ids = classes
            .into_iter()
            .map(|c| self.rules.registry.require(c))
            .collect::<Result<_, _>>()?;
        self.rules.override_allowed = Some(ids);
        Ok(self)
    }

    /// The header holding the rollout key (e.g. `x-user-id`) for percentage rollouts.
    pub fn request_key(mut self, header: &'static str) -> Self {
        self.rules.key_header = Some(HeaderName::from_static(header));
        self
    }

    /// The header holding the rollout group (e.g. `x-group`) for group rollouts.
    pub fn group_header(mut self, header: &'static str) -> Self {
        self.rules.group_header = Some(HeaderName::from_static(header));
        self
    }

    /// The header holding when the request started (e.g. `x-request-start`), for
    /// `req.elapsed_ms` in `on_request` hooks.
    pub fn start_header(mut self, header: &'static str) -> Self {
        self.rules.start_header = Some(HeaderName::from_static(header));
        self
    }

    /// The class of requests no rule matches (default: the `default` class).
    pub fn default_class(mut self, class: &str) -> Result<Self, ConfigError> {
        self.rules.default = self.rules.registry.require(class)?;
        Ok(self)
    }

    /// Finish.
    pub fn build(self) -> HttpClassifier {
        HttpClassifier {
            rules: Arc::new(self.rules),
        }
    }
}

impl HttpClassifier {
    /// Classify from the request's parts.
    pub fn classify_parts(
        &self,
        method: &Method,
        path: &str,
        headers: &http::HeaderMap,
        extensions: &http::Extensions,
    ) -> ClassId {
        let r = &*self.rules;
        if let Some(name) = &r.override_header {
            if let Some(id) = headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| r.registry.get(v.trim()))
            {
                if r.override_allowed.as_ref().is_none_or(|a| a.contains(&id)) {
                    return id;
                }
            }
        }
        if !r.grpc_methods.is_empty() || !r.grpc_services.is_empty() {
            if let Some(id) = r.grpc_methods.get(path) {
                return *id;
            }
            if let Some((service, _)) = path.rsplit_once('/') {
                if let Some(id) = r.grpc_services.get(service) {
                    return *id;
                }
            }
        }
        let matched = matched_path(extensions);
        for rule in &r.paths {
            if rule.method.as_ref().is_some_and(|m| m != method) {
                continue;
            }
            let hit = match matched {
                Some(pattern) => pattern == &*rule.pattern,
                None => matches(&rule.segments, path),
            };
            if hit {
                return rule.class;
            }
        }
        r.default
    }
}

#[cfg(feature = "axum")]
fn matched_path(ext: &http::Extensions) -> Option<&str> {
    ext.get::<axum::extract::MatchedPath>().map(|m| m.as_str())
}

#[cfg(not(feature = "axum"))]
fn matched_path(_ext: &http::Extensions) -> Option<&str> {
    None
}

impl<B> ClassifyRequest<Request<B>> for HttpClassifier {
    #[inline]
    fn classify(&self, req: &Request<B>) -> ClassId {
        self.classify_parts(
            req.method(),
            req.uri().path(),
            req.headers(),
            req.extensions(),
        )
    }

    fn describe<'a>(&self, req: &'a Request<B>) -> RequestView<'a> {
        let r = &*self.rules;
        let header = |name: &Option<HeaderName>| {
            name.as_ref()
                .and_then(|n| req.headers().get(n))
                .and_then(|v| v.to_str().ok())
        };
        RequestView {
            method: req.method().as_str(),
            path: req.uri().path(),
            key: header(&r.key_header),
            group: header(&r.group_header),
            started_unix_ms: header(&r.start_header).and_then(parse_start),
            headers: Some(req.headers()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segs(p: &str) -> Box<[Segment]> {
        parse_pattern(p).unwrap()
    }

    #[test]
    fn request_start_headers_in_every_unit() {
        assert_eq!(parse_start("1700000000"), Some(1_700_000_000_000));
        assert_eq!(parse_start("1700000000123"), Some(1_700_000_000_123));
        assert_eq!(parse_start("t=1700000000123456"), Some(1_700_000_000_123));
        assert_eq!(parse_start("1700000000.5"), Some(1_700_000_000_500));
        assert_eq!(parse_start("soon"), None);
    }

    #[test]
    fn patterns_match_like_axum() {
        assert!(matches(&segs("/orders/{id}"), "/orders/7"));
        assert!(!matches(&segs("/orders/{id}"), "/orders/7/items"));
        assert!(!matches(&segs("/orders/{id}"), "/orders/"));
        assert!(matches(&segs("/static/{*rest}"), "/static/a/b/c"));
        assert!(matches(&segs("/"), "/"));
        assert!(!matches(&segs("/a"), "/b"));
        assert!(matches(&segs("/users/:id/cart"), "/users/u1/cart"));
        assert!(parse_pattern("no-slash").is_err());
        assert!(parse_pattern("/{*rest}/x").is_err());
    }
}
