//! `intergroup bench udp`: an embedded publisher engine -> K subscriber engines, reliable FIFO
//! over loopback multicast, against the raw ceiling of the same size and K.

use super::raw::{self, merge_objects, print_report, RawPath};
use super::{
    header, histogram, histogram_to_json, median, merge_json, mono_ns, percentiles, progress, record_since,
    say, stop_on_stdin_eof, tick, ChildProc, HostCpu, MIN_SIZE,
};
use clap::Args;
use hdrhistogram::Histogram;
use intergroup_engine::runtime::{
    BackendKind, Engine, EngineConfig, GroupConfig, OfferError, Publication, ThreadCpu,
};
use intergroup_engine::shield::{Rejection, ShieldEpoch, ShieldStats};
use intergroup_engine::{Counter, Event, MemberConfig, Output};
use intergroup_secure::aead::TAG_LEN;
use intergroup_secure::EpochSecret;
use serde_json::{json, Value};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const GROUP: u32 = 77;
const DATA_STREAM: u32 = 1;
const ECHO_STREAM: u32 = 2;
/// The sequence of the last message of a run; its time field carries the published count.
const END: u64 = u64::MAX;

/// Options of `intergroup bench udp`.
#[derive(Debug, Args)]
pub struct UdpArgs {
    /// Subscriber engines.
    #[arg(long, default_value_t = 1)]
    subscribers: usize,
    /// Bytes per message (at least 16: sequence and send time).
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// Seconds of publishing.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Drop this share of received datagrams at each subscriber (seeded), to measure recovery.
    #[arg(long, default_value_t = 0.0)]
    loss: f64,
    /// Seed of the loss and of the NAK back-off.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Round-trip latency instead of throughput: one message out, its echo back.
    #[arg(long)]
    pingpong: bool,
    /// Workers spin instead of sleeping (lower latency, a core each at 100%).
    #[arg(long)]
    busy_poll: bool,
    /// The publisher runs its engine on its own thread (invoker mode) instead of a worker
    /// thread: offer and send on one core. With `--pingpong`, both ends do (the echo engine on
    /// its main thread), so a round trip crosses no thread inside either process.
    #[arg(long)]
    invoker: bool,
    /// Bytes of the publication's ring (a power of two); a deeper ring queues more and so
    /// adds latency under saturation. The engine's default.
    #[arg(long, default_value_t = EngineConfig::default().publication_ring_bytes)]
    ring_bytes: u64,
    /// How far the publisher may run ahead of its worker, in bytes of the ring; 0 for no bound
    /// but the ring. The engine's default (`publication_window_bytes`).
    #[arg(long, default_value_t = EngineConfig::default().publication_window_bytes)]
    publication_window: u64,
    /// I/O backend of every engine.
    #[arg(long, default_value = "auto", value_parser = parse_backend)]
    backend: BackendKind,
    /// Run each subscriber engine in its own process (true) or as threads of this one.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    processes: bool,
    /// Seconds per raw path of the ceiling measured first (and of the best path measured again
    /// after the engine; the ceiling is the higher of its two rates).
    #[arg(long, default_value_t = 2.0)]
    raw_duration: f64,
    /// Window of the engines, in frames: how far a sender may run past the highest sequence a
    /// receiver has (receivers hold two windows out of order, the sender keeps four for repair).
    #[arg(long, default_value_t = 4096)]
    window: u32,
    /// Largest datagram of the engines, bytes.
    #[arg(long, default_value_t = 1472)]
    mtu: usize,
    /// Multicast port (default: one derived from the process id).
    #[arg(long)]
    port: Option<u16>,
    /// The core of the publishing side: the thread that offers and its engine's worker share
    /// it, so the hand-off through the publication ring stays in one core's caches and a
    /// publisher waiting for room yields to its own worker. Default: the first core this
    /// process may use, when it may use two or more. The subscribers are not pinned. The
    /// ceiling then also includes the best raw path with its sender pinned to the same core.
    /// Throughput runs only: `--pingpong` pins nothing.
    #[arg(long)]
    publisher_core: Option<usize>,
    /// Pin nothing: every thread goes where the scheduler puts it.
    #[arg(long, conflicts_with = "publisher_core")]
    no_pin: bool,
    #[command(flatten)]
    recovery: Recovery,
    /// Seal every datagram (AES-256-GCM, the Secure Group Layer's data plane) under a fresh
    /// random epoch secret, after a plaintext run and an AEAD-only measurement of the same size
    /// in the same invocation: adds `ratio_to_plain` and `ratio_to_aead`.
    #[arg(long)]
    secure: bool,
    /// Seconds of the AEAD-only measurement of `--secure`.
    #[arg(long, default_value_t = 1.0)]
    aead_duration: f64,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
}

impl UdpArgs {
    /// The core the publishing side runs on, if any (see `--publisher-core`).
    fn publisher_core(&self) -> Result<Option<usize>, String> {
        if self.no_pin {
            return Ok(None);
        }
        super::check_core(self.publisher_core.or_else(super::default_publisher_core))
    }

    fn tuning(&self) -> Tuning {
        Tuning {
            mtu: self.mtu,
            window: self.window,
            recovery: self.recovery,
            secure: None,
        }
    }
}

/// Loss-recovery timings of every engine of the run; each left out keeps the engine's default
/// (`MemberConfig`).
#[derive(Debug, Clone, Copy, Default, Args)]
pub struct Recovery {
    /// Upper bound of a receiver's random delay before it NAKs a gap, in microseconds.
    #[arg(long)]
    nak_backoff_us: Option<u64>,
    /// Wait before the same gap is NAKed again, in microseconds.
    #[arg(long)]
    nak_retry_us: Option<u64>,
    /// A sender retransmits a sequence at most once per this many microseconds.
    #[arg(long)]
    retransmit_linger_us: Option<u64>,
}

