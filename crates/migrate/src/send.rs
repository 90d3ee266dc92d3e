//! The old device's side: scan, listen, pair, serve rounds until the receiver confirms the end.
//!
//! After the receiver verified a round the sender rescans (the hash cache makes unchanged files
//! free); while the folder changed, it serves catch-up rounds that send only what changed, up to
//! `max_rounds`, or forever with `follow`. A file that changes under a read cuts the round
//! short (the receiver keeps what it verified) and is rescanned; one that does so
//! [`MAX_RESTARTS_PER_FILE`] times in a row ends the migration with [`Error::Source`] naming it.

mod codes;
mod pending;
mod scanner;

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_sync::compress::{CompressGate, CompressPolicy};
use ferry_sync::driver::{DriveError, SendEnd, SendStats, Verdict};
use ferry_sync::manifest::ManifestDiff;
use ferry_sync::proto::{CloseCode, SendEvent};
use ferry_sync::scan::ScanOutput;
use ferry_sync::snapshot::SnapshotStore;
use ferry_sync::source::Source;
use ferry_sync::Manifest;
use ferry_transport::{
    close, AcceptError, Advertisement, Congestion, Discovery, Endpoint, FerryDirs, MdnsConfig,
    MdnsDiscovery, PairingCode, PairingError, PeerConnection, PeerInfo,
};
use serde::Serialize;
use tokio::sync::watch;

use crate::device::{self, Pinning};
use crate::error::{from_drive, interruption, Error, ErrorKind};
use crate::event::{End, Event, ManifestInfo, PeerEvent, RoundInfo, RoundReason, ScanInfo, Totals};
use crate::handle::{self, Control, Emitter, Events, Handle};
use crate::session::{self, RateLimit};
use crate::text::escape;
use codes::CodeKeeper;
use scanner::Scanner;

/// When the sender compresses compressible chunks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
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

/// Files up to this size count as essentials for `essentials_first` (with the databases):
/// thumbnails, voice notes, stickers — what makes a chat list usable.
pub const ESSENTIAL_MAX_SIZE: u64 = 1 << 20;
/// A file that cuts this many rounds short in a row (changing under the read, with no round
/// verified in between) is reported by name.
pub const MAX_RESTARTS_PER_FILE: u32 = 4;
/// Most rounds cut short in a row, whatever the files.
pub const MAX_RESTARTS: u32 = 20;
/// How long a sender that cannot read its folder waits for the receiver to take the news.
const SOURCE_ERROR_LINGER: Duration = Duration::from_secs(3);
/// Said when the sender is stopped before the end.
const STOPPED: &str = "stopped; run the same command to continue where it left off";

/// A sender: build it with [`crate::Migration::send`], then [`SendBuilder::start`].
#[derive(Clone, Debug)]
#[must_use = "a builder does nothing until started"]
pub struct SendBuilder {
    dir: PathBuf,
    code: Option<PairingCode>,
    listen: Option<SocketAddr>,
    mdns: bool,
    name: Option<String>,
    dirs: Option<FerryDirs>,
    congestion: Congestion,
    limit_rate: Option<u64>,
    compress: Compress,
    max_rounds: u32,
    follow: bool,
    poll_interval: Duration,
    essentials_first: bool,
    to: Option<String>,
    pairing_ttl: Duration,
    resumable_pause: bool,
}

impl SendBuilder {
    pub(crate) fn new(dir: impl Into<PathBuf>) -> Self {
        SendBuilder {
            dir: dir.into(),
            code: None,
            listen: None,
            mdns: true,
            name: None,
            dirs: None,
            congestion: Congestion::default(),
            limit_rate: None,
            compress: Compress::default(),
            max_rounds: 5,
            follow: false,
            poll_interval: Duration::from_secs(2),
            essentials_first: false,
            to: None,
            pairing_ttl: ferry_transport::DEFAULT_PAIRING_TTL,
            resumable_pause: false,
        }
    }

