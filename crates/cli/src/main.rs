//! natter: the Natter command-line client. A thin layer over natter-client: it parses commands, drives
//! a [`natter_client::Client`] and prints human output or, with `--json`, one JSON object per line.

mod output;
mod qr;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use natter_client::{Client, ClientError, Event, MessageRecord};
use natter_proto::PhoneNumber;
use natter_proto::wire::ErrorCode;
use tokio::io::AsyncBufReadExt;

use output::Printer;

/// Natter: end-to-end encrypted messaging.
#[derive(Parser, Debug)]
#[command(
    name = "natter",
    version,
    about = "Natter: end-to-end encrypted messaging"
)]
struct Cli {
    /// Directory holding this device's keys and messages.
    #[arg(long, env = "NATTER_HOME", global = true)]
    home: Option<PathBuf>,
    /// Server address (HOST:PORT), or the nodes of a cluster (HOST:PORT,HOST:PORT,...: the first that
    /// answers is used, the next when it fails); remembered for later commands.
    #[arg(long, env = "NATTER_SERVER", global = true)]
    server: Option<String>,
    /// Print JSON (one object per line) instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Ask for a registration code by SMS for a phone number (international format).
    Register {
        /// e.g. +15550000001
        number: String,
    },
    /// Complete registration with the code from the SMS.
    Verify {
        /// The 6-digit code.
        code: String,
    },
    /// Show this device's account and server.
    Whoami,
    /// Send a text message; exits 0 once the server has durably accepted it.
    Send {
        /// The recipient's number.
        number: String,
        /// The text (several words are joined with spaces).
        #[arg(required = true, num_args = 1..)]
        text: Vec<String>,
    },
    /// Send a file (photo, video or any file; the kind comes from its content), end-to-end encrypted.
    /// An interrupted upload resumes when the same file is sent to the same number again.
    SendFile {
        /// The recipient's number.
        number: String,
        /// The file.
        path: PathBuf,
        /// A caption shown with it.
        #[arg(long, default_value = "")]
        caption: String,
    },
    /// Send a voice note (an Ogg Opus file).
    SendVoice {
        /// The recipient's number.
        number: String,
        /// The Ogg Opus file.
        path: PathBuf,
    },
    /// Download the file of a media message (by its id, from any conversation); prints the saved path.
    Download {
        /// The message id (as shown by `recv --json` or `history --json`).
        message_id: String,
        /// The directory to save into (default: the current directory).
        #[arg(long)]
        to: Option<PathBuf>,
    },
    /// Forward a photo, video, voice note or file to another number (no new upload).
    Forward {
        /// The media message's id.
        message_id: String,
        /// The recipient's number.
        number: String,
    },
    /// Print every message not shown by an earlier recv, each exactly once.
    Recv {
        /// Keep listening until this many seconds pass with nothing new.
        #[arg(long, default_value_t = 0.0)]
        wait: f64,
    },
    /// Chat interactively with one number: type to send, replies appear live. /quit or Ctrl-D ends.
    Chat {
        /// The peer's number.
        number: String,
    },
    /// Print a whole conversation, sent and received.
    History {
        /// The peer's number.
        number: String,
        /// On a companion: first fetch up to 1,000 older messages of this chat from the phone (waits
        /// at most 60 s for them).
        #[arg(long)]
        older: bool,
    },
    /// Forget the pinned server key (only after the server was deliberately reinstalled).
    ForgetServer,
    /// On a new companion (laptop, tablet): show a QR code for the phone to scan, and wait to be linked.
    LinkCompanion {
        /// Also write the QR code to this PNG file (rewritten each time a new code appears).
        #[arg(long)]
        qr: Option<PathBuf>,
        /// This device's name on the account.
        #[arg(long, default_value = "companion")]
        name: String,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
    /// On the phone: link the companion whose QR code is in a PNG file (or given as its text).
    Link {
        /// A PNG of the QR code, or the code's text (natter-link:…).
        code: String,
        /// Link without asking for confirmation.
        #[arg(long)]
        yes: bool,
        /// Send the companion the history of this many days.
        #[arg(long, default_value_t = 90)]
        history_days: u32,
        /// Send the companion at most this many messages of history.
        #[arg(long, default_value_t = 100_000)]
        history_max: usize,
    },
    /// Contact names, synced across this account's devices.
    Contact {
        /// What to do.
        #[command(subcommand)]
        action: ContactAction,
    },
    /// List contacts (the address book's Natter users, the chats this device knows and every named
    /// contact) with their names and profile names; `contacts import FILE` reads an address book.
    Contacts {
        /// What to do (default: list).
        #[command(subcommand)]
        action: Option<ContactsAction>,
    },
    /// This account's profile (name, about, avatar), end-to-end encrypted for its contacts.
    Profile {
        /// What to do.
        #[command(subcommand)]
        action: ProfileAction,
    },
    /// Whether someone is online, or when they were last seen (as their privacy settings allow).
    Presence {
        /// The number.
        number: String,
    },
    /// Privacy settings: who sees your last seen, read receipts; without arguments, shows them.
    Privacy {
        /// What to change.
        #[command(subcommand)]
        action: Option<PrivacyAction>,
    },
    /// Block a number: its messages, calls, presence and profile requests are refused.
    Block {
        /// The number.
        number: String,
    },
    /// Unblock a number.
    Unblock {
        /// The number.
        number: String,
    },
    /// Star a message (by id, as shown by `history --json`) on every device of the account.
    Star {
        /// The message id.
        message_id: String,
        /// Unstar it instead.
        #[arg(long)]
        off: bool,
    },
    /// Pin a chat on every device of the account.
    Pin {
        /// The chat's number.
        chat: String,
        /// Unpin it instead.
        #[arg(long)]
        off: bool,
    },
    /// Mute a chat on every device of the account.
    Mute {
        /// The chat's number.
        chat: String,
        /// For how long: a number with s, m, h or d (e.g. 8h).
        #[arg(long = "for", default_value = "8h")]
        duration: String,
        /// Unmute it instead.
        #[arg(long)]
        off: bool,
    },
    /// Archive a chat on every device of the account.
    Archive {
        /// The chat's number.
        chat: String,
        /// Unarchive it instead.
        #[arg(long)]
        off: bool,
    },
    /// Mark a chat read here (read receipts go out) and on the account's other devices.
    MarkRead {
        /// The chat's number.
        chat: String,
    },
    /// List chats with their settings (pinned, muted, archived) and unread counts.
    Chats,
    /// List this account's devices.
    Devices,
    /// Remove a device from the account (from the phone: any companion; on a companion: itself).
    Unlink {
        /// The device id (see `natter devices`).
        device_id: u32,
    },
    /// Show the safety number with a contact, to compare in person.
    SafetyNumber {
        /// The contact's number.
        number: String,
    },
    /// Group chats: create, send, change membership and settings, show receipts.
    Group {
        /// What to do.
        #[command(subcommand)]
        action: GroupAction,
    },
    /// List the groups this account is in.
    Groups,
}

/// `group` subcommands. A group is named by its id (or a unique prefix of at least 4 hex digits) or by
/// its name if no other group has it.
#[derive(Subcommand, Debug)]
enum GroupAction {
    /// Create a group with you as admin; prints its id.
    Create {
        /// The group's name.
        name: String,
        /// The other members' numbers.
        members: Vec<String>,
    },
    /// Send a text to every member; exits 0 once the server has accepted it for every member device.
    Send {
        /// The group.
        group: String,
        /// The text (several words are joined with spaces).
        #[arg(required = true, num_args = 1..)]
        text: Vec<String>,
    },
    /// Add members (admins only, unless every member may edit).
    Add {
        /// The group.
        group: String,
        /// Their numbers.
        #[arg(required = true, num_args = 1..)]
        numbers: Vec<String>,
    },
    /// Remove members (admins only, unless every member may edit); sender keys rotate.
    Remove {
        /// The group.
        group: String,
        /// Their numbers.
        #[arg(required = true, num_args = 1..)]
        numbers: Vec<String>,
    },
    /// Make members admins (admins only).
    Promote {
        /// The group.
        group: String,
        /// Their numbers.
        #[arg(required = true, num_args = 1..)]
        numbers: Vec<String>,
    },
    /// Make admins ordinary members (admins only).
    Demote {
        /// The group.
        group: String,
        /// Their numbers.
        #[arg(required = true, num_args = 1..)]
        numbers: Vec<String>,
    },
    /// Leave the group.
    Leave {
        /// The group.
        group: String,
    },
    /// Show the group (members, admins), or with --message the receipts of one of your messages.
    Info {
        /// The group.
        group: String,
        /// One of your messages (its id): delivered and read, per member.
        #[arg(long)]
        message: Option<String>,
    },
    /// Rename the group (and optionally change its description).
    Rename {
        /// The group.
        group: String,
        /// The new name (several words are joined with spaces).
        #[arg(required = true, num_args = 1..)]
        name: Vec<String>,
        /// A new description.
        #[arg(long)]
        description: Option<String>,
    },
    /// Let every member edit name, description and membership (on), or admins only (off).
    Editing {
        /// The group.
        group: String,
        /// on or off.
        state: Switch,
    },
}

/// A progress bar counting `unit`s on stderr, hidden with `--json` or when stderr is not a terminal.
fn count_bar(json: bool, what: &str, unit: &str) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if json || !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(0);
    if let Ok(style) = indicatif::ProgressStyle::with_template(&format!(
        "{{msg}} [{{bar:30}}] {{pos}}/{{len}} {unit}"
    )) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(what.to_owned());
    bar
}

