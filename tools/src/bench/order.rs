//! `intergroup bench order`: K senders at once in a group of members that all subscribe, over
//! loopback multicast; delivered messages per second at each member and send-to-delivery
//! latency, in FIFO and then in total (or safe) order in the same run.

use super::{histogram, mono_ns, percentiles, progress, record_since, tick};
use clap::Args;
use intergroup_engine::group::udp::UdpGroupMember;
use intergroup_engine::group::{GroupConfig, GroupMember, GroupOutput, Order};
use intergroup_engine::transport::UdpConfig;
use serde_json::{json, Value};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

/// Options of `intergroup bench order`.
#[derive(Debug, Args)]
pub struct OrderArgs {
    /// Members that send at once (each also subscribes).
    #[arg(long, default_value_t = 3)]
    senders: usize,
    /// Members in the group (at least --senders); the others only subscribe.
    #[arg(long)]
    members: Option<usize>,
    /// Bytes per message (at least 16).
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Seconds each phase publishes.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// The ordered phase: total or safe (FIFO runs first for comparison).
    #[arg(long, default_value = "total")]
    order: Order,
    /// Messages per second per sender (0: as fast as flow control allows).
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Multicast port of the first phase (the second uses the next one).
    #[arg(long)]
    port: Option<u16>,
    /// One JSON object instead of the table.
    #[arg(long)]
    json: bool,
}

/// What one member counted in one phase.
struct MemberResult {
    delivered: u64,
    hist: hdrhistogram::Histogram<u64>,
    views: u64,
}

