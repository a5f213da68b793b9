//! The gate: what the data path reads of one class (its packed [`Directive`], its probe permits
//! and its admission sequence), written by the control loop and read with one atomic load.
//!
//! This is a leaf: the control loop publishes into it and the layer reads it; neither the
//! degrader nor the layer is named here.

mod directive;
mod probe;

use std::sync::atomic::{AtomicU16, AtomicU32, Ordering};
use std::time::Duration;

pub use self::directive::{Directive, Reason};
pub(crate) use self::directive::{
    DirectiveCell, KIND_ADMIT, KIND_FRACTION, KIND_PROBE, Packed, ticket,
};
pub(crate) use self::probe::ProbePermit;

/// The longest an overload refusal asks its client to wait (`Retry-After`,
/// `grpc-retry-pushback-ms`; see [`Gate::overload_pushback`]).
pub(crate) const MAX_OVERLOAD_PUSHBACK: Duration = Duration::from_secs(10);

/// What the data path reads of one class.
#[repr(align(128))]
#[derive(Debug)]
pub(crate) struct Gate {
    pub(crate) directive: DirectiveCell,
    /// Half-open probe permits left.
    pub(crate) probes: AtomicU32,
    /// Probes finished since the control loop last took them: served within the SLA, and
    /// failed (an error, a timeout, slower than the SLA). Only calls admitted as probes
    /// count, so calls admitted before the breaker opened that finish while it is half-open
    /// do not decide whether it recovers.
    pub(crate) probes_ok: AtomicU32,
    pub(crate) probes_failed: AtomicU32,
    /// The class's SLA, µs: a probe slower than it has not shown a recovery.
    pub(crate) sla_micros: u64,
    /// Calls seen, for spreading an admitted fraction evenly.
    pub(crate) seq: AtomicU32,
    /// The class's call timeout.
    pub(crate) timeout: Option<Duration>,
    /// The class's admission limiter (an index into the degrader's limiters), if admission is on.
    pub(crate) limiter: Option<u8>,
    /// The class's dynamic score within its tier, for the admission queue (set every tick).
    pub(crate) score: AtomicU16,
    /// How long a call may wait for an admission permit.
    pub(crate) queue_bound: Duration,
    /// The class's tier.
    pub(crate) tier: crate::class::Tier,
    /// Where the class's calls go when not admitted.
    pub(crate) route: crate::class::Route,
    /// How long the class's calls have been turned away for overload, in ms: a tick more for
    /// each tick that turned one away, halved by each that did not (the control loop's alone
    /// to write; see [`overload_pushback`](Self::overload_pushback)).
    pub(crate) overloaded_ms: AtomicU32,
}

impl Gate {
    pub(crate) fn new(class: &crate::class::ClassConfig, limiter: Option<u8>) -> Self {
        Self {
            directive: DirectiveCell::new(),
            probes: AtomicU32::new(0),
            probes_ok: AtomicU32::new(0),
            probes_failed: AtomicU32::new(0),
            sla_micros: u64::try_from(class.sla_target().as_micros()).unwrap_or(u64::MAX),
            seq: AtomicU32::new(0),
            timeout: class.call_timeout(),
            limiter,
            score: AtomicU16::new(0),
            queue_bound: class.queue_delay_bound(),
            tier: class.tier(),
            route: class.route(),
            overloaded_ms: AtomicU32::new(0),
        }
    }

    /// How long a call turned away for overload asks its client to wait: the next tick
    /// (`period`) while the class's overload is new; once it has lasted longer, a wait drawn
    /// evenly between half of how long it has lasted and all of it, at most
    /// [`MAX_OVERLOAD_PUSHBACK`]. Clients that honour it come back fewer the longer an
    /// overload lasts, rather than every tick into it, and spread out rather than together.
    #[cold]
    pub(crate) fn overload_pushback(&self, period: Duration) -> Duration {
        let lasted = Duration::from_millis(u64::from(self.overloaded_ms.load(Ordering::Relaxed)))
            .min(MAX_OVERLOAD_PUSHBACK);
        if lasted <= period {
            return period;
        }
        lasted.mul_f64(0.5 + 0.5 * spread()).max(period)
    }

    /// Whether the next call falls within the admitted `threshold` (see [`Packed::threshold`]).
    #[inline]
    pub(crate) fn admits_fraction(&self, threshold: u32) -> bool {
        ticket(self.seq.fetch_add(1, Ordering::Relaxed)) < threshold
    }

    /// Give one probe permit back (its call was cancelled).
    pub(crate) fn release_probe(&self) {
        self.probes.fetch_add(1, Ordering::AcqRel);
    }

    /// Make `n` probe permits available (on entering half-open), with no probe finished yet.
    pub(crate) fn set_probes(&self, n: u32) {
        self.probes_ok.store(0, Ordering::Relaxed);
        self.probes_failed.store(0, Ordering::Relaxed);
        self.probes.store(n, Ordering::Release);
    }

    /// A probe finished after `latency`: `ok` if it was served (then it counts as served
    /// only within the SLA).
    #[cold]
    pub(crate) fn probe_done(&self, ok: bool, latency: Duration) {
        if ok && self.within_sla(latency) {
            self.probes_ok.fetch_add(1, Ordering::Relaxed);
        } else {
            self.probes_failed.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Whether `latency` is within the class's SLA.
    pub(crate) fn within_sla(&self, latency: Duration) -> bool {
        u64::try_from(latency.as_micros()).unwrap_or(u64::MAX) <= self.sla_micros
    }

    /// The probe permits no call holds.
    pub(crate) fn probes_left(&self) -> u32 {
        self.probes.load(Ordering::Acquire)
    }

    /// The probes finished since the last call: (served within the SLA, failed).
    pub(crate) fn take_probes(&self) -> (u64, u64) {
        (
            u64::from(self.probes_ok.swap(0, Ordering::Relaxed)),
            u64::from(self.probes_failed.swap(0, Ordering::Relaxed)),
        )
    }
}

/// A number in `[0, 1)`, from a generator of the calling thread's own (xorshift, seeded once a
/// thread from the standard library's random hasher keys): no lock, no shared cache line.
fn spread() -> f64 {
    use std::cell::Cell;
    use std::hash::{BuildHasher, Hasher};
    thread_local! {
        static STATE: Cell<u64> = const { Cell::new(0) };
    }
    STATE.with(|s| {
        let mut x = s.get();
        if x == 0 {
            x = std::collections::hash_map::RandomState::new()
                .build_hasher()
                .finish()
                | 1;
        }
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.set(x);
        (x >> 11) as f64 / (1u64 << 53) as f64
    })
}
