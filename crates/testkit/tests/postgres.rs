//! natterd on PostgreSQL (`--store postgres://...`), each test in a fresh schema: `natterd migrate` is
//! idempotent and safe when run concurrently, and real 1:1 (with a companion) and group exchanges work
//! end to end, including offline delivery across a SIGKILL of natterd (the queue is in PostgreSQL), and
//! an unreachable database is a retryable error that natterd recovers from by itself. Skipped with a clear line
//! when PostgreSQL is not reachable, unless NATTER_REQUIRE_CLUSTER=1 (CI), which makes them fail.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use natter_client::MessageKind;
use natter_proto::wire::ErrorCode;
use natter_server::store::Store;
use natter_server::store::postgres::PgStore;
use natter_server::store::postgres::testing::TestSchema;
use natter_testkit::{
    NatterdProcess, TcpRelay, TestClient, TestServer, eventually, natterd_binary, next_message,
};

const ALICE: &str = "+15550008001";
const BOB: &str = "+15550008002";
const CAROL: &str = "+15550008003";
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

/// The in-process test server takes a store URL too: 1:1 with a linked companion, and a group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_server_with_postgres_store_companion_and_group() {
    let Some(schema) = TestSchema::create().await.unwrap() else {
        return;
    };
    let server = TestServer::start_with_store(schema.url()).await;
    let alice = TestClient::online(&server, ALICE).await;
    let bob = TestClient::online(&server, BOB).await;
    let carol = TestClient::online(&server, CAROL).await;
    let bob2 = TestClient::link_companion(&server, &bob, "bob laptop").await;
    let mut bob_ev = bob.client.subscribe();
    let mut bob2_ev = bob2.client.subscribe();
    alice
        .client
        .send_text(&bob.phone, "in-process")
        .await
        .unwrap();
    for ev in [&mut bob_ev, &mut bob2_ev] {
        let got = next_message(ev, WAIT, |m| m.kind == MessageKind::Text && !m.from_me).await;
        assert_eq!(got.text, "in-process");
    }

    let g = alice
        .client
        .create_group("pg", &[bob.phone.clone(), carol.phone.clone()])
        .await
        .unwrap();
    alice
        .client
        .send_group_text(&g.id, "group over postgres")
        .await
        .unwrap();
    for c in [&bob, &bob2, &carol] {
        eventually(WAIT, "group message", || async {
            c.client
                .group_history(&g.id)
                .await
                .unwrap_or_default()
                .iter()
                .any(|m| m.text == "group over postgres")
        })
        .await;
    }
}

/// PostgreSQL unreachable (the connection to it cut by a relay): a send fails fast with the retryable
/// `Unavailable` error and nothing is acknowledged; once the database is back, natterd recovers by itself
/// and the message goes through, exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_outage_is_a_retryable_error_and_natterd_recovers() {
    let Some(schema) = TestSchema::create().await.unwrap() else {
        return;
    };
    let opts: sqlx::postgres::PgConnectOptions = schema.url().parse().unwrap();
    let relay = TcpRelay::start(&format!("{}:{}", opts.get_host(), opts.get_port())).await;
    let url = format!(
        "{}&host=127.0.0.1&port={}&pool_size=4&acquire_timeout_ms=500",
        schema.url(),
        relay.port()
    );
    let server = TestServer::start_with_store(&url).await;
    let alice = TestClient::online(&server, ALICE).await;
    let bob = TestClient::online(&server, BOB).await;
    let mut bob_ev = bob.client.subscribe();
    alice.client.send_text(&bob.phone, "before").await.unwrap();
    next_message(&mut bob_ev, WAIT, |m| m.text == "before").await;

    relay.set_up(false);
    let started = std::time::Instant::now();
    let err = alice
        .client
        .send_text(&bob.phone, "during the outage")
        .await
        .expect_err("a send without a database is refused");
    assert_eq!(err.server_code(), Some(ErrorCode::Unavailable), "{err:?}");
    assert!(err.is_transient(), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(10), "fails fast");

    relay.set_up(true);
    let mut sent = false;
    for _ in 0..50 {
        match alice.client.send_text(&bob.phone, "after").await {
            Ok(_) => {
                sent = true;
                break;
            }
            Err(e) if e.is_transient() => tokio::time::sleep(Duration::from_millis(200)).await,
            Err(e) => panic!("{e:?}"),
        }
    }
    assert!(sent, "natterd did not recover");
    next_message(&mut bob_ev, WAIT, |m| m.text == "after").await;
    let texts: Vec<String> = bob
        .client
        .history(&alice.phone)
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.text)
        .collect();
    assert_eq!(
        texts.iter().filter(|t| *t == "after").count(),
        1,
        "{texts:?}"
    );
}
