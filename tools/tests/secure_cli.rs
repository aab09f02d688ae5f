//! `intergroup keys` and `intergroup policy` as a user runs them.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_intergroup"))
        .args(args)
        .output()
        .expect("run intergroup")
}

fn ok(args: &[&str]) -> String {
    let out = run(args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("intergroup-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn keys_are_private_and_refused_when_exposed() {
    let d = dir("keys");
    let key = d.join("me.key");
    let public = ok(&["keys", "gen", "--out", s(&key)]);
    assert_eq!(public.len(), 64, "{public}");
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(ok(&["keys", "show", "--key", s(&key)]), public);
    // Not overwritten without --force.
    assert_eq!(run(&["keys", "gen", "--out", s(&key)]).status.code(), Some(2));
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
    let out = run(&["keys", "show", "--key", s(&key)]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("chmod 600"), "{err}");
    let secret = std::fs::read_to_string(&key).unwrap();
    let seed = secret.lines().find(|l| l.starts_with("private_key")).unwrap();
    assert!(
        !err.contains(&seed[15..40]),
        "the error shows key material: {err}"
    );
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn a_policy_is_made_signed_checked_and_its_tampering_caught() {
    let d = dir("policy");
    let (admin_key, alice_key, policy) = (d.join("admin.key"), d.join("alice.key"), d.join("group.toml"));
    let admin = ok(&["keys", "gen", "--out", s(&admin_key)]);
    let alice = ok(&["keys", "gen", "--out", s(&alice_key)]);
    ok(&[
        "policy",
        "new",
        "--group",
        "prices",
        "--admin",
        &admin,
        "--out",
        s(&policy),
    ]);
    // Unsigned: show says so and exits 1.
    assert_eq!(
        run(&["policy", "show", "--policy", s(&policy)]).status.code(),
        Some(1)
    );
    ok(&[
        "policy",
        "add",
        "--policy",
        s(&policy),
        "--key",
        &alice,
        "--roles",
        "publish,subscribe",
        "--name",
        "alice",
    ]);
    // Only an admin may sign.
    let out = run(&["policy", "sign", "--policy", s(&policy), "--key", s(&alice_key)]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not an admin"));
    ok(&["policy", "sign", "--policy", s(&policy), "--key", s(&admin_key)]);
    let shown: serde_json::Value =
        serde_json::from_str(&ok(&["policy", "show", "--policy", s(&policy), "--json"])).unwrap();
    assert_eq!(shown["valid"], true, "{shown}");
    assert_eq!(shown["members"][0]["key"], alice);
    assert_eq!(shown["signer"], admin);
    // Edit the file by hand after signing: caught.
    let text = std::fs::read_to_string(&policy).unwrap();
    std::fs::write(
        &policy,
        text.replace(
            "\"publish\", \"subscribe\"",
            "\"admin\", \"publish\", \"subscribe\"",
        ),
    )
    .unwrap();
    let out = run(&["policy", "show", "--policy", s(&policy)]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("signature does not match"));
    // Removing a member needs a new signature.
    std::fs::write(&policy, &text).unwrap();
    ok(&["policy", "remove", "--policy", s(&policy), "--key", &alice]);
    assert_eq!(
        run(&["policy", "show", "--policy", s(&policy)]).status.code(),
        Some(1)
    );
    // A broken file is refused with its line.
    std::fs::write(&policy, "group = \"g\"\nversion = \"two\"\n").unwrap();
    let out = run(&["policy", "show", "--policy", s(&policy)]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("group.toml:2"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_dir_all(&d).unwrap();
}
