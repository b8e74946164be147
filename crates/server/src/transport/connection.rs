//! One connection's driver: Noise handshake, hello and login, then a readiness loop that reads frames,
//! runs requests, pushes envelopes, takes acknowledgements and keeps the connection alive.
//!
//! An idle connection owns no read or write buffer: it waits for readiness and reads into buffers that are
//! released as soon as they are empty.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use natter_proto::limits::{IDLE_TIMEOUT, MAX_INFLIGHT_REQUESTS, ONE_TIME_KEYS_LOW};
use natter_proto::noise::{Handshake, RecordReader, Role, SecureChannel};
use natter_proto::wire::{
    self, ClientHello, DeviceRemoved, Envelope, Error, ErrorCode, Frame, KeysLow, Ping, Push,
    QueueEmpty, ServerHello, frame, push, request,
};
use natter_proto::{DeviceId, PROTOCOL_VERSION, PhoneNumber, ProtoError};
use subtle::ConstantTimeEq;
use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;

use super::io::{read_frame, read_record};
use crate::delivery::{ConnEvent, ConnEvents, ConnShared};
use crate::handlers::{self, Login, RequestCtx};
use crate::server::ServerState;
use crate::store::QueuedEnvelope;

/// Why a connection ended. None of these is a server bug; they are logged at `debug`.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    /// Socket error.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The peer sent something invalid.
    #[error("protocol: {0}")]
    Proto(#[from] ProtoError),
    /// The peer closed the connection.
    #[error("closed by peer")]
    Closed,
    /// The handshake or hello took too long.
    #[error("handshake timed out")]
    HandshakeTimeout,
    /// The store failed while the driver needed it.
    #[error("store: {0}")]
    Store(#[from] crate::store::StoreError),
}

/// Output buffered beyond this stops the driver from reading more requests until the peer catches up.
const MAX_PENDING_OUTPUT: usize = 4 * 1024 * 1024;
/// Envelopes loaded from the store per query.
const QUEUE_PAGE: usize = 256;

/// Serves one accepted TCP connection until it ends.
pub async fn serve(
    state: Arc<ServerState>,
    mut stream: TcpStream,
    peer: SocketAddr,
    shutdown: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let timeout = state.config.abuse.handshake_timeout;
    let mut answered = false;
    // Boxed, like every rarely used step below: the connection's task is sized for its largest await, and
    // an idle connection should not carry the handshake's or the login's state.
    let opened =
        tokio::time::timeout(timeout, Box::pin(open(&state, &mut stream, &mut answered))).await;
    let (channel, reader, hello) = match opened {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!("handshake timed out");
            if !answered {
                // Still before our handshake message: the client can read a refusal.
                let e = Error::new(
                    ErrorCode::LimitExceeded,
                    format!(
                        "the handshake took too long (it must complete within {} ms)",
                        timeout.as_millis()
                    ),
                );
                refuse(stream, &e).await;
            }
            return;
        }
    };
    let (shared, rx) = ConnShared::new(state.next_conn_id());
    let mut conn = Conn {
        state,
        stream,
        reader,
        channel,
        peer_ip: peer.ip(),
        shared,
        rx,
        login: None,
        out: Vec::new(),
        pending: Vec::new(),
        inflight: BTreeSet::new(),
        loaded_upto: 0,
        resync_from: None,
        sent_queue_empty: false,
        requests: 0,
        last_activity: Instant::now(),
        closing: false,
    };
    let result = conn.start(hello, shutdown).await;
    if let Err(e) = &result {
        tracing::debug!(error = %e, "connection ended");
    }
    conn.finish();
}

/// How long a refused connection is kept open for the client to read the refusal.
const REFUSAL_LINGER: std::time::Duration = std::time::Duration::from_secs(2);

/// Sends a refusal record ([`natter_proto::noise::refusal_record`]) instead of a handshake and closes.
/// What the client sent is read and dropped until it closes (at most [`REFUSAL_LINGER`]), so that the
/// close is not a reset that could destroy the refusal before the client reads it.
pub async fn refuse(mut stream: TcpStream, error: &Error) {
    use tokio::io::AsyncReadExt;
    let record = natter_proto::noise::refusal_record(error);
    let linger = async {
        stream.write_all(&record).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 512];
        while stream.read(&mut sink).await? > 0 {}
        Ok::<(), std::io::Error>(())
    };
    let _ = tokio::time::timeout(REFUSAL_LINGER, linger).await;
}

