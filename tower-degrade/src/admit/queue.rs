//! One concurrency limiter: permits, and the queue of calls waiting for one.
//!
//! The uncontended path is one load (nobody waits) and one `fetch_add` (a permit is free); it
//! takes no lock. Only a call that finds the limit reached takes the queue's lock, to wait in
//! priority order; a permit given back while calls wait is handed to the best of them.
//!
//! The queue order alone is not priority when calls run longer than a tier may wait: gold's
//! waiters give up after 50 ms, bronze's wait up to 1 s, so the permits that come free after
//! gold gave up go to bronze, and a burst of gold and bronze ends with bronze served and gold
//! turned away. So a tier that turned calls away for want of a permit *reserves* permits: at
//! each tick, the concurrency its turned-away calls would have needed (Little's law: calls x
//! latency / tick) is added to its reservation, up to the limit, and lower tiers take a permit
//! only while the permits in use, plus the part of each reservation above them its tier's
//! calls do not hold, stay below the limit: a reserving tier keeps the greater of its
//! reservation and what its calls hold, not both. (The limit less the reservations above is
//! each tier's ceiling, read on the uncontended path; the reservations' unheld parts are
//! added up only by a call that finds its ceiling reached.) A reservation is held for
//! [`RESERVE_HOLD_TICKS`] ticks after the tier last turned a call away, then halves every
//! tick; and a tick in which the tier turned nothing away and used less than half of it (its
//! traffic fell, its breaker opened) leaves it at twice what the tier used: permits are kept
//! idle for a tier's next calls, not for calls that stopped coming.
//! Only while a tier holds a reservation do its calls count what they take: the uncontended
//! path reads one relaxed flag more, and adds one relaxed `fetch_add` while it is set.
//!
//! A reservation only holds back permits that come free: calls of lower tiers that took
//! permits before it was made keep them until they end, and calls that run long (slow
//! uploads, a hung dependency) would starve the tier above for as long as they run. So a
//! tier below its reservation may take a permit past the limit while the tiers below it hold
//! more than the reservations above them leave them (Netflix concurrency-limits'
//! partitioned limiter lets a partition under its guaranteed share in the same way): the
//! limit is overdrawn by at most the reservation, and the lower tiers, over their ceiling,
//! take no permit until their calls have ended and the count is back under it. Each tier's
//! permits in use are counted for this (one relaxed `fetch_add` when a permit is taken, one
//! `fetch_sub` when it is given back).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering::*};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use super::limit::{Gradient, LimitConfig, Sample};
use crate::class::Tier;

/// A slot's state starts at 0: waiting.
const GRANTED: u8 = 1;
const SHED: u8 = 2;

/// Ticks a tier's reservation is held after the tier last turned a call away (4 s at the
/// default 500 ms tick); then it halves every tick.
pub(crate) const RESERVE_HOLD_TICKS: u32 = 8;

/// `samples`: the call count in the top 24 bits, the summed µs in the low 40.
const MICROS_BITS: u32 = 40;
const MICROS_MASK: u64 = (1 << MICROS_BITS) - 1;

/// One latency sample (a call that ran `micros` in the service), packed so that samples add up
/// with one `fetch_add`: the count in the top 24 bits, the µs in the low 40.
#[inline]
pub(crate) fn sample(micros: u64) -> u64 {
    (1 << MICROS_BITS) | micros.min(MICROS_MASK)
}

/// Where a waiting call stands in the queue: the higher the key, the sooner it is served.
///
/// Tier first, then the class's dynamic score, then the user's bucket (a stable hash of the
/// user key, so one user's calls are treated alike), then age (older first).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Key {
    rank: u8,
    score: u16,
    user: u16,
    age: std::cmp::Reverse<u64>,
}

impl Key {
    /// The least key of tier rank `rank`: every waiting call of the rank is above it.
    fn lowest(rank: u8) -> Self {
        Self {
            rank,
            score: 0,
            user: 0,
            age: std::cmp::Reverse(u64::MAX),
        }
    }
}

/// A waiting call's priority.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Priority {
    pub(crate) tier: Tier,
    pub(crate) score: u16,
    pub(crate) user: u16,
}

pub(crate) fn rank(tier: Tier) -> u8 {
    match tier {
        Tier::Gold => 2,
        Tier::Silver => 1,
        Tier::Bronze => 0,
    }
}

/// The slot a waiting call watches.
#[derive(Debug, Default)]
pub(crate) struct Slot {
    state: AtomicU8,
    waker: Mutex<Option<Waker>>,
}

impl Slot {
    fn settle(&self, state: u8) {
        self.state.store(state, Release);
        let waker = self.waker.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(w) = waker {
            w.wake();
        }
    }
}

/// A call in the queue.
#[derive(Debug)]
pub(crate) struct Waiter {
    slot: Arc<Slot>,
    key: Key,
}

/// How a waiting call's wait ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WaitEnd {
    /// It holds a permit.
    Granted,
    /// It was pushed out of the queue by a more important call.
    Shed,
}

impl Waiter {
    /// The tier rank it waits as: a permit granted to it is given back with this rank.
    pub(crate) fn rank(&self) -> u8 {
        self.key.rank
    }

