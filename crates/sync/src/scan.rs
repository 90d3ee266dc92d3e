//! Scanning a history directory into a [`Manifest`].
//!
//! The walk never follows symlinks: a symlink is recorded as a symlink when its target stays
//! inside the root (judged lexically), and skipped with a reported reason otherwise. Names that
//! are not UTF-8, special files (sockets, FIFOs, devices) and a `.ferry` state folder at the root
//! are skipped with a reason too. Files are hashed chunk by chunk on several threads; a
//! [`HashCache`] keyed by (path, size, mtime, inode) lets a restarted sender skip re-hashing
//! files that did not change.
//!
//! # Live files
//! The app may write while the scan reads. With [`ScanConfig::snapshot_dir`] set, SQLite
//! databases are recognised by their header and captured consistently through SQLite (see
//! [`crate::snapshot`]); the manifest describes the snapshot under the database's path, their
//! `-wal`/`-shm`/`-journal` companions are left out, and [`ScanOutput::sources`] says which file
//! to read for such an entry. Every other file is read with change detection: it is `stat`ed
//! before and after hashing (size, mtime and ctime to the nanosecond, inode), and a file
//! modified within [`RACY_WINDOW`] before its read began counts as changed too (file times come
//! from a clock that ticks every few milliseconds, so a write in the same tick would otherwise
//! go unseen). A changed file is read again, up to [`ScanConfig::read_attempts`] times with a
//! growing pause; one that keeps changing is left out of the manifest and reported by name in
//! [`ScanOutput::unstable`], never sent torn.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::manifest::{
    chunk_count, chunk_shift_for, ChunkHash, EntryKind, ManifestError, Mtime, WireEntry,
};
use crate::path::{is_state_dir, symlink_stays_inside};
use crate::snapshot::{has_sqlite_header, FileKey, SnapshotStore, COMPANIONS};
use crate::Manifest;

/// A scan failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ScanError {
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    /// Files that could not be read while hashing (every one, not only the first: the person
    /// fixes them all at once).
    #[error("cannot read {}: {}", count_files(.0.len()), list_unreadable(.0))]
    Unreadable(Vec<(PathBuf, io::Error)>),
    #[error("{0} is not a directory")]
    NotADirectory(PathBuf),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
}

fn count_files(n: usize) -> String {
    if n == 1 {
        "1 file".into()
    } else {
        format!("{n} files")
    }
}

/// At most ten of them, then how many more.
fn list_unreadable(files: &[(PathBuf, io::Error)]) -> String {
    const SHOWN: usize = 10;
    let mut s: Vec<String> = files
        .iter()
        .take(SHOWN)
        .map(|(p, e)| format!("{} ({e})", p.display()))
        .collect();
    if files.len() > SHOWN {
        s.push(format!("and {} more", files.len() - SHOWN));
    }
    s.join(", ")
}

/// Something the scan left out, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub path: String,
    pub reason: String,
}

/// A file modified less than this before its read began is read again (see the module docs).
pub const RACY_WINDOW: Duration = Duration::from_millis(20);

/// Called after a file was read and before it is checked for changes, with the manifest path
/// and the attempt number (0-based). It lets tests change a file at exactly that moment.
#[derive(Clone)]
pub struct ReadHook(Arc<ReadHookFn>);

type ReadHookFn = dyn Fn(&str, u32) + Send + Sync;

impl ReadHook {
    pub fn new(f: impl Fn(&str, u32) + Send + Sync + 'static) -> Self {
        ReadHook(Arc::new(f))
    }
}

impl std::fmt::Debug for ReadHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReadHook")
    }
}

/// Scan tuning.
#[derive(Debug, Clone)]
pub struct ScanConfig {
    /// Hashing threads (0 = one per core).
    pub threads: usize,
    /// Where to keep consistent snapshots of SQLite databases (one folder per shared directory,
    /// see [`SnapshotStore::dir_for`]). `None` reads databases like any other file.
    pub snapshot_dir: Option<PathBuf>,
    /// How long a snapshot waits for a database the app holds locked before the database is
    /// read raw instead.
    pub snapshot_busy_timeout: Duration,
    /// Reads of a file that keeps changing before it is reported as unstable (≥ 1).
    pub read_attempts: u32,
    /// Pause before re-read n (1-based): [`RACY_WINDOW`] + n × this.
    pub retry_backoff: Duration,
    /// See [`ReadHook`].
    pub after_read: Option<ReadHook>,
    /// Counters kept up to date while the scan runs (see [`ScanProgress`]).
    pub progress: Option<Arc<ScanProgress>>,
}

