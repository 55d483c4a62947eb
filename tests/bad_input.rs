//! Bad input is processed to the end: every bad line lands in quarantine with its
//! line number, reason and payload, and the counts are printed.

use crate::support::*;

#[test]
fn bad_lines_are_quarantined_with_line_numbers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good = std::fs::read_to_string(erpgen(2_000, 1)).expect("workload");
    let mut lines: Vec<String> = good.lines().map(str::to_owned).collect();
    let bad = [
        (100, "{\"topic\":\"erp_db.orders\",\"value\":{\"op\":\"c\"", "malformed_json"),
        (200, "this is not json", "malformed_json"),
        (
            300,
            r#"{"topic":"erp_db.invoices","key":{"id":1},"value":{"before":null,"after":{"id":1},"source":{"table":"invoices","file":"x.1","pos":1,"row":0},"op":"c","ts_ms":0}}"#,
            "unknown_table",
        ),
        (
            400,
            r#"{"topic":"erp_db.orders","key":{"id":1},"value":{"before":null,"after":{"id":1},"source":{"table":"orders"},"ts_ms":0}}"#,
            "missing_field",
        ),
        (
            500,
            r#"{"topic":"erp_db.order_items","key":{"id":1},"value":{"before":null,"after":{"id":1,"quantity":"three"},"source":{"table":"order_items"},"op":"c","ts_ms":0}}"#,
            "wrong_type",
        ),
    ];
    for (at, line, _) in bad {
        lines.insert(at - 1, line.to_owned());
    }
    let input = dir.path().join("bad.jsonl");
    std::fs::write(&input, lines.join("\n") + "\n").expect("write input");
    let store = dir.path().join("bad.db");
    let out = ok(caudal()
        .arg("run")
        .arg(erp_pipeline())
        .arg("--input")
        .arg(&input)
        .arg("--store")
        .arg(&store));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("5 unreadable"), "the counts are printed: {stderr}");
    assert!(stderr.contains("malformed_json=2"), "counts by reason are printed: {stderr}");

    let db = rusqlite::Connection::open(&store).expect("open store");
    for (at, line, reason) in bad {
        let (got_reason, payload): (String, String) = db
            .query_row(
                "SELECT reason, payload FROM quarantine WHERE stage = 'decode' AND origin = ?1",
                [at as i64],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap_or_else(|e| panic!("no quarantine record for line {at}: {e}"));
        assert_eq!(got_reason, reason, "line {at}");
        assert_eq!(payload, line, "the original payload is kept");
    }
    // The good lines all went through: the reference answer over them is unchanged.
    let want = dir.path().join("want");
    reference(&erpgen(2_000, 1), &want);
    let got = dir.path().join("got");
    export(&store, &got);
    let gold =
        |d: &std::path::Path| std::fs::read_to_string(d.join("gold_sales_10m.csv")).expect("gold");
    assert_eq!(gold(&want), gold(&got));
}
