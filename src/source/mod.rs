//! Where a set's files come from: the native snapshot stream ([`snapshot`]), the platform's
//! `cluster-backup.sh` ([`script`]), and the static resources archive
//! ([`static_resources`]). Platform sets already on the node are imported by
//! [`crate::run::import`].

pub mod script;
pub mod snapshot;
pub mod static_resources;
