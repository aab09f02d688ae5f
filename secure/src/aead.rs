//! Data-plane protection: AES-256-GCM sealed and opened in place, one key per (group, epoch,
//! sender) derived with HKDF-SHA256, and nonces that cannot repeat under a key.
//!
//! Nonce (96 bits) = epoch (32, big-endian) || packet number (64, big-endian). A key belongs to
//! one sender in one epoch, and [`SenderKey::seal_in_place`] refuses a packet number that is not
//! above the last one it sealed, so a nonce never repeats under a key by construction. A key
//! also refuses to seal past its limit ([`DEFAULT_SEAL_LIMIT`]), which forces a rekey long
//! before AES-GCM's confidentiality and integrity bounds for datagram-sized messages.

use crate::Error;
use aes_gcm::aead::AeadInPlace;
use aes_gcm::{Aes256Gcm, KeyInit, Nonce, Tag};
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

    /// The key `sender` seals with in `epoch` of `group`, with the default seal limit.
    pub fn sender_key(&self, group: u32, epoch: u32, sender: u32) -> SenderKey {
        let mut info = [0u8; 12 + 19];
        info[..19].copy_from_slice(b"intergroup data key");
        info[19..23].copy_from_slice(&group.to_be_bytes());
        info[23..27].copy_from_slice(&epoch.to_be_bytes());
        info[27..31].copy_from_slice(&sender.to_be_bytes());
        let mut key = [0u8; 32];
        Hkdf::<Sha256>::new(Some(HKDF_SALT), &self.0)
            .expand(&info, &mut key)
            .expect("32 bytes is a valid HKDF-SHA256 output length");
        let k = SenderKey::from_key_bytes(&key, epoch, DEFAULT_SEAL_LIMIT);
        key.zeroize();
        k
    }
}

/// One sender's key in one epoch: seals (as that sender) and opens (its packets, at receivers).
pub struct SenderKey {
    /// The expanded AES key schedule; zeroized on drop by the `zeroize` feature of aes-gcm.
    cipher: Aes256Gcm,
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

fn nonce(epoch: u32, packet_number: u64) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[..4].copy_from_slice(&epoch.to_be_bytes());
    n[4..].copy_from_slice(&packet_number.to_be_bytes());
    n
}

impl SenderKey {
    fn from_key_bytes(key: &[u8; 32], epoch: u32, limit: u64) -> Self {
        Self {
            cipher: Aes256Gcm::new(key.into()),
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
        let tag = self
            .cipher
            .encrypt_in_place_detached(Nonce::from_slice(&n), aad, buf)
            .map_err(|_| Error::KeyExhausted)?;
        self.next_packet = packet_number.saturating_add(1);
        self.sealed += 1;
        Ok(tag.into())
    }

    /// Checks `tag` over `aad` and the ciphertext in `buf` and decrypts `buf` in place. On any
    /// failure `buf` is left as it was and the error says nothing about why.
    pub fn open_in_place(
        &self,
        packet_number: u64,
        aad: &[u8],
        buf: &mut [u8],
        tag: &[u8; TAG_LEN],
    ) -> Result<(), Error> {
        let n = nonce(self.epoch, packet_number);
        self.cipher
            .decrypt_in_place_detached(Nonce::from_slice(&n), aad, buf, Tag::from_slice(tag))
            .map_err(|_| Error::BadTag)
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

    /// Test case 16 of McGrew and Viega, "The Galois/Counter Mode of Operation" (AES-256,
    /// 96-bit IV, with AAD), through this module's nonce layout: the IV cafebabe facedbaddecaf888
    /// is epoch 0xcafebabe and packet number 0xfacedbaddecaf888.
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
        let mut buf = plain.clone();
        let got = k.seal_in_place(0xface_dbad_deca_f888, &aad, &mut buf).unwrap();
        assert_eq!(buf, cipher);
        assert_eq!(got.to_vec(), tag);
        k.open_in_place(0xface_dbad_deca_f888, &aad, &mut buf, &got)
            .unwrap();
        assert_eq!(buf, plain);
    }

    #[test]
    fn every_tampering_is_refused_and_leaves_the_buffer_alone() {
        let secret = EpochSecret::from_bytes([7; 32]);
        let mut k = secret.sender_key(1, 3, 9);
        let aad = b"header bytes";
        let mut buf = b"the message".to_vec();
        let tag = k.seal_in_place(42, aad, &mut buf).unwrap();
        let sealed = buf.clone();
        let check = |pn: u64, aad: &[u8], buf: &mut Vec<u8>, tag: &[u8; 16]| {
            let before = buf.clone();
            assert_eq!(k.open_in_place(pn, aad, buf, tag), Err(Error::BadTag));
            assert_eq!(*buf, before, "a failed open must not touch the buffer");
        };
        for bit in 0..sealed.len() * 8 {
            let mut b = sealed.clone();
            b[bit / 8] ^= 1 << (bit % 8);
            check(42, aad, &mut b, &tag);
        }
        for bit in 0..128 {
            let mut t = tag;
            t[bit / 8] ^= 1 << (bit % 8);
            check(42, aad, &mut sealed.clone(), &t);
        }
        check(42, b"header bytez", &mut sealed.clone(), &tag);
        check(43, aad, &mut sealed.clone(), &tag);
        check(42, aad, &mut sealed[..sealed.len() - 1].to_vec(), &tag);
        // The same packet under another sender's, epoch's or group's key does not open.
        for other in [
            secret.sender_key(1, 3, 10),
            secret.sender_key(1, 4, 9),
            secret.sender_key(2, 3, 9),
        ] {
            let mut b = sealed.clone();
            assert_eq!(other.open_in_place(42, aad, &mut b, &tag), Err(Error::BadTag));
        }
        let mut b = sealed.clone();
        secret
            .sender_key(1, 3, 9)
            .open_in_place(42, aad, &mut b, &tag)
            .unwrap();
        assert_eq!(b, b"the message");
    }

    #[test]
    fn nonces_cannot_repeat_and_keys_run_out() {
        let mut k = EpochSecret::from_bytes([1; 32]).sender_key(1, 1, 1);
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
        let s = format!("{secret:?} {:?}", secret.sender_key(1, 2, 3));
        assert!(!s.contains("171") && !s.to_lowercase().contains("ab, ab"), "{s}");
        assert!(s.contains("EpochSecret(..)"));
    }
}