/// Noise handshake (XX, responder) and the client's hello frame. `answered` turns true once the
/// server's handshake message is written.
async fn open(
    state: &ServerState,
    stream: &mut TcpStream,
    answered: &mut bool,
) -> Result<(SecureChannel, RecordReader, ClientHello), ConnError> {
    let mut reader = RecordReader::new();
    let mut hs = Handshake::new(Role::Responder, &state.noise_key)?;
    let first = read_record(stream, &mut reader).await?;
    hs.read_record(&first)?;
    let mut out = Vec::new();
    hs.write_record(&[], &mut out)?;
    *answered = true;
    stream.write_all(&out).await?;
    let third = read_record(stream, &mut reader).await?;
    hs.read_record(&third)?;
    let mut channel = hs.into_channel()?;
    let f = read_frame(stream, &mut reader, &mut channel).await?;
    match f.body {
        Some(frame::Body::ClientHello(h)) => Ok((channel, reader, h)),
        _ => Err(ProtoError::Unexpected("frame before the hello").into()),
    }
}

struct Conn {
    state: Arc<ServerState>,
    stream: TcpStream,
    reader: RecordReader,
    channel: SecureChannel,
    peer_ip: IpAddr,
    shared: Arc<ConnShared>,
    rx: ConnEvents,
    login: Option<Login>,
    /// Encrypted bytes waiting for the socket.
    out: Vec<u8>,
    /// Frames to encrypt together before the next write.
    pending: Vec<Frame>,
    /// Envelopes pushed and not yet acknowledged.
    inflight: BTreeSet<u64>,
    /// Highest queue sequence seen in a store load.
    loaded_upto: u64,
    /// The store may hold envelopes from this sequence on that were not pushed yet.
    resync_from: Option<u64>,
    sent_queue_empty: bool,
    /// Requests running in spawned tasks.
    requests: usize,
    last_activity: Instant,
    closing: bool,
}

impl Conn {
    async fn start(
        &mut self,
        hello: ClientHello,
        shutdown: watch::Receiver<bool>,
    ) -> Result<(), ConnError> {
        let refusal = Box::pin(self.hello(&hello)).await?;
        drop(hello);
        let refused = refusal.is_some();
        // The hello answer goes first, before anything logging in queued (a keys-low push).
        self.pending.insert(
            0,
            Frame::new(frame::Body::ServerHello(ServerHello {
                protocol_version: PROTOCOL_VERSION,
                server_time_ms: crate::now_ms(),
                error: refusal,
            })),
        );
        if refused {
            self.closing = true;
        }
        self.run(shutdown).await
    }

    /// Checks version and features and logs the device in. `Ok(Some(error))` refuses the connection.
    async fn hello(&mut self, hello: &ClientHello) -> Result<Option<Error>, ConnError> {
        if hello.protocol_version != PROTOCOL_VERSION {
            return Ok(Some(Error::new(
                ErrorCode::UnsupportedVersion,
                format!(
                    "this server speaks protocol version {PROTOCOL_VERSION}, the client {}: update the client",
                    hello.protocol_version
                ),
            )));
        }
        if let Some(feature) = hello.required_features.first() {
            return Ok(Some(Error::new(
                ErrorCode::UnsupportedFeature,
                format!("this server does not support the feature {feature:?}"),
            )));
        }
        let Some(login) = &hello.login else {
            return Ok(None);
        };
        let (Ok(phone), Ok(device)) = (
            PhoneNumber::from_e164(&login.phone),
            DeviceId::new(login.device_id),
        ) else {
            return Ok(Some(Error::new(ErrorCode::BadRequest, "malformed login")));
        };
        let record = self.state.store.get_device(&phone, device).await?;
        let Some(record) = record else {
            return Ok(Some(Error::new(
                ErrorCode::DeviceRemoved,
                format!(
                    "this device is no longer registered for {phone} (the number was registered again, or the device was unlinked): register again"
                ),
            )));
        };
        let remote = self.channel.remote_static();
        if !bool::from(record.noise_key.ct_eq(&remote)) {
            // Device ids are reused: after the number was registered again, the old phone's slot holds
            // the new phone's key. For the old phone that is a removal (it must stop reconnecting).
            return Ok(Some(Error::new(
                ErrorCode::DeviceRemoved,
                format!(
                    "this device's key is not the one registered for {phone} (the number was registered again, or the device was unlinked): register again"
                ),
            )));
        }
        self.log_in(Login { phone, device }).await?;
        Ok(None)
    }

