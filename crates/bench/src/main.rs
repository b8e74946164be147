//! natter-bench: the load generator for natterd.
//!
//! It speaks the real protocol through natter-proto and natter-crypto (Noise `XX` handshake, hello,
//! registration with an SMS code and a signed device list, prekeys, Olm sessions), without natter-client
//! and its per-device SQLite store, so that what it measures is the server.
//!
//! Scenarios:
//! - `pairs`: messages per second through one natterd between N online pairs, and one-way delivery
//!   latency (p50/p99/p99.9/max), closed loop or at an offered rate (`--rate`).
//! - `idle`: natterd's resident memory per idle connection, at N connections.
//! - `register`: registrations per second; saves the devices' login keys for `idle --accounts-file`.
//! - `offline`, `mixed`, `storm`: backlogs drained at once, idle connections under load, reconnection
//!   storms (see their modules).
//! - `group`: one group of up to 1,024 members, each logged in on its own connection; one member sends N
//!   group messages (pre-encrypted Megolm), closed loop or at `--rate`: fan-out completion latency (send
//!   until the last member has the push, and until the first), envelopes per second and per natterd
//!   CPU-second, the sender's response time.
//! - `ceilings`: this machine's limits with no natterd at all: 200-byte loopback TCP writes per second,
//!   loopback one-way latency (RTT/2 of a ping-pong), kernel memory per idle TCP socket, CPU of a Noise
//!   `XX` handshake (responder alone and both sides).
//!
//! Every run ends with one summary line on standard output (`key=value …`, or JSON with `--json`);
//! progress goes to standard error. Only loopback servers are accepted. See BENCHMARKS.md.

mod adapter;
mod ceilings;
mod group;
mod idle;
mod mixed;
mod offline;
mod pairs;
mod plot;
mod report;
mod stats;
mod storm;
mod xmpp;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use natter_proto::limits::ONE_TIME_KEYS_TARGET;

use crate::adapter::SmsLog;
use crate::stats::Proc;

/// Load generator for natterd.
#[derive(Parser, Debug)]
#[command(name = "natter-bench", version, about = "Load generator for natterd")]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
    #[command(flatten)]
    common: Common,
}

/// Options every scenario takes.
#[derive(Args, Debug)]
struct Common {
    /// natterd's address (loopback only). `pairs` takes the nodes of a cluster too (A,B,...): accounts
    /// register through the first, and each pair's two devices connect to different nodes.
    #[arg(long, global = true, default_value = "127.0.0.1:5222")]
    server: String,
    /// The file natterd's SMS gateway writes codes to (natterd --sms-gateway file:PATH).
    #[arg(long, global = true, default_value = "sms.log")]
    sms_log: PathBuf,
    /// natterd's process id, to read its CPU time and memory from /proc.
    #[arg(long, global = true)]
    server_pid: Option<u32>,
    /// Print the summary as one JSON object instead of key=value pairs.
    #[arg(long, global = true)]
    json: bool,
    /// Upper limit on the measured phase, in seconds.
    #[arg(long, global = true, default_value_t = 300)]
    timeout: u64,
    /// Registrations run at once during setup.
    #[arg(long, global = true, default_value_t = 64)]
    register_concurrency: usize,
    /// One-time keys each registered device uploads (a client keeps 50 uploaded).
    #[arg(long, global = true, default_value_t = ONE_TIME_KEYS_TARGET)]
    one_time_keys: usize,
    /// Tokio worker threads (default: the CPUs this process may run on).
    #[arg(long, global = true)]
    threads: Option<usize>,
    /// Which server protocol to speak: natter (natterd) or xmpp (e.g. ejabberd; `pairs` only).
    #[arg(long, global = true, default_value = "natter")]
    protocol: Protocol,
    /// XMPP: the server's domain.
    #[arg(long, global = true, default_value = "localhost")]
    xmpp_domain: String,
    /// XMPP: users are PREFIX0, PREFIX1, … (registered beforehand).
    #[arg(long, global = true, default_value = "bench")]
    xmpp_user_prefix: String,
    /// XMPP: every user's password.
    #[arg(long, global = true, default_value = "bench")]
    xmpp_password: String,
}

/// The protocol adapter.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Protocol {
    /// natterd's own protocol (Noise, login, Olm).
    Natter,
    /// Minimal XMPP: SASL PLAIN, bind, presence, chat messages.
    Xmpp,
}

