//! The Secure Group Layer's data plane over real loopback sockets: sealed groups deliver
//! everything to their members, on both backends and under loss, and every attack is rejected,
//! counted by reason and costs honest members nothing.

use intergroup_engine::runtime::{BackendKind, Engine, EngineConfig, GroupConfig, OfferError};
use intergroup_engine::shield::{Rejection, ShieldEpoch, ShieldStats};
use intergroup_engine::{Event, MemberConfig, Output};
use intergroup_secure::EpochSecret;
use socket2::{Domain, Protocol, Socket, Type};
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const GROUP: u32 = 9;
const GROUP_ADDR: Ipv4Addr = Ipv4Addr::new(239, 255, 77, 1);

fn port() -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    43_100 + (std::process::id() % 400) as u16 * 8 + NEXT.fetch_add(1, Ordering::Relaxed)
}

fn epoch(n: u32, secret: u8, members: &[(u32, bool)]) -> ShieldEpoch {
    ShieldEpoch {
        epoch: n,
        secret: EpochSecret::from_bytes([secret; 32]),
        members: members.to_vec(),
    }
}

fn group(id: u32, port: u16, secure: Option<ShieldEpoch>, loss: f64, seed: u64) -> GroupConfig {
    let mut g = GroupConfig::new(MemberConfig {
        group: GROUP,
        member_id: id,
        ..MemberConfig::default()
    });
    g.udp.group.set_port(port);
    g.receive_loss = loss;
    g.loss_seed = seed;
    g.seed = seed ^ u64::from(id);
    g.secure = secure;
    g
}

fn engine(backend: BackendKind) -> Engine {
    Engine::launch(EngineConfig {
        backend,
        ..EngineConfig::default()
    })
    .expect("engine starts")
}

fn message(i: u64) -> Vec<u8> {
    let mut m = vec![i as u8; 16 + (i % 300) as usize];
    m[..8].copy_from_slice(&i.to_le_bytes());
    m
}

/// Subscribes and checks that `from`'s messages 0.. arrive in order with their content, and
/// that nothing arrives from anyone else; reports the count reached at `count`.
fn expect_messages(e: &Engine, id: u32, from: u32, count: u64, tx: mpsc::Sender<(u32, Result<u64, String>)>) {
    let mut next = 0u64;
    e.subscribe(GROUP, move |out: &Output<'_>| match out {
        Output::Message(m) => {
            if m.sender != from {
                let _ = tx.send((id, Err(format!("a message from {} was delivered", m.sender))));
                return;
            }
            if m.payload != message(next) {
                let _ = tx.send((id, Err(format!("message {next}: wrong content or order"))));
            }
            next += 1;
            if next == count {
                let _ = tx.send((id, Ok(next)));
            }
        }
        Output::Event(e @ Event::UnrecoverableLoss { .. }) => {
            let _ = tx.send((id, Err(format!("{e:?}"))));
        }
        Output::Event(_) => {}
    })
    .unwrap();
}

fn publish(e: &Engine, count: u64) {
    let mut p = e.publication(GROUP, 1).unwrap();
    for i in 0..count {
        let m = message(i);
        loop {
            match p.offer(&m) {
                Ok(()) => break,
                Err(OfferError::BackPressured) => std::thread::yield_now(),
                Err(e) => panic!("offer: {e}"),
            }
        }
    }
}

fn wait_all(rx: &mpsc::Receiver<(u32, Result<u64, String>)>, n: usize, count: u64, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    for _ in 0..n {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok((_, Ok(got))) => assert_eq!(got, count),
            Ok((id, Err(e))) => panic!("{what}: receiver {id}: {e}"),
            Err(_) => panic!("{what}: timed out"),
        }
    }
}

/// Offers messages `range` on `p`, waiting while it is back-pressured.
fn send_range(p: &mut intergroup_engine::runtime::Publication, range: std::ops::Range<u64>) {
    for i in range {
        let m = message(i);
        while let Err(e) = p.offer(&m) {
            assert_eq!(e, OfferError::BackPressured);
            std::thread::yield_now();
        }
    }
}

