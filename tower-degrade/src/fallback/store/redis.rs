//! [`RedisStore`]: kept tasks in Redis Streams, shared by several instances (see the type docs).

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Script, Value};

use super::{Depth, Op, Store, StoreError, StoreErrorKind, StoreFuture, Usage};
use crate::every::{Every, LOG_EVERY};
use crate::fallback::record::{Queue, Task, TaskId};

const GROUP: &str = "replay";

/// How long a reading of the server's clock is used before it is read again.
const OFFSET_FOR: Duration = Duration::from_secs(60);

/// Applies a commit's operations atomically (see the type docs). ARGV: prefix, group,
/// capacity, deadline, then per op `P queue id keyfield created_ms record` or `R queue id`.
/// Capacity counts the net growth (a move is not growth) and not the audit queue. A put under
/// an idempotency key another kept task holds changes nothing (`KEYTAKEN`): two instances that
/// both found the key free keep one task, not two. A removal from `manual_review` of a task
/// no longer there (`GONE`) changes nothing: of two instances' review actions on one task,
/// the second is refused. A commit run after its deadline (in the
/// server's milliseconds) changes nothing (`LATE`, with the server's time): the instance that
/// sent it has given up on it by then and kept the call elsewhere or refused it, so a commit
/// a hung Redis runs when it resumes must not keep it a second time. Returns the server's time.
const COMMIT: &str = r#"
if redis.replicate_commands then redis.replicate_commands() end
local p, g, cap, deadline = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if now > deadline then
  return redis.error_reply('LATE ' .. string.format('%.0f', now) .. ' the commit ran after its deadline (its answer could not reach its sender within the timeout): nothing was changed')
end
local keyed = {delayed_retry = true, spool = true, manual_review = true, batch_merge = true}
local grows = 0
local i = 5
while i <= #ARGV do
  local exists = ARGV[i+1] ~= 'audit' and redis.call('HEXISTS', p .. ':' .. ARGV[i+1] .. ':ids', ARGV[i+2]) == 1
  if ARGV[i] == 'P' then
    if ARGV[i+1] ~= 'audit' and not exists then grows = grows + 1 end
    -- An idempotency key another instance kept a task under since this one looked.
    local k = ARGV[i+3]
    if k ~= '' and keyed[ARGV[i+1]] then
      local cur = redis.call('HGET', p .. ':keys', k)
      if cur then
        local cq, cid = string.match(cur, '^(%S+) (%S+)$')
        if cid and cid ~= ARGV[i+2] and redis.call('HEXISTS', p .. ':' .. cq .. ':ids', cid) == 1 then
          return redis.error_reply('KEYTAKEN ' .. cur)
        end
      end
    end
    i = i + 6
  else
    -- A review action on a task another instance acted on first: refused whole.
    if ARGV[i+1] == 'manual_review' and not exists then
      return redis.error_reply('GONE task ' .. ARGV[i+2] .. ' is no longer in manual_review (acted on by another instance): nothing was changed')
    end
    if exists then grows = grows - 1 end
    i = i + 3
  end
end
if grows > 0 then
  local total = 0
  for _, q in ipairs({'delayed_retry', 'spool', 'manual_review', 'batch_merge'}) do
    total = total + redis.call('HLEN', p .. ':' .. q .. ':ids')
  end
  if total + grows > cap then
    return redis.error_reply('FULL the store holds ' .. total .. ' tasks, its capacity is ' .. cap)
  end
end
local function unkey(s, q, id, entry)
  local e = redis.call('XRANGE', s, entry, entry)
  if e[1] then
    local f = e[1][2]
    for j = 1, #f, 2 do
      if f[j] == 'k' and f[j+1] ~= '' and redis.call('HGET', p .. ':keys', f[j+1]) == q .. ' ' .. id then
        redis.call('HDEL', p .. ':keys', f[j+1])
      end
    end
  end
end
i = 5
while i <= #ARGV do
  local q, id = ARGV[i+1], ARGV[i+2]
  local s = p .. ':' .. q
  local old = redis.call('HGET', s .. ':ids', id)
  if old then
    if ARGV[i] == 'R' then unkey(s, q, id, old) end
    redis.call('XACK', s, g, old)
    redis.call('XDEL', s, old)
  end
  if ARGV[i] == 'P' then
    local k = ARGV[i+3]
    local new = redis.call('XADD', s, '*', 'c', ARGV[i+4], 'k', k, 't', ARGV[i+5])
    redis.call('HSET', s .. ':ids', id, new)
    if k ~= '' and keyed[q] then redis.call('HSET', p .. ':keys', k, q .. ' ' .. id) end
    i = i + 6
  else
    redis.call('HDEL', s .. ':ids', id)
    i = i + 3
  end
end
return now
"#;

