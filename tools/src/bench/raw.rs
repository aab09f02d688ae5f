//! `intergroup bench raw-udp`: the ceiling. Datagrams with no protocol from this process to K
//! receiver processes over loopback multicast, for each send/receive path.

use super::{
    header, histogram, histogram_to_json, median, merge_json, mono_ns, percentiles, progress, record_since,
    say, stamp, stop_on_stdin_eof, tick, ChildProc, HostCpu, MIN_SIZE,
};
use clap::{Args, ValueEnum};
use hdrhistogram::Histogram;
use intergroup_engine::runtime::io::{Io, SendBatch};
use intergroup_engine::runtime::sys::{self, EventFd};
use intergroup_engine::runtime::{BackendKind, ThreadCpu};
use intergroup_engine::transport::{open_sockets, UdpConfig};
use serde_json::{json, Value};
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// A way of moving datagrams between sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RawPath {
    /// `send` and `recv`, one datagram per syscall.
    Plain,
    /// `sendmmsg` and `recvmmsg`, many datagrams per syscall.
    Sendmmsg,
    /// `sendmmsg` with UDP GSO, `recvmmsg` with UDP GRO.
    SendmmsgGsoGro,
    /// io_uring: batched submission, multishot receive into provided buffers.
    IoUring,
    /// io_uring with UDP GSO on send and GRO on receive.
    IoUringGsoGro,
}

impl RawPath {
    /// Every path, in report order.
    pub const ALL: [RawPath; 5] = [
        RawPath::Plain,
        RawPath::Sendmmsg,
        RawPath::SendmmsgGsoGro,
        RawPath::IoUring,
        RawPath::IoUringGsoGro,
    ];

    /// The path's name in reports.
    pub fn name(self) -> &'static str {
        match self {
            RawPath::Plain => "plain",
            RawPath::Sendmmsg => "sendmmsg",
            RawPath::SendmmsgGsoGro => "sendmmsg-gso-gro",
            RawPath::IoUring => "io-uring",
            RawPath::IoUringGsoGro => "io-uring-gso-gro",
        }
    }

    fn backend(self) -> Option<BackendKind> {
        match self {
            RawPath::Plain => None,
            RawPath::Sendmmsg | RawPath::SendmmsgGsoGro => Some(BackendKind::Portable),
            RawPath::IoUring | RawPath::IoUringGsoGro => Some(BackendKind::IoUring),
        }
    }

    fn offload(self) -> bool {
        matches!(self, RawPath::SendmmsgGsoGro | RawPath::IoUringGsoGro)
    }
}

/// Options of `intergroup bench raw-udp`.
#[derive(Debug, Args)]
pub struct RawArgs {
    /// Receiver processes.
    #[arg(long, default_value_t = 1)]
    subscribers: usize,
    /// Bytes per datagram (at least 16: sequence and send time).
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// Seconds per path.
    #[arg(long, default_value_t = 2.0)]
    duration: f64,
    /// Measure only these paths (default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    paths: Vec<RawPath>,
    /// Round-trip latency instead of throughput: one datagram out, one back, for the plain
    /// and the io-uring paths.
    #[arg(long)]
    pingpong: bool,
    /// Multicast port (default: one derived from the process id).
    #[arg(long)]
    port: Option<u16>,
    /// Pin the sending thread to this core (the receivers stay where the scheduler puts
    /// them), as `bench udp` places its publisher; by default nothing is pinned.
    #[arg(long)]
    sender_core: Option<usize>,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
}

/// What one path moved.
#[derive(Debug, Clone)]
pub struct PathResult {
    /// The path.
    pub path: RawPath,
    /// Datagrams the sender handed to the kernel per second.
    pub sent_per_sec: f64,
    /// Datagrams per second that arrived, per receiver (median over receivers).
    pub received_per_sec: f64,
    /// Latency from send to receive, merged over receivers.
    pub latency: Histogram<u64>,
    /// Seconds the sender ran.
    pub seconds: f64,
    /// CPU time of the sending thread while it sent.
    pub sender_cpu: ThreadCpu,
    /// Datagrams the sender handed to the kernel.
    pub sent: u64,
    /// Each receiver's CPU per datagram it received (see [`mean_per_message`]).
    pub receiver_cpu: Value,
    /// The host's steal and idle shares while the sender ran (see [`HostCpu::json`]).
    pub host_cpu: Value,
    /// The core the sending thread was pinned to, if any.
    pub sender_core: Option<usize>,
}

