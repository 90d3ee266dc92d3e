//! Runs the protocol machines over async byte streams (QUIC streams in ferry, in-memory pipes in
//! tests). The driver owns the I/O the machines ask for: disk work runs on blocking threads, each
//! stream has its own task, and every queue between them is bounded.
//!
//! Sender: one control stream (both directions) and `data` send streams. Receiver: the same
//! control stream and the matching data receive streams. Data frames go out on whichever stream
//! is free, so a slow stream does not hold the others back.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, Mutex};

use crate::manifest::ManifestSummary;
use crate::proto::frame::{decode_frame, Frame, FrameError};
use crate::proto::{
    Lane, Receiver, RecvEvent, RecvIo, RecvIoDone, RoundVerdict, SendEvent, SendIo, SendIoDone,
    Sender, SessionError, Transmit,
};
use crate::source::Source;
use crate::store::FsStore;

/// How a driven session ended badly.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DriveError {
    /// The session failed (protocol, integrity, source or destination problem, peer's close).
    #[error(transparent)]
    Session(#[from] SessionError),
    /// The connection went away before the migration finished. Resumable.
    #[error("the connection was lost: {0}")]
    LinkLost(String),
}

impl DriveError {
    /// Whether running a new session may complete the migration.
    pub fn is_retryable(&self) -> bool {
        match self {
            DriveError::LinkLost(_) => true,
            DriveError::Session(e) => e.is_retryable(),
        }
    }
}

/// Reads frames from a byte stream.
pub struct FrameReader<R> {
    inner: R,
    buf: BytesMut,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(inner: R) -> Self {
        FrameReader {
            inner,
            buf: BytesMut::with_capacity(256 * 1024),
        }
    }

    /// The next frame; `Ok(None)` at a clean end of stream.
    pub async fn next(&mut self) -> Result<Option<Frame>, ReadError> {
        loop {
            if let Some(f) = decode_frame(&mut self.buf)? {
                return Ok(Some(f));
            }
            if self.buf.capacity() - self.buf.len() < 64 * 1024 {
                self.buf.reserve(256 * 1024);
            }
            let n = self
                .inner
                .read_buf(&mut self.buf)
                .await
                .map_err(|e| ReadError::Io(e.to_string()))?;
            if n == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(ReadError::Io("stream ended inside a frame".into()))
                };
            }
        }
    }
}

/// A frame stream failure.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("{0}")]
    Io(String),
}

async fn write_transmit<W: AsyncWrite + Unpin>(w: &mut W, t: &Transmit) -> std::io::Result<()> {
    w.write_all(&t.head).await?;
    if !t.body.is_empty() {
        w.write_all(&t.body).await?;
    }
    Ok(())
}

/// A data lane: where the sender's chunk frames go.
///
/// [`Copying`] adapts any [`AsyncWrite`]; a transport that can take ownership of buffers (QUIC's
/// `write_all_chunks`) implements this directly and saves a copy of every payload byte.
pub trait DataSink: Send + 'static {
    /// Sends one frame: `head`, then `body`.
    fn send_frame(
        &mut self,
        head: Bytes,
        body: Bytes,
    ) -> impl Future<Output = std::io::Result<()>> + Send;
    /// Ends the lane cleanly after its last frame.
    fn finish(&mut self) -> impl Future<Output = ()> + Send;
}

/// A [`DataSink`] over any byte stream (copies each frame into the stream).
pub struct Copying<W>(pub W);

impl<W: AsyncWrite + Unpin + Send + 'static> DataSink for Copying<W> {
    async fn send_frame(&mut self, head: Bytes, body: Bytes) -> std::io::Result<()> {
        self.0.write_all(&head).await?;
        if !body.is_empty() {
            self.0.write_all(&body).await?;
        }
        Ok(())
    }

    async fn finish(&mut self) {
        let _ = self.0.shutdown().await;
    }
}

enum Input {
    Frame(Frame),
    FrameError(FrameError),
    Closed(String),
    /// The control stream ended cleanly (the peer finished its side).
    End(String),
}

/// Reads frames from `r` into `tx` until the stream ends or fails. A clean end of the stream
/// is reported as `Closed(why)` when `eof` names a reason (the control stream), and silently
/// otherwise (a data stream that finished).
fn spawn_reader<R>(
    r: R,
    tx: mpsc::Sender<Input>,
    eof: Option<&'static str>,
) -> tokio::task::JoinHandle<()>
where
    R: AsyncRead + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let mut reader = FrameReader::new(r);
        loop {
            let input = match reader.next().await {
                Ok(Some(f)) => Input::Frame(f),
                Ok(None) => match eof {
                    Some(why) => Input::End(why.into()),
                    None => return,
                },
                Err(ReadError::Frame(e)) => Input::FrameError(e),
                Err(ReadError::Io(e)) => Input::Closed(e),
            };
            let last = !matches!(input, Input::Frame(_));
            if tx.send(input).await.is_err() || last {
                return;
            }
        }
    })
}

