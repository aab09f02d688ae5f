//! Key agreement of a secured group with membership: every primary view change is exactly one
//! MLS commit, made by the view's coordinator and carried by the view change itself.
//!
//! The view change is the one point every member's delivery stream shares (virtual synchrony:
//! the members that go from one view to the next deliver the same messages before it), so a
//! commit made there is taken by every member at the same place in the group's order, with no
//! competing commit: only the coordinator of a primary view commits. In steps:
//!
//! 1. Each participant answers a proposal with its state and a [`Control::KeyPackage`]: its
//!    MLS key package and the MLS epoch it is in (if any).
//! 2. Once every participant answered, the coordinator of a primary view commits: removals for
//!    the members of its MLS group that are not in the view (crashed, left, partitioned away),
//!    additions for the view's members outside its group or in another epoch (from their key
//!    packages), and a fresh path of its own. The commit and the Welcome go out as one key
//!    message, in [`Control::Keys`] fragments, beside the view change's `COMMIT`.
//! 3. A participant of the new view stages the commit (a member of the coordinator's epoch) or
//!    the Welcome (anyone else) and only then reports its flush done: the coordinator installs
//!    the view only when every participant holds its keys.
//! 4. Installing the view applies the staged commit or Welcome and hands the new epoch to the
//!    data plane ([`GroupMember::poll_rekey`](super::GroupMember::poll_rekey)); a view change
//!    that is abandoned applies nothing. Non-primary views change no keys.
//!
//! Members without the epoch (joiners, members back from a non-primary component) cannot
//! read sealed datagrams, so membership frames travel in signed datagrams
//! ([`crate::shield::Shield::sign`]) except the frequent acknowledging `STATE`s of keyed members.

use super::control::Control;
use crate::shield::ShieldEpoch;
use intergroup_secure::mls::{MlsError, MlsMember, Staged};
use intergroup_secure::{Identity, Policy, PublicKey};
use std::collections::{BTreeMap, VecDeque};

/// "No MLS epoch" in a [`Control::KeyPackage`].
pub const NO_EPOCH: u64 = u64::MAX;
/// The default self-update period: ten minutes.
pub const DEFAULT_UPDATE_PERIOD_NS: u64 = 600_000_000_000;

/// What a member of a secured group with membership needs for key agreement.
#[derive(Debug, Clone)]
pub struct GroupKeys {
    /// The member's identity.
    pub identity: Identity,
    /// The group's signed policy: only the members it lists are added, in their roles.
    pub policy: Policy,
    /// Member ids assigned to keys; a key not listed has [`PublicKey::member_id`] (the
    /// default everywhere). Every member of a group must use the same assignment.
    pub ids: BTreeMap<PublicKey, u32>,
    /// How often this member commits a self-update (fresh leaf and path keys: post-compromise
    /// security, and a full tree so commits stay small); `None`: never on its own. The first
    /// is staggered by member id over one period.
    pub update_period_ns: Option<u64>,
}

impl GroupKeys {
    /// Keys with the default member ids.
    pub fn new(identity: Identity, policy: Policy) -> Self {
        Self {
            identity,
            policy,
            ids: BTreeMap::new(),
            update_period_ns: Some(DEFAULT_UPDATE_PERIOD_NS),
        }
    }

    /// The member id of `key`.
    pub fn id_of(&self, key: &PublicKey) -> u32 {
        id_of(&self.ids, key)
    }

    /// The policy's members as (member id, key), for the shield's signed path.
    pub fn roster(&self) -> Vec<(u32, PublicKey)> {
        roster(&self.ids, &self.policy)
    }
}

fn id_of(ids: &BTreeMap<PublicKey, u32>, key: &PublicKey) -> u32 {
    ids.get(key).copied().unwrap_or_else(|| key.member_id())
}

fn roster(ids: &BTreeMap<PublicKey, u32>, policy: &Policy) -> Vec<(u32, PublicKey)> {
    policy
        .members
        .iter()
        .map(|m| (id_of(ids, &m.key), m.key))
        .collect()
}

/// Counters of the key agreement.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct KeyStats {
    /// MLS commits made as coordinator.
    pub commits_made: u64,
    /// Epochs installed (each a view change, or the Welcome of a join).
    pub epochs_installed: u64,
    /// Of those, by a Welcome.
    pub welcomes_applied: u64,
    /// Key messages that could not be used (malformed, another epoch, refused by the policy).
    pub key_errors: u64,
    /// View changes given up because a key package or commit failed.
    pub commit_failures: u64,
    /// Self-updates this member committed as the delegated committer of a view change.
    pub self_updates: u64,
}

