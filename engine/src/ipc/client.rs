//! The client side: [`Client`], [`Publication`], [`Subscription`].

use super::cnc::{self, Cnc, SlotField};
use super::protocol::{Command, Response};
use super::{check_group_name, files, IpcError, Order};
use crate::runtime::SINK_META_LEN;
use crossbeam_channel::{Receiver, Sender};
use intergroup_ring::{
    BroadcastClaim, BroadcastProducer, BroadcastReader, OfferError as RingOfferError, ReadError,
    RecordProducer,
};
use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const ALIVE: u8 = 0;
const CLOSED: u8 = 1;
const DEAD: u8 = 2;

/// How often the client's conductor thread beats, checks the engine and reads responses.
const TICK: Duration = Duration::from_millis(1);

/// Settings of a client.
#[derive(Debug, Clone, Default)]
pub struct ClientOptions {
    /// How long to wait for the engine's answer to a request; default: the engine's client
    /// timeout.
    pub request_timeout: Option<Duration>,
}

/// Why an offer did not happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OfferError {
    /// The publication's log is full: a subscriber (or the network) holds it back. Try again.
    #[error("back-pressured: the publication is full")]
    BackPressured,
    /// No subscriber and no remote member listens yet; nothing was published. Try again.
    #[error("not connected: no subscriber listens")]
    NotConnected,
    /// The message is larger than the publication takes.
    #[error("message of {len} bytes exceeds the maximum of {max}")]
    TooLarge {
        /// Its length.
        len: usize,
        /// The largest message.
        max: usize,
    },
    /// The publication or its client was closed.
    #[error("the publication is closed")]
    Closed,
    /// The engine died.
    #[error("the engine died")]
    EngineDead,
}

type Pending = HashMap<u64, (Sender<Response>, Option<Sender<ImageEvent>>)>;

/// What the conductor hands a subscription about local publications.
enum ImageEvent {
    /// A publication's log, already joined (so the publication counts this subscription as
    /// connected even before the application polls).
    Available {
        session: u64,
        sender: u32,
        reader: Box<BroadcastReader>,
    },
    /// The publication closed.
    Unavailable { session: u64 },
    /// The publication's log could not be joined.
    Unreadable { session: u64, reason: String },
}

struct Route {
    group: u32,
    stream: u32,
    images: Sender<ImageEvent>,
    /// Images already handed over: the engine announces each image again whenever another
    /// subscription of its stream starts, and a second reader would hold a slot for nothing.
    known: std::collections::HashSet<u64>,
}

struct Shared {
    cnc: Cnc,
    dir: PathBuf,
    slot: usize,
    id: u64,
    commands: RecordProducer,
    state: AtomicU8,
    correlation: AtomicU64,
    timeout: Duration,
    pending: Mutex<Pending>,
    routes: Mutex<HashMap<u64, Route>>,
    /// Per publication and subscription: messages so far, summed into the client's slot.
    published: Mutex<Vec<Arc<AtomicU64>>>,
    received: Mutex<Vec<Arc<AtomicU64>>>,
}

impl Shared {
    fn check(&self) -> Result<(), IpcError> {
        match self.state.load(Ordering::Relaxed) {
            ALIVE => Ok(()),
            DEAD => Err(IpcError::EngineDead),
            _ => Err(IpcError::Closed),
        }
    }

