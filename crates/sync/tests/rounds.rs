//! Catch-up rounds through the async driver and a real store: a round after new messages and
//! files sends only the changed chunks; files dropped from the source between rounds are removed
//! only if ferry brought them; a file that changes under the read cuts the round short and the
//! next round keeps everything the receiver verified.

use std::collections::HashSet;
use std::fs;
use std::future::Future;
use std::path::Path;
use std::sync::Arc;

use ferry_sync::compress::CompressPolicy;
use ferry_sync::driver::{
    run_receiver, run_sender_round, Copying, DriveError, RecvEnd, SendEnd, Verdict,
};
use ferry_sync::manifest::Manifest;
use ferry_sync::proto::{Receiver, ReceiverConfig, RecvEvent, Sender, SenderConfig};
use ferry_sync::scan::{scan, ScanConfig};
use ferry_sync::source::Source;
use ferry_sync::store::{verify_dest, FsStore};
use ferry_testkit::{assert_trees_equal, generate, HistorySpec, LiveConfig, LiveWriter};
use tokio::sync::mpsc;

const LANES: usize = 3;

struct Round<T> {
    send: Result<SendEnd<T>, DriveError>,
    sent_wire: u64,
    recv: Result<RecvEnd, DriveError>,
    events: Vec<RecvEvent>,
}

/// One round over fresh in-memory streams (as a catch-up round runs on new QUIC streams).
async fn round<T, F, Fut>(
    src: &Path,
    manifest: Arc<Manifest>,
    store: Arc<FsStore>,
    decide: F,
) -> Round<T>
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = Verdict<T>> + Send,
{
    let source = Arc::new(Source::new(
        src,
        Arc::clone(&manifest),
        CompressPolicy::default(),
    ));
    let (c_s, c_r) = tokio::io::duplex(1 << 20);
    let (s_read, s_write) = tokio::io::split(c_s);
    let (r_read, r_write) = tokio::io::split(c_r);
    let (tx, rx) = mpsc::channel(LANES);
    let mut writers = Vec::new();
    for _ in 0..LANES {
        let (a, b) = tokio::io::duplex(1 << 20);
        writers.push(Copying(a));
        tx.send(b).await.unwrap();
    }
    drop(tx);
    let sender = Sender::new(manifest, SenderConfig::default());
    let send = tokio::spawn(async move {
        run_sender_round(sender, source, s_read, s_write, writers, |_| {}, decide).await
    });
    let mut events = Vec::new();
    let recv = run_receiver(
        Receiver::new(ReceiverConfig::default()),
        store,
        r_read,
        r_write,
        rx,
        |e| {
            if !matches!(e, RecvEvent::Progress { .. }) || events.len() < 100_000 {
                events.push(e.clone());
            }
        },
    )
    .await;
    let (send, stats) = send.await.unwrap();
    Round {
        send,
        sent_wire: stats.wire_bytes,
        recv,
        events,
    }
}

fn scan_of(dir: &Path) -> Arc<Manifest> {
    Arc::new(scan(dir, None, &ScanConfig::default()).unwrap().manifest)
}

/// Bytes of the unique chunks of `new` that `old` does not have (what a catch-up must send).
fn changed_chunk_bytes(old: &Manifest, new: &Manifest) -> u64 {
    let have: HashSet<_> = old.unique_chunks().iter().map(|u| u.hash).collect();
    new.unique_chunks()
        .iter()
        .filter(|u| !have.contains(&u.hash))
        .map(|u| u64::from(u.len))
        .sum()
}

