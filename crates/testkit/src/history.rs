//! A realistic chat-history generator, the stand-in for the data folder of a chat app.
//!
//! [`generate`] lays out, under an empty directory:
//!
//! ```text
//! db/msg_0.db … msg_N.db   message databases (SQLite, WAL mode), split like a real app by size
//! db/msg_N.db-wal          the newest database still has un-checkpointed frames (unless
//!                          `checkpoint_wal`), as a running app would leave it
//! db/contact.db(-wal)      contacts
//! media/ab/abcdef….jpg     photos, thumbnails (th_….jpg), voice notes (.amr/.silk), videos (.mp4):
//!                          high-entropy bytes behind real magic headers; some are forwarded
//!                          copies (byte-identical, other path)
//! cache/sticker/ab/….gif   the `small_files` knob: many 2–20 KB files
//! logs/, config/           text that compresses well
//! Documents/               names with Chinese, emoji and spaces
//! + a few empty files and empty directories
//! ```
//!
//! Everything is derived from [`HistorySpec::seed`]: the same spec gives a byte-identical tree
//! (the `-wal` salts, random in SQLite, are rewritten from the seed, see `wal.rs`). That holds
//! for one build: another SQLite or `rand` version (a `Cargo.lock` change) may lay out bytes
//! differently. Modification times and permissions are whatever the file system gives.
//! No `-shm` files are left: SQLite rebuilds the index from the `-wal` on first open, as after
//! a crash. Opening a database (even to read it) may checkpoint and so change the tree: compare
//! or copy first, inspect after.
//!
//! If generation fails the directory is left partly written; callers use a fresh temp dir.
//!
//! [`LiveWriter`] keeps writing messages and media into a generated history, standing in for
//! the app while it runs. [`tree_diff`] / [`assert_trees_equal`] compare two trees.

mod live;
mod media;
mod text;
mod tree;
mod wal;

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context as _};
use rand::{Rng, RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rusqlite::{params, Connection};

pub use live::{Commit, LiveConfig, LiveStats, LiveWriter};
pub use tree::{
    assert_histories_equal, assert_trees_equal, database_digest, history_diff, integrity_check,
    is_sqlite, tree_diff, Difference, EntryKind,
};

use media::BlobKind;
use text::Lang;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

/// What to generate. Start from [`HistorySpec::default`] or [`HistorySpec::with_size`] and
/// override fields.
#[derive(Debug, Clone, PartialEq)]
pub struct HistorySpec {
    /// Seed for everything; the same spec gives a byte-identical tree.
    pub seed: u64,
    /// Target total size of the tree in bytes (the result lands within a few percent),
    /// not counting `small_files`.
    pub total_bytes: u64,
    /// Extra files of 2–20 KB (sticker cache) on top of `total_bytes`, for many-small-files runs.
    pub small_files: u32,
    /// Fraction (0.0–1.0) of media files that are forwarded copies: exact byte copies of
    /// another media file at a different path.
    pub duplicate_fraction: f32,
    /// Checkpoint every database fully (no `-wal` left). By default the newest message
    /// database and `contact.db` keep un-checkpointed frames in their `-wal`.
    pub checkpoint_wal: bool,
    /// Message databases roll over to a new `msg_N.db` at about this size, as chat apps do
    /// (at most 16 databases; the rest of the budget then grows each one).
    pub max_db_bytes: u64,
}

impl Default for HistorySpec {
    /// 64 MiB, seed 1, no extra small files, 10% forwarded media, WAL left un-checkpointed,
    /// message databases split at 256 MiB.
    fn default() -> Self {
        HistorySpec {
            seed: 1,
            total_bytes: 64 * MIB,
            small_files: 0,
            duplicate_fraction: 0.1,
            checkpoint_wal: false,
            max_db_bytes: 256 * MIB,
        }
    }
}

impl HistorySpec {
    /// The default spec with another target size.
    pub fn with_size(total_bytes: u64) -> Self {
        HistorySpec {
            total_bytes,
            ..HistorySpec::default()
        }
    }
}

/// What [`generate`] produced (counted by walking the finished tree, except `messages` and
/// the media counts).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HistoryReport {
    /// Regular files, including empty ones and `-wal` files.
    pub files: u64,
    /// Directories below the root (the root itself not counted).
    pub dirs: u64,
    /// Sum of regular file sizes.
    pub bytes: u64,
    /// Messages in all message databases (including those only in a `-wal`).
    pub messages: u64,
    /// The message databases, newest last, then `contact.db` (absolute paths).
    pub databases: Vec<PathBuf>,
    /// Media files (photos, thumbnails, voice, video), duplicates included.
    pub media_files: u64,
    /// Media files that are byte copies of another media file.
    pub duplicate_files: u64,
    /// Total size of `-wal` files left behind.
    pub wal_bytes: u64,
}

