//! The runtime in one process: engines on both backends exchange messages over loopback
//! multicast, with and without injected loss, and shut down cleanly.

use intergroup_engine::runtime::{BackendKind, Engine, EngineConfig, GroupConfig, OfferError};
use intergroup_engine::{Event, MemberConfig, Output};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Each test its own multicast port, so tests running at once do not hear each other.
fn port() -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    46_100 + (std::process::id() % 400) as u16 * 8 + NEXT.fetch_add(1, Ordering::Relaxed)
}

fn group(id: u32, port: u16, loss: f64, seed: u64) -> GroupConfig {
    let mut g = GroupConfig::new(MemberConfig {
        group: 9,
        member_id: id,
        ..MemberConfig::default()
    });
    g.udp.group.set_port(port);
    g.receive_loss = loss;
    g.loss_seed = seed;
    g.seed = seed ^ u64::from(id);
    g
}

fn engine(backend: BackendKind) -> Engine {
    engine_with_ring(backend, EngineConfig::default().publication_ring_bytes)
}

fn engine_with_ring(backend: BackendKind, publication_ring_bytes: u64) -> Engine {
    engine_with(EngineConfig {
        backend,
        publication_ring_bytes,
        ..EngineConfig::default()
    })
}

fn engine_with(cfg: EngineConfig) -> Engine {
    Engine::launch(cfg).expect("engine starts")
}

/// The size of message `i`: runs of 50 small messages (packed many to a datagram), of 50
/// one-frame messages (sent from the publication's ring where they lie), and of small ones
/// mixed with fragmented ones, so every kind follows every other.
fn size(i: u64) -> usize {
    match (i / 50) % 3 {
        0 => 16 + (i % 85) as usize,
        1 => 711 + (i * 7 % 700) as usize,
        _ if i % 10 == 0 => 1500 + (i % 1500) as usize,
        _ => 16 + (i % 85) as usize,
    }
}

/// Message `i`: its index, then its low byte repeated, `size(i)` bytes in all.
fn message(i: u64, buf: &mut [u8; 3000]) -> &[u8] {
    buf[..8].copy_from_slice(&i.to_le_bytes());
    buf[8..].fill(i as u8);
    &buf[..size(i)]
}

/// `count` messages from one engine to two others; every receiver checks content and order.
fn one_to_two(backend: BackendKind, count: u64, loss: f64, seed: u64) {
    one_to_two_with_ring(
        backend,
        count,
        loss,
        seed,
        EngineConfig::default().publication_ring_bytes,
    );
}

/// As [`one_to_two`], with a publication ring of `ring` bytes.
fn one_to_two_with_ring(backend: BackendKind, count: u64, loss: f64, seed: u64, ring: u64) {
    one_to_two_with(
        EngineConfig {
            backend,
            publication_ring_bytes: ring,
            ..EngineConfig::default()
        },
        count,
        loss,
        seed,
    );
}

