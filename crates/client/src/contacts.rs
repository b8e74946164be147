//! Contacts and presence: importing an address book (only numbers that changed since the last import
//! are looked up), end-to-end encrypted profiles (a profile key shared with contacts and our own devices
//! over Olm, rotated when someone is blocked), privacy settings, blocking, presence and typing.
//!
//! Local state lives in the account values: `book/<number>` (registered flag and the book's name),
//! `profile/key/self` and `profile/key/<number>` (profile keys, sealed with the store cipher),
//! `profile/shared/<number>` (the key version a contact has), `profile/self` (our own profile, to
//! re-encrypt it on rotation), `privacy/read_receipts_off`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use natter_crypto::profile::ProfileKey;
use natter_proto::content::{self, Content};
use natter_proto::limits::{
    MAX_AVATAR_BYTES, MAX_DISCOVERY_BATCH, MAX_PROFILE_NAME, MAX_SHORT_TEXT,
};
use natter_proto::social::{
    Availability, Block, Discover, ForgetContacts, GetPrivacy, GetProfile, PresenceState, Privacy,
    PrivacySettings, ProfileContent, SendTyping, SetPrivacy, SetProfile, SubscribePresence,
    Visibility,
};
use natter_proto::wire::{request, response};
use natter_proto::{DeviceId, PhoneNumber};
use prost::Message;

use crate::addressbook::{MAX_BOOK_BYTES, Rejected, parse_address_book};
use crate::client::{Client, unexpected};
use crate::error::{ClientError, Result};
use crate::messaging::outbox_entry;
use crate::store::{Changes, IdentityRecord};

const BOOK: &str = "book/";
const KEY_SELF: &str = "profile/key/self";
const KEY_PEER: &str = "profile/key/";
const SHARED: &str = "profile/shared/";
const PROFILE_SELF: &str = "profile/self";
const RECEIPTS_OFF: &str = "privacy/read_receipts_off";
const WAIT: Duration = Duration::from_secs(10);

/// What an address-book import did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImportReport {
    /// Distinct valid numbers in the file.
    pub numbers: usize,
    /// Entries that could not be read (skipped, with the reason).
    pub rejected: Vec<Rejected>,
    /// Numbers sent to the server this time (new since the last import).
    pub looked_up: usize,
    /// Numbers no longer in the book (the server forgets them as contacts).
    pub removed: usize,
    /// Every number of the book that uses Natter.
    pub registered: Vec<PhoneNumber>,
    /// How many more numbers the server lets this account look up today.
    pub remaining_today: u64,
}

/// One contact as a UI lists it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Contact {
    /// The number.
    pub number: String,
    /// The name this account gave it (synced across its devices), else the address book's.
    pub name: Option<String>,
    /// Whether it uses Natter (as far as discovery or a conversation shows).
    pub on_natter: bool,
    /// The name its owner gave its profile, if it shared its profile key with us.
    pub profile_name: Option<String>,
    /// Its "about" line, likewise.
    pub about: Option<String>,
}

/// A decrypted profile.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProfileInfo {
    /// Display name.
    pub name: String,
    /// About line.
    pub about: String,
    /// Avatar JPEG (empty if none).
    pub avatar_jpeg: Vec<u8>,
}

/// Someone's presence as we may see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PresenceInfo {
    /// A device of the account is connected.
    Online,
    /// Not connected; last seen at this time (ms since epoch; 0 if unknown).
    LastSeen(u64),
    /// Their privacy settings (or a block) hide it.
    Hidden,
}

impl PresenceInfo {
    pub(crate) fn from_wire(p: &PresenceState) -> Self {
        match Availability::try_from(p.availability) {
            Ok(Availability::Online) => PresenceInfo::Online,
            Ok(Availability::Offline) => PresenceInfo::LastSeen(p.last_seen_ms),
            _ => PresenceInfo::Hidden,
        }
    }
}

fn seal_key_value(client: &Client, key: &ProfileKey, version: u64) -> Vec<u8> {
    let mut plain = zeroize::Zeroizing::new(version.to_be_bytes().to_vec());
    plain.extend_from_slice(key.bytes().as_ref());
    client.inner.cipher.encrypt(b"profile-key", &plain)
}

