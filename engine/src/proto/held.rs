//! Out-of-order frames of one sender, held until their turn (no allocation per frame): in the
//! driver's receive buffer where it lends that buffer ([`Lend`]), otherwise copied into fixed
//! slots.

use super::reassembly::FrameInfo;

/// How many slots ahead of a held frame the next ones' lines are asked for.
const PREFETCH_SLOTS: u64 = 8;

/// A driver's receive buffers, which can keep a held frame where it arrived instead of a copy.
///
/// Offsets are into the arena of the [`Lent`] that the datagram came in. A pinned offset's
/// bytes must stay as they are, in the same arena, until it is unpinned: the member unpins a
/// frame when it hands it on, within a later call that lends the same arena.
pub trait Lend {
    /// Keeps the bytes at `at` from reuse; `false` if the driver cannot spare the buffer now
    /// (the frame is then copied).
    fn pin(&mut self, at: usize) -> bool;
    /// Releases one pin taken at `at`.
    fn unpin(&mut self, at: usize);
}

/// The receive buffers a datagram was read into, and their lender: see
/// [`Member::handle_datagram_lent`](super::Member::handle_datagram_lent).
pub struct Lent<'a> {
    /// Every receive buffer of the driver, the datagram among them.
    pub arena: &'a [u8],
    /// Pins and unpins parts of `arena`.
    pub lender: &'a mut dyn Lend,
}

impl std::fmt::Debug for Lent<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lent")
            .field("arena_len", &self.arena.len())
            .finish()
    }
}

impl Lent<'_> {
    /// Where `bytes` starts in the arena, if it lies wholly inside it.
    fn offset_of(&self, bytes: &[u8]) -> Option<usize> {
        let at = (bytes.as_ptr() as usize).checked_sub(self.arena.as_ptr() as usize)?;
        (at.checked_add(bytes.len())? <= self.arena.len()).then_some(at)
    }
}

/// All zero is an empty slot, so the table is zero-allocated: pages of slots never used (a
/// wide window, little loss) are never touched. Filling it with defaults instead wrote the
/// whole table at the first frame held: 56 MiB for a window of 2^20 frames.
#[derive(Debug, Clone, Copy, Default, zerocopy::FromZeros)]
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
    /// The payload is pinned in the lent arena at `lent_at`; otherwise it is in the slot's
    /// bytes.
    lent: bool,
    lent_at: usize,
}

