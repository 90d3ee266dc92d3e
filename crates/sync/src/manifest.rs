//! The chunk manifest: what a history contains, and the content address of every byte of it.
//!
//! # Chunking
//! Files are cut into **fixed-size, aligned chunks** whose size is a power of two chosen from the
//! file size ([`chunk_shift_for`]): 128 KiB for files up to 128 MiB, growing so that a file has
//! about 1024 chunks, up to 4 MiB for files of 4 GiB and more.
//! - Fixed aligned chunks suit SQLite, the bulk of a chat history's churn: SQLite rewrites whole
//!   pages in place (4 KiB, aligned), so a change touches exactly the chunks holding those pages
//!   and a catch-up round re-sends only those. Content-defined chunking buys nothing for in-place
//!   page updates and costs CPU and complexity; media files are written once and never edited.
//! - Scaling with the file (as Syncthing does with its block size) keeps the per-chunk overhead
//!   (hash, journal record, frame header) negligible for large videos while keeping the unit of
//!   re-transfer small for databases. The 4 MiB ceiling bounds memory per chunk in flight and the
//!   bytes lost per interruption.
//! - The chunk size is carried on the wire per file (`chunk_shift`) so the policy can evolve; a
//!   receiver accepts any shift within [`MIN_CHUNK_SHIFT`, `MAX_CHUNK_SHIFT`].
//!
//! # Identity and dedup
//! Every chunk slot (file, index) names a BLAKE3 hash. Slots with the same hash and length share
//! one entry of the **unique-chunk table**, numbered in order of first appearance; the protocol
//! names chunks by that number, so a forwarded photo stored 50 times crosses the link once.
//!
//! # Root hash
//! Entries are sorted by path (bytewise). The root hash is BLAKE3 over a domain-separation tag,
//! each entry's canonical encoding (length-prefixed postcard of [`WireEntry`]), and the entry
//! count. Same content ⇒ same root, whoever computed it.

use std::collections::HashMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::path::{self, PathProblem};

/// Smallest chunk: 128 KiB.
pub const MIN_CHUNK_SHIFT: u8 = 17;
/// Largest chunk: 4 MiB.
pub const MAX_CHUNK_SHIFT: u8 = 22;
/// Largest chunk in bytes.
pub const MAX_CHUNK_SIZE: usize = 1 << MAX_CHUNK_SHIFT;
const TARGET_CHUNKS_PER_FILE: u64 = 1024;
const ROOT_DOMAIN: &[u8] = b"ferry manifest root v1";

/// A BLAKE3 hash.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ChunkHash(pub [u8; 32]);

impl ChunkHash {
    /// Hashes `data`.
    pub fn of(data: &[u8]) -> Self {
        ChunkHash(*blake3::hash(data).as_bytes())
    }

    /// Lower-case hex.
    pub fn to_hex(&self) -> String {
        blake3::Hash::from_bytes(self.0).to_hex().to_string()
    }

    /// Parses 64 hex digits.
    pub fn from_hex(s: &str) -> Option<Self> {
        blake3::Hash::from_hex(s)
            .ok()
            .map(|h| ChunkHash(*h.as_bytes()))
    }
}

impl fmt::Debug for ChunkHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", &self.to_hex()[..16])
    }
}

impl fmt::Display for ChunkHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// Defines an id newtype over `u32`: the three numberings of a manifest (entries, chunk slots,
/// unique chunks) cannot be mixed up. On the wire an id is its integer (`serde(transparent)`).
macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(
            Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize,
        )]
        #[serde(transparent)]
        pub struct $name(pub u32);

        impl $name {
            /// The id as an index into a table.
            pub fn index(self) -> usize {
                self.0 as usize
            }

            /// The id after this one.
            pub fn next(self) -> Self {
                $name(self.0 + 1)
            }
        }

        /// The integer (messages say what kind of id it is).
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

id_type!(
    /// An entry of a manifest: its position in path order.
    EntryId
);
id_type!(
    /// A chunk slot: one chunk of one file, numbered through the manifest in entry order (a
    /// chunk stored in two files has two slots).
    SlotId
);
id_type!(
    /// A unique chunk: its position in the unique-chunk table (in order of first appearance).
    /// The protocol names chunks by it.
    ChunkId
);

/// The chunk size (as a power of two) for a file of `size` bytes.
pub fn chunk_shift_for(size: u64) -> u8 {
    let wanted = size.div_ceil(TARGET_CHUNKS_PER_FILE).max(1);
    let shift = (64 - (wanted - 1).leading_zeros()) as u8; // ceil(log2(wanted))
    shift.clamp(MIN_CHUNK_SHIFT, MAX_CHUNK_SHIFT)
}

/// Number of chunks of a file.
pub fn chunk_count(size: u64, shift: u8) -> u64 {
    size.div_ceil(1u64 << shift)
}

/// Modification time as seconds and nanoseconds since the Unix epoch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mtime {
    pub secs: i64,
    pub nanos: u32,
}

/// What an entry is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryKind {
    Dir,
    File { chunk_shift: u8 },
    Symlink { target: String },
}

/// One entry of a manifest as it crosses the wire (and as the root hash sees it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireEntry {
    pub path: String,
    pub kind: EntryKind,
    pub size: u64,
    pub mode: u32,
    pub mtime: Mtime,
    /// Chunk hashes of a file, in order; empty for other kinds.
    pub hashes: Vec<ChunkHash>,
}

