//! Data-plane protection: AES-256-GCM sealed and opened in place, one key per (group, epoch,
//! sender) derived with HKDF-SHA256, and nonces that cannot repeat under a key.
//!
//! Nonce (96 bits) = epoch (32, big-endian) || packet number (64, big-endian). A key belongs to
//! one sender in one epoch, and [`SenderKey::seal_in_place`] refuses a packet number that is not
//! above the last one it sealed, so a nonce never repeats under a key by construction. A key
//! also refuses to seal past its limit ([`DEFAULT_SEAL_LIMIT`]), which forces a rekey long
//! before AES-GCM's confidentiality and integrity bounds for datagram-sized messages.

use crate::Error;
use hkdf::Hkdf;
use sha2::Sha256;
use zeroize::{Zeroize, ZeroizeOnDrop};

/// Bytes of a GCM tag.
pub const TAG_LEN: usize = 16;
/// Seals one key allows: 2^32 packets. For packets of at most 64 KiB (2^12 AES blocks) this keeps
/// the total under 2^44 blocks, below the 2^48 blocks at which the AEAD limits draft
/// (draft-irtf-cfrg-aead-limits) puts AES-GCM's confidentiality advantage near 2^-32.
pub const DEFAULT_SEAL_LIMIT: u64 = 1 << 32;

const HKDF_SALT: &[u8] = b"intergroup v1 data-plane";

/// The secret of one epoch (from the MLS exporter), from which every sender's key is derived.
/// Zeroized on drop; never printed.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct EpochSecret([u8; 32]);

impl std::fmt::Debug for EpochSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EpochSecret(..)")
    }
}

impl EpochSecret {
    /// Wraps secret bytes (taking them, so the caller's copy can be dropped).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// A fresh secret from the operating system's random source.
    pub fn generate() -> Result<Self, crate::KeyError> {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).map_err(|e| crate::KeyError::Random(e.to_string()))?;
        Ok(Self(bytes))
    }

    /// Writes the secret to a new file of mode 0600 (64 hex digits and a comment line).
    pub fn save(&self, path: &std::path::Path, overwrite: bool) -> Result<(), crate::KeyError> {
        let text = zeroize::Zeroizing::new(format!(
            "# intergroup epoch secret: every member of the group holds it. Mode 0600.\n{}\n",
            hex::encode(self.0)
        ));
        crate::identity::write_private_file(path, &text, overwrite)
    }

    /// Loads a secret file written by [`EpochSecret::save`], refusing one others may read.
    pub fn load(path: &std::path::Path) -> Result<Self, crate::KeyError> {
        let text = crate::identity::read_private_file(path)?;
        let mut bytes = [0u8; 32];
        let digits = text
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty() && !l.starts_with('#'));
        match digits.map(|d| hex::decode_to_slice(d, &mut bytes)) {
            Some(Ok(())) => Ok(Self(bytes)),
            _ => Err(crate::KeyError::Malformed {
                path: path.display().to_string(),
                what: "not 64 hex digits of an epoch secret".into(),
            }),
        }
    }

    /// The key `sender` seals with in `epoch` of `group`, generation `generation`, with the
    /// default seal limit. A sender's packet number `n` belongs to generation `n >> 32` (see
    /// [`generation_of`]), so no key ever seals more than [`DEFAULT_SEAL_LIMIT`] packets: the
    /// usage limit forces a new key by construction, and every member derives it alike.
    pub fn sender_key(&self, group: u32, epoch: u32, sender: u32, generation: u32) -> SenderKey {
        let mut info = [0u8; 16 + 19];
        info[..19].copy_from_slice(b"intergroup data key");
        info[19..23].copy_from_slice(&group.to_be_bytes());
        info[23..27].copy_from_slice(&epoch.to_be_bytes());
        info[27..31].copy_from_slice(&sender.to_be_bytes());
        info[31..35].copy_from_slice(&generation.to_be_bytes());
        let mut key = [0u8; 32];
        Hkdf::<Sha256>::new(Some(HKDF_SALT), &self.0)
            .expand(&info, &mut key)
            .expect("32 bytes is a valid HKDF-SHA256 output length");
        let k = SenderKey::from_key_bytes(&key, epoch, DEFAULT_SEAL_LIMIT);
        key.zeroize();
        k
    }
}

/// The AES-256-GCM implementation this build uses: RustCrypto's `aes-gcm` by default, or
/// AWS-LC's assembly (`aws-lc-rs`, formally verified in parts and FIPS-validated) with the
/// `aws-lc` cargo feature. Both speak the same wire format; see docs/performance.md.
pub const BACKEND: &str = if cfg!(feature = "aws-lc") {
    "aws-lc-rs"
} else {
    "aes-gcm"
};

#[cfg(not(feature = "aws-lc"))]
mod backend {
    use aes_gcm::aead::AeadInPlace;
    use aes_gcm::{Aes256Gcm, KeyInit, Nonce, Tag};

    /// The expanded AES key schedule; zeroized on drop by the `zeroize` feature of aes-gcm.
    pub(super) struct Cipher(Aes256Gcm);

