//! `intergroup`: the command-line tool.

mod bench;
mod client;
mod node;
mod secure;
mod sim;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// intergroup: reliable, ordered, secure group communication.
#[derive(Debug, Parser)]
#[command(
    name = "intergroup",
    version,
    about = "intergroup: reliable, ordered and secure group communication",
    long_about = None
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the deterministic protocol simulator and check every delivery.
    ///
    /// Members share a virtual multicast segment in virtual time; the network drops, duplicates,
    /// reorders and delays datagrams from a seed, so one seed is one exact run. Exits 1 when the
    /// checker finds a message lost, duplicated, reordered, corrupted or invented.
    Sim(sim::SimArgs),
    /// Measure throughput and latency over loopback against a raw UDP ceiling.
    ///
    /// `raw-udp` moves datagrams with no protocol over every send/receive path this machine
    /// offers and names the best the ceiling; `udp` runs engines (the subscribers in separate
    /// processes) and reports its speed as a ratio of that ceiling, measured in the same run.
    Bench(bench::BenchArgs),
    /// Run the engine daemon in the foreground on its directory (--dir).
    ///
    /// Applications (and `pub`, `sub`) bind to it through shared memory. SIGINT or SIGTERM
    /// stop it cleanly. Logs go to stderr; RUST_LOG overrides the config's level.
    Engine(client::EngineArgs),
    /// Publish each line of stdin as one message to a group, through the running engine.
    ///
    /// Waits while no subscriber listens or subscribers are behind; nothing is dropped.
    Pub(client::PubArgs),
    /// Print a group's messages as they arrive, through the running engine.
    ///
    /// `--format jsonl` prints one JSON object per message (sender, seq, view, payload) and per
    /// event (image_available, unrecoverable_loss, lapped, ...).
    Sub(client::SubArgs),
    /// Show the running engine's counters: live, or once with --once; JSON with --json.
    Stat(client::StatArgs),
    /// Check what the engine needs from this machine and say what to fix.
    Doctor(client::DoctorArgs),
    /// Ed25519 identities: `keys gen --out FILE` makes one, `keys show --key FILE` prints its
    /// public key.
    Keys(secure::KeysArgs),
    /// Signed group policies: `policy new|add|remove|sign|show`.
    Policy(secure::PolicyArgs),
    /// Run one group member with membership, views and ordered delivery over UDP.
    ///
    /// Publishes --send messages at --rate and prints each delivery of --order (fifo, total,
    /// safe) and each view event as one JSON line; exits after --duration seconds.
    Node(node::NodeArgs),
    /// The receiving side of a bench (started by `intergroup bench`).
    #[command(hide = true)]
    BenchChild(bench::ChildArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The older commands report every failure as exit code 2; the engine commands tell bad
    // usage (2) from failed work (1).
    let usage = |message: String| client::Failure { code: 2, message };
    let result = match cli.command {
        Command::Sim(args) => sim::run(args).map_err(usage),
        Command::Node(args) => node::run(args).map_err(usage),
        Command::Bench(args) => bench::run(args).map_err(usage),
        Command::BenchChild(args) => bench::run_child(args).map_err(usage),
        Command::Keys(args) => secure::keys(args).map_err(usage),
        Command::Policy(args) => secure::policy(args).map_err(usage),
        Command::Engine(a) => client::engine(a),
        Command::Pub(a) => client::publish(a),
        Command::Sub(a) => client::subscribe(a),
        Command::Stat(a) => client::stat(a),
        Command::Doctor(a) => client::doctor(a),
    };
    match result {
        Ok(code) => code,
        Err(f) => {
            eprintln!("intergroup: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}
