//! `natter-bench mixed`: most connections idle, a tenth active — N logged-in devices of which 90 % sit
//! idle (keep-alives only) while the other 10 % run the `pairs` shape (half send, half receive) at an
//! offered rate. Reports the pairs figures under that background, natterd's memory with everything
//! connected, and whether every idle connection survived.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::adapter::{self, Credentials, Numbers, SmsLog};
use crate::pairs::{self, PairsOptions};
use crate::report::Summary;
use crate::stats::Proc;

/// What a mixed run needs.
#[derive(Debug)]
pub struct MixedOptions {
    /// Connections in all (this machine caps a process at 20,000 open files).
    pub connections: usize,
    /// Share of them that is active (0..1).
    pub active_share: f64,
    /// The active pairs' shape; `pairs` is derived from the share.
    pub pairs: PairsOptions,
    /// Idle devices registered earlier (`register --save`).
    pub accounts: Option<Vec<Credentials>>,
    /// Idle connections opened at once.
    pub connect_concurrency: usize,
}

/// Runs the scenario and returns its summary.
pub async fn run(addr: &str, sms: Arc<SmsLog>, mut o: MixedOptions) -> Result<Summary> {
    if !(o.active_share > 0.0 && o.active_share < 1.0) {
        bail!("--active-share must be between 0 and 1");
    }
    let pairs = ((o.connections as f64 * o.active_share) / 2.0)
        .round()
        .max(1.0) as usize;
    let idle = o.connections.saturating_sub(2 * pairs);
    let creds: Vec<Credentials> = match o.accounts.take() {
        Some(a) if a.len() >= idle => a.into_iter().take(idle).collect(),
        Some(a) => bail!(
            "the accounts file holds {} devices, fewer than the {idle} idle connections",
            a.len()
        ),
        None => adapter::register_many(
            addr,
            sms.clone(),
            // Far from the numbers the pairs register (from index 0).
            Numbers::new()?,
            500_000,
            idle,
            o.pairs.concurrency,
            o.pairs.one_time_keys,
        )
        .await?
        .iter()
        .map(Credentials::from)
        .collect(),
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut held = JoinSet::new();
    let mut opening = JoinSet::new();
    let mut next = 0;
    let mut open = 0;
    while open < creds.len() {
        while next < creds.len() && opening.len() < o.connect_concurrency.max(1) {
            let c = creds[next].clone();
            let addr = addr.to_owned();
            next += 1;
            opening.spawn(async move { c.login(&addr).await });
        }
        let Some(joined) = opening.join_next().await else {
            break;
        };
        let link = joined?.context("opening an idle connection")?;
        held.spawn(crate::idle::hold(link, stop_rx.clone()));
        open += 1;
    }
    tracing::info!(
        idle = open,
        pairs,
        "idle connections held; running the active pairs"
    );
    o.pairs.pairs = pairs;
    let server = o.pairs.server.clone();
    let active = pairs::run(addr, sms, o.pairs).await;
    let rss = server.as_ref().map(Proc::rss_bytes).transpose()?;
    let _ = stop_tx.send(true);
    let mut alive = 0u64;
    while let Some(joined) = tokio::time::timeout(Duration::from_secs(60), held.join_next())
        .await
        .context("idle connections did not answer the closing probe within 60 s")?
    {
        if joined?.0 {
            alive += 1;
        }
    }
    let mut s = Summary::new("mixed");
    s.int("connections", (open + 2 * pairs) as u64);
    s.int("idle", open as u64);
    s.int("idle_alive_at_end", alive);
    if let Some(rss) = rss {
        s.float("server_rss_mib", rss as f64 / (1024.0 * 1024.0), 1);
    }
    s.append(active?);
    Ok(s)
}
