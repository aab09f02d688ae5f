//! The engine daemon's side of the binding: the directory, its lock and files, and the
//! conductor thread that serves client requests, heartbeats, reclaims dead clients and
//! publishes counters.

use super::cnc::{self, Cnc, SlotField};
use super::protocol::{Command, Response};
use super::{check_group_name, files, group_id, ErrorCode, IpcError, Order};
use crate::proto::{Counters, MemberConfig};
use crate::runtime::{Engine, EngineConfig, GroupConfig};
use crate::transport::UdpConfig;
use intergroup_ring::{BroadcastProducer, Mode, RecordConsumer};
use std::collections::HashMap;
use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Settings of the engine daemon (`intergroup engine --config FILE`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DriverConfig {
    /// A client (or the engine) silent for this long counts as dead, in milliseconds.
    pub client_timeout_ms: u64,
    /// How often the engine heartbeats and looks at its clients, in milliseconds.
    pub heartbeat_interval_ms: u64,
    /// Bytes of each publication's log (a power of two); a message may be up to a quarter.
    pub publication_log_bytes: u64,
    /// Bytes of each group stream's log of remote deliveries (a power of two). A subscriber
    /// that falls this far behind the network is lapped and told how much it missed.
    pub subscription_log_bytes: u64,
    /// Local subscriptions that may read one publication at once.
    pub max_subscribers: usize,
    /// This engine's member id in its groups; 0 picks a random one at start.
    pub member_id: u32,
    /// Log level: error, warn, info, debug or trace (the `RUST_LOG` variable overrides it).
    pub log_level: String,
    /// The runtime (workers, backend, offloads).
    pub runtime: EngineConfig,
    /// Sockets of groups the config does not list.
    pub network: NetworkConfig,
    /// Groups with their own addresses.
    #[serde(rename = "group")]
    pub groups: Vec<GroupEntry>,
}

/// Where groups talk UDP.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetworkConfig {
    /// Interface for multicast and unicast. The default never leaves the host.
    pub interface: Ipv4Addr,
    /// Multicast TTL (0: this host only).
    pub ttl: u32,
    /// Port of groups without an address of their own; their multicast address is
    /// 239.255.x.y from the group id.
    pub port: u16,
    /// Send and receive buffer of each socket, bytes.
    pub socket_buffer_bytes: usize,
}

/// A group with settings of its own.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupEntry {
    /// The group's name, as clients give it.
    pub name: String,
    /// Multicast address and port.
    pub address: Option<SocketAddrV4>,
    /// Unicast peers instead of multicast (for networks without it).
    #[serde(default)]
    pub peers: Vec<SocketAddr>,
    /// Fixed port of this engine's unicast socket (peers need one); 0 picks any.
    #[serde(default)]
    pub unicast_port: u16,
    /// This engine sends past its first window only while at least this many remote engines
    /// receive the group (Aeron's minimum group size); 0 counts whoever reported. Set it to
    /// the number of engines that must miss nothing, started late or not.
    #[serde(default)]
    pub min_receivers: u32,
    /// Run the group with membership (views, virtual synchrony) so that subscriptions may ask
    /// for total or safe order. Every engine of the group must agree.
    #[serde(default)]
    pub membership: bool,
    /// With membership: the first view is primary only with at least this many engines (a
    /// majority of those you expect, so a partition at start-up cannot make two primaries).
    #[serde(default = "one")]
    pub initial_members: usize,
    /// With membership: an engine not heard from for this long is suspected and removed by the
    /// next view (heartbeats go out at a tenth of it; a view change gives up after twice it).
    #[serde(default = "second")]
    pub fail_timeout_ms: u64,
    /// Secure the group: the signed policy (TOML) that lists its members and their roles. With
    /// it, `identity` is required, and `epoch_secret` unless the group has `membership` (then
    /// MLS keys it: each view change is one MLS commit, a view is installed only with its
    /// epoch's keys); every datagram is sealed, only listed members are heard, and each only
    /// in its roles. The engine refuses to start when the policy's signature, signer or
    /// validity does not check out.
    #[serde(default)]
    pub policy: Option<PathBuf>,
    /// This engine's private key file (mode 0600); its key must be in the policy, and its
    /// member id in the group is the key's ([`intergroup_secure::PublicKey::member_id`]).
    #[serde(default)]
    pub identity: Option<PathBuf>,
    /// A pre-shared epoch secret every member holds (mode 0600, `intergroup keys secret`),
    /// for groups without membership (or to skip MLS): it keys the data plane instead of MLS.
    #[serde(default)]
    pub epoch_secret: Option<PathBuf>,
    /// The epoch number that secret belongs to; every engine of the group must agree.
    #[serde(default = "first_epoch")]
    pub epoch: u32,
    /// MLS-keyed groups: seconds between this engine's self-update commits (fresh leaf and
    /// path keys: post-compromise security); 0 turns them off.
    #[serde(default = "ten_minutes")]
    pub key_update_s: u64,
}

fn ten_minutes() -> u64 {
    600
}

fn first_epoch() -> u32 {
    1
}

/// A secured group's settings, checked when the engine starts.
#[derive(Debug, Clone)]
struct Secured {
    key: intergroup_secure::PublicKey,
    policy_version: u64,
    member_id: u32,
    may_publish: bool,
    may_subscribe: bool,
    keying: Keying,
}

/// How a secured group is keyed.
#[derive(Debug, Clone)]
enum Keying {
    /// By a pre-shared epoch secret.
    PreShared(crate::shield::ShieldEpoch),
    /// By MLS, driven by the membership protocol.
    Mls(Box<crate::group::keys::GroupKeys>),
}

impl Secured {
    /// The pre-shared epoch number (0 for MLS-keyed groups, whose epochs follow their views).
    fn epoch(&self) -> u32 {
        match &self.keying {
            Keying::PreShared(e) => e.epoch,
            Keying::Mls(_) => 0,
        }
    }
}