/// How far a running scan got, for a caller that shows it: read the counters from another
/// thread while [`scan`] runs (relaxed loads; each counter only grows).
#[derive(Debug, Default)]
pub struct ScanProgress {
    /// Regular files found by the walk so far (once listed: the files to describe, without the
    /// companions of databases captured as snapshots).
    pub files_found: AtomicU64,
    /// The walk is done: `files_found` is the number of files to describe.
    pub listed: AtomicBool,
    /// Files described: their hashes came from the cache or were read (or they changed or
    /// vanished while read).
    pub files_done: AtomicU64,
    /// Bytes of the files the cache does not know (to read and hash); set after the walk.
    pub bytes_to_hash: AtomicU64,
    /// Bytes read and hashed so far (the re-read of a file that changed counts again).
    pub bytes_hashed: AtomicU64,
}

impl Default for ScanConfig {
    /// One thread per core, no snapshots (2 s busy timeout), 3 attempts, 25 ms backoff.
    fn default() -> Self {
        ScanConfig {
            threads: 0,
            snapshot_dir: None,
            snapshot_busy_timeout: crate::snapshot::DEFAULT_BUSY_TIMEOUT,
            read_attempts: 3,
            retry_backoff: Duration::from_millis(25),
            after_read: None,
            progress: None,
        }
    }
}

/// How a SQLite database was captured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Capture {
    /// Through SQLite, consistently; `reused` when the previous snapshot was still current.
    Snapshot { reused: bool },
    /// SQLite could not read it; it was read raw (with change detection) instead.
    Raw { reason: String },
}

/// A SQLite database the scan found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Database {
    pub path: String,
    pub capture: Capture,
}

/// The result of a scan.
#[derive(Debug)]
pub struct ScanOutput {
    pub manifest: Manifest,
    pub skipped: Vec<Skipped>,
    /// Files that changed on every read attempt: left out of the manifest, so the migration
    /// is not complete without them.
    pub unstable: Vec<Skipped>,
    /// SQLite databases found (only when snapshots are enabled), sorted by path.
    pub databases: Vec<Database>,
    /// Entries whose bytes must be read from another file than `root/path` (the snapshots).
    pub sources: HashMap<String, PathBuf>,
    /// Bytes read and hashed (not served by the cache).
    pub hashed_bytes: u64,
    /// Files served by the cache.
    pub cached_files: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
struct CacheEntry {
    size: u64,
    mtime: Mtime,
    ino: u64,
    chunk_shift: u8,
    hashes: Vec<ChunkHash>,
    /// The file's header was checked: it is not a SQLite database.
    plain: bool,
}

/// Chunk hashes of files already scanned, keyed by path and checked against (size, mtime, inode).
#[derive(Debug, Default)]
pub struct HashCache {
    map: HashMap<String, CacheEntry>,
}

const CACHE_MAGIC: &[u8; 8] = b"FRRYHC02";
/// A cache file larger than this is ignored (it would only be a waste of memory).
const MAX_CACHE_FILE: u64 = 2 << 30;

impl HashCache {
    /// The cache file for shared directory `root` inside ferry's state directory.
    pub fn path_for(state_dir: &Path, root: &Path) -> PathBuf {
        let abs = fs::canonicalize(root).unwrap_or_else(|_| root.to_path_buf());
        let h = blake3::hash(abs.as_os_str().as_encoded_bytes());
        state_dir
            .join("hashcache")
            .join(format!("{}.bin", &h.to_hex()[..32]))
    }

    /// Loads a cache file; a missing, foreign or damaged file gives an empty cache.
    pub fn load(path: &Path) -> Self {
        let Ok(md) = fs::metadata(path) else {
            return HashCache::default();
        };
        if md.len() > MAX_CACHE_FILE {
            return HashCache::default();
        }
        let Ok(data) = fs::read(path) else {
            return HashCache::default();
        };
        if data.len() < 8 || &data[..8] != CACHE_MAGIC {
            return HashCache::default();
        }
        match postcard::from_bytes::<Vec<(String, CacheEntry)>>(&data[8..]) {
            Ok(v) => HashCache {
                map: v.into_iter().collect(),
            },
            Err(_) => HashCache::default(),
        }
    }

