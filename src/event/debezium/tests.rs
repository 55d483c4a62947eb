//! Golden-file tests of the envelope codec: the shared workload's lines decode into
//! typed changes and encode back byte for byte.

use std::path::Path;
use std::sync::Arc;

use super::*;
use crate::event::{Event, Op};

fn catalog() -> Arc<Catalog> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/examples/erp.toml");
    crate::config::load(&path).expect("the shipped ERP pipeline loads").catalog
}

fn golden(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/envelopes").join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn workload_lines_round_trip_byte_for_byte() {
    let catalog = catalog();
    let mut dec = Decoder::new(catalog.clone());
    let text = golden("erp_sample.jsonl");
    let mut ops = std::collections::HashSet::new();
    for (i, line) in text.lines().enumerate() {
        let Event::Change(change) = dec.decode(line.as_bytes(), i as u64 + 1, None) else {
            panic!("line {} did not decode: {line}", i + 1);
        };
        ops.insert(change.op);
        assert_eq!(encode_line(&catalog, &change), line, "line {}", i + 1);
    }
    assert_eq!(ops.len(), 4, "the sample covers r, c, u and d");
}

#[test]
fn decodes_types_exactly() {
    let catalog = catalog();
    let mut dec = Decoder::new(catalog.clone());
    let line = r#"{"before":null,"after":{"id":1,"order_id":2,"product_id":3,"quantity":4,"unit_price":12.10,"discount":"0.0500"},"source":{"db":"erp_db","table":"order_items","file":"mysql-bin.000002","pos":77,"row":1,"snapshot":false},"op":"c","ts_ms":5}"#;
    let Event::Change(c) = dec.decode(line.as_bytes(), 9, None) else { panic!("bad") };
    assert_eq!(c.op, Op::Insert);
    let row = c.after.unwrap();
    assert_eq!(row[4].to_string(), "12.10", "a decimal sent as a number keeps its digits");
    assert_eq!(row[5].to_string(), "0.0500");
    assert_eq!(
        c.source.position,
        Some(Position::Binlog { file: "mysql-bin.000002".into(), pos: 77, row: 1 })
    );
}

#[test]
fn keeps_undeclared_columns_as_extra() {
    let mut dec = Decoder::new(catalog());
    let line = r#"{"topic":"erp_db.payments","key":{"id":1},"value":{"before":null,"after":{"id":1,"order_id":2,"amount":"3.00","method":"card","status":"ok","paid_at":0,"note":"x \"y\""},"source":{"table":"payments","file":"f.1","pos":1,"row":0},"op":"c","ts_ms":0}}"#;
    let Event::Change(c) = dec.decode(line.as_bytes(), 1, None) else { panic!("bad") };
    assert_eq!(c.extra.as_deref(), Some(r#"{"note":"x \"y\""}"#));
}

#[test]
fn bad_lines_get_stable_reasons() {
    let mut dec = Decoder::new(catalog());
    let cases = [
        (r#"{"topic":"erp_db.orders","value":{"op":"c""#, reason::MALFORMED_JSON),
        ("not json", reason::MALFORMED_JSON),
        (
            r#"{"value":{"after":{"id":1},"source":{"table":"invoices"},"op":"c"}}"#,
            reason::UNKNOWN_TABLE,
        ),
        (r#"{"value":{"after":{"id":1},"source":{"table":"orders"}}}"#, reason::MISSING_FIELD),
        (r#"{"value":{"after":null,"source":{"table":"orders"},"op":"c"}}"#, reason::MISSING_FIELD),
        (r#"{"value":{"after":{"id":1},"op":"c"}}"#, reason::MISSING_FIELD),
        (
            r#"{"value":{"after":{"id":"one"},"source":{"table":"orders"},"op":"c"}}"#,
            reason::WRONG_TYPE,
        ),
        (
            r#"{"topic":"erp_db.order_items","value":{"after":{"id":1,"quantity":"x"},"source":{"table":"order_items"},"op":"c"}}"#,
            reason::WRONG_TYPE,
        ),
        (
            r#"{"value":{"after":{"id":1,"total":"12,5"},"source":{"table":"orders"},"op":"c"}}"#,
            reason::WRONG_TYPE,
        ),
        (
            r#"{"value":{"after":{"id":null},"source":{"table":"orders"},"op":"c"}}"#,
            reason::MISSING_KEY,
        ),
        (
            r#"{"value":{"after":{"id":1},"source":{"table":"orders"},"op":"x"}}"#,
            reason::INVALID_OP,
        ),
    ];
    for (line, want) in cases {
        match dec.decode(line.as_bytes(), 1, None) {
            Event::Bad(bad) => {
                assert_eq!(bad.reason, want, "{line}: {}", bad.detail);
                assert_eq!(bad.payload, line);
            }
            Event::Change(_) => panic!("decoded a bad line: {line}"),
        }
    }
}

#[test]
fn reads_schema_wrapped_and_bare_envelopes() {
    let mut dec = Decoder::new(catalog());
    let bare = r#"{"before":null,"after":{"id":5,"name":"Ana","email":"a@b.co","channel":"web","region":"sur","hired_at":19000},"source":{"table":"employees","snapshot":"true"},"op":"r","ts_ms":1}"#;
    let wrapped = format!(r#"{{"schema":{{"type":"struct"}},"payload":{bare}}}"#);
    for line in [bare.to_owned(), wrapped] {
        let Event::Change(c) = dec.decode(line.as_bytes(), 1, None) else { panic!("{line}") };
        assert_eq!(c.op, Op::Read);
        assert_eq!(c.source.snapshot, crate::event::Snapshot::True);
        assert_eq!(c.after.unwrap()[5].to_string(), "2022-01-08");
    }
}
