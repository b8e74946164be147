//! The conformance suite every [`Store`] backend runs, instantiated for [`MemoryStore`] (`memory_store::*`),
//! [`SqliteStore`] (`sqlite_store::*`) and `PgStore` (`postgres_store::*`, each test in a fresh schema;
//! see `postgres::testing` for the skip/require rules), plus SQLite-only tests (durability, group commit,
//! failure isolation inside a batch) and PostgreSQL-only tests (two nodes racing, migrations, outages).

use std::collections::HashSet;

use natter_proto::{DeviceId, MessageId, PhoneNumber};

use super::memory::MemoryStore;
use super::sqlite::SqliteStore;
use super::{
    AccountRecord, BlobRecord, ClaimedPreKey, CodeRecord, DeviceRecord, EnqueueOutcome,
    GroupMemberRecord, GroupRecord, GroupState, NewAccount, NewEnvelope, NewMessage, PreKeyRecord,
    PrivacyRecord, QueuedEnvelope, Store, StoreError,
};

// ---- fixtures ----

fn phone(n: u32) -> PhoneNumber {
    PhoneNumber::from_e164(&format!("+1555000{n:04}")).unwrap()
}

fn dev(n: u32) -> DeviceId {
    DeviceId::new(n).unwrap()
}

fn mid(n: u8) -> MessageId {
    MessageId::from_bytes([n; 16])
}

fn device_record(phone: &PhoneNumber, seed: u8) -> DeviceRecord {
    DeviceRecord {
        phone: phone.clone(),
        device_id: DeviceId::PRIMARY,
        noise_key: [seed; 32],
        identity_ed: [seed.wrapping_add(1); 32],
        last_seen_ms: 1_000,
    }
}

fn new_account(phone: &PhoneNumber, seed: u8) -> NewAccount {
    NewAccount {
        account: AccountRecord {
            phone: phone.clone(),
            account_key: [seed; 32],
            device_list: vec![seed, 1, 2, 3],
            device_list_version: 1,
            created_at_ms: 1_000 + u64::from(seed),
        },
        primary: device_record(phone, seed),
    }
}

fn prekey(key_id: &str, seed: u8) -> PreKeyRecord {
    PreKeyRecord {
        key_id: key_id.to_owned(),
        key: [seed; 32],
        signature: vec![seed; 64],
    }
}

fn envelope(to: &PhoneNumber, device: u32, body: &[u8]) -> NewEnvelope {
    NewEnvelope {
        phone: to.clone(),
        device_id: dev(device),
        olm_type: 1,
        ciphertext: body.to_vec(),
    }
}

fn message(
    sender: &PhoneNumber,
    sender_device: u32,
    id: MessageId,
    ts: u64,
    envelopes: Vec<NewEnvelope>,
) -> NewMessage {
    NewMessage {
        sender: sender.clone(),
        sender_device: dev(sender_device),
        message_id: id,
        server_ts_ms: ts,
        expires_at_ms: ts + 1_000,
        envelopes,
        retry: None,
    }
}

fn stored(outcome: EnqueueOutcome) -> Vec<QueuedEnvelope> {
    match outcome {
        EnqueueOutcome::Stored(envs) => envs,
        other => panic!("expected Stored, got {other:?}"),
    }
}

fn seqs(envs: &[QueuedEnvelope]) -> Vec<u64> {
    envs.iter().map(|e| e.seq).collect()
}

/// A registration code as `save_code` stores it.
fn pending_code(p: &PhoneNumber) -> CodeRecord {
    CodeRecord {
        phone: p.clone(),
        code_hash: [7; 32],
        sent_at_ms: 1_000,
        expires_at_ms: 2_000,
        attempts: 0,
    }
}

async fn queue_of(s: &dyn Store, phone: &PhoneNumber) -> Vec<QueuedEnvelope> {
    s.load_queue(phone, DeviceId::PRIMARY, 0, 10_000)
        .await
        .unwrap()
}

/// Two accounts, A (+15550000001) and B (+15550000002), each with its primary device.
async fn two_accounts(s: &dyn Store) -> (PhoneNumber, PhoneNumber) {
    let (a, b) = (phone(1), phone(2));
    assert!(
        s.create_account(&new_account(&a, 10))
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        s.create_account(&new_account(&b, 20))
            .await
            .unwrap()
            .is_empty()
    );
    (a, b)
}

// ---- the suite ----

async fn device_list_updates(s: &dyn Store) {
    let (a, b) = two_accounts(s).await;
    let companion = DeviceRecord {
        device_id: dev(2),
        ..device_record(&a, 30)
    };
    let add = crate::store::DeviceListUpdate {
        device_list: vec![9, 9],
        version: 2,
        added: vec![companion.clone()],
        removed: vec![],
    };
    s.update_devices(&a, &add).await.unwrap();
    let account = s.get_account(&a).await.unwrap().unwrap();
    assert_eq!(
        (account.device_list, account.device_list_version),
        (vec![9, 9], 2)
    );
    assert_eq!(s.get_device(&a, dev(2)).await.unwrap(), Some(companion));
    // The same or an older version loses, and changes nothing.
    let stale = crate::store::DeviceListUpdate {
        device_list: vec![1],
        version: 2,
        added: vec![],
        removed: vec![dev(2)],
    };
    assert!(matches!(
        s.update_devices(&a, &stale).await,
        Err(StoreError::Conflict)
    ));
    assert!(s.get_device(&a, dev(2)).await.unwrap().is_some());
    assert!(matches!(
        s.update_devices(&phone(7), &add).await,
        Err(StoreError::NoSuchAccount)
    ));

    // Removing a device drops its keys and its queue.
    s.add_one_time_keys(&a, dev(2), &[prekey("k", 1)])
        .await
        .unwrap();
    let queued = stored(
        s.enqueue(message(&b, 1, mid(1), 100, vec![envelope(&a, 2, b"x")]))
            .await
            .unwrap(),
    );
    assert_eq!(queued.len(), 1);
    let remove = crate::store::DeviceListUpdate {
        device_list: vec![3],
        version: 3,
        added: vec![],
        removed: vec![dev(2)],
    };
    s.update_devices(&a, &remove).await.unwrap();
    assert_eq!(s.get_device(&a, dev(2)).await.unwrap(), None);
    assert_eq!(s.count_one_time_keys(&a, dev(2)).await.unwrap(), 0);
    assert!(s.load_queue(&a, dev(2), 0, 10).await.unwrap().is_empty());
    assert_eq!(s.list_devices(&a).await.unwrap().len(), 1);

    // Companions of a primary that has been away are found; the primary's own entry never is.
    s.touch_device(&a, DeviceId::PRIMARY, 2_000).await.unwrap();
    let again_companion = crate::store::DeviceListUpdate {
        device_list: vec![5],
        version: 5,
        added: vec![DeviceRecord {
            device_id: dev(3),
            ..device_record(&a, 50)
        }],
        removed: vec![],
    };
    s.update_devices(&a, &again_companion).await.unwrap();
    assert_eq!(s.stale_companions(2_000, 10).await.unwrap(), vec![]);
    assert_eq!(
        s.stale_companions(2_001, 10).await.unwrap(),
        vec![(a.clone(), dev(3))]
    );
    assert_eq!(s.stale_companions(2_001, 0).await.unwrap(), vec![]);
    s.remove_device(&a, dev(3)).await.unwrap();

    // A device re-added later starts empty; remove_device leaves the list alone.
    let again = crate::store::DeviceListUpdate {
        device_list: vec![4],
        version: 6,
        added: vec![DeviceRecord {
            device_id: dev(2),
            ..device_record(&a, 40)
        }],
        removed: vec![],
    };
    s.update_devices(&a, &again).await.unwrap();
    s.remove_device(&a, dev(2)).await.unwrap();
    assert_eq!(s.get_device(&a, dev(2)).await.unwrap(), None);
    assert_eq!(
        s.get_account(&a)
            .await
            .unwrap()
            .unwrap()
            .device_list_version,
        6
    );
}

async fn codes(s: &dyn Store) {
    let p = phone(1);
    assert_eq!(s.get_code(&p).await.unwrap(), None);
    assert_eq!(
        s.add_code_attempt(&p).await.unwrap(),
        0,
        "no code: nothing counted"
    );
    assert_eq!(s.get_code(&p).await.unwrap(), None);

    let code = pending_code(&p);
    s.save_code(&code).await.unwrap();
    assert_eq!(s.get_code(&p).await.unwrap(), Some(code.clone()));
    assert_eq!(s.get_code(&phone(2)).await.unwrap(), None);

    assert_eq!(s.add_code_attempt(&p).await.unwrap(), 1);
    assert_eq!(s.add_code_attempt(&p).await.unwrap(), 2);
    assert_eq!(s.get_code(&p).await.unwrap().unwrap().attempts, 2);

    // A resend replaces the code and its attempt count.
    let resent = CodeRecord {
        code_hash: [8; 32],
        sent_at_ms: 3_000,
        expires_at_ms: 4_000,
        ..code
    };
    s.save_code(&resent).await.unwrap();
    assert_eq!(s.get_code(&p).await.unwrap(), Some(resent));

    s.remove_code(&p).await.unwrap();
    assert_eq!(s.get_code(&p).await.unwrap(), None);
    s.remove_code(&p).await.unwrap(); // removing nothing is fine
}

