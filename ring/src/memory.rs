//! Where a ring's indices and bytes live: a mapped file, or (under loom) tracked heap cells.

use crate::primitive::AtomicU64;

/// A ring's storage: three indices and a data area of `capacity` bytes whose 8-aligned words
/// can also be read and written atomically (record headers).
///
/// # Safety
///
/// Implementations must return atomics and byte ranges that stay valid for `&self`'s lifetime,
/// with `word(offset)` and the bytes at `offset..offset + 8` being the same memory.
pub(crate) unsafe trait Memory {
    /// Data-area size in bytes; a power of two.
    fn capacity(&self) -> usize;
    /// Producers' claim position (bytes ever claimed).
    fn tail(&self) -> &AtomicU64;
    /// Consumer position (bytes ever released).
    fn head(&self) -> &AtomicU64;
    /// Producers' cached copy of `head`, refreshed only when the ring looks full.
    fn head_cache(&self) -> &AtomicU64;
    /// The 8-byte word at `offset` (8-aligned, `< capacity`) of the data area.
    fn word(&self, offset: usize) -> &AtomicU64;
    /// The 8-byte word at `offset` of the file, in the metadata before the data area.
    fn meta(&self, offset: usize) -> &AtomicU64;

    /// Hints that the line at `offset` of the data area will be read soon. Never faults.
    fn prefetch(&self, _offset: usize) {}

    /// Hints that the line at `offset` of the data area will be written soon: its ownership
    /// is requested now, so the stores that follow do not wait for it. Never faults.
    fn prefetch_write(&self, _offset: usize) {}

    /// Copies `src` to `offset` of the data area.
    ///
    /// # Safety
    ///
    /// The caller owns `offset..offset + src.len()` exclusively (a claim not yet committed).
    unsafe fn write(&self, offset: usize, src: &[u8]);

    /// Lends `offset..offset + len` to `f`.
    ///
    /// # Safety
    ///
    /// The range holds a committed record that no producer writes until it is released.
    unsafe fn read<R>(&self, offset: usize, len: usize, f: impl FnOnce(&[u8]) -> R) -> R;

    /// Lends `offset..offset + len` to `f` for reading and writing.
    ///
    /// # Safety
    ///
    /// The range holds a committed record that this consumer has read and not yet released:
    /// no producer reads or writes it until then.
    unsafe fn read_mut<R>(&self, offset: usize, len: usize, f: impl FnOnce(&mut [u8]) -> R) -> R;

    /// Zeroes `offset..offset + len`.
    ///
    /// # Safety
    ///
    /// Only the consumer calls it, on bytes it read and has not yet released.
    unsafe fn zero(&self, offset: usize, len: usize);
}

/// A ring's memory inside a mapped file.
#[derive(Debug)]
pub(crate) struct Mapped {
    /// Start of the mapping; the metadata words are at 8-aligned offsets below `data_offset`.
    base: *mut u8,
    data_offset: usize,
    /// Start of the data area. Non-null, 64-aligned, valid for `capacity` bytes while the
    /// mapping in the owning [`crate::SharedFile`] lives.
    data: *mut u8,
    capacity: usize,
    tail: *const AtomicU64,
    head: *const AtomicU64,
    head_cache: *const AtomicU64,
}

// SAFETY: the pointers address a shared mapping that every process and thread may access
// concurrently; all cross-thread access goes through atomics or ranges owned by the claim
// protocol, as the `Memory` contract describes.
unsafe impl Send for Mapped {}
// SAFETY: as above.
unsafe impl Sync for Mapped {}

impl Mapped {
    /// # Safety
    ///
    /// `base` is the start of a mapping of at least `data_offset + capacity` bytes that outlives
    /// the returned value; the index offsets are 8-aligned and below `data_offset`;
    /// `data_offset` is 64-aligned.
    pub(crate) unsafe fn new(
        base: *mut u8,
        data_offset: usize,
        capacity: usize,
        indices: [usize; 3],
    ) -> Self {
        // SAFETY: the caller guarantees every offset lies inside the mapping and is aligned.
        unsafe {
            Self {
                base,
                data_offset,
                data: base.add(data_offset),
                capacity,
                tail: base.add(indices[0]).cast(),
                head: base.add(indices[1]).cast(),
                head_cache: base.add(indices[2]).cast(),
            }
        }
    }
}

// SAFETY: every pointer was checked to lie inside the live mapping when built (`Mapped::new`),
// and `word` and the byte accessors address the same data area.
unsafe impl Memory for Mapped {
    #[inline]
    fn capacity(&self) -> usize {
        self.capacity
    }

