//! The many-producer, one-consumer record ring (clients to engine: commands and publications).
//!
//! ```text
//! data area, capacity bytes (a power of two); positions grow forever, offset = position % capacity
//!
//!  head (consumer)                 tail (producers)
//!  v                               v
//!  +--------+---------+---------+--+------------------------------+--------+
//!  | record | record  | claimed |  ... free (zeroed) ...           | PADDING|
//!  +--------+---------+---------+---------------------------------+--------+
//!
//! record: | header: u64 = type_id << 32 | state as u32 | payload ... | to RECORD_ALIGN
//!   state (i32):  0      free (zeroed by the consumer)
//!                 -len   claimed, being written (len = 8 + payload length)
//!                 +len   committed
//! ```
//!
//! Memory ordering (the loom tests in `tests/loom.rs` check it):
//! 1. A producer claims with one compare-exchange on `tail` (AcqRel). The range it claimed is
//!    free: it loaded `head` (Acquire) and saw that the consumer released it, and the consumer
//!    zeroed the range before its Release store of `head`.
//! 2. The producer writes its header as "claimed" (Release), fills the payload with plain
//!    writes, then stores the header as "committed" (Release).
//! 3. The consumer loads the header (Acquire); a committed header makes the payload written
//!    before it visible. It reads in place, zeroes what it read, and stores `head` (Release).
//! 4. A claim that wraps first writes a committed PADDING record to the end of the area, so the
//!    consumer never waits on bytes nobody will write.

use crate::file::{RingKind, SharedFile};
use crate::memory::{Mapped, Memory};
use crate::primitive::{fence, AtomicU64, Ordering};
use crate::Error;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How many records ahead the single-producer consumer prefetches...
const PREFETCH_RECORDS: usize = 8;
/// ...but never less than this many bytes (small records need a longer reach).
const PREFETCH_MIN_BYTES: usize = 512;
/// Most bytes of a record ahead that the single-producer consumer prefetches: its header and
/// payload up to this length (longer payloads are read in runs the hardware prefetcher follows).
const PREFETCH_MAX_RECORD: usize = 4096;

/// How far ahead of its claims the single producer asks for cache lines, at least.
const WRITE_AHEAD: usize = 4096;

/// Bytes from a claim of `aligned` bytes to the header of a later claim of the same size:
/// `aligned` times a power of two, from `WRITE_AHEAD` up to twice that (or `aligned` alone
/// when it is longer). No division on the claim path.
#[inline]
fn write_ahead(aligned: usize) -> usize {
    aligned << WRITE_AHEAD.ilog2().saturating_sub(aligned.max(1).ilog2())
}

/// Records start at multiples of this many bytes.
pub const RECORD_ALIGN: usize = 8;
/// Bytes of a record header.
pub const HEADER_LEN: usize = 8;
/// The type id of padding records; reserved.
pub const PADDING_TYPE: u32 = u32::MAX;

/// Why a claim or an offer did not happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OfferError {
    /// Not enough free space now; try again after the consumer (or, in a reliable broadcast
    /// log, the slowest reader) catches up.
    #[error("ring full")]
    WouldBlock,
    /// The record can never fit (larger than a quarter of the ring).
    #[error("record of {len} bytes exceeds the maximum of {max}")]
    TooLarge {
        /// The record's payload length.
        len: usize,
        /// The largest payload this ring takes.
        max: usize,
    },
    /// `PADDING_TYPE` is reserved.
    #[error("type id {0:#x} is reserved")]
    ReservedType(u32),
    /// The consumer gave the claim up as abandoned before it was committed (it took longer
    /// than the consumer's timeout); the record is lost.
    #[error("claim abandoned by the consumer after its timeout")]
    Abandoned,
}

fn align(n: usize) -> usize {
    (n + RECORD_ALIGN - 1) & !(RECORD_ALIGN - 1)
}

fn header(type_id: u32, state: i32) -> u64 {
    (u64::from(type_id) << 32) | u64::from(state as u32)
}

fn state_of(word: u64) -> i32 {
    word as u32 as i32
}

fn type_of(word: u64) -> u32 {
    (word >> 32) as u32
}

/// Largest data area of a record ring: record lengths are 31-bit.
pub const MAX_RECORD_CAPACITY: u64 = 1 << 30;

/// Largest payload a ring of `capacity` bytes takes.
pub fn max_payload(capacity: usize) -> usize {
    capacity / 4 - HEADER_LEN
}

/// The producer side; any number may exist, in any processes.
#[derive(Debug)]
pub(crate) struct Producer<M> {
    pub(crate) mem: M,
}

/// A claimed range, returned by [`Producer::claim`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Claimed {
    /// Offset of the record header in the data area.
    pub offset: usize,
    /// The tail after this claim (padding included).
    pub end: u64,
    /// Record length, header included (unaligned).
    pub record_len: usize,
    pub type_id: u32,
}

impl<M: Memory> Producer<M> {
    /// Checks a record of `type_id` with a `len`-byte payload; returns the capacity, the record
    /// length and its aligned length.
    fn sizes(&self, type_id: u32, len: usize) -> Result<(usize, usize, usize), OfferError> {
        if type_id == PADDING_TYPE {
            return Err(OfferError::ReservedType(type_id));
        }
        let capacity = self.mem.capacity();
        if len > max_payload(capacity) {
            return Err(OfferError::TooLarge {
                len,
                max: max_payload(capacity),
            });
        }
        let record_len = HEADER_LEN + len;
        Ok((capacity, record_len, align(record_len)))
    }

    /// Writes a committed padding record at `offset` if `padding` is non-zero (the claim then
    /// starts at 0), and the claim's header with `state`; returns the claim's offset.
    fn write_headers(
        &self,
        offset: usize,
        padding: usize,
        type_id: u32,
        state: i32,
        order: Ordering,
    ) -> usize {
        let at = if padding > 0 {
            self.mem
                .word(offset)
                .store(header(PADDING_TYPE, padding as i32), order);
            0
        } else {
            offset
        };
        self.mem.word(at).store(header(type_id, state), order);
        at
    }

