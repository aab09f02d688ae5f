//! The atomics the rings use: std's, or loom's under `cfg(loom)` so loom checks the real code.

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{fence, AtomicU64, Ordering};
#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{fence, AtomicU64, Ordering};

/// One step of a spin-wait: a pause instruction, or under loom a yield so the model lets the
/// thread being waited for run.
#[inline]
pub(crate) fn spin_loop() {
    #[cfg(loom)]
    loom::thread::yield_now();
    #[cfg(not(loom))]
    std::hint::spin_loop();
}
