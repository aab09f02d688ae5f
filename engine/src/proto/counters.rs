//! Protocol counters: stable ids and labels that tools, tests and shared memory all read.

macro_rules! counters {
    ($($(#[doc = $doc:literal])* $name:ident = $id:literal, $label:literal;)*) => {
        /// A protocol counter. The discriminant is its stable id: never reuse or renumber one.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(u16)]
        pub enum Counter {
            $($(#[doc = $doc])* $name = $id,)*
        }

        impl Counter {
            /// Every counter, in id order.
            pub const ALL: &'static [Counter] = &[$(Counter::$name,)*];

            /// The snake_case label used in reports and JSON.
            pub fn label(self) -> &'static str {
                match self {
                    $(Counter::$name => $label,)*
                }
            }
        }
    };
}

counters! {
    /// Datagrams handed to the driver for sending.
    DatagramsSent = 0, "datagrams_sent";
    /// Datagrams received and accepted by the header check.
    DatagramsReceived = 1, "datagrams_received";
    /// DATA frames sent for the first time.
    DataFramesSent = 2, "data_frames_sent";
    /// DATA frames sent again in answer to a NAK.
    Retransmissions = 3, "retransmissions";
    /// NAK frames sent by this member as a receiver.
    NaksSent = 4, "naks_sent";
    /// NAK frames this member held back because another member's NAK covered them.
    NaksSuppressed = 5, "naks_suppressed";
    /// NAK frames received that concern this member's own data.
    NaksReceived = 6, "naks_received";
    /// NAK ranges received that concern this member's own data.
    NakRangesReceived = 7, "nak_ranges_received";
    /// Requested sequences not retransmitted because they were retransmitted just before.
    RetransmitsLingered = 8, "retransmits_lingered";
    /// Requested sequences already gone from the retransmit buffer.
    NaksForEvicted = 9, "naks_for_evicted";
    /// STATUS frames sent.
    StatusSent = 10, "status_sent";
    /// STATUS frames received about this member's own data.
    StatusReceived = 11, "status_received";
    /// HEARTBEAT frames sent.
    HeartbeatsSent = 12, "heartbeats_sent";
    /// Messages delivered to the application.
    MessagesDelivered = 13, "messages_delivered";
    /// Payload bytes delivered to the application.
    BytesDelivered = 14, "bytes_delivered";
    /// DATA frames received that were already held or delivered.
    DuplicateFrames = 15, "duplicate_frames";
    /// DATA frames received beyond the receive window, dropped.
    FramesBeyondWindow = 16, "frames_beyond_window";
    /// Frames held out of order waiting for a gap to fill.
    FramesHeldOutOfOrder = 17, "frames_held_out_of_order";
    /// Sequences declared unrecoverable (gone from the sender's buffer).
    FramesUnrecoverable = 18, "frames_unrecoverable";
    /// Fragments dropped because their message could not be completed.
    FragmentsDiscarded = 19, "fragments_discarded";
    /// Datagrams rejected by the decoder (bad magic, version, flags, truncation).
    RejectedMalformed = 20, "rejected_malformed";
    /// Frames rejected by the decoder (unknown type, inconsistent fields).
    RejectedFrames = 21, "rejected_frames";
    /// Datagrams of another group.
    RejectedWrongGroup = 22, "rejected_wrong_group";
    /// Frames of another epoch.
    RejectedWrongEpoch = 23, "rejected_wrong_epoch";
    /// Data from a new sender beyond `max_senders`.
    RejectedTooManySenders = 24, "rejected_too_many_senders";
    /// Messages longer than `max_message_bytes` announced by a sender.
    RejectedOversizedMessage = 25, "rejected_oversized_message";
    /// Datagrams from this member itself (multicast loop), ignored.
    OwnDatagramsIgnored = 26, "own_datagrams_ignored";
    /// Receivers dropped from flow control after `receiver_timeout_ns` of silence.
    ReceiversTimedOut = 27, "receivers_timed_out";
    /// `publish` calls refused because the send queue was full.
    PublishBackPressured = 28, "publish_back_pressured";
    /// Times the sender had data queued but flow control held it back.
    FlowControlStalls = 29, "flow_control_stalls";
    /// STATUS frames whose position lies beyond what this member sent, ignored.
    StatusIgnored = 30, "status_ignored";
    /// Frames held out of order as a copy, not in the receive buffer they came in (the driver
    /// lent no buffer, or could not spare one).
    FramesHeldCopied = 31, "frames_held_copied";
    /// Senders given up after `sender_timeout_ns` of silence with sequences still missing
    /// (those were declared lost).
    SendersTimedOut = 32, "senders_timed_out";
    /// HEARTBEAT frames sent asking receivers for a STATUS now (a sender that keeps frames
    /// until they are acknowledged and holds too many).
    StatusRequestsSent = 33, "status_requests_sent";
    /// STATUS frames queued because a sender asked for one.
    StatusRequestsAnswered = 34, "status_requests_answered";
}

/// The counters of one member, indexed by [`Counter`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Counters {
    values: [u64; Counter::ALL.len()],
}

// By hand: arrays longer than 32 have no `Default`.
impl Default for Counters {
    fn default() -> Self {
        Self {
            values: [0; Counter::ALL.len()],
        }
    }
}

impl Counters {
    /// The current value of `counter`.
    pub fn get(&self, counter: Counter) -> u64 {
        self.values[counter as usize]
    }

    /// Adds `n` to `counter`.
    pub fn add(&mut self, counter: Counter, n: u64) {
        let v = &mut self.values[counter as usize];
        *v = v.wrapping_add(n);
    }

    /// Adds one to `counter`.
    pub fn incr(&mut self, counter: Counter) {
        self.add(counter, 1);
    }

    /// Adds every counter of `other` into `self`.
    pub fn merge(&mut self, other: &Counters) {
        for (a, b) in self.values.iter_mut().zip(other.values.iter()) {
            *a = a.wrapping_add(*b);
        }
    }

    /// `(label, value)` for every counter, in id order.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        Counter::ALL.iter().map(|&c| (c.label(), self.get(c)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_dense_and_labels_unique() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i, "counter ids must be dense and in order");
        }
        let mut labels: Vec<_> = Counter::ALL.iter().map(|c| c.label()).collect();
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), Counter::ALL.len());
    }
}
