//! Per-thread shards of cache-padded counters: the data path's only writes.

use std::cell::Cell;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

use super::Outcome;
use super::histogram::{self, BUCKETS};

/// How many start slots a class's calls in flight are counted in ([`Slots`]).
pub(crate) const SLOTS: usize = 64;

/// Counters of one class within one shard.
#[repr(align(128))]
pub(crate) struct ClassCounters {
    pub(super) outcomes: [AtomicU64; 6],
    /// Calls in flight by the slot of the latency clock they started in (slot mod
    /// [`SLOTS`]), so the control tick can tell how long they have been running. Wrapping.
    pub(super) slots: [AtomicU64; SLOTS],
    /// Calls that ended after their slot was retired by the reader (see [`Slots`]), as a
    /// wrapping decrement.
    pub(super) retired_ends: AtomicU64,
    pub(super) max_micros: AtomicU64,
    /// Calls that queued before they ran (for readiness or a policy's delay), and the sum of
    /// their waits in µs.
    pub(super) queued: AtomicU64,
    pub(super) queued_micros: AtomicU64,
    /// Calls admission turned away (overload), also counted in their outcome.
    pub(super) overloaded: AtomicU64,
    pub(super) hist: [AtomicU32; BUCKETS],
}

impl ClassCounters {
    fn new() -> Self {
        Self {
            outcomes: Default::default(),
            slots: [const { AtomicU64::new(0) }; SLOTS],
            retired_ends: AtomicU64::new(0),
            max_micros: AtomicU64::new(0),
            queued: AtomicU64::new(0),
            queued_micros: AtomicU64::new(0),
            overloaded: AtomicU64::new(0),
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
    service: std::sync::Arc<str>,
    names: std::sync::Arc<[std::sync::Arc<str>]>,
    /// Per class, how long (µs) a call may run before its caller abandoning it counts as a
    /// timeout (`u64::MAX`: never).
    abandon_micros: std::sync::Arc<[u64]>,
    pub(crate) timer: crate::clock::Timer,
    /// Per class, how its calls in flight are counted by start slot.
    pub(crate) slot_of: std::sync::Arc<[Slots]>,
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
    #[expect(
        clippy::too_many_arguments,
        reason = "built in one place, from the degrader's per-class arrays"
    )]
    pub(crate) fn new(
        service: std::sync::Arc<str>,
        names: std::sync::Arc<[std::sync::Arc<str>]>,
        abandon_micros: std::sync::Arc<[u64]>,
        timer: crate::clock::Timer,
        slot_of: std::sync::Arc<[Slots]>,
        limiters: std::sync::Arc<[crate::admit::Limiter]>,
        class_limiter: std::sync::Arc<[u8]>,
        gates: std::sync::Arc<[crate::gate::Gate]>,
    ) -> Self {
        Self {
            slot_of,
            classes: (0..names.len()).map(|_| ClassCounters::new()).collect(),
            service,
            names,
            abandon_micros,
            timer,
            limiters: limiters.clone(),
            class_limiter,
            samples: limiters.iter().map(|_| Padded::default()).collect(),
            gates,
        }
    }

    /// A call of `class` that held an admission permit (taken as tier rank `rank`) ran
    /// `micros` in the service: keep the sample, then give the permit back.
    #[inline]
    pub(crate) fn release_permit(&self, class: usize, rank: u8, micros: Option<u64>) {
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
        self.limiters[l].give_back(rank);
    }

