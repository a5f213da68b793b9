//! Per-thread shards of cache-padded counters: the data path's only writes.

use std::cell::Cell;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

use super::Outcome;
use super::histogram::{self, BUCKETS};

/// Counters of one class within one shard.
#[repr(align(128))]
pub(crate) struct ClassCounters {
    pub(super) outcomes: [AtomicU64; 6],
    /// Wrapping: incremented on one shard, possibly decremented on another.
    pub(super) inflight: AtomicU64,
    pub(super) max_micros: AtomicU64,
    /// Calls that queued before they ran (for readiness or a policy's delay), and the sum of
    /// their waits in µs.
    pub(super) queued: AtomicU64,
    pub(super) queued_micros: AtomicU64,
    pub(super) hist: [AtomicU32; BUCKETS],
}

impl ClassCounters {
    fn new() -> Self {
        Self {
            outcomes: Default::default(),
            inflight: AtomicU64::new(0),
            max_micros: AtomicU64::new(0),
            queued: AtomicU64::new(0),
            queued_micros: AtomicU64::new(0),
            hist: [const { AtomicU32::new(0) }; BUCKETS],
        }
    }
}

/// One shard: the counters of every class, written mostly by the threads mapped to it.
///
/// Each shard is its own `Arc` allocation, so a request's future holds a clone of its shard
/// only: threads on different shards never touch a shared reference count.
pub(crate) struct Shard {
    pub(super) classes: Box<[ClassCounters]>,
    names: std::sync::Arc<[std::sync::Arc<str>]>,
    /// Per class, how long (µs) a call may run before its caller abandoning it counts as a
    /// timeout (`u64::MAX`: never).
    abandon_micros: std::sync::Arc<[u64]>,
    pub(crate) timer: crate::clock::Timer,
    /// The admission limiters, and per class the index of its own (`u8::MAX`: none).
    limiters: std::sync::Arc<[crate::admit::Limiter]>,
    class_limiter: std::sync::Arc<[u8]>,
    /// The classes' gates, where a cancelled probe gives its permit back.
    gates: std::sync::Arc<[crate::gate::Gate]>,
    /// Per limiter, the latency samples of this shard's calls ([`crate::admit::sample`]s),
    /// summed by the control tick: a shared counter would move between cores on every call.
    samples: Box<[Padded]>,
}

/// A counter on its own cache line.
#[repr(align(128))]
#[derive(Default)]
struct Padded(AtomicU64);

impl std::fmt::Debug for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shard")
            .field("classes", &self.classes.len())
            .finish()
    }
}

impl Shard {
    pub(crate) fn new(
        names: std::sync::Arc<[std::sync::Arc<str>]>,
        abandon_micros: std::sync::Arc<[u64]>,
        timer: crate::clock::Timer,
        limiters: std::sync::Arc<[crate::admit::Limiter]>,
        class_limiter: std::sync::Arc<[u8]>,
        gates: std::sync::Arc<[crate::gate::Gate]>,
    ) -> Self {
        Self {
            classes: (0..names.len()).map(|_| ClassCounters::new()).collect(),
            names,
            abandon_micros,
            timer,
            limiters: limiters.clone(),
            class_limiter,
            samples: limiters.iter().map(|_| Padded::default()).collect(),
            gates,
        }
    }

    /// A call of `class` that held an admission permit ran `micros` in the service: keep the
    /// sample, then give the permit back.
    #[inline]
    pub(crate) fn release_permit(&self, class: usize, micros: Option<u64>) {
        let l = usize::from(self.class_limiter[class]);
        if let Some(m) = micros {
            // A load and a store, not a locked add: two threads on one shard racing here lose
            // a sample, and the tick taking the sum in between sees one twice; either moves
            // the sum and the count together, and the limit only reads their ratio.
            let c = &self.samples[l].0;
            c.store(
                c.load(Relaxed).wrapping_add(crate::admit::sample(m)),
                Relaxed,
            );
        }
        self.limiters[l].give_back();
    }

