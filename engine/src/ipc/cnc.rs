//! The control-and-counters file (`cnc`) of an engine directory: who the engine is, its
//! heartbeat, its counters, and one heartbeat slot per connected client.
//!
//! ```text
//!     0  magic "IGCNC\0\0\0"       8  layout version: u32, reserved: u32
//!    16  engine pid               24  engine start (Unix ms)
//!    32  engine heartbeat (Unix ms, updated every heartbeat interval)
//!    40  client timeout (ms)      48  state (1 running, 2 closed)
//!  1024  counters: 128 x 64 B = | value: u64 | label: 56 B, UTF-8, NUL-padded |
//!  9216  client slots: 256 x 64 B = | state | client id | pid | heartbeat (Unix ms) |
//!                                   | messages published | messages received | 16 B spare |
//! ```
//!
//! Every field is a little-endian u64 read and written atomically. The file's contents are
//! untrusted: reading garbage gives wrong numbers or a typed error, never a crash.

use super::IpcError;
use memmap2::MmapMut;
use std::fs::OpenOptions;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// First eight bytes of a cnc file.
pub const MAGIC: [u8; 8] = *b"IGCNC\0\0\0";
/// Layout version this build reads and writes.
pub const VERSION: u64 = 1;
/// Counters the file holds.
pub const MAX_COUNTERS: usize = 128;
/// Client slots the file holds: the most clients one engine serves at once.
pub const MAX_CLIENTS: usize = 256;
const LABEL_LEN: usize = 56;
const PID: usize = 16;
const START: usize = 24;
const HEARTBEAT: usize = 32;
const TIMEOUT: usize = 40;
const STATE: usize = 48;
const COUNTERS: usize = 1024;
const SLOTS: usize = COUNTERS + MAX_COUNTERS * 64;
/// Length of a cnc file.
pub const FILE_LEN: usize = SLOTS + MAX_CLIENTS * 64;

/// Engine state: running.
pub const RUNNING: u64 = 1;
/// Engine state: closed cleanly.
pub const CLOSED: u64 = 2;

/// Client slot state: free.
pub const SLOT_FREE: u64 = 0;
/// Client slot state: taken by a live client.
pub const SLOT_ACTIVE: u64 = 1;
/// Client slot state: the client closed; the engine reclaims what it held and frees the slot.
pub const SLOT_CLOSING: u64 = 2;
/// Client slot state: being taken (the client writes its id, then makes it active).
pub const SLOT_CLAIMING: u64 = 3;

/// Fields of a client slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotField {
    /// One of the `SLOT_*` states.
    State = 0,
    /// The client's id.
    Client = 1,
    /// The client's process id.
    Pid = 2,
    /// The client's last heartbeat, Unix ms.
    Heartbeat = 3,
    /// Messages its publications took.
    Published = 4,
    /// Messages its subscriptions handed to the application.
    Received = 5,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A mapped cnc file.
#[derive(Debug)]
pub struct Cnc {
    map: MmapMut,
}

impl Cnc {
    /// Creates the file at `path` for the engine with `pid`, running, with `client_timeout_ms`.
    pub fn create(path: &Path, pid: u32, client_timeout_ms: u64) -> Result<Self, IpcError> {
        let io = |e: std::io::Error| IpcError::Io(format!("{}: {e}", path.display()));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(io)?;
        file.set_len(FILE_LEN as u64).map_err(io)?;
        // SAFETY: a shared mapping of a file this engine just sized; other processes change it
        // only through the atomics below, and nothing here keeps references into it across
        // such changes except as atomics.
        let mut map = unsafe { MmapMut::map_mut(&file) }.map_err(io)?;
        map[..8].copy_from_slice(&MAGIC);
        let cnc = Self { map };
        cnc.word(8).store(VERSION, Ordering::Relaxed);
        cnc.word(PID).store(u64::from(pid), Ordering::Relaxed);
        cnc.word(START).store(now_ms(), Ordering::Relaxed);
        cnc.word(TIMEOUT).store(client_timeout_ms, Ordering::Relaxed);
        cnc.word(HEARTBEAT).store(now_ms(), Ordering::Relaxed);
        cnc.word(STATE).store(RUNNING, Ordering::Release);
        Ok(cnc)
    }

