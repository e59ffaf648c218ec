//! Per-key request rate limiting for the API.
//!
//! Why: one misbehaving client (a runaway agent loop, a retry storm) must not
//! be able to saturate the control plane, the store or the runtime for every
//! other caller. Each key (an owner, an API key, a client address: the caller
//! decides) gets a token bucket of `burst` requests that refills at
//! `requests_per_minute`.
//!
//! The bucket is implemented as GCRA (the generic cell rate algorithm): per
//! key we keep one instant, the "theoretical arrival time" (TAT) at which the
//! bucket would be full again. That makes a check O(1), needs no background
//! refill, and makes idle keys easy to recognise: a key whose TAT is in the
//! past has a full bucket and is indistinguishable from an unknown key, so it
//! can be forgotten. Memory stays bounded by sweeping such keys periodically
//! and, should the table still reach its cap, by forgetting the keys closest
//! to a full bucket.
//!
//! Nothing here knows HTTP; [`RateDecision::headers`] only names the values
//! the REST layer sends back.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// How many keys a limiter tracks at most, unless told otherwise
/// ([`RateLimiter::with_max_keys`]).
pub const DEFAULT_MAX_KEYS: usize = 100_000;

/// How often keys with a full bucket are swept out of the table.
const SWEEP_INTERVAL: Duration = Duration::from_secs(60);

/// Rate limiting settings (`server.rate_limit` or wherever it is wired).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitConfig {
    /// Whether requests are limited at all. Off by default.
    pub enabled: bool,
    /// Sustained rate each key may reach, in requests per minute; 0 means
    /// unlimited (like the other limits in the configuration).
    pub requests_per_minute: u32,
    /// How many requests a key with a full bucket may make at once; 0 is
    /// treated as 1.
    pub burst: u32,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        RateLimitConfig {
            enabled: false,
            requests_per_minute: 600,
            burst: 60,
        }
    }
}

/// The answer to one [`RateLimiter::check`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateDecision {
    /// Whether the request may proceed.
    pub allowed: bool,
    /// Size of the bucket: the most requests a key can make at once.
    pub limit: u32,
    /// Requests the key may still make right now, after this one.
    pub remaining: u32,
    /// Time until the key's bucket is full again.
    pub reset_after: Duration,
    /// When refused: time until one request will be allowed again.
    pub retry_after: Option<Duration>,
}

impl RateDecision {
    /// The response headers carrying this decision, names in lowercase (the
    /// form `http::HeaderName::from_static` accepts): `x-ratelimit-limit`,
    /// `x-ratelimit-remaining`, `x-ratelimit-reset` (seconds until the bucket
    /// is full, rounded up) and, when refused, `retry-after` (seconds, rounded
    /// up, at least 1).
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        let mut headers = vec![
            ("x-ratelimit-limit", self.limit.to_string()),
            ("x-ratelimit-remaining", self.remaining.to_string()),
            ("x-ratelimit-reset", ceil_secs(self.reset_after).to_string()),
        ];
        if let Some(retry_after) = self.retry_after {
            headers.push(("retry-after", ceil_secs(retry_after).max(1).to_string()));
        }
        headers
    }
}

/// Whole seconds in `d`, rounded up.
fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// A per-key token bucket limiter; thread-safe, shared by reference.
#[derive(Debug)]
pub struct RateLimiter {
    /// `None` when limiting is off (disabled or unlimited rate).
    rule: Option<Rule>,
    /// Bucket size reported when limiting is off.
    burst: u32,
    max_keys: usize,
    state: Mutex<State>,
}

/// The GCRA parameters derived from the configuration.
#[derive(Debug, Clone, Copy)]
struct Rule {
    /// Time one request "costs": a minute divided by the rate.
    interval: Duration,
    /// How far ahead of now a key's TAT may run: `burst * interval`.
    tolerance: Duration,
    burst: u32,
}

#[derive(Debug)]
struct State {
    /// Per key, the instant at which its bucket is full again (TAT). Keys
    /// whose TAT has passed carry no information and may be dropped.
    tats: HashMap<Box<str>, Instant>,
    /// When keys with full buckets are swept next.
    next_sweep: Option<Instant>,
}