/// Most disk operations one blocking task runs (chunk reads or stores). A task
/// per chunk cost a thread wake-up and a context switch per chunk on both ends: with many small
/// files (a chunk per file) that was ≈ 15% of each end's CPU, in `futex` and the scheduler.
const IO_BATCH: usize = 16;

/// Most chunk bytes one blocking task handles: large chunks go a few at a time, so that their
/// results reach the network (or the next commit) without waiting behind a whole batch.
const IO_BATCH_BYTES: usize = 512 << 10;

/// Blocking tasks storing chunks at once on the receiver. Each may hold a staging file open
/// beyond the store's own bound, and with tiny files (a chunk each) an unbounded number of tasks
/// meant as many threads and descriptors ("Too many open files" under `ulimit -n 256`).
const STORE_TASKS: usize = 4;

/// The receiver's chunk stores and copies waiting for one of [`STORE_TASKS`] blocking tasks.
struct StoreQueue {
    waiting: std::collections::VecDeque<RecvIo>,
    running: Arc<std::sync::atomic::AtomicUsize>,
}

impl StoreQueue {
    fn new() -> Self {
        StoreQueue {
            waiting: std::collections::VecDeque::new(),
            running: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
        }
    }

    /// Starts tasks for waiting operations while fewer than [`STORE_TASKS`] run: the waiting
    /// operations are spread over the free tasks, at most [`IO_BATCH`] operations and
    /// [`IO_BATCH_BYTES`] to a task. A task counts itself out before it sends its results, so
    /// the driver, woken by them, can start the next.
    fn pump(&mut self, tx: &mpsc::Sender<Vec<RecvIoDone>>, store: &Arc<FsStore>) {
        use std::sync::atomic::Ordering;
        loop {
            let running = self.running.load(Ordering::Acquire);
            if running >= STORE_TASKS || self.waiting.is_empty() {
                return;
            }
            let per = self
                .waiting
                .len()
                .div_ceil(STORE_TASKS - running)
                .clamp(1, IO_BATCH);
            let mut batch = Vec::with_capacity(per);
            let mut bytes = 0;
            while let Some(op) = self.waiting.front() {
                let n = store_size(op);
                if !batch.is_empty() && (batch.len() >= per || bytes + n > IO_BATCH_BYTES) {
                    break;
                }
                bytes += n;
                batch.extend(self.waiting.pop_front());
            }
            self.running.fetch_add(1, Ordering::AcqRel);
            let (tx, store, count) = (tx.clone(), Arc::clone(store), Arc::clone(&self.running));
            tokio::task::spawn_blocking(move || {
                let done: Vec<RecvIoDone> = batch.into_iter().map(|op| store.execute(op)).collect();
                drop(store);
                count.fetch_sub(1, Ordering::AcqRel);
                let _ = tx.blocking_send(done);
            });
        }
    }
}

/// Runs blocking disk operations off the async threads, several per task; each task's results
/// come back on `tx` together.
///
/// `ops` are split into at least two tasks when there are two or more (both cores verify and
/// copy), at most [`IO_BATCH`] operations and [`IO_BATCH_BYTES`] (by `size`) to a task.
fn spawn_io_batches<S, I, T>(
    tx: &mpsc::Sender<Vec<T>>,
    exec: &Arc<S>,
    ops: Vec<I>,
    size: fn(&I) -> usize,
    run: fn(&S, I) -> T,
) where
    S: Send + Sync + 'static,
    I: Send + 'static,
    T: Send + 'static,
{
    let per = ops.len().div_ceil(2).clamp(1, IO_BATCH);
    let mut batch = Vec::with_capacity(per);
    let mut bytes = 0;
    for op in ops {
        let n = size(&op);
        if !batch.is_empty() && (batch.len() >= per || bytes + n > IO_BATCH_BYTES) {
            spawn_io_batch(tx, exec, std::mem::take(&mut batch), run);
            bytes = 0;
        }
        bytes += n;
        batch.push(op);
    }
    if !batch.is_empty() {
        spawn_io_batch(tx, exec, batch, run);
    }
}

