//! One worker thread: its I/O backend, its sockets, its shard of groups, a timer heap, and the
//! loop that drives them. Nothing on the data path takes a lock; the application reaches the
//! worker through rings (publications), a command channel (set-up) and an eventfd (wake-up).

use super::io::{push_iov, Io, Received, Send, SendBatch};
use super::proto::Proto;
use super::sys::{self, EventFd};
use super::{
    EngineError, GroupConfig, GroupInfo, GroupStats, Handler, LendLengths, LENT_RECORD, PUBLICATION_HEADROOM,
};
use crate::group::{GroupMember, Order};
use crate::proto::{Destination, Lent, Member, Nanos, Output, LENT_HEADROOM};
use crate::shield::{Shield, ShieldEpoch, SEAL_OVERHEAD, SIGN_OVERHEAD};
use crate::transport::{open_sockets, ReceiveLoss, TransportStats};
use crate::wire;
use crossbeam_channel::{Receiver, Sender};
use intergroup_ring::{BroadcastProducer, BroadcastReader, RecordConsumer};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Bytes of datagrams built before they are handed to the kernel in one round.
const ARENA_BYTES: usize = 256 << 10;
/// Most records taken from one publication ring (or a client's log) per turn.
const READ_BATCH: usize = 1024;
/// Bytes of records taken from one publication ring per turn (estimated from the sizes of the
/// last batch): what a turn frames into the retransmit log it also sends, and the kernel's copy
/// of it finds it still in the cache. With 1024 records of 1 KiB a turn framed 1 MiB ahead of
/// its sends, and the copy waited for lines that had left the cache.
const READ_BYTES: usize = 256 << 10;
/// The worker moves records from a publication ring into its member only while the member
/// holds fewer bytes than this: the ring is the queue, and a small send queue stays in cache
/// (and empties often, so its memory is reused from the start).
const SEND_QUEUE_LOW_WATER: usize = 64 << 10;
/// How long an idle worker keeps polling (yielding between turns) before it sleeps: work often
/// comes again within microseconds, and a wake-up costs the waker and the sleeper more.
const IDLE_SPIN_NS: Nanos = 50_000;
/// The same while the worker carries a stream of traffic (see [`BULK_TURN_ITEMS`]): the next
/// datagrams or records are microseconds away, and a worker that sleeps between them makes its
/// peers pay a wake-up for each batch and lets its core go idle. On a virtual machine an idle
/// core is also a core the hypervisor may give away: at 1 KiB on two cores, sleeping at once
/// between batches left 10-20% of the host idle and ran into 4-40% steal. Polling this long
/// raised `bench udp`'s rate in 9 of 14 interleaved pairs (medians 1.68 against 1.65 M msgs/s;
/// the slowest run 1.15 against 0.46), and at 64 B in 4 of 4, although each subscriber spends
/// about 15 ns more user time per message on it.
const STREAM_SPIN_NS: Nanos = 200_000;
/// A turn that handled at least this many datagrams and records was part of a stream of
/// traffic: the worker will have work again soon, and polls for it for [`STREAM_SPIN_NS`].
/// Sparser traffic (a request and its reply, one at a time) polls for [`IDLE_SPIN_NS`].
const BULK_TURN_ITEMS: usize = 8;
/// How long after such a turn the worker counts as carrying a stream.
const BULK_NS: Nanos = 1_000_000;
/// Longest a worker sleeps when no timer is due, so a lost wake-up costs little (a setting
/// can make it shorter: publications in other processes cannot wake the worker).
const MAX_IDLE: Duration = Duration::from_millis(50);
/// Bytes of delivery metadata before each message in a subscription log (see [`SinkRecord`]).
pub const SINK_META_LEN: usize = 24;

/// Record types of a subscription log written by a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum SinkRecord {
    /// `sender: u32, stream: u32, sequence: u64, view: u64`, then the message.
    Message = 1,
    /// Unrecoverable loss: `sender: u32, 0: u32, first: u64, count: u64`.
    Loss = 2,
    /// (Groups with membership) a view: `view: u32, coordinator: u32, members: u32,
    /// flags: u32` (bit 0 primary, bit 1 joined: this member missed the history).
    View = 3,
    /// (Safe order) the view ends; the rest is held by the survivors: `members: u32`.
    Transitional = 4,
    /// (Groups with membership) this member left: four zero bytes.
    Left = 5,
}

/// How the application wakes a sleeping worker.
#[derive(Debug)]
pub struct Wake {
    /// Set by the worker before it sleeps; whoever hands it work then notifies.
    pub parked: AtomicBool,
    /// Set when the engine closes: publications refuse further offers.
    pub closed: AtomicBool,
    /// The eventfd the worker's I/O waits on.
    pub fd: EventFd,
}

impl Wake {
    /// Called after handing the worker work (a committed record): wakes it if it sleeps.
    #[inline]
    pub fn after_offer(&self) {
        // Pairs with the fence in `Worker::park`: either the worker sees the record, or this
        // sees `parked` and wakes it.
        fence(Ordering::SeqCst);
        // Only the first offer after the worker parked notifies: the eventfd stays readable
        // until the worker runs, and offers made while it gets back to work (tens of
        // microseconds when the cores are busy) would otherwise each make a system call.
        if self.parked.load(Ordering::Relaxed) && self.parked.swap(false, Ordering::Relaxed) {
            self.fd.notify();
        }
    }
}

/// What the engine asks of a worker.
pub enum Command {
    /// Open the sockets of a group and start its member.
    Join(Box<GroupConfig>, Sender<Result<GroupInfo, EngineError>>),
    /// Read a publication ring.
    Publication {
        /// Group id.
        group: u32,
        /// Stream the ring's messages go on.
        stream: u32,
        /// The ring's consumer end, opened by the engine (the ring is this process's memory,
        /// or a file it has mapped and unlinks once the reply is sent).
        consumer: Box<RecordConsumer>,
        /// Reply: the group's largest message, and which messages the worker sends from the
        /// ring (so their records carry headroom).
        reply: Sender<Result<(usize, LendLengths), EngineError>>,
    },
    /// Hand every delivery and in-stream event of a group, in an order, to a handler.
    Subscribe(u32, Order, Handler, Sender<Result<(), EngineError>>),
    /// Read a publication's broadcast log (written by a client process) whenever the group has
    /// remote receivers: local subscribers read the log themselves.
    LogPublication {
        /// Group id.
        group: u32,
        /// Stream the log's messages go on.
        stream: u32,
        /// The publication's id.
        id: u64,
        /// The log file.
        path: PathBuf,
        /// Reply: the group's largest message.
        reply: Sender<Result<usize, EngineError>>,
    },
    /// Stop reading a log publication once what it holds is sent (its client left).
    CloseLogPublication(u32, u64),
    /// Write the group's deliveries on `stream` (and its loss events) into the broadcast log
    /// at the path, for subscribers in other processes.
    Sink(u32, u32, Order, PathBuf, Sender<Result<(), EngineError>>),
    /// Stop writing that log.
    CloseSink(u32, u32, Order),
    /// Counters of a group.
    Stats(u32, Sender<Result<GroupStats, EngineError>>),
    /// Make the group's member a sender now, before its first message: it heartbeats, so
    /// receivers find it and report to it.
    Announce(u32, Sender<Result<(), EngineError>>),
    /// Move a secured group to a later epoch.
    Rekey(u32, Box<ShieldEpoch>, Sender<Result<(), EngineError>>),
    /// Take a later policy version of an MLS-keyed group.
    UpdatePolicy(
        u32,
        Box<intergroup_secure::Policy>,
        Sender<Result<(), EngineError>>,
    ),
    /// Stop: the worker returns after closing everything.
    Shutdown,
}

