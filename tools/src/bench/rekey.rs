//! `intergroup bench rekey --members N`: the cost of MLS key agreement in a group of N, in one
//! process (every member's work is real, only the network is left out).
//!
//! The group is built the way a long-running group looks: members join in pairs, and the first
//! of each pair commits a self-update right after joining, so every node of the ratchet tree
//! holds a key (a "full" tree; periodic self-updates keep it so in production). Then, for
//! `--rounds` rounds, the coordinator removes one member, adds a new one in its place, and the
//! new member commits a self-update. Each step reports the time to make the commit, the time a
//! member takes to process it (the slowest of `--samples` members spread over the tree), and
//! the bytes of the commit (and of the Welcome). Members process in parallel on their own
//! hosts, so a new epoch reaches every member after commit + process time (network aside).

use super::median;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use intergroup_secure::mls::MlsMember;
use intergroup_secure::{Identity, Policy, PublicKey, Role};
use serde_json::{json, Value};
use std::process::ExitCode;
use std::time::Instant;

/// Options of `intergroup bench rekey`.
#[derive(Debug, Args)]
pub struct RekeyArgs {
    /// Members of the group.
    #[arg(long, default_value_t = 10)]
    members: usize,
    /// Remove / add / update rounds measured (medians are reported).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Members (besides the coordinator) that process every commit and are timed.
    #[arg(long, default_value_t = 3)]
    samples: usize,
    /// `full`: members join in pairs and self-update, so every tree node holds a key (a
    /// long-running group with periodic self-updates). `degraded`: everyone is added by one
    /// commit and nobody updates (what a group where only the coordinator commits turns into):
    /// commits encrypt to every leaf, O(n).
    #[arg(long, default_value = "full", value_parser = ["full", "degraded"])]
    tree: String,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
}

const GROUP_ID: &[u8] = b"intergroup bench rekey";

fn identity(n: usize) -> Identity {
    let mut seed = [0u8; 32];
    seed[..8].copy_from_slice(&(n as u64).to_le_bytes());
    seed[8] = 0x5e;
    Identity::from_seed(&seed)
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}

/// Medians of one kind of step over the rounds.
#[derive(Default)]
struct Step {
    commit_ms: Vec<f64>,
    process_ms: Vec<f64>,
    commit_bytes: Vec<f64>,
    welcome_bytes: Vec<f64>,
    join_ms: Vec<f64>,
}

impl Step {
    fn json(self) -> Value {
        let round = |x: f64| (x * 1000.0).round() / 1000.0;
        let commit = median(self.commit_ms.clone());
        let process = median(self.process_ms.clone());
        let mut v = json!({
            "commit_ms": round(commit),
            "process_ms": round(process),
            "epoch_ms": round(commit + process),
            "commit_bytes": median(self.commit_bytes).round(),
        });
        if !self.welcome_bytes.is_empty() {
            v["welcome_bytes"] = json!(median(self.welcome_bytes).round());
            v["join_ms"] = json!(round(median(self.join_ms)));
        }
        v
    }
}

/// The live members: the coordinator first, then the timed samples.
struct Live {
    coordinator: MlsMember,
    samples: Vec<(usize, MlsMember)>,
}

impl Live {
    /// The coordinator adds members `ids` in one commit and merges it; returns them (not
    /// joined yet), the commit and the Welcome.
    #[allow(clippy::type_complexity)]
    fn add(
        &mut self,
        ids: std::ops::Range<usize>,
        policy: &Policy,
    ) -> Result<(Vec<(usize, MlsMember)>, Vec<u8>, Vec<u8>), String> {
        let joiners: Vec<(usize, MlsMember)> = ids.map(|i| (i, MlsMember::new(identity(i)))).collect();
        let packages = joiners
            .iter()
            .map(|(_, m)| m.key_package())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())?;
        let add = self
            .coordinator
            .commit(&packages, &[], policy)
            .map_err(|e| e.to_string())?;
        self.coordinator.merge_pending().map_err(|e| e.to_string())?;
        let welcome = add.welcome.ok_or("an add commit without a Welcome")?;
        Ok((joiners, add.commit, welcome))
    }

    /// Every timed member processes `commit`; returns the slowest one's time.
    fn process(&mut self, commit: &[u8], policy: &Policy) -> Result<f64, String> {
        let mut slowest: f64 = 0.0;
        for (n, m) in self.samples.iter_mut() {
            let t = Instant::now();
            m.process(commit, policy)
                .map_err(|e| format!("member {n}: {e}"))?;
            m.epoch_secret(GROUP_ID).map_err(|e| e.to_string())?;
            slowest = slowest.max(ms(t));
        }
        Ok(slowest)
    }
}

