//! Groups: create, change (membership, admins, settings, leave), read, list; the group send (one Megolm
//! ciphertext fanned out to every member device, one queue row per device) and the batched pairwise key
//! shares. Every change is written together with its announcement to every member device (and to the
//! removed ones) in one store transaction, so devices see changes in version order and a removed member
//! is sent nothing after its removal.

use std::collections::{BTreeMap, BTreeSet};

use natter_proto::group::{
    CreateGroup, ENVELOPE_GROUP_CHANGE, ENVELOPE_GROUP_MESSAGE, GetGroup, GroupChange, GroupInfo,
    GroupMember, GroupMessage, Groups, ListGroups, SendGroupMessage, ShareGroupKeys, UpdateGroup,
};
use natter_proto::limits::{
    MAX_GROUP_CIPHERTEXT, MAX_GROUP_DESCRIPTION, MAX_GROUP_MEMBERS, MAX_GROUP_NAME,
    MAX_KEY_SHARES_PER_REQUEST, MAX_SHORT_TEXT,
};
use natter_proto::wire::{Error, ErrorCode, response};
use natter_proto::{DeviceId, GroupId, MessageId, PhoneNumber};
use prost::Message;

use super::register::unknown_account;
use super::send::{route, store_and_route};
use super::social::blocked_error;
use super::{Login, RequestCtx, bad_request, parse_phone, store_error};
use crate::store::{
    GroupMemberRecord, GroupRecord, GroupState, NewEnvelope, NewMessage, StoreError,
};

/// How often a change is tried again when another change of the same group won the race.
const MAX_CONFLICT_RETRIES: usize = 5;

fn group_id(bytes: &[u8]) -> Result<GroupId, Error> {
    GroupId::from_slice(bytes).map_err(|e| bad_request(e.to_string()))
}

fn unknown_group() -> Error {
    Error::new(ErrorCode::UnknownGroup, "no such group")
}

fn not_member() -> Error {
    Error::new(
        ErrorCode::NotGroupMember,
        "you are not a member of this group",
    )
}

fn not_admin(what: &str) -> Error {
    Error::new(
        ErrorCode::NotGroupAdmin,
        format!("only the group's admins may {what}"),
    )
}

fn too_many(n: usize) -> Error {
    Error::new(
        ErrorCode::LimitExceeded,
        format!("a group has at most {MAX_GROUP_MEMBERS} members; this change would make it {n}"),
    )
}

fn check_name(name: &str) -> Result<(), Error> {
    if name.trim().is_empty() {
        return Err(bad_request("a group needs a name"));
    }
    if name.len() > MAX_GROUP_NAME {
        return Err(Error::new(
            ErrorCode::LimitExceeded,
            format!("a group name has at most {MAX_GROUP_NAME} bytes"),
        ));
    }
    Ok(())
}

fn check_description(d: &str) -> Result<(), Error> {
    if d.len() > MAX_GROUP_DESCRIPTION {
        return Err(Error::new(
            ErrorCode::LimitExceeded,
            format!("a group description has at most {MAX_GROUP_DESCRIPTION} bytes"),
        ));
    }
    Ok(())
}

/// Numbers from the wire, each once, at most `MAX_GROUP_MEMBERS` (more is refused before parsing).
fn phones(list: &[String]) -> Result<BTreeSet<PhoneNumber>, Error> {
    if list.len() > MAX_GROUP_MEMBERS {
        return Err(too_many(list.len()));
    }
    list.iter().map(|p| parse_phone(p)).collect()
}

/// The wire form of a stored group.
pub fn info(state: &GroupState) -> GroupInfo {
    GroupInfo {
        group_id: state.group.id.as_bytes().to_vec(),
        name: state.group.name.clone(),
        description: state.group.description.clone(),
        version: state.group.version,
        all_members_may_edit: state.group.all_members_may_edit,
        members: state
            .members
            .iter()
            .map(|m| GroupMember {
                phone: m.phone.as_str().to_owned(),
                admin: m.admin,
            })
            .collect(),
    }
}

