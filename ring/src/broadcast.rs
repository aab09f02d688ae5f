//! The one-producer, many-reader broadcast log (engine to subscribers).
//!
//! ```text
//! file: | FileHeader | tail @128 | claim @192 | floor @256 | mode @320 |
//!       | next sequence @384, version @392 | slots @448: 64 B each | data area @ data_offset
//! (`next sequence` is the sequence of the record that will start at `tail`; the producer
//! updates the pair under `version`, odd while it changes, so readers read them together.)
//! slot: | state (0 free, 1 active, 2 joining) | position | heartbeat counter | owner token |
//! record: | header: u64 = type_id << 32 | len | sequence: u64 | payload ... | to 8 bytes
//!   len includes the 16 header bytes; type PADDING fills the end of the area at a wrap.
//! ```
//!
//! Readers read at their own positions and never coordinate with each other.
//!
//! * **Reliable**: the producer never overwrites what the slowest active reader has not
//!   released; readers read in place. A reader whose heartbeat counter has not moved for the
//!   producer's `reader_timeout` is evicted and no longer holds the producer back.
//! * **Lossy**: the producer never waits. Before it overwrites anything it publishes `claim`
//!   (the end of what it is about to write) and moves `floor` to the oldest record that stays
//!   whole. A reader copies a record out, then re-checks `claim` (a seqlock): if the producer
//!   may have overwritten the record meanwhile, or already had, the reader reports
//!   `Lapped { missed }` and continues from `floor`.
//!
//! Memory ordering: the producer writes a record, then stores `tail` (Release); readers load
//! `tail` (Acquire) and read below it. In lossy mode the producer stores `claim`, then a
//! Release fence, then overwrites; readers copy, then an Acquire fence, then load `claim`
//! (the seqlock pattern; readers treat copied bytes as untrusted until the check passes).
//! Joining a reliable log is Dekker-style: the reader stores its position, marks its slot
//! active (SeqCst) and re-reads `tail` (SeqCst); the producer loads slot states (SeqCst) before
//! each write. Either the producer sees the reader, or the reader sees the producer's progress
//! and restarts its join at the newer tail; records are at most a quarter of the area, so one
//! unseen record cannot reach the joining position (see `join`).

use crate::file::{RingKind, SharedFile};
use crate::memory::{Mapped, Memory};
use crate::primitive::{fence, AtomicU64, Ordering};
use crate::records::OfferError;
use crate::Error;
use std::path::Path;
use std::time::{Duration, Instant};

/// Bytes of a broadcast record header (type and length word, then the record sequence).
pub const HEADER_LEN: usize = 16;
/// Records start at multiples of this many bytes.
pub const RECORD_ALIGN: usize = 8;
/// The type id of padding records; reserved.
pub const PADDING_TYPE: u32 = u32::MAX;

/// How far ahead of its writes the producer asks for cache lines (see `reserve`).
const PREFETCH_AHEAD: usize = 2048;
/// How far ahead of its reads a reader pulls in written lines (see `poll_sequenced`).
const READ_AHEAD: u64 = 1024;
const TAIL_OFFSET: usize = 128;
const CLAIM_OFFSET: usize = 192;
const FLOOR_OFFSET: usize = 256;
const MODE_OFFSET: usize = 320;
const SEQUENCE_OFFSET: usize = 384;
const VERSION_OFFSET: usize = 392;
const SLOTS_OFFSET: usize = 448;
const SLOT_LEN: usize = 64;
const SLOT_FREE: u64 = 0;
const SLOT_ACTIVE: u64 = 1;
const SLOT_JOINING: u64 = 2;
const MODE_RELIABLE: u64 = 1;
const MODE_LOSSY: u64 = 2;

/// Whether the producer waits for readers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Never overwrite what an active reader has not read.
    Reliable,
    /// Never wait; readers that fall a lap behind are told what they missed.
    Lossy,
}

/// What a poll found besides records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    /// Lossy mode: the producer overwrote records before this reader read them; reading goes on
    /// from the oldest record still present.
    #[error("lapped: {missed} records missed")]
    Lapped {
        /// Records that were overwritten unread.
        missed: u64,
    },
    /// Reliable mode: this reader was silent past the producer's timeout and was evicted.
    #[error("evicted: this reader stopped polling for longer than the producer's timeout")]
    Evicted,
}

fn align(n: usize) -> usize {
    (n + RECORD_ALIGN - 1) & !(RECORD_ALIGN - 1)
}

/// Largest payload of a log of `capacity` bytes.
pub fn max_payload(capacity: usize) -> usize {
    capacity / 4 - HEADER_LEN
}

