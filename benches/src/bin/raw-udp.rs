//! The raw UDP ceiling on this machine: datagrams with no protocol from one sender thread to one
//! receiver thread over loopback multicast (interface 127.0.0.1, TTL 0), for each send path
//! (plain `send`, `sendmmsg`, GSO via UDP_SEGMENT) and receive path (plain `recv`, GRO).
//!
//! Usage: raw-udp [SIZE] [SECONDS] [RUNS]   (defaults 1024, 2, 3). Prints the median of RUNS.

use socket2::{Domain, Protocol, Socket, Type};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const GROUP: Ipv4Addr = Ipv4Addr::new(239, 255, 77, 9);
const PORT: u16 = 40_999;
const BATCH: usize = 64;
const SOL_UDP: libc::c_int = 17;
const UDP_SEGMENT: libc::c_int = 103;
const UDP_GRO: libc::c_int = 104;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum SendPath {
    Plain,
    Mmsg,
    Gso,
}

fn setsockopt_int(fd: i32, level: libc::c_int, name: libc::c_int, value: libc::c_int) -> std::io::Result<()> {
    // SAFETY: `value` is a live c_int and its size is passed; `fd` is an open socket.
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
        Err(std::io::Error::last_os_error())
    }
}

fn receiver(gro: bool) -> Socket {
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).unwrap();
    s.set_reuse_address(true).unwrap();
    let _ = setsockopt_int(s.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, 32 << 20);
    s.bind(&SocketAddr::V4(SocketAddrV4::new(GROUP, PORT)).into())
        .unwrap();
    s.join_multicast_v4(&GROUP, &Ipv4Addr::LOCALHOST).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    if gro {
        setsockopt_int(s.as_raw_fd(), SOL_UDP, UDP_GRO, 1).expect("UDP_GRO");
    }
    s
}

fn sender() -> Socket {
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).unwrap();
    let _ = setsockopt_int(s.as_raw_fd(), libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, 32 << 20);
    s.set_multicast_if_v4(&Ipv4Addr::LOCALHOST).unwrap();
    s.set_multicast_ttl_v4(0).unwrap();
    s.set_multicast_loop_v4(true).unwrap();
    s.bind(&SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0)).into())
        .unwrap();
    s.connect(&SocketAddr::V4(SocketAddrV4::new(GROUP, PORT)).into())
        .unwrap();
    s
}

/// Datagrams sent and received per second in one run of `path` for `seconds`.
fn run(path: SendPath, gro: bool, size: usize, seconds: f64) -> (f64, f64) {
    let rx = receiver(gro);
    let tx = sender();
    let stop = Arc::new(AtomicBool::new(false));
    let received = Arc::new(AtomicU64::new(0));
    let counter = {
        let (stop, received) = (stop.clone(), received.clone());
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65_536];
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                // SAFETY: `buf` is a live buffer of its length; `rx` is an open socket.
                let len = unsafe { libc::recv(rx.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
                if len > 0 {
                    // With GRO one read may carry many equal-size datagrams.
                    n += (len as usize).div_ceil(size) as u64;
                }
            }
            received.store(n, Ordering::Relaxed);
        })
    };
    std::thread::sleep(Duration::from_millis(50));
    let fd = tx.as_raw_fd();
    let segments = (65_000 / size).clamp(1, BATCH);
    let payload = vec![0x5au8; size * segments.max(BATCH)];
    if path == SendPath::Gso {
        setsockopt_int(fd, SOL_UDP, UDP_SEGMENT, size as libc::c_int).expect("UDP_SEGMENT");
    }
    let mut iov: Vec<libc::iovec> = (0..BATCH)
        .map(|i| libc::iovec {
            iov_base: payload[i * size..].as_ptr() as *mut libc::c_void,
            iov_len: size,
        })
        .collect();
    let mut msgs: Vec<libc::mmsghdr> = iov
        .iter_mut()
        .map(|v| {
            // SAFETY: an all-zero mmsghdr is valid (no name, no control data).
            let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
            m.msg_hdr.msg_iov = v;
            m.msg_hdr.msg_iovlen = 1;
            m
        })
        .collect();
    let start = Instant::now();
    let mut sent = 0u64;
    while start.elapsed().as_secs_f64() < seconds {
        match path {
            SendPath::Plain => {
                // SAFETY: `payload` holds at least `size` bytes; `fd` is a connected socket.
                if unsafe { libc::send(fd, payload.as_ptr().cast(), size, 0) } > 0 {
                    sent += 1;
                }
            }
            SendPath::Mmsg => {
                // SAFETY: `msgs` holds BATCH headers whose iovecs point into `payload`, alive
                // for the call.
                let n = unsafe { libc::sendmmsg(fd, msgs.as_mut_ptr(), BATCH as u32, 0) };
                if n > 0 {
                    sent += n as u64;
                }
            }
            SendPath::Gso => {
                // SAFETY: `payload` holds `segments * size` bytes; the kernel cuts them into
                // `size`-byte datagrams (UDP_SEGMENT).
                if unsafe { libc::send(fd, payload.as_ptr().cast(), segments * size, 0) } > 0 {
                    sent += segments as u64;
                }
            }
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(100));
    stop.store(true, Ordering::Relaxed);
    counter.join().unwrap();
    (
        sent as f64 / elapsed,
        received.load(Ordering::Relaxed) as f64 / elapsed,
    )
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let size: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(1024);
    let seconds: f64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(2.0);
    let runs: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(3).max(1);
    println!("raw UDP over loopback multicast, {size}-byte datagrams, median of {runs} runs of {seconds} s");
    println!(
        "{:<22}{:>14}{:>14}{:>10}{:>10}",
        "path", "sent/s", "received/s", "MB/s", "lost"
    );
    for (path, gro, name) in [
        (SendPath::Plain, false, "send + recv"),
        (SendPath::Mmsg, false, "sendmmsg + recv"),
        (SendPath::Gso, false, "GSO + recv"),
        (SendPath::Gso, true, "GSO + GRO"),
    ] {
        let results: Vec<(f64, f64)> = (0..runs).map(|_| run(path, gro, size, seconds)).collect();
        let sent = median(results.iter().map(|r| r.0).collect());
        let received = median(results.iter().map(|r| r.1).collect());
        let lost = if sent > 0.0 { 1.0 - received / sent } else { 0.0 };
        println!(
            "{name:<22}{sent:>14.0}{received:>14.0}{:>10.0}{:>9.1}%",
            received * size as f64 / 1e6,
            lost.max(0.0) * 100.0
        );
    }
}