    /// Maps an existing cnc file and checks its magic, version and length.
    pub fn open(path: &Path) -> Result<Self, IpcError> {
        let name = path.display().to_string();
        let io = |e: std::io::Error| IpcError::Io(format!("{name}: {e}"));
        let file = OpenOptions::new().read(true).write(true).open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        if len != FILE_LEN as u64 {
            return Err(IpcError::Corrupt(format!(
                "{name}: {len} bytes, a control file has {FILE_LEN}"
            )));
        }
        // SAFETY: as in `create`; the length was checked, and the mapping's contents are only
        // read through atomics and copied-out labels.
        let map = unsafe { MmapMut::map_mut(&file) }.map_err(io)?;
        if map[..8] != MAGIC {
            return Err(IpcError::Corrupt(format!(
                "{name}: not an intergroup control file (bad magic)"
            )));
        }
        let cnc = Self { map };
        let version = cnc.word(8).load(Ordering::Relaxed) & 0xffff_ffff;
        if version != VERSION {
            return Err(IpcError::Corrupt(format!(
                "{name}: layout version {version}, this build reads {VERSION}"
            )));
        }
        Ok(cnc)
    }

    /// The atomic word at byte `offset` (a multiple of 8 inside the file).
    fn word(&self, offset: usize) -> &AtomicU64 {
        assert!(offset % 8 == 0 && offset + 8 <= FILE_LEN);
        // SAFETY: the mapping is FILE_LEN bytes (checked at open), page-aligned, so `offset`
        // names an aligned, in-bounds u64 that lives as long as `self`; every process touches
        // these words only atomically.
        unsafe { &*(self.map.as_ptr().add(offset) as *const AtomicU64) }
    }

    /// The engine's process id.
    pub fn pid(&self) -> u32 {
        self.word(PID).load(Ordering::Relaxed) as u32
    }

    /// When the engine started, Unix ms.
    pub fn start_ms(&self) -> u64 {
        self.word(START).load(Ordering::Relaxed)
    }

    /// The engine's last heartbeat, Unix ms.
    pub fn heartbeat_ms(&self) -> u64 {
        self.word(HEARTBEAT).load(Ordering::Acquire)
    }

    /// Records a heartbeat now.
    pub fn beat(&self) {
        self.word(HEARTBEAT).store(now_ms(), Ordering::Release);
    }

    /// How long a silent client (or engine) is given before it counts as dead, ms.
    pub fn client_timeout_ms(&self) -> u64 {
        self.word(TIMEOUT).load(Ordering::Relaxed).clamp(100, 3_600_000)
    }

    /// `RUNNING` or `CLOSED` (anything else is corrupt and treated as closed by readers).
    pub fn state(&self) -> u64 {
        self.word(STATE).load(Ordering::Acquire)
    }

    /// Marks the engine closed.
    pub fn set_closed(&self) {
        self.word(STATE).store(CLOSED, Ordering::Release);
    }

    /// Whether the engine is alive: running, its heartbeat fresh and its process present.
    pub fn engine_alive(&self) -> bool {
        let age = now_ms().saturating_sub(self.heartbeat_ms());
        self.state() == RUNNING && age <= self.client_timeout_ms() && process_exists(self.pid())
    }

    /// Names counter `i` (engine only, at start).
    pub fn set_label(&mut self, i: usize, label: &str) {
        let at = COUNTERS + i * 64 + 8;
        let bytes = label.as_bytes();
        let n = bytes.len().min(LABEL_LEN);
        self.map[at..at + LABEL_LEN].fill(0);
        self.map[at..at + n].copy_from_slice(&bytes[..n]);
    }

