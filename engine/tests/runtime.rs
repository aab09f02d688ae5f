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
    Engine::launch(EngineConfig {
        backend,
        ..EngineConfig::default()
    })
    .expect("engine starts")
}

/// `count` messages from one engine to two others; every receiver checks content and order.
fn one_to_two(backend: BackendKind, count: u64, loss: f64, seed: u64) {
    let port = port();
    let sender = engine(backend);
    sender.join(group(1, port, 0.0, seed)).unwrap();
    let mut receivers = Vec::new();
    let (tx, rx) = mpsc::channel::<(u32, Result<u64, String>)>();
    for id in [2u32, 3] {
        let e = engine(backend);
        e.join(group(id, port, loss, seed + u64::from(id))).unwrap();
        let tx = tx.clone();
        let mut next = 0u64;
        e.subscribe(9, move |out: &Output<'_>| match out {
            Output::Message(m) => {
                let mut want = [0u8; 100];
                want[..8].copy_from_slice(&next.to_le_bytes());
                want[8..].fill(next as u8);
                let size = 16 + (next % 85) as usize;
                if m.sender != 1 || m.payload != &want[..size] {
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
    let mut msg = [0u8; 100];
    for i in 0..count {
        msg[..8].copy_from_slice(&i.to_le_bytes());
        msg[8..].fill(i as u8);
        let size = 16 + (i % 85) as usize;
        loop {
            match publication.offer(&msg[..size]) {
                Ok(()) => break,
                Err(OfferError::BackPressured) => std::thread::yield_now(),
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
    if loss > 0.0 {
        assert!(stats.counters.get(intergroup_engine::Counter::Retransmissions) > 0);
    }
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