/// One blocking task for `batch`. It drops its `Arc` of `exec` (the store and its lock, or the
/// source) before it sends: once the machine has seen every completion and the session
/// returns, no task holds them any more.
fn spawn_io_batch<S, I, T>(
    tx: &mpsc::Sender<Vec<T>>,
    exec: &Arc<S>,
    batch: Vec<I>,
    run: fn(&S, I) -> T,
) where
    S: Send + Sync + 'static,
    I: Send + 'static,
    T: Send + 'static,
{
    let tx = tx.clone();
    let exec = Arc::clone(exec);
    tokio::task::spawn_blocking(move || {
        let done: Vec<T> = batch.into_iter().map(|op| run(&exec, op)).collect();
        drop(exec);
        let _ = tx.blocking_send(done);
    });
}

fn read_size(io: &SendIo) -> usize {
    match io {
        SendIo::Read { len, .. } => *len as usize,
    }
}

fn store_size(io: &RecvIo) -> usize {
    match io {
        RecvIo::Store { payload, .. } => payload.len(),
        // The chunk's length is not in the request; count the smallest chunk size.
        RecvIo::Copy { .. } => 1 << crate::manifest::MIN_CHUNK_SHIFT,
        RecvIo::Prepare { .. } | RecvIo::Commit { .. } | RecvIo::Finalize => 0,
    }
}

/// Sender-side statistics of a finished session.
#[derive(Debug, Clone, Copy, Default)]
pub struct SendStats {
    /// Chunk payload bytes sent (after compression).
    pub wire_bytes: u64,
    /// Chunk bytes sent (before compression).
    pub raw_bytes: u64,
    pub chunks: u64,
}

/// How long a sender waits for the receiver to end its side after the final verdict.
const FINAL_ACK_WITHIN: Duration = Duration::from_secs(5);

/// What the sender application decides once the receiver finished a round.
#[derive(Debug)]
pub enum Verdict<T> {
    /// The receiver's tree is final: close with `Done`.
    Final,
    /// Another round follows (the source changed); `T` is handed back in [`SendEnd::Next`].
    Next(T),
}

/// How a sender session (one round) ended well.
#[derive(Debug)]
pub enum SendEnd<T> {
    /// The receiver verified the round and the migration is closed with `Done`.
    Final,
    /// The receiver verified the round and `NextRound` was sent: serve the next round.
    Next(T),
    /// A source file changed under a read; the round ended early with `NextRound`: rescan and
    /// serve the next round (the receiver keeps what it verified).
    SourceChanged { path: String },
}

/// Runs a single-round sender session to its end (the verdict is always final). `on_event`
/// sees every event.
pub async fn run_sender<CR, CW, DW>(
    sender: Sender,
    source: Arc<Source>,
    control_read: CR,
    control_write: CW,
    data: Vec<DW>,
    on_event: impl FnMut(&SendEvent),
) -> (Result<(), DriveError>, SendStats)
where
    CR: AsyncRead + Unpin + Send + 'static,
    CW: AsyncWrite + Unpin + Send + 'static,
    DW: DataSink,
{
    let (r, stats) = run_sender_round(
        sender,
        source,
        control_read,
        control_write,
        data,
        on_event,
        || async { Verdict::<()>::Final },
    )
    .await;
    let r = match r {
        Ok(SendEnd::Final | SendEnd::Next(())) => Ok(()),
        Ok(SendEnd::SourceChanged { path }) => Err(DriveError::Session(SessionError::Source(
            format!("{path} changed while it was being sent"),
        ))),
        Err(e) => Err(e),
    };
    (r, stats)
}

/// Runs one round of a sender session. When the receiver reports the round done, `decide` is
/// called and awaited (it may rescan, or wait for the next change): its verdict is sent, ending
/// the session. While it runs, a receiver that goes away ends the session as a lost link.
pub async fn run_sender_round<CR, CW, DW, T, F, Fut>(
    sender: Sender,
    source: Arc<Source>,
    control_read: CR,
    control_write: CW,
    data: Vec<DW>,
    on_event: impl FnMut(&SendEvent),
    decide: F,
) -> (Result<SendEnd<T>, DriveError>, SendStats)
where
    CR: AsyncRead + Unpin + Send + 'static,
    CW: AsyncWrite + Unpin + Send + 'static,
    DW: DataSink,
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Verdict<T>>,
{
    let io = SenderIo {
        source,
        control_read,
        control_write,
        data,
    };
    run_sender_session(sender, io, None, on_event, decide).await
}

/// The manifest of a streaming sender ([`Sender::streaming`]), as the application's scan
/// produces it: entries in path order, then the end.
#[derive(Debug)]
pub enum Feed {
    Entries(Vec<crate::manifest::WireEntry>),
    End,
}