/// A broadcast log over some memory: the mapped file, or loom's tracked cells.
#[derive(Debug)]
pub(crate) struct Log<M> {
    pub(crate) mem: M,
    pub(crate) capacity: usize,
    pub(crate) slots: usize,
}

impl<M: Memory> Log<M> {
    /// The atomic word at `offset` of the file's metadata (8-aligned, below the data area).
    fn word(&self, offset: usize) -> &AtomicU64 {
        self.mem.meta(offset)
    }

    fn slot_word(&self, slot: usize, field: usize) -> &AtomicU64 {
        self.word(SLOTS_OFFSET + slot * SLOT_LEN + field * 8)
    }

    /// The 8-byte word at `offset` of the data area.
    fn data_word(&self, offset: usize) -> &AtomicU64 {
        self.mem.word(offset)
    }

    /// `(tail, sequence of the record that starts there)`, read together.
    fn tail_and_sequence(&self) -> (u64, u64) {
        let version = self.word(VERSION_OFFSET);
        loop {
            let v1 = version.load(Ordering::Acquire);
            if v1 % 2 == 0 {
                let tail = self.word(TAIL_OFFSET).load(Ordering::Acquire);
                let sequence = self.word(SEQUENCE_OFFSET).load(Ordering::Relaxed);
                fence(Ordering::Acquire);
                if version.load(Ordering::Relaxed) == v1 {
                    return (tail, sequence);
                }
            }
            crate::primitive::spin_loop();
        }
    }

    fn mode(&self) -> Mode {
        if self.word(MODE_OFFSET).load(Ordering::Relaxed) == MODE_LOSSY {
            Mode::Lossy
        } else {
            Mode::Reliable
        }
    }

    /// Sets the mode of a new log.
    pub(crate) fn set_mode(&self, mode: Mode) {
        let m = if mode == Mode::Lossy {
            MODE_LOSSY
        } else {
            MODE_RELIABLE
        };
        self.word(MODE_OFFSET).store(m, Ordering::Release);
    }
}

/// Maps the broadcast log at `path` and checks its layout and mode.
fn open_log(path: &Path, check_mode: bool) -> Result<(SharedFile, Log<Mapped>), Error> {
    let file = SharedFile::open(path, RingKind::Broadcast)?;
    let h = file.header();
    let data_offset = h.data_offset.get() as usize;
    let capacity = h.capacity.get() as usize;
    let slots = data_offset.saturating_sub(SLOTS_OFFSET) / SLOT_LEN;
    let bad = |what: String| Error::BadLayout {
        path: path.display().to_string(),
        what,
    };
    if slots == 0 || h.record_alignment.get() as usize != RECORD_ALIGN || capacity > (1 << 30) {
        return Err(bad("not the broadcast-log layout this build writes".into()));
    }
    // SAFETY: `SharedFile::open` checked that the mapping holds `data_offset + capacity` bytes;
    // every metadata offset used here is 8-aligned and below `data_offset` (checked above via
    // `slots`), and the mapping lives in `file`, which each handle keeps beside its `Log`.
    let mem = unsafe { Mapped::new(file.base_ptr(), data_offset, capacity, [TAIL_OFFSET; 3]) };
    let log = Log { mem, capacity, slots };
    let mode = log.word(MODE_OFFSET).load(Ordering::Acquire);
    if check_mode && mode != MODE_RELIABLE && mode != MODE_LOSSY {
        return Err(bad(format!("unknown broadcast mode {mode}")));
    }
    Ok((file, log))
}

/// Creates a broadcast log at `path`: `capacity` bytes of data (a power of two, 64 B to
/// 1 GiB), room for `max_readers` readers, in `mode`. An existing file is replaced.
pub fn create(path: &Path, capacity: u64, max_readers: usize, mode: Mode) -> Result<(), Error> {
    let bad = |what: String| Error::BadLayout {
        path: path.display().to_string(),
        what,
    };
    if capacity > 1 << 30 {
        return Err(bad(format!("capacity {capacity} exceeds 1 GiB")));
    }
    if max_readers == 0 || max_readers > 4096 {
        return Err(bad(format!("max_readers {max_readers} outside 1..=4096")));
    }
    let metadata = SLOTS_OFFSET + max_readers * SLOT_LEN - crate::file::HEADER_LEN;
    SharedFile::create(path, RingKind::Broadcast, capacity, RECORD_ALIGN as u32, metadata)?;
    let (_file, log) = open_log(path, false)?;
    log.set_mode(mode);
    Ok(())
}

