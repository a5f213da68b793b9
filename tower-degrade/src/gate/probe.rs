//! Half-open probe permits: reserved atomically, given back if the call is cancelled.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::Gate;

/// One half-open probe permit. Dropped, it is spent (the probe finished);
/// [`release`](Self::release)d, it goes back to its class (the probe was cancelled). The class
/// is not stored: the holder (a call's recording) knows it, which keeps the permit two words.
#[derive(Debug)]
pub(crate) struct ProbePermit {
    gates: Arc<[Gate]>,
}

impl ProbePermit {
    /// Take one of `class`'s probe permits, if any is left.
    pub(crate) fn try_take(gates: &Arc<[Gate]>, class: usize) -> Option<Self> {
        gates[class]
            .probes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |p| p.checked_sub(1))
            .ok()
            .map(|_| Self {
                gates: gates.clone(),
            })
    }

    /// Give the permit back to `class`, the class it was taken from.
    pub(crate) fn release(self, class: usize) {
        self.gates[class].release_probe();
    }
}
