//! The conformance suite every [`ClientStore`] backend runs, instantiated for [`MemoryStore`]
//! (`memory_store::*`) and [`SqliteStore`] (`sqlite_store::*`), plus SQLite-only tests (durability across
//! reopening, corrupt rows, schema versions, file permissions, concurrent writers).

use natter_proto::{DeviceId, MessageId, PhoneNumber};

use super::memory::MemoryStore;
use super::sqlite::SqliteStore;
use super::{
    Changes, ClientStore, FailureRecord, IdentityRecord, MediaRecord, MessageKind, MessageRecord,
    MessageStatus, OutboxRecord, OutboxState, PeerRecord, SessionRecord, StatusUpdate, StoreError,
    UploadRecord,
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

const ALL_STATUSES: [MessageStatus; 6] = [
    MessageStatus::Pending,
    MessageStatus::Sent,
    MessageStatus::Delivered,
    MessageStatus::Read,
    MessageStatus::Received,
    MessageStatus::Failed,
];

fn identity(seed: u8) -> IdentityRecord {
    IdentityRecord {
        phone: phone(1),
        device_id: DeviceId::PRIMARY,
        registered: false,
        account_key: [seed; 32],
        account_secret: Some(vec![seed; 48]),
        device_pickle: format!("device-pickle-{seed}"),
        noise_secret: vec![seed.wrapping_add(1); 48],
        device_name: format!("phone {seed}"),
    }
}

fn session(p: &PhoneNumber, device: u32, id: &str, last_used_ms: u64) -> SessionRecord {
    SessionRecord {
        phone: p.clone(),
        device_id: dev(device),
        session_id: id.to_owned(),
        pickle: format!("pickle-{id}-{last_used_ms}"),
        last_used_ms,
    }
}

fn peer(p: &PhoneNumber, seed: u8) -> PeerRecord {
    PeerRecord {
        phone: p.clone(),
        account_key: [seed; 32],
        device_list: vec![seed, 1, 2, 3],
        device_list_version: u64::from(seed),
        key_changed_at_ms: None,
    }
}

fn msg(chat: &PhoneNumber, id: MessageId, status: MessageStatus) -> MessageRecord {
    let from_me = !matches!(status, MessageStatus::Received);
    MessageRecord {
        chat: chat.clone(),
        id,
        from_me,
        sender_device: if from_me { DeviceId::PRIMARY } else { dev(2) },
        kind: MessageKind::Text,
        text: format!("text {}", id.to_hex()),
        sent_at_ms: 1_000,
        server_ts_ms: if status == MessageStatus::Pending {
            0
        } else {
            2_000
        },
        status,
        shown: from_me,
        seq: 0,
        media: None,
    }
}

fn outbox(transport: MessageId, created_ms: u64) -> OutboxRecord {
    OutboxRecord {
        transport_id: transport,
        logical_id: mid(200),
        peer: phone(2),
        content: vec![1, 2, 3, transport.as_bytes()[0]],
        only_device: None,
        retry_of: None,
        retry_attempt: 0,
        created_ms,
        state: OutboxState::Queued,
    }
}

fn failure(sender: &PhoneNumber, original: MessageId, attempts: u32) -> FailureRecord {
    FailureRecord {
        sender: sender.clone(),
        sender_device: dev(3),
        original_id: original,
        attempts,
        server_ts_ms: 5_000,
    }
}

fn status(chat: &PhoneNumber, id: MessageId, status: MessageStatus, ts: u64) -> StatusUpdate {
    StatusUpdate {
        chat: chat.clone(),
        id,
        status,
        server_ts_ms: ts,
    }
}

async fn save(s: &dyn ClientStore, changes: Changes) {
    s.save_changes(changes).await.unwrap();
}

/// What a stored message should look like: as inserted, with the seq the store gave it.
fn stored(record: &MessageRecord, seq: i64) -> MessageRecord {
    MessageRecord {
        seq,
        ..record.clone()
    }
}

fn ids(records: &[MessageRecord]) -> Vec<MessageId> {
    records.iter().map(|m| m.id).collect()
}

fn transport_ids(records: &[OutboxRecord]) -> Vec<MessageId> {
    records.iter().map(|o| o.transport_id).collect()
}

// ---- the suite ----

async fn empty(s: &dyn ClientStore) {
    let (a, m) = (phone(2), mid(1));
    save(s, Changes::default()).await;
    assert!(Changes::default().is_empty());
    assert_eq!(s.identity().await.unwrap(), None);
    assert_eq!(s.setting("k").await.unwrap(), None);
    assert!(s.sessions(&a, DeviceId::PRIMARY).await.unwrap().is_empty());
    assert_eq!(s.peer(&a).await.unwrap(), None);
    assert!(!s.is_processed(&a, &m).await.unwrap());
    assert_eq!(s.message(&a, &m).await.unwrap(), None);
    assert!(s.history(&a).await.unwrap().is_empty());
    assert!(s.unshown().await.unwrap().is_empty());
    assert!(s.queued_outbox().await.unwrap().is_empty());
    assert_eq!(s.outbox_entry(&m).await.unwrap(), None);
    assert_eq!(s.failure(&a, &m).await.unwrap(), None);
}

async fn wipe(s: &dyn ClientStore) {
    let (a, m) = (phone(2), mid(1));
    save(
        s,
        Changes {
            identity: Some(identity(1)),
            settings: vec![("server".to_owned(), Some(b"127.0.0.1:1".to_vec()))],
            processed: vec![(a.clone(), m)],
            ..Changes::default()
        },
    )
    .await;
    save(
        s,
        Changes {
            wipe: true,
            ..Changes::default()
        },
    )
    .await;
    assert_eq!(s.identity().await.unwrap(), None);
    assert!(!s.is_processed(&a, &m).await.unwrap());
    assert_eq!(
        s.setting("server").await.unwrap(),
        Some(b"127.0.0.1:1".to_vec()),
        "settings survive a wipe"
    );
    // A wipe and new state in one step: the new state stays.
    save(
        s,
        Changes {
            wipe: true,
            identity: Some(identity(2)),
            ..Changes::default()
        },
    )
    .await;
    assert_eq!(s.identity().await.unwrap(), Some(identity(2)));
}

async fn identity_round_trip(s: &dyn ClientStore) {
    let first = identity(1);
    save(
        s,
        Changes {
            identity: Some(first.clone()),
            ..Changes::default()
        },
    )
    .await;
    assert_eq!(s.identity().await.unwrap(), Some(first.clone()));

    // Completed at verify: replaced as a whole.
    let verified = IdentityRecord {
        registered: true,
        device_pickle: "updated".to_owned(),
        ..first
    };
    save(
        s,
        Changes {
            identity: Some(verified.clone()),
            ..Changes::default()
        },
    )
    .await;
    assert_eq!(s.identity().await.unwrap(), Some(verified));

    // A companion: another number, device, no account secret, empty fields.
    let companion = IdentityRecord {
        phone: phone(9),
        device_id: dev(3),
        registered: true,
        account_key: [7; 32],
        account_secret: None,
        device_pickle: String::new(),
        noise_secret: Vec::new(),
        device_name: "laptop ✓".to_owned(),
    };
    save(
        s,
        Changes {
            identity: Some(companion.clone()),
            ..Changes::default()
        },
    )
    .await;
    assert_eq!(s.identity().await.unwrap(), Some(companion.clone()));

    // Changes without an identity leave it alone.
    save(
        s,
        Changes {
            settings: vec![("x".to_owned(), Some(vec![1]))],
            ..Changes::default()
        },
    )
    .await;
    assert_eq!(s.identity().await.unwrap(), Some(companion));
}

async fn settings(s: &dyn ClientStore) {
    let set = |k: &str, v: Option<&[u8]>| (k.to_owned(), v.map(<[u8]>::to_vec));
    save(
        s,
        Changes {
            settings: vec![
                set("a", Some(b"1")),
                set("b", Some(b"")),
                set("c", Some(b"3")),
            ],
            ..Changes::default()
        },
    )
    .await;
    assert_eq!(s.setting("a").await.unwrap(), Some(b"1".to_vec()));
    assert_eq!(
        s.setting("b").await.unwrap(),
        Some(Vec::new()),
        "empty value kept"
    );
    assert_eq!(s.setting("c").await.unwrap(), Some(b"3".to_vec()));
    assert_eq!(
        s.setting("A").await.unwrap(),
        None,
        "keys are case-sensitive"
    );

    // Overwrite, delete, delete something missing; in one Changes, applied in order.
    save(
        s,
        Changes {
            settings: vec![
                set("a", Some(b"one")),
                set("b", None),
                set("missing", None),
                set("c", None),
                set("c", Some(b"again")),
                set("d", Some(b"4")),
                set("d", None),
            ],
            ..Changes::default()
        },
    )
    .await;
    assert_eq!(s.setting("a").await.unwrap(), Some(b"one".to_vec()));
    assert_eq!(s.setting("b").await.unwrap(), None);
    assert_eq!(s.setting("missing").await.unwrap(), None);
    assert_eq!(s.setting("c").await.unwrap(), Some(b"again".to_vec()));
    assert_eq!(s.setting("d").await.unwrap(), None);
}

async fn sessions(s: &dyn ClientStore) {
    let (a, b) = (phone(2), phone(3));
    save(
        s,
        Changes {
            sessions: vec![
                session(&a, 1, "old", 100),
                session(&a, 1, "new", 300),
                session(&a, 1, "mid", 200),
                session(&a, 2, "other-device", 500),
                session(&b, 1, "other-peer", 600),
            ],
            ..Changes::default()
        },
    )
    .await;
    assert_eq!(
        s.sessions(&a, dev(1)).await.unwrap(),
        vec![
            session(&a, 1, "new", 300),
            session(&a, 1, "mid", 200),
            session(&a, 1, "old", 100),
        ]
    );
    assert_eq!(
        s.sessions(&a, dev(2)).await.unwrap(),
        vec![session(&a, 2, "other-device", 500)]
    );
    assert_eq!(
        s.sessions(&b, dev(1)).await.unwrap(),
        vec![session(&b, 1, "other-peer", 600)]
    );
    assert!(s.sessions(&b, dev(2)).await.unwrap().is_empty());
    assert!(s.sessions(&phone(4), dev(1)).await.unwrap().is_empty());

    // Using the oldest session replaces it (same session id) and makes it the newest.
    let used = SessionRecord {
        pickle: "ratcheted".to_owned(),
        last_used_ms: 400,
        ..session(&a, 1, "old", 100)
    };
    save(
        s,
        Changes {
            sessions: vec![used.clone()],
            ..Changes::default()
        },
    )
    .await;
    assert_eq!(
        s.sessions(&a, dev(1)).await.unwrap(),
        vec![used, session(&a, 1, "new", 300), session(&a, 1, "mid", 200),]
    );
    // The same session id under another device is another session.
    assert_eq!(s.sessions(&a, dev(2)).await.unwrap().len(), 1);

    // The peer's keys changed: every session with the device goes, except one made in the same step
    // (removals come first); other devices, other peers and devices without sessions are fine.
    save(
        s,
        Changes {
            sessions: vec![session(&a, 1, "fresh", 50)],
            sessions_removed: vec![(a.clone(), dev(1)), (b.clone(), dev(4)), (phone(4), dev(1))],
            ..Changes::default()
        },
    )
    .await;
    assert_eq!(
        s.sessions(&a, dev(1)).await.unwrap(),
        vec![session(&a, 1, "fresh", 50)]
    );
    assert_eq!(s.sessions(&a, dev(2)).await.unwrap().len(), 1);
    assert_eq!(s.sessions(&b, dev(1)).await.unwrap().len(), 1);
    save(
        s,
        Changes {
            sessions_removed: vec![(a.clone(), dev(1))],
            ..Changes::default()
        },
    )
    .await;
    assert!(s.sessions(&a, dev(1)).await.unwrap().is_empty());

    // Equal last use: ordered by session id; the last of two records with one key wins.
    save(
        s,
        Changes {
            sessions: vec![
                session(&b, 3, "y", 10),
                session(&b, 3, "x", 10),
                session(&b, 3, "z", 5),
                session(&b, 3, "z", 7),
            ],
            ..Changes::default()
        },
    )
    .await;
    assert_eq!(
        s.sessions(&b, dev(3)).await.unwrap(),
        vec![
            session(&b, 3, "x", 10),
            session(&b, 3, "y", 10),
            session(&b, 3, "z", 7),
        ]
    );
}

async fn peers(s: &dyn ClientStore) {
    let (a, b) = (phone(2), phone(3));
    save(
        s,
        Changes {
            peers: vec![peer(&a, 1), peer(&b, 2)],
            ..Changes::default()
        },
    )
    .await;
    assert_eq!(s.peer(&a).await.unwrap(), Some(peer(&a, 1)));
    assert_eq!(s.peer(&b).await.unwrap(), Some(peer(&b, 2)));
    assert_eq!(s.peer(&phone(4)).await.unwrap(), None);

    // Re-registration: new key, new list, the time of the change.
    let changed = PeerRecord {
        account_key: [9; 32],
        device_list: Vec::new(),
        device_list_version: 7,
        key_changed_at_ms: Some(12_345),
        ..peer(&a, 1)
    };
    save(
        s,
        Changes {
            peers: vec![changed.clone()],
            ..Changes::default()
        },
    )
    .await;
    assert_eq!(s.peer(&a).await.unwrap(), Some(changed.clone()));
    assert_eq!(s.peer(&b).await.unwrap(), Some(peer(&b, 2)));

    // And back to no change time (a replacement is whole).
    let cleared = PeerRecord {
        key_changed_at_ms: None,
        ..changed
    };
    save(
        s,
        Changes {
            peers: vec![cleared.clone()],
            ..Changes::default()
        },
    )
    .await;
    assert_eq!(s.peer(&a).await.unwrap(), Some(cleared));
}

async fn messages_inserted_once(s: &dyn ClientStore) {
    let (a, b) = (phone(2), phone(3));
    let mut first = msg(&a, mid(1), MessageStatus::Received);
    first.seq = 999; // ignored
    first.sent_at_ms = 5_000;
    let second = MessageRecord {
        kind: MessageKind::Notice,
        sent_at_ms: 3_000, // pending: the sender's clock places it (after the first's server time)
        ..msg(&a, mid(2), MessageStatus::Pending)
    };
    let other_chat = MessageRecord {
        kind: MessageKind::Undecryptable,
        text: String::new(),
        ..msg(&b, mid(1), MessageStatus::Received) // same id, other chat: another message
    };
    save(
        s,
        Changes {
            messages: vec![first.clone(), second.clone(), other_chat.clone()],
            ..Changes::default()
        },
    )
    .await;
    let history = s.history(&a).await.unwrap();
    assert_eq!(ids(&history), vec![mid(1), mid(2)]);
    let (seq1, seq2) = (history[0].seq, history[1].seq);
    assert!(seq1 > 0 && seq2 > seq1, "{seq1} {seq2}");
    assert_eq!(history, vec![stored(&first, seq1), stored(&second, seq2)]);
    let history_b = s.history(&b).await.unwrap();
    assert_eq!(history_b.len(), 1);
    assert!(history_b[0].seq > seq2);
    assert_eq!(history_b[0], stored(&other_chat, history_b[0].seq));
    assert_eq!(
        s.message(&a, &mid(1)).await.unwrap(),
        Some(stored(&first, seq1))
    );
    assert_eq!(s.message(&a, &mid(3)).await.unwrap(), None);
    assert_eq!(s.message(&phone(4), &mid(1)).await.unwrap(), None);

    // A second insert with the same (chat, id) changes nothing, `shown` included; a new one in the same
    // Changes is still inserted, after the others.
    let again = MessageRecord {
        text: "different".to_owned(),
        shown: !first.shown,
        status: MessageStatus::Read,
        server_ts_ms: 77,
        ..first.clone()
    };
    let third = MessageRecord {
        server_ts_ms: 4_000,
        ..msg(&a, mid(3), MessageStatus::Received)
    };
    save(
        s,
        Changes {
            messages: vec![again.clone(), third.clone(), again],
            ..Changes::default()
        },
    )
    .await;
    let history = s.history(&a).await.unwrap();
    assert_eq!(ids(&history), vec![mid(1), mid(2), mid(3)]);
    assert_eq!(history[0], stored(&first, seq1));
    assert!(history[2].seq > history_b[0].seq);
    assert_eq!(history[2], stored(&third, history[2].seq));
}

async fn status_rules(s: &dyn ClientStore) {
    let chat = phone(2);
    // Every (old, new) pair, each on its own message.
    let mut n = 0u8;
    let mut cases = Vec::new();
    for old in ALL_STATUSES {
        for new in ALL_STATUSES {
            n += 1;
            cases.push((mid(n), old, new));
        }
    }
    save(
        s,
        Changes {
            messages: cases
                .iter()
                .map(|&(id, old, _)| msg(&chat, id, old))
                .collect(),
            ..Changes::default()
        },
    )
    .await;
    save(
        s,
        Changes {
            statuses: cases
                .iter()
                .map(|&(id, _, new)| status(&chat, id, new, 9_000))
                .collect(),
            ..Changes::default()
        },
    )
    .await;
    let rank = |st: MessageStatus| match st {
        MessageStatus::Pending => Some(0),
        MessageStatus::Sent => Some(1),
        MessageStatus::Delivered => Some(2),
        MessageStatus::Read => Some(3),
        _ => None,
    };
    for &(id, old, new) in &cases {
        let applies = match (rank(old), rank(new)) {
            (Some(from), Some(to)) => to > from,
            _ => old == MessageStatus::Pending && new == MessageStatus::Failed,
        };
        let before = msg(&chat, id, old);
        let got = s.message(&chat, &id).await.unwrap().unwrap();
        if applies {
            assert_eq!(got.status, new, "{old:?} -> {new:?} applies");
            assert_eq!(got.server_ts_ms, 9_000, "{old:?} -> {new:?} sets the time");
        } else {
            assert_eq!(got.status, old, "{old:?} -> {new:?} is refused");
            assert_eq!(got.server_ts_ms, before.server_ts_ms, "{old:?} -> {new:?}");
        }
        assert_eq!(
            got,
            stored(
                &MessageRecord {
                    status: got.status,
                    server_ts_ms: got.server_ts_ms,
                    ..before
                },
                got.seq
            )
        );
    }
}

async fn status_updates(s: &dyn ClientStore) {
    let (a, b) = (phone(2), phone(3));
    let pending = msg(&a, mid(1), MessageStatus::Pending);
    // Inserted and acknowledged in one Changes: the insert comes first.
    save(
        s,
        Changes {
            messages: vec![pending.clone()],
            statuses: vec![status(&a, mid(1), MessageStatus::Sent, 1_500)],
            ..Changes::default()
        },
    )
    .await;
    let got = s.message(&a, &mid(1)).await.unwrap().unwrap();
    assert_eq!((got.status, got.server_ts_ms), (MessageStatus::Sent, 1_500));

    // A zero time keeps the recorded one; updates in one Changes apply in order.
    save(
        s,
        Changes {
            statuses: vec![
                status(&a, mid(1), MessageStatus::Read, 0),
                status(&a, mid(1), MessageStatus::Delivered, 8_000), // behind Read: ignored
                status(&b, mid(1), MessageStatus::Read, 3_000),      // no such message
                status(&a, mid(9), MessageStatus::Read, 3_000),      // no such message
            ],
            ..Changes::default()
        },
    )
    .await;
    let got = s.message(&a, &mid(1)).await.unwrap().unwrap();
    assert_eq!((got.status, got.server_ts_ms), (MessageStatus::Read, 1_500));
    assert_eq!(
        s.message(&b, &mid(1)).await.unwrap(),
        None,
        "updates insert nothing"
    );
    assert_eq!(s.message(&a, &mid(9)).await.unwrap(), None);

    // Pending -> Delivered directly (the ack was lost), then Sent is behind.
    save(
        s,
        Changes {
            messages: vec![msg(&a, mid(2), MessageStatus::Pending)],
            ..Changes::default()
        },
    )
    .await;
    save(
        s,
        Changes {
            statuses: vec![
                status(&a, mid(2), MessageStatus::Delivered, 0),
                status(&a, mid(2), MessageStatus::Sent, 2_500),
                status(&a, mid(2), MessageStatus::Failed, 2_600),
            ],
            ..Changes::default()
        },
    )
    .await;
    let got = s.message(&a, &mid(2)).await.unwrap().unwrap();
    assert_eq!(
        (got.status, got.server_ts_ms),
        (MessageStatus::Delivered, 0)
    );

    // Failed is final.
    save(
        s,
        Changes {
            messages: vec![msg(&a, mid(3), MessageStatus::Pending)],
            statuses: vec![
                status(&a, mid(3), MessageStatus::Failed, 0),
                status(&a, mid(3), MessageStatus::Sent, 3_000),
            ],
            ..Changes::default()
        },
    )
    .await;
    let got = s.message(&a, &mid(3)).await.unwrap().unwrap();
    assert_eq!((got.status, got.server_ts_ms), (MessageStatus::Failed, 0));
}

async fn shown_and_unshown(s: &dyn ClientStore) {
    let (a, b) = (phone(2), phone(3));
    let incoming = |chat: &PhoneNumber, n: u8| msg(chat, mid(n), MessageStatus::Received);
    let mine = MessageRecord {
        sent_at_ms: 2_000, // pending: placed by the sender's clock, here equal to the others' time
        ..msg(&a, mid(3), MessageStatus::Pending)  // inserted as shown
    };
    assert!(mine.shown && !incoming(&a, 1).shown);
    save(
        s,
        Changes {
            messages: vec![incoming(&a, 1), incoming(&b, 2), mine],
            ..Changes::default()
        },
    )
    .await;
    save(
        s,
        Changes {
            messages: vec![incoming(&a, 4)],
            ..Changes::default()
        },
    )
    .await;
    let unshown = s.unshown().await.unwrap();
    assert_eq!(
        ids(&unshown),
        vec![mid(1), mid(2), mid(4)],
        "every chat, oldest first"
    );
    assert_eq!(
        unshown.iter().map(|m| m.chat.clone()).collect::<Vec<_>>(),
        vec![a.clone(), b.clone(), a.clone()]
    );
    assert!(unshown.windows(2).all(|w| w[0].seq < w[1].seq));

    save(
        s,
        Changes {
            shown: vec![
                (a.clone(), mid(1)),
                (a.clone(), mid(2)), // mid(2) is in chat b: nothing
                (a.clone(), mid(3)), // already shown
                (phone(9), mid(1)),  // no such message
            ],
            ..Changes::default()
        },
    )
    .await;
    assert_eq!(ids(&s.unshown().await.unwrap()), vec![mid(2), mid(4)]);
    assert!(s.message(&a, &mid(1)).await.unwrap().unwrap().shown);
    assert!(!s.message(&b, &mid(2)).await.unwrap().unwrap().shown);
    assert_eq!(s.message(&phone(9), &mid(1)).await.unwrap(), None);

    // Inserted and shown in one Changes.
    save(
        s,
        Changes {
            messages: vec![incoming(&b, 5)],
            shown: vec![(b.clone(), mid(2)), (b.clone(), mid(5))],
            ..Changes::default()
        },
    )
    .await;
    assert_eq!(ids(&s.unshown().await.unwrap()), vec![mid(4)]);
    // Showing does not reorder history.
    assert_eq!(
        ids(&s.history(&a).await.unwrap()),
        vec![mid(1), mid(3), mid(4)]
    );
}

async fn outbox_entries(s: &dyn ClientStore) {
    let resend = OutboxRecord {
        only_device: Some((phone(2), dev(4))),
        retry_of: Some(mid(50)),
        retry_attempt: 2,
        ..outbox(mid(3), 100)
    };
    let already_sent = OutboxRecord {
        state: OutboxState::Sent,
        ..outbox(mid(4), 50)
    };
    save(
        s,
        Changes {
            outbox: vec![
                outbox(mid(1), 300),
                outbox(mid(2), 200),
                resend.clone(),
                already_sent.clone(),
                outbox(mid(5), 200), // same time as mid(2), inserted after it
            ],
            ..Changes::default()
        },
    )
    .await;
    assert_eq!(
        transport_ids(&s.queued_outbox().await.unwrap()),
        vec![mid(3), mid(2), mid(5), mid(1)],
        "oldest first, then insertion order"
    );
    assert_eq!(s.outbox_entry(&mid(3)).await.unwrap(), Some(resend.clone()));
    assert_eq!(s.outbox_entry(&mid(4)).await.unwrap(), Some(already_sent));
    assert_eq!(
        s.outbox_entry(&mid(1)).await.unwrap(),
        Some(outbox(mid(1), 300))
    );
    assert_eq!(s.outbox_entry(&mid(9)).await.unwrap(), None);

    // Replaced by transport id: a replacement keeps its place among equal times.
    let replaced = OutboxRecord {
        content: b"replaced".to_vec(),
        ..outbox(mid(2), 200)
    };
    save(
        s,
        Changes {
            outbox: vec![replaced.clone()],
            ..Changes::default()
        },
    )
    .await;
    assert_eq!(
        s.outbox_entry(&mid(2)).await.unwrap(),
        Some(replaced.clone())
    );
    let queued = s.queued_outbox().await.unwrap();
    assert_eq!(transport_ids(&queued), vec![mid(3), mid(2), mid(5), mid(1)]);
    assert_eq!(queued[1], replaced);

    // Sent: out of the queue, still found (to answer a retry request).
    save(
        s,
        Changes {
            outbox_sent: vec![mid(3), mid(1), mid(9)],
            ..Changes::default()
        },
    )
    .await;
    assert_eq!(
        transport_ids(&s.queued_outbox().await.unwrap()),
        vec![mid(2), mid(5)]
    );
    assert_eq!(
        s.outbox_entry(&mid(3)).await.unwrap(),
        Some(OutboxRecord {
            state: OutboxState::Sent,
            ..resend
        })
    );
    assert_eq!(
        s.outbox_entry(&mid(9)).await.unwrap(),
        None,
        "marking inserts nothing"
    );

    // Queued and acknowledged in one Changes (the insert comes first).
    save(
        s,
        Changes {
            outbox: vec![outbox(mid(6), 1)],
            outbox_sent: vec![mid(6)],
            ..Changes::default()
        },
    )
    .await;
    assert_eq!(
        transport_ids(&s.queued_outbox().await.unwrap()),
        vec![mid(2), mid(5)]
    );
    assert_eq!(
        s.outbox_entry(&mid(6)).await.unwrap().unwrap().state,
        OutboxState::Sent
    );

    // A re-queued entry (state given back as Queued) is queued again.
    save(
        s,
        Changes {
            outbox: vec![outbox(mid(1), 300)],
            ..Changes::default()
        },
    )
    .await;
    assert_eq!(
        transport_ids(&s.queued_outbox().await.unwrap()),
        vec![mid(2), mid(5), mid(1)]
    );
}

async fn processed(s: &dyn ClientStore) {
    let (a, b) = (phone(2), phone(3));
    assert!(!s.is_processed(&a, &mid(1)).await.unwrap());
    save(
        s,
        Changes {
            processed: vec![(a.clone(), mid(1)), (b.clone(), mid(2))],
            ..Changes::default()
        },
    )
    .await;
    assert!(s.is_processed(&a, &mid(1)).await.unwrap());
    assert!(s.is_processed(&b, &mid(2)).await.unwrap());
    assert!(!s.is_processed(&b, &mid(1)).await.unwrap(), "per sender");
    assert!(!s.is_processed(&a, &mid(2)).await.unwrap());
    // Recording it again is fine.
    save(
        s,
        Changes {
            processed: vec![(a.clone(), mid(1)), (a.clone(), mid(1))],
            ..Changes::default()
        },
    )
    .await;
    assert!(s.is_processed(&a, &mid(1)).await.unwrap());
}

async fn failures(s: &dyn ClientStore) {
    let (a, b) = (phone(2), phone(3));
    save(
        s,
        Changes {
            failures: vec![
                failure(&a, mid(1), 1),
                failure(&b, mid(1), 1),
                failure(&a, mid(2), 1),
            ],
            ..Changes::default()
        },
    )
    .await;
    assert_eq!(
        s.failure(&a, &mid(1)).await.unwrap(),
        Some(failure(&a, mid(1), 1))
    );
    assert_eq!(
        s.failure(&b, &mid(1)).await.unwrap(),
        Some(failure(&b, mid(1), 1))
    );
    assert_eq!(s.failure(&b, &mid(2)).await.unwrap(), None);

    // Replaced by (sender, original id).
    let again = FailureRecord {
        sender_device: dev(5),
        attempts: 2,
        server_ts_ms: 6_000,
        ..failure(&a, mid(1), 1)
    };
    save(
        s,
        Changes {
            failures: vec![again.clone()],
            ..Changes::default()
        },
    )
    .await;
    assert_eq!(s.failure(&a, &mid(1)).await.unwrap(), Some(again));
    assert_eq!(
        s.failure(&b, &mid(1)).await.unwrap(),
        Some(failure(&b, mid(1), 1))
    );

    // Cleared (missing ones too); a failure inserted and cleared in one Changes is gone.
    save(
        s,
        Changes {
            failures: vec![failure(&b, mid(3), 1)],
            failures_cleared: vec![
                (a.clone(), mid(1)),
                (b.clone(), mid(3)),
                (b.clone(), mid(9)),
            ],
            ..Changes::default()
        },
    )
    .await;
    assert_eq!(s.failure(&a, &mid(1)).await.unwrap(), None);
    assert_eq!(s.failure(&b, &mid(3)).await.unwrap(), None);
    assert_eq!(
        s.failure(&b, &mid(1)).await.unwrap(),
        Some(failure(&b, mid(1), 1))
    );
    assert_eq!(
        s.failure(&a, &mid(2)).await.unwrap(),
        Some(failure(&a, mid(2), 1))
    );
}

/// A `Changes` touching every part, whose last written value is out of range (above `i64::MAX`), fails
/// as a whole: nothing of it remains, including updates of rows that existed before.
async fn atomic(s: &dyn ClientStore) {
    let (a, b) = (phone(2), phone(3));
    let before = Changes {
        identity: Some(identity(1)),
        settings: vec![("k".to_owned(), Some(b"v".to_vec()))],
        sessions: vec![session(&a, 1, "s", 10)],
        peers: vec![peer(&a, 1)],
        messages: vec![
            msg(&a, mid(1), MessageStatus::Pending),
            msg(&a, mid(2), MessageStatus::Received),
        ],
        outbox: vec![outbox(mid(1), 10)],
        failures: vec![failure(&b, mid(1), 1)],
        ..Changes::default()
    };
    save(s, before).await;
    let snapshot = async || {
        (
            (
                s.identity().await.unwrap(),
                s.setting("k").await.unwrap(),
                s.setting("new").await.unwrap(),
                s.value("v").await.unwrap(),
                s.sessions(&a, dev(1)).await.unwrap(),
                s.peer(&a).await.unwrap(),
                s.peer(&b).await.unwrap(),
            ),
            s.history(&a).await.unwrap(),
            s.history(&b).await.unwrap(),
            s.unshown().await.unwrap(),
            s.queued_outbox().await.unwrap(),
            s.outbox_entry(&mid(2)).await.unwrap(),
            s.is_processed(&b, &mid(7)).await.unwrap(),
            s.failure(&b, &mid(1)).await.unwrap(),
            s.failure(&b, &mid(2)).await.unwrap(),
        )
    };
    let expected = snapshot().await;

    let bad = Changes {
        wipe: true,
        identity: Some(identity(2)),
        settings: vec![
            ("k".to_owned(), None),
            ("new".to_owned(), Some(b"n".to_vec())),
        ],
        values: vec![("v".to_owned(), Some(b"v".to_vec()))],
        sessions: vec![session(&a, 1, "s", 20), session(&a, 1, "t", 30)],
        sessions_removed: vec![(a.clone(), dev(1))],
        peers: vec![peer(&a, 2), peer(&b, 3)],
        messages: vec![
            msg(&a, mid(3), MessageStatus::Received),
            msg(&b, mid(4), MessageStatus::Received),
        ],
        statuses: vec![status(&a, mid(1), MessageStatus::Sent, 99)],
        shown: vec![(a.clone(), mid(2))],
        outbox: vec![outbox(mid(2), 5)],
        outbox_sent: vec![mid(1)],
        processed: vec![(b.clone(), mid(7))],
        failures: vec![
            failure(&b, mid(2), 1),
            FailureRecord {
                server_ts_ms: i64::MAX as u64 + 1,
                ..failure(&b, mid(3), 1)
            },
        ],
        failures_cleared: vec![(b.clone(), mid(1))],
        uploads: Vec::new(),
        uploads_done: Vec::new(),
    };
    let result = s.save_changes(bad.clone()).await;
    assert!(matches!(result, Err(StoreError::Backend(_))), "{result:?}");
    assert_eq!(
        snapshot().await,
        expected,
        "nothing of a failed Changes remains, not even its wipe"
    );

    // The same Changes with the largest value allowed goes through whole.
    let mut good = bad;
    good.wipe = false;
    if let Some(f) = good.failures.last_mut() {
        f.server_ts_ms = i64::MAX as u64;
    }
    save(s, good).await;
    assert_eq!(s.identity().await.unwrap(), Some(identity(2)));
    assert_eq!(s.setting("k").await.unwrap(), None);
    assert_eq!(
        ids(&s.history(&a).await.unwrap()),
        vec![mid(1), mid(2), mid(3)]
    );
    assert_eq!(
        s.message(&a, &mid(1)).await.unwrap().unwrap().status,
        MessageStatus::Sent
    );
    assert!(
        s.queued_outbox()
            .await
            .unwrap()
            .iter()
            .all(|o| o.transport_id == mid(2))
    );
    assert!(s.is_processed(&b, &mid(7)).await.unwrap());
    assert_eq!(
        s.failure(&b, &mid(3)).await.unwrap().unwrap().server_ts_ms,
        i64::MAX as u64
    );
    assert_eq!(s.failure(&b, &mid(1)).await.unwrap(), None);
}

/// Every `u64` the store keeps is range-checked.
async fn out_of_range(s: &dyn ClientStore) {
    let (a, big) = (phone(2), i64::MAX as u64 + 1);
    let cases = [
        Changes {
            sessions: vec![session(&a, 1, "s", big)],
            ..Changes::default()
        },
        Changes {
            peers: vec![PeerRecord {
                device_list_version: big,
                ..peer(&a, 1)
            }],
            ..Changes::default()
        },
        Changes {
            peers: vec![PeerRecord {
                key_changed_at_ms: Some(u64::MAX),
                ..peer(&a, 1)
            }],
            ..Changes::default()
        },
        Changes {
            messages: vec![MessageRecord {
                sent_at_ms: big,
                ..msg(&a, mid(1), MessageStatus::Received)
            }],
            ..Changes::default()
        },
        Changes {
            messages: vec![MessageRecord {
                server_ts_ms: big,
                ..msg(&a, mid(1), MessageStatus::Received)
            }],
            ..Changes::default()
        },
        Changes {
            outbox: vec![outbox(mid(1), big)],
            ..Changes::default()
        },
    ];
    for changes in cases {
        let result = s.save_changes(changes.clone()).await;
        assert!(
            matches!(result, Err(StoreError::Backend(_))),
            "{changes:?}: {result:?}"
        );
    }
    assert!(s.sessions(&a, dev(1)).await.unwrap().is_empty());
    assert_eq!(s.peer(&a).await.unwrap(), None);
    assert!(s.history(&a).await.unwrap().is_empty());
    assert!(s.queued_outbox().await.unwrap().is_empty());

    // A status update's time is checked even when the message does not exist.
    let result = s
        .save_changes(Changes {
            statuses: vec![status(&a, mid(1), MessageStatus::Sent, big)],
            ..Changes::default()
        })
        .await;
    assert!(matches!(result, Err(StoreError::Backend(_))), "{result:?}");
}

/// Generates one `#[tokio::test]` per suite function and backend: `memory_store::NAME` and
/// `sqlite_store::NAME`.
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
    };
}