    impl Cipher {
        pub(super) fn new(key: &[u8; 32]) -> Self {
            Self(Aes256Gcm::new(key.into()))
        }

        pub(super) fn seal(&self, nonce: &[u8; 12], aad: &[u8], buf: &mut [u8]) -> Option<[u8; 16]> {
            let tag = self
                .0
                .encrypt_in_place_detached(Nonce::from_slice(nonce), aad, buf)
                .ok()?;
            Some(tag.into())
        }

        /// `sealed` is ciphertext then tag, at least a tag long.
        pub(super) fn open(&self, nonce: &[u8; 12], aad: &[u8], sealed: &mut [u8]) -> bool {
            let (body, tag) = sealed.split_at_mut(sealed.len() - super::TAG_LEN);
            self.0
                .decrypt_in_place_detached(Nonce::from_slice(nonce), aad, body, Tag::from_slice(tag))
                .is_ok()
        }
    }
}

#[cfg(feature = "aws-lc")]
mod backend {
    use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};

    /// AWS-LC's key; its memory is cleansed when freed.
    pub(super) struct Cipher(LessSafeKey);

    impl Cipher {
        pub(super) fn new(key: &[u8; 32]) -> Self {
            let key = UnboundKey::new(&AES_256_GCM, key).expect("a 32-byte key is valid for AES-256-GCM");
            Self(LessSafeKey::new(key))
        }

        pub(super) fn seal(&self, nonce: &[u8; 12], aad: &[u8], buf: &mut [u8]) -> Option<[u8; 16]> {
            let tag = self
                .0
                .seal_in_place_separate_tag(Nonce::assume_unique_for_key(*nonce), Aad::from(aad), buf)
                .ok()?;
            tag.as_ref().try_into().ok()
        }

        /// `sealed` is ciphertext then tag, at least a tag long.
        pub(super) fn open(&self, nonce: &[u8; 12], aad: &[u8], sealed: &mut [u8]) -> bool {
            self.0
                .open_in_place(Nonce::assume_unique_for_key(*nonce), Aad::from(aad), sealed)
                .is_ok()
        }
    }
}

/// One sender's key in one epoch: seals (as that sender) and opens (its packets, at receivers).
pub struct SenderKey {
    cipher: backend::Cipher,
    epoch: u32,
    /// Lowest packet number the next seal may use.
    next_packet: u64,
    sealed: u64,
    limit: u64,
}

impl std::fmt::Debug for SenderKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SenderKey")
            .field("epoch", &self.epoch)
            .field("sealed", &self.sealed)
            .finish_non_exhaustive()
    }
}

/// The key generation packet number `n` is sealed under.
pub fn generation_of(packet_number: u64) -> u32 {
    (packet_number >> 32) as u32
}

fn nonce(epoch: u32, packet_number: u64) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[..4].copy_from_slice(&epoch.to_be_bytes());
    n[4..].copy_from_slice(&packet_number.to_be_bytes());
    n
}

impl SenderKey {
    fn from_key_bytes(key: &[u8; 32], epoch: u32, limit: u64) -> Self {
        Self {
            cipher: backend::Cipher::new(key),
            epoch,
            next_packet: 0,
            sealed: 0,
            limit,
        }
    }

    /// The epoch this key belongs to.
    pub fn epoch(&self) -> u32 {
        self.epoch
    }

    /// Packets sealed so far.
    pub fn sealed(&self) -> u64 {
        self.sealed
    }

    /// Whether the next seal would pass the limit: time to rekey.
    pub fn exhausted(&self) -> bool {
        self.sealed >= self.limit
    }

    /// Sets the seal limit (tests and operators who want earlier rekeys).
    pub fn set_seal_limit(&mut self, limit: u64) {
        self.limit = limit;
    }

    /// Encrypts `buf` in place as packet `packet_number`, authenticating `aad` (the header),
    /// and returns the tag. `packet_number` must be above every one sealed before with this key.
    pub fn seal_in_place(
        &mut self,
        packet_number: u64,
        aad: &[u8],
        buf: &mut [u8],
    ) -> Result<[u8; TAG_LEN], Error> {
        if packet_number < self.next_packet {
            return Err(Error::PacketNumberReused);
        }
        if self.exhausted() {
            return Err(Error::KeyExhausted);
        }
        let n = nonce(self.epoch, packet_number);
        let tag = self.cipher.seal(&n, aad, buf).ok_or(Error::KeyExhausted)?;
        self.next_packet = packet_number.saturating_add(1);
        self.sealed += 1;
        Ok(tag)
    }

