//! Wire decoding and a member's receive path, each beside a copy-once ceiling in the same run.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use intergroup_benches::{copy_ceiling, sender_datagrams};
use intergroup_engine::proto::{Lend, Lent, Member, MemberConfig, Output};
use intergroup_engine::wire::{self, Frame};
use std::hint::black_box;
use std::net::SocketAddr;

/// A member that takes the bench's datagrams, with a window wider than all of them.
fn receiver() -> Member {
    Member::new(
        MemberConfig {
            member_id: 2,
            window_frames: 1 << 20,
            retransmit_frames: 1 << 20,
            ..MemberConfig::default()
        },
        2,
    )
    .unwrap()
}

/// Datagrams that pass between a loss and its repair in `member_deliver_repaired`.
const REPAIR_DELAY: usize = 256;

/// A lender that pins every frame where it lies (the bench's arena outlives the member).
struct PinAll;

impl Lend for PinAll {
    fn pin(&mut self, _at: usize) -> bool {
        true
    }
    fn unpin(&mut self, _at: usize) {}
}

fn receive_path(c: &mut Criterion) {
    for size in [64usize, 1024] {
        let cfg = MemberConfig {
            member_id: 1,
            ..MemberConfig::default()
        };
        let datagrams = sender_datagrams(&cfg, size, 1024);
        let bytes: usize = datagrams.iter().map(Vec::len).sum();
        let mut group = c.benchmark_group(format!("receive_{size}B"));
        group.throughput(Throughput::Bytes(bytes as u64));
        let mut scratch = vec![0u8; 65536];
        group.bench_function("ceiling_copy", |b| {
            b.iter(|| copy_ceiling(black_box(&datagrams), &mut scratch))
        });
        group.bench_function("decode", |b| {
            b.iter(|| {
                let mut payload = 0;
                for d in &datagrams {
                    let (_, frames) = wire::decode_datagram(black_box(d)).unwrap();
                    for f in frames {
                        if let Ok(Frame::Data(data)) = f {
                            payload += data.payload.len();
                        }
                    }
                }
                payload
            })
        });
        let from: SocketAddr = "127.0.0.1:9000".parse().unwrap();
        group.bench_function("member_deliver", |b| {
            b.iter_batched_ref(
                receiver,
                |m| {
                    for d in &datagrams {
                        m.handle_datagram(0, from, black_box(d));
                    }
                    let mut n = 0;
                    m.drain(|out| {
                        if let Output::Message(d) = out {
                            n += d.payload.len();
                        }
                    });
                    n
                },
                criterion::BatchSize::LargeInput,
            )
        });
        // What a subscriber's worker runs: each datagram handed on in place as it arrives.
        group.bench_function("member_deliver_in_place", |b| {
            b.iter_batched_ref(
                receiver,
                |m| {
                    let mut n = 0;
                    for d in &datagrams {
                        m.handle_datagram_with(0, from, black_box(d), &mut |out| {
                            if let Output::Message(d) = out {
                                n += d.payload.len();
                            }
                        });
                    }
                    n
                },
                criterion::BatchSize::LargeInput,
            )
        });
        // Under loss, as a subscriber's worker runs it: every twentieth datagram misses its
        // turn and comes again 256 datagrams later, as a repair would (a NAK's round trip at
        // about 2 M datagrams/s), so most frames wait behind one of a dozen gaps, pinned where
        // they arrived, while the loss detector tracks, fills and hands on around them (5%
        // loss; a pattern, not random: no seed).
        let mut arena = Vec::with_capacity(bytes);
        let mut ranges = Vec::with_capacity(datagrams.len());
        for d in &datagrams {
            ranges.push(arena.len()..arena.len() + d.len());
            arena.extend_from_slice(d);
        }
        let mut order: Vec<usize> = Vec::with_capacity(datagrams.len());
        let mut due = std::collections::VecDeque::new();
        for i in 0..datagrams.len() {
            if i % 20 == 7 {
                due.push_back((i + REPAIR_DELAY, i));
            } else {
                order.push(i);
            }
            while due.front().is_some_and(|&(at, _)| at <= i) {
                order.push(due.pop_front().map(|(_, d)| d).unwrap_or_default());
            }
        }
        order.extend(due.iter().map(|&(_, d)| d));
        // What the same datagrams deliver in order: the repaired run must deliver as much.
        let mut expected = 0;
        let mut m = receiver();
        for d in &datagrams {
            m.handle_datagram_with(0, from, d, &mut |out| {
                if let Output::Message(d) = out {
                    expected += d.payload.len();
                }
            });
        }
        group.bench_function("member_deliver_repaired", |b| {
            b.iter_batched_ref(
                receiver,
                |m| {
                    let mut n = 0;
                    let mut lender = PinAll;
                    for &i in &order {
                        let mut lent = Lent {
                            arena: &arena,
                            lender: &mut lender,
                        };
                        m.handle_datagram_lent(0, from, &mut lent, ranges[i].clone(), &mut |out| {
                            if let Output::Message(d) = out {
                                n += d.payload.len();
                            }
                        });
                    }
                    assert_eq!(n, expected, "the repaired run delivered another amount");
                    n
                },
                criterion::BatchSize::LargeInput,
            )
        });
        group.finish();
    }
}

criterion_group!(benches, receive_path);
criterion_main!(benches);