async fn create_account_new(s: &dyn Store) {
    let p = phone(1);
    assert_eq!(s.get_account(&p).await.unwrap(), None);
    let new = new_account(&p, 10);
    assert_eq!(
        s.create_account(&new).await.unwrap(),
        Vec::<DeviceId>::new()
    );
    assert_eq!(s.get_account(&p).await.unwrap(), Some(new.account.clone()));
    assert_eq!(
        s.get_device(&p, DeviceId::PRIMARY).await.unwrap(),
        Some(new.primary.clone())
    );
    assert_eq!(s.list_devices(&p).await.unwrap(), vec![new.primary]);
    assert_eq!(
        s.count_one_time_keys(&p, DeviceId::PRIMARY).await.unwrap(),
        0
    );
    assert_eq!(s.claim_prekey(&p, DeviceId::PRIMARY).await.unwrap(), None);
    assert!(queue_of(s, &p).await.is_empty());
    assert_eq!(s.get_account(&phone(2)).await.unwrap(), None);
}

async fn create_account_replaces(s: &dyn Store) {
    let (a, b) = two_accounts(s).await;
    s.add_one_time_keys(&a, DeviceId::PRIMARY, &[prekey("k1", 1), prekey("k2", 2)])
        .await
        .unwrap();
    s.set_fallback_key(&a, DeviceId::PRIMARY, &prekey("f", 9))
        .await
        .unwrap();
    s.add_one_time_keys(&b, DeviceId::PRIMARY, &[prekey("b1", 3)])
        .await
        .unwrap();
    // B -> A (queued for A, must go) and A -> B (queued for B, must stay).
    stored(
        s.enqueue(message(&b, 1, mid(1), 100, vec![envelope(&a, 1, b"to a")]))
            .await
            .unwrap(),
    );
    let kept = stored(
        s.enqueue(message(&a, 1, mid(2), 100, vec![envelope(&b, 1, b"to b")]))
            .await
            .unwrap(),
    );

    let replacement = new_account(&a, 30);
    assert_eq!(
        s.create_account(&replacement).await.unwrap(),
        vec![DeviceId::PRIMARY]
    );
    assert_eq!(
        s.get_account(&a).await.unwrap(),
        Some(replacement.account.clone())
    );
    assert_eq!(s.list_devices(&a).await.unwrap(), vec![replacement.primary]);
    assert_eq!(
        s.count_one_time_keys(&a, DeviceId::PRIMARY).await.unwrap(),
        0
    );
    assert_eq!(
        s.claim_prekey(&a, DeviceId::PRIMARY).await.unwrap(),
        None,
        "old one-time and fallback keys are gone"
    );
    assert!(queue_of(s, &a).await.is_empty(), "old queue is gone");

    // B is untouched.
    assert_eq!(
        s.count_one_time_keys(&b, DeviceId::PRIMARY).await.unwrap(),
        1
    );
    assert_eq!(queue_of(s, &b).await, kept);
    assert_eq!(
        s.get_account(&b).await.unwrap().unwrap().account_key,
        [20; 32]
    );
}

async fn devices(s: &dyn Store) {
    let (a, _) = two_accounts(s).await;
    assert_eq!(s.get_device(&a, dev(2)).await.unwrap(), None);
    assert_eq!(
        s.get_device(&phone(3), DeviceId::PRIMARY).await.unwrap(),
        None
    );
    assert!(s.list_devices(&phone(3)).await.unwrap().is_empty());

    s.touch_device(&a, DeviceId::PRIMARY, 5_000).await.unwrap();
    let d = s.get_device(&a, DeviceId::PRIMARY).await.unwrap().unwrap();
    assert_eq!(d.last_seen_ms, 5_000);
    assert_eq!(d.noise_key, [10; 32]);
    assert_eq!(
        s.list_devices(&a).await.unwrap(),
        vec![d],
        "list_devices sees the touch"
    );

    assert!(matches!(
        s.touch_device(&a, dev(2), 6_000).await,
        Err(StoreError::NoSuchDevice)
    ));
    assert!(matches!(
        s.touch_device(&phone(3), DeviceId::PRIMARY, 6_000).await,
        Err(StoreError::NoSuchDevice)
    ));
}

async fn one_time_keys(s: &dyn Store) {
    let (a, b) = two_accounts(s).await;
    let me = DeviceId::PRIMARY;
    assert_eq!(
        s.add_one_time_keys(&a, me, &[prekey("k1", 1), prekey("k2", 2), prekey("k3", 3)])
            .await
            .unwrap(),
        3
    );
    // A known id is ignored (the first upload wins), a new one is added, also within one call.
    assert_eq!(
        s.add_one_time_keys(
            &a,
            me,
            &[prekey("k2", 99), prekey("k4", 4), prekey("k4", 98)]
        )
        .await
        .unwrap(),
        4
    );
    assert_eq!(s.add_one_time_keys(&a, me, &[]).await.unwrap(), 4);
    assert_eq!(s.count_one_time_keys(&a, me).await.unwrap(), 4);
    assert_eq!(s.count_one_time_keys(&b, me).await.unwrap(), 0);

    // Oldest first.
    for (i, (id, seed)) in [("k1", 1), ("k2", 2), ("k3", 3), ("k4", 4)]
        .into_iter()
        .enumerate()
    {
        assert_eq!(
            s.claim_prekey(&a, me).await.unwrap(),
            Some(ClaimedPreKey {
                prekey: prekey(id, seed),
                fallback: false,
                remaining: 3 - i as u32,
            })
        );
    }
    assert_eq!(s.count_one_time_keys(&a, me).await.unwrap(), 0);
    assert_eq!(
        s.claim_prekey(&a, me).await.unwrap(),
        None,
        "neither kind left"
    );

    // The fallback is returned, not removed, and can be replaced.
    s.set_fallback_key(&a, me, &prekey("f1", 50)).await.unwrap();
    for _ in 0..2 {
        assert_eq!(
            s.claim_prekey(&a, me).await.unwrap(),
            Some(ClaimedPreKey {
                prekey: prekey("f1", 50),
                fallback: true,
                remaining: 0,
            })
        );
    }
    s.set_fallback_key(&a, me, &prekey("f2", 51)).await.unwrap();
    assert_eq!(
        s.claim_prekey(&a, me).await.unwrap().unwrap().prekey,
        prekey("f2", 51)
    );

    // A claimed id may be uploaded again; one-time keys go before the fallback.
    assert_eq!(
        s.add_one_time_keys(&a, me, &[prekey("k1", 5)])
            .await
            .unwrap(),
        1
    );
    let claimed = s.claim_prekey(&a, me).await.unwrap().unwrap();
    assert_eq!((claimed.prekey, claimed.fallback), (prekey("k1", 5), false));
    assert!(s.claim_prekey(&a, me).await.unwrap().unwrap().fallback);

    // B's keys are B's.
    assert_eq!(s.claim_prekey(&b, me).await.unwrap(), None);

    // Unknown devices: storing fails, reading and claiming find nothing.
    for result in [
        s.add_one_time_keys(&a, dev(2), &[prekey("x", 1)]).await,
        s.add_one_time_keys(&a, dev(2), &[]).await,
    ] {
        assert!(
            matches!(result, Err(StoreError::NoSuchDevice)),
            "{result:?}"
        );
    }
    assert!(matches!(
        s.set_fallback_key(&a, dev(2), &prekey("f", 1)).await,
        Err(StoreError::NoSuchDevice)
    ));
    assert_eq!(s.count_one_time_keys(&a, dev(2)).await.unwrap(), 0);
    assert_eq!(s.count_one_time_keys(&phone(3), me).await.unwrap(), 0);
    assert_eq!(s.claim_prekey(&a, dev(2)).await.unwrap(), None);
    assert_eq!(s.claim_prekey(&phone(3), me).await.unwrap(), None);
}