impl Client {
    async fn connected(&self) -> Result<std::sync::Arc<crate::net::Connection>> {
        self.connection(WAIT).await
    }

    // ---- address book ----

    /// Imports an address book (vCard 3/4 or CSV): normalises the numbers (national ones with
    /// `region`, default the region of this account's own number), looks up the numbers that are new
    /// since the last import (in batches; the server forgets those that are not registered), tells the
    /// server which numbers left the book, and shares our profile key with newly found contacts.
    pub async fn import_contacts(
        &self,
        path: &Path,
        region: Option<&str>,
        progress: &(dyn Fn(usize, usize) + Send + Sync),
    ) -> Result<ImportReport> {
        let me = self.registered_identity().await?;
        let io = |source| ClientError::Io {
            path: path.display().to_string(),
            source,
        };
        let size = std::fs::metadata(path).map_err(io)?.len();
        if size > MAX_BOOK_BYTES {
            return Err(ClientError::InvalidInput(format!(
                "{}: {size} bytes; an address book may have at most {MAX_BOOK_BYTES}",
                path.display()
            )));
        }
        let bytes = std::fs::read(path).map_err(io)?;
        let text = String::from_utf8_lossy(&bytes);
        let own_region = me.phone.region();
        let region = region.map(str::to_owned).or(own_region);
        let parsed = parse_address_book(&text, region.as_deref());

        let known: BTreeMap<String, Vec<u8>> = self
            .inner
            .store
            .values_with_prefix(BOOK)
            .await?
            .into_iter()
            .filter_map(|(k, v)| k.strip_prefix(BOOK).map(|n| (n.to_owned(), v)))
            .collect();
        let in_file: BTreeSet<String> = parsed
            .entries
            .iter()
            .map(|e| e.number.as_str().to_owned())
            .collect();
        let new: Vec<PhoneNumber> = parsed
            .entries
            .iter()
            .filter(|e| !known.contains_key(e.number.as_str()) && e.number != me.phone)
            .map(|e| e.number.clone())
            .collect();
        let removed: Vec<PhoneNumber> = known
            .keys()
            .filter(|n| !in_file.contains(*n))
            .filter_map(|n| PhoneNumber::from_e164(n).ok())
            .collect();

        let conn = self.connected().await?;
        let mut found: BTreeSet<PhoneNumber> = BTreeSet::new();
        let mut remaining_today = 0;
        let mut done = 0;
        progress(0, new.len());
        for batch in new.chunks(MAX_DISCOVERY_BATCH) {
            let answer = conn
                .request(request::Body::Discover(Discover {
                    numbers: batch.iter().map(|n| n.as_str().to_owned()).collect(),
                    remember: true,
                }))
                .await?;
            let response::Body::Discovered(d) = answer else {
                return Err(unexpected());
            };
            remaining_today = d.remaining_today;
            for n in d.registered {
                if let Ok(p) = PhoneNumber::from_e164(&n) {
                    found.insert(p);
                }
            }
            // Each batch is recorded at once, so an interrupted import resumes where it stopped.
            let names: BTreeMap<&str, &str> = parsed
                .entries
                .iter()
                .map(|e| (e.number.as_str(), e.name.as_str()))
                .collect();
            let mut changes = Changes::default();
            for n in batch {
                let mut v = vec![u8::from(found.contains(n))];
                v.extend_from_slice(names.get(n.as_str()).unwrap_or(&"").as_bytes());
                changes
                    .values
                    .push((format!("{BOOK}{}", n.as_str()), Some(v)));
            }
            self.inner.store.save_changes(changes).await?;
            done += batch.len();
            progress(done, new.len());
        }
        for batch in removed.chunks(MAX_DISCOVERY_BATCH) {
            conn.request(request::Body::ForgetContacts(ForgetContacts {
                numbers: batch.iter().map(|n| n.as_str().to_owned()).collect(),
            }))
            .await?;
            self.inner
                .store
                .save_changes(Changes {
                    values: batch
                        .iter()
                        .map(|n| (format!("{BOOK}{}", n.as_str()), None))
                        .collect(),
                    ..Changes::default()
                })
                .await?;
        }
        // Names of numbers already known may have changed: the book's names are local only.
        let mut renamed = Changes::default();
        for e in &parsed.entries {
            if let Some(v) = known.get(e.number.as_str())
                && v.get(1..) != Some(e.name.as_bytes())
            {
                let mut nv = vec![v.first().copied().unwrap_or(0)];
                nv.extend_from_slice(e.name.as_bytes());
                renamed
                    .values
                    .push((format!("{BOOK}{}", e.number.as_str()), Some(nv)));
            }
        }
        if !renamed.is_empty() {
            self.inner.store.save_changes(renamed).await?;
        }
        if !found.is_empty() {
            self.share_profile_key_with(found.iter().cloned().collect())
                .await?;
        }
        let registered = self.book_users().await?;
        Ok(ImportReport {
            numbers: parsed.entries.len(),
            rejected: parsed.rejected,
            looked_up: new.len(),
            removed: removed.len(),
            registered,
            remaining_today,
        })
    }