impl Recovery {
    fn apply(self, m: &mut MemberConfig) {
        let us = |v: Option<u64>, default: u64| v.map_or(default, |v| v.saturating_mul(1_000));
        m.nak_max_backoff_ns = us(self.nak_backoff_us, m.nak_max_backoff_ns);
        m.nak_retry_ns = us(self.nak_retry_us, m.nak_retry_ns);
        m.retransmit_linger_ns = us(self.retransmit_linger_us, m.retransmit_linger_ns);
    }

    /// The flags that set the same timings in a subscriber child.
    fn args(self) -> Vec<String> {
        [
            ("--nak-backoff-us", self.nak_backoff_us),
            ("--nak-retry-us", self.nak_retry_us),
            ("--retransmit-linger-us", self.retransmit_linger_us),
        ]
        .into_iter()
        .filter_map(|(flag, v)| v.map(|v| [flag.to_string(), v.to_string()]))
        .flatten()
        .collect()
    }
}

pub fn parse_backend(s: &str) -> Result<BackendKind, String> {
    match s {
        "auto" => Ok(BackendKind::Auto),
        "io-uring" | "io_uring" | "uring" => Ok(BackendKind::IoUring),
        "portable" => Ok(BackendKind::Portable),
        _ => Err(format!("{s:?}: expected auto, io-uring or portable")),
    }
}

fn engine_config(backend: BackendKind, busy_poll: bool) -> EngineConfig {
    EngineConfig {
        backend,
        busy_poll,
        ..EngineConfig::default()
    }
}

/// Protocol settings the bench lets one change.
#[derive(Debug, Clone, Copy)]
struct Tuning {
    mtu: usize,
    window: u32,
    recovery: Recovery,
    secure: Option<BenchSecret>,
}

/// The run's throwaway epoch secret and who is in the group: the publisher (member 1) may
/// publish, the subscribers (members 2..) may not, so every role check runs as in production.
#[derive(Clone, Copy)]
struct BenchSecret {
    secret: [u8; 32],
    subscribers: usize,
}

impl std::fmt::Debug for BenchSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BenchSecret(.., subscribers: {})", self.subscribers)
    }
}

/// Environment variable that hands the secret to subscriber processes (not their command
/// line, which other users can read).
const SECRET_ENV: &str = "INTERGROUP_BENCH_EPOCH_SECRET";

impl BenchSecret {
    fn random(subscribers: usize) -> Result<Self, String> {
        let mut secret = [0u8; 32];
        getrandom::fill(&mut secret).map_err(|e| format!("random secret: {e}"))?;
        Ok(Self { secret, subscribers })
    }

    fn from_env(subscribers: usize) -> Result<Option<Self>, String> {
        let Ok(hex_secret) = std::env::var(SECRET_ENV) else {
            return Ok(None);
        };
        let mut secret = [0u8; 32];
        hex::decode_to_slice(hex_secret.trim(), &mut secret)
            .map_err(|_| format!("{SECRET_ENV} must hold 64 hex digits"))?;
        Ok(Some(Self { secret, subscribers }))
    }

    fn epoch(&self) -> ShieldEpoch {
        let mut members = vec![(1, true)];
        members.extend((0..self.subscribers).map(|i| (i as u32 + 2, false)));
        ShieldEpoch {
            epoch: 1,
            secret: EpochSecret::from_bytes(self.secret),
            members,
        }
    }
}

fn group_config(member_id: u32, port: u16, t: Tuning, loss: f64, seed: u64) -> GroupConfig {
    let mut g = GroupConfig::new(MemberConfig {
        group: GROUP,
        member_id,
        mtu: t.mtu,
        window_frames: t.window,
        retransmit_frames: (t.window * 4).next_power_of_two(),
        ..MemberConfig::default()
    });
    t.recovery.apply(&mut g.member);
    g.udp.group.set_port(port);
    g.receive_loss = loss;
    g.loss_seed = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ u64::from(member_id);
    g.seed = seed ^ u64::from(member_id);
    g.secure = t.secure.map(|s| s.epoch());
    g
}

/// What a subscriber counts.
struct SubState {
    expected: u64,
    received: u64,
    bytes: u64,
    duplicates: u64,
    gaps: u64,
    loss_events: u64,
    first_ns: u64,
    hist: Histogram<u64>,
    /// The clock as last read, and messages handled since.
    now_ns: u64,
    clock_age: u32,
    /// The CPU time of the thread that runs the handler (the subscriber's worker) at the first
    /// message.
    cpu_start: ThreadCpu,
}

impl SubState {
    fn new() -> Self {
        Self {
            expected: 0,
            received: 0,
            bytes: 0,
            duplicates: 0,
            gaps: 0,
            loss_events: 0,
            first_ns: 0,
            hist: histogram(),
            now_ns: 0,
            clock_age: 0,
            cpu_start: ThreadCpu::default(),
        }
    }

