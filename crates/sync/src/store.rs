//! The receiver's crash-safe store.
//!
//! Everything ferry keeps for an unfinished migration lives in `DEST/.ferry/` ([`STATE_DIR`]):
//! ```text
//! .ferry/lock            held (flock) while a receiver uses DEST
//! .ferry/staging/<key>   one file per manifest file, preallocated to its size; key = BLAKE3(path)
//! .ferry/journal         append-only records: (key, offset, len, hash, check)
//! .ferry/receipt         after completion: the manifest (frames) that DEST now holds
//! .ferry/receipt.json    after completion: a human-readable summary
//! .ferry/receipt.prev    during a later round (catch-up): the receipt of the tree in place
//! ```
//! All of it is owner-only (folders `0700`, files `0600`, see [`crate::private`]), and so is
//! DEST when the store creates it: the history is private while it moves.
//!
//! # Durability ordering
//! 1. A received chunk is verified (bounded decode, BLAKE3) before it is written anywhere.
//! 2. It is written into its staging file(s) at its offset. Nothing claims it yet.
//! 3. **Commit**: the staging files written since the last commit are `fdatasync`ed — or, when
//!    more than a few small files were written, the file system is `syncfs`ed once — (and the
//!    staging directory, when files were created), *then* the chunks' journal records are appended
//!    and the journal is `fdatasync`ed. A record therefore never names data that is not on disk.
//! 4. On open, the journal is read up to the first torn or corrupt record (each record carries a
//!    check hash), records that do not match the new manifest exactly are dropped, and the
//!    compacted journal replaces the old one (write, fsync, rename, fsync dir) *before* any new
//!    write, so a slot the journal claims is never overwritten with other content.
//! 5. **Finalize** trusts what this process verified and made durable: a chunk received (step 1),
//!    copied locally (re-hashed on the way) or found complete at its final path (hashed while
//!    surveyed) is not read again. Finalize checks that every slot of every file is claimed and
//!    that each staging file has its manifest size (one `statx`), and re-reads (and re-hashes)
//!    only the files with a slot claimed by a journal an *earlier process* wrote: between that
//!    process's end and this one's start nobody held the lock, so the staging file could have
//!    been changed behind ferry's back (or lost a write on a disk that lies about `fsync`) — the
//!    record's check hash proves the record, not the data. A staged file is checked and given
//!    its mode and mtime by name in ferry's owner-only staging folder (`statx`, `chmod`,
//!    `utimensat`: no open and close per file). With
//!    [`FsStore::verify_at_end`] every file is re-read, as `ferry verify` does afterwards.
//!    Then each file gets its mode (without setuid/setgid/sticky, masked by the umask, owner
//!    access kept) and mtime, and is renamed into place (its data is durable since its commit) —
//!    from directory handles, never through a symlink (see [`FsStore::finalize`]); one `syncfs`
//!    then makes every mode, mtime, new directory and rename durable, the parent directories
//!    are `fsync`ed (once each, after it: not one journal commit per new directory);
//!    then the receipt is written (tmp, fsync, rename, fsync). Only then are journal and staging
//!    removed. A final path only ever receives a complete, verified file.
//!
//! Files found in place by the previous round's receipt (same size and mtime as ferry left them,
//! not read) are trusted as the receipt says, like a destination that already holds the whole
//! manifest; `ferry verify` (or [`FsStore::verify_at_end`]) reads them.
//!
//! A `kill -9` at any instant loses at most the chunks written since the last commit. Files that
//! are already in place at their final path (an interrupted finalize, an earlier round, or an
//! older copy of the same history) are checked chunk by chunk and reused — also when the file
//! has since grown or shrunk (a database that received messages): every chunk that lies within
//! the old file and still matches is copied locally instead of crossing the network.
//!
//! # Rounds
//! A new manifest (a catch-up round) turns the receipt into `receipt.prev`: it names the files
//! ferry brought. Finalize removes those of them the new manifest no longer has — only if they
//! are still exactly as ferry left them (size and mtime), never any other file — then writes the
//! new receipt and deletes `receipt.prev`.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use rustix::fs::{AtFlags, Mode, OFlags};
use rustix::io::Errno;

use crate::compress::{decode_verified, ChunkError, Encoding};
use crate::manifest::{
    ChunkHash, ChunkId, EntryId, EntryKind, Manifest, ManifestBuilder, ManifestLimits, Mtime,
    SlotId,
};
pub use crate::path::STATE_DIR;
use crate::private;
use crate::proto::frame::{self, Frame, Message, MANIFEST_FRAME_TARGET};
use crate::proto::{RecvIo, RecvIoDone};

const RECORD_LEN: usize = 16 + 8 + 4 + 32 + 8;
const JOURNAL_MAGIC: &[u8; 8] = b"FRRYJRN1";
const RECEIPT_MAGIC: &[u8; 8] = b"FRRYRCP1";
/// Staging files held open at once. Dirty files are closed too when this many are open: a
/// commit makes them durable by `syncfs` (or, for a few, by reopening them for `fdatasync`), so a
/// window of thousands of tiny files never needs a descriptor each (`ulimit -n 256` is enough).
const MAX_OPEN_FILES: usize = 128;

/// A store failure. The text states what happened and where; what the user should do about it
/// (and which command to run then) is the application's to say, by kind. Whatever the kind,
/// everything the store had committed stays committed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("no space left on the destination while writing {path}")]
    NoSpace { path: PathBuf },
    #[error("permission denied on {path}")]
    PermissionDenied { path: PathBuf },
    #[error("{path} is on a read-only file system")]
    ReadOnly { path: PathBuf },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path} is in the way: {why}")]
    Conflict { path: PathBuf, why: String },
    #[error("another ferry receiver is using {0}")]
    Locked(PathBuf),
    #[error("the store was used before prepare()")]
    NotPrepared,
    #[error("{path} is not a valid ferry receipt: {why}")]
    BadReceipt { path: PathBuf, why: String },
    #[error("{0} has no ferry receipt: it does not hold a completed migration")]
    NoReceipt(PathBuf),
    #[error("not enough space at {}: the rest of the history needs {} more, only {} is free", path.display(), mib(*needed), mib(*available))]
    InsufficientSpace {
        path: PathBuf,
        needed: u64,
        available: u64,
    },
}

/// Two store errors are equal when they are the same failure at the same path (an I/O error
/// by its kind and message), so that session errors carrying one compare.
impl PartialEq for StoreError {
    fn eq(&self, other: &Self) -> bool {
        use StoreError as E;
        match (self, other) {
            (E::NoSpace { path: a }, E::NoSpace { path: b })
            | (E::PermissionDenied { path: a }, E::PermissionDenied { path: b })
            | (E::ReadOnly { path: a }, E::ReadOnly { path: b })
            | (E::Locked(a), E::Locked(b))
            | (E::NoReceipt(a), E::NoReceipt(b)) => a == b,
            (E::Io { path: a, source: x }, E::Io { path: b, source: y }) => {
                a == b && x.kind() == y.kind() && x.to_string() == y.to_string()
            }
            (E::Conflict { path: a, why: x }, E::Conflict { path: b, why: y })
            | (E::BadReceipt { path: a, why: x }, E::BadReceipt { path: b, why: y }) => {
                a == b && x == y
            }
            (E::NotPrepared, E::NotPrepared) => true,
            (
                E::InsufficientSpace {
                    path: a,
                    needed: n,
                    available: v,
                },
                E::InsufficientSpace {
                    path: b,
                    needed: m,
                    available: w,
                },
            ) => a == b && n == m && v == w,
            _ => false,
        }
    }
}

impl Eq for StoreError {}

impl StoreError {
    fn io(path: &Path, source: io::Error) -> Self {
        match source.kind() {
            io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded => StoreError::NoSpace {
                path: path.to_path_buf(),
            },
            io::ErrorKind::PermissionDenied => StoreError::PermissionDenied {
                path: path.to_path_buf(),
            },
            io::ErrorKind::ReadOnlyFilesystem => StoreError::ReadOnly {
                path: path.to_path_buf(),
            },
            _ => StoreError::Io {
                path: path.to_path_buf(),
                source,
            },
        }
    }
}

fn ctx<T>(path: &Path, r: io::Result<T>) -> Result<T, StoreError> {
    r.map_err(|e| StoreError::io(path, e))
}

/// Name of a file's staging file.
fn staging_key(path: &str) -> [u8; 16] {
    let h = blake3::hash(path.as_bytes());
    let mut k = [0u8; 16];
    k.copy_from_slice(&h.as_bytes()[..16]);
    k
}