use ferry_testkit::rand_bytes;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catch_up_round_sends_only_changed_chunks_and_removes_only_what_ferry_brought() {
    let dir = tempfile::tempdir().unwrap();
    let (src, dest) = (dir.path().join("src"), dir.path().join("dest"));
    let spec = HistorySpec {
        max_db_bytes: 4 << 20,
        ..HistorySpec::with_size(16 << 20)
    };
    generate(&src, &spec).unwrap();
    let store = Arc::new(FsStore::open(&dest).unwrap());
    let m1 = scan_of(&src);
    let total = m1.summary().bytes;

    // Round 1; when the receiver has verified it, the app writes N messages and M media files,
    // drops one media file, and a person puts a file of their own into DEST.
    const MESSAGES: u64 = 1000;
    const NEW_FILES: usize = 5;
    let (src2, dest2) = (src.clone(), dest.clone());
    let dropped = m1
        .entries()
        .iter()
        .find(|e| e.is_file() && e.path.starts_with("media/"))
        .map(|e| e.path.clone())
        .unwrap();
    let dropped2 = dropped.clone();
    let r1 = round(
        &src,
        Arc::clone(&m1),
        Arc::clone(&store),
        move || async move {
            let w = LiveWriter::start(
                &src2,
                LiveConfig {
                    messages_per_sec: 20_000.0,
                    max_batch: 100,
                    media_every: 0,
                    ..LiveConfig::default()
                },
            )
            .unwrap();
            while w.messages_committed() < MESSAGES {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            let stats = w.stop().unwrap();
            assert!(stats.messages >= MESSAGES);
            for i in 0..NEW_FILES {
                fs::write(
                    src2.join(format!("media/new_{i}.jpg")),
                    rand_bytes(i as u64 + 9, 20_000),
                )
                .unwrap();
            }
            fs::remove_file(src2.join(&dropped2)).unwrap();
            fs::write(dest2.join("my-notes.txt"), "not ferry's").unwrap();
            Verdict::Next(scan_of(&src2))
        },
    )
    .await;
    let m2 = match r1.send {
        Ok(SendEnd::Next(m)) => m,
        other => panic!("round 1 sender: {other:?}"),
    };
    assert!(
        matches!(r1.recv, Ok(RecvEnd::Next(s)) if s.root == m1.root()),
        "round 1 receiver: {:?}",
        r1.recv
    );
    assert_ne!(m2.root(), m1.root());

    // Round 2 (catch-up), then quiescent: final.
    let r2 = round(&src, Arc::clone(&m2), Arc::clone(&store), || async {
        Verdict::<()>::Final
    })
    .await;
    assert!(matches!(r2.send, Ok(SendEnd::Final)), "{:?}", r2.send);
    assert!(
        matches!(r2.recv, Ok(RecvEnd::Final(s)) if s.root == m2.root()),
        "{:?}",
        r2.recv
    );

    // Only the changed chunks crossed (compression only makes them smaller; frame headers are
    // not counted in wire bytes, the allowance covers zstd's worst case on random data).
    let changed = changed_chunk_bytes(&m1, &m2);
    let allowance = changed / 100 + 4096;
    eprintln!(
        "catch-up after {MESSAGES} messages and {NEW_FILES} files: {} on the wire, changed chunks {changed}, history {total}, round 1 {}",
        r2.sent_wire, r1.sent_wire
    );
    assert!(changed > 0);
    assert!(
        r2.sent_wire <= changed + allowance,
        "catch-up sent {} bytes; the changed chunks are {changed}",
        r2.sent_wire
    );
    assert!(
        r2.sent_wire * 10 < total,
        "catch-up sent {} of a {total}-byte history",
        r2.sent_wire
    );
    let wanted: u64 = r2
        .events
        .iter()
        .filter_map(|e| match e {
            RecvEvent::Wanted { bytes, .. } => Some(*bytes),
            _ => None,
        })
        .sum();
    assert!(
        wanted <= changed,
        "receiver wanted {wanted}, changed {changed}"
    );

    // The dropped file is gone (ferry brought it); the person's file stays.
    assert!(!dest.join(&dropped).exists(), "{dropped} was not removed");
    assert_eq!(
        fs::read_to_string(dest.join("my-notes.txt")).unwrap(),
        "not ferry's"
    );
    fs::remove_file(dest.join("my-notes.txt")).unwrap();
    assert_trees_equal(&src, &dest).unwrap();
    let report = verify_dest(&dest).unwrap();
    assert!(report.mismatched.is_empty(), "{:?}", report.mismatched);
    assert_eq!(report.root, m2.root());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_changed_under_the_read_restarts_the_round_and_keeps_verified_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let (src, dest) = (dir.path().join("src"), dir.path().join("dest"));
    fs::create_dir_all(src.join("media")).unwrap();
    for i in 0..24u64 {
        fs::write(
            src.join(format!("media/{i:02}.jpg")),
            rand_bytes(i + 1, 300_000 + i as usize * 7_000),
        )
        .unwrap();
    }
    // Sorted last: its chunks are read after everything else.
    fs::create_dir_all(src.join("zz")).unwrap();
    let last = src.join("zz/msg.db");
    fs::write(&last, rand_bytes(99, 1 << 20)).unwrap();
    let store = Arc::new(FsStore::open(&dest).unwrap());
    let m1 = scan_of(&src);

    // After the scan, before any read: the app rewrites one page in the middle.
    {
        use std::os::unix::fs::FileExt;
        let f = fs::OpenOptions::new().write(true).open(&last).unwrap();
        f.write_all_at(&rand_bytes(7, 4096), 600_000).unwrap();
    }
    let r1 = round(&src, Arc::clone(&m1), Arc::clone(&store), || async {
        Verdict::<()>::Final
    })
    .await;
    match &r1.send {
        Ok(SendEnd::SourceChanged { path }) => assert_eq!(path, "zz/msg.db"),
        other => panic!("round 1 sender: {other:?}"),
    }
    assert_eq!(r1.recv.as_ref().ok(), Some(&RecvEnd::Restarted));
    assert!(r1.events.contains(&RecvEvent::Restarted));
    let verified_r1 = r1
        .events
        .iter()
        .filter_map(|e| match e {
            RecvEvent::Progress { bytes_done, .. } => Some(*bytes_done),
            _ => None,
        })
        .max()
        .unwrap_or(0);
    assert!(verified_r1 > 0, "nothing was verified before the restart");

    // The next round (rescan) completes with the new content and reuses what round 1 verified.
    let m2 = scan_of(&src);
    assert_ne!(m2.root(), m1.root());
    let r2 = round(&src, Arc::clone(&m2), Arc::clone(&store), || async {
        Verdict::<()>::Final
    })
    .await;
    assert!(matches!(r2.send, Ok(SendEnd::Final)), "{:?}", r2.send);
    assert!(matches!(r2.recv, Ok(RecvEnd::Final(_))), "{:?}", r2.recv);
    let have = r2
        .events
        .iter()
        .find_map(|e| match e {
            RecvEvent::Resumed { bytes_have, .. } => Some(*bytes_have),
            _ => None,
        })
        .unwrap_or(0);
    eprintln!(
        "restart: round 1 verified {verified_r1}, round 2 found {have} here, sent {}",
        r2.sent_wire
    );
    assert!(
        have >= verified_r1,
        "round 2 found {have} bytes kept, round 1 had verified {verified_r1}"
    );
    // Files complete here: they only grow, up to every file of the round.
    let files: Vec<u64> = r2
        .events
        .iter()
        .filter_map(|e| match e {
            RecvEvent::Progress { files_done, .. } => Some(*files_done),
            _ => None,
        })
        .collect();
    assert!(files.windows(2).all(|w| w[0] <= w[1]), "{files:?}");
    assert_eq!(files.last().copied(), Some(m2.summary().files), "{files:?}");
    assert!(r2.sent_wire + have <= m2.summary().bytes + (256 << 10));
    assert_trees_equal(&src, &dest).unwrap();
}

/// A receiver that dies after a catch-up round began (its store prepared for the new manifest,
/// so the old receipt became `receipt.prev`) finishes the round after a restart: files in place
/// are reused, and what the previous round brought and the source dropped is still removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catch_up_round_survives_a_receiver_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (src, dest) = (dir.path().join("src"), dir.path().join("dest"));
    fs::create_dir_all(src.join("media/old")).unwrap();
    for i in 0..6u64 {
        fs::write(
            src.join(format!("media/old/{i}.jpg")),
            rand_bytes(i + 1, 200_000),
        )
        .unwrap();
    }
    fs::write(src.join("msg.db"), rand_bytes(42, 1 << 20)).unwrap();
    let m1 = scan_of(&src);
    {
        let store = Arc::new(FsStore::open(&dest).unwrap());
        let r1 = round(&src, Arc::clone(&m1), store, || async {
            Verdict::<()>::Final
        })
        .await;
        assert!(matches!(r1.recv, Ok(RecvEnd::Final(_))), "{:?}", r1.recv);
    }
    // The source changes: a folder goes, the database grows, a file arrives.
    fs::remove_dir_all(src.join("media/old")).unwrap();
    let mut db = fs::read(src.join("msg.db")).unwrap();
    db.extend(rand_bytes(43, 300_000));
    fs::write(src.join("msg.db"), &db).unwrap();
    fs::write(src.join("media/new.jpg"), rand_bytes(44, 50_000)).unwrap();
    let m2 = scan_of(&src);
    {
        // The receiver starts round 2 and dies right after preparing (kill -9).
        let store = FsStore::open(&dest).unwrap();
        store.prepare(&m2).unwrap();
        assert!(dest.join(".ferry/receipt.prev").exists());
        assert!(!dest.join(".ferry/receipt").exists());
    }
    let store = Arc::new(FsStore::open(&dest).unwrap());
    let r2 = round(&src, Arc::clone(&m2), store, || async {
        Verdict::<()>::Final
    })
    .await;
    assert!(matches!(r2.recv, Ok(RecvEnd::Final(_))), "{:?}", r2.recv);
    // Only the new bytes crossed: the grown database lent its old megabyte.
    let changed = changed_chunk_bytes(&m1, &m2);
    assert!(
        r2.sent_wire <= changed + changed / 100 + 4096,
        "sent {}, changed chunks {changed}",
        r2.sent_wire
    );
    assert!(r2.sent_wire < 600_000, "sent {}", r2.sent_wire);
    assert!(
        !dest.join("media/old").exists(),
        "the dropped folder stayed"
    );
    assert!(!dest.join(".ferry/receipt.prev").exists());
    assert_trees_equal(&src, &dest).unwrap();
    assert_eq!(verify_dest(&dest).unwrap().root, m2.root());
}

