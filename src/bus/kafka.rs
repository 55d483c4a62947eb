//! Kafka as the bus between `caudal capture` and processing: one topic per table.
//!
//! # Topics and messages
//!
//! A change of table `t` goes to `<topic_prefix>.<t>` with the Debezium key JSON
//! as the message key and the Debezium envelope (schemas disabled) as the value,
//! so that Debezium consumers and tools read these topics unchanged. When a source
//! kept the input's bytes (file source), the envelope is published exactly as it
//! arrived; otherwise it is encoded from the change. A delete is the envelope with
//! op `d` followed by a tombstone (same key, null value), as Debezium does, so
//! that compacted topics forget deleted rows. Keys are partitioned with
//! `murmur2_random`, the Java client's partitioner: Kafka Streams, Connect and
//! Debezium put a key in the same partition as we do, and every change of one
//! row stays in order in one partition.
//!
//! An input that could not be decoded goes, raw, to `<prefix>.caudal_unreadable`
//! (key `{"origin": N}`, N its sequence number in the source), so processing
//! quarantines it exactly as a single-process run would: nothing is dropped.
//!
//! # Delivery and checkpoint
//!
//! The producer is idempotent with `acks=all`: a retried send is not duplicated
//! by the broker and stays in order. `caudal capture` keeps its own checkpoint in
//! Kafka, in the compacted one-partition topic `<prefix>.caudal_capture` keyed by
//! the pipeline name, written only once every message of the batches before it
//! is acknowledged. A crash re-publishes at most the batches after the last
//! checkpoint; processing drops those duplicates by source position, with one
//! high-water mark per topic partition.
//!
//! Kafka transactions are not used: brokers such as tansu lack them, and the
//! consumer's exactly-once comes from storing offsets in the sink's transaction.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::value::RawValue;
use tracing::{debug, info, warn};

use crate::config::spec::KafkaSpec;
use crate::event::debezium::{encode_envelope, encode_key};
use crate::event::{Batch, Catalog, Checkpoint, Event, Op};

/// How long a metadata, watermark or admin request may take before it counts as
/// a broker that is not there.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Batches published but not yet acknowledged: enough to keep the producer busy
/// while the oldest batch's acknowledgements come back, few enough that a crash
/// re-publishes little.
const BATCHES_IN_FLIGHT: usize = 8;
/// How long the producer waits to fill a request: a few milliseconds of latency
/// buy much larger (better compressed) requests at high rates.
const LINGER_MS: &str = "5";

/// Errors of the Kafka bus, classified by what happens next.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// Broker unreachable or busy: retry with backoff, or restart later.
    #[error("kafka unavailable: {message}")]
    Transient {
        message: String,
        #[source]
        source: Option<KafkaError>,
    },
    /// Needs an operator: a bad setting, a topic that cannot be created, a fatal
    /// producer error.
    #[error("{message}")]
    Definite {
        message: String,
        #[source]
        source: Option<KafkaError>,
    },
}

impl BusError {
    pub fn is_transient(&self) -> bool {
        matches!(self, BusError::Transient { .. })
    }

    /// Classifies a client error: configuration and fatal errors are definite,
    /// everything else (timeouts, transport, leader changes) is transient.
    pub fn from_kafka(context: impl Into<String>, err: KafkaError) -> Self {
        let message = format!("{}: {err}", context.into());
        let definite = matches!(
            err,
            KafkaError::ClientConfig(..)
                | KafkaError::ClientCreation(_)
                | KafkaError::Transaction(_)
        ) || matches!(
            err.rdkafka_error_code(),
            Some(
                RDKafkaErrorCode::Fatal
                    | RDKafkaErrorCode::TopicAuthorizationFailed
                    | RDKafkaErrorCode::ClusterAuthorizationFailed
                    | RDKafkaErrorCode::InvalidConfig
                    | RDKafkaErrorCode::InvalidReplicationFactor
                    | RDKafkaErrorCode::InvalidPartitions
                    | RDKafkaErrorCode::MessageSizeTooLarge
                    | RDKafkaErrorCode::InvalidTopic
            )
        );
        if definite {
            BusError::Definite { message, source: Some(err) }
        } else {
            BusError::Transient { message, source: Some(err) }
        }
    }
}

/// Routes librdkafka's logs and errors to `tracing` (its default is the `log` crate,
/// which this binary does not print).
#[derive(Clone, Default)]
pub struct KafkaContext;

impl ClientContext for KafkaContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error
            | RDKafkaLogLevel::Warning => warn!(facility = fac, "librdkafka: {message}"),
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                info!(facility = fac, "librdkafka: {message}")
            }
            RDKafkaLogLevel::Debug => debug!(facility = fac, "librdkafka: {message}"),
        }
    }

    /// Client-level errors (a broker down, a connection refused) are retried by
    /// librdkafka itself: a recovered surprise, so a warning.
    fn error(&self, error: KafkaError, reason: &str) {
        warn!(error = %error, "kafka client error, retrying: {reason}");
    }
}

