//! Every wire header of the protocol, read in place from received bytes.
//!
//! Layouts, field meanings and recovery rules: `docs/protocol.md`. All integers are little-endian
//! and every header is `Unaligned`, so a header can be read at any offset of a receive buffer.

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// First two bytes of every datagram: ASCII "IG".
pub const MAGIC: [u8; 2] = *b"IG";
/// The layout version this code reads and writes.
pub const VERSION: u8 = 1;

/// Frame type: application data (one message or one fragment of one).
pub const FRAME_DATA: u8 = 0x01;
/// Frame type: negative acknowledgement, ranges of one sender's sequences.
pub const FRAME_NAK: u8 = 0x02;
/// Frame type: a receiver's position and window for one sender (flow control).
pub const FRAME_STATUS: u8 = 0x03;
/// Frame type: a sender's tail, oldest retained sequence and clock.
pub const FRAME_HEARTBEAT: u8 = 0x04;
/// Frame types `0x10..=0x1f` are reserved for membership frames.
pub const FRAME_MEMBERSHIP_FIRST: u8 = 0x10;
/// Last reserved membership frame type.
pub const FRAME_MEMBERSHIP_LAST: u8 = 0x1f;
/// Frame types `0x20..=0x2f` are reserved for key-agreement frames.
pub const FRAME_KEY_FIRST: u8 = 0x20;
/// Last reserved key-agreement frame type.
pub const FRAME_KEY_LAST: u8 = 0x2f;

/// DATA flag: this frame is a retransmission, not the first transmission.
pub const DATA_FLAG_RETRANSMIT: u8 = 0x01;
/// HEARTBEAT flag: the sender keeps frames until receivers acknowledge them and asks every
/// receiver for a STATUS now (NORM's acknowledgement request, in a heartbeat).
pub const HEARTBEAT_FLAG_REPORT: u8 = 0x01;

/// Size of [`DatagramHeader`] in bytes.
pub const DATAGRAM_HEADER_LEN: usize = size_of::<DatagramHeader>();
/// Size of [`FrameHeader`] in bytes.
pub const FRAME_HEADER_LEN: usize = size_of::<FrameHeader>();
/// Size of a whole DATA frame header (frame header plus [`DataHeader`]) before the payload.
pub const DATA_FRAME_OVERHEAD: usize = FRAME_HEADER_LEN + size_of::<DataHeader>();
/// Size of the fixed part of a NAK frame (frame header plus [`NakHeader`]).
pub const NAK_FRAME_OVERHEAD: usize = FRAME_HEADER_LEN + size_of::<NakHeader>();
/// Size of one [`NakRange`].
pub const NAK_RANGE_LEN: usize = size_of::<NakRange>();
/// Size of a whole STATUS frame.
pub const STATUS_FRAME_LEN: usize = FRAME_HEADER_LEN + size_of::<StatusBody>();
/// Size of a whole HEARTBEAT frame.
pub const HEARTBEAT_FRAME_LEN: usize = FRAME_HEADER_LEN + size_of::<HeartbeatBody>();
/// Smallest MTU the protocol accepts: a datagram header and one DATA frame with one payload byte.
pub const MIN_MTU: usize = DATAGRAM_HEADER_LEN + DATA_FRAME_OVERHEAD + 1;
/// Largest MTU: frame lengths are 16-bit and a UDP payload is at most 65,507 bytes.
pub const MAX_MTU: usize = 65_507;

/// The header at offset 0 of every datagram. Every frame in the datagram belongs to `group`.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct DatagramHeader {
    /// Offset 0: [`MAGIC`].
    pub magic: [u8; 2],
    /// Offset 2: layout version, [`VERSION`].
    pub version: u8,
    /// Offset 3: datagram flags. Bit 0 ([`crate::shield::FLAG_SEALED`]) marks a sealed datagram
    /// of a secured group, opened (and the bit cleared) before decoding; decoding refuses any set bit.
    pub flags: u8,
    /// Offset 4: group id.
    pub group: U32,
    /// Offset 8: member id of the member that transmitted this datagram.
    pub source: U32,
}

/// The header of every frame; frames follow each other with no padding.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct FrameHeader {
    /// Offset 0: frame type (`FRAME_*`).
    pub frame_type: u8,
    /// Offset 1: type-specific flags.
    pub flags: u8,
    /// Offset 2: length of the whole frame in bytes, this header included.
    pub length: U16,
}