struct Publication {
    stream: u32,
    source: Source,
    /// Records read while the member's send queue was full, in order, published first.
    overflow: Vec<Vec<u8>>,
    /// Mean size of the records of the last batch, bytes (1 before the first: no byte limit).
    /// Only a ring's batches use it: a client's log is read by count (see [`Publication::batch`]).
    record_bytes: usize,
    /// A ring's records whose frames the member sends from where they lie, oldest first:
    /// (sequence, ring position). The ring holds each, and every record after it, until the
    /// member no longer holds the sequence (see [`release_lent`]).
    held: VecDeque<(u64, u64)>,
}

impl Publication {
    fn new(stream: u32, source: Source) -> Self {
        Self {
            stream,
            source,
            overflow: Vec::new(),
            record_bytes: 1,
            held: VecDeque::new(),
        }
    }

    /// Most records to take now when the member has `room` for that many (see
    /// [`Proto::publish_room`]): a ring keeps the rest, and its producer feels the back-pressure;
    /// a client's log must be read on, or its slowest readers would be evicted.
    fn batch(&self, room: usize, shape: Shape) -> usize {
        match self.source {
            Source::Ring(_) => ring_batch(room, self.record_bytes, shape),
            Source::Log { .. } => READ_BATCH,
        }
    }
}

/// Where a publication's messages come from.
enum Source {
    /// A ring only this worker reads (an embedded publication).
    Ring(RecordConsumer),
    /// A client's broadcast log, which local subscribers read too. The worker joins it as a
    /// reader only while the group has remote receivers, so a host without remote members
    /// pays nothing for the network.
    Log {
        id: u64,
        path: PathBuf,
        reader: Option<BroadcastReader>,
        /// The client left: send what is left, then drop the log.
        closing: bool,
    },
}

impl Source {
    fn is_empty(&self) -> bool {
        match self {
            Source::Ring(c) => c.is_empty(),
            Source::Log { reader, .. } => reader.as_ref().is_none_or(|r| !r.has_records()),
        }
    }
}

/// Where a lent datagram starts in a record of an embedded publication: its headers end where
/// the message starts, after the publication's headroom.
const LENT_PAD: usize = PUBLICATION_HEADROOM - LENT_HEADROOM;

/// What a group's datagrams look like, for sizing a turn's batch of records.
#[derive(Debug, Clone, Copy)]
struct Shape {
    /// Largest payload of one data frame.
    max_frame: usize,
    /// Bytes a datagram of one data frame adds to its payload: headers, and the seal of a
    /// secured group.
    overhead: usize,
}

/// Records to take from a ring in one turn: [`READ_BYTES`] of records of `record_bytes`, at
/// least one, at most [`READ_BATCH`] and `room`.
///
/// Records that each fill a datagram alone (over half a frame) leave in GSO sends of as many
/// equal datagrams as one send takes; the batch is then cut to a whole number of such sends,
/// so that a turn does not end with a short one: each send costs the sender and every
/// receiver a buffer, a completion and a pass through the stack, whatever it carries. At 1 KiB a
/// quarter MiB was 256 records, sent as four sends of 60 and one of 16 (51.2 a send; the raw
/// ceiling sends 63); cut to 240, every send carries 60. Over 16 interleaved pairs the engine
/// then took a median 785 against 816 ns of CPU per message, at a median `ratio_to_raw` of
/// 0.645 against 0.600 (docs/performance.md, fourteenth set).
fn ring_batch(room: usize, record_bytes: usize, shape: Shape) -> usize {
    let mut n = (READ_BYTES / record_bytes.max(1)).clamp(1, READ_BATCH);
    if record_bytes > shape.max_frame / 2 && record_bytes <= shape.max_frame {
        let per_send = (sys::MAX_GSO_BYTES / (record_bytes + shape.overhead)).clamp(1, sys::MAX_GSO_SEGMENTS);
        if n >= per_send {
            n -= n % per_send;
        }
    }
    n.min(room)
}

/// A subscription log this worker writes.
struct Sink {
    stream: u32,
    order: Order,
    producer: BroadcastProducer,
}

/// Hands one output of a group, delivered in `order`, to the handlers and sinks of that order.
#[inline]
fn hand_out(
    handlers: &mut [(Order, Handler)],
    sinks: &mut [Sink],
    written: &mut u64,
    order: Order,
    out: &Output<'_>,
) {
    for (o, h) in handlers.iter_mut() {
        if *o == order {
            h(out);
        }
    }
    // Most engines deliver to handlers only: no call per message for the sinks they lack.
    if !sinks.is_empty() {
        write_sinks(sinks, order, out, written);
    }
}

/// Writes one output of a group, delivered in `order`, into the sinks of that order.
fn write_sinks(sinks: &mut [Sink], order: Order, out: &Output<'_>, written: &mut u64) {
    match out {
        Output::Message(m) => {
            for s in sinks
                .iter_mut()
                .filter(|s| s.stream == m.stream && s.order == order)
            {
                let len = SINK_META_LEN + m.payload.len();
                // A message larger than the log's records cannot be handed on; the lossy log
                // never refuses otherwise.
                if let Ok(mut c) = s.producer.try_claim(SinkRecord::Message as u32, len) {
                    let buf = c.buf();
                    buf[0..4].copy_from_slice(&m.sender.to_le_bytes());
                    buf[4..8].copy_from_slice(&m.stream.to_le_bytes());
                    buf[8..16].copy_from_slice(&m.sequence.to_le_bytes());
                    buf[16..24].copy_from_slice(&u64::from(m.epoch).to_le_bytes());
                    buf[24..].copy_from_slice(m.payload);
                    c.commit();
                    *written += 1;
                }
            }
        }
        Output::Event(crate::Event::UnrecoverableLoss { sender, first, count }) => {
            let mut rec = [0u8; 24];
            rec[0..4].copy_from_slice(&sender.to_le_bytes());
            rec[8..16].copy_from_slice(&first.to_le_bytes());
            rec[16..24].copy_from_slice(&count.to_le_bytes());
            for s in sinks.iter_mut().filter(|s| s.order == order) {
                let _ = s.producer.offer(SinkRecord::Loss as u32, &rec);
            }
        }
        Output::Event(crate::Event::View {
            view,
            coordinator,
            members,
            primary,
            joined,
        }) => {
            let mut rec = [0u8; 16];
            rec[0..4].copy_from_slice(&view.to_le_bytes());
            rec[4..8].copy_from_slice(&coordinator.to_le_bytes());
            rec[8..12].copy_from_slice(&members.to_le_bytes());
            let flags = u32::from(*primary) | u32::from(*joined) << 1;
            rec[12..16].copy_from_slice(&flags.to_le_bytes());
            for s in sinks.iter_mut().filter(|s| s.order == order) {
                let _ = s.producer.offer(SinkRecord::View as u32, &rec);
            }
        }
        Output::Event(crate::Event::Transitional { members }) => {
            for s in sinks.iter_mut().filter(|s| s.order == order) {
                let _ = s
                    .producer
                    .offer(SinkRecord::Transitional as u32, &members.to_le_bytes());
            }
        }
        Output::Event(crate::Event::Left) => {
            for s in sinks.iter_mut().filter(|s| s.order == order) {
                let _ = s.producer.offer(SinkRecord::Left as u32, &[0u8; 4]);
            }
        }
        Output::Event(_) => {}
    }
}