/// The producer logic, over any memory.
#[derive(Debug)]
pub(crate) struct ProducerCore<M> {
    log: Log<M>,
    mode: Mode,
    /// Next record sequence.
    sequence: u64,
    /// Per slot: last heartbeat value seen and when it last changed.
    liveness: Vec<(u64, Instant)>,
    reader_timeout: Duration,
    /// Readers evicted for silence.
    evicted: u64,
    /// Reliable mode: the producer may write up to here without looking at the reader slots
    /// again (see `offer`).
    limit: u64,
    /// Active readers at the last scan of the slots.
    readers: usize,
}

/// Room reserved for one record by [`ProducerCore::reserve`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Reserved {
    /// Offset of the record in the data area.
    at: usize,
    /// Record length with its header, before alignment.
    record_len: usize,
    /// The tail once the record is published.
    end: u64,
}

impl<M: Memory> ProducerCore<M> {
    pub(crate) fn new(log: Log<M>, reader_timeout: Duration) -> Self {
        let now = Instant::now();
        let mode = log.mode();
        // Continue the sequence of whatever is in the log.
        let sequence = log.word(SEQUENCE_OFFSET).load(Ordering::Acquire);
        Self {
            liveness: vec![(0, now); log.slots],
            log,
            mode,
            sequence,
            reader_timeout,
            evicted: 0,
            limit: 0,
            readers: 0,
        }
    }

    /// Appends a record of `type_id` with `payload`.
    #[inline]
    pub(crate) fn offer(&mut self, type_id: u32, payload: &[u8]) -> Result<(), OfferError> {
        let r = self.reserve(type_id, payload.len())?;
        // SAFETY: `reserve` made `r.at + HEADER_LEN .. + len` ours: inside the data area and
        // read by no reader until `publish` moves the tail past it.
        unsafe { self.log.mem.write(r.at + HEADER_LEN, payload) };
        self.publish(r, type_id);
        Ok(())
    }

    /// Whether some reader was active at the last look at the slots; with none cached, looks
    /// again. (Reliable mode; a lossy log has no reader slots to look at.)
    #[inline]
    pub(crate) fn connected(&mut self) -> bool {
        if self.readers == 0 && self.mode == Mode::Reliable {
            fence(Ordering::SeqCst);
            self.slowest_reader();
        }
        self.readers > 0
    }

    /// Finds room for a record of `len` payload bytes; nothing is visible to readers until
    /// [`Self::publish`].
    #[inline]
    pub(crate) fn reserve(&mut self, type_id: u32, len: usize) -> Result<Reserved, OfferError> {
        if type_id == PADDING_TYPE {
            return Err(OfferError::ReservedType(type_id));
        }
        let capacity = self.log.capacity;
        if len > max_payload(capacity) {
            return Err(OfferError::TooLarge {
                len,
                max: max_payload(capacity),
            });
        }
        let record_len = HEADER_LEN + len;
        let aligned = align(record_len);
        let tail = self.log.word(TAIL_OFFSET).load(Ordering::Relaxed);
        let offset = tail as usize & (capacity - 1);
        let to_end = capacity - offset;
        let padding = if aligned > to_end { to_end } else { 0 };
        let end = tail + (padding + aligned) as u64;
        match self.mode {
            // Reader slots are scanned only when the cached limit is reached. The limit is never
            // more than half a lap beyond the tail at the scan, so a reader that joined after the
            // scan finds the tail moved by less than half a lap, or restarts its join (`join`).
            Mode::Reliable if end > self.limit => {
                let half = (capacity / 2) as u64;
                self.limit = tail + half;
                // Pairs with the fence in `join`: either this scan sees the joining reader, or
                // the reader sees every tail stored before this fence.
                fence(Ordering::SeqCst);
                if let Some(slowest) = self.slowest_reader() {
                    self.limit = self.limit.min(slowest + capacity as u64);
                }
                if end > self.limit {
                    return Err(OfferError::WouldBlock);
                }
            }
            Mode::Reliable => {}
            Mode::Lossy => {
                self.log.word(CLAIM_OFFSET).store(end, Ordering::SeqCst);
                fence(Ordering::Release);
                self.advance_floor(end, end - aligned as u64);
            }
        }
        let mut at = offset;
        if padding > 0 {
            self.log.data_word(offset).store(
                (u64::from(PADDING_TYPE) << 32) | padding as u64,
                Ordering::Relaxed,
            );
            at = 0;
        }
        // `at .. at + aligned` is inside the data area and, by the checks above, holds nothing
        // a reader may still read (reliable) or was announced in `claim` (lossy).
        // Ask for the line a little way ahead now: by the time records reach it, stores to it
        // hit the cache instead of stalling the producer on a line the readers last held.
        self.log
            .mem
            .prefetch_write((at + PREFETCH_AHEAD) & (capacity - 1));
        Ok(Reserved { at, record_len, end })
    }

