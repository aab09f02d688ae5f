//! intergroup-secure: identities, group policy, MLS group state and data-plane protection.
//!
//! Pure functions and state, no sockets. This first part is the anti-replay window that the
//! AEAD data plane checks each opened packet against.
#![deny(missing_docs)]
#![deny(unsafe_code)]

pub mod replay;

pub use replay::ReplayWindow;

/// Errors of the secure crate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The packet number was already accepted.
    #[error("replayed packet")]
    Replayed,
    /// The packet number is older than the replay window reaches.
    #[error("packet older than the replay window")]
    TooOld,
}
