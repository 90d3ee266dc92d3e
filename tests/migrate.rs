//! A generated chat history migrates byte for byte, and `ferry verify` agrees.

use ferry_testkit::assert_histories_equal;

use crate::util::*;

#[test]
fn generated_history_migrates_and_verifies() {
    let src = shared_history(48, 7);
    let m = migrate(src);
    assert_histories_equal(src, &m.dest).unwrap();
    let (code, err) = verify(&m.dest);
    assert_eq!(code, 0, "ferry verify failed: {err}");
    // Same counts on both sides, and the receiver saw real payload.
    for f in ["files", "bytes"] {
        assert_eq!(m.send_done[f], m.recv_done[f], "{f} differ");
    }
    let bytes = u64_of(&m.recv_done, "bytes");
    let wire = u64_of(&m.recv_done, "wire_bytes");
    assert!(bytes > 40 * MIB, "history is only {bytes} bytes");
    assert!(
        wire > 0 && wire <= bytes,
        "wire bytes {wire} out of range (history {bytes})"
    );
    assert_eq!(
        u64_of(&m.send_done, "wire_bytes"),
        wire,
        "sender and receiver count different wire bytes in a clean run"
    );
    eprintln!(
        "clean migration: {bytes} bytes, {wire} on the wire, receiver {:.2} s",
        m.recv_done["elapsed_s"].as_f64().unwrap_or(0.0)
    );
}

#[test]
fn limit_rate_paces_the_transfer() {
    let src = shared_history(8, 3);
    let (old, new) = (Device::new("old"), Device::new("new"));
    let work = tempdir("paced");
    let dest = work.path().join("history");
    // 4 MB/s: the history's wire bytes cannot cross in less than wire / 4e6 seconds.
    let (mut s, addr, code) =
        start_sender_with(&old, src, "127.0.0.1:0", &["--limit-rate", "4MB/s"]);
    let t = std::time::Instant::now();
    let mut r = new.receive(&dest, &addr, Some(&code), &[]);
    let done = r.wait_event("done", LONG);
    let secs = t.elapsed().as_secs_f64();
    r.expect_exit(0, LONG);
    s.expect_exit(0, LONG);
    assert_histories_equal(src, &dest).unwrap();
    let wire = u64_of(&done, "wire_bytes") as f64;
    assert!(
        wire > 4e6,
        "history too small to show pacing: {wire} wire bytes"
    );
    // Pacing starts at the first frame; allow one frame (≤ 4 MiB) of slack.
    let floor = (wire - 4.0 * MIB as f64) / 4e6;
    assert!(
        secs >= floor,
        "{wire} wire bytes in {secs:.2} s at 4 MB/s (floor {floor:.2} s)"
    );
    eprintln!("--limit-rate 4MB/s: {wire} wire bytes in {secs:.2} s");
}

#[test]
fn compress_always_never_and_auto_on_one_machine() {
    let src = shared_history(8, 3);
    let (old, new) = (Device::new("old"), Device::new("new"));
    let work = tempdir("compress");
    let mut wire = Vec::new();
    for mode in ["always", "never", "auto"] {
        let dest = work.path().join(mode);
        let (mut s, addr, code) =
            start_sender_with(&old, src, "127.0.0.1:0", &["--compress", mode]);
        let mut r = new.receive(&dest, &addr, Some(&code), &[]);
        let done = r.wait_event("done", LONG);
        r.expect_exit(0, LONG);
        s.expect_exit(0, LONG);
        assert_histories_equal(src, &dest).unwrap();
        let unique = u64_of(s.seen_named("manifest")[0], "unique_bytes");
        wire.push((u64_of(&done, "wire_bytes"), unique));
    }
    let [(always, unique), (never, unique2), (auto, _)] = wire[..] else {
        unreachable!()
    };
    eprintln!(
        "--compress always: {always} wire bytes, never: {never}, auto: {auto}, unique {unique}"
    );
    assert_eq!(unique, unique2);
    // The message databases compress; without compression every unique byte crosses as it is.
    assert!(always < unique, "always: {always} of {unique}");
    assert_eq!(never, unique, "never: {never} of {unique}");
    // Both ends on this machine (loopback): auto does not compress.
    assert_eq!(auto, unique, "auto on loopback: {auto} of {unique}");
}

/// The journal mode a fresh read-only connection to the database at `db` reports ("wal" for a
/// WAL-mode database, "delete" for the rollback modes, which are not kept in the file).
fn journal_mode(db: &std::path::Path) -> String {
    let c = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .unwrap_or_else(|e| panic!("open {}: {e}", db.display()));
    c.query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap()
}

#[test]
fn databases_arrive_in_their_journal_mode() {
    let src = shared_history(8, 11);
    let m = migrate(src);
    // Every database of the history (WAL mode; the newest ones with frames still in their -wal).
    let dbs: Vec<std::path::PathBuf> = files_under(&m.dest)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "db"))
        .collect();
    assert!(dbs.len() >= 2, "{dbs:?}");
    // Before anything opens them: the header bytes 18/19 are the source's, and no -wal came.
    for rel in &dbs {
        let (a, b) = (
            std::fs::read(src.join(rel)).unwrap(),
            std::fs::read(m.dest.join(rel)).unwrap(),
        );
        assert_eq!(&b[..16], b"SQLite format 3\0", "{}", rel.display());
        assert_eq!(
            a[18..20],
            b[18..20],
            "{}: header bytes 18/19",
            rel.display()
        );
        assert!(!m.dest.join(format!("{}-wal", rel.display())).exists());
    }
    let (code, err) = verify(&m.dest);
    assert_eq!(code, 0, "ferry verify failed: {err}");
    for rel in &dbs {
        let mode = journal_mode(&src.join(rel));
        assert_eq!(
            mode,
            "wal",
            "{}: the generator makes WAL databases",
            rel.display()
        );
        assert_eq!(journal_mode(&m.dest.join(rel)), mode, "{}", rel.display());
    }
    // Every row arrived.
    assert_histories_equal(src, &m.dest).unwrap();
}
