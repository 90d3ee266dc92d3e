//! `ferry send`: scan, listen, pair, serve sessions until the receiver confirms completion.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_sync::compress::CompressPolicy;
use ferry_sync::scan::{scan, Capture, HashCache, ScanConfig, ScanError};
use ferry_sync::snapshot::SnapshotStore;
use ferry_sync::source::Source;
use ferry_transport::{
    AcceptError, Advertisement, Congestion, Discovery, FerryDirs, MdnsConfig, MdnsDiscovery,
    PairingCode, PairingError, PeerConnection, Ticket,
};
use serde_json::json;
use tokio::sync::oneshot;

use crate::common;
use crate::exit::{self, Exit, Failure};
use crate::output::{human_bytes, Reporter};
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
}

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
        let shown: Vec<&str> = self.unstable.iter().take(10).map(String::as_str).collect();
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

/// Runs the sender until the migration is complete (or Ctrl-C).
pub async fn run(
    s: SendSettings,
    rep: &Reporter,
    listening: Option<oneshot::Sender<Ticket>>,
) -> Result<SendSummary, Failure> {
    let started = Instant::now();
    let (dir, state) = (s.dir.clone(), s.dirs.state.clone());
    let scanned = tokio::task::spawn_blocking(move || {
        let cache_path = HashCache::path_for(&state, &dir);
        let mut cache = HashCache::load(&cache_path);
        let cfg = ScanConfig {
            snapshot_dir: Some(SnapshotStore::dir_for(&state, &dir)),
            ..ScanConfig::default()
        };
        let out = scan(&dir, Some(&mut cache), &cfg)?;
        if let Err(e) = cache.save(&cache_path) {
            tracing::warn!("cannot save the hash cache {}: {e}", cache_path.display());
        }
        Ok::<_, ScanError>(out)
    })
    .await
    .map_err(|e| Failure::new(Exit::Internal, e.to_string()))?
    .map_err(scan_failure)?;
    let scan_secs = started.elapsed().as_secs_f64();
    for sk in scanned.skipped.iter().take(20) {
        rep.say(&format!("skipped {}: {}", sk.path, sk.reason));
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
                    db.path
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
            u.path, u.reason
        ));
        rep.event("unstable", json!({"path": u.path, "reason": u.reason}));
    }
    let unstable: Vec<String> = scanned.unstable.iter().map(|u| u.path.clone()).collect();
    let manifest = Arc::new(scanned.manifest);
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
        json!({"files": sum.files, "bytes": sum.bytes, "chunks": sum.unique_chunks, "root": sum.root.to_hex(),
            "hashed_bytes": scanned.hashed_bytes, "cached_files": scanned.cached_files, "scan_s": scan_secs}),
    );
    let source = Arc::new(
        Source::new(&s.dir, Arc::clone(&manifest), CompressPolicy::default())
            .with_redirects(scanned.sources),
    );

    let ep = common::endpoint_with(&s.dirs, s.name.as_deref(), s.listen, s.congestion)?;
    let mut code = match s.code {
        Some(c) => {
            rep.say(
                "warning: a chosen pairing code is weaker than a random one; prefer the default",
            );
            ep.set_pairing_code(c);
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
        rep.say("on the new device run: ferry receive <FOLDER> (and type the code), or ferry receive <FOLDER> --ticket <TICKET>");
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

    let mut wire_bytes = 0u64;
    let mut sessions = 0u32;
    // A connection that arrived while a session was running and replaces it.
    let mut next: Option<PeerConnection> = None;
    loop {
        let accepted = match next.take() {
            Some(c) => Ok(c),
            None => tokio::select! {
                a = ep.accept() => a,
                _ = tokio::signal::ctrl_c() => {
                    return Err(Failure::new(Exit::Interrupted, STOPPED));
                }
            },
        };
        match accepted {
            Ok(conn) => {
                let peer = conn.peer().clone();
                rep.event("paired", json!({"peer": peer.name, "device_id": peer.device_id.to_string(), "addr": peer.addr.to_string(), "newly_paired": conn.newly_paired()}));
                rep.say(&format!(
                    "connected to {} ({}) at {}",
                    peer.name,
                    peer.device_id.short(),
                    peer.addr
                ));
                sessions += 1;
                let serving =
                    session::serve(&conn, Arc::clone(&manifest), Arc::clone(&source), |_| {});
                tokio::pin!(serving);
                // A receiver that was killed (or lost power) never closes its connection: this
                // session would only notice at the idle timeout. The same receiver connecting
                // again means the old connection is dead, so the new one replaces it at once.
                let (res, stats) = loop {
                    tokio::select! {
                        r = &mut serving => break r,
                        a = ep.accept(), if next.is_none() => match a {
                            Ok(newer) if newer.peer().device_id == peer.device_id => {
                                tracing::info!("{} reconnected: replacing its stale session", peer.name);
                                conn.close(session::CLOSE_SUPERSEDED, b"replaced by a newer connection");
                                next = Some(newer);
                            }
                            Ok(other) => {
                                other.close(session::CLOSE_BUSY, b"busy with another device");
                            }
                            Err(e) => tracing::info!("refused a connection while serving: {e}"),
                        },
                        _ = tokio::signal::ctrl_c() => {
                            conn.close(1, b"sender stopped");
                            return Err(Failure::new(Exit::Interrupted, STOPPED));
                        }
                    }
                };
                wire_bytes += stats.wire_bytes;
                match res {
                    Ok(()) => {
                        conn.close(session::CLOSE_DONE, b"done");
                        let elapsed = started.elapsed().as_secs_f64();
                        rep.event("done", json!({"root": sum.root.to_hex(), "files": sum.files, "bytes": sum.bytes, "wire_bytes": wire_bytes, "elapsed_s": elapsed, "complete": unstable.is_empty(), "unstable": unstable}));
                        rep.say(&format!(
                            "{}: {} verified by {} ({} on the wire, {:.1} s)",
                            if unstable.is_empty() {
                                "done"
                            } else {
                                "done, but incomplete"
                            },
                            human_bytes(sum.bytes),
                            peer.name,
                            human_bytes(wire_bytes),
                            elapsed
                        ));
                        ep.close(0, b"done").await;
                        return Ok(SendSummary {
                            wire_bytes,
                            sessions,
                            scan_secs,
                            unstable,
                        });
                    }
                    Err(e) => {
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
                    }
                }
            }
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
                    code = ep
                        .issue_pairing_code()
                        .map_err(|e| Failure::new(Exit::Internal, e.to_string()))?;
                    rep.say("new pairing code issued:");
                    announce(code)?;
                }
            }
            Err(e) => {
                tracing::info!("refused a connection: {e}");
                if !ep.pairing_open() && sessions == 0 {
                    // The code was used by a failed attempt: issue a fresh one so pairing can be retried.
                    code = ep
                        .issue_pairing_code()
                        .map_err(|e| Failure::new(Exit::Internal, e.to_string()))?;
                    announce(code)?;
                }
            }
        }
    }
}