    fn send(&self, cmd: &Command) -> Result<(), IpcError> {
        let (t, bytes) = cmd.encode();
        let deadline = Instant::now() + self.timeout;
        loop {
            self.check()?;
            match self.commands.offer(t, &bytes) {
                Ok(()) => return Ok(()),
                Err(RingOfferError::WouldBlock) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_micros(100))
                }
                Err(RingOfferError::WouldBlock) => {
                    return Err(IpcError::Timeout(self.timeout.as_millis() as u64))
                }
                Err(e) => return Err(IpcError::Io(format!("command ring: {e}"))),
            }
        }
    }

    /// Sends a request and waits for its answer.
    fn request(
        &self,
        make: impl FnOnce(u64) -> Command,
        images: Option<Sender<ImageEvent>>,
    ) -> Result<Response, IpcError> {
        let correlation = self.correlation.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.pending
            .lock()
            .map_err(|_| IpcError::Closed)?
            .insert(correlation, (tx, images));
        let sent = self.send(&make(correlation));
        let answer = sent.and_then(|()| match rx.recv_timeout(self.timeout) {
            Ok(Response::Error { code, message, .. }) => Err(IpcError::Refused { code, message }),
            Ok(r) => Ok(r),
            Err(_) => {
                self.check()?;
                Err(IpcError::Timeout(self.timeout.as_millis() as u64))
            }
        });
        if let Ok(mut p) = self.pending.lock() {
            p.remove(&correlation);
        }
        answer
    }

    /// One tick of the conductor: heartbeat, counters, engine liveness, responses.
    fn tick(&self, responses: &mut BroadcastReader) {
        let ours = self.cnc.slot(self.slot, SlotField::State).load(Ordering::Acquire) == cnc::SLOT_ACTIVE
            && self
                .cnc
                .slot(self.slot, SlotField::Client)
                .load(Ordering::Relaxed)
                == self.id;
        if !ours {
            // The engine reclaimed this client (it was silent past the timeout, or the engine
            // restarted): everything it held is gone.
            let _ = self
                .state
                .compare_exchange(ALIVE, CLOSED, Ordering::AcqRel, Ordering::Relaxed);
            return;
        }
        self.cnc
            .slot(self.slot, SlotField::Heartbeat)
            .store(cnc::now_ms(), Ordering::Relaxed);
        self.flush_counters();
        if !self.cnc.engine_alive() {
            let _ = self
                .state
                .compare_exchange(ALIVE, DEAD, Ordering::AcqRel, Ordering::Relaxed);
            // Waiters see their channel close and report the dead engine.
            if let Ok(mut p) = self.pending.lock() {
                p.clear();
            }
            return;
        }
        let _ = responses.poll(256, |t, bytes| {
            if let Ok(r) = Response::decode(t, bytes) {
                self.route(r);
            }
        });
    }

    fn flush_counters(&self) {
        let sum = |v: &Mutex<Vec<Arc<AtomicU64>>>| {
            v.lock()
                .map(|v| v.iter().map(|c| c.load(Ordering::Relaxed)).sum::<u64>())
                .unwrap_or(0)
        };
        self.cnc
            .slot(self.slot, SlotField::Published)
            .store(sum(&self.published), Ordering::Relaxed);
        self.cnc
            .slot(self.slot, SlotField::Received)
            .store(sum(&self.received), Ordering::Relaxed);
    }

    fn route(&self, r: Response) {
        let correlation = match &r {
            Response::PublicationReady { correlation, .. }
            | Response::SubscriptionReady { correlation, .. }
            | Response::Error { correlation, .. }
            | Response::Done { correlation } => Some(*correlation),
            _ => None,
        };
        if let Some(c) = correlation {
            let Some((reply, images)) = self.pending.lock().ok().and_then(|mut p| p.remove(&c)) else {
                return; // another client's answer
            };
            if let (
                Response::SubscriptionReady {
                    id, group, stream, ..
                },
                Some(images),
            ) = (&r, images)
            {
                if let Ok(mut routes) = self.routes.lock() {
                    routes.insert(
                        *id,
                        Route {
                            group: *group,
                            stream: *stream,
                            images,
                            known: Default::default(),
                        },
                    );
                }
            }
            let _ = reply.send(r);
            return;
        }
        let Ok(mut routes) = self.routes.lock() else {
            return;
        };
        match r {
            Response::ImageAvailable {
                session,
                group,
                stream,
                sender,
                path,
            } => {
                for route in routes
                    .values_mut()
                    .filter(|x| x.group == group && x.stream == stream && !x.known.contains(&session))
                {
                    route.known.insert(session);
                    match BroadcastReader::open(Path::new(&path)) {
                        Ok(reader) => {
                            let _ = route.images.send(ImageEvent::Available {
                                session,
                                sender,
                                reader: Box::new(reader),
                            });
                        }
                        // A publication that closed before we looked is simply not there.
                        Err(intergroup_ring::Error::Io { .. }) => {}
                        // Every reader slot taken (or a damaged file): the subscription is
                        // told, never left waiting in silence.
                        Err(e) => {
                            let _ = route.images.send(ImageEvent::Unreadable {
                                session,
                                reason: e.to_string(),
                            });
                        }
                    }
                }
            }
            Response::ImageUnavailable {
                session,
                group,
                stream,
            } => {
                for route in routes
                    .values_mut()
                    .filter(|x| x.group == group && x.stream == stream)
                {
                    route.known.remove(&session);
                    let _ = route.images.send(ImageEvent::Unavailable { session });
                }
            }
            _ => {}
        }
    }
}

