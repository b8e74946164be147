//! Registration refusals against a real natterd: wrong, burnt and expired codes, the resend cooldown,
//! per-number and per-IP limits, invalid numbers (client and server side) and unknown recipients.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use natter_client::net::{ConnectOptions, Connection};
use natter_client::{Client, ClientError, MessageStatus};
use natter_proto::noise::StaticKeypair;
use natter_proto::wire::{ErrorCode, RequestCode, request};
use natter_proto::{IdError, PhoneNumber};
use natter_testkit::{TestClient, TestServer};
use tempfile::TempDir;

/// A fresh home pointed at `server`.
async fn new_client(server: &TestServer) -> (Client, TempDir) {
    let home = tempfile::tempdir().unwrap();
    let client = Client::open(home.path()).await.unwrap();
    client.set_server(&server.addr()).await.unwrap();
    (client, home)
}

fn phone(s: &str) -> PhoneNumber {
    PhoneNumber::parse(s).unwrap()
}

/// A six-digit code that is not `code`.
fn wrong(code: &str) -> String {
    let n: u32 = code.parse().unwrap();
    format!("{:06}", (n + 1) % 1_000_000)
}

/// The server's refusal: code, message, retry_after_ms.
fn refusal<T: std::fmt::Debug>(r: Result<T, ClientError>) -> (ErrorCode, String, u64) {
    match r {
        Err(ClientError::Server {
            code,
            message,
            retry_after_ms,
            ..
        }) => (code, message, retry_after_ms),
        other => panic!("expected a refusal by the server, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_code_is_refused_with_the_attempts_left_and_the_right_one_still_works() {
    let server = TestServer::start().await;
    let (client, _home) = new_client(&server).await;
    let me = phone("+15550002001");
    client.register(&me).await.unwrap();
    let code = server.last_code(me.as_str()).unwrap();

    let (c, msg, _) = refusal(client.verify(&wrong(&code)).await);
    assert_eq!(c, ErrorCode::WrongCode);
    assert!(msg.contains("4 attempts left"), "{msg}");
    assert!(!client.whoami().await.unwrap().unwrap().registered);

    client
        .verify(&code)
        .await
        .expect("the right code still works");
    assert!(client.whoami().await.unwrap().unwrap().registered);
    client.connect().await.expect("the new account logs in");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_wrong_codes_burn_the_code() {
    let server = TestServer::start().await;
    let (client, _home) = new_client(&server).await;
    let me = phone("+15550002002");
    client.register(&me).await.unwrap();
    let code = server.last_code(me.as_str()).unwrap();
    let bad = wrong(&code);

    for left in (1..=4).rev() {
        let (c, msg, _) = refusal(client.verify(&bad).await);
        assert_eq!(c, ErrorCode::WrongCode);
        assert!(msg.contains(&format!("{left} attempts left")), "{msg}");
    }
    let (c, _, _) = refusal(client.verify(&bad).await);
    assert_eq!(
        c,
        ErrorCode::TooManyAttempts,
        "the fifth wrong code burns it"
    );
    let (c, _, _) = refusal(client.verify(&code).await);
    assert_eq!(
        c,
        ErrorCode::NoCodePending,
        "even the right code is refused now"
    );
    assert!(!client.whoami().await.unwrap().unwrap().registered);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_code_is_refused() {
    let ttl = Duration::from_millis(300);
    let server = TestServer::start_with(|cfg| cfg.registration.code_ttl = ttl).await;
    let (client, _home) = new_client(&server).await;
    let me = phone("+15550002003");
    client.register(&me).await.unwrap();
    let code = server.last_code(me.as_str()).unwrap();
    // The code was issued before `register` returned, so it has expired once `ttl` has passed since.
    tokio::time::sleep(ttl + Duration::from_millis(100)).await;

    let (c, msg, _) = refusal(client.verify(&code).await);
    assert_eq!(c, ErrorCode::CodeExpired, "{msg}");
    let (c, _, _) = refusal(client.verify(&code).await);
    assert_eq!(c, ErrorCode::NoCodePending, "an expired code is gone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_code_within_the_cooldown_is_rate_limited() {
    let server = TestServer::start().await;
    let (client, _home) = new_client(&server).await;
    let me = phone("+15550002004");
    let sent = client.register(&me).await.unwrap();
    assert!(sent.resend_after_s > 0);
    let first = server.last_code(me.as_str()).unwrap();

    let (c, msg, retry) = refusal(client.register(&me).await);
    assert_eq!(c, ErrorCode::RateLimited, "{msg}");
    assert!(retry > 0 && retry <= 30_000, "retry_after_ms = {retry}");
    // The pending code is untouched and still works.
    client.verify(&first).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn codes_per_number_are_limited() {
    let server = TestServer::start_with(|cfg| {
        cfg.registration.resend_cooldown = Duration::ZERO;
        cfg.registration.codes_per_number_per_hour = 2;
    })
    .await;
    let (client, _home) = new_client(&server).await;
    let me = phone("+15550002005");
    client.register(&me).await.unwrap();
    client.register(&me).await.unwrap();
    let (c, msg, retry) = refusal(client.register(&me).await);
    assert_eq!(c, ErrorCode::RateLimited);
    assert!(msg.contains("this number"), "{msg}");
    assert!(retry > 0, "retry_after_ms = {retry}");

    // The limit is the number's: another number from the same address still gets a code.
    let (other, _home2) = new_client(&server).await;
    other.register(&phone("+15550002006")).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn codes_per_address_are_limited() {
    let server = TestServer::start_with(|cfg| cfg.registration.codes_per_ip_per_hour = 3).await;
    let mut homes = Vec::new();
    for n in 1..=3 {
        let (client, home) = new_client(&server).await;
        client
            .register(&phone(&format!("+1555000201{n}")))
            .await
            .unwrap();
        homes.push((client, home));
    }
    let (client, _home) = new_client(&server).await;
    let fourth = phone("+15550002014");
    let (c, msg, retry) = refusal(client.register(&fourth).await);
    assert_eq!(c, ErrorCode::RateLimited);
    assert!(msg.contains("address"), "{msg}");
    assert!(retry > 0, "retry_after_ms = {retry}");
    assert_eq!(server.last_code(fourth.as_str()), None, "no SMS went out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_numbers_are_refused_by_the_client_and_by_the_server() {
    // Client side: parsing refuses what is not an international number.
    for bad in [
        "15550002001",
        "+1",
        "+1 555",
        "+0123456789",
        "+1555abc0001",
        "",
    ] {
        assert!(
            matches!(PhoneNumber::parse(bad), Err(IdError::InvalidPhoneNumber(_))),
            "{bad:?} accepted"
        );
    }

    // Server side: a request that skips the client's check is refused with InvalidNumber.
    let server = TestServer::start().await;
    let noise = StaticKeypair::generate().unwrap();
    let addr = server.addr();
    let (conn, _pushes) = Connection::open(ConnectOptions {
        addr: &addr,
        noise_key: &noise,
        pinned_server_key: None,
        login: None,
    })
    .await
    .unwrap();
    for bad in ["15550002001", "+1", "+0123456789", "+1555abc0001", ""] {
        let r = conn
            .request(request::Body::RequestCode(RequestCode {
                phone: bad.to_owned(),
            }))
            .await;
        let (c, _, _) = refusal(r);
        assert_eq!(c, ErrorCode::InvalidNumber, "{bad:?}");
    }
    assert!(
        std::fs::read_to_string(server.sms_log())
            .unwrap_or_default()
            .is_empty(),
        "no SMS went out"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sending_to_an_unregistered_number_is_refused() {
    let server = TestServer::start().await;
    let alice = TestClient::online(&server, "+15550002021").await;
    let nobody = phone("+15550002099");
    let (c, msg, _) = refusal(alice.client.send_text(&nobody, "hello?").await);
    assert_eq!(c, ErrorCode::UnknownAccount);
    assert!(msg.contains("+15550002099"), "{msg}");
    // The message is marked failed, not left pending.
    let hist = alice.client.history(&nobody).await.unwrap();
    assert_eq!(hist.len(), 1);
    assert_eq!(hist[0].status, MessageStatus::Failed);
    assert!(
        alice
            .client
            .wait_outbox_empty(Duration::from_secs(5))
            .await
            .unwrap()
    );
}