    /// Use this pairing code instead of a random one (weaker; emits [`Event::ChosenCode`]).
    pub fn code(mut self, code: PairingCode) -> Self {
        self.code = Some(code);
        self
    }
    /// Listen on this address (default: every address; the port of the last run when free).
    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.listen = Some(addr);
        self
    }
    /// Announce on the local network with mDNS (default: yes).
    pub fn mdns(mut self, on: bool) -> Self {
        self.mdns = on;
        self
    }
    /// The name the other device sees (saved with this device's identity).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }
    /// This device's state folders (default: [`FerryDirs::from_env`]).
    pub fn dirs(mut self, dirs: FerryDirs) -> Self {
        self.dirs = Some(dirs);
        self
    }
    /// Congestion controller for the data sent (default: BBR).
    pub fn congestion(mut self, c: Congestion) -> Self {
        self.congestion = c;
        self
    }
    /// Cap on the chunk data rate, in bytes per second.
    pub fn limit_rate(mut self, bytes_per_sec: u64) -> Self {
        self.limit_rate = Some(bytes_per_sec);
        self
    }
    /// When chunks are compressed (default: [`Compress::Auto`]).
    pub fn compress(mut self, c: Compress) -> Self {
        self.compress = c;
        self
    }
    /// Most rounds (the first included) while the folder keeps changing (default 5, at least 1).
    pub fn max_rounds(mut self, n: u32) -> Self {
        self.max_rounds = n.max(1);
        self
    }
    /// Keep serving changes in new rounds until stopped (no round limit).
    pub fn follow(mut self, on: bool) -> Self {
        self.follow = on;
        self
    }
    /// With `follow`: time between rescans of an unchanged folder (default 2 s).
    pub fn poll_interval(mut self, d: Duration) -> Self {
        self.poll_interval = d;
        self
    }
    /// Send the databases and small files as a first round of their own.
    pub fn essentials_first(mut self, on: bool) -> Self {
        self.essentials_first = on;
        self
    }
    /// Serve only this paired device (its name, id or short id).
    pub fn to(mut self, which: impl Into<String>) -> Self {
        self.to = Some(which.into());
        self
    }
    /// Pairings unused this long need a code again (default 30 days).
    pub fn pairing_ttl(mut self, ttl: Duration) -> Self {
        self.pairing_ttl = ttl;
        self
    }
    /// The caller offers [`Handle::resume_pairing`] during a pairing pause (the CLI: Enter).
    pub fn resumable_pause(mut self, on: bool) -> Self {
        self.resumable_pause = on;
        self
    }

    /// Starts the sender on the current tokio runtime.
    pub fn start(self) -> (Handle<SendSummary>, Events) {
        handle::spawn(move |em, ctl| async move {
            let r = run(self, &em, ctl).await;
            em.flush().await;
            r
        })
    }
}

/// What a sender's migration did (the `done` event of the sender).
#[derive(Clone, Debug, Serialize)]
#[non_exhaustive]
pub struct SendSummary {
    /// What both ends report.
    #[serde(flatten)]
    pub totals: Totals,
    /// Rows in the databases at the first scan.
    pub database_rows: Option<u64>,
    /// Rows that arrived in the databases during the migration.
    pub database_rows_added: Option<i64>,
    /// No file was left out.
    pub complete: bool,
    /// Files left out because they kept changing while read.
    pub unstable: Vec<String>,
    /// The receiver's name.
    pub peer: String,
    pub sessions: u32,
    pub scan_s: f64,
    /// Chunk bytes sent before compression, all sessions (`wire_bytes` is after it): with
    /// the history's unique bytes, what compression saved and what was sent again.
    pub raw_bytes: u64,
    /// The last round's tree in distinct chunk bytes (files with the same content counted
    /// once): what dedup left to send.
    pub unique_bytes: u64,
}

