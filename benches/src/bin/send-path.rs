//! The sender side of the protocol core alone: `Member::publish` + `poll_transmit` of
//! SIZE-byte messages (default 1024), in-place transmits on, a STATUS every 256 messages so
//! flow control keeps opening, no I/O. Prints nanoseconds per message.
//!
//! Usage: send-path [SIZE] [MESSAGES]

use intergroup_engine::proto::{Member, MemberConfig};
use intergroup_engine::wire::{DatagramWriter, StatusBody};
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let size: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(1024);
    let n: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(2_000_000);
    let mut m = Member::new(
        MemberConfig {
            member_id: 1,
            ..MemberConfig::default()
        },
        1,
    )
    .expect("valid config");
    m.set_in_place_transmit(true);
    let msg = vec![7u8; size];
    let mut buf = vec![0u8; 1472];
    let mut status = vec![0u8; 64];
    let from = "127.0.0.1:5".parse().expect("address");
    let mut datagrams = 0u64;
    let start = Instant::now();
    for i in 0..n {
        m.publish(1, &msg).expect("room in the send queue");
        while let Some(t) = m.poll_transmit(i, &mut buf) {
            datagrams += 1;
            if let Some(seq) = t.in_place {
                std::hint::black_box(m.transmitted(seq));
            }
        }
        if i % 256 == 0 {
            let mut w = DatagramWriter::new(&mut status, 1, 2).expect("room");
            w.push_status(&StatusBody {
                sender: 1.into(),
                window: 4096.into(),
                position: (i + 1).into(),
            });
            let len = w.len();
            m.handle_datagram(i, from, &status[..len]);
        }
    }
    let elapsed = start.elapsed();
    println!(
        "{n} messages of {size} B in {datagrams} datagrams: {:.1} ns per message",
        elapsed.as_nanos() as f64 / n as f64
    );
}
