//! Large buffers the data path walks through: the retransmit log and the receive buffers.
//!
//! They are asked to be backed by transparent huge pages (`MADV_HUGEPAGE`). A sender's log is
//! tens of MiB written in a circle, so with 4 KiB pages every fourth 1 KiB message starts a new
//! page and misses the TLB; in a virtual machine each such miss walks two page tables. Measured
//! on this project's 2-core VM (1 KiB messages, two subscribers, interleaved pairs): the
//! publishing worker spent 304-359 ns per message against 328-367 without the advice.

use std::ops::{Deref, DerefMut};

/// Zeroed bytes, from an anonymous mapping advised for huge pages when the system allows it
/// (THP in `madvise` or `always` mode), or from the heap when no mapping can be made.
pub struct HugeBuffer {
    bytes: Backing,
}

enum Backing {
    Mapped(memmap2::MmapMut),
    Heap(Box<[u8]>),
}

impl HugeBuffer {
    /// `len` zeroed bytes. Memory is committed as it is first touched, a huge page at a time
    /// where huge pages are granted.
    pub fn zeroed(len: usize) -> Self {
        // Miri (which checks the unsafe code of the retransmit buffer) cannot call mmap.
        let mapped = if len == 0 || cfg!(miri) {
            None
        } else {
            memmap2::MmapMut::map_anon(len).ok()
        };
        let bytes = match mapped {
            Some(m) => {
                // Only a hint: without THP the mapping keeps small pages.
                #[cfg(target_os = "linux")]
                let _ = m.advise(memmap2::Advice::HugePage);
                Backing::Mapped(m)
            }
            None => Backing::Heap(vec![0u8; len].into_boxed_slice()),
        };
        Self { bytes }
    }

    /// Whether the bytes are a mapping (which the advice applies to) rather than heap memory.
    pub fn is_mapped(&self) -> bool {
        matches!(self.bytes, Backing::Mapped(_))
    }
}

impl Deref for HugeBuffer {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match &self.bytes {
            Backing::Mapped(m) => m,
            Backing::Heap(h) => h,
        }
    }
}

impl DerefMut for HugeBuffer {
    fn deref_mut(&mut self) -> &mut [u8] {
        match &mut self.bytes {
            Backing::Mapped(m) => m,
            Backing::Heap(h) => h,
        }
    }
}

impl std::fmt::Debug for HugeBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HugeBuffer")
            .field("len", &self.len())
            .field("mapped", &self.is_mapped())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_is_zeroed_writable_and_as_long_as_asked() {
        for len in [0usize, 1, 4096, 3 << 20] {
            let mut b = HugeBuffer::zeroed(len);
            assert_eq!(b.len(), len);
            assert!(b.iter().all(|&x| x == 0), "{len}");
            if let Some(last) = b.last_mut() {
                *last = 7;
            }
            assert_eq!(
                b.iter().map(|&x| usize::from(x)).sum::<usize>(),
                if len > 0 { 7 } else { 0 }
            );
        }
        assert!(HugeBuffer::zeroed(4096).is_mapped());
        assert!(!HugeBuffer::zeroed(0).is_mapped());
    }
}
