//! A file of Debezium JSON lines (the shared workload format, or bare envelopes).
//!
//! The file is read in large chunks cut at line ends; chunks are decoded on
//! several threads (JSON decoding is most of the cost of this source) and handed
//! downstream in file order, one [`Batch`] per chunk. The checkpoint is the byte
//! offset after the chunk and the number of lines before it, so a restart seeks
//! straight to the first line not yet durable. Each change keeps its original line
//! (a slice of the shared chunk, not a copy) for quarantine.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::{CaptureError, Source};
use crate::bus;
use crate::event::debezium::Decoder;
use crate::event::{Batch, BytePool, Catalog, Checkpoint, PooledBytes, RawSpan};

/// Bytes per chunk: about two thousand workload lines, large enough to amortize
/// the hand-offs between threads, small enough to keep the queues' memory low.
pub const CHUNK_BYTES: usize = 1 << 20;
/// How often a followed file is polled for new lines.
const FOLLOW_POLL: Duration = Duration::from_millis(200);

/// Where to resume reading.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileCheckpoint {
    /// Byte offset of the first line not yet handed downstream.
    pub offset: u64,
    /// Lines before `offset`.
    pub line: u64,
}

impl FileCheckpoint {
    fn token(self) -> Checkpoint {
        Checkpoint(serde_json::to_string(&self).unwrap_or_default())
    }
}

/// Reads Debezium JSON lines from a file.
pub struct FileSource {
    path: PathBuf,
    follow: bool,
    catalog: Arc<Catalog>,
    threads: usize,
}

impl FileSource {
    /// `threads` decoding threads (at least one).
    pub fn new(path: PathBuf, follow: bool, catalog: Arc<Catalog>, threads: usize) -> Self {
        Self { path, follow, catalog, threads: threads.max(1) }
    }
}

struct Chunk {
    seq: u64,
    data: Arc<PooledBytes>,
    /// Offset of `data` in the file, and lines before it.
    start: FileCheckpoint,
}

#[async_trait]
impl Source for FileSource {
    fn kind(&self) -> &'static str {
        "file"
    }

    async fn run(
        self: Box<Self>,
        resume: Option<Checkpoint>,
        out: bus::Sender,
        shutdown: CancellationToken,
    ) -> Result<(), CaptureError> {
        let start = match &resume {
            Some(cp) => super::parse_checkpoint(cp, "file position")?.unwrap_or_default(),
            None => FileCheckpoint::default(),
        };
        let this = *self;
        tokio::task::spawn_blocking(move || this.read_all(start, out, shutdown)).await.map_err(
            |e| CaptureError::Definite {
                message: format!("file reader panicked: {e}"),
                hint: None,
            },
        )?
    }
}

impl FileSource {
    fn read_all(
        self,
        start: FileCheckpoint,
        out: bus::Sender,
        shutdown: CancellationToken,
    ) -> Result<(), CaptureError> {
        let mut file = File::open(&self.path).map_err(|e| CaptureError::Definite {
            message: format!("cannot open input `{}`: {e}", self.path.display()),
            hint: Some("check the `source.path` setting or the --input flag".into()),
        })?;
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        if start.offset > len && !self.follow {
            return Err(CaptureError::Definite {
                message: format!(
                    "checkpoint offset {} is past the end of `{}` ({len} bytes)",
                    start.offset,
                    self.path.display()
                ),
                hint: Some("the input file was replaced; start with a new store".into()),
            });
        }
        file.seek(SeekFrom::Start(start.offset)).map_err(|e| CaptureError::Definite {
            message: format!("cannot seek `{}`: {e}", self.path.display()),
            hint: None,
        })?;

        let (work_tx, work_rx) = mpsc::sync_channel::<Chunk>(self.threads);
        let work_rx = Arc::new(Mutex::new(work_rx));
        let (done_tx, done_rx) = mpsc::sync_channel::<(u64, Batch)>(self.threads);
        let catalog = self.catalog.clone();

        std::thread::scope(|scope| {
            for _ in 0..self.threads {
                let work_rx = work_rx.clone();
                let done_tx = done_tx.clone();
                let catalog = catalog.clone();
                scope.spawn(move || {
                    let mut decoder = Decoder::new(catalog).lazy_before(true);
                    loop {
                        // Hold the lock only to take the next chunk.
                        let next = work_rx.lock().ok().and_then(|rx| rx.recv().ok());
                        let Some(chunk) = next else { break };
                        let batch = decode_chunk(&mut decoder, &chunk);
                        if done_tx.send((chunk.seq, batch)).is_err() {
                            break;
                        }
                    }
                });
            }
            drop(done_tx);

            // Hand batches downstream in file order.
            let collector = scope.spawn(move || {
                let mut waiting = BTreeMap::new();
                let mut next = 0u64;
                for (seq, batch) in done_rx {
                    waiting.insert(seq, batch);
                    while let Some(batch) = waiting.remove(&next) {
                        next += 1;
                        if out.blocking_send(batch).is_err() {
                            return Err(CaptureError::Closed);
                        }
                    }
                }
                Ok(())
            });

            let read = self.read_chunks(&mut file, start, &work_tx, &shutdown);
            drop(work_tx);
            let sent = collector.join().unwrap_or(Err(CaptureError::Closed));
            read.and(sent)
        })
    }

