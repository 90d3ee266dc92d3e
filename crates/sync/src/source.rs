//! The sender's side of the disk: reading chunks of the shared directory.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use crate::compress::{encode_chunk, CompressPolicy};
use crate::manifest::{ChunkHash, EntryId};
use crate::proto::{SendIo, SendIoDone};
use crate::Manifest;

const MAX_OPEN_FILES: usize = 64;

/// Opens `rel` (a manifest path) below `root` for reading without following any symlink, at the
/// leaf or in any parent directory: the scan recorded real directories and a regular file here,
/// and a symlink swapped in since (say `media` -> `/home/user`) must not lead the read outside
/// the shared directory. Each component is opened relative to its parent's descriptor with
/// `O_NOFOLLOW`, so a swap between the checks cannot redirect the walk either. A FIFO or device
/// put in place of the file is refused instead of blocking or streaming.
pub fn open_beneath(root: &Path, rel: &str) -> std::io::Result<File> {
    use rustix::fs::{openat, Mode, OFlags};
    let mut dir: std::os::fd::OwnedFd = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY)
        .open(root)?
        .into();
    let mut parts = rel.split('/').peekable();
    while let Some(part) = parts.next() {
        if part.is_empty() || part == "." || part == ".." {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("unsafe path {rel:?}"),
            ));
        }
        let last = parts.peek().is_none();
        let flags = OFlags::RDONLY
            | OFlags::NOFOLLOW
            | OFlags::CLOEXEC
            | if last {
                OFlags::NONBLOCK
            } else {
                OFlags::DIRECTORY
            };
        let fd = openat(&dir, part, flags, Mode::empty()).map_err(std::io::Error::from)?;
        if last {
            let f = File::from(fd);
            if !f.metadata()?.is_file() {
                return Err(std::io::Error::other(
                    "not a regular file any more (replaced since the scan)",
                ));
            }
            return Ok(f);
        }
        dir = fd;
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::InvalidInput,
        "empty path",
    ))
}

/// Reads chunks of the files a manifest describes, below `root` only.
#[derive(Debug)]
pub struct Source {
    root: PathBuf,
    manifest: Arc<Manifest>,
    policy: CompressPolicy,
    /// Entries read from another file than `root/path` (database snapshots).
    redirects: HashMap<String, PathBuf>,
    open: Mutex<HashMap<EntryId, Arc<File>>>,
}

impl Source {
    pub fn new(root: &Path, manifest: Arc<Manifest>, policy: CompressPolicy) -> Self {
        Source {
            root: root.to_path_buf(),
            manifest,
            policy,
            redirects: HashMap::new(),
            open: Mutex::new(HashMap::new()),
        }
    }

    /// Reads the entries named in `redirects` from the given files instead (the scan's
    /// [`crate::scan::ScanOutput::sources`]: snapshots of live databases).
    /// The entries read from other files (the database snapshots), by manifest path.
    pub fn redirects(&self) -> &HashMap<String, PathBuf> {
        &self.redirects
    }

    pub fn with_redirects(mut self, redirects: HashMap<String, PathBuf>) -> Self {
        self.redirects = redirects;
        self
    }

    pub fn manifest(&self) -> &Arc<Manifest> {
        &self.manifest
    }

    /// Entry `entry` of the session's manifest, at manifest path `path` (the read names both:
    /// a streaming sender's manifest is still growing, so the path comes with the read).
    fn file(&self, entry: EntryId, path: &str) -> std::io::Result<Arc<File>> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = open.get(&entry) {
            return Ok(Arc::clone(f));
        }
        // The sender's own database snapshot (outside the shared folder, in ferry's state dir)
        // opens directly, without following a symlink at the leaf; every shared file opens
        // component by component beneath the root, never through a symlink.
        let f = Arc::new(match self.redirects.get(path) {
            Some(snap) => OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(snap)?,
            None => open_beneath(&self.root, path)?,
        });
        if open.len() >= MAX_OPEN_FILES {
            open.clear();
        }
        open.insert(entry, Arc::clone(&f));
        Ok(f)
    }

    /// Performs one read of the sender machine.
    pub fn execute(&self, io: SendIo) -> SendIoDone {
        let SendIo::Read {
            chunk,
            entry,
            offset,
            len,
            hash,
            verify,
            path,
        } = io;
        let read = || -> std::io::Result<Vec<u8>> {
            let f = self.file(entry, &path)?;
            read_exact_at(&f, len as usize, offset)
        };
        match read() {
            Ok(buf) => {
                if verify && ChunkHash::of(&buf) != hash {
                    return SendIoDone::Changed { chunk };
                }
                let (encoding, payload) = encode_chunk(Bytes::from(buf), &self.policy);
                SendIoDone::Read {
                    chunk,
                    encoding,
                    payload,
                }
            }
            // Shrunk or gone since the scan: the file changed.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::NotFound
                ) =>
            {
                SendIoDone::Changed { chunk }
            }
            Err(e) => SendIoDone::Failed {
                chunk,
                error: e.to_string(),
            },
        }
    }
}

/// Reads exactly `len` bytes at `offset` into a new buffer, without zeroing it first (the
/// kernel fills the spare capacity; only what it filled becomes part of the buffer). A file
/// shorter than that is `UnexpectedEof`.
pub(crate) fn read_exact_at(f: &File, len: usize, offset: u64) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(len);
    while buf.len() < len {
        let at = offset + buf.len() as u64;
        match rustix::io::pread(f, rustix::buffer::spare_capacity(&mut buf), at) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    buf.truncate(len);
    Ok(buf)
}
