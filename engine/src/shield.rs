//! The data plane of the Secure Group Layer: every datagram of a secured group is sealed with
//! AES-256-GCM before it leaves and opened before the protocol reads it.
//!
//! A sealed datagram is the plain datagram header (its `flags` carry [`FLAG_SEALED`]), the
//! frames encrypted in place, and a 28-byte trailer: tag (16), epoch (u32), packet number (u64).
//! The header and the epoch and packet number are authenticated data. The key is the
//! transmitting member's for that epoch and packet-number generation
//! ([`EpochSecret::sender_key`]), the nonce is (epoch, packet number), and a member's packet
//! numbers only grow, so a nonce never repeats under a key. Whole datagrams are sealed, not
//! frames: one tag per datagram however many messages it packs, so every DATA, NAK, STATUS,
//! HEARTBEAT and membership frame is covered and small messages cost no more than large ones.
//!
//! Opening checks, in order: the shape (`malformed`), the flag (`unsealed`), the epoch
//! (`unknown_epoch`: only the current and the previous one open), the transmitting member
//! (`not_member` of that epoch, or of the current one: a member removed by the last rekey is not
//! heard at all), the replay window (`replay`), the tag (`bad_tag`), and, in
//! epochs where some member may not publish, that every DATA frame's sender may (`wrong_role`).
//! Each rejection is counted by reason and the datagram is dropped; nothing it carried reaches
//! the protocol, and a forged datagram moves no window.

use crate::group::RELAY_STREAM;
use crate::wire::{self, Frame, DATAGRAM_HEADER_LEN};
use intergroup_secure::aead::{generation_of, SenderKey, TAG_LEN};
use intergroup_secure::{EpochSecret, ReplayWindow};
use std::collections::HashMap;

/// Datagram-header flag: the frames are sealed and a trailer follows them.
pub const FLAG_SEALED: u8 = 0x01;
/// Datagram-header flag: the frames are in the clear, only membership frames, and a trailer of
/// packet number (u64) and the transmitting member's Ed25519 signature follows them.
pub const FLAG_SIGNED: u8 = 0x02;
/// Bytes signing adds to a datagram: packet number and signature.
pub const SIGN_OVERHEAD: usize = 8 + 64;
/// The top bit of a sealed datagram's packet-number field: set for datagrams sent to one
/// member, clear for those sent to the group. Receivers keep one replay window per lane,
/// because the two arrive on different sockets and one can overtake the other by thousands.
const LANE_BIT: u64 = 1 << 63;

/// Where a datagram goes, for the replay windows (see [`Shield::seal`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    /// To the group address (or every unicast peer).
    Group,
    /// To one member's unicast address.
    Direct,
}

impl Lane {
    /// The lane of a datagram going to `destination`.
    pub fn of(destination: &crate::proto::Destination) -> Self {
        match destination {
            crate::proto::Destination::Group => Lane::Group,
            crate::proto::Destination::Unicast(_) => Lane::Direct,
        }
    }
}

/// Bytes sealing adds to a datagram: epoch, packet number and tag.
pub const SEAL_OVERHEAD: usize = 4 + 8 + TAG_LEN;

/// The keys and members of one epoch.
#[derive(Debug, Clone)]
pub struct ShieldEpoch {
    /// Epoch number; a later epoch has a larger one.
    pub epoch: u32,
    /// The epoch's secret (from MLS, or shared out of band), from which every key derives.
    pub secret: EpochSecret,
    /// Member ids of the epoch and whether each may publish.
    pub members: Vec<(u32, bool)>,
}

impl ShieldEpoch {
    /// The epoch an MLS member is in, for group `group`: epoch number = MLS epoch, secret =
    /// the MLS exporter's data-plane secret bound to the group id, members = the MLS group's
    /// members as engine ids ([`intergroup_secure::PublicKey::member_id`]), each allowed to
    /// publish if `policy` gives it the role.
    pub fn from_mls(
        mls: &intergroup_secure::mls::MlsMember,
        group: u32,
        policy: &intergroup_secure::Policy,
    ) -> Result<Self, intergroup_secure::mls::MlsError> {
        Self::from_mls_with_ids(mls, group, policy, intergroup_secure::PublicKey::member_id)
    }

    /// [`from_mls`](Self::from_mls) with member ids given by `id_of` (an assignment other than
    /// [`intergroup_secure::PublicKey::member_id`]).
    pub fn from_mls_with_ids(
        mls: &intergroup_secure::mls::MlsMember,
        group: u32,
        policy: &intergroup_secure::Policy,
        id_of: impl Fn(&intergroup_secure::PublicKey) -> u32,
    ) -> Result<Self, intergroup_secure::mls::MlsError> {
        let epoch = mls.epoch().ok_or(intergroup_secure::mls::MlsError::NoGroup)?;
        let epoch = u32::try_from(epoch)
            .map_err(|_| intergroup_secure::mls::MlsError::Mls(format!("epoch {epoch} past u32")))?;
        Ok(Self {
            epoch,
            secret: mls.epoch_secret(&group.to_be_bytes())?,
            members: mls
                .members()
                .into_iter()
                .map(|k| (id_of(&k), policy.allows(&k, intergroup_secure::Role::Publish)))
                .collect(),
        })
    }
}

