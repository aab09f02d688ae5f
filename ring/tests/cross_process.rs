//! Separate processes (this test binary, spawned again as a child) share one ring file:
//! 10 million checksummed records from several producers, and producers killed with SIGKILL
//! between claim and commit.

use intergroup_ring::broadcast::{self, BroadcastProducer, BroadcastReader, Mode, ReadError};
use intergroup_ring::records::{
    self, Producers, RecordConsumer, RecordProducer, SingleProducer, TAIL_OFFSET,
};
use intergroup_ring::OfferError;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const ROLE: &str = "IG_RING_ROLE";
const PATH: &str = "IG_RING_PATH";
const ID: &str = "IG_RING_ID";
const COUNT: &str = "IG_RING_COUNT";

fn checksum(producer: u32, seq: u64) -> u64 {
    let mut x = (u64::from(producer) << 48) ^ seq ^ 0x517c_c1b7_2722_0a95;
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^ (x >> 33)
}

/// Record `seq` of `producer`: producer, seq, checksum, then `seq % 23` filler bytes.
fn encode(producer: u32, seq: u64, out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&producer.to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&checksum(producer, seq).to_le_bytes());
    out.extend(std::iter::repeat_n(seq as u8, (seq % 23) as usize));
}

/// Checks one record; returns (producer, seq).
fn decode(b: &[u8]) -> (u32, u64) {
    assert!(b.len() >= 20, "short record: {} bytes", b.len());
    let producer = u32::from_le_bytes(b[..4].try_into().unwrap());
    let seq = u64::from_le_bytes(b[4..12].try_into().unwrap());
    let sum = u64::from_le_bytes(b[12..20].try_into().unwrap());
    assert_eq!(
        sum,
        checksum(producer, seq),
        "corrupt record {seq} of producer {producer}"
    );
    assert_eq!(
        b.len(),
        20 + (seq % 23) as usize,
        "record {seq} of producer {producer} has the wrong length"
    );
    assert!(
        b[20..].iter().all(|&x| x == seq as u8),
        "corrupt filler in record {seq}"
    );
    (producer, seq)
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// Produces `count` records as producer `id`, spinning while the ring is full.
fn produce(path: &Path, id: u32, first: u64, count: u64) {
    let p = RecordProducer::open(path).expect("child opens ring");
    let mut buf = Vec::with_capacity(64);
    for seq in first..first + count {
        encode(id, seq, &mut buf);
        loop {
            match p.offer(1, &buf) {
                Ok(()) => break,
                Err(OfferError::WouldBlock) => std::thread::yield_now(),
                Err(e) => panic!("offer failed: {e}"),
            }
        }
    }
}

/// Runs this test binary again as a child in `role`, only the named test.
fn spawn(test: &str, role: &str, path: &Path, id: u32, count: u64, stdout: bool) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(ROLE, role)
        .env(PATH, path)
        .env(ID, id.to_string())
        .env(COUNT, count.to_string())
        .stdout(if stdout { Stdio::piped() } else { Stdio::null() })
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn child")
}

/// A ring file's path in a fresh directory, removed with the returned guard (also when the
/// test fails). The children get the path itself.
fn ring_path(name: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::Builder::new()
        .prefix("intergroup-xproc-")
        .tempdir()
        .expect("a temporary directory");
    let path = dir.path().join(name);
    (dir, path)
}