/// DATA frame body, followed by `length - DATA_FRAME_OVERHEAD` payload bytes.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct DataHeader {
    /// Offset 4: stream number within the group.
    pub stream: U32,
    /// Offset 8: member id of the original sender (a retransmission keeps it).
    pub sender: U32,
    /// Offset 12: membership/key epoch the message was sent in.
    pub epoch: U32,
    /// Offset 16: the sender's frame sequence number; every frame takes the next one.
    pub sequence: U64,
    /// Offset 24: the sender's logical (Lamport) clock when it framed the message.
    pub timestamp: U64,
    /// Offset 32: total length of the message in bytes.
    pub message_len: U32,
    /// Offset 36: byte offset of this fragment's payload within the message.
    pub fragment_offset: U32,
}

/// NAK frame body, followed by `range_count` [`NakRange`]s.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct NakHeader {
    /// Offset 4: member id of the sender whose sequences are missing.
    pub sender: U32,
    /// Offset 8: number of ranges that follow.
    pub range_count: U16,
    /// Offset 10: reserved, zero.
    pub reserved: U16,
}

/// One missing run of sequences in a NAK.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct NakRange {
    /// First missing sequence.
    pub first: U64,
    /// Number of missing sequences from `first`; at least 1.
    pub count: U32,
}

/// STATUS frame body: a receiver's flow-control report about one sender.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct StatusBody {
    /// Offset 4: member id of the sender this report is about.
    pub sender: U32,
    /// Offset 8: window in frames the receiver accepts beyond `position`.
    pub window: U32,
    /// Offset 12: the receiver's contiguous position: every sequence below it is held.
    pub position: U64,
}

/// HEARTBEAT frame body: a sender's tail, so receivers find tail loss.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct HeartbeatBody {
    /// Offset 4: member id of the sender.
    pub sender: U32,
    /// Offset 8: the sender's epoch.
    pub epoch: U32,
    /// Offset 12: the next sequence the sender will use (one past its highest sent).
    pub next_sequence: U64,
    /// Offset 20: the oldest sequence still in the sender's retransmit buffer.
    pub oldest_sequence: U64,
    /// Offset 28: the sender's logical clock.
    pub timestamp: U64,
}

/// Why a datagram or frame was rejected by the decoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Fewer bytes than a header needs.
    #[error("truncated: need {need} bytes, have {have}")]
    Truncated {
        /// Bytes the header needs.
        need: usize,
        /// Bytes that were there.
        have: usize,
    },
    /// Datagram longer than [`MAX_MTU`].
    #[error("oversized datagram: {0} bytes")]
    Oversized(usize),
    /// The first two bytes are not [`MAGIC`].
    #[error("bad magic")]
    BadMagic,
    /// A layout version this code does not read.
    #[error("unsupported version {0}")]
    UnsupportedVersion(u8),
    /// Datagram flags that version 1 does not define.
    #[error("unknown datagram flags {0:#x}")]
    UnknownFlags(u8),
    /// A frame type that is neither defined nor reserved.
    #[error("unknown frame type {0:#x}")]
    UnknownFrameType(u8),
    /// A reserved frame type that this version does not handle yet.
    #[error("reserved frame type {0:#x}")]
    ReservedFrameType(u8),
    /// A frame whose fields contradict each other or the frame length.
    #[error("inconsistent frame: {0}")]
    Inconsistent(&'static str),
}