/// Waits up to 20 s for `f` to hold.
fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn secure_stats(e: &Engine) -> ShieldStats {
    e.stats(GROUP)
        .unwrap()
        .secure
        .expect("a secured group has shield stats")
}

fn sealed_one_to_two(backend: BackendKind, loss: f64, seed: u64) {
    let port = port();
    let members = [(1, true), (2, true), (3, true)];
    let count = 50_000;
    let sender = engine(backend);
    sender
        .join(group(1, port, Some(epoch(1, 5, &members)), 0.0, seed))
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let mut receivers = Vec::new();
    for id in [2u32, 3] {
        let e = engine(backend);
        e.join(group(
            id,
            port,
            Some(epoch(1, 5, &members)),
            loss,
            seed + u64::from(id),
        ))
        .unwrap();
        expect_messages(&e, id, 1, count, tx.clone());
        receivers.push(e);
    }
    assert!(
        sender.wait_receivers(GROUP, 2, Duration::from_secs(10)).unwrap(),
        "seed {seed}: the receivers did not report"
    );
    publish(&sender, count);
    wait_all(&rx, 2, count, &format!("seed {seed}, loss {loss}"));
    assert!(sender
        .wait_acknowledged(GROUP, 2, Duration::from_secs(10))
        .unwrap());
    for r in &receivers {
        let s = secure_stats(r);
        assert!(s.opened > 0);
        assert_eq!(s.rejected_total(), 0, "seed {seed}: {s:?}");
    }
    assert!(secure_stats(&sender).sealed > 0);
    if loss > 0.0 {
        let c = sender.stats(GROUP).unwrap().counters;
        assert!(c.get(intergroup_engine::Counter::Retransmissions) > 0);
    }
}

#[test]
fn io_uring_sealed_one_to_two() {
    sealed_one_to_two(BackendKind::IoUring, 0.0, 1);
}

#[test]
fn portable_sealed_one_to_two() {
    sealed_one_to_two(BackendKind::Portable, 0.0, 2);
}

#[test]
fn io_uring_sealed_one_to_two_with_loss() {
    sealed_one_to_two(BackendKind::IoUring, 0.05, 3);
}

#[test]
fn portable_sealed_one_to_two_with_loss() {
    sealed_one_to_two(BackendKind::Portable, 0.05, 4);
}

/// A socket that hears the group's datagrams, as an attacker on the host would.
fn eavesdropper(port: u16) -> UdpSocket {
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).unwrap();
    s.set_reuse_address(true).unwrap();
    s.bind(&SocketAddrV4::new(GROUP_ADDR, port).into()).unwrap();
    s.join_multicast_v4(&GROUP_ADDR, &Ipv4Addr::LOCALHOST).unwrap();
    s.set_multicast_if_v4(&Ipv4Addr::LOCALHOST).unwrap();
    s.set_multicast_ttl_v4(0).unwrap();
    s.set_multicast_loop_v4(true).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    s.into()
}