/// One entry of a manifest in memory. File chunk hashes live in the manifest's slot table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub path: String,
    pub kind: EntryKind,
    pub size: u64,
    pub mode: u32,
    pub mtime: Mtime,
    /// This file's first chunk slot.
    pub first_slot: SlotId,
}

impl Entry {
    /// The chunk slots of this file, in order.
    pub fn slots(&self) -> impl Iterator<Item = SlotId> + Clone {
        (self.first_slot.0..self.first_slot.0 + self.chunks()).map(SlotId)
    }

    /// Number of chunk slots (0 for anything but a non-empty file).
    pub fn chunks(&self) -> u32 {
        match self.kind {
            EntryKind::File { chunk_shift } => chunk_count(self.size, chunk_shift) as u32,
            _ => 0,
        }
    }

    /// Chunk size of a file (0 for other kinds).
    pub fn chunk_size(&self) -> u64 {
        match self.kind {
            EntryKind::File { chunk_shift } => 1u64 << chunk_shift,
            _ => 0,
        }
    }

    /// Whether this is a regular file.
    pub fn is_file(&self) -> bool {
        matches!(self.kind, EntryKind::File { .. })
    }
}

/// A chunk of the unique-chunk table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UniqueChunk {
    pub hash: ChunkHash,
    pub len: u32,
    /// First slot holding this chunk.
    pub first_slot: SlotId,
}

/// Where a chunk slot lies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotLocation {
    /// The file entry.
    pub entry: EntryId,
    pub offset: u64,
    pub len: u32,
}

/// Totals that close a manifest on the wire and in the receipt.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestSummary {
    pub root: ChunkHash,
    pub entries: u64,
    pub files: u64,
    pub bytes: u64,
    pub unique_chunks: u64,
    pub unique_bytes: u64,
}

/// Limits a receiver applies to a manifest it is sent.
///
/// The count limits alone do not bound memory: 20 M entries with long paths would hold many
/// GiB. `max_memory` does — the builder counts what it holds (its tables at their allocated
/// capacity, every path and symlink target) as entries arrive, and refuses the entry that would
/// take it over the budget, before allocating for it.
#[derive(Clone, Debug)]
pub struct ManifestLimits {
    pub max_entries: u64,
    pub max_slots: u64,
    pub max_total_bytes: u64,
    /// Most bytes of memory the manifest may hold while it is built (see
    /// [`ManifestBuilder::held_bytes`]); the finished manifest holds the same tables.
    pub max_memory: u64,
    /// Bytes the destination can take (its free space, plus what it already holds that the
    /// store may reuse); `None` skips this check. The running total of the file sizes declared
    /// so far is checked against it as entries arrive, so a history that cannot fit is refused
    /// long before its whole manifest is read (the store checks exactly, before writing).
    pub available_space: Option<u64>,
    /// Refuse paths that differ only by case (set when the destination folds case).
    pub case_insensitive: bool,
    /// Refuse paths that differ only by Unicode normalisation, `é` as one code point or as `e`
    /// and a combining accent (set when the destination normalises names, as APFS and HFS+ do).
    pub normalization_insensitive: bool,
}

/// The default [`ManifestLimits::max_memory`]: 1 GiB. About 300 bytes per file of a typical
/// history (entry, path, one or two chunk slots and their hash-table entries) make that room
/// for some 3 million files. The `ferry` binary sets the budget from the memory available.
pub const DEFAULT_MANIFEST_MEMORY: u64 = 1 << 30;

impl Default for ManifestLimits {
    fn default() -> Self {
        ManifestLimits {
            max_entries: 20_000_000,
            max_slots: 200_000_000,
            max_total_bytes: 1 << 50,
            max_memory: DEFAULT_MANIFEST_MEMORY,
            available_space: None,
            case_insensitive: false,
            normalization_insensitive: false,
        }
    }
}

/// A manifest the receiver refuses.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ManifestError {
    #[error("unsafe path {path:?}: {problem}")]
    UnsafePath { path: String, problem: PathProblem },
    #[error("entry {path:?} is out of order or a duplicate (entries must be sorted by path)")]
    OutOfOrder { path: String },
    #[error("entry {path:?} lies under {ancestor:?}, which is not a directory in the manifest")]
    AncestorNotDir { path: String, ancestor: String },
    #[error("entry {path:?} collides with {other:?} on a destination that does not tell their names apart (case or Unicode normalisation)")]
    CaseCollision { path: String, other: String },
    #[error("symlink {path:?} points outside the destination ({target:?})")]
    SymlinkEscapes { path: String, target: String },
    #[error("file {path:?}: chunk size 2^{shift} is outside the accepted range")]
    BadChunkSize { path: String, shift: u8 },
    #[error("entry {path:?}: {expected} chunk hashes expected for its size, {got} given")]
    ChunkCount {
        path: String,
        expected: u64,
        got: u64,
    },
    #[error("entry {path:?}: a directory or symlink must have size 0")]
    NonFileSize { path: String },
    #[error("the manifest exceeds the limit of {limit} {what}")]
    TooLarge { what: &'static str, limit: u64 },
    /// Holding the manifest would take more memory than this device allows for it.
    #[error("the manifest needs more than the {} MiB of memory this device allows for it (after {entries} entries)", budget >> 20)]
    MemoryBudget { budget: u64, entries: u64 },
    /// The files declared so far are larger than the room at the destination.
    #[error("not enough space at the destination: the sender's manifest declares at least {} MiB of files, and only {} MiB is free there", declared >> 20, available >> 20)]
    NoSpace { declared: u64, available: u64 },
    #[error("the manifest's root hash does not match its entries (sender said {said}, entries give {computed})")]
    RootMismatch {
        said: ChunkHash,
        computed: ChunkHash,
    },
    #[error("the manifest's totals do not match its entries")]
    SummaryMismatch,
}

