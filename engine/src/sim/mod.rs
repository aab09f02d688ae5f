//! The deterministic simulator: members on a virtual multicast segment, in virtual time.
//!
//! A seeded network drops, duplicates, reorders, delays and partitions datagrams; one seed is one
//! exact run. A checker verifies every delivery: exactly once, intact, in per-sender order.

mod attack;
pub mod group;

use crate::proto::{Counter, Counters, Destination, Event, Member, MemberConfig, Nanos, Output};
use crate::shield::{Lane, Rejection, Shield, SEAL_OVERHEAD};
use crate::Error;
use attack::Attacker;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::rc::Rc;

/// A cut between `side` and everyone else during `[start_ns, end_ns)`.
#[derive(Debug, Clone, PartialEq)]
pub struct Partition {
    /// When the cut starts (virtual ns).
    pub start_ns: Nanos,
    /// When it heals.
    pub end_ns: Nanos,
    /// Member indices on one side of the cut.
    pub side: Vec<usize>,
}

/// One simulated run.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Members in the group (senders included).
    pub members: usize,
    /// Members `0..senders` publish.
    pub senders: usize,
    /// Messages each sender publishes.
    pub messages: u64,
    /// Bytes per message; at least 8 (the message index is in the payload).
    pub size: usize,
    /// Probability that one receiver misses one datagram.
    pub loss: f64,
    /// Probability that a datagram reaches one receiver twice.
    pub dup: f64,
    /// Probability that a datagram is held back behind later ones.
    pub reorder: f64,
    /// One-way network delay.
    pub latency_ns: Nanos,
    /// Extra delay drawn uniformly from `0..=jitter_ns` per datagram and receiver.
    pub jitter_ns: Nanos,
    /// Each member's link speed in bits per second: its datagrams leave one after another.
    pub bandwidth_bps: u64,
    /// The seed of the network and of every member's back-off.
    pub seed: u64,
    /// Partitions of the network.
    pub partitions: Vec<Partition>,
    /// Settings every member starts from (`member_id` is set per member).
    pub member: MemberConfig,
    /// The run fails if it has not completed by this virtual time (livelock bound).
    pub max_virtual_ns: Nanos,
    /// Seal every datagram with the Secure Group Layer (members `senders..` may only
    /// subscribe); datagrams stay within `member.mtu`, seal included.
    pub secure: bool,
    /// With `secure`: the probability, per datagram sent, that an adversary on the segment
    /// injects an attack derived from it (replayed, modified, truncated, forged, outsider,
    /// unlisted member, subscriber publishing, unknown epoch, in turn).
    pub attack: f64,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            members: 6,
            senders: 1,
            messages: 1000,
            size: 64,
            loss: 0.0,
            dup: 0.0,
            reorder: 0.0,
            latency_ns: 50_000,
            jitter_ns: 20_000,
            bandwidth_bps: 10_000_000_000,
            seed: 1,
            partitions: Vec::new(),
            // The simulator keeps the settings its documented figures and CI sweeps were made
            // with: a 1024-frame window, a 2 ms NAK back-off and a 2 ms retransmit linger.
            member: MemberConfig {
                window_frames: 1024,
                retransmit_frames: 4096,
                nak_max_backoff_ns: 2_000_000,
                nak_retry_ns: 4_000_000,
                retransmit_linger_ns: 2_000_000,
                ..MemberConfig::default()
            },
            max_virtual_ns: 600_000_000_000,
            secure: false,
            attack: 0.0,
        }
    }
}

