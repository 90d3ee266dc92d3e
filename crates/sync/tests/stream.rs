//! Protocol version 4: the manifest streams while the sender scans, and a receiver with a
//! fresh store asks for chunks before `ManifestEnd`. Sans-IO machines over a real store and
//! source; the order of frames on the wire is what the tests look at.

use std::collections::VecDeque;
use std::fs;
use std::path::Path;
use std::sync::Arc;

use bytes::BytesMut;
use ferry_sync::compress::CompressPolicy;
use ferry_sync::manifest::{ChunkHash, ManifestError, WireEntry};
use ferry_sync::proto::frame::{decode_frame, encode_hello, Frame, Hello, Message};
use ferry_sync::proto::{
    Receiver, ReceiverConfig, RecvEvent, SendEvent, Sender, SenderConfig, SessionError, Transmit,
};
use ferry_sync::scan::{scan, ScanConfig};
use ferry_sync::source::Source;
use ferry_sync::store::{read_receipt, FsStore};
use ferry_sync::Manifest;
use ferry_testkit::rand_bytes;

/// Databases, media in several folders, duplicates, empty files: enough entries for several
/// manifest prefixes.
fn make_history(root: &Path) {
    for d in ["a", "b/c", "d", "z"] {
        fs::create_dir_all(root.join(d)).unwrap();
    }
    fs::write(root.join("a/msg.db"), "聊天 line\n".repeat(30_000)).unwrap();
    let photo = rand_bytes(7, 150_000);
    for i in 0..12 {
        fs::write(
            root.join(format!("b/c/{i:02}.jpg")),
            rand_bytes(i, 2_000 + i as usize * 41_000),
        )
        .unwrap();
    }
    for p in ["b/dup.jpg", "d/dup.jpg", "z/dup.jpg"] {
        fs::write(root.join(p), &photo).unwrap();
    }
    fs::write(root.join("d/video.mp4"), rand_bytes(99, 900_000)).unwrap();
    fs::write(root.join("z/empty"), b"").unwrap();
}

fn decode(t: &Transmit) -> Frame {
    let mut b = BytesMut::from(&t.head[..]);
    b.extend_from_slice(&t.body);
    decode_frame(&mut b).unwrap().unwrap()
}

/// Two machines, the store and the source, the manifest's entries still to feed, and the
/// frames as they crossed (`S:` sender to receiver, `R:` back).
struct Pair {
    s: Sender,
    r: Receiver,
    store: FsStore,
    source: Source,
    feed: VecDeque<WireEntry>,
    log: Vec<String>,
    /// Frames on their way to the receiver (chunks wait while it cannot take them).
    to_r: VecDeque<Frame>,
    s_events: Vec<SendEvent>,
    r_events: Vec<RecvEvent>,
    /// Rewrites frames on the wire (version of a hello, a tampered root).
    tamper: fn(Frame) -> Frame,
}

impl Pair {
    fn new(src: &Path, dest: &Path, cfg: ReceiverConfig, tamper: fn(Frame) -> Frame) -> Pair {
        let m: Manifest = scan(src, None, &ScanConfig::default()).unwrap().manifest;
        let feed = (0..m.entries().len())
            .map(|i| m.wire_entry(i).unwrap())
            .collect();
        let empty = Arc::new(Manifest::from_wire_entries(vec![]).unwrap());
        Pair {
            s: Sender::streaming(SenderConfig::default()),
            r: Receiver::new(cfg),
            store: FsStore::open(dest).unwrap(),
            source: Source::new(src, empty, CompressPolicy::default()),
            feed,
            log: Vec::new(),
            to_r: VecDeque::new(),
            s_events: Vec::new(),
            r_events: Vec::new(),
            tamper,
        }
    }

    /// The scan produced `n` more entries.
    fn push(&mut self, n: usize) {
        let batch: Vec<_> = (0..n).filter_map(|_| self.feed.pop_front()).collect();
        self.s.push_entries(batch).unwrap();
        if self.feed.is_empty() {
            self.s.end_manifest();
        }
    }

