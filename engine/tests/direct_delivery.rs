//! `handle_datagram_with` (in-place delivery) hands out exactly what `handle_datagram` followed
//! by `drain` does, in the same order, under loss, duplication, reordering and fragmentation.

use intergroup_engine::proto::{Counter, Member, MemberConfig};
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

/// What one run publishes: message sizes up to `max_len`, in datagrams of `mtu` bytes.
#[derive(Debug, Clone, Copy)]
struct Shape {
    mtu: usize,
    max_len: usize,
    /// Most messages published before the sender is polled (packed into its datagrams).
    burst: u32,
    /// The sender's window and retransmit buffer, in frames (nothing acknowledges).
    window: u32,
}

/// Everything of a receiver that its caller can see besides its deliveries: counters, next
/// deadline, and the datagrams it would send now.
type Observed = (Vec<(&'static str, u64)>, Option<u64>, Vec<(Destination, Vec<u8>)>);

fn observe(m: &mut Member, now: u64) -> Observed {
    let mut buf = vec![0u8; 1472];
    let mut sent = Vec::new();
    while let Some(t) = m.poll_transmit(now, &mut buf) {
        sent.push((t.destination, buf[..t.len].to_vec()));
    }
    (m.counters().iter().collect(), m.poll_timeout(), sent)
}

/// Feeds one lossy, duplicated, reordered stream to two receivers, one delivering through
/// `handle_datagram` and `drain`, the other in place through `handle_datagram_with` (where
/// in-order whole messages take a fast path), with their timers run alike; everything both
/// hand out or show must be the same at every step. Returns how many outputs were compared.
fn run(seed: u64, shape: Shape) -> usize {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let cfg = |id| MemberConfig {
        member_id: id,
        mtu: shape.mtu,
        window_frames: shape.window,
        retransmit_frames: shape.window,
        // Short enough that the irregular clock below gives silent senders up and lets
        // receivers' STATUS lapse now and then.
        sender_timeout_ns: 40_000_000,
        receiver_timeout_ns: 30_000_000,
        ..MemberConfig::default()
    };
    let mut sender = Member::new(cfg(1), seed).unwrap();
    let mut datagrams = Vec::new();
    let mut buf = vec![0u8; shape.mtu];
    for i in 0..400u32 {
        for _ in 0..rng.random_range(1..=shape.burst) {
            let len = rng.random_range(0..shape.max_len);
            let msg: Vec<u8> = (0..len).map(|k| (k as u32 ^ i) as u8).collect();
            sender.publish(i % 3, &msg).unwrap();
        }
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
    // Heartbeats now and then, announcing sequences not received yet (a tail to NAK) and
    // moving the sender's oldest past some (declared lost): a frame behind either must not
    // be handed on as if nothing were missing.
    let sent = sender.counters().get(Counter::DataFramesSent);
    for k in (1..input.len()).rev() {
        if rng.random_bool(0.06) {
            let next = rng.random_range(0..=sent);
            let oldest = if rng.random_bool(0.3) {
                rng.random_range(0..=next)
            } else {
                0
            };
            input.insert(k, heartbeat_datagram(next, oldest));
        }
    }
    for chunk in input.chunks_mut(5) {
        if rng.random_bool(0.3) {
            chunk.shuffle(&mut rng);
        }
    }
    // The same id and seed: the two must send byte for byte the same.
    let mut queued = Member::new(cfg(2), 7).unwrap();
    let mut direct = Member::new(cfg(2), 7).unwrap();
    let (mut a, mut b) = (Vec::new(), Vec::new());
    let mut now = 0;
    for (k, d) in input.iter().enumerate() {
        // Mostly a millisecond apart, now and then a pause past the timeouts.
        now += if rng.random_bool(0.02) {
            50_000_000
        } else {
            rng.random_range(0..2_000_000)
        };
        // The sender's address changes now and then: STATUS follows it.
        let from = SocketAddr::from(([127, 0, 0, 1], 9 + (k / 20) as u16 % 3));
        queued.handle_datagram(now, from, d);
        queued.drain(|o| record(o, &mut a));
        direct.handle_datagram_with(now, from, d, &mut |o| record(*o, &mut b));
        assert_eq!(
            observe(&mut queued, now),
            observe(&mut direct, now),
            "seed {seed} {shape:?}, datagram {k}: the receivers' state differs"
        );
        if k % 7 == 6 {
            queued.handle_timeout(now);
            queued.drain(|o| record(o, &mut a));
            direct.handle_timeout(now);
            direct.drain(|o| record(o, &mut b));
        }
    }
    assert_eq!(
        a, b,
        "seed {seed} {shape:?}: in-place delivery differs from queued delivery"
    );
    a.len()
}

/// [`run`] for 200 seeds; at least `min_outputs` must have been compared.
fn run_seeds(shape: Shape, min_outputs: usize) {
    let delivered: usize = (0..200).map(|seed| run(seed, shape)).sum();
    eprintln!("{shape:?}: {delivered} outputs compared");
    assert!(
        delivered > min_outputs,
        "too little was delivered to compare: {delivered}"
    );
}

#[test]
fn in_place_delivery_matches_queued_delivery() {
    let shape = Shape {
        mtu: 300,
        max_len: 900,
        burst: 1,
        window: 64,
    };
    run_seeds(shape, 500);
}

/// Small messages, many to a datagram: most frames are whole and in order, the case the
/// receiver hands on without its general path.
#[test]
fn in_place_delivery_of_packed_small_messages_matches_queued_delivery() {
    let shape = Shape {
        mtu: 1472,
        max_len: 80,
        burst: 40,
        window: 1024,
    };
    run_seeds(shape, 20_000);
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

/// A heartbeat datagram of sender 1 (group 1) announcing `next` with `oldest` still held.
fn heartbeat_datagram(next: u64, oldest: u64) -> Vec<u8> {
    use intergroup_engine::wire::DatagramWriter;
    let mut buf = vec![0u8; 1472];
    let mut w = DatagramWriter::new(&mut buf, 1, 1).unwrap();
    assert!(w.push_heartbeat(&heartbeat(next, oldest)));
    let n = w.len();
    buf.truncate(n);
    buf
}

/// Sender 1's heartbeat announcing `next` with `oldest` still held.
fn heartbeat(next: u64, oldest: u64) -> intergroup_engine::wire::HeartbeatBody {
    intergroup_engine::wire::HeartbeatBody {
        sender: 1.into(),
        epoch: 0.into(),
        next_sequence: next.into(),
        oldest_sequence: oldest.into(),
        timestamp: 1.into(),
    }
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
    let from: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let mut m = receiver();
    let data = data_datagram(&[(5, b"x")]);
    let heartbeat = heartbeat_datagram(6, 5);
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

/// Both ways of delivering, fed the same datagrams: what each hands out; their counters and
/// what they send must agree after every datagram.
fn both_ways(datagrams: &[Vec<u8>]) -> (Vec<Seen>, Vec<Seen>) {
    let from: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let input: Vec<_> = datagrams.iter().map(|d| (from, d.clone())).collect();
    let (a, b, _) = both_ways_from(&input);
    (a, b)
}

/// [`both_ways`] with each datagram's source address; also returns where the receivers sent
/// their datagrams.
fn both_ways_from(datagrams: &[(SocketAddr, Vec<u8>)]) -> (Vec<Seen>, Vec<Seen>, Vec<Destination>) {
    let (mut queued, mut direct) = (receiver(), receiver());
    let (mut a, mut b) = (Vec::new(), Vec::new());
    let mut sent = Vec::new();
    for (k, (from, d)) in datagrams.iter().enumerate() {
        // A second apart, with the timers run: each step ends with a periodic STATUS.
        let now = k as u64 * 1_000_000_000;
        queued.handle_datagram(now, *from, d);
        queued.drain(|o| record(o, &mut a));
        direct.handle_datagram_with(now, *from, d, &mut |o| record(*o, &mut b));
        queued.handle_timeout(now);
        queued.drain(|o| record(o, &mut a));
        direct.handle_timeout(now);
        direct.drain(|o| record(o, &mut b));
        let (q, o) = (observe(&mut queued, now), observe(&mut direct, now));
        assert_eq!(q, o);
        sent.extend(q.2.into_iter().map(|(to, _)| to));
    }
    (a, b, sent)
}

/// A heartbeat that declares sequences lost, and the next frame after them in the same
/// datagram: the frame is in order with nothing held, but the loss event is queued before it.
#[test]
fn a_frame_behind_a_loss_event_of_its_own_datagram_waits_for_it() {
    use intergroup_engine::wire::{DataHeader, DatagramWriter};
    let mut buf = vec![0u8; 1472];
    let mut w = DatagramWriter::new(&mut buf, 1, 1).unwrap();
    assert!(w.push_heartbeat(&heartbeat(3, 3)));
    let h = DataHeader {
        stream: 1.into(),
        sender: 1.into(),
        epoch: 0.into(),
        sequence: 3.into(),
        timestamp: 4.into(),
        message_len: 1.into(),
        fragment_offset: 0.into(),
    };
    assert!(w.push_data(0, &h, b"z"));
    let n = w.len();
    let (queued, direct) = both_ways(&[buf[..n].to_vec()]);
    let want = [
        Seen::Event(Event::UnrecoverableLoss {
            sender: 1,
            first: 0,
            count: 3,
        }),
        Seen::Message(1, 3, b"z".to_vec()),
    ];
    assert_eq!(queued, want);
    assert_eq!(direct, want);
}

/// A sender that starts a message in fragments and sends a whole one at the next sequence
/// (not what this engine sends, but a datagram may say anything): the unfinished message is
/// counted as discarded, and fragments that follow for it are not glued to anything.
#[test]
fn a_whole_message_after_an_unfinished_one_discards_it_either_way() {
    let frame = |seq, message_len, offset, payload: &[u8]| frame(1, 0, seq, message_len, offset, payload);
    let datagrams = [
        frame(0, 4, 0, b"ab"),
        frame(1, 1, 0, b"w"),
        frame(2, 4, 2, b"cd"),
        frame(3, 1, 0, b"v"),
    ];
    let (queued, direct) = both_ways(&datagrams);
    let want = [
        Seen::Message(1, 1, b"w".to_vec()),
        Seen::Message(1, 3, b"v".to_vec()),
    ];
    assert_eq!(queued, want);
    assert_eq!(direct, want);
}

/// A datagram from `source` with one DATA frame of sender 1 in `epoch`.
fn frame(source: u32, epoch: u32, seq: u64, message_len: u32, offset: u32, payload: &[u8]) -> Vec<u8> {
    use intergroup_engine::wire::{DataHeader, DatagramWriter};
    let mut buf = vec![0u8; 4096];
    let mut w = DatagramWriter::new(&mut buf, 1, source).unwrap();
    let h = DataHeader {
        stream: 1.into(),
        sender: 1.into(),
        epoch: epoch.into(),
        sequence: seq.into(),
        timestamp: 1.into(),
        message_len: message_len.into(),
        fragment_offset: offset.into(),
    };
    assert!(w.push_data(0, &h, payload));
    let n = w.len();
    buf.truncate(n);
    buf
}

/// A frame of another epoch is refused, and a frame relayed by another member (its datagram's
/// source is not its sender) is delivered without taking the relay's address for the sender's:
/// STATUS still goes to the sender itself.
#[test]
fn frames_of_another_epoch_or_relayed_go_the_general_way() {
    let sender: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let relay: SocketAddr = "127.0.0.1:10".parse().unwrap();
    let (queued, direct, sent) = both_ways_from(&[
        (sender, frame(1, 0, 0, 1, 0, b"a")),
        (sender, frame(1, 1, 1, 1, 0, b"b")),
        (relay, frame(5, 0, 1, 1, 0, b"c")),
        (sender, frame(1, 0, 2, 1, 0, b"d")),
    ]);
    let want = [
        Seen::Message(1, 0, b"a".to_vec()),
        Seen::Message(1, 1, b"c".to_vec()),
        Seen::Message(1, 2, b"d".to_vec()),
    ];
    assert_eq!(queued, want);
    assert_eq!(direct, want);
    assert!(sent.len() >= 3, "a STATUS after the relayed frame: {sent:?}");
    assert!(
        sent.iter().all(|&to| to == Destination::Unicast(sender)),
        "{sent:?}"
    );
}

/// A frame larger than this receiver's MTU allows (members of a group must share one) is
/// refused, whole and in order though it is.
#[test]
fn a_frame_beyond_the_mtu_is_refused_either_way() {
    let big = vec![7u8; 1500];
    let (queued, direct) = both_ways(&[
        frame(1, 0, 0, 1, 0, b"a"),
        frame(1, 0, 1, 1500, 0, &big),
        frame(1, 0, 1, 1, 0, b"b"),
    ]);
    let want = [
        Seen::Message(1, 0, b"a".to_vec()),
        Seen::Message(1, 1, b"b".to_vec()),
    ];
    assert_eq!(queued, want);
    assert_eq!(direct, want);
}
