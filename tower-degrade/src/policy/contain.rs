//! Containment: where policy code runs and for how long.
//!
//! - **Stack.** Rhai evaluates recursively: every nested expression, function call and level of
//!   nested data (`to_string`, `==` on an array of arrays) is a few native frames. The deepest a
//!   script can go is fixed by its limits, so the stack it can need is too
//!   (`Limits::stack_need`). Validation runs on a thread of its own with twice that stack
//!   ([`on_policy_stack`]); ticks and `on_request` hooks run on their caller's thread, on a
//!   stack grown for the call when what is left is not enough ([`with_stack`]).
//! - **Time.** The operation budget bounds the work a script does, not the time a native
//!   function takes; a wall-clock deadline per call ([`with_deadline`], checked every 8
//!   operations) and a budget per tick bound both. Every native function a script can call is
//!   bounded by the size limits (the slowest, copying or printing a 1,024-deep array, takes
//!   milliseconds), so a script stops within milliseconds of its deadline.
//! - **Logs.** `print` and `debug` are rate-limited ([`LogLimiter`]) and escaped.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Stack bytes per level of script recursion, measured with the deepest shapes (nested
/// parentheses through recursive calls, an array nested 1,020 deep printed or compared):
/// at most 16 KiB a level in a debug build, 2.3 KiB in a release build; with a margin.
pub(crate) const LEVEL_BYTES: usize = if cfg!(debug_assertions) { 24 } else { 4 } * 1024;

/// Native frames outside the script's levels (the engine's entry, the hook's arguments).
pub(crate) const BASE_BYTES: usize = 256 * 1024;

/// Stack bytes per level of a chain of closures each capturing the one before
/// (`for i in 0..n { let b = a; a = || b; }`), which the size limits do not count (they count
/// strings, arrays and maps) and whose drop recurses a level per closure: measured 543 bytes
/// a level in a debug build, 237 in a release build; with a margin.
pub(crate) const CHAIN_BYTES: usize = if cfg!(debug_assertions) { 640 } else { 320 };

/// The fewest operations a script spends on one level of such a chain: 9 in every shape
/// measured (a `for` or `while` loop, a block or statements per level written out, a block
/// expression), counted as 8.
pub(crate) const OPS_PER_CHAIN_LEVEL: u64 = 8;

/// The call levels an `on_request` hook gets (it runs on the request's thread).
pub(crate) const REQUEST_CALL_LEVELS: usize = 4;
/// The elements of one array an `on_request` hook may build.
pub(crate) const REQUEST_ARRAY_SIZE: usize = 128;
/// The entries of one map an `on_request` hook may build.
pub(crate) const REQUEST_MAP_SIZE: usize = 64;

/// Run `f` with at least `need` bytes of stack: on the caller's stack when it has that much
/// left, else on a stack of twice that, mapped for the call (reserved, not committed: only the
/// pages the script touches cost memory).
pub(crate) fn with_stack<R>(need: usize, f: impl FnOnce() -> R) -> R {
    stacker::maybe_grow(need, need.saturating_mul(2), f)
}

thread_local! {
    /// The deadline of the policy call running on this thread.
    static DEADLINE: Cell<Option<Instant>> = const { Cell::new(None) };
    /// Whether the engine was told to stop the call running on this thread at its deadline.
    static STOPPED: Cell<bool> = const { Cell::new(false) };
}

/// Run `f` (one policy call) with a wall-clock deadline: the engine stops the script at the
/// first check past it (see [`past_deadline`], [`stop`]). With `f`'s result, whether it was
/// stopped so: a call can come back without the error (a native function that drops its
/// callback's errors, as an array's `sort` with a comparator does), and is late all the same.
pub(crate) fn with_deadline<R>(deadline: Instant, f: impl FnOnce() -> R) -> (R, bool) {
    struct Reset(Option<Instant>, bool);
    impl Drop for Reset {
        fn drop(&mut self) {
            DEADLINE.with(|d| d.set(self.0));
            STOPPED.with(|s| s.set(self.1));
        }
    }
    let _reset = Reset(
        DEADLINE.with(|d| d.replace(Some(deadline))),
        STOPPED.with(|s| s.replace(false)),
    );
    let out = f();
    (out, STOPPED.with(Cell::get))
}

/// The engine stops the call running on this thread (its progress callback is past the
/// deadline): said so to [`with_deadline`].
pub(crate) fn stop() -> Deadline {
    STOPPED.with(|s| s.set(true));
    Deadline
}