/// How the target size is split: databases ~12%, text ~1%; media get what is left after the
/// databases and the files actually written for text and documents.
struct Budget {
    db: u64,
    text: u64,
}

impl Budget {
    fn split(total: u64) -> Self {
        let db = (total / 8).max(96 * KIB);
        let text = (total / 100).clamp(8 * KIB, 64 * MIB);
        Budget { db, text }
    }
}

/// A planned media file, for attachment references and forwarded copies.
struct MediaFile {
    rel: String,
    kind: BlobKind,
    size: u64,
    content_seed: u64,
}

/// Generate a history under `dir` (created if missing; must be empty).
pub fn generate(dir: &Path, spec: &HistorySpec) -> anyhow::Result<HistoryReport> {
    ensure!(spec.total_bytes > 0, "total_bytes must be positive");
    ensure!(
        (0.0..=1.0).contains(&spec.duplicate_fraction),
        "duplicate_fraction must be within 0.0..=1.0, got {}",
        spec.duplicate_fraction
    );
    fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    if fs::read_dir(dir)
        .with_context(|| format!("read {}", dir.display()))?
        .next()
        .is_some()
    {
        bail!("{} is not empty", dir.display());
    }
    let mut rng = ChaCha8Rng::seed_from_u64(spec.seed);
    let budget = Budget::split(spec.total_bytes);
    let mut report = HistoryReport::default();
    let mut buf = Vec::new();
    let fixed = write_text_files(dir, &mut rng, budget.text)?
        + write_documents(dir, &mut rng, spec.total_bytes, &mut buf)?;
    write_empties(dir)?;
    let media_budget = spec.total_bytes.saturating_sub(budget.db + fixed);
    // Media are planned first (names, sizes, content seeds: all the randomness, drawn in a
    // fixed order), then written by a second thread while this one builds the databases,
    // which are CPU-bound. Thread timing cannot change the output.
    let media = plan_media(&mut rng, media_budget, spec, &mut report);
    std::thread::scope(|scope| {
        let writer = scope.spawn(|| write_media(dir, &media));
        let rest = (|| {
            write_small_files(dir, &mut rng, spec.small_files, &mut buf)?;
            write_databases(dir, &mut rng, budget.db, spec, &media, &mut report)
        })();
        let written = writer
            .join()
            .map_err(|_| anyhow::anyhow!("media writer thread panicked"))?;
        written.and(rest)
    })?;

    let (files, dirs, bytes, wal_bytes) = count_tree(dir)?;
    report.files = files;
    report.dirs = dirs;
    report.bytes = bytes;
    report.wal_bytes = wal_bytes;
    Ok(report)
}

fn hex_name(rng: &mut ChaCha8Rng) -> String {
    let mut s = String::with_capacity(32);
    for _ in 0..2 {
        let _ = write!(s, "{:016x}", rng.next_u64());
    }
    s
}

fn create_dir(path: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(path).with_context(|| format!("create {}", path.display()))
}

