//! Consistent snapshots of live SQLite databases.
//!
//! A chat app keeps writing its databases while ferry reads them. Copying such a file byte by
//! byte yields a torn database, and copying the main file without its `-wal` loses every commit
//! not yet checkpointed. So the scan recognises SQLite databases by their 16-byte header
//! (`"SQLite format 3\0"`) and copies each through SQLite itself into a snapshot folder in
//! ferry's state directory; the manifest then describes the snapshot under the database's own
//! path, and the sender reads chunks from the snapshot.
//!
//! # How
//! The snapshot uses SQLite's online backup API with a single `step(-1)`: one read transaction
//! on the live database copies every page, so the copy is exactly the state of one commit —
//! with every commit still sitting in the `-wal` — while the app keeps writing (a WAL reader
//! does not block writers; in rollback-journal mode the read waits for the writer's commit, up
//! to a busy timeout). `VACUUM INTO` would give the same consistency but rebuilds every table
//! and index (slower, and the bytes are no longer the app's pages); a page copy is the cheaper,
//! more faithful choice. The live database is opened read-only: ferry never checkpoints, writes
//! or deletes the app's files (SQLite may create the `-shm` index, as any reader does).
//!
//! The snapshot keeps the database's journal mode, and is self-contained: it needs no `-wal` or
//! `-journal` on the new device. WAL mode is persistent (bytes 18 and 19 of the file header are
//! 2; rollback modes have 1), and an app may rely on it. So the copy is first switched to
//! `journal_mode=DELETE` (whatever the backup left in its header) and, when the database is in
//! WAL mode, back to `journal_mode=WAL`, checkpointed and closed by SQLite: exactly the file of a
//! fully checkpointed WAL database, with no `-wal`/`-shm` left in the snapshot folder. (The
//! rollback modes DELETE, TRUNCATE and PERSIST are a connection's setting, not the file's: their
//! header is the same.) The same database state gives the same snapshot bytes. The database's
//! `-wal`, `-shm` and `-journal` companions are left out of the manifest.
//!
//! # Reuse
//! Each snapshot is recorded with the (size, mtime, inode) of the database and of its
//! `-wal` and `-journal` as they were *before* the copy. When they are unchanged at the next
//! scan the snapshot is reused untouched, so the hash cache serves it too and an unchanged
//! database costs a few `stat`s. (A write after that stat only makes the snapshot newer than its
//! record, and the next scan copies again.) Snapshots of databases no longer present are
//! removed when the scan finishes.
//!
//! # Privacy
//! Snapshots are whole chat databases: their folders are owner-only (`0700`) and every file in
//! them `0600` from the moment it exists. A sender claims its snapshot folder
//! ([`SnapshotStore::claim`], a lock held while it runs) and removes it when the migration ends;
//! when it starts it removes the folders a crash left for other shared folders
//! ([`SnapshotStore::remove_others`], skipping folders another running sender holds). The folder
//! of the shared folder it is sending again is kept, so a sender restarted after a crash resumes
//! with the same snapshots (same manifest, nothing hashed again).
//!
//! # When SQLite cannot read the file
//! A file with the header that SQLite refuses (damaged or encrypted past the header, or locked
//! exclusively by the app for longer than the busy timeout) is sent raw like any other file,
//! with the scan's change detection, and the scan reports why.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::backup::{Backup, StepResult};
use rusqlite::{Connection, OpenFlags};
use serde::{Deserialize, Serialize};

/// The first 16 bytes of every SQLite database file.
pub const SQLITE_HEADER: &[u8; 16] = b"SQLite format 3\0";
/// Companion files of a database, as suffixes of its name.
pub const COMPANIONS: [&str; 3] = ["-wal", "-shm", "-journal"];
/// How long a snapshot waits for a writer that holds the database locked.
pub const DEFAULT_BUSY_TIMEOUT: Duration = Duration::from_secs(2);

