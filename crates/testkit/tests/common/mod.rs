//! Shared by the integration tests: a device that speaks the wire protocol directly (its keys are the
//! test's, so the test can send exactly what it wants: a retried `SendMessage`, a ciphertext nobody can
//! decrypt), and small helpers.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use natter_client::ClientError;
use natter_client::net::{ConnectOptions, Connection};
use natter_crypto::{AccountKey, DeviceKeys, OlmCiphertext, OlmSession, device_list};
use natter_proto::content::{self, Content, Text};
use natter_proto::device_list::DeviceListContent;
use natter_proto::noise::StaticKeypair;
use natter_proto::wire::{
    ClaimKeys, DeviceMessage, Envelope, GetDevices, Login, Push, RequestCode, SendMessage, Sent,
    UploadKeys, VerifyCode, push, request, response,
};
use natter_proto::{DeviceId, MessageId, PhoneNumber};
use natter_testkit::TestServer;
use prost::Message;
use tokio::sync::mpsc;

/// A safety net only: every wait ends as soon as its condition holds.
pub const WAIT: Duration = Duration::from_secs(20);

/// 16 random bytes.
pub fn random_id() -> MessageId {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).unwrap();
    MessageId::from_bytes(b)
}

/// A registered primary device whose keys the test holds, logged in over a real Noise connection.
pub struct RawDevice {
    pub phone: PhoneNumber,
    pub device: DeviceKeys,
    /// The device's Noise key: its login credential.
    pub noise: StaticKeypair,
    pub conn: Connection,
    pub pushes: mpsc::UnboundedReceiver<Push>,
    /// Outbound sessions by peer account (device 1).
    pub sessions: HashMap<PhoneNumber, OlmSession>,
}

impl RawDevice {
    /// Registers `phone` on `server` the way a client does: fresh keys, a code from the SMS log, a
    /// signed one-device list, and published prekeys. The connection stays logged in as the primary.
    pub async fn register(server: &TestServer, phone: &str) -> RawDevice {
        let phone = PhoneNumber::parse(phone).unwrap();
        let account = AccountKey::generate();
        let mut device = DeviceKeys::generate();
        let noise = StaticKeypair::generate().unwrap();
        let addr = server.addr();
        let (conn, pushes) = Connection::open(ConnectOptions {
            addr: &addr,
            noise_key: &noise,
            pinned_server_key: None,
            login: None,
        })
        .await
        .expect("anonymous connection");
        let resp = conn
            .request(request::Body::RequestCode(RequestCode {
                phone: phone.as_str().to_owned(),
            }))
            .await
            .expect("code requested");
        assert!(matches!(resp, response::Body::CodeSent(_)));
        let code = server
            .last_code(phone.as_str())
            .expect("code in the SMS log");
        let mut entry = device_list::new_device_entry(
            &device,
            &phone,
            DeviceId::PRIMARY,
            &account.public_key(),
            noise.public(),
            "raw",
        );
        device_list::admit_device(&account, &phone, &mut entry).unwrap();
        let content = DeviceListContent {
            phone: phone.as_str().to_owned(),
            version: 1,
            timestamp_ms: 1,
            account_key: account.public_key().to_vec(),
            devices: vec![entry],
        };
        let signed = device_list::sign_device_list(&account, &content);
        let resp = conn
            .request(request::Body::VerifyCode(VerifyCode {
                phone: phone.as_str().to_owned(),
                code,
                account_key: account.public_key().to_vec(),
                device_list: Some(signed),
            }))
            .await
            .expect("registered");
        assert!(matches!(resp, response::Body::Registered(_)));
        let one_time_keys = device.generate_one_time_keys(20);
        let fallback_key = Some(device.generate_fallback_key());
        conn.request(request::Body::UploadKeys(UploadKeys {
            one_time_keys,
            fallback_key,
        }))
        .await
        .expect("keys uploaded");
        device.mark_keys_as_published();
        RawDevice {
            phone,
            device,
            noise,
            conn,
            pushes,
            sessions: HashMap::new(),
        }
    }

    /// Logs in again on a new connection, as a client does after losing one (the server closes the old
    /// connection when the new one logs in).
    pub async fn reconnect(&mut self, server: &TestServer) {
        let addr = server.addr();
        let (conn, pushes) = Connection::open(ConnectOptions {
            addr: &addr,
            noise_key: &self.noise,
            pinned_server_key: None,
            login: Some(Login {
                phone: self.phone.as_str().to_owned(),
                device_id: 1,
            }),
        })
        .await
        .expect("login");
        self.conn = conn;
        self.pushes = pushes;
    }

