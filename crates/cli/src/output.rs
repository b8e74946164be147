//! Human and JSON output. JSON is one object per line; the field names are a contract for scripts.

use natter_client::{DeviceInfo, LinkedDevice, MessageKind, MessageRecord, MessageStatus, WhoAmI};
use natter_proto::{MessageId, PhoneNumber};
use serde_json::json;

/// Prints a line on stdout; a closed stdout (`natter recv | head`) ends the program quietly instead of
/// panicking.
macro_rules! say {
    ($($arg:tt)*) => {
        $crate::output::write_line(&format!($($arg)*))
    };
}

/// Writes one line to stdout, exiting quietly if the reader went away.
pub fn write_line(line: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
        std::process::exit(0);
    }
}

/// Prints results in the chosen format.
pub struct Printer {
    json: bool,
    me: Option<PhoneNumber>,
    /// Starred messages (app-state sync), marked in history output.
    starred: std::collections::HashSet<MessageId>,
}

fn status_word(s: MessageStatus) -> &'static str {
    match s {
        MessageStatus::Pending => "pending",
        MessageStatus::Sent => "sent",
        MessageStatus::Delivered => "delivered",
        MessageStatus::Read => "read",
        MessageStatus::Received => "received",
        MessageStatus::Failed => "failed",
    }
}

fn status_mark(s: MessageStatus) -> &'static str {
    match s {
        MessageStatus::Pending => "…",
        MessageStatus::Sent => "✓",
        MessageStatus::Delivered => "✓✓",
        MessageStatus::Read => "✓✓ read",
        MessageStatus::Received => "",
        MessageStatus::Failed => "✗ not sent",
    }
}

fn kind_word(k: MessageKind) -> &'static str {
    match k {
        MessageKind::Text => "text",
        MessageKind::Undecryptable => "undecryptable",
        MessageKind::Notice => "notice",
        MessageKind::Media => "media",
    }
}

fn media_kind_word(kind: i32) -> &'static str {
    use natter_proto::content::MediaKind;
    match MediaKind::try_from(kind) {
        Ok(MediaKind::Image) => "image",
        Ok(MediaKind::Video) => "video",
        Ok(MediaKind::Voice) => "voice",
        _ => "file",
    }
}

/// A size for people: `1.2 MB`, `340 KB`, `12 B`.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KB", "MB", "GB", "TB"];
    if bytes < 1000 {
        return format!("{bytes} B");
    }
    let mut v = bytes as f64 / 1000.0;
    let mut unit = 0;
    while v >= 1000.0 && unit + 1 < UNITS.len() {
        v /= 1000.0;
        unit += 1;
    }
    if v < 10.0 {
        format!("{v:.1} {}", UNITS[unit])
    } else {
        format!("{v:.0} {}", UNITS[unit])
    }
}

/// `YYYY-MM-DD HH:MM` in UTC for a millisecond timestamp.
pub fn format_time(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}",
        rem / 3600,
        (rem % 3600) / 60
    )
}

fn ts(m: &MessageRecord) -> u64 {
    if m.server_ts_ms > 0 {
        m.server_ts_ms
    } else {
        m.sent_at_ms
    }
}

impl Printer {
    /// A printer for text (`json == false`) or JSON lines.
    pub fn new(json: bool, me: Option<PhoneNumber>) -> Self {
        Self {
            json,
            me,
            starred: Default::default(),
        }
    }

    /// The starred messages to mark in history output.
    pub fn set_starred(&mut self, ids: Vec<MessageId>) {
        self.starred = ids.into_iter().collect();
    }

    /// An app-state change was made (and synced to the account's devices).
    pub fn done(&self) {
        if self.json {
            say!("{}", json!({"status": "ok"}));
        } else {
            say!("✓ done");
        }
    }

