//! Measurement of app-state sync against a real natterd on a loopback port (not a test: nothing here
//! asserts a timing). Run with `cargo bench -p natter-testkit --bench appstate`.
//!
//! Time for one mutation to reach the account's 4 other devices, all online: from the call on the phone
//! (`set_contact_name`: fetch and verify, encrypt, push) to the moment the last of the 4 companions has
//! the change verified and saved in its store (it fetches on the server's `AppStateChanged` push).
//! Median of 20 mutations, after 2 warm-up ones.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use natter_client::appstate::CONTACTS;
use natter_proto::PhoneNumber;
use natter_testkit::{TestClient, TestServer};

const ROUNDS: usize = 20;
const WARMUP: usize = 2;
const WAIT: Duration = Duration::from_secs(30);

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run());
}

async fn run() {
    let server = TestServer::start().await;
    let phone = TestClient::online(&server, "+15550500001").await;
    let mut companions = Vec::new();
    for i in 0..4 {
        let c = TestClient::link_companion(&server, &phone, &format!("companion {i}")).await;
        companions.push(c);
    }
    for c in &companions {
        let deadline = Instant::now() + WAIT;
        while c.client.app_state_key_ids().await.unwrap().is_empty() {
            assert!(Instant::now() < deadline, "keys did not arrive");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let bob = PhoneNumber::parse("+15550500002").unwrap();
    let mut times = Vec::new();
    for round in 0..ROUNDS + WARMUP {
        let start = Instant::now();
        phone
            .client
            .set_contact_name(&bob, &format!("Bob {round}"))
            .await
            .unwrap();
        let version = phone.client.app_state_version(CONTACTS).await.unwrap();
        let pushed = start.elapsed();
        let waits = companions
            .iter()
            .map(|c| c.client.wait_app_state_version(CONTACTS, version, WAIT));
        for ok in futures_join_all(waits).await {
            assert!(ok.unwrap(), "a companion did not get version {version}");
        }
        let all = start.elapsed();
        if round >= WARMUP {
            times.push((all, pushed));
        }
    }
    let mut all: Vec<f64> = times.iter().map(|(a, _)| a.as_secs_f64() * 1e3).collect();
    let mut pushed: Vec<f64> = times.iter().map(|(_, p)| p.as_secs_f64() * 1e3).collect();
    all.sort_by(f64::total_cmp);
    pushed.sort_by(f64::total_cmp);
    let median = |v: &[f64]| (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0;
    println!("app-state mutation to 4 other online devices ({ROUNDS} mutations):");
    println!(
        "  visible in the store of the last device: median {:.1} ms (min {:.1}, max {:.1})",
        median(&all),
        all[0],
        all[all.len() - 1]
    );
    println!(
        "  of which the call on the phone (fetch+verify, push): median {:.1} ms",
        median(&pushed)
    );
}

/// Runs the futures concurrently and returns their outputs in order.
async fn futures_join_all<F: std::future::Future>(futs: impl Iterator<Item = F>) -> Vec<F::Output> {
    let handles: Vec<_> = futs.map(Box::pin).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await);
    }
    out
}
