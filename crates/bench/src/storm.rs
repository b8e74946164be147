//! `natter-bench storm`: every connection reconnects at once (as after a server restart or a network
//! blip): N logged-in devices drop their connections together, then all reconnect (Noise XX handshake,
//! hello, login) with up to `--concurrency` attempts in flight. Reports handshakes + logins per second of
//! wall time and the server CPU each one cost.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::task::JoinSet;

use crate::adapter::{self, Credentials, SmsLog};
use crate::report::Summary;
use crate::stats::{self, Proc};

/// What a storm run needs.
#[derive(Debug)]
pub struct StormOptions {
    /// Devices that reconnect.
    pub connections: usize,
    /// Devices registered earlier (`register --save`) instead of registering here.
    pub accounts: Option<Vec<Credentials>>,
    /// Reconnection attempts in flight at once (0: all of them).
    pub concurrency: usize,
    /// Registrations at once during setup.
    pub register_concurrency: usize,
    /// One-time keys each registered device uploads.
    pub one_time_keys: usize,
    /// Upper limit on each phase.
    pub timeout: Duration,
    /// natterd, for CPU time.
    pub server: Option<Proc>,
}

/// Connects every device, `concurrency` at a time; returns the links and each login's latency (µs).
async fn connect_all(
    addr: &str,
    creds: &[Credentials],
    concurrency: usize,
) -> Result<(Vec<adapter::Link>, Vec<u64>)> {
    let mut links = Vec::with_capacity(creds.len());
    let mut latencies = Vec::with_capacity(creds.len());
    let mut set = JoinSet::new();
    let mut next = 0;
    while links.len() < creds.len() {
        while next < creds.len() && set.len() < concurrency {
            let c = creds[next].clone();
            let addr = addr.to_owned();
            next += 1;
            set.spawn(async move {
                let t = Instant::now();
                let link = c.login(&addr).await;
                (link, t.elapsed().as_micros() as u64)
            });
        }
        let Some(joined) = set.join_next().await else {
            break;
        };
        let (link, us) = joined?;
        links.push(link.context("reconnecting")?);
        latencies.push(us);
    }
    Ok((links, latencies))
}

/// Runs the storm and returns its summary.
pub async fn run(addr: &str, sms: Arc<SmsLog>, o: StormOptions) -> Result<Summary> {
    if o.connections == 0 {
        bail!("--connections must be at least 1");
    }
    let setup = Instant::now();
    let creds: Vec<Credentials> = match o.accounts {
        Some(a) if a.len() >= o.connections => a.into_iter().take(o.connections).collect(),
        Some(a) => bail!(
            "the accounts file holds {} devices, fewer than --connections {}",
            a.len(),
            o.connections
        ),
        None => adapter::register_many(
            addr,
            sms,
            adapter::Numbers::new()?,
            0,
            o.connections,
            o.register_concurrency,
            o.one_time_keys,
        )
        .await?
        .iter()
        .map(Credentials::from)
        .collect(),
    };
    let concurrency = if o.concurrency == 0 {
        o.connections
    } else {
        o.concurrency
    };
    // Everyone online first, as before a blip.
    let (links, _) = tokio::time::timeout(o.timeout, connect_all(addr, &creds, concurrency))
        .await
        .context("the first connections did not finish within --timeout")??;
    drop(links);
    // Let the server notice the closed sockets and settle.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let setup_s = setup.elapsed().as_secs_f64();

    let cpu_before = o.server.as_ref().map(Proc::cpu_seconds).transpose()?;
    let started = Instant::now();
    let (links, mut latencies) =
        tokio::time::timeout(o.timeout, connect_all(addr, &creds, concurrency))
            .await
            .context("the reconnection storm did not finish within --timeout")??;
    let wall = started.elapsed().as_secs_f64();
    let cpu = match (&o.server, cpu_before) {
        (Some(p), Some(before)) => Some(p.cpu_seconds()? - before),
        _ => None,
    };
    let n = links.len();
    drop(links);
    latencies.sort_unstable();

    let mut s = Summary::new("storm");
    s.int("connections", n as u64);
    s.int("concurrency", concurrency as u64);
    s.float("wall_s", wall, 3);
    s.float("logins_per_s", n as f64 / wall.max(1e-9), 0);
    s.float(
        "p50_login_ms",
        stats::quantile(&latencies, 0.50) as f64 / 1000.0,
        2,
    );
    s.float(
        "p99_login_ms",
        stats::quantile(&latencies, 0.99) as f64 / 1000.0,
        2,
    );
    if let Some(cpu) = cpu {
        s.float("server_cpu_s", cpu, 2);
        s.float("server_cpu_us_per_login", cpu * 1e6 / n.max(1) as f64, 0);
        s.float("logins_per_server_cpu_s", n as f64 / cpu.max(1e-9), 0);
    }
    s.float("setup_s", setup_s, 1);
    Ok(s)
}