    /// The numbers of the imported address book that use Natter.
    async fn book_users(&self) -> Result<Vec<PhoneNumber>> {
        Ok(self
            .inner
            .store
            .values_with_prefix(BOOK)
            .await?
            .into_iter()
            .filter(|(_, v)| v.first() == Some(&1))
            .filter_map(|(k, _)| {
                k.strip_prefix(BOOK)
                    .and_then(|n| PhoneNumber::from_e164(n).ok())
            })
            .collect())
    }

    /// Contacts: the address book's Natter users, the chats this device knows and every named contact,
    /// with synced names and, where the owner shared its profile key, profile names (fetched now if the
    /// server is reachable).
    pub async fn contact_list(&self) -> Result<Vec<Contact>> {
        let mut out: BTreeMap<String, Contact> = BTreeMap::new();
        for (k, v) in self.inner.store.values_with_prefix(BOOK).await? {
            let Some(n) = k.strip_prefix(BOOK) else {
                continue;
            };
            let on = v.first() == Some(&1);
            if !on {
                continue;
            }
            let name = String::from_utf8_lossy(v.get(1..).unwrap_or_default()).into_owned();
            out.insert(
                n.to_owned(),
                Contact {
                    number: n.to_owned(),
                    name: (!name.is_empty()).then_some(name),
                    on_natter: true,
                    ..Contact::default()
                },
            );
        }
        for (number, synced) in self.contacts().await? {
            let e = out.entry(number.clone()).or_insert_with(|| Contact {
                number: number.clone(),
                ..Contact::default()
            });
            if synced.is_some() {
                e.name = synced;
            }
            if let Ok(p) = PhoneNumber::from_e164(&number)
                && !self.inner.store.history(&p).await?.is_empty()
            {
                e.on_natter = true;
            }
        }
        let online = self.is_connected();
        for c in out.values_mut() {
            let Ok(p) = PhoneNumber::from_e164(&c.number) else {
                continue;
            };
            if online && let Ok(Some(profile)) = self.profile(&p).await {
                c.profile_name = Some(profile.name).filter(|n| !n.is_empty());
                c.about = Some(profile.about).filter(|a| !a.is_empty());
            }
        }
        Ok(out.into_values().collect())
    }

    // ---- profiles ----

    async fn own_key(&self) -> Result<Option<(ProfileKey, u64)>> {
        self.stored_key(KEY_SELF).await
    }

    async fn stored_key(&self, name: &str) -> Result<Option<(ProfileKey, u64)>> {
        let Some(sealed) = self.inner.store.value(name).await? else {
            return Ok(None);
        };
        let plain = self.inner.cipher.decrypt(b"profile-key", &sealed)?;
        let (version, key) = plain.split_at_checked(8).ok_or_else(|| {
            ClientError::Store(crate::store::StoreError::Corrupt("profile key".into()))
        })?;
        let version = u64::from_be_bytes(version.try_into().map_err(|_| unexpected())?);
        Ok(Some((ProfileKey::from_slice(key)?, version)))
    }

