//! Every error type of the crate: the degraded answer of a call, and configuration, command
//! and policy errors.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::class::Route;
use crate::gate::Reason;

/// A type-erased error, as in tower.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A call was not served by the inner service: it was rejected, timed out, or its route has no
/// handler.
///
/// Services using the generic protocol fail with it boxed in a [`BoxError`]: find it with
/// [`is_degraded`] or [`degraded`]. HTTP and gRPC services answer with a degraded response
/// instead and put a clone of this value in the response extensions; so does the fallback
/// router's answer to a call it kept (`202 Accepted`, with the task's id in
/// `x-degrade-task-id`): the service has not answered it yet either.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Degraded {
    service: Arc<str>,
    class: Arc<str>,
    reason: Reason,
    route: Route,
    retry_after: Option<Duration>,
    detail: Option<Arc<str>>,
    /// A call diverted to `cached`: claimed by the `LastGoodLayer` that looks for its copy.
    cached: Option<CachedClaim>,
}

/// The answer to a call diverted to `cached`, in its [`Degraded`] (and every clone of it: the
/// error, the response's extension): a `LastGoodLayer` outside the layer claims it when it
/// looks for the call's copy; dropped unclaimed (no such layer, or a call it does not serve
/// from a copy), it calls `unclaimed` (the layer counts a miss and says so). It holds the
/// call's names and the class's log-once flag, nothing of the degrader.
#[derive(Clone)]
pub(crate) struct CachedClaim(Arc<Claim>);

pub(crate) struct Claim {
    claimed: std::sync::atomic::AtomicBool,
    pub(crate) service: Arc<str>,
    pub(crate) class: Arc<str>,
    /// The class's: whether the log said so already.
    pub(crate) logged: Arc<std::sync::atomic::AtomicBool>,
    unclaimed: fn(&Claim),
}

impl CachedClaim {
    pub(crate) fn new(
        service: Arc<str>,
        class: Arc<str>,
        logged: Arc<std::sync::atomic::AtomicBool>,
        unclaimed: fn(&Claim),
    ) -> Self {
        Self(Arc::new(Claim {
            claimed: std::sync::atomic::AtomicBool::new(false),
            service,
            class,
            logged,
            unclaimed,
        }))
    }

    #[cfg(feature = "fallback")]
    fn claim(&self) {
        self.0
            .claimed
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if !self.claimed.load(std::sync::atomic::Ordering::Relaxed) {
            (self.unclaimed)(self);
        }
    }
}

impl fmt::Debug for CachedClaim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let claimed = self.0.claimed.load(std::sync::atomic::Ordering::Relaxed);
        f.debug_struct("CachedClaim")
            .field("claimed", &claimed)
            .finish()
    }
}

/// Not part of what a [`Degraded`] says: any two are alike.
impl PartialEq for CachedClaim {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for CachedClaim {}

/// The most bytes of a [`Degraded::detail`]: a longer one is cut at a character boundary.
#[cfg(feature = "fallback")]
const MAX_DETAIL_BYTES: usize = 256;

impl Degraded {
    pub(crate) fn new(
        service: Arc<str>,
        class: Arc<str>,
        reason: Reason,
        route: Route,
        retry_after: Option<Duration>,
    ) -> Self {
        Self {
            service,
            class,
            reason,
            route,
            retry_after,
            detail: None,
            cached: None,
        }
    }

    /// A call diverted to `cached`, whose answer a `LastGoodLayer` is to claim.
    pub(crate) fn with_cached_claim(mut self, claim: CachedClaim) -> Self {
        self.cached = Some(claim);
        self
    }

    /// A `LastGoodLayer` looked for this call's copy.
    #[cfg(feature = "fallback")]
    pub(crate) fn claim_cached(&self) {
        if let Some(c) = &self.cached {
            c.claim();
        }
    }

    /// With what was wrong with the client's own request, for the client: on one line, as
    /// errors show a reason, in visible ASCII (it goes into a header and a `grpc-message`:
    /// anything else escaped, `\u{fc}`), cut at [`MAX_DETAIL_BYTES`] (`...` past them).
    #[cfg(feature = "fallback")]
    pub(crate) fn with_detail(mut self, detail: &str) -> Self {
        let one_line = detail.split_whitespace().collect::<Vec<_>>().join(" ");
        let shown = escape_cut_where(
            &one_line,
            MAX_DETAIL_BYTES,
            |c| c.is_control() || !c.is_ascii(),
            "...",
        );
        self.detail = Some(shown.into()).filter(|d: &Arc<str>| !d.is_empty());
        self
    }