/// A connection to a running engine through its directory. Cheap to share by reference;
/// publications and subscriptions made from it may move to other threads.
pub struct Client {
    shared: Arc<Shared>,
    conductor: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("dir", &self.shared.dir)
            .field("id", &self.shared.id)
            .finish()
    }
}

fn client_id() -> u64 {
    use std::hash::BuildHasher;
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    std::collections::hash_map::RandomState::new()
        .hash_one((std::process::id(), t))
        .max(1)
}

impl Client {
    /// Connects to the engine running on `dir`.
    pub fn connect(dir: impl AsRef<Path>) -> Result<Self, IpcError> {
        Self::connect_with(dir, ClientOptions::default())
    }

    /// Connects with `options`.
    pub fn connect_with(dir: impl AsRef<Path>, options: ClientOptions) -> Result<Self, IpcError> {
        let dir = dir.as_ref().to_path_buf();
        let name = dir.display().to_string();
        let cnc_path = dir.join(files::CNC);
        if !cnc_path.exists() {
            return Err(IpcError::NoEngine(name));
        }
        let cnc = Cnc::open(&cnc_path)?;
        if cnc.state() == cnc::CLOSED {
            return Err(IpcError::NoEngine(name));
        }
        if !cnc.engine_alive() {
            return Err(IpcError::EngineDead);
        }
        let ring = |e: intergroup_ring::Error| IpcError::Corrupt(e.to_string());
        let commands = RecordProducer::open(&dir.join(files::COMMANDS)).map_err(ring)?;
        // Join the responses before the first request, so no answer is missed.
        let mut responses = BroadcastReader::open(&dir.join(files::RESPONSES)).map_err(ring)?;
        let id = client_id();
        let slot = cnc.claim_slot(id).ok_or(IpcError::TooManyClients)?;
        let timeout = options
            .request_timeout
            .unwrap_or(Duration::from_millis(cnc.client_timeout_ms()));
        let shared = Arc::new(Shared {
            cnc,
            dir,
            slot,
            id,
            commands,
            state: AtomicU8::new(ALIVE),
            // Every client reads every response: correlations start at a random point per client
            // so no client takes another's answer.
            correlation: AtomicU64::new(client_id() | 1),
            timeout,
            pending: Mutex::new(HashMap::new()),
            routes: Mutex::new(HashMap::new()),
            published: Mutex::new(Vec::new()),
            received: Mutex::new(Vec::new()),
        });
        let s = shared.clone();
        let conductor = std::thread::Builder::new()
            .name("intergroup-client".into())
            .spawn(move || {
                while s.state.load(Ordering::Acquire) == ALIVE {
                    s.tick(&mut responses);
                    std::thread::sleep(TICK);
                }
            })
            .map_err(|e| IpcError::Io(format!("client thread: {e}")))?;
        Ok(Self {
            shared,
            conductor: Some(conductor),
        })
    }

    /// This client's id (as the engine and `intergroup stat` know it).
    pub fn id(&self) -> u64 {
        self.shared.id
    }

    /// Whether the engine is alive as of the last check (every millisecond).
    pub fn engine_alive(&self) -> bool {
        self.shared.state.load(Ordering::Relaxed) != DEAD
    }

    /// A publication of `group` on `stream`.
    pub fn publication(&self, group: &str, stream: u32) -> Result<Publication, IpcError> {
        self.shared.check()?;
        check_group_name(group).map_err(IpcError::Config)?;
        let client = self.shared.id;
        let r = self.shared.request(
            |correlation| Command::AddPublication {
                client,
                correlation,
                stream,
                group: group.to_string(),
            },
            None,
        )?;
        let Response::PublicationReady {
            id,
            max_message,
            path,
            ..
        } = r
        else {
            return Err(IpcError::Corrupt(format!("unexpected answer {r:?}")));
        };
        let timeout = Duration::from_millis(self.shared.cnc.client_timeout_ms());
        let producer = BroadcastProducer::open(Path::new(&path), timeout)
            .map_err(|e| IpcError::Corrupt(e.to_string()))?;
        let meter = Arc::new(AtomicU64::new(0));
        if let Ok(mut v) = self.shared.published.lock() {
            v.push(meter.clone());
        }
        Ok(Publication {
            max_message: (max_message as usize).min(producer.max_payload()),
            shared: self.shared.clone(),
            producer,
            id,
            count: 0,
            meter,
        })
    }