/// Loads and checks a secured group's policy, identity and secret at `now` (Unix seconds).
fn load_secured(g: &GroupEntry, now: u64) -> Result<Option<Secured>, String> {
    use intergroup_secure::{EpochSecret, Identity, Policy, Role};
    let (policy, identity, secret) = match (&g.policy, &g.identity, &g.epoch_secret) {
        (None, None, None) => return Ok(None),
        (Some(p), Some(i), s) if s.is_some() || g.membership => (p, i, s),
        (Some(_), Some(_), None) => {
            return Err(format!(
                "group {}: without membership a secured group needs epoch_secret (MLS keys \
                 follow the membership protocol's views: set membership = true)",
                g.name
            ))
        }
        _ => {
            return Err(format!(
                "group {}: policy and identity go together (and epoch_secret needs both)",
                g.name
            ))
        }
    };
    let what = |e: &dyn std::fmt::Display| format!("group {}: {e}", g.name);
    let policy = Policy::load(policy).map_err(|e| what(&e))?;
    policy.verify(now).map_err(|e| {
        format!(
            "group {}: policy {} refused: {e}",
            g.name,
            g.policy
                .as_ref()
                .map_or(String::new(), |p| p.display().to_string())
        )
    })?;
    if policy.group != g.name {
        return Err(format!(
            "group {}: the policy is for group {:?}",
            g.name, policy.group
        ));
    }
    let roster = policy.roster().map_err(|e| what(&e))?;
    let identity = Identity::load(identity).map_err(|e| what(&e))?;
    let me = identity.public();
    let Some(mine) = policy.members.iter().find(|m| m.key == me) else {
        return Err(format!(
            "group {}: this engine's key {me} is not a member of the policy",
            g.name
        ));
    };
    let (may_publish, may_subscribe) = (
        mine.roles.contains(&Role::Publish),
        mine.roles.contains(&Role::Subscribe),
    );
    let keying = match secret {
        Some(secret) => Keying::PreShared(crate::shield::ShieldEpoch {
            epoch: g.epoch,
            secret: EpochSecret::load(secret).map_err(|e| what(&e))?,
            members: roster
                .iter()
                .map(|(id, m)| (*id, m.roles.contains(&Role::Publish)))
                .collect(),
        }),
        None => {
            let mut keys = crate::group::keys::GroupKeys::new(identity, policy.clone());
            keys.update_period_ns =
                (g.key_update_s > 0).then(|| g.key_update_s.saturating_mul(1_000_000_000));
            Keying::Mls(Box::new(keys))
        }
    };
    Ok(Some(Secured {
        key: me,
        policy_version: policy.version,
        member_id: me.member_id(),
        may_publish,
        may_subscribe,
        keying,
    }))
}

fn one() -> usize {
    1
}

fn second() -> u64 {
    1000
}

impl Default for NetworkConfig {
    fn default() -> Self {
        Self {
            interface: Ipv4Addr::LOCALHOST,
            ttl: 0,
            port: 40_456,
            socket_buffer_bytes: 8 << 20,
        }
    }
}

impl Default for DriverConfig {
    fn default() -> Self {
        Self {
            client_timeout_ms: 2_000,
            heartbeat_interval_ms: 100,
            publication_log_bytes: 4 << 20,
            subscription_log_bytes: 16 << 20,
            max_subscribers: 16,
            member_id: 0,
            log_level: "info".into(),
            runtime: EngineConfig {
                max_idle_us: 1_000,
                ..EngineConfig::default()
            },
            network: NetworkConfig::default(),
            groups: Vec::new(),
        }
    }
}

/// The default configuration with every key explained (`intergroup engine
/// --print-default-config`). A test checks that it parses to [`DriverConfig::default`].
pub const DEFAULT_CONFIG_TOML: &str = r#"# intergroup engine configuration. Every key is optional; these are the defaults.

# A client (or the engine) silent for this long counts as dead: the engine reclaims a dead
# client's publications and subscriptions, and clients of a dead engine get EngineDead.
client_timeout_ms = 2000
# How often the engine heartbeats, looks at its clients and refreshes its counters.
heartbeat_interval_ms = 100
# Bytes of each publication's shared-memory log (a power of two, 64 KiB to 1 GiB); the
# largest message is a quarter of it. Local subscribers read it in place.
publication_log_bytes = 4194304
# Bytes of each group stream's log of messages from the network (a power of two). A
# subscriber that falls this far behind is lapped and told how many messages it missed.
subscription_log_bytes = 16777216
# Local subscriptions that may read one publication at once (1 to 1000).
max_subscribers = 16
# This engine's member id in its groups (unique per group); 0 picks a random one.
member_id = 0
# error, warn, info, debug or trace. The RUST_LOG environment variable overrides it.
log_level = "info"

[runtime]
# Worker threads; groups are spread over them by group id.
workers = 1
# Cores to pin workers to; empty leaves them to the scheduler.
cores = []
# "auto" (io_uring when the kernel allows it, else portable), "io_uring" or "portable".
backend = "auto"
# Spin instead of sleeping when idle: lower latency, one core busy.
busy_poll = false
# UDP segmentation offload on send and coalescing on receive.
gso = true
gro = true
# Bytes of each embedded publication's ring (clients of the daemon use publication_log_bytes).
publication_ring_bytes = 16777216
# How far an embedded publication may run ahead of its worker, bytes; 0 for no bound but
# the ring (see EngineConfig::publication_window_bytes).
publication_window_bytes = 1048576
# Longest an idle worker sleeps, microseconds: bounds how long a message published by a
# client waits before the engine sends it to remote members.
max_idle_us = 1000
# Where embedded publication rings are made as files; by default they are the process's own
# memory (on transparent huge pages where the kernel allows), not files.
# ring_dir = "/dev/shm"
# Run the duty cycle on the application's thread (embedded engines only).
invoker = false

[network]
# Interface for multicast and unicast. 127.0.0.1 never leaves this host; name a real
# interface's address to reach other hosts.
interface = "127.0.0.1"
# Multicast TTL; 0 keeps datagrams on this host.
ttl = 0
# UDP port of groups not listed below; their multicast address is 239.255.x.y from the group id.
port = 40456
# Send and receive buffer of each socket, bytes (forced when running as root).
socket_buffer_bytes = 8388608

