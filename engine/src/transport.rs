//! UDP for the protocol core: sockets, a seeded loss decorator, and a member driven over them.
//!
//! Each member has two sockets: one bound to the group address that receives the group's
//! multicast, and one unicast socket on the interface that it sends everything from, so replies
//! addressed to a member (STATUS) reach exactly it. The default interface is 127.0.0.1 with
//! multicast TTL 0: a default configuration sends nothing off the host.

use crate::proto::{Delivery, Destination, Event, Member, Nanos, Output};
use crate::runtime::sys::set_buffer;
use crate::Error;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use socket2::{Domain, Protocol, Socket, Type};
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

/// Where and how a member talks UDP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpConfig {
    /// Interface address for multicast and for the unicast socket. Default 127.0.0.1.
    pub interface: Ipv4Addr,
    /// The group's multicast address and port.
    pub group: SocketAddrV4,
    /// Multicast TTL. Default 0: never leaves the host.
    pub ttl: u32,
    /// Deliver our own multicast to sockets on this host (other members here need it).
    pub loopback: bool,
    /// Requested send and receive buffer size of each socket, in bytes.
    pub socket_buffer_bytes: usize,
    /// Port of the unicast socket on `interface`; 0 lets the kernel pick one. Members reached
    /// through `peers` need a fixed one.
    pub unicast_port: u16,
    /// Unicast peers: when not empty, group traffic goes to each of them instead of multicast
    /// (for networks without multicast), and no group socket is opened.
    pub peers: Vec<SocketAddr>,
}

impl Default for UdpConfig {
    fn default() -> Self {
        Self {
            interface: Ipv4Addr::LOCALHOST,
            group: SocketAddrV4::new(Ipv4Addr::new(239, 255, 77, 1), 40_123),
            ttl: 0,
            loopback: true,
            socket_buffer_bytes: 8 << 20,
            unicast_port: 0,
            peers: Vec::new(),
        }
    }
}

/// What the sockets counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TransportStats {
    /// Datagrams sent (each unicast copy of a fan-out counts).
    pub sent: u64,
    /// Datagrams received.
    pub received: u64,
    /// Sends the kernel refused (the datagram is lost; NAK repair takes over).
    pub send_errors: u64,
    /// Datagrams dropped on purpose by the loss decorator.
    pub dropped_by_decorator: u64,
    /// Sends handed to the kernel (a GSO send carries many datagrams).
    pub send_calls: u64,
    /// Buffers received (a GRO buffer carries many datagrams).
    pub receive_buffers: u64,
}

/// Opens a member's sockets for `cfg`, in blocking mode: the group socket (`None` when the
/// group is reached through `peers`), bound to the group address and joined on the interface,
/// and the unicast socket that every datagram is sent from.
pub fn open_sockets(cfg: &UdpConfig) -> io::Result<(Option<UdpSocket>, UdpSocket)> {
    let unicast = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    set_buffer(unicast.as_raw_fd(), cfg.socket_buffer_bytes, true);
    set_buffer(unicast.as_raw_fd(), cfg.socket_buffer_bytes, false);
    unicast.set_multicast_if_v4(&cfg.interface)?;
    unicast.set_multicast_ttl_v4(cfg.ttl)?;
    unicast.set_multicast_loop_v4(cfg.loopback)?;
    unicast.bind(&SocketAddrV4::new(cfg.interface, cfg.unicast_port).into())?;
    let group_socket = if cfg.peers.is_empty() {
        let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
        s.set_reuse_address(true)?;
        set_buffer(s.as_raw_fd(), cfg.socket_buffer_bytes, true);
        // Bound to the group address itself: only this group's datagrams arrive here.
        s.bind(&SocketAddr::V4(cfg.group).into())?;
        s.join_multicast_v4(cfg.group.ip(), &cfg.interface)?;
        Some(s.into())
    } else {
        None
    };
    Ok((group_socket, unicast.into()))
}

/// A member's two UDP sockets.
#[derive(Debug)]
pub struct UdpTransport {
    group_socket: Option<UdpSocket>,
    unicast: UdpSocket,
    group: SocketAddr,
    peers: Vec<SocketAddr>,
    stats: TransportStats,
}

impl UdpTransport {
    /// Opens the sockets of `cfg`.
    pub fn open(cfg: &UdpConfig) -> io::Result<Self> {
        let (group_socket, unicast) = open_sockets(cfg)?;
        for s in group_socket.iter().chain(std::iter::once(&unicast)) {
            s.set_nonblocking(true)?;
        }
        Ok(Self {
            group_socket,
            unicast,
            group: SocketAddr::V4(cfg.group),
            peers: cfg.peers.clone(),
            stats: TransportStats::default(),
        })
    }

