//! The new device's side: find the sender, pair (or reconnect by its pinned key), receive, and
//! keep reconnecting after link loss until the migration is verified and committed.

mod find;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_sync::driver::RecvEnd;
use ferry_sync::manifest::{ChunkHash, ManifestSummary};
use ferry_sync::proto::{ReceiverConfig, RecvEvent};
use ferry_sync::store::{FsStore, StoreError};
use ferry_sync::Manifest;
use ferry_transport::{
    close, ConnectionError, Endpoint, FerryDirs, PairingCode, PeerConnection, PeerInfo, Ticket,
    VarInt,
};
use serde::Serialize;

use crate::device::{self, Pinning};
use crate::error::{from_drive, interruption, Error, ErrorKind};
use crate::event::{End, Event, ManifestInfo, PeerEvent, RoundInfo, RoundReason, Totals};
use crate::handle::{self, Control, Emitter, Events, Handle};
use crate::send::stopped;
use crate::session;
use crate::{CodePrompt, SenderChooser};
use find::SenderAt;

/// Said when the receiver is stopped before the end.
pub(crate) const STOPPED: &str =
    "stopped; everything verified so far is kept: run the same command to continue";
/// Least and most memory a manifest may take here (see [`receiver_config`]).
const MANIFEST_MEMORY_FLOOR: u64 = 256 << 20;
const MANIFEST_MEMORY_CAP: u64 = 4 << 30;
/// How long the receiver tries to tell a sender that missed its Done (a sender that already
/// exited cannot be told; the receiver must not hang on it).
const CONFIRM_WITHIN: Duration = Duration::from_secs(15);
/// Least time between two progress events.
const PROGRESS_EVERY: Duration = Duration::from_millis(100);

/// ferry's state folder inside a destination.
pub(crate) fn state_dir(dest: &Path) -> PathBuf {
    dest.join(ferry_sync::path::STATE_DIR)
}

/// A receiver: build it with [`crate::Migration::receive`], then [`ReceiveBuilder::start`].
#[derive(Clone)]
#[must_use = "a builder does nothing until started"]
pub struct ReceiveBuilder {
    dest: PathBuf,
    code: Option<PairingCode>,
    connect: Option<Vec<SocketAddr>>,
    ticket: Option<Ticket>,
    accept_nonempty: bool,
    verify_at_end: bool,
    give_up: Duration,
    name: Option<String>,
    dirs: Option<FerryDirs>,
    pairing_ttl: Duration,
    prompt: Option<Arc<dyn CodePrompt>>,
    from: Option<String>,
    chooser: Option<Arc<dyn SenderChooser>>,
}

impl std::fmt::Debug for ReceiveBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The code and ticket are secrets until used.
        f.debug_struct("ReceiveBuilder")
            .field("dest", &self.dest)
            .field("connect", &self.connect)
            .field("give_up", &self.give_up)
            .finish_non_exhaustive()
    }
}

impl ReceiveBuilder {
    pub(crate) fn new(dest: impl Into<PathBuf>) -> Self {
        ReceiveBuilder {
            dest: dest.into(),
            code: None,
            connect: None,
            ticket: None,
            accept_nonempty: false,
            verify_at_end: false,
            give_up: Duration::from_secs(3600),
            name: None,
            dirs: None,
            pairing_ttl: ferry_transport::DEFAULT_PAIRING_TTL,
            prompt: None,
            from: None,
            chooser: None,
        }
    }

