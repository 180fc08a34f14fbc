//! The continuous journal: every revision between full sets, stored beside them, so that a
//! cluster can be restored as it was at any second the journal covers (`fetch --at`).
//!
//! - [`segment`]: one stored piece (its records, format, seal, signature, name);
//! - [`chain`]: what the stored segments cover, and what a moment needs (pure);
//! - [`writer`]: the daemon's elected writer (watch, cut, store);
//! - [`replay`]: a chain applied to a set restored in a throwaway etcd.

pub mod chain;
pub mod replay;
pub mod segment;
pub mod writer;