    pub(crate) fn poll(&self, cx: &mut Context<'_>) -> Poll<WaitEnd> {
        let check = |s: &Slot| match s.state.load(Acquire) {
            GRANTED => Some(WaitEnd::Granted),
            SHED => Some(WaitEnd::Shed),
            _ => None,
        };
        if let Some(end) = check(&self.slot) {
            return Poll::Ready(end);
        }
        *self.slot.waker.lock().unwrap_or_else(|e| e.into_inner()) = Some(cx.waker().clone());
        match check(&self.slot) {
            Some(end) => Poll::Ready(end),
            None => Poll::Pending,
        }
    }
}

/// What [`Limiter::enqueue`] did with a call that found no free permit.
#[derive(Debug)]
pub(crate) enum Enqueued {
    /// A permit was free after all: it holds it.
    Admitted,
    /// It waits in the queue.
    Queued(Waiter),
    /// Its tier's queue is full of calls that matter at least as much: not admitted.
    Shed,
}

#[derive(Debug, Default)]
struct Queue {
    entries: BTreeMap<Key, Arc<Slot>>,
    per_rank: [u32; 3],
    next: u64,
}

/// What the control loop reports of a limiter after its tick.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct LimiterState {
    /// `service`, or the dependency the limiter is for.
    pub name: Arc<str>,
    /// The concurrency limit now.
    pub limit: u32,
    /// Calls holding a permit: above `limit` while a tier takes the permits it reserved
    /// past it (lower tiers' long calls hold theirs, `docs/admission.md`).
    pub inflight: u32,
    /// Calls waiting for one.
    pub waiting: u32,
    /// The latency in the service without queueing, as estimated (µs).
    pub baseline_micros: Option<f64>,
}

/// A tier's reservation (`Limiter::tick`'s state).
#[derive(Debug, Default, Clone, Copy)]
struct Reserve {
    permits: u32,
    /// Ticks left before the reservation starts to decay.
    hold: u32,
}

/// A concurrency limiter (for the service, or for one dependency).
#[derive(Debug)]
pub(crate) struct Limiter {
    pub(crate) name: Arc<str>,
    limit: AtomicU32,
    /// Per tier rank: the permits in use below which a call of the rank takes one at once (the
    /// limit less what the tiers above reserve; past it, see `room`).
    ceiling: [AtomicU32; 3],
    /// Per tier rank: calls that left without a permit since the last tick.
    turned_away: [AtomicU32; 3],
    /// Per tier rank: whether it holds a reservation, and then the permits its calls took
    /// since the last tick.
    reserving: [AtomicBool; 3],
    admitted: [AtomicU32; 3],
    /// Per tier rank: the permits its calls hold.
    held: [AtomicU32; 3],
    /// Per tier rank: its reservation, the permits it may hold past the limit while the tiers
    /// below hold more than their ceilings (`overdraw`).
    reserved: [AtomicU32; 3],
    reserve: Mutex<[Reserve; 3]>,
    inflight: AtomicU32,
    waiting: AtomicU32,
    saturated: AtomicBool,
    samples: AtomicU64,
    /// Calls given a permit whose callers gave up on them before they finished (and before
    /// their class's abandon threshold), after longer in the service than they waited for the
    /// permit, since the last tick: no latency sample, but a sign.
    abandoned: AtomicU64,
    /// The mean latency in the service at the last tick with calls, µs.
    rtt_micros: AtomicU32,
    queue: Mutex<Queue>,
    gradient: Mutex<Gradient>,
}

impl Limiter {
    pub(crate) fn new(name: Arc<str>, cfg: LimitConfig) -> Self {
        let gradient = Gradient::new(cfg);
        let limit = gradient.limit();
        Self {
            name,
            limit: AtomicU32::new(limit),
            ceiling: std::array::from_fn(|_| AtomicU32::new(limit)),
            turned_away: Default::default(),
            reserving: Default::default(),
            admitted: Default::default(),
            held: Default::default(),
            reserved: Default::default(),
            reserve: Mutex::default(),
            inflight: AtomicU32::new(0),
            waiting: AtomicU32::new(0),
            saturated: AtomicBool::new(false),
            samples: AtomicU64::new(0),
            abandoned: AtomicU64::new(0),
            rtt_micros: AtomicU32::new(0),
            queue: Mutex::default(),
            gradient: Mutex::new(gradient),
        }
    }

    fn queue(&self) -> MutexGuard<'_, Queue> {
        // Every update of the queue leaves it consistent: keep serving after a poisoning panic.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Take a permit if one is free to a call of `tier` (under its ceiling, or not kept free
    /// for a reservation above it, see `room`; or one its tier reserved that lower tiers hold,
    /// see `overdraw`) and nobody waits for one. No lock. A permit taken is given back with
    /// [`give_back`](Self::give_back) and the same tier.
    #[inline]
    pub(crate) fn try_acquire(&self, tier: Tier) -> bool {
        if self.waiting.load(SeqCst) != 0 {
            return false;
        }
        let r = usize::from(rank(tier));
        let ceiling = self.ceiling[r].load(Relaxed);
        let inflight = self.inflight.fetch_add(1, SeqCst);
        if inflight < ceiling || self.room(r, inflight) {
            self.held[r].fetch_add(1, Relaxed);
        } else if !self.overdraw(r) {
            self.release_slot();
            return false;
        }
        if self.reserving[r].load(Relaxed) {
            self.admitted[r].fetch_add(1, Relaxed);
            // A dispatch between the two counts above read this permit as in use and not
            // yet held, so as kept free for the reservation as well: a waiter `room` admits
            // now would be left waiting for the next permit given back.
            if self.waiting.load(SeqCst) != 0 {
                self.dispatch();
            }
        }
        true
    }

