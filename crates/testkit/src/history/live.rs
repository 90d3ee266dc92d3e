//! [`LiveWriter`]: keeps writing into a generated history, like the chat app while it runs.
//!
//! One background thread owns a SQLite connection to the newest message database
//! (`db/msg_N.db`, WAL mode). It commits messages at the configured rate, one transaction per
//! batch, and every `media_every` messages writes a new photo under `media/` and references it.
//! Counters are published after each commit, and every commit is logged with the instant it
//! returned, so a test can ask which messages were surely committed before a moment
//! ([`LiveWriter::committed_before`]). With `wal_autocheckpoint: 0` the writer never
//! checkpoints: everything it commits stays in the `-wal` only, as with an app that holds its
//! database open. `stop()` (or dropping the handle) signals the thread through a channel and
//! joins it; nothing is global.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use rand::{Rng, RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rusqlite::{params, Connection};

use super::media::{self, BlobKind};
use super::text::Lang;
use super::{kind, MessageSource};

/// How the live writer behaves.
#[derive(Debug, Clone, PartialEq)]
pub struct LiveConfig {
    /// Seed for message contents and media names.
    pub seed: u64,
    /// Target rate of committed messages per second (> 0).
    pub messages_per_sec: f64,
    /// At most this many messages per transaction when catching up (≥ 1).
    pub max_batch: u32,
    /// Every this many messages, one is a photo with a new media file; 0 for never.
    pub media_every: u32,
    /// SQLite's `wal_autocheckpoint` in pages; 0 never checkpoints, so every commit stays in
    /// the `-wal` (SQLite's default is 1000).
    pub wal_autocheckpoint: u32,
}

impl Default for LiveConfig {
    /// 50 messages/s, up to 16 per transaction, a new photo every 20 messages, SQLite's
    /// default checkpoints.
    fn default() -> Self {
        LiveConfig {
            seed: 7,
            messages_per_sec: 50.0,
            max_batch: 16,
            media_every: 20,
            wal_autocheckpoint: 1000,
        }
    }
}

/// What a live writer did, returned by [`LiveWriter::stop`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LiveStats {
    /// Messages committed.
    pub messages: u64,
    /// Id of the last committed message (0 if none).
    pub last_message_id: u64,
    /// Transactions committed.
    pub transactions: u64,
    /// New media files written.
    pub media_files: u64,
    /// Their total size.
    pub media_bytes: u64,
}

/// One committed transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Commit {
    /// When `COMMIT` returned (the transaction was durable by then).
    pub at: Instant,
    /// Id of the last message of the transaction (ids are consecutive).
    pub last_id: u64,
}

#[derive(Default)]
struct Counters {
    messages: AtomicU64,
    last_id: AtomicU64,
    commits: Mutex<Vec<Commit>>,
}

/// Handle to a running live writer; see the module docs.
pub struct LiveWriter {
    stop: Option<SyncSender<()>>,
    thread: Option<JoinHandle<anyhow::Result<LiveStats>>>,
    counters: Arc<Counters>,
    database: PathBuf,
    first_id: u64,
}