impl RateLimiter {
    /// A limiter tracking at most [`DEFAULT_MAX_KEYS`] keys.
    pub fn new(config: RateLimitConfig) -> RateLimiter {
        RateLimiter::with_max_keys(config, DEFAULT_MAX_KEYS)
    }

    /// A limiter tracking at most `max_keys` keys (at least 1). When the table
    /// is full, keys with a full bucket are dropped first, then the keys
    /// closest to a full bucket (which thereby get a full bucket early).
    pub fn with_max_keys(config: RateLimitConfig, max_keys: usize) -> RateLimiter {
        let burst = config.burst.max(1);
        let rule = (config.enabled && config.requests_per_minute > 0).then(|| {
            let interval =
                Duration::from_nanos(60_000_000_000 / u64::from(config.requests_per_minute));
            Rule {
                interval,
                tolerance: interval.saturating_mul(burst),
                burst,
            }
        });
        RateLimiter {
            rule,
            burst,
            max_keys: max_keys.max(1),
            state: Mutex::new(State {
                tats: HashMap::new(),
                next_sweep: None,
            }),
        }
    }

    /// Whether requests are limited at all; when not, [`check`](Self::check)
    /// allows everything and the caller may skip the headers.
    pub fn enabled(&self) -> bool {
        self.rule.is_some()
    }

    /// Counts one request for `key` now and says whether it may proceed.
    pub fn check(&self, key: &str) -> RateDecision {
        self.check_at(key, Instant::now())
    }

    /// [`check`](Self::check) at a given instant: for callers that already
    /// read the clock, and for tests. Instants need not be monotonic across
    /// calls; an earlier `now` is simply judged against the later state.
    pub fn check_at(&self, key: &str, now: Instant) -> RateDecision {
        let Some(rule) = self.rule else {
            return RateDecision {
                allowed: true,
                limit: self.burst,
                remaining: self.burst,
                reset_after: Duration::ZERO,
                retry_after: None,
            };
        };

        let mut state = self.lock();
        state.sweep_if_due(now);

        // A missing key has a full bucket: its TAT is "now".
        let tat = state.tats.get(key).map_or(now, |&tat| tat.max(now));
        let new_tat = tat.checked_add(rule.interval).unwrap_or(tat);
        let ahead = new_tat.saturating_duration_since(now);

        if ahead > rule.tolerance {
            // Refused; nothing is recorded, so refusals cost no memory.
            return RateDecision {
                allowed: false,
                limit: rule.burst,
                remaining: 0,
                reset_after: tat.saturating_duration_since(now),
                retry_after: Some(ahead - rule.tolerance),
            };
        }

        match state.tats.get_mut(key) {
            Some(slot) => *slot = new_tat,
            None => {
                if state.tats.len() >= self.max_keys {
                    state.make_room(now, self.max_keys);
                }
                state.tats.insert(key.into(), new_tat);
            }
        }

        let left = (rule.tolerance - ahead).as_nanos() / rule.interval.as_nanos().max(1);
        RateDecision {
            allowed: true,
            limit: rule.burst,
            remaining: u32::try_from(left).unwrap_or(u32::MAX).min(rule.burst),
            reset_after: ahead,
            retry_after: None,
        }
    }

