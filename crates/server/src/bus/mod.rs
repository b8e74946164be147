//! The bus between natterd nodes: what one node tells another ("device X has mail", a push for a device,
//! a kick, presence, cache invalidation), and the small shared records a cluster needs (which node holds
//! a device's connection, open link sessions).
//!
//! - [`local`]: one node, nothing to tell anyone (the embedded default).
//! - [`nats`]: several nodes over NATS: one subject per node (`natter.node.<id>`), one for everybody
//!   (`natter.all`), the routing table kept in memory on every node from what the nodes announce.
//!
//! Nothing on the bus is durable state: envelopes are in the store before a wake-up is sent, so a lost
//! message only delays delivery until the device's node catches up ([`inbound`]). Presence and typing
//! travel here and are never written to disk.

pub mod inbound;
pub mod local;
pub mod nats;

use std::time::Duration;

use async_trait::async_trait;
use natter_proto::{DeviceId, PhoneNumber};
use tokio::sync::{mpsc, oneshot};

pub use local::LocalBus;
pub use nats::NatsBus;

/// How long a request to another node waits for its answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

/// Why a bus operation failed. All of these are transient from the cluster's point of view.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The bus is not connected, or the operation timed out.
    #[error("bus unavailable: {0}")]
    Unavailable(String),
    /// No node answered.
    #[error("no answer from node {0}")]
    NoAnswer(String),
    /// A message from another node does not decode.
    #[error("malformed bus message")]
    Malformed,
    /// A node id or key that cannot be used on the bus.
    #[error("invalid {0}")]
    Invalid(&'static str),
}

/// Result of a bus operation.
pub type BusResult<T> = Result<T, BusError>;

/// Checks a node id: 1 to 64 of `A-Z a-z 0-9 - _`.
pub fn valid_node_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The routing record's key of a device: `<digits>.<device>` (a key-value key has no `+`).
pub fn route_key(phone: &PhoneNumber, device: DeviceId) -> String {
    format!(
        "{}.{}",
        phone.as_str().trim_start_matches('+'),
        device.get()
    )
}

/// Shared small records other than routes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Bucket {
    /// Open link sessions, by hex reference.
    Links,
}

/// A message that arrived for this node, with a way to answer it if the sender waits.
#[derive(Debug)]
pub enum Inbound {
    /// A message from another node.
    Message(
        messages::BusMessage,
        Option<oneshot::Sender<messages::BusMessage>>,
    ),
    /// The bus (re)connected: messages may have been lost while it was down.
    Reconnected,
    /// This node fell behind and the bus dropped messages for it.
    Lagged,
}

/// The bus between nodes.
#[async_trait]
pub trait Bus: Send + Sync + std::fmt::Debug {
    /// This node's id.
    fn node_id(&self) -> &str;
    /// False for the single-node bus: every device is local and nothing is sent anywhere.
    fn clustered(&self) -> bool;
    /// Sends a message to one node (fire and forget).
    async fn send(&self, node: &str, msg: &messages::BusMessage) -> BusResult<()>;
    /// Sends a message to every other node.
    async fn broadcast(&self, msg: &messages::BusMessage) -> BusResult<()>;
    /// Sends a message to one node and waits for its answer (at most [`REQUEST_TIMEOUT`]).
    async fn request(
        &self,
        node: &str,
        msg: &messages::BusMessage,
    ) -> BusResult<messages::BusMessage>;
    /// Records that this node holds the device's connection; returns the record's revision and the node
    /// that held it before, if another.
    async fn claim_route(
        &self,
        phone: &PhoneNumber,
        device: DeviceId,
    ) -> BusResult<(u64, Option<String>)>;
    /// The node holding a device's connection, if any is recorded.
    async fn route(&self, phone: &PhoneNumber, device: DeviceId) -> BusResult<Option<String>>;
    /// Drops the device's routing record if it is still the one written at `revision`.
    async fn release_route(
        &self,
        phone: &PhoneNumber,
        device: DeviceId,
        revision: u64,
    ) -> BusResult<()>;
    /// Writes a shared record.
    async fn put_record(&self, bucket: Bucket, key: &str, value: Vec<u8>) -> BusResult<()>;
    /// Reads a shared record.
    async fn get_record(&self, bucket: Bucket, key: &str) -> BusResult<Option<Vec<u8>>>;
    /// Deletes a shared record.
    async fn delete_record(&self, bucket: Bucket, key: &str) -> BusResult<()>;
    /// What arrives for this node; `None` after the first call (one reader).
    fn take_inbound(&self) -> Option<mpsc::Receiver<Inbound>>;
    /// Called after every (re)connection: reopens what the bus server may have lost.
    async fn reconnected(&self) -> BusResult<()> {
        Ok(())
    }
}

