//! Progress of the long phases of a command: the snapshot stream, each target's upload, each
//! file a fetch or verify reads, the restore drill. How it shows is chosen once per process:
//! - [`Mode::Terminal`] (`backup`, `fetch`, `verify` with stderr a terminal): one bar per
//!   phase on stderr, with percentage, bytes of the expected total, rate and ETA. Log lines
//!   are printed above the bars ([`LogWriter`]), never through them.
//! - [`Mode::Log`] (the daemon): for a phase running longer than a minute, one log line per
//!   10 % (at most one per 30 s), and `STATUS=` carrying the percentage.
//! - [`Mode::Off`] (the default: stderr a pipe or a file): nothing.
//!
//! Whether stderr is a terminal decides, not `TERM` or `CI`: logs and CI output stay clean.

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How progress is shown by this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Off,
    Terminal,
    Log,
}

/// A phase shorter than this is never reported in the log.
const LOG_AFTER: Duration = Duration::from_secs(60);
/// At most one progress line per phase this often.
const LOG_EVERY: Duration = Duration::from_secs(30);
/// `STATUS=` is refreshed at most this often.
const STATUS_EVERY: Duration = Duration::from_secs(1);

struct Shared {
    mode: Mode,
    bars: Option<MultiProgress>,
}

static SHARED: OnceLock<Shared> = OnceLock::new();

/// Chooses the mode for this process; the first call wins. Without a call, progress is off.
pub fn init(mode: Mode) {
    let bars = (mode == Mode::Terminal)
        .then(|| MultiProgress::with_draw_target(ProgressDrawTarget::term_like_with_hz(Box::new(Stderr), 10)));
    let _ = SHARED.set(Shared { mode, bars });
}

/// The mode of a command that draws bars: on when stderr is a terminal, else off.
pub fn bars_if_terminal() -> Mode {
    if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        Mode::Terminal
    } else {
        Mode::Off
    }
}

fn shared() -> Option<&'static Shared> {
    SHARED.get().filter(|s| s.mode != Mode::Off)
}

/// stderr as indicatif's terminal. Its own (console's) refuses to draw when `TERM` is unset or
/// `dumb`; here the terminal alone decides, and ANSI cursor moves work on every terminal
/// emulator in use.
#[derive(Debug)]
struct Stderr;

impl Stderr {
    fn put(&self, s: &str) -> std::io::Result<()> {
        std::io::stderr().lock().write_all(s.as_bytes())
    }
}

