//! Receiver-side loss detection for one sender: gaps and their NAK timers.
//!
//! A sequence in `[position, high)` that is in no gap has arrived and is held by the caller.
//!
//! Gaps are kept in a deque sorted by first sequence, and their NAK timers in a binary heap
//! whose entries may be stale (a gap repaired, split or re-armed since): both are flat arrays
//! that need no allocation once grown. New gaps open at the high end and repairs mostly close
//! the lowest ones, so the deque changes at its ends; a lookup is a binary search among the
//! few gaps of one window.

use super::{NakBackoff, Nanos};
use crate::wire::NakRange;
use rand::Rng;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::ops::RangeInclusive;

/// A maximal run of missing sequences `[first, end)` and when it is next NAKed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Gap {
    first: u64,
    end: u64,
    deadline_ns: Nanos,
}

/// What became of an arriving frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// It is the next expected sequence: deliver it now, then drain [`LossDetector::next_in_order`].
    InOrder,
    /// It arrived out of order: the caller holds it until the gap before it fills.
    Held,
    /// Already delivered or held.
    Duplicate,
    /// Further ahead than the receive window; dropped.
    BeyondWindow,
}

/// The next thing to hand on in sequence order.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// The held frame of this sequence has its turn.
    Ready(u64),
    /// Sequences `[first, end)` the sender no longer holds: skipped, never delivered.
    Lost {
        /// First lost sequence.
        first: u64,
        /// One past the last lost sequence.
        end: u64,
    },
}

/// Gap tracking for one sender's sequence space.
///
/// Invariants: `next_expected <= high <= next_expected + window`; every sequence in
/// `[next_expected, high)` is either held by the caller or in exactly one gap; gaps are disjoint,
/// sorted, and start at or after `next_expected`; every gap has a live entry in `timers`
/// (`(deadline_ns, first)` equal to its own), and the heap's top entry, if any, is live.
#[derive(Debug, Clone)]
pub struct LossDetector {
    /// Every sequence below this was handed on (delivered or declared lost).
    next_expected: u64,
    /// One past the highest sequence tracked (received, or announced and within the window).
    high: u64,
    /// One past the highest sequence the sender announced.
    announced: u64,
    /// The sender's oldest retained sequence: anything missing below it is lost.
    floor: u64,
    window: u64,
    /// The gaps in sequence order.
    gaps: VecDeque<Gap>,
    /// `(deadline_ns, first)` of every gap, earliest first, with stale entries of gaps that
    /// have gone or changed since; they are dropped when they reach the top.
    timers: BinaryHeap<Reverse<(Nanos, u64)>>,
}

impl LossDetector {
    /// A detector expecting sequence `start` first, accepting `window` frames beyond its position.
    pub fn new(start: u64, window: u32) -> Self {
        Self {
            next_expected: start,
            high: start,
            announced: start,
            floor: 0,
            window: u64::from(window),
            gaps: VecDeque::new(),
            timers: BinaryHeap::new(),
        }
    }

    /// Every sequence below this is delivered or declared lost.
    pub fn position(&self) -> u64 {
        self.next_expected
    }

    /// One past the highest sequence tracked: received, or announced and within the window.
    pub fn high(&self) -> u64 {
        self.high
    }

    /// Number of missing sequences currently tracked.
    pub fn missing_count(&self) -> u64 {
        self.gaps.iter().map(|g| g.end - g.first).sum()
    }

    /// Records the arrival of `seq`.
    pub fn on_frame(&mut self, now_ns: Nanos, seq: u64, backoff: &NakBackoff, rng: &mut impl Rng) -> Arrival {
        if seq < self.next_expected {
            return Arrival::Duplicate;
        }
        if seq < self.high {
            // Below `high` only a sequence in a gap is new (a repair): one look finds the gap
            // to take it out of.
            let Some(i) = self.gap_holding(seq) else {
                return Arrival::Duplicate;
            };
            self.remove_from_gap(i, seq);
        } else {
            if seq - self.next_expected >= self.window {
                return Arrival::BeyondWindow;
            }
            if seq > self.high {
                let deadline_ns = now_ns + backoff.delay_ns(rng);
                self.push_gap(self.high, seq, deadline_ns);
            }
            self.high = seq + 1;
        }
        self.announced = self.announced.max(self.high);
        if seq == self.next_expected {
            self.next_expected += 1;
            Arrival::InOrder
        } else {
            Arrival::Held
        }
    }