    /// Sets this account's profile (name, about, avatar picture scaled down to a small JPEG), encrypted
    /// with the profile key; `None` keeps a field as it is.
    pub async fn set_profile(
        &self,
        name: Option<&str>,
        about: Option<&str>,
        avatar: Option<&Path>,
    ) -> Result<()> {
        let mut profile = match self.inner.store.value(PROFILE_SELF).await? {
            Some(b) => ProfileContent::decode(b.as_slice()).unwrap_or_default(),
            None => ProfileContent::default(),
        };
        if let Some(n) = name {
            let n = n.trim();
            if n.len() > MAX_PROFILE_NAME {
                return Err(ClientError::InvalidInput(format!(
                    "a profile name has at most {MAX_PROFILE_NAME} bytes"
                )));
            }
            profile.name = n.to_owned();
        }
        if let Some(a) = about {
            if a.len() > MAX_SHORT_TEXT {
                return Err(ClientError::InvalidInput(format!(
                    "the about line has at most {MAX_SHORT_TEXT} bytes"
                )));
            }
            profile.about = a.trim().to_owned();
        }
        if let Some(path) = avatar {
            profile.avatar_jpeg = avatar_jpeg(path)?;
        }
        let key = match self.own_key().await? {
            Some(k) => k,
            None => (ProfileKey::generate(), 1),
        };
        self.upload_profile(&profile, &key.0, key.1).await?;
        let me = self.registered_identity().await?;
        let mut contacts = self.book_users().await?;
        contacts.push(me.phone.clone());
        self.share_profile_key_with(contacts).await
    }

    async fn upload_profile(
        &self,
        profile: &ProfileContent,
        key: &ProfileKey,
        version: u64,
    ) -> Result<()> {
        let me = self.registered_identity().await?;
        let encoded = profile.encode_to_vec();
        let conn = self.connected().await?;
        conn.request(request::Body::SetProfile(SetProfile {
            ciphertext: key.seal(&me.phone, &encoded),
        }))
        .await?;
        self.inner
            .store
            .save_changes(Changes {
                values: vec![
                    (PROFILE_SELF.into(), Some(encoded)),
                    (KEY_SELF.into(), Some(seal_key_value(self, key, version))),
                ],
                ..Changes::default()
            })
            .await?;
        Ok(())
    }

    /// Sends our profile key to these accounts (each at most once per key version) over Olm; our own
    /// number in the list reaches our other devices.
    async fn share_profile_key_with(&self, peers: Vec<PhoneNumber>) -> Result<()> {
        let Some((key, version)) = self.own_key().await? else {
            return Ok(()); // no profile yet: nothing to share
        };
        let mut changes = Changes::default();
        let now = crate::now_ms();
        for peer in peers {
            let shared = self
                .inner
                .store
                .value(&format!("{SHARED}{}", peer.as_str()))
                .await?
                .and_then(|v| v.try_into().ok().map(u64::from_be_bytes));
            if shared == Some(version) {
                continue;
            }
            let id = crate::random_message_id()?;
            let content = Content {
                message_id: id.as_bytes().to_vec(),
                sent_at_ms: now,
                body: Some(content::content::Body::ProfileKey(content::ProfileKey {
                    key: key.bytes().to_vec(),
                    version,
                })),
                conversation: String::new(),
            };
            changes
                .outbox
                .push(outbox_entry(id, id, peer.clone(), &content, now));
            changes.values.push((
                format!("{SHARED}{}", peer.as_str()),
                Some(version.to_be_bytes().to_vec()),
            ));
        }
        if changes.is_empty() {
            return Ok(());
        }
        self.inner.store.save_changes(changes).await?;
        if self.is_connected() {
            self.spawn_outbox_flush();
        }
        Ok(())
    }

    /// A profile key arrived (from a contact, or ours from another of our devices).
    pub(crate) fn profile_key_received(
        &self,
        me: &IdentityRecord,
        sender: &PhoneNumber,
        device: DeviceId,
        k: &content::ProfileKey,
        changes: &mut Changes,
        current: Option<u64>,
    ) {
        if *sender == me.phone && device == me.device_id {
            return;
        }
        let Ok(key) = ProfileKey::from_slice(&k.key) else {
            tracing::warn!("dropping a malformed profile key");
            return;
        };
        if current.is_some_and(|v| v >= k.version) {
            return; // an older (or the same) key never replaces a newer one
        }
        let name = if *sender == me.phone {
            KEY_SELF.to_owned()
        } else {
            format!("{KEY_PEER}{}", sender.as_str())
        };
        changes
            .values
            .push((name, Some(seal_key_value(self, &key, k.version))));
    }