/// A byte progress bar on stderr, hidden with `--json` or when stderr is not a terminal.
fn progress_bar(json: bool, what: &str) -> (indicatif::ProgressBar, natter_client::Progress) {
    use std::io::IsTerminal;
    let bar = if json || !std::io::stderr().is_terminal() {
        indicatif::ProgressBar::hidden()
    } else {
        let bar = indicatif::ProgressBar::new(0);
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
        ) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_message(what.to_owned());
        bar
    };
    let b = bar.clone();
    let progress: natter_client::Progress = std::sync::Arc::new(move |done, total| {
        b.set_length(total);
        b.set_position(done);
    });
    (bar, progress)
}

async fn send_file(
    client: &Client,
    out: &Printer,
    peer: &PhoneNumber,
    path: &std::path::Path,
    kind: Option<natter_proto::content::MediaKind>,
    caption: &str,
    json: bool,
) -> anyhow::Result<()> {
    let (bar, progress) = progress_bar(json, "uploading");
    client.connect().await?;
    let sent = client.send_file(peer, path, kind, caption, progress).await;
    bar.finish_and_clear();
    let sent = sent?;
    out.sent(&sent);
    let _ = client.wait_outbox_empty(Duration::from_secs(2)).await;
    client.disconnect().await;
    Ok(())
}

