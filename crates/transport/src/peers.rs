//! Paired devices, remembered in `peers.json` in the config directory (owner-only).
//!
//! Each record says in which **role** the peer was paired (it receives from this device, or it
//! sends to this device) and when it was **last used**: a pinned key is honoured without a code
//! only in that direction and only while the pairing has not expired (see
//! [`PeerRecord::usable_as`]). The file is the single source of truth: every query reads it and
//! every change is a read-modify-write under an exclusive lock on a sidecar lock file
//! (`peers.lock`), written to a temporary file, fsynced and renamed into place. So `ferry peers
//! --forget` in one process takes effect at once in a running sender or receiver, and no process
//! ever writes back a peer another one forgot.

use std::fs;
use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::identity::{ensure_private_dir, write_private, DeviceId, IdentityError};

const PEERS_FILE: &str = "peers.json";
const LOCK_FILE: &str = "peers.lock";
/// At most this many last-known addresses are kept per peer.
const MAX_ADDRS: usize = 16;
/// A peers file larger than this is refused rather than read (a few hundred bytes per peer).
const MAX_FILE_BYTES: u64 = 4 << 20;
/// How long a pairing stays usable without a code after its last use, unless configured.
pub const DEFAULT_PAIRING_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// Error reading or writing the peers file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PeerStoreError {
    /// I/O on the peers file or its directory.
    #[error(transparent)]
    Io(#[from] IdentityError),
    /// Reading the file failed.
    #[error("peers file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Taking the lock on the peers file failed.
    #[error("locking the peers file {path}: {source}")]
    Lock {
        /// The lock file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is larger than any real peers file.
    #[error(
        "peers file {path} is larger than {MAX_FILE_BYTES} bytes; move it aside and pair again"
    )]
    TooLarge {
        /// The file.
        path: PathBuf,
    },
    /// The file is not valid.
    #[error("peers file {path} is corrupt: {source}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: serde_json::Error,
    },
    /// Serialising the peers failed.
    #[error("encoding peers: {0}")]
    Encode(serde_json::Error),
}

/// The role a peer was paired in, seen from this device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PeerRole {
    /// It connected to this device and received from it (this device ran `ferry send`, or
    /// waited in `ferry pair`): it may connect again and receive without a code.
    Receiver,
    /// This device connected to it and received from it: this device may connect to it again
    /// without a code.
    Sender,
}

impl PeerRole {
    /// `"receiver"` or `"sender"`, as in the peers file and the JSON events.
    pub fn as_str(self) -> &'static str {
        match self {
            PeerRole::Receiver => "receiver",
            PeerRole::Sender => "sender",
        }
    }
}

impl std::fmt::Display for PeerRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a peer may not be used without a code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NotUsable {
    /// Not in the peers file (never paired, or forgotten).
    #[error("it is not paired with this device")]
    NotPaired,
    /// Paired, but for the other direction.
    #[error("it was paired as a {paired} of this device, not as a {wanted}")]
    WrongRole {
        /// The role it was paired in.
        paired: PeerRole,
        /// The role it would need.
        wanted: PeerRole,
    },
    /// Paired by a ferry that did not record the direction.
    #[error("it was paired by an older ferry that did not record the direction of the pairing")]
    UnknownRole,
    /// The peers file cannot be read: nothing is trusted without a code.
    #[error("the paired-devices file cannot be read ({0})")]
    Unreadable(String),
    /// Not used for longer than the pairing lifetime.
    #[error("its pairing expired: last used {idle_days} days ago, pairings expire after {ttl_days} days unused")]
    Expired {
        /// Whole days since its last use.
        idle_days: u64,
        /// The lifetime in whole days.
        ttl_days: u64,
    },
}

/// A paired device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerRecord {
    /// Its id (BLAKE3 of its public key): what is pinned.
    pub device_id: DeviceId,
    /// The name it announced during pairing.
    pub name: String,
    /// Addresses it was last reached at (newest first).
    pub last_addrs: Vec<SocketAddr>,
    /// Unix seconds when pairing completed.
    pub paired_at: u64,
    /// The role it was paired in. `None` in files written before ferry recorded it: such a
    /// peer is not trusted in either direction without a code (pair again).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<PeerRole>,
    /// Unix seconds of the last authenticated connection with it (`None`: `paired_at`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_used: Option<u64>,
}

