//! The [`FallbackWorker`]: replays `delayed_retry` tasks on their backoff schedule, backfills
//! the spool when a class is healthy and off-peak, and flushes merged batches.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use metrics::gauge;
use tokio::task::{JoinError, JoinSet};

use super::record::{Payload, Queue, Task, TaskId};
use super::replay::{Replay, Replayed};
use super::schedule::Backfill;
use super::shared::RouterShared;
use super::store::{Op, StoreError};
use crate::breaker::State;
use crate::degrader::Degrader;
use crate::every::{Every, LOG_EVERY};
use crate::gate::Directive;
use crate::window::{Outcome, shard_index};

/// What the worker may do with a class's due tasks now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gate {
    /// Replay them.
    Open,
    /// Replay one, as its breaker's probe.
    Probe,
    /// Keep them.
    Closed,
}

/// A permit of a class's admission limiter, held by a replay while it runs: a replay is a
/// call of its class and counts against the limit live calls are admitted under. Given back
/// when the replay ends (or is aborted).
struct Permit {
    degrader: Arc<crate::degrader::Shared>,
    limiter: usize,
    rank: u8,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.degrader.limiters[self.limiter].give_back(self.rank);
    }
}

/// A parked task: its id and, for a delayed retry, its deadline.
type Parked = (TaskId, Option<u64>);

/// A class's parked tasks in one queue, in the order they were parked, and the soonest
/// deadline among them (at most: a task given back early may have had it), so that a step
/// looks through them for deadlines passed only once one may have (every step did, and a
/// step comes with every kept call: 70,000 parked tasks slowed every class's calls).
#[derive(Debug, Default)]
struct ParkedTasks {
    tasks: std::collections::VecDeque<Parked>,
    soonest: Option<u64>,
}

impl ParkedTasks {
    fn push(&mut self, task: Parked) {
        if let Some(d) = task.1 {
            self.soonest = Some(self.soonest.map_or(d, |s| s.min(d)));
        }
        self.tasks.push_back(task);
    }
}

/// A class whose kept tasks' replays failed while its breaker let them go (closed, and no
/// live call failing to open it: a restart during an outage, a quiet class): its delayed
/// retries and backfill wait, and one task is replayed as a probe when `next_ms` comes, a
/// failure not counted against the task.
#[derive(Debug, Clone, Copy)]
struct Held {
    /// Replays failed in a row (the probes back off as a task's attempts would).
    failures: u32,
    /// When the next probe may start (the router's clock, ms).
    next_ms: u64,
}

/// The windows a class's live calls must have been served within for a failed replay to be
/// the task's own failure (10 ticks: 5 s at the default tick), not the class's.
const LIVE_EVIDENCE_TICKS: usize = 10;

/// How the worker runs, as the router's builder set it.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) backfill: Backfill,
    pub(crate) period: Duration,
    pub(crate) concurrency: usize,
    pub(crate) replay_timeout: Duration,
}

