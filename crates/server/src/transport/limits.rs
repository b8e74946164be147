//! Abuse limits enforced at the edge ([`crate::config::AbuseLimits`]): connections and handshakes per
//! client IP, sends per account, queued bytes per device. Every refusal is a typed [`Error`] for the
//! client (`RateLimited` with a retry delay, or `LimitExceeded`).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use natter_proto::wire::{Error, ErrorCode};
use natter_proto::{DeviceId, PhoneNumber};

use crate::config::AbuseLimits;
use crate::store::{Store, StoreError};

/// Rate-limit tables are pruned of idle entries when they grow past this.
const PRUNE_AT: usize = 65_536;
/// How long a measured queue size is trusted before it is read from the store again (sends in between
/// are added to it).
const QUEUE_MEASURE_TTL: Duration = Duration::from_secs(1);

/// A token bucket: `burst` tokens, refilled at `rate` per second.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    /// Takes one token, or says how long until one is there.
    fn take<K: Eq + std::hash::Hash>(
        map: &mut HashMap<K, Bucket>,
        key: K,
        rate: u32,
        burst: u32,
        now: Instant,
    ) -> Result<(), Duration> {
        if rate == 0 {
            return Ok(());
        }
        let (rate, burst) = (f64::from(rate), f64::from(burst.max(1)));
        if map.len() >= PRUNE_AT {
            // Entries that would be full again carry no information.
            map.retain(|_, b| {
                b.tokens + now.saturating_duration_since(b.last).as_secs_f64() * rate < burst
            });
        }
        let b = map.entry(key).or_insert(Bucket {
            tokens: burst,
            last: now,
        });
        b.tokens =
            (b.tokens + now.saturating_duration_since(b.last).as_secs_f64() * rate).min(burst);
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - b.tokens) / rate))
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn rate_limited(message: String, retry_after: Duration) -> Error {
    let mut e = Error::new(ErrorCode::RateLimited, message);
    e.retry_after_ms = (retry_after.as_millis() as u64).max(1);
    e
}

/// The state behind the abuse limits, shared by every connection.
#[derive(Debug)]
pub struct EdgeLimits {
    config: AbuseLimits,
    connections: Mutex<HashMap<IpAddr, usize>>,
    handshakes: Mutex<HashMap<IpAddr, Bucket>>,
    sends: Mutex<HashMap<PhoneNumber, Bucket>>,
    queued: Mutex<HashMap<(PhoneNumber, DeviceId), (u64, Instant)>>,
}

/// A connection's place in its IP address's count; released on drop.
#[derive(Debug)]
pub struct ConnSlot {
    limits: Arc<EdgeLimits>,
    ip: IpAddr,
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        let mut conns = lock(&self.limits.connections);
        if let Some(n) = conns.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                conns.remove(&self.ip);
            }
        }
    }
}

impl EdgeLimits {
    /// Empty tables for these limits.
    pub fn new(config: AbuseLimits) -> Self {
        Self {
            config,
            connections: Mutex::default(),
            handshakes: Mutex::default(),
            sends: Mutex::default(),
            queued: Mutex::default(),
        }
    }

    /// The limits in force.
    pub fn config(&self) -> &AbuseLimits {
        &self.config
    }

