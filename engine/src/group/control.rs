//! Membership frames: the body codec of wire frame types `0x10..=0x16`.
//!
//! Bodies are little-endian fields and `u16`-counted lists. Every decoder checks each length
//! against the bytes present and the list bounds below, so a hostile body is an error, never a
//! panic or a large allocation.

/// Periodic member state: failure detection, discovery, ordering promises and stability.
pub const KIND_STATE: u8 = 0x10;
/// A coordinator proposes the next view.
pub const KIND_PROPOSE: u8 = 0x11;
/// A participant's answer to a proposal: its view, its history and what it holds.
pub const KIND_FLUSH_STATE: u8 = 0x12;
/// The coordinator fixes the next view, whether it is primary, and the flush cut.
pub const KIND_COMMIT: u8 = 0x13;
/// A participant holds everything up to the cut.
pub const KIND_FLUSH_DONE: u8 = 0x14;
/// Every participant is done: install the view.
pub const KIND_INSTALL: u8 = 0x15;
/// A participant refuses a proposal because it accepted a later one.
pub const KIND_REFUSE: u8 = 0x16;
/// Secured groups: a participant's MLS key package, sent with its answer to a proposal.
pub const KIND_KEY_PACKAGE: u8 = 0x17;
/// Secured groups: one fragment of the coordinator's key message for a proposal (the MLS
/// commit for the members of the old epoch and the Welcome for those it adds).
pub const KIND_KEYS: u8 = 0x18;
/// Secured groups: the coordinator names the participant that commits this view change (a
/// member whose periodic self-update is due), instead of committing itself.
pub const KIND_DELEGATE: u8 = 0x19;

/// Largest key message a fragment may announce (a Welcome carries the ratchet tree: about
/// 70 KB at 256 members).
pub const MAX_KEYS_BYTES: u32 = 4 << 20;

/// Most members in one list (a view, a proposal).
pub const MAX_LIST: usize = 256;

/// `STATE` flags.
pub const STATE_PRIMARY: u8 = 1;
/// The member is leaving the group.
pub const STATE_LEAVING: u8 = 2;
/// The member wants to be a sender.
pub const STATE_WANTS_SEND: u8 = 4;
/// Secured groups: the member holds the keys of its installed primary view.
pub const STATE_KEYED: u8 = 8;
/// Secured groups: the member's periodic self-update is due.
pub const STATE_UPDATE_DUE: u8 = 16;

/// A view as carried in frames: its id, coordinator, members and senders (both sorted).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ViewDesc {
    /// View id; 0 means "no view". Primary views have unique ids; the two sides of a
    /// partition may both number a view alike, so a view is `(id, coord)`.
    pub id: u32,
    /// The member that proposed it.
    pub coord: u32,
    /// Member ids, ascending.
    pub members: Vec<u32>,
    /// The members that send (and take part in total order), ascending.
    pub senders: Vec<u32>,
}

/// One sender's entry in a flush cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CutEntry {
    /// The sender.
    pub sender: u32,
    /// Every survivor must hold this sender's messages `0..count`.
    pub count: u64,
    /// The participant that relays `from..count` to the others.
    pub holder: u32,
    /// The lowest count any participant reported.
    pub from: u64,
}

