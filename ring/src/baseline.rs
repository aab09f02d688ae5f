//! The minimal ring every ring figure is compared with: one producer, one consumer, fixed-size
//! slots in process memory, no framing, no types, no wrap handling beyond the index mask.
//! Benchmarks (criterion's `baseline_spsc`, `intergroup bench ipc`) measure it in the same run
//! as the real rings and report ratios against it.
use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// 128 bytes, so the two indices never share a cache line (or an adjacent-line prefetch).
#[repr(align(128))]
#[derive(Debug, Default)]
struct Padded(AtomicUsize);

/// A bare SPSC ring of `slots` fixed-size slots.
#[derive(Debug)]
pub struct SlotRing {
    head: Padded,
    tail: Padded,
    slot_len: usize,
    mask: usize,
    buf: Box<[UnsafeCell<u8>]>,
}

// SAFETY: the producer only writes slots in [tail, head + slots) and the consumer only reads
// slots in [head, tail); the Release/Acquire pairs on the indices order those accesses.
unsafe impl Sync for SlotRing {}

impl SlotRing {
    /// `slots` (a power of two) slots of `slot_len` bytes.
    pub fn new(slots: usize, slot_len: usize) -> Arc<Self> {
        assert!(slots.is_power_of_two());
        Arc::new(Self {
            head: Padded::default(),
            tail: Padded::default(),
            slot_len,
            mask: slots - 1,
            buf: (0..slots * slot_len).map(|_| UnsafeCell::new(0)).collect(),
        })
    }

    fn slot(&self, i: usize) -> *mut u8 {
        self.buf[(i & self.mask) * self.slot_len].get()
    }

    /// Copies `record` (exactly `slot_len` bytes) in; false when full.
    pub fn push(&self, record: &[u8], cached_head: &mut usize) -> bool {
        let tail = self.tail.0.load(Ordering::Relaxed);
        if tail - *cached_head > self.mask {
            *cached_head = self.head.0.load(Ordering::Acquire);
            if tail - *cached_head > self.mask {
                return false;
            }
        }
        // SAFETY: slot `tail` is free (checked against head above) and only this producer
        // writes it until the Release store below publishes it.
        unsafe { std::ptr::copy_nonoverlapping(record.as_ptr(), self.slot(tail), self.slot_len) };
        self.tail.0.store(tail + 1, Ordering::Release);
        true
    }

    /// Lends up to `limit` records to `f`; returns how many.
    pub fn pop_batch(&self, limit: usize, cached_tail: &mut usize, mut f: impl FnMut(&[u8])) -> usize {
        let head = self.head.0.load(Ordering::Relaxed);
        if *cached_tail == head {
            *cached_tail = self.tail.0.load(Ordering::Acquire);
        }
        let n = (*cached_tail - head).min(limit);
        for i in head..head + n {
            // SAFETY: slot `i` was published by the producer's Release store of `tail`
            // (loaded with Acquire) and is not reused before `head` moves past it.
            f(unsafe { std::slice::from_raw_parts(self.slot(i), self.slot_len) });
        }
        if n > 0 {
            self.head.0.store(head + n, Ordering::Release);
        }
        n
    }
}