/// A decoded frame, borrowing the datagram's bytes.
#[derive(Debug, Clone, Copy)]
pub enum Frame<'a> {
    /// Application data.
    Data(DataFrame<'a>),
    /// Negative acknowledgement.
    Nak(NakFrame<'a>),
    /// Flow-control status.
    Status(&'a StatusBody),
    /// Sender heartbeat.
    Heartbeat(HeartbeatFrame<'a>),
    /// A membership frame (types `FRAME_MEMBERSHIP_FIRST..=FRAME_MEMBERSHIP_LAST`); the group
    /// layer decodes its body, the reliable-multicast core skips it.
    Membership {
        /// The frame type.
        kind: u8,
        /// The body after the frame header.
        body: &'a [u8],
    },
}

/// A HEARTBEAT frame: flags and body, in place.
#[derive(Debug, Clone, Copy)]
pub struct HeartbeatFrame<'a> {
    /// Frame flags (`HEARTBEAT_FLAG_*`).
    pub flags: u8,
    /// The body.
    pub body: &'a HeartbeatBody,
}

/// A DATA frame: header and payload, in place.
#[derive(Debug, Clone, Copy)]
pub struct DataFrame<'a> {
    /// Frame flags (`DATA_FLAG_*`).
    pub flags: u8,
    /// The header.
    pub header: &'a DataHeader,
    /// The payload bytes of this fragment.
    pub payload: &'a [u8],
}

/// A NAK frame: header and ranges, in place.
#[derive(Debug, Clone, Copy)]
pub struct NakFrame<'a> {
    /// The header.
    pub header: &'a NakHeader,
    /// The ranges, each with `count >= 1` and no overflow.
    pub ranges: &'a [NakRange],
}

/// Where the datagrams of a run laid end to end at `run` (a GRO buffer) lie: `segment` bytes
/// each, the last maybe shorter. An empty run is one empty datagram, so a receiver rejects it
/// as it would alone.
pub fn segment_ranges(
    run: std::ops::Range<usize>,
    segment: usize,
) -> impl ExactSizeIterator<Item = std::ops::Range<usize>> {
    let segment = segment.max(1);
    let (start, end) = (run.start, run.end.max(run.start));
    (0..(end - start).div_ceil(segment).max(1))
        .map(move |i| (start + i * segment).min(end)..(start + (i + 1) * segment).min(end))
}

/// The datagrams of a run laid end to end in `bytes`: see [`segment_ranges`].
pub fn segments(bytes: &[u8], segment: usize) -> impl Iterator<Item = &[u8]> {
    segment_ranges(0..bytes.len(), segment).map(move |r| &bytes[r])
}

/// Checks a datagram's header and returns it with the frames that follow.
pub fn decode_datagram(bytes: &[u8]) -> Result<(&DatagramHeader, Frames<'_>), WireError> {
    if bytes.len() > MAX_MTU {
        return Err(WireError::Oversized(bytes.len()));
    }
    let (header, rest) = DatagramHeader::ref_from_prefix(bytes).map_err(|_| WireError::Truncated {
        need: DATAGRAM_HEADER_LEN,
        have: bytes.len(),
    })?;
    if header.magic != MAGIC {
        return Err(WireError::BadMagic);
    }
    if header.version != VERSION {
        return Err(WireError::UnsupportedVersion(header.version));
    }
    if header.flags != 0 {
        return Err(WireError::UnknownFlags(header.flags));
    }
    Ok((header, Frames { rest }))
}

/// The datagram header of `source` in `group`, as bytes.
pub fn datagram_header(group: u32, source: u32) -> [u8; DATAGRAM_HEADER_LEN] {
    DatagramHeader {
        magic: MAGIC,
        version: VERSION,
        flags: 0,
        group: group.into(),
        source: source.into(),
    }
    .as_bytes()
    .try_into()
    .expect("the header is DATAGRAM_HEADER_LEN bytes")
}

/// The source member of a datagram, read from a sound header at the start of `bytes` (which
/// may be longer than one datagram, such as a GRO buffer). `None` when the header is not one.
pub fn datagram_source(bytes: &[u8]) -> Option<u32> {
    let (header, _) = DatagramHeader::ref_from_prefix(bytes).ok()?;
    (header.magic == MAGIC && header.version == VERSION).then(|| header.source.get())
}

/// Iterator over the frames of a datagram.
///
/// A frame with a bad body but a sound length yields its error and iteration goes on with the
/// next frame; a frame whose length cannot be trusted yields its error and ends the iteration.
#[derive(Debug, Clone)]
pub struct Frames<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for Frames<'a> {
    type Item = Result<Frame<'a>, WireError>;

    // Always inlined: called for every frame on the receive path, it returns its frame through
    // memory, and values returned that way and read back at once stalled elsewhere on this path
    // (store forwarding); inlined, a subscriber gained about 1% (docs/performance.md).
    #[inline(always)]
    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let Ok((header, _)) = FrameHeader::ref_from_prefix(self.rest) else {
            let have = self.rest.len();
            self.rest = &[];
            return Some(Err(WireError::Truncated {
                need: FRAME_HEADER_LEN,
                have,
            }));
        };
        let length = usize::from(header.length.get());
        if length < FRAME_HEADER_LEN || length > self.rest.len() {
            let have = self.rest.len();
            self.rest = &[];
            return Some(if length < FRAME_HEADER_LEN {
                Err(WireError::Inconsistent("frame length below header size"))
            } else {
                Err(WireError::Truncated { need: length, have })
            });
        }
        let (frame, rest) = self.rest.split_at(length);
        self.rest = rest;
        Some(decode_frame(header, &frame[FRAME_HEADER_LEN..]))
    }
}

