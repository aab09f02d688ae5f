//! The engine daemon and its command-line clients as separate processes (the real
//! `intergroup` binary): engine + pub + sub, kill -9 of a client and of the engine, a bad
//! config, a corrupted control file.

use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The tests share two cores and start engines: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_intergroup"))
}

/// A private engine directory and a config on a port of its own; removed on drop.
struct Setup {
    dir: PathBuf,
    config: PathBuf,
}

impl Setup {
    fn new(name: &str, n: u16) -> Self {
        let dir = std::env::temp_dir().join(format!("ig-daemon-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let config = std::env::temp_dir().join(format!("ig-daemon-{name}-{}.toml", std::process::id()));
        let port = 46_000 + (std::process::id() % 200) as u16 * 10 + n;
        std::fs::write(
            &config,
            format!("client_timeout_ms = 500\nheartbeat_interval_ms = 20\nlog_level = \"warn\"\n[network]\nport = {port}\n"),
        )
        .unwrap();
        Self { dir, config }
    }

    fn dir(&self) -> &str {
        self.dir.to_str().unwrap()
    }

    /// `intergroup engine` on this setup's directory and config.
    fn engine_command(&self) -> Command {
        let mut cmd = bin();
        cmd.args([
            "engine",
            "--dir",
            self.dir(),
            "--config",
            self.config.to_str().unwrap(),
        ]);
        cmd
    }

    fn engine(&self) -> Guard {
        let child = self
            .engine_command()
            .stderr(Stdio::null())
            .spawn()
            .expect("start the engine");
        let pid = child.id();
        let guard = Guard(Some(child));
        self.until_running(pid);
        guard
    }

    /// Waits until the engine with this `pid` runs on the directory. A killed engine leaves
    /// its control file behind, and `stat` answers from it too (not alive), so a file and an
    /// answer alone do not say that a new engine has taken the directory yet.
    fn until_running(&self, pid: u32) {
        until("the engine's control file", || {
            stat(&self.dir)
                .is_some_and(|v| v["engine_pid"].as_u64() == Some(u64::from(pid)) && v["alive"] == true)
        });
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = std::fs::remove_file(&self.config);
    }
}

/// A child process of this test, killed (by PID) if the test ends without stopping it.
struct Guard(Option<Child>);

impl Guard {
    fn take(&mut self) -> Child {
        self.0.take().expect("running")
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `intergroup <what> --dir DIR --group GROUP <extra...>` on this setup's engine.
fn client(s: &Setup, what: &str, group: &str, extra: &[&str]) -> Command {
    let mut cmd = bin();
    cmd.args([what, "--dir", s.dir(), "--group", group]).args(extra);
    cmd
}

fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `intergroup stat --once --json`, when the engine answers.
fn stat(dir: &Path) -> Option<Value> {
    let out = bin()
        .args(["stat", "--once", "--json", "--dir", dir.to_str().unwrap()])
        .output()
        .ok()?;
    serde_json::from_slice(&out.stdout).ok()
}

fn counter(dir: &Path, name: &str) -> Option<u64> {
    stat(dir)?["counters"][name].as_u64()
}

/// Stops a child of ours by PID (SIGTERM), waiting for it.
fn terminate(mut g: Guard) -> std::process::ExitStatus {
    let mut c = g.take();
    // SAFETY: signals a child this test started.
    unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
    c.wait().unwrap()
}

/// Runs an engine on `s` that is expected to refuse and exit, and returns its output. One
/// that runs instead is killed (by PID) after 20 s and fails the test rather than hang it.
fn refused_engine(s: &Setup) -> std::process::Output {
    let mut child = s
        .engine_command()
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the engine");
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "the engine ran instead of refusing: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().unwrap()
}

fn kill9(c: &mut Child) {
    c.kill().unwrap();
    c.wait().unwrap();
}

#[test]
fn engine_pub_and_sub_move_every_line_once_in_order_and_stat_agrees() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let s = Setup::new("demo", 0);
    let engine = s.engine();
    const N: u64 = 100_000;
    let mut sub = client(
        &s,
        "sub",
        "demo",
        &["--count", &N.to_string(), "--format", "jsonl"],
    )
    .stdout(Stdio::piped())
    .spawn()
    .unwrap();
    let mut publisher = client(&s, "pub", "demo", &[])
        .stdin(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let lines: String = (1..=N).map(|i| format!("{i}\n")).collect();
    let mut stdin = publisher.stdin.take().unwrap();
    let feeder = std::thread::spawn(move || stdin.write_all(lines.as_bytes()));
    let mut out = String::new();
    sub.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    assert!(sub.wait().unwrap().success());
    feeder.join().unwrap().unwrap();
    assert!(publisher.wait().unwrap().success());
    let mut expected = 1u64;
    let mut seqs = Vec::new();
    for l in out.lines() {
        let v: Value = serde_json::from_str(l).unwrap();
        if v.get("event").is_some() {
            continue;
        }
        assert_eq!(
            v["payload"],
            Value::String(expected.to_string()),
            "line {expected} in order, once"
        );
        assert!(v["sender"].as_u64().is_some() && v["view"].as_u64().is_some());
        seqs.push(v["seq"].as_u64().unwrap());
        expected += 1;
    }
    assert_eq!(expected - 1, N, "every line arrived");
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "sequences consecutive");
    until("stat to show both sides' counts", || {
        counter(&s.dir, "messages_published") == Some(N) && counter(&s.dir, "messages_received") == Some(N)
    });
    assert!(terminate(engine).success(), "SIGTERM stops the engine cleanly");
    assert!(!s.dir.join("cnc").exists(), "a stopped engine removes its files");
}

#[test]
fn a_killed_publisher_is_reclaimed_and_others_go_on() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let s = Setup::new("killpub", 1);
    let engine = s.engine();
    let mut sub = client(&s, "sub", "g", &["--format", "jsonl"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut sub_out = BufReader::new(sub.stdout.take().unwrap());
    // At a bounded rate, so the subscriber's backlog stays small when the victim dies.
    let mut victim = client(&s, "pub", "g", &["--rate", "20000"])
        .stdin(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Keep it offering: kill -9 lands in the middle of its offers.
    let mut stdin = victim.stdin.take().unwrap();
    let feeder = std::thread::spawn(move || {
        for i in 0.. {
            if writeln!(stdin, "victim {i}").is_err() {
                return;
            }
        }
    });
    let mut line = String::new();
    until("the victim's messages", || {
        line.clear();
        sub_out.read_line(&mut line).unwrap();
        line.contains("victim")
    });
    kill9(&mut victim);
    feeder.join().unwrap();
    until("the engine to reclaim the dead publisher", || {
        counter(&s.dir, "clients_timed_out") == Some(1) && counter(&s.dir, "publications") == Some(0)
    });
    // The subscriber survived: a new publisher reaches it.
    let mut next = client(&s, "pub", "g", &[])
        .stdin(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    writeln!(next.stdin.take().unwrap(), "after").unwrap();
    until("the next publisher's message", || {
        line.clear();
        sub_out.read_line(&mut line).unwrap();
        line.contains("\"after\"")
    });
    assert!(next.wait().unwrap().success());
    kill9(&mut sub);
    assert!(terminate(engine).success());
}

#[test]
fn a_killed_engine_is_a_clear_error_for_its_clients_and_leaves_a_directory_the_next_one_takes() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let s = Setup::new("killengine", 2);
    let engine = s.engine();
    let mut sub = client(&s, "sub", "g", &[])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    until("the subscription", || counter(&s.dir, "subscriptions") == Some(1));
    let mut engine = engine;
    kill9(&mut engine.take());
    let killed = Instant::now();
    let status = sub.wait().unwrap();
    let mut err = String::new();
    sub.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("engine died"), "{err}");
    assert!(
        killed.elapsed() < Duration::from_secs(3),
        "within the timeout, no hang"
    );
    // A second engine refuses a directory in use, and takes over a dead one's.
    let next = s.engine();
    let out = refused_engine(&s);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("another engine"));
    assert!(terminate(next).success());
}

#[test]
fn a_bad_config_is_refused_with_its_line() {
    let s = Setup::new("badconfig", 3);
    std::fs::write(&s.config, "client_timeout_ms = 500\n[network]\nttl = \"high\"\n").unwrap();
    let out = refused_engine(&s);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(":3:"), "names line 3: {err}");
    let defaults = bin().args(["engine", "--print-default-config"]).output().unwrap();
    assert!(defaults.status.success());
    assert!(String::from_utf8_lossy(&defaults.stdout).contains("client_timeout_ms = 2000"));
}

#[test]
fn a_corrupted_control_file_is_a_clear_error_and_the_next_engine_replaces_it() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let s = Setup::new("corrupt", 4);
    std::fs::write(s.dir.join("cnc"), vec![0x5a; 4096]).unwrap();
    for args in [
        vec!["stat", "--once"],
        vec!["sub", "--group", "g"],
        vec!["pub", "--group", "g"],
    ] {
        let out = bin()
            .args(&args)
            .args(["--dir", s.dir()])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("corrupt"), "{args:?}: {err}");
    }
    let engine = s.engine();
    assert!(stat(&s.dir).unwrap()["alive"].as_bool().unwrap());
    assert!(terminate(engine).success());
}