struct Group {
    id: u32,
    /// Declared before `publications`, so dropped first: frames lent to it lie in their rings.
    proto: Proto,
    _group_socket: Option<UdpSocket>,
    unicast: UdpSocket,
    /// Where group datagrams go: the multicast group, or each unicast peer.
    group_dests: Vec<libc::sockaddr_in>,
    loss: Option<ReceiveLoss>,
    publications: Vec<Publication>,
    handlers: Vec<(Order, Handler)>,
    sinks: Vec<Sink>,
    /// Messages written into sinks.
    sunk: u64,
    stats: TransportStats,
    /// The deadline this group's entry in the timer heap stands for.
    deadline: Option<Nanos>,
    /// Something happened to this group in this turn: its timer and transmits need a look.
    touched: bool,
    /// Seals and opens every datagram of a secured group.
    shield: Option<Shield>,
    /// The member sends one-frame messages of embedded publications from their rings (a plain
    /// member of a group that is not secured: sealed datagrams are built in the send arena).
    lends: bool,
    /// Messages sent from their publication ring.
    lent: u64,
    /// Ring records too short to hold a message behind its headroom, skipped.
    malformed_records: u64,
}

impl Group {
    fn shape(&self) -> Shape {
        Shape {
            max_frame: self.proto.config().max_frame_payload(),
            overhead: wire::DATAGRAM_HEADER_LEN
                + wire::DATA_FRAME_OVERHEAD
                + self.shield.as_ref().map_or(0, Shield::max_overhead),
        }
    }
}

/// The worker's state.
pub struct Worker {
    io: Io,
    wake: Arc<Wake>,
    commands: Receiver<Command>,
    groups: Vec<Group>,
    /// Receive tokens: `token >> 1` is the group index.
    timers: BinaryHeap<Reverse<(Nanos, usize)>>,
    batch: SendBatch,
    scratch: Scratch,
    gso: bool,
    gro: bool,
    busy_poll: bool,
    max_idle: Duration,
    epoch: Instant,
    /// Messages a full send queue pushed back (kept in the overflow, never lost).
    pushed_back: u64,
    /// When the last turn ran, and the last turn that found work.
    last_turn: Nanos,
    last_busy: Nanos,
    /// Datagrams and records handled in this turn so far.
    turn_items: usize,
    /// Until then the worker carries a stream of traffic.
    bulk_until: Nanos,
}

/// What a turn found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Turn {
    /// Work was done; turn again.
    Busy,
    /// Nothing to do.
    Idle,
    /// The engine stopped this worker.
    Stop,
}

impl Worker {
    /// A worker on `io`.
    pub fn new(
        io: Io,
        wake: Arc<Wake>,
        commands: Receiver<Command>,
        gso: bool,
        gro: bool,
        busy_poll: bool,
        max_idle: Duration,
    ) -> Self {
        Self {
            max_idle: max_idle.min(MAX_IDLE),
            io,
            wake,
            commands,
            groups: Vec::new(),
            timers: BinaryHeap::new(),
            batch: SendBatch::with_capacity(ARENA_BYTES),
            scratch: Scratch::default(),
            gso,
            gro,
            busy_poll,
            epoch: Instant::now(),
            pushed_back: 0,
            last_turn: 0,
            last_busy: 0,
            turn_items: 0,
            bulk_until: 0,
        }
    }

    fn now(&self) -> Nanos {
        self.epoch.elapsed().as_nanos() as Nanos
    }

    /// Runs until [`Command::Shutdown`] or until the engine's side of the channel is gone.
    pub fn run(mut self) {
        loop {
            match self.turn() {
                Turn::Stop => return,
                Turn::Busy => {}
                Turn::Idle => self.idle(),
            }
        }
    }

    /// One turn of the duty cycle: commands, publications, receives, timers, sends,
    /// deliveries. Never blocks.
    pub fn turn(&mut self) -> Turn {
        let mut busy = false;
        loop {
            match self.commands.try_recv() {
                Ok(Command::Shutdown) | Err(crossbeam_channel::TryRecvError::Disconnected) => {
                    return Turn::Stop
                }
                Ok(cmd) => {
                    self.command(cmd);
                    busy = true;
                }
                Err(crossbeam_channel::TryRecvError::Empty) => break,
            }
        }
        // One clock read per turn: everything in a turn happens at about the same time.
        let now = self.now();
        busy |= self.take_publications();
        busy |= self.receive(now);
        self.run_timers(now);
        busy |= self.transmit(now);
        busy |= self.release_lent(now);
        busy |= self.deliver();
        self.rearm_timers();
        self.last_turn = now;
        if std::mem::take(&mut self.turn_items) >= BULK_TURN_ITEMS {
            self.bulk_until = now + BULK_NS;
        }
        if busy {
            self.last_busy = now;
            Turn::Busy
        } else {
            Turn::Idle
        }
    }

    /// After an idle turn: keep polling for a while (yielding between turns, so other threads
    /// of the core run), longer while a stream is on (see [`sleep_now`]), then sleep until
    /// input, a wake-up or the next timer. Busy-poll never sleeps.
    pub fn idle(&mut self) {
        // Busy-poll yields too: on a host with fewer cores than spinning threads, a spinner that
        // never yields holds a core for a whole time slice while the thread it waits for
        // cannot run.
        self.idle_for(self.max_idle);
    }

    /// Like [`idle`](Self::idle), sleeping at most `timeout`.
    pub fn idle_for(&mut self, timeout: Duration) {
        let now = self.last_turn;
        if self.busy_poll {
            std::thread::yield_now();
        } else if sleep_now(now, self.last_busy, self.bulk_until) {
            self.park_for(now, timeout.min(self.max_idle));
        } else {
            std::thread::yield_now();
        }
    }

    fn group_index(&self, id: u32) -> Option<usize> {
        self.groups.iter().position(|g| g.id == id)
    }

    /// The index of `group` if it offers `order` (total and safe need membership).
    fn offering(&self, group: u32, order: Order) -> Result<usize, EngineError> {
        let i = self.group_index(group).ok_or(EngineError::UnknownGroup(group))?;
        if order != Order::Fifo && !self.groups[i].proto.has_membership() {
            return Err(EngineError::Config(format!(
                "group {group} has no membership: only fifo order is offered"
            )));
        }
        Ok(i)
    }

    fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Join(cfg, reply) => {
                let _ = reply.send(self.join(*cfg));
            }
            Command::Publication {
                group,
                stream,
                consumer,
                reply,
            } => {
                let r = match self.group_index(group) {
                    None => Err(EngineError::UnknownGroup(group)),
                    Some(i) => {
                        let g = &mut self.groups[i];
                        g.publications
                            .push(Publication::new(stream, Source::Ring(*consumer)));
                        let cfg = g.proto.config();
                        let max_frame = cfg.max_frame_payload();
                        let lend = if g.lends {
                            LendLengths {
                                above: max_frame / 2,
                                max: max_frame,
                            }
                        } else {
                            LendLengths::NONE
                        };
                        Ok((cfg.max_message_bytes, lend))
                    }
                };
                let _ = reply.send(r);
            }
            Command::Subscribe(group, order, handler, reply) => {
                let r = self
                    .offering(group, order)
                    .map(|i| self.groups[i].handlers.push((order, handler)));
                let _ = reply.send(r);
            }
            Command::LogPublication {
                group,
                stream,
                id,
                path,
                reply,
            } => {
                let r = match self.group_index(group) {
                    None => Err(EngineError::UnknownGroup(group)),
                    Some(i) => {
                        // Heartbeats from now on: remote receivers find us and report, and
                        // the worker starts reading the log once one does.
                        self.groups[i].proto.announce();
                        self.groups[i].publications.push(Publication::new(
                            stream,
                            Source::Log {
                                id,
                                path,
                                reader: None,
                                closing: false,
                            },
                        ));
                        self.groups[i].touched = true;
                        Ok(self.groups[i].proto.config().max_message_bytes)
                    }
                };
                let _ = reply.send(r);
            }
            Command::CloseLogPublication(group, pub_id) => {
                if let Some(i) = self.group_index(group) {
                    for p in &mut self.groups[i].publications {
                        if let Source::Log { id, closing, .. } = &mut p.source {
                            if *id == pub_id {
                                *closing = true;
                            }
                        }
                    }
                    self.groups[i].touched = true;
                }
            }
            Command::Sink(group, stream, order, path, reply) => {
                let r = match self.offering(group, order) {
                    Err(e) => Err(e),
                    Ok(i) => match BroadcastProducer::open(&path, Duration::from_secs(3600)) {
                        Ok(producer) => {
                            self.groups[i].sinks.push(Sink {
                                stream,
                                order,
                                producer,
                            });
                            Ok(())
                        }
                        Err(e) => Err(EngineError::Ring(e.to_string())),
                    },
                };
                let _ = reply.send(r);
            }
            Command::CloseSink(group, stream, order) => {
                if let Some(i) = self.group_index(group) {
                    self.groups[i]
                        .sinks
                        .retain(|s| s.stream != stream || s.order != order);
                }
            }
            Command::Announce(group, reply) => {
                let r = match self.group_index(group) {
                    None => Err(EngineError::UnknownGroup(group)),
                    Some(i) => {
                        self.groups[i].proto.announce();
                        self.groups[i].touched = true;
                        Ok(())
                    }
                };
                let _ = reply.send(r);
            }
            Command::Stats(group, reply) => {
                let r = match self.group_index(group) {
                    None => Err(EngineError::UnknownGroup(group)),
                    Some(i) => {
                        let g = &self.groups[i];
                        let (receivers, acked) = g.proto.acknowledged();
                        Ok(GroupStats {
                            backend: self.io.kind(),
                            gso: self.gso,
                            gro: self.gro,
                            counters: g.proto.counters().clone(),
                            receive_buffer_shortages: self.io.receive_buffer_shortages(),
                            transport: g.stats,
                            next_sequence: g.proto.next_sequence(),
                            queued_bytes: g.proto.queued_bytes()
                                + g.publications
                                    .iter()
                                    .flat_map(|p| p.overflow.iter())
                                    .map(Vec::len)
                                    .sum::<usize>(),
                            unread_publications: g.publications.iter().any(|p| !p.source.is_empty()),
                            receivers,
                            acknowledged: acked,
                            pushed_back: self.pushed_back,
                            sunk: g.sunk,
                            lent: g.lent,
                            malformed_records: g.malformed_records,
                            secure: g.shield.as_ref().map(|s| s.stats().clone()),
                            keys: match &g.proto {
                                Proto::Group(m) => m.key_stats().cloned(),
                                Proto::Plain(_) => None,
                            },
                            // Commands run on the worker's own thread.
                            worker_cpu: super::ThreadCpu::now(),
                        })
                    }
                };
                let _ = reply.send(r);
            }
            Command::UpdatePolicy(group, policy, reply) => {
                let r = match self.group_index(group) {
                    None => Err(EngineError::UnknownGroup(group)),
                    Some(i) => {
                        let g = &mut self.groups[i];
                        g.touched = true;
                        match (&mut g.proto, g.shield.as_mut()) {
                            (Proto::Group(m), Some(shield)) => m
                                .update_policy(*policy)
                                .map(|roster| shield.set_roster(roster))
                                .map_err(|e| EngineError::Config(e.to_string())),
                            _ => Err(EngineError::Config(format!("group {group} is not keyed by MLS"))),
                        }
                    }
                };
                let _ = reply.send(r);
            }
            Command::Rekey(group, epoch, reply) => {
                let r = match self.group_index(group) {
                    None => Err(EngineError::UnknownGroup(group)),
                    Some(i) => rekey(&mut self.groups[i], *epoch),
                };
                let _ = reply.send(r);
            }
            Command::Shutdown => {}
        }
    }

    fn join(&mut self, mut cfg: GroupConfig) -> Result<GroupInfo, EngineError> {
        if self.group_index(cfg.member.group).is_some() {
            return Err(EngineError::GroupExists(cfg.member.group));
        }
        let keys = cfg.keys.take();
        if keys.is_some() && (cfg.membership.is_none() || cfg.secure.is_some()) {
            return Err(EngineError::Config(
                "an MLS-keyed group needs membership and no pre-shared epoch".into(),
            ));
        }
        // Keyed groups sign some datagrams: the larger trailer bounds them all.
        let overhead = if keys.is_some() {
            SIGN_OVERHEAD
        } else {
            SEAL_OVERHEAD
        };
        if cfg.secure.is_some() || keys.is_some() {
            // The trailer goes inside the configured datagram size.
            if cfg.member.mtu < wire::MIN_MTU + overhead {
                return Err(EngineError::Config(format!(
                    "mtu {} leaves no room for the seal: a secured group needs at least {}",
                    cfg.member.mtu,
                    wire::MIN_MTU + overhead
                )));
            }
            cfg.member.mtu -= overhead;
        }
        let mut shield = cfg
            .secure
            .take()
            .map(|e| Shield::new(cfg.member.group, cfg.member.member_id, e));
        if let Some(k) = &keys {
            // Signed packet numbers start at the wall clock (microseconds), above any this
            // identity used before a restart.
            let first = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_micros() as u64);
            let s = Shield::unkeyed(cfg.member.group, cfg.member.member_id)
                .map_err(|e| EngineError::Config(e.to_string()))?
                .with_signing(k.identity.clone(), k.roster(), first);
            shield = Some(s);
        }
        let proto = match &cfg.membership {
            None => {
                let mut member = Member::new(cfg.member.clone(), cfg.seed)
                    .map_err(|e| EngineError::Config(e.to_string()))?;
                // The worker sends with iovecs: datagrams of one new frame leave from the
                // retransmit buffer without a copy. Sealed datagrams are encrypted in the send
                // arena instead, so the retransmit buffer keeps the plain frames.
                member.set_in_place_transmit(shield.is_none());
                Proto::Plain(member)
            }
            Some(m) => {
                let mut gc = m.clone();
                gc.member = cfg.member.clone();
                let member = match keys {
                    Some(k) => GroupMember::new_keyed(gc, cfg.seed, k),
                    None => GroupMember::new(gc, cfg.seed),
                };
                Proto::Group(Box::new(member.map_err(|e| EngineError::Config(e.to_string()))?))
            }
        };
        let (group_socket, unicast) = open_sockets(&cfg.udp).map_err(|e| EngineError::Io(e.to_string()))?;
        let local = unicast.local_addr().map_err(|e| EngineError::Io(e.to_string()))?;
        if let (Some(g), SocketAddr::V4(own)) = (&group_socket, local) {
            // Best effort: without the filter our own datagrams are still dropped, later.
            let _ = sys::drop_own_datagrams(g.as_raw_fd(), own);
        }
        let index = self.groups.len();
        let mut gro = self.gro;
        for (k, s) in group_socket.iter().chain(std::iter::once(&unicast)).enumerate() {
            if self.gro {
                gro &= sys::enable_gro(s.as_raw_fd());
            }
            let token = (index as u32) << 1 | k as u32;
            self.io
                .add_socket(s.as_raw_fd(), token)
                .map_err(|e| EngineError::Io(e.to_string()))?;
        }
        self.gro = gro;
        let group_dests = if cfg.udp.peers.is_empty() {
            vec![sys::sockaddr_in(cfg.udp.group)]
        } else {
            cfg.udp
                .peers
                .iter()
                .filter_map(|p| match p {
                    SocketAddr::V4(a) => Some(sys::sockaddr_in(*a)),
                    SocketAddr::V6(_) => None,
                })
                .collect()
        };
        let lends = matches!(proto, Proto::Plain(_)) && shield.is_none();
        self.groups.push(Group {
            id: cfg.member.group,
            proto,
            _group_socket: group_socket,
            unicast,
            group_dests,
            loss: (cfg.receive_loss > 0.0).then(|| ReceiveLoss::new(cfg.receive_loss, cfg.loss_seed)),
            publications: Vec::new(),
            handlers: Vec::new(),
            sinks: Vec::new(),
            sunk: 0,
            stats: TransportStats::default(),
            deadline: None,
            touched: true,
            lends,
            lent: 0,
            malformed_records: 0,
            shield,
        });
        Ok(GroupInfo {
            local_addr: local,
            backend: self.io.kind(),
        })
    }

    /// Moves records from the publication rings into the members' send queues.
    fn take_publications(&mut self) -> bool {
        let mut any = false;
        for g in &mut self.groups {
            let remote = g.proto.must_read_publications();
            // Log publications: join while someone remote listens, leave when no one does, and
            // drop those whose client left once everything they held is read.
            g.publications.retain_mut(|p| match &mut p.source {
                Source::Log {
                    path,
                    reader,
                    closing,
                    ..
                } => {
                    if remote && reader.is_none() && !*closing {
                        *reader = BroadcastReader::open(path).ok();
                    } else if !remote && reader.is_some() && !*closing {
                        *reader = None;
                    }
                    !(*closing && p.overflow.is_empty() && reader.as_ref().is_none_or(|r| !r.has_records()))
                }
                Source::Ring(_) => true,
            });
            let shape = g.shape();
            for p in &mut g.publications {
                while !p.overflow.is_empty() {
                    match g.proto.publish(p.stream, &p.overflow[0]) {
                        Ok(()) => {
                            p.overflow.remove(0);
                            any = true;
                            g.touched = true;
                        }
                        Err(_) => break,
                    }
                }
                if !p.overflow.is_empty() {
                    continue;
                }
                let batch = room_for_records(&mut g.proto).map_or(0, |room| p.batch(room, shape));
                if batch == 0 {
                    continue;
                }
                let mut t = Taker {
                    member: &mut g.proto,
                    overflow: &mut p.overflow,
                    held: &mut p.held,
                    stream: p.stream,
                    lent: 0,
                    malformed: 0,
                    pushed_back: 0,
                    taken_bytes: 0,
                };
                let n = match &mut p.source {
                    Source::Ring(c) if g.lends && c.can_hold() => c
                        .read_held(batch, |pos, kind, record| match kind {
                            LENT_RECORD => t.lend(pos, record),
                            _ => t.take(record),
                        })
                        .unwrap_or(0),
                    Source::Ring(c) => c.read(batch, |kind, record| match kind {
                        LENT_RECORD => match record.get(PUBLICATION_HEADROOM..) {
                            Some(message) => t.take(message),
                            None => t.malformed += 1,
                        },
                        _ => t.take(record),
                    }),
                    Source::Log { reader, .. } => {
                        match reader.as_mut().map(|r| r.poll(batch, |_, b| t.take(b))) {
                            Some(Ok(n)) => n,
                            // Evicted (this worker was too slow for the client's timeout): join
                            // again at the tail next turn; the remote receivers see a gap.
                            Some(Err(_)) => {
                                *reader = None;
                                0
                            }
                            None => 0,
                        }
                    }
                };
                let (pushed_back, taken_bytes) = (t.pushed_back, t.taken_bytes);
                g.lent += t.lent;
                g.malformed_records += t.malformed;
                self.pushed_back += pushed_back;
                self.turn_items += n;
                if let Some(mean) = taken_bytes.checked_div(n) {
                    p.record_bytes = mean;
                    any = true;
                    g.touched = true;
                }
            }
        }
        any
    }

    /// Gives the publication rings back the records whose frames the members no longer hold,
    /// after this turn's acknowledgements and sends; true when a STATUS request waits to be
    /// sent (the next turn's transmit sends it).
    fn release_lent(&mut self, now: Nanos) -> bool {
        let mut asking = false;
        for g in self.groups.iter_mut().filter(|g| g.lends) {
            for p in &mut g.publications {
                if let Source::Ring(c) = &mut p.source {
                    if release_lent(&mut g.proto, &mut p.held, c) {
                        // Receivers are asked where they are: the request leaves with the
                        // next turn's transmit, or at the timer `rearm_timers` sets when it
                        // was deferred.
                        asking |= g.proto.request_status(now);
                        g.touched = true;
                    }
                }
            }
        }
        asking
    }

    fn receive(&mut self, now: Nanos) -> bool {
        let groups = &mut self.groups;
        let mut datagrams = 0;
        let result = self.io.receive(|r: Received<'_>| {
            let Received {
                token,
                from,
                arena,
                range,
                segment,
                pool,
            } = r;
            let Some(g) = groups.get_mut((token >> 1) as usize) else {
                return;
            };
            // Our own multicast comes back to us (loopback); a GRO buffer holds one flow, so
            // one look at its first datagram's source tells for all of them.
            if is_own(&arena[range.clone()], g.proto.id()) {
                return;
            }
            let segment = segment.unwrap_or(range.len()).max(1);
            g.stats.receive_buffers += 1;
            if g.loss.is_none() && g.shield.is_none() {
                // Nothing to drop or open datagram by datagram: the member takes the buffer
                // whole (one call instead of one per datagram).
                let n = crate::wire::segment_ranges(range.clone(), segment).len() as u64;
                g.stats.received += n;
                datagrams += n as usize;
                let (handlers, sinks, sunk) = (&mut g.handlers, &mut g.sinks, &mut g.sunk);
                let mut lent = Lent {
                    arena: &*arena,
                    lender: &mut *pool,
                };
                g.proto
                    .handle_datagrams_lent(
                        now,
                        from,
                        &mut lent,
                        range,
                        segment,
                        &mut |order, out: &Output<'_>| hand_out(handlers, sinks, sunk, order, out),
                    );
                g.touched = true;
                return;
            }
            for std::ops::Range { start, end } in crate::wire::segment_ranges(range, segment) {
                g.stats.received += 1;
                datagrams += 1;
                if let Some(loss) = g.loss.as_mut() {
                    if loss.drop_next() {
                        g.stats.dropped_by_decorator += 1;
                        continue;
                    }
                }
                // Opened in place; a rejected datagram is counted by the shield and dropped.
                let len = match g.shield.as_mut().map(|s| s.open(&mut arena[start..end])) {
                    None => end - start,
                    Some(Ok(n)) => n,
                    Some(Err(_)) => continue,
                };
                // Subscribers get in-order messages straight from the receive buffer, and
                // frames behind a gap wait in it, pinned.
                let (handlers, sinks, sunk) = (&mut g.handlers, &mut g.sinks, &mut g.sunk);
                let mut lent = Lent {
                    arena: &*arena,
                    lender: &mut *pool,
                };
                g.proto.handle_datagram_lent(
                    now,
                    from,
                    &mut lent,
                    start..start + len,
                    &mut |order, out: &Output<'_>| hand_out(handlers, sinks, sunk, order, out),
                );
                // A view installed by this datagram: later ones may be sealed in its epoch.
                apply_rekeys(g);
            }
            g.touched = true;
        });
        self.turn_items += datagrams;
        match result {
            Ok(n) => n > 0,
            Err(_) => false,
        }
    }

    fn run_timers(&mut self, now: Nanos) {
        while let Some(&Reverse((deadline, i))) = self.timers.peek() {
            if deadline > now {
                break;
            }
            self.timers.pop();
            let g = &mut self.groups[i];
            // Stale entries (the group's deadline moved) are skipped.
            if g.deadline == Some(deadline) {
                g.deadline = None;
                g.proto.handle_timeout(now, &mut self.io.lent());
                apply_rekeys(g);
                g.touched = true;
            }
        }
    }

    fn rearm_timers(&mut self) {
        for (i, g) in self.groups.iter_mut().enumerate() {
            if !g.touched {
                continue;
            }
            g.touched = false;
            let next = g.proto.poll_timeout();
            if next != g.deadline {
                g.deadline = next;
                if let Some(d) = next {
                    self.timers.push(Reverse((d, i)));
                }
            }
        }
        // Stale entries pile up when deadlines keep moving; rebuild now and then.
        if self.timers.len() > 64 + 4 * self.groups.len() {
            self.timers = self
                .groups
                .iter()
                .enumerate()
                .filter_map(|(i, g)| g.deadline.map(|d| Reverse((d, i))))
                .collect();
        }
    }

    /// Builds every datagram the members want to send into the arena, coalescing runs of
    /// equal-size group datagrams into GSO sends, and hands them to the kernel.
    fn transmit(&mut self, now: Nanos) -> bool {
        let mut any = false;
        for i in 0..self.groups.len() {
            loop {
                self.batch.clear();
                let g = &mut self.groups[i];
                let full = build_sends(g, now, &mut self.batch, &mut self.scratch, self.gso);
                if self.batch.sends.is_empty() {
                    break;
                }
                any = true;
                let out = self.io.send(&self.batch);
                if out.gso_refused {
                    self.gso = false;
                }
                g.stats.sent += out.datagrams;
                g.stats.send_calls += self.batch.sends.len() as u64;
                g.stats.send_errors += out.errors;
                g.touched = true;
                if !full {
                    break;
                }
            }
        }
        any
    }

    fn deliver(&mut self) -> bool {
        let mut any = false;
        for g in &mut self.groups {
            if g.proto.pending_deliveries() == 0 {
                continue;
            }
            any = true;
            let (handlers, sinks, sunk) = (&mut g.handlers, &mut g.sinks, &mut g.sunk);
            g.proto
                .drain(&mut |order, out: &Output<'_>| hand_out(handlers, sinks, sunk, order, out));
            g.touched = true;
        }
        any
    }

    /// Sleeps until a datagram, a wake-up, or the next timer, at most `limit`.
    fn park_for(&mut self, now: Nanos, limit: Duration) {
        self.wake.parked.store(true, Ordering::Relaxed);
        // Pairs with the fence in `Wake::after_offer`.
        fence(Ordering::SeqCst);
        // A publication counts as work only when its member can take it: a sender held back by
        // flow control sleeps until a STATUS (a datagram) or a timer wakes it.
        let work_waiting = !self.commands.is_empty()
            || self.groups.iter_mut().any(|g| {
                let shape = g.shape();
                room_for_records(&mut g.proto).is_some_and(|room| {
                    g.publications
                        .iter()
                        .any(|p| p.overflow.is_empty() && !p.source.is_empty() && p.batch(room, shape) > 0)
                })
            });
        if !work_waiting {
            let wait = match self.timers.peek() {
                Some(&Reverse((d, _))) => Duration::from_nanos(d.saturating_sub(now)).min(limit),
                None => limit,
            };
            if !wait.is_zero() {
                let _ = self.io.wait(wait);
            }
        }
        self.wake.parked.store(false, Ordering::Relaxed);
    }
}