    /// The service of the degrader whose layer did not serve the call (its
    /// [`Degrader::builder`](crate::Degrader::builder) name): tells apart the answers of two
    /// degraders in one process.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// The class of the call.
    pub fn class(&self) -> &str {
        &self.class
    }

    /// Why the call was not served.
    pub fn reason(&self) -> Reason {
        self.reason
    }

    /// The route the call was sent to: its class's fallback route (or a policy's). For a call
    /// the layer timed out, which was sent nowhere, `cached` where its class is routed there
    /// (a `LastGoodLayer` may serve its copy), else `reject`.
    pub fn route(&self) -> Route {
        self.route
    }

    /// When the caller may retry, if known.
    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }

    /// What was wrong with the client's own request, where the layer refused it for that
    /// (`malformed`, `too_large`): "header `idempotency-key`: longer than 255 bytes". Sent to
    /// the client in [`DETAIL_HEADER`](crate::protocol::DETAIL_HEADER) (HTTP) or the
    /// `grpc-message`; `None` for every other answer.
    pub fn detail(&self) -> Option<&str> {
        self.detail.as_deref()
    }
}

impl Degraded {
    /// The message for a client: why, and when to come back; the class only when `with_class`.
    pub(crate) fn client_message(&self, with_class: bool) -> String {
        let mut msg = String::with_capacity(64);
        let _ = self.write(&mut msg, with_class);
        msg
    }

    fn write(&self, f: &mut impl fmt::Write, with_class: bool) -> fmt::Result {
        if with_class {
            write!(f, "class `{}`: ", self.class)?;
        }
        match self.reason {
            Reason::Timeout => f.write_str("timed out")?,
            reason => write!(f, "not served: {}", reason.describe())?,
        }
        match self.reason {
            // A timeout was admitted: no fallback route was tried (for a class routed to
            // `cached`, a copy may yet stand in for it, outside the layer).
            _ if self.route == Route::Reject || self.reason == Reason::Timeout => {}
            // The route's handler was there and could not keep the call.
            Reason::NotKept | Reason::TooLarge | Reason::Malformed => {
                write!(f, " (fallback route `{}`)", self.route)?
            }
            _ => write!(f, " (fallback route `{}` has no handler)", self.route)?,
        }
        if let Some(d) = &self.detail {
            write!(f, ": {d}")?;
        }
        if let Some(d) = self.retry_after {
            write!(f, "; retry after {:.1} s", d.as_secs_f64())?;
        }
        Ok(())
    }
}

/// `class `browse_log`: not served: circuit breaker open; retry after 4.5 s`.
impl fmt::Display for Degraded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.write(f, true)
    }
}

impl std::error::Error for Degraded {}

/// Whether `err` is, or wraps (through [`std::error::Error::source`]), a [`Degraded`] error.
///
/// ```
/// use tower_degrade::{error::is_degraded, BoxError};
///
/// let err: BoxError = "database down".into();
/// assert!(!is_degraded(&*err));
/// ```
pub fn is_degraded(err: &(dyn std::error::Error + 'static)) -> bool {
    degraded(err).is_some()
}

/// The [`Degraded`] error inside `err`, if any.
pub fn degraded<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a Degraded> {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(d) = e.downcast_ref::<Degraded>() {
            return Some(d);
        }
        cur = e.source();
    }
    None
}

/// An error in the class configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfigError {
    /// Two classes share a name.
    DuplicateClass(String),
    /// A class name is empty, has characters other than `[A-Za-z0-9_.:-]`, or is `.` or `..`
    /// (a URL path segment that browsers and the admin API's paths drop).
    InvalidName(String),
    /// A rule or strategy names a class that is not configured.
    UnknownClass(String),
    /// More classes configured than [`MAX_CLASSES`](crate::class::MAX_CLASSES) less the
    /// `default` class: how many.
    TooManyClasses(usize),
    /// A field of one class has a value that would make the class meaningless.
    InvalidClass {
        /// The class.
        class: String,
        /// The field, e.g. `sla`.
        field: &'static str,
        /// Why it is rejected.
        reason: String,
    },
    /// A field has a value out of range.
    InvalidValue {
        /// The field, e.g. `breaker.failure_rate`.
        field: &'static str,
        /// Why it is rejected.
        reason: String,
    },
}

