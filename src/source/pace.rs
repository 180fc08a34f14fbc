//! A gentle pull (`priority.etcd_latency_budget`): while the snapshot streams, a probe on a
//! connection of its own reads one absent key from the same member every
//! [`PROBE_EVERY`] (a linearizable count: the path every client request takes through the
//! member, and nothing written), and a [`Controller`] paces the pull so that the probe's
//! latency (the worst of its last three answers) stays within the budget, a multiple of its
//! median latency before the pull began.
//!
//! - Nobody to yield to: when the store's revision moves by fewer than [`BUSY_WRITES_PER_S`]
//!   a second, the pull goes at full speed, whatever the latency (its own cost hurts no one).
//! - Bounded: the pull never goes slower than 1/[`MAX_SLOWDOWN`] of the fastest it went
//!   unpaced, so it takes at most about that many times as long, and etcd's read transaction (which
//!   keeps freed pages from reuse while it lasts) stays open at most that many times as long.
//! - Pausing the reader is enough: HTTP/2 flow control stops etcd's sender once the window
//!   is full, so etcd sends no faster than the pull reads.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

/// How often the probe asks.
pub const PROBE_EVERY: Duration = Duration::from_millis(50);
/// The slowest the pull goes, as a fraction of its unpaced speed: at most this many times
/// as long as at full speed.
pub const MAX_SLOWDOWN: f64 = 2.25;
/// Writes a second under which the member counts as quiet.
pub const BUSY_WRITES_PER_S: f64 = 5.0;
/// Probes before the pull: their median is the baseline.
const BASELINE_PROBES: usize = 10;
/// The longest the baseline may take.
const BASELINE_MAX: Duration = Duration::from_secs(2);
/// The longest the pull waits for the probe to connect and measure its baseline.
pub const START_MAX: Duration = Duration::from_secs(3);
/// The key the probe counts (absent: the answer is a header and a zero).
const PROBE_KEY: &str = "/etcd-backupd-latency-probe";
/// The shortest wait the pacer sleeps for; shorter debts gather until they reach it.
const MIN_WAIT: Duration = Duration::from_millis(5);
/// The slowest pace, whatever was measured (a pull that never went fast yet).
const MIN_RATE: f64 = 4.0 * 1048576.0;

/// What pacing did in one pull: in the run's record, its metrics and the log.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PaceReport {
    /// The budget, a multiple of `baseline_ms`.
    pub budget: f64,
    /// The probe's median latency before the pull (ms).
    pub baseline_ms: f64,
    /// The probe's median and 99th percentile during the pull (ms).
    pub during_p50_ms: f64,
    pub during_p99_ms: f64,
    /// How long the pull was held back in all.
    pub slowed_s: f64,
    /// How many probes answered during the pull.
    pub probes: usize,
}

impl PaceReport {
    /// "slowed 3.1 s for etcd (probe latency p50 …, p99 …, … before; budget 1.25x)", for the
    /// log and the summary.
    pub fn describe(&self) -> String {
        format!(
            "slowed {:.1} s for etcd (probe latency p50 {:.2} ms, p99 {:.2} ms, {:.2} ms before; budget {}x)",
            self.slowed_s, self.during_p50_ms, self.during_p99_ms, self.baseline_ms, self.budget
        )
    }
}

/// The pace as a function of what the probe and the pull report; no clock, no I/O.
#[derive(Debug, Clone)]
pub struct Controller {
    limit_ms: f64,
    /// The cap, bytes/s; `None`: full speed.
    rate: Option<f64>,
    /// The fastest the pull went unpaced, bytes/s.
    full_speed: f64,
    /// Steps taken unpaced so far: full speed is known only after [`WARM_UP_STEPS`].
    unpaced_steps: u32,
}

/// Steps at full speed before the pace may first slow the pull: its full speed, which
/// bounds the slowdown, is measured over them (the first moments of a stream are slower).
pub const WARM_UP_STEPS: u32 = 6;

