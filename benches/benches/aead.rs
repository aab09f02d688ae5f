//! AES-256-GCM seal + open on one core, in place: the bound encrypted throughput is measured
//! against (issue 7's `ratio_to_aead`).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use intergroup_secure::EpochSecret;
use std::hint::black_box;

fn seal_open(c: &mut Criterion) {
    let secret = EpochSecret::from_bytes([0x42; 32]);
    for size in [64usize, 1024, 8192] {
        let mut g = c.benchmark_group(format!("aead_{}_{size}B", intergroup_secure::aead::BACKEND));
        g.throughput(Throughput::Bytes(size as u64));
        let mut key = secret.sender_key(1, 1, 1, 0);
        let receiver = secret.sender_key(1, 1, 1, 0);
        let mut buf = vec![0u8; size + 16];
        let aad = [0u8; 24];
        let mut packet = 0u64;
        g.bench_function("seal_open", |b| {
            b.iter(|| {
                let tag = key.seal_in_place(packet, &aad, &mut buf[..size]).unwrap();
                buf[size..].copy_from_slice(&tag);
                receiver.open_in_place(packet, &aad, &mut buf).unwrap();
                packet += 1;
                black_box(&buf);
            })
        });
        g.finish();
    }
}

criterion_group!(benches, seal_open);
criterion_main!(benches);
