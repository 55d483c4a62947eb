//! The simulator's stream obeys the same contract as erpgen.py: the pipeline fed by
//! the simulator directly equals `reference.py` on the simulator's JSON lines.

use crate::support::*;

#[test]
fn simulated_stream_matches_the_reference_in_process_and_as_json() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("sim.jsonl");
    ok(caudal().args(["simulate", "--events", "40000", "--seed", "3", "--out"]).arg(&file));
    let want = dir.path().join("want");
    reference(&file, &want);

    // Through the file source.
    let bench_out = dir.path().join("bench");
    ok(caudal()
        .arg("bench")
        .arg("--input")
        .arg(&file)
        .arg("--out")
        .arg(&bench_out)
        .arg("--no-baseline"));
    assert_same_answer(&want, &bench_out);

    // Straight from the simulator into SQLite.
    let text = std::fs::read_to_string(erp_pipeline())
        .expect("read pipeline")
        .replace(
            "[source]\ntype = \"file\"\npath = \"erp.jsonl\"\n",
            "[source]\ntype = \"simulate\"\nseed = 3\nrate = \"max\"\nevents = 40000\nstart = \"2026-01-05T08:00:00Z\"\n",
        );
    let pipeline = dir.path().join("sim.toml");
    std::fs::write(&pipeline, text).expect("write pipeline");
    let store = dir.path().join("sim.db");
    ok(caudal().arg("run").arg(&pipeline).arg("--store").arg(&store).arg("-q"));
    let got = dir.path().join("got");
    export(&store, &got);
    assert_same_answer(&want, &got);
}

#[test]
fn demo_runs_and_resumes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("demo.db");
    let run = |events: &str| {
        ok(caudal()
            .args(["demo", "--no-serve", "--rate", "max", "--events", events, "--store"])
            .arg(&store));
    };
    run("8000");
    let db = rusqlite::Connection::open(&store).expect("open");
    let count = |db: &rusqlite::Connection| -> i64 {
        db.query_row("SELECT event_count FROM caudal_checkpoint", [], |r| r.get(0))
            .expect("checkpoint")
    };
    assert_eq!(count(&db), 8000);
    let windows: i64 =
        db.query_row("SELECT COUNT(*) FROM gold_sales_10m", [], |r| r.get(0)).expect("gold");
    assert!(windows > 0, "the demo fills the gold table");
    drop(db);
    // Running again resumes where it stopped: 8000 more, not 16000 from the start.
    run("16000");
    let db = rusqlite::Connection::open(&store).expect("open");
    assert_eq!(count(&db), 16000);
}