/// `n` bytes in MiB with one decimal, as store messages show sizes.
pub fn mib(n: u64) -> String {
    format!("{:.1} MiB", n as f64 / 1048576.0)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The staging key a staging file's name spells ([`hex`] of it), if it is one.
fn key_of(name: &str) -> Option<[u8; 16]> {
    if name.len() != 32 || !name.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    let mut k = [0u8; 16];
    for (i, b) in k.iter_mut().enumerate() {
        *b = u8::from_str_radix(name.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(k)
}

#[derive(Clone, Copy, PartialEq, Eq)]
struct Record {
    key: [u8; 16],
    offset: u64,
    len: u32,
    hash: ChunkHash,
}

impl Record {
    fn encode(&self) -> [u8; RECORD_LEN] {
        let mut b = [0u8; RECORD_LEN];
        b[..16].copy_from_slice(&self.key);
        b[16..24].copy_from_slice(&self.offset.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..60].copy_from_slice(&self.hash.0);
        let check = blake3::hash(&b[..60]);
        b[60..].copy_from_slice(&check.as_bytes()[..8]);
        b
    }

    fn decode(b: &[u8; RECORD_LEN]) -> Option<Self> {
        let check = blake3::hash(&b[..60]);
        if b[60..] != check.as_bytes()[..8] {
            return None;
        }
        let mut key = [0u8; 16];
        key.copy_from_slice(&b[..16]);
        let mut hash = [0u8; 32];
        hash.copy_from_slice(&b[28..60]);
        Some(Record {
            key,
            offset: u64::from_le_bytes(b[16..24].try_into().ok()?),
            len: u32::from_le_bytes(b[24..28].try_into().ok()?),
            hash: ChunkHash(hash),
        })
    }
}

/// Where a file's verified bytes are.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Home {
    Staging,
    /// Already complete at its final path.
    InPlace,
}

struct Prepared {
    manifest: Arc<Manifest>,
    /// Per entry; a file found damaged in place is moved back to staging (and fetched whole).
    homes: Mutex<Vec<Home>>,
    /// What this process knows to be verified and durable.
    ledger: Mutex<Ledger>,
    /// DEST already holds exactly this manifest (receipt + unchanged metadata).
    complete: bool,
}

/// Which slots this store has claimed (durable, as prepare found them or as committed since) and
/// which files finalize must read back: those with a slot claimed by a journal an earlier
/// process wrote (see the module docs, step 5). One bit per slot and per entry.
struct Ledger {
    claimed: Vec<u64>,
    reread: Vec<u64>,
}

impl Ledger {
    fn new(slots: u32, entries: usize) -> Self {
        Ledger {
            claimed: vec![0; (slots as usize).div_ceil(64)],
            reread: vec![0; entries.div_ceil(64)],
        }
    }

    fn set(bits: &mut [u64], i: usize, v: bool) {
        if let Some(w) = bits.get_mut(i / 64) {
            let m = 1u64 << (i % 64);
            if v {
                *w |= m;
            } else {
                *w &= !m;
            }
        }
    }

    fn get(bits: &[u64], i: usize) -> bool {
        bits.get(i / 64)
            .is_some_and(|w| w & (1u64 << (i % 64)) != 0)
    }

    fn claim(&mut self, slots: &[SlotId], v: bool) {
        for s in slots {
            Self::set(&mut self.claimed, s.index(), v);
        }
    }

    fn claimed(&self, s: SlotId) -> bool {
        Self::get(&self.claimed, s.index())
    }

    fn reread(&self, entry: usize) -> bool {
        Self::get(&self.reread, entry)
    }
}

/// What [`FsStore::prepare`] found before writing anything.
struct Survey {
    /// Slots already durable (journaled in staging, or in a file complete in place).
    durable: Vec<SlotId>,
    /// Journal records that stay true for this manifest.
    keep: Vec<Record>,
    /// Per entry.
    homes: Vec<Home>,
    /// Entries with a slot claimed by the journal (an earlier process): read back at finalize.
    journaled: Vec<usize>,
    /// Entries with chunks at their final path to copy into staging, and those slots.
    local: Vec<(usize, Vec<SlotId>)>,
    /// The staging files present that this manifest uses (sorted keys).
    wanted_keys: Vec<[u8; 16]>,
}

/// The slots of file `e` (staging key `key`) that the journal claims exactly as `m` has them,
/// with their records.
fn journaled_slots(
    m: &Manifest,
    e: &crate::manifest::Entry,
    key: [u8; 16],
    records: &HashMap<([u8; 16], u64), Record>,
) -> Vec<(SlotId, Record)> {
    let mut found = Vec::new();
    for slot in e.slots() {
        let (Some(loc), Some(hash)) = (m.locate(slot), m.slot_hash(slot)) else {
            continue;
        };
        let want = Record {
            key,
            offset: loc.offset,
            len: loc.len,
            hash,
        };
        if records.get(&(key, loc.offset)) == Some(&want) {
            found.push((slot, want));
        }
    }
    found
}

#[derive(Default)]
struct Open {
    files: HashMap<EntryId, Arc<File>>,
    dirty: HashSet<EntryId>,
    created: bool,
}

/// Summary of a completed migration, as written in the receipt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Receipt {
    pub root: ChunkHash,
    pub files: u64,
    pub bytes: u64,
}

/// The receiver's store for one destination directory.
pub struct FsStore {
    dest: PathBuf,
    /// DEST as opened by [`FsStore::open`]: every final path is reached from this handle, one
    /// directory at a time and never through a symlink (see [`FsStore::open_dir`]).
    dest_dir: File,
    state: PathBuf,
    staging: PathBuf,
    /// What the receiving user's umask takes away from a sender's modes.
    umask: u32,
    /// DEST's file system treats names that differ only in case as the same name.
    folds_case: bool,
    normalizes: bool,
    /// DEST's file system can hold symlinks (not exFAT, FAT, nor Windows without the privilege).
    symlinks: bool,
    _lock: File,
    /// Finalize re-reads every file, not only those an earlier process journaled.
    verify_at_end: bool,
    /// Bytes finalize read back to verify them (see [`FsStore::bytes_read_back`]).
    read_back: std::sync::atomic::AtomicU64,
    prepared: Mutex<Option<Arc<Prepared>>>,
    open: Mutex<Open>,
    journal: Mutex<Option<BufWriter<File>>>,
}

impl std::fmt::Debug for FsStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FsStore")
            .field("dest", &self.dest)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl FsStore {
    /// Opens (creating if needed) the store of `dest`, taking its lock.
    ///
    /// A DEST that ferry creates is owner-only (`0700`), and so is everything under `.ferry`
    /// (folders `0700`, files `0600`): a history is private while it moves. An existing DEST
    /// keeps its mode. The open also probes whether DEST's file system folds case
    /// ([`FsStore::folds_case`]).
    pub fn open(dest: &Path) -> Result<Self, StoreError> {
        if fs::symlink_metadata(dest).is_err() {
            use std::os::unix::fs::DirBuilderExt;
            ctx(
                dest,
                fs::DirBuilder::new()
                    .recursive(true)
                    .mode(private::DIR_MODE)
                    .create(dest),
            )?;
        }
        let dest_dir = ctx(dest, open_dir_path(dest))?;
        let state = dest.join(STATE_DIR);
        let staging = state.join("staging");
        ctx(&state, private::create_dir_all(&state))?;
        let lock_path = state.join("lock");
        let lock_file = ctx(
            &lock_path,
            private::options()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&lock_path),
        )?;
        ctx(&lock_path, private::narrow(&lock_file))?;
        match lock_file.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                return Err(StoreError::Locked(dest.to_path_buf()))
            }
            Err(fs::TryLockError::Error(e)) => return Err(StoreError::io(&lock_path, e)),
        }
        let folds_case = ctx(&state, probe_case_folding(&state))?;
        let normalizes = ctx(&state, probe_normalization(&state))?;
        let symlinks = ctx(&state, probe_symlinks(&state))?;
        Ok(FsStore {
            dest: dest.to_path_buf(),
            dest_dir,
            state,
            staging,
            umask: private::umask(),
            folds_case,
            normalizes,
            symlinks,
            _lock: lock_file,
            verify_at_end: false,
            read_back: std::sync::atomic::AtomicU64::new(0),
            prepared: Mutex::new(None),
            open: Mutex::new(Open::default()),
            journal: Mutex::new(None),
        })
    }

    /// With `true`, finalize re-reads and re-hashes every file (in staging and in place) before
    /// anything moves, as `ferry verify` does afterwards; by default it reads back only the
    /// files an earlier process journaled (see the module docs, step 5).
    pub fn verify_at_end(mut self, yes: bool) -> Self {
        self.verify_at_end = yes;
        self
    }

    /// Bytes finalize has read back from disk to verify them, over this store's life: 0 for a
    /// migration received in one process without [`FsStore::verify_at_end`].
    pub fn bytes_read_back(&self) -> u64 {
        self.read_back.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The destination directory.
    pub fn dest(&self) -> &Path {
        &self.dest
    }

    /// Whether DEST's file system treats names that differ only in case as one name (exFAT and
    /// FAT drives, macOS and Windows by default, Android shared storage). Then a manifest with
    /// such names must be refused ([`crate::manifest::ManifestLimits::case_insensitive`]):
    /// one file would silently replace the other.
    pub fn folds_case(&self) -> bool {
        self.folds_case
    }

    /// Whether DEST's file system can hold symlinks. When it cannot (exFAT, FAT), finalize
    /// leaves the manifest's symlinks out, the receipt lists them
    /// ([`read_omitted`]) and everything else is placed and verified as usual.
    pub fn holds_symlinks(&self) -> bool {
        self.symlinks
    }

    /// Whether DEST's file system finds a name under another Unicode normalisation of it (APFS,
    /// HFS+): then names that differ only so must be refused
    /// ([`crate::manifest::ManifestLimits::normalization_insensitive`]).
    pub fn normalizes(&self) -> bool {
        self.normalizes
    }

    /// Whether `dest` holds an unfinished ferry migration.
    pub fn has_unfinished(dest: &Path) -> bool {
        dest.join(STATE_DIR).join("journal").exists()
    }

    /// Whether `dest` holds anything of a migration in progress: a journal or staged files.
    pub fn has_leftovers(dest: &Path) -> bool {
        let state = dest.join(STATE_DIR);
        state.join("journal").exists() || state.join("staging").exists()
    }

    /// Whether `dest` holds nothing ferry left: no journal, staging, receipt or previous
    /// receipt. Such a store may be prepared for growing prefixes of a streamed manifest
    /// ([`crate::proto::ReceiverConfig::stream`]): no prefix can then drop journal records or
    /// staging files of entries not yet announced.
    pub fn is_fresh(dest: &Path) -> bool {
        let state = dest.join(STATE_DIR);
        !(FsStore::has_leftovers(dest)
            || FsStore::has_receipt(dest)
            || state.join("receipt.prev").exists())
    }

    /// Whether `dest` holds a completed ferry migration.
    pub fn has_receipt(dest: &Path) -> bool {
        dest.join(STATE_DIR).join("receipt").exists()
    }

    /// Performs one I/O request of the receiver machine.
    pub fn execute(&self, io: RecvIo) -> RecvIoDone {
        let r = match io {
            RecvIo::Prepare { manifest } => self
                .prepare(&manifest)
                .map(|durable| RecvIoDone::Prepared { durable }),
            RecvIo::Store {
                chunk,
                encoding,
                payload,
                slots,
            } => match self.store_chunk(chunk, encoding, payload, &slots) {
                Ok(Ok(())) => Ok(RecvIoDone::Stored { chunk, slots }),
                Ok(Err(e)) => Ok(RecvIoDone::Corrupt {
                    chunk,
                    error: e.to_string(),
                }),
                Err(e) => Err(e),
            },
            RecvIo::Copy { chunk, from, to } => match self.copy_chunk(chunk, from, &to) {
                Ok(Ok(())) => Ok(RecvIoDone::Stored { chunk, slots: to }),
                Ok(Err(damaged)) => Ok(RecvIoDone::CopyFailed { chunk, damaged }),
                Err(e) => Err(e),
            },
            RecvIo::Commit { slots } => self
                .commit(&slots)
                .map(|()| RecvIoDone::Committed { slots }),
            RecvIo::Finalize => self.finalize().map(|damaged| {
                if damaged.is_empty() {
                    RecvIoDone::Finalized
                } else {
                    RecvIoDone::Damaged { slots: damaged }
                }
            }),
        };
        r.unwrap_or_else(|e| RecvIoDone::Failed { error: Arc::new(e) })
    }

    fn prepared(&self) -> Result<Arc<Prepared>, StoreError> {
        lock(&self.prepared).clone().ok_or(StoreError::NotPrepared)
    }

    fn staging_path(&self, path: &str) -> PathBuf {
        self.staging.join(hex(&staging_key(path)))
    }

    /// Opens the store for `manifest` and returns every slot already durable.
    ///
    /// In order: a destination that already holds `manifest` is done at once; otherwise an
    /// older receipt is retired, every file is surveyed (journal, then final paths), the free
    /// space is checked, chunks found at final paths are copied into staging, stale staging
    /// files go, and the journal is compacted before anything new is written.
    pub fn prepare(&self, manifest: &Arc<Manifest>) -> Result<Vec<SlotId>, StoreError> {
        *lock(&self.journal) = None;
        *lock(&self.open) = Open::default();
        if let Some(durable) = self.prepare_complete(manifest) {
            return Ok(durable);
        }
        self.retire_receipt(manifest)?;
        ctx(&self.staging, private::create_dir_all(&self.staging))?;
        let records = read_journal(&self.state.join("journal"))?;
        let Survey {
            mut durable,
            mut keep,
            homes,
            journaled,
            local,
            mut wanted_keys,
        } = self.survey(manifest, &records)?;
        self.check_space(manifest, &durable, &homes)?;
        wanted_keys.extend(
            local
                .iter()
                .filter_map(|(i, _)| manifest.entries().get(*i))
                .map(|e| staging_key(&e.path)),
        );
        wanted_keys.sort_unstable();
        self.copy_local(manifest, local, &mut keep, &mut durable)?;
        self.remove_stale_staging(&wanted_keys)?;
        let journal = self.compact_journal(&keep)?;
        *lock(&self.journal) = Some(journal);
        let mut ledger = Ledger::new(manifest.slot_count(), manifest.entries().len());
        ledger.claim(&durable, true);
        for i in journaled {
            Ledger::set(&mut ledger.reread, i, true);
        }
        *lock(&self.prepared) = Some(Arc::new(Prepared {
            manifest: Arc::clone(manifest),
            homes: Mutex::new(homes),
            ledger: Mutex::new(ledger),
            complete: false,
        }));
        Ok(durable)
    }

    /// Already complete (a session that finished but could not tell the sender): the receipt
    /// names this root and every entry is in place with the size and mtime finalize gave it.
    /// Then every slot is durable.
    fn prepare_complete(&self, manifest: &Arc<Manifest>) -> Option<Vec<SlotId>> {
        if !(read_receipt(&self.dest).is_ok_and(|r| r.root() == manifest.root())
            && self.in_place_by_metadata(manifest))
        {
            return None;
        }
        *lock(&self.prepared) = Some(Arc::new(Prepared {
            manifest: Arc::clone(manifest),
            homes: Mutex::new(vec![Home::InPlace; manifest.entries().len()]),
            ledger: Mutex::new(Ledger::new(0, 0)),
            complete: true,
        }));
        Some((0..manifest.slot_count()).map(SlotId).collect())
    }

    /// A receipt for other content stops being true as soon as files start to change. It is
    /// kept as `receipt.prev`: the list of what ferry brought (see the module docs).
    fn retire_receipt(&self, manifest: &Manifest) -> Result<(), StoreError> {
        if FsStore::has_receipt(&self.dest)
            && read_receipt(&self.dest).map_or(true, |r| r.root() != manifest.root())
        {
            let p = self.state.join("receipt");
            let prev = self.state.join("receipt.prev");
            ctx(&prev, fs::rename(&p, &prev))?;
            let _ = fs::remove_file(self.state.join("receipt.json"));
            let _ = fs::remove_file(self.state.join(OMITTED));
            ctx(&self.state, sync_dir(&self.state))?;
        }
        Ok(())
    }

    /// What the store already holds of `manifest`: slots the journal claims (in staging files
    /// that exist), files complete at their final path, and chunks of files at their final path
    /// to copy into staging (after the space check). Reads files but writes nothing.
    fn survey(
        &self,
        manifest: &Manifest,
        records: &HashMap<([u8; 16], u64), Record>,
    ) -> Result<Survey, StoreError> {
        // What the previous round left in place, as its receipt describes it.
        let prev = read_receipt_file(&self.state.join("receipt.prev")).ok();
        let prev_index: HashMap<&str, usize> = prev.as_ref().map_or_else(HashMap::new, |p| {
            p.entries()
                .iter()
                .enumerate()
                .map(|(i, e)| (e.path.as_str(), i))
                .collect()
        });
        let mut s = Survey {
            durable: Vec::new(),
            keep: Vec::new(),
            homes: vec![Home::Staging; manifest.entries().len()],
            journaled: Vec::new(),
            local: Vec::new(),
            wanted_keys: Vec::new(),
        };
        // One listing of staging instead of a lookup per file (none at all in a fresh DEST),
        // and one lookup per folder for the final paths: entries are sorted, so a file's
        // folder is mostly the previous file's.
        let present = self.staged_keys();
        let mut folder: Option<(String, bool)> = None;
        for (i, e) in manifest.entries().iter().enumerate() {
            if !e.is_file() {
                continue;
            }
            let key = staging_key(&e.path);
            let staged = present.binary_search(&key).is_ok();
            let n = e.chunks();
            if staged {
                s.wanted_keys.push(key);
                let found = journaled_slots(manifest, e, key, records);
                let complete = found.len() == n as usize;
                if !found.is_empty() {
                    s.journaled.push(i);
                }
                for (slot, r) in found {
                    s.keep.push(r);
                    s.durable.push(slot);
                }
                if complete {
                    continue;
                }
            }
            // Is the file (or part of it) already at its final path? Not if its folder is not.
            let parent = e.path.rsplit_once('/').map_or("", |(d, _)| d);
            if folder.as_ref().is_none_or(|(f, _)| f != parent) {
                let there = fs::symlink_metadata(self.dest.join(parent)).is_ok_and(|m| m.is_dir());
                folder = Some((parent.to_string(), there));
            }
            if folder.as_ref().is_some_and(|(_, there)| !there) {
                continue;
            }
            let by_receipt = match (&prev, prev_index.get(e.path.as_str())) {
                (Some(p), Some(&pi)) => self.reusable_by_receipt(p, pi, manifest, i),
                _ => None,
            };
            let reusable = match by_receipt {
                Some(r) => Some(r),
                None => self.reusable_in_place(manifest, EntryId(i as u32))?,
            };
            if let Some((reuse, same_size)) = reusable {
                if reuse.len() == n as usize && same_size && !staged {
                    s.homes[i] = Home::InPlace;
                    s.durable.extend(reuse);
                } else if !staged && !reuse.is_empty() {
                    s.local.push((i, reuse));
                }
            }
        }
        Ok(s)
    }

    /// Free space, before anything is written: the files still to be staged, less what is
    /// already durable in staging, plus room for the journal and directories.
    fn check_space(
        &self,
        manifest: &Manifest,
        durable: &[SlotId],
        homes: &[Home],
    ) -> Result<(), StoreError> {
        let durable_set: HashSet<SlotId> = durable.iter().copied().collect();
        let mut needed: u64 = 16 << 20;
        for (i, e) in manifest.entries().iter().enumerate() {
            if !e.is_file() || homes[i] == Home::InPlace {
                continue;
            }
            let have: u64 = e
                .slots()
                .filter(|s| durable_set.contains(s))
                .filter_map(|s| manifest.locate(s))
                .map(|l| u64::from(l.len))
                .sum();
            needed += e.size.saturating_sub(have);
        }
        if let Ok(st) = rustix::fs::statvfs(&self.state) {
            let available = st.f_bavail.saturating_mul(st.f_frsize);
            if available < needed {
                return Err(StoreError::InsufficientSpace {
                    path: self.dest.clone(),
                    needed,
                    available,
                });
            }
        }
        Ok(())
    }

    /// Copies the chunks found at final paths into new staging files; they become durable with
    /// the compacted journal (their records go to `keep`, their slots to `durable`). Each chunk is
    /// hashed on the way (one found by the receipt was not read before): one that no longer
    /// matches is left out, to be fetched, so finalize need not read these files back.
    fn copy_local(
        &self,
        manifest: &Manifest,
        local: Vec<(usize, Vec<SlotId>)>,
        keep: &mut Vec<Record>,
        durable: &mut Vec<SlotId>,
    ) -> Result<(), StoreError> {
        for (i, reuse) in local {
            let e = &manifest.entries()[i];
            let key = staging_key(&e.path);
            let final_path = self.dest.join(&e.path);
            let src = ctx(&final_path, open_nofollow(&final_path))?;
            let (dst, _) = self.create_staging(&e.path, e.size)?;
            let mut buf = vec![0u8; e.chunk_size() as usize];
            for slot in reuse {
                let (Some(loc), Some(hash)) = (manifest.locate(slot), manifest.slot_hash(slot))
                else {
                    continue;
                };
                let b = &mut buf[..loc.len as usize];
                ctx(&final_path, src.read_exact_at(b, loc.offset))?;
                if ChunkHash::of(b) != hash {
                    continue;
                }
                ctx(&self.staging, dst.write_all_at(b, loc.offset))?;
                keep.push(Record {
                    key,
                    offset: loc.offset,
                    len: loc.len,
                    hash,
                });
                durable.push(slot);
            }
            ctx(&self.staging, dst.sync_data())?;
        }
        Ok(())
    }

    /// The staging files present, by key (sorted); anything else there is ignored (and removed
    /// by [`Self::remove_stale_staging`]).
    fn staged_keys(&self) -> Vec<[u8; 16]> {
        let mut keys: Vec<[u8; 16]> = fs::read_dir(&self.staging)
            .map(|rd| {
                rd.flatten()
                    .filter_map(|ent| key_of(&ent.file_name().to_string_lossy()))
                    .collect()
            })
            .unwrap_or_default();
        keys.sort_unstable();
        keys
    }

    /// Staging files of files no longer in the manifest are garbage (`wanted_keys`: sorted).
    fn remove_stale_staging(&self, wanted_keys: &[[u8; 16]]) -> Result<(), StoreError> {
        if let Ok(rd) = fs::read_dir(&self.staging) {
            for ent in rd.flatten() {
                let name = ent.file_name().to_string_lossy().into_owned();
                if key_of(&name).is_none_or(|k| wanted_keys.binary_search(&k).is_err()) {
                    let _ = fs::remove_file(ent.path());
                }
            }
        }
        ctx(&self.staging, sync_dir(&self.staging))
    }

    /// Replaces the journal with `keep` (write, fsync, rename, fsync dir) before anything new
    /// is written (see the module docs), and opens it for appending.
    fn compact_journal(&self, keep: &[Record]) -> Result<BufWriter<File>, StoreError> {
        let journal_path = self.state.join("journal");
        let tmp = self.state.join("journal.tmp");
        {
            let f = ctx(&tmp, private::create(&tmp))?;
            let mut w = BufWriter::new(f);
            ctx(&tmp, w.write_all(JOURNAL_MAGIC))?;
            for r in keep {
                ctx(&tmp, w.write_all(&r.encode()))?;
            }
            let f = ctx(&tmp, w.into_inner().map_err(|e| e.into_error()))?;
            ctx(&tmp, f.sync_all())?;
        }
        ctx(&journal_path, fs::rename(&tmp, &journal_path))?;
        ctx(&self.state, sync_dir(&self.state))?;
        let f = ctx(
            &journal_path,
            OpenOptions::new().append(true).open(&journal_path),
        )?;
        Ok(BufWriter::with_capacity(64 * 1024, f))
    }

    fn in_place_by_metadata(&self, m: &Manifest) -> bool {
        use std::os::unix::fs::MetadataExt;
        m.entries().iter().all(|e| {
            let p = self.dest.join(&e.path);
            let Ok(md) = fs::symlink_metadata(&p) else {
                return false;
            };
            match &e.kind {
                EntryKind::Dir => md.is_dir(),
                EntryKind::File { .. } => {
                    md.is_file()
                        && md.len() == e.size
                        && md.mtime() == e.mtime.secs
                        && md.mtime_nsec() == i64::from(e.mtime.nanos)
                }
                EntryKind::Symlink { target } => {
                    md.file_type().is_symlink()
                        && fs::read_link(&p).ok().as_deref() == Some(Path::new(target))
                }
            }
        })
    }

    /// Like [`Self::reusable_in_place`], without reading the file: when the file at entry `i`'s
    /// final path is still exactly as the previous round left it (kind, size and mtime of entry
    /// `pi` of the previous receipt), its chunks are the receipt's; those equal to the new
    /// manifest's at the same offsets are reusable. `None` when that cannot be trusted (then the
    /// file is read). A partial reuse is re-hashed while copied ([`Self::copy_local`]); a file
    /// reused whole is trusted as the receipt says (see the module docs).
    fn reusable_by_receipt(
        &self,
        prev: &Manifest,
        pi: usize,
        m: &Manifest,
        i: usize,
    ) -> Option<(Vec<SlotId>, bool)> {
        use std::os::unix::fs::MetadataExt;
        let pe = prev.entries().get(pi)?;
        let e = m.entries().get(i)?;
        if !pe.is_file() || pe.chunk_size() != e.chunk_size() {
            return None;
        }
        let md = fs::symlink_metadata(self.dest.join(&e.path)).ok()?;
        if !md.is_file()
            || md.len() != pe.size
            || md.mtime() != pe.mtime.secs
            || md.mtime_nsec() != i64::from(pe.mtime.nanos)
            || !self.parents_are_dirs(&e.path)
        {
            return None;
        }
        let mut out = Vec::new();
        for c in 0..e.chunks().min(pe.chunks()) {
            let (slot, pslot) = (SlotId(e.first_slot.0 + c), SlotId(pe.first_slot.0 + c));
            let (Some(l), Some(pl)) = (m.locate(slot), prev.locate(pslot)) else {
                continue;
            };
            if l.offset == pl.offset
                && l.len == pl.len
                && m.slot_hash(slot).is_some()
                && m.slot_hash(slot) == prev.slot_hash(pslot)
            {
                out.push(slot);
            }
        }
        Some((out, md.len() == e.size))
    }

    /// Slots of file entry `entry` whose chunk already sits, verified, at its final path, and
    /// whether that file has the manifest's size. A file of another size (a database that grew
    /// since an earlier round) still lends every chunk that lies within it and matches.
    fn reusable_in_place(
        &self,
        m: &Manifest,
        entry: EntryId,
    ) -> Result<Option<(Vec<SlotId>, bool)>, StoreError> {
        let Some(e) = m.entry(entry) else {
            return Ok(None);
        };
        let final_path = self.dest.join(&e.path);
        let Ok(md) = fs::symlink_metadata(&final_path) else {
            return Ok(None);
        };
        if !md.is_file() || !self.parents_are_dirs(&e.path) {
            return Ok(None);
        }
        let same_size = md.len() == e.size;
        let Ok(f) = open_nofollow(&final_path) else {
            return Ok(None);
        };
        let mut out = Vec::new();
        let mut buf = vec![0u8; e.chunk_size() as usize];
        for c in 0..e.chunks() {
            let slot = SlotId(e.first_slot.0 + c);
            let (Some(loc), Some(hash)) = (m.locate(slot), m.slot_hash(slot)) else {
                continue;
            };
            let b = &mut buf[..loc.len as usize];
            if f.read_exact_at(b, loc.offset).is_err() {
                return Ok(Some((out, same_size)));
            }
            if ChunkHash::of(b) == hash {
                out.push(slot);
            }
        }
        Ok(Some((out, same_size)))
    }

    fn parents_are_dirs(&self, path: &str) -> bool {
        let mut cur = self.dest.clone();
        let parts: Vec<&str> = path.split('/').collect();
        for p in &parts[..parts.len().saturating_sub(1)] {
            cur.push(p);
            match fs::symlink_metadata(&cur) {
                Ok(md) if md.is_dir() => {}
                _ => return false,
            }
        }
        true
    }

    /// Opens `path`'s staging file, creating it if needed (then it is empty: the chunk writes
    /// give it its size). A longer file left by an earlier round is cut to `size`. The flag
    /// says whether the file was created.
    fn create_staging(&self, path: &str, size: u64) -> Result<(File, bool), StoreError> {
        let p = self.staging_path(path);
        let open = |new: bool| {
            let mut o = private::options();
            o.read(true).write(true).create_new(new);
            o.open(&p)
        };
        match open(true) {
            Ok(f) => return Ok((f, true)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(StoreError::io(&p, e)),
        }
        let f = ctx(&p, open(false))?;
        if ctx(&p, f.metadata())?.len() > size {
            ctx(&p, f.set_len(size))?;
        }
        Ok((f, false))
    }

    fn staging_file(&self, m: &Manifest, entry: EntryId) -> Result<Arc<File>, StoreError> {
        let mut open = lock(&self.open);
        if let Some(f) = open.files.get(&entry) {
            return Ok(Arc::clone(f));
        }
        let e = m.entry(entry).ok_or(StoreError::NotPrepared)?;
        let (f, created) = self.create_staging(&e.path, e.size)?;
        let f = Arc::new(f);
        open.created |= created;
        // Bounded descriptors: once MAX_OPEN_FILES are open, all of them are closed, dirty ones
        // included (their ids stay in `dirty`; commit syncs them without the handle). Closing all
        // at once keeps this O(1) per file opened, amortised.
        if open.files.len() >= MAX_OPEN_FILES {
            open.files.clear();
        }
        open.files.insert(entry, Arc::clone(&f));
        Ok(f)
    }

    fn write_slots(&self, p: &Prepared, data: &[u8], slots: &[SlotId]) -> Result<(), StoreError> {
        for &slot in slots {
            let loc = p.manifest.locate(slot).ok_or(StoreError::NotPrepared)?;
            let f = self.staging_file(&p.manifest, loc.entry)?;
            let path = &self.staging;
            ctx(path, f.write_all_at(data, loc.offset))?;
            lock(&self.open).dirty.insert(loc.entry);
        }
        Ok(())
    }

    /// Verifies a received chunk and writes it to `slots` (not yet durable).
    pub fn store_chunk(
        &self,
        chunk: ChunkId,
        encoding: Encoding,
        payload: Bytes,
        slots: &[SlotId],
    ) -> Result<Result<(), ChunkError>, StoreError> {
        let p = self.prepared()?;
        let u = *p.manifest.unique(chunk).ok_or(StoreError::NotPrepared)?;
        let data = match decode_verified(encoding, payload, u.len, &u.hash) {
            Ok(d) => d,
            Err(e) => return Ok(Err(e)),
        };
        self.write_slots(&p, &data, slots)?;
        Ok(Ok(()))
    }

    /// Copies durable slot `from` to `to`, verifying it on the way. `Ok(Err(slots))` names the
    /// durable slots found damaged (the source slot, or every slot of a file that was trusted in
    /// place: that file is then staged and fetched whole).
    pub fn copy_chunk(
        &self,
        chunk: ChunkId,
        from: SlotId,
        to: &[SlotId],
    ) -> Result<Result<(), Vec<SlotId>>, StoreError> {
        let p = self.prepared()?;
        let u = *p.manifest.unique(chunk).ok_or(StoreError::NotPrepared)?;
        let loc = p.manifest.locate(from).ok_or(StoreError::NotPrepared)?;
        let e = p.manifest.entry(loc.entry).ok_or(StoreError::NotPrepared)?;
        let home = lock(&p.homes)[loc.entry.index()];
        let src = match home {
            Home::InPlace => self.dest.join(&e.path),
            Home::Staging => self.staging_path(&e.path),
        };
        let mut buf = vec![0u8; u.len as usize];
        let read = File::open(&src).and_then(|f| f.read_exact_at(&mut buf, loc.offset));
        if read.is_err() || ChunkHash::of(&buf) != u.hash {
            tracing::warn!(path = %src.display(), "a local copy source no longer matches; fetching it again");
            return Ok(Err(self.damaged(&p, &[from])));
        }
        self.write_slots(&p, &buf, to)?;
        Ok(Ok(()))
    }

    /// The durable slots to fetch again when `slots` were found damaged: a file trusted in place
    /// is moved back to staging and all its slots go, since staging holds none of its data.
    fn damaged(&self, p: &Prepared, slots: &[SlotId]) -> Vec<SlotId> {
        let mut homes = lock(&p.homes);
        let mut out = Vec::new();
        for &s in slots {
            let Some(loc) = p.manifest.locate(s) else {
                continue;
            };
            match homes.get_mut(loc.entry.index()) {
                Some(h @ Home::InPlace) => {
                    *h = Home::Staging;
                    if let Some(e) = p.manifest.entry(loc.entry) {
                        out.extend(e.slots());
                    }
                }
                _ => out.push(s),
            }
        }
        out.sort_unstable();
        out.dedup();
        lock(&p.ledger).claim(&out, false);
        out
    }

    /// Makes `slots` durable: data first, then the journal.
    pub fn commit(&self, slots: &[SlotId]) -> Result<(), StoreError> {
        let p = self.prepared()?;
        let (dirty, created) = {
            let mut open = lock(&self.open);
            let open = &mut *open;
            let ids: Vec<EntryId> = open.dirty.drain().collect();
            // Handles only for the few files synced one by one: a syncfs needs none, and holding
            // them while it runs would let the stores meanwhile open as many again.
            let few = ids.len() <= SYNCFS_ABOVE;
            let dirty: Vec<(EntryId, Option<Arc<File>>)> = ids
                .into_iter()
                .map(|e| (e, open.files.get(&e).filter(|_| few).map(Arc::clone)))
                .collect();
            (dirty, std::mem::take(&mut open.created))
        };
        if dirty.len() > SYNCFS_ABOVE {
            // Thousands of small files in one group: one syncfs (all of the file system's dirty
            // data, waited for, errors reported) instead of an fdatasync per file.
            let dir = ctx(&self.staging, File::open(&self.staging))?;
            ctx(
                &self.staging,
                rustix::fs::syncfs(&dir).map_err(io::Error::from),
            )?;
        } else {
            for (entry, f) in &dirty {
                match f {
                    Some(f) => ctx(&self.staging, f.sync_data())?,
                    None => {
                        // Closed to bound descriptors: any handle on the file flushes its data
                        // (and reports a write-back error nobody has seen yet).
                        let e = p.manifest.entry(*entry).ok_or(StoreError::NotPrepared)?;
                        let path = self.staging_path(&e.path);
                        let f = ctx(&path, OpenOptions::new().write(true).open(&path))?;
                        ctx(&path, f.sync_data())?;
                    }
                }
            }
        }
        if created {
            ctx(&self.staging, sync_dir(&self.staging))?;
        }
        let jpath = self.state.join("journal");
        let mut j = lock(&self.journal);
        let w = j.as_mut().ok_or(StoreError::NotPrepared)?;
        for &slot in slots {
            let loc = p.manifest.locate(slot).ok_or(StoreError::NotPrepared)?;
            let e = p.manifest.entry(loc.entry).ok_or(StoreError::NotPrepared)?;
            let hash = p.manifest.slot_hash(slot).ok_or(StoreError::NotPrepared)?;
            let r = Record {
                key: staging_key(&e.path),
                offset: loc.offset,
                len: loc.len,
                hash,
            };
            ctx(&jpath, w.write_all(&r.encode()))?;
        }
        ctx(&jpath, w.flush())?;
        ctx(&jpath, w.get_ref().sync_data())?;
        lock(&p.ledger).claim(slots, true);
        Ok(())
    }

    /// Verifies every file, moves it into place and writes the receipt. Returns slots that
    /// failed verification (then nothing more is done: fetch them and finalize again).
    ///
    /// Every final path is reached from DEST's handle one directory at a time (`openat` with
    /// `O_NOFOLLOW`), files are moved with `renameat` into the directory handle, and modes and
    /// times are set through handles opened without following symlinks: someone who can write
    /// into a folder of DEST cannot redirect a rename, a `chmod` or a new folder elsewhere by
    /// swapping a folder or file for a symlink.
    pub fn finalize(&self) -> Result<Vec<SlotId>, StoreError> {
        let p = self.prepared()?;
        if p.complete {
            // Nothing to move; clear what an interrupted earlier run may have left.
            let _ = fs::remove_file(self.state.join("journal"));
            let _ = fs::remove_dir_all(&self.staging);
            return Ok(Vec::new());
        }
        let m = &p.manifest;
        let t0 = std::time::Instant::now();
        *lock(&self.open) = Open::default();
        // Check first (in parallel), so that damage is found before anything moves: every slot
        // claimed, every file of its size, and the files to read back read (module docs, step 5).
        let homes = lock(&p.homes).clone();
        let (unclaimed, read) = {
            let ledger = lock(&p.ledger);
            let unclaimed: Vec<SlotId> = (0..m.slot_count())
                .map(SlotId)
                .filter(|&s| !ledger.claimed(s))
                .collect();
            let read: Vec<bool> = (0..m.entries().len())
                .map(|i| self.verify_at_end || ledger.reread(i))
                .collect();
            (unclaimed, read)
        };
        if !unclaimed.is_empty() {
            tracing::warn!(
                slots = unclaimed.len(),
                "finalize found slots never committed"
            );
            return Ok(self.damaged(&p, &unclaimed));
        }
        let check = Check {
            read: &|i| read[i],
            stamp: &|i| homes[i] == Home::Staging,
            umask: self.umask,
            read_back: &self.read_back,
        };
        let (bad, stamped) = verify_and_stamp(
            m,
            |i| match homes[i] {
                Home::InPlace => self.dest.join(&m.entries()[i].path),
                Home::Staging => self.staging_path(&m.entries()[i].path),
            },
            &check,
        );
        if !bad.is_empty() {
            return Ok(self.damaged(&p, &bad));
        }
        let verified = t0.elapsed();
        self.remove_dropped(m)?;
        let touched_dirs = self.place_entries(m, &homes, &stamped)?;
        let renamed = t0.elapsed();
        ctx(
            &self.dest,
            rustix::fs::syncfs(&self.dest_dir).map_err(io::Error::from),
        )?;
        let moved = t0.elapsed();
        for d in &touched_dirs {
            let dir = self.open_dir(d, None)?;
            ctx(&self.dest.join(d), dir.sync_all())?;
        }
        self.stamp_dirs(m)?;
        self.write_receipt(m)?;
        tracing::debug!(
            ?verified,
            ?renamed,
            ?moved,
            receipt = ?t0.elapsed(),
            files = m.summary().files,
            "finalized"
        );
        let _ = fs::remove_file(self.state.join("receipt.prev"));
        *lock(&self.journal) = None;
        let _ = fs::remove_file(self.state.join("journal"));
        let _ = fs::remove_dir_all(&self.staging);
        ctx(&self.state, sync_dir(&self.state))?;
        Ok(Vec::new())
    }

    /// Puts every entry of `m` at its final path: directories created, files renamed from
    /// staging (or, in place already, given their mode and mtime), symlinks created. Returns the
    /// directories whose contents changed (to be synced). Nothing is durable yet.
    fn place_entries(
        &self,
        m: &Manifest,
        homes: &[Home],
        stamped: &[bool],
    ) -> Result<HashSet<String>, StoreError> {
        let mut touched_dirs: HashSet<String> = HashSet::new();
        let staging_dir = ctx(&self.staging, open_dir_path(&self.staging))?;
        // The parent of the previous entry: entries are sorted by path, so most share it.
        let mut parent: Option<(String, File)> = None;
        for (i, e) in m.entries().iter().enumerate() {
            let (par_rel, name) = match e.path.rsplit_once('/') {
                Some((d, n)) => (d, n),
                None => ("", e.path.as_str()),
            };
            if parent.as_ref().is_none_or(|(r, _)| r != par_rel) {
                let dir = self.open_dir(par_rel, Some(&mut touched_dirs))?;
                parent = Some((par_rel.to_string(), dir));
            }
            let Some((_, dir)) = parent.as_ref() else {
                continue;
            };
            let touched = match &e.kind {
                EntryKind::Dir => {
                    self.open_dir(&e.path, Some(&mut touched_dirs))?;
                    false
                }
                EntryKind::File { .. } if homes[i] == Home::InPlace => {
                    let final_path = self.dest.join(&e.path);
                    let f = ctx(&final_path, open_file_at(dir, name))?;
                    ctx(&final_path, stamp_file(&f, e.mode, e.mtime, self.umask))?;
                    false
                }
                EntryKind::File { .. } => {
                    self.place_file(e, &staging_dir, dir, name, stamped[i])?;
                    true
                }
                // Named before anything was written (the receiver's `Unrepresentable`) and
                // listed with the receipt: left out, not an error.
                EntryKind::Symlink { .. } if !self.symlinks => false,
                EntryKind::Symlink { target } => {
                    self.place_symlink(e, target, dir, name)?;
                    true
                }
            };
            if touched {
                touched_dirs.insert(par_rel.to_string());
            }
        }
        Ok(touched_dirs)
    }

    /// Renames staged file `e` to `name` in `dir`, after giving it its mode and mtime (unless
    /// that was done while it was verified: `stamped`).
    fn place_file(
        &self,
        e: &crate::manifest::Entry,
        staging_dir: &File,
        dir: &File,
        name: &str,
        stamped: bool,
    ) -> Result<(), StoreError> {
        let final_path = self.dest.join(&e.path);
        let key = hex(&staging_key(&e.path));
        if e.size == 0 {
            let staged = self.staging.join(&key);
            ctx(
                &staged,
                private::options()
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(&staged),
            )?;
        }
        // The data is durable already (every slot was committed); mode, mtime and the rename
        // become durable with the one syncfs after all entries, before the receipt. A crash
        // before it can leave an older mtime on a file whose bytes are right: the next run finds
        // no receipt, re-verifies and sets it again. (Most files were stamped through their
        // handle while verified.)
        if !stamped {
            let staged = self.staging.join(&key);
            let f = ctx(&staged, open_file_at(staging_dir, &key))?;
            ctx(&staged, stamp_file(&f, e.mode, e.mtime, self.umask))?;
        }
        match rustix::fs::renameat(staging_dir, key.as_str(), dir, name) {
            Ok(()) => Ok(()),
            Err(Errno::ISDIR) => Err(dir_in_the_way(&final_path)),
            Err(e) => Err(StoreError::io(&final_path, e.into())),
        }
    }

    /// Creates symlink `e` (to `target`) as `name` in `dir`: under a temporary name, then
    /// renamed over whatever file or symlink is there (a directory there is a conflict).
    fn place_symlink(
        &self,
        e: &crate::manifest::Entry,
        target: &str,
        dir: &File,
        name: &str,
    ) -> Result<(), StoreError> {
        let final_path = self.dest.join(&e.path);
        match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st)
                if rustix::fs::FileType::from_raw_mode(st.st_mode)
                    == rustix::fs::FileType::Directory =>
            {
                return Err(dir_in_the_way(&final_path))
            }
            _ => {}
        }
        let tmp = format!(".ferry-link-{}", hex(&staging_key(&e.path)));
        let _ = rustix::fs::unlinkat(dir, tmp.as_str(), AtFlags::empty());
        ctx(
            &final_path,
            rustix::fs::symlinkat(target, dir, tmp.as_str()).map_err(io::Error::from),
        )?;
        ctx(
            &final_path,
            rustix::fs::renameat(dir, tmp.as_str(), dir, name).map_err(io::Error::from),
        )
    }

    /// Directory metadata last (writing files into them changed their mtimes), deepest first.
    fn stamp_dirs(&self, m: &Manifest) -> Result<(), StoreError> {
        for e in m.entries().iter().rev() {
            if e.kind == EntryKind::Dir {
                let dir = self.open_dir(&e.path, None)?;
                let path = self.dest.join(&e.path);
                let mode = final_mode(e.mode, true, self.umask);
                ctx(&path, dir.set_permissions(fs::Permissions::from_mode(mode)))?;
                ctx(&path, dir.set_times(file_times(e.mtime)))?;
            }
        }
        Ok(())
    }

    /// Removes what the previous round brought (`receipt.prev`) and the new manifest no longer
    /// has (or has as another kind): files and symlinks still exactly as ferry left them, and
    /// directories that are then empty. Anything else at those paths stays. Like finalize, it
    /// works from directory handles and never follows a symlink.
    fn remove_dropped(&self, m: &Manifest) -> Result<(), StoreError> {
        use rustix::fs::FileType;
        let Ok(prev) = read_receipt_file(&self.state.join("receipt.prev")) else {
            return Ok(());
        };
        let now: HashMap<&str, &EntryKind> = m
            .entries()
            .iter()
            .map(|e| (e.path.as_str(), &e.kind))
            .collect();
        let same_kind = |a: &EntryKind, b: &EntryKind| {
            matches!(
                (a, b),
                (EntryKind::Dir, EntryKind::Dir)
                    | (EntryKind::File { .. }, EntryKind::File { .. })
                    | (EntryKind::Symlink { .. }, EntryKind::Symlink { .. })
            )
        };
        // Deepest first, so that directories are emptied before they are removed.
        for e in prev.entries().iter().rev() {
            if now
                .get(e.path.as_str())
                .is_some_and(|k| same_kind(k, &e.kind))
            {
                continue;
            }
            let (par_rel, name) = match e.path.rsplit_once('/') {
                Some((d, n)) => (d, n),
                None => ("", e.path.as_str()),
            };
            // A parent that is no longer a real directory: nothing of ferry's is there.
            let Ok(dir) = self.open_dir(par_rel, None) else {
                continue;
            };
            let Ok(st) = rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW) else {
                continue;
            };
            let ft = FileType::from_raw_mode(st.st_mode);
            // time_t and long are not 64-bit everywhere.
            #[allow(clippy::unnecessary_cast)]
            let ours = match &e.kind {
                EntryKind::File { .. } => {
                    ft == FileType::RegularFile
                        && st.st_size as u64 == e.size
                        && st.st_mtime as i64 == e.mtime.secs
                        && st.st_mtime_nsec as i64 == i64::from(e.mtime.nanos)
                }
                EntryKind::Symlink { target } => {
                    ft == FileType::Symlink
                        && rustix::fs::readlinkat(&dir, name, Vec::new())
                            .ok()
                            .is_some_and(|t| t.as_bytes() == target.as_bytes())
                }
                EntryKind::Dir => ft == FileType::Directory,
            };
            if !ours {
                continue;
            }
            let p = self.dest.join(&e.path);
            let removed = if e.kind == EntryKind::Dir {
                // Only an empty directory goes; one holding other files stays.
                rustix::fs::unlinkat(&dir, name, AtFlags::REMOVEDIR).is_ok()
            } else {
                ctx(
                    &p,
                    rustix::fs::unlinkat(&dir, name, AtFlags::empty()).map_err(io::Error::from),
                )?;
                true
            };
            if removed {
                ctx(&p, dir.sync_all())?;
            }
        }
        Ok(())
    }

    /// Opens directory `rel` of DEST ("" is DEST itself) from DEST's handle, one component at a
    /// time with `O_NOFOLLOW`: a symlink or file where the history has a directory is a
    /// conflict, never followed. With `created`, missing directories are created (owner-only
    /// until finalize gives them their modes) and their parents (relative paths) added to it, to
    /// be synced once finalize has placed everything: an fsync per new directory in the middle
    /// of thousands of renames would commit the file system's journal each time.
    fn open_dir(
        &self,
        rel: &str,
        mut created: Option<&mut HashSet<String>>,
    ) -> Result<File, StoreError> {
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let mut cur = ctx(&self.dest, self.dest_dir.try_clone())?;
        let mut shown = self.dest.clone();
        // `cur` relative to DEST.
        let mut at = String::new();
        for part in rel.split('/').filter(|p| !p.is_empty()) {
            shown.push(part);
            let next = match (
                rustix::fs::openat(&cur, part, flags, Mode::empty()),
                &mut created,
            ) {
                (Err(Errno::NOENT), Some(created)) => {
                    match rustix::fs::mkdirat(&cur, part, Mode::from_raw_mode(private::DIR_MODE)) {
                        Ok(()) | Err(Errno::EXIST) => {}
                        Err(e) => return Err(StoreError::io(&shown, e.into())),
                    }
                    created.insert(at.clone());
                    rustix::fs::openat(&cur, part, flags, Mode::empty())
                }
                (r, _) => r,
            };
            if !at.is_empty() {
                at.push('/');
            }
            at.push_str(part);
            cur = match next {
                Ok(fd) => File::from(fd),
                Err(Errno::LOOP | Errno::NOTDIR) => {
                    return Err(StoreError::Conflict {
                        path: shown,
                        why: "a file or symlink exists where the history has a directory".into(),
                    })
                }
                Err(e) => return Err(StoreError::io(&shown, e.into())),
            };
        }
        Ok(cur)
    }

    fn write_receipt(&self, m: &Manifest) -> Result<(), StoreError> {
        let tmp = self.state.join("receipt.tmp");
        let path = self.state.join("receipt");
        {
            let f = ctx(&tmp, private::create(&tmp))?;
            let mut w = BufWriter::new(f);
            ctx(&tmp, w.write_all(RECEIPT_MAGIC))?;
            let mut entries = Vec::new();
            let mut size = 0;
            let flush = |entries: &mut Vec<_>, w: &mut BufWriter<File>| -> Result<(), StoreError> {
                let b = frame::encode_message(&Message::Manifest(std::mem::take(entries)))
                    .map_err(|e| StoreError::BadReceipt {
                        path: tmp.clone(),
                        why: e.to_string(),
                    })?;
                ctx(&tmp, w.write_all(&b))
            };
            for i in 0..m.entries().len() {
                if let Some(e) = m.wire_entry(i) {
                    size += e.path.len() + 32 * e.hashes.len() + 48;
                    entries.push(e);
                }
                if size >= MANIFEST_FRAME_TARGET {
                    flush(&mut entries, &mut w)?;
                    size = 0;
                }
            }
            if !entries.is_empty() {
                flush(&mut entries, &mut w)?;
            }
            let end = frame::encode_message(&Message::ManifestEnd(*m.summary())).map_err(|e| {
                StoreError::BadReceipt {
                    path: tmp.clone(),
                    why: e.to_string(),
                }
            })?;
            ctx(&tmp, w.write_all(&end))?;
            let f = ctx(&tmp, w.into_inner().map_err(|e| e.into_error()))?;
            ctx(&tmp, f.sync_all())?;
        }
        ctx(&path, fs::rename(&tmp, &path))?;
        let s = m.summary();
        let json =
            format!(
            "{{\"root\":\"{}\",\"entries\":{},\"files\":{},\"bytes\":{},\"completed_unix\":{}}}\n",
            s.root,
            s.entries,
            s.files,
            s.bytes,
            SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs()
        );
        self.write_omitted(m)?;
        let jp = self.state.join("receipt.json");
        ctx(&jp, private::write(&jp, json.as_bytes()))?;
        ctx(&self.state, sync_dir(&self.state))
    }
}