impl LiveWriter {
    /// Start writing into the history at `dir` (made by [`super::generate`]).
    pub fn start(dir: &Path, cfg: LiveConfig) -> anyhow::Result<Self> {
        if !(cfg.messages_per_sec.is_finite() && cfg.messages_per_sec > 0.0) {
            bail!("messages_per_sec must be positive");
        }
        let database = newest_message_db(dir)?;
        let conn =
            Connection::open(&database).with_context(|| format!("open {}", database.display()))?;
        conn.busy_timeout(Duration::from_secs(5))?;
        let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            bail!("{}: journal_mode is {mode}", database.display());
        }
        conn.pragma_update(None, "wal_autocheckpoint", cfg.wal_autocheckpoint)?;
        let state = WriterState::load(dir, conn, cfg)?;
        let first_id = state.next_id as u64;
        let counters = Arc::new(Counters::default());
        let (tx, rx) = mpsc::sync_channel(1);
        let c = Arc::clone(&counters);
        let thread = std::thread::Builder::new()
            .name("ferry-live-writer".into())
            .spawn(move || state.run(&rx, &c))
            .context("spawn live writer thread")?;
        Ok(LiveWriter {
            stop: Some(tx),
            thread: Some(thread),
            counters,
            database,
            first_id,
        })
    }

    /// Id of the first message this writer commits (ids are consecutive from here).
    pub fn first_message_id(&self) -> u64 {
        self.first_id
    }

    /// Id of the last message whose transaction had committed by `t` (`first_message_id() - 1`
    /// if none had).
    pub fn committed_before(&self, t: Instant) -> u64 {
        let log = self
            .counters
            .commits
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let n = log.partition_point(|c| c.at <= t);
        n.checked_sub(1)
            .map_or(self.first_id.saturating_sub(1), |i| log[i].last_id)
    }

    /// Every transaction committed so far, in order.
    pub fn commits(&self) -> Vec<Commit> {
        self.counters
            .commits
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Messages committed so far.
    pub fn messages_committed(&self) -> u64 {
        self.counters.messages.load(Ordering::Acquire)
    }

    /// Id of the last committed message (0 before the first commit).
    pub fn last_message_id(&self) -> u64 {
        self.counters.last_id.load(Ordering::Acquire)
    }

    /// The database being written.
    pub fn database(&self) -> &Path {
        &self.database
    }

    /// Stop after the current transaction, wait for the thread, and report what was written.
    pub fn stop(mut self) -> anyhow::Result<LiveStats> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> anyhow::Result<LiveStats> {
        // Dropping the sender wakes the thread (Disconnected) even if the channel is full.
        drop(self.stop.take());
        match self.thread.take() {
            Some(t) => t
                .join()
                .map_err(|_| anyhow!("live writer thread panicked"))?,
            None => Ok(LiveStats::default()),
        }
    }
}

impl Drop for LiveWriter {
    fn drop(&mut self) {
        // Errors cannot be reported from drop; call `stop()` to see them.
        let _ = self.shutdown();
    }
}

fn newest_message_db(dir: &Path) -> anyhow::Result<PathBuf> {
    let db_dir = dir.join("db");
    let mut best: Option<(u32, PathBuf)> = None;
    for entry in std::fs::read_dir(&db_dir).with_context(|| format!("read {}", db_dir.display()))? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(n) = name
            .to_str()
            .and_then(|s| s.strip_prefix("msg_"))
            .and_then(|s| s.strip_suffix(".db"))
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if best.as_ref().is_none_or(|(b, _)| n > *b) {
            best = Some((n, entry.path()));
        }
    }
    best.map(|(_, p)| p)
        .ok_or_else(|| anyhow!("no db/msg_N.db under {}", dir.display()))
}

struct WriterState {
    dir: PathBuf,
    conn: Connection,
    cfg: LiveConfig,
    rng: ChaCha8Rng,
    convs: Vec<(i64, i64)>,
    next_id: i64,
    ts: i64,
    stats: LiveStats,
    buf: Vec<u8>,
}

