//! `handle_datagram_with` (in-place delivery) hands out exactly what `handle_datagram` followed
//! by `drain` does, in the same order, under loss, duplication, reordering and fragmentation.

use intergroup_engine::proto::{Member, MemberConfig};
use intergroup_engine::{Destination, Event, Output};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::net::SocketAddr;

#[derive(Debug, PartialEq, Eq)]
enum Seen {
    Message(u32, u64, Vec<u8>),
    Event(Event),
}

fn record(out: Output<'_>, into: &mut Vec<Seen>) {
    into.push(match out {
        Output::Message(m) => Seen::Message(m.stream, m.sequence, m.payload.to_vec()),
        Output::Event(e) => Seen::Event(e),
    });
}

fn run(seed: u64) -> usize {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let cfg = |id| MemberConfig {
        member_id: id,
        mtu: 300,
        window_frames: 64,
        retransmit_frames: 64,
        ..MemberConfig::default()
    };
    let mut sender = Member::new(cfg(1), seed).unwrap();
    let mut datagrams = Vec::new();
    let mut buf = vec![0u8; 300];
    for i in 0..400u32 {
        let len = rng.random_range(0..900);
        let msg: Vec<u8> = (0..len).map(|k| (k as u32 ^ i) as u8).collect();
        sender.publish(i % 3, &msg).unwrap();
        while let Some(t) = sender.poll_transmit(u64::from(i), &mut buf) {
            if t.destination == Destination::Group {
                datagrams.push(buf[..t.len].to_vec());
            }
        }
        // A fresh sender window now and then: flow control would otherwise stop it.
        if datagrams.len() > 50 {
            break;
        }
    }
    // Lose, duplicate and reorder.
    let mut input: Vec<Vec<u8>> = Vec::new();
    for (k, d) in datagrams.iter().enumerate() {
        if k > 0 && rng.random_bool(0.1) {
            continue;
        }
        input.push(d.clone());
        if rng.random_bool(0.1) {
            input.push(d.clone());
        }
    }
    for chunk in input.chunks_mut(5) {
        if rng.random_bool(0.3) {
            chunk.shuffle(&mut rng);
        }
    }
    let from: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let mut queued = Member::new(cfg(2), 7).unwrap();
    let mut direct = Member::new(cfg(3), 7).unwrap();
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for (k, d) in input.iter().enumerate() {
        let now = k as u64 * 1000;
        queued.handle_datagram(now, from, d);
        queued.drain(|o| record(o, &mut a));
        direct.handle_datagram_with(now, from, d, &mut |o| record(*o, &mut b));
    }
    assert_eq!(
        a, b,
        "seed {seed}: in-place delivery differs from queued delivery"
    );
    a.len()
}

#[test]
fn in_place_delivery_matches_queued_delivery() {
    let delivered: usize = (0..200).map(run).sum();
    assert!(
        delivered > 500,
        "too little was delivered to compare: {delivered}"
    );
}

/// A datagram of sender 1 (group 1) carrying one single-fragment DATA frame per
/// `(sequence, payload)`, each stamped with timestamp `sequence + 1`.
fn data_datagram(frames: &[(u64, &[u8])]) -> Vec<u8> {
    use intergroup_engine::wire::{DataHeader, DatagramWriter};
    let mut buf = vec![0u8; 1472];
    let mut w = DatagramWriter::new(&mut buf, 1, 1).unwrap();
    for &(seq, payload) in frames {
        let h = DataHeader {
            stream: 1.into(),
            sender: 1.into(),
            epoch: 0.into(),
            sequence: seq.into(),
            timestamp: (seq + 1).into(),
            message_len: (payload.len() as u32).into(),
            fragment_offset: 0.into(),
        };
        assert!(w.push_data(0, &h, payload));
    }
    let n = w.len();
    buf.truncate(n);
    buf
}

fn receiver() -> Member {
    Member::new(
        MemberConfig {
            member_id: 2,
            ..MemberConfig::default()
        },
        1,
    )
    .unwrap()
}

/// A datagram that fills a gap and carries a later frame too: the frames held behind the gap
/// are queued, so the later frame must wait behind them, not jump ahead in place.
#[test]
fn a_frame_after_a_filled_gap_waits_behind_the_held_frames() {
    let bytes: Vec<[u8; 8]> = (0..4u64).map(u64::to_le_bytes).collect();
    let from: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let mut m = receiver();
    let mut seen = Vec::new();
    for d in [
        data_datagram(&[(1, &bytes[1]), (2, &bytes[2])]),
        data_datagram(&[(0, &bytes[0]), (3, &bytes[3])]),
    ] {
        m.handle_datagram_with(0, from, &d, &mut |o| {
            if let Output::Message(msg) = o {
                seen.push(u64::from_le_bytes(msg.payload.try_into().unwrap()));
            }
        });
    }
    assert_eq!(seen, [0, 1, 2, 3]);
}

/// Frames declared lost (the sender's buffer moved past them) come out as an event in their
/// place: the message held behind them must not overtake the event.
#[test]
fn a_loss_event_keeps_its_place_before_the_messages_after_it() {
    use intergroup_engine::wire::{DatagramWriter, HeartbeatBody};
    let from: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let mut m = receiver();
    let data = data_datagram(&[(5, b"x")]);
    let mut buf = vec![0u8; 1472];
    let mut w = DatagramWriter::new(&mut buf, 1, 1).unwrap();
    assert!(w.push_heartbeat(&HeartbeatBody {
        sender: 1.into(),
        epoch: 0.into(),
        next_sequence: 6.into(),
        oldest_sequence: 5.into(),
        timestamp: 7.into(),
    }));
    let n = w.len();
    let heartbeat = buf[..n].to_vec();
    let mut seen = Vec::new();
    for d in [data, heartbeat] {
        m.handle_datagram_with(0, from, &d, &mut |o| record(*o, &mut seen));
    }
    assert_eq!(
        seen,
        [
            Seen::Event(Event::UnrecoverableLoss {
                sender: 1,
                first: 0,
                count: 5
            }),
            Seen::Message(1, 5, b"x".to_vec()),
        ]
    );
}
