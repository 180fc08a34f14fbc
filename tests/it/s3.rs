//! The S3 target against a real S3 server: moto's, over HTTPS with a test CA, with IAM auth
//! on, so every request's SigV4 signature is checked. What is on the server is read back
//! with boto3 (another client), never through etcd-backupd.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::{Etcd, Run, Work, run_rss};
use crate::servers::{Moto, Tinyproxy};
use crate::webdav::backup_env;

const BUCKET: &str = "backups";

/// A `[[target]]` for `moto`'s bucket under the prefix `etcd/`, with `secret` as its secret
/// key (the right one, or not).
fn s3_target(moto: &Moto, w: &Work, secret: &str, extra: &str) -> String {
    let (ak, sk) = moto.key_files(w.path(), secret);
    format!(
        "[[target]]\nname = \"s3\"\nurl = \"s3://{BUCKET}/etcd/\"\nendpoint = \"{}\"\nregion = \"us-east-1\"\naccess_key_file = \"{}\"\nsecret_key_file = \"{}\"\nca_file = \"{}\"\n{extra}\n",
        moto.endpoint(),
        ak.display(),
        sk.display(),
        moto.pki.ca.display()
    )
}

fn cfg_args<'a>(args: &[&'a str], cfg: &'a Path) -> Vec<&'a str> {
    let mut v = args.to_vec();
    v.extend(["--config", cfg.to_str().unwrap()]);
    v
}

fn cli(args: &[&str], cfg: &Path, env: &[(&str, &str)]) -> Run {
    crate::common::run_env(&cfg_args(args, cfg), env)
}

/// The ids of the complete sets of cluster `test` on the server (those with a manifest).
fn sets_on(moto: &Moto, bucket: &str) -> Vec<String> {
    let mut ids: Vec<String> = moto
        .objects(bucket)
        .into_iter()
        .filter_map(|(k, _)| {
            k.strip_prefix("etcd/test/")?
                .strip_suffix("/manifest.json")
                .map(str::to_string)
        })
        .collect();
    ids.sort();
    ids
}

/// Keys on the server that are not part of a complete set: markers, and objects of sets
/// without a manifest.
fn debris_on(moto: &Moto, bucket: &str) -> Vec<String> {
    let objects = moto.objects(bucket);
    let complete = sets_on(moto, bucket);
    objects
        .into_iter()
        .map(|(k, _)| k)
        .filter(|k| k.contains("/.partial-") || !complete.iter().any(|id| k.starts_with(&format!("etcd/test/{id}/"))))
        .collect()
}

