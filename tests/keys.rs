//! Rows keyed by a decimal: a whole value such as `5.00` matches as the integer 5
//! (so that integer foreign keys find it), yet a store that keeps decimals as text
//! must delete the row it stored as `5.00`. Each store, after inserts, an update and
//! deletes, holds exactly the rows the source still has.

use std::path::Path;

use crate::support::mariadb::MariaDb;
use crate::support::postgres::Postgres;
use crate::support::*;

const PIPELINE: &str = r#"
[pipeline]
name = "keys"

[source]
type = "file"
path = "keys.jsonl"

[tables.rates]
key = ["code"]
columns = { code = "decimal", label = "string" }
"#;

fn line(pos: u64, op: &str, before: Option<(&str, &str)>, after: Option<(&str, &str)>) -> String {
    let image = |r: Option<(&str, &str)>| {
        r.map_or("null".to_owned(), |(code, label)| {
            format!(r#"{{"code":"{code}","label":"{label}"}}"#)
        })
    };
    format!(
        r#"{{"topic":"erp_db.rates","value":{{"before":{},"after":{},"source":{{"table":"rates","file":"b.000001","pos":{pos},"row":0}},"op":"{op}","ts_ms":0}}}}"#,
        image(before),
        image(after)
    )
}

/// The source's history; afterwards it holds 7.50 and 9.00 (`nine`).
fn history() -> Vec<String> {
    vec![
        line(10, "c", None, Some(("5.00", "five"))),
        line(20, "c", None, Some(("7.50", "seven and a half"))),
        line(30, "c", None, Some(("9.00", "9"))),
        line(40, "c", None, Some(("12.00", "twelve"))),
        line(50, "u", Some(("9.00", "9")), Some(("9.00", "nine"))),
        line(60, "d", Some(("5.00", "five")), None),
        line(70, "d", Some(("12.00", "twelve")), None),
    ]
}

const WANT: &str = "7.50:seven and a half,9.00:nine";

/// Two runs: the inserts and the update are stored (committed) first, the deletes
/// come in the second run, which resumes after them. (Within one commit an insert
/// and its delete cancel out before reaching the store.)
fn run_into(dir: &Path, store: &str) {
    let pipeline = dir.join("keys.toml");
    std::fs::write(&pipeline, PIPELINE).expect("write pipeline");
    let input = dir.join("keys.jsonl");
    let lines = history();
    for upto in [5, lines.len()] {
        std::fs::write(&input, lines[..upto].join("\n") + "\n").expect("write input");
        ok(caudal().arg("run").arg(&pipeline).arg("--input").arg(&input).arg("--store").arg(store));
    }
}

#[test]
fn rows_keyed_by_a_whole_decimal_are_deleted_in_every_store() {
    let dir = tempfile::tempdir().expect("tempdir");

    let sqlite = dir.path().join("keys.db");
    run_into(dir.path(), &sqlite.to_string_lossy());
    let db = rusqlite::Connection::open(&sqlite).expect("open store");
    let got: String = db
        .query_row(
            "SELECT group_concat(code || ':' || label, ',') FROM \
             (SELECT code, label FROM silver_rates ORDER BY CAST(code AS REAL))",
            [],
            |r| r.get(0),
        )
        .expect("read silver");
    assert_eq!(got, WANT, "sqlite");

    let pg = Postgres::start();
    run_into(dir.path(), pg.url());
    let got = pg.query_text(
        "SELECT string_agg(code::text || ':' || label, ',' ORDER BY code) FROM silver_rates",
    );
    assert_eq!(got.as_deref(), Some(WANT), "postgres");

    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let maria = MariaDb::start();
    runtime.block_on(maria.create_db("keys"));
    run_into(dir.path(), &maria.url("keys"));
    let got: Option<String> = runtime.block_on(async {
        use mysql_async::prelude::Queryable;
        let mut conn = maria.conn("keys").await;
        conn.query_first(
            "SELECT GROUP_CONCAT(CONCAT(code, ':', label) ORDER BY CAST(code AS DECIMAL(65,30)) \
             SEPARATOR ',') FROM silver_rates",
        )
        .await
        .expect("read silver")
    });
    assert_eq!(got.as_deref(), Some(WANT), "mysql");
}