async fn enqueue_stores(s: &dyn Store) {
    let (a, b) = two_accounts(s).await;
    let msg = message(
        &a,
        1,
        mid(1),
        100,
        vec![envelope(&b, 1, b"one"), envelope(&a, 1, b"self")],
    );
    let first = stored(s.enqueue(msg).await.unwrap());
    assert_eq!(first.len(), 2);
    assert!(first[0].seq > 0 && first[1].seq > first[0].seq);
    assert_eq!(
        first[0],
        QueuedEnvelope {
            seq: first[0].seq,
            phone: b.clone(),
            device_id: DeviceId::PRIMARY,
            sender: a.clone(),
            sender_device: DeviceId::PRIMARY,
            message_id: mid(1),
            server_ts_ms: 100,
            olm_type: 1,
            ciphertext: b"one".to_vec(),
            retry: None,
        }
    );
    assert_eq!(first[1].phone, a);
    assert_eq!(first[1].ciphertext, b"self");

    let pre_key = NewEnvelope {
        olm_type: 0,
        ..envelope(&b, 1, b"two")
    };
    let second = stored(
        s.enqueue(message(&a, 1, mid(2), 200, vec![pre_key]))
            .await
            .unwrap(),
    );
    assert!(second[0].seq > first[1].seq, "seqs grow across devices");
    assert_eq!(second[0].olm_type, 0);

    // A resend keeps its retry marker through the queue.
    let retry = crate::store::RetryInfo {
        of: mid(1),
        attempt: 2,
    };
    let resend = NewMessage {
        retry: Some(retry),
        ..message(&a, 1, mid(9), 250, vec![envelope(&b, 1, b"again")])
    };
    let third = stored(s.enqueue(resend).await.unwrap());
    assert_eq!(third[0].retry, Some(retry));
    let loaded = s
        .load_queue(&b, DeviceId::PRIMARY, second[0].seq, 10)
        .await
        .unwrap();
    assert_eq!(loaded, third);
    s.ack(&b, DeviceId::PRIMARY, &[third[0].seq]).await.unwrap();

    assert_eq!(
        queue_of(s, &b).await,
        vec![first[0].clone(), second[0].clone()]
    );
    assert_eq!(queue_of(s, &a).await, vec![first[1].clone()]);

    // No envelopes: accepted (and remembered), nothing queued.
    assert_eq!(
        s.enqueue(message(&a, 1, mid(3), 300, vec![]))
            .await
            .unwrap(),
        EnqueueOutcome::Stored(vec![])
    );
    assert_eq!(
        s.enqueue(message(&a, 1, mid(3), 301, vec![]))
            .await
            .unwrap(),
        EnqueueOutcome::Duplicate { server_ts_ms: 300 }
    );
}

async fn enqueue_duplicate(s: &dyn Store) {
    let (a, b) = two_accounts(s).await;
    let first = stored(
        s.enqueue(message(&a, 1, mid(1), 100, vec![envelope(&b, 1, b"x")]))
            .await
            .unwrap(),
    );
    // The retry (later time, even other content) is a duplicate reporting the first acceptance time.
    let retry = message(
        &a,
        1,
        mid(1),
        500,
        vec![envelope(&b, 1, b"y"), envelope(&a, 1, b"z")],
    );
    assert_eq!(
        s.enqueue(retry).await.unwrap(),
        EnqueueOutcome::Duplicate { server_ts_ms: 100 }
    );
    assert_eq!(queue_of(s, &b).await, first, "nothing stored");
    assert!(queue_of(s, &a).await.is_empty());

    // The same id from another device of the sender, or from another sender, is a new message.
    let other_device = stored(
        s.enqueue(message(&a, 2, mid(1), 600, vec![envelope(&b, 1, b"d2")]))
            .await
            .unwrap(),
    );
    let other_sender = stored(
        s.enqueue(message(&b, 1, mid(1), 700, vec![envelope(&a, 1, b"b")]))
            .await
            .unwrap(),
    );
    assert_eq!(other_device[0].sender_device, dev(2));
    assert_eq!(queue_of(s, &b).await.len(), 2);
    assert_eq!(queue_of(s, &a).await, other_sender);
}

async fn enqueue_unknown_device(s: &dyn Store) {
    let (a, b) = two_accounts(s).await;
    let bad = message(
        &a,
        1,
        mid(1),
        100,
        vec![envelope(&b, 1, b"ok"), envelope(&b, 2, b"no such device")],
    );
    assert!(matches!(
        s.enqueue(bad).await,
        Err(StoreError::NoSuchDevice)
    ));
    let bad = message(
        &a,
        1,
        mid(1),
        100,
        vec![envelope(&phone(3), 1, b"no account")],
    );
    assert!(matches!(
        s.enqueue(bad).await,
        Err(StoreError::NoSuchDevice)
    ));
    assert!(queue_of(s, &b).await.is_empty(), "all or nothing");
    // The failed attempt left no idempotency record: the corrected retry is stored.
    let retry = message(&a, 1, mid(1), 200, vec![envelope(&b, 1, b"ok")]);
    assert_eq!(stored(s.enqueue(retry).await.unwrap()).len(), 1);
}