    /// Makes the record in `r` visible to readers.
    #[inline]
    pub(crate) fn publish(&mut self, r: Reserved, type_id: u32) {
        let Reserved { at, record_len, end } = r;
        self.log.data_word(at + 8).store(self.sequence, Ordering::Relaxed);
        self.log
            .data_word(at)
            .store((u64::from(type_id) << 32) | record_len as u64, Ordering::Relaxed);
        self.sequence += 1;
        if self.mode == Mode::Reliable {
            // Release is enough: a joining reader pairs with the SeqCst fence before each scan.
            // Reliable readers never need `(tail, sequence)` together (only a lapped reader
            // counts what it missed), so the pair's version is left alone: one line fewer
            // written per record.
            self.log.word(TAIL_OFFSET).store(end, Ordering::Release);
            return;
        }
        let version = self.log.word(VERSION_OFFSET);
        let v = version.load(Ordering::Relaxed);
        version.store(v + 1, Ordering::Relaxed);
        fence(Ordering::Release);
        self.log.word(TAIL_OFFSET).store(end, Ordering::Release);
        self.log
            .word(SEQUENCE_OFFSET)
            .store(self.sequence, Ordering::Relaxed);
        version.store(v + 2, Ordering::Release);
    }

    /// Moves `floor` past every record the bytes up to `end` will overwrite, and past padding,
    /// so it always names a whole record (or `new_record`, the one being written).
    fn advance_floor(&mut self, end: u64, new_record: u64) {
        let capacity = self.log.capacity as u64;
        let floor_word = self.log.word(FLOOR_OFFSET);
        let mut floor = floor_word.load(Ordering::Relaxed);
        let tail = self.log.word(TAIL_OFFSET).load(Ordering::Relaxed);
        while floor < tail {
            let offset = floor as usize & (self.log.capacity - 1);
            let word = self.log.data_word(offset).load(Ordering::Relaxed);
            if end - floor <= capacity && (word >> 32) as u32 != PADDING_TYPE {
                break;
            }
            floor += align((word as u32 as usize).max(RECORD_ALIGN)) as u64;
        }
        if floor >= tail {
            floor = new_record;
        }
        floor_word.store(floor, Ordering::Release);
    }

    /// The lowest position of any live reader, evicting silent ones.
    fn slowest_reader(&mut self) -> Option<u64> {
        let mut slowest: Option<u64> = None;
        let mut readers = 0;
        let now = Instant::now();
        for s in 0..self.log.slots {
            if self.log.slot_word(s, 0).load(Ordering::SeqCst) != SLOT_ACTIVE {
                continue;
            }
            let beat = self.log.slot_word(s, 2).load(Ordering::Relaxed);
            let (last, since) = &mut self.liveness[s];
            if beat != *last {
                *last = beat;
                *since = now;
            } else if now.duration_since(*since) > self.reader_timeout {
                if self
                    .log
                    .slot_word(s, 0)
                    .compare_exchange(SLOT_ACTIVE, SLOT_FREE, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
                {
                    self.evicted += 1;
                }
                continue;
            }
            let pos = self.log.slot_word(s, 1).load(Ordering::Acquire);
            slowest = Some(slowest.map_or(pos, |m| m.min(pos)));
            readers += 1;
        }
        self.readers = readers;
        slowest
    }
}

impl ProducerCore<Mapped> {
    /// The payload bytes of reserved room `r` of `len` bytes.
    ///
    /// # Safety
    ///
    /// `r` came from [`Self::reserve`] with this `len` and is not yet published, and the
    /// caller holds the producer exclusively while the slice lives.
    #[allow(clippy::mut_from_ref)]
    #[inline]
    unsafe fn payload_mut(&self, r: Reserved, len: usize) -> &mut [u8] {
        // SAFETY: see the function's contract; the range is inside the data area.
        unsafe { self.log.mem.slice_mut(r.at + HEADER_LEN, len) }
    }
}

/// The reader logic, over any memory.
#[derive(Debug)]
pub(crate) struct ReaderCore<M: Memory> {
    log: Log<M>,
    mode: Mode,
    slot: Option<usize>,
    /// Written into the slot's owner field; a slot re-taken by another reader is not ours.
    owner: u64,
    position: u64,
    /// The sequence expected next, to count what a lap skipped.
    next_sequence: Option<u64>,
    copy: Vec<u8>,
    heartbeat: u64,
}

impl<M: Memory> ReaderCore<M> {
    /// Joins `log` at its current tail; `None` when every reader slot is taken.
    pub(crate) fn new(log: Log<M>) -> Option<Self> {
        let mode = log.mode();
        let mut r = Self {
            log,
            mode,
            slot: None,
            owner: owner_token(),
            position: 0,
            next_sequence: None,
            copy: Vec::new(),
            heartbeat: 0,
        };
        let (tail, sequence) = r.log.tail_and_sequence();
        r.position = tail;
        r.next_sequence = Some(sequence);
        if mode == Mode::Reliable {
            r.join()?;
        }
        Some(r)
    }

