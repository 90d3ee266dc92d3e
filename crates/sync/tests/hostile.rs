//! Hostile peers against the real machines and stores.
//!
//! **Hostile sender**: raw frames (built with the library's encoder, then mangled) go through the
//! real frame decoder into the real [`Receiver`], whose I/O runs against a real [`FsStore`] on a
//! temporary DEST. Each case must end with a *specific* error, within bounded memory (a counting
//! allocator in this test binary measures the peak while the case runs) and virtual time, with no
//! write outside DEST, and with the receiver's partial state intact: an honest sender afterwards
//! completes the migration into the same DEST byte-identically, without re-sending what was
//! durable before the attack.
//!
//! **Hostile receiver**: raw frames into the real [`Sender`] with a real [`Source`]: wants outside
//! the manifest, the same chunk forever, absurd ranges, never reading; and a symlink swapped into
//! the shared directory after the scan, which must not be followed.
#![allow(unsafe_code)] // the counting allocator below

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::{BTreeMap, VecDeque};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use ferry_sync::compress::{CompressPolicy, Encoding};
use ferry_sync::manifest::{
    ChunkHash, ChunkId, EntryKind, ManifestBuilder, ManifestError, ManifestLimits, ManifestSummary,
    Mtime, WireEntry,
};
use ferry_sync::path::PathProblem;
use ferry_sync::proto::frame::{
    decode_frame, encode_chunk_header, encode_hello, encode_message, ChunkRange, Frame, FrameError,
    Hello, Message, Role, MAX_FRAME_BODY, PROTOCOL_VERSION,
};
use ferry_sync::proto::{
    CloseCode, Receiver, ReceiverConfig, RecvEvent, SendEvent, SendIo, SendIoDone, Sender,
    SenderConfig, SessionError, Transmit,
};
use ferry_sync::scan::{scan, ScanConfig};
use ferry_sync::source::Source;
use ferry_sync::store::{verify_dest, FsStore, StoreError};
use ferry_sync::Manifest;

// ---------------------------------------------------------------------------------------------
// A counting allocator: per-thread live bytes and peak. Every case runs the machine and the store
// on the test's own thread, so the thread's peak is the case's peak.

struct Counting;

thread_local! {
    static LIVE: Cell<i64> = const { Cell::new(0) };
    static PEAK: Cell<i64> = const { Cell::new(0) };
}

fn count(delta: i64) {
    let _ = LIVE.try_with(|l| {
        let v = l.get() + delta;
        l.set(v);
        let _ = PEAK.try_with(|p| {
            if v > p.get() {
                p.set(v)
            }
        });
    });
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            count(l.size() as i64);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(l) };
        if !p.is_null() {
            count(l.size() as i64);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) };
        count(-(l.size() as i64));
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        let q = unsafe { System.realloc(p, l, new) };
        if !q.is_null() {
            count(new as i64 - l.size() as i64);
        }
        q
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Runs `f` and returns its result with the most memory it held live at once on this thread.
fn peak_of<T>(f: impl FnOnce() -> T) -> (T, u64) {
    let base = LIVE.with(|l| l.get());
    PEAK.with(|p| p.set(base));
    let out = f();
    let peak = PEAK.with(|p| p.get()) - base;
    (out, peak.max(0) as u64)
}

/// Far below anything a claimed size could make the receiver allocate (claims are of TiB).
const MEM_BOUND: u64 = 48 << 20;

// ---------------------------------------------------------------------------------------------
// The world: a temp dir holding src/, dest/ and outside/ (a canary nothing may touch).

use ferry_testkit::rand_bytes;

struct World {
    _tmp: tempfile::TempDir,
    top: PathBuf,
    src: PathBuf,
    dest: PathBuf,
    manifest: Arc<Manifest>,
    source: Arc<Source>,
    before: BTreeMap<PathBuf, String>,
}

fn make_history(root: &Path) {
    fs::create_dir_all(root.join("db")).unwrap();
    fs::create_dir_all(root.join("media/ab")).unwrap();
    fs::write(
        root.join("db/msg.db"),
        "消息 hello, see you at 7?\n".repeat(30_000),
    )
    .unwrap();
    fs::write(root.join("media/ab/video.mp4"), rand_bytes(1, 900_000)).unwrap();
    let photo = rand_bytes(2, 150_000);
    fs::write(root.join("media/ab/p1.jpg"), &photo).unwrap();
    fs::write(root.join("media/p1-copy.jpg"), &photo).unwrap();
    for i in 0..5 {
        fs::write(
            root.join(format!("media/t{i}.jpg")),
            rand_bytes(10 + i, 5000),
        )
        .unwrap();
    }
    fs::write(root.join("empty.txt"), b"").unwrap();
    std::os::unix::fs::symlink("media/ab/p1.jpg", root.join("latest.jpg")).unwrap();
}