fn media_msg(chat: &PhoneNumber, id: MessageId) -> MessageRecord {
    MessageRecord {
        kind: MessageKind::Media,
        text: "look!".into(),
        media: Some(MediaRecord(Box::new(natter_proto::content::Media {
            kind: natter_proto::content::MediaKind::Image as i32,
            blob_id: "0123456789abcdef0123456789abcdef".into(),
            key: vec![7; 72],
            plaintext_sha256: vec![1; 32],
            ciphertext_sha256: vec![2; 32],
            size: 10,
            ciphertext_size: 26,
            mime: "image/jpeg".into(),
            name: "holiday.jpg".into(),
            caption: "look!".into(),
            thumbnail: vec![9; 100],
            duration_ms: 0,
            width: 640,
            height: 480,
        }))),
        ..msg(chat, id, MessageStatus::Received)
    }
}

fn upload(peer: &PhoneNumber, path: &str) -> UploadRecord {
    UploadRecord {
        peer: peer.clone(),
        path: path.into(),
        size: 1234,
        mtime_ms: 5678,
        blob_id: "0123456789abcdef0123456789abcdef".into(),
        sealed_key: vec![3; 72],
        kind: 1,
        caption: "hi".into(),
        created_ms: 9,
    }
}

async fn media_messages(s: &dyn ClientStore) {
    let a = phone(2);
    let m = media_msg(&a, mid(1));
    save(
        s,
        Changes {
            messages: vec![m.clone()],
            ..Changes::default()
        },
    )
    .await;
    let got = s.message(&a, &mid(1)).await.unwrap().unwrap();
    assert_eq!(got, stored(&m, got.seq));
    assert_eq!(s.history(&a).await.unwrap(), vec![got.clone()]);
    assert_eq!(
        s.messages_with_id(&mid(1)).await.unwrap(),
        vec![got.clone()]
    );
    assert!(s.messages_with_id(&mid(2)).await.unwrap().is_empty());
    assert_eq!(s.unshown().await.unwrap(), vec![got]);
}