async fn load_queue_paging(s: &dyn Store) {
    let (a, b) = two_accounts(s).await;
    let mut all = Vec::new();
    for i in 0..5u8 {
        let env = envelope(&b, 1, &[i]);
        all.extend(stored(
            s.enqueue(message(&a, 1, mid(i), 100 + u64::from(i), vec![env]))
                .await
                .unwrap(),
        ));
    }
    let me = DeviceId::PRIMARY;
    assert_eq!(s.load_queue(&b, me, 0, 100).await.unwrap(), all);
    assert_eq!(s.load_queue(&b, me, 0, 2).await.unwrap(), all[..2].to_vec());
    assert_eq!(
        s.load_queue(&b, me, all[1].seq, 2).await.unwrap(),
        all[2..4].to_vec()
    );
    assert_eq!(
        s.load_queue(&b, me, all[3].seq, 100).await.unwrap(),
        all[4..].to_vec()
    );
    assert!(
        s.load_queue(&b, me, all[4].seq, 100)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(s.load_queue(&b, me, 0, 0).await.unwrap().is_empty());
    assert!(s.load_queue(&b, me, u64::MAX, 10).await.unwrap().is_empty());
    assert_eq!(s.load_queue(&b, me, 0, usize::MAX).await.unwrap(), all);
    assert!(s.load_queue(&a, me, 0, 100).await.unwrap().is_empty());
    assert!(s.load_queue(&b, dev(2), 0, 100).await.unwrap().is_empty());
    assert!(
        s.load_queue(&phone(3), me, 0, 100)
            .await
            .unwrap()
            .is_empty()
    );
}

async fn ack(s: &dyn Store) {
    let (a, b) = two_accounts(s).await;
    let me = DeviceId::PRIMARY;
    let to_b = stored(
        s.enqueue(message(
            &a,
            1,
            mid(1),
            100,
            vec![
                envelope(&b, 1, b"1"),
                envelope(&b, 1, b"2"),
                envelope(&b, 1, b"3"),
            ],
        ))
        .await
        .unwrap(),
    );
    let to_a = stored(
        s.enqueue(message(&b, 1, mid(2), 100, vec![envelope(&a, 1, b"a")]))
            .await
            .unwrap(),
    );

    assert_eq!(s.queued_bytes(&b, me).await.unwrap(), 3);
    assert_eq!(s.queued_bytes(&a, me).await.unwrap(), 1);
    assert_eq!(s.queued_bytes(&phone(3), me).await.unwrap(), 0);

    // A tries to ack B's mail: ignored.
    s.ack(&a, me, &seqs(&to_b)).await.unwrap();
    s.ack(&b, dev(2), &seqs(&to_b)).await.unwrap();
    s.ack(&phone(3), me, &seqs(&to_b)).await.unwrap();
    assert_eq!(queue_of(s, &b).await, to_b);

    // B acks its first and last envelope, plus ids that are not its own or do not exist.
    s.ack(
        &b,
        me,
        &[to_b[0].seq, to_b[2].seq, to_a[0].seq, 999_999, u64::MAX],
    )
    .await
    .unwrap();
    assert_eq!(queue_of(s, &b).await, vec![to_b[1].clone()]);
    assert_eq!(queue_of(s, &a).await, to_a, "A's mail survives B's ack");
    assert_eq!(s.queued_bytes(&b, me).await.unwrap(), 1);
    s.ack(&b, me, &[to_b[0].seq]).await.unwrap(); // again: nothing to do
    s.ack(&b, me, &[]).await.unwrap();

    // Seqs are never reused, even after the newest envelopes were acknowledged.
    s.ack(&b, me, &[to_b[1].seq]).await.unwrap();
    s.ack(&a, me, &[to_a[0].seq]).await.unwrap();
    let next = stored(
        s.enqueue(message(&a, 1, mid(3), 100, vec![envelope(&b, 1, b"4")]))
            .await
            .unwrap(),
    );
    assert!(next[0].seq > to_a[0].seq);
}

async fn expire(s: &dyn Store) {
    let (a, b) = two_accounts(s).await;
    // mid(1) expires at 1_100, mid(2) at 5_100.
    let old = stored(
        s.enqueue(message(
            &a,
            1,
            mid(1),
            100,
            vec![envelope(&b, 1, b"old"), envelope(&a, 1, b"old")],
        ))
        .await
        .unwrap(),
    );
    let fresh = stored(
        s.enqueue(message(&a, 1, mid(2), 4_100, vec![envelope(&b, 1, b"new")]))
            .await
            .unwrap(),
    );
    assert_eq!(old.len(), 2);

    assert_eq!(s.expire(1_099).await.unwrap(), 0);
    assert_eq!(queue_of(s, &b).await.len(), 2);

    assert_eq!(
        s.expire(1_100).await.unwrap(),
        2,
        "expires_at_ms <= now goes"
    );
    assert_eq!(queue_of(s, &b).await, fresh);
    assert!(queue_of(s, &a).await.is_empty());
    assert_eq!(s.expire(1_100).await.unwrap(), 0);

    // mid(1)'s idempotency record went with it; mid(2)'s is still there.
    assert_eq!(
        stored(
            s.enqueue(message(
                &a,
                1,
                mid(1),
                2_000,
                vec![envelope(&b, 1, b"again")]
            ))
            .await
            .unwrap()
        )
        .len(),
        1
    );
    assert_eq!(
        s.enqueue(message(&a, 1, mid(2), 2_000, vec![]))
            .await
            .unwrap(),
        EnqueueOutcome::Duplicate {
            server_ts_ms: 4_100
        }
    );

    // Other state is untouched.
    assert!(s.get_account(&a).await.unwrap().is_some());
    assert_eq!(s.list_devices(&b).await.unwrap().len(), 1);
    assert_eq!(s.expire(u64::MAX).await.unwrap(), 2);
    assert!(queue_of(s, &b).await.is_empty());
}

async fn out_of_range(s: &dyn Store) {
    let (a, b) = two_accounts(s).await;
    let mut msg = message(&a, 1, mid(1), 100, vec![envelope(&b, 1, b"x")]);
    msg.expires_at_ms = u64::MAX;
    assert!(matches!(s.enqueue(msg).await, Err(StoreError::Backend(_))));
    assert!(queue_of(s, &b).await.is_empty());
    assert!(matches!(
        s.touch_device(&a, DeviceId::PRIMARY, i64::MAX as u64 + 1)
            .await,
        Err(StoreError::Backend(_))
    ));
    s.touch_device(&a, DeviceId::PRIMARY, i64::MAX as u64)
        .await
        .unwrap();
    let mut acct = new_account(&phone(3), 1);
    acct.account.device_list_version = u64::MAX;
    assert!(matches!(
        s.create_account(&acct).await,
        Err(StoreError::Backend(_))
    ));
    assert_eq!(s.get_account(&phone(3)).await.unwrap(), None);
}

fn blob(id: u8, owner: &PhoneNumber, size: u64, expires_at_ms: u64) -> BlobRecord {
    BlobRecord {
        id: format!("{id:032x}"),
        owner: owner.clone(),
        size,
        offset: 0,
        complete: false,
        created_at_ms: 1_000,
        expires_at_ms,
    }
}

async fn blobs(s: &dyn Store) {
    let (a, b) = (phone(1), phone(2));
    let one = blob(1, &a, 600, 10_000);
    assert!(s.create_blob(&one, 1_000, 1_000).await.unwrap());
    assert_eq!(s.get_blob(&one.id).await.unwrap(), Some(one.clone()));
    assert!(matches!(
        s.create_blob(&one, 1_000, 1_000).await,
        Err(StoreError::Conflict)
    ));
    // Quota: 600 used, 401 more would exceed 1_000; 400 fits exactly.
    assert!(
        !s.create_blob(&blob(2, &a, 401, 10_000), 1_000, 1_000)
            .await
            .unwrap()
    );
    assert_eq!(s.get_blob(&blob(2, &a, 1, 1).id).await.unwrap(), None);
    assert!(
        s.create_blob(&blob(2, &a, 400, 20_000), 1_000, 1_000)
            .await
            .unwrap()
    );
    assert!(
        s.create_blob(&blob(3, &b, 1_000, 10_000), 1_000, 1_000)
            .await
            .unwrap()
    );
    assert_eq!(s.blob_usage(&a, 1_000).await.unwrap(), 1_000);
    assert_eq!(s.blob_usage(&b, 1_000).await.unwrap(), 1_000);
    assert_eq!(s.blob_usage(&phone(9), 1_000).await.unwrap(), 0);
    // Expired blobs no longer count (even before they are deleted).
    assert_eq!(s.blob_usage(&a, 10_000).await.unwrap(), 400);
    assert!(
        s.create_blob(&blob(4, &a, 600, 30_000), 1_000, 10_000)
            .await
            .unwrap()
    );

    // Offsets and completion.
    s.set_blob_offset(&one.id, 100).await.unwrap();
    assert_eq!(s.get_blob(&one.id).await.unwrap().unwrap().offset, 100);
    s.complete_blob(&one.id).await.unwrap();
    let done = s.get_blob(&one.id).await.unwrap().unwrap();
    assert!(done.complete);
    assert_eq!(done.offset, 600);
    let missing = format!("{:032x}", 99);
    assert!(matches!(
        s.set_blob_offset(&missing, 1).await,
        Err(StoreError::NoSuchBlob)
    ));
    assert!(matches!(
        s.complete_blob(&missing).await,
        Err(StoreError::NoSuchBlob)
    ));
    assert!(matches!(
        s.extend_blob(&missing, 1).await,
        Err(StoreError::NoSuchBlob)
    ));

    // Extending never shortens.
    s.extend_blob(&one.id, 15_000).await.unwrap();
    assert_eq!(
        s.get_blob(&one.id).await.unwrap().unwrap().expires_at_ms,
        15_000
    );
    s.extend_blob(&one.id, 5_000).await.unwrap();
    assert_eq!(
        s.get_blob(&one.id).await.unwrap().unwrap().expires_at_ms,
        15_000
    );

    // Expiry: `expires_at_ms <= now` goes, in pages of `limit`.
    assert!(s.delete_expired_blobs(9_999, 10).await.unwrap().is_empty());
    assert_eq!(
        s.delete_expired_blobs(10_000, 10).await.unwrap(),
        vec![blob(3, &b, 0, 0).id]
    );
    assert_eq!(s.get_blob(&blob(3, &b, 0, 0).id).await.unwrap(), None);
    assert_eq!(s.delete_expired_blobs(20_000, 1).await.unwrap().len(), 1);
    assert_eq!(s.delete_expired_blobs(20_000, 1).await.unwrap().len(), 1);
    assert!(s.delete_expired_blobs(20_000, 1).await.unwrap().is_empty());
    assert_eq!(s.get_blob(&one.id).await.unwrap(), None);
    assert!(s.get_blob(&blob(4, &a, 0, 0).id).await.unwrap().is_some());

    // Values outside the SQL integer range are refused.
    let mut huge = blob(5, &a, 1, 1);
    huge.expires_at_ms = u64::MAX;
    assert!(matches!(
        s.create_blob(&huge, u64::MAX, 0).await,
        Err(StoreError::Backend(_))
    ));
}

async fn app_state(s: &impl Store) {
    let a = phone(1);
    let b = phone(2);
    let empty = s.fetch_app_state(&a, "contacts", 0, 10).await.unwrap();
    assert_eq!(empty, super::AppStateFetch::default());
    assert_eq!(
        s.push_app_state(&a, "contacts", 0, b"p1", None)
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        s.push_app_state(&a, "contacts", 1, b"p2", None)
            .await
            .unwrap(),
        2
    );
    // A stale base is a conflict and changes nothing.
    assert!(matches!(
        s.push_app_state(&a, "contacts", 1, b"px", None).await,
        Err(StoreError::AppStateConflict { current: 2 })
    ));
    // Collections and accounts are separate.
    assert_eq!(
        s.push_app_state(&b, "contacts", 0, b"q1", None)
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        s.push_app_state(&a, "chat_settings", 0, b"c1", None)
            .await
            .unwrap(),
        1
    );
    let f = s.fetch_app_state(&a, "contacts", 0, 10).await.unwrap();
    assert_eq!(f.version, 2);
    assert_eq!(f.snapshot, None);
    assert_eq!(f.patches, vec![(1, b"p1".to_vec()), (2, b"p2".to_vec())]);
    let f = s.fetch_app_state(&a, "contacts", 1, 10).await.unwrap();
    assert_eq!(f.patches, vec![(2, b"p2".to_vec())]);
    let f = s.fetch_app_state(&a, "contacts", 0, 1).await.unwrap();
    assert_eq!(f.patches, vec![(1, b"p1".to_vec())]);
    // A snapshot at 3; later patches follow it.
    assert_eq!(
        s.push_app_state(&a, "contacts", 2, b"p3", Some(b"s3"))
            .await
            .unwrap(),
        3
    );
    assert_eq!(
        s.push_app_state(&a, "contacts", 3, b"p4", None)
            .await
            .unwrap(),
        4
    );
    let f = s.fetch_app_state(&a, "contacts", 0, 10).await.unwrap();
    assert_eq!(f.version, 4);
    assert_eq!(f.snapshot, Some((3, b"s3".to_vec())));
    assert_eq!(f.patches, vec![(4, b"p4".to_vec())]);
    // A device past the snapshot gets patches only; the patches after the previous snapshot stay.
    let f = s.fetch_app_state(&a, "contacts", 1, 10).await.unwrap();
    assert_eq!(f.snapshot, Some((3, b"s3".to_vec())));
    let f = s.fetch_app_state(&a, "contacts", 3, 10).await.unwrap();
    assert_eq!(f.snapshot, None);
    assert_eq!(f.patches, vec![(4, b"p4".to_vec())]);
    // A second snapshot drops the patches up to the first one.
    assert_eq!(
        s.push_app_state(&a, "contacts", 4, b"p5", Some(b"s5"))
            .await
            .unwrap(),
        5
    );
    let f = s.fetch_app_state(&a, "contacts", 3, 10).await.unwrap();
    assert_eq!(f.snapshot, Some((5, b"s5".to_vec())));
    assert!(f.patches.is_empty());
    let f = s.fetch_app_state(&a, "contacts", 2, 10).await.unwrap();
    assert_eq!(f.snapshot, Some((5, b"s5".to_vec())));
    let f = s.fetch_app_state(&a, "contacts", 4, 10).await.unwrap();
    assert_eq!(f.snapshot, Some((5, b"s5".to_vec())));
    assert!(matches!(
        s.push_app_state(&a, "contacts", u64::MAX, b"x", None).await,
        Err(StoreError::AppStateConflict { .. }) | Err(StoreError::Backend(_))
    ));
}

fn group_state(id: u8, version: u64, members: &[(&PhoneNumber, bool)]) -> GroupState {
    GroupState {
        group: GroupRecord {
            id: natter_proto::GroupId::from_bytes([id; 16]),
            name: format!("group {id} v{version}"),
            description: "about".into(),
            version,
            all_members_may_edit: false,
            created_at_ms: 500,
        },
        members: members
            .iter()
            .map(|(p, admin)| GroupMemberRecord {
                phone: (*p).clone(),
                admin: *admin,
                added_at_version: 1,
            })
            .collect(),
    }
}

async fn groups(s: &dyn Store) {
    let (a, b) = two_accounts(s).await;
    let c = phone(3);
    s.create_account(&new_account(&c, 30)).await.unwrap();
    // A second device for B.
    let b2 = DeviceRecord {
        device_id: dev(2),
        ..device_record(&b, 21)
    };
    s.update_devices(
        &b,
        &super::DeviceListUpdate {
            device_list: vec![9],
            version: 2,
            added: vec![b2],
            removed: vec![],
        },
    )
    .await
    .unwrap();
    let gid = natter_proto::GroupId::from_bytes([7; 16]);
    assert_eq!(s.get_group(&gid).await.unwrap(), None);
    assert!(s.group_devices(&gid).await.unwrap().is_empty());

    // Created with its announcement, atomically; members come back ordered by number.
    let v1 = group_state(7, 1, &[(&b, false), (&a, true)]);
    let announce = |id: u8, to: Vec<(PhoneNumber, u32)>| {
        message(
            &a,
            1,
            mid(id),
            100,
            to.iter().map(|(p, d)| envelope(p, *d, b"change")).collect(),
        )
    };
    let queued = s
        .create_group(&v1, announce(1, vec![(b.clone(), 1), (b.clone(), 2)]))
        .await
        .unwrap();
    assert_eq!(queued.len(), 2);
    assert_eq!(queued[1].device_id, dev(2));
    let got = s.get_group(&gid).await.unwrap().unwrap();
    assert_eq!(got.group, v1.group);
    assert_eq!(
        got.members.iter().map(|m| &m.phone).collect::<Vec<_>>(),
        vec![&a, &b]
    );
    assert!(got.members[0].admin && !got.members[1].admin);
    assert_eq!(
        s.group_devices(&gid).await.unwrap(),
        vec![
            (a.clone(), dev(1)),
            (b.clone(), dev(1)),
            (b.clone(), dev(2))
        ]
    );
    assert_eq!(queue_of(s, &b).await.len(), 1);
    assert!(matches!(
        s.create_group(&v1, announce(2, vec![])).await,
        Err(StoreError::Conflict)
    ));

    // A failed announcement (a device that does not exist) leaves nothing behind.
    let other = group_state(8, 1, &[(&a, true)]);
    assert!(matches!(
        s.create_group(&other, announce(3, vec![(c.clone(), 4)]))
            .await,
        Err(StoreError::NoSuchDevice)
    ));
    assert_eq!(s.get_group(&other.group.id).await.unwrap(), None);

    // Updates are conditional on the version.
    let v2 = group_state(7, 2, &[(&a, true), (&c, false)]);
    assert!(matches!(
        s.update_group(5, &v2, announce(4, vec![])).await,
        Err(StoreError::Conflict)
    ));
    assert!(matches!(
        s.update_group(1, &group_state(9, 2, &[(&a, true)]), announce(5, vec![]))
            .await,
        Err(StoreError::NoSuchGroup)
    ));
    let queued = s
        .update_group(1, &v2, announce(6, vec![(c.clone(), 1), (b.clone(), 1)]))
        .await
        .unwrap();
    assert_eq!(queued.len(), 2);
    assert_eq!(s.get_group(&gid).await.unwrap().unwrap(), v2);
    assert_eq!(
        s.group_devices(&gid).await.unwrap(),
        vec![(a.clone(), dev(1)), (c.clone(), dev(1))]
    );
    assert_eq!(s.groups_of(&a).await.unwrap(), vec![gid]);
    assert!(s.groups_of(&b).await.unwrap().is_empty());
    s.create_group(&group_state(3, 1, &[(&a, true)]), announce(7, vec![]))
        .await
        .unwrap();
    assert_eq!(
        s.groups_of(&a).await.unwrap(),
        vec![natter_proto::GroupId::from_bytes([3; 16]), gid]
    );

    // Who blocked a sender, among the members.
    assert!(s.group_blockers(&gid, &a).await.unwrap().is_empty());
    s.set_blocked(&c, &a, true).await.unwrap();
    s.set_blocked(&b, &a, true).await.unwrap(); // not a member any more
    assert_eq!(s.group_blockers(&gid, &a).await.unwrap(), vec![c.clone()]);
    assert!(s.group_blockers(&gid, &c).await.unwrap().is_empty());

    // The last member leaving deletes the group.
    s.update_group(2, &group_state(7, 3, &[]), announce(8, vec![]))
        .await
        .unwrap();
    assert_eq!(s.get_group(&gid).await.unwrap(), None);
    assert_eq!(s.groups_of(&c).await.unwrap(), vec![]);
}

/// Generates one `#[tokio::test]` per suite function and backend: `memory_store::NAME`,
/// `sqlite_store::NAME` and `postgres_store::NAME`.
macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod memory_store {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(&super::MemoryStore::new()).await;
                }
            )*
        }
        mod sqlite_store {
            $(
                #[tokio::test]
                async fn $name() {
                    let (_dir, store) = super::temp_sqlite().await;
                    super::$name(&store).await;
                }
            )*
        }
        #[cfg(feature = "postgres")]
        mod postgres_store {
            $(
                #[tokio::test]
                async fn $name() {
                    let Some((store, _schema)) = super::postgres_only::temp_postgres().await else {
                        return;
                    };
                    super::$name(&store).await;
                }
            )*
        }
    };
}

