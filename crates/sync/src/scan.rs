//! Scanning a history directory into a [`Manifest`].
//!
//! The walk never follows symlinks: a symlink is recorded as a symlink when its target stays
//! inside the root (judged lexically), and skipped with a reported reason otherwise. Names that
//! are not UTF-8, special files (sockets, FIFOs, devices) and a `.ferry` state folder at the root
//! are skipped with a reason too. Files are hashed chunk by chunk on several threads; a
//! [`HashCache`] keyed by (path, size, mtime, inode) lets a restarted sender skip re-hashing
//! files that did not change.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::manifest::{
    chunk_count, chunk_shift_for, ChunkHash, EntryKind, ManifestError, Mtime, WireEntry,
};
use crate::path::{symlink_stays_inside, STATE_DIR};
use crate::Manifest;

/// A scan failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ScanError {
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{0} is not a directory")]
    NotADirectory(PathBuf),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
}

/// Something the scan left out, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub path: String,
    pub reason: String,
}

/// Scan tuning.
#[derive(Debug, Clone, Default)]
pub struct ScanConfig {
    /// Hashing threads (0 = one per core).
    pub threads: usize,
}

/// The result of a scan.
#[derive(Debug)]
pub struct ScanOutput {
    pub manifest: Manifest,
    pub skipped: Vec<Skipped>,
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
}

/// Chunk hashes of files already scanned, keyed by path and checked against (size, mtime, inode).
#[derive(Debug, Default)]
pub struct HashCache {
    map: HashMap<String, CacheEntry>,
}

const CACHE_MAGIC: &[u8; 8] = b"FRRYHC01";
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
            fs::create_dir_all(dir)?;
        }
        let mut v: Vec<(&String, &CacheEntry)> = self.map.iter().collect();
        v.sort_by(|a, b| a.0.cmp(b.0));
        let mut out = CACHE_MAGIC.to_vec();
        out = postcard::to_extend(&v, out).map_err(io::Error::other)?;
        let tmp = path.with_extension("tmp");
        fs::write(&tmp, out)?;
        fs::rename(&tmp, path)
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

struct PendingFile {
    index: usize,
    abs: PathBuf,
    size: u64,
    chunk_shift: u8,
}