/// Like [`run_sender_round`] for a streaming sender: `feed` brings the manifest while the
/// session runs (a bounded channel: the scan waits while the session is behind). A feed that
/// closes without [`Feed::End`] fails the session (the scan failed).
pub async fn run_sender_round_streaming<CR, CW, DW, T, F, Fut>(
    sender: Sender,
    io: SenderIo<CR, CW, DW>,
    feed: mpsc::Receiver<Feed>,
    on_event: impl FnMut(&SendEvent),
    decide: F,
) -> (Result<SendEnd<T>, DriveError>, SendStats)
where
    CR: AsyncRead + Unpin + Send + 'static,
    CW: AsyncWrite + Unpin + Send + 'static,
    DW: DataSink,
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Verdict<T>>,
{
    run_sender_session(sender, io, Some(feed), on_event, decide).await
}

/// What a sender session reads from and writes to.
pub struct SenderIo<CR, CW, DW> {
    pub source: Arc<Source>,
    pub control_read: CR,
    pub control_write: CW,
    pub data: Vec<DW>,
}

/// Hands one item of a streaming sender's feed to the machine; `false` once the feed is over.
fn feed_input(sender: &mut Sender, item: Option<Feed>) -> bool {
    match item {
        Some(Feed::Entries(entries)) => {
            // A refused entry fails the session (the machine reports it).
            let _ = sender.push_entries(entries);
            true
        }
        Some(Feed::End) => {
            sender.end_manifest();
            false
        }
        None => {
            if !sender.manifest_complete() && !sender.is_closed() {
                sender.abort(SessionError::Source(
                    "the scan ended before the manifest was complete".into(),
                ));
            }
            false
        }
    }
}

async fn run_sender_session<CR, CW, DW, T, F, Fut>(
    mut sender: Sender,
    io: SenderIo<CR, CW, DW>,
    mut feed: Option<mpsc::Receiver<Feed>>,
    mut on_event: impl FnMut(&SendEvent),
    decide: F,
) -> (Result<SendEnd<T>, DriveError>, SendStats)
where
    CR: AsyncRead + Unpin + Send + 'static,
    CW: AsyncWrite + Unpin + Send + 'static,
    DW: DataSink,
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Verdict<T>>,
{
    let SenderIo {
        source,
        control_read,
        mut control_write,
        data,
    } = io;
    let mut decide = Some(decide);
    let (in_tx, mut in_rx) = mpsc::channel::<Input>(16);
    spawn_reader(
        control_read,
        in_tx,
        Some("the peer closed the control stream"),
    );
    let mut lanes = spawn_data_writers(data);
    let max_reads = 64;
    let (io_tx, mut io_rx) = mpsc::channel::<Vec<SendIoDone>>(max_reads);
    let mut result: Option<Result<SendEnd<T>, DriveError>> = None;

    loop {
        // Drain the machine.
        if let Err(e) = send_transmits(&mut sender, &mut control_write, &mut lanes).await {
            result.get_or_insert(Err(e));
            break;
        }
        let reads: Vec<_> = std::iter::from_fn(|| sender.poll_io()).collect();
        if !reads.is_empty() {
            spawn_io_batches(&io_tx, &source, reads, read_size, Source::execute);
        }
        sender_events(&mut sender, &mut on_event, &mut result);
        if sender.is_awaiting_verdict() {
            // Everything queued for the data streams was verified by the receiver already.
            let Some(decide) = decide.take() else {
                sender.finish();
                result.get_or_insert(Ok(SendEnd::Final));
                continue;
            };
            match await_verdict(&mut sender, &mut in_rx, decide).await {
                Awaited::Verdict(Verdict::Final) => {
                    sender.finish();
                    result.get_or_insert(Ok(SendEnd::Final));
                }
                Awaited::Verdict(Verdict::Next(t)) => {
                    sender.next_round();
                    result.get_or_insert(Ok(SendEnd::Next(t)));
                }
                Awaited::LinkLost(e) => {
                    result.get_or_insert(Err(e));
                    if !sender.is_closed() {
                        break;
                    }
                }
                Awaited::Closed => {}
            }
            continue;
        }
        if sender.is_closed() {
            // Flush the close frame, then stop.
            while let Some(t) = sender.poll_transmit() {
                if t.lane == Lane::Control {
                    let _ = write_transmit(&mut control_write, &t).await;
                }
            }
            break;
        }
        tokio::select! {
            input = in_rx.recv() => match input {
                Some(Input::Frame(f)) => sender.handle_frame(f),
                Some(Input::FrameError(e)) => sender.handle_frame_error(e),
                Some(Input::Closed(why) | Input::End(why)) => {
                    result.get_or_insert(Err(DriveError::LinkLost(why)));
                    break;
                }
                None => {
                    result.get_or_insert(Err(DriveError::LinkLost("control stream ended".into())));
                    break;
                }
            },
            Some(done) = io_rx.recv() => done.into_iter().for_each(|d| sender.handle_io_done(d)),
            Some(e) = lanes.errors.recv() => {
                result.get_or_insert(Err(DriveError::LinkLost(e)));
                break;
            }
            item = recv_feed(&mut feed) => {
                if !feed_input(&mut sender, item) {
                    feed = None;
                }
            }
        }
    }
    let stats = SendStats {
        wire_bytes: sender.wire_bytes(),
        raw_bytes: sender.raw_bytes_sent(),
        chunks: sender.chunks_sent(),
    };
    let result = end_sender_session(&sender, result, lanes, control_write, &mut in_rx).await;
    (result, stats)
}

