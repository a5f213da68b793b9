//! `cached`: the last good response of a read, served when its class is diverted to
//! [`Route::Cached`](crate::Route::Cached).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Method, StatusCode};
use http_body::Body;
use http_body_util::BodyExt;
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use crate::class::Route;
use crate::error::{BoxError, Degraded};
use crate::gate::Reason;
use crate::protocol::{REASON_HEADER, ROUTE_HEADER};

/// Remembers the last good response of reads and serves it when the degrade layer diverts a
/// call to [`Route::Cached`]. Put it **outside** the degrade layer (added after it, with
/// axum's `Router::layer`), so it sees both the served responses and the layer's answers.
/// It keeps every read it sees, whatever its class: put it around the routes of the classes
/// routed to `cached` alone (`docs/fallback.md`, *Cached*, shows how with axum), not a whole
/// router, whose other reads it would keep and never serve.
///
/// * Kept: `GET` and `HEAD` requests answered 2xx (not a `206` partial answer) with a body of
///   known size up to `max_body` (default 256 KiB), no `Set-Cookie`, no `Cache-Control:
///   no-store`, `no-cache`, `private`, `must-revalidate` or `proxy-revalidate` (in any case;
///   `s-maxage` and `max-age` are not read: `ttl` bounds a copy's age) and no `Vary: *`. A
///   newer answer for the same key that is not kept removes its copy (a `404` or `410`: a
///   product delisted is not served in an outage after it; a `2xx` now `private`, a
///   redirect); a `5xx`, `408` or `429` does not (it is the failure the copy is for). Keyed by method, host
///   (the URI's authority, else the `Host` header), URI (less the query parameters named
///   with [`ignore_query`](Self::ignore_query)) and every value of each configured `vary`
///   header, byte for byte. A request with `Authorization` or `Cookie` is neither
///   kept nor served unless `vary` names that header, nor one with `Range` or `If-Range`.
///   The response's own `Vary` is honoured: a copy is served only to a request whose values
///   of those headers are the ones it was kept for.
/// * **Personalised by anything else** (a user id header, a tenant header): name it with
///   [`vary`](Self::vary), or answer `Cache-Control: private` or `Vary`: the layer cannot
///   know that an answer depends on a header it was not told of.
/// * Bounded: at most `max_entries` (default 10,000; evicted by the `quick_cache` crate's
///   CLOCK-Pro policy) and `ttl` old (default 5 minutes, checked when read). A read whose
///   key (host, URI and `vary` values) is over [`MAX_CACHE_KEY_BYTES`] is neither kept nor
///   served: a client's 30 KB query strings made 10,000 entries take 340 MB.
/// * Served: when the layer's answer says the call went to `cached`, the copy replaces it,
///   with `Age`, `x-degrade-route: cached` and `x-degrade-reason`. A miss passes the layer's
///   503 through. A read of a class routed to `cached` that was admitted and failed (a `5xx`
///   the layer counted as a failure, or its `504` timeout) is answered with its copy as well
///   ([`stale_if_error`](Self::stale_if_error), on by default).
///
/// ```
/// use std::time::Duration;
/// use tower_degrade::fallback::LastGoodLayer;
///
/// let last_good = LastGoodLayer::new()
///     .ttl(Duration::from_secs(60))
///     .max_entries(50_000)
///     .vary("accept-language")?;
/// # Ok::<_, tower_degrade::error::ConfigError>(())
/// ```
#[derive(Clone)]
#[must_use = "a setting or builder does nothing until it is passed on or built"]
pub struct LastGoodLayer {
    cache: Arc<quick_cache::sync::Cache<Vec<u8>, Arc<Entry>>>,
    config: Arc<Config>,
}

#[derive(Debug, Clone)]
struct Config {
    ttl: Duration,
    max_body: u64,
    vary: Vec<HeaderName>,
    /// Query parameters left out of the key: exact names, and prefixes (from `name*`).
    ignore_query: Vec<QueryName>,
    stale_if_error: bool,
}

/// A query parameter's name as [`LastGoodLayer::ignore_query`] matches it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum QueryName {
    Exact(Box<str>),
    Prefix(Box<str>),
}

impl QueryName {
    fn matches(&self, name: &str) -> bool {
        match self {
            Self::Exact(n) => name == &**n,
            Self::Prefix(p) => name.starts_with(&**p),
        }
    }
}

#[derive(Debug)]
struct Entry {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
    at: tokio::time::Instant,
    /// The response's `Vary` headers with the values of the request it was kept for.
    varies: Vec<(HeaderName, Vec<HeaderValue>)>,
}

