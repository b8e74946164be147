//! The cluster bus over NATS (async-nats). Subjects are per node, never per device or account:
//!
//! - `natter.node.<id>`: messages for one node (wake-ups, pushes, kicks, link relays, requests);
//! - `natter.all`: messages for every node (presence changes, heartbeats, cache invalidations).
//!
//! A node subscribes to exactly these two, so the subscription count stays constant however many
//! devices connect. Which node holds a device's connection is a JetStream key-value record
//! (`natter_routes`, key `<digits>.<device>`, value the node id), written at login before the device's
//! queue is read, so a sender that stored an envelope after that read always finds the new node.
//! Link sessions (short-lived) are records in `natter_links`.
//!
//! The client reconnects by itself; every reconnection is reported as [`Inbound::Reconnected`], upon
//! which the node rewrites its routes and re-reads its devices' queues (see [`super::inbound`]).

use std::sync::Mutex;
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use natter_proto::{DeviceId, PhoneNumber};
use prost::Message;
use tokio::sync::{RwLock, mpsc, oneshot};

use super::messages::BusMessage;
use super::{
    Bucket, Bus, BusError, BusResult, Inbound, RECORD_TIMEOUT, REQUEST_TIMEOUT, route_key,
};

/// Subject every node listens on.
pub const BROADCAST_SUBJECT: &str = "natter.all";
/// Key-value bucket of device routes.
pub const ROUTES_BUCKET: &str = "natter_routes";
/// Key-value bucket of link sessions.
pub const LINKS_BUCKET: &str = "natter_links";
/// Largest bus message accepted from NATS.
const MAX_MESSAGE: usize = 1024 * 1024;
/// Inbound messages buffered for the node's handler before it counts as lagging.
const INBOUND_QUEUE: usize = 64 * 1024;

/// The subject of one node.
pub fn node_subject(node: &str) -> String {
    format!("natter.node.{node}")
}

/// The NATS bus of one node.
pub struct NatsBus {
    node_id: String,
    client: async_nats::Client,
    js: jetstream::Context,
    buckets: RwLock<Option<Buckets>>,
    inbound: Mutex<Option<mpsc::Receiver<Inbound>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

struct Buckets {
    routes: kv::Store,
    links: kv::Store,
}

impl std::fmt::Debug for NatsBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsBus")
            .field("node_id", &self.node_id)
            .finish_non_exhaustive()
    }
}

