//! The simulator's adversary for secured runs: it hears every datagram on the segment and, with
//! a set probability per datagram, injects one attack derived from it. Every kind of attack the
//! Secure Group Layer must withstand is drawn in turn: a replay of an earlier datagram, a
//! modified copy (one bit flipped), a truncated copy, random bytes behind a plausible header, an
//! outsider sealing without the group's secret, a member id the epoch does not list, a
//! subscribe-only member publishing, a datagram of an epoch nobody has, and one not sealed.

use super::member_id;
use crate::shield::{Lane, Shield, ShieldEpoch, FLAG_SEALED, SEAL_OVERHEAD};
use crate::wire::{DataHeader, DatagramWriter, DATAGRAM_HEADER_LEN, MAGIC, VERSION};
use intergroup_secure::EpochSecret;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::rc::Rc;

/// The group's secret in secured simulations (fixed: the adversary is not given it).
pub(crate) const GROUP_SECRET: [u8; 32] = [0x42; 32];
const OUTSIDER_SECRET: [u8; 32] = [0x66; 32];
/// The one epoch of a secured simulation.
pub(crate) const EPOCH: u32 = 1;
/// Kinds of attack, drawn in turn.
const KINDS: u64 = 9;
const RECENT: usize = 64;

/// The epoch every member of a secured run shares: senders publish, the rest only subscribe.
pub(crate) fn epoch(members: usize, senders: usize) -> ShieldEpoch {
    ShieldEpoch {
        epoch: EPOCH,
        secret: EpochSecret::from_bytes(GROUP_SECRET),
        members: (0..members).map(|i| (member_id(i), i < senders)).collect(),
    }
}

/// The adversary.
#[derive(Debug)]
pub(crate) struct Attacker {
    rng: ChaCha8Rng,
    probability: f64,
    group: u32,
    /// Seals with a secret of its own, claiming to be member 1.
    outsider: Shield,
    /// Holds the group's secret under an id the epoch does not list.
    stranger: Shield,
    /// A subscribe-only member that publishes anyway (absent when every member sends).
    subscriber: Option<Shield>,
    /// Seals in an epoch nobody is in.
    future: Shield,
    /// Recent sealed datagrams, to replay.
    recent: Vec<Rc<[u8]>>,
    next_kind: u64,
    /// Attacks injected.
    pub(crate) injected: u64,
}

impl Attacker {
    pub(crate) fn new(seed: u64, probability: f64, group: u32, members: usize, senders: usize) -> Self {
        let e = epoch(members, senders);
        let mut outsider = Shield::new(
            group,
            member_id(0),
            ShieldEpoch {
                secret: EpochSecret::from_bytes(OUTSIDER_SECRET),
                ..e.clone()
            },
        );
        // Ahead of anything member 1 sends, so the replay window lets it through to the tag.
        outsider.skip_to_packet(1 << 40);
        let stranger_id = member_id(members + 7);
        let mut stranger_epoch = e.clone();
        stranger_epoch.members.push((stranger_id, true));
        let subscriber = (senders < members).then(|| Shield::new(group, member_id(members - 1), e.clone()));
        let future = Shield::new(
            group,
            member_id(0),
            ShieldEpoch {
                epoch: EPOCH + 5,
                ..e
            },
        );
        Self {
            rng: ChaCha8Rng::seed_from_u64(seed ^ 0xa77a_c4e5),
            probability,
            group,
            outsider,
            stranger: Shield::new(group, stranger_id, stranger_epoch),
            subscriber,
            future,
            recent: Vec::with_capacity(RECENT),
            next_kind: 0,
            injected: 0,
        }
    }

    /// Sees one datagram go out (`plain` before sealing, `sealed` as sent); maybe returns an
    /// attack to put on the wire beside it.
    pub(crate) fn observe(&mut self, plain: &[u8], sealed: &Rc<[u8]>) -> Option<Vec<u8>> {
        if self.recent.len() < RECENT {
            self.recent.push(sealed.clone());
        } else {
            let i = self.rng.random_range(0..RECENT);
            self.recent[i] = sealed.clone();
        }
        if !self.rng.random_bool(self.probability) {
            return None;
        }
        let kind = self.next_kind % KINDS;
        self.next_kind += 1;
        let attack = match kind {
            0 => {
                let i = self.rng.random_range(0..self.recent.len());
                self.recent[i].to_vec()
            }
            1 => {
                let mut m = sealed.to_vec();
                let bit = self.rng.random_range(0..m.len() * 8);
                m[bit / 8] ^= 1 << (bit % 8);
                m
            }
            2 => {
                let len = self.rng.random_range(0..sealed.len());
                sealed[..len].to_vec()
            }
            3 => {
                let len = self
                    .rng
                    .random_range(DATAGRAM_HEADER_LEN + SEAL_OVERHEAD..sealed.len().max(60) + 1);
                let mut m: Vec<u8> = (0..len).map(|_| self.rng.random()).collect();
                m[..2].copy_from_slice(&MAGIC);
                m[2] = VERSION;
                m[3] = FLAG_SEALED;
                m[4..8].copy_from_slice(&self.group.to_le_bytes());
                m
            }
            4 => seal_copy(&mut self.outsider, plain),
            5 => seal_copy(&mut self.stranger, plain),
            6 => match self.subscriber.as_mut() {
                Some(s) => publish_as(s, self.group),
                None => seal_copy(&mut self.future, plain),
            },
            7 => seal_copy(&mut self.future, plain),
            // The datagram in the clear, as an engine without the secure layer sends it.
            _ => plain.to_vec(),
        };
        self.injected += 1;
        Some(attack)
    }
}

/// `plain` sealed by `shield` (with the shield's member id as the source).
fn seal_copy(shield: &mut Shield, plain: &[u8]) -> Vec<u8> {
    let mut buf = vec![0u8; plain.len() + SEAL_OVERHEAD];
    buf[..plain.len()].copy_from_slice(plain);
    buf[8..12].copy_from_slice(&source_of(shield).to_le_bytes());
    let n = shield.seal(&mut buf, plain.len(), Lane::Group).unwrap_or(0);
    buf.truncate(n);
    buf
}

fn source_of(shield: &Shield) -> u32 {
    shield.member_id()
}

/// A DATA frame from the shield's own member, properly sealed: only its role is wrong.
fn publish_as(shield: &mut Shield, group: u32) -> Vec<u8> {
    let me = source_of(shield);
    let mut buf = vec![0u8; 256];
    let Some(mut w) = DatagramWriter::new(&mut buf[..256 - SEAL_OVERHEAD], group, me) else {
        return Vec::new();
    };
    let header = DataHeader {
        stream: 1.into(),
        sender: me.into(),
        epoch: 0.into(),
        sequence: 0.into(),
        timestamp: 0.into(),
        message_len: 16.into(),
        fragment_offset: 0.into(),
    };
    w.push_data(0, &header, &[0xee; 16]);
    let len = w.len();
    let n = shield.seal(&mut buf, len, Lane::Group).unwrap_or(0);
    buf.truncate(n);
    buf
}
