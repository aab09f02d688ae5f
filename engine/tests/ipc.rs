//! The shared-memory binding in one process: an engine daemon (`Driver`) on a private
//! directory, clients on it.

use intergroup_engine::ipc::{
    Client, Delivery, Driver, DriverConfig, IpcError, OfferError, Order, SubscriptionEvent,
};
use intergroup_secure::{EpochSecret, Identity, Policy, Role};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

static NEXT: AtomicU16 = AtomicU16::new(0);

/// An engine directory (not made yet) inside a fresh temporary one, which is removed with
/// everything in it when this is dropped, also when the test fails.
struct TestDir {
    path: PathBuf,
    _root: tempfile::TempDir,
}

impl std::ops::Deref for TestDir {
    type Target = std::path::Path;
    fn deref(&self) -> &std::path::Path {
        &self.path
    }
}

impl AsRef<std::path::Path> for TestDir {
    fn as_ref(&self) -> &std::path::Path {
        &self.path
    }
}

/// A fresh directory and a config whose groups use a port no other test uses.
fn setup(name: &str) -> (TestDir, DriverConfig) {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let root = tempfile::Builder::new()
        .prefix(&format!("ig-ipc-{name}-"))
        .tempdir()
        .expect("a temporary directory");
    let dir = TestDir {
        path: root.path().join("engine"),
        _root: root,
    };
    let mut cfg = DriverConfig {
        client_timeout_ms: 500,
        heartbeat_interval_ms: 20,
        publication_log_bytes: 1 << 16,
        subscription_log_bytes: 1 << 16,
        ..DriverConfig::default()
    };
    // A port of its own for every setup of this process: tests run in parallel, and two of them
    // running a group of the same name on one port hear each other (seen: two tests on one
    // port, both with a group "wide", and one of them times out).
    assert!(n < 64, "more setups than ports per test process");
    cfg.network.port = 30_000 + (std::process::id() % 500) as u16 * 64 + n;
    (dir, cfg)
}

/// An engine on `dir` with `cfg` as member `id` of its groups.
fn engine(dir: &std::path::Path, cfg: &DriverConfig, id: u32) -> Driver {
    Driver::start(
        dir,
        DriverConfig {
            member_id: id,
            ..cfg.clone()
        },
    )
    .unwrap()
}

fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn local_publication_reaches_local_subscription_in_order() {
    let (dir, cfg) = setup("local");
    let driver = Driver::start(&dir, cfg).unwrap();
    let client = Client::connect(&dir).unwrap();
    let mut publication = client.publication("demo", 1).unwrap();
    // No one listens yet.
    assert_eq!(publication.offer(b"early"), Err(OfferError::NotConnected));
    let mut subscription = client.subscription("demo", 1, Order::Fifo).unwrap();
    let mut events = Vec::new();
    until("the image", || {
        subscription
            .poll(16, |d| {
                if let Delivery::Event(e) = d {
                    events.push(e.clone());
                }
            })
            .unwrap();
        // The client's thread joins the image (connecting the publication) before the
        // subscription's poll reports it: wait for both.
        publication.is_connected() && !events.is_empty()
    });
    assert_eq!(
        events,
        vec![SubscriptionEvent::ImageAvailable {
            session: publication.id()
        }]
    );
    let total = 50_000u64;
    let mut sent = 0u64;
    let mut got = Vec::new();
    while (got.len() as u64) < total {
        while sent < total {
            let mut claim = match publication.try_claim(8) {
                Ok(c) => c,
                Err(OfferError::BackPressured) => break,
                Err(e) => panic!("{e}"),
            };
            claim.buf().copy_from_slice(&sent.to_le_bytes());
            claim.commit();
            sent += 1;
        }
        subscription
            .poll(256, |d| {
                if let Delivery::Message(m) = d {
                    assert_eq!(m.seq, u64::from_le_bytes(m.payload.try_into().unwrap()));
                    assert_eq!(m.session, publication.id());
                    got.push(m.seq);
                }
            })
            .unwrap();
    }
    assert!(got.iter().copied().eq(0..total), "every message once, in order");
    assert_eq!(publication.published(), total);
    assert_eq!(subscription.received(), total);
    // The counters reach the control file.
    until("counters", || {
        let c = intergroup_engine::ipc::cnc::Cnc::open(&dir.join("cnc"))
            .unwrap()
            .counters();
        let get = |n: &str| c.iter().find(|(k, _)| k == n).map(|(_, v)| *v);
        get("messages_published") == Some(total) && get("messages_received") == Some(total)
    });
    // Closing the publication ends the image after its last message.
    drop(publication);
    let mut ended = false;
    until("the image to end", || {
        subscription
            .poll(16, |d| {
                ended |= matches!(d, Delivery::Event(SubscriptionEvent::ImageUnavailable { .. }))
            })
            .unwrap();
        ended
    });
    drop((subscription, client));
    driver.close();
    assert!(!dir.join("cnc").exists(), "a closed engine removes its files");
}