/// What a run did and whether the checker accepted it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SimReport {
    /// The seed.
    pub seed: u64,
    /// Members in the group.
    pub members: usize,
    /// Publishing members.
    pub senders: usize,
    /// Messages per sender.
    pub messages: u64,
    /// Bytes per message.
    pub size: usize,
    /// Loss probability.
    pub loss: f64,
    /// The checker's verdict: every message delivered exactly once, intact, in order, everywhere.
    pub delivered_ok: bool,
    /// The first thing the checker found wrong, if any.
    pub failure: Option<String>,
    /// Deliveries that broke a rule (duplicate, reorder, corruption, invention, silent skip).
    pub violations: u64,
    /// Messages delivered, summed over receivers.
    pub delivered_messages: u64,
    /// Messages that should have been delivered, summed over receivers.
    pub expected_messages: u64,
    /// Datagrams all members handed to the network.
    pub sent_datagrams: u64,
    /// DATA frames sent again.
    pub retransmissions: u64,
    /// NAK frames sent by receivers.
    pub naks_sent: u64,
    /// NAK frames that reached the sender they concern.
    pub naks_received_by_senders: u64,
    /// NAK ranges that reached the sender they concern.
    pub nak_ranges_received_by_senders: u64,
    /// NAK ranges held back because another receiver's NAK was heard.
    pub naks_suppressed: u64,
    /// Distinct first-transmission DATA datagrams that at least one receiver missed.
    pub lost_packets: u64,
    /// Datagram copies the network dropped (loss and partitions).
    pub dropped_copies: u64,
    /// Frames declared unrecoverable by receivers.
    pub unrecoverable_frames: u64,
    /// `UnrecoverableLoss` events seen.
    pub unrecoverable_events: u64,
    /// Virtual time the run took.
    pub virtual_seconds: f64,
    /// Every protocol counter, summed over members.
    pub counters: Vec<(String, u64)>,
    /// Datagrams were sealed.
    pub secure: bool,
    /// Attacks the adversary injected.
    pub attacks_injected: u64,
    /// Datagrams the members' shields rejected, by reason, summed over members.
    pub secure_rejected: Vec<(String, u64)>,
}

impl SimReport {
    /// `naks_received_by_senders / lost_packets`, the NAK implosion figure.
    pub fn nak_ratio(&self) -> f64 {
        if self.lost_packets == 0 {
            0.0
        } else {
            self.naks_received_by_senders as f64 / self.lost_packets as f64
        }
    }
}

/// The address member `index` sends from on the virtual segment (never used on a real network).
pub fn member_addr(index: usize) -> SocketAddr {
    let i = index as u32;
    SocketAddr::V4(SocketAddrV4::new(
        Ipv4Addr::new(127, 1 + (i >> 16) as u8, (i >> 8) as u8, i as u8),
        9000,
    ))
}

pub(crate) fn addr_index(addr: SocketAddr) -> Option<usize> {
    match addr {
        SocketAddr::V4(v4) => {
            let [_, a, b, c] = v4.ip().octets();
            Some(((usize::from(a) - 1) << 16) | (usize::from(b) << 8) | usize::from(c))
        }
        SocketAddr::V6(_) => None,
    }
}

/// Member id of member `index`.
pub fn member_id(index: usize) -> u32 {
    index as u32 + 1
}

/// Fills `out` with message `index` of `sender`: the index, then bytes derived from both.
pub fn fill_payload(sender: u32, index: u64, out: &mut [u8]) {
    out[..8].copy_from_slice(&index.to_le_bytes());
    let mut x = (u64::from(sender) << 40) ^ index ^ 0x9e37_79b9_7f4a_7c15;
    for chunk in out[8..].chunks_mut(8) {
        // splitmix64
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        chunk.copy_from_slice(&z.to_le_bytes()[..chunk.len()]);
    }
}

/// Per receiver and sender: what the checker expects next.
#[derive(Debug, Clone, Default)]
struct Track {
    next_index: u64,
    /// An `UnrecoverableLoss` for this sender was reported and not yet accounted for by a skip.
    loss_reported: bool,
}

/// Checks deliveries against what was published.
#[derive(Debug)]
struct Checker {
    messages: u64,
    size: usize,
    senders: usize,
    tracks: Vec<Track>,
    scratch: Vec<u8>,
    violations: u64,
    failure: Option<String>,
    delivered: u64,
    /// (receiver, sender) pairs that have everything.
    complete_pairs: u64,
}

impl Checker {
    fn new(members: usize, senders: usize, messages: u64, size: usize) -> Self {
        Self {
            messages,
            size,
            senders,
            tracks: vec![Track::default(); members * senders],
            scratch: vec![0; size],
            violations: 0,
            failure: None,
            delivered: 0,
            complete_pairs: 0,
        }
    }