async fn social(s: &impl Store) {
    use natter_proto::social::Visibility;
    let (a, b, c, stranger) = (phone(1), phone(2), phone(3), phone(99));
    s.create_account(&new_account(&a, 1)).await.unwrap();
    s.create_account(&new_account(&b, 2)).await.unwrap();
    s.create_account(&new_account(&c, 3)).await.unwrap();
    // Discovery reads: registered ones only, once each, whatever the input order and repeats.
    let asked = vec![stranger.clone(), c.clone(), b.clone(), c.clone()];
    assert_eq!(
        s.registered_among(&asked).await.unwrap(),
        vec![b.clone(), c.clone()]
    );
    assert!(s.registered_among(&[]).await.unwrap().is_empty());

    s.add_contacts(&a, &[b.clone(), c.clone()]).await.unwrap();
    s.add_contacts(&a, std::slice::from_ref(&b)).await.unwrap();
    assert!(s.is_contact(&a, &b).await.unwrap());
    assert!(!s.is_contact(&b, &a).await.unwrap(), "contacts are one-way");
    s.remove_contacts(&a, &[b.clone(), stranger.clone()])
        .await
        .unwrap();
    assert!(!s.is_contact(&a, &b).await.unwrap());
    assert!(s.is_contact(&a, &c).await.unwrap());

    assert_eq!(s.get_profile(&a).await.unwrap(), None);
    s.set_profile(&a, b"sealed-1", 10).await.unwrap();
    s.set_profile(&a, b"sealed-2", 20).await.unwrap();
    assert_eq!(
        s.get_profile(&a).await.unwrap(),
        Some((b"sealed-2".to_vec(), 20))
    );

    assert_eq!(s.get_privacy(&a).await.unwrap(), PrivacyRecord::default());
    assert_eq!(
        PrivacyRecord::default().last_seen,
        Visibility::Everyone,
        "last seen is visible by default"
    );
    let strict = PrivacyRecord {
        last_seen: Visibility::Nobody,
        read_receipts_off: true,
    };
    s.set_privacy(&a, strict).await.unwrap();
    assert_eq!(s.get_privacy(&a).await.unwrap(), strict);
    assert_eq!(s.get_privacy(&b).await.unwrap(), PrivacyRecord::default());

    s.set_blocked(&a, &c, true).await.unwrap();
    s.set_blocked(&a, &b, true).await.unwrap();
    s.set_blocked(&a, &b, true).await.unwrap();
    assert!(s.is_blocked(&a, &b).await.unwrap());
    assert!(!s.is_blocked(&b, &a).await.unwrap());
    assert_eq!(s.blocked(&a).await.unwrap(), vec![b.clone(), c.clone()]);
    s.set_blocked(&a, &b, false).await.unwrap();
    assert_eq!(s.blocked(&a).await.unwrap(), vec![c.clone()]);
    assert!(s.blocked(&b).await.unwrap().is_empty());
}

