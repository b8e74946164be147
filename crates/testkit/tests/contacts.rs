//! Contacts and presence through a real natterd: a 5,000-entry address book in mixed formats finds
//! exactly the registered numbers and leaves no other number in the server's database; re-imports send
//! only what changed; quotas refuse the excess; profiles are ciphertext on the server and plaintext on
//! contacts; last seen follows the privacy setting; typing reaches the partner; a block stops messages,
//! presence, typing and profile requests at once; read receipts off means none sent and none shown.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::time::Duration;

use natter_client::{Event, MessageStatus, PresenceInfo};
use natter_proto::PhoneNumber;
use natter_proto::social::Visibility;
use natter_proto::wire::ErrorCode;
use natter_testkit::{TestClient, TestServer, eventually, refused_as_blocked};

const WAIT: Duration = Duration::from_secs(20);
const ALICE: &str = "+15550009001";

fn num(s: &str) -> PhoneNumber {
    PhoneNumber::parse(s).unwrap()
}

fn users(n: u32) -> Vec<String> {
    (0..n).map(|i| format!("+1555000{:04}", 9100 + i)).collect()
}

/// A vCard book of `total` numbers: the given users in assorted notations, the rest non-users in
/// assorted notations too, plus some entries that cannot be read. Returns the text and the non-users.
fn vcard_book(users: &[String], total: usize) -> (String, Vec<String>, usize) {
    let mut text = String::new();
    let mut non_users = Vec::new();
    let mut invalid = 0;
    for i in 0..total {
        let (version, tel, e164) = if i < users.len() {
            let e = &users[i];
            let d = &e[2..]; // national digits of a +1 number
            let tel = match i % 4 {
                0 => format!("TEL;TYPE=CELL:{e}"),
                1 => format!("TEL:({}) {}-{}", &d[..3], &d[3..6], &d[6..]),
                2 => format!("TEL;VALUE=uri:tel:+1-{}-{}-{}", &d[..3], &d[3..6], &d[6..]),
                _ => format!("TEL:001 {} {} {}", &d[..3], &d[3..6], &d[6..]),
            };
            ("4.0", tel, Some(e.clone()))
        } else if i % 97 == 0 {
            invalid += 1;
            ("3.0", format!("TEL:call me maybe {i}"), None)
        } else if i % 3 == 0 {
            let e = format!("+4930{:07}", 1_000_000 + i);
            ("3.0", format!("TEL:+49 30 {}", &e[5..]), Some(e))
        } else {
            let e = format!("+1202{:07}", 5_000_000 + i);
            (
                "3.0",
                format!("TEL;TYPE=HOME:202.{}.{}", &e[5..8], &e[8..]),
                Some(e),
            )
        };
        if let Some(e) = e164
            && i >= users.len()
        {
            non_users.push(e);
        }
        write!(
            text,
            "BEGIN:VCARD\r\nVERSION:{version}\r\nFN:Person {i}\r\n{tel}\r\nEND:VCARD\r\n"
        )
        .unwrap();
    }
    (text, non_users, invalid)
}

/// Every `+digits` string in a file.
fn numbers_in(bytes: &[u8]) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'+' {
            let mut j = i + 1;
            while j < bytes.len() && bytes[j].is_ascii_digit() {
                j += 1;
            }
            if j - i > 8 {
                out.insert(String::from_utf8_lossy(&bytes[i..j]).into_owned());
            }
            i = j;
        } else {
            i += 1;
        }
    }
    out
}

