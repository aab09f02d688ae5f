//! `intergroup sim`: runs the simulator and prints a report or one JSON object.

use clap::Args;
use intergroup_engine::group::Order;
use intergroup_engine::sim::group::{GroupSimConfig, GroupSimReport};
use intergroup_engine::sim::{self, SimConfig, SimReport};
use std::process::ExitCode;
use std::time::Instant;

/// Options of `intergroup sim`.
#[derive(Debug, Args)]
pub struct SimArgs {
    /// Members in the group, senders included.
    #[arg(long, default_value_t = 6)]
    members: usize,
    /// How many of the members publish.
    #[arg(long, default_value_t = 1)]
    senders: usize,
    /// Messages each sender publishes.
    #[arg(long, default_value_t = 10_000)]
    messages: u64,
    /// Bytes per message (at least 8).
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Probability that one receiver misses one datagram, independently per receiver.
    #[arg(long, default_value_t = 0.0)]
    loss: f64,
    /// Probability that a datagram reaches a receiver twice.
    #[arg(long, default_value_t = 0.0)]
    dup: f64,
    /// Probability that a datagram is held back behind later ones.
    #[arg(long, default_value_t = 0.0)]
    reorder: f64,
    /// Seed of the network and of every member's NAK back-off; one seed is one exact run.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// One-way network latency in microseconds.
    #[arg(long, default_value_t = 50)]
    latency_us: u64,
    /// Extra random delay per datagram, up to this many microseconds.
    #[arg(long, default_value_t = 20)]
    jitter_us: u64,
    /// Largest datagram in bytes.
    #[arg(long, default_value_t = 1472)]
    mtu: usize,
    /// Receive window in frames.
    #[arg(long, default_value_t = 1024)]
    window: u32,
    /// Fail the run if it has not completed by this much virtual time.
    #[arg(long, default_value_t = 600.0)]
    max_virtual_seconds: f64,
    /// Turn NAK suppression off, to see what it saves.
    #[arg(long)]
    no_suppression: bool,
    /// Run the group layer (membership, views, ordering) and report on this order:
    /// fifo, total or safe. Implied by --crash, --partition, --join and --leave.
    #[arg(long)]
    order: Option<Order>,
    /// Group layer: members that crash mid-stream (times and victims drawn from the seed).
    #[arg(long, default_value_t = 0)]
    crash: usize,
    /// Group layer: partitions that cut a minority off for 1 to 3 failure timeouts, then heal.
    #[arg(long, default_value_t = 0)]
    partition: usize,
    /// Group layer: members that join mid-stream.
    #[arg(long, default_value_t = 0)]
    join: usize,
    /// Group layer: members that leave gracefully mid-stream.
    #[arg(long, default_value_t = 0)]
    leave: usize,
    /// Group layer: one-way cuts (a member's outgoing traffic lost for 1 to 3 failure
    /// timeouts while it still hears the others: asymmetric reachability).
    #[arg(long, default_value_t = 0)]
    one_way: usize,
    /// Group layer: single-link cuts (a member can no longer reach the first coordinator while
    /// every other link works) for 1 to 3 failure timeouts.
    #[arg(long, default_value_t = 0)]
    link_cut: usize,
    /// Group layer: microseconds between two messages of one sender.
    #[arg(long, default_value_t = 2000)]
    interval_us: u64,
    /// Group layer: least microseconds between two STATE frames sent because something
    /// changed: how soon a quiet sender promises its clock to total order, and how soon
    /// stability for safe order spreads.
    #[arg(long, default_value_t = 200)]
    ack_interval_us: u64,
    /// Seal every datagram with the Secure Group Layer (AES-256-GCM; members after the
    /// senders may only subscribe). With the group layer, every primary view change is also
    /// an MLS commit and members without the epoch's keys speak in signed datagrams.
    #[arg(long)]
    secure: bool,
    /// With --secure: probability per datagram that an adversary on the segment injects an
    /// attack derived from it (replay, bit flip, truncation, forgery, outsider, unlisted member,
    /// subscriber publishing, unknown epoch, in turn). Honest members must still get everything.
    #[arg(long, default_value_t = 0.0)]
    attack: f64,
    /// With --secure and the group layer: each member commits a self-update this often
    /// (milliseconds of virtual time); none if not given.
    #[arg(long)]
    key_update_ms: Option<u64>,
    /// Print one JSON object instead of the report.
    #[arg(long)]
    json: bool,
}