/// A participant's answer: its MLS epoch tag, whether its self-update is due, its key package.
#[derive(Debug, Clone)]
pub(crate) struct Package {
    /// [`MlsMember::epoch_tag`], or [`NO_EPOCH`].
    pub(crate) epoch: u64,
    pub(crate) update: bool,
    pub(crate) package: Vec<u8>,
}

/// What installing a finished proposal applies.
#[derive(Debug)]
enum Ready {
    /// This member's own commit (it coordinated).
    Own,
    /// A staged commit or Welcome.
    Apply(Box<Staged>),
    /// Nothing: the view does not include this member, or is not primary.
    Nothing,
}

/// A key message being reassembled.
#[derive(Debug)]
struct Incoming {
    proposal: u32,
    total: u32,
    chunks: BTreeMap<u32, Vec<u8>>,
}

impl Incoming {
    fn complete(&self) -> Option<Vec<u8>> {
        let mut end = 0u32;
        for (&off, c) in &self.chunks {
            if off > end {
                return None;
            }
            end = end.max(off + c.len() as u32);
        }
        if end != self.total {
            return None;
        }
        let mut out = vec![0u8; self.total as usize];
        for (&off, c) in &self.chunks {
            out[off as usize..off as usize + c.len()].copy_from_slice(c);
        }
        Some(out)
    }
}

/// The coordinator's key message: the MLS epoch it commits from, the commit, the Welcome.
pub(crate) struct KeyMessage {
    pub(crate) from_epoch: u64,
    pub(crate) commit: Vec<u8>,
    pub(crate) welcome: Vec<u8>,
}

impl KeyMessage {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 + self.commit.len() + self.welcome.len());
        out.extend_from_slice(&self.from_epoch.to_le_bytes());
        for part in [&self.commit, &self.welcome] {
            out.extend_from_slice(&(part.len() as u32).to_le_bytes());
            out.extend_from_slice(part);
        }
        out
    }

    pub(crate) fn decode(bytes: &[u8]) -> Option<Self> {
        let from_epoch = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?);
        let mut rest = &bytes[8..];
        let mut part = || -> Option<Vec<u8>> {
            let n = u32::from_le_bytes(rest.get(..4)?.try_into().ok()?) as usize;
            let p = rest.get(4..4 + n)?.to_vec();
            rest = &rest[4 + n..];
            Some(p)
        };
        let commit = part()?;
        let welcome = part()?;
        rest.is_empty().then_some(Self {
            from_epoch,
            commit,
            welcome,
        })
    }
}

/// One member's key agreement state.
pub(crate) struct Keying {
    mls: MlsMember,
    policy: Policy,
    ids: BTreeMap<PublicKey, u32>,
    group: u32,
    /// This member's key package, reused until a Welcome consumes it.
    package: Option<Vec<u8>>,
    incoming: Option<Incoming>,
    /// Per proposal this member holds the keys of.
    ready: BTreeMap<u32, Ready>,
    /// The installed view is primary and this member holds its epoch.
    keyed: bool,
    rekeys: VecDeque<ShieldEpoch>,
    /// The policy version the installed epoch was committed under.
    installed_policy: u64,
    period: Option<u64>,
    /// When this member's next self-update is due (set at its first keyed view).
    next_update: Option<u64>,
    /// This member's own key message of a delegated self-update, per proposal.
    own_message: Option<(u32, Vec<u8>)>,
    pub(crate) stats: KeyStats,
}

