//! [`Member`]: one member of one group, as a sender and as a receiver of every other sender.

use super::held::{HeldFrames, Lent};
use super::reassembly::{Assembled, FrameInfo, Reassembly};
use super::{
    Arrival, Counter, Counters, Delivery, DeliveryQueue, FlowControl, LossDetector, MemberConfig, NakBackoff,
    Nanos, Output, RetransmitBuffer, Step,
};
use crate::wire::{
    self, DataFrame, DataHeader, DatagramWriter, Frame, HeartbeatBody, HeartbeatFrame, NakFrame, NakRange,
    StatusBody,
};
use crate::Error;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;

/// Where a datagram goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    /// Every member of the group (multicast, or the driver's unicast fan-out).
    Group,
    /// One member, at the address its datagrams came from.
    Unicast(SocketAddr),
}

/// A datagram that [`Member::poll_transmit`] wrote into the caller's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transmit {
    /// Where to send it.
    pub destination: Destination,
    /// Its length in bytes, from the start of the buffer.
    pub len: usize,
    /// DATA frames in it that are sent for the first time.
    pub new_data_frames: u32,
    /// With in-place transmits on ([`Member::set_in_place_transmit`]): the datagram was not
    /// written into the buffer; it is [`Member::transmitted`] of this sequence.
    pub in_place: Option<u64>,
    /// Secured groups: the datagram carries only membership frames and must be signed rather
    /// than sealed ([`crate::shield::Shield::sign`]), for members without the epoch's keys.
    pub signed: bool,
}

impl Transmit {
    /// A datagram of `len` bytes to the group (sealed, when the group is secured).
    fn group(len: usize, new_data_frames: u32, in_place: Option<u64>) -> Self {
        Self {
            destination: Destination::Group,
            len,
            new_data_frames,
            in_place,
            signed: false,
        }
    }
}

/// Why input was rejected; reported once per reason as an [`Event::Rejected`], counted always.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    /// The datagram header or a frame failed to decode.
    Malformed,
    /// The datagram belongs to another group.
    WrongGroup,
    /// A frame of another epoch.
    WrongEpoch,
    /// Data from more distinct senders than `max_senders`.
    TooManySenders,
    /// A message announced longer than `max_message_bytes`.
    OversizedMessage,
}

/// Something the application should know about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// Frames `[first, first + count)` of `sender` are gone from its retransmit buffer: the
    /// messages they carried will never be delivered here. Delivery goes on after them.
    UnrecoverableLoss {
        /// The sender whose frames were lost.
        sender: u32,
        /// First lost sequence.
        first: u64,
        /// Number of lost sequences.
        count: u64,
    },
    /// The first input rejected for `reason`; later ones are only counted.
    Rejected {
        /// Why it was rejected.
        reason: RejectReason,
    },
    /// (Groups with membership) a view was installed; the messages that follow belong to it.
    /// `primary: false` is a non-primary component: nothing is delivered until it rejoins.
    View {
        /// View id.
        view: u32,
        /// The member that coordinated it.
        coordinator: u32,
        /// Number of members.
        members: u32,
        /// Whether it is primary.
        primary: bool,
        /// This member missed the history of the primary view this one continues: the
        /// application's state-transfer hook (see `group::ViewInfo::joined`).
        joined: bool,
    },
    /// (Groups with membership, safe order) the view is ending: the safe messages up to the
    /// next view are held by the `members` survivors, not by every member of the view.
    Transitional {
        /// Number of survivors.
        members: u32,
    },
    /// (Groups with membership) this member left the group.
    Left,
}

/// What a receiver keeps about one remote sender.
#[derive(Debug)]
struct Peer {
    /// The sender's member id.
    id: u32,
    loss: LossDetector,
    held: HeldFrames,
    reassembly: Reassembly,
    /// Where the sender's own datagrams come from; STATUS goes there.
    addr: SocketAddr,
    /// Position plus window of the last STATUS sent: the sender's limit on our account.
    reported_limit: u64,
    status_queued: bool,
    next_status_ns: Nanos,
    last_heard_ns: Nanos,
}

impl Peer {
    /// How far the sender may go on this receiver's account (position plus the window a
    /// STATUS advertises): `window_frames` beyond the highest sequence tracked, so a gap
    /// waiting for its repair does not hold the sender back, but never beyond what this
    /// receiver can hold past its position.
    fn limit(&self, cfg: &MemberConfig) -> u64 {
        let position = self.loss.position();
        let ahead = self.loss.high().max(position) + u64::from(cfg.window_frames);
        ahead.min(position + u64::from(cfg.hold_frames()))
    }

    /// Queues a STATUS to this sender once the limit has moved a quarter window past the
    /// last one reported, so a sender that never pauses still hears of its receiver's room.
    /// The general and the direct receive paths both end with this.
    #[inline(always)]
    fn report_if_moved(&mut self, cfg: &MemberConfig, status_due: &mut VecDeque<u32>) {
        let quarter = u64::from(cfg.window_frames / 4).max(1);
        if !self.status_queued && self.limit(cfg) >= self.reported_limit + quarter {
            self.status_queued = true;
            status_due.push_back(self.id);
        }
    }
}

/// The remote senders, in the order first heard. Frames come in runs from one sender (a
/// datagram, a GRO buffer), so the last lookup is remembered and most frames cost no hashing.
#[derive(Debug, Default)]
struct Peers {
    list: Vec<Peer>,
    index: HashMap<u32, usize>,
    /// `(sender, index)` of the last lookup.
    last: Option<(u32, usize)>,
}

impl Peers {
    #[inline]
    fn find(&mut self, id: u32) -> Option<usize> {
        match self.last {
            Some((last, i)) if last == id => Some(i),
            _ => {
                let i = *self.index.get(&id)?;
                self.last = Some((id, i));
                Some(i)
            }
        }
    }

    fn get(&self, id: u32) -> Option<&Peer> {
        self.index.get(&id).map(|&i| &self.list[i])
    }

    fn get_mut(&mut self, id: u32) -> Option<&mut Peer> {
        let i = self.find(id)?;
        Some(&mut self.list[i])
    }

    fn len(&self) -> usize {
        self.list.len()
    }

    fn insert(&mut self, peer: Peer) -> usize {
        let i = self.list.len();
        self.index.insert(peer.id, i);
        self.list.push(peer);
        i
    }
}

/// A message waiting for flow control, its bytes in [`SendQueue::bytes`].
#[derive(Debug, Clone, Copy)]
struct Pending {
    stream: u32,
    len: usize,
    /// Bytes already framed.
    sent: usize,
    timestamp: u64,
}

/// Published messages not yet framed, in one byte buffer.
#[derive(Debug, Default)]
struct SendQueue {
    bytes: Vec<u8>,
    /// Start of the first pending message's unsent bytes in `bytes`.
    head: usize,
    messages: VecDeque<Pending>,
}

impl SendQueue {
    fn queued_bytes(&self) -> usize {
        self.bytes.len() - self.head
    }

    fn consume(&mut self, n: usize) {
        self.head += n;
        if self.head == self.bytes.len() {
            self.bytes.clear();
            self.head = 0;
        } else if self.head > (1 << 20) && self.head * 2 > self.bytes.len() {
            self.bytes.drain(..self.head);
            self.head = 0;
        }
    }
}

/// Bytes in front of a message that [`Member::publish_lent`] frames where it lies: its
/// datagram header and its DATA frame's headers.
pub const LENT_HEADROOM: usize = wire::DATAGRAM_HEADER_LEN + wire::DATA_FRAME_OVERHEAD;

/// The header of a message that travels alone in a datagram: one unfragmented frame.
fn solo_header(cfg: &MemberConfig, stream: u32, seq: u64, clock: u64, len: usize) -> DataHeader {
    DataHeader {
        stream: stream.into(),
        sender: cfg.member_id.into(),
        epoch: cfg.epoch.into(),
        sequence: seq.into(),
        timestamp: clock.into(),
        message_len: (len as u32).into(),
        fragment_offset: 0.into(),
    }
}

/// What a member keeps as a sender; made on its first publish.
#[derive(Debug)]
struct SendState {
    queue: SendQueue,
    retransmit: RetransmitBuffer,
    flow: FlowControl,
    /// Sequences asked for by NAKs and not yet sent again.
    retransmit_queue: VecDeque<u64>,
    heartbeat_due: bool,
    last_send_ns: Nanos,
    next_expiry_ns: Nanos,
    /// Flow control held data back and this was counted; reset when data moves again.
    stalled: bool,
    /// Sequences of messages framed when they were published (each fills a datagram alone),
    /// waiting to be sent straight from the retransmit buffer.
    solo: VecDeque<u64>,
    /// The next HEARTBEAT asks receivers for a STATUS ([`Member::request_status`]).
    report_requested: bool,
    /// A request waits for `next_report_ns` (one went out less than a wait before).
    report_deferred: bool,
    /// The earliest time of the next request.
    next_report_ns: Nanos,
    /// How long the last request made the next one wait (0 before the first).
    report_wait_ns: Nanos,
    /// A STATUS arrived since the last request.
    heard_since_report: bool,
}

impl SendState {
    /// Arms a STATUS request for the next transmit. The next request waits a
    /// `retransmit_linger_ns`, or twice the last wait (up to `status_interval_ns`) while no
    /// STATUS answers: a publisher held back with no receiver to answer (fewer than
    /// `min_receivers`) then asks 50 times a second, not 5,000.
    fn arm_report(&mut self, now_ns: Nanos, cfg: &MemberConfig) {
        self.report_requested = true;
        self.heartbeat_due = true;
        let linger = cfg.retransmit_linger_ns.max(1);
        self.report_wait_ns = if self.heard_since_report || self.report_wait_ns == 0 {
            linger
        } else {
            self.report_wait_ns
                .saturating_mul(2)
                .min(cfg.status_interval_ns.max(linger))
        };
        self.heard_since_report = false;
        self.next_report_ns = now_ns.saturating_add(self.report_wait_ns);
    }

    fn new(cfg: &MemberConfig) -> Self {
        SendState {
            queue: SendQueue::default(),
            retransmit: RetransmitBuffer::new(
                cfg.retransmit_frames,
                cfg.mtu - wire::DATAGRAM_HEADER_LEN,
                wire::datagram_header(cfg.group, cfg.member_id),
            ),
            flow: FlowControl::with_min_receivers(
                u64::from(cfg.window_frames),
                u64::from(cfg.retransmit_frames),
                cfg.min_receivers,
            ),
            retransmit_queue: VecDeque::new(),
            heartbeat_due: false,
            last_send_ns: 0,
            next_expiry_ns: 0,
            stalled: false,
            solo: VecDeque::new(),
            report_requested: false,
            report_deferred: false,
            next_report_ns: 0,
            report_wait_ns: 0,
            heard_since_report: false,
        }
    }
}

/// One member of one group: the sans-IO reliable multicast state machine.
///
/// Call order, for drivers: feed input with [`handle_datagram`](Self::handle_datagram),
/// [`handle_timeout`](Self::handle_timeout) (when the deadline of
/// [`poll_timeout`](Self::poll_timeout) has passed) and [`publish`](Self::publish); after each,
/// call [`poll_transmit`](Self::poll_transmit) until it returns `None`, hand deliveries out with
/// [`drain`](Self::drain), read [`poll_event`](Self::poll_event), and ask
/// [`poll_timeout`](Self::poll_timeout) for the next deadline. Nothing happens between calls.
#[derive(Debug)]
pub struct Member {
    cfg: MemberConfig,
    rng: ChaCha8Rng,
    backoff: NakBackoff,
    /// Lamport clock: ticks on publish, and jumps to any larger timestamp heard.
    clock: u64,
    counters: Counters,
    sender: Option<SendState>,
    peers: Peers,
    status_due: VecDeque<u32>,
    /// NAK ranges waiting for a datagram; `nak_frames` slices them per sender.
    nak_ranges: Vec<NakRange>,
    nak_frames: VecDeque<(u32, usize, usize)>,
    deliveries: DeliveryQueue,
    events: VecDeque<Event>,
    /// Bit per [`RejectReason`] already reported as an event.
    reported: u8,
    /// See [`Member::set_in_place_transmit`].
    in_place_transmit: bool,
}

