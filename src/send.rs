//! `ferry send`: scan, listen, pair, serve sessions until the receiver confirms completion.
//!
//! After the receiver verified a round the sender rescans (the hash cache makes unchanged files
//! free); while the folder changed, it serves catch-up rounds that send only what changed, up to
//! `--max-rounds`, or forever with `--follow`. A file that changes under a read cuts the round
//! short (the receiver keeps what it verified) and is rescanned; one that does so
//! [`MAX_RESTARTS_PER_FILE`] times in a row is reported by name (exit 8).

use std::collections::HashMap;
use std::fs;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_sync::compress::{CompressGate, CompressPolicy};
use ferry_sync::driver::{SendEnd, Verdict};
use ferry_sync::manifest::ManifestDiff;
use ferry_sync::proto::{CloseCode, SendEvent};
use ferry_sync::scan::{scan, Capture, HashCache, ScanConfig, ScanError, ScanOutput};
use ferry_sync::snapshot::SnapshotStore;
use ferry_sync::source::Source;
use ferry_sync::Manifest;
use ferry_transport::{
    AcceptError, Advertisement, Congestion, Discovery, Endpoint, FerryDirs, MdnsConfig,
    MdnsDiscovery, PairingCode, PairingError, PeerConnection, PeerStore, Ticket,
};
use serde_json::json;
use tokio::sync::{oneshot, watch};

use crate::common;
use crate::exit::{self, Exit, Failure};
use crate::output::{self, escape, human_bytes, Reporter};
use ferry::session;

/// Said when Ctrl-C stops this side.
const STOPPED: &str = "stopped; run the same command to continue where it left off";

pub struct SendSettings {
    pub dir: PathBuf,
    pub code: Option<PairingCode>,
    pub listen: Option<SocketAddr>,
    pub mdns: bool,
    pub name: Option<String>,
    pub dirs: FerryDirs,
    pub congestion: Congestion,
    /// Cap on the chunk data rate (`--limit-rate`).
    pub limit_rate: Option<session::RateLimit>,
    /// When chunks are compressed (`--compress`).
    pub compress: Compress,
    pub rounds: RoundSettings,
    /// `--to`: serve only this paired device (name or id).
    pub to: Option<String>,
    /// `--pairing-ttl`: pairings unused this long need a code again.
    pub pairing_ttl: Duration,
}

/// When the sender compresses compressible chunks (`--compress`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Compress {
    /// Over a network; not when the receiver runs on this machine.
    #[default]
    Auto,
    Always,
    Never,
}

impl Compress {
    /// The policy for this mode; with `Auto` its gate is set for each connection.
    fn policy(self) -> CompressPolicy {
        match self {
            Compress::Always => CompressPolicy::default(),
            Compress::Never => CompressPolicy {
                enabled: false,
                ..CompressPolicy::default()
            },
            Compress::Auto => CompressPolicy {
                gate: Some(CompressGate::default()),
                ..CompressPolicy::default()
            },
        }
    }
}

/// Files up to this size count as essentials for `--essentials-first` (with the databases):
/// thumbnails, voice notes, stickers — what makes a chat list usable.
const ESSENTIAL_MAX_SIZE: u64 = 1 << 20;

/// How catch-up rounds run.
#[derive(Clone, Debug)]
pub struct RoundSettings {
    /// Most rounds the receiver verifies (the first included) while the folder keeps changing.
    pub max_rounds: u32,
    /// Keep serving changes until stopped.
    pub follow: bool,
    /// With `follow`: time between rescans of an unchanged folder.
    pub poll_interval: Duration,
    /// Send the databases and small files as a first round of their own.
    pub essentials_first: bool,
}

impl Default for RoundSettings {
    fn default() -> Self {
        RoundSettings {
            max_rounds: 5,
            follow: false,
            poll_interval: Duration::from_secs(2),
            essentials_first: false,
        }
    }
}

/// A file that cuts this many rounds short in a row (changing under the read, with no round
/// verified in between) is reported by name.
pub const MAX_RESTARTS_PER_FILE: u32 = 4;
/// Most rounds cut short in a row, whatever the files.
pub const MAX_RESTARTS: u32 = 20;

pub struct SendSummary {
    pub wire_bytes: u64,
    pub sessions: u32,
    pub scan_secs: f64,
    /// Files left out because they kept changing while read: the migration is incomplete.
    pub unstable: Vec<String>,
}

impl SendSummary {
    /// `Err` (exit code 10, incomplete) when files were left out; see the README.
    pub fn completeness(&self) -> Result<(), Failure> {
        if self.unstable.is_empty() {
            return Ok(());
        }
        let shown: Vec<_> = self.unstable.iter().take(10).map(|p| escape(p)).collect();
        let more = match self.unstable.len() {
            n if n > 10 => format!(" and {} more", n - 10),
            _ => String::new(),
        };
        Err(Failure::new(
            Exit::Incomplete,
            format!(
                "the migration finished, but {} file(s) kept changing and could not be captured consistently, so they were not sent: {}{more}; run ferry send again when the app is idle to send them",
                self.unstable.len(),
                shown.join(", ")
            ),
        ))
    }
}