async fn messages_page(s: &dyn ClientStore) {
    let (a, b) = (phone(2), phone(3));
    let at = |chat: &PhoneNumber, n: u8, ts: u64| MessageRecord {
        server_ts_ms: ts,
        ..msg(chat, mid(n), MessageStatus::Received)
    };
    // Inserted out of time order; equal times fall back to insertion order.
    let all = vec![
        at(&a, 1, 3_000),
        at(&b, 2, 1_000),
        at(&a, 3, 2_000),
        at(&a, 4, 2_000),
        at(&b, 5, 4_000),
    ];
    save(
        s,
        Changes {
            messages: all,
            ..Changes::default()
        },
    )
    .await;
    let ids = |v: Vec<MessageRecord>| v.iter().map(|m| m.id).collect::<Vec<_>>();
    assert_eq!(
        ids(s.messages_page(None, 0, u64::MAX, 100).await.unwrap()),
        vec![mid(5), mid(1), mid(4), mid(3), mid(2)]
    );
    assert_eq!(
        ids(s.messages_page(None, 2_000, u64::MAX, 3).await.unwrap()),
        vec![mid(5), mid(1), mid(4)]
    );
    assert_eq!(
        ids(s.messages_page(Some(&a), 0, 3_000, 100).await.unwrap()),
        vec![mid(4), mid(3)]
    );
    assert_eq!(
        ids(s.messages_page(Some(&b), 1_500, 10_000, 100).await.unwrap()),
        vec![mid(5)]
    );
    assert!(
        s.messages_page(Some(&a), 0, 1_000, 100)
            .await
            .unwrap()
            .is_empty()
    );
}

