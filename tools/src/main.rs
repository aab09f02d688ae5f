//! `intergroup`: the command-line tool.

mod bench;
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
    /// Ed25519 identities: `keys gen --out FILE` makes one, `keys show --key FILE` prints its
    /// public key.
    Keys(secure::KeysArgs),
    /// Signed group policies: `policy new|add|remove|sign|show`.
    Policy(secure::PolicyArgs),
    /// The receiving side of a bench (started by `intergroup bench`).
    #[command(hide = true)]
    BenchChild(bench::ChildArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Sim(args) => sim::run(args),
        Command::Bench(args) => bench::run(args),
        Command::BenchChild(args) => bench::run_child(args),
        Command::Keys(args) => secure::keys(args),
        Command::Policy(args) => secure::policy(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("intergroup: {e}");
            ExitCode::from(2)
        }
    }
}
