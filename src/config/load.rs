//! Stage 1: reading the main file and its `config.d/*.toml` drop-ins into TOML tables, and
//! merging them, later files winning key by key. Every merged key remembers the file (and the
//! key as written in that file) it came from, so that any later error can name both.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use toml::{Table, Value};

/// Where a merged key came from: the file and the key's path as written in that file.
#[derive(Debug, Clone)]
pub struct Origin {
    pub file: PathBuf,
    pub key: String,
}

/// The merged TOML table of all files, plus the origin of every key in it.
#[derive(Debug, Default)]
pub struct Merged {
    pub table: Table,
    /// merged key path (`target[1].url`) -> where it was set
    pub origins: BTreeMap<String, Origin>,
    pub files: Vec<PathBuf>,
}

impl Merged {
    /// The origin of `path` or of its nearest parent that has one, with that parent's path.
    pub fn origin_of(&self, path: &str) -> Option<(&str, &Origin)> {
        let mut p = path;
        loop {
            if let Some((k, o)) = self.origins.get_key_value(p) {
                return Some((k.as_str(), o));
            }
            p = &p[..p.rfind(['.', '['])?];
        }
    }

    /// `file: key` for a merged key path: where to look to change it.
    pub fn locate(&self, path: &str) -> String {
        match self.origin_of(path) {
            // The nearest origin may be a parent (a whole table): keep the rest of the path
            // so the message still names the exact key.
            Some((prefix, o)) => format!("{}: {}{}", o.file.display(), o.key, &path[prefix.len()..]),
            None => path.to_string(),
        }
    }

    /// `file: key: message`, the one-line form of every configuration error.
    pub fn error_at(&self, path: &str, msg: impl std::fmt::Display) -> String {
        match self.origin_of(path) {
            Some(_) => format!("{}: {msg}", self.locate(path)),
            None if path.is_empty() => msg.to_string(),
            None => format!("{path}: {msg} (default value)"),
        }
    }
}

/// The drop-in directory of a main configuration file: `config.d/` beside it.
pub fn dropin_dir(main: &Path) -> PathBuf {
    main.parent().unwrap_or(Path::new(".")).join("config.d")
}

/// Reads `main` and the `*.toml` files of `config.d/` beside it, in lexical order.
pub fn read_all(main: &Path) -> Result<Merged, String> {
    let mut files = vec![main.to_path_buf()];
    let dir = dropin_dir(main);
    match std::fs::read_dir(&dir) {
        Ok(entries) => {
            let mut dropins = Vec::new();
            for entry in entries {
                let entry = entry.map_err(|e| format!("{}: cannot read directory: {e}", dir.display()))?;
                let path = entry.path();
                if path.extension().is_some_and(|x| x == "toml") && path.is_file() {
                    dropins.push(path);
                }
            }
            dropins.sort();
            files.extend(dropins);
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("{}: cannot read directory: {e}", dir.display())),
    }
    let mut merged = Merged::default();
    for file in files {
        let text = std::fs::read_to_string(&file).map_err(|e| format!("{}: cannot read: {e}", file.display()))?;
        let table = parse_toml(&file, &text)?;
        merge_into(&mut merged, &file, table)?;
        merged.files.push(file);
    }
    Ok(merged)
}

fn parse_toml(file: &Path, text: &str) -> Result<Table, String> {
    text.parse::<Table>().map_err(|e| {
        let msg = e.message().replace('\n', " ");
        match e.span() {
            Some(span) => {
                let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
                format!("{}: line {line}: {}", file.display(), msg.trim())
            }
            None => format!("{}: {}", file.display(), msg.trim()),
        }
    })
}

/// Merges one file's table into `merged`. Tables merge key by key; `[[target]]` entries merge
/// by `name` (a drop-in can change one key of a named target, or add a target); any other
/// value, arrays included, replaces the earlier one.
pub fn merge_into(merged: &mut Merged, file: &Path, table: Table) -> Result<(), String> {
    for (key, value) in table {
        if key == "target" {
            merge_targets(merged, file, value)?;
        } else {
            let mut dst = std::mem::take(&mut merged.table);
            merge_value(&mut dst, &mut merged.origins, file, &key, &key, &key, value);
            merged.table = dst;
        }
    }
    Ok(())
}

fn merge_value(
    dst: &mut Table,
    origins: &mut BTreeMap<String, Origin>,
    file: &Path,
    key: &str,
    merged_path: &str,
    file_path: &str,
    value: Value,
) {
    match (dst.get_mut(key), value) {
        (Some(Value::Table(existing)), Value::Table(incoming)) => {
            for (k, v) in incoming {
                merge_value(
                    existing,
                    origins,
                    file,
                    &k,
                    &format!("{merged_path}.{k}"),
                    &format!("{file_path}.{k}"),
                    v,
                );
            }
        }
        (_, value) => {
            // Replacing a value drops what was recorded below it.
            let prefix_dot = format!("{merged_path}.");
            let prefix_idx = format!("{merged_path}[");
            origins.retain(|k, _| !(k.starts_with(&prefix_dot) || k.starts_with(&prefix_idx)));
            record_origins(origins, file, merged_path, file_path, &value);
            dst.insert(key.to_string(), value);
        }
    }
}

