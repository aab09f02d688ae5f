//! `intergroup keys` and `intergroup policy`: identities and signed group policies.

use clap::{Args, Subcommand};
use intergroup_secure::{Identity, Policy, PolicyError, PublicKey, Role};
use std::path::PathBuf;
use std::process::ExitCode;

/// `intergroup keys`.
#[derive(Debug, Args)]
pub struct KeysArgs {
    #[command(subcommand)]
    command: KeysCommand,
}

#[derive(Debug, Subcommand)]
enum KeysCommand {
    /// Make a new Ed25519 identity: writes the private key file (mode 0600) and prints the
    /// public key.
    Gen {
        /// The private key file to write.
        #[arg(long)]
        out: PathBuf,
        /// Replace an existing file.
        #[arg(long)]
        force: bool,
    },
    /// Make a new random epoch secret for a secured group's engines (`epoch_secret` in their
    /// config): writes it with mode 0600. Hand it to every member over a secure channel.
    Secret {
        /// The secret file to write.
        #[arg(long)]
        out: PathBuf,
        /// Replace an existing file.
        #[arg(long)]
        force: bool,
    },
    /// Print the public key of a private key file (and check that only its owner can read it),
    /// and the member id it has in secured groups.
    Show {
        /// The private key file.
        #[arg(long)]
        key: PathBuf,
    },
}

/// Runs `intergroup keys`.
pub fn keys(a: KeysArgs) -> Result<ExitCode, String> {
    match a.command {
        KeysCommand::Gen { out, force } => {
            let id = Identity::generate().map_err(|e| e.to_string())?;
            id.save(&out, force).map_err(|e| e.to_string())?;
            println!("{}", id.public());
        }
        KeysCommand::Secret { out, force } => {
            let secret = intergroup_secure::EpochSecret::generate().map_err(|e| e.to_string())?;
            secret.save(&out, force).map_err(|e| e.to_string())?;
            println!("wrote {}", out.display());
        }
        KeysCommand::Show { key } => {
            let id = Identity::load(&key).map_err(|e| e.to_string())?;
            println!("{}", id.public());
            eprintln!("member id in secured groups: {}", id.public().member_id());
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `intergroup policy`.
#[derive(Debug, Args)]
pub struct PolicyArgs {
    #[command(subcommand)]
    command: PolicyCommand,
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// Start a new, unsigned policy for a group.
    New {
        /// The group's name.
        #[arg(long)]
        group: String,
        /// An admin's public key (repeat for several).
        #[arg(long = "admin", required = true)]
        admins: Vec<PublicKey>,
        /// Days of validity from now.
        #[arg(long, default_value_t = 365)]
        days: u64,
        /// The policy file to write.
        #[arg(long)]
        out: PathBuf,
        /// Replace an existing file.
        #[arg(long)]
        force: bool,
    },
    /// Add a member (or change its roles). Drops the signature and raises the version.
    Add {
        /// The policy file.
        #[arg(long)]
        policy: PathBuf,
        /// The member's public key.
        #[arg(long)]
        key: PublicKey,
        /// Roles, comma-separated: publish, subscribe, admin.
        #[arg(long, value_delimiter = ',', required = true)]
        roles: Vec<Role>,
        /// A name for people.
        #[arg(long, default_value = "")]
        name: String,
    },
    /// Remove a member. Drops the signature and raises the version.
    Remove {
        /// The policy file.
        #[arg(long)]
        policy: PathBuf,
        /// The member's public key.
        #[arg(long)]
        key: PublicKey,
    },
    /// Sign the policy with an admin's private key file.
    Sign {
        /// The policy file.
        #[arg(long)]
        policy: PathBuf,
        /// The admin's private key file.
        #[arg(long)]
        key: PathBuf,
    },
    /// Print the policy and check it: exits 0 when signed by an admin and valid now, 1 when not.
    Show {
        /// The policy file.
        #[arg(long)]
        policy: PathBuf,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn err(e: PolicyError) -> String {
    e.to_string()
}

/// Runs `intergroup policy`.
pub fn policy(a: PolicyArgs) -> Result<ExitCode, String> {
    match a.command {
        PolicyCommand::New {
            group,
            admins,
            days,
            out,
            force,
        } => {
            if out.exists() && !force {
                return Err(format!("{}: exists (use --force to replace it)", out.display()));
            }
            let start = now();
            let p = Policy::new(
                &group,
                admins,
                start,
                start.saturating_add(days.saturating_mul(86_400)),
            )
            .map_err(err)?;
            p.save(&out).map_err(err)?;
        }
        PolicyCommand::Add {
            policy,
            key,
            roles,
            name,
        } => {
            let mut p = Policy::load(&policy).map_err(err)?;
            p.add_member(&name, key, roles).map_err(err)?;
            p.save(&policy).map_err(err)?;
            eprintln!("version {} (unsigned: sign it again)", p.version);
        }
        PolicyCommand::Remove { policy, key } => {
            let mut p = Policy::load(&policy).map_err(err)?;
            if !p.remove_member(&key) {
                return Err(format!("{key} is not a member of {}", policy.display()));
            }
            p.save(&policy).map_err(err)?;
            eprintln!("version {} (unsigned: sign it again)", p.version);
        }
        PolicyCommand::Sign { policy, key } => {
            let mut p = Policy::load(&policy).map_err(err)?;
            let admin = Identity::load(&key).map_err(|e| e.to_string())?;
            p.sign(&admin).map_err(err)?;
            p.save(&policy).map_err(err)?;
        }
        PolicyCommand::Show { policy, json } => {
            let p = Policy::load(&policy).map_err(err)?;
            let verdict = p.verify(now());
            if json {
                let v = serde_json::json!({
                    "group": p.group,
                    "version": p.version,
                    "not_before": p.not_before,
                    "not_after": p.not_after,
                    "admins": p.admins.iter().map(|k| k.to_string()).collect::<Vec<_>>(),
                    "members": p.members.iter().map(|m| serde_json::json!({
                        "name": m.name,
                        "key": m.key.to_string(),
                        "roles": m.roles,
                    })).collect::<Vec<_>>(),
                    "signer": p.signature.as_ref().map(|s| s.signer.to_string()),
                    "valid": verdict.is_ok(),
                    "problem": verdict.as_ref().err().map(|e| e.to_string()),
                });
                println!("{v}");
            } else {
                println!("group {}  version {}", p.group, p.version);
                println!("valid from {} to {} (Unix seconds)", p.not_before, p.not_after);
                for a in &p.admins {
                    println!("admin   {a}");
                }
                for m in &p.members {
                    let roles: Vec<String> =
                        m.roles.iter().map(|r| format!("{r:?}").to_lowercase()).collect();
                    println!("member  {}  {}  {}", m.key, roles.join(","), m.name);
                }
                match &verdict {
                    Ok(()) => println!(
                        "signed by {}: valid",
                        p.signature
                            .as_ref()
                            .map(|s| s.signer.to_string())
                            .unwrap_or_default()
                    ),
                    Err(e) => println!("NOT VALID: {e}"),
                }
            }
            if verdict.is_err() {
                return Ok(ExitCode::from(1));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