    /// Checks the tag at the end of `sealed` (ciphertext then tag, as the sender laid them
    /// out) over `aad` and the ciphertext, and decrypts the ciphertext in place; returns its
    /// length. On any failure the error says nothing about why and the ciphertext's bytes are
    /// unspecified (the default backend leaves them as they were): callers drop the packet.
    pub fn open_in_place(&self, packet_number: u64, aad: &[u8], sealed: &mut [u8]) -> Result<usize, Error> {
        let Some(len) = sealed.len().checked_sub(TAG_LEN) else {
            return Err(Error::BadTag);
        };
        let n = nonce(self.epoch, packet_number);
        if self.cipher.open(&n, aad, sealed) {
            Ok(len)
        } else {
            Err(Error::BadTag)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// `buf` sealed as packet `pn`, tag appended.
    fn seal(k: &mut SenderKey, pn: u64, aad: &[u8], plain: &[u8]) -> Vec<u8> {
        let mut buf = plain.to_vec();
        let tag = k.seal_in_place(pn, aad, &mut buf).unwrap();
        buf.extend_from_slice(&tag);
        buf
    }

    /// Test case 16 of McGrew and Viega, "The Galois/Counter Mode of Operation" (AES-256,
    /// 96-bit IV, with AAD), through this module's nonce layout: the IV cafebabe facedbaddecaf888
    /// is epoch 0xcafebabe and packet number 0xfacedbaddecaf888. Runs on whichever backend the
    /// build uses.
    #[test]
    fn known_answer_gcm_test_case_16() {
        let key: [u8; 32] = hex("feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308")
            .try_into()
            .unwrap();
        let plain = hex(
            "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a721c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39",
        );
        let aad = hex("feedfacedeadbeeffeedfacedeadbeefabaddad2");
        let cipher = hex(
            "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662",
        );
        let tag = hex("76fc6ece0f4e1768cddf8853bb2d551b");
        let mut k = SenderKey::from_key_bytes(&key, 0xcafe_babe, DEFAULT_SEAL_LIMIT);
        let mut sealed = seal(&mut k, 0xface_dbad_deca_f888, &aad, &plain);
        assert_eq!(sealed[..plain.len()], cipher[..]);
        assert_eq!(sealed[plain.len()..], tag[..]);
        let n = k.open_in_place(0xface_dbad_deca_f888, &aad, &mut sealed).unwrap();
        assert_eq!(sealed[..n], plain[..]);
    }

    #[test]
    fn every_tampering_is_refused() {
        let secret = EpochSecret::from_bytes([7; 32]);
        let mut k = secret.sender_key(1, 3, 9, 0);
        let aad = b"header bytes";
        let sealed = seal(&mut k, 42, aad, b"the message");
        let check = |pn: u64, aad: &[u8], buf: &mut Vec<u8>| {
            assert_eq!(k.open_in_place(pn, aad, buf), Err(Error::BadTag));
        };
        for bit in 0..sealed.len() * 8 {
            let mut b = sealed.clone();
            b[bit / 8] ^= 1 << (bit % 8);
            check(42, aad, &mut b);
        }
        check(42, b"header bytez", &mut sealed.clone());
        check(43, aad, &mut sealed.clone());
        for len in 0..sealed.len() {
            check(42, aad, &mut sealed[..len].to_vec());
        }
        // The same packet under another sender's, epoch's, group's or generation's key does
        // not open.
        for other in [
            secret.sender_key(1, 3, 10, 0),
            secret.sender_key(1, 4, 9, 0),
            secret.sender_key(2, 3, 9, 0),
            secret.sender_key(1, 3, 9, 1),
        ] {
            assert_eq!(
                other.open_in_place(42, aad, &mut sealed.clone()),
                Err(Error::BadTag)
            );
        }
        let mut b = sealed.clone();
        let n = secret
            .sender_key(1, 3, 9, 0)
            .open_in_place(42, aad, &mut b)
            .unwrap();
        assert_eq!(&b[..n], b"the message");
    }

    /// The default backend promises more: a failed open leaves the bytes alone.
    #[cfg(not(feature = "aws-lc"))]
    #[test]
    fn a_failed_open_does_not_touch_the_buffer() {
        let mut k = EpochSecret::from_bytes([7; 32]).sender_key(1, 3, 9, 0);
        let mut sealed = seal(&mut k, 1, b"", b"some bytes");
        let last = sealed.len() - 1;
        sealed[last] ^= 1;
        let before = sealed.clone();
        assert!(k.open_in_place(1, b"", &mut sealed).is_err());
        assert_eq!(sealed, before);
    }

    #[test]
    fn nonces_cannot_repeat_and_keys_run_out() {
        let mut k = EpochSecret::from_bytes([1; 32]).sender_key(1, 1, 1, 0);
        let mut buf = [0u8; 8];
        k.seal_in_place(5, b"", &mut buf).unwrap();
        assert_eq!(k.seal_in_place(5, b"", &mut buf), Err(Error::PacketNumberReused));
        assert_eq!(k.seal_in_place(4, b"", &mut buf), Err(Error::PacketNumberReused));
        k.set_seal_limit(2);
        k.seal_in_place(6, b"", &mut buf).unwrap();
        assert!(k.exhausted());
        assert_eq!(k.seal_in_place(7, b"", &mut buf), Err(Error::KeyExhausted));
    }

    #[test]
    fn key_material_never_appears_in_debug() {
        let secret = EpochSecret::from_bytes([0xab; 32]);
        let s = format!("{secret:?} {:?}", secret.sender_key(1, 2, 3, 0));
        assert!(!s.contains("171") && !s.to_lowercase().contains("ab, ab"), "{s}");
        assert!(s.contains("EpochSecret(..)"));
    }
}