    /// A subscription to `group` on `stream`, ordered by `order`.
    pub fn subscription(&self, group: &str, stream: u32, order: Order) -> Result<Subscription, IpcError> {
        self.shared.check()?;
        check_group_name(group).map_err(IpcError::Config)?;
        let client = self.shared.id;
        let (images_tx, images) = crossbeam_channel::unbounded();
        let r = self.shared.request(
            |correlation| Command::AddSubscription {
                client,
                correlation,
                stream,
                order: order.code(),
                group: group.to_string(),
            },
            Some(images_tx),
        )?;
        let Response::SubscriptionReady { id, path, .. } = r else {
            return Err(IpcError::Corrupt(format!("unexpected answer {r:?}")));
        };
        let remote = BroadcastReader::open(Path::new(&path)).map_err(|e| IpcError::Corrupt(e.to_string()))?;
        let meter = Arc::new(AtomicU64::new(0));
        if let Ok(mut v) = self.shared.received.lock() {
            v.push(meter.clone());
        }
        Ok(Subscription {
            shared: self.shared.clone(),
            id,
            stream,
            remote,
            images: Vec::new(),
            events: images,
            queued: VecDeque::new(),
            count: 0,
            meter,
        })
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let s = &self.shared;
        let was_alive = s
            .state
            .compare_exchange(ALIVE, CLOSED, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok();
        if let Some(t) = self.conductor.take() {
            let _ = t.join();
        }
        if was_alive {
            s.flush_counters();
            // The engine reclaims what this client held and frees the slot.
            let _ = s.cnc.slot(s.slot, SlotField::State).compare_exchange(
                cnc::SLOT_ACTIVE,
                cnc::SLOT_CLOSING,
                Ordering::AcqRel,
                Ordering::Relaxed,
            );
        }
    }
}

/// A publication: messages offered here go, in order, to every subscription of its group and
/// stream, on this host (through shared memory) and elsewhere (through the engine).
pub struct Publication {
    shared: Arc<Shared>,
    producer: BroadcastProducer,
    id: u64,
    max_message: usize,
    count: u64,
    meter: Arc<AtomicU64>,
}

impl std::fmt::Debug for Publication {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publication")
            .field("id", &self.id)
            .field("max_message", &self.max_message)
            .finish()
    }
}

fn offer_error(e: RingOfferError) -> OfferError {
    match e {
        RingOfferError::TooLarge { len, max } => OfferError::TooLarge { len, max },
        _ => OfferError::BackPressured,
    }
}

impl Publication {
    /// The publication's id (the session of its messages on the local path).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Largest message it takes.
    pub fn max_message(&self) -> usize {
        self.max_message
    }

    /// Messages published so far.
    pub fn published(&self) -> u64 {
        self.count
    }

    /// Whether a subscriber or a remote member listens (offers are refused until one does).
    pub fn is_connected(&mut self) -> bool {
        self.producer.connected()
    }

    #[inline]
    fn check(&mut self, len: usize) -> Result<(), OfferError> {
        match self.shared.state.load(Ordering::Relaxed) {
            ALIVE => {}
            DEAD => return Err(OfferError::EngineDead),
            _ => return Err(OfferError::Closed),
        }
        if len > self.max_message {
            return Err(OfferError::TooLarge {
                len,
                max: self.max_message,
            });
        }
        if !self.producer.connected() {
            return Err(OfferError::NotConnected);
        }
        Ok(())
    }

    /// Copies `message` into the publication.
    #[inline]
    pub fn offer(&mut self, message: &[u8]) -> Result<(), OfferError> {
        self.check(message.len())?;
        self.producer.offer(0, message).map_err(offer_error)?;
        self.count += 1;
        self.meter.store(self.count, Ordering::Relaxed);
        Ok(())
    }

    /// Claims room for a message of `len` bytes, to be written in place and published by
    /// [`Claim::commit`]; dropped uncommitted, nothing is published.
    #[inline]
    pub fn try_claim(&mut self, len: usize) -> Result<Claim<'_>, OfferError> {
        self.check(len)?;
        let claim = self.producer.try_claim(0, len).map_err(offer_error)?;
        Ok(Claim {
            claim,
            count: &mut self.count,
            meter: &self.meter,
        })
    }
}

impl Drop for Publication {
    fn drop(&mut self) {
        if self.shared.check().is_ok() {
            let client = self.shared.id;
            let _ = self.shared.send(&Command::RemovePublication {
                client,
                correlation: 0,
                id: self.id,
            });
        }
    }
}

