//! The processor: dedup -> clean -> enrich -> windows, with retractions.
//!
//! Gold is defined on the *current* state of the source tables, so the processor
//! keeps the current rows of the tables it needs (fact tables with lookups or gold,
//! and the dimension tables they look up) and maintains, for every fact row, its
//! *contribution*: nothing (waiting for a dimension, or filtered out), a quarantine
//! reason, or one input per gold table in one (window, group). Whenever a change
//! alters a fact row or a dimension row it depends on, the old contribution is
//! retracted and the new one added. Whatever order changes arrive in, the result
//! equals the gold query over the final tables.
//!
//! Synchronous on purpose: no I/O, no wall clock. The topology feeds it batches and
//! asks it for a [`Commit`] when a micro-batch is due.

use std::collections::BTreeMap;

// ahash: the maps here are on the per-event hot path and keyed by our own values;
// SipHash cost about a tenth of the processor's time.
type HashMap<K, V> = std::collections::HashMap<K, V, ahash::RandomState>;
type HashSet<K> = std::collections::HashSet<K, ahash::RandomState>;
use std::sync::Arc;

use super::clean::{clean, Verdict};
use super::dedup::{Dedup, DedupState};
use super::expr::{eval, is_integer, is_true, lookup_schemas, Scope};
use super::keymap::KeyMap;
use super::window::{Accumulator, GroupState};
use crate::config::spec::{ColRef, Missing, PipelineSpec};
use crate::event::debezium::{self, Decoder};
use crate::event::output::{
    Commit, GoldChange, QuarantineOp, QuarantineRecord, SilverChange, SilverRow, Stage,
};
use crate::event::{
    BadEvent, Batch, Change, Checkpoint, Event, Key, Op, Row, TableId, Value,
    STATE_PARTITION_PREFIX,
};

/// A current row kept in memory, with the reason it failed its checks, if it did.
#[derive(Debug, Clone)]
struct Stored {
    row: Row,
    failed: Option<Arc<str>>,
    /// The fact partition the row belongs to (an index into `Processor::part_names`;
    /// 0 outside group mode), which its gold contribution is kept under.
    part: u32,
}

#[derive(Debug, Default)]
struct TableState {
    /// Whether rows of this table are kept (fact or dimension of a lookup).
    kept: bool,
    rows: KeyMap<Stored>,
    /// Columns the kept rows need (keys, join columns, columns expressions read);
    /// the others are nulled in memory, which frees their strings. Silver keeps them.
    needed: Vec<bool>,
}

/// What a fact table needs beyond its rows.
#[derive(Debug, Default)]
struct FactPlan {
    /// Per lookup: dimension key -> fact keys that reference it.
    index: Vec<KeyMap<Vec<Key>>>,
    /// Per lookup: the dimension columns that expressions read.
    used: Vec<Vec<usize>>,
    /// Per lookup: the dimension columns read only by filters that read nothing but
    /// this lookup. When only such columns change and no filter flips, the facts of
    /// that dimension row contribute exactly as before (an order going from `paid`
    /// to `shipped`), and are not recomputed.
    filter_only: Vec<Vec<usize>>,
    /// Gold specs aggregating this table.
    golds: Vec<usize>,
}

#[derive(Debug, Default)]
struct GoldState {
    /// Hash of a group's values -> ids of the groups with that hash. Looked up with
    /// borrowed values, so finding an existing group clones no string.
    group_ids: HashMap<u64, Vec<u32>>,
    group_hasher: ahash::RandomState,
    groups: Vec<Box<[Value]>>,
    /// (fact partition, window start, group) -> accumulators. The partition is 0
    /// except in group mode, where each fact partition keeps its own share.
    windows: HashMap<Slot, GroupState>,
    integer: Vec<bool>,
    dirty: HashSet<Slot>,
}

