//! `--json`, the same way on every command that reports: one JSON object on stdout with
//! `"schema_version"` (this module's [`SCHEMA_VERSION`], raised when a field changes meaning
//! or goes away; new fields do not raise it) and `"ok"`, beside the command's fields.
//! A command that fails before it has its own document still prints one (`main`):
//! `{"schema_version": 1, "ok": false, "command": ..., "exit_code": ..., "error": ...}`, so a
//! script reading stdout always gets an answer, with the same one-line reason stderr has.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Result;
use serde_json::{Map, Value};

/// The version of every `--json` document.
pub const SCHEMA_VERSION: u32 = 1;

/// Whether this process printed its document already (then `main` prints no error document).
static PRINTED: AtomicBool = AtomicBool::new(false);

/// `v`'s fields after `schema_version` and `ok`.
pub fn document(v: Value, ok: bool) -> Value {
    let mut doc = Map::new();
    doc.insert("schema_version".into(), SCHEMA_VERSION.into());
    doc.insert("ok".into(), ok.into());
    match v {
        Value::Object(fields) => {
            for (k, v) in fields {
                if k != "schema_version" && k != "ok" {
                    doc.insert(k, v);
                }
            }
        }
        other => {
            doc.insert("result".into(), other);
        }
    }
    Value::Object(doc)
}

/// Prints the document for `v` on stdout.
pub fn print(v: Value, ok: bool) -> Result<()> {
    PRINTED.store(true, Ordering::SeqCst);
    // Written as it is serialized: a list of thousands of sets is not held twice.
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    serde_json::to_writer_pretty(&mut out, &document(v, ok)).map_err(std::io::Error::from)?;
    writeln!(out)?;
    out.flush()?;
    Ok(())
}

/// Prints a document typed by the command (which carries `schema_version` and `ok` itself),
/// serialized straight to stdout: a list of thousands of sets is never held as a JSON tree.
pub fn print_typed(doc: &impl serde::Serialize) -> Result<()> {
    PRINTED.store(true, Ordering::SeqCst);
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    serde_json::to_writer_pretty(&mut out, doc).map_err(std::io::Error::from)?;
    writeln!(out)?;
    out.flush()?;
    Ok(())
}

/// Did the command print its own document?
pub fn printed() -> bool {
    PRINTED.load(Ordering::SeqCst)
}

/// The document of a command that failed before it printed one.
pub fn error_document(command: &str, e: &anyhow::Error) -> Value {
    document(
        serde_json::json!({
            "command": command,
            "exit_code": crate::error::exit_code(e),
            "error": crate::error::one_line(e),
        }),
        false,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_document_opens_with_its_version_and_verdict() {
        let d = document(serde_json::json!({"id": "x", "ok": "ignored"}), true);
        assert_eq!(d["schema_version"], SCHEMA_VERSION);
        assert_eq!(d["ok"], true, "the document's own ok wins");
        assert_eq!(d["id"], "x");
        let d = document(serde_json::json!([1, 2]), true);
        assert_eq!(d["result"], serde_json::json!([1, 2]));
        let e = anyhow::anyhow!(crate::error::Stop::Usage("bad".into()));
        let d = error_document("fetch", &e);
        assert_eq!((d["ok"].as_bool(), d["exit_code"].as_u64()), (Some(false), Some(2)));
        assert_eq!(d["error"], "bad");
    }
}