    fn expected_pairs(&self, members: usize) -> u64 {
        let pairs = (members * self.senders - self.senders) as u64;
        if self.messages == 0 {
            0
        } else {
            pairs
        }
    }

    fn fail(&mut self, what: String) {
        self.violations += 1;
        if self.failure.is_none() {
            self.failure = Some(what);
        }
    }

    fn on_loss(&mut self, receiver: usize, sender_id: u32) {
        let s = sender_id as usize - 1;
        if s < self.senders {
            self.tracks[receiver * self.senders + s].loss_reported = true;
        }
    }

    fn on_delivery(&mut self, receiver: usize, sender_id: u32, payload: &[u8]) {
        self.delivered += 1;
        let s = (sender_id as usize).wrapping_sub(1);
        if s >= self.senders || s == receiver {
            return self.fail(format!(
                "member {receiver} got a message from non-sender {sender_id}"
            ));
        }
        if payload.len() != self.size {
            return self.fail(format!(
                "member {receiver} got {} bytes from sender {sender_id}, expected {}",
                payload.len(),
                self.size
            ));
        }
        let index = u64::from_le_bytes(payload[..8].try_into().expect("size >= 8"));
        fill_payload(sender_id, index, &mut self.scratch);
        if index >= self.messages || payload != self.scratch.as_slice() {
            return self.fail(format!(
                "member {receiver} got a corrupt or invented message from sender {sender_id}"
            ));
        }
        let messages = self.messages;
        let track = &mut self.tracks[receiver * self.senders + s];
        let expected = track.next_index;
        if index == expected || (index > expected && track.loss_reported) {
            track.loss_reported = false;
            track.next_index = index + 1;
            if track.next_index == messages {
                self.complete_pairs += 1;
            }
        } else {
            self.fail(format!(
                "member {receiver} got message {index} from sender {sender_id}, expected {expected}"
            ));
        }
    }
}

/// Arrival times are kept to the microsecond: copies due in the same microsecond arrive in the
/// order they were sent, which keeps the queue small and the run deterministic.
pub(crate) const TICK_NS: Nanos = 1000;

#[derive(Debug)]
struct InFlight {
    to: usize,
    from: usize,
    bytes: Rc<[u8]>,
}

/// A simulated group: members, network, checker.
#[derive(Debug)]
pub struct Simulation {
    cfg: SimConfig,
    members: Vec<Member>,
    rng: ChaCha8Rng,
    now_ns: Nanos,
    /// Copies in flight by arrival tick, each tick's in send order.
    network: BTreeMap<Nanos, Vec<InFlight>>,
    /// When each member's link is free to start the next datagram.
    link_free_ns: Vec<Nanos>,
    timers: BinaryHeap<Reverse<(Nanos, usize)>>,
    timer_at: Vec<Option<Nanos>>,
    published: Vec<u64>,
    checker: Checker,
    buf: Vec<u8>,
    payload: Vec<u8>,
    /// `(sender, index)` of the message now in `payload`.
    payload_of: Option<(usize, u64)>,
    lost_packets: u64,
    dropped_copies: u64,
    unrecoverable_events: u64,
    /// Per partition, whether each member is on its `side`.
    sides: Vec<Vec<bool>>,
    /// Each member's shield, in secured runs.
    shields: Vec<Shield>,
    attacker: Option<Attacker>,
    /// Scratch space a datagram is opened in.
    open_buf: Vec<u8>,
}