/// Why an incoming datagram was dropped. The discriminant is the reason's index in
/// [`Rejection::ALL`] and [`ShieldStats::rejected`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rejection {
    /// Too short for a header and a trailer, or of another group.
    Malformed,
    /// Not sealed, in a secured group.
    Unsealed,
    /// Sealed in an epoch this member has no key for (too old, or not reached yet).
    UnknownEpoch,
    /// Transmitted by a member id that is not in the epoch.
    NotMember,
    /// The packet number was accepted before, or is older than the replay window.
    Replay,
    /// The tag did not check: forged, modified, truncated, or sealed under another key.
    BadTag,
    /// Carried data from a member whose role does not include publishing.
    WrongRole,
}

impl Rejection {
    /// Every reason, in the order [`ShieldStats`] lists them.
    pub const ALL: [Rejection; 7] = [
        Rejection::Malformed,
        Rejection::Unsealed,
        Rejection::UnknownEpoch,
        Rejection::NotMember,
        Rejection::Replay,
        Rejection::BadTag,
        Rejection::WrongRole,
    ];

    /// The counter's name.
    pub fn label(self) -> &'static str {
        match self {
            Rejection::Malformed => "malformed",
            Rejection::Unsealed => "unsealed",
            Rejection::UnknownEpoch => "unknown_epoch",
            Rejection::NotMember => "not_member",
            Rejection::Replay => "replay",
            Rejection::BadTag => "bad_tag",
            Rejection::WrongRole => "wrong_role",
        }
    }
}

/// What a shield counted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShieldStats {
    /// Datagrams sealed.
    pub sealed: u64,
    /// Datagrams opened and passed on.
    pub opened: u64,
    /// Datagrams rejected, per [`Rejection::ALL`] index.
    pub rejected: [u64; 7],
    /// The epoch datagrams are sealed in now.
    pub epoch: u32,
    /// Key generations this member moved to because a key reached its usage limit.
    pub key_rotations: u64,
    /// Datagrams signed (membership frames for members without the epoch's keys).
    pub signed: u64,
    /// Signed datagrams verified and passed on.
    pub verified: u64,
}

impl ShieldStats {
    /// Datagrams rejected for `reason`.
    pub fn rejected(&self, reason: Rejection) -> u64 {
        self.rejected[reason as usize]
    }

    /// Every rejection.
    pub fn rejected_total(&self) -> u64 {
        self.rejected.iter().sum()
    }
}

/// Why a datagram could not be sealed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    /// The buffer has no room for the trailer, or the datagram is shorter than its header.
    #[error("no room to seal: datagram of {len} bytes in a buffer of {capacity}")]
    NoRoom {
        /// Datagram length.
        len: usize,
        /// Buffer length.
        capacity: usize,
    },
    /// The cipher refused (a key past its limit; cannot happen with generations).
    #[error("sealing failed: {0}")]
    Cipher(intergroup_secure::Error),
    /// Signing needs an identity ([`Shield::with_signing`]).
    #[error("no identity to sign with")]
    NoIdentity,
}

/// One transmitting member's key in one epoch, and the packet numbers accepted from it, per
/// lane.
struct Peer {
    generation: u32,
    key: SenderKey,
    windows: [ReplayWindow; 2],
}

struct EpochKeys {
    epoch: u32,
    secret: EpochSecret,
    /// Member id -> may publish.
    members: HashMap<u32, bool>,
    /// Every member may publish: the frame walk for roles is skipped.
    all_publish: bool,
    peers: HashMap<u32, Peer>,
}

impl EpochKeys {
    fn new(e: ShieldEpoch) -> Self {
        let members: HashMap<u32, bool> = e.members.into_iter().collect();
        Self {
            epoch: e.epoch,
            secret: e.secret,
            all_publish: members.values().all(|p| *p),
            members,
            peers: HashMap::new(),
        }
    }
}

/// The signed path: this member's identity, the policy's members, their replay windows.
struct Signing {
    identity: intergroup_secure::Identity,
    roster: HashMap<u32, intergroup_secure::PublicKey>,
    next_packet: u64,
    windows: HashMap<u32, ReplayWindow>,
}

/// Seals this member's datagrams and opens everyone else's, for one group.
pub struct Shield {
    group: u32,
    me: u32,
    current: EpochKeys,
    previous: Option<EpochKeys>,
    send: SenderKey,
    send_generation: u32,
    next_packet: u64,
    stats: ShieldStats,
    signing: Option<Signing>,
}