/// The child side of every test here; returns true when this process is a child.
fn run_child() -> bool {
    let Some(role) = env(ROLE) else {
        return false;
    };
    let path = PathBuf::from(env(PATH).unwrap());
    let id: u32 = env(ID).unwrap().parse().unwrap();
    let count: u64 = env(COUNT).unwrap().parse().unwrap();
    match role.as_str() {
        "produce" => produce(&path, id, 0, count),
        "claim-and-hang" => {
            // Commits `count` records, then claims one more, half fills it, and waits to be
            // killed between claim and commit.
            produce(&path, id, 0, count);
            let p = RecordProducer::open(&path).unwrap();
            let mut claim = p.try_claim(1, 40).unwrap();
            claim.buf()[..20].fill(0xee);
            std::mem::forget(claim);
            println!("CLAIMED");
            std::io::stdout().flush().unwrap();
            std::thread::sleep(Duration::from_secs(120));
        }
        "reserve-and-hang" => {
            // Moves the tail like a claim and dies before writing the record header: the
            // narrowest window a SIGKILL can hit.
            produce(&path, id, 0, count);
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .unwrap();
            // SAFETY: the test owns the file; the tail word is 8-aligned at TAIL_OFFSET in the
            // layout the ring documents, and only ever accessed atomically.
            let mut map = unsafe { memmap2::MmapMut::map_mut(&file).unwrap() };
            // SAFETY: as above; the pointer is inside the mapping and 8-aligned.
            let tail = unsafe {
                &*map
                    .as_mut_ptr()
                    .add(TAIL_OFFSET)
                    .cast::<std::sync::atomic::AtomicU64>()
            };
            tail.fetch_add(48, std::sync::atomic::Ordering::AcqRel);
            println!("CLAIMED");
            std::io::stdout().flush().unwrap();
            std::thread::sleep(Duration::from_secs(120));
        }
        "produce-single" => {
            let mut p = SingleProducer::open(&path).expect("child takes the producer lock");
            let mut buf = Vec::with_capacity(64);
            for seq in 0..count {
                encode(id, seq, &mut buf);
                while let Err(e) = p.offer(1, &buf) {
                    assert_eq!(e, OfferError::WouldBlock);
                    std::thread::yield_now();
                }
            }
        }
        "single-claim-and-hang" => {
            let mut p = SingleProducer::open(&path).unwrap();
            let mut buf = Vec::new();
            for seq in 0..count {
                encode(id, seq, &mut buf);
                p.offer(1, &buf).unwrap();
            }
            let mut claim = p.try_claim(1, 40).unwrap();
            claim.buf()[..20].fill(0xee);
            std::mem::forget(claim);
            println!("CLAIMED");
            std::io::stdout().flush().unwrap();
            std::thread::sleep(Duration::from_secs(120));
        }
        "broadcast-read" => {
            // Joins, says so, then reads `count` records (reliable: all of them, in order;
            // lossy: delivered plus missed must add up to `count`).
            let mut r = BroadcastReader::open(&path).unwrap();
            println!("JOINED");
            std::io::stdout().flush().unwrap();
            let (mut delivered, mut missed, mut next) = (0u64, 0u64, 0u64);
            let start = Instant::now();
            while delivered + missed < count {
                let got = r.poll(4096, |_, b| {
                    let (_, seq) = decode(b);
                    assert!(seq >= next, "record {seq} after {next}: out of order");
                    next = seq + 1;
                    delivered += 1;
                });
                match got {
                    Ok(0) => {
                        assert!(
                            start.elapsed() < Duration::from_secs(300),
                            "reader stuck at {delivered}"
                        );
                        std::thread::yield_now();
                    }
                    Ok(_) => {}
                    Err(ReadError::Lapped { missed: m }) => {
                        assert_eq!(id, 2, "a reliable reader was lapped");
                        missed += m;
                    }
                    Err(e) => panic!("reader: {e}"),
                }
            }
            assert_eq!(delivered + missed, count);
            if id == 1 {
                assert_eq!(missed, 0);
            }
            println!("DELIVERED {delivered} MISSED {missed}");
        }
        other => panic!("unknown role {other}"),
    }
    true
}

fn wait_for_line(child: &mut Child, word: &str) -> BufReader<std::process::ChildStdout> {
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    while !line.trim_end().ends_with(word) {
        line.clear();
        assert!(
            out.read_line(&mut line).unwrap() > 0,
            "child exited before {word}"
        );
    }
    out
}