    /// Single-producer claim: the one producer owns the tail, so no compare-exchange and no
    /// "claimed" state; the header is written final and `commit_single` publishes the tail.
    pub(crate) fn claim_single(&self, type_id: u32, len: usize) -> Result<Claimed, OfferError> {
        let (capacity, record_len, aligned) = self.sizes(type_id, len)?;
        let tail = self.mem.tail().load(Ordering::Relaxed);
        let offset = tail as usize & (capacity - 1);
        let to_end = capacity - offset;
        let padding = if aligned > to_end { to_end } else { 0 };
        let end = tail + (padding + aligned) as u64;
        let mut head = self.mem.head_cache().load(Ordering::Relaxed);
        if end - head > capacity as u64 {
            head = self.mem.head().load(Ordering::Acquire);
            self.mem.head_cache().store(head, Ordering::Relaxed);
            if end - head > capacity as u64 {
                return Err(OfferError::WouldBlock);
            }
        }
        // Ask for a line a few records on now, so that a later claim hits the cache instead of
        // stalling on a line the consumer last held: the header of the record as many claims
        // of this size on as reach about `WRITE_AHEAD` bytes, the one line every claim writes
        // (a producer may fill only part of a large payload).
        self.mem
            .prefetch_write((offset + write_ahead(aligned)) & (capacity - 1));
        // The tail publishes both headers, so they need no ordering of their own.
        let offset = self.write_headers(offset, padding, type_id, record_len as i32, Ordering::Relaxed);
        Ok(Claimed {
            offset,
            end,
            record_len,
            type_id,
        })
    }

    /// Publishes a single-producer claim (and any padding before it) to the consumer.
    pub(crate) fn commit_single(&self, c: Claimed) {
        self.mem.tail().store(c.end, Ordering::Release);
    }

    /// Publishes a single-producer claim as padding.
    pub(crate) fn abort_single(&self, c: Claimed) {
        self.mem
            .word(c.offset)
            .store(header(PADDING_TYPE, c.record_len as i32), Ordering::Relaxed);
        self.mem.tail().store(c.end, Ordering::Release);
    }

    /// Single-producer claim, copy and commit.
    pub(crate) fn offer_single(&self, type_id: u32, payload: &[u8]) -> Result<(), OfferError> {
        let c = self.claim_single(type_id, payload.len())?;
        // SAFETY: the claim owns its payload range until the tail is published.
        unsafe { self.mem.write(c.offset + HEADER_LEN, payload) };
        self.commit_single(c);
        Ok(())
    }

    /// Claims space for a payload of `len` bytes and marks it "claimed" with `type_id`.
    pub(crate) fn claim(&self, type_id: u32, len: usize) -> Result<Claimed, OfferError> {
        let (capacity, record_len, aligned) = self.sizes(type_id, len)?;
        let mask = capacity - 1;
        let mut head = self.mem.head_cache().load(Ordering::Relaxed);
        let mut tail = self.mem.tail().load(Ordering::Acquire);
        loop {
            let offset = tail as usize & mask;
            let to_end = capacity - offset;
            let padding = if aligned > to_end { to_end } else { 0 };
            let needed = (padding + aligned) as u64;
            // `head` may be fresher than this `tail` snapshot; then the CAS below fails and retries.
            if (tail + needed).saturating_sub(head) > capacity as u64 {
                // Looks full: refresh the cached head once, then give up.
                head = self.mem.head().load(Ordering::Acquire);
                self.mem.head_cache().fetch_max(head, Ordering::Relaxed);
                if (tail + needed).saturating_sub(head) > capacity as u64 {
                    return Err(OfferError::WouldBlock);
                }
            }
            match self.mem.tail().compare_exchange_weak(
                tail,
                tail + needed,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    let offset =
                        self.write_headers(offset, padding, type_id, -(record_len as i32), Ordering::Release);
                    // Keep the header ahead of every payload write, so a consumer that scans
                    // past a dead claim (see `unblock_if_abandoned`) meets headers, not payload.
                    fence(Ordering::Release);
                    return Ok(Claimed {
                        offset,
                        end: tail + needed,
                        record_len,
                        type_id,
                    });
                }
                Err(actual) => tail = actual,
            }
        }
    }

    /// Publishes a filled claim to the consumer.
    pub(crate) fn commit(&self, c: Claimed) -> Result<(), OfferError> {
        self.finish(c, c.type_id)
    }

    /// Turns a claim into padding, so the consumer skips it.
    pub(crate) fn abort(&self, c: Claimed) -> Result<(), OfferError> {
        self.finish(c, PADDING_TYPE)
    }

    fn finish(&self, c: Claimed, type_id: u32) -> Result<(), OfferError> {
        let claimed = header(c.type_id, -(c.record_len as i32));
        let done = header(type_id, c.record_len as i32);
        self.mem
            .word(c.offset)
            .compare_exchange(claimed, done, Ordering::Release, Ordering::Relaxed)
            .map(|_| ())
            .map_err(|_| OfferError::Abandoned)
    }

    /// Claims, copies `payload` in, and commits.
    pub(crate) fn offer(&self, type_id: u32, payload: &[u8]) -> Result<(), OfferError> {
        let c = self.claim(type_id, payload.len())?;
        // SAFETY: the claim owns `offset + 8 .. offset + record_len` until it is committed.
        unsafe { self.mem.write(c.offset + HEADER_LEN, payload) };
        self.commit(c)
    }
}

/// What the consumer counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConsumerStats {
    /// Records handed to the handler.
    pub records: u64,
    /// Claims skipped because their producer did not commit within the timeout.
    pub abandoned: u64,
    /// Headers no producer could have written (corrupt shared memory); the rest of the lap
    /// was skipped.
    pub corrupt: u64,
}

/// The one consumer.
#[derive(Debug)]
pub(crate) struct Consumer<M> {
    pub(crate) mem: M,
    /// A claim at `head` that has not been committed: (position, first seen).
    stall: Option<(u64, Instant)>,
    pub(crate) abandon_timeout: Duration,
    pub(crate) stats: ConsumerStats,
    /// Single-producer rings: the position up to which records were handed on; those between
    /// `head` and here are held (see [`Consumer::read_single_held`]). Never below `head` once
    /// read; 0 before the first read.
    read_pos: u64,
}

impl<M: Memory> Consumer<M> {
    pub(crate) fn new(mem: M, abandon_timeout: Duration) -> Self {
        Self {
            mem,
            stall: None,
            abandon_timeout,
            stats: ConsumerStats::default(),
            read_pos: 0,
        }
    }

    /// Hands up to `limit` committed records to `f` in place, then releases them in one batch.
    /// Returns how many records were handed over.
    pub(crate) fn read(&mut self, limit: usize, mut f: impl FnMut(u32, &[u8])) -> usize {
        let capacity = self.mem.capacity();
        let mask = capacity - 1;
        let head = self.mem.head().load(Ordering::Relaxed);
        let mut pos = head;
        let mut handed = 0;
        // One batch covers at most one lap: its records are zeroed only at release, so going
        // round would meet them again.
        while handed < limit && pos - head < capacity as u64 {
            let offset = pos as usize & mask;
            let word = self.mem.word(offset).load(Ordering::Acquire);
            let state = state_of(word);
            if state <= 0 {
                if self.unblock_if_abandoned(pos, word) {
                    continue;
                }
                break;
            }
            let record_len = state as usize;
            if record_len < HEADER_LEN || offset + record_len > capacity {
                // Not a length any producer writes: the shared memory is corrupt. Treat the rest
                // of the area as padding rather than read out of bounds.
                pos += (capacity - offset) as u64;
                self.stats.corrupt += 1;
                continue;
            }
            // SAFETY: the record is committed (Acquire above) and stays untouched by producers
            // until `head` moves past it.
            handed += usize::from(unsafe { self.hand_on(offset, record_len, word, &mut f) });
            pos += align(record_len) as u64;
        }
        if pos != head {
            self.release(head, pos);
        }
        self.stats.records += handed as u64;
        handed
    }

