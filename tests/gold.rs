//! The gold job is exact: `caudal bench` and `caudal run` + `caudal export`
//! reproduce `reference.py` byte for byte.

use crate::support::*;

#[test]
fn bench_matches_the_reference_for_two_seeds() {
    for seed in [7, 11] {
        let input = erpgen(100_000, seed);
        let dir = tempfile::tempdir().expect("tempdir");
        let (want, got) = (dir.path().join("want"), dir.path().join("got"));
        reference(&input, &want);
        let out = ok(caudal().arg("bench").arg("--input").arg(&input).arg("--out").arg(&got));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("events/s"), "bench prints its figures: {text}");
        assert_same_answer(&want, &got);
    }
}

#[test]
fn run_into_sqlite_then_export_matches_the_reference() {
    let input = erpgen(100_000, 7);
    let dir = tempfile::tempdir().expect("tempdir");
    let (want, got, store) =
        (dir.path().join("want"), dir.path().join("got"), dir.path().join("erp.db"));
    reference(&input, &want);
    let run = || {
        ok(caudal()
            .arg("run")
            .arg(erp_pipeline())
            .arg("--input")
            .arg(&input)
            .arg("--store")
            .arg(&store)
            .arg("-q"))
    };
    run();
    export(&store, &got);
    assert_same_answer(&want, &got);

    // Running again over the same file is a no-op: everything is already committed.
    run();
    let again = dir.path().join("again");
    export(&store, &again);
    assert_same_answer(&want, &again);

    // Silver holds the clean current state: every current order line that passed its checks.
    let db = rusqlite::Connection::open(&store).expect("open store");
    let lines: i64 = db
        .query_row("SELECT COUNT(*) FROM silver_order_items", [], |r| r.get(0))
        .expect("count silver");
    assert!(lines > 10_000, "silver_order_items has the current lines ({lines})");
    let dirty_emails: i64 = db
        .query_row(
            "SELECT COUNT(*) FROM silver_customers WHERE email <> lower(trim(email))",
            [],
            |r| r.get(0),
        )
        .expect("count emails");
    assert_eq!(dirty_emails, 0, "emails are trimmed and lowercased");
}