    /// The version of the profile key we hold for `sender` (ours if it is our own number).
    pub(crate) async fn profile_key_version(
        &self,
        me: &IdentityRecord,
        sender: &PhoneNumber,
    ) -> Result<Option<u64>> {
        let name = if *sender == me.phone {
            KEY_SELF.to_owned()
        } else {
            format!("{KEY_PEER}{}", sender.as_str())
        };
        Ok(self.stored_key(&name).await?.map(|(_, v)| v))
    }

    /// An account's profile, decrypted with the key its owner shared with us; `None` if it has not
    /// shared one or has no profile.
    pub async fn profile(&self, phone: &PhoneNumber) -> Result<Option<ProfileInfo>> {
        let me = self.registered_identity().await?;
        let key = if *phone == me.phone {
            self.own_key().await?
        } else {
            self.stored_key(&format!("{KEY_PEER}{}", phone.as_str()))
                .await?
        };
        let conn = self.connected().await?;
        let answer = conn
            .request(request::Body::GetProfile(GetProfile {
                phone: phone.as_str().to_owned(),
            }))
            .await?;
        let response::Body::Profile(p) = answer else {
            return Err(unexpected());
        };
        let Some((key, _)) = key else {
            return Ok(None);
        };
        if p.ciphertext.is_empty() {
            return Ok(None);
        }
        let plain = key.open(phone, &p.ciphertext)?;
        let c = ProfileContent::decode(plain.as_slice())
            .map_err(|e| ClientError::InvalidInput(format!("{phone}'s profile: {e}")))?;
        Ok(Some(ProfileInfo {
            name: c.name.chars().take(MAX_PROFILE_NAME).collect(),
            about: c.about.chars().take(MAX_SHORT_TEXT).collect(),
            avatar_jpeg: c.avatar_jpeg,
        }))
    }

    /// Rotates the profile key: a new key, the profile re-encrypted and uploaded, the key shared with
    /// every contact except the blocked ones (who keep only the old key, which opens nothing new).
    async fn rotate_profile_key(&self) -> Result<()> {
        let Some((_, version)) = self.own_key().await? else {
            return Ok(());
        };
        let profile = match self.inner.store.value(PROFILE_SELF).await? {
            Some(b) => ProfileContent::decode(b.as_slice()).unwrap_or_default(),
            None => ProfileContent::default(),
        };
        let key = ProfileKey::generate();
        self.upload_profile(&profile, &key, version + 1).await?;
        let blocked: BTreeSet<String> = self.privacy().await?.blocked.into_iter().collect();
        let me = self.registered_identity().await?;
        let mut peers: Vec<PhoneNumber> = self
            .inner
            .store
            .values_with_prefix(SHARED)
            .await?
            .into_iter()
            .filter_map(|(k, _)| k.strip_prefix(SHARED).map(str::to_owned))
            .filter(|n| !blocked.contains(n))
            .filter_map(|n| PhoneNumber::from_e164(&n).ok())
            .collect();
        if !peers.contains(&me.phone) {
            peers.push(me.phone.clone());
        }
        self.share_profile_key_with(peers).await
    }

    // ---- privacy and blocking ----

    /// The account's privacy settings and blocked numbers, from the server.
    pub async fn privacy(&self) -> Result<Privacy> {
        let conn = self.connected().await?;
        let answer = conn
            .request(request::Body::GetPrivacy(GetPrivacy {}))
            .await?;
        let response::Body::Privacy(p) = answer else {
            return Err(unexpected());
        };
        let off = p.settings.as_ref().is_some_and(|s| s.read_receipts_off);
        self.inner
            .store
            .save_changes(Changes {
                values: vec![(RECEIPTS_OFF.into(), Some(vec![u8::from(off)]))],
                ..Changes::default()
            })
            .await?;
        Ok(p)
    }