    /// Lends the record at `offset` (header `word`, `record_len` bytes) to `f` unless it is
    /// padding; returns whether it did.
    ///
    /// # Safety
    ///
    /// The record is published and no producer writes it until `head` moves past it.
    unsafe fn hand_on(
        &self,
        offset: usize,
        record_len: usize,
        word: u64,
        f: &mut impl FnMut(u32, &[u8]),
    ) -> bool {
        let type_id = type_of(word);
        if type_id == PADDING_TYPE {
            return false;
        }
        // SAFETY: the caller guarantees the record is published and stable.
        unsafe {
            self.mem
                .read(offset + HEADER_LEN, record_len - HEADER_LEN, |p| f(type_id, p))
        };
        true
    }

    /// Single-producer read: everything below the published tail is committed, so nothing is
    /// zeroed and nothing can be abandoned (a killed producer never published its claim).
    /// Releases what it read, and any records held before.
    pub(crate) fn read_single(&mut self, limit: usize, mut f: impl FnMut(u32, &[u8])) -> usize {
        let handed = self.scan_single(limit, |_, type_id, p| f(type_id, p));
        self.release_single(self.read_pos);
        handed
    }

    /// Single-producer read that holds what it hands on: up to `limit` records after those
    /// read before go to `f(position, type_id, payload)`, writable, and stay the consumer's
    /// (the producer cannot reuse their space) until [`release_single`](Self::release_single)
    /// passes their position.
    pub(crate) fn read_single_held(&mut self, limit: usize, f: impl FnMut(u64, u32, &mut [u8])) -> usize {
        self.scan_single(limit, f)
    }

    /// Releases the held records below position `to` (clamped to what was read).
    pub(crate) fn release_single(&mut self, to: u64) {
        let head = self.mem.head().load(Ordering::Relaxed);
        let to = to.min(self.read_pos);
        if to > head {
            // Release: the producer's Acquire load of `head` sees every read of, and write to,
            // the released records (headers written in place) as done.
            self.mem.head().store(to, Ordering::Release);
        }
    }

    /// Where the next read starts: the end of the last record handed on.
    pub(crate) fn read_position(&self) -> u64 {
        self.read_pos.max(self.mem.head().load(Ordering::Relaxed))
    }

    fn scan_single(&mut self, limit: usize, mut f: impl FnMut(u64, u32, &mut [u8])) -> usize {
        let capacity = self.mem.capacity();
        let mask = capacity - 1;
        let start = self.read_position();
        let tail = self.mem.tail().load(Ordering::Acquire);
        let mut pos = start;
        let mut handed = 0;
        while handed < limit && pos < tail {
            let offset = pos as usize & mask;
            let word = self.mem.word(offset).load(Ordering::Relaxed);
            let record_len = state_of(word);
            // The record a few records on, guessing they are this size: header and payload. The
            // consumer is bound by loads of lines the producer never wrote (an embedded
            // publisher may fill only part of a claim) or that left the caches, and the
            // hardware prefetcher alone leaves them missing: with 1 KiB records the copy out
            // of the ring stalled on its loads (measured: the publishing worker spent a median
            // of about 350 ns per message against 384 without this, in interleaved pairs).
            let record = align(record_len.max(8) as usize);
            let ahead = (PREFETCH_RECORDS * record).max(PREFETCH_MIN_BYTES);
            for line in (0..record.min(PREFETCH_MAX_RECORD)).step_by(crate::hint::CACHE_LINE) {
                self.mem.prefetch((offset + ahead + line) & mask);
            }
            if record_len < HEADER_LEN as i32 || offset + record_len as usize > capacity {
                // No producer writes this below the tail: corrupt memory. Skip the lap's rest.
                pos += (capacity - offset) as u64;
                self.stats.corrupt += 1;
                continue;
            }
            let record_len = record_len as usize;
            let type_id = type_of(word);
            if type_id != PADDING_TYPE {
                // SAFETY: below the tail (Acquire), so written and published; the producer does
                // not reuse it until `head` moves past it, which only this consumer does.
                unsafe {
                    self.mem
                        .read_mut(offset + HEADER_LEN, record_len - HEADER_LEN, |p| {
                            f(pos, type_id, p)
                        })
                };
                handed += 1;
            }
            pos += align(record_len) as u64;
        }
        if pos != self.read_pos {
            // Relaxed: a windowed producer reads it only to pace itself, never to reuse space
            // (`SingleProducer::set_window`).
            self.mem.meta(READ_OFFSET).store(pos, Ordering::Relaxed);
        }
        self.read_pos = pos;
        self.stats.records += handed as u64;
        handed
    }

    fn release(&mut self, from: u64, to: u64) {
        let capacity = self.mem.capacity();
        let mut pos = from;
        while pos < to {
            let offset = pos as usize & (capacity - 1);
            let n = ((to - pos) as usize).min(capacity - offset);
            // SAFETY: these bytes were read by this consumer and are not yet released.
            unsafe { self.mem.zero(offset, n) };
            pos += n as u64;
        }
        self.mem.head().store(to, Ordering::Release);
    }

    /// At `pos` the header is `word` (free or claimed). If a producer claimed it and has not
    /// committed for `abandon_timeout`, turn the claim into padding. Returns whether it did.
    fn unblock_if_abandoned(&mut self, pos: u64, word: u64) -> bool {
        let tail = self.mem.tail().load(Ordering::Acquire);
        if tail <= pos {
            self.stall = None;
            return false;
        }
        match self.stall {
            Some((p, since)) if p == pos => {
                if since.elapsed() < self.abandon_timeout {
                    return false;
                }
            }
            _ => {
                self.stall = Some((pos, Instant::now()));
                return false;
            }
        }
        self.stall = None;
        let capacity = self.mem.capacity();
        let offset = pos as usize & (capacity - 1);
        let skip = if state_of(word) < 0 {
            align((-state_of(word)) as usize)
        } else {
            // The producer died before writing its header: its claim runs to the next header
            // anyone wrote, to the tail, or to the end of the area, whichever comes first.
            let limit = ((tail - pos) as usize).min(capacity - offset);
            let mut len = RECORD_ALIGN;
            while len < limit && self.mem.word(offset + len).load(Ordering::Acquire) == 0 {
                len += RECORD_ALIGN;
            }
            len
        };
        let padding = header(PADDING_TYPE, skip as i32);
        let word_ref: &AtomicU64 = self.mem.word(offset);
        if word_ref
            .compare_exchange(word, padding, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            // The producer was alive after all and wrote meanwhile: read normally.
            return true;
        }
        self.stats.abandoned += 1;
        true
    }
}

