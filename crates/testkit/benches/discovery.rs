//! Measurement of contact discovery against a real natterd on a loopback port (not a test: nothing here
//! asserts a timing). Run with `cargo bench -p natter-testkit --bench discovery`.
//!
//! A 100,000-entry address book (CSV, 50 registered numbers among them) imported through
//! `Client::import_contacts`: parse and normalise, then 100 discovery requests of 1,000 numbers each
//! over the Noise connection, each answered from the SQLite store in one statement. Reports the whole
//! import and the lookup part in numbers per second, and a re-import (nothing changed: nothing sent).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fmt::Write as _;
use std::time::Instant;

use natter_testkit::{TestClient, TestServer};

const BOOK: usize = 100_000;
const USERS: u32 = 50;

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run());
}

async fn run() {
    let server = TestServer::start_with(|cfg| {
        cfg.discovery_account_quota = 10_000_000;
        cfg.discovery_ip_quota = 10_000_000;
        cfg.registration.codes_per_ip_per_hour = 1_000;
        cfg.registration.verifies_per_ip_per_hour = 1_000;
    })
    .await;
    let alice = TestClient::online(&server, "+15550700000").await;
    let mut users = Vec::new();
    for i in 1..=USERS {
        let n = format!("+1555070{i:04}");
        TestClient::register(&server, &n).await;
        users.push(n);
    }
    let mut text = String::from("name,phone\n");
    for i in 0..BOOK {
        if i % (BOOK / USERS as usize) == 0 && (i / (BOOK / USERS as usize)) < users.len() {
            writeln!(text, "User {i},{}", users[i / (BOOK / USERS as usize)]).unwrap();
        } else {
            writeln!(
                text,
                "Person {i},(202) 5{:02}-{:04}",
                i / 10_000,
                i % 10_000
            )
            .unwrap();
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("book.csv");
    std::fs::write(&path, &text).unwrap();

    let first_lookup = std::sync::Mutex::new(None::<Instant>);
    let start = Instant::now();
    let report = alice
        .client
        .import_contacts(&path, Some("US"), &|done, _| {
            if done == 0 {
                *first_lookup.lock().unwrap() = Some(Instant::now());
            }
        })
        .await
        .unwrap();
    let total = start.elapsed();
    let lookups = first_lookup.lock().unwrap().unwrap().elapsed();
    assert_eq!(report.registered.len(), USERS as usize);
    let start = Instant::now();
    let again = alice
        .client
        .import_contacts(&path, Some("US"), &|_, _| {})
        .await
        .unwrap();
    let reimport = start.elapsed();
    assert_eq!(again.looked_up, 0);
    println!(
        "discovery of a {BOOK}-entry address book ({} valid numbers, {} users):",
        report.numbers,
        report.registered.len()
    );
    println!(
        "  import: {:.2} s ({:.0} numbers/s), of which lookups {:.2} s ({:.0} numbers/s, {} requests)",
        total.as_secs_f64(),
        report.numbers as f64 / total.as_secs_f64(),
        lookups.as_secs_f64(),
        report.looked_up as f64 / lookups.as_secs_f64(),
        report.looked_up.div_ceil(1_000)
    );
    println!(
        "  re-import with nothing changed: {:.2} s, 0 numbers sent",
        reimport.as_secs_f64()
    );
}