impl PeerRecord {
    /// A record for a pairing completed at `now` (unix seconds) in `role`.
    pub fn paired(
        device_id: DeviceId,
        name: String,
        addr: Option<SocketAddr>,
        role: PeerRole,
        now: u64,
    ) -> Self {
        Self {
            device_id,
            name,
            last_addrs: addr.into_iter().collect(),
            paired_at: now,
            role: Some(role),
            last_used: Some(now),
        }
    }

    /// When it was last used (or paired), unix seconds.
    pub fn last_used_at(&self) -> u64 {
        self.last_used.unwrap_or(self.paired_at).max(self.paired_at)
    }

    /// Whether its pinned key may be used without a code, in `wanted` role, at `now` (unix
    /// seconds), when pairings expire `ttl` after their last use. A last use in the future
    /// (clock set back) counts as now.
    pub fn usable_as(&self, wanted: PeerRole, now: u64, ttl: Duration) -> Result<(), NotUsable> {
        match self.role {
            None => return Err(NotUsable::UnknownRole),
            Some(r) if r != wanted => {
                return Err(NotUsable::WrongRole { paired: r, wanted });
            }
            Some(_) => {}
        }
        let idle = now.saturating_sub(self.last_used_at());
        if idle > ttl.as_secs() {
            return Err(NotUsable::Expired {
                idle_days: idle / 86_400,
                ttl_days: ttl.as_secs() / 86_400,
            });
        }
        Ok(())
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct PeersFile {
    version: u32,
    peers: Vec<PeerRecord>,
}

#[derive(Debug)]
enum Backing {
    Disk { file: PathBuf, lock: PathBuf },
    Memory(Mutex<Vec<PeerRecord>>),
}

/// The set of pinned peers. Cheap to clone; clones share state. Backed by `peers.json`, which
/// is read for every query (so changes by other processes are seen at once).
#[derive(Debug, Clone)]
pub struct PeerStore {
    backing: Arc<Backing>,
}

impl PeerStore {
    /// Opens (or starts) the peers file in `config_dir`, checking that it can be read.
    pub fn open(config_dir: &Path) -> Result<Self, PeerStoreError> {
        ensure_private_dir(config_dir)?;
        let s = Self {
            backing: Arc::new(Backing::Disk {
                file: config_dir.join(PEERS_FILE),
                lock: config_dir.join(LOCK_FILE),
            }),
        };
        s.load()?;
        Ok(s)
    }

    /// A store that is never written to disk (tests, throwaway endpoints).
    pub fn in_memory() -> Self {
        Self {
            backing: Arc::new(Backing::Memory(Mutex::new(Vec::new()))),
        }
    }

    /// All paired devices, read now.
    pub fn load(&self) -> Result<Vec<PeerRecord>, PeerStoreError> {
        match &*self.backing {
            Backing::Memory(m) => Ok(m.lock().unwrap_or_else(|p| p.into_inner()).clone()),
            Backing::Disk { file, lock } => {
                let _guard = FileLock::shared(lock)?;
                read_file(file)
            }
        }
    }

    /// All paired devices; empty (nothing pinned, so nothing admitted without a code) when the
    /// file cannot be read — see [`PeerStore::load`] for the error.
    pub fn list(&self) -> Vec<PeerRecord> {
        self.load().unwrap_or_default()
    }

    /// The record for `id`, if paired.
    pub fn get(&self, id: &DeviceId) -> Option<PeerRecord> {
        self.list().into_iter().find(|p| p.device_id == *id)
    }

    /// Whether `id` is pinned (in any role, expired or not).
    pub fn contains(&self, id: &DeviceId) -> bool {
        self.get(id).is_some()
    }

    /// The record for `id` if its key may be used without a code in `role` at `now` (unix
    /// seconds) with pairings expiring `ttl` after their last use.
    pub fn usable(
        &self,
        id: &DeviceId,
        role: PeerRole,
        now: u64,
        ttl: Duration,
    ) -> Result<PeerRecord, NotUsable> {
        let rec = self
            .load()
            .map_err(|e| NotUsable::Unreadable(e.to_string()))?
            .into_iter()
            .find(|p| p.device_id == *id)
            .ok_or(NotUsable::NotPaired)?;
        rec.usable_as(role, now, ttl)?;
        Ok(rec)
    }

    /// Applies `f` to the current list under an exclusive lock and saves the result if it
    /// changed.
    fn update<R>(&self, f: impl FnOnce(&mut Vec<PeerRecord>) -> R) -> Result<R, PeerStoreError> {
        match &*self.backing {
            Backing::Memory(m) => Ok(f(&mut m.lock().unwrap_or_else(|p| p.into_inner()))),
            Backing::Disk { file, lock } => {
                let _guard = FileLock::exclusive(lock)?;
                let mut peers = read_file(file)?;
                let before = peers.clone();
                let r = f(&mut peers);
                if peers != before {
                    let bytes = serde_json::to_vec_pretty(&PeersFile { version: 1, peers })
                        .map_err(PeerStoreError::Encode)?;
                    write_private(file, &bytes)?;
                }
                Ok(r)
            }
        }
    }

    /// Inserts or replaces a peer (a new pairing decides its role) and persists the file.
    pub fn upsert(&self, record: PeerRecord) -> Result<(), PeerStoreError> {
        self.swap(record).map(drop)
    }

    /// [`PeerStore::upsert`], returning the record it replaced (read under the same lock).
    pub(crate) fn swap(&self, record: PeerRecord) -> Result<Option<PeerRecord>, PeerStoreError> {
        self.update(|peers| {
            let previous = peers
                .iter()
                .position(|p| p.device_id == record.device_id)
                .map(|i| peers.remove(i));
            peers.retain(|p| p.device_id != record.device_id);
            peers.push(record);
            previous
        })
    }

    /// Undoes an [`PeerStore::upsert`] of `written` whose pairing was not confirmed by the other
    /// side: restores `previous` (an earlier pairing of the same device), or forgets the
    /// device. A no-op when the record is no longer `written` (changed meanwhile by another
    /// process, e.g. paired again or forgotten).
    pub(crate) fn revert(
        &self,
        written: &PeerRecord,
        previous: Option<PeerRecord>,
    ) -> Result<(), PeerStoreError> {
        self.update(|peers| {
            let Some(i) = peers.iter().position(|p| p == written) else {
                return;
            };
            match previous {
                Some(prev) => peers[i] = prev,
                None => {
                    peers.remove(i);
                }
            }
        })
    }

    /// Records that `id` was reached at `addr` (no-op for unknown peers).
    pub fn note_address(&self, id: &DeviceId, addr: SocketAddr) -> Result<(), PeerStoreError> {
        self.update(|peers| {
            if let Some(p) = peers.iter_mut().find(|p| p.device_id == *id) {
                push_addr(p, addr);
            }
        })
    }

    /// Records an authenticated connection with `id` from `addr` at `now` (unix seconds): its
    /// address and last use. A no-op for a peer that is not (or no longer) in the file, so a
    /// peer forgotten meanwhile is never written back.
    pub fn note_use(
        &self,
        id: &DeviceId,
        addr: SocketAddr,
        now: u64,
    ) -> Result<(), PeerStoreError> {
        self.update(|peers| {
            if let Some(p) = peers.iter_mut().find(|p| p.device_id == *id) {
                push_addr(p, addr);
                p.last_used = Some(now.max(p.last_used.unwrap_or(0)));
            }
        })
    }

    /// Forgets a peer; returns whether it was known.
    pub fn forget(&self, id: &DeviceId) -> Result<bool, PeerStoreError> {
        self.update(|peers| {
            let before = peers.len();
            peers.retain(|p| p.device_id != *id);
            peers.len() != before
        })
    }
}

fn push_addr(p: &mut PeerRecord, addr: SocketAddr) {
    if p.last_addrs.first() == Some(&addr) {
        return;
    }
    p.last_addrs.retain(|a| *a != addr);
    p.last_addrs.insert(0, addr);
    p.last_addrs.truncate(MAX_ADDRS);
}

fn read_file(path: &Path) -> Result<Vec<PeerRecord>, PeerStoreError> {
    let read_err = |source| PeerStoreError::Read {
        path: path.to_path_buf(),
        source,
    };
    let f = match fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(read_err(source)),
    };
    let mut bytes = Vec::new();
    f.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(PeerStoreError::TooLarge {
            path: path.to_path_buf(),
        });
    }
    let f: PeersFile =
        serde_json::from_slice(&bytes).map_err(|source| PeerStoreError::Corrupt {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(f.peers)
}

/// An advisory lock on the sidecar lock file, released on drop (when the file closes).
struct FileLock(#[allow(dead_code)] fs::File);

impl FileLock {
    fn open(path: &Path) -> Result<fs::File, PeerStoreError> {
        let mut opts = fs::OpenOptions::new();
        opts.read(true).write(true).create(true).truncate(false);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        opts.open(path).map_err(|source| PeerStoreError::Lock {
            path: path.to_path_buf(),
            source,
        })
    }
    fn shared(path: &Path) -> Result<Self, PeerStoreError> {
        let f = Self::open(path)?;
        f.lock_shared().map_err(|source| PeerStoreError::Lock {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Self(f))
    }
    fn exclusive(path: &Path) -> Result<Self, PeerStoreError> {
        let f = Self::open(path)?;
        f.lock().map_err(|source| PeerStoreError::Lock {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Self(f))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: u64 = 86_400;

    fn id() -> DeviceId {
        crate::Identity::generate("x").unwrap().device_id()
    }

    #[test]
    fn persist_list_forget() {
        let dir = tempfile::tempdir().unwrap();
        let id = id();
        let s = PeerStore::open(dir.path()).unwrap();
        s.upsert(PeerRecord::paired(
            id,
            "x".into(),
            None,
            PeerRole::Receiver,
            1,
        ))
        .unwrap();
        s.note_address(&id, "127.0.0.1:9".parse().unwrap()).unwrap();
        let t = PeerStore::open(dir.path()).unwrap();
        assert_eq!(t.list().len(), 1);
        assert_eq!(
            t.get(&id).unwrap().last_addrs,
            vec!["127.0.0.1:9".parse().unwrap()]
        );
        assert!(t.forget(&id).unwrap());
        assert!(!t.forget(&id).unwrap());
        assert!(PeerStore::open(dir.path()).unwrap().list().is_empty());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            for f in [PEERS_FILE, LOCK_FILE] {
                let mode = fs::metadata(dir.path().join(f))
                    .unwrap()
                    .permissions()
                    .mode();
                assert_eq!(mode & 0o777, 0o600, "{f}");
            }
        }
    }

    #[test]
    fn a_pairing_is_usable_only_in_its_role_and_until_it_expires() {
        let ttl = Duration::from_secs(30 * DAY);
        let r = PeerRecord::paired(id(), "x".into(), None, PeerRole::Receiver, 1000 * DAY);
        assert_eq!(r.usable_as(PeerRole::Receiver, 1000 * DAY, ttl), Ok(()));
        assert_eq!(
            r.usable_as(PeerRole::Sender, 1000 * DAY, ttl),
            Err(NotUsable::WrongRole {
                paired: PeerRole::Receiver,
                wanted: PeerRole::Sender
            })
        );
        assert_eq!(r.usable_as(PeerRole::Receiver, 1030 * DAY, ttl), Ok(()));
        assert_eq!(
            r.usable_as(PeerRole::Receiver, 1031 * DAY, ttl),
            Err(NotUsable::Expired {
                idle_days: 31,
                ttl_days: 30
            })
        );
        // Used again: the lifetime counts from the last use.
        let used = PeerRecord {
            last_used: Some(1020 * DAY),
            ..r.clone()
        };
        assert_eq!(used.usable_as(PeerRole::Receiver, 1049 * DAY, ttl), Ok(()));
        // A clock set back does not expire it, nor make it usable the other way.
        assert_eq!(r.usable_as(PeerRole::Receiver, 5, ttl), Ok(()));
        assert!(r.usable_as(PeerRole::Sender, 5, ttl).is_err());
    }

    #[test]
    fn old_files_without_role_load_but_trust_no_direction() {
        let dir = tempfile::tempdir().unwrap();
        let id = id();
        let old = format!(
            r#"{{"version":1,"peers":[{{"device_id":"{id}","name":"old","last_addrs":["127.0.0.1:9"],"paired_at":1}}]}}"#
        );
        fs::write(dir.path().join(PEERS_FILE), old).unwrap();
        let s = PeerStore::open(dir.path()).unwrap();
        let rec = s.get(&id).unwrap();
        assert_eq!((rec.role, rec.last_used), (None, None));
        for role in [PeerRole::Receiver, PeerRole::Sender] {
            assert_eq!(
                s.usable(&id, role, 2, DEFAULT_PAIRING_TTL),
                Err(NotUsable::UnknownRole)
            );
        }
        assert_eq!(
            s.usable(&self::id(), PeerRole::Sender, 2, DEFAULT_PAIRING_TTL),
            Err(NotUsable::NotPaired)
        );
    }

    #[test]
    fn a_forget_by_another_store_is_seen_at_once_and_never_undone() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (id(), id());
        // Two stores on the same file: two processes.
        let running = PeerStore::open(dir.path()).unwrap();
        let other = PeerStore::open(dir.path()).unwrap();
        running
            .upsert(PeerRecord::paired(
                a,
                "a".into(),
                None,
                PeerRole::Receiver,
                10,
            ))
            .unwrap();
        running
            .upsert(PeerRecord::paired(
                b,
                "b".into(),
                None,
                PeerRole::Receiver,
                10,
            ))
            .unwrap();
        assert!(other.forget(&a).unwrap());
        // The running store sees it without reopening...
        assert!(!running.contains(&a));
        // ...and its later writes (uses of a and b) do not bring a back.
        let at: SocketAddr = "127.0.0.1:7".parse().unwrap();
        running.note_use(&a, at, 20).unwrap();
        running.note_use(&b, at, 20).unwrap();
        running.note_address(&a, at).unwrap();
        let left = PeerStore::open(dir.path()).unwrap().list();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].device_id, b);
        assert_eq!(left[0].last_used, Some(20));
        assert_eq!(left[0].last_addrs, vec![at]);
    }

    #[test]
    fn concurrent_writers_lose_no_update() {
        let dir = tempfile::tempdir().unwrap();
        let ids: Vec<DeviceId> = (0..8).map(|_| id()).collect();
        std::thread::scope(|sc| {
            for (i, id) in ids.iter().enumerate() {
                let d = dir.path();
                sc.spawn(move || {
                    // Each thread has its own store (its own lock file handle).
                    let s = PeerStore::open(d).unwrap();
                    s.upsert(PeerRecord::paired(
                        *id,
                        format!("p{i}"),
                        None,
                        PeerRole::Sender,
                        1,
                    ))
                    .unwrap();
                });
            }
        });
        assert_eq!(PeerStore::open(dir.path()).unwrap().list().len(), ids.len());
    }

    #[test]
    fn oversized_or_corrupt_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(PEERS_FILE), b"{not json").unwrap();
        assert!(matches!(
            PeerStore::open(dir.path()),
            Err(PeerStoreError::Corrupt { .. })
        ));
        let big = vec![b' '; MAX_FILE_BYTES as usize + 1];
        fs::write(dir.path().join(PEERS_FILE), big).unwrap();
        assert!(matches!(
            PeerStore::open(dir.path()),
            Err(PeerStoreError::TooLarge { .. })
        ));
    }
}
