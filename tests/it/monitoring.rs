//! What examples/openshift/ ships for Prometheus on OpenShift, checked against the binary: the
//! manifests parsed by a YAML parser that is not ours (Python's), the port of the Service, the
//! Endpoints and the ServiceMonitor agreeing with config.toml's `metrics.listen`, every metric
//! the alert expressions name being one that the binary writes, and the rules checked and
//! unit-tested by Prometheus' own `promtool`.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

use crate::common::{Etcd, Work, run};

fn repo(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

/// Every document of a YAML stream, as JSON, parsed by PyYAML.
pub(crate) fn parse_yaml_docs(text: &str) -> Vec<Value> {
    let mut child = Command::new("python3")
        .args([
            "-c",
            "import sys, yaml, json; json.dump([d for d in yaml.safe_load_all(sys.stdin) if d is not None], sys.stdout)",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 with PyYAML (Debian python3-yaml)");
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "not YAML:\n{text}");
    serde_json::from_slice::<Vec<Value>>(&out.stdout).unwrap()
}

/// Every object of examples/openshift/*.yaml, with the file it came from.
fn shipped_objects() -> Vec<(String, Value)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo("examples/openshift"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    let mut objects = Vec::new();
    for f in files {
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        for doc in parse_yaml_docs(&std::fs::read_to_string(&f).unwrap()) {
            objects.push((name.clone(), doc));
        }
    }
    objects
}

fn one<'a>(objects: &'a [(String, Value)], kind: &str) -> &'a Value {
    let found: Vec<&Value> = objects
        .iter()
        .filter(|(_, o)| o["kind"] == kind)
        .map(|(_, o)| o)
        .collect();
    assert_eq!(found.len(), 1, "one {kind} in examples/openshift/*.yaml: {found:?}");
    found[0]
}

/// The metric names a PromQL expression selects: identifiers that are not functions,
/// aggregations, keywords, label names (in `{...}` or after `by`/`on`/...), strings or
/// durations.
fn metric_names(expr: &str) -> BTreeSet<String> {
    const KEYWORDS: &str = "and or unless bool offset by without on ignoring group_left group_right \
        sum min max avg group stddev stdvar count count_values bottomk topk quantile limitk limit_ratio inf nan";
    const LABEL_LISTS: &[&str] = &["by", "without", "on", "ignoring", "group_left", "group_right"];
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    let skip_to = |i: &mut usize, close: char| {
        while *i < chars.len() && chars[*i] != close {
            *i += 1;
        }
        *i += 1;
    };
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' || c == '`' {
            i += 1;
            skip_to(&mut i, c);
        } else if c == '{' {
            skip_to(&mut i, '}');
        } else if c == '[' {
            skip_to(&mut i, ']');
        } else if c.is_ascii_digit() {
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':') {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let mut j = i;
            while j < chars.len() && chars[j].is_whitespace() {
                j += 1;
            }
            let call = j < chars.len() && chars[j] == '(';
            if LABEL_LISTS.contains(&word.as_str()) && call {
                i = j;
                skip_to(&mut i, ')');
            } else if !call && !KEYWORDS.split_whitespace().any(|k| k == word) {
                names.insert(word);
            }
        } else {
            i += 1;
        }
    }
    names
}

#[test]
fn metric_names_are_read_from_promql() {
    let names = metric_names(
        "max by (instance) (a_b{job=\"x\", instance=~\"y\"}) == 0 and on (instance) rate(c:d[5m]) > scalar(max(e) or vector(0)) offset 5m unless up",
    );
    let want: BTreeSet<String> = ["a_b", "c:d", "e", "up"].iter().map(|s| s.to_string()).collect();
    assert_eq!(names, want);
}

/// The metric names (`# TYPE` lines) of the textfile the binary writes after a backup and a
/// restore drill, so that the drill's metrics are there too.
fn exported_metric_names() -> BTreeSet<String> {
    let etcd = Etcd::start();
    for i in 0..3 {
        etcd.put(None, &format!("/kubernetes.io/namespaces/ns-{i}"), "{}");
    }
    let w = Work::new();
    let textfile = w.path().join("etcd-backupd.prom");
    let cfg = w.write_config(
        &etcd.endpoint,
        None,
        &format!("\n[metrics]\ntextfile = \"{}\"\n", textfile.display()),
    );
    let cfg = cfg.to_str().unwrap();
    let r = run(&["backup", "--no-election", "--config", cfg]);
    assert_eq!(r.code, 0, "{}", r.all());
    // Whether the drill passes does not matter here: either way it exports its metrics.
    run(&["verify", "latest", "--deep", "--config", cfg]);
    let text = std::fs::read_to_string(&textfile).unwrap();
    assert!(text.contains("etcd_backupd_last_drill_success"), "{text}");
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|l| l.split_whitespace().next().unwrap().to_string())
        .collect()
}