    /// Whether a call of rank `r` that found `inflight` permits in use, its ceiling reached,
    /// may take one all the same: the ceiling keeps the whole of the reservations above `r`
    /// from it, but a reserving tier's own calls hold part of its reservation, and only the
    /// part they do not hold is kept free for them. So the permits in use plus the unheld
    /// part of each reservation above must stay under the limit: a tier holds the greater of
    /// its reservation and its calls, not both. Never for gold (nothing is reserved above it).
    #[cold]
    fn room(&self, r: usize, inflight: u32) -> bool {
        if r >= 2 {
            return false;
        }
        let unheld: u32 = (r + 1..3)
            .map(|a| {
                self.reserved[a]
                    .load(Relaxed)
                    .saturating_sub(self.held[a].load(Relaxed))
            })
            .sum();
        inflight.saturating_add(unheld) < self.limit.load(Relaxed)
    }

    /// Whether a call of rank `r` that found its ceiling reached takes a permit past it: its
    /// tier holds less than it reserved, and the tiers below hold more than the ceiling of the
    /// tier just below it (permits they took before the reservations above were made). Counts
    /// the permit as held by the tier when it does; the caller has counted it in flight.
    #[cold]
    fn overdraw(&self, r: usize) -> bool {
        if !self.below_over(r) {
            return false;
        }
        if self.held[r].fetch_add(1, Relaxed) < self.reserved[r].load(Relaxed) {
            return true;
        }
        self.held[r].fetch_sub(1, Relaxed);
        false
    }

    /// Whether the tiers below rank `r` hold more permits than the ceiling of the tier just
    /// below it: permits the reservations of `r` and above keep from them, taken before the
    /// reservations were made (or the limit fell), by calls still running. Never for bronze.
    fn below_over(&self, r: usize) -> bool {
        r > 0
            && self.held[..r].iter().map(|h| h.load(Relaxed)).sum::<u32>()
                > self.ceiling[r - 1].load(Relaxed)
    }

    /// Give back a permit of a call of `tier` whose call finished after `micros` in the
    /// service (the data path keeps its samples in the thread's shard instead, see [`sample`]).
    #[cfg(test)]
    pub(crate) fn release(&self, tier: Tier, micros: u64) {
        self.samples.fetch_add(sample(micros), Relaxed);
        self.give_back(rank(tier));
    }

    /// A call holding a permit was given up on by its caller before it finished (before its
    /// class's abandon threshold: no latency sample), after longer in the service than it
    /// waited for the permit. Counted for the next tick.
    #[cold]
    pub(crate) fn abandoned(&self) {
        self.abandoned.fetch_add(1, Relaxed);
    }

    /// Give back a permit a call of tier rank `r` held, without a latency sample (the call
    /// never ran, or was abandoned).
    #[inline]
    pub(crate) fn give_back(&self, r: u8) {
        let held = self.held[usize::from(r)].fetch_sub(1, Relaxed);
        debug_assert!(
            held > 0,
            "a permit given back as another tier than it was taken as"
        );
        self.release_slot();
    }

    /// One call fewer in flight; the best waiter takes its permit.
    #[inline]
    fn release_slot(&self) {
        self.inflight.fetch_sub(1, SeqCst);
        if self.waiting.load(SeqCst) != 0 {
            self.dispatch();
        }
    }

    #[cold]
    fn dispatch(&self) {
        let mut q = self.queue();
        self.dispatch_locked(&mut q);
    }

    fn dispatch_locked(&self, q: &mut Queue) {
        while let Some(key) = self.next_grant(q) {
            let slot = q.entries.remove(&key).expect("a waiting call's key");
            let r = usize::from(key.rank);
            q.per_rank[r] -= 1;
            self.admitted[r].fetch_add(1, Relaxed);
            self.inflight.fetch_add(1, SeqCst);
            self.waiting.fetch_sub(1, SeqCst);
            slot.settle(GRANTED);
        }
    }

    /// The waiting call to hand a permit to now, if any (its permit counted as its tier's):
    /// the best one, if the permits in use are under its ceiling or `room` lets it in (both
    /// are true of a tier whenever they are of a tier below it). Ceilings fall with the
    /// tier, so the permits left reserved for the tiers above it are above every other
    /// waiter too; but a tier under its own reservation may overdraw (`overdraw`) whatever
    /// the tiers above it wait for, so the best waiter of each tier is asked that.
    fn next_grant(&self, q: &Queue) -> Option<Key> {
        let (&best, _) = q.entries.last_key_value()?;
        let top = best.rank;
        let inflight = self.inflight.load(SeqCst);
        if inflight < self.ceiling[usize::from(top)].load(Relaxed)
            || self.room(usize::from(top), inflight)
        {
            self.held[usize::from(top)].fetch_add(1, Relaxed);
            return Some(best);
        }
        (1..=top).rev().find_map(|rank| {
            let (&key, _) = q
                .entries
                .range(Key::lowest(rank)..Key::lowest(rank + 1))
                .next_back()?;
            self.overdraw(usize::from(rank)).then_some(key)
        })
    }