impl FsStore {
    /// Lists beside the receipt (`receipt.omitted`, paths separated by NUL) the entries of `m`
    /// that DEST cannot hold and finalize left out: [`verify_dest`] reports them as omitted
    /// by design, not as missing. Without any, an older list goes.
    fn write_omitted(&self, m: &Manifest) -> Result<(), StoreError> {
        let path = self.state.join(OMITTED);
        let omitted = omitted_entries(m, self.symlinks);
        if omitted.is_empty() {
            return match fs::remove_file(&path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(StoreError::io(&path, e)),
                _ => Ok(()),
            };
        }
        let mut data = Vec::new();
        for p in &omitted {
            data.extend_from_slice(p.as_bytes());
            data.push(0);
        }
        ctx(&path, private::write(&path, &data))
    }
}

/// The file beside the receipt that lists the entries left out (see [`read_omitted`]).
const OMITTED: &str = "receipt.omitted";

/// The paths of `m`'s entries that a destination without symlinks (`symlinks` false) cannot
/// hold: its symlinks. (Modes are not such an entry: where DEST has none, as on exFAT, the
/// files arrive with DEST's own, which is not an error.)
pub fn omitted_entries(m: &Manifest, symlinks: bool) -> Vec<String> {
    if symlinks {
        return Vec::new();
    }
    m.entries()
        .iter()
        .filter(|e| matches!(e.kind, EntryKind::Symlink { .. }))
        .map(|e| e.path.clone())
        .collect()
}

