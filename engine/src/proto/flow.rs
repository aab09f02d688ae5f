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
///
/// With a minimum of receivers (Aeron's minimum group size), the limit does not move while
/// fewer than that many are live: it stays at one window until the group is complete, and at
/// its last value whenever the group falls short again. No receiver of the group then misses
/// the start of a stream, or anything while it is briefly gone, to eviction.
#[derive(Debug)]
pub struct FlowControl {
    receivers: HashMap<u32, ReceiverPosition>,
    /// `(limit, receiver)` for every entry of `receivers`: the first is the slowest.
    by_limit: BTreeSet<(u64, u32)>,
    initial_limit: u64,
    max_window: u64,
    ever_heard: bool,
    /// Live receivers needed before the limit moves; 0 for none.
    min_receivers: usize,
    /// The limit when at least `min_receivers` were last live (`initial_limit` before that).
    held_limit: u64,
}

impl FlowControl {
    /// Flow control that allows `initial_limit` frames before any receiver reports, and caps any
    /// advertised window at `max_window` (the retransmit buffer's size).
    pub fn new(initial_limit: u64, max_window: u64) -> Self {
        Self::with_min_receivers(initial_limit, max_window, 0)
    }

    /// As [`new`](Self::new), and the limit moves only while at least `min_receivers` receivers
    /// are live.
    pub fn with_min_receivers(initial_limit: u64, max_window: u64, min_receivers: u32) -> Self {
        Self {
            receivers: HashMap::new(),
            by_limit: BTreeSet::new(),
            initial_limit,
            max_window,
            ever_heard: false,
            min_receivers: min_receivers as usize,
            held_limit: initial_limit,
        }
    }

    /// The limit the live receivers alone allow.
    fn live_limit(&self) -> u64 {
        match self.by_limit.first() {
            Some(&(limit, _)) => limit,
            None if self.ever_heard => u64::MAX,
            None => self.initial_limit,
        }
    }

    /// Remembers the limit while the group is complete.
    fn hold_if_complete(&mut self) {
        if self.min_receivers > 0 && self.receivers.len() >= self.min_receivers {
            self.held_limit = self.live_limit();
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
        self.hold_if_complete();
    }

    /// The first sequence the sender may not send yet; `u64::MAX` when nobody can be overrun.
    pub fn limit(&self) -> u64 {
        let live = self.live_limit();
        if self.receivers.len() < self.min_receivers {
            live.min(self.held_limit)
        } else {
            live
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
        self.hold_if_complete();
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
    fn with_a_minimum_the_limit_moves_only_while_enough_receivers_are_live() {
        let mut f = FlowControl::with_min_receivers(8, 100, 2);
        assert_eq!(f.limit(), 8);
        // One receiver far ahead: still one window, for the one not heard yet.
        f.on_status(0, 1, 50, 16);
        assert_eq!(f.limit(), 8);
        f.on_status(1, 2, 4, 16);
        assert_eq!(f.limit(), 20);
        f.on_status(30, 2, 30, 16);
        assert_eq!(f.limit(), 46);
        // Receiver 1 goes silent: the limit stays where the complete group left it, and
        // nobody being left does not lift it either.
        assert_eq!(f.expire(62, 60), 1);
        assert_eq!(f.limit(), 46);
        f.on_status(80, 2, 60, 16);
        assert_eq!(f.limit(), 46);
        assert_eq!(f.expire(200, 60), 1);
        assert_eq!(f.limit(), 46);
        // The group is complete again: the limit follows the slowest once more.
        f.on_status(210, 1, 70, 16);
        f.on_status(211, 3, 65, 16);
        assert_eq!(f.limit(), 81);
        // Without a minimum, nothing changes from before.
        let mut g = FlowControl::with_min_receivers(8, 100, 0);
        g.on_status(0, 1, 50, 16);
        assert_eq!(g.limit(), 66);
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
