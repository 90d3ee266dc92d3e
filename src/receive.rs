//! `ferry receive`: find the sender, pair (or reconnect by pinned key), receive, and keep
//! reconnecting after link loss until the migration is verified and committed.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_sync::driver::RecvEnd;
use ferry_sync::proto::{ReceiverConfig, RecvEvent};
use ferry_sync::store::{FsStore, StoreError};
use ferry_transport::{
    ConnectError, ConnectionError, DeviceId, DiscoveredSender, Discovery, DiscoveryError, Endpoint,
    FerryDirs, MdnsConfig, MdnsDiscovery, PairingCode, PairingError, PeerConnection, PeerRole,
    Ticket, VarInt,
};
use serde_json::json;

use crate::common;
use crate::exit::{self, Exit, Failure};
use crate::output::{escape, human_bytes, Reporter};
use ferry::session;

/// Said when Ctrl-C stops this side.
const STOPPED: &str =
    "stopped; everything verified so far is kept: run the same command to continue";

pub struct ReceiveSettings {
    pub dest: PathBuf,
    pub code: Option<PairingCode>,
    pub connect: Option<Vec<SocketAddr>>,
    pub ticket: Option<Ticket>,
    pub yes: bool,
    pub give_up: Duration,
    pub name: Option<String>,
    pub dirs: FerryDirs,
    /// `ferry demo`: drop the link once when this fraction has arrived.
    pub interrupt_at: Option<f64>,
    /// `--pairing-ttl`: a paired sender unused this long needs the code again.
    pub pairing_ttl: Duration,
}

#[derive(Debug, Default)]
pub struct ReceiveSummary {
    pub files: u64,
    pub bytes: u64,
    pub wire_bytes: u64,
    pub resumed_bytes: u64,
    pub interruptions: u32,
    pub elapsed: Duration,
    pub root: String,
    pub sender: String,
    /// Rounds verified (1 without catch-up).
    pub rounds: u32,
    /// Chunk payload received after the first verified round.
    pub catchup_wire_bytes: u64,
}

const SENDER_FILE: &str = "sender";

/// Refuses a non-empty destination that is not ferry's, unless `yes`.
fn check_dest(dest: &Path, yes: bool) -> Result<(), Failure> {
    let rd = match std::fs::read_dir(dest) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(Failure::new(
                Exit::Destination,
                format!("cannot read {}: {e}", dest.display()),
            ))
        }
    };
    let mut others = 0;
    let mut ferry = false;
    for ent in rd.flatten() {
        if ent.file_name() == ".ferry" {
            ferry = true;
        } else {
            others += 1;
        }
    }
    if others > 0 && !ferry && !yes {
        return Err(Failure::new(
            Exit::Destination,
            format!(
                "{} is not empty and holds no ferry migration; choose an empty folder, or pass --yes to receive into it \
                 (ferry never deletes files it did not bring, but replaces files at the same paths)",
                dest.display()
            ),
        ));
    }
    Ok(())
}

/// Least and most memory a manifest may take here (see [`receiver_config`]).
const MANIFEST_MEMORY_FLOOR: u64 = 256 << 20;
const MANIFEST_MEMORY_CAP: u64 = 4 << 30;

/// The receiver's configuration for the next session on `dest`: a memory budget for the
/// manifest of half the memory available now, at least 256 MiB and at most 4 GiB (1 GiB when
/// the system does not say), and the room at the destination that the declared file sizes are
/// checked against while the manifest streams in. That room is the free space when DEST holds
/// nothing yet; when it holds files (an earlier round, staged chunks, or files received into
/// with --yes) the store may reuse them, so the space those could occupy — everything in use on
/// that file system — is added, and the store's exact check after the manifest decides.
fn receiver_config(dest: &Path) -> ReceiverConfig {
    let mut cfg = ReceiverConfig::default();
    cfg.limits.max_memory = ferry_sync::platform::available_memory()
        .map_or(ferry_sync::manifest::DEFAULT_MANIFEST_MEMORY, |m| {
            (m / 2).clamp(MANIFEST_MEMORY_FLOOR, MANIFEST_MEMORY_CAP)
        });
    cfg.limits.available_space = ferry_sync::platform::fs_space(dest).map(|sp| {
        let empty = std::fs::read_dir(dest)
            .map(|rd| rd.flatten().all(|e| e.file_name() == ".ferry"))
            .unwrap_or(false);
        if empty && !FsStore::has_leftovers(dest) && !FsStore::has_receipt(dest) {
            sp.available
        } else {
            sp.available.saturating_add(sp.used)
        }
    });
    cfg
}