    /// Writes the cache atomically (tmp + rename).
    pub fn save(&self, path: &Path) -> io::Result<()> {
        if let Some(dir) = path.parent() {
            crate::private::create_dir_all(dir)?;
        }
        let mut v: Vec<(&String, &CacheEntry)> = self.map.iter().collect();
        v.sort_by(|a, b| a.0.cmp(b.0));
        let mut out = CACHE_MAGIC.to_vec();
        out = postcard::to_extend(&v, out).map_err(io::Error::other)?;
        // The cache names every file of the history: owner-only, like all of ferry's files.
        crate::private::write_atomic(path, &out)
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// A regular file found by the walk.
struct FileWork {
    /// Index of its entry.
    index: usize,
    /// The live file.
    abs: PathBuf,
    /// What to hash: the live file, or its snapshot.
    read: PathBuf,
    /// The walk's stat of the live file.
    key: FileKey,
    /// The header was checked (now or by an earlier scan): not a database.
    plain: bool,
    /// `read` is a snapshot ferry wrote (no racy-mtime rule: ferry itself just wrote it).
    snapshot: bool,
    /// Left out of the manifest (companion of a snapshot, unstable, vanished).
    dropped: bool,
    /// (size, mtime, inode) of `read` as hashed, for the cache.
    cache_key: Option<(u64, Mtime, u64)>,
}

struct PendingFile {
    work: usize,
    path: String,
    read: PathBuf,
    racy_check: bool,
}

/// What reading a file gave.
enum ReadResult {
    Stable {
        md: fs::Metadata,
        hashes: Vec<ChunkHash>,
    },
    Unstable,
    Vanished,
}

fn mtime_of(k: &FileKey) -> Mtime {
    Mtime {
        secs: k.mtime.0,
        nanos: k.mtime.1.clamp(0, 999_999_999) as u32,
    }
}

/// Scans `root` into a manifest, using and refreshing `cache` when given.
///
/// In order: the walk records every entry (files with their walk-time metadata); SQLite
/// databases are captured as snapshots when configured; files the cache knows keep their
/// hashes; the rest are hashed with change detection; the cache is refreshed with what the
/// manifest now says.
pub fn scan(
    root: &Path,
    cache: Option<&mut HashCache>,
    cfg: &ScanConfig,
) -> Result<ScanOutput, ScanError> {
    scan_feeding(root, cache, cfg, None)
}

/// Like [`scan`], and hands the manifest's entries to `feed` while it hashes: in path order,
/// each with its chunk hashes (files the cache knows at once, the others as soon as they and
/// every file before them are hashed), in batches, exactly the entries of the returned
/// manifest. Files are hashed in path order so that the announced prefix grows steadily. For a
/// streaming sender ([`crate::proto::Sender::streaming`]); on an error the entries fed so far
/// are a prefix of no manifest.
pub fn scan_streaming(
    root: &Path,
    cache: Option<&mut HashCache>,
    cfg: &ScanConfig,
    feed: &mut dyn FnMut(Vec<WireEntry>),
) -> Result<ScanOutput, ScanError> {
    scan_feeding(root, cache, cfg, Some(feed))
}

fn scan_feeding(
    root: &Path,
    cache: Option<&mut HashCache>,
    cfg: &ScanConfig,
    feed: Option<&mut dyn FnMut(Vec<WireEntry>)>,
) -> Result<ScanOutput, ScanError> {
    let md = fs::metadata(root).map_err(|e| ScanError::Io {
        path: root.to_path_buf(),
        source: e,
    })?;
    if !md.is_dir() {
        return Err(ScanError::NotADirectory(root.to_path_buf()));
    }
    let Walk {
        mut entries,
        mut skipped,
        mut files,
    } = walk(root, cfg.progress.as_deref())?;
    let (databases, sources) = match &cfg.snapshot_dir {
        Some(snap_dir) => capture_databases(
            root,
            snap_dir,
            cfg,
            cache.as_deref(),
            &mut entries,
            &mut files,
        )?,
        None => (Vec::new(), HashMap::new()),
    };
    // The cache, then hashing with change detection.
    let (mut pending, cached_files) = use_cache(cache.as_deref(), &mut entries, &mut files);
    // Path order: hashing follows it, so a streamed manifest's prefix grows steadily.
    let mut order: Vec<usize> = (0..entries.len()).collect();
    order.sort_by(|&a, &b| entries[a].path.as_bytes().cmp(entries[b].path.as_bytes()));
    let mut rank = vec![0usize; entries.len()];
    for (r, &i) in order.iter().enumerate() {
        rank[i] = r;
    }
    pending.sort_by_key(|p| rank[files[p.work].index]);
    if let Some(p) = &cfg.progress {
        let to_hash = pending
            .iter()
            .filter_map(|p| files.get(p.work))
            .map(|f| f.key.size)
            .sum();
        p.bytes_to_hash.store(to_hash, Ordering::Relaxed);
        // Companions of a database (its -wal, -journal) went into its snapshot.
        let kept = files.iter().filter(|f| !f.dropped).count() as u64;
        p.files_found.store(kept, Ordering::Relaxed);
        p.files_done.fetch_add(cached_files, Ordering::Relaxed);
        p.listed.store(true, Ordering::Relaxed);
    }
    let results = match feed {
        None => hash_files(&pending, cfg, |_| Vec::new(), &mut |_| {})?,
        Some(feed) => {
            let mut stream = InOrder::new(&entries, &files, &pending, &order);
            hash_files(&pending, cfg, |done| stream.release(done), feed)?
        }
    };
    let mut hashed_bytes = 0;
    let mut unstable = Vec::new();
    for (p, r) in pending.iter().zip(results) {
        let f = &mut files[p.work];
        let e = &mut entries[f.index];
        match r {
            ReadResult::Stable { md, hashes } => {
                hashed_bytes += md.len();
                record_read(f, e, &md, hashes);
            }
            ReadResult::Unstable => {
                f.dropped = true;
                unstable.push(Skipped {
                    path: p.path.clone(),
                    reason: format!(
                        "it changed during each of {} reads; it could not be captured consistently",
                        cfg.read_attempts.max(1)
                    ),
                });
            }
            ReadResult::Vanished => {
                f.dropped = true;
                skipped.push(Skipped {
                    path: p.path.clone(),
                    reason: "it disappeared during the scan".into(),
                });
            }
        }
    }
    let fresh = fresh_cache(&entries, &files);
    if let Some(c) = cache {
        c.map = fresh;
    }
    let mut keep = vec![true; entries.len()];
    for f in files.iter().filter(|f| f.dropped) {
        keep[f.index] = false;
    }
    let entries: Vec<WireEntry> = entries
        .into_iter()
        .zip(keep)
        .filter_map(|(e, k)| k.then_some(e))
        .collect();
    let manifest = Manifest::from_wire_entries(entries)?;
    Ok(ScanOutput {
        manifest,
        skipped,
        unstable,
        databases,
        sources,
        hashed_bytes,
        cached_files,
    })
}

/// What the walk found: entries in walk order (files without hashes yet), what it left out,
/// and the files to hash.
struct Walk {
    entries: Vec<WireEntry>,
    skipped: Vec<Skipped>,
    files: Vec<FileWork>,
}

/// Depth-first walk with an explicit stack; names sorted for determinism.
fn walk(root: &Path, progress: Option<&ScanProgress>) -> Result<Walk, ScanError> {
    let mut w = Walk {
        entries: Vec::new(),
        skipped: Vec::new(),
        files: Vec::new(),
    };
    let mut stack: Vec<(PathBuf, String)> = vec![(root.to_path_buf(), String::new())];
    while let Some((dir, rel)) = stack.pop() {
        let rd = fs::read_dir(&dir).map_err(|e| ScanError::Io {
            path: dir.clone(),
            source: e,
        })?;
        let mut children = Vec::new();
        for ent in rd {
            let ent = ent.map_err(|e| ScanError::Io {
                path: dir.clone(),
                source: e,
            })?;
            children.push(ent);
        }
        children.sort_by_key(|e| e.file_name());
        for ent in children {
            if let Some(sub) = walk_entry(&mut w, &rel, &ent)? {
                stack.push(sub);
            }
        }
        if let Some(p) = progress {
            p.files_found.store(w.files.len() as u64, Ordering::Relaxed);
        }
    }
    Ok(w)
}

/// Records directory entry `ent` of folder `rel`, or why it is skipped. Returns the folder to
/// descend into when it is one.
fn walk_entry(
    w: &mut Walk,
    rel: &str,
    ent: &fs::DirEntry,
) -> Result<Option<(PathBuf, String)>, ScanError> {
    let name = ent.file_name();
    let Some(name) = name.to_str() else {
        w.skipped.push(Skipped {
            path: format!("{}/{}", rel, name.to_string_lossy()),
            reason: "the name is not valid UTF-8".into(),
        });
        return Ok(None);
    };
    let path = if rel.is_empty() {
        name.to_string()
    } else {
        format!("{rel}/{name}")
    };
    let skip = |w: &mut Walk, path: String, reason: String| {
        w.skipped.push(Skipped { path, reason });
        Ok(None)
    };
    if rel.is_empty() && is_state_dir(name) {
        return skip(w, path, "ferry's own state folder".into());
    }
    if let Err(p) = crate::path::check_relative_path(&path) {
        return skip(w, path, p.to_string());
    }
    let abs = ent.path();
    let md = match fs::symlink_metadata(&abs) {
        Ok(md) => md,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return skip(w, path, "it disappeared during the scan".into());
        }
        Err(e) => {
            return Err(ScanError::Io {
                path: abs,
                source: e,
            })
        }
    };
    let mtime = Mtime {
        secs: md.mtime(),
        nanos: md.mtime_nsec().clamp(0, 999_999_999) as u32,
    };
    let mode = md.permissions().mode() & 0o7777;
    let ft = md.file_type();
    let entry = |path: String, kind: EntryKind, size: u64, mode: u32| WireEntry {
        path,
        kind,
        size,
        mode,
        mtime,
        hashes: vec![],
    };
    if ft.is_dir() {
        w.entries.push(entry(path.clone(), EntryKind::Dir, 0, mode));
        Ok(Some((abs, path)))
    } else if ft.is_symlink() {
        let target = fs::read_link(&abs).map_err(|e| ScanError::Io {
            path: abs.clone(),
            source: e,
        })?;
        match target.to_str() {
            Some(t) if symlink_stays_inside(&path, t) => {
                let kind = EntryKind::Symlink {
                    target: t.to_string(),
                };
                w.entries.push(entry(path, kind, 0, 0o777));
                Ok(None)
            }
            _ => skip(
                w,
                path,
                format!("symlink to {} points outside the folder", target.display()),
            ),
        }
    } else if ft.is_file() {
        let size = md.len();
        w.files.push(FileWork {
            index: w.entries.len(),
            read: abs.clone(),
            abs,
            key: FileKey::of(&md),
            plain: false,
            snapshot: false,
            dropped: false,
            cache_key: None,
        });
        let kind = EntryKind::File {
            chunk_shift: chunk_shift_for(size),
        };
        w.entries.push(entry(path, kind, size, mode));
        Ok(None)
    } else {
        skip(w, path, "not a regular file, directory or symlink".into())
    }
}

/// The cache's record of `path` if it still describes the file (size, mtime, inode) and has
/// the chunking the file gets now.
fn cached<'a>(
    cache: Option<&'a HashCache>,
    path: &str,
    size: u64,
    mtime: Mtime,
    ino: u64,
) -> Option<&'a CacheEntry> {
    let shift = chunk_shift_for(size);
    cache.and_then(|c| c.map.get(path)).filter(|c| {
        c.size == size
            && c.mtime == mtime
            && c.ino == ino
            && c.chunk_shift == shift
            && c.hashes.len() as u64 == chunk_count(size, shift)
    })
}

