//! The sender's bounded retransmit buffer: the last `capacity` frames, encoded, in fixed slots.
//!
//! Each slot starts with room for a datagram header, written with the frame, so a frame that
//! travels alone can be sent as a datagram straight from its slot, with no copy.
//!
//! A frame can also be *lent*: framed by its publisher where the payload lies (a publication
//! ring), behind its headers, and referred to there instead of copied into the log. The
//! publisher keeps those bytes alive and unchanged until the buffer no longer holds the frame
//! ([`RetransmitBuffer::oldest`] passes its sequence).

use super::Nanos;
use crate::mem::HugeBuffer;
use crate::wire::{DATAGRAM_HEADER_LEN, DATA_FLAG_RETRANSMIT};
use std::collections::VecDeque;
use std::ptr::NonNull;

/// How far ahead of its writes the log asks for cache lines.
const PREFETCH_AHEAD: usize = 8 << 10;

/// A byte log of the last `capacity` frames, written one after another (small frames share
/// cache lines, and writes stream forward), indexed by `sequence % capacity`; no allocation
/// after creation.
#[derive(Debug)]
pub struct RetransmitBuffer {
    /// The log: each frame behind a copy of `header`, wrapping to the start when the next one
    /// would not fit at the end.
    /// Backed by huge pages where granted: it is written in a circle of tens of MiB.
    log: HugeBuffer,
    /// The datagram header written in front of every frame.
    header: [u8; DATAGRAM_HEADER_LEN],
    /// Offset in `log` of each slot's entry (header and frame), unless it is lent.
    offsets: Box<[u32]>,
    /// Where each slot's datagram lies when its frame is lent (see [`Self::push_lent`]).
    lent: Box<[Option<NonNull<u8>>]>,
    /// Sequences of the frames in `log`, oldest first (entries below `oldest` are stale): the
    /// log's own entries in the order they were written, for eviction by overlap.
    own: VecDeque<u64>,
    /// Encoded frame length per slot.
    lens: Box<[u16]>,
    /// When each slot's frame was last retransmitted, for linger.
    last_retransmit_ns: Box<[Option<Nanos>]>,
    /// Largest frame.
    frame_len: usize,
    /// Where the next entry goes.
    write: usize,
    /// Power of two.
    capacity: u64,
    /// Oldest sequence held; `oldest <= next` and `next - oldest <= capacity`.
    oldest: u64,
    /// One past the newest sequence held.
    next: u64,
}

impl RetransmitBuffer {
    /// A buffer of `capacity` (a power of two) frames of at most `frame_len` bytes each, each
    /// behind a copy of `header`.
    pub fn new(capacity: u32, frame_len: usize, header: [u8; DATAGRAM_HEADER_LEN]) -> Self {
        assert!(
            capacity.is_power_of_two(),
            "capacity is validated by MemberConfig"
        );
        let n = capacity as usize;
        // Room for `capacity` entries of the largest size, plus the waste of one wrap.
        let log_len = (n + 1) * (frame_len + DATAGRAM_HEADER_LEN);
        assert!(
            log_len <= u32::MAX as usize,
            "MemberConfig bounds the retransmit buffer"
        );
        Self {
            log: HugeBuffer::zeroed(log_len),
            header,
            offsets: vec![0u32; n].into_boxed_slice(),
            lent: vec![None; n].into_boxed_slice(),
            own: VecDeque::with_capacity(n + 1),
            lens: vec![0u16; n].into_boxed_slice(),
            last_retransmit_ns: vec![None; n].into_boxed_slice(),
            frame_len,
            write: 0,
            capacity: u64::from(capacity),
            oldest: 0,
            next: 0,
        }
    }

    /// The datagram header written in front of every frame.
    pub fn header(&self) -> &[u8; DATAGRAM_HEADER_LEN] {
        &self.header
    }

    /// Oldest sequence still held.
    pub fn oldest(&self) -> u64 {
        self.oldest
    }

    /// One past the newest sequence held.
    pub fn next(&self) -> u64 {
        self.next
    }

