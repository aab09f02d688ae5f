//! Cache hints shared by the rings and the engine's logs.

/// Bytes of a cache line on the machines the hints are written for (x86-64).
pub const CACHE_LINE: usize = 64;

/// Asks for the cache line holding `p` in a state that a store can hit (PREFETCHW): a writer
/// that asks a few KiB ahead of where it writes stops waiting for lines another core held or
/// that were evicted. Only a hint: never faults, whatever `p` is, and changes no memory.
#[inline]
pub fn prefetch_write_ptr(p: *const u8) {
    // (Miri cannot run inline assembly; a hint changes nothing it checks.)
    #[cfg(all(target_arch = "x86_64", not(miri)))]
    // SAFETY: PREFETCHW does not access memory architecturally: it cannot fault (not even on an
    // unmapped address) and changes no memory and no flags. (`_mm_prefetch` with
    // `_MM_HINT_ET0` compiles to a read prefetch unless the build targets PRFCHW, so the
    // instruction is written out; CPUs without it treat it as a NOP.)
    unsafe {
        std::arch::asm!("prefetchw [{0}]", in(reg) p, options(nostack, preserves_flags, readonly))
    }
    #[cfg(any(not(target_arch = "x86_64"), miri))]
    let _ = p;
}

/// Asks for the cache line holding `p` for reading (PREFETCHT0): a reader that knows which
/// line it needs next stops waiting for it. Only a hint: never faults, whatever `p` is, and
/// changes no memory.
#[inline]
pub fn prefetch_read_ptr(p: *const u8) {
    #[cfg(all(target_arch = "x86_64", not(miri)))]
    // SAFETY: PREFETCHT0 does not access memory architecturally: it cannot fault (not even on
    // an unmapped address) and changes no memory and no flags.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast::<i8>())
    }
    #[cfg(any(not(target_arch = "x86_64"), miri))]
    let _ = p;
}

/// [`prefetch_write_ptr`] for every cache line of `bytes`.
#[inline]
pub fn prefetch_write(bytes: &[u8]) {
    for offset in (0..bytes.len()).step_by(CACHE_LINE) {
        prefetch_write_ptr(bytes[offset..].as_ptr());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hints_change_nothing() {
        let buf: Vec<u8> = (0..=255).cycle().take(4096).collect();
        prefetch_write(&buf);
        prefetch_write(&buf[4000..]);
        prefetch_write(&[]);
        prefetch_read_ptr(buf.as_ptr());
        prefetch_read_ptr(std::ptr::null());
        assert!(buf.iter().enumerate().all(|(i, &b)| b == (i % 256) as u8));
    }
}
