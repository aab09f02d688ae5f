//! Ed25519 identities of members and group admins, and their key files.
//!
//! A private key file is TOML with the 32-byte seed and the public key, in hex, created with
//! mode 0600; loading one that anybody but its owner can read is refused. Key material never
//! appears in `Debug` or in errors, and is zeroized on drop.

use ed25519_dalek::Signer;
use std::fmt;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use zeroize::Zeroizing;

/// Errors of identities and key files; they name files, never key material.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// What the OS said.
        source: std::io::Error,
    },
    /// Others may read the private key file.
    #[error("{path}: private key file is readable by others (mode {mode:o}); run: chmod 600 {path}")]
    Exposed {
        /// The file.
        path: String,
        /// Its permission bits.
        mode: u32,
    },
    /// The file is not a key file of this format.
    #[error("{path}: not an intergroup private key file: {what}")]
    Malformed {
        /// The file.
        path: String,
        /// What is wrong.
        what: String,
    },
    /// A public key in text form is not 64 hex digits of a valid Ed25519 point.
    #[error("not an Ed25519 public key (64 hex digits expected): {0:?}")]
    BadPublicKey(String),
    /// The system's random source failed.
    #[error("no randomness from the operating system: {0}")]
    Random(String),
}

/// An Ed25519 public key; in text, 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey(pub [u8; 32]);

impl PublicKey {
    /// The engine member id this key stands for in secured groups: the first four bytes of
    /// SHA-256("intergroup member id" || key), never 0 or `u32::MAX` (reserved). Policies
    /// refuse two members whose ids collide ([`crate::Policy::roster`]).
    pub fn member_id(&self) -> u32 {
        use sha2::Digest;
        let digest = sha2::Sha256::new()
            .chain_update(b"intergroup member id")
            .chain_update(self.0)
            .finalize();
        match u32::from_le_bytes([digest[0], digest[1], digest[2], digest[3]]) {
            0 | u32::MAX => 1,
            id => id,
        }
    }

    /// Checks `signature` over `message`.
    pub fn verify(&self, message: &[u8], signature: &[u8; 64]) -> bool {
        let Ok(key) = ed25519_dalek::VerifyingKey::from_bytes(&self.0) else {
            return false;
        };
        key.verify_strict(message, &ed25519_dalek::Signature::from_bytes(signature))
            .is_ok()
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

impl std::str::FromStr for PublicKey {
    type Err = KeyError;

    fn from_str(s: &str) -> Result<Self, KeyError> {
        let bad = || KeyError::BadPublicKey(s.chars().take(80).collect());
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(s.trim(), &mut bytes).map_err(|_| bad())?;
        ed25519_dalek::VerifyingKey::from_bytes(&bytes).map_err(|_| bad())?;
        Ok(Self(bytes))
    }
}

impl serde::Serialize for PublicKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for PublicKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A private signing identity. Its secret is zeroized on drop (every clone's too) and never
/// printed.
#[derive(Clone)]
pub struct Identity {
    key: ed25519_dalek::SigningKey,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Identity(public {})", self.public())
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    private_key: Zeroizing<String>,
    public_key: PublicKey,
}

impl Identity {
    /// A new identity from the operating system's random source.
    pub fn generate() -> Result<Self, KeyError> {
        let mut seed = Zeroizing::new([0u8; 32]);
        getrandom::fill(&mut *seed).map_err(|e| KeyError::Random(e.to_string()))?;
        Ok(Self::from_seed(&seed))
    }

    /// The identity of a 32-byte seed.
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        Self {
            key: ed25519_dalek::SigningKey::from_bytes(seed),
        }
    }

    /// The public key.
    pub fn public(&self) -> PublicKey {
        PublicKey(self.key.verifying_key().to_bytes())
    }

    /// Signs `message`.
    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.key.sign(message).to_bytes()
    }

    /// Writes a new private key file at `path` with mode 0600; an existing file is replaced
    /// only with `overwrite`.
    pub fn save(&self, path: &Path, overwrite: bool) -> Result<(), KeyError> {
        let body = Zeroizing::new(
            toml::to_string(&KeyFile {
                private_key: Zeroizing::new(hex::encode(self.key.to_bytes())),
                public_key: self.public(),
            })
            .map_err(|e| KeyError::Malformed {
                path: path.display().to_string(),
                what: e.to_string(),
            })?,
        );
        let text = Zeroizing::new(format!(
            "# intergroup private key (Ed25519). Keep it private: mode 0600.\n{}",
            &*body
        ));
        write_private_file(path, &text, overwrite)
    }

    /// Loads a private key file, refusing one that anybody but its owner may read.
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let name = path.display().to_string();
        let text = read_private_file(path)?;
        let malformed = |what: &str| KeyError::Malformed {
            path: name.clone(),
            what: what.into(),
        };
        // The parser's message could quote the secret: report only where it failed.
        let file: KeyFile = toml::from_str(&text).map_err(|e| {
            malformed(&match e.span() {
                Some(span) => format!("bad TOML at byte {}", span.start),
                None => "bad TOML".into(),
            })
        })?;
        let mut seed = Zeroizing::new([0u8; 32]);
        hex::decode_to_slice(file.private_key.trim(), &mut *seed)
            .map_err(|_| malformed("private_key is not 64 hex digits"))?;
        let id = Self::from_seed(&seed);
        if id.public() != file.public_key {
            return Err(malformed("public_key does not belong to private_key"));
        }
        Ok(id)
    }
}