/// A complete, validated manifest.
#[derive(Clone, Debug)]
pub struct Manifest {
    entries: Vec<Entry>,
    /// Unique-chunk id of every slot.
    slots: Vec<ChunkId>,
    unique: Vec<UniqueChunk>,
    /// Next slot holding the same unique chunk (`u32::MAX` ends the list).
    next_same: Vec<u32>,
    summary: ManifestSummary,
}

impl Manifest {
    /// Builds a manifest from entries (any order), as a scanner does. Validates like a receiver.
    pub fn from_wire_entries(mut entries: Vec<WireEntry>) -> Result<Self, ManifestError> {
        entries.sort_by(|a, b| a.path.as_bytes().cmp(b.path.as_bytes()));
        let mut b = ManifestBuilder::new(ManifestLimits::default());
        for e in entries {
            b.push(e)?;
        }
        Ok(b.finish_unchecked())
    }

    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    pub fn entry(&self, i: EntryId) -> Option<&Entry> {
        self.entries.get(i.index())
    }

    pub fn summary(&self) -> &ManifestSummary {
        &self.summary
    }

    pub fn root(&self) -> ChunkHash {
        self.summary.root
    }

    /// Number of chunk slots (file chunks, counting duplicates).
    pub fn slot_count(&self) -> u32 {
        self.slots.len() as u32
    }

    pub fn unique_chunks(&self) -> &[UniqueChunk] {
        &self.unique
    }

    pub fn unique(&self, id: ChunkId) -> Option<&UniqueChunk> {
        self.unique.get(id.index())
    }

    /// Unique-chunk id of a slot.
    pub fn slot_chunk(&self, slot: SlotId) -> Option<ChunkId> {
        self.slots.get(slot.index()).copied()
    }

    /// Hash of a slot.
    pub fn slot_hash(&self, slot: SlotId) -> Option<ChunkHash> {
        self.slot_chunk(slot)
            .and_then(|u| self.unique(u))
            .map(|u| u.hash)
    }

    /// Every slot holding unique chunk `id`, in order.
    pub fn slots_of(&self, id: ChunkId) -> SlotsOf<'_> {
        SlotsOf {
            next: self.unique(id).map_or(u32::MAX, |u| u.first_slot.0),
            manifest: self,
        }
    }

    /// File entry, offset and length of a slot.
    pub fn locate(&self, slot: SlotId) -> Option<SlotLocation> {
        let uid = self.slot_chunk(slot)?;
        let len = self.unique(uid)?.len;
        let idx = self
            .entries
            .partition_point(|e| e.first_slot <= slot)
            .checked_sub(1)?;
        let e = &self.entries[idx];
        let index = slot.0.checked_sub(e.first_slot.0)?;
        if index >= e.chunks() {
            return None;
        }
        Some(SlotLocation {
            entry: EntryId(idx as u32),
            offset: u64::from(index) * e.chunk_size(),
            len,
        })
    }

    /// The wire form of entry `i` (with its chunk hashes).
    pub fn wire_entry(&self, i: usize) -> Option<WireEntry> {
        let e = self.entries.get(i)?;
        let first = e.first_slot.index();
        let hashes = self.slots[first..first + e.chunks() as usize]
            .iter()
            .map(|&u| self.unique[u.index()].hash)
            .collect();
        Some(WireEntry {
            path: e.path.clone(),
            kind: e.kind.clone(),
            size: e.size,
            mode: e.mode,
            mtime: e.mtime,
            hashes,
        })
    }

    /// File entries in the order a receiver fetches them: databases first (by name, see
    /// [`looks_like_database`]), then the other files smallest first, ties by path. The new
    /// device thus holds a usable history early and large media arrive last. A pure function
    /// of the entries; it does not touch chunk ids or the root hash.
    pub fn transfer_order(&self) -> Vec<EntryId> {
        let mut order: Vec<EntryId> = (0..self.entries.len() as u32)
            .map(EntryId)
            .filter(|&i| self.entries[i.index()].chunks() > 0)
            .collect();
        order.sort_by_key(|&i| {
            let e = &self.entries[i.index()];
            (!looks_like_database(&e.path), e.size, i)
        });
        order
    }

    /// The part of the history a person needs first: every directory and symlink, the
    /// databases and the files up to `small` bytes — or `None` when that is most of the bytes
    /// anyway (no point in a separate round). Served as its own first round, it gives the new
    /// device a verified, committed, usable chat history (messages and thumbnails) early; the
    /// large media follow in the next round.
    pub fn early_subset(&self, small: u64) -> Option<Manifest> {
        let keep = |e: &Entry| !e.is_file() || looks_like_database(&e.path) || e.size <= small;
        let kept: u64 = self
            .entries
            .iter()
            .filter(|e| keep(e))
            .map(|e| e.size)
            .sum();
        if kept.saturating_mul(2) > self.summary.bytes {
            return None;
        }
        let wire = self
            .entries
            .iter()
            .filter(|e| keep(e))
            .map(|e| WireEntry {
                path: e.path.clone(),
                kind: e.kind.clone(),
                size: e.size,
                mode: e.mode,
                mtime: e.mtime,
                hashes: e.slots().filter_map(|s| self.slot_hash(s)).collect(),
            })
            .collect();
        Manifest::from_wire_entries(wire).ok()
    }

    /// Index of the entry with this exact path.
    pub fn find(&self, path: &str) -> Option<usize> {
        self.entries
            .binary_search_by(|e| e.path.as_bytes().cmp(path.as_bytes()))
            .ok()
    }

    /// What changed from `self` (an earlier snapshot) to `newer`, counting files and symlinks:
    /// added paths, paths whose content (chunk hashes, size or kind) differs, removed paths, and
    /// the paths themselves (sorted, added and changed first, capped at `max_paths`).
    pub fn diff(&self, newer: &Manifest, max_paths: usize) -> ManifestDiff {
        let content = |m: &Manifest, e: &Entry| -> Option<(u64, Vec<ChunkHash>)> {
            match &e.kind {
                EntryKind::Dir => None,
                _ => Some((e.size, e.slots().filter_map(|s| m.slot_hash(s)).collect())),
            }
        };
        let mut d = ManifestDiff::default();
        for e in newer.entries().iter().filter(|e| e.kind != EntryKind::Dir) {
            match self.find(&e.path).and_then(|i| self.entries().get(i)) {
                Some(old) if old.kind == EntryKind::Dir => d.added += 1,
                Some(old) => {
                    if old.kind != e.kind || content(self, old) != content(newer, e) {
                        d.changed += 1;
                    } else {
                        continue;
                    }
                }
                None => d.added += 1,
            }
            if d.paths.len() < max_paths {
                d.paths.push(e.path.clone());
            }
        }
        for e in self.entries().iter().filter(|e| e.kind != EntryKind::Dir) {
            if newer
                .find(&e.path)
                .and_then(|i| newer.entries().get(i))
                .is_none_or(|n| n.kind == EntryKind::Dir)
            {
                d.removed += 1;
            }
        }
        d
    }
}