    /// Contacts: number, name (synced, else the address book's), whether they use Natter, profile.
    pub fn contacts(&self, contacts: &[natter_client::Contact]) {
        for c in contacts {
            if self.json {
                say!(
                    "{}",
                    json!({
                        "number": c.number,
                        "name": c.name,
                        "on_natter": c.on_natter,
                        "profile_name": c.profile_name,
                        "about": c.about,
                    })
                );
            } else {
                let mut line = format!("{}  {}", c.number, c.name.as_deref().unwrap_or(""));
                if let Some(p) = &c.profile_name {
                    line.push_str(&format!("  ~{p}"));
                }
                if let Some(a) = &c.about {
                    line.push_str(&format!("  \"{a}\""));
                }
                if !c.on_natter {
                    line.push_str("  (not on Natter)");
                }
                say!("{}", line.trim_end());
            }
        }
    }

    /// What an address-book import did; skipped entries go to stderr.
    pub fn import_report(&self, r: &natter_client::ImportReport) {
        for rej in &r.rejected {
            eprintln!(
                "natter: line {}: skipped {:?}: {}",
                rej.line, rej.text, rej.reason
            );
        }
        if self.json {
            say!(
                "{}",
                json!({
                    "numbers": r.numbers,
                    "skipped": r.rejected.len(),
                    "looked_up": r.looked_up,
                    "removed": r.removed,
                    "on_natter": r.registered.iter().map(|p| p.as_str()).collect::<Vec<_>>(),
                    "remaining_today": r.remaining_today,
                })
            );
        } else {
            say!(
                "{} numbers ({} skipped), {} looked up, {} removed; {} use Natter",
                r.numbers,
                r.rejected.len(),
                r.looked_up,
                r.removed,
                r.registered.len()
            );
            for p in &r.registered {
                say!("  {p}");
            }
        }
    }

    /// A profile (or that there is none we can read).
    pub fn profile(&self, phone: &PhoneNumber, p: Option<&natter_client::ProfileInfo>) {
        if self.json {
            say!(
                "{}",
                json!({
                    "number": phone.as_str(),
                    "name": p.map(|p| p.name.as_str()),
                    "about": p.map(|p| p.about.as_str()),
                    "avatar_bytes": p.map_or(0, |p| p.avatar_jpeg.len()),
                })
            );
        } else {
            match p {
                Some(p) => {
                    say!("{phone}  {}", p.name);
                    if !p.about.is_empty() {
                        say!("  about: {}", p.about);
                    }
                    if !p.avatar_jpeg.is_empty() {
                        say!("  avatar: {} bytes", p.avatar_jpeg.len());
                    }
                }
                None => say!("{phone}: no profile shared with this account"),
            }
        }
    }

    /// Someone's presence.
    pub fn presence(&self, phone: &PhoneNumber, p: natter_client::PresenceInfo) {
        use natter_client::PresenceInfo;
        if self.json {
            let (state, last_seen) = match p {
                PresenceInfo::Online => ("online", None),
                PresenceInfo::LastSeen(t) => ("offline", (t > 0).then_some(t)),
                PresenceInfo::Hidden => ("hidden", None),
            };
            say!(
                "{}",
                json!({"number": phone.as_str(), "presence": state, "last_seen": last_seen})
            );
        } else {
            say!("{phone}  {}", presence_words(p));
        }
    }

    /// Privacy settings and blocked numbers.
    pub fn privacy(&self, p: &natter_proto::social::Privacy) {
        let s = p.settings.clone().unwrap_or_default();
        let last_seen = match natter_proto::social::Visibility::try_from(s.last_seen) {
            Ok(natter_proto::social::Visibility::Contacts) => "contacts",
            Ok(natter_proto::social::Visibility::Nobody) => "nobody",
            _ => "everyone",
        };
        if self.json {
            say!(
                "{}",
                json!({
                    "last_seen": last_seen,
                    "read_receipts": !s.read_receipts_off,
                    "blocked": p.blocked,
                })
            );
        } else {
            say!("last seen: {last_seen}");
            say!(
                "read receipts: {}",
                if s.read_receipts_off { "off" } else { "on" }
            );
            for b in &p.blocked {
                say!("blocked: {b}");
            }
        }
    }

