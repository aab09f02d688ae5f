//! Signed group policies: who may join a group, in which roles, for how long.
//!
//! A policy is a TOML file naming the group, its admins' public keys, its members' public keys
//! with roles, and a validity period, signed by one of its admins over a canonical encoding of
//! everything but the signature. Any change (`add_member`, `remove_member`) raises the version
//! and drops the signature; a later version of a signed policy replaces an earlier one.

use crate::identity::{Identity, PublicKey};
use std::path::Path;

/// What a member may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Send data.
    Publish,
    /// Receive data.
    Subscribe,
    /// Change membership at run time (the group's admins sign policies).
    Admin,
}

impl Role {
    fn bit(self) -> u8 {
        match self {
            Role::Publish => 1,
            Role::Subscribe => 2,
            Role::Admin => 4,
        }
    }
}

impl std::str::FromStr for Role {
    type Err = PolicyError;

    fn from_str(s: &str) -> Result<Self, PolicyError> {
        match s.trim() {
            "publish" => Ok(Role::Publish),
            "subscribe" => Ok(Role::Subscribe),
            "admin" => Ok(Role::Admin),
            other => Err(PolicyError::Invalid(format!(
                "unknown role {other:?}: expected publish, subscribe or admin"
            ))),
        }
    }
}

/// One member of a policy.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Member {
    /// A name for people; not checked.
    #[serde(default)]
    pub name: String,
    /// The member's public key.
    pub key: PublicKey,
    /// What it may do.
    pub roles: Vec<Role>,
}

/// An admin's signature over the policy.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySignature {
    /// The admin who signed.
    pub signer: PublicKey,
    /// The Ed25519 signature, 128 hex digits.
    pub value: String,
}

/// A group policy.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// The group's name.
    pub group: String,
    /// Raised by every change; a higher version replaces a lower one.
    pub version: u64,
    /// Valid from this Unix time (seconds).
    pub not_before: u64,
    /// Valid until this Unix time (seconds).
    pub not_after: u64,
    /// Keys that may sign this policy.
    pub admins: Vec<PublicKey>,
    /// The members.
    #[serde(default)]
    pub members: Vec<Member>,
    /// The signature, once signed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<PolicySignature>,
}

/// Why a policy is refused; messages name the file and, for syntax errors, the line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// The file could not be read or written.
    #[error("{0}")]
    Io(String),
    /// The file is not valid policy TOML.
    #[error("{0}")]
    Syntax(String),
    /// The content is inconsistent.
    #[error("invalid policy: {0}")]
    Invalid(String),
    /// Nobody signed it.
    #[error("the policy is not signed")]
    Unsigned,
    /// The signer is not one of the policy's admins.
    #[error("signed by {0}, which is not an admin of this policy")]
    NotAnAdmin(PublicKey),
    /// The signature does not match the content.
    #[error("the signature does not match the policy (changed after signing, or forged)")]
    BadSignature,
    /// Not valid yet.
    #[error("the policy is not valid before {not_before} (now {now})")]
    NotYetValid {
        /// Start of validity.
        not_before: u64,
        /// The time checked.
        now: u64,
    },
    /// No longer valid.
    #[error("the policy expired at {not_after} (now {now})")]
    Expired {
        /// End of validity.
        not_after: u64,
        /// The time checked.
        now: u64,
    },
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_be_bytes());
    out.extend_from_slice(b);
}

impl Policy {
    /// A new, unsigned policy for `group` with `admins`, valid from `not_before` to `not_after`.
    pub fn new(
        group: &str,
        admins: Vec<PublicKey>,
        not_before: u64,
        not_after: u64,
    ) -> Result<Self, PolicyError> {
        let p = Self {
            group: group.to_string(),
            version: 1,
            not_before,
            not_after,
            admins,
            members: Vec::new(),
            signature: None,
        };
        p.check()?;
        Ok(p)
    }

    /// Checks the content (not the signature or the time).
    pub fn check(&self) -> Result<(), PolicyError> {
        let bad = |m: String| Err(PolicyError::Invalid(m));
        if self.group.is_empty() {
            return bad("the group name is empty".into());
        }
        if self.admins.is_empty() {
            return bad("a policy needs at least one admin key".into());
        }
        if self.not_after <= self.not_before {
            return bad(format!(
                "not_after ({}) must be later than not_before ({})",
                self.not_after, self.not_before
            ));
        }
        let mut keys: Vec<_> = self.members.iter().map(|m| m.key).collect();
        keys.sort();
        if let Some(w) = keys.windows(2).find(|w| w[0] == w[1]) {
            return bad(format!("member {} is listed twice", w[0]));
        }
        if let Some(m) = self.members.iter().find(|m| m.roles.is_empty()) {
            return bad(format!("member {} has no role", m.key));
        }
        Ok(())
    }