    /// How many keys are tracked right now (for metrics and tests).
    pub fn tracked_keys(&self) -> usize {
        self.lock().tats.len()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is consistent after every statement; a panic elsewhere
        // while holding the lock leaves nothing half-done.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl State {
    /// Every [`SWEEP_INTERVAL`], drops the keys whose bucket is full again.
    fn sweep_if_due(&mut self, now: Instant) {
        match self.next_sweep {
            Some(at) if now < at => {}
            Some(_) => {
                self.drop_full(now);
                self.next_sweep = now.checked_add(SWEEP_INTERVAL);
            }
            None => self.next_sweep = now.checked_add(SWEEP_INTERVAL),
        }
    }

    fn drop_full(&mut self, now: Instant) {
        self.tats.retain(|_, tat| *tat > now);
    }

    /// Frees at least one slot below `max_keys`: first the keys with a full
    /// bucket; if that is not enough, an eighth of the table, the keys closest
    /// to a full bucket, so that the O(n) work is amortised over many inserts.
    fn make_room(&mut self, now: Instant, max_keys: usize) {
        self.drop_full(now);
        if self.tats.len() < max_keys {
            return;
        }
        let excess = self.tats.len() + 1 - max_keys;
        let evict = excess.max(max_keys / 8).min(self.tats.len());
        if evict == 0 {
            return;
        }
        let mut tats: Vec<Instant> = self.tats.values().copied().collect();
        let (_, &mut threshold, _) = tats.select_nth_unstable(evict - 1);
        // Evict exactly `evict` keys: all below the threshold, then as many
        // at the threshold as are still needed.
        let below = tats.iter().filter(|&&tat| tat < threshold).count();
        let mut at_threshold = evict - below;
        self.tats.retain(|_, tat| {
            if *tat < threshold {
                false
            } else if *tat == threshold && at_threshold > 0 {
                at_threshold -= 1;
                false
            } else {
                true
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(rpm: u32, burst: u32) -> RateLimiter {
        RateLimiter::new(RateLimitConfig {
            enabled: true,
            requests_per_minute: rpm,
            burst,
        })
    }

    #[test]
    fn defaults_are_off_600_per_minute_burst_60() {
        let config = RateLimitConfig::default();
        assert!(!config.enabled);
        assert_eq!(config.requests_per_minute, 600);
        assert_eq!(config.burst, 60);
    }

    #[test]
    fn config_deserialises_with_defaults_and_refuses_unknown_keys() {
        let config: RateLimitConfig = serde_json::from_str(r#"{"enabled": true}"#).unwrap();
        assert!(config.enabled);
        assert_eq!(config.requests_per_minute, 600);
        assert_eq!(config.burst, 60);
        assert!(serde_json::from_str::<RateLimitConfig>(r#"{"rate": 1}"#).is_err());
    }

    #[test]
    fn disabled_allows_everything_and_tracks_nothing() {
        let limiter = RateLimiter::new(RateLimitConfig::default());
        assert!(!limiter.enabled());
        let now = Instant::now();
        for _ in 0..1000 {
            assert!(limiter.check_at("k", now).allowed);
        }
        assert_eq!(limiter.tracked_keys(), 0);

        let unlimited = limiter_with_rpm_zero();
        assert!(!unlimited.enabled());
        assert!(unlimited.check_at("k", now).allowed);
    }

    fn limiter_with_rpm_zero() -> RateLimiter {
        limiter(0, 5)
    }

    #[test]
    fn burst_then_refusal_with_retry_after() {
        // 60 per minute: one request per second, 3 at once.
        let limiter = limiter(60, 3);
        let now = Instant::now();

        for expected_remaining in [2, 1, 0] {
            let d = limiter.check_at("k", now);
            assert!(d.allowed);
            assert_eq!(d.limit, 3);
            assert_eq!(d.remaining, expected_remaining);
            assert_eq!(d.retry_after, None);
        }
        let refused = limiter.check_at("k", now);
        assert!(!refused.allowed);
        assert_eq!(refused.remaining, 0);
        assert_eq!(refused.retry_after, Some(Duration::from_secs(1)));
        assert_eq!(refused.reset_after, Duration::from_secs(3));

        // Just before retry_after: still refused, with the rest to wait.
        let almost = limiter.check_at("k", now + Duration::from_millis(999));
        assert!(!almost.allowed);
        assert_eq!(almost.retry_after, Some(Duration::from_millis(1)));
        // At retry_after: allowed, and the bucket is empty again.
        let later = limiter.check_at("k", now + Duration::from_secs(1));
        assert!(later.allowed);
        assert_eq!(later.remaining, 0);
    }

    #[test]
    fn refill_over_time() {
        // 120 per minute: a token every 500 ms, 4 at once.
        let limiter = limiter(120, 4);
        let now = Instant::now();
        for _ in 0..4 {
            assert!(limiter.check_at("k", now).allowed);
        }
        assert!(!limiter.check_at("k", now).allowed);

        // After 1 s two tokens are back.
        let t1 = now + Duration::from_secs(1);
        assert_eq!(limiter.check_at("k", t1).remaining, 1);
        assert_eq!(limiter.check_at("k", t1).remaining, 0);
        assert!(!limiter.check_at("k", t1).allowed);

        // After a long idle period the bucket is full, not fuller.
        let t2 = t1 + Duration::from_secs(3600);
        let d = limiter.check_at("k", t2);
        assert!(d.allowed);
        assert_eq!(d.remaining, 3);
        assert_eq!(d.reset_after, Duration::from_millis(500));
    }

    #[test]
    fn keys_are_independent() {
        let limiter = limiter(60, 2);
        let now = Instant::now();
        assert!(limiter.check_at("a", now).allowed);
        assert!(limiter.check_at("a", now).allowed);
        assert!(!limiter.check_at("a", now).allowed);

        let b = limiter.check_at("b", now);
        assert!(b.allowed);
        assert_eq!(b.remaining, 1);
        assert!(!limiter.check_at("a", now).allowed);
    }

    #[test]
    fn headers_round_up_and_carry_retry_after_only_when_refused() {
        let limiter = limiter(40, 1); // a token every 1.5 s
        let now = Instant::now();
        let ok = limiter.check_at("k", now);
        assert_eq!(
            ok.headers(),
            vec![
                ("x-ratelimit-limit", "1".to_string()),
                ("x-ratelimit-remaining", "0".to_string()),
                ("x-ratelimit-reset", "2".to_string()),
            ]
        );
        let refused = limiter.check_at("k", now + Duration::from_millis(100));
        assert_eq!(refused.retry_after, Some(Duration::from_millis(1400)));
        let headers = refused.headers();
        assert_eq!(headers.len(), 4);
        assert_eq!(headers[3], ("retry-after", "2".to_string()));

        // A sub-second wait still says "1", never "0".
        let tiny = RateDecision {
            allowed: false,
            limit: 1,
            remaining: 0,
            reset_after: Duration::ZERO,
            retry_after: Some(Duration::from_nanos(1)),
        };
        assert_eq!(tiny.headers()[3], ("retry-after", "1".to_string()));
        for (name, _) in tiny.headers() {
            assert_eq!(name, name.to_ascii_lowercase());
        }
    }

    #[test]
    fn burst_zero_means_one() {
        let limiter = limiter(60, 0);
        let now = Instant::now();
        let d = limiter.check_at("k", now);
        assert!(d.allowed);
        assert_eq!(d.limit, 1);
        assert!(!limiter.check_at("k", now).allowed);
    }

    #[test]
    fn refusals_do_not_grow_the_table() {
        let limiter = limiter(60, 1);
        let now = Instant::now();
        assert!(limiter.check_at("k", now).allowed);
        for _ in 0..100 {
            assert!(!limiter.check_at("k", now).allowed);
        }
        assert_eq!(limiter.tracked_keys(), 1);
    }

    #[test]
    fn the_table_never_exceeds_its_cap() {
        let limiter = RateLimiter::with_max_keys(
            RateLimitConfig {
                enabled: true,
                requests_per_minute: 60,
                burst: 10,
            },
            16,
        );
        let now = Instant::now();
        for i in 0..1000 {
            // Every key is active (bucket not full), so only the cap bounds
            // the table.
            assert!(limiter.check_at(&format!("key-{i}"), now).allowed);
            assert!(limiter.tracked_keys() <= 16);
        }
        // The newest key is still tracked: it was inserted after eviction.
        assert!(limiter.check_at("key-999", now).remaining < 9);
    }

    #[test]
    fn cap_evicts_full_buckets_before_active_ones() {
        let limiter = RateLimiter::with_max_keys(
            RateLimitConfig {
                enabled: true,
                requests_per_minute: 60,
                burst: 2,
            },
            3,
        );
        let now = Instant::now();
        // "hot" drains its bucket; "idle-1" and "idle-2" use one token each.
        assert!(limiter.check_at("hot", now).allowed);
        assert!(limiter.check_at("hot", now).allowed);
        assert!(limiter.check_at("idle-1", now).allowed);
        assert!(limiter.check_at("idle-2", now).allowed);
        // 1.5 s later the idle buckets are full, hot's is not.
        let later = now + Duration::from_millis(1500);
        assert!(limiter.check_at("new", later).allowed);
        assert_eq!(limiter.tracked_keys(), 2);
        // "hot" was kept: 1.5 tokens came back, it takes one and has none
        // left (a forgotten key would report 1 remaining).
        assert_eq!(limiter.check_at("hot", later).remaining, 0);
    }

    #[test]
    fn periodic_sweep_forgets_idle_keys() {
        let limiter = limiter(60, 5);
        let now = Instant::now();
        for i in 0..50 {
            assert!(limiter.check_at(&format!("key-{i}"), now).allowed);
        }
        assert_eq!(limiter.tracked_keys(), 50);
        // Past the sweep interval every one of those buckets is full again.
        let later = now + SWEEP_INTERVAL + Duration::from_secs(1);
        assert!(limiter.check_at("other", later).allowed);
        assert_eq!(limiter.tracked_keys(), 1);
    }

    #[test]
    fn concurrent_checks_never_exceed_the_burst() {
        let limiter = std::sync::Arc::new(limiter(1, 100));
        let now = Instant::now();
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let limiter = limiter.clone();
                std::thread::spawn(move || {
                    (0..100)
                        .filter(|_| limiter.check_at("shared", now).allowed)
                        .count()
                })
            })
            .collect();
        let allowed: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(allowed, 100);
    }
}

/// How many requests each key has in flight (a streamed answer counts until
/// its body ends), bounded per key. The table holds only keys with a
/// request in flight.
#[derive(Debug)]
pub struct InFlightLimiter {
    max: usize,
    held: std::sync::Arc<Mutex<HashMap<Box<str>, usize>>>,
}

/// One request's place; given back when dropped.
#[derive(Debug)]
pub struct InFlightGuard {
    key: Box<str>,
    held: std::sync::Arc<Mutex<HashMap<Box<str>, usize>>>,
}

impl InFlightLimiter {
    /// `max` requests per key at once; 0: no limit.
    pub fn new(max: usize) -> InFlightLimiter {
        InFlightLimiter {
            max,
            held: Default::default(),
        }
    }

    /// A place for one more request of `key`, unless it holds `max`.
    pub fn try_hold(&self, key: &str) -> Option<InFlightGuard> {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        let count = held.entry(key.into()).or_insert(0);
        if self.max > 0 && *count >= self.max {
            return None;
        }
        *count += 1;
        Some(InFlightGuard {
            key: key.into(),
            held: self.held.clone(),
        })
    }

    /// Keys with a request in flight (for tests).
    pub fn keys(&self) -> usize {
        self.held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = held.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                held.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod in_flight_tests {
    use super::InFlightLimiter;

    #[test]
    fn requests_in_flight_are_bounded_per_key_and_forgotten() {
        let limiter = InFlightLimiter::new(2);
        let a1 = limiter.try_hold("a");
        let a2 = limiter.try_hold("a");
        assert!(a1.is_some() && a2.is_some());
        assert!(limiter.try_hold("a").is_none());
        assert!(
            limiter.try_hold("b").is_some(),
            "another key is not limited"
        );
        drop(a1);
        assert!(limiter.try_hold("a").is_some());
        drop(a2);
        assert_eq!(limiter.keys(), 0, "idle keys leave the table");
        let unlimited = InFlightLimiter::new(0);
        let held: Vec<_> = (0..1000).filter_map(|_| unlimited.try_hold("a")).collect();
        assert_eq!(held.len(), 1000);
    }
}