fn remembered_sender(dest: &Path) -> Option<DeviceId> {
    let s = std::fs::read_to_string(dest.join(".ferry").join(SENDER_FILE)).ok()?;
    s.lines().next()?.trim().parse().ok()
}

fn remember_sender(dest: &Path, id: &DeviceId) {
    let _ = ferry_sync::private::write(
        &dest.join(".ferry").join(SENDER_FILE),
        format!("{id}\n").as_bytes(),
    );
}

fn connect_failure(e: ConnectError) -> Failure {
    match e {
        ConnectError::Pairing(PairingError::WrongCode) => Failure::new(
            Exit::Pairing,
            "pairing failed: the code was wrong (or someone tried to intercept the connection). \
             The old device now shows a new code; run the command again with it",
        ),
        ConnectError::Pairing(p) => Failure::new(Exit::Pairing, format!("pairing failed: {p}")),
        e @ (ConnectError::UnknownPeer(_) | ConnectError::NotUsable { .. }) => Failure::new(
            Exit::Pairing,
            format!("{e}; pass the code shown by `ferry send` on that device (--code) or its --ticket"),
        ),
        other => Failure::new(
            Exit::Unreachable,
            format!(
                "cannot reach the sender: {other}. Check that `ferry send` is running on the old device, \
                 that both are on the same network, or use its --ticket; `ferry doctor` helps"
            ),
        ),
    }
}

/// How long a first connection keeps retrying a sender that refuses new connections for now.
const REFUSED_RETRY_FOR: Duration = Duration::from_secs(30);

/// Runs `attempt` again, with backoff, while the sender answers but refuses new connections
/// for now (it is busy with half-finished handshakes, e.g. of this receiver's earlier runs
/// that were killed): a busy sender is not an unreachable one. Anything else is returned.
async fn unless_refused<F, Fut>(mut attempt: F) -> Result<PeerConnection, ConnectError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<PeerConnection, ConnectError>>,
{
    let until = Instant::now() + REFUSED_RETRY_FOR;
    let mut wait = Duration::from_millis(100);
    loop {
        match attempt().await {
            Err(ConnectError::Refused(why)) if Instant::now() + wait < until => {
                tracing::info!(
                    ?why,
                    "the sender refused a new connection for now; retrying"
                );
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(2));
            }
            r => return r,
        }
    }
}

/// The sender cannot be reached, but DEST holds a finished migration from it: a receipt,
/// nothing unfinished, and every file matches the receipt when hashed again now. This is the
/// receiver killed after it confirmed the last round (the sender then finished and exited)
/// and restarted: the migration is complete, so say so (exit 0) instead of "unreachable".
async fn complete_without_sender(
    s: &ReceiveSettings,
    failed: &Failure,
    started: Instant,
    rep: &Reporter,
) -> Option<ReceiveSummary> {
    let dest = s.dest.clone();
    remembered_sender(&dest)?;
    if FsStore::has_leftovers(&dest) {
        return None;
    }
    let report = tokio::task::spawn_blocking(move || ferry_sync::store::verify_dest(&dest))
        .await
        .ok()?
        .ok()?;
    if !report.mismatched.is_empty() {
        return None;
    }
    rep.say(&format!(
        "{}; but this folder already holds the finished migration from it (every file verified again just now). \
         If the old device changed since, run both commands again to send the changes",
        failed.message
    ));
    let mut summary = ReceiveSummary::default();
    finish_summary(
        &mut summary,
        &s.dest,
        None,
        report.files,
        report.bytes,
        report.root.to_hex(),
        started,
        &AtomicU64::new(0),
        rep,
        "complete",
    );
    Some(summary)
}