impl ConsumerContext for KafkaContext {}

/// Settings every client shares.
pub fn client_config(brokers: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers)
        .set("client.id", "caudal")
        // Refresh metadata quickly after a broker restart or a leader change.
        .set("topic.metadata.refresh.interval.ms", "10000")
        .set("reconnect.backoff.max.ms", "1000");
    c
}

/// Publishes a pipeline's changes to Kafka.
pub struct KafkaPublisher {
    producer: FutureProducer<KafkaContext>,
    spec: KafkaSpec,
    catalog: Arc<Catalog>,
    /// Topic per table, indexed like the catalog.
    topics: Vec<String>,
    unreadable: String,
    capture: String,
}

/// What one published batch is waiting for.
pub struct Pending {
    deliveries: Vec<DeliveryFuture>,
    /// Messages in the batch (tombstones and unreadable inputs included).
    pub messages: u64,
}

impl Pending {
    /// Waits until the broker acknowledged every message of the batch.
    ///
    /// # Errors
    /// The first delivery error (after librdkafka's own retries).
    pub async fn acknowledged(self) -> Result<(), BusError> {
        for d in self.deliveries {
            match d.await {
                Ok(Ok(_)) => {}
                Ok(Err((err, _))) => return Err(BusError::from_kafka("delivery failed", err)),
                Err(_) => {
                    return Err(BusError::Transient {
                        message: "producer dropped a delivery report".into(),
                        source: None,
                    })
                }
            }
        }
        Ok(())
    }
}

impl KafkaPublisher {
    /// An idempotent producer for `spec`'s brokers.
    ///
    /// # Errors
    /// [`BusError::Definite`] when the client cannot be configured.
    pub fn new(spec: &KafkaSpec, catalog: Arc<Catalog>) -> Result<Self, BusError> {
        let producer: FutureProducer<KafkaContext> = client_config(&spec.brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("compression.codec", spec.compression.codec())
            .set("linger.ms", LINGER_MS)
            // Java-compatible key hashing (see the module doc).
            .set("partitioner", "murmur2_random")
            .create_with_context(KafkaContext)
            .map_err(|e| BusError::from_kafka("cannot create the kafka producer", e))?;
        let topics = catalog.tables().iter().map(|t| spec.topic(&t.name)).collect();
        Ok(Self {
            producer,
            unreadable: spec.unreadable_topic(),
            capture: spec.capture_topic(),
            spec: spec.clone(),
            catalog,
            topics,
        })
    }

    /// Creates the table topics (with the configured partitions), the unreadable
    /// topic and the compacted capture-checkpoint topic; existing topics are kept
    /// as they are.
    ///
    /// # Errors
    /// Transient when the broker does not answer, definite when it refuses a topic.
    pub async fn ensure_topics(&self) -> Result<(), BusError> {
        let admin: AdminClient<KafkaContext> = client_config(&self.spec.brokers)
            .create_with_context(KafkaContext)
            .map_err(|e| BusError::from_kafka("cannot create the kafka admin client", e))?;
        let options = AdminOptions::new().operation_timeout(Some(REQUEST_TIMEOUT));
        let replication = || TopicReplication::Fixed(i32::from(self.spec.replication));
        let mut data: Vec<NewTopic<'_>> = self
            .topics
            .iter()
            .chain(std::iter::once(&self.unreadable))
            .map(|t| NewTopic::new(t, self.spec.partitions, replication()))
            .collect();
        // One partition keeps the checkpoints in order; compaction keeps the last one per key.
        data.push(NewTopic::new(&self.capture, 1, replication()).set("cleanup.policy", "compact"));
        let results = admin
            .create_topics(&data, &options)
            .await
            .map_err(|e| BusError::from_kafka("cannot create topics", e))?;
        for result in results {
            match result {
                Ok(topic) => info!(topic = %topic, "created topic"),
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((topic, code)) => {
                    return Err(BusError::from_kafka(
                        format!("cannot create topic `{topic}`"),
                        KafkaError::AdminOp(code),
                    ))
                }
            }
        }
        Ok(())
    }

    /// Enqueues every event of `batch`; the returned [`Pending`] resolves once the
    /// broker acknowledged all of them. Waits (without blocking the runtime) while
    /// the producer's local queue is full.
    ///
    /// # Errors
    /// Definite when the producer refuses a message for another reason than a full queue.
    pub async fn publish(&self, batch: &Batch) -> Result<Pending, BusError> {
        let mut pending =
            Pending { deliveries: Vec::with_capacity(batch.events.len()), messages: 0 };
        let bytes = batch.bytes.as_deref().map(|b| &b[..]);
        for event in &batch.events {
            match event {
                Event::Change(c) => {
                    let topic = &self.topics[c.table];
                    let key = encode_key(&self.catalog, c);
                    let original = c.raw.zip(bytes).and_then(|(span, bytes)| {
                        let start = span.start as usize;
                        bytes.get(start..start + span.len as usize).and_then(original_envelope)
                    });
                    let value = match original {
                        Some(v) => std::borrow::Cow::Borrowed(v),
                        None => std::borrow::Cow::Owned(encode_envelope(&self.catalog, c)),
                    };
                    let record = FutureRecord::to(topic).key(key.as_str()).payload(value.as_ref());
                    pending.deliveries.push(self.send(record).await?);
                    if c.op == Op::Delete {
                        let tombstone = FutureRecord::<str, str>::to(topic).key(key.as_str());
                        pending.deliveries.push(self.send(tombstone).await?);
                    }
                }
                Event::Bad(b) => {
                    let key = format!("{{\"origin\":{}}}", b.origin);
                    let headers = OwnedHeaders::new()
                        .insert(Header { key: "caudal.reason", value: Some(b.reason) })
                        .insert(Header { key: "caudal.detail", value: Some(b.detail.as_str()) });
                    let record = FutureRecord::to(&self.unreadable)
                        .key(key.as_str())
                        .payload(b.payload.as_str())
                        .headers(headers);
                    pending.deliveries.push(self.send(record).await?);
                }
            }
        }
        pending.messages = pending.deliveries.len() as u64;
        Ok(pending)
    }

    /// Writes the capture checkpoint of `pipeline` (call only once every batch it
    /// covers is acknowledged).
    ///
    /// # Errors
    /// As [`KafkaPublisher::publish`].
    pub async fn write_checkpoint(
        &self,
        pipeline: &str,
        checkpoint: &Checkpoint,
    ) -> Result<DeliveryFuture, BusError> {
        let record = FutureRecord::to(&self.capture).key(pipeline).payload(checkpoint.0.as_str());
        self.send(record).await
    }

    /// Waits until every enqueued message is delivered or `timeout` passes.
    ///
    /// # Errors
    /// Transient when messages are still undelivered at the timeout.
    pub fn flush(&self, timeout: Duration) -> Result<(), BusError> {
        self.producer.flush(timeout).map_err(|e| BusError::from_kafka("flush failed", e))
    }

    async fn send<'a>(
        &self,
        mut record: FutureRecord<'a, str, str>,
    ) -> Result<DeliveryFuture, BusError> {
        loop {
            match self.producer.send_result(record) {
                Ok(delivery) => return Ok(delivery),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    // The local queue drains as the broker acknowledges: backpressure.
                    record = r;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Err((err, _)) => return Err(BusError::from_kafka("cannot enqueue a message", err)),
            }
        }
    }
}