fn decode_frame<'a>(header: &FrameHeader, body: &'a [u8]) -> Result<Frame<'a>, WireError> {
    match header.frame_type {
        FRAME_DATA => {
            let (data, payload) = exact_prefix::<DataHeader>(body)?;
            let message_len = u64::from(data.message_len.get());
            let offset = u64::from(data.fragment_offset.get());
            if offset + payload.len() as u64 > message_len {
                return Err(WireError::Inconsistent("fragment beyond message length"));
            }
            if payload.is_empty() && message_len != 0 {
                return Err(WireError::Inconsistent("empty fragment of a non-empty message"));
            }
            Ok(Frame::Data(DataFrame {
                flags: header.flags,
                header: data,
                payload,
            }))
        }
        FRAME_NAK => {
            let (nak, rest) = exact_prefix::<NakHeader>(body)?;
            let count = usize::from(nak.range_count.get());
            let ranges = <[NakRange]>::ref_from_bytes(rest)
                .map_err(|_| WireError::Inconsistent("nak ranges do not fill the frame"))?;
            if ranges.len() != count || count == 0 {
                return Err(WireError::Inconsistent("nak range count"));
            }
            for range in ranges {
                let n = range.count.get();
                if n == 0 || range.first.get().checked_add(u64::from(n)).is_none() {
                    return Err(WireError::Inconsistent("nak range empty or overflowing"));
                }
            }
            Ok(Frame::Nak(NakFrame { header: nak, ranges }))
        }
        FRAME_STATUS => Ok(Frame::Status(whole::<StatusBody>(body)?)),
        FRAME_HEARTBEAT => {
            let hb = whole::<HeartbeatBody>(body)?;
            if hb.oldest_sequence.get() > hb.next_sequence.get() {
                return Err(WireError::Inconsistent("heartbeat oldest beyond next"));
            }
            Ok(Frame::Heartbeat(HeartbeatFrame {
                flags: header.flags,
                body: hb,
            }))
        }
        kind @ FRAME_MEMBERSHIP_FIRST..=FRAME_MEMBERSHIP_LAST => Ok(Frame::Membership { kind, body }),
        t @ FRAME_KEY_FIRST..=FRAME_KEY_LAST => Err(WireError::ReservedFrameType(t)),
        t => Err(WireError::UnknownFrameType(t)),
    }
}

fn exact_prefix<T: FromBytes + KnownLayout + Immutable>(body: &[u8]) -> Result<(&T, &[u8]), WireError> {
    T::ref_from_prefix(body).map_err(|_| WireError::Truncated {
        need: size_of::<T>(),
        have: body.len(),
    })
}

fn whole<T: FromBytes + KnownLayout + Immutable>(body: &[u8]) -> Result<&T, WireError> {
    if body.len() != size_of::<T>() {
        return Err(WireError::Inconsistent("frame length does not match its type"));
    }
    exact_prefix::<T>(body).map(|(t, _)| t)
}

/// Writes frames into a caller's buffer, never past the MTU it was given.
#[derive(Debug)]
pub struct DatagramWriter<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl<'a> DatagramWriter<'a> {
    /// Starts a datagram of `group` from `source` in `buf`, which bounds its size.
    ///
    /// Returns `None` if `buf` cannot hold even the datagram header.
    pub fn new(buf: &'a mut [u8], group: u32, source: u32) -> Option<Self> {
        let header = DatagramHeader {
            magic: MAGIC,
            version: VERSION,
            flags: 0,
            group: group.into(),
            source: source.into(),
        };
        header.write_to_prefix(buf).ok()?;
        Some(Self {
            buf,
            len: DATAGRAM_HEADER_LEN,
        })
    }

