//! The runtime: real sockets, real time and real threads around the sans-IO core.
//!
//! [`Engine::launch`] starts N worker threads, each owning one I/O backend (io_uring, or the
//! portable `sendmmsg`/`recvmmsg` one), its sockets, and its shard of groups. Applications in
//! the same process publish through [`Publication`]s (a single-producer shared-memory ring per
//! publication, read by the worker) and subscribe with handlers that the worker calls with each
//! delivery, in stream order.
//!
//! ```
//! use intergroup_engine::runtime::{Engine, EngineConfig, GroupConfig};
//! use intergroup_engine::{MemberConfig, Output};
//! use std::sync::mpsc;
//!
//! let engine = Engine::launch(EngineConfig::default()).unwrap();
//! // A group on its own multicast port so this example does not meet other tests' traffic.
//! let mut group = GroupConfig::new(MemberConfig { group: 7, member_id: 1, ..MemberConfig::default() });
//! group.udp.group.set_port(47_001);
//! engine.join(group).unwrap();
//! let (tx, rx) = mpsc::channel();
//! engine
//!     .subscribe(7, move |out: &Output<'_>| {
//!         if let Output::Message(m) = out {
//!             tx.send(m.payload.to_vec()).unwrap();
//!         }
//!     })
//!     .unwrap();
//! let mut publication = engine.publication(7, 1).unwrap();
//! publication.offer(b"hello").unwrap();
//! // Members do not deliver their own messages; a second engine would receive it.
//! assert!(rx.recv_timeout(std::time::Duration::from_millis(50)).is_err());
//! engine.close();
//! ```

pub mod io;
mod proto;
pub mod sys;
mod worker;

use crate::group::Order;
pub use io::BackendKind;
pub use sys::ThreadCpu;
pub use worker::{SinkRecord, SINK_META_LEN};

use crate::proto::{Counters, MemberConfig, Output};
use crate::transport::{TransportStats, UdpConfig};
use crossbeam_channel::Sender;
use intergroup_ring::{OfferError as RingOfferError, Producers, SingleClaim, SingleProducer};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use worker::{Command, Wake, Worker};

/// A subscriber's handler: called on the worker thread with each delivery and in-stream event
/// of its group, in stream order. It must not block; copy what it keeps.
pub type Handler = Box<dyn FnMut(&Output<'_>) + Send>;

/// Settings of an engine. Every field has a default suited to a small host.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineConfig {
    /// Worker threads; groups are spread over them by group id.
    pub workers: usize,
    /// Cores to pin workers to (worker i to `cores[i % len]`); empty leaves them unpinned,
    /// which is right when several engines share a host.
    pub cores: Vec<usize>,
    /// I/O backend.
    pub backend: BackendKind,
    /// Spin instead of sleeping when idle: lower latency, one core at 100%.
    pub busy_poll: bool,
    /// Coalesce equal-size datagrams into one UDP GSO send.
    pub gso: bool,
    /// Ask the kernel to coalesce received datagrams (UDP GRO).
    pub gro: bool,
    /// Bytes of each publication's ring (a power of two); a message may be up to a quarter.
    /// A deeper ring absorbs longer bursts but queues more (latency under saturation).
    /// One-frame messages are sent and retransmitted from the ring where they lie, so it also
    /// holds up to half its bytes of sent messages for repair (see docs/architecture.md).
    pub publication_ring_bytes: u64,
    /// How far a publication may run ahead of its worker, in bytes of its ring (Aeron's
    /// publication window): offers are back-pressured while the messages the worker has not
    /// yet taken span this many. 0 leaves only the ring's space as the bound.
    ///
    /// The ring also holds sent messages for repair, so without a window a saturating
    /// publisher queues up to half the ring in front of the worker: latency under saturation
    /// grows with the ring (3.6-4.5 ms at 1 KiB with 16 MiB, against 0.25-1.0 ms with this
    /// default). A publisher that sleeps long when back-pressured wants a window of at least
    /// what the worker sends during its sleep (docs/performance.md, twenty-fourth set).
    pub publication_window_bytes: u64,
    /// Where publication rings are created as files (unlinked once mapped). Unset (the
    /// default), they are this process's own memory, on transparent huge pages where the kernel
    /// allows: both ends of an embedded publication are threads of one process, and a file in
    /// /dev/shm gets no huge pages unless that tmpfs is mounted with `huge=`. The ring is what
    /// the worker streams through and sends from, so its pages count (docs/performance.md,
    /// twenty-sixth set).
    pub ring_dir: Option<PathBuf>,
    /// No worker thread: the application runs the duty cycle itself by calling
    /// [`Engine::invoke`] (Aeron's invoker mode). A single-threaded publisher then keeps its
    /// messages on one core from offer to socket. Takes one worker.
    pub invoker: bool,
    /// Longest an idle worker sleeps, in microseconds (at most 50 ms). Publications in other
    /// processes cannot wake a sleeping worker, so the engine daemon keeps this short.
    pub max_idle_us: u64,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            workers: 1,
            cores: Vec::new(),
            backend: BackendKind::Auto,
            busy_poll: false,
            gso: true,
            gro: true,
            publication_ring_bytes: 16 << 20,
            publication_window_bytes: 1 << 20,
            ring_dir: None,
            invoker: false,
            max_idle_us: 50_000,
        }
    }
}