/// Offset in the file of the producers' claim position (its own 128-byte line pair).
pub const TAIL_OFFSET: usize = 128;
/// Offset of the producers' cached consumer position.
pub const HEAD_CACHE_OFFSET: usize = 256;
/// Offset of the consumer position.
pub const HEAD_OFFSET: usize = 384;
/// Offset of the producer mode word: 0 many producers, 1 a single producer.
pub const PRODUCERS_OFFSET: usize = 448;
/// Offset of the single producer's lock: the owning process id, 0 when free.
pub const PRODUCER_LOCK_OFFSET: usize = 456;
/// Offset of a single-producer ring's read position: the end of the records its consumer has
/// handed on, held or released; a windowed producer paces itself by it.
pub const READ_OFFSET: usize = 464;
/// Offset of the data area: the header, then the index lines.
pub const DATA_OFFSET: usize = 512;

/// How many producers a record ring serves, chosen at creation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Producers {
    /// Any number, in any processes ([`RecordProducer`]).
    Many,
    /// Exactly one at a time ([`SingleProducer`]): no atomic read-modify-write per record, no
    /// zeroing by the consumer, and nothing to abandon if it dies.
    Single,
}

fn meta_word(file: &SharedFile, offset: usize) -> &AtomicU64 {
    debug_assert!(offset % 8 == 0 && offset < DATA_OFFSET);
    // SAFETY: `open_checked` made sure the data area starts at DATA_OFFSET, so `offset` is
    // inside the mapping, 8-aligned, and only ever accessed atomically.
    unsafe { &*file.base_ptr().add(offset).cast::<AtomicU64>() }
}

fn producers_of(file: &SharedFile) -> Producers {
    if meta_word(file, PRODUCERS_OFFSET).load(Ordering::Acquire) == 1 {
        Producers::Single
    } else {
        Producers::Many
    }
}

impl Producer<Mapped> {
    /// The payload bytes of claim `c`, in the mapping.
    ///
    /// # Safety
    ///
    /// `c` is a live claim of this producer that the caller owns for the slice's lifetime.
    #[allow(clippy::mut_from_ref)]
    unsafe fn payload_mut(&self, c: Claimed) -> &mut [u8] {
        // SAFETY: the caller owns the claim, which lies inside the data area.
        unsafe {
            self.mem
                .slice_mut(c.offset + HEADER_LEN, c.record_len - HEADER_LEN)
        }
    }
}

fn mapped(file: &SharedFile) -> Mapped {
    let h = file.header();
    // SAFETY: `SharedFile::open`/`create`/`anonymous` made sure the mapping holds
    // `data_offset + capacity` bytes; DATA_OFFSET puts every index below the data area,
    // 8-aligned; the mapping lives in `file`, which each handle keeps (shared through an `Arc`)
    // beside its `Mapped`.
    unsafe {
        Mapped::new(
            file.base_ptr(),
            h.data_offset.get() as usize,
            h.capacity.get() as usize,
            [TAIL_OFFSET, HEAD_OFFSET, HEAD_CACHE_OFFSET],
        )
    }
}

fn open_checked(path: &Path) -> Result<SharedFile, Error> {
    let file = SharedFile::open(path, RingKind::Records)?;
    let h = file.header();
    if h.data_offset.get() as usize != DATA_OFFSET
        || h.record_alignment.get() as usize != RECORD_ALIGN
        || h.capacity.get() > MAX_RECORD_CAPACITY
    {
        return Err(Error::BadLayout {
            path: path.display().to_string(),
            what: "not the record-ring layout this build writes".into(),
        });
    }
    Ok(file)
}

/// Creates a record-ring file at `path` with a data area of `capacity` bytes (a power of two,
/// 64 B to 1 GiB). An existing file is replaced.
pub fn create(path: &Path, capacity: u64) -> Result<(), Error> {
    create_with(path, capacity, Producers::Many)
}

/// Creates a record-ring file for `producers` producers; see [`create`].
pub fn create_with(path: &Path, capacity: u64, producers: Producers) -> Result<(), Error> {
    check_record_capacity(&path.display().to_string(), capacity)?;
    let file = SharedFile::create(
        path,
        RingKind::Records,
        capacity,
        RECORD_ALIGN as u32,
        DATA_OFFSET - crate::file::HEADER_LEN,
    )?;
    let mode = u64::from(producers == Producers::Single);
    meta_word(&file, PRODUCERS_OFFSET).store(mode, Ordering::Release);
    Ok(())
}

/// A single-producer ring of `capacity` bytes in this process's own memory, not a file
/// ([`SharedFile::anonymous`]: on huge pages where the kernel allows), and both its ends: for a
/// producer and a consumer that are threads of this process. It behaves as a ring made by
/// [`create_with`] and opened with [`SingleProducer::open`] and [`RecordConsumer::open`].
pub fn anonymous_single(
    capacity: u64,
    abandon_timeout: Duration,
) -> Result<(SingleProducer, RecordConsumer), Error> {
    check_record_capacity(crate::file::ANONYMOUS, capacity)?;
    let file = Arc::new(SharedFile::anonymous(
        RingKind::Records,
        capacity,
        RECORD_ALIGN as u32,
        DATA_OFFSET - crate::file::HEADER_LEN,
    )?);
    meta_word(&file, PRODUCERS_OFFSET).store(1, Ordering::Release);
    // The producer lock, as `SingleProducer::open` takes it: no other process can see it.
    meta_word(&file, PRODUCER_LOCK_OFFSET).store(u64::from(std::process::id()), Ordering::Release);
    Ok((
        SingleProducer::on(file.clone()),
        RecordConsumer::on(file, abandon_timeout),
    ))
}

/// Refuses a data area larger than a record ring can index.
fn check_record_capacity(name: &str, capacity: u64) -> Result<(), Error> {
    if capacity > MAX_RECORD_CAPACITY {
        return Err(Error::BadLayout {
            path: name.into(),
            what: format!("capacity {capacity} exceeds {MAX_RECORD_CAPACITY}"),
        });
    }
    Ok(())
}