/// Replays what a [`FallbackRouter`](super::FallbackRouter) kept: spawn [`run`](Self::run).
///
/// Every `period` (or at once when a call is kept) it
/// 1. replays due `delayed_retry` tasks (up to `concurrency` at once) of classes that are
///    healthy (breaker closed, no policy diverting them; one task per tick as the breaker's
///    probe while it waits for calls to prove the class healthy): done ones are removed;
///    failed ones are rescheduled with backoff, or moved to manual review when their
///    attempts or deadline run out (also while they wait for their class), or at once on a
///    non-retryable answer;
/// 2. backfills spooled tasks of healthy classes while off-peak (see [`Backfill`]); a class
///    whose breaker waits for calls to prove it healthy (half-open, or degraded by the seed
///    rule) gets one spooled task replayed per tick as its probe, its outcome and latency
///    counted in the class's window, so a class without live traffic (a cron job, a queue
///    consumer that stopped) gets through its probes and has its spool replayed (it stays
///    `Recovering`, admitting a growing share, until live calls finish the recovery); a
///    failed probe keeps its task's attempts and puts it behind the class's other tasks. A
///    class that looks healthy (closed after a restart during an outage, or with no live
///    calls) whose replays of two different tasks fail in a row holds its replays (both
///    queues): one task at a time is replayed as a probe, its failure spending none of its
///    attempts, after waits that grow as the retry policy's, until one is served (a delayed
///    retry still goes to review at its deadline). No hold starts while the class's live
///    calls are served: a replay that fails then does so on its own account;
/// 3. flushes merged batches that are due.
///
/// With [admission](crate::DegraderBuilder::admission), each replay holds a permit of its
/// class's limiter while it runs, taken as a live call of its tier would take one (never
/// ahead of a waiting call): a replay that finds none waits for a later step, so replays
/// never take a class over its limit.
///
/// Each replay runs in its own task, bounded by the replay timeout (default 30 s): a replay that
/// panics or times out counts as a failed attempt. Its outcome is recorded when it ends, and
/// its backoff counted from then; meanwhile the worker goes on with the other due tasks, the
/// backfill and the batch writes (which run beside the replays), so one hung dependency
/// holds back only its own tasks. Stopping the worker (dropping or aborting its future)
/// stops the replays it started and loses nothing: tasks stay stored and are replayed by the
/// next worker (at least once; the idempotency key makes repeats harmless);
/// [`run_until`](Self::run_until) stops it gracefully, letting its replays end first.
#[must_use = "the worker replays nothing until `run()` is spawned"]
pub struct FallbackWorker {
    shared: Arc<RouterShared>,
    degrader: Degrader,
    replay: Arc<dyn Replay>,
    settings: Settings,
    /// Tasks claimed while their class may not be replayed (a delayed retry) or backfilled
    /// (a spooled task), by queue and class.
    parked: HashMap<(Queue, String), ParkedTasks>,
    /// By class, the window tick of its last probe replay (one per tick).
    probed: HashMap<String, u64>,
    /// Replays in flight as their class's probes, whose outcomes go to its window.
    probing: HashSet<TaskId>,
    /// Classes whose replays are held, their kept tasks' replays failing: until a probe is
    /// served.
    held: HashMap<String, Held>,
    /// By class, the kept task whose replay failed last, none served since.
    failed_last: HashMap<String, TaskId>,
    /// By class, the class's latest window when a probe replay of it was last served: its
    /// success stands in the windows after it for a while, and is not a live call's.
    probe_served: HashMap<String, u64>,
    /// The backfill rate in force: halved when a class's p99 passes the headroom, grown back
    /// by a tenth per check while it stays under.
    rate: f64,
    tokens: f64,
    last_ms: u64,
    /// The backfill's replays and the seconds they were counted over, since the gauge was
    /// last set: it is set once a second of them has passed (the worker also steps whenever
    /// a replay ends, so a step's own rate swings with its length).
    backfilled: (usize, f64),
    seed: u64,
    /// Replays in flight (at most `concurrency`), and the task each one replays.
    running: JoinSet<(Replayed, Duration)>,
    replaying: HashMap<tokio::task::Id, (Queue, Task)>,
    /// The batch writes in flight: one round at a time.
    flushing: JoinSet<()>,
    /// Outcomes of replays that ended but could not be stored (the store unreachable); their
    /// tasks stay claimed: stored again before anything else, never replayed again.
    unsettled: Vec<Op>,
    /// A store that cannot be read is said once every 10 s per queue, not every step.
    unreadable: [Every; 2],
    /// A probe replay that failed is said at most every 10 s: what it answered is the only
    /// sign of a replay that cannot reach its service (no base URL, no credentials).
    probe_failed: Every,
    /// Classes of kept tasks that the degrader no longer configures (renamed, removed): their
    /// tasks are replayed with no class's health to wait for, said once per class.
    unconfigured: HashSet<String>,
}

/// A replay that ended (or panicked, or was cancelled): its tokio task, its outcome and how
/// long it took.
type Ended = Result<(tokio::task::Id, (Replayed, Duration)), JoinError>;

/// What woke the worker.
enum Wake {
    Step,
    Flushed,
    Replayed(Ended),
}