    /// Takes one output; returns the published count when it was the end of the run.
    fn on(&mut self, out: &Output<'_>) -> Option<u64> {
        match out {
            Output::Message(m) if m.stream == DATA_STREAM => {
                let (seq, ts) = header(m.payload)?;
                if seq == END {
                    return Some(ts);
                }
                // One clock read per 16 messages, as the raw receivers read it once per receive
                // buffer: the clock would otherwise cost as much as the rest of the handler.
                if self.clock_age == 0 {
                    self.now_ns = mono_ns();
                }
                self.clock_age = (self.clock_age + 1) % 16;
                let now = self.now_ns.max(ts);
                if self.received == 0 {
                    self.first_ns = now;
                    self.cpu_start = ThreadCpu::now();
                }
                if seq < self.expected {
                    self.duplicates += 1;
                    return None;
                }
                self.gaps += seq - self.expected;
                self.expected = seq + 1;
                self.received += 1;
                self.bytes += m.payload.len() as u64;
                record_since(&mut self.hist, ts, now);
                None
            }
            Output::Event(Event::UnrecoverableLoss { count, .. }) => {
                self.loss_events += count;
                None
            }
            _ => None,
        }
    }

    /// The report at the end of the run; called on the handler's thread, whose CPU time from
    /// the first message on it includes.
    fn report(&self, published: Option<u64>, end_ns: u64) -> Value {
        let elapsed = end_ns.saturating_sub(self.first_ns) as f64 / 1e9;
        let cpu = ThreadCpu::now().since(self.cpu_start);
        json!({
            "cpu_ns_per_msg": raw::per_message(cpu, self.received),
            "complete": published.is_some(),
            "published": published,
            "received": self.received,
            "bytes": self.bytes,
            "elapsed_s": elapsed,
            "duplicates": self.duplicates,
            "gaps": self.gaps,
            "loss_events": self.loss_events,
            "hist": histogram_to_json(&self.hist),
        })
    }
}

/// A subscriber engine: its handler sends one report when the run's end arrives.
struct Subscriber {
    engine: Engine,
    report: crossbeam_channel::Receiver<Value>,
    received: Arc<AtomicU64>,
}

fn start_subscriber(
    member_id: u32,
    port: u16,
    tuning: Tuning,
    loss: f64,
    seed: u64,
    backend: BackendKind,
    busy: bool,
) -> Result<Subscriber, String> {
    let engine = Engine::launch(engine_config(backend, busy)).map_err(|e| e.to_string())?;
    engine
        .join(group_config(member_id, port, tuning, loss, seed))
        .map_err(|e| e.to_string())?;
    let (tx, rx) = crossbeam_channel::bounded(1);
    let received = Arc::new(AtomicU64::new(0));
    let counter = received.clone();
    let mut state = SubState::new();
    engine
        .subscribe(GROUP, move |out: &Output<'_>| {
            if let Some(published) = state.on(out) {
                let _ = tx.try_send(state.report(Some(published), mono_ns()));
            }
            counter.store(state.received, Ordering::Relaxed);
        })
        .map_err(|e| e.to_string())?;
    Ok(Subscriber {
        engine,
        report: rx,
        received,
    })
}

impl Subscriber {
    /// The report of the run, or what was counted when `stop` came first.
    fn wait_report(&self, stop: &AtomicBool, limit: Duration) -> Value {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(v) = self.report.recv_timeout(Duration::from_millis(50)) {
                return v;
            }
            if stop.load(Ordering::Relaxed) || Instant::now() >= deadline {
                return json!({
                    "complete": false,
                    "received": self.received.load(Ordering::Relaxed),
                    "hist": [],
                });
            }
        }
    }
}

/// Options of the subscriber child.
#[derive(Debug, Args)]
pub struct SubArgs {
    #[arg(long)]
    port: u16,
    #[arg(long)]
    member_id: u32,
    #[arg(long, default_value_t = 1472)]
    mtu: usize,
    #[arg(long, default_value_t = 4096)]
    window: u32,
    #[arg(long, default_value_t = 0.0)]
    loss: f64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    #[arg(long, default_value = "auto", value_parser = parse_backend)]
    backend: BackendKind,
    #[arg(long)]
    busy_poll: bool,
    /// Subscribers of the run (the secured group's member list).
    #[arg(long, default_value_t = 1)]
    subscribers: usize,
    #[command(flatten)]
    recovery: Recovery,
}

/// The subscriber child: reports when the run ends or its stdin closes.
pub fn sub(a: SubArgs) -> Result<ExitCode, String> {
    let s = start_subscriber(
        a.member_id,
        a.port,
        Tuning {
            mtu: a.mtu,
            window: a.window,
            recovery: a.recovery,
            secure: BenchSecret::from_env(a.subscribers)?,
        },
        a.loss,
        a.seed,
        a.backend,
        a.busy_poll,
    )?;
    let stop = stop_on_stdin_eof();
    say("ready");
    let mut report = s.wait_report(&stop, Duration::from_secs(3600));
    if let Ok(st) = s.engine.stats(GROUP) {
        merge_objects(
            &mut report,
            json!({
                "naks_sent": st.counters.get(Counter::NaksSent),
                "frames_held": st.counters.get(Counter::FramesHeldOutOfOrder),
                "frames_held_copied": st.counters.get(Counter::FramesHeldCopied),
                "datagrams_received": st.transport.received,
                "dropped_by_decorator": st.transport.dropped_by_decorator,
                "receive_buffers": st.transport.receive_buffers,
                "receive_buffer_shortages": st.receive_buffer_shortages,
                "gro": st.gro,
            }),
        );
        if let Some(s) = &st.secure {
            merge_objects(&mut report, json!({ "secure": shield_json(s) }));
        }
    }
    say(&report.to_string());
    // Stay until the parent has read the report and closes stdin: our STATUS reports keep the
    // publisher's flow control moving until then.
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(ExitCode::SUCCESS)
}