/// The entries of the receipt of `dest` that its file system could not hold and that were
/// left out by design (empty when none, or no list).
pub fn read_omitted(dest: &Path) -> Result<Vec<String>, StoreError> {
    let path = dest.join(STATE_DIR).join(OMITTED);
    let data = match fs::read(&path) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(StoreError::io(&path, e)),
    };
    Ok(data
        .split(|&b| b == 0)
        .filter(|p| !p.is_empty())
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .collect())
}

fn read_journal(path: &Path) -> Result<HashMap<([u8; 16], u64), Record>, StoreError> {
    let mut out = HashMap::new();
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(StoreError::io(path, e)),
    };
    let mut r = BufReader::with_capacity(256 * 1024, f);
    let mut magic = [0u8; 8];
    if r.read_exact(&mut magic).is_err() || &magic != JOURNAL_MAGIC {
        return Ok(out); // unreadable journal: nothing is claimed
    }
    let mut rec = [0u8; RECORD_LEN];
    // A torn or corrupt record ends the journal: everything after it is unclaimed.
    while r.read_exact(&mut rec).is_ok() {
        match Record::decode(&rec) {
            Some(x) => {
                out.insert((x.key, x.offset), x);
            }
            None => break,
        }
    }
    Ok(out)
}

/// Above this many files touched by one group commit, one `syncfs` replaces their fdatasyncs.
const SYNCFS_ABOVE: usize = 16;

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The mode a file or directory of the history gets: the sender's permission bits, without
/// setuid, setgid and sticky (a chat history has no use for them, and a setuid file planted by a
/// hostile sender on a device restored as root would be a privilege escalation), masked by the
/// receiving user's umask (a sender cannot make files world-writable here), and the owner keeps
/// read access to files and full access to directories, so ferry can verify, resume and
/// migrate again into the same destination whatever the sender said.
fn final_mode(mode: u32, is_dir: bool, umask: u32) -> u32 {
    (mode & 0o777 & !umask) | if is_dir { 0o700 } else { 0o400 }
}