/// Exit codes, so scripts can tell failures apart.
mod exit {
    pub const FAILURE: u8 = 1;
    pub const NOT_REGISTERED: u8 = 3;
    pub const UNREACHABLE: u8 = 4;
    pub const RATE_LIMITED: u8 = 5;
    pub const BAD_CODE: u8 = 6;
    pub const UNKNOWN_NUMBER: u8 = 7;
    pub const INVALID_INPUT: u8 = 8;
}

fn exit_code(e: &anyhow::Error) -> u8 {
    let Some(ce) = e.downcast_ref::<ClientError>() else {
        return exit::FAILURE;
    };
    match ce {
        ClientError::NotRegistered | ClientError::NoPendingRegistration => exit::NOT_REGISTERED,
        ClientError::DeviceRemoved(_) => exit::NOT_REGISTERED,
        ClientError::Unreachable { .. } | ClientError::NoServer | ClientError::Timeout => {
            exit::UNREACHABLE
        }
        ClientError::InvalidInput(_) => exit::INVALID_INPUT,
        ClientError::Server { code, .. } => match code {
            ErrorCode::RateLimited => exit::RATE_LIMITED,
            ErrorCode::WrongCode
            | ErrorCode::CodeExpired
            | ErrorCode::TooManyAttempts
            | ErrorCode::NoCodePending => exit::BAD_CODE,
            ErrorCode::UnknownAccount => exit::UNKNOWN_NUMBER,
            ErrorCode::InvalidNumber => exit::INVALID_INPUT,
            _ => exit::FAILURE,
        },
        _ => exit::FAILURE,
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("NATTER_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let json = cli.json;
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("natter: cannot start: {e}");
            return ExitCode::from(exit::FAILURE);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let code = exit_code(&e);
            if json {
                let obj = serde_json::json!({"error": format!("{e:#}"), "exit_code": code});
                output::write_line(&obj.to_string());
            }
            eprintln!("natter: {e:#}");
            ExitCode::from(code)
        }
    }
}

/// `contacts` subcommands.
#[derive(Subcommand, Debug)]
enum ContactsAction {
    /// Import an address book (vCard 3/4 or CSV): finds which numbers use Natter. Only numbers that
    /// changed since the last import are sent to the server.
    Import {
        /// The file.
        file: PathBuf,
        /// Region of national numbers (ISO code such as US or DE); default: this account's own.
        #[arg(long)]
        region: Option<String>,
    },
}

/// `profile` subcommands.
#[derive(Subcommand, Debug)]
enum ProfileAction {
    /// Set the name, about line and/or avatar picture (others stay as they are).
    Set {
        /// Display name.
        #[arg(long)]
        name: Option<String>,
        /// About line.
        #[arg(long)]
        about: Option<String>,
        /// A picture (PNG, JPEG...), scaled down to a small JPEG.
        #[arg(long)]
        avatar: Option<PathBuf>,
    },
    /// Show a profile (yours without a number), if its owner shared its profile key with you.
    Show {
        /// The number.
        number: Option<String>,
        /// Write the avatar JPEG here.
        #[arg(long)]
        avatar_out: Option<PathBuf>,
    },
}

/// Who sees the last seen.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum Audience {
    /// Everyone.
    Everyone,
    /// Your contacts only.
    Contacts,
    /// Nobody.
    Nobody,
}

/// On or off.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum Switch {
    /// On.
    On,
    /// Off.
    Off,
}

/// `privacy` subcommands.
#[derive(Subcommand, Debug)]
enum PrivacyAction {
    /// Who sees when you are online and were last seen.
    LastSeen {
        /// everyone, contacts or nobody.
        who: Audience,
    },
    /// Read receipts: off, none are sent and none are shown.
    ReadReceipts {
        /// on or off.
        state: Switch,
    },
}