/// Whether a path names a database by the usual chat-app file extensions (`.db`, `.sqlite`,
/// `.sqlite3`, `.db3`, any case). The receiver only sees names, so this decides fetch order
/// only; correctness never depends on it.
pub fn looks_like_database(path: &str) -> bool {
    let name = path.rsplit('/').next().unwrap_or(path);
    let Some((_, ext)) = name.rsplit_once('.') else {
        return false;
    };
    ["db", "sqlite", "sqlite3", "db3"]
        .iter()
        .any(|d| ext.eq_ignore_ascii_case(d))
}

/// Iterator over the slots of one unique chunk.
pub struct SlotsOf<'a> {
    next: u32,
    manifest: &'a Manifest,
}

impl Iterator for SlotsOf<'_> {
    type Item = SlotId;
    fn next(&mut self) -> Option<SlotId> {
        if self.next == u32::MAX {
            return None;
        }
        let cur = self.next;
        self.next = self
            .manifest
            .next_same
            .get(cur as usize)
            .copied()
            .unwrap_or(u32::MAX);
        Some(SlotId(cur))
    }
}

/// The name under which a case-insensitive file system may find `path`. Upper case first, then
/// lower: exFAT and FAT compare by upper-casing (`ſ`, `ı`, `ς`, `µ` meet `S`, `I`, `Σ`, `Μ`, which
/// lower-casing alone would miss), APFS folds (`ß` meets `ss`). Where the key merges names a
/// given file system keeps apart, a history that could have been received is refused; it never
/// lets one file replace another.
fn case_key(path: &str) -> String {
    path.to_uppercase().to_lowercase()
}

/// The name under which the destination may find `path`: [`case_key`] where it folds case,
/// then the canonical decomposition (NFD) where it normalises (both spellings of `é` meet).
fn fold_key(path: &str, case: bool, normalization: bool) -> String {
    use unicode_normalization::UnicodeNormalization;
    let folded = if case {
        case_key(path)
    } else {
        path.to_owned()
    };
    if normalization {
        folded.nfd().collect()
    } else {
        folded
    }
}

/// Builds a [`Manifest`] entry by entry, validating each as it arrives (entries come from an
/// untrusted peer, in bounded frames).
#[derive(Debug)]
pub struct ManifestBuilder {
    limits: ManifestLimits,
    /// The entries so far: a complete manifest of the prefix (its summary counts them; the
    /// root is only known at [`finish`](Self::finish)).
    m: Manifest,
    last_same: Vec<u32>,
    by_hash: HashMap<(ChunkHash, u32), ChunkId>,
    folded: HashMap<String, u32>,
    hasher: blake3::Hasher,
    scratch: Vec<u8>,
    /// Heap bytes of the strings held: paths, symlink targets, case-folded keys.
    string_bytes: u64,
}

/// Bytes a vector holds at its capacity.
fn vec_bytes<T>(v: &Vec<T>) -> u64 {
    (v.capacity() * std::mem::size_of::<T>()) as u64
}

/// Bytes a vector holds once `add` more items were reserved (as [`Vec::reserve`] grows it:
/// to at least twice its capacity).
fn vec_bytes_after<T>(v: &Vec<T>, add: usize) -> u64 {
    let need = v.len().saturating_add(add);
    let cap = if need <= v.capacity() {
        v.capacity()
    } else {
        need.max(v.capacity().saturating_mul(2)).max(4)
    };
    (cap as u64).saturating_mul(std::mem::size_of::<T>() as u64)
}

