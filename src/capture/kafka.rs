//! Kafka topics of Debezium envelopes, written by `caudal capture` or by Debezium.
//!
//! Every partition of the configured topics is assigned explicitly (no consumer
//! group rebalancing here) and read from the offset in the resume checkpoint, or
//! from the beginning. Offsets are never committed to Kafka
//! (`enable.auto.commit=false`): each batch's checkpoint is the next offset of
//! every partition, `{"<topic>/<partition>": offset}`, and the sink stores it in
//! the same transaction as the data. That, and deduplication by source position
//! with one high-water mark per partition (`change.source.partition`), gives
//! exactly-once into the store although Kafka delivers at least once.
//!
//! Values are envelopes as the Debezium JSON converter writes them, with schemas
//! disabled (bare) or enabled (`{"schema": .., "payload": ..}`); tombstones are
//! skipped. The table is `source.table`, else the topic's last segment. Messages
//! of `<prefix>.caudal_unreadable` are raw inputs `caudal capture` could not
//! decode: decoded again here, they become the same quarantine records, with
//! the origin the capture gave them.
//!
//! A lost broker is not an error: librdkafka reconnects and fetching resumes at
//! the same offsets; setting up (metadata, watermarks) is retried with backoff.
//!
//! # Consumer group (`caudal process` with several workers)
//!
//! With [`KafkaSource::with_group`], the source is one generation of a group
//! worker: the partitions the group assigned ([`GroupMember`]) are read from their
//! offsets in the store, named `topic/partition`; the looked-up tables' topics are
//! also read in full by a second consumer with explicit assignment, named
//! `state:topic/partition` (the processor uses those for lookups only). A
//! generation ends when the group revokes the assignment (the rebalance waits
//! until the worker committed and called [`GroupMember::unassign`]) or, with
//! `exit_at_end`, when the whole group is done.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{CaptureError, Source};
use crate::bus;
use crate::bus::kafka::{client_config, fetched_end, KafkaContext, REQUEST_TIMEOUT};
use crate::config::spec::KafkaSourceSpec;
use crate::event::debezium::Decoder;
use crate::event::{
    Batch, BytePool, Catalog, Checkpoint, Event, PooledBytes, RawSpan, STATE_PARTITION_PREFIX,
};

/// Messages per batch at most: large enough to amortize a hand-off, small enough
/// to keep a batch's memory to a few megabytes.
const MAX_BATCH_MESSAGES: usize = 10_000;
/// What librdkafka may prefetch per consumer, in KiB. When the store stalls, the
/// source stops polling and librdkafka stops fetching once this much is queued:
/// this is the Kafka end of backpressure. Its default (64 MiB, per consumer, and a
/// worker of a group has two) would be half the memory budget; 16 MiB still lets a
/// fetch bring thousands of messages.
const PREFETCH_KBYTES: &str = "16384";
/// ... and at most about this many bytes (spans into a batch's bytes are `u32`).
const MAX_BATCH_BYTES: usize = 16 << 20;
/// How long one poll waits when nothing arrives.
const IDLE_POLL: Duration = Duration::from_millis(100);
/// With two consumers (group mode), how long one waits while the other may have
/// messages: a bound on the latency one consumer's idleness adds to the other's.
const MULTI_POLL_SLICE: Duration = Duration::from_millis(5);
/// Backoff bounds while the broker is unreachable during setup.
const RETRY_MIN: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// Next offset to read per `"<topic>/<partition>"`.
type Offsets = BTreeMap<String, i64>;

/// Reads Debezium envelopes from Kafka topics.
pub struct KafkaSource {
    spec: KafkaSourceSpec,
    catalog: Arc<Catalog>,
    /// Topics whose messages are raw unreadable inputs (see the module doc).
    unreadable: Vec<String>,
    group: Option<GroupRead>,
}

impl KafkaSource {
    /// `unreadable_topic`: the topic `caudal capture` writes undecodable inputs to.
    pub fn new(spec: KafkaSourceSpec, catalog: Arc<Catalog>, unreadable_topic: String) -> Self {
        Self { spec, catalog, unreadable: vec![unreadable_topic], group: None }
    }