/// SQLite databases: snapshot them into `snap_dir`, and leave their companions out. Returns the
/// databases found (sorted by path) and the snapshot to read for each captured one.
fn capture_databases(
    root: &Path,
    snap_dir: &Path,
    cfg: &ScanConfig,
    cache: Option<&HashCache>,
    entries: &mut [WireEntry],
    files: &mut [FileWork],
) -> Result<(Vec<Database>, HashMap<String, PathBuf>), ScanError> {
    let mut databases = Vec::new();
    let mut sources = HashMap::new();
    let mut store = SnapshotStore::open(snap_dir).map_err(|e| ScanError::Io {
        path: snap_dir.to_path_buf(),
        source: e,
    })?;
    store.set_busy_timeout(cfg.snapshot_busy_timeout);
    // Files that could be companions, by path.
    let by_path: HashMap<String, usize> = files
        .iter()
        .enumerate()
        .map(|(i, f)| (&entries[f.index].path, i))
        .filter(|(p, _)| COMPANIONS.iter().any(|c| p.ends_with(c)))
        .map(|(p, i)| (p.clone(), i))
        .collect();
    let dbs = find_databases(cache, entries, files);
    let mut companions = Vec::new();
    for i in dbs {
        if files[i].dropped {
            continue; // a "-wal" with a database header: already a companion
        }
        let path = entries[files[i].index].path.clone();
        let capture = match store.capture(&path, &files[i].abs) {
            Ok(c) => {
                let snap_md = fs::symlink_metadata(&c.file).map_err(|e| ScanError::Io {
                    path: c.file.clone(),
                    source: e,
                })?;
                let f = &mut files[i];
                f.read = c.file.clone();
                f.key = FileKey::of(&snap_md);
                f.snapshot = true;
                let e = &mut entries[f.index];
                e.size = snap_md.len();
                e.kind = EntryKind::File {
                    chunk_shift: chunk_shift_for(e.size),
                };
                e.mtime = Mtime {
                    secs: c.source_mtime.0,
                    nanos: c.source_mtime.1.clamp(0, 999_999_999) as u32,
                };
                sources.insert(path.clone(), c.file);
                for suffix in COMPANIONS {
                    if let Some(&j) = by_path.get(&format!("{path}{suffix}")) {
                        companions.push(j);
                    }
                }
                Capture::Snapshot { reused: c.reused }
            }
            Err(e) => Capture::Raw {
                reason: e.to_string(),
            },
        };
        for j in companions.drain(..) {
            files[j].dropped = true;
        }
        databases.push(Database { path, capture });
    }
    databases.sort_by(|a: &Database, b: &Database| a.path.cmp(&b.path));
    restamp_database_folders(root, &databases, entries);
    if let Err(e) = store.finish() {
        tracing::warn!(
            "cannot tidy the snapshot folder {}: {e}",
            snap_dir.display()
        );
    }
    Ok((databases, sources))
}