/// Bytes a hash table of this usable capacity allocates (hashbrown: a power of two of buckets,
/// at most 7/8 full, each bucket its key and value plus a control byte).
fn map_bytes_for<K, V>(capacity: usize) -> u64 {
    if capacity == 0 {
        return 0;
    }
    let buckets = if capacity < 4 {
        4
    } else if capacity < 8 {
        8
    } else {
        (capacity.saturating_mul(8) / 7).next_power_of_two()
    };
    (buckets as u64).saturating_mul((std::mem::size_of::<(K, V)>() + 1) as u64)
}

fn map_bytes<K, V>(m: &HashMap<K, V>) -> u64 {
    map_bytes_for::<K, V>(m.capacity())
}

/// Bytes a hash table holds once `add` more items were reserved.
fn map_bytes_after<K, V>(m: &HashMap<K, V>, add: usize) -> u64 {
    let need = m.len().saturating_add(add);
    if need <= m.capacity() {
        map_bytes(m)
    } else {
        map_bytes_for::<K, V>(need.max(m.capacity().saturating_add(1)))
    }
}

impl ManifestBuilder {
    pub fn new(limits: ManifestLimits) -> Self {
        let mut hasher = blake3::Hasher::new();
        hasher.update(ROOT_DOMAIN);
        ManifestBuilder {
            limits,
            m: Manifest {
                entries: Vec::new(),
                slots: Vec::new(),
                unique: Vec::new(),
                next_same: Vec::new(),
                summary: ManifestSummary {
                    root: ChunkHash([0; 32]),
                    entries: 0,
                    files: 0,
                    bytes: 0,
                    unique_chunks: 0,
                    unique_bytes: 0,
                },
            },
            last_same: Vec::new(),
            by_hash: HashMap::new(),
            folded: HashMap::new(),
            hasher,
            scratch: Vec::new(),
            string_bytes: 0,
        }
    }

    /// Bytes of memory the builder holds: its tables at their allocated capacity (entries,
    /// chunk slots, unique chunks, hash tables) and every string. The finished [`Manifest`]
    /// keeps the same allocations (less the two lookup tables and the case-folded keys).
    /// Never more than [`ManifestLimits::max_memory`] plus the encoding of the last entry.
    pub fn held_bytes(&self) -> u64 {
        vec_bytes(&self.m.entries)
            + vec_bytes(&self.m.slots)
            + vec_bytes(&self.m.unique)
            + vec_bytes(&self.m.next_same)
            + vec_bytes(&self.last_same)
            + map_bytes(&self.by_hash)
            + map_bytes(&self.folded)
            + vec_bytes(&self.scratch)
            + self.string_bytes
    }

    /// File bytes declared so far.
    pub fn declared_bytes(&self) -> u64 {
        self.m.summary.bytes
    }

    /// Entries accepted so far.
    pub fn len(&self) -> usize {
        self.m.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.m.entries.is_empty()
    }

    /// Validates and adds the next entry.
    pub fn push(&mut self, e: WireEntry) -> Result<(), ManifestError> {
        let folded = self.check_place(&e)?;
        let expected_chunks = expected_chunks(&e)?;
        if expected_chunks != e.hashes.len() as u64 {
            return Err(ManifestError::ChunkCount {
                path: e.path,
                expected: expected_chunks,
                got: e.hashes.len() as u64,
            });
        }
        let total = self.check_totals(&e, expected_chunks)?;
        self.reserve_for(&e, folded)?;
        // Hash the canonical encoding into the root.
        self.scratch.clear();
        let encoded = postcard::to_extend(&e, std::mem::take(&mut self.scratch))
            .map_err(|_| ManifestError::SummaryMismatch)?;
        self.hasher.update(&(encoded.len() as u64).to_le_bytes());
        self.hasher.update(&encoded);
        self.scratch = encoded;

        let first_slot = SlotId(self.m.slots.len() as u32);
        if let EntryKind::File { chunk_shift } = e.kind {
            self.m.summary.files += 1;
            self.add_slots(&e.hashes, e.size, chunk_shift);
        }
        self.m.summary.bytes = total;
        self.m.entries.push(Entry {
            path: e.path,
            kind: e.kind,
            size: e.size,
            mode: e.mode,
            mtime: e.mtime,
            first_slot,
        });
        self.m.summary.entries = self.m.entries.len() as u64;
        self.m.summary.unique_chunks = self.m.unique.len() as u64;
        Ok(())
    }

    /// Checks where `e` goes: the entry limit, a safe path, sorted after the previous entry,
    /// under directories only, and no name the destination would merge with an earlier one.
    /// Returns the folded name to remember when the destination folds names.
    fn check_place(&self, e: &WireEntry) -> Result<Option<String>, ManifestError> {
        let limits = &self.limits;
        if self.m.entries.len() as u64 >= limits.max_entries {
            return Err(ManifestError::TooLarge {
                what: "entries",
                limit: limits.max_entries,
            });
        }
        path::check_relative_path(&e.path).map_err(|problem| ManifestError::UnsafePath {
            path: e.path.clone(),
            problem,
        })?;
        if let Some(prev) = self.m.entries.last() {
            if prev.path.as_bytes() >= e.path.as_bytes() {
                return Err(ManifestError::OutOfOrder {
                    path: e.path.clone(),
                });
            }
        }
        // Every ancestor that the manifest names must be a directory: a file or symlink "a"
        // followed by "a/b" would write through a symlink or clobber a file.
        let mut anc = path::parent(&e.path);
        while let Some(a) = anc {
            if let Some(i) = self.find(a) {
                if self.m.entries[i].kind != EntryKind::Dir {
                    return Err(ManifestError::AncestorNotDir {
                        path: e.path.clone(),
                        ancestor: a.to_string(),
                    });
                }
                break; // its own ancestors were checked when it was added
            }
            anc = path::parent(a);
        }
        let (case, norm) = (limits.case_insensitive, limits.normalization_insensitive);
        if !(case || norm) {
            return Ok(None);
        }
        let folded = fold_key(&e.path, case, norm);
        if let Some(&other) = self.folded.get(&folded) {
            return Err(ManifestError::CaseCollision {
                path: e.path.clone(),
                other: self.m.entries[other as usize].path.clone(),
            });
        }
        Ok(Some(folded))
    }

