//! The protocol adapter: what a real client does on the wire, without the client's store.
//!
//! [`Link`] is one TCP connection after the Noise `XX` handshake and the hello (as
//! `natter_client::net::Connection::open` does them). [`register`] creates an account exactly as
//! `natter_client::Client::verify` does (RequestCode, the code from the SMS gateway's log file, VerifyCode
//! with a signed device list built with natter-crypto, then UploadKeys); [`login`] opens a new connection
//! with `ClientHello { login }`.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use natter_crypto::{AccountKey, DeviceKeys, device_list};
use natter_proto::device_list::DeviceListContent;
use natter_proto::noise::{Handshake, RecordReader, Role, SecureChannel, StaticKeypair};
use natter_proto::wire::{
    Ack, ClientHello, ErrorCode, Frame, Login, Ping, Request, RequestCode, UploadKeys, VerifyCode,
    frame, request, response,
};
use natter_proto::{DeviceId, PROTOCOL_VERSION, PhoneNumber};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Time allowed for TCP connect, handshake and hello.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// Time allowed for one setup request (registration, keys).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// One open connection: socket, record reader and Noise channel.
pub struct Link {
    stream: TcpStream,
    reader: RecordReader,
    channel: SecureChannel,
    out: Vec<u8>,
    next_id: u64,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link").finish_non_exhaustive()
    }
}

async fn read_record(stream: &mut TcpStream, reader: &mut RecordReader) -> Result<Vec<u8>> {
    for _ in 0..1_000_000 {
        if let Some(rec) = reader.next_record() {
            return Ok(rec.to_vec());
        }
        reader.buffer_mut().reserve(4096);
        let n = stream.read_buf(reader.buffer_mut()).await?;
        if n == 0 {
            bail!("the server closed the connection during the handshake");
        }
    }
    bail!("no handshake record after a million reads")
}

impl Link {
    /// Connects, runs the Noise `XX` handshake as initiator with `key`, sends the hello (logging in as
    /// `login`, or anonymous) and waits for the server's hello.
    pub async fn connect(addr: &str, key: &StaticKeypair, login: Option<Login>) -> Result<Link> {
        tokio::time::timeout(CONNECT_TIMEOUT, Self::connect_inner(addr, key, login))
            .await
            .map_err(|_| anyhow!("connecting to {addr} took over {CONNECT_TIMEOUT:?}"))?
    }

    async fn connect_inner(addr: &str, key: &StaticKeypair, login: Option<Login>) -> Result<Link> {
        let mut stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        stream.set_nodelay(true)?;
        let mut reader = RecordReader::new();
        let mut hs = Handshake::new(Role::Initiator, key)?;
        let mut out = Vec::new();
        hs.write_record(&[], &mut out)?;
        stream.write_all(&out).await?;
        let second = read_record(&mut stream, &mut reader).await?;
        if let Some(e) = natter_proto::noise::parse_refusal(&second) {
            anyhow::bail!("natterd refused the connection: {}", e.message);
        }
        hs.read_record(&second)?;
        out.clear();
        hs.write_record(&[], &mut out)?;
        let mut channel = hs.into_channel()?;
        let hello = Frame::new(frame::Body::ClientHello(ClientHello {
            protocol_version: PROTOCOL_VERSION,
            required_features: Vec::new(),
            login,
        }));
        channel.seal_frame(&hello, &mut out)?;
        stream.write_all(&out).await?;
        let mut link = Link {
            stream,
            reader,
            channel,
            out: Vec::new(),
            next_id: 1,
        };
        match link.recv().await?.body {
            Some(frame::Body::ServerHello(h)) => {
                if let Some(e) = h.error {
                    bail!(
                        "the server refused the hello: {:?}: {}",
                        e.code(),
                        e.message
                    );
                }
            }
            _ => bail!("the server's first frame is not its hello"),
        }
        Ok(link)
    }

    /// Encrypts the frames into as few records as possible and writes them in one go.
    pub async fn send(&mut self, frames: &[Frame]) -> Result<()> {
        if frames.is_empty() {
            return Ok(());
        }
        self.out.clear();
        self.channel.seal_frames(frames, &mut self.out)?;
        self.stream.write_all(&self.out).await?;
        if self.out.capacity() > 256 * 1024 {
            self.out = Vec::new();
        }
        Ok(())
    }