#[test]
fn a_second_engine_is_refused_and_a_stale_directory_is_cleaned() {
    let (dir, cfg) = setup("lock");
    let driver = Driver::start(&dir, cfg.clone()).unwrap();
    match Driver::start(&dir, cfg.clone()) {
        Err(IpcError::DirectoryInUse { pid, .. }) => assert_eq!(pid, std::process::id()),
        other => panic!("expected DirectoryInUse, got {other:?}"),
    }
    drop(driver);
    // Files an engine left behind (as if it crashed) are removed by the next one.
    std::fs::write(dir.join("pub-99"), b"left over").unwrap();
    let driver = Driver::start(&dir, cfg).unwrap();
    assert!(!dir.join("pub-99").exists());
    drop(driver);
}

#[test]
fn clients_of_a_stopped_engine_get_typed_errors_not_hangs() {
    let (dir, cfg) = setup("dead");
    let driver = Driver::start(&dir, cfg).unwrap();
    let client = Client::connect(&dir).unwrap();
    let mut subscription = client.subscription("g", 2, Order::Fifo).unwrap();
    let mut publication = client.publication("g", 2).unwrap();
    until("connected", || {
        subscription.poll(16, |_| {}).unwrap();
        publication.is_connected()
    });
    driver.close();
    let start = Instant::now();
    until("EngineDead", || {
        publication.offer(b"x") == Err(OfferError::EngineDead)
    });
    assert!(start.elapsed() < Duration::from_secs(2));
    assert_eq!(subscription.poll(16, |_| {}), Err(IpcError::EngineDead));
    assert!(matches!(client.publication("g", 3), Err(IpcError::EngineDead)));
    assert!(matches!(Client::connect(&dir), Err(IpcError::NoEngine(_))));
}

#[test]
fn bad_requests_are_refused_with_reasons() {
    let (dir, cfg) = setup("bad");
    let driver = Driver::start(&dir, cfg).unwrap();
    let client = Client::connect(&dir).unwrap();
    assert!(matches!(
        client.publication("no spaces", 1),
        Err(IpcError::Config(_))
    ));
    assert!(matches!(
        client.publication(&"x".repeat(65), 1),
        Err(IpcError::Config(_))
    ));
    let mut publication = client.publication("big", 1).unwrap();
    let _subscription = client.subscription("big", 1, Order::Fifo).unwrap();
    let max = publication.max_message();
    assert!(matches!(
        publication.offer(&vec![0; max + 1]),
        Err(OfferError::TooLarge { .. })
    ));
    drop(client);
    drop(driver);
}