    /// Makes this source one generation of a group worker (see the module doc).
    pub fn with_group(mut self, group: GroupRead) -> Self {
        self.group = Some(group);
        self
    }
}

/// What one generation of a group worker reads.
pub struct GroupRead {
    pub member: Arc<GroupMember>,
    /// The partitions the group assigned to this worker.
    pub assigned: Vec<(String, i32)>,
    /// Topics every worker reads in full, for lookups.
    pub lookup_topics: Vec<String>,
    /// With `exit_at_end`: asked (at most every [`GROUP_DONE_EVERY`]) once every
    /// partition this worker reads is at its end; true when the whole group's
    /// work is committed, which ends the generation and the worker.
    pub group_done: Option<Box<dyn FnMut() -> bool + Send>>,
}

/// How often a worker at its end asks the store whether the whole group is done.
pub const GROUP_DONE_EVERY: Duration = Duration::from_millis(200);

/// Rebalance events of a group consumer, kept for the worker loop: the consumer
/// context only records them, and the worker (un)assigns once it has committed.
#[derive(Debug, Default)]
struct GroupEvents {
    /// A new assignment not yet applied.
    assigned: Option<Vec<(String, i32)>>,
    /// The current assignment was revoked: end the generation, then unassign.
    revoked: bool,
    /// The member is being dropped: the consumer's close revokes, and nobody is
    /// left to unassign later.
    closing: bool,
}

/// The consumer context of a group member.
pub struct GroupContext {
    events: Arc<Mutex<GroupEvents>>,
}

impl ClientContext for GroupContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        KafkaContext.log(level, fac, message);
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        KafkaContext.error(error, reason);
    }
}

impl ConsumerContext for GroupContext {
    /// Records the event and returns: librdkafka holds the rebalance until the
    /// worker calls `assign`/`unassign` (eager protocol), which it does only once
    /// everything it processed from the revoked partitions is committed.
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let Ok(mut events) = self.events.lock() else { return };
        if events.closing {
            if let Err(e) = consumer.unassign() {
                warn!(error = %e, "cannot unassign kafka partitions");
            }
            return;
        }
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let list: Vec<(String, i32)> =
                    tpl.elements().iter().map(|e| (e.topic().to_owned(), e.partition())).collect();
                info!(partitions = list.len(), "kafka group assigned partitions");
                events.assigned = Some(list);
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                info!(partitions = tpl.count(), "kafka group revoked partitions");
                events.revoked = true;
                events.assigned = None;
            }
            other => warn!(error = ?other, "kafka group rebalance error"),
        }
    }
}

/// This process's membership of the consumer group `[kafka] group`: a consumer
/// subscribed to the topics, whose partitions the group shares out.
pub struct GroupMember {
    consumer: BaseConsumer<GroupContext>,
    events: Arc<Mutex<GroupEvents>>,
    finished: AtomicBool,
}

