//! Live files: consistent SQLite snapshots and change detection for raw files.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_sync::manifest::ChunkHash;
use ferry_sync::scan::{scan, Capture, HashCache, ReadHook, ScanConfig, ScanOutput};
use ferry_sync::snapshot::SnapshotStore;
use ferry_testkit::{generate, integrity_check, HistorySpec, LiveConfig, LiveWriter};
use rusqlite::Connection;

fn cfg_with_snapshots(state: &Path, root: &Path) -> ScanConfig {
    ScanConfig {
        snapshot_dir: Some(SnapshotStore::dir_for(state, root)),
        ..ScanConfig::default()
    }
}

/// A WAL-mode database that never checkpoints: after `rows` inserts every row is only in the
/// `-wal`. The connection is returned open (closing it would checkpoint).
fn wal_only_db(path: &Path, rows: u32) -> Connection {
    let c = Connection::open(path).unwrap();
    let mode: String = c
        .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    c.execute_batch(
        "PRAGMA wal_autocheckpoint=0;
         CREATE TABLE messages(id INTEGER PRIMARY KEY, body TEXT NOT NULL);
         CREATE INDEX messages_body ON messages(body);",
    )
    .unwrap();
    for i in 0..rows {
        c.execute(
            "INSERT INTO messages(body) VALUES (?1)",
            [format!(
                "message {i} 你好 {}",
                "x".repeat((i % 300) as usize)
            )],
        )
        .unwrap();
    }
    c
}

fn entry_hashes(out: &ScanOutput, path: &str) -> Vec<ChunkHash> {
    let m = &out.manifest;
    m.wire_entry(m.find(path).expect("entry present"))
        .unwrap()
        .hashes
}

/// The snapshot's bytes, as the receiver would write them, into a folder of their own.
fn deliver(out: &ScanOutput, path: &str, to: &Path) -> PathBuf {
    let snap = &out.sources[path];
    let data = fs::read(snap).unwrap();
    let e = &out.manifest.entries()[out.manifest.find(path).unwrap()];
    assert_eq!(
        data.len() as u64,
        e.size,
        "the manifest describes the snapshot"
    );
    let hashes: Vec<ChunkHash> = data
        .chunks(e.chunk_size() as usize)
        .map(ChunkHash::of)
        .collect();
    assert_eq!(hashes, entry_hashes(out, path), "hashes are the snapshot's");
    fs::create_dir_all(to).unwrap();
    let dst = to.join("received.db");
    fs::write(&dst, data).unwrap();
    dst
}

/// The journal mode a fresh connection to the database at `db` reports.
fn journal_mode(db: &Path) -> String {
    let c = Connection::open(db).unwrap();
    c.query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap()
}

/// The names in `dir`, sorted.
fn names_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

fn count(db: &Path) -> i64 {
    let c = Connection::open(db).unwrap();
    c.query_row("SELECT count(*) FROM messages", [], |r| r.get(0))
        .unwrap()
}

#[test]
fn wal_only_rows_are_captured_in_a_self_contained_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("src");
    fs::create_dir_all(root.join("db")).unwrap();
    let db = root.join("db/msg.db");
    let writer = wal_only_db(&db, 2000);
    // Only the schema reached the main file: the rows are in the -wal.
    let wal_len = fs::metadata(root.join("db/msg.db-wal")).unwrap().len();
    assert!(wal_len > 100_000, "-wal holds the rows ({wal_len} bytes)");
    fs::write(root.join("note.txt"), b"plain file").unwrap();

    let state = dir.path().join("state");
    let cfg = cfg_with_snapshots(&state, &root);
    let mut cache = HashCache::default();
    let out = scan(&root, Some(&mut cache), &cfg).unwrap();
    let paths: Vec<&str> = out
        .manifest
        .entries()
        .iter()
        .map(|e| e.path.as_str())
        .collect();
    assert_eq!(
        paths,
        ["db", "db/msg.db", "note.txt"],
        "no -wal/-shm entries"
    );
    assert_eq!(
        out.databases[0].capture,
        Capture::Snapshot { reused: false }
    );
    assert!(out.unstable.is_empty());

    // Delivered alone (no -wal), the snapshot is whole, still in WAL mode, with every row.
    let got = deliver(&out, "db/msg.db", &dir.path().join("new"));
    let head = fs::read(&got).unwrap();
    assert_eq!((head[18], head[19]), (2, 2), "WAL mode in the header");
    assert_eq!(journal_mode(&got), "wal");
    integrity_check(&got).unwrap();
    assert_eq!(count(&got), 2000);
    assert!(!dir.path().join("new/received.db-wal").exists());

    // Unchanged: the snapshot and its hashes are reused, nothing is read again.
    let again = scan(&root, Some(&mut cache), &cfg).unwrap();
    assert_eq!(
        again.databases[0].capture,
        Capture::Snapshot { reused: true }
    );
    assert_eq!(again.hashed_bytes, 0);
    assert_eq!(again.manifest.root(), out.manifest.root());

    // One more commit (still only in the -wal): a new snapshot with it.
    writer
        .execute("INSERT INTO messages(body) VALUES ('late')", [])
        .unwrap();
    let third = scan(&root, Some(&mut cache), &cfg).unwrap();
    assert_eq!(
        third.databases[0].capture,
        Capture::Snapshot { reused: false }
    );
    assert_ne!(third.manifest.root(), out.manifest.root());
    let got = deliver(&third, "db/msg.db", &dir.path().join("newer"));
    integrity_check(&got).unwrap();
    assert_eq!(count(&got), 2001);

    // Gone from the folder: its snapshot is removed at the next scan.
    drop(writer);
    let snap_dir = SnapshotStore::dir_for(&state, &root);
    let snap_file = third.sources["db/msg.db"].clone();
    assert!(snap_file.starts_with(&snap_dir));
    fs::remove_dir_all(root.join("db")).unwrap();
    scan(&root, Some(&mut cache), &cfg).unwrap();
    assert!(!snap_file.exists(), "stale snapshot removed");
}

