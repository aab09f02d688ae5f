//! Group key agreement with MLS (RFC 9420) through `openmls`.
//!
//! One [`MlsMember`] per member and group. Its MLS credential is a basic credential whose
//! identity is the member's Ed25519 public key, the same key that signs its MLS messages
//! (ciphersuite `MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519`), so a leaf is accepted only if
//! its identity and signature key agree and the group's signed [`Policy`] lists that key: in
//! key packages, in the tree a Welcome carries, and in every leaf a commit adds or updates.
//!
//! Every epoch yields one [`EpochSecret`] through the MLS exporter ([`MlsMember::epoch_secret`]),
//! from which the data plane derives each sender's AES-256-GCM key. A member removed by a
//! commit never learns the next epoch's secret (forward secrecy for the group); a member added
//! by one starts at that commit's epoch and cannot derive earlier ones (backward secrecy); a
//! self-update ([`MlsMember::self_update`]) replaces the member's leaf and path keys
//! (post-compromise security).
//!
//! Handshake messages are MLS public messages: they travel inside the group's sealed datagrams
//! anyway, and commits must be readable by the view coordinator's total order before keys move.

use crate::aead::EpochSecret;
use crate::identity::{Identity, PublicKey};
use crate::policy::Policy;
use openmls::prelude::tls_codec::{Deserialize as _, Serialize as _};
use openmls::prelude::*;
use openmls_rust_crypto::OpenMlsRustCrypto;
use openmls_traits::signatures::{Signer, SignerError};

/// The one ciphersuite: X25519, AES-128-GCM for MLS's own encryption, SHA-256, Ed25519.
pub const CIPHERSUITE: Ciphersuite = Ciphersuite::MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519;
/// Exporter label of the data-plane epoch secret.
const EXPORTER_LABEL: &str = "intergroup data plane";

/// Errors of the MLS layer. The messages name what failed, never key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MlsError {
    /// `openmls` refused an operation or a message.
    #[error("MLS: {0}")]
    Mls(String),
    /// Bytes that do not decode as the expected MLS message.
    #[error("malformed MLS message: {0}")]
    Malformed(String),
    /// A leaf whose identity is not a member of the policy, or whose identity and signature
    /// key differ.
    #[error("credential refused: {0}")]
    Credential(String),
    /// The operation needs a group and this member has none (yet, or any more).
    #[error("not in a group")]
    NoGroup,
    /// A commit for another epoch than this member's (stale or from the future).
    #[error("commit for epoch {got}, this member is in epoch {have}")]
    WrongEpoch {
        /// The commit's epoch.
        got: u64,
        /// This member's epoch.
        have: u64,
    },
}

fn mls<E: std::fmt::Debug>(e: E) -> MlsError {
    MlsError::Mls(format!("{e:?}"))
}

/// Signs MLS messages with the member's Ed25519 identity.
struct IdentitySigner(Identity);

impl Signer for IdentitySigner {
    fn sign(&self, payload: &[u8]) -> Result<Vec<u8>, SignerError> {
        Ok(self.0.sign(payload).to_vec())
    }

    fn signature_scheme(&self) -> SignatureScheme {
        SignatureScheme::ED25519
    }
}

/// What processing a commit did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitEffect {
    /// The epoch the group is in now.
    pub epoch: u64,
    /// Members the commit added.
    pub added: Vec<PublicKey>,
    /// Members the commit removed.
    pub removed: Vec<PublicKey>,
    /// This member was removed: it has no group any more.
    pub removed_self: bool,
}

/// A commit this member made, not yet merged: send `commit` to the group (and `welcome` to
/// the members it adds), then [`MlsMember::merge_pending`] once the group's order delivers it.
#[derive(Debug, Clone)]
pub struct Commit {
    /// The commit, for every current member.
    pub commit: Vec<u8>,
    /// The Welcome (with the ratchet tree), for the members it adds.
    pub welcome: Option<Vec<u8>>,
    /// The epoch the commit moves to.
    pub epoch: u64,
}

