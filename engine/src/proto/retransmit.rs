//! The sender's bounded retransmit buffer: the last `capacity` frames, encoded, in fixed slots.
//!
//! Each slot starts with room for a datagram header, written with the frame, so a frame that
//! travels alone can be sent as a datagram straight from its slot, with no copy.

use super::Nanos;
use crate::wire::DATAGRAM_HEADER_LEN;

/// Fixed-size slots indexed by `sequence % capacity`; no allocation after creation.
#[derive(Debug)]
pub struct RetransmitBuffer {
    /// `capacity * slot_len` bytes; slot `i` holds a datagram header and then the frame whose
    /// `sequence % capacity == i`.
    slots: Box<[u8]>,
    /// The datagram header written in front of every frame.
    header: [u8; DATAGRAM_HEADER_LEN],
    /// Encoded frame length per slot.
    lens: Box<[u16]>,
    /// When each slot's frame was last retransmitted, for linger.
    last_retransmit_ns: Box<[Option<Nanos>]>,
    slot_len: usize,
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
        let slot_len = frame_len + DATAGRAM_HEADER_LEN;
        assert!(
            capacity.is_power_of_two(),
            "capacity is validated by MemberConfig"
        );
        let n = capacity as usize;
        Self {
            slots: vec![0u8; n * slot_len].into_boxed_slice(),
            header,
            lens: vec![0u16; n].into_boxed_slice(),
            last_retransmit_ns: vec![None; n].into_boxed_slice(),
            slot_len,
            capacity: u64::from(capacity),
            oldest: 0,
            next: 0,
        }
    }

    /// Oldest sequence still held.
    pub fn oldest(&self) -> u64 {
        self.oldest
    }

    /// One past the newest sequence held.
    pub fn next(&self) -> u64 {
        self.next
    }

    /// Stores the frame for sequence `next()` by letting `fill` encode it into the slot, evicting
    /// the oldest frame if full. `fill` returns the encoded length.
    pub fn push_with(&mut self, fill: impl FnOnce(&mut [u8]) -> usize) {
        if self.next - self.oldest == self.capacity {
            self.oldest += 1;
        }
        let i = self.index(self.next);
        let slot = &mut self.slots[i * self.slot_len..(i + 1) * self.slot_len];
        slot[..DATAGRAM_HEADER_LEN].copy_from_slice(&self.header);
        let len = fill(&mut slot[DATAGRAM_HEADER_LEN..]);
        debug_assert!(len + DATAGRAM_HEADER_LEN <= self.slot_len);
        self.lens[i] = len as u16;
        self.last_retransmit_ns[i] = None;
        self.next += 1;
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
        let start = i * self.slot_len;
        Some(&self.slots[start..start + DATAGRAM_HEADER_LEN + usize::from(self.lens[i])])
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

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn linger_limits_retransmits() {
        let mut b = RetransmitBuffer::new(2, 4, [0; DATAGRAM_HEADER_LEN]);
        b.push_with(|_| 1);
        assert!(b.claim_retransmit(0, 100, 50));
        assert!(!b.claim_retransmit(0, 120, 50));
        assert!(b.claim_retransmit(0, 150, 50));
    }
}
