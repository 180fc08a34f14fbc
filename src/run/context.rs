//! What one run works with, resolved once at its start: every file of its set is sealed to
//! the same recipients, signed by the same key and stored under one cluster folder. Read
//! per file, a recipients file rewritten mid-run could seal two files of one set to
//! different keys.

use anyhow::Result;

use crate::config::Settings;
use crate::envelope::Seal;
use crate::trust::signing::{self, Signer};

pub struct RunContext {
    /// Compression and the age recipients, as the configuration said at the run's start: the
    /// snapshot's.
    pub seal: Seal,
    /// The static resources archive's (`encryption.resources_recipients`, by default the
    /// snapshot's): it holds etcd's encryption keys when etcd encryption is on.
    pub resources_seal: Seal,
    /// This node's signing key (`[signing]`), created on first use; `None`: unsigned sets.
    pub signer: Option<Signer>,
    /// The folder the set goes to on every target ([`Settings::cluster_folder`]).
    pub cluster: String,
}

impl RunContext {
    /// Reads the recipients and the signing key (a broken one fails the run before any
    /// snapshot is taken) for the cluster whose etcd cluster ID is `cluster_id`.
    pub fn resolve(settings: &Settings, cluster_id: u64) -> Result<RunContext> {
        RunContext::for_cluster(settings, settings.cluster_folder(cluster_id))
    }

    /// The same for a known cluster folder (an import pass, which may run without etcd).
    pub fn for_cluster(settings: &Settings, cluster: String) -> Result<RunContext> {
        let seal = settings.seal()?;
        Ok(RunContext {
            resources_seal: settings.resources_seal()?.unwrap_or_else(|| seal.clone()),
            seal,
            signer: signing::signer(settings)?,
            cluster,
        })
    }
}