async fn uploads(s: &dyn ClientStore) {
    let (a, b) = (phone(2), phone(3));
    assert_eq!(s.upload(&a, "/x").await.unwrap(), None);
    save(
        s,
        Changes {
            uploads: vec![upload(&a, "/x"), upload(&b, "/x")],
            ..Changes::default()
        },
    )
    .await;
    assert_eq!(s.upload(&a, "/x").await.unwrap(), Some(upload(&a, "/x")));
    let replaced = UploadRecord {
        blob_id: "ffffffffffffffffffffffffffffffff".into(),
        ..upload(&a, "/x")
    };
    save(
        s,
        Changes {
            uploads: vec![replaced.clone()],
            ..Changes::default()
        },
    )
    .await;
    assert_eq!(s.upload(&a, "/x").await.unwrap(), Some(replaced));
    save(
        s,
        Changes {
            uploads_done: vec![(a.clone(), "/x".into())],
            ..Changes::default()
        },
    )
    .await;
    assert_eq!(s.upload(&a, "/x").await.unwrap(), None);
    assert_eq!(s.upload(&b, "/x").await.unwrap(), Some(upload(&b, "/x")));
    let too_big = UploadRecord {
        size: u64::MAX,
        ..upload(&a, "/y")
    };
    let result = s
        .save_changes(Changes {
            uploads: vec![too_big],
            ..Changes::default()
        })
        .await;
    assert!(matches!(result, Err(StoreError::Backend(_))), "{result:?}");
    save(
        s,
        Changes {
            wipe: true,
            ..Changes::default()
        },
    )
    .await;
    assert_eq!(s.upload(&b, "/x").await.unwrap(), None);
}