    /// Chats with their settings.
    pub fn chats(&self, chats: &[natter_client::appstate::ChatSettings]) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        for c in chats {
            let muted = c.muted_until_ms > now;
            if self.json {
                say!(
                    "{}",
                    json!({
                        "chat": c.chat,
                        "pinned": c.pinned,
                        "muted": muted,
                        "muted_until": if muted { json!(c.muted_until_ms) } else { serde_json::Value::Null },
                        "archived": c.archived,
                        "unread": c.unread,
                        "messages": c.messages,
                        "last_message": if c.messages > 0 { json!(c.last_message_ms) } else { serde_json::Value::Null },
                    })
                );
            } else {
                let mut flags = Vec::new();
                if c.pinned {
                    flags.push("pinned".to_owned());
                }
                if muted {
                    flags.push("muted".to_owned());
                }
                if c.archived {
                    flags.push("archived".to_owned());
                }
                if c.unread > 0 {
                    flags.push(format!("{} unread", c.unread));
                }
                if c.messages > 0 {
                    flags.push(format!(
                        "{} message{}",
                        c.messages,
                        if c.messages == 1 { "" } else { "s" }
                    ));
                }
                say!("{}  {}", c.chat, flags.join(", "));
            }
        }
    }

    fn message_json(&self, m: &MessageRecord) -> serde_json::Value {
        let from = match (&self.me, m.from_me) {
            (Some(me), true) => json!(me.as_str()),
            (None, true) => serde_json::Value::Null,
            (_, false) => json!(m.chat.as_str()),
        };
        let mut v = json!({
            "id": m.id.to_hex(),
            "chat": m.chat.as_str(),
            "from": from,
            "from_me": m.from_me,
            "device": m.sender_device.get(),
            "kind": kind_word(m.kind),
            "text": m.text,
            "ts": ts(m),
            "sent_at": m.sent_at_ms,
            "status": status_word(m.status),
        });
        if self.starred.contains(&m.id)
            && let Some(obj) = v.as_object_mut()
        {
            obj.insert("starred".into(), json!(true));
        }
        if let (Some(media), Some(obj)) = (&m.media, v.as_object_mut()) {
            use base64::Engine;
            let media = &media.0;
            obj.insert("kind".into(), json!(media_kind_word(media.kind)));
            obj.insert("name".into(), json!(media.name));
            obj.insert("size".into(), json!(media.size));
            obj.insert("mime".into(), json!(media.mime));
            obj.insert("caption".into(), json!(media.caption));
            obj.insert(
                "thumbnail".into(),
                json!(base64::engine::general_purpose::STANDARD.encode(&media.thumbnail)),
            );
            obj.insert("duration_ms".into(), json!(media.duration_ms));
            obj.insert("width".into(), json!(media.width));
            obj.insert("height".into(), json!(media.height));
        }
        v
    }

    fn line(m: &MessageRecord) -> String {
        let who = if m.from_me {
            "me".to_string()
        } else {
            m.chat.to_string()
        };
        match m.kind {
            MessageKind::Text => format!("[{}] {who}: {}", format_time(ts(m)), m.text),
            MessageKind::Undecryptable => format!(
                "[{}] {who}: ⚠ could not decrypt this message (the sender's device may need to send it again)",
                format_time(ts(m))
            ),
            MessageKind::Notice => format!("[{}] ⚠ {}", format_time(ts(m)), m.text),
            MessageKind::Media => {
                let (name, size, caption) = match &m.media {
                    Some(media) => (
                        media.0.name.as_str(),
                        media.0.size,
                        media.0.caption.as_str(),
                    ),
                    None => ("?", 0, ""),
                };
                let caption = if caption.is_empty() {
                    String::new()
                } else {
                    format!(" \"{caption}\"")
                };
                format!(
                    "[{}] {who}: 📎 {name} ({}){caption}",
                    format_time(ts(m)),
                    human_size(size)
                )
            }
        }
    }

    /// A message printed by `recv`.
    pub fn message(&self, m: &MessageRecord) {
        if self.json {
            say!("{}", self.message_json(m));
        } else {
            let chat = if m.from_me {
                format!(" (to {})", m.chat)
            } else {
                String::new()
            };
            say!("{}{chat}", Self::line(m));
        }
    }

    /// A line of `chat`.
    pub fn chat_line(&self, m: &MessageRecord) {
        if self.json {
            say!("{}", self.message_json(m));
        } else {
            say!("{}", Self::line(m));
        }
    }

    /// An entry of `history`.
    pub fn history_entry(&self, m: &MessageRecord) {
        if self.json {
            say!("{}", self.message_json(m));
        } else if m.from_me {
            say!("{} {}", Self::line(m), status_mark(m.status));
        } else {
            say!("{}", Self::line(m));
        }
    }

    /// A message the server accepted.
    pub fn sent(&self, m: &MessageRecord) {
        if self.json {
            say!(
                "{}",
                json!({"id": m.id.to_hex(), "to": m.chat.as_str(), "status": status_word(m.status), "ts": ts(m)})
            );
        } else {
            say!("✓ sent to {} ({})", m.chat, m.id);
        }
    }

    /// A downloaded file was saved.
    pub fn saved(&self, path: &std::path::Path) {
        if self.json {
            say!(
                "{}",
                json!({"status": "saved", "path": path.display().to_string()})
            );
        } else {
            say!("{}", path.display());
        }
    }

    /// A status change in `chat`.
    pub fn status(&self, id: &MessageId, status: MessageStatus) {
        if self.json {
            say!(
                "{}",
                json!({"id": id.to_hex(), "status": status_word(status)})
            );
        } else if matches!(status, MessageStatus::Delivered | MessageStatus::Read) {
            say!("  {} {}", status_mark(status), &id.to_hex()[..8]);
        }
    }

    /// `register` succeeded.
    pub fn code_sent(&self, phone: &PhoneNumber, expires_in_s: u32) {
        if self.json {
            say!(
                "{}",
                json!({"status": "code_sent", "phone": phone.as_str(), "expires_in_s": expires_in_s})
            );
        } else {
            say!(
                "code sent to {phone} by SMS (valid {} min): run `natter verify <code>`",
                expires_in_s / 60
            );
        }
    }

    /// `verify` succeeded.
    pub fn registered(&self, me: &WhoAmI) {
        if self.json {
            say!(
                "{}",
                json!({"status": "registered", "phone": me.phone.as_str(), "device": me.device_id.get()})
            );
        } else {
            say!("registered {} on this device (primary)", me.phone);
        }
    }

    /// `whoami`.
    pub fn whoami(&self, me: &WhoAmI) {
        if self.json {
            say!(
                "{}",
                json!({
                    "phone": me.phone.as_str(),
                    "device": me.device_id.get(),
                    "registered": me.registered,
                    "account_key": me.account_key,
                    "server": me.server,
                })
            );
        } else {
            let state = if me.registered {
                "registered"
            } else {
                "registration pending: run `natter verify <code>`"
            };
            let role = if me.device_id.is_primary() {
                "primary"
            } else {
                "companion"
            };
            say!(
                "{} device {} ({role}), {state}\nserver: {}\naccount key: {}",
                me.phone,
                me.device_id,
                me.server.as_deref().unwrap_or("(none)"),
                me.account_key
            );
        }
    }

    /// A new link QR code on the companion.
    pub fn link_code(&self, text: &str, drawing: &str, png: Option<&std::path::Path>) {
        if self.json {
            say!(
                "{}",
                json!({"qr": text, "png": png.map(|p| p.display().to_string())})
            );
        } else {
            say!("{drawing}");
            say!(
                "Scan this with the phone: natter link <png or text> (it expires in 60 s, then a new one appears)"
            );
            if let Some(p) = png {
                say!("PNG: {}", p.display());
            }
            say!("text: {text}");
        }
    }

    /// The companion was linked.
    pub fn linked_as(&self, me: &WhoAmI) {
        if self.json {
            say!(
                "{}",
                json!({"status": "linked", "phone": me.phone.as_str(), "device": me.device_id.get()})
            );
        } else {
            say!("linked: this is device {} of {}", me.device_id, me.phone);
        }
    }

    /// The primary linked a companion.
    pub fn linked(&self, d: &LinkedDevice) {
        if self.json {
            say!(
                "{}",
                json!({"status": "linked", "device": d.device_id, "name": d.name})
            );
        } else {
            say!("linked \"{}\" as device {}", d.name, d.device_id);
        }
    }

    /// `devices`.
    pub fn devices(&self, devices: &[DeviceInfo]) {
        for d in devices {
            if self.json {
                say!(
                    "{}",
                    json!({
                        "device": d.device_id,
                        "name": d.name,
                        "fingerprint": d.fingerprint,
                        "last_seen": d.last_seen_ms,
                        "online": d.online,
                        "this_device": d.this_device,
                        "primary": d.device_id == 1,
                    })
                );
            } else {
                let role = if d.device_id == 1 {
                    "primary"
                } else {
                    "companion"
                };
                let seen = if d.online {
                    "online".to_owned()
                } else {
                    d.last_seen_ms
                        .map(|ms| format!("last seen {}", format_time(ms)))
                        .unwrap_or_else(|| "not connected to the server".into())
                };
                let this = if d.this_device { " (this device)" } else { "" };
                say!(
                    "{}  {:<16} {role:<9}  {}  {seen}{this}",
                    d.device_id,
                    d.name,
                    d.fingerprint
                );
            }
        }
    }

    /// `unlink`.
    pub fn unlinked(&self, device: u32, itself: bool) {
        if self.json {
            say!("{}", json!({"status": "unlinked", "device": device}));
        } else if itself {
            say!("this device is unlinked; its keys and messages are wiped");
        } else {
            say!("device {device} is unlinked");
        }
    }

    /// `safety-number`.
    pub fn safety_number(&self, peer: &PhoneNumber, digits: &str, drawing: &str) {
        if self.json {
            say!(
                "{}",
                json!({"peer": peer.as_str(), "safety_number": digits})
            );
        } else {
            let groups: Vec<String> = digits
                .as_bytes()
                .chunks(5)
                .map(|c| String::from_utf8_lossy(c).into_owned())
                .collect();
            say!("safety number with {peer}:");
            for row in groups.chunks(4) {
                say!("  {}", row.join(" "));
            }
            say!("{drawing}");
            say!("Compare it in person; it changes only if one of you registers again.");
        }
    }

    /// A remark for the user (stderr in JSON mode, so stdout stays parseable).
    pub fn note(&self, text: &str) {
        if self.json {
            eprintln!("{text}");
        } else {
            say!("{text}");
        }
    }
}