/// Reads a file holding secrets, refusing one that anybody but its owner may read.
pub(crate) fn read_private_file(path: &Path) -> Result<Zeroizing<String>, KeyError> {
    let name = path.display().to_string();
    let meta = std::fs::metadata(path).map_err(|source| KeyError::Io {
        path: name.clone(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyError::Exposed { path: name, mode });
    }
    Ok(Zeroizing::new(
        std::fs::read_to_string(path).map_err(|source| KeyError::Io { path: name, source })?,
    ))
}

/// Writes `text` to a new file with mode 0600 (`overwrite` replaces an existing one).
pub(crate) fn write_private_file(path: &Path, text: &str, overwrite: bool) -> Result<(), KeyError> {
    let io = |source| KeyError::Io {
        path: path.display().to_string(),
        source,
    };
    let mut options = std::fs::OpenOptions::new();
    options.write(true).mode(0o600);
    if overwrite {
        options.create(true).truncate(true);
    } else {
        options.create_new(true);
    }
    let mut f = options.open(path).map_err(io)?;
    // An existing file keeps its mode on open: make sure of 0600.
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(io)?;
    f.write_all(text.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("intergroup-id-{}-{name}", std::process::id()));
        let _ = std::fs::remove_file(&dir);
        dir
    }

    #[test]
    fn a_saved_key_loads_back_and_signs() {
        let id = Identity::generate().unwrap();
        let path = temp("roundtrip");
        id.save(&path, false).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let back = Identity::load(&path).unwrap();
        assert_eq!(back.public(), id.public());
        let sig = back.sign(b"hello");
        assert!(id.public().verify(b"hello", &sig));
        assert!(!id.public().verify(b"hellO", &sig));
        // Not replaced without asking.
        assert!(id.save(&path, false).is_err());
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_key_file_others_can_read_is_refused() {
        let id = Identity::generate().unwrap();
        let path = temp("exposed");
        id.save(&path, false).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Identity::load(&path).unwrap_err();
        assert!(matches!(e, KeyError::Exposed { mode: 0o644, .. }), "{e}");
        assert!(e.to_string().contains("chmod 600"));
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn key_material_never_shows() {
        let id = Identity::from_seed(&[0x42; 32]);
        let secret = hex::encode([0x42u8; 32]);
        assert!(!format!("{id:?}").contains(&secret));
        let path = temp("mangled");
        std::fs::write(&path, format!("private_key = \"{secret}\"\npublic_key = 12\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let e = Identity::load(&path).unwrap_err();
        assert!(!e.to_string().contains(&secret), "{e}");
        assert!(!format!("{e:?}").contains(&secret), "{e:?}");
        // A seed that does not match its public key.
        let other = Identity::from_seed(&[1; 32]).public();
        std::fs::write(
            &path,
            format!("private_key = \"{secret}\"\npublic_key = \"{other}\"\n"),
        )
        .unwrap();
        let e = Identity::load(&path).unwrap_err();
        assert!(e.to_string().contains("does not belong"), "{e}");
        assert!(!e.to_string().contains(&secret));
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn public_keys_parse_only_when_valid() {
        let k = Identity::from_seed(&[7; 32]).public();
        assert_eq!(k.to_string().parse::<PublicKey>().unwrap(), k);
        for bad in ["", "zz", &"0".repeat(63), &"g".repeat(64)] {
            assert!(bad.parse::<PublicKey>().is_err(), "{bad:?}");
        }
    }
}