fn phase(a: &OrderArgs, members: usize, order: Order, port: u16) -> Result<Value, String> {
    let group = SocketAddrV4::new(Ipv4Addr::new(239, 255, 92, 1), port);
    let epoch = Instant::now();
    let ready = Arc::new(AtomicUsize::new(0));
    let go = Arc::new(Barrier::new(members + 1));
    let stop = Arc::new(AtomicBool::new(false));
    let measuring = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::new();
    for i in 0..members {
        let mut cfg = GroupConfig {
            sender: i < a.senders,
            orders: vec![order],
            join_timeout_ns: 300_000_000,
            initial_members: members,
            ..GroupConfig::default()
        };
        cfg.member.member_id = i as u32 + 1;
        cfg.member.group = intergroup_engine::ipc::group_id(&group.to_string());
        let member = GroupMember::new(cfg, i as u64 + 1).map_err(|e| e.to_string())?;
        let udp = UdpConfig {
            group,
            ..UdpConfig::default()
        };
        let mut node = UdpGroupMember::new(member, &udp, None, epoch).map_err(|e| format!("sockets: {e}"))?;
        let (ready, go, stop, measuring) = (ready.clone(), go.clone(), stop.clone(), measuring.clone());
        let (size, rate, sender) = (a.size, a.rate, i < a.senders);
        let senders = a.senders;
        handles.push(std::thread::spawn(move || -> Result<MemberResult, String> {
            let mut r = MemberResult {
                delivered: 0,
                hist: histogram(),
                views: 0,
            };
            let mut counted = false;
            // Form the group: every member in one view with every sender.
            loop {
                node.turn(Duration::from_millis(2), |_, _| {})
                    .map_err(|e| e.to_string())?;
                let full = node
                    .member()
                    .view()
                    .is_some_and(|v| v.primary && v.members.len() == members && v.senders.len() == senders);
                if full && !counted {
                    counted = true;
                    ready.fetch_add(1, Ordering::SeqCst);
                }
                if ready.load(Ordering::SeqCst) == members || stop.load(Ordering::SeqCst) {
                    break;
                }
            }
            go.wait();
            let start = Instant::now();
            let mut payload = vec![0u8; size];
            let mut seq = 0u64;
            while !stop.load(Ordering::Relaxed) {
                // Threads sleep in the socket wait whenever they have nothing to send: on a
                // machine with fewer cores than members, a spinning thread would keep another
                // member off the CPU for a whole time slice.
                let mut wait = Duration::from_millis(1);
                if sender && measuring.load(Ordering::Relaxed) {
                    let due = if rate == 0 {
                        u64::MAX
                    } else {
                        (start.elapsed().as_secs_f64() * rate as f64) as u64
                    };
                    let mut pushed_back = false;
                    while seq < due {
                        payload[..8].copy_from_slice(&seq.to_le_bytes());
                        payload[8..16].copy_from_slice(&mono_ns().to_le_bytes());
                        if node.publish(1, &payload).is_err() {
                            pushed_back = true;
                            break;
                        }
                        seq += 1;
                    }
                    wait = if rate == 0 {
                        if pushed_back {
                            Duration::from_micros(100)
                        } else {
                            Duration::ZERO
                        }
                    } else {
                        // Until the next message is due.
                        let next = Duration::from_secs_f64((seq + 1) as f64 / rate as f64);
                        next.saturating_sub(start.elapsed()).min(Duration::from_millis(1))
                    };
                }
                let on = measuring.load(Ordering::Relaxed);
                node.turn(wait, |_, o| match o {
                    GroupOutput::Message(m) if on => {
                        r.delivered += 1;
                        if m.payload.len() >= 16 {
                            let sent = u64::from_le_bytes(m.payload[8..16].try_into().expect("8 bytes"));
                            record_since(&mut r.hist, sent, mono_ns());
                        }
                    }
                    GroupOutput::Message(_) => {}
                    GroupOutput::Event(_) => r.views += 1,
                })
                .map_err(|e| e.to_string())?;
            }
            Ok(r)
        }));
    }
    // Wait for the group to form, then measure for the duration.
    let formed_by = Instant::now() + Duration::from_secs(10);
    while ready.load(Ordering::SeqCst) < members && Instant::now() < formed_by {
        std::thread::sleep(Duration::from_millis(5));
    }
    let formed = ready.load(Ordering::SeqCst) == members;
    if !formed {
        stop.store(true, Ordering::SeqCst);
        ready.store(members, Ordering::SeqCst);
    }
    go.wait();
    let bar = progress(&format!("bench order ({})", order.name()), a.duration, a.json);
    let start = Instant::now();
    if formed {
        measuring.store(true, Ordering::SeqCst);
        while start.elapsed().as_secs_f64() < a.duration {
            tick(&bar, start);
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    measuring.store(false, Ordering::SeqCst);
    let elapsed = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::SeqCst);
    bar.finish_and_clear();
    let mut per_member = Vec::new();
    let mut all = histogram();
    let mut view_changes = 0;
    for h in handles {
        let r = h.join().map_err(|_| "a member thread panicked".to_string())??;

        per_member.push(r.delivered as f64 / elapsed);
        all.add(&r.hist).map_err(|e| e.to_string())?;
        // One view event per member is the group forming.
        view_changes += r.views.saturating_sub(1);
    }
    if !formed {
        return Err(format!(
            "the {members} members did not form one group within 10 s"
        ));
    }
    let min = per_member.iter().copied().fold(f64::INFINITY, f64::min);
    let mut v = json!({
        "order": order.name(),
        "msgs_per_sec": min.round(),
        "msgs_per_sec_per_member": per_member.iter().map(|x| x.round()).collect::<Vec<_>>(),
        "mb_per_sec": (min * a.size as f64 / 1e6 * 10.0).round() / 10.0,
        "view_changes": view_changes,
    });
    if let (Some(obj), Value::Object(p)) = (v.as_object_mut(), percentiles(&all)) {
        obj.extend(p);
    }
    Ok(v)
}

/// Runs the bench: the FIFO phase, then the ordered phase.
pub fn run(a: OrderArgs) -> Result<ExitCode, String> {
    let members = a.members.unwrap_or(a.senders);
    if a.senders == 0 || members < a.senders {
        return Err("need at least one sender and --members >= --senders".into());
    }
    if a.size < 16 {
        return Err("--size must be at least 16".into());
    }
    if a.order == Order::Fifo {
        return Err("--order is the ordered phase: total or safe (FIFO always runs first)".into());
    }
    let port = a.port.unwrap_or_else(super::default_port);
    let fifo = phase(&a, members, Order::Fifo, port)?;
    let ordered = phase(&a, members, a.order, port.wrapping_add(1))?;
    let ratio = ordered["msgs_per_sec"].as_f64().unwrap_or(0.0)
        / fifo["msgs_per_sec"].as_f64().unwrap_or(1.0).max(1.0);
    let report = json!({
        "mode": "order",
        "senders": a.senders,
        "members": members,
        "size": a.size,
        "duration": a.duration,
        "order": a.order.name(),
        "msgs_per_sec": ordered["msgs_per_sec"],
        "p50": ordered["p50"], "p90": ordered["p90"], "p99": ordered["p99"], "p999": ordered["p999"], "max": ordered["max"],
        "ratio_to_fifo": (ratio * 1000.0).round() / 1000.0,
        "fifo": fifo,
        "ordered": ordered,
    });
    if a.json {
        println!("{report}");
    } else {
        println!(
            "intergroup bench order: {} senders, {} members, {} B, {} s per phase, loopback multicast",
            a.senders, members, a.size, a.duration
        );
        println!(
            "  {:<8} {:>14} {:>10} {:>10} {:>10} {:>10}",
            "order", "msgs/s (min)", "p50 us", "p99 us", "p999 us", "max us"
        );
        for r in [&report["fifo"], &report["ordered"]] {
            println!(
                "  {:<8} {:>14} {:>10} {:>10} {:>10} {:>10}",
                r["order"].as_str().unwrap_or(""),
                r["msgs_per_sec"],
                r["p50"],
                r["p99"],
                r["p999"],
                r["max"]
            );
        }
        println!(
            "  {} / fifo throughput: {}",
            a.order.name(),
            report["ratio_to_fifo"]
        );
    }
    Ok(ExitCode::SUCCESS)
}
