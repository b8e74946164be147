//! Presence in memory only (never written to disk): which accounts have a device connected, when each
//! account's last device left, and which connections follow which account. Changes are pushed to the
//! followers that the account's privacy settings and blocks allow, checked at every push, so a block or a
//! stricter setting takes effect at once.
//!
//! In a cluster each node counts its own connections and learns the other nodes' online accounts from
//! the bus (changes, snapshots, heartbeats; see [`crate::bus::inbound`]); an account is online if any live
//! node has it. A node that falls silent takes its accounts offline with it.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use natter_proto::PhoneNumber;
use natter_proto::social::{Availability, PresenceState, Visibility};
use natter_proto::wire::{Push, push};

use crate::delivery::{ConnEvent, ConnShared};
use crate::store::{Store, StoreResult};

/// One account's presence.
#[derive(Debug, Default, Clone, Copy)]
struct AccountPresence {
    /// Devices connected now.
    online: u32,
    /// When the last device disconnected (ms since epoch; 0 if not since start).
    last_seen_ms: u64,
}

/// A connection following an account.
#[derive(Debug)]
struct Follower {
    /// Who follows (the connection's account).
    phone: PhoneNumber,
    conn: Weak<ConnShared>,
}

#[derive(Debug, Default)]
struct Inner {
    accounts: HashMap<PhoneNumber, AccountPresence>,
    /// Followed account → followers by connection id.
    followers: HashMap<PhoneNumber, HashMap<u64, Follower>>,
    /// Connection id → the accounts it follows (to clean up when it closes).
    following: HashMap<u64, HashSet<PhoneNumber>>,
    /// Other nodes: when last heard of, and the accounts online there.
    remote: HashMap<String, RemoteNode>,
    /// Last seen on other nodes, per account.
    remote_last_seen: HashMap<PhoneNumber, u64>,
}

#[derive(Debug)]
struct RemoteNode {
    heard: std::time::Instant,
    online: HashSet<PhoneNumber>,
}

impl Inner {
    fn online_remotely(&self, owner: &PhoneNumber) -> bool {
        self.remote.values().any(|n| n.online.contains(owner))
    }

    fn is_online(&self, owner: &PhoneNumber) -> bool {
        self.accounts.get(owner).is_some_and(|p| p.online > 0) || self.online_remotely(owner)
    }

    fn node(&mut self, node: &str) -> &mut RemoteNode {
        let n = self
            .remote
            .entry(node.to_owned())
            .or_insert_with(|| RemoteNode {
                heard: std::time::Instant::now(),
                online: HashSet::new(),
            });
        n.heard = std::time::Instant::now();
        n
    }
}

/// Presence of every account, and who follows it.
#[derive(Debug, Default)]
pub struct Presence {
    inner: Mutex<Inner>,
}

/// Whether `viewer` may see `owner`'s presence.
pub async fn may_see(
    store: &dyn Store,
    owner: &PhoneNumber,
    viewer: &PhoneNumber,
) -> StoreResult<bool> {
    if owner == viewer {
        return Ok(true);
    }
    if store.is_blocked(owner, viewer).await? || store.is_blocked(viewer, owner).await? {
        return Ok(false);
    }
    Ok(match store.get_privacy(owner).await?.last_seen {
        Visibility::Everyone => true,
        Visibility::Contacts => store.is_contact(owner, viewer).await?,
        Visibility::Nobody => false,
    })
}

impl Presence {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The presence of `owner` as anyone allowed sees it.
    pub fn state(&self, owner: &PhoneNumber) -> PresenceState {
        let inner = self.lock();
        let p = inner.accounts.get(owner).copied().unwrap_or_default();
        let online = p.online > 0 || inner.online_remotely(owner);
        let last_seen = p
            .last_seen_ms
            .max(inner.remote_last_seen.get(owner).copied().unwrap_or(0));
        PresenceState {
            phone: owner.as_str().to_owned(),
            availability: if online {
                Availability::Online
            } else {
                Availability::Offline
            } as i32,
            last_seen_ms: if online { 0 } else { last_seen },
        }
    }