impl GroupMember {
    /// Joins the group (the join completes in later polls).
    ///
    /// # Errors
    /// Definite when the consumer cannot be created; transient when subscribing fails.
    pub fn join(spec: &KafkaSourceSpec, topics: &[String]) -> Result<Self, CaptureError> {
        let events = Arc::new(Mutex::new(GroupEvents::default()));
        let consumer: BaseConsumer<GroupContext> = client_config(&spec.brokers)
            .set("group.id", &spec.group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("fetch.wait.max.ms", "10")
            .set("queued.max.messages.kbytes", PREFETCH_KBYTES)
            .set("auto.offset.reset", "earliest")
            // Eager: a rebalance revokes everything, then assigns; see `rebalance`.
            .set("partition.assignment.strategy", "roundrobin")
            // A worker killed with SIGKILL is noticed after this long.
            .set("session.timeout.ms", "6000")
            .set("heartbeat.interval.ms", "1000")
            .create_with_context(GroupContext { events: events.clone() })
            .map_err(|e| CaptureError::Definite {
                message: format!("cannot create the kafka group consumer: {e}"),
                hint: Some("check `kafka.brokers` and `kafka.group`".into()),
            })?;
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        consumer.subscribe(&names).map_err(|e| transient("cannot subscribe".into(), e))?;
        Ok(Self { consumer, events, finished: AtomicBool::new(false) })
    }

    /// Polls until the group assigns partitions (an empty list is an assignment
    /// too); `None` when `shutdown` is cancelled first.
    pub fn wait_for_assignment(&self, shutdown: &CancellationToken) -> Option<Vec<(String, i32)>> {
        loop {
            if shutdown.is_cancelled() {
                return None;
            }
            if let Some(list) = self.take_assigned() {
                return Some(list);
            }
            if self.revoked() {
                self.unassign();
            }
            // Nothing is assigned yet, so no message arrives here.
            if let Some(Ok(m)) = self.consumer.poll(IDLE_POLL) {
                warn!(
                    topic = m.topic(),
                    partition = m.partition(),
                    "message before assignment, ignored"
                );
            }
        }
    }

    fn take_assigned(&self) -> Option<Vec<(String, i32)>> {
        self.events.lock().ok().and_then(|mut e| e.assigned.take())
    }

    fn revoked(&self) -> bool {
        self.events.lock().map(|e| e.revoked).unwrap_or(true)
    }

    /// Whether the group revoked the assignment and waits for [`GroupMember::unassign`].
    pub fn revoked_now(&self) -> bool {
        self.revoked()
    }

    /// Completes a revocation once the worker committed what it read: the
    /// rebalance goes on and other workers get the partitions.
    pub fn unassign(&self) {
        if let Ok(mut e) = self.events.lock() {
            e.revoked = false;
        }
        if let Err(e) = self.consumer.unassign() {
            warn!(error = %e, "cannot unassign kafka partitions");
        }
    }

    /// Whether a generation ended because the whole group was done (`exit_at_end`).
    pub fn finished(&self) -> bool {
        self.finished.load(Ordering::SeqCst)
    }

    /// The (low, high) offsets of every partition of `topics` now, by
    /// `topic/partition`: where `exit_at_end` stops. Blocking.
    ///
    /// # Errors
    /// Transient when the broker does not answer.
    pub fn ends(&self, topics: &[String]) -> Result<BTreeMap<String, (i64, i64)>, CaptureError> {
        let mut out = BTreeMap::new();
        for topic in topics {
            let meta = self
                .consumer
                .fetch_metadata(Some(topic), REQUEST_TIMEOUT)
                .map_err(|e| transient(format!("cannot read the metadata of `{topic}`"), e))?;
            let Some(t) = meta.topics().iter().find(|t| t.name() == topic) else { continue };
            for p in t.partitions() {
                let ends = self
                    .consumer
                    .fetch_watermarks(topic, p.id(), REQUEST_TIMEOUT)
                    .map_err(|e| transient(format!("cannot read the offsets of `{topic}`"), e))?;
                out.insert(format!("{topic}/{}", p.id()), ends);
            }
        }
        Ok(out)
    }
}

impl Drop for GroupMember {
    fn drop(&mut self) {
        // Runs before the consumer's own drop, which closes it (leaving the group).
        if let Ok(mut e) = self.events.lock() {
            e.closing = true;
        }
    }
}

/// The consumers one source polls: a plain one (explicit assignment) and, in
/// group mode, the group member's.
enum Consumers<'a> {
    Plain(&'a BaseConsumer<KafkaContext>),
    Group(&'a BaseConsumer<GroupContext>),
}

impl Consumers<'_> {
    fn poll(&self, wait: Duration) -> Option<rdkafka::error::KafkaResult<BorrowedMessage<'_>>> {
        match self {
            Consumers::Plain(c) => c.poll(wait),
            Consumers::Group(c) => c.poll(wait),
        }
    }

    fn fetched_end(&self, topic: &std::ffi::CStr, partition: i32) -> Option<i64> {
        match self {
            Consumers::Plain(c) => fetched_end(*c, topic, partition),
            Consumers::Group(c) => fetched_end(*c, topic, partition),
        }
    }
}

/// One assigned partition.
struct Part {
    /// `"<topic>/<partition>"`: the checkpoint key and the dedup partition.
    name: Arc<str>,
    topic: usize,
    next: i64,
    /// End at start (ListOffsets), for `exit_at_end`.
    high: i64,
    /// Start of the log at start.
    low: i64,
    /// The end a fetch response first reported, for `exit_at_end`.
    fetched_high: Option<i64>,
    /// Whether a gap in this partition's offsets was already reported.
    gap_warned: bool,
    /// The topic name for librdkafka calls.
    topic_c: std::ffi::CString,
    partition: i32,
    /// Index of the consumer reading it (see `Consumers`).
    consumer: usize,
}

