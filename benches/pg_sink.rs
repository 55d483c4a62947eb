//! PostgreSQL sink throughput against a throwaway server (`scripts/postgres`).
//!
//! 1. Sink rows/s on `order_items` rows: one large commit (the COPY path), the same
//!    rows again as updates, and the same rows in commits of 1,000 (the steady-state
//!    `unnest` path, one transaction each).
//! 2. The limit: a plain binary `COPY` of the same rows into a table of the same
//!    shape and primary key, in one transaction.
//! 3. End to end: the ERP workload (`erpgen.py --events N --seed 7`) through
//!    `caudal`'s pipeline into PostgreSQL, events/s.
//!
//! `cargo bench --bench pg_sink -- [--rows N] [--events N]`
//! Prints figures; asserts nothing about them.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use rust_decimal::Decimal;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{ToSql, Type};
use tokio_util::sync::CancellationToken;

use caudal::config::{self, spec::SourceSpec, spec::StoreSpec};
use caudal::event::output::{Commit, SilverChange, SilverRow};
use caudal::event::{Checkpoint, Key, Value};
use caudal::store::postgres::PostgresSink;
use caudal::store::Sink;
use caudal::topology::{self, RunOptions};

mod common;
use common::arg;

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/postgres")
}

struct Server(tempfile::TempDir);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = Command::new(script()).arg("stop").arg(self.0.path()).output();
    }
}

fn line(id: i64, round: i64) -> Vec<Value> {
    vec![
        Value::Int(id),
        Value::Int(id / 3),
        Value::Int(id % 1000),
        Value::Int(1 + id % 7 + round),
        Value::Decimal(Decimal::new(1999 + id % 500, 2)),
        Value::Decimal(Decimal::new(5, 2)),
    ]
}