    /// The pairing code shown on the old device.
    pub fn code(mut self, code: PairingCode) -> Self {
        self.code = Some(code);
        self
    }
    /// Connect to the sender at these addresses (only these) instead of looking for it.
    pub fn connect(mut self, addrs: Vec<SocketAddr>) -> Self {
        self.connect = Some(addrs);
        self
    }
    /// Connect and pair with the ticket shown on the old device.
    pub fn ticket(mut self, ticket: Ticket) -> Self {
        self.ticket = Some(ticket);
        self
    }
    /// Receive into a folder that already holds other files (never deleted; files at the
    /// same paths are replaced).
    pub fn accept_nonempty(mut self, yes: bool) -> Self {
        self.accept_nonempty = yes;
        self
    }
    /// Re-read and re-hash every file from disk before it is moved into place (default off:
    /// chunks were verified on arrival and made durable before they counted, so only files
    /// journaled by an earlier, interrupted run are read back; see `ferry_sync::store`).
    /// [`ReceiveSummary::read_back_bytes`] says how much was read.
    pub fn verify_at_end(mut self, yes: bool) -> Self {
        self.verify_at_end = yes;
        self
    }
    /// Give up reconnecting after this long without a connection (default one hour).
    pub fn give_up_after(mut self, d: Duration) -> Self {
        self.give_up = d;
        self
    }
    /// The name the other device sees.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }
    /// This device's state folders (default: [`FerryDirs::from_env`]).
    pub fn dirs(mut self, dirs: FerryDirs) -> Self {
        self.dirs = Some(dirs);
        self
    }
    /// A paired sender unused this long needs the code again (default 30 days).
    pub fn pairing_ttl(mut self, ttl: Duration) -> Self {
        self.pairing_ttl = ttl;
        self
    }
    /// Who to ask for the code when one is needed and none was given (the CLI asks on the
    /// terminal). Without one, a needed code is an [`Error::Usage`].
    pub fn prompt(mut self, prompt: Arc<dyn CodePrompt>) -> Self {
        self.prompt = Some(prompt);
        self
    }

    /// Among the senders found on the local network, the one with this name (or the paired
    /// device with this name or id).
    pub fn from(mut self, which: impl Into<String>) -> Self {
        self.from = Some(which.into());
        self
    }
    /// Who picks the sender when several are found on the local network and none is paired
    /// with this device (the CLI asks on the terminal). Without one, that is an
    /// [`Error::Usage`] listing them (after a `candidates` event).
    pub fn chooser(mut self, chooser: Arc<dyn SenderChooser>) -> Self {
        self.chooser = Some(chooser);
        self
    }

    /// Starts the receiver on the current tokio runtime.
    pub fn start(self) -> (Handle<ReceiveSummary>, Events) {
        handle::spawn(move |em, ctl| async move {
            let r = run(self, &em, ctl).await;
            em.flush().await;
            r
        })
    }
}

/// What a receiver's migration did (the `done` event of the receiver).
#[derive(Clone, Debug, Serialize)]
#[non_exhaustive]
pub struct ReceiveSummary {
    /// What both ends report.
    #[serde(flatten)]
    pub totals: Totals,
    /// Bytes already here and verified when the first round started.
    pub resumed_bytes: u64,
    /// Bytes read back from disk and re-hashed before files moved into place: 0 for a
    /// migration received in one run, the files an interrupted run had journaled after a
    /// resume, everything with [`ReceiveBuilder::verify_at_end`].
    pub read_back_bytes: u64,
    /// Connections lost and re-made.
    pub interruptions: u32,
    /// The sender's name.
    pub sender: String,
    /// Every entry of the history is here (`false`: some are `unrepresentable`).
    pub complete: bool,
    /// Entries the destination's file system cannot hold (symlinks on exFAT or FAT): named
    /// before anything was written, left out by design, listed with the receipt.
    pub unrepresentable: Vec<String>,
}

/// Refuses a non-empty destination that is not ferry's, unless `yes`.
fn check_dest(dest: &Path, yes: bool) -> Result<(), Error> {
    let rd = match std::fs::read_dir(dest) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(Error::with_cause(
                ErrorKind::Destination,
                format!("cannot read {}: {e}", dest.display()),
                Some(e.into()),
            ))
        }
    };
    let mut others = 0;
    let mut ferry = false;
    for ent in rd.flatten() {
        if ent.file_name() == ferry_sync::path::STATE_DIR {
            ferry = true;
        } else {
            others += 1;
        }
    }
    if others > 0 && !ferry && !yes {
        return Err(Error::new(
            ErrorKind::Destination,
            format!(
                "{} is not empty and holds no ferry migration; choose an empty folder, or pass --yes to receive into it \
                 (ferry never deletes files it did not bring, but replaces files at the same paths)",
                dest.display()
            ),
        ));
    }
    Ok(())
}