    /// Bytes written so far, the datagram header included.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when no frame has been written yet.
    pub fn is_empty(&self) -> bool {
        self.len == DATAGRAM_HEADER_LEN
    }

    /// Bytes still free.
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.len
    }

    /// Appends a DATA frame; `false` (and nothing written) if it does not fit.
    pub fn push_data(&mut self, flags: u8, header: &DataHeader, payload: &[u8]) -> bool {
        let total = DATA_FRAME_OVERHEAD + payload.len();
        if total > self.remaining() || total > usize::from(u16::MAX) {
            return false;
        }
        self.push_frame_header(FRAME_DATA, flags, total);
        self.push_bytes(header.as_bytes());
        self.push_bytes(payload);
        true
    }

    /// Appends a complete, already encoded frame (for example from a retransmit buffer).
    pub fn push_raw_frame(&mut self, frame: &[u8]) -> bool {
        if frame.len() > self.remaining() {
            return false;
        }
        self.push_bytes(frame);
        true
    }

    /// Appends an encoded DATA frame from a retransmit buffer, marked as a retransmission.
    pub fn push_retransmit(&mut self, frame: &[u8]) -> bool {
        let start = self.len;
        if !self.push_raw_frame(frame) {
            return false;
        }
        if frame.len() >= FRAME_HEADER_LEN {
            self.buf[start + 1] |= DATA_FLAG_RETRANSMIT;
        }
        true
    }

    /// Appends a membership frame of type `kind` with `body`; `false` if it does not fit.
    pub fn push_membership(&mut self, kind: u8, body: &[u8]) -> bool {
        debug_assert!((FRAME_MEMBERSHIP_FIRST..=FRAME_MEMBERSHIP_LAST).contains(&kind));
        if FRAME_HEADER_LEN + body.len() > usize::from(u16::MAX) {
            return false;
        }
        self.push_fixed(kind, 0, body)
    }

    /// Appends a NAK frame with as many of `ranges` as fit; returns how many were written.
    pub fn push_nak(&mut self, sender: u32, ranges: &[NakRange]) -> usize {
        let room = self.remaining().saturating_sub(NAK_FRAME_OVERHEAD) / NAK_RANGE_LEN;
        let max_in_frame = (usize::from(u16::MAX) - NAK_FRAME_OVERHEAD) / NAK_RANGE_LEN;
        let n = ranges.len().min(room).min(max_in_frame);
        if n == 0 {
            return 0;
        }
        let header = NakHeader {
            sender: sender.into(),
            range_count: U16::new(n as u16),
            reserved: U16::ZERO,
        };
        self.push_frame_header(FRAME_NAK, 0, NAK_FRAME_OVERHEAD + n * NAK_RANGE_LEN);
        self.push_bytes(header.as_bytes());
        self.push_bytes(ranges[..n].as_bytes());
        n
    }

    /// Appends a STATUS frame; `false` if it does not fit.
    pub fn push_status(&mut self, body: &StatusBody) -> bool {
        self.push_fixed(FRAME_STATUS, 0, body.as_bytes())
    }

    /// Appends a HEARTBEAT frame; `false` if it does not fit.
    pub fn push_heartbeat(&mut self, body: &HeartbeatBody) -> bool {
        self.push_heartbeat_with(0, body)
    }

    /// Appends a HEARTBEAT frame with `flags` (`HEARTBEAT_FLAG_*`); `false` if it does not fit.
    pub fn push_heartbeat_with(&mut self, flags: u8, body: &HeartbeatBody) -> bool {
        self.push_fixed(FRAME_HEARTBEAT, flags, body.as_bytes())
    }

    fn push_fixed(&mut self, frame_type: u8, flags: u8, body: &[u8]) -> bool {
        let total = FRAME_HEADER_LEN + body.len();
        if total > self.remaining() {
            return false;
        }
        self.push_frame_header(frame_type, flags, total);
        self.push_bytes(body);
        true
    }

    fn push_frame_header(&mut self, frame_type: u8, flags: u8, total: usize) {
        let header = FrameHeader {
            frame_type,
            flags,
            length: U16::new(total as u16),
        };
        self.push_bytes(header.as_bytes());
    }

    fn push_bytes(&mut self, bytes: &[u8]) {
        self.buf[self.len..self.len + bytes.len()].copy_from_slice(bytes);
        self.len += bytes.len();
    }
}

