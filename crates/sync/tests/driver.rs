//! The async driver over in-memory byte streams with a real store: a clean run, and a link that
//! dies mid-transfer followed by a resumed session.

use std::fs;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use ferry_sync::compress::CompressPolicy;
use ferry_sync::driver::{run_receiver, run_sender, Copying, DriveError, RecvEnd};
use ferry_sync::proto::{Receiver, ReceiverConfig, RecvEvent, Sender, SenderConfig};
use ferry_sync::scan::{scan, ScanConfig};
use ferry_sync::source::Source;
use ferry_sync::store::{verify_dest, FsStore};
use tokio::io::{AsyncWrite, DuplexStream};
use tokio::sync::mpsc;

/// A writer that fails once `budget` bytes went through: the link dies.
struct Dying {
    inner: DuplexStream,
    budget: Option<usize>,
}

impl AsyncWrite for Dying {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if let Some(b) = self.budget {
            if b == 0 {
                return Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionReset,
                    "link died",
                )));
            }
            let n = buf.len().min(b);
            let r = Pin::new(&mut self.inner).poll_write(cx, &buf[..n]);
            if let Poll::Ready(Ok(w)) = r {
                self.budget = Some(b - w);
            }
            return r;
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

fn make_history(root: &Path) {
    fs::create_dir_all(root.join("media/x")).unwrap();
    fs::create_dir_all(root.join("db")).unwrap();
    let mut x = 88172645463325252u64;
    for i in 0..40 {
        let n = 1000 + i * 37_000;
        let data: Vec<u8> = (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        fs::write(root.join(format!("media/x/{i}.jpg")), data).unwrap();
    }
    fs::write(
        root.join("db/msg.db"),
        "聊天记录 chat log line\n".repeat(100_000),
    )
    .unwrap();
}

type Outcome = (
    Result<(), DriveError>,
    Result<ferry_sync::manifest::ManifestSummary, DriveError>,
    u64,
    bool,
);

async fn session(src: &Path, dest: &Path, lanes: usize, die_after: Option<usize>) -> Outcome {
    let store = Arc::new(FsStore::open(dest).unwrap());
    session_with(src, store, lanes, die_after).await
}

async fn session_with(
    src: &Path,
    store: Arc<FsStore>,
    lanes: usize,
    die_after: Option<usize>,
) -> Outcome {
    let manifest = Arc::new(scan(src, None, &ScanConfig::default()).unwrap().manifest);
    let source = Arc::new(Source::new(
        src,
        Arc::clone(&manifest),
        CompressPolicy::default(),
    ));
    let (c_s, c_r) = tokio::io::duplex(1 << 20);
    let (s_read, s_write) = tokio::io::split(c_s);
    let (r_read, r_write) = tokio::io::split(c_r);
    let (tx, rx) = mpsc::channel(lanes);
    let mut writers = Vec::new();
    for _ in 0..lanes {
        let (a, b) = tokio::io::duplex(1 << 20);
        writers.push(Copying(Dying {
            inner: a,
            budget: die_after.map(|d| d / lanes),
        }));
        tx.send(b).await.unwrap();
    }
    drop(tx);
    let sender = Sender::new(Arc::clone(&manifest), SenderConfig::default());
    let receiver = Receiver::new(ReceiverConfig::default());
    let send = tokio::spawn(async move {
        let (r, stats) = run_sender(sender, source, s_read, s_write, writers, |_| {}).await;
        (r, stats.wire_bytes)
    });
    let mut resumed = false;
    let recv = run_receiver(receiver, store, r_read, r_write, rx, |e| {
        if matches!(e, RecvEvent::Resumed { .. }) {
            resumed = true;
        }
    })
    .await
    .map(|end| match end {
        RecvEnd::Final(s) => s,
        other => panic!("a single-round sender ended with {other:?}"),
    });
    let (sent, wire) = send.await.unwrap();
    (sent, recv, wire, resumed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_session_over_four_lanes() {
    let dir = tempfile::tempdir().unwrap();
    let (src, dest) = (dir.path().join("src"), dir.path().join("dest"));
    make_history(&src);
    let (s, r, wire, _) = session(&src, &dest, 4, None).await;
    s.unwrap();
    let summary = r.unwrap();
    assert!(verify_dest(&dest).unwrap().mismatched.is_empty());
    ferry_testkit::assert_trees_equal(&src, &dest).unwrap();
    // The text database compresses: fewer bytes crossed than the history holds.
    assert!(wire < summary.bytes, "wire {wire} vs {}", summary.bytes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_dies_then_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let (src, dest) = (dir.path().join("src"), dir.path().join("dest"));
    make_history(&src);
    let (s, r, wire1, _) = session(&src, &dest, 2, Some(12 << 20)).await;
    assert!(s.is_err() && r.is_err(), "the first session must fail");
    assert!(r.unwrap_err().is_retryable());
    let (s, r, wire2, resumed) = session(&src, &dest, 2, None).await;
    s.unwrap();
    r.unwrap();
    assert!(resumed, "the second session must resume");
    ferry_testkit::assert_trees_equal(&src, &dest).unwrap();
    let (_, _, full, _) = session(&src, &dir.path().join("fresh"), 2, None).await;
    // Resuming re-sent at most what was in flight (bounded by windows), not everything.
    assert!(wire2 < full, "resume sent {wire2} of {full}");
    assert!(
        wire1 + wire2 <= full + (96 << 20),
        "first {wire1} + second {wire2} vs full {full}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_dies_then_resumes_with_the_same_store() {
    let dir = tempfile::tempdir().unwrap();
    let (src, dest) = (dir.path().join("src"), dir.path().join("dest"));
    make_history(&src);
    let store = Arc::new(FsStore::open(&dest).unwrap());
    for budget in [Some(3 << 20), Some(6 << 20), None] {
        let (s, r, _, _) = session_with(&src, Arc::clone(&store), 2, budget).await;
        if budget.is_none() {
            s.unwrap();
            r.unwrap();
        }
    }
    ferry_testkit::assert_trees_equal(&src, &dest).unwrap();
}

/// Every data stream may hold a partial frame of up to 4 MiB in the driver before the machine
/// sees it: a sender opening hundreds of streams (QUIC allows 256) could make the receiver
/// buffer a GiB. Past `MAX_DATA_STREAMS` the session ends with a protocol violation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_data_streams_end_the_session() {
    use ferry_sync::driver::MAX_DATA_STREAMS;
    use ferry_sync::proto::frame::{encode_hello, Hello, Role, MAX_FRAME_BODY, PROTOCOL_VERSION};
    use ferry_sync::proto::SessionError;
    use tokio::io::AsyncWriteExt;

    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(FsStore::open(&dir.path().join("dest")).unwrap());
    let (recv_ctl, mut send_ctl) = tokio::io::duplex(1 << 16);
    let (recv_ctl_r, recv_ctl_w) = tokio::io::split(recv_ctl);
    send_ctl
        .write_all(&encode_hello(&Hello {
            version: PROTOCOL_VERSION,
            role: Role::Sender,
        }))
        .await
        .unwrap();
    let (tx, rx) = mpsc::channel(4);
    let attacker = tokio::spawn(async move {
        let mut kept = Vec::new();
        for _ in 0..=MAX_DATA_STREAMS {
            let (theirs, mut ours) = tokio::io::duplex(1 << 16);
            // A frame header announcing a maximal frame, then part of it.
            let _ = ours.write_all(&(MAX_FRAME_BODY as u32).to_le_bytes()).await;
            let _ = ours.write_all(&[2u8; 1000]).await;
            kept.push(ours);
            if tx.send(theirs).await.is_err() {
                break;
            }
        }
        (kept, send_ctl)
    });
    let r = tokio::time::timeout(
        std::time::Duration::from_secs(20),
        run_receiver(
            Receiver::new(ReceiverConfig::default()),
            store,
            recv_ctl_r,
            recv_ctl_w,
            rx,
            |_| {},
        ),
    )
    .await
    .unwrap();
    match r {
        Err(DriveError::Session(SessionError::Protocol(m))) => {
            assert!(m.contains("data streams"), "{m}")
        }
        other => panic!("expected a protocol violation, got {other:?}"),
    }
    drop(attacker);
}

/// Thousands of one-chunk files: chunk frames queue up faster than the receiver takes them, so
/// it takes them in batches. None may be lost on the way (a lost one stalls the session until
/// the receiver's no-data timeout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bursts_of_tiny_files_arrive_without_a_stall() {
    let dir = tempfile::tempdir().unwrap();
    let (src, dest) = (dir.path().join("src"), dir.path().join("dest"));
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for d in 0..10 {
        fs::create_dir_all(src.join(format!("stickers/{d}"))).unwrap();
        for i in 0..300 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let data: Vec<u8> = (0..(64 + x % 900)).map(|k| (x >> (k % 57)) as u8).collect();
            fs::write(src.join(format!("stickers/{d}/{i}.webp")), data).unwrap();
        }
    }
    let run = session(&src, &dest, 4, None);
    let (s, r, _, _) = tokio::time::timeout(std::time::Duration::from_secs(30), run)
        .await
        .expect("the session stalled");
    s.unwrap();
    assert_eq!(r.unwrap().files, 3000);
    assert!(verify_dest(&dest).unwrap().mismatched.is_empty());
    ferry_testkit::assert_trees_equal(&src, &dest).unwrap();
}