    /// Takes `seq` if it is the next expected sequence with nothing tracked beyond it: nothing
    /// missing or held, nothing announced past it, and the sender still holding it. Then it
    /// does what [`on_frame`](Self::on_frame) (returning [`Arrival::InOrder`]), an empty
    /// [`next_in_order`](Self::next_in_order) and a no-op [`extend_tail`](Self::extend_tail)
    /// would, and returns true; otherwise it changes nothing and returns false.
    #[inline(always)]
    pub fn take_next_alone(&mut self, seq: u64) -> bool {
        let next = seq.wrapping_add(1);
        if seq != self.next_expected
            || self.high != seq
            || self.announced > next
            || self.floor > next
            || self.window == 0
            || next == 0
        {
            return false;
        }
        self.next_expected = next;
        self.high = next;
        self.announced = next;
        true
    }

    /// Index of the gap that `seq` lies in, if any.
    fn gap_holding(&self, seq: u64) -> Option<usize> {
        // Repairs mostly fill the lowest gap.
        match self.gaps.front() {
            Some(g) if g.first <= seq && seq < g.end => return Some(0),
            Some(g) if seq < g.first => return None,
            None => return None,
            _ => {}
        }
        let i = self.gaps.partition_point(|g| g.first <= seq);
        (i > 0 && self.gaps[i - 1].end > seq).then(|| i - 1)
    }

    /// Applies a sender's heartbeat: its next sequence (finds tail loss) and oldest retained one.
    pub fn on_heartbeat(
        &mut self,
        now_ns: Nanos,
        next_sequence: u64,
        oldest: u64,
        backoff: &NakBackoff,
        rng: &mut impl Rng,
    ) {
        self.announced = self.announced.max(next_sequence);
        self.floor = self.floor.max(oldest);
        self.extend_tail(now_ns, backoff, rng);
    }

    /// The sender is gone: every sequence it announced that has not arrived is lost, and
    /// [`next_in_order`](Self::next_in_order) hands on what is held, declaring the missing runs
    /// lost, up to the highest sequence known (NAK timers go with the gaps). Returns whether
    /// anything was missing.
    pub fn give_up(&mut self) -> bool {
        let end = self.announced.max(self.high);
        let missing = !self.gaps.is_empty() || end > self.high;
        if missing {
            self.floor = self.floor.max(end);
        }
        missing
    }

    /// The next held frame or lost run in sequence order, if its turn has come.
    #[inline]
    pub fn next_in_order(&mut self) -> Option<Step> {
        let first = self.next_expected;
        // In order with nothing held, `first == high`; and gaps start at or after `first`, so
        // it is missing only if the lowest gap starts there.
        if first < self.high && self.gaps.front().is_none_or(|g| g.first != first) {
            self.next_expected += 1;
            return Some(Step::Ready(first));
        }
        if first >= self.floor {
            return None;
        }
        self.split_at(self.floor);
        let end = match self.gaps.front() {
            Some(g) if g.first == first => {
                let end = g.end;
                self.gaps.pop_front();
                self.drop_stale_timers();
                end
            }
            _ => self.floor,
        };
        self.next_expected = end;
        self.high = self.high.max(end);
        Some(Step::Lost { first, end })
    }

    /// Tracks the gap between what arrived and what the sender announced, within the window.
    #[inline]
    pub fn extend_tail(&mut self, now_ns: Nanos, backoff: &NakBackoff, rng: &mut impl Rng) {
        let reach = self.announced.min(self.next_expected + self.window);
        if reach > self.high {
            let deadline_ns = now_ns + backoff.delay_ns(rng);
            self.push_gap(self.high, reach, deadline_ns);
            self.high = reach;
        }
    }

    /// The earliest NAK deadline of any gap.
    pub fn next_deadline(&self) -> Option<Nanos> {
        self.timers.peek().map(|&Reverse((d, _))| d)
    }