/// One group an engine joins.
#[derive(Debug, Clone)]
pub struct GroupConfig {
    /// The protocol settings (group id and member id among them).
    pub member: MemberConfig,
    /// Sockets: interface, group address, peers.
    pub udp: UdpConfig,
    /// Drop this share (0 to 1) of received datagrams on purpose, to exercise recovery.
    pub receive_loss: f64,
    /// Seed of the loss decorator.
    pub loss_seed: u64,
    /// Seed of the member's NAK back-off.
    pub seed: u64,
    /// Membership, views and fifo/total/safe order (its `member` field is replaced by
    /// `member` above); `None` runs reliable FIFO multicast without membership.
    pub membership: Option<crate::group::GroupConfig>,
    /// Seal every datagram of the group with the Secure Group Layer's data plane, starting in
    /// this epoch ([`crate::shield`]); `None` sends in the clear. Datagrams then carry
    /// [`crate::shield::SEAL_OVERHEAD`] more bytes within `member.mtu`.
    pub secure: Option<crate::shield::ShieldEpoch>,
    /// A secured group with membership keyed by MLS ([`crate::group::keys`]): every primary
    /// view change is an MLS commit and the data plane moves to each view's epoch. Needs
    /// `membership` and no `secure` (the epochs come from MLS). Datagrams carry up to
    /// [`crate::shield::SIGN_OVERHEAD`] more bytes within `member.mtu`.
    pub keys: Option<crate::group::keys::GroupKeys>,
}

impl GroupConfig {
    /// A group with `member` and the default (loopback) sockets.
    pub fn new(member: MemberConfig) -> Self {
        Self {
            seed: u64::from(member.member_id),
            member,
            udp: UdpConfig::default(),
            receive_loss: 0.0,
            loss_seed: 1,
            membership: None,
            secure: None,
            keys: None,
        }
    }
}

/// What joining a group gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupInfo {
    /// The unicast address this member sends from.
    pub local_addr: SocketAddr,
    /// The backend of the worker that owns the group.
    pub backend: BackendKind,
}

/// A snapshot of a group's counters.
#[derive(Debug, Clone)]
pub struct GroupStats {
    /// Backend of the owning worker.
    pub backend: BackendKind,
    /// GSO in use (the kernel may refuse it, and then it is turned off).
    pub gso: bool,
    /// GRO in use.
    pub gro: bool,
    /// Times the owning worker's receive found no free receive buffer (io_uring: a multishot
    /// receive ended with ENOBUFS; portable: every buffer held frames waiting behind gaps), so
    /// datagrams waited in the socket. Every group of a worker reports the worker's figure.
    pub receive_buffer_shortages: u64,
    /// The protocol's counters.
    pub counters: Counters,
    /// The sockets' counters.
    pub transport: TransportStats,
    /// Next sequence this member sends.
    pub next_sequence: u64,
    /// Bytes published and not yet framed.
    pub queued_bytes: usize,
    /// Some publication ring holds records the worker has not read yet.
    pub unread_publications: bool,
    /// Live receivers that report positions to this member.
    pub receivers: usize,
    /// The lowest position they reported.
    pub acknowledged: Option<u64>,
    /// Messages a full send queue pushed back into the worker's overflow (none are lost).
    pub pushed_back: u64,
    /// Messages written into subscription logs for other processes.
    pub sunk: u64,
    /// Messages framed in their embedded publication's ring and sent, and retransmitted, from
    /// there rather than copied into the retransmit buffer.
    pub lent: u64,
    /// Records of an embedded publication's ring too short to be a message (the ring's memory
    /// was written by something other than its [`Publication`]); skipped.
    pub malformed_records: u64,
    /// The Secure Group Layer's counters (sealed, opened, rejected by reason), when secured.
    pub secure: Option<crate::shield::ShieldStats>,
    /// MLS-keyed groups: the key agreement's counters.
    pub keys: Option<crate::group::keys::KeyStats>,
    /// CPU time of the worker that owns the group, since it started (it serves all the
    /// worker's groups): two readings apart, what the engine spent on the traffic between.
    pub worker_cpu: ThreadCpu,
}