    /// Queue a call that found no free permit. `burst` is its tier's burst tolerance and
    /// `bound` its class's wait bound: the tier may hold `(burst - 1) * limit` calls waiting
    /// (at least one), or as many as the permits serve within `bound` at the last tick's
    /// latency, whichever is more.
    #[cold]
    pub(crate) fn enqueue(&self, p: Priority, burst: f64, bound: Duration) -> Enqueued {
        let limit = self.limit.load(Relaxed);
        // Waiting for a permit reserved for another tier is not the limit reached: it tells
        // the gradient nothing of the capacity.
        if self.inflight.load(SeqCst) >= limit {
            self.saturated.store(true, Relaxed);
        }
        let mut q = self.queue();
        let burst_cap = ((burst - 1.0).max(0.0) * f64::from(limit)).ceil().max(1.0) as u32;
        // Little's law: `limit` permits each held `rtt` serve `limit * bound / rtt` calls within
        // the wait bound; a queue that long is still served in time, whatever the burst.
        let rtt = u64::from(self.rtt_micros.load(Relaxed));
        let in_time = if rtt == 0 {
            0
        } else {
            (u128::from(limit) * bound.as_micros() / u128::from(rtt)).min(u128::from(u32::MAX))
                as u32
        };
        let cap = burst_cap.max(in_time);
        q.next += 1;
        let key = Key {
            rank: rank(p.tier),
            score: p.score,
            user: p.user,
            age: std::cmp::Reverse(q.next),
        };
        let r = usize::from(key.rank);
        if q.per_rank[r] >= cap {
            // The tier's queue is full: the least important call of the tier leaves it, this
            // one or the one at its tail.
            let tail = q
                .entries
                .range(Key::lowest(key.rank)..)
                .next()
                .map(|(k, _)| *k);
            match tail {
                Some(t) if t.rank == key.rank && t < key => {
                    let slot = q.entries.remove(&t).expect("just found");
                    q.per_rank[r] -= 1;
                    self.waiting.fetch_sub(1, SeqCst);
                    slot.settle(SHED);
                }
                _ => {
                    self.turned_away[r].fetch_add(1, Relaxed);
                    return Enqueued::Shed;
                }
            }
            self.turned_away[r].fetch_add(1, Relaxed);
        }
        let slot = Arc::new(Slot::default());
        q.entries.insert(key, slot.clone());
        q.per_rank[r] += 1;
        self.waiting.fetch_add(1, SeqCst);
        // A permit may have come free since the fast path looked: hand it out (best first).
        self.dispatch_locked(&mut q);
        if slot.state.load(Acquire) == GRANTED {
            Enqueued::Admitted
        } else {
            Enqueued::Queued(Waiter { slot, key })
        }
    }

    /// A waiting call gives up (its wait bound passed, or its caller dropped it). Returns
    /// whether it holds a permit after all (granted meanwhile): the caller must use it or
    /// give it back (with [`Waiter::rank`]).
    pub(crate) fn leave(&self, w: &Waiter) -> bool {
        let mut q = self.queue();
        if q.entries.remove(&w.key).is_some() {
            q.per_rank[usize::from(w.key.rank)] -= 1;
            self.turned_away[usize::from(w.key.rank)].fetch_add(1, Relaxed);
            self.waiting.fetch_sub(1, SeqCst);
            w.slot.state.store(SHED, Release);
            // A waiter of a lower tier that may overdraw was behind it.
            self.dispatch_locked(&mut q);
            return false;
        }
        w.slot.state.load(Acquire) == GRANTED
    }

    /// The control tick: update the limit from what the tick measured and the tiers'
    /// reservations from the calls they turned away over `period`, and admit waiting calls if
    /// that freed permits.
    /// `shard_samples`: the sum of the shards' [`sample`]s since the last tick.
    pub(crate) fn tick(
        &self,
        pressure: bool,
        shard_samples: u64,
        period: Duration,
    ) -> LimiterState {
        let s = self.samples.swap(0, Relaxed).wrapping_add(shard_samples);
        let sample = Sample {
            calls: s >> MICROS_BITS,
            micros: s & MICROS_MASK,
            saturated: self.saturated.swap(false, Relaxed),
            abandoned: self.abandoned.swap(0, Relaxed),
            pressure,
            period_micros: u64::try_from(period.as_micros()).unwrap_or(u64::MAX),
        };
        if let Some(rtt) = sample.micros.checked_div(sample.calls) {
            self.rtt_micros
                .store(rtt.min(u64::from(u32::MAX)) as u32, Relaxed);
        }
        let (limit, baseline) = {
            let mut g = self.gradient.lock().unwrap_or_else(|e| e.into_inner());
            (g.update(sample), g.baseline())
        };
        self.limit.store(limit, Relaxed);
        let rtt = u64::from(self.rtt_micros.load(Relaxed));
        let opened = self.reserve_for(limit, rtt, period);
        if opened && self.waiting.load(SeqCst) != 0 {
            self.dispatch();
        }
        LimiterState {
            name: self.name.clone(),
            limit,
            inflight: self.inflight.load(Relaxed),
            waiting: self.waiting.load(Relaxed),
            baseline_micros: baseline,
        }
    }