    /// The chunk and byte limits, and the room at the destination, with `e` added. Returns the
    /// file bytes declared with `e`.
    fn check_totals(&self, e: &WireEntry, chunks: u64) -> Result<u64, ManifestError> {
        if self.m.slots.len() as u64 + chunks > self.limits.max_slots {
            return Err(ManifestError::TooLarge {
                what: "chunks",
                limit: self.limits.max_slots,
            });
        }
        let total = self.m.summary.bytes.saturating_add(e.size);
        if total > self.limits.max_total_bytes {
            return Err(ManifestError::TooLarge {
                what: "bytes",
                limit: self.limits.max_total_bytes,
            });
        }
        if let Some(available) = self.limits.available_space {
            if total > available {
                return Err(ManifestError::NoSpace {
                    declared: total,
                    available,
                });
            }
        }
        Ok(total)
    }

    /// Memory, before anything is allocated for `e`: what the tables hold once grown for it
    /// (every chunk counted as new, the most it can cost) and its strings. Within the budget,
    /// the tables are grown and the folded name is remembered.
    fn reserve_for(&mut self, e: &WireEntry, folded: Option<String>) -> Result<(), ManifestError> {
        let n = e.hashes.len();
        let strings = e.path.capacity() as u64
            + match &e.kind {
                EntryKind::Symlink { target } => target.capacity() as u64,
                _ => 0,
            }
            + folded.as_ref().map_or(0, |f| f.capacity() as u64);
        let grown = vec_bytes_after(&self.m.entries, 1)
            + vec_bytes_after(&self.m.slots, n)
            + vec_bytes_after(&self.m.unique, n)
            + vec_bytes_after(&self.m.next_same, n)
            + vec_bytes_after(&self.last_same, n)
            + map_bytes_after(&self.by_hash, n)
            + match &folded {
                Some(_) => map_bytes_after(&self.folded, 1),
                None => map_bytes(&self.folded),
            }
            + vec_bytes(&self.scratch)
            + self.string_bytes
            + strings;
        if grown > self.limits.max_memory {
            return Err(ManifestError::MemoryBudget {
                budget: self.limits.max_memory,
                entries: self.m.entries.len() as u64,
            });
        }
        self.m.entries.reserve(1);
        self.m.slots.reserve(n);
        self.m.unique.reserve(n);
        self.m.next_same.reserve(n);
        self.last_same.reserve(n);
        self.by_hash.reserve(n);
        if let Some(f) = folded {
            self.folded.reserve(1);
            self.folded.insert(f, self.m.entries.len() as u32);
        }
        self.string_bytes += strings;
        Ok(())
    }

    /// Adds the chunk slots of a file of `size` bytes (room is reserved): each names a unique
    /// chunk, new or shared with an earlier slot of the same hash and length.
    fn add_slots(&mut self, hashes: &[ChunkHash], size: u64, chunk_shift: u8) {
        let n = hashes.len();
        let csize = 1u64 << chunk_shift;
        for (i, h) in hashes.iter().enumerate() {
            let len = if i + 1 == n {
                size - csize * (n as u64 - 1)
            } else {
                csize
            } as u32;
            let slot = self.m.slots.len() as u32;
            let uid = match self.by_hash.get(&(*h, len)) {
                Some(&uid) => {
                    let last = self.last_same[uid.index()];
                    self.m.next_same[last as usize] = slot;
                    self.last_same[uid.index()] = slot;
                    uid
                }
                None => {
                    let uid = ChunkId(self.m.unique.len() as u32);
                    self.m.unique.push(UniqueChunk {
                        hash: *h,
                        len,
                        first_slot: SlotId(slot),
                    });
                    self.last_same.push(slot);
                    self.by_hash.insert((*h, len), uid);
                    self.m.summary.unique_bytes += u64::from(len);
                    uid
                }
            };
            self.m.slots.push(uid);
            self.m.next_same.push(u32::MAX);
        }
    }

    fn find(&self, path: &str) -> Option<usize> {
        self.m
            .entries
            .binary_search_by(|e| e.path.as_bytes().cmp(path.as_bytes()))
            .ok()
    }

    /// Finishes and checks the result against the totals the peer announced.
    pub fn finish(self, said: &ManifestSummary) -> Result<Manifest, ManifestError> {
        let m = self.finish_unchecked();
        if m.summary.root != said.root {
            return Err(ManifestError::RootMismatch {
                said: said.root,
                computed: m.summary.root,
            });
        }
        if m.summary != *said {
            return Err(ManifestError::SummaryMismatch);
        }
        Ok(m)
    }

    /// The entries accepted so far, as a manifest of that prefix: ids (entries, slots, unique
    /// chunks) never change as more entries arrive, so what the prefix says of them stays
    /// true. Its summary counts the prefix; its root is not computed (all zero).
    pub fn prefix(&self) -> &Manifest {
        &self.m
    }

