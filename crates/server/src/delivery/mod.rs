//! Routing to online devices. Every envelope is durable in the store before it gets here, so routing is
//! best effort: an envelope the router cannot hand to a connection right away is left for the connection
//! to load from the store (a *resync*), never dropped.
//!
//! In a cluster the [`Router`] is also where devices connected to other nodes are reached: a device that
//! is not connected here is looked up in the bus's routing records and its node gets a wake-up (or the
//! push, or the kick) over the [`crate::bus::Bus`]. Callers do not see the difference.

use std::collections::{HashMap, VecDeque};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use natter_proto::limits::MAX_UNACKED_PUSHES;
use natter_proto::wire::{Push, Response};
use natter_proto::{DeviceId, PhoneNumber};
use tokio::sync::Notify;

use crate::bus::Bus;
use crate::bus::messages::{self, Body, BusMessage};
use crate::store::QueuedEnvelope;
use prost::Message;

/// Something for a connection's driver to do.
#[derive(Debug)]
pub enum ConnEvent {
    /// Push this envelope (already durable).
    Envelope(Arc<QueuedEnvelope>),
    /// Envelopes were left in the store; load from the sequence in the connection's resync mark.
    Resync,
    /// The store deleted these acknowledged envelopes.
    Acked(Vec<u64>),
    /// A response to one of the connection's requests (boxed: the channel's slots stay small).
    Response(Box<Response>),
    /// A push without user data (no acknowledgement needed).
    Push(Box<Push>),
    /// The device is gone: tell the client why, then close.
    Kick(String),
}

impl ConnEvent {
    /// A push event.
    pub fn push(p: Push) -> Self {
        ConnEvent::Push(Box::new(p))
    }
}

/// The sending side of a connection, held by the router.
///
/// Its event queue is a plain `VecDeque` behind a mutex with a [`Notify`]: it allocates nothing while
/// empty and is taken whole by the driver, so an idle connection holds no queue memory (a Tokio channel
/// keeps a block of 32 slots per connection for its whole life).
#[derive(Debug)]
pub struct ConnShared {
    /// Unique per connection.
    pub id: u64,
    events: Mutex<VecDeque<ConnEvent>>,
    notify: Notify,
    /// The driver is gone: events are refused.
    closed: AtomicBool,
    queued: AtomicUsize,
    resync_from: AtomicU64,
    /// Revision of the routing record this connection wrote (cluster mode; 0 if none).
    route_revision: AtomicU64,
}

/// The driver's side of a connection's event queue; closes the queue when dropped.
#[derive(Debug)]
pub struct ConnEvents {
    shared: Arc<ConnShared>,
}

impl ConnEvents {
    /// Waits until events may be queued (cancel safe: a wake-up that finds nothing is harmless, and one
    /// given while nobody waits is kept for the next wait).
    pub async fn ready(&self) {
        if !self.shared.lock_events().is_empty() {
            return;
        }
        self.shared.notify.notified().await;
    }

    /// Every queued event, oldest first; the queue keeps no capacity afterwards.
    pub fn take(&self) -> VecDeque<ConnEvent> {
        std::mem::take(&mut *self.shared.lock_events())
    }
}

impl Drop for ConnEvents {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::Release);
        drop(self.take());
    }
}

impl ConnShared {
    /// A new connection's shared half and the event queue its driver reads.
    pub fn new(id: u64) -> (Arc<Self>, ConnEvents) {
        let shared = Arc::new(Self {
            id,
            events: Mutex::new(VecDeque::new()),
            notify: Notify::new(),
            closed: AtomicBool::new(false),
            queued: AtomicUsize::new(0),
            resync_from: AtomicU64::new(u64::MAX),
            route_revision: AtomicU64::new(0),
        });
        let events = ConnEvents {
            shared: Arc::clone(&shared),
        };
        (shared, events)
    }

    fn lock_events(&self) -> std::sync::MutexGuard<'_, VecDeque<ConnEvent>> {
        self.events.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues an event for the driver; false if the connection is gone.
    pub fn send(&self, ev: ConnEvent) -> bool {
        {
            let mut q = self.lock_events();
            // Checked under the lock: the driver's drop sets `closed` before it empties the queue.
            if self.closed.load(Ordering::Acquire) {
                return false;
            }
            q.push_back(ev);
        }
        self.notify.notify_one();
        true
    }

