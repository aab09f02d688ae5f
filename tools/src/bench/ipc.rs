//! `intergroup bench ipc`: publisher -> subscriber through an engine's shared memory (the
//! local path), against the minimal ring measured first in the same run.

use super::{histogram, mono_ns, percentiles, progress, record_since, tick};
use clap::Args;
use hdrhistogram::Histogram;
use intergroup_engine::ipc::{Client, Delivery, Driver, DriverConfig, OfferError, Order};
use intergroup_ring::baseline::SlotRing;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One message in this many carries its send time (reading the clock for every message would
/// cost more than the path being measured).
const SAMPLE_EVERY: u64 = 4096;

/// `intergroup bench ipc`.
#[derive(Debug, Args)]
pub struct IpcArgs {
    /// Message size in bytes (at least 16: sequence and send time).
    #[arg(long, default_value_t = 32)]
    size: usize,
    /// Seconds of the engine run (the ring baseline runs as long before it).
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// One JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Use the engine running on DIR instead of an embedded one.
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Bytes of the embedded engine's publication log (the baseline ring is 1 MiB too).
    #[arg(long, default_value_t = 1 << 20)]
    log_bytes: u64,
    /// Measure the minimal ring first (false skips it, and the ratio, for profiling).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    baseline: bool,
}

/// Waits the way the ring benches (criterion) do when there is nothing to read or no room:
/// 512 pauses, then a yield. Polling again at once would keep pulling the lines the other
/// side is writing.
fn backoff() {
    for _ in 0..512 {
        std::hint::spin_loop();
    }
    std::thread::yield_now();
}

/// The minimal ring: one thread pushes `size`-byte records for `duration`, one pops them.
fn ring_baseline(size: usize, duration: Duration) -> f64 {
    // 1 MiB of slots, as in the criterion baseline.
    let slots = ((1usize << 20) / size + 1).next_power_of_two() / 2;
    let ring = SlotRing::new(slots.max(2), size);
    let stop = Arc::new(AtomicBool::new(false));
    let (r, s) = (ring.clone(), stop.clone());
    let consumer = std::thread::spawn(move || {
        let (mut cached, mut got) = (0usize, 0u64);
        loop {
            let n = r.pop_batch(4096, &mut cached, |rec| {
                std::hint::black_box(rec);
            });
            got += n as u64;
            if n == 0 {
                if s.load(Ordering::Relaxed) {
                    return got;
                }
                backoff();
            }
        }
    });
    let record = vec![7u8; size];
    let (mut cached, mut sent) = (0usize, 0u64);
    let start = Instant::now();
    while start.elapsed() < duration {
        for _ in 0..1024 {
            if ring.push(&record, &mut cached) {
                sent += 1;
            } else {
                backoff();
            }
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let got = consumer.join().unwrap_or(0);
    got.min(sent) as f64 / elapsed
}

struct Received {
    count: u64,
    out_of_order: u64,
    latency: Histogram<u64>,
}

pub fn run(a: IpcArgs) -> Result<ExitCode, String> {
    if a.size < 16 {
        return Err("--size must be at least 16 (sequence and send time)".into());
    }
    if !(a.duration > 0.0 && a.duration.is_finite()) {
        return Err("--duration must be a positive number of seconds".into());
    }
    let duration = Duration::from_secs_f64(a.duration);
    let bar = progress("ring baseline", a.duration, a.json);
    let baseline = if a.baseline {
        ring_baseline(a.size, duration)
    } else {
        0.0
    };
    bar.finish_and_clear();

    // The engine: the one on --dir, or one embedded in this process on a private directory.
    let (driver, dir, engine) = match &a.dir {
        Some(d) => (None, d.clone(), "daemon"),
        None => {
            let dir = intergroup_engine::ipc::default_dir()
                .with_file_name(format!("intergroup-bench-ipc-{}", std::process::id()));
            let cfg = DriverConfig {
                publication_log_bytes: a.log_bytes,
                ..DriverConfig::default()
            };
            let d = Driver::start(&dir, cfg).map_err(|e| format!("embedded engine: {e}"))?;
            (Some(d), dir, "embedded")
        }
    };
    let client = Client::connect(&dir).map_err(|e| e.to_string())?;
    let group = format!("bench-ipc-{}", std::process::id());
    let mut subscription = client
        .subscription(&group, 1, Order::Fifo)
        .map_err(|e| e.to_string())?;
    let mut publication = client.publication(&group, 1).map_err(|e| e.to_string())?;
    if a.size > publication.max_message() {
        return Err(format!(
            "--size exceeds the publication's maximum of {}",
            publication.max_message()
        ));
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while !publication.is_connected() {
        subscription.poll(16, |_| {}).map_err(|e| e.to_string())?;
        if Instant::now() > deadline {
            return Err("the subscription never joined the publication".into());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let published = Arc::new(AtomicU64::new(u64::MAX));
    let target = published.clone();
    let subscriber = std::thread::spawn(move || -> Result<Received, String> {
        let mut r = Received {
            count: 0,
            out_of_order: 0,
            latency: histogram(),
        };
        let mut last_progress = Instant::now();
        while r.count < target.load(Ordering::Relaxed) {
            let n = subscription
                .poll(4096, |d| {
                    if let Delivery::Message(m) = d {
                        let p = m.payload;
                        let seq = u64::from_le_bytes(p[..8].try_into().unwrap_or_default());
                        if seq != r.count {
                            r.out_of_order += 1;
                        }
                        let sent = u64::from_le_bytes(p[8..16].try_into().unwrap_or_default());
                        if sent != 0 {
                            record_since(&mut r.latency, sent, mono_ns());
                        }
                        r.count += 1;
                    }
                })
                .map_err(|e| e.to_string())?;
            if n == 0 {
                if last_progress.elapsed() > Duration::from_secs(5) {
                    break;
                }
                backoff();
            } else {
                last_progress = Instant::now();
            }
        }
        Ok(r)
    });
    let bar = progress("engine ipc", a.duration, a.json);
    let mut sent = 0u64;
    let start = Instant::now();
    'run: while start.elapsed() < duration {
        tick(&bar, start);
        for _ in 0..1024 {
            // Written in place (zero copy): a message assembled in a buffer and copied would
            // stall on store forwarding (8-byte stores read back by a wide load), a cost of the
            // bench, not of the path.
            match publication.try_claim(a.size) {
                Ok(mut claim) => {
                    let buf = claim.buf();
                    let stamp = if sent % SAMPLE_EVERY == 0 { mono_ns() } else { 0 };
                    buf[..8].copy_from_slice(&sent.to_le_bytes());
                    buf[8..16].copy_from_slice(&stamp.to_le_bytes());
                    // The rest: words that differ (a constant fill becomes a call to memset).
                    let mut rest = buf[16..].chunks_exact_mut(8);
                    for (i, w) in (&mut rest).enumerate() {
                        w.copy_from_slice(&(sent ^ i as u64).to_le_bytes());
                    }
                    for b in rest.into_remainder() {
                        *b = 7;
                    }
                    claim.commit();
                    sent += 1;
                }
                Err(OfferError::BackPressured) => backoff(),
                Err(e) => {
                    eprintln!("intergroup bench ipc: offer failed: {e}");
                    break 'run;
                }
            }
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    bar.finish_and_clear();
    published.store(sent, Ordering::Relaxed);
    let received = subscriber
        .join()
        .map_err(|_| "the subscriber panicked".to_string())??;
    drop(publication);
    drop(client);
    if let Some(d) = driver {
        d.close();
    }
    let msgs_per_sec = sent as f64 / elapsed;
    let lost = sent.saturating_sub(received.count);
    let mut report = json!({
        "mode": "ipc",
        "engine": engine,
        "size": a.size,
        "duration": a.duration,
        "log_bytes": a.log_bytes,
        "messages": sent,
        "msgs_per_sec": msgs_per_sec.round(),
        "mb_per_sec": (msgs_per_sec * a.size as f64 / 1e6 * 10.0).round() / 10.0,
        "lost": lost,
        "out_of_order": received.out_of_order,
        "ring_baseline_msgs_per_sec": baseline.round(),
        "ratio_to_ring": if baseline > 0.0 { (msgs_per_sec / baseline * 1000.0).round() / 1000.0 } else { 0.0 },
        "latency_sampled_every": SAMPLE_EVERY,
    });
    if let (Some(o), Value::Object(p)) = (report.as_object_mut(), percentiles(&received.latency)) {
        o.extend(p);
    }
    if a.json {
        println!("{report}");
    } else {
        print_table(&report);
    }
    Ok(if lost == 0 && received.out_of_order == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn print_table(r: &Value) {
    println!(
        "intergroup bench ipc: {} B messages, publisher -> subscriber through shared memory ({} engine), {} s",
        r["size"],
        r["engine"].as_str().unwrap_or(""),
        r["duration"]
    );
    println!();
    println!("{:<34} {:>14} {:>10}", "", "messages/s", "MB/s");
    let ring = r["ring_baseline_msgs_per_sec"].as_f64().unwrap_or(0.0);
    println!(
        "{:<34} {:>14.0} {:>10.1}",
        "minimal ring (the ceiling)",
        ring,
        ring * r["size"].as_f64().unwrap_or(0.0) / 1e6
    );
    println!(
        "{:<34} {:>14.0} {:>10.1}",
        "engine: publication -> subscription",
        r["msgs_per_sec"].as_f64().unwrap_or(0.0),
        r["mb_per_sec"].as_f64().unwrap_or(0.0)
    );
    println!();
    println!("ratio to the ring:  {}", r["ratio_to_ring"]);
    println!(
        "latency (us, 1 in {} messages, under full load): p50 {}  p90 {}  p99 {}  p99.9 {}  max {}",
        r["latency_sampled_every"], r["p50"], r["p90"], r["p99"], r["p999"], r["max"]
    );
    println!("lost: {}   out of order: {}", r["lost"], r["out_of_order"]);
}
