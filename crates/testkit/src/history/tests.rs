//! Tests of the generator, the live writer and tree comparison (temp dirs, a few MiB each).

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use rusqlite::Connection;

use super::*;

fn gen(spec: &HistorySpec) -> (tempfile::TempDir, HistoryReport) {
    let dir = tempfile::tempdir().expect("tempdir");
    let report = generate(dir.path(), spec).expect("generate");
    (dir, report)
}

fn files_under(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).expect("read_dir") {
            let e = e.expect("entry");
            let t = e.file_type().expect("file_type");
            if t.is_dir() {
                stack.push(e.path());
            } else {
                out.push(e.path());
            }
        }
    }
    out.sort();
    out
}

#[test]
fn same_seed_is_byte_identical_and_other_seed_differs() {
    let spec = HistorySpec::with_size(4 * MIB);
    let (a, ra) = gen(&spec);
    let (b, rb) = gen(&spec);
    assert_eq!(
        ra,
        HistoryReport {
            databases: ra.databases.clone(),
            ..rb.clone()
        }
    );
    assert!(ra.wal_bytes > 0, "un-checkpointed frames expected: {ra:?}");
    assert_trees_equal(a.path(), b.path()).expect("same seed, same tree");

    let (c, _) = gen(&HistorySpec {
        seed: 2,
        ..spec.clone()
    });
    assert!(!tree_diff(a.path(), c.path()).expect("diff").is_empty());
}

#[test]
fn checkpointed_history_is_reproducible_and_has_no_wal() {
    let spec = HistorySpec {
        checkpoint_wal: true,
        ..HistorySpec::with_size(2 * MIB)
    };
    let (a, ra) = gen(&spec);
    let (b, _) = gen(&spec);
    assert_eq!(ra.wal_bytes, 0);
    assert_trees_equal(a.path(), b.path()).expect("same tree");
    for db in &ra.databases {
        assert!(!sidecar(db, "-wal").exists());
        let conn = Connection::open(db).expect("open");
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .expect("mode");
        assert_eq!(mode, "wal");
    }
}

#[test]
fn size_is_within_ten_percent_and_mix_is_present() {
    for target in [MIB, 8 * MIB, 64 * MIB] {
        let (dir, report) = gen(&HistorySpec::with_size(target));
        let ratio = report.bytes as f64 / target as f64;
        assert!((0.9..=1.1).contains(&ratio), "{target}: {report:?}");

        let mut by_ext: HashMap<String, u64> = HashMap::new();
        for f in files_under(&dir.path().join("media")) {
            let ext = f.extension().map(|e| e.to_string_lossy().into_owned());
            *by_ext.entry(ext.unwrap_or_default()).or_default() += 1;
        }
        for ext in ["jpg", "mp4", "amr", "silk"] {
            assert!(
                by_ext.get(ext).copied().unwrap_or(0) > 0,
                "{ext}: {by_ext:?}"
            );
        }
        assert!(report.duplicate_files > 0);
        assert!(report.messages > 100);
    }
}

#[test]
fn media_have_magic_headers_and_duplicates_are_exact_copies() {
    let (dir, report) = gen(&HistorySpec {
        duplicate_fraction: 0.3,
        ..HistorySpec::with_size(8 * MIB)
    });
    let mut by_content: HashMap<Vec<u8>, u32> = HashMap::new();
    for f in files_under(&dir.path().join("media")) {
        let data = fs::read(&f).expect("read");
        if data.is_empty() {
            continue; // .nomedia
        }
        let ok = match f.extension().and_then(|e| e.to_str()) {
            Some("jpg") => data.starts_with(&[0xFF, 0xD8, 0xFF]) && data.ends_with(&[0xFF, 0xD9]),
            Some("mp4") => &data[4..8] == b"ftyp",
            Some("amr") => data.starts_with(b"#!AMR\n"),
            Some("silk") => data.starts_with(b"\x02#!SILK_V3"),
            other => panic!("unexpected media {other:?}"),
        };
        assert!(ok, "bad header: {}", f.display());
        *by_content.entry(data).or_default() += 1;
    }
    let copies: u64 = by_content.values().map(|n| u64::from(n - 1)).sum();
    assert_eq!(copies, report.duplicate_files);
    assert!(copies > 0);
}

