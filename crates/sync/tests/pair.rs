//! An in-memory pair of protocol machines over a real store, with a virtual clock: the link is
//! cut after every frame position in turn, and the receiver is killed at every I/O step in turn.
//! The final tree must be byte-identical, and each interruption may cost at most the chunks that
//! were in flight.

use std::collections::{HashSet, VecDeque};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use ferry_sync::compress::CompressPolicy;
use ferry_sync::manifest::ChunkId;
use ferry_sync::proto::frame::{decode_frame, Frame, Message};
use ferry_sync::proto::{
    Receiver, ReceiverConfig, RecvEvent, RecvIo, RecvIoDone, SendEvent, Sender, SenderConfig,
    Transmit,
};
use ferry_sync::scan::{scan, ScanConfig};
use ferry_sync::source::Source;
use ferry_sync::store::{verify_dest, FsStore};
use ferry_sync::Manifest;

use ferry_testkit::rand_bytes;

/// A small history with every shape that matters: multi-chunk files, duplicates, a compressible
/// database-like file, empty files and directories, unicode names, nesting.
fn make_history(root: &Path) {
    fs::create_dir_all(root.join("db")).unwrap();
    fs::create_dir_all(root.join("media/ab")).unwrap();
    fs::create_dir_all(root.join("media/cd")).unwrap();
    fs::create_dir_all(root.join("empty/dir")).unwrap();
    fs::create_dir_all(root.join("文档")).unwrap();
    let text = "消息 hello, see you at 7? 好的！\n".repeat(20_000);
    fs::write(root.join("db/msg.db"), &text).unwrap(); // ~660 KB, compressible
    fs::write(root.join("media/ab/video.mp4"), rand_bytes(1, 700_000)).unwrap();
    let photo = rand_bytes(2, 200_000);
    for p in ["media/ab/p1.jpg", "media/cd/p1.jpg", "文档/转发 😀.jpg"] {
        fs::write(root.join(p), &photo).unwrap(); // forwarded media: one copy crosses
    }
    for i in 0..6 {
        fs::write(
            root.join(format!("media/cd/thumb{i}.jpg")),
            rand_bytes(10 + i, 3000 + i as usize * 1000),
        )
        .unwrap();
    }
    fs::write(root.join("empty.txt"), b"").unwrap();
}

fn tree_eq(a: &Path, b: &Path) {
    fn walk(root: &Path, rel: &Path, out: &mut Vec<(PathBuf, Option<Vec<u8>>)>) {
        let mut ents: Vec<_> = fs::read_dir(root.join(rel))
            .unwrap()
            .map(|e| e.unwrap())
            .collect();
        ents.sort_by_key(|e| e.file_name());
        for e in ents {
            let r = rel.join(e.file_name());
            if r == Path::new(".ferry") {
                continue;
            }
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                out.push((r.clone(), None));
                walk(root, &r, out);
            } else {
                out.push((r.clone(), Some(fs::read(root.join(&r)).unwrap())));
            }
        }
    }
    let (mut x, mut y) = (Vec::new(), Vec::new());
    walk(a, Path::new(""), &mut x);
    walk(b, Path::new(""), &mut y);
    assert_eq!(x.len(), y.len(), "entry counts differ");
    for (p, q) in x.iter().zip(&y) {
        assert_eq!(p.0, q.0);
        assert!(p.1 == q.1, "content of {} differs", p.0.display());
    }
}

const LINK_WINDOW: u64 = 256 << 10;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Fault {
    None,
    /// Cut the link after delivering this many frames (both directions) in the session.
    CutAfterFrame(usize),
    /// Kill the receiver (no flush) just before its n-th I/O step.
    KillAtIo(usize),
}

#[derive(Debug, PartialEq)]
enum End {
    Done,
    Cut { queued_chunk_bytes: u64 },
    Killed { queued_chunk_bytes: u64 },
}

