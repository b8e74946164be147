//! What a node does with the bus: handles what other nodes send it, keeps presence in step (changes,
//! heartbeats, snapshots), and catches up from the store when bus messages may have been lost: after
//! every (re)connection to the bus, when it lagged, and every [`crate::ServerConfig::bus_catchup_interval`]
//! as a safety net. Catching up is cheap: one indexed queue read per connected device, spread out.

use std::sync::Arc;
use std::time::Duration;

use natter_proto::limits::MAX_DEVICES_PER_ACCOUNT;
use natter_proto::wire::{DeviceListChanged, Push, push};
use natter_proto::{DeviceId, PhoneNumber};
use prost::Message;
use tokio::sync::watch;

use super::Inbound;
use super::messages::{self, Body, BusMessage};
use crate::delivery::ConnEvent;
use crate::server::ServerState;

/// How often a node tells the others it is alive.
pub const HEARTBEAT: Duration = Duration::from_secs(2);
/// A node not heard of for this long is taken for dead: its accounts go offline.
pub const NODE_SILENCE: Duration = Duration::from_secs(10);
/// Accounts per snapshot message.
const SNAPSHOT_PART: usize = 10_000;
/// Connections woken per catch-up step, and the pause between steps.
const CATCHUP_STEP: usize = 500;
const CATCHUP_PAUSE: Duration = Duration::from_millis(20);

/// Runs the node's side of the bus until shutdown. Does nothing on a single node.
pub async fn run(state: Arc<ServerState>, mut shutdown: watch::Receiver<bool>) {
    let bus = state.router.bus().clone();
    let Some(mut inbound) = bus.take_inbound() else {
        return;
    };
    let mut heartbeat = tokio::time::interval(HEARTBEAT);
    let mut catchup = tokio::time::interval(state.config.bus_catchup_interval);
    catchup.tick().await;
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            ev = inbound.recv() => {
                let Some(ev) = ev else { return };
                handle(&state, ev).await;
            }
            _ = heartbeat.tick() => {
                let msg = BusMessage::new(Body::Heartbeat(messages::Heartbeat {
                    node: bus.node_id().to_owned(),
                }));
                let _ = bus.broadcast(&msg).await;
                for phone in state.presence.expire_nodes(NODE_SILENCE, crate::now_ms()) {
                    announce_presence(&state, &phone);
                }
            }
            _ = catchup.tick() => spawn_catch_up(&state),
        }
    }
}

async fn handle(state: &Arc<ServerState>, ev: Inbound) {
    match ev {
        Inbound::Message(msg, reply) => {
            let answer = message(state, msg).await;
            if let Some(reply) = reply {
                let _ = reply.send(BusMessage::new(Body::Done(messages::Done { ok: answer })));
            }
        }
        Inbound::Reconnected => reconnected(state).await,
        Inbound::Lagged => {
            tracing::warn!("bus messages dropped for this node: catching up from the store");
            spawn_catch_up(state);
        }
    }
}

fn device(phone: &str, device: u32) -> Option<(PhoneNumber, DeviceId)> {
    Some((
        PhoneNumber::from_e164(phone).ok()?,
        DeviceId::new(device).ok()?,
    ))
}

/// Handles one message; the result answers a request.
async fn message(state: &Arc<ServerState>, msg: BusMessage) -> bool {
    let router = &state.router;
    match msg.body {
        Some(Body::Mail(m)) => {
            let Some((phone, dev)) = device(&m.phone, m.device) else {
                return false;
            };
            match router.get(&phone, dev) {
                Some(conn) => {
                    conn.wake(m.seq.max(1));
                    true
                }
                None => false,
            }
        }
        Some(Body::Push(p)) => {
            let (Some((phone, dev)), Ok(push)) =
                (device(&p.phone, p.device), Push::decode(p.push.as_slice()))
            else {
                return false;
            };
            router
                .get(&phone, dev)
                .is_some_and(|c| c.send(ConnEvent::push(push)))
        }
        Some(Body::Kick(k)) => match device(&k.phone, k.device) {
            Some((phone, dev)) => router.kick_local(&phone, dev, &k.reason),
            None => false,
        },
        Some(Body::Invalidate(a)) => {
            if let Ok(phone) = PhoneNumber::from_e164(&a.phone) {
                state.device_cache.invalidate_local(&phone);
                state.block_cache.invalidate_local(&phone);
            }
            true
        }
        Some(Body::ListChanged(a)) => {
            if let Ok(phone) = PhoneNumber::from_e164(&a.phone) {
                notify_watchers(state, &phone, state.watchers.of(&phone));
            }
            true
        }
        Some(Body::Presence(p)) => {
            if let Ok(phone) = PhoneNumber::from_e164(&p.phone)
                && state
                    .presence
                    .remote_change(&p.node, &phone, p.online, p.last_seen_ms)
            {
                announce_presence(state, &phone);
            }
            true
        }
        Some(Body::Heartbeat(h)) => {
            state.presence.heard_from(&h.node);
            true
        }
        Some(Body::SyncRequest(h)) => {
            state.presence.heard_from(&h.node);
            send_snapshot(state, Some(&h.node)).await;
            true
        }
        Some(Body::Snapshot(s)) => {
            let phones = s
                .phones
                .iter()
                .filter_map(|p| PhoneNumber::from_e164(p).ok())
                .collect();
            let changed = state
                .presence
                .remote_snapshot(&s.node, s.first, phones, crate::now_ms());
            for phone in changed {
                announce_presence(state, &phone);
            }
            true
        }
        Some(Body::LinkPush(l)) => {
            let (Ok(reference), Ok(push)) = (
                <[u8; 16]>::try_from(l.reference.as_slice()),
                Push::decode(l.push.as_slice()),
            ) else {
                return false;
            };
            state
                .links
                .local(&reference)
                .and_then(|s| s.companion)
                .is_some_and(|c| c.send(ConnEvent::push(push)))
        }
        // Routes and records are kept by the bus itself.
        Some(Body::Done(_)) | Some(Body::Route(_)) | Some(Body::Record(_)) | None => false,
    }
}

