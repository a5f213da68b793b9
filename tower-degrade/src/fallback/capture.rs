//! Request capture: what of an HTTP or gRPC request is kept to replay it, and how it is sent
//! again.

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http_body::Body;
use http_body_util::{BodyExt, Limited};

use super::record::HttpRequest;
use crate::error::BoxError;

/// The header every replay carries, with the attempt number (1 for the first replay).
pub const REPLAY_HEADER: HeaderName = HeaderName::from_static("x-degrade-replay");

/// What of a request is kept, and the idempotency header.
///
/// By default: the method, the URI's path and query (an absolute-form target's scheme and
/// authority are not kept: a replay goes where the replay service sends it), the
/// `content-type`, `content-encoding`, `grpc-encoding` and `te` headers, the idempotency
/// header, and the body up to 64 KiB. A request with a larger body, or with more than
/// [`MAX_KEPT_HEADER_BYTES`] of kept headers, is not kept: it gets `413` with
/// `x-degrade-reason: too_large`.
///
/// An idempotency key is 1 to [`MAX_KEY_BYTES`] bytes of visible ASCII (and spaces, not
/// spaces alone). A call whose key is not (empty, too long, a tab, not text) is refused
/// `400 Bad Request` (gRPC `INVALID_ARGUMENT`), `x-degrade-reason: malformed`, and not kept:
/// kept under its task id, each retry of it would be another task. A call without a key is
/// kept with its task id as its key.
///
/// ```
/// use tower_degrade::fallback::Capture;
///
/// let capture = Capture::new()
///     .header("x-tenant")?
///     .idempotency_header("idempotency-key")?
///     .body_limit(256 * 1024);
/// # Ok::<_, tower_degrade::error::ConfigError>(())
/// ```
#[derive(Debug, Clone)]
#[must_use = "a setting or builder does nothing until it is passed on or built"]
pub struct Capture {
    headers: Vec<HeaderName>,
    all_headers: bool,
    body_limit: usize,
    body_timeout: std::time::Duration,
    idempotency: HeaderName,
}

impl Default for Capture {
    fn default() -> Self {
        Self::new()
    }
}

/// The longest idempotency key taken as one, in bytes.
pub const MAX_KEY_BYTES: usize = 255;

/// The most header bytes (names and values) kept with a call.
pub const MAX_KEPT_HEADER_BYTES: usize = 16 * 1024;

/// A call's idempotency key that is not one (see [`valid_key`]): what is wrong with it, for
/// the client ("header `idempotency-key`: longer than 255 bytes").
#[derive(Debug)]
pub(crate) struct InvalidKey(pub(crate) String);

/// Whether `key` can be an idempotency key (see [`Capture`]).
pub(crate) fn valid_key(key: &[u8]) -> bool {
    key_problem(key).is_none()
}

/// What keeps `key` from being an idempotency key, if anything.
fn key_problem(key: &[u8]) -> Option<String> {
    if key.is_empty() {
        Some("empty".to_owned())
    } else if key.len() > MAX_KEY_BYTES {
        Some(format!("longer than {MAX_KEY_BYTES} bytes"))
    } else if let Some(at) = key.iter().position(|&b| b != b' ' && !b.is_ascii_graphic()) {
        Some(format!(
            "byte {} is not visible ASCII or a space (0x{:02x})",
            at + 1,
            key[at]
        ))
    } else if !key.iter().any(u8::is_ascii_graphic) {
        // Spaces alone are a key left blank, not one a client chose.
        Some("blank".to_owned())
    } else {
        None
    }
}

/// Headers that describe one connection, never replayed.
const HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    header::CONTENT_LENGTH,
    header::HOST,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
];

impl Capture {
    /// The default capture (see the type docs).
    pub fn new() -> Self {
        Self {
            headers: vec![
                header::CONTENT_TYPE,
                header::CONTENT_ENCODING,
                HeaderName::from_static("grpc-encoding"),
                header::TE,
            ],
            all_headers: false,
            body_limit: 64 * 1024,
            body_timeout: std::time::Duration::from_secs(30),
            idempotency: HeaderName::from_static("idempotency-key"),
        }
    }

    /// Keep this header too (any case). The connection's own headers (`connection`,
    /// `content-length`, `host`, `transfer-encoding`, `upgrade`, `proxy-authorization`) are
    /// never replayed, and naming one is an error.
    pub fn header(mut self, name: &str) -> Result<Self, crate::error::ConfigError> {
        let header = parse_header("capture.header", name)?;
        if HOP_BY_HOP.contains(&header) {
            return Err(crate::error::ConfigError::InvalidValue {
                field: "capture.header",
                reason: format!(
                    "`{header}` describes one connection and is never kept nor replayed (a \
                     replay has its own)"
                ),
            });
        }
        self.headers.push(header);
        Ok(self)
    }