const INDEX_MAGIC: &[u8; 8] = b"FRRYSN01";
/// The folder of ferry's state directory that holds one snapshot folder per shared folder.
const SNAPSHOTS_DIR: &str = "snapshots";
/// Locked by the sender that uses a snapshot folder.
const IN_USE_FILE: &str = "in-use";
const INDEX_FILE: &str = "index.bin";
const MAX_INDEX_FILE: u64 = 256 << 20;

/// Why a database could not be snapshotted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotError {
    #[error("SQLite cannot read it: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("the database stayed locked by another program")]
    Busy,
    #[error("cannot write the snapshot: {0}")]
    Io(#[from] io::Error),
}

/// Whether the file at `path` starts with the SQLite header (never follows a symlink).
pub fn has_sqlite_header(path: &Path) -> io::Result<bool> {
    let mut f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    let mut head = [0u8; 16];
    let mut got = 0;
    while got < head.len() {
        match f.read(&mut head[got..])? {
            0 => return Ok(false),
            n => got += n,
        }
    }
    Ok(&head == SQLITE_HEADER)
}

/// What identifies a version of a file without reading it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileKey {
    pub size: u64,
    pub mtime: (i64, i64),
    pub ctime: (i64, i64),
    pub ino: u64,
}

impl FileKey {
    pub fn of(md: &fs::Metadata) -> Self {
        FileKey {
            size: md.len(),
            mtime: (md.mtime(), md.mtime_nsec()),
            ctime: (md.ctime(), md.ctime_nsec()),
            ino: md.ino(),
        }
    }

    /// The key of a regular file at `path`, or `None` if there is none.
    pub fn stat(path: &Path) -> Option<Self> {
        fs::symlink_metadata(path)
            .ok()
            .filter(|m| m.file_type().is_file())
            .map(|m| FileKey::of(&m))
    }
}

/// A version of a database file or companion: (size, mtime, inode). Not the ctime: SQLite
/// itself `fchown`s a `-wal` to the database's owner whenever it opens it as root, which
/// changes the ctime without any write; SQLite's writes always move the mtime.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Version {
    size: u64,
    mtime: (i64, i64),
    ino: u64,
}

impl Version {
    fn of(k: FileKey) -> Self {
        Version {
            size: k.size,
            mtime: k.mtime,
            ino: k.ino,
        }
    }
}

/// The state of a database and its companions that a snapshot was taken from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct DbKey {
    db: Version,
    wal: Option<Version>,
    journal: Option<Version>,
}

impl DbKey {
    fn stat(db: &Path) -> io::Result<Self> {
        let md = fs::symlink_metadata(db)?;
        Ok(DbKey {
            db: Version::of(FileKey::of(&md)),
            // An empty `-wal` holds no commit: as if there were none. (A read-only reader of a
            // checkpointed WAL database, as the snapshot itself, creates one and leaves it.)
            wal: FileKey::stat(&companion(db, "-wal"))
                .filter(|k| k.size > 0)
                .map(Version::of),
            journal: FileKey::stat(&companion(db, "-journal")).map(Version::of),
        })
    }

    /// The newest modification of the database or its `-wal`: when it last changed.
    fn mtime(&self) -> (i64, i64) {
        match self.wal {
            Some(w) if w.mtime > self.db.mtime => w.mtime,
            _ => self.db.mtime,
        }
    }
}