/// Runs the simulation; exit code 0 when the checker accepts the run, 1 when it does not.
pub fn run(args: SimArgs) -> Result<ExitCode, String> {
    if args.order.is_some()
        || args.crash + args.partition + args.join + args.leave + args.one_way + args.link_cut > 0
    {
        if args.attack > 0.0 {
            return Err("--attack applies to the core simulator only, not with the group layer".into());
        }
        return run_group(args);
    }
    let mut cfg = SimConfig {
        members: args.members,
        senders: args.senders,
        messages: args.messages,
        size: args.size,
        loss: args.loss,
        dup: args.dup,
        reorder: args.reorder,
        seed: args.seed,
        latency_ns: args.latency_us * 1000,
        jitter_ns: args.jitter_us * 1000,
        max_virtual_ns: (args.max_virtual_seconds.max(0.0) * 1e9) as u64,
        secure: args.secure || args.attack > 0.0,
        attack: args.attack,
        ..SimConfig::default()
    };
    cfg.member.mtu = args.mtu;
    cfg.member.window_frames = args.window;
    cfg.member.retransmit_frames = (args.window.max(1) * 4).next_power_of_two();
    cfg.member.nak_suppression = !args.no_suppression;
    cfg.member.group_size_hint = u32::try_from(args.members).unwrap_or(u32::MAX);
    let started = Instant::now();
    let report = sim::run(cfg).map_err(|e| e.to_string())?;
    let wall = started.elapsed().as_secs_f64();
    if args.json {
        let mut value = serde_json::to_value(&report).map_err(|e| e.to_string())?;
        if let Some(obj) = value.as_object_mut() {
            obj.insert("wall_seconds".into(), wall.into());
            obj.insert("nak_ratio".into(), report.nak_ratio().into());
            obj.insert("secure_rejected".into(), object(&report.secure_rejected));
            obj.insert("counters".into(), object(&report.counters));
        }
        println!("{value}");
    } else {
        print_report(&report, wall);
    }
    Ok(if report.delivered_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn print_report(r: &SimReport, wall: f64) {
    println!("intergroup sim: seed {}", r.seed);
    println!(
        "  group        {} members, {} sending {} messages of {} bytes each",
        r.members, r.senders, r.messages, r.size
    );
    println!("  network      {:.1}% loss per receiver", r.loss * 100.0);
    println!();
    let verdict = if r.delivered_ok {
        "OK: every message delivered exactly once, intact, in order, at every receiver"
    } else {
        "FAILED"
    };
    println!("  checker      {verdict}");
    if let Some(f) = &r.failure {
        println!("               {f}");
    }
    println!(
        "  delivered    {} of {} messages ({} rule violations)",
        r.delivered_messages, r.expected_messages, r.violations
    );
    println!();
    println!("  datagrams sent                 {:>12}", r.sent_datagrams);
    println!("  first-transmission packets lost {:>11}", r.lost_packets);
    println!("  retransmissions                {:>12}", r.retransmissions);
    println!("  NAKs sent by receivers         {:>12}", r.naks_sent);
    println!(
        "  NAKs that reached senders      {:>12}",
        r.naks_received_by_senders
    );
    println!("  NAK ranges held back           {:>12}", r.naks_suppressed);
    println!("  NAKs per lost packet           {:>12.2}", r.nak_ratio());
    println!("  unrecoverable frames           {:>12}", r.unrecoverable_frames);
    if r.secure {
        println!();
        println!(
            "  sealed (AES-256-GCM); attacks injected {:>8}",
            r.attacks_injected
        );
        for (reason, n) in &r.secure_rejected {
            println!("  rejected: {reason:<20} {n:>12}");
        }
    }
    println!();
    println!(
        "  virtual time {:.3} s, wall time {:.2} s",
        r.virtual_seconds, wall
    );
    if !r.delivered_ok {
        println!("  replay this run with --seed {}", r.seed);
    }
}

fn run_group(args: SimArgs) -> Result<ExitCode, String> {
    let mut cfg = GroupSimConfig {
        members: args.members,
        senders: args.senders,
        messages: args.messages,
        size: args.size,
        interval_ns: args.interval_us.max(1) * 1000,
        loss: args.loss,
        latency_ns: args.latency_us * 1000,
        jitter_ns: args.jitter_us * 1000,
        seed: args.seed,
        order: args.order.unwrap_or(Order::Fifo),
        max_virtual_ns: (args.max_virtual_seconds.max(0.0) * 1e9) as u64,
        secure: args.secure,
        update_period_ns: args.key_update_ms.map(|ms| ms.max(1) * 1_000_000),
        ..GroupSimConfig::default()
    };
    if args.dup > 0.0 || args.reorder > 0.0 {
        return Err("--dup and --reorder apply to the core simulator only, not with the group layer".into());
    }
    cfg.group.ack_interval_ns = args.ack_interval_us.max(1) * 1000;
    cfg.group.member.mtu = args.mtu;
    cfg.group.member.window_frames = args.window;
    cfg.group.member.retransmit_frames = (args.window.max(1) * 4).next_power_of_two();
    cfg.group.member.nak_suppression = !args.no_suppression;
    let cfg = cfg
        .scenario(args.crash, args.partition, args.join, args.leave)
        .one_way_cuts(args.one_way)
        .link_cuts(args.link_cut);
    let started = Instant::now();
    let report = sim::group::run(cfg).map_err(|e| e.to_string())?;
    let wall = started.elapsed().as_secs_f64();
    if args.json {
        let mut value = serde_json::to_value(&report).map_err(|e| e.to_string())?;
        if let Some(obj) = value.as_object_mut() {
            obj.insert("wall_seconds".into(), wall.into());
            obj.insert("secure_rejected".into(), object(&report.secure_rejected));
        }
        println!("{value}");
    } else {
        print_group_report(&report, wall);
    }
    Ok(
        if report.delivered_ok && report.virtual_synchrony_ok && report.keys_ok {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        },
    )
}

fn print_group_report(r: &GroupSimReport, wall: f64) {
    println!(
        "intergroup sim (group layer): seed {}, order {}",
        r.seed,
        r.order.name()
    );
    println!(
        "  group        {} members, {} sending {} messages each; {} crashes, {} partitions, {} joins, {} leaves",
        r.members, r.senders, r.messages, r.crashes, r.partitions, r.joins, r.leaves
    );
    println!("  network      {:.1}% loss per receiver", r.loss * 100.0);
    println!();
    let ok = |b: bool| if b { "OK" } else { "FAILED" };
    println!("  delivery            {}", ok(r.delivered_ok));
    println!("  virtual synchrony   {}", ok(r.virtual_synchrony_ok));
    if let Some(f) = &r.failure {
        println!("                      {f}");
    }
    println!(
        "  views               {} primary, {} non-primary ({} view changes started)",
        r.views_installed, r.non_primary_views, r.rounds_started
    );
    println!(
        "  delivered           {} messages in {} order, {} published",
        r.delivered_messages,
        r.order.name(),
        r.published_messages
    );
    println!(
        "  mean latency        {:.0} us (publish to {} delivery)",
        r.mean_latency_us,
        r.order.name()
    );
    println!("  relayed in flushes  {}", r.relays);
    println!("  datagrams sent      {}", r.sent_datagrams);
    if let Some(epoch) = r.key_epoch.filter(|_| !r.secure_rejected.is_empty()) {
        println!();
        println!(
            "  keys                {} (MLS epoch {epoch}, {} commits)",
            ok(r.keys_ok),
            r.key_commits
        );
        if let Some(locked) = r.departed_locked_out {
            println!(
                "  departed members    {}",
                if locked {
                    "cannot open the final epoch"
                } else {
                    "OPEN THE FINAL EPOCH"
                }
            );
        }
        for (reason, n) in &r.secure_rejected {
            println!("  rejected: {reason:<16} {n:>10}");
        }
    } else if !r.secure_rejected.is_empty() {
        println!();
        println!("  keys                FAILED (no common MLS epoch)");
    }
    println!();
    println!(
        "  virtual time {:.3} s, wall time {:.2} s",
        r.virtual_seconds, wall
    );
    if !(r.delivered_ok && r.virtual_synchrony_ok) {
        println!("  replay this run with --seed {}", r.seed);
    }
}

/// A name -> count list as a JSON object.
fn object(pairs: &[(String, u64)]) -> serde_json::Value {
    pairs
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::Value::from(*v)))
        .collect::<serde_json::Map<_, _>>()
        .into()
}
