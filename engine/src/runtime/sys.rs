//! The few socket details that `socket2` and `std` do not cover: the FORCE buffer options, UDP
//! GSO/GRO, raw `sockaddr_in` conversion, and parsing of control messages.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::RawFd;

/// `SOL_UDP` (the UDP protocol number).
pub const SOL_UDP: libc::c_int = 17;
/// Send: cut one buffer into datagrams of this size (Linux 4.18).
pub const UDP_SEGMENT: libc::c_int = 103;
/// Receive: coalesce datagrams of one flow into one buffer (Linux 5.0).
pub const UDP_GRO: libc::c_int = 104;
/// Most segments the kernel takes in one GSO send.
pub const MAX_GSO_SEGMENTS: usize = 64;
/// Most bytes of one GSO send (an IPv4 datagram's payload limit, with margin).
pub const MAX_GSO_BYTES: usize = 65_000;
/// Room for the receive control messages we ask for (one `UDP_GRO` int).
pub const RECV_CONTROL_BYTES: usize = 64;
/// Room for the send control message (one `UDP_SEGMENT` u16).
pub const SEND_CONTROL_BYTES: usize = 32;

/// Sets an integer socket option.
pub fn setsockopt_int(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: `value` is a live c_int and its exact size is passed; the kernel validates `fd`.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Sets a socket buffer size with the FORCE variant (which ignores the system maximum, and needs
/// CAP_NET_ADMIN) and falls back quietly to the plain one.
pub fn set_buffer(fd: RawFd, bytes: usize, receive: bool) {
    let value = bytes.min(i32::MAX as usize) as libc::c_int;
    let (force, plain) = if receive {
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF)
    } else {
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF)
    };
    if setsockopt_int(fd, libc::SOL_SOCKET, force, value).is_err() {
        let _ = setsockopt_int(fd, libc::SOL_SOCKET, plain, value);
    }
}

/// Turns GRO on for a receiving socket; false when the kernel does not offer it.
pub fn enable_gro(fd: RawFd) -> bool {
    setsockopt_int(fd, SOL_UDP, UDP_GRO, 1).is_ok()
}

/// Makes the kernel drop, before any copy or wake-up, datagrams that `own` sent: on loopback
/// every multicast comes back to the sender's own group socket, and a publisher would
/// otherwise pay a receive for each datagram it sends. A classic BPF socket filter compares
/// the source address (network header) and the UDP source port.
pub fn drop_own_datagrams(fd: RawFd, own: SocketAddrV4) -> io::Result<()> {
    const SKF_NET_OFF: i32 = -0x100000;
    let op = |code: u32, jt: u8, jf: u8, k: u32| libc::sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    };
    let (ld, ldh, jeq, ret) = (
        libc::BPF_LD | libc::BPF_W | libc::BPF_ABS,
        libc::BPF_LD | libc::BPF_H | libc::BPF_ABS,
        libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K,
        libc::BPF_RET | libc::BPF_K,
    );
    let mut program = [
        // Source address (offset 12 of the IPv4 header); not ours: accept.
        op(ld, 0, 0, (SKF_NET_OFF + 12) as u32),
        op(jeq, 0, 2, u32::from(*own.ip())),
        // UDP source port (offset 0 of the transport header); ours: drop.
        op(ldh, 0, 0, 0),
        op(jeq, 1, 0, u32::from(own.port())),
        op(ret, 0, 0, u32::MAX),
        op(ret, 0, 0, 0),
    ];
    let prog = libc::sock_fprog {
        len: program.len() as u16,
        filter: program.as_mut_ptr(),
    };
    // SAFETY: `prog` points to `program`, alive for the call; the kernel copies the program.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ATTACH_FILTER,
            (&prog as *const libc::sock_fprog).cast(),
            size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// An IPv4 socket address in the kernel's layout.