    /// Take this shard's samples of `limiter` since the last call.
    pub(crate) fn take_samples(&self, limiter: usize) -> u64 {
        self.samples[limiter].0.swap(0, Relaxed)
    }

    /// Give a half-open probe permit of `class` back (its call was cancelled).
    #[cold]
    pub(crate) fn release_probe(&self, class: usize) {
        self.gates[class].release_probe();
    }

    /// The tier of `class` (for priority propagation).
    pub(crate) fn tier(&self, class: usize) -> crate::class::Tier {
        self.gates[class].tier
    }

    /// How a call of `class` that its caller dropped after `latency` ended: a timeout once it
    /// has run past the class's abandon threshold, a cancellation before.
    pub(crate) fn abandoned(&self, class: usize, latency: Duration) -> Outcome {
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        if micros > self.abandon_micros[class] {
            Outcome::Timeout
        } else {
            Outcome::Cancelled
        }
    }

    /// The name of `class` (cold paths only: it clones an `Arc`).
    pub(crate) fn name(&self, class: usize) -> std::sync::Arc<str> {
        self.names[class].clone()
    }

    /// A call of `class` queued for `wait` before it ran (cold: only calls that waited).
    #[cold]
    pub(crate) fn queued(&self, class: usize, wait: Duration) {
        let c = &self.classes[class];
        c.queued.fetch_add(1, Relaxed);
        c.queued_micros
            .fetch_add(u64::try_from(wait.as_micros()).unwrap_or(u64::MAX), Relaxed);
    }

    /// A call of `class` started.
    #[inline]
    pub(crate) fn begin(&self, class: usize) {
        self.classes[class].inflight.fetch_add(1, Relaxed);
    }

    /// A call of `class` that was counted by [`Shard::begin`] ended.
    #[inline]
    pub(crate) fn end(&self, class: usize, outcome: Outcome, latency: Duration) {
        let c = &self.classes[class];
        c.inflight.fetch_sub(1, Relaxed);
        self.record(class, outcome, latency);
    }

    /// Count an outcome; calls that reached the service (completed or abandoned) also record
    /// their latency.
    #[inline]
    pub(crate) fn record(&self, class: usize, outcome: Outcome, latency: Duration) {
        self.count(class, outcome);
        if outcome.has_latency() {
            self.sample(class, latency);
        }
    }

    /// A call of `class` counted by [`Shard::begin`] was answered after `latency`: its
    /// response head came back, its outcome waits for the end of the stream
    /// ([`Shard::count`]).
    #[inline]
    pub(crate) fn answered(&self, class: usize, latency: Duration) {
        self.classes[class].inflight.fetch_sub(1, Relaxed);
        self.sample(class, latency);
    }

    /// Count an outcome of `class`, without a latency.
    #[inline]
    pub(crate) fn count(&self, class: usize, outcome: Outcome) {
        self.classes[class].outcomes[outcome.index()].fetch_add(1, Relaxed);
    }

    /// A latency sample of `class`.
    #[inline]
    fn sample(&self, class: usize, latency: Duration) {
        let c = &self.classes[class];
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        c.hist[histogram::bucket_of(micros)].fetch_add(1, Relaxed);
        if micros > c.max_micros.load(Relaxed) {
            c.max_micros.fetch_max(micros, Relaxed);
        }
    }
}

/// The shard index of the current thread, assigned round-robin on first use.
#[inline]
pub(crate) fn shard_index(mask: usize) -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static INDEX: Cell<usize> = const { Cell::new(usize::MAX) };
    }
    INDEX.with(|i| {
        let mut v = i.get();
        if v == usize::MAX {
            v = NEXT.fetch_add(1, Relaxed);
            i.set(v);
        }
        v & mask
    })
}

/// The number of shards for this machine: twice the parallelism, a power of two, at most 64.
pub(crate) fn shard_count() -> usize {
    let cores = std::thread::available_parallelism().map_or(4, |n| n.get());
    (cores * 2).next_power_of_two().clamp(2, 64)
}
