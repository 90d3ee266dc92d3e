//! Fuzz harnesses, shared by the cargo-fuzz targets in `fuzz/` (nightly, libFuzzer) and the
//! proptest runs in `tests/fuzz_harness.rs` (stable, in CI). Each takes arbitrary bytes, must
//! never panic on them, and asserts the invariants that hostile input must not break. Not part of
//! the API.
//!
//! - [`frames`]: the frame decoder; whatever decodes re-encodes to the same frame.
//! - [`manifest`]: postcard `(Vec<WireEntry>, ManifestSummary)` into the validating builder; an
//!   accepted manifest has only safe paths and a consistent slot table.
//! - [`receiver`]: a byte stream from a "sender" into the receiver machine, with an in-memory
//!   store that verifies chunks for real; afterwards the machine settles (no stuck I/O).
//! - [`sender`]: a byte stream from a "receiver" into the sender machine over a fixed manifest;
//!   read-ahead and re-requests stay within their limits; the receiver's durable reports as
//!   the sender surfaces them only grow and never pass the round's bytes.
//!
//! [`seed_corpus`] produces the byte streams of an honest session, the starting points.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use crate::compress::{decode_verified, encode_chunk, CompressPolicy};
use crate::manifest::{
    chunk_shift_for, ChunkHash, ChunkId, EntryKind, ManifestBuilder, ManifestLimits,
    ManifestSummary, Mtime, WireEntry,
};
use crate::path::{check_relative_path, symlink_stays_inside};
use crate::proto::frame::{decode_frame, encode_frame, Frame};
use crate::proto::{
    Receiver, ReceiverConfig, RecvEvent, RecvIo, RecvIoDone, SendEvent, SendIo, SendIoDone, Sender,
    SenderConfig, Transmit,
};
use crate::Manifest;

/// Decodes every frame in `data`; each decoded frame must survive encode → decode unchanged.
pub fn frames(data: &[u8]) {
    let mut buf = BytesMut::from(data);
    while let Ok(Some(f)) = decode_frame(&mut buf) {
        if let Ok(bytes) = encode_frame(&f) {
            let mut again = BytesMut::from(&bytes[..]);
            let g = decode_frame(&mut again);
            assert_eq!(g, Ok(Some(f)), "re-encoded frame decodes differently");
            assert!(again.is_empty());
        }
    }
}

fn small_limits() -> ManifestLimits {
    ManifestLimits {
        max_entries: 10_000,
        max_slots: 100_000,
        max_total_bytes: 1 << 40,
        max_memory: 64 << 20,
        available_space: None,
        case_insensitive: false,
        normalization_insensitive: false,
    }
}

/// Wire entries and a summary into the validating builder.
pub fn manifest(data: &[u8]) {
    let Ok((entries, summary)) = postcard::from_bytes::<(Vec<WireEntry>, ManifestSummary)>(data)
    else {
        return;
    };
    for case_insensitive in [false, true] {
        let mut b = ManifestBuilder::new(ManifestLimits {
            case_insensitive,
            normalization_insensitive: case_insensitive,
            ..small_limits()
        });
        let mut accepted = Vec::new();
        for e in &entries {
            if b.push(e.clone()).is_err() {
                break;
            }
            accepted.push(e.clone());
        }
        let m = b.finish_unchecked();
        check_manifest(&m, &accepted);
        if accepted.len() == entries.len() && *m.summary() == summary {
            // What the receiver accepts, the sender side rebuilds with the same root.
            let again = Manifest::from_wire_entries(accepted.clone());
            assert!(again.is_ok_and(|a| a.root() == m.root()));
        }
    }
}

fn check_manifest(m: &Manifest, accepted: &[WireEntry]) {
    assert_eq!(m.entries().len(), accepted.len());
    let mut prev: Option<&str> = None;
    for (i, e) in m.entries().iter().enumerate() {
        assert!(check_relative_path(&e.path).is_ok(), "{:?}", e.path);
        if let EntryKind::Symlink { target } = &e.kind {
            assert!(symlink_stays_inside(&e.path, target));
        }
        if let Some(p) = prev {
            assert!(p.as_bytes() < e.path.as_bytes());
        }
        prev = Some(&e.path);
        assert_eq!(m.wire_entry(i).as_ref(), Some(&accepted[i]));
        let mut covered = 0u64;
        for s in e.slots() {
            let loc = m.locate(s);
            assert!(
                loc.is_some_and(|l| l.entry.index() == i && l.offset + u64::from(l.len) <= e.size)
            );
            covered += loc.map_or(0, |l| u64::from(l.len));
        }
        if e.is_file() {
            assert_eq!(covered, e.size);
        }
    }
    for (id, u) in m.unique_chunks().iter().enumerate() {
        let mut n = 0;
        for s in m.slots_of(ChunkId(id as u32)) {
            assert_eq!(m.slot_chunk(s), Some(ChunkId(id as u32)));
            n += 1;
            assert!(n <= m.slot_count());
        }
        assert!(n >= 1);
        assert_eq!(m.slot_hash(u.first_slot), Some(u.hash));
    }
}

