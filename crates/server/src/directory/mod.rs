//! The directory's in-memory parts: open link sessions (a companion waiting for a primary to scan its QR
//! code), who follows which account's device list (so a change is pushed at once) and a cache of
//! device ids. Durable directory state (accounts, devices, lists, prekeys) lives in the
//! [`crate::store::Store`]; in a cluster, link sessions are also recorded on the bus and cache
//! invalidations are broadcast.

pub mod presence;

use natter_proto::PhoneNumber;
use prost::Message;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::bus::messages::{self, Body, BusMessage};
use crate::bus::{Bucket, Bus};
use crate::delivery::{ConnEvent, ConnShared};

/// A companion's open link session.
#[derive(Debug, Clone)]
pub struct LinkSession {
    /// The node that holds the companion's (anonymous) connection.
    pub node: String,
    /// The companion's connection, when that node is this one.
    pub companion: Option<Arc<ConnShared>>,
    /// The companion's Noise key: the key the published list must give the new device.
    pub companion_noise: [u8; 32],
    /// When the reference stops working (ms since epoch).
    pub expires_ms: u64,
    /// The account whose primary offered itself.
    pub offered_by: Option<PhoneNumber>,
}

/// A link session as other nodes see it (a record on the bus).
#[derive(Clone, PartialEq, prost::Message)]
struct LinkRecord {
    #[prost(string, tag = "1")]
    node: String,
    #[prost(bytes = "vec", tag = "2")]
    companion_noise: Vec<u8>,
    #[prost(uint64, tag = "3")]
    expires_ms: u64,
    #[prost(string, tag = "4")]
    offered_by: String,
}

impl LinkRecord {
    fn of(s: &LinkSession) -> Self {
        Self {
            node: s.node.clone(),
            companion_noise: s.companion_noise.to_vec(),
            expires_ms: s.expires_ms,
            offered_by: s
                .offered_by
                .as_ref()
                .map(|p| p.as_str().to_owned())
                .unwrap_or_default(),
        }
    }
}

/// Open link sessions by reference: in memory on the companion's node, and (in a cluster) as a record
/// on the bus so that a primary connected to another node can find it.
#[derive(Debug)]
pub struct LinkSessions {
    map: Mutex<HashMap<[u8; 16], LinkSession>>,
    bus: Arc<dyn Bus>,
}

impl Default for LinkSessions {
    fn default() -> Self {
        Self::new(Arc::new(crate::bus::LocalBus::default()))
    }
}

/// Sessions at most; a flood of anonymous requests cannot grow the map further.
const MAX_LINK_SESSIONS: usize = 100_000;