    /// Update each tier's reservation from the calls it turned away since the last tick
    /// (the concurrency they would have needed, by Little's law: calls x `rtt_micros` over
    /// `period`; each call one permit while no latency was measured yet), and the ceilings
    /// from them. Returns whether a ceiling or a reservation rose (waiters may be admitted
    /// now).
    fn reserve_for(&self, limit: u32, rtt_micros: u64, period: Duration) -> bool {
        let mut reserve = self.reserve.lock().unwrap_or_else(|e| e.into_inner());
        let period = period.as_micros().max(1) as u64;
        // The concurrency `calls` of a tick's latency needed over the tick (Little's law; a
        // permit each while no latency was measured).
        let mut opened = false;
        let concurrency = |calls: u64| {
            let c = if rtt_micros == 0 {
                calls
            } else {
                (calls * rtt_micros).div_ceil(period)
            };
            u32::try_from(c).unwrap_or(u32::MAX)
        };
        for (r, res) in reserve.iter_mut().enumerate() {
            let away = u64::from(self.turned_away[r].swap(0, Relaxed));
            let used = concurrency(u64::from(self.admitted[r].swap(0, Relaxed)));
            if away > 0 {
                res.permits = res
                    .permits
                    .saturating_add(concurrency(away).max(1))
                    .min(limit);
                res.hold = RESERVE_HOLD_TICKS;
            } else if self.below_over(r) {
                // The tiers below still hold what its reservation keeps from them, and
                // overdrawing it is what keeps the tier from turning calls away (a call that
                // comes once every few seconds too, a health check): held as it is, not cut
                // to what the tick used nor decayed.
                res.permits = res.permits.min(limit);
                res.hold = RESERVE_HOLD_TICKS;
            } else {
                // Nothing turned away: the tier needed at most what it used.
                res.permits = res.permits.min(limit).min(used.saturating_mul(2));
                if res.hold > 0 {
                    res.hold -= 1;
                } else {
                    res.permits /= 2;
                }
            }
            self.reserving[r].store(res.permits > 0, Relaxed);
            // A tier whose reservation grew may overdraw for its waiters (bronze never does).
            opened |= self.reserved[r].swap(res.permits, Relaxed) < res.permits && r > 0;
        }
        let mut above = 0u32;
        for r in (0..3).rev() {
            let ceiling = limit.saturating_sub(above);
            opened |= self.ceiling[r].swap(ceiling, Relaxed) < ceiling;
            above = above.saturating_add(reserve[r].permits);
        }
        opened
    }