async fn account_values(s: &dyn ClientStore) {
    assert_eq!(s.value("job/1").await.unwrap(), None);
    save(
        s,
        Changes {
            values: vec![
                ("job/2".into(), Some(b"two".to_vec())),
                ("job/1".into(), Some(b"one".to_vec())),
                ("jobs".into(), Some(b"not a job".to_vec())),
                ("appstate/keys".into(), Some(b"k".to_vec())),
            ],
            settings: vec![("server".into(), Some(b"s".to_vec()))],
            ..Changes::default()
        },
    )
    .await;
    assert_eq!(s.value("job/1").await.unwrap(), Some(b"one".to_vec()));
    assert_eq!(
        s.values_with_prefix("job/").await.unwrap(),
        vec![
            ("job/1".to_owned(), b"one".to_vec()),
            ("job/2".to_owned(), b"two".to_vec())
        ]
    );
    assert_eq!(
        s.setting("job/1").await.unwrap(),
        None,
        "values are not settings"
    );
    assert_eq!(
        s.value("server").await.unwrap(),
        None,
        "settings are not values"
    );
    save(
        s,
        Changes {
            values: vec![
                ("job/1".into(), None),
                ("job/2".into(), Some(b"2".to_vec())),
            ],
            ..Changes::default()
        },
    )
    .await;
    assert_eq!(
        s.values_with_prefix("job/").await.unwrap(),
        vec![("job/2".to_owned(), b"2".to_vec())]
    );
    // Unlike settings, values belong to the account: a wipe deletes them.
    save(
        s,
        Changes {
            wipe: true,
            ..Changes::default()
        },
    )
    .await;
    assert!(s.values_with_prefix("").await.unwrap().is_empty());
    assert_eq!(s.setting("server").await.unwrap(), Some(b"s".to_vec()));
}