/// Scans `root` into a manifest, using and refreshing `cache` when given.
pub fn scan(
    root: &Path,
    cache: Option<&mut HashCache>,
    cfg: &ScanConfig,
) -> Result<ScanOutput, ScanError> {
    let md = fs::metadata(root).map_err(|e| ScanError::Io {
        path: root.to_path_buf(),
        source: e,
    })?;
    if !md.is_dir() {
        return Err(ScanError::NotADirectory(root.to_path_buf()));
    }
    let mut entries: Vec<WireEntry> = Vec::new();
    let mut keys: Vec<(u64, Mtime)> = Vec::new(); // (ino, mtime) per entry for the cache
    let mut skipped = Vec::new();
    let mut pending: Vec<PendingFile> = Vec::new();
    let mut cached_files = 0u64;
    let mut cache = cache;
    let mut fresh: HashMap<String, CacheEntry> = HashMap::new();

    // Depth-first walk with an explicit stack; names sorted for determinism.
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
            let name = ent.file_name();
            let Some(name) = name.to_str() else {
                skipped.push(Skipped {
                    path: format!("{}/{}", rel, name.to_string_lossy()),
                    reason: "the name is not valid UTF-8".into(),
                });
                continue;
            };
            let path = if rel.is_empty() {
                name.to_string()
            } else {
                format!("{rel}/{name}")
            };
            if rel.is_empty() && name == STATE_DIR {
                skipped.push(Skipped {
                    path,
                    reason: "ferry's own state folder".into(),
                });
                continue;
            }
            if let Err(p) = crate::path::check_relative_path(&path) {
                skipped.push(Skipped {
                    path,
                    reason: p.to_string(),
                });
                continue;
            }
            let abs = ent.path();
            let md = fs::symlink_metadata(&abs).map_err(|e| ScanError::Io {
                path: abs.clone(),
                source: e,
            })?;
            let mtime = Mtime {
                secs: md.mtime(),
                nanos: md.mtime_nsec().clamp(0, 999_999_999) as u32,
            };
            let mode = md.permissions().mode() & 0o7777;
            let ft = md.file_type();
            if ft.is_dir() {
                entries.push(WireEntry {
                    path: path.clone(),
                    kind: EntryKind::Dir,
                    size: 0,
                    mode,
                    mtime,
                    hashes: vec![],
                });
                keys.push((md.ino(), mtime));
                stack.push((abs, path));
            } else if ft.is_symlink() {
                let target = fs::read_link(&abs).map_err(|e| ScanError::Io {
                    path: abs.clone(),
                    source: e,
                })?;
                match target.to_str() {
                    Some(t) if symlink_stays_inside(&path, t) => {
                        entries.push(WireEntry {
                            path,
                            kind: EntryKind::Symlink {
                                target: t.to_string(),
                            },
                            size: 0,
                            mode: 0o777,
                            mtime,
                            hashes: vec![],
                        });
                        keys.push((md.ino(), mtime));
                    }
                    _ => skipped.push(Skipped {
                        path,
                        reason: format!(
                            "symlink to {} points outside the folder",
                            target.display()
                        ),
                    }),
                }
            } else if ft.is_file() {
                let size = md.len();
                let chunk_shift = chunk_shift_for(size);
                let hit = cache.as_ref().and_then(|c| c.map.get(&path)).filter(|c| {
                    c.size == size
                        && c.mtime == mtime
                        && c.ino == md.ino()
                        && c.chunk_shift == chunk_shift
                        && c.hashes.len() as u64 == chunk_count(size, chunk_shift)
                });
                let hashes = match hit {
                    Some(c) => {
                        cached_files += 1;
                        c.hashes.clone()
                    }
                    None => {
                        pending.push(PendingFile {
                            index: entries.len(),
                            abs,
                            size,
                            chunk_shift,
                        });
                        Vec::new()
                    }
                };
                entries.push(WireEntry {
                    path,
                    kind: EntryKind::File { chunk_shift },
                    size,
                    mode,
                    mtime,
                    hashes,
                });
                keys.push((md.ino(), mtime));
            } else {
                skipped.push(Skipped {
                    path,
                    reason: "not a regular file, directory or symlink".into(),
                });
            }
        }
    }

    let hashed_bytes = pending.iter().map(|p| p.size).sum();
    let results = hash_files(&pending, cfg.threads)?;
    for (p, hashes) in pending.iter().zip(results) {
        entries[p.index].hashes = hashes;
    }
    for (e, (ino, mtime)) in entries.iter().zip(&keys) {
        if let EntryKind::File { chunk_shift } = e.kind {
            fresh.insert(
                e.path.clone(),
                CacheEntry {
                    size: e.size,
                    mtime: *mtime,
                    ino: *ino,
                    chunk_shift,
                    hashes: e.hashes.clone(),
                },
            );
        }
    }
    if let Some(c) = cache.as_mut() {
        c.map = fresh;
    }
    let manifest = Manifest::from_wire_entries(entries)?;
    Ok(ScanOutput {
        manifest,
        skipped,
        hashed_bytes,
        cached_files,
    })
}

fn hash_files(files: &[PendingFile], threads: usize) -> Result<Vec<Vec<ChunkHash>>, ScanError> {
    let threads = if threads == 0 {
        std::thread::available_parallelism().map_or(2, |n| n.get())
    } else {
        threads
    }
    .clamp(1, 16);
    let next = AtomicUsize::new(0);
    let out: Mutex<Vec<Option<Vec<ChunkHash>>>> = Mutex::new(vec![None; files.len()]);
    let err: Mutex<Option<ScanError>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..threads.min(files.len().max(1)) {
            s.spawn(|| {
                let mut buf = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(f) = files.get(i) else { break };
                    match hash_file(f, &mut buf) {
                        Ok(h) => out.lock().unwrap_or_else(|p| p.into_inner())[i] = Some(h),
                        Err(e) => {
                            *err.lock().unwrap_or_else(|p| p.into_inner()) = Some(ScanError::Io {
                                path: f.abs.clone(),
                                source: e,
                            });
                            next.store(files.len(), Ordering::Relaxed);
                            break;
                        }
                    }
                }
            });
        }
    });
    if let Some(e) = err.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    Ok(out
        .into_inner()
        .unwrap_or_else(|p| p.into_inner())
        .into_iter()
        .map(Option::unwrap_or_default)
        .collect())
}

fn hash_file(f: &PendingFile, buf: &mut Vec<u8>) -> io::Result<Vec<ChunkHash>> {
    let csize = 1usize << f.chunk_shift;
    // Read several chunks per call for small chunk sizes.
    let per_read = csize.max(1 << 22);
    buf.resize(per_read, 0);
    let mut file = File::open(&f.abs)?;
    let n = chunk_count(f.size, f.chunk_shift) as usize;
    let mut hashes = Vec::with_capacity(n);
    let mut left = f.size;
    while left > 0 {
        let want = (left as usize).min(per_read);
        file.read_exact(&mut buf[..want]).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                io::Error::other("the file shrank while it was being scanned")
            } else {
                e
            }
        })?;
        for piece in buf[..want].chunks(csize) {
            hashes.push(ChunkHash::of(piece));
        }
        left -= want as u64;
    }
    Ok(hashes)
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