    /// The next frame already received and buffered, without touching the socket.
    pub fn buffered(&mut self) -> Result<Option<Frame>> {
        loop {
            if let Some(f) = self.channel.next_frame()? {
                return Ok(Some(f));
            }
            match self.reader.next_record() {
                Some(rec) => self.channel.open_record(&rec)?,
                None => return Ok(None),
            }
        }
    }

    /// The next frame. Cancel-safe: the only await point is a read into the record buffer.
    pub async fn recv(&mut self) -> Result<Frame> {
        loop {
            if let Some(f) = self.buffered()? {
                return Ok(f);
            }
            self.reader.buffer_mut().reserve(16 * 1024);
            let n = self.stream.read_buf(self.reader.buffer_mut()).await?;
            if n == 0 {
                bail!("the server closed the connection");
            }
        }
    }

    /// A fresh request id for this connection.
    pub fn next_request_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// Sends one request and waits for its response, answering pings and setting aside anything else
    /// (pushes, which setup does not need: the server keeps unacknowledged envelopes anyway).
    pub async fn request(&mut self, body: request::Body) -> Result<response::Body> {
        let id = self.next_request_id();
        let req = Frame::new(frame::Body::Request(Request {
            id,
            body: Some(body),
        }));
        self.send(&[req]).await?;
        let deadline = Instant::now() + REQUEST_TIMEOUT;
        for _ in 0..100_000 {
            let f = tokio::time::timeout_at(deadline, self.recv())
                .await
                .map_err(|_| anyhow!("no response within {REQUEST_TIMEOUT:?}"))??;
            match f.body {
                Some(frame::Body::Response(r)) if r.id == id => {
                    if let Some(e) = r.error {
                        return Err(ServerError {
                            code: e.code(),
                            message: e.message,
                        }
                        .into());
                    }
                    return r.body.ok_or_else(|| anyhow!("response without a body"));
                }
                Some(frame::Body::Ping(p)) => {
                    self.send(&[Frame::new(frame::Body::Pong(Ping { nonce: p.nonce }))])
                        .await?;
                }
                _ => {}
            }
        }
        bail!("no response among 100,000 frames")
    }

    /// Acknowledges envelopes, in frames of at most `MAX_ACK_IDS` ids.
    pub fn ack_frames(ids: &[u64]) -> Vec<Frame> {
        ids.chunks(natter_proto::limits::MAX_ACK_IDS)
            .map(|c| {
                Frame::new(frame::Body::Ack(Ack {
                    envelope_ids: c.to_vec(),
                }))
            })
            .collect()
    }
}

/// An error the server answered a request with.
#[derive(Debug)]
pub struct ServerError {
    /// Its code.
    pub code: ErrorCode,
    /// Its message.
    pub message: String,
}

impl std::fmt::Display for ServerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "server error {:?}: {}", self.code, self.message)?;
        if self.code == ErrorCode::RateLimited {
            write!(
                f,
                " (start natterd with higher --codes-per-ip-per-hour / --verifies-per-ip-per-hour)"
            )?;
        }
        Ok(())
    }
}

impl std::error::Error for ServerError {}

/// Reads registration codes from the file natterd's `file:PATH` SMS gateway appends `<number> <code>`
/// lines to. Only lines written after [`SmsLog::open`] count; the file is read incrementally.
#[derive(Debug)]
pub struct SmsLog {
    path: PathBuf,
    state: Mutex<SmsState>,
}

#[derive(Debug, Default)]
struct SmsState {
    offset: u64,
    partial: String,
    codes: HashMap<String, String>,
}

impl SmsLog {
    /// Starts reading `path` from its current end (or from the start if it does not exist yet).
    pub fn open(path: &Path) -> Result<SmsLog> {
        let offset = match std::fs::metadata(path) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(e).with_context(|| format!("{}", path.display())),
        };
        Ok(SmsLog {
            path: path.to_owned(),
            state: Mutex::new(SmsState {
                offset,
                ..SmsState::default()
            }),
        })
    }

    fn poll(&self, phone: &str) -> Result<Option<String>> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(code) = st.codes.remove(phone) {
            return Ok(Some(code));
        }
        let mut f = match std::fs::File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("{}", self.path.display())),
        };
        f.seek(SeekFrom::Start(st.offset))?;
        let mut new = String::new();
        let n = f.take(16 * 1024 * 1024).read_to_string(&mut new)?;
        st.offset += n as u64;
        st.partial.push_str(&new);
        let complete = match st.partial.rfind('\n') {
            Some(i) => {
                let rest = st.partial.split_off(i + 1);
                std::mem::replace(&mut st.partial, rest)
            }
            None => String::new(),
        };
        for line in complete.lines() {
            if let Some((number, code)) = line.split_once(' ') {
                st.codes.insert(number.to_owned(), code.trim().to_owned());
            }
        }
        Ok(st.codes.remove(phone))
    }

    /// Waits (polling every few milliseconds, at most `timeout`) for the code sent to `phone`.
    pub async fn code_for(&self, phone: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(code) = self.poll(phone)? {
                return Ok(code);
            }
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
        bail!(
            "no code for {phone} in {} within {timeout:?}: is natterd running with --sms-gateway file:{}?",
            self.path.display(),
            self.path.display()
        )
    }
}