/// Scans the folder with a hash cache kept across rescans.
struct Scanner {
    dir: PathBuf,
    cache_path: PathBuf,
    snapshot_dir: PathBuf,
    cache: Arc<Mutex<HashCache>>,
}

impl Scanner {
    fn new(dir: &Path, state: &Path) -> Self {
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
    async fn rescan(&self) -> Result<ScanOutput, Failure> {
        let mut tries = 0;
        loop {
            match self.scan().await {
                Ok(out) => return Ok(out),
                Err(f) if tries < 3 && f.exit == Exit::Source => {
                    tries += 1;
                    tracing::info!("rescan failed ({}); retrying", f.message);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(f) => return Err(f),
            }
        }
    }

    async fn scan(&self) -> Result<ScanOutput, Failure> {
        let (dir, path, cache) = (
            self.dir.clone(),
            self.cache_path.clone(),
            Arc::clone(&self.cache),
        );
        // Databases are captured as consistent snapshots (kept between rescans: an unchanged
        // database is not copied again).
        let cfg = ScanConfig {
            snapshot_dir: Some(self.snapshot_dir.clone()),
            ..ScanConfig::default()
        };
        tokio::task::spawn_blocking(move || {
            let mut cache = cache.lock().unwrap_or_else(|p| p.into_inner());
            let before = cache.len();
            let out = scan(&dir, Some(&mut cache), &cfg)?;
            // Rescans of an unchanged folder (every poll with --follow) leave the file alone.
            if before == 0 || out.hashed_bytes > 0 || cache.len() != before {
                if let Err(e) = cache.save(&path) {
                    tracing::warn!("cannot save the hash cache {}: {e}", path.display());
                }
            }
            Ok::<_, ScanError>(out)
        })
        .await
        .map_err(|e| Failure::new(Exit::Internal, e.to_string()))?
        .map_err(scan_failure)
    }
}

/// The manifest, source and unstable files of a rescan, for the next round.
fn adopt(
    dir: &Path,
    out: ScanOutput,
    policy: &CompressPolicy,
    rep: &Reporter,
) -> (Arc<Manifest>, Arc<Source>, Vec<String>) {
    for u in &out.unstable {
        rep.say(&format!(
            "could not be captured consistently, not sent: {} ({})",
            escape(&u.path),
            escape(&u.reason)
        ));
        rep.event("unstable", json!({"path": u.path, "reason": u.reason}));
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
fn database_rows(source: &Source) -> Option<u64> {
    let snaps = source.redirects();
    if snaps.is_empty() {
        return None;
    }
    let count = || {
        snaps
            .values()
            .filter_map(|p| ferry_sync::snapshot::count_rows(p).ok())
            .sum()
    };
    Some(tokio::task::block_in_place(count))
}

/// Resolves once `stop` says so (Ctrl-C); never if its sender is gone.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    loop {
        if *stop.borrow_and_update() {
            return;
        }
        if stop.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// The end of a round the receiver verified: rescan; with `follow`, wait for a change.
/// `Next` when the folder changed and another round may run; otherwise `Final` (and `limited`
/// says what still changed when the round limit stopped the migration).
#[allow(clippy::too_many_arguments)]
async fn decide(
    scanner: &Scanner,
    current: Arc<Manifest>,
    rounds_done: u32,
    s: &RoundSettings,
    mut stop: watch::Receiver<bool>,
    awaiting: &AtomicBool,
    limited: &Mutex<Option<ManifestDiff>>,
    rep: &Reporter,
) -> Verdict<ScanOutput> {
    awaiting.store(true, Ordering::SeqCst);
    let v = loop {
        if *stop.borrow_and_update() {
            break Verdict::Final;
        }
        let scan_started = Instant::now();
        let scanned = scanner.rescan().await;
        // A huge folder is not rescanned back to back: at most a fifth of the time.
        let pause = s.poll_interval.max(scan_started.elapsed() * 4);
        match scanned {
            Ok(out) if out.manifest.root() != current.root() => {
                if !s.follow && rounds_done >= s.max_rounds {
                    let diff = current.diff(&out.manifest, 20);
                    *limited.lock().unwrap_or_else(|p| p.into_inner()) = Some(diff);
                    break Verdict::Final;
                }
                break Verdict::Next(out);
            }
            Ok(_) => {}
            Err(f) => {
                rep.say(&format!("rescan failed: {}", f.message));
                if !s.follow {
                    break Verdict::Final;
                }
            }
        }
        if !s.follow {
            break Verdict::Final;
        }
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stopped(&mut stop) => break Verdict::Final,
        }
    };
    // A final verdict leaves `awaiting` set: the round ends cleanly, and Ctrl-C meanwhile must
    // not turn that into an interruption. Another round is work in flight again.
    if matches!(v, Verdict::Next(_)) {
        awaiting.store(false, Ordering::SeqCst);
    }
    v
}

/// How long a sender that cannot read its folder waits for the receiver to take the news.
const SOURCE_ERROR_LINGER: Duration = Duration::from_secs(3);

fn scan_failure(e: ScanError) -> Failure {
    match e {
        ScanError::Manifest(m) => {
            Failure::new(Exit::Source, format!("cannot describe the folder: {m}"))
        }
        other => Failure::new(
            Exit::Source,
            format!("{other}; check the folder and its permissions"),
        ),
    }
}

/// Where a sender notes the port it listened on (in the state folder).
fn last_port_file(dirs: &FerryDirs) -> PathBuf {
    dirs.state.join("send-port")
}

/// The sender's endpoint. Without `--listen` it listens on every address, on the port it used
/// last time when that is free: a sender restarted after a crash or a reboot is then found at
/// the address the receiver (and its ticket) already know, and the receiver resumes on its
/// own. Otherwise on any free port.
/// The pinning rules of this sender: `--pairing-ttl`, and `--to` resolved to a paired device.
fn sender_pinning(s: &SendSettings, rep: &Reporter) -> Result<common::Pinning, Failure> {
    let serve_only = match &s.to {
        None => None,
        Some(which) => {
            let store = PeerStore::open(&s.dirs.config).map_err(|e| {
                Failure::new(
                    Exit::Internal,
                    format!("cannot open the paired-devices list: {e}"),
                )
            })?;
            let p = common::find_peer(&store, which).map_err(|f| {
                Failure::new(
                    f.exit,
                    format!(
                        "--to: {f}; pair first by running `ferry send` without --to, or use `ferry pair`"
                    ),
                )
            })?;
            rep.say(&format!(
                "serving only {} ({}); any other device is refused",
                p.name, p.device_id
            ));
            Some(p.device_id)
        }
    };
    Ok(common::Pinning {
        ttl: s.pairing_ttl,
        serve_only,
    })
}

fn sender_endpoint(s: &SendSettings, pinning: &common::Pinning) -> Result<Endpoint, Failure> {
    let name = s.name.as_deref();
    if s.listen.is_some() {
        return common::endpoint_with(&s.dirs, name, s.listen, s.congestion, pinning);
    }
    let last = fs::read_to_string(last_port_file(&s.dirs))
        .ok()
        .and_then(|p| p.trim().parse::<u16>().ok())
        .filter(|p| *p != 0);
    let ep = match last {
        Some(port) => {
            let at = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
            match common::endpoint_with(&s.dirs, name, Some(at), s.congestion, pinning) {
                Ok(ep) => ep,
                Err(f) => {
                    tracing::info!("port {port} of the last run is taken ({f}); using another");
                    common::endpoint_with(&s.dirs, name, None, s.congestion, pinning)?
                }
            }
        }
        None => common::endpoint_with(&s.dirs, name, None, s.congestion, pinning)?,
    };
    if let Ok(a) = ep.local_addr() {
        let file = last_port_file(&s.dirs);
        let saved = ferry_sync::private::create_dir_all(&s.dirs.state)
            .and_then(|()| ferry_sync::private::write(&file, format!("{}\n", a.port()).as_bytes()));
        if let Err(e) = saved {
            tracing::info!("cannot note the port in {}: {e}", file.display());
        }
    }
    Ok(ep)
}

/// Runs the sender until the migration is complete (or Ctrl-C).
pub async fn run(
    s: SendSettings,
    rep: &Reporter,
    listening: Option<oneshot::Sender<Ticket>>,
) -> Result<SendSummary, Failure> {
    let started = Instant::now();
    // ferry's state (snapshots of the chat databases, the hash cache naming every file) is
    // owner-only; a state folder left wider by an older version is narrowed.
    if let Err(e) = ferry_sync::private::create_dir_all(&s.dirs.state) {
        tracing::warn!("cannot make {} private: {e}", s.dirs.state.display());
    }
    // Before the scan: a wrong --to is a usage error at once.
    let pinning = sender_pinning(&s, rep)?;
    let scanner = Scanner::new(&s.dir, &s.dirs.state);
    // Snapshots a crashed sender left for other folders are copies of chat databases that no
    // migration needs any more; this folder's are kept for a restarted migration to reuse, and
    // removed when this one ends.
    match SnapshotStore::remove_others(&s.dirs.state, &scanner.snapshot_dir) {
        Ok(0) => {}
        Ok(n) => tracing::info!("removed {n} snapshot folder(s) left by an earlier run"),
        Err(e) => tracing::warn!("cannot remove old snapshots: {e}"),
    }
    let _snapshots = SnapshotStore::claim(&scanner.snapshot_dir).map_err(|e| {
        Failure::new(
            Exit::Source,
            format!(
                "cannot create the snapshot folder {}: {e}; check that ferry's state folder is writable (or set FERRY_HOME)",
                scanner.snapshot_dir.display()
            ),
        )
    })?;
    let scanned = scanner.scan().await?;
    let scan_secs = started.elapsed().as_secs_f64();
    for sk in scanned.skipped.iter().take(20) {
        rep.say(&format!(
            "skipped {}: {}",
            escape(&sk.path),
            escape(&sk.reason)
        ));
        rep.event("skipped", json!({"path": sk.path, "reason": sk.reason}));
    }
    if scanned.skipped.len() > 20 {
        rep.say(&format!(
            "… and {} more skipped",
            scanned.skipped.len() - 20
        ));
    }
    let (mut snapshots, mut reused) = (0u64, 0u64);
    for db in &scanned.databases {
        match &db.capture {
            Capture::Snapshot { reused: r } => {
                snapshots += 1;
                reused += u64::from(*r);
            }
            Capture::Raw { reason } => {
                rep.say(&format!(
                    "database {} cannot be read through SQLite ({reason}); sending it as a plain file, checked for changes while read",
                    escape(&db.path)
                ));
                rep.event(
                    "database",
                    json!({"path": db.path, "capture": "raw", "reason": reason}),
                );
            }
        }
    }
    if snapshots > 0 {
        rep.say(&format!(
            "{snapshots} database(s) captured as consistent snapshots ({reused} unchanged since the last scan)"
        ));
    }
    rep.event(
        "databases",
        json!({"snapshots": snapshots, "reused": reused, "raw": scanned.databases.len() as u64 - snapshots}),
    );
    for u in &scanned.unstable {
        rep.say(&format!(
            "could not be captured consistently, not sent: {} ({})",
            escape(&u.path),
            escape(&u.reason)
        ));
        rep.event("unstable", json!({"path": u.path, "reason": u.reason}));
    }
    let mut unstable: Vec<String> = scanned.unstable.iter().map(|u| u.path.clone()).collect();
    let mut manifest = Arc::new(scanned.manifest);
    let first = Arc::clone(&manifest);
    let sum = *manifest.summary();
    rep.say(&format!(
        "{}: {} files, {} ({} to send after dedup), scanned in {:.1} s ({} hashed, {} files from cache)",
        s.dir.display(),
        sum.files,
        human_bytes(sum.bytes),
        human_bytes(sum.unique_bytes),
        scan_secs,
        human_bytes(scanned.hashed_bytes),
        scanned.cached_files
    ));
    rep.event(
        "manifest",
        json!({"files": sum.files, "bytes": sum.bytes, "unique_bytes": sum.unique_bytes, "chunks": sum.unique_chunks, "root": sum.root.to_hex(),
            "hashed_bytes": scanned.hashed_bytes, "cached_files": scanned.cached_files, "scan_s": scan_secs}),
    );
    // --essentials-first: the databases and small files go as a round of their own, committed
    // (usable) on the new device before the large media; the rescan after it differs from
    // that round's manifest, so the rest follows as the next round.
    let early = if s.rounds.essentials_first {
        manifest.early_subset(ESSENTIAL_MAX_SIZE).map(Arc::new)
    } else {
        None
    };
    if let Some(sub) = &early {
        let e = sub.summary();
        rep.say(&format!(
            "essentials first: databases and small files ({} files, {}) as round 1, then the rest",
            e.files,
            human_bytes(e.bytes)
        ));
        rep.event(
            "essentials",
            json!({"files": e.files, "bytes": e.bytes, "root": e.root.to_hex()}),
        );
        manifest = Arc::clone(sub);
    }
    let policy = s.compress.policy();
    let mut source = Arc::new(
        Source::new(&s.dir, Arc::clone(&manifest), policy.clone()).with_redirects(scanned.sources),
    );
    let first_rows = database_rows(&source);
    // Rounds that carry the migration itself rather than changes made during it.
    let base_rounds = if early.is_some() { 2 } else { 1 };
    // The essentials round does not count against --max-rounds.
    let mut round_cfg = s.rounds.clone();
    round_cfg.max_rounds = round_cfg.max_rounds.saturating_add(base_rounds - 1);

    let ep = sender_endpoint(&s, &pinning)?;
    let code = match s.code {
        Some(c) => {
            rep.say(
                "warning: a chosen pairing code is weaker than a random one; prefer the default",
            );
            ep.set_pairing_code(c)
                .map_err(|e| Failure::new(Exit::Internal, e.to_string()))?;
            c
        }
        None => ep
            .issue_pairing_code()
            .map_err(|e| Failure::new(Exit::Internal, e.to_string()))?,
    };
    let announce = |code: PairingCode| -> Result<Ticket, Failure> {
        let ticket = ep.ticket(code).map_err(|e| {
            Failure::new(
                Exit::Unreachable,
                format!("cannot list this device's addresses: {e}"),
            )
        })?;
        let addrs: Vec<String> = ticket.addrs.iter().map(|a| a.to_string()).collect();
        rep.event("listening", json!({"addrs": addrs, "code": code.to_string(), "ticket": ticket.to_string(), "device_id": ep.identity().device_id().to_string()}));
        rep.say(&format!("pairing code: {code}"));
        rep.say(&format!("listening on {}", addrs.join(", ")));
        rep.say(&format!("ticket: {ticket}"));
        if let Ok(qr) = ticket.to_qr_unicode() {
            rep.say(&format!("\n{qr}"));
        }
        rep.say("the ticket and the QR code carry the pairing code: like the code, show them only to the new device until it has paired");
        rep.say("on the new device run: ferry receive <FOLDER> (and type the code), or ferry receive <FOLDER> --ticket - (and paste the ticket)");
        Ok(ticket)
    };
    let ticket = announce(code)?;
    if let Some(tx) = listening {
        let _ = tx.send(ticket.clone());
    }
    let _mdns = if s.mdns {
        match MdnsDiscovery::new(&MdnsConfig::default()) {
            Ok(d) => {
                let port = ticket.addrs.first().map_or(0, |a| a.port());
                let ad = Advertisement {
                    name: ep.identity().name().to_string(),
                    port,
                    addrs: vec![],
                };
                if let Err(e) = d.advertise(&ad) {
                    rep.say(&format!(
                        "cannot announce on the local network ({e}); use the ticket"
                    ));
                }
                Some(d)
            }
            Err(e) => {
                rep.say(&format!(
                    "local-network discovery unavailable ({e}); use the ticket or address"
                ));
                None
            }
        }
    } else {
        None
    };

    // Ctrl-C, seen by every wait below. While a finished round awaits its verdict it ends the
    // migration cleanly (the receiver holds a verified round); otherwise it interrupts.
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            let _ = stop_tx.send(true);
        }
    });
    let awaiting = AtomicBool::new(false);
    let limited: Mutex<Option<ManifestDiff>> = Mutex::new(None);

