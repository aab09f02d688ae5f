//! Membership, virtual synchrony and sequencer-free total order, over the reliable core.
//!
//! A [`GroupMember`] wraps one [`Member`] per installed view (its epoch is the view id) and adds
//! the membership protocol of `docs/protocol.md`: discovery and joins through the group's
//! address, failure detection by `STATE` heartbeats, graceful leaves, and view changes run by the
//! coordinator (the lowest id among the members it can reach) in three steps: `PROPOSE` (each
//! participant stops sending and freezes what it holds), `COMMIT` (the coordinator fixes the cut
//! of the old view's messages and who relays what), `INSTALL` (every participant holds the cut).
//! Partitions follow the primary-component model with dynamic voting: a view is primary when it
//! holds a majority of the last primary view and of every primary view attempted since; members
//! of a non-primary view deliver nothing and rejoin when the partition heals.
//!
//! Deliveries come in three orders, each its own queue ([`Order`]): `Fifo` per sender, `Total`
//! (by Lamport timestamp and sender id, once every sender of the view is known to be past that
//! timestamp), and `Safe` (total, and held by every member of the view). View events sit at the
//! same point relative to the messages in every queue.
//!
//! Sans-IO like [`Member`]: feed [`handle_datagram`](GroupMember::handle_datagram),
//! [`handle_timeout`](GroupMember::handle_timeout) and [`publish`](GroupMember::publish), then
//! drain [`poll_transmit`](GroupMember::poll_transmit) and
//! [`poll_output`](GroupMember::poll_output), and ask [`poll_timeout`](GroupMember::poll_timeout).

pub mod control;
pub mod keys;
pub mod udp;

use crate::proto::{Destination, Member, MemberConfig, Nanos, Output, Transmit};
use crate::wire::{self, DatagramWriter, Frame};
use crate::Error;
use control::{
    Control, CutEntry, ViewDesc, STATE_KEYED, STATE_LEAVING, STATE_PRIMARY, STATE_UPDATE_DUE,
    STATE_WANTS_SEND,
};
use keys::{GroupKeys, KeyStats, Keying, Package};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;

/// Secured groups: one heartbeat in this many of a keyed member is signed.
const SIGNED_HEARTBEAT_EVERY: u64 = 3;

/// The stream that carries flush relays; applications cannot publish on it.
pub const RELAY_STREAM: u32 = u32::MAX;
const RELAY_HEADER: usize = 4 + 8 + 8 + 4;

/// A delivery order, chosen per subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Order {
    /// Per-sender order.
    #[default]
    Fifo,
    /// One order at every member.
    Total,
    /// Total, and delivered once every member of the view holds the message.
    Safe,
}

impl Order {
    /// Every order.
    pub const ALL: [Order; 3] = [Order::Fifo, Order::Total, Order::Safe];

    fn index(self) -> usize {
        self as usize
    }

    /// Wire code (in the client binding's requests).
    pub fn code(self) -> u32 {
        self as u32
    }

    /// The order of a wire code.
    pub fn from_code(code: u32) -> Option<Order> {
        Order::ALL.get(code as usize).copied()
    }

    /// The lowercase name.
    pub fn name(self) -> &'static str {
        match self {
            Order::Fifo => "fifo",
            Order::Total => "total",
            Order::Safe => "safe",
        }
    }
}

impl std::str::FromStr for Order {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "fifo" => Ok(Order::Fifo),
            "total" => Ok(Order::Total),
            "safe" => Ok(Order::Safe),
            other => Err(format!("unknown order {other:?}: use fifo, total or safe")),
        }
    }
}

/// Settings of a group member. Defaults suit a LAN: a crash is noticed in about a second.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupConfig {
    /// The reliable-multicast settings (`epoch` is set to each view's id).
    pub member: MemberConfig,
    /// Ask to be a sender from the start (publishing asks too).
    pub sender: bool,
    /// The orders whose queues are filled.
    pub orders: Vec<Order>,
    /// A `STATE` heartbeat goes out at least this often.
    pub hello_interval_ns: Nanos,
    /// A member not heard from for this long is suspected and removed by the next view.
    pub fail_timeout_ns: Nanos,
    /// A new member listens this long for an existing group before it forms one.
    pub join_timeout_ns: Nanos,
    /// Membership work (coordinator checks, retransmission of view-change frames) runs this often.
    pub tick_ns: Nanos,
    /// A view change not finished in this time restarts without the members that did not answer.
    pub flush_timeout_ns: Nanos,
    /// Least time between two `STATE` frames sent because something changed (ordering promises,
    /// stability for safe delivery).
    pub ack_interval_ns: Nanos,
    /// The first view a new group forms is primary only with at least this many members.
    pub initial_members: usize,
    /// Bytes of messages published while the member may not send (joining, a view change).
    pub max_pending_bytes: usize,
}

impl Default for GroupConfig {
    fn default() -> Self {
        Self {
            member: MemberConfig::default(),
            sender: false,
            orders: Order::ALL.to_vec(),
            hello_interval_ns: 100_000_000,
            fail_timeout_ns: 1_000_000_000,
            join_timeout_ns: 500_000_000,
            tick_ns: 20_000_000,
            flush_timeout_ns: 2_000_000_000,
            ack_interval_ns: 200_000,
            initial_members: 1,
            max_pending_bytes: 4 << 20,
        }
    }
}

impl GroupConfig {
    /// Checks the settings.
    pub fn validate(&self) -> Result<(), Error> {
        self.member.validate()?;
        let bad = |m: &str| Err(Error::Config(m.to_string()));
        if self.hello_interval_ns == 0 || self.tick_ns == 0 || self.ack_interval_ns == 0 {
            return bad("hello_interval_ns, tick_ns and ack_interval_ns must be above zero");
        }
        if self.fail_timeout_ns <= self.hello_interval_ns {
            return bad("fail_timeout_ns must exceed hello_interval_ns");
        }
        if self.flush_timeout_ns <= self.tick_ns {
            return bad("flush_timeout_ns must exceed tick_ns");
        }
        Ok(())
    }
}

/// A view as applications see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ViewInfo {
    /// View id, increasing at each member; unique among primary views (both sides of a
    /// partition may number a non-primary view alike: `coordinator` tells them apart).
    pub id: u32,
    /// The member that coordinated the view change.
    pub coordinator: u32,
    /// Member ids, ascending.
    pub members: Vec<u32>,
    /// The senders, ascending (a subset of `members`).
    pub senders: Vec<u32>,
    /// Whether the view is primary: only primary views deliver.
    pub primary: bool,
    /// The state-transfer hook: this member did not end the primary view this one continues
    /// (it is new, or comes back from a crash or a non-primary component), so it missed what
    /// that view delivered; fetch the application's state from a member that did.
    pub joined: bool,
}

/// An event in the delivery stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupEvent {
    /// A primary view was installed; the messages that follow belong to it.
    View(ViewInfo),
    /// This member is in a non-primary component: nothing is delivered until it rejoins the
    /// primary (the application may then need a state transfer).
    NonPrimary(ViewInfo),
    /// The view is ending: the safe messages that follow (up to the next view) are held by
    /// every member of `members`, the survivors, not by every member of the view.
    Transitional {
        /// The members that flushed the view together.
        members: Vec<u32>,
    },
    /// This member left the group.
    Left,
}

/// A delivered message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupMessage {
    /// The sender.
    pub sender: u32,
    /// The view it was sent and delivered in.
    pub view: u32,
    /// Its index among the sender's messages of that view.
    pub index: u64,
    /// The sender's Lamport timestamp.
    pub timestamp: u64,
    /// The stream.
    pub stream: u32,
    /// The bytes.
    pub payload: Vec<u8>,
}

/// One item of a delivery queue.
#[derive(Debug, Clone)]
pub enum GroupOutput {
    /// A message.
    Message(Arc<GroupMessage>),
    /// An event.
    Event(Arc<GroupEvent>),
}

