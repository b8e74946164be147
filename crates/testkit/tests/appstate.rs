//! App-state sync against a real natterd: contact names, stars, pins, mutes, archives and read markers
//! reach the account's other devices (also one that was offline), concurrent changes converge, a server
//! store tampered with (a patch dropped, two swapped, one replayed, a byte altered) is detected and
//! refused by the fetching device and repaired from the primary's verified snapshot, and a removed device
//! cannot decrypt what is written after its removal.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use natter_client::Event;
use natter_client::appstate::{CHAT_SETTINGS, CONTACTS, MESSAGE_FLAGS};
use natter_proto::wire::AppStatePatch;
use natter_proto::{DeviceId, PhoneNumber};
use natter_server::store::Store;
use natter_testkit::{TestClient, TestServer, eventually, next_message};
use prost::Message;
use sqlx::Connection;
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};

const WAIT: Duration = Duration::from_secs(20);
const ALICE: &str = "+15550400001";
const BOB: &str = "+15550400002";
const CAROL: &str = "+15550400003";

fn store(server: &TestServer) -> std::sync::Arc<dyn Store> {
    server.server().state().store.clone()
}

fn num(s: &str) -> PhoneNumber {
    PhoneNumber::parse(s).unwrap()
}

async fn has_keys(c: &TestClient, n: usize) {
    eventually(WAIT, "the app-state keys to arrive", || async {
        c.client.app_state_key_ids().await.unwrap().len() >= n
    })
    .await;
}

