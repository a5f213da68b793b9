//! What per-request rules may see of a request: a leaf, naming no other part of the crate.

/// A borrowed view of a request for per-request policy rules (see
/// [`ClassifyRequest::describe`](super::ClassifyRequest::describe)).
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
pub(crate) fn parse_start(v: &str) -> Option<u64> {
    let v = v.trim().trim_start_matches("t=");
    if let Some((secs, frac)) = v.split_once('.') {
        // A client's value: checked, not trusted (`99999999999999999.0` overflowed).
        if !frac.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let secs: u64 = secs.parse().ok()?;
        let ms = frac
            .bytes()
            .chain(std::iter::repeat(b'0'))
            .take(3)
            .fold(0u64, |ms, b| ms * 10 + u64::from(b - b'0'));
        return secs.checked_mul(1000)?.checked_add(ms);
    }
    let n: u64 = v.parse().ok()?;
    // Tell the units apart by magnitude: seconds < 1e11 <= milliseconds < 1e14 <= microseconds.
    Some(match n {
        0..100_000_000_000 => n * 1000,
        100_000_000_000..100_000_000_000_000 => n,
        _ => n / 1000,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_start_headers_in_every_unit() {
        assert_eq!(parse_start("1700000000"), Some(1_700_000_000_000));
        assert_eq!(parse_start("1700000000123"), Some(1_700_000_000_123));
        assert_eq!(parse_start("t=1700000000123456"), Some(1_700_000_000_123));
        assert_eq!(parse_start("1700000000.5"), Some(1_700_000_000_500));
        assert_eq!(parse_start("soon"), None);
        assert_eq!(parse_start("1700000000."), Some(1_700_000_000_000));
        assert_eq!(parse_start("1700000000.05"), Some(1_700_000_000_050));
        assert_eq!(parse_start("1700000000.123999"), Some(1_700_000_000_123));
    }

    #[test]
    fn a_request_start_header_a_client_made_up_is_none_or_a_number_never_a_panic() {
        // Seconds whose milliseconds overflow u64 panicked (debug) or wrapped (release).
        assert_eq!(parse_start("99999999999999999.0"), None);
        assert_eq!(parse_start("18446744073709551.615"), Some(u64::MAX));
        assert_eq!(parse_start("18446744073709552.0"), None);
        for v in [
            "1.5e3",
            "1.-5",
            "1.+5",
            "-1.5",
            "1.ééé",
            ".",
            "1..2",
            "",
            "t=",
            "18446744073709551616",
        ] {
            assert_eq!(parse_start(v), None, "{v:?}");
        }
        assert_eq!(
            parse_start("18446744073709551615"),
            Some(18_446_744_073_709_551)
        );
    }
}