/// Counters of the membership layer.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct GroupStats {
    /// Views installed, primary or not.
    pub views_installed: u64,
    /// Non-primary views installed.
    pub non_primary_views: u64,
    /// View changes started as coordinator.
    pub rounds_started: u64,
    /// View changes abandoned (refused, timed out, or no longer coordinator).
    pub rounds_abandoned: u64,
    /// Members suspected because they did not answer a view change in time.
    pub suspected_in_flush: u64,
    /// Messages relayed to other survivors in a flush.
    pub relays_sent: u64,
    /// Relayed messages taken in.
    pub relays_accepted: u64,
    /// Old-view messages dropped because they lay beyond the flush cut.
    pub dropped_beyond_cut: u64,
    /// Messages from a member that is not a sender of the view, dropped.
    pub rejected_not_sender: u64,
    /// Membership frames that failed to decode.
    pub control_malformed: u64,
    /// Membership frames sent.
    pub control_sent: u64,
    /// Data losses the reliable layer could not repair inside a view.
    pub unrecoverable: u64,
}

#[derive(Debug, Clone, Default)]
struct PeerInfo {
    last_heard: Nanos,
    view: u32,
    /// The proposal it is frozen on (0: none).
    accepted: u32,
    leaving: bool,
    wants_send: bool,
    /// Secured groups: it holds the keys of its installed primary view.
    keyed: bool,
    /// Secured groups: its periodic self-update is due.
    update_due: bool,
}

/// The messages of one sender in the current view.
#[derive(Debug, Default)]
struct SenderLog {
    /// Messages `base..base + msgs.len()`.
    msgs: VecDeque<Arc<GroupMessage>>,
    base: u64,
    /// Messages the reliable layer handed on from this sender (its next index there).
    via_member: u64,
    next: [u64; 3],
    /// The sender's last `STATE` promise: after `sent` messages, timestamps exceed `clock`.
    promise: (u64, u64),
}

impl SenderLog {
    fn count(&self) -> u64 {
        self.base + self.msgs.len() as u64
    }
    fn get(&self, index: u64) -> Option<&Arc<GroupMessage>> {
        index
            .checked_sub(self.base)
            .and_then(|i| self.msgs.get(i as usize))
    }
}

/// Message buffers the log let go of while nobody else held them, for the next messages:
/// in steady state a message costs no allocation.
#[derive(Debug, Default)]
struct MessagePool {
    spare: Vec<Arc<GroupMessage>>,
    /// Let go of by the log while a delivery queue (or the application) still held them, in
    /// the order they went: the oldest is the first to be free.
    shared: VecDeque<Arc<GroupMessage>>,
}

/// Most buffers kept, and the largest payload capacity worth keeping.
const POOL_MAX: usize = 8192;
const POOL_MAX_PAYLOAD: usize = 64 << 10;

impl MessagePool {
    fn make(
        &mut self,
        sender: u32,
        view: u32,
        index: u64,
        timestamp: u64,
        stream: u32,
        payload: &[u8],
    ) -> Arc<GroupMessage> {
        let reusable = self.spare.pop().or_else(|| {
            self.shared
                .front()
                .is_some_and(|a| Arc::strong_count(a) == 1)
                .then(|| self.shared.pop_front())
                .flatten()
        });
        if let Some(mut a) = reusable {
            if let Some(m) = Arc::get_mut(&mut a) {
                m.sender = sender;
                m.view = view;
                m.index = index;
                m.timestamp = timestamp;
                m.stream = stream;
                m.payload.clear();
                m.payload.extend_from_slice(payload);
                return a;
            }
        }
        Arc::new(GroupMessage {
            sender,
            view,
            index,
            timestamp,
            stream,
            payload: payload.to_vec(),
        })
    }

    fn recycle(&mut self, m: Arc<GroupMessage>) {
        if m.payload.capacity() > POOL_MAX_PAYLOAD {
            return;
        }
        if Arc::strong_count(&m) == 1 {
            if self.spare.len() < POOL_MAX {
                self.spare.push(m);
            }
        } else {
            if self.shared.len() >= POOL_MAX {
                self.shared.pop_front();
            }
            self.shared.push_back(m);
        }
    }
}

/// What a member keeps of its installed primary view.
#[derive(Debug)]
struct ViewData {
    pool: MessagePool,
    view: ViewDesc,
    logs: Vec<SenderLog>,
    /// Per member of the view: its last reported prefixes.
    reports: BTreeMap<u32, Vec<u64>>,
    /// Deliveries stop here while a view change is under way (the counts reported, then the cut).
    limit: Option<Vec<u64>>,
    member: Member,
}

impl ViewData {
    fn sender_pos(&self, sender: u32) -> Option<usize> {
        self.view.senders.binary_search(&sender).ok()
    }
    fn counts(&self) -> Vec<u64> {
        self.logs.iter().map(SenderLog::count).collect()
    }
    fn avail(&self, s: usize) -> u64 {
        let c = self.logs[s].count();
        self.limit.as_ref().map_or(c, |l| c.min(l[s]))
    }
}

/// A proposal this member accepted as a participant.
#[derive(Debug, Clone)]
struct Accepted {
    view: ViewDesc,
    coord: u32,
    extra: Vec<u32>,
    commit: Option<(bool, u32, Vec<CutEntry>)>,
    /// The newest old primary view the commit flushes (0: none): the view the next continues.
    continues: u32,
    done: bool,
    /// Secured groups: the participant the coordinator named to commit, if not itself.
    delegate: Option<u32>,
}

/// A view change this member runs as coordinator.
#[derive(Debug)]
struct Round {
    view: ViewDesc,
    extra: Vec<u32>,
    started: Nanos,
    last_send: Nanos,
    states: BTreeMap<u32, Control>,
    commit: Option<Control>,
    done: BTreeSet<u32>,
    /// Secured groups: the participants' MLS epochs and key packages.
    packages: BTreeMap<u32, Package>,
    /// Secured groups: the key message of the commit, sent with it.
    keys: Option<Vec<u8>>,
    /// Secured groups: the participant that commits instead (its self-update).
    delegate: Option<u32>,
}

impl Round {
    fn participants(&self) -> impl Iterator<Item = u32> + '_ {
        self.view.members.iter().chain(&self.extra).copied()
    }
}

/// One member of a group with membership, virtual synchrony and ordered delivery.
#[derive(Debug)]
pub struct GroupMember {
    cfg: GroupConfig,
    id: u32,
    rng: ChaCha8Rng,
    started: Option<Nanos>,
    /// The time of the current call.
    now: Nanos,
    left: bool,
    /// When [`leave`](Self::leave) was called.
    leaving_since: Option<Nanos>,
    leaving: bool,
    wants_send: bool,
    /// The installed view (primary or not); `id` 0 before the first.
    view: ViewDesc,
    primary: bool,
    /// See [`ViewInfo::joined`], for the installed view.
    joined: bool,
    data: Option<ViewData>,
    last_primary: ViewDesc,
    attempts: Vec<ViewDesc>,
    max_seen: u32,
    peers: BTreeMap<u32, PeerInfo>,
    suspects: BTreeMap<u32, Nanos>,
    accepted: Option<Accepted>,
    /// A proposal this member finished the flush of when a later proposal came; installed if
    /// anyone is seen to have installed it, dropped when a later view commits without it.
    pending_install: Option<Accepted>,
    round: Option<Round>,
    /// Membership frames to send, each with whether its datagram must be signed.
    control_out: VecDeque<(Control, bool)>,
    /// Secured groups: the MLS key agreement.
    keys: Option<Box<Keying>>,
    next_hello: Nanos,
    next_tick: Nanos,
    last_state: Nanos,
    last_state_sent: (u64, u64, Vec<u64>),
    /// Heartbeats sent (secured groups sign some of them).
    heartbeats: u64,
    pending: VecDeque<(u32, Vec<u8>)>,
    pending_bytes: usize,
    relays: VecDeque<(usize, u64)>,
    outputs: [VecDeque<GroupOutput>; 3],
    enabled: [bool; 3],
    stats: GroupStats,
    scratch: Vec<u8>,
}

fn majority(members: &[u32], of: &ViewDesc) -> bool {
    let present = of
        .members
        .iter()
        .filter(|m| members.binary_search(m).is_ok())
        .count();
    present * 2 > of.members.len()
}

