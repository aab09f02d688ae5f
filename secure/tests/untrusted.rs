//! Untrusted bytes never panic the secure layer's decoders: policy files, key files, public
//! keys and signatures built from random and mutated input (seeded, so a failure replays).

use intergroup_secure::{Identity, Policy, PublicKey, Role};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed, TestRunner};
use std::os::unix::fs::PermissionsExt;

fn signed_policy_text() -> String {
    let admin = Identity::from_seed(&[1; 32]);
    let mut p = Policy::new("g", vec![admin.public()], 0, u64::MAX / 2).unwrap();
    p.add_member("m", Identity::from_seed(&[2; 32]).public(), vec![Role::Publish])
        .unwrap();
    p.sign(&admin).unwrap();
    p.to_toml()
}

#[test]
fn random_and_mutated_inputs_never_panic() {
    let seed = 0x5ec_0de;
    let mut runner = TestRunner::new(Config {
        cases: 2000,
        rng_seed: RngSeed::Fixed(seed),
        failure_persistence: None,
        ..Config::default()
    });
    let base = signed_policy_text();
    let key_path = std::env::temp_dir().join(format!("intergroup-fuzz-key-{}", std::process::id()));
    let result = runner.run(
        &(
            proptest::collection::vec(any::<u8>(), 0..400),
            any::<usize>(),
            any::<u8>(),
        ),
        |(junk, at, byte)| {
            // Random text as a policy, a public key, and a key file.
            let text = String::from_utf8_lossy(&junk).to_string();
            let _ = Policy::from_toml("fuzz", &text);
            let _ = text.parse::<PublicKey>();
            std::fs::write(&key_path, &junk).unwrap();
            std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
            let _ = Identity::load(&key_path);
            // A signed policy with one byte changed: it parses or not, and if it parses it
            // verifies only when the change did not touch what is signed.
            let mut bytes = base.clone().into_bytes();
            let i = at % bytes.len();
            bytes[i] = byte;
            if let Ok(t) = String::from_utf8(bytes) {
                if let Ok(p) = Policy::from_toml("mutated", &t) {
                    let original = Policy::from_toml("base", &base).unwrap();
                    if p.verify(1).is_ok() {
                        prop_assert_eq!(p.signing_bytes(), original.signing_bytes());
                    }
                }
            }
            Ok(())
        },
    );
    let _ = std::fs::remove_file(&key_path);
    if let Err(e) = result {
        panic!("seed {seed:#x}: {e}");
    }
}
