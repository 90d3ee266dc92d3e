//! The sender's view of its folder: scans with a hash cache kept across rescans, and what a
//! scan tells the caller.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_sync::compress::CompressPolicy;
use ferry_sync::scan::{scan, Capture, HashCache, ScanConfig, ScanError, ScanOutput, ScanProgress};
use ferry_sync::snapshot::SnapshotStore;
use ferry_sync::source::Source;
use ferry_sync::Manifest;

use crate::error::{Cause, Error, ErrorKind};
use crate::event::Event;
use crate::handle::Emitter;

/// Scans the folder with a hash cache kept across rescans.
pub(crate) struct Scanner {
    dir: PathBuf,
    cache_path: PathBuf,
    pub(crate) snapshot_dir: PathBuf,
    cache: Arc<Mutex<HashCache>>,
}

impl Scanner {
    pub(crate) fn new(dir: &Path, state: &Path) -> Self {
        let cache_path = HashCache::path_for(state, dir);
        let cache = HashCache::load(&cache_path);
        Scanner {
            dir: dir.to_path_buf(),
            cache_path,
            snapshot_dir: SnapshotStore::dir_for(state, dir),
            cache: Arc::new(Mutex::new(cache)),
        }
    }

    /// Rescans a folder that is changing: a file that vanished between listing and reading
    /// fails one scan, not the migration (bounded retries).
    pub(crate) async fn rescan(&self) -> Result<ScanOutput, Error> {
        let mut tries = 0;
        loop {
            match self.scan().await {
                Ok(out) => return Ok(out),
                Err(f) if tries < 3 && f.kind() == ErrorKind::Source => {
                    tries += 1;
                    tracing::info!("rescan failed ({f}); retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(f) => return Err(f),
            }
        }
    }

    /// The first scan: `progress` events (phase `scanning`) while it runs, a few a second,
    /// and one at its end.
    pub(crate) async fn scan_reporting(&self, em: &Emitter) -> Result<ScanOutput, Error> {
        let progress = Arc::new(ScanProgress::default());
        let scan = self.scan_with(Some(Arc::clone(&progress)));
        tokio::pin!(scan);
        let mut rate = crate::progress::Rate::default();
        let mut tick = tokio::time::interval(crate::progress::SENDER_EVERY);
        loop {
            tokio::select! {
                r = &mut scan => {
                    if r.is_ok() {
                        em.emit(crate::progress::scanning(&progress, &mut rate, true)).await;
                    }
                    return r;
                }
                _ = tick.tick() => em.emit_now(crate::progress::scanning(&progress, &mut rate, false)),
            }
        }
    }

    pub(crate) async fn scan(&self) -> Result<ScanOutput, Error> {
        self.scan_with(None).await
    }

    async fn scan_with(&self, progress: Option<Arc<ScanProgress>>) -> Result<ScanOutput, Error> {
        let (dir, path, cache) = (
            self.dir.clone(),
            self.cache_path.clone(),
            Arc::clone(&self.cache),
        );
        // Databases are captured as consistent snapshots (kept between rescans: an unchanged
        // database is not copied again).
        let cfg = ScanConfig {
            snapshot_dir: Some(self.snapshot_dir.clone()),
            progress,
            ..ScanConfig::default()
        };
        tokio::task::spawn_blocking(move || {
            let mut cache = cache.lock().unwrap_or_else(|p| p.into_inner());
            let before = cache.len();
            let out = scan(&dir, Some(&mut cache), &cfg)?;
            // Rescans of an unchanged folder (every poll with `follow`) leave the file alone.
            if before == 0 || out.hashed_bytes > 0 || cache.len() != before {
                if let Err(e) = cache.save(&path) {
                    tracing::warn!("cannot save the hash cache {}: {e}", path.display());
                }
            }
            Ok::<_, ScanError>(out)
        })
        .await
        .map_err(|e| Error::new(ErrorKind::Internal, e.to_string()))?
        .map_err(scan_failure)
    }
}

fn scan_failure(e: ScanError) -> Error {
    let message = match &e {
        ScanError::Manifest(m) => format!("cannot describe the folder: {m}"),
        other => format!("{other}; check the folder and its permissions"),
    };
    Error::with_cause(ErrorKind::Source, message, Some(Cause::Scan(e)))
}

/// Reports what a first scan found: skipped paths (the first 20), how the databases were
/// captured.
pub(crate) async fn report_scan(out: &ScanOutput, em: &Emitter) {
    for sk in out.skipped.iter().take(20) {
        em.emit(Event::Skipped {
            path: sk.path.clone(),
            reason: sk.reason.clone(),
        })
        .await;
    }
    let (mut snapshots, mut reused) = (0u64, 0u64);
    for db in &out.databases {
        match &db.capture {
            Capture::Snapshot { reused: r } => {
                snapshots += 1;
                reused += u64::from(*r);
            }
            Capture::Raw { reason } => {
                em.emit(Event::Database {
                    path: db.path.clone(),
                    capture: "raw",
                    reason: reason.clone(),
                })
                .await;
            }
        }
    }
    em.emit(Event::Databases {
        snapshots,
        reused,
        raw: out.databases.len() as u64 - snapshots,
    })
    .await;
}

/// The manifest, source and unstable files of a scan, for the next round.
pub(crate) async fn adopt(
    dir: &Path,
    out: ScanOutput,
    policy: &CompressPolicy,
    em: &Emitter,
) -> (Arc<Manifest>, Arc<Source>, Vec<String>) {
    for u in &out.unstable {
        em.emit(Event::Unstable {
            path: u.path.clone(),
            reason: u.reason.clone(),
        })
        .await;
    }
    let unstable = out.unstable.iter().map(|u| u.path.clone()).collect();
    let manifest = Arc::new(out.manifest);
    let source = Arc::new(
        Source::new(dir, Arc::clone(&manifest), policy.clone()).with_redirects(out.sources),
    );
    (manifest, source, unstable)
}

/// Rows in the databases' snapshots, summed (None without databases): compared between the
/// first and the last round, how many messages and other records arrived during the migration.
pub(crate) async fn database_rows(source: &Arc<Source>) -> Option<u64> {
    if source.redirects().is_empty() {
        return None;
    }
    let source = Arc::clone(source);
    tokio::task::spawn_blocking(move || {
        source
            .redirects()
            .values()
            .filter_map(|p| ferry_sync::snapshot::count_rows(p).ok())
            .sum()
    })
    .await
    .ok()
}