/// A commit or Welcome checked and ready to take effect ([`MlsMember::apply`]), held while
/// the view change it belongs to completes. Dropping it changes nothing.
pub struct Staged(StagedKind);

enum StagedKind {
    Commit(Box<StagedCommit>, CommitEffect),
    Welcome(Box<StagedWelcome>, Vec<PublicKey>),
}

impl Staged {
    /// Whether it is a Welcome (else a commit).
    pub fn is_welcome(&self) -> bool {
        matches!(self.0, StagedKind::Welcome(..))
    }

    /// Whether it is a commit that removes this member.
    pub fn removes_self(&self) -> bool {
        matches!(&self.0, StagedKind::Commit(_, e) if e.removed_self)
    }

    /// The epoch applying it leads to (for a Welcome: the group's current epoch).
    pub fn epoch(&self) -> u64 {
        match &self.0 {
            StagedKind::Commit(_, e) => e.epoch,
            StagedKind::Welcome(w, _) => w.group_context().epoch().as_u64(),
        }
    }
}

impl std::fmt::Debug for Staged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.0 {
            StagedKind::Commit(..) => "commit",
            StagedKind::Welcome(..) => "welcome",
        };
        f.debug_struct("Staged")
            .field("kind", &kind)
            .field("epoch", &self.epoch())
            .finish()
    }
}

/// One member's MLS state for one group.
pub struct MlsMember {
    provider: OpenMlsRustCrypto,
    signer: IdentitySigner,
    public: PublicKey,
    credential: CredentialWithKey,
    group: Option<MlsGroup>,
}

impl std::fmt::Debug for MlsMember {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MlsMember")
            .field("public", &self.public)
            .field("epoch", &self.epoch())
            .finish_non_exhaustive()
    }
}

fn join_config() -> MlsGroupJoinConfig {
    MlsGroupJoinConfig::builder()
        .wire_format_policy(PURE_PLAINTEXT_WIRE_FORMAT_POLICY)
        .use_ratchet_tree_extension(true)
        .build()
}

/// The member key a leaf stands for, if its credential is well formed and the policy lists it.
fn check_leaf(credential: &Credential, signature_key: &[u8], policy: &Policy) -> Result<PublicKey, MlsError> {
    let basic = BasicCredential::try_from(credential.clone())
        .map_err(|_| MlsError::Credential("not a basic credential".into()))?;
    let identity: [u8; 32] = basic
        .identity()
        .try_into()
        .map_err(|_| MlsError::Credential("identity is not an Ed25519 public key".into()))?;
    if identity != signature_key {
        return Err(MlsError::Credential("identity and signature key differ".into()));
    }
    let key = PublicKey(identity);
    if !policy.members.iter().any(|m| m.key == key) {
        return Err(MlsError::Credential(format!(
            "{key} is not a member of the policy"
        )));
    }
    Ok(key)
}

fn member_key(m: &Member) -> Option<PublicKey> {
    let basic = BasicCredential::try_from(m.credential.clone()).ok()?;
    Some(PublicKey(basic.identity().try_into().ok()?))
}

impl MlsMember {
    /// The MLS side of `identity`, with no group yet.
    pub fn new(identity: Identity) -> Self {
        let public = identity.public();
        let credential = CredentialWithKey {
            credential: BasicCredential::new(public.0.to_vec()).into(),
            signature_key: public.0.to_vec().into(),
        };
        Self {
            provider: OpenMlsRustCrypto::default(),
            signer: IdentitySigner(identity),
            public,
            credential,
            group: None,
        }
    }

    /// This member's public key.
    pub fn public(&self) -> PublicKey {
        self.public
    }

    /// The group's epoch, if in a group.
    pub fn epoch(&self) -> Option<u64> {
        self.group.as_ref().map(|g| g.epoch().as_u64())
    }