    /// The canonical bytes a signature covers: every field but the signature, members and
    /// admins in key order, roles as a set.
    pub fn signing_bytes(&self) -> Vec<u8> {
        let mut out = b"intergroup policy v1\n".to_vec();
        put_bytes(&mut out, self.group.as_bytes());
        out.extend_from_slice(&self.version.to_be_bytes());
        out.extend_from_slice(&self.not_before.to_be_bytes());
        out.extend_from_slice(&self.not_after.to_be_bytes());
        let mut admins = self.admins.clone();
        admins.sort();
        admins.dedup();
        out.extend_from_slice(&(admins.len() as u32).to_be_bytes());
        for a in &admins {
            out.extend_from_slice(&a.0);
        }
        let mut members: Vec<&Member> = self.members.iter().collect();
        members.sort_by_key(|m| m.key);
        out.extend_from_slice(&(members.len() as u32).to_be_bytes());
        for m in members {
            out.extend_from_slice(&m.key.0);
            out.push(m.roles.iter().fold(0, |bits, r| bits | r.bit()));
            put_bytes(&mut out, m.name.as_bytes());
        }
        out
    }

    /// Signs the policy as `admin`, who must be one of its admins.
    pub fn sign(&mut self, admin: &Identity) -> Result<(), PolicyError> {
        self.check()?;
        let signer = admin.public();
        if !self.admins.contains(&signer) {
            return Err(PolicyError::NotAnAdmin(signer));
        }
        self.signature = Some(PolicySignature {
            signer,
            value: hex::encode(admin.sign(&self.signing_bytes())),
        });
        Ok(())
    }

    /// Checks content, signature, signer and validity at `now` (Unix seconds).
    pub fn verify(&self, now: u64) -> Result<(), PolicyError> {
        self.check()?;
        let sig = self.signature.as_ref().ok_or(PolicyError::Unsigned)?;
        if !self.admins.contains(&sig.signer) {
            return Err(PolicyError::NotAnAdmin(sig.signer));
        }
        let mut bytes = [0u8; 64];
        hex::decode_to_slice(sig.value.trim(), &mut bytes).map_err(|_| PolicyError::BadSignature)?;
        if !sig.signer.verify(&self.signing_bytes(), &bytes) {
            return Err(PolicyError::BadSignature);
        }
        if now < self.not_before {
            return Err(PolicyError::NotYetValid {
                not_before: self.not_before,
                now,
            });
        }
        if now > self.not_after {
            return Err(PolicyError::Expired {
                not_after: self.not_after,
                now,
            });
        }
        Ok(())
    }

    /// Adds `key` with `roles` (or replaces its entry); raises the version and drops the
    /// signature.
    pub fn add_member(&mut self, name: &str, key: PublicKey, roles: Vec<Role>) -> Result<(), PolicyError> {
        if roles.is_empty() {
            return Err(PolicyError::Invalid(format!(
                "member {key} needs at least one role"
            )));
        }
        let mut roles = roles;
        roles.sort();
        roles.dedup();
        self.members.retain(|m| m.key != key);
        self.members.push(Member {
            name: name.to_string(),
            key,
            roles,
        });
        self.changed();
        Ok(())
    }

    /// Removes `key`; returns whether it was a member. Raises the version and drops the
    /// signature when it was.
    pub fn remove_member(&mut self, key: &PublicKey) -> bool {
        let before = self.members.len();
        self.members.retain(|m| m.key != *key);
        let removed = self.members.len() != before;
        if removed {
            self.changed();
        }
        removed
    }

    fn changed(&mut self) {
        self.version += 1;
        self.signature = None;
    }

    /// Every member as an engine member id ([`PublicKey::member_id`]) with its key and roles,
    /// refusing a policy in which two members' ids collide.
    pub fn roster(&self) -> Result<Vec<(u32, &Member)>, PolicyError> {
        let mut out: Vec<(u32, &Member)> = self.members.iter().map(|m| (m.key.member_id(), m)).collect();
        out.sort_by_key(|(id, _)| *id);
        if let Some(w) = out.windows(2).find(|w| w[0].0 == w[1].0) {
            return Err(PolicyError::Invalid(format!(
                "members {} and {} have the same member id {}: replace one key",
                w[0].1.key, w[1].1.key, w[0].0
            )));
        }
        Ok(out)
    }

    /// Whether `key` is a member with `role`.
    pub fn allows(&self, key: &PublicKey, role: Role) -> bool {
        self.members
            .iter()
            .any(|m| m.key == *key && m.roles.contains(&role))
    }

    /// Whether this (verified) policy may replace `current`: same group, higher version.
    pub fn supersedes(&self, current: &Policy) -> bool {
        self.group == current.group && self.version > current.version
    }