/// Hands one publication's records to its member during a turn, counting what it did.
struct Taker<'a> {
    member: &'a mut Proto,
    overflow: &'a mut Vec<Vec<u8>>,
    held: &'a mut VecDeque<(u64, u64)>,
    stream: u32,
    lent: u64,
    malformed: u64,
    pushed_back: u64,
    taken_bytes: usize,
}

impl Taker<'_> {
    /// Publishes a copy of `message`; behind earlier pushed-back messages, or with the send
    /// queue full, it waits in the overflow (never lost).
    fn take(&mut self, message: &[u8]) {
        if !self.overflow.is_empty() || self.member.publish(self.stream, message).is_err() {
            // Only a full send queue refuses (the publication checked the size).
            self.push_back(message);
        } else {
            self.taken_bytes += message.len();
        }
    }

    /// Keeps a copy of `message` for the member to take when its send queue has room.
    fn push_back(&mut self, message: &[u8]) {
        self.taken_bytes += message.len();
        self.overflow.push(message.to_vec());
        self.pushed_back += 1;
    }

    /// Publishes the message of the held ring record at `pos` (a [`LENT_RECORD`]: headroom,
    /// then the message), framed where it lies if the member can send it from there.
    fn lend(&mut self, pos: u64, record: &mut [u8]) {
        let Some(datagram) = record.get_mut(LENT_PAD..).filter(|d| d.len() >= LENT_HEADROOM) else {
            self.malformed += 1;
            return;
        };
        if !self.overflow.is_empty() {
            return self.take(&datagram[LENT_HEADROOM..]);
        }
        // SAFETY: the ring holds this record (its producer neither reuses the space of a held
        // record nor writes a committed one) until `release_lent` releases it, which happens
        // only once the member no longer holds its sequence; and the member is dropped before
        // the ring (the field order of `Group`).
        match unsafe { self.member.publish_lent(self.stream, datagram) } {
            Ok(lent) => {
                self.taken_bytes += datagram.len() - LENT_HEADROOM;
                if let Some(seq) = lent {
                    self.held.push_back((seq, pos));
                    self.lent += 1;
                }
            }
            // Not lent, and the copy found the send queue full (counted there once).
            Err(_) => self.push_back(&datagram[LENT_HEADROOM..]),
        }
    }
}