/// As [`one_to_two`], with the sender's engine configured by `cfg`.
fn one_to_two_with(cfg: EngineConfig, count: u64, loss: f64, seed: u64) {
    let (backend, ring) = (cfg.backend, cfg.publication_ring_bytes);
    let port = port();
    let sender = engine_with(cfg);
    sender.join(group(1, port, 0.0, seed)).unwrap();
    let mut receivers = Vec::new();
    let (tx, rx) = mpsc::channel::<(u32, Result<u64, String>)>();
    for id in [2u32, 3] {
        let e = engine(backend);
        e.join(group(id, port, loss, seed + u64::from(id))).unwrap();
        let tx = tx.clone();
        let mut next = 0u64;
        let mut want = [0u8; 3000];
        e.subscribe(9, move |out: &Output<'_>| match out {
            Output::Message(m) => {
                if m.sender != 1 || m.payload != message(next, &mut want) {
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
        receivers.push(e);
    }
    let mut publication = sender.publication(9, 1).unwrap();
    assert!(
        sender.wait_receivers(9, 2, Duration::from_secs(10)).unwrap(),
        "seed {seed}: the receivers did not report"
    );
    let mut msg = [0u8; 3000];
    for i in 0..count {
        let msg = message(i, &mut msg);
        let stuck = Instant::now() + Duration::from_secs(30);
        loop {
            match publication.offer(msg) {
                Ok(()) => break,
                Err(OfferError::BackPressured) => {
                    assert!(
                        Instant::now() < stuck,
                        "seed {seed}: message {i} back-pressured for 30 s"
                    );
                    std::thread::yield_now()
                }
                Err(e) => panic!("offer: {e}"),
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut done = 0;
    while done < 2 {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((_, Ok(n))) => {
                assert_eq!(n, count);
                done += 1;
            }
            Ok((id, Err(e))) => panic!("seed {seed}: receiver {id}: {e}"),
            Err(_) => panic!(
                "seed {seed}: timed out; sender stats {:?}",
                sender
                    .stats(9)
                    .map(|s| (s.next_sequence, s.receivers, s.acknowledged))
            ),
        }
    }
    assert!(sender.wait_acknowledged(9, 2, Duration::from_secs(10)).unwrap());
    let stats = sender.stats(9).unwrap();
    assert_eq!(stats.backend, backend);
    // The worker's own CPU clock: it framed and sent every message.
    assert!(
        stats.worker_cpu.user_ns + stats.worker_cpu.system_ns > 0,
        "seed {seed}: the worker reports no CPU time: {:?}",
        stats.worker_cpu
    );
    if loss > 0.0 {
        assert!(stats.counters.get(intergroup_engine::Counter::Retransmissions) > 0);
    }
    // One-frame messages went out from the ring where they lay, unless they queued behind
    // small ones (those are copied to keep their order).
    assert!(stats.lent > 0, "seed {seed}: no message was sent from its ring");
    if ring < EngineConfig::default().publication_ring_bytes {
        // A small ring fills with frames waiting for acknowledgement: the sender asked the
        // receivers where they were instead of waiting for their periodic reports.
        assert!(
            stats.counters.get(intergroup_engine::Counter::StatusRequestsSent) > 0,
            "seed {seed}: a small ring never asked for a STATUS"
        );
    }
    assert_eq!(stats.malformed_records, 0);
}

#[test]
fn io_uring_one_to_two() {
    one_to_two(BackendKind::IoUring, 200_000, 0.0, 1);
}

#[test]
fn portable_one_to_two() {
    one_to_two(BackendKind::Portable, 200_000, 0.0, 2);
}

#[test]
fn io_uring_one_to_two_with_loss() {
    one_to_two(BackendKind::IoUring, 50_000, 0.05, 3);
}

#[test]
fn portable_one_to_two_with_loss() {
    one_to_two(BackendKind::Portable, 50_000, 0.05, 4);
}

/// A ring that holds about 60 one-frame messages, far less than a window: messages sent from
/// it stay there until acknowledged, so the ring is what holds the publisher back, and repairs
/// still find their frames.
#[test]
fn io_uring_small_publication_ring_carries_every_message_with_loss() {
    one_to_two_with_ring(BackendKind::IoUring, 30_000, 0.05, 5, 64 << 10);
}

#[test]
fn portable_small_publication_ring_carries_every_message_with_loss() {
    one_to_two_with_ring(BackendKind::Portable, 30_000, 0.05, 6, 64 << 10);
}

/// A publication window of 4 KiB, smaller than two of the largest messages: the publisher
/// waits for its worker to take nearly every message, and nothing stalls or goes missing.
#[test]
fn a_publication_window_smaller_than_its_messages_carries_every_message_with_loss() {
    let cfg = EngineConfig {
        backend: BackendKind::IoUring,
        publication_window_bytes: 4096,
        ..EngineConfig::default()
    };
    one_to_two_with(cfg, 30_000, 0.05, 7);
}

/// Publication rings as files in a directory (`ring_dir`) instead of the process's memory: the
/// same messages arrive, and the files are gone once both ends have mapped them.
#[test]
fn publication_rings_in_a_ring_dir_carry_every_message_and_leave_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = EngineConfig {
        backend: BackendKind::Portable,
        ring_dir: Some(dir.path().to_path_buf()),
        ..EngineConfig::default()
    };
    // While a publication lives, its ring is a mapped file of that directory, already unlinked;
    // by default it is no file at all.
    let mapped_from = |e: &Engine, dir: &str| {
        let _publication = e.publication(9, 1).unwrap();
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        maps.lines()
            .filter(|l| l.contains(dir) && l.contains("intergroup-pub-"))
            .map(|l| l.ends_with("(deleted)"))
            .collect::<Vec<_>>()
    };
    let in_dir = engine_with(cfg.clone());
    in_dir.join(group(1, port(), 0.0, 1)).unwrap();
    assert_eq!(
        mapped_from(&in_dir, dir.path().to_str().unwrap()),
        vec![true, true]
    );
    drop(in_dir);
    let default = engine(BackendKind::Portable);
    default.join(group(1, port(), 0.0, 1)).unwrap();
    assert_eq!(mapped_from(&default, "/"), Vec::<bool>::new());
    one_to_two_with(cfg, 20_000, 0.05, 8);
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert!(left.is_empty(), "ring files left behind: {left:?}");
}

#[test]
fn closed_engine_refuses_offers_and_unknown_groups_are_errors() {
    let e = engine(BackendKind::Auto);
    assert!(e.publication(42, 1).is_err());
    e.join(group(1, port(), 0.0, 1)).unwrap();
    assert!(e.join(group(1, port(), 0.0, 1)).is_err());
    let mut p = e.publication(9, 1).unwrap();
    let too_big = vec![0u8; p.max_message() + 1];
    assert!(matches!(p.offer(&too_big), Err(OfferError::TooLarge { .. })));
    p.offer(b"x").unwrap();
    e.close();
    assert_eq!(p.offer(b"x"), Err(OfferError::Closed));
}

/// `wait_receivers` makes a member a sender before its first message: receivers that join
/// hear its heartbeats and report, and it counts them. With too few it times out.
#[test]
fn a_publisher_waits_for_its_receivers_before_its_first_message() {
    let port = port();
    let sender = engine(BackendKind::Auto);
    sender.join(group(1, port, 0.0, 5)).unwrap();
    assert_eq!(
        sender.wait_receivers(42, 1, Duration::from_millis(10)),
        Err(intergroup_engine::runtime::EngineError::UnknownGroup(42))
    );
    assert!(!sender.wait_receivers(9, 1, Duration::from_millis(50)).unwrap());
    let r1 = engine(BackendKind::Auto);
    r1.join(group(2, port, 0.0, 6)).unwrap();
    assert!(sender.wait_receivers(9, 1, Duration::from_secs(10)).unwrap());
    assert!(!sender.wait_receivers(9, 2, Duration::from_millis(50)).unwrap());
    let r2 = engine(BackendKind::Auto);
    r2.join(group(3, port, 0.0, 7)).unwrap();
    assert!(sender.wait_receivers(9, 2, Duration::from_secs(10)).unwrap());
    let stats = sender.stats(9).unwrap();
    assert_eq!(
        (stats.receivers, stats.next_sequence),
        (2, 0),
        "nothing was published"
    );
}

#[test]
fn bad_settings_are_refused() {
    for cfg in [
        EngineConfig {
            workers: 0,
            ..EngineConfig::default()
        },
        EngineConfig {
            publication_ring_bytes: 5000,
            ..EngineConfig::default()
        },
        EngineConfig {
            cores: vec![100_000],
            ..EngineConfig::default()
        },
    ] {
        assert!(Engine::launch(cfg).is_err());
    }
}

#[test]
fn engines_and_publications_move_between_threads() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}
    send_sync::<Engine>();
    send::<intergroup_engine::runtime::Publication>();
}

#[test]
fn invoker_mode_runs_the_engine_on_the_callers_thread() {
    let port = port();
    let sender = Engine::launch(EngineConfig {
        invoker: true,
        ..EngineConfig::default()
    })
    .unwrap();
    sender.join(group(1, port, 0.0, 11)).unwrap();
    let receiver = engine(BackendKind::Auto);
    receiver.join(group(2, port, 0.0, 12)).unwrap();
    let (tx, rx) = mpsc::channel();
    let mut next = 0u64;
    receiver
        .subscribe(9, move |out: &Output<'_>| {
            if let Output::Message(m) = out {
                let seq = u64::from_le_bytes(m.payload[..8].try_into().unwrap());
                let _ = tx.send(seq == next);
                next += 1;
            }
        })
        .unwrap();
    let mut p = sender.publication(9, 1).unwrap();
    let count = 20_000u64;
    for i in 0..count {
        while p.offer(&i.to_le_bytes()).is_err() {
            sender.invoke();
        }
        if i % 64 == 0 {
            sender.invoke();
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut got = 0;
    while got < count {
        assert!(Instant::now() < deadline, "timed out after {got} messages");
        if !sender.invoke() {
            sender.idle(Duration::from_millis(1));
        }
        while let Ok(in_order) = rx.try_recv() {
            assert!(in_order, "message {got} out of order");
            got += 1;
        }
    }
    // Without invoker mode, invoke does nothing.
    assert!(!receiver.invoke());
}

/// A sender that vanishes with sequences missing: after `sender_timeout_ns` the receiving
/// engine hands on what it holds of it, in order between the losses it declares, and stops
/// NAKing it.
fn a_vanished_sender_is_given_up(backend: BackendKind) {
    use intergroup_engine::wire::{DataHeader, DatagramWriter, HeartbeatBody};
    use intergroup_engine::Counter;
    let port = port();
    let receiver = engine(backend);
    let mut cfg = group(2, port, 0.0, 1);
    cfg.member.sender_timeout_ns = 200_000_000;
    let to = cfg.udp.group;
    receiver.join(cfg).unwrap();
    let (tx, rx) = mpsc::channel::<String>();
    receiver
        .subscribe(9, move |out: &Output<'_>| {
            let _ = tx.send(match out {
                Output::Message(m) => format!("message {}", m.sequence),
                Output::Event(Event::UnrecoverableLoss { first, count, .. }) => {
                    format!("lost {first}+{count}")
                }
                Output::Event(e) => format!("{e:?}"),
            });
        })
        .unwrap();
    // Member 7 sends 0, 2 and 3 (each its own datagram), and a heartbeat announcing 5, then
    // nothing: 1 and 4 never come, and 2 and 3 wait behind the gap.
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).unwrap();
    socket
        .set_multicast_if_v4(&std::net::Ipv4Addr::LOCALHOST)
        .unwrap();
    socket.set_multicast_ttl_v4(0).unwrap();
    socket.set_multicast_loop_v4(true).unwrap();
    let send = |build: &dyn Fn(&mut DatagramWriter<'_>)| {
        let mut buf = vec![0u8; 1472];
        let mut w = DatagramWriter::new(&mut buf, 9, 7).unwrap();
        build(&mut w);
        let len = w.len();
        socket
            .send_to(&buf[..len], &std::net::SocketAddr::V4(to).into())
            .unwrap();
    };
    for seq in [0u64, 2, 3] {
        send(&|w| {
            let h = DataHeader {
                stream: 1.into(),
                sender: 7.into(),
                epoch: 0.into(),
                sequence: seq.into(),
                timestamp: (seq + 1).into(),
                message_len: 300.into(),
                fragment_offset: 0.into(),
            };
            assert!(w.push_data(0, &h, &[seq as u8; 300]));
        });
    }
    send(&|w| {
        assert!(w.push_heartbeat(&HeartbeatBody {
            sender: 7.into(),
            epoch: 0.into(),
            next_sequence: 5.into(),
            oldest_sequence: 0.into(),
            timestamp: 5.into(),
        }));
    });
    let next = || rx.recv_timeout(Duration::from_secs(10)).expect("an output");
    assert_eq!(next(), "message 0");
    let started = Instant::now();
    let rest: Vec<String> = (0..4).map(|_| next()).collect();
    assert!(
        started.elapsed() >= Duration::from_millis(150),
        "given up before its timeout"
    );
    assert_eq!(rest, ["lost 1+1", "message 2", "message 3", "lost 4+1"]);
    let c = receiver.stats(9).unwrap().counters;
    assert_eq!(c.get(Counter::SendersTimedOut), 1);
    assert_eq!(c.get(Counter::FramesUnrecoverable), 2);
    let naks = c.get(Counter::NaksSent);
    assert!(naks > 0, "the gaps were NAKed while the sender might come back");
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        receiver.stats(9).unwrap().counters.get(Counter::NaksSent),
        naks,
        "NAKs stopped"
    );
}

#[test]
fn io_uring_gives_up_a_vanished_sender() {
    a_vanished_sender_is_given_up(BackendKind::IoUring);
}

#[test]
fn portable_gives_up_a_vanished_sender() {
    a_vanished_sender_is_given_up(BackendKind::Portable);
}