    /// Keep every header but the connection's own (`connection`, `content-length`, `host`,
    /// `transfer-encoding`, `upgrade`, `proxy-authorization`). Credentials such as
    /// `authorization` and `cookie` are then stored with the task: mind who can read the store.
    pub fn all_headers(mut self) -> Self {
        self.all_headers = true;
        self
    }

    /// The largest body kept, in bytes (default 64 KiB); also the largest task-API value kept
    /// (its JSON).
    pub fn body_limit(mut self, bytes: usize) -> Self {
        self.body_limit = bytes;
        self
    }

    /// The longest a diverted call's body may take to arrive (default 30 s; more than zero,
    /// at most a day: `build` refuses others). Past it, the call is answered `not_kept` (503,
    /// gRPC `UNAVAILABLE`, with a retry hint) and nothing is kept: a client that never ends
    /// its request stream (a gRPC upload with no deadline) held its buffered body, up to
    /// [`body_limit`](Self::body_limit), for as long as it stayed connected.
    pub fn body_timeout(mut self, d: std::time::Duration) -> Self {
        self.body_timeout = d;
        self
    }

    /// The largest body kept, in bytes.
    pub(crate) fn limit(&self) -> usize {
        self.body_limit
    }

    /// Check the settings, as the router's `build` does.
    pub(crate) fn validate(&self) -> Result<(), crate::error::ConfigError> {
        if self.body_timeout.is_zero() || self.body_timeout > crate::error::MAX_DURATION {
            return Err(crate::error::ConfigError::InvalidValue {
                field: "capture.body_timeout",
                reason: format!(
                    "must be more than zero and at most a day, not {:?}",
                    self.body_timeout
                ),
            });
        }
        Ok(())
    }

    /// The header a client's idempotency key is read from (default `idempotency-key`). A kept
    /// call without one gets its task id as its key; a call whose key is not one (1 to 255
    /// bytes of visible ASCII and spaces, not spaces alone) is refused `400` (`malformed`),
    /// not kept. Replays carry the key in this header.
    pub fn idempotency_header(mut self, name: &str) -> Result<Self, crate::error::ConfigError> {
        let chosen = parse_header("capture.idempotency_header", name)?;
        // A header of the request's framing is no key a client chose: with `content-length`,
        // every request of the same length was the same task.
        let framing = [
            header::CONTENT_TYPE,
            header::CONTENT_ENCODING,
            header::TE,
            header::TRAILER,
            HeaderName::from_static("grpc-encoding"),
            HeaderName::from_static("keep-alive"),
        ];
        if HOP_BY_HOP.contains(&chosen) || framing.contains(&chosen) {
            return Err(crate::error::ConfigError::InvalidValue {
                field: "capture.idempotency_header",
                reason: format!(
                    "`{chosen}` describes the request's framing or connection, not a key the \
                     client chose (use a header such as `idempotency-key`)"
                ),
            });
        }
        if chosen == REPLAY_HEADER {
            // A replay carries both: the attempt number would overwrite the key.
            return Err(crate::error::ConfigError::InvalidValue {
                field: "capture.idempotency_header",
                reason: format!(
                    "`{chosen}` is the header replays carry their attempt number in (use a \
                     header such as `idempotency-key`)"
                ),
            });
        }
        self.idempotency = chosen;
        Ok(self)
    }

    /// The idempotency header.
    pub fn idempotency(&self) -> &HeaderName {
        &self.idempotency
    }

    /// The client's idempotency key, if it sent one that can be. The header repeated with
    /// the same value is that key; with another value it is none that can be (which one the
    /// client means is not for the server to guess: the IETF draft makes the header a single
    /// item), refused as a key that cannot be one is.
    pub(crate) fn key(&self, parts: &http::request::Parts) -> Result<Option<String>, InvalidKey> {
        let invalid = |why: &str| InvalidKey(format!("header `{}`: {why}", self.idempotency));
        let mut all = parts.headers.get_all(&self.idempotency).iter();
        let first = all.next();
        if all.any(|other| Some(other) != first) {
            return Err(invalid("given more than once, with different values"));
        }
        let Some(k) = first.map(HeaderValue::as_bytes) else {
            return Ok(None);
        };
        match key_problem(k) {
            // Visible ASCII and spaces: UTF-8.
            None => Ok(std::str::from_utf8(k).ok().map(str::to_owned)),
            Some(why) => Err(invalid(&why)),
        }
    }

