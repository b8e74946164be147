//! Scenario `idle`: open N connections that complete the Noise handshake and the hello and then sit idle
//! (answering pings and sending a keep-alive ping every 30 s, as a client does), and measure how natterd's
//! resident memory grows per connection.
//!
//! natterd serves one connection per device, and each account has one device here, so by default every
//! connection is a distinct registered account logged in with `ClientHello { login }`. With `--anonymous`
//! the connections send a hello without login instead (no registration needed: the pre-login state).
//!
//! natterd's `VmRSS` is sampled before, at every tenth of the connections, after they are all open (and a
//! settling pause), and again after `--hold` seconds, by when each connection has sent one keep-alive ping
//! (if settle + hold > 30 s): the per-connection figures are (sample - before) / connections, and a
//! least-squares fit over the samples taken while connecting. For a baseline free of registration
//! garbage, register with `register --save FILE`, restart natterd, then run `idle --accounts-file FILE`.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Result, anyhow, bail};
use natter_proto::limits::KEEPALIVE_INTERVAL;
use natter_proto::noise::StaticKeypair;
use natter_proto::wire::{Frame, Ping, frame, push};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::adapter::{self, Credentials, Link, Numbers, SmsLog};
use crate::report::Summary;
use crate::stats::{Proc, slope};

/// Files the bench may hold open besides the idle connections.
const FD_HEADROOM: usize = 500;
/// The per-process limit of open files on this machine, when /proc/self/limits does not say.
const FD_LIMIT: usize = 20_000;

/// This process's soft limit of open files.
pub(crate) fn fd_limit() -> usize {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|l| {
            l.lines()
                .find(|line| line.starts_with("Max open files"))
                .and_then(|line| line.split_whitespace().nth(3)?.parse().ok())
        })
        .unwrap_or(FD_LIMIT)
}

/// Options of the `idle` scenario.
#[derive(Debug, Clone)]
pub struct IdleOptions {
    /// Connections to hold.
    pub connections: usize,
    /// Hold anonymous connections (hello without login) instead of logged-in devices.
    pub anonymous: bool,
    /// Devices registered earlier (`register --save`), so that natterd can be restarted between
    /// registration and measurement; `None` registers them in this run.
    pub accounts: Option<Vec<Credentials>>,
    /// Registrations run at once.
    pub register_concurrency: usize,
    /// Connections opened at once.
    pub connect_concurrency: usize,
    /// One-time keys each device uploads at registration.
    pub one_time_keys: usize,
    /// Pause before each memory sample that counts.
    pub settle: Duration,
    /// How long to keep the connections idle after the "after" sample, sampling again at its end.
    pub hold: Duration,
    /// Limit for the whole scenario.
    pub timeout: Duration,
    /// natterd.
    pub server: Proc,
}

/// Holds one connection idle until told to stop; then checks it is still alive with a ping. Returns
/// whether it was, and how many keep-alive pings it sent meanwhile.
pub(crate) async fn hold(link: Link, stop: watch::Receiver<bool>) -> (bool, u64) {
    let mut pings = 0;
    let alive = hold_inner(link, stop, &mut pings).await;
    (alive, pings)
}

