//! Random and mutated input to the secure layer's file decoders: policies and key files never
//! panic, and no mutation of a signed policy both parses and still verifies unless it left the
//! signed content as it was.

use intergroup_secure::{Identity, Policy, Role};
use proptest::prelude::*;
use std::os::unix::fs::PermissionsExt;

fn signed_policy() -> (Policy, String) {
    let admin = Identity::from_seed(&[9; 32]);
    let mut p = Policy::new("prices", vec![admin.public()], 0, u64::MAX).unwrap();
    p.add_member(
        "alice",
        Identity::from_seed(&[1; 32]).public(),
        vec![Role::Publish],
    )
    .unwrap();
    p.add_member(
        "bob",
        Identity::from_seed(&[2; 32]).public(),
        vec![Role::Subscribe],
    )
    .unwrap();
    p.sign(&admin).unwrap();
    let text = p.to_toml();
    (p, text)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn random_text_is_not_a_policy_and_does_not_panic(text in "\\PC{0,400}") {
        let _ = Policy::from_toml("random", &text);
    }

    #[test]
    fn a_mutated_signed_policy_never_verifies_as_something_else(pos in 0usize..4096, byte in any::<u8>()) {
        let (original, text) = signed_policy();
        let mut bytes = text.into_bytes();
        let pos = pos % bytes.len();
        prop_assume!(bytes[pos] != byte);
        bytes[pos] = byte;
        let Ok(text) = String::from_utf8(bytes) else { return Ok(()) };
        if let Ok(p) = Policy::from_toml("mutated", &text) {
            if p.verify(1).is_ok() {
                // Only a change outside the signed content (spacing, a quote style) may pass.
                prop_assert_eq!(p.signing_bytes(), original.signing_bytes());
            }
        }
    }

    #[test]
    fn random_key_files_are_refused_without_panicking(text in "\\PC{0,300}") {
        let path = std::env::temp_dir().join(format!("intergroup-keyfuzz-{}", std::process::id()));
        std::fs::write(&path, text.as_bytes()).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let r = Identity::load(&path);
        let _ = std::fs::remove_file(&path);
        prop_assert!(r.is_err());
    }
}