/// "online", "last seen 5 min ago", "hidden".
pub fn presence_words(p: natter_client::PresenceInfo) -> String {
    use natter_client::PresenceInfo;
    match p {
        PresenceInfo::Online => "online".into(),
        PresenceInfo::Hidden => "hidden".into(),
        PresenceInfo::LastSeen(0) => "offline".into(),
        PresenceInfo::LastSeen(t) => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0);
            let ago = now.saturating_sub(t) / 1000;
            match ago {
                0..60 => "last seen just now".into(),
                60..3600 => format!("last seen {} min ago", ago / 60),
                3600..86_400 => format!("last seen {} h ago", ago / 3600),
                _ => format!("last seen {} days ago", ago / 86_400),
            }
        }
    }
}

/// Group output.
impl Printer {
    /// A group was created: its id.
    pub fn group_created(&self, g: &natter_client::GroupInfo) {
        if self.json {
            say!("{}", json!({"id": g.id.to_hex(), "name": g.name}));
        } else {
            say!("{}", g.id);
        }
    }

    fn group_json(g: &natter_client::GroupInfo) -> serde_json::Value {
        json!({
            "id": g.id.to_hex(),
            "name": g.name,
            "description": g.description,
            "version": g.version,
            "all_members_may_edit": g.all_members_may_edit,
            "left": g.left,
            "members": g.members.iter().map(|m| json!({"number": m.phone.as_str(), "admin": m.admin})).collect::<Vec<_>>(),
        })
    }