    /// Parses a policy from TOML; syntax errors name the line.
    pub fn from_toml(name: &str, text: &str) -> Result<Self, PolicyError> {
        let p: Policy = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|s| {
                text.as_bytes()[..s.start.min(text.len())]
                    .iter()
                    .filter(|&&b| b == b'\n')
                    .count()
                    + 1
            });
            match line {
                Some(l) => PolicyError::Syntax(format!("{name}:{l}: {}", e.message())),
                None => PolicyError::Syntax(format!("{name}: {}", e.message())),
            }
        })?;
        Ok(p)
    }

    /// Reads a policy file.
    pub fn load(path: &Path) -> Result<Self, PolicyError> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| PolicyError::Io(format!("{name}: {e}")))?;
        Self::from_toml(&name, &text)
    }

    /// The policy as TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a policy always serializes")
    }

    /// Writes the policy file (replacing it atomically).
    pub fn save(&self, path: &Path) -> Result<(), PolicyError> {
        let name = path.display().to_string();
        let tmp = path.with_extension("tmp-write");
        std::fs::write(&tmp, self.to_toml())
            .and_then(|_| std::fs::rename(&tmp, path))
            .map_err(|e| PolicyError::Io(format!("{name}: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (Identity, Identity, Policy) {
        let admin = Identity::from_seed(&[1; 32]);
        let alice = Identity::from_seed(&[2; 32]);
        let mut p = Policy::new("prices", vec![admin.public()], 1000, 2000).unwrap();
        p.add_member("alice", alice.public(), vec![Role::Publish, Role::Subscribe])
            .unwrap();
        p.sign(&admin).unwrap();
        (admin, alice, p)
    }

    #[test]
    fn a_signed_policy_verifies_within_its_period() {
        let (_, alice, p) = setup();
        assert_eq!(p.verify(1500), Ok(()));
        assert!(p.allows(&alice.public(), Role::Publish));
        assert!(!p.allows(&alice.public(), Role::Admin));
        assert!(matches!(p.verify(999), Err(PolicyError::NotYetValid { .. })));
        assert!(matches!(p.verify(2001), Err(PolicyError::Expired { .. })));
        // Through TOML and back, it still verifies.
        let back = Policy::from_toml("p.toml", &p.to_toml()).unwrap();
        assert_eq!(back, p);
        assert_eq!(back.verify(1500), Ok(()));
    }

    #[test]
    fn any_change_after_signing_is_caught() {
        let (_, alice, p) = setup();
        let mallory = Identity::from_seed(&[9; 32]).public();
        let mut tampered = p.clone();
        tampered.members[0].roles.push(Role::Admin);
        assert_eq!(tampered.verify(1500), Err(PolicyError::BadSignature));
        let mut tampered = p.clone();
        tampered.not_after = 9999;
        assert_eq!(tampered.verify(1500), Err(PolicyError::BadSignature));
        let mut tampered = p.clone();
        tampered.members.push(Member {
            name: "m".into(),
            key: mallory,
            roles: vec![Role::Publish],
        });
        assert_eq!(tampered.verify(1500), Err(PolicyError::BadSignature));
        let mut tampered = p.clone();
        tampered.group = "other".into();
        assert_eq!(tampered.verify(1500), Err(PolicyError::BadSignature));
        // Changing through the API drops the signature and raises the version.
        let mut changed = p.clone();
        assert!(changed.remove_member(&alice.public()));
        assert_eq!(changed.version, p.version + 1);
        assert_eq!(changed.verify(1500), Err(PolicyError::Unsigned));
    }

    #[test]
    fn only_an_admin_may_sign() {
        let (_, alice, mut p) = setup();
        assert_eq!(p.sign(&alice), Err(PolicyError::NotAnAdmin(alice.public())));
        // A signature by a non-admin, forged into the file, is refused.
        let mut forged = p.clone();
        forged.signature = Some(PolicySignature {
            signer: alice.public(),
            value: hex::encode(alice.sign(&forged.signing_bytes())),
        });
        assert_eq!(forged.verify(1500), Err(PolicyError::NotAnAdmin(alice.public())));
        // An admin's key with a garbage signature.
        let mut garbage = p.clone();
        garbage.signature.as_mut().unwrap().value = "00".repeat(64);
        assert_eq!(garbage.verify(1500), Err(PolicyError::BadSignature));
        garbage.signature.as_mut().unwrap().value = "xyz".into();
        assert_eq!(garbage.verify(1500), Err(PolicyError::BadSignature));
    }

    #[test]
    fn bad_content_and_syntax_are_refused_with_their_line() {
        let admin = Identity::from_seed(&[1; 32]).public();
        assert!(Policy::new("g", vec![], 0, 10).is_err());
        assert!(Policy::new("g", vec![admin], 10, 10).is_err());
        assert!(Policy::new("", vec![admin], 0, 10).is_err());
        let e =
            Policy::from_toml("p.toml", "group = \"g\"\nversion = 1\nnot_before = \"soon\"\n").unwrap_err();
        assert!(e.to_string().starts_with("p.toml:3:"), "{e}");
        let e = Policy::from_toml("p.toml", "group = \"g\"\nextra = 1\n").unwrap_err();
        assert!(e.to_string().contains("p.toml:2"), "{e}");
        // Random bytes never panic the parser.
        for seed in 0..200u32 {
            let junk: String = (0..64)
                .map(|i| char::from(((seed * 31 + i * 7) % 95 + 32) as u8))
                .collect();
            let _ = Policy::from_toml("junk", &junk);
        }
    }

    #[test]
    fn a_higher_version_of_the_same_group_supersedes() {
        let (admin, alice, p) = setup();
        let mut next = p.clone();
        next.remove_member(&alice.public());
        next.sign(&admin).unwrap();
        assert!(next.supersedes(&p));
        assert!(!p.supersedes(&next));
    }
}