/// Everything under `top` except DEST: path → kind, size, mtime, link target.
fn snapshot_outside(top: &Path, dest: &Path) -> BTreeMap<PathBuf, String> {
    fn walk(dir: &Path, dest: &Path, out: &mut BTreeMap<PathBuf, String>) {
        for e in fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p == dest {
                continue;
            }
            let md = fs::symlink_metadata(&p).unwrap();
            let desc = format!(
                "{:?} {} {:?} {:?}",
                md.file_type(),
                md.len(),
                md.modified().ok(),
                fs::read_link(&p).ok()
            );
            out.insert(p.clone(), desc);
            if md.is_dir() {
                walk(&p, dest, out);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(top, dest, &mut out);
    out
}

impl World {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let top = tmp.path().to_path_buf();
        let (src, dest) = (top.join("src"), top.join("dest"));
        make_history(&src);
        fs::create_dir_all(top.join("outside")).unwrap();
        fs::write(top.join("outside/canary"), b"must stay as it is").unwrap();
        let manifest = Arc::new(scan(&src, None, &ScanConfig::default()).unwrap().manifest);
        let source = Arc::new(Source::new(
            &src,
            Arc::clone(&manifest),
            CompressPolicy::default(),
        ));
        let before = snapshot_outside(&top, &dest);
        World {
            _tmp: tmp,
            top,
            src,
            dest,
            manifest,
            source,
            before,
        }
    }

    fn assert_nothing_written_outside_dest(&self) {
        assert_eq!(
            snapshot_outside(&self.top, &self.dest),
            self.before,
            "something outside DEST changed"
        );
    }

    fn wire_entries(&self) -> Vec<WireEntry> {
        (0..self.manifest.entries().len())
            .map(|i| self.manifest.wire_entry(i).unwrap())
            .collect()
    }

    /// An honest session (real sender, source, receiver, store) over an in-memory link.
    /// `stop_after_chunks` cuts the link after that many chunk frames were delivered.
    /// Returns whether it completed and the bytes the receiver said it already had.
    fn honest(&self, stop_after_chunks: Option<usize>) -> (bool, u64) {
        let store = FsStore::open(&self.dest).unwrap();
        let mut s = Sender::new(Arc::clone(&self.manifest), SenderConfig::default());
        let mut r = Receiver::new(ReceiverConfig {
            commit_bytes: 128 << 10,
            ..Default::default()
        });
        let mut clock = Instant::now();
        r.handle_timeout(clock);
        let (mut s2r, mut r2s) = (VecDeque::new(), VecDeque::new());
        let (mut chunks, mut resumed, mut idle) = (0usize, 0u64, 0);
        loop {
            while let Some(t) = s.poll_transmit() {
                s2r.push_back(to_frame(&t));
            }
            while let Some(io) = s.poll_io() {
                s.handle_io_done(self.source.execute(io));
            }
            while let Some(ev) = s.poll_event() {
                assert!(!matches!(ev, SendEvent::Failed(_)), "{ev:?}");
            }
            while let Some(t) = r.poll_transmit() {
                r2s.push_back(to_frame(&t));
            }
            let mut did_io = false;
            while let Some(io) = r.poll_io() {
                r.handle_io_done(store.execute(io));
                did_io = true;
            }
            while let Some(ev) = r.poll_event() {
                match ev {
                    RecvEvent::Failed(e) => panic!("honest session failed: {e}"),
                    RecvEvent::Resumed { bytes_have, .. } => resumed = bytes_have,
                    _ => {}
                }
            }
            if r.is_done() {
                return (true, resumed);
            }
            if let Some(f) = r2s.pop_front() {
                s.handle_frame(f);
                idle = 0;
                continue;
            }
            if let Some(f) = s2r.pop_front() {
                if matches!(f, Frame::Chunk { .. }) {
                    if stop_after_chunks == Some(chunks) {
                        r.handle_link_lost();
                        while !r.is_idle() {
                            let io = r.poll_io().expect("draining receiver has I/O");
                            r.handle_io_done(store.execute(io));
                        }
                        return (false, resumed);
                    }
                    chunks += 1;
                }
                r.handle_frame(f);
                idle = 0;
                continue;
            }
            if !did_io {
                idle += 1;
                assert!(idle < 10, "honest session deadlocked");
                clock += Duration::from_secs(1);
                r.handle_timeout(clock);
            }
        }
    }

    /// Completes the migration honestly and checks DEST against the source, byte for byte.
    /// Returns the bytes the receiver already had.
    fn finish_honestly(&self) -> u64 {
        let (done, resumed) = self.honest(None);
        assert!(done);
        assert_trees_equal(&self.src, &self.dest);
        let report = verify_dest(&self.dest).unwrap();
        assert!(report.mismatched.is_empty(), "{:?}", report.mismatched);
        assert_eq!(report.root, self.manifest.root());
        self.assert_nothing_written_outside_dest();
        resumed
    }
}

fn assert_trees_equal(a: &Path, b: &Path) {
    fn walk(root: &Path, rel: &Path, out: &mut Vec<(PathBuf, String)>) {
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
            let p = root.join(&r);
            if ft.is_dir() {
                out.push((r.clone(), "dir".into()));
                walk(root, &r, out);
            } else if ft.is_symlink() {
                out.push((r, format!("-> {:?}", fs::read_link(&p).unwrap())));
            } else {
                let h = blake3::hash(&fs::read(&p).unwrap());
                out.push((r, h.to_hex().to_string()));
            }
        }
    }
    let (mut x, mut y) = (Vec::new(), Vec::new());
    walk(a, Path::new(""), &mut x);
    walk(b, Path::new(""), &mut y);
    assert_eq!(x, y);
}

fn to_frame(t: &Transmit) -> Frame {
    let mut b = BytesMut::new();
    b.extend_from_slice(&t.head);
    b.extend_from_slice(&t.body);
    let f = decode_frame(&mut b).unwrap().unwrap();
    assert!(b.is_empty());
    f
}

// ---------------------------------------------------------------------------------------------
// The victim: a real receiver and store fed raw bytes by a hostile sender.

struct Victim {
    store: FsStore,
    r: Receiver,
    clock: Instant,
    inbox: BytesMut,
    /// Frames the receiver sent back.
    replies: Vec<Frame>,
    failure: Option<SessionError>,
}

impl Victim {
    fn new(dest: &Path, cfg: ReceiverConfig) -> Self {
        let store = FsStore::open(dest).unwrap();
        let mut r = Receiver::new(cfg);
        let clock = Instant::now();
        r.handle_timeout(clock);
        let mut v = Victim {
            store,
            r,
            clock,
            inbox: BytesMut::new(),
            replies: Vec::new(),
            failure: None,
        };
        v.pump();
        v
    }

    /// Delivers raw bytes as they would arrive on the control stream.
    fn feed(&mut self, bytes: &[u8]) {
        self.inbox.extend_from_slice(bytes);
        loop {
            match decode_frame(&mut self.inbox) {
                Ok(Some(f)) => self.r.handle_frame(f),
                Ok(None) => break,
                Err(e) => {
                    self.r.handle_frame_error(e);
                    self.inbox.clear();
                    break;
                }
            }
            self.pump();
        }
        self.pump();
    }

    fn send_msg(&mut self, m: &Message) {
        self.feed(&encode_message(m).unwrap());
    }

    fn hello(&mut self) {
        self.feed(&encode_hello(&Hello {
            version: PROTOCOL_VERSION,
            role: Role::Sender,
        }));
    }

    /// Runs the receiver's I/O against the store and collects replies and the failure.
    fn pump(&mut self) {
        loop {
            let mut moved = false;
            while let Some(t) = self.r.poll_transmit() {
                self.replies.push(to_frame(&t));
                moved = true;
            }
            while let Some(io) = self.r.poll_io() {
                let done = self.store.execute(io);
                self.r.handle_io_done(done);
                moved = true;
            }
            while let Some(ev) = self.r.poll_event() {
                if let RecvEvent::Failed(e) = ev {
                    self.failure.get_or_insert(e);
                }
                moved = true;
            }
            if !moved {
                break;
            }
        }
    }

    fn advance(&mut self, d: Duration) {
        self.clock += d;
        self.r.handle_timeout(self.clock);
        self.pump();
    }

    /// Chunk ids the receiver asked for so far (in order, with repeats).
    fn wanted(&self) -> Vec<ChunkId> {
        self.replies
            .iter()
            .filter_map(|f| match f {
                Frame::Message(Message::Want(r)) => Some(r.clone()),
                _ => None,
            })
            .flatten()
            .flat_map(|r: ChunkRange| (r.start.0..r.end.0).map(ChunkId))
            .collect()
    }

    fn rejected(&self) -> usize {
        self.replies
            .iter()
            .filter(|f| matches!(f, Frame::Message(Message::Rejected { .. })))
            .count()
    }

    /// The close code the receiver sent, if any.
    fn close_code(&self) -> Option<CloseCode> {
        self.replies.iter().find_map(|f| match f {
            Frame::Message(Message::Close { code, .. }) => CloseCode::from_u16(*code),
            _ => None,
        })
    }

    /// Ends the case: the receiver has failed with a close frame and settled its I/O.
    fn end(mut self) -> SessionError {
        self.pump();
        assert!(self.r.is_idle(), "receiver still busy after failing");
        let e = self.failure.take().expect("the receiver did not fail");
        if !matches!(e, SessionError::PeerClosed { .. }) {
            assert_eq!(self.close_code(), Some(e.close_code()), "{e}");
        }
        e
    }
}

/// Chunk ids `start..end` on the wire.
fn range(start: u32, end: u32) -> ChunkRange {
    ChunkRange {
        start: ChunkId(start),
        end: ChunkId(end),
    }
}

fn chunk_frame(id: ChunkId, encoding: Encoding, raw_len: u32, payload: &[u8]) -> Vec<u8> {
    let mut b = encode_chunk_header(id, encoding, raw_len, payload.len()).to_vec();
    b.extend_from_slice(payload);
    b
}