fn server_error(e: &natter_client::ClientError) -> Option<ErrorCode> {
    e.server_code()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_5000_entry_address_book_finds_exactly_the_users_and_the_server_keeps_no_other_number() {
    let server = TestServer::start().await;
    let alice = TestClient::online(&server, ALICE).await;
    let registered = users(8);
    for u in &registered {
        TestClient::register(&server, u).await;
    }
    let (text, non_users, invalid) = vcard_book(&registered, 5_000);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("contacts.vcf");
    std::fs::write(&path, &text).unwrap();

    let report = alice
        .client
        .import_contacts(&path, Some("US"), &|_, _| {})
        .await
        .unwrap();
    assert_eq!(
        report.rejected.len(),
        invalid,
        "{:?}",
        &report.rejected[..3]
    );
    assert!(
        report
            .rejected
            .iter()
            .all(|r| r.text.starts_with("call me"))
    );
    assert_eq!(report.numbers, 5_000 - invalid);
    assert_eq!(report.looked_up, 5_000 - invalid);
    let found: Vec<String> = report
        .registered
        .iter()
        .map(|p| p.as_str().to_owned())
        .collect();
    assert_eq!(found, registered, "exactly the registered numbers");

    // Nothing about the other numbers is in the server's database (file and WAL).
    let mut on_disk = BTreeSet::new();
    for entry in std::fs::read_dir(server.data_dir()).unwrap() {
        let p = entry.unwrap().path();
        if p.is_file() {
            on_disk.extend(numbers_in(&std::fs::read(&p).unwrap()));
        }
    }
    let leaked: Vec<&String> = non_users.iter().filter(|n| on_disk.contains(*n)).collect();
    assert!(
        leaked.is_empty(),
        "{} non-users on disk: {:?}",
        leaked.len(),
        &leaked[..leaked.len().min(3)]
    );
    assert!(
        on_disk.contains(&registered[0]),
        "the scan does find numbers"
    );

    // A re-import sends nothing; a changed book sends only the new number and forgets the removed one.
    let again = alice
        .client
        .import_contacts(&path, Some("US"), &|_, _| {})
        .await
        .unwrap();
    assert_eq!((again.looked_up, again.removed), (0, 0));
    assert_eq!(again.registered.len(), 8);
    let newcomer = "+15550009200";
    TestClient::register(&server, newcomer).await;
    let changed = text.replacen(
        &format!("TEL;TYPE=CELL:{}", registered[0]),
        &format!("TEL:{newcomer}"),
        1,
    );
    std::fs::write(&path, changed).unwrap();
    let third = alice
        .client
        .import_contacts(&path, Some("US"), &|_, _| {})
        .await
        .unwrap();
    assert_eq!((third.looked_up, third.removed), (1, 1));
    let found: BTreeSet<String> = third
        .registered
        .iter()
        .map(|p| p.as_str().to_owned())
        .collect();
    assert!(found.contains(newcomer) && !found.contains(&registered[0]));
    let store = server.server().state().store.clone();
    assert!(
        store
            .is_contact(&alice.phone, &num(newcomer))
            .await
            .unwrap()
    );
    assert!(
        !store
            .is_contact(&alice.phone, &num(&registered[0]))
            .await
            .unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_quotas_refuse_the_excess() {
    let server = TestServer::start_with(|cfg| {
        cfg.discovery_account_quota = 1_500;
        cfg.discovery_ip_quota = 2_200;
    })
    .await;
    let alice = TestClient::online(&server, ALICE).await;
    let bob = TestClient::online(&server, "+15550009002").await;
    let dir = tempfile::tempdir().unwrap();
    let book = |from: usize, n: usize| {
        let mut t = String::from("name,phone\n");
        for i in from..from + n {
            writeln!(t, "P{i},+1202{:07}", 5_000_000 + i).unwrap();
        }
        t
    };
    let path = dir.path().join("a.csv");
    std::fs::write(&path, book(0, 2_000)).unwrap();
    let e = alice
        .client
        .import_contacts(&path, None, &|_, _| {})
        .await
        .unwrap_err();
    assert_eq!(server_error(&e), Some(ErrorCode::RateLimited), "{e}");
    assert!(e.to_string().contains("quota of this account"), "{e}");
    // The first batch went through and is remembered: a retry tomorrow resumes after it.
    // Bob, from the same address, may use what is left of the address's quota and no more.
    let path = dir.path().join("b.csv");
    std::fs::write(&path, book(10_000, 1_500)).unwrap();
    let e = bob
        .client
        .import_contacts(&path, None, &|_, _| {})
        .await
        .unwrap_err();
    assert_eq!(server_error(&e), Some(ErrorCode::RateLimited), "{e}");
    assert!(e.to_string().contains("network address"), "{e}");
    // Bob's first 1,000 went through (the address is at 2,000 of 2,200): 200 more fit, no more.
    std::fs::write(&path, book(10_000, 1_200)).unwrap();
    let ok = bob
        .client
        .import_contacts(&path, None, &|_, _| {})
        .await
        .unwrap();
    assert_eq!(ok.looked_up, 200, "only what the last import did not send");
    assert_eq!(ok.remaining_today, 300);
    std::fs::write(&path, book(20_000, 1)).unwrap();
    let e = bob
        .client
        .import_contacts(&path, None, &|_, _| {})
        .await
        .unwrap_err();
    assert!(e.to_string().contains("network address"), "{e}");
}

fn png(path: &std::path::Path) {
    let img = image::RgbImage::from_fn(800, 600, |x, y| image::Rgb([x as u8, y as u8, 99]));
    img.save(path).unwrap();
}

async fn befriend(a: &TestClient, b: &TestClient) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("book.csv");
    std::fs::write(&path, format!("name,phone\nFriend,{}\n", b.phone)).unwrap();
    let r = a
        .client
        .import_contacts(&path, None, &|_, _| {})
        .await
        .unwrap();
    assert_eq!(r.registered, vec![b.phone.clone()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profiles_are_ciphertext_on_the_server_and_plaintext_on_contacts() {
    let server = TestServer::start().await;
    let alice = TestClient::online(&server, ALICE).await;
    let bob = TestClient::online(&server, "+15550009002").await;
    let carol = TestClient::online(&server, "+15550009003").await;
    let stranger = TestClient::online(&server, "+15550009004").await;
    befriend(&alice, &bob).await;
    let dir = tempfile::tempdir().unwrap();
    let pic = dir.path().join("me.png");
    png(&pic);
    alice
        .client
        .set_profile(Some("Alice Liddell"), Some("at work"), Some(&pic))
        .await
        .unwrap();
    befriend(&alice, &carol).await; // a contact found after the profile was set gets the key too

    // The server holds ciphertext only.
    let store = server.server().state().store.clone();
    let (sealed, _) = store.get_profile(&alice.phone).await.unwrap().unwrap();
    assert!(!sealed.windows(7).any(|w| w == b"Liddell"));
    assert!(!sealed.windows(7).any(|w| w == b"at work"));

    for c in [&bob, &carol] {
        eventually(WAIT, "the profile key to arrive", || async {
            c.client.profile(&alice.phone).await.unwrap().is_some()
        })
        .await;
        let p = c.client.profile(&alice.phone).await.unwrap().unwrap();
        assert_eq!(
            (p.name.as_str(), p.about.as_str()),
            ("Alice Liddell", "at work")
        );
        let avatar = image::load_from_memory(&p.avatar_jpeg).unwrap();
        assert!(avatar.width() <= 512 && avatar.height() <= 512);
    }
    // Someone who is not a contact got no key: nothing readable.
    assert_eq!(stranger.client.profile(&alice.phone).await.unwrap(), None);
    let list = bob.client.contact_list().await.unwrap();
    assert!(list.is_empty() || list.iter().all(|c| c.number != alice.phone.as_str()));

    // A block: the blocked contact's requests are refused; the others read the profile as it changes.
    alice.client.block(&bob.phone, true).await.unwrap();
    let e = bob.client.profile(&alice.phone).await.unwrap_err();
    assert_eq!(e.server_code(), Some(ErrorCode::Blocked), "{e}");
    alice
        .client
        .set_profile(Some("Alice L."), None, None)
        .await
        .unwrap();
    // (Until the new key arrives, Carol's old key does not open the new profile.)
    eventually(WAIT, "carol to read the new profile", || async {
        carol
            .client
            .profile(&alice.phone)
            .await
            .ok()
            .flatten()
            .is_some_and(|p| p.name == "Alice L.")
    })
    .await;
    let privacy = alice.client.privacy().await.unwrap();
    assert_eq!(privacy.blocked, vec![bob.phone.as_str().to_owned()]);
    alice.client.block(&bob.phone, false).await.unwrap();
    eventually(WAIT, "bob to read the profile again", || async {
        bob.client
            .profile(&alice.phone)
            .await
            .ok()
            .flatten()
            .is_some_and(|p| p.name == "Alice L.")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_follows_privacy_and_typing_reaches_the_partner() {
    let server = TestServer::start().await;
    let alice = TestClient::online(&server, ALICE).await;
    let bob = TestClient::online(&server, "+15550009002").await;
    assert_eq!(
        bob.client.presence(&alice.phone).await.unwrap(),
        PresenceInfo::Online
    );
    let mut events = bob.client.subscribe();

    // Alice goes away: Bob, who follows her, sees her last seen.
    let home = alice.power_off().await;
    let seen = tokio::time::timeout(WAIT, async {
        loop {
            if let Ok(Event::Presence { phone, presence }) = events.recv().await
                && phone.as_str() == ALICE
            {
                return presence;
            }
        }
    })
    .await
    .unwrap();
    assert!(
        matches!(seen, PresenceInfo::LastSeen(t) if t > 0),
        "{seen:?}"
    );
    let alice = home.power_on().await;
    alice.client.connect().await.unwrap();

    // Last seen: nobody, then contacts only (Bob is not one, then is).
    alice
        .client
        .set_last_seen_visibility(Visibility::Nobody)
        .await
        .unwrap();
    assert_eq!(
        bob.client.presence(&alice.phone).await.unwrap(),
        PresenceInfo::Hidden
    );
    alice
        .client
        .set_last_seen_visibility(Visibility::Contacts)
        .await
        .unwrap();
    assert_eq!(
        bob.client.presence(&alice.phone).await.unwrap(),
        PresenceInfo::Hidden
    );
    befriend(&alice, &bob).await;
    assert_eq!(
        bob.client.presence(&alice.phone).await.unwrap(),
        PresenceInfo::Online
    );

    // Typing reaches Alice's devices, never stored.
    let mut alice_events = alice.client.subscribe();
    bob.client.set_typing(&alice.phone, true).await.unwrap();
    let typing = tokio::time::timeout(WAIT, async {
        loop {
            if let Ok(Event::Typing { phone, typing }) = alice_events.recv().await {
                return (phone, typing);
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(typing, (bob.phone.clone(), true));

    // A block hides presence and refuses typing at once.
    alice.client.block(&bob.phone, true).await.unwrap();
    assert_eq!(
        bob.client.presence(&alice.phone).await.unwrap(),
        PresenceInfo::Hidden
    );
    let e = bob.client.set_typing(&alice.phone, true).await.unwrap_err();
    assert_eq!(e.server_code(), Some(ErrorCode::Blocked));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_peer_cannot_deliver_and_read_receipts_can_be_off() {
    let server = TestServer::start().await;
    let alice = TestClient::online(&server, ALICE).await;
    let bob = TestClient::online(&server, "+15550009002").await;
    alice.client.block(&bob.phone, true).await.unwrap();
    assert!(refused_as_blocked(&bob, &alice, "let me in", WAIT).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(alice.client.history(&bob.phone).await.unwrap().is_empty());

    // Unblocked, messages flow; with read receipts off none are sent and none shown.
    alice.client.block(&bob.phone, false).await.unwrap();
    alice.client.set_read_receipts(false).await.unwrap();
    let to_alice = bob.client.send_text(&alice.phone, "hello").await.unwrap();
    eventually(WAIT, "alice to get it", || async {
        !alice.client.history(&bob.phone).await.unwrap().is_empty()
    })
    .await;
    alice.client.take_unshown().await.unwrap(); // "read" on screen
    let to_bob = alice.client.send_text(&bob.phone, "hi").await.unwrap();
    eventually(WAIT, "bob to get it", || async {
        bob.client
            .history(&alice.phone)
            .await
            .unwrap()
            .iter()
            .any(|m| m.id == to_bob.id)
    })
    .await;
    bob.client.take_unshown().await.unwrap(); // Bob reads and sends a read receipt
    let status = |c: &TestClient, peer: PhoneNumber, id| {
        let c = c.client.clone();
        async move {
            c.history(&peer)
                .await
                .unwrap()
                .into_iter()
                .find(|m| m.id == id)
                .unwrap()
                .status
        }
    };
    eventually(WAIT, "both messages delivered", || async {
        status(&bob, alice.phone.clone(), to_alice.id).await == MessageStatus::Delivered
            && status(&alice, bob.phone.clone(), to_bob.id).await >= MessageStatus::Delivered
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        status(&bob, alice.phone.clone(), to_alice.id).await,
        MessageStatus::Delivered,
        "alice sent no read receipt"
    );
    assert_eq!(
        status(&alice, bob.phone.clone(), to_bob.id).await,
        MessageStatus::Delivered,
        "alice is shown no read receipt"
    );

    // Blocked again after messages flowed (natterd had cached that Alice blocks nobody): refused at once.
    alice.client.block(&bob.phone, true).await.unwrap();
    assert!(refused_as_blocked(&bob, &alice, "again?", WAIT).await);
}
