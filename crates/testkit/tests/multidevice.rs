//! Multi-device against a real natterd: linking companions by QR code (and the limit of four), a phone
//! that is switched off while its laptop goes on talking, devices the server slips in without a
//! signature chain, device-list rollback, safety numbers across linking, unlinking and re-registration,
//! expired link codes, unlinking from either side, and companions of a long-absent phone logged out.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::time::Duration;

use natter_client::net::{ConnectOptions, Connection};
use natter_client::{ClientError, Event, MessageKind, MessageRecord, MessageStatus};
use natter_crypto::DeviceKeys;
use natter_proto::device_list::DeviceListContent;
use natter_proto::noise::StaticKeypair;
use natter_proto::wire::{
    ErrorCode, ListOwnDevices, Login, SignedDeviceList, UploadKeys, push, request, response,
};
use natter_proto::{DeviceId, MessageId, PhoneNumber};
use natter_server::store::{DeviceListUpdate, DeviceRecord, Store};
use natter_testkit::{PendingCompanion, TestClient, TestServer, eventually, next_message};
use prost::Message;

/// A safety net only: every wait below ends as soon as its condition holds.
const WAIT: Duration = Duration::from_secs(20);

const ALICE: &str = "+15550300001";
const BOB: &str = "+15550300002";

fn device(id: u32) -> DeviceId {
    DeviceId::new(id).unwrap()
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn store(server: &TestServer) -> std::sync::Arc<dyn Store> {
    server.server().state().store.clone()
}

/// Changes the server's store behind natterd's back, as an attacker with the database (or a dishonest
/// server) would, and makes the running server serve the altered state (its device-id cache forgets
/// the account, as after any change it makes itself).
async fn tamper(server: &TestServer, phone: &PhoneNumber, update: DeviceListUpdate) {
    store(server).update_devices(phone, &update).await.unwrap();
    server.server().state().device_cache.invalidate(phone);
}

/// The signed list the server holds for `phone`, decoded (not verified).
async fn stored_list(server: &TestServer, phone: &PhoneNumber) -> (Vec<u8>, DeviceListContent) {
    let account = store(server).get_account(phone).await.unwrap().unwrap();
    let signed = SignedDeviceList::decode(account.device_list.as_slice()).unwrap();
    let content = DeviceListContent::decode(signed.content.as_slice()).unwrap();
    (account.device_list, content)
}

fn ids(content: &DeviceListContent) -> Vec<u32> {
    content.devices.iter().map(|d| d.device_id).collect()
}

/// Envelopes waiting on the server for one device.
async fn queued(server: &TestServer, phone: &PhoneNumber, id: u32) -> usize {
    store(server)
        .load_queue(phone, device(id), 0, 1000)
        .await
        .unwrap()
        .len()
}

/// Waits until `c`'s conversation with `peer` holds the message `id`, and returns it.
async fn wait_for(c: &TestClient, peer: &PhoneNumber, id: MessageId) -> MessageRecord {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(m) = c.client.message(peer, &id).await.unwrap() {
            return m;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "message {id:?} never reached {peer}'s conversation"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A conversation as (id, text, from_me), in order.
async fn conversation(c: &TestClient, peer: &PhoneNumber) -> Vec<(MessageId, String, bool)> {
    c.client
        .history(peer)
        .await
        .unwrap()
        .into_iter()
        .map(|m| {
            assert_eq!(m.kind, MessageKind::Text, "{m:?}");
            (m.id, m.text, m.from_me)
        })
        .collect()
}

fn untrusted(r: Result<MessageRecord, ClientError>) -> String {
    match r {
        Err(e @ ClientError::Untrusted { .. }) => e.to_string(),
        other => panic!("expected the keys to be refused as untrusted, got {other:?}"),
    }
}

/// A device the server invented: its Noise key logs in, its prekeys carry valid signatures of its own
/// key, but no account key ever signed it.
struct Rogue {
    conn: Connection,
    pushes: tokio::sync::mpsc::UnboundedReceiver<natter_proto::wire::Push>,
}

impl Rogue {
    /// Inserts device `id` into the server's store for `phone` (device record only; the stored
    /// signed list is `list_bytes`), logs it in and uploads 5 one-time keys and a fallback key.
    async fn insert(
        server: &TestServer,
        phone: &PhoneNumber,
        id: u32,
        list_bytes: Vec<u8>,
    ) -> Rogue {
        let mut keys = DeviceKeys::generate();
        let noise = StaticKeypair::generate().unwrap();
        let account = store(server).get_account(phone).await.unwrap().unwrap();
        tamper(
            server,
            phone,
            DeviceListUpdate {
                device_list: list_bytes,
                version: account.device_list_version + 1,
                added: vec![DeviceRecord {
                    phone: phone.clone(),
                    device_id: device(id),
                    noise_key: noise.public(),
                    identity_ed: keys.identity_ed(),
                    last_seen_ms: now_ms(),
                }],
                removed: Vec::new(),
            },
        )
        .await;
        let addr = server.addr();
        let (conn, pushes) = Connection::open(ConnectOptions {
            addr: &addr,
            noise_key: &noise,
            pinned_server_key: Some(server.server().public_key()),
            login: Some(Login {
                phone: phone.as_str().to_owned(),
                device_id: id,
            }),
        })
        .await
        .expect("the inserted device logs in");
        let one_time_keys = keys.generate_one_time_keys(5);
        let fallback_key = Some(keys.generate_fallback_key());
        conn.request(request::Body::UploadKeys(UploadKeys {
            one_time_keys,
            fallback_key,
        }))
        .await
        .expect("the inserted device uploads prekeys");
        Rogue { conn, pushes }
    }

    /// The device ids the server lists for the account (`ListOwnDevices`).
    async fn server_devices(&self) -> Vec<u32> {
        match self
            .conn
            .request(request::Body::ListOwnDevices(ListOwnDevices {}))
            .await
            .unwrap()
        {
            response::Body::OwnDevices(d) => d.devices.iter().map(|s| s.device_id).collect(),
            other => panic!("unexpected answer {other:?}"),
        }
    }

    /// Envelopes pushed to it so far.
    fn envelopes(&mut self) -> usize {
        let mut n = 0;
        while let Ok(p) = self.pushes.try_recv() {
            if matches!(p.body, Some(push::Body::Envelope(_))) {
                n += 1;
            }
        }
        n
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_companions_link_and_a_fifth_is_refused_naming_the_limit() {
    let server = TestServer::start().await;
    let alice = TestClient::online(&server, ALICE).await;
    let mut companions = Vec::new();
    for i in 1..=4 {
        let c = TestClient::link_companion(&server, &alice, &format!("laptop {i}")).await;
        assert_eq!(
            c.client.whoami().await.unwrap().unwrap().device_id,
            device(i + 1)
        );
        companions.push(c);
    }

    let mut fifth = PendingCompanion::start(&server, "one too many", WAIT).await;
    let qr = fifth.next_qr().await;
    match alice.client.link_device(&qr).await {
        Err(ClientError::Server {
            code: ErrorCode::TooManyDevices,
            message,
            ..
        }) => assert!(message.contains("4 companions"), "{message}"),
        other => panic!("a fifth companion must be refused, got {other:?}"),
    }
    let refused = fifth.client.clone();
    fifth.abort().await;
    assert_eq!(refused.whoami().await.unwrap(), None);

    let devices = alice.client.devices().await.unwrap();
    assert_eq!(
        devices.iter().map(|d| d.device_id).collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5]
    );
    assert!(devices.iter().all(|d| !d.name.is_empty() && d.online));
    for (d, i) in devices[1..].iter().zip(1..) {
        assert_eq!(d.name, format!("laptop {i}"));
    }
    assert_eq!(
        devices
            .iter()
            .filter(|d| d.this_device)
            .map(|d| d.device_id)
            .collect::<Vec<_>>(),
        vec![1]
    );
    // A companion sees the same five, itself marked.
    let seen = companions[2].client.devices().await.unwrap();
    assert_eq!(seen.len(), 5);
    assert_eq!(
        seen.iter()
            .filter(|d| d.this_device)
            .map(|d| d.device_id)
            .collect::<Vec<_>>(),
        vec![4]
    );
    // The server holds five devices and a signed list of five, nothing of the refused one.
    assert_eq!(
        store(&server)
            .list_devices(&alice.phone)
            .await
            .unwrap()
            .len(),
        5
    );
    assert_eq!(
        ids(&stored_list(&server, &alice.phone).await.1),
        vec![1, 2, 3, 4, 5]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_laptop_talks_while_the_phone_is_off_and_the_phone_catches_up() {
    let server = TestServer::start().await;
    let phone = TestClient::online(&server, ALICE).await;
    let bob = TestClient::online(&server, BOB).await;
    let laptop = TestClient::link_companion(&server, &phone, "laptop").await;
    let alice = phone.phone.clone();
    let mut bob_events = bob.client.subscribe();
    let mut laptop_events = laptop.client.subscribe();

    // Before: the phone writes; Bob and the laptop get it.
    let m1 = phone
        .client
        .send_text(&bob.phone, "from the phone")
        .await
        .unwrap();
    let got = next_message(&mut bob_events, WAIT, |m| m.id == m1.id).await;
    assert_eq!((got.chat.clone(), got.from_me), (alice.clone(), false));
    assert_eq!(got.sender_device, device(1));
    let copy = next_message(&mut laptop_events, WAIT, |m| m.id == m1.id).await;
    assert_eq!((copy.chat.clone(), copy.from_me), (bob.phone.clone(), true));
    assert_eq!(copy.sender_device, device(1));

    // The phone is switched off.
    let phone = phone.power_off().await;

    // The laptop writes; Bob sees it in the same conversation, from device 2.
    let mut sent = vec![m1.id];
    for text in ["from the laptop, phone off", "still the laptop"] {
        let m = laptop.client.send_text(&bob.phone, text).await.unwrap();
        assert_eq!(m.status, MessageStatus::Sent);
        let got = next_message(&mut bob_events, WAIT, |r| r.id == m.id).await;
        assert_eq!((got.chat.clone(), got.from_me), (alice.clone(), false));
        assert_eq!(got.sender_device, device(2));
        assert_eq!(got.text, text);
        sent.push(m.id);
    }
    // Bob answers; the laptop gets it.
    for text in ["bob answers", "bob again"] {
        let m = bob.client.send_text(&alice, text).await.unwrap();
        let got = next_message(&mut laptop_events, WAIT, |r| r.id == m.id).await;
        assert_eq!((got.chat.clone(), got.from_me), (bob.phone.clone(), false));
        assert_eq!(got.text, text);
        sent.push(m.id);
    }

    // The phone comes back and receives everything that happened meanwhile.
    let phone = phone.power_on().await;
    phone.client.connect().await.unwrap();
    for id in &sent {
        wait_for(&phone, &bob.phone, *id).await;
    }

    // One conversation everywhere, complete and in the same order; Bob tells the devices apart.
    let on_phone = conversation(&phone, &bob.phone).await;
    let on_laptop = conversation(&laptop, &bob.phone).await;
    let on_bob: Vec<_> = conversation(&bob, &alice)
        .await
        .into_iter()
        .map(|(id, text, from_me)| (id, text, !from_me))
        .collect();
    assert_eq!(
        on_phone.iter().map(|m| m.0).collect::<Vec<_>>(),
        sent,
        "{on_phone:?}"
    );
    assert_eq!(on_phone, on_laptop);
    assert_eq!(on_phone, on_bob);
    let texts: Vec<&str> = on_phone.iter().map(|m| m.1.as_str()).collect();
    assert_eq!(
        texts,
        [
            "from the phone",
            "from the laptop, phone off",
            "still the laptop",
            "bob answers",
            "bob again"
        ]
    );
    for (id, want) in sent.iter().zip([1, 2, 2]) {
        let at_bob = bob.client.message(&alice, id).await.unwrap().unwrap();
        assert_eq!(at_bob.sender_device, device(want));
        let at_phone = phone.client.message(&bob.phone, id).await.unwrap().unwrap();
        assert!(at_phone.from_me);
        assert_eq!(at_phone.sender_device, device(want));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_the_server_slips_in_without_signatures_gets_nothing() {
    let server = TestServer::start().await;
    let phone = TestClient::online(&server, ALICE).await;
    let bob = TestClient::online(&server, BOB).await;
    let laptop = TestClient::link_companion(&server, &phone, "laptop").await;
    let alice = phone.phone.clone();
    let first = bob.client.send_text(&alice, "before").await.unwrap();
    wait_for(&laptop, &bob.phone, first.id).await;

    // Device 3 appears in the server's records; the signed list stays the one Alice's phone signed.
    let (signed_bytes, signed) = stored_list(&server, &alice).await;
    assert_eq!(ids(&signed), vec![1, 2]);
    let mut rogue = Rogue::insert(&server, &alice, 3, signed_bytes).await;
    let records: Vec<u32> = store(&server)
        .list_devices(&alice)
        .await
        .unwrap()
        .iter()
        .map(|d| d.device_id.get())
        .collect();
    assert_eq!(records, vec![1, 2, 3]);
    assert_eq!(rogue.server_devices().await, vec![1, 2, 3]);
    let otks = |s: &TestServer| {
        let store = store(s);
        let alice = alice.clone();
        async move { store.count_one_time_keys(&alice, device(3)).await.unwrap() }
    };
    assert_eq!(otks(&server).await, 5);

    // Bob writes: Alice's real devices get it, the invented one gets nothing, not even a key claim.
    let mut phone_events = phone.client.subscribe();
    let m = bob
        .client
        .send_text(&alice, "for Alice only")
        .await
        .unwrap();
    assert_eq!(m.status, MessageStatus::Sent);
    next_message(&mut phone_events, WAIT, |r| r.id == m.id).await;
    assert_eq!(
        wait_for(&laptop, &bob.phone, m.id).await.text,
        "for Alice only"
    );
    assert_eq!(queued(&server, &alice, 3).await, 0);
    assert_eq!(otks(&server).await, 5);

    // Alice's own devices leave it out too when they write (it is "one of hers" on the server only).
    let mut bob_events = bob.client.subscribe();
    let from_laptop = laptop.client.send_text(&bob.phone, "laptop").await.unwrap();
    let from_phone = phone.client.send_text(&bob.phone, "phone").await.unwrap();
    for id in [from_laptop.id, from_phone.id] {
        next_message(&mut bob_events, WAIT, |r| r.id == id).await;
    }
    wait_for(&phone, &bob.phone, from_laptop.id).await;
    wait_for(&laptop, &bob.phone, from_phone.id).await;
    assert_eq!(queued(&server, &alice, 3).await, 0);
    assert_eq!(otks(&server).await, 5);
    assert_eq!(rogue.envelopes(), 0);
    // The account's devices are the signed ones.
    assert_eq!(
        phone
            .client
            .devices()
            .await
            .unwrap()
            .iter()
            .map(|d| d.device_id)
            .collect::<Vec<_>>(),
        vec![1, 2]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_the_server_forged_is_refused_with_a_clear_error_and_nothing_is_sent() {
    let server = TestServer::start().await;
    let phone = TestClient::online(&server, ALICE).await;
    let bob = TestClient::online(&server, BOB).await;
    let alice = phone.phone.clone();
    let first = bob.client.send_text(&alice, "before").await.unwrap();
    wait_for(&phone, &bob.phone, first.id).await;

    // The server adds a device entry of its own to the signed list, which it cannot sign.
    let (honest_bytes, honest) = stored_list(&server, &alice).await;
    let rogue_keys = DeviceKeys::generate();
    let mut forged = honest.clone();
    forged.devices.push(natter_proto::device_list::DeviceEntry {
        device_id: 2,
        identity_curve: rogue_keys.identity_curve().to_vec(),
        identity_ed: rogue_keys.identity_ed().to_vec(),
        noise_key: vec![7; 32],
        name: "server's own".into(),
        account_signature: vec![0; 64],
        device_signature: vec![0; 64],
    });
    forged.version += 1;
    let old = SignedDeviceList::decode(honest_bytes.as_slice()).unwrap();
    let forged_bytes = SignedDeviceList {
        content: forged.encode_to_vec(),
        signature: old.signature,
    }
    .encode_to_vec();
    let mut rogue = Rogue::insert(&server, &alice, 2, forged_bytes).await;
    assert_eq!(rogue.server_devices().await, vec![1, 2]);

    // Bob will not encrypt with a list that does not verify: a clear error, the message fails, and
    // the server stored nothing for anyone.
    let err = untrusted(bob.client.send_text(&alice, "refused").await);
    assert!(err.contains(ALICE), "{err}");
    let history = bob.client.history(&alice).await.unwrap();
    let refused = history.last().unwrap();
    assert_eq!(refused.text, "refused");
    assert_eq!(refused.status, MessageStatus::Failed);
    assert_eq!(queued(&server, &alice, 2).await, 0);
    assert_eq!(rogue.envelopes(), 0);

    // Once the server serves the honest list again, messages flow, and the refused one never arrived.
    let account = store(&server).get_account(&alice).await.unwrap().unwrap();
    tamper(
        &server,
        &alice,
        DeviceListUpdate {
            device_list: honest_bytes,
            version: account.device_list_version + 1,
            added: Vec::new(),
            removed: vec![device(2)],
        },
    )
    .await;
    let after = bob.client.send_text(&alice, "after").await.unwrap();
    wait_for(&phone, &bob.phone, after.id).await;
    assert!(
        phone
            .client
            .message(&bob.phone, &refused.id)
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_device_list_is_refused_as_a_rollback() {
    let server = TestServer::start().await;
    let phone = TestClient::online(&server, ALICE).await;
    let bob = TestClient::online(&server, BOB).await;
    let alice = phone.phone.clone();
    let laptop = TestClient::link_companion(&server, &phone, "laptop").await;

    // Bob learns version 2 (phone and laptop) by writing to Alice.
    let (v2_bytes, v2) = stored_list(&server, &alice).await;
    assert_eq!((v2.version, ids(&v2)), (2, vec![1, 2]));
    let laptop_record = store(&server)
        .get_device(&alice, device(2))
        .await
        .unwrap()
        .unwrap();
    let m = bob.client.send_text(&alice, "hello both").await.unwrap();
    wait_for(&laptop, &bob.phone, m.id).await;

    // The laptop is unlinked (version 3); Bob learns it by writing again.
    phone.client.unlink(device(2)).await.unwrap();
    let (_, v3) = stored_list(&server, &alice).await;
    assert_eq!((v3.version, ids(&v3)), (3, vec![1]));
    let m = bob.client.send_text(&alice, "phone only").await.unwrap();
    wait_for(&phone, &bob.phone, m.id).await;

    // The server brings the unlinked laptop back by serving the older, validly signed version 2.
    let account = store(&server).get_account(&alice).await.unwrap().unwrap();
    tamper(
        &server,
        &alice,
        DeviceListUpdate {
            device_list: v2_bytes,
            version: account.device_list_version + 1,
            added: vec![laptop_record],
            removed: Vec::new(),
        },
    )
    .await;

    let err = untrusted(bob.client.send_text(&alice, "not for the old laptop").await);
    assert!(
        err.contains("version 2") && err.contains("3 we know"),
        "the error must name the versions: {err}"
    );
    let last = bob.client.history(&alice).await.unwrap().pop().unwrap();
    assert_eq!(last.text, "not for the old laptop");
    assert_eq!(last.status, MessageStatus::Failed);
    assert_eq!(queued(&server, &alice, 2).await, 0);
    // Still refused on the next attempt: Bob did not adopt the old list.
    untrusted(bob.client.send_text(&alice, "again").await);
    assert_eq!(queued(&server, &alice, 2).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_safety_number_survives_linking_and_unlinking_but_not_re_registration() {
    let server = TestServer::start().await;
    let phone = TestClient::online(&server, ALICE).await;
    let bob = TestClient::online(&server, BOB).await;
    let alice = phone.phone.clone();
    let number = phone.client.safety_number(&bob.phone).await.unwrap();
    assert_eq!(number.len(), 60);
    assert!(number.bytes().all(|b| b.is_ascii_digit()));
    assert_eq!(bob.client.safety_number(&alice).await.unwrap(), number);

    // Linking: Bob picks up the new list (he writes to both devices), nothing changes.
    let laptop = TestClient::link_companion(&server, &phone, "laptop").await;
    let m = bob.client.send_text(&alice, "hi both").await.unwrap();
    wait_for(&laptop, &bob.phone, m.id).await;
    assert_eq!(
        phone.client.safety_number(&bob.phone).await.unwrap(),
        number
    );
    assert_eq!(
        laptop.client.safety_number(&bob.phone).await.unwrap(),
        number
    );
    assert_eq!(bob.client.safety_number(&alice).await.unwrap(), number);

    // Unlinking: the same.
    phone.client.unlink(device(2)).await.unwrap();
    let m = bob.client.send_text(&alice, "phone only").await.unwrap();
    wait_for(&phone, &bob.phone, m.id).await;
    assert_eq!(
        phone.client.safety_number(&bob.phone).await.unwrap(),
        number
    );
    assert_eq!(bob.client.safety_number(&alice).await.unwrap(), number);
    assert!(
        bob.client
            .history(&alice)
            .await
            .unwrap()
            .iter()
            .all(|m| m.kind != MessageKind::Notice)
    );

    // Alice registers her number again on a new phone: a new number, and Bob is told in the chat.
    let new_phone = TestClient::online(&server, ALICE).await;
    let hello = new_phone
        .client
        .send_text(&bob.phone, "new phone")
        .await
        .unwrap();
    wait_for(&bob, &alice, hello.id).await;
    let changed = new_phone.client.safety_number(&bob.phone).await.unwrap();
    assert_ne!(changed, number);
    assert_eq!(bob.client.safety_number(&alice).await.unwrap(), changed);
    let history = bob.client.history(&alice).await.unwrap();
    let notice = history
        .iter()
        .position(|m| m.kind == MessageKind::Notice)
        .expect("a notice in Bob's conversation");
    let text = &history[notice].text;
    assert!(
        text.contains("safety number") && text.contains("registered again"),
        "{text}"
    );
    let hello_at = history.iter().position(|m| m.id == hello.id).unwrap();
    assert!(
        notice < hello_at,
        "the notice comes before the new phone's message"
    );
    assert_eq!(
        history
            .iter()
            .filter(|m| m.kind == MessageKind::Notice)
            .count(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_link_code_is_refused_and_the_companion_shows_a_new_one() {
    let ttl = Duration::from_secs(2);
    let server = TestServer::start_with(|c| c.link_ttl = ttl).await;
    let phone = TestClient::online(&server, ALICE).await;
    let mut tablet = PendingCompanion::start(&server, "tablet", WAIT * 2).await;
    let (first, shown) = tablet.next_qr_at().await;
    let (second, shown_again) = tablet.next_qr_at().await;
    assert_ne!(first.reference, second.reference);
    assert!(shown_again - shown >= ttl, "{:?}", shown_again - shown);

    match phone.client.link_device(&first).await {
        Err(ClientError::Server {
            code: ErrorCode::LinkExpired,
            message,
            ..
        }) => assert!(message.contains("expired"), "{message}"),
        other => panic!("an expired code must be refused, got {other:?}"),
    }
    assert_eq!(ids(&stored_list(&server, &phone.phone).await.1), vec![1]);

    // A fresh code links.
    let fresh = tablet.next_qr().await;
    assert_ne!(fresh.reference, second.reference);
    let (linked, tablet) = tokio::join!(phone.client.link_device(&fresh), tablet.finish());
    assert_eq!(linked.unwrap().device_id, 2);
    let tablet = tablet.unwrap();
    assert_eq!(
        tablet.client.whoami().await.unwrap().unwrap().device_id,
        device(2)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unlinking_from_the_phone_or_from_the_companion_itself() {
    let server = TestServer::start().await;
    let phone = TestClient::online(&server, ALICE).await;
    let bob = TestClient::online(&server, BOB).await;
    let alice = phone.phone.clone();

    // From the phone: the laptop is told, wipes itself and cannot come back.
    let laptop = TestClient::link_companion(&server, &phone, "laptop").await;
    let mut laptop_events = laptop.client.subscribe();
    phone.client.unlink(device(2)).await.unwrap();
    let reason = tokio::time::timeout(WAIT, async {
        loop {
            if let Ok(Event::DeviceRemoved(r)) = laptop_events.recv().await {
                return r;
            }
        }
    })
    .await
    .expect("the laptop is told it was removed");
    assert!(reason.contains("unlinked"), "{reason}");
    eventually(WAIT, "the laptop to wipe itself", || {
        let c = laptop.client.clone();
        async move { c.whoami().await.unwrap().is_none() }
    })
    .await;
    assert!(laptop.client.history(&bob.phone).await.unwrap().is_empty());
    assert!(matches!(
        laptop.client.connect().await,
        Err(ClientError::NotRegistered)
    ));
    assert!(
        store(&server)
            .get_device(&alice, device(2))
            .await
            .unwrap()
            .is_none()
    );
    let (_, list) = stored_list(&server, &alice).await;
    assert_eq!(ids(&list), vec![1]);

    // From the companion itself: it leaves, and the phone re-signs its list without it.
    let tablet = TestClient::link_companion(&server, &phone, "tablet").await;
    let tablet_id = tablet.client.whoami().await.unwrap().unwrap().device_id;
    let (_, before) = stored_list(&server, &alice).await;
    assert!(ids(&before).contains(&tablet_id.get()));
    tablet.client.unlink(tablet_id).await.unwrap();
    assert_eq!(tablet.client.whoami().await.unwrap(), None);
    assert!(
        store(&server)
            .get_device(&alice, tablet_id)
            .await
            .unwrap()
            .is_none()
    );
    eventually(WAIT, "the phone to re-sign its list", || {
        let server = &server;
        let alice = alice.clone();
        async move { ids(&stored_list(server, &alice).await.1) == vec![1] }
    })
    .await;
    let (_, after) = stored_list(&server, &alice).await;
    assert!(after.version > before.version);
    assert_eq!(
        phone
            .client
            .devices()
            .await
            .unwrap()
            .iter()
            .map(|d| d.device_id)
            .collect::<Vec<_>>(),
        vec![1]
    );
    // Bob's messages go to the phone alone.
    let m = bob.client.send_text(&alice, "just you").await.unwrap();
    wait_for(&phone, &bob.phone, m.id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn companions_of_a_phone_absent_too_long_are_logged_out() {
    let after = Duration::from_millis(800);
    let server = TestServer::start_with(|c| c.companion_logout_after = after).await;
    let phone = TestClient::online(&server, ALICE).await;
    let laptop = TestClient::link_companion(&server, &phone, "laptop").await;
    let alice = phone.phone.clone();
    let mut laptop_events = laptop.client.subscribe();
    let state = server.server().state().clone();

    // A phone that stays connected is not absent, however long ago it logged in.
    tokio::time::sleep(after + Duration::from_millis(200)).await;
    assert!(state.router.get(&alice, device(1)).is_some());
    assert_eq!(
        natter_server::server::log_out_stale_companions(&state)
            .await
            .unwrap(),
        0
    );
    assert!(laptop.client.whoami().await.unwrap().is_some());

    // Switched off, and last seen longer ago than the limit: the laptop is logged out.
    let phone = phone.power_off().await;
    eventually(WAIT, "the phone to go offline", || {
        let state = state.clone();
        let alice = alice.clone();
        async move { state.router.get(&alice, device(1)).is_none() }
    })
    .await;
    assert_eq!(
        natter_server::server::log_out_stale_companions(&state)
            .await
            .unwrap(),
        1
    );
    let reason = tokio::time::timeout(WAIT, async {
        loop {
            if let Ok(Event::DeviceRemoved(r)) = laptop_events.recv().await {
                return r;
            }
        }
    })
    .await
    .expect("the laptop is told it was logged out");
    assert!(reason.contains("phone"), "{reason}");
    eventually(WAIT, "the laptop to wipe itself", || {
        let c = laptop.client.clone();
        async move { c.whoami().await.unwrap().is_none() }
    })
    .await;
    assert!(
        store(&server)
            .get_device(&alice, device(2))
            .await
            .unwrap()
            .is_none()
    );

    // The phone comes back and re-signs its list without the laptop.
    let phone = phone.power_on().await;
    phone.client.connect().await.unwrap();
    eventually(WAIT, "the phone to re-sign its list", || {
        let server = &server;
        let alice = alice.clone();
        async move { ids(&stored_list(server, &alice).await.1) == vec![1] }
    })
    .await;
    let devices: BTreeSet<u32> = phone
        .client
        .devices()
        .await
        .unwrap()
        .iter()
        .map(|d| d.device_id)
        .collect();
    assert_eq!(devices, BTreeSet::from([1]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_companion_decrypts_its_first_messages_without_asking_again() {
    let server = TestServer::start().await;
    let phone = TestClient::online(&server, ALICE).await;
    let bob = TestClient::online(&server, BOB).await;
    let alice = phone.phone.clone();
    let laptop = TestClient::link_companion(&server, &phone, "laptop").await;

    // Both write to the laptop's fresh prekeys while it is off, then go offline themselves: nobody
    // could answer a request to encrypt again, so the laptop must decrypt each on the first try.
    let laptop = laptop.power_off().await;
    let from_phone = phone
        .client
        .send_text(&bob.phone, "from the phone")
        .await
        .unwrap();
    let from_bob = bob.client.send_text(&alice, "from bob").await.unwrap();
    let _phone = phone.power_off().await;
    let _bob = bob.power_off().await;
    let laptop = laptop.power_on().await;
    laptop.client.connect().await.unwrap();
    let got = wait_for(&laptop, &from_phone.chat, from_bob.id).await;
    assert_eq!(
        (got.kind, got.text.as_str()),
        (MessageKind::Text, "from bob")
    );
    let got = wait_for(&laptop, &from_phone.chat, from_phone.id).await;
    assert_eq!(
        (got.kind, got.text.as_str(), got.from_me),
        (MessageKind::Text, "from the phone", true)
    );
}