    let mut wire_bytes = 0u64;
    let mut catchup_wire_bytes = 0u64;
    let mut sessions = 0u32;
    let mut rounds_done = 0u32;
    let mut restarts: HashMap<String, u32> = HashMap::new();
    let mut restarts_total = 0u32;
    // A connection that arrived while a session was running and replaces it.
    let mut next: Option<PeerConnection> = None;
    let mut stop = stop_rx.clone();
    let mut codes = CodeKeeper::new();
    loop {
        let accepted = match next.take() {
            Some(c) => Ok(c),
            None => tokio::select! {
                a = ep.accept() => a,
                () = sleep_until_some(codes.reissue) => {
                    codes.reissue(&ep, rep, &announce)?;
                    continue;
                }
                () = codes.enter_pressed() => {
                    ep.resume_pairing();
                    codes.reissue(&ep, rep, &announce)?;
                    continue;
                }
                _ = stopped(&mut stop) => {
                    return Err(Failure::new(Exit::Interrupted, STOPPED));
                }
            },
        };
        let conn = match accepted {
            Ok(conn) => conn,
            Err(AcceptError::EndpointClosed) => {
                return Err(Failure::new(Exit::Internal, "the network endpoint closed"));
            }
            Err(AcceptError::Pairing {
                addr,
                source: PairingError::WrongCode,
            }) => {
                rep.say(&format!(
                    "a device at {addr} tried a wrong pairing code; that code is now void"
                ));
                rep.event(
                    "error",
                    json!({"kind": "pairing", "message": format!("wrong code from {addr}")}),
                );
                if sessions == 0 {
                    codes.after_failure(&ep, rep, &announce)?;
                }
                continue;
            }
            Err(AcceptError::NotServed { device, addr }) => {
                // Refused before pairing: the code is still valid for the --to device.
                rep.say(&format!(
                    "refused device {device} at {addr}: this sender serves only the device given with --to"
                ));
                continue;
            }
            Err(e) => {
                tracing::info!("refused a connection: {e}");
                if sessions == 0 {
                    // The code may have been used by a failed attempt, or expired: issue a
                    // fresh one (when the back-off allows) so pairing can be retried.
                    codes.after_failure(&ep, rep, &announce)?;
                }
                continue;
            }
        };
        let peer = conn.peer().clone();
        // Who is served, before any data flows: a device admitted by its pinned key says when
        // it was paired, so an unexpected one stands out.
        rep.event("paired", json!({"peer": peer.name, "device_id": peer.device_id.to_string(), "addr": peer.addr.to_string(), "newly_paired": conn.newly_paired(),
            "paired_at": peer.paired_at, "role": peer.role.as_str()}));
        if conn.newly_paired() {
            rep.say(&format!(
                "paired with {} ({}) at {}; serving it",
                escape(&peer.name),
                peer.device_id,
                peer.addr
            ));
        } else {
            rep.say(&format!(
                "serving {} ({}) at {}: paired {} as a receiver of this device, no code needed (`ferry peers --forget` to revoke)",
                escape(&peer.name),
                peer.device_id,
                peer.addr,
                output::utc_time(peer.paired_at)
            ));
        }
        // Rounds on this connection, each on new streams.
        loop {
            // --compress auto: compress over a network, not between two devices on this
            // machine (no link to save time on; both ends share the CPUs zstd would take).
            if let Some(g) = &policy.gate {
                g.set(!same_machine(&conn));
            }
            sessions += 1;
            awaiting.store(false, Ordering::SeqCst);
            let (current, round_no, stop_d) =
                (Arc::clone(&manifest), rounds_done + 1, stop_rx.clone());
            let (sc, aw, lim, rs) = (&scanner, &awaiting, &limited, &round_cfg);
            let serving = session::serve_round(
                &conn,
                Arc::clone(&manifest),
                Arc::clone(&source),
                s.limit_rate.clone(),
                |ev| {
                    if let SendEvent::Done { root } = ev {
                        rep.event(
                            "verified",
                            json!({"round": round_no, "root": root.to_hex()}),
                        );
                    }
                },
                move || decide(sc, current, round_no, rs, stop_d, aw, lim, rep),
            );
            tokio::pin!(serving);
            let mut stopping = false;
            // A receiver that was killed (or lost power) never closes its connection: this
            // session would only notice at the idle timeout. The same receiver connecting
            // again means the old connection is dead, so the new one replaces it at once.
            let (res, stats) = loop {
                tokio::select! {
                    r = &mut serving => break r,
                    a = ep.accept(), if next.is_none() => match a {
                        Ok(newer) if newer.peer().device_id == peer.device_id => {
                            tracing::info!("{} reconnected: replacing its stale session", escape(&peer.name));
                            conn.close(session::CLOSE_SUPERSEDED, b"replaced by a newer connection");
                            next = Some(newer);
                        }
                        Ok(other) => {
                            other.close(session::CLOSE_BUSY, b"busy with another device");
                        }
                        Err(e) => tracing::info!("refused a connection while serving: {e}"),
                    },
                    _ = stopped(&mut stop), if !stopping => {
                        if awaiting.load(Ordering::SeqCst) {
                            // The receiver holds a verified round: the verdict ends it cleanly.
                            stopping = true;
                        } else {
                            conn.close(1, b"sender stopped");
                            return Err(Failure::new(Exit::Interrupted, STOPPED));
                        }
                    }
                }
            };
            wire_bytes += stats.wire_bytes;
            if rounds_done >= base_rounds {
                catchup_wire_bytes += stats.wire_bytes;
            }
            let finish = |rounds: u32, catchup: u64, how: &str| -> SendSummary {
                let elapsed = started.elapsed().as_secs_f64();
                let last = Arc::clone(&manifest);
                let fin = last.summary();
                let diff = first.diff(&last, 0);
                // Rows that arrived in the databases while migrating (only worth counting again
                // when a catch-up round ran).
                let rows_added = match (first_rows, rounds > base_rounds) {
                    (Some(a), true) => database_rows(&source).map(|b| b as i64 - a as i64),
                    (Some(_), false) => Some(0),
                    (None, _) => None,
                };
                rep.event("done", json!({"root": fin.root.to_hex(), "files": fin.files, "bytes": fin.bytes, "wire_bytes": wire_bytes, "elapsed_s": elapsed,
                    "rounds": rounds, "catchup_wire_bytes": catchup, "files_added": diff.added, "files_changed": diff.changed, "files_removed": diff.removed, "end": how,
                    "database_rows": first_rows, "database_rows_added": rows_added,
                    "complete": unstable.is_empty(), "unstable": unstable}));
                rep.say(&format!(
                    "{}: {} verified by {} ({} on the wire, {:.1} s)",
                    if unstable.is_empty() {
                        "done"
                    } else {
                        "done, but incomplete"
                    },
                    human_bytes(fin.bytes),
                    escape(&peer.name),
                    human_bytes(wire_bytes),
                    elapsed
                ));
                if let Some(n) = rows_added.filter(|&n| n != 0) {
                    rep.say(&format!(
                        "{n} database rows (messages and other records) arrived during the migration and were sent in catch-up rounds"
                    ));
                }
                if rounds > 1 || diff.added + diff.changed + diff.removed > 0 {
                    rep.say(&format!(
                        "{rounds} rounds: during the migration {} files were added, {} changed and {} removed; catch-up rounds sent {}",
                        diff.added, diff.changed, diff.removed, human_bytes(catchup)
                    ));
                }
                SendSummary {
                    wire_bytes,
                    sessions,
                    scan_secs,
                    unstable: unstable.clone(),
                }
            };
            match res {
                Ok(SendEnd::Final) => {
                    rounds_done += 1;
                    conn.close(session::CLOSE_DONE, b"done");
                    let how = if stopping || *stop_rx.borrow() {
                        "stopped"
                    } else if limited.lock().unwrap_or_else(|p| p.into_inner()).is_some() {
                        "round-limit"
                    } else {
                        "quiescent"
                    };
                    if let Some(d) = limited.lock().unwrap_or_else(|p| p.into_inner()).take() {
                        rep.say(&format!(
                            "the folder was still changing after {rounds_done} rounds (--max-rounds); the new device holds the verified state of the last round. Still changing: {}",
                            d.paths.iter().map(|p| escape(p)).collect::<Vec<_>>().join(", ")
                        ));
                        rep.event("still_changing", json!({"rounds": rounds_done, "added": d.added, "changed": d.changed, "removed": d.removed, "paths": d.paths}));
                    }
                    let summary = finish(rounds_done, catchup_wire_bytes, how);
                    ep.close(0, b"done").await;
                    return Ok(summary);
                }
                Ok(SendEnd::Next(out)) => {
                    rounds_done += 1;
                    restarts.clear();
                    restarts_total = 0;
                    let diff = manifest.diff(&out.manifest, 0);
                    (manifest, source, unstable) = adopt(&s.dir, out, &policy, rep);
                    let m = manifest.summary();
                    rep.event("round", json!({"round": rounds_done + 1, "reason": "changed", "files": m.files, "bytes": m.bytes, "root": m.root.to_hex(),
                        "files_added": diff.added, "files_changed": diff.changed, "files_removed": diff.removed}));
                    rep.say(&format!(
                        "round {} verified; the folder changed meanwhile ({} added, {} changed, {} removed): catch-up round {}",
                        rounds_done, diff.added, diff.changed, diff.removed, rounds_done + 1
                    ));
                }
                Ok(SendEnd::SourceChanged { path }) => {
                    restarts_total += 1;
                    let n = restarts.entry(path.clone()).or_insert(0);
                    *n += 1;
                    if *n >= MAX_RESTARTS_PER_FILE || restarts_total >= MAX_RESTARTS {
                        let msg = format!(
                            "{path} kept changing while it was being sent ({n} times); it could not be captured consistently. \
                             Close the app that writes it and run the same commands again (what arrived is kept)"
                        );
                        session::refuse(&conn, CloseCode::SourceError, &msg).await;
                        let _ = tokio::time::timeout(SOURCE_ERROR_LINGER, conn.closed()).await;
                        conn.close(1, b"source error");
                        return Err(Failure::new(Exit::Source, msg));
                    }
                    rep.say(&format!(
                        "{path} changed while it was being sent: rescanning and continuing (the new device keeps what it verified)"
                    ));
                    let out = scanner.rescan().await?;
                    (manifest, source, unstable) = adopt(&s.dir, out, &policy, rep);
                    let m = manifest.summary();
                    rep.event("round", json!({"round": rounds_done + 1, "reason": "source-changed", "path": path, "files": m.files, "bytes": m.bytes, "root": m.root.to_hex()}));
                }
                Err(e) => {
                    // Was this round verified (the decision was pending when it ended)?
                    let verified = awaiting.swap(false, Ordering::SeqCst);
                    if receiver_stopped(&conn).await {
                        // The receiver stopped following, holding a verified round.
                        rep.say("the receiver stopped; it holds the last verified round");
                        let rounds = rounds_done + u32::from(verified);
                        let summary = finish(rounds, catchup_wire_bytes, "receiver-stopped");
                        ep.close(0, b"done").await;
                        return Ok(summary);
                    }
                    let f = exit::from_drive(&e);
                    if f.exit == Exit::Source {
                        // The session queued a Close frame naming the file; closing the
                        // connection at once would discard it, and the receiver would take
                        // the stop for a lost link and wait for us. It closes when it has
                        // read the frame.
                        let _ = tokio::time::timeout(SOURCE_ERROR_LINGER, conn.closed()).await;
                        conn.close(1, b"source error");
                        return Err(f);
                    }
                    rep.say(&format!(
                        "session ended: {e}; waiting for the receiver to reconnect"
                    ));
                    rep.event(
                        "interrupted",
                        json!({"message": e.to_string(), "wire_bytes": wire_bytes}),
                    );
                    break;
                }
            }
        }
    }
}