/// The messages nodes exchange (protobuf, encoded with prost; unknown fields are ignored).
pub mod messages {
    /// One message between nodes.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct BusMessage {
        /// What it says.
        #[prost(oneof = "Body", tags = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13")]
        pub body: Option<Body>,
    }

    /// The kinds of bus messages.
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Body {
        /// A device has mail in the store from `seq` on.
        #[prost(message, tag = "1")]
        Mail(Mail),
        /// A push without user data for a device.
        #[prost(message, tag = "2")]
        Push(DevicePush),
        /// Disconnect a device.
        #[prost(message, tag = "3")]
        Kick(Kick),
        /// An account's devices changed: forget cached device ids.
        #[prost(message, tag = "4")]
        Invalidate(Account),
        /// An account's device list changed: tell the watchers this node knows.
        #[prost(message, tag = "5")]
        ListChanged(Account),
        /// An account came online or went offline on a node.
        #[prost(message, tag = "6")]
        Presence(PresenceChange),
        /// A node is alive.
        #[prost(message, tag = "7")]
        Heartbeat(Heartbeat),
        /// A node asks every other for the accounts online there.
        #[prost(message, tag = "8")]
        SyncRequest(Heartbeat),
        /// Accounts online on a node.
        #[prost(message, tag = "9")]
        Snapshot(Snapshot),
        /// A push for the companion of a link session held by the receiving node.
        #[prost(message, tag = "10")]
        LinkPush(LinkPush),
        /// The answer to a request: whether it was done.
        #[prost(message, tag = "11")]
        Done(Done),
        /// A node took or dropped a device's connection (routing record).
        #[prost(message, tag = "12")]
        Route(RouteChange),
        /// A shared record was written or deleted.
        #[prost(message, tag = "13")]
        Record(RecordChange),
    }

    /// A routing record changed.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RouteChange {
        /// The node.
        #[prost(string, tag = "1")]
        pub node: String,
        /// The device's route key (`<digits>.<device>`).
        #[prost(string, tag = "2")]
        pub key: String,
        /// Whether the node holds the connection now (false: it dropped it).
        #[prost(bool, tag = "3")]
        pub held: bool,
    }

    /// A shared record changed.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RecordChange {
        /// The node that changed it.
        #[prost(string, tag = "1")]
        pub node: String,
        /// Which bucket (1: link sessions).
        #[prost(uint32, tag = "2")]
        pub bucket: u32,
        /// The key.
        #[prost(string, tag = "3")]
        pub key: String,
        /// The new value (empty when deleted).
        #[prost(bytes = "vec", tag = "4")]
        pub value: Vec<u8>,
        /// Deleted.
        #[prost(bool, tag = "5")]
        pub deleted: bool,
    }

    /// A device has mail.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Mail {
        /// Account (E.164).
        #[prost(string, tag = "1")]
        pub phone: String,
        /// Device id.
        #[prost(uint32, tag = "2")]
        pub device: u32,
        /// Lowest queue sequence that is new.
        #[prost(uint64, tag = "3")]
        pub seq: u64,
    }

    /// A push for a device.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct DevicePush {
        /// Account (E.164).
        #[prost(string, tag = "1")]
        pub phone: String,
        /// Device id.
        #[prost(uint32, tag = "2")]
        pub device: u32,
        /// An encoded `natter_proto::wire::Push`.
        #[prost(bytes = "vec", tag = "3")]
        pub push: Vec<u8>,
    }

    /// Disconnect a device.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Kick {
        /// Account (E.164).
        #[prost(string, tag = "1")]
        pub phone: String,
        /// Device id.
        #[prost(uint32, tag = "2")]
        pub device: u32,
        /// What the device is told.
        #[prost(string, tag = "3")]
        pub reason: String,
    }

    /// An account.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Account {
        /// Account (E.164).
        #[prost(string, tag = "1")]
        pub phone: String,
    }

    /// Presence of an account on one node.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PresenceChange {
        /// The node.
        #[prost(string, tag = "1")]
        pub node: String,
        /// Account (E.164).
        #[prost(string, tag = "2")]
        pub phone: String,
        /// Whether a device of it is connected to that node now.
        #[prost(bool, tag = "3")]
        pub online: bool,
        /// When its last device there left (ms since epoch).
        #[prost(uint64, tag = "4")]
        pub last_seen_ms: u64,
    }

    /// A node's sign of life.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Heartbeat {
        /// The node.
        #[prost(string, tag = "1")]
        pub node: String,
    }

    /// Accounts online on a node, in parts.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Snapshot {
        /// The node.
        #[prost(string, tag = "1")]
        pub node: String,
        /// The first part replaces what was known of the node; later parts add to it.
        #[prost(bool, tag = "2")]
        pub first: bool,
        /// Accounts (E.164).
        #[prost(string, repeated, tag = "3")]
        pub phones: Vec<String>,
        /// Route keys of the devices connected there.
        #[prost(string, repeated, tag = "4")]
        pub routes: Vec<String>,
    }

    /// A push for a link session's companion.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct LinkPush {
        /// The session's reference.
        #[prost(bytes = "vec", tag = "1")]
        pub reference: Vec<u8>,
        /// An encoded `natter_proto::wire::Push`.
        #[prost(bytes = "vec", tag = "2")]
        pub push: Vec<u8>,
    }

    /// Whether a request was done.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Done {
        /// It was.
        #[prost(bool, tag = "1")]
        pub ok: bool,
    }

    impl BusMessage {
        /// A message with this body.
        pub fn new(body: Body) -> Self {
            Self { body: Some(body) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ids_and_route_keys() {
        assert!(valid_node_id("a"));
        assert!(valid_node_id("node-1_b"));
        assert!(!valid_node_id(""));
        assert!(!valid_node_id("a.b"));
        assert!(!valid_node_id("a*"));
        assert!(!valid_node_id(&"x".repeat(65)));
        let p = PhoneNumber::from_e164("+15550000001").unwrap();
        assert_eq!(route_key(&p, DeviceId::new(3).unwrap()), "15550000001.3");
    }
}