/// Where the sender can be reached.
struct SenderAt {
    /// The addresses it was reached at (the one it answered from is added once connected).
    addrs: Vec<SocketAddr>,
    /// Whether it was found on the local network (mDNS): then a reconnect that fails looks for
    /// it there again. A sender that moved to a new address (roaming, a new DHCP lease, a
    /// laptop that slept) announces the new one; QUIC cannot migrate the serving side, so the
    /// old connection is lost, and its pinned key tells it apart from other senders.
    browse: bool,
}

/// Addresses kept for reconnecting: a roaming sender adds one per move.
const MAX_SENDER_ADDRS: usize = 16;

impl SenderAt {
    fn fixed(addrs: &[SocketAddr]) -> Self {
        SenderAt {
            addrs: addrs.to_vec(),
            browse: false,
        }
    }

    /// Adds `a` unless known (the oldest goes when there are too many); whether it was new.
    fn add(&mut self, a: SocketAddr) -> bool {
        if self.addrs.contains(&a) {
            return false;
        }
        if self.addrs.len() >= MAX_SENDER_ADDRS {
            self.addrs.remove(0);
        }
        self.addrs.push(a);
        true
    }
}

/// Browses the local network for ferry senders for `wait` (off the async threads).
async fn discover(
    wait: Duration,
) -> Result<Result<Vec<DiscoveredSender>, DiscoveryError>, tokio::task::JoinError> {
    tokio::task::spawn_blocking(move || MdnsDiscovery::new(&MdnsConfig::default())?.browse(wait))
        .await
}

/// Looks for ferry senders on the local network for a moment: their addresses (every sender's;
/// the pinned key picks ours when connecting).
async fn browse_senders(wait: Duration) -> Vec<SocketAddr> {
    let found = discover(wait)
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()));
    match found {
        Ok(senders) => senders.into_iter().flat_map(|d| d.addrs).collect(),
        Err(e) => {
            tracing::info!("local-network discovery failed: {e}");
            Vec::new()
        }
    }
}

