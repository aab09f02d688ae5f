//! Inputs and ceiling baselines shared by the criterion benchmarks.
//!
//! Figures are reported as ratios against a baseline measured in the same run, since the
//! machines are shared and noisy.
#![deny(missing_docs)]

use intergroup_engine::proto::{Member, MemberConfig};
use intergroup_engine::Destination;

/// `count` datagrams as a sender with `cfg` writes them for messages of `size` bytes.
pub fn sender_datagrams(cfg: &MemberConfig, size: usize, count: usize) -> Vec<Vec<u8>> {
    let mut sender = Member::new(cfg.clone(), 1).expect("valid config");
    let mut out = Vec::with_capacity(count);
    let mut buf = vec![0u8; cfg.mtu];
    let message = vec![0xa5u8; size];
    while out.len() < count {
        while sender.queued_bytes() < 64 * cfg.mtu && sender.publish(1, &message).is_ok() {}
        let mut progressed = false;
        while let Some(t) = sender.poll_transmit(0, &mut buf) {
            if t.destination == Destination::Group && t.new_data_frames > 0 {
                out.push(buf[..t.len].to_vec());
                progressed = true;
            }
        }
        if !progressed {
            // Flow control waits for receivers; a fresh sender keeps the benchmark input coming.
            sender = Member::new(cfg.clone(), 1).expect("valid config");
        }
    }
    out.truncate(count);
    out
}

/// The ceiling of any receive path: copying each datagram's bytes once.
pub fn copy_ceiling(datagrams: &[Vec<u8>], scratch: &mut [u8]) -> usize {
    let mut total = 0;
    for d in datagrams {
        scratch[..d.len()].copy_from_slice(d);
        total += d.len();
    }
    total
}

/// The minimal ring every ring figure is compared with (it lives in the ring crate so that
/// `intergroup bench ipc` measures the same yardstick in its own run).
pub use intergroup_ring::baseline;