    /// Stores the frame for sequence `next()` by letting `fill` encode it (at most the
    /// `frame_len` given at creation), evicting the oldest frames it needs the room or the slot
    /// of. `fill` returns the encoded length.
    ///
    /// Always inlined: called apart, its `fill` read the frame header the caller had just
    /// built on the stack field by field with wide loads that waited on store forwarding
    /// (profiled at 64 B: a third of the publishing worker's time in `poll_transmit` and here
    /// together sat on one such load; inlined, the header is stored field by field).
    #[inline(always)]
    pub fn push_with(&mut self, fill: impl FnOnce(&mut [u8]) -> usize) {
        let entry = DATAGRAM_HEADER_LEN + self.frame_len;
        if self.write + entry > self.log.len() {
            self.write = 0;
        }
        let (start, end) = (self.write, self.write + entry);
        // The oldest entries of the log are the next ones ahead of `write`: drop those the new
        // entry may overwrite, and every frame before them (lent ones too: the held frames are
        // always one run of sequences).
        while let Some(&seq) = self.own.front() {
            if seq >= self.oldest {
                let i = self.index(seq);
                let o = self.offsets[i] as usize;
                let o_end = o + DATAGRAM_HEADER_LEN + usize::from(self.lens[i]);
                if !(o < end && start < o_end) {
                    break;
                }
                self.oldest = seq + 1;
            }
            self.own.pop_front();
        }
        if self.next - self.oldest == self.capacity {
            self.oldest += 1;
        }
        let i = self.index(self.next);
        self.lent[i] = None;
        self.own.push_back(self.next);
        let slot = &mut self.log[start..end];
        slot[..DATAGRAM_HEADER_LEN].copy_from_slice(&self.header);
        let len = fill(&mut slot[DATAGRAM_HEADER_LEN..]);
        debug_assert!(len <= self.frame_len);
        self.offsets[i] = start as u32;
        self.lens[i] = len as u16;
        self.last_retransmit_ns[i] = None;
        self.write = start + DATAGRAM_HEADER_LEN + len;
        self.next += 1;
        // Ask for the lines of the entries a few KiB on now: the log is larger than the
        // caches, so each entry's first store would otherwise wait for its line (profiled: with
        // 1 KiB messages that wait was most of a publishing worker's time in this function).
        let ahead = self.write + PREFETCH_AHEAD;
        if let Some(lines) = self.log.get(ahead..ahead + DATAGRAM_HEADER_LEN + len) {
            intergroup_ring::hint::prefetch_write(lines);
        }
    }

    /// Stores the frame for sequence `next()` where it lies: `datagram` points at its datagram
    /// header, followed by the `frame_len` bytes of the encoded frame. Evicts the oldest frame
    /// when the buffer holds `capacity` frames.
    ///
    /// # Safety
    ///
    /// The `DATAGRAM_HEADER_LEN + frame_len` bytes at `datagram` stay valid, and nobody but
    /// this buffer reads or writes them, until [`oldest`](Self::oldest) is past the frame's
    /// sequence (or the buffer is dropped; it never reads them on drop).
    pub unsafe fn push_lent(&mut self, datagram: NonNull<u8>, frame_len: usize) {
        debug_assert!(frame_len <= self.frame_len);
        if self.next - self.oldest == self.capacity {
            self.oldest += 1;
        }
        let i = self.index(self.next);
        self.lent[i] = Some(datagram);
        self.lens[i] = frame_len as u16;
        self.last_retransmit_ns[i] = None;
        self.next += 1;
    }

    /// Drops every frame below `seq` (never one not stored yet): they are no longer repaired.
    pub fn forget_before(&mut self, seq: u64) {
        self.oldest = self.oldest.max(seq.min(self.next));
    }

    /// The encoded frame of `seq`, if still held.
    pub fn get(&self, seq: u64) -> Option<&[u8]> {
        self.datagram(seq).map(|d| &d[DATAGRAM_HEADER_LEN..])
    }