pub fn sockaddr_in(addr: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*addr.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

/// The IPv4 address in a received `sockaddr_in` (given as the bytes the kernel wrote).
pub fn parse_sockaddr_in(bytes: &[u8]) -> Option<SocketAddr> {
    if bytes.len() < 8 || u16::from_ne_bytes([bytes[0], bytes[1]]) != libc::AF_INET as u16 {
        return None;
    }
    let port = u16::from_be_bytes([bytes[2], bytes[3]]);
    let ip = Ipv4Addr::new(bytes[4], bytes[5], bytes[6], bytes[7]);
    Some(SocketAddr::V4(SocketAddrV4::new(ip, port)))
}

/// The bytes of a `sockaddr_in` as a received name, for [`parse_sockaddr_in`].
pub fn sockaddr_bytes(sa: &libc::sockaddr_in) -> [u8; 8] {
    let mut out = [0u8; 8];
    out[0..2].copy_from_slice(&sa.sin_family.to_ne_bytes());
    out[2..4].copy_from_slice(&sa.sin_port.to_ne_bytes());
    out[4..8].copy_from_slice(&sa.sin_addr.s_addr.to_ne_bytes());
    out
}

/// The segment size of a GRO receive, from its control messages; `None` when the datagram
/// was not coalesced. Reads the `cmsghdr` chain from plain bytes, so bad input cannot fault.
pub fn gro_segment(control: &[u8]) -> Option<usize> {
    const HDR: usize = size_of::<libc::cmsghdr>();
    const ALIGN: usize = size_of::<usize>();
    let mut at = 0;
    while at + HDR <= control.len() {
        let len = usize::from_ne_bytes(control[at..at + ALIGN].try_into().ok()?);
        let level = i32::from_ne_bytes(control[at + ALIGN..at + ALIGN + 4].try_into().ok()?);
        let kind = i32::from_ne_bytes(control[at + ALIGN + 4..at + ALIGN + 8].try_into().ok()?);
        if len < HDR || at + len > control.len() {
            return None;
        }
        if level == SOL_UDP && kind == UDP_GRO && len >= HDR + 4 {
            let v = i32::from_ne_bytes(control[at + HDR..at + HDR + 4].try_into().ok()?);
            return usize::try_from(v).ok().filter(|&v| v > 0);
        }
        at += len.next_multiple_of(ALIGN);
    }
    None
}

/// Writes a `UDP_SEGMENT` control message for `segment`-byte datagrams into `buf`; returns its
/// length (the `msg_controllen` to pass).
pub fn write_segment_cmsg(buf: &mut [u64; SEND_CONTROL_BYTES / 8], segment: u16) -> usize {
    // SAFETY: CMSG_SPACE/CMSG_LEN only compute sizes.
    let (space, len) = unsafe { (libc::CMSG_SPACE(2) as usize, libc::CMSG_LEN(2) as usize) };
    debug_assert!(space <= SEND_CONTROL_BYTES);
    let bytes: &mut [u8; SEND_CONTROL_BYTES] = zerocopy::transmute_mut!(buf);
    bytes.fill(0);
    const ALIGN: usize = size_of::<usize>();
    bytes[..ALIGN].copy_from_slice(&len.to_ne_bytes());
    bytes[ALIGN..ALIGN + 4].copy_from_slice(&SOL_UDP.to_ne_bytes());
    bytes[ALIGN + 4..ALIGN + 8].copy_from_slice(&UDP_SEGMENT.to_ne_bytes());
    let hdr = size_of::<libc::cmsghdr>();
    bytes[hdr..hdr + 2].copy_from_slice(&segment.to_ne_bytes());
    space
}

/// An eventfd that wakes a worker blocked in `poll` or io_uring.
#[derive(Debug)]
pub struct EventFd(std::os::fd::OwnedFd);

impl EventFd {
    /// A new non-blocking eventfd.
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain syscall; a non-negative result is a new fd that we own.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by eventfd and is owned by nobody else.
        Ok(Self(unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) }))
    }

    /// The descriptor.
    pub fn fd(&self) -> RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.0)
    }

    /// Adds one to the counter, waking a waiter.
    pub fn notify(&self) {
        let one: u64 = 1;
        // SAFETY: writes the 8 bytes of a live u64 to our eventfd. A full counter (EAGAIN)
        // still leaves it readable, which is all a wake needs.
        unsafe { libc::write(self.fd(), (&one as *const u64).cast(), 8) };
    }

    /// Resets the counter (after a wake was seen through `poll`); returns what it held (0 when
    /// nothing notified).
    pub fn drain(&self) -> u64 {
        let mut v: u64 = 0;
        // SAFETY: reads 8 bytes into a live u64; non-blocking, so EAGAIN (and `v` stays 0) when
        // already zero.
        unsafe { libc::read(self.fd(), (&mut v as *mut u64).cast(), 8) };
        v
    }
}

