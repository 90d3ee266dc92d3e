//! One session (one round) of the sync protocol over an authenticated QUIC connection: the
//! receiver opens the control stream, the sender opens [`DATA_LANES`] data streams. Catch-up
//! rounds run one after the other on the same connection, each on new streams.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ferry_sync::driver::{
    run_receiver, run_sender_round, DataSink, DriveError, RecvEnd, SendEnd, SendStats, Verdict,
};
use ferry_sync::proto::frame::{encode_hello, encode_message, Hello, Message, Role};
use ferry_sync::proto::{
    CloseCode, Receiver, ReceiverConfig, RecvEvent, SendEvent, Sender, SenderConfig,
    PROTOCOL_VERSION,
};
use ferry_sync::source::Source;
use ferry_sync::store::FsStore;
use ferry_sync::Manifest;
use ferry_transport::{PeerConnection, SendStream};
use tokio::sync::mpsc;

/// Data streams per session: enough to keep a fast link busy while one stream waits on loss.
pub const DATA_LANES: usize = 4;

/// A QUIC data stream as a [`DataSink`]: quinn takes the frame's buffers as they are, so chunk
/// payloads are not copied into the stream's send buffer.
struct QuicLane(SendStream, Option<RateLimit>);

impl DataSink for QuicLane {
    async fn send_frame(&mut self, head: Bytes, body: Bytes) -> std::io::Result<()> {
        if let Some(limit) = &self.1 {
            limit.take(head.len() + body.len()).await;
        }
        let mut bufs = [head, body];
        let bufs = if bufs[1].is_empty() {
            &mut bufs[..1]
        } else {
            &mut bufs[..]
        };
        self.0
            .write_all_chunks(bufs)
            .await
            .map_err(std::io::Error::other)
    }

    async fn finish(&mut self) {
        let _ = self.0.finish();
    }
}

/// A cap on the rate of chunk data sent, shared by a session's data lanes: each frame is paced
/// to start no earlier than the previous frames allow at this rate.
#[derive(Clone, Debug)]
pub(crate) struct RateLimit {
    bytes_per_sec: f64,
    next_free: Arc<std::sync::Mutex<Option<tokio::time::Instant>>>,
}

impl RateLimit {
    pub(crate) fn new(bytes_per_sec: u64) -> Self {
        RateLimit {
            bytes_per_sec: bytes_per_sec.max(1) as f64,
            next_free: Arc::new(std::sync::Mutex::new(None)),
        }
    }

    /// Waits until `n` more bytes may go out.
    async fn take(&self, n: usize) {
        let start = {
            let mut next = self.next_free.lock().unwrap_or_else(|p| p.into_inner());
            let now = tokio::time::Instant::now();
            let start = next.map_or(now, |t| t.max(now));
            *next = Some(start + Duration::from_secs_f64(n as f64 / self.bytes_per_sec));
            start
        };
        tokio::time::sleep_until(start).await;
    }
}

fn lost(e: impl std::fmt::Display) -> DriveError {
    DriveError::LinkLost(e.to_string())
}

/// Serves a single-round session (the receiver's copy of `manifest` is final): the building
/// block for callers that manage connections themselves. [`crate::Migration`] runs whole
/// migrations (rounds, reconnects, resume) on top of it.
pub async fn serve(
    conn: &PeerConnection,
    manifest: Arc<Manifest>,
    source: Arc<Source>,
    on_event: impl FnMut(&SendEvent),
) -> (Result<(), DriveError>, SendStats) {
    let (r, stats) = serve_round(conn, manifest, source, None, on_event, || async {
        Verdict::<()>::Final
    })
    .await;
    let r = r.and_then(|end| match end {
        SendEnd::Final | SendEnd::Next(()) => Ok(()),
        SendEnd::SourceChanged { path } => Err(DriveError::Session(
            ferry_sync::proto::SessionError::Source(format!(
                "{path} changed while it was being sent"
            )),
        )),
    });
    (r, stats)
}

/// Runs one receiving session on a connection to the sender, with the default configuration:
/// the counterpart of [`serve`].
pub async fn receive(
    conn: &PeerConnection,
    store: Arc<FsStore>,
    on_event: impl FnMut(&RecvEvent),
) -> Result<RecvEnd, DriveError> {
    receive_round(conn, store, ReceiverConfig::default(), on_event).await
}

/// Serves one round to a connected receiver; `decide` is awaited once the receiver verified it.
pub(crate) async fn serve_round<T, F, Fut>(
    conn: &PeerConnection,
    manifest: Arc<Manifest>,
    source: Arc<Source>,
    limit: Option<RateLimit>,
    on_event: impl FnMut(&SendEvent),
    decide: F,
) -> (Result<SendEnd<T>, DriveError>, SendStats)
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Verdict<T>>,
{
    let (ctl_send, ctl_recv) = match conn.accept_bi().await {
        Ok(s) => s,
        Err(e) => return (Err(lost(e)), SendStats::default()),
    };
    let mut lanes = Vec::with_capacity(DATA_LANES);
    for _ in 0..DATA_LANES {
        match conn.open_uni().await {
            Ok(s) => lanes.push(QuicLane(s, limit.clone())),
            Err(e) => return (Err(lost(e)), SendStats::default()),
        }
    }
    let sender = Sender::new(manifest, SenderConfig::default());
    run_sender_round(sender, source, ctl_recv, ctl_send, lanes, on_event, decide).await
}

/// Answers the receiver's next control stream with a hello and `Close{code, reason}`: the
/// migration ends with a reason the receiver can show (and an error class it can map).
pub(crate) async fn refuse(conn: &PeerConnection, code: CloseCode, reason: &str) {
    let Ok(Ok((mut send, _recv))) =
        tokio::time::timeout(Duration::from_secs(5), conn.accept_bi()).await
    else {
        return;
    };
    let hello = encode_hello(&Hello {
        version: PROTOCOL_VERSION,
        role: Role::Sender,
    });
    let reason: String = reason.chars().take(1000).collect();
    let close = encode_message(&Message::Close {
        code: code as u16,
        reason,
    })
    .unwrap_or_default();
    let _ = send.write_all(&hello).await;
    let _ = send.write_all(&close).await;
    let _ = send.finish();
    let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
}

/// Runs one receiving session on a connection to the sender.
pub(crate) async fn receive_round(
    conn: &PeerConnection,
    store: Arc<FsStore>,
    mut cfg: ReceiverConfig,
    on_event: impl FnMut(&RecvEvent),
) -> Result<RecvEnd, DriveError> {
    let (ctl_send, ctl_recv) = conn.open_bi().await.map_err(lost)?;
    let (tx, rx) = mpsc::channel(DATA_LANES * 2);
    let c = conn.clone();
    let acceptor = tokio::spawn(async move {
        while let Ok(s) = c.accept_uni().await {
            if tx.send(s).await.is_err() {
                break;
            }
        }
    });
    // A destination that folds case (exFAT, FAT, macOS, Windows) cannot hold two names that
    // differ only in case: such a manifest is refused before anything is written.
    cfg.limits.case_insensitive = store.folds_case();
    cfg.limits.normalization_insensitive = store.normalizes();
    // A destination without symlinks (exFAT): they are named before anything is written and
    // left out; the rest is migrated (see `Event::Unrepresentable`).
    cfg.symlinks = store.holds_symlinks();
    let r = run_receiver(Receiver::new(cfg), store, ctl_recv, ctl_send, rx, on_event).await;
    acceptor.abort();
    r
}