fn summary_of(entries: &[WireEntry]) -> ManifestSummary {
    let mut b = ManifestBuilder::new(ManifestLimits::default());
    for e in entries {
        b.push(e.clone()).unwrap();
    }
    *b.finish_unchecked().summary()
}

fn file(path: &str, data: &[u8]) -> WireEntry {
    let shift = ferry_sync::manifest::chunk_shift_for(data.len() as u64);
    WireEntry {
        path: path.into(),
        kind: EntryKind::File { chunk_shift: shift },
        size: data.len() as u64,
        mode: 0o644,
        mtime: Mtime::default(),
        hashes: data.chunks(1 << shift).map(ChunkHash::of).collect(),
    }
}

fn dir(path: &str) -> WireEntry {
    WireEntry {
        path: path.into(),
        kind: EntryKind::Dir,
        size: 0,
        mode: 0o755,
        mtime: Mtime::default(),
        hashes: vec![],
    }
}

fn link(path: &str, target: &str) -> WireEntry {
    WireEntry {
        kind: EntryKind::Symlink {
            target: target.into(),
        },
        mode: 0o777,
        ..dir(path)
    }
}

/// Sets up a DEST holding part of the history, durable, as a cut session leaves it.
/// Returns the world and the bytes an honest resume finds already there.
fn world_with_partial_dest() -> (World, u64) {
    let w = World::new();
    let (done, _) = w.honest(Some(4));
    assert!(!done);
    // What a resume finds: measured with a session that stops before any chunk.
    let (_, have) = w.honest(Some(0));
    assert!(have > 0, "the cut session left nothing durable");
    (w, have)
}

// ---------------------------------------------------------------------------------------------
// Hostile sender: the manifest.

fn unsafe_path(p: PathProblem) -> impl Fn(&SessionError) -> bool {
    move |e| matches!(e, SessionError::Manifest(ManifestError::UnsafePath { problem, .. }) if *problem == p)
}

#[test]
fn hostile_manifests_are_refused_and_leave_the_partial_dest_resumable() {
    let (w, have) = world_with_partial_dest();
    let long_name = "n".repeat(256);
    let long_path = vec!["d"; 2100].join("/");
    let deep_path = vec!["d"; 129].join("/");
    let big = rand_bytes(5, 1000);
    let mut absurd_size = file("huge.bin", b"x");
    absurd_size.size = u64::MAX; // 1 chunk hash for 16 EiB
    let mut absurd_shift = file("shift.bin", b"x");
    absurd_shift.kind = EntryKind::File { chunk_shift: 63 };
    let mut sized_dir = dir("d");
    sized_dir.size = 1 << 40;

    type Case = (
        &'static str,
        Vec<WireEntry>,
        Box<dyn Fn(&SessionError) -> bool>,
    );
    let cases: Vec<Case> = vec![
        (
            "absolute path",
            vec![file("/etc/cron.d/x", b"* * * * * root sh")],
            Box::new(unsafe_path(PathProblem::Absolute)),
        ),
        (
            "parent component",
            vec![file("../outside/canary", b"pwned")],
            Box::new(unsafe_path(PathProblem::ParentComponent)),
        ),
        (
            "parent in the middle",
            vec![dir("a"), file("a/../../outside/x", b"pwned")],
            Box::new(unsafe_path(PathProblem::ParentComponent)),
        ),
        (
            "dot component",
            vec![file("./x", b"1")],
            Box::new(unsafe_path(PathProblem::DotComponent)),
        ),
        (
            "empty component",
            vec![file("a//x", b"1")],
            Box::new(unsafe_path(PathProblem::EmptyComponent)),
        ),
        (
            "NUL in a name",
            vec![file("a\0b", b"1")],
            Box::new(unsafe_path(PathProblem::Nul)),
        ),
        (
            "backslash (a Windows separator)",
            vec![file("..\\..\\x", b"1")],
            Box::new(unsafe_path(PathProblem::Backslash)),
        ),
        (
            "component over 255 bytes",
            vec![file(&long_name, b"1")],
            Box::new(unsafe_path(PathProblem::NameTooLong)),
        ),
        (
            "path over 4096 bytes",
            vec![file(&long_path, b"1")],
            Box::new(unsafe_path(PathProblem::TooLong)),
        ),
        (
            "nesting over 128",
            vec![file(&deep_path, b"1")],
            Box::new(unsafe_path(PathProblem::TooDeep)),
        ),
        (
            "ferry's own state folder",
            vec![file(".ferry/journal", b"garbage")],
            Box::new(unsafe_path(PathProblem::Reserved)),
        ),
        (
            "empty path",
            vec![file("", b"1")],
            Box::new(unsafe_path(PathProblem::Empty)),
        ),
        (
            "duplicate name",
            vec![file("a", b"1"), file("a", b"2")],
            Box::new(|e: &SessionError| {
                matches!(e, SessionError::Manifest(ManifestError::OutOfOrder { .. }))
            }),
        ),
        (
            "unsorted names",
            vec![file("b", b"1"), file("a", b"2")],
            Box::new(|e: &SessionError| {
                matches!(e, SessionError::Manifest(ManifestError::OutOfOrder { .. }))
            }),
        ),
        (
            "symlink to an absolute path",
            vec![link("l", "/etc")],
            Box::new(|e: &SessionError| {
                matches!(
                    e,
                    SessionError::Manifest(ManifestError::SymlinkEscapes { .. })
                )
            }),
        ),
        (
            "symlink climbing out",
            vec![dir("a"), link("a/l", "../../outside")],
            Box::new(|e: &SessionError| {
                matches!(
                    e,
                    SessionError::Manifest(ManifestError::SymlinkEscapes { .. })
                )
            }),
        ),
        (
            // Each link is lexically inside; resolved together, t is DEST's parent.
            "symlink chain escape",
            vec![dir("d"), link("d/s", ".."), link("t", "d/s/..")],
            Box::new(
                |e: &SessionError| matches!(e, SessionError::Manifest(ManifestError::SymlinkEscapes { path, .. }) if path == "t"),
            ),
        ),
        (
            "write through a symlink the manifest made",
            vec![link("l", "media"), file("l/x", b"1")],
            Box::new(|e: &SessionError| {
                matches!(
                    e,
                    SessionError::Manifest(ManifestError::AncestorNotDir { .. })
                )
            }),
        ),
        (
            "file under a file",
            vec![file("f", b"1"), file("f/x", b"1")],
            Box::new(|e: &SessionError| {
                matches!(
                    e,
                    SessionError::Manifest(ManifestError::AncestorNotDir { .. })
                )
            }),
        ),
        (
            "16 EiB file with one hash",
            vec![absurd_size],
            Box::new(|e: &SessionError| {
                matches!(
                    e,
                    SessionError::Manifest(ManifestError::ChunkCount { got: 1, .. })
                )
            }),
        ),
        (
            "chunk size 2^63",
            vec![absurd_shift],
            Box::new(|e: &SessionError| {
                matches!(
                    e,
                    SessionError::Manifest(ManifestError::BadChunkSize { shift: 63, .. })
                )
            }),
        ),
        (
            "directory with a size",
            vec![sized_dir],
            Box::new(|e: &SessionError| {
                matches!(e, SessionError::Manifest(ManifestError::NonFileSize { .. }))
            }),
        ),
        (
            "more hashes than the size needs",
            vec![{
                let mut f = file("x", &big);
                f.hashes.push(ChunkHash([9; 32]));
                f
            }],
            Box::new(|e: &SessionError| {
                matches!(e, SessionError::Manifest(ManifestError::ChunkCount { .. }))
            }),
        ),
    ];
    let n = cases.len();
    for (name, entries, check) in cases {
        let (e, peak) = peak_of(|| {
            let mut v = Victim::new(&w.dest, ReceiverConfig::default());
            v.hello();
            v.send_msg(&Message::Manifest(entries));
            v.end()
        });
        assert!(check(&e), "{name}: unexpected error {e:?}");
        assert_eq!(e.close_code(), CloseCode::ManifestRejected, "{name}");
        assert!(peak < MEM_BOUND, "{name}: peak {peak} bytes");
        w.assert_nothing_written_outside_dest();
    }
    // Wrong totals: honest entries, lying summary.
    let entries = w.wire_entries();
    let mut lie = *w.manifest.summary();
    lie.bytes = 1 << 50;
    let mut v = Victim::new(&w.dest, ReceiverConfig::default());
    v.hello();
    v.send_msg(&Message::Manifest(entries.clone()));
    v.send_msg(&Message::ManifestEnd(lie));
    assert!(matches!(
        v.end(),
        SessionError::Manifest(ManifestError::SummaryMismatch)
    ));
    let mut lie = *w.manifest.summary();
    lie.root = ChunkHash([0xaa; 32]);
    let mut v = Victim::new(&w.dest, ReceiverConfig::default());
    v.hello();
    v.send_msg(&Message::Manifest(entries));
    v.send_msg(&Message::ManifestEnd(lie));
    assert!(matches!(
        v.end(),
        SessionError::Manifest(ManifestError::RootMismatch { .. })
    ));

    // None of it touched the partial state: the honest sender resumes from all of it.
    let resumed = w.finish_honestly();
    assert!(
        resumed >= have,
        "resumed {resumed} < {have} before the attacks"
    );
    eprintln!(
        "{} hostile manifests refused; resumed {resumed} bytes",
        n + 2
    );
}