#[test]
fn outsiders_strangers_subscribers_and_tampering_are_rejected_and_counted() {
    let port = port();
    // Member 1 publishes; 2 and 3 may only subscribe; 4 is listed but its secret never left
    // the admin (the engine claiming it is an outsider).
    let members = [(1, true), (2, false), (3, false), (4, true)];
    let count = 20_000;
    let publisher = engine(BackendKind::Auto);
    publisher
        .join(group(1, port, Some(epoch(1, 5, &members)), 0.0, 1))
        .unwrap();
    let receiver = engine(BackendKind::Auto);
    receiver
        .join(group(2, port, Some(epoch(1, 5, &members)), 0.0, 2))
        .unwrap();
    let (tx, rx) = mpsc::channel();
    expect_messages(&receiver, 2, 1, count, tx);
    let spy = eavesdropper(port);

    // Attackers, each an engine publishing on the group.
    let subscriber = engine(BackendKind::Auto);
    subscriber
        .join(group(3, port, Some(epoch(1, 5, &members)), 0.0, 3))
        .unwrap();
    let outsider = engine(BackendKind::Auto);
    outsider
        .join(group(4, port, Some(epoch(1, 6, &members)), 0.0, 4))
        .unwrap();
    let stranger = engine(BackendKind::Auto);
    stranger
        .join(group(9, port, Some(epoch(1, 5, &members)), 0.0, 9))
        .unwrap();
    let plain = engine(BackendKind::Auto);
    plain.join(group(6, port, None, 0.0, 6)).unwrap();
    let stale = engine(BackendKind::Auto);
    stale
        .join(group(7, port, Some(epoch(7, 5, &[(7, true)])), 0.0, 7))
        .unwrap();
    let attackers = [&subscriber, &outsider, &stranger, &plain, &stale];
    // Members 2 and 3 both receive, and the run is longer than the retransmit buffer: flow
    // control counts only receivers the publisher has heard, so it waits for both first.
    assert!(
        publisher
            .wait_receivers(GROUP, 2, Duration::from_secs(10))
            .unwrap(),
        "members 2 and 3 did not report to the publisher"
    );
    std::thread::scope(|s| {
        s.spawn(|| publish(&publisher, count));
        for a in attackers {
            s.spawn(move || publish(a, 2_000));
        }
        // Replay, modify and truncate what the publisher sends, as it goes.
        s.spawn(|| {
            let mut buf = [0u8; 65_536];
            let to = SocketAddrV4::new(GROUP_ADDR, port);
            let mut forged = 0;
            while forged < 600 {
                let Ok((n, _)) = spy.recv_from(&mut buf) else {
                    continue;
                };
                // Only the honest publisher's sealed datagrams (source 1).
                if n < 40 || buf[8..12] != 1u32.to_le_bytes() || buf[3] & 1 == 0 {
                    continue;
                }
                let d = &mut buf[..n];
                spy.send_to(d, to).unwrap();
                let mut modified = d.to_vec();
                modified[n / 2] ^= 0x20;
                spy.send_to(&modified, to).unwrap();
                spy.send_to(&d[..n - 1], to).unwrap();
                forged += 3;
            }
        });
    });
    wait_all(&rx, 1, count, "honest delivery under attack");
    // The attackers' engines send once they hear a receiver: give their traffic time to come.
    let reasons = [
        Rejection::BadTag,
        Rejection::Replay,
        Rejection::NotMember,
        Rejection::Unsealed,
        Rejection::WrongRole,
        Rejection::UnknownEpoch,
    ];
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = secure_stats(&receiver);
        // The publisher, a member too, rejects the attackers' traffic and keeps going (the
        // spy's copies carry its own id, so it ignores those as its own).
        let p = secure_stats(&publisher);
        let missing: Vec<_> = reasons.iter().filter(|r| s.rejected(**r) == 0).collect();
        let publisher_done = p.rejected(Rejection::WrongRole) > 0 && p.rejected(Rejection::BadTag) > 0;
        if missing.is_empty() && publisher_done {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "rejections not counted: receiver lacks {missing:?} ({s:?}); publisher {p:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_rekeyed_group_carries_on_and_a_removed_member_hears_nothing_more() {
    let port = port();
    let first = [(1, true), (2, true), (3, true)];
    let second = [(1, true), (2, true)];
    let (a, b, removed) = (
        engine(BackendKind::Auto),
        engine(BackendKind::Auto),
        engine(BackendKind::Auto),
    );
    a.join(group(1, port, Some(epoch(1, 5, &first)), 0.0, 1)).unwrap();
    b.join(group(2, port, Some(epoch(1, 5, &first)), 0.0, 2)).unwrap();
    removed
        .join(group(3, port, Some(epoch(1, 5, &first)), 0.0, 3))
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let count = 5_000;
    // Every message of the run at b, across the epoch change.
    expect_messages(&b, 2, 1, 2 * count, tx.clone());
    expect_messages(&removed, 3, 1, count, tx);
    let mut p = a.publication(GROUP, 1).unwrap();
    send_range(&mut p, 0..count);
    wait_all(&rx, 1, count, "epoch 1 at the member to be removed");
    assert!(a.wait_acknowledged(GROUP, 2, Duration::from_secs(10)).unwrap());
    // Epoch 2 leaves member 3 out: a fresh secret it never gets.
    b.rekey(GROUP, epoch(2, 8, &second)).unwrap();
    a.rekey(GROUP, epoch(2, 8, &second)).unwrap();
    assert!(
        a.rekey(GROUP, epoch(2, 9, &second)).is_err(),
        "an epoch is entered once"
    );
    send_range(&mut p, count..2 * count);
    wait_all(&rx, 1, 2 * count, "both epochs at the remaining member");
    eventually("the removed member counting epoch 2 as unknown", || {
        secure_stats(&removed).rejected(Rejection::UnknownEpoch) > 0
    });
    assert_eq!(secure_stats(&a).epoch, 2);
}

/// Membership and total order over sealed datagrams: the view change's frames are sealed like
/// data, and two engines deliver the same total order.
#[test]
fn a_sealed_group_with_membership_delivers_one_total_order() {
    use intergroup_engine::group::{GroupConfig as MembershipConfig, Order};
    let port = port();
    let members = [(1, true), (2, true)];
    let per = 2_000u64;
    let mut engines = Vec::new();
    let (tx, rx) = mpsc::channel::<(u32, Vec<(u32, u64)>)>();
    for id in [1u32, 2] {
        let e = engine(BackendKind::Auto);
        let mut g = group(id, port, Some(epoch(1, 5, &members)), 0.0, u64::from(id));
        g.membership = Some(MembershipConfig {
            initial_members: 2,
            ..MembershipConfig::default()
        });
        e.join(g).unwrap();
        let tx = tx.clone();
        let mut got = Vec::new();
        e.subscribe_ordered(GROUP, Order::Total, move |out: &Output<'_>| {
            if let Output::Message(m) = out {
                got.push((m.sender, u64::from_le_bytes(m.payload[..8].try_into().unwrap())));
                if got.len() as u64 == 2 * per {
                    let _ = tx.send((id, std::mem::take(&mut got)));
                }
            }
        })
        .unwrap();
        engines.push(e);
    }
    std::thread::scope(|s| {
        for e in &engines {
            s.spawn(move || {
                let mut p = e.publication(GROUP, 1).unwrap();
                for i in 0..per {
                    let m = message(i);
                    loop {
                        match p.offer(&m) {
                            Ok(()) => break,
                            Err(OfferError::BackPressured) => std::thread::sleep(Duration::from_micros(50)),
                            Err(err) => panic!("offer: {err}"),
                        }
                    }
                }
            });
        }
    });
    let mut orders = Vec::new();
    for _ in 0..2 {
        let (_, order) = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("every message in total order");
        orders.push(order);
    }
    assert_eq!(orders[0], orders[1], "the same total order at both engines");
    for e in &engines {
        let s = secure_stats(e);
        assert!(s.sealed > 0 && s.opened > 0 && s.rejected_total() == 0, "{s:?}");
    }
}