async fn conversation_order(s: &dyn ClientStore) {
    let (a, b) = (phone(2), phone(3));
    let at = |chat: &PhoneNumber, n: u8, sent: u64, server: u64| MessageRecord {
        sent_at_ms: sent,
        server_ts_ms: server,
        ..msg(chat, mid(n), MessageStatus::Received)
    };
    // Newer messages first, then imported history of the past, then a pending one (no server time
    // yet: the sender's time places it).
    let pending = MessageRecord {
        sent_at_ms: 6_500,
        ..msg(&a, mid(5), MessageStatus::Pending)
    };
    save(
        s,
        Changes {
            messages: vec![
                at(&a, 1, 5_000, 6_000),
                at(&a, 2, 7_000, 7_000),
                at(&b, 9, 8_000, 8_000),
                at(&a, 3, 1_000, 1_000),
                at(&a, 4, 6_000, 6_000),
                pending,
            ],
            ..Changes::default()
        },
    )
    .await;
    assert_eq!(
        ids(&s.history(&a).await.unwrap()),
        vec![mid(3), mid(1), mid(4), mid(5), mid(2)],
        "by conversation time, equal times by insertion"
    );
    let chats = s.chats().await.unwrap();
    assert_eq!(
        chats,
        vec![
            super::ChatSummary {
                chat: b.clone(),
                messages: 1,
                last_ms: 8_000
            },
            super::ChatSummary {
                chat: a.clone(),
                messages: 5,
                last_ms: 7_000
            },
        ]
    );
    // Incoming text after the read marker; our own pending message does not count.
    assert_eq!(s.unread_after(&a, 0).await.unwrap(), 4);
    assert_eq!(s.unread_after(&a, 6_000).await.unwrap(), 1);
    assert_eq!(s.unread_after(&a, 7_000).await.unwrap(), 0);
    assert_eq!(s.unread_after(&phone(4), 0).await.unwrap(), 0);
    save(
        s,
        Changes {
            shown: vec![(a.clone(), mid(2))],
            ..Changes::default()
        },
    )
    .await;
    assert_eq!(
        s.unread_after(&a, 6_000).await.unwrap(),
        0,
        "shown is not unread"
    );
}