/// The files (indices into `files`) with a SQLite header; the others are marked plain.
fn find_databases(
    cache: Option<&HashCache>,
    entries: &[WireEntry],
    files: &mut [FileWork],
) -> Vec<usize> {
    let mut dbs = Vec::new();
    for (i, f) in files.iter_mut().enumerate() {
        let e = &entries[f.index];
        let known_plain = cached(cache, &e.path, f.key.size, mtime_of(&f.key), f.key.ino)
            .is_some_and(|c| c.plain);
        // Anything shorter than one 512-byte page is not a database.
        if known_plain || f.key.size < 512 {
            f.plain = true;
            continue;
        }
        match has_sqlite_header(&f.abs) {
            Ok(true) => dbs.push(i),
            Ok(false) => f.plain = true,
            // Vanished or unreadable: the read below reports it.
            Err(_) => {}
        }
    }
    dbs
}

/// Reading a database may have made SQLite create its -shm, which moves the mtime of the folder
/// holding it: record the folder as it is now, so the next scan (and a restarted sender)
/// describes the same tree.
fn restamp_database_folders(root: &Path, databases: &[Database], entries: &mut [WireEntry]) {
    let parents: std::collections::HashSet<&str> = databases
        .iter()
        .filter_map(|d| d.path.rsplit_once('/').map(|(dir, _)| dir))
        .collect();
    if parents.is_empty() {
        return;
    }
    for e in entries
        .iter_mut()
        .filter(|e| e.kind == EntryKind::Dir && parents.contains(e.path.as_str()))
    {
        if let Ok(md) = fs::symlink_metadata(root.join(&e.path)) {
            e.mtime = Mtime {
                secs: md.mtime(),
                nanos: md.mtime_nsec().clamp(0, 999_999_999) as u32,
            };
        }
    }
}