/// MLS keys real engines: three members agree on epoch 1 by MLS and run sealed under it; one
/// commit removes the third and adds a fourth. The remaining engines rekey from MLS and carry
/// on; the removed member, which processed the commit too, derives nothing of the new epoch and
/// hears nothing more; the joiner, keyed from its Welcome, opens nothing of the old epoch. (The
/// commit and Welcome travel in-process here: no engine runs MLS over the network yet.)
#[test]
fn mls_epochs_key_the_data_plane_and_removal_and_joining_hold_over_real_sockets() {
    use intergroup_secure::mls::MlsMember;
    use intergroup_secure::{Identity, Policy, Role};
    let port = port();
    let ids: Vec<Identity> = (1..=4u8).map(|n| Identity::from_seed(&[n; 32])).collect();
    let admin = Identity::from_seed(&[99; 32]);
    let mut policy = Policy::new("g", vec![admin.public()], 0, u64::MAX).unwrap();
    for (n, id) in ids.iter().enumerate() {
        policy
            .add_member(
                &format!("m{n}"),
                id.public(),
                vec![Role::Publish, Role::Subscribe],
            )
            .unwrap();
    }
    policy.sign(&admin).unwrap();
    let member_id = |n: usize| ids[n].public().member_id();
    let mut mls: Vec<MlsMember> = (1..=4u8)
        .map(|n| MlsMember::new(Identity::from_seed(&[n; 32])))
        .collect();
    mls[0].create_group(b"group 9").unwrap();
    let packages = [mls[1].key_package().unwrap(), mls[2].key_package().unwrap()];
    let add = mls[0].commit(&packages, &[], &policy).unwrap();
    mls[0].merge_pending().unwrap();
    let welcome = add.welcome.unwrap();
    mls[1].join(&welcome, &policy).unwrap();
    mls[2].join(&welcome, &policy).unwrap();

    let mut engines = Vec::new();
    let (tx, rx) = mpsc::channel();
    for (n, m) in mls.iter().take(3).enumerate() {
        let e = engine(BackendKind::Auto);
        let epoch = ShieldEpoch::from_mls(m, GROUP, &policy).unwrap();
        assert_eq!(epoch.epoch, 1);
        e.join(group(member_id(n), port, Some(epoch), 0.0, n as u64))
            .unwrap();
        if n > 0 {
            expect_messages(&e, n as u32, member_id(0), 2_000, tx.clone());
        }
        engines.push(e);
    }
    let mut p = engines[0].publication(GROUP, 1).unwrap();
    // Epoch 1: everyone gets the first thousand (the third reports at 2000 only if it could).
    send_range(&mut p, 0..1_000);
    assert!(engines[0]
        .wait_acknowledged(GROUP, 2, Duration::from_secs(10))
        .unwrap());

    // One commit: member 3 out, member 4 in.
    let mut joiner = mls.pop().unwrap();
    let change = mls[0]
        .commit(&[joiner.key_package().unwrap()], &[ids[2].public()], &policy)
        .unwrap();
    mls[0].merge_pending().unwrap();
    mls[1].process(&change.commit, &policy).unwrap();
    assert!(mls[2].process(&change.commit, &policy).unwrap().removed_self);
    assert!(
        ShieldEpoch::from_mls(&mls[2], GROUP, &policy).is_err(),
        "the removed member has no epoch 2"
    );
    joiner.join(change.welcome.as_ref().unwrap(), &policy).unwrap();
    for n in [1, 0] {
        engines[n]
            .rekey(GROUP, ShieldEpoch::from_mls(&mls[n], GROUP, &policy).unwrap())
            .unwrap();
    }
    let late = engine(BackendKind::Auto);
    late.join(group(
        member_id(3),
        port,
        Some(ShieldEpoch::from_mls(&joiner, GROUP, &policy).unwrap()),
        0.0,
        4,
    ))
    .unwrap();
    let heard = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let h = heard.clone();
    late.subscribe(GROUP, move |out: &Output<'_>| {
        if let Output::Message(m) = out {
            // Only epoch 2's messages can reach it (indices 1000..).
            assert!(u64::from_le_bytes(m.payload[..8].try_into().unwrap()) >= 1_000);
            h.fetch_add(1, Ordering::Relaxed);
        }
    })
    .unwrap();
    send_range(&mut p, 1_000..2_000);
    wait_all(&rx, 1, 2_000, "member 2 across the MLS epochs");
    eventually("the removed member counting epoch 2 as unknown", || {
        secure_stats(&engines[2]).rejected(Rejection::UnknownEpoch) > 0
    });
    assert_eq!(secure_stats(&engines[1]).epoch, 2);
    eventually("the joiner opening epoch 2", || secure_stats(&late).opened > 0);
    eventually("the joiner getting epoch 2's messages", || {
        heard.load(Ordering::Relaxed) > 0
    });
}