    /// Device 1's identity keys (Curve25519, Ed25519) from `peer`'s signed list, verified against the
    /// account key the server gives (the test trusts it on first use, as a client does).
    pub async fn peer_keys(&self, peer: &PhoneNumber) -> ([u8; 32], [u8; 32]) {
        let resp = self
            .conn
            .request(request::Body::GetDevices(GetDevices {
                phone: peer.as_str().to_owned(),
            }))
            .await
            .unwrap();
        let response::Body::Devices(d) = resp else {
            panic!("unexpected response")
        };
        let key: [u8; 32] = d.account_key.as_slice().try_into().unwrap();
        let list =
            natter_crypto::verify_device_list(&key, peer, d.device_list.as_ref().unwrap(), 0)
                .unwrap();
        let entry = list.device(DeviceId::PRIMARY).unwrap();
        (
            entry.identity_curve.as_slice().try_into().unwrap(),
            entry.identity_ed.as_slice().try_into().unwrap(),
        )
    }

    /// Encrypts `plaintext` to `peer`'s device 1, creating an outbound session on first use.
    pub async fn encrypt_to(&mut self, peer: &PhoneNumber, plaintext: &[u8]) -> OlmCiphertext {
        if !self.sessions.contains_key(peer) {
            let (curve, ed) = self.peer_keys(peer).await;
            let resp = self
                .conn
                .request(request::Body::ClaimKeys(ClaimKeys {
                    phone: peer.as_str().to_owned(),
                    device_ids: vec![1],
                }))
                .await
                .unwrap();
            let response::Body::ClaimedKeys(keys) = resp else {
                panic!("unexpected response")
            };
            let pk = keys.keys[0].prekey.clone().unwrap();
            let session = self
                .device
                .create_outbound_session(&curve, &ed, &pk)
                .unwrap();
            self.sessions.insert(peer.clone(), session);
        }
        self.sessions
            .get_mut(peer)
            .unwrap()
            .encrypt(plaintext)
            .unwrap()
    }

    /// A text `Content` with logical id `id`.
    pub fn text(id: MessageId, body: &str) -> Vec<u8> {
        Content {
            message_id: id.as_bytes().to_vec(),
            sent_at_ms: 1,
            body: Some(content::content::Body::Text(Text { body: body.into() })),
            conversation: String::new(),
        }
        .encode_to_vec()
    }

    /// A `SendMessage` of one ciphertext to `peer`'s device 1.
    pub fn send_request(
        transport: MessageId,
        peer: &PhoneNumber,
        ct: &OlmCiphertext,
    ) -> SendMessage {
        SendMessage {
            message_id: transport.as_bytes().to_vec(),
            recipient: peer.as_str().to_owned(),
            messages: vec![DeviceMessage {
                phone: peer.as_str().to_owned(),
                device_id: 1,
                olm_type: ct.olm_type,
                ciphertext: ct.body.clone(),
            }],
            retry_of: Vec::new(),
            retry_attempt: 0,
        }
    }

    /// Sends a request and returns the server's `Sent`.
    pub async fn send(&self, req: SendMessage) -> Result<Sent, ClientError> {
        match self.conn.request(request::Body::SendMessage(req)).await? {
            response::Body::Sent(s) => Ok(s),
            _ => panic!("unexpected response"),
        }
    }

    /// The next envelope pushed to this device, acknowledged.
    pub async fn next_envelope(&mut self) -> Envelope {
        tokio::time::timeout(WAIT, async {
            loop {
                let p = self.pushes.recv().await.expect("connection open");
                if let Some(push::Body::Envelope(e)) = p.body {
                    self.conn.ack(vec![e.id]).unwrap();
                    return e;
                }
            }
        })
        .await
        .expect("an envelope within the timeout")
    }

    /// Decrypts an envelope from `sender`'s device 1 (a pre-key message opens a new inbound session,
    /// which then becomes the one used to answer).
    pub async fn decrypt(&mut self, sender: &PhoneNumber, env: &Envelope) -> Content {
        let msg = OlmCiphertext {
            olm_type: env.olm_type,
            body: env.ciphertext.clone(),
        };
        if let Some(s) = self.sessions.get_mut(sender)
            && let Ok(pt) = s.decrypt(&msg)
        {
            return Content::decode(pt.as_slice()).unwrap();
        }
        let (curve, _) = self.peer_keys(sender).await;
        let (session, pt) = self
            .device
            .create_inbound_session(&curve, &msg)
            .expect("a pre-key message from the sender");
        self.sessions.insert(sender.clone(), session);
        Content::decode(pt.as_slice()).unwrap()
    }
}

/// Every file under `dir`, with its bytes.
pub fn files_under(dir: &Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    walkdir::WalkDir::new(dir)
        .into_iter()
        .map(|e| e.expect("walk"))
        .filter(|e| e.file_type().is_file())
        .map(|e| {
            let bytes = std::fs::read(e.path()).expect("read");
            (e.path().to_path_buf(), bytes)
        })
        .collect()
}

/// Whether `needle` occurs in `hay`.
pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}