    /// Finishes, computing the summary from the entries.
    pub fn finish_unchecked(mut self) -> Manifest {
        self.hasher
            .update(&(self.m.entries.len() as u64).to_le_bytes());
        let mut m = self.m;
        m.summary.root = ChunkHash(*self.hasher.finalize().as_bytes());
        m.summary.entries = m.entries.len() as u64;
        m.summary.unique_chunks = m.unique.len() as u64;
        m
    }
}

/// How many chunk hashes entry `e` must carry; checks its kind (chunk size in range, symlink
/// inside the destination, size 0 for anything but a file).
fn expected_chunks(e: &WireEntry) -> Result<u64, ManifestError> {
    match &e.kind {
        EntryKind::File { chunk_shift } => {
            if !(MIN_CHUNK_SHIFT..=MAX_CHUNK_SHIFT).contains(chunk_shift) {
                return Err(ManifestError::BadChunkSize {
                    path: e.path.clone(),
                    shift: *chunk_shift,
                });
            }
            Ok(chunk_count(e.size, *chunk_shift))
        }
        EntryKind::Symlink { target } => {
            if !path::symlink_stays_inside(&e.path, target) {
                return Err(ManifestError::SymlinkEscapes {
                    target: target.clone(),
                    path: e.path.clone(),
                });
            }
            if e.size != 0 {
                return Err(ManifestError::NonFileSize {
                    path: e.path.clone(),
                });
            }
            Ok(0)
        }
        EntryKind::Dir => {
            if e.size != 0 {
                return Err(ManifestError::NonFileSize {
                    path: e.path.clone(),
                });
            }
            Ok(0)
        }
    }
}