/// Offers `msg`, waiting while the publication is back-pressured.
fn offer_blocking(p: &mut Publication, msg: &[u8], engine: &Engine) -> Result<(), String> {
    loop {
        match p.offer(msg) {
            Ok(()) => return Ok(()),
            // In invoker mode only this thread can make room.
            Err(OfferError::BackPressured) if engine.invoke() => {}
            Err(OfferError::BackPressured) => std::thread::yield_now(),
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// A subscriber, as a child process or as an engine of this process.
enum Sub {
    Process(ChildProc),
    Local(Box<Subscriber>),
}

/// What one engine run measured.
struct EngineRun {
    report: Value,
    /// Payload bytes per second per subscriber (median).
    bytes_per_sec: f64,
    /// Nothing lost, every subscriber complete, everything acknowledged.
    ok: bool,
}

fn throughput(a: &UdpArgs, port: u16) -> Result<ExitCode, String> {
    // The raw paths' port, apart from the engines' (`port`, and `port + 4` for `--secure`).
    let raw_port = port + 8;
    let core = a.publisher_core()?;
    let raw_results = raw::measure_all(
        &RawPath::ALL,
        a.size,
        a.subscribers,
        a.raw_duration,
        raw_port,
        a.json,
        None,
    )?;
    let best = raw::best(&raw_results).ok_or("no raw path measured")?;
    let ratio = |x: f64, of: f64| {
        if of > 0.0 {
            (x / of * 1000.0).round() / 1000.0
        } else {
            0.0
        }
    };

    let plain = engine_run(a, port, a.tuning(), "engine", core)?;
    let ceiling = Ceiling::after_engine(a, best, raw_port, core)?;
    let raw_bytes_per_sec = ceiling.per_sec() * a.size as f64;
    let (mut report, ok) = if a.secure {
        let aead = aead_rate(a.size, a.aead_duration);
        let aead_datagram = aead_rate(a.mtu - intergroup_engine::shield::SEAL_OVERHEAD, a.aead_duration);
        let tuning = Tuning {
            secure: Some(BenchSecret::random(a.subscribers)?),
            ..a.tuning()
        };
        // A port of its own, so nothing of the plaintext run is heard.
        let secure = engine_run(a, port + 4, tuning, "secure engine", core)?;
        let mut report = secure.report;
        merge_objects(
            &mut report,
            json!({
                "secure": true,
                "aead_backend": intergroup_secure::aead::BACKEND,
                "ratio_to_raw": ratio(secure.bytes_per_sec, raw_bytes_per_sec),
                "ratio_to_plain": ratio(secure.bytes_per_sec, plain.bytes_per_sec),
                "ratio_to_aead": ratio(secure.bytes_per_sec, aead),
                "aead_mb_per_sec": (aead / 1e6 * 10.0).round() / 10.0,
                "aead_datagram_mb_per_sec": (aead_datagram / 1e6 * 10.0).round() / 10.0,
                "plain_msgs_per_sec": plain.report["msgs_per_sec"],
                "plain_mb_per_sec": plain.report["mb_per_sec"],
                "plain_lost": plain.report["lost"],
            }),
        );
        (report, secure.ok && plain.ok)
    } else {
        let mut report = plain.report;
        merge_objects(
            &mut report,
            json!({ "ratio_to_raw": ratio(plain.bytes_per_sec, raw_bytes_per_sec) }),
        );
        (report, plain.ok)
    };
    merge_objects(
        &mut report,
        json!({
            "raw_ceiling": best.path.name(),
            "raw_msgs_per_sec": ceiling.per_sec().round(),
            "raw_msgs_per_sec_before": ceiling.before.round(),
            "raw_msgs_per_sec_after": ceiling.after.round(),
            "raw_msgs_per_sec_pinned": ceiling.pinned.as_ref().map(|p| p.0.round()),
            "raw_host_cpu_pinned": ceiling.pinned.as_ref().map(|p| &p.1),
            "publisher_core": core,
            "raw_host_cpu_before": best.host_cpu,
            "raw_host_cpu_after": ceiling.after_host_cpu,
            "raw_mb_per_sec": (raw_bytes_per_sec / 1e6 * 10.0).round() / 10.0,
            "raw": raw_results.iter().map(|r| r.to_json(a.size)).collect::<Vec<_>>(),
        }),
    );
    if a.json {
        println!("{report}");
    } else {
        print_udp_table(&report);
    }
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// The best raw path's rate per receiver, measured before the engine runs (with every other
/// path) and once more right after it: this host's speed swings within minutes, and a raw
/// phase caught in a slow spell alone would make a low ceiling and a ratio too good (seen: a
/// `ratio_to_raw` above 1). When the publisher was pinned, the best path runs a third time
/// with its sender pinned to the same core, so the engine's placement is never one the
/// ceiling did not get. The ceiling is the highest of them.
struct Ceiling {
    before: f64,
    after: f64,
    /// The host's steal and idle shares while the best path ran again.
    after_host_cpu: Value,
    /// The best path with its sender on the publisher's core, and the host's shares then.
    pinned: Option<(f64, Value)>,
}

impl Ceiling {
    /// Measures `best` again on `raw_port`, the port of the first raw phase, unpinned and, with
    /// `core`, pinned there.
    fn after_engine(
        a: &UdpArgs,
        best: &raw::PathResult,
        raw_port: u16,
        core: Option<usize>,
    ) -> Result<Self, String> {
        let measure = |core| {
            raw::measure(
                best.path,
                a.size,
                a.subscribers,
                a.raw_duration,
                raw_port,
                a.json,
                core,
            )
        };
        let again = measure(None)?;
        let pinned = match core {
            Some(c) => {
                let r = measure(Some(c))?;
                Some((r.received_per_sec, r.host_cpu))
            }
            None => None,
        };
        Ok(Self {
            before: best.received_per_sec,
            after: again.received_per_sec,
            after_host_cpu: again.host_cpu,
            pinned,
        })
    }

    fn per_sec(&self) -> f64 {
        let pinned = self.pinned.as_ref().map_or(0.0, |p| p.0);
        self.before.max(self.after).max(pinned)
    }
}

/// AES-256-GCM seal then open of `size`-byte messages on this core, in place, for `seconds`:
/// payload bytes per second (the ceiling `ratio_to_aead` divides by).
fn aead_rate(size: usize, seconds: f64) -> f64 {
    let secret = EpochSecret::from_bytes([0x5a; 32]);
    let mut sealer = secret.sender_key(1, 1, 1, 0);
    let opener = secret.sender_key(1, 1, 1, 0);
    let mut buf = vec![0u8; size + TAG_LEN];
    let aad = [0u8; 24];
    let mut packet = 0u64;
    let start = Instant::now();
    let mut elapsed = 0.0;
    while elapsed < seconds {
        for _ in 0..256 {
            let Ok(tag) = sealer.seal_in_place(packet, &aad, &mut buf[..size]) else {
                return 0.0;
            };
            buf[size..].copy_from_slice(&tag);
            if opener.open_in_place(packet, &aad, &mut buf).is_err() {
                return 0.0;
            }
            packet += 1;
        }
        elapsed = start.elapsed().as_secs_f64();
    }
    packet as f64 * size as f64 / elapsed
}

fn shield_json(s: &ShieldStats) -> Value {
    let mut rejected = serde_json::Map::new();
    for r in Rejection::ALL {
        rejected.insert(r.label().to_string(), json!(s.rejected(r)));
    }
    json!({
        "epoch": s.epoch,
        "sealed": s.sealed,
        "opened": s.opened,
        "key_rotations": s.key_rotations,
        "rejected": rejected,
    })
}

/// One publisher engine -> `a.subscribers` subscriber engines. With `core`, the publishing
/// thread and the publisher's worker run on it (the subscribers, started first, do not).
fn engine_run(
    a: &UdpArgs,
    port: u16,
    tuning: Tuning,
    label: &str,
    core: Option<usize>,
) -> Result<EngineRun, String> {
    let mut subs = Vec::new();
    for i in 0..a.subscribers {
        let id = i as u32 + 2;
        subs.push(if a.processes {
            let mut args = vec![
                "udp-sub".to_string(),
                "--port".into(),
                port.to_string(),
                "--member-id".into(),
                id.to_string(),
                "--mtu".into(),
                a.mtu.to_string(),
                "--window".into(),
                a.window.to_string(),
                "--loss".into(),
                a.loss.to_string(),
                "--seed".into(),
                a.seed.to_string(),
                "--backend".into(),
                a.backend.to_string(),
                "--subscribers".into(),
                a.subscribers.to_string(),
            ];
            if a.busy_poll {
                args.push("--busy-poll".into());
            }
            args.extend(a.recovery.args());
            let env: Vec<(&str, String)> = tuning
                .secure
                .iter()
                .map(|s| (SECRET_ENV, hex::encode(s.secret)))
                .collect();
            Sub::Process(ChildProc::spawn_with_env(&args, &env)?)
        } else {
            Sub::Local(Box::new(start_subscriber(
                id,
                port,
                tuning,
                a.loss,
                a.seed,
                a.backend,
                a.busy_poll,
            )?))
        });
    }
    // On the publisher's core, with `core`: the engine pins its worker there, `on_core` this
    // thread, and an invoker engine is made and run by the thread that pins it.
    let (published, app_cpu, host_cpu, worker_cpu_start, acknowledged, reports, stats) =
        super::on_core(core, move || -> Result<_, String> {
            let engine = Engine::launch(EngineConfig {
                invoker: a.invoker,
                publication_ring_bytes: a.ring_bytes,
                publication_window_bytes: a.publication_window,
                cores: core.into_iter().collect(),
                ..engine_config(a.backend, a.busy_poll)
            })
            .map_err(|e| e.to_string())?;
            engine
                .join(group_config(1, port, tuning, 0.0, a.seed))
                .map_err(|e| e.to_string())?;
            let mut publication = engine
                .publication(GROUP, DATA_STREAM)
                .map_err(|e| e.to_string())?;
            // Every subscriber reports before the clock starts: flow control protects only receivers
            // the publisher has heard from, and one slow to start must not miss the first messages.
            if !engine
                .wait_receivers(GROUP, a.subscribers, Duration::from_secs(30))
                .map_err(|e| e.to_string())?
            {
                return Err(format!(
                    "{label}: the {} subscribers did not report within 30 s",
                    a.subscribers
                ));
            }
            let worker_cpu_start = engine.stats(GROUP).map_err(|e| e.to_string())?.worker_cpu;
            let bar = progress(label, a.duration, a.json);
            let host_start = HostCpu::now();
            let app_cpu_start = ThreadCpu::now();
            let start = Instant::now();
            let mut seq = 0u64;
            let mut spins = 0u32;
            while start.elapsed().as_secs_f64() < a.duration {
                // Bursts of 64 offers signal the worker once (see `Burst`), as a raw sender's batch
                // of datagrams is one system call.
                let mut burst = publication.burst();
                for _ in 0..64 {
                    match burst.try_claim(a.size) {
                        Ok(mut claim) => {
                            super::stamp(claim.buf(), seq);
                            claim.commit();
                            seq += 1;
                            spins = 0;
                        }
                        Err(OfferError::BackPressured) if a.invoker => {
                            // Full: this thread is the engine; run it until there is room.
                            if !engine.invoke() {
                                engine.idle(Duration::from_millis(1));
                            }
                        }
                        Err(OfferError::BackPressured) => {
                            // The engine is the bottleneck: wait for the worker as Aeron's throughput
                            // tests do, spinning, then yielding the core to any thread with work. A
                            // sleep would have to outlast the publication window's worth of sending
                            // to keep the worker fed, and leaves a vCPU idle, which the host then
                            // gives away (docs/performance.md, twenty-fourth set).
                            spins += 1;
                            if spins > 16 {
                                std::thread::yield_now();
                            } else {
                                std::hint::spin_loop();
                            }
                        }
                        Err(e) => return Err(e.to_string()),
                    }
                }
                drop(burst);
                engine.invoke();
                tick(&bar, start);
            }
            let published = seq;
            let app_cpu = ThreadCpu::now().since(app_cpu_start);
            let host_cpu = HostCpu::json(host_start, HostCpu::now());
            let mut end = vec![0u8; MIN_SIZE];
            end[..8].copy_from_slice(&END.to_le_bytes());
            end[8..16].copy_from_slice(&published.to_le_bytes());
            loop {
                match publication.offer(&end) {
                    Ok(()) => break,
                    Err(OfferError::BackPressured) => {
                        engine.invoke();
                        std::thread::yield_now();
                    }
                    Err(e) => return Err(e.to_string()),
                }
            }
            bar.finish_and_clear();
            let acknowledged = engine
                .wait_acknowledged(GROUP, a.subscribers, Duration::from_secs(60))
                .map_err(|e| e.to_string())?;
            let never = AtomicBool::new(false);
            let mut reports = Vec::new();
            for s in subs {
                reports.push(match s {
                    // The child prints its report once the end arrived (closing stdin then lets it
                    // exit); when the run did not complete, closing stdin makes it report what it has.
                    Sub::Process(mut c) if acknowledged => {
                        let line = c.line()?;
                        drop(c);
                        serde_json::from_str::<Value>(&line)
                            .map_err(|e| format!("subscriber report {line:?}: {e}"))?
                    }
                    Sub::Process(c) => c.finish()?,
                    Sub::Local(s) => s.wait_report(&never, Duration::from_secs(10)),
                });
            }
            let stats = engine.stats(GROUP).map_err(|e| e.to_string())?;
            drop(publication);
            engine.close();
            Ok((
                published,
                app_cpu,
                host_cpu,
                worker_cpu_start,
                acknowledged,
                reports,
                stats,
            ))
        })??;

    let mut latency = histogram();
    let mut rates = Vec::new();
    let mut lost = 0u64;
    let mut complete = true;
    for r in &reports {
        merge_json(&mut latency, &r["hist"]);
        let received = r["received"].as_u64().unwrap_or(0);
        lost += published.saturating_sub(received);
        complete &= r["complete"].as_bool().unwrap_or(false);
        let elapsed = r["elapsed_s"].as_f64().unwrap_or(0.0);
        rates.push(if elapsed > 0.0 {
            received as f64 / elapsed
        } else {
            0.0
        });
    }
    let msgs = median(rates);
    let bytes_per_sec = msgs * a.size as f64;
    let mut report = json!({
        "mode": "udp",
        "size": a.size,
        "subscribers": a.subscribers,
        "duration": a.duration,
        "backend": stats.backend.to_string(),
        "gso": stats.gso,
        "gro": stats.gro,
        "processes": a.processes,
        "loss": a.loss,
        "ring_bytes": a.ring_bytes,
        "publication_window": a.publication_window,
        "published": published,
        "msgs_per_sec": msgs.round(),
        "mb_per_sec": (bytes_per_sec / 1e6 * 10.0).round() / 10.0,
        "lost": lost,
        "complete": complete && acknowledged,
        "retransmissions": stats.counters.get(Counter::Retransmissions),
        "naks_received": stats.counters.get(Counter::NaksReceived),
        "flow_control_stalls": stats.counters.get(Counter::FlowControlStalls),
        "status_received": stats.counters.get(Counter::StatusReceived),
        "datagrams_sent": stats.transport.sent,
        "publisher_datagrams_received": stats.transport.received,
        "publisher_send_calls": stats.transport.send_calls,
        "per_subscriber": reports.iter().map(|r| {
            let mut r = r.clone();
            if let Some(o) = r.as_object_mut() { o.remove("hist"); }
            r
        }).collect::<Vec<_>>(),
    });
    merge_objects(&mut report, percentiles(&latency));
    merge_objects(
        &mut report,
        json!({
            "cpu_ns_per_msg": {
                "publisher_app": raw::per_message(app_cpu, published),
                "publisher_worker": raw::per_message(stats.worker_cpu.since(worker_cpu_start), published),
                "subscriber": raw::mean_per_message(&reports),
            },
            "host_cpu": host_cpu,
        }),
    );
    if let Some(s) = &stats.secure {
        merge_objects(&mut report, json!({ "publisher_secure": shield_json(s) }));
    }
    Ok(EngineRun {
        report,
        bytes_per_sec,
        ok: lost == 0 && complete && acknowledged,
    })
}

fn print_udp_table(r: &Value) {
    println!(
        "intergroup over loopback multicast: 1 publisher engine -> {} subscriber engine(s), {} B messages, {} s, backend {}{}",
        r["subscribers"],
        r["size"],
        r["duration"],
        r["backend"].as_str().unwrap_or(""),
        if r["loss"].as_f64().unwrap_or(0.0) > 0.0 { format!(", {} injected loss", r["loss"]) } else { String::new() }
    );
    println!("{:<34}{:>16}{:>12}", "", "messages/s", "MB/s");
    let secure = r["secure"].as_bool().unwrap_or(false);
    println!(
        "{:<34}{:>16}{:>12}",
        if secure {
            "sealed reliable FIFO, per subscr."
        } else {
            "reliable FIFO, per subscriber"
        },
        r["msgs_per_sec"].to_string(),
        r["mb_per_sec"].to_string()
    );
    if secure {
        println!(
            "{:<34}{:>16}{:>12}",
            "plaintext reliable FIFO",
            r["plain_msgs_per_sec"].to_string(),
            r["plain_mb_per_sec"].to_string()
        );
        println!(
            "{:<34}{:>16}{:>12}",
            format!(
                "AEAD seal+open, one core ({})",
                r["aead_backend"].as_str().unwrap_or("")
            ),
            "",
            r["aead_mb_per_sec"].to_string()
        );
        println!(
            "ratio to plaintext: {}   ratio to AEAD: {}",
            r["ratio_to_plain"], r["ratio_to_aead"]
        );
    }
    println!(
        "{:<34}{:>16}{:>12}",
        format!("raw UDP ceiling ({})", r["raw_ceiling"].as_str().unwrap_or("")),
        r["raw_msgs_per_sec"].to_string(),
        r["raw_mb_per_sec"].to_string()
    );
    match r["publisher_core"].as_u64() {
        Some(core) => println!(
            "  (the highest of {} before and {} after the engine, and {} with its sender on core {core})",
            r["raw_msgs_per_sec_before"], r["raw_msgs_per_sec_after"], r["raw_msgs_per_sec_pinned"]
        ),
        None => println!(
            "  (the higher of {} before and {} after the engine)",
            r["raw_msgs_per_sec_before"], r["raw_msgs_per_sec_after"]
        ),
    }
    println!("ratio to raw: {}", r["ratio_to_raw"]);
    match r["publisher_core"].as_u64() {
        Some(core) => {
            println!("publishing thread and its worker pinned to core {core}; subscribers unpinned")
        }
        None => println!("nothing pinned"),
    }
    let steal = |v: &Value| v["steal_pct"].as_f64().map_or("-".into(), |s| format!("{s}%"));
    println!(
        "host CPU stolen by the hypervisor: raw before {}, engine {}, raw after {}",
        steal(&r["raw_host_cpu_before"]),
        steal(&r["host_cpu"]),
        steal(&r["raw_host_cpu_after"])
    );
    println!(
        "lost: {}   retransmissions: {}   latency us: p50 {}  p90 {}  p99 {}  p99.9 {}  max {}",
        r["lost"], r["retransmissions"], r["p50"], r["p90"], r["p99"], r["p999"], r["max"]
    );
    let cpu = &r["cpu_ns_per_msg"];
    if cpu.is_object() {
        println!(
            "CPU ns per message, user+system: publisher's thread {}, its worker {}, each subscriber {}",
            raw::cpu_pair(&cpu["publisher_app"]),
            raw::cpu_pair(&cpu["publisher_worker"]),
            raw::cpu_pair(&cpu["subscriber"])
        );
    }
    println!("raw paths (same size, same receivers):");
    for p in r["raw"].as_array().into_iter().flatten() {
        println!(
            "  {:<20}{:>14} msgs/s{:>10} MB/s   CPU ns/msg sender {}, each receiver {}",
            p["path"].as_str().unwrap_or(""),
            p["msgs_per_sec"].to_string(),
            p["mb_per_sec"].to_string(),
            raw::cpu_pair(&p["cpu_ns_per_msg"]["sender"]),
            raw::cpu_pair(&p["cpu_ns_per_msg"]["receiver"])
        );
    }
}

/// Options of the echo child.
#[derive(Debug, Args)]
pub struct PongArgs {
    #[arg(long)]
    port: u16,
    #[arg(long, default_value = "auto", value_parser = parse_backend)]
    backend: BackendKind,
    #[arg(long)]
    busy_poll: bool,
    /// Run the engine on the main thread (invoker mode), which then echoes between turns.
    #[arg(long)]
    invoker: bool,
}

/// The echo child: republishes every data message on the echo stream.
pub fn pong(a: PongArgs) -> Result<ExitCode, String> {
    let engine = Engine::launch(EngineConfig {
        invoker: a.invoker,
        ..engine_config(a.backend, a.busy_poll)
    })
    .map_err(|e| e.to_string())?;
    engine
        .join(group_config(
            2,
            a.port,
            Tuning {
                mtu: 1472,
                window: 4096,
                recovery: Recovery::default(),
                secure: None,
            },
            0.0,
            1,
        ))
        .map_err(|e| e.to_string())?;
    let mut publication = engine
        .publication(GROUP, ECHO_STREAM)
        .map_err(|e| e.to_string())?;
    let echoed = Arc::new(AtomicU64::new(0));
    let count = echoed.clone();
    engine
        .subscribe(GROUP, move |out: &Output<'_>| {
            if let Output::Message(m) = out {
                if m.stream == DATA_STREAM && publication.offer(m.payload).is_ok() {
                    count.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
        .map_err(|e| e.to_string())?;
    let stop = stop_on_stdin_eof();
    say("ready");
    while !stop.load(Ordering::Relaxed) {
        if !a.invoker {
            std::thread::sleep(Duration::from_millis(20));
        } else if !engine.invoke() && !a.busy_poll {
            engine.idle(Duration::from_millis(20));
        }
    }
    say(&json!({ "echoed": echoed.load(Ordering::Relaxed) }).to_string());
    Ok(ExitCode::SUCCESS)
}

/// Round trips through two engines for `seconds`.
fn engine_pingpong(a: &UdpArgs, port: u16, busy: bool) -> Result<(Histogram<u64>, f64, u64), String> {
    let mut args = vec![
        "udp-pong".to_string(),
        "--port".into(),
        port.to_string(),
        "--backend".into(),
        a.backend.to_string(),
    ];
    if busy {
        args.push("--busy-poll".into());
    }
    if a.invoker {
        args.push("--invoker".into());
    }
    let child = ChildProc::spawn(&args)?;
    let engine = Engine::launch(EngineConfig {
        invoker: a.invoker,
        ..engine_config(a.backend, busy)
    })
    .map_err(|e| e.to_string())?;
    engine
        .join(group_config(1, port, a.tuning(), 0.0, a.seed))
        .map_err(|e| e.to_string())?;
    let hist = Arc::new(Mutex::new(histogram()));
    let last = Arc::new(AtomicU64::new(u64::MAX));
    let (h, l) = (hist.clone(), last.clone());
    engine
        .subscribe(GROUP, move |out: &Output<'_>| {
            if let Output::Message(m) = out {
                if let (ECHO_STREAM, Some((seq, ts))) = (m.stream, header(m.payload)) {
                    if let Ok(mut h) = h.lock() {
                        record_since(&mut h, ts, mono_ns());
                    }
                    l.store(seq, Ordering::Release);
                }
            }
        })
        .map_err(|e| e.to_string())?;
    let mut publication = engine
        .publication(GROUP, DATA_STREAM)
        .map_err(|e| e.to_string())?;
    let mut msg = vec![0x5a_u8; a.size];
    // Warm-up: the first exchanges also introduce the members to each other.
    let mut timeouts = 0u64;
    let mut seq = 0u64;
    let mut run = |seconds: f64, seq: &mut u64, timeouts: &mut u64| -> Result<(), String> {
        let start = Instant::now();
        while start.elapsed().as_secs_f64() < seconds {
            super::stamp(&mut msg, *seq);
            offer_blocking(&mut publication, &msg, &engine)?;
            let deadline = Instant::now() + Duration::from_millis(500);
            let mut spins = 0u32;
            while last.load(Ordering::Acquire) != *seq {
                if Instant::now() > deadline {
                    *timeouts += 1;
                    break;
                }
                if a.invoker {
                    // This thread is the engine: it sends the offer and receives the echo.
                    if !engine.invoke() && !busy {
                        engine.idle(Duration::from_millis(1));
                    }
                    continue;
                }
                spins += 1;
                if spins > 100 || !busy {
                    std::thread::yield_now();
                } else {
                    std::hint::spin_loop();
                }
            }
            *seq += 1;
        }
        Ok(())
    };
    run(0.3, &mut seq, &mut timeouts)?;
    if let Ok(mut h) = hist.lock() {
        h.reset();
    }
    timeouts = 0;
    let start = Instant::now();
    run(a.duration, &mut seq, &mut timeouts)?;
    let elapsed = start.elapsed().as_secs_f64();
    drop(child);
    engine.close();
    let h = hist.lock().map_err(|_| "histogram lock poisoned")?.clone();
    let rate = h.len() as f64 / elapsed;
    Ok((h, rate, timeouts))
}

fn pingpong(a: &UdpArgs, port: u16) -> Result<ExitCode, String> {
    let mut rows = Vec::new();
    for (path, spin) in raw::PINGPONG_PATHS {
        let (h, rate) = raw::pingpong(path, spin, a.size, a.duration.min(3.0), port + 8)?;
        let mut v = json!({ "path": format!("raw {}", raw::pingpong_name(path, spin)), "msgs_per_sec": rate.round() });
        merge_objects(&mut v, percentiles(&h));
        rows.push(v);
    }
    let modes: &[bool] = if a.busy_poll { &[true] } else { &[false, true] };
    let mut first = None;
    for &busy in modes {
        let (h, rate, timeouts) = engine_pingpong(a, port, busy)?;
        let mut v = json!({
            "path": format!(
                "engine {}{}{}",
                a.backend,
                if a.invoker { " invoker" } else { "" },
                if busy { " busy-poll" } else { "" }
            ),
            "msgs_per_sec": rate.round(),
            "timeouts": timeouts,
        });
        merge_objects(&mut v, percentiles(&h));
        if first.is_none() {
            first = Some(v.clone());
        }
        rows.push(v);
    }
    let mut report = first.unwrap_or_else(|| json!({}));
    merge_objects(
        &mut report,
        json!({
            "mode": "udp",
            "pingpong": true,
            "round_trip": true,
            "size": a.size,
            "lost": 0,
            "retransmissions": 0,
            "mb_per_sec": 0.0,
            "paths": rows,
        }),
    );
    print_report(
        &report,
        a.json,
        &format!(
            "ping-pong over loopback multicast, {} B, round-trip times in microseconds",
            a.size
        ),
    );
    Ok(ExitCode::SUCCESS)
}

/// `intergroup bench udp`.
pub fn run(a: UdpArgs) -> Result<ExitCode, String> {
    if a.size < MIN_SIZE {
        return Err(format!("--size {} must be at least {MIN_SIZE}", a.size));
    }
    if a.subscribers == 0 {
        return Err("--subscribers must be at least 1".into());
    }
    if !(0.0..1.0).contains(&a.loss) {
        return Err(format!("--loss {} must be in [0, 1)", a.loss));
    }
    let port = a.port.unwrap_or_else(super::default_port);
    if a.pingpong {
        pingpong(&a, port)
    } else {
        throughput(&a, port)
    }
}