#[test]
fn openshift_scrape_manifests_match_the_config_and_the_rules_use_exported_metrics() {
    let objects = shipped_objects();

    // config.toml's metrics.listen: a port of OpenShift's 9000-9999 host-service range that its
    // network flow matrix does not list for control-plane nodes.
    let cfg: toml::Table = std::fs::read_to_string(repo("examples/openshift/config.toml"))
        .unwrap()
        .parse()
        .unwrap();
    // Parsed as the binary checks it.
    let listen: std::net::SocketAddr = cfg["metrics"]["listen"].as_str().unwrap().parse().unwrap();
    let port = listen.port();
    // openshift-docs snippets/network-flow-matrix.csv and openshift-kni/commatrix's matrices.
    const MATRIX_MASTER_PORTS_9XXX: &[u16] = &[
        9001, 9099, 9100, 9103, 9104, 9105, 9107, 9108, 9192, 9258, 9444, 9445, 9447, 9454, 9537, 9637, 9978, 9979,
        9980,
    ];
    assert!((9000..=9999).contains(&port), "{port}");
    assert!(!MATRIX_MASTER_PORTS_9XXX.contains(&port), "{port} is taken on masters");
    let ns = one(&objects, "Namespace")["metadata"]["name"].clone();
    let svc = one(&objects, "Service");
    let eps = one(&objects, "Endpoints");
    let sm = one(&objects, "ServiceMonitor");
    let rule = one(&objects, "PrometheusRule");
    for o in [svc, eps, sm, rule] {
        assert_eq!(o["metadata"]["namespace"], ns, "{o}");
    }
    // A Service without selector, its port the daemon's.
    assert!(svc["spec"].get("selector").is_none(), "{svc}");
    let svc_ports = svc["spec"]["ports"].as_array().unwrap();
    assert_eq!(svc_ports.len(), 1, "{svc}");
    let port_name = svc_ports[0]["name"].as_str().unwrap();
    assert_eq!(svc_ports[0]["port"], port, "{svc}");
    assert_eq!(svc_ports[0]["targetPort"], port, "{svc}");
    // Endpoints of the same name: node IPs on that port, under the Service port's name.
    assert_eq!(eps["metadata"]["name"], svc["metadata"]["name"]);
    let subsets = eps["subsets"].as_array().unwrap();
    assert!(!subsets.is_empty());
    for s in subsets {
        let addrs = s["addresses"].as_array().unwrap();
        assert!(addrs.len() >= 3, "the control-plane nodes: {s}");
        for a in addrs {
            a["ip"].as_str().unwrap().parse::<std::net::IpAddr>().unwrap();
            assert_eq!(a["targetRef"]["kind"], "Node", "{a}");
        }
        let ports = s["ports"].as_array().unwrap();
        assert_eq!(ports.len(), 1, "{s}");
        assert_eq!(ports[0]["name"], port_name, "{s}");
        assert_eq!(ports[0]["port"], port, "{s}");
    }
    // The ServiceMonitor selects the Service and scrapes that port's /metrics.
    for (k, v) in sm["spec"]["selector"]["matchLabels"].as_object().unwrap() {
        assert_eq!(&svc["metadata"]["labels"][k], v, "{k}");
    }
    let endpoints = sm["spec"]["endpoints"].as_array().unwrap();
    assert_eq!(endpoints.len(), 1, "{sm}");
    assert_eq!(endpoints[0]["port"], port_name);
    assert_eq!(endpoints[0]["path"], "/metrics");

    // Every metric an alert selects is one the binary exports, or Prometheus' own `up` of
    // the ServiceMonitor's job (the Service's name).
    let exported = exported_metric_names();
    let mut used = BTreeSet::new();
    for group in rule["spec"]["groups"].as_array().unwrap() {
        for r in group["rules"].as_array().unwrap() {
            let expr = r["expr"].as_str().unwrap();
            let names = metric_names(expr);
            assert!(!names.is_empty(), "{expr}");
            for name in &names {
                assert!(
                    exported.contains(name) || name == "up",
                    "{}: {name} is not exported ({exported:?})",
                    r["alert"]
                );
            }
            if names.contains("up") {
                let job = format!("job=\"{}\"", svc["metadata"]["name"].as_str().unwrap());
                assert!(expr.contains(&job), "{expr}");
            }
            used.extend(names);
        }
    }
    for name in [
        "etcd_backupd_last_success_timestamp_seconds",
        "etcd_backupd_last_attempt_success",
        "up",
    ] {
        assert!(used.contains(name), "no alert uses {name}: {used:?}");
    }
}