/// The result of [`Manifest::diff`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ManifestDiff {
    pub added: u64,
    pub changed: u64,
    pub removed: u64,
    pub paths: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str, data: &[u8]) -> WireEntry {
        let shift = chunk_shift_for(data.len() as u64);
        let hashes = data.chunks(1 << shift).map(ChunkHash::of).collect();
        WireEntry {
            path: path.into(),
            kind: EntryKind::File { chunk_shift: shift },
            size: data.len() as u64,
            mode: 0o644,
            mtime: Mtime::default(),
            hashes,
        }
    }

    fn dir(path: &str) -> WireEntry {
        WireEntry {
            path: path.into(),
            kind: EntryKind::Dir,
            size: 0,
            mode: 0o755,
            mtime: Mtime::default(),
            hashes: vec![],
        }
    }

    #[test]
    fn chunk_policy() {
        assert_eq!(chunk_shift_for(0), MIN_CHUNK_SHIFT);
        assert_eq!(chunk_shift_for(5000), MIN_CHUNK_SHIFT);
        assert_eq!(chunk_shift_for(128 << 20), MIN_CHUNK_SHIFT);
        assert_eq!(chunk_shift_for((128 << 20) + 1), MIN_CHUNK_SHIFT + 1);
        assert_eq!(chunk_shift_for(1 << 40), MAX_CHUNK_SHIFT);
        assert_eq!(chunk_count(0, 17), 0);
        assert_eq!(chunk_count(1, 17), 1);
        assert_eq!(chunk_count(1 << 17, 17), 1);
        assert_eq!(chunk_count((1 << 17) + 1, 17), 2);
    }

    #[test]
    fn dedup_and_locate() {
        let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let m = Manifest::from_wire_entries(vec![
            file("b/x", &big),
            dir("b"),
            file("a", b"hello"),
            file("c", b"hello"),
            file("empty", b""),
        ])
        .unwrap();
        assert_eq!(
            m.entries()
                .iter()
                .map(|e| e.path.as_str())
                .collect::<Vec<_>>(),
            ["a", "b", "b/x", "c", "empty"]
        );
        // "hello" twice shares one unique chunk; big has 3 chunks.
        assert_eq!(m.slot_count(), 5);
        assert_eq!(m.unique_chunks().len(), 4);
        let hello = m.slot_chunk(SlotId(0)).unwrap();
        assert_eq!(
            m.slots_of(hello).collect::<Vec<_>>(),
            vec![SlotId(0), SlotId(4)]
        );
        let loc = m.locate(SlotId(3)).unwrap();
        assert_eq!(m.entries()[loc.entry.index()].path, "b/x");
        assert_eq!(loc.offset, 2 << 17);
        assert_eq!(loc.len as usize, 300_000 - (2 << 17));
        let loc = m.locate(SlotId(4)).unwrap();
        assert_eq!(m.entries()[loc.entry.index()].path, "c");
        assert!(m.locate(SlotId(5)).is_none());
        assert_eq!(m.summary().files, 4);
        assert_eq!(m.summary().bytes, 300_010);
    }

    #[test]
    fn root_is_order_independent_and_content_sensitive() {
        let a = Manifest::from_wire_entries(vec![file("a", b"1"), file("b", b"2")]).unwrap();
        let b = Manifest::from_wire_entries(vec![file("b", b"2"), file("a", b"1")]).unwrap();
        let c = Manifest::from_wire_entries(vec![file("a", b"1"), file("b", b"3")]).unwrap();
        assert_eq!(a.root(), b.root());
        assert_ne!(a.root(), c.root());
    }

    #[test]
    fn builder_rejects_bad_input() {
        let mut b = ManifestBuilder::new(ManifestLimits::default());
        b.push(file("a", b"x")).unwrap();
        assert!(matches!(
            b.push(file("a", b"x")),
            Err(ManifestError::OutOfOrder { .. })
        ));
        assert!(matches!(
            b.push(file("a/b", b"x")),
            Err(ManifestError::AncestorNotDir { .. })
        ));
        let mut bad = file("b", b"xyz");
        bad.hashes.push(ChunkHash([0; 32]));
        assert!(matches!(b.push(bad), Err(ManifestError::ChunkCount { .. })));
        let mut bad = file("c", b"xyz");
        bad.kind = EntryKind::File { chunk_shift: 40 };
        assert!(matches!(
            b.push(bad),
            Err(ManifestError::BadChunkSize { .. })
        ));
        let link = WireEntry {
            kind: EntryKind::Symlink {
                target: "../../etc".into(),
            },
            hashes: vec![],
            ..dir("d")
        };
        assert!(matches!(
            b.push(link),
            Err(ManifestError::SymlinkEscapes { .. })
        ));
        assert!(matches!(
            b.push(file("../e", b"")),
            Err(ManifestError::UnsafePath { .. })
        ));

        let mut ci = ManifestBuilder::new(ManifestLimits {
            case_insensitive: true,
            ..Default::default()
        });
        ci.push(file("Photo.JPG", b"1")).unwrap();
        assert!(matches!(
            ci.push(file("photo.jpg", b"1")),
            Err(ManifestError::CaseCollision { .. })
        ));
        // Names that differ only by normalisation, on a destination that normalises (APFS):
        // refused; on one that does not (ext4, NTFS), both arrive.
        let (nfc, nfd) = ("caf\u{e9}.jpg", "cafe\u{301}.jpg");
        let mut norm = ManifestBuilder::new(ManifestLimits {
            normalization_insensitive: true,
            ..Default::default()
        });
        norm.push(file(nfd, b"1")).unwrap();
        assert!(matches!(
            norm.push(file(nfc, b"2")),
            Err(ManifestError::CaseCollision { .. })
        ));
        let mut plain = ManifestBuilder::new(ManifestLimits::default());
        plain.push(file(nfd, b"1")).unwrap();
        plain.push(file(nfc, b"2")).unwrap();
        // Pairs an upper-casing file system (exFAT) merges although their lower cases differ.
        for (a, b) in [
            ("s.txt", "ſ.txt"),
            ("i.txt", "ı.txt"),
            ("ς", "σ"),
            ("µ", "μ"),
        ] {
            let mut ci = ManifestBuilder::new(ManifestLimits {
                case_insensitive: true,
                ..Default::default()
            });
            ci.push(file(a, b"1")).unwrap();
            assert!(
                matches!(
                    ci.push(file(b, b"2")),
                    Err(ManifestError::CaseCollision { .. })
                ),
                "{a} {b}"
            );
        }
    }

    #[test]
    fn finish_checks_summary() {
        let m = Manifest::from_wire_entries(vec![file("a", b"1")]).unwrap();
        let mut b = ManifestBuilder::new(ManifestLimits::default());
        b.push(m.wire_entry(0).unwrap()).unwrap();
        let mut said = *m.summary();
        said.root = ChunkHash([7; 32]);
        assert!(matches!(
            b.finish(&said),
            Err(ManifestError::RootMismatch { .. })
        ));
    }

    #[test]
    fn early_subset_keeps_databases_small_files_and_structure() {
        let m = Manifest::from_wire_entries(vec![
            dir("db"),
            dir("media"),
            file("db/msg_1.db", &[2u8; 900_000]),
            file("media/movie.mp4", &[4u8; 3_000_000]),
            file("media/thumb.jpg", &[5u8; 20_000]),
        ])
        .unwrap();
        let sub = m.early_subset(1 << 20).unwrap();
        let names: Vec<&str> = sub.entries().iter().map(|e| e.path.as_str()).collect();
        assert_eq!(names, ["db", "db/msg_1.db", "media", "media/thumb.jpg"]);
        assert_eq!(sub.summary().bytes, 920_000);
        // Same content, same hashes as in the whole manifest.
        let i = m.find("db/msg_1.db").unwrap();
        let j = sub.find("db/msg_1.db").unwrap();
        let (e, f) = (&m.entries()[i], &sub.entries()[j]);
        assert_eq!(m.slot_hash(e.first_slot), sub.slot_hash(f.first_slot));
        // Mostly essentials already: no separate round.
        assert!(m.early_subset(4 << 20).is_none());
    }

    #[test]
    fn transfer_order_puts_databases_then_small_files_first() {
        let m = Manifest::from_wire_entries(vec![
            dir("db"),
            dir("media"),
            file("a_note.txt", &[1u8; 5000]),
            file("db/msg_1.db", &[2u8; 900_000]),
            file("db/contact.SQLITE", &[3u8; 300_000]),
            file("empty", b""),
            file("media/movie.mp4", &[4u8; 2_000_000]),
            file("media/thumb.jpg", &[5u8; 20_000]),
        ])
        .unwrap();
        let names: Vec<&str> = m
            .transfer_order()
            .into_iter()
            .map(|i| m.entry(i).unwrap().path.as_str())
            .collect();
        assert_eq!(
            names,
            [
                "db/contact.SQLITE",
                "db/msg_1.db",
                "a_note.txt",
                "media/thumb.jpg",
                "media/movie.mp4"
            ]
        );
        assert!(looks_like_database("x/y.db3"));
        assert!(!looks_like_database("x/y.db-wal"));
        assert!(!looks_like_database("db"));
    }
}