/// The next item of a streaming sender's feed; never ready without one.
async fn recv_feed(feed: &mut Option<mpsc::Receiver<Feed>>) -> Option<Feed> {
    match feed {
        Some(f) => f.recv().await,
        None => std::future::pending().await,
    }
}

/// The sender's data streams: writer tasks that share one bounded queue, each taking the next
/// frame when it is free.
struct DataLanes {
    frames: mpsc::Sender<Transmit>,
    /// A writer that failed reports here (and stops).
    errors: mpsc::Receiver<String>,
    writers: Vec<tokio::task::JoinHandle<()>>,
}

fn spawn_data_writers<DW: DataSink>(data: Vec<DW>) -> DataLanes {
    let lanes = data.len().max(1);
    let (frames, data_rx) = mpsc::channel::<Transmit>(lanes * 2);
    let data_rx = Arc::new(Mutex::new(data_rx));
    let (werr_tx, errors) = mpsc::channel::<String>(lanes);
    let mut writers = Vec::new();
    for mut w in data {
        let rx = Arc::clone(&data_rx);
        let err = werr_tx.clone();
        writers.push(tokio::spawn(async move {
            loop {
                let next = rx.lock().await.recv().await;
                let Some(t) = next else { break };
                if let Err(e) = w.send_frame(t.head, t.body).await {
                    let _ = err.send(e.to_string()).await;
                    return;
                }
            }
            w.finish().await;
        }));
    }
    DataLanes {
        frames,
        errors,
        writers,
    }
}

/// Writes every frame the sender has ready: control frames on the control stream, chunks to
/// the data lanes (waiting while they are full). An error means the link is gone.
async fn send_transmits<CW: AsyncWrite + Unpin>(
    sender: &mut Sender,
    control_write: &mut CW,
    lanes: &mut DataLanes,
) -> Result<(), DriveError> {
    while let Some(t) = sender.poll_transmit() {
        match t.lane {
            Lane::Control => write_transmit(control_write, &t)
                .await
                .map_err(|e| DriveError::LinkLost(e.to_string()))?,
            Lane::Data => {
                tokio::select! {
                    r = lanes.frames.send(t) => if r.is_err() {
                        return Err(DriveError::LinkLost("data streams closed".into()));
                    },
                    Some(e) = lanes.errors.recv() => return Err(DriveError::LinkLost(e)),
                }
            }
        }
    }
    Ok(())
}

/// Hands the sender's events to `on_event` and notes in `result` how the round ends.
fn sender_events<T>(
    sender: &mut Sender,
    on_event: &mut impl FnMut(&SendEvent),
    result: &mut Option<Result<SendEnd<T>, DriveError>>,
) {
    while let Some(ev) = sender.poll_event() {
        on_event(&ev);
        match ev {
            SendEvent::Done { .. } => {
                if sender.is_closed() {
                    // A version-1 receiver: the sender closed with Done at once.
                    result.get_or_insert(Ok(SendEnd::Final));
                }
            }
            SendEvent::SourceChanged { path } => {
                result.get_or_insert(Ok(SendEnd::SourceChanged { path }));
            }
            SendEvent::Failed(e) => {
                result.get_or_insert(Err(DriveError::Session(e)));
            }
            SendEvent::Wanted { .. } | SendEvent::Sent { .. } | SendEvent::Durable { .. } => {}
        }
    }
}

/// How waiting for the application's verdict ended.
enum Awaited<T> {
    Verdict(Verdict<T>),
    /// A frame (or a broken one) from the receiver closed the sender meanwhile.
    Closed,
    /// The receiver went away meanwhile.
    LinkLost(DriveError),
}

