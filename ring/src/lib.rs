//! intergroup-ring: shared-memory files for the rings between clients and the engine.
//!
//! This part is the shared-file format: every ring file starts with a [`FileHeader`] that is
//! checked before anything in the file is trusted. No networking, no protocol.
#![deny(missing_docs)]
#![deny(unsafe_code)]

pub mod file;

pub use file::{FileHeader, RingKind, SharedFile};

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
    /// The header's sizes contradict each other or the file's real length.
    #[error("{path}: {what}")]
    BadLayout {
        /// The file.
        path: String,
        /// What does not fit.
        what: String,
    },
}