impl Simulation {
    /// Builds the members and the network of `cfg`.
    pub fn new(cfg: SimConfig) -> Result<Self, Error> {
        if cfg.members < 2 || cfg.senders == 0 || cfg.senders > cfg.members {
            return Err(Error::Config(format!(
                "need at least 2 members and 1..=members senders, got {} members and {} senders",
                cfg.members, cfg.senders
            )));
        }
        if cfg.size < 8 || cfg.size > cfg.member.max_message_bytes {
            return Err(Error::Config(format!(
                "size {} must be at least 8 (the message index) and at most max_message_bytes",
                cfg.size
            )));
        }
        if cfg.attack > 0.0 && !cfg.secure {
            return Err(Error::Config("attack needs secure".into()));
        }
        for (name, p) in [
            ("loss", cfg.loss),
            ("dup", cfg.dup),
            ("reorder", cfg.reorder),
            ("attack", cfg.attack),
        ] {
            if !(0.0..1.0).contains(&p) {
                return Err(Error::Config(format!("{name} {p} must be in [0, 1)")));
            }
        }
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
        let mut members = Vec::with_capacity(cfg.members);
        let mut shields = Vec::new();
        for i in 0..cfg.members {
            let mut m = cfg.member.clone();
            m.member_id = member_id(i);
            if cfg.secure {
                m.mtu = m.mtu.saturating_sub(SEAL_OVERHEAD);
                shields.push(Shield::new(
                    m.group,
                    m.member_id,
                    attack::epoch(cfg.members, cfg.senders),
                ));
            }
            members.push(Member::new(m, rng.random())?);
        }
        let attacker = (cfg.attack > 0.0)
            .then(|| Attacker::new(cfg.seed, cfg.attack, cfg.member.group, cfg.members, cfg.senders));
        let sides = cfg
            .partitions
            .iter()
            .map(|p| {
                let mut side = vec![false; cfg.members];
                for &i in &p.side {
                    if let Some(s) = side.get_mut(i) {
                        *s = true;
                    }
                }
                side
            })
            .collect();
        Ok(Self {
            checker: Checker::new(cfg.members, cfg.senders, cfg.messages, cfg.size),
            buf: vec![0; cfg.member.mtu],
            payload: vec![0; cfg.size],
            payload_of: None,
            published: vec![0; cfg.senders],
            timer_at: vec![None; cfg.members],
            members,
            rng,
            now_ns: 0,
            network: BTreeMap::new(),
            link_free_ns: vec![0; cfg.members],
            timers: BinaryHeap::new(),
            lost_packets: 0,
            dropped_copies: 0,
            unrecoverable_events: 0,
            sides,
            shields,
            attacker,
            open_buf: Vec::new(),
            cfg,
        })
    }

    /// The members, for inspection.
    pub fn members(&self) -> &[Member] {
        &self.members
    }

    /// Runs to completion (every message delivered or accounted for) or to the livelock bound.
    pub fn run(mut self) -> SimReport {
        let expected_pairs = self.checker.expected_pairs(self.cfg.members);
        let mut stuck = None;
        loop {
            self.publish_all();
            if self.checker.complete_pairs >= expected_pairs && self.all_published() {
                break;
            }
            let next_net = self.network.first_key_value().map(|(&t, _)| t);
            let next_timer = self.timers.peek().map(|Reverse((t, _))| *t);
            let next = match (next_net, next_timer) {
                (Some(a), Some(b)) => a.min(b),
                (Some(a), None) | (None, Some(a)) => a,
                (None, None) => {
                    stuck = Some("nothing left to do but messages are missing".to_string());
                    break;
                }
            };
            if next > self.cfg.max_virtual_ns {
                stuck = Some(format!(
                    "not complete after {} virtual seconds (livelock bound)",
                    self.cfg.max_virtual_ns as f64 / 1e9
                ));
                break;
            }
            self.now_ns = self.now_ns.max(next);
            self.step();
        }
        self.report(expected_pairs, stuck)
    }

    fn all_published(&self) -> bool {
        self.published.iter().all(|&p| p == self.cfg.messages)
    }

    fn publish_all(&mut self) {
        for s in 0..self.cfg.senders {
            let mut any = false;
            while self.published[s] < self.cfg.messages {
                let queued = self.members[s].queued_bytes();
                if queued > 0 && queued + self.cfg.size > self.cfg.member.send_queue_bytes {
                    break;
                }
                if self.payload_of != Some((s, self.published[s])) {
                    fill_payload(member_id(s), self.published[s], &mut self.payload);
                    self.payload_of = Some((s, self.published[s]));
                }
                match self.members[s].publish(1, &self.payload) {
                    Ok(()) => {
                        self.published[s] += 1;
                        any = true;
                    }
                    Err(_) => break,
                }
            }
            if any {
                self.flush(s);
            }
        }
    }