async fn name_of(c: &TestClient, phone: &str) -> Option<String> {
    c.client.contact_name(&num(phone)).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_on_one_device_shows_on_the_others() {
    let server = TestServer::start().await;
    let phone = TestClient::online(&server, ALICE).await;
    let bob = TestClient::online(&server, BOB).await;
    let laptop = TestClient::link_companion(&server, &phone, "laptop").await;
    let tablet = TestClient::link_companion(&server, &phone, "tablet").await;
    has_keys(&laptop, 1).await;
    has_keys(&tablet, 1).await;

    // A message from Bob reaches all three.
    let mut tablet_ev = tablet.client.subscribe();
    let sent = bob.client.send_text(&phone.phone, "hello").await.unwrap();
    next_message(&mut tablet_ev, WAIT, |m| m.id == sent.id).await;
    for c in [&phone, &laptop] {
        eventually(WAIT, "the message everywhere", || async {
            c.client
                .message(&bob.phone, &sent.id)
                .await
                .unwrap()
                .is_some()
        })
        .await;
    }

    // Names from the phone.
    phone
        .client
        .set_contact_name(&bob.phone, "Bob B.")
        .await
        .unwrap();
    for c in [&laptop, &tablet] {
        eventually(WAIT, "the name", || async {
            name_of(c, BOB).await.as_deref() == Some("Bob B.")
        })
        .await;
    }
    // A star from the laptop.
    laptop.client.star(&sent.id, true).await.unwrap();
    for c in [&phone, &tablet] {
        eventually(WAIT, "the star", || async {
            c.client.starred().await.unwrap() == vec![sent.id]
        })
        .await;
    }
    // Pin, mute and archive from the tablet.
    let until = natter_now() + 8 * 3600 * 1000;
    tablet.client.pin(&bob.phone, true).await.unwrap();
    tablet.client.mute(&bob.phone, until).await.unwrap();
    tablet.client.archive(&bob.phone, true).await.unwrap();
    for c in [&phone, &laptop] {
        eventually(WAIT, "the chat settings", || async {
            let s = c.client.chat_settings(&bob.phone).await.unwrap();
            s.pinned && s.archived && s.muted_until_ms == until
        })
        .await;
    }
    // Read on the phone: the laptop's copy is marked shown and no longer unread.
    assert_eq!(
        laptop
            .client
            .chat_settings(&bob.phone)
            .await
            .unwrap()
            .unread,
        1
    );
    phone.client.mark_read(&bob.phone).await.unwrap();
    for c in [&laptop, &tablet] {
        eventually(WAIT, "the read marker", || async {
            let s = c.client.chat_settings(&bob.phone).await.unwrap();
            s.read_up_to_ms >= sent.server_ts_ms.max(1)
                && s.unread == 0
                && c.client
                    .message(&bob.phone, &sent.id)
                    .await
                    .unwrap()
                    .unwrap()
                    .shown
        })
        .await;
    }
    // Unstar and unpin.
    phone.client.star(&sent.id, false).await.unwrap();
    phone.client.pin(&bob.phone, false).await.unwrap();
    eventually(WAIT, "unstar and unpin", || async {
        laptop.client.starred().await.unwrap().is_empty()
            && !laptop
                .client
                .chat_settings(&bob.phone)
                .await
                .unwrap()
                .pinned
    })
    .await;
    // The contacts list has the named contact.
    let contacts = tablet.client.contacts().await.unwrap();
    assert!(
        contacts.contains(&(BOB.to_owned(), Some("Bob B.".to_owned()))),
        "{contacts:?}"
    );
}

fn natter_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_companion_catches_up_on_connect() {
    let server = TestServer::start().await;
    let phone = TestClient::online(&server, ALICE).await;
    let laptop = TestClient::link_companion(&server, &phone, "laptop").await;
    has_keys(&laptop, 1).await;
    let off = laptop.power_off().await;
    phone
        .client
        .set_contact_name(&num(BOB), "Bob")
        .await
        .unwrap();
    phone
        .client
        .set_contact_name(&num(CAROL), "Carol")
        .await
        .unwrap();
    phone.client.archive(&num(CAROL), true).await.unwrap();
    let laptop = off.power_on().await;
    laptop.client.connect().await.unwrap();
    eventually(WAIT, "the laptop to catch up", || async {
        name_of(&laptop, BOB).await.as_deref() == Some("Bob")
            && name_of(&laptop, CAROL).await.as_deref() == Some("Carol")
            && laptop
                .client
                .chat_settings(&num(CAROL))
                .await
                .unwrap()
                .archived
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_changes_converge_by_server_order() {
    let server = TestServer::start().await;
    let phone = TestClient::online(&server, ALICE).await;
    let laptop = TestClient::link_companion(&server, &phone, "laptop").await;
    has_keys(&laptop, 1).await;
    let (bob, carol) = (num(BOB), num(CAROL));
    for round in 0..5 {
        let (pn, ln) = (format!("phone {round}"), format!("laptop {round}"));
        let (a, b) = tokio::join!(
            phone.client.set_contact_name(&bob, &pn),
            laptop.client.set_contact_name(&bob, &ln),
        );
        a.unwrap();
        b.unwrap();
        let (a, b) = tokio::join!(
            phone.client.mute(&carol, 1000 + round),
            laptop.client.pin(&carol, round % 2 == 0),
        );
        a.unwrap();
        b.unwrap();
    }
    let version = store(&server)
        .fetch_app_state(&phone.phone, CONTACTS, 0, 1000)
        .await
        .unwrap()
        .version;
    assert_eq!(version, 10);
    // The last patch on the server decides; both end with the same verified state.
    let last = store(&server)
        .fetch_app_state(&phone.phone, CONTACTS, 9, 10)
        .await
        .unwrap();
    let last = AppStatePatch::decode(last.patches[0].1.as_slice()).unwrap();
    let (_, winner) = phone
        .client
        .decrypt_app_state_mutation(&last.mutations[0])
        .await
        .unwrap();
    let winner = String::from_utf8(winner).unwrap();
    for c in [&phone, &laptop] {
        c.client.sync_app_state(CONTACTS).await.unwrap();
        c.client.sync_app_state(CHAT_SETTINGS).await.unwrap();
        assert_eq!(name_of(c, BOB).await.as_deref(), Some(winner.as_str()));
        let s = c.client.chat_settings(&num(CAROL)).await.unwrap();
        assert_eq!((s.muted_until_ms, s.pinned), (1004, true));
    }
}

#[derive(Clone, Copy, Debug)]
enum Tamper {
    Drop,
    Swap,
    Replay,
    AlterByte,
}

async fn tamper_db(server: &TestServer, kind: Tamper) {
    let path = server.data_dir().join("natter.db");
    let mut db = SqliteConnection::connect_with(
        &SqliteConnectOptions::new()
            .filename(&path)
            .busy_timeout(Duration::from_secs(10)),
    )
    .await
    .unwrap();
    let get = |v: i64| {
        sqlx::query_scalar::<_, Vec<u8>>(
            "SELECT patch FROM app_state_patches WHERE phone = ?1 AND collection = 'contacts' AND version = ?2",
        )
        .bind(ALICE)
        .bind(v)
    };
    let p2 = get(2).fetch_one(&mut db).await.unwrap();
    let p3 = get(3).fetch_one(&mut db).await.unwrap();
    let set = "UPDATE app_state_patches SET patch = ?3 WHERE phone = ?1 AND collection = 'contacts' AND version = ?2";
    match kind {
        Tamper::Drop => {
            sqlx::query("DELETE FROM app_state_patches WHERE phone = ?1 AND collection = 'contacts' AND version = 2")
                .bind(ALICE)
                .execute(&mut db)
                .await
                .unwrap();
        }
        Tamper::Swap => {
            for (v, p) in [(2, &p3), (3, &p2)] {
                sqlx::query(set)
                    .bind(ALICE)
                    .bind(v)
                    .bind(p.as_slice())
                    .execute(&mut db)
                    .await
                    .unwrap();
            }
        }
        Tamper::Replay => {
            sqlx::query(set)
                .bind(ALICE)
                .bind(3)
                .bind(p2.as_slice())
                .execute(&mut db)
                .await
                .unwrap();
        }
        Tamper::AlterByte => {
            let mut patch = AppStatePatch::decode(p3.as_slice()).unwrap();
            let blob = &mut patch.mutations[0].value_blob;
            let at = blob.len() / 2;
            blob[at] ^= 0x01;
            sqlx::query(set)
                .bind(ALICE)
                .bind(3)
                .bind(patch.encode_to_vec())
                .execute(&mut db)
                .await
                .unwrap();
        }
    }
    db.close().await.unwrap();
}

async fn tampering_is_detected_and_recovered(kind: Tamper) {
    let server = TestServer::start().await;
    let phone = TestClient::online(&server, ALICE).await;
    let laptop = TestClient::link_companion(&server, &phone, "laptop").await;
    has_keys(&laptop, 1).await;
    let off = laptop.power_off().await;
    for (i, n) in [
        "+15550400011",
        "+15550400012",
        "+15550400013",
        "+15550400014",
    ]
    .iter()
    .enumerate()
    {
        phone
            .client
            .set_contact_name(&num(n), &format!("contact {i}"))
            .await
            .unwrap();
    }
    tamper_db(&server, kind).await;

    let laptop = off.power_on().await;
    let mut events = laptop.client.subscribe();
    laptop.client.connect().await.unwrap();
    // The laptop refuses the tampered state with a clear error and never applies it.
    let reason = tokio::time::timeout(WAIT, async {
        loop {
            match events.recv().await {
                Ok(Event::AppStateError { collection, reason }) if collection == CONTACTS => {
                    return reason;
                }
                Ok(Event::AppStateChanged {
                    collection,
                    version,
                }) if collection == CONTACTS => {
                    panic!("{kind:?}: a tampered state was accepted at version {version}")
                }
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(e) => panic!("events ended: {e}"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{kind:?}: no app-state error"));
    eprintln!("{kind:?}: {reason}");
    // The primary uploads a verified snapshot (version 5); the laptop recovers from it.
    let version = tokio::time::timeout(WAIT, async {
        loop {
            if let Ok(Event::AppStateChanged {
                collection,
                version,
            }) = events.recv().await
                && collection == CONTACTS
            {
                return version;
            }
        }
    })
    .await
    .expect("recovery from the primary's snapshot");
    assert!(version >= 5, "{kind:?}: recovered at version {version}");
    assert_eq!(
        laptop.client.contacts().await.unwrap(),
        phone.client.contacts().await.unwrap()
    );
    assert_eq!(
        name_of(&laptop, "+15550400014").await.as_deref(),
        Some("contact 3")
    );
    // Syncing works again afterwards.
    phone
        .client
        .set_contact_name(&num(BOB), "Bob")
        .await
        .unwrap();
    eventually(WAIT, "sync after recovery", || async {
        name_of(&laptop, BOB).await.as_deref() == Some("Bob")
    })
    .await;
    laptop.client.sync_app_state(MESSAGE_FLAGS).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_patch_is_detected_and_recovered() {
    tampering_is_detected_and_recovered(Tamper::Drop).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swapped_patches_are_detected_and_recovered() {
    tampering_is_detected_and_recovered(Tamper::Swap).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_patch_is_detected_and_recovered() {
    tampering_is_detected_and_recovered(Tamper::Replay).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_altered_byte_is_detected_and_recovered() {
    tampering_is_detected_and_recovered(Tamper::AlterByte).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_device_cannot_decrypt_later_mutations() {
    let server = TestServer::start().await;
    let phone = TestClient::online(&server, ALICE).await;
    let laptop = TestClient::link_companion(&server, &phone, "laptop").await;
    let tablet = TestClient::link_companion(&server, &phone, "tablet").await;
    has_keys(&laptop, 1).await;
    has_keys(&tablet, 1).await;
    phone
        .client
        .set_contact_name(&num(BOB), "before")
        .await
        .unwrap();
    let laptop_id = laptop.client.whoami().await.unwrap().unwrap().device_id;
    // Everything the laptop could ever use: the keys it holds before its removal.
    let laptop_keys = laptop.client.app_state_key_ids().await.unwrap();
    let (_, v) = laptop
        .client
        .decrypt_app_state_mutation(
            &AppStatePatch::decode(
                store(&server)
                    .fetch_app_state(&phone.phone, CONTACTS, 0, 100)
                    .await
                    .unwrap()
                    .patches[0]
                    .1
                    .as_slice(),
            )
            .unwrap()
            .mutations[0],
        )
        .await
        .unwrap();
    assert_eq!(v, b"before");
    phone.client.unlink(laptop_id).await.unwrap();
    assert_eq!(laptop_id, DeviceId::new(2).unwrap());
    has_keys(&tablet, 2).await;
    phone
        .client
        .set_contact_name(&num(BOB), "after")
        .await
        .unwrap();
    let fetched = store(&server)
        .fetch_app_state(&phone.phone, CONTACTS, 0, 100)
        .await
        .unwrap();
    let patch = |i: usize| AppStatePatch::decode(fetched.patches[i].1.as_slice()).unwrap();
    let (before, after) = (patch(0), patch(1));
    // The mutation after the removal is under a key the laptop never had (the rotated key went over Olm
    // to the remaining devices only)...
    assert!(laptop_keys.contains(&before.mutations[0].key_id));
    assert!(
        !laptop_keys.contains(&after.mutations[0].key_id),
        "the new mutation uses a key the removed laptop held"
    );
    // ...and the unlinked laptop wiped its account state, keys included: nothing opens any more.
    eventually(WAIT, "the laptop to wipe itself", || async {
        laptop.client.app_state_key_ids().await.unwrap().is_empty()
    })
    .await;
    for m in [&before.mutations[0], &after.mutations[0]] {
        let refused = laptop.client.decrypt_app_state_mutation(m).await;
        assert!(refused.is_err(), "{refused:?}");
    }
    // The remaining tablet has the new key.
    let (_, v) = tablet
        .client
        .decrypt_app_state_mutation(&after.mutations[0])
        .await
        .unwrap();
    assert_eq!(v, b"after");
    eventually(WAIT, "the tablet to sync", || async {
        name_of(&tablet, BOB).await.as_deref() == Some("after")
    })
    .await;
}