impl Member {
    /// A member with `cfg`, drawing NAK back-off from a generator seeded with `seed`.
    pub fn new(cfg: MemberConfig, seed: u64) -> Result<Self, Error> {
        cfg.validate()?;
        Ok(Self {
            backoff: NakBackoff::new(cfg.nak_max_backoff_ns, cfg.group_size_hint),
            cfg,
            rng: ChaCha8Rng::seed_from_u64(seed),
            clock: 0,
            counters: Counters::default(),
            sender: None,
            peers: Peers::default(),
            status_due: VecDeque::new(),
            nak_ranges: Vec::new(),
            nak_frames: VecDeque::new(),
            deliveries: DeliveryQueue::default(),
            events: VecDeque::new(),
            reported: 0,
            in_place_transmit: false,
        })
    }

    /// This member's id.
    pub fn id(&self) -> u32 {
        self.cfg.member_id
    }

    /// The configuration.
    pub fn config(&self) -> &MemberConfig {
        &self.cfg
    }

    /// The counters.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// The Lamport clock.
    pub fn clock(&self) -> u64 {
        self.clock
    }

    /// Stops repairing every frame this member has already sent (frames framed but not sent
    /// yet stay): receivers that still miss one get `UnrecoverableLoss` once the next heartbeat
    /// says where the buffer starts. A secured group does this at a rekey, so that data sent
    /// under an old key is never sent again under the new one, where a joiner could read it
    /// (backward secrecy). Rekey after everything is acknowledged to lose nothing.
    pub fn forget_sent(&mut self) {
        if let Some(s) = self.sender.as_mut() {
            let cut = s.solo.front().copied().unwrap_or(s.retransmit.next());
            s.retransmit.forget_before(cut);
            s.retransmit_queue.retain(|&q| q >= cut);
            s.heartbeat_due = true;
        }
    }

    /// The next sequence this member will send, 0 before it published anything.
    pub fn next_sequence(&self) -> u64 {
        self.sender.as_ref().map_or(0, |s| s.retransmit.next())
    }

    /// Bytes published but not yet framed.
    pub fn queued_bytes(&self) -> usize {
        self.sender.as_ref().map_or(0, |s| s.queue.queued_bytes())
    }

    /// How many more messages of up to one frame [`publish`](Self::publish) would frame at
    /// once instead of queueing: what flow control allows beyond everything already framed or
    /// queued. A driver that can leave messages where they are (a publication ring) offers no
    /// more than this, so a sender held back by its receivers copies nothing twice. No room
    /// counts a flow-control stall, as a full window met while framing does.
    pub fn publish_room(&mut self) -> u64 {
        let Some(s) = self.sender.as_mut() else {
            return u64::from(self.cfg.window_frames);
        };
        let room = s
            .flow
            .limit()
            .saturating_sub(s.retransmit.next())
            .saturating_sub(s.queue.messages.len() as u64);
        if room == 0 && !s.stalled {
            s.stalled = true;
            self.counters.incr(Counter::FlowControlStalls);
        }
        room
    }

    /// This member's contiguous position in `sender`'s stream, if it heard from `sender`.
    pub fn position_of(&self, sender: u32) -> Option<u64> {
        self.peers.get(sender).map(|p| p.loss.position())
    }

    /// As a sender: how many live receivers report positions, and the lowest position among
    /// them. Everything published has reached every live receiver once that position equals
    /// [`next_sequence`](Self::next_sequence) and nothing is queued.
    pub fn acknowledged(&self) -> (usize, Option<u64>) {
        self.sender.as_ref().map_or((0, None), |s| s.flow.acknowledged())
    }

    /// As a sender: how many live receivers report to it (0 before its first message or
    /// [`announce`](Self::announce)).
    pub fn receivers(&self) -> usize {
        self.sender.as_ref().map_or(0, |s| s.flow.receivers())
    }

    /// Becomes a sender before the first message: heartbeats start, so receivers find this
    /// member and report to it (a publisher that waits for receivers needs them to).
    pub fn announce(&mut self) {
        let cfg = &self.cfg;
        self.sender.get_or_insert_with(|| SendState::new(cfg));
    }

    /// Queues `message` on `stream`. It is framed and sent as flow control allows.
    pub fn publish(&mut self, stream: u32, message: &[u8]) -> Result<(), Error> {
        if message.len() > self.cfg.max_message_bytes {
            return Err(Error::MessageTooLarge {
                len: message.len(),
                max: self.cfg.max_message_bytes,
            });
        }
        let cfg = &self.cfg;
        let s = self.sender.get_or_insert_with(|| SendState::new(cfg));
        // A message too large to share a datagram, with nothing queued before it and room in
        // the window, is framed now, straight into the retransmit buffer: one copy instead of
        // two, and the datagram can leave from there.
        let max_frame = cfg.max_frame_payload();
        let seq = s.retransmit.next();
        if s.queue.messages.is_empty()
            && message.len() > max_frame / 2
            && message.len() <= max_frame
            && seq < s.flow.limit()
        {
            self.clock += 1;
            let header = solo_header(cfg, stream, seq, self.clock, message.len());
            s.retransmit
                .push_with(|slot| wire::encode_data_frame(slot, &header, message));
            s.solo.push_back(seq);
            s.stalled = false;
            return Ok(());
        }
        let queued = s.queue.queued_bytes();
        if queued > 0 && queued + message.len() > cfg.send_queue_bytes {
            self.counters.incr(Counter::PublishBackPressured);
            return Err(Error::BackPressured);
        }
        self.clock += 1;
        s.queue.bytes.extend_from_slice(message);
        s.queue.messages.push_back(Pending {
            stream,
            len: message.len(),
            sent: 0,
            timestamp: self.clock,
        });
        Ok(())
    }

    /// Publishes the message in `datagram[LENT_HEADROOM..]` (a shorter `datagram` is refused as
    /// [`Error::Config`]) like [`publish`](Self::publish),
    /// framing it where it lies when it travels alone in a datagram (as `publish` frames such
    /// a message straight into the retransmit buffer): its datagram and frame headers are
    /// written into `datagram[..LENT_HEADROOM]`, and the member sends and retransmits the
    /// datagram from there, with no copy. Returns the sequence of a frame lent that way, or
    /// `None` when the message was published by copy (it shares datagrams or is fragmented,
    /// messages wait in the send queue, flow control holds it, or in-place transmits are off).
    ///
    /// # Safety
    ///
    /// When it returns `Some(seq)`: the bytes of `datagram` stay valid, and nobody but this
    /// member reads or writes them, until [`held_from`](Self::held_from) passes `seq` (or the
    /// member is dropped).
    pub unsafe fn publish_lent(&mut self, stream: u32, datagram: &mut [u8]) -> Result<Option<u64>, Error> {
        let Some(message_len) = datagram.len().checked_sub(LENT_HEADROOM) else {
            return Err(Error::Config(format!(
                "a lent datagram of {} bytes has no room for its {LENT_HEADROOM} bytes of headers",
                datagram.len()
            )));
        };
        let cfg = &self.cfg;
        let max_frame = cfg.max_frame_payload();
        let lendable = self.in_place_transmit
            && message_len > max_frame / 2
            && message_len <= max_frame
            && message_len <= cfg.max_message_bytes;
        let s = self.sender.get_or_insert_with(|| SendState::new(cfg));
        let seq = s.retransmit.next();
        if !(lendable && s.queue.messages.is_empty() && seq < s.flow.limit()) {
            return self.publish(stream, &datagram[LENT_HEADROOM..]).map(|()| None);
        }
        self.clock += 1;
        let header = solo_header(cfg, stream, seq, self.clock, message_len);
        datagram[..wire::DATAGRAM_HEADER_LEN].copy_from_slice(s.retransmit.header());
        let frame_len =
            wire::encode_data_frame_header(&mut datagram[wire::DATAGRAM_HEADER_LEN..], &header, message_len);
        // From the whole slice, so the pointer may reach all of it.
        let at = std::ptr::NonNull::from(&mut *datagram).cast::<u8>();
        // SAFETY: the caller keeps the datagram's bytes valid and to this member until
        // `held_from` passes `seq`, which is exactly as long as the buffer holds the frame.
        unsafe { s.retransmit.push_lent(at, frame_len) };
        s.solo.push_back(seq);
        s.stalled = false;
        Ok(Some(seq))
    }

    /// As a sender: the oldest sequence still held for retransmission (frames below it were
    /// evicted; a frame lent by [`publish_lent`](Self::publish_lent) is no longer referred
    /// to once this passes it). 0 before the first message.
    pub fn held_from(&self) -> u64 {
        self.sender.as_ref().map_or(0, |s| s.retransmit.oldest())
    }

    /// As a sender: the oldest sequence that must stay held for no receiver to lose it: the
    /// first not yet sent, or the lowest position a live receiver reported, whichever is
    /// lower. While fewer receivers than [`MemberConfig::min_receivers`] report, nothing more
    /// than [`held_from`](Self::held_from) may go (a late receiver may still need it all).
    pub fn needed_from(&self) -> u64 {
        let Some(s) = self.sender.as_ref() else {
            return 0;
        };
        let unsent = s.solo.front().copied().unwrap_or(s.retransmit.next());
        let (receivers, lowest) = s.flow.acknowledged();
        if receivers < self.cfg.min_receivers as usize {
            return s.retransmit.oldest();
        }
        unsent.min(lowest.unwrap_or(u64::MAX)).max(s.retransmit.oldest())
    }

    /// As a sender: stops holding frames below `seq` for retransmission, but never one at or
    /// past [`needed_from`](Self::needed_from). A publisher that lends frames calls it when it
    /// needs their room back.
    pub fn forget_held_before(&mut self, seq: u64) {
        let keep = self.needed_from();
        if let Some(s) = self.sender.as_mut() {
            s.retransmit.forget_before(seq.min(keep));
        }
    }

    /// As a sender that keeps frames until every receiver acknowledges them (a publisher that
    /// lends its ring, see [`forget_held_before`](Self::forget_held_before)): asks every
    /// receiver for a STATUS now, in a HEARTBEAT flagged `HEARTBEAT_FLAG_REPORT`, at most once
    /// per `retransmit_linger_ns` (a request within that is deferred to its end; unanswered
    /// requests back off, see `SendState::arm_report`). Receivers
    /// report on their own when the limit they advertise moves a quarter window on, which a
    /// sender stopped by the frames it holds never lets happen: without a request it waited
    /// for the `status_interval_ns` reports (20 ms), and a 4 MiB publication ring under 5% loss
    /// carried 0.3 M msgs/s of 1 KiB.
    ///
    /// Returns true while a request waits for the next [`poll_transmit`](Self::poll_transmit);
    /// a deferred one is due at [`poll_timeout`](Self::poll_timeout).
    pub fn request_status(&mut self, now_ns: Nanos) -> bool {
        let Some(s) = self.sender.as_mut() else {
            return false;
        };
        if !s.report_requested && !s.report_deferred {
            if now_ns >= s.next_report_ns {
                s.arm_report(now_ns, &self.cfg);
            } else {
                s.report_deferred = true;
            }
        }
        s.report_requested
    }

    /// Takes one received datagram that arrived at `now_ns` from `from`.
    pub fn handle_datagram(&mut self, now_ns: Nanos, from: SocketAddr, bytes: &[u8]) {
        self.handle(now_ns, from, bytes, None, None);
    }