/// Checks that an account may be added by `actor`: it exists and has not blocked `actor`.
async fn check_addable(
    ctx: &RequestCtx,
    phone: &PhoneNumber,
    actor: &PhoneNumber,
) -> Result<(), Error> {
    if ctx
        .state
        .device_ids(phone)
        .await
        .map_err(store_error)?
        .is_empty()
    {
        return Err(unknown_account(phone));
    }
    if phone != actor
        && ctx
            .state
            .store
            .is_blocked(phone, actor)
            .await
            .map_err(store_error)?
    {
        return Err(blocked_error(phone));
    }
    Ok(())
}

/// The announcement of a change: the delta for members who knew the group, the whole state for those
/// who did not (`newcomers`), to every device of the members after the change and of `removed`, except
/// the device that made it (it has the response).
async fn announcement(
    ctx: &RequestCtx,
    login: &Login,
    after: &GroupState,
    mut change: GroupChange,
    newcomers: &BTreeSet<PhoneNumber>,
    removed: &BTreeSet<PhoneNumber>,
) -> Result<NewMessage, Error> {
    let delta = change.encode_to_vec();
    change.full = Some(info(after));
    let full = change.encode_to_vec();
    let mut envelopes = Vec::new();
    let recipients = after.members.iter().map(|m| &m.phone).chain(removed.iter());
    for phone in recipients {
        let body = if newcomers.contains(phone) {
            &full
        } else {
            &delta
        };
        for device in ctx
            .state
            .device_ids(phone)
            .await
            .map_err(store_error)?
            .iter()
        {
            if *phone == login.phone && *device == login.device {
                continue;
            }
            envelopes.push(NewEnvelope {
                phone: phone.clone(),
                device_id: *device,
                olm_type: ENVELOPE_GROUP_CHANGE,
                ciphertext: body.clone(),
            });
        }
    }
    // Unique per (group, version), and the version only ever grows: a stored change is never repeated.
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&after.group.id.as_bytes()[..8]);
    id[8..].copy_from_slice(&after.group.version.to_be_bytes());
    let now = crate::now_ms();
    Ok(NewMessage {
        sender: login.phone.clone(),
        sender_device: login.device,
        message_id: MessageId::from_bytes(id),
        server_ts_ms: now,
        expires_at_ms: now + ctx.state.config.envelope_retention.as_millis() as u64,
        envelopes,
        retry: None,
    })
}

/// `CreateGroup`: the caller is the first admin; everyone else is a member.
pub async fn create_group(ctx: &RequestCtx, r: CreateGroup) -> Result<response::Body, Error> {
    let login = ctx.require_login()?;
    let id = group_id(&r.group_id)?;
    check_name(&r.name)?;
    check_description(&r.description)?;
    let mut members = phones(&r.members)?;
    members.insert(login.phone.clone());
    if members.len() > MAX_GROUP_MEMBERS {
        return Err(too_many(members.len()));
    }
    for m in &members {
        check_addable(ctx, m, &login.phone).await?;
    }
    let state = GroupState {
        group: GroupRecord {
            id,
            name: r.name.clone(),
            description: r.description.clone(),
            version: 1,
            all_members_may_edit: false,
            created_at_ms: crate::now_ms(),
        },
        members: members
            .iter()
            .map(|p| GroupMemberRecord {
                phone: p.clone(),
                admin: *p == login.phone,
                added_at_version: 1,
            })
            .collect(),
    };
    let change = GroupChange {
        group_id: id.as_bytes().to_vec(),
        version: 1,
        actor: login.phone.as_str().to_owned(),
        added: info(&state).members,
        name: r.name,
        description: r.description,
        ..Default::default()
    };
    let msg = announcement(ctx, login, &state, change, &members, &BTreeSet::new()).await?;
    let queued = match ctx.state.store.create_group(&state, msg).await {
        Ok(q) => q,
        Err(StoreError::Conflict) => return Err(bad_request("this group id is taken")),
        Err(e) => return Err(store_error(e)),
    };
    route(ctx, queued);
    tracing::debug!(members = state.members.len(), "group created");
    Ok(response::Body::Group(info(&state)))
}

/// A validated change, applied to a state.
struct Applied {
    after: GroupState,
    change: GroupChange,
    newcomers: BTreeSet<PhoneNumber>,
    removed: BTreeSet<PhoneNumber>,
}