/// CPU time one thread has used since it started, in user space and in the kernel.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ThreadCpu {
    /// Nanoseconds in user space.
    pub user_ns: u64,
    /// Nanoseconds in the kernel (system calls, and the network stack's work done for them).
    pub system_ns: u64,
}

impl ThreadCpu {
    /// The calling thread's CPU time (`getrusage(RUSAGE_THREAD)`, microsecond resolution);
    /// zero if the kernel refuses.
    pub fn now() -> Self {
        // SAFETY: an all-zero `rusage` is a valid value of this plain C struct.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: getrusage writes one `rusage` into the live local it is given.
        if unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) } != 0 {
            return Self::default();
        }
        let ns =
            |t: libc::timeval| (t.tv_sec.max(0) as u64) * 1_000_000_000 + (t.tv_usec.max(0) as u64) * 1_000;
        Self {
            user_ns: ns(ru.ru_utime),
            system_ns: ns(ru.ru_stime),
        }
    }

    /// The time used since `earlier` (a reading of the same thread).
    pub fn since(self, earlier: Self) -> Self {
        Self {
            user_ns: self.user_ns.saturating_sub(earlier.user_ns),
            system_ns: self.system_ns.saturating_sub(earlier.system_ns),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gro_cmsg_parses_and_garbage_does_not() {
        let mut buf = [0u64; SEND_CONTROL_BYTES / 8];
        let n = write_segment_cmsg(&mut buf, 1200);
        let bytes: [u8; SEND_CONTROL_BYTES] = zerocopy::transmute!(buf);
        // A UDP_SEGMENT message is not a GRO one.
        assert_eq!(gro_segment(&bytes[..n]), None);
        let mut gro = bytes;
        gro[12..16].copy_from_slice(&UDP_GRO.to_ne_bytes());
        gro[16..20].copy_from_slice(&1200i32.to_ne_bytes());
        let len = size_of::<libc::cmsghdr>() + 4;
        gro[..8].copy_from_slice(&len.to_ne_bytes());
        assert_eq!(gro_segment(&gro[..n]), Some(1200));
        for cut in 0..n {
            let _ = gro_segment(&gro[..cut]);
        }
        let mut huge = gro;
        huge[..8].copy_from_slice(&usize::MAX.to_ne_bytes());
        assert_eq!(gro_segment(&huge), None);
        assert_eq!(gro_segment(&[0u8; 16]), None);
    }

    #[test]
    fn thread_cpu_counts_this_threads_work_and_only_its_own() {
        let start = ThreadCpu::now();
        // Work in user space until this thread's clock shows 10 ms (however busy the cores
        // are), or 10 s of wall time pass.
        let wall = std::time::Instant::now();
        let mut x = 1u64;
        let used = loop {
            for _ in 0..100_000 {
                x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
            }
            let used = ThreadCpu::now().since(start);
            if used.user_ns + used.system_ns >= 10_000_000 || wall.elapsed().as_secs() >= 10 {
                break used;
            }
        };
        assert!(used.user_ns + used.system_ns >= 10_000_000, "{used:?}");
        assert!(used.user_ns > used.system_ns, "a loop in user space: {used:?}");
        // Another thread's clock starts at its own birth: it did nothing yet.
        let other = std::thread::spawn(ThreadCpu::now).join().unwrap();
        assert!(other.user_ns + other.system_ns < 10_000_000, "{other:?}");
        assert_eq!(start.since(ThreadCpu::now()), ThreadCpu::default());
    }

    #[test]
    fn sockaddr_round_trip() {
        let a = SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 1), 40_123);
        let sa = sockaddr_in(a);
        assert_eq!(parse_sockaddr_in(&sockaddr_bytes(&sa)), Some(SocketAddr::V4(a)));
        assert_eq!(parse_sockaddr_in(&[0u8; 4]), None);
    }
}