fn plan_media(
    rng: &mut ChaCha8Rng,
    budget: u64,
    spec: &HistorySpec,
    report: &mut HistoryReport,
) -> Vec<MediaFile> {
    // No single file above 1/16 of the media budget, so small histories still hold every kind.
    let cap = (budget / 16).max(32 * KIB);
    let mut files: Vec<MediaFile> = Vec::new();
    let mut used = 0u64;
    while budget.saturating_sub(used) >= KIB {
        let remaining = budget - used;
        let name = hex_name(rng);
        // A forwarded copy of an earlier file, if one still fits in the budget.
        let original = if !files.is_empty() && rng.random::<f32>() < spec.duplicate_fraction {
            Some(&files[rng.random_range(0..files.len())]).filter(|o| o.size <= remaining)
        } else {
            None
        };
        let dup = original.is_some();
        let (kind, size, content_seed) = match original {
            Some(o) => (o.kind, o.size, o.content_seed),
            None => {
                // By count: mostly thumbnails and voice notes; by bytes: photos and videos.
                let kind = match rng.random_range(0..100u32) {
                    0..=44 => BlobKind::Thumb,
                    45..=61 => BlobKind::VoiceAmr,
                    62..=73 => BlobKind::VoiceSilk,
                    74..=96 => BlobKind::Image,
                    _ => BlobKind::Video,
                };
                (kind, media::sample_size(rng, kind, cap), rng.next_u64())
            }
        };
        let prefix = if kind == BlobKind::Thumb { "th_" } else { "" };
        let size = size.min(remaining);
        used += size;
        report.media_files += 1;
        if dup {
            report.duplicate_files += 1;
        }
        files.push(MediaFile {
            rel: format!("media/{}/{prefix}{name}.{}", &name[..2], kind.ext()),
            kind,
            size,
            content_seed,
        });
    }
    files
}

fn write_media(dir: &Path, files: &[MediaFile]) -> anyhow::Result<()> {
    let mut buf = Vec::new();
    for f in files {
        let path = dir.join(&f.rel);
        if let Some(folder) = path.parent() {
            create_dir(folder)?;
        }
        media::write_blob(&path, f.kind, f.size, f.content_seed, &mut buf)
            .with_context(|| format!("write {}", path.display()))?;
    }
    Ok(())
}

fn write_small_files(
    dir: &Path,
    rng: &mut ChaCha8Rng,
    count: u32,
    buf: &mut Vec<u8>,
) -> anyhow::Result<()> {
    for _ in 0..count {
        let name = hex_name(rng);
        let folder = dir.join("cache/sticker").join(&name[..2]);
        create_dir(&folder)?;
        let size = rng.random_range(2 * KIB..=20 * KIB);
        let path = folder.join(format!("{name}.gif"));
        media::write_blob(&path, BlobKind::Sticker, size, rng.next_u64(), buf)
            .with_context(|| format!("write {}", path.display()))?;
    }
    Ok(())
}

fn write_file(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    fs::write(path, data).with_context(|| format!("write {}", path.display()))
}

/// Logs (several per-day files) and JSON config: text that compresses well.
fn write_text_files(dir: &Path, rng: &mut ChaCha8Rng, budget: u64) -> anyhow::Result<u64> {
    create_dir(&dir.join("logs"))?;
    create_dir(&dir.join("config"))?;
    let config = format!(
        concat!(
            "{{\n  \"version\": \"8.0.{}\",\n  \"account\": \"wxid_{}\",\n",
            "  \"language\": \"zh_CN\",\n  \"auto_download\": {{\"wifi\": true, \"cellular\": false}},\n",
            "  \"font_scale\": 1.0,\n  \"notifications\": {{\"sound\": true, \"vibrate\": true, \"preview\": false}},\n",
            "  \"backup\": {{\"last\": null, \"encrypted\": true}}\n}}\n"
        ),
        rng.random_range(10..60u32),
        &hex_name(rng)[..12],
    );
    write_file(&dir.join("config/settings.json"), config.as_bytes())?;
    let mut used = config.len() as u64;
    let days = (budget / (256 * KIB)).clamp(1, 30);
    let per_day = budget.saturating_sub(used) / days;
    let mut ts: i64 = 1_700_000_000;
    for day in 0..days {
        let mut log = String::new();
        while (log.len() as u64) < per_day && used + (log.len() as u64) < budget {
            ts += rng.random_range(1..30i64);
            text::log_line(rng, ts, &mut log);
        }
        used += log.len() as u64;
        write_file(
            &dir.join(format!("logs/app_2023-11-{:02}.log", day + 1)),
            log.as_bytes(),
        )?;
    }
    Ok(used)
}

