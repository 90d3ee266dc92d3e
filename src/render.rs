//! A migration's events for the person (lines and a progress bar on stderr) or the script
//! (`--json`: each event serialised as it is, one object per line).

use std::path::Path;

use ferry_migrate::{End, Event, ReceiveSummary, RoundInfo, RoundReason, SendSummary};

use crate::output::{escape, human_bytes, utc_time, Reporter};

/// Which device this process is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Send,
    Receive,
}

/// Shows one event. `place` is the folder sent or received into.
pub fn show(rep: &Reporter, ev: &Event, side: Side, place: &Path) {
    if rep.is_json() {
        rep.progress_json(ev);
        return;
    }
    if let Some(p) = ev.progress() {
        return rep.progress(&p);
    }
    match ev {
        Event::Listening { .. } => listening(rep, ev),
        Event::Paired(p) => rep.say(&match (side, p.newly_paired) {
            (Side::Send, true) => format!(
                "paired with {} ({}) at {}; serving it",
                escape(&p.peer),
                p.device_id,
                p.addr
            ),
            (Side::Send, false) => format!(
                "serving {} ({}) at {}: paired {} as a receiver of this device, no code needed (`ferry peers --forget` to revoke)",
                escape(&p.peer),
                p.device_id,
                p.addr,
                utc_time(p.paired_at)
            ),
            (Side::Receive, newly) => format!(
                "{} {} ({})",
                if newly { "paired with" } else { "connected to" },
                escape(&p.peer),
                p.device_id.short()
            ),
        }),
        Event::Round(r) => round(rep, r, side),
        Event::Stalled { silent_s } => {
            rep.link_down(&format!(
                "no word from the sender for {silent_s:.0} s: reconnecting…"
            ));
        }
        Event::Interrupted { message, .. } => {
            rep.link_down("reconnecting…");
            // The reason often says no more than "connection lost" itself.
            let why = match message.as_str() {
                "" | "connection lost" | "the connection was lost" => String::new(),
                m => format!(" ({})", escape(m)),
            };
            rep.say(&match side {
                Side::Send => format!(
                    "the connection to the receiver was lost{why}; waiting for it to reconnect"
                ),
                Side::Receive => format!("connection lost{why}; reconnecting…"),
            });
        }
        Event::Sent(s) => sent(rep, s),
        Event::Received(s) => received(rep, s, place),
        Event::Manifest(m) => match &m.scan {
            Some(s) => {
                rep.finish_progress();
                if s.skipped > 20 {
                    rep.say(&format!("… and {} more skipped", s.skipped - 20));
                }
                rep.say(&format!(
                    "{}: {} files, {} ({} to send after dedup), scanned in {:.1} s ({} hashed, {} files from cache)",
                    place.display(),
                    m.files,
                    human_bytes(m.bytes),
                    human_bytes(s.unique_bytes),
                    s.scan_s,
                    human_bytes(s.hashed_bytes),
                    s.cached_files
                ));
            }
            None => rep.say(&format!("manifest: {} files, {}", m.files, human_bytes(m.bytes))),
        },
        other => {
            if let Some(line) = line(other) {
                rep.say(&line);
            }
        }
    }
}