/// `path` with `suffix` appended to its file name (`msg.db` → `msg.db-wal`).
pub fn companion(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_os_string();
    s.push(suffix);
    PathBuf::from(s)
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Recorded {
    key: DbKey,
    file: String,
}

/// A snapshot ready to be hashed and sent.
#[derive(Debug, Clone)]
pub struct Captured {
    /// The snapshot file (inside the snapshot folder).
    pub file: PathBuf,
    /// The previous snapshot was still current and was kept as is.
    pub reused: bool,
    /// When the database last changed (newest of the database and its `-wal`), as
    /// (seconds, nanoseconds) since the epoch: the mtime the manifest records.
    pub source_mtime: (i64, i64),
}

/// A sender's hold on its snapshot folder (see [`SnapshotStore::claim`]).
#[derive(Debug)]
pub struct SnapshotClaim {
    dir: PathBuf,
    lock: Option<File>,
}

impl Drop for SnapshotClaim {
    fn drop(&mut self) {
        if self.lock.is_some() {
            if let Err(e) = SnapshotStore::remove(&self.dir) {
                tracing::warn!("cannot remove the snapshots in {}: {e}", self.dir.display());
            }
        }
    }
}

/// The snapshots of one shared folder: `<state>/snapshots/<hash of the folder>/`.
#[derive(Debug)]
pub struct SnapshotStore {
    dir: PathBuf,
    busy_timeout: Duration,
    index: HashMap<String, Recorded>,
    used: HashSet<String>,
}

impl SnapshotStore {
    /// The snapshot folder for shared directory `root` inside ferry's state directory.
    pub fn dir_for(state_dir: &Path, root: &Path) -> PathBuf {
        let abs = fs::canonicalize(root).unwrap_or_else(|_| root.to_path_buf());
        let h = blake3::hash(abs.as_os_str().as_encoded_bytes());
        state_dir.join(SNAPSHOTS_DIR).join(&h.to_hex()[..32])
    }

    /// Removes the snapshot folder `dir` (see [`SnapshotStore::dir_for`]) and everything in it:
    /// the migration it served has ended. A missing folder is not an error.
    pub fn remove(dir: &Path) -> io::Result<()> {
        match fs::remove_dir_all(dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Removes every snapshot folder under `state_dir` except `keep` and those a running
    /// sender claims: what a crashed sender left of other migrations. Returns how many folders
    /// were removed.
    pub fn remove_others(state_dir: &Path, keep: &Path) -> io::Result<usize> {
        let rd = match fs::read_dir(state_dir.join(SNAPSHOTS_DIR)) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e),
        };
        let mut n = 0;
        for ent in rd {
            let path = ent?.path();
            if path == keep {
                continue;
            }
            // Held while removing, so that a sender starting meanwhile waits for a fresh folder.
            let held = match OpenOptions::new().write(true).open(path.join(IN_USE_FILE)) {
                Ok(f) => match f.try_lock() {
                    Ok(()) => Some(f),
                    Err(fs::TryLockError::WouldBlock) => continue,
                    Err(fs::TryLockError::Error(e)) => return Err(e),
                },
                Err(_) => None,
            };
            SnapshotStore::remove(&path)?;
            drop(held);
            n += 1;
        }
        Ok(n)
    }

    /// Claims snapshot folder `dir` (creating it) for one sender: while the claim lives, no
    /// other sender's [`SnapshotStore::remove_others`] removes it, and dropping it removes the
    /// folder — unless another running sender of the same folder claimed it first.
    pub fn claim(dir: &Path) -> io::Result<SnapshotClaim> {
        crate::private::create_dir_all(dir)?;
        let f = crate::private::options()
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join(IN_USE_FILE))?;
        let lock = match f.try_lock() {
            Ok(()) => Some(f),
            Err(fs::TryLockError::WouldBlock) => None,
            Err(fs::TryLockError::Error(e)) => return Err(e),
        };
        Ok(SnapshotClaim {
            dir: dir.to_path_buf(),
            lock,
        })
    }

    /// Opens (creating) a snapshot folder. A missing or damaged index just means no reuse.
    pub fn open(dir: &Path) -> io::Result<Self> {
        crate::private::create_dir_all(dir)?;
        let index = load_index(&dir.join(INDEX_FILE)).unwrap_or_default();
        Ok(SnapshotStore {
            dir: dir.to_path_buf(),
            busy_timeout: DEFAULT_BUSY_TIMEOUT,
            index,
            used: HashSet::new(),
        })
    }

    /// Sets how long to wait for a database another program holds locked.
    pub fn set_busy_timeout(&mut self, t: Duration) {
        self.busy_timeout = t;
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Snapshots the database at `abs` (manifest path `rel`), or reuses the previous snapshot
    /// if the database and its `-wal`/`-journal` did not change since.
    pub fn capture(&mut self, rel: &str, abs: &Path) -> Result<Captured, SnapshotError> {
        let key = DbKey::stat(abs)?;
        let file = format!("{}.db", &blake3::hash(rel.as_bytes()).to_hex()[..32]);
        let path = self.dir.join(&file);
        if let Some(r) = self.index.get(rel) {
            if r.key == key && r.file == file && path.is_file() {
                self.used.insert(rel.to_string());
                return Ok(Captured {
                    file: path,
                    reused: true,
                    source_mtime: key.mtime(),
                });
            }
        }
        // Forget the old record first: if the copy fails, a stale snapshot must not be reused.
        self.index.remove(rel);
        let tmp = self.dir.join(format!("{file}.tmp"));
        let copied = backup_to(abs, &tmp, self.busy_timeout);
        if let Err(e) = copied {
            let _ = fs::remove_file(&tmp);
            for suffix in COMPANIONS {
                let _ = fs::remove_file(companion(&tmp, suffix));
            }
            return Err(e);
        }
        fs::rename(&tmp, &path)?;
        self.index.insert(
            rel.to_string(),
            Recorded {
                key,
                file: file.clone(),
            },
        );
        self.used.insert(rel.to_string());
        Ok(Captured {
            file: path,
            reused: false,
            source_mtime: key.mtime(),
        })
    }

    /// Keeps the snapshots captured since [`SnapshotStore::open`], removes every other file of
    /// the folder, and saves the index.
    pub fn finish(mut self) -> io::Result<()> {
        self.index.retain(|rel, _| self.used.contains(rel));
        let keep: HashSet<&str> = self.index.values().map(|r| r.file.as_str()).collect();
        for ent in fs::read_dir(&self.dir)? {
            let ent = ent?;
            let name = ent.file_name();
            let keep_it = name
                .to_str()
                .is_some_and(|n| n == INDEX_FILE || n == IN_USE_FILE || keep.contains(n));
            if !keep_it {
                let _ = fs::remove_file(ent.path());
            }
        }
        let mut v: Vec<(&String, &Recorded)> = self.index.iter().collect();
        v.sort_by(|a, b| a.0.cmp(b.0));
        let mut out = INDEX_MAGIC.to_vec();
        out = postcard::to_extend(&v, out).map_err(io::Error::other)?;
        crate::private::write_atomic(&self.dir.join(INDEX_FILE), &out)
    }
}

fn load_index(path: &Path) -> Option<HashMap<String, Recorded>> {
    let md = fs::metadata(path).ok()?;
    if md.len() > MAX_INDEX_FILE {
        return None;
    }
    let data = fs::read(path).ok()?;
    if data.len() < 8 || &data[..8] != INDEX_MAGIC {
        return None;
    }
    postcard::from_bytes::<Vec<(String, Recorded)>>(&data[8..])
        .ok()
        .map(|v| v.into_iter().collect())
}

/// Rows in the user tables of the database at `path` (a snapshot), summed: how the sender tells
/// how many messages (and other records) arrived while it migrated.
pub fn count_rows(path: &Path) -> Result<u64, SnapshotError> {
    // `immutable`: a snapshot does not change while it is read, and a plain read-only
    // connection to a WAL-mode snapshot would leave a `-wal` and `-shm` beside it.
    let db = Connection::open_with_flags(
        immutable_uri(path),
        OpenFlags::SQLITE_OPEN_READ_ONLY
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
            | OpenFlags::SQLITE_OPEN_URI,
    )?;
    let tables: Vec<String> = {
        let mut q = db.prepare(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'",
        )?;
        let names = q.query_map([], |r| r.get(0))?;
        names.collect::<Result<_, _>>()?
    };
    let mut total = 0u64;
    for t in tables {
        // Virtual tables (full-text indexes) may need modules this build lacks: skip them.
        let quoted = format!("\"{}\"", t.replace('"', "\"\""));
        if let Ok(n) = db.query_row(&format!("SELECT count(*) FROM {quoted}"), [], |r| {
            r.get::<_, i64>(0)
        }) {
            total += u64::try_from(n).unwrap_or(0);
        }
    }
    Ok(total)
}

/// `file:` URI of `path` opened immutable (no locks, no `-wal`/`-shm`): every byte but an
/// unreserved one or `/` percent-encoded, so any file name (not UTF-8 either) round-trips.
fn immutable_uri(path: &Path) -> String {
    let mut uri = String::from("file:");
    for &b in path.as_os_str().as_encoded_bytes() {
        if b.is_ascii_alphanumeric() || b"/-_.~".contains(&b) {
            uri.push(char::from(b));
        } else {
            uri.push_str(&format!("%{b:02X}"));
        }
    }
    uri.push_str("?immutable=1");
    uri
}

/// Sets the journal mode of connection `db` and checks SQLite took it.
fn set_journal_mode(db: &Connection, mode: &str) -> Result<(), SnapshotError> {
    let got: String = db.query_row(&format!("PRAGMA journal_mode={mode}"), [], |r| r.get(0))?;
    if got.eq_ignore_ascii_case(mode) {
        Ok(())
    } else {
        Err(SnapshotError::Io(io::Error::other(format!(
            "the snapshot stayed in journal mode {got}, not {mode}"
        ))))
    }
}

/// Copies the database at `src` into a new file `dst` in one read transaction, then makes the
/// copy self-contained in the source's journal mode (see the module documentation) and durable.
fn backup_to(src: &Path, dst: &Path, busy: Duration) -> Result<(), SnapshotError> {
    let _ = fs::remove_file(dst);
    let from = Connection::open_with_flags(
        src,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    from.busy_timeout(busy)?;
    // "wal" for a WAL-mode database (persistent, in its header); a rollback mode otherwise.
    // (Read just before the copy's transaction: an app switching modes in between only gives
    // a snapshot in the mode it left.)
    let source_mode: String = from.query_row("PRAGMA journal_mode", [], |r| r.get(0))?;
    let wal = source_mode.eq_ignore_ascii_case("wal");
    // Created owner-only before SQLite opens it (SQLite would create it 0644, and gives its
    // `-journal` the database file's mode).
    drop(crate::private::create(dst)?);
    {
        let mut to = Connection::open(dst)?;
        {
            let b = Backup::new(&from, &mut to)?;
            // All pages in one step: one read transaction, so one consistent state. (Smaller
            // steps would restart whenever the app commits.)
            match b.step(-1)? {
                StepResult::Done => {}
                StepResult::Busy | StepResult::Locked => return Err(SnapshotError::Busy),
                _ => return Err(SnapshotError::Busy),
            }
        }
        set_journal_mode(&to, "DELETE")?;
        if wal {
            // Writes 2 into header bytes 18/19 (a rollback-mode commit); the `-wal` it opens
            // holds no frame. A checkpoint that truncates it, checked here (closing would
            // checkpoint too, but ignores a failure), then the close deletes `-wal` and `-shm`.
            set_journal_mode(&to, "WAL")?;
            let busy: i64 = to.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0))?;
            if busy != 0 {
                return Err(SnapshotError::Busy);
            }
        }
        to.close().map_err(|(_, e)| e)?;
    }
    drop(from);
    // Only empty companions can be left after a successful checkpoint; none must stay.
    for suffix in COMPANIONS {
        match fs::remove_file(companion(dst, suffix)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e.into()),
            _ => {}
        }
    }
    File::open(dst)?.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_detection() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x");
        fs::write(&p, b"SQLite format 3\0rest").unwrap();
        assert!(has_sqlite_header(&p).unwrap());
        fs::write(&p, b"SQLite format 3").unwrap();
        assert!(!has_sqlite_header(&p).unwrap());
        fs::write(&p, b"").unwrap();
        assert!(!has_sqlite_header(&p).unwrap());
    }
}
