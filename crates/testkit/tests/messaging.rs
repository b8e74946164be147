//! End-to-end messaging through a real natterd on a loopback port: two accounts talking both ways,
//! offline delivery, server restarts, and re-registration of a number on a new phone.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use natter_client::{ClientError, Event, MessageKind, MessageRecord, MessageStatus};
use natter_proto::MessageId;
use natter_testkit::{TestClient, TestServer, eventually, next_message};
use tokio::sync::broadcast;

const ALICE: &str = "+15550001001";
const BOB: &str = "+15550001002";
/// A safety net only: every wait ends as soon as its condition holds.
const WAIT: Duration = Duration::from_secs(20);

/// Waits for `n` text messages from `chat`, in arrival order.
async fn collect_texts(
    events: &mut broadcast::Receiver<Event>,
    chat: &natter_proto::PhoneNumber,
    n: usize,
) -> Vec<MessageRecord> {
    let mut out = Vec::new();
    while out.len() < n {
        out.push(
            next_message(events, WAIT, |m| {
                m.chat == *chat && m.kind == MessageKind::Text
            })
            .await,
        );
    }
    out
}

/// Waits for the next `BacklogDone` and returns every message event seen before it.
async fn messages_until_backlog_done(
    events: &mut broadcast::Receiver<Event>,
) -> Vec<MessageRecord> {
    tokio::time::timeout(WAIT, async {
        let mut seen = Vec::new();
        loop {
            match events.recv().await.expect("event stream") {
                Event::BacklogDone => return seen,
                Event::Message(m) => seen.push(m),
                _ => {}
            }
        }
    })
    .await
    .expect("backlog done within the timeout")
}