    async fn update_privacy(&self, change: impl FnOnce(&mut PrivacySettings)) -> Result<()> {
        let mut settings = self.privacy().await?.settings.unwrap_or_default();
        change(&mut settings);
        let conn = self.connected().await?;
        conn.request(request::Body::SetPrivacy(SetPrivacy {
            settings: Some(settings.clone()),
        }))
        .await?;
        self.inner
            .store
            .save_changes(Changes {
                values: vec![(
                    RECEIPTS_OFF.into(),
                    Some(vec![u8::from(settings.read_receipts_off)]),
                )],
                ..Changes::default()
            })
            .await?;
        Ok(())
    }

    /// Who sees when this account is online or was last seen.
    pub async fn set_last_seen_visibility(&self, v: Visibility) -> Result<()> {
        self.update_privacy(|s| s.last_seen = v as i32).await
    }

    /// Turns read receipts on or off: off, none are sent and none are shown.
    pub async fn set_read_receipts(&self, on: bool) -> Result<()> {
        self.update_privacy(|s| s.read_receipts_off = !on).await
    }

    /// Whether read receipts are off (as last learnt from the server).
    pub async fn read_receipts_off(&self) -> Result<bool> {
        Ok(self.inner.store.value(RECEIPTS_OFF).await?.as_deref() == Some(&[1]))
    }

    /// Blocks (or unblocks) an account: the server refuses its messages, presence and profile requests
    /// from then on, and a block rotates our profile key so that it reads no new profile.
    pub async fn block(&self, phone: &PhoneNumber, blocked: bool) -> Result<()> {
        let me = self.registered_identity().await?;
        if *phone == me.phone {
            return Err(ClientError::InvalidInput(
                "you cannot block yourself".into(),
            ));
        }
        let conn = self.connected().await?;
        conn.request(request::Body::Block(Block {
            phone: phone.as_str().to_owned(),
            blocked,
        }))
        .await?;
        if blocked {
            self.rotate_profile_key().await?;
        } else {
            self.share_profile_key_with(vec![phone.clone()]).await?;
        }
        Ok(())
    }

    // ---- presence and typing ----

    /// An account's presence as we may see it; the server then pushes changes
    /// ([`crate::Event::Presence`]) for as long as this connection lasts.
    pub async fn presence(&self, phone: &PhoneNumber) -> Result<PresenceInfo> {
        let conn = self.connected().await?;
        let answer = conn
            .request(request::Body::SubscribePresence(SubscribePresence {
                phone: phone.as_str().to_owned(),
            }))
            .await?;
        let response::Body::Presence(p) = answer else {
            return Err(unexpected());
        };
        Ok(PresenceInfo::from_wire(&p))
    }

    /// Tells a chat partner we are typing (or stopped); nothing is stored anywhere.
    pub async fn set_typing(&self, to: &PhoneNumber, typing: bool) -> Result<()> {
        let conn = self.connected().await?;
        conn.request(request::Body::SendTyping(SendTyping {
            to: to.as_str().to_owned(),
            typing,
        }))
        .await?;
        Ok(())
    }
}

/// Reads a picture and scales it into a JPEG of at most [`MAX_AVATAR_BYTES`].
fn avatar_jpeg(path: &Path) -> Result<Vec<u8>> {
    let img = image::ImageReader::open(path)
        .and_then(|r| r.with_guessed_format())
        .map_err(|source| ClientError::Io {
            path: path.display().to_string(),
            source,
        })?
        .decode()
        .map_err(|e| {
            ClientError::InvalidInput(format!("{}: not a picture: {e}", path.display()))
        })?;
    for (side, quality) in [(512, 85), (384, 80), (256, 75), (160, 70), (96, 60)] {
        let small = img.thumbnail(side, side).to_rgb8();
        let mut out = Vec::new();
        let enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality);
        small
            .write_with_encoder(enc)
            .map_err(|e| ClientError::InvalidInput(format!("avatar: {e}")))?;
        if out.len() <= MAX_AVATAR_BYTES {
            return Ok(out);
        }
    }
    Err(ClientError::InvalidInput(
        "the picture does not fit an avatar even when scaled down".into(),
    ))
}
