//! `intergroup bench-child member`: one member of an end-to-end exchange. It publishes its
//! share of messages, checks every message of every other member (content, order, no
//! duplicate, no gap), and reports when everything it sent is acknowledged.

use super::{say, stop_on_stdin_eof};
use clap::Args;
use intergroup_engine::runtime::{BackendKind, Engine, EngineConfig, GroupConfig, OfferError};
use intergroup_engine::{Counter, Event, MemberConfig, Output};
use serde_json::json;
use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const GROUP: u32 = 78;

/// Options of one member.
#[derive(Debug, Args)]
pub struct MemberArgs {
    /// Member id, 1..=members.
    #[arg(long)]
    id: u32,
    /// Members in the exchange.
    #[arg(long)]
    members: u32,
    /// Messages this member publishes.
    #[arg(long)]
    messages: u64,
    #[arg(long)]
    port: u16,
    /// Share of received datagrams dropped on purpose.
    #[arg(long, default_value_t = 0.0)]
    loss: f64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    #[arg(long, default_value = "auto", value_parser = super::udp::parse_backend)]
    backend: BackendKind,
    /// Seconds before giving up.
    #[arg(long, default_value_t = 300)]
    timeout: u64,
}

/// The message `seq` of member `sender`: its length and bytes follow from the two.
pub fn message(sender: u32, seq: u64, buf: &mut Vec<u8>) {
    let len = 16 + ((seq * 7 + u64::from(sender)) % 180) as usize;
    buf.clear();
    buf.extend_from_slice(&seq.to_le_bytes());
    buf.extend_from_slice(&sender.to_le_bytes());
    buf.extend_from_slice(&[0; 4]);
    let fill = (seq as u8) ^ (sender as u8).wrapping_mul(31);
    buf.extend((16..len).map(|i| fill.wrapping_add(i as u8)));
}

#[derive(Default)]
struct Check {
    next: HashMap<u32, u64>,
    errors: Vec<String>,
    loss_events: u64,
}

/// Runs one member.
pub fn member(a: MemberArgs) -> Result<ExitCode, String> {
    if a.id == 0 || a.id > a.members {
        return Err(format!(
            "--id must be within 1..=--members ({}), not {}",
            a.members, a.id
        ));
    }
    let engine = Engine::launch(EngineConfig {
        backend: a.backend,
        ..EngineConfig::default()
    })
    .map_err(|e| e.to_string())?;
    let mut g = GroupConfig::new(MemberConfig {
        group: GROUP,
        member_id: a.id,
        group_size_hint: a.members,
        ..MemberConfig::default()
    });
    g.udp.group.set_port(a.port);
    g.receive_loss = a.loss;
    g.loss_seed = a.seed.wrapping_mul(1000) + u64::from(a.id);
    g.seed = a.seed ^ u64::from(a.id);
    engine.join(g).map_err(|e| e.to_string())?;
    let check = Arc::new(Mutex::new(Check::default()));
    let c = check.clone();
    let mut want = Vec::new();
    engine
        .subscribe(GROUP, move |out: &Output<'_>| {
            let Ok(mut c) = c.lock() else { return };
            match out {
                Output::Message(m) => {
                    let next = c.next.entry(m.sender).or_insert(0);
                    let seq = *next;
                    *next += 1;
                    message(m.sender, seq, &mut want);
                    if m.payload != want.as_slice() && c.errors.len() < 10 {
                        let got = m.payload.get(..8).map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])));
                        c.errors.push(format!(
                            "from member {}: expected message {seq}, got {} bytes starting with sequence {got:?}",
                            m.sender,
                            m.payload.len()
                        ));
                    }
                }
                Output::Event(Event::UnrecoverableLoss { sender, first, count }) => {
                    c.loss_events += count;
                    c.errors.push(format!("unrecoverable loss from {sender}: {count} at {first}"));
                }
                Output::Event(_) => {}
            }
        })
        .map_err(|e| e.to_string())?;
    let mut publication = engine.publication(GROUP, 1).map_err(|e| e.to_string())?;
    // Every other member reports to this one before anyone publishes: flow control holds a
    // sender back only for receivers it has heard from, and a member stalled at the start (a
    // busy host) must not find the first messages already gone.
    let others = a.members - 1;
    if !engine
        .wait_receivers(GROUP, others as usize, Duration::from_secs(a.timeout))
        .map_err(|e| e.to_string())?
    {
        return Err(format!(
            "member {}: the other {others} members did not report within {} s",
            a.id, a.timeout
        ));
    }
    say("ready");
    // Everyone is up before anyone publishes: the test writes one line to start.
    let mut go = String::new();
    std::io::stdin().read_line(&mut go).map_err(|e| e.to_string())?;
    let stop = stop_on_stdin_eof();
    let deadline = Instant::now() + Duration::from_secs(a.timeout);
    let mut buf = Vec::new();
    for seq in 0..a.messages {
        message(a.id, seq, &mut buf);
        loop {
            match publication.offer(&buf) {
                Ok(()) => break,
                Err(OfferError::BackPressured) if Instant::now() < deadline => std::thread::yield_now(),
                Err(e) => return Err(format!("member {}: offer {seq}: {e}", a.id)),
            }
        }
    }
    let complete = |c: &Check| {
        (1..=a.members)
            .filter(|&m| m != a.id)
            .all(|m| c.next.get(&m).copied().unwrap_or(0) >= a.messages)
    };
    let mut received_all = false;
    while Instant::now() < deadline {
        let done = check
            .lock()
            .map(|c| complete(&c) || !c.errors.is_empty())
            .unwrap_or(true);
        if done {
            received_all = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let left = deadline.saturating_duration_since(Instant::now());
    let acknowledged = engine
        .wait_acknowledged(GROUP, others as usize, left)
        .map_err(|e| e.to_string())?;
    let stats = engine.stats(GROUP).map_err(|e| e.to_string())?;
    let c = check.lock().map_err(|_| "poisoned")?;
    let ok = received_all && acknowledged && c.errors.is_empty() && complete(&c);
    say(&json!({
        "id": a.id,
        "ok": ok,
        "backend": stats.backend.to_string(),
        "received": c.next.iter().map(|(k, v)| (k.to_string(), *v)).collect::<HashMap<_, _>>(),
        "acknowledged": acknowledged,
        "errors": c.errors,
        "retransmissions": stats.counters.get(Counter::Retransmissions),
        "naks_sent": stats.counters.get(Counter::NaksSent),
        "dropped_by_decorator": stats.transport.dropped_by_decorator,
        // Everything else a failed run may need explaining.
        "send_errors": stats.transport.send_errors,
        "counters": stats.counters.iter().filter(|&(_, v)| v > 0).collect::<HashMap<_, _>>(),
    })
    .to_string());
    drop(c);
    // Keep answering NAKs and reporting STATUS until every member is done.
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::from(1) })
}
