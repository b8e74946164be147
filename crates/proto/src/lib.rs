//! natter-proto: everything that crosses the wire between a Natter client and `natterd`, and nothing else.
//!
//! # Layout
//! - [`ids`]: validated identifiers ([`PhoneNumber`], [`DeviceId`], [`MessageId`]).
//! - [`limits`]: every size, count and time limit of the protocol, as named constants.
//! - [`wire`]: the protobuf messages of the client–server protocol ([`wire::Frame`] and what it holds).
//! - [`content`]: the protobuf messages that travel end-to-end encrypted inside an envelope.
//! - [`device_list`]: the signed device list's wire form and its canonical signing inputs.
//! - [`group`]: group membership requests, the group send and what member devices receive.
//! - [`link`]: the companion's QR code and the sealed payloads of linking.
//! - [`frame`]: length-prefixed frame codec ([`frame::FrameDecoder`], [`frame::encode_frame`]).
//! - [`noise`]: the sans-IO Noise channel: handshake ([`noise::Handshake`]) and encrypted records
//!   ([`noise::SecureChannel`]).
//!
//! This crate does no I/O, spawns nothing and stores nothing: both `natterd` and the client drive it
//! from their own sockets.

pub mod content;
pub mod device_list;
pub mod error;
pub mod frame;
pub mod fuzzing;
pub mod group;
pub mod ids;
pub mod limits;
pub mod link;
pub mod noise;
pub mod social;
pub mod wire;

pub use error::ProtoError;
pub use ids::{DeviceId, GroupId, IdError, MessageId, PhoneNumber};

/// The protocol version this build speaks. Sent in the first frame of every connection.
pub const PROTOCOL_VERSION: u32 = 1;