/// Awaits `decide` while still reading the control stream: the receiver may close the session
/// or go away while the application decides.
async fn await_verdict<T, F, Fut>(
    sender: &mut Sender,
    in_rx: &mut mpsc::Receiver<Input>,
    decide: F,
) -> Awaited<T>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Verdict<T>>,
{
    let verdict = decide();
    tokio::pin!(verdict);
    loop {
        tokio::select! {
            v = &mut verdict => return Awaited::Verdict(v),
            input = in_rx.recv() => match input {
                Some(Input::Frame(f)) => {
                    sender.handle_frame(f);
                    if sender.is_closed() {
                        return Awaited::Closed;
                    }
                }
                Some(Input::FrameError(e)) => {
                    sender.handle_frame_error(e);
                    return Awaited::Closed;
                }
                Some(Input::Closed(why) | Input::End(why)) => {
                    return Awaited::LinkLost(DriveError::LinkLost(why));
                }
                None => {
                    return Awaited::LinkLost(DriveError::LinkLost("control stream ended".into()));
                }
            },
        }
    }
}

/// Ends a sender session: on success the data writers finish what was queued and close their
/// streams, and a final verdict waits for the receiver's confirmation; on failure they stop at
/// once.
async fn end_sender_session<T, CW: AsyncWrite + Unpin>(
    sender: &Sender,
    mut result: Option<Result<SendEnd<T>, DriveError>>,
    lanes: DataLanes,
    mut control_write: CW,
    in_rx: &mut mpsc::Receiver<Input>,
) -> Result<SendEnd<T>, DriveError> {
    let DataLanes {
        frames, writers, ..
    } = lanes;
    // Let the data writers finish what was queued (on success) and close their streams.
    drop(frames);
    if matches!(result, Some(Ok(_))) {
        for w in writers {
            let _ = w.await;
        }
        let _ = control_write.shutdown().await;
        // A version-2 receiver ends its side of the control stream once it has read the final
        // verdict. A receiver that died after its Done (killed while the sender rescanned)
        // never does: the migration is then not confirmed, and the caller keeps serving so
        // that the restarted receiver can hear it.
        if matches!(result, Some(Ok(SendEnd::Final))) && sender.peer_supports_rounds() {
            let ended = tokio::time::timeout(FINAL_ACK_WITHIN, async {
                loop {
                    match in_rx.recv().await {
                        Some(Input::Frame(_)) => {}
                        Some(Input::End(_)) => return true,
                        _ => return false,
                    }
                }
            })
            .await
            .unwrap_or(false);
            if !ended {
                result = Some(Err(DriveError::LinkLost(
                    "the receiver did not confirm the final round".into(),
                )));
            }
        }
    } else {
        for w in writers {
            w.abort();
        }
        // A close frame written above must leave the buffer before the caller drops the
        // connection.
        let _ = control_write.flush().await;
    }
    result.unwrap_or(Err(DriveError::LinkLost("session ended".into())))
}

/// Hands one input from the data streams to the receiver; false when the link is gone.
fn chunk_input(
    receiver: &mut Receiver,
    input: Input,
    link_up: &mut bool,
    result: &mut Option<Result<ManifestSummary, DriveError>>,
) -> bool {
    match input {
        Input::Frame(f) => receiver.handle_frame(f),
        Input::FrameError(e) => receiver.handle_frame_error(e),
        Input::Closed(why) | Input::End(why) => {
            *link_up = false;
            result.get_or_insert(Err(DriveError::LinkLost(why)));
            receiver.handle_link_lost();
        }
    }
    *link_up
}

/// How a receiver session (one round) ended well.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecvEnd {
    /// The round is verified and committed, and the sender closed the migration with `Done`.
    Final(ManifestSummary),
    /// The round is verified and committed; the sender starts another round.
    Next(ManifestSummary),
    /// The sender cut the round short (a source file changed); everything verified is
    /// committed; the sender starts another round.
    Restarted,
    /// The round is verified and committed, but the control stream ended before the sender's
    /// verdict (ask the connection how it was closed).
    Unconfirmed(ManifestSummary),
}

impl RecvEnd {
    /// The summary of the tree now in place, when the round completed.
    pub fn summary(&self) -> Option<&ManifestSummary> {
        match self {
            RecvEnd::Final(s) | RecvEnd::Next(s) | RecvEnd::Unconfirmed(s) => Some(s),
            RecvEnd::Restarted => None,
        }
    }

    /// Whether the sender announced another round on this connection.
    pub fn more_rounds(&self) -> bool {
        matches!(self, RecvEnd::Next(_) | RecvEnd::Restarted)
    }
}