/// Checks the caller's rights and applies a change to `before` (no I/O but the added accounts' checks).
async fn apply(
    ctx: &RequestCtx,
    login: &Login,
    before: &GroupState,
    r: &UpdateGroup,
) -> Result<Applied, Error> {
    let me = before
        .members
        .iter()
        .find(|m| m.phone == login.phone)
        .ok_or_else(not_member)?;
    let add = phones(&r.add)?;
    let remove = phones(&r.remove)?;
    let promote = phones(&r.promote)?;
    let demote = phones(&r.demote)?;
    let leaving_only = remove.len() == 1
        && remove.contains(&login.phone)
        && add.is_empty()
        && promote.is_empty()
        && demote.is_empty()
        && r.name.is_none()
        && r.description.is_none()
        && r.all_members_may_edit.is_none();
    let may_edit = me.admin || before.group.all_members_may_edit;
    if !leaving_only {
        if !may_edit && (!add.is_empty() || !remove.is_empty()) {
            return Err(not_admin("add or remove members"));
        }
        if !may_edit && (r.name.is_some() || r.description.is_some()) {
            return Err(not_admin("change the name or description"));
        }
        if !me.admin && (!promote.is_empty() || !demote.is_empty()) {
            return Err(not_admin("promote or demote members"));
        }
        if !me.admin && r.all_members_may_edit.is_some() {
            return Err(not_admin("change who may edit the group"));
        }
    }
    let version = before.group.version + 1;
    let mut members: BTreeMap<PhoneNumber, GroupMemberRecord> = before
        .members
        .iter()
        .map(|m| (m.phone.clone(), m.clone()))
        .collect();
    for p in &remove {
        if members.remove(p).is_none() {
            return Err(bad_request(format!("{p} is not a member of this group")));
        }
    }
    let mut newcomers = BTreeSet::new();
    for p in &add {
        if members.contains_key(p) {
            continue; // already a member: nothing to do
        }
        check_addable(ctx, p, &login.phone).await?;
        members.insert(
            p.clone(),
            GroupMemberRecord {
                phone: p.clone(),
                admin: false,
                added_at_version: version,
            },
        );
        newcomers.insert(p.clone());
    }
    if members.len() > MAX_GROUP_MEMBERS {
        return Err(too_many(members.len()));
    }
    let mut promoted = Vec::new();
    let mut demoted = Vec::new();
    for (set, admin, out) in [
        (&promote, true, &mut promoted),
        (&demote, false, &mut demoted),
    ] {
        for p in set {
            let m = members
                .get_mut(p)
                .ok_or_else(|| bad_request(format!("{p} is not a member of this group")))?;
            if m.admin != admin {
                m.admin = admin;
                out.push(p.as_str().to_owned());
            }
        }
    }
    // A group keeps an admin: when the last one goes, the member who has been in it longest (then the
    // lowest number) becomes one.
    if !members.values().any(|m| m.admin)
        && let Some(m) = members
            .values_mut()
            .min_by(|a, b| (a.added_at_version, &a.phone).cmp(&(b.added_at_version, &b.phone)))
    {
        m.admin = true;
        promoted.push(m.phone.as_str().to_owned());
    }
    let name = r.name.clone().unwrap_or_else(|| before.group.name.clone());
    let description = r
        .description
        .clone()
        .unwrap_or_else(|| before.group.description.clone());
    check_name(&name)?;
    check_description(&description)?;
    let after = GroupState {
        group: GroupRecord {
            name: name.clone(),
            description: description.clone(),
            version,
            all_members_may_edit: r
                .all_members_may_edit
                .unwrap_or(before.group.all_members_may_edit),
            ..before.group.clone()
        },
        members: members.into_values().collect(),
    };
    let change = GroupChange {
        group_id: before.group.id.as_bytes().to_vec(),
        version,
        actor: login.phone.as_str().to_owned(),
        added: after
            .members
            .iter()
            .filter(|m| newcomers.contains(&m.phone))
            .map(|m| GroupMember {
                phone: m.phone.as_str().to_owned(),
                admin: m.admin,
            })
            .collect(),
        removed: remove.iter().map(|p| p.as_str().to_owned()).collect(),
        promoted,
        demoted,
        name,
        description,
        all_members_may_edit: after.group.all_members_may_edit,
        full: None,
    };
    Ok(Applied {
        after,
        change,
        newcomers,
        removed: remove,
    })
}

