//! Linking a companion, relayed by the server: `CreateLinkRef` (companion, anonymous), `LinkOffer`
//! (primary), `LinkAccept` (companion). The offer and the acceptance are sealed with the QR code's
//! secret, so the server passes them on without being able to read or forge them. The primary then
//! publishes the new signed list with `PublishDeviceList` (see [`super::devices`]).

use natter_proto::DeviceId;
use natter_proto::limits::MAX_SHORT_TEXT;
use natter_proto::wire::{
    CreateLinkRef, Done, Error, ErrorCode, LinkAccept, LinkAccepted, LinkOffer, LinkOffered,
    LinkRef, Push, push, response,
};

use super::{RequestCtx, bad_request};
use crate::delivery::ConnEvent;
use crate::directory::LinkSession;

/// Largest sealed payload relayed.
const MAX_SEALED: usize = 4 * MAX_SHORT_TEXT;

fn expired() -> Error {
    Error::new(
        ErrorCode::LinkExpired,
        "this link code has expired or is unknown: show a new QR code on the companion",
    )
}

fn reference(r: &[u8]) -> Result<[u8; 16], Error> {
    r.try_into()
        .map_err(|_| bad_request("a link reference is 16 bytes"))
}

/// Opens a link session for an anonymous connection.
pub async fn create_link_ref(ctx: &RequestCtx, _r: CreateLinkRef) -> Result<response::Body, Error> {
    if ctx.login.is_some() {
        return Err(bad_request("a registered device cannot be linked again"));
    }
    let mut reference = [0u8; 16];
    getrandom::fill(&mut reference)
        .map_err(|_| Error::new(ErrorCode::Internal, "no randomness"))?;
    let session = LinkSession {
        node: ctx.state.router.bus().node_id().to_owned(),
        companion: Some(ctx.conn.clone()),
        companion_noise: ctx.remote_static,
        expires_ms: crate::now_ms() + ctx.state.config.link_ttl.as_millis() as u64,
        offered_by: None,
    };
    ctx.state
        .links
        .open(reference, session)
        .await
        .ok_or_else(|| Error::new(ErrorCode::Unavailable, "too many link sessions; retry"))?;
    Ok(response::Body::LinkRef(LinkRef {
        reference: reference.to_vec(),
        expires_in_s: ctx.state.config.link_ttl.as_secs().max(1) as u32,
    }))
}

/// The primary offers its account to the companion.
pub async fn link_offer(ctx: &RequestCtx, r: LinkOffer) -> Result<response::Body, Error> {
    let login = ctx.require_login()?;
    if login.device != DeviceId::PRIMARY {
        return Err(Error::new(
            ErrorCode::NotPrimary,
            "only the primary device (the phone) can link companions",
        ));
    }
    if r.sealed.is_empty() || r.sealed.len() > MAX_SEALED {
        return Err(bad_request("malformed link offer"));
    }
    let reference = reference(&r.reference)?;
    let links = &ctx.state.links;
    let session = links.get(&reference).await.ok_or_else(expired)?;
    if session.offered_by.is_some() {
        return Err(bad_request("this link code was already used"));
    }
    // Recorded first: the companion may answer before this request returns, on another node.
    links.set_offer(&reference, login.phone.clone()).await;
    let push = Push {
        body: Some(push::Body::LinkOffered(LinkOffered {
            reference: reference.to_vec(),
            sealed: r.sealed,
        })),
    };
    if !links.push_to_companion(&reference, &session, push).await {
        links.close(&reference).await;
        return Err(expired());
    }
    Ok(response::Body::Done(Done {}))
}

/// The companion accepts; its sealed counter-signature goes to the primary.
pub async fn link_accept(ctx: &RequestCtx, r: LinkAccept) -> Result<response::Body, Error> {
    if r.sealed.is_empty() || r.sealed.len() > MAX_SEALED {
        return Err(bad_request("malformed link acceptance"));
    }
    let reference = reference(&r.reference)?;
    let links = &ctx.state.links;
    let session = links.get(&reference).await.ok_or_else(expired)?;
    if session.companion.as_ref().map(|c| c.id) != Some(ctx.conn.id) {
        return Err(bad_request(
            "this link session belongs to another connection",
        ));
    }
    let Some(primary) = session.offered_by else {
        return Err(bad_request("no primary has scanned this code yet"));
    };
    // The primary is reached as the account's primary device, on whichever node it is connected.
    let delivered = ctx.state.router.notify(
        &primary,
        DeviceId::PRIMARY,
        ConnEvent::push(Push {
            body: Some(push::Body::LinkAccepted(LinkAccepted {
                reference: reference.to_vec(),
                sealed: r.sealed,
            })),
        }),
    );
    if !delivered {
        links.close(&reference).await;
        return Err(Error::new(
            ErrorCode::LinkExpired,
            "the primary device went away: start again",
        ));
    }
    Ok(response::Body::Done(Done {}))
}