    /// The group's members, in leaf order.
    pub fn members(&self) -> Vec<PublicKey> {
        self.group
            .as_ref()
            .map(|g| g.members().filter_map(|m| member_key(&m)).collect())
            .unwrap_or_default()
    }

    /// A fresh key package (serialized), to be given to whoever adds this member. Its private
    /// keys stay with this member until a Welcome uses them.
    pub fn key_package(&self) -> Result<Vec<u8>, MlsError> {
        let bundle = KeyPackage::builder()
            .build(CIPHERSUITE, &self.provider, &self.signer, self.credential.clone())
            .map_err(mls)?;
        MlsMessageOut::from(bundle.key_package().clone())
            .tls_serialize_detached()
            .map_err(mls)
    }

    /// Starts a group with this member alone in it (epoch 0), named `group_id`.
    pub fn create_group(&mut self, group_id: &[u8]) -> Result<(), MlsError> {
        let config = MlsGroupCreateConfig::builder()
            .ciphersuite(CIPHERSUITE)
            .wire_format_policy(PURE_PLAINTEXT_WIRE_FORMAT_POLICY)
            .use_ratchet_tree_extension(true)
            .build();
        let group = MlsGroup::new_with_group_id(
            &self.provider,
            &self.signer,
            &config,
            GroupId::from_slice(group_id),
            self.credential.clone(),
        )
        .map_err(mls)?;
        self.group = Some(group);
        Ok(())
    }

    /// One commit that removes `remove` and adds the members of `add` (serialized key
    /// packages), with a path: the committer's keys are fresh too. Every added key package must
    /// carry a credential the policy lists. Pending until [`MlsMember::merge_pending`].
    pub fn commit(
        &mut self,
        add: &[Vec<u8>],
        remove: &[PublicKey],
        policy: &Policy,
    ) -> Result<Commit, MlsError> {
        let mut packages = Vec::with_capacity(add.len());
        for bytes in add {
            let msg = MlsMessageIn::tls_deserialize_exact(bytes)
                .map_err(|e| MlsError::Malformed(format!("{e:?}")))?;
            let MlsMessageBodyIn::KeyPackage(kp) = msg.extract() else {
                return Err(MlsError::Malformed("not a key package".into()));
            };
            let kp = kp
                .validate(self.provider.crypto(), ProtocolVersion::Mls10)
                .map_err(|e| MlsError::Credential(format!("key package: {e:?}")))?;
            check_leaf(
                kp.leaf_node().credential(),
                kp.leaf_node().signature_key().as_slice(),
                policy,
            )?;
            packages.push(kp);
        }
        let provider = &self.provider;
        let signer = &self.signer;
        let group = self.group.as_mut().ok_or(MlsError::NoGroup)?;
        let removed: Vec<LeafNodeIndex> = group
            .members()
            .filter(|m| member_key(m).is_some_and(|k| remove.contains(&k)))
            .map(|m| m.index)
            .collect();
        let bundle = group
            .commit_builder()
            .propose_adds(packages)
            .propose_removals(removed)
            .force_self_update(true)
            .load_psks(provider.storage())
            .map_err(mls)?
            .build(provider.rand(), provider.crypto(), signer, |_| true)
            .map_err(mls)?
            .stage_commit(provider)
            .map_err(mls)?;
        let (commit, welcome, _) = bundle.into_messages();
        Ok(Commit {
            commit: commit.tls_serialize_detached().map_err(mls)?,
            welcome: welcome
                .map(|w| w.tls_serialize_detached())
                .transpose()
                .map_err(mls)?,
            epoch: group.epoch().as_u64() + 1,
        })
    }