/// Opens a directory by path without following a symlink at its last component.
fn open_dir_path(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

/// Opens a file for reading without following a symlink at its last component (and without
/// blocking on a FIFO put in its place).
fn open_nofollow(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
}

/// Opens regular file `name` in `dir` for reading, never through a symlink; anything that is not
/// a regular file is an error.
fn open_file_at(dir: &File, name: &str) -> io::Result<File> {
    let fd = rustix::fs::openat(
        dir.as_fd(),
        name,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let f = File::from(fd);
    if !f.metadata()?.is_file() {
        return Err(io::Error::other("not a regular file"));
    }
    Ok(f)
}

/// Whether the file system holding `dir` (ferry's own folder, locked) folds case: with neither
/// name present, a probe file is created under a lower-case name and looked up under the
/// upper-case one. (Not by inode: FUSE file systems such as exfat-fuse give each spelling its
/// own node number.)
fn probe_case_folding(dir: &Path) -> io::Result<bool> {
    probe_same_name(dir, "case-probe", "CASE-PROBE")
}

/// Whether the file system holding `dir` finds a name under another Unicode normalisation:
/// a probe named with a precomposed `é` (NFC) is looked up with `e` + U+0301 (NFD).
fn probe_normalization(dir: &Path) -> io::Result<bool> {
    probe_same_name(dir, "norm-probe-\u{e9}", "norm-probe-e\u{301}")
}

/// Whether the file system holding `dir` can hold symlinks: one is created under a probe name
/// and removed.
fn probe_symlinks(dir: &Path) -> io::Result<bool> {
    let probe = dir.join("link-probe");
    match fs::remove_file(&probe) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let made = rustix::fs::symlink("case-probe", &probe);
    let holds = symlinks_held(made)?;
    if holds {
        fs::remove_file(&probe)?;
    }
    Ok(holds)
}

/// The probe's decision from `symlink`'s answer: not implemented (exfat-fuse: ENOSYS), not
/// permitted (FAT, Windows without the privilege: EPERM) or not supported mean no symlinks;
/// any other error is a problem with DEST.
fn symlinks_held(made: rustix::io::Result<()>) -> io::Result<bool> {
    match made {
        Ok(()) => Ok(true),
        Err(Errno::NOSYS | Errno::PERM | Errno::OPNOTSUPP) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Creates `dir/created` (neither name present first) and says whether `dir/other` then exists.
fn probe_same_name(dir: &Path, created: &str, other: &str) -> io::Result<bool> {
    let lower = dir.join(created);
    let upper = dir.join(other);
    for p in [&upper, &lower] {
        match fs::remove_file(p) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    drop(
        private::options()
            .write(true)
            .create_new(true)
            .open(&lower)?,
    );
    let folds = fs::symlink_metadata(&upper).is_ok();
    fs::remove_file(&lower)?;
    Ok(folds)
}

fn dir_in_the_way(final_path: &Path) -> StoreError {
    StoreError::Conflict {
        path: final_path.to_path_buf(),
        why: "a directory exists where the history has a file".into(),
    }
}

/// Sets a regular file's mode ([`final_mode`]) and mtime through its handle.
fn stamp_file(f: &File, mode: u32, mtime: Mtime, umask: u32) -> io::Result<()> {
    f.set_permissions(fs::Permissions::from_mode(final_mode(mode, false, umask)))?;
    f.set_times(file_times(mtime))
}

/// [`stamp_file`] by path, for a staging file (in ferry's owner-only folder, just found to be a
/// regular file): two calls instead of opening and closing it as well.
fn stamp_staged(path: &Path, mode: u32, mtime: Mtime, umask: u32) -> io::Result<()> {
    let cwd = rustix::fs::CWD;
    let mode = Mode::from_raw_mode(final_mode(mode, false, umask));
    rustix::fs::chmodat(cwd, path, mode, AtFlags::empty())?;
    let (secs, nanos) = if mtime.secs >= 0 {
        (mtime.secs, i64::from(mtime.nanos.min(999_999_999)))
    } else {
        (0, 0)
    };
    let t = rustix::fs::Timespec {
        tv_sec: secs,
        tv_nsec: nanos,
    };
    let times = rustix::fs::Timestamps {
        last_access: t,
        last_modification: t,
    };
    rustix::fs::utimensat(cwd, path, &times, AtFlags::SYMLINK_NOFOLLOW)?;
    Ok(())
}

fn file_times(mtime: Mtime) -> fs::FileTimes {
    let t = if mtime.secs >= 0 {
        SystemTime::UNIX_EPOCH + Duration::new(mtime.secs as u64, mtime.nanos.min(999_999_999))
    } else {
        SystemTime::UNIX_EPOCH
    };
    fs::FileTimes::new().set_modified(t).set_accessed(t)
}

/// Checks files against a manifest chunk by chunk; returns the slots that do not match.
/// `path_of(i)` names where entry `i`'s bytes are.
fn verify_files(m: &Manifest, path_of: impl Fn(usize) -> PathBuf + Sync) -> Vec<SlotId> {
    let read_back = std::sync::atomic::AtomicU64::new(0);
    let check = Check {
        read: &|_| true,
        stamp: &|_| false,
        umask: 0,
        read_back: &read_back,
    };
    verify_and_stamp(m, path_of, &check).0
}

/// What [`verify_and_stamp`] does with each file entry `i`.
struct Check<'a> {
    /// Read it back and hash it; otherwise only its size is checked.
    read: &'a (dyn Fn(usize) -> bool + Sync),
    /// Once it matched, set its mode and mtime through its handle.
    stamp: &'a (dyn Fn(usize) -> bool + Sync),
    umask: u32,
    /// Counts the bytes read back.
    read_back: &'a std::sync::atomic::AtomicU64,
}

/// Checks every file of `m` as `check` says (its size; its chunks when it is to be read), and
/// for every file that matched and is to be stamped, sets its mode and mtime through the handle
/// it was checked with (two calls, instead of looking the path up three more times later).
/// Returns the slots that do not match and which entries were stamped.
fn verify_and_stamp(
    m: &Manifest,
    path_of: impl Fn(usize) -> PathBuf + Sync,
    check: &Check<'_>,
) -> (Vec<SlotId>, Vec<bool>) {
    let files: Vec<usize> = (0..m.entries().len())
        .filter(|&i| m.entries()[i].is_file())
        .collect();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let bad = Mutex::new(Vec::new());
    let stamped: Vec<std::sync::atomic::AtomicBool> = (0..m.entries().len())
        .map(|_| std::sync::atomic::AtomicBool::new(false))
        .collect();
    let threads = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .min(4);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                let mut buf = Vec::new();
                loop {
                    let k = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(&i) = files.get(k) else { break };
                    let e = &m.entries()[i];
                    let read = (check.read)(i);
                    let (mine, f) = verify_file(m, i, &path_of(i), read.then_some(&mut buf));
                    if read {
                        check
                            .read_back
                            .fetch_add(e.size, std::sync::atomic::Ordering::Relaxed);
                    }
                    if !mine.is_empty() {
                        tracing::warn!(path = %e.path, chunks = mine.len(), "verification failed");
                        lock(&bad).extend(mine);
                    } else if (check.stamp)(i) {
                        // A failure here is not fatal: the file is stamped by path later.
                        let done = match f {
                            Some(f) => stamp_file(&f, e.mode, e.mtime, check.umask),
                            None => stamp_staged(&path_of(i), e.mode, e.mtime, check.umask),
                        };
                        if done.is_ok() {
                            stamped[i].store(true, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                }
            });
        }
    });
    (
        bad.into_inner().unwrap_or_else(|p| p.into_inner()),
        stamped.into_iter().map(|b| b.into_inner()).collect(),
    )
}

/// Verifies entry `i` at `path`: the slots that do not match, and the open file. Without a
/// buffer only its kind and size are checked, by path (one `statx`, no file opened).
fn verify_file(
    m: &Manifest,
    i: usize,
    path: &Path,
    buf: Option<&mut Vec<u8>>,
) -> (Vec<SlotId>, Option<File>) {
    let e = &m.entries()[i];
    let all = || e.slots().collect::<Vec<SlotId>>();
    let Some(buf) = buf else {
        return match fs::symlink_metadata(path) {
            Ok(md) if md.is_file() && md.len() == e.size => (Vec::new(), None),
            _ => (all(), None),
        };
    };
    let Ok(f) = open_nofollow(path) else {
        return (all(), None);
    };
    match f.metadata() {
        Ok(md) if md.is_file() && md.len() == e.size => {}
        _ => return (all(), None),
    }
    let mut bad = Vec::new();
    buf.resize(e.chunk_size() as usize, 0);
    for c in 0..e.chunks() {
        let slot = SlotId(e.first_slot.0 + c);
        let (Some(loc), Some(hash)) = (m.locate(slot), m.slot_hash(slot)) else {
            continue;
        };
        let b = &mut buf[..loc.len as usize];
        if f.read_exact_at(b, loc.offset).is_err() || ChunkHash::of(b) != hash {
            bad.push(slot);
        }
    }
    (bad, Some(f))
}

/// Reads the manifest recorded in `dest`'s receipt.
pub fn read_receipt(dest: &Path) -> Result<Manifest, StoreError> {
    read_receipt_file(&dest.join(STATE_DIR).join("receipt")).map_err(|e| match e {
        StoreError::NoReceipt(_) => StoreError::NoReceipt(dest.to_path_buf()),
        other => other,
    })
}

fn read_receipt_file(path: &Path) -> Result<Manifest, StoreError> {
    let path = path.to_path_buf();
    let data = match fs::read(&path) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(StoreError::NoReceipt(path)),
        Err(e) => return Err(StoreError::io(&path, e)),
    };
    let bad = |why: String| StoreError::BadReceipt {
        path: path.clone(),
        why,
    };
    if data.len() < 8 || &data[..8] != RECEIPT_MAGIC {
        return Err(bad("bad magic".into()));
    }
    let mut buf = BytesMut::from(&data[8..]);
    let mut b = ManifestBuilder::new(ManifestLimits::default());
    loop {
        match frame::decode_frame(&mut buf).map_err(|e| bad(e.to_string()))? {
            Some(Frame::Message(Message::Manifest(entries))) => {
                for e in entries {
                    b.push(e).map_err(|e| bad(e.to_string()))?;
                }
            }
            Some(Frame::Message(Message::ManifestEnd(s))) => {
                return b.finish(&s).map_err(|e| bad(e.to_string()));
            }
            _ => return Err(bad("truncated".into())),
        }
    }
}

/// The outcome of [`verify_dest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    pub root: ChunkHash,
    pub files: u64,
    pub bytes: u64,
    /// Paths that do not match the receipt (missing, wrong size, wrong content, wrong kind).
    pub mismatched: Vec<String>,
    /// Entries of the receipt that DEST's file system cannot hold (symlinks on exFAT): left
    /// out by design when the migration ran, absent now, not counted as mismatched.
    pub omitted: Vec<String>,
}

