//! Scenario `ceilings`: the physical limits of this machine that natterd's figures are compared with,
//! measured with no natterd involved: small writes through a loopback TCP connection, the one-way latency
//! of a loopback round trip, the kernel memory an idle connected TCP socket costs, and the CPU of one
//! Noise `XX` handshake (natter-proto's, in process). Pinning to a CPU is the caller's (`taskset`).

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use natter_proto::noise::{Handshake, Role, SecureChannel, StaticKeypair};

use crate::report::Summary;
use crate::stats::quantile;

/// Bytes per write and per ping-pong message: about one small message on the wire.
pub const MESSAGE_BYTES: usize = 200;
/// Files this process keeps free besides the idle sockets.
const FD_HEADROOM: usize = 500;
/// Handshakes run back to back per phase: the thread CPU clock (`/proc/thread-self/schedstat`) advances
/// at scheduler events (ticks of a few ms), so a phase must last many ticks for its reading to be exact
/// to a few per cent; 250 responder halves take about 100 ms.
const HANDSHAKE_BATCH: usize = 250;
/// Most ping-pong samples kept.
const MAX_PINGPONGS: usize = 5_000_000;

/// Options of the `ceilings` scenario.
#[derive(Debug, Clone)]
pub struct CeilingsOptions {
    /// Seconds for the write test and for the ping-pong test each.
    pub seconds: f64,
    /// Connected loopback pairs held open for the socket memory figure (2 sockets each).
    pub socket_pairs: usize,
    /// Noise handshakes.
    pub handshakes: usize,
}

/// A connected loopback TCP pair with `TCP_NODELAY` on both ends: (client, server).
fn loopback_pair(listener: &TcpListener) -> Result<(TcpStream, TcpStream)> {
    let client = TcpStream::connect(listener.local_addr()?).context("connecting on loopback")?;
    let (server, _) = listener.accept().context("accepting on loopback")?;
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    Ok((client, server))
}

/// What the write test measured.
#[derive(Debug, Clone, Copy)]
pub struct Writes {
    /// write(2) calls per second.
    pub per_s: f64,
    /// Megabytes (10^6 bytes) per second.
    pub mb_per_s: f64,
    /// Bytes the reader received (must equal the bytes written).
    pub read_bytes: u64,
    /// Bytes written.
    pub written_bytes: u64,
}

