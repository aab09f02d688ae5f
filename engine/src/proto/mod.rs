//! The sans-IO protocol core: reliable multicast for one member of one group.
//!
//! No sockets, clocks, threads or hidden randomness: see [`Member`] for the call order.

mod backoff;
mod counters;
mod delivery;
mod flow;
mod held;
mod loss;
mod member;
mod reassembly;
mod retransmit;

pub use backoff::NakBackoff;
pub use counters::{Counter, Counters};
pub use delivery::{Delivery, DeliveryQueue, Output};
pub use flow::FlowControl;
pub use held::{Lend, Lent};
pub use loss::{Arrival, LossDetector, Step};
pub use member::{Destination, Event, Member, RejectReason, Transmit, LENT_HEADROOM};
pub use retransmit::RetransmitBuffer;

use crate::wire;
use crate::Error;

/// Times are `u64` nanoseconds since an origin the driver picks (a monotonic clock's, or 0 in the
/// simulator). 2^64 ns is 584 years, so they never wrap and plain comparison is correct.
pub type Nanos = u64;

/// Settings of one member of one group. Every field has a LAN-suited default.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MemberConfig {
    /// Group id carried in every datagram.
    pub group: u32,
    /// This member's id, unique within the group.
    pub member_id: u32,
    /// Membership/key epoch stamped on data; frames of another epoch are rejected.
    pub epoch: u32,
    /// Largest datagram this member sends, in bytes (UDP payload).
    pub mtu: usize,
    /// Frames a sender may run ahead of the highest sequence a receiver has (STATUS
    /// advertises it); a receiver holds up to twice this many beyond its contiguous position.
    pub window_frames: u32,
    /// Frames a sender keeps for retransmission; a power of two, at least `window_frames`.
    pub retransmit_frames: u32,
    /// Bytes of published messages that may wait for flow control before `publish` pushes back.
    pub send_queue_bytes: usize,
    /// Largest message, in bytes, that is sent or reassembled.
    pub max_message_bytes: usize,
    /// Upper bound of the random delay before a receiver NAKs a gap.
    pub nak_max_backoff_ns: Nanos,
    /// Wait after a NAK was sent or heard before the same gap is NAKed again (plus a new back-off).
    pub nak_retry_ns: Nanos,
    /// Hold back a NAK when another member's NAK for the same sequences was heard.
    pub nak_suppression: bool,
    /// Estimated group size, which shapes the NAK back-off distribution (RFC 5401).
    pub group_size_hint: u32,
    /// A sequence is retransmitted at most once per this interval, however many NAKs ask.
    pub retransmit_linger_ns: Nanos,
    /// A sender that sent nothing for this long sends a HEARTBEAT.
    pub heartbeat_interval_ns: Nanos,
    /// A receiver reports its position at least this often while its sender is alive.
    pub status_interval_ns: Nanos,
    /// A receiver not heard from for this long no longer holds the sender back.
    pub receiver_timeout_ns: Nanos,
    /// A sender sends past its first window only while at least this many receivers are live
    /// (have reported, and not timed out); with fewer, it holds where it is (Aeron's minimum
    /// group size). 0, the default, counts whoever reported. Set it to the number of receivers
    /// that must miss nothing: one that starts late then still gets the stream from its start.
    pub min_receivers: u32,
    /// A sender not heard from for this long (a live one sends a HEARTBEAT every
    /// `heartbeat_interval_ns`) is gone: a receiver stops NAKing it, hands on what it holds of
    /// it and declares the rest lost. `Nanos::MAX` never gives a sender up.
    pub sender_timeout_ns: Nanos,
    /// Most remote senders tracked at once; data from further ones is rejected and counted.
    pub max_senders: usize,
    /// Most NAK ranges sent in one NAK frame.
    pub max_nak_ranges: usize,
}

impl Default for MemberConfig {
    fn default() -> Self {
        Self {
            group: 1,
            member_id: 1,
            epoch: 0,
            mtu: 1472,
            // A window must cover what arrives while a gap is repaired; 4096 frames is 6 MB,
            // about 3 ms of a 2 GB/s loopback stream, enough for a NAK's back-off and repair.
            window_frames: 4096,
            retransmit_frames: 16_384,
            send_queue_bytes: 4 << 20,
            max_message_bytes: 64 << 20,
            // Several LAN round trips, so one receiver's NAK can suppress the others', and
            // short: every frame behind a gap waits for its repair (held, copied, colder in
            // cache) and keeps the receiver's position back. 250 µs gave 12% less throughput
            // under 5% loss on loopback than 100 µs; 50 µs no more than 100.
            nak_max_backoff_ns: 100_000,
            // Longer than the linger below, so a NAK after a lost repair is answered.
            nak_retry_ns: 400_000,
            nak_suppression: true,
            group_size_hint: 16,
            // Covers the NAK back-off window, so the NAKs of one loss from several receivers
            // cause one repair; short, so a lost repair is sent again soon.
            retransmit_linger_ns: 200_000,
            heartbeat_interval_ns: 5_000_000,
            status_interval_ns: 20_000_000,
            receiver_timeout_ns: 2_000_000_000,
            min_receivers: 0,
            // Four hundred heartbeats: only a sender that crashed or left stays this silent.
            sender_timeout_ns: 2_000_000_000,
            max_senders: 1024,
            max_nak_ranges: 64,
        }
    }
}

impl MemberConfig {
    /// Checks every field against the ranges the protocol needs.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |msg: String| Err(Error::Config(msg));
        if !(wire::MIN_MTU..=wire::MAX_MTU).contains(&self.mtu) {
            return bad(format!(
                "mtu {} outside {}..={}",
                self.mtu,
                wire::MIN_MTU,
                wire::MAX_MTU
            ));
        }
        if self.window_frames == 0 {
            return bad("window_frames must be at least 1".into());
        }
        if !self.retransmit_frames.is_power_of_two() || self.retransmit_frames < self.window_frames {
            return bad(format!(
                "retransmit_frames {} must be a power of two and at least window_frames {}",
                self.retransmit_frames, self.window_frames
            ));
        }
        if self.max_message_bytes == 0 || self.max_message_bytes > u32::MAX as usize {
            return bad("max_message_bytes must be in 1..=4294967295".into());
        }
        if self.send_queue_bytes == 0 {
            return bad("send_queue_bytes must be at least 1".into());
        }
        if self.max_nak_ranges == 0 {
            return bad("max_nak_ranges must be at least 1".into());
        }
        if self.group_size_hint == 0 {
            return bad("group_size_hint must be at least 1".into());
        }
        for (name, v) in [
            ("heartbeat_interval_ns", self.heartbeat_interval_ns),
            ("status_interval_ns", self.status_interval_ns),
            ("receiver_timeout_ns", self.receiver_timeout_ns),
            ("sender_timeout_ns", self.sender_timeout_ns),
            ("nak_retry_ns", self.nak_retry_ns),
        ] {
            if v == 0 {
                return bad(format!("{name} must be above zero"));
            }
        }
        Ok(())
    }

    /// Frames a receiver holds beyond its contiguous position: two windows, so that while a
    /// gap waits for its repair the sender can still run a whole window past the highest
    /// sequence received (see STATUS in `Member`), and loss does not stall it.
    pub fn hold_frames(&self) -> u32 {
        self.window_frames.saturating_mul(2).min(1 << 31)
    }

    /// Largest payload of one DATA frame in a datagram of this MTU.
    pub fn max_frame_payload(&self) -> usize {
        self.mtu - wire::DATAGRAM_HEADER_LEN - wire::DATA_FRAME_OVERHEAD
    }
}