impl GroupMember {
    /// A member with `cfg`; `seed` seeds the reliable layer's back-off of every view.
    pub fn new(cfg: GroupConfig, seed: u64) -> Result<Self, Error> {
        cfg.validate()?;
        let mut enabled = [false; 3];
        for o in &cfg.orders {
            enabled[o.index()] = true;
        }
        Ok(Self {
            id: cfg.member.member_id,
            wants_send: cfg.sender,
            rng: ChaCha8Rng::seed_from_u64(seed),
            started: None,
            now: 0,
            left: false,
            leaving_since: None,
            leaving: false,
            view: ViewDesc::default(),
            primary: false,
            joined: false,
            data: None,
            last_primary: ViewDesc::default(),
            attempts: Vec::new(),
            max_seen: 0,
            peers: BTreeMap::new(),
            suspects: BTreeMap::new(),
            accepted: None,
            pending_install: None,
            round: None,
            control_out: VecDeque::new(),
            keys: None,
            next_hello: 0,
            next_tick: 0,
            last_state: 0,
            last_state_sent: (0, 0, Vec::new()),
            heartbeats: 0,
            pending: VecDeque::new(),
            pending_bytes: 0,
            relays: VecDeque::new(),
            outputs: Default::default(),
            enabled,
            stats: GroupStats::default(),
            scratch: Vec::new(),
            cfg,
        })
    }

    /// A member of a secured group: every primary view change is an MLS commit, a view is
    /// installed only with its epoch's keys, and each installed epoch comes out of
    /// [`poll_rekey`](Self::poll_rekey) for the data plane ([`keys`]). The member id must be
    /// the identity's ([`GroupKeys::id_of`]), and the policy must list it.
    pub fn new_keyed(cfg: GroupConfig, seed: u64, keys: GroupKeys) -> Result<Self, Error> {
        let public = keys.identity.public();
        if keys.id_of(&public) != cfg.member.member_id {
            return Err(Error::Config(format!(
                "member id {} is not the identity's ({})",
                cfg.member.member_id,
                keys.id_of(&public)
            )));
        }
        if !keys.policy.members.iter().any(|m| m.key == public) {
            return Err(Error::Config(format!("the policy does not list {public}")));
        }
        let group = cfg.member.group;
        let mut m = Self::new(cfg, seed)?;
        m.keys = Some(Box::new(Keying::new(keys, group)));
        Ok(m)
    }

    /// Secured groups: the next epoch to seal and open with, once its view is installed.
    /// Apply each before sealing anything more this member transmits.
    pub fn poll_rekey(&mut self) -> Option<crate::shield::ShieldEpoch> {
        self.keys.as_mut()?.poll_rekey()
    }

    /// Secured groups: the key agreement's counters.
    pub fn key_stats(&self) -> Option<&KeyStats> {
        self.keys.as_ref().map(|k| &k.stats)
    }

    /// Secured groups: whether this member holds its installed primary view's keys, and the
    /// MLS epoch it is in.
    pub fn key_state(&self) -> Option<(bool, Option<u64>)> {
        self.keys.as_ref().map(|k| (k.keyed(), k.mls_epoch()))
    }

    /// Secured groups: takes a later version of the signed policy (verified by the caller).
    /// Members it no longer lists are left out of the next view, whose MLS commit removes them;
    /// if it drops this member, this member leaves. Returns the roster for the shield's signed
    /// path ([`crate::shield::Shield::set_roster`]).
    pub fn update_policy(
        &mut self,
        policy: intergroup_secure::Policy,
    ) -> Result<Vec<(u32, intergroup_secure::PublicKey)>, Error> {
        let k = self
            .keys
            .as_mut()
            .ok_or_else(|| Error::Config("the group is not keyed by MLS".into()))?;
        let roster = k.set_policy(policy).map_err(Error::Config)?;
        if !k.listed(self.id) && !self.left {
            self.leave();
        }
        self.next_tick = self.now;
        Ok(roster)
    }

    /// Queues a membership frame; in secured groups its datagram is signed.
    fn push_control(&mut self, c: Control) {
        let signed = self.keys.is_some();
        self.control_out.push_back((c, signed));
    }

    /// This member's id.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The installed view, if any.
    pub fn view(&self) -> Option<ViewInfo> {
        (self.view.id != 0).then(|| ViewInfo {
            id: self.view.id,
            coordinator: self.view.coord,
            members: self.view.members.clone(),
            senders: self.view.senders.clone(),
            primary: self.primary,
            joined: self.joined,
        })
    }

    /// Whether this member left the group (after [`leave`](Self::leave)).
    pub fn has_left(&self) -> bool {
        self.left
    }

    /// The membership counters.
    pub fn stats(&self) -> &GroupStats {
        &self.stats
    }

    /// The reliable layer of the installed primary view.
    pub fn member(&self) -> Option<&Member> {
        self.data.as_ref().map(|d| &d.member)
    }

    /// Whether this member holds message `index` of `sender` in view `view`: `None` if it is
    /// no longer (or not yet) in that view.
    pub fn holds(&self, view: u32, sender: u32, index: u64) -> Option<bool> {
        let d = self.data.as_ref().filter(|d| d.view.id == view)?;
        Some(d.sender_pos(sender).is_some_and(|s| d.logs[s].count() > index))
    }

    /// The reliable-multicast settings every view's member starts from.
    pub fn member_config(&self) -> &MemberConfig {
        &self.cfg.member
    }

    /// Asks to become a sender in the next view (publishing asks too).
    pub fn want_to_send(&mut self) {
        self.wants_send = true;
    }

    /// Items waiting in `order`'s delivery queue.
    pub fn pending_outputs(&self, order: Order) -> usize {
        self.outputs[order.index()].len()
    }

    /// Bytes published but not yet handed to the reliable layer.
    pub fn pending_bytes(&self) -> usize {
        self.pending_bytes
    }

    /// Leaves the group gracefully: the next view excludes this member, which delivers the
    /// rest of its view and then reports [`GroupEvent::Left`].
    ///
    /// If no view change takes this member out within `flush_timeout_ns` (the others are
    /// unreachable, say), it leaves on its own: it delivers nothing more and reports `Left`.
    pub fn leave(&mut self) {
        self.leaving = true;
        self.leaving_since.get_or_insert(self.now);
        self.next_hello = 0;
    }

    /// Publishes `message` on `stream`: sent now if this member may send, else queued until it
    /// may (it asks to become a sender, or waits out a view change).
    pub fn publish(&mut self, stream: u32, message: &[u8]) -> Result<(), Error> {
        if stream == RELAY_STREAM {
            return Err(Error::Config(format!("stream {RELAY_STREAM} is reserved")));
        }
        if self.left || self.leaving {
            return Err(Error::Config("this member has left the group".into()));
        }
        if message.len() > self.cfg.member.max_message_bytes {
            return Err(Error::MessageTooLarge {
                len: message.len(),
                max: self.cfg.member.max_message_bytes,
            });
        }
        self.wants_send = true;
        if self.pending.is_empty() && self.may_send() {
            return self.send_now(stream, message);
        }
        if self.pending_bytes + message.len() > self.cfg.max_pending_bytes && !self.pending.is_empty() {
            return Err(Error::BackPressured);
        }
        self.pending_bytes += message.len();
        self.pending.push_back((stream, message.to_vec()));
        Ok(())
    }

    fn may_send(&self) -> bool {
        self.accepted.is_none()
            && !self.leaving
            && self
                .data
                .as_ref()
                .is_some_and(|d| d.sender_pos(self.id).is_some())
    }

    fn send_now(&mut self, stream: u32, message: &[u8]) -> Result<(), Error> {
        let id = self.id;
        let d = self.data.as_mut().expect("may_send checked");
        d.member.publish(stream, message)?;
        let s = d.sender_pos(id).expect("may_send checked");
        let log = &mut d.logs[s];
        let msg = d
            .pool
            .make(id, d.view.id, log.count(), d.member.clock(), stream, message);
        log.msgs.push_back(msg);
        log.promise = (log.count(), d.member.clock());
        self.deliver();
        Ok(())
    }

    fn pump_pending(&mut self) {
        while self.may_send() {
            let Some((stream, msg)) = self.pending.pop_front() else {
                break;
            };
            match self.send_now(stream, &msg) {
                Ok(()) => self.pending_bytes -= msg.len(),
                Err(_) => {
                    self.pending.push_front((stream, msg));
                    break;
                }
            }
        }
    }

    fn start(&mut self, now: Nanos) {
        self.now = self.now.max(now);
        if self.started.is_none() {
            self.started = Some(now);
            self.next_tick = now + self.cfg.join_timeout_ns;
            self.next_hello = now;
        }
    }

