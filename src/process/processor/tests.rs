//! Invariants of the processor: the gold answer depends only on the changes, not
//! on how they are batched or how often they are re-delivered; retracting what was
//! added is a no-op; a dimension arriving after its facts releases them.

use std::path::Path;
use std::sync::Arc;

use proptest::prelude::*;

use super::*;
use crate::event::debezium::Decoder;
use crate::store::export;

fn spec() -> Arc<PipelineSpec> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/examples/erp.toml");
    Arc::new(crate::config::load(&path).expect("the shipped pipeline loads"))
}

fn golden(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/envelopes").join(name);
    std::fs::read_to_string(path).expect("golden file")
}

fn sample_events(spec: &PipelineSpec) -> Vec<Event> {
    let mut dec = Decoder::new(spec.catalog.clone());
    golden("erp_sample.jsonl")
        .lines()
        .enumerate()
        .map(|(i, l)| dec.decode(l.as_bytes(), i as u64 + 1, None))
        .collect()
}

/// Runs `events` split into batches of the given sizes; returns the two CSVs.
fn run(
    spec: &Arc<PipelineSpec>,
    events: Vec<Event>,
    sizes: &[usize],
    emit: bool,
) -> (String, String) {
    let mut p = Processor::new(spec.clone(), emit);
    let mut it = events.into_iter().peekable();
    let mut k = 0;
    while it.peek().is_some() {
        let n = sizes.get(k % sizes.len().max(1)).copied().unwrap_or(1).max(1);
        k += 1;
        let batch: Vec<Event> = it.by_ref().take(n).collect();
        p.process(Batch {
            events: batch,
            checkpoint: Checkpoint::default(),
            bytes: None,
            caught_up_ms: None,
        });
        if emit {
            let _ = p.flush();
        }
    }
    csvs(spec, &p)
}

fn csvs(spec: &PipelineSpec, p: &Processor) -> (String, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    export::write_gold(dir.path(), &spec.gold[0], p.gold_rows(0)).expect("write");
    export::write_quarantine_summary(dir.path(), p.quarantine_summary()).expect("write");
    let read = |n: &str| std::fs::read_to_string(dir.path().join(n)).expect("read");
    (read("gold_sales_10m.csv"), read("quarantine_summary.csv"))
}

#[test]
fn matches_the_reference_on_the_golden_sample() {
    let spec = spec();
    let (gold, quarantine) = run(&spec, sample_events(&spec), &[usize::MAX], false);
    assert_eq!(gold, golden("erp_sample.gold_sales_10m.csv"));
    assert_eq!(quarantine, golden("erp_sample.quarantine_summary.csv"));
}

#[test]
fn emitting_output_does_not_change_the_answer() {
    let spec = spec();
    let (gold, quarantine) = run(&spec, sample_events(&spec), &[7, 100, 1], true);
    assert_eq!(gold, golden("erp_sample.gold_sales_10m.csv"));
    assert_eq!(quarantine, golden("erp_sample.quarantine_summary.csv"));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Re-deliveries anywhere after the original, and any batching, give the same gold.
    #[test]
    fn redeliveries_and_batch_sizes_never_change_gold(
        dups in proptest::collection::vec((0usize..1500, 1usize..600), 0..60),
        sizes in proptest::collection::vec(1usize..400, 1..6),
        emit in any::<bool>(),
    ) {
        let spec = spec();
        let mut events = sample_events(&spec);
        for (from, gap) in dups {
            if from < events.len() {
                let copy = events[from].clone();
                let at = (from + gap).min(events.len());
                events.insert(at, copy);
            }
        }
        let (gold, quarantine) = run(&spec, events, &sizes, emit);
        prop_assert_eq!(gold, golden("erp_sample.gold_sales_10m.csv"));
        prop_assert_eq!(quarantine, golden("erp_sample.quarantine_summary.csv"));
    }
}

fn change(spec: &PipelineSpec, line: &str) -> Event {
    Decoder::new(spec.catalog.clone()).decode(line.as_bytes(), 1, None)
}

fn item(id: i64, product: i64, qty: i64, pos: u64, op: &str) -> String {
    let row = format!(
        r#"{{"id":{id},"order_id":1,"product_id":{product},"quantity":{qty},"unit_price":"10.00","discount":null}}"#
    );
    let (before, after) = if op == "d" { (row.as_str(), "null") } else { ("null", row.as_str()) };
    format!(
        r#"{{"value":{{"before":{before},"after":{after},"source":{{"table":"order_items","file":"b.000001","pos":{pos},"row":0}},"op":"{op}"}}}}"#
    )
}