impl Part {
    /// Whether the partition reached the end it had when reading began. Empty at
    /// start needs no fetch; otherwise both ends must be passed: the one ListOffsets
    /// gave and the one the first fetch reported (tansu's in-memory storage answers
    /// ListOffsets with too low an offset, while its fetch responses are right).
    fn at_end(&self) -> bool {
        if self.high <= self.low {
            return self.next >= self.high;
        }
        self.next >= self.high && self.fetched_high.is_some_and(|h| self.next >= h)
    }
}

#[async_trait]
impl Source for KafkaSource {
    fn kind(&self) -> &'static str {
        "kafka"
    }

    async fn run(
        self: Box<Self>,
        resume: Option<Checkpoint>,
        out: bus::Sender,
        shutdown: CancellationToken,
    ) -> Result<(), CaptureError> {
        let offsets: Offsets = match &resume {
            Some(cp) => super::parse_checkpoint(cp, "map of kafka offsets")?.unwrap_or_default(),
            None => Offsets::new(),
        };
        let this = *self;
        tokio::task::spawn_blocking(move || this.read_all(offsets, &out, &shutdown)).await.map_err(
            |e| CaptureError::Definite {
                message: format!("kafka reader panicked: {e}"),
                hint: None,
            },
        )?
    }
}

fn transient(message: String, err: rdkafka::error::KafkaError) -> CaptureError {
    CaptureError::Transient { message, source: Some(Box::new(err)) }
}

