//! MLS group key agreement: members agree on every epoch's data-plane secret; removed members
//! lose the next one, joiners never get earlier ones, the policy decides who gets in, and
//! malformed or stale messages are refused without harm.

use intergroup_secure::mls::{MlsError, MlsMember};
use intergroup_secure::{Identity, Policy, PublicKey, Role};
use proptest::prelude::*;

const GROUP: &[u8] = b"group 9";

fn identity(n: u8) -> Identity {
    Identity::from_seed(&[n; 32])
}

fn policy(members: &[u8]) -> Policy {
    let admin = identity(200);
    let mut p = Policy::new("g", vec![admin.public()], 0, u64::MAX).unwrap();
    for &n in members {
        p.add_member(
            &format!("m{n}"),
            identity(n).public(),
            vec![Role::Publish, Role::Subscribe],
        )
        .unwrap();
    }
    p.sign(&admin).unwrap();
    p
}

fn secret_bytes(m: &MlsMember) -> String {
    // Compared through what they seal, never printed: derive a key and seal a fixed block.
    let s = m.epoch_secret(GROUP).unwrap();
    let mut k = s.sender_key(9, 1, 1, 0);
    let mut block = [0u8; 16];
    let tag = k.seal_in_place(0, b"", &mut block).unwrap();
    format!("{block:?}{tag:?}")
}

/// A (creator), B and C in one group at epoch 1.
fn three(p: &Policy) -> (MlsMember, MlsMember, MlsMember) {
    let mut a = MlsMember::new(identity(1));
    let mut b = MlsMember::new(identity(2));
    let mut c = MlsMember::new(identity(3));
    a.create_group(GROUP).unwrap();
    let commit = a
        .commit(&[b.key_package().unwrap(), c.key_package().unwrap()], &[], p)
        .unwrap();
    assert_eq!(a.merge_pending().unwrap(), 1);
    let welcome = commit.welcome.unwrap();
    assert_eq!(b.join(&welcome, p).unwrap(), 1);
    assert_eq!(c.join(&welcome, p).unwrap(), 1);
    (a, b, c)
}

#[test]
fn members_agree_and_removal_and_joining_move_the_secret_out_of_reach() {
    let p = policy(&[1, 2, 3, 4]);
    let (mut a, mut b, mut c) = three(&p);
    let e1 = secret_bytes(&a);
    assert_eq!(secret_bytes(&b), e1);
    assert_eq!(secret_bytes(&c), e1);
    assert_eq!(a.members().len(), 3);

    // Epoch 2: C removed, D added, in one commit.
    let mut d = MlsMember::new(identity(4));
    let commit = a
        .commit(&[d.key_package().unwrap()], &[identity(3).public()], &p)
        .unwrap();
    a.merge_pending().unwrap();
    let effect = b.process(&commit.commit, &p).unwrap();
    assert_eq!(effect.epoch, 2);
    assert_eq!(effect.removed, vec![identity(3).public()]);
    assert_eq!(effect.added, vec![identity(4).public()]);
    let gone = c.process(&commit.commit, &p).unwrap();
    assert!(gone.removed_self);
    assert_eq!(c.epoch_secret(GROUP).unwrap_err(), MlsError::NoGroup);
    assert_eq!(d.join(&commit.welcome.unwrap(), &p).unwrap(), 2);
    let e2 = secret_bytes(&a);
    assert_ne!(e2, e1);
    assert_eq!(secret_bytes(&b), e2);
    assert_eq!(secret_bytes(&d), e2);
    let mut members = a.members();
    members.sort_by_key(|k| k.0);
    let mut want: Vec<PublicKey> = [1, 2, 4].iter().map(|&n| identity(n).public()).collect();
    want.sort_by_key(|k| k.0);
    assert_eq!(members, want);

    // Epoch 3: B refreshes its keys; everyone follows, the secret moves again.
    let update = b.self_update().unwrap();
    b.merge_pending().unwrap();
    a.process(&update.commit, &p).unwrap();
    d.process(&update.commit, &p).unwrap();
    let e3 = secret_bytes(&a);
    assert!(e3 != e2 && e3 != e1);
    assert_eq!(secret_bytes(&d), e3);
    assert_eq!(secret_bytes(&b), e3);
    // The joiner of epoch 2 never held epoch 1's secret: nothing it has derives it.
    assert_ne!(secret_bytes(&d), e1);
}