impl PathResult {
    /// The report's object for this path.
    pub fn to_json(&self, size: usize) -> Value {
        let mut v = json!({
            "path": self.path.name(),
            "sent_per_sec": self.sent_per_sec.round(),
            "msgs_per_sec": self.received_per_sec.round(),
            "mb_per_sec": (self.received_per_sec * size as f64 / 1e6 * 10.0).round() / 10.0,
            "lost": ((self.sent_per_sec - self.received_per_sec).max(0.0) * self.seconds).round(),
            "lost_share": self.lost_share(),
            "cpu_ns_per_msg": {
                "sender": per_message(self.sender_cpu, self.sent),
                "receiver": self.receiver_cpu,
            },
            "host_cpu": self.host_cpu,
            "sender_core": self.sender_core,
        });
        merge_objects(&mut v, percentiles(&self.latency));
        v
    }

    /// Share of sent datagrams that a receiver did not get (raw UDP does not repair).
    pub fn lost_share(&self) -> f64 {
        if self.sent_per_sec > 0.0 {
            ((1.0 - self.received_per_sec / self.sent_per_sec).max(0.0) * 1000.0).round() / 1000.0
        } else {
            0.0
        }
    }
}

/// Copies the fields of `extra` into `v`.
/// CPU time per message, user and system, in whole nanoseconds (null without messages).
pub fn per_message(cpu: ThreadCpu, messages: u64) -> Value {
    if messages == 0 {
        return json!({ "user": null, "system": null });
    }
    json!({
        "user": (cpu.user_ns as f64 / messages as f64).round(),
        "system": (cpu.system_ns as f64 / messages as f64).round(),
    })
}

/// The mean, field by field, of the `cpu_ns_per_msg` objects of child reports (receivers,
/// subscribers), each made by [`per_message`]; null where no report has the field.
pub fn mean_per_message<'a>(reports: impl IntoIterator<Item = &'a Value> + Clone) -> Value {
    let mean = |field: &str| {
        let v: Vec<f64> = reports
            .clone()
            .into_iter()
            .filter_map(|r| r["cpu_ns_per_msg"][field].as_f64())
            .collect();
        (!v.is_empty()).then(|| (v.iter().sum::<f64>() / v.len() as f64).round())
    };
    json!({ "user": mean("user"), "system": mean("system") })
}

pub fn merge_objects(v: &mut Value, extra: Value) {
    if let (Some(a), Value::Object(b)) = (v.as_object_mut(), extra) {
        a.extend(b);
    }
}

fn group(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::new(239, 255, 77, 9), port)
}

/// A socket that only sends (interface 127.0.0.1, TTL 0, loopback on).
fn sender_socket(to: SocketAddrV4) -> Result<UdpSocket, String> {
    let cfg = UdpConfig {
        peers: vec![to.into()],
        socket_buffer_bytes: 32 << 20,
        ..UdpConfig::default()
    };
    let (_, s) = open_sockets(&cfg).map_err(|e| format!("sender socket: {e}"))?;
    Ok(s)
}

/// A socket bound to the group `at`, joined on 127.0.0.1.
fn receiver_socket(at: SocketAddrV4, gro: bool) -> Result<UdpSocket, String> {
    let cfg = UdpConfig {
        group: at,
        socket_buffer_bytes: 32 << 20,
        ..UdpConfig::default()
    };
    let (g, _) = open_sockets(&cfg).map_err(|e| format!("receiver socket: {e}"))?;
    let g = g.ok_or("no group socket")?;
    if gro && !sys::enable_gro(g.as_raw_fd()) {
        return Err("this kernel refuses UDP_GRO".into());
    }
    Ok(g)
}