/// Releases the records of ring `c` below the first one whose frame `proto` still holds
/// (`held` lists those records, oldest first). When more than half the ring is held, the
/// member is first asked to forget the oldest frames no receiver needs any more (acknowledged
/// by every live receiver, and sent), so the producer always finds room once its receivers
/// have caught up. Frames a receiver may still ask for are never given up: a ring full of them
/// holds its producer back, which is flow control. Returns true when more than half the ring
/// stays held, by frames not sent or not acknowledged as far as the member knows: then the
/// receivers should be asked where they are.
fn release_lent(proto: &mut Proto, held: &mut VecDeque<(u64, u64)>, c: &mut RecordConsumer) -> bool {
    let read = c.read_position();
    let half = c.capacity() as u64 / 2;
    if held.front().is_some_and(|&(_, pos)| read - pos > half) {
        // The first record that leaves at most half the ring held: forget every frame before.
        let keep = held.partition_point(|&(_, pos)| read - pos > half);
        proto.forget_held_before(held.get(keep).map_or(u64::MAX, |&(seq, _)| seq));
    }
    let from = proto.held_from();
    while held.front().is_some_and(|&(seq, _)| seq < from) {
        held.pop_front();
    }
    let front = held.front().map_or(read, |&(_, pos)| pos);
    c.release(front);
    read - front > half
}