/// A small folder of user documents with awkward names; returns the bytes written.
fn write_documents(
    dir: &Path,
    rng: &mut ChaCha8Rng,
    total: u64,
    buf: &mut Vec<u8>,
) -> anyhow::Result<u64> {
    let docs = dir.join("Documents");
    create_dir(&docs.join("旅行 2023 🏖️"))?;
    let notes =
        "会议纪要：下周一上午十点，三楼会议室。\nMeeting notes: Monday 10:00, room 3.\n".repeat(40);
    let md = "# Notes 📝\n\n- buy milk 🥛\n- 给妈妈打电话 ☎️\n";
    write_file(&docs.join("会议纪要 2023.txt"), notes.as_bytes())?;
    write_file(&docs.join("emoji 😀 notes.md"), md.as_bytes())?;
    let mut bytes = (notes.len() + md.len()) as u64;
    for (name, kind) in [
        ("report final (1).pdf", BlobKind::Pdf),
        ("旅行 2023 🏖️/海边 日落.jpg", BlobKind::Image),
        ("旅行 2023 🏖️/IMG 0001.jpg", BlobKind::Thumb),
    ] {
        let (lo, _) = kind.size_range();
        let size = rng.random_range(lo..lo * 3).min((total / 64).max(4 * KIB));
        let path = docs.join(name);
        media::write_blob(&path, kind, size, rng.next_u64(), buf)
            .with_context(|| format!("write {}", path.display()))?;
        bytes += size;
    }
    Ok(bytes)
}

/// A few empty files and empty directories, as real app folders have.
fn write_empties(dir: &Path) -> anyhow::Result<()> {
    for d in ["cache/tmp", "media/temp", "Documents/新建文件夹"] {
        create_dir(&dir.join(d))?;
    }
    create_dir(&dir.join("cache"))?;
    for f in ["media/.nomedia", "cache/lock", "Documents/空文件.txt"] {
        write_file(&dir.join(f), b"")?;
    }
    Ok(())
}

/// A conversation: its partner (contact id), whether it is a group, and its language.
struct Conversation {
    id: i64,
    contact_id: i64,
    members: Vec<i64>,
    lang: Lang,
    title: String,
}

/// Run a statement that may return rows (most PRAGMAs do) and discard them.
fn run(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    let mut stmt = conn.prepare(sql)?;
    let mut rows = stmt.query([])?;
    while rows.next()?.is_some() {}
    Ok(())
}

pub(crate) const MSG_SCHEMA: &str = "
CREATE TABLE conversations(
    id INTEGER PRIMARY KEY, contact_id INTEGER NOT NULL, title TEXT NOT NULL,
    is_group INTEGER NOT NULL, last_msg_id INTEGER, last_ts INTEGER, unread INTEGER NOT NULL DEFAULT 0);
CREATE TABLE messages(
    id INTEGER PRIMARY KEY, conv_id INTEGER NOT NULL, sender_id INTEGER NOT NULL,
    ts INTEGER NOT NULL, kind INTEGER NOT NULL, body TEXT NOT NULL, attachment TEXT);
CREATE INDEX messages_conv_ts ON messages(conv_id, ts);
";

/// Message kinds stored in `messages.kind`.
pub(crate) mod kind {
    pub(crate) const TEXT: i64 = 1;
    pub(crate) const IMAGE: i64 = 3;
    pub(crate) const VOICE: i64 = 34;
    pub(crate) const VIDEO: i64 = 43;
}

/// Source of message rows, shared by the generator and the live writer.
pub(crate) struct MessageSource<'a> {
    pub(crate) images: Vec<&'a str>,
    pub(crate) voices: Vec<&'a str>,
    pub(crate) videos: Vec<&'a str>,
}

