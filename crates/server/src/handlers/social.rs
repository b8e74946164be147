//! Contacts and presence: discovery (which numbers are registered; the rest is forgotten, never stored
//! or logged), encrypted profiles, privacy settings, blocking, presence follows and typing relays.

use std::time::{Duration, Instant};

use natter_proto::PhoneNumber;
use natter_proto::limits::{
    MAX_DISCOVERY_BATCH, MAX_PRESENCE_SUBSCRIPTIONS, MAX_PROFILE_CIPHERTEXT,
};
use natter_proto::social::{
    Block, Discover, Discovered, ForgetContacts, GetPrivacy, GetProfile, Privacy, PrivacySettings,
    Profile, SendTyping, SetPrivacy, SetProfile, SubscribePresence, Typing, Visibility,
};
use natter_proto::wire::{Done, Error, ErrorCode, Push, push, response};

use super::{RequestCtx, bad_request, parse_phone, store_error};
use crate::config::ServerConfig;
use crate::delivery::ConnEvent;
use crate::registration::ratelimit::RateLimiter;
use crate::store::PrivacyRecord;

const DAY: Duration = Duration::from_secs(24 * 3600);

/// Numbers looked up per account and per client IP, per day (in memory, like the other rate limits).
#[derive(Debug)]
pub struct DiscoveryQuotas {
    per_account: RateLimiter<PhoneNumber>,
    per_ip: RateLimiter<std::net::IpAddr>,
}

impl DiscoveryQuotas {
    /// The quotas of `config`.
    pub fn new(config: &ServerConfig) -> Self {
        Self {
            per_account: RateLimiter::new(config.discovery_account_quota, DAY),
            per_ip: RateLimiter::new(config.discovery_ip_quota, DAY),
        }
    }
}

fn quota_error(what: &str, wait: Duration) -> Error {
    let mut e = Error::new(
        ErrorCode::RateLimited,
        format!(
            "the daily contact-lookup quota of this {what} is used up; try again in {} min",
            wait.as_secs().div_ceil(60)
        ),
    );
    e.retry_after_ms = wait.as_millis() as u64;
    e
}

fn numbers(raw: &[String]) -> Result<Vec<PhoneNumber>, Error> {
    if raw.len() > MAX_DISCOVERY_BATCH {
        return Err(Error::new(
            ErrorCode::LimitExceeded,
            format!(
                "{} numbers in one request; at most {MAX_DISCOVERY_BATCH}",
                raw.len()
            ),
        ));
    }
    raw.iter().map(|n| parse_phone(n)).collect()
}

/// Which of the numbers are registered. Counted against both quotas first; nothing about a number that
/// is not registered is kept.
pub async fn discover(ctx: &RequestCtx, r: Discover) -> Result<response::Body, Error> {
    let login = ctx.require_login()?;
    let asked = numbers(&r.numbers)?;
    let n = u32::try_from(asked.len()).unwrap_or(u32::MAX);
    let now = Instant::now();
    let quotas = &ctx.state.discovery;
    // Checked on both before either counts, so a refusal by one does not use up the other.
    quotas
        .per_account
        .would_allow(&login.phone, n, now)
        .map_err(|wait| quota_error("account", wait))?;
    quotas
        .per_ip
        .take(&ctx.peer_ip, n, now)
        .map_err(|wait| quota_error("network address", wait))?;
    let left = quotas
        .per_account
        .take(&login.phone, n, now)
        .map_err(|wait| quota_error("account", wait))?;
    let store = &ctx.state.store;
    let registered = store.registered_among(&asked).await.map_err(store_error)?;
    if r.remember && !registered.is_empty() {
        let others: Vec<PhoneNumber> = registered
            .iter()
            .filter(|p| **p != login.phone)
            .cloned()
            .collect();
        store
            .add_contacts(&login.phone, &others)
            .await
            .map_err(store_error)?;
    }
    Ok(response::Body::Discovered(Discovered {
        registered: registered.iter().map(|p| p.as_str().to_owned()).collect(),
        remaining_today: u64::from(left),
    }))
}

/// Removes numbers from the caller's contacts.
pub async fn forget_contacts(ctx: &RequestCtx, r: ForgetContacts) -> Result<response::Body, Error> {
    let login = ctx.require_login()?;
    let gone = numbers(&r.numbers)?;
    ctx.state
        .store
        .remove_contacts(&login.phone, &gone)
        .await
        .map_err(store_error)?;
    Ok(response::Body::Done(Done {}))
}

/// Stores the caller's encrypted profile.
pub async fn set_profile(ctx: &RequestCtx, r: SetProfile) -> Result<response::Body, Error> {
    let login = ctx.require_login()?;
    if r.ciphertext.len() > MAX_PROFILE_CIPHERTEXT {
        return Err(Error::new(
            ErrorCode::LimitExceeded,
            format!(
                "the encrypted profile has {} bytes; at most {MAX_PROFILE_CIPHERTEXT}",
                r.ciphertext.len()
            ),
        ));
    }
    ctx.state
        .store
        .set_profile(&login.phone, &r.ciphertext, crate::now_ms())
        .await
        .map_err(store_error)?;
    Ok(response::Body::Done(Done {}))
}

pub(crate) fn blocked_error(phone: &PhoneNumber) -> Error {
    Error::new(
        ErrorCode::Blocked,
        format!("{phone} does not accept this from you"),
    )
}

