//! intergroup-secure: identities, group policy, MLS group state and data-plane protection.
//!
//! Pure functions and state, no sockets. So far: Ed25519 identities and key files
//! ([`identity`]), signed group policies ([`policy`]), the data-plane AEAD ([`aead`]) and the
//! anti-replay window ([`replay`]) each opened packet is checked against.
#![deny(missing_docs)]
#![deny(unsafe_code)]

pub mod aead;
pub mod identity;
pub mod mls;
pub mod policy;
pub mod replay;

pub use aead::{EpochSecret, SenderKey};
pub use identity::{Identity, KeyError, PublicKey};
pub use policy::{Policy, PolicyError, Role};
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
    /// A packet did not authenticate; deliberately says nothing about why.
    #[error("decryption failed")]
    BadTag,
    /// A seal would reuse a packet number (and so a nonce) under this key.
    #[error("packet number already used with this key")]
    PacketNumberReused,
    /// The key reached its seal limit: rekey.
    #[error("key exhausted: rekey before sealing more")]
    KeyExhausted,
}