    async fn log_in(&mut self, login: Login) -> Result<(), ConnError> {
        let state = &self.state;
        if let Some(old) = state
            .router
            .register(&login.phone, login.device, self.shared.clone())
        {
            old.send(ConnEvent::Kick(
                "this device opened a newer connection".into(),
            ));
        }
        // Before the queue is read (the run loop's first resync), so no wake-up can miss this node.
        state
            .router
            .claim(&login.phone, login.device, &self.shared)
            .await;
        state
            .store
            .touch_device(&login.phone, login.device, crate::now_ms())
            .await?;
        let keys = state
            .store
            .count_one_time_keys(&login.phone, login.device)
            .await?;
        if (keys as usize) < ONE_TIME_KEYS_LOW {
            self.pending
                .push(push_frame(push::Body::KeysLow(KeysLow { remaining: keys })));
        }
        tracing::debug!(device = %login.device, "logged in");
        if state.presence.connected(&login.phone) {
            crate::bus::inbound::presence_changed(state, &login.phone, true);
        }
        self.login = Some(login);
        self.resync_from = Some(0);
        Ok(())
    }

    async fn run(&mut self, mut shutdown: watch::Receiver<bool>) -> Result<(), ConnError> {
        // A client may pipeline frames behind its hello; they are already buffered.
        Box::pin(self.drain_buffered()).await?;
        loop {
            if !self.pending.is_empty() {
                // Taken, not cleared: an idle connection keeps no capacity from its last burst.
                let frames = std::mem::take(&mut self.pending);
                self.channel.seal_frames(&frames, &mut self.out)?;
                self.try_flush()?;
            }
            if self.closing && self.out.is_empty() {
                return Ok(());
            }
            if let Some(from) = self.resync_from
                && !self.closing
                && self.inflight.len() < self.state.config.abuse.max_unacked_pushes
            {
                Box::pin(self.resync(from)).await?;
                continue;
            }
            let reading = !self.closing && self.out.len() < MAX_PENDING_OUTPUT;
            let writing = !self.out.is_empty();
            // One readiness future for both directions (each costs the connection's task 152 bytes).
            let interest = match (reading, writing) {
                (true, true) => Interest::READABLE | Interest::WRITABLE,
                (false, true) => Interest::WRITABLE,
                _ => Interest::READABLE,
            };
            let idle_deadline = self.last_activity + IDLE_TIMEOUT;
            tokio::select! {
                _ = shutdown.changed() => {
                    self.closing = true;
                    if self.out.is_empty() {
                        return Ok(());
                    }
                }
                r = self.stream.ready(interest), if reading || writing => {
                    let ready = r?;
                    if ready.is_writable() && writing {
                        self.try_flush()?;
                    }
                    if ready.is_readable() && reading {
                        // Boxed: frames and requests are large, and only live while a read is handled.
                        Box::pin(self.read_ready()).await?;
                    }
                }
                () = self.rx.ready() => {
                    for ev in self.rx.take() {
                        self.event(ev).await?;
                    }
                }
                _ = tokio::time::sleep_until(idle_deadline) => {
                    tracing::debug!("idle timeout");
                    return Ok(());
                }
            }
        }
    }

    fn try_flush(&mut self) -> Result<(), ConnError> {
        while !self.out.is_empty() {
            match self.stream.try_write(&self.out) {
                Ok(0) => return Err(ConnError::Closed),
                Ok(n) => {
                    self.out.drain(..n);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e.into()),
            }
        }
        if self.out.capacity() > 64 * 1024 {
            self.out = Vec::new();
        }
        Ok(())
    }