    /// A commit that only refreshes this member's leaf and path keys (post-compromise
    /// security; also keeps the tree full, so later commits stay O(log n)).
    pub fn self_update(&mut self) -> Result<Commit, MlsError> {
        let provider = &self.provider;
        let signer = &self.signer;
        let group = self.group.as_mut().ok_or(MlsError::NoGroup)?;
        let bundle = group
            .self_update(provider, signer, LeafNodeParameters::default())
            .map_err(mls)?;
        let (commit, _, _) = bundle.into_messages();
        Ok(Commit {
            commit: commit.tls_serialize_detached().map_err(mls)?,
            welcome: None,
            epoch: group.epoch().as_u64() + 1,
        })
    }

    /// Moves to the epoch of this member's own pending commit (the group's order delivered it).
    pub fn merge_pending(&mut self) -> Result<u64, MlsError> {
        let provider = &self.provider;
        let group = self.group.as_mut().ok_or(MlsError::NoGroup)?;
        group.merge_pending_commit(provider).map_err(mls)?;
        Ok(group.epoch().as_u64())
    }

    /// Drops this member's pending commit (another commit won the epoch).
    pub fn discard_pending(&mut self) -> Result<(), MlsError> {
        let provider = &self.provider;
        let group = self.group.as_mut().ok_or(MlsError::NoGroup)?;
        group.clear_pending_commit(provider.storage()).map_err(mls)
    }

    /// Joins the group a Welcome (made for one of this member's key packages) describes. Every
    /// member of its tree must be in the policy.
    pub fn join(&mut self, welcome: &[u8], policy: &Policy) -> Result<u64, MlsError> {
        let staged = self.stage_welcome(welcome, policy)?;
        Ok(self.apply(staged)?.epoch)
    }

    /// Processes another member's commit: checks every leaf it adds or changes against the
    /// policy, then moves to its epoch. A commit for another epoch is refused (the group's
    /// total order makes the first commit of an epoch the one every member takes).
    pub fn process(&mut self, message: &[u8], policy: &Policy) -> Result<CommitEffect, MlsError> {
        let staged = self.stage(message, policy)?;
        self.apply(staged)
    }

    /// Checks a Welcome as [`MlsMember::join`] does, without joining yet: the group is entered
    /// by [`MlsMember::apply`] (when the view it belongs to is installed), or never if the
    /// result is dropped.
    pub fn stage_welcome(&mut self, welcome: &[u8], policy: &Policy) -> Result<Staged, MlsError> {
        let msg = MlsMessageIn::tls_deserialize_exact(welcome)
            .map_err(|e| MlsError::Malformed(format!("{e:?}")))?;
        let MlsMessageBodyIn::Welcome(welcome) = msg.extract() else {
            return Err(MlsError::Malformed("not a welcome".into()));
        };
        let staged =
            StagedWelcome::new_from_welcome(&self.provider, &join_config(), welcome, None).map_err(mls)?;
        let mut added = Vec::new();
        for m in staged.members() {
            added.push(check_leaf(&m.credential, &m.signature_key, policy)?);
        }
        Ok(Staged(StagedKind::Welcome(Box::new(staged), added)))
    }