    /// Admits a new connection from `ip` (its connection count and handshake rate), or says why not.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<ConnSlot, Error> {
        let c = &self.config;
        {
            let conns = lock(&self.connections);
            if conns.get(&ip).copied().unwrap_or(0) >= c.max_connections_per_ip {
                return Err(Error::new(
                    ErrorCode::LimitExceeded,
                    format!(
                        "too many connections from {ip} (at most {} at once): close some first",
                        c.max_connections_per_ip
                    ),
                ));
            }
        }
        Bucket::take(
            &mut lock(&self.handshakes),
            ip,
            c.handshakes_per_ip_per_s,
            c.handshake_burst,
            Instant::now(),
        )
        .map_err(|wait| {
            rate_limited(
                format!(
                    "too many new connections from {ip} (at most {} per second): retry later",
                    c.handshakes_per_ip_per_s
                ),
                wait,
            )
        })?;
        *lock(&self.connections).entry(ip).or_default() += 1;
        Ok(ConnSlot {
            limits: self.clone(),
            ip,
        })
    }

    /// Counts one message sent by `phone` against its send rate.
    pub fn take_send(&self, phone: &PhoneNumber) -> Result<(), Error> {
        let c = &self.config;
        Bucket::take(
            &mut lock(&self.sends),
            phone.clone(),
            c.sends_per_account_per_s,
            c.send_burst,
            Instant::now(),
        )
        .map_err(|wait| {
            rate_limited(
                format!(
                    "this account sends too fast (at most {} messages per second): retry later",
                    c.sends_per_account_per_s
                ),
                wait,
            )
        })
    }

    /// Refuses (the inner `Err`) a send that would put more than the limit in a device's queue.
    pub async fn check_queue(
        &self,
        store: &dyn Store,
        phone: &PhoneNumber,
        device: DeviceId,
        adding: u64,
    ) -> Result<Result<(), Error>, StoreError> {
        let limit = self.config.max_queued_bytes_per_device;
        let key = (phone.clone(), device);
        let now = Instant::now();
        let known = lock(&self.queued)
            .get(&key)
            .filter(|(_, at)| now.saturating_duration_since(*at) < QUEUE_MEASURE_TTL)
            .map(|(bytes, _)| *bytes);
        let queued = match known {
            Some(b) => b,
            None => {
                let b = store.queued_bytes(phone, device).await?;
                let mut q = lock(&self.queued);
                if q.len() >= PRUNE_AT {
                    q.retain(|_, (_, at)| now.saturating_duration_since(*at) < QUEUE_MEASURE_TTL);
                }
                q.insert(key, (b, now));
                b
            }
        };
        if queued.saturating_add(adding) > limit {
            return Ok(Err(Error::new(
                ErrorCode::LimitExceeded,
                format!(
                    "the queue of {phone}'s device {device} is full ({queued} bytes waiting, at most {limit}): try again once it has caught up"
                ),
            )));
        }
        Ok(Ok(()))
    }

    /// Adds what was just queued for a device to its measured size.
    pub fn queued(&self, phone: &PhoneNumber, device: DeviceId, bytes: u64) {
        if let Some((b, _)) = lock(&self.queued).get_mut(&(phone.clone(), device)) {
            *b = b.saturating_add(bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn buckets_allow_a_burst_then_the_rate() {
        let mut map: HashMap<u32, Bucket> = HashMap::new();
        let t0 = Instant::now();
        for _ in 0..3 {
            Bucket::take(&mut map, 1, 10, 3, t0).unwrap();
        }
        let wait = Bucket::take(&mut map, 1, 10, 3, t0).unwrap_err();
        assert!(wait <= Duration::from_millis(100) && wait > Duration::ZERO);
        // Another key has its own bucket; a rate of 0 is no limit.
        Bucket::take(&mut map, 2, 10, 3, t0).unwrap();
        for _ in 0..100 {
            Bucket::take(&mut map, 3, 0, 1, t0).unwrap();
        }
        // 100 ms later one token is back, not two.
        let t1 = t0 + Duration::from_millis(100);
        Bucket::take(&mut map, 1, 10, 3, t1).unwrap();
        assert!(Bucket::take(&mut map, 1, 10, 3, t1).is_err());
    }

    #[test]
    fn connection_slots_are_counted_per_address() {
        let limits = Arc::new(EdgeLimits::new(AbuseLimits {
            max_connections_per_ip: 2,
            ..AbuseLimits::default()
        }));
        let a: IpAddr = [10, 0, 0, 1].into();
        let b: IpAddr = [10, 0, 0, 2].into();
        let s1 = limits.admit(a).unwrap();
        let _s2 = limits.admit(a).unwrap();
        let e = limits.admit(a).unwrap_err();
        assert_eq!(e.code, ErrorCode::LimitExceeded as i32);
        let _s3 = limits.admit(b).unwrap();
        drop(s1);
        let _s4 = limits.admit(a).unwrap();
    }
}