/// The envelope inside an input line as it arrived: the `value` (or `payload`) of a
/// wrapped line, or the whole line when it is a bare envelope.
fn original_envelope(line: &[u8]) -> Option<&str> {
    #[derive(serde::Deserialize)]
    struct Parts<'a> {
        #[serde(borrow, default)]
        value: Option<&'a RawValue>,
        #[serde(borrow, default)]
        payload: Option<&'a RawValue>,
    }
    let text = std::str::from_utf8(line).ok()?;
    let parts: Parts<'_> = serde_json::from_str(text).ok()?;
    Some(match parts.value.or(parts.payload) {
        Some(v) => v.get(),
        None => text.trim(),
    })
}

/// Batches published and waiting for their acknowledgements, oldest first, each
/// with the checkpoint that becomes safe to store once it and every older batch
/// are acknowledged.
#[derive(Default)]
pub struct InFlight {
    queue: VecDeque<(Acknowledgement, Checkpoint, u64)>,
}

/// The task waiting for one batch's acknowledgements.
type Acknowledgement = tokio::task::JoinHandle<Result<(), BusError>>;

impl InFlight {
    pub fn push(&mut self, pending: Pending, checkpoint: Checkpoint, events: u64) {
        self.queue.push_back((tokio::spawn(pending.acknowledged()), checkpoint, events));
    }

