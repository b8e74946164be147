//! A minimal XMPP client (RFC 6120/6121: stream, SASL PLAIN, resource binding, initial presence,
//! `<message type='chat'>`) so that the `pairs` shape runs against ejabberd exactly as against natterd:
//! the same pairs, the same 200-byte payloads, the same open-loop schedule and latency measured from the
//! scheduled send time. It is not a general XMPP library: it scans for the few elements it needs.
//!
//! Users `{prefix}{n}@{domain}` with one password must exist (scripts/bench-ejabberd.sh registers them
//! with `ejabberdctl`); pair `i` is user `2i` sending to user `2i + 1`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use base64::Engine;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::report::Summary;
use crate::stats::{self, Proc};

/// Who to log in as.
#[derive(Debug, Clone)]
pub struct XmppAccounts {
    /// The server's domain (the JID's host part).
    pub domain: String,
    /// Username prefix; users are numbered from 0.
    pub prefix: String,
    /// The password every user has.
    pub password: String,
}

/// An authenticated, bound XMPP stream.
struct XmppConn {
    stream: TcpStream,
    buf: Vec<u8>,
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

impl XmppConn {
    async fn read_until(&mut self, marker: &[u8], fail: &[u8]) -> Result<()> {
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(p) = find(&self.buf, marker) {
                self.buf.drain(..p + marker.len());
                return Ok(());
            }
            if !fail.is_empty() && find(&self.buf, fail).is_some() {
                bail!(
                    "server refused: {}",
                    String::from_utf8_lossy(&self.buf)
                        .chars()
                        .take(300)
                        .collect::<String>()
                );
            }
            let n = self.stream.read(&mut chunk).await?;
            if n == 0 {
                bail!("the XMPP server closed the stream");
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    async fn open_stream(&mut self, domain: &str) -> Result<()> {
        let header = format!(
            "<?xml version='1.0'?><stream:stream to='{domain}' xmlns='jabber:client' \
             xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>"
        );
        self.stream.write_all(header.as_bytes()).await?;
        self.read_until(b"</stream:features>", b"<stream:error")
            .await
    }

    /// Connects and logs in as `user`, binds a resource and sends initial presence.
    async fn login(addr: &str, accounts: &XmppAccounts, user: &str) -> Result<XmppConn> {
        let stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        stream.set_nodelay(true)?;
        let mut c = XmppConn {
            stream,
            buf: Vec::new(),
        };
        c.open_stream(&accounts.domain).await?;
        let creds = base64::engine::general_purpose::STANDARD
            .encode(format!("\0{user}\0{}", accounts.password));
        let auth = format!(
            "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{creds}</auth>"
        );
        c.stream.write_all(auth.as_bytes()).await?;
        c.read_until(b"<success", b"<failure").await?;
        c.open_stream(&accounts.domain).await?;
        c.stream
            .write_all(
                b"<iq type='set' id='bind1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>\
                  <resource>bench</resource></bind></iq>",
            )
            .await?;
        c.read_until(b"</iq>", b"type='error'").await?;
        c.stream.write_all(b"<presence/>").await?;
        Ok(c)
    }
}

/// Options of the XMPP `pairs` run.
#[derive(Debug, Clone)]
pub struct XmppPairsOptions {
    /// Sender/receiver pairs.
    pub pairs: usize,
    /// Messages each sender sends.
    pub messages: u32,
    /// Offered load over all pairs, messages per second (open loop).
    pub rate: f64,
    /// Bytes of message body.
    pub text_bytes: usize,
    /// Logins at once.
    pub concurrency: usize,
    /// Upper limit on the measured phase.
    pub timeout: Duration,
    /// The server process, for its CPU time.
    pub server: Option<Proc>,
}

/// N pairs over XMPP, open loop at `rate`: delivered messages per second, latency from the scheduled
/// send time, server CPU per message.
pub async fn pairs(addr: &str, accounts: XmppAccounts, o: XmppPairsOptions) -> Result<Summary> {
    if o.pairs == 0 || o.messages == 0 {
        bail!("--pairs and --messages must be at least 1");
    }
    let accounts = Arc::new(accounts);
    // Log everyone in, `concurrency` at once.
    let sem = Arc::new(tokio::sync::Semaphore::new(o.concurrency.max(1)));
    let mut logins = tokio::task::JoinSet::new();
    for n in 0..2 * o.pairs {
        let (sem, accounts, addr) = (sem.clone(), accounts.clone(), addr.to_owned());
        logins.spawn(async move {
            let _p = sem.acquire_owned().await?;
            let user = format!("{}{n}", accounts.prefix);
            let c = XmppConn::login(&addr, &accounts, &user)
                .await
                .with_context(|| format!("logging in as {user}"))?;
            Ok::<_, anyhow::Error>((n, c))
        });
    }
    let mut conns: Vec<Option<XmppConn>> = (0..2 * o.pairs).map(|_| None).collect();
    while let Some(r) = logins.join_next().await {
        let (n, c) = r??;
        conns[n] = Some(c);
    }
    tracing::info!(users = 2 * o.pairs, "logged in");
    // Let presence settle before the clock starts.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let total = o.pairs as u64 * u64::from(o.messages);
    let delivered = Arc::new(AtomicU64::new(0));
    let epoch = Instant::now() + Duration::from_millis(200);
    let interval = Duration::from_secs_f64(o.pairs as f64 / o.rate);
    let cpu_before = o.server.as_ref().map(Proc::cpu_seconds).transpose()?;
    let bench_before = Proc::this().cpu_seconds()?;
    let mut receivers = tokio::task::JoinSet::new();
    let mut senders = tokio::task::JoinSet::new();
    let mut conns = conns.into_iter();
    for i in 0..o.pairs {
        let (Some(Some(mut tx)), Some(Some(mut rx))) = (conns.next(), conns.next()) else {
            bail!("a connection is missing");
        };
        let to = format!("{}{}@{}", accounts.prefix, 2 * i + 1, accounts.domain);
        let messages = o.messages;
        let text_bytes = o.text_bytes;
        // Pairs start spread over one interval, so the offered load is even.
        let offset = interval.mul_f64(i as f64 / o.pairs as f64);
        senders.spawn(async move {
            let mut out = Vec::with_capacity(512);
            for k in 0..messages {
                let at = epoch + offset + interval * k;
                tokio::time::sleep_until(at).await;
                let stamp = at.duration_since(epoch).as_nanos();
                let mut body = format!("t{stamp};");
                while body.len() < text_bytes {
                    body.push('x');
                }
                out.clear();
                out.extend_from_slice(
                    format!(
                        "<message type='chat' to='{to}' id='m{k}'><body>{body}</body></message>"
                    )
                    .as_bytes(),
                );
                tx.stream.write_all(&out).await?;
            }
            Ok::<_, anyhow::Error>(tx)
        });
        let delivered = delivered.clone();
        receivers.spawn(async move {
            let mut lat = Vec::with_capacity(messages as usize);
            let mut chunk = vec![0u8; 64 * 1024];
            while lat.len() < messages as usize {
                let n = rx.stream.read(&mut chunk).await?;
                if n == 0 {
                    bail!("the XMPP server closed a receiver's stream");
                }
                let now = Instant::now();
                rx.buf.extend_from_slice(&chunk[..n]);
                let mut consumed = 0;
                while let Some(start) = find(&rx.buf[consumed..], b"<body>t") {
                    let from = consumed + start + b"<body>t".len();
                    let Some(semi) = find(&rx.buf[from..], b";") else {
                        break;
                    };
                    let stamp: u64 = std::str::from_utf8(&rx.buf[from..from + semi])
                        .ok()
                        .and_then(|s| s.parse().ok())
                        .context("a body without a send time")?;
                    let sent = epoch + Duration::from_nanos(stamp);
                    lat.push(now.saturating_duration_since(sent).as_micros() as u64);
                    delivered.fetch_add(1, Ordering::Relaxed);
                    consumed = from + semi;
                }
                // Keep a possibly partial tail only.
                let keep_from = if consumed > 0 {
                    consumed
                } else {
                    rx.buf.len().saturating_sub(64)
                };
                rx.buf.drain(..keep_from);
            }
            Ok::<_, anyhow::Error>((lat, rx))
        });
    }
    let mut lat = Vec::with_capacity(total as usize);
    let collect = async {
        let mut keep = Vec::new();
        while let Some(r) = receivers.join_next().await {
            let (l, c) = r??;
            lat.extend(l);
            keep.push(c);
        }
        while let Some(r) = senders.join_next().await {
            keep.push(r??);
        }
        Ok::<_, anyhow::Error>(keep)
    };
    let _conns = tokio::time::timeout(o.timeout, collect)
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "{} of {total} delivered within --timeout",
                delivered.load(Ordering::Relaxed)
            )
        })??;
    let elapsed = epoch.elapsed().as_secs_f64();
    let cpu = match (cpu_before, o.server.as_ref()) {
        (Some(b), Some(p)) => Some(p.cpu_seconds()? - b),
        _ => None,
    };
    let bench_cpu = Proc::this().cpu_seconds()? - bench_before;
    lat.sort_unstable();
    let ms = |q: f64| stats::quantile(&lat, q) as f64 / 1000.0;
    let mut s = Summary::new("pairs");
    s.text("protocol", "xmpp");
    s.int("pairs", o.pairs as u64);
    s.int("messages", total);
    s.int("body_bytes", o.text_bytes as u64);
    s.float("offered_per_s", o.rate, 0);
    s.int("delivered", lat.len() as u64);
    s.float("msgs_per_s", lat.len() as f64 / elapsed.max(1e-9), 0);
    s.float("p50_ms", ms(0.5), 3);
    s.float("p99_ms", ms(0.99), 3);
    s.float("p999_ms", ms(0.999), 3);
    s.float("max_ms", ms(1.0), 3);
    if let Some(cpu) = cpu {
        s.float("server_cpu_s", cpu, 2);
        s.float("msgs_per_server_cpu_s", lat.len() as f64 / cpu.max(1e-9), 0);
    }
    s.float("bench_cpu_s", bench_cpu, 2);
    Ok(s)
}