#[test]
fn layout_has_small_files_documents_and_empties() {
    let (dir, _) = gen(&HistorySpec {
        small_files: 50,
        ..HistorySpec::with_size(MIB)
    });
    let root = dir.path();
    let stickers = files_under(&root.join("cache/sticker"));
    assert_eq!(stickers.len(), 50);
    for s in &stickers {
        let len = fs::metadata(s).expect("stat").len();
        assert!((2 * KIB..=20 * KIB).contains(&len));
    }
    assert!(root.join("Documents/emoji 😀 notes.md").is_file());
    assert!(root.join("Documents/旅行 2023 🏖️/海边 日落.jpg").is_file());
    assert!(fs::read_dir(root.join("cache/tmp"))
        .expect("dir")
        .next()
        .is_none());
    assert_eq!(
        fs::metadata(root.join("media/.nomedia"))
            .expect("stat")
            .len(),
        0
    );
    assert!(root.join("config/settings.json").is_file());
    assert!(!files_under(&root.join("logs")).is_empty());
}

#[test]
fn databases_are_sound_wal_and_bilingual() {
    let (dir, report) = gen(&HistorySpec::with_size(8 * MIB));
    let newest = &report.databases[report.databases.len() - 2];
    assert!(sidecar(newest, "-wal").metadata().expect("wal").len() > 0);
    let mut total = 0u64;
    let mut zh = 0u64;
    let mut en = 0u64;
    for db in &report.databases {
        let conn = Connection::open(db).expect("open");
        let check: String = conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .expect("integrity_check");
        assert_eq!(check, "ok", "{}", db.display());
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .expect("journal_mode");
        assert_eq!(mode, "wal");
        if db.ends_with("contact.db") {
            let n: i64 = conn
                .query_row("SELECT count(*) FROM contacts", [], |r| r.get(0))
                .expect("contacts");
            assert!(n >= 10);
            continue;
        }
        total += conn
            .query_row("SELECT count(*) FROM messages", [], |r| r.get::<_, i64>(0))
            .expect("count") as u64;
        let mut st = conn
            .prepare("SELECT body FROM messages WHERE kind = 1")
            .expect("prepare");
        let bodies = st.query_map([], |r| r.get::<_, String>(0)).expect("query");
        for body in bodies {
            let body = body.expect("row");
            if body.chars().any(|c| ('\u{4e00}'..='\u{9fff}').contains(&c)) {
                zh += 1;
            }
            if body.chars().any(|c| c.is_ascii_alphabetic()) {
                en += 1;
            }
        }
        let attached: i64 = conn
            .query_row(
                "SELECT count(*) FROM messages WHERE attachment IS NOT NULL",
                [],
                |r| r.get(0),
            )
            .expect("attachments");
        assert!(attached > 0);
        let att: String = conn
            .query_row(
                "SELECT attachment FROM messages WHERE attachment IS NOT NULL LIMIT 1",
                [],
                |r| r.get(0),
            )
            .expect("attachment");
        assert!(dir.path().join(att).is_file());
    }
    // Every message counted, including those that live only in the -wal.
    assert_eq!(total, report.messages);
    assert!(zh > 100 && en > 100, "zh {zh} en {en}");
}