/// `list` shows set `id`, and `fetch` takes it into `fetched` in `w`: what fetch said, and the
/// snapshot it wrote.
fn list_and_fetch(w: &Work, cfg: &Path, id: &str) -> (Run, Vec<u8>) {
    let r = cli(&["list"], cfg, &[]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(r.stdout.contains(id), "{}", r.stdout);
    let dir = w.path().join("fetched");
    let r = cli(&["fetch", id, "--to", dir.to_str().unwrap()], cfg, &[]);
    assert_eq!(r.code, 0, "{}", r.all());
    let snapshot = std::fs::read(dir.join(format!("snapshot_{id}.db"))).unwrap();
    (r, snapshot)
}

fn assert_clean(moto: &Moto, bucket: &str) {
    assert_eq!(debris_on(moto, bucket), Vec::<String>::new(), "debris left");
    assert_eq!(moto.uploads(bucket), Vec::<String>::new(), "multipart uploads left");
}

#[test]
fn a_set_is_stored_listed_fetched_verified_and_drilled_from_s3() {
    let etcd = Etcd::start();
    etcd.fill(None, 300, 300);
    let moto = Moto::start();
    let w = Work::new();
    let cfg = w.write_config_targets(&etcd.endpoint, &s3_target(&moto, &w, &moto.secret_key, ""));

    let started = Instant::now();
    let r = backup_env(&cfg, &[]);
    assert_eq!(r.code, 0, "{}", r.all());
    eprintln!("backup took {:?}", started.elapsed());
    let ids = sets_on(&moto, BUCKET);
    assert_eq!(ids.len(), 1, "{:?}", moto.objects(BUCKET));
    let id = &ids[0];
    let keys: Vec<String> = moto.objects(BUCKET).into_iter().map(|(k, _)| k).collect();
    assert_eq!(
        keys,
        vec![
            format!("etcd/test/{id}/SHA256SUMS"),
            format!("etcd/test/{id}/manifest.json"),
            format!("etcd/test/{id}/snapshot_{id}.db"),
        ],
        "the layout is PREFIX/<cluster>/<id>/<files>, the marker gone"
    );
    assert_clean(&moto, BUCKET);

    // Fetched, the snapshot is byte for byte what boto3 reads from the server.
    let (r, fetched) = list_and_fetch(&w, &cfg, id);
    assert!(r.stdout.contains("etcd's snapshot trailer verified"), "{}", r.stdout);
    let theirs = w.path().join("theirs.db");
    moto.py(&format!(
        "s3.download_file(\"{BUCKET}\", \"etcd/test/{id}/snapshot_{id}.db\", \"{}\")\n",
        theirs.display()
    ));
    assert_eq!(fetched, std::fs::read(&theirs).unwrap());

    // verify, and the restore drill (a real etcd restored from the set).
    let r = cli(&["verify", "latest", "--deep"], &cfg, &[]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(r.stdout.contains(": OK"), "{}", r.stdout);

    let r = cli(&["check-config", "--connect"], &cfg, &[]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(
        r.stdout.contains("ok: target 's3' answers and holds 1 complete set(s)"),
        "{}",
        r.stdout
    );
}

#[test]
fn a_wrong_secret_key_fails_fast_with_one_line_naming_the_code_and_no_retries() {
    let etcd = Etcd::start();
    etcd.put(None, "k", "v");
    let moto = Moto::start();
    let w = Work::new();
    let wrong = "wrongWRONGwrongWRONGwrongWRONGwrong0000";
    let cfg = w.write_config_targets(&etcd.endpoint, &s3_target(&moto, &w, wrong, ""));

    let started = Instant::now();
    let r = cli(&["check-config", "--connect"], &cfg, &[]);
    let took = started.elapsed();
    assert_eq!(r.code, 1, "{}", r.all());
    let failed: Vec<&str> = r.stdout.lines().filter(|l| l.starts_with("FAILED")).collect();
    assert_eq!(failed.len(), 1, "{}", r.stdout);
    assert!(
        failed[0].starts_with(
            "FAILED: target 's3': ListObjectsV2 's3://backups/etcd/': 403 Forbidden SignatureDoesNotMatch"
        ),
        "{}",
        failed[0]
    );
    assert!(
        failed[0].contains("check access_key_file and secret_key_file"),
        "{}",
        failed[0]
    );
    assert!(took < Duration::from_secs(5), "{took:?}");

    // A backup fails the target at once: no retry, the same one line, nothing stored.
    let started = Instant::now();
    let r = backup_env(&cfg, &[]);
    let took = started.elapsed();
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(!r.all().contains("retrying"), "{}", r.all());
    assert!(r.stderr.contains("403 Forbidden SignatureDoesNotMatch"), "{}", r.stderr);
    assert!(took < Duration::from_secs(10), "{took:?}");
    assert!(!r.all().contains(wrong) && !r.all().contains(&moto.secret_key));
    assert!(moto.objects(BUCKET).is_empty());

    // An access key moto never issued: InvalidAccessKeyId.
    let (ak, _) = moto.key_files(w.path(), &moto.secret_key);
    std::fs::write(&ak, "AKIANOSUCHKEY0000000\n").unwrap();
    let r = cli(&["check-config", "--connect"], &cfg, &[]);
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(r.stdout.contains("403 Forbidden InvalidAccessKeyId"), "{}", r.stdout);
}

#[test]
fn the_proxy_from_the_environment_carries_every_request() {
    let etcd = Etcd::start();
    etcd.put(None, "k", "v");
    let moto = Moto::start();
    let proxy = Tinyproxy::start();
    let w = Work::new();
    let cfg = w.write_config_targets(&etcd.endpoint, &s3_target(&moto, &w, &moto.secret_key, ""));
    let purl = proxy.url();
    let env = [("HTTPS_PROXY", purl.as_str())];

    let r = cli(&["check-config", "--connect"], &cfg, &env);
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(
        r.stdout.contains(&format!(
            "target 's3': s3://backups/etcd/ at {}/backups/, via {purl} (from HTTPS_PROXY)",
            moto.endpoint()
        )),
        "{}",
        r.stdout
    );
    let before = proxy.requests();
    let r = backup_env(&cfg, &env);
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(proxy.requests() > before, "nothing went through the proxy");
    assert_eq!(sets_on(&moto, BUCKET).len(), 1);

    // NO_PROXY naming the endpoint: direct, the proxy sees nothing.
    let before = proxy.requests();
    let r = backup_env(&cfg, &[("HTTPS_PROXY", purl.as_str()), ("NO_PROXY", "127.0.0.1")]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert_eq!(proxy.requests(), before, "the proxy was used despite NO_PROXY");
    assert_eq!(sets_on(&moto, BUCKET).len(), 2);
    assert_clean(&moto, BUCKET);
}

/// The ids of the multipart uploads in progress.
fn upload_ids(moto: &Moto) -> Vec<String> {
    let out = moto.py(&format!(
        "for u in s3.list_multipart_uploads(Bucket=\"{BUCKET}\").get(\"Uploads\", []):\n    print(u[\"UploadId\"])\n"
    ));
    out.lines().map(str::to_string).collect()
}

/// Waits until moto holds a multipart upload other than those in `known` (an upload is under
/// way); panics after 30 s.
fn wait_for_upload(moto: &Moto, known: &[String]) {
    moto.py(&format!(
        r#"
known = {known:?}
deadline = time.time() + 30
while not [u for u in s3.list_multipart_uploads(Bucket="{BUCKET}").get("Uploads", []) if u["UploadId"] not in known]:
    assert time.time() < deadline, "no multipart upload began"
    time.sleep(0.05)
"#
    ));
}

/// Runs `backup` until a new multipart upload is under way, then SIGKILLs it.
fn kill_mid_upload(moto: &Moto, cfg: &Path) {
    let known = upload_ids(moto);
    let mut child = crate::common::spawn_group(
        Command::new(env!("CARGO_BIN_EXE_etcd-backupd"))
            .args(cfg_args(&["backup", "--no-election"], cfg))
            .env_remove("HTTPS_PROXY")
            .env_remove("https_proxy")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null()),
    )
    .unwrap();
    wait_for_upload(moto, &known);
    std::thread::sleep(Duration::from_millis(500));
    crate::common::stop_group(&mut child, false); // SIGKILL, mid-upload
}

#[test]
fn a_multipart_upload_killed_midway_leaves_nothing_listed_and_the_next_run_cleans_up() {
    let etcd = Etcd::start();
    etcd.fill(None, 3000, 1000); // ~3+ MB: a dozen parts of 256 KiB
    let moto = Moto::start();
    let w = Work::new();
    let targets = s3_target(&moto, &w, &moto.secret_key, "part_size = \"256KiB\"");
    let slow = format!("{targets}\n[priority]\nupload_rate_limit = \"512KiB/s\"\n");
    let cfg = w.write_config_targets(&etcd.endpoint, &slow);
    let nothing_listed = || {
        assert!(sets_on(&moto, BUCKET).is_empty(), "{:?}", moto.objects(BUCKET));
        let r = cli(&["list"], &cfg, &[]);
        assert_eq!(r.code, 0, "{}", r.all());
        assert!(r.stderr.contains("no complete backup sets"), "{}", r.all());
    };

    // Killed while the snapshot streams into its multipart upload (the pipelined path):
    // nothing is listed; what is there is the marker naming this node, and the upload.
    kill_mid_upload(&moto, &cfg);
    nothing_listed();
    let debris = debris_on(&moto, BUCKET);
    assert!(debris.iter().any(|k| k.ends_with("/.partial-node-a")), "{debris:?}");
    assert_eq!(moto.uploads(BUCKET).len(), 1);
    let staged = w.staged();
    assert_eq!(staged.len(), 1, "{staged:?}");

    // The next run takes its own snapshot, then delivers the killed run's set from staging
    // first: killed during that upload, still nothing is listed.
    kill_mid_upload(&moto, &cfg);
    nothing_listed();
    assert_eq!(moto.uploads(BUCKET).len(), 1, "the first run's upload was aborted");
    let staged = w.staged();
    assert_eq!(staged.len(), 2, "{staged:?}");

    // The next run of this node removes its debris at once, aborts the upload, delivers
    // both staged sets (multipart again), then its own.
    let cfg = w.write_config_targets(&etcd.endpoint, &targets);
    let r = backup_env(&cfg, &[]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(
        r.stderr.contains("removed an incomplete set left by an earlier run"),
        "{}",
        r.stderr
    );
    let sets = sets_on(&moto, BUCKET);
    assert_eq!(sets.len(), 3, "{:?}", moto.objects(BUCKET));
    assert!(staged.iter().all(|(id, _)| sets.contains(id)), "{sets:?}");
    assert_clean(&moto, BUCKET);
    assert!(w.staged().iter().all(|(_, pending)| pending.is_empty()));
}

/// Writes `count` values of 1 MB each with the real etcdctl (through stdin: an argument may
/// not be that long).
fn fill_mb(etcd: &Etcd, count: usize) {
    use std::io::Write;
    for i in 0..count {
        let mut child = etcd
            .etcdctl(None)
            .args(["put", &format!("/registry/big/{i:04}")])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let value: String = format!("{i:08}-").repeat(100_000);
        child.stdin.take().unwrap().write_all(value.as_bytes()).unwrap();
        assert!(child.wait().unwrap().success());
    }
}

#[test]
fn a_snapshot_of_several_parts_is_stored_whole_in_bounded_memory() {
    let etcd = Etcd::start();
    fill_mb(&etcd, 56); // a DB of ~56 MB: 4 parts of 16 MiB
    let moto = Moto::start();
    let w = Work::new();
    let cfg = w.write_config_targets(&etcd.endpoint, &s3_target(&moto, &w, &moto.secret_key, ""));
    let started = Instant::now();
    let (r, peak_kib) = run_rss(&cfg_args(&["backup", "--no-election"], &cfg));
    assert_eq!(r.code, 0, "{}", r.all());
    eprintln!(
        "backup of a 4-part snapshot: {:?}, peak RSS {} KiB",
        started.elapsed(),
        peak_kib
    );
    assert!(peak_kib < 64 * 1024, "peak RSS {peak_kib} KiB");
    let id = sets_on(&moto, BUCKET).pop().unwrap();
    // A multipart object's ETag ends in "-<parts>".
    let out = moto.py(&format!(
        r#"
h = s3.head_object(Bucket="{BUCKET}", Key="etcd/test/{id}/snapshot_{id}.db")
print(h["ETag"].strip('"'), h["ContentLength"])
"#
    ));
    let (etag, size) = out.trim().split_once(' ').unwrap();
    let size: u64 = size.parse().unwrap();
    let parts: u64 = etag.rsplit_once('-').expect("a multipart ETag").1.parse().unwrap();
    assert_eq!(parts, size.div_ceil(16 << 20), "{etag}, {size} bytes");
    assert!(parts >= 3, "{parts} parts");
    // Every byte is there: verify reads the set back and checks etcd's trailer and SHA256SUMS.
    let r = cli(&["verify", "latest"], &cfg, &[]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert_clean(&moto, BUCKET);
}

#[test]
fn retention_prunes_s3_goes_on_past_a_refused_delete_and_a_locked_bucket_keeps_every_version() {
    let etcd = Etcd::start();
    etcd.put(None, "k", "v");
    let moto = Moto::start();
    // A bucket with Object Lock and a default retention: every PUT must carry Content-MD5,
    // and what is deleted only gets a delete marker over versions kept for a day.
    moto.py(r#"
s3.create_bucket(Bucket="locked", ObjectLockEnabledForBucket=True)
s3.put_object_lock_configuration(Bucket="locked", ObjectLockConfiguration={
    "ObjectLockEnabled": "Enabled", "Rule": {"DefaultRetention": {"Mode": "GOVERNANCE", "Days": 1}}})
"#);
    let w = Work::new();
    let plain = s3_target(&moto, &w, &moto.secret_key, "");
    let locked = plain
        .replace("name = \"s3\"", "name = \"locked\"")
        .replace("s3://backups/", "s3://locked/");
    let config = |keep_last: u32| {
        w.write_config_targets(
            &etcd.endpoint,
            &format!(
                "{plain}\n{locked}\n[retention]\nkeep_last = {keep_last}\nkeep_daily = 0\nkeep_weekly = 0\nkeep_monthly = 0\nmin_keep = 1\n"
            ),
        )
    };
    let cfg = config(3);
    for _ in 0..3 {
        let r = backup_env(&cfg, &[]);
        assert_eq!(r.code, 0, "{}", r.all());
    }
    let ids = sets_on(&moto, BUCKET);
    assert_eq!(ids.len(), 3);
    assert_eq!(sets_on(&moto, "locked"), ids);

    // The key may not delete the oldest set in `backups`: that delete is refused, logged,
    // and retention goes on with the next.
    moto.py(&format!(
        r#"
client("iam").put_user_policy(UserName="backup", PolicyName="keep", PolicyDocument=json.dumps(
    {{"Version": "2012-10-17", "Statement": [{{"Effect": "Deny", "Action": "s3:DeleteObject",
      "Resource": "arn:aws:s3:::{BUCKET}/etcd/test/{}/*"}}]}}))
"#,
        ids[0]
    ));
    let cfg = config(1);
    let r = backup_env(&cfg, &[]);
    assert_eq!(r.code, 0, "{}", r.all());
    let refused = r
        .stderr
        .lines()
        .find(|l| l.contains("cannot remove a backup set"))
        .unwrap_or_else(|| panic!("{}", r.stderr));
    assert!(
        refused.contains(&ids[0]) && refused.contains("403 Forbidden AccessDenied"),
        "{refused}"
    );
    let left = sets_on(&moto, BUCKET);
    assert_eq!(left.len(), 2, "{left:?}");
    assert_eq!(left[0], ids[0], "the refused set is still whole");
    assert!(!left.contains(&ids[1]) && !left.contains(&ids[2]), "{left:?}");
    let r = cli(&["list", "--target", "s3"], &cfg, &[]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(
        r.stdout.contains(&ids[0]) && !r.stdout.contains("DAMAGED"),
        "{}",
        r.stdout
    );

    // The locked bucket: pruned as configured, yet every version of every file stays.
    let kept = sets_on(&moto, "locked");
    assert_eq!(kept.len(), 1, "{kept:?}");
    let out = moto.py(r#"
v = s3.list_object_versions(Bucket="locked")
print(len(v.get("Versions", [])), len(v.get("DeleteMarkers", [])))
"#);
    let (versions, markers) = out.trim().split_once(' ').unwrap();
    let (versions, markers): (usize, usize) = (versions.parse().unwrap(), markers.parse().unwrap());
    // 4 sets of 3 files and the upload marker, each stored once; a delete marker over each
    // upload marker, and over every file of the 3 sets pruned.
    assert_eq!((versions, markers), (4 * 4, 4 + 3 * 3), "{out}");
    assert_clean(&moto, BUCKET);
    assert_clean(&moto, "locked");
}

#[test]
fn the_secret_key_never_shows_in_any_output_at_trace_level_or_in_any_file() {
    let etcd = Etcd::start();
    etcd.fill(None, 500, 500);
    let moto = Moto::start();
    let w = Work::new();
    let target = s3_target(&moto, &w, &moto.secret_key, "part_size = \"256KiB\"");
    let cfg = w.write_config_targets(&etcd.endpoint, &target);
    let secret = moto.secret_key.clone();
    let mut outputs = Vec::new();
    let r = cli(&["backup", "--no-election", "-vv"], &cfg, &[]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(r.stderr.contains("TRACE"), "not at trace level");
    outputs.push(r.all());
    let id = sets_on(&moto, BUCKET).pop().unwrap();
    let fetched = w.path().join("fetched");
    for args in [
        vec!["check-config"],
        vec!["check-config", "--connect"],
        vec!["list"],
        vec!["list", "--json"],
        vec!["fetch", id.as_str(), "--to", fetched.to_str().unwrap()],
        vec!["verify", "latest"],
        vec!["prune", "--dry-run"],
    ] {
        let mut a = args.clone();
        a.push("-vv");
        let r = cli(&a, &cfg, &[]);
        assert_eq!(r.code, 0, "{args:?}: {}", r.all());
        outputs.push(r.all());
    }
    // A wrong key: the server's refusal, at trace level, still shows neither key.
    let (_, sk) = moto.key_files(w.path(), "wrong-wrong-wrong-wrong-wrong-wrong-wrong");
    let r = cli(&["check-config", "--connect", "-vv"], &cfg, &[]);
    assert_eq!(r.code, 1, "{}", r.all());
    outputs.push(r.all());
    for (i, out) in outputs.iter().enumerate() {
        assert!(!out.contains(&secret), "output {i} shows the secret key");
        assert!(
            !out.contains("wrong-wrong-wrong"),
            "output {i} shows the wrong secret key"
        );
    }
    // No file written (staging, state, fetched files, config) holds it, but the key file.
    for f in Work::files_under(w.path())
        .into_iter()
        .filter(|p| p.is_file() && *p != sk)
    {
        let bytes = std::fs::read(&f).unwrap();
        assert!(
            !bytes.windows(secret.len()).any(|win| win == secret.as_bytes()),
            "{} holds the secret key",
            f.display()
        );
    }
    // Nor does any object on the server.
    let out = moto.py(&format!(
        r#"
for o in s3.list_objects_v2(Bucket="{BUCKET}")["Contents"]:
    body = s3.get_object(Bucket="{BUCKET}", Key=o["Key"])["Body"].read()
    print(o["Key"], os.environ["MOTO_SK"].encode() in body)
"#
    ));
    assert!(
        out.lines().count() >= 3 && out.lines().all(|l| l.ends_with(" False")),
        "{out}"
    );
}

/// s3s-fs, a second S3 server (SigV4 checked), lacks `ListMultipartUploads` (501): it is
/// only used to find uploads a crash left behind, so every command works there, with one
/// warning naming the missing operation per process. A snapshot of several parts (the
/// default 16 MiB) shows multipart uploads themselves work; the files on the server's disk
/// are the set, byte for byte.
#[test]
fn every_command_works_on_s3s_fs_which_lacks_listing_uploads() {
    let etcd = Etcd::start();
    fill_mb(&etcd, 24);
    let s3s = crate::servers::S3sFs::start();
    let w = Work::new();
    let (ak, sk) = (w.path().join("ak"), w.path().join("sk"));
    for (path, text) in [(&ak, &s3s.access_key), (&sk, &s3s.secret_key)] {
        std::fs::write(path, text).unwrap();
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    }
    let target = format!(
        "[[target]]\nname = \"s3s\"\nurl = \"s3://{BUCKET}/etcd/\"\nendpoint = \"{}\"\nregion = \"us-east-1\"\naccess_key_file = \"{}\"\nsecret_key_file = \"{}\"\n",
        s3s.endpoint(),
        ak.display(),
        sk.display()
    );
    let cfg = w.write_config_targets(&etcd.endpoint, &target);
    let warning = "the server does not implement ListMultipartUploads (501 Not Implemented)";

    let r = backup_env(&cfg, &[]);
    assert_eq!(r.code, 0, "{}\n{}", r.all(), s3s.log());
    assert_eq!(
        r.stderr.matches(warning).count(),
        1,
        "one warning per process: {}",
        r.stderr
    );
    let sets = s3s.bucket_dir().join("etcd/test");
    let ids: Vec<String> = std::fs::read_dir(&sets)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(ids.len(), 1, "{ids:?}");
    let id = &ids[0];
    let stored = std::fs::read(sets.join(id).join(format!("snapshot_{id}.db"))).unwrap();
    assert!(stored.len() > 16 << 20, "more than one part: {} bytes", stored.len());

    let (_, fetched) = list_and_fetch(&w, &cfg, id);
    assert_eq!(fetched, stored);
    let r = cli(&["verify", "latest", "--deep"], &cfg, &[]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(r.stdout.contains("restore drill"), "{}", r.stdout);
    let r = cli(&["prune"], &cfg, &[]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(r.stdout.contains("keep"), "{}", r.stdout);
    assert!(sets.join(id).join("manifest.json").is_file());
}