/// Whether the call running on this thread is past its deadline (never, outside
/// [`with_deadline`]).
pub(crate) fn past_deadline() -> bool {
    DEADLINE
        .with(|d| d.get())
        .is_some_and(|d| Instant::now() >= d)
}

/// The value the engine's progress callback stops a script with at its deadline: a type no
/// script can make, so nothing a script throws can pass for a slow call (which is skipped,
/// not quarantined, until it happens three times in a row).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Deadline;

/// Run `f` on a new thread with `stack` bytes of stack and wait for it: validation runs
/// there, neither on the caller's stack nor on an async runtime's worker.
pub(crate) fn on_policy_stack<R: Send>(
    stack: usize,
    f: impl FnOnce() -> R + Send,
) -> std::io::Result<R> {
    std::thread::scope(|s| {
        let handle = std::thread::Builder::new()
            .name("tower-degrade-policy-load".into())
            .stack_size(stack)
            .spawn_scoped(s, f)?;
        Ok(handle
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic)))
    })
}

/// Rate limit for `print` and `debug`: at most `per_sec` lines a second for all policies of a
/// degrader; the rest are counted, not written.
#[derive(Debug)]
pub(crate) struct LogLimiter {
    per_sec: u64,
    start: Instant,
    /// The second (since `start`) in the high 32 bits, the lines written in it in the low 32.
    slot: AtomicU64,
    dropped: AtomicU64,
}

impl LogLimiter {
    pub(crate) fn new(per_sec: u32) -> Self {
        Self {
            per_sec: u64::from(per_sec),
            start: Instant::now(),
            slot: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        }
    }

    /// Whether a line may be written now.
    pub(crate) fn allow(&self) -> bool {
        let sec = self.start.elapsed().as_secs() & 0xffff_ffff;
        let mut cur = self.slot.load(Ordering::Relaxed);
        loop {
            let (s, n) = (cur >> 32, cur & 0xffff_ffff);
            let next = if s == sec { n + 1 } else { 1 };
            if s == sec && n >= self.per_sec {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                return false;
            }
            match self.slot.compare_exchange_weak(
                cur,
                (sec << 32) | next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(now) => cur = now,
            }
        }
    }

    /// Lines dropped since the start.
    pub(crate) fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_limiter_lets_the_first_lines_of_a_second_through() {
        let l = LogLimiter::new(3);
        let allowed = (0..10).filter(|_| l.allow()).count();
        // All ten calls happen within one second on any machine that runs tests.
        assert_eq!(allowed, 3);
        assert_eq!(l.dropped(), 7);
    }

    #[test]
    fn a_deadline_is_scoped_to_its_call() {
        assert!(!past_deadline());
        let past = Instant::now();
        let ((), stopped) = with_deadline(past, || {
            assert!(past_deadline());
            let later = Instant::now() + std::time::Duration::from_secs(3600);
            let ((), inner) = with_deadline(later, || {
                assert!(!past_deadline());
                stop();
            });
            assert!(inner, "the inner call was stopped");
            assert!(past_deadline(), "the outer deadline is back");
        });
        assert!(!stopped, "the inner call's stop is its own");
        assert!(!past_deadline());
    }

    #[test]
    fn the_stack_follows_the_limits() {
        use crate::policy::Limits;
        let small = Limits {
            max_call_levels: 2,
            ..Limits::default()
        };
        let default = Limits::default();
        assert!(small.stack_need() < default.stack_need());
        assert!(default.request_stack_need() < default.stack_need());
        assert_eq!(default.thread_stack(), 2 * default.stack_need());
        // A hook runs on the request's thread: a runtime worker's 2 MiB stack keeps room for
        // the frames above it (a release build; a debug one grows a stack for the hook), so a
        // hooked request maps no stack of its own.
        if !cfg!(debug_assertions) {
            let left = (2usize << 20).saturating_sub(default.request_stack_need());
            assert!(
                left >= 160 << 10,
                "{left} bytes left for the frames above the hook"
            );
        }
        // A chain of closures is as deep as the operation budget lets a script build it.
        let more_ops = Limits {
            max_operations: 1_000_000,
            ..Limits::default()
        };
        assert!(more_ops.stack_need() >= 125_000 * CHAIN_BYTES);
        let more_request_ops = Limits {
            max_request_operations: 200_000,
            ..Limits::default()
        };
        assert!(more_request_ops.request_stack_need() >= 25_000 * CHAIN_BYTES);
        // Validation calls `on_request` hooks on the tick's stack.
        assert!(more_request_ops.stack_need() >= more_request_ops.request_stack_need());
    }
}