    /// Runs both machines and their I/O until nothing moves.
    fn settle(&mut self) {
        loop {
            let mut moved = false;
            while let Some(t) = self.s.poll_transmit() {
                let f = (self.tamper)(decode(&t));
                self.log.push(format!("S:{}", f.name()));
                self.to_r.push_back(f);
                moved = true;
            }
            while let Some(io) = self.s.poll_io() {
                self.s.handle_io_done(self.source.execute(io));
                moved = true;
            }
            while let Some(f) = self.to_r.front() {
                if matches!(f, Frame::Chunk { .. }) && !self.r.can_accept_chunk() {
                    break;
                }
                let f = self.to_r.pop_front().unwrap();
                self.r.handle_frame(f);
                moved = true;
            }
            while let Some(io) = self.r.poll_io() {
                self.r.handle_io_done(self.store.execute(io));
                moved = true;
            }
            while let Some(t) = self.r.poll_transmit() {
                let f = (self.tamper)(decode(&t));
                self.log.push(format!("R:{}", f.name()));
                self.s.handle_frame(f);
                moved = true;
            }
            self.s_events
                .extend(std::iter::from_fn(|| self.s.poll_event()));
            self.r_events
                .extend(std::iter::from_fn(|| self.r.poll_event()));
            if !moved {
                return;
            }
        }
    }

    fn pos(&self, what: &str) -> usize {
        self.log
            .iter()
            .position(|l| l == what)
            .unwrap_or_else(|| panic!("no {what} in {:?}", self.log))
    }

    fn count_before(&self, what: &str, end: usize) -> usize {
        self.log[..end].iter().filter(|l| *l == what).count()
    }
}

fn fresh_cfg() -> ReceiverConfig {
    ReceiverConfig {
        stream: true,
        ..ReceiverConfig::default()
    }
}

fn no_tamper(f: Frame) -> Frame {
    f
}

fn with_version(f: Frame, version: u16) -> Frame {
    match f {
        Frame::Hello(h) => {
            // Through the encoder, as an older build would put it on the wire.
            let mut b = BytesMut::from(&encode_hello(&Hello { version, ..h })[..]);
            decode_frame(&mut b).unwrap().unwrap()
        }
        f => f,
    }
}

/// Everything at the final paths, the receipt naming the manifest's root.
fn assert_complete(p: &Pair, src: &Path, dest: &Path) {
    assert!(p.r.is_done(), "log {:?}, events {:?}", p.log, p.r_events);
    ferry_testkit::assert_trees_equal(src, dest).unwrap();
    let root = p.s.manifest().unwrap().root();
    assert_eq!(read_receipt(dest).unwrap().root(), root);
}

#[test]
fn a_fresh_receiver_asks_for_chunks_before_the_manifest_ends() {
    let dir = tempfile::tempdir().unwrap();
    let (src, dest) = (dir.path().join("src"), dir.path().join("dest"));
    make_history(&src);
    let mut p = Pair::new(&src, &dest, fresh_cfg(), no_tamper);
    let total = p.feed.len();
    // The scan gives its entries in four batches; between them the link settles.
    for _ in 0..4 {
        p.push(total.div_ceil(4));
        p.settle();
    }
    let end = p.pos("S:manifest-end");
    // Wants and chunks crossed before the manifest was complete, over several prefixes.
    assert!(p.pos("R:want") < end, "{:?}", p.log);
    assert!(p.count_before("R:want", end) >= 2, "{:?}", p.log);
    assert!(p.count_before("S:chunk", end) >= 5, "{:?}", p.log);
    assert!(p.count_before("S:manifest", end) >= 4, "{:?}", p.log);
    // The want list ends only after the manifest did, and data came before it.
    assert!(p.pos("R:want-end") > end);
    assert!(p.pos("S:chunk") < p.pos("S:manifest-end"));
    p.settle();
    p.s.finish();
    p.settle();
    assert_complete(&p, &src, &dest);
    // Each unique chunk crossed once (dup.jpg three times in the tree, once on the wire).
    let m = p.s.manifest().unwrap();
    let chunks = p.log.iter().filter(|l| *l == "S:chunk").count();
    assert_eq!(chunks as u64, m.summary().unique_chunks);
    // The receiver's totals name the whole manifest.
    assert!(p.r_events.iter().any(
        |e| matches!(e, RecvEvent::Wanted { chunks: c, .. } if *c == m.summary().unique_chunks)
    ));
}