/// Room for one message in a publication.
#[derive(Debug)]
pub struct Claim<'a> {
    claim: BroadcastClaim<'a>,
    count: &'a mut u64,
    meter: &'a AtomicU64,
}

impl Claim<'_> {
    /// The message's bytes, in shared memory.
    #[inline]
    pub fn buf(&mut self) -> &mut [u8] {
        self.claim.buf()
    }

    /// Publishes the message.
    #[inline]
    pub fn commit(self) {
        self.claim.commit();
        *self.count += 1;
        self.meter.store(*self.count, Ordering::Relaxed);
    }
}

/// A message handed to a subscription, borrowed from shared memory for the callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Message<'a> {
    /// Member id of the sending engine in the group.
    pub sender: u32,
    /// Stream.
    pub stream: u32,
    /// On the local path, the message's number in its publication (from 0); from the
    /// network, the sequence of its first frame in the sender's stream of frames.
    pub seq: u64,
    /// The view (membership epoch) it was sent in.
    pub view: u64,
    /// The local publication it came from, or 0 for messages from the network.
    pub session: u64,
    /// The message.
    pub payload: &'a [u8],
}

/// Something a subscription learns besides messages, at its point in the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubscriptionEvent {
    /// A local publication's messages start arriving.
    ImageAvailable {
        /// Its id.
        session: u64,
    },
    /// A local publication closed and everything it held was handed out.
    ImageUnavailable {
        /// Its id.
        session: u64,
    },
    /// A local publication's log could not be joined (all its reader slots are taken:
    /// `max_subscribers` in the engine's config); its messages do not arrive here.
    ImageUnreadable {
        /// The publication.
        session: u64,
        /// Why.
        reason: String,
    },
    /// This subscription stopped polling for longer than the timeout and was dropped from a
    /// local publication; its messages no longer arrive here.
    Evicted {
        /// The publication.
        session: u64,
    },
    /// Messages of `sender` from the network were lost for good (frames `first ..
    /// first + count`): they left its retransmit buffer before they could be recovered.
    UnrecoverableLoss {
        /// The sender.
        sender: u32,
        /// First lost frame.
        first: u64,
        /// Number of lost frames.
        count: u64,
    },
    /// This subscription fell more than its log behind the network: `missed` deliveries were
    /// overwritten before it read them.
    Lapped {
        /// How many.
        missed: u64,
    },
    /// (Groups with membership) a view was installed: the messages that follow belong to it
    /// (their `view`), and `seq` counts each sender's messages within it. `primary: false`:
    /// this engine is in a non-primary component and delivers nothing until it rejoins.
    View {
        /// View id.
        view: u32,
        /// The engine that coordinated it.
        coordinator: u32,
        /// Number of engines in it.
        members: u32,
        /// Whether it is primary.
        primary: bool,
        /// The state-transfer hook: this engine missed what the primary view this one
        /// continues delivered (it is new, or comes back from a crash or a partition); fetch
        /// the application's state from a member that has it.
        joined: bool,
    },
    /// (Safe order) the view ends: the safe messages up to the next view are held by the
    /// `members` engines that survived it, not by every member of the view.
    Transitional {
        /// How many.
        members: u32,
    },
    /// (Groups with membership) this engine left the group.
    Left,
}

/// What [`Subscription::poll`] hands out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery<'a> {
    /// A message.
    Message(Message<'a>),
    /// An event.
    Event(&'a SubscriptionEvent),
}

struct Image {
    session: u64,
    sender: u32,
    reader: BroadcastReader,
    closing: bool,
}

/// A subscription to a group's stream: local publications read in place, remote ones through
/// the engine's log.
pub struct Subscription {
    shared: Arc<Shared>,
    id: u64,
    stream: u32,
    remote: BroadcastReader,
    images: Vec<Image>,
    events: Receiver<ImageEvent>,
    queued: VecDeque<SubscriptionEvent>,
    count: u64,
    meter: Arc<AtomicU64>,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("id", &self.id)
            .field("images", &self.images.len())
            .finish()
    }
}

impl Subscription {
    /// Local publications this subscription reads now.
    pub fn images(&self) -> usize {
        self.images.len()
    }

    /// Messages handed out so far.
    pub fn received(&self) -> u64 {
        self.count
    }