impl KafkaSource {
    fn consumer(&self) -> Result<BaseConsumer<KafkaContext>, CaptureError> {
        client_config(&self.spec.brokers)
            .set("group.id", &self.spec.group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            // librdkafka's default of 500 ms is the latency floor of an idle
            // partition; 10 ms keeps commit-to-visible low at a small cost in requests.
            .set("fetch.wait.max.ms", "10")
            .set("queued.max.messages.kbytes", PREFETCH_KBYTES)
            .set("auto.offset.reset", "earliest")
            .create_with_context(KafkaContext)
            .map_err(|e| CaptureError::Definite {
                message: format!("cannot create the kafka consumer: {e}"),
                hint: Some("check `source.brokers`".into()),
            })
    }

    /// The partitions to read with the plain consumer: every partition of the
    /// topics (legacy), or of the lookup topics (group mode).
    fn plain_targets(
        &self,
        consumer: &BaseConsumer<KafkaContext>,
    ) -> Result<Vec<(String, i32)>, CaptureError> {
        let topics = match &self.group {
            Some(g) => &g.lookup_topics,
            None => &self.spec.topics,
        };
        let mut out = Vec::new();
        for topic in topics {
            let meta = consumer
                .fetch_metadata(Some(topic), REQUEST_TIMEOUT)
                .map_err(|e| transient(format!("cannot read the metadata of `{topic}`"), e))?;
            let Some(t) = meta.topics().iter().find(|t| t.name() == topic) else { continue };
            if t.error().is_some() || t.partitions().is_empty() {
                // Debezium creates a table's topic with its first change; ours are
                // all created by `caudal capture`. A missing one has nothing yet.
                warn!(topic = %topic, "topic not found; not reading it");
                continue;
            }
            out.extend(t.partitions().iter().map(|p| (topic.clone(), p.id())));
        }
        Ok(out)
    }

    /// The parts of `targets` with the offset to start at and the end at start;
    /// `prefix` starts their names, `ci` is their consumer's index.
    fn parts<C: ConsumerContext>(
        &self,
        consumer: &BaseConsumer<C>,
        targets: &[(String, i32)],
        offsets: &Offsets,
        prefix: &str,
        ci: usize,
    ) -> Result<(Vec<Part>, TopicPartitionList), CaptureError> {
        let mut parts = Vec::new();
        let mut assignment = TopicPartitionList::new();
        for (topic, partition) in targets {
            let Some(ti) = self.spec.topics.iter().position(|t| t == topic) else { continue };
            let (low, high) = consumer
                .fetch_watermarks(topic, *partition, REQUEST_TIMEOUT)
                .map_err(|e| transient(format!("cannot read the offsets of `{topic}`"), e))?;
            let key = format!("{topic}/{partition}");
            let next = offsets.get(&key).copied().unwrap_or(low).max(low);
            let name: Arc<str> = format!("{prefix}{key}").into();
            assignment
                .add_partition_offset(topic, *partition, Offset::Offset(next))
                .map_err(|e| transient(format!("cannot assign `{name}`"), e))?;
            let topic_c =
                std::ffi::CString::new(topic.as_str()).map_err(|_| CaptureError::Definite {
                    message: format!("topic name `{topic}` has a NUL byte"),
                    hint: None,
                })?;
            parts.push(Part {
                name,
                topic: ti,
                next,
                high,
                low,
                fetched_high: None,
                gap_warned: false,
                topic_c,
                partition: *partition,
                consumer: ci,
            });
        }
        Ok((parts, assignment))
    }

    /// Finds the partitions to read, with the offset to start at and the end at
    /// start, and assigns them.
    fn setup(
        &self,
        consumer: &BaseConsumer<KafkaContext>,
        offsets: &Offsets,
    ) -> Result<Vec<Part>, CaptureError> {
        let targets = self.plain_targets(consumer)?;
        let prefix = if self.group.is_some() { STATE_PARTITION_PREFIX } else { "" };
        let (mut parts, assignment) = self.parts(consumer, &targets, offsets, prefix, 0)?;
        if let Some(g) = &self.group {
            let member = &g.member.consumer;
            let (owned, tpl) = self.parts(member, &g.assigned, offsets, "", 1)?;
            member.assign(&tpl).map_err(|e| transient("cannot assign partitions".into(), e))?;
            parts.extend(owned);
        } else if parts.is_empty() {
            return Err(CaptureError::Transient {
                message: format!("none of the topics {:?} exists yet", self.spec.topics),
                source: None,
            });
        }
        consumer
            .assign(&assignment)
            .map_err(|e| transient("cannot assign partitions".into(), e))?;
        Ok(parts)
    }

    fn read_all(
        mut self,
        offsets: Offsets,
        out: &bus::Sender,
        shutdown: &CancellationToken,
    ) -> Result<(), CaptureError> {
        let consumer = self.consumer()?;
        let mut backoff = RETRY_MIN;
        let mut parts = loop {
            match self.setup(&consumer, &offsets) {
                Ok(parts) => break parts,
                Err(e) if e.is_transient() => {
                    if shutdown.is_cancelled() {
                        return Ok(());
                    }
                    warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "kafka unavailable, retrying");
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(RETRY_MAX);
                }
                Err(e) => return Err(e),
            }
        };
        info!(partitions = parts.len(), topics = self.spec.topics.len(), "reading kafka");
        let mut group = self.group.take();
        let member = group.as_ref().map(|g| g.member.clone());
        let mut consumers = vec![Consumers::Plain(&consumer)];
        if let Some(m) = &member {
            consumers.push(Consumers::Group(&m.consumer));
        }
        // Per consumer: topic name -> (partition -> index in `parts`), looked up
        // without allocating.
        let mut index: Vec<HashMap<String, HashMap<i32, usize>>> =
            consumers.iter().map(|_| HashMap::new()).collect();
        for (i, p) in parts.iter().enumerate() {
            let topic = self.spec.topics[p.topic].clone();
            index[p.consumer].entry(topic).or_default().insert(p.partition, i);
        }
        let unreadable: Vec<bool> =
            self.spec.topics.iter().map(|t| self.unreadable.contains(t)).collect();
        // Topic names as they prefix a decoder line: `{"topic":"<name>",`.
        let topic_json: Vec<String> = self
            .spec
            .topics
            .iter()
            .map(|t| serde_json::to_string(t).unwrap_or_else(|_| "\"\"".into()))
            .collect();
        let pool = BytePool::new(8);
        let mut decoder = Decoder::new(self.catalog.clone());
        let mut asked_at: Option<Instant> = None;
        // Alternate between the consumers when there are two.
        let mut turn = 0usize;
        let mut spare: Option<Vec<u8>> = None;
        loop {
            if shutdown.is_cancelled() {
                return Ok(());
            }
            if member.as_ref().is_some_and(|m| m.revoked()) {
                // Everything sent so far gets committed when the stream ends; the
                // worker then unassigns, and the rebalance goes on.
                return Ok(());
            }
            if self.spec.exit_at_end {
                for p in parts.iter_mut().filter(|p| p.fetched_high.is_none()) {
                    p.fetched_high = consumers[p.consumer].fetched_end(&p.topic_c, p.partition);
                }
                if parts.iter().all(Part::at_end) {
                    match group.as_mut().map(|g| g.group_done.as_mut()) {
                        None => return Ok(()),
                        Some(None) => {}
                        Some(Some(done)) => {
                            if asked_at.is_none_or(|t| t.elapsed() >= GROUP_DONE_EVERY) {
                                asked_at = Some(Instant::now());
                                if done() {
                                    if let Some(m) = &member {
                                        m.finished.store(true, Ordering::SeqCst);
                                    }
                                    return Ok(());
                                }
                            }
                        }
                    }
                }
            }
            // An idle round hands its unused buffer to the next one.
            let mut buf = spare.take().unwrap_or_else(|| pool.take(1 << 20));
            // (decoder line, raw bytes, origin, index in `parts`, from the unreadable topic)
            let mut lines: Vec<(RawSpan, RawSpan, u64, usize, bool)> = Vec::new();
            let mut begun = false;
            let mut read_any = false;
            while lines.len() < MAX_BATCH_MESSAGES && buf.len() < MAX_BATCH_BYTES {
                // Once a batch has begun, it takes only what librdkafka already
                // holds and is handed on as soon as that runs out: waiting for more
                // would add its wait to every event's latency, and a backlog fills
                // batches anyway (the processor's trigger interval sets commit size).
                let wait = if begun { Duration::ZERO } else { IDLE_POLL };
                let msg = if consumers.len() == 1 {
                    consumers[0].poll(wait)
                } else {
                    // Two consumers: take what either has without waiting, and wait
                    // (briefly, on each in turn) only when both are empty.
                    let mut got = None;
                    for _ in 0..consumers.len() {
                        turn = (turn + 1) % consumers.len();
                        got = consumers[turn].poll(Duration::ZERO);
                        if got.is_some() {
                            break;
                        }
                    }
                    if got.is_none() {
                        turn = (turn + 1) % consumers.len();
                        got = consumers[turn].poll(wait.min(MULTI_POLL_SLICE));
                    }
                    got
                };
                let msg = match msg {
                    None => break,
                    Some(Err(e)) => {
                        // Fetch errors (broker gone, leader moving) are retried by
                        // librdkafka at the same offsets.
                        warn!(error = %e, "kafka fetch error, retrying");
                        break;
                    }
                    Some(Ok(m)) => m,
                };
                if member.as_ref().is_some_and(|m| m.revoked()) {
                    // Revoked inside this poll: what was not sent is read again
                    // by whoever gets the partitions.
                    return Ok(());
                }
                begun = true;
                let Some(&pi) = index[turn].get(msg.topic()).and_then(|t| t.get(&msg.partition()))
                else {
                    continue;
                };
                let part = &mut parts[pi];
                if msg.offset() < part.next {
                    continue; // already read (a fetch repeated after a reconnect)
                }
                if msg.offset() > part.next && !part.gap_warned {
                    // Compaction leaves gaps; otherwise the broker skipped messages
                    // (tansu 0.6's memory storage does after a mid-batch seek).
                    warn!(partition = %part.name, from = part.next, to = msg.offset(),
                        "kafka skipped offsets: compaction, or a broker that lost messages");
                    part.gap_warned = true;
                }
                part.next = msg.offset() + 1;
                read_any = true;
                // Tombstones carry no change: Debezium's delete is the message before.
                let Some(value) = msg.payload().filter(|v| !v.is_empty()) else { continue };
                let ti = part.topic;
                if unreadable[ti] {
                    let origin =
                        msg.key().and_then(unreadable_origin).unwrap_or(msg.offset() as u64);
                    let span = push(&mut buf, &[value]);
                    lines.push((span, span, origin, pi, true));
                } else {
                    let (line, raw) = wrap(&mut buf, &topic_json[ti], value);
                    lines.push((line, raw, msg.offset() as u64, pi, false));
                }
            }
            if !read_any {
                spare = Some(buf);
                continue;
            }
            let bytes = Arc::new(PooledBytes::new(buf, Some(pool.clone())));
            decoder.start_batch();
            let mut events = Vec::with_capacity(lines.len());
            for (line, raw, origin, pi, is_unreadable) in lines {
                let text = &bytes[line.start as usize..(line.start + line.len) as usize];
                let mut event = decoder.decode(text, origin, Some(raw));
                match &mut event {
                    Event::Change(c) => c.source.partition = Some(parts[pi].name.clone()),
                    // An unreadable input keeps its original bytes as its payload.
                    Event::Bad(b) if !is_unreadable => b.payload = raw.text(&bytes),
                    Event::Bad(_) => {}
                }
                events.push(event);
            }
            let checkpoint: Offsets = parts.iter().map(|p| (p.name.to_string(), p.next)).collect();
            let checkpoint = Checkpoint(serde_json::to_string(&checkpoint).unwrap_or_default());
            let batch = Batch { events, checkpoint, bytes: Some(bytes), caught_up_ms: None };
            if out.blocking_send(batch).is_err() {
                return Err(CaptureError::Closed);
            }
        }
    }
}