struct Harness {
    src: PathBuf,
    dest: PathBuf,
    manifest: Arc<Manifest>,
    source: Arc<Source>,
    sent: HashSet<ChunkId>,
    /// Chunk ids in the order they were first sent.
    first_sent: Vec<ChunkId>,
    total_sent: u64,
    resent: u64,
    clock: Instant,
    send_cfg: SenderConfig,
    recv_cfg: ReceiverConfig,
    /// Flip a byte of this file just before the receiver's first local copy runs.
    damage_before_copy: Option<PathBuf>,
    /// Virtual time that passes with each frame delivered.
    tick: Duration,
    /// The version the sender's hello claims on the wire (default: its own).
    sender_hello_version: Option<u16>,
    /// The receiver's `Durable` reports (bytes, virtual time), and the sender's events.
    reports: Vec<(u64, Instant)>,
    sender_events: Vec<SendEvent>,
}

fn to_frame(t: Transmit) -> Frame {
    let mut b = BytesMut::new();
    b.extend_from_slice(&t.head);
    b.extend_from_slice(&t.body);
    let f = decode_frame(&mut b).unwrap().unwrap();
    assert!(b.is_empty());
    f
}

impl Harness {
    fn new(src: &Path, dest: &Path) -> Self {
        let manifest = Arc::new(scan(src, None, &ScanConfig::default()).unwrap().manifest);
        let source = Arc::new(Source::new(
            src,
            Arc::clone(&manifest),
            CompressPolicy::default(),
        ));
        Harness {
            src: src.to_path_buf(),
            dest: dest.to_path_buf(),
            manifest,
            source,
            sent: HashSet::new(),
            first_sent: Vec::new(),
            total_sent: 0,
            resent: 0,
            clock: Instant::now(),
            send_cfg: SenderConfig {
                read_ahead_bytes: 384 << 10,
                max_reads: 4,
                ..Default::default()
            },
            recv_cfg: ReceiverConfig {
                commit_bytes: 256 << 10,
                max_pending_bytes: 512 << 10,
                ..Default::default()
            },
            damage_before_copy: None,
            tick: Duration::ZERO,
            sender_hello_version: None,
            reports: Vec::new(),
            sender_events: Vec::new(),
        }
    }