/// Encodes one DATA frame (header and payload) into `out`, returning its length.
///
/// Used to fill retransmit-buffer slots; `out` must hold `DATA_FRAME_OVERHEAD + payload.len()`.
pub fn encode_data_frame(out: &mut [u8], header: &DataHeader, payload: &[u8]) -> usize {
    let total = encode_data_frame_header(out, header, payload.len());
    out[DATA_FRAME_OVERHEAD..total].copy_from_slice(payload);
    total
}

/// Writes the frame and data headers of a DATA frame whose `payload_len` bytes follow them
/// in `out` already (a payload framed where it lies); returns the frame's length.
/// `out` holds at least [`DATA_FRAME_OVERHEAD`] bytes.
pub fn encode_data_frame_header(out: &mut [u8], header: &DataHeader, payload_len: usize) -> usize {
    let total = DATA_FRAME_OVERHEAD + payload_len;
    let frame_header = FrameHeader {
        frame_type: FRAME_DATA,
        flags: 0,
        length: U16::new(total as u16),
    };
    out[..FRAME_HEADER_LEN].copy_from_slice(frame_header.as_bytes());
    out[FRAME_HEADER_LEN..DATA_FRAME_OVERHEAD].copy_from_slice(header.as_bytes());
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_splits_into_its_segments_and_an_empty_run_is_one_empty_datagram() {
        let run: Vec<u8> = (0..10).collect();
        let split = |segment| segments(&run, segment).map(<[u8]>::to_vec).collect::<Vec<_>>();
        assert_eq!(split(4), [vec![0, 1, 2, 3], vec![4, 5, 6, 7], vec![8, 9]]);
        assert_eq!(split(5), [vec![0, 1, 2, 3, 4], vec![5, 6, 7, 8, 9]]);
        assert_eq!(split(10), std::slice::from_ref(&run));
        assert_eq!(split(64), std::slice::from_ref(&run));
        assert_eq!(split(0).len(), 10, "a zero segment is taken as one byte");
        assert_eq!(segments(&[], 4).collect::<Vec<_>>(), [&[] as &[u8]]);
        assert_eq!(
            segment_ranges(100..110, 4).collect::<Vec<_>>(),
            [100..104, 104..108, 108..110]
        );
        let empty: Vec<_> = segment_ranges(7..7, 4).map(|r| (r.start, r.end)).collect();
        assert_eq!(empty, [(7, 7)], "an empty run is one empty datagram");
        assert_eq!(segment_ranges(0..130, 64).len(), 3);
    }

    fn data_header(seq: u64, len: u32, offset: u32) -> DataHeader {
        DataHeader {
            stream: 7.into(),
            sender: 3.into(),
            epoch: 0.into(),
            sequence: seq.into(),
            timestamp: 11.into(),
            message_len: len.into(),
            fragment_offset: offset.into(),
        }
    }

    #[test]
    fn layout_sizes_match_protocol_doc() {
        assert_eq!(DATAGRAM_HEADER_LEN, 12);
        assert_eq!(FRAME_HEADER_LEN, 4);
        assert_eq!(DATA_FRAME_OVERHEAD, 40);
        assert_eq!(NAK_FRAME_OVERHEAD, 12);
        assert_eq!(NAK_RANGE_LEN, 12);
        assert_eq!(STATUS_FRAME_LEN, 20);
        assert_eq!(HEARTBEAT_FRAME_LEN, 36);
    }

    #[test]
    fn round_trip_of_every_frame_type() {
        let mut buf = [0u8; 1500];
        let mut w = DatagramWriter::new(&mut buf, 9, 3).unwrap();
        assert!(w.push_data(0, &data_header(5, 3, 0), b"abc"));
        let ranges = [NakRange {
            first: 10.into(),
            count: 2.into(),
        }];
        assert_eq!(w.push_nak(3, &ranges), 1);
        assert!(w.push_status(&StatusBody {
            sender: 3.into(),
            window: 64.into(),
            position: 12.into()
        }));
        let hb = HeartbeatBody {
            sender: 3.into(),
            epoch: 0.into(),
            next_sequence: 20.into(),
            oldest_sequence: 4.into(),
            timestamp: 99.into(),
        };
        assert!(w.push_heartbeat(&hb));
        assert!(w.push_heartbeat_with(HEARTBEAT_FLAG_REPORT, &hb));
        let len = w.len();
        let (h, frames) = decode_datagram(&buf[..len]).unwrap();
        assert_eq!((h.group.get(), h.source.get()), (9, 3));
        let frames: Vec<_> = frames.collect::<Result<_, _>>().unwrap();
        assert_eq!(frames.len(), 5);
        match frames[0] {
            Frame::Data(d) => {
                assert_eq!(d.payload, b"abc");
                assert_eq!(d.header.sequence.get(), 5);
            }
            _ => panic!("expected data"),
        }
        match frames[1] {
            Frame::Nak(n) => assert_eq!(n.ranges[0].count.get(), 2),
            _ => panic!("expected nak"),
        }
        assert!(matches!(frames[2], Frame::Status(s) if s.position.get() == 12));
        assert!(
            matches!(frames[3], Frame::Heartbeat(hb) if hb.body.next_sequence.get() == 20 && hb.flags == 0)
        );
        assert!(matches!(frames[4], Frame::Heartbeat(hb) if hb.flags == HEARTBEAT_FLAG_REPORT));
    }

    #[test]
    fn typed_errors_for_bad_input() {
        assert!(matches!(
            decode_datagram(&[1, 2]),
            Err(WireError::Truncated { .. })
        ));
        let mut buf = [0u8; 64];
        let w = DatagramWriter::new(&mut buf, 1, 1).unwrap();
        let len = w.len();
        let mut bad = buf;
        bad[0] = b'X';
        assert_eq!(decode_datagram(&bad[..len]).err(), Some(WireError::BadMagic));
        let mut bad = buf;
        bad[2] = 9;
        assert_eq!(
            decode_datagram(&bad[..len]).err(),
            Some(WireError::UnsupportedVersion(9))
        );
        let mut bad = buf;
        bad[3] = 1;
        assert_eq!(
            decode_datagram(&bad[..len]).err(),
            Some(WireError::UnknownFlags(1))
        );
        assert!(matches!(
            decode_datagram(&vec![0u8; MAX_MTU + 1]),
            Err(WireError::Oversized(_))
        ));
        // Unknown and reserved frame types, each with a sound length, then a good frame.
        let mut dgram = buf[..len].to_vec();
        dgram.extend_from_slice(&[0x7f, 0, 4, 0]);
        dgram.extend_from_slice(&[0x21, 0, 4, 0]);
        let mut tail = [0u8; 64];
        let n = encode_data_frame(&mut tail, &data_header(1, 1, 0), b"z");
        dgram.extend_from_slice(&tail[..n]);
        let (_, frames) = decode_datagram(&dgram).unwrap();
        let got: Vec<_> = frames.collect();
        assert_eq!(got[0].as_ref().err(), Some(&WireError::UnknownFrameType(0x7f)));
        assert_eq!(got[1].as_ref().err(), Some(&WireError::ReservedFrameType(0x21)));
        assert!(matches!(got[2], Ok(Frame::Data(_))));
        // A fragment that runs past its message length.
        let mut dgram = buf[..len].to_vec();
        let n = encode_data_frame(&mut tail, &data_header(1, 2, 1), b"zz");
        dgram.extend_from_slice(&tail[..n]);
        let (_, mut frames) = decode_datagram(&dgram).unwrap();
        assert!(matches!(frames.next(), Some(Err(WireError::Inconsistent(_)))));
        // A frame length beyond the datagram ends iteration.
        let mut dgram = buf[..len].to_vec();
        dgram.extend_from_slice(&[FRAME_STATUS, 0, 200, 0, 1, 2]);
        let (_, mut frames) = decode_datagram(&dgram).unwrap();
        assert!(matches!(frames.next(), Some(Err(WireError::Truncated { .. }))));
        assert!(frames.next().is_none());
    }

    #[test]
    fn writer_never_exceeds_its_buffer() {
        let mut buf = [0u8; 60];
        let mut w = DatagramWriter::new(&mut buf, 1, 1).unwrap();
        assert!(!w.push_data(0, &data_header(0, 100, 0), &[0u8; 100]));
        assert!(w.push_data(0, &data_header(0, 8, 0), &[0u8; 8]));
        assert_eq!(w.len(), 60);
        assert!(!w.push_status(&StatusBody {
            sender: 1.into(),
            window: 1.into(),
            position: 1.into()
        }));
    }
}