# Groups with addresses of their own, for example:
# [[group]]
# name = "demo"
# address = "239.255.10.1:40500"
# peers = []          # unicast peers ("10.0.0.2:40500") instead of multicast
# unicast_port = 0    # fixed port of this engine's unicast socket (peers need one)
# min_receivers = 0   # send past the first window only while this many remote engines receive
# membership = false  # views and virtual synchrony: subscriptions may ask for total or safe order
# initial_members = 1 # with membership: engines needed for the first primary view
# fail_timeout_ms = 1000  # with membership: silence before an engine is suspected
# policy = "/etc/intergroup/demo.policy"   # secure the group: signed policy of its members
# identity = "/etc/intergroup/engine.key"  # this engine's key (must be in the policy)
# With membership = true, MLS keys the group (one commit per view change); otherwise give a
# pre-shared data-plane secret (intergroup keys secret) and its epoch number:
# epoch_secret = "/etc/intergroup/demo.secret"
# epoch = 1
# key_update_s = 600   # MLS: seconds between this engine's self-update commits (0: never)
"#;

impl DriverConfig {
    /// Parses a TOML configuration; errors name the file's line.
    pub fn from_toml(name: &str, text: &str) -> Result<Self, IpcError> {
        let cfg: DriverConfig = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|s| {
                text.as_bytes()[..s.start.min(text.len())]
                    .iter()
                    .filter(|&&b| b == b'\n')
                    .count()
                    + 1
            });
            match line {
                Some(l) => IpcError::Config(format!("{name}:{l}: {}", e.message())),
                None => IpcError::Config(format!("{name}: {}", e.message())),
            }
        })?;
        cfg.validate()
            .map_err(|e| IpcError::Config(format!("{name}: {e}")))?;
        Ok(cfg)
    }

    /// Checks every value's range.
    pub fn validate(&self) -> Result<(), String> {
        let pow2 = |name: &str, v: u64| {
            if v.is_power_of_two() && (64 << 10..=1 << 30).contains(&v) {
                Ok(())
            } else {
                Err(format!(
                    "{name} = {v}: must be a power of two from 65536 to 1073741824"
                ))
            }
        };
        pow2("publication_log_bytes", self.publication_log_bytes)?;
        pow2("subscription_log_bytes", self.subscription_log_bytes)?;
        if !(100..=3_600_000).contains(&self.client_timeout_ms) {
            return Err(format!(
                "client_timeout_ms = {}: must be 100 to 3600000",
                self.client_timeout_ms
            ));
        }
        if self.heartbeat_interval_ms == 0 || self.heartbeat_interval_ms * 2 > self.client_timeout_ms {
            return Err(format!(
                "heartbeat_interval_ms = {}: must be at least 1 and at most half of client_timeout_ms",
                self.heartbeat_interval_ms
            ));
        }
        if !(1..=1000).contains(&self.max_subscribers) {
            return Err(format!(
                "max_subscribers = {}: must be 1 to 1000",
                self.max_subscribers
            ));
        }
        if !["error", "warn", "info", "debug", "trace"].contains(&self.log_level.as_str()) {
            return Err(format!(
                "log_level = {:?}: must be error, warn, info, debug or trace",
                self.log_level
            ));
        }
        if self.runtime.workers == 0 || self.runtime.max_idle_us == 0 {
            return Err("runtime.workers and runtime.max_idle_us must be at least 1".into());
        }
        for g in &self.groups {
            check_group_name(&g.name)?;
            if let Some(a) = g.address {
                if !a.ip().is_multicast() {
                    return Err(format!(
                        "group {}: address {a} is not a multicast address",
                        g.name
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Counters the engine keeps in its control file, in order (`intergroup stat` shows them),
/// followed by the protocol's counters summed over its groups.
pub const COUNTER_NAMES: &[&str] = &[
    "clients",
    "publications",
    "subscriptions",
    "groups",
    "messages_published",
    "messages_received",
    "remote_messages_logged",
    "commands",
    "commands_rejected",
    "clients_timed_out",
    "clients_closed",
    "uptime_ms",
];

/// Labels of the secured groups' counters, summed over groups, after the protocol's:
/// `secure_sealed`, `secure_opened`, then `secure_rejected_<reason>` per [`Rejection`], then
/// [`MORE_SECURE_LABELS`] (in [`secure_counters`]' order).
///
/// [`Rejection`]: crate::shield::Rejection
fn secure_counter_labels() -> Vec<String> {
    ["secure_sealed".to_string(), "secure_opened".to_string()]
        .into_iter()
        .chain(
            crate::shield::Rejection::ALL
                .iter()
                .map(|r| format!("secure_rejected_{}", r.label())),
        )
        .chain(MORE_SECURE_LABELS.iter().map(|l| l.to_string()))
        .collect()
}

/// Signed-path and MLS key agreement counters (MLS-keyed groups).
const MORE_SECURE_LABELS: [&str; 6] = [
    "secure_signed",
    "secure_verified",
    "mls_epochs_installed",
    "mls_commits",
    "mls_self_updates",
    "mls_key_errors",
];

/// One group's values for [`secure_counter_labels`].
fn secure_counters(stats: &crate::runtime::GroupStats) -> Vec<u64> {
    let mut v = Vec::with_capacity(2 + crate::shield::Rejection::ALL.len() + MORE_SECURE_LABELS.len());
    let s = stats.secure.clone().unwrap_or_default();
    v.extend([s.sealed, s.opened]);
    v.extend(s.rejected);
    let k = stats.keys.clone().unwrap_or_default();
    v.extend([
        s.signed,
        s.verified,
        k.epochs_installed,
        k.commits_made,
        k.self_updates,
        k.key_errors,
    ]);
    v
}

/// A running engine daemon on a directory. Dropping it (or [`close`](Self::close)) stops it
/// and removes its files.
pub struct Driver {
    stop: Arc<AtomicBool>,
    reloads: crossbeam_channel::Sender<Reload>,
    thread: Option<JoinHandle<()>>,
    dir: PathBuf,
    member_id: u32,
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver").field("dir", &self.dir).finish()
    }
}

fn io_err(what: &str, path: &Path, e: std::io::Error) -> IpcError {
    IpcError::Io(format!("{what} {}: {e}", path.display()))
}

/// Takes the directory's lock; fails when another engine holds it.
fn lock_dir(dir: &Path) -> Result<File, IpcError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| io_err("creating", dir, e))?;
    let path = dir.join(files::LOCK);
    let lock = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| io_err("opening", &path, e))?;
    // SAFETY: flock on a descriptor this function owns; no memory is involved.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let pid = Cnc::open(&dir.join(files::CNC)).map(|c| c.pid()).unwrap_or(0);
        return Err(IpcError::DirectoryInUse {
            dir: dir.display().to_string(),
            pid,
        });
    }
    Ok(lock)
}

/// Removes what an engine that died left in `dir` (we hold the lock, so none runs there).
fn clean_stale(dir: &Path) -> Option<u32> {
    let stale = Cnc::open(&dir.join(files::CNC)).ok().map(|c| c.pid());
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let ours = name == files::CNC
                || name == files::COMMANDS
                || name == files::RESPONSES
                || name.starts_with("pub-")
                || name.starts_with("sub-");
            if ours {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    stale
}

fn random_member_id() -> u32 {
    use std::hash::BuildHasher;
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    (std::collections::hash_map::RandomState::new().hash_one((std::process::id(), t)) as u32).max(1)
}

impl Driver {
    /// Starts an engine daemon on `dir`: takes the directory (refusing it if another engine
    /// runs there, cleaning up after one that died), launches the runtime and serves clients.
    pub fn start(dir: impl AsRef<Path>, cfg: DriverConfig) -> Result<Self, IpcError> {
        cfg.validate().map_err(IpcError::Config)?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut secured = HashMap::new();
        for g in &cfg.groups {
            if let Some(s) = load_secured(g, now).map_err(IpcError::Config)? {
                let keyed_by = if matches!(s.keying, Keying::Mls(_)) {
                    "mls"
                } else {
                    "pre-shared secret"
                };
                tracing::info!(group = %g.name, key = %s.key, member_id = s.member_id, keyed_by, "secured group");
                secured.insert(g.name.clone(), s);
            }
        }
        let dir = dir.as_ref().to_path_buf();
        let lock = lock_dir(&dir)?;
        if let Some(pid) = clean_stale(&dir) {
            tracing::warn!(dir = %dir.display(), pid, "removed the files of an engine that stopped without cleaning up");
        }
        let ring = |e: intergroup_ring::Error| IpcError::Io(e.to_string());
        let commands_path = dir.join(files::COMMANDS);
        intergroup_ring::records::create(&commands_path, 1 << 20).map_err(ring)?;
        let responses_path = dir.join(files::RESPONSES);
        intergroup_ring::broadcast::create(&responses_path, 1 << 20, 1, Mode::Lossy).map_err(ring)?;
        let commands = RecordConsumer::open(&commands_path, Duration::from_millis(cfg.client_timeout_ms))
            .map_err(ring)?;
        let responses = BroadcastProducer::open(&responses_path, Duration::from_secs(3600)).map_err(ring)?;
        let engine = Engine::launch(cfg.runtime.clone()).map_err(|e| IpcError::Io(e.to_string()))?;
        // The control file comes last: a client that finds it finds everything else.
        let mut cnc = Cnc::create(&dir.join(files::CNC), std::process::id(), cfg.client_timeout_ms)?;
        let secure_labels = secure_counter_labels();
        for (i, name) in COUNTER_NAMES
            .iter()
            .copied()
            .chain(crate::Counter::ALL.iter().map(|c| c.label()))
            .chain(secure_labels.iter().map(String::as_str))
            .enumerate()
            .take(cnc::MAX_COUNTERS)
        {
            cnc.set_label(i, name);
        }
        let member_id = if cfg.member_id == 0 {
            random_member_id()
        } else {
            cfg.member_id
        };
        tracing::info!(dir = %dir.display(), backend = %engine.backend(), member_id, "engine running");
        let stop = Arc::new(AtomicBool::new(false));
        let (reloads, reload_rx) = crossbeam_channel::bounded(1);
        let mut conductor = Conductor {
            reloads: reload_rx,
            dir: dir.clone(),
            cfg,
            member_id,
            engine: Some(engine),
            cnc,
            commands,
            responses,
            groups: HashMap::new(),
            publications: HashMap::new(),
            subscriptions: HashMap::new(),
            sinks: HashMap::new(),
            next_id: 1,
            claiming: vec![None; cnc::MAX_CLIENTS],
            secured,
            closed_published: 0,
            closed_received: 0,
            counts: Counts::default(),
            started: Instant::now(),
            _lock: lock,
        };
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("intergroup-conductor".into())
            .spawn(move || conductor.run(&s))
            .map_err(|e| IpcError::Io(format!("conductor thread: {e}")))?;
        Ok(Self {
            stop,
            reloads,
            thread: Some(thread),
            dir,
            member_id,
        })
    }

    /// The engine's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// This engine's member id in its groups.
    pub fn member_id(&self) -> u32 {
        self.member_id
    }

    /// Rolls out the secured groups' new settings from `cfg` (what `intergroup engine` does on
    /// SIGHUP): a later signed policy version with a new epoch secret and a higher epoch. Each
    /// is checked as at start, and against the running one (same group, higher version, higher
    /// epoch, same identity); only if every group passes are the joined ones rekeyed. Members
    /// the new policy drops are then not heard, and cannot read what follows unless they got
    /// the new secret. MLS-keyed groups need only the later policy version: the members it
    /// drops are left out of the next view, whose commit removes them from the MLS group.
    /// Other settings are not reloaded. Returns what changed.
    pub fn reload(&self, cfg: DriverConfig) -> Result<Vec<String>, IpcError> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.reloads
            .send((cfg, tx))
            .map_err(|_| IpcError::Io("the engine's conductor is not running".into()))?;
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(r) => r.map_err(IpcError::Config),
            Err(_) => Err(IpcError::Io("the engine's conductor did not answer".into())),
        }
    }

    /// Whether the conductor still runs.
    pub fn is_running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Stops the engine: clients see it closed, sockets close, threads join, files go.
    pub fn close(self) {
        drop(self)
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct JoinedGroup {
    id: u32,
    membership: bool,
}

struct Pub {
    client: u64,
    group: u32,
    stream: u32,
    path: PathBuf,
}

struct Sub {
    client: u64,
    group: u32,
    stream: u32,
    order: Order,
}

#[derive(Default)]
struct Counts {
    commands: u64,
    rejected: u64,
    timed_out: u64,
    closed: u64,
}

/// A new configuration for the conductor, and where its verdict goes.
type Reload = (
    DriverConfig,
    crossbeam_channel::Sender<Result<Vec<String>, String>>,
);

struct Conductor {
    reloads: crossbeam_channel::Receiver<Reload>,
    dir: PathBuf,
    cfg: DriverConfig,
    member_id: u32,
    engine: Option<Engine>,
    cnc: Cnc,
    commands: RecordConsumer,
    responses: BroadcastProducer,
    groups: HashMap<String, JoinedGroup>,
    publications: HashMap<u64, Pub>,
    subscriptions: HashMap<u64, Sub>,
    /// Per (group, stream, order): the log path and how many subscriptions read it.
    sinks: HashMap<(u32, u32, Order), (PathBuf, usize)>,
    next_id: u64,
    /// Per client slot: when it was first seen being claimed.
    claiming: Vec<Option<Instant>>,
    /// Secured groups by name, checked at start.
    secured: HashMap<String, Secured>,
    closed_published: u64,
    closed_received: u64,
    counts: Counts,
    started: Instant,
    _lock: File,
}

impl Conductor {
    fn engine(&self) -> &Engine {
        self.engine
            .as_ref()
            .expect("the engine lives until the conductor ends")
    }

    fn run(&mut self, stop: &AtomicBool) {
        let interval = Duration::from_millis(self.cfg.heartbeat_interval_ms);
        let mut next_beat = Instant::now();
        let mut batch = Vec::with_capacity(64);
        while !stop.load(Ordering::Acquire) {
            let n = self
                .commands
                .read(64, |t, bytes| batch.push(Command::decode(t, bytes)));
            for c in batch.drain(..) {
                self.counts.commands += 1;
                match c {
                    Ok(c) => self.handle(c),
                    Err(e) => {
                        self.counts.rejected += 1;
                        tracing::warn!("ignored a {e} in the command ring");
                    }
                }
            }
            while let Ok((cfg, reply)) = self.reloads.try_recv() {
                let r = self.reload(cfg);
                match &r {
                    Ok(changes) => tracing::info!(?changes, "configuration reloaded"),
                    Err(e) => tracing::warn!(error = %e, "configuration not reloaded"),
                }
                let _ = reply.send(r);
            }
            if Instant::now() >= next_beat {
                self.cnc.beat();
                self.scan_clients();
                self.publish_counters();
                next_beat = Instant::now() + interval;
            }
            if n == 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        self.shutdown();
    }

    fn respond(&mut self, r: &Response) {
        let (t, bytes) = r.encode();
        // The responses log is lossy: this never waits for a client.
        if let Err(e) = self.responses.offer(t, &bytes) {
            tracing::warn!("response not sent: {e}");
        }
    }

    fn refuse(&mut self, correlation: u64, code: ErrorCode, message: String) {
        self.counts.rejected += 1;
        tracing::info!(correlation, "refused a request: {message}");
        self.respond(&Response::Error {
            correlation,
            code: code as u32,
            message,
        });
    }

    fn handle(&mut self, c: Command) {
        let correlation = c.correlation();
        let client = c.client();
        match c {
            Command::AddPublication { stream, group, .. } => {
                match self.add_publication(client, correlation, &group, stream) {
                    Ok((ready, image)) => {
                        self.respond(&ready);
                        if let Some(image) = image {
                            self.respond(&image);
                        }
                    }
                    Err((code, m)) => self.refuse(correlation, code, m),
                }
            }
            Command::AddSubscription {
                stream, order, group, ..
            } => {
                let Some(order) = Order::from_code(order) else {
                    return self.refuse(
                        correlation,
                        ErrorCode::Unsupported,
                        format!(
                            "ordering {order} is not offered by this engine (0 fifo, 1 total, 2 safe are)"
                        ),
                    );
                };
                match self.add_subscription(client, correlation, &group, stream, order) {
                    Ok((ready, images)) => {
                        self.respond(&ready);
                        for i in images {
                            self.respond(&i);
                        }
                    }
                    Err((code, m)) => self.refuse(correlation, code, m),
                }
            }
            Command::RemovePublication { id, .. } => {
                if self.publications.get(&id).is_some_and(|p| p.client == client) {
                    self.remove_publication(id);
                    self.respond(&Response::Done { correlation });
                } else {
                    self.refuse(
                        correlation,
                        ErrorCode::Unknown,
                        format!("no publication {id} of this client"),
                    );
                }
            }
            Command::RemoveSubscription { id, .. } => {
                if self.subscriptions.get(&id).is_some_and(|s| s.client == client) {
                    self.remove_subscription(id);
                    self.respond(&Response::Done { correlation });
                } else {
                    self.refuse(
                        correlation,
                        ErrorCode::Unknown,
                        format!("no subscription {id} of this client"),
                    );
                }
            }
        }
    }

    /// See [`Driver::reload`].
    fn reload(&mut self, cfg: DriverConfig) -> Result<Vec<String>, String> {
        cfg.validate()?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut next = HashMap::new();
        let mut changes = Vec::new();
        for g in &cfg.groups {
            let Some(new) = load_secured(g, now)? else {
                if self.secured.contains_key(&g.name) {
                    return Err(format!("group {}: a running secured group stays secured", g.name));
                }
                continue;
            };
            match self.secured.get(&g.name) {
                None if self.groups.contains_key(&g.name) => {
                    return Err(format!(
                        "group {}: joined in the clear; restart the engine to secure it",
                        g.name
                    ))
                }
                None => changes.push(format!("group {}: secured", g.name)),
                Some(old)
                    if matches!(old.keying, Keying::Mls(_)) != matches!(new.keying, Keying::Mls(_)) =>
                {
                    return Err(format!(
                        "group {}: changing between MLS and a pre-shared secret needs a restart of its engines",
                        g.name
                    ))
                }
                Some(old) if old.policy_version == new.policy_version && old.epoch() == new.epoch() => {}
                Some(old) if matches!(new.keying, Keying::Mls(_)) => {
                    if new.key != old.key {
                        return Err(format!("group {}: the identity changed; restart the engine", g.name));
                    }
                    if new.policy_version <= old.policy_version {
                        return Err(format!(
                            "group {}: policy version {} does not supersede the running version {}",
                            g.name, new.policy_version, old.policy_version
                        ));
                    }
                    changes.push(format!(
                        "group {}: policy version {} -> {} (MLS: the next view's commit applies it)",
                        g.name, old.policy_version, new.policy_version
                    ));
                }
                Some(_) if g.membership && self.groups.contains_key(&g.name) => {
                    // Checked here, before anything moves: the runtime refuses it anyway.
                    return Err(format!(
                        "group {}: has membership and a pre-shared secret, so its key cannot \
                         change while it runs; restart its engines (or key it by MLS: drop \
                         epoch_secret)",
                        g.name
                    ));
                }
                Some(old) => {
                    if new.key != old.key {
                        return Err(format!(
                            "group {}: the identity changed; restart the engine",
                            g.name
                        ));
                    }
                    if new.policy_version <= old.policy_version {
                        return Err(format!(
                            "group {}: policy version {} does not supersede the running version {}",
                            g.name, new.policy_version, old.policy_version
                        ));
                    }
                    if new.epoch() <= old.epoch() {
                        return Err(format!(
                            "group {}: a new policy needs a new epoch_secret and an epoch above {}",
                            g.name,
                            old.epoch()
                        ));
                    }
                    changes.push(format!(
                        "group {}: policy version {} -> {}, epoch {} -> {}",
                        g.name,
                        old.policy_version,
                        new.policy_version,
                        old.epoch(),
                        new.epoch()
                    ));
                }
            }
            next.insert(g.name.clone(), new);
        }
        if let Some(name) = self.secured.keys().find(|n| !next.contains_key(*n)) {
            return Err(format!("group {name}: a running secured group stays secured"));
        }
        for (name, new) in &next {
            let Some(joined) = self.groups.get(name) else {
                continue;
            };
            let old = self.secured.get(name);
            match &new.keying {
                Keying::PreShared(epoch) if old.is_some_and(|o| o.epoch() != epoch.epoch) => self
                    .engine()
                    .rekey(joined.id, epoch.clone())
                    .map_err(|e| format!("group {name}: {e}"))?,
                Keying::Mls(keys) if old.is_some_and(|o| o.policy_version != new.policy_version) => self
                    .engine()
                    .update_policy(joined.id, keys.policy.clone())
                    .map_err(|e| format!("group {name}: {e}"))?,
                _ => {}
            }
        }
        self.secured = next;
        Ok(changes)
    }

    /// In a secured group, refuses what the policy does not let this engine's key do.
    fn check_role(&self, name: &str, role: intergroup_secure::Role) -> Result<(), (ErrorCode, String)> {
        let Some(s) = self.secured.get(name) else {
            return Ok(());
        };
        let allowed = match role {
            intergroup_secure::Role::Publish => s.may_publish,
            intergroup_secure::Role::Subscribe => s.may_subscribe,
            intergroup_secure::Role::Admin => true,
        };
        if allowed {
            Ok(())
        } else {
            Err((
                ErrorCode::Invalid,
                format!(
                    "group {name}: the policy does not give this engine's key {} the {} role",
                    s.key,
                    format!("{role:?}").to_lowercase()
                ),
            ))
        }
    }

    /// Joins `name` if this engine has not yet; returns its id.
    fn ensure_group(&mut self, name: &str) -> Result<u32, (ErrorCode, String)> {
        check_group_name(name).map_err(|m| (ErrorCode::Invalid, m))?;
        if let Some(g) = self.groups.get(name) {
            return Ok(g.id);
        }
        let membership = self.cfg.groups.iter().any(|g| g.name == name && g.membership);
        let id = group_id(name);
        if self.groups.values().any(|g| g.id == id) {
            return Err((
                ErrorCode::Invalid,
                format!("group {name:?} has the id of another group; rename it"),
            ));
        }
        let entry = self.cfg.groups.iter().find(|g| g.name == name);
        let net = &self.cfg.network;
        let address = entry.and_then(|e| e.address).unwrap_or_else(|| {
            SocketAddrV4::new(Ipv4Addr::new(239, 255, (id >> 8) as u8, id as u8), net.port)
        });
        let mut group = GroupConfig::new(MemberConfig {
            group: id,
            member_id: self.member_id,
            min_receivers: entry.map_or(0, |e| e.min_receivers),
            ..MemberConfig::default()
        });
        group.udp = UdpConfig {
            interface: net.interface,
            group: address,
            ttl: net.ttl,
            loopback: true,
            socket_buffer_bytes: net.socket_buffer_bytes,
            unicast_port: entry.map_or(0, |e| e.unicast_port),
            peers: entry.map_or_else(Vec::new, |e| e.peers.clone()),
        };
        if let Some(s) = self.secured.get(name) {
            group.member.member_id = s.member_id;
            match &s.keying {
                Keying::PreShared(e) => group.secure = Some(e.clone()),
                Keying::Mls(k) => group.keys = Some((**k).clone()),
            }
        }
        if membership {
            let fail_ms = entry.map_or(1000, |e| e.fail_timeout_ms).max(10);
            group.membership = Some(crate::group::GroupConfig {
                initial_members: entry.map_or(1, |e| e.initial_members),
                fail_timeout_ns: fail_ms * 1_000_000,
                hello_interval_ns: fail_ms * 100_000,
                flush_timeout_ns: fail_ms * 2_000_000,
                ..crate::group::GroupConfig::default()
            });
        }
        self.engine()
            .join(group)
            .map_err(|e| (ErrorCode::Failed, format!("joining group {name}: {e}")))?;
        tracing::info!(group = name, id, %address, "joined group");
        self.groups
            .insert(name.to_string(), JoinedGroup { id, membership });
        Ok(id)
    }

    fn add_publication(
        &mut self,
        client: u64,
        correlation: u64,
        name: &str,
        stream: u32,
    ) -> Result<(Response, Option<Response>), (ErrorCode, String)> {
        self.check_role(name, intergroup_secure::Role::Publish)?;
        let group = self.ensure_group(name)?;
        let membership = self.groups.values().any(|g| g.id == group && g.membership);
        let id = self.next_id;
        self.next_id += 1;
        let path = self.dir.join(format!("pub-{id}"));
        let failed = |e: String| (ErrorCode::Failed, e);
        intergroup_ring::broadcast::create(
            &path,
            self.cfg.publication_log_bytes,
            self.cfg.max_subscribers + 1,
            Mode::Reliable,
        )
        .map_err(|e| failed(e.to_string()))?;
        let max = match self.engine().log_publication(group, stream, id, path.clone()) {
            Ok(m) => m,
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                return Err(failed(e.to_string()));
            }
        };
        let max = max.min(intergroup_ring::broadcast::max_payload(
            self.cfg.publication_log_bytes as usize,
        ));
        self.publications.insert(
            id,
            Pub {
                client,
                group,
                stream,
                path: path.clone(),
            },
        );
        tracing::debug!(id, group = name, stream, client, "publication added");
        let path = path.display().to_string();
        Ok((
            Response::PublicationReady {
                correlation,
                id,
                group,
                stream,
                max_message: max as u64,
                sender: self.member_id,
                path: path.clone(),
            },
            // With membership local subscribers get every message through the ordering, not
            // from the log.
            (!membership).then_some(Response::ImageAvailable {
                session: id,
                group,
                stream,
                sender: self.member_id,
                path,
            }),
        ))
    }

    fn add_subscription(
        &mut self,
        client: u64,
        correlation: u64,
        name: &str,
        stream: u32,
        order: Order,
    ) -> Result<(Response, Vec<Response>), (ErrorCode, String)> {
        self.check_role(name, intergroup_secure::Role::Subscribe)?;
        let group = self.ensure_group(name)?;
        let membership = self.groups.values().any(|g| g.id == group && g.membership);
        if order != Order::Fifo && !membership {
            return Err((
                ErrorCode::Unsupported,
                format!(
                    "group {name:?} runs without membership: only fifo order is offered (set membership = true in its [[group]] entry)"
                ),
            ));
        }
        let path = match self.sinks.get_mut(&(group, stream, order)) {
            Some((path, readers)) => {
                *readers += 1;
                path.clone()
            }
            None => {
                let path = self.dir.join(format!("sub-{group}-{stream}-{}", order.name()));
                let failed = |e: String| (ErrorCode::Failed, e);
                intergroup_ring::broadcast::create(&path, self.cfg.subscription_log_bytes, 1, Mode::Lossy)
                    .map_err(|e| failed(e.to_string()))?;
                if let Err(e) = self.engine().sink(group, stream, order, path.clone()) {
                    let _ = std::fs::remove_file(&path);
                    return Err(failed(e.to_string()));
                }
                self.sinks.insert((group, stream, order), (path.clone(), 1));
                path
            }
        };
        let id = self.next_id;
        self.next_id += 1;
        self.subscriptions.insert(
            id,
            Sub {
                client,
                group,
                stream,
                order,
            },
        );
        tracing::debug!(id, group = name, stream, client, "subscription added");
        // With membership every delivery, local ones too, goes through the group's ordering:
        // no image is read directly.
        let images = self
            .publications
            .iter()
            .filter(|(_, p)| p.group == group && p.stream == stream && !membership)
            .map(|(&session, p)| Response::ImageAvailable {
                session,
                group,
                stream,
                sender: self.member_id,
                path: p.path.display().to_string(),
            })
            .collect();
        Ok((
            Response::SubscriptionReady {
                correlation,
                id,
                group,
                stream,
                path: path.display().to_string(),
            },
            images,
        ))
    }

    fn remove_publication(&mut self, id: u64) {
        let Some(p) = self.publications.remove(&id) else {
            return;
        };
        // The worker sends what the log still holds to remote members, then lets go; local
        // subscribers read the rest from their own mappings.
        let _ = self.engine().close_log_publication(p.group, id);
        let _ = std::fs::remove_file(&p.path);
        self.respond(&Response::ImageUnavailable {
            session: id,
            group: p.group,
            stream: p.stream,
        });
        tracing::debug!(id, "publication removed");
    }

    fn remove_subscription(&mut self, id: u64) {
        let Some(s) = self.subscriptions.remove(&id) else {
            return;
        };
        let key = (s.group, s.stream, s.order);
        if let Some((path, readers)) = self.sinks.get_mut(&key) {
            *readers -= 1;
            if *readers == 0 {
                let path = path.clone();
                self.sinks.remove(&key);
                let _ = self.engine().close_sink(s.group, s.stream, s.order);
                let _ = std::fs::remove_file(path);
            }
        }
        tracing::debug!(id, "subscription removed");
    }

    /// Removes everything a client held.
    fn reclaim(&mut self, client: u64) {
        let pubs: Vec<u64> = self
            .publications
            .iter()
            .filter(|(_, p)| p.client == client)
            .map(|(&id, _)| id)
            .collect();
        for id in pubs {
            self.remove_publication(id);
        }
        let subs: Vec<u64> = self
            .subscriptions
            .iter()
            .filter(|(_, s)| s.client == client)
            .map(|(&id, _)| id)
            .collect();
        for id in subs {
            self.remove_subscription(id);
        }
    }

    /// Reclaims clients that closed or went silent; frees abandoned slots.
    fn scan_clients(&mut self) {
        let now = cnc::now_ms();
        let timeout = self.cfg.client_timeout_ms;
        for s in 0..cnc::MAX_CLIENTS {
            let state = self.cnc.slot(s, SlotField::State).load(Ordering::Acquire);
            if state != cnc::SLOT_CLAIMING {
                self.claiming[s] = None;
            }
            match state {
                cnc::SLOT_ACTIVE | cnc::SLOT_CLOSING => {
                    let beat = self.cnc.slot(s, SlotField::Heartbeat).load(Ordering::Relaxed);
                    let silent = now.saturating_sub(beat) > timeout;
                    if state == cnc::SLOT_ACTIVE && !silent {
                        continue;
                    }
                    let client = self.cnc.slot(s, SlotField::Client).load(Ordering::Relaxed);
                    let pid = self.cnc.slot(s, SlotField::Pid).load(Ordering::Relaxed);
                    if state == cnc::SLOT_ACTIVE {
                        self.counts.timed_out += 1;
                        tracing::warn!(
                            client,
                            pid,
                            "client silent for {timeout} ms: reclaiming what it held"
                        );
                    } else {
                        self.counts.closed += 1;
                        tracing::debug!(client, pid, "client closed");
                    }
                    self.reclaim(client);
                    self.closed_published += self.cnc.slot(s, SlotField::Published).load(Ordering::Relaxed);
                    self.closed_received += self.cnc.slot(s, SlotField::Received).load(Ordering::Relaxed);
                    self.cnc
                        .slot(s, SlotField::State)
                        .store(cnc::SLOT_FREE, Ordering::Release);
                }
                cnc::SLOT_CLAIMING => {
                    let since = *self.claiming[s].get_or_insert_with(Instant::now);
                    if since.elapsed() > Duration::from_millis(timeout) {
                        self.cnc
                            .slot(s, SlotField::State)
                            .store(cnc::SLOT_FREE, Ordering::Release);
                    }
                }
                _ => {}
            }
        }
    }

    fn publish_counters(&mut self) {
        let mut clients = 0;
        let (mut published, mut received) = (self.closed_published, self.closed_received);
        for s in 0..cnc::MAX_CLIENTS {
            if self.cnc.slot(s, SlotField::State).load(Ordering::Relaxed) == cnc::SLOT_ACTIVE {
                clients += 1;
                published += self.cnc.slot(s, SlotField::Published).load(Ordering::Relaxed);
                received += self.cnc.slot(s, SlotField::Received).load(Ordering::Relaxed);
            }
        }
        let mut protocol = Counters::default();
        let mut logged = 0;
        let mut secure = vec![0u64; 2 + crate::shield::Rejection::ALL.len() + MORE_SECURE_LABELS.len()];
        for g in self.groups.values() {
            if let Ok(stats) = self.engine().stats(g.id) {
                protocol.merge(&stats.counters);
                logged += stats.sunk;
                for (total, v) in secure.iter_mut().zip(secure_counters(&stats)) {
                    *total += v;
                }
            }
        }
        let ours = [
            clients,
            self.publications.len() as u64,
            self.subscriptions.len() as u64,
            self.groups.len() as u64,
            published,
            received,
            logged,
            self.counts.commands,
            self.counts.rejected,
            self.counts.timed_out,
            self.counts.closed,
            self.started.elapsed().as_millis() as u64,
        ];
        debug_assert_eq!(ours.len(), COUNTER_NAMES.len());
        let values = ours
            .into_iter()
            .chain(crate::Counter::ALL.iter().map(|&c| protocol.get(c)))
            .chain(secure);
        for (i, v) in values.enumerate().take(cnc::MAX_COUNTERS) {
            self.cnc.set_counter(i, v);
        }
    }

    fn shutdown(&mut self) {
        self.publish_counters();
        self.cnc.set_closed();
        if let Some(engine) = self.engine.take() {
            engine.close();
        }
        clean_stale(&self.dir);
        tracing::info!(dir = %self.dir.display(), "engine stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_default_config_is_the_default() {
        let parsed = DriverConfig::from_toml("default", DEFAULT_CONFIG_TOML).unwrap();
        assert_eq!(parsed, DriverConfig::default());
    }

    #[test]
    fn a_group_entry_takes_a_minimum_of_receivers_and_defaults_to_none() {
        let c = DriverConfig::from_toml("c.toml", "[[group]]\nname = \"g\"\nmin_receivers = 2\n").unwrap();
        assert_eq!(c.groups[0].min_receivers, 2);
        let c = DriverConfig::from_toml("c.toml", "[[group]]\nname = \"g\"\n").unwrap();
        assert_eq!(c.groups[0].min_receivers, 0);
        let e =
            DriverConfig::from_toml("c.toml", "[[group]]\nname = \"g\"\nmin_receivers = -1\n").unwrap_err();
        assert!(e.to_string().contains("c.toml:3"), "{e}");
    }

    #[test]
    fn bad_values_and_syntax_name_the_line_or_key() {
        let e = DriverConfig::from_toml(
            "c.toml",
            "client_timeout_ms = 2000
bogus = 1
",
        )
        .unwrap_err();
        assert!(e.to_string().contains("c.toml:2"), "{e}");
        let e = DriverConfig::from_toml(
            "c.toml",
            "publication_log_bytes = 1000
",
        )
        .unwrap_err();
        assert!(e.to_string().contains("publication_log_bytes"), "{e}");
        let e = DriverConfig::from_toml(
            "c.toml",
            "[network]
ttl = \"x\"
",
        )
        .unwrap_err();
        assert!(e.to_string().contains("c.toml:2"), "{e}");
    }
}
