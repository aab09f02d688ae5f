//! The shared-memory binding between applications and a running engine (the engine daemon,
//! [`Driver`]), the way Aeron clients bind to a media driver: no socket between them, and no
//! copy on the local path.
//!
//! An engine owns a directory (default `/dev/shm/intergroup-<uid>`, see [`default_dir`]):
//!
//! | file | what | ring |
//! |---|---|---|
//! | `lock` | held (flock) by the running engine: a second engine refuses the directory | |
//! | `cnc` | engine pid and heartbeat, counters, one heartbeat slot per client ([`cnc`]) | |
//! | `commands` | clients -> engine requests ([`protocol::Command`]) | many-producer record ring |
//! | `responses` | engine -> clients replies and image events ([`protocol::Response`]) | lossy broadcast log |
//! | `pub-<id>` | one per publication: the client writes, local subscribers and the engine read | reliable broadcast log |
//! | `sub-<group>-<stream>` | remote deliveries of a group's stream, written by the engine | lossy broadcast log |
//!
//! A publication's log is read in place by every local subscription of its group and stream
//! (an *image*, in Aeron's words) and by the engine only while the group has remote receivers:
//! local publish to local subscribe is one write and in-place reads, with no network hop.
//!
//! ```
//! use intergroup_engine::ipc::{Client, Delivery, Driver, DriverConfig, Order};
//!
//! // An engine daemon; usually `intergroup engine` runs it, on `ipc::default_dir()`.
//! let dir = std::env::temp_dir().join(format!("ig-doc-{}", std::process::id()));
//! let mut cfg = DriverConfig::default();
//! cfg.network.port = 47_011;
//! let engine = Driver::start(&dir, cfg).unwrap();
//!
//! let client = Client::connect(&dir).unwrap();
//! let mut subscription = client.subscription("demo", 1, Order::Fifo).unwrap();
//! let mut publication = client.publication("demo", 1).unwrap();
//! // Offers are refused (NotConnected) until some subscriber or remote member listens: the
//! // client's own thread joins the subscription to the publication within a millisecond.
//! while publication.offer(b"hello").is_err() {
//!     std::thread::sleep(std::time::Duration::from_millis(1));
//! }
//! let mut got = None;
//! while got.is_none() {
//!     subscription
//!         .poll(16, |d| {
//!             if let Delivery::Message(m) = d {
//!                 got = Some(m.payload.to_vec());
//!             }
//!         })
//!         .unwrap();
//! }
//! assert_eq!(got.unwrap(), b"hello");
//! # drop((publication, subscription, client));
//! engine.close();
//! # std::fs::remove_dir_all(&dir).unwrap();
//! ```

mod client;
pub mod cnc;
mod driver;
pub mod protocol;

pub use client::{
    Claim, Client, ClientOptions, Delivery, Message, OfferError, Publication, Subscription, SubscriptionEvent,
};
pub use driver::{Driver, DriverConfig, GroupEntry, NetworkConfig, COUNTER_NAMES, DEFAULT_CONFIG_TOML};

use std::path::PathBuf;

/// File names inside an engine directory.
pub mod files {
    /// The lock a running engine holds.
    pub const LOCK: &str = "lock";
    /// Control and counters.
    pub const CNC: &str = "cnc";
    /// Client -> engine commands.
    pub const COMMANDS: &str = "commands";
    /// Engine -> client responses.
    pub const RESPONSES: &str = "responses";
}

/// How a subscription wants its group's messages ordered: `Fifo` always; `Total` and `Safe`
/// in groups configured with `membership = true`.
pub use crate::group::Order;

/// Error codes in an engine's error responses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum ErrorCode {
    /// The request was malformed or named a bad group or stream.
    Invalid = 1,
    /// The engine could not make the files or join the group.
    Failed = 2,
    /// The ordering asked for is not offered by this engine.
    Unsupported = 3,
    /// No such publication or subscription.
    Unknown = 4,
}

/// Errors of the client binding and of the engine daemon.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IpcError {
    /// No engine runs on the directory (no control file, or it is closed).
    #[error("no engine is running on {0} (start one with `intergroup engine --dir {0}`)")]
    NoEngine(String),
    /// The engine stopped: its heartbeat is older than the timeout or its process is gone.
    #[error("the engine died (no heartbeat within the timeout)")]
    EngineDead,
    /// Another engine runs on the directory.
    #[error("another engine (pid {pid}) is running on {dir}")]
    DirectoryInUse {
        /// The directory.
        dir: String,
        /// The running engine's process id.
        pid: u32,
    },
    /// A file in the engine directory is not what it should be.
    #[error("corrupt engine file: {0}")]
    Corrupt(String),
    /// The engine refused a request.
    #[error("the engine refused: {message}")]
    Refused {
        /// One of [`ErrorCode`] as a number.
        code: u32,
        /// Its reason.
        message: String,
    },
    /// The engine did not answer within the timeout while its heartbeat kept going.
    #[error("the engine did not answer within {0} ms")]
    Timeout(u64),
    /// Every client slot of the engine is taken.
    #[error("the engine serves its maximum number of clients")]
    TooManyClients,
    /// This client (or the object) was closed.
    #[error("closed")]
    Closed,
    /// A bad setting.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// An operating-system error, with what was being done.
    #[error("{0}")]
    Io(String),
}

/// The default engine directory: `/dev/shm/intergroup-<uid>` (or the temp dir where there is
/// no /dev/shm).
pub fn default_dir() -> PathBuf {
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    let base = PathBuf::from("/dev/shm");
    let base = if base.is_dir() { base } else { std::env::temp_dir() };
    base.join(format!("intergroup-{uid}"))
}

/// Checks a group name: 1 to 64 bytes of letters, digits, `.`, `_` and `-`.
pub fn check_group_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= protocol::MAX_GROUP_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "group name {name:?} must be 1 to {} letters, digits, '.', '_' or '-'",
            protocol::MAX_GROUP_NAME
        ))
    }
}

/// The numeric id of a named group (FNV-1a of the name, never 0): what its frames carry.
pub fn group_id(name: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in name.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h.max(1)
}