/// A decoded membership frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    /// See [`KIND_STATE`].
    State {
        /// The sender's installed view (0: none).
        view: u32,
        /// That view's coordinator.
        coord: u32,
        /// The proposal this member accepted and is frozen on (0: none).
        accepted: u32,
        /// `STATE_*` flags.
        flags: u8,
        /// Messages the member has published in `view`.
        sent: u64,
        /// Its logical clock: its later messages carry larger timestamps.
        clock: u64,
        /// Per sender of `view`, in order: how many of its messages the member holds.
        prefixes: Vec<u64>,
    },
    /// See [`KIND_PROPOSE`].
    Propose {
        /// The proposed view (`id` is the proposal's number).
        view: ViewDesc,
        /// Members of the old view that leave but take part in the flush.
        extra: Vec<u32>,
    },
    /// See [`KIND_FLUSH_STATE`].
    FlushState {
        /// The proposal answered.
        proposal: u32,
        /// The participant's installed view id (0: none).
        view: u32,
        /// That view's coordinator.
        view_coord: u32,
        /// A view it agreed to and finished the flush of, but has not seen installed (`id` 0:
        /// none); if another participant installed it, it must install it too.
        pending: ViewDesc,
        /// Whether that view is primary.
        primary: bool,
        /// The last primary view it installed (`id` 0: none).
        last_primary: ViewDesc,
        /// Primary views it agreed to since then that may have been installed elsewhere.
        attempts: Vec<ViewDesc>,
        /// `(sender, count)` of the messages it holds in its view.
        prefixes: Vec<(u32, u64)>,
    },
    /// See [`KIND_COMMIT`].
    Commit {
        /// The next view.
        view: ViewDesc,
        /// Members of the old view that leave.
        extra: Vec<u32>,
        /// Whether the next view is primary.
        primary: bool,
        /// Per old primary view among the participants: `(view id, cut)`. The members that
        /// leave one view together end it with the same messages.
        flushes: Vec<(u32, Vec<CutEntry>)>,
    },
    /// See [`KIND_FLUSH_DONE`].
    FlushDone {
        /// The proposal.
        proposal: u32,
    },
    /// See [`KIND_INSTALL`].
    Install {
        /// The view to install (as committed).
        view: ViewDesc,
    },
    /// See [`KIND_REFUSE`].
    Refuse {
        /// The proposal refused.
        proposal: u32,
        /// The highest view or proposal number the refuser has seen.
        seen: u32,
    },
    /// See [`KIND_KEY_PACKAGE`].
    KeyPackage {
        /// The proposal answered.
        proposal: u32,
        /// The tag of the MLS epoch the participant is in (`MlsMember::epoch_tag`; [`u64::MAX`]:
        /// none): a number alone does not tell two groups' epochs apart.
        epoch: u64,
        /// Its periodic self-update is due: it asks to commit this view change.
        update: bool,
        /// A serialized MLS key package of the participant.
        package: Vec<u8>,
    },
    /// See [`KIND_DELEGATE`].
    Delegate {
        /// The proposal.
        proposal: u32,
        /// The participant that commits it.
        committer: u32,
    },
    /// See [`KIND_KEYS`].
    Keys {
        /// The proposal the key message belongs to.
        proposal: u32,
        /// The key message's whole length (at most [`MAX_KEYS_BYTES`]).
        total: u32,
        /// Where this fragment starts in it.
        offset: u32,
        /// The fragment.
        chunk: Vec<u8>,
    },
}

/// Why a membership frame failed to decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    /// The body ended early.
    #[error("truncated membership frame")]
    Truncated,
    /// Bytes were left over after the last field.
    #[error("trailing bytes in membership frame")]
    Trailing,
    /// A list longer than [`MAX_LIST`] or a list that is not sorted and unique.
    #[error("bad list in membership frame")]
    BadList,
    /// A frame type this version does not define.
    #[error("unknown membership frame type {0:#x}")]
    UnknownKind(u8),
}

struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ControlError> {
        if self.bytes.len() < n {
            return Err(ControlError::Truncated);
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, ControlError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, ControlError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2 bytes")))
    }
    fn u32(&mut self) -> Result<u32, ControlError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Result<u64, ControlError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    fn count(&mut self, item_len: usize) -> Result<usize, ControlError> {
        let n = usize::from(self.u16()?);
        if n > MAX_LIST {
            return Err(ControlError::BadList);
        }
        if self.bytes.len() < n * item_len {
            return Err(ControlError::Truncated);
        }
        Ok(n)
    }
    /// A sorted list of distinct ids.
    fn ids(&mut self) -> Result<Vec<u32>, ControlError> {
        let n = self.count(4)?;
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            let id = self.u32()?;
            if v.last().is_some_and(|&last| last >= id) {
                return Err(ControlError::BadList);
            }
            v.push(id);
        }
        Ok(v)
    }
    fn view(&mut self) -> Result<ViewDesc, ControlError> {
        let id = self.u32()?;
        let coord = self.u32()?;
        let members = self.ids()?;
        let senders = self.ids()?;
        if senders.iter().any(|s| members.binary_search(s).is_err()) {
            return Err(ControlError::BadList);
        }
        Ok(ViewDesc {
            id,
            coord,
            members,
            senders,
        })
    }
    /// A `u16`-counted byte string.
    fn bytes(&mut self) -> Result<Vec<u8>, ControlError> {
        let n = usize::from(self.u16()?);
        Ok(self.take(n)?.to_vec())
    }
    fn end(self) -> Result<(), ControlError> {
        if self.bytes.is_empty() {
            Ok(())
        } else {
            Err(ControlError::Trailing)
        }
    }
}