/// Resolves at `at` (never when `None`).
async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Keeps a pairing code on offer while no receiver has connected: after a failed attempt it
/// issues a new code once the endpoint's back-off allows, and when pairing is paused (too
/// many failed attempts in a row) it tells the user and waits for Enter (on a terminal) or the
/// end of the pause.
struct CodeKeeper {
    /// When to issue the next code.
    reissue: Option<tokio::time::Instant>,
    /// The pause was announced (once per pause).
    pause_said: bool,
    /// Lines typed on the terminal while paused (Enter = new code).
    enter: Option<tokio::sync::mpsc::Receiver<()>>,
}

impl CodeKeeper {
    fn new() -> Self {
        CodeKeeper {
            reissue: None,
            pause_said: false,
            enter: None,
        }
    }

    /// Resolves when the user pressed Enter during a pause (never otherwise).
    async fn enter_pressed(&mut self) {
        match (&mut self.enter, self.pause_said) {
            (Some(rx), true) => {
                if rx.recv().await.is_none() {
                    self.enter = None;
                    std::future::pending::<()>().await;
                }
            }
            _ => std::future::pending().await,
        }
    }

    /// After a failed or refused attempt: if the code is gone, schedule the next one (and
    /// announce a pause).
    fn after_failure<F>(
        &mut self,
        ep: &Endpoint,
        rep: &Reporter,
        announce: &F,
    ) -> Result<(), Failure>
    where
        F: Fn(PairingCode) -> Result<Ticket, Failure>,
    {
        if ep.pairing_open() || self.reissue.is_some() {
            return Ok(());
        }
        let gate = ep.pairing_gate();
        if gate.retry_in.is_zero() {
            return self.reissue(ep, rep, announce);
        }
        self.reissue = Some(tokio::time::Instant::now() + gate.retry_in);
        let secs = gate.retry_in.as_secs_f64().ceil() as u64;
        if gate.paused {
            self.pause(gate.failures, secs, rep);
        } else {
            rep.say(&format!(
                "{} failed pairing attempts in a row: a new code in {secs} s",
                gate.failures
            ));
            rep.event(
                "pairing_backoff",
                json!({"failures": gate.failures, "retry_in_s": secs}),
            );
        }
        Ok(())
    }

