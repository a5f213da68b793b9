//! Classifying `http::Request`s (HTTP and gRPC) by override header, gRPC path and route pattern.

use std::collections::HashMap;
use std::sync::Arc;

use http::{HeaderName, Method, Request};

use super::pattern::{Segment, matches, more_specific, overlap, parse_pattern, same_pattern};
use super::view::parse_start;
use super::{ClassifyRequest, RequestView};
use crate::admit::AdmissionKey;
use crate::class::{ClassId, Registry, Tier};
use crate::error::ConfigError;

#[derive(Debug, Clone)]
struct PathRule {
    method: Option<Method>,
    pattern: Box<str>,
    segments: Box<[Segment]>,
    class: ClassId,
    /// No later rule can match a path this one matches and be more specific: a hit here
    /// ends the search (set by `build`).
    decisive: bool,
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
    user_header: Option<HeaderName>,
    deadline_header: Option<HeaderName>,
    upstream: Option<(HeaderName, Tier)>,
    registry: Registry,
    default: ClassId,
}

/// Classifies `http::Request`s: an explicit override header, then (for gRPC) the
/// `/package.Service/Method` path, then method + route pattern (axum's `MatchedPath` when
/// present), else the default class. Built with [`HttpClassifier::builder`] over a degrader's
/// [`Registry`] (or [`Degrader::http_classifier`](crate::Degrader::http_classifier)).
///
/// ```
/// use http::{Method, Request};
/// use tower_degrade::{ClassConfig, Degrader, classify::ClassifyRequest};
///
/// # fn main() -> Result<(), tower_degrade::error::ConfigError> {
/// let (degrader, _worker) = Degrader::builder("shop")
///     .class(ClassConfig::gold("payment"))
///     .class(ClassConfig::bronze("browse"))
///     .build_with_worker()?;
/// let classify = degrader
///     .http_classifier()
///     .route(Some(Method::POST), "/payments/{id}/callback", "payment")?
///     .route(None, "/products/{*rest}", "browse")?
///     .override_header("X-Degrade-Class")?
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
#[must_use = "a setting or builder does nothing until it is passed on or built"]
pub struct HttpClassifierBuilder {
    rules: Rules,
}

/// A header name in any case, or an error naming `field`.
fn header_name(field: &'static str, name: &str) -> Result<HeaderName, ConfigError> {
    HeaderName::from_bytes(name.trim().to_ascii_lowercase().as_bytes()).map_err(|_| {
        ConfigError::InvalidValue {
            field,
            reason: format!("`{}` is not a valid HTTP header name", name.escape_debug()),
        }
    })
}

impl HttpClassifier {
    /// Start building a classifier over the classes of `registry` (a degrader's
    /// [`Degrader::registry`](crate::Degrader::registry)).
    pub fn builder(registry: &Registry) -> HttpClassifierBuilder {
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
                user_header: None,
                deadline_header: None,
                upstream: None,
                registry: registry.clone(),
                default: ClassId::DEFAULT,
            },
        }
    }
}