/// Whether `proto` takes records from its publications now, and its
/// [`Proto::publish_room`] if so: nothing from any source while its send queue holds more than
/// the low-water mark (the ring is the queue).
fn room_for_records(proto: &mut Proto) -> Option<usize> {
    let low_water = SEND_QUEUE_LOW_WATER.min(proto.config().send_queue_bytes / 2);
    (proto.queued_bytes() <= low_water).then(|| proto.publish_room())
}

/// Whether a datagram was sent by member `me` (its header's source field).
fn is_own(bytes: &[u8], me: u32) -> bool {
    crate::wire::datagram_source(bytes) == Some(me)
}

/// Memory `build_sends` reuses from batch to batch.
#[derive(Debug, Default)]
struct Scratch {
    /// Where each datagram of the batch lives.
    pieces: Vec<Piece>,
    /// The sends to make, in order: a unicast destination with its one datagram, or `None`
    /// for a run of group datagrams (sent to each group destination).
    plan: Vec<(Option<libc::sockaddr_in>, Run)>,
}

/// MLS-keyed groups: moves the shield to the epochs of the views just installed.
fn apply_rekeys(g: &mut Group) {
    if let Some(shield) = g.shield.as_mut() {
        while let Some(e) = g.proto.poll_rekey() {
            shield.install(e);
        }
    }
}

/// Moves a secured group to a later epoch (see [`super::Engine::rekey`]).
fn rekey(g: &mut Group, epoch: ShieldEpoch) -> Result<(), EngineError> {
    let id = g.id;
    match (&mut g.proto, g.shield.as_mut()) {
        (_, None) => Err(EngineError::Config(format!("group {id} is not secured"))),
        // A view change's flush relays old messages as new data: under a new key a joiner
        // could read them. Views are not MLS epochs yet.
        (Proto::Group(m), Some(_)) if m.key_stats().is_some() => Err(EngineError::Config(format!(
            "group {id} is keyed by MLS: its epochs follow its views"
        ))),
        (Proto::Group(_), Some(_)) => Err(EngineError::Config(format!(
            "group {id} has membership and a pre-shared key: its key cannot change while it runs (key it by MLS instead)"
        ))),
        (Proto::Plain(member), Some(s)) => {
            let (from, to) = (s.epoch(), epoch.epoch);
            if !s.rekey(epoch) {
                return Err(EngineError::Config(format!(
                    "epoch {to} is not after the current epoch {from}"
                )));
            }
            // Nothing sent under the old key goes out again under the new.
            member.forget_sent();
            Ok(())
        }
    }
}

/// Where one datagram of a batch lives.
#[derive(Debug, Clone, Copy)]
enum Piece {
    /// Built by `poll_transmit` in the batch's arena.
    Arena { start: usize, len: usize },
    /// Left in the member's retransmit buffer (an in-place transmit).
    InPlace { seq: u64, len: usize },
}

impl Piece {
    fn len(self) -> usize {
        match self {
            Piece::Arena { len, .. } | Piece::InPlace { len, .. } => len,
        }
    }
}

/// Whether a worker idle at `now` (not in busy-poll) sleeps rather than polls on: once it has
/// found no work for [`STREAM_SPIN_NS`] while it carries a stream (`now < bulk_until`), or for
/// [`IDLE_SPIN_NS`] otherwise.
fn sleep_now(now: Nanos, last_busy: Nanos, bulk_until: Nanos) -> bool {
    let window = if now < bulk_until {
        STREAM_SPIN_NS
    } else {
        IDLE_SPIN_NS
    };
    now.saturating_sub(last_busy) > window
}

/// A run of group datagrams that leave as one send: equal sizes, the last one maybe shorter.
#[derive(Debug, Clone, Copy)]
struct Run {
    first: usize,
    count: usize,
    len: usize,
    segment: usize,
    closed: bool,
}

