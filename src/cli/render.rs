//! `render machineconfig`: a MachineConfig for `role: master` (or `arbiter`) that carries the shipped units
//! (byte for byte, embedded at build time), the configuration files as they are on this host
//! (main file and drop-ins), the image reference the install unit copies the binary from,
//! and, only when asked, the secret files.
//!
//! The binary itself does not ride in it: the rendered config lives in etcd, whose requests
//! are capped at 1.5 MiB. Output is YAML; the Ignition config inside is emitted with the same
//! small YAML writer (strings as block literals when that is exact, JSON-quoted otherwise).

use std::fmt::Write as _;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::config::Settings;
use crate::error::Stop;

pub const DAEMON_UNIT: &str = include_str!("../../systemd/etcd-backupd.service");
pub const INSTALL_UNIT: &str = include_str!("../../packaging/etcd-backupd-install.service");
/// Ignition spec versions a MachineConfig may carry; 3.2.0 is accepted by every OpenShift 4
/// release still supported (4.14–4.18 take up to 3.4.0, 4.19+ 3.5.0).
pub const IGNITION_VERSIONS: &[&str] = &["3.1.0", "3.2.0", "3.3.0", "3.4.0", "3.5.0"];
pub const DEFAULT_IGNITION: &str = "3.2.0";
/// Far below etcd's request limit, so the whole rendered config stays small.
pub const SIZE_LIMIT: usize = 100 * 1024;
const CONFIG_DIR: &str = "/etc/etcd-backupd";

/// The MachineConfigPool a MachineConfig targets. Control-plane nodes are `master`; on 4.19+
/// "two nodes with an arbiter" clusters the arbiter node runs an etcd member too, in its own
/// `arbiter` pool. It runs no kube-apiserver static pods, so the static resources archive a
/// restore needs cannot be built there: the master pool alone is recommended, and
/// `--role arbiter` says so (docs/install.md "The arbiter pool").
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    Master,
    Arbiter,
}

impl Role {
    /// The pool label's value.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Master => "master",
            Role::Arbiter => "arbiter",
        }
    }

    /// The MachineConfig's name unless `--name` says otherwise.
    pub fn default_name(self) -> String {
        format!("99-{}-etcd-backupd", self.as_str())
    }
}

pub struct Options<'a> {
    pub ignition_version: &'a str,
    pub image: Option<&'a str>,
    pub include_secrets: bool,
    pub name: &'a str,
    pub role: Role,
}