    /// Processes everything due at `now_ns`.
    fn step(&mut self) {
        let now = self.now_ns;
        let mut touched = Vec::new();
        while self.network.first_key_value().is_some_and(|(&t, _)| t <= now) {
            let (_, arrivals) = self.network.pop_first().expect("checked");
            for f in arrivals {
                if let Some(shield) = self.shields.get_mut(f.to) {
                    self.open_buf.clear();
                    self.open_buf.extend_from_slice(&f.bytes);
                    // Rejections are counted by the shield; nothing reaches the member.
                    if let Ok(n) = shield.open(&mut self.open_buf) {
                        self.members[f.to].handle_datagram(now, member_addr(f.from), &self.open_buf[..n]);
                    }
                } else {
                    self.members[f.to].handle_datagram(now, member_addr(f.from), &f.bytes);
                }
                touched.push(f.to);
            }
        }
        while let Some(&Reverse((t, i))) = self.timers.peek() {
            if t > now {
                break;
            }
            self.timers.pop();
            if self.timer_at[i] != Some(t) {
                continue;
            }
            self.timer_at[i] = None;
            self.members[i].handle_timeout(now);
            touched.push(i);
        }
        touched.sort_unstable();
        touched.dedup();
        for i in touched {
            self.flush(i);
        }
    }

    /// Sends what member `i` has to send, hands its deliveries to the checker, re-arms its timer.
    fn flush(&mut self, i: usize) {
        let now = self.now_ns;
        let member_mtu = self.members[i].config().mtu;
        while let Some(t) = self.members[i].poll_transmit(now, &mut self.buf[..member_mtu]) {
            let mut attack = None;
            let bytes: Rc<[u8]> = match self.shields.get_mut(i) {
                None => Rc::from(&self.buf[..t.len]),
                Some(shield) => {
                    let plain = self.buf[..t.len].to_vec();
                    let n = shield
                        .seal(&mut self.buf, t.len, Lane::of(&t.destination))
                        .expect("the buffer has room for the seal");
                    let sealed: Rc<[u8]> = Rc::from(&self.buf[..n]);
                    attack = self.attacker.as_mut().and_then(|a| a.observe(&plain, &sealed));
                    sealed
                }
            };
            if let Some(forged) = attack {
                let forged: Rc<[u8]> = Rc::from(forged);
                for j in (0..self.cfg.members).filter(|&j| j != i) {
                    self.send_copy(i, j, now, &forged);
                }
            }
            let departs = now.max(self.link_free_ns[i]);
            let wire_ns = (t.len as u64 * 8).saturating_mul(1_000_000_000) / self.cfg.bandwidth_bps.max(1);
            self.link_free_ns[i] = departs + wire_ns;
            match t.destination {
                Destination::Group => {
                    let mut missed = false;
                    for j in 0..self.cfg.members {
                        if j != i {
                            missed |= !self.send_copy(i, j, departs, &bytes);
                        }
                    }
                    if missed && t.new_data_frames > 0 {
                        self.lost_packets += 1;
                    }
                }
                Destination::Unicast(addr) => {
                    if let Some(j) = addr_index(addr).filter(|&j| j < self.cfg.members) {
                        self.send_copy(i, j, departs, &bytes);
                    }
                }
            }
        }
        let Self {
            members,
            checker,
            unrecoverable_events,
            ..
        } = self;
        // In stream order: a loss event comes before the delivery that skips past it.
        members[i].drain(|out| match out {
            Output::Message(d) => checker.on_delivery(i, d.sender, d.payload),
            Output::Event(Event::UnrecoverableLoss { sender, .. }) => {
                *unrecoverable_events += 1;
                checker.on_loss(i, sender);
            }
            Output::Event(_) => {}
        });
        while self.members[i].poll_event().is_some() {}
        let next = self.members[i].poll_timeout().map(|t| t.max(now));
        if next != self.timer_at[i] {
            self.timer_at[i] = next;
            if let Some(t) = next {
                self.timers.push(Reverse((t, i)));
            }
        }
    }