impl GoldState {
    fn group_hash(&self, values: &[std::borrow::Cow<'_, Value>]) -> u64 {
        use std::hash::{BuildHasher, Hash, Hasher};
        let mut h = self.group_hasher.build_hasher();
        for v in values {
            (**v).hash(&mut h);
        }
        h.finish()
    }

    fn find_group(&self, values: &[std::borrow::Cow<'_, Value>]) -> Option<u32> {
        let ids = self.group_ids.get(&self.group_hash(values))?;
        ids.iter().copied().find(|id| {
            let g = &self.groups[*id as usize];
            g.len() == values.len() && g.iter().zip(values).all(|(a, b)| a == &**b)
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
enum GroupRef {
    Known(u32),
    New(Box<[Value]>),
}

/// A gold row's place: (fact partition, window start, group id).
type Slot = (u32, i64, u32);

#[derive(Debug, Clone, PartialEq)]
struct GoldPart {
    gold: usize,
    part: u32,
    window: i64,
    group: GroupRef,
    inputs: Vec<Value>,
}

/// What one fact row currently adds to the outputs.
#[derive(Debug, Clone, PartialEq, Default)]
struct Contribution {
    quarantine: Option<(Stage, Arc<str>)>,
    gold: Vec<GoldPart>,
}

/// Counters for progress displays and benchmarks.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    /// Events read, per table (index = table id).
    pub table_events: Vec<u64>,
    pub events: u64,
    pub duplicates: u64,
    pub bad_events: u64,
    /// The newest [`Batch::caught_up_ms`] seen: lag is now minus this.
    pub caught_up_ms: Option<i64>,
}

/// Output accumulated since the last commit.
#[derive(Debug, Default)]
struct Pending {
    silver: HashMap<(TableId, Key), Option<SilverRow>>,
    /// The stored form of a removed row's key where it differs from the matching
    /// key: a whole decimal key (`5.00`) matches as `Key::Int(5)`, but a store that
    /// keeps decimals as text (SQLite, MySQL) must delete the row `5.00`.
    removed_keys: HashMap<(TableId, Key), Key>,
    quarantine: Vec<QuarantineOp>,
    checkpoint: Checkpoint,
    events: u64,
    gold_reset: bool,
}

/// The processing state saved with each checkpoint.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct SavedState {
    #[serde(default)]
    dedup: DedupState,
    /// Marks of the transport partitions (see `event::Source::partition`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    partitions: BTreeMap<String, DedupState>,
}

/// How a change is applied in group mode (see [`Processor::set_group_mode`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// Everything: state, silver, quarantine, gold (outside group mode, and facts
    /// and unlooked-up tables of partitions this worker is assigned).
    Full,
    /// A dimension change read for lookups only: it updates the in-memory row and
    /// the contributions of this worker's facts, but its own silver row and
    /// quarantine record belong to whichever worker is assigned its partition.
    StateOnly,
    /// A dimension change of a partition this worker is assigned: its silver row
    /// and quarantine record, no state (that comes through [`Role::StateOnly`]).
    OutputOnly,
}

/// Reason codes the processor itself assigns.
pub mod reason {
    pub const MISSING_EVENT_TIME: &str = "missing_event_time";
}

/// The whole processing stage of one pipeline.
pub struct Processor {
    spec: Arc<PipelineSpec>,
    dedup: Dedup,
    /// One mark per transport partition, for sources that interleave several.
    partition_dedup: HashMap<Arc<str>, Dedup>,
    tables: Vec<TableState>,
    facts: Vec<Option<FactPlan>>,
    /// Per table: (fact table, lookup index) pairs that look it up.
    dependents: Vec<Vec<(TableId, usize)>>,
    gold: Vec<GoldState>,
    open_quarantine: HashMap<(TableId, Key), (Stage, Arc<str>)>,
    quarantine_counts: BTreeMap<Arc<str>, i64>,
    pending: Pending,
    /// When false (benchmarks), no per-row output is built: only the aggregates.
    emit: bool,
    stats: Stats,
    missing_time: Arc<str>,
    /// Per table: whether a fix or default rule rewrites a key column, so that keys
    /// of raw images must be computed after cleaning.
    rules_touch_key: Vec<bool>,
    /// The bytes of the batch being processed, for quarantine payloads.
    bytes: Option<Arc<crate::event::PooledBytes>>,
    /// Group mode: gold kept per fact partition, dimension changes split by role.
    group_mode: bool,
    /// Fact partition names by id; id 0 is "no partition".
    part_names: Vec<Option<Arc<str>>>,
    part_ids: HashMap<Arc<str>, u32>,
}

impl Processor {
    /// A processor for `spec`. With `emit` false it keeps aggregates only and its
    /// commits carry no silver rows, gold rows or quarantine records.
    pub fn new(spec: Arc<PipelineSpec>, emit: bool) -> Self {
        let n = spec.catalog.tables().len();
        let mut tables: Vec<TableState> = (0..n).map(|_| TableState::default()).collect();
        let mut facts: Vec<Option<FactPlan>> = (0..n).map(|_| None).collect();
        let mut dependents = vec![Vec::new(); n];
        for (t, ts) in spec.tables.iter().enumerate() {
            let golds: Vec<usize> = spec
                .gold
                .iter()
                .enumerate()
                .filter(|(_, g)| g.table == t)
                .map(|(i, _)| i)
                .collect();
            if ts.lookups.is_empty() && golds.is_empty() {
                continue;
            }
            tables[t].kept = true;
            let mut used = vec![Vec::new(); ts.lookups.len()];
            for &g in &golds {
                let gs = &spec.gold[g];
                let mut cols = Vec::new();
                gs.time.columns(&mut cols);
                if let Some(f) = &gs.filter {
                    f.columns(&mut cols);
                }
                gs.group_by.iter().for_each(|(_, e)| e.columns(&mut cols));
                gs.measures
                    .iter()
                    .filter_map(|m| m.expr.as_ref())
                    .for_each(|e| e.columns(&mut cols));
                for c in cols {
                    if let Some(l) = c.lookup {
                        if !used[l].contains(&c.column) {
                            used[l].push(c.column);
                        }
                    }
                }
            }
            let mut filter_only = vec![Vec::new(); ts.lookups.len()];
            for (l, cols) in used.iter().enumerate() {
                for &c in cols {
                    let only_in_filters = golds.iter().all(|&g| {
                        let gs = &spec.gold[g];
                        let mut other = Vec::new();
                        gs.time.columns(&mut other);
                        gs.group_by.iter().for_each(|(_, e)| e.columns(&mut other));
                        gs.measures
                            .iter()
                            .filter_map(|m| m.expr.as_ref())
                            .for_each(|e| e.columns(&mut other));
                        let mut filter = Vec::new();
                        if let Some(f) = &gs.filter {
                            f.columns(&mut filter);
                        }
                        let self_contained = filter.iter().all(|r| r.lookup == Some(l));
                        !other.contains(&ColRef { lookup: Some(l), column: c }) && self_contained
                    });
                    if only_in_filters {
                        filter_only[l].push(c);
                    }
                }
            }
            for (l, lookup) in ts.lookups.iter().enumerate() {
                tables[lookup.table].kept = true;
                dependents[lookup.table].push((t, l));
                mark_needed(
                    &mut tables[lookup.table],
                    spec.catalog.table(lookup.table).columns.len(),
                    lookup.on.iter().map(|(_, d)| *d).chain(used[l].iter().copied()),
                );
                mark_needed(
                    &mut tables[t],
                    spec.catalog.table(t).columns.len(),
                    lookup.on.iter().map(|(f, _)| *f),
                );
            }
            let mut fact_cols = Vec::new();
            for &g in &golds {
                let gs = &spec.gold[g];
                gs.time.columns(&mut fact_cols);
                if let Some(f) = &gs.filter {
                    f.columns(&mut fact_cols);
                }
                gs.group_by.iter().for_each(|(_, e)| e.columns(&mut fact_cols));
                gs.measures
                    .iter()
                    .filter_map(|m| m.expr.as_ref())
                    .for_each(|e| e.columns(&mut fact_cols));
            }
            mark_needed(
                &mut tables[t],
                spec.catalog.table(t).columns.len(),
                fact_cols.iter().filter(|c| c.lookup.is_none()).map(|c| c.column),
            );
            facts[t] = Some(FactPlan {
                index: (0..ts.lookups.len()).map(|_| KeyMap::default()).collect(),
                used,
                filter_only,
                golds,
            });
        }
        for (t, table) in tables.iter_mut().enumerate() {
            if table.kept {
                let schema = spec.catalog.table(t);
                mark_needed(table, schema.columns.len(), schema.key.iter().copied());
            }
        }
        let gold = spec
            .gold
            .iter()
            .map(|g| {
                let fact = spec.catalog.table(g.table);
                let lookups = lookup_schemas(&spec.catalog, &spec.tables[g.table].lookups);
                let integer = g
                    .measures
                    .iter()
                    .map(|m| m.expr.as_ref().is_some_and(|e| is_integer(e, fact, &lookups)))
                    .collect();
                GoldState { integer, ..GoldState::default() }
            })
            .collect();
        let rules_touch_key: Vec<bool> = spec
            .tables
            .iter()
            .enumerate()
            .map(|(t, ts)| {
                let key = &spec.catalog.table(t).key;
                ts.rules.iter().any(|r| match r {
                    crate::config::spec::Rule::Fix { column, .. }
                    | crate::config::spec::Rule::Default { column, .. } => key.contains(column),
                    crate::config::spec::Rule::Check { .. } => false,
                })
            })
            .collect();
        Self {
            stats: Stats { table_events: vec![0; n], ..Stats::default() },
            spec,
            dedup: Dedup::default(),
            partition_dedup: HashMap::default(),
            tables,
            facts,
            dependents,
            gold,
            open_quarantine: HashMap::default(),
            quarantine_counts: BTreeMap::new(),
            pending: Pending::default(),
            emit,
            missing_time: Arc::from(reason::MISSING_EVENT_TIME),
            rules_touch_key,
            bytes: None,
            group_mode: false,
            part_names: vec![None],
            part_ids: HashMap::default(),
        }
    }

    /// Makes this processor one worker of a consumer group. Fact changes come only
    /// from the fact partitions this worker is assigned, and each fact partition
    /// keeps its own gold rows (`GoldChange::partition`), so that the store can add
    /// up the shares of all workers. Dimension changes come twice: from every
    /// partition, for lookups (partition names starting with
    /// [`STATE_PARTITION_PREFIX`]; no silver, no quarantine of their own), and from
    /// the partitions this worker is assigned (silver and quarantine only). Call
    /// before [`Processor::recover`].
    pub fn set_group_mode(&mut self) {
        self.group_mode = true;
    }

    /// The tables whose changes are read in group mode for lookups by every
    /// worker: looked-up tables that are not facts themselves.
    pub fn lookup_tables(&self) -> Vec<TableId> {
        (0..self.tables.len()).filter(|&t| self.tables[t].kept && self.facts[t].is_none()).collect()
    }

    /// The tables holding facts (lookups or gold rules), kept per partition in
    /// group mode.
    pub fn fact_tables(&self) -> Vec<TableId> {
        (0..self.facts.len()).filter(|&t| self.facts[t].is_some()).collect()
    }

    fn part_id(&mut self, partition: Option<&Arc<str>>) -> u32 {
        let Some(p) = partition.filter(|_| self.group_mode) else { return 0 };
        if let Some(id) = self.part_ids.get(p) {
            return *id;
        }
        let id = self.part_names.len() as u32;
        self.part_names.push(Some(p.clone()));
        self.part_ids.insert(p.clone(), id);
        id
    }

    fn role(&self, c: &Change) -> Role {
        if !self.group_mode {
            return Role::Full;
        }
        match &c.source.partition {
            Some(p) if p.starts_with(STATE_PARTITION_PREFIX) => Role::StateOnly,
            _ if self.tables[c.table].kept && self.facts[c.table].is_none() => Role::OutputOnly,
            _ => Role::Full,
        }
    }

    /// Tables whose rows the processor keeps, to be recovered from the store.
    pub fn kept_tables(&self) -> Vec<TableId> {
        self.tables.iter().enumerate().filter(|(_, t)| t.kept).map(|(i, _)| i).collect()
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Open quarantine records by reason (decode failures included).
    pub fn quarantine_summary(&self) -> Vec<(String, u64)> {
        self.quarantine_counts
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(r, n)| (r.to_string(), *n as u64))
            .collect()
    }

    /// Current rows of gold table `gold`: (window start µs, group, measures without
    /// the trend), sorted by window then group.
    pub fn gold_rows(&self, gold: usize) -> Vec<(i64, Vec<Value>, Vec<Value>)> {
        let gs = &self.gold[gold];
        let mut rows: Vec<(i64, Vec<Value>, Vec<Value>)> = gs
            .windows
            .iter()
            .map(|((_, w, g), st)| {
                (
                    *w,
                    gs.groups[*g as usize].to_vec(),
                    st.measures.iter().map(Accumulator::value).collect(),
                )
            })
            .collect();
        rows.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        rows
    }

    /// Events processed since the last commit.
    pub fn pending_events(&self) -> u64 {
        self.pending.events
    }

    /// Processes one batch in order.
    pub fn process(&mut self, batch: Batch) {
        let n = batch.events.len() as u64;
        self.bytes = batch.bytes;
        for event in batch.events {
            match event {
                Event::Change(c) => self.on_change(c),
                Event::Bad(b) => self.on_bad(b),
            }
        }
        self.pending.events += n;
        self.stats.events += n;
        self.pending.checkpoint = batch.checkpoint;
        self.bytes = None;
        if let Some(t) = batch.caught_up_ms {
            self.stats.caught_up_ms = Some(self.stats.caught_up_ms.map_or(t, |c| c.max(t)));
        }
    }

    fn on_bad(&mut self, bad: BadEvent) {
        self.stats.bad_events += 1;
        let reason: Arc<str> = Arc::from(bad.reason);
        *self.quarantine_counts.entry(reason.clone()).or_insert(0) += 1;
        if self.emit {
            self.pending.quarantine.push(QuarantineOp::Open(QuarantineRecord {
                table: bad.table,
                key: None,
                stage: Stage::Decode,
                reason,
                detail: bad.detail,
                position: None,
                origin: bad.origin,
                payload: bad.payload,
            }));
        }
    }

    fn on_change(&mut self, mut c: Change) {
        let t = c.table;
        if let Some(n) = self.stats.table_events.get_mut(t) {
            *n += 1;
        }
        let dedup = match &c.source.partition {
            None => &mut self.dedup,
            Some(p) => self.partition_dedup.entry(p.clone()).or_default(),
        };
        if !dedup.admit(&c) {
            self.stats.duplicates += 1;
            return;
        }
        let role = self.role(&c);
        // An update that changes the primary key moves the row: Debezium sends a
        // delete and an insert; a source that sends one update gets the same here.
        if c.op == Op::Update {
            let old_key = c.before.as_deref().and_then(|b| self.row_key(t, b));
            let new_key = c.after.as_deref().and_then(|a| self.row_key(t, a));
            if let (Some(old_key), Some(new_key)) = (old_key, new_key) {
                if old_key != new_key {
                    let mut delete = c.clone();
                    delete.op = Op::Delete;
                    delete.after = None;
                    self.apply_change(delete, role);
                    c.op = Op::Insert;
                    c.before = None;
                }
            }
        }
        self.apply_change(c, role);
    }

    /// Applies one admitted change.
    fn apply_change(&mut self, mut c: Change, role: Role) {
        let t = c.table;
        let part =
            if self.facts[t].is_some() { self.part_id(c.source.partition.as_ref()) } else { 0 };
        let spec = self.spec.clone();
        let schema = spec.catalog.table(t);
        let (key, new): (Key, Option<(Row, Verdict)>) = match c.op {
            Op::Delete => {
                let Some(key) = c.before.as_deref().and_then(|b| self.row_key(t, b)) else {
                    return;
                };
                (key, None)
            }
            _ => {
                let Some(mut row) = c.after.take() else { return };
                let verdict = clean(&spec.tables[t].rules, &mut row);
                let Some(key) = Key::of(&row, &schema.key) else { return };
                (key, Some((row, verdict)))
            }
        };

        let is_fact = self.facts[t].is_some();
        let kept = self.tables[t].kept && role != Role::OutputOnly;
        let new =
            new.map(|(row, verdict)| (Stored { row, failed: verdict.failed, part }, verdict.flags));
        let old = if kept { self.tables[t].rows.get(&key) } else { None };
        // For facts the open quarantine always equals the contribution's, so no
        // lookup in `open_quarantine` is needed.
        let old_contribution = is_fact.then(|| self.contribution_of(t, old));
        let new_contribution = if is_fact {
            Some(self.contribution_of(t, new.as_ref().map(|(s, _)| s)))
        } else {
            None
        };
        let fk_moves = if is_fact {
            self.foreign_keys(t, old.map(|s| &s.row), new.as_ref().map(|(s, _)| &s.row))
        } else {
            Vec::new()
        };

        // Facts that look this row up, with what they contribute before the change.
        let mut affected: Vec<(TableId, Key, Contribution)> = Vec::new();
        if !self.dependents[t].is_empty() && role != Role::OutputOnly {
            let old_visible = old.filter(|s| s.failed.is_none());
            let new_visible = new.as_ref().filter(|(s, _)| s.failed.is_none()).map(|(s, _)| &s.row);
            for &(f, l) in &self.dependents[t] {
                let Some(plan) = &self.facts[f] else { continue };
                let same = match (old_visible, new_visible) {
                    (None, None) => true,
                    (Some(a), Some(b)) => {
                        let changed: Vec<usize> = plan.used[l]
                            .iter()
                            .copied()
                            .filter(|&c| a.row.get(c) != b.get(c))
                            .collect();
                        changed.is_empty()
                            || (changed.iter().all(|c| plan.filter_only[l].contains(c))
                                && self.filters_agree(f, l, &a.row, b))
                    }
                    _ => false,
                };
                if same {
                    continue;
                }
                if let Some(fact_keys) = plan.index[l].get(&key) {
                    for fk in fact_keys {
                        affected.push((f, fk.clone(), Contribution::default()));
                    }
                }
            }
            // A fact that reaches this row through two lookups (or is this row) must
            // be recomputed once, or its old contribution would be retracted twice.
            affected.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
            affected.dedup_by(|a, b| a.0 == b.0 && a.1 == b.1);
            affected.retain(|(f, fk, _)| !(*f == t && *fk == key));
            for (f, fk, old) in &mut affected {
                *old = self.contribution(*f, fk);
            }
        }

        // Silver and the quarantine payload are built before the row moves into state.
        let new_failed = new.as_ref().and_then(|(s, _)| s.failed.clone());
        // Kept tables always write silver: recovery rebuilds their state from it.
        if self.emit && role != Role::StateOnly && (spec.tables[t].silver || self.tables[t].kept) {
            let silver = match &new {
                Some((stored, flags)) if stored.failed.is_none() => Some(SilverRow {
                    values: stored.row.clone(),
                    flags: (!flags.is_empty()).then(|| flags.join(",")),
                    extra: c.extra.take(),
                    position: c.source.position.as_ref().map(ToString::to_string),
                    source_ts_ms: c.source.ts_ms,
                    partition: c.source.partition.clone(),
                }),
                _ => None,
            };
            if silver.is_none() {
                // The image that carries the key: the delete's before, or the
                // version that failed its checks.
                let image = match (&new, &c.before) {
                    (Some((stored, _)), _) => Some(&stored.row[..]),
                    (None, Some(before)) => Some(&before[..]),
                    (None, None) => None,
                };
                if let Some(stored_key) = image.and_then(|r| stored_key(&key, r, &schema.key)) {
                    self.pending.removed_keys.insert((t, key.clone()), stored_key);
                }
            }
            self.pending.silver.insert((t, key.clone()), silver);
        }
        let payload_row = if self.emit && c.raw.is_none() {
            new.as_ref().map(|(s, _)| s.row.clone())
        } else {
            None
        };

        if kept {
            match new {
                Some((mut stored, _)) => {
                    let needed = &self.tables[t].needed;
                    for (v, keep) in stored.row.iter_mut().zip(needed) {
                        if !keep {
                            *v = Value::Null;
                        }
                    }
                    self.tables[t].rows.insert(key.clone(), stored);
                }
                None => {
                    self.tables[t].rows.remove(&key);
                }
            }
            if !fk_moves.is_empty() {
                self.move_foreign_keys(t, &key, fk_moves);
            }
        }

        let event = (&c, payload_row);
        match (old_contribution, new_contribution) {
            (Some(old), Some(new_c)) => self.transition(t, &key, old, new_c, Some(event)),
            _ if role == Role::StateOnly => {}
            _ => {
                let new_q = new_failed.map(|r| (Stage::Validate, r));
                let old_q = self.open_quarantine.get(&(t, key.clone())).cloned();
                self.quarantine_transition(t, &key, old_q, new_q, Some(event));
            }
        }
        for (f, fk, old) in affected {
            let new_c = self.contribution(f, &fk);
            self.transition(f, &fk, old, new_c, None);
        }
    }

    /// Whether every gold filter on fact table `f` gives the same verdict for two
    /// versions of the row of lookup `l` (filters that read only that lookup).
    fn filters_agree(&self, f: TableId, l: usize, old: &[Value], new: &[Value]) -> bool {
        let Some(plan) = &self.facts[f] else { return false };
        let n = self.spec.tables[f].lookups.len();
        plan.golds.iter().all(|&g| {
            let Some(filter) = &self.spec.gold[g].filter else { return true };
            let verdict = |dim: &[Value]| {
                let mut lookups: Vec<Option<&[Value]>> = vec![None; n];
                lookups[l] = Some(dim);
                is_true(&eval(filter, &Scope { row: &[], lookups: &lookups }))
            };
            verdict(old) == verdict(new)
        })
    }

    /// The key a raw row image has once cleaned (the key its stored version has).
    fn row_key(&self, t: TableId, row: &[Value]) -> Option<Key> {
        let schema = self.spec.catalog.table(t);
        if !self.rules_touch_key.get(t).copied().unwrap_or(false) {
            return Key::of(row, &schema.key);
        }
        let mut cleaned = row.to_vec();
        clean(&self.spec.tables[t].rules, &mut cleaned);
        Key::of(&cleaned, &schema.key)
    }

    /// Per lookup whose foreign key changes: (lookup, old key, new key).
    fn foreign_keys(
        &self,
        t: TableId,
        old_row: Option<&Row>,
        new_row: Option<&Row>,
    ) -> Vec<(usize, Option<Key>, Option<Key>)> {
        let lookups = &self.spec.tables[t].lookups;
        let mut moves = Vec::new();
        for (l, lookup) in lookups.iter().enumerate() {
            let old_fk = old_row.and_then(|r| foreign_key(r, &lookup.on));
            let new_fk = new_row.and_then(|r| foreign_key(r, &lookup.on));
            if old_fk != new_fk || old_row.is_none() {
                moves.push((l, old_fk, new_fk));
            }
        }
        moves
    }

    /// Moves fact `key` in the lookup indexes from its old foreign keys to its new ones.
    fn move_foreign_keys(
        &mut self,
        t: TableId,
        key: &Key,
        moves: Vec<(usize, Option<Key>, Option<Key>)>,
    ) {
        let Some(plan) = self.facts[t].as_mut() else { return };
        for (l, old_fk, new_fk) in moves {
            if let Some(ok) = old_fk {
                if let Some(list) = plan.index[l].get_mut(&ok) {
                    if let Some(i) = list.iter().position(|k| k == key) {
                        list.swap_remove(i);
                    }
                    if list.is_empty() {
                        plan.index[l].remove(&ok);
                    }
                }
            }
            if let Some(nk) = new_fk {
                plan.index[l].get_or_insert_with(nk, Vec::new).push(key.clone());
            }
        }
    }

    /// What fact row `key` of table `t` contributes given the current state.
    fn contribution(&self, t: TableId, key: &Key) -> Contribution {
        self.contribution_of(t, self.tables[t].rows.get(key))
    }

    /// What a fact row of table `t` (None: absent) contributes given the current dimensions.
    fn contribution_of(&self, t: TableId, stored: Option<&Stored>) -> Contribution {
        let Some(stored) = stored else { return Contribution::default() };
        if let Some(r) = &stored.failed {
            return Contribution {
                quarantine: Some((Stage::Validate, r.clone())),
                gold: Vec::new(),
            };
        }
        let Some(plan) = &self.facts[t] else { return Contribution::default() };
        let lookups = &self.spec.tables[t].lookups;
        let mut looked: Vec<Option<&[Value]>> = Vec::with_capacity(lookups.len());
        for lookup in lookups {
            let dim = foreign_key(&stored.row, &lookup.on)
                .and_then(|k| self.tables[lookup.table].rows.get(&k))
                .filter(|s| s.failed.is_none());
            match (dim, &lookup.missing) {
                (Some(d), _) => looked.push(Some(&d.row)),
                (None, Missing::Wait) => return Contribution::default(),
                (None, Missing::Quarantine(r)) => {
                    return Contribution {
                        quarantine: Some((Stage::Enrich, r.clone())),
                        gold: Vec::new(),
                    }
                }
            }
        }
        let scope = Scope { row: &stored.row, lookups: &looked };
        let mut out = Contribution::default();
        for &g in &plan.golds {
            let gs = &self.spec.gold[g];
            if let Some(filter) = &gs.filter {
                if !is_true(&eval(filter, &scope)) {
                    continue;
                }
            }
            let micros = match &*eval(&gs.time, &scope) {
                Value::Timestamp(us) => *us,
                Value::Date(d) => i64::from(*d) * crate::event::time::MICROS_PER_DAY,
                _ => {
                    out.quarantine = Some((Stage::Enrich, self.missing_time.clone()));
                    continue;
                }
            };
            let window = micros.div_euclid(gs.window_micros) * gs.window_micros;
            let group: Vec<std::borrow::Cow<'_, Value>> =
                gs.group_by.iter().map(|(_, e)| eval(e, &scope)).collect();
            let group = match self.gold[g].find_group(&group) {
                Some(id) => GroupRef::Known(id),
                None => GroupRef::New(group.into_iter().map(|v| v.into_owned()).collect()),
            };
            let inputs = gs
                .measures
                .iter()
                .map(|m| m.expr.as_ref().map_or(Value::Null, |e| eval(e, &scope).into_owned()))
                .collect();
            out.gold.push(GoldPart { gold: g, part: stored.part, window, group, inputs });
        }
        out
    }

    fn transition(
        &mut self,
        t: TableId,
        key: &Key,
        old: Contribution,
        new: Contribution,
        event: Option<(&Change, Option<Row>)>,
    ) {
        if old.gold != new.gold {
            for part in &old.gold {
                self.apply(part, -1);
            }
            for part in &new.gold {
                self.apply(part, 1);
            }
        }
        self.quarantine_transition(t, key, old.quarantine, new.quarantine, event);
    }

    fn apply(&mut self, part: &GoldPart, diff: i64) {
        let spec = &self.spec.gold[part.gold];
        let gs = &mut self.gold[part.gold];
        let id = match &part.group {
            GroupRef::Known(id) => *id,
            GroupRef::New(values) => {
                let borrowed: Vec<std::borrow::Cow<'_, Value>> =
                    values.iter().map(std::borrow::Cow::Borrowed).collect();
                match gs.find_group(&borrowed) {
                    Some(id) => id,
                    None => {
                        let id = gs.groups.len() as u32;
                        let hash = gs.group_hash(&borrowed);
                        gs.groups.push(values.clone());
                        gs.group_ids.entry(hash).or_default().push(id);
                        id
                    }
                }
            }
        };
        let slot = (part.part, part.window, id);
        let state = gs.windows.entry(slot).or_insert_with(|| GroupState {
            rows: 0,
            measures: spec
                .measures
                .iter()
                .zip(&gs.integer)
                .map(|(m, integer)| Accumulator::new(m.agg, *integer))
                .collect(),
        });
        state.rows += diff;
        for (acc, input) in state.measures.iter_mut().zip(&part.inputs) {
            acc.update(input, diff);
        }
        if state.rows == 0 {
            gs.windows.remove(&slot);
        }
        if self.emit {
            gs.dirty.insert(slot);
            if spec.trend.is_some() {
                gs.dirty.insert((part.part, part.window + spec.window_micros, id));
            }
        }
    }

    fn quarantine_transition(
        &mut self,
        t: TableId,
        key: &Key,
        old: Option<(Stage, Arc<str>)>,
        new: Option<(Stage, Arc<str>)>,
        event: Option<(&Change, Option<Row>)>,
    ) {
        // A new version of a quarantined row re-opens its record so the stored
        // payload is always the current one (recovery rebuilds the row from it).
        if old == new && (event.is_none() || new.is_none()) {
            return;
        }
        let table = &self.spec.catalog.table(t).name;
        if let Some((_, reason)) = &old {
            if let Some(n) = self.quarantine_counts.get_mut(reason) {
                *n -= 1;
            }
            self.open_quarantine.remove(&(t, key.clone()));
            if self.emit {
                self.pending
                    .quarantine
                    .push(QuarantineOp::Resolve { table: table.to_string(), key: key.to_string() });
            }
        }
        let Some((stage, reason)) = new else { return };
        *self.quarantine_counts.entry(reason.clone()).or_insert(0) += 1;
        self.open_quarantine.insert((t, key.clone()), (stage, reason.clone()));
        if !self.emit {
            return;
        }
        let (payload, position, origin) = match &event {
            Some((c, row)) => (
                self.payload(c, row.as_ref()),
                c.source.position.as_ref().map(ToString::to_string),
                c.origin,
            ),
            None => {
                let row = self.tables[t].rows.get(key).map(|s| &s.row);
                let schema = self.spec.catalog.table(t);
                (row.map(|r| debezium::encode_row(schema, r)).unwrap_or_default(), None, 0)
            }
        };
        let detail = match stage {
            Stage::Validate => format!("check `{reason}` failed"),
            Stage::Enrich => format!("lookup or event time missing (`{reason}`)"),
            Stage::Decode => String::new(),
        };
        self.pending.quarantine.push(QuarantineOp::Open(QuarantineRecord {
            table: Some(table.to_string()),
            key: Some(key.to_string()),
            stage,
            reason,
            detail,
            position,
            origin,
            payload,
        }));
    }

    /// The original bytes of a change, or its Debezium line when it came without bytes.
    fn payload(&self, c: &Change, row: Option<&Row>) -> String {
        if let (Some(raw), Some(bytes)) = (c.raw, &self.bytes) {
            return raw.text(bytes);
        }
        let mut copy = c.clone();
        if let Some(r) = row {
            copy.after = Some(r.clone());
        }
        debezium::encode_line(&self.spec.catalog, &copy)
    }

    /// Takes everything since the last commit, to be written in one transaction.
    pub fn flush(&mut self) -> Commit {
        let mut gold = Vec::new();
        for (g, gs) in self.gold.iter_mut().enumerate() {
            let spec = &self.spec.gold[g];
            for (part, window, id) in gs.dirty.drain() {
                let state = gs.windows.get(&(part, window, id));
                let avg_parts = state
                    .map(|st| {
                        st.measures
                            .iter()
                            .filter_map(|m| match m {
                                Accumulator::Avg { sum, n } => Some((*sum, *n)),
                                _ => None,
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                let measures = state.map(|st| {
                    let mut values: Vec<Value> =
                        st.measures.iter().map(Accumulator::value).collect();
                    if let Some(ti) = spec.trend {
                        let prev = gs
                            .windows
                            .get(&(part, window - spec.window_micros, id))
                            .map(|p| p.measures[ti].value());
                        let change =
                            match (values[ti].to_decimal(), prev.and_then(|p| p.to_decimal())) {
                                (Some(cur), Some(prev)) => Value::Decimal(cur - prev),
                                _ => Value::Null,
                            };
                        values.push(change);
                    }
                    values.into_boxed_slice()
                });
                gold.push(GoldChange {
                    gold: g,
                    window_start: window,
                    group: gs.groups[id as usize].clone(),
                    measures,
                    partition: self.part_names.get(part as usize).cloned().flatten(),
                    avg_parts,
                });
            }
        }
        let mut pending = std::mem::take(&mut self.pending);
        // The position stays until a batch moves it: a commit with nothing new (the
        // last one, at shutdown) must store the same checkpoint, not an empty one,
        // or the restart would start over from a snapshot.
        self.pending.checkpoint = pending.checkpoint.clone();
        let state = SavedState {
            dedup: self.dedup.save(),
            partitions: self
                .partition_dedup
                .iter()
                .map(|(p, d)| (p.to_string(), d.save()))
                .collect(),
        };
        Commit {
            silver: pending
                .silver
                .into_iter()
                .map(|((table, key), row)| {
                    let key = match row {
                        Some(_) => key,
                        // Almost always empty: no key is cloned for the lookup then.
                        None if pending.removed_keys.is_empty() => key,
                        None => pending.removed_keys.remove(&(table, key.clone())).unwrap_or(key),
                    };
                    SilverChange { table, key, row }
                })
                .collect(),
            gold_reset: pending.gold_reset,
            gold,
            quarantine: pending.quarantine,
            checkpoint: pending.checkpoint.clone(),
            state: serde_json::to_string(&state).unwrap_or_default(),
            event_count: pending.events,
        }
    }

    /// Rebuilds the state from what the store had durable, so that processing
    /// continues exactly where the last commit left it. The next commit rewrites
    /// every gold row from the rebuilt state.
    pub fn recover(&mut self, recovered: crate::store::Recovered) {
        if let Some(state) = recovered.state.as_deref() {
            if let Ok(saved) = serde_json::from_str::<SavedState>(state) {
                self.dedup = Dedup::restore(&saved.dedup);
                self.partition_dedup = saved
                    .partitions
                    .iter()
                    .map(|(p, d)| (Arc::from(p.as_str()), Dedup::restore(d)))
                    .collect();
                if self.group_mode {
                    // Lookups read every partition from where its owner committed,
                    // with the owner's mark.
                    for (p, d) in &saved.partitions {
                        let name = format!("{STATE_PARTITION_PREFIX}{p}");
                        self.partition_dedup.insert(Arc::from(name), Dedup::restore(d));
                    }
                }
            }
        }
        self.pending.checkpoint = recovered.checkpoint.clone().unwrap_or_default();
        let mut partitions = recovered.partitions.into_iter();
        for (t, row) in recovered.rows {
            let partition = partitions.next().flatten();
            let part = if self.facts[t].is_some() { self.part_id(partition.as_ref()) } else { 0 };
            let schema = self.spec.catalog.table(t);
            if let Some(key) = Key::of(&row, &schema.key) {
                self.tables[t].rows.insert(key, Stored { row, failed: None, part });
            }
        }
        let mut decoder = Decoder::new(self.spec.catalog.clone());
        for rec in recovered.open_quarantine {
            let reason: Arc<str> = Arc::from(&*rec.reason);
            let table = rec.table.as_deref().and_then(|n| self.spec.catalog.id(n));
            match (rec.stage, table) {
                (Stage::Decode, _) | (_, None) => {
                    *self.quarantine_counts.entry(reason).or_insert(0) += 1;
                }
                (stage, Some(t)) => {
                    // Rows that failed their checks are not in silver: rebuild them
                    // from the payload of their quarantine record.
                    let mut key = None;
                    if stage == Stage::Validate {
                        if let Event::Change(mut c) =
                            decoder.decode(rec.payload.as_bytes(), rec.origin, None)
                        {
                            if let Some(mut row) = c.after.take() {
                                let verdict = clean(&self.spec.tables[t].rules, &mut row);
                                key = Key::of(&row, &self.spec.catalog.table(t).key);
                                if let (Some(k), true) = (&key, self.tables[t].kept) {
                                    self.tables[t].rows.insert(
                                        k.clone(),
                                        Stored {
                                            row,
                                            failed: verdict.failed.or(Some(reason.clone())),
                                            // Failed rows contribute to no partition.
                                            part: 0,
                                        },
                                    );
                                }
                            }
                        }
                    }
                    if key.is_none() {
                        let schema = self.spec.catalog.table(t);
                        key = rec.key.as_deref().and_then(|k| parse_key(schema, k));
                    }
                    if let Some(k) = key {
                        *self.quarantine_counts.entry(reason.clone()).or_insert(0) += 1;
                        self.open_quarantine.insert((t, k), (stage, reason));
                    }
                }
            }
        }
        // Rebuild indexes and aggregates from the recovered rows.
        let facts: Vec<TableId> =
            (0..self.facts.len()).filter(|t| self.facts[*t].is_some()).collect();
        let emit = std::mem::replace(&mut self.emit, false);
        for t in facts {
            let keys: Vec<Key> = self.tables[t].rows.keys();
            for key in keys {
                let row = self.tables[t].rows.get(&key).map(|s| &s.row);
                let moves = self.foreign_keys(t, None, row);
                self.move_foreign_keys(t, &key, moves);
                let c = self.contribution(t, &key);
                for part in &c.gold {
                    self.apply(part, 1);
                }
                let current = self.open_quarantine.get(&(t, key.clone())).cloned();
                self.emit = emit;
                self.quarantine_transition(t, &key, current, c.quarantine, None);
                self.emit = false;
            }
        }
        self.emit = emit;
        if emit {
            self.pending.gold_reset = true;
            for gs in &mut self.gold {
                let slots: Vec<Slot> = gs.windows.keys().copied().collect();
                gs.dirty.extend(slots);
            }
        }
    }
}

/// Marks columns as needed in memory (the key columns always are).
fn mark_needed(table: &mut TableState, width: usize, columns: impl Iterator<Item = usize>) {
    if table.needed.is_empty() {
        table.needed = vec![false; width];
    }
    for c in columns {
        if let Some(n) = table.needed.get_mut(c) {
            *n = true;
        }
    }
}

/// The key of `row` as stores keep it, when that differs from `key` (the matching
/// form): a single whole decimal key column, which matches as an integer.
fn stored_key(key: &Key, row: &[Value], key_columns: &[usize]) -> Option<Key> {
    match (key, key_columns) {
        (Key::Int(_), [only]) => match row.get(*only)? {
            v @ Value::Decimal(_) => Some(Key::Values(Box::new([v.clone()]))),
            _ => None,
        },
        _ => None,
    }
}

/// The key a fact row references through a lookup; no allocation for integer keys.
fn foreign_key(row: &[Value], on: &[(usize, usize)]) -> Option<Key> {
    if let [(c, _)] = on {
        if let Some(Value::Int(i)) = row.get(*c) {
            return Some(Key::Int(*i));
        }
    }
    let vals: Vec<&Value> = on.iter().map(|(fc, _)| row.get(*fc).unwrap_or(&Value::Null)).collect();
    Key::from_values(&vals)
}

/// Parses a rendered single-column key back (composite keys are rebuilt from payloads).
fn parse_key(schema: &crate::event::TableSchema, s: &str) -> Option<Key> {
    let [only] = schema.key[..] else { return None };
    match schema.columns.get(only)?.ty {
        crate::event::ColumnType::Int => s.parse::<i64>().ok().map(Key::Int),
        crate::event::ColumnType::UInt => {
            s.parse::<u64>().ok().and_then(|u| Key::single(&Value::UInt(u)))
        }
        _ => Key::single(&Value::Str(s.into())),
    }
}

#[cfg(test)]
mod tests;