async fn first_connection(
    ep: &Endpoint,
    s: &ReceiveSettings,
    rep: &Reporter,
) -> Result<(PeerConnection, SenderAt), Failure> {
    // Only a device paired as our sender, and not expired, is reached by its key alone.
    let usable = |id: &DeviceId| ep.usable(id, PeerRole::Sender).is_ok();
    let remembered = remembered_sender(&s.dest).filter(usable);
    if let Some(t) = &s.ticket {
        let conn = if usable(&t.device_id) {
            unless_refused(|| ep.connect_peer(t.device_id, &t.addrs)).await
        } else {
            unless_refused(|| ep.connect_ticket(t)).await
        };
        return conn
            .map(|c| (c, SenderAt::fixed(&t.addrs)))
            .map_err(connect_failure);
    }
    if let Some(addrs) = &s.connect {
        if let Some(code) = s.code {
            // Re-running the same command after an interruption: the code was used up by the
            // first pairing, but DEST remembers the (pinned) sender — reconnect by its key and
            // use the code only if that device is not the one listening there.
            if let Some(id) = remembered {
                if let Ok(c) = unless_refused(|| ep.connect_peer(id, addrs)).await {
                    rep.say("resuming the unfinished migration from the same sender (already paired; the code is not needed)");
                    return Ok((c, SenderAt::fixed(addrs)));
                }
            }
            return unless_refused(|| ep.connect_with_code(addrs, code))
                .await
                .map(|c| (c, SenderAt::fixed(addrs)))
                .map_err(connect_failure);
        }
        let peers = ep.peers().list();
        let pinned = remembered.or_else(|| {
            let senders: Vec<DeviceId> = peers.iter().map(|p| p.device_id).filter(usable).collect();
            (senders.len() == 1).then(|| senders[0])
        });
        if let Some(id) = pinned {
            return unless_refused(|| ep.connect_peer(id, addrs))
                .await
                .map(|c| (c, SenderAt::fixed(addrs)))
                .map_err(connect_failure);
        }
        // Paired devices that cannot be used without a code: say why, then ask for the code.
        let why: Vec<String> = peers
            .iter()
            .filter_map(|p| {
                let e = ep.usable(&p.device_id, PeerRole::Sender).err()?;
                Some(format!("{} ({}): {e}", p.name, p.device_id.short()))
            })
            .collect();
        let code = match common::prompt_code(&addrs[0].to_string()) {
            Err(_) if !why.is_empty() => {
                return Err(Failure::new(
                    Exit::Pairing,
                    format!(
                        "no paired device may send to this one without a code ({}); pass the code shown by `ferry send` (--code) or its --ticket",
                        why.join("; ")
                    ),
                ))
            }
            other => other?,
        };
        return unless_refused(|| ep.connect_with_code(addrs, code))
            .await
            .map(|c| (c, SenderAt::fixed(addrs)))
            .map_err(connect_failure);
    }
    if let Some(id) = remembered {
        rep.say("resuming the unfinished migration from the same sender");
        return unless_refused(|| ep.connect_peer(id, &[]))
            .await
            .map(|c| (c, SenderAt::fixed(&[])))
            .map_err(connect_failure);
    }
    rep.say("looking for senders on the local network…");
    let found = discover(Duration::from_secs(4))
        .await
        .map_err(|e| Failure::new(Exit::Internal, e.to_string()))?
        .map_err(|e| {
            Failure::new(
                Exit::Unreachable,
                format!("local-network discovery failed ({e}); use --ticket or --connect"),
            )
        })?;
    let sender = match found.as_slice() {
        [] => {
            return Err(Failure::new(
                Exit::Unreachable,
                "no sender found on this network (multicast may be blocked). Use the ticket shown by \
                 `ferry send` (--ticket) or its address (--connect HOST:PORT); `ferry doctor` explains what is blocked",
            ))
        }
        [one] => one.clone(),
        many => {
            let names: Vec<String> =
                many.iter().map(|d| format!("{} at {:?}", escape(&d.name), d.addrs)).collect();
            return Err(Failure::new(
                Exit::Usage,
                format!("several senders found: {}; choose one with --connect HOST:PORT", names.join("; ")),
            ));
        }
    };
    rep.say(&format!(
        "found {} at {:?}",
        escape(&sender.name),
        sender.addrs
    ));
    let code = match s.code {
        Some(c) => c,
        None => common::prompt_code(&sender.name)?,
    };
    ep.connect_with_code(&sender.addrs, code)
        .await
        .map(|c| {
            (
                c,
                SenderAt {
                    addrs: sender.addrs.clone(),
                    browse: true,
                },
            )
        })
        .map_err(connect_failure)
}