impl fmt::Debug for FallbackWorker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FallbackWorker")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl FallbackWorker {
    pub(crate) fn new(
        shared: Arc<RouterShared>,
        degrader: Degrader,
        replay: Arc<dyn Replay>,
        settings: Settings,
    ) -> Self {
        let last_ms = shared.clock.now_ms();
        let rate = settings.backfill.rate;
        Self {
            shared,
            degrader,
            replay,
            settings,
            parked: HashMap::new(),
            probed: HashMap::new(),
            probing: HashSet::new(),
            held: HashMap::new(),
            failed_last: HashMap::new(),
            probe_served: HashMap::new(),
            rate,
            tokens: 0.0,
            last_ms,
            backfilled: (0, 0.0),
            seed: crate::mix::GAMMA ^ last_ms,
            running: JoinSet::new(),
            replaying: HashMap::new(),
            flushing: JoinSet::new(),
            unsettled: Vec::new(),
            unreadable: [Every::new(LOG_EVERY), Every::new(LOG_EVERY)],
            probe_failed: Every::new(LOG_EVERY),
            unconfigured: HashSet::new(),
        }
    }

    /// Run until the future is dropped. A replay running then is dropped mid-attempt: its
    /// task stays kept, and is replayed again by the next worker on the store, also where it
    /// had reached the application (see [`run_until`](Self::run_until)).
    pub async fn run(self) {
        self.run_until(std::future::pending(), Duration::ZERO).await;
    }

    /// Run until `stop` completes, then stop gracefully: start no more replays, let those
    /// running end (for at most `grace`), record what they did, and return. A replay still
    /// running after `grace` is dropped, its task kept, as [`run`](Self::run) drops it.
    ///
    /// Dropping a worker drops its replays between the application's answer and the store's
    /// acknowledgement too, and those tasks are replayed a second time by the next worker: on
    /// a link to Redis with 300 ms each way, a trial's every deploy replayed a batch of 32
    /// again. Stop the server first, then the worker with this, then `Degrader::shutdown`.
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// # async fn example(worker: tower_degrade::fallback::FallbackWorker) {
    /// let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    /// let worker = tokio::spawn(async move {
    ///     let stopped = async move {
    ///         let _ = stopped.await;
    ///     };
    ///     worker.run_until(stopped, Duration::from_secs(10)).await
    /// });
    /// // ... serve until told to stop, stop the server, then:
    /// let _ = stop.send(());
    /// let _ = worker.await;
    /// # }
    /// ```
    pub async fn run_until<F>(mut self, stop: F, grace: Duration)
    where
        F: std::future::Future<Output = ()>,
    {
        tokio::pin!(stop);
        self.serve(stop).await;
        self.wind_down(grace).await;
    }

    /// After a stop: the running replays end within `grace` and their outcomes are stored;
    /// the merged writes under way end within it too.
    async fn wind_down(&mut self, grace: Duration) {
        let deadline = tokio::time::Instant::now() + grace;
        while !self.running.is_empty() {
            match tokio::time::timeout_at(deadline, self.running.join_next_with_id()).await {
                Ok(Some(first)) => self.settle_ended(first).await,
                Ok(None) => break,
                Err(_) => {
                    tracing::warn!(service = %self.shared.service, running = self.running.len(),
                        "the fallback worker stopped with replays still running after its \
                         grace: their tasks stay kept and are replayed again by the next worker");
                    break;
                }
            }
        }
        if !self.unsettled.is_empty() {
            let ops = std::mem::take(&mut self.unsettled);
            self.commit_outcomes(ops, true).await;
            if !self.unsettled.is_empty() {
                tracing::warn!(service = %self.shared.service,
                    "the fallback worker stopped with replay outcomes the store did not take: \
                     those tasks are replayed again by the next worker");
            }
        }
        while !self.flushing.is_empty() {
            if tokio::time::timeout_at(deadline, self.flushing.join_next())
                .await
                .is_err()
            {
                break;
            }
        }
    }

    /// `first` and every other replay that has ended, recorded in one commit.
    async fn settle_ended(&mut self, first: Ended) {
        let mut done = vec![first];
        while let Some(more) = self.running.try_join_next_with_id() {
            done.push(more);
        }
        self.settle(done).await;
    }

    /// The worker's loop, until `stop` completes: looked at only between steps, so a stop
    /// never cuts a step or a commit of outcomes short.
    async fn serve<F: std::future::Future<Output = ()>>(&mut self, mut stop: Pin<&mut F>) {
        for batcher in self.shared.batches.values() {
            if let Err(e) = batcher.recover(&*self.shared.store).await {
                tracing::error!(error = %e, "batch_merge: the journal could not be read back");
            }
        }
        self.report_stranded().await;
        let mut tick = tokio::time::interval(self.settings.period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let wake = tokio::select! {
                _ = tick.tick() => Wake::Step,
                _ = self.shared.wake.notified() => Wake::Step,
                Some(done) = self.running.join_next_with_id(), if !self.running.is_empty() => {
                    Wake::Replayed(done)
                }
                // A round of batch writes ended: the next starts with the next step.
                Some(_) = self.flushing.join_next(), if !self.flushing.is_empty() => Wake::Flushed,
                () = &mut stop => return,
            };
            match wake {
                Wake::Flushed => continue,
                Wake::Replayed(first) => self.settle_ended(first).await,
                Wake::Step => {}
            }
            self.step().await;
        }
    }

    fn unit(&mut self) -> f64 {
        // Jitter needs spread, not cryptographic strength.
        self.seed = self.seed.wrapping_add(crate::mix::GAMMA);
        crate::mix::unit(crate::mix::mix64(self.seed))
    }

    /// Replays that may start now.
    fn free(&self) -> usize {
        self.settings.concurrency.saturating_sub(self.running.len())
    }

    async fn step(&mut self) {
        let now = self.shared.clock.now_ms();
        self.report(now);
        if !self.unsettled.is_empty() {
            // Outcomes the store refused before: store them first (their tasks stay claimed
            // meanwhile, so they are not replayed again).
            let ops = std::mem::take(&mut self.unsettled);
            self.commit_outcomes(ops, true).await;
        }
        if self.flushing.is_empty() && !self.shared.batches.is_empty() {
            // The merged writes run beside the replays: a slow database holds back its own
            // batches, not the retries and the backfill.
            let shared = self.shared.clone();
            self.flushing.spawn(async move {
                for batcher in shared.batches.values() {
                    batcher
                        .flush(
                            &*shared.store,
                            &shared.service,
                            &shared.retry,
                            &shared.clock,
                        )
                        .await;
                }
            });
        }
        self.release_parked(now).await;
        // Delayed retries, as many as there is room for; a replay that ends makes room and
        // wakes the worker for the next. With no room, the store is still asked (for none):
        // a shared store heartbeats the tasks this instance holds then.
        let due = self.shared.store.due(Queue::Retry, now, self.free()).await;
        if let Some(due) = self.readable(Queue::Retry, due) {
            let mut go = Vec::with_capacity(due.len());
            let mut gates: HashMap<String, Gate> = HashMap::new();
            for task in due {
                let gate = match gates.get(task.class()) {
                    Some(g) => *g,
                    None => {
                        let g = self.retry_gate(task.class(), now);
                        gates.insert(task.class().to_owned(), g);
                        g
                    }
                };
                match gate {
                    Gate::Open => go.push(task),
                    Gate::Probe => {
                        // This one is the probe; the class's others wait for its verdict.
                        gates.insert(task.class().to_owned(), Gate::Closed);
                        self.probing.insert(task.id());
                        go.push(task);
                    }
                    Gate::Closed => self.park(Queue::Retry, &task),
                }
            }
            self.start(Queue::Retry, go);
        }
        self.backfill_step(now).await;
    }

    /// What the store answered for `queue`; a failure logged (at most every 10 s while it
    /// lasts, and once when it ends).
    fn readable(&self, queue: Queue, read: Result<Vec<Task>, StoreError>) -> Option<Vec<Task>> {
        let every = &self.unreadable[usize::from(queue == Queue::Spool)];
        match read {
            Ok(tasks) => {
                if let Some(held) = every.reset() {
                    tracing::info!(service = %self.shared.service, queue = %queue,
                        also_failed = held,
                        "the store can be read again (`also_failed`: reads failed since the \
                         last warning)");
                }
                Some(tasks)
            }
            Err(e) => {
                if let Some(held) = every.ready() {
                    tracing::warn!(service = %self.shared.service, queue = %queue, error = %e,
                        also_failed = held,
                        "the store cannot be read (said at most every 10 s; `also_failed`: \
                         reads failed since the last line)");
                }
                None
            }
        }
    }

    /// Journaled `batch_merge` records of classes that have no `batch_merge` now (renamed, or
    /// their `batch_merge` removed): no batcher reads them back, so they stay in the store,
    /// unwritten, until one does. Said once per class at start-up, with how many.
    async fn report_stranded(&self) {
        let mut stranded: std::collections::BTreeMap<String, usize> = Default::default();
        let mut after = None;
        // A journal that cannot be read: the batchers' recovery has said so.
        while let Ok(page) = self.shared.store.list(Queue::Journal, after, 1000).await {
            let Some(last) = page.last() else { break };
            after = Some(last.id());
            for task in page
                .iter()
                .filter(|t| !self.shared.batches.contains_key(t.class()))
            {
                *stranded.entry(task.class().to_owned()).or_default() += 1;
            }
        }
        for (class, records) in stranded {
            tracing::warn!(service = %self.shared.service, class = %class, records,
                "journaled batch_merge records of a class with no batch_merge now (renamed or \
                 removed?) stay in the store, unwritten: configure a class of this name again, \
                 with its batch_merge, to merge and write them");
        }
    }

    /// A kept task of a class the degrader no longer configures: nothing to wait for (said
    /// once per class).
    fn unconfigured(&mut self, class: &str) -> Gate {
        if !self.unconfigured.contains(class) {
            self.unconfigured.insert(class.to_owned());
            tracing::warn!(service = %self.shared.service, class = %class,
                "kept tasks of a class the degrader does not configure (renamed or removed?) \
                 are replayed without waiting for a class's health: configure the class \
                 again to hold them while it is unhealthy");
        }
        Gate::Open
    }

    fn report(&self, now: u64) {
        let service = self.shared.service.to_string();
        for queue in [Queue::Retry, Queue::Spool, Queue::Review, Queue::Journal] {
            let d = self.shared.store.depth(queue);
            gauge!(crate::metrics::FALLBACK_DEPTH, "service" => service.clone(), "queue" => queue.as_str())
                .set(d.len as f64);
            let age = d
                .oldest_ms
                .map_or(0.0, |o| now.saturating_sub(o) as f64 / 1e3);
            gauge!(crate::metrics::FALLBACK_OLDEST, "service" => service.clone(), "queue" => queue.as_str())
                .set(age);
        }
    }

    /// Keep a claimed task until its class may go.
    fn park(&mut self, queue: Queue, task: &Task) {
        let deadline = if queue == Queue::Retry {
            task.deadline_ms()
        } else {
            None
        };
        self.parked
            .entry((queue, task.class().to_owned()))
            .or_default()
            .push((task.id(), deadline));
    }

    /// Whether `class` is healthy (its tasks may be replayed), or may have one task replayed
    /// as its breaker's probe (once per window tick, whichever queue it comes from).
    fn health(&mut self, class: &str) -> Gate {
        let status = self.degrader.status();
        let Some(c) = status.classes.iter().find(|c| &*c.name == class) else {
            // A class no longer configured: nothing to protect.
            return self.unconfigured(class);
        };
        self.class_health(c)
    }

    fn class_health(&mut self, c: &crate::degrader::ClassStatus) -> Gate {
        let class = &*c.name;
        let healthy = match (c.state, c.directive) {
            // Closed, forced closed by an operator (the breaker disabled), or a dry run (the
            // breaker decides but admits every call): what the class admits, its kept tasks
            // may take.
            (State::Closed | State::Disabled | State::MetricsOnly, Directive::Admit) => true,
            // Probes passed and the breaker admits a growing share, but it only finishes
            // recovering on live calls: with none, there is nothing to protect, and the spool
            // would otherwise wait for the next visitor.
            (State::Recovering, _) => c.window.requests() == 0,
            // The breaker waits for calls to show the class healthy: a replay is one, once per
            // tick (a class with live calls gets a few more probes than its own).
            (State::HalfOpen | State::Degraded, _) if !c.manual => {
                if self.probed.get(class) == Some(&c.window.tick) {
                    return Gate::Closed;
                }
                self.probed.insert(class.to_owned(), c.window.tick);
                return Gate::Probe;
            }
            _ => false,
        };
        if healthy { Gate::Open } else { Gate::Closed }
    }

    /// Whether `class`'s due delayed retries may be replayed now (healthy, and not held), or
    /// one of them as a probe.
    fn retry_gate(&mut self, class: &str, now: u64) -> Gate {
        match self.health(class) {
            Gate::Open => self.held_gate(class, now).unwrap_or(Gate::Open),
            other => other,
        }
    }

    /// For a class whose kept tasks' replays failed though its breaker let them go: one probe
    /// at a time, on the retry policy's backoff, until one is served (`None`: not held).
    fn held_gate(&self, class: &str, now: u64) -> Option<Gate> {
        let held = self.held.get(class)?;
        let running = self.replaying.values().any(|(_, t)| t.class() == class);
        Some(if running || now < held.next_ms {
            Gate::Closed
        } else {
            Gate::Probe
        })
    }

    /// Whether `class` may be backfilled now (healthy, under its headroom and off-peak; and
    /// the rate's AIMD step), or may have one task replayed as its breaker's probe.
    fn gate(&mut self, class: &str, now: u64) -> Gate {
        let status = self.degrader.status();
        let Some(c) = status.classes.iter().find(|c| &*c.name == class) else {
            return self.unconfigured(class);
        };
        match self.class_health(c) {
            Gate::Open => {}
            other => return other,
        }
        if let Some(held) = self.held_gate(class, now) {
            return held;
        }
        let registry = self.degrader.registry();
        let sla = registry
            .get(class)
            .map_or(Duration::MAX, |id| registry.class(id).sla_target());
        if c.window.p99.as_secs_f64() > sla.as_secs_f64() * self.settings.backfill.headroom {
            self.rate = (self.rate / 2.0).max(1.0);
            return Gate::Closed;
        }
        let open = match (
            self.settings.backfill.in_window(now),
            self.settings.backfill.below_rps,
        ) {
            (None, None) => true,
            (w, load) => w == Some(true) || load.is_some_and(|max| c.window.rps() < max),
        };
        if open { Gate::Open } else { Gate::Closed }
    }

    /// Count a probe replay's outcome in its class's window, as a call of the class: served
    /// (or refused as the request's fault: the dependency answered) is a success, anything
    /// retried is an error; its latency is the replay's.
    fn record_probe(&self, class: &str, outcome: &Replayed, latency: Duration) {
        let shared = &self.degrader.shared;
        let Some(id) = shared.registry.get(class) else {
            return;
        };
        let result = match outcome.retried() {
            None => Outcome::Success,
            Some((answer, _)) => {
                if let Some(held) = self.probe_failed.ready() {
                    tracing::warn!(service = %self.shared.service, class, answer,
                        also_failed = held,
                        "a probe replay failed: counted as a failure in the class's window (a \
                         breaker that is open stays so while its probes fail, and a class's \
                         replays hold while its kept tasks' replays fail); a replay that \
                         cannot reach its service, with no base URL or credentials, fails \
                         every probe; said at most every 10 s, `also_failed`: since the last \
                         line");
                }
                Outcome::Error
            }
        };
        shared.shards[shard_index(shared.shard_mask)].record(id.index(), result, latency);
        shared.gates[id.index()].probe_done(result == Outcome::Success, latency);
    }

    /// Give the tasks of parked classes that may go now back to their queue (one, for a
    /// class that may have a probe): before the queues are read, so that a probe is the task
    /// parked longest, not one that failed the last (a task failing on its own account, due
    /// again each time the hold lets a probe go, held the others parked for good in a test).
    async fn release_parked(&mut self, now: u64) {
        // Parked classes that may go now: give their tasks back to the queue.
        let parked: Vec<(Queue, String)> = self.parked.keys().cloned().collect();
        let mut expired = Vec::new();
        for (queue, class) in parked {
            let key = (queue, class);
            let gate = match queue {
                Queue::Retry => self.retry_gate(&key.1, now),
                _ => self.gate(&key.1, now),
            };
            match gate {
                Gate::Open => {
                    for (id, _) in self.parked.remove(&key).unwrap_or_default().tasks {
                        self.shared.store.release(queue, id);
                    }
                }
                Gate::Probe => {
                    // Give one back for the probe the next round picks (the class's turn is
                    // taken then, not here).
                    self.probed.remove(&key.1);
                    if let Some((id, _)) =
                        self.parked.get_mut(&key).and_then(|p| p.tasks.pop_front())
                    {
                        self.shared.store.release(queue, id);
                    }
                }
                Gate::Closed => {
                    // A delayed retry whose deadline passed while its class was unhealthy
                    // goes to manual review, as one that ran out of attempts would.
                    if let Some(p) = self.parked.get_mut(&key)
                        && p.soonest.is_some_and(|d| now >= d)
                    {
                        p.tasks.retain(|&(id, deadline)| {
                            let over = deadline.is_some_and(|d| now >= d);
                            if over {
                                expired.push((queue, key.1.clone(), id));
                            }
                            !over
                        });
                        p.soonest = p.tasks.iter().filter_map(|t| t.1).min();
                    }
                }
            }
        }
        self.parked.retain(|_, p| !p.tasks.is_empty());
        self.expire(expired).await;
    }

    async fn backfill_step(&mut self, now: u64) {
        let elapsed = now.saturating_sub(self.last_ms) as f64 / 1e3;
        self.last_ms = now;
        // Grown by a tenth (and one) per period; `gate` halves it when a class is too slow.
        // Counted in periods, not steps: the worker also steps whenever a replay ends.
        let periods = elapsed / self.settings.period.as_secs_f64().max(1e-3);
        self.rate = (self.rate * 1.1f64.powf(periods) + periods).min(self.settings.backfill.rate);
        let service = self.shared.service.to_string();
        if self.shared.store.depth(Queue::Spool).len == 0 {
            self.tokens = 0.0;
            self.backfilled = (0, 0.0);
            gauge!(crate::metrics::FALLBACK_BACKFILL_RATE, "service" => service).set(0.0);
            return;
        }
        // A bucket of at most one second's worth: no burst after a quiet spell.
        self.tokens = (self.tokens + self.rate * elapsed).min(self.rate.max(1.0));
        let (mut replayed, mut rounds) = (0usize, 0);
        while self.tokens >= 1.0 && rounds < 16 && self.free() > 0 {
            rounds += 1;
            let want = (self.tokens as usize).min(self.free());
            let read = self.shared.store.due(Queue::Spool, now, want).await;
            let due = match self.readable(Queue::Spool, read) {
                Some(d) if !d.is_empty() => d,
                _ => break,
            };
            let mut go = Vec::with_capacity(due.len());
            let mut gates: HashMap<String, Gate> = HashMap::new();
            for task in due {
                let gate = match gates.get(task.class()) {
                    Some(g) => *g,
                    None => {
                        let g = self.gate(task.class(), now);
                        gates.insert(task.class().to_owned(), g);
                        g
                    }
                };
                if gate == Gate::Probe {
                    // This one is the probe; the class's others wait for its verdict.
                    gates.insert(task.class().to_owned(), Gate::Closed);
                    self.probing.insert(task.id());
                    go.push(task);
                } else if gate == Gate::Open {
                    go.push(task);
                } else {
                    // Kept claimed until its class may go, so it does not block the others.
                    self.park(Queue::Spool, &task);
                }
            }
            if go.is_empty() {
                continue;
            }
            self.tokens -= go.len() as f64;
            replayed += go.len();
            self.start(Queue::Spool, go);
        }
        if rounds == 0 {
            // Asked for none: a shared store heartbeats the spooled tasks this instance holds
            // (replaying, or parked) then, as the delayed retries' are on every step.
            let read = self.shared.store.due(Queue::Spool, now, 0).await;
            self.readable(Queue::Spool, read);
        }
        let (count, secs) = &mut self.backfilled;
        *count += replayed;
        *secs += elapsed;
        if *secs >= 1.0 {
            let rate = *count as f64 / *secs;
            self.backfilled = (0, 0.0);
            gauge!(crate::metrics::FALLBACK_BACKFILL_RATE, "service" => service).set(rate);
        }
    }

    /// Move the parked delayed retries whose deadline passed to manual review.
    async fn expire(&mut self, expired: Vec<(Queue, String, TaskId)>) {
        let mut ops = Vec::new();
        for (queue, class, id) in expired {
            match self.shared.store.get(queue, id).await {
                Ok(Some(mut task)) => {
                    let answer = "its deadline passed while its class was not healthy";
                    task.set_answer(answer.to_owned());
                    self.send_to_review(queue, task, &mut ops);
                    replayed(&self.shared.service, queue, "review");
                }
                // Gone meanwhile (an operator's action): nothing to move.
                Ok(None) => {}
                // Kept claimed, and tried again on the next step.
                Err(_) => self
                    .parked
                    .entry((queue, class))
                    .or_default()
                    .push((id, Some(0))),
            }
        }
        if !ops.is_empty() {
            self.commit_outcomes(ops, false).await;
        }
    }

    /// A permit of `class`'s admission limiter for a replay: `Ok(None)` without admission,
    /// `Err(())` when none is free to a call of its tier now.
    fn permit(&self, class: &str) -> Result<Option<Permit>, ()> {
        let shared = &self.degrader.shared;
        let Some(id) = shared.registry.get(class) else {
            return Ok(None);
        };
        let gate = &shared.gates[id.index()];
        let Some(limiter) = gate.limiter.map(usize::from) else {
            return Ok(None);
        };
        if !shared.limiters[limiter].try_acquire(gate.tier) {
            return Err(());
        }
        Ok(Some(Permit {
            degrader: shared.clone(),
            limiter,
            rank: crate::admit::rank(gate.tier),
        }))
    }

    /// Start replaying `tasks` of `queue`, each in a task of its own bounded by the replay
    /// timeout and holding an admission permit of its class; [`settle`](Self::settle) records
    /// each outcome when it ends. A task whose class has no permit free is given back to the
    /// queue for a later step.
    fn start(&mut self, queue: Queue, tasks: Vec<Task>) {
        for task in tasks {
            let Ok(permit) = self.permit(task.class()) else {
                if self.probing.remove(&task.id()) {
                    // The probe did not run: the class's turn is not taken.
                    self.probed.remove(task.class());
                }
                self.shared.store.release(queue, task.id());
                continue;
            };
            let attempt = task.attempts() + 1;
            // A replay that panics before it returns its future (a handler that reads the
            // task before its `async` block) fails this attempt, as one that panics inside
            // it does: it must not take the worker, and every other task, down with it.
            let fut = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                match (task.payload(), self.shared.batches.get(task.class())) {
                    // Bytes are also a task-API value, kept by a class that merges too.
                    (Payload::Bytes(_), Some(batcher)) if super::batch::is_record(&task) => {
                        batcher.replay(&task)
                    }
                    _ => self.replay.replay(&task, attempt),
                }
            }))
            .unwrap_or_else(|panic| {
                let why = super::panicked("replay", &*panic);
                Box::pin(std::future::ready(Replayed::Retry(why)))
            });
            let limit = self.settings.replay_timeout;
            let handle = self.running.spawn(async move {
                let _permit = permit;
                let start = tokio::time::Instant::now();
                let out = tokio::time::timeout(limit, fut).await.unwrap_or_else(|_| {
                    Replayed::Retry(format!("the replay timed out after {limit:?}"))
                });
                (out, start.elapsed())
            });
            self.replaying.insert(handle.id(), (queue, task));
        }
    }

    /// Record the outcomes of replays that ended, in one commit: done tasks are removed,
    /// failed ones rescheduled with backoff from now (when the attempt ended) or moved to
    /// manual review.
    async fn settle(&mut self, done: Vec<Ended>) {
        let now = self.shared.clock.now_ms();
        let mut ops = Vec::with_capacity(done.len() * 2);
        let service = self.shared.service.to_string();
        for ended in done {
            let (id, (outcome, took)) = match ended {
                Ok(r) => r,
                Err(e) if e.is_panic() => {
                    let id = e.id();
                    let why = super::panicked("replay", &*e.into_panic());
                    (id, (Replayed::Retry(why), Duration::ZERO))
                }
                Err(e) => (
                    e.id(),
                    (
                        Replayed::Retry("the replay was cancelled".to_owned()),
                        Duration::ZERO,
                    ),
                ),
            };
            let Some((queue, mut task)) = self.replaying.remove(&id) else {
                continue;
            };
            let probe = self.probing.remove(&task.id());
            // A held class whose live calls are served: its replays fail on their own account,
            // and spend their attempts.
            let own = outcome.retried().is_some()
                && self.held.contains_key(task.class())
                && self.degrader.state(task.class()).ok() == Some(State::Closed)
                && self.live_served(task.class());
            if own && let Some(h) = self.held.remove(task.class()) {
                tracing::info!(service = %self.shared.service, class = task.class(),
                    failures = h.failures,
                    "live calls of a class whose replays were held are served: its replays go \
                     on, each failure spending an attempt");
            }
            if probe {
                self.record_probe(task.class(), &outcome, took);
                if outcome.retried().is_none() {
                    let tick = self.latest_tick(task.class());
                    self.probe_served.insert(task.class().to_owned(), tick);
                }
            }
            self.judge(&task, &outcome, probe, now);
            let probe = probe && !own;
            // The wait the answer asked for (Retry-After): no retry comes sooner.
            let asked = outcome.retried().map_or(Duration::ZERO, |(_, after)| after);
            let result = match outcome {
                // A failed probe tells of the class, not of the task: the task keeps its
                // attempts and waits for the class to recover, behind its class's other
                // tasks (the next probe is another one: a task that fails on its own
                // account does not hold back the rest).
                Replayed::Retry(answer) | Replayed::RetryAfter(answer, _) if probe => {
                    let wait = match self.held.get(task.class()) {
                        Some(h) => h.next_ms.saturating_sub(now),
                        None => {
                            let unit = self.unit();
                            super::schedule::after(0, self.shared.retry.backoff(1, unit))
                        }
                    };
                    task.set_answer(answer);
                    let due = now
                        .saturating_add(wait)
                        .max(super::schedule::after(now, asked))
                        .max(task.due_ms());
                    // Its deadline passes before it may go again: to review, as a parked
                    // task's does (the last task of a held class is never parked).
                    if task.deadline_ms().is_some_and(|d| due > d) {
                        task.set_answer(
                            "its deadline passed while its class was not healthy".to_owned(),
                        );
                        self.send_to_review(queue, task, &mut ops);
                        replayed(&service, queue, "review");
                        continue;
                    }
                    ops.push(Op::Put(queue, task.with_due(due)));
                    replayed(&service, queue, "retry");
                    continue;
                }
                Replayed::Done => {
                    ops.push(Op::Remove(queue, task.id()));
                    "ok"
                }
                Replayed::Retry(answer) | Replayed::RetryAfter(answer, _) => {
                    let unit = self.unit();
                    let wait = self
                        .shared
                        .retry
                        .backoff(task.attempts() + 1, unit)
                        .max(asked);
                    let next = super::schedule::after(now, wait);
                    task.failed(answer, next);
                    // A wait the answer asked for that ends past the deadline: to review now,
                    // not replayed a day after it (the backoff alone is capped far below).
                    let out_of_time = task
                        .deadline_ms()
                        .is_some_and(|d| now >= d || (!asked.is_zero() && next > d));
                    if task.attempts() >= self.shared.retry.max_attempts || out_of_time {
                        self.send_to_review(queue, task, &mut ops);
                        "review"
                    } else {
                        ops.push(Op::Put(queue, task));
                        "retry"
                    }
                }
                Replayed::Reject(answer) => {
                    task.failed(answer, now);
                    self.send_to_review(queue, task, &mut ops);
                    "review"
                }
            };
            replayed(&service, queue, result);
        }
        if ops.is_empty() {
            return;
        }
        let retrying = !self.unsettled.is_empty();
        self.commit_outcomes(ops, retrying).await;
    }

    /// What a kept task's replay (a delayed retry's or a spooled task's) says of its class:
    /// served (or refused on the request's own account: the dependency answered) lifts a
    /// hold; a failure that is not a probe holds the class's replays, and a held class's
    /// failed probe backs the next one off further (a breaker's probe that fails is the
    /// breaker's to judge).
    ///
    /// A failure holds them once another task's has failed before it with none served
    /// between: one task failing on its own account (its attempts running out, to manual
    /// review) does not hold the rest, nor is it held.
    fn judge(&mut self, task: &Task, outcome: &Replayed, probe: bool, now: u64) {
        let class = task.class();
        let Some((answer, asked)) = outcome.retried() else {
            self.failed_last.remove(class);
            if let Some(h) = self.held.remove(class) {
                tracing::info!(service = %self.shared.service, class, failures = h.failures,
                    "a kept task's replay was served: the class's replays go on");
            }
            return;
        };
        let unit = self.unit();
        let held = self.held.get(class).map(|h| h.failures);
        let failures = match held {
            Some(f) if probe => f.saturating_add(1),
            // A replay started before the hold: the hold has counted it.
            Some(_) => return,
            None if probe => return,
            // Its live calls are served: the replay failed on its own account.
            None if self.live_served(class) => return,
            // The first kept task of the class to fail, or the same one again.
            None if !self.another_failed(class, task.id()) => return,
            None => {
                tracing::warn!(service = %self.shared.service, class, answer = %answer,
                    "a kept task's replay failed while its class looked healthy: its delayed \
                     retries and backfill hold, one task replayed at a time as a probe \
                     (backing off, spending none of its attempts) until one is served");
                1
            }
        };
        let wait = super::schedule::after(0, self.shared.retry.backoff(failures, unit).max(asked));
        self.held.insert(
            class.to_owned(),
            Held {
                failures,
                next_ms: now.saturating_add(wait),
            },
        );
    }

    /// Whether a kept task of `class` other than `id` was the last to fail (none served
    /// since); `id` is remembered as the last.
    fn another_failed(&mut self, class: &str, id: TaskId) -> bool {
        self.failed_last
            .insert(class.to_owned(), id)
            .is_some_and(|last| last != id)
    }

    /// Whether live calls of `class` were served within the last [`LIVE_EVIDENCE_TICKS`]
    /// windows: its dependency answers, and a replay that fails does so on its own account.
    /// Of replays, only probes are counted in the windows: while a served one may be among
    /// them, they tell nothing (a dependency that flaps just after a hold lifts holds it again,
    /// where the probe's success let the failed replays spend their attempts).
    fn live_served(&self, class: &str) -> bool {
        self.degrader.history(class).is_ok_and(|h| {
            let latest = h.latest().map_or(0, |w| w.tick);
            // The probe's success is in the window after the one that was the latest then,
            // while it is among the last LIVE_EVIDENCE_TICKS.
            let probed = self
                .probe_served
                .get(class)
                .is_some_and(|&then| latest <= then + LIVE_EVIDENCE_TICKS as u64);
            !probed
                && (0..LIVE_EVIDENCE_TICKS)
                    .filter_map(|ago| h.get(ago))
                    .any(|w| w.successes > 0)
        })
    }

    /// The tick of `class`'s latest window (0 before its first).
    fn latest_tick(&self, class: &str) -> u64 {
        self.degrader
            .history(class)
            .ok()
            .and_then(|h| h.latest().map(|w| w.tick))
            .unwrap_or(0)
    }

    /// Store replays' outcomes. If the store refuses them (unreachable), they are kept and
    /// tried again on each step, their tasks staying claimed: a replay that was done is not
    /// done again because its acknowledgement failed. A worker that stops meanwhile leaves
    /// them claimed; the store hands them out again then (at least once).
    async fn commit_outcomes(&mut self, mut ops: Vec<Op>, retrying: bool) {
        if let Err(e) = self.shared.store.commit(ops.clone()).await {
            if !retrying {
                tracing::warn!(error = %e, "replay outcomes could not be stored; \
                    trying again each step (the tasks are not replayed again meanwhile)");
            }
            self.unsettled.append(&mut ops);
        }
    }

    fn send_to_review(&mut self, from: Queue, task: Task, ops: &mut Vec<Op>) {
        // Gone from its queue: its failure no longer counts towards a hold.
        if self.failed_last.get(task.class()) == Some(&task.id()) {
            self.failed_last.remove(task.class());
        }
        if let Some(held) = self.shared.to_review.ready() {
            tracing::warn!(service = %self.shared.service, class = %task.class(),
                task = %task.id(), from = %from, attempts = task.attempts(),
                answer = task.last_answer().unwrap_or(""), also_moved = held,
                "task moved to manual review (said at most every 10 s; `also_moved`: tasks \
                 moved since the last line, each listed by the review API)");
        }
        ops.push(Op::Remove(from, task.id()));
        ops.push(Op::Put(Queue::Review, task));
    }
}

/// Count a replay of a task of `queue` by `result` (`ok`, `retry`, `review`).
fn replayed(service: &str, queue: Queue, result: &'static str) {
    crate::metrics::count_result(
        crate::metrics::FALLBACK_REPLAYS,
        &[
            metrics::Label::new("service", service.to_owned()),
            metrics::Label::new("queue", queue.as_str()),
        ],
        &crate::metrics::REPLAY_RESULTS,
        result,
    );
}
