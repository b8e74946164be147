//! Fixed-window rate limiters keyed by number or IP address. In memory: a restart forgets them, which
//! errs on the side of letting a user in; the per-code attempt count, which guards against guessing, is
//! in the store.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Counts events per key in fixed windows.
#[derive(Debug)]
pub struct RateLimiter<K> {
    window: Duration,
    max: u32,
    entries: Mutex<HashMap<K, (Instant, u32)>>,
}

impl<K: Eq + Hash + Clone> RateLimiter<K> {
    /// At most `max` events per key per `window`.
    pub fn new(max: u32, window: Duration) -> Self {
        Self {
            window,
            max,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// Counts an event for `key` at `now`. `Err(wait)` if the key is over its limit, with how long
    /// until its window ends.
    pub fn check(&self, key: &K, now: Instant) -> Result<(), Duration> {
        self.take(key, 1, now).map(|_| ())
    }

    /// Whether `n` more events for `key` would fit now (nothing is counted). `Err(wait)` as for
    /// [`RateLimiter::take`].
    pub fn would_allow(&self, key: &K, n: u32, now: Instant) -> Result<(), Duration> {
        let map = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        match map.get(key) {
            Some((start, used))
                if now.duration_since(*start) < self.window
                    && used.saturating_add(n) > self.max =>
            {
                Err(self.window.saturating_sub(now.duration_since(*start)))
            }
            _ if n > self.max => Err(self.window),
            _ => Ok(()),
        }
    }

    /// Counts `n` events for `key` at `now`, all or none. `Ok(left)`: how many more the window allows;
    /// `Err(wait)` if the key would go over its limit, with how long until its window ends.
    pub fn take(&self, key: &K, n: u32, now: Instant) -> Result<u32, Duration> {
        let mut map = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() > 100_000 {
            let window = self.window;
            map.retain(|_, (start, _)| now.duration_since(*start) < window);
        }
        let entry = map.entry(key.clone()).or_insert((now, 0));
        if now.duration_since(entry.0) >= self.window {
            *entry = (now, 0);
        }
        if entry.1.saturating_add(n) > self.max {
            return Err(self.window.saturating_sub(now.duration_since(entry.0)));
        }
        entry.1 += n;
        Ok(self.max - entry.1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_amounts_all_or_none() {
        let rl = RateLimiter::new(10, Duration::from_secs(60));
        let t0 = Instant::now();
        assert_eq!(rl.take(&"a", 7, t0), Ok(3));
        assert!(
            rl.take(&"a", 4, t0).is_err(),
            "over the limit: nothing taken"
        );
        assert_eq!(rl.take(&"a", 3, t0), Ok(0));
        assert_eq!(rl.take(&"a", 10, t0 + Duration::from_secs(60)), Ok(0));
        assert!(rl.would_allow(&"b", 10, t0).is_ok());
        assert!(rl.would_allow(&"b", 11, t0).is_err());
        assert_eq!(rl.take(&"b", 6, t0), Ok(4));
        assert!(rl.would_allow(&"b", 5, t0).is_err());
        assert!(rl.would_allow(&"b", 4, t0).is_ok());
        assert_eq!(rl.take(&"b", 4, t0), Ok(0), "would_allow counted nothing");
    }

    #[test]
    fn limits_per_key_and_window() {
        let rl = RateLimiter::new(2, Duration::from_secs(60));
        let t0 = Instant::now();
        assert!(rl.check(&"a", t0).is_ok());
        assert!(rl.check(&"a", t0).is_ok());
        let wait = rl.check(&"a", t0).unwrap_err();
        assert_eq!(wait, Duration::from_secs(60));
        assert!(rl.check(&"b", t0).is_ok());
        assert!(rl.check(&"a", t0 + Duration::from_secs(61)).is_ok());
    }
}