/// Contact subcommands.
#[derive(Subcommand, Debug)]
enum ContactAction {
    /// Name a contact (an empty name removes it).
    SetName {
        /// The contact's number.
        number: String,
        /// The name (several words are joined with spaces).
        name: Vec<String>,
    },
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `8h`, `30m`, `45s`, `2d` in milliseconds.
fn parse_duration_ms(s: &str) -> anyhow::Result<u64> {
    let s = s.trim();
    let bad =
        || ClientError::InvalidInput(format!("{s:?} is not a duration like 8h, 30m, 45s or 2d"));
    let (n, unit) = s.split_at(s.len().saturating_sub(1));
    let n: u64 = n.parse().map_err(|_| bad())?;
    let scale = match unit {
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(bad().into()),
    };
    Ok(n.saturating_mul(scale))
}

/// Connects, runs one app-state change (which fetches and verifies first), disconnects.
async fn app_state(
    client: &Client,
    out: &Printer,
    change: impl std::future::Future<Output = natter_client::Result<()>>,
) -> anyhow::Result<()> {
    client.connect().await?;
    let result = change.await;
    client.disconnect().await;
    result?;
    out.done();
    Ok(())
}

/// Fetches and verifies every app-state collection if the server is reachable (the local verified state
/// is shown otherwise).
async fn refresh_app_state(client: &Client) {
    if client.connect().await.is_ok() {
        for c in natter_client::appstate::COLLECTIONS {
            if let Err(e) = client.sync_app_state(c).await {
                eprintln!("natter: {e}");
            }
        }
        client.disconnect().await;
    }
}

fn parse_number(s: &str) -> anyhow::Result<PhoneNumber> {
    PhoneNumber::parse(s).map_err(|e| ClientError::InvalidInput(e.to_string()).into())
}

fn default_home() -> PathBuf {
    std::env::var_os("HOME")
        .map(|h| PathBuf::from(h).join(".natter"))
        .unwrap_or_else(|| PathBuf::from(".natter"))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let home = cli.home.clone().unwrap_or_else(default_home);
    let client = Client::open(&home)
        .await
        .with_context(|| format!("opening {}", home.display()))?;
    if let Some(server) = &cli.server {
        client.set_server(server).await?;
    }
    let me = client.whoami().await?.map(|w| w.phone);
    let mut out = Printer::new(cli.json, me);
    if matches!(cli.command, Command::History { .. }) {
        out.set_starred(client.starred().await.unwrap_or_default());
    }
    match cli.command {
        Command::Register { number } => {
            let phone = parse_number(&number)?;
            let sent = client.register(&phone).await?;
            out.code_sent(&phone, sent.expires_in_s);
        }
        Command::Verify { code } => {
            client.verify(&code).await?;
            if let Some(me) = client.whoami().await? {
                out.registered(&me);
            }
        }
        Command::Whoami => match client.whoami().await? {
            Some(me) => out.whoami(&me),
            None => return Err(ClientError::NotRegistered.into()),
        },
        Command::Send { number, text } => {
            let peer = parse_number(&number)?;
            let text = text.join(" ");
            client.connect().await?;
            let sent = client.send_text(&peer, &text).await?;
            out.sent(&sent);
            // Receipts for messages that arrived meanwhile go out now if they can.
            let _ = client.wait_outbox_empty(Duration::from_secs(2)).await;
            client.disconnect().await;
        }
        Command::SendFile {
            number,
            path,
            caption,
        } => {
            let peer = parse_number(&number)?;
            send_file(&client, &out, &peer, &path, None, &caption, cli.json).await?;
        }
        Command::SendVoice { number, path } => {
            let peer = parse_number(&number)?;
            let kind = Some(natter_proto::content::MediaKind::Voice);
            send_file(&client, &out, &peer, &path, kind, "", cli.json).await?;
        }
        Command::Forward { message_id, number } => {
            let id = natter_proto::MessageId::from_hex(message_id.trim())
                .map_err(|e| ClientError::InvalidInput(format!("bad message id: {e}")))?;
            let peer = parse_number(&number)?;
            client.connect().await?;
            let sent = client.forward(&id, &peer).await?;
            out.sent(&sent);
            let _ = client.wait_outbox_empty(Duration::from_secs(2)).await;
            client.disconnect().await;
        }
        Command::Download { message_id, to } => {
            let id = natter_proto::MessageId::from_hex(message_id.trim())
                .map_err(|e| ClientError::InvalidInput(format!("bad message id: {e}")))?;
            let found = client.find_message(&id).await?;
            let Some(m) = found.iter().find(|m| m.media.is_some()) else {
                return Err(ClientError::InvalidInput(format!(
                    "no media message {message_id} on this device"
                ))
                .into());
            };
            let dir = match to {
                Some(d) => d,
                None => std::env::current_dir().context("current directory")?,
            };
            let (bar, progress) = progress_bar(cli.json, "downloading");
            client.connect().await?;
            let saved = client.download(&m.chat, &m.id, &dir, progress).await;
            bar.finish_and_clear();
            client.disconnect().await;
            out.saved(&saved?);
        }
        Command::Recv { wait } => recv(&client, &out, wait).await?,
        Command::Chat { number } => match parse_number(&number) {
            Ok(peer) => chat(&client, &out, &peer).await?,
            Err(not_a_number) => {
                let g = match resolve_group(&client, &number).await {
                    Ok(g) => g,
                    Err(_) => return Err(not_a_number),
                };
                group_chat(&client, &out, g.id).await?
            }
        },
        Command::Group { action } => group(&client, &out, action).await?,
        Command::Groups => {
            if client.connect().await.is_ok() {
                if let Err(e) = client.refresh_groups().await {
                    out.note(&format!(
                        "could not refresh the groups from the server: {e}"
                    ));
                }
                client.disconnect().await;
            }
            out.groups(&client.groups().await?);
        }
        Command::History { number, older } => {
            let peer = parse_number(&number)?;
            let mut messages = if older {
                fetch_older(&client, &peer).await?;
                let mut all = client.history(&peer).await?;
                // Older history arrives after newer messages: print by server time (pending last).
                all.sort_by_key(|m| (m.server_ts_ms == 0, m.server_ts_ms));
                all
            } else {
                client.history(&peer).await?
            };
            for m in messages.drain(..) {
                out.history_entry(&m);
            }
        }
        Command::LinkCompanion { qr, name, timeout } => {
            link_companion(&client, &out, qr.as_deref(), &name, timeout, cli.json).await?
        }
        Command::Link {
            code,
            yes,
            history_days,
            history_max,
        } => {
            let history = natter_client::HistoryOptions {
                max_age_days: history_days,
                max_messages: history_max,
                ..natter_client::HistoryOptions::default()
            };
            link(&client, &out, &code, yes, &history).await?
        }
        Command::Contact {
            action: ContactAction::SetName { number, name },
        } => {
            let phone = parse_number(&number)?;
            app_state(
                &client,
                &out,
                client.set_contact_name(&phone, &name.join(" ")),
            )
            .await?;
        }
        Command::Contacts { action: None } => {
            refresh_app_state(&client).await;
            let online = client.connect().await.is_ok();
            let list = client.contact_list().await;
            if online {
                client.disconnect().await;
            }
            out.contacts(&list?);
        }
        Command::Contacts {
            action: Some(ContactsAction::Import { file, region }),
        } => {
            client.connect().await?;
            let bar = count_bar(cli.json, "looking up", "numbers");
            let report = client
                .import_contacts(&file, region.as_deref(), &|done, total| {
                    bar.set_length(total as u64);
                    bar.set_position(done as u64);
                })
                .await;
            bar.finish_and_clear();
            let _ = client.wait_outbox_empty(Duration::from_secs(5)).await;
            client.disconnect().await;
            out.import_report(&report?);
        }
        Command::Profile {
            action:
                ProfileAction::Set {
                    name,
                    about,
                    avatar,
                },
        } => {
            if name.is_none() && about.is_none() && avatar.is_none() {
                anyhow::bail!(ClientError::InvalidInput(
                    "give --name, --about and/or --avatar".into()
                ));
            }
            client.connect().await?;
            let result = client
                .set_profile(name.as_deref(), about.as_deref(), avatar.as_deref())
                .await;
            let _ = client.wait_outbox_empty(Duration::from_secs(5)).await;
            client.disconnect().await;
            result?;
            out.done();
        }
        Command::Profile {
            action: ProfileAction::Show { number, avatar_out },
        } => {
            let phone = match number {
                Some(n) => parse_number(&n)?,
                None => {
                    client
                        .whoami()
                        .await?
                        .ok_or(ClientError::NotRegistered)?
                        .phone
                }
            };
            client.connect().await?;
            let profile = client.profile(&phone).await;
            client.disconnect().await;
            let profile = profile?;
            if let (Some(path), Some(p)) = (&avatar_out, &profile)
                && !p.avatar_jpeg.is_empty()
            {
                std::fs::write(path, &p.avatar_jpeg)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            out.profile(&phone, profile.as_ref());
        }
        Command::Presence { number } => {
            let phone = parse_number(&number)?;
            client.connect().await?;
            let p = client.presence(&phone).await;
            client.disconnect().await;
            out.presence(&phone, p?);
        }
        Command::Privacy { action } => {
            client.connect().await?;
            let result = match action {
                None => client.privacy().await.map(Some),
                Some(PrivacyAction::LastSeen { who }) => client
                    .set_last_seen_visibility(match who {
                        Audience::Everyone => natter_proto::social::Visibility::Everyone,
                        Audience::Contacts => natter_proto::social::Visibility::Contacts,
                        Audience::Nobody => natter_proto::social::Visibility::Nobody,
                    })
                    .await
                    .map(|()| None),
                Some(PrivacyAction::ReadReceipts { state }) => client
                    .set_read_receipts(matches!(state, Switch::On))
                    .await
                    .map(|()| None),
            };
            client.disconnect().await;
            match result? {
                Some(p) => out.privacy(&p),
                None => out.done(),
            }
        }
        Command::Block { number } => block(&client, &out, &number, true).await?,
        Command::Unblock { number } => block(&client, &out, &number, false).await?,
        Command::Star { message_id, off } => {
            let id = natter_proto::MessageId::from_hex(message_id.trim())
                .map_err(|e| ClientError::InvalidInput(e.to_string()))?;
            app_state(&client, &out, client.star(&id, !off)).await?;
        }
        Command::Pin { chat, off } => {
            let chat = parse_number(&chat)?;
            app_state(&client, &out, client.pin(&chat, !off)).await?;
        }
        Command::Mute {
            chat,
            duration,
            off,
        } => {
            let chat = parse_number(&chat)?;
            let until = if off {
                0
            } else {
                now_ms().saturating_add(parse_duration_ms(&duration)?)
            };
            app_state(&client, &out, client.mute(&chat, until)).await?;
        }
        Command::Archive { chat, off } => {
            let chat = parse_number(&chat)?;
            app_state(&client, &out, client.archive(&chat, !off)).await?;
        }
        Command::MarkRead { chat } => {
            let chat = parse_number(&chat)?;
            app_state(&client, &out, client.mark_read(&chat)).await?;
            let _ = client.wait_outbox_empty(Duration::from_secs(2)).await;
        }
        Command::Chats => {
            refresh_app_state(&client).await;
            out.chats(&client.chats().await?);
        }
        Command::Devices => {
            client.connect().await?;
            let devices = client.devices().await?;
            client.disconnect().await;
            out.devices(&devices);
        }
        Command::Unlink { device_id } => {
            let id = natter_proto::DeviceId::new(device_id)
                .map_err(|e| ClientError::InvalidInput(e.to_string()))?;
            client.connect().await?;
            let me = client.whoami().await?.ok_or(ClientError::NotRegistered)?;
            client.unlink(id).await?;
            client.disconnect().await;
            out.unlinked(id.get(), me.device_id == id);
        }
        Command::SafetyNumber { number } => {
            let peer = parse_number(&number)?;
            client.connect().await?;
            let digits = client.safety_number(&peer).await?;
            client.disconnect().await;
            out.safety_number(&peer, &digits, &qr::render_terminal(&digits)?);
        }
        Command::ForgetServer => {
            client.forget_server_key().await?;
            out.note(
                "the pinned server key is forgotten; the next connection pins the server's key",
            );
        }
    }
    Ok(())
}

/// Connects, processes the server's backlog, prints what is new, then keeps listening until `wait`
/// seconds pass with nothing new.
async fn recv(client: &Client, out: &Printer, wait: f64) -> anyhow::Result<()> {
    if !wait.is_finite() || !(0.0..=86_400.0).contains(&wait) {
        return Err(ClientError::InvalidInput("--wait takes 0 to 86400 seconds".into()).into());
    }
    let mut events = client.subscribe();
    client.connect().await?;
    let backlog = async {
        loop {
            match events.recv().await {
                Ok(Event::BacklogDone) => return Ok(()),
                Ok(Event::DeviceRemoved(r)) => return Err(ClientError::DeviceRemoved(r)),
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(_) => return Ok(()),
            }
        }
    };
    match tokio::time::timeout(Duration::from_secs(30), backlog).await {
        Ok(r) => r?,
        Err(_) => out.note("the server did not finish sending the backlog in 30 s"),
    }
    print_unshown(client, out).await?;
    let idle = Duration::from_secs_f64(wait);
    if !idle.is_zero() {
        loop {
            match tokio::time::timeout(idle, events.recv()).await {
                Err(_) => break,
                Ok(Ok(Event::Message(_) | Event::GroupMessage(_))) => {
                    print_unshown(client, out).await?
                }
                Ok(Ok(Event::DeviceRemoved(r))) => return Err(ClientError::DeviceRemoved(r).into()),
                Ok(Ok(_)) | Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => {}
                Ok(Err(_)) => break,
            }
        }
    }
    let _ = client.wait_outbox_empty(Duration::from_secs(3)).await;
    client.disconnect().await;
    Ok(())
}

async fn print_unshown(client: &Client, out: &Printer) -> anyhow::Result<()> {
    for m in client.take_unshown().await? {
        out.message(&m);
    }
    let mut names = std::collections::HashMap::new();
    for m in client.take_unshown_group().await? {
        let name = match names.get(&m.group) {
            Some(n) => String::clone(n),
            None => {
                let n = client
                    .group(&m.group)
                    .await?
                    .map(|g| g.name)
                    .unwrap_or_else(|| m.group.to_hex());
                names.insert(m.group, n.clone());
                n
            }
        };
        out.group_message(&m, &name);
    }
    Ok(())
}

/// A group by id, id prefix or name; asks the server for our groups if this device does not know it.
async fn resolve_group(client: &Client, key: &str) -> anyhow::Result<natter_client::GroupInfo> {
    match client.find_group(key).await {
        Ok(g) => Ok(g),
        Err(first) => {
            if client.connect().await.is_ok() {
                let _ = client.refresh_groups().await;
            }
            client.find_group(key).await.map_err(|_| first.into())
        }
    }
}

fn numbers(list: &[String]) -> anyhow::Result<Vec<PhoneNumber>> {
    list.iter().map(|n| parse_number(n)).collect()
}

/// Connects and processes what the server queued (so that receipts and changes are applied).
async fn catch_up(client: &Client) -> anyhow::Result<()> {
    let mut events = client.subscribe();
    client.connect().await?;
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match events.recv().await {
                Ok(Event::BacklogDone) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    Ok(())
}

async fn group(client: &Client, out: &Printer, action: GroupAction) -> anyhow::Result<()> {
    match action {
        GroupAction::Create { name, members } => {
            let members = numbers(&members)?;
            catch_up(client).await?;
            let g = client.create_group(&name, &members).await;
            client.disconnect().await;
            out.group_created(&g?);
        }
        GroupAction::Send { group, text } => {
            catch_up(client).await?;
            let g = resolve_group(client, &group).await?;
            let sent = client.send_group_text(&g.id, &text.join(" ")).await;
            let _ = client.wait_outbox_empty(Duration::from_secs(2)).await;
            client.disconnect().await;
            out.group_sent(&sent?);
        }
        GroupAction::Info { group, message } => {
            if catch_up(client).await.is_ok() {
                let _ = client.wait_outbox_empty(Duration::from_secs(2)).await;
            }
            let g = resolve_group(client, &group).await?;
            let g = match client.refresh_group(&g.id).await {
                Ok(Some(fresh)) => fresh,
                _ => client.group(&g.id).await?.unwrap_or(g),
            };
            client.disconnect().await;
            match message {
                None => out.group(&g),
                Some(id) => {
                    let id = natter_proto::MessageId::from_hex(&id)
                        .map_err(|e| ClientError::InvalidInput(e.to_string()))?;
                    let m = client.group_message(&g.id, &id).await?.ok_or_else(|| {
                        ClientError::InvalidInput(format!("no message {id} in this group"))
                    })?;
                    out.group_receipts(&m, &client.group_receipts(&g.id, &id).await?);
                }
            }
        }
        other => {
            catch_up(client).await?;
            let result = match other {
                GroupAction::Add { group, numbers: n } => {
                    let g = resolve_group(client, &group).await?;
                    client.group_add(&g.id, &numbers(&n)?).await
                }
                GroupAction::Remove { group, numbers: n } => {
                    let g = resolve_group(client, &group).await?;
                    client.group_remove(&g.id, &numbers(&n)?).await
                }
                GroupAction::Promote { group, numbers: n } => {
                    let g = resolve_group(client, &group).await?;
                    client.group_promote(&g.id, &numbers(&n)?).await
                }
                GroupAction::Demote { group, numbers: n } => {
                    let g = resolve_group(client, &group).await?;
                    client.group_demote(&g.id, &numbers(&n)?).await
                }
                GroupAction::Leave { group } => {
                    let g = resolve_group(client, &group).await?;
                    client.group_leave(&g.id).await
                }
                GroupAction::Rename {
                    group,
                    name,
                    description,
                } => {
                    let g = resolve_group(client, &group).await?;
                    client
                        .group_rename(&g.id, &name.join(" "), description.as_deref())
                        .await
                }
                GroupAction::Editing { group, state } => {
                    let g = resolve_group(client, &group).await?;
                    client
                        .group_set_all_may_edit(&g.id, matches!(state, Switch::On))
                        .await
                }
                // Handled above.
                GroupAction::Create { .. }
                | GroupAction::Send { .. }
                | GroupAction::Info { .. } => {
                    return Ok(());
                }
            };
            client.disconnect().await;
            out.group(&result?);
        }
    }
    Ok(())
}

/// `chat <group>`: the group's recent history, then type to send; messages appear live.
async fn group_chat(
    client: &Client,
    out: &Printer,
    id: natter_proto::GroupId,
) -> anyhow::Result<()> {
    let mut events = client.subscribe();
    client.connect().await?;
    let name = client.group(&id).await?.map(|g| g.name).unwrap_or_default();
    let history = client.group_history(&id).await?;
    for m in &history[history.len().saturating_sub(20)..] {
        out.group_message(m, &name);
    }
    out.note(&format!(
        "chatting in {name}: type a message and press Enter; /quit or Ctrl-D to leave"
    ));
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    loop {
        tokio::select! {
            line = lines.next_line() => {
                let Some(line) = line? else { break };
                let text = line.trim();
                if text.is_empty() {
                    continue;
                }
                if text == "/quit" {
                    break;
                }
                match client.send_group_text(&id, text).await {
                    Ok(m) => out.group_sent(&m),
                    Err(e) if e.is_transient() => out.note(&format!("not sent yet ({e}); it goes out when the connection is back")),
                    Err(e) => out.note(&format!("not sent: {e}")),
                }
            }
            ev = events.recv() => match ev {
                Ok(Event::GroupMessage(_) | Event::Message(_)) => print_unshown(client, out).await?,
                Ok(Event::Disconnected) => out.note("connection lost; reconnecting…"),
                Ok(Event::DeviceRemoved(r)) => return Err(ClientError::DeviceRemoved(r).into()),
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(_) => break,
            }
        }
    }
    let _ = client.wait_outbox_empty(Duration::from_secs(3)).await;
    client.disconnect().await;
    Ok(())
}

async fn block(client: &Client, out: &Printer, number: &str, blocked: bool) -> anyhow::Result<()> {
    let phone = parse_number(number)?;
    client.connect().await?;
    let result = client.block(&phone, blocked).await;
    let _ = client.wait_outbox_empty(Duration::from_secs(5)).await;
    client.disconnect().await;
    result?;
    out.done();
    Ok(())
}

async fn chat(client: &Client, out: &Printer, peer: &PhoneNumber) -> anyhow::Result<()> {
    let history = client.history(peer).await?;
    let start = history.len().saturating_sub(20);
    for m in &history[start..] {
        out.history_entry(m);
    }
    let mut events = client.subscribe();
    client.connect().await?;
    out.note(&format!(
        "chatting with {peer}: type a message and press Enter; /quit or Ctrl-D to leave"
    ));
    match client.presence(peer).await {
        Ok(natter_client::PresenceInfo::Hidden) => {}
        Ok(p) => out.note(&format!("{peer} is {}", output::presence_words(p))),
        Err(e) => out.note(&format!("presence unavailable: {e}")),
    }
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    loop {
        tokio::select! {
            line = lines.next_line() => {
                let Some(line) = line? else { break };
                let text = line.trim();
                if text.is_empty() {
                    continue;
                }
                if text == "/quit" {
                    break;
                }
                match client.send_text(peer, text).await {
                    Ok(m) => out.sent(&m),
                    Err(e) if e.is_transient() => out.note(&format!("not sent yet ({e}); it goes out when the connection is back")),
                    Err(e) => out.note(&format!("not sent: {e}")),
                }
            }
            ev = events.recv() => match ev {
                Ok(Event::Message(m)) if m.chat == *peer => {
                    let unshown: Vec<MessageRecord> = client
                        .take_unshown()
                        .await?
                        .into_iter()
                        .filter(|u| u.chat == *peer || { out.message(u); false })
                        .collect();
                    for u in unshown {
                        out.chat_line(&u);
                    }
                    let _ = m;
                }
                Ok(Event::Status { chat, id, status }) if chat == *peer => out.status(&id, status),
                Ok(Event::Typing { phone, typing }) if phone == *peer => {
                    if typing {
                        out.note(&format!("{peer} is typing…"));
                    }
                }
                Ok(Event::Presence { phone, presence }) if phone == *peer => {
                    out.note(&format!("{peer} is {}", output::presence_words(presence)));
                }
                Ok(Event::Disconnected) => out.note("connection lost; reconnecting…"),
                Ok(Event::Connected) => {}
                Ok(Event::DeviceRemoved(r)) => return Err(ClientError::DeviceRemoved(r).into()),
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(_) => break,
            }
        }
    }
    let _ = client.wait_outbox_empty(Duration::from_secs(3)).await;
    client.disconnect().await;
    Ok(())
}

async fn link_companion(
    client: &Client,
    out: &Printer,
    png: Option<&std::path::Path>,
    name: &str,
    timeout: u64,
    json: bool,
) -> anyhow::Result<()> {
    let mut failure = None;
    let events = client.subscribe();
    let me = client
        .link_as_companion(name, Duration::from_secs(timeout), |code| {
            let text = code.to_text();
            if let Some(path) = png
                && let Err(e) = qr::write_png(&text, path)
            {
                failure.get_or_insert(e);
            }
            match qr::render_terminal(&text) {
                Ok(drawing) => out.link_code(&text, &drawing, png),
                Err(e) => {
                    failure.get_or_insert(e);
                }
            }
        })
        .await?;
    if let Some(e) = failure {
        return Err(e);
    }
    out.linked_as(&me);
    history_progress(events, json).await;
    client.disconnect().await;
    Ok(())
}

/// After linking: a progress bar over the history chunks the phone sends, until the last one is in or
/// 60 s pass without a new chunk.
async fn history_progress(mut events: tokio::sync::broadcast::Receiver<Event>, json: bool) {
    const QUIET: Duration = Duration::from_secs(60);
    let bar = count_bar(json, "importing history", "chunks");
    let (mut done, mut messages, mut failed) = (0u32, 0u64, 0u32);
    loop {
        match tokio::time::timeout(QUIET, events.recv()).await {
            Ok(Ok(Event::HistoryImported {
                chunk_index,
                chunk_count,
                messages: n,
                chat: None,
            })) => {
                done += 1;
                messages += u64::from(n);
                bar.set_length(u64::from(chunk_count));
                bar.set_position(u64::from(done + failed));
                if chunk_index + 1 >= chunk_count {
                    break;
                }
            }
            Ok(Ok(Event::HistoryFailed {
                chunk_index,
                chunk_count,
                reason,
                chat: None,
            })) => {
                failed += 1;
                bar.suspend(|| eprintln!("history chunk {} refused: {reason}", chunk_index + 1));
                bar.set_length(u64::from(chunk_count));
                bar.set_position(u64::from(done + failed));
                if chunk_index + 1 >= chunk_count {
                    break;
                }
            }
            Ok(Ok(_)) | Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => {}
            Ok(Err(_)) | Err(_) => break,
        }
    }
    bar.finish_and_clear();
    if !json {
        eprintln!("history: {messages} messages imported in {done} chunks, {failed} refused");
    }
}

/// On a companion: asks the phone for older messages of `peer` and waits (60 s at most) for them.
async fn fetch_older(client: &Client, peer: &PhoneNumber) -> anyhow::Result<()> {
    let me = client.whoami().await?.ok_or(ClientError::NotRegistered)?;
    if me.device_id == natter_proto::DeviceId::PRIMARY {
        eprintln!("this is the phone: it holds all the history there is; nothing older to fetch");
        return Ok(());
    }
    let mut events = client.subscribe();
    client.connect().await?;
    client.request_older_history(peer).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Ok(Event::HistoryImported {
                chunk_index,
                chunk_count,
                chat: Some(c),
                ..
            })) if c == *peer && chunk_index + 1 >= chunk_count => break,
            Ok(Ok(Event::HistoryFailed {
                chat: Some(c),
                reason,
                ..
            })) if c == *peer => {
                client.disconnect().await;
                return Err(
                    ClientError::InvalidInput(format!("older history refused: {reason}")).into(),
                );
            }
            Ok(Ok(_)) | Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => {}
            Ok(Err(_)) | Err(_) => {
                eprintln!(
                    "the phone did not answer within 60 s (is it online?); showing what is here"
                );
                break;
            }
        }
    }
    client.disconnect().await;
    Ok(())
}