    /// Takes one received datagram like [`handle_datagram`](Self::handle_datagram), and hands
    /// every delivery and in-stream event that is ready to `deliver` in stream order: first
    /// what was queued before, then what this datagram completes. Messages completed by a
    /// frame of this datagram, with nothing queued before them, are handed on in place from
    /// `bytes`, with no copy. Outputs are lent by reference: one built just before the call
    /// and copied by value on the other side of a `dyn` call was read back while its stores
    /// were still in flight (profiled: 6% of a subscriber's time at 1 KiB).
    pub fn handle_datagram_with(
        &mut self,
        now_ns: Nanos,
        from: SocketAddr,
        bytes: &[u8],
        deliver: &mut dyn FnMut(&Output<'_>),
    ) {
        self.deliveries.drain(|o| deliver(&o));
        self.handle(now_ns, from, bytes, Some(&mut *deliver), None);
        self.deliveries.drain(|o| deliver(&o));
    }

    /// Takes the datagram at `range` of `lent`'s arena like
    /// [`handle_datagram_with`](Self::handle_datagram_with), and holds frames that arrive out
    /// of order where they are, pinned through `lent`'s lender, instead of copying them (a
    /// frame the lender will not pin is copied). Under loss almost every frame waits behind a
    /// gap, and the copy into the held slots, cold because they span two windows, was most of
    /// what a subscriber's worker spent beyond the lossless path.
    ///
    /// Once frames are held in an arena, every datagram of this member must come through this
    /// call with the same arena: a frame is handed on and unpinned when a later datagram fills
    /// the gap before it. A range outside the arena is rejected as malformed.
    pub fn handle_datagram_lent(
        &mut self,
        now_ns: Nanos,
        from: SocketAddr,
        lent: &mut Lent<'_>,
        range: std::ops::Range<usize>,
        deliver: &mut dyn FnMut(&Output<'_>),
    ) {
        let len = range.len();
        self.handle_datagrams_lent(now_ns, from, lent, range, len, deliver);
    }

    /// [`handle_datagram_lent`](Self::handle_datagram_lent) for a run of datagrams from one
    /// source laid end to end at `range` (a GRO buffer): each `segment` bytes long, the last
    /// maybe shorter. Everything is as if each were handed in its own call, in order; one call
    /// spares a driver its per-datagram steps (at 1 KiB, about 60 datagrams a buffer).
    pub fn handle_datagrams_lent(
        &mut self,
        now_ns: Nanos,
        from: SocketAddr,
        lent: &mut Lent<'_>,
        range: std::ops::Range<usize>,
        segment: usize,
        deliver: &mut dyn FnMut(&Output<'_>),
    ) {
        let arena = lent.arena;
        let Some(bytes) = arena.get(range) else {
            self.reject(Counter::RejectedMalformed, RejectReason::Malformed);
            return;
        };
        self.deliveries.drain(|o| deliver(&o));
        for datagram in wire::segments(bytes, segment) {
            self.handle(now_ns, from, datagram, Some(&mut *deliver), Some(&mut *lent));
            self.deliveries.drain(|o| deliver(&o));
        }
    }

    fn handle(
        &mut self,
        now_ns: Nanos,
        from: SocketAddr,
        bytes: &[u8],
        mut direct: Option<&mut dyn FnMut(&Output<'_>)>,
        mut lent: Option<&mut Lent<'_>>,
    ) {
        let (header, frames) = match wire::decode_datagram(bytes) {
            Ok(v) => v,
            Err(_) => {
                self.reject(Counter::RejectedMalformed, RejectReason::Malformed);
                return;
            }
        };
        if header.group.get() != self.cfg.group {
            self.reject(Counter::RejectedWrongGroup, RejectReason::WrongGroup);
            return;
        }
        let source = header.source.get();
        if source == self.cfg.member_id {
            self.counters.incr(Counter::OwnDatagramsIgnored);
            return;
        }
        self.counters.incr(Counter::DatagramsReceived);
        for frame in frames {
            match frame {
                Ok(Frame::Data(d)) => {
                    if let Some(f) = direct.as_deref_mut() {
                        if self.deliver_next_in_place(now_ns, source, from, &d, f) {
                            continue;
                        }
                    }
                    self.on_data(
                        now_ns,
                        source,
                        from,
                        d,
                        shrink(direct.as_deref_mut()),
                        lent.as_deref_mut(),
                    )
                }
                Ok(Frame::Nak(n)) => self.on_nak(now_ns, n),
                Ok(Frame::Status(s)) => self.on_status(now_ns, source, s),
                Ok(Frame::Heartbeat(hb)) => self.on_heartbeat(
                    now_ns,
                    source,
                    from,
                    hb,
                    shrink(direct.as_deref_mut()),
                    lent.as_deref_mut(),
                ),
                // The group layer reads these before the datagram reaches this member.
                Ok(Frame::Membership { .. }) => {}
                Err(_) => self.reject(Counter::RejectedFrames, RejectReason::Malformed),
            }
        }
    }

    /// Runs the timers due at `now_ns`: NAKs, STATUS reports, heartbeats, receiver expiry, and
    /// giving up senders silent for `sender_timeout_ns` (what they still owe is declared lost;
    /// see [`drain`](Self::drain)). A sender whose frames wait in a lent arena is given up only
    /// by [`handle_timeout_lent`](Self::handle_timeout_lent).
    pub fn handle_timeout(&mut self, now_ns: Nanos) {
        self.timeout(now_ns, None);
    }

    /// [`handle_timeout`](Self::handle_timeout) for a driver that lends its receive buffers
    /// ([`handle_datagram_lent`](Self::handle_datagram_lent)): `lent` is the arena those
    /// datagrams came in, so the held frames of a sender given up are handed on (into
    /// [`drain`](Self::drain)) and unpinned.
    pub fn handle_timeout_lent(&mut self, now_ns: Nanos, lent: &mut Lent<'_>) {
        self.timeout(now_ns, Some(lent));
    }

    fn timeout(&mut self, now_ns: Nanos, lent: Option<&mut Lent<'_>>) {
        self.give_up_silent_senders(now_ns, lent);
        let cfg = &self.cfg;
        for peer in self.peers.list.iter_mut() {
            let id = peer.id;
            if peer.loss.next_deadline().is_some_and(|d| d <= now_ns) {
                let start = self.nak_ranges.len();
                // Gaps due within a quarter of the back-off go in the same NAK: fewer NAK
                // datagrams for the sender and every other receiver to take in.
                let n = peer.loss.collect_due(
                    now_ns..=now_ns + cfg.nak_max_backoff_ns / 4,
                    cfg.nak_retry_ns,
                    cfg.max_nak_ranges,
                    &mut self.nak_ranges,
                    &self.backoff,
                    &mut self.rng,
                );
                if n > 0 {
                    self.nak_frames.push_back((id, start, start + n));
                }
            }
            let sender_alive = now_ns < peer.last_heard_ns.saturating_add(cfg.receiver_timeout_ns);
            if sender_alive && now_ns >= peer.next_status_ns && !peer.status_queued {
                peer.status_queued = true;
                self.status_due.push_back(id);
            }
        }
        if let Some(s) = self.sender.as_mut() {
            if now_ns >= s.last_send_ns.saturating_add(cfg.heartbeat_interval_ns) {
                s.heartbeat_due = true;
            }
            if s.report_deferred && s.next_report_ns <= now_ns {
                s.report_deferred = false;
                s.arm_report(now_ns, cfg);
            }
            if now_ns >= s.next_expiry_ns {
                let expired = s.flow.expire(now_ns, cfg.receiver_timeout_ns);
                self.counters.add(Counter::ReceiversTimedOut, expired as u64);
                s.next_expiry_ns = now_ns + (cfg.receiver_timeout_ns / 4).max(1);
            }
        }
    }

    /// Gives up every sender silent for `sender_timeout_ns` that still owes sequences: hands on
    /// what is held of it, declares the rest lost, and so stops NAKing it and frees what its
    /// held frames pinned. It is tracked on: if it speaks again, it is received from there.
    fn give_up_silent_senders(&mut self, now_ns: Nanos, mut lent: Option<&mut Lent<'_>>) {
        let Self {
            cfg,
            counters,
            deliveries,
            events,
            peers,
            reported,
            ..
        } = self;
        for peer in peers.list.iter_mut() {
            if now_ns < peer.last_heard_ns.saturating_add(cfg.sender_timeout_ns)
                || (lent.is_none() && peer.held.lent_frames() > 0)
                || !peer.loss.give_up()
            {
                continue;
            }
            counters.incr(Counter::SendersTimedOut);
            let mut sink = Sink {
                sender: peer.id,
                max_message_bytes: cfg.max_message_bytes,
                counters: &mut *counters,
                deliveries: &mut *deliveries,
                events: &mut *events,
                reported: &mut *reported,
                direct: None,
            };
            drain_in_order(peer, &mut sink, lent.as_deref_mut());
        }
    }

    /// The next time [`handle_timeout`](Self::handle_timeout) has work, if any.
    pub fn poll_timeout(&self) -> Option<Nanos> {
        let timeout_ns = self.cfg.receiver_timeout_ns;
        let mut next: Option<Nanos> = None;
        let mut consider = |t: Nanos| next = Some(next.map_or(t, |n: Nanos| n.min(t)));
        for peer in &self.peers.list {
            if let Some(d) = peer.loss.next_deadline() {
                consider(d);
            }
            if !peer.status_queued && peer.next_status_ns < peer.last_heard_ns.saturating_add(timeout_ns) {
                consider(peer.next_status_ns);
            }
        }
        if let Some(s) = &self.sender {
            if !s.heartbeat_due {
                consider(s.last_send_ns.saturating_add(self.cfg.heartbeat_interval_ns));
            }
            if s.report_deferred {
                consider(s.next_report_ns);
            }
            consider(s.next_expiry_ns);
        }
        next
    }

    /// Writes the next datagram to send into `buf` (at most `mtu` bytes of it are used).
    ///
    /// Order: a pending STATUS (unicast), then one group datagram packing NAKs, a heartbeat,
    /// retransmissions and new data as flow control allows.
    pub fn poll_transmit(&mut self, now_ns: Nanos, buf: &mut [u8]) -> Option<Transmit> {
        let mtu = self.cfg.mtu.min(buf.len());
        let buf = &mut buf[..mtu];
        while let Some(id) = self.status_due.pop_front() {
            if let Some(t) = self.write_status(now_ns, id, buf) {
                return Some(t);
            }
        }
        let mut w = DatagramWriter::new(buf, self.cfg.group, self.cfg.member_id)?;
        self.write_naks(&mut w);
        let mut new_data_frames = 0;
        if let Some(s) = self.sender.as_mut() {
            let mut sent_any = false;
            if s.heartbeat_due {
                let body = HeartbeatBody {
                    sender: self.cfg.member_id.into(),
                    epoch: self.cfg.epoch.into(),
                    next_sequence: s.retransmit.next().into(),
                    oldest_sequence: s.retransmit.oldest().into(),
                    timestamp: self.clock.into(),
                };
                let flags = if s.report_requested {
                    wire::HEARTBEAT_FLAG_REPORT
                } else {
                    0
                };
                if w.push_heartbeat_with(flags, &body) {
                    s.heartbeat_due = false;
                    sent_any = true;
                    self.counters.incr(Counter::HeartbeatsSent);
                    if s.report_requested {
                        s.report_requested = false;
                        self.counters.incr(Counter::StatusRequestsSent);
                    }
                }
            }
            while let Some(&seq) = s.retransmit_queue.front() {
                let Some(frame) = s.retransmit.get(seq) else {
                    // Evicted since it was asked for: tell receivers where the buffer starts.
                    s.retransmit_queue.pop_front();
                    s.heartbeat_due = true;
                    continue;
                };
                if self.in_place_transmit && w.is_empty() && frame.len() > w.remaining() / 2 {
                    // It would travel alone anyway: send it again from its slot, no copy.
                    let len = wire::DATAGRAM_HEADER_LEN + frame.len();
                    s.retransmit.mark_retransmitted(seq);
                    s.retransmit_queue.pop_front();
                    s.last_send_ns = now_ns;
                    self.counters.incr(Counter::Retransmissions);
                    self.counters.incr(Counter::DatagramsSent);
                    return Some(Transmit::group(len, 0, Some(seq)));
                }
                if !w.push_retransmit(frame) {
                    break;
                }
                s.retransmit_queue.pop_front();
                sent_any = true;
                self.counters.incr(Counter::Retransmissions);
            }
            // Messages framed at publish go first: their sequences come before the queue's.
            if s.solo.is_empty() {
                if self.in_place_transmit && w.is_empty() {
                    if let Some((seq, len)) = frame_full_fragment(&self.cfg, s, &mut self.counters) {
                        // It fills a datagram alone: it leaves from its retransmit slot, so its
                        // payload is copied once (into the slot) instead of twice.
                        s.last_send_ns = now_ns;
                        self.counters.incr(Counter::DatagramsSent);
                        return Some(Transmit::group(len, 1, Some(seq)));
                    }
                }
                new_data_frames = frame_new_data(&self.cfg, s, &mut w, &mut self.counters);
            }
            if new_data_frames > 0 || sent_any {
                s.last_send_ns = now_ns;
            }
        }
        if !w.is_empty() {
            self.counters.incr(Counter::DatagramsSent);
            return Some(Transmit::group(w.len(), new_data_frames, None));
        }
        let s = self.sender.as_mut()?;
        while let Some(seq) = s.solo.pop_front() {
            let Some(datagram) = s.retransmit.datagram(seq) else {
                continue;
            };
            self.counters.incr(Counter::DataFramesSent);
            self.counters.incr(Counter::DatagramsSent);
            s.last_send_ns = now_ns;
            let len = datagram.len();
            let in_place = if self.in_place_transmit {
                Some(seq)
            } else {
                buf[..len].copy_from_slice(datagram);
                None
            };
            return Some(Transmit::group(len, 1, in_place));
        }
        None
    }

    /// Lets [`poll_transmit`](Self::poll_transmit) leave datagrams that carry one frame (a new
    /// message or fragment, or a retransmission, that fills a datagram alone) in the retransmit
    /// buffer (see [`Transmit::in_place`]) instead of copying them out, for drivers that send
    /// with scatter-gather I/O.
    pub fn set_in_place_transmit(&mut self, on: bool) {
        self.in_place_transmit = on;
    }

    /// The datagram of a [`Transmit`] with `in_place` set: valid until the retransmit buffer
    /// has taken `retransmit_frames` further frames.
    pub fn transmitted(&self, sequence: u64) -> Option<&[u8]> {
        self.sender.as_ref()?.retransmit.datagram(sequence)
    }

    /// Hands every delivered message, and every event that belongs between messages (such as
    /// [`Event::UnrecoverableLoss`]), to `f` in stream order.
    pub fn drain(&mut self, f: impl FnMut(Output<'_>)) {
        self.deliveries.drain(f);
    }

    /// Number of messages and in-stream events waiting in [`drain`](Self::drain).
    pub fn pending_deliveries(&self) -> usize {
        self.deliveries.len()
    }

    /// The next out-of-band event ([`Event::Rejected`]), if any. Events that belong to the
    /// stream come through [`drain`](Self::drain) instead.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    fn reject(&mut self, counter: Counter, reason: RejectReason) {
        self.counters.incr(counter);
        report_once(&mut self.events, &mut self.reported, reason);
    }

    fn write_status(&mut self, now_ns: Nanos, id: u32, buf: &mut [u8]) -> Option<Transmit> {
        let peer = self.peers.get_mut(id)?;
        peer.status_queued = false;
        let position = peer.loss.position();
        let limit = peer.limit(&self.cfg);
        let mut w = DatagramWriter::new(buf, self.cfg.group, self.cfg.member_id)?;
        let body = StatusBody {
            sender: id.into(),
            window: u32::try_from(limit - position).unwrap_or(u32::MAX).into(),
            position: position.into(),
        };
        if !w.push_status(&body) {
            return None;
        }
        peer.reported_limit = limit;
        peer.next_status_ns = now_ns + self.cfg.status_interval_ns;
        self.counters.incr(Counter::StatusSent);
        self.counters.incr(Counter::DatagramsSent);
        Some(Transmit {
            destination: Destination::Unicast(peer.addr),
            len: w.len(),
            new_data_frames: 0,
            in_place: None,
            signed: false,
        })
    }

    fn write_naks(&mut self, w: &mut DatagramWriter<'_>) {
        while let Some(front) = self.nak_frames.front_mut() {
            let (sender, start, end) = *front;
            let n = w.push_nak(sender, &self.nak_ranges[start..end]);
            if n == 0 {
                break;
            }
            self.counters.incr(Counter::NaksSent);
            if start + n < end {
                front.1 = start + n;
                break;
            }
            self.nak_frames.pop_front();
        }
        if self.nak_frames.is_empty() {
            self.nak_ranges.clear();
        }
    }

    /// The receive state of `sender`, made on first contact unless `max_senders` is reached.
    fn peer(&mut self, now_ns: Nanos, sender: u32, addr: Option<SocketAddr>) -> Option<usize> {
        let i = match self.peers.find(sender) {
            Some(i) => i,
            None => {
                if self.peers.len() >= self.cfg.max_senders {
                    self.reject(Counter::RejectedTooManySenders, RejectReason::TooManySenders);
                    return None;
                }
                // STATUS needs the sender's own address; a frame relayed by another member has
                // none.
                let addr = addr?;
                self.status_due.push_back(sender);
                self.peers.insert(Peer {
                    id: sender,
                    loss: LossDetector::new(0, self.cfg.hold_frames()),
                    held: HeldFrames::new(self.cfg.hold_frames(), self.cfg.max_frame_payload()),
                    reassembly: Reassembly::default(),
                    addr,
                    reported_limit: 0,
                    status_queued: true,
                    next_status_ns: now_ns,
                    last_heard_ns: now_ns,
                })
            }
        };
        if let Some(addr) = addr {
            let peer = &mut self.peers.list[i];
            peer.addr = addr;
            peer.last_heard_ns = now_ns;
        }
        Some(i)
    }

    /// Checks a frame's epoch and takes its clock; `false` if the frame must be dropped.
    fn admit(&mut self, epoch: u32, timestamp: u64) -> bool {
        if epoch != self.cfg.epoch {
            self.reject(Counter::RejectedWrongEpoch, RejectReason::WrongEpoch);
            return false;
        }
        self.clock = self.clock.max(timestamp);
        true
    }

    /// The receive state of `sender` (made if new) beside the member state it works with.
    ///
    /// Always inlined: called for every frame, it returned its pair (a dozen words) through
    /// memory, and reading that back right after the call's stores stalled (profiled: 5% of a
    /// subscriber's time at 1 KiB).
    #[inline(always)]
    fn split_peer<'m>(
        &'m mut self,
        now_ns: Nanos,
        sender: u32,
        addr: Option<SocketAddr>,
        direct: Option<&'m mut dyn FnMut(&Output<'_>)>,
    ) -> Option<(&'m mut Peer, PeerCx<'m>)> {
        let i = self.peer(now_ns, sender, addr)?;
        let Self {
            cfg,
            rng,
            backoff,
            counters,
            deliveries,
            events,
            peers,
            status_due,
            reported,
            ..
        } = self;
        let peer = &mut peers.list[i];
        let cx = PeerCx {
            rng,
            backoff,
            status_due,
            cfg,
            sink: Sink {
                sender,
                max_message_bytes: cfg.max_message_bytes,
                counters,
                deliveries,
                events,
                reported,
                direct,
            },
        };
        Some((peer, cx))
    }

    fn on_data(
        &mut self,
        now_ns: Nanos,
        source: u32,
        from: SocketAddr,
        d: DataFrame<'_>,
        direct: Option<&mut dyn FnMut(&Output<'_>)>,
        lent: Option<&mut Lent<'_>>,
    ) {
        let h = d.header;
        let sender = h.sender.get();
        if sender == self.cfg.member_id {
            self.counters.incr(Counter::OwnDatagramsIgnored);
            return;
        }
        if !self.admit(h.epoch.get(), h.timestamp.get()) {
            return;
        }
        let addr = (source == sender).then_some(from);
        let Some((peer, cx)) = self.split_peer(now_ns, sender, addr, shrink(direct)) else {
            return;
        };
        let PeerCx {
            rng,
            backoff,
            status_due,
            cfg,
            mut sink,
        } = cx;
        let info = FrameInfo {
            sequence: h.sequence.get(),
            stream: h.stream.get(),
            epoch: h.epoch.get(),
            timestamp: h.timestamp.get(),
            message_len: h.message_len.get(),
            fragment_offset: h.fragment_offset.get(),
            payload: d.payload,
        };
        if info.payload.len() > peer.held.slot_len() {
            // Larger than this member's MTU allows: members of a group must share one MTU.
            sink.counters.incr(Counter::RejectedFrames);
            return;
        }
        match peer.loss.on_frame(now_ns, info.sequence, backoff, rng) {
            Arrival::Duplicate => sink.counters.incr(Counter::DuplicateFrames),
            Arrival::BeyondWindow => {
                // The sender does not count us (our STATUS was lost, or it has not heard us
                // yet): tell it where we are now, before it overruns us further.
                sink.counters.incr(Counter::FramesBeyondWindow);
                if !peer.status_queued {
                    peer.status_queued = true;
                    status_due.push_back(sender);
                }
            }
            Arrival::Held => {
                if peer.held.hold(&info, lent) {
                    sink.counters.incr(Counter::FramesHeldCopied);
                }
                sink.counters.incr(Counter::FramesHeldOutOfOrder);
            }
            Arrival::InOrder => {
                sink.hand_on(&mut peer.reassembly, &info);
                drain_in_order(peer, &mut sink, lent);
                peer.loss.extend_tail(now_ns, backoff, rng);
            }
        }
        peer.report_if_moved(cfg, status_due);
    }

    /// The common frame of a subscriber, taken without [`on_data`](Self::on_data)'s general
    /// steps: a whole message straight from its sender (not relayed), in the current epoch,
    /// the next sequence of a known sender with nothing missing, held, announced beyond it or
    /// being reassembled, and nothing queued for delivery before it. It is handed to `direct`
    /// with every effect `on_data` would have (the clock, the sender's address and liveness,
    /// the loss detector, the counters, a STATUS as the limit moves on), and true is returned;
    /// any other frame changes nothing here and returns false, for `on_data` to take.
    ///
    /// Small messages come many to a datagram, and the general path's peer lookup, arrival
    /// classification, reassembly and draining per frame were most of what a subscriber's
    /// worker spent on them (docs/performance.md, twentieth set).
    #[inline(always)]
    fn deliver_next_in_place(
        &mut self,
        now_ns: Nanos,
        source: u32,
        from: SocketAddr,
        d: &DataFrame<'_>,
        direct: &mut dyn FnMut(&Output<'_>),
    ) -> bool {
        let h = d.header;
        let sender = h.sender.get();
        let len = d.payload.len();
        // `handle` has already dropped datagrams whose source is this member; deliveries are
        // queued here only behind a loss event of an earlier frame of this datagram; and every
        // peer's held slots take `max_frame_payload` bytes (`HeldFrames::slot_len`), so the
        // size is checked against the configuration, which this path reads anyway.
        if sender != source
            || h.epoch.get() != self.cfg.epoch
            || h.message_len.get() as usize != len
            || len > self.cfg.max_message_bytes
            || len > self.cfg.max_frame_payload()
            || !self.deliveries.is_empty()
        {
            return false;
        }
        // The decoder refuses a fragment reaching past its message's length.
        debug_assert_eq!(h.fragment_offset.get(), 0, "a whole message at an offset");
        let Some(i) = self.peers.find(sender) else {
            return false;
        };
        let peer = &mut self.peers.list[i];
        debug_assert_eq!(peer.held.slot_len(), self.cfg.max_frame_payload());
        if peer.reassembly.building().is_some() {
            return false;
        }
        let sequence = h.sequence.get();
        if !peer.loss.take_next_alone(sequence) {
            return false;
        }
        let timestamp = h.timestamp.get();
        self.clock = self.clock.max(timestamp);
        peer.addr = from;
        peer.last_heard_ns = now_ns;
        peer.report_if_moved(&self.cfg, &mut self.status_due);
        self.counters.incr(Counter::MessagesDelivered);
        self.counters.add(Counter::BytesDelivered, len as u64);
        direct(&Output::Message(Delivery {
            sender,
            stream: h.stream.get(),
            sequence,
            timestamp,
            epoch: self.cfg.epoch,
            payload: d.payload,
        }));
        true
    }

    fn on_nak(&mut self, now_ns: Nanos, nak: NakFrame<'_>) {
        let about = nak.header.sender.get();
        if about == self.cfg.member_id {
            let Some(s) = self.sender.as_mut() else {
                return;
            };
            self.counters.incr(Counter::NaksReceived);
            self.counters
                .add(Counter::NakRangesReceived, nak.ranges.len() as u64);
            for r in nak.ranges {
                let first = r.first.get();
                let end = first + u64::from(r.count.get());
                let (oldest, next) = (s.retransmit.oldest(), s.retransmit.next());
                if first < oldest {
                    self.counters
                        .add(Counter::NaksForEvicted, end.min(oldest) - first);
                    s.heartbeat_due = true;
                }
                for seq in first.max(oldest)..end.min(next) {
                    if s.retransmit
                        .claim_retransmit(seq, now_ns, self.cfg.retransmit_linger_ns)
                    {
                        s.retransmit_queue.push_back(seq);
                    } else {
                        self.counters.incr(Counter::RetransmitsLingered);
                    }
                }
            }
        } else if self.cfg.nak_suppression {
            let Some(peer) = self.peers.get_mut(about) else {
                return;
            };
            for r in nak.ranges {
                let held_back = peer.loss.suppress(
                    now_ns,
                    r.first.get(),
                    r.count.get(),
                    self.cfg.nak_retry_ns,
                    &self.backoff,
                    &mut self.rng,
                );
                if held_back {
                    self.counters.incr(Counter::NaksSuppressed);
                }
            }
        }
    }

    fn on_status(&mut self, now_ns: Nanos, source: u32, status: &StatusBody) {
        match self.sender.as_mut() {
            // A position beyond what was sent is not this stream's (a report of an earlier
            // view's stream, or forged): it must not open the window.
            Some(s)
                if status.sender.get() == self.cfg.member_id
                    && status.position.get() > s.retransmit.next() =>
            {
                self.counters.incr(Counter::StatusIgnored);
            }
            Some(s) if status.sender.get() == self.cfg.member_id => {
                s.flow
                    .on_status(now_ns, source, status.position.get(), status.window.get());
                s.heard_since_report = true;
                self.counters.incr(Counter::StatusReceived);
            }
            _ => self.reject(Counter::RejectedFrames, RejectReason::Malformed),
        }
    }

    fn on_heartbeat(
        &mut self,
        now_ns: Nanos,
        source: u32,
        from: SocketAddr,
        frame: HeartbeatFrame<'_>,
        direct: Option<&mut dyn FnMut(&Output<'_>)>,
        lent: Option<&mut Lent<'_>>,
    ) {
        let hb = frame.body;
        let sender = hb.sender.get();
        if sender == self.cfg.member_id || sender != source {
            self.reject(Counter::RejectedFrames, RejectReason::Malformed);
            return;
        }
        if !self.admit(hb.epoch.get(), hb.timestamp.get()) {
            return;
        }
        let Some((peer, cx)) = self.split_peer(now_ns, sender, Some(from), shrink(direct)) else {
            return;
        };
        let PeerCx {
            rng,
            backoff,
            status_due,
            mut sink,
            ..
        } = cx;
        peer.loss.on_heartbeat(
            now_ns,
            hb.next_sequence.get(),
            hb.oldest_sequence.get(),
            backoff,
            rng,
        );
        drain_in_order(peer, &mut sink, lent);
        peer.loss.extend_tail(now_ns, backoff, rng);
        // The sender holds frames until they are acknowledged and asks where we are: one
        // STATUS (the one already queued answers too). As many replies as requests, each
        // smaller than its request.
        if frame.flags & wire::HEARTBEAT_FLAG_REPORT != 0 && !peer.status_queued {
            peer.status_queued = true;
            status_due.push_back(sender);
            sink.counters.incr(Counter::StatusRequestsAnswered);
        }
    }
}

/// The header of the next frame of `msg`, with sequence `seq`.
fn fragment_header(cfg: &MemberConfig, msg: &Pending, seq: u64) -> DataHeader {
    DataHeader {
        stream: msg.stream.into(),
        sender: cfg.member_id.into(),
        epoch: cfg.epoch.into(),
        sequence: seq.into(),
        timestamp: msg.timestamp.into(),
        message_len: (msg.len as u32).into(),
        fragment_offset: (msg.sent as u32).into(),
    }
}

/// Frames the next fragment of the first queued message into the retransmit buffer alone, if
/// it fills a whole datagram (a message too large for one has at least a frame's worth left)
/// and flow control allows; returns its sequence and datagram length. Such a fragment would
/// travel alone anyway ([`frame_new_data`] makes the same cut), so it can leave from its slot.
fn frame_full_fragment(
    cfg: &MemberConfig,
    s: &mut SendState,
    counters: &mut Counters,
) -> Option<(u64, usize)> {
    let take = cfg.max_frame_payload();
    let msg = s.queue.messages.front_mut()?;
    if msg.len - msg.sent < take {
        return None;
    }
    let seq = s.retransmit.next();
    if seq >= s.flow.limit() {
        if !s.stalled {
            s.stalled = true;
            counters.incr(Counter::FlowControlStalls);
        }
        return None;
    }
    s.stalled = false;
    let header = fragment_header(cfg, msg, seq);
    let start = s.queue.head;
    let payload = &s.queue.bytes[start..start + take];
    let mut frame_len = 0;
    s.retransmit.push_with(|slot| {
        frame_len = wire::encode_data_frame(slot, &header, payload);
        frame_len
    });
    counters.incr(Counter::DataFramesSent);
    msg.sent += take;
    if msg.sent == msg.len {
        s.queue.messages.pop_front();
    }
    s.queue.consume(take);
    Some((seq, wire::DATAGRAM_HEADER_LEN + frame_len))
}

/// Frames queued messages into `w` while flow control and space allow; returns frames written.
fn frame_new_data(
    cfg: &MemberConfig,
    s: &mut SendState,
    w: &mut DatagramWriter<'_>,
    counters: &mut Counters,
) -> u32 {
    let mut frames = 0;
    let limit = s.flow.limit();
    while let Some(msg) = s.queue.messages.front_mut() {
        let seq = s.retransmit.next();
        if seq >= limit {
            if !s.stalled {
                s.stalled = true;
                counters.incr(Counter::FlowControlStalls);
            }
            break;
        }
        s.stalled = false;
        let left = msg.len - msg.sent;
        let room = w.remaining().saturating_sub(wire::DATA_FRAME_OVERHEAD);
        if left > room {
            // Keep a message whole when a fresh datagram would hold it; fragment only what
            // cannot fit in one, and never into a sliver.
            let fits_fresh = msg.sent == 0 && left <= cfg.max_frame_payload();
            if !w.is_empty() && (fits_fresh || room < 256.min(left)) {
                break;
            }
        }
        if (room == 0 && left > 0) || w.remaining() < wire::DATA_FRAME_OVERHEAD {
            break;
        }
        let take = left.min(room);
        let header = fragment_header(cfg, msg, seq);
        let start = s.queue.head;
        let payload = &s.queue.bytes[start..start + take];
        let written = w.push_data(0, &header, payload);
        debug_assert!(written, "room was checked");
        s.retransmit
            .push_with(|slot| wire::encode_data_frame(slot, &header, payload));
        counters.incr(Counter::DataFramesSent);
        frames += 1;
        msg.sent += take;
        let done = msg.sent == msg.len;
        s.queue.consume(take);
        if done {
            s.queue.messages.pop_front();
        }
    }
    frames
}

/// Shortens the lifetime of a borrowed delivery callback (a coercion that cannot happen
/// inside an `Option` by itself).
fn shrink<'s>(
    d: Option<&'s mut (dyn FnMut(&Output<'_>) + '_)>,
) -> Option<&'s mut (dyn FnMut(&Output<'_>) + 's)> {
    match d {
        Some(f) => Some(f),
        None => None,
    }
}

/// Hands frames of one sender on in sequence order until a gap stops it; frames held in a lent
/// arena are read from `lent`.
fn drain_in_order(peer: &mut Peer, sink: &mut Sink<'_>, mut lent: Option<&mut Lent<'_>>) {
    while let Some(step) = peer.loss.next_in_order() {
        match step {
            Step::Ready(sequence) => match peer.held.take(sequence, lent.as_deref_mut()) {
                Some(info) => sink.hand_on(&mut peer.reassembly, &info),
                None => debug_assert!(false, "loss detector and held frames disagree on {sequence}"),
            },
            Step::Lost { first, end } => {
                if peer.reassembly.abandon() {
                    sink.counters.incr(Counter::FragmentsDiscarded);
                }
                sink.counters.add(Counter::FramesUnrecoverable, end - first);
                sink.deliveries.push_event(Event::UnrecoverableLoss {
                    sender: sink.sender,
                    first,
                    count: end - first,
                });
            }
        }
    }
}

/// The member state that work on one peer needs, borrowed beside the peer.
struct PeerCx<'m> {
    rng: &'m mut ChaCha8Rng,
    backoff: &'m NakBackoff,
    status_due: &'m mut VecDeque<u32>,
    cfg: &'m MemberConfig,
    sink: Sink<'m>,
}

