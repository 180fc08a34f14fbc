//! Where a set's files come from: the native snapshot stream ([`snapshot`]), the platform's
//! `cluster-backup.sh` ([`script`]), and the static resources archive
//! ([`static_resources`]); a platform set's file names are read by [`platform_set`]. Platform sets already on the node are imported by
//! [`crate::run::import`].

pub mod pace;
pub mod platform_set;
pub mod script;
pub mod snapshot;
pub mod static_resources;
