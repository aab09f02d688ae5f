//! The protocol over real sockets: loopback multicast (interface 127.0.0.1, TTL 0), one sender
//! and two receivers, clean and with seeded receive loss. Every message is checked for order
//! and content.

use intergroup_engine::proto::{Event, Member, MemberConfig};
use intergroup_engine::transport::{ReceiveLoss, UdpConfig, UdpMember};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const SIZE: usize = 32;

fn payload(index: u64) -> [u8; SIZE] {
    let mut p = [0u8; SIZE];
    p[..8].copy_from_slice(&index.to_le_bytes());
    for (i, b) in p[8..].iter_mut().enumerate() {
        *b = (index as u8).wrapping_mul(31).wrapping_add(i as u8);
    }
    p
}

/// Member `id`; as a sender it moves past its first window only while `min_receivers`
/// receivers are live.
fn member(id: u32, min_receivers: u32) -> Member {
    let cfg = MemberConfig {
        member_id: id,
        group_size_hint: 3,
        min_receivers,
        ..MemberConfig::default()
    };
    Member::new(cfg, u64::from(id)).unwrap()
}

/// Member 1 as the sender to `receivers` receivers, held by flow control until all of them
/// report: it counts only receivers it has heard, and a receiver thread that starts late would
/// otherwise find the first messages evicted (CI once saw it: receiver 3, message 20).
fn sender(udp: &UdpConfig, receivers: u32) -> UdpMember {
    UdpMember::new(member(1, receivers), udp, None).expect("open sender sockets")
}

/// One sender, two receivers on the group at `port`; receivers drop `loss` of what arrives.
fn exchange(port: u16, messages: u64, loss: f64, seed: u64) {
    let udp = UdpConfig {
        group: SocketAddrV4::new(Ipv4Addr::new(239, 255, 77, 2), port),
        ..UdpConfig::default()
    };
    let done = Arc::new(AtomicUsize::new(0));
    let deadline = Instant::now() + Duration::from_secs(120);
    let receivers: Vec<_> = (2..=3u32)
        .map(|id| {
            let decorator = (loss > 0.0).then(|| ReceiveLoss::new(loss, seed + u64::from(id)));
            let mut r = UdpMember::new(member(id, 0), &udp, decorator).expect("open receiver sockets");
            let done = done.clone();
            std::thread::spawn(move || {
                let mut next = 0u64;
                let mut bad: Option<String> = None;
                let mut lost: Option<Event> = None;
                while next < messages && bad.is_none() && lost.is_none() {
                    assert!(
                        Instant::now() < deadline,
                        "seed {seed}: receiver {id} has {next} of {messages} after the deadline"
                    );
                    r.turn(
                        Duration::from_millis(5),
                        |d| {
                            if d.payload != payload(next) {
                                bad.get_or_insert(format!(
                                    "receiver {id}: message {next} wrong or out of order"
                                ));
                            }
                            next += 1;
                        },
                        |e| {
                            if let Event::UnrecoverableLoss { .. } = e {
                                lost.get_or_insert(e);
                            }
                        },
                    )
                    .unwrap();
                }
                done.fetch_add(1, Ordering::SeqCst);
                if let Some(e) = lost {
                    bad.get_or_insert(format!("receiver {id}: {e:?}"));
                }
                (bad, r.transport_stats(), r.member().counters().clone())
            })
        })
        .collect();
    let mut sender = sender(&udp, 2);
    let mut published = 0u64;
    while done.load(Ordering::SeqCst) < 2 {
        assert!(
            Instant::now() < deadline,
            "seed {seed}: sender stalled at {published}"
        );
        while published < messages && sender.publish(1, &payload(published)).is_ok() {
            published += 1;
        }
        sender.turn(Duration::from_millis(1), |_| {}, |_| {}).unwrap();
    }
    for r in receivers {
        let (bad, stats, counters) = r.join().unwrap();
        assert!(bad.is_none(), "seed {seed}: {}", bad.unwrap());
        if loss > 0.0 {
            assert!(
                stats.dropped_by_decorator > 0,
                "seed {seed}: the decorator dropped nothing"
            );
            assert!(
                counters.get(intergroup_engine::Counter::NaksSent) > 0,
                "seed {seed}"
            );
        }
    }
    assert_eq!(sender.transport_stats().send_errors, 0);
}

#[test]
fn a_million_messages_to_two_receivers_over_loopback_multicast() {
    exchange(40_201, 1_000_000, 0.0, 1);
}

#[test]
fn two_hundred_thousand_messages_with_five_percent_receive_loss() {
    exchange(40_202, 200_000, 0.05, 7);
}

/// Without multicast: each member lists the others' unicast addresses and fans group traffic out.
#[test]
fn unicast_fan_out_without_multicast() {
    let addr = |port: u16| std::net::SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let ports = [40_311u16, 40_312, 40_313];
    let udp = |me: usize| UdpConfig {
        unicast_port: ports[me],
        peers: ports
            .iter()
            .enumerate()
            .filter(|&(i, _)| i != me)
            .map(|(_, &p)| addr(p))
            .collect(),
        ..UdpConfig::default()
    };
    let messages = 100_000u64;
    let deadline = Instant::now() + Duration::from_secs(60);
    let done = Arc::new(AtomicUsize::new(0));
    let receivers: Vec<_> = (1..=2usize)
        .map(|i| {
            let mut r = UdpMember::new(member(i as u32 + 1, 0), &udp(i), None).unwrap();
            let done = done.clone();
            std::thread::spawn(move || {
                let mut next = 0u64;
                let mut ok = true;
                while next < messages {
                    assert!(Instant::now() < deadline, "receiver {i} has {next} of {messages}");
                    r.turn(
                        Duration::from_millis(5),
                        |d| {
                            ok &= d.payload == payload(next);
                            next += 1;
                        },
                        |_| {},
                    )
                    .unwrap();
                }
                done.fetch_add(1, Ordering::SeqCst);
                ok
            })
        })
        .collect();
    let mut sender = sender(&udp(0), 2);
    let mut published = 0u64;
    while done.load(Ordering::SeqCst) < 2 {
        assert!(Instant::now() < deadline, "sender stalled at {published}");
        while published < messages && sender.publish(1, &payload(published)).is_ok() {
            published += 1;
        }
        sender.turn(Duration::from_millis(1), |_| {}, |_| {}).unwrap();
    }
    for r in receivers {
        assert!(
            r.join().unwrap(),
            "a receiver got a wrong or out-of-order message"
        );
    }
}
