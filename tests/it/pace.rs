//! The gentle pull (issue 29, `priority.etcd_latency_budget`): a member made busy for real,
//! by a write load from other clients, slows the pull; a quiet one does not. No timing is
//! asserted: only whether the pull was held back at all, as `backup --json` reports it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::common::{Etcd, Work, run};

/// `backup --json` with `extra`; its `pace` report.
fn backup_pace(etcd: &Etcd, w: &Work, extra: &str) -> serde_json::Value {
    let cfg = w.write_config(&etcd.endpoint, None, extra);
    let r = run(&["backup", "--json", "--config", cfg.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.all());
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    v["pace"].clone()
}

/// An etcd whose database is large enough for a pull of a few seconds in a debug build.
fn big_etcd() -> Etcd {
    let etcd = Etcd::start();
    etcd.fill(None, 8000, 10_000);
    etcd
}

#[test]
fn a_quiet_member_is_never_slowed_for() {
    let etcd = big_etcd();
    let w = Work::new();
    let pace = backup_pace(&etcd, &w, "[priority]\netcd_latency_budget = 1.1\n");
    assert!(pace["probes"].as_u64().unwrap() > 0, "the probe ran: {pace}");
    assert!(pace["baseline_ms"].as_f64().unwrap() > 0.0, "{pace}");
    // Nobody writes: the pull's own cost hurts no one, whatever the latency did.
    assert_eq!(pace["slowed_s"].as_f64(), Some(0.0), "{pace}");
    // "off" pulls at full speed, with no probe at all.
    let w = Work::new();
    assert!(backup_pace(&etcd, &w, "[priority]\netcd_latency_budget = \"off\"\n").is_null());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_busy_with_other_clients_writes_slows_the_pull() {
    let etcd = big_etcd();
    let w = Work::new();
    // Eight clients putting 1 KiB values in a closed loop, for as long as the backup runs.
    let stop = Arc::new(AtomicBool::new(false));
    let puts = Arc::new(AtomicU64::new(0));
    let client = etcd_client::Client::connect([etcd.endpoint.as_str()], None)
        .await
        .unwrap();
    let writers: Vec<_> = (0..8)
        .map(|i| {
            let (mut kv, stop, puts) = (client.kv_client(), stop.clone(), puts.clone());
            tokio::spawn(async move {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    kv.put(format!("/load/{i}/{}", n % 100), vec![b'x'; 1024], None)
                        .await
                        .unwrap();
                    n += 1;
                    puts.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    // The load is on before the backup's baseline is taken.
    while puts.load(Ordering::Relaxed) < 500 {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let pace = {
        let (etcd, w) = (&etcd, &w);
        tokio::task::block_in_place(|| backup_pace(etcd, w, "[priority]\netcd_latency_budget = 1.1\n"))
    };
    stop.store(true, Ordering::Relaxed);
    for t in writers {
        t.await.unwrap();
    }
    assert!(pace["probes"].as_u64().unwrap() > 0, "{pace}");
    assert!(
        pace["slowed_s"].as_f64().unwrap() > 0.0,
        "the pull was never held back: {pace}"
    );
    // The run's record and the metrics say the same.
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(w.staging().join("state.json")).unwrap()).unwrap();
    assert_eq!(state["runs"][0]["pace"], pace, "{state}");
}