/// `UpdateGroup`: membership, admins, settings, or leaving.
pub async fn update_group(ctx: &RequestCtx, r: UpdateGroup) -> Result<response::Body, Error> {
    let login = ctx.require_login()?;
    let id = group_id(&r.group_id)?;
    for _ in 0..MAX_CONFLICT_RETRIES {
        let before = ctx
            .state
            .store
            .get_group(&id)
            .await
            .map_err(store_error)?
            .ok_or_else(unknown_group)?;
        let a = apply(ctx, login, &before, &r).await?;
        let msg = announcement(ctx, login, &a.after, a.change, &a.newcomers, &a.removed).await?;
        match ctx
            .state
            .store
            .update_group(before.group.version, &a.after, msg)
            .await
        {
            Ok(queued) => {
                route(ctx, queued);
                return Ok(response::Body::Group(info(&a.after)));
            }
            // Another change won the race: apply this one to the new state.
            Err(StoreError::Conflict) => continue,
            Err(StoreError::NoSuchGroup) => return Err(unknown_group()),
            Err(e) => return Err(store_error(e)),
        }
    }
    Err(Error::new(
        ErrorCode::Unavailable,
        "the group is changing too fast; retry",
    ))
}

/// A group the caller is a member of.
async fn member_group(ctx: &RequestCtx, login: &Login, id: &GroupId) -> Result<GroupState, Error> {
    let state = ctx
        .state
        .store
        .get_group(id)
        .await
        .map_err(store_error)?
        .ok_or_else(unknown_group)?;
    if !state.members.iter().any(|m| m.phone == login.phone) {
        return Err(not_member());
    }
    Ok(state)
}

/// `GetGroup`: for members only.
pub async fn get_group(ctx: &RequestCtx, r: GetGroup) -> Result<response::Body, Error> {
    let login = ctx.require_login()?;
    let id = group_id(&r.group_id)?;
    let state = member_group(ctx, login, &id).await?;
    Ok(response::Body::Group(info(&state)))
}

/// `ListGroups`: every group of the caller's account.
pub async fn list_groups(ctx: &RequestCtx, _r: ListGroups) -> Result<response::Body, Error> {
    let login = ctx.require_login()?;
    let store = &ctx.state.store;
    let mut groups = Vec::new();
    for id in store.groups_of(&login.phone).await.map_err(store_error)? {
        if let Some(state) = store.get_group(&id).await.map_err(store_error)? {
            groups.push(info(&state));
        }
    }
    Ok(response::Body::Groups(Groups { groups }))
}

/// Stores a fan-out durably (one enqueue: all envelopes or none) and routes it.
async fn fan_out(
    ctx: &RequestCtx,
    login: &Login,
    message_id: MessageId,
    envelopes: Vec<NewEnvelope>,
) -> Result<response::Body, Error> {
    store_and_route(ctx, login, message_id, envelopes, None, |e| match e {
        // A member device went away between the read and the write: the sender refreshes and retries.
        StoreError::NoSuchDevice => {
            Error::new(ErrorCode::GroupChanged, "a member's devices changed; retry")
        }
        e => store_error(e),
    })
    .await
}