/// Runs the receiver until the migration is complete.
pub async fn run(s: ReceiveSettings, rep: &Reporter) -> Result<ReceiveSummary, Failure> {
    let started = Instant::now();
    check_dest(&s.dest, s.yes)?;
    let store = Arc::new(FsStore::open(&s.dest).map_err(|e| match e {
        StoreError::Locked(_) => Failure::new(
            Exit::Destination,
            format!(
                "another ferry receive is already using {}",
                s.dest.display()
            ),
        ),
        other => Failure::from(other),
    })?);
    if FsStore::has_unfinished(&s.dest) {
        rep.say("this folder holds an unfinished migration: continuing it");
    }
    let pinning = common::Pinning {
        ttl: s.pairing_ttl,
        serve_only: None,
    };
    let ep = common::endpoint_with(
        &s.dirs,
        s.name.as_deref(),
        None,
        ferry_transport::Congestion::default(),
        &pinning,
    )?;
    let (mut conn, mut at) = match first_connection(&ep, &s, rep).await {
        Ok(c) => c,
        Err(f) if f.exit == Exit::Unreachable => {
            return complete_without_sender(&s, &f, started, rep).await.ok_or(f);
        }
        Err(f) => return Err(f),
    };
    let sender = conn.peer().clone();
    remember_sender(&s.dest, &sender.device_id);
    at.add(sender.addr);
    rep.event("paired", json!({"peer": sender.name, "device_id": sender.device_id.to_string(), "addr": sender.addr.to_string(), "newly_paired": conn.newly_paired(),
        "paired_at": sender.paired_at, "role": sender.role.as_str()}));
    rep.say(&format!(
        "{} {} ({})",
        if conn.newly_paired() {
            "paired with"
        } else {
            "connected to"
        },
        escape(&sender.name),
        sender.device_id.short()
    ));

    let mut summary = ReceiveSummary {
        sender: sender.name.clone(),
        ..Default::default()
    };
    let wire = Arc::new(AtomicU64::new(0));
    let interrupted = Arc::new(AtomicBool::new(false));
    let resumed = Arc::new(AtomicU64::new(0));
    // The tree of the first verified round (its receipt), to say what changed since.
    let mut first: Option<ferry_sync::Manifest> = None;
    loop {
        let c2 = conn.clone();
        let round_no = summary.rounds + 1;
        let verified = Arc::new(AtomicBool::new(false));
        let verified2 = Arc::clone(&verified);
        let (wire2, int2, res2) = (
            Arc::clone(&wire),
            Arc::clone(&interrupted),
            Arc::clone(&resumed),
        );
        let interrupt_at = s.interrupt_at;
        let mut files_total = 0u64;
        let wire_before = summary.wire_bytes;
        let mut on_event = |ev: &RecvEvent| {
            match ev {
            RecvEvent::Manifest(m) => {
                files_total = m.files;
                rep.event("manifest", json!({"files": m.files, "bytes": m.bytes, "chunks": m.unique_chunks, "root": m.root.to_hex()}));
                rep.say(&format!(
                    "manifest: {} files, {}",
                    m.files,
                    human_bytes(m.bytes)
                ));
            }
            RecvEvent::Resumed {
                bytes_have,
                bytes_total,
            } => {
                rep.event(
                    "resumed",
                    json!({"bytes_have": bytes_have, "bytes_total": bytes_total, "round": round_no}),
                );
                if round_no == 1 {
                    res2.fetch_max(*bytes_have, Ordering::Relaxed);
                    rep.say(&format!(
                        "resuming: {} of {} already here and verified",
                        human_bytes(*bytes_have),
                        human_bytes(*bytes_total)
                    ));
                } else {
                    rep.say(&format!(
                        "catch-up round {round_no}: {} of {} already here",
                        human_bytes(*bytes_have),
                        human_bytes(*bytes_total)
                    ));
                }
            }
            RecvEvent::Wanted { .. } => {}
            RecvEvent::Progress {
                bytes_done,
                bytes_total,
                wire_bytes,
            } => {
                wire2.store(*wire_bytes, Ordering::Relaxed);
                rep.progress(
                    *bytes_done,
                    *bytes_total,
                    files_total,
                    wire_before + *wire_bytes,
                );
                if let Some(f) = interrupt_at {
                    if *bytes_total > 0
                        && *bytes_done as f64 >= f * *bytes_total as f64
                        && !int2.swap(true, Ordering::Relaxed)
                    {
                        rep.say("demo: cutting the link now to show resume");
                        c2.close(0x101, b"demo: simulated link drop");
                    }
                }
            }
            RecvEvent::Done(m) => {
                verified2.store(true, Ordering::SeqCst);
                rep.event("verified", json!({"round": round_no, "root": m.root.to_hex(), "files": m.files, "bytes": m.bytes}));
            }
            RecvEvent::Restarted => rep.say(
                "a file changed on the old device while it was being sent: continuing with its new state (what arrived is kept)",
            ),
            RecvEvent::Failed(_) => {}
        }
        };
        // A new connection to the sender found while this one was silent (it moved).
        let mut moved: Option<PeerConnection> = None;
        let result = {
            let fut = session::receive_with(
                &conn,
                Arc::clone(&store),
                receiver_config(&s.dest),
                &mut on_event,
            );
            tokio::pin!(fut);
            let elsewhere = sender_elsewhere(&ep, sender.device_id, &mut at, &conn, rep);
            tokio::pin!(elsewhere);
            loop {
                tokio::select! {
                r = &mut fut => break r,
                c = &mut elsewhere, if moved.is_none() => {
                    // The old path is dead (the sender took the new connection in its place):
                    // end this session, which commits what it verified, and go on over the new one.
                    conn.close(session::CLOSE_SUPERSEDED, b"the sender answers at another address");
                    moved = Some(c);
                }
                _ = tokio::signal::ctrl_c() => {
                    if verified.load(Ordering::SeqCst) {
                        // This round is verified and committed: stopping now (following, or
                        // waiting for the sender's verdict) leaves a complete tree.
                        conn.close(session::CLOSE_RECEIVER_STOPPED, b"receiver stopped");
                        let _ = fut.await;
                        rep.finish_progress();
                        summary.wire_bytes = wire_before + wire.swap(0, Ordering::Relaxed);
                        if summary.rounds > 0 {
                            summary.catchup_wire_bytes += summary.wire_bytes - wire_before;
                        }
                        summary.rounds += 1;
                        let m = ferry_sync::store::receipt_summary(&s.dest).map_err(Failure::from)?;
                        rep.say("stopped; the last round is verified and complete here");
                        finish_summary(&mut summary, &s.dest, first.as_ref(), m.files, m.bytes, m.root.to_hex(), started, &resumed, rep, "stopped");
                        ep.close(0, b"done").await;
                        return Ok(summary);
                    }
                    // Let the session commit what it verified, then stop.
                    conn.close(1, b"receiver stopped");
                    let _ = fut.await;
                    rep.finish_progress();
                    return Err(Failure::new(Exit::Interrupted, STOPPED));
                }
                }
            }
        };
        if result.is_ok() {
            if let Some(c) = moved.take() {
                c.close(session::CLOSE_SUPERSEDED, b"not needed");
            }
        }
        summary.wire_bytes = wire_before + wire.swap(0, Ordering::Relaxed);
        if summary.rounds > 0 {
            summary.catchup_wire_bytes += summary.wire_bytes - wire_before;
        }
        let result = match result {
            Ok(end) => {
                if end.summary().is_some() {
                    summary.rounds += 1;
                    if first.is_none() {
                        first = ferry_sync::store::read_receipt(&s.dest).ok();
                    }
                }
                match end {
                    RecvEnd::Next(m) => {
                        rep.finish_progress();
                        rep.event("round", json!({"round": summary.rounds + 1, "reason": "changed", "verified_root": m.root.to_hex()}));
                        rep.say(&format!(
                            "round {} verified ({} files); the old device has changes: catch-up round {}",
                            summary.rounds,
                            m.files,
                            summary.rounds + 1
                        ));
                        continue;
                    }
                    RecvEnd::Restarted => {
                        rep.finish_progress();
                        rep.event(
                            "round",
                            json!({"round": summary.rounds + 1, "reason": "source-changed"}),
                        );
                        continue;
                    }
                    RecvEnd::Final(m) => Ok((m, true)),
                    RecvEnd::Unconfirmed(m) => Ok((m, false)),
                }
            }
            Err(e) => Err(e),
        };
        match result {
            Ok((m, confirmed)) => {
                rep.finish_progress();
                // Wait for the sender's close in every case: it closes once it has read the end
                // of our control stream, and exiting before that (dropping the connection) can
                // lose that end — the sender would then think the final round unconfirmed and
                // serve on.
                let sender_closed = sender_confirmed(&conn).await;
                if !confirmed && !sender_closed {
                    // Our Done may have gone to a sender that died as we finished; a restarted
                    // sender would then serve forever. A new session finds the receipt and
                    // tells it at once.
                    let confirm = confirm_again(&ep, sender.device_id, &mut at, &store, rep);
                    if !tokio::time::timeout(CONFIRM_WITHIN, confirm)
                        .await
                        .unwrap_or(false)
                    {
                        rep.say(
                            "the sender did not confirm the end; everything here is verified: stop `ferry send` on the old device",
                        );
                    }
                }
                finish_summary(
                    &mut summary,
                    &s.dest,
                    first.as_ref(),
                    m.files,
                    m.bytes,
                    m.root.to_hex(),
                    started,
                    &resumed,
                    rep,
                    "complete",
                );
                ep.close(0, b"done").await;
                return Ok(summary);
            }
            Err(e) if e.is_retryable() => {
                summary.interruptions += 1;
                rep.say(&format!(
                    "connection lost ({}); reconnecting…",
                    escape(&e.to_string())
                ));
                rep.event(
                    "interrupted",
                    json!({"message": e.to_string(), "wire_bytes": summary.wire_bytes}),
                );
                conn = match moved.take() {
                    Some(c) => {
                        rep.say("reconnected");
                        at.add(c.peer().addr);
                        c
                    }
                    None => reconnect(&ep, sender.device_id, &mut at, s.give_up, rep).await?,
                };
            }
            Err(e) => {
                rep.finish_progress();
                return Err(exit::from_drive(&e));
            }
        }
    }
}

