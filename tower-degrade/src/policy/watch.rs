//! Hot reload: watch the policy directory, debounce, reload atomically.

use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::error::PolicyError;

/// The outcome of the last (re)load.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReloadOutcome {
    /// The set of this version is in force.
    Loaded(u64),
    /// The load was rejected; the set in force did not change.
    Rejected(PolicyError),
}

/// Reloads a degrader's policies from a directory when it changes (or when asked).
///
/// Changes are debounced: a reload runs once no change has been seen for the debounce
/// duration, so an editor's burst of writes makes one reload. A rejected reload leaves the set
/// in force serving. The watcher stops when dropped.
///
/// File events are not all a deployment produces: a directory removed and created again
/// loses its watch, a Kubernetes ConfigMap update swaps the `..data` symlink (no `*.rhai`
/// event), an edit to a symlinked file's target happens elsewhere. So the watcher also
/// rescans every [`RESCAN`]: the names and contents of the `*.rhai` files (symlinks followed)
/// are hashed, and a different hash reloads. A directory that is gone keeps the set in force
/// until it is back (and [`keep_watching_policies`](crate::Degrader::keep_watching_policies)
/// starts on one that is not there yet).
///
/// ```no_run
/// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use tower_degrade::{ClassConfig, Degrader};
///
/// let degrader = Degrader::builder("shop").class(ClassConfig::gold("pay")).build()?;
/// let watcher = degrader.watch_policies("policies", Duration::from_millis(200))?;
/// let mut outcomes = watcher.subscribe();
/// // ... later: edit a file in policies/, then
/// outcomes.changed().await?;
/// println!("{:?}", *outcomes.borrow());
/// # Ok(()) }
/// ```
#[derive(Debug)]
#[must_use = "policies reload only while the watcher is kept: dropping it stops the reloads"]
pub struct PolicyWatcher {
    _watcher: Option<notify::RecommendedWatcher>,
    trigger: mpsc::Sender<bool>,
    outcomes: watch::Receiver<ReloadOutcome>,
    task: JoinHandle<()>,
}

impl Drop for PolicyWatcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// How often a watched policy directory is rescanned for changes its events missed.
pub const RESCAN: Duration = Duration::from_secs(1);

/// The names and contents of the `*.rhai` files of `dir`, symlinks followed; `None` if the
/// directory cannot be read (gone for now).
fn fingerprint(dir: &Path) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    let mut total = 0;
    for (p, regular) in super::compile::entries(dir).ok()? {
        p.file_name().hash(&mut h);
        regular.hash(&mut h);
        // Past the set's limit the load refuses the directory: names stand for it from there.
        if regular && total <= super::MAX_SET_BYTES {
            // An oversized file is refused by the load: its length stands for its content.
            match super::compile::read_source(&p) {
                Ok(bytes) => {
                    total += bytes.len();
                    bytes.hash(&mut h)
                }
                Err(Err(len)) => len.hash(&mut h),
                Err(Ok(_)) => {}
            }
        }
    }
    Some(h.finish())
}

/// Loads a policy directory into a degrader, returning the version in force.
pub(crate) type Loader = std::sync::Arc<dyn Fn(&Path) -> Result<u64, PolicyError> + Send + Sync>;

impl PolicyWatcher {
    /// Load `dir` with `load` now, then again on every change (when `watch_fs`) and every
    /// [`reload_now`](Self::reload_now), debounced. Built by
    /// [`Degrader::watch_policies`](crate::Degrader::watch_policies) and
    /// [`Degrader::reload_policies_on_demand`](crate::Degrader::reload_policies_on_demand).
    /// `must_load`: a first load that fails is the error; otherwise it is the first outcome,
    /// and the watch goes on.
    pub(crate) fn start(
        load: Loader,
        dir: PathBuf,
        debounce: Duration,
        watch_fs: bool,
        must_load: bool,
    ) -> Result<Self, PolicyError> {
        // Taken before the load: a change made right after it is a change.
        let last = fingerprint(&dir);
        let first = match load(&dir) {
            Ok(version) => ReloadOutcome::Loaded(version),
            Err(e) if must_load => return Err(e),
            Err(e) => ReloadOutcome::Rejected(e),
        };
        let (trigger, signals) = mpsc::channel(1);
        let watcher = match watch_fs.then(|| fs_watcher(&dir, trigger.clone())) {
            Some(Ok(watcher)) => Some(watcher),
            Some(Err(e)) if must_load => return Err(e),
            // Kept watching without the file events: a directory not there yet (a volume
            // mounted after the process starts) or past the system's limit of watches is
            // still rescanned every RESCAN, and loaded once its files are there.
            Some(Err(e)) => {
                tracing::warn!(
                    dir = %dir.display(),
                    error = %e.reason(),
                    "the policy directory is not watched for changes: it is rescanned every {} s",
                    RESCAN.as_secs()
                );
                None
            }
            None => None,
        };
        let (tx, outcomes) = watch::channel(first);
        let rescan = watch_fs.then_some(RESCAN);
        let task = tokio::spawn(reload_loop(load, dir, last, signals, debounce, rescan, tx));
        Ok(Self {
            _watcher: watcher,
            trigger,
            outcomes,
            task,
        })
    }