#[test]
fn case_colliding_names_are_refused_on_a_case_folding_destination() {
    let w = World::new();
    let limits = ManifestLimits {
        case_insensitive: true,
        ..Default::default()
    };
    let mut v = Victim::new(
        &w.dest,
        ReceiverConfig {
            limits,
            ..Default::default()
        },
    );
    v.hello();
    // "Photo.JPG" sorts before "photo.jpg": on a folding file system the second would
    // overwrite the first.
    v.send_msg(&Message::Manifest(vec![
        file("Photo.JPG", b"1"),
        file("photo.jpg", b"2"),
    ]));
    assert!(matches!(
        v.end(),
        SessionError::Manifest(ManifestError::CaseCollision { .. })
    ));
    w.finish_honestly();
}

#[test]
fn absurd_counts_stay_within_the_limits_without_allocating_for_them() {
    let w = World::new();
    // A frame claiming 2^32 entries in a few bytes: refused by the decoder.
    let (e, peak) = peak_of(|| {
        let mut v = Victim::new(&w.dest, ReceiverConfig::default());
        v.hello();
        let mut body = vec![1u8, 0]; // message tag, Manifest variant
        body.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0x0f]);
        let mut frame = (body.len() as u32).to_le_bytes().to_vec();
        frame.extend_from_slice(&body);
        v.feed(&frame);
        v.end()
    });
    assert!(
        matches!(e, SessionError::Frame(FrameError::BadMessage(_))),
        "{e:?}"
    );
    assert!(peak < MEM_BOUND, "peak {peak}");

    // Many small entries, past the receiver's entry limit; and a file whose chunk count is
    // past the slot limit (1 TiB of one repeated hash).
    let limits = ManifestLimits {
        max_entries: 1000,
        max_slots: 20_000,
        max_total_bytes: 1 << 45,
        ..Default::default()
    };
    let cfg = ReceiverConfig {
        limits,
        ..Default::default()
    };
    let (e, peak) = peak_of(|| {
        let mut v = Victim::new(&w.dest, cfg.clone());
        v.hello();
        for batch in 0..20 {
            let entries: Vec<_> = (0..100)
                .map(|i| file(&format!("f{batch:03}{i:03}"), b"x"))
                .collect();
            v.send_msg(&Message::Manifest(entries));
            if v.failure.is_some() {
                break;
            }
        }
        v.end()
    });
    assert!(
        matches!(
            e,
            SessionError::Manifest(ManifestError::TooLarge {
                what: "entries",
                ..
            })
        ),
        "{e:?}"
    );
    assert!(peak < MEM_BOUND, "peak {peak}");
    // 2 × 64 GiB of one repeated hash: past the slot limit.
    let big_entry = |path: &str| {
        let (shift, size) = (22u8, 1u64 << 36);
        WireEntry {
            path: path.into(),
            kind: EntryKind::File { chunk_shift: shift },
            size,
            mode: 0o644,
            mtime: Mtime::default(),
            hashes: vec![ChunkHash([1; 32]); (size >> shift) as usize],
        }
    };
    let (e, peak) = peak_of(|| {
        let mut v = Victim::new(&w.dest, cfg.clone());
        v.hello();
        v.send_msg(&Message::Manifest(vec![big_entry("a.bin")]));
        v.send_msg(&Message::Manifest(vec![big_entry("b.bin")]));
        v.end()
    });
    assert!(
        matches!(
            e,
            SessionError::Manifest(ManifestError::TooLarge { what: "chunks", .. })
        ),
        "{e:?}"
    );
    assert!(peak < MEM_BOUND, "peak {peak}");

    // Within the slot limit but claiming more bytes than allowed.
    let mut small = cfg.clone();
    small.limits.max_total_bytes = 1 << 35;
    let (e, _) = peak_of(|| {
        let mut v = Victim::new(&w.dest, small);
        v.hello();
        let shift = 22u8;
        let size = 1u64 << 36;
        v.send_msg(&Message::Manifest(vec![WireEntry {
            path: "big.bin".into(),
            kind: EntryKind::File { chunk_shift: shift },
            size,
            mode: 0o644,
            mtime: Mtime::default(),
            hashes: vec![ChunkHash([1; 32]); (size >> shift) as usize],
        }]));
        v.end()
    });
    assert!(
        matches!(
            e,
            SessionError::Manifest(ManifestError::TooLarge { what: "bytes", .. })
        ),
        "{e:?}"
    );

    // A valid manifest claiming more than twice the free space (64 GiB files of one repeated
    // chunk): the store refuses it for space before allocating or writing anything that size.
    let free = {
        let st = rustix::fs::statvfs(&w.top).unwrap();
        st.f_bavail * st.f_frsize
    };
    let files = (2 * free).div_ceil(1 << 36).max(1);
    let entries: Vec<_> = (0..files)
        .map(|i| big_entry(&format!("big{i:04}.bin")))
        .collect();
    let summary = summary_of(&entries);
    let (e, peak) = peak_of(|| {
        let mut v = Victim::new(&w.dest, ReceiverConfig::default());
        v.hello();
        for e in entries {
            v.send_msg(&Message::Manifest(vec![e]));
        }
        v.send_msg(&Message::ManifestEnd(summary));
        v.end()
    });
    assert!(
        matches!(&e, SessionError::Destination(s) if matches!(**s, StoreError::InsufficientSpace { .. })
            && s.to_string().contains("not enough space")),
        "{e:?}"
    );
    // The manifest itself is 8 MiB of hashes; the receiver holds it a few times over at most.
    assert!(peak < MEM_BOUND, "peak {peak}");
    w.assert_nothing_written_outside_dest();
    w.finish_honestly();
}