/// Fills in the summary of a finished migration and reports it (human line and `done` event).
#[allow(clippy::too_many_arguments)]
fn finish_summary(
    summary: &mut ReceiveSummary,
    dest: &Path,
    first: Option<&ferry_sync::Manifest>,
    files: u64,
    bytes: u64,
    root: String,
    started: Instant,
    resumed: &AtomicU64,
    rep: &Reporter,
    end: &str,
) {
    summary.files = files;
    summary.bytes = bytes;
    summary.root = root;
    summary.resumed_bytes = resumed.load(Ordering::Relaxed);
    summary.elapsed = started.elapsed();
    let diff = match (first, ferry_sync::store::read_receipt(dest)) {
        (Some(f), Ok(last)) => f.diff(&last, 0),
        _ => Default::default(),
    };
    rep.event("done", json!({"root": summary.root, "files": files, "bytes": bytes, "wire_bytes": summary.wire_bytes, "elapsed_s": summary.elapsed.as_secs_f64(),
        "rounds": summary.rounds, "catchup_wire_bytes": summary.catchup_wire_bytes, "files_added": diff.added, "files_changed": diff.changed, "files_removed": diff.removed, "end": end}));
    rep.say(&format!(
        "done: {} files, {} verified and committed in {} ({:.1} s, {} received)",
        files,
        human_bytes(bytes),
        dest.display(),
        summary.elapsed.as_secs_f64(),
        human_bytes(summary.wire_bytes)
    ));
    if summary.rounds > 1 {
        rep.say(&format!(
            "{} rounds: during the migration {} files were added, {} changed and {} removed on the old device; catch-up rounds brought {}",
            summary.rounds,
            diff.added,
            diff.changed,
            diff.removed,
            human_bytes(summary.catchup_wire_bytes)
        ));
    }
}