#[test]
fn stale_and_replayed_commits_are_refused() {
    let p = policy(&[1, 2, 3]);
    let (mut a, mut b, _c) = three(&p);
    let first = a.self_update().unwrap();
    a.merge_pending().unwrap();
    b.process(&first.commit, &p).unwrap();
    assert_eq!(
        b.process(&first.commit, &p).unwrap_err(),
        MlsError::WrongEpoch { got: 1, have: 2 }
    );
    // A commit that lost the epoch to another is discarded by its author.
    let losing = b.self_update().unwrap();
    let winning = a.self_update().unwrap();
    a.merge_pending().unwrap();
    b.discard_pending().unwrap();
    b.process(&winning.commit, &p).unwrap();
    assert!(matches!(
        a.process(&losing.commit, &p),
        Err(MlsError::WrongEpoch { .. })
    ));
    assert_eq!(secret_bytes(&a), secret_bytes(&b));
}

#[test]
fn the_policy_decides_who_gets_in() {
    let p = policy(&[1, 2, 3]);
    let (mut a, mut b, _c) = three(&p);
    let outsider = MlsMember::new(identity(66));
    // The committer refuses an outsider's key package.
    let err = a.commit(&[outsider.key_package().unwrap()], &[], &p).unwrap_err();
    assert!(matches!(err, MlsError::Credential(_)), "{err:?}");
    // A committer with a laxer policy adds it anyway: the other members refuse the commit.
    let lax = policy(&[1, 2, 3, 66]);
    let commit = a.commit(&[outsider.key_package().unwrap()], &[], &lax).unwrap();
    assert!(matches!(
        b.process(&commit.commit, &p),
        Err(MlsError::Credential(_))
    ));
    // And a joiner refuses a Welcome into a tree with a member its policy does not list.
    let mut joiner = MlsMember::new(identity(3));
    let mut e = MlsMember::new(identity(1));
    e.create_group(b"other").unwrap();
    let w = e
        .commit(
            &[
                joiner.key_package().unwrap(),
                MlsMember::new(identity(66)).key_package().unwrap(),
            ],
            &[],
            &lax,
        )
        .unwrap();
    assert!(matches!(
        joiner.join(&w.welcome.unwrap(), &p),
        Err(MlsError::Credential(_))
    ));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn random_bytes_are_refused_by_every_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        let p = policy(&[1, 2, 3]);
        let mut a = MlsMember::new(identity(1));
        a.create_group(GROUP).unwrap();
        prop_assert!(a.process(&bytes, &p).is_err());
        prop_assert!(a.commit(std::slice::from_ref(&bytes), &[], &p).is_err());
        let mut j = MlsMember::new(identity(2));
        prop_assert!(j.join(&bytes, &p).is_err());
        // Nothing changed.
        prop_assert_eq!(a.epoch(), Some(0));
    }
}

