//! `intergroup bench`: throughput and latency over loopback, as ratios against a raw UDP
//! ceiling measured in the same invocation.
//!
//! Receivers run as child processes of this binary (`intergroup bench-child ...`, hidden): they
//! print `ready` once their sockets are open, and one JSON line with what they counted when the
//! run ends. Every payload starts with its sequence number and the send time
//! (CLOCK_MONOTONIC, the same clock in every process of the host), so receivers measure latency.

mod ipc;
mod member;
mod order;
mod raw;
mod rekey;
mod udp;

use clap::{Args, Subcommand};
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// `intergroup bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Debug, Subcommand)]
enum Mode {
    /// The ceiling: datagrams with no protocol, one sender -> K receiver processes, for each
    /// send/receive path this machine offers; the best path is named the ceiling.
    RawUdp(raw::RawArgs),
    /// An embedded publisher engine -> K subscriber engines (separate processes), reliable
    /// FIFO over loopback multicast; runs raw-udp with the same size and K for `ratio_to_raw`
    /// (every path before the engine, the best one again after it; the higher rate is the
    /// ceiling).
    Udp(udp::UdpArgs),
    /// Publisher -> subscriber through an engine's shared memory (the local path), against
    /// the minimal ring measured first in the same run.
    Ipc(ipc::IpcArgs),
    /// K senders at once in a group whose members all subscribe, with membership: delivered
    /// messages per second and latency in FIFO, then in total (or safe) order, same run.
    Order(order::OrderArgs),
    /// MLS key agreement in a group of N (in-process, full ratchet tree): time and bytes to
    /// remove, add and self-update one member.
    Rekey(rekey::RekeyArgs),
}

/// Runs a bench mode.
pub fn run(args: BenchArgs) -> Result<ExitCode, String> {
    match args.mode {
        Mode::RawUdp(a) => raw::run(a),
        Mode::Udp(a) => udp::run(a),
        Mode::Ipc(a) => ipc::run(a),
        Mode::Order(a) => order::run(a),
        Mode::Rekey(a) => rekey::run(a),
    }
}

/// `intergroup bench-child`: the receiving side of a bench, run by the bench itself.
#[derive(Debug, Args)]
pub struct ChildArgs {
    #[command(subcommand)]
    role: ChildRole,
}

#[derive(Debug, Subcommand)]
enum ChildRole {
    /// Counts raw datagrams.
    RawRx(raw::RawRxArgs),
    /// Echoes raw datagrams (ping-pong).
    RawPong(raw::RawPongArgs),
    /// A subscriber engine.
    UdpSub(udp::SubArgs),
    /// An engine that echoes each message (ping-pong).
    UdpPong(udp::PongArgs),
    /// One member of an end-to-end exchange (the end-to-end tests run these).
    Member(member::MemberArgs),
}

/// Runs a child role.
pub fn run_child(args: ChildArgs) -> Result<ExitCode, String> {
    match args.role {
        ChildRole::RawRx(a) => raw::rx(a),
        ChildRole::RawPong(a) => raw::pong(a),
        ChildRole::UdpSub(a) => udp::sub(a),
        ChildRole::UdpPong(a) => udp::pong(a),
        ChildRole::Member(a) => member::member(a),
    }
}

/// The cores this process may run on.
fn usable_cores() -> Vec<usize> {
    core_affinity::get_core_ids()
        .unwrap_or_default()
        .into_iter()
        .map(|c| c.id)
        .collect()
}

/// The core the publishing side of a throughput bench runs on by default: the first one this
/// process may use, when it may use two or more (on one core there is nothing to place).
pub fn default_publisher_core() -> Option<usize> {
    let cores = usable_cores();
    (cores.len() >= 2).then(|| cores[0])
}

/// Checks that `core` is one this process may run on.
pub fn check_core(core: Option<usize>) -> Result<Option<usize>, String> {
    let Some(core) = core else { return Ok(None) };
    let cores = usable_cores();
    if cores.contains(&core) {
        Ok(Some(core))
    } else {
        Err(format!(
            "core {core} is not one this process may run on (it may use {cores:?})"
        ))
    }
}

