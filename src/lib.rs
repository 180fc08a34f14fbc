//! etcd-backupd: scheduled, verified, off-cluster etcd backups for OpenShift and any
//! etcd-backed Kubernetes control plane.
//!
//! A run flows one way, and the folders follow it:
//!
//! schedule → guards → election → source → seal → staging commit → deliver → retain → record
//!
//! - [`daemon`]: the service loop as a small state machine (`Daemon`, one method per kind of
//!   wake-up: reload, import, drill, deliver, run, a set the journal's writer asks for), its next wake-up a pure function of its
//!   timers (`Due::next`), [`notify`] (sd_notify), the after-upgrade check.
//! - [`run`]: one run as a value (`run::Request` says what was asked: its [`run::RunKind`],
//!   which names it, election or not, force), walked through [`run::guards`], the election,
//!   then [`run::pipeline`] (preflight, id, source, seal, staging commit, deliver, retain)
//!   while the lock is held, then the typed record ([`outcome::Recorded`]);
//!   [`run::import`] ships the platform's own local sets the same way, and [`run::rebase`]
//!   (a drill host) stores a set derived from a set and its journal the same way.
//! - [`etcd`]: a client bound to one configured member (no discovery), and
//!   [`etcd::election`]: the run lock, run records and "one set per run" in etcd itself.
//! - [`source`]: where a set's files come from: the native snapshot stream (paced by etcd's
//!   latency, [`source::pace`]), the platform's `cluster-backup.sh`, the static resources
//!   archive.
//! - [`envelope`] (zstd, age) and [`trust`] (each node's signature of `manifest.json`; the
//!   certificates' "restorable until"): the seal.
//! - [`staging`]: the one owner of the staging directory: ours or not, its layout, its lock
//!   (`staging::Locked`: begin a set in `tmp/`, commit it to `sets/` with one fsync
//!   sequence for every source), [`staging::sets`] (scanning, what each set is owed,
//!   bounding staging) and [`staging::state`], the node's record of its runs.
//! - [`delivery`]: only delivering: staged sets to the targets owed them, oldest first, each
//!   checked against its run's record; [`delivery::retention`]: which sets to keep, and
//!   pruning a target. Unit-tested against a target in memory (`targets::memory`).
//! - [`targets`]: where sets are stored. The set protocol (drafts, debris, sizes checked,
//!   manifest last, the one atomic step) is written once in [`targets::sets`] over
//!   [`targets::objects::ObjectStore`] (files in folders); `file://`, HTTP/WebDAV and S3
//!   implement only that ([`targets::s3`]: XML, signing and multipart in their own files).
//! - [`journal`]: beside the run, the continuous journal: an elected writer in the daemon
//!   stores every revision between full sets as self-checking segments on the targets
//!   ([`journal::segment`]); [`journal::chain`] says what they cover and what a moment needs
//!   (pure); [`journal::replay`] applies them to a restored store.
//! - [`restore`]: a folder per step: locate, verify, fetch, versions, drill, and `at` (a
//!   set rolled forward along the journal to a moment).
//! - [`cli`]: a file per command; `main.rs` only parses, sets up [`logging`] (journald or
//!   stderr, one rendering) and maps errors to exit codes ([`error`]).
//! - [`metrics`]: Prometheus text, as a textfile-collector file and on `GET /metrics`.
//! - At the bottom: [`config`] (validated data, from which each domain module builds its
//!   own objects; it reads the age recipients it checks through [`envelope`]), [`manifest`]
//!   (what a set says about itself), [`outcome`] (typed run results and skips, each with its
//!   metric label), [`error`], [`fsutil`], [`growing`] (a file that readers follow while it
//!   is written), [`clock`] (times as people read them), [`logging`], [`notify`], [`priority`], [`progress`], [`schedule`].
//!
//! The imports form a layering, checked with `python3 ../shared/tools/modcycles.py src` (no
//! cycles; a folder counts as one module), from the bottom up: the modules above; then
//! [`targets`], [`source`], [`trust`], [`etcd`]; then [`staging`]; [`metrics`]; [`journal`]
//! (over staging and metrics); [`delivery`] (over staging and the journal, whose segments
//! retention prunes); [`restore`] (over delivery and the journal); [`run`]; [`daemon`] and
//! [`cli`] on top. The snapshot never waits on a target's retries: targets are probed side by side for
//! at most their `connect_timeout` (10 s at most), the early uploads are begun within
//! 10 s, and a target not ready by then gets the staged set afterwards.

pub mod cli;
pub mod clock;
pub mod config;
pub mod daemon;
pub mod delivery;
pub mod envelope;
pub mod error;
pub mod etcd;
pub mod fsutil;
pub mod growing;
pub mod health;
pub mod heartbeat;
pub mod journal;
pub mod logging;
pub mod manifest;
pub mod metrics;
pub mod notify;
pub mod outcome;
pub mod priority;
pub mod probe;
pub mod progress;
pub mod restore;
pub mod run;
pub mod schedule;
pub mod source;
pub mod staging;
pub mod targets;
pub mod trust;