/// `SendGroupMessage`: one Megolm ciphertext to every device of every member (but the sending device
/// and members who blocked the sender), if the sender encrypted for the current version.
pub async fn send_group_message(
    ctx: &RequestCtx,
    r: SendGroupMessage,
) -> Result<response::Body, Error> {
    let login = ctx.require_login()?;
    let id = group_id(&r.group_id)?;
    let message_id =
        MessageId::from_slice(&r.message_id).map_err(|e| bad_request(e.to_string()))?;
    if r.ciphertext.is_empty() {
        return Err(bad_request("empty ciphertext"));
    }
    if r.ciphertext.len() > MAX_GROUP_CIPHERTEXT {
        return Err(Error::new(
            ErrorCode::LimitExceeded,
            format!("a group message has at most {MAX_GROUP_CIPHERTEXT} bytes of ciphertext"),
        ));
    }
    if r.session_id.is_empty() || r.session_id.len() > MAX_SHORT_TEXT {
        return Err(bad_request("invalid session id"));
    }
    let store = &ctx.state.store;
    let state = member_group(ctx, login, &id).await?;
    if r.group_version != state.group.version {
        let mut e = Error::new(
            ErrorCode::GroupChanged,
            format!(
                "the group changed (version {}, not {}): refresh it and encrypt again",
                state.group.version, r.group_version
            ),
        );
        e.retry_after_ms = 0;
        return Err(e);
    }
    let blockers: BTreeSet<PhoneNumber> = store
        .group_blockers(&id, &login.phone)
        .await
        .map_err(store_error)?
        .into_iter()
        .collect();
    let body = GroupMessage {
        group_id: r.group_id,
        session_id: r.session_id,
        ciphertext: r.ciphertext,
    }
    .encode_to_vec();
    let devices = store.group_devices(&id).await.map_err(store_error)?;
    if !r.devices_digest.is_empty() {
        let ours = natter_proto::group::devices_digest(
            devices
                .iter()
                .filter(|(p, d)| !(*p == login.phone && *d == login.device))
                .map(|(p, d)| (p.as_str(), d.get())),
        );
        if ours != r.devices_digest {
            return Err(Error::new(
                ErrorCode::GroupChanged,
                "the members' devices changed: refresh their device lists and encrypt again",
            ));
        }
    }
    let envelopes: Vec<NewEnvelope> = devices
        .into_iter()
        .filter(|(p, d)| !(blockers.contains(p) || (*p == login.phone && *d == login.device)))
        .map(|(phone, device_id)| NewEnvelope {
            phone,
            device_id,
            olm_type: ENVELOPE_GROUP_MESSAGE,
            ciphertext: body.clone(),
        })
        .collect();
    fan_out(ctx, login, message_id, envelopes).await
}

/// `ShareGroupKeys`: pairwise Olm messages to member devices (those of members who blocked the sender
/// are dropped, as their group messages are).
pub async fn share_group_keys(
    ctx: &RequestCtx,
    r: ShareGroupKeys,
) -> Result<response::Body, Error> {
    let login = ctx.require_login()?;
    let id = group_id(&r.group_id)?;
    let message_id =
        MessageId::from_slice(&r.message_id).map_err(|e| bad_request(e.to_string()))?;
    if r.shares.is_empty() {
        return Err(bad_request("no key shares"));
    }
    if r.shares.len() > MAX_KEY_SHARES_PER_REQUEST {
        return Err(Error::new(
            ErrorCode::LimitExceeded,
            format!("at most {MAX_KEY_SHARES_PER_REQUEST} key shares per request"),
        ));
    }
    let store = &ctx.state.store;
    member_group(ctx, login, &id).await?;
    let devices: BTreeSet<(PhoneNumber, DeviceId)> = store
        .group_devices(&id)
        .await
        .map_err(store_error)?
        .into_iter()
        .collect();
    let blockers: BTreeSet<PhoneNumber> = store
        .group_blockers(&id, &login.phone)
        .await
        .map_err(store_error)?
        .into_iter()
        .collect();
    let mut seen = BTreeSet::new();
    let mut envelopes = Vec::with_capacity(r.shares.len());
    for m in r.shares {
        let phone = parse_phone(&m.phone)?;
        let device = DeviceId::new(m.device_id).map_err(|e| bad_request(e.to_string()))?;
        if m.olm_type > 1 || m.ciphertext.is_empty() {
            return Err(bad_request("a key share must be an Olm message"));
        }
        if m.ciphertext.len() > natter_proto::limits::MAX_ENVELOPE_CIPHERTEXT {
            return Err(Error::new(ErrorCode::LimitExceeded, "key share too large"));
        }
        if !devices.contains(&(phone.clone(), device)) {
            let mut e = Error::new(
                ErrorCode::GroupChanged,
                format!("device {device} of {phone} is not a member device: refresh the group"),
            );
            e.retry_after_ms = 0;
            return Err(e);
        }
        if !seen.insert((phone.clone(), device)) {
            return Err(bad_request("a device is addressed twice"));
        }
        if blockers.contains(&phone) {
            continue;
        }
        envelopes.push(NewEnvelope {
            phone,
            device_id: device,
            olm_type: m.olm_type,
            ciphertext: m.ciphertext,
        });
    }
    fan_out(ctx, login, message_id, envelopes).await
}