impl std::fmt::Debug for Shield {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shield")
            .field("group", &self.group)
            .field("me", &self.me)
            .field("epoch", &self.current.epoch)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl Shield {
    /// A shield for member `me` of `group`, starting in `epoch`.
    pub fn new(group: u32, me: u32, epoch: ShieldEpoch) -> Self {
        let current = EpochKeys::new(epoch);
        let send = current.secret.sender_key(group, current.epoch, me, 0);
        Self {
            group,
            me,
            stats: ShieldStats {
                epoch: current.epoch,
                ..ShieldStats::default()
            },
            current,
            previous: None,
            send,
            send_generation: 0,
            next_packet: 0,
            signing: None,
        }
    }

    /// A shield with no epoch yet (a member of a secured group with membership before its
    /// first view): nothing sealed opens until [`install`](Self::install) gives it one. It
    /// holds a random placeholder secret for epoch 0 with no members.
    pub fn unkeyed(group: u32, me: u32) -> Result<Self, intergroup_secure::KeyError> {
        Ok(Self::new(
            group,
            me,
            ShieldEpoch {
                epoch: 0,
                secret: EpochSecret::generate()?,
                members: Vec::new(),
            },
        ))
    }

    /// Adds the signed path: this member signs with `identity`, and datagrams signed by the
    /// keys of `roster` (member id, key: the policy's members) open if they carry only
    /// membership frames. `first_packet` starts the signed packet numbers; give a value above
    /// any this identity used before (the wall clock in microseconds) so a restarted member
    /// is not taken for a replay.
    pub fn with_signing(
        mut self,
        identity: intergroup_secure::Identity,
        roster: impl IntoIterator<Item = (u32, intergroup_secure::PublicKey)>,
        first_packet: u64,
    ) -> Self {
        self.signing = Some(Signing {
            identity,
            roster: roster.into_iter().collect(),
            next_packet: first_packet,
            windows: HashMap::new(),
        });
        self
    }

    /// Replaces the members whose signed datagrams open (a new policy version).
    pub fn set_roster(&mut self, roster: impl IntoIterator<Item = (u32, intergroup_secure::PublicKey)>) {
        if let Some(s) = self.signing.as_mut() {
            s.roster = roster.into_iter().collect();
            s.windows.retain(|id, _| s.roster.contains_key(id));
        }
    }

    /// Moves to `epoch` (a view's, from the key agreement): as [`rekey`](Self::rekey) when it
    /// is later than the current one; otherwise (a Welcome into another MLS lineage) it
    /// replaces the current epoch and drops the previous one. Packet numbers keep growing
    /// either way, so no nonce repeats under any key.
    pub fn install(&mut self, epoch: ShieldEpoch) {
        if epoch.epoch > self.current.epoch {
            self.rekey(epoch);
            return;
        }
        let next = EpochKeys::new(epoch);
        self.send_generation = generation_of(self.next_packet);
        self.send = next
            .secret
            .sender_key(self.group, next.epoch, self.me, self.send_generation);
        self.stats.epoch = next.epoch;
        self.current = next;
        self.previous = None;
    }

    /// Seals or signs (as [`Transmit::signed`](crate::proto::Transmit::signed) asks) the
    /// datagram `t` wrote into `buf`; returns its new length.
    pub fn protect(&mut self, buf: &mut [u8], t: &crate::proto::Transmit) -> Result<usize, SealError> {
        if t.signed {
            self.sign(buf, t.len)
        } else {
            self.seal(buf, t.len, Lane::of(&t.destination))
        }
    }

    /// Signs the datagram in `buf[..len]` (membership frames only) and appends the trailer;
    /// returns the signed length, `len + SIGN_OVERHEAD`.
    pub fn sign(&mut self, buf: &mut [u8], len: usize) -> Result<usize, SealError> {
        let Some(signing) = self.signing.as_mut() else {
            return Err(SealError::NoIdentity);
        };
        if len < DATAGRAM_HEADER_LEN || buf.len() < len + SIGN_OVERHEAD {
            return Err(SealError::NoRoom {
                len,
                capacity: buf.len(),
            });
        }
        buf[3] |= FLAG_SIGNED;
        buf[len..len + 8].copy_from_slice(&signing.next_packet.to_le_bytes());
        signing.next_packet += 1;
        let signature = signing.identity.sign(&buf[..len + 8]);
        buf[len + 8..len + SIGN_OVERHEAD].copy_from_slice(&signature);
        self.stats.signed += 1;
        Ok(len + SIGN_OVERHEAD)
    }

    fn open_signed(&mut self, buf: &mut [u8]) -> Result<usize, Rejection> {
        let Some(signing) = self.signing.as_mut() else {
            return Err(Rejection::Unsealed);
        };
        if buf.len() < DATAGRAM_HEADER_LEN + SIGN_OVERHEAD || buf[3] & FLAG_SEALED != 0 {
            return Err(Rejection::Malformed);
        }
        let source = u32::from_le_bytes(le4(&buf[8..12]));
        let len = buf.len() - SIGN_OVERHEAD;
        let Some(key) = signing.roster.get(&source) else {
            return Err(Rejection::NotMember);
        };
        let mut packet_bytes = [0u8; 8];
        packet_bytes.copy_from_slice(&buf[len..len + 8]);
        let packet = u64::from_le_bytes(packet_bytes);
        let window = signing.windows.entry(source).or_insert_with(ReplayWindow::new);
        window.check(packet).map_err(|_| Rejection::Replay)?;
        let mut signature = [0u8; 64];
        signature.copy_from_slice(&buf[len + 8..]);
        if !key.verify(&buf[..len + 8], &signature) {
            return Err(Rejection::BadTag);
        }
        let _ = window.accept(packet);
        buf[3] &= !FLAG_SIGNED;
        // Only membership frames travel signed: data, reports and repairs are always sealed.
        let Ok((_, frames)) = wire::decode_datagram(&buf[..len]) else {
            return Err(Rejection::Malformed);
        };
        for f in frames {
            if !matches!(f, Ok(Frame::Membership { .. })) {
                return Err(Rejection::Unsealed);
            }
        }
        self.stats.verified += 1;
        Ok(len)
    }

    /// Moves to a later epoch: this member seals with the new keys from now on, and the
    /// previous epoch's keys still open what was sealed before the change. Anything older no
    /// longer opens. Returns false (and changes nothing) if `epoch` is not later.
    pub fn rekey(&mut self, epoch: ShieldEpoch) -> bool {
        if epoch.epoch <= self.current.epoch {
            return false;
        }
        let next = EpochKeys::new(epoch);
        self.send = next.secret.sender_key(self.group, next.epoch, self.me, 0);
        self.send_generation = 0;
        self.next_packet = 0;
        self.stats.epoch = next.epoch;
        self.previous = Some(std::mem::replace(&mut self.current, next));
        true
    }

    /// The most bytes sealing or signing adds to a datagram.
    pub fn max_overhead(&self) -> usize {
        if self.signing.is_some() {
            SIGN_OVERHEAD
        } else {
            SEAL_OVERHEAD
        }
    }

    /// The member id this shield seals as.
    pub fn member_id(&self) -> u32 {
        self.me
    }

    /// Moves the next packet number forward (never back): what a member restarted with the
    /// same epoch would do, and how tests reach the key-generation boundary.
    pub fn skip_to_packet(&mut self, packet: u64) {
        self.next_packet = self.next_packet.max(packet);
    }

    /// The epoch this member seals in.
    pub fn epoch(&self) -> u32 {
        self.current.epoch
    }

    /// What was counted.
    pub fn stats(&self) -> &ShieldStats {
        &self.stats
    }

    /// Seals the datagram in `buf[..len]`, bound for `lane`, in place and appends the trailer;
    /// returns the sealed length, `len + SEAL_OVERHEAD`. One packet counter serves both lanes
    /// (so nonces stay unique); the lane rides in the top bit of the packet-number field.
    pub fn seal(&mut self, buf: &mut [u8], len: usize, lane: Lane) -> Result<usize, SealError> {
        if len < DATAGRAM_HEADER_LEN || buf.len() < len + SEAL_OVERHEAD {
            return Err(SealError::NoRoom {
                len,
                capacity: buf.len(),
            });
        }
        let packet = self.next_packet;
        let generation = generation_of(packet);
        if generation != self.send_generation {
            // The key reached its usage limit: the next generation's key takes over.
            self.send = self
                .current
                .secret
                .sender_key(self.group, self.current.epoch, self.me, generation);
            self.send_generation = generation;
            self.stats.key_rotations += 1;
        }
        buf[3] |= FLAG_SEALED;
        let ids = len + TAG_LEN;
        buf[ids..ids + 4].copy_from_slice(&self.current.epoch.to_le_bytes());
        let field = packet | if lane == Lane::Direct { LANE_BIT } else { 0 };
        buf[ids + 4..ids + 12].copy_from_slice(&field.to_le_bytes());
        let aad = aad(&buf[..DATAGRAM_HEADER_LEN], &buf[ids..ids + 12]);
        let tag = self
            .send
            .seal_in_place(packet, &aad, &mut buf[DATAGRAM_HEADER_LEN..len])
            .map_err(SealError::Cipher)?;
        buf[len..ids].copy_from_slice(&tag);
        self.next_packet += 1;
        self.stats.sealed += 1;
        Ok(len + SEAL_OVERHEAD)
    }

    /// Opens the sealed datagram in `buf` in place. On success the plain datagram is
    /// `buf[..n]` for the returned `n`, its header's sealed flag cleared; on a rejection the
    /// reason is counted and returned.
    pub fn open(&mut self, buf: &mut [u8]) -> Result<usize, Rejection> {
        let r = self.open_inner(buf);
        match r {
            Ok(_) => self.stats.opened += 1,
            Err(reason) => {
                self.stats.rejected[reason as usize] += 1;
            }
        }
        r
    }

    fn open_inner(&mut self, buf: &mut [u8]) -> Result<usize, Rejection> {
        if buf.len() < DATAGRAM_HEADER_LEN + SEAL_OVERHEAD || buf[..2] != wire::MAGIC {
            return Err(Rejection::Malformed);
        }
        if u32::from_le_bytes(le4(&buf[4..8])) != self.group {
            return Err(Rejection::Malformed);
        }
        if buf[3] & FLAG_SIGNED != 0 {
            return self.open_signed(buf);
        }
        if buf[3] & FLAG_SEALED == 0 {
            return Err(Rejection::Unsealed);
        }
        let source = u32::from_le_bytes(le4(&buf[8..12]));
        let len = buf.len() - SEAL_OVERHEAD;
        let ids = len + TAG_LEN;
        let epoch = u32::from_le_bytes(le4(&buf[ids..ids + 4]));
        let mut packet_bytes = [0u8; 8];
        packet_bytes.copy_from_slice(&buf[ids + 4..ids + 12]);
        let field = u64::from_le_bytes(packet_bytes);
        let (lane, packet) = (usize::from(field & LANE_BIT != 0), field & !LANE_BIT);
        // A member the current epoch dropped is not heard in the previous one either: once
        // this member moved on, a removed member's reports no longer count.
        let in_current = self.current.members.contains_key(&source);
        let in_previous = epoch != self.current.epoch;
        let keys = if !in_previous {
            &mut self.current
        } else {
            match self.previous.as_mut() {
                Some(p) if p.epoch == epoch => p,
                _ => return Err(Rejection::UnknownEpoch),
            }
        };
        // In the current epoch `in_current` is the whole check; in the previous one the member
        // must be in both.
        if !in_current || (in_previous && !keys.members.contains_key(&source)) {
            return Err(Rejection::NotMember);
        }
        let group = self.group;
        let generation = generation_of(packet);
        let peer = keys.peers.entry(source).or_insert_with(|| Peer {
            generation,
            key: keys.secret.sender_key(group, epoch, source, generation),
            windows: [ReplayWindow::new(), ReplayWindow::new()],
        });
        peer.windows[lane].check(packet).map_err(|_| Rejection::Replay)?;
        let aad = aad(&buf[..DATAGRAM_HEADER_LEN], &buf[ids..ids + 12]);
        // Ciphertext then tag.
        let sealed = &mut buf[DATAGRAM_HEADER_LEN..ids];
        if generation == peer.generation {
            peer.key.open_in_place(packet, &aad, sealed)
        } else {
            // Another generation's key, kept only once a packet proved it: a forged packet
            // number must not evict the key honest packets use.
            let key = keys.secret.sender_key(group, epoch, source, generation);
            let r = key.open_in_place(packet, &aad, sealed);
            if r.is_ok() && generation > peer.generation {
                peer.key = key;
                peer.generation = generation;
            }
            r
        }
        .map_err(|_| Rejection::BadTag)?;
        // Authentic from here: the packet number is used up whatever the frames hold.
        let _ = peer.windows[lane].accept(packet);
        buf[3] &= !FLAG_SEALED;
        if !keys.all_publish && !data_senders_may_publish(&buf[..len], &keys.members) {
            return Err(Rejection::WrongRole);
        }
        Ok(len)
    }
}

/// Every DATA frame in `datagram` is from a member that may publish. Relays (another member's
/// message passed on during a view change) may come from any member: the group layer takes
/// one only for a sender of the view and only inside the cut the view change fixed.
fn data_senders_may_publish(datagram: &[u8], members: &HashMap<u32, bool>) -> bool {
    let Ok((_, frames)) = wire::decode_datagram(datagram) else {
        // Not decodable: the protocol counts it as malformed and drops it whole.
        return true;
    };
    for frame in frames {
        match frame {
            Ok(Frame::Data(d)) => {
                let sender = d.header.sender.get();
                if d.header.stream.get() != RELAY_STREAM && members.get(&sender) != Some(&true) {
                    return false;
                }
            }
            Ok(_) => {}
            Err(_) => return true,
        }
    }
    true
}

fn le4(b: &[u8]) -> [u8; 4] {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    a
}

fn aad(header: &[u8], trailer: &[u8]) -> [u8; DATAGRAM_HEADER_LEN + 12] {
    let mut a = [0u8; DATAGRAM_HEADER_LEN + 12];
    a[..DATAGRAM_HEADER_LEN].copy_from_slice(header);
    a[DATAGRAM_HEADER_LEN..].copy_from_slice(trailer);
    a
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{DataHeader, DatagramWriter, StatusBody};
    use proptest::prelude::*;

    const GROUP: u32 = 7;

    fn epoch(n: u32, secret: u8, members: &[(u32, bool)]) -> ShieldEpoch {
        ShieldEpoch {
            epoch: n,
            secret: EpochSecret::from_bytes([secret; 32]),
            members: members.to_vec(),
        }
    }

    fn three() -> Vec<(u32, bool)> {
        vec![(1, true), (2, true), (3, false)]
    }

    /// A datagram from `source` with one DATA frame from `sender` and one STATUS frame, with
    /// room for the trailer.
    fn datagram(source: u32, sender: u32, seq: u64, payload: &[u8]) -> (Vec<u8>, usize) {
        let mut buf = vec![0u8; 1500];
        let mut w = DatagramWriter::new(&mut buf[..1500 - SEAL_OVERHEAD], GROUP, source).unwrap();
        let h = DataHeader {
            stream: 1.into(),
            sender: sender.into(),
            epoch: 0.into(),
            sequence: seq.into(),
            timestamp: seq.into(),
            message_len: (payload.len() as u32).into(),
            fragment_offset: 0.into(),
        };
        assert!(w.push_data(0, &h, payload));
        assert!(w.push_status(&StatusBody {
            sender: 2.into(),
            window: 64.into(),
            position: 0.into(),
        }));
        let len = w.len();
        (buf, len)
    }

    fn sealed(shield: &mut Shield, source: u32, sender: u32, seq: u64) -> (Vec<u8>, Vec<u8>) {
        let (mut buf, len) = datagram(source, sender, seq, b"hello, group");
        let plain = buf[..len].to_vec();
        let n = shield.seal(&mut buf, len, Lane::Group).unwrap();
        buf.truncate(n);
        (buf, plain)
    }

    #[test]
    fn every_reason_indexes_its_own_counter() {
        for (i, r) in Rejection::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i, "{r:?}");
        }
    }

    #[test]
    fn sealed_datagrams_open_to_the_same_bytes_and_hide_the_payload() {
        let mut a = Shield::new(GROUP, 1, epoch(1, 9, &three()));
        let mut b = Shield::new(GROUP, 2, epoch(1, 9, &three()));
        for seq in 0..100 {
            let (mut s, plain) = sealed(&mut a, 1, 1, seq);
            assert_eq!(s.len(), plain.len() + SEAL_OVERHEAD);
            assert!(
                !s.windows(12).any(|w| w == b"hello, group"),
                "payload in the clear"
            );
            let n = b.open(&mut s).unwrap();
            assert_eq!(&s[..n], &plain[..]);
            assert!(wire::decode_datagram(&s[..n]).is_ok());
        }
        assert_eq!(b.stats().opened, 100);
        assert_eq!(a.stats().sealed, 100);
        assert_eq!(b.stats().rejected_total(), 0);
    }

    #[test]
    fn every_modification_and_truncation_is_rejected_and_counted() {
        let mut a = Shield::new(GROUP, 1, epoch(1, 9, &three()));
        let mut b = Shield::new(GROUP, 2, epoch(1, 9, &three()));
        let (s, _) = sealed(&mut a, 1, 1, 0);
        let mut rejected = 0;
        for bit in 0..s.len() * 8 {
            let mut m = s.clone();
            m[bit / 8] ^= 1 << (bit % 8);
            assert!(b.open(&mut m).is_err(), "bit {bit} flipped and still opened");
            rejected += 1;
        }
        for len in 0..s.len() {
            let mut m = s[..len].to_vec();
            assert!(b.open(&mut m).is_err(), "truncated to {len} and still opened");
            rejected += 1;
        }
        let st = b.stats();
        assert_eq!(st.rejected_total(), rejected);
        assert!(st.rejected(Rejection::BadTag) > 0);
        assert!(st.rejected(Rejection::Malformed) > 0);
        assert!(st.rejected(Rejection::Unsealed) > 0);
        assert!(st.rejected(Rejection::UnknownEpoch) > 0);
        assert!(st.rejected(Rejection::NotMember) > 0);
        // None of it moved the window: the honest datagram still opens.
        let mut honest = s.clone();
        assert!(b.open(&mut honest).is_ok());
    }

    #[test]
    fn replays_are_rejected_and_reordering_within_the_window_is_not() {
        let mut a = Shield::new(GROUP, 1, epoch(1, 9, &three()));
        let mut b = Shield::new(GROUP, 2, epoch(1, 9, &three()));
        let packets: Vec<_> = (0..10).map(|i| sealed(&mut a, 1, 1, i).0).collect();
        for i in (0..10).rev() {
            assert!(b.open(&mut packets[i].clone()).is_ok());
        }
        for p in &packets {
            assert_eq!(b.open(&mut p.clone()), Err(Rejection::Replay));
        }
        assert_eq!(b.stats().rejected(Rejection::Replay), 10);
    }

    #[test]
    fn each_lane_has_its_own_window_and_the_lane_bit_is_authenticated() {
        let mut a = Shield::new(GROUP, 1, epoch(1, 9, &three()));
        let mut b = Shield::new(GROUP, 2, epoch(1, 9, &three()));
        let seal = |a: &mut Shield, lane: Lane| {
            let (mut buf, len) = datagram(1, 1, 0, b"x");
            let n = a.seal(&mut buf, len, lane).unwrap();
            buf.truncate(n);
            buf
        };
        // One datagram to a member, then 2000 to the group: the direct one, opened last, is far
        // behind the group lane's newest but first in its own lane.
        let direct = seal(&mut a, Lane::Direct);
        for _ in 0..2000 {
            assert!(b.open(&mut seal(&mut a, Lane::Group)).is_ok());
        }
        assert!(
            b.open(&mut direct.clone()).is_ok(),
            "cross-lane reordering is not a replay"
        );
        assert_eq!(b.open(&mut direct.clone()), Err(Rejection::Replay));
        // Moving a datagram to the other lane breaks its tag.
        let mut moved = seal(&mut a, Lane::Group);
        let top = moved.len() - 1;
        moved[top] ^= 0x80;
        assert_eq!(b.open(&mut moved), Err(Rejection::BadTag));
    }

    #[test]
    fn outsiders_strangers_and_plain_datagrams_are_refused() {
        let mut b = Shield::new(GROUP, 2, epoch(1, 9, &three()));
        // An outsider who guessed the epoch but not the secret.
        let mut outsider = Shield::new(GROUP, 1, epoch(1, 10, &three()));
        let (mut s, plain) = sealed(&mut outsider, 1, 1, 0);
        assert_eq!(b.open(&mut s), Err(Rejection::BadTag));
        // A member id the epoch does not list, even with the secret.
        let mut stranger = Shield::new(GROUP, 4, epoch(1, 9, &three()));
        let (mut s, _) = sealed(&mut stranger, 4, 4, 0);
        assert_eq!(b.open(&mut s), Err(Rejection::NotMember));
        // A datagram of an engine without the secure layer.
        let mut p = plain.clone();
        p.extend_from_slice(&[0; SEAL_OVERHEAD]);
        assert_eq!(b.open(&mut p), Err(Rejection::Unsealed));
        // Another group's datagram.
        let mut other = Shield::new(GROUP + 1, 1, epoch(1, 9, &three()));
        let (mut buf, len) = datagram(1, 1, 0, b"x");
        buf[4..8].copy_from_slice(&(GROUP + 1).to_le_bytes());
        let n = other.seal(&mut buf, len, Lane::Group).unwrap();
        assert_eq!(b.open(&mut buf[..n]), Err(Rejection::Malformed));
    }

    #[test]
    fn a_subscribe_only_member_cannot_inject_data_but_reports_freely() {
        let mut sub = Shield::new(GROUP, 3, epoch(1, 9, &three()));
        let mut b = Shield::new(GROUP, 2, epoch(1, 9, &three()));
        let (mut s, _) = sealed(&mut sub, 3, 3, 0);
        assert_eq!(b.open(&mut s), Err(Rejection::WrongRole));
        // Its STATUS and NAK frames are what a subscriber must send: they pass.
        let mut buf = vec![0u8; 256];
        let mut w = DatagramWriter::new(&mut buf[..256 - SEAL_OVERHEAD], GROUP, 3).unwrap();
        assert!(w.push_status(&StatusBody {
            sender: 1.into(),
            window: 64.into(),
            position: 5.into(),
        }));
        let len = w.len();
        let n = sub.seal(&mut buf, len, Lane::Group).unwrap();
        assert!(b.open(&mut buf[..n]).is_ok());
        assert_eq!(b.stats().rejected(Rejection::WrongRole), 1);
    }

    fn ident(n: u8) -> intergroup_secure::Identity {
        intergroup_secure::Identity::from_seed(&[n; 32])
    }

    /// Members 1..=3 signing with identities 1..=3; `me` is one of them.
    fn signer(me: u32) -> Shield {
        let roster = (1..=3u8).map(|n| (u32::from(n), ident(n).public()));
        Shield::unkeyed(GROUP, me)
            .unwrap()
            .with_signing(ident(me as u8), roster, 1000)
    }

    /// A datagram from `source` with one membership frame.
    fn membership(source: u32) -> (Vec<u8>, usize) {
        let mut buf = vec![0u8; 600];
        let mut w = DatagramWriter::new(&mut buf[..600 - SIGN_OVERHEAD], GROUP, source).unwrap();
        assert!(w.push_membership(0x10, &[7; 40]));
        let len = w.len();
        (buf, len)
    }

    #[test]
    fn signed_membership_datagrams_open_for_listed_members_only() {
        let mut a = signer(1);
        let mut b = signer(2);
        let (mut buf, len) = membership(1);
        let plain = buf[..len].to_vec();
        let n = a.sign(&mut buf, len).unwrap();
        assert_eq!(n, len + SIGN_OVERHEAD);
        let signed = buf[..n].to_vec();
        let mut copy = signed.clone();
        assert_eq!(b.open(&mut copy), Ok(len));
        assert_eq!(
            copy[..len],
            plain[..],
            "the frames travel in the clear, unchanged"
        );
        // Replayed.
        assert_eq!(b.open(&mut signed.clone()), Err(Rejection::Replay));
        // Every modified byte (header, frames, packet number, signature) is refused.
        for i in 0..n {
            let mut m = signed.clone();
            m[i] ^= 0x20;
            assert!(signer(3).open(&mut m).is_err(), "byte {i} flipped");
        }
        // Truncated.
        assert!(signer(3).open(&mut signed[..n - 1].to_vec()).is_err());
        // An identity the policy does not list, claiming member 1 or as itself.
        let mut outsider =
            Shield::unkeyed(GROUP, 9)
                .unwrap()
                .with_signing(ident(9), [(9, ident(9).public())], 0);
        let (mut buf, len) = membership(1);
        let n = outsider.sign(&mut buf, len).unwrap();
        assert_eq!(signer(3).open(&mut buf[..n].to_vec()), Err(Rejection::BadTag));
        let (mut buf, len) = membership(9);
        let n = outsider.sign(&mut buf, len).unwrap();
        assert_eq!(signer(3).open(&mut buf[..n].to_vec()), Err(Rejection::NotMember));
        // Data never travels signed, even from a listed member.
        let (mut buf, len) = datagram(1, 1, 0, b"data");
        let n = a.sign(&mut buf, len).unwrap();
        assert_eq!(signer(3).open(&mut buf[..n].to_vec()), Err(Rejection::Unsealed));
        // A shield without the signed path refuses signed datagrams.
        let (mut buf, len) = membership(1);
        let n = a.sign(&mut buf, len).unwrap();
        let mut plain_shield = Shield::new(GROUP, 2, epoch(1, 9, &three()));
        assert_eq!(
            plain_shield.open(&mut buf[..n].to_vec()),
            Err(Rejection::Unsealed)
        );
        assert_eq!(b.stats().verified, 1);
    }

    #[test]
    fn an_unkeyed_shield_opens_nothing_sealed_until_an_epoch_is_installed() {
        let mut sender = Shield::new(GROUP, 1, epoch(4, 9, &three()));
        let mut joiner = signer(2);
        let (traffic, _) = sealed(&mut sender, 1, 1, 0);
        assert_eq!(joiner.open(&mut traffic.clone()), Err(Rejection::UnknownEpoch));
        joiner.install(epoch(4, 9, &three()));
        assert!(joiner.open(&mut traffic.clone()).is_ok());
        // A Welcome into another lineage at a lower epoch replaces the keys, and its own
        // packet numbers keep growing (no nonce is used twice).
        let (mut buf, len) = datagram(2, 2, 0, b"x");
        let before = joiner.seal(&mut buf, len, Lane::Group).unwrap();
        let field = u64::from_le_bytes(buf[before - 8..before].try_into().unwrap());
        joiner.install(epoch(2, 10, &three()));
        assert_eq!(joiner.epoch(), 2);
        let (mut buf, len) = datagram(2, 2, 1, b"x");
        let n = joiner.seal(&mut buf, len, Lane::Group).unwrap();
        let after = u64::from_le_bytes(buf[n - 8..n].try_into().unwrap());
        assert!(after > field);
        assert!(Shield::new(GROUP, 1, epoch(2, 10, &three()))
            .open(&mut buf[..n].to_vec())
            .is_ok());
        assert_eq!(joiner.open(&mut traffic.clone()), Err(Rejection::UnknownEpoch));
    }

    #[test]
    fn a_removed_member_cannot_open_the_next_epoch_and_a_joiner_not_the_last() {
        // Epoch 1: members 1, 2, 3. Epoch 2: 3 removed, 4 joined, under a fresh secret.
        let e2 = [(1, true), (2, true), (4, true)];
        let mut a = Shield::new(GROUP, 1, epoch(1, 9, &three()));
        let mut removed = Shield::new(GROUP, 3, epoch(1, 9, &three()));
        let (old_traffic, _) = sealed(&mut a, 1, 1, 0);
        assert!(a.rekey(epoch(2, 11, &e2)));
        assert!(!a.rekey(epoch(2, 12, &e2)), "an epoch is never entered twice");
        let (mut new_traffic, _) = sealed(&mut a, 1, 1, 1);
        // The removed member has only epoch 1's secret.
        assert_eq!(
            removed.open(&mut new_traffic.clone()),
            Err(Rejection::UnknownEpoch)
        );
        // Even claiming epoch 2 with what it has, nothing opens.
        assert!(removed.rekey(epoch(2, 9, &three())));
        assert_eq!(removed.open(&mut new_traffic.clone()), Err(Rejection::BadTag));
        // The joiner has only epoch 2's secret.
        let mut joiner = Shield::new(GROUP, 4, epoch(2, 11, &e2));
        assert_eq!(
            joiner.open(&mut old_traffic.clone()),
            Err(Rejection::UnknownEpoch)
        );
        let mut forced = Shield::new(GROUP, 4, epoch(1, 11, &three()));
        assert_eq!(forced.open(&mut old_traffic.clone()), Err(Rejection::BadTag));
        assert!(joiner.open(&mut new_traffic).is_ok());
        // Member 2 moved too: it opens both epochs' traffic (the previous one while in flight),
        // except the removed member's, which is no longer heard.
        let mut b = Shield::new(GROUP, 2, epoch(1, 9, &three()));
        let mut removed_old = Shield::new(GROUP, 3, epoch(1, 9, &three()));
        let (mut from_removed, _) = sealed(&mut removed_old, 3, 3, 0);
        assert!(b.rekey(epoch(2, 11, &e2)));
        assert!(b.open(&mut old_traffic.clone()).is_ok());
        assert_eq!(b.open(&mut from_removed), Err(Rejection::NotMember));
        // Two epochs on, epoch 1 is gone.
        assert!(b.rekey(epoch(3, 13, &e2)));
        let (mut again, _) = sealed(&mut Shield::new(GROUP, 1, epoch(1, 9, &three())), 1, 1, 5);
        assert_eq!(b.open(&mut again), Err(Rejection::UnknownEpoch));
    }

    #[test]
    fn keys_rotate_before_their_usage_limit_and_receivers_follow() {
        let mut a = Shield::new(GROUP, 1, epoch(1, 9, &three()));
        let mut b = Shield::new(GROUP, 2, epoch(1, 9, &three()));
        a.next_packet = (1 << 32) - 2;
        for i in 0..4 {
            let (mut s, _) = sealed(&mut a, 1, 1, i);
            assert!(
                b.open(&mut s).is_ok(),
                "packet {i} across the generation boundary"
            );
        }
        assert_eq!(a.stats().key_rotations, 1);
        assert_eq!(
            a.send.sealed(),
            2,
            "the new generation's key has sealed only its own"
        );
    }

    proptest! {
        #[test]
        fn random_bytes_never_open_and_never_panic(
            bytes in proptest::collection::vec(any::<u8>(), 0..300),
            sealed_flag in any::<bool>(),
            signed_flag in any::<bool>(),
            source in 0u32..5,
        ) {
            // A keyed shield with the signed path too.
            let mut b = signer(2);
            b.install(epoch(1, 9, &three()));
            let mut m = bytes.clone();
            if m.len() >= DATAGRAM_HEADER_LEN {
                m[..2].copy_from_slice(&wire::MAGIC);
                m[4..8].copy_from_slice(&GROUP.to_le_bytes());
                m[8..12].copy_from_slice(&source.to_le_bytes());
                if sealed_flag { m[3] |= FLAG_SEALED; }
                if signed_flag { m[3] |= FLAG_SIGNED; }
            }
            prop_assert!(b.open(&mut m).is_err());
            prop_assert_eq!(b.stats().rejected_total(), 1);
        }
    }
}