/// Frame `f` of a manifest of entries with the longest paths the receiver accepts (4 KiB, in
/// names of 250 bytes), 64 to a frame (about 260 KiB on the wire), sorted.
fn long_path_frame(f: usize) -> Bytes {
    let name = |c: char| c.to_string().repeat(250);
    let stem: String = (0..15).map(|_| name('d')).collect::<Vec<_>>().join("/");
    let mut entries = Vec::new();
    if f == 0 {
        // The ancestors, as directories.
        for depth in 1..=15 {
            entries.push(dir(&stem[..depth * 251 - 1]));
        }
    }
    for i in 0..64 {
        let leaf = format!("{f:06}{i:03}{}", name('f'));
        entries.push(file(&format!("{stem}/{}", &leaf[..250]), b"x"));
    }
    encode_message(&Message::Manifest(entries)).unwrap()
}

#[test]
fn a_manifest_past_the_memory_budget_is_refused_as_it_streams() {
    let w = World::new();
    let budget: u64 = 8 << 20;
    let cfg = ReceiverConfig {
        limits: ManifestLimits {
            max_memory: budget,
            ..Default::default()
        },
        ..Default::default()
    };
    // 64 MiB of path bytes: within every count limit (16 000 entries), eight times the budget.
    let (fed, held_max, e, peak) = {
        let ((fed, held_max, e), peak) = peak_of(|| {
            let mut v = Victim::new(&w.dest, cfg);
            v.hello();
            let (mut fed, mut held_max) = (0, 0);
            for f in 0..250 {
                v.feed(&long_path_frame(f));
                fed += 1;
                held_max = held_max.max(v.r.manifest_held_bytes().unwrap_or(0));
                if v.failure.is_some() {
                    break;
                }
            }
            (fed, held_max, v.end())
        });
        (fed, held_max, e, peak)
    };
    assert!(
        matches!(e, SessionError::Manifest(ManifestError::MemoryBudget { budget: b, .. }) if b == budget),
        "{e:?}"
    );
    assert_eq!(e.close_code(), CloseCode::ManifestRejected);
    // Refused as it streamed: after about a budget's worth of paths, not at the end.
    assert!(fed < 50, "refused only after {fed} of 250 frames");
    // What the builder held never passed the budget (plus the last entry's encoding), and the
    // whole case (frames, decoder, machine) stayed near it.
    assert!(held_max <= budget + 8192, "builder held {held_max}");
    assert!(peak < budget + (2 << 20), "peak {peak}");
    eprintln!("refused after {fed} frames; builder held at most {held_max} B; peak {peak} B");
    w.assert_nothing_written_outside_dest();
    w.finish_honestly();
}

#[test]
fn a_manifest_larger_than_the_free_space_is_refused_as_it_streams() {
    let w = World::new();
    let available: u64 = 64 << 20;
    let cfg = ReceiverConfig {
        limits: ManifestLimits {
            available_space: Some(available),
            ..Default::default()
        },
        ..Default::default()
    };
    // 1 000 frames of 16 files of 1 MiB each (one repeated chunk hash): 16 000 MiB declared,
    // against 64 MiB free.
    let one_mib = |path: String| WireEntry {
        path,
        kind: EntryKind::File { chunk_shift: 17 },
        size: 1 << 20,
        mode: 0o644,
        mtime: Mtime::default(),
        hashes: vec![ChunkHash([7; 32]); 8],
    };
    let mut v = Victim::new(&w.dest, cfg);
    v.hello();
    let mut fed = 0;
    for f in 0..1000 {
        let entries = (0..16).map(|i| one_mib(format!("m{f:04}{i:02}"))).collect();
        v.send_msg(&Message::Manifest(entries));
        fed += 1;
        if v.failure.is_some() {
            break;
        }
    }
    let e = v.end();
    assert!(
        matches!(e, SessionError::Manifest(ManifestError::NoSpace { declared, available: a })
            if a == available && declared == available + (1 << 20)),
        "{e:?}"
    );
    // The close code says "destination", and the refusal came with the 65th MiB declared.
    assert_eq!(e.close_code(), CloseCode::DestinationError);
    assert_eq!(fed, 5);
    w.assert_nothing_written_outside_dest();
    w.finish_honestly();
}

// ---------------------------------------------------------------------------------------------
// Hostile sender: frames and chunks, with the honest manifest.

/// A victim that got the honest manifest and sent its wants.
fn victim_wanting(w: &World, cfg: ReceiverConfig) -> Victim {
    let mut v = Victim::new(&w.dest, cfg);
    v.hello();
    v.send_msg(&Message::Manifest(w.wire_entries()));
    v.send_msg(&Message::ManifestEnd(*w.manifest.summary()));
    assert!(v.failure.is_none(), "{:?}", v.failure);
    assert!(
        v.replies
            .iter()
            .any(|f| matches!(f, Frame::Message(Message::WantEnd { .. }))),
        "no want list"
    );
    v
}

/// The honest chunk frame for `id`, read from the source.
fn honest_chunk(w: &World, id: ChunkId) -> Vec<u8> {
    let u = *w.manifest.unique(id).unwrap();
    let loc = w.manifest.locate(u.first_slot).unwrap();
    let done = w.source.execute(SendIo::Read {
        chunk: id,
        entry: loc.entry,
        offset: loc.offset,
        len: u.len,
        hash: u.hash,
        verify: true,
        path: w.manifest.entry(loc.entry).unwrap().path.clone(),
    });
    let SendIoDone::Read {
        encoding, payload, ..
    } = done
    else {
        panic!("{done:?}")
    };
    chunk_frame(id, encoding, u.len, &payload)
}

#[test]
fn hash_mismatches_are_rejected_then_fail_the_session_and_good_chunks_stay() {
    let w = World::new();
    let mut v = victim_wanting(&w, ReceiverConfig::default());
    let wanted = v.wanted();
    assert!(wanted.len() > 4);
    // Three honest chunks, then one that lies, again and again.
    for &id in &wanted[..3] {
        v.feed(&honest_chunk(&w, id));
    }
    let bad = wanted[3];
    let len = w.manifest.unique(bad).unwrap().len;
    for attempt in 0..10 {
        let junk = rand_bytes(100 + attempt, len as usize);
        v.feed(&chunk_frame(bad, Encoding::Raw, len, &junk));
        if v.failure.is_some() {
            break;
        }
        // Rejected and wanted again.
        assert_eq!(v.rejected(), attempt as usize + 1);
        assert_eq!(v.wanted().last(), Some(&bad));
    }
    let e = v.end();
    assert!(matches!(e, SessionError::Integrity(_)), "{e:?}");
    assert_eq!(e.close_code(), CloseCode::IntegrityFailure);
    // The three good chunks were committed on the way out: the honest sender does not resend.
    let resumed = w.finish_honestly();
    let good: u64 = wanted[..3]
        .iter()
        .map(|&id| {
            let u = w.manifest.unique(id).unwrap();
            u64::from(u.len) * w.manifest.slots_of(id).count() as u64
        })
        .sum();
    assert!(resumed >= good, "resumed {resumed} < {good}");
}