impl GroupStats {
    /// True when everything published has been framed and `receivers` live receivers have
    /// acknowledged all of it.
    pub fn all_acknowledged(&self, receivers: usize) -> bool {
        !self.unread_publications
            && self.queued_bytes == 0
            && self.receivers >= receivers
            && self.acknowledged.is_some_and(|a| a >= self.next_sequence)
    }
}

/// Errors of the runtime.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// A setting is out of range.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A socket, thread or io_uring could not be set up.
    #[error("I/O: {0}")]
    Io(String),
    /// A publication ring could not be made.
    #[error("ring: {0}")]
    Ring(String),
    /// The group was not joined.
    #[error("group {0} is not joined")]
    UnknownGroup(u32),
    /// The group was joined already.
    #[error("group {0} is already joined")]
    GroupExists(u32),
    /// The engine is closed (or its worker stopped).
    #[error("the engine is closed")]
    Closed,
}

/// Why an offer did not happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OfferError {
    /// The publication's ring is full: the network or a slow receiver holds the sender back.
    /// Try again.
    #[error("back-pressured: the publication is full")]
    BackPressured,
    /// The message is larger than this publication takes.
    #[error("message of {len} bytes exceeds the maximum of {max}")]
    TooLarge {
        /// The message's length.
        len: usize,
        /// The largest message this publication takes.
        max: usize,
    },
    /// The engine is closed.
    #[error("the engine is closed")]
    Closed,
}

struct WorkerHandle {
    commands: Sender<Command>,
    wake: Arc<Wake>,
    thread: Option<JoinHandle<()>>,
}

/// An engine running inside this process. Dropping it (or [`close`](Self::close)) stops the
/// workers, closes every socket and joins every thread.
pub struct Engine {
    cfg: EngineConfig,
    workers: Vec<WorkerHandle>,
    backend: BackendKind,
    /// In invoker mode, the one worker, run by the application's calls.
    invoker: Option<std::sync::Mutex<Worker>>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("workers", &self.workers.len())
            .field("backend", &self.backend)
            .finish()
    }
}

static RING_COUNTER: AtomicU64 = AtomicU64::new(0);

fn new_wake() -> Result<Arc<Wake>, EngineError> {
    Ok(Arc::new(Wake {
        parked: AtomicBool::new(false),
        closed: AtomicBool::new(false),
        fd: sys::EventFd::new().map_err(|e| EngineError::Io(format!("eventfd: {e}")))?,
    }))
}