/// The membership protocol keys real engines by MLS: three engines form a group (one commit
/// founds the MLS group and adds the others), deliver in total order under the first view's
/// epoch; one engine stops and the survivors' next view is a new epoch without it; a fourth
/// joins by a Welcome in the view change and hears only what follows its join.
#[test]
fn membership_keys_the_group_by_mls_over_real_sockets() {
    use intergroup_engine::group::keys::GroupKeys;
    use intergroup_engine::group::{GroupConfig as MembershipConfig, Order};
    use intergroup_secure::{Identity, Policy, Role};
    let port = port();
    let idents: Vec<Identity> = (1..=4u8).map(|n| Identity::from_seed(&[n + 40; 32])).collect();
    let admin = Identity::from_seed(&[98; 32]);
    let mut policy = Policy::new("g", vec![admin.public()], 0, u64::MAX).unwrap();
    for (n, id) in idents.iter().enumerate() {
        let roles = vec![Role::Publish, Role::Subscribe];
        policy.add_member(&format!("m{n}"), id.public(), roles).unwrap();
    }
    policy.sign(&admin).unwrap();
    let ids: Vec<u32> = idents.iter().map(|i| i.public().member_id()).collect();
    let views = std::sync::Arc::new(std::sync::Mutex::new(
        std::collections::BTreeMap::<u32, u32>::new(),
    ));
    let (tx, rx) = mpsc::channel::<(u32, u32, u64)>();
    let start_with = |n: usize, policy: &Policy| -> Engine {
        let e = engine(BackendKind::Auto);
        let mut g = group(ids[n], port, None, 0.0, n as u64 + 1);
        g.membership = Some(MembershipConfig {
            initial_members: 2,
            ..MembershipConfig::default()
        });
        let mut keys = GroupKeys::new(idents[n].clone(), policy.clone());
        keys.update_period_ns = Some(400_000_000);
        g.keys = Some(keys);
        e.join(g).unwrap();
        let (tx, views, me) = (tx.clone(), views.clone(), ids[n]);
        e.subscribe_ordered(GROUP, Order::Total, move |out: &Output<'_>| match out {
            Output::Message(m) => {
                let i = u64::from_le_bytes(m.payload[..8].try_into().unwrap());
                let _ = tx.send((me, m.sender, i));
            }
            Output::Event(Event::View { members, .. }) => {
                views.lock().unwrap().insert(me, *members);
            }
            Output::Event(_) => {}
        })
        .unwrap();
        e
    };
    let start = |n: usize| start_with(n, &policy);
    let members_seen = |who: &[usize], n: u32| {
        let v = views.lock().unwrap();
        who.iter().all(|&k| v.get(&ids[k]) == Some(&n))
    };
    let keyed_epoch = |e: &Engine| {
        let s = e.stats(GROUP).unwrap();
        (s.secure.expect("shield").epoch, s.keys.expect("keyed"))
    };
    let mut engines: Vec<Option<Engine>> = (0..3).map(|n| Some(start(n))).collect();
    eventually("a view of three", || members_seen(&[0, 1, 2], 3));
    let first = keyed_epoch(engines[0].as_ref().unwrap()).0;
    assert!(first >= 1);
    for e in engines.iter().flatten() {
        assert_eq!(keyed_epoch(e).0, first, "one epoch at every member");
    }
    let drain = |from: u32, range: std::ops::Range<u64>, at: &[u32]| {
        let mut want: std::collections::BTreeSet<(u32, u64)> = at
            .iter()
            .flat_map(|&m| range.clone().map(move |i| (m, i)))
            .collect();
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut extra = Vec::new();
        while !want.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            let (me, sender, i) = rx.recv_timeout(left).expect("every message delivered");
            assert_eq!(sender, from);
            if !want.remove(&(me, i)) {
                extra.push((me, i));
            }
        }
        extra
    };
    let send = |e: &Engine, range: std::ops::Range<u64>| {
        let mut p = e.publication(GROUP, 1).unwrap();
        send_range(&mut p, range);
    };
    send(engines[0].as_ref().unwrap(), 0..300);
    drain(ids[0], 0..300, &[ids[0], ids[1], ids[2]]);

    // The third engine stops: the survivors' next view is a new epoch without it.
    engines[2].take().unwrap().close();
    eventually("a view of two", || members_seen(&[0, 1], 2));
    eventually("the survivors' next epoch", || {
        let (a, b) = (
            keyed_epoch(engines[0].as_ref().unwrap()),
            keyed_epoch(engines[1].as_ref().unwrap()),
        );
        a.0 > first && a.0 == b.0
    });
    let second = keyed_epoch(engines[0].as_ref().unwrap()).0;

    // A fourth joins: a Welcome in the view change gives it the next epoch, and only that.
    engines.push(Some(start(3)));
    eventually("a view of three with the joiner", || members_seen(&[0, 1, 3], 3));
    eventually("the joiner's epoch", || {
        let e = keyed_epoch(engines[3].as_ref().unwrap()).0;
        e > second && e == keyed_epoch(engines[0].as_ref().unwrap()).0
    });
    let (_, joiner_keys) = keyed_epoch(engines[3].as_ref().unwrap());
    assert_eq!(joiner_keys.welcomes_applied, 1, "{joiner_keys:?}");
    send(engines[0].as_ref().unwrap(), 300..600);
    let extra = drain(ids[0], 300..600, &[ids[0], ids[1], ids[3]]);
    assert!(
        extra.iter().all(|&(me, i)| me != ids[3] || i >= 300),
        "the joiner got a message from before its join: {extra:?}"
    );
    for e in engines.iter().flatten() {
        let s = secure_stats(e);
        for r in [
            Rejection::BadTag,
            Rejection::Replay,
            Rejection::WrongRole,
            Rejection::Malformed,
        ] {
            assert_eq!(s.rejected(r), 0, "{r:?}: {s:?}");
        }
        assert!(s.signed > 0 && s.verified > 0, "{s:?}");
    }
    // Three views at least (of three, of two, of three with the joiner), each its own epoch.
    let keys = keyed_epoch(engines[0].as_ref().unwrap()).1;
    assert!(keys.epochs_installed >= 3 && keys.key_errors == 0, "{keys:?}");
    // Members other than the coordinator commit their periodic self-updates.
    eventually("a member's self-update", || {
        engines
            .iter()
            .flatten()
            .map(|e| keyed_epoch(e).1.self_updates)
            .sum::<u64>()
            >= 2
    });
    let before = keyed_epoch(engines[0].as_ref().unwrap()).0;
    send(engines[0].as_ref().unwrap(), 600..700);
    drain(ids[0], 600..700, &[ids[0], ids[1], ids[3]]);
    assert!(keyed_epoch(engines[0].as_ref().unwrap()).0 >= before);

    // Policy version 2 drops the second engine: rolled out to the others, it is removed by
    // the next commit, and hears nothing of what follows.
    let mut v2 = policy.clone();
    assert!(v2.remove_member(&idents[1].public()));
    v2.version += 1;
    v2.sign(&admin).unwrap();
    let mut stale = policy.clone();
    stale.sign(&admin).unwrap();
    assert!(
        engines[0].as_ref().unwrap().update_policy(GROUP, stale).is_err(),
        "not a later version"
    );
    for k in [0, 3] {
        engines[k]
            .as_ref()
            .unwrap()
            .update_policy(GROUP, v2.clone())
            .unwrap();
    }
    eventually("a view without the dropped member", || members_seen(&[0, 3], 2));
    let dropped_epoch = keyed_epoch(engines[1].as_ref().unwrap()).0;
    eventually("the epoch that removed it", || {
        let (a, d) = (
            keyed_epoch(engines[0].as_ref().unwrap()).0,
            keyed_epoch(engines[3].as_ref().unwrap()).0,
        );
        a > dropped_epoch && a == d
    });
    send(engines[0].as_ref().unwrap(), 700..800);
    let extra = drain(ids[0], 700..800, &[ids[0], ids[3]]);
    std::thread::sleep(Duration::from_millis(200));
    let late: Vec<(u32, u64)> = rx.try_iter().map(|(m, _, i)| (m, i)).collect();
    assert!(
        extra.iter().chain(&late).all(|&(m, i)| m != ids[1] || i < 700),
        "the dropped member got messages after its removal: {extra:?} {late:?}"
    );
    assert!(keyed_epoch(engines[1].as_ref().unwrap()).0 < keyed_epoch(engines[0].as_ref().unwrap()).0);

    // The engine stopped earlier comes back with the same identity (and the current policy):
    // its signed datagrams are not taken for replays of its earlier life, and a Welcome keys it.
    views.lock().unwrap().remove(&ids[2]);
    engines[2] = Some(start_with(2, &v2));
    eventually("the restarted engine back in a view of three", || {
        members_seen(&[0, 2, 3], 3)
    });
    eventually("the restarted engine's epoch", || {
        let e = keyed_epoch(engines[2].as_ref().unwrap()).0;
        e > 0 && e == keyed_epoch(engines[0].as_ref().unwrap()).0
    });
    assert_eq!(keyed_epoch(engines[2].as_ref().unwrap()).1.welcomes_applied, 1);
    send(engines[0].as_ref().unwrap(), 800..900);
    drain(ids[0], 800..900, &[ids[0], ids[2], ids[3]]);
}