#[test]
fn unreadable_database_falls_back_to_raw_and_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("src");
    fs::create_dir_all(&root).unwrap();
    // The header, then garbage (as a database damaged or encrypted past its header).
    let mut data = b"SQLite format 3\0".to_vec();
    data.extend((0..8192u32).map(|i| (i * 7 + 3) as u8));
    fs::write(root.join("secret.db"), &data).unwrap();
    fs::write(root.join("secret.db-wal"), b"companion bytes").unwrap();
    let cfg = cfg_with_snapshots(&dir.path().join("state"), &root);
    let out = scan(&root, None, &cfg).unwrap();
    assert_eq!(out.databases.len(), 1);
    assert!(
        matches!(&out.databases[0].capture, Capture::Raw { reason } if !reason.is_empty()),
        "{:?}",
        out.databases
    );
    // Sent as is, companions too; read from the folder itself.
    assert!(out.sources.is_empty());
    assert!(out.manifest.find("secret.db-wal").is_some());
    let e = &out.manifest.entries()[out.manifest.find("secret.db").unwrap()];
    assert_eq!(e.size, data.len() as u64);
    assert_eq!(entry_hashes(&out, "secret.db"), vec![ChunkHash::of(&data)]);
}

#[test]
fn snapshot_during_live_writes_holds_every_earlier_commit() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("history");
    generate(
        &root,
        &HistorySpec {
            seed: 5,
            ..HistorySpec::with_size(3 << 20)
        },
    )
    .unwrap();
    let live = LiveWriter::start(
        &root,
        LiveConfig {
            messages_per_sec: 400.0,
            max_batch: 8,
            media_every: 50,
            wal_autocheckpoint: 0,
            ..LiveConfig::default()
        },
    )
    .unwrap();
    let db_rel = live
        .database()
        .strip_prefix(&root)
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    while live.messages_committed() < 40 {
        assert!(Instant::now() < deadline, "the live writer does not write");
        std::thread::sleep(Duration::from_millis(10));
    }
    let state = dir.path().join("state");
    let cfg = cfg_with_snapshots(&state, &root);
    let mut checked = 0;
    for round in 0..3 {
        let before = Instant::now();
        let out = scan(&root, None, &cfg).unwrap();
        let must_have = live.committed_before(before);
        assert!(
            out.databases
                .iter()
                .all(|d| matches!(d.capture, Capture::Snapshot { .. })),
            "{:?}",
            out.databases
        );
        let got = deliver(&out, &db_rel, &dir.path().join(format!("r{round}")));
        integrity_check(&got).unwrap();
        let c = Connection::open(&got).unwrap();
        let (n, max): (i64, i64) = c
            .query_row(
                "SELECT count(*), coalesce(max(id), 0) FROM messages WHERE id >= ?1",
                [live.first_message_id() as i64],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        let (n, max) = (n as u64, max as u64);
        assert!(max >= must_have, "round {round}: {max} < {must_have}");
        // Consecutive ids: no gap, so every earlier commit is there.
        assert_eq!(n, max + 1 - live.first_message_id(), "round {round}");
        checked += must_have + 1 - live.first_message_id();
        std::thread::sleep(Duration::from_millis(100));
    }
    let stats = live.stop().unwrap();
    assert!(stats.messages > 40 && checked > 0, "{stats:?}");
}