    /// Takes a free slot and publishes the position, re-checking the tail (see module docs).
    fn join(&mut self) -> Option<()> {
        let slot = (0..self.log.slots).find(|&s| {
            self.log
                .slot_word(s, 0)
                .compare_exchange(SLOT_FREE, SLOT_JOINING, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        })?;
        // A joining slot is reserved; the producer ignores it until it is active.
        self.log.slot_word(slot, 3).store(self.owner, Ordering::Relaxed);
        let half = (self.log.capacity / 2) as u64;
        loop {
            let t = self.log.word(TAIL_OFFSET).load(Ordering::SeqCst);
            self.log.slot_word(slot, 1).store(t, Ordering::SeqCst);
            self.log.slot_word(slot, 0).store(SLOT_ACTIVE, Ordering::SeqCst);
            // Pairs with the fence before the producer's scan of the slots.
            fence(Ordering::SeqCst);
            let t2 = self.log.word(TAIL_OFFSET).load(Ordering::SeqCst);
            // The producer may have written one record it checked before seeing this slot. Its
            // start is at most t2 and its length at most half the area, so it cannot overwrite
            // anything at or after t unless t2 - t >= half: then start again.
            if t2 - t < half {
                self.position = t;
                self.slot = Some(slot);
                return Some(());
            }
            self.log.slot_word(slot, 0).store(SLOT_JOINING, Ordering::SeqCst);
        }
    }

    /// Marks this reader alive without reading (reliable mode).
    pub(crate) fn keep_alive(&mut self) {
        if let Some(s) = self.slot {
            self.heartbeat = self.heartbeat.wrapping_add(1);
            self.log.slot_word(s, 2).store(self.heartbeat, Ordering::Relaxed);
        }
    }

    /// Hands up to `limit` records to `f(type_id, payload)`: in place (reliable) or from a copy
    /// checked after the read (lossy). Returns how many, or what happened instead.
    pub(crate) fn poll(&mut self, limit: usize, mut f: impl FnMut(u32, &[u8])) -> Result<usize, ReadError> {
        self.poll_sequenced(limit, |t, _, p| f(t, p))
    }

    /// Like [`Self::poll`], also handing each record's sequence.
    pub(crate) fn poll_sequenced(
        &mut self,
        limit: usize,
        mut f: impl FnMut(u32, u64, &[u8]),
    ) -> Result<usize, ReadError> {
        self.keep_alive();
        if let Some(s) = self.slot {
            let ours = self.log.slot_word(s, 0).load(Ordering::Acquire) == SLOT_ACTIVE
                && self.log.slot_word(s, 3).load(Ordering::Relaxed) == self.owner;
            if !ours {
                self.slot = None;
                return Err(ReadError::Evicted);
            }
        }
        let capacity = self.log.capacity;
        let tail = self.log.word(TAIL_OFFSET).load(Ordering::Acquire);
        let mut handed = 0;
        while handed < limit && self.position < tail {
            let offset = self.position as usize & (capacity - 1);
            // Pull lines in a little ahead, but only written ones (below the tail): a line the
            // producer is about to write would have to be taken back from this reader.
            if self.position + READ_AHEAD < tail {
                self.log
                    .mem
                    .prefetch((offset + READ_AHEAD as usize) & (capacity - 1));
            }
            let word = self.log.data_word(offset).load(Ordering::Acquire);
            let type_id = (word >> 32) as u32;
            let len = word as u32 as usize;
            let padding = type_id == PADDING_TYPE && len >= RECORD_ALIGN && offset + len <= capacity;
            let fits = len >= HEADER_LEN && offset + len <= capacity;
            let sequence = if fits && !padding {
                self.log.data_word(offset + 8).load(Ordering::Acquire)
            } else {
                0
            };
            if self.mode == Mode::Lossy {
                // Copy first, then check that none of it was being overwritten (seqlock).
                self.copy.clear();
                if fits && !padding {
                    let copy = &mut self.copy;
                    // SAFETY: in bounds; the bytes may be overwritten concurrently, which the
                    // claim check below detects before they are used.
                    unsafe {
                        self.log.mem.read(offset + HEADER_LEN, len - HEADER_LEN, |p| {
                            copy.extend_from_slice(p)
                        })
                    };
                }
                fence(Ordering::Acquire);
                if self.lapped() {
                    return Err(self.skip_lap());
                }
            }
            if padding || !fits {
                // Padding, or (reliable) a header no producer writes: skip to the lap's end.
                self.position += if padding {
                    len as u64
                } else {
                    (capacity - offset) as u64
                };
                continue;
            }
            match self.mode {
                Mode::Reliable => {
                    // SAFETY: below `tail` (Acquire) and not overwritten while this reader's
                    // published position is at or before it.
                    unsafe {
                        self.log
                            .mem
                            .read(offset + HEADER_LEN, len - HEADER_LEN, |p| f(type_id, sequence, p))
                    };
                }
                Mode::Lossy => f(type_id, sequence, &self.copy),
            }
            self.next_sequence = Some(sequence + 1);
            self.position += align(len) as u64;
            handed += 1;
        }
        if let Some(s) = self.slot {
            self.log.slot_word(s, 1).store(self.position, Ordering::Release);
        }
        Ok(handed)
    }

    /// Whether the producer has claimed bytes that overwrite this reader's position.
    fn lapped(&self) -> bool {
        let claim = self.log.word(CLAIM_OFFSET).load(Ordering::SeqCst);
        claim.saturating_sub(self.position) > self.log.capacity as u64
    }

    /// Jumps to the oldest record still present and says how many records were missed.
    fn skip_lap(&mut self) -> ReadError {
        let capacity = self.log.capacity;
        loop {
            let floor = self.log.word(FLOOR_OFFSET).load(Ordering::Acquire);
            let (tail, next) = self.log.tail_and_sequence();
            let offset = floor as usize & (capacity - 1);
            // `floor` names a whole record, or the one being written (whose sequence is the
            // producer's next, if the tail has not moved past it).
            let sequence = if floor < tail {
                self.log.data_word(offset + 8).load(Ordering::Acquire)
            } else {
                next
            };
            fence(Ordering::Acquire);
            let claim = self.log.word(CLAIM_OFFSET).load(Ordering::SeqCst);
            if claim.saturating_sub(floor) <= capacity as u64 {
                let missed = self.next_sequence.map_or(0, |n| sequence.saturating_sub(n));
                self.position = floor;
                self.next_sequence = Some(sequence);
                return ReadError::Lapped { missed };
            }
            crate::primitive::spin_loop();
        }
    }
}

/// The one producer of a broadcast log.
#[derive(Debug)]
pub struct BroadcastProducer {
    core: ProducerCore<Mapped>,
    _file: SharedFile,
}

impl BroadcastProducer {
    /// Maps the log at `path` as its producer. In reliable mode a reader whose heartbeat does
    /// not move for `reader_timeout` is evicted.
    ///
    /// There must be one producer per log; the file does not enforce it.
    pub fn open(path: &Path, reader_timeout: Duration) -> Result<Self, Error> {
        let (file, log) = open_log(path, true)?;
        Ok(Self {
            core: ProducerCore::new(log, reader_timeout),
            _file: file,
        })
    }