#[derive(Subcommand, Debug)]
enum Scenario {
    /// Messages per second and delivery latency between online pairs.
    Pairs {
        /// Sender/receiver pairs, each a registered account logged in on its own connection.
        #[arg(long, default_value_t = 100)]
        pairs: usize,
        /// Messages each sender sends.
        #[arg(long, default_value_t = 1000)]
        messages: u32,
        /// Offered load in messages per second over all pairs (open loop; latency from the scheduled
        /// send time). Without it: closed loop, each sender keeps --window requests in flight.
        #[arg(long)]
        rate: Option<f64>,
        /// Unanswered SendMessage requests per sender connection (natterd allows 64).
        #[arg(long, default_value_t = 32)]
        window: usize,
        /// Encrypt a pool of ciphertexts per pair up front and replay it (loads the server alone);
        /// receivers then only acknowledge. Default: encrypt every message, receivers decrypt all.
        #[arg(long)]
        pre_encrypted: bool,
        /// Ciphertexts per pair in the pre-encrypted pool.
        #[arg(long, default_value_t = 64)]
        pool: usize,
        /// Bytes of text per message (the encoded Content is about 30 bytes more).
        #[arg(long, default_value_t = 170)]
        text_bytes: usize,
    },
    /// Register accounts (RequestCode, VerifyCode, UploadKeys) and measure how fast; optionally save
    /// their login keys for `idle --accounts-file`.
    Register {
        /// Accounts to register.
        #[arg(long, default_value_t = 10_000)]
        accounts: usize,
        /// Where to write `<number> <Noise private key>` lines (mode 0600).
        #[arg(long)]
        save: Option<PathBuf>,
    },
    /// natterd's resident memory per idle connection.
    Idle {
        /// Connections to hold open (each a registered device, one connection per device).
        #[arg(long, default_value_t = 10_000)]
        connections: usize,
        /// Hold anonymous connections (handshake and hello without login) instead.
        #[arg(long, conflicts_with = "accounts_file")]
        anonymous: bool,
        /// Log in as devices registered earlier with `register --save FILE` (so natterd can be
        /// restarted in between and the baseline holds no registration garbage) instead of
        /// registering them in this run.
        #[arg(long)]
        accounts_file: Option<PathBuf>,
        /// Connections opened at once.
        #[arg(long, default_value_t = 64)]
        connect_concurrency: usize,
        /// Seconds to wait before each memory sample.
        #[arg(long, default_value_t = 5)]
        settle: u64,
        /// Seconds to keep the connections idle after the "after" sample before sampling again. With
        /// --settle, over 30 s lets every connection send one keep-alive ping, as clients do.
        #[arg(long, default_value_t = 35)]
        hold: u64,
    },
    /// Many connections held idle while a share of them runs `pairs` at an offered rate.
    Mixed {
        /// Connections in all, idle and active.
        #[arg(long, default_value_t = 18_000)]
        connections: usize,
        /// Share of the connections that is active (half send, half receive).
        #[arg(long, default_value_t = 0.1)]
        active_share: f64,
        /// Messages each active sender sends.
        #[arg(long, default_value_t = 100)]
        messages: u32,
        /// Offered load over all active pairs, messages per second.
        #[arg(long, default_value_t = 1000.0)]
        rate: f64,
        /// Replay pre-encrypted ciphertexts (loads the server alone).
        #[arg(long)]
        pre_encrypted: bool,
        /// Idle devices registered earlier with `register --save FILE`.
        #[arg(long)]
        accounts_file: Option<PathBuf>,
        /// Idle connections opened at once.
        #[arg(long, default_value_t = 64)]
        connect_concurrency: usize,
    },
    /// Receivers offline while 10–100 messages each queue for them, then all connect and drain.
    Offline {
        /// Offline receivers (as many senders queue for them).
        #[arg(long, default_value_t = 1_000)]
        receivers: usize,
        /// Fewest messages queued for one receiver.
        #[arg(long, default_value_t = 10)]
        min_queued: u32,
        /// Most messages queued for one receiver.
        #[arg(long, default_value_t = 100)]
        max_queued: u32,
        /// Bytes of text per message.
        #[arg(long, default_value_t = 170)]
        text_bytes: usize,
    },
    /// Every connection reconnects at once: handshakes + logins per second and their server CPU.
    Storm {
        /// Devices that drop and reconnect together (this machine caps a process at 20,000 files).
        #[arg(long, default_value_t = 5_000)]
        connections: usize,
        /// Reconnection attempts in flight at once (0: all).
        #[arg(long, default_value_t = 0)]
        concurrency: usize,
        /// Devices registered earlier with `register --save FILE`.
        #[arg(long)]
        accounts_file: Option<PathBuf>,
    },
    /// Group fan-out: one member sends N messages to a group of up to 1,024 members, each logged in on
    /// its own connection and acknowledging its pushes. Reports per message the time until the last
    /// (and the first) member has it, envelopes per second and per server CPU-second, and the sender's
    /// response time. Messages are real Megolm ciphertexts encrypted up front and replayed
    /// (mode=pre-encrypted: natterd never decrypts group messages, members only acknowledge).
    Group {
        /// Members, the sender included (natterd allows 1,024 per group).
        #[arg(long, default_value_t = 1024)]
        members: usize,
        /// Group messages the sender sends.
        #[arg(long, default_value_t = 200)]
        messages: u32,
        /// Offered group messages per second (open loop, at most 64 unanswered; latency from the
        /// scheduled send time). Without it: closed loop, one request at a time.
        #[arg(long)]
        rate: Option<f64>,
        /// Closed loop: send the next message only once every member has the previous one (the
        /// unloaded fan-out latency).
        #[arg(long, conflicts_with = "rate")]
        await_fanout: bool,
        /// Members named per CreateGroup / UpdateGroup request (the rest are added with further
        /// UpdateGroup requests; natterd takes up to 1,024 per request).
        #[arg(long, default_value_t = natter_proto::limits::MAX_GROUP_MEMBERS)]
        add_batch: usize,
        /// Accepted for symmetry with `pairs`: group messages are always pre-encrypted.
        #[arg(long)]
        pre_encrypted: bool,
        /// Bytes of text per message before Megolm encryption.
        #[arg(long, default_value_t = 170)]
        text_bytes: usize,
        /// Members registered earlier with `register --save FILE` (the first is the sender).
        #[arg(long)]
        accounts_file: Option<PathBuf>,
        /// Logins at once during setup.
        #[arg(long, default_value_t = 64)]
        connect_concurrency: usize,
    },
    /// This machine's ceilings, no natterd involved: 200-byte write(2) calls per second on one loopback
    /// TCP connection (TCP_NODELAY; one writer thread, one reader thread), loopback one-way latency
    /// (RTT/2 of a 200-byte ping-pong), kernel memory per idle connected TCP socket (growth of Slab in
    /// /proc/meminfo plus TCP buffer pages in /proc/net/sockstat, machine-wide), and the CPU time of a
    /// Noise XX handshake (natter-proto, in process; the responder's calls alone and both sides).
    /// Pin it to one CPU with taskset if wanted.
    Ceilings {
        /// Seconds of the write test and of the ping-pong test each.
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        /// Connected loopback pairs held for the socket memory figure (two sockets each; this machine
        /// caps a process at 20,000 open files).
        #[arg(long, default_value_t = 5_000)]
        socket_pairs: usize,
        /// Noise XX handshakes to time.
        #[arg(long, default_value_t = 2_000)]
        handshakes: usize,
    },
    /// Draws latency against offered load from a side-by-side run's runs.txt
    /// (scripts/bench-ejabberd.sh) as a PNG. Loads no server.
    Plot {
        /// The runs: lines `<server> <pairs summary line>`.
        #[arg(long)]
        runs: PathBuf,
        /// The PNG to write.
        #[arg(long)]
        out: PathBuf,
        /// TrueType font for the labels.
        #[arg(long, default_value = plot::DEFAULT_FONT)]
        font: PathBuf,
    },
}