conformance!(
    groups,
    social,
    device_list_updates,
    codes,
    create_account_new,
    create_account_replaces,
    devices,
    one_time_keys,
    enqueue_stores,
    enqueue_duplicate,
    enqueue_unknown_device,
    load_queue_paging,
    ack,
    expire,
    out_of_range,
    blobs,
    app_state,
);

// ---- SQLite only ----

async fn temp_sqlite() -> (tempfile::TempDir, SqliteStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("natter.db"))
        .await
        .unwrap();
    (dir, store)
}

/// Closing finishes the writes handed over before it, then closes the file cleanly (SQLite removes its
/// write-ahead log when the last connection closes) and refuses what comes after.
#[tokio::test]
async fn sqlite_store_close_finishes_writes_then_refuses_more() {
    let (dir, s) = temp_sqlite().await;
    let s = std::sync::Arc::new(s);
    let (a, b) = two_accounts(&*s).await;
    let wal = dir.path().join("natter.db-wal");
    assert!(wal.exists(), "an open store in WAL mode has its log");
    let write = {
        let (s, a, b) = (s.clone(), a.clone(), b.clone());
        tokio::spawn(async move {
            s.enqueue(message(&a, 1, mid(1), 100, vec![envelope(&b, 1, b"last")]))
                .await
        })
    };
    tokio::task::yield_now().await;
    s.close().await;
    // The enqueue either went in before the close (and is durable) or was refused: never lost quietly.
    let written = write.await.unwrap().is_ok();
    assert!(
        !wal.exists(),
        "the write-ahead log is checkpointed and removed"
    );
    assert!(
        s.save_code(&pending_code(&a)).await.is_err(),
        "a closed store takes no more writes"
    );
    let again = SqliteStore::open(&dir.path().join("natter.db"))
        .await
        .unwrap();
    assert_eq!(queue_of(&again, &b).await.len(), usize::from(written));
}

#[tokio::test]
async fn sqlite_store_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nested.db");
    let (a, b) = (phone(1), phone(2));
    let code = CodeRecord {
        phone: a.clone(),
        code_hash: [1; 32],
        sent_at_ms: 1,
        expires_at_ms: 2,
        attempts: 3,
    };
    let queued = {
        let s = SqliteStore::open(&path).await.unwrap();
        assert_eq!(s.path(), path);
        two_accounts(&s).await;
        s.save_code(&code).await.unwrap();
        s.add_one_time_keys(&b, DeviceId::PRIMARY, &[prekey("k", 1), prekey("l", 2)])
            .await
            .unwrap();
        s.set_fallback_key(&b, DeviceId::PRIMARY, &prekey("f", 3))
            .await
            .unwrap();
        stored(
            s.enqueue(message(&a, 1, mid(1), 100, vec![envelope(&b, 1, b"kept")]))
                .await
                .unwrap(),
        )
    }; // dropped: the writer stops

    let s = SqliteStore::open(&path).await.unwrap();
    assert_eq!(s.get_code(&a).await.unwrap(), Some(code));
    assert_eq!(
        s.get_account(&b).await.unwrap(),
        Some(new_account(&b, 20).account)
    );
    assert_eq!(
        s.list_devices(&a).await.unwrap(),
        vec![device_record(&a, 10)]
    );
    assert_eq!(
        s.count_one_time_keys(&b, DeviceId::PRIMARY).await.unwrap(),
        2
    );
    assert_eq!(queue_of(&s, &b).await, queued);
    assert_eq!(
        s.enqueue(message(&a, 1, mid(1), 999, vec![]))
            .await
            .unwrap(),
        EnqueueOutcome::Duplicate { server_ts_ms: 100 }
    );
    let next = stored(
        s.enqueue(message(&a, 1, mid(2), 100, vec![envelope(&b, 1, b"more")]))
            .await
            .unwrap(),
    );
    assert!(next[0].seq > queued[0].seq);
    assert_eq!(
        s.claim_prekey(&b, DeviceId::PRIMARY)
            .await
            .unwrap()
            .unwrap()
            .prekey,
        prekey("k", 1)
    );
    drop(s);

    // The migration ran once.
    let mut conn = <sqlx::SqliteConnection as sqlx::Connection>::connect(&format!(
        "sqlite://{}",
        path.display()
    ))
    .await
    .unwrap();
    let versions: Vec<i64> = sqlx::query_scalar("SELECT version FROM schema_version")
        .fetch_all(&mut conn)
        .await
        .unwrap();
    assert_eq!(versions, vec![1, 2, 3, 4, 5]);
}

#[tokio::test]
async fn sqlite_store_corrupt_rows() {
    let (dir, s) = temp_sqlite().await;
    let (a, b) = two_accounts(&s).await;
    let url = format!("sqlite://{}", dir.path().join("natter.db").display());
    let mut conn = <sqlx::SqliteConnection as sqlx::Connection>::connect(&url)
        .await
        .unwrap();
    let mut tamper = async |sql: &'static str| {
        sqlx::query(sql).execute(&mut conn).await.unwrap();
    };
    // A key of the wrong length.
    tamper("UPDATE accounts SET account_key = x'0102' WHERE phone = '+15550000001'").await;
    // A device id out of range.
    tamper("UPDATE devices SET device_id = 99 WHERE phone = '+15550000002'").await;
    // An invalid sender number in a queued envelope.
    tamper(
        "INSERT INTO queue (phone, device_id, sender, sender_device, message_id, server_ts_ms, \
         olm_type, ciphertext, expires_at_ms) VALUES ('+15550000001', 1, 'garbage', 1, zeroblob(16), \
         1, 1, x'', 10)",
    )
    .await;
    for result in [
        s.get_account(&a).await.map(|_| ()),
        s.list_devices(&b).await.map(|_| ()),
        s.load_queue(&a, DeviceId::PRIMARY, 0, 10).await.map(|_| ()),
    ] {
        assert!(matches!(result, Err(StoreError::Corrupt(_))), "{result:?}");
    }
    // Rows that decode are still served.
    assert!(s.get_account(&b).await.unwrap().is_some());
    assert!(s.get_device(&a, DeviceId::PRIMARY).await.unwrap().is_some());
}

/// 200 concurrent senders on a multi-threaded runtime: every enqueue succeeds, seqs are distinct.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_store_concurrent_enqueue() {
    const N: u32 = 200;
    let (_dir, s) = temp_sqlite().await;
    let (a, b) = two_accounts(&s).await;
    let commits_before = s.commits();
    let started = std::time::Instant::now();
    let mut tasks = Vec::new();
    for i in 0..N {
        let (s, a, b) = (s.clone(), a.clone(), b.clone());
        tasks.push(tokio::spawn(async move {
            let mut id = [0u8; 16];
            id[..4].copy_from_slice(&i.to_be_bytes());
            let msg = message(
                &a,
                1,
                MessageId::from_bytes(id),
                100,
                vec![envelope(&b, 1, &i.to_be_bytes())],
            );
            stored(s.enqueue(msg).await.unwrap())
        }));
    }
    let mut all = HashSet::new();
    for task in tasks {
        for env in task.await.unwrap() {
            assert!(all.insert(env.seq), "seq {} handed out twice", env.seq);
        }
    }
    let elapsed = started.elapsed();
    let commits = s.commits() - commits_before;
    eprintln!(
        "{N} concurrent enqueues: {elapsed:?} ({:.0}/s), {commits} commits",
        f64::from(N) / elapsed.as_secs_f64()
    );
    assert_eq!(all.len(), N as usize);
    assert!(commits <= u64::from(N));
    let queue = queue_of(&s, &b).await;
    assert_eq!(queue.len(), N as usize);
    assert_eq!(queue.iter().map(|e| e.seq).collect::<HashSet<_>>(), all);
}