impl HttpClassifierBuilder {
    /// Requests matching `method` (any when `None`; `GET` takes `HEAD` too, as axum's routes
    /// answer `HEAD` with the `GET` handler) and `pattern` belong to `class`.
    ///
    /// Patterns use axum's syntax: literal segments, `{param}` (or `:param`) for one segment,
    /// and a trailing `{*rest}` (or `*`) for any remainder; a parameter's name need not be
    /// the route's. A pattern is the **full path** a client sends: a classifier on a router
    /// nested under `/api` names `/api/products/{id}`, as axum's `MatchedPath` does. Inside an
    /// axum router (`Router::layer`, with the `axum` feature) the route axum matched decides;
    /// elsewhere (the layer around the whole router, a plain hyper service) the most specific
    /// matching pattern does, as in axum's router: a literal segment beats a parameter, a
    /// parameter a catch-all, whatever the order the rules were added in. A rule that an
    /// earlier one hides (the same pattern, for the same method or for any method) is an
    /// error naming both, as it could never match.
    pub fn route(
        mut self,
        method: Option<Method>,
        pattern: &str,
        class: &str,
    ) -> Result<Self, ConfigError> {
        let class = self.rules.registry.require(class)?;
        let segments = parse_pattern(pattern)?;
        if let Some(earlier) = self
            .rules
            .paths
            .iter()
            .find(|r| r.segments == segments && (r.method.is_none() || r.method == method))
        {
            let shown = |m: &Option<Method>, p: &str| match m {
                Some(m) => format!("{m} {p}"),
                None => format!("any method {p}"),
            };
            return Err(ConfigError::InvalidValue {
                field: "http.route",
                reason: format!(
                    "`{}` can never match: `{}` (class `{}`) is tried first",
                    shown(&method, pattern),
                    shown(&earlier.method, &earlier.pattern),
                    self.rules.registry.class(earlier.class).name()
                ),
            });
        }
        self.rules.paths.push(PathRule {
            method,
            pattern: pattern.into(),
            segments,
            class,
            decisive: true,
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
        // Protobuf names: letters, digits, `_`, and dots between a service's packages.
        let name = |n: &str| n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if service.is_empty()
            || method.is_empty()
            || !service.split('.').all(|p| !p.is_empty() && name(p))
            || !(method == "*" || name(method))
        {
            return Err(bad());
        }
        let (map, key): (_, Box<str>) = if method == "*" {
            (&mut self.rules.grpc_services, format!("/{service}").into())
        } else {
            (&mut self.rules.grpc_methods, path.into())
        };
        if let Some(&earlier) = map.get(&key) {
            return Err(ConfigError::InvalidValue {
                field: "grpc.path",
                reason: format!(
                    "`{path}` is already mapped to class `{}`",
                    self.rules.registry.class(earlier).name()
                ),
            });
        }
        map.insert(key, class);
        Ok(self)
    }

    /// Let callers pick their class with this header (e.g. `x-degrade-class`). Only configured
    /// class names are accepted (and only those of [`override_allowed`](Self::override_allowed)
    /// when set); any other value is ignored.
    ///
    /// The header's name is matched case-insensitively, as HTTP header names are; a name that
    /// is not a valid header name is an error naming the field. Its value is a class name,
    /// matched exactly (`payment`, not `PAYMENT`; spaces around it are trimmed). `default` is
    /// a class too: without `override_allowed`, a client can move any call there, past the
    /// breaker of a class forced open.
    ///
    /// The header picks the class of any request that carries it, whether a route matches it
    /// or not: a class allowed here whose calls are kept (`spool`, `delayed_retry`) takes any
    /// request a client sends it into the store, to be replayed (and answered 404 there) later.
    pub fn override_header(mut self, name: &str) -> Result<Self, ConfigError> {
        self.rules.override_header = Some(header_name("http.override_header", name)?);
        Ok(self)
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
    pub fn request_key(mut self, header: &str) -> Result<Self, ConfigError> {
        self.rules.key_header = Some(header_name("http.request_key", header)?);
        Ok(self)
    }

    /// The header holding the rollout group (e.g. `x-group`) for group rollouts.
    pub fn group_header(mut self, header: &str) -> Result<Self, ConfigError> {
        self.rules.group_header = Some(header_name("http.group_header", header)?);
        Ok(self)
    }

    /// The header holding the user key for [admission](crate::admit) (e.g. `x-user-id`): when
    /// a tier's queue is full, calls leave it by a stable hash of this key, so one user's
    /// session is admitted or shed consistently (DAGOR). Without it the
    /// [`request_key`](Self::request_key) header is used; a request with neither is in the
    /// [default bucket](crate::admit::DEFAULT_USER_BUCKET). The value is taken as sent and the
    /// hash is public, so a client that writes it can pick a bucket served first: name a
    /// header your proxy or auth layer sets from an authenticated identity (and drops when a
    /// client sends it).
    pub fn user_key(mut self, header: &str) -> Result<Self, ConfigError> {
        self.rules.user_header = Some(header_name("http.user_key", header)?);
        Ok(self)
    }

    /// The header holding how long the caller waits for the answer, in milliseconds (e.g.
    /// Envoy's `x-envoy-expected-rq-timeout-ms`): under [admission](crate::admit), a call
    /// waits for a permit at most half of it where that is shorter than its class's bound, then
    /// goes to its class's fallback route while its caller still waits (a route that keeps
    /// calls keeps it, where the caller would have given up in the queue). A gRPC call's
    /// `grpc-timeout` is read so without this. A value that is not a whole number of
    /// milliseconds is ignored.
    pub fn deadline_header(mut self, header: &str) -> Result<Self, ConfigError> {
        self.rules.deadline_header = Some(header_name("http.deadline_header", header)?);
        Ok(self)
    }

    /// Honour an upstream's priority in this header (as written by
    /// [`PropagatePriorityLayer`](crate::admit::PropagatePriorityLayer), e.g.
    /// `x-degrade-priority: gold`) for admission, raising a call's tier up to `cap` and never
    /// above, so a client cannot promote itself past what you allow. Values other than `gold`,
    /// `silver` or `bronze` are ignored, and counted in `degrade_priority_header_invalid_total`
    /// when the call has to wait for a permit (the only time the header is read).
    pub fn upstream_priority(mut self, header: &str, cap: Tier) -> Result<Self, ConfigError> {
        self.rules.upstream = Some((header_name("http.upstream_priority", header)?, cap));
        Ok(self)
    }

    /// The header holding when the request started (e.g. `x-request-start`), for
    /// `req.elapsed_ms` in `on_request` hooks.
    pub fn start_header(mut self, header: &str) -> Result<Self, ConfigError> {
        self.rules.start_header = Some(header_name("http.start_header", header)?);
        Ok(self)
    }

    /// The class of requests no rule matches (default: the `default` class).
    pub fn default_class(mut self, class: &str) -> Result<Self, ConfigError> {
        self.rules.default = self.rules.registry.require(class)?;
        Ok(self)
    }

    /// Finish.
    pub fn build(mut self) -> HttpClassifier {
        let paths = &mut self.rules.paths;
        for i in 0..paths.len() {
            let (head, tail) = paths.split_at(i + 1);
            let rule = &head[i];
            let decisive = !tail.iter().any(|later| {
                methods_overlap(&rule.method, &later.method)
                    && overlap(&rule.segments, &later.segments)
                    && more_specific(&later.segments, &rule.segments)
            });
            paths[i].decisive = decisive;
        }
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
        if let Some(name) = &r.override_header
            && let Some(id) = headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| r.registry.get(v.trim()))
            && r.override_allowed.as_ref().is_none_or(|a| a.contains(&id))
        {
            return id;
        }
        if !r.grpc_methods.is_empty() || !r.grpc_services.is_empty() {
            if let Some(id) = r.grpc_methods.get(path) {
                return *id;
            }
            if let Some((service, _)) = path.rsplit_once('/')
                && let Some(id) = r.grpc_services.get(service)
            {
                return *id;
            }
        }
        let matched = matched_path(extensions);
        // Without the route axum matched (the layer around the whole router, or no axum),
        // the most specific pattern wins, as axum's router picks it: rule order would
        // otherwise put `/products/featured` in `/products/{id}`'s class.
        let mut best: Option<&PathRule> = None;
        for rule in &r.paths {
            // A GET rule takes HEAD too, as axum's routes answer HEAD with the GET handler.
            if rule
                .method
                .as_ref()
                .is_some_and(|m| m != method && !(m == Method::GET && method == Method::HEAD))
            {
                continue;
            }
            match matched {
                Some(pattern) if same_pattern(&rule.segments, pattern) => return rule.class,
                None if matches(&rule.segments, path)
                    && best.is_none_or(|b| more_specific(&rule.segments, &b.segments)) =>
                {
                    if rule.decisive {
                        return rule.class;
                    }
                    best = Some(rule);
                }
                _ => {}
            }
        }
        best.map_or(r.default, |b| b.class)
    }
}

/// Whether a request could meet both rules' methods (a `GET` rule takes `HEAD` too).
fn methods_overlap(a: &Option<Method>, b: &Option<Method>) -> bool {
    let get_head = |x: &Method, y: &Method| *x == Method::GET && *y == Method::HEAD;
    match (a, b) {
        (Some(x), Some(y)) => x == y || get_head(x, y) || get_head(y, x),
        _ => true,
    }
}

#[cfg(feature = "axum")]
#[inline]
fn matched_path(ext: &http::Extensions) -> Option<&str> {
    ext.get::<axum::extract::MatchedPath>().map(|m| m.as_str())
}

/// The path as the client sent it: inside a router nested under a prefix, axum strips the
/// prefix from the URI and keeps the original in `OriginalUri`, and rules name full paths
/// (as `MatchedPath` reports them).
#[cfg(feature = "axum")]
#[inline]
fn original_path(ext: &http::Extensions) -> Option<&str> {
    ext.get::<axum::extract::OriginalUri>().map(|u| u.path())
}

#[cfg(not(feature = "axum"))]
#[inline]
fn original_path(_ext: &http::Extensions) -> Option<&str> {
    None
}

#[cfg(not(feature = "axum"))]
#[inline]
fn matched_path(_ext: &http::Extensions) -> Option<&str> {
    None
}

impl<B> ClassifyRequest<Request<B>> for HttpClassifier {
    #[inline]
    fn classify(&self, req: &Request<B>) -> ClassId {
        self.classify_parts(
            req.method(),
            original_path(req.extensions()).unwrap_or(req.uri().path()),
            req.headers(),
            req.extensions(),
        )
    }

    fn registry(&self) -> Option<&Registry> {
        Some(&self.rules.registry)
    }

    fn admission_key(&self, req: &Request<B>) -> AdmissionKey {
        let r = &*self.rules;
        let mut key = AdmissionKey::none();
        if let Some((name, cap)) = &r.upstream
            && let Some(v) = req.headers().get(name)
        {
            match crate::admit::parse_tier(v.as_bytes()) {
                // Capped: a tier above `cap` counts as `cap`.
                Some(t) => key = key.with_tier(Some(t.max(*cap))),
                None => key = key.with_invalid_tier(),
            }
        }
        let user = r.user_header.as_ref().or(r.key_header.as_ref());
        if let Some(v) = user.and_then(|n| req.headers().get(n)) {
            key = key.with_user(v.as_bytes());
        }
        // The caller's deadline: a call waits for a permit at most half of it.
        let headers = req.headers();
        let deadline = (r.deadline_header.as_ref())
            .and_then(|n| headers.get(n))
            .and_then(|v| crate::admit::parse_millis(v.as_bytes()))
            .or_else(|| {
                let v = headers.get("grpc-timeout")?;
                crate::admit::parse_grpc_timeout(v.as_bytes())
            });
        if let Some(d) = deadline {
            key = key.with_deadline(d);
        }
        key
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
            // The full path, as `classify` reads it: under `Router::nest` the URI is stripped
            // of the prefix, and a chaos route target or a hook's `req.path` missed it.
            path: original_path(req.extensions()).unwrap_or(req.uri().path()),
            key: header(&r.key_header),
            group: header(&r.group_header),
            started_unix_ms: header(&r.start_header).and_then(parse_start),
            headers: Some(req.headers()),
        }
    }
}