/// The receiver's configuration for the next session on `dest`: a memory budget for the
/// manifest of half the memory available now, at least 256 MiB and at most 4 GiB (1 GiB when
/// the system does not say), and the room at the destination that the declared file sizes are
/// checked against while the manifest streams in. That room is the free space when DEST holds
/// nothing yet; when it holds files (an earlier round, staged chunks, or files received into
/// with `accept_nonempty`) the store may reuse them, so the space those could occupy —
/// everything in use on that file system — is added, and the store's exact check after the
/// manifest decides.
fn receiver_config(dest: &Path) -> ReceiverConfig {
    let mut cfg = ReceiverConfig::default();
    cfg.limits.max_memory = ferry_sync::platform::available_memory()
        .map_or(ferry_sync::manifest::DEFAULT_MANIFEST_MEMORY, |m| {
            (m / 2).clamp(MANIFEST_MEMORY_FLOOR, MANIFEST_MEMORY_CAP)
        });
    cfg.limits.available_space = ferry_sync::platform::fs_space(dest).map(|sp| {
        let empty = std::fs::read_dir(dest)
            .map(|rd| {
                rd.flatten()
                    .all(|e| e.file_name() == ferry_sync::path::STATE_DIR)
            })
            .unwrap_or(false);
        if empty && !FsStore::has_leftovers(dest) && !FsStore::has_receipt(dest) {
            sp.available
        } else {
            sp.available.saturating_add(sp.used)
        }
    });
    // Nothing of any history here: chunks may flow while the manifest streams in.
    cfg.stream = FsStore::is_fresh(dest);
    cfg
}

/// Opens the destination's store (one receiver at a time).
fn open_store(dest: &Path, verify_at_end: bool) -> Result<Arc<FsStore>, Error> {
    let store = FsStore::open(dest).map(|s| Arc::new(s.verify_at_end(verify_at_end)));
    store.map_err(|e| match e {
        StoreError::Locked(_) => Error::with_cause(
            ErrorKind::Destination,
            format!("another ferry receive is already using {}", dest.display()),
            Some(e.into()),
        ),
        other => Error::from(other),
    })
}

/// Runs the receiver until the migration is complete.
async fn run(o: ReceiveBuilder, em: &Emitter, ctl: Arc<Control>) -> Result<ReceiveSummary, Error> {
    let started = Instant::now();
    let dirs = match &o.dirs {
        Some(d) => d.clone(),
        None => device::dirs_from_env()?,
    };
    check_dest(&o.dest, o.accept_nonempty)?;
    let store = open_store(&o.dest, o.verify_at_end)?;
    if FsStore::has_unfinished(&o.dest) {
        em.emit(Event::Unfinished).await;
    } else if FsStore::has_receipt(&o.dest) {
        em.emit(Event::FinishedHere).await;
    }
    let pinning = Pinning {
        ttl: o.pairing_ttl,
        serve_only: None,
    };
    let ep = device::endpoint_with(
        &dirs,
        o.name.as_deref(),
        None,
        ferry_transport::Congestion::default(),
        &pinning,
    )?;
    let (conn, mut at) = match wait_for_sender(&ep, &o, em, &ctl, started).await? {
        Found::Sender(conn, at) => (conn, at),
        Found::AlreadyComplete(s) => return Ok(s),
    };
    let sender = conn.peer().clone();
    find::remember_sender(&o.dest, &sender.device_id);
    at.add(sender.addr);
    em.emit(Event::Paired(PeerEvent {
        peer: sender.name.clone(),
        device_id: sender.device_id,
        addr: sender.addr,
        newly_paired: conn.newly_paired(),
        paired_at: sender.paired_at,
        role: sender.role,
    }))
    .await;
    let mut r = Receiving {
        o,
        em,
        ctl,
        ep,
        store,
        sender,
        at,
        // The migration's time: not the time spent finding the sender or at the code prompt.
        started: Instant::now(),
        rounds: 0,
        wire_bytes: 0,
        catchup_wire_bytes: 0,
        interruptions: 0,
        resumed: 0,
        first: None,
    };
    r.receive(conn).await
}