    /// Whether the oldest batch should be waited for before publishing more.
    pub fn full(&self) -> bool {
        self.queue.len() >= BATCHES_IN_FLIGHT
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Whether the oldest batch is acknowledged (or failed) already.
    pub fn front_done(&self) -> bool {
        self.queue.front().is_some_and(|(h, _, _)| h.is_finished())
    }

    /// Waits for the oldest batch; its checkpoint and event count once acknowledged.
    ///
    /// # Errors
    /// The batch's delivery error.
    pub async fn pop(&mut self) -> Result<Option<(Checkpoint, u64)>, BusError> {
        let Some((handle, checkpoint, events)) = self.queue.pop_front() else { return Ok(None) };
        match handle.await {
            Ok(result) => result.map(|()| Some((checkpoint, events))),
            Err(e) => Err(BusError::Transient {
                message: format!("delivery task failed: {e}"),
                source: None,
            }),
        }
    }
}

/// The high watermark of a partition's last fetch response, without a request
/// (librdkafka's `rd_kafka_get_watermark_offsets`); `None` before the first fetch.
///
/// Why, next to ListOffsets (`fetch_watermarks`): tansu's in-memory storage answers
/// ListOffsets with too low an end, while its fetch responses carry the right one;
/// reading "to the end" checks both.
pub fn fetched_end<C: rdkafka::consumer::ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &std::ffi::CStr,
    partition: i32,
) -> Option<i64> {
    let (mut low, mut high) = (-1i64, -1i64);
    // SAFETY: the client pointer is valid while `consumer` lives; `topic` is a
    // NUL-terminated string that outlives the call; low and high are valid out-pointers.
    let err = unsafe {
        rdkafka::bindings::rd_kafka_get_watermark_offsets(
            consumer.client().native_ptr(),
            topic.as_ptr(),
            partition,
            &mut low,
            &mut high,
        )
    };
    (err == rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR && high >= 0)
        .then_some(high)
}

/// Reads `<prefix>.caudal_capture` to its end: the last checkpoint stored for
/// `pipeline`, if any. Blocking (run it off the async runtime).
///
/// # Errors
/// Transient when the broker does not answer.
pub fn read_capture_checkpoint(
    spec: &KafkaSpec,
    pipeline: &str,
) -> Result<Option<Checkpoint>, BusError> {
    let topic = spec.capture_topic();
    let consumer: BaseConsumer<KafkaContext> = client_config(&spec.brokers)
        .set("group.id", &spec.group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("fetch.wait.max.ms", "10")
        .create_with_context(KafkaContext)
        .map_err(|e| BusError::from_kafka("cannot create the kafka consumer", e))?;
    let (low, high) = consumer
        .fetch_watermarks(&topic, 0, REQUEST_TIMEOUT)
        .map_err(|e| BusError::from_kafka(format!("cannot read the end of `{topic}`"), e))?;
    // `high` is not trusted to be the end: a broker may answer ListOffsets with too
    // low an end (tansu 0.6's memory storage does), so the topic is read until the
    // end its fetches report too. An empty topic ends at the first fetch.
    let mut assignment = TopicPartitionList::new();
    assignment
        .add_partition_offset(&topic, 0, Offset::Offset(low))
        .map_err(|e| BusError::from_kafka("cannot assign", e))?;
    consumer.assign(&assignment).map_err(|e| BusError::from_kafka("cannot assign", e))?;
    let mut last = None;
    let deadline = std::time::Instant::now() + REQUEST_TIMEOUT * 3;
    let mut next = low;
    let topic_c = std::ffi::CString::new(topic.as_str()).map_err(|_| BusError::Definite {
        message: format!("topic name `{topic}` has a NUL byte"),
        source: None,
    })?;
    let mut fetched = None;
    while next < high || fetched.is_none_or(|h| next < h) {
        if std::time::Instant::now() > deadline {
            return Err(BusError::Transient {
                message: format!("reading `{topic}` to offset {high} timed out at {next}"),
                source: None,
            });
        }
        let polled = consumer.poll(Duration::from_millis(100));
        fetched = fetched.or_else(|| fetched_end(&consumer, &topic_c, 0));
        match polled {
            None => {}
            Some(Err(e)) => {
                warn!(error = %e, topic = %topic, "reading the capture checkpoint, retrying")
            }
            Some(Ok(m)) => {
                next = m.offset() + 1;
                if m.key() == Some(pipeline.as_bytes()) {
                    last = m.payload().map(|p| Checkpoint(String::from_utf8_lossy(p).into_owned()));
                }
            }
        }
    }
    Ok(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_original_envelope_of_each_line_shape() {
        let env = r#"{"before":null,"after":{"id":1},"source":{"table":"t"},"op":"c"}"#;
        let wrapped = format!(r#"{{"topic":"db.t","key":{{"id":1}},"value":{env}}}"#);
        assert_eq!(original_envelope(wrapped.as_bytes()), Some(env));
        let schema = format!(r#"{{"schema":{{"type":"struct"}},"payload":{env}}}"#);
        assert_eq!(original_envelope(schema.as_bytes()), Some(env));
        assert_eq!(original_envelope(env.as_bytes()), Some(env));
        assert_eq!(original_envelope(b"{not json"), None);
    }
}
