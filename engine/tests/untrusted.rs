//! Untrusted bytes never panic: the decoder and a live member take random and mutated datagrams.

use intergroup_engine::proto::{Counter, Member, MemberConfig};
use intergroup_engine::wire::{self, DataHeader, DatagramWriter, Frame, HeartbeatBody, NakRange, StatusBody};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use std::cell::RefCell;
use std::net::SocketAddr;

/// A well-formed datagram of group 1 built from `frames` (kind, a, b) descriptions.
fn valid_datagram(frames: &[(u8, u64, u32)], payload_len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; 1472];
    let mut w = DatagramWriter::new(&mut buf, 1, 2).unwrap();
    for &(kind, a, b) in frames {
        match kind % 4 {
            0 => {
                let len = payload_len.min(200);
                let h = DataHeader {
                    stream: b.into(),
                    sender: 2.into(),
                    epoch: 0.into(),
                    sequence: (a % 4096).into(),
                    timestamp: a.into(),
                    message_len: (len as u32).into(),
                    fragment_offset: 0.into(),
                };
                w.push_data(0, &h, &vec![0x5a; len]);
            }
            1 => {
                let r = NakRange {
                    first: (a % 1_000_000).into(),
                    count: b.max(1).into(),
                };
                w.push_nak(if a % 2 == 0 { 2 } else { 9 }, &[r]);
            }
            2 => {
                w.push_status(&StatusBody {
                    sender: 9.into(),
                    window: b.into(),
                    position: a.into(),
                });
            }
            _ => {
                w.push_heartbeat(&HeartbeatBody {
                    sender: 2.into(),
                    epoch: 0.into(),
                    next_sequence: a.into(),
                    oldest_sequence: (a / 2).into(),
                    timestamp: 1.into(),
                });
            }
        }
    }
    let len = w.len();
    buf.truncate(len);
    buf
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Truncate(usize),
    Extend(Vec<u8>),
    Splice(usize, Vec<u8>),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Flip(i, b)),
        any::<usize>().prop_map(Mutation::Truncate),
        prop::collection::vec(any::<u8>(), 1..40).prop_map(Mutation::Extend),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..8)).prop_map(|(i, v)| Mutation::Splice(i, v)),
    ]
}

fn apply(bytes: &mut Vec<u8>, m: &Mutation) {
    if bytes.is_empty() {
        return;
    }
    match m {
        Mutation::Flip(i, b) => {
            let n = bytes.len();
            bytes[i % n] ^= b | 1;
        }
        Mutation::Truncate(i) => bytes.truncate(i % bytes.len()),
        Mutation::Extend(v) => bytes.extend_from_slice(v),
        Mutation::Splice(i, v) => {
            let at = i % bytes.len();
            let end = (at + v.len()).min(bytes.len());
            bytes.splice(at..end, v.iter().copied());
        }
    }
}

fn datagram() -> impl Strategy<Value = Vec<u8>> {
    let frames = prop::collection::vec((any::<u8>(), any::<u64>(), any::<u32>()), 0..6);
    let mutated =
        (frames, 0usize..300, prop::collection::vec(mutation(), 0..4)).prop_map(|(f, len, muts)| {
            let mut d = valid_datagram(&f, len);
            for m in &muts {
                apply(&mut d, m);
            }
            d
        });
    let random = prop::collection::vec(any::<u8>(), 0..1600);
    let random_with_header = prop::collection::vec(any::<u8>(), 0..400).prop_map(|mut v| {
        let mut d = vec![b'I', b'G', 1, 0, 1, 0, 0, 0, 2, 0, 0, 0];
        d.append(&mut v);
        d
    });
    prop_oneof![4 => mutated, 1 => random, 2 => random_with_header]
}

#[test]
fn a_hundred_thousand_random_and_mutated_datagrams_never_panic() {
    let seed = std::env::var("INTERGROUP_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x1a2b_3c4d_u64);
    let mut seed_bytes = [0u8; 32];
    seed_bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let mut runner = TestRunner::new_with_rng(
        Config {
            cases: 100_000,
            failure_persistence: None,
            ..Config::default()
        },
        proptest::test_runner::TestRng::from_seed(proptest::test_runner::RngAlgorithm::ChaCha, &seed_bytes),
    );
    let cfg = MemberConfig {
        member_id: 9,
        ..MemberConfig::default()
    };
    let member = RefCell::new(Member::new(cfg, 1).unwrap());
    let from: SocketAddr = "127.0.0.1:9000".parse().unwrap();
    let mut buf = vec![0u8; 1472];
    let buf = RefCell::new(&mut buf);
    let cases = std::cell::Cell::new(0u64);
    let result = runner.run(&datagram(), |bytes| {
        cases.set(cases.get() + 1);
        // The decoder: a typed result for every frame, and never more frames than bytes allow.
        if let Ok((_, frames)) = wire::decode_datagram(&bytes) {
            let mut n = 0;
            for f in frames {
                n += 1;
                if let Ok(Frame::Data(d)) = f {
                    prop_assert!(d.payload.len() <= bytes.len());
                }
            }
            prop_assert!(n <= bytes.len() / wire::FRAME_HEADER_LEN + 1);
        }
        // A live member takes it, and whatever it answers stays within the MTU.
        let mut m = member.borrow_mut();
        m.handle_datagram(1_000, from, &bytes);
        m.handle_timeout(10_000_000);
        let mut b = buf.borrow_mut();
        let mut sent = 0;
        while let Some(t) = m.poll_transmit(10_000_000, &mut b[..]) {
            prop_assert!(t.len <= 1472);
            sent += 1;
            if sent > 10_000 {
                return Err(TestCaseError::fail("poll_transmit does not stop"));
            }
        }
        m.drain(|_| {});
        while m.poll_event().is_some() {}
        Ok(())
    });
    if let Err(e) = result {
        panic!("seed {seed} (INTERGROUP_SEED={seed} to replay): {e}");
    }
    assert!(cases.get() >= 100_000, "only {} cases ran", cases.get());
    let m = member.borrow();
    let c = m.counters();
    assert!(
        c.get(Counter::RejectedMalformed) > 1000,
        "the mutations should reach the decoder's checks"
    );
    assert!(
        c.get(Counter::DatagramsReceived) > 1000,
        "valid datagrams should get through"
    );
}
