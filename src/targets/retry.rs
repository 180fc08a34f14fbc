//! Retries for remote targets: what is worth retrying, and how long to wait. Connection
//! errors, timeouts, 5xx, 408 and 429 are retried with capped exponential backoff and full
//! jitter (honouring `Retry-After`); any other answer is final. Each target has a budget of
//! time per run for retrying, so one dead target cannot hold a run for long.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use reqwest::StatusCode;

/// Should an answer with this status be retried? 5xx, but not those that say the server
/// cannot do this at all (501, 505).
pub fn retryable_status(s: StatusCode) -> bool {
    (s.is_server_error() && s != StatusCode::NOT_IMPLEMENTED && s != StatusCode::HTTP_VERSION_NOT_SUPPORTED)
        || s == StatusCode::REQUEST_TIMEOUT
        || s == StatusCode::TOO_MANY_REQUESTS
}

/// `Retry-After`, as seconds or as an HTTP date.
pub fn retry_after(headers: &reqwest::header::HeaderMap, now: chrono::DateTime<chrono::Utc>) -> Option<Duration> {
    let v = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = chrono::DateTime::parse_from_rfc2822(v).ok()?.to_utc();
    Some((when - now).to_std().unwrap_or(Duration::ZERO))
}

/// Backoff with a budget: the time from a target's first failure in a run until it is given
/// up, attempts and waits together.
#[derive(Debug)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    budget: Duration,
    first_failure: Mutex<Option<Instant>>,
}

impl Backoff {
    pub fn new(budget: Duration) -> Self {
        Backoff::with(Duration::from_millis(500), Duration::from_secs(30), budget)
    }

    fn with(base: Duration, cap: Duration, budget: Duration) -> Self {
        Backoff {
            base,
            cap,
            budget,
            first_failure: Mutex::new(None),
        }
    }

    /// The wait before retry number `attempt` (1-based), or `None` when the wait would end
    /// past the budget. Full jitter: uniform in [0, min(cap, base * 2^(attempt-1))], and at
    /// least what the server asked for with `Retry-After`.
    pub fn next_delay(&self, attempt: u32, server_asks: Option<Duration>) -> Option<Duration> {
        let exp = self
            .base
            .saturating_mul(1u32 << (attempt.saturating_sub(1)).min(16))
            .min(self.cap);
        let jittered = exp.mul_f64(rand::random::<f64>());
        let delay = server_asks.map_or(jittered, |d| d.max(jittered));
        let mut first = self.first_failure.lock().unwrap_or_else(|e| e.into_inner());
        let since = first.get_or_insert_with(Instant::now).elapsed();
        if since + delay > self.budget {
            return None;
        }
        Some(delay)
    }

    pub fn budget(&self) -> Duration {
        self.budget
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_capped_and_stop_at_the_budget() {
        let b = Backoff::with(
            Duration::from_millis(100),
            Duration::from_millis(400),
            Duration::from_secs(2),
        );
        for attempt in 1..=10 {
            let cap = Duration::from_millis(100 * (1 << (attempt - 1))).min(Duration::from_millis(400));
            if let Some(d) = b.next_delay(attempt, None) {
                assert!(d <= cap, "attempt {attempt}: {d:?} > {cap:?}");
            }
        }
        let b = Backoff::with(
            Duration::from_millis(100),
            Duration::from_secs(1),
            Duration::from_secs(3),
        );
        assert_eq!(
            b.next_delay(1, Some(Duration::from_secs(2))),
            Some(Duration::from_secs(2))
        );
        assert_eq!(b.next_delay(2, Some(Duration::from_secs(4))), None, "past the budget");
        std::thread::sleep(Duration::from_millis(200));
        // The budget counts the time since the first failure, not only the waits.
        assert_eq!(b.next_delay(3, Some(Duration::from_millis(2850))), None);
        assert!(b.next_delay(3, Some(Duration::from_millis(2500))).is_some());
    }

    #[test]
    fn what_is_retried() {
        assert!(retryable_status(StatusCode::BAD_GATEWAY));
        assert!(retryable_status(StatusCode::INSUFFICIENT_STORAGE));
        assert!(retryable_status(StatusCode::TOO_MANY_REQUESTS));
        assert!(retryable_status(StatusCode::REQUEST_TIMEOUT));
        assert!(!retryable_status(StatusCode::FORBIDDEN));
        assert!(!retryable_status(StatusCode::CONFLICT));
        assert!(!retryable_status(StatusCode::NOT_IMPLEMENTED));
        let now = chrono::DateTime::parse_from_rfc3339("2015-10-21T07:28:00Z")
            .unwrap()
            .to_utc();
        let mut h = reqwest::header::HeaderMap::new();
        h.insert(reqwest::header::RETRY_AFTER, "7".parse().unwrap());
        assert_eq!(retry_after(&h, now), Some(Duration::from_secs(7)));
        h.insert(
            reqwest::header::RETRY_AFTER,
            "Wed, 21 Oct 2015 07:28:30 GMT".parse().unwrap(),
        );
        assert_eq!(retry_after(&h, now), Some(Duration::from_secs(30)));
        h.insert(reqwest::header::RETRY_AFTER, "soon".parse().unwrap());
        assert_eq!(retry_after(&h, now), None);
    }
}