impl Controller {
    pub fn new(baseline_ms: f64, budget: f64) -> Controller {
        Controller {
            // A quarter of a millisecond is noise on any machine.
            limit_ms: (baseline_ms * budget).max(baseline_ms + 0.25),
            rate: None,
            full_speed: 0.0,
            unpaced_steps: 0,
        }
    }

    /// Full speed again (a probe failed: nothing says the member is slow).
    pub fn reset(&mut self) -> Option<f64> {
        self.rate = None;
        None
    }

    /// The latency the pace keeps the probe under (ms).
    pub fn limit_ms(&self) -> f64 {
        self.limit_ms
    }

    /// One step: `latency_ms`, the probes' recent worst; `speed`, what the pull did since
    /// the last step (bytes/s); `busy`, whether anyone else writes. Returns the new cap.
    pub fn step(&mut self, latency_ms: f64, speed: f64, busy: bool) -> Option<f64> {
        if self.rate.is_none() {
            self.full_speed = self.full_speed.max(speed);
            self.unpaced_steps += 1;
        }
        let floor = (self.full_speed / MAX_SLOWDOWN).max(MIN_RATE);
        if busy && latency_ms > self.limit_ms && self.unpaced_steps > WARM_UP_STEPS {
            let from = self.rate.unwrap_or(self.full_speed.max(speed));
            self.rate = Some((from * 0.7).max(floor));
        } else if !busy {
            self.rate = None;
        } else if latency_ms < 0.8 * self.limit_ms {
            // Down fast, up slowly: a moment of calm under a steady load is not the end of it.
            self.rate = match self.rate {
                Some(r) if r * 1.05 < self.full_speed => Some(r * 1.05),
                _ => None,
            };
        }
        self.rate
    }
}

/// What the pull and the probe share.
#[derive(Debug, Default)]
struct Shared {
    /// The pace at the current cap, from when it was set; `None`: full speed.
    pace: Option<crate::fsutil::Pace>,
    pulled: u64,
    slowed: Duration,
}

/// The pull's side: it reports what it read and waits as long as the pace asks.
#[derive(Clone, Default)]
pub struct Pacer {
    shared: Arc<Mutex<Shared>>,
}

impl Pacer {
    /// Counts `bytes` just read, and waits if the cap says so. A message is 32 KiB: waits
    /// under [`MIN_WAIT`] are left to gather (a timer rounds every wait up to the next
    /// millisecond, which per message would slow the pull far more than asked); the pace
    /// counts from when its cap was set, so time overslept is made up by the next messages.
    pub async fn pulled(&self, bytes: usize) {
        let wait = {
            let mut s = self.shared.lock().unwrap();
            s.pulled += bytes as u64;
            s.pace.as_mut().map_or(Duration::ZERO, |p| p.delay_for(bytes))
        };
        if wait >= MIN_WAIT {
            let t = Instant::now();
            tokio::time::sleep(wait).await;
            self.shared.lock().unwrap().slowed += t.elapsed();
        }
    }

    fn bytes(&self) -> u64 {
        self.shared.lock().unwrap().pulled
    }

    /// A new cap (bytes/s), paced from now on; `None`: full speed.
    fn set_rate(&self, rate: Option<f64>) {
        let mut s = self.shared.lock().unwrap();
        let now = s.pace.as_ref().map(|p| p.rate());
        let want = rate.map(|r| r as u64);
        if now != want {
            s.pace = want.map(crate::fsutil::Pace::new);
        }
    }

    fn slowed(&self) -> Duration {
        self.shared.lock().unwrap().slowed
    }
}

/// One probe: its latency (ms) and the store's revision, or `None` if it failed.
async fn probe(kv: &mut etcd_client::KvClient, timeout: Duration) -> Option<(f64, i64)> {
    let t = Instant::now();
    let opts = etcd_client::GetOptions::new().with_count_only();
    let resp = tokio::time::timeout(timeout, kv.get(PROBE_KEY, Some(opts)))
        .await
        .ok()?
        .ok()?;
    Some((t.elapsed().as_secs_f64() * 1000.0, resp.header()?.revision()))
}