/// Checks entries just delivered to this instance against the index, atomically. ARGV:
/// prefix, group, queue, then per entry `task_id entry_id keyfield`. Per entry it returns 0
/// when the index points at the entry (every entry the library wrote); 1 when the task had no
/// entry in the index (a stream entry copied or restored by hand, its index lost): the entry
/// is indexed, so that its task is replayed and acknowledged like any other; 2 when the index
/// points at another entry of the same task (a copy): this one is acknowledged and deleted,
/// the task stays in the other; 3 when the entry is gone (removed by another instance since
/// it was read). An index that points at an entry no longer in the stream (trimmed by hand)
/// is pointed at this one. Left alone, such a copy was never acknowledged (a commit
/// acknowledges the indexed entry), handed from instance to instance every `claim_timeout`,
/// and replayed each time.
const ADOPT: &str = r#"
local p, g, q = ARGV[1], ARGV[2], ARGV[3]
local keyed = {delayed_retry = true, spool = true, manual_review = true, batch_merge = true}
local s = p .. ':' .. q
local out = {}
local i = 4
while i <= #ARGV do
  local id, entry, k = ARGV[i], ARGV[i+1], ARGV[i+2]
  local cur = redis.call('HGET', s .. ':ids', id)
  if cur == entry then
    out[#out+1] = 0
  elseif redis.call('XRANGE', s, entry, entry)[1] == nil then
    out[#out+1] = 3
  elseif not cur or redis.call('XRANGE', s, cur, cur)[1] == nil then
    redis.call('HSET', s .. ':ids', id, entry)
    if k ~= '' and keyed[q] then redis.call('HSETNX', p .. ':keys', k, q .. ' ' .. id) end
    out[#out+1] = 1
  else
    redis.call('XACK', s, g, entry)
    redis.call('XDEL', s, entry)
    out[#out+1] = 2
  end
  i = i + 3
end
return out
"#;

/// Remove the group's consumers that hold nothing and have not read for `ARGV[3]` ms, but
/// `ARGV[4]` (this instance): the names earlier starts left. In one script, so a consumer
/// that takes an entry in between keeps it (a consumer removed with entries pending would
/// take them out of the group's pending list). Returns how many were removed.
const FORGET: &str = r#"
local s, g = ARGV[1], ARGV[2]
local idle, me = tonumber(ARGV[3]), ARGV[4]
local n = 0
for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', s, g)) do
  local f = {}
  for j = 1, #c, 2 do f[c[j]] = c[j+1] end
  if f['pending'] == 0 and f['idle'] >= idle and f['name'] ~= me then
    redis.call('XGROUP', 'DELCONSUMER', s, g, f['name'])
    n = n + 1
  end
end
return n
"#;

/// Heartbeats the entries this instance holds, in one round trip: ARGV stream, group, this
/// consumer, then the entries. Those still pending for it have their idle time reset
/// (`XCLAIM ... JUSTID`); returns them (the others were taken over by another instance).
const HEARTBEAT: &str = r#"
local s, g, me = ARGV[1], ARGV[2], ARGV[3]
local mine = {}
for i = 4, #ARGV do
  local p = redis.call('XPENDING', s, g, ARGV[i], ARGV[i], 1, me)
  if p[1] then mine[#mine+1] = ARGV[i] end
end
-- In chunks: Lua unpacks at most a few thousand values.
for i = 1, #mine, 1000 do
  local claim = {'XCLAIM', s, g, me, 0}
  for j = i, math.min(i + 999, #mine) do claim[#claim+1] = mine[j] end
  claim[#claim+1] = 'JUSTID'
  redis.call(unpack(claim))
end
return mine
"#;

/// A queue's depth in one round trip: the index's length, then `c` and the oldest entry's
/// creation time, or `t` and its whole record for an entry written before entries carried the
/// time (so a large kept request is not sent to every instance several times a second).
const DEPTH: &str = r#"
local s = ARGV[1]
local n = redis.call('HLEN', s .. ':ids')
local e = redis.call('XRANGE', s, '-', '+', 'COUNT', 1)[1]
if e == nil then return {n} end
local t = nil
for j = 1, #e[2], 2 do
  if e[2][j] == 'c' then return {n, 'c', e[2][j+1]} end
  if e[2][j] == 't' then t = e[2][j+1] end
end
if t then return {n, 't', t} end
return {n}
"#;

/// Builds a [`RedisStore`].
#[derive(Debug, Clone)]
#[must_use = "a setting or builder does nothing until it is passed on or built"]
pub struct RedisStoreBuilder {
    url: String,
    prefix: String,
    consumer: Option<String>,
    claim_timeout: Duration,
    capacity: u64,
    timeout: Duration,
    forget_after: Duration,
}

impl RedisStoreBuilder {
    /// The prefix of every key (default `tower-degrade`): instances sharing a queue use the
    /// same prefix.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// This instance's consumer name in the group (default: host name, process id and an id
    /// drawn at each start). It must differ between instances.
    pub fn consumer(mut self, name: impl Into<String>) -> Self {
        self.consumer = Some(name.into());
        self
    }

    /// How long an entry may stay pending without a heartbeat before another instance takes
    /// it over (default 60 s; at least [`RedisStore::MIN_CLAIM_TIMEOUT`]). An instance
    /// heartbeats what it holds when its worker steps, at most every third of this: the
    /// fallback router refuses a worker `period` over a third of it.
    pub fn claim_timeout(mut self, d: Duration) -> Self {
        self.claim_timeout = d;
        self
    }

    /// Consumers of the group that hold no entry and have not read for this long are removed
    /// when this instance first reads a queue (default a day): each start adds a consumer
    /// (the default name has a per-start id), and a fleet that restarts often would list
    /// thousands in `XINFO CONSUMERS`. One holding entries is never removed (its entries are
    /// taken over after [`claim_timeout`](Self::claim_timeout), and it goes at a later
    /// start). A live instance reads at every worker step, so it is never that idle; one
    /// removed anyway (zero here) is added back by its next read.
    pub fn forget_consumers_after(mut self, d: Duration) -> Self {
        self.forget_after = d;
        self
    }

    /// At most this many tasks over all queues, the audit records of dropped tasks not counted
    /// (default 10,000,000). The router's store shares (the room kept for gold) count tasks
    /// against it, not Redis's memory: under a `maxmemory` that fills first, Redis refuses
    /// every tier alike (`OOM`, each call `not_kept`; 463 gold, 461 silver and 458 bronze
    /// calls in a trial). Set it below what `maxmemory` holds of your largest kept calls
    /// (with 600 in that trial, bronze stopped at 484 and gold was kept).
    pub fn capacity(mut self, tasks: u64) -> Self {
        self.capacity = tasks;
        self
    }

    /// How long one Redis operation may take before it counts as failed (default 2 s; more
    /// than zero). This bounds each operation, not the call: a call with an idempotency key
    /// makes two (the key lookup, the append), and against a server that accepts connections
    /// and never answers, the client's own connect timeout and retry make an operation last
    /// about twice this, so a diverted call can wait about four times it for its `202` or its
    /// reject answer (`docs/fallback.md`, *Stores*). A commit Redis runs more than three
    /// quarters of this after it was sent (on Redis's clock, read as a lower bound: in effect
    /// when the way there, Redis's delay and the way back add up to more) changes nothing and
    /// fails: its answer could come too late, and a hung Redis would otherwise keep, when it
    /// resumes, a call already answered `not_kept` or kept elsewhere. Set it to several
    /// round trips to Redis.
    pub fn timeout(mut self, d: Duration) -> Self {
        self.timeout = d;
        self
    }

    /// Connect (lazily: the first command connects, and a lost connection is re-established
    /// in the background). Fails on an invalid URL or setting, not on a server that cannot be
    /// reached: [`RedisStore::ping`] checks that at startup.
    pub fn build(self) -> Result<RedisStore, StoreError> {
        // What logs, errors and `Debug` show of the URL: not its password.
        let shown = redact(&self.url);
        let invalid = |what: String| {
            StoreError::new(
                StoreErrorKind::Invalid,
                format!("redis store `{shown}`: {what}"),
            )
        };
        if self.claim_timeout < RedisStore::MIN_CLAIM_TIMEOUT {
            // Heartbeats could not keep up: every instance took the others' tasks over and
            // replayed them again (228 of 276 kept calls twice, at 0).
            return Err(invalid(format!(
                "claim_timeout must be at least {:?}, not {:?} (an instance's \
                 tasks are handed to another after this long without a heartbeat)",
                RedisStore::MIN_CLAIM_TIMEOUT,
                self.claim_timeout
            )));
        }
        if self.timeout.is_zero() {
            return Err(invalid(
                "timeout must be more than zero (how long one Redis command may take)".into(),
            ));
        }
        // A URL that does not parse (or asks for what this build lacks, TLS) is a setting,
        // not a failure to retry.
        let client = redis::Client::open(self.url.as_str())
            .map_err(|e| invalid(format!("not a Redis URL this build can use: {e}")))?;
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(self.timeout))
            .set_connection_timeout(Some(self.timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(1));
        let conn = ConnectionManager::new_lazy_with_config(client, config).map_err(|e| {
            StoreError::new(StoreErrorKind::Io, format!("redis store `{shown}`: {e}"))
        })?;
        let consumer = self.consumer.unwrap_or_else(|| {
            let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "host".to_owned());
            format!("{host}-{}-{}", std::process::id(), TaskId::generate())
        });
        Ok(RedisStore {
            inner: Arc::new(Inner {
                conn,
                url: shown,
                prefix: self.prefix,
                consumer,
                claim_timeout: self.claim_timeout,
                capacity: self.capacity,
                forget_after: self.forget_after,
                timeout: self.timeout,
                epoch: Instant::now(),
                forget: Script::new(FORGET),
                commit: Script::new(COMMIT),
                adopt: Script::new(ADOPT),
                depth_script: Script::new(DEPTH),
                heartbeat_script: Script::new(HEARTBEAT),
                local: Mutex::new(Local::default()),
                unreadable: Every::new(LOG_EVERY),
                slow_heartbeat: Every::new(LOG_EVERY),
            }),
        })
    }
}

/// Kept tasks in Redis Streams with a consumer group, for several instances sharing one
/// queue. Run Redis with `appendonly yes` and `appendfsync always` for acknowledged tasks to
/// survive a Redis crash.
///
/// Each queue is a stream (`<prefix>:<queue>`) read through one consumer group (`replay`):
///
/// * **Append** (`Put`): one Lua script per commit adds the record with `XADD` and indexes it
///   (`<prefix>:<queue>:ids`: task id -> entry id; `<prefix>:keys`: idempotency keys), atomically.
///   With `appendonly yes` and `appendfsync always` the reply comes after Redis has synced its
///   log, so an acknowledged task survives a crash of Redis too; Redis syncs once per event
///   loop for every client's writes (its own group commit). Each commit carries a deadline on
///   Redis's clock (three quarters of [`timeout`](RedisStoreBuilder::timeout) after it is
///   sent): one a hung Redis runs after that changes nothing.
/// * **Claim** (`due`): `XREADGROUP` hands each new entry to exactly one instance; an entry
///   left pending by an instance that stopped (no heartbeat for `claim_timeout`) is taken over
///   with `XAUTOCLAIM`. An instance heartbeats what it holds (`XCLAIM ... JUSTID` on the
///   entries `XPENDING` says are its own, one script per queue) with its worker's steps and
///   on a timer of its own, every third of `claim_timeout`, so a live instance's tasks are
///   not taken. After a read that failed (a timeout, a cut connection: Redis may have
///   delivered entries whose answer was lost), an instance first reads back its own pending
///   entries (`XREADGROUP ... 0`) and holds those it did not, rather than leave them for a
///   takeover a `claim_timeout` later.
/// * **Acknowledge** (`Remove`, or `Put` of a rescheduled task): `XACK` and `XDEL` of the
///   entry in the same script, after the replay succeeded (or was rescheduled).
///
/// An instance that stalls for longer than `claim_timeout` while replaying may see its task
/// replayed by another, and so may one that stops holding replays it could not acknowledge
/// (Redis unreachable meanwhile): delivery is at least once, and the idempotency key every
/// replay carries makes it exactly once in effect. After Redis was unreachable, an instance
/// takes nothing over until one `claim_timeout` after it answered again, so that the others,
/// alive, heartbeat theirs first. Single Redis or a primary with replicas; not Redis Cluster
/// (the script names keys it computes).
///
/// ```no_run
/// use std::time::Duration;
/// use tower_degrade::fallback::store::RedisStore;
///
/// let store = RedisStore::builder("redis://127.0.0.1:6379")
///     .prefix("shop")
///     .claim_timeout(Duration::from_secs(30))
///     .build()?;
/// # Ok::<_, tower_degrade::fallback::store::StoreError>(())
/// ```
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

/// `url` with its passwords replaced by `***`: the user info's, and a `pass` or `password`
/// query parameter's (how `redis+unix://` URLs carry one).
fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    // As URLs are parsed: the authority ends at the path or the query.
    let (authority, tail) = rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
    let authority = match authority.rfind('@') {
        Some(at) => {
            let info = &authority[..at];
            let user = info.split_once(':').map_or(info, |(u, _)| u);
            let password = if info.contains(':') { ":***" } else { "" };
            format!("{user}{password}{}", &authority[at..])
        }
        None => authority.to_owned(),
    };
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let params: Vec<String> = query
                .split('&')
                .map(|param| match param.split_once('=') {
                    Some((k, _))
                        if k.eq_ignore_ascii_case("pass") || k.eq_ignore_ascii_case("password") =>
                    {
                        format!("{k}=***")
                    }
                    _ => param.to_owned(),
                })
                .collect();
            format!("{path}?{}", params.join("&"))
        }
        None => tail.to_owned(),
    };
    format!("{scheme}://{authority}{tail}")
}

struct Inner {
    conn: ConnectionManager,
    /// The URL without its password ([`redact`]), for logs and errors.
    url: String,
    prefix: String,
    consumer: String,
    claim_timeout: Duration,
    capacity: u64,
    /// [`RedisStoreBuilder::forget_consumers_after`].
    forget_after: Duration,
    /// [`RedisStoreBuilder::timeout`].
    timeout: Duration,
    /// Where this instance's monotonic milliseconds start ([`Inner::mono_ms`]).
    epoch: Instant,
    forget: Script,
    commit: Script,
    adopt: Script,
    depth_script: Script,
    heartbeat_script: Script,
    local: Mutex<Local>,
    /// Unreadable entries met: said at most once every 10 s.
    unreadable: Every,
    /// Heartbeats further apart than half the claim timeout: said at most once every 10 s.
    slow_heartbeat: Every,
}

/// What this instance holds: entries delivered to it, not yet acknowledged.
#[derive(Default)]
struct Local {
    held: HashMap<(Queue, TaskId), (String, Task)>,
    /// Held tasks handed to the worker.
    out: HashSet<(Queue, TaskId)>,
    groups: HashSet<Queue>,
    last_claim: HashMap<Queue, Instant>,
    /// When each queue's held entries were last heartbeated.
    last_beat: HashMap<Queue, Instant>,
    /// The heartbeat's own task runs ([`Inner::start_heartbeat`]).
    beating: bool,
    /// Where each queue's next takeover scan starts.
    cursors: HashMap<Queue, String>,
    depth: HashMap<Queue, (Depth, Instant)>,
    /// Queues committed to since their depth was read.
    dirty: HashSet<Queue>,
    /// Queues whose last [`Inner::fill`] failed: entries delivered to this instance then may
    /// not be held (an answer lost to a timeout or a cut connection, an adoption that
    /// failed), so the next one reads this consumer's own pending entries back first.
    unsure: HashSet<Queue>,
    refreshing: HashSet<Queue>,
    /// When Redis was last unreachable: the time of the last failure while it is, and the
    /// time it answered again once it does (`failing` tells which).
    cut_off: Option<Instant>,
    failing: bool,
    /// The server's clock less this instance's monotonic one ([`Inner::mono_ms`]), in
    /// milliseconds, and when it was read: at most the true difference (the server's time
    /// read against the moment its answer arrived), so that a commit's deadline falls no
    /// later than meant. Forgotten at any failure (a reconnect may reach another server) and
    /// read again after [`OFFSET_FOR`] (clocks drift).
    server_offset: Option<(i64, Instant)>,
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("url", &self.inner.url)
            .field("prefix", &self.inner.prefix)
            .field("consumer", &self.inner.consumer)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// The shortest [`RedisStoreBuilder::claim_timeout`]: three of the worker's default
    /// periods.
    pub const MIN_CLAIM_TIMEOUT: Duration = Duration::from_millis(300);

    /// A builder for the store at `url` (`redis://host:port/db`).
    pub fn builder(url: impl Into<String>) -> RedisStoreBuilder {
        RedisStoreBuilder {
            url: url.into(),
            prefix: "tower-degrade".to_owned(),
            consumer: None,
            claim_timeout: Duration::from_secs(60),
            capacity: 10_000_000,
            timeout: Duration::from_secs(2),
            forget_after: Duration::from_secs(86_400),
        }
    }

    /// This instance's consumer name.
    pub fn consumer(&self) -> &str {
        &self.inner.consumer
    }

    /// Connect and ask Redis for a `PING`: at startup, a wrong host, database or password is
    /// then an error here rather than on the first kept call ([`build`](RedisStoreBuilder::build)
    /// connects lazily). Also logs a warning when the server's append-only file is off
    /// (`INFO persistence`): a Redis restarted then loses every task it held. At startup, log
    /// a failed ping rather than exit with it: the store reconnects by itself, and instances
    /// restarted during an outage would otherwise crash-loop.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.inner.query(&redis::cmd("PING")).await?;
        // Managed servers may refuse INFO: then nothing is said.
        let info = match self
            .inner
            .query(redis::cmd("INFO").arg("persistence"))
            .await
        {
            Ok(Value::BulkString(b)) => String::from_utf8_lossy(&b).into_owned(),
            Ok(Value::SimpleString(s)) => s,
            Ok(Value::VerbatimString { text, .. }) => text,
            _ => String::new(),
        };
        if aof_off(&info) {
            tracing::warn!(
                store = %self.inner.url,
                "the Redis server's append-only file is off (aof_enabled:0): a restart loses \
                 every task it holds; run it with `appendonly yes` and `appendfsync always`"
            );
        }
        Ok(())
    }
}

/// Whether `INFO persistence` says the append-only file is off.
fn aof_off(info: &str) -> bool {
    info.lines().any(|l| l.trim_end() == "aof_enabled:0")
}

impl Inner {
    fn local(&self) -> MutexGuard<'_, Local> {
        self.local.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn stream(&self, queue: Queue) -> String {
        format!("{}:{}", self.prefix, queue.as_str())
    }

    /// Heartbeat what this instance holds on a timer of its own, every third of the claim
    /// timeout, and not only with the worker's steps: a step is a few Redis round trips per
    /// queue, and on a slow link steps came further apart than the claim timeout, so live
    /// instances took each other's tasks over and replayed them again (a trial with 100 ms
    /// added each way and a 1 s claim timeout: 34 calls applied twice). Started by the first
    /// read; it ends when the store is dropped.
    fn start_heartbeat(inner: &Arc<Inner>) {
        {
            let mut l = inner.local();
            if l.beating {
                return;
            }
            l.beating = true;
        }
        let weak = Arc::downgrade(inner);
        let every = inner.claim_timeout / 3;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else {
                    return;
                };
                let queues: HashSet<Queue> = inner.local().held.keys().map(|k| k.0).collect();
                for queue in queues {
                    // A failure is the worker's to say (its reads fail too).
                    let _ = inner.heartbeat(queue).await;
                }
            }
        });
    }

    /// Milliseconds since this store was built, on the monotonic clock.
    fn mono_ms(&self) -> i64 {
        i64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(i64::MAX)
    }

    /// The server's time `server_ms`, read by a command sent at `sent_ms` ([`Self::mono_ms`])
    /// and answered now. The offset it gives is a lower bound, the tighter the quicker the
    /// answer: it replaces the one known when the answer came back within a quarter of the
    /// timeout; a slower one is not kept (answers held back seconds by a stall, arriving
    /// together when it ends, made every deadline after them already past: 30 commits refused
    /// in a trial) and is used only when none is known. Returns the offset to use now.
    fn clock_sample(&self, sent_ms: i64, server_ms: i64) -> i64 {
        let now = self.mono_ms();
        let sample = server_ms - now;
        let quick = now - sent_ms <= i64::try_from(self.timeout.as_millis() / 4).unwrap_or(0);
        let mut l = self.local();
        match l.server_offset {
            _ if quick => {
                l.server_offset = Some((sample, Instant::now()));
                sample
            }
            Some((known, _)) => known,
            None => sample,
        }
    }

    /// How long after a commit is sent Redis may still apply it: three quarters of the
    /// timeout, so that its answer has the last quarter to come back before the instance
    /// gives up on it.
    fn late_after_ms(&self) -> i64 {
        i64::try_from(self.timeout.as_millis() * 3 / 4)
            .unwrap_or(i64::MAX)
            .max(1)
    }

    /// The server's clock less this instance's: known, or read with `TIME`. A reading that
    /// comes back slowly (held back by a stall that has just ended) is taken again once, and
    /// the second kept whatever its speed (a Redis that is always that slow).
    async fn server_offset(&self) -> Result<i64, StoreError> {
        if let Some((known, read)) = self.local().server_offset
            && read.elapsed() < OFFSET_FOR
        {
            return Ok(known);
        }
        let mut again = false;
        loop {
            let sent = self.mono_ms();
            let answer = self.query(&redis::cmd("TIME")).await?;
            let parts: Vec<i64> = match &answer {
                Value::Array(v) => v.iter().filter_map(|p| text(p)?.parse().ok()).collect(),
                _ => Vec::new(),
            };
            let [secs, micros] = parts[..] else {
                return Err(StoreError::new(
                    StoreErrorKind::Io,
                    format!(
                        "redis store `{}`: TIME answered {answer:?}, not seconds and microseconds",
                        self.url
                    ),
                ));
            };
            let server_ms = secs * 1000 + micros / 1000;
            // Kept if quick; a known one (stale, the reading slow) is good for another
            // `OFFSET_FOR`.
            let offset = self.clock_sample(sent, server_ms);
            let mut l = self.local();
            match l.server_offset.as_mut() {
                Some((_, read)) => {
                    *read = Instant::now();
                    return Ok(offset);
                }
                None if again => {
                    l.server_offset = Some((offset, Instant::now()));
                    return Ok(offset);
                }
                None => again = true,
            }
        }
    }

    fn error(&self, e: redis::RedisError) -> StoreError {
        let kind = match e.code() {
            Some("FULL") => StoreErrorKind::Full,
            Some("KEYTAKEN") => StoreErrorKind::KeyTaken,
            Some("GONE") => StoreErrorKind::Gone,
            _ => StoreErrorKind::Io,
        };
        if kind == StoreErrorKind::Io {
            let mut l = self.local();
            // Read again before the next commit, from whatever server answers then.
            l.server_offset = None;
            // Unreachable, unless Redis answered with an error: a `BUSYGROUP` when this
            // instance joined a group another had made kept it from taking anything over for
            // its first claim timeout.
            if e.code().is_none() {
                l.cut_off = Some(Instant::now());
                l.failing = true;
            }
        }
        let error = StoreError::new(kind, format!("redis store `{}`: {e}", self.url));
        // The commit script's refusals (it checks before it writes) and a refused connection
        // changed nothing; a timeout or a dropped connection may have changed something.
        if matches!(e.code(), Some("LATE" | "FULL" | "KEYTAKEN" | "GONE"))
            || e.is_connection_refusal()
        {
            error.unapplied()
        } else {
            error
        }
    }

    fn corrupt(&self, queue: Queue, what: impl fmt::Display) -> StoreError {
        StoreError::new(
            StoreErrorKind::Corrupt,
            format!("redis store `{}`, queue `{queue}`: {what}", self.url),
        )
    }

    async fn query(&self, cmd: &redis::Cmd) -> Result<Value, StoreError> {
        let mut conn = self.conn.clone();
        let answer = cmd.query_async(&mut conn).await;
        if answer.is_ok() {
            let mut l = self.local();
            if l.failing {
                // Answering again: the outage ends now.
                l.failing = false;
                l.cut_off = Some(Instant::now());
            }
        }
        answer.map_err(|e| {
            // The consumer groups are gone (a Redis that came back empty, a stream deleted):
            // create them again on the next read rather than fail every read for ever. What
            // that Redis held is gone with them, tasks already answered `202` too: say so, once
            // per loss (the groups are known again until the next one).
            if e.to_string().contains("NOGROUP") {
                let mut l = self.local();
                if !l.groups.is_empty() {
                    l.groups.clear();
                    tracing::warn!(
                        store = %self.url,
                        "redis store: its consumer groups are gone (a Redis restarted without \
                         persistence, or its streams deleted): the tasks it kept and had not yet \
                         replayed are lost; creating the groups again. Run Redis with \
                         `appendonly yes` and `appendfsync always`"
                    );
                }
            }
            self.error(e)
        })
    }

    async fn ensure_group(&self, queue: Queue) -> Result<(), StoreError> {
        if self.local().groups.contains(&queue) {
            return Ok(());
        }
        let mut cmd = redis::cmd("XGROUP");
        cmd.arg("CREATE")
            .arg(self.stream(queue))
            .arg(GROUP)
            .arg("0")
            .arg("MKSTREAM");
        match self.query(&cmd).await {
            Ok(_) => {}
            Err(e) if e.to_string().contains("BUSYGROUP") => {}
            Err(e) => return Err(e),
        }
        self.local().groups.insert(queue);
        self.forget_consumers(queue).await;
        Ok(())
    }

    /// [`FORGET`]: best effort (a failure is logged, and tried again at the next start).
    async fn forget_consumers(&self, queue: Queue) {
        let mut inv = self.forget.prepare_invoke();
        inv.arg(self.stream(queue))
            .arg(GROUP)
            .arg(u64::try_from(self.forget_after.as_millis()).unwrap_or(u64::MAX))
            .arg(&self.consumer);
        let mut conn = self.conn.clone();
        match inv.invoke_async::<i64>(&mut conn).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(store = %self.url, queue = %queue, removed = n,
                "redis store: removed consumers of earlier starts that held nothing"),
            Err(e) => tracing::warn!(store = %self.url, queue = %queue, error = %e,
                "redis store: could not remove the consumers of earlier starts"),
        }
    }

    /// [`fill_held`](Self::fill_held); a queue it fails for is marked
    /// [`unsure`](Local::unsure) until one succeeds.
    async fn fill(&self, queue: Queue, want: usize) -> Result<(), StoreError> {
        let unsure = self.local().unsure.contains(&queue);
        let result = self.fill_held(queue, want, unsure).await;
        let mut l = self.local();
        if result.is_err() {
            l.unsure.insert(queue);
        } else if unsure {
            l.unsure.remove(&queue);
        }
        result
    }

    /// This consumer's own pending entries that it does not hold (`XREADGROUP` from `0`: the
    /// entries delivered to it and not acknowledged). Without this, an entry whose delivery
    /// answer was lost waited for the claim timeout to be taken over, and was then said to
    /// be an abandoned instance's (a trial: one task replayed 66 s after Redis, stalled and
    /// restarted, answered again).
    async fn own_pending(
        &self,
        queue: Queue,
        stream: &str,
    ) -> Result<Vec<(String, HashMap<String, Vec<u8>>)>, StoreError> {
        const PAGE: usize = 256;
        let held: HashSet<String> = {
            let l = self.local();
            l.held
                .iter()
                .filter(|((q, _), _)| *q == queue)
                .map(|(_, (entry, _))| entry.clone())
                .collect()
        };
        let (mut from, mut out) = ("0".to_owned(), Vec::new());
        loop {
            let page = self.read_group(stream, PAGE, &from).await?;
            let Some((last, _)) = page.last() else {
                return Ok(out);
            };
            let full = page.len() >= PAGE;
            from = last.clone();
            out.extend(page.into_iter().filter(|(entry, _)| !held.contains(entry)));
            if !full {
                return Ok(out);
            }
        }
    }

    /// `XREADGROUP` of up to `count` entries of `stream` for this consumer: from `>`, new
    /// ones (delivered to it now); from an entry id, its own pending ones after that id.
    async fn read_group(
        &self,
        stream: &str,
        count: usize,
        from: &str,
    ) -> Result<Vec<(String, HashMap<String, Vec<u8>>)>, StoreError> {
        let mut read = redis::cmd("XREADGROUP");
        read.arg("GROUP")
            .arg(GROUP)
            .arg(&self.consumer)
            .arg("COUNT")
            .arg(count)
            .arg("STREAMS")
            .arg(stream)
            .arg(from);
        let mut entries = Vec::new();
        if let Value::Array(streams) = self.query(&read).await? {
            for s in streams {
                if let Value::Array(mut kv) = s
                    && kv.len() == 2
                {
                    entries.extend(parse_entries(kv.pop().unwrap_or(Value::Nil)));
                }
            }
        }
        Ok(entries)
    }

    /// Read up to `want` new entries (no more: other instances share the rest), take over
    /// abandoned ones, heartbeat held ones; with `unsure`, first the entries delivered to this
    /// instance that it does not hold ([`own_pending`](Self::own_pending)).
    async fn fill_held(&self, queue: Queue, want: usize, unsure: bool) -> Result<(), StoreError> {
        self.ensure_group(queue).await?;
        let stream = self.stream(queue);
        let mut entries = if unsure {
            self.own_pending(queue, &stream).await?
        } else {
            Vec::new()
        };
        if want > 0 {
            entries.extend(self.read_group(&stream, want, ">").await?);
        }
        let due_claim = {
            let l = self.local();
            l.last_claim
                .get(&queue)
                .is_none_or(|t| t.elapsed() >= self.claim_timeout / 3)
        };
        let mut taken = 0;
        if due_claim {
            self.heartbeat(queue).await?;
            self.local().last_claim.insert(queue, Instant::now());
            // Not within a claim timeout of Redis answering again: while it was unreachable
            // no instance could heartbeat, so every entry pending then looks abandoned when
            // it answers, and the first instance back took the others' (and replayed them a
            // second time: 23-46 % of a backfill after an 8 s outage). The others heartbeat
            // theirs within a third of the claim timeout of it answering.
            let cut_off = {
                let l = self.local();
                l.failing || l.cut_off.is_some_and(|t| t.elapsed() < self.claim_timeout)
            };
            if !cut_off {
                let claimed = self.take_over(queue, &stream).await?;
                taken = claimed.len();
                entries.extend(claimed);
            }
        }
        let mut tasks = Vec::with_capacity(entries.len());
        let first_taken = entries.len() - taken;
        let mut taken_tasks = 0usize;
        for (i, (entry, fields)) in entries.into_iter().enumerate() {
            // Left pending: a record this version cannot read may be a newer version's
            // (instances upgraded one by one), which takes it over after the claim timeout.
            let decoded = match fields.get("t") {
                Some(record) => Task::decode(record).map_err(|e| e.to_string()),
                None => Err("no task record (`t` field): not written by this library?".to_owned()),
            };
            match decoded {
                Ok(task) => {
                    taken_tasks += usize::from(i >= first_taken);
                    tasks.push((entry, task));
                }
                Err(e) => {
                    if let Some(held) = self.unreadable.ready() {
                        tracing::error!(store = %self.url, queue = %queue, entry = %entry, error = %e,
                            also_unreadable = held,
                            "an unreadable stream entry is left pending (said at most every 10 s; \
                             `also_unreadable`: such entries met since the last line)");
                    }
                }
            }
        }
        if taken_tasks > 0 {
            tracing::warn!(store = %self.url, queue = %queue, consumer = %self.consumer,
                tasks = taken_tasks, claim_timeout_ms = self.claim_timeout.as_millis() as u64,
                "took over tasks pending without a heartbeat for the claim timeout (an instance \
                 stopped or stalled)");
        }
        if tasks.is_empty() {
            return Ok(());
        }
        let verdicts = self.adopt(queue, &tasks).await?;
        let mut l = self.local();
        for ((entry, task), verdict) in tasks.into_iter().zip(verdicts) {
            match verdict {
                0 | 1 => {
                    if verdict == 1 {
                        tracing::warn!(store = %self.url, queue = %queue, entry = %entry, task = %task.id(),
                            "a stream entry missing from the index was indexed (copied or restored by hand?)");
                    }
                    l.held.insert((queue, task.id()), (entry, task));
                }
                2 => {
                    tracing::warn!(store = %self.url, queue = %queue, entry = %entry, task = %task.id(),
                        "a second stream entry of a kept task was deleted (the task stays in the indexed one)");
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// [`ADOPT`] over entries just delivered: a verdict for each.
    async fn adopt(&self, queue: Queue, tasks: &[(String, Task)]) -> Result<Vec<i64>, StoreError> {
        let mut inv = self.adopt.prepare_invoke();
        inv.arg(&self.prefix).arg(GROUP).arg(queue.as_str());
        for (entry, task) in tasks {
            inv.arg(task.id().to_string())
                .arg(entry)
                .arg(key_field(task));
        }
        let mut conn = self.conn.clone();
        let verdicts: Vec<i64> = inv
            .invoke_async(&mut conn)
            .await
            .map_err(|e| self.error(e))?;
        if verdicts.len() != tasks.len() {
            return Err(self.corrupt(
                queue,
                format_args!("{} verdicts for {} entries", verdicts.len(), tasks.len()),
            ));
        }
        Ok(verdicts)
    }

    /// `XAUTOCLAIM` of entries pending for longer than the claim timeout, from where the last
    /// scan stopped.
    async fn take_over(
        &self,
        queue: Queue,
        stream: &str,
    ) -> Result<Vec<(String, HashMap<String, Vec<u8>>)>, StoreError> {
        let cursor = self
            .local()
            .cursors
            .get(&queue)
            .cloned()
            .unwrap_or_else(|| "0-0".to_owned());
        let mut claim = redis::cmd("XAUTOCLAIM");
        claim
            .arg(stream)
            .arg(GROUP)
            .arg(&self.consumer)
            .arg(self.claim_timeout.as_millis() as u64)
            .arg(cursor)
            .arg("COUNT")
            .arg(512);
        let Value::Array(mut parts) = self.query(&claim).await? else {
            return Ok(Vec::new());
        };
        // Where the next scan goes on ("0-0" once the whole list was scanned).
        if let Some(next) = parts.first().and_then(text) {
            self.local().cursors.insert(queue, next);
        }
        Ok(if parts.len() >= 2 {
            parse_entries(parts.swap_remove(1))
        } else {
            Vec::new()
        })
    }

    /// Reset the idle time of the entries this instance holds (those `XPENDING` says are
    /// still its own); forget the ones another instance took over.
    async fn heartbeat(&self, queue: Queue) -> Result<(), StoreError> {
        let beat = self.beat(queue).await;
        if !matches!(beat, Ok(true)) {
            // Nothing held, or Redis not answering: the next beat's gap is not Redis's pace.
            self.local().last_beat.remove(&queue);
        }
        beat.map(drop)
    }

    /// [`Self::heartbeat`]: whether it heartbeated any entry.
    async fn beat(&self, queue: Queue) -> Result<bool, StoreError> {
        let held: HashMap<String, TaskId> = self
            .local()
            .held
            .iter()
            .filter(|((q, _), _)| *q == queue)
            .map(|((_, id), (entry, _))| (entry.clone(), *id))
            .collect();
        if held.is_empty() {
            return Ok(false);
        }
        let mut inv = self.heartbeat_script.prepare_invoke();
        inv.arg(self.stream(queue)).arg(GROUP).arg(&self.consumer);
        for entry in held.keys() {
            inv.arg(entry);
        }
        let mut conn = self.conn.clone();
        let mine: HashSet<String> = match inv.invoke_async::<Value>(&mut conn).await {
            Ok(Value::Array(v)) => v.iter().filter_map(text).collect(),
            // Not forgotten on an answer this version does not expect.
            Ok(other) => {
                return Err(StoreError::new(
                    StoreErrorKind::Io,
                    format!(
                        "redis store `{}`: the heartbeat answered {other:?}",
                        self.url
                    ),
                ));
            }
            Err(e) => return Err(self.error(e)),
        };
        let lost: Vec<TaskId> = held
            .iter()
            .filter(|(e, _)| !mine.contains(*e))
            .map(|(_, id)| *id)
            .collect();
        if !lost.is_empty() {
            let mut l = self.local();
            for id in lost {
                l.held.remove(&(queue, id));
                l.out.remove(&(queue, id));
            }
        }
        if mine.is_empty() {
            return Ok(false);
        }
        let since = self.local().last_beat.insert(queue, Instant::now());
        // On a link so slow that even the heartbeat's own timer cannot keep them within the
        // claim timeout, other instances take this one's tasks over and replay them again.
        if let Some(gap) = since
            .map(|t| t.elapsed())
            .filter(|gap| *gap > self.claim_timeout / 2)
            && let Some(also) = self.slow_heartbeat.ready()
        {
            tracing::warn!(store = %self.url, queue = %queue, consumer = %self.consumer,
                    heartbeat_gap_ms = gap.as_millis() as u64,
                    claim_timeout_ms = self.claim_timeout.as_millis() as u64,
                    also_slow = also,
                    "this instance's tasks were heartbeated more than half the claim timeout \
                     apart (Redis answers that slowly): other instances may take them over and \
                     replay them again; raise claim_timeout (said at most every 10 s)");
        }
        Ok(true)
    }

    async fn refresh_depth(&self, queue: Queue) -> Result<Depth, StoreError> {
        let mut inv = self.depth_script.prepare_invoke();
        inv.arg(self.stream(queue));
        let mut conn = self.conn.clone();
        let reply: Vec<Value> = inv
            .invoke_async(&mut conn)
            .await
            .map_err(|e| self.error(e))?;
        let len = match reply.first() {
            Some(Value::Int(n)) => (*n).max(0) as u64,
            _ => 0,
        };
        let oldest = match (reply.get(1).and_then(text).as_deref(), reply.get(2)) {
            (Some("c"), Some(v)) => text(v).and_then(|c| c.parse().ok()),
            (Some("t"), Some(Value::BulkString(t))) => Task::decode(t).ok().map(|t| t.created_ms()),
            _ => None,
        };
        let d = Depth {
            len,
            oldest_ms: oldest,
        };
        let mut l = self.local();
        l.depth.insert(queue, (d, Instant::now()));
        l.dirty.remove(&queue);
        Ok(d)
    }

    async fn entry_of(&self, queue: Queue, id: TaskId) -> Result<Option<String>, StoreError> {
        let ids = format!("{}:ids", self.stream(queue));
        Ok(text(
            &self
                .query(redis::cmd("HGET").arg(ids).arg(id.to_string()))
                .await?,
        ))
    }

    /// Up to `limit` tasks from entry `start` on (`-`, an entry id, or `(` and one for after
    /// it). A record that cannot be read is an error when `strict` (the one task asked for),
    /// else skipped with an error logged, and the page filled from the entries after it: one
    /// entry not written by this library does not hide every kept task from the review API.
    async fn range(
        &self,
        queue: Queue,
        mut start: String,
        limit: usize,
        strict: bool,
    ) -> Result<Vec<Task>, StoreError> {
        let mut out = Vec::new();
        while out.len() < limit {
            let want = limit - out.len();
            let mut cmd = redis::cmd("XRANGE");
            cmd.arg(self.stream(queue))
                .arg(&start)
                .arg("+")
                .arg("COUNT")
                .arg(want);
            let entries = parse_entries(self.query(&cmd).await?);
            let read = entries.len();
            for (entry, fields) in entries {
                let decoded = match fields.get("t") {
                    Some(record) => Task::decode(record).map_err(|e| e.to_string()),
                    None => Err("no task record (`t` field)".to_owned()),
                };
                match decoded {
                    Ok(task) => out.push(task),
                    Err(e) if strict => {
                        return Err(self.corrupt(queue, format_args!("entry {entry}: {e}")));
                    }
                    Err(e) => {
                        tracing::error!(store = %self.url, queue = %queue, entry = %entry, error = %e,
                            "an unreadable stream entry is skipped in a listing");
                    }
                }
                start = format!("({entry}");
            }
            if read < want {
                break;
            }
        }
        Ok(out)
    }
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

/// `[[entry id, [field, value, ...]], ...]` as (entry id, fields).
fn parse_entries(v: Value) -> Vec<(String, HashMap<String, Vec<u8>>)> {
    let Value::Array(entries) = v else {
        return Vec::new();
    };
    let mut out = Vec::with_capacity(entries.len());
    for e in entries {
        let Value::Array(mut parts) = e else { continue };
        if parts.len() != 2 {
            continue;
        }
        let fields = parts.pop().unwrap_or(Value::Nil);
        let Some(id) = text(&parts[0]) else { continue };
        let mut map = HashMap::new();
        if let Value::Array(kv) = fields {
            for pair in kv.chunks(2) {
                if let [k, Value::BulkString(v)] = pair
                    && let Some(k) = text(k)
                {
                    map.insert(k, v.clone());
                }
            }
        }
        out.push((id, map));
    }
    out
}

fn key_field(task: &Task) -> String {
    task.client_key()
        .map(|k| format!("{}\n{k}", task.class()))
        .unwrap_or_default()
}

impl Store for RedisStore {
    fn commit(&self, ops: Vec<Op>) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            let inner = &self.inner;
            // Not read: the commit is not sent.
            let offset = inner.server_offset().await.map_err(StoreError::unapplied)?;
            let sent = inner.mono_ms();
            let deadline = sent
                .saturating_add(offset)
                .saturating_add(inner.late_after_ms());
            let mut inv = inner.commit.prepare_invoke();
            inv.arg(&inner.prefix)
                .arg(GROUP)
                .arg(inner.capacity)
                .arg(deadline);
            for op in &ops {
                match op {
                    Op::Put(q, task) => {
                        inv.arg("P")
                            .arg(q.as_str())
                            .arg(task.id().to_string())
                            .arg(key_field(task))
                            .arg(task.created_ms())
                            .arg(task.encode());
                    }
                    Op::Remove(q, id) => {
                        inv.arg("R").arg(q.as_str()).arg(id.to_string());
                    }
                }
            }
            let mut conn = inner.conn.clone();
            match inv.invoke_async::<Value>(&mut conn).await {
                Ok(Value::Int(server_ms)) => {
                    inner.clock_sample(sent, server_ms);
                }
                Ok(_) => {}
                // A failure, `LATE` too, has the clock read again before the next commit.
                Err(e) => return Err(inner.error(e)),
            }
            let mut l = inner.local();
            for op in &ops {
                let k = match op {
                    Op::Put(q, t) => (*q, t.id()),
                    Op::Remove(q, id) => (*q, *id),
                };
                l.held.remove(&k);
                l.out.remove(&k);
                l.dirty.insert(k.0);
            }
            Ok(())
        })
    }

    fn due(&self, queue: Queue, now_ms: u64, limit: usize) -> StoreFuture<'_, Vec<Task>> {
        Box::pin(async move {
            Inner::start_heartbeat(&self.inner);
            let idle = {
                let l = self.inner.local();
                // Held tasks due now take slots; those waiting for a later time do not.
                l.held
                    .iter()
                    .filter(|(k, (_, t))| {
                        k.0 == queue && t.due_ms() <= now_ms && !l.out.contains(k)
                    })
                    .count()
            };
            self.inner.fill(queue, limit.saturating_sub(idle)).await?;
            let mut l = self.inner.local();
            let mut due: Vec<(u64, TaskId)> = l
                .held
                .iter()
                .filter(|((q, id), (_, t))| {
                    *q == queue && t.due_ms() <= now_ms && !l.out.contains(&(*q, *id))
                })
                .map(|((_, id), (_, t))| (t.due_ms(), *id))
                .collect();
            due.sort_unstable();
            due.truncate(limit);
            let mut out = Vec::with_capacity(due.len());
            for (_, id) in due {
                l.out.insert((queue, id));
                if let Some((_, t)) = l.held.get(&(queue, id)) {
                    out.push(t.clone());
                }
            }
            Ok(out)
        })
    }

    fn release(&self, queue: Queue, id: TaskId) {
        self.inner.local().out.remove(&(queue, id));
    }

    fn list(
        &self,
        queue: Queue,
        after: Option<TaskId>,
        limit: usize,
    ) -> StoreFuture<'_, Vec<Task>> {
        Box::pin(async move {
            let start = match after {
                None => "-".to_owned(),
                Some(a) => match self.inner.entry_of(queue, a).await? {
                    Some(entry) => format!("({entry}"),
                    // Gone meanwhile: from the time it was made.
                    None => format!("{}-0", a.created_ms()),
                },
            };
            self.inner.range(queue, start, limit, false).await
        })
    }

    fn get(&self, queue: Queue, id: TaskId) -> StoreFuture<'_, Option<Task>> {
        Box::pin(async move {
            let Some(entry) = self.inner.entry_of(queue, id).await? else {
                return Ok(None);
            };
            Ok(self
                .inner
                .range(queue, entry, 1, true)
                .await?
                .into_iter()
                .find(|t| t.id() == id))
        })
    }

    fn find_key<'a>(
        &'a self,
        class: &'a str,
        key: &'a str,
    ) -> StoreFuture<'a, Option<(Queue, TaskId)>> {
        Box::pin(async move {
            let keys = format!("{}:keys", self.inner.prefix);
            let field = format!("{class}\n{key}");
            let found = text(
                &self
                    .inner
                    .query(redis::cmd("HGET").arg(keys).arg(field))
                    .await?,
            );
            Ok(found.and_then(|v| {
                let (q, id) = v.split_once(' ')?;
                let queue = Queue::ALL.into_iter().find(|x| x.as_str() == q)?;
                Some((queue, id.parse().ok()?))
            }))
        })
    }

    /// From a cache refreshed in the background at most every 100 ms (a Redis round trip
    /// cannot be made here).
    fn depth(&self, queue: Queue) -> Depth {
        let (cached, stale) = {
            let mut l = self.inner.local();
            let cached = l.depth.get(&queue).copied();
            let stale = l.dirty.contains(&queue)
                || cached.is_none_or(|(_, at)| at.elapsed() >= Duration::from_millis(100));
            let start = stale && l.refreshing.insert(queue);
            (cached.map(|(d, _)| d), start)
        };
        if stale {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                let inner = self.inner.clone();
                rt.spawn(async move {
                    if let Err(e) = inner.refresh_depth(queue).await {
                        tracing::debug!(error = %e, "redis store: depth not refreshed");
                    }
                    inner.local().refreshing.remove(&queue);
                });
            } else {
                self.inner.local().refreshing.remove(&queue);
            }
        }
        cached.unwrap_or_default()
    }

    fn kind(&self) -> &'static str {
        "redis"
    }

    /// From the depths' cache (above): what every instance sharing the store holds, as of at
    /// most 100 ms ago.
    fn usage(&self) -> Option<Usage> {
        let held = Queue::ALL
            .into_iter()
            .filter(|q| *q != Queue::Audit)
            .map(|q| self.depth(q).len)
            .sum();
        Some(Usage {
            held,
            capacity: self.inner.capacity,
        })
    }

    fn claim_timeout(&self) -> Option<Duration> {
        Some(self.inner.claim_timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::{RedisStore, redact};

    #[tokio::test]
    async fn a_slow_reading_of_the_servers_clock_never_moves_deadlines_later() {
        // Built without connecting. A reading answered after a stall understates the offset
        // by the stall: kept, it made every deadline after it already past.
        let store = RedisStore::builder("redis://127.0.0.1:1")
            .timeout(std::time::Duration::from_secs(2))
            .build()
            .unwrap();
        let inner = &store.inner;
        let slow = || inner.mono_ms() - 5_000;
        // Slow, none known: used once, not kept.
        let once = inner.clock_sample(slow(), 1_000_000) + inner.mono_ms();
        assert!((1_000_000..=1_000_010).contains(&once), "{once}");
        assert!(inner.local().server_offset.is_none());
        // Quick: kept.
        let now = inner.mono_ms();
        let kept = inner.clock_sample(now, now + 7_000);
        assert!((6_900..=7_000).contains(&kept), "{kept}");
        assert_eq!(inner.local().server_offset.map(|o| o.0), Some(kept));
        // Slow: ignored, higher or lower (a stall's answers, arriving together when it ends,
        // made the commits after them late).
        assert_eq!(inner.clock_sample(slow(), inner.mono_ms() + 60_000), kept);
        assert_eq!(inner.clock_sample(slow(), inner.mono_ms() + 1_000), kept);
        assert_eq!(inner.local().server_offset.map(|o| o.0), Some(kept));
    }

    #[test]
    fn a_url_is_shown_without_its_password() {
        assert_eq!(
            redact("redis://:s3cret@cache.internal:6379/2"),
            "redis://:***@cache.internal:6379/2"
        );
        assert_eq!(
            redact("rediss://app:p@ss@cache/0"),
            "rediss://app:***@cache/0"
        );
        assert_eq!(redact("redis://app@cache"), "redis://app@cache");
        assert_eq!(redact("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
        assert_eq!(redact("not a url"), "not a url");
        // A Unix socket's URL carries the password as a query parameter.
        assert_eq!(
            redact("redis+unix:///run/redis.sock?db=0&pass=s3cret"),
            "redis+unix:///run/redis.sock?db=0&pass=***"
        );
        assert_eq!(
            redact("unix:///run/redis.sock?PASSWORD=s3cret&user=app"),
            "unix:///run/redis.sock?PASSWORD=***&user=app"
        );
        assert_eq!(
            redact("redis://app:s3cret@cache/0?protocol=resp3"),
            "redis://app:***@cache/0?protocol=resp3"
        );
        assert_eq!(
            redact("redis://cache?pass=s3cret"),
            "redis://cache?pass=***"
        );
    }
}