/// Runs `f` on a thread of its own pinned to `core`, or here when `core` is `None`: the
/// pinning ends with `f`, and processes spawned before or after keep this thread's cores.
pub fn on_core<T: Send>(core: Option<usize>, f: impl FnOnce() -> T + Send) -> Result<T, String> {
    let Some(id) = core else { return Ok(f()) };
    std::thread::scope(|s| {
        s.spawn(|| {
            if core_affinity::set_for_current(core_affinity::CoreId { id }) {
                Ok(f())
            } else {
                Err(format!("could not pin a thread to core {id}"))
            }
        })
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// Nanoseconds of CLOCK_MONOTONIC: comparable between processes of this host.
pub fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes one timespec into a live local.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Writes the bench header (sequence, send time) at the start of `buf`.
pub fn stamp(buf: &mut [u8], seq: u64) {
    buf[..8].copy_from_slice(&seq.to_le_bytes());
    buf[8..16].copy_from_slice(&mono_ns().to_le_bytes());
}

/// The bench header of a payload: (sequence, send time), when it has one.
pub fn header(bytes: &[u8]) -> Option<(u64, u64)> {
    if bytes.len() < 16 {
        return None;
    }
    let seq = u64::from_le_bytes(bytes[..8].try_into().ok()?);
    let ts = u64::from_le_bytes(bytes[8..16].try_into().ok()?);
    Some((seq, ts))
}

/// Smallest payload the benches send: the header.
pub const MIN_SIZE: usize = 16;

/// A latency histogram in nanoseconds (1 ns to 100 s, 3 significant digits).
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 100_000_000_000, 3).expect("valid bounds")
}

/// Records `now - sent` into `h`.
pub fn record_since(h: &mut Histogram<u64>, sent_ns: u64, now_ns: u64) {
    let _ = h.record(now_ns.saturating_sub(sent_ns).clamp(1, 100_000_000_000));
}

/// A histogram as JSON pairs `[value, count]` of its recorded buckets, to cross processes.
pub fn histogram_to_json(h: &Histogram<u64>) -> Value {
    Value::Array(
        h.iter_recorded()
            .map(|v| json!([v.value_iterated_to(), v.count_at_value()]))
            .collect(),
    )
}

/// Adds the pairs of [`histogram_to_json`] into `h`.
pub fn merge_json(h: &mut Histogram<u64>, v: &Value) {
    for pair in v.as_array().into_iter().flatten() {
        if let (Some(value), Some(count)) = (pair[0].as_u64(), pair[1].as_u64()) {
            let _ = h.record_n(value.clamp(1, 100_000_000_000), count);
        }
    }
}

/// Latency percentiles in microseconds, as the report's fields.
pub fn percentiles(h: &Histogram<u64>) -> Value {
    let us = |q: f64| {
        if h.is_empty() {
            0.0
        } else {
            (h.value_at_quantile(q) as f64 / 1000.0 * 10.0).round() / 10.0
        }
    };
    json!({
        "p50": us(0.50),
        "p90": us(0.90),
        "p99": us(0.99),
        "p999": us(0.999),
        "max": if h.is_empty() { 0.0 } else { (h.max() as f64 / 100.0).round() / 10.0 },
    })
}

/// A child process of this binary, talking over stdin/stdout lines.
pub struct ChildProc {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl ChildProc {
    /// Starts `intergroup bench-child <args>` and waits for its `ready` line.
    pub fn spawn(args: &[String]) -> Result<Self, String> {
        Self::spawn_with_env(args, &[])
    }

    /// [`ChildProc::spawn`] with environment variables added (secrets go there, not in the
    /// command line).
    pub fn spawn_with_env(args: &[String], env: &[(&str, String)]) -> Result<Self, String> {
        let exe = std::env::current_exe().map_err(|e| format!("own executable: {e}"))?;
        let mut child = Command::new(exe)
            .arg("bench-child")
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("starting a bench child: {e}"))?;
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut me = Self { child, stdin, stdout };
        let line = me.line()?;
        if line.trim() != "ready" {
            return Err(format!("bench child did not start: {line}"));
        }
        Ok(me)
    }

    /// Reads one line from the child.
    pub fn line(&mut self) -> Result<String, String> {
        let mut line = String::new();
        match self.stdout.read_line(&mut line) {
            Ok(0) => Err("bench child exited early (see its message above)".into()),
            Ok(_) => Ok(line),
            Err(e) => Err(format!("reading a bench child: {e}")),
        }
    }

    /// Closes the child's stdin (its signal to stop) and reads its JSON result.
    pub fn finish(mut self) -> Result<Value, String> {
        drop(self.stdin.take());
        let line = self.line()?;
        let _ = self.child.wait();
        serde_json::from_str(&line).map_err(|e| format!("bench child result {line:?}: {e}"))
    }
}

impl Drop for ChildProc {
    fn drop(&mut self) {
        drop(self.stdin.take());
        // A child that has not finished within a moment is stopped; it is ours, by PID.
        for _ in 0..100 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// In a child: a flag that turns true when the parent closes our stdin (or dies).
pub fn stop_on_stdin_eof() -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    std::thread::spawn(move || {
        let mut sink = String::new();
        while std::io::stdin()
            .read_line(&mut sink)
            .map(|n| n > 0)
            .unwrap_or(false)
        {
            sink.clear();
        }
        s.store(true, Ordering::SeqCst);
    });
    stop
}

/// In a child: prints a line to the parent at once.
pub fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// A progress bar over `seconds` on a terminal; hidden under `--json` or when not a tty.
pub fn progress(label: &str, seconds: f64, json: bool) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if json || !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new((seconds * 10.0).ceil() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{prefix:>24} [{bar:30}] {elapsed}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix(label.to_string());
    bar
}

/// Ticks `bar` to the share of `seconds` since `start`.
pub fn tick(bar: &indicatif::ProgressBar, start: Instant) {
    bar.set_position((start.elapsed().as_secs_f64() * 10.0) as u64);
}

/// A multicast port for this run: distinct per process so runs at once do not meet.
pub fn default_port() -> u16 {
    41_000 + (std::process::id() % 2000) as u16 * 4
}

/// Median of `v` (upper median for an even count); 0 for none.
pub fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// The whole host's CPU time as `/proc/stat` counts it (every CPU, in clock ticks), read at the
/// start and end of a phase. On a virtual machine the hypervisor's share (`steal`) tells
/// whether a phase ran on the whole machine: a raw phase and an engine phase compared in one
/// ratio should both have run with little of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostCpu {
    total: u64,
    idle: u64,
    steal: u64,
}

impl HostCpu {
    /// Now; `None` where `/proc/stat` is missing or not understood.
    pub fn now() -> Option<Self> {
        Self::parse(&std::fs::read_to_string("/proc/stat").ok()?)
    }

    /// The aggregate `cpu` line of a `/proc/stat` text: user, nice, system, idle, iowait, irq,
    /// softirq and steal (guest time is already inside user and nice).
    fn parse(stat: &str) -> Option<Self> {
        let line = stat
            .lines()
            .find(|l| l.split_whitespace().next() == Some("cpu"))?;
        let mut fields = line.split_whitespace().skip(1).map(|f| f.parse::<u64>());
        let mut next = || fields.next().and_then(Result::ok);
        let (user, nice, system, idle, iowait) = (next()?, next()?, next()?, next()?, next()?);
        let (irq, softirq, steal) = (next().unwrap_or(0), next().unwrap_or(0), next().unwrap_or(0));
        let total = [user, nice, system, idle, iowait, irq, softirq, steal]
            .iter()
            .try_fold(0u64, |sum, &f| sum.checked_add(f))?;
        Some(Self {
            total,
            // A thread asleep in io_uring counts as iowait: idle all the same.
            idle: idle.checked_add(iowait)?,
            steal,
        })
    }

    /// The host's CPU between `earlier` and `later` as `{steal_pct, idle_pct}` of all CPU time
    /// (null fields when either reading is missing or no tick passed).
    pub fn json(earlier: Option<Self>, later: Option<Self>) -> Value {
        let share = |part: fn(&Self) -> u64| -> Option<f64> {
            let (a, b) = (earlier?, later?);
            let total = b.total.checked_sub(a.total).filter(|&t| t > 0)?;
            let part = part(&b).checked_sub(part(&a))?;
            Some((part as f64 * 1000.0 / total as f64).round() / 10.0)
        };
        json!({ "steal_pct": share(|c| c.steal), "idle_pct": share(|c| c.idle) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_cpu_shares_come_from_the_aggregate_line() {
        let a = HostCpu::parse("cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 1 2 3 4 5 6 7 8\n").unwrap();
        let b = HostCpu::parse("cpu  300 0 150 1000 100 0 0 250 0 0\n").unwrap();
        let v = HostCpu::json(Some(a), Some(b));
        // 800 ticks passed: 250 stolen, 250 idle or in iowait.
        assert_eq!(v["steal_pct"], json!(31.3));
        assert_eq!(v["idle_pct"], json!(31.3));
        assert_eq!(HostCpu::json(None, Some(b))["steal_pct"], Value::Null);
        assert_eq!(HostCpu::json(Some(a), Some(a))["idle_pct"], Value::Null);
    }

    #[test]
    fn host_cpu_refuses_what_it_does_not_understand() {
        assert_eq!(HostCpu::parse(""), None);
        assert_eq!(HostCpu::parse("cpu0 1 2 3 4 5\n"), None);
        assert_eq!(HostCpu::parse("cpu 1 2 x 4 5\n"), None);
        assert_eq!(HostCpu::parse("cpu 1 2 3\n"), None);
        let max = u64::MAX;
        assert_eq!(HostCpu::parse(&format!("cpu {max} {max} 0 0 0\n")), None);
        // Old kernels have no steal column.
        assert!(HostCpu::parse("cpu 1 2 3 4 5\n").is_some());
    }
}