async fn check_loopback(servers: &str) -> Result<()> {
    for server in servers.split(',') {
        check_one_loopback(server.trim()).await?;
    }
    Ok(())
}

async fn check_one_loopback(server: &str) -> Result<()> {
    let addrs: Vec<_> = tokio::net::lookup_host(server)
        .await
        .with_context(|| format!("resolving {server}"))?
        .collect();
    if addrs.is_empty() || !addrs.iter().all(|a| a.ip().is_loopback()) {
        bail!(
            "--server {server}: natter-bench only loads a server on this machine (127.0.0.0/8 or ::1)"
        );
    }
    Ok(())
}

async fn run(cli: Cli) -> Result<()> {
    if let Scenario::Plot { runs, out, font } = &cli.scenario {
        let text =
            std::fs::read_to_string(runs).with_context(|| format!("reading {}", runs.display()))?;
        plot::draw(&plot::parse_runs(&text)?, out, font)?;
        println!("scenario=plot out={}", out.display());
        return Ok(());
    }
    if let Scenario::Ceilings {
        seconds,
        socket_pairs,
        handshakes,
    } = cli.scenario
    {
        let load_before = stats::loadavg_1m();
        let o = ceilings::CeilingsOptions {
            seconds,
            socket_pairs,
            handshakes,
        };
        let mut summary = tokio::task::spawn_blocking(move || ceilings::run(&o)).await??;
        if let (Some(a), Some(b)) = (load_before, stats::loadavg_1m()) {
            summary.float("loadavg_1m_start", a, 2);
            summary.float("loadavg_1m_end", b, 2);
        }
        println!(
            "{}",
            if cli.common.json {
                summary.json()
            } else {
                summary.line()
            }
        );
        return Ok(());
    }
    let c = &cli.common;
    check_loopback(&c.server).await?;
    let server = c.server_pid.map(Proc::new).transpose()?;
    if c.protocol == Protocol::Xmpp {
        let Scenario::Pairs {
            pairs,
            messages,
            rate,
            text_bytes,
            ..
        } = cli.scenario
        else {
            bail!("--protocol xmpp runs the pairs scenario only");
        };
        let Some(rate) = rate.filter(|r| r.is_finite() && *r > 0.0) else {
            bail!("--protocol xmpp needs --rate (open loop)");
        };
        let summary = xmpp::pairs(
            &c.server,
            xmpp::XmppAccounts {
                domain: c.xmpp_domain.clone(),
                prefix: c.xmpp_user_prefix.clone(),
                password: c.xmpp_password.clone(),
            },
            xmpp::XmppPairsOptions {
                pairs,
                messages,
                rate,
                text_bytes,
                concurrency: c.register_concurrency,
                timeout: Duration::from_secs(c.timeout),
                server,
            },
        )
        .await?;
        println!(
            "{}",
            if c.json {
                summary.json()
            } else {
                summary.line()
            }
        );
        return Ok(());
    }
    let sms = Arc::new(SmsLog::open(&c.sms_log)?);
    let timeout = Duration::from_secs(c.timeout);
    let load_before = stats::loadavg_1m();
    let mut summary = match cli.scenario {
        Scenario::Pairs {
            pairs,
            messages,
            rate,
            window,
            pre_encrypted,
            pool,
            text_bytes,
        } => {
            if rate.is_some_and(|r| !(r.is_finite() && r > 0.0)) {
                bail!("--rate must be a positive number of messages per second");
            }
            pairs::run(
                &c.server,
                sms,
                pairs::PairsOptions {
                    pairs,
                    messages,
                    rate,
                    window: window.min(natter_proto::limits::MAX_INFLIGHT_REQUESTS),
                    pre_encrypted,
                    pool,
                    text_bytes: text_bytes.min(natter_proto::limits::MAX_TEXT_BYTES),
                    concurrency: c.register_concurrency,
                    one_time_keys: c.one_time_keys,
                    timeout,
                    server,
                },
            )
            .await?
        }
        Scenario::Register { accounts, save } => {
            register(&c.server, sms, accounts, save, c, timeout).await?
        }
        Scenario::Idle {
            connections,
            anonymous,
            accounts_file,
            connect_concurrency,
            settle,
            hold,
        } => {
            let Some(server) = server else {
                bail!("idle needs --server-pid to read natterd's memory");
            };
            idle::run(
                &c.server,
                sms,
                idle::IdleOptions {
                    connections,
                    anonymous,
                    accounts: accounts_file
                        .as_deref()
                        .map(adapter::Credentials::load_all)
                        .transpose()?,
                    register_concurrency: c.register_concurrency,
                    connect_concurrency,
                    one_time_keys: c.one_time_keys,
                    settle: Duration::from_secs(settle),
                    hold: Duration::from_secs(hold),
                    timeout,
                    server,
                },
            )
            .await?
        }
        Scenario::Storm {
            connections,
            concurrency,
            accounts_file,
        } => {
            storm::run(
                &c.server,
                sms,
                storm::StormOptions {
                    connections,
                    accounts: accounts_file
                        .as_deref()
                        .map(adapter::Credentials::load_all)
                        .transpose()?,
                    concurrency,
                    register_concurrency: c.register_concurrency,
                    one_time_keys: c.one_time_keys,
                    timeout,
                    server,
                },
            )
            .await?
        }
        Scenario::Mixed {
            connections,
            active_share,
            messages,
            rate,
            pre_encrypted,
            accounts_file,
            connect_concurrency,
        } => {
            if !(rate.is_finite() && rate > 0.0) {
                bail!("--rate must be a positive number of messages per second");
            }
            mixed::run(
                &c.server,
                sms,
                mixed::MixedOptions {
                    connections,
                    active_share,
                    pairs: pairs::PairsOptions {
                        pairs: 0,
                        messages,
                        rate: Some(rate),
                        window: natter_proto::limits::MAX_INFLIGHT_REQUESTS.min(32),
                        pre_encrypted,
                        pool: 64,
                        text_bytes: 170,
                        concurrency: c.register_concurrency,
                        one_time_keys: c.one_time_keys,
                        timeout,
                        server,
                    },
                    accounts: accounts_file
                        .as_deref()
                        .map(adapter::Credentials::load_all)
                        .transpose()?,
                    connect_concurrency,
                },
            )
            .await?
        }
        Scenario::Offline {
            receivers,
            min_queued,
            max_queued,
            text_bytes,
        } => {
            offline::run(
                &c.server,
                sms,
                offline::OfflineOptions {
                    receivers,
                    min_queued,
                    max_queued,
                    text_bytes,
                    concurrency: c.register_concurrency,
                    one_time_keys: c.one_time_keys,
                    timeout,
                    server,
                },
            )
            .await?
        }
        Scenario::Group {
            members,
            messages,
            rate,
            await_fanout,
            add_batch,
            pre_encrypted: _,
            text_bytes,
            accounts_file,
            connect_concurrency,
        } => {
            if rate.is_some_and(|r| !(r.is_finite() && r > 0.0)) {
                bail!("--rate must be a positive number of messages per second");
            }
            group::run(
                &c.server,
                sms,
                group::GroupOptions {
                    members,
                    messages,
                    rate,
                    await_fanout,
                    add_batch,
                    text_bytes: text_bytes.min(natter_proto::limits::MAX_TEXT_BYTES),
                    accounts: accounts_file
                        .as_deref()
                        .map(adapter::Credentials::load_all)
                        .transpose()?,
                    register_concurrency: c.register_concurrency,
                    connect_concurrency,
                    one_time_keys: c.one_time_keys,
                    timeout,
                    server,
                },
            )
            .await?
        }
        Scenario::Plot { .. } => bail!("plot loads no server"),
        Scenario::Ceilings { .. } => bail!("ceilings loads no server"),
    };
    // Other processes on the same cores skew every figure: record how busy the machine was.
    if let (Some(a), Some(b)) = (load_before, stats::loadavg_1m()) {
        summary.float("loadavg_1m_start", a, 2);
        summary.float("loadavg_1m_end", b, 2);
    }
    println!(
        "{}",
        if c.json {
            summary.json()
        } else {
            summary.line()
        }
    );
    Ok(())
}

