//! A live history: databases with commits only in their `-wal`, files that keep changing.

use std::fs;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use ferry_testkit::{
    database_digest, generate, history_diff, integrity_check, HistorySpec, LiveConfig, LiveWriter,
};

use crate::util::*;

fn rows(db: &Path, table: &str) -> u64 {
    database_digest(db)
        .unwrap()
        .into_iter()
        .find(|(name, _, _)| name == &format!("table {table}"))
        .map(|(_, n, _)| n)
        .unwrap()
}

#[test]
fn wal_only_commits_migrate_into_a_self_contained_database() {
    let work = tempdir("wal");
    let src = work.path().join("history");
    generate(
        &src,
        &HistorySpec {
            seed: 11,
            ..HistorySpec::with_size(4 * MIB)
        },
    )
    .unwrap();
    // The generator leaves the newest message database with commits only in its -wal, as an
    // app that was killed before a checkpoint would.
    let wal = fs::read_dir(src.join("db"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_str().unwrap().ends_with(".db-wal") && p.to_str().unwrap().contains("msg_"))
        .expect("a message database with a -wal");
    assert!(fs::metadata(&wal).unwrap().len() > 0);
    let db = Path::new(wal.to_str().unwrap().strip_suffix("-wal").unwrap()).to_path_buf();
    let rel = db.strip_prefix(&src).unwrap().to_path_buf();
    let expected = rows(&db, "messages");

    let m = migrate(&src);
    let got = m.dest.join(&rel);
    assert!(!m.dest.join(format!("{}-wal", rel.display())).exists());
    assert!(!m.dest.join(format!("{}-shm", rel.display())).exists());
    // Opened on its own, read-only, with no companions: whole, and with every message.
    integrity_check(&got).unwrap();
    assert_eq!(rows(&got, "messages"), expected);
    let diffs = history_diff(&src, &m.dest).unwrap();
    assert!(diffs.is_empty(), "{diffs:?}");
    let (code, err) = verify(&m.dest);
    assert_eq!(code, 0, "ferry verify failed: {err}");
}

#[test]
fn wal_frames_of_an_open_database_are_migrated() {
    let work = tempdir("walopen");
    let src = work.path().join("history");
    generate(
        &src,
        &HistorySpec {
            seed: 12,
            ..HistorySpec::with_size(4 * MIB)
        },
    )
    .unwrap();
    let db = {
        let w = LiveWriter::start(&src, LiveConfig::default()).unwrap();
        let p = w.database().to_path_buf();
        w.stop().unwrap();
        p
    };
    let rows_before = rows(&db, "messages");
    // Keep writing during the whole migration, with autocheckpoint off: the sender snapshots a
    // database whose recent commits exist only in the -wal of a connection that stays open.
    let live = LiveWriter::start(
        &src,
        LiveConfig {
            messages_per_sec: 300.0,
            media_every: 0,
            wal_autocheckpoint: 0,
            ..LiveConfig::default()
        },
    )
    .unwrap();
    while live.messages_committed() < 100 {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let before = std::time::Instant::now();
    let must_have = live.committed_before(before);
    let first = live.first_message_id();
    let rel = live.database().strip_prefix(&src).unwrap().to_path_buf();
    let m = migrate(&src);
    let stats = live.stop().unwrap();
    let got = m.dest.join(&rel);
    integrity_check(&got).unwrap();
    // One consistent commit, and ids are consecutive: the count says which commits are in.
    let live_rows = rows(&got, "messages") - rows_before;
    assert!(
        live_rows >= must_have + 1 - first,
        "{live_rows} live messages arrived; {} were committed before the send",
        must_have + 1 - first
    );
    assert!(stats.messages >= live_rows);
    let (code, err) = verify(&m.dest);
    assert_eq!(code, 0, "ferry verify failed: {err}");
}

#[test]
fn a_file_that_keeps_changing_is_named_and_the_sender_exits_incomplete() {
    let work = tempdir("unstable");
    let src = work.path().join("history");
    fs::create_dir_all(src.join("media")).unwrap();
    fs::write(src.join("media/photo.jpg"), vec![9u8; 300_000]).unwrap();
    let growing = src.join("media/recording.tmp");
    fs::write(&growing, vec![1u8; 100_000]).unwrap();
    // Appends every millisecond for the whole migration (with catch-up rounds, a file that
    // settles after the first scan would simply arrive in the next round).
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, path) = (Arc::clone(&stop), growing.clone());
        std::thread::spawn(move || {
            let mut f = fs::OpenOptions::new().append(true).open(path).unwrap();
            while !stop.load(Ordering::Relaxed) {
                f.write_all(&[7u8; 512]).unwrap();
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        })
    };
    let (old, new) = (Device::new("old"), Device::new("new"));
    let dest = work.path().join("dest");
    let (mut s, addr, code) = start_sender(&old, &src, "127.0.0.1:0");
    let unstable = s
        .seen_named("unstable")
        .into_iter()
        .cloned()
        .collect::<Vec<_>>();
    assert_eq!(unstable.len(), 1, "{unstable:?}");
    assert_eq!(unstable[0]["path"], "media/recording.tmp");
    let mut r = new.receive(&dest, &addr, Some(&code), &[]);
    r.wait_event("done", LONG);
    r.expect_exit(0, LONG);
    let done = s.wait_event("done", LONG);
    assert_eq!(done["complete"], false);
    assert_eq!(done["unstable"][0], "media/recording.tmp");
    s.expect_exit(10, LONG);
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    assert!(
        s.stderr().contains("media/recording.tmp"),
        "stderr does not name the file: {}",
        s.stderr()
    );
    assert!(dest.join("media/photo.jpg").is_file());
    assert!(!dest.join("media/recording.tmp").exists(), "left out");
}