/// On a current-thread runtime every task sends before the writer runs, so all of them land in one batch
/// and one commit.
#[tokio::test]
async fn sqlite_store_group_commit_batches() {
    let (_dir, s) = temp_sqlite().await;
    let (a, b) = two_accounts(&s).await;
    let commits_before = s.commits();
    let tasks: Vec<_> = (0..100u8)
        .map(|i| {
            let (s, a, b) = (s.clone(), a.clone(), b.clone());
            tokio::spawn(async move {
                s.enqueue(message(&a, 1, mid(i), 100, vec![envelope(&b, 1, &[i])]))
                    .await
            })
        })
        .collect();
    for task in tasks {
        stored(task.await.unwrap().unwrap());
    }
    assert_eq!(s.commits() - commits_before, 1, "one batch, one commit");
    assert_eq!(queue_of(&s, &b).await.len(), 100);
}

/// A run of enqueues in one batch is written with multi-row statements, and an acknowledgement between
/// them waits until after the run: every message still gets its envelopes in the order given, with the
/// sequences the queue holds, and the acknowledged envelope is gone.
#[tokio::test]
async fn sqlite_store_enqueue_run_matches_the_queue() {
    const N: u8 = 250; // 500 envelopes: every chunk size of the multi-row statements is used
    let (_dir, s) = temp_sqlite().await;
    let (a, b) = two_accounts(&s).await;
    let old = stored(
        s.enqueue(message(&a, 1, mid(255), 50, vec![envelope(&b, 1, b"old")]))
            .await
            .unwrap(),
    );
    let commits_before = s.commits();
    let mut tasks = Vec::new();
    for i in 0..N {
        if i == N / 2 {
            let (s, b, seq) = (s.clone(), b.clone(), old[0].seq);
            tasks.push(tokio::spawn(async move {
                s.ack(&b, dev(1), &[seq]).await.unwrap();
                Vec::new()
            }));
        }
        let (s, a, b) = (s.clone(), a.clone(), b.clone());
        tasks.push(tokio::spawn(async move {
            let msg = message(
                &b,
                1,
                mid(i),
                100 + u64::from(i),
                vec![envelope(&a, 1, &[i, 0]), envelope(&b, 1, &[i, 1])],
            );
            stored(s.enqueue(msg).await.unwrap())
        }));
    }
    let mut to_a = Vec::new();
    let mut to_b = Vec::new();
    for task in tasks {
        let envs = task.await.unwrap();
        if envs.is_empty() {
            continue; // the acknowledgement
        }
        assert_eq!(envs.len(), 2);
        let i = envs[0].ciphertext[0];
        assert_eq!(
            (envs[0].phone.clone(), envs[0].ciphertext.clone()),
            (a.clone(), vec![i, 0])
        );
        assert_eq!(
            (envs[1].phone.clone(), envs[1].ciphertext.clone()),
            (b.clone(), vec![i, 1])
        );
        assert_eq!(envs[0].message_id, mid(i));
        assert_eq!(envs[1].server_ts_ms, 100 + u64::from(i));
        to_a.push(envs[0].clone());
        to_b.push(envs[1].clone());
    }
    assert_eq!(s.commits() - commits_before, 1, "one batch, one commit");
    to_a.sort_by_key(|e| e.seq);
    to_b.sort_by_key(|e| e.seq);
    assert_eq!(queue_of(&s, &a).await, to_a);
    assert_eq!(
        queue_of(&s, &b).await,
        to_b,
        "the acknowledged envelope is gone"
    );
    assert_eq!(to_a.len() + to_b.len(), 2 * usize::from(N));
}

/// A failing command is rolled back alone; the rest of its batch commits.
#[tokio::test]
async fn sqlite_store_failure_isolated_in_batch() {
    let (_dir, s) = temp_sqlite().await;
    let (a, b) = two_accounts(&s).await;
    let commits_before = s.commits();
    // The bad message's first envelope is valid and gets inserted before the foreign key rejects the
    // second (device 2 does not exist): its savepoint must undo the first too.
    let bad = message(
        &a,
        1,
        mid(2),
        100,
        vec![envelope(&b, 1, b"undone"), envelope(&b, 2, b"no device")],
    );
    let (good1, bad, touch, good2, dup) = tokio::join!(
        s.enqueue(message(&a, 1, mid(1), 100, vec![envelope(&b, 1, b"one")])),
        s.enqueue(bad),
        s.touch_device(&b, dev(3), 5),
        s.enqueue(message(&a, 1, mid(3), 100, vec![envelope(&b, 1, b"three")])),
        s.enqueue(message(&a, 1, mid(1), 200, vec![envelope(&b, 1, b"dup")])),
    );
    assert_eq!(s.commits() - commits_before, 1, "one batch");
    let good1 = stored(good1.unwrap());
    let good2 = stored(good2.unwrap());
    assert!(matches!(bad, Err(StoreError::NoSuchDevice)), "{bad:?}");
    assert!(matches!(touch, Err(StoreError::NoSuchDevice)), "{touch:?}");
    assert_eq!(
        dup.unwrap(),
        EnqueueOutcome::Duplicate { server_ts_ms: 100 }
    );
    assert_eq!(
        queue_of(&s, &b).await,
        vec![good1[0].clone(), good2[0].clone()]
    );
    // The failed message left no idempotency record.
    let retry = message(&a, 1, mid(2), 300, vec![envelope(&b, 1, b"retry")]);
    assert_eq!(stored(s.enqueue(retry).await.unwrap()).len(), 1);
}

/// Once the writer task is gone (its runtime shut down), writes fail with `Backend` instead of hanging.
#[test]
fn sqlite_store_write_after_writer_gone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("natter.db");
    let first = tokio::runtime::Runtime::new().unwrap();
    let s = first.block_on(SqliteStore::open(&path)).unwrap();
    drop(first); // cancels the writer task
    let second = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    second.block_on(async move {
        let result = s.remove_code(&phone(1)).await;
        assert!(matches!(result, Err(StoreError::Backend(_))), "{result:?}");
        drop(s);
    });
}

// ---- PostgreSQL only ----

#[cfg(feature = "postgres")]
pub(crate) mod postgres_only {
    use std::time::Duration;

    use super::*;
    use crate::store::postgres::testing::TestSchema;
    use crate::store::postgres::{PgStore, PgUrl, latest_version, migrate};

    /// A store on a fresh schema (dropped with the guard), or `None` when PostgreSQL is not reachable
    /// and not required.
    pub(crate) async fn temp_postgres() -> Option<(PgStore, TestSchema)> {
        let schema = TestSchema::create().await.unwrap()?;
        let store = PgStore::open(&url(&schema, "pool_size=4")).await.unwrap();
        Some((store, schema))
    }

    fn url(schema: &TestSchema, extra: &str) -> PgUrl {
        format!("{}&{extra}", schema.url()).parse().unwrap()
    }

    #[tokio::test]
    async fn postgres_migrate_idempotent_and_concurrent() {
        let Some(schema) = TestSchema::create().await.unwrap() else {
            return;
        };
        let u = url(&schema, "pool_size=2");
        // Four migrators at once on an empty schema: each migration is applied exactly once.
        let (a, b, c, d) = tokio::join!(migrate(&u), migrate(&u), migrate(&u), migrate(&u));
        for v in [a, b, c, d] {
            assert_eq!(v.unwrap(), latest_version());
        }
        assert_eq!(migrate(&u).await.unwrap(), latest_version(), "again: no-op");
        let s = PgStore::open(&u).await.unwrap();
        let versions: Vec<i64> =
            sqlx::query_scalar("SELECT version FROM schema_version ORDER BY version")
                .fetch_all(s.pool())
                .await
                .unwrap();
        assert_eq!(versions, (1..=latest_version()).collect::<Vec<_>>());
        assert_eq!(s.schema_version().await.unwrap(), latest_version());
        // A database from a newer build is refused.
        sqlx::query("INSERT INTO schema_version (version, applied_at_ms) VALUES (999, 0)")
            .execute(s.pool())
            .await
            .unwrap();
        let newer = migrate(&u).await;
        assert!(matches!(newer, Err(StoreError::Backend(_))), "{newer:?}");
    }