fn order(status: &str, pos: u64) -> String {
    format!(
        r#"{{"value":{{"after":{{"id":1,"customer_id":1,"employee_id":1,"channel":"web","status":"{status}","order_ts":1767600000000,"currency":"PEN","total":"1.00","city":null}},"source":{{"table":"orders","file":"b.000001","pos":{pos},"row":0}},"op":"c"}}}}"#
    )
}

fn product(pos: u64) -> String {
    format!(
        r#"{{"value":{{"after":{{"id":5,"sku":"S","name":"n","category":"toys","unit_price":"10.00","active":1,"updated_at":0}},"source":{{"table":"products","file":"b.000001","pos":{pos},"row":0}},"op":"c"}}}}"#
    )
}

fn feed(p: &mut Processor, spec: &PipelineSpec, lines: &[String]) {
    let events = lines.iter().map(|l| change(spec, l)).collect();
    p.process(Batch { events, checkpoint: Checkpoint::default(), bytes: None, caught_up_ms: None });
}

#[test]
fn facts_wait_for_their_dimensions_and_retract_on_cancel() {
    let spec = spec();
    let mut p = Processor::new(spec.clone(), true);
    // A line before its product and its order: quarantined as unknown_product for now.
    feed(&mut p, &spec, &[item(1, 5, 2, 10, "c")]);
    assert_eq!(p.quarantine_summary(), vec![("unknown_product".to_string(), 1)]);
    // The product arrives: the line leaves quarantine and waits for its order.
    feed(&mut p, &spec, &[product(11)]);
    assert!(p.quarantine_summary().is_empty());
    assert!(p.gold_rows(0).is_empty());
    // The order arrives: the line counts.
    feed(&mut p, &spec, &[order("pending", 12)]);
    let rows = p.gold_rows(0);
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].2[2].to_string(), "20.00");
    // Cancelled: retracted. Back to pending: counted again.
    feed(&mut p, &spec, &[order("cancelled", 13)]);
    assert!(p.gold_rows(0).is_empty());
    feed(&mut p, &spec, &[order("paid", 14)]);
    assert_eq!(p.gold_rows(0).len(), 1);
    // Deleting the line removes it.
    feed(&mut p, &spec, &[item(1, 5, 2, 15, "d")]);
    assert!(p.gold_rows(0).is_empty());
    let commit = p.flush();
    let resolves =
        commit.quarantine.iter().filter(|q| matches!(q, QuarantineOp::Resolve { .. })).count();
    assert_eq!(resolves, 1, "the unknown_product record was resolved");
    assert!(commit.gold.iter().any(|g| g.measures.is_none()), "the emptied window is deleted");
}

#[test]
fn an_update_that_fixes_a_line_leaves_quarantine() {
    let spec = spec();
    let mut p = Processor::new(spec.clone(), false);
    feed(&mut p, &spec, &[product(1), order("paid", 2), item(7, 5, 0, 3, "c")]);
    assert_eq!(p.quarantine_summary(), vec![("invalid_quantity".to_string(), 1)]);
    feed(&mut p, &spec, &[item(7, 5, 3, 4, "u")]);
    assert!(p.quarantine_summary().is_empty());
    assert_eq!(p.gold_rows(0)[0].2[1], Value::Int(3));
}

#[test]
fn unreadable_lines_are_quarantined_not_dropped() {
    let spec = spec();
    let mut p = Processor::new(spec.clone(), true);
    feed(&mut p, &spec, &["{oops".to_string()]);
    let commit = p.flush();
    assert_eq!(p.stats().bad_events, 1);
    match &commit.quarantine[..] {
        [QuarantineOp::Open(r)] => {
            assert_eq!(&*r.reason, "malformed_json");
            assert_eq!(r.payload, "{oops");
        }
        other => panic!("expected one record, got {other:?}"),
    }
}

#[test]
fn an_update_of_the_primary_key_moves_the_row() {
    let spec = spec();
    let mut p = Processor::new(spec.clone(), true);
    feed(&mut p, &spec, &[product(1), order("paid", 2), item(7, 5, 2, 3, "c")]);
    let moved = r#"{"value":{"before":{"id":7,"order_id":1,"product_id":5,"quantity":2,"unit_price":"10.00","discount":null},"after":{"id":8,"order_id":1,"product_id":5,"quantity":2,"unit_price":"10.00","discount":null},"source":{"table":"order_items","file":"b.000001","pos":4,"row":0},"op":"u"}}"#;
    feed(&mut p, &spec, &[moved.to_string()]);
    let rows = p.gold_rows(0);
    assert_eq!(rows[0].2[0], Value::Int(1), "one line, not two");
    let commit = p.flush();
    let deleted = commit.silver.iter().any(|s| s.key == Key::Int(7) && s.row.is_none());
    let inserted = commit.silver.iter().any(|s| s.key == Key::Int(8) && s.row.is_some());
    assert!(deleted && inserted, "silver moves the row from key 7 to key 8");
}

