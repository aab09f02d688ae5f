//! The engine daemon and the commands that talk to it: `engine`, `pub`, `sub`, `stat`,
//! `doctor`.
//!
//! Exit codes: 0 done; 1 the work failed (no engine, the engine died, a check failed); 2 bad
//! usage, configuration or input.

use base64::Engine as _;
use clap::{Args, ValueEnum};
use intergroup_engine::ipc::{
    self, cnc::Cnc, Client, Delivery, Driver, DriverConfig, IpcError, OfferError, Order, SubscriptionEvent,
};
use serde_json::{json, Map, Value};
use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// A failure with its exit code.
pub struct Failure {
    pub code: u8,
    pub message: String,
}

impl From<String> for Failure {
    fn from(message: String) -> Self {
        Self { code: 1, message }
    }
}

fn usage(message: String) -> Failure {
    Failure { code: 2, message }
}

fn fail(e: IpcError) -> Failure {
    let code = match e {
        IpcError::Config(_) => 2,
        _ => 1,
    };
    Failure {
        code,
        message: e.to_string(),
    }
}

/// The engine directory option every engine command takes.
#[derive(Debug, Clone, Args)]
pub struct DirArg {
    /// Engine directory [default: /dev/shm/intergroup-<uid>].
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

impl DirArg {
    pub fn path(&self) -> PathBuf {
        self.dir.clone().unwrap_or_else(ipc::default_dir)
    }
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

static RELOAD: AtomicBool = AtomicBool::new(false);

extern "C" fn on_hangup(_: libc::c_int) {
    RELOAD.store(true, Ordering::SeqCst);
}

/// SIGINT and SIGTERM set [`STOP`].
fn catch_signals() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
}

/// `intergroup engine`.
#[derive(Debug, Args)]
pub struct EngineArgs {
    #[command(flatten)]
    dir: DirArg,
    /// TOML configuration (see --print-default-config for every key and its default).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Print the default configuration, every key explained, and exit.
    #[arg(long)]
    print_default_config: bool,
}

fn init_logs(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

pub fn engine(a: EngineArgs) -> Result<ExitCode, Failure> {
    if a.print_default_config {
        print!("{}", ipc::DEFAULT_CONFIG_TOML);
        return Ok(ExitCode::SUCCESS);
    }
    let cfg = match &a.config {
        Some(path) => {
            let text =
                std::fs::read_to_string(path).map_err(|e| usage(format!("{}: {e}", path.display())))?;
            DriverConfig::from_toml(&path.display().to_string(), &text).map_err(fail)?
        }
        None => DriverConfig::default(),
    };
    init_logs(&cfg.log_level);
    catch_signals();
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe { libc::signal(libc::SIGHUP, on_hangup as *const () as libc::sighandler_t) };
    let dir = a.dir.path();
    let driver = Driver::start(&dir, cfg).map_err(fail)?;
    eprintln!(
        "intergroup engine: running on {} (pid {}, member id {}); stop with Ctrl-C or SIGTERM, \
         roll out new group policies with SIGHUP",
        dir.display(),
        std::process::id(),
        driver.member_id()
    );
    while !STOP.load(Ordering::SeqCst) && driver.is_running() {
        if RELOAD.swap(false, Ordering::SeqCst) {
            reload(&driver, a.config.as_deref());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let crashed = !driver.is_running();
    driver.close();
    if crashed {
        return Err("the engine's conductor stopped unexpectedly".to_string().into());
    }
    eprintln!("intergroup engine: stopped");
    Ok(ExitCode::SUCCESS)
}

/// SIGHUP: reads the configuration file again and rolls out its secured groups' new policies.
fn reload(driver: &Driver, config: Option<&std::path::Path>) {
    let Some(path) = config else {
        eprintln!("intergroup engine: SIGHUP ignored: started without --config");
        return;
    };
    let result = std::fs::read_to_string(path)
        .map_err(|e| format!("{}: {e}", path.display()))
        .and_then(|text| {
            DriverConfig::from_toml(&path.display().to_string(), &text).map_err(|e| e.to_string())
        })
        .and_then(|cfg| driver.reload(cfg).map_err(|e| e.to_string()));
    match result {
        Ok(changes) if changes.is_empty() => eprintln!("intergroup engine: reloaded, nothing changed"),
        Ok(changes) => {
            for c in changes {
                eprintln!("intergroup engine: reloaded: {c}");
            }
        }
        Err(e) => eprintln!("intergroup engine: reload refused, running as before: {e}"),
    }
}

/// The group and stream `pub` and `sub` work on.
#[derive(Debug, Clone, Args)]
pub struct GroupArgs {
    /// Group name.
    #[arg(long)]
    group: String,
    /// Stream number.
    #[arg(long, default_value_t = 1)]
    stream: u32,
}

/// `intergroup pub`.
#[derive(Debug, Args)]
pub struct PubArgs {
    #[command(flatten)]
    dir: DirArg,
    #[command(flatten)]
    target: GroupArgs,
    /// Messages per second at most (default: as fast as subscribers take them).
    #[arg(long)]
    rate: Option<f64>,
}

/// Offers `msg`, waiting while no one listens or the log is full.
fn offer_waiting(p: &mut ipc::Publication, msg: &[u8]) -> Result<(), Failure> {
    let mut waits = 0u32;
    loop {
        match p.offer(msg) {
            Ok(()) => return Ok(()),
            Err(OfferError::BackPressured | OfferError::NotConnected) => {
                waits += 1;
                if waits < 64 {
                    std::thread::yield_now();
                } else {
                    std::thread::sleep(Duration::from_micros(100));
                }
                if STOP.load(Ordering::Relaxed) {
                    return Err("interrupted".to_string().into());
                }
            }
            Err(e @ OfferError::TooLarge { .. }) => return Err(usage(format!("a line is too long: {e}"))),
            Err(e) => return Err(e.to_string().into()),
        }
    }
}

pub fn publish(a: PubArgs) -> Result<ExitCode, Failure> {
    ipc::check_group_name(&a.target.group).map_err(usage)?;
    if a.rate.is_some_and(|r| !(r > 0.0 && r.is_finite())) {
        return Err(usage("--rate must be a positive number".into()));
    }
    catch_signals();
    let client = Client::connect(a.dir.path()).map_err(fail)?;
    let mut p = client
        .publication(&a.target.group, a.target.stream)
        .map_err(fail)?;
    let stdin = std::io::stdin();
    let mut line = Vec::new();
    let mut input = stdin.lock();
    let start = Instant::now();
    let mut sent = 0u64;
    loop {
        line.clear();
        let n = input
            .read_until(b'\n', &mut line)
            .map_err(|e| format!("stdin: {e}"))?;
        if n == 0 {
            break;
        }
        if line.last() == Some(&b'\n') {
            line.pop();
        }
        if let Some(rate) = a.rate {
            let due = start + Duration::from_secs_f64(sent as f64 / rate);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
        offer_waiting(&mut p, &line)?;
        sent += 1;
    }
    eprintln!(
        "intergroup pub: {sent} messages published to {} stream {}",
        a.target.group, a.target.stream
    );
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// The payload, one message per line.
    Text,
    /// One JSON object per line: messages and events.
    Jsonl,
}

/// `intergroup sub`.
#[derive(Debug, Args)]
pub struct SubArgs {
    #[command(flatten)]
    dir: DirArg,
    #[command(flatten)]
    target: GroupArgs,
    /// Exit after this many messages (default: run until interrupted).
    #[arg(long)]
    count: Option<u64>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
    /// Delivery order: fifo (per sender), or total or safe (the same order at every engine;
    /// the group needs `membership = true` in the engines' [[group]] entry).
    #[arg(long, default_value = "fifo")]
    order: Order,
}

fn event_json(e: &SubscriptionEvent) -> Value {
    match e {
        SubscriptionEvent::ImageAvailable { session } => {
            json!({"event": "image_available", "session": session})
        }
        SubscriptionEvent::ImageUnavailable { session } => {
            json!({"event": "image_unavailable", "session": session})
        }
        SubscriptionEvent::Evicted { session } => json!({"event": "evicted", "session": session}),
        SubscriptionEvent::ImageUnreadable { session, reason } => {
            json!({"event": "image_unreadable", "session": session, "reason": reason})
        }
        SubscriptionEvent::UnrecoverableLoss { sender, first, count } => {
            json!({"event": "unrecoverable_loss", "sender": sender, "first": first, "count": count})
        }
        SubscriptionEvent::Lapped { missed } => json!({"event": "lapped", "missed": missed}),
        SubscriptionEvent::View {
            view,
            coordinator,
            members,
            primary,
            joined,
        } => json!({
            "event": if *primary { "view" } else { "non_primary" },
            "view": view,
            "coordinator": coordinator,
            "members": members,
            "joined": joined,
        }),
        SubscriptionEvent::Transitional { members } => json!({"event": "transitional", "members": members}),
        SubscriptionEvent::Left => json!({"event": "left"}),
    }
}

pub fn subscribe(a: SubArgs) -> Result<ExitCode, Failure> {
    ipc::check_group_name(&a.target.group).map_err(usage)?;
    catch_signals();
    let client = Client::connect(a.dir.path()).map_err(fail)?;
    let mut s = client
        .subscription(&a.target.group, a.target.stream, a.order)
        .map_err(fail)?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::with_capacity(1 << 16, stdout.lock());
    let limit = a.count.unwrap_or(u64::MAX);
    let mut got = 0u64;
    let mut idle = 0u32;
    let mut write_error = None;
    while got < limit && !STOP.load(Ordering::Relaxed) {
        let want = (limit - got).min(256) as usize;
        let n = s
            .poll(want, |d| {
                let r = match d {
                    Delivery::Message(m) => {
                        got += 1;
                        match a.format {
                            Format::Text => out.write_all(m.payload).and_then(|()| out.write_all(b"\n")),
                            Format::Jsonl => {
                                let (payload, encoding) = match std::str::from_utf8(m.payload) {
                                    Ok(t) => (t.to_string(), "utf8"),
                                    Err(_) => (
                                        base64::engine::general_purpose::STANDARD.encode(m.payload),
                                        "base64",
                                    ),
                                };
                                let v = json!({
                                    "sender": m.sender,
                                    "seq": m.seq,
                                    "view": m.view,
                                    "stream": m.stream,
                                    "session": m.session,
                                    "payload": payload,
                                    "encoding": encoding,
                                });
                                writeln!(out, "{v}")
                            }
                        }
                    }
                    Delivery::Event(e) => match a.format {
                        Format::Jsonl => writeln!(out, "{}", event_json(e)),
                        Format::Text => {
                            eprintln!("intergroup sub: {}", event_json(e));
                            Ok(())
                        }
                    },
                };
                if let Err(e) = r {
                    write_error.get_or_insert(e);
                }
            })
            .map_err(fail)?;
        if let Some(e) = write_error.take() {
            // A closed pipe (`| head`) ends the subscriber quietly.
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                return Ok(ExitCode::SUCCESS);
            }
            return Err(format!("stdout: {e}").into());
        }
        if n == 0 {
            idle += 1;
            if idle == 16 {
                let _ = out.flush();
            }
            if idle > 256 {
                std::thread::sleep(Duration::from_micros(200));
            } else {
                std::thread::yield_now();
            }
        } else {
            idle = 0;
        }
    }
    out.flush().map_err(|e| format!("stdout: {e}"))?;
    Ok(ExitCode::SUCCESS)
}

/// `intergroup stat`.
#[derive(Debug, Args)]
pub struct StatArgs {
    #[command(flatten)]
    dir: DirArg,
    /// Print one snapshot and exit.
    #[arg(long)]
    once: bool,
    /// JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Refresh interval in milliseconds.
    #[arg(long, default_value_t = 1000)]
    interval_ms: u64,
}

fn snapshot(cnc: &Cnc, dir: &std::path::Path) -> Value {
    let mut counters = Map::new();
    for (k, v) in cnc.counters() {
        counters.insert(k, json!(v));
    }
    json!({
        "dir": dir.display().to_string(),
        "engine_pid": cnc.pid(),
        "alive": cnc.engine_alive(),
        "heartbeat_age_ms": ipc::cnc::now_ms().saturating_sub(cnc.heartbeat_ms()),
        "counters": counters,
    })
}

pub fn stat(a: StatArgs) -> Result<ExitCode, Failure> {
    let dir = a.dir.path();
    let path = dir.join(ipc::files::CNC);
    if !path.exists() {
        return Err(fail(IpcError::NoEngine(dir.display().to_string())));
    }
    let cnc = Cnc::open(&path).map_err(fail)?;
    catch_signals();
    let tty = std::io::stdout().is_terminal();
    let mut previous: Option<(Instant, Value)> = None;
    loop {
        let snap = snapshot(&cnc, &dir);
        if a.json {
            println!("{snap}");
        } else {
            if tty && !a.once {
                print!("\x1b[2J\x1b[H");
            }
            println!(
                "engine pid {} on {}: {} (heartbeat {} ms ago)",
                snap["engine_pid"],
                dir.display(),
                if snap["alive"] == json!(true) {
                    "alive"
                } else {
                    "NOT RUNNING"
                },
                snap["heartbeat_age_ms"]
            );
            println!("{:<32} {:>16} {:>14}", "counter", "value", "per second");
            let rates = previous.as_ref().map(|(t, v)| (t.elapsed().as_secs_f64(), v));
            // In the engine's order (its own counters first), not the JSON map's.
            for (k, v) in cnc.counters() {
                let rate = rates
                    .and_then(|(dt, p)| Some(v.saturating_sub(p["counters"][&k].as_u64()?) as f64 / dt))
                    .map(|r| format!("{r:.0}"))
                    .unwrap_or_default();
                println!("{k:<32} {v:>16} {rate:>14}");
            }
        }
        let _ = std::io::stdout().flush();
        if a.once || STOP.load(Ordering::SeqCst) {
            break;
        }
        previous = Some((Instant::now(), snap));
        std::thread::sleep(Duration::from_millis(a.interval_ms.max(50)));
        if STOP.load(Ordering::SeqCst) {
            break;
        }
    }
    if cnc.engine_alive() {
        Ok(ExitCode::SUCCESS)
    } else {
        Err(format!("the engine on {} is not running", dir.display()).into())
    }
}

/// `intergroup doctor`.
#[derive(Debug, Args)]
pub struct DoctorArgs {
    #[command(flatten)]
    dir: DirArg,
    /// Interface address the engine's groups use (its `network.interface`).
    #[arg(long, default_value = "127.0.0.1")]
    interface: std::net::Ipv4Addr,
    /// JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Ok,
    Warn,
    Fail,
}

struct Check {
    name: &'static str,
    verdict: Verdict,
    detail: String,
    fix: Option<String>,
}

fn read_number(path: &str) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn check_io_uring() -> Check {
    use intergroup_engine::runtime::{BackendKind, Engine, EngineConfig};
    let disabled = read_number("/proc/sys/kernel/io_uring_disabled").unwrap_or(0);
    let cfg = EngineConfig {
        backend: BackendKind::IoUring,
        ..EngineConfig::default()
    };
    match Engine::launch(cfg) {
        Ok(e) => {
            e.close();
            Check {
                name: "io_uring",
                verdict: Verdict::Ok,
                detail: "available: the engine uses its io_uring backend".into(),
                fix: None,
            }
        }
        Err(err) => Check {
            name: "io_uring",
            verdict: Verdict::Warn,
            detail: format!("not usable ({err}); kernel.io_uring_disabled = {disabled}; the engine falls back to its portable sendmmsg/recvmmsg backend, which is slower"),
            fix: Some(if disabled > 0 {
                "sysctl -w kernel.io_uring_disabled=0 (or allow io_uring_setup in the container's seccomp profile)".into()
            } else {
                "use a kernel of 6.0 or later, and allow io_uring_setup in the container's seccomp profile".into()
            }),
        },
    }
}

fn check_multicast(interface: std::net::Ipv4Addr) -> Check {
    use intergroup_engine::transport::{open_sockets, UdpConfig};
    let port = 20_000 + (std::process::id() % 20_000) as u16;
    let cfg = UdpConfig {
        interface,
        group: std::net::SocketAddrV4::new(std::net::Ipv4Addr::new(239, 255, 250, 1), port),
        ttl: 0,
        ..UdpConfig::default()
    };
    let name = "multicast";
    let result = (|| -> std::io::Result<bool> {
        let (group, unicast) = open_sockets(&cfg)?;
        let group = group.ok_or_else(|| std::io::Error::other("no group socket"))?;
        group.set_read_timeout(Some(Duration::from_millis(300)))?;
        // TTL 0: the probe is looped back on this host and never sent on a wire.
        unicast.send_to(b"intergroup doctor", std::net::SocketAddr::V4(cfg.group))?;
        let mut buf = [0u8; 64];
        Ok(matches!(group.recv_from(&mut buf), Ok((17, _))))
    })();
    match result {
        Ok(true) => Check {
            name,
            verdict: Verdict::Ok,
            detail: format!("a datagram to {} on {interface} (TTL 0) came back", cfg.group),
            fix: None,
        },
        Ok(false) => Check {
            name,
            verdict: Verdict::Fail,
            detail: format!("a datagram to {} on {interface} did not come back within 300 ms", cfg.group),
            fix: Some(format!(
                "enable multicast on the interface of {interface} (ip link set DEV multicast on) and add a route: ip route add 224.0.0.0/4 dev DEV; or list unicast peers for the group"
            )),
        },
        Err(e) => Check {
            name,
            verdict: Verdict::Fail,
            detail: format!("cannot open multicast sockets on {interface}: {e}"),
            fix: Some(format!("check that {interface} is an address of this host (ip -4 addr)")),
        },
    }
}

fn check_shm(dir: &std::path::Path) -> Check {
    let probe = if dir.exists() {
        dir.to_path_buf()
    } else {
        dir.parent()
            .map(|p| p.to_path_buf())
            .unwrap_or_else(|| "/".into())
    };
    let c = std::ffi::CString::new(probe.as_os_str().as_encoded_bytes()).unwrap_or_default();
    // SAFETY: statvfs writes one struct into a zeroed local; `c` is a valid C string.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let r = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if r != 0 {
        return Check {
            name: "shared memory",
            verdict: Verdict::Fail,
            detail: format!(
                "cannot look at {}: {}",
                probe.display(),
                std::io::Error::last_os_error()
            ),
            fix: Some(
                "make sure /dev/shm is mounted (tmpfs) or pass --dir to a writable tmpfs directory".into(),
            ),
        };
    }
    let free = st.f_bavail as u64 * st.f_frsize as u64;
    let need = 256u64 << 20;
    Check {
        name: "shared memory",
        verdict: if free >= need { Verdict::Ok } else { Verdict::Warn },
        detail: format!("{} MiB free under {}", free >> 20, probe.display()),
        fix: (free < need).then(|| {
            "each publication takes publication_log_bytes (4 MiB) and each subscribed stream subscription_log_bytes (16 MiB): grow /dev/shm (mount -o remount,size=1G /dev/shm) or shrink them in the config".into()
        }),
    }
}

fn check_memlock() -> Check {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one struct into a live local.
    unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut rl) };
    let cur = rl.rlim_cur;
    let ok = cur == libc::RLIM_INFINITY || cur >= 8 << 20;
    let shown = if cur == libc::RLIM_INFINITY {
        "unlimited".to_string()
    } else {
        format!("{} KiB", cur >> 10)
    };
    Check {
        name: "memlock limit",
        verdict: if ok { Verdict::Ok } else { Verdict::Warn },
        detail: format!("RLIMIT_MEMLOCK {shown} (kernels before 5.12 charge io_uring rings to it)"),
        fix: (!ok)
            .then(|| "raise it: ulimit -l unlimited, or LimitMEMLOCK=infinity in the systemd unit".into()),
    }
}

fn check_socket_buffers() -> Check {
    let want = 8u64 << 20;
    let rmem = read_number("/proc/sys/net/core/rmem_max").unwrap_or(0);
    let wmem = read_number("/proc/sys/net/core/wmem_max").unwrap_or(0);
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let ok = root || (rmem >= want && wmem >= want);
    Check {
        name: "socket buffers",
        verdict: if ok { Verdict::Ok } else { Verdict::Warn },
        detail: format!(
            "net.core.rmem_max {rmem}, wmem_max {wmem}{}",
            if root { " (root: the engine forces 8 MiB buffers anyway)" } else { "" }
        ),
        fix: (!ok).then(|| {
            "bursts overflow small buffers and cost retransmissions: sysctl -w net.core.rmem_max=8388608 net.core.wmem_max=8388608".into()
        }),
    }
}

fn check_dir(dir: &std::path::Path) -> Check {
    let cnc = dir.join(ipc::files::CNC);
    match Cnc::open(&cnc) {
        Ok(c) if c.engine_alive() => Check {
            name: "engine directory",
            verdict: Verdict::Ok,
            detail: format!("{}: engine pid {} is running", dir.display(), c.pid()),
            fix: None,
        },
        Ok(c) => Check {
            name: "engine directory",
            verdict: Verdict::Ok,
            detail: format!(
                "{}: files of a stopped engine (pid {}); the next engine cleans them up",
                dir.display(),
                c.pid()
            ),
            fix: None,
        },
        Err(_) if !cnc.exists() => Check {
            name: "engine directory",
            verdict: Verdict::Ok,
            detail: format!(
                "{}: no engine running (start one with `intergroup engine`)",
                dir.display()
            ),
            fix: None,
        },
        Err(e) => Check {
            name: "engine directory",
            verdict: Verdict::Warn,
            detail: format!("{e}"),
            fix: Some(
                "stop whatever wrote it; the next `intergroup engine` replaces the directory's files".into(),
            ),
        },
    }
}

pub fn doctor(a: DoctorArgs) -> Result<ExitCode, Failure> {
    let dir = a.dir.path();
    let checks = [
        check_io_uring(),
        check_multicast(a.interface),
        check_shm(&dir),
        check_memlock(),
        check_socket_buffers(),
        check_dir(&dir),
    ];
    let failed = checks.iter().any(|c| c.verdict == Verdict::Fail);
    if a.json {
        let v: Vec<Value> = checks
            .iter()
            .map(|c| {
                json!({
                    "check": c.name,
                    "verdict": match c.verdict { Verdict::Ok => "ok", Verdict::Warn => "warn", Verdict::Fail => "fail" },
                    "detail": c.detail,
                    "fix": c.fix,
                })
            })
            .collect();
        println!("{}", json!({"ok": !failed, "checks": v}));
    } else {
        for c in &checks {
            let tag = match c.verdict {
                Verdict::Ok => "ok  ",
                Verdict::Warn => "warn",
                Verdict::Fail => "FAIL",
            };
            println!("{tag} {:<17} {}", c.name, c.detail);
            if let Some(fix) = &c.fix {
                println!("     {:<17} fix: {fix}", "");
            }
        }
    }
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}
