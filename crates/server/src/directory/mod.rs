//! The directory's in-memory parts: open link sessions (a companion waiting for a primary to scan its QR
//! code) and who follows which account's device list (so a change is pushed at once). Durable directory
//! state (accounts, devices, lists, prekeys) lives in the [`crate::store::Store`].

pub mod presence;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use natter_proto::PhoneNumber;

use crate::delivery::ConnShared;

/// A companion's open link session.
#[derive(Debug, Clone)]
pub struct LinkSession {
    /// The companion's (anonymous) connection.
    pub companion: Arc<ConnShared>,
    /// The companion's Noise key: the key the published list must give the new device.
    pub companion_noise: [u8; 32],
    /// When the reference stops working.
    pub expires: Instant,
    /// The primary that offered its account, with its connection.
    pub offered_by: Option<(PhoneNumber, Arc<ConnShared>)>,
}

/// Open link sessions by reference.
#[derive(Debug, Default)]
pub struct LinkSessions {
    map: Mutex<HashMap<[u8; 16], LinkSession>>,
}

/// Sessions at most; a flood of anonymous requests cannot grow the map further.
const MAX_LINK_SESSIONS: usize = 100_000;

impl LinkSessions {
    fn lock(&self) -> MutexGuard<'_, HashMap<[u8; 16], LinkSession>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Opens a session; `None` if too many are open.
    pub fn open(&self, reference: [u8; 16], session: LinkSession) -> Option<()> {
        let mut map = self.lock();
        if map.len() >= MAX_LINK_SESSIONS {
            let now = Instant::now();
            map.retain(|_, s| s.expires > now);
            if map.len() >= MAX_LINK_SESSIONS {
                return None;
            }
        }
        map.insert(reference, session);
        Some(())
    }

    /// A live session.
    pub fn get(&self, reference: &[u8; 16]) -> Option<LinkSession> {
        let mut map = self.lock();
        match map.get(reference) {
            Some(s) if s.expires > Instant::now() => Some(s.clone()),
            Some(_) => {
                map.remove(reference);
                None
            }
            None => None,
        }
    }

    /// Records the primary that offered its account.
    pub fn set_offer(&self, reference: &[u8; 16], phone: PhoneNumber, conn: Arc<ConnShared>) {
        if let Some(s) = self.lock().get_mut(reference) {
            s.offered_by = Some((phone, conn));
        }
    }

    /// Ends a session.
    pub fn close(&self, reference: &[u8; 16]) -> Option<LinkSession> {
        self.lock().remove(reference)
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

/// Device ids per account, cached for the send path (which checks every message's device set). Every
/// change of an account's devices invalidates its entry. A read that raced an invalidation is not
/// cached, thanks to a per-shard generation.
#[derive(Debug)]
pub struct DeviceCache {
    shards: Vec<Mutex<CacheShard>>,
}

#[derive(Debug, Default)]
struct CacheShard {
    generation: u64,
    map: HashMap<PhoneNumber, Arc<[natter_proto::DeviceId]>>,
}

const CACHE_SHARDS: usize = 64;
/// Entries per shard before the shard starts over (a cache, not a store).
const CACHE_SHARD_CAP: usize = 65_536;

impl Default for DeviceCache {
    fn default() -> Self {
        Self {
            shards: (0..CACHE_SHARDS).map(|_| Mutex::default()).collect(),
        }
    }
}

impl DeviceCache {
    fn shard(&self, phone: &PhoneNumber) -> MutexGuard<'_, CacheShard> {
        use std::hash::{DefaultHasher, Hash, Hasher};
        let mut h = DefaultHasher::new();
        phone.hash(&mut h);
        self.shards[(h.finish() as usize) % CACHE_SHARDS]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// The cached ids, or the generation to hand back to [`DeviceCache::insert`] after a store read.
    pub fn get(&self, phone: &PhoneNumber) -> Result<Arc<[natter_proto::DeviceId]>, u64> {
        let shard = self.shard(phone);
        shard.map.get(phone).cloned().ok_or(shard.generation)
    }

    /// Caches ids read from the store, unless the account changed since `generation`.
    pub fn insert(&self, phone: &PhoneNumber, ids: Arc<[natter_proto::DeviceId]>, generation: u64) {
        let mut shard = self.shard(phone);
        if shard.generation != generation {
            return;
        }
        if shard.map.len() >= CACHE_SHARD_CAP {
            shard.map.clear();
        }
        shard.map.insert(phone.clone(), ids);
    }

    /// Forgets an account's devices (they changed).
    pub fn invalidate(&self, phone: &PhoneNumber) {
        let mut shard = self.shard(phone);
        shard.generation += 1;
        shard.map.remove(phone);
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