    /// Accounts with a device connected to this node.
    pub fn local_online(&self) -> Vec<PhoneNumber> {
        self.lock()
            .accounts
            .iter()
            .filter(|(_, p)| p.online > 0)
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Another node is alive.
    pub fn heard_from(&self, node: &str) {
        self.lock().node(node);
    }

    /// An account came online or went offline on another node. Returns whether its presence as seen
    /// from here changed.
    pub fn remote_change(
        &self,
        node: &str,
        owner: &PhoneNumber,
        online: bool,
        last_seen_ms: u64,
    ) -> bool {
        let mut inner = self.lock();
        let before = inner.is_online(owner);
        let n = inner.node(node);
        if online {
            n.online.insert(owner.clone());
        } else {
            n.online.remove(owner);
            let seen = inner.remote_last_seen.entry(owner.clone()).or_default();
            *seen = (*seen).max(last_seen_ms);
        }
        before != inner.is_online(owner)
    }

    /// The accounts online on another node (a part of its snapshot; the first part replaces what was
    /// known). Returns the accounts whose presence as seen from here changed.
    pub fn remote_snapshot(
        &self,
        node: &str,
        first: bool,
        phones: Vec<PhoneNumber>,
        now_ms: u64,
    ) -> Vec<PhoneNumber> {
        let mut inner = self.lock();
        let old = if first {
            std::mem::take(&mut inner.node(node).online)
        } else {
            HashSet::new()
        };
        let mut changed = Vec::new();
        for p in &phones {
            let was = inner.is_online(p) || old.contains(p);
            inner.node(node).online.insert(p.clone());
            if !was {
                changed.push(p.clone());
            }
        }
        for p in old {
            if !inner.is_online(&p) {
                inner.remote_last_seen.insert(p.clone(), now_ms);
                changed.push(p);
            }
        }
        changed
    }

    /// Forgets the nodes not heard of for `silence`: their accounts go offline, last seen `now_ms`.
    /// Returns the accounts whose presence as seen from here changed.
    pub fn expire_nodes(&self, silence: std::time::Duration, now_ms: u64) -> Vec<PhoneNumber> {
        let mut inner = self.lock();
        let dead: Vec<String> = inner
            .remote
            .iter()
            .filter(|(_, n)| n.heard.elapsed() > silence)
            .map(|(k, _)| k.clone())
            .collect();
        let mut changed = Vec::new();
        for node in dead {
            tracing::info!(node = %node, "node silent: its accounts go offline");
            let Some(n) = inner.remote.remove(&node) else {
                continue;
            };
            for p in n.online {
                if !inner.is_online(&p) {
                    inner.remote_last_seen.insert(p.clone(), now_ms);
                    changed.push(p);
                }
            }
        }
        changed
    }

    /// The presence of `owner` as `viewer` may see it.
    pub async fn state_for(
        &self,
        store: &dyn Store,
        owner: &PhoneNumber,
        viewer: &PhoneNumber,
    ) -> StoreResult<PresenceState> {
        if may_see(store, owner, viewer).await? {
            Ok(self.state(owner))
        } else {
            Ok(hidden(owner))
        }
    }

    /// `conn` (logged in as `viewer`) follows `owner` from now on, until it closes. `false` if it
    /// already follows `max` accounts.
    pub fn follow(
        &self,
        owner: &PhoneNumber,
        viewer: &PhoneNumber,
        conn: &Arc<ConnShared>,
        max: usize,
    ) -> bool {
        let mut inner = self.lock();
        let following = inner.following.entry(conn.id).or_default();
        if !following.contains(owner) && following.len() >= max {
            return false;
        }
        following.insert(owner.clone());
        inner.followers.entry(owner.clone()).or_default().insert(
            conn.id,
            Follower {
                phone: viewer.clone(),
                conn: Arc::downgrade(conn),
            },
        );
        true
    }

    /// A connection closed: it follows nobody any more.
    pub fn closed(&self, conn_id: u64) {
        let mut inner = self.lock();
        let Some(owners) = inner.following.remove(&conn_id) else {
            return;
        };
        for owner in owners {
            if let Some(f) = inner.followers.get_mut(&owner) {
                f.remove(&conn_id);
                if f.is_empty() {
                    inner.followers.remove(&owner);
                }
            }
        }
    }

    /// A device of `owner` connected. Returns whether the account just came online.
    pub fn connected(&self, owner: &PhoneNumber) -> bool {
        let mut inner = self.lock();
        let p = inner.accounts.entry(owner.clone()).or_default();
        p.online += 1;
        p.online == 1
    }

    /// A device of `owner` disconnected at `now_ms`. Returns whether the account just went offline.
    pub fn disconnected(&self, owner: &PhoneNumber, now_ms: u64) -> bool {
        let mut inner = self.lock();
        let p = inner.accounts.entry(owner.clone()).or_default();
        p.online = p.online.saturating_sub(1);
        if p.online == 0 {
            p.last_seen_ms = now_ms;
            true
        } else {
            false
        }
    }

    /// Pushes `owner`'s current presence to every follower allowed to see it (others get nothing).
    pub async fn announce(&self, store: &dyn Store, owner: &PhoneNumber) -> StoreResult<()> {
        let followers: Vec<(PhoneNumber, Arc<ConnShared>)> = {
            let inner = self.lock();
            inner
                .followers
                .get(owner)
                .map(|f| {
                    f.values()
                        .filter_map(|f| f.conn.upgrade().map(|c| (f.phone.clone(), c)))
                        .collect()
                })
                .unwrap_or_default()
        };
        if followers.is_empty() {
            return Ok(());
        }
        let state = self.state(owner);
        for (viewer, conn) in followers {
            if may_see(store, owner, &viewer).await? {
                conn.send(ConnEvent::push(Push {
                    body: Some(push::Body::Presence(state.clone())),
                }));
            }
        }
        Ok(())
    }

    /// Accounts known to be online now.
    pub fn online_accounts(&self) -> usize {
        self.lock()
            .accounts
            .values()
            .filter(|p| p.online > 0)
            .count()
    }
}

/// What a viewer who may not see an account's presence gets.
pub fn hidden(owner: &PhoneNumber) -> PresenceState {
    PresenceState {
        phone: owner.as_str().to_owned(),
        availability: Availability::Hidden as i32,
        last_seen_ms: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::PrivacyRecord;
    use crate::store::memory::MemoryStore;

    fn num(n: u32) -> PhoneNumber {
        PhoneNumber::from_e164(&format!("+1555000{n:04}")).unwrap()
    }

    #[tokio::test]
    async fn online_offline_and_privacy() {
        let store = MemoryStore::default();
        let p = Presence::default();
        let (a, b, c) = (num(1), num(2), num(3));
        assert!(p.connected(&a));
        assert!(!p.connected(&a), "a second device");
        assert_eq!(p.state(&a).availability, Availability::Online as i32);
        assert!(!p.disconnected(&a, 10));
        assert!(p.disconnected(&a, 20));
        let s = p.state(&a);
        assert_eq!(
            (s.availability, s.last_seen_ms),
            (Availability::Offline as i32, 20)
        );

        assert!(
            may_see(&store, &a, &b).await.unwrap(),
            "everyone by default"
        );
        store
            .set_privacy(
                &a,
                PrivacyRecord {
                    last_seen: Visibility::Contacts,
                    read_receipts_off: false,
                },
            )
            .await
            .unwrap();
        assert!(!may_see(&store, &a, &b).await.unwrap());
        store
            .add_contacts(&a, std::slice::from_ref(&b))
            .await
            .unwrap();
        assert!(may_see(&store, &a, &b).await.unwrap());
        assert!(!may_see(&store, &a, &c).await.unwrap());
        store.set_blocked(&a, &b, true).await.unwrap();
        assert!(!may_see(&store, &a, &b).await.unwrap(), "a block hides");
        assert_eq!(
            p.state_for(&store, &a, &b).await.unwrap().availability,
            Availability::Hidden as i32
        );
        assert!(may_see(&store, &a, &a).await.unwrap());
    }
}