    /// The frame of `seq` behind its datagram header: a whole datagram, if still held.
    pub fn datagram(&self, seq: u64) -> Option<&[u8]> {
        if seq < self.oldest || seq >= self.next {
            return None;
        }
        let i = self.index(seq);
        let len = DATAGRAM_HEADER_LEN + usize::from(self.lens[i]);
        if let Some(p) = self.lent[i] {
            // SAFETY: a lent frame held (checked above) is valid and not written by anyone
            // else (`push_lent`'s contract); `&self` keeps this buffer from writing it.
            return Some(unsafe { std::slice::from_raw_parts(p.as_ptr(), len) });
        }
        let start = self.offsets[i] as usize;
        Some(&self.log[start..start + len])
    }

    /// Marks the frame of `seq`, if still held, as a retransmission in its slot, so its
    /// datagram can be sent again in place.
    pub fn mark_retransmitted(&mut self, seq: u64) {
        if self.get(seq).is_some_and(|frame| frame.len() > 1) {
            let i = self.index(seq);
            let at = DATAGRAM_HEADER_LEN + 1;
            match self.lent[i] {
                // SAFETY: held and lent: valid, in bounds (the frame is longer than one byte),
                // and only this buffer writes it (`push_lent`'s contract).
                Some(p) => unsafe { *p.as_ptr().add(at) |= DATA_FLAG_RETRANSMIT },
                None => self.log[self.offsets[i] as usize + at] |= DATA_FLAG_RETRANSMIT,
            }
        }
    }

    /// Records a retransmission of `seq` at `now_ns` unless one happened within `linger_ns`;
    /// returns whether the caller should retransmit. `seq` must be held.
    pub fn claim_retransmit(&mut self, seq: u64, now_ns: Nanos, linger_ns: Nanos) -> bool {
        debug_assert!(seq >= self.oldest && seq < self.next);
        let i = self.index(seq);
        match self.last_retransmit_ns[i] {
            Some(t) if now_ns < t.saturating_add(linger_ns) => false,
            _ => {
                self.last_retransmit_ns[i] = Some(now_ns);
                true
            }
        }
    }

    fn index(&self, seq: u64) -> usize {
        (seq & (self.capacity - 1)) as usize
    }
}

// SAFETY: the lent pointers address memory of this process that `push_lent`'s caller keeps
// valid and leaves to this buffer until the frames are evicted, whichever thread owns the
// buffer; they are dereferenced only through `&self` (reads) and `&mut self` (the flag write).
unsafe impl Send for RetransmitBuffer {}
// SAFETY: shared references only read lent frames, which nobody writes meanwhile.
unsafe impl Sync for RetransmitBuffer {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forgotten_frames_are_gone_and_new_ones_are_kept() {
        let mut b = RetransmitBuffer::new(8, 8, [7; DATAGRAM_HEADER_LEN]);
        for i in 0..5u8 {
            b.push_with(|s| {
                s[0] = i;
                1
            });
        }
        b.forget_before(3);
        assert_eq!((b.oldest(), b.next()), (3, 5));
        assert!(b.get(2).is_none());
        assert_eq!(b.get(3), Some(&[3u8][..]));
        // Never past what is stored, never backwards.
        b.forget_before(99);
        assert_eq!((b.oldest(), b.next()), (5, 5));
        b.forget_before(1);
        assert_eq!(b.oldest(), 5);
        b.push_with(|s| {
            s[0] = 9;
            1
        });
        assert_eq!(b.get(5), Some(&[9u8][..]));
    }

    #[test]
    fn keeps_the_last_capacity_frames() {
        let mut b = RetransmitBuffer::new(4, 8, [7; DATAGRAM_HEADER_LEN]);
        for i in 0..6u8 {
            b.push_with(|s| {
                s[0] = i;
                1
            });
        }
        assert_eq!((b.oldest(), b.next()), (2, 6));
        assert!(b.get(1).is_none());
        assert_eq!(b.get(2), Some(&[2u8][..]));
        assert_eq!(b.get(5), Some(&[5u8][..]));
        assert!(b.get(6).is_none());
        let d = b.datagram(5).unwrap();
        assert_eq!(
            (&d[..DATAGRAM_HEADER_LEN], &d[DATAGRAM_HEADER_LEN..]),
            (&[7u8; 12][..], &[5u8][..])
        );
    }