async fn statuses(c: &TestClient, peer: &natter_proto::PhoneNumber) -> Vec<MessageStatus> {
    c.client
        .history(peer)
        .await
        .unwrap()
        .into_iter()
        .filter(|m| m.from_me)
        .map(|m| m.status)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_accounts_exchange_messages_both_ways() {
    let server = TestServer::start().await;
    let alice = TestClient::online(&server, ALICE).await;
    let bob = TestClient::online(&server, BOB).await;
    let mut alice_ev = alice.client.subscribe();
    let mut bob_ev = bob.client.subscribe();

    // a1, a2, b1, a3, b2: each waits for its arrival before the next goes, so both sides agree on order.
    let script: [(bool, &str); 5] = [
        (true, "hello Bob"),
        (true, "are you there?"),
        (false, "hi Alice, yes"),
        (true, "great ✓ ünïcödé"),
        (false, "bye"),
    ];
    let mut sent: Vec<(bool, MessageId, String)> = Vec::new();
    for (from_alice, text) in script {
        let (sender, receiver_ev, sender_phone, receiver_phone) = if from_alice {
            (&alice, &mut bob_ev, &alice.phone, &bob.phone)
        } else {
            (&bob, &mut alice_ev, &bob.phone, &alice.phone)
        };
        let rec = sender
            .client
            .send_text(receiver_phone, text)
            .await
            .expect("send");
        assert_eq!(rec.status, MessageStatus::Sent);
        assert!(rec.server_ts_ms > 0, "the server's timestamp is recorded");
        assert!(rec.from_me);
        assert_eq!(rec.chat, *receiver_phone);
        assert_eq!(rec.text, text);
        let got = next_message(receiver_ev, WAIT, |m| m.kind == MessageKind::Text).await;
        assert_eq!(got.id, rec.id, "the receiver sees the sender's message id");
        assert_eq!(got.text, text);
        assert_eq!(got.chat, *sender_phone, "the chat is the sender's number");
        assert!(!got.from_me);
        assert_eq!(got.sender_device.get(), 1);
        assert_eq!(got.status, MessageStatus::Received);
        assert_eq!(got.server_ts_ms, rec.server_ts_ms);
        sent.push((from_alice, rec.id, text.to_owned()));
    }

    // Both histories hold the whole conversation, in the same order, with from_me flipped.
    let alice_hist = alice.client.history(&bob.phone).await.unwrap();
    let bob_hist = bob.client.history(&alice.phone).await.unwrap();
    for (hist, me_is_alice, chat) in [
        (&alice_hist, true, &bob.phone),
        (&bob_hist, false, &alice.phone),
    ] {
        let got: Vec<(bool, MessageId, String)> = hist
            .iter()
            .map(|m| (m.from_me == me_is_alice, m.id, m.text.clone()))
            .collect();
        assert_eq!(
            got,
            sent,
            "history of {}",
            if me_is_alice { "Alice" } else { "Bob" }
        );
        assert!(
            hist.iter()
                .all(|m| m.chat == *chat && m.kind == MessageKind::Text)
        );
        assert!(hist.windows(2).all(|w| w[0].seq < w[1].seq));
    }

    // Receipts: every sent message reaches Delivered on its sender's side.
    for (c, peer) in [(&alice, &bob.phone), (&bob, &alice.phone)] {
        eventually(WAIT, "delivered receipts", || async {
            statuses(c, peer)
                .await
                .iter()
                .all(|s| *s == MessageStatus::Delivered)
        })
        .await;
    }

    // Bob shows his unshown messages: exactly Alice's three, oldest first; Alice then sees them Read.
    let shown = bob.client.take_unshown().await.unwrap();
    let shown_ids: Vec<MessageId> = shown.iter().map(|m| m.id).collect();
    let alice_ids: Vec<MessageId> = sent.iter().filter(|s| s.0).map(|s| s.1).collect();
    assert_eq!(shown_ids, alice_ids);
    assert!(
        bob.client.take_unshown().await.unwrap().is_empty(),
        "shown once"
    );
    eventually(WAIT, "read receipts at Alice", || async {
        statuses(&alice, &bob.phone).await == vec![MessageStatus::Read; 3]
    })
    .await;
    // Alice has not looked at Bob's messages yet: they stay Delivered until she does.
    assert_eq!(
        statuses(&bob, &alice.phone).await,
        vec![MessageStatus::Delivered; 2]
    );
    let shown = alice.client.take_unshown().await.unwrap();
    assert_eq!(shown.len(), 2);
    eventually(WAIT, "read receipts at Bob", || async {
        statuses(&bob, &alice.phone).await == vec![MessageStatus::Read; 2]
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_recipient_gets_everything_once_in_order() {
    let server = TestServer::start().await;
    let alice = TestClient::online(&server, ALICE).await;
    let bob = TestClient::register(&server, BOB).await;
    assert!(!bob.client.is_connected());

    let mut sent = Vec::new();
    for i in 0..5 {
        let rec = alice
            .client
            .send_text(&bob.phone, &format!("offline message {i}"))
            .await
            .expect("durably accepted while Bob is offline");
        assert_eq!(rec.status, MessageStatus::Sent);
        sent.push(rec);
    }

    let mut bob_ev = bob.client.subscribe();
    bob.client.connect().await.unwrap();
    let seen = messages_until_backlog_done(&mut bob_ev).await;
    let ids: Vec<MessageId> = seen.iter().map(|m| m.id).collect();
    let want: Vec<MessageId> = sent.iter().map(|m| m.id).collect();
    assert_eq!(
        ids, want,
        "all five, each once, in order, before the backlog ends"
    );
    let texts: Vec<&str> = seen.iter().map(|m| m.text.as_str()).collect();
    assert_eq!(
        texts,
        (0..5)
            .map(|i| format!("offline message {i}"))
            .collect::<Vec<_>>()
    );
    let hist = bob.client.history(&alice.phone).await.unwrap();
    assert_eq!(hist.iter().map(|m| m.id).collect::<Vec<_>>(), want);

    // Everything was acknowledged: a new session of Bob's gets nothing again.
    eventually(WAIT, "delivered receipts", || async {
        statuses(&alice, &bob.phone).await == vec![MessageStatus::Delivered; 5]
    })
    .await;
    let bob = bob.reopen().await;
    let mut bob_ev = bob.client.subscribe();
    bob.client.connect().await.unwrap();
    let again = messages_until_backlog_done(&mut bob_ev).await;
    assert!(again.is_empty(), "redelivered: {again:?}");
    assert_eq!(bob.client.history(&alice.phone).await.unwrap().len(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_restart_between_send_and_receive_loses_nothing() {
    let mut server = TestServer::start().await;
    let alice = TestClient::online(&server, ALICE).await;
    let bob = TestClient::register(&server, BOB).await;

    let mut want = Vec::new();
    for i in 0..3 {
        want.push(
            alice
                .client
                .send_text(&bob.phone, &format!("before restart {i}"))
                .await
                .unwrap()
                .id,
        );
    }
    server.restart().await;

    let mut bob_ev = bob.client.subscribe();
    bob.client
        .connect()
        .await
        .expect("Bob logs in to the restarted server");
    let seen = messages_until_backlog_done(&mut bob_ev).await;
    assert_eq!(seen.iter().map(|m| m.id).collect::<Vec<_>>(), want);

    // Alice's client reconnected by itself: the receipts reach her and she can send again.
    eventually(WAIT, "delivered receipts after the restart", || async {
        statuses(&alice, &bob.phone).await == vec![MessageStatus::Delivered; 3]
    })
    .await;
    let after = alice
        .client
        .send_text(&bob.phone, "after restart")
        .await
        .unwrap();
    let got = next_message(&mut bob_ev, WAIT, |m| m.kind == MessageKind::Text).await;
    assert_eq!(got.id, after.id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn online_clients_reconnect_by_themselves_after_a_restart() {
    let mut server = TestServer::start().await;
    let alice = TestClient::online(&server, ALICE).await;
    let bob = TestClient::online(&server, BOB).await;
    let mut alice_ev = alice.client.subscribe();
    let mut bob_ev = bob.client.subscribe();

    let first = alice.client.send_text(&bob.phone, "one").await.unwrap();
    assert_eq!(next_message(&mut bob_ev, WAIT, |_| true).await.id, first.id);

    server.restart().await;
    // Each client notices the loss and logs in again without being told to.
    for ev in [&mut alice_ev, &mut bob_ev] {
        tokio::time::timeout(WAIT, async {
            let mut lost = false;
            loop {
                match ev.recv().await.unwrap() {
                    Event::Disconnected => lost = true,
                    Event::Connected if lost => return,
                    _ => {}
                }
            }
        })
        .await
        .expect("disconnected, then connected again");
    }
    eventually(WAIT, "both connected", || async {
        alice.client.is_connected() && bob.client.is_connected()
    })
    .await;

    let two = alice.client.send_text(&bob.phone, "two").await.unwrap();
    let got = collect_texts(&mut bob_ev, &alice.phone, 1).await;
    assert_eq!(got[0].id, two.id);
    assert_eq!(got[0].text, "two");
    let reply = bob.client.send_text(&alice.phone, "three").await.unwrap();
    let got = collect_texts(&mut alice_ev, &bob.phone, 1).await;
    assert_eq!(got[0].id, reply.id);
    let hist = bob.client.history(&alice.phone).await.unwrap();
    assert_eq!(
        hist.iter().map(|m| m.text.as_str()).collect::<Vec<_>>(),
        ["one", "two", "three"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reregistration_removes_the_old_device_and_bob_reaches_the_new_one() {
    let server = TestServer::start().await;
    let old_alice = TestClient::online(&server, ALICE).await;
    let bob = TestClient::online(&server, BOB).await;
    let mut old_ev = old_alice.client.subscribe();
    let mut bob_ev = bob.client.subscribe();

    // Sessions exist both ways before the number moves.
    old_alice
        .client
        .send_text(&bob.phone, "from the old phone")
        .await
        .unwrap();
    next_message(&mut bob_ev, WAIT, |_| true).await;
    bob.client
        .send_text(&old_alice.phone, "to the old phone")
        .await
        .unwrap();
    next_message(&mut old_ev, WAIT, |_| true).await;

    // The number is registered again, in a new home.
    let new_alice = TestClient::register(&server, ALICE).await;
    assert_ne!(
        new_alice
            .client
            .whoami()
            .await
            .unwrap()
            .unwrap()
            .account_key,
        old_alice
            .client
            .whoami()
            .await
            .unwrap()
            .unwrap()
            .account_key
    );

    // The old device is told, and cannot log in any more.
    let reason = tokio::time::timeout(WAIT, async {
        loop {
            if let Event::DeviceRemoved(r) = old_ev.recv().await.unwrap() {
                return r;
            }
        }
    })
    .await
    .expect("the old device hears that it was removed");
    assert!(!reason.is_empty());
    match old_alice.client.connect().await {
        Err(ClientError::DeviceRemoved(msg)) => assert!(!msg.is_empty()),
        other => panic!("old device logging in: expected DeviceRemoved, got {other:?}"),
    }

    // Bob writes to Alice: the new phone gets it.
    let mut new_ev = new_alice.client.subscribe();
    new_alice.client.connect().await.unwrap();
    let sent = bob
        .client
        .send_text(&new_alice.phone, "do you have a new phone?")
        .await
        .unwrap();
    let got = next_message(&mut new_ev, WAIT, |m| m.kind == MessageKind::Text).await;
    assert_eq!(got.id, sent.id);
    assert_eq!(got.text, "do you have a new phone?");
    assert_eq!(got.chat, bob.phone);
    let new_hist = new_alice.client.history(&bob.phone).await.unwrap();
    assert!(
        new_hist
            .iter()
            .all(|m| m.kind != MessageKind::Undecryptable),
        "{new_hist:?}"
    );

    // Bob's conversation says that the safety number changed.
    eventually(WAIT, "the safety-number notice", || async {
        bob.client
            .history(&new_alice.phone)
            .await
            .unwrap()
            .iter()
            .any(|m| m.kind == MessageKind::Notice && m.text.contains("safety number"))
    })
    .await;
    let notices = bob
        .client
        .history(&new_alice.phone)
        .await
        .unwrap()
        .into_iter()
        .filter(|m| m.kind == MessageKind::Notice)
        .count();
    assert_eq!(notices, 1, "one notice for one change");

    // And the new phone answers Bob normally.
    let answer = new_alice
        .client
        .send_text(&bob.phone, "yes, new phone")
        .await
        .unwrap();
    let got = next_message(&mut bob_ev, WAIT, |m| {
        m.kind == MessageKind::Text && m.id == answer.id
    })
    .await;
    assert_eq!(got.text, "yes, new phone");
}

/// Closing a client stops its background work (outbox flushes, receipts, syncs and history jobs that a
/// login and a send start) and waits for it: the home's lock is free the moment `close` returns, and
/// nothing of the closed client writes behind the next one's back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_client_frees_its_home_at_once() {
    let server = TestServer::start().await;
    let alice = TestClient::online(&server, ALICE).await;
    let bob = TestClient::online(&server, BOB).await;
    for i in 0..20 {
        alice
            .client
            .send_text(&bob.phone, &format!("bye {i}"))
            .await
            .unwrap();
    }
    let home = alice.home().to_path_buf();
    let _off = alice.power_off().await; // Client::close
    // The client's lock file (`lock` in its home) is held for as long as anything of the client runs.
    let lock = std::fs::OpenOptions::new()
        .write(true)
        .open(home.join("lock"))
        .unwrap();
    lock.try_lock()
        .expect("no task of the closed client holds its home");
}