    /// The limiter now (without the baseline, which the control loop owns).
    pub(crate) fn state(&self) -> LimiterState {
        LimiterState {
            name: self.name.clone(),
            limit: self.limit.load(Relaxed),
            inflight: self.inflight.load(Relaxed),
            waiting: self.waiting.load(Relaxed),
            baseline_micros: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Wake;

    const TICK: Duration = Duration::from_millis(500);

    fn limiter(limit: u32) -> Limiter {
        Limiter::new(
            Arc::from("svc"),
            LimitConfig {
                initial: limit,
                min: 1,
                ..LimitConfig::default()
            },
        )
    }

    fn prio(tier: Tier, user: u16) -> Priority {
        Priority {
            tier,
            score: 0,
            user,
        }
    }

    struct Flag(AtomicBool);
    impl Wake for Flag {
        fn wake(self: Arc<Self>) {
            self.0.store(true, SeqCst);
        }
    }

    fn queued(e: Enqueued) -> Waiter {
        match e {
            Enqueued::Queued(w) => w,
            other => panic!("expected to wait, got {other:?}"),
        }
    }

    fn poll(w: &Waiter) -> Poll<WaitEnd> {
        let flag = Arc::new(Flag(AtomicBool::new(false)));
        w.poll(&mut Context::from_waker(&Waker::from(flag)))
    }

    #[test]
    fn permits_up_to_the_limit_then_the_queue_in_tier_order() {
        let l = limiter(2);
        assert!(l.try_acquire(Tier::Gold) && l.try_acquire(Tier::Gold));
        assert!(!l.try_acquire(Tier::Gold));
        let bronze = queued(l.enqueue(prio(Tier::Bronze, 0), 3.0, Duration::ZERO));
        let gold = queued(l.enqueue(prio(Tier::Gold, 0), 3.0, Duration::ZERO));
        // Someone queues: the fast path stays shut even when a permit comes free.
        assert!(!l.try_acquire(Tier::Gold));
        assert!(poll(&gold).is_pending());
        l.release(Tier::Gold, 1_000);
        assert_eq!(poll(&gold), Poll::Ready(WaitEnd::Granted), "gold first");
        assert!(poll(&bronze).is_pending());
        l.release(Tier::Gold, 1_000);
        assert_eq!(poll(&bronze), Poll::Ready(WaitEnd::Granted));
        assert_eq!(l.state().inflight, 2);
        l.give_back(gold.rank());
        l.give_back(bronze.rank());
        assert_eq!(l.state().inflight, 0);
        assert!(
            l.try_acquire(Tier::Gold),
            "the fast path again once nobody waits"
        );
    }

    #[test]
    fn a_tier_that_turned_calls_away_reserves_permits_against_the_tiers_below() {
        let l = limiter(4);
        for _ in 0..4 {
            assert!(l.try_acquire(Tier::Bronze));
        }
        // Three gold calls give up waiting (calls take 300 ms, gold waits 50 ms).
        for _ in 0..3 {
            let g = queued(l.enqueue(prio(Tier::Gold, 0), 2.0, Duration::ZERO));
            assert!(!l.leave(&g));
        }
        // 3 calls x 300 ms over a 500 ms tick: 2 permits (rounded up) kept for gold, which
        // may overdraw them while bronze holds them.
        assert!(l.reserve_for(4, 300_000, TICK));
        for _ in 0..4 {
            l.give_back(rank(Tier::Bronze));
        }
        assert!(l.try_acquire(Tier::Bronze) && l.try_acquire(Tier::Silver));
        assert!(!l.try_acquire(Tier::Bronze), "the last 2 are gold's");
        assert!(!l.try_acquire(Tier::Silver));
        // A bronze call waits; a permit given back goes to gold, not to it.
        let bronze = queued(l.enqueue(prio(Tier::Bronze, 0), 2.0, Duration::ZERO));
        assert!(matches!(
            l.enqueue(prio(Tier::Gold, 0), 2.0, Duration::ZERO),
            Enqueued::Admitted
        ));
        assert!(poll(&bronze).is_pending());
        // Held for RESERVE_HOLD_TICKS ticks without gold turned away while gold uses it (a
        // call of 300 ms a tick: 1 permit), then halved a tick.
        for i in 0..RESERVE_HOLD_TICKS {
            if i > 0 {
                assert!(matches!(
                    l.enqueue(prio(Tier::Gold, 0), 2.0, Duration::ZERO),
                    Enqueued::Admitted
                ));
                l.give_back(rank(Tier::Gold));
            }
            assert!(!l.reserve_for(4, 300_000, TICK));
        }
        assert!(matches!(
            l.enqueue(prio(Tier::Gold, 0), 2.0, Duration::ZERO),
            Enqueued::Admitted
        ));
        l.give_back(rank(Tier::Gold));
        assert!(
            l.reserve_for(4, 300_000, TICK),
            "1 permit reserved: bronze's ceiling rose"
        );
        l.give_back(rank(Tier::Gold));
        assert_eq!(poll(&bronze), Poll::Ready(WaitEnd::Granted));
        assert!(l.reserve_for(4, 300_000, TICK), "none reserved");
        assert_eq!(l.ceiling[0].load(Relaxed), 4);
    }

    #[test]
    fn a_reserving_tiers_own_calls_hold_its_reservation_not_more() {
        let l = limiter(4);
        // Gold turned two calls away: 2 permits reserved (no latency measured yet).
        l.turned_away[usize::from(rank(Tier::Gold))].fetch_add(2, Relaxed);
        assert!(l.reserve_for(4, 0, TICK));
        assert_eq!(l.ceiling.each_ref().map(|c| c.load(Relaxed)), [2, 2, 4]);
        // Gold runs a call: one of its 2. The tiers below keep the other 2 permits, not 1.
        assert!(l.try_acquire(Tier::Gold));
        assert!(l.try_acquire(Tier::Bronze) && l.try_acquire(Tier::Silver));
        assert!(
            !l.try_acquire(Tier::Bronze) && !l.try_acquire(Tier::Silver),
            "gold's second permit is kept for it"
        );
        assert!(l.try_acquire(Tier::Gold));
        assert_eq!(l.state().inflight, 4);
        // A permit gold gives back is kept for gold, from the queue too.
        let bronze = queued(l.enqueue(prio(Tier::Bronze, 0), 2.0, Duration::ZERO));
        l.give_back(rank(Tier::Gold));
        assert!(poll(&bronze).is_pending());
        // One the tiers below give back is theirs again.
        l.give_back(rank(Tier::Silver));
        assert_eq!(poll(&bronze), Poll::Ready(WaitEnd::Granted));
        // And gold's second is there for gold.
        assert!(l.try_acquire(Tier::Gold));
        assert_eq!(l.state().inflight, 4);
    }

    #[test]
    fn bronze_leaves_free_the_unheld_part_of_every_reservation_above_it() {
        let l = limiter(6);
        l.turned_away[usize::from(rank(Tier::Gold))].fetch_add(2, Relaxed);
        l.turned_away[usize::from(rank(Tier::Silver))].fetch_add(1, Relaxed);
        assert!(l.reserve_for(6, 0, TICK));
        assert_eq!(l.ceiling.each_ref().map(|c| c.load(Relaxed)), [3, 4, 6]);
        // Gold and silver each run a call: bronze gets the 3 the reservations leave it.
        assert!(l.try_acquire(Tier::Gold) && l.try_acquire(Tier::Silver));
        for _ in 0..3 {
            assert!(l.try_acquire(Tier::Bronze));
        }
        assert!(!l.try_acquire(Tier::Bronze), "gold's second permit is free");
        assert!(l.try_acquire(Tier::Gold));
        // Past its reservation, gold waits for a permit like any tier.
        assert!(!l.try_acquire(Tier::Gold));
        assert_eq!(l.state().inflight, 6);
    }

    #[test]
    fn a_tier_under_its_reservation_overdraws_what_long_calls_below_it_hold() {
        let l = limiter(4);
        // Four slow bronze uploads hold every permit.
        for _ in 0..4 {
            assert!(l.try_acquire(Tier::Bronze));
        }
        // Gold finds none, and three gold calls give up waiting: nothing reserved yet.
        assert!(!l.try_acquire(Tier::Gold));
        for _ in 0..3 {
            let g = queued(l.enqueue(prio(Tier::Gold, 0), 2.0, Duration::ZERO));
            assert!(!l.leave(&g));
        }
        // 3 calls of 5 ms over a 500 ms tick: 1 permit reserved for gold.
        assert!(l.reserve_for(4, 5_000, TICK), "gold may overdraw now");
        assert!(
            l.try_acquire(Tier::Gold),
            "past the limit: bronze holds gold's permit"
        );
        assert_eq!(l.state().inflight, 5);
        assert!(!l.try_acquire(Tier::Gold), "no more than it reserved");
        assert!(!l.try_acquire(Tier::Silver), "silver reserved nothing");
        assert!(!l.try_acquire(Tier::Bronze));
        // From the queue too, and a bronze call waiting behind gets nothing while bronze
        // holds more than its ceiling.
        let bronze = queued(l.enqueue(prio(Tier::Bronze, 0), 2.0, Duration::ZERO));
        l.give_back(rank(Tier::Gold));
        assert!(matches!(
            l.enqueue(prio(Tier::Gold, 0), 2.0, Duration::ZERO),
            Enqueued::Admitted
        ));
        l.give_back(rank(Tier::Gold));
        assert!(
            poll(&bronze).is_pending(),
            "bronze holds 4, its ceiling is 3"
        );
        // The uploads end: bronze's ceiling is 3 again, and the waiting call gets one.
        for _ in 0..4 {
            l.give_back(rank(Tier::Bronze));
        }
        assert_eq!(poll(&bronze), Poll::Ready(WaitEnd::Granted));
        assert_eq!(l.state().inflight, 1);
        // Within their ceilings, the tiers below leave gold its permit: the limit holds.
        assert!(l.try_acquire(Tier::Bronze) && l.try_acquire(Tier::Bronze));
        assert!(!l.try_acquire(Tier::Bronze), "bronze's ceiling");
        assert!(l.try_acquire(Tier::Gold));
        assert!(
            !l.try_acquire(Tier::Gold),
            "at the limit, nothing held for gold below"
        );
        assert_eq!(l.state().inflight, 4);
    }

    #[test]
    fn a_lower_tier_overdraws_its_own_reservation_behind_a_waiter_above_it() {
        let l = limiter(4);
        for _ in 0..4 {
            assert!(l.try_acquire(Tier::Bronze));
        }
        // Gold and silver each turned a call away: a permit each (no latency measured yet).
        l.turned_away[usize::from(rank(Tier::Gold))].fetch_add(1, Relaxed);
        l.turned_away[usize::from(rank(Tier::Silver))].fetch_add(1, Relaxed);
        assert!(l.reserve_for(4, 0, TICK));
        assert_eq!(l.ceiling.each_ref().map(|c| c.load(Relaxed)), [2, 3, 4]);
        assert!(
            l.try_acquire(Tier::Gold),
            "gold's reserved permit, past the limit"
        );
        let gold = queued(l.enqueue(prio(Tier::Gold, 0), 2.0, Duration::ZERO));
        // Gold holds its reservation and waits; silver, behind it, takes its own.
        assert!(matches!(
            l.enqueue(prio(Tier::Silver, 0), 1.5, Duration::ZERO),
            Enqueued::Admitted
        ));
        assert!(poll(&gold).is_pending());
        assert_eq!(l.state().inflight, 6);
        assert!(matches!(
            l.enqueue(prio(Tier::Silver, 0), 1.5, Duration::ZERO),
            Enqueued::Queued(_)
        ));
        assert!(!l.leave(&gold));
        assert_eq!(l.state().inflight, 6, "no more than each reserved");
    }

    #[test]
    fn reservations_add_up_while_a_tier_keeps_turning_calls_away() {
        let l = limiter(10);
        let turn_away = |tier, n| {
            for _ in 0..n {
                l.turned_away[usize::from(rank(tier))].fetch_add(1, Relaxed);
            }
        };
        turn_away(Tier::Gold, 2);
        turn_away(Tier::Silver, 5);
        // No latency measured yet: a permit per call.
        l.reserve_for(10, 0, TICK);
        let ceilings = || l.ceiling.each_ref().map(|c| c.load(Relaxed));
        assert_eq!(
            ceilings(),
            [3, 8, 10],
            "bronze below gold's 2 and silver's 5"
        );
        turn_away(Tier::Gold, 4);
        turn_away(Tier::Silver, 1);
        l.reserve_for(10, 500_000, TICK);
        assert_eq!(
            ceilings(),
            [0, 4, 10],
            "gold's 2 + 4: capped at the limit for bronze"
        );
        turn_away(Tier::Gold, 100);
        l.reserve_for(10, 500_000, TICK);
        assert_eq!(ceilings(), [0, 0, 10], "never more than the limit");
    }

    #[test]
    fn a_reservation_its_tier_stops_using_is_given_back_at_the_next_tick() {
        let l = limiter(10);
        // Silver turned 20 calls of 250 ms away: the whole limit is reserved for it.
        for _ in 0..20 {
            l.turned_away[usize::from(rank(Tier::Silver))].fetch_add(1, Relaxed);
        }
        l.reserve_for(10, 250_000, TICK);
        let ceilings = || l.ceiling.each_ref().map(|c| c.load(Relaxed));
        assert_eq!(ceilings(), [0, 10, 10]);
        // The peak is over: silver takes 4 permits of 250 ms in a tick (2 in use on average).
        for _ in 0..4 {
            assert!(l.try_acquire(Tier::Silver));
        }
        for _ in 0..4 {
            l.give_back(rank(Tier::Silver));
        }
        assert!(l.reserve_for(10, 250_000, TICK), "bronze's ceiling rose");
        assert_eq!(ceilings(), [6, 10, 10], "twice what silver used is kept");
        // Silver's breaker opens: it takes none, and keeps none.
        assert!(l.reserve_for(10, 250_000, TICK));
        assert_eq!(ceilings(), [10, 10, 10]);
    }

    #[test]
    fn a_tier_queues_what_the_permits_serve_within_its_wait_bound() {
        let l = Limiter::new(
            "db".into(),
            LimitConfig {
                initial: 4,
                ..LimitConfig::default()
            },
        );
        for _ in 0..4 {
            assert!(l.try_acquire(Tier::Gold));
        }
        // Gold's burst tolerance alone lets 4 calls wait (one limit's worth).
        for _ in 0..4 {
            queued(l.enqueue(prio(Tier::Gold, 0), 2.0, Duration::from_millis(200)));
        }
        assert!(matches!(
            l.enqueue(prio(Tier::Gold, 0), 2.0, Duration::from_millis(200)),
            Enqueued::Shed
        ));
        // Once calls take 40 ms, 4 permits serve 20 calls within 200 ms: 20 may wait.
        l.samples.fetch_add(sample(40_000) * 4, Relaxed);
        l.tick(false, 0, TICK);
        for _ in 4..20 {
            queued(l.enqueue(prio(Tier::Gold, 0), 2.0, Duration::from_millis(200)));
        }
        assert!(matches!(
            l.enqueue(prio(Tier::Gold, 0), 2.0, Duration::from_millis(200)),
            Enqueued::Shed
        ));
    }

    #[test]
    fn a_full_tier_sheds_its_least_important_user_first() {
        let l = limiter(1);
        assert!(l.try_acquire(Tier::Gold));
        // Bronze (burst 1.2) may queue ceil(0.2 * 1) = 1 call.
        let low = queued(l.enqueue(prio(Tier::Bronze, 10), 1.2, Duration::ZERO));
        let high = queued(l.enqueue(prio(Tier::Bronze, 200), 1.2, Duration::ZERO));
        assert_eq!(poll(&low), Poll::Ready(WaitEnd::Shed), "pushed out");
        assert!(matches!(
            l.enqueue(prio(Tier::Bronze, 5), 1.2, Duration::ZERO),
            Enqueued::Shed
        ));
        // Another tier has its own room.
        let gold = queued(l.enqueue(prio(Tier::Gold, 0), 2.0, Duration::ZERO));
        l.release(Tier::Gold, 1);
        assert_eq!(poll(&gold), Poll::Ready(WaitEnd::Granted));
        assert!(poll(&high).is_pending());
    }

    #[test]
    fn leaving_the_queue_frees_the_place_and_a_late_grant_is_reported() {
        let l = limiter(1);
        assert!(l.try_acquire(Tier::Gold));
        let w = queued(l.enqueue(prio(Tier::Silver, 0), 1.5, Duration::ZERO));
        assert!(!l.leave(&w), "still waiting: no permit");
        assert_eq!(l.waiting.load(SeqCst), 0);
        let w = queued(l.enqueue(prio(Tier::Silver, 0), 1.5, Duration::ZERO));
        l.release(Tier::Gold, 1);
        assert!(l.leave(&w), "granted before it left: it holds the permit");
        l.give_back(w.rank());
        assert_eq!(l.state().inflight, 0);
    }

    #[test]
    fn a_permit_freed_between_the_fast_path_and_the_queue_is_not_lost() {
        let l = limiter(1);
        assert!(l.try_acquire(Tier::Gold));
        // The holder finishes while nobody waits yet...
        l.release(Tier::Gold, 1);
        // ...and a call that saw the limit reached queues: it gets the permit at once.
        assert!(matches!(
            l.enqueue(prio(Tier::Bronze, 0), 1.2, Duration::ZERO),
            Enqueued::Admitted
        ));
        assert_eq!(l.state().inflight, 1);
    }

    #[test]
    fn a_tick_takes_the_samples_and_a_higher_limit_admits_waiters() {
        let l = limiter(1);
        assert!(l.try_acquire(Tier::Gold));
        let w = queued(l.enqueue(prio(Tier::Gold, 0), 2.0, Duration::ZERO));
        let busy_tick = || {
            for _ in 0..10 {
                l.samples.fetch_add((1 << MICROS_BITS) | 10_000, Relaxed);
            }
            l.saturated.store(true, Relaxed);
            l.tick(false, 0, TICK)
        };
        // Saturated, and latency holds: slow start grows the limit.
        let state = busy_tick();
        assert!(state.limit >= 2, "{state:?}");
        assert_eq!(poll(&w), Poll::Ready(WaitEnd::Granted));
        assert_eq!(l.samples.load(Relaxed), 0);
    }
}