fn inline_spec(toml: &str) -> Arc<PipelineSpec> {
    Arc::new(crate::config::parse(Path::new("t.toml"), toml).expect("valid pipeline"))
}

fn line(table: &str, op: &str, row: &str, pos: u64) -> String {
    let (before, after) = if op == "d" { (row, "null") } else { ("null", row) };
    format!(
        r#"{{"value":{{"before":{before},"after":{after},"source":{{"table":"{table}","file":"b.1","pos":{pos},"row":0}},"op":"{op}"}}}}"#
    )
}

const TWO_LOOKUPS: &str = r#"
[source]
type = "file"
path = "x"
[tables.dims]
key = ["id"]
columns = { id = "uint", cat = "string", t = "timestamp" }
[tables.facts]
key = ["id"]
columns = { id = "int", a = "uint", b = "uint" }
lookups = [
  { name = "da", table = "dims", on = { a = "id" } },
  { name = "db", table = "dims", on = { b = "id" } },
]
[[gold]]
name = "g"
table = "facts"
time = "da.t"
group_by = ["da.cat"]
measures = ["count() as n", "max(db.cat) as m"]
"#;

#[test]
fn regression_a_fact_reaching_a_row_twice_is_recomputed_once_and_uint_keys_join() {
    let spec = inline_spec(TWO_LOOKUPS);
    let mut p = Processor::new(spec.clone(), false);
    feed(
        &mut p,
        &spec,
        &[
            line("dims", "c", r#"{"id":1,"cat":"x","t":0}"#, 1),
            line("facts", "c", r#"{"id":1,"a":1,"b":1}"#, 2),
            line("dims", "u", r#"{"id":1,"cat":"y","t":0}"#, 3),
        ],
    );
    let rows = p.gold_rows(0);
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].1, vec![Value::Str("y".into())]);
    assert_eq!(rows[0].2[0], Value::Int(1));
}

#[test]
fn regression_a_delete_finds_a_row_whose_key_was_fixed() {
    let spec = inline_spec(
        r#"
[source]
type = "file"
path = "x"
[tables.items]
key = ["sku"]
columns = { sku = "string", t = "timestamp" }
rules = [{ column = "sku", fix = ["upper"] }]
[[gold]]
name = "g"
table = "items"
time = "t"
measures = ["count() as n"]
"#,
    );
    let mut p = Processor::new(spec.clone(), true);
    feed(&mut p, &spec, &[line("items", "c", r#"{"sku":"ab","t":0}"#, 1)]);
    assert_eq!(p.gold_rows(0).len(), 1);
    feed(&mut p, &spec, &[line("items", "d", r#"{"sku":"ab","t":0}"#, 2)]);
    assert!(p.gold_rows(0).is_empty(), "the delete found the row stored as `AB`");
}

/// Events of two transport partitions interleave: positions are ordered within each,
/// not across them, so one partition's lower positions are not duplicates of the
/// other's; a re-delivery within a partition still is, also after a restart.
/// A change of `line` as it came through the transport partition `part`.
fn in_partition(spec: &PipelineSpec, line: &str, part: &str) -> Event {
    let mut e = change(spec, line);
    if let Event::Change(c) = &mut e {
        c.source.partition = Some(part.into());
    }
    e
}

/// A batch of `events` without a checkpoint.
fn batch(events: Vec<Event>) -> Batch {
    Batch { events, checkpoint: Checkpoint::default(), bytes: None, caught_up_ms: None }
}

#[test]
fn dedup_keeps_one_mark_per_transport_partition() {
    let spec = spec();
    let on = |line: String, part: &str| in_partition(&spec, &line, part);
    let mut p = Processor::new(spec.clone(), true);
    p.process(batch(vec![
        on(product(20), "erp_db.products/0"),
        on(order("paid", 30), "erp_db.orders/0"),
        // Lower than the positions above, but in its own partition: new.
        on(item(1, 5, 2, 10, "c"), "erp_db.order_items/1"),
        on(item(2, 5, 3, 11, "c"), "erp_db.order_items/1"),
    ]));
    assert_eq!(p.gold_rows(0).len(), 1);
    assert_eq!(p.gold_rows(0)[0].2[2].to_string(), "50.00");
    // A re-delivery of line 1 in its partition is a duplicate.
    p.process(batch(vec![on(item(1, 5, 2, 10, "c"), "erp_db.order_items/1")]));
    assert_eq!(p.gold_rows(0)[0].2[2].to_string(), "50.00");
    let commit = p.flush();
    assert!(commit.state.contains("erp_db.order_items/1"), "{}", commit.state);
}

#[test]
fn a_commit_with_nothing_new_keeps_the_last_checkpoint() {
    let spec = spec();
    let mut p = Processor::new(spec.clone(), true);
    let at = Checkpoint(r#"{"file":"mysql-bin.000001","pos":991}"#.into());
    p.process(Batch {
        events: vec![change(&spec, &product(20))],
        checkpoint: at.clone(),
        bytes: None,
        caught_up_ms: None,
    });
    assert_eq!(p.flush().checkpoint, at);
    // The shutdown commit: no batch since the last one.
    let last = p.flush();
    assert_eq!((last.checkpoint, last.event_count), (at, 0));
}

/// Group mode: gold is kept per fact partition; a dimension read for lookups
/// (`state:`) changes this worker's facts but writes no silver of its own, and a
/// dimension of an assigned partition writes silver but changes no state.
#[test]
fn group_mode_keeps_gold_per_partition_and_splits_dimension_roles() {
    let spec = spec();
    let on = |line: String, part: &str| in_partition(&spec, &line, part);
    let mut p = Processor::new(spec.clone(), true);
    p.set_group_mode();
    let orders = spec.catalog.id("orders").expect("orders");
    p.process(batch(vec![
        on(product(20), "state:erp_db.products/0"),
        on(order("paid", 30), "state:erp_db.orders/0"),
        on(item(1, 5, 2, 10, "c"), "erp_db.order_items/1"),
        on(item(2, 5, 3, 11, "c"), "erp_db.order_items/2"),
    ]));
    let commit = p.flush();
    let mut shares: Vec<(Option<String>, String)> = commit
        .gold
        .iter()
        .filter_map(|g| {
            let m = g.measures.as_ref()?;
            Some((g.partition.as_deref().map(str::to_owned), m[2].to_string()))
        })
        .collect();
    shares.sort();
    assert_eq!(
        shares,
        vec![
            (Some("erp_db.order_items/1".to_owned()), "20.00".to_owned()),
            (Some("erp_db.order_items/2".to_owned()), "30.00".to_owned()),
        ],
        "one gold share per fact partition"
    );
    assert!(
        commit.silver.iter().all(|s| s.table != orders),
        "a dimension read for lookups writes no silver"
    );
    // The order's own partition, assigned to this worker: silver, no state change.
    p.process(batch(vec![on(order("cancelled", 31), "erp_db.orders/0")]));
    let commit = p.flush();
    assert!(commit.silver.iter().any(|s| s.table == orders && s.row.is_some()));
    assert!(commit.gold.is_empty(), "gold follows the lookup stream, not the assigned one");
    // The same change through the lookup stream retracts both shares.
    p.process(batch(vec![on(order("cancelled", 31), "state:erp_db.orders/0")]));
    assert!(p.gold_rows(0).is_empty());
    let commit = p.flush();
    let deleted: Vec<_> = commit
        .gold
        .iter()
        .filter(|g| g.measures.is_none())
        .filter_map(|g| g.partition.as_deref())
        .collect();
    assert!(deleted.contains(&"erp_db.order_items/1") && deleted.contains(&"erp_db.order_items/2"));
}

/// A gold row carries, per `avg` measure, the exact sum and count behind the
/// average, so that stores keeping shares per partition can merge averages.
#[test]
fn gold_rows_carry_the_sum_and_count_of_each_average() {
    let spec = inline_spec(
        r#"
[source]
type = "file"
path = "x"
[tables.items]
key = ["id"]
columns = { id = "int", price = "decimal", t = "timestamp" }
[[gold]]
name = "g"
table = "items"
time = "t"
measures = ["count() as n", "avg(price) as mean", "max(price) as high", "avg(id) as mean_id"]
"#,
    );
    let mut p = Processor::new(spec.clone(), true);
    feed(
        &mut p,
        &spec,
        &[
            line("items", "c", r#"{"id":1,"price":"9.50","t":0}"#, 1),
            line("items", "c", r#"{"id":2,"price":"10.00","t":0}"#, 2),
            line("items", "c", r#"{"id":3,"price":null,"t":0}"#, 3),
        ],
    );
    let commit = p.flush();
    assert_eq!(commit.gold.len(), 1);
    let d = |s: &str| rust_decimal::Decimal::from_str_exact(s).expect("decimal");
    assert_eq!(&*commit.gold[0].avg_parts, &[(d("19.50"), 2), (d("6"), 3)]);
    feed(&mut p, &spec, &[line("items", "d", r#"{"id":1,"price":"9.50","t":0}"#, 4)]);
    let commit = p.flush();
    assert_eq!(&*commit.gold[0].avg_parts, &[(d("10.00"), 1), (d("5"), 2)]);
}