fn data_url(bytes: &[u8]) -> String {
    use base64::Engine;
    format!(
        "data:;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

fn file(path: &str, mode: u32, bytes: &[u8]) -> Value {
    json!({"path": path, "mode": mode, "overwrite": true, "contents": {"source": data_url(bytes)}})
}

/// The Ignition config and, for the operator, warnings to print.
pub fn ignition(settings: &Settings, opts: &Options) -> Result<(Value, Vec<String>)> {
    if !IGNITION_VERSIONS.contains(&opts.ignition_version) {
        bail!(Stop::Usage(format!(
            "--ignition-version {}: choose one of {}",
            opts.ignition_version,
            IGNITION_VERSIONS.join(", ")
        )));
    }
    let mut warnings = Vec::new();
    if opts.role == Role::Arbiter {
        warnings.push(
            "--role arbiter: the arbiter node runs no kube-apiserver, kube-controller-manager or kube-scheduler static pods, so a run it wins cannot build the static resources archive and fails; roll out to the master pool alone unless snapshot.static_resources_dir = \"\" is meant (docs/install.md, \"The arbiter pool\")".into(),
        );
    }
    let mut files = Vec::new();
    if settings.files.is_empty() {
        bail!("no configuration file was read");
    }
    for (i, path) in settings.files.iter().enumerate() {
        let bytes = std::fs::read(path).with_context(|| format!("cannot read '{}'", path.display()))?;
        let dest = if i == 0 {
            format!("{CONFIG_DIR}/config.toml")
        } else {
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            format!("{CONFIG_DIR}/config.d/{name}")
        };
        files.push(file(&dest, 0o600, &bytes));
    }
    match opts.image {
        Some(image) => {
            if image.trim().is_empty() || image.contains(char::is_whitespace) {
                bail!(Stop::Usage(format!("--image {image:?}: not an image reference")));
            }
            files.push(file(&format!("{CONFIG_DIR}/image"), 0o644, format!("{image}\n").as_bytes()));
        }
        None => warnings.push(
            "no --image: etcd-backupd-install.service has nothing to copy the binary from; put /usr/local/bin/etcd-backupd on the nodes another way".into(),
        ),
    }
    let secrets: Vec<_> = settings.secret_files.iter().collect();
    if opts.include_secrets {
        for (key, path) in &secrets {
            let bytes = std::fs::read(path).with_context(|| format!("{key}: cannot read '{}'", path.display()))?;
            let dest = path.to_str().context("a secret file path is not UTF-8")?;
            files.push(file(dest, 0o600, &bytes));
        }
        if !secrets.is_empty() {
            warnings.push(
                "secret files are included: a MachineConfig is readable by every cluster admin (and stored in etcd, so in every backup)".into(),
            );
        }
    } else if !secrets.is_empty() {
        let paths: Vec<String> = secrets.iter().map(|(_, p)| p.display().to_string()).collect();
        warnings.push(format!(
            "not included (use --include-secrets, or place them on the nodes yourself): {}",
            paths.join(", ")
        ));
    }
    // Files the configuration names on the node that are not secrets: not embedded, so say so.
    let mut node_files: Vec<String> = Vec::new();
    for t in &settings.targets {
        if let Some(r) = t.remote() {
            node_files.extend(
                [&r.ca_file, &r.client_cert_file]
                    .into_iter()
                    .flatten()
                    .map(|p| p.display().to_string()),
            );
        }
    }
    node_files.extend(
        [
            &settings.encryption.age_recipients_file,
            &settings.encryption.resources_recipients_file,
            &settings.verify.identity_file,
            &settings.verify.allowed_signers,
        ]
        .into_iter()
        .flatten()
        .map(|p| p.display().to_string()),
    );
    // Never embedded, --include-secrets or not: a MachineConfig is stored in etcd, so a key
    // rendered into one would ride inside every snapshot it signs.
    if let Some(sg) = &settings.signing {
        warnings.push(format!(
            "signing.key_file '{}' is never included: each node creates its own key on its first start; collect their allowed_signers lines with `etcd-backupd status` on each node",
            sg.key_file.display()
        ));
    }
    if !node_files.is_empty() {
        warnings.push(format!(
            "the configuration names these node-side files, which are not in the MachineConfig: {}",
            node_files.join(", ")
        ));
    }
    let config = json!({
        "ignition": {"version": opts.ignition_version},
        "storage": {"files": files},
        "systemd": {"units": [
            {"name": "etcd-backupd-install.service", "enabled": true, "contents": INSTALL_UNIT},
            {"name": "etcd-backupd.service", "enabled": true, "contents": DAEMON_UNIT},
        ]},
    });
    Ok((config, warnings))
}

/// The MachineConfig as YAML.
pub fn machineconfig(settings: &Settings, opts: &Options) -> Result<(String, Vec<String>)> {
    if !opts
        .name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        || opts.name.is_empty()
    {
        bail!(Stop::Usage(format!(
            "--name {:?}: not a Kubernetes object name",
            opts.name
        )));
    }
    let (config, warnings) = ignition(settings, opts)?;
    let mc = json!({
        "apiVersion": "machineconfiguration.openshift.io/v1",
        "kind": "MachineConfig",
        "metadata": {
            "name": opts.name,
            "labels": {"machineconfiguration.openshift.io/role": opts.role.as_str()},
        },
        "spec": {"config": config},
    });
    let mut out = String::from("# Rendered by etcd-backupd render machineconfig; apply with `oc apply -f`.\n");
    write_yaml(&mut out, &mc, 0);
    if out.len() > SIZE_LIMIT {
        bail!(
            "the MachineConfig would be {} bytes, above the {SIZE_LIMIT}-byte limit: are large files in the config directory?",
            out.len()
        );
    }
    Ok((out, warnings))
}

/// A string as a YAML scalar: a block literal when that reproduces it exactly, else a
/// JSON-quoted string (valid YAML).
fn scalar(out: &mut String, s: &str, indent: usize) {
    let block_safe = s.ends_with('\n')
        && !s.ends_with("\n\n")
        && s.contains('\n')
        && !s.starts_with([' ', '\n'])
        && s.lines()
            .all(|l| !l.ends_with([' ', '\t']) && !l.contains('\t') && !l.contains('\r'));
    if block_safe {
        out.push_str("|\n");
        let pad = " ".repeat(indent);
        for line in s.lines() {
            if line.is_empty() {
                out.push('\n');
            } else {
                let _ = writeln!(out, "{pad}{line}");
            }
        }
    } else {
        let _ = writeln!(out, "{}", serde_json::to_string(s).expect("a string serializes"));
    }
}

fn write_yaml(out: &mut String, v: &Value, indent: usize) {
    let pad = " ".repeat(indent);
    match v {
        Value::Object(map) => {
            for (k, val) in map {
                let key = serde_json::to_string(k).expect("a key serializes");
                let key = if k.chars().all(|c| c.is_ascii_alphanumeric() || "._/-".contains(c)) {
                    k.clone()
                } else {
                    key
                };
                match val {
                    Value::Object(m) if !m.is_empty() => {
                        let _ = writeln!(out, "{pad}{key}:");
                        write_yaml(out, val, indent + 2);
                    }
                    Value::Array(a) if !a.is_empty() => {
                        let _ = writeln!(out, "{pad}{key}:");
                        write_yaml(out, val, indent + 2);
                    }
                    _ => {
                        let _ = write!(out, "{pad}{key}: ");
                        leaf(out, val, indent + 2);
                    }
                }
            }
        }
        Value::Array(items) => {
            for item in items {
                let _ = write!(out, "{pad}- ");
                match item {
                    Value::Object(m) if !m.is_empty() => {
                        // The first key goes on the dash's line.
                        let mut inner = String::new();
                        write_yaml(&mut inner, item, indent + 2);
                        out.push_str(inner.trim_start_matches(' '));
                    }
                    _ => leaf(out, item, indent + 2),
                }
            }
        }
        other => leaf(out, other, indent),
    }
}

fn leaf(out: &mut String, v: &Value, indent: usize) {
    match v {
        Value::String(s) => scalar(out, s, indent),
        Value::Object(_) => out.push_str("{}\n"),
        Value::Array(_) => out.push_str("[]\n"),
        other => {
            let _ = writeln!(out, "{other}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_scalars_are_exact() {
        let mut out = String::new();
        scalar(&mut out, "[Unit]\nDescription=x\n\n[Service]\n", 4);
        assert_eq!(out, "|\n    [Unit]\n    Description=x\n\n    [Service]\n");
        let mut out = String::new();
        scalar(&mut out, "no newline", 2);
        assert_eq!(out, "\"no newline\"\n");
        let mut out = String::new();
        scalar(&mut out, "trailing space \n", 2);
        assert_eq!(out, "\"trailing space \\n\"\n");
    }

    #[test]
    fn shipped_units_render_as_block_literals() {
        for unit in [DAEMON_UNIT, INSTALL_UNIT] {
            let mut out = String::new();
            scalar(&mut out, unit, 2);
            assert!(
                out.starts_with("|\n"),
                "a unit file would be JSON-quoted: fix its whitespace"
            );
        }
    }
}
