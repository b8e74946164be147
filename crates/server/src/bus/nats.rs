//! The cluster bus over NATS (async-nats). Subjects are per node, never per device or account:
//!
//! - `natter.node.<id>`: messages for one node (wake-ups, pushes, kicks, link relays, requests);
//! - `natter.all`: messages for every node (presence changes, heartbeats, cache invalidations).
//!
//! A node subscribes to exactly these two, so the subscription count stays constant however many
//! devices connect. Which node holds a device's connection is a routing table every node keeps in
//! memory: a node announces each device it takes or drops on `natter.all` (and its whole share in its
//! snapshot when it joins or reconnects), so a lookup costs no round trip. Link sessions (short-lived
//! records) travel the same way. Core NATS only: no JetStream is needed.
//!
//! A routing change takes a moment to reach the other nodes; a sender that looked up the old route in
//! that moment wakes the wrong node (or none), so the device's node reads the queue once more shortly
//! after a login ([`crate::delivery::Router::claim`]). The client reconnects by itself; every
//! reconnection is reported as [`Inbound::Reconnected`], upon which the node re-announces its routes
//! and re-reads its devices' queues (see [`super::inbound`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use natter_proto::{DeviceId, PhoneNumber};
use prost::Message;
use tokio::sync::{mpsc, oneshot};

use super::messages::{self, Body, BusMessage};
use super::{Bucket, Bus, BusError, BusResult, Inbound, REQUEST_TIMEOUT, route_key};

/// Subject every node listens on.
pub const BROADCAST_SUBJECT: &str = "natter.all";
/// How long a shared record lives (link sessions live a minute).
const RECORD_TTL: Duration = Duration::from_secs(600);
/// Shared records kept at most (a flood cannot grow the map further).
const MAX_RECORDS: usize = 200_000;
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
    shared: Arc<Mutex<Shared>>,
    inbound: Mutex<Option<mpsc::Receiver<Inbound>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// What every node knows: the routing table and the shared records.
#[derive(Default)]
struct Shared {
    /// Route key → node.
    routes: HashMap<String, String>,
    /// (bucket, key) → value, and when it was written.
    records: HashMap<(u32, String), (Vec<u8>, Instant)>,
}

impl Shared {
    /// Applies a change announced by another node; true if the message is consumed here.
    fn apply(&mut self, msg: &BusMessage) -> bool {
        match &msg.body {
            Some(Body::Route(r)) => {
                if r.held {
                    self.routes.insert(r.key.clone(), r.node.clone());
                } else if self.routes.get(&r.key) == Some(&r.node) {
                    self.routes.remove(&r.key);
                }
                true
            }
            Some(Body::Record(r)) => {
                let key = (r.bucket, r.key.clone());
                if r.deleted {
                    self.records.remove(&key);
                } else {
                    if self.records.len() >= MAX_RECORDS {
                        self.records.retain(|_, (_, at)| at.elapsed() < RECORD_TTL);
                    }
                    if self.records.len() < MAX_RECORDS {
                        self.records.insert(key, (r.value.clone(), Instant::now()));
                    }
                }
                true
            }
            Some(Body::Snapshot(s)) => {
                if s.first {
                    self.routes.retain(|_, n| *n != s.node);
                }
                for key in &s.routes {
                    self.routes.insert(key.clone(), s.node.clone());
                }
                false
            }
            _ => false,
        }
    }
}

fn bucket_id(b: Bucket) -> u32 {
    match b {
        Bucket::Links => 1,
    }
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

impl NatsBus {
    /// Connects to the NATS server at `url` (`nats://host:port`) as node `node_id` and subscribes to
    /// the node's subjects. Fails if the server cannot be reached now; once connected, the client
    /// reconnects by itself.
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
        let shared: Arc<Mutex<Shared>> = Arc::default();
        let mut tasks = Vec::new();
        for subject in [node_subject(node_id), BROADCAST_SUBJECT.to_owned()] {
            let sub = client.subscribe(subject).await.map_err(unavailable)?;
            tasks.push(tokio::spawn(forward(
                sub,
                client.clone(),
                tx.clone(),
                node_id.to_owned(),
                shared.clone(),
            )));
        }
        // The first connection happened before the event callback could report it.
        let _ = tx.try_send(Inbound::Reconnected);
        Ok(NatsBus {
            node_id: node_id.to_owned(),
            client,
            shared,
            inbound: Mutex::new(Some(rx)),
            tasks,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
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
    shared: Arc<Mutex<Shared>>,
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
        if shared.lock().unwrap_or_else(|p| p.into_inner()).apply(&msg) {
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
    match &msg.body {
        Some(Body::Presence(p)) => p.node == node_id,
        Some(Body::Heartbeat(h)) | Some(Body::SyncRequest(h)) => h.node == node_id,
        Some(Body::Snapshot(s)) => s.node == node_id,
        Some(Body::Route(r)) => r.node == node_id,
        Some(Body::Record(r)) => r.node == node_id,
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
        let key = route_key(phone, device);
        let before = self
            .lock()
            .routes
            .insert(key.clone(), self.node_id.clone())
            .filter(|n| *n != self.node_id);
        let msg = BusMessage::new(Body::Route(messages::RouteChange {
            node: self.node_id.clone(),
            key,
            held: true,
        }));
        self.broadcast(&msg).await?;
        Ok((1, before))
    }

    async fn route(&self, phone: &PhoneNumber, device: DeviceId) -> BusResult<Option<String>> {
        Ok(self.lock().routes.get(&route_key(phone, device)).cloned())
    }

    async fn release_route(
        &self,
        phone: &PhoneNumber,
        device: DeviceId,
        _revision: u64,
    ) -> BusResult<()> {
        let key = route_key(phone, device);
        {
            let mut shared = self.lock();
            if shared.routes.get(&key) != Some(&self.node_id) {
                return Ok(());
            }
            shared.routes.remove(&key);
        }
        // The other nodes drop the record only if it still names this node.
        let msg = BusMessage::new(Body::Route(messages::RouteChange {
            node: self.node_id.clone(),
            key,
            held: false,
        }));
        self.broadcast(&msg).await
    }

    async fn put_record(&self, bucket: Bucket, key: &str, value: Vec<u8>) -> BusResult<()> {
        self.lock().records.insert(
            (bucket_id(bucket), key.to_owned()),
            (value.clone(), Instant::now()),
        );
        let msg = BusMessage::new(Body::Record(messages::RecordChange {
            node: self.node_id.clone(),
            bucket: bucket_id(bucket),
            key: key.to_owned(),
            value,
            deleted: false,
        }));
        self.broadcast(&msg).await
    }

    async fn get_record(&self, bucket: Bucket, key: &str) -> BusResult<Option<Vec<u8>>> {
        Ok(self
            .lock()
            .records
            .get(&(bucket_id(bucket), key.to_owned()))
            .filter(|(_, at)| at.elapsed() < RECORD_TTL)
            .map(|(v, _)| v.clone()))
    }

    async fn delete_record(&self, bucket: Bucket, key: &str) -> BusResult<()> {
        self.lock()
            .records
            .remove(&(bucket_id(bucket), key.to_owned()));
        let msg = BusMessage::new(Body::Record(messages::RecordChange {
            node: self.node_id.clone(),
            bucket: bucket_id(bucket),
            key: key.to_owned(),
            value: Vec::new(),
            deleted: true,
        }));
        self.broadcast(&msg).await
    }

    fn take_inbound(&self) -> Option<mpsc::Receiver<Inbound>> {
        self.inbound
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }
}
