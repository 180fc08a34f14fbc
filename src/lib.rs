//! etcd-backupd: scheduled, verified, off-cluster etcd backups for OpenShift and any
//! etcd-backed Kubernetes control plane.
//!
//! The map, in the order a run flows through it:
//! - [`cli`]: the command line and what each command does; `main.rs` only parses, sets up
//!   logging (journald or stderr) and maps errors to exit codes ([`error`]).
//! - [`config`]: the configuration in three stages (TOML fragments, merged inputs with
//!   defaults, validated [`config::Settings`]).
//! - [`daemon`]: the service loop: [`schedule`], signals, [`notify`] (sd_notify), the
//!   after-upgrade check; [`state`] keeps the node's record of its runs for `status`.
//! - [`runner`]: one run: [`guards`], then [`election`] through etcd, then the pipeline.
//! - [`pipeline`]: one backup, from etcd to every target, at the [`priority`] configured.
//! - [`etcd`]: a client bound to one configured member (no discovery).
//! - [`script`]: `method = "script"`, the platform's `cluster-backup.sh` run and checked.
//! - [`snapshot`]: the native snapshot stream, hashed and sealed while it flows, its
//!   trailer verified; [`growing`] lets uploads follow its file while it is written.
//! - [`static_resources`]: the `static_kuberesources_<ts>.tar.gz` archive.
//! - [`import`]: the platform's own local backup sets, shipped like ours.
//! - [`envelope`]: zstd compression and age encryption of stored files.
//! - [`manifest`]: `manifest.json` and `SHA256SUMS`, what a set says about itself.
//! - [`signing`]: `manifest.json.sig`, each node's SSH signature of it, and allowed_signers.
//! - [`certs`]: "restorable until" (the archive's certificates) and the static pod revisions.
//! - [`targets`]: where sets are stored, atomically; `file://`, HTTP/WebDAV and S3.
//! - [`delivery`]: staged sets owed to targets, delivered oldest first, bounded.
//! - [`retention`]: which sets to keep (restic `forget` semantics), and pruning a target.
//! - [`restore`]: `fetch`, `verify` and the restore drill.
//! - [`metrics`]: Prometheus text, as a textfile-collector file and on `GET /metrics`.
//! - [`staging`]: whether a staging directory is ours (new, empty or marked), and making it.
//! - [`fsutil`]: private files, fsync and no-replace renames.
//! - [`progress`]: bars on a terminal, progress lines and `STATUS=` for the daemon.
//!
//! The imports form a layering, checked with `python3 ../shared/tools/modcycles.py src` (no
//! cycles): [`error`], [`fsutil`] and [`manifest`] at the bottom; [`config`] above them as
//! plain validated data (with [`envelope`] for the recipients it checks); then the domain
//! modules ([`targets`], [`snapshot`], [`retention`], [`election`], [`staging`], ...), which
//! build their own objects from the settings; [`delivery`] and [`pipeline`] above those;
//! [`runner`], [`daemon`] and [`cli`] on top. A run flows one way: schedule → guards →
//! election → source (native snapshot, script, import) → seal → staging → deliver → retain →
//! record; the snapshot never waits on a target.

pub mod certs;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod delivery;
pub mod election;
pub mod envelope;
pub mod error;
pub mod etcd;
pub mod fsutil;
pub mod growing;
pub mod guards;
pub mod import;
pub mod manifest;
pub mod metrics;
pub mod notify;
pub mod outcome;
pub mod pipeline;
pub mod priority;
pub mod progress;
pub mod render;
pub mod restore;
pub mod retention;
pub mod runner;
pub mod schedule;
pub mod script;
pub mod signing;
pub mod snapshot;
pub mod staging;
pub mod state;
pub mod static_resources;
pub mod targets;