/// `promtool check rules` on the rule groups, and `promtool test rules` with the cases of
/// tests/fixtures/prometheusrule-test.yaml (backup age firing and not, failures, scrapes).
#[test]
fn promtool_checks_and_unit_tests_the_alert_rules() {
    let objects = shipped_objects();
    let spec = one(&objects, "PrometheusRule")["spec"].clone();
    let dir = tempfile::tempdir().unwrap();
    let promtool = |args: &[&str]| {
        let out = Command::new("promtool")
            .args(args)
            .current_dir(dir.path())
            .output()
            .expect("promtool (Debian package prometheus)");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    };
    // JSON is YAML: the groups as they are, annotations' templates included.
    std::fs::write(dir.path().join("full.yaml"), serde_json::to_vec(&spec).unwrap()).unwrap();
    let (ok, text) = promtool(&["check", "rules", "full.yaml"]);
    assert!(ok && text.contains("SUCCESS"), "{text}");

    // The unit tests compare labels; promtool would compare every annotation's text too.
    let mut bare = spec;
    for group in bare["groups"].as_array_mut().unwrap() {
        for r in group["rules"].as_array_mut().unwrap() {
            r.as_object_mut().unwrap().remove("annotations");
        }
    }
    std::fs::write(dir.path().join("rules.yaml"), serde_json::to_vec(&bare).unwrap()).unwrap();
    std::fs::copy(
        repo("tests/fixtures/prometheusrule-test.yaml"),
        dir.path().join("prometheusrule-test.yaml"),
    )
    .unwrap();
    let (ok, text) = promtool(&["test", "rules", "prometheusrule-test.yaml"]);
    assert!(ok && text.contains("SUCCESS"), "{text}");
}

/// The value of the series `series` (name and labels) in `text`, the exposition format.
fn sample(text: &str, series: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ').map(str::to_string))
}

/// The coverage metrics follow what the target holds after each real backup: how many sets,
/// the newest one's creation time (after retention too), and the newest drilled set.
#[test]
fn coverage_metrics_follow_the_sets_on_each_target() {
    let etcd = Etcd::start();
    etcd.put(None, "/kubernetes.io/namespaces/default", "{}");
    let w = Work::new();
    let textfile = w.path().join("etcd-backupd.prom");
    let metrics = format!("\n[metrics]\ntextfile = \"{}\"\n", textfile.display());
    let cfg = w.write_config(&etcd.endpoint, None, &metrics);
    let cfg = cfg.to_str().unwrap().to_string();
    let created = |set: &Path| -> i64 {
        let m: Value = serde_json::from_slice(&std::fs::read(set.join("manifest.json")).unwrap()).unwrap();
        chrono::DateTime::parse_from_rfc3339(m["created"].as_str().unwrap())
            .unwrap()
            .timestamp()
    };
    let backup = || {
        let r = run(&["backup", "--no-election", "--config", &cfg]);
        assert_eq!(r.code, 0, "{}", r.all());
        std::fs::read_to_string(&textfile).unwrap()
    };
    let newest = "etcd_backupd_target_newest_set_timestamp_seconds{target=\"local\"}";
    let count = "etcd_backupd_target_sets{target=\"local\"}";

    let text = backup();
    let sets = w.sets();
    assert_eq!(sets.len(), 1);
    assert_eq!(sample(&text, count).as_deref(), Some("1"), "{text}");
    assert_eq!(sample(&text, newest), Some(created(&sets[0]).to_string()), "{text}");

    std::thread::sleep(std::time::Duration::from_millis(1100));
    let text = backup();
    let sets = w.sets();
    assert_eq!(sets.len(), 2);
    assert_eq!(sample(&text, count).as_deref(), Some("2"), "{text}");
    assert_eq!(sample(&text, newest), Some(created(&sets[1]).to_string()), "{text}");
    assert!(created(&sets[1]) > created(&sets[0]));

    // Retention removes the oldest: the count is what is left.
    std::fs::write(
        &cfg,
        std::fs::read_to_string(&cfg).unwrap()
            + "\n[retention]\nkeep_last = 2\nkeep_daily = 0\nkeep_weekly = 0\nkeep_monthly = 0\nmin_keep = 1\n",
    )
    .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let text = backup();
    let sets = w.sets();
    assert_eq!(sets.len(), 2);
    assert_eq!(sample(&text, count).as_deref(), Some("2"), "{text}");
    assert_eq!(sample(&text, newest), Some(created(&sets[1]).to_string()), "{text}");
    // Never drilled here yet.
    let drilled = "etcd_backupd_target_newest_drilled_set_timestamp_seconds{target=\"local\"}";
    assert_eq!(sample(&text, drilled).as_deref(), Some("0"), "{text}");

    // A successful drill: the newest set's time, and how long its restore took.
    let r = run(&["verify", "latest", "--deep", "--config", &cfg]);
    assert_eq!(r.code, 0, "{}", r.all());
    let text = std::fs::read_to_string(&textfile).unwrap();
    assert_eq!(sample(&text, drilled), Some(created(&sets[1]).to_string()), "{text}");
    let secs: f64 = sample(&text, "etcd_backupd_last_drill_restore_duration_seconds")
        .unwrap_or_else(|| panic!("{text}"))
        .parse()
        .unwrap();
    assert!(secs > 0.0 && secs < 120.0, "{text}");
}
