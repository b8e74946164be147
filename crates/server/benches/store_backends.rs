//! Enqueue throughput of the store backends: SQLite (the embedded default) and PostgreSQL (clusters),
//! one message at a time and with many in flight, to one device and to five. For PostgreSQL it also
//! runs the naive write path (one INSERT per envelope inside a transaction, several round trips) next to
//! the batched one `PgStore::enqueue` uses (one `natter_enqueue` call: one round trip, one transaction).
//!
//! `cargo bench -p natter-server --bench store_backends`; `BENCH_MESSAGES` (default 2000) and
//! `BENCH_CONCURRENCY` (default 64) adjust it; PostgreSQL from `NATTER_TEST_POSTGRES` (a fresh schema,
//! dropped at the end), skipped when unreachable.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::sync::Arc;
use std::time::Instant;

use futures::StreamExt;
use natter_proto::{DeviceId, MessageId, PhoneNumber};
use natter_server::store::postgres::PgStore;
use natter_server::store::postgres::testing::TestSchema;
use natter_server::store::sqlite::SqliteStore;
use natter_server::store::{
    AccountRecord, DeviceListUpdate, DeviceRecord, NewAccount, NewEnvelope, NewMessage, Store,
};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn phone(n: u32) -> PhoneNumber {
    PhoneNumber::from_e164(&format!("+1555010{n:04}")).unwrap()
}

fn device(phone: &PhoneNumber, id: u32) -> DeviceRecord {
    DeviceRecord {
        phone: phone.clone(),
        device_id: DeviceId::new(id).unwrap(),
        noise_key: [id as u8; 32],
        identity_ed: [id as u8; 32],
        last_seen_ms: 1,
    }
}

/// Recipients the "spread" runs cycle through.
const RECIPIENTS: u32 = 64;

/// A sender and [`RECIPIENTS`] recipients with five devices each.
async fn setup(s: &dyn Store) -> (PhoneNumber, Vec<PhoneNumber>) {
    let a = phone(1);
    let recipients: Vec<PhoneNumber> = (0..RECIPIENTS).map(|i| phone(100 + i)).collect();
    for p in std::iter::once(&a).chain(&recipients) {
        s.create_account(&NewAccount {
            account: AccountRecord {
                phone: p.clone(),
                account_key: [1; 32],
                device_list: vec![1],
                device_list_version: 1,
                created_at_ms: 1,
            },
            primary: device(p, 1),
        })
        .await
        .unwrap();
    }
    for b in &recipients {
        s.update_devices(
            b,
            &DeviceListUpdate {
                device_list: vec![2],
                version: 2,
                added: (2..=5).map(|i| device(b, i)).collect(),
                removed: vec![],
            },
        )
        .await
        .unwrap();
    }
    (a, recipients)
}

fn message(a: &PhoneNumber, b: &PhoneNumber, n: u64, devices: u32) -> NewMessage {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&n.to_be_bytes());
    NewMessage {
        sender: a.clone(),
        sender_device: DeviceId::PRIMARY,
        message_id: MessageId::from_bytes(id),
        server_ts_ms: 1_000,
        expires_at_ms: 1_000_000,
        envelopes: (1..=devices)
            .map(|d| NewEnvelope {
                phone: b.clone(),
                device_id: DeviceId::new(d).unwrap(),
                olm_type: 1,
                ciphertext: vec![7; 200],
            })
            .collect(),
        retry: None,
    }
}

/// Runs `messages` enqueues with `in_flight` at a time and prints one line.
async fn run(
    name: &str,
    to: &str,
    messages: usize,
    in_flight: usize,
    devices: u32,
    base: &mut u64,
    send: impl Fn(u64) -> futures::future::BoxFuture<'static, ()>,
) {
    let start_id = *base;
    *base += messages as u64;
    let started = Instant::now();
    futures::stream::iter(0..messages as u64)
        .map(|i| send(start_id + i))
        .buffer_unordered(in_flight)
        .collect::<Vec<()>>()
        .await;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "store={name} in_flight={in_flight} to={to} devices={devices} messages={messages} secs={secs:.2} \
         msgs_per_s={:.0} envelopes_per_s={:.0}",
        messages as f64 / secs,
        (messages as f64 * f64::from(devices)) / secs
    );
}

