//! What the admin routers share: bearer tokens, checked in constant time (`subtle`), at least
//! 16 bytes of visible ASCII; and their JSON answers to a request an extractor refused and
//! to a method a path does not take. A leaf, naming nothing above it but the error type.

use http::HeaderMap;
use subtle::ConstantTimeEq;

use crate::error::ConfigError;

/// The shortest token accepted, in bytes.
pub(crate) const MIN_TOKEN: usize = 16;

/// A bearer token, checked for length when made.
#[derive(Clone)]
pub(crate) struct Token(std::sync::Arc<[u8]>);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(..)")
    }
}

impl Token {
    /// `token`, or an error naming `field` when it is shorter than [`MIN_TOKEN`] bytes or
    /// holds anything but visible ASCII: a token a client cannot send as a bearer token
    /// (a space, which HTTP trims or splits on; a byte a header value cannot carry as text)
    /// would be accepted here and authorize nothing.
    pub(crate) fn new(token: &str, field: &'static str) -> Result<Token, ConfigError> {
        if token.len() < MIN_TOKEN {
            return Err(ConfigError::InvalidValue {
                field,
                reason: format!("must be at least {MIN_TOKEN} bytes: it guards admin actions"),
            });
        }
        if let Some(at) = token.bytes().position(|b| !b.is_ascii_graphic()) {
            return Err(ConfigError::InvalidValue {
                field,
                reason: format!(
                    "must be visible ASCII (no spaces or control characters), as a bearer \
                     token is sent: byte {at} is not"
                ),
            });
        }
        Ok(Token(token.as_bytes().into()))
    }

    /// Whether `headers` carry `Authorization: Bearer <this token>` (the scheme in any case,
    /// as RFC 9110 has it). The comparison takes the same time wherever the first difference
    /// is.
    pub(crate) fn authorizes(&self, headers: &HeaderMap) -> bool {
        let given = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let (scheme, token) = v.split_once(' ')?;
                scheme
                    .eq_ignore_ascii_case("bearer")
                    .then(|| token.trim_start())
            })
            .unwrap_or("")
            .as_bytes();
        // `ct_eq` on slices of different lengths is false at once; only the length leaks.
        bool::from(given.ct_eq(&self.0))
    }
}

/// Middleware (`axum::middleware::from_fn_with_state(token, require)`): a request without
/// the token gets 401 with `WWW-Authenticate: Bearer` and a JSON error, and goes no further.
pub(crate) async fn require(
    axum::extract::State(token): axum::extract::State<Token>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use http::{HeaderValue, StatusCode, header};
    if token.authorizes(req.headers()) {
        return next.run(req).await;
    }
    let mut res = axum::response::Response::new(axum::body::Body::from(
        r#"{"error":"a valid bearer token is required"}"#,
    ));
    *res.status_mut() = StatusCode::UNAUTHORIZED;
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    res
}

/// An extractor's refusal (a body over the limit, a path that is not UTF-8, a query that
/// does not parse) as JSON, `{"error": ...}`, like every other answer, with its status.
#[cfg(any(feature = "admin", feature = "fallback"))]
pub(crate) fn rejected<R>(rejection: R) -> axum::response::Response
where
    R: axum::response::IntoResponse + std::fmt::Display,
{
    use http::{HeaderValue, header};
    let body = serde_json::json!({ "error": rejection.to_string() }).to_string();
    let status = rejection.into_response().status();
    let mut res = axum::response::Response::new(axum::body::Body::from(body));
    *res.status_mut() = status;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    res
}

/// A method a route does not take: 405 with the JSON error every other answer has (axum's
/// own has an empty body); the `Allow` header axum adds is kept.
pub(crate) async fn method_not_allowed() -> axum::response::Response {
    use http::{HeaderValue, StatusCode, header};
    let mut res = axum::response::Response::new(axum::body::Body::from(
        r#"{"error":"method not allowed (the Allow header lists those this path takes)"}"#,
    ));
    *res.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bearer(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(http::header::AUTHORIZATION, v.parse().unwrap());
        h
    }

    #[test]
    fn only_the_exact_token_authorizes() {
        let t = Token::new("0123456789abcdef", "admin.token").unwrap();
        assert!(t.authorizes(&bearer("Bearer 0123456789abcdef")));
        assert!(
            t.authorizes(&bearer("bearer 0123456789abcdef")),
            "the scheme in any case"
        );
        assert!(t.authorizes(&bearer("BEARER  0123456789abcdef")));
        assert!(!t.authorizes(&bearer("Bearer 0123456789abcdeF")));
        assert!(!t.authorizes(&bearer("Bearer0123456789abcdef")));
        assert!(!t.authorizes(&bearer("Bearer 0123456789abcdef0")));
        assert!(!t.authorizes(&bearer("Basic 0123456789abcdef")));
        assert!(!t.authorizes(&HeaderMap::new()));
        let e = Token::new("short", "admin.token").unwrap_err().to_string();
        assert!(e.contains("admin.token") && e.contains("16 bytes"), "{e}");
        // Tokens no client can send whole were accepted and authorized nothing.
        for bad in [
            "éééééééééé",
            " leading-space-token-xx",
            "trailing-space-token-x ",
            "                ",
            "tab\tinside-the-token",
        ] {
            let e = Token::new(bad, "admin.token").unwrap_err().to_string();
            assert!(
                e.contains("admin.token") && e.contains("visible ASCII"),
                "{bad:?}: {e}"
            );
        }
    }
}