/// Resolves once `stop` says so; never if its sender is gone.
pub(crate) async fn stopped(stop: &mut watch::Receiver<bool>) {
    loop {
        if *stop.borrow_and_update() {
            return;
        }
        if stop.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

fn interrupted(message: &str) -> Error {
    Error::new(ErrorKind::Interrupted, message)
}

/// Runs the sender until the migration is complete (or stopped).
async fn run(o: SendBuilder, em: &Emitter, ctl: Arc<Control>) -> Result<SendSummary, Error> {
    let started = Instant::now();
    let dirs = match &o.dirs {
        Some(d) => d.clone(),
        None => device::dirs_from_env()?,
    };
    // ferry's state (snapshots of the chat databases, the hash cache naming every file) is
    // owner-only; a state folder left wider by an older version is narrowed.
    if let Err(e) = ferry_sync::private::create_dir_all(&dirs.state) {
        tracing::warn!("cannot make {} private: {e}", dirs.state.display());
    }
    // Before the scan: a wrong `to` is a usage error at once.
    let pinning = sender_pinning(&o, &dirs, em).await?;
    let scanner = Scanner::new(&o.dir, &dirs.state);
    // Snapshots a crashed sender left for other folders are copies of chat databases that no
    // migration needs any more; this folder's are kept for a restarted migration to reuse, and
    // removed when this one ends.
    match SnapshotStore::remove_others(&dirs.state, &scanner.snapshot_dir) {
        Ok(0) => {}
        Ok(n) => tracing::info!("removed {n} snapshot folder(s) left by an earlier run"),
        Err(e) => tracing::warn!("cannot remove old snapshots: {e}"),
    }
    let _snapshots = SnapshotStore::claim(&scanner.snapshot_dir).map_err(|e| {
        Error::with_cause(
            ErrorKind::Source,
            format!(
                "cannot create the snapshot folder {}: {e}; check that ferry's state folder is writable (or set FERRY_HOME)",
                scanner.snapshot_dir.display()
            ),
            Some(e.into()),
        )
    })?;
    let mut stop = ctl.stop_signal();
    let scanned = tokio::select! {
        r = scanner.scan_reporting(em) => r?,
        () = stopped(&mut stop) => return Err(interrupted(STOPPED)),
    };
    let scan_secs = started.elapsed().as_secs_f64();
    let mut serving =
        Serving::prepare(o, dirs, pinning, scanner, scanned, scan_secs, em, ctl).await?;
    serving.serve().await
}

/// The pinning rules of this sender: its pairing TTL, and `to` resolved to a paired device.
async fn sender_pinning(o: &SendBuilder, dirs: &FerryDirs, em: &Emitter) -> Result<Pinning, Error> {
    let serve_only = match &o.to {
        None => None,
        Some(which) => {
            let store = device::peer_store(dirs)?;
            let p = device::find_peer(&store, which).map_err(|f| {
                f.reworded(|m| {
                    format!(
                        "--to: {m}; pair first by running `ferry send` without --to, or use `ferry pair`"
                    )
                })
            })?;
            em.emit(Event::ServingOnly {
                peer: p.name.clone(),
                device_id: p.device_id,
            })
            .await;
            Some(p.device_id)
        }
    };
    Ok(Pinning {
        ttl: o.pairing_ttl,
        serve_only,
    })
}

/// Where a sender notes the port it listened on (in the state folder).
fn last_port_file(dirs: &FerryDirs) -> PathBuf {
    dirs.state.join("send-port")
}

/// The sender's endpoint. Without `listen` it listens on every address, on the port it used
/// last time when that is free: a sender restarted after a crash or a reboot is then found at
/// the address the receiver (and its ticket) already know, and the receiver resumes on its
/// own. Otherwise on any free port.
fn sender_endpoint(
    o: &SendBuilder,
    dirs: &FerryDirs,
    pinning: &Pinning,
) -> Result<Endpoint, Error> {
    let name = o.name.as_deref();
    let open = |at| device::endpoint_with(dirs, name, at, o.congestion, pinning);
    if o.listen.is_some() {
        return open(o.listen);
    }
    let last = std::fs::read_to_string(last_port_file(dirs))
        .ok()
        .and_then(|p| p.trim().parse::<u16>().ok())
        .filter(|p| *p != 0);
    let ep = match last {
        Some(port) => match open(Some(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)))) {
            Ok(ep) => ep,
            Err(f) => {
                tracing::info!("port {port} of the last run is taken ({f}); using another");
                open(None)?
            }
        },
        None => open(None)?,
    };
    if let Ok(a) = ep.local_addr() {
        let file = last_port_file(dirs);
        let saved = ferry_sync::private::create_dir_all(&dirs.state)
            .and_then(|()| ferry_sync::private::write(&file, format!("{}\n", a.port()).as_bytes()));
        if let Err(e) = saved {
            tracing::info!("cannot note the port in {}: {e}", file.display());
        }
    }
    Ok(ep)
}

/// Announces the sender on the local network (mDNS); `None` when that is unavailable.
async fn advertise(ep: &Endpoint, port: u16, em: &Emitter) -> Option<MdnsDiscovery> {
    let d = match MdnsDiscovery::new(&MdnsConfig::default()) {
        Ok(d) => d,
        Err(e) => {
            em.emit(Event::DiscoveryUnavailable {
                reason: e.to_string(),
            })
            .await;
            return None;
        }
    };
    let ad = Advertisement {
        name: ep.identity().name().to_string(),
        port,
        addrs: vec![],
    };
    if let Err(e) = d.advertise(&ad) {
        em.emit(Event::DiscoveryUnavailable {
            reason: e.to_string(),
        })
        .await;
    }
    Some(d)
}