impl MessageSource<'_> {
    /// `(kind, body, attachment)` for one message.
    pub(crate) fn message(
        &self,
        rng: &mut ChaCha8Rng,
        lang: Lang,
    ) -> (i64, String, Option<String>) {
        let roll = rng.random_range(0..100u32);
        let pick = |rng: &mut ChaCha8Rng, list: &[&str]| {
            (!list.is_empty()).then(|| list[rng.random_range(0..list.len())].to_string())
        };
        let (k, att) = match roll {
            0..=8 => (kind::IMAGE, pick(rng, &self.images)),
            9..=13 => (kind::VOICE, pick(rng, &self.voices)),
            14..=15 => (kind::VIDEO, pick(rng, &self.videos)),
            _ => (kind::TEXT, None),
        };
        match att {
            Some(a) => {
                let body = match k {
                    kind::IMAGE => "[图片]",
                    kind::VOICE => "[语音]",
                    _ => "[视频]",
                };
                (k, body.to_string(), Some(a))
            }
            None => (kind::TEXT, text::message_body(rng, lang), None),
        }
    }
}

fn write_databases(
    dir: &Path,
    rng: &mut ChaCha8Rng,
    budget: u64,
    spec: &HistorySpec,
    media: &[MediaFile],
    report: &mut HistoryReport,
) -> anyhow::Result<()> {
    create_dir(&dir.join("db"))?;
    let contacts = (budget / (8 * KIB)).clamp(10, 3000) as i64;
    let contact_bytes = contacts as u64 * 200 + 32 * KIB;
    let msg_budget = budget.saturating_sub(contact_bytes).max(64 * KIB);
    let n_dbs = msg_budget
        .div_ceil(spec.max_db_bytes.max(64 * KIB))
        .clamp(1, 16);
    let per_db = msg_budget / n_dbs;

    let mut convs = Vec::new();
    let n_convs = (contacts / 2).clamp(5, 1000);
    for id in 1..=n_convs {
        let is_group = rng.random_range(0..5u32) == 0;
        let contact_id = rng.random_range(1..=contacts);
        let members = if is_group {
            let n = rng.random_range(3..=40usize);
            (0..n).map(|_| rng.random_range(1..=contacts)).collect()
        } else {
            vec![contact_id]
        };
        let title = text::nickname(rng);
        convs.push(Conversation {
            id,
            contact_id,
            members,
            lang: Lang::pick(rng),
            title: if is_group {
                format!("{title}的群聊")
            } else {
                title
            },
        });
    }
    let source = MessageSource {
        images: media
            .iter()
            .filter(|m| matches!(m.kind, BlobKind::Image | BlobKind::Thumb))
            .map(|m| m.rel.as_str())
            .collect(),
        voices: media
            .iter()
            .filter(|m| matches!(m.kind, BlobKind::VoiceAmr | BlobKind::VoiceSilk))
            .map(|m| m.rel.as_str())
            .collect(),
        videos: media
            .iter()
            .filter(|m| m.kind == BlobKind::Video)
            .map(|m| m.rel.as_str())
            .collect(),
    };

    // About three years of history, spread over the expected number of messages.
    let expected = (msg_budget / 150).max(1);
    let mean_gap = (94_608_000 / expected).clamp(1, 3600) as f64;
    let mut clock = MessageClock {
        ts: 1_600_000_000,
        mean_gap,
        next_id: 1,
    };
    for i in 0..n_dbs {
        let path = dir.join(format!("db/msg_{i}.db"));
        let newest = i + 1 == n_dbs;
        let keep_wal = newest && !spec.checkpoint_wal;
        report.messages += write_message_db(
            &path, rng, per_db, &convs, &source, &mut clock, newest, keep_wal,
        )
        .with_context(|| format!("generate {}", path.display()))?;
        report.databases.push(path);
    }
    let path = dir.join("db/contact.db");
    write_contact_db(&path, rng, contacts, !spec.checkpoint_wal)
        .with_context(|| format!("generate {}", path.display()))?;
    report.databases.push(path);
    Ok(())
}

struct MessageClock {
    ts: i64,
    mean_gap: f64,
    next_id: i64,
}