    fn body_too_large(&self) -> CaptureError {
        CaptureError::TooLarge(format!("body over {} bytes", self.body_limit))
    }

    /// Capture the request, reading the body up to the limit.
    pub(crate) async fn capture<B>(
        &self,
        parts: &http::request::Parts,
        body: B,
    ) -> Result<HttpRequest, CaptureError>
    where
        B: Body,
        B::Error: Into<BoxError>,
    {
        if let Some(len) = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
            && len > self.body_limit as u64
        {
            return Err(self.body_too_large());
        }
        // The key the task is kept under, if the client's can be one: its header is kept
        // (the first, when repeated), else none and the replay carries the task id.
        let key = self.key(parts);
        let mut kept_key = false;
        let headers: Vec<(String, Vec<u8>)> = parts
            .headers
            .iter()
            .filter(|(name, _)| {
                if **name == self.idempotency {
                    return matches!(key, Ok(Some(_))) && !std::mem::replace(&mut kept_key, true);
                }
                if self.all_headers {
                    !HOP_BY_HOP.contains(name)
                } else {
                    self.headers.contains(name)
                }
            })
            .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
            .collect();
        if headers
            .iter()
            .map(|(n, v)| n.len() + v.len())
            .sum::<usize>()
            > MAX_KEPT_HEADER_BYTES
        {
            return Err(CaptureError::TooLarge(format!(
                "headers kept with a call over {MAX_KEPT_HEADER_BYTES} bytes"
            )));
        }
        let collect = Limited::new(body, self.body_limit).collect();
        let body = match tokio::time::timeout(self.body_timeout, collect).await {
            Ok(Ok(c)) => c.to_bytes(),
            Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
                return Err(self.body_too_large());
            }
            Ok(Err(e)) => return Err(CaptureError::Body(e.to_string())),
            Err(_) => {
                return Err(CaptureError::Stalled(format!(
                    "the body did not arrive within {:?} (Capture::body_timeout)",
                    self.body_timeout
                )));
            }
        };
        // A gRPC call whose framing is broken fails every replay (the server cannot decode
        // it): refused now, while the client can still be told, rather than kept.
        // (`application/grpc`, `+proto` and the like, and binary gRPC-Web, whose requests are
        // framed alike; not gRPC-Web's text form, base64.)
        if crate::protocol::grpc_rest(&parts.headers).is_some_and(binary_framed) {
            // A compressed message needs the call to name its encoding (the gRPC spec makes
            // it an error); kept, it would fail every replay.
            let encoded = parts
                .headers
                .get("grpc-encoding")
                .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"));
            grpc_framing(&body, encoded).map_err(CaptureError::Malformed)?;
        }
        Ok(HttpRequest {
            method: parts.method.as_str().to_owned(),
            uri: parts
                .uri
                .path_and_query()
                .map_or("/", |pq| pq.as_str())
                .to_owned(),
            headers,
            body: body.to_vec(),
        })
    }
}

fn parse_header(field: &'static str, name: &str) -> Result<HeaderName, crate::error::ConfigError> {
    HeaderName::from_bytes(name.trim().to_ascii_lowercase().as_bytes()).map_err(|_| {
        crate::error::ConfigError::InvalidValue {
            field,
            reason: format!("`{}` is not a valid HTTP header name", name.escape_debug()),
        }
    })
}

/// Whether what follows `application/grpc` in a content type names length-prefixed binary
/// messages: nothing, a `+` subtype or parameters, and gRPC-Web's `-web` alike (its requests
/// are framed as gRPC's), not `-web-text` (base64) nor another type (`application/grpcx`).
fn binary_framed(rest: &[u8]) -> bool {
    // Parameters may follow optional whitespace (RFC 9110 `OWS ";" OWS`).
    let ends = |r: &[u8]| {
        let r = r.trim_ascii_start();
        r.is_empty() || r[0] == b'+' || r[0] == b';'
    };
    ends(rest)
        || rest
            .split_at_checked(4)
            .is_some_and(|(web, r)| web.eq_ignore_ascii_case(b"-web") && ends(r))
}