/// A registered device, with every key the bench needs to log in and to decrypt.
pub struct Device {
    /// The account.
    pub phone: PhoneNumber,
    /// Its Noise static key (login credential).
    pub noise: StaticKeypair,
    /// The account's Ed25519 public key.
    pub account_key: [u8; 32],
    /// The Olm account.
    pub keys: DeviceKeys,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("phone", &self.phone)
            .finish_non_exhaustive()
    }
}

impl Device {
    /// The hello's login for this device (always the primary).
    pub fn login(&self) -> Login {
        Login {
            phone: self.phone.as_str().to_owned(),
            device_id: DeviceId::PRIMARY.get(),
        }
    }
}

/// Registers `phone` as a new account whose primary is a fresh device, on one anonymous connection:
/// RequestCode, the code from the SMS log, VerifyCode with a signed one-device list, then UploadKeys with
/// `one_time_keys` one-time keys and a fallback key. The connection is closed afterwards.
pub async fn register(
    addr: &str,
    sms: &SmsLog,
    phone: PhoneNumber,
    one_time_keys: usize,
) -> Result<Device> {
    let noise = StaticKeypair::generate()?;
    let account = AccountKey::generate();
    let mut keys = DeviceKeys::generate();
    let mut link = Link::connect(addr, &noise, None).await?;
    match link
        .request(request::Body::RequestCode(RequestCode {
            phone: phone.as_str().to_owned(),
        }))
        .await
        .context("RequestCode")?
    {
        response::Body::CodeSent(_) => {}
        _ => bail!("unexpected answer to RequestCode"),
    }
    let code = sms.code_for(phone.as_str(), REQUEST_TIMEOUT).await?;

    // As natter_client::Client::verify builds it.
    let account_key = account.public_key();
    let mut entry = device_list::new_device_entry(
        &keys,
        &phone,
        DeviceId::PRIMARY,
        &account_key,
        noise.public(),
        "bench",
    );
    device_list::admit_device(&account, &phone, &mut entry)?;
    let content = DeviceListContent {
        phone: phone.as_str().to_owned(),
        version: 1,
        timestamp_ms: now_ms(),
        account_key: account_key.to_vec(),
        devices: vec![entry],
    };
    let signed = device_list::sign_device_list(&account, &content);
    match link
        .request(request::Body::VerifyCode(VerifyCode {
            phone: phone.as_str().to_owned(),
            code,
            account_key: account_key.to_vec(),
            device_list: Some(signed),
        }))
        .await
        .context("VerifyCode")?
    {
        response::Body::Registered(_) => {}
        _ => bail!("unexpected answer to VerifyCode"),
    }
    // The connection is now logged in as the primary: publish prekeys on it.
    let one_time = keys.generate_one_time_keys(one_time_keys);
    let fallback = keys.generate_fallback_key();
    match link
        .request(request::Body::UploadKeys(UploadKeys {
            one_time_keys: one_time,
            fallback_key: Some(fallback),
        }))
        .await
        .context("UploadKeys")?
    {
        response::Body::KeysUploaded(_) => {}
        _ => bail!("unexpected answer to UploadKeys"),
    }
    keys.mark_keys_as_published();
    Ok(Device {
        phone,
        noise,
        account_key,
        keys,
    })
}

/// Opens a new connection logged in as `device`.
pub async fn login(addr: &str, device: &Device) -> Result<Link> {
    Link::connect(addr, &device.noise, Some(device.login())).await
}

/// What logging in needs: the account and the device's Noise key (the primary's).
#[derive(Clone)]
pub struct Credentials {
    /// The account.
    pub phone: PhoneNumber,
    /// The device's Noise static key.
    pub noise: StaticKeypair,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("phone", &self.phone)
            .finish_non_exhaustive()
    }
}

