//! Request handlers: one module per request kind. Each takes the validated context of the connection and
//! the request body and returns the response; none touches the socket.

pub mod app_state;
pub mod devices;
pub mod keys;
pub mod link;
pub mod media;
pub mod register;
pub mod send;
pub mod social;

use std::net::IpAddr;
use std::sync::Arc;

use natter_proto::wire::{Error, ErrorCode, Request, Response, request, response};
use natter_proto::{DeviceId, PhoneNumber};

use crate::server::ServerState;
use crate::store::StoreError;

/// The device a connection is logged in as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Login {
    /// Its account.
    pub phone: PhoneNumber,
    /// The device.
    pub device: DeviceId,
}

/// What a handler knows about the connection a request came on.
#[derive(Clone, Debug)]
pub struct RequestCtx {
    /// The server.
    pub state: Arc<ServerState>,
    /// The logged-in device, if any.
    pub login: Option<Login>,
    /// The client's address, for rate limits.
    pub peer_ip: IpAddr,
    /// The client's Noise static key, authenticated by the handshake.
    pub remote_static: [u8; 32],
    /// The connection, for requests whose effects come back later as pushes (linking).
    pub conn: Arc<crate::delivery::ConnShared>,
}

impl RequestCtx {
    /// The logged-in device, or the error for an anonymous connection.
    pub fn require_login(&self) -> Result<&Login, Error> {
        self.login.as_ref().ok_or_else(|| {
            Error::new(
                ErrorCode::Unauthorized,
                "this request needs a registered device: register first",
            )
        })
    }
}

/// A successful response.
pub fn ok_response(id: u64, body: response::Body) -> Response {
    Response {
        id,
        error: None,
        body: Some(body),
    }
}

/// A failed response.
pub fn error_response(id: u64, error: Error) -> Response {
    Response {
        id,
        error: Some(error),
        body: None,
    }
}

/// A store failure as the client sees it: retryable, without internals. When the database is down
/// (cluster mode, PostgreSQL restarting) the error says so and suggests when to retry.
pub fn store_error(e: StoreError) -> Error {
    tracing::warn!(error = %e, "store failure");
    if matches!(e, StoreError::Unavailable(_)) {
        let mut err = Error::new(
            ErrorCode::Unavailable,
            "storage temporarily unavailable; retry shortly",
        );
        err.retry_after_ms = STORE_RETRY_AFTER_MS;
        return err;
    }
    Error::new(
        ErrorCode::Unavailable,
        "the server could not complete the request; retry",
    )
}

/// When a client should retry after the database was unreachable.
pub const STORE_RETRY_AFTER_MS: u64 = 1_000;

/// A malformed request.
pub fn bad_request(what: impl std::fmt::Display) -> Error {
    Error::new(ErrorCode::BadRequest, what.to_string())
}

/// Parses an E.164 number from the wire.
pub fn parse_phone(s: &str) -> Result<PhoneNumber, Error> {
    PhoneNumber::from_e164(s).map_err(|e| Error::new(ErrorCode::InvalidNumber, e.to_string()))
}

/// Runs one request (all kinds except `VerifyCode`, which the connection runs itself because it changes
/// the connection's login).
pub async fn handle(ctx: &RequestCtx, req: Request) -> Response {
    let id = req.id;
    let result = match req.body {
        Some(request::Body::RequestCode(r)) => register::request_code(ctx, r).await,
        Some(request::Body::VerifyCode(_)) => Err(bad_request("verify must run on the connection")),
        Some(request::Body::UploadKeys(r)) => keys::upload_keys(ctx, r).await,
        Some(request::Body::ClaimKeys(r)) => keys::claim_keys(ctx, r).await,
        Some(request::Body::GetDevices(r)) => devices::get_devices(ctx, r).await,
        Some(request::Body::SendMessage(r)) => send::send_message(ctx, r).await,
        Some(request::Body::CreateLinkRef(r)) => link::create_link_ref(ctx, r).await,
        Some(request::Body::LinkOffer(r)) => link::link_offer(ctx, r).await,
        Some(request::Body::LinkAccept(r)) => link::link_accept(ctx, r).await,
        Some(request::Body::PublishDeviceList(r)) => devices::publish_device_list(ctx, r).await,
        Some(request::Body::RemoveSelf(r)) => devices::remove_self(ctx, r).await,
        Some(request::Body::ListOwnDevices(r)) => devices::list_own_devices(ctx, r).await,
        Some(request::Body::RequestUpload(r)) => media::request_upload(ctx, r).await,
        Some(request::Body::RequestDownload(r)) => media::request_download(ctx, r).await,
        Some(request::Body::PushAppState(r)) => app_state::push_app_state(ctx, r).await,
        Some(request::Body::FetchAppState(r)) => app_state::fetch_app_state(ctx, r).await,
        Some(request::Body::Discover(r)) => social::discover(ctx, r).await,
        Some(request::Body::ForgetContacts(r)) => social::forget_contacts(ctx, r).await,
        Some(request::Body::SetProfile(r)) => social::set_profile(ctx, r).await,
        Some(request::Body::GetProfile(r)) => social::get_profile(ctx, r).await,
        Some(request::Body::SetPrivacy(r)) => social::set_privacy(ctx, r).await,
        Some(request::Body::GetPrivacy(r)) => social::get_privacy(ctx, r).await,
        Some(request::Body::Block(r)) => social::block(ctx, r).await,
        Some(request::Body::SubscribePresence(r)) => social::subscribe_presence(ctx, r).await,
        Some(request::Body::SendTyping(r)) => social::send_typing(ctx, r).await,
        None => Err(bad_request("unknown request")),
    };
    match result {
        Ok(body) => ok_response(id, body),
        Err(e) => error_response(id, e),
    }
}
