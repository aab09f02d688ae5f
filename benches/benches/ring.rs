//! Shared-memory rings against a bare SPSC slot ring measured in the same run.
//!
//! Each benchmark passes `iters` records from producer(s) to consumer(s) and reports records/s;
//! `scripts/bench-ring.sh` turns criterion's medians into ratios against `baseline_spsc`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use intergroup_benches::baseline::SlotRing;
use intergroup_ring::broadcast::{self, BroadcastProducer, BroadcastReader, Mode};
use intergroup_ring::records::{self, Producers, RecordConsumer, RecordProducer, SingleProducer};
use intergroup_ring::OfferError;
use std::hint::black_box;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

const RING_BYTES: u64 = 1 << 20;

fn ring_file(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("intergroup-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// Every consumer here, and every producer that finds the ring full, does the same when it
/// makes no progress: a short pause, so a consumer that outruns its producer does not hammer the
/// producer's index line (which would measure the cache-line ping-pong of an empty ring rather
/// than the ring), then a yield, because the 2->1 and 1->2 cases run three threads on two cores.
fn idle(n: u64) {
    if n == 0 {
        for _ in 0..512 {
            std::hint::spin_loop();
        }
        std::thread::yield_now();
    }
}

fn offer_spin(p: &RecordProducer, record: &[u8]) {
    while let Err(e) = p.offer(1, record) {
        assert_eq!(e, OfferError::WouldBlock);
        idle(0);
    }
}

/// Baseline: `iters` fixed-size records through the bare slot ring, two threads.
fn baseline(iters: u64, size: usize) -> Duration {
    let ring = SlotRing::new((RING_BYTES as usize / size).next_power_of_two(), size);
    let producer = {
        let ring = ring.clone();
        std::thread::spawn(move || {
            let record = vec![0x5au8; size];
            let mut cached = 0;
            for _ in 0..iters {
                while !ring.push(&record, &mut cached) {
                    idle(0);
                }
            }
        })
    };
    let start = Instant::now();
    let (mut got, mut cached, mut sum) = (0u64, 0usize, 0u64);
    while got < iters {
        let n = ring.pop_batch(4096, &mut cached, |r| sum += u64::from(r[0])) as u64;
        idle(n);
        got += n;
    }
    let elapsed = start.elapsed();
    producer.join().unwrap();
    black_box(sum);
    elapsed
}

/// `iters` records through a single-producer record ring, two threads.
fn single_producer_threads(iters: u64, size: usize) -> Duration {
    let path = ring_file("records-single");
    records::create_with(&path, RING_BYTES, Producers::Single).unwrap();
    let mut consumer = RecordConsumer::open(&path, Duration::from_secs(10)).unwrap();
    let producer = {
        let path = path.clone();
        std::thread::spawn(move || {
            let mut p = SingleProducer::open(&path).unwrap();
            let record = vec![0x5au8; size];
            for _ in 0..iters {
                while p.offer(1, &record).is_err() {
                    idle(0);
                }
            }
        })
    };
    let start = Instant::now();
    let (mut got, mut sum) = (0u64, 0u64);
    while got < iters {
        let n = consumer.read(4096, |_, r| sum += u64::from(r[0])) as u64;
        idle(n);
        got += n;
    }
    let elapsed = start.elapsed();
    producer.join().unwrap();
    black_box(sum);
    elapsed
}

/// `iters` records through the record ring from `producers` threads to one consumer.
fn record_ring_threads(iters: u64, size: usize, producers: u64) -> Duration {
    let path = ring_file("records");
    records::create(&path, RING_BYTES).unwrap();
    let mut consumer = RecordConsumer::open(&path, Duration::from_secs(10)).unwrap();
    let per = iters.div_ceil(producers);
    let handles: Vec<_> = (0..producers)
        .map(|_| {
            let path = path.clone();
            std::thread::spawn(move || {
                let p = RecordProducer::open(&path).unwrap();
                let record = vec![0x5au8; size];
                for _ in 0..per {
                    offer_spin(&p, &record);
                }
            })
        })
        .collect();
    let start = Instant::now();
    let (mut got, mut sum) = (0u64, 0u64);
    while got < per * producers {
        let n = consumer.read(4096, |_, r| sum += u64::from(r[0])) as u64;
        idle(n);
        got += n;
    }
    let elapsed = start.elapsed();
    for h in handles {
        h.join().unwrap();
    }
    black_box(sum);
    elapsed
}

/// Records from a producer process (the `ring-producer` helper) to this process. Each sample
/// moves a fixed 2 million records, timed from the first record's arrival (so process start-up
/// is not counted), and the time is scaled to `iters`.
fn record_ring_processes(iters: u64, size: usize, producers: Producers) -> Duration {
    const RUN: u64 = 2_000_000;
    record_ring_processes_run(RUN, size, producers).mul_f64(iters as f64 / RUN as f64)
}

fn record_ring_processes_run(iters: u64, size: usize, producers: Producers) -> Duration {
    let path = ring_file("records-xproc");
    records::create_with(&path, RING_BYTES, producers).unwrap();
    let mode = if producers == Producers::Single {
        "single"
    } else {
        "many"
    };
    let mut consumer = RecordConsumer::open(&path, Duration::from_secs(10)).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_ring-producer"))
        .args([
            path.to_str().unwrap(),
            &iters.to_string(),
            &size.to_string(),
            mode,
        ])
        .spawn()
        .unwrap();
    let (mut got, mut sum) = (0u64, 0u64);
    // The clock starts at the first record, and the records of that first read are not counted.
    while got == 0 {
        got = consumer.read(1, |_, r| sum += u64::from(r[0])) as u64;
        idle(got);
    }
    let start = Instant::now();
    while got < iters {
        let n = consumer.read(4096, |_, r| sum += u64::from(r[0])) as u64;
        idle(n);
        got += n;
    }
    let elapsed = start.elapsed().mul_f64(iters as f64 / (iters - 1) as f64);
    assert!(child.wait().unwrap().success());
    black_box(sum);
    elapsed
}

/// `iters` records from one producer to two reader threads of a reliable broadcast log.
fn broadcast_two_readers(iters: u64, size: usize) -> Duration {
    let path = ring_file("broadcast");
    broadcast::create(&path, RING_BYTES, 4, Mode::Reliable).unwrap();
    let mut producer = BroadcastProducer::open(&path, Duration::from_secs(10)).unwrap();
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let mut r = BroadcastReader::open(&path).unwrap();
            std::thread::spawn(move || {
                let (mut got, mut sum) = (0u64, 0u64);
                while got < iters {
                    let n = r.poll(4096, |_, b| sum += u64::from(b[0])).unwrap() as u64;
                    idle(n);
                    got += n;
                }
                black_box(sum);
            })
        })
        .collect();
    let record = vec![0x5au8; size];
    let start = Instant::now();
    for _ in 0..iters {
        while producer.offer(1, &record).is_err() {
            idle(0);
        }
    }
    for r in readers {
        r.join().unwrap();
    }
    start.elapsed()
}