/// A producer of a record ring; many may exist at once, in any processes.
#[derive(Debug)]
pub struct RecordProducer {
    inner: Producer<Mapped>,
    _file: SharedFile,
}

impl RecordProducer {
    /// Maps the record ring at `path`.
    pub fn open(path: &Path) -> Result<Self, Error> {
        let file = open_checked(path)?;
        if producers_of(&file) != Producers::Many {
            return Err(Error::BadLayout {
                path: path.display().to_string(),
                what: "a single-producer ring: open it with SingleProducer".into(),
            });
        }
        Ok(Self {
            inner: Producer { mem: mapped(&file) },
            _file: file,
        })
    }

    /// Largest payload one record can carry.
    pub fn max_payload(&self) -> usize {
        max_payload(self.inner.mem.capacity())
    }

    /// Claims room for a record of `len` payload bytes, to be filled in place.
    pub fn try_claim(&self, type_id: u32, len: usize) -> Result<RecordClaim<'_>, OfferError> {
        let claimed = self.inner.claim(type_id, len)?;
        Ok(RecordClaim {
            producer: self,
            claimed,
            done: false,
        })
    }

    /// Copies `payload` into a new record of `type_id`.
    pub fn offer(&self, type_id: u32, payload: &[u8]) -> Result<(), OfferError> {
        self.inner.offer(type_id, payload)
    }
}

/// Room claimed in a record ring; fill [`Self::buf`], then [`Self::commit`]. Dropped without a
/// commit, it becomes padding that the consumer skips.
#[derive(Debug)]
pub struct RecordClaim<'a> {
    producer: &'a RecordProducer,
    claimed: Claimed,
    done: bool,
}

impl RecordClaim<'_> {
    /// The payload bytes, in the shared mapping.
    pub fn buf(&mut self) -> &mut [u8] {
        // SAFETY: this claim owns its payload range until it is committed or aborted, and the
        // returned borrow ends before either (both take `self`).
        unsafe { self.producer.inner.payload_mut(self.claimed) }
    }

    /// Publishes the record.
    pub fn commit(mut self) -> Result<(), OfferError> {
        self.done = true;
        self.producer.inner.commit(self.claimed)
    }

    /// Gives the room back as padding.
    pub fn abort(mut self) {
        self.done = true;
        // An abandoned claim is padding already; either way the consumer skips it.
        let _ = self.producer.inner.abort(self.claimed);
    }
}

impl Drop for RecordClaim<'_> {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.producer.inner.abort(self.claimed);
        }
    }
}

/// The one consumer of a record ring.
#[derive(Debug)]
pub struct RecordConsumer {
    inner: Consumer<Mapped>,
    producers: Producers,
    _file: Arc<SharedFile>,
}

impl RecordConsumer {
    /// Maps the record ring at `path`. A claim not committed within `abandon_timeout` is
    /// treated as the work of a dead producer and skipped.
    pub fn open(path: &Path, abandon_timeout: Duration) -> Result<Self, Error> {
        Ok(Self::on(Arc::new(open_checked(path)?), abandon_timeout))
    }

    /// The consumer of the checked ring in `file`.
    fn on(file: Arc<SharedFile>, abandon_timeout: Duration) -> Self {
        Self {
            inner: Consumer::new(mapped(&file), abandon_timeout),
            producers: producers_of(&file),
            _file: file,
        }
    }

    /// Hands up to `limit` records to `f(type_id, payload)` in place and releases them.
    pub fn read(&mut self, limit: usize, f: impl FnMut(u32, &[u8])) -> usize {
        match self.producers {
            Producers::Many => self.inner.read(limit, f),
            Producers::Single => self.inner.read_single(limit, f),
        }
    }

    /// Single-producer rings: hands up to `limit` records after those read before to
    /// `f(position, type_id, payload)`, writable, and holds them: the producer cannot reuse
    /// their space until [`release`](Self::release) passes their position. A record's position
    /// is where it starts; it ends before the next record's. `None` for a many-producer ring,
    /// which cannot hold records (its consumer zeroes what it releases).
    pub fn read_held(&mut self, limit: usize, f: impl FnMut(u64, u32, &mut [u8])) -> Option<usize> {
        match self.producers {
            Producers::Many => None,
            Producers::Single => Some(self.inner.read_single_held(limit, f)),
        }
    }

    /// Whether [`read_held`](Self::read_held) can hold records: a single-producer ring.
    pub fn can_hold(&self) -> bool {
        self.producers == Producers::Single
    }

    /// Releases held records below position `to` to the producer (positions past what was read
    /// are clamped). [`read`](Self::read) releases everything it reads, held records included.
    pub fn release(&mut self, to: u64) {
        if self.producers == Producers::Single {
            self.inner.release_single(to);
        }
    }

    /// Where the next read starts: one past the last record read.
    pub fn read_position(&self) -> u64 {
        match self.producers {
            Producers::Many => self.inner.mem.head().load(Ordering::Relaxed),
            Producers::Single => self.inner.read_position(),
        }
    }

    /// Bytes of the data area.
    pub fn capacity(&self) -> usize {
        self.inner.mem.capacity()
    }

    /// What the consumer counted.
    pub fn stats(&self) -> ConsumerStats {
        self.inner.stats
    }

    /// True when no record has been claimed beyond what was read: a sleeping consumer checks
    /// this after announcing that it sleeps, so a record offered meanwhile is never missed.
    /// (A claim still being written counts as not empty.)
    pub fn is_empty(&self) -> bool {
        let read = self.read_position();
        self.inner.mem.tail().load(Ordering::Acquire) == read
    }
}

/// A single producer's bound on how far its tail may run ahead of the consumer's read position
/// ([`READ_OFFSET`]), with its cached copy of that position.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Window {
    /// `u64::MAX` for no bound but the ring's space.
    bytes: u64,
    /// The read position as last loaded, refreshed only when the window looks full.
    read_cache: u64,
}

impl Window {
    pub(crate) const NONE: Self = Self {
        bytes: u64::MAX,
        read_cache: 0,
    };

    pub(crate) fn new(bytes: u64) -> Self {
        Self {
            bytes: bytes.max(1),
            read_cache: 0,
        }
    }

    /// Whether the records of the ring in `mem` not yet read fill the window.
    #[inline]
    pub(crate) fn full<M: Memory>(&mut self, mem: &M) -> bool {
        if self.bytes == u64::MAX {
            return false;
        }
        // The producer's own tail. Saturating: the read position is shared memory, and a
        // corrupt one must not panic.
        let tail = mem.tail().load(Ordering::Relaxed);
        if tail.saturating_sub(self.read_cache) < self.bytes {
            return false;
        }
        // Relaxed: the read position only paces this producer. Reusing space is still decided
        // by `head` (Acquire in the claim), so a stale value here can only refuse a claim.
        self.read_cache = mem.meta(READ_OFFSET).load(Ordering::Relaxed);
        tail.saturating_sub(self.read_cache) >= self.bytes
    }