impl indicatif::TermLike for Stderr {
    fn width(&self) -> u16 {
        let mut size = libc::winsize {
            ws_row: 0,
            ws_col: 0,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCGWINSZ fills the winsize it is given; stderr is a terminal here.
        let ok = unsafe { libc::ioctl(libc::STDERR_FILENO, libc::TIOCGWINSZ, &mut size) } == 0;
        if ok && size.ws_col > 0 { size.ws_col } else { 80 }
    }

    fn move_cursor_up(&self, n: usize) -> std::io::Result<()> {
        if n == 0 {
            Ok(())
        } else {
            self.put(&format!("\x1b[{n}A"))
        }
    }

    fn move_cursor_down(&self, n: usize) -> std::io::Result<()> {
        if n == 0 {
            Ok(())
        } else {
            self.put(&format!("\x1b[{n}B"))
        }
    }

    fn move_cursor_right(&self, n: usize) -> std::io::Result<()> {
        if n == 0 {
            Ok(())
        } else {
            self.put(&format!("\x1b[{n}C"))
        }
    }

    fn move_cursor_left(&self, n: usize) -> std::io::Result<()> {
        if n == 0 {
            Ok(())
        } else {
            self.put(&format!("\x1b[{n}D"))
        }
    }

    fn write_line(&self, s: &str) -> std::io::Result<()> {
        self.put(&format!("{s}\n"))
    }

    fn write_str(&self, s: &str) -> std::io::Result<()> {
        self.put(s)
    }

    fn clear_line(&self) -> std::io::Result<()> {
        self.put("\r\x1b[2K")
    }

    fn flush(&self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// stderr for the log subscriber: with bars on screen, each line is printed above them.
pub struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match SHARED.get().and_then(|s| s.bars.as_ref()) {
            Some(bars) => bars.suspend(|| std::io::stderr().write_all(buf)).map(|()| buf.len()),
            None => std::io::stderr().write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

struct LogState {
    started: Instant,
    done: u64,
    /// The last decile logged (0 = none yet).
    logged_decile: u64,
    logged_at: Option<Instant>,
    status_at: Option<Instant>,
}

struct Inner {
    label: String,
    total: Option<u64>,
    bar: Option<ProgressBar>,
    log: Mutex<LogState>,
}

/// One phase's progress; cheap to clone (clones report to the same phase). Dropping the last
/// clone ends it.
/// The default phase shows nothing.
#[derive(Clone, Default)]
pub struct Phase(Option<Arc<Inner>>);

impl Phase {
    /// A phase named `label` (e.g. `snapshot`, `target 'offsite'`) of `total` bytes, when known.
    pub fn start(label: impl Into<String>, total: Option<u64>) -> Phase {
        let Some(shared) = shared() else {
            return Phase(None);
        };
        let label = label.into();
        let bar = shared.bars.as_ref().map(|bars| {
            let bar = match total {
                Some(t) => ProgressBar::new(t).with_style(
                    ProgressStyle::with_template(
                        "{prefix:<28!} [{bar:24}] {percent:>3}% {bytes:>10}/{total_bytes:<10} {binary_bytes_per_sec:>12} ETA {eta}",
                    )
                    .expect("a valid template")
                    .progress_chars("=> "),
                ),
                None => ProgressBar::new_spinner().with_style(
                    ProgressStyle::with_template("{prefix:<28!} {spinner} {elapsed} {msg}").expect("a valid template"),
                ),
            };
            let bar = bars.add(bar.with_prefix(label.clone()));
            if total.is_none() {
                bar.enable_steady_tick(Duration::from_millis(200));
            }
            bar
        });
        Phase(Some(Arc::new(Inner {
            label,
            total,
            bar,
            log: Mutex::new(LogState {
                started: Instant::now(),
                done: 0,
                logged_decile: 0,
                logged_at: None,
                status_at: None,
            }),
        })))
    }

    /// `n` more bytes done.
    pub fn add(&self, n: u64) {
        if let Some(inner) = &self.0 {
            match &inner.bar {
                Some(bar) => bar.inc(n),
                None => inner.advance(|done| *done += n),
            }
        }
    }

    /// `pos` bytes done in all (a retried upload starts again from 0).
    pub fn set(&self, pos: u64) {
        if let Some(inner) = &self.0 {
            match &inner.bar {
                Some(bar) => bar.set_position(pos),
                None => inner.advance(|done| *done = pos),
            }
        }
    }
}

impl Inner {
    /// Log mode: moves the count, then logs a line per 10 % once the phase has run for a
    /// minute (at most one per 30 s) and refreshes `STATUS=` (at most once a second).
    fn advance(&self, f: impl FnOnce(&mut u64)) {
        let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut log.done);
        let Some(total) = self.total.filter(|t| *t > 0) else {
            return;
        };
        let percent = (log.done.min(total) * 100 / total).min(100);
        let now = Instant::now();
        if log.status_at.is_none_or(|t| now - t >= STATUS_EVERY) {
            log.status_at = Some(now);
            crate::notify::status(&format!("{}: {percent}% of {}", self.label, bytesize::ByteSize(total)));
        }
        if let Some(decile) = log_line_due(&log, percent, now) {
            log.logged_decile = decile;
            log.logged_at = Some(now);
            let secs = (now - log.started).as_secs_f64().max(1e-3);
            tracing::info!(
                phase = %self.label,
                percent,
                bytes = log.done,
                total_bytes = total,
                mib_per_s = format!("{:.1}", log.done as f64 / secs / 1048576.0),
                "progress"
            );
        }
    }
}

/// Log mode: the decile to log now, if a line is due: the phase has run for a minute, it
/// reached a decile not logged yet, and the last line is at least 30 s old.
fn log_line_due(log: &LogState, percent: u64, now: Instant) -> Option<u64> {
    let decile = percent / 10;
    (now - log.started >= LOG_AFTER && decile > log.logged_decile && log.logged_at.is_none_or(|t| now - t >= LOG_EVERY))
        .then_some(decile)
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Drives the log-mode rule over a simulated phase: `percent_at(second)` is the progress.
    fn lines(seconds: u64, percent_at: impl Fn(u64) -> u64) -> Vec<(u64, u64)> {
        let t0 = Instant::now();
        let mut log = LogState {
            started: t0,
            done: 0,
            logged_decile: 0,
            logged_at: None,
            status_at: None,
        };
        let mut out = Vec::new();
        for s in 0..=seconds {
            let now = t0 + Duration::from_secs(s);
            if let Some(d) = log_line_due(&log, percent_at(s), now) {
                log.logged_decile = d;
                log.logged_at = Some(now);
                out.push((s, d * 10));
            }
        }
        out
    }

    #[test]
    fn a_run_shorter_than_a_minute_logs_nothing() {
        assert!(lines(59, |s| (s * 100 / 59).min(100)).is_empty());
    }

    #[test]
    fn a_long_run_logs_each_decile_once_and_at_most_every_30_s() {
        // 10 minutes, steady: one line per 10 % once past the first minute.
        let got = lines(600, |s| s * 100 / 600);
        let percents: Vec<u64> = got.iter().map(|(_, p)| *p).collect();
        assert_eq!(percents, vec![10, 20, 30, 40, 50, 60, 70, 80, 90, 100], "{got:?}");
        assert!(got.windows(2).all(|w| w[1].0 - w[0].0 >= 30), "{got:?}");
        assert_eq!(got[0].0, 60, "the first line waits for the minute");
    }

    #[test]
    fn fast_progress_after_the_first_minute_is_rate_limited() {
        // 2 minutes: 90 % in the first minute, the rest slowly. Lines: at 60 s (90 %), then
        // 100 % no sooner than 30 s later; deciles skipped in a burst are not logged late.
        let got = lines(120, |s| if s < 60 { s * 90 / 60 } else { 90 + (s - 60) / 6 });
        assert_eq!(got.first(), Some(&(60, 90)), "{got:?}");
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(got[1].0 >= 90 && got[1].1 == 100, "{got:?}");
    }
}