    #[inline]
    fn tail(&self) -> &AtomicU64 {
        // SAFETY: 8-aligned, inside the mapping, only ever accessed atomically.
        unsafe { &*self.tail }
    }

    #[inline]
    fn head(&self) -> &AtomicU64 {
        // SAFETY: as for `tail`.
        unsafe { &*self.head }
    }

    #[inline]
    fn head_cache(&self) -> &AtomicU64 {
        // SAFETY: as for `tail`.
        unsafe { &*self.head_cache }
    }

    #[inline]
    fn word(&self, offset: usize) -> &AtomicU64 {
        debug_assert!(offset % 8 == 0 && offset < self.capacity);
        // SAFETY: `offset` is 8-aligned and inside the data area, which is 64-aligned.
        unsafe { &*self.data.add(offset).cast::<AtomicU64>() }
    }

    #[inline]
    fn meta(&self, offset: usize) -> &AtomicU64 {
        debug_assert!(offset % 8 == 0 && offset + 8 <= self.data_offset);
        // SAFETY: 8-aligned, inside the mapping below the data area, only accessed atomically.
        unsafe { &*self.base.add(offset).cast::<AtomicU64>() }
    }

    #[inline]
    fn prefetch(&self, offset: usize) {
        debug_assert!(offset < self.capacity);
        // `wrapping_add` keeps this safe code; the offset is inside the mapping anyway.
        crate::hint::prefetch_read_ptr(self.data.wrapping_add(offset));
    }

    #[inline]
    fn prefetch_write(&self, offset: usize) {
        debug_assert!(offset < self.capacity);
        // `wrapping_add` keeps this safe code; the offset is inside the mapping anyway.
        crate::hint::prefetch_write_ptr(self.data.wrapping_add(offset));
    }

    #[inline]
    unsafe fn write(&self, offset: usize, src: &[u8]) {
        debug_assert!(offset + src.len() <= self.capacity);
        // SAFETY: in bounds (asserted by the ring), and the caller owns the range.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.data.add(offset), src.len()) }
    }

    #[inline]
    unsafe fn read<R>(&self, offset: usize, len: usize, f: impl FnOnce(&[u8]) -> R) -> R {
        debug_assert!(offset + len <= self.capacity);
        // SAFETY: in bounds, and nobody writes a committed, unreleased record.
        f(unsafe { std::slice::from_raw_parts(self.data.add(offset), len) })
    }

    #[inline]
    unsafe fn read_mut<R>(&self, offset: usize, len: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
        debug_assert!(offset + len <= self.capacity);
        // SAFETY: in bounds, and the consumer owns a read, unreleased record exclusively.
        f(unsafe { std::slice::from_raw_parts_mut(self.data.add(offset), len) })
    }

    #[inline]
    unsafe fn zero(&self, offset: usize, len: usize) {
        debug_assert!(offset + len <= self.capacity);
        // SAFETY: in bounds, and the consumer owns read, unreleased bytes.
        unsafe { std::ptr::write_bytes(self.data.add(offset), 0, len) }
    }
}

impl Mapped {
    /// The data area from `offset` for `len` bytes, for a producer to fill in place.
    ///
    /// # Safety
    ///
    /// The caller owns the range exclusively (an uncommitted claim) for the slice's lifetime.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn slice_mut(&self, offset: usize, len: usize) -> &mut [u8] {
        debug_assert!(offset + len <= self.capacity);
        // SAFETY: in bounds, and exclusively owned by the caller's claim.
        unsafe { std::slice::from_raw_parts_mut(self.data.add(offset), len) }
    }
}

/// Metadata words of a [`LoomMemory`]: 1 KiB, room for a broadcast log with nine reader slots.
#[cfg(loom)]
pub const LOOM_META_WORDS: usize = 128;

/// Heap memory whose every payload byte is a loom cell, so loom reports unsynchronised access.
#[cfg(loom)]
#[derive(Debug)]
pub struct LoomMemory {
    tail: AtomicU64,
    head: AtomicU64,
    head_cache: AtomicU64,
    /// One atomic per 8-byte word: the record headers.
    words: Vec<AtomicU64>,
    /// The metadata words of a file, by offset / 8.
    meta: Vec<AtomicU64>,
    /// Payload bytes. Header words are the atomics above, so a record's first 8 bytes are
    /// never touched through these cells.
    bytes: Vec<loom::cell::UnsafeCell<u8>>,
}

