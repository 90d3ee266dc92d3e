//! Paired devices, remembered in `peers.json` in the config directory (owner-only).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::identity::{ensure_private_dir, write_private, DeviceId, IdentityError};

const PEERS_FILE: &str = "peers.json";
/// At most this many last-known addresses are kept per peer.
const MAX_ADDRS: usize = 16;

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
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct PeersFile {
    version: u32,
    peers: Vec<PeerRecord>,
}

#[derive(Debug)]
struct Inner {
    path: Option<PathBuf>,
    peers: Vec<PeerRecord>,
}

/// The set of pinned peers. Cheap to clone; clones share state.
#[derive(Debug, Clone)]
pub struct PeerStore {
    inner: Arc<Mutex<Inner>>,
}

impl PeerStore {
    /// Opens (or starts) the peers file in `config_dir`.
    pub fn open(config_dir: &Path) -> Result<Self, PeerStoreError> {
        ensure_private_dir(config_dir)?;
        let path = config_dir.join(PEERS_FILE);
        let peers = match std::fs::read(&path) {
            Ok(bytes) => {
                let f: PeersFile =
                    serde_json::from_slice(&bytes).map_err(|source| PeerStoreError::Corrupt {
                        path: path.clone(),
                        source,
                    })?;
                f.peers
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(source) => return Err(PeerStoreError::Read { path, source }),
        };
        Ok(Self {
            inner: Arc::new(Mutex::new(Inner {
                path: Some(path),
                peers,
            })),
        })
    }

    /// A store that is never written to disk (tests, throwaway endpoints).
    pub fn in_memory() -> Self {
        Self {
            inner: Arc::new(Mutex::new(Inner {
                path: None,
                peers: Vec::new(),
            })),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A poisoned lock only means another thread panicked mid-update of a Vec; the data is
        // still a valid Vec, so keep going.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// All paired devices.
    pub fn list(&self) -> Vec<PeerRecord> {
        self.lock().peers.clone()
    }

    /// The record for `id`, if paired.
    pub fn get(&self, id: &DeviceId) -> Option<PeerRecord> {
        self.lock()
            .peers
            .iter()
            .find(|p| p.device_id == *id)
            .cloned()
    }

    /// Whether `id` is pinned.
    pub fn contains(&self, id: &DeviceId) -> bool {
        self.get(id).is_some()
    }

    /// Inserts or replaces a peer and persists the file.
    pub fn upsert(&self, record: PeerRecord) -> Result<(), PeerStoreError> {
        let mut g = self.lock();
        g.peers.retain(|p| p.device_id != record.device_id);
        g.peers.push(record);
        save(&g)
    }

    /// Records that `id` was reached at `addr` (no-op for unknown peers).
    pub fn note_address(&self, id: &DeviceId, addr: SocketAddr) -> Result<(), PeerStoreError> {
        let mut g = self.lock();
        let Some(p) = g.peers.iter_mut().find(|p| p.device_id == *id) else {
            return Ok(());
        };
        if p.last_addrs.first() == Some(&addr) {
            return Ok(());
        }
        p.last_addrs.retain(|a| *a != addr);
        p.last_addrs.insert(0, addr);
        p.last_addrs.truncate(MAX_ADDRS);
        save(&g)
    }

    /// Forgets a peer; returns whether it was known.
    pub fn forget(&self, id: &DeviceId) -> Result<bool, PeerStoreError> {
        let mut g = self.lock();
        let before = g.peers.len();
        g.peers.retain(|p| p.device_id != *id);
        let removed = g.peers.len() != before;
        if removed {
            save(&g)?;
        }
        Ok(removed)
    }
}

fn save(inner: &Inner) -> Result<(), PeerStoreError> {
    let Some(path) = &inner.path else {
        return Ok(());
    };
    let file = PeersFile {
        version: 1,
        peers: inner.peers.clone(),
    };
    let bytes = serde_json::to_vec_pretty(&file).map_err(PeerStoreError::Encode)?;
    write_private(path, &bytes)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn persist_list_forget() {
        let dir = tempfile::tempdir().unwrap();
        let id = crate::Identity::generate("x").unwrap().device_id();
        let s = PeerStore::open(dir.path()).unwrap();
        s.upsert(PeerRecord {
            device_id: id,
            name: "x".into(),
            last_addrs: vec![],
            paired_at: 1,
        })
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
    }
}