fn median(v: &[f64]) -> f64 {
    percentile(v, 0.5)
}

fn percentile(v: &[f64], q: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s.get(((s.len() as f64 - 1.0) * q).round() as usize)
        .copied()
        .unwrap_or(0.0)
}

/// The probe: measures the baseline, then paces `pacer` until `done` fires.
pub struct Probe {
    kv: etcd_client::KvClient,
    budget: f64,
    timeout: Duration,
    baseline_ms: f64,
}

impl Probe {
    /// Measures the baseline on `client`'s connection; `None` (with a warning: the pull then
    /// goes at full speed) when the member does not answer the probe.
    pub async fn start(client: &etcd_client::Client, budget: f64, timeout: Duration) -> Option<Probe> {
        let mut kv = client.kv_client();
        let mut lat = Vec::new();
        // The baseline never holds the snapshot back for long: a member this slow to answer
        // is measured by the pull itself.
        let started = Instant::now();
        let each = timeout.min(Duration::from_millis(500));
        for _ in 0..BASELINE_PROBES {
            if let Some((ms, _)) = probe(&mut kv, each).await {
                lat.push(ms);
            }
            if started.elapsed() > BASELINE_MAX {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if lat.len() < BASELINE_PROBES / 2 {
            return None;
        }
        Some(Probe {
            kv,
            budget,
            timeout,
            baseline_ms: median(&lat),
        })
    }

    /// Paces `pacer` until `done` fires; returns what it saw (`None` when no probe answered
    /// during the pull: nothing to report).
    pub async fn run(mut self, pacer: Pacer, done: CancellationToken) -> Option<PaceReport> {
        let mut ctl = Controller::new(self.baseline_ms, self.budget);
        let mut during = Vec::new();
        let mut recent: Vec<f64> = Vec::new();
        // (when, revision) of the last second's probes: the write rate.
        let mut revisions: std::collections::VecDeque<(Instant, i64)> = Default::default();
        let (mut last_at, mut last_bytes) = (Instant::now(), pacer.bytes());
        loop {
            // The pull's end first, and a probe in flight never holds it up.
            let answered = tokio::select! {
                biased;
                () = done.cancelled() => break,
                a = async {
                    tokio::time::sleep(PROBE_EVERY).await;
                    probe(&mut self.kv, self.timeout).await
                } => a,
            };
            let Some((ms, rev)) = answered else {
                // A probe that fails says nothing of latency: full speed, the safe side for
                // the read transaction.
                pacer.set_rate(ctl.reset());
                continue;
            };
            during.push(ms);
            recent.push(ms);
            if recent.len() > 3 {
                recent.remove(0);
            }
            let now = Instant::now();
            revisions.push_back((now, rev));
            while revisions.len() > 2 && now - revisions[0].0 > Duration::from_secs(1) {
                revisions.pop_front();
            }
            let (t0, r0) = revisions[0];
            let span = (now - t0).as_secs_f64();
            let busy = span > 0.0 && (rev - r0) as f64 / span >= BUSY_WRITES_PER_S;
            let bytes = pacer.bytes();
            let speed = (bytes - last_bytes) as f64 / (now - last_at).as_secs_f64().max(1e-3);
            (last_at, last_bytes) = (now, bytes);
            // The worst of the last three: what the pull costs shows in etcd's tail first.
            let worst = recent.iter().copied().fold(0.0, f64::max);
            pacer.set_rate(ctl.step(worst, speed, busy));
        }
        (!during.is_empty()).then(|| PaceReport {
            budget: self.budget,
            baseline_ms: self.baseline_ms,
            during_p50_ms: median(&during),
            during_p99_ms: percentile(&during, 0.99),
            slowed_s: pacer.slowed().as_secs_f64(),
            probes: during.len(),
        })
    }
}

/// The probe of a pull, running on the daemon's runtime (`rt`: not the pull's own thread,
/// whose hashing and writing would delay the probe's answers): it connects on a connection
/// of its own, measures the baseline, then paces `pacer` until `done` fires. Returns, once
/// the baseline is known, the task that ends with the report; `None` (the pull then goes at
/// full speed, said in the log) when the member cannot be probed within [`START_MAX`].
pub async fn start_on(
    rt: &tokio::runtime::Handle,
    reach: crate::etcd::SnapshotReach,
    budget: f64,
    pacer: Pacer,
    done: CancellationToken,
) -> Option<tokio::task::JoinHandle<Option<PaceReport>>> {
    let (ready, started) = tokio::sync::oneshot::channel::<Result<(), String>>();
    let stop = done.clone();
    let task = rt.spawn(async move {
        let probe = match reach.connect().await {
            Ok(client) => Probe::start(&client, budget, reach.request_timeout).await,
            Err(e) => {
                let _ = ready.send(Err(crate::error::one_line(&e)));
                return None;
            }
        };
        let Some(probe) = probe else {
            let _ = ready.send(Err("etcd does not answer the latency probe".into()));
            return None;
        };
        let _ = ready.send(Ok(()));
        probe.run(pacer, stop).await
    });
    let why = match tokio::time::timeout(START_MAX, started).await {
        Ok(Ok(Ok(()))) => return Some(task),
        Ok(Ok(Err(why))) => why,
        Ok(Err(_)) => "the probe ended".into(),
        Err(_) => format!("no baseline within {} s", START_MAX.as_secs()),
    };
    done.cancel();
    task.abort();
    tracing::warn!(why = %why, "cannot probe etcd's latency; the snapshot is pulled at full speed");
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: f64 = 1048576.0;

    #[test]
    fn a_busy_member_over_budget_slows_the_pull_down_to_the_floor_and_no_further() {
        let mut c = Controller::new(2.0, 1.5);
        assert_eq!(c.limit_ms(), 3.0);
        // Unpaced at 300 MiB/s while within the budget; over it before full speed is known:
        // still unpaced.
        assert_eq!(c.step(2.5, 300.0 * MIB, true), None);
        for _ in 1..WARM_UP_STEPS {
            assert_eq!(c.step(9.0, 100.0 * MIB, true), None);
        }
        // Over it: slower, step by step, never under 1/MAX_SLOWDOWN of full speed.
        let first = c.step(5.0, 300.0 * MIB, true).unwrap();
        assert!(first < 300.0 * MIB);
        let mut rate = first;
        for _ in 0..50 {
            let r = c.step(9.0, rate, true).unwrap();
            assert!(r <= rate);
            rate = r;
        }
        assert!((rate - 300.0 * MIB / MAX_SLOWDOWN).abs() < 1.0, "{}", rate / MIB);
    }

    #[test]
    fn a_quiet_member_or_latency_back_in_budget_lets_the_pull_speed_up_again() {
        let mut c = Controller::new(2.0, 1.5);
        for _ in 0..WARM_UP_STEPS {
            c.step(2.0, 200.0 * MIB, true);
        }
        let slow = c.step(6.0, 200.0 * MIB, true).unwrap();
        // Within the budget with room: faster, then full speed.
        let faster = c.step(2.0, slow, true).unwrap();
        assert!(faster > slow);
        let mut rate = Some(faster);
        for _ in 0..100 {
            rate = c.step(2.0, rate.unwrap_or(200.0 * MIB), true);
        }
        assert_eq!(rate, None);
        // Nobody else writing: full speed whatever the latency.
        let mut c = Controller::new(0.3, 1.5);
        for _ in 0..WARM_UP_STEPS {
            c.step(0.3, 200.0 * MIB, false);
        }
        assert_eq!(c.step(40.0, 200.0 * MIB, false), None);
    }

    #[test]
    fn a_tiny_baseline_still_leaves_room_for_noise() {
        assert_eq!(Controller::new(0.1, 1.5).limit_ms(), 0.35);
    }

    #[test]
    fn percentiles_of_the_probes() {
        let v = [5.0, 1.0, 3.0, 2.0, 4.0];
        assert_eq!(median(&v), 3.0);
        assert_eq!(percentile(&v, 0.99), 5.0);
        assert_eq!(median(&[]), 0.0);
    }
}