impl fmt::Debug for LastGoodLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LastGoodLayer")
            .field("entries", &self.cache.len())
            .field("config", &self.config)
            .finish()
    }
}

impl Default for LastGoodLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl LastGoodLayer {
    /// The defaults (see the type docs).
    pub fn new() -> Self {
        Self::build(
            10_000,
            Config {
                ttl: Duration::from_secs(300),
                max_body: 256 * 1024,
                vary: Vec::new(),
                ignore_query: Vec::new(),
                stale_if_error: true,
            },
        )
    }

    fn build(entries: usize, config: Config) -> Self {
        crate::metrics::describe_fallback();
        Self {
            cache: Arc::new(quick_cache::sync::Cache::new(entries.max(1))),
            config: Arc::new(config),
        }
    }

    fn config(&self) -> Config {
        (*self.config).clone()
    }

    /// How long a copy may be served (default 5 minutes).
    pub fn ttl(self, ttl: Duration) -> Self {
        let entries = self.cache.capacity() as usize;
        Self::build(
            entries,
            Config {
                ttl,
                ..self.config()
            },
        )
    }

    /// The most responses kept (default 10,000). Starts an empty cache.
    pub fn max_entries(self, n: usize) -> Self {
        Self::build(n, self.config())
    }

    /// The largest body kept (default 256 KiB).
    pub fn max_body(self, bytes: u64) -> Self {
        let entries = self.cache.capacity() as usize;
        Self::build(
            entries,
            Config {
                max_body: bytes,
                ..self.config()
            },
        )
    }

    /// A request header whose value is part of the key (any case).
    pub fn vary(self, name: &str) -> Result<Self, crate::error::ConfigError> {
        let name =
            HeaderName::from_bytes(name.trim().to_ascii_lowercase().as_bytes()).map_err(|_| {
                crate::error::ConfigError::InvalidValue {
                    field: "last_good.vary",
                    reason: format!("`{}` is not a valid HTTP header name", name.escape_debug()),
                }
            })?;
        let entries = self.cache.capacity() as usize;
        let mut config = self.config();
        config.vary.push(name);
        Ok(Self::build(entries, config))
    }

    /// Query parameters left out of the key, so that reads which differ only by them share one
    /// copy: tracking parameters (`utm_*`, `gclid`, `fbclid`), which marketing traffic brings
    /// at a peak, each click's its own (`gclid`), so that every such read would be a key of
    /// its own and a miss in an outage. Each is a parameter's name as sent (case-sensitive,
    /// not percent-decoded), or a prefix ending in `*` (`utm_*`); parameters are split on `&`,
    /// and one that holds a `;` is never left out (a server that splits on `;` too reads
    /// more in it). The other parameters stay in the key in their order. Leave out only what does not change the answer: a copy kept for
    /// one value is served for every other.
    ///
    /// ```
    /// use tower_degrade::fallback::LastGoodLayer;
    ///
    /// let last_good = LastGoodLayer::new().ignore_query(["utm_*", "gclid", "fbclid"])?;
    /// # Ok::<_, tower_degrade::error::ConfigError>(())
    /// ```
    pub fn ignore_query<I>(self, names: I) -> Result<Self, crate::error::ConfigError>
    where
        I: IntoIterator,
        I::Item: AsRef<str>,
    {
        let mut config = self.config();
        for name in names {
            let name = name.as_ref();
            let (stem, prefix) = match name.strip_suffix('*') {
                Some(stem) => (stem, true),
                None => (name, false),
            };
            // A query's name is visible ASCII without the query's own separators; an empty
            // stem (`*`) would leave the whole query out.
            if stem.is_empty()
                || !stem
                    .bytes()
                    .all(|b| b.is_ascii_graphic() && !matches!(b, b'&' | b'=' | b'#' | b'*'))
            {
                return Err(crate::error::ConfigError::InvalidValue {
                    field: "last_good.ignore_query",
                    reason: format!(
                        "`{}` is not a query parameter's name (visible ASCII but `&`, `=`, `#` \
                         and `*`), nor one with `*` at its end",
                        name.escape_debug()
                    ),
                });
            }
            config.ignore_query.push(if prefix {
                QueryName::Prefix(stem.into())
            } else {
                QueryName::Exact(stem.into())
            });
        }
        let entries = self.cache.capacity() as usize;
        Ok(Self::build(entries, config))
    }