fn rings(c: &mut Criterion) {
    for size in [32usize, 1024] {
        let mut g = c.benchmark_group(format!("ring_{size}B"));
        g.throughput(Throughput::Elements(1));
        g.measurement_time(Duration::from_secs(4));
        g.bench_function(BenchmarkId::new("baseline_spsc", "threads"), |b| {
            b.iter_custom(|iters| baseline(iters, size))
        });
        g.bench_function(BenchmarkId::new("records_1to1", "threads"), |b| {
            b.iter_custom(|iters| record_ring_threads(iters, size, 1))
        });
        g.bench_function(BenchmarkId::new("single_1to1", "threads"), |b| {
            b.iter_custom(|iters| single_producer_threads(iters, size))
        });
        g.bench_function(BenchmarkId::new("records_2to1", "threads"), |b| {
            b.iter_custom(|iters| record_ring_threads(iters, size, 2))
        });
        g.bench_function(BenchmarkId::new("broadcast_1to2", "threads"), |b| {
            b.iter_custom(|iters| broadcast_two_readers(iters, size))
        });
        g.sample_size(10);
        g.bench_function(BenchmarkId::new("records_1to1", "processes"), |b| {
            b.iter_custom(|iters| record_ring_processes(iters, size, Producers::Many))
        });
        g.bench_function(BenchmarkId::new("single_1to1", "processes"), |b| {
            b.iter_custom(|iters| record_ring_processes(iters, size, Producers::Single))
        });
        g.finish();
    }
}

criterion_group!(benches, rings);
criterion_main!(benches);
