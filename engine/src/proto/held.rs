//! Out-of-order frames of one sender, held in fixed slots until their turn (no allocation per frame).

use super::reassembly::FrameInfo;

/// How many slots ahead of a held frame the next ones' lines are asked for.
const PREFETCH_SLOTS: u64 = 8;

#[derive(Debug, Clone, Copy, Default)]
struct SlotMeta {
    /// Sequence held in the slot; meaningful only while `occupied`.
    sequence: u64,
    occupied: bool,
    stream: u32,
    epoch: u32,
    timestamp: u64,
    message_len: u32,
    fragment_offset: u32,
    len: usize,
}

/// A ring of `capacity` (a power of two, at least the frames a receiver holds beyond its
/// position) slots indexed by `sequence % capacity`. Held sequences all lie within that span,
/// so they never collide.
#[derive(Debug)]
pub(crate) struct HeldFrames {
    /// `capacity * slot_len` bytes, zero-allocated on first use so untouched pages cost nothing.
    bytes: Vec<u8>,
    meta: Vec<SlotMeta>,
    slot_len: usize,
    mask: u64,
}

impl HeldFrames {
    /// Slots for `frames` frames beyond the position (`MemberConfig::hold_frames`) of up to
    /// `slot_len` payload bytes each.
    pub fn new(frames: u32, slot_len: usize) -> Self {
        let capacity = frames.next_power_of_two() as usize;
        Self {
            bytes: Vec::new(),
            meta: Vec::new(),
            slot_len,
            mask: capacity as u64 - 1,
        }
    }

    /// Largest payload a slot holds.
    pub fn slot_len(&self) -> usize {
        self.slot_len
    }

    /// Stores a frame; its payload must fit [`Self::slot_len`].
    pub fn hold(&mut self, f: &FrameInfo<'_>) {
        debug_assert!(f.payload.len() <= self.slot_len);
        if self.meta.is_empty() {
            let capacity = self.mask as usize + 1;
            self.meta = vec![SlotMeta::default(); capacity];
            self.bytes = vec![0; capacity * self.slot_len];
        }
        let i = (f.sequence & self.mask) as usize;
        debug_assert!(!self.meta[i].occupied, "held sequences span more than the hold");
        self.meta[i] = SlotMeta {
            sequence: f.sequence,
            occupied: true,
            stream: f.stream,
            epoch: f.epoch,
            timestamp: f.timestamp,
            message_len: f.message_len,
            fragment_offset: f.fragment_offset,
            len: f.payload.len(),
        };
        let start = i * self.slot_len;
        self.bytes[start..start + f.payload.len()].copy_from_slice(f.payload);
        // Frames behind a gap come in sequence, so the next ones go to the next slots: ask
        // for their lines now (the slots span two windows, more than the caches hold, and each
        // first store would otherwise wait for its line).
        let next = ((f.sequence + PREFETCH_SLOTS) & self.mask) as usize * self.slot_len;
        intergroup_ring::hint::prefetch_write(&self.bytes[next..next + f.payload.len()]);
    }

    /// Releases the frame of `sequence` and lends it out; `None` if it is not held.
    pub fn take(&mut self, sequence: u64) -> Option<FrameInfo<'_>> {
        let i = (sequence & self.mask) as usize;
        let m = self.meta.get_mut(i)?;
        if !m.occupied || m.sequence != sequence {
            return None;
        }
        m.occupied = false;
        let start = i * self.slot_len;
        Some(FrameInfo {
            sequence,
            stream: m.stream,
            epoch: m.epoch,
            timestamp: m.timestamp,
            message_len: m.message_len,
            fragment_offset: m.fragment_offset,
            payload: &self.bytes[start..start + m.len],
        })
    }
}