/// An account's encrypted profile; refused if its owner blocked the caller.
pub async fn get_profile(ctx: &RequestCtx, r: GetProfile) -> Result<response::Body, Error> {
    let login = ctx.require_login()?;
    let owner = parse_phone(&r.phone)?;
    let store = &ctx.state.store;
    if store
        .is_blocked(&owner, &login.phone)
        .await
        .map_err(store_error)?
    {
        return Err(blocked_error(&owner));
    }
    let (ciphertext, updated_ms) = store
        .get_profile(&owner)
        .await
        .map_err(store_error)?
        .unwrap_or_default();
    Ok(response::Body::Profile(Profile {
        phone: owner.as_str().to_owned(),
        ciphertext,
        updated_ms,
    }))
}

/// Replaces the caller's privacy settings; followers see the effect at once.
pub async fn set_privacy(ctx: &RequestCtx, r: SetPrivacy) -> Result<response::Body, Error> {
    let login = ctx.require_login()?;
    let settings = r
        .settings
        .ok_or_else(|| bad_request("no privacy settings given"))?;
    let last_seen = Visibility::try_from(settings.last_seen)
        .map_err(|_| bad_request("unknown last-seen visibility"))?;
    let store = &ctx.state.store;
    store
        .set_privacy(
            &login.phone,
            PrivacyRecord {
                last_seen,
                read_receipts_off: settings.read_receipts_off,
            },
        )
        .await
        .map_err(store_error)?;
    Ok(response::Body::Done(Done {}))
}

/// The caller's privacy settings and blocked numbers.
pub async fn get_privacy(ctx: &RequestCtx, _r: GetPrivacy) -> Result<response::Body, Error> {
    let login = ctx.require_login()?;
    let store = &ctx.state.store;
    let p = store.get_privacy(&login.phone).await.map_err(store_error)?;
    let blocked = store.blocked(&login.phone).await.map_err(store_error)?;
    Ok(response::Body::Privacy(Privacy {
        settings: Some(PrivacySettings {
            last_seen: p.last_seen as i32,
            read_receipts_off: p.read_receipts_off,
        }),
        blocked: blocked.iter().map(|p| p.as_str().to_owned()).collect(),
    }))
}

/// Blocks or unblocks an account. Only registered accounts can be blocked (the server keeps no other
/// number).
pub async fn block(ctx: &RequestCtx, r: Block) -> Result<response::Body, Error> {
    let login = ctx.require_login()?;
    let other = parse_phone(&r.phone)?;
    if other == login.phone {
        return Err(bad_request("you cannot block yourself"));
    }
    let store = &ctx.state.store;
    if r.blocked
        && store
            .get_account(&other)
            .await
            .map_err(store_error)?
            .is_none()
    {
        return Err(super::register::unknown_account(&other));
    }
    store
        .set_blocked(&login.phone, &other, r.blocked)
        .await
        .map_err(store_error)?;
    ctx.state.block_cache.invalidate(&login.phone);
    Ok(response::Body::Done(Done {}))
}

/// Answers an account's presence as the caller may see it, and follows it for this connection.
pub async fn subscribe_presence(
    ctx: &RequestCtx,
    r: SubscribePresence,
) -> Result<response::Body, Error> {
    let login = ctx.require_login()?;
    let owner = parse_phone(&r.phone)?;
    let presence = &ctx.state.presence;
    if !presence.follow(&owner, &login.phone, &ctx.conn, MAX_PRESENCE_SUBSCRIPTIONS) {
        return Err(Error::new(
            ErrorCode::LimitExceeded,
            format!("one connection follows at most {MAX_PRESENCE_SUBSCRIPTIONS} accounts"),
        ));
    }
    let state = presence
        .state_for(&*ctx.state.store, &owner, &login.phone)
        .await
        .map_err(store_error)?;
    Ok(response::Body::Presence(state))
}

/// Relays "typing" to the partner's online devices (never stored); refused if either side blocked the
/// other.
pub async fn send_typing(ctx: &RequestCtx, r: SendTyping) -> Result<response::Body, Error> {
    let login = ctx.require_login()?;
    let to = parse_phone(&r.to)?;
    let store = &ctx.state.store;
    if store
        .is_blocked(&to, &login.phone)
        .await
        .map_err(store_error)?
    {
        return Err(blocked_error(&to));
    }
    if store
        .is_blocked(&login.phone, &to)
        .await
        .map_err(store_error)?
    {
        return Ok(response::Body::Done(Done {}));
    }
    let ids = ctx.state.device_ids(&to).await.map_err(store_error)?;
    let typing = Typing {
        from: login.phone.as_str().to_owned(),
        typing: r.typing,
    };
    for device in ids.iter().copied() {
        if to == login.phone && device == login.device {
            continue;
        }
        ctx.state.router.notify(
            &to,
            device,
            ConnEvent::push(Push {
                body: Some(push::Body::Typing(typing.clone())),
            }),
        );
    }
    Ok(response::Body::Done(Done {}))
}

/// Whether the recipient blocked the sender: the send path refuses such a message.
pub async fn check_not_blocked(
    ctx: &RequestCtx,
    recipient: &PhoneNumber,
    sender: &PhoneNumber,
) -> Result<(), Error> {
    if recipient != sender
        && ctx
            .state
            .is_blocked(recipient, sender)
            .await
            .map_err(store_error)?
    {
        return Err(blocked_error(recipient));
    }
    Ok(())
}
