//! Reassembly of fragmented messages from frames handed on in sequence order.

/// One frame's fields as the reassembler needs them.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FrameInfo<'a> {
    pub sequence: u64,
    pub stream: u32,
    pub epoch: u32,
    pub timestamp: u64,
    pub message_len: u32,
    pub fragment_offset: u32,
    pub payload: &'a [u8],
}

/// What a frame did to the message being reassembled.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Assembled<'a> {
    /// The frame completes a message: its first sequence and bytes.
    Complete { first_sequence: u64, payload: &'a [u8] },
    /// The frame was taken; the message is not complete yet.
    Partial,
    /// The frame cannot belong to any message being built; dropped. `abandoned` says whether a
    /// partly built message was dropped with it.
    Discarded { abandoned: bool },
    /// The announced message is longer than the maximum; dropped.
    Oversized,
}

/// Builds one sender's messages; frames arrive in sequence order, so fragments are contiguous.
#[derive(Debug, Default)]
pub(crate) struct Reassembly {
    building: Option<Building>,
    buf: Vec<u8>,
}

#[derive(Debug, Clone, Copy)]
struct Building {
    first_sequence: u64,
    stream: u32,
    message_len: u32,
}

impl Reassembly {
    /// Drops a partly built message (after lost frames); returns whether there was one.
    #[inline]
    pub fn abandon(&mut self) -> bool {
        self.buf.clear();
        self.building.take().is_some()
    }

    /// The metadata of the message being built: `(first_sequence, stream)`.
    pub fn building(&self) -> Option<(u64, u32)> {
        self.building.map(|b| (b.first_sequence, b.stream))
    }

    /// Takes the next frame in sequence order.
    #[inline]
    pub fn accept<'s>(&'s mut self, f: &FrameInfo<'s>, max_message_bytes: usize) -> Assembled<'s> {
        let message_len = f.message_len as usize;
        if f.fragment_offset == 0 {
            // A partly built message before a new first fragment is the caller's to count.
            self.abandon();
            if message_len > max_message_bytes {
                return Assembled::Oversized;
            }
            if f.payload.len() == message_len {
                return Assembled::Complete {
                    first_sequence: f.sequence,
                    payload: f.payload,
                };
            }
            self.buf.reserve(message_len);
            self.buf.extend_from_slice(f.payload);
            self.building = Some(Building {
                first_sequence: f.sequence,
                stream: f.stream,
                message_len: f.message_len,
            });
            return Assembled::Partial;
        }
        let fits = match self.building {
            Some(b) => {
                b.stream == f.stream
                    && b.message_len == f.message_len
                    && self.buf.len() == f.fragment_offset as usize
            }
            None => false,
        };
        if !fits {
            let abandoned = self.abandon();
            return Assembled::Discarded { abandoned };
        }
        self.buf.extend_from_slice(f.payload);
        if self.buf.len() == message_len {
            let b = self.building.take().expect("checked above");
            return Assembled::Complete {
                first_sequence: b.first_sequence,
                payload: &self.buf,
            };
        }
        Assembled::Partial
    }

    /// Clears the buffer after a completed fragmented message was copied out.
    #[inline]
    pub fn finish(&mut self) {
        self.buf.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(seq: u64, len: u32, off: u32, payload: &[u8]) -> FrameInfo<'_> {
        FrameInfo {
            sequence: seq,
            stream: 1,
            epoch: 0,
            timestamp: 0,
            message_len: len,
            fragment_offset: off,
            payload,
        }
    }

    #[test]
    fn whole_and_fragmented_messages() {
        let mut r = Reassembly::default();
        assert_eq!(
            r.accept(&frame(0, 2, 0, b"ab"), 100),
            Assembled::Complete {
                first_sequence: 0,
                payload: b"ab"
            }
        );
        assert_eq!(r.accept(&frame(1, 5, 0, b"ab"), 100), Assembled::Partial);
        assert_eq!(r.accept(&frame(2, 5, 2, b"cd"), 100), Assembled::Partial);
        assert_eq!(
            r.accept(&frame(3, 5, 4, b"e"), 100),
            Assembled::Complete {
                first_sequence: 1,
                payload: b"abcde"
            }
        );
        r.finish();
        // A middle fragment with nothing being built is discarded.
        assert_eq!(
            r.accept(&frame(9, 5, 2, b"cd"), 100),
            Assembled::Discarded { abandoned: false }
        );
        assert_eq!(r.accept(&frame(10, 500, 0, b"cd"), 100), Assembled::Oversized);
    }
}