    /// Largest payload one record can carry.
    pub fn max_payload(&self) -> usize {
        max_payload(self.core.log.capacity)
    }

    /// Readers evicted so far for silence.
    pub fn evicted(&self) -> u64 {
        self.core.evicted
    }

    /// Appends a record of `type_id` with `payload`.
    #[inline]
    pub fn offer(&mut self, type_id: u32, payload: &[u8]) -> Result<(), OfferError> {
        self.core.offer(type_id, payload)
    }

    /// Claims room for a record of `type_id` with `len` payload bytes, to be written in place
    /// and published by [`BroadcastClaim::commit`]. Dropped uncommitted, nothing is published.
    #[inline]
    pub fn try_claim(&mut self, type_id: u32, len: usize) -> Result<BroadcastClaim<'_>, OfferError> {
        let reserved = self.core.reserve(type_id, len)?;
        Ok(BroadcastClaim {
            producer: self,
            reserved,
            type_id,
            len,
        })
    }

    /// Reliable mode: whether some reader is joined (as of the last look at the reader slots,
    /// which this repeats while none was found). Readers that leave are noticed at the next
    /// look, at most half a lap of records later.
    #[inline]
    pub fn connected(&mut self) -> bool {
        self.core.connected()
    }
}

/// Room for one record in a broadcast log; see [`BroadcastProducer::try_claim`].
#[derive(Debug)]
pub struct BroadcastClaim<'a> {
    producer: &'a mut BroadcastProducer,
    reserved: Reserved,
    type_id: u32,
    len: usize,
}