/// Appends `pieces` to `buf`; the span they cover.
fn push(buf: &mut Vec<u8>, pieces: &[&[u8]]) -> RawSpan {
    let start = buf.len();
    for p in pieces {
        buf.extend_from_slice(p);
    }
    RawSpan { start: start as u32, len: (buf.len() - start) as u32 }
}

/// Appends the decoder line of a message value: `{"topic":T,"value":V}` for a bare
/// envelope (the raw span is `V` exactly), or `{"topic":T,"schema":..,"payload":..}`
/// for a value with a schema (the raw span is the whole line). Returns the line's
/// span and the raw span.
fn wrap(buf: &mut Vec<u8>, topic_json: &str, value: &[u8]) -> (RawSpan, RawSpan) {
    let body = value.trim_ascii_start();
    let with_schema =
        body.first() == Some(&b'{') && body[1..].trim_ascii_start().starts_with(b"\"schema\"");
    if with_schema {
        let span = push(buf, &[b"{\"topic\":", topic_json.as_bytes(), b",", &body[1..]]);
        (span, span)
    } else {
        let start = buf.len();
        push(buf, &[b"{\"topic\":", topic_json.as_bytes(), b",\"value\":"]);
        let raw = push(buf, &[value]);
        buf.push(b'}');
        (RawSpan { start: start as u32, len: (buf.len() - start) as u32 }, raw)
    }
}

