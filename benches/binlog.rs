//! Binlog capture benchmark against a throwaway MariaDB (`scripts/mariadb`).
//!
//! 1. Decode rate: the simulator writes N ERP changes as fast as the server takes
//!    them; the `mysql` source then streams the whole binlog from its start and the
//!    row events decoded per second are printed.
//! 2. Commit-to-decoded latency at a steady rate: while the simulator drives the ERP
//!    at `--rate`, a probe table gets a row with the wall clock every 10 ms; the
//!    source's consumer measures how long after its commit each probe row arrives
//!    (p50/p99/max).
//!
//! `cargo bench --bench binlog -- [--events N] [--rate R/s] [--seconds S]`
//! Prints figures; asserts nothing about them.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mysql_async::prelude::Queryable;
use tokio_util::sync::CancellationToken;

use caudal::capture::mysql::{MysqlCheckpoint, MysqlSource, MysqlSourceConfig};
use caudal::capture::{erp_db, Source};
use caudal::config::{self, spec::SimulateSpec};
use caudal::event::{Checkpoint, Event, Value};

mod common;
use common::arg;

fn now_us() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as i64)
}

fn percentile(sorted: &[i64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let events: u64 = arg("--events", "200000").parse().expect("--events N");
    let rate = arg("--rate", "5000/s");
    let seconds: u64 = arg("--seconds", "10").parse().expect("--seconds S");

    let dir = tempfile::tempdir().expect("tempdir");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/mariadb");
    let out = Command::new(&script).arg("start").arg(dir.path()).output().expect("scripts/mariadb");
    assert!(out.status.success(), "scripts/mariadb: {}", String::from_utf8_lossy(&out.stderr));
    let base = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let url = format!("{base}erp_db");
    let mut admin = mysql_async::Conn::new(mysql_async::Opts::from_url(&base).expect("url"))
        .await
        .expect("connect");
    admin.query_drop("CREATE DATABASE erp_db").await.expect("create db");
    admin
        .query_drop("CREATE TABLE erp_db.probe (id BIGINT PRIMARY KEY, t_us BIGINT)")
        .await
        .expect("probe table");

    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("config/examples/erp.toml"),
    )
    .expect("pipeline")
        + "\n[tables.probe]\nkey = [\"id\"]\ncolumns = { id = \"int\", t_us = \"int\" }\n";
    let spec = config::parse(Path::new("bench.toml"), &text).expect("pipeline");
    let catalog = spec.catalog.clone();
    let source_config = |server_id| MysqlSourceConfig {
        url: url.clone(),
        server_id,
        include: Vec::new(),
        server_name: "erp".into(),
        snapshot: caudal::config::spec::SnapshotMode::default(),
    };

    // ---- 1. decode rate -------------------------------------------------------
    let sim = SimulateSpec { seed: 1, rate: None, events: Some(events), ..SimulateSpec::default() };
    let started = Instant::now();
    let applied =
        erp_db::drive(&url, &sim, catalog.clone(), 1_767_600_000_000).await.expect("drive");
    println!(
        "wrote {applied} ERP statements in {:.1} s ({:.0}/s)",
        started.elapsed().as_secs_f64(),
        applied as f64 / started.elapsed().as_secs_f64()
    );
    let first_file: Option<(String, u64)> = {
        let rows: Vec<(String, u64)> = admin.query("SHOW BINARY LOGS").await.expect("binlogs");
        rows.into_iter().next()
    };
    let (file, _) = first_file.expect("a binlog file");
    let resume = MysqlCheckpoint {
        file,
        pos: 4,
        gtid: None,
        skip: None,
        snapshot: None,
        origin: 0,
        schemas: None,
    };
    let resume = Checkpoint(serde_json::to_string(&resume).expect("checkpoint"));
    let (tx, mut rx) = caudal::bus::memory(64);
    let shutdown = CancellationToken::new();
    let source: Box<dyn Source> = Box::new(MysqlSource::new(source_config(9001), catalog.clone()));
    let stop = shutdown.clone();
    let task = tokio::spawn(async move { source.run(Some(resume), tx, stop).await });
    let mut rows = 0u64;
    let mut first: Option<Instant> = None;
    let mut last = Instant::now();
    // The end is 3 s without a change: the source keeps sending heartbeat batches
    // (no events) while idle, so silence on the channel never comes.
    while let Ok(Some(batch)) = tokio::time::timeout(Duration::from_secs(3), rx.recv()).await {
        let n = batch.events.iter().filter(|e| matches!(e, Event::Change(_))).count() as u64;
        if n > 0 {
            first.get_or_insert_with(Instant::now);
            rows += n;
            last = Instant::now();
        } else if last.elapsed() >= Duration::from_secs(3) {
            break;
        }
    }
    shutdown.cancel();
    let _ = task.await;
    let secs = first.map_or(0.0, |f| (last - f).as_secs_f64());
    println!(
        "binlog decode: {rows} row events in {secs:.2} s = {:.0} row events/s (one source task)",
        rows as f64 / secs.max(1e-9)
    );

    // ---- 2. commit-to-decoded latency at a steady rate --------------------------
    let probe_table = catalog.id("probe").expect("probe table");
    let (tx, mut rx) = caudal::bus::memory(64);
    let shutdown = CancellationToken::new();
    let source: Box<dyn Source> = Box::new(MysqlSource::new(source_config(9002), catalog.clone()));
    let stop = shutdown.clone();
    let task = tokio::spawn(async move { source.run(None, tx, stop).await });
    let consumer = tokio::spawn(async move {
        let mut lat = Vec::new();
        let mut total = 0u64;
        while let Some(batch) = rx.recv().await {
            let now = now_us();
            for e in batch.events {
                if let Event::Change(c) = e {
                    total += 1;
                    if c.table == probe_table {
                        if let Some(Value::Int(t)) = c.after.as_ref().and_then(|r| r.get(1)) {
                            lat.push(now - t);
                        }
                    }
                }
            }
        }
        (lat, total)
    });
    tokio::time::sleep(Duration::from_secs(3)).await; // snapshot of what is there
    let rate_per_s = config::spec::parse_rate(&rate).expect("--rate").unwrap_or(5000.0);
    let sim = SimulateSpec {
        seed: 2,
        rate: Some(rate_per_s),
        events: Some((rate_per_s * seconds as f64) as u64 + 6100),
        ..SimulateSpec::default()
    };
    let drive_url = url.clone();
    let drive_catalog = catalog.clone();
    let driver = tokio::spawn(async move {
        erp_db::drive(&drive_url, &sim, drive_catalog, 1_767_700_000_000).await
    });
    let mut probe = mysql_async::Conn::new(mysql_async::Opts::from_url(&url).expect("url"))
        .await
        .expect("probe conn");
    let started = Instant::now();
    let mut id = 0i64;
    while started.elapsed() < Duration::from_secs(seconds) {
        id += 1;
        probe
            .exec_drop("INSERT INTO probe (id, t_us) VALUES (?, ?)", (id, now_us()))
            .await
            .expect("probe insert");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = driver.await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    shutdown.cancel();
    let _ = task.await;
    let (mut lat, total) = consumer.await.expect("consumer");
    lat.sort_unstable();
    println!(
        "commit-to-decoded latency at {rate} ERP load ({} probes, {total} changes): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        lat.len(),
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        percentile(&lat, 1.0)
    );

    // ---- 3. commit-to-visible latency through the whole pipeline into SQLite ------
    let store = dir.path().join("visible.db");
    let mut spec = config::parse(
        Path::new("bench.toml"),
        &text.replace("trigger_interval = \"1s\"", "trigger_interval = \"10ms\""),
    )
    .expect("pipeline");
    spec.source = caudal::config::spec::SourceSpec::Mysql(caudal::config::spec::MysqlSpec {
        url: url.clone(),
        server_id: 9003,
        include: Vec::new(),
        server_name: "erp".into(),
        snapshot: caudal::config::spec::SnapshotMode::default(),
    });
    spec.store = Some(caudal::config::spec::StoreSpec::Sqlite { path: store.clone() });
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    let pipeline = tokio::spawn(caudal::topology::run(
        Arc::new(spec),
        caudal::topology::RunOptions::default(),
        stop,
        None,
    ));
    // Wait for the snapshot to be committed.
    let reader = loop {
        if let Ok(db) = rusqlite::Connection::open(&store) {
            let done: i64 =
                db.query_row("SELECT COUNT(*) FROM silver_probe", [], |r| r.get(0)).unwrap_or(-1);
            if done >= id {
                break db;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let sim = SimulateSpec {
        seed: 3,
        rate: Some(rate_per_s),
        events: Some((rate_per_s * seconds as f64) as u64 + 6100),
        ..SimulateSpec::default()
    };
    let drive_url = url.clone();
    let drive_catalog = catalog.clone();
    let driver = tokio::spawn(async move {
        erp_db::drive(&drive_url, &sim, drive_catalog, 1_767_800_000_000).await
    });
    let mut visible = Vec::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(seconds) {
        id += 1;
        let t = now_us();
        probe
            .exec_drop("INSERT INTO probe (id, t_us) VALUES (?, ?)", (id, t))
            .await
            .expect("probe insert");
        // Poll the store until the probe row is visible (1 ms steps).
        loop {
            let seen: i64 = reader
                .query_row("SELECT COUNT(*) FROM silver_probe WHERE id = ?1", [id], |r| r.get(0))
                .unwrap_or(0);
            if seen > 0 {
                visible.push(now_us() - t);
                break;
            }
            if now_us() - t > 5_000_000 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = driver.await;
    shutdown.cancel();
    let _ = pipeline.await;
    visible.sort_unstable();
    println!(
        "commit-to-visible in SQLite (trigger_interval 10ms) at {rate} ERP load ({} probes): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        visible.len(),
        percentile(&visible, 0.5),
        percentile(&visible, 0.99),
        percentile(&visible, 1.0)
    );

    let _ = Command::new(&script).arg("stop").arg(dir.path()).status();
}