    #[tokio::test]
    async fn postgres_store_corrupt_rows() {
        let Some((s, _schema)) = temp_postgres().await else {
            return;
        };
        let (a, b) = two_accounts(&s).await;
        for sql in [
            "UPDATE accounts SET account_key = '\\x0102' WHERE phone = '+15550000001'",
            "UPDATE devices SET device_id = 99 WHERE phone = '+15550000002'",
            "UPDATE devices SET last_seen_ms = -5 WHERE phone = '+15550000001'",
        ] {
            sqlx::query(sql).execute(s.pool()).await.unwrap();
        }
        // An envelope with an invalid sender (the foreign key only covers the recipient).
        sqlx::query(
            "INSERT INTO queue (phone, device_id, sender, sender_device, message_id, server_ts_ms, \
             olm_type, ciphertext, expires_at_ms) VALUES ('+15550000001', 1, 'garbage', 1, \
             '\\x00000000000000000000000000000000', 1, 1, '\\x', 10)",
        )
        .execute(s.pool())
        .await
        .unwrap();
        for result in [
            s.get_account(&a).await.map(|_| ()),
            s.list_devices(&b).await.map(|_| ()),
            s.get_device(&a, DeviceId::PRIMARY).await.map(|_| ()),
            s.load_queue(&a, DeviceId::PRIMARY, 0, 10).await.map(|_| ()),
        ] {
            assert!(matches!(result, Err(StoreError::Corrupt(_))), "{result:?}");
        }
        assert!(s.get_account(&b).await.unwrap().is_some());
    }

    /// Two stores on one database (two nodes): concurrent enqueues to one device get distinct seqs, and
    /// for that device seq order is commit order: a reader that resumes after the highest seq it saw
    /// never misses an envelope committed later.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_two_nodes_concurrent_enqueue() {
        const N: u32 = 200;
        let Some((node_a, schema)) = temp_postgres().await else {
            return;
        };
        let node_b = PgStore::open(&url(&schema, "pool_size=4")).await.unwrap();
        let (a, b) = two_accounts(&node_a).await;
        let reader = {
            let (s, b) = (node_b.clone(), b.clone());
            tokio::spawn(async move {
                // Pages "after the last seq seen", as a connection does; must end up with all N.
                let mut after = 0;
                let mut seen = Vec::new();
                let deadline = std::time::Instant::now() + Duration::from_secs(60);
                while seen.len() < N as usize && std::time::Instant::now() < deadline {
                    let page = s.load_queue(&b, DeviceId::PRIMARY, after, 7).await.unwrap();
                    for e in &page {
                        after = e.seq;
                        seen.push(e.seq);
                    }
                    if page.is_empty() {
                        tokio::task::yield_now().await;
                    }
                }
                seen
            })
        };
        let mut tasks = Vec::new();
        for i in 0..N {
            let s = if i % 2 == 0 {
                node_a.clone()
            } else {
                node_b.clone()
            };
            let (a, b) = (a.clone(), b.clone());
            tasks.push(tokio::spawn(async move {
                let mut id = [0u8; 16];
                id[..4].copy_from_slice(&i.to_be_bytes());
                let msg = message(
                    &a,
                    1,
                    MessageId::from_bytes(id),
                    100,
                    vec![envelope(&b, 1, &i.to_be_bytes())],
                );
                stored(s.enqueue(msg).await.unwrap())
            }));
        }
        let mut all = HashSet::new();
        for task in tasks {
            for env in task.await.unwrap() {
                assert!(all.insert(env.seq), "seq {} handed out twice", env.seq);
            }
        }
        let seen = reader.await.unwrap();
        assert_eq!(seen.len(), N as usize, "the paging reader missed envelopes");
        assert_eq!(seen.iter().copied().collect::<HashSet<_>>(), all);
    }

    /// The device-list compare-and-set across two nodes: of many updates to the same version, exactly
    /// one wins; the others get `Conflict`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_two_nodes_device_list_cas() {
        let Some((node_a, schema)) = temp_postgres().await else {
            return;
        };
        let node_b = PgStore::open(&url(&schema, "pool_size=4")).await.unwrap();
        let (a, _b) = two_accounts(&node_a).await;
        let mut tasks = Vec::new();
        for i in 0..16u8 {
            let s = if i % 2 == 0 {
                node_a.clone()
            } else {
                node_b.clone()
            };
            let a = a.clone();
            tasks.push(tokio::spawn(async move {
                let update = crate::store::DeviceListUpdate {
                    device_list: vec![i],
                    version: 2,
                    added: vec![DeviceRecord {
                        device_id: dev(2),
                        ..device_record(&a, i)
                    }],
                    removed: vec![],
                };
                s.update_devices(&a, &update).await
            }));
        }
        let mut wins = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(()) => wins += 1,
                Err(StoreError::Conflict) => {}
                Err(e) => panic!("unexpected {e:?}"),
            }
        }
        assert_eq!(wins, 1);
        assert_eq!(node_b.list_devices(&a).await.unwrap().len(), 2);
        // Concurrent prekey claims on two nodes never hand out one key twice.
        let keys: Vec<_> = (0..20u8).map(|i| prekey(&format!("k{i}"), i)).collect();
        node_a
            .add_one_time_keys(&a, DeviceId::PRIMARY, &keys)
            .await
            .unwrap();
        let claims: Vec<_> = (0..20)
            .map(|i| {
                let s = if i % 2 == 0 {
                    node_a.clone()
                } else {
                    node_b.clone()
                };
                let a = a.clone();
                tokio::spawn(async move { s.claim_prekey(&a, DeviceId::PRIMARY).await })
            })
            .collect();
        let mut ids = HashSet::new();
        for c in claims {
            let claimed = c.await.unwrap().unwrap().unwrap();
            assert!(!claimed.fallback);
            assert!(ids.insert(claimed.prekey.key_id));
        }
        assert_eq!(ids.len(), 20);
    }

    /// A TCP relay in front of the real PostgreSQL that a test can cut (every connection dropped, new
    /// ones refused) and restore, to see the store fail with `Unavailable` and recover by itself.
    struct Relay {
        addr: std::net::SocketAddr,
        up: std::sync::Arc<std::sync::atomic::AtomicBool>,
        generation: tokio::sync::watch::Sender<u64>,
    }

    impl Relay {
        async fn start(target: String) -> Relay {
            use std::sync::atomic::Ordering;
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let up = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
            let (generation, _) = tokio::sync::watch::channel(0u64);
            let (up2, gen2) = (up.clone(), generation.clone());
            tokio::spawn(async move {
                loop {
                    let Ok((mut inbound, _)) = listener.accept().await else {
                        return;
                    };
                    if !up2.load(Ordering::SeqCst) {
                        continue; // dropped: the client sees the connection closed
                    }
                    let target = target.clone();
                    let mut cut = gen2.subscribe();
                    tokio::spawn(async move {
                        let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await else {
                            return;
                        };
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                            _ = cut.changed() => {}
                        }
                    });
                }
            });
            Relay {
                addr,
                up,
                generation,
            }
        }

        fn set_up(&self, up: bool) {
            self.up.store(up, std::sync::atomic::Ordering::SeqCst);
            if !up {
                self.generation.send_modify(|g| *g += 1);
            }
        }
    }

    #[tokio::test]
    async fn postgres_outage_is_unavailable_then_recovers() {
        let Some((direct, schema)) = temp_postgres().await else {
            return;
        };
        let (a, b) = two_accounts(&direct).await;
        let target = {
            let opts: sqlx::postgres::PgConnectOptions = schema.url().parse().unwrap();
            format!("{}:{}", opts.get_host(), opts.get_port())
        };
        let relay = Relay::start(target).await;
        // The same URL, through the relay (the driver applies host/port parameters last).
        let through = format!(
            "{}&host=127.0.0.1&port={}&pool_size=2&acquire_timeout_ms=500",
            schema.url(),
            relay.addr.port()
        );
        let s = PgStore::open(&through.parse().unwrap()).await.unwrap();
        let send = |i: u8| message(&a, 1, mid(i), 100, vec![envelope(&b, 1, &[i])]);
        stored(s.enqueue(send(1)).await.unwrap());

        relay.set_up(false);
        let started = std::time::Instant::now();
        let down = s.enqueue(send(2)).await;
        assert!(matches!(down, Err(StoreError::Unavailable(_))), "{down:?}");
        assert!(started.elapsed() < Duration::from_secs(5), "fails fast");
        let read = s.get_account(&a).await;
        assert!(matches!(read, Err(StoreError::Unavailable(_))), "{read:?}");
        // Handlers turn it into a retryable error for the client.
        let err = crate::handlers::store_error(read.unwrap_err());
        assert_eq!(err.code(), natter_proto::wire::ErrorCode::Unavailable);
        assert!(err.retry_after_ms > 0);

        relay.set_up(true);
        // The pool reconnects by itself: the retried send is stored exactly once.
        let mut outcome = None;
        for _ in 0..50 {
            match s.enqueue(send(2)).await {
                Ok(o) => {
                    outcome = Some(o);
                    break;
                }
                Err(StoreError::Unavailable(_)) => {
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                Err(e) => panic!("{e:?}"),
            }
        }
        assert!(outcome.is_some(), "store did not recover");
        let queue = queue_of(&direct, &b).await;
        assert_eq!(queue.len(), 2);
        assert_eq!(queue[1].ciphertext, vec![2]);
    }
}