impl Engine {
    /// Starts the workers of `cfg`.
    pub fn launch(cfg: EngineConfig) -> Result<Self, EngineError> {
        if cfg.workers == 0 {
            return Err(EngineError::Config("workers must be at least 1".into()));
        }
        if !cfg.publication_ring_bytes.is_power_of_two() || cfg.publication_ring_bytes < 4096 {
            return Err(EngineError::Config(format!(
                "publication_ring_bytes {} must be a power of two of at least 4096",
                cfg.publication_ring_bytes
            )));
        }
        if cfg.invoker {
            return Self::launch_invoker(cfg);
        }
        let available = core_affinity::get_core_ids().unwrap_or_default();
        for &c in &cfg.cores {
            if !available.iter().any(|id| id.id == c) {
                return Err(EngineError::Config(format!(
                    "core {c} is not available to this process"
                )));
            }
        }
        let mut workers = Vec::with_capacity(cfg.workers);
        let mut backend = cfg.backend;
        for i in 0..cfg.workers {
            let wake = new_wake()?;
            let (tx, rx) = crossbeam_channel::unbounded();
            let (ready_tx, ready_rx) = crossbeam_channel::bounded(1);
            let core = (!cfg.cores.is_empty()).then(|| cfg.cores[i % cfg.cores.len()]);
            let (kind, gso, gro, busy) = (cfg.backend, cfg.gso, cfg.gro, cfg.busy_poll);
            let max_idle = std::time::Duration::from_micros(cfg.max_idle_us);
            let w = wake.clone();
            let thread = std::thread::Builder::new()
                .name(format!("intergroup-worker-{i}"))
                .spawn(move || {
                    if let Some(id) = core {
                        core_affinity::set_for_current(core_affinity::CoreId { id });
                    }
                    // The ring and its buffers are made on the thread that uses them.
                    match io::Io::open(kind, w.fd.fd()) {
                        Ok(io) => {
                            let _ = ready_tx.send(Ok(io.kind()));
                            Worker::new(io, w, rx, gso, gro, busy, max_idle).run();
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(EngineError::Io(format!("{kind} backend: {e}"))));
                        }
                    }
                })
                .map_err(|e| EngineError::Io(format!("spawn: {e}")))?;
            let started = ready_rx.recv().unwrap_or(Err(EngineError::Closed));
            let handle = WorkerHandle {
                commands: tx,
                wake,
                thread: Some(thread),
            };
            workers.push(handle);
            match started {
                Ok(kind) => backend = kind,
                Err(e) => {
                    // Workers already started are stopped by Drop.
                    drop(Engine {
                        cfg: cfg.clone(),
                        workers,
                        backend,
                        invoker: None,
                    });
                    return Err(e);
                }
            }
        }
        Ok(Self {
            cfg,
            workers,
            backend,
            invoker: None,
        })
    }

    fn launch_invoker(cfg: EngineConfig) -> Result<Self, EngineError> {
        let wake = new_wake()?;
        let (tx, rx) = crossbeam_channel::unbounded();
        let io = io::Io::open(cfg.backend, wake.fd.fd())
            .map_err(|e| EngineError::Io(format!("{} backend: {e}", cfg.backend)))?;
        let backend = io.kind();
        let max_idle = std::time::Duration::from_micros(cfg.max_idle_us);
        let worker = Worker::new(io, wake.clone(), rx, cfg.gso, cfg.gro, cfg.busy_poll, max_idle);
        Ok(Self {
            cfg,
            workers: vec![WorkerHandle {
                commands: tx,
                wake,
                thread: None,
            }],
            backend,
            invoker: Some(std::sync::Mutex::new(worker)),
        })
    }

    /// Invoker mode: runs one turn of the engine's duty cycle on this thread; returns whether it
    /// found work. Call it in the application's loop. Does nothing without invoker mode.
    pub fn invoke(&self) -> bool {
        match &self.invoker {
            Some(w) => w
                .lock()
                .map(|mut w| w.turn() == worker::Turn::Busy)
                .unwrap_or(false),
            None => false,
        }
    }

    /// Invoker mode: what to do after an [`invoke`](Self::invoke) that found nothing. Polls on
    /// for a short while (yielding), then sleeps until input, an offer, or the next timer, at
    /// most `timeout`.
    pub fn idle(&self, timeout: std::time::Duration) {
        if let Some(w) = &self.invoker {
            if let Ok(mut w) = w.lock() {
                w.idle_for(timeout);
            }
        }
    }

    /// The backend the workers use (`Auto` resolved).
    pub fn backend(&self) -> BackendKind {
        self.backend
    }

    fn worker(&self, group: u32) -> &WorkerHandle {
        &self.workers[group as usize % self.workers.len()]
    }

    fn ask<T>(
        &self,
        group: u32,
        make: impl FnOnce(Sender<Result<T, EngineError>>) -> Command,
    ) -> Result<T, EngineError> {
        let w = self.worker(group);
        let (tx, rx) = crossbeam_channel::bounded(1);
        w.commands.send(make(tx)).map_err(|_| EngineError::Closed)?;
        w.wake.fd.notify();
        if let Some(worker) = &self.invoker {
            // No thread to answer: run turns until the command is done.
            loop {
                if let Ok(reply) = rx.try_recv() {
                    return reply;
                }
                let mut worker = worker.lock().map_err(|_| EngineError::Closed)?;
                if worker.turn() == worker::Turn::Stop {
                    return Err(EngineError::Closed);
                }
            }
        }
        rx.recv().map_err(|_| EngineError::Closed)?
    }

    /// Joins a group: opens its sockets on the worker that owns its id and starts its member.
    pub fn join(&self, group: GroupConfig) -> Result<GroupInfo, EngineError> {
        group
            .member
            .validate()
            .map_err(|e| EngineError::Config(e.to_string()))?;
        let id = group.member.group;
        self.ask(id, |tx| Command::Join(Box::new(group), tx))
    }

    /// Calls `handler` on the worker thread with every delivery and in-stream event of `group`
    /// (in FIFO order). The output is lent, not moved: a message's payload is usually still in
    /// the receive buffer, and passing the output by reference keeps the path from the
    /// datagram to the handler free of copies.
    pub fn subscribe(
        &self,
        group: u32,
        handler: impl FnMut(&Output<'_>) + Send + 'static,
    ) -> Result<(), EngineError> {
        self.subscribe_ordered(group, Order::Fifo, handler)
    }

    /// Like [`subscribe`](Self::subscribe), in `order`: total and safe need a group joined
    /// with [`GroupConfig::membership`]. View events ([`crate::Event::View`]) come in the
    /// stream; a message's `sequence` is then its index among its sender's messages of the
    /// view and its `epoch` the view.
    pub fn subscribe_ordered(
        &self,
        group: u32,
        order: Order,
        handler: impl FnMut(&Output<'_>) + Send + 'static,
    ) -> Result<(), EngineError> {
        self.ask(group, |tx| {
            Command::Subscribe(group, order, Box::new(handler), tx)
        })
    }

    /// A publication of `group` on `stream`: a single-producer ring the owning worker reads,
    /// in this process's memory, or a file in [`EngineConfig::ring_dir`] when that is set.
    pub fn publication(&self, group: u32, stream: u32) -> Result<Publication, EngineError> {
        let ring_error = |e: intergroup_ring::Error| EngineError::Ring(e.to_string());
        // The worker's consumer treats a claim left uncommitted this long as abandoned; the
        // producer is this process, so that never happens while it lives.
        let abandon = std::time::Duration::from_secs(3600);
        let (mut producer, consumer) = match &self.cfg.ring_dir {
            None => intergroup_ring::records::anonymous_single(self.cfg.publication_ring_bytes, abandon)
                .map_err(ring_error)?,
            Some(dir) => {
                let path = dir.join(format!(
                    "intergroup-pub-{}-{}-{}-{}",
                    std::process::id(),
                    group,
                    stream,
                    RING_COUNTER.fetch_add(1, Ordering::Relaxed)
                ));
                intergroup_ring::records::create_with(
                    &path,
                    self.cfg.publication_ring_bytes,
                    Producers::Single,
                )
                .map_err(ring_error)?;
                let ends = SingleProducer::open(&path).and_then(|p| {
                    intergroup_ring::records::RecordConsumer::open(&path, abandon).map(|c| (p, c))
                });
                // Both ends hold the mapping now (or failed): the name is no longer needed.
                let _ = std::fs::remove_file(&path);
                ends.map_err(ring_error)?
            }
        };
        if self.cfg.publication_window_bytes > 0 {
            producer.set_window(self.cfg.publication_window_bytes);
        }
        let opened = self
            .ask(group, |tx| Command::Publication {
                group,
                stream,
                consumer: Box::new(consumer),
                reply: tx,
            })
            .map(|max| (producer, max));
        let (producer, (member_max, lend)) = opened?;
        let max = member_max.min(producer.max_payload().saturating_sub(PUBLICATION_HEADROOM));
        Ok(Publication {
            producer,
            wake: self.worker(group).wake.clone(),
            max_message: max,
            lend,
        })
    }

    /// Sends what a client process publishes into the broadcast log at `path` to the group on
    /// `stream`, whenever the group has remote receivers (local subscribers read the log
    /// themselves). Returns the group's largest message.
    pub fn log_publication(
        &self,
        group: u32,
        stream: u32,
        id: u64,
        path: PathBuf,
    ) -> Result<usize, EngineError> {
        self.ask(group, |reply| Command::LogPublication {
            group,
            stream,
            id,
            path,
            reply,
        })
    }

    /// Stops reading log publication `id` of `group` once what it holds has been sent.
    pub fn close_log_publication(&self, group: u32, id: u64) -> Result<(), EngineError> {
        self.tell(group, Command::CloseLogPublication(group, id))
    }

    /// Writes the group's deliveries on `stream`, and its loss events, into the (lossy)
    /// broadcast log at `path`, for subscribers in other processes.
    pub fn sink(&self, group: u32, stream: u32, order: Order, path: PathBuf) -> Result<(), EngineError> {
        self.ask(group, |reply| Command::Sink(group, stream, order, path, reply))
    }

    /// Stops writing the subscription log of `group`, `stream` and `order`.
    pub fn close_sink(&self, group: u32, stream: u32, order: Order) -> Result<(), EngineError> {
        self.tell(group, Command::CloseSink(group, stream, order))
    }

    fn tell(&self, group: u32, cmd: Command) -> Result<(), EngineError> {
        let w = self.worker(group);
        w.commands.send(cmd).map_err(|_| EngineError::Closed)?;
        w.wake.fd.notify();
        Ok(())
    }

    /// A snapshot of a group's counters.
    pub fn stats(&self, group: u32) -> Result<GroupStats, EngineError> {
        self.ask(group, |tx| Command::Stats(group, tx))
    }

    /// Moves a secured group to a later epoch: this member seals with the new epoch's keys
    /// from now on and still opens the previous epoch's datagrams (those in flight), nothing
    /// older. Every member of the group must be given the same epoch.
    pub fn rekey(&self, group: u32, epoch: crate::shield::ShieldEpoch) -> Result<(), EngineError> {
        self.ask(group, |tx| Command::Rekey(group, Box::new(epoch), tx))
    }

    /// Rolls a later version of an MLS-keyed group's signed policy out to this member: it must
    /// verify now (signature, signer, validity) and supersede the running one. Members it no
    /// longer lists are not heard any more and are left out of the next view, whose commit
    /// removes them from the MLS group; roles change with that epoch. Give it to every member.
    pub fn update_policy(&self, group: u32, policy: intergroup_secure::Policy) -> Result<(), EngineError> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        policy
            .verify(now)
            .map_err(|e| EngineError::Config(format!("policy refused: {e}")))?;
        self.ask(group, |tx| Command::UpdatePolicy(group, Box::new(policy), tx))
    }

    /// Makes this engine a sender of `group` at once (it heartbeats, so receivers find it and
    /// report their positions) and waits until at least `receivers` live receivers report to
    /// it, or `timeout` passes; returns whether they did. Aeron's `isConnected`, with a count.
    ///
    /// Flow control holds a sender back only for receivers it has heard from: before any
    /// reports it sends one window, and from the first report on it keeps pace with those that
    /// reported. A receiver that starts late, or stalls before its first report, can find the
    /// sender's first messages gone from its retransmit buffer (it gets
    /// [`Event::UnrecoverableLoss`](crate::Event::UnrecoverableLoss), not silence). A publisher
    /// that must lose nothing to receivers starting with it waits here before its first
    /// message.
    pub fn wait_receivers(
        &self,
        group: u32,
        receivers: usize,
        timeout: std::time::Duration,
    ) -> Result<bool, EngineError> {
        let deadline = std::time::Instant::now() + timeout;
        self.ask(group, |tx| Command::Announce(group, tx))?;
        self.wait_stats(group, deadline, |s| s.receivers >= receivers)
    }

    /// Waits until everything published on `group` has been acknowledged by at least
    /// `receivers` live receivers, or `timeout` passes; returns whether it was.
    pub fn wait_acknowledged(
        &self,
        group: u32,
        receivers: usize,
        timeout: std::time::Duration,
    ) -> Result<bool, EngineError> {
        let deadline = std::time::Instant::now() + timeout;
        self.wait_stats(group, deadline, |s| s.all_acknowledged(receivers))
    }

    /// Polls `group`'s stats until `done` holds for them (true) or `deadline` passes (false).
    fn wait_stats(
        &self,
        group: u32,
        deadline: std::time::Instant,
        done: impl Fn(&GroupStats) -> bool,
    ) -> Result<bool, EngineError> {
        loop {
            if done(&self.stats(group)?) {
                return Ok(true);
            }
            if std::time::Instant::now() >= deadline {
                return Ok(false);
            }
            self.pause(std::time::Duration::from_millis(2));
        }
    }

    /// Lets `d` pass: asleep with worker threads, running the duty cycle in invoker mode.
    fn pause(&self, d: std::time::Duration) {
        if self.invoker.is_none() {
            std::thread::sleep(d);
            return;
        }
        let until = std::time::Instant::now() + d;
        while std::time::Instant::now() < until {
            if !self.invoke() {
                self.idle(until.saturating_duration_since(std::time::Instant::now()));
            }
        }
    }

    /// Stops the workers, closes every socket and joins every thread.
    pub fn close(self) {
        drop(self)
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        for w in &self.workers {
            w.wake.closed.store(true, Ordering::SeqCst);
            let _ = w.commands.send(Command::Shutdown);
            w.wake.fd.notify();
        }
        for w in &mut self.workers {
            if let Some(t) = w.thread.take() {
                let _ = t.join();
            }
        }
    }
}