#[test]
fn a_full_publication_pushes_back_and_loses_nothing() {
    let (dir, cfg) = setup("full");
    let driver = Driver::start(&dir, cfg).unwrap();
    let client = Client::connect(&dir).unwrap();
    let mut subscription = client.subscription("full", 1, Order::Fifo).unwrap();
    let mut publication = client.publication("full", 1).unwrap();
    until("connected", || publication.is_connected());
    // The subscriber does not poll: the 64 KiB log fills and the publisher is told so.
    let mut sent = 0u64;
    loop {
        match publication.offer(&sent.to_le_bytes()) {
            Ok(()) => sent += 1,
            Err(OfferError::BackPressured) => break,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(sent > 1000, "a 64 KiB log holds more than {sent} small messages");
    assert_eq!(publication.offer(b"more"), Err(OfferError::BackPressured));
    let mut got = Vec::new();
    while (got.len() as u64) < sent {
        poll_messages(&mut subscription, &mut got);
    }
    assert!(
        got.into_iter().eq(0..sent),
        "everything accepted arrives, in order"
    );
    assert_eq!(publication.offer(b"room again"), Ok(()));
    drop((publication, subscription, client));
    driver.close();
}

#[test]
fn clients_at_once_each_get_their_own_answers() {
    let (dir, cfg) = setup("many");
    let driver = Driver::start(&dir, cfg).unwrap();
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let dir = dir.to_path_buf();
            std::thread::spawn(move || {
                let client = Client::connect(&dir).unwrap();
                for i in 0..20 {
                    let p = client.publication("many", t * 100 + i).unwrap();
                    let s = client.subscription("many", t * 100 + i, Order::Fifo).unwrap();
                    drop((p, s));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    driver.close();
}

#[test]
fn garbage_in_the_command_ring_is_counted_and_the_engine_goes_on() {
    let (dir, cfg) = setup("garbage");
    let driver = Driver::start(&dir, cfg).unwrap();
    let commands = intergroup_ring::RecordProducer::open(&dir.join("commands")).unwrap();
    let mut seed = 0x1234_5678_9abc_def0u64;
    for i in 0..500u32 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let len = (seed % 120) as usize;
        let bytes: Vec<u8> = (0..len).map(|k| (seed >> (k % 8 * 8)) as u8).collect();
        let _ = commands.offer(1 + i % 6, &bytes);
    }
    let cnc = intergroup_engine::ipc::cnc::Cnc::open(&dir.join("cnc")).unwrap();
    until("the garbage to be read", || {
        cnc.counters()
            .iter()
            .any(|(k, v)| k == "commands_rejected" && *v >= 400)
    });
    // Still serving.
    let client = Client::connect(&dir).unwrap();
    let _p = client.publication("after", 1).unwrap();
    assert!(driver.is_running());
}

/// Publishes the numbers `0..total` and returns what the (remote) subscription got, checking
/// that each came from member `sender` over the network and that no event came.
fn exchange(
    publication: &mut intergroup_engine::ipc::Publication,
    subscription: &mut intergroup_engine::ipc::Subscription,
    total: u64,
    sender: u32,
) -> Vec<u64> {
    let mut sent = 0;
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while (got.len() as u64) < total {
        assert!(Instant::now() < deadline, "only {} of {total} arrived", got.len());
        while sent < total && publication.offer(&sent.to_le_bytes()).is_ok() {
            sent += 1;
        }
        poll_remote(subscription, sender, &mut got);
    }
    got
}

/// Polls `subscription` once into `got`, checking that each message came from member `sender`
/// over the network and that no event came.
fn poll_remote(subscription: &mut intergroup_engine::ipc::Subscription, sender: u32, got: &mut Vec<u64>) {
    subscription
        .poll(256, |d| match d {
            Delivery::Message(m) => {
                assert_eq!(m.sender, sender);
                assert_eq!(m.session, 0, "from the network, not a local image");
                got.push(u64::from_le_bytes(m.payload.try_into().unwrap()));
            }
            Delivery::Event(e) => panic!("unexpected event {e:?}"),
        })
        .unwrap();
}

/// `min_receivers = 2` in the publisher's group entry: with one remote engine listening it
/// sends only its first window; once a second engine reports, the rest follows.
#[test]
fn a_minimum_of_receivers_holds_the_publisher_until_enough_engines_listen() {
    let (dir_a, mut cfg) = setup("min-a");
    let (dir_b, _) = setup("min-b");
    let (dir_c, _) = setup("min-c");
    cfg.subscription_log_bytes = 4 << 20;
    cfg.groups = vec![intergroup_engine::ipc::GroupEntry {
        membership: false,
        initial_members: 1,
        min_receivers: 2,
        ..toml_group("least")
    }];
    let window = intergroup_engine::proto::MemberConfig::default().window_frames as usize;
    let (a, b) = (engine(&dir_a, &cfg, 1), engine(&dir_b, &cfg, 2));
    let client_a = Client::connect(&dir_a).unwrap();
    let client_b = Client::connect(&dir_b).unwrap();
    let mut sub_b = client_b.subscription("least", 3, Order::Fifo).unwrap();
    let mut publication = client_a.publication("least", 3).unwrap();
    until("a remote receiver", || publication.is_connected());
    let mut sent = 0u64;
    // Offers the messages up to `limit` that the publication takes now.
    let offer_to = |p: &mut intergroup_engine::ipc::Publication, sent: &mut u64, limit: u64| {
        while *sent < limit && p.offer(&sent.to_le_bytes()).is_ok() {
            *sent += 1;
        }
    };
    let poll = |s: &mut intergroup_engine::ipc::Subscription, got: &mut Vec<u64>| poll_remote(s, 1, got);
    // Engine B alone: the first window, and nothing more however long it waits.
    let first = 2 * window as u64;
    let mut got_b = Vec::new();
    until("the first window at B", || {
        offer_to(&mut publication, &mut sent, first);
        poll(&mut sub_b, &mut got_b);
        got_b.len() >= window
    });
    let quiet = Instant::now() + Duration::from_millis(300);
    while Instant::now() < quiet {
        offer_to(&mut publication, &mut sent, first);
        poll(&mut sub_b, &mut got_b);
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(
        got_b.len(),
        window,
        "one receiver of two: the sender holds after its first window"
    );
    // Engine C joins late: now two receive, and the publisher goes on. (C's engine repairs
    // the stream from its start, but its subscription sees what arrives once it is attached:
    // the simulator test of min_receivers checks the repair itself.) C's engine may take in
    // everything published so far before its subscription attaches (seen on a loaded machine:
    // C delivered every message, to no subscriber), so the publisher goes on a message at a
    // time until C's subscription sees one, and then sends one more window.
    let c = engine(&dir_c, &cfg, 3);
    let client_c = Client::connect(&dir_c).unwrap();
    let mut sub_c = client_c.subscription("least", 3, Order::Fifo).unwrap();
    let mut got_c = Vec::new();
    until("a message at C", || {
        let next = sent.max(first) + 1;
        offer_to(&mut publication, &mut sent, next);
        poll(&mut sub_b, &mut got_b);
        poll(&mut sub_c, &mut got_c);
        !got_c.is_empty()
    });
    let total = sent.max(first) + window as u64;
    until("every message at B, and the last at C", || {
        offer_to(&mut publication, &mut sent, total);
        poll(&mut sub_b, &mut got_b);
        poll(&mut sub_c, &mut got_c);
        got_b.len() as u64 == total && got_c.last() == Some(&(total - 1))
    });
    assert!(got_b.into_iter().eq(0..total), "B: every message once, in order");
    let first_c = got_c[0];
    assert!(
        got_c.into_iter().eq(first_c..total),
        "C: every message from its first on, once, in order"
    );
    drop((publication, sub_b, sub_c, client_a, client_b, client_c));
    a.close();
    b.close();
    c.close();
}

#[test]
fn a_remote_engine_gets_the_stream_over_udp() {
    let (dir_a, mut cfg) = setup("remote-a");
    let (dir_b, _) = setup("remote-b");
    // The remote log holds the whole run: this test checks delivery, not lapping.
    cfg.subscription_log_bytes = 4 << 20;
    // Two engines on one host, one group address: they meet over loopback multicast.
    let (a, b) = (engine(&dir_a, &cfg, 1), engine(&dir_b, &cfg, 2));
    let client_a = Client::connect(&dir_a).unwrap();
    let client_b = Client::connect(&dir_b).unwrap();
    let mut subscription = client_b.subscription("wide", 3, Order::Fifo).unwrap();
    let mut publication = client_a.publication("wide", 3).unwrap();
    // Connected once engine B reports as a receiver to engine A.
    until("a remote receiver", || publication.is_connected());
    let got = exchange(&mut publication, &mut subscription, 20_000, 1);
    assert!(
        got.into_iter().eq(0..20_000),
        "every message once, in order, over UDP"
    );
    drop((publication, subscription, client_a, client_b));
    a.close();
    b.close();
}

#[test]
fn a_subscriber_beyond_the_reader_slots_is_told_not_left_waiting() {
    let (dir, mut cfg) = setup("slots");
    cfg.max_subscribers = 1;
    let driver = Driver::start(&dir, cfg).unwrap();
    let client = Client::connect(&dir).unwrap();
    let mut publication = client.publication("slots", 1).unwrap();
    // Two slots (one kept for the engine's network reader, unused without remote members):
    // two subscribers join, the third is told it cannot.
    let mut first = client.subscription("slots", 1, Order::Fifo).unwrap();
    let mut other = client.subscription("slots", 1, Order::Fifo).unwrap();
    until("connected", || publication.is_connected());
    let mut joined = false;
    until("the second subscriber to join", || {
        other
            .poll(16, |d| {
                joined |= matches!(d, Delivery::Event(SubscriptionEvent::ImageAvailable { .. }))
            })
            .unwrap();
        joined
    });
    let mut second = client.subscription("slots", 1, Order::Fifo).unwrap();
    let mut told = false;
    until("the refusal", || {
        second
            .poll(16, |d| {
                told |= matches!(d, Delivery::Event(SubscriptionEvent::ImageUnreadable { .. }))
            })
            .unwrap();
        told
    });
    first.poll(16, |_| {}).unwrap();
    drop((publication, first, other, second, client));
    driver.close();
}

#[test]
fn two_engines_with_membership_deliver_one_total_order() {
    let (dir_a, mut cfg) = setup("total-a");
    let (dir_b, _) = setup("total-b");
    cfg.groups.push(toml_group("ordered"));
    cfg.subscription_log_bytes = 4 << 20;
    let (a, b) = (engine(&dir_a, &cfg, 1), engine(&dir_b, &cfg, 2));
    let client_a = Client::connect(&dir_a).unwrap();
    let client_b = Client::connect(&dir_b).unwrap();
    let mut subs = [
        client_a.subscription("ordered", 1, Order::Total).unwrap(),
        client_b.subscription("ordered", 1, Order::Total).unwrap(),
    ];
    // A group without membership refuses total order, with a reason.
    match client_a.subscription("plain", 1, Order::Total) {
        Err(IpcError::Refused { message, .. }) => assert!(message.contains("membership"), "{message}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    let mut pubs = [
        client_a.publication("ordered", 1).unwrap(),
        client_b.publication("ordered", 1).unwrap(),
    ];
    let per = 2_000u32;
    let mut sent = [0u32; 2];
    let mut got: [Vec<(u32, u32)>; 2] = [Vec::new(), Vec::new()];
    let mut views = [0u32; 2];
    let deadline = Instant::now() + Duration::from_secs(30);
    while got.iter().any(|g| g.len() < 2 * per as usize) {
        assert!(
            Instant::now() < deadline,
            "only {} and {} of {} arrived",
            got[0].len(),
            got[1].len(),
            2 * per
        );
        for (i, p) in pubs.iter_mut().enumerate() {
            while sent[i] < per {
                let mut msg = [0u8; 8];
                msg[..4].copy_from_slice(&(i as u32).to_le_bytes());
                msg[4..].copy_from_slice(&sent[i].to_le_bytes());
                if p.offer(&msg).is_err() {
                    break;
                }
                sent[i] += 1;
            }
        }
        for (i, s) in subs.iter_mut().enumerate() {
            s.poll(256, |d| match d {
                Delivery::Message(m) => {
                    assert!(views[i] > 0, "a message before any view");
                    let who = u32::from_le_bytes(m.payload[..4].try_into().unwrap());
                    let k = u32::from_le_bytes(m.payload[4..].try_into().unwrap());
                    got[i].push((who, k));
                }
                Delivery::Event(SubscriptionEvent::View {
                    view,
                    members,
                    primary,
                    ..
                }) => {
                    assert!(*primary, "one host, no partition: the view is primary");
                    if *members == 2 {
                        views[i] = *view;
                    }
                }
                Delivery::Event(e) => panic!("unexpected event {e:?}"),
            })
            .unwrap();
        }
    }
    assert_eq!(got[0], got[1], "both engines deliver one total order");
    for who in 0..2u32 {
        let mine: Vec<u32> = got[0].iter().filter(|m| m.0 == who).map(|m| m.1).collect();
        assert!(
            mine.into_iter().eq(0..per),
            "every message of engine {who} once, in its order"
        );
    }
    drop((pubs, subs, client_a, client_b));
    a.close();
    b.close();
}

fn toml_group(name: &str) -> intergroup_engine::ipc::GroupEntry {
    intergroup_engine::ipc::GroupEntry {
        name: name.into(),
        address: None,
        peers: Vec::new(),
        unicast_port: 0,
        min_receivers: 0,
        membership: true,
        initial_members: 2,
        fail_timeout_ms: 1000,
        policy: None,
        identity: None,
        epoch_secret: None,
        epoch: 1,
        key_update_s: 600,
    }
}

/// Key files for seeds `seeds`, an epoch secret and a policy for group `name` (members with
/// roles, valid until `not_after`, signed by `signer`), all in `dir`.
fn secured_files(
    dir: &std::path::Path,
    name: &str,
    members: &[(u8, &[Role])],
    not_after: u64,
    signer: &Identity,
) -> (PathBuf, PathBuf) {
    std::fs::create_dir_all(dir).unwrap();
    let admin = Identity::from_seed(&[200; 32]);
    let mut policy = Policy::new(name, vec![admin.public()], 0, not_after).unwrap();
    for (seed, roles) in members {
        let id = Identity::from_seed(&[*seed; 32]);
        policy
            .add_member(&format!("engine{seed}"), id.public(), roles.to_vec())
            .unwrap();
    }
    // Signing with a non-admin key fails; write such a policy by hand to test the refusal.
    if policy.sign(signer).is_err() {
        policy.signature = Some(intergroup_secure::policy::PolicySignature {
            signer: signer.public(),
            value: hex_sig(&signer.sign(&policy.signing_bytes())),
        });
    }
    let policy_path = dir.join(format!("{name}.policy"));
    policy.save(&policy_path).unwrap();
    let secret = dir.join(format!("{name}.secret"));
    if !secret.exists() {
        EpochSecret::from_bytes([77; 32]).save(&secret, false).unwrap();
    }
    (policy_path, secret)
}

/// A counter of the engine on `dir`, by name (0 if it has none by that name).
fn counter(dir: &std::path::Path, name: &str) -> u64 {
    let cnc = intergroup_engine::ipc::cnc::Cnc::open(&dir.join("cnc")).unwrap();
    cnc.counters()
        .into_iter()
        .find(|(k, _)| k == name)
        .map_or(0, |(_, v)| v)
}

fn hex_sig(b: &[u8; 64]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn key_file(dir: &std::path::Path, seed: u8) -> PathBuf {
    let path = dir.join(format!("engine{seed}.key"));
    if !path.exists() {
        Identity::from_seed(&[seed; 32]).save(&path, false).unwrap();
    }
    path
}

fn secured_group(
    name: &str,
    policy: &std::path::Path,
    key: PathBuf,
    secret: &std::path::Path,
) -> intergroup_engine::ipc::GroupEntry {
    intergroup_engine::ipc::GroupEntry {
        membership: false,
        policy: Some(policy.to_path_buf()),
        identity: Some(key),
        epoch_secret: Some(secret.to_path_buf()),
        ..toml_group(name)
    }
}

#[test]
fn a_secured_group_admits_listed_engines_in_their_roles_and_refuses_bad_policies() {
    let (dir_a, mut cfg) = setup("secure-a");
    let (dir_b, _) = setup("secure-b");
    let files = dir_a.with_extension("files");
    let admin = Identity::from_seed(&[200; 32]);
    let both: &[Role] = &[Role::Publish, Role::Subscribe];
    let listen: &[Role] = &[Role::Subscribe];
    let (policy, secret) = secured_files(&files, "vault", &[(1, both), (2, listen)], u64::MAX, &admin);
    cfg.subscription_log_bytes = 4 << 20;
    let with = |key: u8, policy: &std::path::Path| {
        let mut c = cfg.clone();
        c.groups = vec![secured_group("vault", policy, key_file(&files, key), &secret)];
        c
    };
    let a = Driver::start(&dir_a, with(1, &policy)).unwrap();
    let b = Driver::start(&dir_b, with(2, &policy)).unwrap();
    let client_a = Client::connect(&dir_a).unwrap();
    let client_b = Client::connect(&dir_b).unwrap();
    // Engine 2 may only subscribe.
    match client_b.publication("vault", 1) {
        Err(IpcError::Refused { message, .. }) => assert!(message.contains("publish"), "{message}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    let mut subscription = client_b.subscription("vault", 1, Order::Fifo).unwrap();
    let mut publication = client_a.publication("vault", 1).unwrap();
    until("a remote receiver", || publication.is_connected());
    let sender = Identity::from_seed(&[1; 32]).public().member_id();
    let got = exchange(&mut publication, &mut subscription, 5_000, sender);
    assert!(
        got.into_iter().eq(0..5_000),
        "every message once, in order, sealed"
    );
    // The engines' counters say the traffic was sealed and nothing was refused.
    until("counters published", || {
        counter(&dir_a, "secure_sealed") > 0 && counter(&dir_b, "secure_opened") > 0
    });
    assert_eq!(counter(&dir_b, "secure_rejected_bad_tag"), 0);
    drop((publication, subscription, client_a, client_b));
    a.close();
    b.close();

    // Engines the policy does not admit, or with a policy that does not check out, refuse to
    // start, saying why.
    let (dir_c, _) = setup("secure-c");
    let refused = |c: DriverConfig, why: &str| match Driver::start(&dir_c, c) {
        Err(IpcError::Config(m)) => assert!(m.contains(why), "{m}"),
        Err(e) => panic!("expected a config error about {why}, got {e}"),
        Ok(_) => panic!("an engine started although {why}"),
    };
    refused(with(3, &policy), "not a member");
    let (expired, _) = secured_files(&files.join("expired"), "vault", &[(1, both)], 1000, &admin);
    refused(with(1, &expired), "expired");
    let (forged, _) = secured_files(
        &files.join("forged"),
        "vault",
        &[(1, both)],
        u64::MAX,
        &Identity::from_seed(&[1; 32]),
    );
    refused(with(1, &forged), "not an admin");
    let text = std::fs::read_to_string(&policy)
        .unwrap()
        .replace("engine2", "mallory");
    let tampered = files.join("tampered.policy");
    std::fs::write(&tampered, text).unwrap();
    refused(with(1, &tampered), "signature");
    let _ = std::fs::remove_dir_all(&files);
}

const BOTH: &[Role] = &[Role::Publish, Role::Subscribe];

/// Three engines' directories, their configuration, and the files of group "vault": policy
/// version 1 listing engines 1, 2 and 3 in both roles, signed by the admin, and a secret.
struct ThreeEngines {
    dirs: [TestDir; 3],
    cfg: DriverConfig,
    files: PathBuf,
    admin: Identity,
    v1: PathBuf,
    secret1: PathBuf,
}

fn three_engines(prefix: &str) -> ThreeEngines {
    let (dir_a, mut cfg) = setup(&format!("{prefix}-a"));
    let (dir_b, _) = setup(&format!("{prefix}-b"));
    let (dir_c, _) = setup(&format!("{prefix}-c"));
    cfg.subscription_log_bytes = 4 << 20;
    let files = dir_a.with_extension("files");
    let admin = Identity::from_seed(&[200; 32]);
    let (v1, secret1) = secured_files(
        &files,
        "vault",
        &[(1, BOTH), (2, BOTH), (3, BOTH)],
        u64::MAX,
        &admin,
    );
    ThreeEngines {
        dirs: [dir_a, dir_b, dir_c],
        cfg,
        files,
        admin,
        v1,
        secret1,
    }
}

/// A new policy version without one engine, with a new secret and epoch, rolled out to the
/// others while they run: the dropped engine hears nothing after it and is no longer heard;
/// stale or same-epoch roll-outs are refused and change nothing.
#[test]
fn a_new_policy_version_rolls_out_and_the_dropped_engine_is_cut_off() {
    let ThreeEngines {
        dirs: [dir_a, dir_b, dir_c],
        cfg,
        files,
        admin,
        v1,
        secret1,
    } = three_engines("rollout");
    let both = BOTH;
    let with = |key: u8, policy: &std::path::Path, secret: &std::path::Path, epoch: u32| {
        let mut c = cfg.clone();
        let mut g = secured_group("vault", policy, key_file(&files, key), secret);
        g.epoch = epoch;
        c.groups = vec![g];
        c
    };
    let engines = [
        Driver::start(&dir_a, with(1, &v1, &secret1, 1)).unwrap(),
        Driver::start(&dir_b, with(2, &v1, &secret1, 1)).unwrap(),
        Driver::start(&dir_c, with(3, &v1, &secret1, 1)).unwrap(),
    ];
    let client_a = Client::connect(&dir_a).unwrap();
    let (client_b, client_c) = (Client::connect(&dir_b).unwrap(), Client::connect(&dir_c).unwrap());
    let mut sub_b = client_b.subscription("vault", 1, Order::Fifo).unwrap();
    let mut sub_c = client_c.subscription("vault", 1, Order::Fifo).unwrap();
    let mut publication = client_a.publication("vault", 1).unwrap();
    until("two remote receivers", || publication.is_connected());
    let sender = Identity::from_seed(&[1; 32]).public().member_id();
    let got_c = exchange(&mut publication, &mut sub_c, 1_000, sender);
    let mut got_b: Vec<u64> = Vec::new();
    until("engine b has the first thousand", || {
        poll_messages(&mut sub_b, &mut got_b);
        got_b.len() == 1_000
    });

    // Version 2 drops engine 3, under a secret it never gets, as epoch 2.
    let v2_files = files.join("v2");
    let (v2, _) = secured_files(&v2_files, "vault", &[(1, both), (2, both)], u64::MAX, &admin);
    let mut p2 = Policy::load(&v2).unwrap();
    p2.version = 5;
    p2.sign(&admin).unwrap();
    p2.save(&v2).unwrap();
    let secret2 = v2_files.join("next.secret");
    EpochSecret::from_bytes([78; 32]).save(&secret2, false).unwrap();
    // Refused: the running policy again under a new epoch, and the new policy in the old epoch.
    assert!(engines[0].reload(with(1, &v1, &secret2, 2)).is_err());
    assert!(engines[0].reload(with(1, &v2, &secret1, 1)).is_err());
    let changes = engines[0].reload(with(1, &v2, &secret2, 2)).unwrap();
    assert_eq!(changes.len(), 1, "{changes:?}");
    engines[1].reload(with(2, &v2, &secret2, 2)).unwrap();

    // Engine c no longer counts for flow control once a stops hearing it; b gets everything.
    let mut sent = 1_000u64;
    let deadline = Instant::now() + Duration::from_secs(30);
    while got_b.len() < 2_000 {
        assert!(
            Instant::now() < deadline,
            "engine b has only {} of 2000",
            got_b.len()
        );
        while sent < 2_000 && publication.offer(&sent.to_le_bytes()).is_ok() {
            sent += 1;
        }
        poll_messages(&mut sub_b, &mut got_b);
    }
    assert!(
        got_b.iter().copied().eq(0..2_000),
        "engine b: every message once, in order"
    );
    // Engine c got the first epoch's messages and nothing of the second.
    std::thread::sleep(Duration::from_millis(200));
    let mut late = 0;
    sub_c
        .poll(1024, |d| {
            if let Delivery::Message(_) = d {
                late += 1;
            }
        })
        .unwrap();
    assert_eq!((got_c.len(), late), (1_000, 0));
    until("engine c counting what it cannot open", || {
        counter(&dir_c, "secure_rejected_unknown_epoch") > 0
    });
    until("engine a no longer hearing engine c", || {
        counter(&dir_a, "secure_rejected_not_member") > 0
    });
    drop((publication, sub_b, sub_c, client_a, client_b, client_c));
    for e in engines {
        e.close();
    }
    let _ = std::fs::remove_dir_all(&files);
}

/// A secured group with membership is refused a new key while it runs (views are not MLS
/// epochs yet), before anything moves, and keeps running.
#[test]
fn a_secured_membership_group_refuses_a_roll_out_and_runs_on() {
    let (dir, cfg) = setup("rollout-membership");
    let files = dir.with_extension("files");
    let admin = Identity::from_seed(&[200; 32]);
    let both: &[Role] = &[Role::Publish, Role::Subscribe];
    let (v1, secret1) = secured_files(&files, "vault", &[(1, both)], u64::MAX, &admin);
    let with = |policy: &std::path::Path, secret: &std::path::Path, epoch: u32| {
        let mut c = cfg.clone();
        let mut g = secured_group("vault", policy, key_file(&files, 1), secret);
        g.membership = true;
        g.initial_members = 1;
        g.epoch = epoch;
        c.groups = vec![g];
        c
    };
    let driver = Driver::start(&dir, with(&v1, &secret1, 1)).unwrap();
    let client = Client::connect(&dir).unwrap();
    let _subscription = client.subscription("vault", 1, Order::Total).unwrap();
    let v2_files = files.join("v2");
    let (v2, _) = secured_files(&v2_files, "vault", &[(1, both)], u64::MAX, &admin);
    let mut p2 = Policy::load(&v2).unwrap();
    p2.version = 9;
    p2.sign(&admin).unwrap();
    p2.save(&v2).unwrap();
    let secret2 = v2_files.join("next.secret");
    EpochSecret::from_bytes([79; 32]).save(&secret2, false).unwrap();
    match driver.reload(with(&v2, &secret2, 2)) {
        Err(IpcError::Config(m)) => assert!(m.contains("membership"), "{m}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(driver.is_running());
    drop((_subscription, client));
    driver.close();
    let _ = std::fs::remove_dir_all(&files);
}

/// Polls `sub` into `got` (message payloads as u64); returns the member count of the last
/// view event it saw.
fn poll_messages(sub: &mut intergroup_engine::ipc::Subscription, got: &mut Vec<u64>) -> Option<u32> {
    let mut view = None;
    sub.poll(256, |d| match d {
        Delivery::Message(m) => got.push(u64::from_le_bytes(m.payload.try_into().unwrap())),
        Delivery::Event(SubscriptionEvent::View { members, .. }) => view = Some(*members),
        Delivery::Event(_) => {}
    })
    .unwrap();
    view
}

/// Three engine daemons keyed by MLS (membership, a policy and keys, no pre-shared secret):
/// they form a group, deliver in total order, and a policy version that drops one engine,
/// rolled out by reload, removes it by the next view's commit; it reads nothing more.
#[test]
fn mls_keyed_daemons_form_a_group_and_a_roll_out_removes_the_dropped_engine() {
    let ThreeEngines {
        dirs: [dir_a, dir_b, dir_c],
        cfg,
        files,
        admin,
        v1,
        ..
    } = three_engines("mls");
    let both = BOTH;
    let with = |key: u8, policy: &std::path::Path| {
        let mut c = cfg.clone();
        c.groups = vec![intergroup_engine::ipc::GroupEntry {
            policy: Some(policy.to_path_buf()),
            identity: Some(key_file(&files, key)),
            initial_members: 3,
            ..toml_group("vault")
        }];
        c
    };
    // Without membership, MLS cannot key a group: the engine says so.
    let mut plain = with(1, &v1);
    plain.groups[0].membership = false;
    match Driver::start(setup("mls-refused").0, plain) {
        Err(IpcError::Config(m)) => assert!(m.contains("membership"), "{m}"),
        other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
    }
    let engines = [
        Driver::start(&dir_a, with(1, &v1)).unwrap(),
        Driver::start(&dir_b, with(2, &v1)).unwrap(),
        Driver::start(&dir_c, with(3, &v1)).unwrap(),
    ];
    let clients = [&dir_a, &dir_b, &dir_c].map(|d| Client::connect(d).unwrap());
    let mut subs: Vec<_> = clients
        .iter()
        .map(|c| c.subscription("vault", 1, Order::Total).unwrap())
        .collect();
    let mut publication = clients[0].publication("vault", 1).unwrap();
    let mut got: [Vec<u64>; 3] = Default::default();
    let mut sent = 0u64;
    until("all three have the first 500", || {
        while sent < 500 && publication.offer(&sent.to_le_bytes()).is_ok() {
            sent += 1;
        }
        for (s, g) in subs.iter_mut().zip(got.iter_mut()) {
            poll_messages(s, g);
        }
        got.iter().all(|g| g.len() == 500)
    });
    for g in &got {
        assert!(g.iter().copied().eq(0..500), "every message once, in order");
    }
    until("engines sealing, signing and keyed by MLS", || {
        counter(&dir_b, "secure_opened") > 0
            && counter(&dir_b, "secure_signed") > 0
            && counter(&dir_b, "secure_verified") > 0
            && counter(&dir_b, "mls_epochs_installed") > 0
    });
    assert_eq!(counter(&dir_b, "secure_rejected_bad_tag"), 0);
    assert_eq!(counter(&dir_b, "mls_key_errors"), 0);

    // Version 2 drops engine c; a and b take it by reload (SIGHUP in `intergroup engine`).
    let v2_files = files.join("v2");
    let (v2, _) = secured_files(&v2_files, "vault", &[(1, both), (2, both)], u64::MAX, &admin);
    let mut p2 = Policy::load(&v2).unwrap();
    p2.version = 5;
    p2.sign(&admin).unwrap();
    p2.save(&v2).unwrap();
    let changes = engines[0].reload(with(1, &v2)).unwrap();
    assert!(changes.iter().any(|c| c.contains("MLS")), "{changes:?}");
    engines[1].reload(with(2, &v2)).unwrap();
    // The roll-out is refused with a pre-shared secret on an MLS-keyed group.
    let mut mixed = with(1, &v2);
    mixed.groups[0].epoch_secret = Some(files.join("vault.secret"));
    assert!(engines[0].reload(mixed).is_err());
    until("the view without c", || {
        poll_messages(&mut subs[0], &mut got[0]) == Some(2)
    });
    until("a and b have the next 500", || {
        while sent < 1_000 && publication.offer(&sent.to_le_bytes()).is_ok() {
            sent += 1;
        }
        for (s, g) in subs.iter_mut().zip(got.iter_mut()).take(2) {
            poll_messages(s, g);
        }
        got[0].len() == 1_000 && got[1].len() == 1_000
    });
    assert_eq!(got[0], got[1], "a and b: one order");
    std::thread::sleep(Duration::from_millis(300));
    poll_messages(&mut subs[2], &mut got[2]);
    assert_eq!(got[2].len(), 500, "engine c read messages sent after its removal");
    drop((publication, subs, clients));
    for e in engines {
        e.close();
    }
    let _ = std::fs::remove_dir_all(&files);
}