struct Writer<'a> {
    out: &'a mut Vec<u8>,
}

impl Writer<'_> {
    fn u8(&mut self, v: u8) {
        self.out.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.out.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.out.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.out.extend_from_slice(&v.to_le_bytes());
    }
    fn len(&mut self, n: usize) {
        debug_assert!(n <= MAX_LIST, "lists are bounded by MAX_LIST");
        self.u16(n as u16);
    }
    fn ids(&mut self, ids: &[u32]) {
        self.len(ids.len());
        for &id in ids {
            self.u32(id);
        }
    }
    fn bytes(&mut self, b: &[u8]) {
        debug_assert!(b.len() <= usize::from(u16::MAX), "byte strings are u16-counted");
        self.u16(b.len() as u16);
        self.out.extend_from_slice(b);
    }
    fn view(&mut self, v: &ViewDesc) {
        self.u32(v.id);
        self.u32(v.coord);
        self.ids(&v.members);
        self.ids(&v.senders);
    }
}

impl Control {
    /// The wire frame type of this message.
    pub fn kind(&self) -> u8 {
        match self {
            Control::State { .. } => KIND_STATE,
            Control::Propose { .. } => KIND_PROPOSE,
            Control::FlushState { .. } => KIND_FLUSH_STATE,
            Control::Commit { .. } => KIND_COMMIT,
            Control::FlushDone { .. } => KIND_FLUSH_DONE,
            Control::Install { .. } => KIND_INSTALL,
            Control::Refuse { .. } => KIND_REFUSE,
            Control::KeyPackage { .. } => KIND_KEY_PACKAGE,
            Control::Keys { .. } => KIND_KEYS,
            Control::Delegate { .. } => KIND_DELEGATE,
        }
    }