    /// Whether a read of a class routed to `cached` that was admitted and failed (a `5xx` the
    /// degrade layer counted as a failure, or the layer's `504` for its class `timeout`: a
    /// half-open probe, a call admitted while the class recovers or is degraded, or before its
    /// breaker opened) is answered with its copy instead, as RFC 5861's `stale-if-error`
    /// (default `true`). The failure still counts against the class; the copy carries `Age`,
    /// `x-degrade-route: cached` and, for a timeout, `x-degrade-reason: timeout` (none for a
    /// `5xx`: the call was served). `false` passes such failures through.
    pub fn stale_if_error(self, serve: bool) -> Self {
        let entries = self.cache.capacity() as usize;
        Self::build(
            entries,
            Config {
                stale_if_error: serve,
                ..self.config()
            },
        )
    }

    /// How many responses are kept now.
    pub fn len(&self) -> usize {
        self.cache.len()
    }

    /// Whether no response is kept.
    pub fn is_empty(&self) -> bool {
        self.cache.is_empty()
    }
}

impl<S> Layer<S> for LastGoodLayer {
    type Service = LastGood<S>;

    fn layer(&self, inner: S) -> LastGood<S> {
        LastGood {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service of [`LastGoodLayer`].
#[derive(Clone, Debug)]
pub struct LastGood<S> {
    inner: S,
    layer: LastGoodLayer,
}

/// The longest key of a read [`LastGoodLayer`] keeps or serves (host, URI and `vary` values,
/// with a few bytes of framing): 4 KiB.
pub const MAX_CACHE_KEY_BYTES: usize = 4 * 1024;

/// A failed answer of a class routed to `cached`, which the degrade layer's [`Http`]
/// protocol marks for [`LastGoodLayer`] to put its copy in place of
/// ([`stale_if_error`](LastGoodLayer::stale_if_error)).
///
/// [`Http`]: crate::protocol::Http
#[derive(Debug, Clone)]
pub(crate) struct FailedRead {
    pub(crate) service: Arc<str>,
    pub(crate) class: Arc<str>,
}

fn labels(service: &str, class: &str) -> [metrics::Label; 2] {
    [
        metrics::Label::new("service", service.to_owned()),
        metrics::Label::new("class", class.to_owned()),
    ]
}

/// Count one of `class`'s calls in `degrade_fallback_cached_total` (`result`, one of
/// `CACHED_RESULTS`).
pub(crate) fn count_cached(service: &str, class: &str, result: &'static str) {
    counted(labels(service, class), result);
}

fn counted(labels: [metrics::Label; 2], result: &'static str) {
    crate::metrics::count_result(
        crate::metrics::FALLBACK_CACHED,
        &labels,
        &crate::metrics::CACHED_RESULTS,
        result,
    );
}

/// The key of a read: method, host, URI (without the query parameters `ignore` names) and
/// every value of each `vary` header, each part length-prefixed, byte for byte (two different
/// values never make one key).
fn key<B>(req: &http::Request<B>, vary: &[HeaderName], ignore: &[QueryName]) -> Vec<u8> {
    fn part(k: &mut Vec<u8>, bytes: &[u8]) {
        k.extend_from_slice(&u32::try_from(bytes.len()).unwrap_or(u32::MAX).to_le_bytes());
        k.extend_from_slice(bytes);
    }
    let mut k = Vec::with_capacity(96);
    part(&mut k, req.method().as_str().as_bytes());
    match req.uri().authority() {
        Some(a) => part(&mut k, a.as_str().as_bytes()),
        None => {
            for v in req.headers().get_all(header::HOST) {
                part(&mut k, v.as_bytes());
            }
        }
    }
    k.push(0xff);
    match req.uri().query() {
        Some(query) if !ignore.is_empty() => {
            let mut uri = String::with_capacity(req.uri().path().len() + query.len() + 1);
            uri.push_str(req.uri().path());
            // Split on `&` alone; a parameter holding a `;` is kept whole, whatever its
            // name: a server that also splits on `;` reads more in it (`utm_source=x;color=
            // blue` is a blue page), which must not share the plain read's copy.
            let kept = query.split('&').filter(|param| {
                let name = param.split('=').next().unwrap_or("");
                param.contains(';') || !ignore.iter().any(|n| n.matches(name))
            });
            for (i, param) in kept.enumerate() {
                uri.push(if i == 0 { '?' } else { '&' });
                uri.push_str(param);
            }
            part(&mut k, uri.as_bytes());
        }
        _ => part(
            &mut k,
            req.uri()
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .as_bytes(),
        ),
    }
    for name in vary {
        k.push(0xff);
        for v in req.headers().get_all(name) {
            part(&mut k, v.as_bytes());
        }
    }
    k
}

/// Whether a response may be kept: no cookie set, no `Cache-Control` directive that forbids
/// keeping or sharing it, or serving it stale (`must-revalidate`, `proxy-revalidate`: RFC 9111
/// forbids a stale reuse; what a shop puts on prices and stock), directives case-insensitive;
/// no `Vary: *`.
fn cacheable(headers: &HeaderMap) -> bool {
    let directive = |v: &HeaderValue, forbidden: &[&str]| {
        v.to_str().map_or(true, |s| {
            s.split(',').any(|d| {
                let name = d.split('=').next().unwrap_or("").trim();
                forbidden.iter().any(|f| name.eq_ignore_ascii_case(f))
            })
        })
    };
    !headers.contains_key(header::SET_COOKIE)
        && !headers.get_all(header::CACHE_CONTROL).iter().any(|v| {
            directive(
                v,
                &[
                    "no-store",
                    "no-cache",
                    "private",
                    "must-revalidate",
                    "proxy-revalidate",
                ],
            )
        })
        && !headers
            .get_all(header::VARY)
            .iter()
            .any(|v| directive(v, &["*"]))
}

/// The response's `Vary` header names (malformed ones are skipped: `cacheable` refused a
/// value that is not text).
fn varies(headers: &HeaderMap) -> Vec<HeaderName> {
    headers
        .get_all(header::VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().to_ascii_lowercase().as_bytes()).ok())
        .collect()
}

fn values(headers: &HeaderMap, name: &HeaderName) -> Vec<HeaderValue> {
    headers.get_all(name).iter().cloned().collect()
}

impl<S, B, RB> Service<http::Request<B>> for LastGood<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    RB: Body + From<Bytes> + Send + 'static,
    RB::Data: Send,
    RB::Error: Into<BoxError>,
{
    type Response = http::Response<RB>;
    type Error = S::Error;
    type Future = LastGoodFuture<S::Future, RB, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        // Reads only; and not a personalised read (credentials or a cookie) unless the key
        // varies on that header, so one user's answer is never served to another.
        let personal = [header::AUTHORIZATION, header::COOKIE]
            .iter()
            .any(|h| req.headers().contains_key(h) && !self.layer.config.vary.contains(h));
        // A part of the resource is not the resource.
        let partial = [header::RANGE, header::IF_RANGE]
            .iter()
            .any(|h| req.headers().contains_key(h));
        if (req.method() != Method::GET && req.method() != Method::HEAD) || personal || partial {
            return LastGoodFuture {
                tap: Tap::Pass {
                    fut: self.inner.call(req),
                },
            };
        }
        let config = &self.layer.config;
        let key = key(&req, &config.vary, &config.ignore_query);
        if key.len() > MAX_CACHE_KEY_BYTES {
            return LastGoodFuture {
                tap: Tap::Pass {
                    fut: self.inner.call(req),
                },
            };
        }
        // The request's headers, for the response's own `Vary`.
        let headers = req.headers().clone();
        let fut = self.inner.call(req);
        let layer = self.layer.clone();
        LastGoodFuture {
            tap: Tap::Read {
                fut: Box::pin(async move {
                    let res = fut.await?;
                    Ok(layer.after(key, &headers, res).await)
                }),
            },
        }
    }
}

impl LastGoodLayer {
    /// The copy kept for `key`, if it may be served to a request with headers `req`: with
    /// `Age`, `x-degrade-route: cached` and, for a call the layer did not serve, why.
    fn copy<RB: From<Bytes>>(
        &self,
        key: &[u8],
        req: &HeaderMap,
        reason: Option<Reason>,
    ) -> Option<http::Response<RB>> {
        let entry = self.cache.get(key)?;
        // Kept for a request with other values of a header the answer varies on.
        if entry
            .varies
            .iter()
            .any(|(name, kept)| values(req, name) != *kept)
        {
            return None;
        }
        let age = entry.at.elapsed();
        if age > self.config.ttl {
            self.cache.remove(key);
            return None;
        }
        let mut out = http::Response::new(RB::from(entry.body.clone()));
        *out.status_mut() = entry.status;
        *out.headers_mut() = entry.headers.clone();
        let h = out.headers_mut();
        h.insert(header::AGE, HeaderValue::from(age.as_secs()));
        h.insert(
            ROUTE_HEADER,
            HeaderValue::from_static(Route::Cached.as_str()),
        );
        if let Some(reason) = reason {
            h.insert(REASON_HEADER, HeaderValue::from_static(reason.as_str()));
        }
        Some(out)
    }