/// The verdict on the wire: a version-2 (or later) receiver's `Done` waits for the application
/// (then `NextRound` or `Close{Done}`); a version-1 receiver gets `Close{Done}` at once, as
/// before.
#[test]
fn sender_verdict_depends_on_the_receivers_version() {
    use ferry_sync::proto::frame::{decode_frame, Frame, Hello, Message, Role};
    use ferry_sync::proto::{CloseCode, SendEvent};

    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("a.txt"), "hello").unwrap();
    let m = scan_of(dir.path());
    let messages = |s: &mut Sender| -> Vec<Message> {
        let mut out = Vec::new();
        while let Some(t) = s.poll_transmit() {
            let mut b = bytes::BytesMut::from(&t.head[..]);
            b.extend_from_slice(&t.body);
            while let Some(f) = decode_frame(&mut b).unwrap() {
                if let Frame::Message(msg) = f {
                    out.push(msg);
                }
            }
        }
        out
    };
    for version in [1u16, 2, 3] {
        let mut s = Sender::new(Arc::clone(&m), SenderConfig::default());
        s.handle_frame(Frame::Hello(Hello {
            version,
            role: Role::Receiver,
        }));
        messages(&mut s);
        s.handle_frame(Frame::Message(Message::WantEnd {
            chunks: 0,
            bytes: 0,
        }));
        s.handle_frame(Frame::Message(Message::Done { root: m.root() }));
        let events: Vec<SendEvent> = std::iter::from_fn(|| s.poll_event()).collect();
        assert!(events.contains(&SendEvent::Done { root: m.root() }));
        // Only a version-3 receiver reports its durable bytes during the round.
        assert!(events.contains(&SendEvent::Wanted {
            chunks: 0,
            bytes: 0,
            reports_durable: version >= 3,
        }));
        let sent = messages(&mut s);
        if version == 1 {
            assert!(s.is_closed());
            assert!(matches!(
                sent.as_slice(),
                [Message::Close { code, .. }] if *code == CloseCode::Done as u16
            ));
        } else {
            assert!(s.is_awaiting_verdict() && !s.is_closed());
            assert!(sent.is_empty(), "{sent:?}");
            s.next_round();
            assert!(s.is_closed());
            assert_eq!(messages(&mut s), vec![Message::NextRound]);
        }
    }
}