/// Waits (briefly) for the sender to close the connection saying it saw our Done.
async fn sender_confirmed(conn: &PeerConnection) -> bool {
    match tokio::time::timeout(Duration::from_secs(3), conn.closed()).await {
        Ok(ConnectionError::ApplicationClosed(c)) => {
            c.error_code == VarInt::from_u32(session::CLOSE_DONE)
        }
        _ => false,
    }
}

/// How long the receiver tries to tell a sender that missed its Done (a sender that already
/// exited cannot be told; the receiver must not hang on it).
const CONFIRM_WITHIN: Duration = Duration::from_secs(15);

/// How long the receiver listens for senders' local-network announcements when it looks for
/// its sender again.
const REBROWSE_FOR: Duration = Duration::from_millis(1500);

/// How long the link to the sender may be silent (not a datagram; both ends send keep-alives
/// every 0.5 s, see `common::endpoint_with`) before the receiver tries the sender's other
/// addresses.
const SILENT_FOR: Duration = Duration::from_secs(3);

/// How long a try at another address may take (a handshake on a working path takes one RTT).
const PROBE_WITHIN: Duration = Duration::from_secs(3);

/// Adds the addresses senders announce on the local network to `at` (when it was found there);
/// reports the new ones.
async fn rediscover(at: &mut SenderAt, rep: &Reporter) {
    if !at.browse {
        return;
    }
    let new: Vec<String> = browse_senders(REBROWSE_FOR)
        .await
        .into_iter()
        .filter(|a| at.add(*a))
        .map(|a| a.to_string())
        .collect();
    if !new.is_empty() {
        rep.event("sender_found", json!({ "addrs": new }));
        rep.say(&format!(
            "a sender announces itself at {}: trying there too",
            new.join(", ")
        ));
    }
}