impl LinkSessions {
    /// No sessions; records go through `bus`.
    pub fn new(bus: Arc<dyn Bus>) -> Self {
        Self {
            map: Mutex::default(),
            bus,
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<[u8; 16], LinkSession>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Opens a session; `None` if too many are open (or the cluster cannot record it).
    pub async fn open(&self, reference: [u8; 16], session: LinkSession) -> Option<()> {
        {
            let mut map = self.lock();
            if map.len() >= MAX_LINK_SESSIONS {
                let now = crate::now_ms();
                map.retain(|_, s| s.expires_ms > now);
                if map.len() >= MAX_LINK_SESSIONS {
                    return None;
                }
            }
            map.insert(reference, session.clone());
        }
        if self.bus.clustered() {
            let record = LinkRecord::of(&session).encode_to_vec();
            if let Err(e) = self
                .bus
                .put_record(Bucket::Links, &hex::encode(reference), record)
                .await
            {
                tracing::warn!(error = %e, "link session not recorded");
                self.lock().remove(&reference);
                return None;
            }
        }
        Some(())
    }

    /// The session held by this node (its companion connected here), live or not.
    pub fn local(&self, reference: &[u8; 16]) -> Option<LinkSession> {
        self.lock().get(reference).cloned()
    }

    /// A live session, wherever its companion is connected.
    pub async fn get(&self, reference: &[u8; 16]) -> Option<LinkSession> {
        let now = crate::now_ms();
        let local = self.local(reference);
        let session = if self.bus.clustered() {
            let bytes = self
                .bus
                .get_record(Bucket::Links, &hex::encode(reference))
                .await
                .ok()??;
            let r = LinkRecord::decode(bytes.as_slice()).ok()?;
            LinkSession {
                companion: local
                    .and_then(|l| l.companion)
                    .filter(|_| r.node == self.bus.node_id()),
                node: r.node,
                companion_noise: r.companion_noise.as_slice().try_into().ok()?,
                expires_ms: r.expires_ms,
                offered_by: PhoneNumber::from_e164(&r.offered_by).ok(),
            }
        } else {
            local?
        };
        if session.expires_ms > now {
            Some(session)
        } else {
            self.lock().remove(reference);
            None
        }
    }

    /// Records the account whose primary offered itself.
    pub async fn set_offer(&self, reference: &[u8; 16], phone: PhoneNumber) {
        let updated = {
            let mut map = self.lock();
            map.get_mut(reference).map(|s| {
                s.offered_by = Some(phone.clone());
                s.clone()
            })
        };
        if self.bus.clustered() {
            let session = match updated {
                Some(s) => Some(s),
                None => self.get(reference).await.map(|mut s| {
                    s.offered_by = Some(phone);
                    s
                }),
            };
            if let Some(s) = session {
                let record = LinkRecord::of(&s).encode_to_vec();
                if let Err(e) = self
                    .bus
                    .put_record(Bucket::Links, &hex::encode(reference), record)
                    .await
                {
                    tracing::warn!(error = %e, "link offer not recorded");
                }
            }
        }
    }

    /// Ends a session.
    pub async fn close(&self, reference: &[u8; 16]) {
        self.lock().remove(reference);
        if self.bus.clustered()
            && let Err(e) = self
                .bus
                .delete_record(Bucket::Links, &hex::encode(reference))
                .await
        {
            tracing::debug!(error = %e, "link session record not deleted");
        }
    }

    /// Pushes to the session's companion, on whichever node it is connected; false if it is gone.
    pub async fn push_to_companion(
        &self,
        reference: &[u8; 16],
        session: &LinkSession,
        push: natter_proto::wire::Push,
    ) -> bool {
        if let Some(conn) = &session.companion {
            return conn.send(ConnEvent::push(push));
        }
        if !self.bus.clustered() {
            return false;
        }
        let msg = BusMessage::new(Body::LinkPush(messages::LinkPush {
            reference: reference.to_vec(),
            push: push.encode_to_vec(),
        }));
        matches!(
            self.bus.request(&session.node, &msg).await,
            Ok(BusMessage {
                body: Some(Body::Done(messages::Done { ok: true }))
            })
        )
    }
}

/// Who fetched whose device list: they get a push when it changes.
#[derive(Debug, Default)]
pub struct Watchers {
    map: Mutex<HashMap<PhoneNumber, HashSet<PhoneNumber>>>,
}

/// Watchers kept per account; past it the oldest interest is not tracked (those clients still refresh on
/// a device mismatch when they send).
const MAX_WATCHERS_PER_ACCOUNT: usize = 10_000;

impl Watchers {
    /// `watcher` follows `watched`.
    pub fn add(&self, watched: &PhoneNumber, watcher: &PhoneNumber) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let set = map.entry(watched.clone()).or_default();
        if set.len() < MAX_WATCHERS_PER_ACCOUNT {
            set.insert(watcher.clone());
        }
    }

    /// Who follows `watched`.
    pub fn of(&self, watched: &PhoneNumber) -> Vec<PhoneNumber> {
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(watched)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default()
    }
}

/// Something per account, cached for the send path (which checks every message's device set and that
/// the recipient did not block the sender). Every change invalidates the account's entry, on every node
/// (the invalidation is broadcast on the bus). A read that raced an invalidation is not cached, thanks to
/// a per-shard generation. In a cluster entries also expire after [`CLUSTER_CACHE_TTL`], in case an
/// invalidation was lost.
#[derive(Debug)]
pub struct AccountCache<V> {
    shards: Vec<Mutex<CacheShard<V>>>,
    bus: Arc<dyn Bus>,
    ttl: Option<std::time::Duration>,
}

/// Device ids per account.
pub type DeviceCache = AccountCache<Arc<[natter_proto::DeviceId]>>;
/// The numbers each account blocked (usually none).
pub type BlockCache = AccountCache<Arc<[PhoneNumber]>>;

#[derive(Debug)]
struct CacheShard<V> {
    generation: u64,
    map: HashMap<PhoneNumber, (V, std::time::Instant)>,
}

impl<V> Default for CacheShard<V> {
    fn default() -> Self {
        Self {
            generation: 0,
            map: HashMap::new(),
        }
    }
}

const CACHE_SHARDS: usize = 64;
/// Entries per shard before the shard starts over (a cache, not a store).
const CACHE_SHARD_CAP: usize = 65_536;
/// How long a cached entry lives in a cluster.
pub const CLUSTER_CACHE_TTL: std::time::Duration = std::time::Duration::from_secs(30);

impl<V: Clone> Default for AccountCache<V> {
    fn default() -> Self {
        Self::new(Arc::new(crate::bus::LocalBus::default()))
    }
}

impl<V: Clone> AccountCache<V> {
    /// An empty cache whose invalidations go to every node of `bus`.
    pub fn new(bus: Arc<dyn Bus>) -> Self {
        Self {
            shards: (0..CACHE_SHARDS).map(|_| Mutex::default()).collect(),
            ttl: bus.clustered().then_some(CLUSTER_CACHE_TTL),
            bus,
        }
    }