async fn link(
    client: &Client,
    out: &Printer,
    code: &str,
    yes: bool,
    history: &natter_client::HistoryOptions,
) -> anyhow::Result<()> {
    let path = std::path::Path::new(code);
    let text = if !code.starts_with(natter_proto::link::QR_PREFIX) && path.exists() {
        qr::read_png(path)?
    } else {
        code.to_owned()
    };
    let request = natter_proto::link::LinkQr::from_text(&text)
        .map_err(|e| ClientError::InvalidInput(format!("not a Natter link code: {e}")))?;
    let me = client.whoami().await?.ok_or(ClientError::NotRegistered)?;
    if !yes {
        let question = format!(
            "Link \"{}\" (key {}) to {}? It will read and send your messages. [y/N] ",
            request.name,
            natter_client::link::fingerprint(&request.identity_ed),
            me.phone
        );
        if !confirm(&question).await? {
            return Err(ClientError::InvalidInput("linking cancelled".into()).into());
        }
    }
    client.connect().await?;
    let linked = client.link_device(&request).await?;
    out.linked(&linked);
    let device = natter_proto::DeviceId::new(linked.device_id)
        .map_err(|e| ClientError::InvalidInput(e.to_string()))?;
    let sent = client.send_history(device, history).await?;
    eprintln!(
        "history: {} messages in {} chunks ({} bytes){}",
        sent.messages,
        sent.chunks,
        sent.blob_bytes,
        if sent.delivered {
            ""
        } else {
            "; not all delivered yet: they go out on the next connection"
        }
    );
    client.disconnect().await;
    Ok(())
}

/// Asks on the terminal; no answer (stdin closed) counts as no.
async fn confirm(question: &str) -> anyhow::Result<bool> {
    use tokio::io::AsyncWriteExt;
    let mut stderr = tokio::io::stderr();
    stderr.write_all(question.as_bytes()).await?;
    stderr.flush().await?;
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let answer = lines.next_line().await?.unwrap_or_default();
    Ok(matches!(answer.trim(), "y" | "Y" | "yes" | "YES" | "Yes"))
}
