//! Groups against a real natterd: three accounts with two devices each (every message reaches all six
//! devices), admin rights, removal (the removed member cannot decrypt what follows, checked with its own
//! keys) and rotation, a new member who cannot decrypt what came before, replayed Megolm messages
//! refused, per-member receipts, and a group of 1,024 members with the limit past it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use natter_client::{ClientError, Event, GroupInfo, MessageKind, MessageStatus};
use natter_proto::group::{ENVELOPE_GROUP_MESSAGE, GroupMessage};
use natter_proto::limits::MAX_GROUP_MEMBERS;
use natter_proto::wire::ErrorCode;
use natter_proto::{DeviceId, GroupId, MessageId, PhoneNumber};
use natter_server::store::{NewEnvelope, NewMessage, QueuedEnvelope};
use natter_testkit::{TestClient, TestServer, eventually};
use prost::Message;

/// A safety net only: every wait below ends as soon as its condition holds.
const WAIT: Duration = Duration::from_secs(30);

const ALICE: &str = "+15550600001";
const BOB: &str = "+15550600002";
const CAROL: &str = "+15550600003";
const DAVE: &str = "+15550600004";

fn phone(s: &str) -> PhoneNumber {
    PhoneNumber::parse(s).unwrap()
}

fn device(id: u32) -> DeviceId {
    DeviceId::new(id).unwrap()
}

/// Waits until a device has a group text.
async fn has_text(c: &TestClient, group: &GroupId, text: &str) {
    eventually(
        WAIT,
        &format!("{} to receive {text:?}", c.phone),
        || async {
            c.client
                .group_history(group)
                .await
                .unwrap()
                .iter()
                .any(|m| m.text == text && m.kind == MessageKind::Text)
        },
    )
    .await;
}

async fn lacks_text(c: &TestClient, group: &GroupId, text: &str) -> bool {
    !c.client
        .group_history(group)
        .await
        .unwrap_or_default()
        .iter()
        .any(|m| m.text == text)
}

/// Waits until a device knows the group at least at `version`.
async fn knows(c: &TestClient, group: &GroupId, version: u64) -> GroupInfo {
    eventually(
        WAIT,
        &format!("{} to learn group version {version}", c.phone),
        || async {
            c.client
                .group(group)
                .await
                .unwrap()
                .is_some_and(|g| g.version >= version)
        },
    )
    .await;
    c.client.group(group).await.unwrap().unwrap()
}

/// The group envelopes queued on the server for a (disconnected) device.
async fn queued_group_messages(
    server: &TestServer,
    who: &PhoneNumber,
    dev: u32,
) -> Vec<QueuedEnvelope> {
    server
        .server()
        .state()
        .store
        .load_queue(who, device(dev), 0, 1000)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.olm_type == ENVELOPE_GROUP_MESSAGE)
        .collect()
}

