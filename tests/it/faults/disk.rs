//! A staging filesystem that fills up.

use crate::backup::mount_tmpfs;
use crate::common::{Etcd, Work, assert_sha256sums, run};
use crate::support::{NO_RETENTION, assert_complete, entries};

/// Staging on a 4 MiB tmpfs holding an older delivered set (the local copy) and an older
/// pending one: a snapshot that does not fit fails with ENOSPC in one clear line and touches
/// neither; with the guard on the run is skipped (exit 3); once the DB shrinks again the next
/// run delivers the pending set and its own.
#[test]
fn a_nearly_full_staging_filesystem_fails_clearly_and_keeps_older_sets_intact() {
    let etcd = Etcd::start();
    etcd.put(None, "k", "v");
    let w = Work::new();
    let _m = mount_tmpfs(&w.staging(), "size=4m,mode=0700");
    let no_guard = format!("\n[guards]\nmin_free_space = \"0x\"\n{NO_RETENTION}");
    let cfg = w.write_config(&etcd.endpoint, None, &no_guard);
    let backup = || run(&["backup", "--no-election", "--config", cfg.to_str().unwrap()]);

    let r = backup();
    assert_eq!(r.code, 0, "{}", r.all());
    let a = w.staged()[0].0.clone();
    let away = w.path().join("target-away");
    std::fs::rename(w.target_root(), &away).unwrap();
    let r = backup();
    assert_eq!(r.code, 1, "{}", r.all());
    std::fs::rename(&away, w.target_root()).unwrap();
    let staged = w.staged();
    assert_eq!(staged.len(), 2, "{staged:?}");
    let b = staged[1].0.clone();
    assert_eq!(
        staged,
        vec![(a.clone(), vec![]), (b.clone(), vec!["local".to_string()])]
    );

    etcd.fill(None, 8000, 1000); // ~9-10 MB: more than the tmpfs holds
    let r = backup();
    assert_eq!(r.code, 1, "{}", r.all());
    let last = r.stderr.trim().lines().last().unwrap();
    assert!(
        last.starts_with("error: ") && last.contains("No space left on device"),
        "{last}"
    );
    let intact = |w: &Work| {
        assert_eq!(
            w.staged(),
            vec![(a.clone(), vec![]), (b.clone(), vec!["local".to_string()])]
        );
        for id in [&a, &b] {
            assert_sha256sums(&w.staging().join("sets").join(id));
        }
        let root = w.target_root().join("test");
        assert_eq!(entries(&root), vec![a.clone()]);
        assert_complete(&root.join(&a));
        assert!(w.staging_tmp_files().is_empty(), "{:?}", w.staging_tmp_files());
    };
    intact(&w);

    // With the free-space guard on, the same run is skipped up front.
    let guarded = w.write_config(&etcd.endpoint, None, NO_RETENTION);
    let r = run(&["backup", "--no-election", "--config", guarded.to_str().unwrap()]);
    assert_eq!(r.code, 3, "{}", r.all());
    assert!(r.stderr.contains("guards.min_free_space"), "{}", r.stderr);
    intact(&w);

    // The keys go, the DB is compacted and defragmented: the next run fits again.
    let ctl = |args: &[&str]| {
        let out = etcd.etcdctl(None).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    };
    ctl(&["del", "--prefix", "/registry/test/"]);
    let st: serde_json::Value = serde_json::from_slice(&ctl(&["endpoint", "status", "-w", "json"])).unwrap();
    let rev = st[0]["Status"]["header"]["revision"].as_u64().unwrap().to_string();
    ctl(&["compact", "--physical", &rev]);
    ctl(&["defrag"]);
    let cfg = w.write_config(&etcd.endpoint, None, &no_guard);
    let r = run(&["backup", "--no-election", "--config", cfg.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.all());
    let root = w.target_root().join("test");
    let sets = entries(&root);
    assert_eq!(sets.len(), 3, "{sets:?}");
    assert!(sets.contains(&a) && sets.contains(&b), "{sets:?}");
    for id in &sets {
        assert_complete(&root.join(id));
    }
    assert!(w.staged().iter().all(|(_, p)| p.is_empty()), "{:?}", w.staged());
}