/// Re-hashes everything in `dest` against its receipt.
pub fn verify_dest(dest: &Path) -> Result<VerifyReport, StoreError> {
    let m = read_receipt(dest)?;
    let omitted_by_design: HashSet<String> = read_omitted(dest)?.into_iter().collect();
    let mut omitted = Vec::new();
    let bad = verify_files(&m, |i| dest.join(&m.entries()[i].path));
    let mut mismatched: Vec<String> = bad
        .iter()
        .filter_map(|&s| {
            m.locate(s)
                .and_then(|l| m.entry(l.entry))
                .map(|e| e.path.clone())
        })
        .collect();
    for e in m.entries() {
        let p = dest.join(&e.path);
        let md = fs::symlink_metadata(&p);
        let ok = match (&e.kind, &md) {
            (EntryKind::Dir, Ok(md)) => md.is_dir(),
            (EntryKind::File { .. }, Ok(md)) => md.is_file() && md.len() == e.size,
            (EntryKind::Symlink { target }, Ok(md)) => {
                md.file_type().is_symlink()
                    && fs::read_link(&p).ok().as_deref() == Some(Path::new(target))
            }
            (EntryKind::Symlink { .. }, Err(_)) if omitted_by_design.contains(&e.path) => {
                omitted.push(e.path.clone());
                true
            }
            (_, Err(_)) => false,
        };
        if !ok {
            mismatched.push(e.path.clone());
        }
    }
    mismatched.sort();
    mismatched.dedup();
    let s = m.summary();
    Ok(VerifyReport {
        root: s.root,
        files: s.files,
        bytes: s.bytes,
        mismatched,
        omitted,
    })
}