#[test]
fn a_receiver_with_history_waits_for_the_whole_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let (src, dest) = (dir.path().join("src"), dir.path().join("dest"));
    make_history(&src);
    // Not fresh (the application decides from FsStore::is_fresh): manifest first, as in v3.
    let mut p = Pair::new(&src, &dest, ReceiverConfig::default(), no_tamper);
    let total = p.feed.len();
    for _ in 0..4 {
        p.push(total.div_ceil(4));
        p.settle();
    }
    assert!(p.pos("R:want") > p.pos("S:manifest-end"), "{:?}", p.log);
    p.s.finish();
    p.settle();
    assert_complete(&p, &src, &dest);
}

fn as_v3(f: Frame) -> Frame {
    with_version(f, 3)
}

#[test]
fn version_3_peers_get_a_manifest_first_session_and_complete() {
    // Both directions are rewritten: each side sees a version-3 peer. A v4 streaming sender
    // serves a v3 receiver; a v4 receiver with a fresh store does not stream to a v3 sender.
    let dir = tempfile::tempdir().unwrap();
    let (src, dest) = (dir.path().join("src"), dir.path().join("dest"));
    make_history(&src);
    let mut p = Pair::new(&src, &dest, fresh_cfg(), as_v3);
    let total = p.feed.len();
    for _ in 0..4 {
        p.push(total.div_ceil(4));
        p.settle();
    }
    let end = p.pos("S:manifest-end");
    assert_eq!(p.count_before("R:want", end), 0, "{:?}", p.log);
    assert_eq!(p.count_before("S:chunk", end), 0, "{:?}", p.log);
    assert!(p.s.peer_reports_durable() && p.s.peer_supports_rounds());
    p.s.finish();
    p.settle();
    assert_complete(&p, &src, &dest);
}

#[test]
fn a_version_5_peer_is_told_the_versions_apart() {
    let dir = tempfile::tempdir().unwrap();
    let (src, dest) = (dir.path().join("src"), dir.path().join("dest"));
    make_history(&src);
    let mut p = Pair::new(&src, &dest, fresh_cfg(), no_tamper);
    // A hello from a newer build, as raw bytes: the decoder names both versions.
    let mut raw = BytesMut::from(
        &encode_hello(&Hello {
            version: 5,
            role: ferry_sync::proto::frame::Role::Sender,
        })[..],
    );
    let err = decode_frame(&mut raw).unwrap_err();
    assert!(err.to_string().contains("version 5"), "{err}");
    p.r.handle_frame_error(err);
    p.settle();
    assert!(p.r_events.iter().any(|e| matches!(
        e,
        RecvEvent::Failed(SessionError::Frame(
            ferry_sync::proto::FrameError::UnsupportedVersion { theirs: 5, ours: 4 }
        ))
    )));
    assert!(p.log.iter().any(|l| l == "R:close"));
}

fn wrong_root(f: Frame) -> Frame {
    match f {
        Frame::Message(Message::ManifestEnd(mut s)) => {
            s.root = ChunkHash([7; 32]);
            Frame::Message(Message::ManifestEnd(s))
        }
        f => f,
    }
}

#[test]
fn a_root_mismatch_at_manifest_end_fails_after_chunks_arrived_and_nothing_is_finalized() {
    let dir = tempfile::tempdir().unwrap();
    let (src, dest) = (dir.path().join("src"), dir.path().join("dest"));
    make_history(&src);
    let mut p = Pair::new(&src, &dest, fresh_cfg(), wrong_root);
    let total = p.feed.len();
    for _ in 0..4 {
        p.push(total.div_ceil(4));
        p.settle();
    }
    let end = p.pos("S:manifest-end");
    assert!(p.count_before("S:chunk", end) >= 5, "{:?}", p.log);
    // The receiver refused the manifest with a clear reason and told the sender.
    let failed = p
        .r_events
        .iter()
        .find_map(|e| match e {
            RecvEvent::Failed(e) => Some(e.clone()),
            _ => None,
        })
        .expect("the receiver must fail");
    assert!(
        matches!(
            failed,
            SessionError::Manifest(ManifestError::RootMismatch { .. })
        ),
        "{failed:?}"
    );
    assert!(failed.to_string().contains("root hash does not match"));
    assert!(p.log[end..].iter().any(|l| l == "R:close"), "{:?}", p.log);
    assert!(p
        .s_events
        .iter()
        .any(|e| matches!(e, SendEvent::Failed(SessionError::PeerClosed { .. }))));
    assert!(!p.r.is_done());
    // Nothing reached a final path, and there is no receipt: only ferry's state folder.
    let names: Vec<_> = fs::read_dir(&dest)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, vec![".ferry".to_string()]);
    assert!(!FsStore::has_receipt(&dest));
    assert!(
        !FsStore::is_fresh(&dest),
        "verified chunks stay for a resume"
    );
}