/// An in-memory receiver store that verifies chunks for real and keeps nothing else.
struct MemStore;

impl MemStore {
    fn execute(&self, m: Option<&Arc<Manifest>>, io: RecvIo) -> RecvIoDone {
        match io {
            RecvIo::Prepare { .. } => RecvIoDone::Prepared { durable: vec![] },
            RecvIo::Store {
                chunk,
                encoding,
                payload,
                slots,
            } => {
                let Some(u) = m.and_then(|m| m.unique(chunk)) else {
                    // As the real store answers a chunk outside its manifest.
                    return RecvIoDone::Failed {
                        error: Arc::new(crate::store::StoreError::NotPrepared),
                    };
                };
                match decode_verified(encoding, payload, u.len, &u.hash) {
                    Ok(_) => RecvIoDone::Stored { chunk, slots },
                    Err(e) => RecvIoDone::Corrupt {
                        chunk,
                        error: e.to_string(),
                    },
                }
            }
            RecvIo::Copy { chunk, to, .. } => RecvIoDone::Stored { chunk, slots: to },
            RecvIo::Commit { slots } => RecvIoDone::Committed { slots },
            RecvIo::Finalize => RecvIoDone::Finalized,
        }
    }
}

fn drive_receiver(r: &mut Receiver, out: &mut Vec<Transmit>) {
    for _ in 0..100_000 {
        let mut moved = false;
        while let Some(t) = r.poll_transmit() {
            out.push(t);
            moved = true;
        }
        while let Some(io) = r.poll_io() {
            let m = r.manifest().cloned();
            let done = MemStore.execute(m.as_ref(), io);
            r.handle_io_done(done);
            moved = true;
        }
        while let Some(ev) = r.poll_event() {
            if let RecvEvent::Done(s) = ev {
                assert!(r.manifest().is_some_and(|m| *m.summary() == s));
            }
            moved = true;
        }
        if !moved {
            return;
        }
    }
    panic!("the receiver never settles");
}

fn fuzz_receiver_config() -> ReceiverConfig {
    ReceiverConfig {
        limits: small_limits(),
        commit_bytes: 256 << 10,
        max_pending_bytes: 1 << 20,
        max_rejects_per_chunk: 2,
        stall_timeout: Duration::from_secs(10),
        ..Default::default()
    }
}

/// A sender's byte stream into the receiver machine: manifest first, and streaming (a fresh
/// store facing a version-4 sender asks for chunks while the manifest comes in).
pub fn receiver(data: &[u8]) {
    for stream in [false, true] {
        receiver_with(
            data,
            ReceiverConfig {
                stream,
                ..fuzz_receiver_config()
            },
        );
    }
}

fn receiver_with(data: &[u8], cfg: ReceiverConfig) {
    let mut r = Receiver::new(cfg);
    let mut clock = Instant::now();
    r.handle_timeout(clock);
    let mut out = Vec::new();
    let mut buf = BytesMut::from(data);
    drive_receiver(&mut r, &mut out);
    loop {
        match decode_frame(&mut buf) {
            Ok(Some(f)) => r.handle_frame(f),
            Ok(None) => break,
            Err(e) => {
                r.handle_frame_error(e);
                break;
            }
        }
        drive_receiver(&mut r, &mut out);
        clock += Duration::from_millis(300);
        r.handle_timeout(clock);
        drive_receiver(&mut r, &mut out);
    }
    // Whatever happened, losing the link lets the machine settle with nothing outstanding.
    r.handle_link_lost();
    drive_receiver(&mut r, &mut out);
    assert!(r.is_idle(), "receiver not idle after the link was lost");
    // Everything it sent is a well-formed frame.
    for t in out {
        let mut b = BytesMut::from(&t.head[..]);
        b.extend_from_slice(&t.body);
        assert!(matches!(decode_frame(&mut b), Ok(Some(_))));
    }
}