#[test]
fn zstd_bomb_is_refused_without_allocating_its_output() {
    let w = World::new();
    // 256 MiB of zeros compresses to a few KiB.
    let bomb = zstd::bulk::compress(&vec![0u8; 256 << 20], 19).unwrap();
    assert!(bomb.len() < 64 << 10, "{}", bomb.len());
    let mut v = victim_wanting(&w, ReceiverConfig::default());
    let id = v.wanted()[0];
    let len = w.manifest.unique(id).unwrap().len;
    let (_, peak) = peak_of(|| {
        for _ in 0..4 {
            v.feed(&chunk_frame(id, Encoding::Zstd, len, &bomb));
        }
    });
    // Each attempt was a verification failure (the declared length bounds the output).
    let e = v.end();
    assert!(
        matches!(&e, SessionError::Integrity(m) if m.contains("decompress")),
        "{e:?}"
    );
    assert!(peak < 16 << 20, "peak {peak}");
    // A chunk frame that declares a length other than the manifest's is a protocol violation.
    let mut v = victim_wanting(&w, ReceiverConfig::default());
    let id = v.wanted()[0];
    v.feed(&chunk_frame(id, Encoding::Zstd, 256 << 20, &bomb));
    assert!(
        matches!(v.end(), SessionError::Protocol(m) if m.contains("declared")),
        "length lie"
    );
    w.finish_honestly();
}

#[test]
fn unrequested_unknown_oversized_and_truncated_chunks() {
    let w = World::new();
    // A chunk id past the manifest.
    let mut v = victim_wanting(&w, ReceiverConfig::default());
    v.feed(&chunk_frame(ChunkId(u32::MAX), Encoding::Raw, 1, b"x"));
    assert!(matches!(v.end(), SessionError::Protocol(m) if m.contains("not in the manifest")));

    // A chunk that is in the manifest but was not wanted (it arrived already).
    let mut v = victim_wanting(&w, ReceiverConfig::default());
    let id = v.wanted()[0];
    let frame = honest_chunk(&w, id);
    v.feed(&frame);
    assert!(v.failure.is_none());
    v.feed(&frame);
    assert!(matches!(v.end(), SessionError::Protocol(m) if m.contains("never requested")));

    // A chunk before the manifest.
    let mut v = Victim::new(&w.dest, ReceiverConfig::default());
    v.hello();
    v.feed(&chunk_frame(ChunkId(0), Encoding::Raw, 1, b"x"));
    assert!(matches!(v.end(), SessionError::Protocol(m) if m.contains("unexpected chunk")));

    // A payload far larger than the chunk (padding a small chunk).
    let mut v = victim_wanting(&w, ReceiverConfig::default());
    let id = *v
        .wanted()
        .iter()
        .find(|&&i| w.manifest.unique(i).unwrap().len < 10_000)
        .unwrap();
    let len = w.manifest.unique(id).unwrap().len;
    v.feed(&chunk_frame(id, Encoding::Raw, len, &vec![0u8; 1 << 20]));
    assert!(matches!(v.end(), SessionError::Protocol(m) if m.contains("oversized")));

    // A truncated payload (raw, shorter than declared): a verification failure, wanted again.
    let mut v = victim_wanting(&w, ReceiverConfig::default());
    let id = v.wanted()[0];
    let len = w.manifest.unique(id).unwrap().len;
    v.feed(&chunk_frame(
        id,
        Encoding::Raw,
        len,
        &vec![0u8; len as usize / 2],
    ));
    assert_eq!(v.rejected(), 1);
    assert!(v.failure.is_none());
    // A chunk frame cut inside its header.
    v.feed(&[5, 0, 0, 0, 2, 1, 0, 0, 0]);
    assert!(matches!(v.end(), SessionError::Frame(FrameError::BadChunk)));

    // A frame length past the maximum: refused from the 4-byte prefix, before buffering.
    let (e, peak) = peak_of(|| {
        let mut v = victim_wanting(&w, ReceiverConfig::default());
        v.feed(&((MAX_FRAME_BODY + 1) as u32).to_le_bytes());
        v.end()
    });
    assert!(matches!(e, SessionError::Frame(FrameError::TooLarge(_))));
    assert!(peak < MEM_BOUND, "peak {peak}");

    // Unknown tags, wrong hello, wrong role, hello twice, unknown close code.
    let mut v = Victim::new(&w.dest, ReceiverConfig::default());
    v.feed(&[1, 0, 0, 0, 9]);
    assert!(matches!(
        v.end(),
        SessionError::Frame(FrameError::UnknownTag(9))
    ));
    let mut v = Victim::new(&w.dest, ReceiverConfig::default());
    v.feed(&encode_hello(&Hello {
        version: PROTOCOL_VERSION,
        role: Role::Receiver,
    }));
    assert!(matches!(v.end(), SessionError::Protocol(m) if m.contains("not a sender")));
    let mut v = Victim::new(&w.dest, ReceiverConfig::default());
    let mut h = encode_hello(&Hello {
        version: PROTOCOL_VERSION,
        role: Role::Sender,
    })
    .to_vec();
    h[9] = 0xff; // version 0xff01
    v.feed(&h);
    let e = v.end();
    assert!(matches!(
        e,
        SessionError::Frame(FrameError::UnsupportedVersion { .. })
    ));
    assert_eq!(e.close_code(), CloseCode::UnsupportedVersion);
    let mut v = Victim::new(&w.dest, ReceiverConfig::default());
    v.hello();
    v.hello();
    assert!(matches!(v.end(), SessionError::Protocol(m) if m.contains("unexpected hello")));
    let mut v = victim_wanting(&w, ReceiverConfig::default());
    v.send_msg(&Message::Close {
        code: 999,
        reason: "bye".into(),
    });
    assert!(matches!(
        v.end(),
        SessionError::PeerClosed { code: None, .. }
    ));
    // Receiver-only messages from the sender.
    let mut v = victim_wanting(&w, ReceiverConfig::default());
    v.send_msg(&Message::Want(vec![range(0, 1)]));
    assert!(matches!(v.end(), SessionError::Protocol(m) if m.contains("unexpected want")));
    let mut v = victim_wanting(&w, ReceiverConfig::default());
    v.send_msg(&Message::Durable { bytes: 1 });
    assert!(matches!(v.end(), SessionError::Protocol(m) if m.contains("unexpected durable")));

    w.assert_nothing_written_outside_dest();
    w.finish_honestly();
}

#[test]
fn a_sender_that_stalls_is_timed_out_in_every_phase() {
    let w = World::new();
    let cfg = ReceiverConfig {
        stall_timeout: Duration::from_secs(30),
        ..Default::default()
    };
    let timed_out = |e: &SessionError| {
        matches!(
            e,
            SessionError::PeerClosed {
                code: Some(CloseCode::Timeout),
                ..
            }
        )
    };
    // Connected, never says hello.
    let mut v = Victim::new(&w.dest, cfg.clone());
    v.advance(Duration::from_secs(29));
    assert!(v.failure.is_none());
    v.advance(Duration::from_secs(2));
    assert!(v.close_code() == Some(CloseCode::Timeout));
    assert!(timed_out(&v.end()));
    // Hello, half a manifest, then silence.
    let mut v = Victim::new(&w.dest, cfg.clone());
    v.hello();
    v.send_msg(&Message::Manifest(w.wire_entries()[..2].to_vec()));
    v.advance(Duration::from_secs(20));
    v.send_msg(&Message::Manifest(w.wire_entries()[2..3].to_vec()));
    v.advance(Duration::from_secs(20)); // 40 s in, but frames keep coming
    assert!(v.failure.is_none());
    v.advance(Duration::from_secs(15));
    assert!(timed_out(&v.end()));
    // Manifest, some chunks, then silence: the chunks are kept.
    let mut v = victim_wanting(&w, cfg);
    let wanted = v.wanted();
    v.feed(&honest_chunk(&w, wanted[0]));
    v.advance(Duration::from_secs(31));
    assert!(v.close_code() == Some(CloseCode::Timeout));
    assert!(timed_out(&v.end()));
    let resumed = w.finish_honestly();
    assert!(resumed > 0);
}