/// Sequential, then `concurrency` in flight to one recipient ("hot": its device rows serialize the
/// commits) and spread over [`RECIPIENTS`] recipients; one device and five.
async fn bench_store(name: &str, s: Arc<dyn Store>, messages: usize, concurrency: usize) {
    let (a, recipients) = setup(&*s).await;
    let recipients = Arc::new(recipients);
    let mut base = 0;
    for devices in [1, 5] {
        for (in_flight, to) in [(1, "one"), (concurrency, "one"), (concurrency, "spread")] {
            let (s, a, rs) = (s.clone(), a.clone(), recipients.clone());
            run(
                name,
                to,
                messages,
                in_flight,
                devices,
                &mut base,
                move |n| {
                    let b = if to == "one" {
                        &rs[0]
                    } else {
                        &rs[n as usize % rs.len()]
                    };
                    let (s, msg) = (s.clone(), message(&a, b, n, devices));
                    Box::pin(async move {
                        s.enqueue(msg).await.unwrap();
                    })
                },
            )
            .await;
        }
    }
}

/// The same write without batching: BEGIN, the idempotency row, the recipient device locks, one
/// INSERT per envelope, COMMIT (nine round trips for five devices instead of one).
async fn bench_pg_unbatched(pg: &PgStore, messages: usize, concurrency: usize) {
    let pool = pg.pool().clone();
    let mut base = 1 << 40;
    for (in_flight, to) in [(1, "one"), (concurrency, "spread")] {
        let pool = pool.clone();
        run(
            "postgres-unbatched",
            to,
            messages,
            in_flight,
            5,
            &mut base,
            move |n| {
                let pool = pool.clone();
                let to = phone(100 + (n % u64::from(RECIPIENTS)) as u32);
                Box::pin(async move {
                    let mut tx = pool.begin().await.unwrap();
                    let id = n.to_be_bytes().to_vec();
                    sqlx::query(
                        "INSERT INTO message_ids (sender, sender_device, message_id, server_ts_ms, \
                     expires_at_ms) VALUES ('+15550100001', 1, $1, 1000, 1000000)",
                    )
                    .bind(&id)
                    .execute(&mut *tx)
                    .await
                    .unwrap();
                    sqlx::query(
                        "SELECT 1 FROM devices WHERE phone = $1 AND device_id BETWEEN 1 AND 5 \
                     ORDER BY device_id FOR NO KEY UPDATE",
                    )
                    .bind(to.as_str())
                    .execute(&mut *tx)
                    .await
                    .unwrap();
                    for d in 1..=5i64 {
                        sqlx::query(
                        "INSERT INTO queue (phone, device_id, sender, sender_device, message_id, \
                         server_ts_ms, olm_type, ciphertext, expires_at_ms) VALUES \
                         ($1, $2, '+15550100001', 1, $3, 1000, 1, $4, 1000000)",
                    )
                    .bind(to.as_str())
                    .bind(d)
                    .bind(&id)
                    .bind(vec![7u8; 200])
                    .execute(&mut *tx)
                    .await
                    .unwrap();
                    }
                    tx.commit().await.unwrap();
                })
            },
        )
        .await;
    }
}

#[tokio::main]
async fn main() {
    // `cargo bench` passes `--bench`; nothing else is taken from the command line.
    let messages = env_usize("BENCH_MESSAGES", 2_000);
    let concurrency = env_usize("BENCH_CONCURRENCY", 64);

    let dir = tempfile::tempdir().unwrap();
    let sqlite = SqliteStore::open(&dir.path().join("natter.db"))
        .await
        .unwrap();
    bench_store("sqlite", Arc::new(sqlite), messages, concurrency).await;

    let Some(schema) = TestSchema::create().await.unwrap() else {
        return;
    };
    let url = format!("{}&pool_size=16", schema.url()).parse().unwrap();
    let pg = PgStore::open(&url).await.unwrap();
    bench_store("postgres", Arc::new(pg.clone()), messages, concurrency).await;
    bench_pg_unbatched(&pg, messages, concurrency).await;
    drop(pg);
}