/// Why a request could not be captured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum CaptureError {
    /// Over a limit for keeping it: which, for the client.
    TooLarge(String),
    /// The body failed on its way (its client went away mid-body, its stream was reset).
    Body(String),
    /// The body did not arrive within [`Capture::body_timeout`].
    Stalled(String),
    /// Not a well-formed call of its protocol.
    Malformed(String),
}

/// Whether `body` is a gRPC request body: length-prefixed messages (a flag byte, 0 or 1 for
/// compressed, then a 4-byte big-endian length), nothing after the last; a compressed one
/// only if the call is `encoded` (names a `grpc-encoding`). A client streaming nothing sends
/// no message at all.
fn grpc_framing(mut body: &[u8], encoded: bool) -> Result<(), String> {
    let mut n = 0;
    while !body.is_empty() {
        let Some((head, rest)) = body.split_first_chunk::<5>() else {
            return Err(format!("message {n}: a {}-byte prefix, not 5", body.len()));
        };
        if head[0] > 1 {
            return Err(format!(
                "message {n}: compression flag {}, not 0 or 1",
                head[0]
            ));
        }
        if head[0] == 1 && !encoded {
            return Err(format!(
                "message {n}: compressed, but the call names no grpc-encoding"
            ));
        }
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        if rest.len() < len {
            return Err(format!(
                "message {n}: {len} bytes announced, {} sent",
                rest.len()
            ));
        }
        body = &rest[len..];
        n += 1;
    }
    Ok(())
}

impl HttpRequest {
    /// Whether `other` is the same call (method, target and body), as an idempotency key
    /// means it: headers may differ between a client's tries (a trace id, a date).
    pub(crate) fn same_call(&self, other: &HttpRequest) -> bool {
        (&self.method, &self.uri, &self.body) == (&other.method, &other.uri, &other.body)
    }