    /// Refuses a claim on the ring in `mem` while the records not yet read fill the window.
    #[inline]
    pub(crate) fn admit<M: Memory>(&mut self, mem: &M) -> Result<(), OfferError> {
        if self.full(mem) {
            Err(OfferError::WouldBlock)
        } else {
            Ok(())
        }
    }
}

/// The one producer of a single-producer record ring. Opening takes the ring's producer lock;
/// a lock left by a process that no longer exists is taken over.
#[derive(Debug)]
pub struct SingleProducer {
    /// How far the tail may run ahead of the consumer's read position (see
    /// [`Self::set_window`]).
    window: Window,
    inner: Producer<Mapped>,
    file: Arc<SharedFile>,
}

impl SingleProducer {
    /// Maps the single-producer ring at `path` and takes its producer lock.
    pub fn open(path: &Path) -> Result<Self, Error> {
        let file = open_checked(path)?;
        let name = path.display().to_string();
        if producers_of(&file) != Producers::Single {
            return Err(Error::BadLayout {
                path: name,
                what: "a many-producer ring: open it with RecordProducer".into(),
            });
        }
        let me = u64::from(std::process::id());
        let lock = meta_word(&file, PRODUCER_LOCK_OFFSET);
        let mut owner = 0;
        loop {
            match lock.compare_exchange(owner, me, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => break,
                Err(current) if current == me || !process_alive(current) => owner = current,
                Err(current) => {
                    return Err(Error::InUse {
                        path: name,
                        pid: current as u32,
                    })
                }
            }
        }
        Ok(Self::on(Arc::new(file)))
    }

    /// The producer of the checked single-producer ring in `file`, whose lock it holds.
    fn on(file: Arc<SharedFile>) -> Self {
        Self {
            inner: Producer { mem: mapped(&file) },
            file,
            window: Window::NONE,
        }
    }

    /// Largest payload one record can carry.
    pub fn max_payload(&self) -> usize {
        max_payload(self.inner.mem.capacity())
    }

    /// Bounds how far this producer may run ahead of what the consumer has read: claims fail
    /// with [`OfferError::WouldBlock`] while the records committed and not yet read span
    /// `bytes` or more (padding included). One record is always allowed once everything is
    /// read, so a window smaller than a record still makes progress. `u64::MAX` (the default)
    /// leaves only the ring's space as the bound.
    ///
    /// A consumer that holds records it has read (for repair) frees their space later; the
    /// window bounds only the queue in front of it, and so the queue's latency under
    /// saturation.
    pub fn set_window(&mut self, bytes: u64) {
        self.window = Window::new(bytes);
    }

    /// Claims room for a record of `len` payload bytes, to be filled in place.
    #[inline]
    pub fn try_claim(&mut self, type_id: u32, len: usize) -> Result<SingleClaim<'_>, OfferError> {
        self.window.admit(&self.inner.mem)?;
        let claimed = self.inner.claim_single(type_id, len)?;
        Ok(SingleClaim {
            producer: self,
            claimed,
            done: false,
        })
    }

    /// Copies `payload` into a new record of `type_id`.
    pub fn offer(&mut self, type_id: u32, payload: &[u8]) -> Result<(), OfferError> {
        self.window.admit(&self.inner.mem)?;
        self.inner.offer_single(type_id, payload)
    }
}

impl Drop for SingleProducer {
    fn drop(&mut self) {
        let me = u64::from(std::process::id());
        let _ = meta_word(&self.file, PRODUCER_LOCK_OFFSET).compare_exchange(
            me,
            0,
            Ordering::AcqRel,
            Ordering::Relaxed,
        );
    }
}

/// Whether a process with this id exists (Linux: its /proc entry).
fn process_alive(pid: u64) -> bool {
    pid != 0 && Path::new(&format!("/proc/{pid}")).exists()
}

/// Room claimed in a single-producer ring; fill [`Self::buf`], then [`Self::commit`].
/// Dropped without a commit, it is published as padding.
#[derive(Debug)]
pub struct SingleClaim<'a> {
    producer: &'a mut SingleProducer,
    claimed: Claimed,
    done: bool,
}

impl SingleClaim<'_> {
    /// The payload bytes, in the shared mapping.
    #[inline]
    pub fn buf(&mut self) -> &mut [u8] {
        // SAFETY: the claim owns its payload range until the tail is published, which needs
        // `self` by value.
        unsafe { self.producer.inner.payload_mut(self.claimed) }
    }

    /// Publishes the record.
    #[inline]
    pub fn commit(mut self) {
        self.done = true;
        self.producer.inner.commit_single(self.claimed);
    }

    /// Publishes the room as padding.
    pub fn abort(mut self) {
        self.done = true;
        self.producer.inner.abort_single(self.claimed);
    }
}