/// The origin in an unreadable input's key, `{"origin": N}`.
fn unreadable_origin(key: &[u8]) -> Option<u64> {
    #[derive(serde::Deserialize)]
    struct K {
        origin: u64,
    }
    serde_json::from_slice::<K>(key).ok().map(|k| k.origin)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(buf: &[u8], s: RawSpan) -> &str {
        std::str::from_utf8(&buf[s.start as usize..(s.start + s.len) as usize]).unwrap_or("")
    }

    #[test]
    fn wraps_bare_and_schema_values_as_decoder_lines() {
        let mut buf = b"xx".to_vec();
        let (line, raw) = wrap(&mut buf, "\"db.t\"", br#"{"op":"c"}"#);
        assert_eq!(text(&buf, line), r#"{"topic":"db.t","value":{"op":"c"}}"#);
        assert_eq!(text(&buf, raw), r#"{"op":"c"}"#);
        let (line, raw) = wrap(&mut buf, "\"db.t\"", br#" { "schema":{},"payload":{"op":"c"}}"#);
        assert_eq!(text(&buf, line), r#"{"topic":"db.t", "schema":{},"payload":{"op":"c"}}"#);
        assert_eq!(line, raw);
    }

    #[test]
    fn reads_the_origin_of_unreadable_inputs() {
        assert_eq!(unreadable_origin(br#"{"origin":42}"#), Some(42));
        assert_eq!(unreadable_origin(b"nope"), None);
    }
}