/// Appends `g`'s datagrams to `batch`, coalescing runs of equal-size group datagrams into GSO
/// sends; true when the batch filled before the member ran out. `pieces` is scratch space.
fn build_sends(g: &mut Group, now: Nanos, batch: &mut SendBatch, scratch: &mut Scratch, gso: bool) -> bool {
    let Scratch { pieces, plan } = scratch;
    let mtu = g.proto.config().mtu;
    // A secured group's datagrams grow by the seal (or signature) once built.
    let room = mtu + g.shield.as_ref().map_or(0, Shield::max_overhead);
    // In-place datagrams stay valid until the retransmit buffer takes this many more frames.
    let max_in_place = (g.proto.config().retransmit_frames as usize / 2).clamp(1, 1024);
    let fd = g.unicast.as_raw_fd();
    pieces.clear();
    plan.clear();
    let mut run: Option<Run> = None;
    let mut in_place = 0;
    let mut full = false;
    loop {
        if batch.used + room > batch.arena.len() || in_place >= max_in_place {
            full = true;
            break;
        }
        let start = batch.used;
        let Some(mut t) = g.proto.poll_transmit(now, &mut batch.arena[start..start + mtu]) else {
            break;
        };
        if let Some(shield) = g.shield.as_mut() {
            // In-place transmits are off for secured groups: the datagram is in the arena.
            match shield.protect(&mut batch.arena[start..start + room], &t) {
                Ok(n) => t.len = n,
                Err(e) => {
                    tracing::error!(group = g.id, error = %e, "datagram not sealed, dropped");
                    continue;
                }
            }
        }
        let piece = match t.in_place {
            Some(seq) => {
                in_place += 1;
                Piece::InPlace { seq, len: t.len }
            }
            None => {
                batch.used += t.len;
                Piece::Arena { start, len: t.len }
            }
        };
        pieces.push(piece);
        let index = pieces.len() - 1;
        match t.destination {
            Destination::Unicast(SocketAddr::V4(addr)) => {
                plan.extend(run.take().map(|r| (None, r)));
                let single = Run {
                    first: index,
                    count: 1,
                    len: t.len,
                    segment: t.len,
                    closed: true,
                };
                plan.push((Some(sys::sockaddr_in(addr)), single));
            }
            Destination::Unicast(SocketAddr::V6(_)) => {}
            Destination::Group => {
                let extends = run.is_some_and(|r| {
                    gso && !r.closed
                        && t.len <= r.segment
                        && r.count < sys::MAX_GSO_SEGMENTS
                        && r.len + t.len <= sys::MAX_GSO_BYTES
                });
                match run.as_mut() {
                    Some(r) if extends => {
                        r.len += t.len;
                        r.count += 1;
                        // A shorter datagram can only be the last of a GSO send.
                        r.closed = t.len < r.segment;
                    }
                    _ => {
                        plan.extend(run.take().map(|r| (None, r)));
                        run = Some(Run {
                            first: index,
                            count: 1,
                            len: t.len,
                            segment: t.len,
                            closed: false,
                        });
                    }
                }
            }
        }
    }
    plan.extend(run.take().map(|r| (None, r)));
    // Every piece is final now: point the iovecs at the arena and at the retransmit buffer,
    // which nothing changes until the batch is sent. Pieces that lie back to back (frames sent
    // in place follow each other in the retransmit log) share one iovec: the kernel then copies
    // a send in one long run instead of one short copy per datagram.
    for &(dest, r) in plan.iter() {
        let iov_start = batch.iovs.len();
        for &p in &pieces[r.first..r.first + r.count] {
            let bytes: &[u8] = match p {
                Piece::Arena { start, len } => &batch.arena[start..start + len],
                Piece::InPlace { seq, .. } => g.proto.transmitted(seq).unwrap_or(&[]),
            };
            debug_assert_eq!(bytes.len(), p.len());
            push_iov(&mut batch.iovs, iov_start, bytes);
        }
        let iov_count = batch.iovs.len() - iov_start;
        let segment = if r.count > 1 { r.segment as u16 } else { 0 };
        let dests: &[libc::sockaddr_in] = match &dest {
            Some(d) => std::slice::from_ref(d),
            None => &g.group_dests,
        };
        for d in dests {
            batch.sends.push(Send {
                fd,
                dest: *d,
                iov_start,
                iov_count,
                len: r.len,
                segment,
            });
        }
    }
    full
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_turn_takes_about_read_bytes_of_records_within_the_room() {
        let shape = Shape {
            max_frame: 1400,
            overhead: 80,
        };
        // Before any record was seen, the count alone limits.
        assert_eq!(ring_batch(usize::MAX, 1, shape), READ_BATCH);
        // 8 KiB records (fragmented, not one datagram each): a quarter MiB per turn.
        assert_eq!(ring_batch(usize::MAX, 8192, shape), 32);
        // Small records: the count limits; huge ones: one at a time.
        assert_eq!(ring_batch(usize::MAX, 64, shape), READ_BATCH);
        assert_eq!(ring_batch(usize::MAX, 1 << 20, shape), 1);
        // Flow control's room limits first.
        assert_eq!(ring_batch(10, 1024, shape), 10);
        assert_eq!(ring_batch(0, 1024, shape), 0);
    }

    #[test]
    fn records_of_a_datagram_each_come_in_whole_gso_sends() {
        let shape = Shape {
            max_frame: 1400,
            overhead: 80,
        };
        // 1 KiB: 1104-byte datagrams, 58 to a send (65,000 bytes); a quarter MiB is 256
        // records, cut to four whole sends.
        let per_send = sys::MAX_GSO_BYTES / (1024 + 80);
        assert_eq!(per_send, 58);
        assert_eq!(ring_batch(usize::MAX, 1024, shape), 4 * per_send);
        // At most 64 datagrams to a send, however small they are (just over half a frame).
        assert_eq!(ring_batch(usize::MAX, 701, shape), 320);
        // Whole frames: 187 records a quarter MiB, 43 to a send.
        assert_eq!(ring_batch(usize::MAX, 1400, shape), 4 * 43);
        // Fewer than one send's worth is not cut to nothing.
        assert!(
            ring_batch(
                usize::MAX,
                1024,
                Shape {
                    max_frame: 1400,
                    overhead: 64_000
                }
            ) >= 1
        );
    }

    #[test]
    fn an_idle_worker_polls_longer_while_it_carries_a_stream() {
        let now = 1_000_000_000;
        let stream = now + BULK_NS;
        // Just busy: poll, stream or not.
        assert!(!sleep_now(now, now - 1_000, 0));
        assert!(!sleep_now(now, now - 1_000, stream));
        // Idle past the short window: sparse traffic sleeps, a stream polls on...
        assert!(sleep_now(now, now - IDLE_SPIN_NS - 1, 0));
        assert!(!sleep_now(now, now - IDLE_SPIN_NS - 1, stream));
        // ...until the stream's window too has passed.
        assert!(sleep_now(now, now - STREAM_SPIN_NS - 1, stream));
        // A stream long over counts as sparse traffic.
        assert!(sleep_now(now, now - IDLE_SPIN_NS - 1, now - 1));
        // A clock read before the last busy turn (no time passed): poll.
        assert!(!sleep_now(now, now + 5, 0));
    }

    #[test]
    fn a_parked_worker_is_notified_once_however_many_offers_follow() {
        let wake = Wake {
            parked: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            fd: EventFd::new().expect("eventfd"),
        };
        // A running worker is not notified.
        wake.after_offer();
        assert_eq!(wake.fd.drain(), 0);
        // A parked one once: the eventfd stays readable until it runs.
        wake.parked.store(true, Ordering::Relaxed);
        for _ in 0..5 {
            wake.after_offer();
        }
        assert_eq!(wake.fd.drain(), 1);
        assert!(!wake.parked.load(Ordering::Relaxed));
        // Parked again, notified again.
        wake.parked.store(true, Ordering::Relaxed);
        wake.after_offer();
        assert_eq!(wake.fd.drain(), 1);
    }
}