    /// The request again, for a replay: the captured head and body, the idempotency key in
    /// `key_header`, and the attempt number in [`REPLAY_HEADER`].
    pub fn to_request<B: From<Bytes>>(
        &self,
        key_header: &HeaderName,
        key: &str,
        attempt: u32,
    ) -> Result<http::Request<B>, http::Error> {
        let mut b = http::Request::builder()
            .method(self.method.as_str())
            .uri(self.uri.as_str());
        for (n, v) in &self.headers {
            b = b.header(n.as_str(), v.as_slice());
        }
        let mut req = b.body(B::from(Bytes::from(self.body.clone())))?;
        let headers = req.headers_mut();
        // The client's own header, as captured, stays as it was.
        if !headers.contains_key(key_header)
            && let Ok(v) = HeaderValue::from_str(key)
        {
            headers.insert(key_header.clone(), v);
        }
        headers.insert(REPLAY_HEADER, HeaderValue::from(attempt));
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::Full;

    fn parts(req: http::Request<()>) -> http::request::Parts {
        req.into_parts().0
    }

    /// A body that sends `first`, then nothing, and never ends.
    struct Endless(Option<Bytes>);

    impl Body for Endless {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            _cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
            match self.0.take() {
                Some(b) => std::task::Poll::Ready(Some(Ok(http_body::Frame::data(b)))),
                None => std::task::Poll::Pending,
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_never_ends_is_given_up_on_at_the_body_timeout() {
        // A gRPC upload with no deadline that never half-closed held its buffered body for as
        // long as its client stayed connected.
        let p = parts(
            http::Request::post("/up.v1.Up/Upload")
                .header("content-type", "application/grpc")
                .body(())
                .unwrap(),
        );
        let start = tokio::time::Instant::now();
        let cap = Capture::new().body_timeout(std::time::Duration::from_secs(5));
        match cap
            .capture(&p, Endless(Some(Bytes::from_static(b"\0\0"))))
            .await
        {
            Err(CaptureError::Stalled(e)) => assert!(e.contains("Capture::body_timeout"), "{e}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(start.elapsed(), std::time::Duration::from_secs(5));
        assert!(
            Capture::new()
                .body_timeout(std::time::Duration::ZERO)
                .validate()
                .is_err()
        );
    }

    #[tokio::test]
    async fn a_call_with_no_content_type_and_te_trailers_is_grpc() {
        // tonic serves it as gRPC; diverted, it was answered HTTP 202 and its body unchecked.
        let p = parts(
            http::Request::post("/h.v1.H/Pay")
                .header("te", "trailers")
                .body(())
                .unwrap(),
        );
        assert_eq!(crate::protocol::grpc_rest(&p.headers), Some(&b""[..]));
        match Capture::new()
            .capture(&p, Full::new(Bytes::from_static(b"garbage")))
            .await
        {
            Err(CaptureError::Malformed(_)) => {}
            other => panic!("{other:?}"),
        }
        let plain = parts(http::Request::post("/pay").body(()).unwrap());
        assert_eq!(crate::protocol::grpc_rest(&plain.headers), None);
    }

    #[tokio::test]
    async fn captures_the_head_and_body_and_replays_them_with_the_key() {
        let cap = Capture::new().header("X-Tenant").unwrap();
        let p = parts(
            http::Request::post("/log?page=2")
                .header("content-type", "application/json")
                .header("x-tenant", "t1")
                .header("cookie", "secret")
                .header("Idempotency-Key", "abc")
                .body(())
                .unwrap(),
        );
        let rec = cap
            .capture(&p, Full::new(Bytes::from_static(b"{\"a\":1}")))
            .await
            .unwrap();
        assert_eq!(rec.method, "POST");
        assert_eq!(rec.uri, "/log?page=2");
        let names: Vec<_> = rec.headers.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["content-type", "x-tenant", "idempotency-key"]);
        assert_eq!(cap.key(&p).unwrap().as_deref(), Some("abc"));

        let replay: http::Request<Full<Bytes>> =
            rec.to_request(cap.idempotency(), "abc", 2).unwrap();
        assert_eq!(replay.uri(), "/log?page=2");
        assert_eq!(replay.headers()["idempotency-key"], "abc");
        assert_eq!(replay.headers()[&REPLAY_HEADER], "2");
        let body = replay.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"{\"a\":1}");
    }

    #[tokio::test]
    async fn a_body_over_the_limit_is_refused_with_or_without_a_length() {
        let cap = Capture::new().body_limit(4);
        let p = parts(http::Request::post("/").body(()).unwrap());
        let long = Full::new(Bytes::from_static(b"0123456789"));
        // Which limit, for the client.
        let over = CaptureError::TooLarge("body over 4 bytes".to_owned());
        assert_eq!(cap.capture(&p, long).await, Err(over.clone()));
        let p = parts(
            http::Request::post("/")
                .header("content-length", "10")
                .body(())
                .unwrap(),
        );
        let short = Full::new(Bytes::from_static(b"0"));
        assert_eq!(cap.capture(&p, short).await, Err(over));
        assert!(Capture::new().header("bad header").is_err());
    }

    #[tokio::test]
    async fn a_key_that_cannot_be_one_is_refused_and_never_captured() {
        let cap = Capture::new();
        let long = "k".repeat(MAX_KEY_BYTES + 1);
        let empty = HeaderValue::from_static("");
        let binary = HeaderValue::from_bytes(b"\xff\xfe").unwrap();
        // Spaces alone (a task's key left blank) are no key; spaces inside one are.
        assert!(!valid_key(b"   ") && valid_key(b"order 7"));
        let tab = HeaderValue::from_static("order\t7");
        for (value, why) in [
            (empty, "empty"),
            (binary, "byte 1 is not visible ASCII or a space (0xff)"),
            (tab, "byte 6 is not visible ASCII or a space (0x09)"),
            (
                HeaderValue::from_str(&long).unwrap(),
                "longer than 255 bytes",
            ),
            (HeaderValue::from_static("   "), "blank"),
        ] {
            let p = parts(
                http::Request::post("/log")
                    .header("idempotency-key", value)
                    .body(())
                    .unwrap(),
            );
            // What is wrong with it, for the client.
            let InvalidKey(told) = cap.key(&p).unwrap_err();
            assert_eq!(told, format!("header `idempotency-key`: {why}"));
            // The router refuses such a call before capturing it; captured, its key is not.
            let rec = cap.capture(&p, Full::new(Bytes::new())).await.unwrap();
            assert!(rec.headers.is_empty(), "{:?}", rec.headers);
            let replay: http::Request<Full<Bytes>> = rec
                .to_request(cap.idempotency(), "0192-task-id", 1)
                .unwrap();
            assert_eq!(replay.headers()["idempotency-key"], "0192-task-id");
        }
        // Two keys: which one is meant is not for the server to guess.
        let two = parts(
            http::Request::post("/log")
                .header("idempotency-key", "first")
                .header("idempotency-key", "second")
                .body(())
                .unwrap(),
        );
        let InvalidKey(told) = cap.key(&two).unwrap_err();
        assert!(
            told.ends_with("given more than once, with different values"),
            "{told}"
        );
        // The longest key, and the same key twice, kept once.
        let longest = "k".repeat(MAX_KEY_BYTES);
        let p = parts(
            http::Request::post("/log")
                .header("idempotency-key", longest.as_str())
                .header("idempotency-key", longest.as_str())
                .body(())
                .unwrap(),
        );
        assert_eq!(cap.key(&p).unwrap(), Some(longest.clone()));
        let rec = cap.capture(&p, Full::new(Bytes::new())).await.unwrap();
        assert_eq!(
            rec.headers,
            [("idempotency-key".to_owned(), longest.into_bytes())]
        );
    }

    #[tokio::test]
    async fn oversized_kept_headers_are_refused_and_only_the_path_is_kept() {
        let cap = Capture::new().header("x-tenant").unwrap();
        let big = "t".repeat(MAX_KEPT_HEADER_BYTES);
        let p = parts(
            http::Request::post("/log")
                .header("x-tenant", big.as_str())
                .body(())
                .unwrap(),
        );
        let body = Full::new(Bytes::new());
        assert_eq!(
            cap.capture(&p, body).await,
            Err(CaptureError::TooLarge(format!(
                "headers kept with a call over {MAX_KEPT_HEADER_BYTES} bytes"
            )))
        );
        // An absolute-form target: the replay goes where its service sends it.
        let p = parts(
            http::Request::post("http://elsewhere.example/pay/1?x=1")
                .body(())
                .unwrap(),
        );
        let rec = cap.capture(&p, Full::new(Bytes::new())).await.unwrap();
        assert_eq!(rec.uri, "/pay/1?x=1");
    }

    #[tokio::test]
    async fn a_grpc_body_whose_framing_is_broken_is_malformed() {
        let cap = Capture::new();
        let grpc = |ct: &str| {
            parts(
                http::Request::post("/shop.v1.Shop/Charge")
                    .header("content-type", ct)
                    .header("grpc-encoding", "gzip")
                    .body(())
                    .unwrap(),
            )
        };
        let frame = |flag: u8, msg: &[u8]| {
            let mut f = vec![flag];
            f.extend_from_slice(&(msg.len() as u32).to_be_bytes());
            f.extend_from_slice(msg);
            f
        };
        let two = [frame(0, b"\x08\x01"), frame(1, b"zz")].concat();
        for ok in [
            Vec::new(),
            frame(0, b""),
            frame(0, b"\x08\x01"),
            two.clone(),
        ] {
            let body = Full::new(Bytes::from(ok.clone()));
            assert!(
                cap.capture(&grpc("application/grpc"), body).await.is_ok(),
                "{ok:?}"
            );
        }
        let truncated = two[..two.len() - 1].to_vec();
        for (bad, why) in [
            (b"garbage".to_vec(), "compression flag"),
            (vec![0, 0, 0], "prefix"),
            (truncated, "announced"),
        ] {
            // Media types are case-insensitive.
            // Binary gRPC-Web's requests are framed as gRPC's.
            for ct in [
                "application/grpc",
                "application/grpc+proto",
                "Application/GRPC",
                "application/grpc-web",
                "application/grpc-web+proto",
                "application/gRPC-Web; charset=utf-8",
                // Whitespace before the parameters (RFC 9110): was kept unchecked.
                "Application/GRPC ; charset=x",
                "application/grpc-web\t;charset=x",
            ] {
                let body = Full::new(Bytes::from(bad.clone()));
                match cap.capture(&grpc(ct), body).await {
                    Err(CaptureError::Malformed(m)) => assert!(m.contains(why), "{m}"),
                    other => panic!("{bad:?} as {ct}: {other:?}"),
                }
            }
        }
        // A compressed message in a call that names no encoding fails every replay.
        let unencoded = parts(
            http::Request::post("/shop.v1.Shop/Charge")
                .header("content-type", "application/grpc")
                .body(())
                .unwrap(),
        );
        match cap.capture(&unencoded, Full::new(Bytes::from(two))).await {
            Err(CaptureError::Malformed(m)) => assert!(m.contains("message 1: compressed"), "{m}"),
            other => panic!("{other:?}"),
        }
        // gRPC-Web's text form is base64, and plain HTTP is the application's to judge.
        for ct in [
            "application/grpc-web-text",
            "application/grpc-web-text+proto",
            "application/grpcx",
            "application/grpc-webx",
            "application/json",
        ] {
            let body = Full::new(Bytes::from_static(b"garbage"));
            assert!(cap.capture(&grpc(ct), body).await.is_ok(), "{ct}");
        }
    }
}