impl Drop for SingleClaim<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.producer.inner.abort_single(self.claimed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::VecDeque;

    #[test]
    fn the_producer_prefetches_the_header_of_a_later_claim_of_the_same_size() {
        // Every aligned size a claim can have, up to a few pages: the reach is whole claims,
        // at least `WRITE_AHEAD` bytes (or one claim, when longer), and under twice that.
        for aligned in (HEADER_LEN..=5 * WRITE_AHEAD).step_by(RECORD_ALIGN) {
            let ahead = write_ahead(aligned);
            assert_eq!(ahead % aligned, 0, "{aligned}: {ahead}");
            assert!(ahead >= WRITE_AHEAD.max(aligned), "{aligned}: {ahead}");
            assert!(ahead < 2 * WRITE_AHEAD || ahead == aligned, "{aligned}: {ahead}");
        }
        assert_eq!(write_ahead(1032), 4128);
        assert_eq!(write_ahead(24), 6144);
    }

    fn ring(name: &str, capacity: u64) -> (crate::test_dir::TempPath, RecordProducer, RecordConsumer) {
        let path = crate::test_dir::TempPath::new(name);
        create(&path, capacity).unwrap();
        let p = RecordProducer::open(&path).unwrap();
        let c = RecordConsumer::open(&path, Duration::from_millis(50)).unwrap();
        (path, p, c)
    }

    /// A single-producer ring of `capacity` bytes with its producer and consumer.
    fn single_ring(name: &str, capacity: u64) -> (crate::test_dir::TempPath, SingleProducer, RecordConsumer) {
        let path = crate::test_dir::TempPath::new(name);
        create_with(&path, capacity, Producers::Single).unwrap();
        let p = SingleProducer::open(&path).unwrap();
        let c = RecordConsumer::open(&path, Duration::from_millis(50)).unwrap();
        (path, p, c)
    }

    fn drain(c: &mut RecordConsumer) -> Vec<(u32, Vec<u8>)> {
        let mut out = Vec::new();
        c.read(usize::MAX, |t, p| out.push((t, p.to_vec())));
        out
    }

    #[test]
    fn offer_claim_and_read_in_place() {
        let (_path, p, mut c) = ring("basic", 1024);
        p.offer(7, b"hello").unwrap();
        let mut claim = p.try_claim(8, 3).unwrap();
        claim.buf().copy_from_slice(b"abc");
        claim.commit().unwrap();
        p.try_claim(9, 4).unwrap().abort();
        drop(p.try_claim(9, 4).unwrap());
        p.offer(10, b"").unwrap();
        assert_eq!(
            drain(&mut c),
            vec![(7, b"hello".to_vec()), (8, b"abc".to_vec()), (10, vec![])]
        );
        assert!(drain(&mut c).is_empty());
    }

    #[test]
    fn full_too_large_and_reserved_are_typed() {
        let (_path, p, mut c) = ring("full", 256);
        assert_eq!(p.max_payload(), 56);
        assert!(matches!(p.offer(1, &[0; 57]), Err(OfferError::TooLarge { .. })));
        assert_eq!(
            p.offer(PADDING_TYPE, b"x"),
            Err(OfferError::ReservedType(PADDING_TYPE))
        );
        let mut n = 0;
        while p.offer(1, &[n as u8; 24]).is_ok() {
            n += 1;
        }
        assert_eq!(n, 8, "256 bytes hold eight 32-byte records");
        assert_eq!(p.offer(1, &[0; 24]), Err(OfferError::WouldBlock));
        assert_eq!(c.read(3, |_, _| {}), 3);
        p.offer(1, &[0; 24]).unwrap();
        assert_eq!(drain(&mut c).len(), 6);
    }

    #[test]
    fn wrap_pads_to_the_end() {
        let (_path, p, mut c) = ring("wrap", 128);
        for round in 0..50u8 {
            p.offer(u32::from(round), &[round; 20]).unwrap();
            p.offer(u32::from(round), &[round; 13]).unwrap();
            let got = drain(&mut c);
            assert_eq!(
                got,
                vec![
                    (u32::from(round), vec![round; 20]),
                    (u32::from(round), vec![round; 13])
                ]
            );
        }
    }

    #[test]
    fn an_abandoned_claim_is_skipped_after_the_timeout() {
        let (_path, p, mut c) = ring("abandon", 1024);
        p.offer(1, b"before").unwrap();
        let forgotten = p.try_claim(2, 16).unwrap();
        std::mem::forget(forgotten);
        p.offer(3, b"after").unwrap();
        // This read meets the claim and starts the clock; within the timeout nothing moves.
        assert_eq!(drain(&mut c), vec![(1, b"before".to_vec())]);
        assert!(drain(&mut c).is_empty());
        std::thread::sleep(Duration::from_millis(80));
        assert_eq!(drain(&mut c), vec![(3, b"after".to_vec())]);
        assert_eq!(c.stats().abandoned, 1);
    }

    #[test]
    fn single_producer_round_trip_wrap_and_lock() {
        let path = crate::test_dir::TempPath::new("single");
        create_with(&path, 256, Producers::Single).unwrap();
        assert!(
            RecordProducer::open(&path).is_err(),
            "a single-producer ring refuses RecordProducer"
        );
        let mut p = SingleProducer::open(&path).unwrap();
        let mut c = RecordConsumer::open(&path, Duration::from_millis(50)).unwrap();
        for round in 0..100u8 {
            p.offer(1, &[round; 20]).unwrap();
            let mut claim = p.try_claim(2, 13).unwrap();
            claim.buf().fill(round);
            claim.commit();
            drop(p.try_claim(3, 5).unwrap());
            assert_eq!(drain(&mut c), vec![(1, vec![round; 20]), (2, vec![round; 13])]);
        }
        let mut n = 0;
        while p.offer(1, &[0; 24]).is_ok() {
            n += 1;
        }
        // 256 bytes hold eight 32-byte records, or seven when one needs padding at the wrap.
        assert!(n == 7 || n == 8, "{n}");
        drop(p);
        let mut again = SingleProducer::open(&path).unwrap();
        assert_eq!(again.offer(1, &[0; 24]), Err(OfferError::WouldBlock));
        assert_eq!(drain(&mut c).len(), n);
        again.offer(1, b"x").unwrap();
        assert_eq!(drain(&mut c), vec![(1, b"x".to_vec())]);
        assert_eq!(c.stats().abandoned, 0);
    }

    #[test]
    fn an_anonymous_ring_carries_records_between_threads_as_a_file_ring_does() {
        assert!(matches!(
            anonymous_single(1000, Duration::from_secs(1)),
            Err(Error::BadLayout { .. })
        ));
        assert!(anonymous_single(MAX_RECORD_CAPACITY * 2, Duration::from_secs(1)).is_err());
        // Small: it wraps and fills as the file ring in the test above does.
        let (mut p, mut c) = anonymous_single(256, Duration::from_millis(50)).unwrap();
        for round in 0..50u8 {
            let mut claim = p.try_claim(2, 13).unwrap();
            claim.buf().fill(round);
            claim.commit();
            assert_eq!(drain(&mut c), vec![(2, vec![round; 13])]);
        }
        let mut n = 0;
        while p.offer(1, &[0; 24]).is_ok() {
            n += 1;
        }
        assert!(n == 7 || n == 8, "{n}");
        assert_eq!(drain(&mut c).len(), n);
        // Larger than a huge page, across two threads: every record arrives, in order.
        let (mut p, mut c) = anonymous_single(4 << 20, Duration::from_secs(1)).unwrap();
        p.set_window(1 << 20);
        const N: u64 = 200_000;
        let producer = std::thread::spawn(move || {
            for i in 0..N {
                let mut claim = loop {
                    match p.try_claim(1, 1000) {
                        Ok(claim) => break claim,
                        Err(OfferError::WouldBlock) => std::thread::yield_now(),
                        Err(e) => panic!("{e}"),
                    }
                };
                claim.buf()[..8].copy_from_slice(&i.to_le_bytes());
                claim.commit();
            }
        });
        let mut next = 0u64;
        while next < N {
            let read = c.read(usize::MAX, |t, payload| {
                assert_eq!((t, payload.len()), (1, 1000));
                assert_eq!(u64::from_le_bytes(payload[..8].try_into().unwrap()), next);
                next += 1;
            });
            if read == 0 {
                std::thread::yield_now();
            }
        }
        producer.join().unwrap();
        assert_eq!(c.stats().corrupt, 0);
    }

    #[test]
    fn a_windowed_producer_stays_within_its_window_of_the_read_position() {
        let (path, mut p, mut c) = single_ring("window", 1024);
        // 32-byte records, a window of 100 bytes: four fit (96 < 100), the fifth is refused
        // although the ring has room for 32.
        p.set_window(100);
        let mut n = 0u8;
        while p.offer(1, &[n; 24]).is_ok() {
            n += 1;
        }
        assert_eq!(n, 4);
        // Read and held (not released): the window opens although the space stays taken.
        assert_eq!(c.read_held(2, |_, _, _| ()), Some(2));
        p.offer(1, &[4; 24]).unwrap();
        p.offer(1, &[5; 24]).unwrap();
        assert_eq!(p.offer(1, &[6; 24]), Err(OfferError::WouldBlock));
        assert_eq!(c.read_held(usize::MAX, |_, _, _| ()), Some(4));
        // A window smaller than a record still lets one through once everything is read.
        p.set_window(8);
        p.offer(1, &[0; 200]).unwrap();
        assert_eq!(p.offer(1, &[0; 24]), Err(OfferError::WouldBlock));
        // Space is still the ring's: held records are not overwritten whatever the window.
        p.set_window(u64::MAX);
        assert_eq!(c.read_held(usize::MAX, |_, _, _| ()), Some(1));
        let mut more = 0;
        while p.offer(1, &[0; 24]).is_ok() {
            more += 1;
        }
        // 1024 bytes less the 6 held records (192 bytes) and the 208-byte one: 624 bytes, 19
        // records of 32 (18 when padding at the wrap takes the room of one).
        assert!(more == 19 || more == 18, "{more}");
        // A corrupt read position (beyond the tail) must not panic: the window just opens.
        c.release(u64::MAX);
        drain(&mut c);
        p.set_window(64);
        let file = open_checked(&path).unwrap();
        meta_word(&file, READ_OFFSET).store(u64::MAX, Ordering::Relaxed);
        assert_eq!(p.offer(1, &[0; 24]), Ok(()));
    }

    #[test]
    fn held_records_keep_their_space_and_edits_until_released() {
        let (_path, mut p, mut c) = single_ring("held", 256);
        assert_eq!(c.capacity(), 256);
        let mut n = 0u8;
        while p.offer(1, &[n; 24]).is_ok() {
            n += 1;
        }
        assert_eq!(n, 8, "eight 32-byte records fill 256 bytes");
        let mut positions = Vec::new();
        let held = c.read_held(usize::MAX, |pos, t, b| {
            assert_eq!((t, b.len()), (1, 24));
            positions.push((pos, b[0]));
            b[1] = 0xee; // written in place, as the engine writes frame headers
        });
        assert_eq!(held, Some(8));
        assert_eq!(positions, (0..8).map(|i| (i * 32, i as u8)).collect::<Vec<_>>());
        assert!(c.is_empty(), "everything offered was read");
        assert_eq!(c.read_position(), 256);
        // Read but held: the producer still finds the ring full.
        assert_eq!(p.offer(1, &[9; 24]), Err(OfferError::WouldBlock));
        // Nothing more to read, and releasing past what was read is clamped.
        assert_eq!(c.read_held(usize::MAX, |_, _, _| panic!("no record")), Some(0));
        c.release(64);
        p.offer(1, &[8; 24]).unwrap();
        p.offer(1, &[9; 24]).unwrap();
        assert_eq!(p.offer(1, &[10; 24]), Err(OfferError::WouldBlock));
        // The edits of records still held are intact; `read` releases them all with its own.
        let mut seen = Vec::new();
        c.read(usize::MAX, |_, b| seen.push((b[0], b[1])));
        assert_eq!(seen, vec![(8, 8), (9, 9)]);
        c.release(u64::MAX);
        for i in 10..18u8 {
            p.offer(1, &[i; 24]).unwrap();
        }
        assert_eq!(p.offer(1, &[0; 24]), Err(OfferError::WouldBlock));
        c.release(u64::MAX);
        let mut again = Vec::new();
        c.read_held(3, |pos, _, b| again.push((pos, b[0]))).unwrap();
        assert_eq!(again, vec![(320, 10), (352, 11), (384, 12)]);
        c.release(352);
        p.offer(1, &[18; 24]).unwrap();
        assert_eq!(p.offer(1, &[0; 24]), Err(OfferError::WouldBlock));
    }

    #[test]
    fn a_many_producer_ring_does_not_hold() {
        let (_path, p, mut c) = ring("noheld", 256);
        p.offer(1, b"x").unwrap();
        assert_eq!(c.read_held(1, |_, _, _| {}), None);
        assert_eq!(drain(&mut c), vec![(1, b"x".to_vec())]);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Offer(usize),
        Read(usize),
    }

    proptest! {
        /// Random record sizes, including ones that exactly fill the area and straddle the wrap,
        /// come out in order and intact.
        #[test]
        fn random_sizes_round_trip(ops in prop::collection::vec(
            prop_oneof![3 => (0usize..=56).prop_map(Op::Offer), 1 => (1usize..6).prop_map(Op::Read)], 1..300)
        ) {
            let (path, p, mut c) = ring("prop", 256);
            let mut expected: VecDeque<Vec<u8>> = VecDeque::new();
            let mut counter = 0u8;
            for op in ops {
                match op {
                    Op::Offer(len) => {
                        counter = counter.wrapping_add(1);
                        let payload = vec![counter; len];
                        match p.offer(u32::from(counter), &payload) {
                            Ok(()) => expected.push_back(payload),
                            Err(OfferError::WouldBlock) => {
                                // Refused only if it might truly not fit: the unread records, at
                                // most one padding among them (< 64 bytes: they span at most one
                                // wrap), this record, and the padding it may need (< its size).
                                let used: usize = expected.iter().map(|e| align(8 + e.len())).sum();
                                let need = align(8 + len);
                                prop_assert!(used + 56 + need + (need - 8) > 256, "spurious WouldBlock: {used} used, {need} needed");
                            }
                            Err(e) => prop_assert!(false, "unexpected {e}"),
                        }
                    }
                    Op::Read(n) => {
                        let mut got = Vec::new();
                        c.read(n, |_, b| got.push(b.to_vec()));
                        for g in got {
                            prop_assert_eq!(Some(g), expected.pop_front());
                        }
                    }
                }
            }
            let mut got = Vec::new();
            c.read(usize::MAX, |_, b| got.push(b.to_vec()));
            prop_assert_eq!(got, Vec::from(expected));
            drop(path);
        }
    }
}