/// The one-line events.
fn line(ev: &Event) -> Option<String> {
    Some(match ev {
        Event::Skipped { path, reason } => format!("skipped {}: {}", escape(path), escape(reason)),
        Event::Database { path, reason, .. } => format!(
            "database {} cannot be read through SQLite ({}); sending it as a plain file, checked for changes while read",
            escape(path),
            escape(reason)
        ),
        Event::Databases {
            snapshots, reused, ..
        } if *snapshots > 0 => format!(
            "{snapshots} database(s) captured as consistent snapshots ({reused} unchanged since the last scan)"
        ),
        Event::Unstable { path, reason } => format!(
            "could not be captured consistently, not sent: {} ({})",
            escape(path),
            escape(reason)
        ),
        Event::Unrepresentable { paths, reason } => format!(
            "left out ({}), everything else is received and verified: {}",
            escape(reason),
            ferry_migrate::text::escape_list(paths, 10)
        ),
        Event::Essentials { files, bytes, .. } => format!(
            "essentials first: databases and small files ({files} files, {}) as round 1, then the rest",
            human_bytes(*bytes)
        ),
        Event::ServingOnly { peer, device_id } => format!(
            "serving only {} ({device_id}); any other device is refused",
            escape(peer)
        ),
        Event::ChosenCode => {
            "warning: a chosen pairing code is weaker than a random one; prefer the default".into()
        }
        Event::DiscoveryUnavailable { reason } => format!(
            "local-network discovery unavailable ({}); use the ticket or address",
            escape(reason)
        ),
        Event::PairingBackoff {
            failures,
            retry_in_s,
        } => format!("{failures} failed pairing attempts in a row: a new code in {retry_in_s} s"),
        Event::PairingPaused {
            failures,
            retry_in_s,
            resume,
        } => {
            let minutes = retry_in_s.div_ceil(60);
            let how = if *resume == "enter" {
                format!("Press Enter for a new code (or wait {minutes} min, or restart ferry send)")
            } else {
                format!("A new code is issued in {minutes} min; restart ferry send for one now")
            };
            format!(
                "{failures} failed pairing attempts in a row: pairing paused. If that was not you, someone nearby is guessing the code. {how}. Devices already paired can still connect."
            )
        }
        Event::WrongCode { addr, .. } => {
            format!("a device at {addr} tried a wrong pairing code; that code is now void")
        }
        Event::Refused { device_id, addr } => format!(
            "refused device {device_id} at {addr}: this sender serves only the device given with --to"
        ),
        Event::Unfinished => "this folder holds an unfinished migration: continuing it".into(),
        Event::FinishedHere => "this folder already holds a finished migration: asking the sender whether anything changed since".into(),
        Event::KnownSender { .. } => {
            "connecting to the paired sender by its key (no code needed)".into()
        }
        Event::Looking => "looking for senders on the local network…".into(),
        Event::Waiting { give_up_s, .. } => format!(
            "waiting for the old device: start `ferry send` there (still looking; giving up after {give_up_s} s, --give-up-after)"
        ),
        Event::Found { peer, addrs } => format!("found {} at {}", escape(peer), addr_list(addrs)),
        Event::Resumed {
            bytes_have,
            bytes_total,
            round,
        } => {
            if *round == 1 {
                format!(
                    "resuming: {} of {} already here and verified",
                    human_bytes(*bytes_have),
                    human_bytes(*bytes_total)
                )
            } else {
                format!(
                    "catch-up round {round}: {} of {} already here",
                    human_bytes(*bytes_have),
                    human_bytes(*bytes_total)
                )
            }
        }
        Event::StillChanging { rounds, paths, .. } => format!(
            "the folder was still changing after {rounds} rounds (--max-rounds); the new device holds the verified state of the last round. Still changing: {}",
            paths.iter().map(|p| escape(p)).collect::<Vec<_>>().join(", ")
        ),
        Event::Reconnected { .. } => "reconnected".into(),
        Event::SenderFound { addrs } => format!(
            "a sender announces itself at {}: trying there too",
            addrs.join(", ")
        ),
        Event::RescanFailed { message } => format!("rescan failed: {}", escape(message)),
        Event::Unconfirmed => "the sender did not confirm the end; everything here is verified: stop `ferry send` on the old device".into(),
        Event::AlreadyComplete { reason } => format!(
            "{}; but this folder already holds the finished migration from it (every file verified again just now). \
             If the old device changed since, run both commands again to send the changes",
            escape(reason)
        ),
        _ => return None,
    })
}