impl WriterState {
    fn load(dir: &Path, conn: Connection, cfg: LiveConfig) -> anyhow::Result<Self> {
        let convs = {
            let mut st = conn.prepare("SELECT id, contact_id FROM conversations ORDER BY id")?;
            let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect::<rusqlite::Result<Vec<(i64, i64)>>>()?
        };
        if convs.is_empty() {
            bail!("no conversations in the database");
        }
        let (max_id, max_ts): (Option<i64>, Option<i64>) =
            conn.query_row("SELECT max(id), max(ts) FROM messages", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })?;
        Ok(WriterState {
            dir: dir.to_path_buf(),
            conn,
            rng: ChaCha8Rng::seed_from_u64(cfg.seed),
            cfg,
            convs,
            next_id: max_id.unwrap_or(0) + 1,
            ts: max_ts.unwrap_or(1_600_000_000),
            stats: LiveStats::default(),
            buf: Vec::new(),
        })
    }

    fn run(mut self, stop: &mpsc::Receiver<()>, counters: &Counters) -> anyhow::Result<LiveStats> {
        let start = Instant::now();
        let rate = self.cfg.messages_per_sec;
        loop {
            let due = (start.elapsed().as_secs_f64() * rate) as u64;
            let pending = due
                .saturating_sub(self.stats.messages)
                .min(u64::from(self.cfg.max_batch.max(1)));
            if pending > 0 {
                self.commit_batch(pending)?;
                counters
                    .commits
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(Commit {
                        at: Instant::now(),
                        last_id: self.stats.last_message_id,
                    });
                counters
                    .messages
                    .store(self.stats.messages, Ordering::Release);
                counters
                    .last_id
                    .store(self.stats.last_message_id, Ordering::Release);
            }
            let next_due = Duration::from_secs_f64((self.stats.messages + 1) as f64 / rate);
            let wait = next_due
                .saturating_sub(start.elapsed())
                .min(Duration::from_millis(100));
            match stop.recv_timeout(wait) {
                Ok(()) | Err(RecvTimeoutError::Disconnected) => return Ok(self.stats),
                Err(RecvTimeoutError::Timeout) => {}
            }
        }
    }

    fn commit_batch(&mut self, n: u64) -> anyhow::Result<()> {
        let tx = self.conn.transaction()?;
        for _ in 0..n {
            let (conv, contact) = self.convs[self.rng.random_range(0..self.convs.len())];
            let sender = if self.rng.random_bool(0.5) {
                0
            } else {
                contact
            };
            self.ts += 1;
            let id = self.next_id;
            let number = self.stats.messages + 1;
            let photo_due =
                self.cfg.media_every > 0 && number.is_multiple_of(u64::from(self.cfg.media_every));
            let (k, body, att) = if photo_due {
                let rel =
                    write_live_photo(&self.dir, &mut self.rng, &mut self.buf, &mut self.stats)?;
                (kind::IMAGE, "[图片]".to_string(), Some(rel))
            } else {
                // Text only: photos come from `media_every`, each with a fresh file.
                let text_only = MessageSource {
                    images: Vec::new(),
                    voices: Vec::new(),
                    videos: Vec::new(),
                };
                text_only.message(&mut self.rng, Lang::Mixed)
            };
            tx.prepare_cached(
                "INSERT INTO messages(id, conv_id, sender_id, ts, kind, body, attachment)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?
            .execute(params![id, conv, sender, self.ts, k, body, att])?;
            tx.prepare_cached(
                "UPDATE conversations SET last_msg_id = ?1, last_ts = ?2, unread = unread + 1
                 WHERE id = ?3",
            )?
            .execute(params![id, self.ts, conv])?;
            self.next_id += 1;
            self.stats.messages += 1;
            self.stats.last_message_id = id as u64;
        }
        tx.commit()?;
        self.stats.transactions += 1;
        Ok(())
    }
}

/// A new photo, written before the message that references it is committed (as an app does).
fn write_live_photo(
    dir: &Path,
    rng: &mut ChaCha8Rng,
    buf: &mut Vec<u8>,
    stats: &mut LiveStats,
) -> anyhow::Result<String> {
    let mut name = String::new();
    for _ in 0..2 {
        name.push_str(&format!("{:016x}", rng.next_u64()));
    }
    let folder = dir.join("media").join(&name[..2]);
    std::fs::create_dir_all(&folder).with_context(|| format!("create {}", folder.display()))?;
    let size = rng.random_range(20_000..500_000u64);
    let rel = format!("media/{}/{name}.jpg", &name[..2]);
    let path = dir.join(&rel);
    media::write_blob(&path, BlobKind::Image, size, rng.next_u64(), buf)
        .with_context(|| format!("write {}", path.display()))?;
    stats.media_files += 1;
    stats.media_bytes += size;
    Ok(rel)
}