/// The longest duration a setting takes (a timeout, an SLA, a breaker's open time): a day.
/// Longer is a mistake (`Duration::MAX` for "never"), and adding it to a clock overflows.
pub(crate) const MAX_DURATION: std::time::Duration = std::time::Duration::from_secs(86_400);

/// `text` as it may be shown in one log line or error: control and bidirectional-override
/// characters escaped (`\u{1b}`), cut with `…` past `max` bytes. Names and values in errors
/// can come from requests (an admin path) or files: they cannot forge a line or run on.
pub(crate) fn escape_cut(text: &str, max: usize) -> String {
    let escape = |c: char| {
        let bidi = matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{200E}' | '\u{200F}');
        c.is_control() || bidi
    };
    escape_cut_where(text, max, escape, "…")
}

/// `text` with the characters `escape` picks escaped (`\u{1b}`), cut with `cut` where the next
/// character would take it past `max` bytes (an escape is never split).
fn escape_cut_where(text: &str, max: usize, escape: impl Fn(char) -> bool, cut: &str) -> String {
    let mut out = String::with_capacity(text.len().min(max));
    for c in text.chars() {
        let piece = if escape(c) {
            format!("\\u{{{:x}}}", c as u32)
        } else {
            c.to_string()
        };
        if out.len() + piece.len() > max {
            out.push_str(cut);
            break;
        }
        out.push_str(&piece);
    }
    out
}

/// A name as errors show it (escaped, cut at 64 bytes with its length said).
fn name(n: &str) -> String {
    if n.len() > 64 {
        format!("{} ({} bytes)", escape_cut(n, 64), n.len())
    } else {
        escape_cut(n, 64)
    }
}

/// A reason as errors show it: free text (often another library's message, over several
/// lines) on one line, its whitespace runs made one space, the rest escaped and cut as
/// [`escape_cut`] does.
fn reason(text: &str) -> String {
    escape_cut(&text.split_whitespace().collect::<Vec<_>>().join(" "), 512)
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::DuplicateClass(n) => {
                write!(f, "class `{}` is configured twice", name(n))
            }
            ConfigError::InvalidName(n) => write!(
                f,
                "class name `{}` is invalid: use 1-64 characters from [A-Za-z0-9_.:-], not `.` or `..` alone",
                name(n)
            ),
            ConfigError::UnknownClass(n) => write!(f, "unknown class `{}`", name(n)),
            ConfigError::TooManyClasses(n) => write!(
                f,
                "{n} classes configured: at most {} besides `default` (a class is a kind of \
                 work, not a tenant or an endpoint of its own: group them)",
                crate::class::MAX_CLASSES - 1
            ),
            ConfigError::InvalidClass {
                class,
                field,
                reason,
            } => write!(
                f,
                "class `{}`: invalid `{field}`: {}",
                name(class),
                self::reason(reason)
            ),
            ConfigError::InvalidValue { field, reason } => {
                write!(f, "invalid `{field}`: {}", self::reason(reason))
            }
        }
    }
}

impl std::error::Error for ConfigError {}

/// A string that names no [`Command`](crate::breaker::Command).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownCommand {
    pub(crate) given: String,
    pub(crate) expected: &'static [&'static str],
}

impl fmt::Display for UnknownCommand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "unknown command `{}`: expected one of {}",
            self.given,
            self.expected.join(", ")
        )
    }
}

impl std::error::Error for UnknownCommand {}

/// A policy file that was rejected, with where and why.
#[cfg(feature = "rhai")]
#[cfg_attr(docsrs, doc(cfg(feature = "rhai")))]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError {
    pub(crate) file: String,
    pub(crate) line: Option<usize>,
    pub(crate) reason: String,
}