#[test]
fn doctor_reports_every_check() {
    let out = bin().args(["doctor", "--json"]).output().unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["check"].as_str().unwrap())
        .collect();
    for n in [
        "io_uring",
        "multicast",
        "shared memory",
        "memlock limit",
        "socket buffers",
        "engine directory",
    ] {
        assert!(names.contains(&n), "{n} in {names:?}");
    }
    // Loopback multicast works here, so nothing fails.
    assert!(out.status.success(), "{v}");
}

#[test]
fn a_full_publication_holds_the_publisher_back_and_loses_nothing() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let s = Setup::new("full", 5);
    // A 64 KiB publication log fills at once; the stopped subscriber stays within the timeout.
    std::fs::write(
        &s.config,
        format!(
            "client_timeout_ms = 5000\npublication_log_bytes = 65536\nlog_level = \"warn\"\n[network]\nport = {}\n",
            46_000 + (std::process::id() % 200) as u16 * 10 + 5
        ),
    )
    .unwrap();
    let engine = s.engine();
    const N: u64 = 20_000;
    let mut sub = client(&s, "sub", "full", &["--count", &N.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    until("the subscription", || counter(&s.dir, "subscriptions") == Some(1));
    let mut publisher = client(&s, "pub", "full", &[])
        .stdin(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = publisher.stdin.take().unwrap();
    // Connected: the first line gets through.
    writeln!(stdin, "1").unwrap();
    until("the first message", || {
        counter(&s.dir, "messages_published") == Some(1)
    });
    // SAFETY: stops a child this test started.
    unsafe { libc::kill(sub.id() as i32, libc::SIGSTOP) };
    let lines: String = (2..=N).map(|i| format!("{i}\n")).collect();
    let feeder = std::thread::spawn(move || stdin.write_all(lines.as_bytes()));
    std::thread::sleep(Duration::from_millis(1000));
    assert!(
        publisher.try_wait().unwrap().is_none(),
        "the publisher waits on a full log"
    );
    // SAFETY: resumes it.
    unsafe { libc::kill(sub.id() as i32, libc::SIGCONT) };
    let mut out = String::new();
    sub.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    assert!(sub.wait().unwrap().success());
    feeder.join().unwrap().unwrap();
    assert!(publisher.wait().unwrap().success());
    let got: Vec<u64> = out.lines().map(|l| l.parse().unwrap()).collect();
    assert!(got.into_iter().eq(1..=N), "every line once, in order");
    assert!(terminate(engine).success());
}

/// Runs `intergroup ARGS` and returns its stdout, failing the test on a non-zero exit.
fn cli(args: &[&str]) -> String {
    let out = bin().args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// Everything an operator runs: keys, a signed policy, a secret, a secured group in the
/// config; the engine refuses a policy without its key, runs sealed with one, and rolls out a
/// new policy version on SIGHUP (and refuses a stale one, running on as before).
#[test]
fn a_secured_group_starts_from_a_signed_policy_and_rolls_out_a_new_version_on_sighup() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let s = Setup::new("secured", 4);
    let f = |name: &str| s.dir.with_extension(name).to_str().unwrap().to_string();
    let (admin_key, engine_key, other_key) = (f("admin.key"), f("engine.key"), f("other.key"));
    let admin = cli(&["keys", "gen", "--out", &admin_key]);
    let engine = cli(&["keys", "gen", "--out", &engine_key]);
    let other = cli(&["keys", "gen", "--out", &other_key]);
    let (policy, secret1, secret2) = (f("policy"), f("secret1"), f("secret2"));
    cli(&[
        "policy", "new", "--group", "vault", "--admin", &admin, "--out", &policy,
    ]);
    let add_member = |key: &str| {
        cli(&[
            "policy",
            "add",
            "--policy",
            &policy,
            "--key",
            key,
            "--roles",
            "publish,subscribe",
        ]);
    };
    add_member(&other);
    cli(&["policy", "sign", "--policy", &policy, "--key", &admin_key]);
    cli(&["keys", "secret", "--out", &secret1]);
    cli(&["keys", "secret", "--out", &secret2]);
    let base = std::fs::read_to_string(&s.config).unwrap();
    let write_config = |secret: &str, epoch: u32| {
        std::fs::write(
            &s.config,
            format!(
                "{base}[[group]]\nname = \"vault\"\npolicy = \"{policy}\"\nidentity = \"{engine_key}\"\n\
                 epoch_secret = \"{secret}\"\nepoch = {epoch}\n"
            ),
        )
        .unwrap();
    };
    write_config(&secret1, 1);
    // This engine's key is not in the policy yet: refused, saying why.
    let out = refused_engine(&s);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a member of the policy"), "{err}");

    add_member(&engine);
    cli(&["policy", "sign", "--policy", &policy, "--key", &admin_key]);
    let mut child = s.engine_command().stderr(Stdio::piped()).spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let pid = child.id();
    let guard = Guard(Some(child));
    let lines = std::sync::Arc::new(Mutex::new(Vec::<String>::new()));
    let sink = lines.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            sink.lock().unwrap().push(line);
        }
    });
    s.until_running(pid);
    // A publication joins the group: its datagrams (heartbeats at least) leave sealed.
    let mut publisher = client(&s, "pub", "vault", &[])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = publisher.stdin.take().unwrap();
    writeln!(input, "hello").unwrap();
    until("sealed datagrams", || {
        counter(&s.dir, "secure_sealed").unwrap_or(0) > 0
    });
    let pid = pid as i32;
    let saw = |what: &str| lines.lock().unwrap().iter().any(|l| l.contains(what));

    // Version 3 drops the other member, under a new secret, as epoch 2: rolled out.
    cli(&["policy", "remove", "--policy", &policy, "--key", &other]);
    cli(&["policy", "sign", "--policy", &policy, "--key", &admin_key]);
    write_config(&secret2, 2);
    // SAFETY: signals the engine this test started, by PID.
    unsafe { libc::kill(pid, libc::SIGHUP) };
    until("the roll-out", || saw("epoch 1 -> 2"));
    // Going back to the old secret and epoch is refused; the engine runs on in epoch 2.
    write_config(&secret1, 1);
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGHUP) };
    until("the refusal", || saw("reload refused"));
    assert!(
        stat(&s.dir).is_some(),
        "the engine runs on after a refused reload"
    );
    // The publisher waits for a receiver that never comes: stop it (ours, by PID).
    drop(input);
    kill9(&mut publisher);
    assert!(terminate(guard).success());
    for name in [
        "admin.key",
        "engine.key",
        "other.key",
        "policy",
        "secret1",
        "secret2",
    ] {
        let _ = std::fs::remove_file(f(name));
    }
}