    fn read_chunks(
        &self,
        file: &mut File,
        start: FileCheckpoint,
        work: &mpsc::SyncSender<Chunk>,
        shutdown: &CancellationToken,
    ) -> Result<(), CaptureError> {
        // Enough buffers for every chunk that can be in flight (queues and decoders).
        let pool = BytePool::new(self.threads * 4 + 16);
        let mut pos = start;
        let mut tail: Vec<u8> = Vec::new();
        let mut seq = 0u64;
        loop {
            if shutdown.is_cancelled() {
                return Ok(());
            }
            let mut data = pool.take(CHUNK_BYTES + tail.len());
            data.extend_from_slice(&tail);
            tail.clear();
            let want = CHUNK_BYTES as u64;
            // `read_to_end` fills the spare capacity without zeroing it first.
            let n = Read::by_ref(file).take(want).read_to_end(&mut data).map_err(|e| {
                CaptureError::Definite {
                    message: format!("cannot read `{}`: {e}", self.path.display()),
                    hint: None,
                }
            })?;
            let at_end = n == 0;
            if at_end && self.follow {
                tail = data;
                std::thread::sleep(FOLLOW_POLL);
                continue;
            }
            if at_end && data.is_empty() {
                return Ok(());
            }
            // Cut at the last line end; the partial line starts the next chunk
            // (at the end of the file, a last line without a newline still counts).
            if !at_end {
                match memchr::memrchr(b'\n', &data) {
                    Some(last_nl) => {
                        tail.extend_from_slice(&data[last_nl + 1..]);
                        data.truncate(last_nl + 1);
                    }
                    None => {
                        tail = data;
                        continue;
                    }
                }
            }
            let lines = memchr::memchr_iter(b'\n', &data).count() as u64;
            let len = data.len() as u64;
            let chunk = Chunk {
                seq,
                data: Arc::new(PooledBytes::new(data, Some(pool.clone()))),
                start: pos,
            };
            pos = FileCheckpoint { offset: pos.offset + len, line: pos.line + lines };
            seq += 1;
            if work.send(chunk).is_err() {
                return Err(CaptureError::Closed);
            }
            if at_end {
                return Ok(());
            }
        }
    }
}

fn decode_chunk(decoder: &mut Decoder, chunk: &Chunk) -> Batch {
    decoder.start_batch();
    let data = &chunk.data;
    let mut events = Vec::with_capacity(data.len() / 400);
    let mut line_no = chunk.start.line;
    let mut at = 0usize;
    while at < data.len() {
        let end = memchr::memchr(b'\n', &data[at..]).map_or(data.len(), |i| at + i);
        line_no += 1;
        let line = &data[at..end];
        let trimmed = line.strip_suffix(b"\r").unwrap_or(line);
        if !trimmed.iter().all(u8::is_ascii_whitespace) {
            let raw = RawSpan { start: at as u32, len: trimmed.len() as u32 };
            events.push(decoder.decode(trimmed, line_no, Some(raw)));
        }
        at = end + 1;
    }
    let end = FileCheckpoint { offset: chunk.start.offset + data.len() as u64, line: line_no };
    Batch { events, checkpoint: end.token(), bytes: Some(chunk.data.clone()), caught_up_ms: None }
}
