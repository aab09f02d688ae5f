//! intergroup-engine: the wire format, the sans-IO protocol core and the deterministic simulator.
//!
//! The protocol is pure state ([`proto::Member`]); drivers feed it datagrams and time and carry
//! out what it asks. `docs/protocol.md` describes the frames and the recovery rules.
//! [`transport`] puts a member on real UDP sockets; [`runtime`] runs members on worker threads
//! with io_uring or the portable backend ([`runtime::Engine`]).
#![deny(missing_docs)]

pub mod group;
pub mod ipc;
pub(crate) mod mem;
pub mod proto;
pub mod runtime;
pub mod shield;
pub mod sim;
pub mod transport;
pub mod wire;

pub use proto::{Counter, Counters, Delivery, Destination, Event, Member, MemberConfig, Output, Transmit};

/// Errors of the engine crate.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// A configuration value is out of range; the message names it.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A message is longer than `max_message_bytes`.
    #[error("message of {len} bytes exceeds the maximum of {max}")]
    MessageTooLarge {
        /// Length of the rejected message.
        len: usize,
        /// The configured maximum.
        max: usize,
    },
    /// The send queue is full; publish again after transmits drained it.
    #[error("back-pressured: the send queue is full")]
    BackPressured,
}
