//! What makes a set worth restoring beyond its checksums: each node's SSH signature of its
//! manifest ([`signing`]) and the dates its certificates allow a restore until ([`certs`]).

pub mod certs;
pub mod signing;