impl std::fmt::Debug for Keying {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keying")
            .field("mls", &self.mls)
            .field("keyed", &self.keyed)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl Keying {
    pub(crate) fn new(keys: GroupKeys, group: u32) -> Self {
        Self {
            mls: MlsMember::new(keys.identity),
            policy: keys.policy,
            ids: keys.ids,
            group,
            package: None,
            incoming: None,
            ready: BTreeMap::new(),
            keyed: false,
            rekeys: VecDeque::new(),
            installed_policy: 0,
            period: keys.update_period_ns.filter(|&p| p > 0),
            next_update: None,
            own_message: None,
            stats: KeyStats::default(),
        }
    }

    /// Whether the policy lists member `id`.
    pub(crate) fn listed(&self, id: u32) -> bool {
        self.policy.members.iter().any(|m| self.id_of(&m.key) == id)
    }

    /// Takes a later version of the group's signed policy (checked by the caller): members it
    /// no longer lists are left out of the next view, whose commit removes them, and roles
    /// change with that epoch. Returns the new roster for the shield's signed path.
    pub(crate) fn set_policy(&mut self, policy: Policy) -> Result<Vec<(u32, PublicKey)>, String> {
        if policy.group != self.policy.group {
            return Err(format!(
                "the policy is for group {:?}, not {:?}",
                policy.group, self.policy.group
            ));
        }
        if !policy.supersedes(&self.policy) {
            return Err(format!(
                "policy version {} does not supersede the running version {}",
                policy.version, self.policy.version
            ));
        }
        self.policy = policy;
        Ok(roster(&self.ids, &self.policy))
    }

    /// A later policy came since the installed epoch: the next view change applies it.
    pub(crate) fn policy_pending(&self) -> bool {
        self.keyed && self.policy.version > self.installed_policy
    }

    /// Whether this member's periodic self-update is due at `now`.
    pub(crate) fn update_due(&self, now: u64) -> bool {
        self.keyed && self.next_update.is_some_and(|t| now >= t)
    }

    /// As the delegated committer of `proposal`: commits a self-update (pending until the view
    /// is installed) and returns its key message; the same message again on a repeat.
    pub(crate) fn self_update(&mut self, proposal: u32) -> Option<Vec<u8>> {
        if let Some((p, m)) = &self.own_message {
            if *p == proposal {
                return Some(m.clone());
            }
        }
        let epoch = self.mls.epoch()?;
        let _ = self.mls.discard_pending();
        self.ready.retain(|_, r| !matches!(r, Ready::Own));
        match self.mls.self_update() {
            Ok(c) => {
                self.ready.insert(proposal, Ready::Own);
                let m = KeyMessage {
                    from_epoch: epoch,
                    commit: c.commit,
                    welcome: Vec::new(),
                }
                .encode();
                self.own_message = Some((proposal, m.clone()));
                Some(m)
            }
            Err(_) => {
                self.stats.commit_failures += 1;
                None
            }
        }
    }

    fn id_of(&self, key: &PublicKey) -> u32 {
        id_of(&self.ids, key)
    }

    fn group_id(&self) -> Vec<u8> {
        let mut id = b"intergroup group ".to_vec();
        id.extend_from_slice(&self.group.to_be_bytes());
        id
    }

    /// Whether this member holds the keys of its installed primary view.
    pub(crate) fn keyed(&self) -> bool {
        self.keyed
    }

    /// The MLS epoch this member is in.
    pub(crate) fn mls_epoch(&self) -> Option<u64> {
        self.mls.epoch()
    }

    pub(crate) fn poll_rekey(&mut self) -> Option<ShieldEpoch> {
        self.rekeys.pop_front()
    }

    /// The answer that goes with this member's `FLUSH_STATE` to `proposal`.
    pub(crate) fn key_package(&mut self, proposal: u32, now: u64) -> Option<Control> {
        if self.package.is_none() {
            match self.mls.key_package() {
                Ok(p) => self.package = Some(p),
                Err(_) => {
                    self.stats.key_errors += 1;
                    return None;
                }
            }
        }
        Some(Control::KeyPackage {
            proposal,
            epoch: self.mls.epoch_tag().unwrap_or(NO_EPOCH),
            update: self.update_due(now),
            package: self.package.clone()?,
        })
    }

    /// As coordinator of a primary view with `members` (and this member among them), makes
    /// the one commit of the view change; `packages` are the participants' answers. Returns
    /// the key message, or the members whose key package was missing or refused.
    pub(crate) fn commit(
        &mut self,
        me: u32,
        proposal: u32,
        members: &[u32],
        packages: &BTreeMap<u32, Package>,
    ) -> Result<Vec<u8>, Vec<u32>> {
        // One pending commit at a time: an earlier one (an abandoned round's) is void.
        let _ = self.mls.discard_pending();
        self.own_message = None;
        self.ready
            .retain(|&p, r| p != proposal && !matches!(r, Ready::Own));
        if self.mls.epoch().is_none() {
            // A new group: this coordinator founds the MLS group and adds everyone else.
            if self.mls.create_group(&self.group_id()).is_err() {
                self.stats.commit_failures += 1;
                return Err(Vec::new());
            }
        }
        let epoch = self.mls.epoch().unwrap_or(NO_EPOCH);
        let tag = self.mls.epoch_tag().unwrap_or(NO_EPOCH);
        let in_group: BTreeMap<u32, PublicKey> = self
            .mls
            .members()
            .into_iter()
            .map(|k| (self.id_of(&k), k))
            .collect();
        let mut remove: Vec<PublicKey> = in_group
            .iter()
            .filter(|(id, _)| members.binary_search(id).is_err())
            .map(|(_, k)| *k)
            .collect();
        let mut add = Vec::new();
        let mut missing = Vec::new();
        for &m in members.iter().filter(|&&m| m != me) {
            let current = in_group.contains_key(&m);
            match packages.get(&m) {
                Some(p) if current && p.epoch == tag => {}
                Some(Package { package, .. }) => {
                    // Outside the group, or in another epoch of it: a fresh leaf.
                    if let Some(k) = in_group.get(&m) {
                        remove.push(*k);
                    }
                    add.push((m, package.clone()));
                }
                None if current => {}
                None => missing.push(m),
            }
        }
        if !missing.is_empty() {
            return Err(missing);
        }
        let packages: Vec<Vec<u8>> = add.iter().map(|(_, p)| p.clone()).collect();
        match self.mls.commit(&packages, &remove, &self.policy) {
            Ok(c) => {
                self.stats.commits_made += 1;
                self.ready.insert(proposal, Ready::Own);
                Ok(KeyMessage {
                    from_epoch: epoch,
                    commit: c.commit,
                    welcome: c.welcome.unwrap_or_default(),
                }
                .encode())
            }
            Err(_) => {
                self.stats.commit_failures += 1;
                Err(add.into_iter().map(|(m, _)| m).collect())
            }
        }
    }

    /// The participant that should commit a view change of `members` instead of the
    /// coordinator `me`: the lowest one whose self-update is due, if the view keeps exactly the
    /// MLS group's members, all in this member's epoch (else the coordinator must add or
    /// remove, and its own commit is the one).
    pub(crate) fn delegate(
        &self,
        me: u32,
        members: &[u32],
        packages: &BTreeMap<u32, Package>,
    ) -> Option<u32> {
        let tag = self.mls.epoch_tag()?;
        let mut in_group: Vec<u32> = self.mls.members().iter().map(|k| self.id_of(k)).collect();
        in_group.sort_unstable();
        if in_group != members
            || members
                .iter()
                .any(|m| packages.get(m).is_none_or(|p| p.epoch != tag))
        {
            return None;
        }
        if packages.get(&me).is_some_and(|p| p.update) {
            return None;
        }
        members
            .iter()
            .copied()
            .find(|m| *m != me && packages.get(m).is_some_and(|p| p.update))
    }

    /// A proposal this member need not stage keys for (it is not in the next view, or the
    /// view is not primary).
    pub(crate) fn nothing_to_stage(&mut self, proposal: u32) {
        self.ready.entry(proposal).or_insert(Ready::Nothing);
    }

    /// Whether this member holds what installing `proposal` needs.
    pub(crate) fn is_ready(&self, proposal: u32) -> bool {
        self.ready.contains_key(&proposal)
    }

    /// Takes one fragment of `proposal`'s key message; returns true when the message is
    /// complete and staged (the keys are ready).
    pub(crate) fn on_fragment(&mut self, proposal: u32, total: u32, offset: u32, chunk: Vec<u8>) -> bool {
        if self.ready.contains_key(&proposal) {
            return false;
        }
        let inc = match &mut self.incoming {
            Some(i) if i.proposal == proposal && i.total == total => i,
            _ => self.incoming.insert(Incoming {
                proposal,
                total,
                chunks: BTreeMap::new(),
            }),
        };
        inc.chunks.entry(offset).or_insert(chunk);
        let Some(bytes) = inc.complete() else {
            return false;
        };
        self.incoming = None;
        match self.stage(&bytes) {
            Ok(staged) => {
                self.ready.insert(proposal, Ready::Apply(Box::new(staged)));
                true
            }
            Err(_) => {
                self.stats.key_errors += 1;
                false
            }
        }
    }

    fn stage(&mut self, bytes: &[u8]) -> Result<Staged, MlsError> {
        let msg = KeyMessage::decode(bytes).ok_or_else(|| MlsError::Malformed("key message".into()))?;
        if self.mls.epoch() == Some(msg.from_epoch) && !msg.commit.is_empty() {
            match self.mls.stage(&msg.commit, &self.policy) {
                Ok(s) if !s.removes_self() => return Ok(s),
                // Removed and added again (a fresh leaf): the Welcome is ours.
                Ok(_) | Err(_) => {}
            }
        }
        if msg.welcome.is_empty() {
            return Err(MlsError::Malformed("no welcome for this member".into()));
        }
        // Opening a Welcome uses the key package's private keys up (openmls deletes them),
        // whether or not its view is installed: the next proposal gets a fresh package.
        self.package = None;
        self.mls.stage_welcome(&msg.welcome, &self.policy)
    }

    /// The view of `proposal` is installed: apply its keys. `in_view`: this member is in it;
    /// `primary`: it is primary.
    pub(crate) fn install(&mut self, now: u64, me: u32, proposal: u32, in_view: bool, primary: bool) {
        let ready = self.ready.remove(&proposal);
        self.ready.clear();
        self.incoming = None;
        let delegated = self.own_message.take().is_some_and(|(p, _)| p == proposal);
        if !primary {
            self.keyed = false;
            return;
        }
        if !in_view {
            self.mls.drop_group();
            self.keyed = false;
            return;
        }
        let own = matches!(ready, Some(Ready::Own));
        let result = match ready {
            Some(Ready::Own) => self.mls.merge_pending().map(|_| ()),
            Some(Ready::Apply(s)) => {
                let welcome = s.is_welcome();
                let r = self.mls.apply(*s).map(|_| ());
                if welcome && r.is_ok() {
                    // Its key package is used up.
                    self.package = None;
                    self.stats.welcomes_applied += 1;
                }
                r
            }
            Some(Ready::Nothing) | None => Err(MlsError::NoGroup),
        };
        let Ok(_) = result else {
            self.stats.key_errors += 1;
            self.keyed = false;
            return;
        };
        let ids = &self.ids;
        match ShieldEpoch::from_mls_with_ids(&self.mls, self.group, &self.policy, |k| id_of(ids, k)) {
            Ok(e) => {
                if let Some(period) = self.period {
                    if own || self.next_update.is_none() {
                        // Its own commit refreshed its leaf and path: the next is a period
                        // away (the first one staggered by member id).
                        let stagger = if own { 0 } else { period / 16 * u64::from(me % 16) };
                        self.next_update = Some(now + period + stagger);
                    }
                }
                if delegated && own {
                    self.stats.self_updates += 1;
                }
                self.installed_policy = self.policy.version;
                self.keyed = true;
                self.stats.epochs_installed += 1;
                self.rekeys.push_back(e);
            }
            Err(_) => {
                self.stats.key_errors += 1;
                self.keyed = false;
            }
        }
    }

    /// A proposal this member accepted was superseded without being installed.
    pub(crate) fn forget(&mut self, proposal: u32) {
        if let Some(Ready::Own) = self.ready.remove(&proposal) {
            let _ = self.mls.discard_pending();
            self.own_message = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use intergroup_secure::Role;
    use proptest::prelude::*;

    fn keying() -> Keying {
        let admin = Identity::from_seed(&[9; 32]);
        let me = Identity::from_seed(&[1; 32]);
        let mut policy = Policy::new("g", vec![admin.public()], 0, u64::MAX).unwrap();
        policy
            .add_member("m", me.public(), vec![Role::Publish, Role::Subscribe])
            .unwrap();
        policy.sign(&admin).unwrap();
        Keying::new(GroupKeys::new(me, policy), 7)
    }

    #[test]
    fn key_messages_round_trip_and_every_cut_is_refused() {
        let m = KeyMessage {
            from_epoch: 4,
            commit: vec![1; 30],
            welcome: vec![2; 50],
        }
        .encode();
        let back = KeyMessage::decode(&m).unwrap();
        assert_eq!(
            (back.from_epoch, back.commit.len(), back.welcome.len()),
            (4, 30, 50)
        );
        for n in 0..m.len() {
            assert!(KeyMessage::decode(&m[..n]).is_none(), "cut at {n}");
        }
    }

    proptest! {
        /// Random key messages, whole or in random fragments, never panic, never stage keys,
        /// and are counted.
        #[test]
        fn random_key_messages_are_refused(
            bytes in proptest::collection::vec(any::<u8>(), 1..600),
            cut in 1usize..200,
        ) {
            // Decoding alone must not panic, whatever it makes of the bytes.
            let _ = KeyMessage::decode(&bytes);
            let mut k = keying();
            let total = bytes.len() as u32;
            let mut ready = false;
            for (i, chunk) in bytes.chunks(cut).enumerate() {
                ready |= k.on_fragment(3, total, (i * cut) as u32, chunk.to_vec());
            }
            prop_assert!(!ready);
            prop_assert!(!k.is_ready(3));
            prop_assert_eq!(k.stats.key_errors, 1);
        }
    }
}