    fn shard(&self, phone: &PhoneNumber) -> MutexGuard<'_, CacheShard<V>> {
        use std::hash::{DefaultHasher, Hash, Hasher};
        let mut h = DefaultHasher::new();
        phone.hash(&mut h);
        self.shards[(h.finish() as usize) % CACHE_SHARDS]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// The cached value, or the generation to hand back to [`AccountCache::insert`] after a store read.
    pub fn get(&self, phone: &PhoneNumber) -> Result<V, u64> {
        let shard = self.shard(phone);
        match shard.map.get(phone) {
            Some((ids, at)) if self.ttl.is_none_or(|ttl| at.elapsed() < ttl) => Ok(ids.clone()),
            _ => Err(shard.generation),
        }
    }

    /// Caches a value read from the store, unless the account changed since `generation`.
    pub fn insert(&self, phone: &PhoneNumber, ids: V, generation: u64) {
        let mut shard = self.shard(phone);
        if shard.generation != generation {
            return;
        }
        if shard.map.len() >= CACHE_SHARD_CAP {
            shard.map.clear();
        }
        shard
            .map
            .insert(phone.clone(), (ids, std::time::Instant::now()));
    }

    /// Forgets an account's entry (it changed), here and on every other node.
    pub fn invalidate(&self, phone: &PhoneNumber) {
        self.invalidate_local(phone);
        if self.bus.clustered() {
            let bus = self.bus.clone();
            let msg = BusMessage::new(Body::Invalidate(messages::Account {
                phone: phone.as_str().to_owned(),
            }));
            tokio::spawn(async move {
                if let Err(e) = bus.broadcast(&msg).await {
                    tracing::warn!(error = %e, "cache invalidation not broadcast");
                }
            });
        }
    }

    /// Forgets an account's entry on this node only.
    pub fn invalidate_local(&self, phone: &PhoneNumber) {
        let mut shard = self.shard(phone);
        shard.generation += 1;
        shard.map.remove(phone);
    }

    /// Forgets everything (invalidations may have been lost while the bus was down).
    pub fn clear(&self) {
        for shard in &self.shards {
            let mut shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            shard.generation += 1;
            shard.map.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use natter_proto::DeviceId;

    #[test]
    fn a_read_that_raced_an_invalidation_is_not_cached() {
        let cache = DeviceCache::default();
        let p = PhoneNumber::from_e164("+15550000001").unwrap();
        let generation = cache.get(&p).unwrap_err();
        cache.invalidate(&p);
        cache.insert(&p, Arc::from(vec![DeviceId::PRIMARY]), generation);
        let generation = cache.get(&p).unwrap_err();
        cache.insert(&p, Arc::from(vec![DeviceId::PRIMARY]), generation);
        assert_eq!(cache.get(&p).unwrap().len(), 1);
        cache.invalidate(&p);
        assert!(cache.get(&p).is_err());
    }
}