    /// A group's state (after a change, or for `group info`).
    pub fn group(&self, g: &natter_client::GroupInfo) {
        if self.json {
            say!("{}", Self::group_json(g));
        } else {
            say!(
                "{} \"{}\" ({} members){}",
                g.id,
                g.name,
                g.members.len(),
                if g.left { ", left" } else { "" }
            );
            if !g.description.is_empty() {
                say!("  {}", g.description);
            }
            for m in &g.members {
                let me = self.me.as_ref() == Some(&m.phone);
                say!(
                    "  {}{}{}",
                    m.phone,
                    if m.admin { " (admin)" } else { "" },
                    if me { " (you)" } else { "" }
                );
            }
        }
    }

    /// The list of `groups`.
    pub fn groups(&self, list: &[natter_client::GroupInfo]) {
        for g in list {
            if self.json {
                say!("{}", Self::group_json(g));
            } else {
                say!(
                    "{}  {}  ({} members{})",
                    g.id,
                    g.name,
                    g.members.len(),
                    if g.left { ", left" } else { "" }
                );
            }
        }
    }

    fn group_message_json(
        &self,
        m: &natter_client::GroupMessageRecord,
        name: &str,
    ) -> serde_json::Value {
        json!({
            "id": m.id.to_hex(),
            "chat": m.group.to_hex(),
            "group": m.group.to_hex(),
            "group_name": name,
            "from": m.sender.as_str(),
            "from_me": m.from_me,
            "device": m.sender_device.get(),
            "kind": kind_word(m.kind),
            "text": m.text,
            "ts": if m.server_ts_ms > 0 { m.server_ts_ms } else { m.sent_at_ms },
            "sent_at": m.sent_at_ms,
            "status": status_word(m.status),
        })
    }