conformance!(
    account_values,
    conversation_order,
    messages_page,
    media_messages,
    uploads,
    empty,
    wipe,
    identity_round_trip,
    settings,
    sessions,
    peers,
    messages_inserted_once,
    status_rules,
    status_updates,
    shown_and_unshown,
    outbox_entries,
    processed,
    failures,
    atomic,
    out_of_range,
);

// ---- SQLite only ----

async fn temp_sqlite() -> (tempfile::TempDir, SqliteStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("client.db"))
        .await
        .unwrap();
    (dir, store)
}

async fn raw_connection(path: &std::path::Path) -> sqlx::SqliteConnection {
    <sqlx::SqliteConnection as sqlx::Connection>::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap()
}

#[tokio::test]
async fn sqlite_store_moves_app_state_out_of_settings() {
    // A version-2 database kept app state among the settings; version 3 moves it to the account
    // values (which a wipe deletes) and leaves the device's own settings where they were.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("client.db");
    std::fs::File::create(&path).unwrap();
    let mut conn = raw_connection(&path).await;
    natter_sqlite::migrate(&mut conn, &super::sqlite::MIGRATIONS[..2])
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO settings (key, value) VALUES ('appstate/keys', x'01'), \
         ('appstate/state/contacts', x'02'), ('server', x'03')",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    drop(conn);
    let s = SqliteStore::open(&path).await.unwrap();
    assert_eq!(s.value("appstate/keys").await.unwrap(), Some(vec![1]));
    assert_eq!(
        s.values_with_prefix("appstate/state/").await.unwrap(),
        vec![("appstate/state/contacts".to_owned(), vec![2])]
    );
    assert_eq!(s.setting("appstate/keys").await.unwrap(), None);
    assert_eq!(s.setting("server").await.unwrap(), Some(vec![3]));
}

/// Everything one `Changes` can hold, for the reopen test.
fn full_changes() -> Changes {
    let (a, b) = (phone(2), phone(3));
    Changes {
        wipe: false,
        identity: Some(identity(1)),
        settings: vec![("k".to_owned(), Some(b"v".to_vec()))],
        values: vec![("appstate/keys".to_owned(), Some(b"keys".to_vec()))],
        sessions: vec![session(&a, 1, "s", 10), session(&a, 1, "t", 20)],
        sessions_removed: vec![(a.clone(), dev(2))],
        peers: vec![PeerRecord {
            key_changed_at_ms: Some(5),
            ..peer(&a, 1)
        }],
        messages: vec![
            msg(&a, mid(1), MessageStatus::Pending),
            msg(&b, mid(2), MessageStatus::Received),
        ],
        statuses: vec![status(&a, mid(1), MessageStatus::Delivered, 3_000)],
        shown: Vec::new(),
        outbox: vec![
            OutboxRecord {
                only_device: Some((b.clone(), dev(2))),
                retry_of: Some(mid(9)),
                retry_attempt: 1,
                ..outbox(mid(1), 10)
            },
            outbox(mid(2), 20),
        ],
        outbox_sent: vec![mid(2)],
        processed: vec![(b.clone(), mid(2))],
        failures: vec![failure(&b, mid(3), 2)],
        failures_cleared: Vec::new(),
        uploads: vec![upload(&a, "/tmp/a.jpg")],
        uploads_done: Vec::new(),
    }
}