/// Gives the files the cache knows their hashes; returns the others (to hash) and how many the
/// cache served.
fn use_cache(
    cache: Option<&HashCache>,
    entries: &mut [WireEntry],
    files: &mut [FileWork],
) -> (Vec<PendingFile>, u64) {
    let mut pending = Vec::new();
    let mut cached_files = 0;
    for (i, f) in files.iter_mut().enumerate() {
        if f.dropped {
            continue;
        }
        let e = &mut entries[f.index];
        let mtime = mtime_of(&f.key);
        match cached(cache, &e.path, f.key.size, mtime, f.key.ino) {
            Some(c) => {
                cached_files += 1;
                e.hashes = c.hashes.clone();
                f.cache_key = Some((f.key.size, mtime, f.key.ino));
            }
            None => pending.push(PendingFile {
                work: i,
                path: e.path.clone(),
                read: f.read.clone(),
                racy_check: !f.snapshot,
            }),
        }
    }
    (pending, cached_files)
}

/// Records a stable read of `f` (metadata `md` as hashed) in its entry `e`.
fn record_read(f: &mut FileWork, e: &mut WireEntry, md: &fs::Metadata, hashes: Vec<ChunkHash>) {
    let key = FileKey::of(md);
    let mtime = mtime_of(&key);
    f.cache_key = Some((md.len(), mtime, key.ino));
    read_into_entry(e, f.snapshot, md, hashes);
}

/// What a stable read of a file (metadata `md` as hashed) says about its entry.
fn read_into_entry(e: &mut WireEntry, snapshot: bool, md: &fs::Metadata, hashes: Vec<ChunkHash>) {
    let mtime = mtime_of(&FileKey::of(md));
    e.size = md.len();
    e.kind = EntryKind::File {
        chunk_shift: chunk_shift_for(e.size),
    };
    e.hashes = hashes;
    if !snapshot {
        e.mtime = mtime;
        e.mode = md.permissions().mode() & 0o7777;
    }
}

/// The cache as the manifest now describes the files (those left out are forgotten).
fn fresh_cache(entries: &[WireEntry], files: &[FileWork]) -> HashMap<String, CacheEntry> {
    let mut fresh: HashMap<String, CacheEntry> = HashMap::new();
    for f in files.iter().filter(|f| !f.dropped) {
        let e = &entries[f.index];
        if let (Some((size, mtime, ino)), EntryKind::File { chunk_shift }) = (f.cache_key, &e.kind)
        {
            fresh.insert(
                e.path.clone(),
                CacheEntry {
                    size,
                    mtime,
                    ino,
                    chunk_shift: *chunk_shift,
                    hashes: e.hashes.clone(),
                    plain: f.plain,
                },
            );
        }
    }
    fresh
}

/// Which files are hashed so far (by index into the pending list), for [`InOrder`]: a result
/// or `None` for a read error; `hashing` counts the threads still at work.
struct Hashed {
    results: Vec<Option<ReadResult>>,
    finished: Vec<bool>,
    hashing: usize,
}

/// Releases a streaming scan's entries in path order as the files before them are hashed.
struct InOrder<'a> {
    entries: &'a [WireEntry],
    files: &'a [FileWork],
    /// Entry index → pending index, for files being hashed.
    pending_of: HashMap<usize, usize>,
    order: &'a [usize],
    /// The next position in `order` to release.
    next: usize,
}