/// Runs `path` for `seconds`: K receiver processes count what one sender moves.
pub fn measure(
    path: RawPath,
    size: usize,
    k: usize,
    seconds: f64,
    port: u16,
    json: bool,
    sender_core: Option<usize>,
) -> Result<PathResult, String> {
    let mut children = Vec::with_capacity(k);
    for _ in 0..k {
        children.push(ChildProc::spawn(&[
            "raw-rx".into(),
            "--path".into(),
            path.to_possible_value().expect("named").get_name().into(),
            "--port".into(),
            port.to_string(),
            "--size".into(),
            size.to_string(),
        ])?);
    }
    let to = group(port);
    let socket = sender_socket(to)?;
    let bar = progress(path.name(), seconds, json);
    // The receivers are spawned above, so a pinned sender does not pin them.
    let (sent, elapsed, sender_cpu, host_cpu) = super::on_core(sender_core, || {
        let host_start = HostCpu::now();
        let cpu_start = ThreadCpu::now();
        let start = Instant::now();
        let sent = match path.backend() {
            None => send_plain(&socket, to, size, seconds, &bar)?,
            Some(kind) => send_batched(&socket, kind, path.offload(), to, size, seconds, &bar)?,
        };
        let elapsed = start.elapsed().as_secs_f64();
        let sender_cpu = ThreadCpu::now().since(cpu_start);
        Ok::<_, String>((
            sent,
            elapsed,
            sender_cpu,
            HostCpu::json(host_start, HostCpu::now()),
        ))
    })??;
    bar.finish_and_clear();
    std::thread::sleep(Duration::from_millis(200));
    let mut latency = histogram();
    let mut rates = Vec::new();
    let mut reports = Vec::with_capacity(children.len());
    for c in children {
        let r = c.finish()?;
        rates.push(r["received"].as_f64().unwrap_or(0.0) / elapsed);
        merge_json(&mut latency, &r["hist"]);
        reports.push(r);
    }
    Ok(PathResult {
        path,
        sent_per_sec: sent as f64 / elapsed,
        received_per_sec: median(rates),
        latency,
        seconds: elapsed,
        sender_cpu,
        sent,
        receiver_cpu: mean_per_message(&reports),
        host_cpu,
        sender_core,
    })
}

fn send_plain(
    socket: &UdpSocket,
    to: SocketAddrV4,
    size: usize,
    seconds: f64,
    bar: &indicatif::ProgressBar,
) -> Result<u64, String> {
    let mut buf = vec![0x5a_u8; size];
    let start = Instant::now();
    let mut seq = 0u64;
    while start.elapsed().as_secs_f64() < seconds {
        for _ in 0..256 {
            stamp(&mut buf, seq);
            if socket.send_to(&buf, to).is_ok() {
                seq += 1;
            }
        }
        tick(bar, start);
    }
    Ok(seq)
}

fn send_batched(
    socket: &UdpSocket,
    kind: BackendKind,
    gso: bool,
    to: SocketAddrV4,
    size: usize,
    seconds: f64,
    bar: &indicatif::ProgressBar,
) -> Result<u64, String> {
    let wake = EventFd::new().map_err(|e| e.to_string())?;
    let mut io = Io::open(kind, wake.fd()).map_err(|e| format!("{kind} backend: {e}"))?;
    const DATAGRAMS: usize = 256;
    let per_send = if gso {
        (sys::MAX_GSO_BYTES / size).clamp(1, sys::MAX_GSO_SEGMENTS)
    } else {
        1
    };
    let mut batch = SendBatch::with_capacity(DATAGRAMS * size);
    batch.arena.fill(0x5a);
    let dest = sys::sockaddr_in(to);
    let mut at = 0;
    while at < DATAGRAMS {
        let n = per_send.min(DATAGRAMS - at);
        let segment = if n > 1 { size as u16 } else { 0 };
        batch.push_arena_send(socket.as_raw_fd(), dest, at * size, n * size, segment);
        at += n;
    }
    batch.used = DATAGRAMS * size;
    let start = Instant::now();
    let mut seq = 0u64;
    let mut sent = 0u64;
    while start.elapsed().as_secs_f64() < seconds {
        for d in 0..DATAGRAMS {
            stamp(&mut batch.arena[d * size..(d + 1) * size], seq);
            seq += 1;
        }
        let out = io.send(&batch);
        if out.gso_refused {
            return Err("the kernel refused a UDP GSO send".into());
        }
        sent += out.datagrams;
        tick(bar, start);
    }
    Ok(sent)
}

/// Options of the raw receiver child.
#[derive(Debug, Args)]
pub struct RawRxArgs {
    #[arg(long, value_enum)]
    path: RawPath,
    #[arg(long)]
    port: u16,
    #[arg(long)]
    size: usize,
}

