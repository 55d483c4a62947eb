//! A crash at any moment loses nothing and doubles nothing: `caudal run` is killed
//! with SIGKILL at random points, restarted each time, and the final export equals
//! the reference.

use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};

use crate::support::*;

/// The ERP pipeline with frequent, small commits so kills land between and during them.
fn crashy_pipeline(dir: &std::path::Path, source: &str) -> std::path::PathBuf {
    let text = std::fs::read_to_string(erp_pipeline()).expect("read pipeline");
    let text = text
        .replace(
            "trigger_interval = \"1s\"",
            "trigger_interval = \"20ms\"\nmax_batch_events = 3000\nqueue_batches = 1",
        )
        .replace("[source]\ntype = \"file\"\npath = \"erp.jsonl\"\n", source);
    let path = dir.join("crashy.toml");
    std::fs::write(&path, text).expect("write pipeline");
    path
}

/// Events durably committed in the store so far.
fn committed(store: &std::path::Path) -> i64 {
    let Ok(db) = rusqlite::Connection::open(store) else { return 0 };
    db.query_row("SELECT event_count FROM caudal_checkpoint", [], |r| r.get(0)).unwrap_or(0)
}

/// Kills and restarts `caudal run` until it finishes by itself; returns how many
/// kills landed after some but not all events were committed.
fn run_with_kills(pipeline: &std::path::Path, store: &std::path::Path, seed: u64) -> usize {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut kills = 0;
    let mut mid_stream = 0;
    for attempt in 0..40 {
        let mut child = caudal()
            .arg("run")
            .arg(pipeline)
            .arg("--store")
            .arg(store)
            .arg("-q")
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn caudal run");
        let started = Instant::now();
        let wait = Duration::from_millis(rng.gen_range(15..250));
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                assert!(status.success(), "caudal run failed on attempt {attempt}: {status}");
                eprintln!("{kills} kills, {mid_stream} with a partial commit in the store");
                return mid_stream;
            }
            if started.elapsed() >= wait && attempt < 8 {
                child.kill().expect("SIGKILL");
                child.wait().expect("reap");
                kills += 1;
                if committed(store) > 0 {
                    mid_stream += 1;
                }
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    panic!("caudal run never finished");
}

#[test]
fn kill_nine_and_restart_gives_the_reference_answer() {
    let input = erpgen(100_000, 5);
    let dir = tempfile::tempdir().expect("tempdir");
    let (want, got, store) =
        (dir.path().join("want"), dir.path().join("got"), dir.path().join("erp.db"));
    reference(&input, &want);
    let source = format!("[source]\ntype = \"file\"\npath = {:?}\n", input.display().to_string());
    let pipeline = crashy_pipeline(dir.path(), &source);
    let kills = run_with_kills(&pipeline, &store, 42);
    assert!(kills >= 2, "the run was killed mid-stream several times ({kills})");
    export(&store, &got);
    assert_same_answer(&want, &got);
}

#[test]
fn simulator_source_resumes_after_kill_nine() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (want, got, store) =
        (dir.path().join("want"), dir.path().join("got"), dir.path().join("sim.db"));
    let events = 60_000;
    let file = dir.path().join("sim.jsonl");
    ok(caudal()
        .args(["simulate", "--events", &events.to_string(), "--seed", "9", "--out"])
        .arg(&file));
    reference(&file, &want);
    let source = format!(
        "[source]\ntype = \"simulate\"\nseed = 9\nrate = \"40000/s\"\nevents = {events}\nstart = \"2026-01-05T08:00:00Z\"\n"
    );
    let pipeline = crashy_pipeline(dir.path(), &source);
    let kills = run_with_kills(&pipeline, &store, 7);
    assert!(kills >= 1, "the run was killed at least once ({kills})");
    export(&store, &got);
    assert_same_answer(&want, &got);
}
