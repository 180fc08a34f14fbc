//! What examples/openshift/ ships for Prometheus on OpenShift, checked against the binary: the
//! manifests parsed by a YAML parser that is not ours (Python's), the port of the Service, the
//! Endpoints and the ServiceMonitor agreeing with config.toml's `metrics.listen`, every metric
//! the alert expressions name being one that the binary writes, and the rules checked and
//! unit-tested by Prometheus' own `promtool`.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

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
    // The journal's metrics come from its writer: a daemon with the journal on, until it has
    // stored a segment (its metrics then join the textfile).
    let with_journal = format!(
        "{}\n[journal]\nenabled = true\nsegment_max_age = \"1s\"\n",
        std::fs::read_to_string(cfg).unwrap()
    );
    std::fs::write(cfg, with_journal).unwrap();
    etcd.put(None, "/after/the/set", "1");
    let mut d = crate::common::Proc::daemon(Path::new(cfg), w.path().join("daemon.log"), &[]);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let durable = |t: &str| {
        t.lines()
            .any(|l| l.starts_with("etcd_backupd_journal_durable_revision ") && !l.ends_with(" 0"))
    };
    while !durable(&std::fs::read_to_string(&textfile).unwrap_or_default()) {
        assert!(std::time::Instant::now() < deadline, "{}", d.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(d.stop(Duration::from_secs(15)), Some(0), "{}", d.log());
    let text = std::fs::read_to_string(&textfile).unwrap();
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

    // No wait: the run takes the next second's id, so its `created` is a later second too.
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

/// The objects of examples/openshift/dashboard.yaml, checked as the OpenShift console reads
/// them: one ConfigMap in openshift-config-managed labelled
/// `console.openshift.io/dashboard: "true"`, whose one data value is a Grafana dashboard of
/// rows and the panel types the console draws, each with queries. Returns the dashboard.
fn console_dashboard() -> Value {
    let docs = parse_yaml_docs(&std::fs::read_to_string(repo("examples/openshift/dashboard.yaml")).unwrap());
    assert_eq!(docs.len(), 1, "{docs:?}");
    let cm = &docs[0];
    assert_eq!(cm["apiVersion"], "v1");
    assert_eq!(cm["kind"], "ConfigMap");
    assert_eq!(cm["metadata"]["namespace"], "openshift-config-managed");
    // The string "true": the console selects with that label value, and a YAML boolean
    // would not even be a valid ConfigMap.
    assert_eq!(
        cm["metadata"]["labels"]["console.openshift.io/dashboard"],
        Value::String("true".into()),
        "{cm}"
    );
    let data = cm["data"].as_object().unwrap();
    assert_eq!(data.len(), 1, "the console reads the first value only: {data:?}");
    let (key, json) = data.iter().next().unwrap();
    assert!(key.ends_with(".json"), "{key}");
    let board: Value = serde_json::from_str(json.as_str().unwrap()).unwrap();
    assert!(!board["title"].as_str().unwrap().is_empty());
    let mut ids = BTreeSet::new();
    let mut queries = 0;
    let mut walk = vec![board["panels"].as_array().unwrap().clone()];
    while let Some(panels) = walk.pop() {
        for p in panels {
            assert!(ids.insert(p["id"].to_string()), "duplicate id: {p}");
            let kind = p["type"].as_str().unwrap();
            if kind == "row" {
                walk.push(p["panels"].as_array().cloned().unwrap_or_default());
                continue;
            }
            // What the console draws; it skips any other type without a word.
            assert!(["graph", "singlestat", "table", "gauge"].contains(&kind), "{p}");
            assert!(!p["title"].as_str().unwrap().is_empty(), "{p}");
            let targets = p["targets"].as_array().unwrap();
            assert!(!targets.is_empty(), "{p}");
            for t in targets {
                assert!(!t["expr"].as_str().unwrap().trim().is_empty(), "{p}");
                queries += 1;
            }
        }
    }
    assert!(queries >= 10, "{queries}");
    board
}

/// Every panel query of a dashboard: (panel title, expression).
fn panel_queries(board: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut walk = vec![board["panels"].clone()];
    while let Some(panels) = walk.pop() {
        for p in panels.as_array().into_iter().flatten() {
            if p["type"] == "row" {
                walk.push(p["panels"].clone());
            }
            for t in p["targets"].as_array().into_iter().flatten() {
                out.push((
                    p["title"].as_str().unwrap().to_string(),
                    t["expr"].as_str().unwrap().to_string(),
                ));
            }
        }
    }
    out
}

/// A real Prometheus server (Debian's `prometheus`) on a free loopback port, scraping
/// `target` (`host:port`) as job `etcd-backupd` every second, its data in a temporary
/// directory; stopped and removed on drop.
struct Prometheus {
    child: std::process::Child,
    url: String,
    dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(target: &str) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        // The job is the Service's name on OpenShift (monitoring.yaml), as the rules and
        // the dashboard's `up{job="etcd-backupd"}` expect.
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: etcd-backupd\n    static_configs:\n      - targets: [\"{target}\"]\n"
        );
        std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
        let listen = format!("127.0.0.1:{}", crate::common::free_port());
        let mut cmd = Command::new("/usr/bin/prometheus");
        cmd.arg(format!("--config.file={}", dir.path().join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address={listen}"))
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("prometheus.log")).unwrap());
        let child = crate::common::spawn_group(&mut cmd).expect("/usr/bin/prometheus (Debian package prometheus)");
        let mut p = Prometheus {
            child,
            url: format!("http://{listen}"),
            dir,
        };
        p.wait_for("ready", Duration::from_secs(30), |p| {
            p.get("/-/ready", None).map(|_| ())
        });
        p
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// GET `path` (with `query=` URL-encoded), the body of a 200.
    fn get(&self, path: &str, query: Option<&str>) -> Option<String> {
        let mut cmd = Command::new("curl");
        cmd.args(["-fsS", "--max-time", "5", "-G", &format!("{}{path}", self.url)]);
        if let Some(q) = query {
            cmd.arg("--data-urlencode").arg(format!("query={q}"));
        }
        let out = cmd.output().unwrap();
        out.status.success().then(|| String::from_utf8(out.stdout).unwrap())
    }

    /// `/api/v1/query` at the current time: the `data` of a successful answer.
    fn query(&self, expr: &str) -> Value {
        let body = self
            .get("/api/v1/query", Some(expr))
            .unwrap_or_else(|| panic!("query {expr} failed: {}", self.log()));
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["status"], "success", "{expr}: {v}");
        v["data"].clone()
    }

    /// Polls `check` every 200 ms until it gives a value, for at most `within`; panics
    /// saying `what` if it does not, or if Prometheus exits.
    fn wait_for<T>(&mut self, what: &str, within: Duration, check: impl Fn(&Prometheus) -> Option<T>) -> T {
        let deadline = std::time::Instant::now() + within;
        loop {
            if let Some(v) = check(self) {
                return v;
            }
            assert!(
                self.child.try_wait().unwrap().is_none(),
                "prometheus exited: {}",
                self.log()
            );
            assert!(
                std::time::Instant::now() < deadline,
                "prometheus: not {what}: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        crate::common::stop_group(&mut self.child, true);
    }
}

/// The console dashboard against the real thing: a real daemon backs up a real etcd to a
/// `file://` target and drills its set on a fast schedule, a real Prometheus scrapes its
/// `/metrics` every second, and every panel's query, evaluated by that Prometheus, returns
/// data. The scraped text also passes `promtool check metrics`.
#[test]
fn every_dashboard_panel_query_returns_data_from_a_scraped_daemon() {
    let board = console_dashboard();
    let queries = panel_queries(&board);

    let etcd = Etcd::start();
    for i in 0..3 {
        etcd.put(None, &format!("/kubernetes.io/namespaces/ns-{i}"), "{}");
    }
    let w = Work::new();
    let listen = format!("127.0.0.1:{}", crate::common::free_port());
    // One backup a minute, at a second a few seconds from now, and a drill every 2 s: the
    // drills after the backup succeed, long before the next backup would cut one short.
    let second = (chrono::Utc::now().timestamp() + 5) % 60;
    let cfg = w.write_config(
        &etcd.endpoint,
        None,
        &format!(
            "\n[schedule]\ncron = \"{second} * * * * *\"\ntimezone = \"UTC\"\njitter = \"0s\"\n\n[election]\nlease_ttl = \"3s\"\n\n[verify]\nschedule = \"*/2 * * * * *\"\n\n[metrics]\nlisten = \"{listen}\"\n"
        ),
    );
    let daemon = crate::common::Proc::daemon(&cfg, w.path().join("daemon.log"), &[]);
    let mut prom = Prometheus::start(&listen);

    // The target is up: the daemon answered a scrape.
    prom.wait_for("scraping the daemon", Duration::from_secs(30), |p| {
        let v: Value = serde_json::from_str(&p.get("/api/v1/targets", None)?).ok()?;
        let t = &v["data"]["activeTargets"][0];
        (t["health"] == "up" && t["labels"]["job"] == "etcd-backupd").then_some(())
    });
    // A backup stored on the target and a drill that restored it, both scraped since.
    prom.wait_for("seeing a backup and a successful drill", Duration::from_secs(120), |p| {
        let ok = "etcd_backupd_last_attempt_success == 1 and on () etcd_backupd_last_drill_success == 1 and on () etcd_backupd_last_drill_restore_duration_seconds > 0";
        let found = !p.query(ok)["result"].as_array()?.is_empty();
        found.then_some(())
    });

    // Every panel's query answers with data; a rate or an increase needs a second sample of
    // its series, which a loaded machine may scrape a little later: asked again until then.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let empty = loop {
        let mut empty = Vec::new();
        for (title, expr) in &queries {
            let data = prom.query(expr);
            assert_eq!(data["resultType"], "vector", "{title}: {expr}: {data}");
            if data["result"].as_array().unwrap().is_empty() {
                empty.push(format!("{title}: {expr}"));
            }
        }
        if empty.is_empty() || std::time::Instant::now() > deadline {
            break empty;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(
        empty.is_empty(),
        "panel queries without data:\n{}\n\ndaemon:\n{}",
        empty.join("\n"),
        daemon.log()
    );

    // What Prometheus scraped is valid exposition, by Prometheus' own linter.
    let out = Command::new("curl")
        .args(["-fsS", "--max-time", "5", &format!("http://{listen}/metrics")])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", daemon.log());
    let mut lint = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    lint.stdin.take().unwrap().write_all(&out.stdout).unwrap();
    let lint = lint.wait_with_output().unwrap();
    assert!(
        lint.status.success() && lint.stdout.is_empty() && lint.stderr.is_empty(),
        "promtool check metrics: {}{}\n{}",
        String::from_utf8_lossy(&lint.stdout),
        String::from_utf8_lossy(&lint.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
}

/// `curl -sS -i` (or `-I` for HEAD) with `args`: status line and headers (lower-cased
/// names), then the body.
fn http(args: &[&str]) -> (String, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "20"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "curl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let head = head
        .lines()
        .enumerate()
        .map(|(i, l)| match l.split_once(':') {
            Some((k, v)) if i > 0 => format!("{}:{v}", k.to_ascii_lowercase()),
            _ => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n");
    (head, body.to_string())
}

/// `GET /metrics` and `HEAD /metrics` answered (any query string), 405 for other methods
/// there and 404 elsewhere; a request head over 8 KiB refused; clients that connect and send
/// nothing, or half a request, cut off after the head timeout (5 s) while more of them than
/// the endpoint serves at once wait in line, so a scrape behind them is answered; and none of
/// them holds up the daemon's stop.
#[test]
fn the_metrics_endpoint_serves_only_metrics_and_no_client_holds_it() {
    use std::io::Read;
    use std::net::TcpStream;
    use std::time::Instant;

    let etcd = Etcd::start();
    let w = Work::new();
    let addr = format!("127.0.0.1:{}", crate::common::free_port());
    let cfg = w.write_config(
        &etcd.endpoint,
        None,
        &format!("\n[schedule]\ncron = \"0 0 3 1 1 *\"\n\n[metrics]\nlisten = \"{addr}\"\n"),
    );
    let mut daemon = crate::common::Proc::daemon(&cfg, w.path().join("daemon.log"), &[]);
    let url = format!("http://{addr}/metrics");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !Command::new("curl")
        .args(["-fsS", "--max-time", "2", &url])
        .output()
        .unwrap()
        .status
        .success()
    {
        assert!(daemon.running(), "{}", daemon.log());
        assert!(Instant::now() < deadline, "no /metrics: {}", daemon.log());
        std::thread::sleep(Duration::from_millis(100));
    }

    let (head, body) = http(&["-i", &url]);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.contains("\ncontent-type: text/plain; version=0.0.4; charset=utf-8"),
        "{head}"
    );
    assert!(body.contains("# TYPE etcd_backupd_runs_total counter\n"), "{body}");
    assert!(body.contains("\netcd_backupd_pending_sets 0\n"), "{body}");
    let (head, body) = http(&["-i", &format!("{url}?name[]=x")]);
    assert!(
        head.starts_with("HTTP/1.1 200") && body.contains("etcd_backupd_"),
        "{head}"
    );
    let (head, body) = http(&["-I", &url]);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("\ncontent-length: "), "{head}");
    assert!(body.is_empty(), "{body}");
    for other in ["/", "/metricsx", "/metrics/", "/debug/pprof"] {
        let (head, _) = http(&["-i", &format!("http://{addr}{other}")]);
        assert!(head.starts_with("HTTP/1.1 404"), "{other}: {head}");
    }
    let (head, _) = http(&["-i", "-X", "POST", "--data", "x", &url]);
    assert!(head.starts_with("HTTP/1.1 405"), "{head}");
    assert!(head.contains("\nallow: GET, HEAD"), "{head}");

    // A request head larger than the endpoint reads.
    let mut big = TcpStream::connect(&addr).unwrap();
    big.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let long = format!(
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nX-Filler: {}\r\n\r\n",
        "a".repeat(16 * 1024)
    );
    // The server may close before it read everything: the answer is what counts.
    let _ = big.write_all(long.as_bytes());
    let mut answer = Vec::new();
    let _ = big.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");

    // More silent and half-speaking clients than the endpoint serves at once (8).
    let started = Instant::now();
    let mut idle: Vec<TcpStream> = (0..12)
        .map(|i| {
            let mut s = TcpStream::connect(&addr).unwrap();
            if i % 2 == 1 {
                s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n").unwrap();
            }
            s.set_read_timeout(Some(Duration::from_secs(25))).unwrap();
            s
        })
        .collect();
    // A scrape behind them is answered once the head timeout frees their places.
    let (head, body) = http(&["-i", &url]);
    assert!(
        head.starts_with("HTTP/1.1 200") && body.contains("etcd_backupd_"),
        "{head}"
    );
    // Each of them is cut off by the server, well before the 20 s a connection may last.
    for (i, s) in idle.iter_mut().enumerate() {
        let mut rest = Vec::new();
        match s.read_to_end(&mut rest) {
            Ok(_) => {}
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "client {i}: {e}"),
        }
    }
    let took = started.elapsed();
    assert!(took < Duration::from_secs(18), "{took:?}");
    assert!(daemon.running(), "{}", daemon.log());

    // A client that stays connected does not hold up the stop.
    let _lingering = TcpStream::connect(&addr).unwrap();
    let stopping = Instant::now();
    assert_eq!(daemon.stop(Duration::from_secs(10)), Some(0), "{}", daemon.log());
    assert!(stopping.elapsed() < Duration::from_secs(5), "{:?}", stopping.elapsed());
}