    /// Appends the body to `out` (cleared first).
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.clear();
        let mut w = Writer { out };
        match self {
            Control::State {
                view,
                coord,
                accepted,
                flags,
                sent,
                clock,
                prefixes,
            } => {
                w.u32(*view);
                w.u32(*coord);
                w.u32(*accepted);
                w.u8(*flags);
                w.u64(*sent);
                w.u64(*clock);
                w.len(prefixes.len());
                for &p in prefixes {
                    w.u64(p);
                }
            }
            Control::Propose { view, extra } => {
                w.view(view);
                w.ids(extra);
            }
            Control::FlushState {
                proposal,
                view,
                view_coord,
                pending,
                primary,
                last_primary,
                attempts,
                prefixes,
            } => {
                w.u32(*proposal);
                w.u32(*view);
                w.u32(*view_coord);
                w.view(pending);
                w.u8(u8::from(*primary));
                w.view(last_primary);
                w.len(attempts.len());
                for a in attempts {
                    w.view(a);
                }
                w.len(prefixes.len());
                for &(s, c) in prefixes {
                    w.u32(s);
                    w.u64(c);
                }
            }
            Control::Commit {
                view,
                extra,
                primary,
                flushes,
            } => {
                w.view(view);
                w.ids(extra);
                w.u8(u8::from(*primary));
                w.len(flushes.len());
                for (old, cut) in flushes {
                    w.u32(*old);
                    w.len(cut.len());
                    for c in cut {
                        w.u32(c.sender);
                        w.u64(c.count);
                        w.u32(c.holder);
                        w.u64(c.from);
                    }
                }
            }
            Control::FlushDone { proposal } => w.u32(*proposal),
            Control::Install { view } => w.view(view),
            Control::Refuse { proposal, seen } => {
                w.u32(*proposal);
                w.u32(*seen);
            }
            Control::KeyPackage {
                proposal,
                epoch,
                update,
                package,
            } => {
                w.u32(*proposal);
                w.u64(*epoch);
                w.u8(u8::from(*update));
                w.bytes(package);
            }
            Control::Keys {
                proposal,
                total,
                offset,
                chunk,
            } => {
                w.u32(*proposal);
                w.u32(*total);
                w.u32(*offset);
                w.bytes(chunk);
            }
            Control::Delegate { proposal, committer } => {
                w.u32(*proposal);
                w.u32(*committer);
            }
        }
    }

    /// Decodes the body of a membership frame of type `kind`.
    pub fn decode(kind: u8, body: &[u8]) -> Result<Control, ControlError> {
        let mut r = Reader { bytes: body };
        let c = match kind {
            KIND_STATE => {
                let view = r.u32()?;
                let coord = r.u32()?;
                let accepted = r.u32()?;
                let flags = r.u8()?;
                let sent = r.u64()?;
                let clock = r.u64()?;
                let n = r.count(8)?;
                let prefixes = (0..n).map(|_| r.u64()).collect::<Result<_, _>>()?;
                Control::State {
                    view,
                    coord,
                    accepted,
                    flags,
                    sent,
                    clock,
                    prefixes,
                }
            }
            KIND_PROPOSE => Control::Propose {
                view: r.view()?,
                extra: r.ids()?,
            },
            KIND_FLUSH_STATE => {
                let proposal = r.u32()?;
                let view = r.u32()?;
                let view_coord = r.u32()?;
                let pending = r.view()?;
                let primary = r.u8()? != 0;
                let last_primary = r.view()?;
                let n = r.count(8)?;
                let attempts = (0..n).map(|_| r.view()).collect::<Result<_, _>>()?;
                let n = r.count(12)?;
                let mut prefixes = Vec::with_capacity(n);
                for _ in 0..n {
                    prefixes.push((r.u32()?, r.u64()?));
                }
                Control::FlushState {
                    proposal,
                    view,
                    view_coord,
                    pending,
                    primary,
                    last_primary,
                    attempts,
                    prefixes,
                }
            }
            KIND_COMMIT => {
                let view = r.view()?;
                let extra = r.ids()?;
                let primary = r.u8()? != 0;
                let n = r.count(6)?;
                let mut flushes = Vec::with_capacity(n);
                for _ in 0..n {
                    let old = r.u32()?;
                    let k = r.count(24)?;
                    let mut cut = Vec::with_capacity(k);
                    for _ in 0..k {
                        let e = CutEntry {
                            sender: r.u32()?,
                            count: r.u64()?,
                            holder: r.u32()?,
                            from: r.u64()?,
                        };
                        if e.from > e.count {
                            return Err(ControlError::BadList);
                        }
                        cut.push(e);
                    }
                    flushes.push((old, cut));
                }
                Control::Commit {
                    view,
                    extra,
                    primary,
                    flushes,
                }
            }
            KIND_FLUSH_DONE => Control::FlushDone { proposal: r.u32()? },
            KIND_INSTALL => Control::Install { view: r.view()? },
            KIND_REFUSE => Control::Refuse {
                proposal: r.u32()?,
                seen: r.u32()?,
            },
            KIND_KEY_PACKAGE => Control::KeyPackage {
                proposal: r.u32()?,
                epoch: r.u64()?,
                update: r.u8()? != 0,
                package: r.bytes()?,
            },
            KIND_KEYS => {
                let proposal = r.u32()?;
                let total = r.u32()?;
                let offset = r.u32()?;
                let chunk = r.bytes()?;
                let end = u64::from(offset) + chunk.len() as u64;
                if total > MAX_KEYS_BYTES || end > u64::from(total) || chunk.is_empty() {
                    return Err(ControlError::BadList);
                }
                Control::Keys {
                    proposal,
                    total,
                    offset,
                    chunk,
                }
            }
            KIND_DELEGATE => Control::Delegate {
                proposal: r.u32()?,
                committer: r.u32()?,
            },
            k => return Err(ControlError::UnknownKind(k)),
        };
        r.end()?;
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn view(id: u32) -> ViewDesc {
        ViewDesc {
            id,
            coord: 1,
            members: vec![1, 2, 5],
            senders: vec![2, 5],
        }
    }

    #[test]
    fn every_kind_round_trips() {
        let all = vec![
            Control::State {
                view: 3,
                coord: 1,
                accepted: 4,
                flags: STATE_PRIMARY | STATE_WANTS_SEND,
                sent: 9,
                clock: 77,
                prefixes: vec![4, 5],
            },
            Control::Propose {
                view: view(4),
                extra: vec![3],
            },
            Control::FlushState {
                proposal: 4,
                view: 3,
                view_coord: 1,
                pending: view(2),
                primary: true,
                last_primary: view(3),
                attempts: vec![view(2)],
                prefixes: vec![(2, 10), (5, 11)],
            },
            Control::Commit {
                view: view(4),
                extra: vec![],
                primary: true,
                flushes: vec![
                    (
                        3,
                        vec![CutEntry {
                            sender: 2,
                            count: 10,
                            holder: 5,
                            from: 8,
                        }],
                    ),
                    (1, vec![]),
                ],
            },
            Control::FlushDone { proposal: 4 },
            Control::Install { view: view(4) },
            Control::Refuse { proposal: 4, seen: 9 },
            Control::KeyPackage {
                proposal: 4,
                epoch: 3,
                update: true,
                package: vec![7; 310],
            },
            Control::Delegate {
                proposal: 4,
                committer: 5,
            },
            Control::Keys {
                proposal: 4,
                total: 2000,
                offset: 1000,
                chunk: vec![9; 1000],
            },
        ];
        let mut buf = Vec::new();
        for c in all {
            c.encode(&mut buf);
            assert_eq!(Control::decode(c.kind(), &buf), Ok(c.clone()));
            // Every strict prefix is refused, and so is a trailing byte.
            for n in 0..buf.len() {
                assert!(Control::decode(c.kind(), &buf[..n]).is_err(), "{c:?} cut at {n}");
            }
            buf.push(0);
            assert_eq!(Control::decode(c.kind(), &buf), Err(ControlError::Trailing));
        }
    }

    #[test]
    fn key_fragments_outside_their_message_are_refused() {
        let mut buf = Vec::new();
        for (total, offset, len) in [
            (10, 5, 6),
            (MAX_KEYS_BYTES + 1, 0, 1),
            (10, 0, 0),
            (u32::MAX, u32::MAX, 2),
        ] {
            Control::Keys {
                proposal: 1,
                total,
                offset,
                chunk: vec![1; len],
            }
            .encode(&mut buf);
            assert_eq!(
                Control::decode(KIND_KEYS, &buf),
                Err(ControlError::BadList),
                "{total} {offset} {len}"
            );
        }
    }

    #[test]
    fn unsorted_or_inconsistent_lists_are_refused() {
        let mut buf = Vec::new();
        Control::Propose {
            view: ViewDesc {
                id: 1,
                coord: 1,
                members: vec![1, 2],
                senders: vec![2],
            },
            extra: vec![],
        }
        .encode(&mut buf);
        // Swap the two members: 2, 1.
        buf[10..14].copy_from_slice(&2u32.to_le_bytes());
        buf[14..18].copy_from_slice(&1u32.to_le_bytes());
        assert_eq!(Control::decode(KIND_PROPOSE, &buf), Err(ControlError::BadList));
        assert_eq!(Control::decode(0x1f, &[]), Err(ControlError::UnknownKind(0x1f)));
    }

    proptest! {
        #[test]
        fn random_bodies_never_panic(kind in 0x10u8..=0x17, body in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = Control::decode(kind, &body);
        }
    }
}