/// The raw receiver child: counts datagrams and their latency until stdin closes.
pub fn rx(a: RawRxArgs) -> Result<ExitCode, String> {
    let socket = receiver_socket(group(a.port), a.path.offload())?;
    let stop = stop_on_stdin_eof();
    let mut hist = histogram();
    let mut received = 0u64;
    let size = a.size.max(1);
    // From here to the report: receiving, and waiting (asleep) before and after the traffic.
    let cpu_start = ThreadCpu::now();
    let mut count = |bytes: &[u8], segment: Option<usize>| {
        let now = mono_ns();
        for d in bytes.chunks(segment.unwrap_or(size).max(1)) {
            received += 1;
            if let Some((_, ts)) = header(d) {
                record_since(&mut hist, ts, now);
            }
        }
    };
    match a.path.backend() {
        None => {
            socket
                .set_read_timeout(Some(Duration::from_millis(50)))
                .map_err(|e| e.to_string())?;
            let mut buf = vec![0u8; 65_536];
            say("ready");
            while !stop.load(Ordering::Relaxed) {
                if let Ok(n) = socket.recv(&mut buf) {
                    count(&buf[..n], None);
                }
            }
        }
        Some(kind) => {
            let wake = EventFd::new().map_err(|e| e.to_string())?;
            let mut io = Io::open(kind, wake.fd()).map_err(|e| format!("{kind} backend: {e}"))?;
            io.add_socket(socket.as_raw_fd(), 0).map_err(|e| e.to_string())?;
            say("ready");
            while !stop.load(Ordering::Relaxed) {
                let n = io
                    .receive(|r| count(r.bytes(), r.segment))
                    .map_err(|e| e.to_string())?;
                if n == 0 {
                    io.wait(Duration::from_millis(50)).map_err(|e| e.to_string())?;
                }
            }
        }
    }
    let cpu = ThreadCpu::now().since(cpu_start);
    say(&json!({
        "received": received,
        "hist": histogram_to_json(&hist),
        "cpu_ns_per_msg": per_message(cpu, received),
    })
    .to_string());
    Ok(ExitCode::SUCCESS)
}

/// Options of the raw echo child.
#[derive(Debug, Args)]
pub struct RawPongArgs {
    #[arg(long, value_enum)]
    path: RawPath,
    /// Port it listens on.
    #[arg(long)]
    port_in: u16,
    /// Port it answers to.
    #[arg(long)]
    port_out: u16,
    /// Spin (non-blocking receives and yields) instead of blocking.
    #[arg(long)]
    spin: bool,
}

/// One side of a ping-pong on `path`: receives into `buf`, sends `bytes` to a group.
struct PingPongIo {
    /// Poll with non-blocking receives and yields instead of sleeping in the kernel.
    spin: bool,
    rx: UdpSocket,
    tx: UdpSocket,
    to: SocketAddrV4,
    io: Option<(Io, EventFd)>,
    batch: SendBatch,
}

impl PingPongIo {
    fn new(path: RawPath, spin: bool, listen: u16, answer: u16) -> Result<Self, String> {
        let rx = receiver_socket(group(listen), false)?;
        let to = group(answer);
        let tx = sender_socket(to)?;
        let io = match path.backend() {
            None => {
                rx.set_read_timeout(Some(Duration::from_millis(50)))
                    .map_err(|e| e.to_string())?;
                None
            }
            Some(kind) => {
                let wake = EventFd::new().map_err(|e| e.to_string())?;
                let mut io = Io::open(kind, wake.fd()).map_err(|e| e.to_string())?;
                io.add_socket(rx.as_raw_fd(), 0).map_err(|e| e.to_string())?;
                Some((io, wake))
            }
        };
        if spin {
            rx.set_nonblocking(true).map_err(|e| e.to_string())?;
        }
        Ok(Self {
            spin,
            rx,
            tx,
            to,
            io,
            batch: SendBatch::with_capacity(65_536),
        })
    }

    fn send(&mut self, bytes: &[u8]) {
        match self.io.as_mut() {
            None => {
                let _ = self.tx.send_to(bytes, self.to);
            }
            Some((io, _)) => {
                self.batch.clear();
                self.batch.arena[..bytes.len()].copy_from_slice(bytes);
                self.batch.used = bytes.len();
                let fd = self.tx.as_raw_fd();
                self.batch
                    .push_arena_send(fd, sys::sockaddr_in(self.to), 0, bytes.len(), 0);
                io.send(&self.batch);
            }
        }
    }

