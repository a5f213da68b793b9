//! The last [`HISTORY_LEN`] snapshots of a class.

use super::WindowSnapshot;

/// Number of ticks of history kept per class.
pub const HISTORY_LEN: usize = 64;

/// The last `N` values pushed, newest at `get(0)`: the ring behind [`History`] and the
/// predictor's feature history.
#[derive(Debug, Clone)]
pub(crate) struct Ring<T, const N: usize> {
    slots: Box<[T; N]>,
    len: usize,
    next: usize,
}

impl<T: Copy + Default, const N: usize> Default for Ring<T, N> {
    fn default() -> Self {
        Self {
            slots: Box::new([T::default(); N]),
            len: 0,
            next: 0,
        }
    }
}

impl<T: Copy, const N: usize> Ring<T, N> {
    /// Push a value; returns the oldest one when it falls out.
    pub(crate) fn push(&mut self, value: T) -> Option<T> {
        let evicted = (self.len == N).then(|| self.slots[self.next]);
        self.slots[self.next] = value;
        self.next = (self.next + 1) % N;
        self.len = (self.len + 1).min(N);
        evicted
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The value `ago` pushes back: 0 is the newest.
    pub(crate) fn get(&self, ago: usize) -> Option<&T> {
        (ago < self.len).then(|| &self.slots[(self.next + N - 1 - ago) % N])
    }
}

/// The last [`HISTORY_LEN`] snapshots of one class; `get(0)` is the newest.
#[derive(Debug, Clone, Default)]
pub struct History {
    ring: Ring<WindowSnapshot, HISTORY_LEN>,
}

impl History {
    pub(crate) fn push(&mut self, snap: WindowSnapshot) {
        self.ring.push(snap);
    }

    /// Number of snapshots held (at most [`HISTORY_LEN`]).
    pub fn len(&self) -> usize {
        self.ring.len()
    }

    /// Whether no tick has completed yet.
    pub fn is_empty(&self) -> bool {
        self.ring.len() == 0
    }

    /// The snapshot `ago` ticks back: 0 is the newest.
    pub fn get(&self, ago: usize) -> Option<&WindowSnapshot> {
        self.ring.get(ago)
    }

    /// The newest snapshot.
    pub fn latest(&self) -> Option<&WindowSnapshot> {
        self.get(0)
    }

    /// Snapshots newest first.
    pub fn iter(&self) -> impl Iterator<Item = &WindowSnapshot> + '_ {
        (0..self.len()).filter_map(|i| self.get(i))
    }

    /// Whether the newest `n` snapshots exist and all satisfy `pred`.
    pub fn consecutive(&self, n: usize, mut pred: impl FnMut(&WindowSnapshot) -> bool) -> bool {
        n <= self.len() && (0..n).all(|i| self.get(i).is_some_and(&mut pred))
    }
}