    /// Ask for a reload (debounced like a file change).
    pub fn reload_now(&self) {
        // A full channel already holds a pending reload: nothing is lost.
        let _ = self.trigger.try_send(true);
    }

    /// The outcome of every (re)load, starting with the first.
    pub fn subscribe(&self) -> watch::Receiver<ReloadOutcome> {
        self.outcomes.clone()
    }
}

fn fs_watcher(
    dir: &Path,
    trigger: mpsc::Sender<bool>,
) -> Result<notify::RecommendedWatcher, PolicyError> {
    let err = |e: notify::Error| {
        // notify says "No path was found" of a directory that is not there.
        let reason = if dir.is_dir() {
            format!("cannot watch the policy directory: {e}")
        } else {
            "cannot watch the policy directory: it does not exist or is not a directory".into()
        };
        PolicyError::new(&dir.display().to_string(), None, reason)
    };
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        let Ok(event) = res else { return };
        // Any change in the directory: `..data` swaps name no `*.rhai` file. The reload loop
        // reloads only if the policy files' contents changed.
        let relevant = matches!(
            event.kind,
            EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_)
        );
        if relevant {
            let _ = trigger.try_send(false);
        }
    })
    .map_err(err)?;
    watcher
        .watch(dir, RecursiveMode::NonRecursive)
        .map_err(err)?;
    Ok(watcher)
}

async fn reload_loop(
    load: Loader,
    dir: PathBuf,
    mut last: Option<u64>,
    mut signals: mpsc::Receiver<bool>,
    debounce: Duration,
    rescan: Option<Duration>,
    outcomes: watch::Sender<ReloadOutcome>,
) {
    // Said once when the directory cannot be read, once when it can again.
    let mut unreadable = last.is_none();
    let mut ticks = rescan.map(|every| {
        let mut t = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        t
    });
    loop {
        // `reload_now` always reloads; a file event or a rescan only when the files changed.
        let mut forced = match &mut ticks {
            Some(t) => tokio::select! {
                s = signals.recv() => match s { Some(f) => f, None => return },
                _ = t.tick() => false,
            },
            None => match signals.recv().await {
                Some(f) => f,
                None => return,
            },
        };
        // Debounce: wait until the directory has been quiet for `debounce`, but not for ever:
        // a writer touching it every millisecond would otherwise postpone the reload for as
        // long as it writes.
        let most = debounce.saturating_mul(10).max(RESCAN);
        let started = tokio::time::Instant::now();
        loop {
            let left = most.saturating_sub(started.elapsed());
            if left.is_zero() {
                break;
            }
            match tokio::time::timeout(debounce.min(left), signals.recv()).await {
                Ok(Some(f)) => forced |= f,
                Ok(None) => return,
                Err(_elapsed) => break,
            }
        }
        // Reading the files blocks (a slow disk, a network mount): off the runtime's workers.
        let dir_ = dir.clone();
        let now = tokio::task::spawn_blocking(move || fingerprint(&dir_))
            .await
            .unwrap_or(None);
        match (now.is_some(), unreadable) {
            (false, false) => tracing::warn!(
                dir = %dir.display(),
                "the policy directory cannot be read (gone, or not readable): the policies in \
                 force keep serving, and changes are not loaded until it can be read again"
            ),
            (true, true) => {
                tracing::info!(dir = %dir.display(), "the policy directory can be read again")
            }
            _ => {}
        }
        unreadable = now.is_none();
        if !forced && (now.is_none() || now == last) {
            // No policy file changed (an editor's swap file, `..data` churn), or the
            // directory is gone: the set in force keeps serving.
            continue;
        }
        last = now;
        // Reading and validating block (validation runs on a thread of its own): off the
        // runtime's workers, so the control loop keeps ticking meanwhile.
        let (load_, dir_) = (load.clone(), dir.clone());
        let outcome = match tokio::task::spawn_blocking(move || load_(&dir_)).await {
            Ok(Ok(version)) => ReloadOutcome::Loaded(version),
            Ok(Err(e)) => ReloadOutcome::Rejected(e),
            Err(e) => ReloadOutcome::Rejected(PolicyError::new(
                &dir.display().to_string(),
                None,
                format!("the reload did not complete: {e}"),
            )),
        };
        outcomes.send_replace(outcome);
    }
}