impl From<&Device> for Credentials {
    fn from(d: &Device) -> Credentials {
        Credentials {
            phone: d.phone.clone(),
            noise: d.noise.clone(),
        }
    }
}

impl Credentials {
    /// Opens a new connection logged in as this device.
    pub async fn login(&self, addr: &str) -> Result<Link> {
        let login = Login {
            phone: self.phone.as_str().to_owned(),
            device_id: DeviceId::PRIMARY.get(),
        };
        Link::connect(addr, &self.noise, Some(login)).await
    }

    /// Writes one `<number> <hex Noise private key>` line per device to `path` (mode 0600: the keys
    /// log in as these test accounts).
    pub fn save_all(path: &Path, all: &[Credentials]) -> Result<()> {
        use std::io::Write;
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut f = std::io::BufWriter::new(
            opts.open(path)
                .with_context(|| format!("creating {}", path.display()))?,
        );
        for c in all {
            let hex: String = c
                .noise
                .private()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            writeln!(f, "{} {hex}", c.phone)?;
        }
        f.flush()?;
        Ok(())
    }

    /// Reads what [`Credentials::save_all`] wrote.
    pub fn load_all(path: &Path) -> Result<Vec<Credentials>> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .enumerate()
            .map(|(i, line)| {
                let bad = || {
                    anyhow!(
                        "{}:{}: expected `<number> <64 hex digits>`",
                        path.display(),
                        i + 1
                    )
                };
                let (phone, hex) = line.split_once(' ').ok_or_else(bad)?;
                let hex = hex.trim();
                if hex.len() != 64 {
                    return Err(bad());
                }
                let mut key = [0u8; 32];
                for (j, b) in key.iter_mut().enumerate() {
                    *b = u8::from_str_radix(hex.get(2 * j..2 * j + 2).ok_or_else(bad)?, 16)
                        .map_err(|_| bad())?;
                }
                Ok(Credentials {
                    phone: PhoneNumber::from_e164(phone).map_err(|_| bad())?,
                    noise: StaticKeypair::from_private(key),
                })
            })
            .collect()
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Phone numbers unique to this run: `+19`, a 4-digit run id, a 6-digit index.
#[derive(Debug, Clone, Copy)]
pub struct Numbers {
    run: u32,
}

impl Numbers {
    /// A random run id.
    pub fn new() -> Result<Numbers> {
        let mut b = [0u8; 4];
        getrandom::fill(&mut b).map_err(|e| anyhow!("getrandom: {e}"))?;
        Ok(Numbers {
            run: u32::from_le_bytes(b) % 10_000,
        })
    }

    /// The `i`th number of the run (`i` < 1,000,000).
    pub fn get(&self, i: usize) -> Result<PhoneNumber> {
        if i >= 1_000_000 {
            bail!("at most 1,000,000 accounts per run");
        }
        Ok(PhoneNumber::from_e164(&format!(
            "+19{:04}{:06}",
            self.run, i
        ))?)
    }
}

/// Registers `count` accounts, `concurrency` at a time. Returns them in index order (`first..first+count`).
pub async fn register_many(
    addr: &str,
    sms: std::sync::Arc<SmsLog>,
    numbers: Numbers,
    first: usize,
    count: usize,
    concurrency: usize,
    one_time_keys: usize,
) -> Result<Vec<Device>> {
    let mut out: Vec<Option<Device>> = (0..count).map(|_| None).collect();
    let mut set = tokio::task::JoinSet::new();
    let mut next = 0usize;
    let mut done = 0usize;
    let started = Instant::now();
    let mut last_report = Instant::now();
    while done < count {
        while next < count && set.len() < concurrency.max(1) {
            let i = next;
            next += 1;
            let phone = numbers.get(first + i)?;
            let addr = addr.to_owned();
            let sms = sms.clone();
            set.spawn(async move { (i, register(&addr, &sms, phone, one_time_keys).await) });
        }
        let Some(joined) = set.join_next().await else {
            break;
        };
        let (i, dev) = joined?;
        out[i] = Some(dev.with_context(|| format!("registering account {}", first + i))?);
        done += 1;
        if last_report.elapsed() >= Duration::from_secs(5) {
            last_report = Instant::now();
            tracing::info!(
                done,
                count,
                per_s = format!("{:.0}", done as f64 / started.elapsed().as_secs_f64()),
                "registering"
            );
        }
    }
    out.into_iter()
        .map(|d| d.ok_or_else(|| anyhow!("an account was not registered")))
        .collect()
}