async fn hold_inner(mut link: Link, mut stop: watch::Receiver<bool>, pings: &mut u64) -> bool {
    let mut keepalive = tokio::time::interval(KEEPALIVE_INTERVAL);
    keepalive.tick().await;
    let mut nonce = 0u64;
    // Bounded by the stop signal, which the scenario sends before its deadline.
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            f = link.recv() => {
                let Ok(f) = f else { return false };
                let reply = match f.body {
                    Some(frame::Body::Ping(p)) => vec![Frame::new(frame::Body::Pong(Ping { nonce: p.nonce }))],
                    Some(frame::Body::Push(p)) => match p.body {
                        Some(push::Body::Envelope(e)) => Link::ack_frames(&[e.id]),
                        Some(push::Body::DeviceRemoved(_)) => return false,
                        _ => Vec::new(),
                    },
                    _ => Vec::new(),
                };
                if link.send(&reply).await.is_err() {
                    return false;
                }
            }
            _ = keepalive.tick() => {
                nonce += 1;
                *pings += 1;
                if link.send(&[Frame::new(frame::Body::Ping(Ping { nonce }))]).await.is_err() {
                    return false;
                }
            }
        }
    }
    let probe = u64::MAX;
    if link
        .send(&[Frame::new(frame::Body::Ping(Ping { nonce: probe }))])
        .await
        .is_err()
    {
        return false;
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    for _ in 0..1000 {
        match tokio::time::timeout_at(deadline, link.recv()).await {
            Ok(Ok(f)) => {
                if let Some(frame::Body::Pong(p)) = f.body
                    && p.nonce == probe
                {
                    return true;
                }
            }
            _ => return false,
        }
    }
    false
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Runs the scenario and returns its summary.
pub async fn run(addr: &str, sms: Arc<SmsLog>, o: IdleOptions) -> Result<Summary> {
    let n = o.connections;
    if n == 0 {
        bail!("--connections must be at least 1");
    }
    let limit = fd_limit();
    if n + FD_HEADROOM > limit {
        bail!(
            "{n} connections: this process may hold at most {limit} open files, so at most {}",
            limit.saturating_sub(FD_HEADROOM)
        );
    }
    let started = Instant::now();
    let deadline = started + o.timeout;
    let server = &o.server;
    let me = Proc::this();

    let (devices, register_s, baseline) = if o.anonymous {
        (Vec::new(), 0.0, "fresh")
    } else if let Some(accounts) = o.accounts.clone() {
        if accounts.len() < n {
            bail!(
                "--accounts-file holds {} devices, fewer than --connections {n}",
                accounts.len()
            );
        }
        (accounts, 0.0, "preregistered")
    } else {
        let t = Instant::now();
        let d = tokio::time::timeout_at(
            deadline,
            adapter::register_many(
                addr,
                sms,
                Numbers::new()?,
                0,
                n,
                o.register_concurrency,
                o.one_time_keys,
            ),
        )
        .await
        .map_err(|_| anyhow!("registration did not finish within --timeout"))??;
        let secs = t.elapsed().as_secs_f64();
        tracing::info!(accounts = n, secs, "registered");
        let creds = d.iter().map(Credentials::from).collect();
        (creds, secs, "after-registration-in-same-process")
    };
    let devices: Vec<Arc<Credentials>> = devices.into_iter().map(Arc::new).collect();

    tokio::time::sleep(o.settle).await;
    let rss0 = server.rss_bytes()?;
    let fds0 = server.open_fds()?;
    let cpu0 = server.cpu_seconds()?;
    tracing::info!(rss_mib = mib(rss0), fds = fds0, "before");

    let (stop_tx, stop_rx) = watch::channel(false);
    let mut holders = JoinSet::new();
    let mut connecting = JoinSet::new();
    let mut next = 0usize;
    let mut opened = 0usize;
    let mut failed = 0usize;
    let mut last_error = None;
    let mut points = vec![(0.0, rss0 as f64)];
    let step = (n / 10).max(1);
    let connect_started = Instant::now();
    while opened + failed < n {
        if Instant::now() >= deadline {
            bail!("opening connections did not finish within --timeout");
        }
        while next < n && connecting.len() < o.connect_concurrency.max(1) {
            let i = next;
            next += 1;
            let addr = addr.to_owned();
            let dev = devices.get(i).cloned();
            connecting.spawn(async move {
                match dev {
                    Some(d) => d.login(&addr).await,
                    None => Link::connect(&addr, &StaticKeypair::generate()?, None).await,
                }
            });
        }
        let Some(joined) = connecting.join_next().await else {
            break;
        };
        match joined? {
            Ok(link) => {
                opened += 1;
                holders.spawn(hold(link, stop_rx.clone()));
                if opened.is_multiple_of(step) {
                    points.push((opened as f64, server.rss_bytes()? as f64));
                    tracing::info!(opened, rss_mib = mib(server.rss_bytes()?), "connecting");
                }
            }
            Err(e) => {
                failed += 1;
                last_error = Some(format!("{e:#}"));
            }
        }
    }
    let connect_s = connect_started.elapsed().as_secs_f64();
    tokio::time::sleep(o.settle).await;
    let rss1 = server.rss_bytes()?;
    let fds1 = server.open_fds()?;
    let cpu1 = server.cpu_seconds()?;
    points.push((opened as f64, rss1 as f64));
    tracing::info!(rss_mib = mib(rss1), fds = fds1, "after");
    tokio::time::sleep(
        o.hold
            .min(deadline.saturating_duration_since(Instant::now())),
    )
    .await;
    let rss2 = server.rss_bytes()?;
    let bench_rss = me.rss_bytes()?;

    let _ = stop_tx.send(true);
    let mut alive = 0usize;
    let mut pings = 0u64;
    while let Some(joined) = holders.join_next().await {
        let (ok, p) = joined?;
        alive += usize::from(ok);
        pings += p;
    }
    tokio::time::sleep(o.settle).await;
    let rss3 = server.rss_bytes()?;

    let per_conn = |rss: u64| {
        if opened > 0 {
            (rss as f64 - rss0 as f64) / opened as f64
        } else {
            0.0
        }
    };
    let mut s = Summary::new("idle");
    s.text(
        "connection",
        if o.anonymous {
            "anonymous-hello"
        } else {
            "logged-in-device"
        },
    );
    s.int("connections", n as u64);
    s.int("opened", opened as u64);
    s.int("failed", failed as u64);
    s.int("alive_at_end", alive as u64);
    s.text("baseline", baseline);
    if register_s > 0.0 {
        s.float("register_s", register_s, 1);
        s.float("registrations_per_s", n as f64 / register_s.max(1e-9), 0);
    }
    s.float("connect_s", connect_s, 1);
    s.float("connects_per_s", opened as f64 / connect_s.max(1e-9), 0);
    s.float("server_rss_before_mib", mib(rss0), 1);
    s.float("server_rss_after_mib", mib(rss1), 1);
    s.float("server_rss_after_hold_mib", mib(rss2), 1);
    s.float("server_rss_after_close_mib", mib(rss3), 1);
    s.float("rss_per_conn_bytes", per_conn(rss1), 0);
    if let Some(fit) = slope(&points) {
        s.float("rss_per_conn_fit_bytes", fit, 0);
    }
    // A client pings every 30 s: once every connection has sent one, this is the steady state.
    s.int("keepalive_pings", pings);
    s.float("rss_per_conn_after_hold_bytes", per_conn(rss2), 0);
    s.int("server_fds_before", fds0 as u64);
    s.int("server_fds_after", fds1 as u64);
    s.float("server_cpu_connect_s", cpu1 - cpu0, 2);
    s.float("bench_rss_mib", mib(bench_rss), 1);
    s.float("settle_s", o.settle.as_secs_f64(), 1);
    s.float("hold_s", o.hold.as_secs_f64(), 1);
    if let Some(e) = last_error {
        s.text("last_error", &e);
    }
    Ok(s)
}