fn broadcast_to_two_reader_processes(test: &str, mode: Mode, total: u64) {
    let name = if mode == Mode::Lossy {
        "bcast-lossy"
    } else {
        "bcast-reliable"
    };
    let (_dir, path) = ring_path(name);
    broadcast::create(&path, 1 << 20, 8, mode).unwrap();
    let mut p = BroadcastProducer::open(&path, Duration::from_secs(30)).unwrap();
    let role_id = if mode == Mode::Lossy { 2 } else { 1 };
    let mut readers: Vec<Child> = (0..2)
        .map(|_| spawn(test, "broadcast-read", &path, role_id, total, true))
        .collect();
    let mut outs: Vec<_> = readers.iter_mut().map(|r| wait_for_line(r, "JOINED")).collect();
    let mut buf = Vec::with_capacity(64);
    for seq in 0..total {
        encode(0, seq, &mut buf);
        loop {
            match p.offer(1, &buf) {
                Ok(()) => break,
                Err(OfferError::WouldBlock) => std::thread::yield_now(),
                Err(e) => panic!("offer: {e}"),
            }
        }
    }
    for (r, out) in readers.iter_mut().zip(outs.iter_mut()) {
        let mut summary = String::new();
        while !summary.contains("DELIVERED") {
            summary.clear();
            assert!(
                out.read_line(&mut summary).unwrap() > 0,
                "reader exited without a summary"
            );
        }
        println!("{name}: {}", summary.trim());
        assert!(r.wait().unwrap().success(), "a reader process failed");
    }
    assert_eq!(p.evicted(), 0);
}

#[test]
fn ten_million_broadcast_records_reach_two_reader_processes() {
    if run_child() {
        return;
    }
    broadcast_to_two_reader_processes(
        "ten_million_broadcast_records_reach_two_reader_processes",
        Mode::Reliable,
        10_000_000,
    );
}

#[test]
fn lossy_broadcast_readers_account_for_every_record() {
    if run_child() {
        return;
    }
    broadcast_to_two_reader_processes(
        "lossy_broadcast_readers_account_for_every_record",
        Mode::Lossy,
        2_000_000,
    );
}

/// Reads until `total` records arrived or `deadline` passed; checks per-producer order.
fn consume(c: &mut RecordConsumer, producers: usize, total: u64, deadline: Duration) -> Vec<u64> {
    let mut next = vec![0u64; producers + 1];
    let mut seen = 0u64;
    let start = Instant::now();
    while seen < total {
        let n = c.read(4096, |_, b| {
            let (p, seq) = decode(b);
            let p = p as usize;
            assert_eq!(seq, next[p], "producer {p}: record {seq} out of order");
            next[p] += 1;
        });
        seen += n as u64;
        if n == 0 {
            assert!(
                start.elapsed() < deadline,
                "only {seen} of {total} records after {deadline:?}"
            );
            std::thread::yield_now();
        }
    }
    next
}

#[test]
fn ten_million_records_from_three_producer_processes() {
    if run_child() {
        return;
    }
    let (_dir, path) = ring_path("ten-million");
    records::create(&path, 1 << 20).unwrap();
    let mut c = RecordConsumer::open(&path, Duration::from_secs(5)).unwrap();
    let per_producer = 10_000_000u64 / 3 + 1;
    let mut children: Vec<Child> = (1..=3)
        .map(|id| {
            spawn(
                "ten_million_records_from_three_producer_processes",
                "produce",
                &path,
                id,
                per_producer,
                false,
            )
        })
        .collect();
    let next = consume(&mut c, 3, per_producer * 3, Duration::from_secs(300));
    for ch in &mut children {
        assert!(ch.wait().unwrap().success());
    }
    assert_eq!(&next[1..], &[per_producer; 3]);
    assert_eq!(c.stats().abandoned, 0);
    assert_eq!(
        c.read(usize::MAX, |_, _| {}),
        0,
        "nothing beyond what was produced"
    );
}