/// One connection attempt to the sender at every known address; when it was found on the
/// local network, also looks for it there meanwhile and, when that shows new addresses,
/// starts again with them.
async fn attempt_once(
    ep: &Endpoint,
    id: DeviceId,
    at: &mut SenderAt,
    rep: &Reporter,
) -> Result<PeerConnection, ConnectError> {
    let connect = |addrs: Vec<SocketAddr>| async move { ep.connect_peer(id, &addrs).await };
    let mut attempt = Box::pin(connect(at.addrs.clone()));
    if !at.browse {
        return attempt.await;
    }
    let known = at.addrs.len();
    {
        let look = rediscover(at, rep);
        tokio::pin!(look);
        tokio::select! {
            r = &mut attempt => return r,
            () = &mut look => {}
        }
    }
    if at.addrs.len() != known {
        attempt = Box::pin(connect(at.addrs.clone()));
    }
    attempt.await
}

/// Resolves with a new connection to the sender when this one has gone silent for
/// [`SILENT_FOR`] and the sender answers at another of its addresses: it moved (roaming, a new
/// lease), and since QUIC cannot migrate the serving side the old connection would only end at
/// the idle timeout. A silent link to a sender with no other address (a blackout) is left to
/// recover by itself, keeping what is in flight. Never resolves otherwise.
async fn sender_elsewhere(
    ep: &Endpoint,
    id: DeviceId,
    at: &mut SenderAt,
    conn: &PeerConnection,
    rep: &Reporter,
) -> PeerConnection {
    let q = conn.quinn();
    let mut seen = q.stats().udp_rx.datagrams;
    let mut heard = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = q.stats().udp_rx.datagrams;
        if now != seen || heard.elapsed() < SILENT_FOR {
            if now != seen {
                seen = now;
                heard = Instant::now();
            }
            continue;
        }
        rediscover(at, rep).await;
        let current = q.remote_address();
        let others: Vec<SocketAddr> = at.addrs.iter().copied().filter(|a| *a != current).collect();
        if others.is_empty() || q.stats().udp_rx.datagrams != seen {
            continue;
        }
        tracing::info!(
            "no word from the sender for {:?}: trying {others:?}",
            heard.elapsed()
        );
        if let Ok(Ok(c)) = tokio::time::timeout(PROBE_WITHIN, ep.connect_peer(id, &others)).await {
            return c;
        }
    }
}

/// Tells a sender that may have missed our Done (it was restarted as we finished) that the
/// migration is complete: reconnect, run a session (the store finds its receipt), wait for the
/// sender's close. Best effort (bounded by the caller): everything here is already verified
/// and committed.
async fn confirm_again(
    ep: &Endpoint,
    id: DeviceId,
    at: &mut SenderAt,
    store: &Arc<FsStore>,
    rep: &Reporter,
) -> bool {
    loop {
        let Ok(conn) = reconnect(ep, id, at, CONFIRM_WITHIN, rep).await else {
            return false;
        };
        let ok = session::receive_with(
            &conn,
            Arc::clone(store),
            receiver_config(store.dest()),
            |_| {},
        )
        .await
        .is_ok();
        if ok && sender_confirmed(&conn).await {
            return true;
        }
    }
}

async fn reconnect(
    ep: &Endpoint,
    id: DeviceId,
    at: &mut SenderAt,
    give_up: Duration,
    rep: &Reporter,
) -> Result<PeerConnection, Failure> {
    let start = Instant::now();
    let mut delay = Duration::from_millis(200);
    loop {
        let attempt = tokio::select! {
            r = attempt_once(ep, id, at, rep) => r,
            _ = tokio::signal::ctrl_c() => {
                return Err(Failure::new(Exit::Interrupted, STOPPED));
            }
        };
        match attempt {
            Ok(c) => {
                rep.say("reconnected");
                at.add(c.peer().addr);
                return Ok(c);
            }
            Err(e) => {
                tracing::info!("reconnect failed: {e}");
                if start.elapsed() >= give_up {
                    return Err(Failure::new(
                        Exit::Interrupted,
                        format!("the sender has been unreachable for {} s ({e}); everything verified so far is kept: run the same command to continue", give_up.as_secs()),
                    ));
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(3));
            }
        }
    }
}