#[test]
fn a_session_cut_mid_stream_resumes_from_what_was_committed() {
    let dir = tempfile::tempdir().unwrap();
    let (src, dest) = (dir.path().join("src"), dir.path().join("dest"));
    make_history(&src);
    assert!(FsStore::is_fresh(&dest) || !dest.exists());
    let mut p = Pair::new(&src, &dest, fresh_cfg(), no_tamper);
    let total = p.feed.len();
    p.push(total / 2);
    p.settle();
    let first = p.log.iter().filter(|l| *l == "S:chunk").count();
    assert!(first >= 3, "{:?}", p.log);
    // The link dies before the manifest is complete: everything verified gets committed.
    p.r.handle_link_lost();
    p.settle();
    assert!(p.r.is_idle());
    drop(p);
    // The next session finds a journal: not fresh, manifest first, and it reuses it all.
    assert!(!FsStore::is_fresh(&dest));
    let cfg = ReceiverConfig {
        stream: FsStore::is_fresh(&dest),
        ..ReceiverConfig::default()
    };
    let mut q = Pair::new(&src, &dest, cfg, no_tamper);
    q.push(total);
    q.settle();
    q.s.finish();
    q.settle();
    assert_complete(&q, &src, &dest);
    assert!(q
        .r_events
        .iter()
        .any(|e| matches!(e, RecvEvent::Resumed { .. })));
    let second = q.log.iter().filter(|l| *l == "S:chunk").count() as u64;
    let unique = q.s.manifest().unwrap().summary().unique_chunks;
    assert_eq!(second + first as u64, unique, "each chunk crossed once");
}

#[test]
fn a_streaming_scan_feeds_exactly_its_manifest_in_path_order() {
    use ferry_sync::scan::{scan_streaming, HashCache};
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    make_history(&src);
    let mut cache = HashCache::default();
    // Cold (everything hashed), then warm (everything from the cache).
    for round in 0..2 {
        let mut fed: Vec<WireEntry> = Vec::new();
        let mut batches = 0;
        let out = scan_streaming(&src, Some(&mut cache), &ScanConfig::default(), &mut |b| {
            assert!(!b.is_empty());
            batches += 1;
            fed.extend(b);
        })
        .unwrap();
        let m = &out.manifest;
        let want: Vec<_> = (0..m.entries().len())
            .map(|i| m.wire_entry(i).unwrap())
            .collect();
        assert_eq!(fed, want, "round {round}");
        assert!(batches >= 1);
        assert_eq!(out.cached_files > 0, round == 1);
    }
}