    /// The unicast address this member sends from.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.unicast.local_addr()
    }

    /// What the sockets counted.
    pub fn stats(&self) -> TransportStats {
        self.stats
    }

    /// Sends `bytes` to `destination`. A refused send is counted, not returned: the protocol
    /// repairs lost datagrams, and the data path never stops on a failed syscall.
    pub fn send(&mut self, destination: Destination, bytes: &[u8]) {
        match destination {
            Destination::Unicast(addr) => self.send_one(addr, bytes),
            Destination::Group if self.peers.is_empty() => self.send_one(self.group, bytes),
            Destination::Group => {
                for i in 0..self.peers.len() {
                    self.send_one(self.peers[i], bytes);
                }
            }
        }
    }

    fn send_one(&mut self, to: SocketAddr, bytes: &[u8]) {
        match self.unicast.send_to(bytes, to) {
            Ok(_) => self.stats.sent += 1,
            Err(_) => self.stats.send_errors += 1,
        }
    }

    /// Receives one datagram from either socket if one is waiting.
    pub fn try_recv(&mut self, buf: &mut [u8]) -> io::Result<Option<(usize, SocketAddr)>> {
        for socket in self.group_socket.iter().chain(std::iter::once(&self.unicast)) {
            match socket.recv_from(buf) {
                Ok((n, from)) => {
                    self.stats.received += 1;
                    return Ok(Some((n, from)));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        Ok(None)
    }

    /// Blocks until a socket is readable, the protocol's `deadline` (in the clock of `now`)
    /// comes, or `max_wait` passes; returns at once when the deadline has passed.
    pub fn wait_until(&self, now: Nanos, deadline: Option<Nanos>, max_wait: Duration) -> io::Result<()> {
        let wait = match deadline {
            Some(d) if d <= now => return Ok(()),
            Some(d) => max_wait.min(Duration::from_nanos(d - now)),
            None => max_wait,
        };
        if wait.is_zero() {
            return Ok(());
        }
        self.wait(wait)
    }

    /// Blocks until a socket is readable or `timeout` passes.
    pub fn wait(&self, timeout: Duration) -> io::Result<()> {
        let mut fds: Vec<libc::pollfd> = self
            .group_socket
            .iter()
            .chain(std::iter::once(&self.unicast))
            .map(|s| libc::pollfd {
                fd: s.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // ppoll, not poll: poll counts whole milliseconds, so a sub-millisecond wait would
        // become a busy loop that keeps other threads off a small machine's cores.
        let ts = libc::timespec {
            tv_sec: timeout.as_secs().min(i32::MAX as u64) as libc::time_t,
            tv_nsec: libc::c_long::from(timeout.subsec_nanos() as i32),
        };
        // SAFETY: `fds` is a live array of `fds.len()` pollfd structs and `ts` a live timespec
        // for the call's duration; a null signal mask leaves the thread's mask as it is.
        let rc = unsafe { libc::ppoll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, &ts, std::ptr::null()) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
        Ok(())
    }
}

/// Drops received datagrams with a seeded probability, so recovery can be tested over real
/// sockets without touching the protocol (the way Aeron's loss decorator does).
///
/// Each datagram is dropped independently with the probability; rather than a random draw per
/// datagram, the number kept before the next drop is drawn from the geometric distribution,
/// which is the same process at one draw per drop (the decorator runs on the receive path
/// it measures).
#[derive(Debug)]
pub struct ReceiveLoss {
    rng: ChaCha8Rng,
    probability: f64,
    /// Datagrams to keep before the next one is dropped.
    keep: u64,
}

impl ReceiveLoss {
    /// Drops each datagram with `probability` (0 to 1), from a generator seeded with `seed`.
    pub fn new(probability: f64, seed: u64) -> Self {
        let mut loss = Self {
            rng: ChaCha8Rng::seed_from_u64(seed),
            probability: if probability.is_nan() {
                0.0
            } else {
                probability.clamp(0.0, 1.0)
            },
            keep: 0,
        };
        loss.keep = loss.draw_keep();
        loss
    }

    /// How many datagrams to keep before the next drop: `k` with probability `(1 - p)^k p`.
    fn draw_keep(&mut self) -> u64 {
        let p = self.probability;
        if p <= 0.0 {
            return u64::MAX;
        }
        if p >= 1.0 {
            return 0;
        }
        // P(keep >= k) = P(1 - u <= (1 - p)^k) = (1 - p)^k, for u uniform in [0, 1).
        let u: f64 = self.rng.random();
        let k = ((1.0 - u).ln() / (1.0 - p).ln()).floor();
        // `as` saturates: a float beyond u64 (p tiny) keeps every datagram.
        k as u64
    }

    /// Whether to drop the next datagram.
    #[inline]
    pub fn drop_next(&mut self) -> bool {
        if self.keep > 0 {
            self.keep -= 1;
            return false;
        }
        self.keep = self.draw_keep();
        true
    }
}

/// A [`Member`] on real UDP sockets and a monotonic clock, driven by the caller's thread.
///
/// This is the blocking, single-member driver the runtime's workers will generalise; it is
/// what the real-socket tests use.
#[derive(Debug)]
pub struct UdpMember {
    member: Member,
    transport: UdpTransport,
    loss: Option<ReceiveLoss>,
    epoch: Instant,
    rx: Vec<u8>,
    tx: Vec<u8>,
}

impl UdpMember {
    /// Opens the sockets of `udp` for `member`; `loss` drops received datagrams on purpose.
    pub fn new(member: Member, udp: &UdpConfig, loss: Option<ReceiveLoss>) -> io::Result<Self> {
        let mtu = member.config().mtu;
        Ok(Self {
            member,
            transport: UdpTransport::open(udp)?,
            loss,
            epoch: Instant::now(),
            rx: vec![0; 65_536],
            tx: vec![0; mtu],
        })
    }

    /// The protocol state.
    pub fn member(&self) -> &Member {
        &self.member
    }

    /// What the sockets counted.
    pub fn transport_stats(&self) -> TransportStats {
        self.transport.stats()
    }

    fn now_ns(&self) -> Nanos {
        self.epoch.elapsed().as_nanos() as Nanos
    }

    /// Queues a message; see [`Member::publish`].
    pub fn publish(&mut self, stream: u32, message: &[u8]) -> Result<(), Error> {
        self.member.publish(stream, message)
    }

    /// One turn: sends what is due, waits up to `max_wait` for datagrams or the next protocol
    /// deadline, takes every datagram waiting, runs due timers, sends again, and hands out
    /// deliveries and events (in-stream events in their place among the deliveries).
    pub fn turn(
        &mut self,
        max_wait: Duration,
        mut deliver: impl FnMut(Delivery<'_>),
        mut event: impl FnMut(Event),
    ) -> io::Result<()> {
        self.flush();
        let now = self.now_ns();
        self.transport
            .wait_until(now, self.member.poll_timeout(), max_wait)?;
        while let Some((n, from)) = self.transport.try_recv(&mut self.rx)? {
            if let Some(loss) = self.loss.as_mut() {
                if loss.drop_next() {
                    self.transport.stats.dropped_by_decorator += 1;
                    continue;
                }
            }
            let now = self.now_ns();
            self.member.handle_datagram(now, from, &self.rx[..n]);
        }
        let now = self.now_ns();
        if self.member.poll_timeout().is_some_and(|d| d <= now) {
            self.member.handle_timeout(now);
        }
        self.flush();
        self.member.drain(|out| match out {
            Output::Message(d) => deliver(d),
            Output::Event(e) => event(e),
        });
        while let Some(e) = self.member.poll_event() {
            event(e);
        }
        Ok(())
    }

    fn flush(&mut self) {
        let now = self.now_ns();
        while let Some(t) = self.member.poll_transmit(now, &mut self.tx) {
            self.transport.send(t.destination, &self.tx[..t.len]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::ReceiveLoss;

    fn drops(p: f64, seed: u64, n: usize) -> Vec<bool> {
        let mut l = ReceiveLoss::new(p, seed);
        (0..n).map(|_| l.drop_next()).collect()
    }

    #[test]
    fn loss_drops_each_datagram_with_its_probability() {
        assert!(drops(0.0, 1, 10_000).iter().all(|&d| !d));
        assert!(drops(1.0, 1, 1_000).iter().all(|&d| d));
        assert!(drops(f64::NAN, 1, 1_000).iter().all(|&d| !d));
        for seed in 0..8u64 {
            for p in [0.01, 0.05, 0.3] {
                let n = 200_000;
                let d = drops(p, seed, n);
                let rate = d.iter().filter(|&&d| d).count() as f64 / n as f64;
                // Binomial standard deviation at most 0.0011 here: five of them.
                assert!((rate - p).abs() < 0.006, "seed {seed}: p {p}, dropped {rate}");
                // Independent datagrams: a drop right after a drop as often as any drop.
                let pairs = d.windows(2).filter(|w| w[0]).count() as f64;
                let both = d.windows(2).filter(|w| w[0] && w[1]).count() as f64;
                assert!(
                    (both / pairs - p).abs() < 0.03,
                    "seed {seed}: p {p}, after a drop {}",
                    both / pairs
                );
            }
            assert_eq!(drops(0.05, seed, 1_000), drops(0.05, seed, 1_000), "seeded");
        }
    }
}