    /// Hands an envelope to the driver, or, when the driver is already behind, marks where it must
    /// resync from the store. Bounded: a stuck connection holds at most [`MAX_UNACKED_PUSHES`] envelopes in
    /// memory.
    pub fn deliver(&self, env: Arc<QueuedEnvelope>) {
        if self.queued.fetch_add(1, Ordering::AcqRel) < MAX_UNACKED_PUSHES {
            if !self.send(ConnEvent::Envelope(env)) {
                self.queued.fetch_sub(1, Ordering::AcqRel);
            }
            return;
        }
        self.queued.fetch_sub(1, Ordering::AcqRel);
        self.wake(env.seq);
    }

    /// Tells the driver that the store holds envelopes from `seq` on that it may not have pushed
    /// (several wake-ups before the driver runs make one store read).
    pub fn wake(&self, seq: u64) {
        let prev = self.resync_from.fetch_min(seq, Ordering::AcqRel);
        if prev == u64::MAX {
            self.send(ConnEvent::Resync);
        }
    }

    /// The driver took an envelope event off its queue.
    pub fn envelope_taken(&self) {
        self.queued.fetch_sub(1, Ordering::AcqRel);
    }

    /// The driver starts a resync: returns the lowest sequence it must load from (`None` if no mark).
    pub fn take_resync_mark(&self) -> Option<u64> {
        match self.resync_from.swap(u64::MAX, Ordering::AcqRel) {
            u64::MAX => None,
            seq => Some(seq),
        }
    }
}

type Key = (PhoneNumber, DeviceId);
/// How long after a login its route has surely reached every node.
const CLAIM_SETTLE: std::time::Duration = std::time::Duration::from_millis(500);
const SHARDS: usize = 64;

/// Which connection serves each online device. Sharded so that delivery takes no global lock.
#[derive(Debug)]
pub struct Router {
    shards: Vec<Mutex<HashMap<Key, Arc<ConnShared>>>>,
    bus: Arc<dyn Bus>,
}

impl Default for Router {
    fn default() -> Self {
        Self::new()
    }
}

impl Router {
    /// An empty router for a single node.
    pub fn new() -> Self {
        Self::with_bus(Arc::new(crate::bus::LocalBus::default()))
    }