/// Where in-order frames of one sender end up.
struct Sink<'m> {
    sender: u32,
    max_message_bytes: usize,
    counters: &'m mut Counters,
    deliveries: &'m mut DeliveryQueue,
    events: &'m mut VecDeque<Event>,
    reported: &'m mut u8,
    /// Hands complete messages on in place while nothing is queued before them.
    direct: Option<&'m mut dyn FnMut(&Output<'_>)>,
}

/// Queues an [`Event::Rejected`] the first time `reason` happens.
fn report_once(events: &mut VecDeque<Event>, reported: &mut u8, reason: RejectReason) {
    let bit = 1u8 << (reason as u8);
    if *reported & bit == 0 {
        *reported |= bit;
        events.push_back(Event::Rejected { reason });
    }
}

impl Sink<'_> {
    fn hand_on(&mut self, reassembly: &mut Reassembly, info: &FrameInfo<'_>) {
        if info.fragment_offset == 0 && reassembly.building().is_some() {
            self.counters.incr(Counter::FragmentsDiscarded);
        }
        match reassembly.accept(info, self.max_message_bytes) {
            Assembled::Complete {
                first_sequence,
                payload,
            } => {
                self.counters.incr(Counter::MessagesDelivered);
                self.counters.add(Counter::BytesDelivered, payload.len() as u64);
                let delivery = Delivery {
                    sender: self.sender,
                    stream: info.stream,
                    sequence: first_sequence,
                    timestamp: info.timestamp,
                    epoch: info.epoch,
                    payload,
                };
                match self.direct.as_mut() {
                    // In order with nothing queued before it: no copy.
                    Some(f) if self.deliveries.is_empty() => f(&Output::Message(delivery)),
                    _ => self.deliveries.push(delivery),
                }
                reassembly.finish();
            }
            Assembled::Partial => {}
            Assembled::Discarded { .. } => self.counters.incr(Counter::FragmentsDiscarded),
            Assembled::Oversized => {
                self.counters.incr(Counter::RejectedOversizedMessage);
                report_once(self.events, self.reported, RejectReason::OversizedMessage);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_room_is_the_window_left_after_framed_and_queued_messages() {
        let cfg = MemberConfig {
            window_frames: 8,
            retransmit_frames: 8,
            ..MemberConfig::default()
        };
        let mut m = Member::new(cfg, 1).unwrap();
        assert_eq!(m.publish_room(), 8, "a member that never sent has one window");
        let big = [7u8; 1000];
        for _ in 0..5 {
            m.publish(0, &big).unwrap();
        }
        assert_eq!(m.publish_room(), 3, "five one-frame messages framed at publish");
        // A small message waits in the queue to share a datagram; it takes room all the same.
        m.publish(0, &[1u8; 64]).unwrap();
        assert_eq!(m.queued_bytes(), 64);
        assert_eq!(m.publish_room(), 2);
        // Behind a queued message even large ones queue, and the room runs out.
        m.publish(0, &big).unwrap();
        m.publish(0, &big).unwrap();
        assert_eq!(m.publish_room(), 0);
        assert_eq!(m.publish_room(), 0);
        assert_eq!(
            m.counters().get(Counter::FlowControlStalls),
            1,
            "one stall however often the room is asked for"
        );
        // Sending frames what fits; the window is still full until a receiver reports.
        let mut buf = vec![0u8; 1500];
        while m.poll_transmit(0, &mut buf).is_some() {}
        assert_eq!(m.publish_room(), 0);
        assert_eq!(m.next_sequence(), 8);
    }

    #[test]
    fn a_gap_waiting_for_repair_holds_the_sender_back_only_past_two_windows() {
        let cfg = |id| MemberConfig {
            member_id: id,
            window_frames: 8,
            retransmit_frames: 32,
            ..MemberConfig::default()
        };
        let mut sender = Member::new(cfg(1), 1).unwrap();
        let mut receiver = Member::new(cfg(2), 2).unwrap();
        let from: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let mut buf = vec![0u8; 1500];
        let mut publish = |sender: &mut Member, n: usize| {
            let mut out = Vec::new();
            for _ in 0..n {
                sender.publish(0, &[5u8; 1000]).unwrap();
                while let Some(t) = sender.poll_transmit(0, &mut buf) {
                    out.push(buf[..t.len].to_vec());
                }
            }
            out
        };
        let exchange = |receiver: &mut Member, sender: &mut Member, datagrams: &[Vec<u8>]| {
            let mut buf = vec![0u8; 1500];
            for d in datagrams {
                receiver.handle_datagram(0, from, d);
                while let Some(t) = receiver.poll_transmit(0, &mut buf) {
                    sender.handle_datagram(0, from, &buf[..t.len]);
                }
            }
        };
        let first = publish(&mut sender, 8);
        assert_eq!(sender.publish_room(), 0, "one window before any STATUS");
        // Sequence 0 is lost: the receiver still lets the sender run a window past the
        // highest sequence it has.
        exchange(&mut receiver, &mut sender, &first[1..]);
        assert_eq!(receiver.position_of(1), Some(0));
        assert_eq!(sender.publish_room(), 8);
        // But never more than two windows past its position: that is all it can hold.
        let second = publish(&mut sender, 8);
        exchange(&mut receiver, &mut sender, &second);
        assert_eq!(sender.publish_room(), 0);
        // The repair moves the position, and the sender on.
        exchange(&mut receiver, &mut sender, &first[..1]);
        assert_eq!(receiver.position_of(1), Some(16));
        assert_eq!(sender.publish_room(), 8);
    }

    #[test]
    fn a_status_request_is_answered_at_once_and_asked_again_no_sooner_than_a_linger() {
        let cfg = |id| MemberConfig {
            member_id: id,
            window_frames: 64,
            retransmit_frames: 64,
            ..MemberConfig::default()
        };
        let linger = MemberConfig::default().retransmit_linger_ns;
        let mut sender = Member::new(cfg(1), 1).unwrap();
        let mut receiver = Member::new(cfg(2), 2).unwrap();
        let from: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let pump = |a: &mut Member, b: &mut Member, now: Nanos| {
            let mut buf = vec![0u8; 1500];
            let mut n = 0;
            while let Some(t) = a.poll_transmit(now, &mut buf) {
                b.handle_datagram(now, from, &buf[..t.len]);
                n += 1;
            }
            n
        };
        // The receiver hears the sender and reports at once.
        sender.publish(0, &[5u8; 1000]).unwrap();
        pump(&mut sender, &mut receiver, 0);
        assert_eq!(pump(&mut receiver, &mut sender, 0), 1);
        assert_eq!(sender.acknowledged(), (1, Some(1)));
        // Four more frames move its limit by less than a quarter window: no report, and a
        // sender that keeps frames until they are acknowledged would wait for the next
        // `status_interval_ns`.
        for _ in 0..4 {
            sender.publish(0, &[5u8; 1000]).unwrap();
        }
        pump(&mut sender, &mut receiver, 5);
        assert_eq!(pump(&mut receiver, &mut sender, 5), 0);
        assert_eq!(sender.acknowledged(), (1, Some(1)));
        // Asked, it reports where it is.
        assert!(
            sender.request_status(10),
            "the request waits for the next transmit"
        );
        assert_eq!(pump(&mut sender, &mut receiver, 10), 1, "one flagged heartbeat");
        assert!(!sender.request_status(10), "sent: a new request is deferred");
        assert_eq!(receiver.counters().get(Counter::StatusRequestsAnswered), 1);
        assert_eq!(pump(&mut receiver, &mut sender, 10), 1);
        assert_eq!(sender.acknowledged(), (1, Some(5)));
        assert_eq!(sender.counters().get(Counter::StatusRequestsSent), 1);
        // The deferred request goes out when the linger since the last one ends, not before.
        sender.handle_timeout(20);
        assert_eq!(pump(&mut sender, &mut receiver, 20), 0);
        assert_eq!(sender.poll_timeout(), Some(10 + linger));
        sender.handle_timeout(10 + linger);
        assert_eq!(pump(&mut sender, &mut receiver, 10 + linger), 1);
        assert_eq!(sender.counters().get(Counter::StatusRequestsSent), 2);
        assert_eq!(receiver.counters().get(Counter::StatusRequestsAnswered), 2);
        // Its answer has not arrived when the next request goes out: the one after that waits
        // twice as long.
        let t1 = 10 + linger;
        assert!(!sender.request_status(t1));
        assert_eq!(sender.poll_timeout(), Some(t1 + linger));
        let t2 = t1 + linger;
        sender.handle_timeout(t2);
        assert_eq!(pump(&mut sender, &mut receiver, t2), 1);
        assert!(!sender.request_status(t2));
        assert_eq!(sender.poll_timeout(), Some(t2 + 2 * linger));
        // Once an answer is in, the wait is a linger again.
        assert_eq!(pump(&mut receiver, &mut sender, t2), 1, "one STATUS answers both");
        let t3 = t2 + 2 * linger;
        sender.handle_timeout(t3);
        assert_eq!(pump(&mut sender, &mut receiver, t3), 1);
        assert!(!sender.request_status(t3));
        assert_eq!(sender.poll_timeout(), Some(t3 + linger));
        assert_eq!(sender.counters().get(Counter::StatusRequestsSent), 4);
        assert_eq!(receiver.counters().get(Counter::StatusRequestsAnswered), 3);
    }

    #[test]
    fn unanswered_status_requests_back_off_to_the_status_interval() {
        let cfg = MemberConfig::default();
        let (linger, most) = (cfg.retransmit_linger_ns, cfg.status_interval_ns);
        let mut sender = Member::new(cfg, 1).unwrap();
        let mut buf = vec![0u8; 1500];
        sender.publish(0, &[5u8; 1000]).unwrap();
        while sender.poll_transmit(0, &mut buf).is_some() {}
        // Nobody answers: each request waits twice as long as the one before, up to the
        // interval of the receivers' own reports.
        let mut now = 0;
        let mut waits = Vec::new();
        assert!(sender.request_status(now));
        for _ in 0..10 {
            let mut flagged = false;
            while let Some(t) = sender.poll_transmit(now, &mut buf) {
                flagged |= matches!(
                    wire::decode_datagram(&buf[..t.len]).unwrap().1.next(),
                    Some(Ok(Frame::Heartbeat(hb))) if hb.flags == wire::HEARTBEAT_FLAG_REPORT
                );
            }
            assert!(flagged, "a request went out at {now}");
            assert!(!sender.request_status(now), "deferred");
            let next = sender.sender.as_ref().unwrap().next_report_ns;
            waits.push(next - now);
            now = next;
            sender.handle_timeout(now);
        }
        assert_eq!(waits[..4], [linger, 2 * linger, 4 * linger, 8 * linger]);
        assert_eq!(*waits.last().unwrap(), most);
        assert_eq!(sender.counters().get(Counter::StatusRequestsSent), 10);
    }

    #[test]
    fn a_retransmission_that_fills_a_datagram_leaves_from_its_slot_marked_as_such() {
        let cfg = |id| MemberConfig {
            member_id: id,
            ..MemberConfig::default()
        };
        let mut sender = Member::new(cfg(1), 1).unwrap();
        sender.set_in_place_transmit(true);
        let mut receiver = Member::new(cfg(2), 2).unwrap();
        let from: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let mut buf = vec![0u8; 1500];
        let mut datagrams = Vec::new();
        for i in 0..3u8 {
            sender.publish(0, &[i; 1000]).unwrap();
            while let Some(t) = sender.poll_transmit(0, &mut buf) {
                let seq = t.in_place.expect("one-frame messages leave in place");
                datagrams.push(sender.transmitted(seq).unwrap().to_vec());
            }
        }
        // Sequence 1 is lost: the receiver NAKs it once its back-off has passed.
        receiver.handle_datagram(0, from, &datagrams[0]);
        receiver.handle_datagram(0, from, &datagrams[2]);
        let now = receiver.poll_timeout().unwrap();
        receiver.handle_timeout(now);
        let mut sent = 0;
        while let Some(t) = receiver.poll_transmit(now, &mut buf) {
            sender.handle_datagram(now, from, &buf[..t.len]);
            sent += 1;
        }
        assert!(sent > 0 && receiver.counters().get(Counter::NaksSent) == 1);
        let t = sender.poll_transmit(now, &mut buf).expect("the repair");
        assert_eq!((t.in_place, t.new_data_frames), (Some(1), 0));
        let repair = sender.transmitted(1).unwrap().to_vec();
        assert_eq!(repair.len(), t.len);
        assert_eq!(repair[wire::DATAGRAM_HEADER_LEN + 1], wire::DATA_FLAG_RETRANSMIT);
        assert_eq!(sender.counters().get(Counter::Retransmissions), 1);
        receiver.handle_datagram(now, from, &repair);
        let mut got = Vec::new();
        receiver.drain(|o| {
            if let Output::Message(m) = o {
                got.push(m.payload[0]);
            }
        });
        assert_eq!(got, [0, 1, 2]);
    }

    #[test]
    fn fragments_that_fill_a_datagram_leave_from_their_slots_as_the_copies_would() {
        let cfg = |id| MemberConfig {
            member_id: id,
            ..MemberConfig::default()
        };
        let max = cfg(1).max_frame_payload();
        // Two identical senders; only the second may send datagrams from its retransmit slots.
        let mut copying = Member::new(cfg(1), 1).unwrap();
        let mut in_place = Member::new(cfg(1), 1).unwrap();
        in_place.set_in_place_transmit(true);
        let mut receiver = Member::new(cfg(2), 2).unwrap();
        let from: SocketAddr = "127.0.0.1:9".parse().unwrap();
        // Messages of several full frames and a short rest, one exactly a frame, one small: the
        // rests share datagrams with what follows.
        let lens = [3 * max + 500, max, 8192, 100, 2 * max];
        let messages: Vec<Vec<u8>> = lens
            .iter()
            .enumerate()
            .map(|(i, &n)| (0..n).map(|j| (i * 31 + j) as u8).collect())
            .collect();
        for m in &messages {
            copying.publish(0, m).unwrap();
            in_place.publish(0, m).unwrap();
        }
        let (mut buf, mut other) = (vec![0u8; 1500], vec![0u8; 1500]);
        let mut left_in_place = 0;
        loop {
            let c = copying.poll_transmit(0, &mut buf);
            let p = in_place.poll_transmit(0, &mut other);
            let (Some(c), Some(p)) = (c, p) else {
                assert_eq!(c.is_none(), p.is_none(), "the same number of datagrams");
                break;
            };
            let sent = match p.in_place {
                Some(seq) => {
                    left_in_place += 1;
                    assert_eq!(p.len, cfg(1).mtu, "a full datagram");
                    in_place.transmitted(seq).unwrap()
                }
                None => &other[..p.len],
            };
            assert_eq!(sent, &buf[..c.len], "the same datagram");
            assert_eq!(p.new_data_frames, c.new_data_frames);
            receiver.handle_datagram(0, from, sent);
        }
        // 3 + 1 (exactly a frame) + 5 of 8192 + 2 frames fill datagrams alone.
        assert_eq!(left_in_place, 3 + 1 + 5 + 2);
        let mut got = Vec::new();
        receiver.drain(|o| {
            if let Output::Message(m) = o {
                got.push(m.payload.to_vec());
            }
        });
        assert_eq!(got, messages);
        assert_eq!(
            in_place.counters().get(Counter::DataFramesSent),
            copying.counters().get(Counter::DataFramesSent)
        );
    }

    #[test]
    fn a_lent_message_leaves_and_is_repaired_from_where_it_lies() {
        let cfg = |id| MemberConfig {
            member_id: id,
            ..MemberConfig::default()
        };
        // Two identical senders: one copies its messages, one lends them.
        let mut copying = Member::new(cfg(1), 1).unwrap();
        let mut lending = Member::new(cfg(1), 1).unwrap();
        let mut receiver = Member::new(cfg(2), 2).unwrap();
        lending.set_in_place_transmit(true);
        copying.set_in_place_transmit(true);
        let mut store: Vec<Box<[u8]>> = (0..3u8)
            .map(|i| {
                let mut d = vec![0xaa; LENT_HEADROOM + 1000].into_boxed_slice();
                d[LENT_HEADROOM..].fill(i);
                d
            })
            .collect();
        let short = &mut [0u8; LENT_HEADROOM - 1][..];
        // SAFETY: refused, nothing is lent.
        assert!(matches!(
            unsafe { lending.publish_lent(0, short) },
            Err(Error::Config(_))
        ));
        let mut buf = vec![0u8; 1500];
        let mut datagrams = Vec::new();
        for (i, d) in store.iter_mut().enumerate() {
            copying.publish(0, &[i as u8; 1000]).unwrap();
            // SAFETY: `store` outlives `lending` and is not touched while lent.
            let lent = unsafe { lending.publish_lent(0, d) }.unwrap();
            assert_eq!(lent, Some(i as u64));
            let (c, l) = (
                copying.poll_transmit(0, &mut buf).unwrap(),
                lending.poll_transmit(0, &mut buf).unwrap(),
            );
            assert_eq!((c.in_place, l.in_place), (Some(i as u64), Some(i as u64)));
            let sent = lending.transmitted(i as u64).unwrap();
            assert_eq!(sent, copying.transmitted(i as u64).unwrap(), "the same datagram");
            assert_eq!(
                sent.as_ptr(),
                d.as_ptr()
                    .wrapping_add(LENT_HEADROOM - wire::DATAGRAM_HEADER_LEN - wire::DATA_FRAME_OVERHEAD)
            );
            datagrams.push(sent.to_vec());
        }
        // Behind a small message waiting to share a datagram, a large one is copied too.
        lending.publish(0, &[9; 10]).unwrap();
        let mut late = vec![7u8; LENT_HEADROOM + 1000].into_boxed_slice();
        // SAFETY: not lent (returns None), so nothing is kept.
        assert_eq!(unsafe { lending.publish_lent(0, &mut late) }.unwrap(), None);
        assert_eq!(lending.queued_bytes(), 1010);
        // Sequence 1 is lost: the repair leaves from the publisher's bytes, marked there.
        let from: SocketAddr = "127.0.0.1:9".parse().unwrap();
        receiver.handle_datagram(0, from, &datagrams[0]);
        receiver.handle_datagram(0, from, &datagrams[2]);
        let now = receiver.poll_timeout().unwrap();
        receiver.handle_timeout(now);
        while let Some(t) = receiver.poll_transmit(now, &mut buf) {
            lending.handle_datagram(now, from, &buf[..t.len]);
        }
        let t = lending.poll_transmit(now, &mut buf).expect("the repair");
        assert_eq!(t.in_place, Some(1));
        let at = LENT_HEADROOM - wire::DATA_FRAME_OVERHEAD + 1;
        assert_eq!(store[1][at], wire::DATA_FLAG_RETRANSMIT);
        receiver.handle_datagram(now, from, lending.transmitted(1).unwrap());
        let mut got = Vec::new();
        receiver.drain(|o| {
            if let Output::Message(m) = o {
                got.push((m.payload[0], m.payload.len()));
            }
        });
        assert_eq!(got, [(0, 1000), (1, 1000), (2, 1000)]);
        // Frames may be forgotten only below the lowest position a receiver reported (1,
        // in its NAK's STATUS, before the repair) and below the first unsent one.
        assert_eq!(lending.needed_from(), 1);
        while lending.poll_transmit(now, &mut buf).is_some() {}
        assert_eq!(lending.next_sequence(), 5);
        lending.forget_held_before(4);
        assert_eq!(lending.held_from(), 1);
        assert!(lending.transmitted(0).is_none() && lending.transmitted(1).is_some());
    }

    /// Receive buffers for tests: datagrams go into the free buffer used last, a buffer is
    /// scribbled over as soon as nothing is pinned in it, and every `refuse_every`-th pin that
    /// would take a new buffer is refused.
    struct TestArena {
        bytes: Vec<u8>,
        buf_len: usize,
        refs: Vec<u32>,
        free: Vec<usize>,
        pins: u64,
        refuse_every: u64,
        refused: u64,
    }

    struct TestLender<'a> {
        refs: &'a mut Vec<u32>,
        free: &'a mut Vec<usize>,
        buf_len: usize,
        pins: &'a mut u64,
        refuse_every: u64,
        refused: &'a mut u64,
    }

    impl super::super::Lend for TestLender<'_> {
        fn pin(&mut self, at: usize) -> bool {
            let b = at / self.buf_len;
            if self.refs[b] == 1 {
                *self.pins += 1;
                if self.refuse_every > 0 && *self.pins % self.refuse_every == 0 {
                    *self.refused += 1;
                    return false;
                }
            }
            self.refs[b] += 1;
            true
        }

        fn unpin(&mut self, at: usize) {
            let b = at / self.buf_len;
            assert!(self.refs[b] > 0, "unpinned more often than pinned");
            self.refs[b] -= 1;
            if self.refs[b] == 0 {
                self.free.push(b);
            }
        }
    }

    impl TestArena {
        fn new(buffers: usize, buf_len: usize, refuse_every: u64) -> Self {
            Self {
                bytes: vec![0; buffers * buf_len],
                buf_len,
                refs: vec![0; buffers],
                free: (0..buffers).rev().collect(),
                pins: 0,
                refuse_every,
                refused: 0,
            }
        }

        /// Reads `datagram` into a buffer and has `m` take it from there.
        fn deliver(&mut self, m: &mut Member, datagram: &[u8], out: &mut Vec<(u64, Vec<u8>)>) {
            self.deliver_at(0, m, datagram, out);
        }

        /// The arena's bytes and a lender of them (disjoint borrows).
        fn split(&mut self) -> (&[u8], TestLender<'_>) {
            let lender = TestLender {
                refs: &mut self.refs,
                free: &mut self.free,
                buf_len: self.buf_len,
                pins: &mut self.pins,
                refuse_every: self.refuse_every,
                refused: &mut self.refused,
            };
            (&self.bytes, lender)
        }

        /// Runs `m`'s timers at `now` with this arena lent.
        fn timeout(&mut self, now: Nanos, m: &mut Member) {
            let (arena, mut lender) = self.split();
            m.handle_timeout_lent(
                now,
                &mut Lent {
                    arena,
                    lender: &mut lender,
                },
            );
        }

        fn pinned(&self) -> u32 {
            self.refs.iter().sum()
        }

        /// Reads `run` end to end into one buffer, as GRO does (each `segment` bytes but the
        /// last), and has `m` take them in one call.
        fn deliver_run(
            &mut self,
            m: &mut Member,
            run: &[&[u8]],
            segment: usize,
            out: &mut Vec<(u64, Vec<u8>)>,
        ) {
            let b = self.free.pop().expect("a free buffer");
            let start = b * self.buf_len;
            let mut end = start;
            for d in run {
                self.bytes[end..end + d.len()].copy_from_slice(d);
                end += d.len();
            }
            self.take(0, m, b, start..end, Some(segment), out);
        }

        fn deliver_at(&mut self, now: Nanos, m: &mut Member, datagram: &[u8], out: &mut Vec<(u64, Vec<u8>)>) {
            let b = self.free.pop().expect("a free buffer");
            let start = b * self.buf_len;
            self.bytes[start..start + datagram.len()].copy_from_slice(datagram);
            self.take(now, m, b, start..start + datagram.len(), None, out);
        }

        /// Has `m` take what was read into buffer `b` at `range`: one datagram, or a run of
        /// them `segment` bytes each; then frees the buffer unless something in it is pinned.
        fn take(
            &mut self,
            now: Nanos,
            m: &mut Member,
            b: usize,
            range: std::ops::Range<usize>,
            segment: Option<usize>,
            out: &mut Vec<(u64, Vec<u8>)>,
        ) {
            self.refs[b] = 1;
            let from: SocketAddr = "127.0.0.1:9".parse().unwrap();
            let (arena, mut lender) = self.split();
            let mut lent = Lent {
                arena,
                lender: &mut lender,
            };
            let deliver = &mut |o: &Output<'_>| {
                if let Output::Message(d) = o {
                    out.push((d.sequence, d.payload.to_vec()));
                }
            };
            match segment {
                None => m.handle_datagram_lent(now, from, &mut lent, range, deliver),
                Some(s) => m.handle_datagrams_lent(now, from, &mut lent, range, s, deliver),
            }
            self.refs[b] -= 1;
            if self.refs[b] == 0 {
                self.free.push(b);
            }
            // What is no longer pinned may be received into again at once.
            for &f in self.free.iter() {
                self.bytes[f * self.buf_len..(f + 1) * self.buf_len].fill(0xee);
            }
        }
    }

    /// A member with the default configuration but its id, seeded.
    fn default_member(member_id: u32, seed: u64) -> Member {
        let cfg = MemberConfig {
            member_id,
            ..MemberConfig::default()
        };
        Member::new(cfg, seed).unwrap()
    }

    #[test]
    fn frames_behind_a_gap_wait_in_the_lent_arena_and_come_out_whole_and_in_order() {
        use rand::seq::SliceRandom;
        use rand::Rng;
        for seed in 0..24u64 {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let member = |member_id| default_member(member_id, seed);
            let (mut sender, mut receiver) = (member(1), member(2));
            // Small messages share datagrams, large ones fill one, the largest are fragmented.
            let messages: Vec<Vec<u8>> = (0..300u32)
                .map(|i| {
                    let len = match rng.random_range(0..4) {
                        0 => rng.random_range(1..64),
                        1 => rng.random_range(700..1200),
                        2 => rng.random_range(3000..5000),
                        _ => rng.random_range(64..300),
                    };
                    (0..len).map(|k| (i as usize * 31 + k) as u8).collect()
                })
                .collect();
            let mut buf = vec![0u8; 1500];
            let mut datagrams = Vec::new();
            for m in &messages {
                sender.publish(7, m).unwrap();
                while let Some(t) = sender.poll_transmit(0, &mut buf) {
                    datagrams.push(buf[..t.len].to_vec());
                }
            }
            // Every datagram arrives once, in an order shuffled within runs of 40.
            for run in datagrams.chunks_mut(40) {
                run.shuffle(&mut rng);
            }
            let refuse_every = [0, 3, 1][seed as usize % 3];
            let mut arena = TestArena::new(64, 2048, refuse_every);
            let mut out = Vec::new();
            for d in &datagrams {
                arena.deliver(&mut receiver, d, &mut out);
            }
            let got: Vec<&Vec<u8>> = out.iter().map(|(_, p)| p).collect();
            let want: Vec<&Vec<u8>> = messages.iter().collect();
            assert!(got == want, "seed {seed}: messages differ or out of order");
            assert!(
                arena.refs.iter().all(|&r| r == 0),
                "seed {seed}: pins left behind"
            );
            let c = receiver.counters();
            assert_eq!(c.get(Counter::FramesHeldCopied), arena.refused, "seed {seed}");
            let (held, copied) = (
                c.get(Counter::FramesHeldOutOfOrder),
                c.get(Counter::FramesHeldCopied),
            );
            assert!(held > 0, "seed {seed}: the shuffle held nothing back");
            if refuse_every == 1 {
                assert_eq!(copied, held, "seed {seed}: every pin refused, every frame copied");
            } else {
                assert!(copied < held, "seed {seed}: nothing held in place");
            }
        }
    }

    #[test]
    fn a_run_of_datagrams_in_one_buffer_is_taken_as_one_at_a_time() {
        use rand::seq::SliceRandom;
        use rand::Rng;
        for seed in 0..24u64 {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let member = |member_id| default_member(member_id, seed);
            let (mut sender, mut single, mut batched) = (member(1), member(2), member(2));
            let mut buf = vec![0u8; 1500];
            let mut datagrams = Vec::new();
            for i in 0..400u32 {
                // Runs of equal sizes (GRO's case), small messages packed, large fragmented.
                let len = match (i / 10) % 3 {
                    0 => 1000,
                    1 => rng.random_range(1..300),
                    _ => rng.random_range(3000..5000),
                };
                sender.publish(7, &vec![i as u8; len]).unwrap();
                while let Some(t) = sender.poll_transmit(0, &mut buf) {
                    datagrams.push(buf[..t.len].to_vec());
                }
            }
            for run in datagrams.chunks_mut(30) {
                run.shuffle(&mut rng);
            }
            // Both arenas refuse every pin or none, so both copy the same frames.
            let refuse_every = seed % 2;
            let (mut a, mut b) = (
                TestArena::new(64, 16_384, refuse_every),
                TestArena::new(64, 16_384, refuse_every),
            );
            let (mut one, mut many) = (Vec::new(), Vec::new());
            let mut rest: &[Vec<u8>] = &datagrams;
            let mut runs = 0;
            while let Some(first) = rest.first() {
                // Up to `most` datagrams of the first's size, then maybe one shorter.
                let most = rng.random_range(1..=8);
                let segment = first.len();
                let mut n = rest.iter().take(most).take_while(|d| d.len() == segment).count();
                if n < rest.len() && n < most && rest[n].len() < segment {
                    n += 1;
                }
                let run: Vec<&[u8]> = rest[..n].iter().map(|d| d.as_slice()).collect();
                for d in &run {
                    a.deliver(&mut single, d, &mut one);
                }
                b.deliver_run(&mut batched, &run, segment, &mut many);
                assert!(one == many, "seed {seed}: run {runs} delivered differently");
                assert_eq!(
                    single.counters().iter().collect::<Vec<_>>(),
                    batched.counters().iter().collect::<Vec<_>>(),
                    "seed {seed}: run {runs}"
                );
                assert_eq!(a.pinned(), b.pinned(), "seed {seed}: run {runs}");
                rest = &rest[n..];
                runs += 1;
            }
            assert!(
                runs < datagrams.len(),
                "seed {seed}: no run of more than one datagram"
            );
            assert_eq!(one.len(), 400, "seed {seed}");
            assert!(b.refs.iter().all(|&r| r == 0), "seed {seed}: pins left behind");
            let held = batched.counters().get(Counter::FramesHeldOutOfOrder);
            assert!(held > 0, "seed {seed}: the shuffle held nothing back");
        }
    }

    #[test]
    fn a_lent_range_outside_the_arena_is_rejected_not_read() {
        let mut receiver = Member::new(
            MemberConfig {
                member_id: 2,
                ..MemberConfig::default()
            },
            1,
        )
        .unwrap();
        let mut arena = TestArena::new(1, 64, 0);
        let (bytes, mut lender) = arena.split();
        let mut lent = Lent {
            arena: bytes,
            lender: &mut lender,
        };
        let from: SocketAddr = "127.0.0.1:9".parse().unwrap();
        receiver.handle_datagram_lent(0, from, &mut lent, 60..80, &mut |_| panic!("nothing to deliver"));
        assert_eq!(receiver.counters().get(Counter::RejectedMalformed), 1);
    }

    /// What `m` has queued for `drain`: messages by their first byte, losses as `(first, count)`.
    fn drained(m: &mut Member) -> (Vec<u8>, Vec<(u64, u64)>) {
        let (mut got, mut lost) = (Vec::new(), Vec::new());
        m.drain(|o| match o {
            Output::Message(d) => got.push(d.payload[0]),
            Output::Event(Event::UnrecoverableLoss { first, count, .. }) => lost.push((first, count)),
            Output::Event(e) => panic!("unexpected {e:?}"),
        });
        (got, lost)
    }

    /// Twelve one-frame messages (payload bytes all `i`) sent at 0, then a heartbeat at 5 ms:
    /// the datagrams in order, the heartbeat last.
    fn twelve_then_a_heartbeat(sender: &mut Member) -> Vec<Vec<u8>> {
        let mut buf = vec![0u8; 1500];
        let mut out = Vec::new();
        for i in 0..12u8 {
            sender.publish(0, &[i; 1000]).unwrap();
            while let Some(t) = sender.poll_transmit(0, &mut buf) {
                out.push(buf[..t.len].to_vec());
            }
        }
        assert_eq!(out.len(), 12, "one datagram per message");
        sender.handle_timeout(5_000_000);
        let t = sender.poll_transmit(5_000_000, &mut buf).expect("a heartbeat");
        out.push(buf[..t.len].to_vec());
        out
    }

    /// A sender (member 1) and a receiver (member 2) that took in, through a test arena at
    /// 6 ms, [`twelve_then_a_heartbeat`] but the datagrams at `lost`, and what it delivered.
    fn silent_after_twelve(lost: &[usize]) -> (Member, Member, TestArena, Vec<(u64, Vec<u8>)>) {
        let cfg = |member_id| MemberConfig {
            member_id,
            ..MemberConfig::default()
        };
        let (mut sender, mut receiver) = (Member::new(cfg(1), 1).unwrap(), Member::new(cfg(2), 2).unwrap());
        let datagrams = twelve_then_a_heartbeat(&mut sender);
        let mut arena = TestArena::new(32, 2048, 0);
        let mut out = Vec::new();
        for (i, d) in datagrams.iter().enumerate() {
            if !lost.contains(&i) {
                arena.deliver_at(6_000_000, &mut receiver, d, &mut out);
            }
        }
        (sender, receiver, arena, out)
    }

    #[test]
    fn a_silent_sender_is_given_up_and_its_held_frames_handed_on_and_unpinned() {
        // 2, 3, 10 and 11 are lost; 4..=9 wait behind the gap, pinned; the heartbeat (heard at
        // 6 ms) announces 12.
        let (mut sender, mut receiver, mut arena, mut out) = silent_after_twelve(&[2, 3, 10, 11]);
        let got: Vec<u8> = out.iter().map(|(_, p)| p[0]).collect();
        assert_eq!(got, [0, 1]);
        assert_eq!(arena.pinned(), 6, "4..=9 held in place");
        let timeout = receiver.config().sender_timeout_ns;
        let heard = 6_000_000;
        // Before the timeout the gaps are NAKed, and nothing is given up.
        arena.timeout(heard + timeout - 1, &mut receiver);
        assert_eq!(receiver.counters().get(Counter::SendersTimedOut), 0);
        assert_eq!(drained(&mut receiver), (vec![], vec![]));
        assert_eq!(arena.pinned(), 6);
        let mut buf = vec![0u8; 1500];
        while receiver.poll_transmit(heard + timeout - 1, &mut buf).is_some() {}
        assert!(
            receiver.counters().get(Counter::NaksSent) > 0,
            "the gaps were NAKed"
        );
        // At the timeout: what is held comes out in order, between the declared losses.
        arena.timeout(heard + timeout, &mut receiver);
        assert_eq!(receiver.counters().get(Counter::SendersTimedOut), 1);
        assert_eq!(
            drained(&mut receiver),
            (vec![4, 5, 6, 7, 8, 9], vec![(2, 2), (10, 2)])
        );
        assert_eq!(receiver.counters().get(Counter::FramesUnrecoverable), 4);
        assert_eq!(arena.pinned(), 0, "every pin released");
        // Nothing is left to NAK, and a sender this silent gets no STATUS either.
        let naks = receiver.counters().get(Counter::NaksSent);
        assert_eq!(receiver.poll_timeout(), None);
        while receiver.poll_transmit(heard + 2 * timeout, &mut buf).is_some() {}
        assert_eq!(receiver.counters().get(Counter::NaksSent), naks);
        // Given up once: a later timeout finds nothing missing.
        arena.timeout(heard + 3 * timeout, &mut receiver);
        assert_eq!(receiver.counters().get(Counter::SendersTimedOut), 1);
        // If it speaks again, it is received from where it was given up.
        sender.publish(0, &[12; 1000]).unwrap();
        let t = sender
            .poll_transmit(heard + 3 * timeout, &mut buf)
            .expect("message 12");
        let d = buf[..t.len].to_vec();
        arena.deliver_at(heard + 3 * timeout, &mut receiver, &d, &mut out);
        assert_eq!(out.last().map(|(_, p)| p[0]), Some(12));
    }

    #[test]
    fn a_silent_sender_with_frames_in_a_lent_arena_waits_for_a_lent_timeout() {
        let (_, mut receiver, mut arena, _) = silent_after_twelve(&[2]);
        let late = 6_000_000 + receiver.config().sender_timeout_ns;
        // Without the arena its frames cannot be handed on: the sender is not given up yet.
        receiver.handle_timeout(late);
        assert_eq!(receiver.counters().get(Counter::SendersTimedOut), 0);
        assert_eq!(arena.pinned(), 9);
        arena.timeout(late, &mut receiver);
        assert_eq!(receiver.counters().get(Counter::SendersTimedOut), 1);
        assert_eq!(drained(&mut receiver), ((3..12).collect(), vec![(2, 1)]));
        assert_eq!(arena.pinned(), 0);
    }

    #[test]
    fn a_silent_sender_is_given_up_on_the_copying_path_too() {
        let cfg = |member_id| MemberConfig {
            member_id,
            sender_timeout_ns: 50_000_000,
            ..MemberConfig::default()
        };
        let (mut sender, mut receiver) = (Member::new(cfg(1), 1).unwrap(), Member::new(cfg(2), 2).unwrap());
        let datagrams = twelve_then_a_heartbeat(&mut sender);
        let from: SocketAddr = "127.0.0.1:9".parse().unwrap();
        for (i, d) in datagrams.iter().enumerate() {
            if i != 0 && i != 11 {
                receiver.handle_datagram(6_000_000, from, d);
            }
        }
        receiver.handle_timeout(56_000_000 - 1);
        assert_eq!(drained(&mut receiver), (vec![], vec![]));
        receiver.handle_timeout(56_000_000);
        assert_eq!(drained(&mut receiver), ((1..11).collect(), vec![(0, 1), (11, 1)]));
        assert_eq!(receiver.counters().get(Counter::SendersTimedOut), 1);
    }
}