    /// Runs one session until done or the fault strikes.
    fn session(&mut self, fault: Fault) -> End {
        let store = FsStore::open(&self.dest).unwrap();
        let mut s = Sender::new(Arc::clone(&self.manifest), self.send_cfg.clone());
        let mut r = Receiver::new(self.recv_cfg.clone());
        let mut s2r: VecDeque<Frame> = VecDeque::new();
        let mut r2s: VecDeque<Frame> = VecDeque::new();
        let mut rio: VecDeque<RecvIo> = VecDeque::new();
        let (mut frames, mut ios) = (0usize, 0usize);
        r.handle_timeout(self.clock);
        let queued = |q: &VecDeque<Frame>| -> u64 {
            q.iter()
                .map(|f| match f {
                    Frame::Chunk { raw_len, .. } => u64::from(*raw_len),
                    _ => 0,
                })
                .sum()
        };
        let mut idle_rounds = 0;
        loop {
            // The link holds at most LINK_WINDOW bytes of chunks in flight, like a flow-
            // controlled QUIC connection.
            while queued(&s2r) < LINK_WINDOW {
                let Some(t) = s.poll_transmit() else { break };
                let mut f = to_frame(t);
                if let (Frame::Hello(h), Some(v)) = (&mut f, self.sender_hello_version) {
                    h.version = v;
                }
                if let Frame::Chunk { id, raw_len, .. } = &f {
                    self.total_sent += u64::from(*raw_len);
                    if !self.sent.insert(*id) {
                        self.resent += u64::from(*raw_len);
                    } else {
                        self.first_sent.push(*id);
                    }
                }
                s2r.push_back(f);
            }
            while let Some(io) = s.poll_io() {
                s.handle_io_done(self.source.execute(io));
            }
            while let Some(ev) = s.poll_event() {
                if let SendEvent::Failed(e) = ev {
                    panic!("sender failed: {e}");
                }
                self.sender_events.push(ev);
            }
            while let Some(t) = r.poll_transmit() {
                let f = to_frame(t);
                if let Frame::Message(Message::Durable { bytes }) = f {
                    self.reports.push((bytes, self.clock));
                }
                r2s.push_back(f);
            }
            while let Some(io) = r.poll_io() {
                rio.push_back(io);
            }
            while let Some(ev) = r.poll_event() {
                if let RecvEvent::Failed(e) = ev {
                    panic!("receiver failed: {e}");
                }
            }
            if r.is_done() && s.is_closed() {
                return End::Done;
            }
            if r.is_done() && r2s.is_empty() && s2r.is_empty() {
                // The sender got Done and closed; nothing left to deliver.
                return End::Done;
            }
            if let Some(io) = rio.pop_front() {
                if fault == Fault::KillAtIo(ios) {
                    return End::Killed {
                        queued_chunk_bytes: queued(&s2r),
                    };
                }
                ios += 1;
                let copy = matches!(io, RecvIo::Copy { .. });
                if let Some(p) = self.damage_before_copy.take_if(|_| copy) {
                    let mut b = fs::read(&p).unwrap();
                    b[0] ^= 0xff;
                    fs::write(&p, b).unwrap();
                }
                let done = store.execute(io);
                assert!(
                    !matches!(done, RecvIoDone::Failed { .. }),
                    "store failed: {done:?}"
                );
                r.handle_io_done(done);
                idle_rounds = 0;
                continue;
            }
            if !r2s.is_empty() || !s2r.is_empty() {
                if fault == Fault::CutAfterFrame(frames) {
                    let queued_chunk_bytes = queued(&s2r);
                    // The receiver notices the loss and commits what it verified.
                    r.handle_link_lost();
                    loop {
                        while let Some(io) = r.poll_io() {
                            rio.push_back(io);
                        }
                        let Some(io) = rio.pop_front() else { break };
                        r.handle_io_done(store.execute(io));
                    }
                    assert!(r.is_idle());
                    return End::Cut { queued_chunk_bytes };
                }
                frames += 1;
                if !self.tick.is_zero() {
                    self.clock += self.tick;
                    r.handle_timeout(self.clock);
                }
                if let Some(f) = r2s.pop_front() {
                    s.handle_frame(f);
                }
                if let Some(f) = s2r.pop_front() {
                    r.handle_frame(f);
                }
                idle_rounds = 0;
                continue;
            }
            // Nothing to do: let virtual time pass (group commit timer).
            idle_rounds += 1;
            assert!(idle_rounds < 10, "deadlock: nothing moves");
            self.clock += Duration::from_secs(1);
            r.handle_timeout(self.clock);
        }
    }

    fn finish(&mut self) {
        assert_eq!(self.session(Fault::None), End::Done);
        tree_eq(&self.src, &self.dest);
        let report = verify_dest(&self.dest).unwrap();
        assert!(report.mismatched.is_empty(), "{:?}", report.mismatched);
        assert_eq!(report.root, self.manifest.root());
        assert!(!self.dest.join(".ferry/staging").exists());
        assert!(!self.dest.join(".ferry/journal").exists());
    }
}

#[test]
fn clean_run_and_dedup() {
    let dir = tempfile::tempdir().unwrap();
    let (src, dest) = (dir.path().join("src"), dir.path().join("dest"));
    make_history(&src);
    // A forwarded video stored 50 times across chats.
    let video = rand_bytes(99, 300_000);
    for i in 0..50 {
        fs::create_dir_all(src.join(format!("chat{i:02}"))).unwrap();
        fs::write(src.join(format!("chat{i:02}/forwarded.mp4")), &video).unwrap();
    }
    let mut h = Harness::new(&src, &dest);
    h.finish();
    // Every unique chunk crossed exactly once: the 50 copies (and the 3 copies of the photo)
    // cost one transfer each.
    let s = *h.manifest.summary();
    assert_eq!(h.total_sent, s.unique_bytes);
    assert_eq!(h.resent, 0);
    assert!(s.unique_bytes + 49 * 300_000 + 2 * 200_000 <= s.bytes);
}