    /// An empty router that reaches other nodes through `bus`.
    pub fn with_bus(bus: Arc<dyn Bus>) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            bus,
        }
    }

    /// The bus to the other nodes.
    pub fn bus(&self) -> &Arc<dyn Bus> {
        &self.bus
    }

    fn shard(
        &self,
        phone: &PhoneNumber,
        device: DeviceId,
    ) -> &Mutex<HashMap<Key, Arc<ConnShared>>> {
        let mut h = DefaultHasher::new();
        phone.hash(&mut h);
        device.hash(&mut h);
        &self.shards[(h.finish() as usize) % SHARDS]
    }

    fn lock<'a>(
        m: &'a Mutex<HashMap<Key, Arc<ConnShared>>>,
    ) -> std::sync::MutexGuard<'a, HashMap<Key, Arc<ConnShared>>> {
        m.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes `conn` the connection of a device; returns the connection it replaces, if any.
    pub fn register(
        &self,
        phone: &PhoneNumber,
        device: DeviceId,
        conn: Arc<ConnShared>,
    ) -> Option<Arc<ConnShared>> {
        Self::lock(self.shard(phone, device)).insert((phone.clone(), device), conn)
    }

    /// Removes the device's entry if it is still this connection.
    pub fn unregister(&self, phone: &PhoneNumber, device: DeviceId, conn_id: u64) {
        let mut map = Self::lock(self.shard(phone, device));
        let key = (phone.clone(), device);
        if map.get(&key).is_some_and(|c| c.id == conn_id) {
            map.remove(&key);
        }
    }

    /// The connection of an online device.
    pub fn get(&self, phone: &PhoneNumber, device: DeviceId) -> Option<Arc<ConnShared>> {
        Self::lock(self.shard(phone, device))
            .get(&(phone.clone(), device))
            .cloned()
    }

    /// Hands a durable envelope to its device's connection, if the device is online here, or wakes the
    /// node that holds it.
    pub fn deliver(&self, env: QueuedEnvelope) {
        if let Some(conn) = self.get(&env.phone, env.device_id) {
            conn.deliver(Arc::new(env));
        } else if self.bus.clustered() {
            let msg = BusMessage::new(Body::Mail(messages::Mail {
                phone: env.phone.as_str().to_owned(),
                device: env.device_id.get(),
                seq: env.seq,
            }));
            self.forward(env.phone, env.device_id, msg);
        }
    }

    /// Sends an event to a device if it is online (here, or, for a push, on another node).
    pub fn notify(&self, phone: &PhoneNumber, device: DeviceId, ev: ConnEvent) -> bool {
        if let Some(conn) = self.get(phone, device) {
            return conn.send(ev);
        }
        match ev {
            ConnEvent::Push(p) if self.bus.clustered() => {
                let msg = BusMessage::new(Body::Push(messages::DevicePush {
                    phone: phone.as_str().to_owned(),
                    device: device.get(),
                    push: p.encode_to_vec(),
                }));
                self.forward(phone.clone(), device, msg);
                true
            }
            _ => false,
        }
    }

    /// Disconnects a device that no longer belongs to its account, wherever it is connected.
    pub fn kick(&self, phone: &PhoneNumber, device: DeviceId, reason: &str) {
        if !self.kick_local(phone, device, reason) && self.bus.clustered() {
            let msg = BusMessage::new(Body::Kick(messages::Kick {
                phone: phone.as_str().to_owned(),
                device: device.get(),
                reason: reason.to_owned(),
            }));
            self.forward(phone.clone(), device, msg);
        }
    }

    /// Disconnects a device if it is connected to this node; false if it is not.
    pub fn kick_local(&self, phone: &PhoneNumber, device: DeviceId, reason: &str) -> bool {
        let conn = Self::lock(self.shard(phone, device)).remove(&(phone.clone(), device));
        match conn {
            Some(conn) => {
                conn.send(ConnEvent::Kick(reason.to_owned()));
                true
            }
            None => false,
        }
    }

    /// Sends `msg` to the node that holds the device's connection, in the background (best effort:
    /// the device's node catches up from the store if this is lost).
    fn forward(&self, phone: PhoneNumber, device: DeviceId, msg: BusMessage) {
        let bus = self.bus.clone();
        tokio::spawn(async move {
            let node = match bus.route(&phone, device).await {
                Ok(Some(node)) if node != bus.node_id() => node,
                Ok(_) => return,
                Err(e) => {
                    tracing::debug!(error = %e, "no route lookup; the device's node catches up");
                    return;
                }
            };
            if let Err(e) = bus.send(&node, &msg).await {
                tracing::debug!(error = %e, "bus message lost; the device's node catches up");
            }
        });
    }

    /// Whether a device is connected, here or (in a cluster) to another node.
    pub async fn is_online(&self, phone: &PhoneNumber, device: DeviceId) -> bool {
        if self.get(phone, device).is_some() {
            return true;
        }
        self.bus.clustered() && matches!(self.bus.route(phone, device).await, Ok(Some(_)))
    }

    /// Records in the cluster that `conn` (registered here) holds the device's connection, and closes
    /// an older connection of the device on another node. Must complete before the device's queue is
    /// read: a sender that stored an envelope after that read then finds this node. Failures are logged
    /// and left to the catch-up after the bus comes back.
    pub async fn claim(&self, phone: &PhoneNumber, device: DeviceId, conn: &Arc<ConnShared>) {
        if !self.bus.clustered() {
            return;
        }
        // A sender that looked the device up just before the other nodes heard of this claim woke the
        // old node: read the queue once more when the claim has surely arrived everywhere.
        let later = Arc::downgrade(conn);
        tokio::spawn(async move {
            tokio::time::sleep(CLAIM_SETTLE).await;
            if let Some(conn) = later.upgrade() {
                conn.wake(1);
            }
        });
        match self.bus.claim_route(phone, device).await {
            Ok((revision, previous)) => {
                conn.route_revision.store(revision, Ordering::Release);
                if let Some(node) = previous {
                    let msg = BusMessage::new(Body::Kick(messages::Kick {
                        phone: phone.as_str().to_owned(),
                        device: device.get(),
                        reason: "this device opened a newer connection".into(),
                    }));
                    let _ = self.bus.send(&node, &msg).await;
                }
            }
            Err(e) => tracing::warn!(error = %e, "device route not recorded"),
        }
    }

    /// Drops the routing record `conn` wrote, unless a newer connection replaced it (background).
    pub fn release(&self, phone: &PhoneNumber, device: DeviceId, conn: &ConnShared) {
        let revision = conn.route_revision.load(Ordering::Acquire);
        // A newer connection of the device here keeps the record.
        if !self.bus.clustered() || revision == 0 || self.get(phone, device).is_some() {
            return;
        }
        let (bus, phone) = (self.bus.clone(), phone.clone());
        tokio::spawn(async move {
            if let Err(e) = bus.release_route(&phone, device, revision).await {
                tracing::debug!(error = %e, "device route not released");
            }
        });
    }

    /// Every device connected here, with its connection.
    pub fn local_devices(&self) -> Vec<(PhoneNumber, DeviceId, Arc<ConnShared>)> {
        let mut all = Vec::new();
        for shard in &self.shards {
            all.extend(
                Self::lock(shard)
                    .iter()
                    .map(|((p, d), c)| (p.clone(), *d, c.clone())),
            );
        }
        all
    }

    /// Devices online now.
    pub fn online(&self) -> usize {
        self.shards.iter().map(|s| Self::lock(s).len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(seq: u64) -> QueuedEnvelope {
        let p = PhoneNumber::from_e164("+15550000001").unwrap();
        QueuedEnvelope {
            seq,
            phone: p.clone(),
            device_id: DeviceId::PRIMARY,
            sender: p,
            sender_device: DeviceId::PRIMARY,
            message_id: natter_proto::MessageId::from_bytes([0; 16]),
            server_ts_ms: 0,
            olm_type: 1,
            ciphertext: vec![],
            retry: None,
        }
    }

    #[test]
    fn a_stuck_connection_gets_a_resync_mark_instead_of_unbounded_memory() {
        let (conn, rx) = ConnShared::new(1);
        for seq in 1..=(MAX_UNACKED_PUSHES as u64 + 10) {
            conn.deliver(Arc::new(env(seq)));
        }
        let mut envelopes = 0;
        let mut resyncs = 0;
        for ev in rx.take() {
            match ev {
                ConnEvent::Envelope(_) => envelopes += 1,
                ConnEvent::Resync => resyncs += 1,
                _ => {}
            }
        }
        assert_eq!(envelopes, MAX_UNACKED_PUSHES);
        assert_eq!(resyncs, 1);
        assert_eq!(conn.take_resync_mark(), Some(MAX_UNACKED_PUSHES as u64 + 1));
        assert_eq!(conn.take_resync_mark(), None);
    }

    #[tokio::test]
    async fn events_arrive_in_order_and_a_closed_queue_refuses_more() {
        let (conn, rx) = ConnShared::new(1);
        assert!(rx.take().is_empty());
        assert!(conn.send(ConnEvent::Acked(vec![1])));
        assert!(conn.send(ConnEvent::Acked(vec![2])));
        // A wake-up given before the wait is kept.
        tokio::time::timeout(std::time::Duration::from_secs(5), rx.ready())
            .await
            .unwrap();
        let got: Vec<_> = rx
            .take()
            .into_iter()
            .map(|ev| match ev {
                ConnEvent::Acked(ids) => ids[0],
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(got, vec![1, 2]);
        let waiter = {
            let conn = Arc::clone(&conn);
            tokio::spawn(async move {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                conn.send(ConnEvent::Resync)
            })
        };
        tokio::time::timeout(std::time::Duration::from_secs(5), rx.ready())
            .await
            .unwrap();
        assert!(waiter.await.unwrap());
        assert_eq!(rx.take().len(), 1);
        drop(rx);
        assert!(!conn.send(ConnEvent::Resync));
    }

    #[test]
    fn unregister_only_removes_the_same_connection() {
        let r = Router::new();
        let p = PhoneNumber::from_e164("+15550000001").unwrap();
        let (a, _ra) = ConnShared::new(1);
        let (b, _rb) = ConnShared::new(2);
        assert!(r.register(&p, DeviceId::PRIMARY, a).is_none());
        assert_eq!(r.register(&p, DeviceId::PRIMARY, b).unwrap().id, 1);
        r.unregister(&p, DeviceId::PRIMARY, 1);
        assert_eq!(r.online(), 1);
        r.unregister(&p, DeviceId::PRIMARY, 2);
        assert_eq!(r.online(), 0);
    }
}