/// What looking for the sender came to.
enum Found {
    Sender(PeerConnection, SenderAt),
    /// The sender is gone, but DEST already holds the finished migration.
    AlreadyComplete(ReceiveSummary),
}

/// Whether a failure to reach the sender may be a sender not started yet (worth waiting for).
fn not_there_yet(e: &Error) -> bool {
    use ferry_transport::ConnectError;
    e.kind() == ErrorKind::Unreachable
        && match e.cause() {
            None => true,
            Some(crate::Cause::Connect(c)) => matches!(
                c,
                ConnectError::Timeout | ConnectError::AllFailed(_) | ConnectError::Refused(_)
            ),
            Some(_) => false,
        }
}

/// The first connection to the sender. A sender that is not there yet (the receiver was
/// started first) is waited for, up to `give_up_after`, after saying so; a destination that
/// already holds the finished migration from an unreachable sender is complete.
async fn wait_for_sender(
    ep: &Endpoint,
    o: &ReceiveBuilder,
    em: &Emitter,
    ctl: &Control,
    started: Instant,
) -> Result<Found, Error> {
    let mut stop = ctl.stop_signal();
    let mut waiting = false;
    loop {
        let first = tokio::select! {
            r = find::first_connection(ep, o, em, waiting) => r,
            () = stopped(&mut stop) => Err(Error::new(ErrorKind::Interrupted, STOPPED)),
        };
        let f = match first {
            Ok((conn, at)) => return Ok(Found::Sender(conn, at)),
            Err(f) if f.kind() == ErrorKind::Unreachable => f,
            Err(f) => return Err(f),
        };
        if !waiting {
            if let Some(s) = complete_without_sender(&o.dest, &f, started, em).await {
                return Ok(Found::AlreadyComplete(s));
            }
        }
        if !not_there_yet(&f) || started.elapsed() >= o.give_up {
            return Err(f);
        }
        if !waiting {
            waiting = true;
            em.emit(Event::Waiting {
                reason: f.message().to_string(),
                give_up_s: o.give_up.as_secs(),
            })
            .await;
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
            () = stopped(&mut stop) => return Err(Error::new(ErrorKind::Interrupted, STOPPED)),
        }
    }
}

/// The sender cannot be reached, but DEST holds a finished migration from it: a receipt,
/// nothing unfinished, and every file matches the receipt when hashed again now. This is the
/// receiver killed after it confirmed the last round (the sender then finished and exited)
/// and restarted: the migration is complete, so say so instead of "unreachable".
async fn complete_without_sender(
    dest: &Path,
    failed: &Error,
    started: Instant,
    em: &Emitter,
) -> Option<ReceiveSummary> {
    find::remembered_sender(dest)?;
    if FsStore::has_leftovers(dest) {
        return None;
    }
    let d = dest.to_path_buf();
    let report = tokio::task::spawn_blocking(move || ferry_sync::store::verify_dest(&d))
        .await
        .ok()?
        .ok()?;
    if !report.mismatched.is_empty() {
        return None;
    }
    let unrepresentable = report.omitted;
    em.emit(Event::AlreadyComplete {
        reason: failed.message().to_string(),
    })
    .await;
    let s = ReceiveSummary {
        totals: Totals {
            root: report.root,
            files: report.files,
            bytes: report.bytes,
            wire_bytes: 0,
            elapsed_s: started.elapsed().as_secs_f64(),
            rounds: 0,
            catchup_wire_bytes: 0,
            files_added: 0,
            files_changed: 0,
            files_removed: 0,
            end: End::Complete,
        },
        resumed_bytes: 0,
        read_back_bytes: 0,
        interruptions: 0,
        sender: String::new(),
        complete: unrepresentable.is_empty(),
        unrepresentable,
    };
    em.emit(Event::Received(s.clone())).await;
    Some(s)
}