impl MessageClock {
    fn tick(&mut self, rng: &mut ChaCha8Rng) -> (i64, i64) {
        // Exponential gaps: bursts of quick replies, occasional long silences.
        let u: f64 = rng.random_range(1e-9..1.0);
        self.ts += (-u.ln() * self.mean_gap) as i64 + 1;
        let id = self.next_id;
        self.next_id += 1;
        (id, self.ts)
    }
}

fn insert_messages(
    conn: &Connection,
    rng: &mut ChaCha8Rng,
    n: u64,
    convs: &[Conversation],
    source: &MessageSource<'_>,
    clock: &mut MessageClock,
    update_conversation: bool,
) -> rusqlite::Result<()> {
    let mut ins = conn.prepare_cached(
        "INSERT INTO messages(id, conv_id, sender_id, ts, kind, body, attachment)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?;
    let mut upd = conn.prepare_cached(
        "UPDATE conversations SET last_msg_id = ?1, last_ts = ?2, unread = unread + 1 WHERE id = ?3",
    )?;
    for _ in 0..n {
        let conv = &convs[rng.random_range(0..convs.len())];
        let sender = if rng.random_bool(0.45) {
            0 // the device owner
        } else {
            conv.members[rng.random_range(0..conv.members.len())]
        };
        let (id, ts) = clock.tick(rng);
        let (k, body, att) = source.message(rng, conv.lang);
        ins.execute(params![id, conv.id, sender, ts, k, body, att])?;
        if update_conversation {
            upd.execute(params![id, ts, conv.id])?;
        }
    }
    Ok(())
}

fn db_size(conn: &Connection) -> rusqlite::Result<u64> {
    let pages: i64 = conn.query_row("PRAGMA page_count", [], |r| r.get(0))?;
    let size: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
    Ok((pages.max(0) as u64) * (size.max(0) as u64))
}

/// Open a fresh database for bulk loading: no journal, no syncs, a large page cache. Nothing
/// else reads the file until it is finished, and a failed generation is discarded anyway.
fn open_bulk(path: &Path) -> anyhow::Result<Connection> {
    let conn = Connection::open(path)?;
    run(&conn, "PRAGMA journal_mode=OFF")?;
    run(&conn, "PRAGMA synchronous=OFF")?;
    run(&conn, "PRAGMA cache_size=-131072")?;
    Ok(conn)
}

/// Switch to WAL mode with automatic checkpoints off, so the following writes stay in `-wal`.
fn enter_wal(conn: &Connection) -> anyhow::Result<()> {
    let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
    ensure!(mode.eq_ignore_ascii_case("wal"), "journal_mode is {mode}");
    run(conn, "PRAGMA wal_autocheckpoint=0")?;
    Ok(())
}

/// Close the database either fully checkpointed (no `-wal` left) or with its frames still in
/// `-wal`, which is then made reproducible; the `-shm` index is removed (SQLite rebuilds it).
fn finish_db(
    conn: Connection,
    path: &Path,
    rng: &mut ChaCha8Rng,
    keep_wal: bool,
) -> anyhow::Result<()> {
    let salts = (rng.next_u32(), rng.next_u32());
    if keep_wal {
        conn.set_db_config(
            rusqlite::config::DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE,
            true,
        )?;
    } else {
        run(&conn, "PRAGMA wal_checkpoint(TRUNCATE)")?;
    }
    conn.close().map_err(|(_, e)| e)?;
    let wal = sidecar(path, "-wal");
    if keep_wal {
        wal::normalize_wal(&wal, salts)?;
    } else {
        remove_if_exists(&wal)?;
    }
    remove_if_exists(&sidecar(path, "-shm"))
}

fn remove_if_exists(path: &Path) -> anyhow::Result<()> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("remove {}", path.display())),
    }
}