    /// Takes one datagram received at `now` from `from`.
    pub fn handle_datagram(&mut self, now: Nanos, from: SocketAddr, bytes: &[u8]) {
        self.start(now);
        if self.left {
            return;
        }
        let Ok((header, frames)) = wire::decode_datagram(bytes) else {
            // The reliable layer counts malformed datagrams.
            if let Some(d) = self.data.as_mut() {
                d.member.handle_datagram(now, from, bytes);
            }
            return;
        };
        if header.group.get() != self.cfg.member.group {
            if let Some(d) = self.data.as_mut() {
                d.member.handle_datagram(now, from, bytes);
            }
            return;
        }
        let source = header.source.get();
        if source == self.id {
            return;
        }
        self.peers.entry(source).or_default().last_heard = now;
        let mut other = false;
        let mut controls = Vec::new();
        for f in frames {
            match f {
                Ok(Frame::Membership { kind, body }) => match Control::decode(kind, body) {
                    Ok(c) => controls.push(c),
                    Err(_) => self.stats.control_malformed += 1,
                },
                _ => other = true,
            }
        }
        for c in controls {
            self.on_control(now, source, c);
        }
        if other {
            self.absorb(Some((now, from, bytes)));
        }
    }

    /// Runs the timers due at `now`.
    pub fn handle_timeout(&mut self, now: Nanos) {
        self.start(now);
        if self.left {
            return;
        }
        if let Some(d) = self.data.as_mut() {
            d.member.handle_timeout(now);
        }
        self.absorb(None);
        if now >= self.next_tick {
            self.next_tick = now + self.cfg.tick_ns;
            self.tick(now);
        }
    }

    /// The next time [`handle_timeout`](Self::handle_timeout) has work.
    pub fn poll_timeout(&self) -> Option<Nanos> {
        if self.left {
            return None;
        }
        let mut t = self.next_tick.min(self.next_hello);
        if self.state_changed() {
            t = t.min(self.last_state + self.cfg.ack_interval_ns);
        }
        if let Some(m) = self.data.as_ref().and_then(|d| d.member.poll_timeout()) {
            t = t.min(m);
        }
        Some(t)
    }

    /// Writes the next datagram into `buf`: membership frames first, then the reliable layer's.
    pub fn poll_transmit(&mut self, now: Nanos, buf: &mut [u8]) -> Option<Transmit> {
        if self.left {
            return None;
        }
        self.start(now);
        self.pump_relays();
        self.pump_pending();
        if now >= self.next_hello {
            self.queue_state(now, true);
        } else if self.state_changed() && now >= self.last_state + self.cfg.ack_interval_ns {
            self.queue_state(now, false);
        }
        if let Some((c, signed)) = self.control_out.pop_front() {
            c.encode(&mut self.scratch);
            let mtu = self.cfg.member.mtu.min(buf.len());
            let mut w = DatagramWriter::new(&mut buf[..mtu], self.cfg.member.group, self.id)?;
            if !w.push_membership(c.kind(), &self.scratch) {
                // Larger than the MTU allows (a view beyond the member limit): not sendable.
                self.stats.control_malformed += 1;
                return self.poll_transmit(now, buf);
            }
            self.stats.control_sent += 1;
            return Some(Transmit {
                destination: Destination::Group,
                len: w.len(),
                new_data_frames: 0,
                in_place: None,
                signed,
            });
        }
        self.data.as_mut()?.member.poll_transmit(now, buf)
    }

    /// The next item of `order`'s delivery queue.
    pub fn poll_output(&mut self, order: Order) -> Option<GroupOutput> {
        self.outputs[order.index()].pop_front()
    }

    fn state_changed(&self) -> bool {
        let Some(d) = &self.data else {
            return false;
        };
        let (sent, clock, ref counts) = self.last_state_sent;
        let own = d.sender_pos(self.id).map_or(0, |s| d.logs[s].count());
        own != sent
            || d.member.clock() != clock
            || !counts.iter().copied().eq(d.logs.iter().map(SenderLog::count))
    }

    /// Queues a `STATE`: `periodic` for the heartbeat, else an acknowledgement. In secured
    /// groups every third heartbeat is signed (members without the keys must hear the group),
    /// and so is everything a member without the keys sends.
    fn queue_state(&mut self, now: Nanos, periodic: bool) {
        self.next_hello = now + self.cfg.hello_interval_ns;
        self.last_state = now;
        let mut flags = 0;
        if self.primary {
            flags |= STATE_PRIMARY;
        }
        if self.leaving {
            flags |= STATE_LEAVING;
        }
        if self.wants_send {
            flags |= STATE_WANTS_SEND;
        }
        let keyed = self.keys.as_ref().is_some_and(|k| k.keyed());
        if keyed {
            flags |= STATE_KEYED;
        }
        if self.keys.as_ref().is_some_and(|k| k.update_due(now)) {
            flags |= STATE_UPDATE_DUE;
        }
        // Every third heartbeat of a keyed member is signed (members without the keys hear the
        // group by these, about every 300 ms by default); the rest are sealed, so each member
        // verifies a third as many signatures (about 50 us each).
        if periodic {
            self.heartbeats += 1;
        }
        let signed =
            self.keys.is_some() && (!keyed || (periodic && self.heartbeats % SIGNED_HEARTBEAT_EVERY == 1));
        let (sent, clock, prefixes) = match &self.data {
            Some(d) => (
                d.sender_pos(self.id).map_or(0, |s| d.logs[s].count()),
                d.member.clock(),
                d.counts(),
            ),
            None => (0, 0, Vec::new()),
        };
        self.last_state_sent = (sent, clock, prefixes.clone());
        self.control_out.push_back((
            Control::State {
                view: self.view.id,
                coord: self.view.coord,
                accepted: self.accepted.as_ref().map_or(0, |a| a.view.id),
                flags,
                sent,
                clock,
                prefixes,
            },
            signed,
        ));
    }