fn changing_file_root() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("src");
    fs::create_dir_all(&root).unwrap();
    fs::write(root.join("steady.bin"), vec![1u8; 200_000]).unwrap();
    fs::write(root.join("voice.amr"), vec![2u8; 300_000]).unwrap();
    (dir, root)
}

#[test]
fn raw_file_changed_once_while_read_is_read_again() {
    let (_dir, root) = changing_file_root();
    let target = root.join("voice.amr");
    let calls = Arc::new(AtomicU32::new(0));
    let (c, t) = (Arc::clone(&calls), target.clone());
    let cfg = ScanConfig {
        after_read: Some(ReadHook::new(move |path, attempt| {
            if path == "voice.amr" {
                c.fetch_add(1, Ordering::SeqCst);
                if attempt == 0 {
                    // Same size, new bytes: only the times tell.
                    fs::write(&t, vec![3u8; 300_000]).unwrap();
                }
            }
        })),
        ..ScanConfig::default()
    };
    let out = scan(&root, None, &cfg).unwrap();
    assert!(calls.load(Ordering::SeqCst) >= 2, "read again");
    assert!(out.unstable.is_empty());
    let final_bytes = fs::read(&target).unwrap();
    let e = &out.manifest.entries()[out.manifest.find("voice.amr").unwrap()];
    let expect: Vec<ChunkHash> = final_bytes
        .chunks(e.chunk_size() as usize)
        .map(ChunkHash::of)
        .collect();
    assert_eq!(entry_hashes(&out, "voice.amr"), expect, "the final content");
}

#[test]
fn raw_file_changing_on_every_read_is_reported_and_left_out() {
    let (_dir, root) = changing_file_root();
    let target = root.join("voice.amr");
    let t = target.clone();
    let cfg = ScanConfig {
        read_attempts: 3,
        retry_backoff: Duration::from_millis(1),
        after_read: Some(ReadHook::new(move |path, attempt| {
            if path == "voice.amr" {
                fs::write(&t, vec![attempt as u8 + 10; 300_000 + attempt as usize]).unwrap();
            }
        })),
        ..ScanConfig::default()
    };
    let out = scan(&root, None, &cfg).unwrap();
    let names: Vec<&str> = out.unstable.iter().map(|s| s.path.as_str()).collect();
    assert_eq!(names, ["voice.amr"]);
    assert!(out.unstable[0].reason.contains("consistently"));
    assert!(out.manifest.find("voice.amr").is_none(), "left out");
    assert!(out.manifest.find("steady.bin").is_some());
}

#[test]
fn two_senders_describe_the_same_history_with_the_same_root() {
    // A generated history has un-checkpointed -wal files and no -shm: the first snapshot makes
    // SQLite create the -shm (moving the folder's mtime); a second sender with its own state
    // must still compute the same root (a restarted sender resumes against it).
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("history");
    generate(
        &root,
        &HistorySpec {
            seed: 9,
            ..HistorySpec::with_size(2 << 20)
        },
    )
    .unwrap();
    let first = scan(
        &root,
        None,
        &cfg_with_snapshots(&dir.path().join("a"), &root),
    )
    .unwrap();
    let second = scan(
        &root,
        None,
        &cfg_with_snapshots(&dir.path().join("b"), &root),
    )
    .unwrap();
    assert!(first.databases.len() >= 2, "{:?}", first.databases);
    assert_eq!(first.manifest.root(), second.manifest.root());
}

#[test]
fn database_locked_by_the_app_is_sent_raw_after_the_busy_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("src");
    fs::create_dir_all(&root).unwrap();
    let db = root.join("locked.db");
    // Rollback-journal mode with an exclusive lock held: the app writes and never lets go.
    let app = Connection::open(&db).unwrap();
    app.execute_batch(
        "PRAGMA locking_mode=EXCLUSIVE;
         CREATE TABLE t(x);
         INSERT INTO t VALUES (1);",
    )
    .unwrap();
    let cfg = ScanConfig {
        snapshot_busy_timeout: Duration::from_millis(200),
        ..cfg_with_snapshots(&dir.path().join("state"), &root)
    };
    let t = Instant::now();
    let out = scan(&root, None, &cfg).unwrap();
    assert!(t.elapsed() < Duration::from_secs(10));
    assert!(
        matches!(&out.databases[0].capture, Capture::Raw { reason } if reason.contains("lock")),
        "{:?}",
        out.databases
    );
    assert!(out.manifest.find("locked.db").is_some());
    assert!(out.sources.is_empty());
    drop(app);
    // Released: the next scan snapshots it.
    let out = scan(&root, None, &cfg).unwrap();
    assert_eq!(
        out.databases[0].capture,
        Capture::Snapshot { reused: false }
    );
}