/// The whole stack over in-memory streams: a streaming scan feeds a streaming sender, a fresh
/// store receives. The scan of the last file (in path order) waits until the sender handed out
/// its first chunk: data flows before the scan has ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_flow_while_the_scan_still_hashes() {
    use ferry_sync::driver::{
        run_receiver, run_sender_round_streaming, Copying, Feed, RecvEnd, SendEnd, SenderIo,
        Verdict,
    };
    use ferry_sync::scan::{scan_streaming, ReadHook};
    use std::sync::Mutex;
    use std::time::Duration;
    use tokio::sync::mpsc;

    let dir = tempfile::tempdir().unwrap();
    let (src, dest) = (dir.path().join("src"), dir.path().join("dest"));
    make_history(&src);
    let (sent_tx, sent_rx) = std::sync::mpsc::sync_channel::<()>(1);
    let sent_rx = Arc::new(Mutex::new(sent_rx));
    let waited = Arc::new(Mutex::new(None));
    let cfg = {
        let (sent_rx, waited) = (Arc::clone(&sent_rx), Arc::clone(&waited));
        ScanConfig {
            after_read: Some(ReadHook::new(move |path, _| {
                if path == "z/empty" {
                    let r = sent_rx
                        .lock()
                        .unwrap()
                        .recv_timeout(Duration::from_secs(60));
                    *waited.lock().unwrap() = Some(r.is_ok());
                }
            })),
            ..ScanConfig::default()
        }
    };
    let (feed_tx, feed_rx) = mpsc::channel::<Feed>(4);
    let scan_src = src.clone();
    let scanning = tokio::task::spawn_blocking(move || {
        let out = scan_streaming(&scan_src, None, &cfg, &mut |b| {
            let _ = feed_tx.blocking_send(Feed::Entries(b));
        });
        let _ = feed_tx.blocking_send(Feed::End);
        out.unwrap().manifest.root()
    });

    let (c_s, c_r) = tokio::io::duplex(1 << 20);
    let (s_read, s_write) = tokio::io::split(c_s);
    let (r_read, r_write) = tokio::io::split(c_r);
    let (lane_tx, lane_rx) = mpsc::channel(2);
    let mut data = Vec::new();
    for _ in 0..2 {
        let (a, b) = tokio::io::duplex(1 << 20);
        data.push(Copying(a));
        lane_tx.send(b).await.unwrap();
    }
    drop(lane_tx);
    let empty = Arc::new(Manifest::from_wire_entries(vec![]).unwrap());
    let io = SenderIo {
        source: Arc::new(Source::new(&src, empty, CompressPolicy::default())),
        control_read: s_read,
        control_write: s_write,
        data,
    };
    let sender = Sender::streaming(SenderConfig::default());
    let send = tokio::spawn(async move {
        let mut first = Some(sent_tx);
        run_sender_round_streaming(
            sender,
            io,
            feed_rx,
            move |e| {
                if matches!(e, SendEvent::Sent { .. }) {
                    if let Some(tx) = first.take() {
                        let _ = tx.send(());
                    }
                }
            },
            || async { Verdict::<()>::Final },
        )
        .await
        .0
    });
    let store = Arc::new(FsStore::open(&dest).unwrap());
    let cfg = ReceiverConfig {
        stream: FsStore::is_fresh(&dest),
        ..ReceiverConfig::default()
    };
    assert!(cfg.stream);
    let end = run_receiver(Receiver::new(cfg), store, r_read, r_write, lane_rx, |_| {})
        .await
        .unwrap();
    assert!(matches!(send.await.unwrap().unwrap(), SendEnd::Final));
    let root = scanning.await.unwrap();
    let RecvEnd::Final(summary) = end else {
        panic!("{end:?}")
    };
    assert_eq!(summary.root, root);
    assert_eq!(
        *waited.lock().unwrap(),
        Some(true),
        "the first chunk went out before the scan's last file was hashed"
    );
    ferry_testkit::assert_trees_equal(&src, &dest).unwrap();
}

#[test]
fn a_silent_streaming_sender_times_out_only_after_ten_stall_timeouts() {
    use ferry_sync::manifest::{EntryKind, Mtime};
    use ferry_sync::proto::frame::Role;
    use ferry_sync::proto::CloseCode;
    use std::time::{Duration, Instant};

    let dir = tempfile::tempdir().unwrap();
    let store = FsStore::open(&dir.path().join("dest")).unwrap();
    let mut r = Receiver::new(ReceiverConfig {
        stream: true,
        stall_timeout: Duration::from_secs(1),
        ..ReceiverConfig::default()
    });
    let t0 = Instant::now();
    r.handle_timeout(t0);
    r.handle_frame(Frame::Hello(Hello {
        version: 4,
        role: Role::Sender,
    }));
    r.handle_frame(Frame::Message(Message::Manifest(vec![WireEntry {
        path: "a".into(),
        kind: EntryKind::Dir,
        size: 0,
        mode: 0o755,
        mtime: Mtime::default(),
        hashes: vec![],
    }])));
    while let Some(io) = r.poll_io() {
        r.handle_io_done(store.execute(io));
    }
    let failed = |r: &mut Receiver| {
        std::iter::from_fn(|| r.poll_event()).find_map(|e| match e {
            RecvEvent::Failed(e) => Some(e),
            _ => None,
        })
    };
    // Nothing wanted: the sender may be hashing a large file. Nine stall timeouts pass.
    r.handle_timeout(t0 + Duration::from_secs(9));
    assert_eq!(failed(&mut r), None);
    let deadline = r.poll_timeout().unwrap();
    assert!(deadline >= t0 + Duration::from_secs(10), "{deadline:?}");
    r.handle_timeout(t0 + Duration::from_secs(11));
    match failed(&mut r) {
        Some(SessionError::PeerClosed { code, reason }) => {
            assert_eq!(code, Some(CloseCode::Timeout));
            assert!(reason.contains("for 10 s"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
}