/// What a receiving session came to.
enum Step {
    /// Go on with this connection (another round, or a new connection after a loss).
    Continue(PeerConnection),
    /// The migration ended.
    Done(ReceiveSummary),
}

/// A receiver with its sender: the state kept across rounds and connections.
struct Receiving<'e> {
    o: ReceiveBuilder,
    em: &'e Emitter,
    ctl: Arc<Control>,
    ep: Endpoint,
    store: Arc<FsStore>,
    sender: PeerInfo,
    at: SenderAt,
    started: Instant,
    /// Rounds verified.
    rounds: u32,
    wire_bytes: u64,
    catchup_wire_bytes: u64,
    interruptions: u32,
    resumed: u64,
    /// The tree of the first verified round (its receipt), to say what changed since.
    first: Option<Manifest>,
}

/// Notices when nothing has come from the sender for three keep-alives.
struct Silence {
    seen: u64,
    heard: Instant,
    said: bool,
}

impl Silence {
    fn new(conn: &PeerConnection) -> Self {
        Silence {
            seen: conn.quinn().stats().udp_rx.datagrams,
            heard: Instant::now(),
            said: false,
        }
    }

    /// The silence so far, once, when it reaches three keep-alives.
    fn check(&mut self, conn: &PeerConnection) -> Option<f64> {
        let now = conn.quinn().stats().udp_rx.datagrams;
        if now != self.seen {
            (self.seen, self.heard, self.said) = (now, Instant::now(), false);
            return None;
        }
        let silent = self.heard.elapsed();
        if self.said || silent < device::KEEP_ALIVE * 3 {
            return None;
        }
        self.said = true;
        Some((silent.as_secs_f64() * 10.0).round() / 10.0)
    }
}

/// What the session callbacks saw.
#[derive(Default)]
struct Seen {
    verified: AtomicBool,
    /// The link went silent: the rate starts again.
    stalled: AtomicBool,
    wire: AtomicU64,
    resumed: AtomicU64,
}

