//! natterd on PostgreSQL (`--store postgres://...`), each test in a fresh schema: `natterd migrate` is
//! idempotent and safe when run concurrently, and a real 1:1 exchange works end to end, including
//! offline delivery across a SIGKILL of natterd (the queue is in PostgreSQL). Skipped with a clear line
//! when PostgreSQL is not reachable, unless NATTER_REQUIRE_CLUSTER=1 (CI), which makes them fail.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use natter_client::MessageKind;
use natter_server::store::Store;
use natter_server::store::postgres::PgStore;
use natter_server::store::postgres::testing::TestSchema;
use natter_testkit::{NatterdProcess, TestClient, TestServer, natterd_binary, next_message};

const ALICE: &str = "+15550008001";
const BOB: &str = "+15550008002";
const WAIT: Duration = Duration::from_secs(20);

fn migrate(url: &str) -> std::process::Child {
    std::process::Command::new(natterd_binary())
        .args(["migrate", "--store", url])
        .env("NATTERD_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn natterd migrate")
}

fn expect_version(child: std::process::Child) {
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "natterd migrate failed: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let want = format!(
        "schema version {}",
        natter_server::store::postgres::latest_version()
    );
    assert_eq!(stdout.trim(), want);
}

#[tokio::test]
async fn natterd_migrate_is_idempotent_and_concurrent_safe() {
    let Some(schema) = TestSchema::create().await.unwrap() else {
        return;
    };
    // Three processes at once on an empty schema, then once more: all succeed at the same version.
    let children: Vec<_> = (0..3).map(|_| migrate(schema.url())).collect();
    for c in children {
        expect_version(c);
    }
    expect_version(migrate(schema.url()));
    // A bad URL fails with a message, not a panic.
    let out = std::process::Command::new(natterd_binary())
        .args([
            "migrate",
            "--store",
            "postgres://nobody:secret@127.0.0.1:1/x",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("unavailable"), "{stderr}");
    assert!(!stderr.contains("secret"), "password leaked: {stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn natterd_on_postgres_exchanges_messages_and_survives_sigkill() {
    let Some(schema) = TestSchema::create().await.unwrap() else {
        return;
    };
    let mut natterd = NatterdProcess::start_with_store(schema.url(), &[]);
    let alice = TestClient::register_at(&natterd.addr(), &natterd.sms_log(), ALICE).await;
    let bob = TestClient::register_at(&natterd.addr(), &natterd.sms_log(), BOB).await;
    alice.client.connect().await.unwrap();
    bob.client.connect().await.unwrap();
    let mut alice_ev = alice.client.subscribe();
    let mut bob_ev = bob.client.subscribe();

    alice
        .client
        .send_text(&bob.phone, "hello over postgres")
        .await
        .unwrap();
    let got = next_message(&mut bob_ev, WAIT, |m| {
        m.kind == MessageKind::Text && !m.from_me
    })
    .await;
    assert_eq!(
        (got.chat.clone(), got.text.as_str()),
        (alice.phone.clone(), "hello over postgres")
    );
    bob.client
        .send_text(&alice.phone, "and back")
        .await
        .unwrap();
    let got = next_message(&mut alice_ev, WAIT, |m| {
        m.kind == MessageKind::Text && !m.from_me
    })
    .await;
    assert_eq!(got.text, "and back");

    // Bob goes offline; Alice's message is acknowledged (durable in PostgreSQL), natterd is killed and
    // started again, and Bob gets it on reconnect.
    bob.client.disconnect().await;
    alice
        .client
        .send_text(&bob.phone, "while you were away")
        .await
        .unwrap();
    natterd.kill();
    natterd.restart();
    let mut bob_ev = bob.client.subscribe();
    bob.client.connect().await.unwrap();
    let got = next_message(&mut bob_ev, WAIT, |m| {
        m.kind == MessageKind::Text && !m.from_me
    })
    .await;
    assert_eq!(got.text, "while you were away");
    // The accounts are in PostgreSQL, not in the data directory.
    let pg = PgStore::open_migrated(&schema.url().parse().unwrap())
        .await
        .unwrap();
    for phone in [&alice.phone, &bob.phone] {
        assert!(pg.get_account(phone).await.unwrap().is_some());
    }
    assert!(!natterd.data_dir().join("natter.db").exists());
    drop(natterd);
}

/// The in-process test server takes a store URL too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_server_with_postgres_store() {
    let Some(schema) = TestSchema::create().await.unwrap() else {
        return;
    };
    let server = TestServer::start_with_store(schema.url()).await;
    let alice = TestClient::online(&server, ALICE).await;
    let bob = TestClient::online(&server, BOB).await;
    let mut bob_ev = bob.client.subscribe();
    alice
        .client
        .send_text(&bob.phone, "in-process")
        .await
        .unwrap();
    let got = next_message(&mut bob_ev, WAIT, |m| {
        m.kind == MessageKind::Text && !m.from_me
    })
    .await;
    assert_eq!(got.text, "in-process");
}