/// `intergroup bench rekey`.
pub fn run(a: RekeyArgs) -> Result<ExitCode, String> {
    if a.members < 3 {
        return Err("--members must be at least 3".into());
    }
    let samples = a.samples.clamp(1, a.members - 2);
    let admin = identity(usize::MAX);
    // Members 0..N, then one joiner per round.
    let mut policy = Policy::new("bench", vec![admin.public()], 0, u64::MAX).map_err(|e| e.to_string())?;
    for n in 0..a.members + a.rounds {
        policy
            .add_member(
                &format!("m{n}"),
                identity(n).public(),
                vec![Role::Publish, Role::Subscribe],
            )
            .map_err(|e| e.to_string())?;
    }
    policy.sign(&admin).map_err(|e| e.to_string())?;

    // Samples spread over the tree; the removed members are the ones right after them.
    let sample_ids: Vec<usize> = (1..=samples)
        .map(|k| k * (a.members - 1) / (samples + 1) + 1)
        .collect();
    let bar = if a.json {
        ProgressBar::hidden()
    } else {
        let b = ProgressBar::new(a.members as u64);
        b.set_style(
            ProgressStyle::with_template("building a full tree {bar:40} {pos}/{len} members")
                .map_err(|e| e.to_string())?,
        );
        b
    };
    let build = Instant::now();
    let mut coordinator = MlsMember::new(identity(0));
    coordinator.create_group(GROUP_ID).map_err(|e| e.to_string())?;
    let mut live = Live {
        coordinator,
        samples: Vec::new(),
    };
    let mut n = if a.tree == "degraded" {
        // One commit adds everyone; only the timed members join (the others' state would
        // never be read).
        let (mut joiners, _, welcome) = live.add(1..a.members, &policy)?;
        joiners.retain(|(i, _)| sample_ids.contains(i));
        for (i, mut m) in joiners {
            m.join(&welcome, &policy).map_err(|e| e.to_string())?;
            live.samples.push((i, m));
        }
        a.members
    } else {
        1
    };
    while n < a.members {
        let pair = n..(n + 2).min(a.members);
        let count = pair.len();
        let (mut joiners, commit, welcome) = live.add(pair, &policy)?;
        live.process(&commit, &policy)?;
        for (_, m) in joiners.iter_mut() {
            m.join(&welcome, &policy).map_err(|e| e.to_string())?;
        }
        // The first of the pair refreshes its path: their parent and every node above it.
        let (first, mut updater) = joiners.remove(0);
        let update = updater.self_update().map_err(|e| e.to_string())?;
        updater.merge_pending().map_err(|e| e.to_string())?;
        live.coordinator
            .process(&update.commit, &policy)
            .map_err(|e| e.to_string())?;
        live.process(&update.commit, &policy)?;
        for (i, mut m) in joiners {
            if sample_ids.contains(&i) {
                m.process(&update.commit, &policy).map_err(|e| e.to_string())?;
                live.samples.push((i, m));
            }
        }
        if sample_ids.contains(&first) {
            live.samples.push((first, updater));
        }
        n += count;
        bar.set_position(n as u64);
    }
    bar.finish_and_clear();
    let build_s = build.elapsed().as_secs_f64();

    let (mut remove, mut add, mut update) = (Step::default(), Step::default(), Step::default());
    for r in 0..a.rounds {
        // Remove a member that is not timed, add a new one (it takes the free leaf), and let
        // the new member refresh its path, which the removal had blanked.
        let victim = (sample_ids[r % samples] + 1..a.members)
            .find(|i| !sample_ids.contains(i))
            .unwrap_or(a.members - 1);
        let victim_key: PublicKey = if r == 0 {
            identity(victim).public()
        } else {
            identity(a.members + r - 1).public()
        };
        let t = Instant::now();
        let c = live
            .coordinator
            .commit(&[], &[victim_key], &policy)
            .map_err(|e| e.to_string())?;
        remove.commit_ms.push(ms(t));
        remove.commit_bytes.push(c.commit.len() as f64);
        live.coordinator.merge_pending().map_err(|e| e.to_string())?;
        remove.process_ms.push(live.process(&c.commit, &policy)?);

        let mut joiner = MlsMember::new(identity(a.members + r));
        let kp = joiner.key_package().map_err(|e| e.to_string())?;
        let t = Instant::now();
        let c = live
            .coordinator
            .commit(&[kp], &[], &policy)
            .map_err(|e| e.to_string())?;
        add.commit_ms.push(ms(t));
        add.commit_bytes.push(c.commit.len() as f64);
        live.coordinator.merge_pending().map_err(|e| e.to_string())?;
        add.process_ms.push(live.process(&c.commit, &policy)?);
        let welcome = c.welcome.ok_or("an add commit without a Welcome")?;
        add.welcome_bytes.push(welcome.len() as f64);
        let t = Instant::now();
        joiner.join(&welcome, &policy).map_err(|e| e.to_string())?;
        joiner.epoch_secret(GROUP_ID).map_err(|e| e.to_string())?;
        add.join_ms.push(ms(t));

        let t = Instant::now();
        let c = joiner.self_update().map_err(|e| e.to_string())?;
        update.commit_ms.push(ms(t));
        update.commit_bytes.push(c.commit.len() as f64);
        joiner.merge_pending().map_err(|e| e.to_string())?;
        let t = Instant::now();
        live.coordinator
            .process(&c.commit, &policy)
            .map_err(|e| e.to_string())?;
        let at_coordinator = ms(t);
        update
            .process_ms
            .push(live.process(&c.commit, &policy)?.max(at_coordinator));
        // The joiner is the next round's victim, so the group keeps its size.
    }
    let remove = remove.json();
    let under = remove["epoch_ms"].as_f64().unwrap_or(f64::MAX) < 100.0;
    let report = json!({
        "mode": "rekey",
        "members": a.members,
        "rounds": a.rounds,
        "samples": samples,
        "tree": a.tree,
        "ciphersuite": "MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519",
        "build_s": (build_s * 100.0).round() / 100.0,
        "remove": remove,
        "add": add.json(),
        "update": update.json(),
        "remove_epoch_under_100ms": under,
    });
    if a.json {
        println!("{report}");
    } else {
        print_table(&report);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_table(r: &Value) {
    println!(
        "MLS rekey, {} members ({} tree, built in {} s), medians of {} rounds, slowest of {} timed members",
        r["members"],
        r["tree"].as_str().unwrap_or(""),
        r["build_s"],
        r["rounds"],
        r["samples"]
    );
    println!(
        "{:<8}{:>12}{:>12}{:>12}{:>14}{:>14}{:>10}",
        "", "commit ms", "process ms", "epoch ms", "commit bytes", "welcome bytes", "join ms"
    );
    for step in ["remove", "add", "update"] {
        let s = &r[step];
        let opt = |k: &str| s.get(k).map_or("-".to_string(), Value::to_string);
        println!(
            "{:<8}{:>12}{:>12}{:>12}{:>14}{:>14}{:>10}",
            step,
            s["commit_ms"].to_string(),
            s["process_ms"].to_string(),
            s["epoch_ms"].to_string(),
            s["commit_bytes"].to_string(),
            opt("welcome_bytes"),
            opt("join_ms")
        );
    }
}