    /// Appends the ranges of gaps due by the end of `due` (its start is now: a NAK that goes out
    /// anyway takes the gaps due soon with it) to `out`, at most `max` of them, and re-arms each
    /// for `retry_ns` plus a new back-off from now. Returns how many were appended.
    pub fn collect_due(
        &mut self,
        due: RangeInclusive<Nanos>,
        retry_ns: Nanos,
        max: usize,
        out: &mut Vec<NakRange>,
        backoff: &NakBackoff,
        rng: &mut impl Rng,
    ) -> usize {
        let (now_ns, horizon_ns) = (*due.start(), *due.end());
        let mut n = 0;
        while n < max {
            let Some(&Reverse((deadline_ns, first))) = self.timers.peek() else {
                break;
            };
            if deadline_ns > horizon_ns.max(now_ns) {
                break;
            }
            self.timers.pop();
            // The top is live: its gap is there, with this deadline.
            let Some(i) = self.index_of(first) else {
                debug_assert!(false, "the top timer's gap {first} is gone");
                self.drop_stale_timers();
                continue;
            };
            let g = &mut self.gaps[i];
            let count = (g.end - first).min(u64::from(u32::MAX)) as u32;
            out.push(NakRange {
                first: first.into(),
                count: count.into(),
            });
            g.deadline_ns = now_ns + retry_ns + backoff.delay_ns(rng);
            self.timers.push(Reverse((g.deadline_ns, first)));
            self.drop_stale_timers();
            n += 1;
        }
        n
    }

    /// Holds back our NAKs for `[first, first + count)` because another member asked for them.
    /// Returns whether any pending NAK of ours was held back.
    pub fn suppress(
        &mut self,
        now_ns: Nanos,
        first: u64,
        count: u32,
        retry_ns: Nanos,
        backoff: &NakBackoff,
        rng: &mut impl Rng,
    ) -> bool {
        let end = first.saturating_add(u64::from(count));
        if end <= self.next_expected || first >= self.high {
            return false;
        }
        self.split_at(first);
        self.split_at(end);
        let hold_until = now_ns + retry_ns + backoff.delay_ns(rng);
        let from = self.gaps.partition_point(|g| g.first < first);
        let mut held_back = false;
        for i in from..self.gaps.len() {
            let g = &mut self.gaps[i];
            if g.first >= end {
                break;
            }
            if g.deadline_ns > now_ns && g.deadline_ns < hold_until {
                g.deadline_ns = hold_until;
                self.timers.push(Reverse((hold_until, g.first)));
                held_back = true;
            }
        }
        if held_back {
            self.drop_stale_timers();
        }
        held_back
    }

    /// Index of the gap that starts at `first`.
    fn index_of(&self, first: u64) -> Option<usize> {
        if self.gaps.front().is_some_and(|g| g.first == first) {
            return Some(0);
        }
        self.gaps.binary_search_by_key(&first, |g| g.first).ok()
    }

    /// Inserts the gap `[first, end)`, which overlaps none, in its place.
    fn insert_gap(&mut self, first: u64, end: u64, deadline_ns: Nanos) {
        debug_assert!(first < end);
        let gap = Gap {
            first,
            end,
            deadline_ns,
        };
        match self.gaps.back() {
            Some(last) if last.first > first => {
                let i = self.gaps.partition_point(|g| g.first < first);
                self.gaps.insert(i, gap);
            }
            _ => self.gaps.push_back(gap),
        }
        self.timers.push(Reverse((deadline_ns, first)));
    }

    /// Adds the gap `[first, end)` past every gap (a new one at the high end).
    fn push_gap(&mut self, first: u64, end: u64, deadline_ns: Nanos) {
        debug_assert!(self.gaps.back().is_none_or(|g| g.end <= first));
        self.insert_gap(first, end, deadline_ns);
    }

