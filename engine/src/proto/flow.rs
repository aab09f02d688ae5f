//! Sender-side flow control: never run further ahead of the slowest live receiver than its window.

use super::Nanos;
use std::collections::{BTreeSet, HashMap};

#[derive(Debug, Clone, Copy)]
struct ReceiverPosition {
    /// `position + window` from the receiver's latest STATUS.
    limit: u64,
    position: u64,
    last_heard_ns: Nanos,
}

/// Tracks each receiver's reported limit; the sender may send sequences below [`Self::limit`].
///
/// Until the first STATUS arrives the sender may send one window (`initial_limit`). Once every
/// known receiver has timed out there is nobody to overrun, and the limit is lifted.
#[derive(Debug)]
pub struct FlowControl {
    receivers: HashMap<u32, ReceiverPosition>,
    /// `(limit, receiver)` for every entry of `receivers`: the first is the slowest.
    by_limit: BTreeSet<(u64, u32)>,
    initial_limit: u64,
    max_window: u64,
    ever_heard: bool,
}

impl FlowControl {
    /// Flow control that allows `initial_limit` frames before any receiver reports, and caps any
    /// advertised window at `max_window` (the retransmit buffer's size).
    pub fn new(initial_limit: u64, max_window: u64) -> Self {
        Self {
            receivers: HashMap::new(),
            by_limit: BTreeSet::new(),
            initial_limit,
            max_window,
            ever_heard: false,
        }
    }

    /// Applies a receiver's STATUS. Positions never move backwards (STATUS may be reordered).
    pub fn on_status(&mut self, now_ns: Nanos, receiver: u32, position: u64, window: u32) {
        self.ever_heard = true;
        let window = u64::from(window).min(self.max_window);
        let entry = self.receivers.entry(receiver).or_insert(ReceiverPosition {
            limit: 0,
            position: 0,
            last_heard_ns: now_ns,
        });
        self.by_limit.remove(&(entry.limit, receiver));
        entry.position = entry.position.max(position);
        entry.limit = entry.limit.max(entry.position.saturating_add(window));
        entry.last_heard_ns = now_ns;
        self.by_limit.insert((entry.limit, receiver));
    }

    /// The first sequence the sender may not send yet; `u64::MAX` when nobody can be overrun.
    pub fn limit(&self) -> u64 {
        match self.by_limit.first() {
            Some(&(limit, _)) => limit,
            None if self.ever_heard => u64::MAX,
            None => self.initial_limit,
        }
    }

    /// Number of live receivers.
    pub fn receivers(&self) -> usize {
        self.receivers.len()
    }

    /// Number of live receivers and the lowest position any of them reported (`None` when
    /// there are none).
    pub fn acknowledged(&self) -> (usize, Option<u64>) {
        (
            self.receivers.len(),
            self.receivers.values().map(|r| r.position).min(),
        )
    }

    /// Drops receivers silent for `timeout_ns`; returns how many were dropped.
    pub fn expire(&mut self, now_ns: Nanos, timeout_ns: Nanos) -> usize {
        let before = self.receivers.len();
        let by_limit = &mut self.by_limit;
        self.receivers.retain(|&id, r| {
            let live = now_ns < r.last_heard_ns.saturating_add(timeout_ns);
            if !live {
                by_limit.remove(&(r.limit, id));
            }
            live
        });
        before - self.receivers.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slowest_receiver_sets_the_limit() {
        let mut f = FlowControl::new(8, 100);
        assert_eq!(f.limit(), 8);
        f.on_status(0, 1, 10, 16);
        f.on_status(0, 2, 4, 16);
        assert_eq!(f.limit(), 20);
        f.on_status(1, 2, 30, 16);
        assert_eq!(f.limit(), 26);
        // A reordered, older STATUS does not move a receiver back.
        f.on_status(2, 1, 5, 16);
        assert_eq!(f.limit(), 26);
        // Windows are capped at the retransmit buffer's size.
        let mut g = FlowControl::new(8, 100);
        g.on_status(3, 3, 0, 1_000_000);
        assert_eq!(g.limit(), 100);
    }

    #[test]
    fn silent_receivers_expire_and_then_nobody_holds_back() {
        let mut f = FlowControl::new(8, 100);
        f.on_status(0, 1, 10, 16);
        f.on_status(50, 2, 40, 16);
        assert_eq!(f.expire(100, 60), 1);
        assert_eq!(f.limit(), 56);
        assert_eq!(f.expire(200, 60), 1);
        assert_eq!(f.limit(), u64::MAX);
    }
}