#[test]
fn staged_commits_and_welcomes_take_effect_only_when_applied() {
    let p = policy(&[1, 2, 3, 4]);
    let (mut a, mut b, mut c) = three(&p);
    let mut d = MlsMember::new(identity(4));
    println!("key package: {} bytes", d.key_package().unwrap().len());
    let commit = a
        .commit(&[d.key_package().unwrap()], &[identity(3).public()], &p)
        .unwrap();
    let welcome = commit.welcome.clone().unwrap();
    println!(
        "commit {} bytes, welcome {} bytes",
        commit.commit.len(),
        welcome.len()
    );
    // A staged commit that is dropped (its view change was abandoned) changes nothing.
    let dropped = b.stage(&commit.commit, &p).unwrap();
    assert_eq!(dropped.epoch(), 2);
    drop(dropped);
    assert_eq!(b.epoch(), Some(1));
    assert_eq!(secret_bytes(&b), secret_bytes(&c));
    // Staged again and applied: the same epoch as the committer's.
    let staged = b.stage(&commit.commit, &p).unwrap();
    let removed = c.stage(&commit.commit, &p).unwrap();
    let joined = d.stage_welcome(&welcome, &p).unwrap();
    assert_eq!(joined.epoch(), 2);
    assert_eq!(d.epoch(), None, "a staged welcome is not a group yet");
    assert_eq!(a.merge_pending().unwrap(), 2);
    assert_eq!(b.apply(staged).unwrap().epoch, 2);
    assert_eq!(d.apply(joined).unwrap().epoch, 2);
    let effect = c.apply(removed).unwrap();
    assert!(effect.removed_self);
    assert_eq!(c.epoch(), None);
    assert_eq!(secret_bytes(&a), secret_bytes(&b));
    assert_eq!(secret_bytes(&a), secret_bytes(&d));
    // A commit staged for one epoch does not apply in another.
    let next = a.self_update().unwrap();
    let stale = b.stage(&next.commit, &p).unwrap();
    a.merge_pending().unwrap();
    let again = a.self_update().unwrap();
    b.process(&next.commit, &p).unwrap();
    a.discard_pending().unwrap();
    drop(again);
    assert!(matches!(b.apply(stale), Err(MlsError::WrongEpoch { .. })));
}

#[test]
fn a_member_out_of_step_is_replaced_by_a_fresh_leaf_in_one_commit() {
    let p = policy(&[1, 2, 3]);
    let (mut a, mut b, mut c) = three(&p);
    // C missed an epoch (it staged a commit and dropped it, say).
    let missed = a.self_update().unwrap();
    a.merge_pending().unwrap();
    b.process(&missed.commit, &p).unwrap();
    // One commit removes C's old leaf and adds C again from a fresh key package.
    let fresh = c.key_package().unwrap();
    let commit = a.commit(&[fresh], &[identity(3).public()], &p).unwrap();
    a.merge_pending().unwrap();
    b.process(&commit.commit, &p).unwrap();
    assert!(matches!(
        c.stage(&commit.commit, &p),
        Err(MlsError::WrongEpoch { .. })
    ));
    c.join(&commit.welcome.unwrap(), &p).unwrap();
    assert_eq!(secret_bytes(&a), secret_bytes(&c));
    assert_eq!(secret_bytes(&b), secret_bytes(&c));
    assert_eq!(a.members().len(), 3);
}

#[test]
fn epoch_tags_tell_epochs_and_groups_apart() {
    let p = policy(&[1, 2, 3, 4]);
    let (mut a, b, _c) = three(&p);
    assert_eq!(a.epoch_tag(), b.epoch_tag());
    let before = a.epoch_tag().unwrap();
    // Another group at the same epoch number has another tag.
    let mut other = MlsMember::new(identity(4));
    other.create_group(GROUP).unwrap();
    let mut d = MlsMember::new(identity(2));
    let c = other.commit(&[d.key_package().unwrap()], &[], &p).unwrap();
    other.merge_pending().unwrap();
    d.join(&c.welcome.unwrap(), &p).unwrap();
    assert_eq!(other.epoch(), a.epoch());
    assert_ne!(other.epoch_tag(), a.epoch_tag());
    // The next epoch has another tag.
    a.self_update().unwrap();
    a.merge_pending().unwrap();
    assert_ne!(a.epoch_tag(), Some(before));
    assert_eq!(MlsMember::new(identity(1)).epoch_tag(), None);
}