    /// Pushes 3000 frames of random sizes (2 to 100 bytes), every third one lent from storage
    /// of its own when `lend`, and checks after each push that every held frame is intact.
    /// Returns the buffer, the lent storage (still referred to by the buffer, never touched
    /// again but through the pointer returned) and where the newest lent datagram starts.
    fn random_frames(lend: bool) -> (RetransmitBuffer, Vec<u8>, *mut u8) {
        const SLOT: usize = DATAGRAM_HEADER_LEN + 100;
        let mut b = RetransmitBuffer::new(8, 100, [1; DATAGRAM_HEADER_LEN]);
        let mut storage = vec![0u8; 1000 * SLOT];
        let base = storage.as_mut_ptr();
        let mut newest = base;
        let mut rng = 11u64;
        let mut sizes = Vec::new();
        let lent_seq = |seq: u64| lend && seq % 3 == 1;
        for seq in 0..3000u64 {
            rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let len = (rng >> 33) as usize % 99 + 2;
            sizes.push(len);
            if lent_seq(seq) {
                // SAFETY: slot `seq / 3` of `storage`, which outlives this loop and is accessed
                // only through `base` from now on.
                let d = unsafe {
                    std::slice::from_raw_parts_mut(
                        base.add(seq as usize / 3 * SLOT),
                        DATAGRAM_HEADER_LEN + len,
                    )
                };
                d.fill(seq as u8);
                d[..DATAGRAM_HEADER_LEN].fill(5);
                d[DATAGRAM_HEADER_LEN + 1] = 0;
                newest = d.as_mut_ptr();
                // SAFETY: as above; nothing else touches the slot while the buffer holds it.
                unsafe { b.push_lent(NonNull::new(newest).unwrap(), len) };
            } else {
                b.push_with(|s| {
                    s[..len].fill(seq as u8);
                    s[1] = 0;
                    len
                });
            }
            assert!(b.next() - b.oldest() <= 8);
            // At least the newest frame, and every held frame intact.
            assert!(b.oldest() <= seq);
            for held in b.oldest()..b.next() {
                let f = b.get(held).unwrap();
                assert_eq!(f.len(), sizes[held as usize], "seq {held}");
                assert!(
                    f[0] == held as u8 && f[2..].iter().all(|&x| x == held as u8),
                    "seq {held} overwritten"
                );
                let header = if lent_seq(held) { 5 } else { 1 };
                assert_eq!(
                    &b.datagram(held).unwrap()[..DATAGRAM_HEADER_LEN],
                    &[header; DATAGRAM_HEADER_LEN]
                );
            }
        }
        (b, storage, newest)
    }

    #[test]
    fn frames_of_any_size_survive_until_evicted() {
        let (b, _, _) = random_frames(false);
        // Small frames: the count, not the bytes, bounds what is held.
        assert_eq!(b.next() - b.oldest(), 8);
    }

    #[test]
    fn lent_frames_mixed_with_own_ones_stay_intact_until_evicted() {
        // The log's eviction by overlap must skip lent frames and still never overwrite a
        // held frame of its own.
        let (mut b, _storage, newest) = random_frames(true);
        // Marking a lent frame as retransmitted writes its flag where it lies.
        let newest_lent = (b.oldest()..b.next()).rev().find(|s| s % 3 == 1).unwrap();
        b.mark_retransmitted(newest_lent);
        assert_eq!(b.get(newest_lent).unwrap()[1], DATA_FLAG_RETRANSMIT);
        // SAFETY: inside the storage, which `_storage` keeps alive.
        assert_eq!(
            unsafe { *newest.add(DATAGRAM_HEADER_LEN + 1) },
            DATA_FLAG_RETRANSMIT
        );
    }

    #[test]
    fn linger_limits_retransmits() {
        let mut b = RetransmitBuffer::new(2, 4, [0; DATAGRAM_HEADER_LEN]);
        b.push_with(|_| 1);
        assert!(b.claim_retransmit(0, 100, 50));
        assert!(!b.claim_retransmit(0, 120, 50));
        assert!(b.claim_retransmit(0, 150, 50));
    }
}