    /// Puts one copy of a datagram from `from` to `to` on the wire; `false` if it was dropped.
    fn send_copy(&mut self, from: usize, to: usize, departs: Nanos, bytes: &Rc<[u8]>) -> bool {
        let now = departs;
        let cut = self
            .cfg
            .partitions
            .iter()
            .zip(&self.sides)
            .any(|(p, side)| now >= p.start_ns && now < p.end_ns && side[from] != side[to]);
        if cut || (self.cfg.loss > 0.0 && self.rng.random_bool(self.cfg.loss)) {
            self.dropped_copies += 1;
            return false;
        }
        let copies = if self.cfg.dup > 0.0 && self.rng.random_bool(self.cfg.dup) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let mut delay = self.cfg.latency_ns + self.rng.random_range(0..=self.cfg.jitter_ns);
            if self.cfg.reorder > 0.0 && self.rng.random_bool(self.cfg.reorder) {
                delay += self
                    .rng
                    .random_range(self.cfg.latency_ns..=4 * self.cfg.latency_ns.max(1));
            }
            let tick = (now + delay).div_ceil(TICK_NS) * TICK_NS;
            self.network.entry(tick).or_default().push(InFlight {
                to,
                from,
                bytes: bytes.clone(),
            });
        }
        true
    }

    fn report(self, expected_pairs: u64, stuck: Option<String>) -> SimReport {
        let mut total = Counters::default();
        let mut naks_to_senders = 0;
        let mut ranges_to_senders = 0;
        for (i, m) in self.members.iter().enumerate() {
            total.merge(m.counters());
            if i < self.cfg.senders {
                naks_to_senders += m.counters().get(Counter::NaksReceived);
                ranges_to_senders += m.counters().get(Counter::NakRangesReceived);
            }
        }
        let c = &self.checker;
        let complete = c.complete_pairs >= expected_pairs;
        let failure = c.failure.clone().or(stuck).or_else(|| {
            (self.unrecoverable_events > 0)
                .then(|| format!("{} unrecoverable-loss events", self.unrecoverable_events))
        });
        let expected_messages = expected_pairs * self.cfg.messages;
        SimReport {
            seed: self.cfg.seed,
            members: self.cfg.members,
            senders: self.cfg.senders,
            messages: self.cfg.messages,
            size: self.cfg.size,
            loss: self.cfg.loss,
            delivered_ok: failure.is_none() && complete && c.delivered == expected_messages,
            failure,
            violations: c.violations,
            delivered_messages: c.delivered,
            expected_messages,
            sent_datagrams: total.get(Counter::DatagramsSent),
            retransmissions: total.get(Counter::Retransmissions),
            naks_sent: total.get(Counter::NaksSent),
            naks_received_by_senders: naks_to_senders,
            nak_ranges_received_by_senders: ranges_to_senders,
            naks_suppressed: total.get(Counter::NaksSuppressed),
            lost_packets: self.lost_packets,
            dropped_copies: self.dropped_copies,
            unrecoverable_frames: total.get(Counter::FramesUnrecoverable),
            unrecoverable_events: self.unrecoverable_events,
            virtual_seconds: self.now_ns as f64 / 1e9,
            counters: total.iter().map(|(k, v)| (k.to_string(), v)).collect(),
            secure: self.cfg.secure,
            attacks_injected: self.attacker.as_ref().map_or(0, |a| a.injected),
            secure_rejected: Rejection::ALL
                .iter()
                .map(|&r| {
                    let n = self.shields.iter().map(|s| s.stats().rejected(r)).sum();
                    (r.label().to_string(), n)
                })
                .collect(),
        }
    }
}

/// Runs one simulation of `cfg`.
pub fn run(cfg: SimConfig) -> Result<SimReport, Error> {
    Ok(Simulation::new(cfg)?.run())
}