fn addr_list(addrs: &[std::net::SocketAddr]) -> String {
    addrs
        .iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn listening(rep: &Reporter, ev: &Event) {
    let Event::Listening {
        addrs,
        code,
        ticket,
        reissued,
        mdns,
        waiting_for,
        ..
    } = ev
    else {
        return;
    };
    if let Some(w) = waiting_for {
        // A restarted sender whose receiver is paired: that device reconnects by its key; the
        // code only matters for a different device.
        if !*reissued {
            rep.say(&format!(
                "waiting for {} ({}) to reconnect and continue the unfinished migration: it is paired with this device, no code needed",
                escape(&w.peer),
                w.device_id.short()
            ));
            rep.say(&format!("listening on {}", addr_list(addrs)));
        }
        rep.say(&format!(
            "to migrate to another device instead: pairing code {code}, ticket {ticket} (show them only to that device)"
        ));
        return;
    }
    if *reissued {
        rep.say("new pairing code issued:");
    }
    rep.say(&format!("pairing code: {code}"));
    rep.say(&format!("listening on {}", addr_list(addrs)));
    rep.say(&format!("ticket: {ticket}"));
    if let Ok(qr) = ticket.to_qr_unicode() {
        rep.say(&format!("\n{qr}"));
    }
    rep.say("the ticket and the QR code carry the pairing code: like the code, show them only to the new device until it has paired");
    if *mdns {
        rep.say("on the new device run: ferry receive <FOLDER> (and type the code), or ferry receive <FOLDER> --ticket - (and paste the ticket)");
    } else if let Some(a) = addrs.first() {
        // Not announced: the new device needs the ticket or the address.
        rep.say(&format!("on the new device run: ferry receive <FOLDER> --ticket - (and paste the ticket), or ferry receive <FOLDER> --connect {a} (and type the code)"));
    }
}

fn round(rep: &Reporter, r: &RoundInfo, side: Side) {
    let n = r.round;
    let (a, c, d) = (
        r.files_added.unwrap_or(0),
        r.files_changed.unwrap_or(0),
        r.files_removed.unwrap_or(0),
    );
    match (side, r.reason) {
        (Side::Send, RoundReason::Changed) => rep.say(&format!(
            "round {} verified; the folder changed meanwhile ({a} added, {c} changed, {d} removed): catch-up round {n}",
            n - 1
        )),
        (Side::Send, RoundReason::SourceChanged) => rep.say(&format!(
            "{} changed while it was being sent: rescanning and continuing (the new device keeps what it verified)",
            escape(r.path.as_deref().unwrap_or("a file"))
        )),
        (Side::Receive, RoundReason::Changed) => {
            rep.finish_progress();
            rep.say(&format!(
                "round {} verified ({} files); the old device has changes: catch-up round {n}",
                n - 1,
                r.verified_files.unwrap_or(0)
            ));
        }
        (Side::Receive, RoundReason::SourceChanged) => {
            rep.finish_progress();
            rep.say("a file changed on the old device while it was being sent: continuing with its new state (what arrived is kept)");
        }
    }
}

fn sent(rep: &Reporter, s: &SendSummary) {
    if s.end == End::ReceiverStopped {
        rep.say("the receiver stopped; it holds the last verified round");
    }
    rep.say(&format!(
        "{}: {} verified by {} ({} on the wire in {:.1} s, {}/s on average)",
        if s.unstable.is_empty() {
            "done"
        } else {
            "done, but incomplete"
        },
        human_bytes(s.bytes),
        escape(&s.peer),
        human_bytes(s.wire_bytes),
        s.elapsed_s,
        human_bytes(rate(s.wire_bytes, s.elapsed_s))
    ));
    if let Some(n) = s.database_rows_added.filter(|&n| n != 0) {
        rep.say(&format!(
            "{n} database rows (messages and other records) arrived during the migration and were sent in catch-up rounds"
        ));
    }
    if s.rounds > 1 || s.files_added + s.files_changed + s.files_removed > 0 {
        rep.say(&format!(
            "{} rounds: during the migration {} files were added, {} changed and {} removed; catch-up rounds sent {}",
            s.rounds,
            s.files_added,
            s.files_changed,
            s.files_removed,
            human_bytes(s.catchup_wire_bytes)
        ));
    }
}

fn received(rep: &Reporter, s: &ReceiveSummary, dest: &Path) {
    rep.finish_progress();
    if s.end == End::Stopped {
        rep.say("stopped; the last round is verified and complete here");
    }
    if s.rounds == 0 && s.wire_bytes == 0 {
        // The finished migration was already here (the sender is gone).
        rep.say(&format!(
            "done: {} files, {} already here and verified in {}; nothing needed to be received",
            s.files,
            human_bytes(s.bytes),
            dest.display()
        ));
        return;
    }
    rep.say(&format!(
        "done: {} files, {} verified and committed in {} ({} received in {:.1} s, {}/s on average)",
        s.files,
        human_bytes(s.bytes),
        dest.display(),
        human_bytes(s.wire_bytes),
        s.elapsed_s,
        human_bytes(rate(s.wire_bytes, s.elapsed_s))
    ));
    if s.rounds > 1 {
        rep.say(&format!(
            "{} rounds: during the migration {} files were added, {} changed and {} removed on the old device; catch-up rounds brought {}",
            s.rounds,
            s.files_added,
            s.files_changed,
            s.files_removed,
            human_bytes(s.catchup_wire_bytes)
        ));
    }
}

/// Bytes per second over `secs`.
fn rate(bytes: u64, secs: f64) -> u64 {
    (bytes as f64 / secs.max(1e-3)) as u64
}