#[test]
fn link_cut_after_every_frame_position() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    make_history(&src);
    let clean_frames = {
        // Count frames of a clean session by cutting at an unreachable position.
        let mut k = 0;
        loop {
            let dest = dir.path().join(format!("probe{k}"));
            let mut h = Harness::new(&src, &dest);
            match h.session(Fault::CutAfterFrame(k)) {
                End::Done => break k,
                _ => k += 8,
            }
        }
    };
    assert!(
        clean_frames > 20,
        "history too small to be meaningful: {clean_frames} frames"
    );
    let mut worst = 0u64;
    let mut total_resent = 0u64;
    let mut cuts = 0u64;
    for k in 0..clean_frames {
        let dest = dir.path().join(format!("cut{k}"));
        let mut h = Harness::new(&src, &dest);
        let end = h.session(Fault::CutAfterFrame(k));
        let End::Cut { queued_chunk_bytes } = end else {
            continue; // the session finished before frame k
        };
        let before = h.resent;
        h.finish();
        let resent = h.resent - before;
        // Only chunks that were on the wire when the link dropped may cross again.
        assert!(
            resent <= queued_chunk_bytes,
            "cut at {k}: resent {resent} > in flight {queued_chunk_bytes}"
        );
        worst = worst.max(resent);
        total_resent += resent;
        cuts += 1;
        let _ = fs::remove_dir_all(&dest);
    }
    eprintln!(
        "link cuts: {cuts}, re-sent per cut: max {worst} B, mean {} B",
        total_resent / cuts.max(1)
    );
}

#[test]
fn receiver_killed_at_every_io_step() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    make_history(&src);
    let mut kills = 0;
    let mut worst = 0u64;
    for k in 0.. {
        let dest = dir.path().join(format!("kill{k}"));
        let mut h = Harness::new(&src, &dest);
        let end = h.session(Fault::KillAtIo(k));
        let End::Killed { queued_chunk_bytes } = end else {
            assert!(k > 10, "too few I/O steps: {k}");
            break;
        };
        kills += 1;
        let before = h.resent;
        // Kill again in the second session at the same step, then finish.
        if let End::Killed { .. } = h.session(Fault::KillAtIo(k)) {
            kills += 1;
        }
        h.finish();
        let resent = h.resent - before;
        // In flight = on the wire + verified but not yet committed (bounded by the commit window).
        let bound = 2 * (queued_chunk_bytes + h.recv_cfg.max_pending_bytes);
        assert!(resent <= bound, "kill at {k}: resent {resent} > {bound}");
        worst = worst.max(resent);
        let _ = fs::remove_dir_all(&dest);
    }
    eprintln!("receiver kills: {kills}, worst re-sent {worst} B");
}

#[test]
fn restarted_sender_resumes_and_local_copies_are_reused() {
    let dir = tempfile::tempdir().unwrap();
    let (src, dest) = (dir.path().join("src"), dir.path().join("dest"));
    make_history(&src);
    let mut h = Harness::new(&src, &dest);
    assert!(matches!(
        h.session(Fault::CutAfterFrame(25)),
        End::Cut { .. }
    ));
    // A "restarted sender" re-scans the unchanged directory: same content, same hashes.
    let mut h2 = Harness::new(&src, &dest);
    assert_eq!(h2.manifest.root(), h.manifest.root());
    h2.sent = h.sent.clone();
    h2.finish();
    assert!(
        h2.total_sent < h.manifest.summary().unique_bytes,
        "nothing was reused"
    );

    // An older copy of the history already at DEST (receipt removed, as if copied by hand):
    // migrating a slightly changed history re-sends only what differs.
    fs::remove_dir_all(dest.join(".ferry")).unwrap();
    fs::write(src.join("new.txt"), b"a new message arrived").unwrap();
    let mut h3 = Harness::new(&src, &dest);
    h3.finish();
    assert_eq!(h3.total_sent, 21);
}

