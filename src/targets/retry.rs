//! Retries for remote targets: what is worth retrying, and how long to wait. Connection
//! errors, timeouts, 5xx, 408 and 429 are retried with capped exponential backoff and full
//! jitter (honouring `Retry-After`); any other answer is final. Each target has a budget of
//! time per run for retrying, so one dead target cannot hold a run for long.

use std::sync::Mutex;
use std::time::Duration;

use reqwest::StatusCode;

/// Should an answer with this status be retried?
pub fn retryable_status(s: StatusCode) -> bool {
    s.is_server_error() || s == StatusCode::REQUEST_TIMEOUT || s == StatusCode::TOO_MANY_REQUESTS
}

/// `Retry-After` in seconds (the HTTP-date form is rare from WebDAV servers and ignored).
pub fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(Duration::from_secs)
}

#[derive(Debug)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    budget: Duration,
    /// Time spent waiting between attempts so far in this run.
    spent: Mutex<Duration>,
}

impl Backoff {
    pub fn new(budget: Duration) -> Self {
        Backoff {
            base: Duration::from_millis(500),
            cap: Duration::from_secs(30),
            budget,
            spent: Mutex::new(Duration::ZERO),
        }
    }

    #[cfg(test)]
    fn with(base: Duration, cap: Duration, budget: Duration) -> Self {
        Backoff {
            base,
            cap,
            budget,
            spent: Mutex::new(Duration::ZERO),
        }
    }

    /// The wait before retry number `attempt` (1-based), or `None` when the budget is spent.
    /// Full jitter: uniform in [0, min(cap, base * 2^(attempt-1))], at least the server's
    /// `Retry-After`.
    pub fn next_delay(&self, attempt: u32, server_asks: Option<Duration>) -> Option<Duration> {
        let exp = self.base.saturating_mul(1u32 << (attempt - 1).min(16)).min(self.cap);
        let jittered = exp.mul_f64(rand::random::<f64>());
        let delay = match server_asks {
            Some(d) => d.max(jittered).min(self.cap.max(d)),
            None => jittered,
        };
        let mut spent = self.spent.lock().unwrap_or_else(|e| e.into_inner());
        if *spent + delay > self.budget {
            return None;
        }
        *spent += delay;
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
        assert_eq!(b.next_delay(1, Some(Duration::from_secs(2))), None, "over the budget");
    }

    #[test]
    fn what_is_retried() {
        assert!(retryable_status(StatusCode::BAD_GATEWAY));
        assert!(retryable_status(StatusCode::INSUFFICIENT_STORAGE));
        assert!(retryable_status(StatusCode::TOO_MANY_REQUESTS));
        assert!(retryable_status(StatusCode::REQUEST_TIMEOUT));
        assert!(!retryable_status(StatusCode::FORBIDDEN));
        assert!(!retryable_status(StatusCode::CONFLICT));
        let mut h = reqwest::header::HeaderMap::new();
        h.insert(reqwest::header::RETRY_AFTER, "7".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(7)));
    }
}