pub(crate) fn sidecar(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

#[allow(clippy::too_many_arguments)]
fn write_message_db(
    path: &Path,
    rng: &mut ChaCha8Rng,
    budget: u64,
    convs: &[Conversation],
    source: &MessageSource<'_>,
    clock: &mut MessageClock,
    newest: bool,
    keep_wal: bool,
) -> anyhow::Result<u64> {
    let mut conn = open_bulk(path)?;
    conn.execute_batch(MSG_SCHEMA)?;
    {
        let tx = conn.transaction()?;
        {
            let mut st = tx.prepare(
                "INSERT INTO conversations(id, contact_id, title, is_group) VALUES (?1, ?2, ?3, ?4)",
            )?;
            for c in convs {
                st.execute(params![c.id, c.contact_id, c.title, c.members.len() > 1])?;
            }
        }
        tx.commit()?;
    }
    // The newest database gets its latest activity as many small WAL transactions.
    let tail_txns = if newest {
        (budget / (64 * KIB)).clamp(2, 200)
    } else {
        0
    };
    // Each tail transaction leaves ~4–6 pages (table, index, conversation) in the WAL.
    let bulk_target = budget.saturating_sub(tail_txns * 24 * KIB);
    let first_id = clock.next_id;
    loop {
        let size = db_size(&conn)?;
        if size >= bulk_target {
            break;
        }
        let batch = ((bulk_target - size) / 160).clamp(50, 50_000);
        let tx = conn.transaction()?;
        insert_messages(&tx, rng, batch, convs, source, clock, false)?;
        tx.commit()?;
    }
    run(
        &conn,
        "UPDATE conversations SET
            last_msg_id = (SELECT max(id) FROM messages m WHERE m.conv_id = conversations.id),
            last_ts = (SELECT max(ts) FROM messages m WHERE m.conv_id = conversations.id)",
    )?;
    enter_wal(&conn)?;
    for _ in 0..tail_txns {
        let n = rng.random_range(1..=4u64);
        let tx = conn.transaction()?;
        insert_messages(&tx, rng, n, convs, source, clock, true)?;
        tx.commit()?;
    }
    finish_db(conn, path, rng, keep_wal)?;
    Ok((clock.next_id - first_id) as u64)
}

fn write_contact_db(
    path: &Path,
    rng: &mut ChaCha8Rng,
    contacts: i64,
    keep_wal: bool,
) -> anyhow::Result<()> {
    let mut conn = open_bulk(path)?;
    conn.execute_batch(
        "CREATE TABLE contacts(
            id INTEGER PRIMARY KEY, user_name TEXT NOT NULL UNIQUE, nickname TEXT NOT NULL,
            remark TEXT, avatar TEXT, added_ts INTEGER NOT NULL);",
    )?;
    let tx = conn.transaction()?;
    {
        let mut st = tx.prepare(
            "INSERT INTO contacts(id, user_name, nickname, remark, avatar, added_ts)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?;
        for id in 1..=contacts {
            let name = hex_name(rng);
            let remark = rng.random_bool(0.3).then(|| text::nickname(rng));
            st.execute(params![
                id,
                format!("wxid_{}", &name[..14]),
                text::nickname(rng),
                remark,
                format!("avatar/{}/{}.jpg", &name[..2], &name[2..]),
                1_500_000_000 + rng.random_range(0..100_000_000i64),
            ])?;
        }
    }
    tx.commit()?;
    enter_wal(&conn)?;
    let tx = conn.transaction()?;
    tx.execute(
        "UPDATE contacts SET remark = ?1 WHERE id = ?2",
        params![text::nickname(rng), rng.random_range(1..=contacts)],
    )?;
    tx.commit()?;
    finish_db(conn, path, rng, keep_wal)
}

/// `(files, dirs, bytes, wal_bytes)` below `dir`.
fn count_tree(dir: &Path) -> anyhow::Result<(u64, u64, u64, u64)> {
    let (mut files, mut dirs, mut bytes, mut wal) = (0, 0, 0, 0);
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).with_context(|| format!("read {}", d.display()))? {
            let entry = entry?;
            let meta = entry.metadata()?;
            if meta.is_dir() {
                dirs += 1;
                stack.push(entry.path());
            } else if meta.is_file() {
                files += 1;
                bytes += meta.len();
                if entry.file_name().to_string_lossy().ends_with("-wal") {
                    wal += meta.len();
                }
            }
        }
    }
    Ok((files, dirs, bytes, wal))
}

#[cfg(test)]
mod tests;