/// The fixed history the sender harness serves: a few files, duplicates, a multi-chunk file.
fn sender_history() -> Vec<(String, Vec<u8>)> {
    let mut files = vec![
        ("a.txt".to_string(), b"hello hello hello".repeat(100)),
        ("b/photo.jpg".to_string(), pseudo_random(1, 3_000)),
        ("b/copy.jpg".to_string(), pseudo_random(1, 3_000)),
        ("c.db".to_string(), b"page ".repeat(28_000)),
        ("empty".to_string(), Vec::new()),
    ];
    files.sort();
    files
}

fn pseudo_random(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn wire_file(path: &str, data: &[u8]) -> WireEntry {
    let shift = chunk_shift_for(data.len() as u64);
    WireEntry {
        path: path.into(),
        kind: EntryKind::File { chunk_shift: shift },
        size: data.len() as u64,
        mode: 0o644,
        mtime: Mtime::default(),
        hashes: data.chunks(1 << shift).map(ChunkHash::of).collect(),
    }
}

fn history_manifest(files: &[(String, Vec<u8>)]) -> Option<Manifest> {
    let mut entries: Vec<WireEntry> = files.iter().map(|(p, d)| wire_file(p, d)).collect();
    entries.push(WireEntry {
        path: "b".into(),
        kind: EntryKind::Dir,
        size: 0,
        mode: 0o755,
        mtime: Mtime::default(),
        hashes: vec![],
    });
    Manifest::from_wire_entries(entries).ok()
}

/// Reads a chunk of the in-memory history, as `Source::execute` does from disk.
fn read_chunk(
    m: &Manifest,
    files: &[(String, Vec<u8>)],
    io: SendIo,
    policy: &CompressPolicy,
) -> SendIoDone {
    let SendIo::Read {
        chunk,
        entry,
        offset,
        len,
        ..
    } = io;
    let data = m
        .entry(entry)
        .and_then(|e| files.iter().find(|(p, _)| *p == e.path))
        .and_then(|(_, d)| d.get(offset as usize..offset as usize + len as usize));
    match data {
        Some(d) => {
            let (encoding, payload) = encode_chunk(Bytes::copy_from_slice(d), policy);
            SendIoDone::Read {
                chunk,
                encoding,
                payload,
            }
        }
        None => SendIoDone::Failed {
            chunk,
            error: "outside the history".into(),
        },
    }
}

/// A receiver's byte stream into the sender machine.
pub fn sender(data: &[u8]) {
    let files = sender_history();
    let Some(m) = history_manifest(&files) else {
        panic!("the harness history is invalid");
    };
    let m = Arc::new(m);
    let cfg = SenderConfig {
        read_ahead_bytes: 256 << 10,
        max_reads: 4,
        max_rerequests: 50,
    };
    let max_chunk = m
        .unique_chunks()
        .iter()
        .map(|u| u64::from(u.len))
        .max()
        .unwrap_or(0);
    let n = m.unique_chunks().len() as u64;
    for streaming in [false, true] {
        let mut s = if streaming {
            // Half the entries now, the rest (and the end) after the receiver's first frames.
            let mut s = Sender::streaming(cfg.clone());
            let half = m.entries().len() / 2;
            let first = (0..half).filter_map(|i| m.wire_entry(i)).collect();
            assert!(s.push_entries(first).is_ok());
            s
        } else {
            Sender::new(Arc::clone(&m), cfg.clone())
        };
        sender_session(&mut s, data, &m, &files, &cfg, (max_chunk, n));
    }
}

/// Feeds `data` (a receiver's frames) to `s`; a streaming sender gets the rest of `m` after the
/// third frame.
fn sender_session(
    s: &mut Sender,
    data: &[u8],
    m: &Arc<Manifest>,
    files: &[(String, Vec<u8>)],
    cfg: &SenderConfig,
    (max_chunk, n): (u64, u64),
) {
    let mut buf = BytesMut::from(data);
    // What the sender does with the bytes is not under test here; compressing them is slow.
    let no_compression = CompressPolicy {
        enabled: false,
        ..CompressPolicy::default()
    };
    // Reads answered later, so that read-ahead can pile up.
    let mut pending: VecDeque<SendIo> = VecDeque::new();
    let mut held: u64 = 0; // chunk bytes read and not yet sent
    let mut chunks_out = 0u64;
    let mut step = 0u32;
    let mut durable = 0u64;
    loop {
        match decode_frame(&mut buf) {
            Ok(Some(f)) => s.handle_frame(f),
            Ok(None) => break,
            Err(e) => {
                s.handle_frame_error(e);
                break;
            }
        }
        step += 1;
        if step == 3 && !s.manifest_complete() {
            let pushed = s.manifest_prefix().entries().len();
            let rest = (pushed..m.entries().len())
                .filter_map(|i| m.wire_entry(i))
                .collect();
            assert!(s.push_entries(rest).is_ok());
            s.end_manifest();
        }
        // Alternate between a receiver that reads and one that does not.
        let drain = !step.is_multiple_of(3);
        for _ in 0..10_000 {
            let mut moved = false;
            while s.has_control() || (drain && s.has_data()) {
                let Some(t) = s.poll_transmit() else { break };
                if t.lane == crate::proto::Lane::Data {
                    chunks_out += 1;
                    let mut b = BytesMut::from(&t.head[..]);
                    b.extend_from_slice(&t.body);
                    if let Ok(Some(Frame::Chunk { raw_len, .. })) = decode_frame(&mut b) {
                        held = held.saturating_sub(u64::from(raw_len));
                    }
                }
                moved = true;
            }
            while let Some(io) = s.poll_io() {
                let SendIo::Read { len, .. } = &io;
                held += u64::from(*len);
                pending.push_back(io);
                moved = true;
            }
            assert!(
                held <= cfg.read_ahead_bytes + max_chunk,
                "sender holds {held} bytes of chunks"
            );
            if let Some(io) = pending.pop_front() {
                s.handle_io_done(read_chunk(m, files, io, &no_compression));
                moved = true;
            }
            while let Some(ev) = s.poll_event() {
                match ev {
                    SendEvent::Done { root } => assert_eq!(root, m.root()),
                    // The receiver's claims never go backwards or past the round's bytes.
                    SendEvent::Durable { bytes } => {
                        assert!(bytes > durable && bytes <= m.summary().bytes, "{bytes}");
                        assert_eq!(s.durable_bytes(), bytes);
                        durable = bytes;
                    }
                    _ => {}
                }
                moved = true;
            }
            if !moved {
                break;
            }
        }
        assert!(
            chunks_out <= n + cfg.max_rerequests,
            "{chunks_out} chunks sent"
        );
    }
}

/// The byte streams of an honest session over the harness history: `(target, bytes)` for the
/// `frames`, `receiver`, `sender` and `manifest` targets.
pub fn seed_corpus() -> Vec<(&'static str, Vec<u8>)> {
    let files = sender_history();
    let Some(m) = history_manifest(&files) else {
        return vec![];
    };
    let m = Arc::new(m);
    let mut s = Sender::new(Arc::clone(&m), SenderConfig::default());
    let mut r = Receiver::new(fuzz_receiver_config());
    r.handle_timeout(Instant::now());
    let (mut s2r, mut r2s) = (Vec::new(), Vec::new());
    let mut to_r: VecDeque<Frame> = VecDeque::new();
    let mut to_s: VecDeque<Frame> = VecDeque::new();
    let decode = |t: &Transmit, wire: &mut Vec<u8>| -> Option<Frame> {
        wire.extend_from_slice(&t.head);
        wire.extend_from_slice(&t.body);
        let mut b = BytesMut::from(&t.head[..]);
        b.extend_from_slice(&t.body);
        decode_frame(&mut b).ok().flatten()
    };
    for _ in 0..10_000 {
        while let Some(t) = s.poll_transmit() {
            to_r.extend(decode(&t, &mut s2r));
        }
        while let Some(io) = s.poll_io() {
            s.handle_io_done(read_chunk(&m, &files, io, &CompressPolicy::default()));
        }
        while s.poll_event().is_some() {}
        let mut out = Vec::new();
        drive_receiver(&mut r, &mut out);
        for t in &out {
            to_s.extend(decode(t, &mut r2s));
        }
        if r.is_done() && to_s.is_empty() && to_r.is_empty() {
            break;
        }
        if let Some(f) = to_s.pop_front() {
            s.handle_frame(f);
        }
        if let Some(f) = to_r.pop_front() {
            r.handle_frame(f);
        }
    }
    let entries: Vec<WireEntry> = (0..m.entries().len())
        .filter_map(|i| m.wire_entry(i))
        .collect();
    let manifest_seed = postcard::to_allocvec(&(entries, *m.summary())).unwrap_or_default();
    // The manifest part of the stream alone (hello + manifest frames), a shorter receiver seed.
    let mut head = BytesMut::from(&s2r[..]);
    let mut head_len = 0;
    while let Ok(Some(f)) = decode_frame(&mut head) {
        if matches!(f, Frame::Chunk { .. }) {
            break;
        }
        head_len = s2r.len() - head.len();
    }
    vec![
        ("frames", s2r.clone()),
        ("frames", r2s.clone()),
        ("receiver", s2r[..head_len].to_vec()),
        ("receiver", s2r),
        ("sender", r2s),
        ("manifest", manifest_seed),
    ]
}