    /// Waits up to ~50 ms for one datagram and hands it to `f`.
    fn recv(&mut self, buf: &mut [u8]) -> Option<usize> {
        match self.io.as_mut() {
            None if self.spin => {
                let deadline = Instant::now() + Duration::from_millis(50);
                while Instant::now() < deadline {
                    if let Ok(n) = self.rx.recv(buf) {
                        return Some(n);
                    }
                    std::thread::yield_now();
                }
                None
            }
            None => self.rx.recv(buf).ok(),
            Some((io, _)) => {
                let mut got = None;
                for _ in 0..2 {
                    let _ = io.receive(|r| {
                        let n = r.bytes().len().min(buf.len());
                        buf[..n].copy_from_slice(&r.bytes()[..n]);
                        got = Some(n);
                    });
                    if got.is_some() {
                        break;
                    }
                    let _ = io.wait(Duration::from_millis(50));
                }
                got
            }
        }
    }
}

/// The raw echo child.
pub fn pong(a: RawPongArgs) -> Result<ExitCode, String> {
    let mut p = PingPongIo::new(a.path, a.spin, a.port_in, a.port_out)?;
    let stop = stop_on_stdin_eof();
    let mut buf = vec![0u8; 65_536];
    say("ready");
    let mut echoed = 0u64;
    while !stop.load(Ordering::Relaxed) {
        if let Some(n) = p.recv(&mut buf) {
            p.send(&buf[..n]);
            echoed += 1;
        }
    }
    say(&json!({ "echoed": echoed }).to_string());
    Ok(ExitCode::SUCCESS)
}

/// The raw ping-pong variants: blocking plain sockets, spinning plain sockets, io_uring.
pub const PINGPONG_PATHS: [(RawPath, bool); 3] = [
    (RawPath::Plain, false),
    (RawPath::Plain, true),
    (RawPath::IoUring, false),
];

/// A ping-pong variant's name in reports.
pub fn pingpong_name(path: RawPath, spin: bool) -> String {
    format!("{}{}", path.name(), if spin { " spin" } else { "" })
}

/// Round trips on `path` for `seconds`: the round-trip times, and round trips per second.
pub fn pingpong(
    path: RawPath,
    spin: bool,
    size: usize,
    seconds: f64,
    port: u16,
) -> Result<(Histogram<u64>, f64), String> {
    let mut args = vec![
        "raw-pong".to_string(),
        "--path".into(),
        path.to_possible_value().expect("named").get_name().into(),
        "--port-in".into(),
        port.to_string(),
        "--port-out".into(),
        (port + 1).to_string(),
    ];
    if spin {
        args.push("--spin".into());
    }
    let child = ChildProc::spawn(&args)?;
    let mut p = PingPongIo::new(path, spin, port + 1, port)?;
    let mut out = vec![0x5a_u8; size];
    let mut buf = vec![0u8; 65_536];
    let mut hist = histogram();
    let start = Instant::now();
    let mut seq = 0u64;
    while start.elapsed().as_secs_f64() < seconds {
        stamp(&mut out, seq);
        p.send(&out);
        // Wait for this sequence's echo; a lost one is given up after the receive timeout.
        let deadline = Instant::now() + Duration::from_millis(200);
        while Instant::now() < deadline {
            if let Some(n) = p.recv(&mut buf) {
                if let Some((s, ts)) = header(&buf[..n]) {
                    if s == seq {
                        record_since(&mut hist, ts, mono_ns());
                        break;
                    }
                }
            }
        }
        seq += 1;
    }
    let elapsed = start.elapsed().as_secs_f64();
    child.finish()?;
    let rate = hist.len() as f64 / elapsed;
    Ok((hist, rate))
}