/// Most data streams a receiver reads in one session. Each reader may buffer one partial frame
/// (up to [`MAX_FRAME_BODY`](crate::proto::frame::MAX_FRAME_BODY)) before the machine sees it,
/// so the count bounds that memory (ferry's sessions use 4); a sender opening more is breaking
/// the protocol.
pub const MAX_DATA_STREAMS: usize = 16;

/// Runs a receiver session (one round) to its end. `on_event` sees every event.
///
/// On a lost link the receiver commits everything verified so far before returning, so the next
/// session resumes from it. After its `Done`, the receiver waits for the sender's verdict (which
/// may take as long as the sender likes: it rescans, or follows the source).
pub async fn run_receiver<CR, CW, DR>(
    mut receiver: Receiver,
    store: Arc<FsStore>,
    control_read: CR,
    mut control_write: CW,
    data: mpsc::Receiver<DR>,
    mut on_event: impl FnMut(&RecvEvent),
) -> Result<RecvEnd, DriveError>
where
    CR: AsyncRead + Unpin + Send + 'static,
    CW: AsyncWrite + Unpin + Send + 'static,
    DR: AsyncRead + Unpin + Send + 'static,
{
    let (in_tx, mut in_rx) = mpsc::channel::<Input>(16);
    spawn_reader(
        control_read,
        in_tx,
        Some("the peer closed the control stream"),
    );
    let (chunk_tx, mut chunk_rx) = mpsc::channel::<Input>(8);
    let mut readers = Vec::new();
    let mut incoming = data;
    let mut incoming_open = true;

    let (io_tx, mut io_rx) = mpsc::channel::<Vec<RecvIoDone>>(256);
    let mut stores = StoreQueue::new();
    let mut result: Option<Result<ManifestSummary, DriveError>> = None;
    let mut end: Option<Result<RecvEnd, DriveError>> = None;
    let mut link_up = true;
    let tick = Duration::from_millis(100);
    receiver.handle_timeout(Instant::now());

    loop {
        // Deadlines are checked on every turn, not only when the sleep below wins the select:
        // while chunks stream in, another branch is always ready and a freshly created sleep
        // never fires, so group commits would wait for `commit_bytes` and a kill -9 could lose
        // far more than `commit_interval` of verified data.
        if receiver.poll_timeout().is_some_and(|d| d <= Instant::now()) {
            receiver.handle_timeout(Instant::now());
        }
        while let Some(t) = receiver.poll_transmit() {
            if link_up {
                if let Err(e) = write_transmit(&mut control_write, &t).await {
                    link_up = false;
                    result.get_or_insert(Err(DriveError::LinkLost(e.to_string())));
                    receiver.handle_link_lost();
                }
            }
        }
        start_store_io(&mut receiver, &mut stores, &io_tx, &store);
        receiver_events(&mut receiver, &mut on_event, &mut result);
        if receiver.is_done() && receiver.is_idle() {
            let r = result.take();
            end = Some(
                close_completed_round(&mut receiver, &mut control_write, &mut in_rx, link_up, r)
                    .await,
            );
            break;
        }
        if receiver.is_idle() {
            if receiver.verdict() == Some(RoundVerdict::NextRound) {
                // Cut short by the sender; everything verified is committed (idle).
                let _ = control_write.shutdown().await;
                end = Some(Ok(RecvEnd::Restarted));
            }
            break;
        }
        let deadline = receiver.poll_timeout().map(tokio::time::Instant::from_std);
        let sleep_until = deadline
            .unwrap_or_else(|| tokio::time::Instant::now() + tick)
            .min(tokio::time::Instant::now() + tick);
        let accept = link_up && receiver.can_accept_chunk();
        tokio::select! {
            input = in_rx.recv(), if link_up => {
                control_input(&mut receiver, input, &mut link_up, &mut result);
            }
            input = chunk_rx.recv(), if accept => {
                // Take what else has arrived too (up to a batch), so that its stores go to
                // the disk threads together.
                let mut input = input;
                let mut taken = 0;
                while let Some(i) = input.take() {
                    taken += 1;
                    if !chunk_input(&mut receiver, i, &mut link_up, &mut result)
                        || !receiver.can_accept_chunk()
                        || taken == IO_BATCH
                    {
                        break;
                    }
                    input = chunk_rx.try_recv().ok();
                }
            }
            Some(done) = io_rx.recv() => done.into_iter().for_each(|d| receiver.handle_io_done(d)),
            stream = incoming.recv(), if incoming_open && link_up => match stream {
                Some(_) if readers.len() >= MAX_DATA_STREAMS => {
                    receiver.handle_protocol_violation(format!(
                        "the sender opened more than {MAX_DATA_STREAMS} data streams"
                    ));
                }
                Some(r) => readers.push(spawn_reader(r, chunk_tx.clone(), None)),
                None => incoming_open = false,
            },
            _ = tokio::time::sleep_until(sleep_until) => receiver.handle_timeout(Instant::now()),
        }
    }
    for r in readers {
        r.abort();
    }
    if let Some(end) = end {
        return end;
    }
    match result {
        Some(Err(e)) => Err(e),
        // `Done` is only returned through the verdict above.
        Some(Ok(_)) | None => Err(DriveError::LinkLost("session ended".into())),
    }
}