    fn pause(&mut self, failures: u32, secs: u64, rep: &Reporter) {
        if self.pause_said {
            return;
        }
        self.pause_said = true;
        use std::io::IsTerminal;
        let interactive = !rep.is_json() && std::io::stdin().is_terminal();
        if interactive && self.enter.is_none() {
            // A plain thread: a read blocked on the terminal must not hold up the exit.
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            std::thread::spawn(move || {
                let mut line = String::new();
                while std::io::stdin().read_line(&mut line).is_ok_and(|n| n > 0) {
                    line.clear();
                    if tx.blocking_send(()).is_err() {
                        break;
                    }
                }
            });
            self.enter = Some(rx);
        }
        // Only Enter pressed after this announcement resumes.
        if let Some(rx) = &mut self.enter {
            while rx.try_recv().is_ok() {}
        }
        let minutes = secs.div_ceil(60);
        let how = if interactive {
            format!("Press Enter for a new code (or wait {minutes} min, or restart ferry send)")
        } else {
            format!("A new code is issued in {minutes} min; restart ferry send for one now")
        };
        rep.say(&format!(
            "{failures} failed pairing attempts in a row: pairing paused. If that was not you, someone nearby is guessing the code. {how}. Devices already paired can still connect."
        ));
        rep.event(
            "pairing_paused",
            json!({"failures": failures, "retry_in_s": secs, "resume": if interactive { "enter" } else { "wait" }}),
        );
    }

