//! A [`GroupMember`] on real UDP sockets and a monotonic clock, driven by the caller's thread:
//! what `intergroup node`, `intergroup bench order` and the real-process tests run.

use super::{GroupMember, GroupOutput, Order};
use crate::proto::Nanos;
use crate::transport::{ReceiveLoss, TransportStats, UdpConfig, UdpTransport};
use crate::Error;
use std::io;
use std::time::{Duration, Instant};

/// One group member over UDP.
#[derive(Debug)]
pub struct UdpGroupMember {
    member: GroupMember,
    transport: UdpTransport,
    loss: Option<ReceiveLoss>,
    epoch: Instant,
    rx: Vec<u8>,
    tx: Vec<u8>,
    dropped: u64,
}

impl UdpGroupMember {
    /// Opens the sockets of `udp` for `member`; `loss` drops received datagrams on purpose.
    /// Times are measured from `epoch` (share one between members to compare timestamps).
    pub fn new(
        member: GroupMember,
        udp: &UdpConfig,
        loss: Option<ReceiveLoss>,
        epoch: Instant,
    ) -> io::Result<Self> {
        Ok(Self {
            tx: vec![0; member.cfg.member.mtu],
            member,
            transport: UdpTransport::open(udp)?,
            loss,
            epoch,
            rx: vec![0; 65_536],
            dropped: 0,
        })
    }

    /// The protocol state.
    pub fn member(&self) -> &GroupMember {
        &self.member
    }

    /// The protocol state, to publish or leave.
    pub fn member_mut(&mut self) -> &mut GroupMember {
        &mut self.member
    }

    /// What the sockets counted.
    pub fn transport_stats(&self) -> TransportStats {
        self.transport.stats()
    }

    /// Datagrams the loss decorator dropped.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Nanoseconds since the epoch.
    pub fn now_ns(&self) -> Nanos {
        self.epoch.elapsed().as_nanos() as Nanos
    }

    /// Publishes; see [`GroupMember::publish`].
    pub fn publish(&mut self, stream: u32, message: &[u8]) -> Result<(), Error> {
        self.member.publish(stream, message)
    }

    /// One turn: sends what is due, waits up to `max_wait` for datagrams or the next deadline,
    /// takes every datagram waiting, runs due timers, sends again, and hands every delivery of
    /// every enabled order to `out`.
    pub fn turn(&mut self, max_wait: Duration, mut out: impl FnMut(Order, GroupOutput)) -> io::Result<()> {
        self.flush();
        let now = self.now_ns();
        self.transport
            .wait_until(now, self.member.poll_timeout(), max_wait)?;
        let mut taken = 0;
        while let Some((n, from)) = self.transport.try_recv(&mut self.rx)? {
            if self.loss.as_mut().is_some_and(|l| l.drop_next()) {
                self.dropped += 1;
                continue;
            }
            let now = self.now_ns();
            self.member.handle_datagram(now, from, &self.rx[..n]);
            taken += 1;
            if taken % 64 == 0 {
                // Keep reports and repairs moving under a flood.
                self.flush();
            }
        }
        let now = self.now_ns();
        if self.member.poll_timeout().is_some_and(|d| d <= now) {
            self.member.handle_timeout(now);
        }
        self.flush();
        for o in Order::ALL {
            while let Some(d) = self.member.poll_output(o) {
                out(o, d);
            }
        }
        Ok(())
    }

    fn flush(&mut self) {
        let now = self.now_ns();
        while let Some(t) = self.member.poll_transmit(now, &mut self.tx) {
            let bytes = match t.in_place {
                Some(seq) => self
                    .member
                    .member()
                    .and_then(|m| m.transmitted(seq))
                    .unwrap_or(&[]),
                None => &self.tx[..t.len],
            };
            self.transport.send(t.destination, bytes);
        }
    }
}
