//! What a worker runs for one group: the bare reliable member (FIFO), or a group member with
//! membership and ordered delivery. One interface, so the worker's data path serves both.

use crate::group::{GroupEvent, GroupMember, GroupOutput, Order};
use crate::proto::{Counters, Delivery, Event, Lent, Member, MemberConfig, Nanos, Output, Transmit};
use crate::Error;
use std::net::SocketAddr;
use std::ops::Range;

/// The protocol state of one group in a worker.
// One per group, in the worker's group list: the size does not matter, and the plain member
// (the hot path of FIFO groups) stays inline, one pointer hop closer.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub(crate) enum Proto {
    /// Reliable FIFO multicast, no membership.
    Plain(Member),
    /// Membership, views, and fifo/total/safe order.
    Group(Box<GroupMember>),
}

/// An empty counter set for a group member between views.
static NO_COUNTERS: std::sync::LazyLock<Counters> = std::sync::LazyLock::new(Counters::default);

impl Proto {
    pub(crate) fn id(&self) -> u32 {
        match self {
            Proto::Plain(m) => m.id(),
            Proto::Group(g) => g.id(),
        }
    }

    pub(crate) fn config(&self) -> &MemberConfig {
        match self {
            Proto::Plain(m) => m.config(),
            Proto::Group(g) => g.member().map_or(g.member_config(), Member::config),
        }
    }

    /// MLS-keyed groups: the next epoch the data plane moves to (a view was installed).
    pub(crate) fn poll_rekey(&mut self) -> Option<crate::shield::ShieldEpoch> {
        match self {
            Proto::Plain(_) => None,
            Proto::Group(g) => g.poll_rekey(),
        }
    }

    pub(crate) fn has_membership(&self) -> bool {
        matches!(self, Proto::Group(_))
    }

    /// Becomes a sender: heartbeats start (plain), or the next view includes it as a sender.
    pub(crate) fn announce(&mut self) {
        match self {
            Proto::Plain(m) => m.announce(),
            Proto::Group(g) => g.want_to_send(),
        }
    }

    pub(crate) fn publish(&mut self, stream: u32, bytes: &[u8]) -> Result<(), Error> {
        match self {
            Proto::Plain(m) => m.publish(stream, bytes),
            Proto::Group(g) => g.publish(stream, bytes),
        }
    }

    /// A plain member frames a one-frame message where it lies ([`Member::publish_lent`]); a
    /// group member copies it (its ordering queues every message).
    ///
    /// # Safety
    ///
    /// As [`Member::publish_lent`], with [`Proto::held_from`].
    pub(crate) unsafe fn publish_lent(
        &mut self,
        stream: u32,
        datagram: &mut [u8],
    ) -> Result<Option<u64>, Error> {
        match self {
            // SAFETY: the caller upholds the contract.
            Proto::Plain(m) => unsafe { m.publish_lent(stream, datagram) },
            Proto::Group(g) => match datagram.get(crate::proto::LENT_HEADROOM..) {
                Some(message) => g.publish(stream, message).map(|()| None),
                None => Err(Error::Config(
                    "a lent datagram without room for its headers".into(),
                )),
            },
        }
    }

    /// See [`Member::held_from`]; a group member lends nothing (`u64::MAX`).
    pub(crate) fn held_from(&self) -> u64 {
        match self {
            Proto::Plain(m) => m.held_from(),
            Proto::Group(_) => u64::MAX,
        }
    }

    /// See [`Member::forget_held_before`].
    pub(crate) fn forget_held_before(&mut self, seq: u64) {
        if let Proto::Plain(m) = self {
            m.forget_held_before(seq);
        }
    }

    /// See [`Member::request_status`]; a group member lends nothing, so never asks.
    pub(crate) fn request_status(&mut self, now: Nanos) -> bool {
        match self {
            Proto::Plain(m) => m.request_status(now),
            Proto::Group(_) => false,
        }
    }

    pub(crate) fn queued_bytes(&self) -> usize {
        match self {
            Proto::Plain(m) => m.queued_bytes(),
            Proto::Group(g) => g.pending_bytes() + g.member().map_or(0, Member::queued_bytes),
        }
    }

    /// How many records a publication ring should hand over now: a plain member's
    /// [`Member::publish_room`], so what flow control holds back waits in the ring, not in the
    /// send queue; a group member takes whatever comes (its ordering queues it anyway).
    pub(crate) fn publish_room(&mut self) -> usize {
        match self {
            Proto::Plain(m) => usize::try_from(m.publish_room()).unwrap_or(usize::MAX),
            Proto::Group(_) => usize::MAX,
        }
    }

    /// Whether publications must be read now: a plain member only while remote receivers
    /// listen (local subscribers read the logs themselves); a group member always, since every
    /// delivery, local ones included, goes through its ordering.
    pub(crate) fn must_read_publications(&self) -> bool {
        match self {
            Proto::Plain(m) => m.receivers() > 0,
            Proto::Group(_) => true,
        }
    }

    pub(crate) fn acknowledged(&self) -> (usize, Option<u64>) {
        match self {
            Proto::Plain(m) => m.acknowledged(),
            Proto::Group(g) => g.member().map_or((0, None), Member::acknowledged),
        }
    }