#[test]
fn snapshot_keeps_the_journal_mode_of_each_database() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("src");
    fs::create_dir_all(&root).unwrap();
    // A WAL database fully checkpointed (no -wal: a valid WAL database as it is), one with rows
    // only in its -wal, and databases written in each rollback mode.
    let modes = ["wal", "delete", "truncate", "persist"];
    for (i, mode) in modes.iter().enumerate() {
        let c = Connection::open(root.join(format!("{mode}.db"))).unwrap();
        let got: String = c
            .query_row(&format!("PRAGMA journal_mode={mode}"), [], |r| r.get(0))
            .unwrap();
        assert_eq!(got, *mode);
        c.execute_batch("CREATE TABLE messages(id INTEGER PRIMARY KEY, body TEXT NOT NULL);")
            .unwrap();
        for n in 0..100 + i {
            c.execute("INSERT INTO messages(body) VALUES (?1)", [format!("m{n}")])
                .unwrap();
        }
    }
    assert!(!root.join("wal.db-wal").exists(), "closed: checkpointed");
    let writer = wal_only_db(&root.join("walonly.db"), 300);
    let source: Vec<(String, [u8; 2], String)> =
        ["wal", "delete", "truncate", "persist", "walonly"]
            .iter()
            .map(|m| {
                let p = root.join(format!("{m}.db"));
                let head = fs::read(&p).unwrap();
                // The mode a fresh connection sees (the rollback modes are a connection's setting).
                let mode = if head[18] == 2 { "wal" } else { "delete" };
                (format!("{m}.db"), [head[18], head[19]], mode.to_string())
            })
            .collect();
    assert_eq!(source[0].1, [2, 2]);
    assert_eq!(source[1].1, [1, 1]);

    let state = dir.path().join("state");
    let cfg = cfg_with_snapshots(&state, &root);
    let out = scan(&root, None, &cfg).unwrap();
    // The snapshot folder holds the snapshots and nothing of SQLite's (no -wal, -shm, -journal),
    // also after the rows of every snapshot were counted.
    for p in out.sources.values() {
        ferry_sync::snapshot::count_rows(p).unwrap();
    }
    let snap_dir = SnapshotStore::dir_for(&state, &root);
    let stray: Vec<String> = names_in(&snap_dir)
        .into_iter()
        .filter(|n| n.contains("-wal") || n.contains("-shm") || n.contains("-journal"))
        .collect();
    assert!(stray.is_empty(), "{stray:?}");
    let rows: Vec<i64> = [100, 101, 102, 103, 300].to_vec();
    for ((name, header, mode), rows) in source.iter().zip(rows) {
        let got = deliver(&out, name, &dir.path().join("new").join(name));
        let head = fs::read(&got).unwrap();
        assert_eq!([head[18], head[19]], *header, "{name}: header bytes 18/19");
        assert_eq!(journal_mode(&got), *mode, "{name}");
        integrity_check(&got).unwrap();
        assert_eq!(count(&got), rows, "{name}");
    }
    // Unchanged, every snapshot is reused, the checkpointed WAL database's too (reading it made
    // SQLite create an empty -wal, which holds no commit).
    assert!(root.join("wal.db-wal").exists());
    let next = scan(&root, None, &cfg).unwrap();
    assert!(
        next.databases
            .iter()
            .all(|d| d.capture == Capture::Snapshot { reused: true }),
        "{:?}",
        next.databases
    );
    assert_eq!(next.manifest.root(), out.manifest.root());
    // The same state of a database gives the same snapshot bytes (another sender's state).
    let again = scan(
        &root,
        None,
        &cfg_with_snapshots(&dir.path().join("b"), &root),
    )
    .unwrap();
    for (name, _, _) in &source {
        let a = fs::read(&out.sources[name]).unwrap();
        let b = fs::read(&again.sources[name]).unwrap();
        assert!(a == b, "{name}: snapshot bytes differ");
    }
    drop(writer);
}