impl<'a> InOrder<'a> {
    fn new(
        entries: &'a [WireEntry],
        files: &'a [FileWork],
        pending: &[PendingFile],
        order: &'a [usize],
    ) -> Self {
        let pending_of = pending
            .iter()
            .enumerate()
            .map(|(pi, p)| (files[p.work].index, pi))
            .collect();
        InOrder {
            entries,
            files,
            pending_of,
            order,
            next: 0,
        }
    }

    /// Every entry that can go now (in order, up to the first file not hashed yet), in
    /// batches. Entries left out of the manifest (companions, unstable, vanished) are skipped;
    /// after a read error nothing more goes.
    fn release(&mut self, done: &Hashed) -> Vec<Vec<WireEntry>> {
        const BATCH: usize = 512;
        let mut out = Vec::new();
        let mut batch = Vec::new();
        while let Some(&i) = self.order.get(self.next) {
            let mut e = self.entries[i].clone();
            if let Some(&pi) = self.pending_of.get(&i) {
                if !done.finished[pi] {
                    break;
                }
                match &done.results[pi] {
                    Some(ReadResult::Stable { md, hashes }) => {
                        let snapshot = self.file_of(i).is_some_and(|f| f.snapshot);
                        read_into_entry(&mut e, snapshot, md, hashes.clone());
                    }
                    Some(_) => {
                        self.next += 1;
                        continue;
                    }
                    None => {
                        self.next = self.order.len();
                        break;
                    }
                }
            } else if self.file_of(i).is_some_and(|f| f.dropped) {
                self.next += 1;
                continue;
            }
            batch.push(e);
            self.next += 1;
            if batch.len() >= BATCH {
                out.push(std::mem::take(&mut batch));
            }
        }
        if !batch.is_empty() {
            out.push(batch);
        }
        out
    }

    fn file_of(&self, entry: usize) -> Option<&FileWork> {
        // Files are few relative to lookups only when the history is tiny; a linear search
        // would be quadratic, so entries map to files through the pending table or this
        // binary search (files are in walk order, their entry indices increase).
        let k = self.files.partition_point(|f| f.index < entry);
        self.files.get(k).filter(|f| f.index == entry)
    }
}

/// Hashes `files` on several threads. Each time a file is done, `release` sees the results so
/// far (on this thread, while the others hash) and what it returns goes to `deliver`, outside
/// the lock (a slow consumer holds up this thread, not the hashing).
fn hash_files(
    files: &[PendingFile],
    cfg: &ScanConfig,
    mut release: impl FnMut(&Hashed) -> Vec<Vec<WireEntry>>,
    deliver: &mut dyn FnMut(Vec<WireEntry>),
) -> Result<Vec<ReadResult>, ScanError> {
    let threads = if cfg.threads == 0 {
        std::thread::available_parallelism().map_or(2, |n| n.get())
    } else {
        cfg.threads
    }
    .clamp(1, 16);
    let next = AtomicUsize::new(0);
    let workers = threads.min(files.len().max(1));
    let state = Mutex::new(Hashed {
        results: std::iter::repeat_with(|| None).take(files.len()).collect(),
        finished: vec![false; files.len()],
        hashing: workers,
    });
    let changed = std::sync::Condvar::new();
    let lock = || state.lock().unwrap_or_else(|p| p.into_inner());
    // Read errors are collected (bounded) and hashing goes on, so that one run names every
    // unreadable file; anything else unexpected stops at once.
    const MAX_UNREADABLE: usize = 1000;
    let unreadable: Mutex<Vec<(PathBuf, io::Error)>> = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| {
                let mut buf = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(f) = files.get(i) else { break };
                    let r = read_stable(f, cfg, &mut buf);
                    if let Some(p) = &cfg.progress {
                        p.files_done.fetch_add(1, Ordering::Relaxed);
                    }
                    let stop = match r {
                        Ok(r) => {
                            lock().results[i] = Some(r);
                            false
                        }
                        Err(e) => {
                            let mut u = unreadable.lock().unwrap_or_else(|p| p.into_inner());
                            u.push((f.read.clone(), e));
                            u.len() >= MAX_UNREADABLE
                        }
                    };
                    lock().finished[i] = true;
                    changed.notify_all();
                    if stop {
                        next.store(files.len(), Ordering::Relaxed);
                        break;
                    }
                }
                lock().hashing -= 1;
                changed.notify_all();
            });
        }
        // This thread follows the results as they come.
        let mut g = lock();
        loop {
            let batches = release(&g);
            if !batches.is_empty() {
                drop(g);
                batches.into_iter().for_each(&mut *deliver);
                g = lock();
                continue;
            }
            if g.hashing == 0 {
                break;
            }
            g = changed.wait(g).unwrap_or_else(|p| p.into_inner());
        }
    });
    let mut unreadable = unreadable.into_inner().unwrap_or_else(|p| p.into_inner());
    if !unreadable.is_empty() {
        unreadable.sort_by(|a, b| a.0.cmp(&b.0));
        return Err(ScanError::Unreadable(unreadable));
    }
    state
        .into_inner()
        .unwrap_or_else(|p| p.into_inner())
        .results
        .into_iter()
        .map(|r| {
            r.ok_or_else(|| ScanError::Io {
                path: PathBuf::new(),
                source: io::Error::other("a hashing thread stopped early"),
            })
        })
        .collect()
}