/// A ring of `capacity` (a power of two, at least the frames a receiver holds beyond its
/// position) slots indexed by `sequence % capacity`. Held sequences all lie within that span,
/// so they never collide. A slot's metadata says where its payload is: in a lent receive
/// buffer, or copied into the slot's bytes.
#[derive(Debug)]
pub(crate) struct HeldFrames {
    /// `capacity * slot_len` bytes, zero-allocated on first use so untouched pages cost nothing.
    bytes: Vec<u8>,
    meta: Vec<SlotMeta>,
    slot_len: usize,
    mask: u64,
    /// Frames held in a lent arena, pinned.
    lent: usize,
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
            lent: 0,
        }
    }

    /// Frames held in a lent arena: they can be handed on only within a call that lends it.
    pub fn lent_frames(&self) -> usize {
        self.lent
    }

    /// Largest payload a slot holds.
    pub fn slot_len(&self) -> usize {
        self.slot_len
    }

    /// Stores a frame; its payload must fit [`Self::slot_len`]. With `lent` (the arena the
    /// frame's datagram is in), the frame stays where it is if the lender pins it; otherwise
    /// it is copied. Returns whether it was copied.
    pub fn hold(&mut self, f: &FrameInfo<'_>, lent: Option<&mut Lent<'_>>) -> bool {
        debug_assert!(f.payload.len() <= self.slot_len);
        if self.meta.is_empty() {
            let n = self.mask as usize + 1;
            self.meta = match <SlotMeta as zerocopy::FromZeros>::new_vec_zeroed(n) {
                Ok(meta) => meta,
                // Out of memory: `vec!` reports it the way every allocation does.
                Err(_) => vec![SlotMeta::default(); n],
            };
        }
        let i = (f.sequence & self.mask) as usize;
        debug_assert!(!self.meta[i].occupied, "held sequences span more than the hold");
        let lent_at = lent.and_then(|l| {
            let at = l.offset_of(f.payload)?;
            l.lender.pin(at).then_some(at)
        });
        self.meta[i] = SlotMeta {
            sequence: f.sequence,
            occupied: true,
            stream: f.stream,
            epoch: f.epoch,
            timestamp: f.timestamp,
            message_len: f.message_len,
            fragment_offset: f.fragment_offset,
            len: f.payload.len(),
            lent: lent_at.is_some(),
            lent_at: lent_at.unwrap_or(0),
        };
        if lent_at.is_some() {
            self.lent += 1;
            return false;
        }
        if self.bytes.is_empty() {
            self.bytes = vec![0; self.meta.len() * self.slot_len];
        }
        let start = i * self.slot_len;
        self.bytes[start..start + f.payload.len()].copy_from_slice(f.payload);
        // Frames behind a gap come in sequence, so the next ones go to the next slots: ask
        // for their lines now (the slots span two windows, more than the caches hold, and each
        // first store would otherwise wait for its line).
        let next = ((f.sequence + PREFETCH_SLOTS) & self.mask) as usize * self.slot_len;
        intergroup_ring::hint::prefetch_write(&self.bytes[next..next + f.payload.len()]);
        true
    }

    /// Asks for the first line of the payload of `sequence` if it is held (in the lent arena
    /// at `arena`, or in its slot). Held frames leave in sequence once their gap is filled,
    /// long after they came (the repair's round trip), and their reader touches that line
    /// first: under 5% loss it was 65% of the bench handler's time.
    fn prefetch(&self, sequence: u64, arena: Option<*const u8>) {
        let i = (sequence & self.mask) as usize;
        let Some(m) = self.meta.get(i).filter(|m| m.occupied && m.sequence == sequence) else {
            return;
        };
        match (m.lent, arena) {
            (true, Some(arena)) => intergroup_ring::hint::prefetch_read_ptr(arena.wrapping_add(m.lent_at)),
            (true, None) => {}
            (false, _) => {
                intergroup_ring::hint::prefetch_read_ptr(self.bytes.as_ptr().wrapping_add(i * self.slot_len))
            }
        }
    }

    /// Releases the frame of `sequence` and lends it out; `None` if it is not held, or if it
    /// is held in a lent arena and `lent` is not that arena. A frame held in the arena is
    /// unpinned: its bytes stay valid for the rest of the caller's call.
    pub fn take<'s, 'a: 's>(
        &'s mut self,
        sequence: u64,
        lent: Option<&mut Lent<'a>>,
    ) -> Option<FrameInfo<'s>> {
        let i = (sequence & self.mask) as usize;
        let m = self.meta.get_mut(i)?;
        if !m.occupied || m.sequence != sequence {
            return None;
        }
        let arena = lent.as_ref().map(|l| l.arena.as_ptr());
        let payload = match m.lent.then_some(m.lent_at) {
            Some(at) => {
                let l = lent?;
                let payload = l.arena.get(at..at + m.len)?;
                l.lender.unpin(at);
                self.lent -= 1;
                payload
            }
            None => {
                let start = i * self.slot_len;
                &self.bytes[start..start + m.len]
            }
        };
        m.occupied = false;
        let (stream, epoch, timestamp, message_len, fragment_offset) =
            (m.stream, m.epoch, m.timestamp, m.message_len, m.fragment_offset);
        self.prefetch(sequence + PREFETCH_SLOTS, arena);
        Some(FrameInfo {
            sequence,
            stream,
            epoch,
            timestamp,
            message_len,
            fragment_offset,
            payload,
        })
    }
}
