//! etcd-backupd: scheduled, verified, off-cluster etcd backups for OpenShift and any
//! etcd-backed Kubernetes control plane.
//!
//! The map, in the order a backup flows through it:
//! - [`cli`]: the command line and what each command does; `main.rs` only parses, sets up
//!   logging and maps errors to exit codes ([`error`]).
//! - [`config`]: the configuration in three stages (TOML fragments, merged inputs with
//!   defaults, validated [`config::Settings`]).
//! - [`pipeline`]: one backup run, from etcd to every target.
//! - [`etcd`]: a client bound to one configured member (no discovery).
//! - [`snapshot`]: the native snapshot stream, hashed while it flows, its trailer verified.
//! - [`static_resources`]: the `static_kuberesources_<ts>.tar.gz` archive.
//! - [`manifest`]: `manifest.json` and `SHA256SUMS`, what a set says about itself.
//! - [`targets`]: where sets are stored, atomically; one implementation per URL scheme.
//! - [`fsutil`]: private files, fsync and no-replace renames.

pub mod cli;
pub mod config;
pub mod daemon;
pub mod election;
pub mod error;
pub mod etcd;
pub mod fsutil;
pub mod guards;
pub mod manifest;
pub mod notify;
pub mod pipeline;
pub mod priority;
pub mod runner;
pub mod schedule;
pub mod snapshot;
pub mod state;
pub mod static_resources;
pub mod targets;