#[cfg(feature = "rhai")]
impl PolicyError {
    /// Control characters (in a file's name, or in what a script threw while it was
    /// validated) are escaped: the error is written to logs as is.
    pub(crate) fn new(file: &str, line: Option<usize>, reason: impl Into<String>) -> Self {
        Self {
            file: escape_cut(file, 1024),
            line,
            reason: escape_cut(&reason.into(), 1024),
        }
    }

    /// The file (or source name) of the policy.
    pub fn file(&self) -> &str {
        &self.file
    }

    /// The line, when known.
    pub fn line(&self) -> Option<usize> {
        self.line
    }

    /// Why it was rejected.
    pub fn reason(&self) -> &str {
        &self.reason
    }
}

#[cfg(feature = "rhai")]
impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{line}: {}", self.file, self.reason),
            None => write!(f, "{}: {}", self.file, self.reason),
        }
    }
}

#[cfg(feature = "rhai")]
impl std::error::Error for PolicyError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_degraded_error_is_as_easy_to_hold_as_any_error() {
        // Its `cached` claim holds names and a flag: no degrader kept alive, and still
        // `Send`, `Sync` and unwind safe, as before it had one.
        fn holdable<T: Send + Sync + std::panic::UnwindSafe + std::panic::RefUnwindSafe>() {}
        holdable::<Degraded>();
    }

    #[test]
    fn a_route_that_could_not_keep_the_call_is_not_said_to_have_no_handler() {
        let retry = Some(std::time::Duration::from_secs(1));
        let not_kept = Degraded::new(
            Arc::from("shop"),
            Arc::from("log"),
            Reason::NotKept,
            Route::Spool,
            retry,
        );
        assert_eq!(
            not_kept.to_string(),
            "class `log`: not served: diverted, and the request could not be stored for later \
             (fallback route `spool`); retry after 1.0 s"
        );
        let unserved = Degraded::new(
            Arc::from("shop"),
            Arc::from("log"),
            Reason::BreakerOpen,
            Route::Spool,
            None,
        );
        assert!(
            unserved
                .to_string()
                .ends_with("(fallback route `spool` has no handler)")
        );
    }

    #[test]
    fn a_reason_over_several_lines_reads_as_one_and_a_name_stays_escaped() {
        let e = ConfigError::InvalidClass {
            class: "pay\nX".into(),
            field: "predictor",
            reason: "index: 0 Got: 4\n Expected: 1\r\n\tPlease fix \u{1b}[31m".into(),
        };
        assert_eq!(
            e.to_string(),
            "class `pay\\u{a}X`: invalid `predictor`: index: 0 Got: 4 Expected: 1 Please fix \
             \\u{1b}[31m"
        );
    }

    #[test]
    #[cfg(feature = "fallback")]
    fn a_detail_is_one_line_of_ascii_cut_short_and_said_last() {
        let refused = || {
            Degraded::new(
                Arc::from("shop"),
                Arc::from("orders"),
                Reason::Malformed,
                Route::Spool,
                None,
            )
        };
        // On one line, as a reason is; what is not visible ASCII escaped, as errors escape.
        let d = refused().with_detail("qty:\r\n\u{1b}[31m ungültig ");
        assert_eq!(d.detail(), Some("qty: \\u{1b}[31m ung\\u{fc}ltig"));
        assert!(
            d.to_string()
                .ends_with("(fallback route `spool`): qty: \\u{1b}[31m ung\\u{fc}ltig"),
            "{d}"
        );
        // Escaped, then cut before an escape that would pass the most, never inside one.
        let long = format!("{}é", "x".repeat(MAX_DETAIL_BYTES - 4));
        let cut = refused().with_detail(&long);
        assert_eq!(
            cut.detail(),
            Some(format!("{}...", "x".repeat(MAX_DETAIL_BYTES - 4)).as_str())
        );
        let wide = "😀".repeat(MAX_DETAIL_BYTES);
        let d = refused().with_detail(&wide);
        assert!(d.detail().unwrap().len() <= MAX_DETAIL_BYTES + 3, "{d}");
        assert!(d.detail().unwrap().is_ascii(), "{d}");
        assert_eq!(refused().with_detail(" \n ").detail(), None);
        assert_eq!(refused().detail(), None);
    }
}