/// A publication: messages offered here go to the group on one stream, in order.
pub struct Publication {
    producer: SingleProducer,
    wake: Arc<Wake>,
    max_message: usize,
    /// Messages of these lengths get headroom: the worker sends them from the ring.
    lend: LendLengths,
}

/// The lengths of messages the worker sends from where they lie in a publication's ring (one
/// frame each, too large to share a datagram): `above < len <= max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LendLengths {
    pub(crate) above: usize,
    pub(crate) max: usize,
}

impl LendLengths {
    /// No message is sent from the ring (secured groups, groups with membership).
    pub(crate) const NONE: Self = Self { above: 0, max: 0 };

    fn contains(self, len: usize) -> bool {
        len > self.above && len <= self.max
    }
}

/// Record type of a message in a publication's ring.
pub(crate) const MESSAGE_RECORD: u32 = 0;
/// Record type of a message behind [`PUBLICATION_HEADROOM`] bytes of headroom.
pub(crate) const LENT_RECORD: u32 = 1;

impl std::fmt::Debug for Publication {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publication")
            .field("max_message", &self.max_message)
            .finish()
    }
}

/// Bytes in front of a message in an embedded publication's ring that the worker sends from
/// there ([`crate::proto::Member::publish_lent`]): room for its datagram and frame headers,
/// rounded up so messages stay 8-aligned.
pub(crate) const PUBLICATION_HEADROOM: usize = crate::proto::LENT_HEADROOM.next_multiple_of(8);