/// Resolves at `at` (never when `None`).
async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Whether the receiver closed the connection saying it stopped with a verified round.
async fn receiver_stopped(conn: &PeerConnection) -> bool {
    match tokio::time::timeout(Duration::from_millis(500), conn.closed()).await {
        Ok(ferry_transport::ConnectionError::ApplicationClosed(c)) => {
            c.error_code == ferry_transport::VarInt::from_u32(close::RECEIVER_STOPPED)
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

fn paired_event(conn: &PeerConnection) -> Event {
    let p: &PeerInfo = conn.peer();
    Event::Paired(PeerEvent {
        peer: p.name.clone(),
        device_id: p.device_id,
        addr: p.addr,
        newly_paired: conn.newly_paired(),
        paired_at: p.paired_at,
        role: p.role,
    })
}

/// The end of a round the receiver verified: rescan; with `follow`, wait for a change.
/// `Next` when the folder changed and another round may run; otherwise `Final` (and `limited`
/// says what still changed when the round limit stopped the migration).
struct Decider<'a> {
    scanner: &'a Scanner,
    rounds: &'a RoundRules,
    awaiting: &'a AtomicBool,
    limited: &'a Mutex<Option<ManifestDiff>>,
    em: &'a Emitter,
}

/// How catch-up rounds run.
#[derive(Clone, Debug)]
struct RoundRules {
    max_rounds: u32,
    follow: bool,
    poll_interval: Duration,
}

impl Decider<'_> {
    async fn decide(
        self,
        current: Arc<Manifest>,
        rounds_done: u32,
        mut stop: watch::Receiver<bool>,
    ) -> Verdict<ScanOutput> {
        self.awaiting.store(true, Ordering::SeqCst);
        let s = self.rounds;
        let v = loop {
            if *stop.borrow_and_update() {
                break Verdict::Final;
            }
            let scan_started = Instant::now();
            let scanned = self.scanner.rescan().await;
            // A huge folder is not rescanned back to back: at most a fifth of the time.
            let pause = s.poll_interval.max(scan_started.elapsed() * 4);
            match scanned {
                Ok(out) if out.manifest.root() != current.root() => {
                    if !s.follow && rounds_done >= s.max_rounds {
                        let diff = current.diff(&out.manifest, 20);
                        *self.limited.lock().unwrap_or_else(|p| p.into_inner()) = Some(diff);
                        break Verdict::Final;
                    }
                    break Verdict::Next(out);
                }
                Ok(_) => {}
                Err(f) => {
                    self.em
                        .emit(Event::RescanFailed {
                            message: f.message().to_string(),
                        })
                        .await;
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
        // A final verdict leaves `awaiting` set: the round ends cleanly, and a stop meanwhile
        // must not turn that into an interruption. Another round is work in flight again.
        if matches!(v, Verdict::Next(_)) {
            self.awaiting.store(false, Ordering::SeqCst);
        }
        v
    }
}

/// What a round on a connection came to.
enum RoundOutcome {
    /// The migration ended: this summary.
    Finished(Box<SendSummary>),
    /// Another round on the same connection.
    Again,
    /// The session ended; wait for the receiver to come back.
    Lost,
}

/// A sender serving its receiver: the state kept across rounds and connections.
struct Serving<'e> {
    o: SendBuilder,
    /// This device's folders (the note of an unfinished migration lives there).
    dirs: FerryDirs,
    em: &'e Emitter,
    ctl: Arc<Control>,
    ep: Endpoint,
    scanner: Scanner,
    policy: CompressPolicy,
    manifest: Arc<Manifest>,
    source: Arc<Source>,
    unstable: Vec<String>,
    /// The manifest of the first round, to say what changed since.
    first: Arc<Manifest>,
    first_rows: Option<u64>,
    /// Rounds that carry the migration itself rather than changes made during it.
    base_rounds: u32,
    rules: RoundRules,
    /// When the first receiver was served: the migration's time is the scan and what follows
    /// that, not the wait for a receiver.
    served_from: Option<Instant>,
    scan_secs: f64,
    wire_bytes: u64,
    raw_bytes: u64,
    catchup_wire_bytes: u64,
    sessions: u32,
    rounds_done: u32,
    restarts: HashMap<String, u32>,
    restarts_total: u32,
    awaiting: AtomicBool,
    limited: Mutex<Option<ManifestDiff>>,
    codes: CodeKeeper,
    _mdns: Option<MdnsDiscovery>,
}

impl<'e> Serving<'e> {
    /// From the first scan to a listening endpoint with a code on offer.
    #[allow(clippy::too_many_arguments)]
    async fn prepare(
        o: SendBuilder,
        dirs: FerryDirs,
        pinning: Pinning,
        scanner: Scanner,
        scanned: ScanOutput,
        scan_secs: f64,
        em: &'e Emitter,
        ctl: Arc<Control>,
    ) -> Result<Serving<'e>, Error> {
        scanner::report_scan(&scanned, em).await;
        let sum = *scanned.manifest.summary();
        let scan_info = ScanInfo {
            unique_bytes: sum.unique_bytes,
            hashed_bytes: scanned.hashed_bytes,
            cached_files: scanned.cached_files,
            scan_s: scan_secs,
            skipped: scanned.skipped.len() as u64,
        };
        let policy = o.compress.policy();
        for u in &scanned.unstable {
            em.emit(Event::Unstable {
                path: u.path.clone(),
                reason: u.reason.clone(),
            })
            .await;
        }
        let unstable = scanned.unstable.iter().map(|u| u.path.clone()).collect();
        em.emit(Event::Manifest(ManifestInfo {
            files: sum.files,
            bytes: sum.bytes,
            chunks: sum.unique_chunks,
            root: sum.root,
            scan: Some(scan_info),
        }))
        .await;
        let first = Arc::new(scanned.manifest);
        // Essentials first: the databases and small files go as a round of their own,
        // committed (usable) on the new device before the large media; the rescan after it
        // differs from that round's manifest, so the rest follows as the next round.
        let early = if o.essentials_first {
            first.early_subset(ESSENTIAL_MAX_SIZE).map(Arc::new)
        } else {
            None
        };
        if let Some(sub) = &early {
            let e = sub.summary();
            em.emit(Event::Essentials {
                files: e.files,
                bytes: e.bytes,
                root: e.root,
            })
            .await;
        }
        let manifest = early.clone().unwrap_or_else(|| Arc::clone(&first));
        let source = Arc::new(
            Source::new(&o.dir, Arc::clone(&manifest), policy.clone())
                .with_redirects(scanned.sources),
        );
        let first_rows = scanner::database_rows(&source).await;
        let base_rounds = if early.is_some() { 2 } else { 1 };
        // The essentials round does not count against the round limit.
        let rules = RoundRules {
            max_rounds: o.max_rounds.saturating_add(base_rounds - 1),
            follow: o.follow,
            poll_interval: o.poll_interval,
        };
        let ep = sender_endpoint(&o, &dirs, &pinning)?;
        let code = offer_code(&ep, o.code, em).await?;
        let waiting_for = pending::awaited(&dirs, &o.dir, &ep);
        let ticket = codes::announce(&ep, code, false, o.mdns, waiting_for.clone(), em).await?;
        let mdns = if o.mdns {
            advertise(&ep, ticket.addrs.first().map_or(0, |a| a.port()), em).await
        } else {
            None
        };
        let codes = CodeKeeper::new(o.resumable_pause, o.mdns, waiting_for);
        Ok(Serving {
            o,
            dirs,
            em,
            ctl,
            ep,
            scanner,
            policy,
            manifest,
            source,
            unstable,
            first,
            first_rows,
            base_rounds,
            rules,
            served_from: None,
            scan_secs,
            wire_bytes: 0,
            raw_bytes: 0,
            catchup_wire_bytes: 0,
            sessions: 0,
            rounds_done: 0,
            restarts: HashMap::new(),
            restarts_total: 0,
            awaiting: AtomicBool::new(false),
            limited: Mutex::new(None),
            codes,
            _mdns: mdns,
        })
    }

    /// Serves receivers until the migration ends.
    async fn serve(&mut self) -> Result<SendSummary, Error> {
        // A connection that arrived while a session was running and replaces it.
        let mut next: Option<PeerConnection> = None;
        loop {
            let conn = match next.take() {
                Some(c) => c,
                None => match self.accept().await? {
                    Some(c) => c,
                    None => continue,
                },
            };
            // Who is served, before any data flows: a device admitted by its pinned key says
            // when it was paired, so an unexpected one stands out.
            self.em.emit(paired_event(&conn)).await;
            pending::started(&self.dirs, &self.o.dir, &conn.peer().device_id);
            self.served_from.get_or_insert_with(Instant::now);
            loop {
                match self.round(&conn, &mut next).await? {
                    RoundOutcome::Finished(summary) => {
                        pending::finished(&self.dirs);
                        self.ep.close(close::DONE, b"done").await;
                        return Ok(*summary);
                    }
                    RoundOutcome::Again => {}
                    RoundOutcome::Lost => break,
                }
            }
        }
    }

    /// Waits for the next receiver (issuing codes again as the back-off allows); `None` when
    /// an attempt failed and the wait goes on.
    async fn accept(&mut self) -> Result<Option<PeerConnection>, Error> {
        let mut stop = self.ctl.stop_signal();
        let accepted = tokio::select! {
            a = self.ep.accept() => a,
            () = sleep_until_some(self.codes.reissue) => {
                self.codes.reissue(&self.ep, self.em).await?;
                return Ok(None);
            }
            () = self.ctl.resume_pairing.notified(), if self.codes.pause_said => {
                self.ep.resume_pairing();
                self.codes.reissue(&self.ep, self.em).await?;
                return Ok(None);
            }
            () = stopped(&mut stop) => {
                return Err(interrupted(if self.served_from.is_none() {
                    "stopped before any device connected; nothing was sent"
                } else {
                    STOPPED
                }));
            }
        };
        match accepted {
            Ok(conn) => Ok(Some(conn)),
            Err(AcceptError::EndpointClosed) => Err(Error::new(
                ErrorKind::Internal,
                "the network endpoint closed",
            )),
            Err(AcceptError::Pairing {
                addr,
                source: PairingError::WrongCode,
            }) => {
                self.em
                    .emit(Event::WrongCode {
                        kind: "pairing",
                        message: format!("wrong code from {addr}"),
                        addr,
                    })
                    .await;
                if self.sessions == 0 {
                    self.codes.after_failure(&self.ep, self.em).await?;
                }
                Ok(None)
            }
            Err(AcceptError::NotServed { device, addr }) => {
                // Refused before pairing: the code is still valid for the `to` device.
                self.em
                    .emit(Event::Refused {
                        device_id: device,
                        addr,
                    })
                    .await;
                Ok(None)
            }
            Err(e) => {
                tracing::info!("refused a connection: {e}");
                if self.sessions == 0 {
                    // The code may have been used by a failed attempt, or expired: issue a
                    // fresh one (when the back-off allows) so pairing can be retried.
                    self.codes.after_failure(&self.ep, self.em).await?;
                }
                Ok(None)
            }
        }
    }

    /// Serves one round on `conn`, watching for a newer connection of the same receiver (it
    /// replaces this one), for other devices (refused: busy) and for a stop.
    async fn serve_once(
        &self,
        conn: &PeerConnection,
        next: &mut Option<PeerConnection>,
    ) -> Result<(Result<SendEnd<ScanOutput>, DriveError>, SendStats, bool), Error> {
        let peer = conn.peer().clone();
        let round_no = self.rounds_done + 1;
        let em = self.em;
        let decider = Decider {
            scanner: &self.scanner,
            rounds: &self.rules,
            awaiting: &self.awaiting,
            limited: &self.limited,
            em,
        };
        let (current, stop_d) = (Arc::clone(&self.manifest), self.ctl.stop_signal());
        let m = self.manifest.summary();
        let mut sending = crate::progress::Sending::new(round_no, m.bytes, m.files);
        let serving = session::serve_round(
            conn,
            Arc::clone(&self.manifest),
            Arc::clone(&self.source),
            self.o.limit_rate.map(RateLimit::new),
            move |ev| {
                if let Some(p) = sending.on(ev) {
                    em.emit_now(p);
                }
                if let SendEvent::Done { root } = ev {
                    em.emit_now(Event::Verified {
                        round: round_no,
                        root: *root,
                        files: None,
                        bytes: None,
                    });
                }
            },
            move || decider.decide(current, round_no, stop_d),
        );
        tokio::pin!(serving);
        let mut stopping = false;
        let mut stop = self.ctl.stop_signal();
        // A receiver that was killed (or lost power) never closes its connection: this session
        // would only notice at the idle timeout. The same receiver connecting again means the
        // old connection is dead, so the new one replaces it at once.
        loop {
            tokio::select! {
                r = &mut serving => return Ok((r.0, r.1, stopping)),
                a = self.ep.accept(), if next.is_none() => match a {
                    Ok(newer) if newer.peer().device_id == peer.device_id => {
                        tracing::info!("{} reconnected: replacing its stale session", escape(&peer.name));
                        conn.close(close::REPLACED, b"replaced by a newer connection");
                        *next = Some(newer);
                    }
                    Ok(other) => other.close(close::BUSY, b"busy with another device"),
                    Err(e) => tracing::info!("refused a connection while serving: {e}"),
                },
                () = self.ctl.cut.notified() => conn.close(close::LINK_CUT, b"link cut on request"),
                () = stopped(&mut stop), if !stopping => {
                    if self.awaiting.load(Ordering::SeqCst) {
                        // The receiver holds a verified round: the verdict ends it cleanly.
                        stopping = true;
                    } else {
                        conn.close(close::STOPPED, b"sender stopped");
                        return Err(interrupted(STOPPED));
                    }
                }
            }
        }
    }

    /// Runs one round on `conn` and decides what follows.
    async fn round(
        &mut self,
        conn: &PeerConnection,
        next: &mut Option<PeerConnection>,
    ) -> Result<RoundOutcome, Error> {
        // Compress auto: compress over a network, not between two devices on this machine
        // (no link to save time on; both ends share the CPUs zstd would take).
        if let Some(g) = &self.policy.gate {
            g.set(!same_machine(conn));
        }
        self.sessions += 1;
        self.awaiting.store(false, Ordering::SeqCst);
        let (res, stats, stopping) = self.serve_once(conn, next).await?;
        self.wire_bytes += stats.wire_bytes;
        self.raw_bytes += stats.raw_bytes;
        if self.rounds_done >= self.base_rounds {
            self.catchup_wire_bytes += stats.wire_bytes;
        }
        match res {
            Ok(SendEnd::Final) => {
                self.rounds_done += 1;
                conn.close(close::COMPLETE, b"done");
                let stopped_now = stopping || *self.ctl.stop_signal().borrow();
                let limited = self
                    .limited
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .take();
                let how = if stopped_now {
                    End::Stopped
                } else if limited.is_some() {
                    End::RoundLimit
                } else {
                    End::Quiescent
                };
                if let Some(d) = limited {
                    self.em
                        .emit(Event::StillChanging {
                            rounds: self.rounds_done,
                            added: d.added,
                            changed: d.changed,
                            removed: d.removed,
                            paths: d.paths,
                        })
                        .await;
                }
                let s = self.finish(self.rounds_done, how, &conn.peer().name).await;
                Ok(RoundOutcome::Finished(Box::new(s)))
            }
            Ok(SendEnd::Next(out)) => {
                self.rounds_done += 1;
                self.restarts.clear();
                self.restarts_total = 0;
                let diff = self.manifest.diff(&out.manifest, 0);
                self.adopt(out).await;
                let m = *self.manifest.summary();
                let mut r = RoundInfo::new(self.rounds_done + 1, RoundReason::Changed);
                (r.files, r.bytes, r.root) = (Some(m.files), Some(m.bytes), Some(m.root));
                (r.files_added, r.files_changed, r.files_removed) =
                    (Some(diff.added), Some(diff.changed), Some(diff.removed));
                self.em.emit(Event::Round(r)).await;
                Ok(RoundOutcome::Again)
            }
            Ok(SendEnd::SourceChanged { path }) => {
                self.source_changed(conn, path).await?;
                Ok(RoundOutcome::Again)
            }
            Err(e) => self.session_failed(conn, e).await,
        }
    }

    async fn adopt(&mut self, out: ScanOutput) {
        (self.manifest, self.source, self.unstable) =
            scanner::adopt(&self.o.dir, out, &self.policy, self.em).await;
    }

    /// A file changed under the read: rescan and go on, unless it keeps doing so.
    async fn source_changed(&mut self, conn: &PeerConnection, path: String) -> Result<(), Error> {
        self.restarts_total += 1;
        let n = self.restarts.entry(path.clone()).or_insert(0);
        *n += 1;
        if *n >= MAX_RESTARTS_PER_FILE || self.restarts_total >= MAX_RESTARTS {
            let msg = format!(
                "{path} kept changing while it was being sent ({n} times); it could not be captured consistently. \
                 Close the app that writes it and run the same commands again (what arrived is kept)"
            );
            session::refuse(conn, CloseCode::SourceError, &msg).await;
            let _ = tokio::time::timeout(SOURCE_ERROR_LINGER, conn.closed()).await;
            conn.close(close::STOPPED, b"source error");
            return Err(Error::new(ErrorKind::Source, escape(&msg)));
        }
        let out = self.scanner.rescan().await?;
        self.adopt(out).await;
        let m = *self.manifest.summary();
        let mut r = RoundInfo::new(self.rounds_done + 1, RoundReason::SourceChanged);
        (r.path, r.files, r.bytes, r.root) =
            (Some(path), Some(m.files), Some(m.bytes), Some(m.root));
        self.em.emit(Event::Round(r)).await;
        Ok(())
    }

    /// The session ended badly: the receiver stopped with a verified round (the end), a
    /// source error (the end), or a lost link (wait for the receiver).
    async fn session_failed(
        &mut self,
        conn: &PeerConnection,
        e: DriveError,
    ) -> Result<RoundOutcome, Error> {
        // Was this round verified (the decision was pending when it ended)?
        let verified = self.awaiting.swap(false, Ordering::SeqCst);
        if receiver_stopped(conn).await {
            // The receiver stopped following, holding a verified round.
            let rounds = self.rounds_done + u32::from(verified);
            let s = self
                .finish(rounds, End::ReceiverStopped, &conn.peer().name)
                .await;
            return Ok(RoundOutcome::Finished(Box::new(s)));
        }
        let message = interruption(&e);
        let f = from_drive(e);
        if f.kind() == ErrorKind::Source {
            // The session queued a Close frame naming the file; closing the connection at once
            // would discard it, and the receiver would take the stop for a lost link and wait
            // for us. It closes when it has read the frame.
            let _ = tokio::time::timeout(SOURCE_ERROR_LINGER, conn.closed()).await;
            conn.close(close::STOPPED, b"source error");
            return Err(f);
        }
        self.em
            .emit(Event::Interrupted {
                message,
                wire_bytes: self.wire_bytes,
            })
            .await;
        Ok(RoundOutcome::Lost)
    }

    /// The summary of the migration, emitted as `done`.
    async fn finish(&self, rounds: u32, end: End, peer: &str) -> SendSummary {
        let fin = *self.manifest.summary();
        let diff = self.first.diff(&self.manifest, 0);
        // Rows that arrived in the databases while migrating (only worth counting again when
        // a catch-up round ran).
        let rows_added = match (self.first_rows, rounds > self.base_rounds) {
            (Some(a), true) => scanner::database_rows(&self.source)
                .await
                .map(|b| b as i64 - a as i64),
            (Some(_), false) => Some(0),
            (None, _) => None,
        };
        let s = SendSummary {
            totals: Totals {
                root: fin.root,
                files: fin.files,
                bytes: fin.bytes,
                wire_bytes: self.wire_bytes,
                elapsed_s: self.scan_secs
                    + self.served_from.map_or(0.0, |t| t.elapsed().as_secs_f64()),
                rounds,
                catchup_wire_bytes: self.catchup_wire_bytes,
                files_added: diff.added,
                files_changed: diff.changed,
                files_removed: diff.removed,
                end,
            },
            database_rows: self.first_rows,
            database_rows_added: rows_added,
            complete: self.unstable.is_empty(),
            unstable: self.unstable.clone(),
            peer: peer.to_string(),
            sessions: self.sessions,
            scan_s: self.scan_secs,
            raw_bytes: self.raw_bytes,
            unique_bytes: fin.unique_bytes,
        };
        self.em.emit(Event::Sent(s.clone())).await;
        s
    }
}

/// Puts the pairing code on offer: the caller's (weaker; said so), or a random one.
async fn offer_code(
    ep: &Endpoint,
    chosen: Option<PairingCode>,
    em: &Emitter,
) -> Result<PairingCode, Error> {
    let internal =
        |e: PairingError| Error::with_cause(ErrorKind::Internal, e.to_string(), Some(e.into()));
    match chosen {
        Some(c) => {
            em.emit(Event::ChosenCode).await;
            ep.set_pairing_code(c).map_err(internal)?;
            Ok(c)
        }
        None => ep.issue_pairing_code().map_err(internal),
    }
}

impl SendSummary {
    /// The bytes of the migration told apart, for a person: the history, what dedup left to
    /// send, what was sent again (in flight when a link was lost), what compression saved and
    /// what crossed the link.
    pub fn bytes_told_apart(&self) -> String {
        use crate::text::human_bytes as h;
        let again = match self.raw_bytes.saturating_sub(self.unique_bytes) {
            0 => "nothing was sent twice".to_string(),
            n => format!("{} sent again (in flight when a link was lost)", h(n)),
        };
        format!(
            "the {} history holds {} of unique data (dedup of identical files saved {}); {again}; compression saved {}; {} crossed the link",
            h(self.bytes),
            h(self.unique_bytes),
            h(self.bytes.saturating_sub(self.unique_bytes)),
            h(self.raw_bytes.saturating_sub(self.wire_bytes)),
            h(self.wire_bytes)
        )
    }

    /// `Err(Error::Incomplete)` when files were left out because they kept changing.
    pub fn completeness(&self) -> Result<(), Error> {
        if self.unstable.is_empty() {
            return Ok(());
        }
        let shown: Vec<_> = self.unstable.iter().take(10).map(|p| escape(p)).collect();
        let more = match self.unstable.len() {
            n if n > 10 => format!(" and {} more", n - 10),
            _ => String::new(),
        };
        Err(Error::Incomplete {
            message: format!(
                "the migration finished, but {} file(s) kept changing and could not be captured consistently, so they were not sent: {}{more}; run ferry send again when the app is idle to send them",
                self.unstable.len(),
                shown.join(", ")
            ),
            unstable: self.unstable.clone(),
            unrepresentable: Vec::new(),
        })
    }
}

impl std::ops::Deref for SendSummary {
    type Target = Totals;

    fn deref(&self) -> &Totals {
        &self.totals
    }
}