fn record_origins(origins: &mut BTreeMap<String, Origin>, file: &Path, merged: &str, in_file: &str, value: &Value) {
    origins.insert(
        merged.to_string(),
        Origin {
            file: file.to_path_buf(),
            key: in_file.to_string(),
        },
    );
    match value {
        Value::Table(t) => {
            for (k, v) in t {
                record_origins(origins, file, &format!("{merged}.{k}"), &format!("{in_file}.{k}"), v);
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                record_origins(origins, file, &format!("{merged}[{i}]"), &format!("{in_file}[{i}]"), v);
            }
        }
        _ => {}
    }
}

fn merge_targets(merged: &mut Merged, file: &Path, value: Value) -> Result<(), String> {
    let Value::Array(items) = value else {
        return Err(format!(
            "{}: target: must be an array of tables, written [[target]]",
            file.display()
        ));
    };
    let mut list = match merged.table.remove("target") {
        Some(Value::Array(list)) => list,
        _ => Vec::new(),
    };
    let mut names_here: Vec<(String, usize)> = Vec::new();
    for (i, item) in items.into_iter().enumerate() {
        let Value::Table(incoming) = item else {
            return Err(format!(
                "{}: target[{i}]: must be a table, written [[target]]",
                file.display()
            ));
        };
        let name = incoming.get("name").and_then(Value::as_str).map(str::to_string);
        if let Some(n) = &name {
            // Within one file the same name twice is a copy-paste slip, not an override.
            if let Some((_, j)) = names_here.iter().find(|(m, _)| m == n) {
                return Err(format!(
                    "{}: target[{i}].name: {n:?} is already used by target[{j}] in this file",
                    file.display()
                ));
            }
            names_here.push((n.clone(), i));
        }
        let existing = name.as_deref().and_then(|n| {
            list.iter()
                .position(|t| t.get("name").and_then(Value::as_str) == Some(n))
        });
        let file_path = format!("target[{i}]");
        match existing {
            Some(pos) => {
                let merged_path = format!("target[{pos}]");
                let Some(Value::Table(dst)) = list.get_mut(pos) else {
                    unreachable!("targets are tables")
                };
                for (k, v) in incoming {
                    merge_value(
                        dst,
                        &mut merged.origins,
                        file,
                        &k,
                        &format!("{merged_path}.{k}"),
                        &format!("{file_path}.{k}"),
                        v,
                    );
                }
            }
            None => {
                let merged_path = format!("target[{}]", list.len());
                let value = Value::Table(incoming);
                record_origins(&mut merged.origins, file, &merged_path, &file_path, &value);
                list.push(value);
            }
        }
    }
    merged.table.insert("target".into(), Value::Array(list));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn merged(files: &[(&str, &str)]) -> Merged {
        let mut m = Merged::default();
        for (name, text) in files {
            let t = parse_toml(Path::new(name), text).unwrap();
            merge_into(&mut m, Path::new(name), t).unwrap();
        }
        m
    }

    #[test]
    fn later_files_win_key_by_key() {
        let m = merged(&[
            ("main.toml", "[etcd]\nendpoints = [\"http://a:1\"]\nca_file = \"/ca\"\n"),
            ("config.d/10.toml", "[etcd]\nendpoints = [\"http://b:2\"]\n"),
        ]);
        let etcd = m.table["etcd"].as_table().unwrap();
        assert_eq!(etcd["endpoints"].as_array().unwrap()[0].as_str(), Some("http://b:2"));
        assert_eq!(etcd["ca_file"].as_str(), Some("/ca"));
        assert_eq!(
            m.origin_of("etcd.endpoints[0]").unwrap().1.file,
            Path::new("config.d/10.toml")
        );
        assert_eq!(m.origin_of("etcd.ca_file").unwrap().1.file, Path::new("main.toml"));
    }

    #[test]
    fn targets_merge_by_name_and_append() {
        let m = merged(&[
            ("main.toml", "[[target]]\nname = \"a\"\nurl = \"file:///a\"\n"),
            (
                "config.d/10.toml",
                "[[target]]\nname = \"b\"\nurl = \"relative\"\n[[target]]\nname = \"a\"\nurl = \"file:///a2\"\n",
            ),
        ]);
        let list = m.table["target"].as_array().unwrap();
        assert_eq!(list.len(), 2);
        assert_eq!(list[0]["url"].as_str(), Some("file:///a2"));
        assert_eq!(
            m.error_at("target[1].url", "relative URL without a base"),
            "config.d/10.toml: target[0].url: relative URL without a base"
        );
        assert_eq!(m.error_at("target[0].url", "x"), "config.d/10.toml: target[1].url: x");
    }

    #[test]
    fn syntax_errors_name_file_and_line() {
        let e = parse_toml(Path::new("c.toml"), "a = 1\nb = = 2\n").unwrap_err();
        assert!(e.starts_with("c.toml: line 2: "), "{e}");
        assert!(!e.contains('\n'));
    }
}