    /// Takes the single sequence `seq` out of the gap at index `i`, which holds it: the gap
    /// goes, shrinks from either end, or splits in two around `seq`.
    fn remove_from_gap(&mut self, i: usize, seq: u64) {
        let g = self.gaps[i];
        debug_assert!(g.first <= seq && seq < g.end);
        match (g.first == seq, g.end == seq + 1) {
            (true, true) => {
                self.gaps.remove(i);
                self.drop_stale_timers();
            }
            (true, false) => {
                // Its key moves on, and its timer with it.
                self.gaps[i].first = seq + 1;
                self.timers.push(Reverse((g.deadline_ns, seq + 1)));
                self.drop_stale_timers();
            }
            // The part before `seq` keeps its key, and so its timer.
            (false, true) => self.gaps[i].end = seq,
            (false, false) => {
                self.gaps[i].end = seq;
                let after = Gap {
                    first: seq + 1,
                    end: g.end,
                    deadline_ns: g.deadline_ns,
                };
                self.gaps.insert(i + 1, after);
                self.timers.push(Reverse((g.deadline_ns, seq + 1)));
            }
        }
    }

    /// Makes `at` a gap boundary: a gap that strictly contains it is split in two.
    fn split_at(&mut self, at: u64) {
        let i = self.gaps.partition_point(|g| g.first < at);
        if i == 0 {
            return;
        }
        let g = self.gaps[i - 1];
        if g.end > at {
            self.gaps[i - 1].end = at;
            self.gaps.insert(
                i,
                Gap {
                    first: at,
                    end: g.end,
                    deadline_ns: g.deadline_ns,
                },
            );
            self.timers.push(Reverse((g.deadline_ns, at)));
        }
    }

    /// Whether the timer entry `(deadline_ns, first)` is its gap's current one.
    fn timer_live(&self, deadline_ns: Nanos, first: u64) -> bool {
        self.index_of(first)
            .is_some_and(|i| self.gaps[i].deadline_ns == deadline_ns)
    }