/// `intergroup bench raw-udp`.
pub fn run(a: RawArgs) -> Result<ExitCode, String> {
    if a.size < MIN_SIZE || a.size > 65_000 {
        return Err(format!("--size {} must be in {MIN_SIZE}..=65000", a.size));
    }
    if a.subscribers == 0 {
        return Err("--subscribers must be at least 1".into());
    }
    let port = a.port.unwrap_or_else(super::default_port);
    if a.pingpong {
        let mut rows = Vec::new();
        for (path, spin) in PINGPONG_PATHS {
            let (h, rate) = pingpong(path, spin, a.size, a.duration, port)?;
            let mut v = json!({ "path": pingpong_name(path, spin), "msgs_per_sec": rate.round(), "round_trip": true });
            merge_objects(&mut v, percentiles(&h));
            rows.push(v);
        }
        let report = json!({ "mode": "raw-udp", "pingpong": true, "size": a.size, "paths": rows });
        print_report(
            &report,
            a.json,
            "raw UDP ping-pong (round-trip times, microseconds)",
        );
        return Ok(ExitCode::SUCCESS);
    }
    let paths = if a.paths.is_empty() {
        RawPath::ALL.to_vec()
    } else {
        a.paths.clone()
    };
    let sender_core = super::check_core(a.sender_core)?;
    let results = measure_all(
        &paths,
        a.size,
        a.subscribers,
        a.duration,
        port,
        a.json,
        sender_core,
    )?;
    let best = best(&results).ok_or("no path measured")?;
    let mut report = best.to_json(a.size);
    merge_objects(
        &mut report,
        json!({
            "mode": "raw-udp",
            "size": a.size,
            "subscribers": a.subscribers,
            "duration": a.duration,
            "retransmissions": 0,
            "ceiling": best.path.name(),
            "paths": results.iter().map(|r| r.to_json(a.size)).collect::<Vec<_>>(),
        }),
    );
    print_report(
        &report,
        a.json,
        &format!(
            "raw UDP, loopback multicast, {} B datagrams, 1 sender -> {} receiver process(es), {} s per path",
            a.size, a.subscribers, a.duration
        ),
    );
    Ok(ExitCode::SUCCESS)
}

/// Measures each of `paths`.
pub fn measure_all(
    paths: &[RawPath],
    size: usize,
    k: usize,
    seconds: f64,
    port: u16,
    json: bool,
    sender_core: Option<usize>,
) -> Result<Vec<PathResult>, String> {
    paths
        .iter()
        .map(|&p| measure(p, size, k, seconds, port, json, sender_core))
        .collect()
}

/// The path that delivered the most per receiver.
pub fn best(results: &[PathResult]) -> Option<&PathResult> {
    results
        .iter()
        .max_by(|a, b| a.received_per_sec.total_cmp(&b.received_per_sec))
}

/// Prints `report` as JSON, or as a table of its `paths` and its main figures.
/// `user+system` of a `{user, system}` object of the report, `-` where it is missing.
pub fn cpu_pair(v: &Value) -> String {
    match (v["user"].as_f64(), v["system"].as_f64()) {
        (Some(u), Some(s)) => format!("{u:.0}+{s:.0}"),
        _ => "-".into(),
    }
}

pub fn print_report(report: &Value, json: bool, title: &str) {
    if json {
        println!("{report}");
        return;
    }
    println!("{title}");
    if let Some(paths) = report["paths"].as_array() {
        println!(
            "{:<20}{:>13}{:>13}{:>10}{:>8}{:>10}{:>10}{:>10}{:>24}",
            "path",
            "sent/s",
            "received/s",
            "MB/s",
            "lost",
            "p50 us",
            "p99 us",
            "max us",
            "CPU ns/msg tx | rx"
        );
        for p in paths {
            println!(
                "{:<20}{:>13}{:>13.0}{:>10}{:>7.1}%{:>10.1}{:>10.1}{:>10.1}{:>24}",
                p["path"].as_str().unwrap_or(""),
                p["sent_per_sec"]
                    .as_f64()
                    .map_or("-".into(), |v| format!("{v:.0}")),
                p["msgs_per_sec"].as_f64().unwrap_or(0.0),
                p["mb_per_sec"].as_f64().map_or("-".into(), |v| format!("{v:.0}")),
                p["lost_share"].as_f64().unwrap_or(0.0) * 100.0,
                p["p50"].as_f64().unwrap_or(0.0),
                p["p99"].as_f64().unwrap_or(0.0),
                p["max"].as_f64().unwrap_or(0.0),
                format!(
                    "{} | {}",
                    cpu_pair(&p["cpu_ns_per_msg"]["sender"]),
                    cpu_pair(&p["cpu_ns_per_msg"]["receiver"])
                ),
            );
        }
    }
    if let Some(c) = report["ceiling"].as_str() {
        println!("ceiling: {c}");
    }
}