/// What a refused claim of a `len`-byte message means to the application: the ring's lengths
/// include headroom, so a record too large is reported with the message's length and the
/// publication's largest message.
fn offer_error(e: RingOfferError, len: usize, max: usize) -> OfferError {
    match e {
        RingOfferError::TooLarge { .. } => OfferError::TooLarge { len, max },
        _ => OfferError::BackPressured,
    }
}

impl Publication {
    /// Largest message this publication takes.
    pub fn max_message(&self) -> usize {
        self.max_message
    }

    /// Copies `message` into the publication.
    pub fn offer(&mut self, message: &[u8]) -> Result<(), OfferError> {
        // A burst of one: the worker is signalled as it ends, right after the commit.
        self.burst().offer(message)
    }

    /// Claims room for a message of `len` bytes, written in place and sent on
    /// [`Claim::commit`]; dropped uncommitted, it is skipped.
    ///
    /// This, [`Claim::buf`], [`Claim::commit`] and the ring's claim path under them are
    /// `#[inline]` so an application's publishing loop (another crate) compiles them in: called
    /// apart, each returned its claim through the stack and the caller's wide load of it waited
    /// on store forwarding (the bench's publishing thread spent about 27 ns less per 64 B
    /// message inlined; docs/performance.md, twentieth set).
    #[inline]
    pub fn try_claim(&mut self, len: usize) -> Result<Claim<'_>, OfferError> {
        self.claim(len, None)
    }

    /// Starts a burst: offers through it signal the worker once, when the burst ends, instead
    /// of after each message (see [`Burst`]).
    #[inline]
    pub fn burst(&mut self) -> Burst<'_> {
        Burst {
            publication: self,
            pending: false,
        }
    }

    /// A claim that wakes the worker on commit, or, with `pending`, marks a burst's wake due.
    #[inline]
    fn claim<'a>(&'a mut self, len: usize, pending: Option<&'a mut bool>) -> Result<Claim<'a>, OfferError> {
        self.check(len)?;
        let (kind, room) = if self.lend.contains(len) {
            (LENT_RECORD, PUBLICATION_HEADROOM)
        } else {
            (MESSAGE_RECORD, 0)
        };
        let claim = match self.producer.try_claim(kind, room + len) {
            Ok(claim) => claim,
            Err(e) => {
                // A burst's publisher may now wait for room: not on a worker that sleeps.
                if let Some(pending) = pending.filter(|p| **p) {
                    *pending = false;
                    self.wake.after_offer();
                }
                return Err(offer_error(e, len, self.max_message));
            }
        };
        Ok(Claim {
            claim,
            room,
            wake: &self.wake,
            pending,
        })
    }

    #[inline]
    fn check(&self, len: usize) -> Result<(), OfferError> {
        if self.wake.closed.load(Ordering::Relaxed) {
            return Err(OfferError::Closed);
        }
        if len > self.max_message {
            return Err(OfferError::TooLarge {
                len,
                max: self.max_message,
            });
        }
        Ok(())
    }
}