fn killed_mid_claim(test: &str, role: &str) {
    let (_dir, path) = ring_path(role);
    records::create(&path, 1 << 16).unwrap();
    let mut c = RecordConsumer::open(&path, Duration::from_millis(200)).unwrap();
    let mut victim = spawn(test, role, &path, 1, 100, true);
    // The test harness in the child prints its own lines first.
    let mut out = BufReader::new(victim.stdout.take().unwrap());
    let mut line = String::new();
    while !line.trim_end().ends_with("CLAIMED") {
        line.clear();
        assert!(
            out.read_line(&mut line).unwrap() > 0,
            "child exited before its claim"
        );
    }
    victim.kill().unwrap(); // SIGKILL
    victim.wait().unwrap();
    drop(out);
    let mut survivor = spawn(test, "produce", &path, 2, 1000, false);
    assert!(survivor.wait().unwrap().success());
    let next = consume(&mut c, 2, 1100, Duration::from_secs(30));
    assert_eq!(next[1..], [100, 1000]);
    assert_eq!(
        c.stats().abandoned,
        1,
        "the dead claim is skipped once and counted"
    );
    assert_eq!(c.read(usize::MAX, |_, _| {}), 0);
}

#[test]
fn a_producer_killed_between_claim_and_commit_does_not_wedge_the_consumer() {
    if run_child() {
        return;
    }
    killed_mid_claim(
        "a_producer_killed_between_claim_and_commit_does_not_wedge_the_consumer",
        "claim-and-hang",
    );
}

#[test]
fn a_producer_killed_before_writing_its_header_does_not_wedge_the_consumer() {
    if run_child() {
        return;
    }
    killed_mid_claim(
        "a_producer_killed_before_writing_its_header_does_not_wedge_the_consumer",
        "reserve-and-hang",
    );
}

#[test]
fn ten_million_records_from_a_single_producer_process() {
    if run_child() {
        return;
    }
    let test = "ten_million_records_from_a_single_producer_process";
    let (_dir, path) = ring_path("single-ten-million");
    records::create_with(&path, 1 << 20, Producers::Single).unwrap();
    let mut c = RecordConsumer::open(&path, Duration::from_secs(5)).unwrap();
    let mut child = spawn(test, "produce-single", &path, 1, 10_000_000, false);
    let next = consume(&mut c, 1, 10_000_000, Duration::from_secs(300));
    assert!(child.wait().unwrap().success());
    assert_eq!(next[1], 10_000_000);
}

#[test]
fn a_single_producer_killed_mid_claim_leaves_nothing_behind_and_can_be_replaced() {
    if run_child() {
        return;
    }
    let test = "a_single_producer_killed_mid_claim_leaves_nothing_behind_and_can_be_replaced";
    let (_dir, path) = ring_path("single-killed");
    records::create_with(&path, 1 << 16, Producers::Single).unwrap();
    let mut c = RecordConsumer::open(&path, Duration::from_millis(200)).unwrap();
    let mut victim = spawn(test, "single-claim-and-hang", &path, 1, 100, true);
    let out = wait_for_line(&mut victim, "CLAIMED");
    // While it lives, nobody else may produce.
    assert!(matches!(
        SingleProducer::open(&path),
        Err(intergroup_ring::Error::InUse { .. })
    ));
    victim.kill().unwrap();
    victim.wait().unwrap();
    drop(out);
    // Its lock names a dead process, so a new producer takes over where the tail stands.
    let mut successor = spawn(test, "produce-single", &path, 2, 1000, false);
    assert!(successor.wait().unwrap().success());
    let next = consume(&mut c, 2, 1100, Duration::from_secs(30));
    assert_eq!(next[1..], [100, 1000]);
    assert_eq!(c.stats().abandoned, 0, "an unpublished claim is not even seen");
    assert_eq!(c.read(usize::MAX, |_, _| {}), 0);
}