#[test]
fn a_symlink_planted_in_dest_does_not_redirect_writes() {
    let w = World::new();
    // Someone made DEST/media a link to a directory outside before the migration.
    fs::create_dir_all(&w.dest).unwrap();
    std::os::unix::fs::symlink(w.top.join("outside"), w.dest.join("media")).unwrap();
    let before = snapshot_outside(&w.top, &w.dest);
    let store = FsStore::open(&w.dest).unwrap();
    drop(store);
    let mut v = victim_wanting(&w, ReceiverConfig::default());
    for id in v.wanted() {
        v.feed(&honest_chunk(&w, id));
        if v.failure.is_some() {
            break;
        }
    }
    let e = v.end();
    assert!(
        matches!(&e, SessionError::Destination(s) if matches!(**s, StoreError::Conflict { .. })
            && s.to_string().contains("in the way")),
        "{e:?}"
    );
    assert_eq!(snapshot_outside(&w.top, &w.dest), before);
    // Moved away, the same DEST completes, keeping what was verified.
    fs::remove_file(w.dest.join("media")).unwrap();
    let resumed = w.finish_honestly();
    assert!(resumed > 0);
}

// ---------------------------------------------------------------------------------------------
// Hostile receiver.

struct Mark {
    s: Sender,
    out: Vec<Frame>,
    reads: Vec<SendIo>,
    failure: Option<SessionError>,
}

impl Mark {
    fn new(w: &World, cfg: SenderConfig) -> Self {
        Self::with_version(w, cfg, PROTOCOL_VERSION)
    }

    /// A sender facing a receiver whose hello says `version`.
    fn with_version(w: &World, cfg: SenderConfig, version: u16) -> Self {
        let mut m = Mark {
            s: Sender::new(Arc::clone(&w.manifest), cfg),
            out: Vec::new(),
            reads: Vec::new(),
            failure: None,
        };
        m.s.handle_frame(Frame::Hello(Hello {
            version,
            role: Role::Receiver,
        }));
        m
    }

    fn msg(&mut self, m: Message) {
        let bytes = encode_message(&m).unwrap();
        let f = decode_frame(&mut BytesMut::from(&bytes[..]))
            .unwrap()
            .unwrap();
        self.s.handle_frame(f);
    }

    /// Runs reads against the source; `drain` says whether the link takes data frames.
    fn pump(&mut self, w: &World, drain: bool) {
        loop {
            let mut moved = false;
            while self.s.has_control() || (drain && self.s.has_data()) {
                let Some(t) = self.s.poll_transmit() else {
                    break;
                };
                self.out.push(to_frame(&t));
                moved = true;
            }
            while let Some(io) = self.s.poll_io() {
                self.reads.push(io.clone());
                self.s.handle_io_done(w.source.execute(io));
                moved = true;
            }
            while let Some(ev) = self.s.poll_event() {
                if let SendEvent::Failed(e) = ev {
                    self.failure.get_or_insert(e);
                }
                moved = true;
            }
            if !moved {
                break;
            }
        }
    }

    fn protocol_error(mut self, w: &World) -> String {
        self.pump(w, true);
        assert!(self.s.is_closed());
        let close = self.out.iter().find_map(|f| match f {
            Frame::Message(Message::Close { code, .. }) => CloseCode::from_u16(*code),
            _ => None,
        });
        assert_eq!(close, Some(CloseCode::ProtocolViolation));
        match self.failure {
            Some(SessionError::Protocol(m)) => m,
            other => panic!("expected a protocol error, got {other:?}"),
        }
    }
}

#[test]
fn hostile_wants_are_refused_specifically() {
    let w = World::new();
    let n = w.manifest.unique_chunks().len() as u32;
    for (name, ranges, needle) in [
        ("past the end", vec![range(n, n + 1)], "outside"),
        (
            "everything a u32 can name",
            vec![range(0, u32::MAX)],
            "outside",
        ),
        ("empty range", vec![range(1, 1)], "outside"),
        ("reversed range", vec![range(3, 1)], "outside"),
    ] {
        let mut m = Mark::new(&w, SenderConfig::default());
        m.msg(Message::Want(ranges));
        let e = m.protocol_error(&w);
        assert!(e.contains(needle), "{name}: {e}");
    }
    let mut m = Mark::new(&w, SenderConfig::default());
    m.msg(Message::Rejected { chunk: ChunkId(n) });
    assert!(m.protocol_error(&w).contains("unknown chunk"));
    let mut m = Mark::new(&w, SenderConfig::default());
    m.msg(Message::Done {
        root: ChunkHash([0; 32]),
    });
    assert!(m.protocol_error(&w).contains("expected"));
    // A chunk frame from the receiver.
    let mut m = Mark::new(&w, SenderConfig::default());
    m.s.handle_frame(Frame::Chunk {
        id: ChunkId(0),
        encoding: Encoding::Raw,
        raw_len: 1,
        payload: Bytes::from_static(b"x"),
    });
    assert!(m.protocol_error(&w).contains("unexpected frame chunk"));
}

/// A receiver's durable report is a claim: more than the round holds is clamped to it, a
/// smaller figure than before is ignored, and neither breaks the session. A receiver whose
/// hello said version 2 cannot send one.
#[test]
fn hostile_durable_reports_are_clamped_and_never_go_back() {
    let w = World::new();
    let total = w.manifest.summary().bytes;
    let durable = |m: &mut Mark| -> Vec<u64> {
        std::iter::from_fn(|| m.s.poll_event())
            .filter_map(|e| match e {
                SendEvent::Durable { bytes } => Some(bytes),
                SendEvent::Failed(e) => panic!("{e}"),
                _ => None,
            })
            .collect()
    };
    let mut m = Mark::new(&w, SenderConfig::default());
    m.msg(Message::WantEnd {
        chunks: 0,
        bytes: 0,
    });
    m.msg(Message::Durable { bytes: 10 });
    m.msg(Message::Durable { bytes: 5 });
    m.msg(Message::Durable { bytes: 10 });
    m.msg(Message::Durable { bytes: u64::MAX });
    m.msg(Message::Durable { bytes: 0 });
    assert_eq!(durable(&mut m), vec![10, total]);
    assert_eq!(m.s.durable_bytes(), total);
    assert!(!m.s.is_closed());
    // The round still ends normally.
    m.msg(Message::Done {
        root: w.manifest.root(),
    });
    assert!(m.s.is_awaiting_verdict());
    for version in [1, 2] {
        let mut m = Mark::with_version(&w, SenderConfig::default(), version);
        m.msg(Message::Durable { bytes: 1 });
        let e = m.protocol_error(&w);
        assert!(e.contains("durable report from a version-"), "{e}");
    }
}