fn server_code(e: &ClientError) -> Option<ErrorCode> {
    match e {
        ClientError::Server { code, .. } => Some(*code),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn six_devices_admins_removal_rotation_newcomers_and_replays() {
    let server = TestServer::start().await;
    let alice = TestClient::online(&server, ALICE).await;
    let bob = TestClient::online(&server, BOB).await;
    let carol = TestClient::online(&server, CAROL).await;
    let dave = TestClient::online(&server, DAVE).await;
    let alice2 = TestClient::link_companion(&server, &alice, "alice laptop").await;
    let bob2 = TestClient::link_companion(&server, &bob, "bob laptop").await;
    let carol2 = TestClient::link_companion(&server, &carol, "carol laptop").await;
    let mut bob_events = bob.client.subscribe();

    // Created by alice: every device of every member learns the group.
    let g = alice
        .client
        .create_group("Family", &[phone(BOB), phone(CAROL)])
        .await
        .unwrap();
    assert_eq!(g.version, 1);
    assert!(g.is_admin(&phone(ALICE)) && !g.is_admin(&phone(BOB)));
    assert_eq!(g.members.len(), 3);
    for c in [&alice2, &bob, &bob2, &carol, &carol2] {
        let seen = knows(c, &g.id, 1).await;
        assert_eq!(seen.name, "Family");
        assert_eq!(seen.members, g.members);
    }

    // One message reaches all six devices (the other five decrypt it), with sender and device.
    let sent = alice
        .client
        .send_group_text(&g.id, "dinner at 8?")
        .await
        .unwrap();
    assert_eq!(sent.status, MessageStatus::Sent);
    for c in [&alice2, &bob, &bob2, &carol, &carol2] {
        has_text(c, &g.id, "dinner at 8?").await;
    }
    let at_bob = bob.client.group_history(&g.id).await.unwrap();
    let m = at_bob.iter().find(|m| m.text == "dinner at 8?").unwrap();
    assert_eq!(
        (m.sender.clone(), m.sender_device),
        (phone(ALICE), device(1))
    );
    assert!(!m.from_me);
    let copy = alice2
        .client
        .group_message(&g.id, &sent.id)
        .await
        .unwrap()
        .unwrap();
    assert!(copy.from_me, "our other device shows it as ours");
    // A reply from a companion reaches the others, the sender's own phone included.
    bob2.client.send_group_text(&g.id, "yes!").await.unwrap();
    for c in [&alice, &alice2, &bob, &carol, &carol2] {
        has_text(c, &g.id, "yes!").await;
    }

    // Per-member receipts: both members' devices decrypted it; reading it sends "read".
    eventually(WAIT, "delivered receipts from bob and carol", || async {
        let r = alice.client.group_receipts(&g.id, &sent.id).await.unwrap();
        r.delivered == 2
    })
    .await;
    let shown = carol.client.take_unshown_group().await.unwrap();
    assert!(shown.iter().any(|m| m.text == "dinner at 8?"));
    eventually(WAIT, "carol's read receipt", || async {
        let r = alice.client.group_receipts(&g.id, &sent.id).await.unwrap();
        r.read == 1 && r.per_member.contains(&(phone(CAROL), MessageStatus::Read)) && r.members == 2
    })
    .await;

    // A member who is not an admin changes nothing.
    let refused = bob
        .client
        .group_add(&g.id, &[phone(DAVE)])
        .await
        .unwrap_err();
    assert_eq!(
        server_code(&refused),
        Some(ErrorCode::NotGroupAdmin),
        "{refused}"
    );
    let refused = bob
        .client
        .group_rename(&g.id, "Bob's", None)
        .await
        .unwrap_err();
    assert_eq!(server_code(&refused), Some(ErrorCode::NotGroupAdmin));
    let refused = bob
        .client
        .group_remove(&g.id, &[phone(CAROL)])
        .await
        .unwrap_err();
    assert_eq!(server_code(&refused), Some(ErrorCode::NotGroupAdmin));
    let refused = dave.client.refresh_group(&g.id).await.unwrap();
    assert!(refused.is_none(), "a non-member cannot read the group");

    // Replay: the server (or anyone between) queues the same Megolm ciphertext again under a new id.
    carol2.client.disconnect().await;
    alice
        .client
        .send_group_text(&g.id, "once only")
        .await
        .unwrap();
    has_text(&bob, &g.id, "once only").await;
    let queued = queued_group_messages(&server, &phone(CAROL), 2).await;
    let original = queued.last().unwrap().clone();
    let state = server.server().state();
    let replay = state
        .store
        .enqueue(NewMessage {
            sender: phone(ALICE),
            sender_device: device(1),
            message_id: MessageId::from_bytes([0x5a; 16]),
            server_ts_ms: original.server_ts_ms + 1,
            expires_at_ms: original.server_ts_ms + 60_000,
            envelopes: vec![NewEnvelope {
                phone: phone(BOB),
                device_id: device(1),
                olm_type: ENVELOPE_GROUP_MESSAGE,
                ciphertext: original.ciphertext.clone(),
            }],
            retry: None,
        })
        .await
        .unwrap();
    let natter_server::store::EnqueueOutcome::Stored(replayed) = replay else {
        panic!("replay not stored");
    };
    for env in replayed {
        state.router.deliver(env);
    }
    tokio::time::timeout(WAIT, async {
        loop {
            if let Ok(Event::GroupReplayRefused { group, sender, .. }) = bob_events.recv().await {
                assert_eq!((group, sender), (g.id, phone(ALICE)));
                break;
            }
        }
    })
    .await
    .expect("the replay is refused");
    let copies = bob
        .client
        .group_history(&g.id)
        .await
        .unwrap()
        .iter()
        .filter(|m| m.text == "once only")
        .count();
    assert_eq!(copies, 1, "shown once");
    let first_session = GroupMessage::decode(original.ciphertext.as_slice())
        .unwrap()
        .session_id;
    // Carol's own keys read what was sent while she was a member (the control for what follows).
    assert_eq!(
        carol
            .client
            .try_decrypt_group_message(&phone(ALICE), device(1), &original.ciphertext)
            .await
            .unwrap()
            .as_deref(),
        Some("once only")
    );

    // Carol is removed: every device learns it, and alice's next message uses a new sender key that
    // carol's devices never get.
    bob2.client.disconnect().await;
    let g2 = alice
        .client
        .group_remove(&g.id, &[phone(CAROL)])
        .await
        .unwrap();
    assert_eq!(g2.members.len(), 2);
    let gone = knows(&carol, &g.id, g2.version).await;
    assert!(gone.left);
    knows(&bob, &g.id, g2.version).await;
    knows(&alice2, &g.id, g2.version).await;
    alice
        .client
        .send_group_text(&g.id, "after carol")
        .await
        .unwrap();
    has_text(&bob, &g.id, "after carol").await;
    has_text(&alice2, &g.id, "after carol").await;
    let after = queued_group_messages(&server, &phone(BOB), 2).await;
    let after = after.last().unwrap();
    let rotated = GroupMessage::decode(after.ciphertext.as_slice()).unwrap();
    assert_ne!(
        rotated.session_id, first_session,
        "the sender key was rotated"
    );
    for c in [&carol, &carol2] {
        assert_eq!(
            c.client
                .try_decrypt_group_message(&phone(ALICE), device(1), &after.ciphertext)
                .await
                .unwrap(),
            None,
            "a removed member cannot decrypt later messages"
        );
    }
    assert!(
        queued_group_messages(&server, &phone(CAROL), 1)
            .await
            .is_empty()
    );
    let err = carol
        .client
        .send_group_text(&g.id, "still here?")
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::InvalidInput(_)), "{err}");
    bob2.client.connect().await.unwrap();
    has_text(&bob2, &g.id, "after carol").await;

    // Dave joins: he reads what comes next, never what came before.
    let g3 = alice.client.group_add(&g.id, &[phone(DAVE)]).await.unwrap();
    let seen = knows(&dave, &g.id, g3.version).await;
    assert_eq!(seen.members.len(), 3);
    alice
        .client
        .send_group_text(&g.id, "welcome dave")
        .await
        .unwrap();
    has_text(&dave, &g.id, "welcome dave").await;
    for old in [&original.ciphertext, &after.ciphertext] {
        assert_eq!(
            dave.client
                .try_decrypt_group_message(&phone(ALICE), device(1), old)
                .await
                .unwrap(),
            None,
            "a new member cannot decrypt earlier messages"
        );
    }
    assert!(lacks_text(&dave, &g.id, "dinner at 8?").await);
    // Bob's device sends with its own (now rotated) key; dave reads it too.
    bob.client.send_group_text(&g.id, "hi dave").await.unwrap();
    has_text(&dave, &g.id, "hi dave").await;

    // Promoted, bob may change the group; dave leaves.
    alice
        .client
        .group_promote(&g.id, &[phone(BOB)])
        .await
        .unwrap();
    knows(&bob, &g.id, g3.version + 1).await;
    let renamed = bob
        .client
        .group_rename(&g.id, "Famille", None)
        .await
        .unwrap();
    assert_eq!(renamed.name, "Famille");
    knows(&alice2, &g.id, renamed.version).await;
    assert_eq!(
        alice2.client.group(&g.id).await.unwrap().unwrap().name,
        "Famille"
    );
    let left = dave.client.group_leave(&g.id).await.unwrap();
    assert!(left.left);
    let at_alice = knows(&alice, &g.id, left.version).await;
    assert!(!at_alice.is_member(&phone(DAVE)));
    assert!(
        alice
            .client
            .group_history(&g.id)
            .await
            .unwrap()
            .iter()
            .any(|m| m.kind == MessageKind::Notice && m.text.contains("left")),
        "the change shows as a notice"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_of_1024_members_receives_one_message_and_no_more_members_fit() {
    let server = TestServer::start_with(|cfg| {
        cfg.registration.codes_per_ip_per_hour = 10_000;
        cfg.registration.verifies_per_ip_per_hour = 10_000;
        cfg.abuse.max_connections_per_ip = 10_000;
        cfg.abuse.handshakes_per_ip_per_s = 10_000;
        cfg.abuse.handshake_burst = 10_000;
        cfg.max_connections = 10_000;
    })
    .await;
    let started = Instant::now();
    let members =
        TestClient::register_many(&server, "+1555061", 0..MAX_GROUP_MEMBERS as u32, 16).await;
    let extra = TestClient::register_many(&server, "+1555062", 0..1, 1).await;
    eprintln!(
        "{} devices registered in {:?}",
        members.len(),
        started.elapsed()
    );
    let (owner, rest) = members.split_first().unwrap();
    let numbers: Vec<PhoneNumber> = rest.iter().map(|c| c.phone.clone()).collect();

    // The client refuses a 1,025th member before asking the server.
    let mut too_many = numbers.clone();
    too_many.push(extra[0].phone.clone());
    too_many.push(phone("+15550629999"));
    let err = owner
        .client
        .create_group("Too big", &too_many)
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::InvalidInput(_)), "{err}");

    let g = owner
        .client
        .create_group("Everyone", &numbers)
        .await
        .unwrap();
    assert_eq!(g.members.len(), MAX_GROUP_MEMBERS);
    let t = Instant::now();
    owner
        .client
        .send_group_text(&g.id, "hello, 1,023 others")
        .await
        .unwrap();
    let sent_in = t.elapsed();
    for c in rest {
        has_text(c, &g.id, "hello, 1,023 others").await;
    }
    eprintln!(
        "first message accepted in {sent_in:?}, at all members in {:?}",
        t.elapsed()
    );

    // The server refuses a 1,025th member with a clear error.
    let err = owner
        .client
        .group_add(&g.id, &[extra[0].phone.clone()])
        .await
        .unwrap_err();
    assert_eq!(server_code(&err), Some(ErrorCode::LimitExceeded), "{err}");
    assert!(err.to_string().contains("1024"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_missed_the_key_asks_the_sender_again() {
    let server = TestServer::start().await;
    let alice = TestClient::online(&server, "+15550600101").await;
    let bob = TestClient::online(&server, "+15550600102").await;
    let g = alice
        .client
        .create_group("Lost key", std::slice::from_ref(&bob.phone))
        .await
        .unwrap();
    knows(&bob, &g.id, 1).await;
    bob.client.disconnect().await;
    alice
        .client
        .send_group_text(&g.id, "can you read this?")
        .await
        .unwrap();

    // The key share never arrives (dropped on the way): only the group message is left for bob.
    let store = &server.server().state().store;
    let queue = store
        .load_queue(&bob.phone, device(1), 0, 100)
        .await
        .unwrap();
    let shares: Vec<u64> = queue
        .iter()
        .filter(|e| e.olm_type <= 1)
        .map(|e| e.seq)
        .collect();
    assert_eq!(shares.len(), 1, "one key share was queued");
    store.ack(&bob.phone, device(1), &shares).await.unwrap();
    assert_eq!(
        store
            .load_queue(&bob.phone, device(1), 0, 100)
            .await
            .unwrap()
            .len(),
        1
    );

    // Bob keeps the message, asks alice's device for the key, and reads it once the key comes.
    bob.client.connect().await.unwrap();
    has_text(&bob, &g.id, "can you read this?").await;
}