/// Hashes a file until two `stat`s around the read agree, or the attempts run out.
fn read_stable(f: &PendingFile, cfg: &ScanConfig, buf: &mut Vec<u8>) -> io::Result<ReadResult> {
    let attempts = cfg.read_attempts.max(1);
    for attempt in 0..attempts {
        if attempt > 0 {
            std::thread::sleep(RACY_WINDOW + cfg.retry_backoff * attempt);
        }
        let started = SystemTime::now();
        let file = match File::open(&f.read) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(ReadResult::Vanished),
            Err(e) => return Err(e),
        };
        let before = file.metadata()?;
        let hashes = hash_file(file, before.len(), buf, cfg.progress.as_deref())?;
        if let Some(hook) = &cfg.after_read {
            (hook.0)(&f.path, attempt);
        }
        let after = match fs::symlink_metadata(&f.read) {
            Ok(md) => md,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        let Some(hashes) = hashes else { continue };
        if !after.file_type().is_file() || FileKey::of(&before) != FileKey::of(&after) {
            continue;
        }
        if f.racy_check {
            let modified = after.modified()?;
            if modified + RACY_WINDOW >= started {
                continue;
            }
        }
        return Ok(ReadResult::Stable { md: after, hashes });
    }
    Ok(ReadResult::Unstable)
}

/// The chunk hashes of the first `size` bytes of `file`, or `None` if it is shorter.
fn hash_file(
    mut file: File,
    size: u64,
    buf: &mut Vec<u8>,
    progress: Option<&ScanProgress>,
) -> io::Result<Option<Vec<ChunkHash>>> {
    let shift = chunk_shift_for(size);
    let csize = 1usize << shift;
    // Read several chunks per call for small chunk sizes.
    let per_read = csize.max(1 << 22);
    buf.resize(per_read, 0);
    let n = chunk_count(size, shift) as usize;
    let mut hashes = Vec::with_capacity(n);
    let mut left = size;
    while left > 0 {
        let want = (left as usize).min(per_read);
        match file.read_exact(&mut buf[..want]) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e),
        }
        for piece in buf[..want].chunks(csize) {
            hashes.push(ChunkHash::of(piece));
        }
        if let Some(p) = progress {
            p.bytes_hashed.fetch_add(want as u64, Ordering::Relaxed);
        }
        left -= want as u64;
    }
    Ok(Some(hashes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scan_records_tree_and_uses_cache() {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        fs::create_dir_all(r.join("db")).unwrap();
        fs::create_dir_all(r.join("empty")).unwrap();
        fs::write(r.join("db/a.db"), vec![7u8; 300_000]).unwrap();
        fs::write(r.join("b.txt"), b"hi").unwrap();
        fs::write(r.join("zero"), b"").unwrap();
        std::os::unix::fs::symlink("db/a.db", r.join("link")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", r.join("evil")).unwrap();
        fs::create_dir_all(r.join(".ferry")).unwrap();
        let mut cache = HashCache::default();
        let out = scan(r, Some(&mut cache), &ScanConfig::default()).unwrap();
        let paths: Vec<_> = out
            .manifest
            .entries()
            .iter()
            .map(|e| e.path.as_str())
            .collect();
        assert_eq!(paths, ["b.txt", "db", "db/a.db", "empty", "link", "zero"]);
        assert_eq!(out.skipped.len(), 2, "{:?}", out.skipped);
        assert_eq!(out.hashed_bytes, 300_002);
        assert_eq!(cache.len(), 3);

        let state = tempfile::tempdir().unwrap();
        let cache_path = HashCache::path_for(state.path(), r);
        cache.save(&cache_path).unwrap();
        let mut cache = HashCache::load(&cache_path);
        let again = scan(r, Some(&mut cache), &ScanConfig::default()).unwrap();
        assert_eq!(again.hashed_bytes, 0);
        assert_eq!(again.cached_files, 3);
        assert_eq!(again.manifest.root(), out.manifest.root());

        // A changed file is re-hashed and changes the root.
        fs::write(r.join("b.txt"), b"ho!").unwrap();
        let third = scan(r, Some(&mut cache), &ScanConfig::default()).unwrap();
        assert_eq!(third.hashed_bytes, 3);
        assert_ne!(third.manifest.root(), out.manifest.root());
    }
}