#[test]
fn the_same_chunk_wanted_forever_is_cut_off() {
    let w = World::new();
    let cfg = SenderConfig {
        max_rerequests: 100,
        ..Default::default()
    };
    let n = w.manifest.unique_chunks().len() as u64;
    let mut m = Mark::new(&w, cfg);
    let mut sent = 0u64;
    let (_, peak) = peak_of(|| {
        for _ in 0..10_000 {
            m.msg(Message::Want(vec![range(0, 1)]));
            m.pump(&w, true);
            sent += 1;
            if m.s.is_closed() {
                break;
            }
        }
    });
    assert!(sent <= n + 101, "{sent}");
    assert!(peak < MEM_BOUND, "peak {peak}");
    let e = m.protocol_error(&w);
    assert!(e.contains("asked for"), "{e}");
    // Rejected (re-verify) forever is bounded the same way.
    let mut m = Mark::new(
        &w,
        SenderConfig {
            max_rerequests: 100,
            ..Default::default()
        },
    );
    for _ in 0..200 {
        m.msg(Message::Rejected { chunk: ChunkId(0) });
        m.msg(Message::Want(vec![range(0, 1)]));
        m.pump(&w, true);
        if m.s.is_closed() {
            break;
        }
    }
    assert!(m.protocol_error(&w).contains("asked for"));
}

#[test]
fn a_receiver_that_never_reads_holds_at_most_the_read_ahead() {
    let w = World::new();
    let cfg = SenderConfig {
        read_ahead_bytes: 256 << 10,
        max_reads: 4,
        ..Default::default()
    };
    let mut m = Mark::new(&w, cfg.clone());
    let n = w.manifest.unique_chunks().len() as u32;
    m.msg(Message::Want(vec![range(0, n)]));
    m.msg(Message::WantEnd {
        chunks: u64::from(n),
        bytes: 0,
    });
    // The link takes control frames only: data frames pile up in the sender, up to its read-ahead.
    let (_, peak) = peak_of(|| {
        for _ in 0..100 {
            m.pump(&w, false);
        }
    });
    let read: u64 = m
        .reads
        .iter()
        .map(|SendIo::Read { len, .. }| u64::from(*len))
        .sum();
    let max_chunk = w
        .manifest
        .unique_chunks()
        .iter()
        .map(|u| u64::from(u.len))
        .max()
        .unwrap();
    assert!(read >= 1, "nothing read");
    assert!(
        read < cfg.read_ahead_bytes + max_chunk,
        "read {read} bytes for a receiver that reads nothing"
    );
    assert!(
        peak < 4 * (cfg.read_ahead_bytes + max_chunk) + (4 << 20),
        "peak {peak}"
    );
    assert!(!m.s.is_closed());
    // Once it reads, the rest follows.
    m.pump(&w, true);
    let got = m
        .out
        .iter()
        .filter(|f| matches!(f, Frame::Chunk { .. }))
        .count();
    assert_eq!(got, n as usize);
}

#[test]
fn symlinks_swapped_into_the_source_after_the_scan_are_not_followed() {
    let w = World::new();
    let video = w.src.join("media/ab/video.mp4");
    let id_of = |path: &str| {
        let i = w.manifest.find(path).unwrap();
        let slot = w.manifest.entries()[i].first_slot;
        w.manifest.slot_chunk(slot).unwrap()
    };
    let wanted = id_of("media/ab/video.mp4");
    // A parent directory replaced by a link to a look-alike outside the shared directory (same
    // content, so no hash check would notice the read went elsewhere).
    let elsewhere = w.top.join("elsewhere/ab");
    fs::create_dir_all(&elsewhere).unwrap();
    fs::copy(&video, elsewhere.join("video.mp4")).unwrap();
    fs::rename(w.src.join("media/ab"), w.top.join("moved-ab")).unwrap();
    std::os::unix::fs::symlink(&elsewhere, w.src.join("media/ab")).unwrap();
    let mut m = Mark::new(&w, SenderConfig::default());
    m.msg(Message::Want(vec![range(wanted.0, wanted.0 + 1)]));
    m.pump(&w, true);
    assert!(
        !m.out.iter().any(|f| matches!(f, Frame::Chunk { .. })),
        "served a chunk read through a symlinked directory"
    );
    match &m.failure {
        Some(SessionError::Source(msg)) => assert!(msg.contains("media/ab/video.mp4"), "{msg}"),
        other => panic!("expected a source error, got {other:?}"),
    }
    // The same at the leaf.
    fs::remove_file(w.src.join("media/ab")).unwrap();
    fs::rename(w.top.join("moved-ab"), w.src.join("media/ab")).unwrap();
    fs::remove_file(&video).unwrap();
    std::os::unix::fs::symlink(elsewhere.join("video.mp4"), &video).unwrap();
    let mut m = Mark::new(&w, SenderConfig::default());
    m.msg(Message::Want(vec![range(wanted.0, wanted.0 + 1)]));
    m.pump(&w, true);
    assert!(matches!(&m.failure, Some(SessionError::Source(_))));
    assert!(!m.out.iter().any(|f| matches!(f, Frame::Chunk { .. })));
    // A FIFO in place of the file is refused at once instead of blocking the read.
    fs::remove_file(&video).unwrap();
    rustix_mkfifo(&video);
    let mut m = Mark::new(&w, SenderConfig::default());
    m.msg(Message::Want(vec![range(wanted.0, wanted.0 + 1)]));
    m.pump(&w, true);
    match &m.failure {
        Some(SessionError::Source(msg)) => assert!(msg.contains("regular file"), "{msg}"),
        other => panic!("expected a source error, got {other:?}"),
    }
}

fn rustix_mkfifo(p: &Path) {
    let st = std::process::Command::new("mkfifo")
        .arg(p)
        .status()
        .unwrap();
    assert!(st.success());
}

#[test]
fn hostile_modes_are_tamed_setuid_dropped_owner_keeps_access() {
    use std::os::unix::fs::PermissionsExt;
    let w = World::new();
    let mut entries = w.wire_entries();
    for e in &mut entries {
        e.mode = match (&e.kind, e.path.as_str()) {
            (EntryKind::Dir, "media") => 0o000,
            (EntryKind::Dir, _) => 0o1777,
            (EntryKind::File { .. }, "db/msg.db") => 0o4755,
            (EntryKind::File { .. }, "empty.txt") => 0o2000,
            (EntryKind::File { .. }, _) => 0o000,
            _ => e.mode,
        };
    }
    let summary = summary_of(&entries);
    let mut v = Victim::new(&w.dest, ReceiverConfig::default());
    v.hello();
    v.send_msg(&Message::Manifest(entries));
    v.send_msg(&Message::ManifestEnd(summary));
    for id in v.wanted() {
        v.feed(&honest_chunk(&w, id));
    }
    assert!(v.r.is_done(), "{:?}", v.failure);
    drop(v);
    let mut checked = 0;
    for e in w.manifest.entries() {
        let md = fs::symlink_metadata(w.dest.join(&e.path)).unwrap();
        if md.file_type().is_symlink() {
            continue;
        }
        let mode = md.permissions().mode() & 0o7777;
        assert_eq!(mode & 0o7000, 0, "{}: special bits kept ({mode:o})", e.path);
        let need = if md.is_dir() { 0o700 } else { 0o400 };
        assert_eq!(
            mode & need,
            need,
            "{}: owner lost access ({mode:o})",
            e.path
        );
        checked += 1;
    }
    assert!(checked > 5);
    assert_eq!(
        fs::metadata(w.dest.join("db/msg.db"))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777,
        0o755
    );
    w.assert_nothing_written_outside_dest();
    // The honest sender migrates again into the same DEST (its modes, its root).
    w.finish_honestly();
}