#[tokio::test]
async fn sqlite_store_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("client.db");
    let (a, b) = (phone(2), phone(3));

    let s = SqliteStore::open(&path).await.unwrap();
    assert_eq!(s.path(), path);
    save(&s, full_changes()).await;
    let read = async |s: &SqliteStore| {
        (
            s.identity().await.unwrap(),
            (
                s.setting("k").await.unwrap(),
                s.value("appstate/keys").await.unwrap(),
            ),
            s.sessions(&a, dev(1)).await.unwrap(),
            s.peer(&a).await.unwrap(),
            s.history(&a).await.unwrap(),
            s.history(&b).await.unwrap(),
            s.unshown().await.unwrap(),
            s.queued_outbox().await.unwrap(),
            s.outbox_entry(&mid(2)).await.unwrap(),
            s.is_processed(&b, &mid(2)).await.unwrap(),
            s.failure(&b, &mid(3)).await.unwrap(),
            s.upload(&a, "/tmp/a.jpg").await.unwrap(),
        )
    };
    let before = read(&s).await;
    assert!(before.0.is_some() && before.9 && before.10.is_some());
    assert_eq!(before.4[0].status, MessageStatus::Delivered);
    s.close().await;
    assert!(matches!(s.identity().await, Err(StoreError::Backend(_))));
    drop(s);

    let s = SqliteStore::open(&path).await.unwrap();
    assert_eq!(read(&s).await, before);
    // Seqs keep growing after a reopen.
    let last = before.5[0].seq;
    save(
        &s,
        Changes {
            messages: vec![msg(&b, mid(5), MessageStatus::Received)],
            ..Changes::default()
        },
    )
    .await;
    assert!(s.history(&b).await.unwrap()[1].seq > last);
    drop(s); // without close: the pool closes in the background

    let s = SqliteStore::open(&path).await.unwrap();
    assert_eq!(s.history(&b).await.unwrap().len(), 2);
    s.close().await;

    // The migration ran once; the pragmas are in effect.
    let mut conn = raw_connection(&path).await;
    let versions: Vec<i64> = sqlx::query_scalar("SELECT version FROM schema_version")
        .fetch_all(&mut conn)
        .await
        .unwrap();
    assert_eq!(versions, vec![1, 2, 3]);
    let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(mode, "wal");
}

#[tokio::test]
async fn sqlite_store_refuses_newer_schema() {
    let (dir, s) = temp_sqlite().await;
    s.close().await;
    let path = dir.path().join("client.db");
    let mut conn = raw_connection(&path).await;
    sqlx::query("INSERT INTO schema_version (version, applied_at_ms) VALUES (99, 0)")
        .execute(&mut conn)
        .await
        .unwrap();
    let result = SqliteStore::open(&path).await;
    assert!(matches!(result, Err(StoreError::Backend(_))), "{result:?}");
}

#[tokio::test]
async fn sqlite_store_open_errors() {
    let dir = tempfile::tempdir().unwrap();
    let result = SqliteStore::open(&dir.path().join("missing-dir").join("client.db")).await;
    assert!(matches!(result, Err(StoreError::Backend(_))), "{result:?}");
    // Not a database.
    let path = dir.path().join("garbage.db");
    std::fs::write(&path, vec![0x42; 4096]).unwrap();
    let result = SqliteStore::open(&path).await;
    assert!(matches!(result, Err(StoreError::Backend(_))), "{result:?}");
}

#[cfg(unix)]
#[tokio::test]
async fn sqlite_store_file_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let (dir, s) = temp_sqlite().await;
    save(&s, full_changes()).await;
    for name in ["client.db", "client.db-wal", "client.db-shm"] {
        let mode = std::fs::metadata(dir.path().join(name))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{name}: {mode:o}");
    }
}

#[tokio::test]
async fn sqlite_store_corrupt_rows() {
    let (dir, s) = temp_sqlite().await;
    save(&s, full_changes()).await;
    let (a, b) = (phone(2), phone(3));
    let mut conn = raw_connection(&dir.path().join("client.db")).await;
    let mut tamper = async |sql: &'static str| {
        sqlx::query(sql).execute(&mut conn).await.unwrap();
    };
    tamper("UPDATE identity SET account_key = x'0102'").await;
    tamper("UPDATE sessions SET last_used_ms = -1 WHERE session_id = 's'").await;
    tamper("UPDATE peers SET key_changed_at_ms = -1").await;
    tamper("UPDATE messages SET status = 'lost' WHERE chat = '+15550000002'").await;
    tamper("UPDATE messages SET chat = 'garbage' WHERE chat = '+15550000003'").await;
    tamper("UPDATE outbox SET retry_of = x'00' WHERE created_ms = 10").await; // still queued
    tamper("UPDATE outbox SET state = 'maybe' WHERE created_ms = 20").await;
    tamper("UPDATE failures SET attempts = -5").await;
    let results = [
        s.identity().await.map(|_| ()),
        s.sessions(&a, dev(1)).await.map(|_| ()),
        s.peer(&a).await.map(|_| ()),
        s.history(&a).await.map(|_| ()),
        s.message(&a, &mid(1)).await.map(|_| ()),
        s.unshown().await.map(|_| ()),
        s.queued_outbox().await.map(|_| ()),
        s.outbox_entry(&mid(2)).await.map(|_| ()),
        s.failure(&b, &mid(3)).await.map(|_| ()),
    ];
    for (i, result) in results.into_iter().enumerate() {
        assert!(
            matches!(result, Err(StoreError::Corrupt(_))),
            "read {i}: {result:?}"
        );
    }
    // A status update over a corrupt status does not guess.
    let result = s
        .save_changes(Changes {
            statuses: vec![status(&a, mid(1), MessageStatus::Read, 1)],
            ..Changes::default()
        })
        .await;
    assert!(matches!(result, Err(StoreError::Corrupt(_))), "{result:?}");
    // A non-boolean flag.
    let mut conn = raw_connection(&dir.path().join("client.db")).await;
    sqlx::query("UPDATE messages SET status = 'pending', shown = 2 WHERE id = ?1")
        .bind(mid(1).as_bytes().as_slice())
        .execute(&mut conn)
        .await
        .unwrap();
    let result = s.message(&a, &mid(1)).await;
    assert!(matches!(result, Err(StoreError::Corrupt(_))), "{result:?}");
    // Rows that decode are still served.
    assert!(s.is_processed(&b, &mid(2)).await.unwrap());
    assert_eq!(s.setting("k").await.unwrap(), Some(b"v".to_vec()));
    assert_eq!(s.sessions(&a, dev(2)).await.unwrap(), Vec::new());
}

/// Concurrent writers of one process take turns; every `Changes` lands whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_store_concurrent_writers() {
    const N: u8 = 50;
    let (_dir, s) = temp_sqlite().await;
    let chat = phone(2);
    let tasks: Vec<_> = (0..N)
        .map(|i| {
            let (s, chat) = (s.clone(), chat.clone());
            tokio::spawn(async move {
                s.save_changes(Changes {
                    messages: vec![msg(&chat, mid(i), MessageStatus::Received)],
                    processed: vec![(chat.clone(), mid(i))],
                    settings: vec![(format!("k{i}"), Some(vec![i]))],
                    ..Changes::default()
                })
                .await
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    let history = s.history(&chat).await.unwrap();
    assert_eq!(history.len(), usize::from(N));
    assert!(history.windows(2).all(|w| w[0].seq < w[1].seq));
    for i in 0..N {
        assert!(s.is_processed(&chat, &mid(i)).await.unwrap());
        assert_eq!(s.setting(&format!("k{i}")).await.unwrap(), Some(vec![i]));
    }
}