    /// Takes what the reliable layer delivered into the sender logs: first what `datagram`
    /// makes deliverable (in-order messages come straight out of it, with no queue or copy in
    /// the reliable layer), then anything queued.
    fn absorb(&mut self, datagram: Option<(Nanos, SocketAddr, &[u8])>) {
        let Some(d) = self.data.as_mut() else {
            return;
        };
        let ViewData {
            view,
            logs,
            limit,
            member,
            pool,
            ..
        } = d;
        let stats = &mut self.stats;
        let frozen_cut =
            self.accepted.as_ref().is_some_and(|a| a.commit.is_some()) || self.pending_install.is_some();
        let mut take = |out: Output<'_>| take_output(view, logs, limit, pool, stats, frozen_cut, out);
        if let Some((now, from, bytes)) = datagram {
            member.handle_datagram_with(now, from, bytes, &mut |out: &Output<'_>| take(*out));
        }
        member.drain(take);
        self.deliver();
        self.check_done();
    }

    /// Hands on what each order may deliver now.
    fn deliver(&mut self) {
        let Some(d) = self.data.as_mut() else {
            return;
        };
        if !self.primary {
            return;
        }
        let clock = d.member.clock();
        if self.enabled[0] {
            deliver_fifo(d, &mut self.outputs[0]);
        }
        for (o, safe) in [(1, false), (2, true)] {
            if self.enabled[o] {
                deliver_ordered(d, self.id, clock, o, safe, false, &mut self.outputs[o]);
            }
        }
        collect_garbage(d, self.id, &self.enabled);
    }

    fn tick(&mut self, now: Nanos) {
        self.suspects.retain(|_, until| *until > now);
        if self
            .leaving_since
            .is_some_and(|t| now >= t + self.cfg.flush_timeout_ns)
        {
            self.left = true;
            self.data = None;
            self.control_out.clear();
            self.push_event(GroupEvent::Left);
            return;
        }
        if let Some(a) = &self.accepted {
            // Resend what the coordinator is waiting for from us.
            if a.done {
                self.send_to(a.coord, Control::FlushDone { proposal: a.view.id });
            }
        }
        self.coordinate(now);
    }

    fn reachable(&self, now: Nanos) -> Vec<u32> {
        let mut r: Vec<u32> = self
            .peers
            .iter()
            .filter(|(id, p)| {
                now < p.last_heard + self.cfg.fail_timeout_ns
                    && !p.leaving
                    && !self.suspects.contains_key(id)
                    && self.keys.as_ref().is_none_or(|k| k.listed(**id))
            })
            .map(|(&id, _)| id)
            .collect();
        if !self.leaving {
            r.push(self.id);
        }
        r.sort_unstable();
        r
    }

    /// Who coordinates among `reachable`: the lowest id; in secured groups the lowest id
    /// among the members that hold the keys of a primary view if any does (only they can
    /// commit the next epoch), else the lowest id (a new group: it founds the MLS group).
    fn coordinator_of(&self, reachable: &[u32]) -> Option<u32> {
        let Some(k) = &self.keys else {
            return reachable.first().copied();
        };
        reachable
            .iter()
            .copied()
            .find(|&m| {
                if m == self.id {
                    k.keyed()
                } else {
                    self.peers.get(&m).is_some_and(|p| p.keyed)
                }
            })
            .or_else(|| reachable.first().copied())
    }

    /// Secured groups: the primary view's keys must move on though its members do not: a
    /// member's periodic self-update is due (seen in a `STATE` of this view), or a later policy
    /// came since the epoch was installed.
    fn needs_new_epoch(&self, now: Nanos, reachable: &[u32]) -> bool {
        let Some(k) = self.keys.as_ref().filter(|k| self.primary && k.keyed()) else {
            return false;
        };
        k.update_due(now)
            || k.policy_pending()
            || reachable.iter().any(|m| {
                self.peers
                    .get(m)
                    .is_some_and(|p| p.update_due && p.view == self.view.id)
            })
    }

    fn coordinate(&mut self, now: Nanos) {
        let reachable = self.reachable(now);
        if self.leaving || self.coordinator_of(&reachable) != Some(self.id) {
            if self.round.take().is_some() {
                self.stats.rounds_abandoned += 1;
            }
            return;
        }
        if self.round.is_some() {
            self.progress_round(now);
            return;
        }
        let senders: Vec<u32> = reachable
            .iter()
            .copied()
            .filter(|&m| {
                self.view.senders.binary_search(&m).is_ok()
                    || if m == self.id {
                        self.wants_send
                    } else {
                        self.peers.get(&m).is_some_and(|p| p.wants_send)
                    }
            })
            .collect();
        let extra: Vec<u32> = self
            .view
            .members
            .iter()
            .copied()
            .filter(|m| {
                *m != self.id
                    && self
                        .peers
                        .get(m)
                        .is_some_and(|p| p.leaving && now < p.last_heard + self.cfg.fail_timeout_ns)
            })
            .collect();
        let mut lagging = Vec::new();
        let mut ahead = false;
        for m in &reachable {
            if *m == self.id {
                continue;
            }
            let v = self.peers[m].view;
            // A member frozen on a proposal nobody drives any more (its coordinator gave way
            // to us): only a new view change releases it.
            if v > self.view.id || self.peers[m].accepted > self.view.id {
                ahead = true;
            } else if v < self.view.id && self.view.members.binary_search(m).is_ok() {
                lagging.push(*m);
            }
        }
        let stable = self.view.id != 0
            && self.view.members == reachable
            && (self.view.senders == senders || !self.primary)
            && extra.is_empty()
            && !ahead
            && !self.needs_new_epoch(now, &reachable);
        if stable {
            if !lagging.is_empty() {
                // Members that agreed to this view but missed its INSTALL (its coordinator may
                // be gone): the view is committed and every participant was done.
                self.push_control(Control::Install {
                    view: self.view.clone(),
                });
            }
            return;
        }
        self.max_seen = self.max_seen.max(self.view.id);
        let round = Round {
            view: ViewDesc {
                id: self.max_seen + 1,
                coord: self.id,
                members: reachable,
                senders,
            },
            extra,
            started: now,
            last_send: 0,
            states: BTreeMap::new(),
            commit: None,
            done: BTreeSet::new(),
            packages: BTreeMap::new(),
            keys: None,
            delegate: None,
        };
        self.max_seen = round.view.id;
        self.stats.rounds_started += 1;
        self.round = Some(round);
        self.progress_round(now);
    }

    fn progress_round(&mut self, now: Nanos) {
        let Some(r) = self.round.as_mut() else {
            return;
        };
        if now >= r.started + self.cfg.flush_timeout_ns {
            let waiting_on: Vec<u32> = r
                .participants()
                .filter(|p| {
                    *p != self.id
                        && if r.commit.is_none() {
                            !r.states.contains_key(p)
                        } else {
                            !r.done.contains(p)
                        }
                })
                .collect();
            for p in waiting_on {
                self.stats.suspected_in_flush += 1;
                self.suspects.insert(p, now + self.cfg.fail_timeout_ns);
            }
            self.round = None;
            self.stats.rounds_abandoned += 1;
            return;
        }
        if now < r.last_send + self.cfg.tick_ns && r.last_send != 0 {
            return;
        }
        r.last_send = now;
        let msg = match &r.commit {
            None => Control::Propose {
                view: r.view.clone(),
                extra: r.extra.clone(),
            },
            Some(c) => c.clone(),
        };
        let delegate = r
            .delegate
            .filter(|_| r.commit.is_some())
            .map(|committer| Control::Delegate {
                proposal: r.view.id,
                committer,
            });
        self.push_control(msg.clone());
        self.push_key_fragments();
        self.on_control(now, self.id, msg);
        if let Some(d) = delegate {
            self.push_control(d.clone());
            self.on_control(now, self.id, d);
        }
    }

    fn send_to(&mut self, coord: u32, c: Control) {
        if coord == self.id {
            self.on_coordinator_input(self.now, self.id, c);
        } else {
            self.push_control(c);
        }
    }

    /// Queues every fragment of the round's key message (after its `COMMIT`).
    fn push_key_fragments(&mut self) {
        let Some(r) = self.round.as_mut().filter(|r| r.commit.is_some()) else {
            return;
        };
        let Some(keys) = r.keys.take() else {
            return;
        };
        let proposal = r.view.id;
        self.push_fragments(proposal, &keys);
        if let Some(r) = self.round.as_mut() {
            r.keys = Some(keys);
        }
    }

    /// Queues `keys`, the key message of `proposal`, in fragments that fit a datagram.
    fn push_fragments(&mut self, proposal: u32, keys: &[u8]) {
        // The datagram header, the frame header and the fragment's fields.
        let room = self
            .cfg
            .member
            .mtu
            .saturating_sub(wire::DATAGRAM_HEADER_LEN + wire::FRAME_HEADER_LEN + 14);
        let room = room.clamp(64, usize::from(u16::MAX));
        let total = keys.len() as u32;
        for (k, chunk) in keys.chunks(room).enumerate() {
            self.push_control(Control::Keys {
                proposal,
                total,
                offset: (k * room) as u32,
                chunk: chunk.to_vec(),
            });
        }
    }

    fn on_control(&mut self, now: Nanos, source: u32, c: Control) {
        match c {
            Control::State {
                view,
                coord,
                accepted,
                flags,
                sent,
                clock,
                prefixes,
            } => {
                // Proof that a view this member finished the flush of was installed.
                let proof = |a: &Option<Accepted>| {
                    a.as_ref().is_some_and(|a| {
                        a.done
                            && a.view.id == view
                            && a.view.coord == coord
                            && a.view.members.binary_search(&source).is_ok()
                    })
                };
                if proof(&self.pending_install) || proof(&self.accepted) {
                    let v = if proof(&self.pending_install) {
                        self.pending_install.as_ref()
                    } else {
                        self.accepted.as_ref()
                    }
                    .expect("proved")
                    .view
                    .clone();
                    self.on_install(&v);
                }
                let p = self.peers.entry(source).or_default();
                p.view = view;
                p.accepted = accepted;
                p.leaving = flags & STATE_LEAVING != 0;
                p.wants_send = flags & STATE_WANTS_SEND != 0;
                p.keyed = flags & STATE_KEYED != 0;
                p.update_due = flags & STATE_UPDATE_DUE != 0;
                self.max_seen = self.max_seen.max(view);
                if let Some(d) = self.data.as_mut().filter(|d| d.view.id == view) {
                    if prefixes.len() == d.logs.len() && d.view.members.binary_search(&source).is_ok() {
                        if let Some(s) = d.sender_pos(source) {
                            d.logs[s].promise = (sent, clock);
                        }
                        d.reports.insert(source, prefixes);
                        self.deliver();
                    }
                }
            }
            Control::Propose { view, extra } => self.on_propose(source, view, extra),
            Control::Commit {
                view,
                extra,
                primary,
                flushes,
            } => {
                // The flush of the view this member holds data of, if any.
                let mine = self.data.as_ref().map_or(0, |d| d.view.id);
                let continues = flushes.iter().map(|f| f.0).max().unwrap_or(0);
                let (old_view, cut) = flushes.into_iter().find(|(v, _)| *v == mine).unwrap_or_default();
                self.on_commit(source, view, extra, primary, old_view, cut);
                if let Some(a) = self.accepted.as_mut().filter(|a| a.commit.is_some()) {
                    a.continues = continues;
                }
            }
            Control::Install { view } => self.on_install(&view),
            Control::Delegate { proposal, committer } => {
                let Some(a) = self
                    .accepted
                    .as_mut()
                    .filter(|a| a.view.id == proposal && a.coord == source)
                else {
                    return;
                };
                a.delegate = Some(committer);
                if committer == self.id {
                    // This member commits its self-update; every repeat of the coordinator's
                    // request sends the key message again.
                    if let Some(message) = self.keys.as_mut().and_then(|k| k.self_update(proposal)) {
                        self.push_fragments(proposal, &message);
                        self.check_done();
                    }
                }
            }
            Control::Keys {
                proposal,
                total,
                offset,
                chunk,
            } => {
                let mine = self.accepted.as_ref().is_some_and(|a| {
                    a.view.id == proposal
                        && (a.coord == source || a.delegate == Some(source))
                        && a.view.members.binary_search(&self.id).is_ok()
                });
                if let Some(k) = self.keys.as_mut().filter(|_| mine) {
                    if k.on_fragment(proposal, total, offset, chunk) {
                        self.check_done();
                    }
                }
            }
            c @ (Control::FlushState { .. }
            | Control::FlushDone { .. }
            | Control::Refuse { .. }
            | Control::KeyPackage { .. }) => self.on_coordinator_input(now, source, c),
        }
    }

    fn on_propose(&mut self, coord: u32, view: ViewDesc, extra: Vec<u32>) {
        self.max_seen = self.max_seen.max(view.id);
        if view.members.binary_search(&self.id).is_err() && !extra.contains(&self.id) {
            return;
        }
        if let Some(a) = &self.accepted {
            if a.view.id > view.id || (a.view.id == view.id && a.coord != coord) {
                let refuse = Control::Refuse {
                    proposal: view.id,
                    seen: self.max_seen,
                };
                self.send_to(coord, refuse);
                return;
            }
            if a.view.id == view.id {
                // A repeat: answer again with the same frozen state.
                let state = self.flush_state(view.id);
                self.send_to(coord, state);
                self.send_key_package(coord, view.id);
                return;
            }
        }
        if view.id <= self.view.id {
            let refuse = Control::Refuse {
                proposal: view.id,
                seen: self.max_seen,
            };
            self.send_to(coord, refuse);
            return;
        }
        if let Some(a) = self.accepted.take() {
            if a.done {
                if let Some(p) = self.pending_install.take() {
                    self.forget_keys(p.view.id);
                }
                self.pending_install = Some(a);
            } else {
                self.forget_keys(a.view.id);
            }
        }
        if let Some(d) = self.data.as_mut() {
            // Freeze: deliver nothing beyond what is reported, send nothing new. Nothing was
            // delivered beyond the current counts, whatever an earlier round fixed.
            d.limit = Some(d.counts());
        }
        self.accepted = Some(Accepted {
            view,
            coord,
            extra,
            commit: None,
            continues: 0,
            done: false,
            delegate: None,
        });
        let proposal = self.accepted.as_ref().expect("set").view.id;
        let state = self.flush_state(proposal);
        self.send_to(coord, state);
        self.send_key_package(coord, proposal);
    }

    /// Secured groups: this member's key package and MLS epoch, with its answer to `proposal`.
    fn send_key_package(&mut self, coord: u32, proposal: u32) {
        let Some(k) = self.keys.as_mut() else {
            return;
        };
        if let Some(c) = k.key_package(proposal, self.now) {
            self.send_to(coord, c);
        }
    }

    fn forget_keys(&mut self, proposal: u32) {
        if let Some(k) = self.keys.as_mut() {
            k.forget(proposal);
        }
    }

    fn flush_state(&self, proposal: u32) -> Control {
        let prefixes = match &self.data {
            Some(d) => d
                .view
                .senders
                .iter()
                .enumerate()
                .map(|(s, &id)| (id, d.avail(s)))
                .collect(),
            None => Vec::new(),
        };
        Control::FlushState {
            proposal,
            view: self.view.id,
            view_coord: self.view.coord,
            pending: self
                .pending_install
                .as_ref()
                .map(|a| a.view.clone())
                .unwrap_or_default(),
            primary: self.primary,
            last_primary: self.last_primary.clone(),
            attempts: self.attempts.clone(),
            prefixes,
        }
    }

    fn on_commit(
        &mut self,
        coord: u32,
        view: ViewDesc,
        extra: Vec<u32>,
        primary: bool,
        old_view: u32,
        cut: Vec<CutEntry>,
    ) {
        let Some(a) = self.accepted.as_mut() else {
            return;
        };
        if a.view.id != view.id || a.coord != coord {
            return;
        }
        if a.commit.is_none() {
            // A later view committed: whatever this member had pending was never installed by
            // any participant (the coordinator checked), so it is dropped.
            if let Some(p) = self.pending_install.take() {
                if let Some(k) = self.keys.as_mut() {
                    k.forget(p.view.id);
                }
            }
            if let Some(k) = self.keys.as_mut() {
                if !primary || view.members.binary_search(&self.id).is_err() {
                    k.nothing_to_stage(view.id);
                }
            }
            if primary && !self.attempts.iter().any(|x| x.id == view.id) {
                self.attempts.push(view.clone());
            }
            a.view = view;
            a.extra = extra;
            a.commit = Some((primary, old_view, cut.clone()));
            if let Some(d) = self.data.as_mut().filter(|d| d.view.id == old_view) {
                let mut limit = vec![0; d.logs.len()];
                for e in &cut {
                    if let Some(s) = d.sender_pos(e.sender) {
                        limit[s] = e.count;
                        let log = &mut d.logs[s];
                        while log.count() > e.count {
                            log.msgs.pop_back();
                            self.stats.dropped_beyond_cut += 1;
                        }
                        if e.holder == self.id {
                            for i in e.from.max(log.base)..log.count() {
                                self.relays.push_back((s, i));
                            }
                        }
                    }
                }
                d.limit = Some(limit);
            }
            self.pump_relays();
        }
        self.check_done();
        if let Some(a) = &self.accepted {
            if a.done {
                let (coord, proposal) = (a.coord, a.view.id);
                self.send_to(coord, Control::FlushDone { proposal });
            }
        }
    }

    fn pump_relays(&mut self) {
        let Some(d) = self.data.as_mut() else {
            self.relays.clear();
            return;
        };
        while let Some(&(s, i)) = self.relays.front() {
            let Some(m) = d.logs[s].get(i).cloned() else {
                self.relays.pop_front();
                continue;
            };
            let mut env = Vec::with_capacity(RELAY_HEADER + m.payload.len());
            env.extend_from_slice(&m.sender.to_le_bytes());
            env.extend_from_slice(&m.index.to_le_bytes());
            env.extend_from_slice(&m.timestamp.to_le_bytes());
            env.extend_from_slice(&m.stream.to_le_bytes());
            env.extend_from_slice(&m.payload);
            if d.member.publish(RELAY_STREAM, &env).is_err() {
                break;
            }
            self.stats.relays_sent += 1;
            self.relays.pop_front();
        }
    }

    fn check_done(&mut self) {
        let Some(a) = self.accepted.as_mut() else {
            return;
        };
        let Some((_, old_view, cut)) = &a.commit else {
            return;
        };
        if a.done {
            return;
        }
        // Secured groups: not done before this member holds the next view's keys.
        if self.keys.as_ref().is_some_and(|k| !k.is_ready(a.view.id)) {
            return;
        }
        let done = match self.data.as_ref().filter(|d| d.view.id == *old_view) {
            None => true,
            Some(d) => cut.iter().all(|e| {
                d.sender_pos(e.sender)
                    .is_none_or(|s| d.logs[s].count() >= e.count)
            }),
        };
        if done {
            a.done = true;
            let (coord, proposal) = (a.coord, a.view.id);
            self.send_to(coord, Control::FlushDone { proposal });
        }
    }

    fn on_coordinator_input(&mut self, now: Nanos, source: u32, c: Control) {
        let Some(r) = self.round.as_mut() else {
            return;
        };
        match c {
            Control::Refuse { proposal, seen } if proposal == r.view.id => {
                self.max_seen = self.max_seen.max(seen);
                self.round = None;
                self.stats.rounds_abandoned += 1;
            }
            Control::FlushState {
                proposal,
                view,
                ref last_primary,
                ref attempts,
                ..
            } if proposal == r.view.id && r.commit.is_none() => {
                let newest = attempts
                    .iter()
                    .map(|a| a.id)
                    .chain([view, last_primary.id])
                    .max()
                    .unwrap_or(0);
                if newest >= r.view.id {
                    // Our number is stale: start again above it.
                    self.max_seen = self.max_seen.max(newest);
                    self.round = None;
                    self.stats.rounds_abandoned += 1;
                    return;
                }
                if r.participants().any(|p| p == source) {
                    r.states.insert(source, c);
                }
                self.try_commit(now);
            }
            Control::KeyPackage {
                proposal,
                epoch,
                update,
                package,
            } if proposal == r.view.id && r.commit.is_none() => {
                if r.participants().any(|p| p == source) {
                    r.packages.insert(
                        source,
                        Package {
                            epoch,
                            update,
                            package,
                        },
                    );
                }
                self.try_commit(now);
            }
            Control::FlushDone { proposal } if proposal == r.view.id && r.commit.is_some() => {
                r.done.insert(source);
                if r.participants().all(|p| r.done.contains(&p)) {
                    let view = r.view.clone();
                    self.round = None;
                    self.push_control(Control::Install { view: view.clone() });
                    self.on_install(&view);
                }
            }
            _ => {}
        }
    }

    /// Commits the round once every participant answered (and, in secured groups, sent its key
    /// package; a primary view's commit is then also the MLS commit).
    fn try_commit(&mut self, now: Nanos) {
        let Some(r) = self.round.as_mut() else {
            return;
        };
        if r.commit.is_some() || !r.participants().all(|p| r.states.contains_key(&p)) {
            return;
        }
        if let Some(v) = installed_pending(r) {
            // Some participant finished a view that another installed: it must
            // install it before any further view.
            self.round = None;
            self.stats.rounds_abandoned += 1;
            self.push_control(Control::Install { view: v.clone() });
            self.on_install(&v);
            return;
        }
        if self.keys.is_some() && !r.participants().all(|p| r.packages.contains_key(&p)) {
            return;
        }
        let commit = make_commit(r, self.cfg.initial_members);
        if let (
            Some(k),
            Control::Commit {
                view, primary: true, ..
            },
        ) = (self.keys.as_mut(), &commit)
        {
            r.delegate = k.delegate(self.id, &view.members, &r.packages);
            let result = match r.delegate {
                // The delegate's self-update is the commit: this coordinator stages it.
                Some(_) => Ok(None),
                None => k.commit(self.id, view.id, &view.members, &r.packages).map(Some),
            };
            match result {
                Ok(message) => r.keys = message,
                Err(refused) => {
                    // A key package missing or refused: the view goes on without its member.
                    for m in refused {
                        self.stats.suspected_in_flush += 1;
                        self.suspects.insert(m, now + self.cfg.fail_timeout_ns);
                    }
                    self.round = None;
                    self.stats.rounds_abandoned += 1;
                    return;
                }
            }
        }
        r.commit = Some(commit);
        r.last_send = 0;
        self.progress_round(now);
    }

    fn on_install(&mut self, view: &ViewDesc) {
        let matches = |a: &Option<Accepted>| a.as_ref().is_some_and(|a| a.done && a.view == *view);
        let a = if matches(&self.accepted) {
            self.accepted.take().expect("checked")
        } else if matches(&self.pending_install) {
            // A later proposal is accepted too: it is void now that this view is installed
            // (its coordinator gives it up on seeing this), and delivery must resume.
            self.accepted = None;
            self.pending_install.take().expect("checked")
        } else {
            return;
        };
        self.pending_install = None;
        let (primary, old_view, _) = a.commit.expect("done implies committed");
        if let Some(k) = self.keys.as_mut() {
            k.install(
                self.now,
                self.id,
                a.view.id,
                a.view.members.binary_search(&self.id).is_ok(),
                primary,
            );
        }
        let mine = self
            .data
            .as_ref()
            .filter(|_| self.primary)
            .map_or(0, |d| d.view.id);
        // Missed history unless this member ends the primary view the new one continues, or the
        // group is new (no primary view flushed, and this member was never in one).
        let continuing = a.continues != 0 && mine == a.continues;
        let fresh = a.continues == 0 && self.last_primary.id == 0;
        let joined = primary && !continuing && !fresh;
        // The rest of the old view, in every order, before the new view's event.
        if let Some(mut d) = self.data.take() {
            if d.view.id == old_view && self.primary {
                let clock = d.member.clock();
                if self.enabled[0] {
                    deliver_fifo(&mut d, &mut self.outputs[0]);
                }
                if self.enabled[1] {
                    deliver_ordered(&mut d, self.id, clock, 1, false, true, &mut self.outputs[1]);
                }
                if self.enabled[2] {
                    let survivors: Vec<u32> = d
                        .view
                        .members
                        .iter()
                        .copied()
                        .filter(|m| a.view.members.binary_search(m).is_ok() || a.extra.contains(m))
                        .collect();
                    let remaining = (0..d.logs.len()).any(|s| d.logs[s].next[2] < d.logs[s].count());
                    if remaining {
                        self.outputs[2].push_back(GroupOutput::Event(Arc::new(GroupEvent::Transitional {
                            members: survivors,
                        })));
                    }
                    deliver_ordered(&mut d, self.id, clock, 2, true, true, &mut self.outputs[2]);
                }
            }
        }
        self.relays.clear();
        if a.view.members.binary_search(&self.id).is_err() {
            self.view = ViewDesc::default();
            self.primary = false;
            if self.leaving {
                self.left = true;
                self.control_out.clear();
                self.push_event(GroupEvent::Left);
            }
            return;
        }
        self.view = a.view.clone();
        self.primary = primary;
        self.joined = joined;
        self.max_seen = self.max_seen.max(a.view.id);
        self.stats.views_installed += 1;
        let info = ViewInfo {
            id: a.view.id,
            coordinator: a.view.coord,
            members: a.view.members.clone(),
            senders: a.view.senders.clone(),
            primary,
            joined,
        };
        if primary {
            self.last_primary = a.view.clone();
            self.attempts.retain(|x| x.id > a.view.id);
            let mut mc = self.cfg.member.clone();
            mc.epoch = a.view.id;
            mc.group_size_hint = (a.view.members.len() as u32).max(1);
            // Membership decides when a sender is gone (a new view), and the flush recovers
            // what it sent from the survivors: a member never gives a sender up by itself.
            mc.sender_timeout_ns = Nanos::MAX;
            let member = Member::new(mc, self.rng.random()).expect("validated at construction");
            let logs = a.view.senders.iter().map(|_| SenderLog::default()).collect();
            let mut d = ViewData {
                pool: MessagePool::default(),
                view: a.view,
                logs,
                reports: BTreeMap::new(),
                limit: None,
                member,
            };
            if d.sender_pos(self.id).is_some() {
                d.member.announce();
            }
            self.data = Some(d);
            self.push_event(GroupEvent::View(info));
            self.pump_pending();
        } else {
            self.stats.non_primary_views += 1;
            self.push_event(GroupEvent::NonPrimary(info));
        }
        self.next_hello = 0;
    }

    fn push_event(&mut self, e: GroupEvent) {
        let e = Arc::new(e);
        for o in 0..3 {
            if self.enabled[o] {
                self.outputs[o].push_back(GroupOutput::Event(e.clone()));
            }
        }
    }
}

/// A view some participant finished the flush of and another participant installed.
fn installed_pending(r: &Round) -> Option<ViewDesc> {
    for st in r.states.values() {
        let Control::FlushState { pending, .. } = st else {
            continue;
        };
        if pending.id == 0 {
            continue;
        }
        let installed = r.states.values().any(|o| {
            matches!(o, Control::FlushState { view, view_coord, .. } if *view == pending.id && *view_coord == pending.coord)
        });
        if installed {
            return Some(pending.clone());
        }
    }
    None
}

/// Builds the commit of a round whose participants all answered.
fn make_commit(r: &Round, initial_members: usize) -> Control {
    let mut last_primary = ViewDesc::default();
    for st in r.states.values() {
        if let Control::FlushState { last_primary: lp, .. } = st {
            if lp.id > last_primary.id {
                last_primary = lp.clone();
            }
        }
    }
    let mut attempts: BTreeMap<u32, &ViewDesc> = BTreeMap::new();
    // Per old primary view: per sender, the cut.
    let mut cuts: BTreeMap<u32, BTreeMap<u32, CutEntry>> = BTreeMap::new();
    for (&who, st) in &r.states {
        if let Control::FlushState {
            view,
            primary,
            attempts: at,
            prefixes,
            ..
        } = st
        {
            for a in at.iter().filter(|a| a.id > last_primary.id) {
                attempts.insert(a.id, a);
            }
            if *primary && *view != 0 {
                let cut = cuts.entry(*view).or_default();
                for &(s, c) in prefixes {
                    let e = cut.entry(s).or_insert(CutEntry {
                        sender: s,
                        count: c,
                        holder: who,
                        from: c,
                    });
                    if c > e.count {
                        e.count = c;
                        e.holder = who;
                    }
                    e.from = e.from.min(c);
                }
            }
        }
    }
    let members = &r.view.members;
    let primary = if last_primary.id == 0 && attempts.is_empty() {
        members.len() >= initial_members
    } else {
        (last_primary.id == 0 || majority(members, &last_primary))
            && attempts.values().all(|a| majority(members, a))
    };
    Control::Commit {
        view: r.view.clone(),
        extra: r.extra.clone(),
        primary,
        flushes: cuts
            .into_iter()
            .map(|(v, cut)| (v, cut.into_values().collect()))
            .collect(),
    }
}

/// Takes one output of the reliable layer into the sender logs: a message of a sender of the
/// view in its place, a relay during a flush, a loss counted.
fn take_output(
    view: &ViewDesc,
    logs: &mut [SenderLog],
    limit: &Option<Vec<u64>>,
    pool: &mut MessagePool,
    stats: &mut GroupStats,
    frozen_cut: bool,
    out: Output<'_>,
) {
    match out {
        // Relays come from any member of the view, only while a flush cut is fixed.
        Output::Message(m) if m.stream == RELAY_STREAM => {
            if !frozen_cut || view.members.binary_search(&m.sender).is_err() {
                stats.rejected_not_sender += 1;
                return;
            }
            let Some((s, idx, msg)) = parse_relay(m.payload) else {
                stats.control_malformed += 1;
                return;
            };
            let Ok(spos) = view.senders.binary_search(&s) else {
                stats.rejected_not_sender += 1;
                return;
            };
            if idx == logs[spos].count() && limit.as_ref().is_some_and(|l| idx < l[spos]) {
                stats.relays_accepted += 1;
                logs[spos].msgs.push_back(Arc::new(GroupMessage {
                    view: view.id,
                    index: idx,
                    ..msg
                }));
            }
        }
        Output::Message(m) => {
            let Ok(pos) = view.senders.binary_search(&m.sender) else {
                stats.rejected_not_sender += 1;
                return;
            };
            let index = logs[pos].via_member;
            logs[pos].via_member += 1;
            let log = &mut logs[pos];
            if index != log.count() {
                // Already taken in from a relay.
                return;
            }
            if frozen_cut && limit.as_ref().is_some_and(|l| index >= l[pos]) {
                stats.dropped_beyond_cut += 1;
                return;
            }
            log.msgs
                .push_back(pool.make(m.sender, view.id, index, m.timestamp, m.stream, m.payload));
        }
        Output::Event(_) => stats.unrecoverable += 1,
    }
}

fn parse_relay(b: &[u8]) -> Option<(u32, u64, GroupMessage)> {
    if b.len() < RELAY_HEADER {
        return None;
    }
    let sender = u32::from_le_bytes(b[0..4].try_into().ok()?);
    let index = u64::from_le_bytes(b[4..12].try_into().ok()?);
    let timestamp = u64::from_le_bytes(b[12..20].try_into().ok()?);
    let stream = u32::from_le_bytes(b[20..24].try_into().ok()?);
    if stream == RELAY_STREAM {
        return None;
    }
    Some((
        sender,
        index,
        GroupMessage {
            sender,
            view: 0,
            index,
            timestamp,
            stream,
            payload: b[RELAY_HEADER..].to_vec(),
        },
    ))
}

/// How many of sender `s`'s messages every member of the view is known to hold.
fn stable_of(d: &ViewData, me: u32, s: usize) -> u64 {
    d.view
        .members
        .iter()
        .map(|m| {
            if *m == me {
                d.logs[s].count()
            } else {
                d.reports.get(m).map_or(0, |r| r[s])
            }
        })
        .min()
        .unwrap_or(0)
}

/// Delivers, per sender, every message held and not held back by a view change.
fn deliver_fifo(d: &mut ViewData, out: &mut VecDeque<GroupOutput>) {
    for s in 0..d.logs.len() {
        let avail = d.avail(s);
        let log = &mut d.logs[s];
        while log.next[0] < avail {
            let m = log.get(log.next[0]).expect("below count").clone();
            out.push_back(GroupOutput::Message(m));
            log.next[0] += 1;
        }
    }
}

/// The highest timestamp sender `s` is known to be past at this member.
fn horizon(d: &ViewData, s: usize, own: bool, clock: u64) -> u64 {
    let log = &d.logs[s];
    let avail = d.avail(s);
    let last = if avail == 0 {
        0
    } else {
        log.get(avail - 1).map_or(0, |m| m.timestamp)
    };
    if own {
        return last.max(clock);
    }
    if avail == log.count() && log.count() >= log.promise.0 {
        last.max(log.promise.1)
    } else {
        last
    }
}

/// Delivers in (timestamp, sender) order what order `o` may deliver; `all` at the end of a view
/// (every survivor holds the same set, so no horizon or stability is needed).
fn deliver_ordered(
    d: &mut ViewData,
    me: u32,
    clock: u64,
    o: usize,
    safe: bool,
    all: bool,
    out: &mut VecDeque<GroupOutput>,
) {
    let n = d.logs.len();
    // Horizons depend on what is logged, not on what was delivered: the two lowest (and whose
    // the lowest is) tell, for any candidate, the lowest horizon among the other senders.
    let (mut low, mut low_at, mut second) = (u64::MAX, usize::MAX, u64::MAX);
    if !all {
        for r in 0..n {
            let h = horizon(d, r, d.view.senders[r] == me, clock);
            if h < low {
                second = low;
                low = h;
                low_at = r;
            } else if h < second {
                second = h;
            }
        }
    }
    loop {
        let mut best: Option<(u64, u32, usize)> = None;
        for s in 0..n {
            let log = &d.logs[s];
            if log.next[o] < d.avail(s) {
                let m = log.get(log.next[o]).expect("below count");
                let key = (m.timestamp, m.sender, s);
                if best.is_none_or(|b| (key.0, key.1) < (b.0, b.1)) {
                    best = Some(key);
                }
            }
        }
        let Some((ts, _, s)) = best else {
            return;
        };
        if !all {
            let others = if s == low_at { second } else { low };
            let blocked = others < ts;
            if blocked || (safe && d.logs[s].next[o] >= stable_of(d, me, s)) {
                return;
            }
        }
        let log = &mut d.logs[s];
        let m = log.get(log.next[o]).expect("below count").clone();
        log.next[o] += 1;
        out.push_back(GroupOutput::Message(m));
    }
}

/// Drops messages every order delivered and every member holds.
fn collect_garbage(d: &mut ViewData, me: u32, enabled: &[bool; 3]) {
    if d.limit.is_some() {
        return;
    }
    for s in 0..d.logs.len() {
        let stable = stable_of(d, me, s);
        let ViewData { logs, pool, .. } = d;
        let log = &mut logs[s];
        // Orders nobody reads never move their pointer: they must not pin messages.
        let delivered = (0..3)
            .filter(|&o| enabled[o])
            .map(|o| log.next[o])
            .min()
            .unwrap_or(u64::MAX);
        let keep_from = delivered.min(stable);
        while log.base < keep_from {
            let Some(m) = log.msgs.pop_front() else {
                break;
            };
            pool.recycle(m);
            log.base += 1;
        }
    }
}