/// Offers of one publication that signal its worker once, as the burst ends (on drop), or
/// when an offer finds the ring full, instead of after every message.
///
/// Telling a worker that may be asleep about a message takes a full memory fence after the
/// record is published (the worker's `parked` flag is read only after it); for a publisher
/// that offers many messages in a row, most of what it spends per message. In a burst, the
/// records are published as they are committed, so a worker that is running takes them at
/// once; a sleeping one is woken at the end of the burst. Keep bursts short (a loop of tens of
/// offers): a message waits for the end of its burst if the worker sleeps.
#[derive(Debug)]
pub struct Burst<'a> {
    publication: &'a mut Publication,
    /// A message was committed since the worker was last signalled.
    pending: bool,
}

impl Burst<'_> {
    /// [`Publication::try_claim`] within the burst. When the ring is full the worker is
    /// signalled first, so a publisher that then waits for room does not wait on a worker
    /// that sleeps.
    #[inline]
    pub fn try_claim(&mut self, len: usize) -> Result<Claim<'_>, OfferError> {
        self.publication.claim(len, Some(&mut self.pending))
    }

    /// [`Publication::offer`] within the burst.
    pub fn offer(&mut self, message: &[u8]) -> Result<(), OfferError> {
        let mut claim = self.try_claim(message.len())?;
        claim.buf().copy_from_slice(message);
        claim.commit();
        Ok(())
    }
}