    /// Checks another member's commit as [`MlsMember::process`] does, without moving to its
    /// epoch yet: [`MlsMember::apply`] does (when the view it belongs to is installed); a
    /// dropped result changes nothing.
    pub fn stage(&mut self, message: &[u8], policy: &Policy) -> Result<Staged, MlsError> {
        let msg = MlsMessageIn::tls_deserialize_exact(message)
            .map_err(|e| MlsError::Malformed(format!("{e:?}")))?;
        let protocol = msg
            .try_into_protocol_message()
            .map_err(|e| MlsError::Malformed(format!("{e:?}")))?;
        let provider = &self.provider;
        let group = self.group.as_mut().ok_or(MlsError::NoGroup)?;
        let have = group.epoch().as_u64();
        let got = protocol.epoch().as_u64();
        if got != have {
            return Err(MlsError::WrongEpoch { got, have });
        }
        let before: Vec<(LeafNodeIndex, Option<PublicKey>)> =
            group.members().map(|m| (m.index, member_key(&m))).collect();
        let processed = group.process_message(provider, protocol).map_err(mls)?;
        let ProcessedMessageContent::StagedCommitMessage(staged) = processed.into_content() else {
            return Err(MlsError::Malformed("not a commit".into()));
        };
        let mut added = Vec::new();
        for p in staged.add_proposals() {
            let leaf = p.add_proposal().key_package().leaf_node();
            added.push(check_leaf(
                leaf.credential(),
                leaf.signature_key().as_slice(),
                policy,
            )?);
        }
        for p in staged.update_proposals() {
            let leaf = p.update_proposal().leaf_node();
            check_leaf(leaf.credential(), leaf.signature_key().as_slice(), policy)?;
        }
        if let Some(leaf) = staged.update_path_leaf_node() {
            check_leaf(leaf.credential(), leaf.signature_key().as_slice(), policy)?;
        }
        let removed = staged
            .remove_proposals()
            .filter_map(|p| {
                let i = p.remove_proposal().removed();
                before.iter().find(|(j, _)| *j == i).and_then(|(_, k)| *k)
            })
            .collect();
        let effect = CommitEffect {
            epoch: have + 1,
            added,
            removed,
            removed_self: staged.self_removed(),
        };
        Ok(Staged(StagedKind::Commit(staged, effect)))
    }

    /// Moves to the epoch a staged commit or Welcome leads to. A staged commit applies only to
    /// the epoch it was staged in.
    pub fn apply(&mut self, staged: Staged) -> Result<CommitEffect, MlsError> {
        match staged.0 {
            StagedKind::Commit(commit, effect) => {
                let provider = &self.provider;
                let group = self.group.as_mut().ok_or(MlsError::NoGroup)?;
                let have = group.epoch().as_u64();
                if have + 1 != effect.epoch {
                    return Err(MlsError::WrongEpoch {
                        got: effect.epoch - 1,
                        have,
                    });
                }
                group.merge_staged_commit(provider, *commit).map_err(mls)?;
                if effect.removed_self {
                    self.group = None;
                }
                Ok(effect)
            }
            StagedKind::Welcome(welcome, added) => {
                let group = welcome.into_group(&self.provider).map_err(mls)?;
                let epoch = group.epoch().as_u64();
                self.group = Some(group);
                Ok(CommitEffect {
                    epoch,
                    added,
                    removed: Vec::new(),
                    removed_self: false,
                })
            }
        }
    }

    /// Leaves the group locally (this member was removed, or gives its state up to be welcomed
    /// into another lineage).
    pub fn drop_group(&mut self) {
        self.group = None;
    }

    /// A public 64-bit tag of the current epoch, from the exporter: two members with the same
    /// tag are in the same epoch of the same group (epoch numbers alone do not tell two groups
    /// apart). Never `u64::MAX`.
    pub fn epoch_tag(&self) -> Option<u64> {
        let group = self.group.as_ref()?;
        let bytes = group
            .export_secret(self.provider.crypto(), "intergroup epoch tag", b"", 8)
            .ok()?;
        let tag = u64::from_le_bytes(bytes.as_slice().try_into().ok()?);
        Some(tag.min(u64::MAX - 1))
    }

    /// The data plane's secret for the current epoch, bound to `context` (the group's id).
    pub fn epoch_secret(&self, context: &[u8]) -> Result<EpochSecret, MlsError> {
        let group = self.group.as_ref().ok_or(MlsError::NoGroup)?;
        let mut bytes = group
            .export_secret(self.provider.crypto(), EXPORTER_LABEL, context, 32)
            .map_err(mls)?;
        let mut secret = [0u8; 32];
        secret.copy_from_slice(&bytes);
        zeroize::Zeroize::zeroize(&mut bytes[..]);
        Ok(EpochSecret::from_bytes(secret))
    }
}
