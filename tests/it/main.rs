//! Integration tests: one binary, a module per area, against real etcd processes and the real
//! `etcd-backupd` binary.
//!
//! Where a new test goes:
//! - a command as a user runs it (`backup`, `list`, `fetch`...) against one kind of target:
//!   that target's module (`webdav`, `s3`, `seal` for sealed and split sets, `restore`,
//!   `script` for the script method); the daemon under a fast schedule: `daemon`; what an
//!   on-call admin reads (`status`, the journal): `oncall`; metrics and alerts: `monitoring`;
//! - a fault (a kill, a full disk, a hostile server, a clock jump, a secret that must not
//!   show): `faults/`, one file per kind of fault;
//! - delivery and retention logic without servers: a unit test in `src/delivery` against
//!   `targets::memory`, not here.
//!
//! What to build it from: `common` (an `Etcd` on free ports, `etcdctl_at`: the one etcdctl
//! helper, `Config`: a test's configuration built as data, `Work`: a test's folders and its
//! usual configurations, `run`/`Proc`: the binary, `Pki`: certificates made in the test), `servers`
//! (Apache mod_dav, rclone, tinyproxy, moto, s3s-fs, the fault proxies) and `support` (a
//! daemon's configuration per node, etcd read with the real etcdctl, what a folder holds).
//! Wait for a condition (a file, a log line, a key), never a fixed time; a second backup
//! needs no sleep for a new set id (a run whose second is taken waits for the next one).

mod backup;
mod cli_config;
mod common;
mod daemon;
mod etcd35;
mod faults;
mod guards;
mod journal;
mod monitoring;
mod oncall;
mod pace;
mod pipeline;
mod props;
mod proxy_env;
mod records;
mod render;
mod restore;
mod rollout;
mod s3;
mod script;
mod seal;
mod servers;
mod support;
mod terminal;
mod trust;
mod webdav;