#[test]
fn live_writer_commits_at_rate_and_counts_match() {
    let (dir, report) = gen(&HistorySpec::with_size(2 * MIB));
    let writer = LiveWriter::start(
        dir.path(),
        LiveConfig {
            messages_per_sec: 200.0,
            media_every: 25,
            ..LiveConfig::default()
        },
    )
    .expect("start");
    std::thread::sleep(Duration::from_millis(1000));
    let seen = writer.messages_committed();
    let db = writer.database().to_path_buf();
    let stats = writer.stop().expect("stop");
    assert!(stats.messages >= seen);
    // 200/s for ~1 s; generous bounds for a loaded 2-core machine.
    assert!((100..=300).contains(&stats.messages), "{stats:?}");
    assert!(stats.media_files >= 4, "{stats:?}");
    assert!(stats.transactions >= 1);

    let conn = Connection::open(&db).expect("open");
    let (count, max): (i64, i64) = conn
        .query_row("SELECT count(*), max(id) FROM messages", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .expect("count");
    assert_eq!(max as u64, stats.last_message_id);
    let before: i64 = report.messages as i64
        - report.databases[..report.databases.len() - 2]
            .iter()
            .map(|p| {
                Connection::open(p)
                    .and_then(|c| {
                        c.query_row("SELECT count(*) FROM messages", [], |r| r.get::<_, i64>(0))
                    })
                    .expect("count")
            })
            .sum::<i64>();
    assert_eq!(count - before, stats.messages as i64);
}

#[test]
fn live_writer_stops_on_drop() {
    let (dir, _) = gen(&HistorySpec::with_size(MIB));
    let writer = LiveWriter::start(dir.path(), LiveConfig::default()).expect("start");
    std::thread::sleep(Duration::from_millis(100));
    drop(writer); // must not hang
}

#[test]
fn tree_diff_reports_each_kind_of_difference() {
    let a = tempfile::tempdir().expect("tempdir");
    let b = tempfile::tempdir().expect("tempdir");
    for root in [a.path(), b.path()] {
        fs::create_dir_all(root.join("d/e")).expect("mkdir");
        fs::write(root.join("d/same"), b"same").expect("write");
        fs::create_dir_all(root.join(".ferry")).expect("mkdir");
    }
    fs::write(a.path().join(".ferry/state"), b"x").expect("write");
    assert_trees_equal(a.path(), b.path()).expect(".ferry is ignored");

    fs::write(a.path().join("d/content"), b"abcd").expect("write");
    fs::write(b.path().join("d/content"), b"abXd").expect("write");
    fs::write(a.path().join("d/size"), b"1").expect("write");
    fs::write(b.path().join("d/size"), b"12").expect("write");
    fs::write(a.path().join("only_a"), b"").expect("write");
    fs::create_dir(b.path().join("only_b")).expect("mkdir");
    fs::write(a.path().join("kind"), b"").expect("write");
    fs::create_dir(b.path().join("kind")).expect("mkdir");
    std::os::unix::fs::symlink("x", a.path().join("link")).expect("symlink");
    std::os::unix::fs::symlink("y", b.path().join("link")).expect("symlink");

    let diffs = tree_diff(a.path(), b.path()).expect("diff");
    let p = PathBuf::from;
    assert_eq!(
        diffs,
        vec![
            Difference::Content {
                path: p("d/content"),
                offset: 2
            },
            Difference::Size {
                path: p("d/size"),
                left: 1,
                right: 2
            },
            Difference::Kind {
                path: p("kind"),
                left: EntryKind::File,
                right: EntryKind::Dir
            },
            Difference::SymlinkTarget {
                path: p("link"),
                left: p("x"),
                right: p("y")
            },
            Difference::OnlyInLeft(p("only_a")),
            Difference::OnlyInRight(p("only_b")),
        ]
    );
    assert!(assert_trees_equal(a.path(), b.path()).is_err());
}

#[test]
fn generate_refuses_a_non_empty_directory() {
    let dir = tempfile::tempdir().expect("tempdir");
    fs::write(dir.path().join("x"), b"x").expect("write");
    assert!(generate(dir.path(), &HistorySpec::with_size(MIB)).is_err());
}

#[test]
fn large_histories_split_into_several_message_databases() {
    let spec = HistorySpec {
        max_db_bytes: 128 * KIB,
        ..HistorySpec::with_size(4 * MIB)
    };
    let (a, report) = gen(&spec);
    let (b, _) = gen(&spec);
    assert_trees_equal(a.path(), b.path()).expect("same tree");
    let msg_dbs = &report.databases[..report.databases.len() - 1];
    assert!(msg_dbs.len() >= 3, "{report:?}");
    let mut total = 0;
    let mut last_max = 0;
    for (i, db) in msg_dbs.iter().enumerate() {
        assert!(db.ends_with(format!("msg_{i}.db")));
        let newest = i + 1 == msg_dbs.len();
        assert_eq!(sidecar(db, "-wal").exists(), newest, "{}", db.display());
        let conn = Connection::open(db).expect("open");
        let (n, min, max): (i64, i64, i64) = conn
            .query_row("SELECT count(*), min(id), max(id) FROM messages", [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .expect("count");
        // Ids continue across databases, oldest first.
        assert_eq!(min, last_max + 1);
        assert_eq!(max - min + 1, n);
        last_max = max;
        total += n as u64;
    }
    assert_eq!(total, report.messages);
}

#[test]
fn live_writer_without_checkpoints_keeps_commits_in_the_wal_and_logs_them() {
    let (dir, _) = gen(&HistorySpec::with_size(MIB));
    let writer = LiveWriter::start(
        dir.path(),
        LiveConfig {
            messages_per_sec: 500.0,
            media_every: 0,
            wal_autocheckpoint: 0,
            ..LiveConfig::default()
        },
    )
    .expect("start");
    let db = writer.database().to_path_buf();
    let start = std::time::Instant::now();
    assert_eq!(
        writer.committed_before(start),
        writer.first_message_id() - 1
    );
    while writer.messages_committed() < 300 {
        std::thread::sleep(Duration::from_millis(10));
    }
    let main_len = fs::metadata(&db).expect("db").len();
    let wal = {
        let mut s = db.as_os_str().to_os_string();
        s.push("-wal");
        PathBuf::from(s)
    };
    // 300 messages, and still no checkpoint: the main file has not grown, the -wal has.
    let wal_len = fs::metadata(&wal).expect("-wal").len();
    assert!(wal_len > 100_000, "{wal_len}");
    let commits = writer.commits();
    let mid = commits[commits.len() / 2];
    assert_eq!(writer.committed_before(mid.at), mid.last_id);
    let now = std::time::Instant::now();
    let upto = writer.committed_before(now);
    assert!(upto >= writer.first_message_id() + 299 - 1);
    assert!(commits
        .windows(2)
        .all(|w| w[0].at <= w[1].at && w[0].last_id < w[1].last_id));
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(fs::metadata(&db).expect("db").len(), main_len);
    writer.stop().expect("stop");
}

#[test]
fn history_diff_compares_databases_by_content() {
    let (a, _) = gen(&HistorySpec::with_size(MIB));
    let b = tempfile::tempdir().expect("tempdir");
    let st = std::process::Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", a.path().display()))
        .arg(b.path())
        .status()
        .expect("cp");
    assert!(st.success());
    // Replace each database by a rebuilt copy (other bytes, same content, no -wal).
    let mut dbs = Vec::new();
    for e in fs::read_dir(b.path().join("db")).expect("db") {
        let p = e.expect("entry").path();
        if is_sqlite(&p) {
            dbs.push(p);
        }
    }
    assert!(!dbs.is_empty());
    for p in &dbs {
        let tmp = p.with_extension("rebuilt");
        Connection::open(p)
            .expect("open")
            .execute("VACUUM INTO ?1", [tmp.to_str().expect("utf-8")])
            .expect("vacuum into");
        for s in ["-wal", "-shm"] {
            let mut c = p.as_os_str().to_os_string();
            c.push(s);
            let _ = fs::remove_file(PathBuf::from(c));
        }
        fs::rename(&tmp, p).expect("rename");
    }
    assert!(!tree_diff(a.path(), b.path()).expect("diff").is_empty());
    assert_eq!(history_diff(a.path(), b.path()).expect("diff"), vec![]);
    // One changed row is a difference.
    let c = Connection::open(&dbs[0]).expect("open");
    let table: String = c
        .query_row(
            "SELECT name FROM sqlite_master WHERE type='table' ORDER BY name LIMIT 1",
            [],
            |r| r.get(0),
        )
        .expect("a table");
    c.execute(
        &format!("DELETE FROM \"{table}\" WHERE rowid = (SELECT max(rowid) FROM \"{table}\")"),
        [],
    )
    .expect("delete");
    drop(c);
    let diffs = history_diff(a.path(), b.path()).expect("diff");
    assert!(
        matches!(diffs.as_slice(), [Difference::Database { .. }]),
        "{diffs:?}"
    );
}