    /// A call of `class` holding a permit was given up on before it finished (see
    /// [`Limiter::abandoned`](crate::admit::Limiter::abandoned)).
    #[cold]
    pub(crate) fn abandoned_permit(&self, class: usize) {
        self.limiters[usize::from(self.class_limiter[class])].abandoned();
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

    /// Whether `latency` is within the SLA of `class`.
    pub(crate) fn within_sla(&self, class: usize, latency: Duration) -> bool {
        self.gates[class].within_sla(latency)
    }

    /// A half-open probe of `class` finished after `latency`, served (`ok`) or not.
    #[cold]
    pub(crate) fn probe_done(&self, class: usize, ok: bool, latency: Duration) {
        self.gates[class].probe_done(ok, latency);
    }

    /// The fallback route `class` is configured with (cold paths only).
    #[cfg(feature = "fallback")]
    pub(crate) fn route(&self, class: usize) -> crate::class::Route {
        self.gates[class].route
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

    /// The degrader's service name (cold paths only: it clones an `Arc`).
    pub(crate) fn service(&self) -> std::sync::Arc<str> {
        self.service.clone()
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

    /// A call of `class` started at `start` (a stamp of the shard's timer).
    #[inline]
    pub(crate) fn begin(&self, class: usize, start: u64) {
        let i = self.slot_of[class].index(start);
        self.classes[class].slots[i].fetch_add(1, Relaxed);
    }

    /// A call of `class` counted by [`Shard::begin`] at `start` is no longer in flight, after
    /// running `ran`.
    #[inline]
    fn leave(&self, class: usize, start: u64, ran: Duration) {
        let slots = &self.slot_of[class];
        let c = &self.classes[class];
        if ran >= slots.retired_after {
            c.retired_ends.fetch_sub(1, Relaxed);
        } else {
            c.slots[slots.index(start)].fetch_sub(1, Relaxed);
        }
    }

    /// A call started again at `to` instead of `from` (after a policy's delay).
    #[cold]
    pub(crate) fn moved(&self, class: usize, from: u64, to: u64) {
        let slots = &self.slot_of[class];
        let c = &self.classes[class];
        c.slots[slots.index(from)].fetch_sub(1, Relaxed);
        c.slots[slots.index(to)].fetch_add(1, Relaxed);
    }

    /// A call of `class` that was counted by [`Shard::begin`] at `start` ended after running
    /// `ran`, with `latency` (its wait included).
    #[inline]
    pub(crate) fn end(
        &self,
        class: usize,
        start: u64,
        ran: Duration,
        outcome: Outcome,
        latency: Duration,
    ) {
        self.leave(class, start, ran);
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
    pub(crate) fn answered(&self, class: usize, start: u64, ran: Duration, latency: Duration) {
        self.leave(class, start, ran);
        self.sample(class, latency);
    }

    /// A call of `class` admission turned away (its outcome is counted apart).
    #[inline]
    pub(crate) fn overloaded(&self, class: usize) {
        self.classes[class].overloaded.fetch_add(1, Relaxed);
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

/// How a class's calls in flight are counted by the slot of the latency clock they started
/// in, so that the control tick knows how long they have run without visiting them: a slot
/// is `2^shift` timer units (a power of two at least a fifteenth of the tick, and at least a
/// twenty-ninth of the class's abandon threshold), and the last [`SLOTS`] slots each have a
/// counter. A call that has run for `retired_after` or longer has had its slot retired by the
/// reader (its count moved to a total of old calls, so that the counter can serve a new slot)
/// or is about to: it is taken off that total instead. Either way round, a call counted in one
/// place and taken off the other is squared when its slot is next retired.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Slots {
    pub(crate) shift: u32,
    /// One slot's length.
    pub(crate) width: Duration,
    pub(crate) retired_after: Duration,
}

impl Slots {
    /// The slots of a class with abandon threshold `abandon` (`None`: never) on a control
    /// loop ticking every `period`, timed by `timer`.
    pub(crate) fn new(
        timer: &crate::clock::Timer,
        period: Duration,
        abandon: Option<Duration>,
    ) -> Self {
        let want = (period / 15).max(abandon.map_or(Duration::ZERO, |a| a / 29));
        let want = want.max(Duration::from_micros(100));
        let mut shift = 0;
        while shift < 62 && timer.delta(0, 1 << shift) < want {
            shift += 1;
        }
        let width = timer.delta(0, 1 << shift).max(Duration::from_nanos(1));
        let retired_after =
            width * u32::try_from(Self::retire_age(width, period)).unwrap_or(u32::MAX);
        Self {
            shift,
            width,
            retired_after,
        }
    }

    /// The slot counter of a call started at `stamp`.
    #[inline]
    pub(crate) fn index(&self, stamp: u64) -> usize {
        (stamp >> self.shift) as usize % SLOTS
    }

    /// The slot of `stamp`.
    pub(crate) fn slot(&self, stamp: u64) -> u64 {
        stamp >> self.shift
    }

    /// How many slots old a slot is when the reader retires it: as old as can be while the
    /// slots started between two reads (a tick, and two more) still have counters of their own.
    pub(crate) fn retire_age(width: Duration, period: Duration) -> u64 {
        let per_read = period.as_nanos().div_ceil(width.as_nanos().max(1)) as u64;
        (SLOTS as u64 - 1).saturating_sub(per_read + 2).max(2)
    }
}