impl Receiving<'_> {
    async fn receive(&mut self, mut conn: PeerConnection) -> Result<ReceiveSummary, Error> {
        loop {
            match self.session(conn).await? {
                Step::Continue(c) => conn = c,
                Step::Done(s) => {
                    self.ep.close(close::DONE, b"done").await;
                    return Ok(s);
                }
            }
        }
    }

    /// The callback for the session's events: forwards them (progress at most every
    /// [`PROGRESS_EVERY`]) and notes what the loop needs.
    fn on_event<'a>(&'a self, seen: &'a Seen) -> impl FnMut(&RecvEvent) + 'a {
        let (round, em, wire_before) = (self.rounds + 1, self.em, self.wire_bytes);
        let mut files_total = 0u64;
        let mut last_progress: Option<Instant> = None;
        let mut rate = crate::progress::Rate::default();
        move |ev| match ev {
            RecvEvent::Manifest(m) => {
                files_total = m.files;
                em.emit_now(Event::Manifest(ManifestInfo {
                    files: m.files,
                    bytes: m.bytes,
                    chunks: m.unique_chunks,
                    root: m.root,
                    scan: None,
                }));
            }
            RecvEvent::Unrepresentable { paths, reason } => {
                em.emit_now(Event::Unrepresentable {
                    paths: paths.clone(),
                    reason: (*reason).to_string(),
                });
            }
            RecvEvent::Resumed {
                bytes_have,
                bytes_total,
            } => {
                if round == 1 {
                    seen.resumed.fetch_max(*bytes_have, Ordering::Relaxed);
                }
                em.emit_now(Event::Resumed {
                    bytes_have: *bytes_have,
                    bytes_total: *bytes_total,
                    round,
                });
            }
            RecvEvent::Progress {
                bytes_done,
                bytes_total,
                wire_bytes,
                files_done,
            } => {
                seen.wire.store(*wire_bytes, Ordering::Relaxed);
                let now = Instant::now();
                if bytes_done < bytes_total
                    && last_progress.is_some_and(|t| now - t < PROGRESS_EVERY)
                {
                    return;
                }
                last_progress = Some(now);
                if seen.stalled.swap(false, Ordering::Relaxed) {
                    rate.reset();
                }
                // What crossed in this session: bytes already here are never speed.
                rate.add(now, *wire_bytes);
                let rate_bps = rate.per_sec();
                em.emit_now(Event::Progress {
                    bytes_done: *bytes_done,
                    bytes_total: *bytes_total,
                    wire_bytes: wire_before + *wire_bytes,
                    files_total,
                    files_done: *files_done,
                    rate_bps,
                    eta_s: crate::progress::eta(bytes_total.saturating_sub(*bytes_done), rate_bps),
                    phase: crate::Phase::Receiving,
                });
            }
            RecvEvent::Done(m) => {
                seen.verified.store(true, Ordering::SeqCst);
                em.emit_now(Event::Verified {
                    round,
                    root: m.root,
                    files: Some(m.files),
                    bytes: Some(m.bytes),
                });
            }
            _ => {}
        }
    }

    /// One session on `conn`: runs it while watching for the sender answering elsewhere, a
    /// cut and a stop; then decides what follows.
    async fn session(&mut self, conn: PeerConnection) -> Result<Step, Error> {
        let seen = Seen::default();
        let mut at = std::mem::replace(&mut self.at, SenderAt::fixed(&[]));
        let (result, mut moved, stop_now) = self.run_session(&conn, &seen, &mut at).await;
        self.at = at;
        self.resumed = self.resumed.max(seen.resumed.load(Ordering::Relaxed));
        let wire_before = self.wire_bytes;
        self.wire_bytes += seen.wire.load(Ordering::Relaxed);
        if self.rounds > 0 {
            self.catchup_wire_bytes += self.wire_bytes - wire_before;
        }
        if stop_now {
            return self.stopped(&seen).await;
        }
        if result.is_ok() {
            if let Some(c) = moved.take() {
                c.close(close::REPLACED, b"not needed");
            }
        }
        match result {
            Ok(end) => self.ended(conn, end).await,
            Err(e) if e.is_retryable() => {
                self.interruptions += 1;
                self.em
                    .emit(Event::Interrupted {
                        message: interruption(&e),
                        wire_bytes: self.wire_bytes,
                    })
                    .await;
                let c = match moved.take() {
                    Some(c) => {
                        self.at.add(c.peer().addr);
                        self.em
                            .emit(Event::Reconnected {
                                addr: c.peer().addr,
                            })
                            .await;
                        c
                    }
                    None => {
                        let stop = self.ctl.stop_signal();
                        find::reconnect(
                            &self.ep,
                            self.sender.device_id,
                            &mut self.at,
                            self.o.give_up,
                            self.em,
                            stop,
                        )
                        .await?
                    }
                };
                Ok(Step::Continue(c))
            }
            Err(e) => Err(from_drive(e)),
        }
    }

    /// Runs the session, watching for the sender answering elsewhere (`moved`), a cut and a
    /// stop (`true` when stopped).
    async fn run_session(
        &self,
        conn: &PeerConnection,
        seen: &Seen,
        at: &mut SenderAt,
    ) -> (
        Result<RecvEnd, ferry_sync::driver::DriveError>,
        Option<PeerConnection>,
        bool,
    ) {
        let mut moved: Option<PeerConnection> = None;
        let mut stop_now = false;
        let fut = session::receive_round(
            conn,
            Arc::clone(&self.store),
            receiver_config(&self.o.dest),
            self.on_event(seen),
        );
        tokio::pin!(fut);
        let elsewhere = find::sender_elsewhere(&self.ep, self.sender.device_id, at, conn, self.em);
        tokio::pin!(elsewhere);
        let mut stop = self.ctl.stop_signal();
        let mut silence = Silence::new(conn);
        let mut tick = tokio::time::interval(device::KEEP_ALIVE);
        loop {
            tokio::select! {
                r = &mut fut => return (r, moved, stop_now),
                _ = tick.tick() => {
                    if let Some(silent_s) = silence.check(conn) {
                        seen.stalled.store(true, Ordering::Relaxed);
                        self.em.emit_now(Event::Stalled { silent_s });
                    }
                }
                c = &mut elsewhere, if moved.is_none() => {
                    // The old path is dead (the sender took the new connection in its place):
                    // end this session, which commits what it verified, and go on over the
                    // new one.
                    conn.close(close::REPLACED, b"the sender answers at another address");
                    moved = Some(c);
                }
                () = self.ctl.cut.notified() => conn.close(close::LINK_CUT, b"link cut on request"),
                () = stopped(&mut stop), if !stop_now => {
                    stop_now = true;
                    if seen.verified.load(Ordering::SeqCst) {
                        // This round is verified and committed: stopping now (following, or
                        // waiting for the sender's verdict) leaves a complete tree.
                        conn.close(close::RECEIVER_STOPPED, b"receiver stopped");
                    } else {
                        // Let the session commit what it verified, then stop.
                        conn.close(close::STOPPED, b"receiver stopped");
                    }
                }
            }
        }
    }

    /// Stopped during a session: with a verified round, the migration ends there.
    async fn stopped(&mut self, seen: &Seen) -> Result<Step, Error> {
        if !seen.verified.load(Ordering::SeqCst) {
            return Err(Error::new(ErrorKind::Interrupted, STOPPED));
        }
        self.rounds += 1;
        let m = ferry_sync::store::receipt_summary(&self.o.dest)?;
        Ok(Step::Done(
            self.finish(m.root, m.files, m.bytes, End::Stopped).await,
        ))
    }

    /// A session that ended well: another round follows, or the migration is complete.
    async fn ended(&mut self, conn: PeerConnection, end: RecvEnd) -> Result<Step, Error> {
        let verified = end.summary().is_some();
        if verified {
            self.rounds += 1;
        }
        // The first verified tree, to say at the end what changed since: only needed when
        // another round follows (a manifest's worth of memory per file otherwise).
        if verified && self.first.is_none() && end.more_rounds() {
            self.first = ferry_sync::store::read_receipt(&self.o.dest).ok();
        }
        let (m, confirmed): (ManifestSummary, bool) = match end {
            RecvEnd::Next(m) => {
                let mut r = RoundInfo::new(self.rounds + 1, RoundReason::Changed);
                (r.verified_root, r.verified_files) = (Some(m.root), Some(m.files));
                self.em.emit(Event::Round(r)).await;
                return Ok(Step::Continue(conn));
            }
            RecvEnd::Restarted => {
                let r = RoundInfo::new(self.rounds + 1, RoundReason::SourceChanged);
                self.em.emit(Event::Round(r)).await;
                return Ok(Step::Continue(conn));
            }
            RecvEnd::Final(m) => (m, true),
            RecvEnd::Unconfirmed(m) => (m, false),
        };
        // Wait for the sender's close in every case: it closes once it has read the end of our
        // control stream, and exiting before that (dropping the connection) can lose that end:
        // the sender would then think the final round unconfirmed and serve on.
        let sender_closed = sender_confirmed(&conn).await;
        if !confirmed && !sender_closed {
            // Our Done may have gone to a sender that died as we finished; a restarted sender
            // would then serve forever. A new session finds the receipt and tells it at once.
            let confirm = self.confirm_again();
            if !tokio::time::timeout(CONFIRM_WITHIN, confirm)
                .await
                .unwrap_or(false)
            {
                self.em.emit(Event::Unconfirmed).await;
            }
        }
        Ok(Step::Done(
            self.finish(m.root, m.files, m.bytes, End::Complete).await,
        ))
    }

    /// Tells a sender that may have missed our Done (it was restarted as we finished) that the
    /// migration is complete: reconnect, run a session (the store finds its receipt), wait for
    /// the sender's close. Best effort (bounded by the caller): everything here is already
    /// verified and committed.
    async fn confirm_again(&mut self) -> bool {
        loop {
            let stop = self.ctl.stop_signal();
            let Ok(conn) = find::reconnect(
                &self.ep,
                self.sender.device_id,
                &mut self.at,
                CONFIRM_WITHIN,
                self.em,
                stop,
            )
            .await
            else {
                return false;
            };
            let cfg = receiver_config(self.store.dest());
            let ok = session::receive_round(&conn, Arc::clone(&self.store), cfg, |_| {})
                .await
                .is_ok();
            if ok && sender_confirmed(&conn).await {
                return true;
            }
        }
    }

    /// The summary of the finished migration, emitted as `done`.
    async fn finish(&self, root: ChunkHash, files: u64, bytes: u64, end: End) -> ReceiveSummary {
        // One round: nothing changed since the first (and its tree was not kept).
        let diff = match &self.first {
            Some(f) => ferry_sync::store::read_receipt(&self.o.dest)
                .map(|last| f.diff(&last, 0))
                .unwrap_or_default(),
            None => Default::default(),
        };
        // What finalize left out, as listed with the receipt it wrote.
        let unrepresentable = ferry_sync::store::read_omitted(&self.o.dest).unwrap_or_default();
        let s = ReceiveSummary {
            totals: Totals {
                root,
                files,
                bytes,
                wire_bytes: self.wire_bytes,
                elapsed_s: self.started.elapsed().as_secs_f64(),
                rounds: self.rounds,
                catchup_wire_bytes: self.catchup_wire_bytes,
                files_added: diff.added,
                files_changed: diff.changed,
                files_removed: diff.removed,
                end,
            },
            resumed_bytes: self.resumed,
            read_back_bytes: self.store.bytes_read_back(),
            interruptions: self.interruptions,
            sender: self.sender.name.clone(),
            complete: unrepresentable.is_empty(),
            unrepresentable,
        };
        self.em.emit(Event::Received(s.clone())).await;
        s
    }
}