#[cfg(loom)]
impl LoomMemory {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            tail: AtomicU64::new(0),
            head: AtomicU64::new(0),
            head_cache: AtomicU64::new(0),
            words: (0..capacity / 8).map(|_| AtomicU64::new(0)).collect(),
            meta: (0..LOOM_META_WORDS).map(|_| AtomicU64::new(0)).collect(),
            bytes: (0..capacity).map(|_| loom::cell::UnsafeCell::new(0)).collect(),
        }
    }
}

// SAFETY: each accessor addresses fields of `self`; header words and payload bytes are kept
// apart, which the ring respects (it only writes payload after a record's 8-byte header).
#[cfg(loom)]
unsafe impl Memory for LoomMemory {
    fn capacity(&self) -> usize {
        self.bytes.len()
    }
    fn tail(&self) -> &AtomicU64 {
        &self.tail
    }
    fn head(&self) -> &AtomicU64 {
        &self.head
    }
    fn head_cache(&self) -> &AtomicU64 {
        &self.head_cache
    }
    fn word(&self, offset: usize) -> &AtomicU64 {
        &self.words[offset / 8]
    }
    fn meta(&self, offset: usize) -> &AtomicU64 {
        &self.meta[offset / 8]
    }
    unsafe fn write(&self, offset: usize, src: &[u8]) {
        for (i, &b) in src.iter().enumerate() {
            // SAFETY: loom checks that no other access to this cell races with this one.
            self.bytes[offset + i].with_mut(|p| unsafe { *p = b });
        }
    }
    unsafe fn read<R>(&self, offset: usize, len: usize, f: impl FnOnce(&[u8]) -> R) -> R {
        // SAFETY: loom checks that no write to these cells races with the reads.
        let copy: Vec<u8> = (offset..offset + len)
            .map(|i| self.bytes[i].with(|p| unsafe { *p }))
            .collect();
        f(&copy)
    }
    unsafe fn read_mut<R>(&self, offset: usize, len: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
        // SAFETY: loom checks these reads and the writes back against every other access.
        let mut copy: Vec<u8> = (offset..offset + len)
            .map(|i| self.bytes[i].with(|p| unsafe { *p }))
            .collect();
        let r = f(&mut copy);
        // SAFETY: as above.
        unsafe { self.write(offset, &copy) };
        r
    }
    unsafe fn zero(&self, offset: usize, len: usize) {
        use crate::primitive::Ordering;
        for w in (offset..offset + len).step_by(8) {
            self.words[w / 8].store(0, Ordering::Relaxed);
        }
        // SAFETY: loom checks these writes against every other access.
        unsafe { self.write(offset, &vec![0; len]) }
    }
}

/// Implements [`Memory`] for a pointer to a `Memory` by forwarding every call.
macro_rules! forward_memory {
    ($($(#[$attr:meta])* $ptr:ty;)*) => {$(
        $(#[$attr])*
        // SAFETY: forwards to `T`, which upholds the contract.
        unsafe impl<T: Memory> Memory for $ptr {
            fn capacity(&self) -> usize {
                (**self).capacity()
            }
            fn tail(&self) -> &AtomicU64 {
                (**self).tail()
            }
            fn head(&self) -> &AtomicU64 {
                (**self).head()
            }
            fn head_cache(&self) -> &AtomicU64 {
                (**self).head_cache()
            }
            fn word(&self, offset: usize) -> &AtomicU64 {
                (**self).word(offset)
            }
            fn meta(&self, offset: usize) -> &AtomicU64 {
                (**self).meta(offset)
            }
            fn prefetch(&self, offset: usize) {
                (**self).prefetch(offset)
            }
            fn prefetch_write(&self, offset: usize) {
                (**self).prefetch_write(offset)
            }
            unsafe fn write(&self, offset: usize, src: &[u8]) {
                // SAFETY: the caller upholds `write`'s contract.
                unsafe { (**self).write(offset, src) }
            }
            unsafe fn read<R>(&self, offset: usize, len: usize, f: impl FnOnce(&[u8]) -> R) -> R {
                // SAFETY: the caller upholds `read`'s contract.
                unsafe { (**self).read(offset, len, f) }
            }
            unsafe fn read_mut<R>(&self, offset: usize, len: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
                // SAFETY: the caller upholds `read_mut`'s contract.
                unsafe { (**self).read_mut(offset, len, f) }
            }
            unsafe fn zero(&self, offset: usize, len: usize) {
                // SAFETY: the caller upholds `zero`'s contract.
                unsafe { (**self).zero(offset, len) }
            }
        }
    )*};
}

forward_memory! {
    &T;
    #[cfg(loom)]
    std::sync::Arc<T>;
}