/// Hands the receiver's I/O to the store: prepare, commit and finalize are ordered by the
/// machine (one at a time) and each gets a task of its own; stores and copies run side by side
/// in batches on at most [`STORE_TASKS`] tasks, bounded in bytes by the machine's pending-bytes
/// limit.
fn start_store_io(
    receiver: &mut Receiver,
    stores: &mut StoreQueue,
    io_tx: &mpsc::Sender<Vec<RecvIoDone>>,
    store: &Arc<FsStore>,
) {
    while let Some(io) = receiver.poll_io() {
        if matches!(io, RecvIo::Store { .. } | RecvIo::Copy { .. }) {
            stores.waiting.push_back(io);
        } else {
            spawn_io_batch(io_tx, store, vec![io], FsStore::execute);
        }
    }
    stores.pump(io_tx, store);
}

/// Hands the receiver's events to `on_event` and notes in `result` how the round went.
fn receiver_events(
    receiver: &mut Receiver,
    on_event: &mut impl FnMut(&RecvEvent),
    result: &mut Option<Result<ManifestSummary, DriveError>>,
) {
    while let Some(ev) = receiver.poll_event() {
        on_event(&ev);
        match ev {
            RecvEvent::Done(s) => {
                result.get_or_insert(Ok(s));
            }
            RecvEvent::Failed(e) => {
                result.get_or_insert(Err(DriveError::Session(e)));
            }
            _ => {}
        }
    }
}

/// Hands one input from the control stream to the receiver (`None`: the stream's reader ended).
fn control_input(
    receiver: &mut Receiver,
    input: Option<Input>,
    link_up: &mut bool,
    result: &mut Option<Result<ManifestSummary, DriveError>>,
) {
    match input {
        Some(Input::Frame(f)) => receiver.handle_frame(f),
        Some(Input::FrameError(e)) => receiver.handle_frame_error(e),
        Some(Input::Closed(why) | Input::End(why)) => {
            *link_up = false;
            result.get_or_insert(Err(DriveError::LinkLost(why)));
            receiver.handle_link_lost();
        }
        None => {
            *link_up = false;
            result.get_or_insert(Err(DriveError::LinkLost("control stream ended".into())));
            receiver.handle_link_lost();
        }
    }
}

/// The round is complete, committed and idle: flush the `Done` frame, wait for the sender's
/// verdict, close our side cleanly. `result` is how the session went so far.
async fn close_completed_round<CW: AsyncWrite + Unpin>(
    receiver: &mut Receiver,
    control_write: &mut CW,
    in_rx: &mut mpsc::Receiver<Input>,
    link_up: bool,
    result: Option<Result<ManifestSummary, DriveError>>,
) -> Result<RecvEnd, DriveError> {
    if !link_up {
        // Complete and committed here, but the sender was not told: a new session finds the
        // receipt and tells it at once.
        return Err(DriveError::LinkLost(
            "the link dropped as the migration completed".into(),
        ));
    }
    let mut confirmed = true;
    while let Some(t) = receiver.poll_transmit() {
        if write_transmit(control_write, &t).await.is_err() {
            confirmed = false;
        }
    }
    let _ = control_write.flush().await;
    if !confirmed && receiver.verdict().is_none() {
        return Err(DriveError::LinkLost(
            "the link dropped while confirming".into(),
        ));
    }
    while receiver.verdict().is_none() {
        match in_rx.recv().await {
            Some(Input::Frame(f)) => receiver.handle_frame(f),
            _ => break,
        }
    }
    let _ = control_write.shutdown().await;
    match result {
        Some(Ok(s)) => Ok(match receiver.verdict() {
            Some(RoundVerdict::Final) => RecvEnd::Final(s),
            Some(RoundVerdict::NextRound) => RecvEnd::Next(s),
            None => RecvEnd::Unconfirmed(s),
        }),
        // `Done` is only returned through the verdict above.
        _ => Err(DriveError::LinkLost("session ended".into())),
    }
}
