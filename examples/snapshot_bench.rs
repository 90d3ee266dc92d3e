//! Snapshot overhead of a large SQLite database: ferry's consistent snapshot (online backup in
//! one read transaction, then back to the source's journal mode and fsync) against a plain `cp`
//! of the database and its `-wal`.
//!
//! ```text
//! cargo run --release --example snapshot_bench -- <WORK_DIR> [--mib 1024] [--runs 3]
//! ```
//! Builds `<WORK_DIR>/msg.db` (WAL mode, about `--mib` MiB of messages, the last few thousand
//! commits left in the `-wal` by a connection that stays open, as a running app would), then
//! times `--runs` snapshots and `--runs` copies, alternating, with a warm page cache. The
//! snapshot includes its fsync; the copy is timed as `cp` alone and as `cp` plus an fsync of the
//! copies (the fair comparison). Prints one JSON object with the medians, the extra disk each
//! needs, the time a rescan of the unchanged database takes (reuse), and the load average. Everything under WORK_DIR is deleted at the end.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Instant;

use anyhow::{ensure, Context as _};
use ferry_sync::snapshot::SnapshotStore;
use rusqlite::Connection;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn build_db(path: &Path, mib: u64) -> anyhow::Result<Connection> {
    let c = Connection::open(path)?;
    let mode: String = c.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
    ensure!(mode == "wal");
    c.execute_batch(
        "PRAGMA synchronous=OFF;
         CREATE TABLE messages(id INTEGER PRIMARY KEY, conv INTEGER, ts INTEGER, body TEXT);
         CREATE INDEX messages_conv_ts ON messages(conv, ts);",
    )?;
    // ~1 KiB rows of varied text.
    let words = [
        "你好",
        "明天见",
        "hello",
        "see you",
        "照片",
        "meeting",
        "好的",
        "thanks",
        "周末",
        "ok",
    ];
    let rows = mib * 1024 * 1024 / 1100;
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let tx = c.unchecked_transaction()?;
    {
        let mut st = tx.prepare("INSERT INTO messages(conv, ts, body) VALUES (?1, ?2, ?3)")?;
        let mut body = String::new();
        for i in 0..rows {
            body.clear();
            while body.len() < 950 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                body.push_str(words[(x % 10) as usize]);
                body.push(' ');
            }
            st.execute(rusqlite::params![
                (x % 500) as i64,
                1_600_000_000 + i as i64,
                body
            ])?;
        }
    }
    tx.commit()?;
    c.execute_batch("PRAGMA wal_checkpoint(TRUNCATE); PRAGMA wal_autocheckpoint=0;")?;
    // Recent commits that stay in the -wal while this connection is open.
    for i in 0..5000i64 {
        c.execute(
            "INSERT INTO messages(conv, ts, body) VALUES (1, ?1, 'recent message')",
            [2_000_000_000 + i],
        )?;
    }
    Ok(c)
}

fn size(p: &Path) -> u64 {
    std::fs::metadata(p).map_or(0, |m| m.len())
}

fn run() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (mut dir, mut mib, mut runs) = (None, 1024u64, 3usize);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--mib" => mib = args.next().context("--mib N")?.parse()?,
            "--runs" => runs = args.next().context("--runs N")?.parse()?,
            other => dir = Some(PathBuf::from(other)),
        }
    }
    let work = dir.context("usage: snapshot_bench <WORK_DIR> [--mib N] [--runs N]")?;
    std::fs::create_dir_all(&work)?;
    let result = measure(&work, mib, runs);
    let _ = std::fs::remove_dir_all(&work);
    let json = result?;
    println!("{json}");
    Ok(())
}

fn measure(work: &Path, mib: u64, runs: usize) -> anyhow::Result<String> {
    let db = work.join("msg.db");
    let t = Instant::now();
    let _app = build_db(&db, mib)?;
    let build_s = t.elapsed().as_secs_f64();
    let (db_bytes, wal_bytes) = (size(&db), size(&work.join("msg.db-wal")));
    // Warm the page cache the same way for both contenders.
    std::fs::read(&db)?;
    let (mut snap_s, mut cp_s, mut cp_sync_s) = (Vec::new(), Vec::new(), Vec::new());
    let mut reuse_s = 0.0;
    let mut snap_bytes = 0;
    for i in 0..runs {
        let snap_dir = work.join(format!("snap{i}"));
        let t = Instant::now();
        let mut store = SnapshotStore::open(&snap_dir)?;
        let c = store.capture("msg.db", &db)?;
        snap_s.push(t.elapsed().as_secs_f64());
        snap_bytes = size(&c.file);
        if i == 0 {
            // A rescan of the unchanged database reuses the snapshot.
            store.finish()?;
            let t = Instant::now();
            let mut again = SnapshotStore::open(&snap_dir)?;
            let c2 = again.capture("msg.db", &db)?;
            ensure!(c2.reused, "an unchanged database was copied again");
            reuse_s = t.elapsed().as_secs_f64();
            again.finish()?;
        }
        std::fs::remove_dir_all(&snap_dir)?;

        let to = work.join("copy");
        std::fs::create_dir_all(&to)?;
        let t = Instant::now();
        let st = Command::new("cp")
            .arg(&db)
            .arg(work.join("msg.db-wal"))
            .arg(&to)
            .status()?;
        ensure!(st.success(), "cp failed");
        cp_s.push(t.elapsed().as_secs_f64());
        for f in ["msg.db", "msg.db-wal"] {
            std::fs::File::open(to.join(f))?.sync_all()?;
        }
        cp_sync_s.push(t.elapsed().as_secs_f64());
        std::fs::remove_dir_all(&to)?;
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let (s, c, cs) = (
        median(snap_s.clone()),
        median(cp_s.clone()),
        median(cp_sync_s.clone()),
    );
    Ok(format!(
        "{{\"db_bytes\":{db_bytes},\"wal_bytes\":{wal_bytes},\"build_s\":{build_s:.1},\"runs\":{runs},\"snapshot_s\":{snap_s:?},\"cp_s\":{cp_s:?},\"snapshot_median_s\":{s:.2},\"cp_median_s\":{c:.2},\"cp_fsync_s\":{cp_sync_s:?},\"cp_fsync_median_s\":{cs:.2},\"ratio_vs_cp_fsync\":{:.2},\"reuse_s\":{reuse_s:.4},\"snapshot_extra_disk_bytes\":{snap_bytes},\"cp_extra_disk_bytes\":{},\"loadavg\":\"{}\"}}",
        s / cs,
        db_bytes + wal_bytes,
        load.trim()
    ))
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("snapshot_bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