    async fn read_ready(&mut self) -> Result<(), ConnError> {
        while self.read_available()? {
            self.last_activity = Instant::now();
            self.drain_buffered().await?;
        }
        Ok(())
    }

    /// Moves what the socket has into the record reader through a scratch buffer on the stack (not in
    /// the connection's future), so an idle connection keeps no read buffer. False if nothing was there.
    fn read_available(&mut self) -> Result<bool, ConnError> {
        let mut scratch = [0u8; 16 * 1024];
        let mut got = false;
        loop {
            match self.stream.try_read(&mut scratch) {
                Ok(0) => return Err(ConnError::Closed),
                Ok(n) => {
                    self.reader.push(&scratch[..n]);
                    got = true;
                    if n < scratch.len() {
                        return Ok(true);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(got),
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Decrypts every complete record buffered and handles every complete frame.
    async fn drain_buffered(&mut self) -> Result<(), ConnError> {
        while let Some(rec) = self.reader.next_record() {
            self.channel.open_record(&rec)?;
        }
        while let Some(f) = self.channel.next_frame()? {
            self.frame(f).await?;
        }
        Ok(())
    }

    async fn frame(&mut self, f: Frame) -> Result<(), ConnError> {
        match f.body {
            Some(frame::Body::Request(req)) => self.request(req).await,
            Some(frame::Body::Ack(ack)) => {
                self.ack(ack.envelope_ids);
                Ok(())
            }
            Some(frame::Body::Ping(p)) => {
                self.pending
                    .push(Frame::new(frame::Body::Pong(Ping { nonce: p.nonce })));
                Ok(())
            }
            Some(frame::Body::Pong(_)) => Ok(()),
            _ => Err(ProtoError::Unexpected("frame kind from a client").into()),
        }
    }

    async fn request(&mut self, req: wire::Request) -> Result<(), ConnError> {
        let ctx = RequestCtx {
            state: self.state.clone(),
            login: self.login.clone(),
            peer_ip: self.peer_ip,
            remote_static: self.channel.remote_static(),
            conn: self.shared.clone(),
        };
        if let Some(request::Body::VerifyCode(v)) = req.body {
            // Runs inline: success turns this connection into the new primary's.
            let (resp, login) = Box::pin(handlers::register::verify_code(&ctx, req.id, v)).await;
            self.pending.push(Frame::new(frame::Body::Response(resp)));
            if let Some(login) = login {
                Box::pin(self.log_in(login)).await?;
            }
            return Ok(());
        }
        let is_send = matches!(
            req.body,
            Some(request::Body::SendMessage(_) | request::Body::SendGroupMessage(_))
        );
        if let (true, Some(login)) = (is_send, &self.login)
            && let Err(e) = self.state.limits.take_send(&login.phone)
        {
            self.pending
                .push(Frame::new(frame::Body::Response(handlers::error_response(
                    req.id, e,
                ))));
            return Ok(());
        }
        if self.requests >= MAX_INFLIGHT_REQUESTS {
            let e = Error::new(
                ErrorCode::LimitExceeded,
                format!("more than {MAX_INFLIGHT_REQUESTS} requests in flight"),
            );
            self.pending
                .push(Frame::new(frame::Body::Response(handlers::error_response(
                    req.id, e,
                ))));
            return Ok(());
        }
        self.requests += 1;
        let shared = self.shared.clone();
        tokio::spawn(async move {
            let resp = handlers::handle(&ctx, req).await;
            shared.send(ConnEvent::Response(Box::new(resp)));
        });
        Ok(())
    }

    fn ack(&mut self, ids: Vec<u64>) {
        let Some(login) = self.login.clone() else {
            return;
        };
        // Ids stay in flight until their deletion is durable, so a resync cannot push them again.
        let store = self.state.store.clone();
        let shared = self.shared.clone();
        tokio::spawn(async move {
            match store.ack(&login.phone, login.device, &ids).await {
                Ok(()) => {
                    shared.send(ConnEvent::Acked(ids));
                }
                Err(e) => tracing::warn!(error = %e, "could not delete acknowledged envelopes"),
            }
        });
    }

    async fn event(&mut self, ev: ConnEvent) -> Result<(), ConnError> {
        match ev {
            ConnEvent::Envelope(env) => {
                self.shared.envelope_taken();
                if env.seq <= self.loaded_upto || self.inflight.contains(&env.seq) {
                    return Ok(());
                }
                if self.inflight.len() >= self.state.config.abuse.max_unacked_pushes {
                    self.mark_resync(env.seq);
                } else {
                    self.push_envelope(&env);
                }
            }
            ConnEvent::Resync => {
                if let Some(seq) = self.shared.take_resync_mark() {
                    self.mark_resync(seq);
                }
            }
            ConnEvent::Acked(ids) => {
                for id in ids {
                    self.inflight.remove(&id);
                }
            }
            ConnEvent::Response(resp) => {
                self.requests = self.requests.saturating_sub(1);
                self.pending.push(Frame::new(frame::Body::Response(*resp)));
            }
            ConnEvent::Push(p) => self.pending.push(Frame::new(frame::Body::Push(*p))),
            ConnEvent::Kick(reason) => {
                self.pending
                    .push(push_frame(push::Body::DeviceRemoved(DeviceRemoved {
                        reason,
                    })));
                self.login = None;
                self.closing = true;
            }
        }
        Ok(())
    }

    fn mark_resync(&mut self, seq: u64) {
        self.resync_from = Some(self.resync_from.map_or(seq, |s| s.min(seq)));
    }

    /// Loads envelopes from the store (from `from` on) and pushes those not in flight, up to the window.
    async fn resync(&mut self, from: u64) -> Result<(), ConnError> {
        let Some(login) = self.login.clone() else {
            self.resync_from = None;
            return Ok(());
        };
        self.resync_from = None;
        let mut after = from.saturating_sub(1);
        loop {
            let page = self
                .state
                .store
                .load_queue(&login.phone, login.device, after, QUEUE_PAGE)
                .await?;
            let full_page = page.len() == QUEUE_PAGE;
            for env in page {
                after = env.seq;
                self.loaded_upto = self.loaded_upto.max(env.seq);
                if self.inflight.contains(&env.seq) {
                    continue;
                }
                if self.inflight.len() >= self.state.config.abuse.max_unacked_pushes {
                    self.mark_resync(env.seq);
                    return Ok(());
                }
                self.push_envelope(&env);
            }
            if !full_page {
                break;
            }
        }
        if !self.sent_queue_empty {
            self.sent_queue_empty = true;
            self.pending
                .push(push_frame(push::Body::QueueEmpty(QueueEmpty {})));
        }
        Ok(())
    }

    fn push_envelope(&mut self, env: &QueuedEnvelope) {
        self.inflight.insert(env.seq);
        self.pending.push(push_frame(push::Body::Envelope(Envelope {
            id: env.seq,
            message_id: env.message_id.as_bytes().to_vec(),
            sender: env.sender.as_str().to_owned(),
            sender_device: env.sender_device.get(),
            server_ts_ms: env.server_ts_ms,
            olm_type: env.olm_type,
            ciphertext: env.ciphertext.clone(),
            retry_of: env
                .retry
                .map(|r| r.of.as_bytes().to_vec())
                .unwrap_or_default(),
            retry_attempt: env.retry.map_or(0, |r| r.attempt),
        })));
    }

    fn finish(&mut self) {
        self.state.presence.closed(self.shared.id);
        if let Some(login) = &self.login {
            self.state
                .router
                .unregister(&login.phone, login.device, self.shared.id);
            self.state
                .router
                .release(&login.phone, login.device, &self.shared);
            if self
                .state
                .presence
                .disconnected(&login.phone, crate::now_ms())
            {
                crate::bus::inbound::presence_changed(&self.state, &login.phone, false);
            }
            tracing::debug!(device = %login.device, "logged out");
        }
    }
}

fn push_frame(body: push::Body) -> Frame {
    Frame::new(frame::Body::Push(Push { body: Some(body) }))
}