    /// Hands up to `limit` messages and events to `f`, reading in place; returns how many.
    /// Never blocks: 0 means nothing is waiting.
    pub fn poll(&mut self, limit: usize, mut f: impl FnMut(Delivery<'_>)) -> Result<usize, IpcError> {
        self.shared.check()?;
        while let Ok(e) = self.events.try_recv() {
            match e {
                // The client's thread hands each image over once (see `Route::known`).
                ImageEvent::Available {
                    session,
                    sender,
                    reader,
                } => {
                    self.images.push(Image {
                        session,
                        sender,
                        reader: *reader,
                        closing: false,
                    });
                    self.queued
                        .push_back(SubscriptionEvent::ImageAvailable { session });
                }
                ImageEvent::Unreadable { session, reason } => {
                    self.queued
                        .push_back(SubscriptionEvent::ImageUnreadable { session, reason });
                }
                ImageEvent::Unavailable { session } => {
                    for i in self.images.iter_mut().filter(|i| i.session == session) {
                        i.closing = true;
                    }
                }
            }
        }
        let mut handed = 0;
        while handed < limit {
            let Some(e) = self.queued.pop_front() else { break };
            f(Delivery::Event(&e));
            handed += 1;
        }
        let stream = self.stream;
        let mut messages = 0u64;
        let mut i = 0;
        while i < self.images.len() && handed < limit {
            let image = &mut self.images[i];
            let (session, sender) = (image.session, image.sender);
            let r = image.reader.poll_sequenced(limit - handed, |_, seq, payload| {
                f(Delivery::Message(Message {
                    sender,
                    stream,
                    seq,
                    view: 0,
                    session,
                    payload,
                }))
            });
            let event = match r {
                Ok(n) => {
                    handed += n;
                    messages += n as u64;
                    (image.closing && !image.reader.has_records())
                        .then_some(SubscriptionEvent::ImageUnavailable { session })
                }
                Err(_) => Some(SubscriptionEvent::Evicted { session }),
            };
            match event {
                Some(e) => {
                    self.images.remove(i);
                    f(Delivery::Event(&e));
                    handed += 1;
                }
                None => i += 1,
            }
        }
        if handed < limit {
            let r = self.remote.poll(limit - handed, |t, rec| {
                // The engine writes these logs, but their bytes are still checked: a short
                // record is skipped, never read past.
                let need = match t {
                    1 | 2 => SINK_META_LEN,
                    3 => 16,
                    4 | 5 => 4,
                    _ => usize::MAX,
                };
                if rec.len() < need {
                    return;
                }
                let u32_at = |a: usize| u32::from_le_bytes(rec[a..a + 4].try_into().unwrap_or_default());
                let u64_at = |a: usize| u64::from_le_bytes(rec[a..a + 8].try_into().unwrap_or_default());
                match t {
                    1 => {
                        messages += 1;
                        f(Delivery::Message(Message {
                            sender: u32_at(0),
                            stream: u32_at(4),
                            seq: u64_at(8),
                            view: u64_at(16),
                            session: 0,
                            payload: &rec[SINK_META_LEN..],
                        }))
                    }
                    2 => f(Delivery::Event(&SubscriptionEvent::UnrecoverableLoss {
                        sender: u32_at(0),
                        first: u64_at(8),
                        count: u64_at(16),
                    })),
                    3 => f(Delivery::Event(&SubscriptionEvent::View {
                        view: u32_at(0),
                        coordinator: u32_at(4),
                        members: u32_at(8),
                        primary: u32_at(12) & 1 != 0,
                        joined: u32_at(12) & 2 != 0,
                    })),
                    4 => f(Delivery::Event(&SubscriptionEvent::Transitional {
                        members: u32_at(0),
                    })),
                    5 => f(Delivery::Event(&SubscriptionEvent::Left)),
                    _ => {}
                }
            });
            match r {
                Ok(n) => handed += n,
                Err(ReadError::Lapped { missed }) => {
                    f(Delivery::Event(&SubscriptionEvent::Lapped { missed }));
                    handed += 1;
                }
                Err(ReadError::Evicted) => {}
            }
        }
        if messages > 0 {
            self.count += messages;
            self.meter.store(self.count, Ordering::Relaxed);
        }
        Ok(handed)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if self.shared.check().is_ok() {
            let client = self.shared.id;
            let _ = self.shared.send(&Command::RemoveSubscription {
                client,
                correlation: 0,
                id: self.id,
            });
        }
    }
}
