//! systemd integration, in one place: `READY=1` once the configuration is valid and etcd
//! answered, `STATUS=` on every state change, `WATCHDOG=1` at half of `WATCHDOG_USEC`, and
//! `STOPPING=1` on shutdown. Without `NOTIFY_SOCKET` every call does nothing; a failure to
//! notify is logged, never fatal.

use std::time::Duration;

use sd_notify::NotifyState;

fn send(states: &[NotifyState]) {
    // An empty NOTIFY_SOCKET means "not under systemd", as sd_notify(3) treats it.
    if std::env::var_os("NOTIFY_SOCKET").is_some_and(|s| s.is_empty()) {
        return;
    }
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}

pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

pub fn status(text: &str) {
    tracing::debug!(status = text, "status");
    send(&[NotifyState::Status(text)]);
}

pub fn stopping() {
    send(&[NotifyState::Stopping]);
}

pub fn reloading() {
    if let Ok(now) = NotifyState::monotonic_usec_now() {
        send(&[NotifyState::Reloading, now]);
    }
}

/// How often to send `WATCHDOG=1`, when systemd asks for it: half its timeout.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled().filter(|d| !d.is_zero()).map(|d| d / 2)
}

pub fn watchdog() {
    send(&[NotifyState::Watchdog]);
}

/// Stable `MESSAGE_ID`s, so `journalctl MESSAGE_ID=...` finds every outcome of one kind.
pub const MESSAGE_ID_SUCCEEDED: &str = "4f2e7a6c1b9d4e0f8a3c5d7e9f1a2b3c";
pub const MESSAGE_ID_FAILED: &str = "9c1d3e5f7a9b4c2d8e0f1a3b5c7d9e1f";
pub const MESSAGE_ID_SKIPPED: &str = "2b4d6f8a0c1e4f3a9b5d7c1e3f5a7b9d";
pub const MESSAGE_ID_DRILL_OK: &str = "63446c00bcf941aaa413bb3bca484e30";
pub const MESSAGE_ID_DRILL_FAILED: &str = "e228669480914016ac2f833bb3f6f23b";
