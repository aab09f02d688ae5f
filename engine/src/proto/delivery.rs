//! Messages ready for the application, kept in one reused byte arena (no allocation per message).

use std::collections::VecDeque;

/// One delivered message, borrowed from the member until the drain callback returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery<'a> {
    /// Member id of the sender.
    pub sender: u32,
    /// Stream number within the group.
    pub stream: u32,
    /// Sequence of the message's first frame.
    pub sequence: u64,
    /// The sender's logical clock when it framed the message.
    pub timestamp: u64,
    /// Epoch the message was sent in.
    pub epoch: u32,
    /// The message.
    pub payload: &'a [u8],
}

#[derive(Debug, Clone, Copy)]
struct Meta {
    sender: u32,
    stream: u32,
    sequence: u64,
    timestamp: u64,
    epoch: u32,
    start: usize,
    len: usize,
}

/// FIFO of deliveries whose payloads live in one contiguous buffer, cleared once drained.
#[derive(Debug, Default)]
pub struct DeliveryQueue {
    meta: VecDeque<Meta>,
    bytes: Vec<u8>,
}

impl DeliveryQueue {
    /// Queues a copy of `d`.
    pub fn push(&mut self, d: Delivery<'_>) {
        let start = self.bytes.len();
        self.bytes.extend_from_slice(d.payload);
        self.meta.push_back(Meta {
            sender: d.sender,
            stream: d.stream,
            sequence: d.sequence,
            timestamp: d.timestamp,
            epoch: d.epoch,
            start,
            len: d.payload.len(),
        });
    }

    /// Number of queued deliveries.
    pub fn len(&self) -> usize {
        self.meta.len()
    }

    /// True when nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.meta.is_empty()
    }

    /// Hands every queued delivery to `f` in order, then empties the queue (keeping its memory).
    pub fn drain(&mut self, mut f: impl FnMut(Delivery<'_>)) {
        for m in self.meta.drain(..) {
            f(Delivery {
                sender: m.sender,
                stream: m.stream,
                sequence: m.sequence,
                timestamp: m.timestamp,
                epoch: m.epoch,
                payload: &self.bytes[m.start..m.start + m.len],
            });
        }
        self.bytes.clear();
    }
}