/// An outsider cannot join an MLS-keyed group: an engine whose key the group's policy does not
/// list (it runs with a policy of its own making that lists itself) is never heard by the
/// members, never enters their views, and reads nothing of their traffic.
#[test]
fn an_outsider_cannot_join_an_mls_keyed_group() {
    use intergroup_engine::group::keys::GroupKeys;
    use intergroup_engine::group::{GroupConfig as MembershipConfig, Order};
    use intergroup_secure::{Identity, Policy, Role};
    let port = port();
    let both = || vec![Role::Publish, Role::Subscribe];
    let members: Vec<Identity> = (1..=2u8).map(|n| Identity::from_seed(&[n + 60; 32])).collect();
    let outsider = Identity::from_seed(&[66; 32]);
    let admin = Identity::from_seed(&[97; 32]);
    let mut policy = Policy::new("g", vec![admin.public()], 0, u64::MAX).unwrap();
    for (n, id) in members.iter().enumerate() {
        policy.add_member(&format!("m{n}"), id.public(), both()).unwrap();
    }
    policy.sign(&admin).unwrap();
    // The outsider's own policy: the members and itself, signed by itself as admin.
    let mut forged = Policy::new("g", vec![outsider.public()], 0, u64::MAX).unwrap();
    for (n, id) in members.iter().chain([&outsider]).enumerate() {
        forged.add_member(&format!("m{n}"), id.public(), both()).unwrap();
    }
    forged.sign(&outsider).unwrap();
    let views = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(u32, u32)>::new()));
    let (tx, rx) = mpsc::channel::<(u32, u64)>();
    let start = |id: &Identity, policy: &Policy| -> Engine {
        let me = id.public().member_id();
        let e = engine(BackendKind::Auto);
        let mut g = group(me, port, None, 0.0, u64::from(me));
        g.membership = Some(MembershipConfig {
            initial_members: 2,
            ..MembershipConfig::default()
        });
        g.keys = Some(GroupKeys::new(id.clone(), policy.clone()));
        e.join(g).unwrap();
        let (tx, views) = (tx.clone(), views.clone());
        e.subscribe_ordered(GROUP, Order::Total, move |out: &Output<'_>| match out {
            Output::Message(m) => {
                let _ = tx.send((me, u64::from_le_bytes(m.payload[..8].try_into().unwrap())));
            }
            Output::Event(Event::View { members, .. }) => views.lock().unwrap().push((me, *members)),
            Output::Event(_) => {}
        })
        .unwrap();
        e
    };
    let intruder = start(&outsider, &forged);
    let honest: Vec<Engine> = members.iter().map(|m| start(m, &policy)).collect();
    let ids: Vec<u32> = members.iter().map(|m| m.public().member_id()).collect();
    eventually("the members' view of two", || {
        let v = views.lock().unwrap();
        ids.iter().all(|id| v.iter().any(|&(m, n)| m == *id && n == 2))
    });
    let mut p = honest[0].publication(GROUP, 1).unwrap();
    send_range(&mut p, 0..200);
    let mut got = 0;
    while got < 400 {
        let (who, _) = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("the members' messages");
        assert_ne!(who, outsider.public().member_id(), "the outsider read a message");
        got += 1;
    }
    std::thread::sleep(Duration::from_millis(300));
    assert!(rx.try_iter().all(|(who, _)| who != outsider.public().member_id()));
    for e in &honest {
        let s = secure_stats(e);
        assert!(
            s.rejected(Rejection::NotMember) > 0,
            "the outsider's datagrams counted: {s:?}"
        );
    }
    // Every view the members installed has two members: the outsider never got in.
    assert!(views
        .lock()
        .unwrap()
        .iter()
        .filter(|(m, _)| ids.contains(m))
        .all(|&(_, n)| n <= 2));
    drop(intruder);
}