impl Drop for Burst<'_> {
    fn drop(&mut self) {
        if self.pending {
            self.publication.wake.after_offer();
        }
    }
}

/// Room for one message in a publication.
#[derive(Debug)]
pub struct Claim<'a> {
    claim: SingleClaim<'a>,
    /// Headroom in front of the message.
    room: usize,
    wake: &'a Wake,
    /// In a burst: set on commit, and the burst signals the worker.
    pending: Option<&'a mut bool>,
}

impl Claim<'_> {
    /// The message's bytes, to fill in place.
    #[inline]
    pub fn buf(&mut self) -> &mut [u8] {
        &mut self.claim.buf()[self.room..]
    }

    /// Sends the message.
    #[inline]
    pub fn commit(self) {
        self.claim.commit();
        match self.pending {
            Some(pending) => *pending = true,
            None => self.wake.after_offer(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sys::EventFd;

    /// A publication on a ring of `capacity` bytes, with the wake a worker would hold.
    fn publication(dir: &tempfile::TempDir, capacity: u64) -> Publication {
        let path = dir.path().join("ring");
        intergroup_ring::records::create_with(&path, capacity, Producers::Single).expect("ring");
        Publication {
            producer: SingleProducer::open(&path).expect("producer"),
            wake: Arc::new(Wake {
                parked: AtomicBool::new(false),
                closed: AtomicBool::new(false),
                fd: EventFd::new().expect("eventfd"),
            }),
            max_message: 1024,
            lend: LendLengths::NONE,
        }
    }

    #[test]
    fn a_burst_wakes_a_sleeping_worker_once_as_it_ends() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut p = publication(&dir, 1 << 16);
        let wake = p.wake.clone();
        // One offer alone wakes at once.
        wake.parked.store(true, Ordering::Relaxed);
        p.offer(&[1; 64]).expect("offer");
        assert_eq!(wake.fd.drain(), 1);
        assert!(!wake.parked.load(Ordering::Relaxed));
        // A burst: nothing until it ends, then once.
        wake.parked.store(true, Ordering::Relaxed);
        let mut burst = p.burst();
        for i in 0..5u8 {
            burst.offer(&[i; 64]).expect("offer");
            assert_eq!(wake.fd.drain(), 0, "woken by offer {i}");
        }
        assert!(wake.parked.load(Ordering::Relaxed));
        drop(burst);
        assert_eq!(wake.fd.drain(), 1);
        assert!(!wake.parked.load(Ordering::Relaxed));
        // A burst that committed nothing (a claim dropped uncommitted) signals nothing.
        wake.parked.store(true, Ordering::Relaxed);
        let mut burst = p.burst();
        drop(burst.try_claim(64).expect("claim"));
        drop(burst);
        assert_eq!(wake.fd.drain(), 0);
    }

    #[test]
    fn a_burst_wakes_a_sleeping_worker_before_its_publisher_waits_for_room() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut p = publication(&dir, 4096);
        let wake = p.wake.clone();
        wake.parked.store(true, Ordering::Relaxed);
        let mut burst = p.burst();
        let mut offered = 0;
        let refused = loop {
            match burst.offer(&[7; 256]) {
                Ok(()) => offered += 1,
                Err(e) => break e,
            }
            assert_eq!(wake.fd.drain(), 0, "woken by offer {offered}");
        };
        assert_eq!(refused, OfferError::BackPressured);
        assert!(offered > 0);
        // The full ring woke the worker, which has every committed record to read.
        assert_eq!(wake.fd.drain(), 1);
        assert!(!wake.parked.load(Ordering::Relaxed));
        // Refused again, with nothing committed since: no second signal, and none at the end.
        wake.parked.store(true, Ordering::Relaxed);
        assert_eq!(burst.offer(&[7; 256]), Err(OfferError::BackPressured));
        drop(burst);
        assert_eq!(wake.fd.drain(), 0);
    }
}