    /// A group message (`recv`, `chat <group>`): group, sender and device.
    pub fn group_message(&self, m: &natter_client::GroupMessageRecord, name: &str) {
        if self.json {
            say!("{}", self.group_message_json(m, name));
            return;
        }
        let t = format_time(if m.server_ts_ms > 0 {
            m.server_ts_ms
        } else {
            m.sent_at_ms
        });
        let who = if m.from_me {
            "me".to_string()
        } else {
            m.sender.to_string()
        };
        match m.kind {
            MessageKind::Notice => say!("[{t}] {name}: ⚑ {}", m.text),
            MessageKind::Undecryptable => say!(
                "[{t}] {name} / {who} (device {}): ⚠ could not decrypt this message",
                m.sender_device
            ),
            _ => say!(
                "[{t}] {name} / {who} (device {}): {}",
                m.sender_device,
                m.text
            ),
        }
    }

    /// A group message the server accepted.
    pub fn group_sent(&self, m: &natter_client::GroupMessageRecord) {
        if self.json {
            say!(
                "{}",
                json!({"id": m.id.to_hex(), "group": m.group.to_hex(), "status": status_word(m.status), "ts": m.server_ts_ms})
            );
        } else {
            say!("✓ sent to group {} ({})", m.group, m.id);
        }
    }

    /// Per-member receipts of one of our group messages.
    pub fn group_receipts(
        &self,
        m: &natter_client::GroupMessageRecord,
        r: &natter_client::ReceiptSummary,
    ) {
        if self.json {
            say!(
                "{}",
                json!({
                    "id": m.id.to_hex(),
                    "group": m.group.to_hex(),
                    "text": m.text,
                    "members": r.members,
                    "delivered": r.delivered,
                    "read": r.read,
                    "per_member": r.per_member.iter().map(|(p, s)| json!({"number": p.as_str(), "status": status_word(*s)})).collect::<Vec<_>>(),
                })
            );
        } else {
            say!(
                "{}: delivered to {}/{} members, read by {}/{}",
                m.id,
                r.delivered,
                r.members,
                r.read,
                r.members
            );
            for (p, s) in &r.per_member {
                say!("  {p}  {}", status_word(*s));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{format_time, human_size};

    #[test]
    fn sizes_read_well() {
        assert_eq!(human_size(12), "12 B");
        assert_eq!(human_size(1_200_000), "1.2 MB");
        assert_eq!(human_size(340_000), "340 KB");
        assert_eq!(human_size(3_000_000_000), "3.0 GB");
    }

    #[test]
    fn times_format_in_utc() {
        assert_eq!(format_time(0), "1970-01-01 00:00");
        assert_eq!(format_time(1_795_449_600_000), "2026-11-23 16:00");
        assert_eq!(format_time(951_782_400_000), "2000-02-29 00:00");
    }
}