impl BroadcastClaim<'_> {
    /// The payload bytes, in the shared mapping.
    #[inline]
    pub fn buf(&mut self) -> &mut [u8] {
        // SAFETY: the room is reserved and unpublished, and this claim borrows the producer
        // mutably for as long as the slice lives.
        unsafe { self.producer.core.payload_mut(self.reserved, self.len) }
    }

    /// Publishes the record.
    #[inline]
    pub fn commit(self) {
        self.producer.core.publish(self.reserved, self.type_id);
    }
}

/// A reader of a broadcast log, at its own position.
#[derive(Debug)]
pub struct BroadcastReader {
    core: ReaderCore<Mapped>,
    _file: SharedFile,
}

impl BroadcastReader {
    /// Maps the log at `path` and joins it at its current tail: it reads what is offered from
    /// now on. In reliable mode it takes a reader slot, or fails if all are taken.
    pub fn open(path: &Path) -> Result<Self, Error> {
        let (file, log) = open_log(path, true)?;
        let slots = log.slots;
        let core = ReaderCore::new(log).ok_or_else(|| Error::BadLayout {
            path: path.display().to_string(),
            what: format!("all {slots} reader slots are taken"),
        })?;
        Ok(Self { core, _file: file })
    }

    /// Whether records are waiting for this reader.
    #[inline]
    pub fn has_records(&self) -> bool {
        self.core.log.word(TAIL_OFFSET).load(Ordering::Acquire) > self.core.position
    }

    /// Marks this reader alive without reading (reliable mode).
    pub fn keep_alive(&mut self) {
        self.core.keep_alive();
    }

    /// Hands up to `limit` records to `f(type_id, payload)`: in place (reliable) or from a copy
    /// checked after the read (lossy). Returns how many, or what happened instead.
    pub fn poll(&mut self, limit: usize, f: impl FnMut(u32, &[u8])) -> Result<usize, ReadError> {
        self.core.poll(limit, f)
    }

    /// Like [`Self::poll`], handing `f(type_id, sequence, payload)`: `sequence` numbers the
    /// log's records from 0.
    #[inline]
    pub fn poll_sequenced(
        &mut self,
        limit: usize,
        f: impl FnMut(u32, u64, &[u8]),
    ) -> Result<usize, ReadError> {
        self.core.poll_sequenced(limit, f)
    }
}

/// A value no other live reader holds: process id and a per-process counter.
fn owner_token() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    (u64::from(std::process::id()) << 32) | NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