async fn register(
    addr: &str,
    sms: Arc<SmsLog>,
    accounts: usize,
    save: Option<PathBuf>,
    c: &Common,
    timeout: Duration,
) -> Result<report::Summary> {
    if accounts == 0 {
        bail!("--accounts must be at least 1");
    }
    let started = tokio::time::Instant::now();
    let devices = tokio::time::timeout(
        timeout,
        adapter::register_many(
            addr,
            sms,
            adapter::Numbers::new()?,
            0,
            accounts,
            c.register_concurrency,
            c.one_time_keys,
        ),
    )
    .await
    .map_err(|_| anyhow::anyhow!("registration did not finish within --timeout"))??;
    let secs = started.elapsed().as_secs_f64();
    if let Some(path) = &save {
        let creds: Vec<_> = devices.iter().map(adapter::Credentials::from).collect();
        adapter::Credentials::save_all(path, &creds)?;
    }
    let mut s = report::Summary::new("register");
    s.int("accounts", accounts as u64);
    s.int("concurrency", c.register_concurrency as u64);
    s.int("one_time_keys", c.one_time_keys as u64);
    s.float("register_s", secs, 1);
    s.float("registrations_per_s", accounts as f64 / secs.max(1e-9), 0);
    Ok(s)
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("NATTER_BENCH_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.enable_all();
    if let Some(t) = cli.common.threads {
        rt.worker_threads(t.max(1));
    }
    rt.build()?.block_on(run(cli))
}
