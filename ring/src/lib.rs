//! intergroup-ring: shared-memory files for the rings between clients and the engine.
//!
//! Every ring file starts with a [`FileHeader`] that is checked before anything in the file is
//! trusted. [`records`] is the many-to-one record ring, [`broadcast`] the one-to-many log.
//! A single-producer record ring whose producer and consumer are threads of one process can
//! live in that process's own memory instead ([`records::anonymous_single`]), with the same
//! header and layout. No networking, no protocol.
#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(clippy::undocumented_unsafe_blocks)]

pub mod baseline;
pub mod broadcast;
pub mod file;
pub mod hint;
mod memory;
mod primitive;
pub mod records;
#[cfg(test)]
mod test_dir;

pub use broadcast::{BroadcastClaim, BroadcastProducer, BroadcastReader, Mode, ReadError};
pub use file::{FileHeader, RingKind, SharedFile};
pub use records::{
    OfferError, Producers, RecordClaim, RecordConsumer, RecordProducer, SingleClaim, SingleProducer,
};

#[cfg(loom)]
#[doc(hidden)]
pub mod loom_support {
    //! The ring algorithm over loom-tracked memory, for `tests/loom.rs`.
    pub use crate::memory::LoomMemory;
    pub use crate::records::ConsumerStats;
    use std::sync::Arc;

    /// A record ring over [`LoomMemory`]: the same producer and consumer code as the real one.
    pub fn ring(capacity: usize) -> std::sync::Arc<LoomMemory> {
        std::sync::Arc::new(LoomMemory::new(capacity))
    }

    /// Offers one record through the real producer code.
    pub fn offer(mem: &LoomMemory, type_id: u32, payload: &[u8]) -> Result<(), crate::OfferError> {
        crate::records::Producer { mem }.offer(type_id, payload)
    }

    /// Reads through the real consumer code; a fresh consumer each call (its state is only
    /// the stall tracker, unused under loom).
    pub fn read(mem: &LoomMemory, limit: usize, f: impl FnMut(u32, &[u8])) -> usize {
        crate::records::Consumer::new(mem, std::time::Duration::from_secs(3600)).read(limit, f)
    }

    /// Offers one record through the real single-producer code.
    pub fn offer_single(mem: &LoomMemory, type_id: u32, payload: &[u8]) -> Result<(), crate::OfferError> {
        crate::records::Producer { mem }.offer_single(type_id, payload)
    }

    /// A reliable broadcast log over loom memory with `slots` reader slots, and its producer.
    pub fn broadcast_producer(mem: &Arc<LoomMemory>, capacity: usize, slots: usize) -> BroadcastProducerCore {
        let log = crate::broadcast::Log {
            mem: mem.clone(),
            capacity,
            slots,
        };
        log.set_mode(crate::Mode::Reliable);
        BroadcastProducerCore(crate::broadcast::ProducerCore::new(
            log,
            std::time::Duration::from_secs(3600),
        ))
    }

    /// A reader joined to the log in `mem` at its tail (the real join code).
    pub fn broadcast_reader(mem: &Arc<LoomMemory>, capacity: usize, slots: usize) -> BroadcastReaderCore {
        let log = crate::broadcast::Log {
            mem: mem.clone(),
            capacity,
            slots,
        };
        BroadcastReaderCore(crate::broadcast::ReaderCore::new(log).expect("a free slot"))
    }

    /// The real broadcast producer over loom memory.
    #[derive(Debug)]
    pub struct BroadcastProducerCore(crate::broadcast::ProducerCore<Arc<LoomMemory>>);

    impl BroadcastProducerCore {
        /// Offers one record.
        pub fn offer(&mut self, type_id: u32, payload: &[u8]) -> Result<(), crate::OfferError> {
            self.0.offer(type_id, payload)
        }
    }

    /// The real broadcast reader over loom memory.
    #[derive(Debug)]
    pub struct BroadcastReaderCore(crate::broadcast::ReaderCore<Arc<LoomMemory>>);

    impl BroadcastReaderCore {
        /// Polls up to `limit` records.
        pub fn poll(&mut self, limit: usize, f: impl FnMut(u32, &[u8])) -> Result<usize, crate::ReadError> {
            self.0.poll(limit, f)
        }
    }

    /// A single producer held to a window of the consumer's read position (the real window
    /// and single-producer code).
    #[derive(Debug)]
    pub struct WindowedProducer {
        mem: Arc<LoomMemory>,
        window: crate::records::Window,
    }

    impl WindowedProducer {
        /// A producer of the single-producer ring in `mem`, `bytes` ahead of its reads at most.
        pub fn new(mem: &Arc<LoomMemory>, bytes: u64) -> Self {
            Self {
                mem: mem.clone(),
                window: crate::records::Window::new(bytes),
            }
        }

        /// Offers one record, refused while the unread records fill the window.
        pub fn offer(&mut self, type_id: u32, payload: &[u8]) -> Result<(), crate::OfferError> {
            self.window.admit(&*self.mem)?;
            crate::records::Producer { mem: &*self.mem }.offer_single(type_id, payload)
        }
    }

    /// Reads through the real single-producer consumer code.
    pub fn read_single(mem: &LoomMemory, limit: usize, f: impl FnMut(u32, &[u8])) -> usize {
        crate::records::Consumer::new(mem, std::time::Duration::from_secs(3600)).read_single(limit, f)
    }

    /// A single-producer consumer that keeps its read position between calls, so it can hold
    /// records (the real consumer code).
    #[derive(Debug)]
    pub struct HeldConsumer(crate::records::Consumer<Arc<LoomMemory>>);

    impl HeldConsumer {
        /// A consumer of the single-producer ring in `mem`.
        pub fn new(mem: &Arc<LoomMemory>) -> Self {
            Self(crate::records::Consumer::new(
                mem.clone(),
                std::time::Duration::from_secs(3600),
            ))
        }

        /// Reads and holds up to `limit` records.
        pub fn read_held(&mut self, limit: usize, f: impl FnMut(u64, u32, &mut [u8])) -> usize {
            self.0.read_single_held(limit, f)
        }

        /// Releases the held records below `to`.
        pub fn release(&mut self, to: u64) {
            self.0.release_single(to)
        }
    }
}

/// Errors of the ring crate; messages name what is wrong with the file.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file could not be created, opened, sized or mapped.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The file does not start with the ring magic: not a ring file.
    #[error("{path}: not an intergroup ring file (bad magic)")]
    BadMagic {
        /// The file.
        path: String,
    },
    /// The file's layout version is not one this build reads.
    #[error("{path}: layout version {found}, this build reads version {expected}")]
    UnsupportedVersion {
        /// The file.
        path: String,
        /// Version in the file.
        found: u32,
        /// Version this build reads.
        expected: u32,
    },
    /// The file holds another kind of ring than the caller asked for.
    #[error("{path}: holds ring kind {found}, expected {expected}")]
    WrongKind {
        /// The file.
        path: String,
        /// Kind code in the file.
        found: u32,
        /// Kind code asked for.
        expected: u32,
    },
    /// A single-producer ring already has a live producer.
    #[error("{path}: already has a producer (process {pid})")]
    InUse {
        /// The file.
        path: String,
        /// The producer's process id.
        pid: u32,
    },
    /// The header's sizes contradict each other or the file's real length.
    #[error("{path}: {what}")]
    BadLayout {
        /// The file.
        path: String,
        /// What does not fit.
        what: String,
    },
}
