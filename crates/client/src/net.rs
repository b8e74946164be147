//! The connection to natterd: TCP, the Noise handshake (XX, with the server's key pinned on first
//! contact), the hello, then a driver task that multiplexes requests, responses, pushes, acknowledgements
//! and keep-alive pings. Dropping the [`Connection`] closes it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use natter_proto::limits::KEEPALIVE_INTERVAL;
use natter_proto::noise::{Handshake, RecordReader, Role, SecureChannel, StaticKeypair};
use natter_proto::wire::{
    Ack, ClientHello, Frame, Login, Ping, Push, Request, Response, frame, request, response,
};
use natter_proto::{PROTOCOL_VERSION, ProtoError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedReadHalf;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::error::{ClientError, Result};

/// How long a request may wait for its response.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long connecting (TCP + handshake + hello) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Response>>>>;

/// Bytes written to the sockets of this process's connections after their handshakes.
static BYTES_SENT: AtomicU64 = AtomicU64::new(0);

/// Bytes this process's client connections have written to their sockets after the handshake (Noise
/// records: frames, their framing and tags), for measurements such as the upload cost of a send.
pub fn bytes_sent() -> u64 {
    BYTES_SENT.load(Ordering::Relaxed)
}

/// Writes and counts.
async fn send_all(wr: &mut tokio::net::tcp::OwnedWriteHalf, buf: &[u8]) -> std::io::Result<()> {
    wr.write_all(buf).await?;
    BYTES_SENT.fetch_add(buf.len() as u64, Ordering::Relaxed);
    Ok(())
}

/// An open, authenticated connection.
#[derive(Debug)]
pub struct Connection {
    out: mpsc::UnboundedSender<Frame>,
    pending: Pending,
    next_id: AtomicU64,
    server_key: [u8; 32],
    server_time_ms: u64,
    driver: JoinHandle<()>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// Where and as whom to connect.
#[derive(Debug)]
pub struct ConnectOptions<'a> {
    /// `host:port`.
    pub addr: &'a str,
    /// This device's Noise key.
    pub noise_key: &'a StaticKeypair,
    /// The server key pinned on first contact, if any.
    pub pinned_server_key: Option<[u8; 32]>,
    /// Log in as this device; `None` for an anonymous connection (registration).
    pub login: Option<Login>,
}

impl Connection {
    /// Connects, runs the handshake and the hello. Returns the connection and the stream of pushes,
    /// which ends when the connection does.
    pub async fn open(
        opts: ConnectOptions<'_>,
    ) -> Result<(Connection, mpsc::UnboundedReceiver<Push>)> {
        tokio::time::timeout(CONNECT_TIMEOUT, Self::open_inner(opts))
            .await
            .map_err(|_| ClientError::Timeout)?
    }

    async fn open_inner(
        opts: ConnectOptions<'_>,
    ) -> Result<(Connection, mpsc::UnboundedReceiver<Push>)> {
        let mut stream =
            TcpStream::connect(opts.addr)
                .await
                .map_err(|source| ClientError::Unreachable {
                    addr: opts.addr.to_owned(),
                    source,
                })?;
        let _ = stream.set_nodelay(true);
        let io = |source| ClientError::Unreachable {
            addr: opts.addr.to_owned(),
            source,
        };
        let mut reader = RecordReader::new();
        let mut hs = Handshake::new(Role::Initiator, opts.noise_key)?;
        let mut out = Vec::new();
        hs.write_record(&[], &mut out)?;
        stream.write_all(&out).await.map_err(io)?;
        let second = read_record(&mut stream, &mut reader).await?;
        if let Some(refusal) = natter_proto::noise::parse_refusal(&second) {
            // Too many connections or handshakes from this address: the server's reason, typed.
            return Err(refusal.into());
        }
        hs.read_record(&second)?;
        let offered = hs.remote_static().ok_or(ProtoError::Noise)?;
        if let Some(pinned) = opts.pinned_server_key
            && pinned != offered
        {
            // Refuse before sending the third message, which would reveal our static key.
            return Err(ProtoError::ServerKeyChanged {
                pinned: hex::encode(pinned),
                offered: hex::encode(offered),
            }
            .into());
        }
        out.clear();
        hs.write_record(&[], &mut out)?;
        let mut channel = hs.into_channel()?;
        let hello = Frame::new(frame::Body::ClientHello(ClientHello {
            protocol_version: PROTOCOL_VERSION,
            required_features: Vec::new(),
            login: opts.login,
        }));
        channel.seal_frame(&hello, &mut out)?;
        stream.write_all(&out).await.map_err(io)?;
        let server_time_ms = loop {
            if let Some(f) = channel.next_frame()? {
                match f.body {
                    Some(frame::Body::ServerHello(h)) => {
                        if let Some(e) = h.error {
                            return Err(e.into());
                        }
                        break h.server_time_ms;
                    }
                    _ => {
                        return Err(
                            ProtoError::Unexpected("frame before the server's hello").into()
                        );
                    }
                }
            }
            let rec = read_record(&mut stream, &mut reader).await?;
            channel.open_record(&rec)?;
        };
        let (out_tx, out_rx) = mpsc::unbounded_channel();
        let (push_tx, push_rx) = mpsc::unbounded_channel();
        let pending: Pending = Arc::default();
        let driver = tokio::spawn(drive(
            stream,
            reader,
            channel,
            out_rx,
            push_tx,
            pending.clone(),
        ));
        Ok((
            Connection {
                out: out_tx,
                pending,
                next_id: AtomicU64::new(1),
                server_key: offered,
                server_time_ms,
                driver,
            },
            push_rx,
        ))
    }

    /// The server's Noise key (to pin after first contact).
    pub fn server_key(&self) -> [u8; 32] {
        self.server_key
    }

    /// The server's clock at connection time.
    pub fn server_time_ms(&self) -> u64 {
        self.server_time_ms
    }

    /// Whether the driver is still running.
    pub fn is_open(&self) -> bool {
        !self.driver.is_finished()
    }

    /// Sends a request and waits for its response.
    pub async fn request(&self, body: request::Body) -> Result<response::Body> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(id, tx);
        let frame = Frame::new(frame::Body::Request(Request {
            id,
            body: Some(body),
        }));
        if self.out.send(frame).is_err() {
            lock(&self.pending).remove(&id);
            return Err(ClientError::Disconnected);
        }
        let resp = match tokio::time::timeout(REQUEST_TIMEOUT, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => return Err(ClientError::Disconnected),
            Err(_) => {
                lock(&self.pending).remove(&id);
                return Err(ClientError::Timeout);
            }
        };
        if let Some(e) = resp.error {
            return Err(e.into());
        }
        resp.body
            .ok_or(ClientError::Protocol(ProtoError::Missing("response body")))
    }

    /// Acknowledges processed envelopes.
    pub fn ack(&self, ids: Vec<u64>) -> Result<()> {
        for chunk in ids.chunks(natter_proto::limits::MAX_ACK_IDS) {
            let f = Frame::new(frame::Body::Ack(Ack {
                envelope_ids: chunk.to_vec(),
            }));
            self.out.send(f).map_err(|_| ClientError::Disconnected)?;
        }
        Ok(())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

async fn read_record(stream: &mut TcpStream, reader: &mut RecordReader) -> Result<bytes::BytesMut> {
    loop {
        if let Some(rec) = reader.next_record() {
            return Ok(rec);
        }
        reader.buffer_mut().reserve(4096);
        let n = stream
            .read_buf(reader.buffer_mut())
            .await
            .map_err(|_| ClientError::Disconnected)?;
        if n == 0 {
            return Err(ClientError::Disconnected);
        }
    }
}

/// Reads frames from the socket and writes queued frames until either side closes.
async fn drive(
    stream: TcpStream,
    mut reader: RecordReader,
    mut channel: SecureChannel,
    mut out_rx: mpsc::UnboundedReceiver<Frame>,
    push_tx: mpsc::UnboundedSender<Push>,
    pending: Pending,
) {
    let (mut rd, mut wr) = stream.into_split();
    let mut keepalive = tokio::time::interval(KEEPALIVE_INTERVAL);
    keepalive.tick().await;
    let mut nonce = 0u64;
    let mut buf = Vec::new();
    // Frames that arrived together with the server's hello are already buffered: route them first.
    if dispatch(&mut reader, &mut channel, &push_tx, &pending, &mut buf).is_err()
        || (!buf.is_empty() && send_all(&mut wr, &buf).await.is_err())
    {
        lock(&pending).clear();
        return;
    }
    buf.clear();
    loop {
        tokio::select! {
            f = out_rx.recv() => {
                let Some(f) = f else { break };
                let mut frames = vec![f];
                while let Ok(more) = out_rx.try_recv() {
                    frames.push(more);
                }
                buf.clear();
                if channel.seal_frames(&frames, &mut buf).is_err() || send_all(&mut wr, &buf).await.is_err() {
                    break;
                }
                keepalive.reset();
            }
            r = read_some(&mut rd, &mut reader) => {
                if r.is_err() { break; }
                if dispatch(&mut reader, &mut channel, &push_tx, &pending, &mut buf).is_err() { break; }
                if !buf.is_empty() && send_all(&mut wr, &buf).await.is_err() { break; }
                buf.clear();
            }
            _ = keepalive.tick() => {
                nonce += 1;
                buf.clear();
                let ping = Frame::new(frame::Body::Ping(Ping { nonce }));
                if channel.seal_frame(&ping, &mut buf).is_err() || send_all(&mut wr, &buf).await.is_err() {
                    break;
                }
            }
        }
    }
    // Dropping the senders fails every waiting request with `Disconnected`.
    lock(&pending).clear();
}

async fn read_some(rd: &mut OwnedReadHalf, reader: &mut RecordReader) -> std::io::Result<()> {
    reader.buffer_mut().reserve(16 * 1024);
    let n = rd.read_buf(reader.buffer_mut()).await?;
    if n == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

/// Decrypts what was read and routes each frame; pongs go into `reply`.
fn dispatch(
    reader: &mut RecordReader,
    channel: &mut SecureChannel,
    push_tx: &mpsc::UnboundedSender<Push>,
    pending: &Pending,
    reply: &mut Vec<u8>,
) -> Result<(), ProtoError> {
    reply.clear();
    while let Some(rec) = reader.next_record() {
        channel.open_record(&rec)?;
    }
    while let Some(f) = channel.next_frame()? {
        match f.body {
            Some(frame::Body::Response(r)) => {
                if let Some(tx) = lock(pending).remove(&r.id) {
                    let _ = tx.send(r);
                }
            }
            Some(frame::Body::Push(p)) => {
                let _ = push_tx.send(p);
            }
            Some(frame::Body::Ping(p)) => {
                let pong = Frame::new(frame::Body::Pong(Ping { nonce: p.nonce }));
                channel.seal_frame(&pong, reply)?;
            }
            Some(frame::Body::Pong(_)) => {}
            _ => return Err(ProtoError::Unexpected("frame kind from the server")),
        }
    }
    Ok(())
}