/// Waits (briefly) for the sender to close the connection saying it saw our Done.
async fn sender_confirmed(conn: &PeerConnection) -> bool {
    match tokio::time::timeout(Duration::from_secs(3), conn.closed()).await {
        Ok(ConnectionError::ApplicationClosed(c)) => {
            c.error_code == VarInt::from_u32(close::COMPLETE)
        }
        _ => false,
    }
}

impl ReceiveSummary {
    /// `Err(Error::Incomplete)` when entries the destination cannot hold (symlinks on exFAT)
    /// were left out: everything else is here and verified.
    pub fn completeness(&self) -> Result<(), Error> {
        if self.unrepresentable.is_empty() {
            return Ok(());
        }
        Err(Error::Incomplete {
            message: format!(
                "the migration finished and everything else is verified, but the destination's file system cannot hold symlinks (exFAT, FAT), so {} symlink(s) were not created: {}; receive onto a drive formatted with a file system that has symlinks to keep them",
                self.unrepresentable.len(),
                crate::text::escape_list(&self.unrepresentable, 10)
            ),
            unstable: Vec::new(),
            unrepresentable: self.unrepresentable.clone(),
        })
    }
}

impl std::ops::Deref for ReceiveSummary {
    type Target = Totals;

    fn deref(&self) -> &Totals {
        &self.totals
    }
}