#[test]
fn corrupt_chunks_are_refused_and_fetched_again() {
    let dir = tempfile::tempdir().unwrap();
    let (src, dest) = (dir.path().join("src"), dir.path().join("dest"));
    make_history(&src);
    let manifest = Arc::new(scan(&src, None, &ScanConfig::default()).unwrap().manifest);
    let source = Source::new(&src, Arc::clone(&manifest), CompressPolicy::default());
    let store = FsStore::open(&dest).unwrap();
    let mut s = Sender::new(Arc::clone(&manifest), SenderConfig::default());
    let mut r = Receiver::new(ReceiverConfig::default());
    let mut corrupted = 0;
    let mut rejected_events = 0;
    for _ in 0..10_000 {
        while let Some(io) = s.poll_io() {
            s.handle_io_done(source.execute(io));
        }
        while let Some(t) = s.poll_transmit() {
            let mut f = to_frame(t);
            // Flip a byte in the first two chunk frames.
            if let Frame::Chunk { payload, .. } = &mut f {
                if corrupted < 2 && !payload.is_empty() {
                    let mut p = payload.to_vec();
                    p[0] ^= 0xff;
                    *payload = p.into();
                    corrupted += 1;
                }
            }
            r.handle_frame(f);
        }
        while let Some(io) = r.poll_io() {
            let done = store.execute(io);
            if matches!(done, RecvIoDone::Corrupt { .. }) {
                rejected_events += 1;
            }
            r.handle_io_done(done);
        }
        while let Some(t) = r.poll_transmit() {
            s.handle_frame(to_frame(t));
        }
        while let Some(ev) = r.poll_event() {
            assert!(!matches!(ev, RecvEvent::Failed(_)), "{ev:?}");
        }
        while s.poll_event().is_some() {}
        if r.is_done() {
            break;
        }
    }
    assert!(r.is_done());
    assert_eq!(rejected_events, 2);
    tree_eq(&src, &dest);
}

#[test]
fn damaged_local_copy_source_is_fetched_from_the_sender() {
    let dir = tempfile::tempdir().unwrap();
    let (src, dest) = (dir.path().join("src"), dir.path().join("dest"));
    make_history(&src);
    // DEST already holds one copy of the forwarded photo (an older migration); the history has
    // two more copies of it, which the receiver copies locally — from a source that gets damaged
    // between the check at prepare and the copy.
    fs::create_dir_all(dest.join("media/ab")).unwrap();
    fs::copy(src.join("media/ab/p1.jpg"), dest.join("media/ab/p1.jpg")).unwrap();
    let mut h = Harness::new(&src, &dest);
    h.damage_before_copy = Some(dest.join("media/ab/p1.jpg"));
    h.finish();
    assert!(h.damage_before_copy.is_none(), "no local copy happened");
}

#[test]
fn databases_then_small_files_are_sent_first() {
    let dir = tempfile::tempdir().unwrap();
    let (src, dest) = (dir.path().join("src"), dir.path().join("dest"));
    for (path, len, seed) in [
        ("a/movie.mp4", 3_000_000, 1),
        ("b/msg_0.db", 1_000_000, 2),
        ("c/note.txt", 10_000, 3),
        ("d/photo.jpg", 400_000, 4),
    ] {
        let p = src.join(path);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, rand_bytes(seed, len)).unwrap();
    }
    let mut h = Harness::new(&src, &dest);
    h.finish();
    let m = Arc::clone(&h.manifest);
    let mut files: Vec<&str> = Vec::new();
    for &id in &h.first_sent {
        let slot = m.unique(id).unwrap().first_slot;
        let e = m.entry(m.locate(slot).unwrap().entry).unwrap();
        if files.last() != Some(&e.path.as_str()) {
            files.push(&e.path);
        }
    }
    assert_eq!(
        files,
        ["b/msg_0.db", "c/note.txt", "d/photo.jpg", "a/movie.mp4"],
        "each file whole, in the transfer order"
    );
}