impl Drop for NatsBus {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn unavailable(e: impl std::fmt::Display) -> BusError {
    BusError::Unavailable(e.to_string())
}

async fn timed<T, E: std::fmt::Display>(
    f: impl std::future::Future<Output = Result<T, E>>,
) -> BusResult<T> {
    match tokio::time::timeout(RECORD_TIMEOUT, f).await {
        Ok(r) => r.map_err(unavailable),
        Err(_) => Err(BusError::Unavailable("timed out".into())),
    }
}

async fn ensure_bucket(
    js: &jetstream::Context,
    name: &str,
    max_age: Duration,
) -> BusResult<kv::Store> {
    if let Ok(store) = js.get_key_value(name).await {
        return Ok(store);
    }
    js.create_key_value(kv::Config {
        bucket: name.to_owned(),
        history: 1,
        max_age,
        storage: jetstream::stream::StorageType::File,
        ..Default::default()
    })
    .await
    .map_err(unavailable)
}

impl NatsBus {
    /// Connects to the NATS server at `url` (`nats://host:port`) as node `node_id`, subscribes to the
    /// node's subjects and opens (creating them if needed) the key-value buckets. Fails if the server
    /// cannot be reached now; once connected, the client reconnects by itself.
    pub async fn connect(url: &str, node_id: &str) -> BusResult<NatsBus> {
        if !super::valid_node_id(node_id) {
            return Err(BusError::Invalid("node id (1 to 64 of A-Z a-z 0-9 - _)"));
        }
        let (tx, rx) = mpsc::channel(INBOUND_QUEUE);
        let events = tx.clone();
        let client = async_nats::ConnectOptions::new()
            .name(format!("natterd-{node_id}"))
            .connection_timeout(Duration::from_secs(3))
            .reconnect_delay_callback(|attempt| {
                Duration::from_millis((100 * attempt as u64).clamp(100, 2_000))
            })
            .event_callback(move |ev| {
                let events = events.clone();
                async move {
                    match ev {
                        async_nats::Event::Connected => {
                            tracing::info!("bus connected");
                            let _ = events.try_send(Inbound::Reconnected);
                        }
                        async_nats::Event::Disconnected => tracing::warn!("bus disconnected"),
                        async_nats::Event::SlowConsumer(_) => {
                            let _ = events.try_send(Inbound::Lagged);
                        }
                        other => tracing::debug!(event = %other, "bus event"),
                    }
                }
            })
            .connect(url)
            .await
            .map_err(unavailable)?;
        let js = jetstream::new(client.clone());
        let buckets = Buckets {
            routes: ensure_bucket(&js, ROUTES_BUCKET, Duration::ZERO).await?,
            links: ensure_bucket(&js, LINKS_BUCKET, Duration::from_secs(600)).await?,
        };
        let mut tasks = Vec::new();
        for subject in [node_subject(node_id), BROADCAST_SUBJECT.to_owned()] {
            let sub = client.subscribe(subject).await.map_err(unavailable)?;
            tasks.push(tokio::spawn(forward(
                sub,
                client.clone(),
                tx.clone(),
                node_id.to_owned(),
            )));
        }
        Ok(NatsBus {
            node_id: node_id.to_owned(),
            client,
            js,
            buckets: RwLock::new(Some(buckets)),
            inbound: Mutex::new(Some(rx)),
            tasks,
        })
    }

    /// Opens the buckets again (after the NATS server restarted without its JetStream data).
    pub async fn reopen_buckets(&self) -> BusResult<()> {
        let routes = ensure_bucket(&self.js, ROUTES_BUCKET, Duration::ZERO).await?;
        let links = ensure_bucket(&self.js, LINKS_BUCKET, Duration::from_secs(600)).await?;
        *self.buckets.write().await = Some(Buckets { routes, links });
        Ok(())
    }

    async fn bucket(&self, which: Option<Bucket>) -> BusResult<kv::Store> {
        let guard = self.buckets.read().await;
        let b = guard
            .as_ref()
            .ok_or_else(|| BusError::Unavailable("no key-value buckets".into()))?;
        Ok(match which {
            None => b.routes.clone(),
            Some(Bucket::Links) => b.links.clone(),
        })
    }

    async fn publish(&self, subject: String, msg: &BusMessage) -> BusResult<()> {
        self.client
            .publish(subject, Bytes::from(msg.encode_to_vec()))
            .await
            .map_err(unavailable)
    }
}

/// Moves messages from a subscription to the node's inbound queue; a message with a reply subject gets
/// its answer published there. Messages this node broadcast itself are dropped.
async fn forward(
    mut sub: async_nats::Subscriber,
    client: async_nats::Client,
    tx: mpsc::Sender<Inbound>,
    node_id: String,
) {
    while let Some(m) = sub.next().await {
        if m.payload.len() > MAX_MESSAGE {
            continue;
        }
        let Ok(msg) = BusMessage::decode(m.payload.as_ref()) else {
            tracing::debug!("malformed bus message dropped");
            continue;
        };
        if is_own_broadcast(&msg, &node_id) {
            continue;
        }
        let reply = m.reply.map(|subject| {
            let (rtx, rrx) = oneshot::channel::<BusMessage>();
            let client = client.clone();
            tokio::spawn(async move {
                if let Ok(answer) = rrx.await {
                    let _ = client
                        .publish(subject, Bytes::from(answer.encode_to_vec()))
                        .await;
                }
            });
            rtx
        });
        if let Err(mpsc::error::TrySendError::Full(_)) = tx.try_send(Inbound::Message(msg, reply)) {
            // Dropped: the node catches up from the store instead.
            let _ = tx.send(Inbound::Lagged).await;
        }
    }
}

fn is_own_broadcast(msg: &BusMessage, node_id: &str) -> bool {
    use super::messages::Body;
    match &msg.body {
        Some(Body::Presence(p)) => p.node == node_id,
        Some(Body::Heartbeat(h)) | Some(Body::SyncRequest(h)) => h.node == node_id,
        Some(Body::Snapshot(s)) => s.node == node_id,
        _ => false,
    }
}

#[async_trait]
impl Bus for NatsBus {
    fn node_id(&self) -> &str {
        &self.node_id
    }

