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
pub struct PolicyWatcher {
    _watcher: Option<notify::RecommendedWatcher>,
    trigger: mpsc::Sender<()>,
    outcomes: watch::Receiver<ReloadOutcome>,
    task: JoinHandle<()>,
}

impl Drop for PolicyWatcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Loads a policy directory into a degrader, returning the version in force.
pub(crate) type Loader = Box<dyn Fn(&Path) -> Result<u64, PolicyError> + Send + Sync>;

impl PolicyWatcher {
    /// Load `dir` with `load` now, then again on every change (when `watch_fs`) and every
    /// [`reload_now`](Self::reload_now), debounced. Built by
    /// [`Degrader::watch_policies`](crate::Degrader::watch_policies) and
    /// [`Degrader::reload_policies_on_demand`](crate::Degrader::reload_policies_on_demand).
    pub(crate) fn start(
        load: Loader,
        dir: PathBuf,
        debounce: Duration,
        watch_fs: bool,
    ) -> Result<Self, PolicyError> {
        let version = load(&dir)?;
        let (trigger, signals) = mpsc::channel(1);
        let watcher = if watch_fs {
            Some(fs_watcher(&dir, trigger.clone())?)
        } else {
            None
        };
        let (tx, outcomes) = watch::channel(ReloadOutcome::Loaded(version));
        let task = tokio::spawn(reload_loop(load, dir, signals, debounce, tx));
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
        let _ = self.trigger.try_send(());
    }

    /// The outcome of every (re)load, starting with the first.
    pub fn subscribe(&self) -> watch::Receiver<ReloadOutcome> {
        self.outcomes.clone()
    }
}

fn fs_watcher(
    dir: &Path,
    trigger: mpsc::Sender<()>,
) -> Result<notify::RecommendedWatcher, PolicyError> {
    let err = |e: notify::Error| {
        PolicyError::new(
            &dir.display().to_string(),
            None,
            format!("cannot watch the policy directory: {e}"),
        )
    };
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        let Ok(event) = res else { return };
        let relevant = matches!(
            event.kind,
            EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_)
        ) && event
            .paths
            .iter()
            .any(|p| p.extension().is_some_and(|x| x == "rhai"));
        if relevant {
            let _ = trigger.try_send(());
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
    mut signals: mpsc::Receiver<()>,
    debounce: Duration,
    outcomes: watch::Sender<ReloadOutcome>,
) {
    while signals.recv().await.is_some() {
        // Debounce: wait until the directory has been quiet for `debounce`.
        loop {
            match tokio::time::timeout(debounce, signals.recv()).await {
                Ok(Some(())) => continue,
                Ok(None) => return,
                Err(_elapsed) => break,
            }
        }
        let outcome = match load(&dir) {
            Ok(version) => ReloadOutcome::Loaded(version),
            Err(e) => ReloadOutcome::Rejected(e),
        };
        outcomes.send_replace(outcome);
    }
}