    /// Issues and announces a new code, or reschedules when the endpoint still backs off.
    fn reissue<F>(&mut self, ep: &Endpoint, rep: &Reporter, announce: &F) -> Result<(), Failure>
    where
        F: Fn(PairingCode) -> Result<Ticket, Failure>,
    {
        self.reissue = None;
        match ep.issue_pairing_code() {
            Ok(c) => {
                self.pause_said = false;
                rep.say("new pairing code issued:");
                announce(c)?;
                Ok(())
            }
            Err(PairingError::Throttled {
                failures,
                paused,
                retry_in,
            }) => {
                self.reissue = Some(tokio::time::Instant::now() + retry_in);
                if paused {
                    self.pause(failures, retry_in.as_secs_f64().ceil() as u64, rep);
                }
                Ok(())
            }
            Err(e) => Err(Failure::new(Exit::Internal, e.to_string())),
        }
    }
}

/// Whether the receiver closed the connection saying it stopped with a verified round.
async fn receiver_stopped(conn: &PeerConnection) -> bool {
    match tokio::time::timeout(Duration::from_millis(500), conn.closed()).await {
        Ok(ferry_transport::ConnectionError::ApplicationClosed(c)) => {
            c.error_code == ferry_transport::VarInt::from_u32(session::CLOSE_RECEIVER_STOPPED)
        }
        _ => false,
    }
}

/// Whether the receiver of `conn` runs on this machine: it comes from a loopback address, or
/// from the very address this end receives on.
fn same_machine(conn: &PeerConnection) -> bool {
    let remote = conn.peer().addr.ip();
    remote.is_loopback() || conn.quinn().local_ip() == Some(remote)
}