    fn clustered(&self) -> bool {
        true
    }

    async fn send(&self, node: &str, msg: &BusMessage) -> BusResult<()> {
        self.publish(node_subject(node), msg).await
    }

    async fn broadcast(&self, msg: &BusMessage) -> BusResult<()> {
        self.publish(BROADCAST_SUBJECT.to_owned(), msg).await
    }

    async fn request(&self, node: &str, msg: &BusMessage) -> BusResult<BusMessage> {
        let req = self
            .client
            .request(node_subject(node), Bytes::from(msg.encode_to_vec()));
        let m = match tokio::time::timeout(REQUEST_TIMEOUT, req).await {
            Ok(Ok(m)) => m,
            Ok(Err(_)) | Err(_) => return Err(BusError::NoAnswer(node.to_owned())),
        };
        BusMessage::decode(m.payload.as_ref()).map_err(|_| BusError::Malformed)
    }

    async fn claim_route(
        &self,
        phone: &PhoneNumber,
        device: DeviceId,
    ) -> BusResult<(u64, Option<String>)> {
        let store = self.bucket(None).await?;
        let key = route_key(phone, device);
        let before = timed(store.get(key.clone()))
            .await?
            .and_then(|v| String::from_utf8(v.to_vec()).ok())
            .filter(|n| *n != self.node_id);
        let revision = timed(store.put(key, Bytes::from(self.node_id.clone()))).await?;
        Ok((revision, before))
    }

    async fn route(&self, phone: &PhoneNumber, device: DeviceId) -> BusResult<Option<String>> {
        let store = self.bucket(None).await?;
        Ok(timed(store.get(route_key(phone, device)))
            .await?
            .and_then(|v| String::from_utf8(v.to_vec()).ok()))
    }

    async fn release_route(
        &self,
        phone: &PhoneNumber,
        device: DeviceId,
        revision: u64,
    ) -> BusResult<()> {
        let store = self.bucket(None).await?;
        match tokio::time::timeout(
            RECORD_TIMEOUT,
            store.delete_expect_revision(route_key(phone, device), Some(revision)),
        )
        .await
        {
            Ok(Ok(())) => Ok(()),
            // Another node (or a newer connection here) wrote the record since: it stays.
            Ok(Err(e)) if e.kind() == kv::DeleteErrorKind::WrongLastRevision => Ok(()),
            Ok(Err(e)) => Err(unavailable(e)),
            Err(_) => Err(BusError::Unavailable("timed out".into())),
        }
    }

    async fn put_record(&self, bucket: Bucket, key: &str, value: Vec<u8>) -> BusResult<()> {
        let store = self.bucket(Some(bucket)).await?;
        timed(store.put(key, Bytes::from(value))).await.map(|_| ())
    }

    async fn get_record(&self, bucket: Bucket, key: &str) -> BusResult<Option<Vec<u8>>> {
        let store = self.bucket(Some(bucket)).await?;
        Ok(timed(store.get(key)).await?.map(|b| b.to_vec()))
    }

    async fn delete_record(&self, bucket: Bucket, key: &str) -> BusResult<()> {
        let store = self.bucket(Some(bucket)).await?;
        timed(store.delete(key)).await
    }

    async fn reconnected(&self) -> BusResult<()> {
        self.reopen_buckets().await
    }

    fn take_inbound(&self) -> Option<mpsc::Receiver<Inbound>> {
        self.inbound
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }
}