    async fn after<RB>(
        &self,
        key: Vec<u8>,
        req: &HeaderMap,
        mut res: http::Response<RB>,
    ) -> http::Response<RB>
    where
        RB: Body + From<Bytes>,
        RB::Error: Into<BoxError>,
    {
        if let Some(d) = res.extensions().get::<Degraded>() {
            if d.route() != Route::Cached {
                return res;
            }
            d.claim_cached();
            let (labels, reason) = (labels(d.service(), d.class()), d.reason());
            // Timed out by the layer: a failed read, as a `5xx` below.
            if reason == Reason::Timeout {
                if !self.config.stale_if_error {
                    return res;
                }
                return match self.copy(&key, req, Some(reason)) {
                    Some(out) => {
                        counted(labels, "served_for_error");
                        out
                    }
                    None => res,
                };
            }
            return match self.copy(&key, req, Some(reason)) {
                Some(out) => {
                    counted(labels, "served");
                    out
                }
                None => {
                    counted(labels, "miss");
                    res
                }
            };
        }
        // A failure of a class routed to `cached` (the degrade layer marked it): its copy.
        if let Some(f) = res.extensions_mut().remove::<FailedRead>() {
            if self.config.stale_if_error
                && let Some(out) = self.copy(&key, req, None)
            {
                counted(labels(&f.service, &f.class), "served_for_error");
                return out;
            }
            return res;
        }
        let size = res.body().size_hint().exact();
        if !res.status().is_success()
            || res.status() == StatusCode::PARTIAL_CONTENT
            || size.is_none_or(|n| n > self.config.max_body)
            || !cacheable(res.headers())
        {
            // A newer answer not kept (now `private` or `must-revalidate`, too large, a
            // redirect) leaves no older copy to stand in for it; a transient failure (a
            // `5xx`, `408`, `429`) is what the copy is for.
            let transient = res.status().is_server_error()
                || matches!(
                    res.status(),
                    StatusCode::REQUEST_TIMEOUT | StatusCode::TOO_MANY_REQUESTS
                );
            if !transient {
                self.cache.remove(&key);
            }
            return res;
        }
        let varies = varies(res.headers())
            .into_iter()
            .map(|name| {
                let v = values(req, &name);
                (name, v)
            })
            .collect();
        let (parts, body) = res.into_parts();
        match body.collect().await {
            Ok(c) => {
                let bytes = c.to_bytes();
                let mut headers = parts.headers.clone();
                headers.remove(header::CONTENT_LENGTH);
                self.cache.insert(
                    key,
                    Arc::new(Entry {
                        status: parts.status,
                        headers,
                        body: bytes.clone(),
                        at: tokio::time::Instant::now(),
                        varies,
                    }),
                );
                http::Response::from_parts(parts, RB::from(bytes))
            }
            // The body failed after its head: answer what the service answered, an error
            // body being out of reach here, as an empty 502.
            Err(_) => {
                let mut out = http::Response::new(RB::from(Bytes::new()));
                *out.status_mut() = StatusCode::BAD_GATEWAY;
                out
            }
        }
    }
}

pin_project! {
    #[project = TapProj]
    enum Tap<F, RB, E> {
        Pass {
            #[pin]
            fut: F,
        },
        Read {
            fut: Pin<Box<dyn Future<Output = Result<http::Response<RB>, E>> + Send>>,
        },
    }
}

pin_project! {
    /// The response future of [`LastGood`]: the inner future as is for a request that is not a
    /// read; for a read, remember a good answer or serve the copy for a diverted one.
    pub struct LastGoodFuture<F, RB, E> {
        #[pin]
        tap: Tap<F, RB, E>,
    }
}

impl<F, RB, E> fmt::Debug for LastGoodFuture<F, RB, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LastGoodFuture").finish_non_exhaustive()
    }
}

impl<F, RB, E> Future for LastGoodFuture<F, RB, E>
where
    F: Future<Output = Result<http::Response<RB>, E>>,
{
    type Output = Result<http::Response<RB>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().tap.project() {
            TapProj::Pass { fut } => fut.poll(cx),
            TapProj::Read { fut } => fut.as_mut().poll(cx),
        }
    }
}