/// One writer thread makes `MESSAGE_BYTES`-byte write(2) calls for `seconds`, one reader thread drains.
pub fn loopback_writes(seconds: f64) -> Result<Writes> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let (mut client, mut server) = loopback_pair(&listener)?;
    let reader = thread::spawn(move || -> std::io::Result<u64> {
        let mut buf = vec![0u8; 256 * 1024];
        let mut total = 0u64;
        loop {
            let n = server.read(&mut buf)?;
            if n == 0 {
                return Ok(total);
            }
            total += n as u64;
        }
    });
    let msg = [0x5au8; MESSAGE_BYTES];
    let started = Instant::now();
    let end = started + Duration::from_secs_f64(seconds);
    let mut writes = 0u64;
    let mut bytes = 0u64;
    while Instant::now() < end {
        for _ in 0..64 {
            bytes += client.write(&msg)? as u64;
            writes += 1;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    client.shutdown(Shutdown::Write)?;
    let read_bytes = reader
        .join()
        .map_err(|_| anyhow!("the reader thread panicked"))??;
    Ok(Writes {
        per_s: writes as f64 / secs,
        mb_per_s: bytes as f64 / secs / 1e6,
        read_bytes,
        written_bytes: bytes,
    })
}

/// Ping-pong of `MESSAGE_BYTES` over a loopback connection for `seconds`: the round-trip times in ns.
pub fn pingpong_rtts(seconds: f64) -> Result<Vec<u64>> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let (mut client, mut server) = loopback_pair(&listener)?;
    let echo = thread::spawn(move || -> std::io::Result<()> {
        let mut buf = [0u8; MESSAGE_BYTES];
        loop {
            match server.read_exact(&mut buf) {
                Ok(()) => server.write_all(&buf)?,
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    });
    let msg = [0xa5u8; MESSAGE_BYTES];
    let mut back = [0u8; MESSAGE_BYTES];
    // Warm-up: the first round trips pay for page faults and wake-ups of cold threads.
    for _ in 0..100 {
        client.write_all(&msg)?;
        client.read_exact(&mut back)?;
    }
    let end = Instant::now() + Duration::from_secs_f64(seconds);
    let mut rtts = Vec::with_capacity(1 << 16);
    while rtts.len() < MAX_PINGPONGS {
        let t = Instant::now();
        if t >= end {
            break;
        }
        client.write_all(&msg)?;
        client.read_exact(&mut back)?;
        rtts.push(t.elapsed().as_nanos() as u64);
    }
    if back != msg {
        bail!("the echo came back altered");
    }
    client.shutdown(Shutdown::Write)?;
    echo.join()
        .map_err(|_| anyhow!("the echo thread panicked"))??;
    Ok(rtts)
}

/// The kernel's socket memory counters (machine-wide).
#[derive(Debug, Clone, Copy, Default)]
pub struct KernelMem {
    /// `Slab:` of /proc/meminfo, bytes (all slab caches: socket, inode, file, dentry objects...).
    pub slab_bytes: u64,
    /// `TCP: ... mem` of /proc/net/sockstat, in pages (socket buffer memory).
    pub tcp_mem_pages: u64,
    /// `sockets: used` of /proc/net/sockstat.
    pub sockets_used: u64,
}

fn field_after(text: &str, line_prefix: &str, key: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(line_prefix))?;
    let mut words = line.split_whitespace();
    while let Some(w) = words.next() {
        if w == key {
            return words.next()?.parse().ok();
        }
    }
    None
}

/// Parses /proc/meminfo and /proc/net/sockstat text.
pub fn parse_kernel_mem(meminfo: &str, sockstat: &str) -> Result<KernelMem> {
    Ok(KernelMem {
        slab_bytes: field_after(meminfo, "Slab:", "Slab:")
            .ok_or_else(|| anyhow!("no Slab in /proc/meminfo"))?
            * 1024,
        tcp_mem_pages: field_after(sockstat, "TCP:", "mem")
            .ok_or_else(|| anyhow!("no TCP mem in /proc/net/sockstat"))?,
        sockets_used: field_after(sockstat, "sockets:", "used")
            .ok_or_else(|| anyhow!("no sockets used in /proc/net/sockstat"))?,
    })
}

fn kernel_mem() -> Result<KernelMem> {
    parse_kernel_mem(
        &std::fs::read_to_string("/proc/meminfo")?,
        &std::fs::read_to_string("/proc/net/sockstat")?,
    )
}

/// The kernel's page size, from this process's smaps (4 KiB if it does not say).
fn page_size() -> u64 {
    std::fs::read_to_string("/proc/self/smaps")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("KernelPageSize:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(4096, |kb| kb * 1024)
}

/// What holding idle sockets cost the kernel.
#[derive(Debug, Clone, Copy)]
pub struct SocketMem {
    /// Sockets held (two per pair).
    pub sockets: u64,
    /// Growth of `sockets: used`.
    pub sockets_used_delta: i64,
    /// Slab growth per socket, bytes.
    pub slab_per_socket: f64,
    /// TCP buffer memory growth per socket, bytes.
    pub tcp_mem_per_socket: f64,
}

/// Opens `pairs` connected loopback pairs, lets them settle, and compares the kernel's counters.
pub fn idle_socket_memory(pairs: usize) -> Result<SocketMem> {
    let limit = crate::idle::fd_limit();
    if 2 * pairs + FD_HEADROOM > limit {
        bail!(
            "{pairs} pairs need {} sockets, more than the {limit} open files allowed",
            2 * pairs
        );
    }
    let listener = TcpListener::bind("127.0.0.1:0")?;
    thread::sleep(Duration::from_millis(500));
    let before = kernel_mem()?;
    let mut held = Vec::with_capacity(pairs);
    for _ in 0..pairs {
        held.push(loopback_pair(&listener)?);
    }
    thread::sleep(Duration::from_secs(1));
    let after = kernel_mem()?;
    let sockets = 2 * held.len() as u64;
    drop(held);
    let per = |d: i64| d as f64 / sockets.max(1) as f64;
    Ok(SocketMem {
        sockets,
        sockets_used_delta: after.sockets_used as i64 - before.sockets_used as i64,
        slab_per_socket: per(after.slab_bytes as i64 - before.slab_bytes as i64),
        tcp_mem_per_socket: per(
            (after.tcp_mem_pages as i64 - before.tcp_mem_pages as i64) * page_size() as i64
        ),
    })
}

/// CPU time this thread has run, in ns (`/proc/thread-self/schedstat`), if the kernel reports it.
fn thread_cpu_ns() -> Option<u64> {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// A clock for the handshake timings: this thread's CPU time, or wall time where the kernel does not
/// report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeClock {
    /// `/proc/thread-self/schedstat`: CPU time of this thread, ns resolution.
    ThreadCpu,
    /// Monotonic wall time.
    Wall,
}

/// Handshake CPU per handshake, in µs.
#[derive(Debug, Clone, Copy)]
pub struct HandshakeCost {
    /// Handshakes run.
    pub handshakes: usize,
    /// The responder's calls only (new, read message 1, write message 2, read message 3, into_channel).
    pub responder_us: f64,
    /// Both sides.
    pub both_us: f64,
    /// Which clock.
    pub clock: HandshakeClock,
    /// The responder's phases on the wall clock (a check: equal to `responder_us` unless the thread
    /// was preempted or the CPU clock is coarse).
    pub responder_wall_us: f64,
    /// Both sides on the wall clock.
    pub both_wall_us: f64,
}

struct Clock(HandshakeClock, Instant);

impl Clock {
    /// (the chosen clock, the wall clock), ns.
    fn now_ns(&self) -> (u64, u64) {
        let wall = self.1.elapsed().as_nanos() as u64;
        match self.0 {
            HandshakeClock::ThreadCpu => (thread_cpu_ns().unwrap_or(0), wall),
            HandshakeClock::Wall => (wall, wall),
        }
    }
}

/// `b - a` on both clocks.
fn between(a: (u64, u64), b: (u64, u64)) -> (u64, u64) {
    (b.0.saturating_sub(a.0), b.1.saturating_sub(a.1))
}

/// Runs `n` Noise `XX` handshakes in this thread, in batches whose phases alternate between the sides:
/// the initiators write message 1, the responders read it and write message 2, the initiators read it
/// and write message 3, the responders read it and switch to transport. Only the responder phases count
/// for `responder_us`; all four for `both_us`. Returns the cost and the channels of the last batch
/// (initiator, responder), so that the caller can check they talk to each other.
pub fn noise_handshakes(n: usize) -> Result<(HandshakeCost, Vec<(SecureChannel, SecureChannel)>)> {
    let clock = Clock(
        if thread_cpu_ns().is_some() {
            HandshakeClock::ThreadCpu
        } else {
            HandshakeClock::Wall
        },
        Instant::now(),
    );
    let server = StaticKeypair::generate()?;
    let clients: Vec<StaticKeypair> = (0..16)
        .map(|_| StaticKeypair::generate())
        .collect::<Result<_, _>>()?;
    let mut responder_ns = (0u64, 0u64);
    let mut both_ns = (0u64, 0u64);
    let mut done = 0;
    let mut last = Vec::new();
    while done < n {
        let batch = HANDSHAKE_BATCH.min(n - done);
        let t0 = clock.now_ns();
        let mut inits = Vec::with_capacity(batch);
        let mut m1 = Vec::with_capacity(batch);
        for i in 0..batch {
            let key = &clients[(done + i) % clients.len()];
            let mut h = Handshake::new(Role::Initiator, key)?;
            let mut out = Vec::new();
            h.write_record(&[], &mut out)?;
            inits.push(h);
            m1.push(out);
        }
        let t1 = clock.now_ns();
        let mut resps = Vec::with_capacity(batch);
        let mut m2 = Vec::with_capacity(batch);
        for msg in &m1 {
            let mut h = Handshake::new(Role::Responder, &server)?;
            // write_record prefixes each record with its 2-byte length; read_record takes the body.
            h.read_record(msg.get(2..).unwrap_or_default())?;
            let mut out = Vec::new();
            h.write_record(&[], &mut out)?;
            resps.push(h);
            m2.push(out);
        }
        let t2 = clock.now_ns();
        let mut chans_i = Vec::with_capacity(batch);
        let mut m3 = Vec::with_capacity(batch);
        for (mut h, msg) in inits.into_iter().zip(&m2) {
            h.read_record(msg.get(2..).unwrap_or_default())?;
            let mut out = Vec::new();
            h.write_record(&[], &mut out)?;
            chans_i.push(h.into_channel()?);
            m3.push(out);
        }
        let t3 = clock.now_ns();
        let mut chans_r = Vec::with_capacity(batch);
        for (mut h, msg) in resps.into_iter().zip(&m3) {
            h.read_record(msg.get(2..).unwrap_or_default())?;
            chans_r.push(h.into_channel()?);
        }
        let t4 = clock.now_ns();
        let (r1, r2) = (between(t1, t2), between(t3, t4));
        let all = between(t0, t4);
        responder_ns.0 += r1.0 + r2.0;
        responder_ns.1 += r1.1 + r2.1;
        both_ns.0 += all.0;
        both_ns.1 += all.1;
        done += batch;
        last = chans_i.into_iter().zip(chans_r).collect();
    }
    let per = |ns: u64| ns as f64 / 1e3 / n.max(1) as f64;
    Ok((
        HandshakeCost {
            handshakes: n,
            responder_us: per(responder_ns.0),
            both_us: per(both_ns.0),
            clock: clock.0,
            responder_wall_us: per(responder_ns.1),
            both_wall_us: per(both_ns.1),
        },
        last,
    ))
}

/// Runs every measurement and returns the summary (blocking: call it off the async runtime).
pub fn run(o: &CeilingsOptions) -> Result<Summary> {
    if !(o.seconds.is_finite() && o.seconds > 0.0 && o.seconds <= 600.0) {
        bail!("--seconds must be between 0 and 600");
    }
    if o.socket_pairs == 0 || o.handshakes == 0 {
        bail!("--socket-pairs and --handshakes must be at least 1");
    }
    tracing::info!(seconds = o.seconds, "loopback writes");
    let w = loopback_writes(o.seconds)?;
    if w.read_bytes != w.written_bytes {
        bail!(
            "the reader got {} bytes of the {} written",
            w.read_bytes,
            w.written_bytes
        );
    }
    tracing::info!(seconds = o.seconds, "loopback ping-pong");
    let mut rtts = pingpong_rtts(o.seconds)?;
    rtts.sort_unstable();
    tracing::info!(pairs = o.socket_pairs, "idle loopback sockets");
    let mem = idle_socket_memory(o.socket_pairs)?;
    tracing::info!(handshakes = o.handshakes, "Noise XX handshakes");
    let (hs, chans) = noise_handshakes(o.handshakes)?;
    check_channels(chans)?;

    let one_way_us = |q: f64| quantile(&rtts, q) as f64 / 2.0 / 1e3;
    let mut s = Summary::new("ceilings");
    s.float("loopback_writes_per_s", w.per_s, 0);
    s.float("one_way_p50_us", one_way_us(0.50), 2);
    s.float("one_way_p99_us", one_way_us(0.99), 2);
    s.float(
        "kernel_bytes_per_socket",
        mem.slab_per_socket + mem.tcp_mem_per_socket,
        0,
    );
    s.float("noise_xx_responder_us", hs.responder_us, 1);
    s.float("noise_xx_both_us", hs.both_us, 1);
    s.float("seconds", o.seconds, 1);
    s.int("message_bytes", MESSAGE_BYTES as u64);
    s.float("loopback_write_mb_per_s", w.mb_per_s, 1);
    s.text("one_way_is", "rtt/2");
    s.int("pingpong_samples", rtts.len() as u64);
    s.float("one_way_p999_us", one_way_us(0.999), 2);
    s.float("one_way_max_us", one_way_us(1.0), 2);
    s.int("idle_sockets", mem.sockets);
    s.int("sockets_used_delta", mem.sockets_used_delta.max(0) as u64);
    s.float("kernel_slab_bytes_per_socket", mem.slab_per_socket, 0);
    s.float("kernel_tcp_mem_bytes_per_socket", mem.tcp_mem_per_socket, 0);
    s.text(
        "kernel_bytes_from",
        "delta(meminfo Slab + sockstat TCP mem pages), machine-wide",
    );
    s.int("handshakes", hs.handshakes as u64);
    s.float("noise_xx_responder_wall_us", hs.responder_wall_us, 1);
    s.float("noise_xx_both_wall_us", hs.both_wall_us, 1);
    s.text(
        "noise_clock",
        match hs.clock {
            HandshakeClock::ThreadCpu => "thread-cpu",
            HandshakeClock::Wall => "wall",
        },
    );
    Ok(s)
}

/// One frame from `from` arrives intact at `to`.
fn one_frame(from: &mut SecureChannel, to: &mut SecureChannel, nonce: u64) -> Result<()> {
    use natter_proto::wire::{Frame, Ping, frame};
    let mut out = Vec::new();
    from.seal_frame(&Frame::new(frame::Body::Ping(Ping { nonce })), &mut out)?;
    // Records carry a 2-byte length prefix; open_record takes the body.
    to.open_record(out.get(2..).unwrap_or_default())?;
    match to.next_frame()?.and_then(|f| f.body) {
        Some(frame::Body::Ping(p)) if p.nonce == nonce => Ok(()),
        _ => bail!("a handshake's channels do not agree"),
    }
}

/// The handshakes' channels really talk to each other: one frame each way on a few of them.
fn check_channels(chans: Vec<(SecureChannel, SecureChannel)>) -> Result<()> {
    for (mut a, mut b) in chans.into_iter().take(3) {
        one_frame(&mut a, &mut b, 42)?;
        one_frame(&mut b, &mut a, 43)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kernel_counters() {
        let meminfo =
            "MemTotal:       24000000 kB\nSlab:             123456 kB\nSReclaimable:     1 kB\n";
        let sockstat =
            "sockets: used 34\nTCP: inuse 15 orphan 0 tw 2 alloc 18 mem 269\nUDP: inuse 0 mem 0\n";
        let k = parse_kernel_mem(meminfo, sockstat).unwrap();
        assert_eq!(k.slab_bytes, 123_456 * 1024);
        assert_eq!(k.tcp_mem_pages, 269);
        assert_eq!(k.sockets_used, 34);
        assert!(parse_kernel_mem("", sockstat).is_err());
    }

    #[test]
    fn handshakes_run_and_cost_something() {
        let (cost, chans) = noise_handshakes(3).unwrap();
        assert_eq!(cost.handshakes, 3);
        assert!(cost.both_us >= cost.responder_us);
        assert!(cost.both_wall_us >= cost.responder_wall_us);
        assert_eq!(chans.len(), 3);
        check_channels(chans).unwrap();
    }

    #[test]
    fn loopback_measurements_work() {
        let w = loopback_writes(0.05).unwrap();
        assert!(w.per_s > 0.0);
        assert_eq!(w.read_bytes, w.written_bytes);
        assert!(!pingpong_rtts(0.05).unwrap().is_empty());
        let m = idle_socket_memory(10).unwrap();
        assert_eq!(m.sockets, 20);
    }
}
