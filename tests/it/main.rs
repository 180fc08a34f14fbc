//! Integration tests: one binary, a module per area, against real etcd processes and the real
//! `etcd-backupd` binary.

mod backup;
mod cli_config;
mod common;
mod daemon;
mod etcd35;
mod faults;
mod guards;
mod monitoring;
mod oncall;
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
