//! The simulated dependencies (a database with a connection pool, Redis, a third-party payment
//! API, a third-party analytics API), each behind its own chaos handle, and the effects the
//! service has on them, recorded so the storm can check that nothing accepted was lost or
//! applied twice.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Semaphore;
use tower::util::BoxCloneSyncService;
use tower::{Layer, ServiceExt, service_fn};
use tower_degrade::chaos::{Chaos, Target};
use tower_degrade::{BoxError, ClassId, Degrader};

use crate::config::Config;

/// One simulated dependency. A call takes its base time, plus what the chaos handle injects
/// for the calling class; the database's calls hold one of its connections throughout, so a
/// slow database is also a saturated one.
#[derive(Clone)]
pub(crate) struct Dependency {
    pub(crate) name: &'static str,
    pub(crate) chaos: Chaos,
    pool: Option<Arc<Semaphore>>,
    svc: BoxCloneSyncService<ClassId, (), BoxError>,
}

impl Dependency {
    fn new(
        degrader: &Degrader,
        name: &'static str,
        base: Duration,
        pool: Option<usize>,
        seed: u64,
    ) -> Self {
        let chaos = Chaos::builder(degrader).seed(seed).build();
        let work = service_fn(move |_class: ClassId| async move {
            tokio::time::sleep(base).await;
            Ok::<_, BoxError>(())
        });
        let classify = |class: &ClassId| *class;
        let svc = BoxCloneSyncService::new(chaos.layer(classify).layer(work));
        Self {
            name,
            chaos,
            pool: pool.map(|n| Arc::new(Semaphore::new(n))),
            svc,
        }
    }

    /// One call made for `class`.
    pub(crate) async fn call(&self, class: ClassId) -> Result<(), BoxError> {
        let _connection = match &self.pool {
            Some(pool) => Some(pool.acquire().await?),
            None => None,
        };
        self.svc.clone().oneshot(class).await
    }
}

/// The dependencies, by the names classes depend on.
pub(crate) struct World {
    pub(crate) db: Dependency,
    pub(crate) redis: Dependency,
    pub(crate) payments: Dependency,
    pub(crate) analytics: Dependency,
    pub(crate) effects: Effects,
}

impl World {
    pub(crate) fn new(config: &Config, degrader: &Degrader) -> World {
        let d = &config.dependencies;
        let seed = config.storm.seed;
        let ms = Duration::from_millis;
        World {
            db: Dependency::new(
                degrader,
                "db",
                ms(d.db_query_ms),
                Some(d.db_connections),
                seed,
            ),
            redis: Dependency::new(degrader, "redis", ms(d.redis_ms), None, seed ^ 1),
            payments: Dependency::new(
                degrader,
                "third_party:payments",
                ms(d.payments_api_ms),
                None,
                seed ^ 2,
            ),
            analytics: Dependency::new(
                degrader,
                "third_party:analytics",
                ms(d.analytics_api_ms),
                None,
                seed ^ 3,
            ),
            effects: Effects::default(),
        }
    }

    pub(crate) fn all(&self) -> [&Dependency; 4] {
        [&self.db, &self.redis, &self.payments, &self.analytics]
    }

    /// The dependency a fault target names, if it names one.
    pub(crate) fn dependency(&self, target: &Target) -> Option<&Dependency> {
        match target {
            Target::Dependency(name) => self.all().into_iter().find(|d| d.name == name),
            _ => None,
        }
    }
}

/// What the service did, keyed by idempotency key where the effect must happen once.
#[derive(Default)]
pub(crate) struct Effects {
    /// Payment callbacks recorded, and how many times each key was applied.
    pub(crate) payments: Mutex<HashMap<String, u32>>,
    /// Refunds made through the payment provider.
    pub(crate) refunds: Mutex<HashMap<String, u32>>,
    /// Order events processed.
    pub(crate) events: Mutex<HashMap<u64, u32>>,
    /// Browse events delivered to the analytics API, and of them, backfilled.
    pub(crate) browse_logged: AtomicU64,
    pub(crate) browse_backfilled: AtomicU64,
    /// Inventory: deltas applied one by one, merged writes and the deltas in them.
    pub(crate) inventory_direct: AtomicU64,
    pub(crate) inventory_writes: AtomicU64,
    pub(crate) inventory_merged: AtomicU64,
    /// Order-timeout checks run.
    pub(crate) timeout_checks: AtomicU64,
}

impl Effects {
    pub(crate) fn apply(map: &Mutex<HashMap<String, u32>>, key: &str) {
        *map.lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key.to_owned())
            .or_default() += 1;
    }

    /// Keys applied more than once.
    pub(crate) fn doubled<K>(map: &Mutex<HashMap<K, u32>>) -> usize {
        map.lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter(|n| **n > 1)
            .count()
    }

    pub(crate) fn count(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}