#[test]
fn a_directory_where_a_file_goes_is_a_conflict_not_a_loss() {
    let dir = tempfile::tempdir().unwrap();
    let (src, dest) = (dir.path().join("src"), dir.path().join("dest"));
    make_history(&src);
    // Someone's folder (with a file in it) sits where the history has a video.
    fs::create_dir_all(dest.join("media/ab/video.mp4")).unwrap();
    fs::write(dest.join("media/ab/video.mp4/theirs.txt"), b"keep me").unwrap();
    let mut h = Harness::new(&src, &dest);
    let failed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        h.session(Fault::None);
    }))
    .expect_err("finalize must refuse to replace a directory");
    let msg = failed.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(
        msg.contains("a directory exists where the history has a file"),
        "{msg}"
    );
    // Nothing of theirs was touched, and no receipt claims a finished migration.
    assert_eq!(
        fs::read(dest.join("media/ab/video.mp4/theirs.txt")).unwrap(),
        b"keep me"
    );
    assert!(!dest.join(".ferry/receipt").exists());
    // Once the folder is moved away, the same migration finishes from what was kept.
    fs::remove_dir_all(dest.join("media/ab/video.mp4")).unwrap();
    h.finish();
    assert_eq!(h.resent, 0, "verified data was fetched again");
}

/// Protocol 3: during the round the receiver reports the bytes it holds durably, at most every
/// 250 ms of its clock and always at its last commit, and the sender surfaces each report as
/// it came (growing, ending at the round's total) — the sender's "verified" progress.
#[test]
fn the_receiver_reports_durable_bytes_and_the_sender_surfaces_them() {
    let dir = tempfile::tempdir().unwrap();
    let (src, dest) = (dir.path().join("src"), dir.path().join("dest"));
    make_history(&src);
    let mut h = Harness::new(&src, &dest);
    h.tick = Duration::from_millis(40);
    h.finish();
    let total = h.manifest.summary().bytes;
    let reported: Vec<u64> = h.reports.iter().map(|(b, _)| *b).collect();
    assert!(reported.len() >= 3, "{reported:?}");
    assert!(reported.windows(2).all(|w| w[0] < w[1]), "{reported:?}");
    assert_eq!(reported.last(), Some(&total));
    // Paced by the receiver's clock; only the round's last commit may come sooner.
    let paced = &h.reports[..h.reports.len() - 1];
    assert!(
        paced
            .windows(2)
            .all(|w| w[1].1 - w[0].1 >= Duration::from_millis(250)),
        "{:?}",
        h.reports
    );
    assert!(h.sender_events.iter().any(|e| matches!(
        e,
        SendEvent::Wanted {
            reports_durable: true,
            ..
        }
    )));
    let surfaced: Vec<u64> = h
        .sender_events
        .iter()
        .filter_map(|e| match e {
            SendEvent::Durable { bytes } => Some(*bytes),
            _ => None,
        })
        .collect();
    assert_eq!(surfaced, reported);
}

/// A sender whose hello says version 2 could not decode a `Durable` frame: the receiver never
/// sends one to it, and the migration completes as before.
#[test]
fn a_version_2_sender_is_never_sent_a_durable_report() {
    let dir = tempfile::tempdir().unwrap();
    let (src, dest) = (dir.path().join("src"), dir.path().join("dest"));
    make_history(&src);
    let mut h = Harness::new(&src, &dest);
    h.tick = Duration::from_millis(40);
    h.sender_hello_version = Some(2);
    h.finish();
    assert_eq!(h.reports, vec![]);
    assert!(!h
        .sender_events
        .iter()
        .any(|e| matches!(e, SendEvent::Durable { .. })));
}