/// After a (re)connection to the bus: the records may be gone (a NATS server restarted empty) and
/// messages may have been lost. Routes are written again, caches dropped, presence exchanged, and every
/// connected device's queue re-read.
async fn reconnected(state: &Arc<ServerState>) {
    let bus = state.router.bus();
    if let Err(e) = bus.reconnected().await {
        tracing::warn!(error = %e, "bus records not reopened");
    }
    state.device_cache.clear();
    state.block_cache.clear();
    let sync = BusMessage::new(Body::SyncRequest(messages::Heartbeat {
        node: bus.node_id().to_owned(),
    }));
    let _ = bus.broadcast(&sync).await;
    send_snapshot(state, None).await;
    let state = state.clone();
    tokio::spawn(async move {
        let devices = state.router.local_devices();
        for chunk in devices.chunks(CATCHUP_STEP) {
            for (phone, device, conn) in chunk {
                state.router.claim(phone, *device, conn).await;
                conn.wake(1);
            }
        }
        if !devices.is_empty() {
            tracing::info!(
                devices = devices.len(),
                "routes rewritten and queues re-read after the bus came back"
            );
        }
    });
}

/// Wakes every connected device so that it re-reads its queue, in steps (background).
fn spawn_catch_up(state: &Arc<ServerState>) {
    let state = state.clone();
    tokio::spawn(async move {
        let devices = state.router.local_devices();
        for chunk in devices.chunks(CATCHUP_STEP) {
            for (_, _, conn) in chunk {
                conn.wake(1);
            }
            tokio::time::sleep(CATCHUP_PAUSE).await;
        }
    });
}

/// Sends the accounts online here and the devices connected here to one node, or to all.
async fn send_snapshot(state: &Arc<ServerState>, to: Option<&str>) {
    let bus = state.router.bus();
    let online: Vec<String> = state
        .presence
        .local_online()
        .iter()
        .map(|p| p.as_str().to_owned())
        .collect();
    let routes: Vec<String> = state
        .router
        .local_devices()
        .iter()
        .map(|(p, d, _)| super::route_key(p, *d))
        .collect();
    let parts = online
        .len()
        .div_ceil(SNAPSHOT_PART)
        .max(routes.len().div_ceil(SNAPSHOT_PART))
        .max(1);
    let part = |v: &[String], i: usize| -> Vec<String> {
        v.iter()
            .skip(i * SNAPSHOT_PART)
            .take(SNAPSHOT_PART)
            .cloned()
            .collect()
    };
    for i in 0..parts {
        let msg = BusMessage::new(Body::Snapshot(messages::Snapshot {
            node: bus.node_id().to_owned(),
            first: i == 0,
            phones: part(&online, i),
            routes: part(&routes, i),
        }));
        let r = match to {
            Some(node) => bus.send(node, &msg).await,
            None => bus.broadcast(&msg).await,
        };
        if let Err(e) = r {
            tracing::debug!(error = %e, "snapshot not sent");
        }
    }
}

/// Pushes "device list changed" to every device of `accounts` (wherever it is connected).
pub fn notify_watchers(state: &ServerState, phone: &PhoneNumber, accounts: Vec<PhoneNumber>) {
    for account in accounts {
        for id in 1..=MAX_DEVICES_PER_ACCOUNT as u32 {
            if let Ok(device) = DeviceId::new(id) {
                state.router.notify(
                    &account,
                    device,
                    ConnEvent::push(Push {
                        body: Some(push::Body::DeviceListChanged(DeviceListChanged {
                            phone: phone.as_str().to_owned(),
                        })),
                    }),
                );
            }
        }
    }
}

/// An account came online or went offline on this node: its followers here hear of it, and so do the
/// other nodes (which tell theirs).
pub fn presence_changed(state: &Arc<ServerState>, phone: &PhoneNumber, online: bool) {
    announce_presence(state, phone);
    let bus = state.router.bus().clone();
    if bus.clustered() {
        let msg = BusMessage::new(Body::Presence(messages::PresenceChange {
            node: bus.node_id().to_owned(),
            phone: phone.as_str().to_owned(),
            online,
            last_seen_ms: if online { 0 } else { crate::now_ms() },
        }));
        tokio::spawn(async move {
            if let Err(e) = bus.broadcast(&msg).await {
                tracing::debug!(error = %e, "presence change not broadcast");
            }
        });
    }
}

/// Tells an account's followers on this node its current presence (in the background).
pub fn announce_presence(state: &Arc<ServerState>, phone: &PhoneNumber) {
    let (state, phone) = (state.clone(), phone.clone());
    tokio::spawn(async move {
        if let Err(e) = state.presence.announce(&*state.store, &phone).await {
            tracing::debug!(error = %e, "presence not announced");
        }
    });
}