    /// Sets counter `i`.
    pub fn set_counter(&self, i: usize, value: u64) {
        self.word(COUNTERS + i * 64).store(value, Ordering::Relaxed);
    }

    /// Every labelled counter, in order.
    pub fn counters(&self) -> Vec<(String, u64)> {
        (0..MAX_COUNTERS)
            .filter_map(|i| {
                let at = COUNTERS + i * 64 + 8;
                let raw = &self.map[at..at + LABEL_LEN];
                let end = raw.iter().position(|&b| b == 0).unwrap_or(LABEL_LEN);
                (end > 0).then(|| {
                    let label = String::from_utf8_lossy(&raw[..end]).into_owned();
                    (label, self.word(COUNTERS + i * 64).load(Ordering::Relaxed))
                })
            })
            .collect()
    }

    /// Field `f` of client slot `slot`.
    pub fn slot(&self, slot: usize, f: SlotField) -> &AtomicU64 {
        assert!(slot < MAX_CLIENTS);
        self.word(SLOTS + slot * 64 + f as usize * 8)
    }

    /// Takes a free client slot for `client` (this process); `None` when all are taken.
    pub fn claim_slot(&self, client: u64) -> Option<usize> {
        (0..MAX_CLIENTS).find(|&s| {
            let state = self.slot(s, SlotField::State);
            if state
                .compare_exchange(SLOT_FREE, SLOT_CLAIMING, Ordering::AcqRel, Ordering::Relaxed)
                .is_err()
            {
                return false;
            }
            self.slot(s, SlotField::Client).store(client, Ordering::Relaxed);
            self.slot(s, SlotField::Pid)
                .store(u64::from(std::process::id()), Ordering::Relaxed);
            self.slot(s, SlotField::Heartbeat)
                .store(now_ms(), Ordering::Relaxed);
            self.slot(s, SlotField::Published).store(0, Ordering::Relaxed);
            self.slot(s, SlotField::Received).store(0, Ordering::Relaxed);
            state.store(SLOT_ACTIVE, Ordering::Release);
            true
        })
    }
}

/// Whether a process with `pid` exists (a zombie counts; a pid of 0 does not).
pub fn process_exists(pid: u32) -> bool {
    if pid == 0 || pid > i32::MAX as u32 {
        return false;
    }
    // SAFETY: kill with signal 0 only checks that the process exists and may be signalled.
    let r = unsafe { libc::kill(pid as i32, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_created_file_opens_and_shows_what_was_written() {
        let dir = std::env::temp_dir().join(format!("ig-cnc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("cnc");
        let mut cnc = Cnc::create(&path, std::process::id(), 1500).unwrap();
        cnc.set_label(0, "messages");
        cnc.set_counter(0, 42);
        let other = Cnc::open(&path).unwrap();
        assert_eq!(other.counters(), vec![("messages".to_string(), 42)]);
        assert_eq!(other.client_timeout_ms(), 1500);
        assert!(other.engine_alive());
        let slot = other.claim_slot(7).unwrap();
        assert_eq!(cnc.slot(slot, SlotField::Client).load(Ordering::Relaxed), 7);
        assert_eq!(
            cnc.slot(slot, SlotField::State).load(Ordering::Relaxed),
            SLOT_ACTIVE
        );
        cnc.set_closed();
        assert!(!other.engine_alive());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn garbage_is_a_typed_error() {
        let dir = std::env::temp_dir().join(format!("ig-cnc-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("cnc");
        std::fs::write(&path, vec![0xAB; FILE_LEN]).unwrap();
        assert!(matches!(Cnc::open(&path), Err(IpcError::Corrupt(_))));
        std::fs::write(&path, b"short").unwrap();
        assert!(matches!(Cnc::open(&path), Err(IpcError::Corrupt(_))));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
