//! Half-open probe permits: reserved atomically, given back if the call is cancelled.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::Gate;

/// One half-open probe permit of one class. Dropped, it goes back to the class (the probe was
/// cancelled); [`consume`](Self::consume)d, it is spent (the probe finished).
#[derive(Debug)]
pub(crate) struct ProbePermit {
    gates: Arc<[Gate]>,
    class: usize,
    spent: bool,
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
                class,
                spent: false,
            })
    }

    /// The probe finished: the permit is spent.
    pub(crate) fn consume(mut self) {
        self.spent = true;
    }
}

impl Drop for ProbePermit {
    fn drop(&mut self) {
        if self.spent {
            return;
        }
        self.gates[self.class].probes.fetch_add(1, Ordering::AcqRel);
    }
}