impl<M: Memory> Drop for ReaderCore<M> {
    fn drop(&mut self) {
        if let Some(s) = self
            .slot
            .filter(|&s| self.log.slot_word(s, 3).load(Ordering::Relaxed) == self.owner)
        {
            let _ = self.log.slot_word(s, 0).compare_exchange(
                SLOT_ACTIVE,
                SLOT_FREE,
                Ordering::AcqRel,
                Ordering::Relaxed,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn log(name: &str, capacity: u64, mode: Mode) -> crate::test_dir::TempPath {
        let path = crate::test_dir::TempPath::new(name);
        create(&path, capacity, 4, mode).unwrap();
        path
    }

    fn read_all(r: &mut BroadcastReader) -> Result<Vec<Vec<u8>>, ReadError> {
        let mut out = Vec::new();
        r.poll(usize::MAX, |_, p| out.push(p.to_vec()))?;
        Ok(out)
    }

    #[test]
    fn reliable_readers_get_everything_and_hold_the_producer_back() {
        let path = log("reliable", 256, Mode::Reliable);
        let mut p = BroadcastProducer::open(&path, Duration::from_secs(60)).unwrap();
        let mut a = BroadcastReader::open(&path).unwrap();
        let mut b = BroadcastReader::open(&path).unwrap();
        let mut sent = 0u8;
        while p.offer(1, &[sent; 40]).is_ok() {
            sent += 1;
        }
        assert_eq!(sent, 4, "256 bytes hold four 56-byte records");
        assert_eq!(p.offer(1, &[0; 40]), Err(OfferError::WouldBlock));
        assert_eq!(read_all(&mut a).unwrap().len(), 4);
        assert_eq!(
            p.offer(1, &[0; 40]),
            Err(OfferError::WouldBlock),
            "b still holds it back"
        );
        assert_eq!(
            read_all(&mut b).unwrap(),
            (0..4).map(|i| vec![i; 40]).collect::<Vec<_>>()
        );
        p.offer(1, &[9; 40]).unwrap();
        assert_eq!(read_all(&mut a).unwrap(), vec![vec![9; 40]]);
        drop(b);
        for _ in 0..3 {
            p.offer(1, &[7; 40]).unwrap();
        }
        assert_eq!(
            read_all(&mut a).unwrap().len(),
            3,
            "a dropped reader no longer counts"
        );
    }

    #[test]
    fn a_silent_reader_is_evicted_and_told_so() {
        let path = log("evict", 256, Mode::Reliable);
        let mut p = BroadcastProducer::open(&path, Duration::from_millis(30)).unwrap();
        let mut r = BroadcastReader::open(&path).unwrap();
        for _ in 0..4 {
            p.offer(1, &[1; 40]).unwrap();
        }
        assert_eq!(p.offer(1, &[1; 40]), Err(OfferError::WouldBlock));
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(p.offer(1, &[1; 40]), Ok(()));
        assert_eq!(p.evicted(), 1);
        assert_eq!(r.poll(10, |_, _| {}), Err(ReadError::Evicted));
    }

    #[test]
    fn a_lapped_lossy_reader_learns_how_many_it_missed_and_goes_on() {
        let path = log("lossy", 256, Mode::Lossy);
        let mut p = BroadcastProducer::open(&path, Duration::from_secs(60)).unwrap();
        let mut r = BroadcastReader::open(&path).unwrap();
        p.offer(1, &[0; 8]).unwrap();
        let mut seen = Vec::new();
        r.poll(10, |_, b| seen.push(b[0])).unwrap();
        assert_eq!(seen, vec![0]);
        // 24-byte records: ten hold 240 bytes, so 30 more lap the reader.
        for i in 1..=30u8 {
            p.offer(1, &[i; 8]).unwrap();
        }
        let lapped = r.poll(100, |_, _| {});
        let Err(ReadError::Lapped { missed }) = lapped else {
            panic!("expected a lap, got {lapped:?}");
        };
        let mut rest = Vec::new();
        r.poll(100, |_, b| rest.push(b[0])).unwrap();
        assert_eq!(
            u64::from(rest[0]) - 1,
            missed,
            "missed counts exactly the skipped records"
        );
        assert_eq!(*rest.last().unwrap(), 30);
        assert!(rest.windows(2).all(|w| w[1] == w[0] + 1), "{rest:?}");
    }

    #[test]
    fn a_new_reader_starts_at_the_tail() {
        let path = log("join", 1024, Mode::Reliable);
        let mut p = BroadcastProducer::open(&path, Duration::from_secs(60)).unwrap();
        p.offer(1, b"before").unwrap();
        let mut r = BroadcastReader::open(&path).unwrap();
        p.offer(2, b"after").unwrap();
        let mut got = Vec::new();
        r.poll(10, |t, b| got.push((t, b.to_vec()))).unwrap();
        assert_eq!(got, vec![(2, b"after".to_vec())]);
        assert_eq!(
            p.offer(PADDING_TYPE, b""),
            Err(OfferError::ReservedType(PADDING_TYPE))
        );
        assert!(matches!(p.offer(1, &[0; 300]), Err(OfferError::TooLarge { .. })));
    }

    proptest! {
        /// Random sizes through the wrap, a reliable reader reading at random moments.
        #[test]
        fn random_sizes_round_trip(ops in prop::collection::vec(
            prop_oneof![3 => (0usize..=48).prop_map(Some), 1 => Just(None)], 1..200)
        ) {
            let path = log("prop", 256, Mode::Reliable);
            let mut p = BroadcastProducer::open(&path, Duration::from_secs(60)).unwrap();
            let mut r = BroadcastReader::open(&path).unwrap();
            let mut expected = std::collections::VecDeque::new();
            let mut n = 0u8;
            for op in ops {
                match op {
                    Some(len) => {
                        n = n.wrapping_add(1);
                        match p.offer(1, &vec![n; len]) {
                            Ok(()) => expected.push_back(vec![n; len]),
                            Err(OfferError::WouldBlock) => prop_assert!(!expected.is_empty()),
                            Err(e) => prop_assert!(false, "{e}"),
                        }
                    }
                    None => {
                        for got in read_all(&mut r).unwrap() {
                            prop_assert_eq!(Some(got), expected.pop_front());
                        }
                    }
                }
            }
            let rest = read_all(&mut r).unwrap();
            prop_assert_eq!(rest, Vec::from(expected));
        }
    }
}