/// The receipt summary of a completed destination, if any.
pub fn receipt_summary(dest: &Path) -> Result<Receipt, StoreError> {
    let m = read_receipt(dest)?;
    let s = m.summary();
    Ok(Receipt {
        root: s.root,
        files: s.files,
        bytes: s.bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn a_new_dest_and_the_state_folder_are_private() {
        let d = tempfile::tempdir().unwrap();
        fs::set_permissions(d.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let dest = d.path().join("new/history");
        let store = FsStore::open(&dest).unwrap();
        assert_eq!(mode(&d.path().join("new")), 0o700);
        assert_eq!(mode(&dest), 0o700);
        assert_eq!(mode(&dest.join(STATE_DIR)), 0o700);
        assert_eq!(mode(&dest.join(STATE_DIR).join("lock")), 0o600);
        // The probe leaves nothing behind; tmpfs and ext4 tell case apart.
        assert!(!store.folds_case());
        assert!(
            !store.normalizes(),
            "ext4 and tmpfs keep both spellings of é apart"
        );
        assert!(store.holds_symlinks(), "ext4 and tmpfs hold symlinks");
        let names: Vec<_> = fs::read_dir(dest.join(STATE_DIR))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("lock")]);
        drop(store);
        // An existing DEST keeps its mode; a .ferry left wider by an older version is narrowed.
        let mine = d.path().join("mine");
        fs::create_dir_all(mine.join(STATE_DIR)).unwrap();
        fs::set_permissions(&mine, fs::Permissions::from_mode(0o750)).unwrap();
        fs::set_permissions(mine.join(STATE_DIR), fs::Permissions::from_mode(0o755)).unwrap();
        drop(FsStore::open(&mine).unwrap());
        assert_eq!(mode(&mine), 0o750);
        assert_eq!(mode(&mine.join(STATE_DIR)), 0o700);
    }

    /// The symlink probe's decision: exfat-fuse's ENOSYS, FAT's EPERM and EOPNOTSUPP mean a
    /// destination without symlinks (they are left out and named); anything else is a
    /// destination problem, not a reason to drop them.
    #[test]
    fn the_symlink_probe_tells_no_symlinks_from_a_problem() {
        assert!(symlinks_held(Ok(())).unwrap());
        for e in [Errno::NOSYS, Errno::PERM, Errno::OPNOTSUPP] {
            assert!(!symlinks_held(Err(e)).unwrap(), "{e:?}");
        }
        for e in [Errno::ACCESS, Errno::NOSPC, Errno::ROFS, Errno::IO] {
            let err = symlinks_held(Err(e)).unwrap_err();
            assert_eq!(err.raw_os_error(), Some(e.raw_os_error()));
        }
        // Without symlinks, a manifest's symlinks are what is left out, and only they.
        let entry = |path: &str, kind: EntryKind| crate::manifest::WireEntry {
            path: path.into(),
            kind,
            size: 0,
            mode: 0o755,
            mtime: Default::default(),
            hashes: Vec::new(),
        };
        let m = Manifest::from_wire_entries(vec![
            entry("media", EntryKind::Dir),
            entry(
                "media/latest.jpg",
                EntryKind::Symlink {
                    target: "a.jpg".into(),
                },
            ),
        ])
        .unwrap();
        assert_eq!(omitted_entries(&m, false), vec!["media/latest.jpg"]);
        assert!(omitted_entries(&m, true).is_empty());
    }

    /// A manifest of top-level files with these contents.
    fn manifest_of(files: &[(&str, &[u8])]) -> Arc<Manifest> {
        let entries = files
            .iter()
            .map(|(path, data)| {
                let shift = crate::manifest::chunk_shift_for(data.len() as u64);
                crate::manifest::WireEntry {
                    path: (*path).into(),
                    kind: EntryKind::File { chunk_shift: shift },
                    size: data.len() as u64,
                    mode: 0o644,
                    mtime: Mtime {
                        secs: 1_600_000_000,
                        nanos: 0,
                    },
                    hashes: data.chunks(1 << shift).map(ChunkHash::of).collect(),
                }
            })
            .collect();
        Arc::new(Manifest::from_wire_entries(entries).unwrap())
    }

    /// Receives (verifies and writes) every slot of `m`'s files named in `only`, as the
    /// receiver does, and commits them.
    fn receive(store: &FsStore, m: &Manifest, files: &[(&str, &[u8])], only: &[&str]) {
        let mut done = Vec::new();
        for (path, data) in files.iter().filter(|(p, _)| only.contains(p)) {
            let e = &m.entries()[m.find(path).unwrap()];
            for slot in e.slots() {
                let loc = m.locate(slot).unwrap();
                let bytes = &data[loc.offset as usize..][..loc.len as usize];
                let chunk = m.slot_chunk(slot).unwrap();
                let payload = Bytes::copy_from_slice(bytes);
                store
                    .store_chunk(chunk, Encoding::Raw, payload, &[slot])
                    .unwrap()
                    .unwrap();
                done.push(slot);
            }
        }
        store.commit(&done).unwrap();
    }

    fn data(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect()
    }

    /// Finalize trusts what this process verified and made durable: it reads nothing back by
    /// default, and every byte with `verify_at_end`. Either way the files arrive intact.
    #[test]
    fn finalize_reads_back_nothing_received_in_this_process_unless_asked() {
        let (a, b) = (data(300_000, 1), data(5_000, 2));
        let files: [(&str, &[u8]); 2] = [("a.jpg", &a), ("b.txt", &b)];
        let m = manifest_of(&files);
        for verify_at_end in [false, true] {
            let d = tempfile::tempdir().unwrap();
            let dest = d.path().join("dest");
            let store = FsStore::open(&dest).unwrap().verify_at_end(verify_at_end);
            assert!(store.prepare(&m).unwrap().is_empty());
            receive(&store, &m, &files, &["a.jpg", "b.txt"]);
            assert_eq!(store.finalize().unwrap(), Vec::<SlotId>::new());
            let want = if verify_at_end { 305_000 } else { 0 };
            assert_eq!(
                store.bytes_read_back(),
                want,
                "verify_at_end {verify_at_end}"
            );
            assert_eq!(fs::read(dest.join("a.jpg")).unwrap(), a);
            assert_eq!(fs::read(dest.join("b.txt")).unwrap(), b);
            assert!(verify_dest(&dest).unwrap().mismatched.is_empty());
        }
    }

    /// After a crash, the files an earlier process journaled are read back (nobody held the
    /// lock in between): a staged byte changed behind ferry's back is found and fetched again,
    /// and the file received by this process is not read.
    #[test]
    fn finalize_reads_back_what_an_earlier_process_journaled() {
        let (a, b) = (data(300_000, 3), data(200_000, 4));
        let files: [(&str, &[u8]); 2] = [("a.jpg", &a), ("b.jpg", &b)];
        let m = manifest_of(&files);
        let d = tempfile::tempdir().unwrap();
        let dest = d.path().join("dest");
        {
            let store = FsStore::open(&dest).unwrap();
            store.prepare(&m).unwrap();
            receive(&store, &m, &files, &["a.jpg"]);
        } // the process ends here (a kill -9 after the commit)
        let staged = dest
            .join(STATE_DIR)
            .join("staging")
            .join(hex(&staging_key("a.jpg")));
        let mut bytes = fs::read(&staged).unwrap();
        bytes[150_000] ^= 1;
        fs::write(&staged, &bytes).unwrap();

        let store = FsStore::open(&dest).unwrap();
        let durable = store.prepare(&m).unwrap();
        let a_slots: Vec<SlotId> = m.entries()[m.find("a.jpg").unwrap()].slots().collect();
        assert_eq!(durable, a_slots, "the journal claims a.jpg");
        receive(&store, &m, &files, &["b.jpg"]);
        let damaged = store.finalize().unwrap();
        let hit = m.entries()[m.find("a.jpg").unwrap()].first_slot.0 + 150_000 / (1 << 17);
        assert_eq!(damaged, vec![SlotId(hit)], "the changed chunk is named");
        assert_eq!(store.bytes_read_back(), 300_000, "only a.jpg was read back");
        assert!(!dest.join("a.jpg").exists() && !dest.join("b.jpg").exists());

        // Fetched again, it arrives intact.
        let loc = m.locate(SlotId(hit)).unwrap();
        let payload = Bytes::copy_from_slice(&a[loc.offset as usize..][..loc.len as usize]);
        let chunk = m.slot_chunk(SlotId(hit)).unwrap();
        store
            .store_chunk(chunk, Encoding::Raw, payload, &[SlotId(hit)])
            .unwrap()
            .unwrap();
        store.commit(&[SlotId(hit)]).unwrap();
        assert_eq!(store.finalize().unwrap(), Vec::<SlotId>::new());
        assert_eq!(fs::read(dest.join("a.jpg")).unwrap(), a);
        assert_eq!(fs::read(dest.join("b.jpg")).unwrap(), b);
    }

    /// Prepare lists staging once: a staged file of this manifest keeps its journaled slots,
    /// one of a file no longer in it goes, and so does anything else there; a file whose
    /// folder does not exist at DEST is not looked for there.
    #[test]
    fn prepare_keeps_wanted_staging_and_removes_the_rest() {
        let (a, b) = (data(300_000, 6), data(4_000, 7));
        let files: [(&str, &[u8]); 2] = [("a.jpg", &a), ("sub/b.txt", &b)];
        let m = manifest_of(&files);
        let d = tempfile::tempdir().unwrap();
        let dest = d.path().join("dest");
        let staging = dest.join(STATE_DIR).join("staging");
        {
            let store = FsStore::open(&dest).unwrap();
            store.prepare(&m).unwrap();
            receive(&store, &m, &files, &["a.jpg"]);
        }
        let stale = staging.join(hex(&staging_key("gone.jpg")));
        fs::write(&stale, b"old").unwrap();
        fs::write(staging.join("not-a-key"), b"?").unwrap();
        let store = FsStore::open(&dest).unwrap();
        let durable = store.prepare(&m).unwrap();
        let a_slots: Vec<SlotId> = m.entries()[m.find("a.jpg").unwrap()].slots().collect();
        assert_eq!(durable, a_slots);
        let mut left: Vec<String> = fs::read_dir(&staging)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, vec![hex(&staging_key("a.jpg"))]);
        receive(&store, &m, &files, &["sub/b.txt"]);
        assert_eq!(store.finalize().unwrap(), Vec::<SlotId>::new());
        assert_eq!(fs::read(dest.join("a.jpg")).unwrap(), a);
        assert_eq!(fs::read(dest.join("sub/b.txt")).unwrap(), b);
    }

    /// A slot never committed is not trusted: finalize names it instead of placing the file.
    #[test]
    fn finalize_names_slots_never_committed() {
        let a = data(300_000, 5);
        let files: [(&str, &[u8]); 1] = [("a.jpg", &a)];
        let m = manifest_of(&files);
        let d = tempfile::tempdir().unwrap();
        let dest = d.path().join("dest");
        let store = FsStore::open(&dest).unwrap();
        store.prepare(&m).unwrap();
        let slots: Vec<SlotId> = m.entries()[0].slots().collect();
        for &slot in &slots {
            let loc = m.locate(slot).unwrap();
            let payload = Bytes::copy_from_slice(&a[loc.offset as usize..][..loc.len as usize]);
            let chunk = m.slot_chunk(slot).unwrap();
            store
                .store_chunk(chunk, Encoding::Raw, payload, &[slot])
                .unwrap()
                .unwrap();
        }
        store.commit(&slots[..1]).unwrap();
        assert_eq!(store.finalize().unwrap(), slots[1..].to_vec());
        assert!(!dest.join("a.jpg").exists());
        store.commit(&slots[1..]).unwrap();
        assert_eq!(store.finalize().unwrap(), Vec::<SlotId>::new());
        assert_eq!(fs::read(dest.join("a.jpg")).unwrap(), a);
    }

    #[test]
    fn modes_lose_special_bits_and_what_the_umask_takes() {
        assert_eq!(final_mode(0o4777, false, 0o022), 0o755);
        assert_eq!(final_mode(0o666, false, 0o022), 0o644);
        assert_eq!(final_mode(0o000, false, 0o077), 0o400);
        assert_eq!(final_mode(0o1777, true, 0o022), 0o755);
        assert_eq!(final_mode(0o000, true, 0o022), 0o700);
    }
}