fn commit(n: u64, table: usize, ids: std::ops::RangeInclusive<i64>, round: i64) -> Commit {
    Commit {
        checkpoint: Checkpoint(format!(r#"{{"offset":{n}}}"#)),
        state: "{}".into(),
        event_count: 1,
        silver: ids
            .map(|id| SilverChange {
                table,
                key: Key::Int(id),
                row: Some(SilverRow {
                    values: line(id, round).into_boxed_slice(),
                    flags: None,
                    extra: None,
                    position: Some(format!("f:{id}")),
                    source_ts_ms: id,
                    partition: None,
                }),
            })
            .collect(),
        ..Commit::default()
    }
}

fn rate(label: &str, rows: i64, started: Instant) -> f64 {
    let secs = started.elapsed().as_secs_f64();
    let r = rows as f64 / secs;
    println!("{label}: {rows} rows in {secs:.3} s = {r:.0} rows/s");
    r
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let rows: i64 = arg("--rows", "200000").parse().expect("--rows N");
    let events: u64 = arg("--events", "100000").parse().expect("--events N");

    let server = Server(tempfile::tempdir().expect("tempdir"));
    let out = Command::new(script()).arg("start").arg(server.0.path()).output().expect("postgres");
    assert!(out.status.success(), "scripts/postgres: {}", String::from_utf8_lossy(&out.stderr));
    let url = String::from_utf8_lossy(&out.stdout).trim().to_owned();

    let erp = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/examples/erp.toml");
    let spec = Arc::new(config::load(&erp).expect("erp.toml"));
    let items = spec.catalog.id("order_items").expect("order_items");

    // 1. The sink.
    let mut sink = PostgresSink::new(&url, spec.clone(), "bench").expect("sink");
    sink.healthcheck().await.expect("healthcheck");
    let started = Instant::now();
    sink.write(Arc::new(commit(1, items, 1..=rows, 0))).await.expect("insert");
    let insert = rate("sink, one commit, insert (COPY path)", rows, started);
    let started = Instant::now();
    sink.write(Arc::new(commit(2, items, 1..=rows, 1))).await.expect("update");
    rate("sink, one commit, update (COPY path)", rows, started);
    let started = Instant::now();
    let per = 1000;
    for (i, first) in (1..=rows).step_by(per as usize).enumerate() {
        let c = commit(3 + i as u64, items, first..=(first + per - 1).min(rows), 2);
        sink.write(Arc::new(c)).await.expect("steady commit");
    }
    rate("sink, commits of 1000, update (unnest path)", rows, started);

    // 2. The limit: plain COPY of the same rows into an empty table of the same shape.
    let (mut client, conn) =
        tokio_postgres::connect(&url, tokio_postgres::NoTls).await.expect("connect");
    tokio::spawn(conn);
    client
        .batch_execute(
            "CREATE TABLE copy_baseline (id BIGINT PRIMARY KEY, order_id BIGINT, product_id BIGINT, \
             quantity BIGINT, unit_price NUMERIC, discount NUMERIC, _flags TEXT, _extra TEXT, \
             _position TEXT, _source_ts_ms BIGINT, _updated_at TIMESTAMP)",
        )
        .await
        .expect("baseline table");
    let types = [
        Type::INT8,
        Type::INT8,
        Type::INT8,
        Type::INT8,
        Type::NUMERIC,
        Type::NUMERIC,
        Type::TEXT,
        Type::TEXT,
        Type::TEXT,
        Type::INT8,
    ];
    let started = Instant::now();
    let tx = client.transaction().await.expect("begin");
    let sink_in = tx
        .copy_in(
            "COPY copy_baseline (id, order_id, product_id, quantity, unit_price, discount, \
             _flags, _extra, _position, _source_ts_ms) FROM STDIN (FORMAT binary)",
        )
        .await
        .expect("copy");
    let writer = BinaryCopyInWriter::new(sink_in, &types);
    let mut writer = std::pin::pin!(writer);
    for id in 1..=rows {
        let (order, product, qty) = (id / 3, id % 1000, 1 + id % 7);
        let (price, discount) = (Decimal::new(1999 + id % 500, 2), Decimal::new(5, 2));
        let (none, position) = (None::<&str>, format!("f:{id}"));
        let row: [&(dyn ToSql + Sync); 10] =
            [&id, &order, &product, &qty, &price, &discount, &none, &none, &position, &id];
        writer.as_mut().write(&row).await.expect("copy row");
    }
    writer.finish().await.expect("copy finish");
    tx.commit().await.expect("commit");
    let copy = rate("plain COPY into an empty table (the limit)", rows, started);
    println!("sink insert / plain COPY: {:.0}%", 100.0 * insert / copy);

    // 3. End to end, in a database of its own (the rows above are not ERP data).
    client.batch_execute("CREATE DATABASE e2e").await.expect("create database");
    let e2e_url = format!("{}/e2e", url.strip_suffix("/postgres").expect("url ends in /postgres"));
    let workload = std::env::var_os("CAUDAL_WORKLOAD_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/workload"));
    let input = server.0.path().join("erp.jsonl");
    let out = Command::new("python3")
        .arg(workload.join("erpgen.py"))
        .args(["--events", &events.to_string(), "--seed", "7"])
        .output()
        .expect("python3 runs erpgen.py");
    assert!(out.status.success(), "erpgen.py: {}", String::from_utf8_lossy(&out.stderr));
    std::fs::write(&input, &out.stdout).expect("write workload");
    let mut spec = config::load(&erp).expect("erp.toml");
    spec.source = SourceSpec::File { path: input, follow: false };
    spec.store = Some(StoreSpec::Postgres { url: e2e_url, stream: "e2e".into() });
    let summary = topology::run(
        Arc::new(spec),
        RunOptions { use_store: true, ..RunOptions::default() },
        CancellationToken::new(),
        None,
    )
    .await
    .expect("pipeline run");
    let secs = summary.elapsed.as_secs_f64();
    println!(
        "pipeline into postgres: {} events in {secs:.3} s = {:.0} events/s",
        summary.committed_events,
        summary.committed_events as f64 / secs
    );
}
