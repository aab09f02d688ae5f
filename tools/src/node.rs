//! `intergroup node`: one group member (membership, views, ordered delivery) over UDP, as a
//! process. It publishes `--send` messages and prints what it delivers in `--order` as JSON
//! lines; the real-process tests kill, partition and compare these.

use crate::bench::mono_ns;
use clap::Args;
use intergroup_engine::group::udp::UdpGroupMember;
use intergroup_engine::group::{GroupConfig, GroupEvent, GroupMember, GroupOutput, Order};
use intergroup_engine::transport::{ReceiveLoss, UdpConfig};
use serde_json::json;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// Options of `intergroup node`.
#[derive(Debug, Args)]
pub struct NodeArgs {
    /// This member's id (1 or more), unique in the group.
    #[arg(long)]
    id: u32,
    /// The group's multicast address and port.
    #[arg(long, default_value = "239.255.90.1:40400")]
    group: SocketAddrV4,
    /// Interface address for multicast (traffic stays on this host with the default).
    #[arg(long, default_value = "127.0.0.1")]
    interface: Ipv4Addr,
    /// Multicast TTL: 0 keeps it on the host; use 1 inside your own network namespaces.
    #[arg(long, default_value_t = 0)]
    ttl: u32,
    /// Messages to publish (0: a receiver only).
    #[arg(long, default_value_t = 0)]
    send: u64,
    /// Messages per second to publish (0: as fast as flow control allows).
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// Bytes per message (at least 16: message number and send time).
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// The delivery order printed: fifo, total or safe.
    #[arg(long, default_value = "total")]
    order: Order,
    /// Where to write the JSON lines (`-`: stdout).
    #[arg(long, default_value = "-")]
    jsonl: String,
    /// Seconds to run before exiting.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Leave the group gracefully after this many seconds.
    #[arg(long)]
    leave_after: Option<f64>,
    /// The first view is primary only with at least this many members (a majority of the
    /// group you expect, so a partition at start-up cannot make two primaries).
    #[arg(long, default_value_t = 1)]
    initial_members: usize,
    /// Milliseconds of silence before a member is suspected.
    #[arg(long, default_value_t = 1000)]
    fail_timeout_ms: u64,
    /// Milliseconds a new member listens for a group before forming one.
    #[arg(long, default_value_t = 500)]
    join_timeout_ms: u64,
    /// Drop this share of received datagrams on purpose (seeded by --seed).
    #[arg(long, default_value_t = 0.0)]
    loss: f64,
    /// Seed of the loss decorator and the NAK back-off.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

/// Runs the node; exit code 0 at the end of `--duration`.
pub fn run(a: NodeArgs) -> Result<ExitCode, String> {
    if a.id == 0 {
        return Err("--id must be 1 or more".into());
    }
    if a.size < 16 {
        return Err("--size must be at least 16".into());
    }
    if !(0.0..1.0).contains(&a.loss) {
        return Err("--loss must be in [0, 1)".into());
    }
    let mut cfg = GroupConfig {
        sender: a.send > 0,
        orders: vec![a.order],
        initial_members: a.initial_members,
        fail_timeout_ns: a.fail_timeout_ms * 1_000_000,
        join_timeout_ns: a.join_timeout_ms * 1_000_000,
        hello_interval_ns: (a.fail_timeout_ms * 1_000_000 / 10).max(1_000_000),
        flush_timeout_ns: 2 * a.fail_timeout_ms * 1_000_000,
        ..GroupConfig::default()
    };
    cfg.member.member_id = a.id;
    // The group id is named after its address, as the engine daemon names groups.
    cfg.member.group = intergroup_engine::ipc::group_id(&a.group.to_string());
    let member = GroupMember::new(cfg, a.seed).map_err(|e| e.to_string())?;
    let udp = UdpConfig {
        interface: a.interface,
        group: a.group,
        ttl: a.ttl,
        ..UdpConfig::default()
    };
    let loss = (a.loss > 0.0).then(|| ReceiveLoss::new(a.loss, a.seed));
    let mut node =
        UdpGroupMember::new(member, &udp, loss, Instant::now()).map_err(|e| format!("sockets: {e}"))?;
    let mut out: Box<dyn Write> = if a.jsonl == "-" {
        Box::new(std::io::stdout())
    } else {
        Box::new(std::fs::File::create(&a.jsonl).map_err(|e| format!("{}: {e}", a.jsonl))?)
    };
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(a.duration.max(0.0));
    let leave_at = a.leave_after.map(|s| start + Duration::from_secs_f64(s.max(0.0)));
    let mut payload = vec![0u8; a.size];
    let mut sent = 0u64;
    let mut lines = Vec::new();
    let mut failed = None;
    while Instant::now() < end && !node.member().has_left() {
        if leave_at.is_some_and(|t| Instant::now() >= t) && !node.member().has_left() {
            node.member_mut().leave();
        }
        // Publish what the rate allows by now.
        let due = if a.rate == 0 {
            a.send
        } else {
            (start.elapsed().as_secs_f64() * a.rate as f64) as u64
        };
        while sent < a.send.min(due) && leave_at.is_none_or(|t| Instant::now() < t) {
            payload[..8].copy_from_slice(&sent.to_le_bytes());
            payload[8..16].copy_from_slice(&mono_ns().to_le_bytes());
            match node.publish(1, &payload) {
                Ok(()) => sent += 1,
                Err(_) => break,
            }
        }
        let wait = if sent < a.send {
            Duration::from_micros(200)
        } else {
            Duration::from_millis(5)
        };
        node.turn(wait, |_, o| lines.push(line(&o)))
            .map_err(|e| format!("sockets: {e}"))?;
        for l in lines.drain(..) {
            match l {
                Ok(v) => writeln!(out, "{v}").map_err(|e| format!("writing: {e}"))?,
                Err(e) => failed = Some(e),
            }
        }
        out.flush().map_err(|e| format!("writing: {e}"))?;
    }
    let s = node.member().stats();
    eprintln!(
        "node {}: view {:?}, sent {sent}, views installed {}, non-primary {}, relays {}, malformed control frames {}",
        a.id,
        node.member().view().map(|v| v.id),
        s.views_installed,
        s.non_primary_views,
        s.relays_sent,
        s.control_malformed
    );
    match failed {
        Some(e) => Err(e),
        None => Ok(ExitCode::SUCCESS),
    }
}

fn line(o: &GroupOutput) -> Result<serde_json::Value, String> {
    Ok(match o {
        GroupOutput::Message(m) => {
            if m.payload.len() < 16 {
                return Err(format!(
                    "a message of {} bytes from {}: too short",
                    m.payload.len(),
                    m.sender
                ));
            }
            let seq = u64::from_le_bytes(m.payload[..8].try_into().expect("8 bytes"));
            let sent = u64::from_le_bytes(m.payload[8..16].try_into().expect("8 bytes"));
            json!({
                "sender": m.sender,
                "view": m.view,
                "index": m.index,
                "seq": seq,
                "timestamp": m.timestamp,
                "latency_us": mono_ns().saturating_sub(sent) / 1000,
            })
        }
        GroupOutput::Event(e) => match &**e {
            GroupEvent::View(v) | GroupEvent::NonPrimary(v) => json!({
                "event": if v.primary { "view" } else { "non_primary" },
                "view": v.id,
                "coordinator": v.coordinator,
                "members": v.members,
                "senders": v.senders,
                "joined": v.joined,
            }),
            GroupEvent::Transitional { members } => json!({"event": "transitional", "members": members}),
            GroupEvent::Left => json!({"event": "left"}),
        },
    })
}