    /// Restores the heap's invariants after gaps went or changed: stale entries leave the
    /// top, and a heap grown to several times the gaps is rebuilt from them (its stale entries
    /// wait for the top otherwise, and a gap repaired before its NAK leaves one far down).
    fn drop_stale_timers(&mut self) {
        while let Some(&Reverse((d, first))) = self.timers.peek() {
            if self.timer_live(d, first) {
                break;
            }
            self.timers.pop();
        }
        if self.timers.len() > 4 * self.gaps.len() + 64 {
            self.timers.clear();
            self.timers
                .extend(self.gaps.iter().map(|g| Reverse((g.deadline_ns, g.first))));
        }
    }
}
#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn setup() -> (LossDetector, NakBackoff, rand_chacha::ChaCha8Rng) {
        (
            LossDetector::new(0, 16),
            NakBackoff::new(100, 10),
            rand_chacha::ChaCha8Rng::seed_from_u64(7),
        )
    }

    #[test]
    fn gap_is_found_naked_and_filled() {
        let (mut d, b, mut r) = setup();
        assert_eq!(d.on_frame(0, 0, &b, &mut r), Arrival::InOrder);
        assert_eq!(d.on_frame(0, 3, &b, &mut r), Arrival::Held);
        assert_eq!(d.on_frame(0, 3, &b, &mut r), Arrival::Duplicate);
        assert_eq!(d.missing_count(), 2);
        let deadline = d.next_deadline().unwrap();
        assert!(deadline <= 100);
        let mut out = Vec::new();
        assert_eq!(
            d.collect_due(deadline..=deadline, 1000, 8, &mut out, &b, &mut r),
            1
        );
        assert_eq!((out[0].first.get(), out[0].count.get()), (1, 2));
        assert!(d.next_deadline().unwrap() >= deadline + 1000);
        assert_eq!(d.on_frame(5, 2, &b, &mut r), Arrival::Held);
        assert_eq!(d.on_frame(5, 1, &b, &mut r), Arrival::InOrder);
        assert_eq!(d.next_in_order(), Some(Step::Ready(2)));
        assert_eq!(d.next_in_order(), Some(Step::Ready(3)));
        assert_eq!(d.next_in_order(), None);
        assert_eq!(d.missing_count(), 0);
        assert_eq!(d.next_deadline(), None);
        assert_eq!(d.on_frame(6, 2, &b, &mut r), Arrival::Duplicate);
        assert_eq!(d.on_frame(6, 4 + 16, &b, &mut r), Arrival::BeyondWindow);
    }

    #[test]
    fn heartbeat_reveals_tail_loss_and_floor_declares_it_lost() {
        let (mut d, b, mut r) = setup();
        d.on_heartbeat(0, 5, 0, &b, &mut r);
        assert_eq!(d.missing_count(), 5);
        assert_eq!(d.on_frame(1, 3, &b, &mut r), Arrival::Held);
        d.on_heartbeat(2, 5, 4, &b, &mut r);
        assert_eq!(d.next_in_order(), Some(Step::Lost { first: 0, end: 3 }));
        assert_eq!(d.next_in_order(), Some(Step::Ready(3)));
        assert_eq!(d.next_in_order(), None);
        assert_eq!(d.position(), 4);
        assert_eq!(d.missing_count(), 1);
        // A floor beyond everything tracked declares all of it lost, in contiguous runs.
        d.on_heartbeat(3, 40, 30, &b, &mut r);
        let mut covered = 4;
        while let Some(step) = d.next_in_order() {
            match step {
                Step::Lost { first, end } if first == covered => covered = end,
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(covered, 30);
        d.extend_tail(3, &b, &mut r);
        assert_eq!(d.missing_count(), 10);
    }

    #[test]
    fn announced_tail_beyond_window_is_tracked_as_position_advances() {
        let (mut d, b, mut r) = setup();
        d.on_heartbeat(0, 100, 0, &b, &mut r);
        assert_eq!(d.missing_count(), 16);
        for s in 0..10 {
            d.on_frame(1, s, &b, &mut r);
        }
        d.extend_tail(1, &b, &mut r);
        assert_eq!(d.missing_count(), 16);
    }

    #[test]
    fn a_due_nak_takes_the_gaps_due_before_its_horizon_along() {
        let (mut d, b, mut r) = setup();
        d.on_frame(0, 2, &b, &mut r); // gap [0, 2)
        d.on_frame(40, 5, &b, &mut r); // gap [3, 5), due 40 ns later at the earliest
        d.on_frame(500, 9, &b, &mut r); // gap [6, 9), due after 500 ns
        let first = d.next_deadline().unwrap();
        let mut out = Vec::new();
        assert_eq!(d.collect_due(first..=first, 1000, 8, &mut out, &b, &mut r), 1);
        let mut out = Vec::new();
        // Horizon before `now`: only what is due now.
        assert_eq!(d.collect_due(first..=0, 1000, 8, &mut out, &b, &mut r), 0);
        let (mut d, b, mut r) = setup();
        d.on_frame(0, 2, &b, &mut r);
        d.on_frame(40, 5, &b, &mut r);
        d.on_frame(500, 9, &b, &mut r);
        let first = d.next_deadline().unwrap();
        let mut out = Vec::new();
        assert_eq!(
            d.collect_due(first..=first + 140, 1000, 8, &mut out, &b, &mut r),
            2
        );
        let got: Vec<_> = out.iter().map(|r| (r.first.get(), r.count.get())).collect();
        assert_eq!(got, vec![(0, 2), (3, 2)]);
        // Both re-armed from now: the third gap is next.
        assert!(d.next_deadline().unwrap() >= 500);
        assert!(d.next_deadline().unwrap() < first + 1000);
    }

    #[test]
    fn suppression_pushes_only_the_covered_part() {
        let (mut d, b, mut r) = setup();
        d.on_frame(0, 10, &b, &mut r);
        let first_deadline = d.next_deadline().unwrap();
        assert!(d.suppress(0, 2, 3, 1000, &b, &mut r));
        // [0,2) and [5,10) keep their deadline; [2,5) moved.
        assert_eq!(d.next_deadline(), Some(first_deadline));
        let mut out = Vec::new();
        d.collect_due(first_deadline..=first_deadline, 1000, 8, &mut out, &b, &mut r);
        let got: Vec<_> = out.iter().map(|r| (r.first.get(), r.count.get())).collect();
        assert_eq!(got, vec![(0, 2), (5, 5)]);
    }

    #[test]
    fn timers_of_repaired_gaps_do_not_pile_up() {
        let (mut d, b, mut r) = (
            LossDetector::new(0, 1 << 16),
            NakBackoff::new(100, 10),
            rand_chacha::ChaCha8Rng::seed_from_u64(7),
        );
        // Every other frame lost and NAKed, then repaired, except the first: its gap keeps
        // the earliest timer on top, and each NAK re-arms its gap far in the future, so each
        // repair leaves a stale entry below the top.
        let mut out = Vec::new();
        for s in 0..2_000u64 {
            d.on_frame(s, 2 * s + 1, &b, &mut r);
            d.collect_due(s..=s + 1_000, 1_000_000, 8, &mut out, &b, &mut r);
            if s >= 11 {
                let repair = 2 * (s - 10);
                assert_eq!(d.on_frame(s, repair, &b, &mut r), Arrival::Held, "{repair}");
            }
            assert_eq!(d.next_in_order(), None);
            check_invariants(&d);
            assert!(
                d.timers.len() <= 4 * d.gaps.len() + 64,
                "{} timers",
                d.timers.len()
            );
        }
        assert_eq!(out.len(), 2_000, "each gap NAKed once");
        assert_eq!(d.gaps.len(), 11);
    }

    /// The detector's structure agrees with itself: disjoint gaps at or after the position,
    /// below `high`, sorted; a live timer for every gap, live on top, earliest first.
    fn check_invariants(d: &LossDetector) {
        let entries: std::collections::BTreeSet<(Nanos, u64)> =
            d.timers.iter().map(|&Reverse(e)| e).collect();
        let mut prev_end = d.next_expected;
        for g in &d.gaps {
            assert!(
                g.first >= prev_end && g.first < g.end && g.end <= d.high,
                "{:?}",
                d.gaps
            );
            assert!(entries.contains(&(g.deadline_ns, g.first)), "{g:?} has no timer");
            prev_end = g.end;
        }
        if let Some(&Reverse((deadline_ns, first))) = d.timers.peek() {
            assert!(d.timer_live(deadline_ns, first), "a stale timer on top");
        }
        assert_eq!(
            d.next_deadline(),
            d.gaps.iter().map(|g| g.deadline_ns).min(),
            "the earliest deadline"
        );
    }

    /// What the general path leaves after `seq` arrives: `on_frame`, draining, `extend_tail`.
    /// `None` unless that hands on `seq` alone, with nothing tracked beyond it after.
    fn general_path_alone(d: &LossDetector, seq: u64, b: &NakBackoff) -> Option<LossDetector> {
        let mut g = d.clone();
        let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        if g.on_frame(0, seq, b, &mut r) != Arrival::InOrder || g.next_in_order().is_some() {
            return None;
        }
        g.extend_tail(0, b, &mut r);
        (g.high == seq + 1 && g.gaps.is_empty()).then_some(g)
    }

    #[test]
    fn the_next_frame_alone_is_taken_only_with_nothing_tracked_beyond_it() {
        let b = NakBackoff::new(100, 10);
        let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        // The sender's oldest moved past the position: what is missing below it is lost
        // first, so the frame at the position is not the next thing to hand on.
        let mut d = LossDetector::new(0, 16);
        d.on_heartbeat(0, 0, 3, &b, &mut r);
        assert!(!d.take_next_alone(0));
        assert!(general_path_alone(&d, 0, &b).is_none());
        // No window: every frame is beyond it.
        let mut d = LossDetector::new(0, 0);
        assert!(!d.take_next_alone(0));
        assert_eq!(d.on_frame(0, 0, &b, &mut r), Arrival::BeyondWindow);
        // An announced tail: the frame at the position is not alone.
        let mut d = LossDetector::new(0, 16);
        d.on_heartbeat(0, 4, 0, &b, &mut r);
        assert!(!d.take_next_alone(0));
        // Nothing beyond it: taken, and the position moves on.
        let mut d = LossDetector::new(5, 16);
        assert!(d.take_next_alone(5));
        assert_eq!((d.position(), d.high()), (6, 6));
        assert!(!d.take_next_alone(5), "a duplicate");
    }

    proptest::proptest! {
        /// `take_next_alone` takes only frames the general path would hand on alone, and then
        /// leaves the same detector; it takes every such frame when nothing is tracked from the
        /// position on (a repair of the last gap goes the general way); refusing, it changes
        /// nothing.
        #[test]
        fn taking_the_next_frame_alone_is_the_general_path(
            ops in proptest::collection::vec((0u64..40, 0u8..10), 1..150),
        ) {
            let (mut d, b, mut r) = setup();
            for (i, &(seq, op)) in ops.iter().enumerate() {
                let now = i as u64 * 10;
                match op {
                    0 => d.on_heartbeat(now, seq, seq / 2, &b, &mut r),
                    1 => {
                        while d.next_in_order().is_some() {}
                    }
                    2 => {
                        let mut out = Vec::new();
                        d.collect_due(now..=now + 50, 100, 4, &mut out, &b, &mut r);
                    }
                    _ => {
                        d.on_frame(now, seq, &b, &mut r);
                        while d.next_in_order().is_some() {}
                        d.extend_tail(now, &b, &mut r);
                    }
                }
                for candidate in [d.position(), seq] {
                    let before = format!("{d:?}");
                    let mut fast = d.clone();
                    let taken = fast.take_next_alone(candidate);
                    match general_path_alone(&d, candidate, &b) {
                        Some(general) if taken => {
                            proptest::prop_assert_eq!(format!("{fast:?}"), format!("{general:?}"));
                        }
                        None if taken => {
                            proptest::prop_assert!(false, "{} taken, not alone: {}", candidate, before);
                        }
                        general => {
                            // Refused: unchanged, and never the plain case (nothing tracked
                            // from the position on); a repair goes the general way.
                            proptest::prop_assert_eq!(format!("{fast:?}"), before.clone());
                            proptest::prop_assert!(
                                general.is_none() || d.high() != candidate,
                                "{} refused: {}", candidate, before
                            );
                        }
                    }
                }
            }
        }
    }

    proptest::proptest! {
        /// Against a model that remembers every sequence received: arrivals in any order,
        /// repeated, beyond the window, NAK timers and suppression along the way.
        #[test]
        fn agrees_with_a_set_of_received_sequences(
            arrivals in proptest::collection::vec((0u64..48, 0u8..8), 1..200),
        ) {
            let (mut d, b, mut r) = setup();
            let window = 16;
            let mut received = std::collections::BTreeSet::new();
            let (mut pos, mut high) = (0u64, 0u64);
            for (i, &(seq, op)) in arrivals.iter().enumerate() {
                let now = i as u64 * 10;
                match op {
                    // Now and then a NAK goes out, or another member's NAK holds ours back.
                    0 => {
                        let mut out = Vec::new();
                        d.collect_due(now..=now + 50, 100, 4, &mut out, &b, &mut r);
                        for n in &out {
                            let first = n.first.get();
                            proptest::prop_assert!(first >= pos && first + u64::from(n.count.get()) <= high);
                            proptest::prop_assert!(!received.contains(&first));
                        }
                    }
                    1 => {
                        d.suppress(now, seq, 3, 100, &b, &mut r);
                    }
                    _ => {}
                }
                let want = if seq < pos || received.contains(&seq) {
                    Arrival::Duplicate
                } else if seq - pos >= window {
                    Arrival::BeyondWindow
                } else if seq == pos {
                    Arrival::InOrder
                } else {
                    Arrival::Held
                };
                proptest::prop_assert_eq!(d.on_frame(now, seq, &b, &mut r), want, "seq {}", seq);
                if matches!(want, Arrival::InOrder | Arrival::Held) {
                    received.insert(seq);
                    high = high.max(seq + 1);
                }
                if want == Arrival::InOrder {
                    pos += 1;
                }
                while let Some(step) = d.next_in_order() {
                    proptest::prop_assert_eq!(step, Step::Ready(pos));
                    proptest::prop_assert!(received.contains(&pos));
                    pos += 1;
                }
                proptest::prop_assert!(!received.contains(&pos), "{} is due but was not handed on", pos);
                proptest::prop_assert_eq!(d.position(), pos);
                let missing = (pos..high).filter(|s| !received.contains(s)).count() as u64;
                proptest::prop_assert_eq!(d.missing_count(), missing);
                check_invariants(&d);
            }
        }
    }
}