    pub(crate) fn counters(&self) -> &Counters {
        match self {
            Proto::Plain(m) => m.counters(),
            Proto::Group(g) => g.member().map_or(&NO_COUNTERS, Member::counters),
        }
    }

    pub(crate) fn next_sequence(&self) -> u64 {
        match self {
            Proto::Plain(m) => m.next_sequence(),
            Proto::Group(g) => g.member().map_or(0, Member::next_sequence),
        }
    }

    /// Takes the datagram at `range` of `lent`'s arena and hands what it makes deliverable to
    /// `deliver`, per order. A plain member holds frames that wait behind a gap in the arena
    /// (see [`Member::handle_datagram_lent`]); a group with membership copies them.
    pub(crate) fn handle_datagram_lent(
        &mut self,
        now: Nanos,
        from: SocketAddr,
        lent: &mut Lent<'_>,
        range: Range<usize>,
        deliver: &mut dyn FnMut(Order, &Output<'_>),
    ) {
        let len = range.len();
        self.handle_datagrams_lent(now, from, lent, range, len, deliver);
    }

    /// [`handle_datagram_lent`](Self::handle_datagram_lent) for a run of datagrams laid end to
    /// end at `range`, each `segment` bytes long but the last (a GRO buffer).
    pub(crate) fn handle_datagrams_lent(
        &mut self,
        now: Nanos,
        from: SocketAddr,
        lent: &mut Lent<'_>,
        range: Range<usize>,
        segment: usize,
        deliver: &mut dyn FnMut(Order, &Output<'_>),
    ) {
        match self {
            Proto::Plain(m) => {
                m.handle_datagrams_lent(now, from, lent, range, segment, &mut |o| deliver(Order::Fifo, o))
            }
            Proto::Group(g) => match lent.arena.get(range) {
                Some(bytes) => {
                    for datagram in crate::wire::segments(bytes, segment) {
                        g.handle_datagram(now, from, datagram);
                        drain_group(g, deliver);
                    }
                }
                None => drain_group(g, deliver),
            },
        }
    }

    /// Runs due timers; `lent` is the arena [`handle_datagram_lent`](Self::handle_datagram_lent)
    /// is given, so a plain member can hand on frames pinned there.
    pub(crate) fn handle_timeout(&mut self, now: Nanos, lent: &mut Lent<'_>) {
        match self {
            Proto::Plain(m) => m.handle_timeout_lent(now, lent),
            Proto::Group(g) => g.handle_timeout(now),
        }
    }

    pub(crate) fn poll_timeout(&self) -> Option<Nanos> {
        match self {
            Proto::Plain(m) => m.poll_timeout(),
            Proto::Group(g) => g.poll_timeout(),
        }
    }

    pub(crate) fn poll_transmit(&mut self, now: Nanos, buf: &mut [u8]) -> Option<Transmit> {
        match self {
            Proto::Plain(m) => m.poll_transmit(now, buf),
            Proto::Group(g) => g.poll_transmit(now, buf),
        }
    }

    pub(crate) fn transmitted(&self, sequence: u64) -> Option<&[u8]> {
        match self {
            Proto::Plain(m) => m.transmitted(sequence),
            Proto::Group(g) => g.member()?.transmitted(sequence),
        }
    }

    pub(crate) fn pending_deliveries(&self) -> usize {
        match self {
            Proto::Plain(m) => m.pending_deliveries(),
            Proto::Group(g) => Order::ALL.iter().map(|&o| g.pending_outputs(o)).sum(),
        }
    }

    pub(crate) fn drain(&mut self, deliver: &mut dyn FnMut(Order, &Output<'_>)) {
        match self {
            Proto::Plain(m) => m.drain(|o| deliver(Order::Fifo, &o)),
            Proto::Group(g) => drain_group(g, deliver),
        }
    }
}

/// Hands every queued delivery of every order on, as the plain member's outputs: a message's
/// `sequence` is its index among its sender's messages of the view, `epoch` the view.
fn drain_group(g: &mut GroupMember, deliver: &mut dyn FnMut(Order, &Output<'_>)) {
    for o in Order::ALL {
        while let Some(out) = g.poll_output(o) {
            match out {
                GroupOutput::Message(m) => deliver(
                    o,
                    &Output::Message(Delivery {
                        sender: m.sender,
                        stream: m.stream,
                        sequence: m.index,
                        timestamp: m.timestamp,
                        epoch: m.view,
                        payload: &m.payload,
                    }),
                ),
                GroupOutput::Event(e) => {
                    let event = match &*e {
                        GroupEvent::View(v) | GroupEvent::NonPrimary(v) => Event::View {
                            view: v.id,
                            coordinator: v.coordinator,
                            members: v.members.len() as u32,
                            primary: v.primary,
                            joined: v.joined,
                        },
                        GroupEvent::Transitional { members } => Event::Transitional {
                            members: members.len() as u32,
                        },
                        GroupEvent::Left => Event::Left,
                    };
                    deliver(o, &Output::Event(event));
                }
            }
        }
    }
}
